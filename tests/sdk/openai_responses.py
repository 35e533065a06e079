"""Drives tollgate's Responses, Conversations and stored chat completions APIs with the real
OpenAI Python SDK; prints one JSON object with what it saw.

Run by tests/sdk.rs with OPENAI_BASE_URL and OPENAI_API_KEY pointing at a test gateway, and:
  TG_MODEL       the model for text turns
  TG_TOOL_MODEL  a model whose upstream calls the function tool it is given (optional)
  TG_FULL        "1": also the Conversations API and stored chat completions

Every step runs on its own: a step that raises is reported under "errors" (with its traceback)
and the script exits 1 after printing what the other steps saw, so one failure does not hide
the rest. Nothing here retries or waits: what the gateway answered is what an SDK user gets.
"""
import json
import os
import sys
import time
import traceback

import openai
from openai import OpenAI

client = OpenAI(max_retries=0, timeout=30)
MODEL = os.environ["TG_MODEL"]
TOOL_MODEL = os.environ.get("TG_TOOL_MODEL")
FULL = os.environ.get("TG_FULL") == "1"

out = {"sdk_version": openai.__version__, "errors": {}, "seconds": {}}
ids = {}


def step(fn):
    started = time.monotonic()
    try:
        out[fn.__name__] = fn()
    except Exception:  # noqa: BLE001 - every failure is reported, the run exits 1
        out["errors"][fn.__name__] = traceback.format_exc()
    out["seconds"][fn.__name__] = round(time.monotonic() - started, 3)
    return fn


def usage(u):
    return None if u is None else {
        "input_tokens": u.input_tokens,
        "output_tokens": u.output_tokens,
        "total_tokens": u.total_tokens,
        "cached_tokens": u.input_tokens_details.cached_tokens,
        "reasoning_tokens": u.output_tokens_details.reasoning_tokens,
    }


def events_summary(events):
    types = [e.type for e in events]
    completed = [e.response for e in events if e.type == "response.completed"]
    final = completed[-1] if completed else None
    return {
        "first": types[0] if types else None,
        "last": types[-1] if types else None,
        "completed_events": len(completed),
        "sequence_ok": [e.sequence_number for e in events] == list(range(len(events))),
        "deltas": "".join(e.delta for e in events if e.type == "response.output_text.delta"),
        "done_texts": [e.text for e in events if e.type == "response.output_text.done"],
        "final_text": final.output_text if final else None,
        "final_id": final.id if final else None,
        "created_id": next((e.response.id for e in events if e.type == "response.created"), None),
        "usage": usage(final.usage) if final else None,
    }


@step
def create():
    r = client.responses.create(
        model=MODEL,
        input="Hi there",
        instructions="Be brief.",
        metadata={"run": "sdk"},
    )
    ids["first"] = r.id
    return {
        "id": r.id,
        "object": r.object,
        "status": r.status,
        "model": r.model,
        "text": r.output_text,
        "output_types": [o.type for o in r.output],
        "usage": usage(r.usage),
        "instructions": r.instructions,
        "metadata": r.metadata,
    }


@step
def stream():
    events = list(client.responses.create(model=MODEL, input="Hi", stream=True))
    return events_summary(events)


@step
def stream_helper():
    deltas = []
    with client.responses.stream(model=MODEL, input="Hi", instructions="Be brief.") as s:
        for event in s:
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
        final = s.get_final_response()
    return {
        "deltas": "".join(deltas),
        "final_text": final.output_text,
        "id": final.id,
        "usage": usage(final.usage),
    }


@step
def follow_up():
    r = client.responses.create(
        model=MODEL, input="And again", previous_response_id=ids["first"]
    )
    ids["follow_up"] = r.id
    return {
        "id": r.id,
        "text": r.output_text,
        "previous_response_id": r.previous_response_id,
    }


@step
def streamed_follow_up():
    events = list(
        client.responses.create(
            model=MODEL,
            input="Once more",
            previous_response_id=ids["follow_up"],
            stream=True,
        )
    )
    s = events_summary(events)
    ids["streamed_follow_up"] = s["final_id"]
    return s


@step
def retrieve():
    r = client.responses.retrieve(ids["first"])
    return {
        "id": r.id,
        "status": r.status,
        "model": r.model,
        "text": r.output_text,
        "usage": usage(r.usage),
        "metadata": r.metadata,
    }


def item_text(i):
    content = getattr(i, "content", None)
    if isinstance(content, str):
        return content
    if content:
        return "".join(getattr(p, "text", "") or "" for p in content)
    return None


@step
def input_items():
    page = client.responses.input_items.list(ids["follow_up"])
    return {
        "items": [
            {"type": i.type, "role": getattr(i, "role", None), "text": item_text(i), "id": i.id}
            for i in page.data
        ],
        "has_more": page.has_more,
    }


@step
def delete():
    gone = ids["follow_up"]
    client.responses.delete(gone)
    try:
        client.responses.retrieve(gone)
        after = None
    except openai.NotFoundError as e:
        after = e.status_code
    try:
        client.responses.delete(gone)
        again = None
    except openai.NotFoundError as e:
        again = e.status_code
    # The chain through the deleted response is not readable any more, and says so.
    return {"retrieve_after": after, "delete_again": again}


