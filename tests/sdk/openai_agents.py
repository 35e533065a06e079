"""Runs one OpenAI Agents SDK agent with a function tool through tollgate; prints one JSON object
with what it saw.

Run by tests/sdk.rs with OPENAI_BASE_URL and OPENAI_API_KEY pointing at a test gateway and
TG_MODEL a model whose upstream (a chat-completions-only mock) first calls the tool it is given
and then, once the tool's result is in the messages, answers with text. The agent uses the SDK's
default model, the Responses API, so the gateway translates each turn to chat completions.
"""
import asyncio
import json
import os
import sys
import traceback

import agents
from agents import (
    Agent,
    Runner,
    function_tool,
    set_default_openai_client,
    set_tracing_disabled,
)
from openai import AsyncOpenAI

MODEL = os.environ["TG_MODEL"]
calls = []


@function_tool
def get_weather(city: str) -> str:
    """The current weather in a city."""
    calls.append(city)
    return f"21C and clear in {city}"


async def main():
    client = AsyncOpenAI(
        base_url=os.environ["OPENAI_BASE_URL"],
        api_key=os.environ["OPENAI_API_KEY"],
        max_retries=0,
        timeout=30,
    )
    set_default_openai_client(client)
    set_tracing_disabled(True)
    agent = Agent(
        name="Weather",
        instructions="Answer with the weather, using the tool.",
        model=MODEL,
        tools=[get_weather],
    )
    result = await Runner.run(agent, "What is the weather in Paris?", max_turns=4)
    usage = result.context_wrapper.usage
    return {
        "final_output": result.final_output,
        "tool_calls": calls,
        "items": [i.type for i in result.new_items],
        "tool_outputs": [
            i.output for i in result.new_items if i.type == "tool_call_output_item"
        ],
        "responses": len(result.raw_responses),
        "response_ids": [r.response_id for r in result.raw_responses],
        "usage": {
            "requests": usage.requests,
            "input_tokens": usage.input_tokens,
            "output_tokens": usage.output_tokens,
            "total_tokens": usage.total_tokens,
        },
    }


out = {"agents_version": getattr(agents, "__version__", None)}
try:
    out["run"] = asyncio.run(main())
except Exception:  # noqa: BLE001 - the failure is reported with its traceback
    out["errors"] = {"run": traceback.format_exc()}
print(json.dumps(out))
sys.exit(1 if "errors" in out else 0)
