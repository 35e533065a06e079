"""Drives tollgate's Anthropic Messages API (`/v1/messages`, `/v1/messages/count_tokens`) with the
real Anthropic Python SDK; prints one JSON object with what it saw.

Run by tests/sdk.rs with ANTHROPIC_BASE_URL (the gateway, without /v1) and ANTHROPIC_API_KEY (a
gateway key), and:
  TG_MODEL        the model for text turns
  TG_TOOL_MODEL   a model whose upstream answers a tool_use when given tools
  TG_ERROR_MODEL  a model whose upstream fails (overloaded, or a 500)
  TG_POOR_KEY     a gateway key whose budget cannot cover a request

Every step runs on its own: a step that raises is reported under "errors" and the script exits 1
after printing what the other steps saw.
"""
import json
import os
import sys
import time
import traceback

import anthropic
from anthropic import Anthropic

client = Anthropic(max_retries=0, timeout=30)
MODEL = os.environ["TG_MODEL"]
TOOL_MODEL = os.environ["TG_TOOL_MODEL"]
ERROR_MODEL = os.environ["TG_ERROR_MODEL"]
POOR_KEY = os.environ["TG_POOR_KEY"]

out = {"sdk_version": anthropic.__version__, "errors": {}, "seconds": {}}


def step(fn):
    started = time.monotonic()
    try:
        out[fn.__name__] = fn()
    except Exception:  # noqa: BLE001 - every failure is reported, the run exits 1
        out["errors"][fn.__name__] = traceback.format_exc()
    out["seconds"][fn.__name__] = round(time.monotonic() - started, 3)
    return fn


def usage(u):
    return {
        "input_tokens": u.input_tokens,
        "output_tokens": u.output_tokens,
        "cache_read_input_tokens": u.cache_read_input_tokens,
        "cache_creation_input_tokens": u.cache_creation_input_tokens,
    }


def message(m):
    return {
        "id": m.id,
        "type": m.type,
        "role": m.role,
        "model": m.model,
        "content_types": [b.type for b in m.content],
        "text": "".join(b.text for b in m.content if b.type == "text"),
        "stop_reason": m.stop_reason,
        "usage": usage(m.usage),
    }


@step
def create():
    m = client.messages.create(
        model=MODEL,
        max_tokens=100,
        system="Be brief.",
        messages=[{"role": "user", "content": "Hello there"}],
    )
    return message(m)


@step
def stream():
    deltas = []
    events = []
    with client.messages.stream(
        model=MODEL,
        max_tokens=100,
        system=[{"type": "text", "text": "Be brief."}],
        messages=[
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": [{"type": "text", "text": "Again"}]},
        ],
    ) as s:
        for event in s:
            events.append(event.type)
            if event.type == "text":
                deltas.append(event.text)
        final = s.get_final_message()
    r = message(final)
    r["deltas"] = "".join(deltas)
    r["first_event"] = events[0] if events else None
    r["saw_stop"] = "message_stop" in events
    return r


TOOLS = [
    {
        "name": "get_weather",
        "description": "The weather in a city",
        "input_schema": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    }
]


def tool_turn(first):
    uses = [b for b in first.content if b.type == "tool_use"]
    u = uses[0]
    second = client.messages.create(
        model=TOOL_MODEL,
        max_tokens=100,
        tools=TOOLS,
        messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": u.id, "content": "21C and clear"}
                ],
            },
        ],
    )
    return {
        "uses": len(uses),
        "id": u.id,
        "name": u.name,
        "input": u.input,
        "stop_reason": first.stop_reason,
        "after": message(second),
    }


@step
def tool_use():
    first = client.messages.create(
        model=TOOL_MODEL,
        max_tokens=100,
        tools=TOOLS,
        messages=[{"role": "user", "content": "Weather in Paris?"}],
    )
    return tool_turn(first)


@step
def tool_use_stream():
    partial = []
    with client.messages.stream(
        model=TOOL_MODEL,
        max_tokens=100,
        tools=TOOLS,
        messages=[{"role": "user", "content": "Weather in Paris?"}],
    ) as s:
        for event in s:
            if event.type == "input_json":
                partial.append(event.partial_json)
        final = s.get_final_message()
    r = tool_turn(final)
    r["partial_json"] = "".join(partial)
    return r


@step
def count_tokens():
    # `messages.count_tokens` left the beta namespace in later SDKs.
    count = getattr(client.messages, "count_tokens", None) or client.beta.messages.count_tokens
    c = count(
        model=MODEL,
        system="Be brief.",
        messages=[{"role": "user", "content": "How many tokens is this?"}],
    )
    return {"input_tokens": c.input_tokens}


def status_error(call, expected):
    """What the SDK raised for `call`, and whether it is (a subclass of) `expected`."""
    try:
        call()
        return None
    except anthropic.APIStatusError as e:
        body = e.body if isinstance(e.body, dict) else {}
        return {
            "class": type(e).__name__,
            "expected_class": isinstance(e, expected),
            "status": e.status_code,
            "type": (body.get("error") or {}).get("type"),
            "should_retry": e.response.headers.get("x-should-retry"),
        }


def hi(c, model):
    return lambda: c.messages.create(
        model=model, max_tokens=1000, messages=[{"role": "user", "content": "Hi"}]
    )


@step
def errors_seen():
    wrong = Anthropic(api_key="sk-tg-not-a-real-key", max_retries=0, timeout=30)
    poor = Anthropic(api_key=POOR_KEY, max_retries=0, timeout=30)
    return {
        "wrong_key": status_error(hi(wrong, MODEL), anthropic.AuthenticationError),
        "over_budget": status_error(hi(poor, MODEL), anthropic.RateLimitError),
        # 529 is `OverloadedError` in SDKs that know it, an `InternalServerError` before.
        "upstream": status_error(
            hi(client, ERROR_MODEL),
            getattr(anthropic, "OverloadedError", anthropic.InternalServerError)
            if ERROR_MODEL == "claude-overloaded"
            else anthropic.InternalServerError,
        ),
        "unknown_model": status_error(hi(client, "no-such-model"), anthropic.NotFoundError),
    }


print(json.dumps(out))
sys.exit(1 if out["errors"] else 0)