TOOLS = [
    {
        "type": "function",
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
            "additionalProperties": False,
        },
    }
]


def function_calls(response):
    return [o for o in response.output if o.type == "function_call"]


if TOOL_MODEL:

    @step
    def tool_round_trip():
        r = client.responses.create(model=TOOL_MODEL, input="Weather in Paris?", tools=TOOLS)
        calls = function_calls(r)
        c = calls[0]
        r2 = client.responses.create(
            model=TOOL_MODEL,
            previous_response_id=r.id,
            tools=TOOLS,
            input=[
                {
                    "type": "function_call_output",
                    "call_id": c.call_id,
                    "output": '{"temp_c": 21, "sky": "clear"}',
                }
            ],
        )
        return {
            "calls": len(calls),
            "name": c.name,
            "arguments": json.loads(c.arguments),
            "call_id": c.call_id,
            "item_id": c.id,
            "status": r.status,
            "text_after": r2.output_text,
            "output_types_after": [o.type for o in r2.output],
        }

    @step
    def tool_stream():
        arg_deltas = []
        added = []
        with client.responses.stream(model=TOOL_MODEL, input="Weather in Paris?", tools=TOOLS) as s:
            for event in s:
                if event.type == "response.function_call_arguments.delta":
                    arg_deltas.append(event.delta)
                elif event.type == "response.output_item.added":
                    added.append(event.item.type)
            final = s.get_final_response()
        calls = function_calls(final)
        c = calls[0]
        # The tool's answer goes back as input items, without previous_response_id.
        r2 = client.responses.create(
            model=TOOL_MODEL,
            tools=TOOLS,
            store=False,
            input=[
                {"role": "user", "content": "Weather in Paris?"},
                {
                    "type": "function_call",
                    "call_id": c.call_id,
                    "name": c.name,
                    "arguments": c.arguments,
                },
                {"type": "function_call_output", "call_id": c.call_id, "output": "21C"},
            ],
        )
        return {
            "added": added,
            "arg_deltas": "".join(arg_deltas),
            "name": c.name,
            "arguments": json.loads(c.arguments),
            "call_id": c.call_id,
            "text_after": r2.output_text,
            "store_after": r2.store,
        }


if FULL:

    @step
    def conversation():
        conv = client.conversations.create(
            metadata={"topic": "sdk"},
            items=[{"type": "message", "role": "user", "content": "My colour is blue."}],
        )
        first = client.responses.create(model=MODEL, input="What colour?", conversation=conv.id)
        second = client.responses.create(
            model=MODEL, input="And now?", conversation={"id": conv.id}
        )
        items = client.conversations.items.list(conv.id, order="asc")
        got = client.conversations.retrieve(conv.id)
        deleted = client.conversations.delete(conv.id)
        try:
            client.conversations.retrieve(conv.id)
            after = None
        except openai.NotFoundError as e:
            after = e.status_code
        return {
            "id": conv.id,
            "object": conv.object,
            "metadata": got.metadata,
            "first_text": first.output_text,
            "second_text": second.output_text,
            "response_conversation": first.conversation.id if first.conversation else None,
            "items": [
                {"type": i.type, "role": getattr(i, "role", None), "text": item_text(i)}
                for i in items.data
            ],
            "first_id": items.first_id,
            "last_id": items.last_id,
            "has_more": items.has_more,
            "deleted": {"id": deleted.id, "object": deleted.object, "deleted": deleted.deleted},
            "retrieve_after": after,
        }

    @step
    def stored_completions():
        made = []
        for n in range(2):
            c = client.chat.completions.create(
                model=MODEL,
                messages=[
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": f"Hi {n}"},
                ],
                store=True,
                metadata={"run": "sdk", "n": str(n)},
            )
            made.append(c.id)
        # A completion that is not stored is not listed.
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "unstored"}]
        )
        got = client.chat.completions.retrieve(made[0])
        listed = client.chat.completions.list(metadata={"run": "sdk"})
        one = client.chat.completions.list(metadata={"n": "1"})
        messages = client.chat.completions.messages.list(made[0])
        updated = client.chat.completions.update(made[0], metadata={"run": "sdk", "n": "0", "x": "y"})
        deleted = client.chat.completions.delete(made[1])
        try:
            client.chat.completions.retrieve(made[1])
            after = None
        except openai.NotFoundError as e:
            after = e.status_code
        return {
            "ids": made,
            "retrieved": {
                "id": got.id,
                "model": got.model,
                "text": got.choices[0].message.content,
                "metadata": got.metadata,
                "prompt_tokens": got.usage.prompt_tokens if got.usage else None,
            },
            "listed": sorted(c.id for c in listed.data),
            "listed_n1": [c.id for c in one.data],
            "messages": [{"role": m.role, "content": m.content} for m in messages.data],
            "updated_metadata": updated.metadata,
            "deleted": {"id": deleted.id, "object": deleted.object, "deleted": deleted.deleted},
            "retrieve_after": after,
        }


print(json.dumps(out))
sys.exit(1 if out["errors"] else 0)
