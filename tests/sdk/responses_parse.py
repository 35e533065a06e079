"""Feeds tollgate's Responses API output to the official OpenAI Python SDK's own parsers.

Usage: responses_parse.py CASE.json, where CASE.json is
{"response": <non-stream body>, "sse": "<stream body>", "request": <the request's JSON>,
"other_sse": ["<stream body>", …]}.

Both bodies go through the SDK twice: strictly (pydantic `model_validate` of `Response` and of
every event against the `ResponseStreamEvent` union), and through the client itself over an
in-process transport (`responses.create`, `responses.create(stream=True)`, and
`responses.stream(...)`, whose accumulator checks item identities and ordering). Prints one JSON
object with what the SDK made of them; exits non-zero on any parse failure.
"""

import json
import sys

import openai
import pydantic
from openai.types.responses import Response, ResponseStreamEvent

try:  # the SDK's HTTP client: `httpx2` in recent releases, `httpx` before
    import httpx2 as httpx
except ImportError:
    import httpx


def parse_sse(text):
    events = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        name, data = None, []
        for line in block.split("\n"):
            if line.startswith("event: "):
                name = line[len("event: "):]
            elif line.startswith("data: "):
                data.append(line[len("data: "):])
        payload = json.loads("\n".join(data))
        assert name == payload["type"], (name, payload["type"])
        events.append(payload)
    return events


def main():
    case = json.load(open(sys.argv[1]))
    out = {"sdk_version": openai.__version__}

    # Strict validation: every required field present with the right type.
    strict = Response.model_validate(case["response"])
    out["strict_output_text"] = strict.output_text
    adapter = pydantic.TypeAdapter(ResponseStreamEvent)
    events = parse_sse(case["sse"])
    for e in events:
        adapter.validate_python(e)
    out["strict_events"] = len(events)
    # More streams, checked strictly only (a failed one ends without its items done).
    out["other_terminals"] = []
    for sse in case.get("other_sse", []):
        parsed = [adapter.validate_python(e) for e in parse_sse(sse)]
        out["other_terminals"].append(parsed[-1].type)
        if parsed[-1].type == "response.failed":
            out["failed_error"] = parsed[-1].response.error.model_dump()

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        if body.get("stream"):
            return httpx.Response(
                200,
                content=case["sse"].encode(),
                headers={"content-type": "text/event-stream"},
            )
        return httpx.Response(200, json=case["response"])

    client = openai.OpenAI(
        api_key="sk-test",
        base_url="http://tollgate.test/v1",
        http_client=httpx.Client(transport=httpx.MockTransport(handler)),
        max_retries=0,
    )
    req = dict(case["request"])
    req.pop("stream", None)

    resp = client.responses.create(**req)
    out["non_stream"] = {
        "id": resp.id,
        "status": resp.status,
        "output_text": resp.output_text,
        "types": [i.type for i in resp.output],
        "usage": resp.usage.model_dump() if resp.usage else None,
    }

    raw = list(client.responses.create(stream=True, **req))
    out["raw_stream"] = {
        "types": [e.type for e in raw],
        "sequence": [e.sequence_number for e in raw],
        "delta_text": "".join(
            e.delta for e in raw if e.type == "response.output_text.delta"
        ),
    }

    with client.responses.stream(**req) as stream:
        for _ in stream:
            pass
        final = stream.get_final_response()
    out["helper_stream"] = {
        "id": final.id,
        "status": final.status,
        "output_text": final.output_text,
        "types": [i.type for i in final.output],
        "call_ids": [i.call_id for i in final.output if i.type == "function_call"],
        "usage": final.usage.model_dump() if final.usage else None,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
