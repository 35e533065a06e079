"""One model, three client SDKs: the `openai` SDK's chat completions and Responses API and the
`anthropic` SDK's Messages API, each non-streamed and streamed, against one tollgate model
(whatever provider kind serves it). Prints one JSON object: per step the text the client read
and the usage the client was told, normalised to the gateway's counting (prompt includes cached
and cache-write tokens).

Run by tests/sdk.rs with OPENAI_BASE_URL (the gateway's /v1), ANTHROPIC_BASE_URL (the gateway,
without /v1), OPENAI_API_KEY and ANTHROPIC_API_KEY (one gateway key) and TG_MODEL.

Every step runs on its own: a step that raises is reported under "errors" and the script exits 1
after printing what the other steps saw.
"""
import json
import os
import sys
import traceback

import anthropic
import openai

MODEL = os.environ["TG_MODEL"]
oa = openai.OpenAI(max_retries=0, timeout=30)
an = anthropic.Anthropic(max_retries=0, timeout=30)
PROMPT = "Say hello."

out = {"openai": openai.__version__, "anthropic": anthropic.__version__, "errors": {}}


def step(fn):
    try:
        out[fn.__name__] = fn()
    except Exception:  # noqa: BLE001 - every failure is reported, the run exits 1
        out["errors"][fn.__name__] = traceback.format_exc()
    return fn


def chat_usage(u):
    pd = u.prompt_tokens_details
    cd = u.completion_tokens_details
    return {
        "prompt": u.prompt_tokens,
        "completion": u.completion_tokens,
        "cached": (pd.cached_tokens or 0) if pd else 0,
        "reasoning": (cd.reasoning_tokens or 0) if cd else 0,
    }


def messages_usage(u):
    read = u.cache_read_input_tokens or 0
    write = u.cache_creation_input_tokens or 0
    return {
        "prompt": u.input_tokens + read + write,
        "completion": u.output_tokens,
        "cached": read,
        "cache_write": write,
    }


def responses_usage(u):
    return {
        "prompt": u.input_tokens,
        "completion": u.output_tokens,
        "cached": u.input_tokens_details.cached_tokens or 0,
        "reasoning": u.output_tokens_details.reasoning_tokens or 0,
    }


@step
def chat():
    r = oa.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": PROMPT}], max_tokens=100
    )
    return {"model": r.model, "text": r.choices[0].message.content, "usage": chat_usage(r.usage)}


@step
def chat_stream():
    text, usage, models = "", None, set()
    for c in oa.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=100,
        stream=True,
        stream_options={"include_usage": True},
    ):
        models.add(c.model)
        if c.choices and c.choices[0].delta.content:
            text += c.choices[0].delta.content
        if c.usage:
            usage = chat_usage(c.usage)
    return {"model": sorted(models), "text": text, "usage": usage}


@step
def messages():
    m = an.messages.create(
        model=MODEL, max_tokens=100, messages=[{"role": "user", "content": PROMPT}]
    )
    text = "".join(b.text for b in m.content if b.type == "text")
    return {"model": m.model, "text": text, "usage": messages_usage(m.usage)}


@step
def messages_stream():
    with an.messages.stream(
        model=MODEL, max_tokens=100, messages=[{"role": "user", "content": PROMPT}]
    ) as s:
        text = "".join(s.text_stream)
        m = s.get_final_message()
    return {"model": m.model, "text": text, "usage": messages_usage(m.usage)}


@step
def responses():
    r = oa.responses.create(model=MODEL, input=PROMPT, max_output_tokens=100, store=False)
    return {"model": r.model, "text": r.output_text, "usage": responses_usage(r.usage)}


@step
def responses_stream():
    text, final = "", None
    for e in oa.responses.create(
        model=MODEL, input=PROMPT, max_output_tokens=100, store=False, stream=True
    ):
        if e.type == "response.output_text.delta":
            text += e.delta
        elif e.type == "response.completed":
            final = e.response
    return {"model": final.model, "text": text, "usage": responses_usage(final.usage)}


print(json.dumps(out))
sys.exit(1 if out["errors"] else 0)
