"""The real `openai` Python SDK's Realtime client (`client.realtime.connect`, over the
`websockets` package) through tollgate: a session update, one response, its text deltas and
`response.done` with usage. Prints what it saw as JSON; exits non-zero on any failure."""

import asyncio
import json
import os
import sys

from openai import AsyncOpenAI


async def main() -> None:
    client = AsyncOpenAI(
        base_url=os.environ["TOLLGATE_BASE_URL"] + "/v1",
        api_key=os.environ["TOLLGATE_KEY"],
        max_retries=0,
    )
    out = {"kinds": [], "text": ""}
    async with client.realtime.connect(model="gpt-rt") as conn:
        await conn.session.update(session={"type": "realtime", "output_modalities": ["text"]})
        await conn.response.create()
        async for event in conn:
            out["kinds"].append(event.type)
            if event.type == "session.created":
                out["session_id"] = event.session.id
            elif event.type == "response.output_text.delta":
                out["text"] += event.delta
            elif event.type == "response.done":
                usage = event.response.usage
                out["input_tokens"] = usage.input_tokens
                out["output_tokens"] = usage.output_tokens
                out["cached_tokens"] = usage.input_token_details.cached_tokens
                break
    print(json.dumps(out))


try:
    asyncio.run(asyncio.wait_for(main(), 30))
except Exception as e:  # noqa: BLE001 - any failure fails the test, with its text
    print(f"realtime SDK failed: {type(e).__name__}: {e}", file=sys.stderr)
    sys.exit(1)
