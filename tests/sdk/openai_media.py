"""Drives tollgate's media routes with the real OpenAI Python SDK: images (generate, edit),
audio (speech, transcriptions, translations) and moderations; prints one JSON object.

Run by tests/sdk.rs with OPENAI_BASE_URL and OPENAI_API_KEY pointing at a test gateway.
"""
import json
import traceback

import openai
from openai import OpenAI

client = OpenAI(max_retries=0, timeout=30)
out = {"sdk_version": openai.__version__}
errors = {}

# The upload the Rust side looks for, byte for byte, in what the upstream received.
FILE = bytes((i * 131 + 7) % 256 for i in range(150_000))


def step(name, f):
    try:
        out[name] = f()
    except Exception:  # noqa: BLE001 - every step's failure is reported
        errors[name] = traceback.format_exc()


def generate():
    r = client.images.generate(model="dall-e", prompt="a lighthouse", n=2)
    return {"n": len(r.data), "b64": r.data[0].b64_json}


def edit():
    r = client.images.edit(
        model="dall-e", image=("house.png", FILE, "image/png"), prompt="add a door", n=1
    )
    return {"n": len(r.data)}


def speech():
    r = client.audio.speech.create(model="tts", voice="alloy", input="Hello there")
    return {"hex": r.read().hex()}


def speech_streamed():
    with client.audio.speech.with_streaming_response.create(
        model="tts", voice="alloy", input="Hello there"
    ) as r:
        data = b"".join(r.iter_bytes())
    return {"hex": data.hex(), "content_type": r.headers.get("content-type")}


def transcription():
    r = client.audio.transcriptions.create(
        model="whisper", file=("speech.mp3", FILE, "audio/mpeg")
    )
    return {"text": r.text}


def transcription_srt():
    return client.audio.transcriptions.create(
        model="whisper", file=("speech.mp3", FILE, "audio/mpeg"), response_format="srt"
    )


def transcription_stream():
    events = list(
        client.audio.transcriptions.create(
            model="transcribe", file=("speech.mp3", FILE, "audio/mpeg"), stream=True
        )
    )
    return {"types": [e.type for e in events], "text": events[-1].text}


def translation():
    r = client.audio.translations.create(
        model="whisper", file=("speech.mp3", FILE, "audio/mpeg")
    )
    return {"text": r.text}


def moderation():
    r = client.moderations.create(model="omni-mod", input="I want to hug a cat")
    return {"model": r.model, "flagged": r.results[0].flagged}


for name, f in [
    ("generate", generate),
    ("edit", edit),
    ("speech", speech),
    ("speech_streamed", speech_streamed),
    ("transcription", transcription),
    ("transcription_srt", transcription_srt),
    ("transcription_stream", transcription_stream),
    ("translation", translation),
    ("moderation", moderation),
]:
    step(name, f)

if errors:
    out["errors"] = errors
print(json.dumps(out))
raise SystemExit(1 if errors else 0)
