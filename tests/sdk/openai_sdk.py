"""Drives tollgate with the real OpenAI Python SDK; prints one JSON object with what it saw.

Run by tests/sdk.rs with OPENAI_BASE_URL and OPENAI_API_KEY pointing at a test gateway.
"""
import json

import openai
from openai import OpenAI

client = OpenAI(max_retries=0, timeout=30)
out = {"sdk_version": openai.__version__}

r = client.chat.completions.create(
    model="gpt-test", messages=[{"role": "user", "content": "hi"}]
)
out["non_stream"] = {
    "model": r.model,
    "content": r.choices[0].message.content,
    "prompt_tokens": r.usage.prompt_tokens,
}

chunks = list(
    client.chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": "hi"}], stream=True
    )
)
out["stream"] = {
    "content": "".join(c.choices[0].delta.content or "" for c in chunks if c.choices),
    "usage_chunks": sum(1 for c in chunks if c.usage is not None),
    "models": sorted({c.model for c in chunks}),
}

chunks = list(
    client.chat.completions.create(
        model="gpt-test",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
)
usage = [c.usage for c in chunks if c.usage is not None]
out["stream_usage"] = {
    "completion_tokens": usage[-1].completion_tokens if usage else None,
}

e = client.embeddings.create(model="embed-test", input="hello")
out["embeddings"] = {"dims": len(e.data[0].embedding), "model": e.model}

try:
    client.chat.completions.create(model="gpt-400", messages=[])
    out["error"] = None
except openai.BadRequestError as err:
    out["error"] = {"status": err.status_code, "code": err.code}

try:
    client.chat.completions.create(model="does-not-exist", messages=[])
    out["not_found"] = None
except openai.NotFoundError as err:
    out["not_found"] = {"status": err.status_code, "code": err.code}

out["models"] = sorted(m.id for m in client.models.list())

print(json.dumps(out))
