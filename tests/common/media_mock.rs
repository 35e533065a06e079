//! The mock upstream's media routes (images, audio, moderations), chosen by the upstream model
//! name the gateway sent (a JSON `model`, or the multipart form's `model` field):
//! - images: `img-tokens` reports token usage, anything else none (metered per image); `n`
//!   images; `stream: true` answers `image_generation.partial_image` / `.completed` events;
//! - speech: [`speech_audio`] as `audio/mpeg` in 16 KiB chunks; `stream_format: "sse"` answers
//!   `speech.audio.delta` / `speech.audio.done` events with usage;
//! - transcriptions and translations: `stt-tokens` reports token usage, anything else
//!   `usage: {type: "duration", seconds: 90}`; `response_format` `srt` ends at 00:02:00 (120 s),
//!   `text` is plain text; `stream=true` answers `transcript.text.*` events with usage;
//! - moderations: one result per request;
//! - `err500` anywhere: a 500 in OpenAI's shape.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::{Value, json};

use super::TestApp;
use super::gateway::{Gateway, setup};

/// The `tts-held` behaviour: the first 16 KiB of audio at once, the rest once `release` is set
/// (or after 20 s, so a test that fails does not hang); `sent_all` when the last byte went out.
#[derive(Clone, Default)]
pub struct SpeechGate {
    pub release: Arc<AtomicBool>,
    pub sent_all: Arc<AtomicBool>,
}

/// The bytes the mock speaks: 256 KiB that no two chunks share, so a reordering shows.
pub fn speech_audio() -> Vec<u8> {
    (0..256 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

/// A form field's text in a multipart body (good enough for the bodies the tests build).
pub fn form_field(raw: &[u8], name: &str) -> Option<String> {
    let text = String::from_utf8_lossy(raw);
    let marker = format!("name=\"{name}\"\r\n\r\n");
    let start = text.find(&marker)? + marker.len();
    let end = text[start..].find("\r\n--")? + start;
    Some(text[start..end].to_owned())
}

fn sse(events: Vec<Value>) -> Response {
    let mut out = String::new();
    for e in events {
        out.push_str(&format!(
            "event: {}\ndata: {e}\n\n",
            e["type"].as_str().unwrap_or("message")
        ));
    }
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .body(Body::from(out))
        .expect("response")
}

pub fn answer(
    path: &str,
    headers: &HeaderMap,
    body: &Value,
    raw: &Bytes,
    gate: &SpeechGate,
) -> Option<Response> {
    let multipart = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("multipart/form-data"));
    let field = |name: &str| -> Option<String> {
        if multipart {
            form_field(raw, name)
        } else {
            match &body[name] {
                Value::String(s) => Some(s.clone()),
                Value::Null => None,
                v => Some(v.to_string()),
            }
        }
    };
    let op = ["/images/", "/audio/", "/moderations"]
        .iter()
        .find_map(|p| path.find(p).map(|i| &path[i..]))?;
    let model = field("model").unwrap_or_default();
    if model.starts_with("err500") {
        return Some(
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                axum::Json(json!({"error": {"message": "boom", "type": "server_error", "param": null, "code": null}})),
            )
                .into_response(),
        );
    }
    let stream = field("stream").is_some_and(|s| s == "true");
    let tokens = model.ends_with("-tokens");
    Some(match op {
        "/images/generations" | "/images/edits" | "/images/variations" => {
            let n = field("n").and_then(|n| n.parse::<usize>().ok()).unwrap_or(1);
            let usage = json!({"input_tokens": 50, "output_tokens": 4160, "total_tokens": 4210,
                "input_tokens_details": {"text_tokens": 50, "image_tokens": 0}});
            if stream {
                let kind = if op == "/images/generations" {
                    "image_generation"
                } else {
                    "image_edit"
                };
                let mut ev = Vec::new();
                for i in 0..n {
                    ev.push(json!({"type": format!("{kind}.partial_image"), "b64_json": "cGFydA==", "partial_image_index": 0, "index": i}));
                    let mut done = json!({"type": format!("{kind}.completed"), "b64_json": format!("aW1n{i}")});
                    if tokens {
                        done["usage"] = usage.clone();
                    }
                    ev.push(done);
                }
                sse(ev)
            } else {
                let data: Vec<Value> = (0..n)
                    .map(|i| json!({"b64_json": format!("aW1hZ2U{i}")}))
                    .collect();
                let mut v = json!({"created": 1_700_000_000, "data": data});
                if tokens {
                    v["usage"] = usage;
                }
                axum::Json(v).into_response()
            }
        }
        "/audio/speech" => {
            if field("stream_format").as_deref() == Some("sse") {
                sse(vec![
                    json!({"type": "speech.audio.delta", "audio": "AAEC"}),
                    json!({"type": "speech.audio.done", "usage": {"input_tokens": 14, "output_tokens": 101, "total_tokens": 115}}),
                ])
            } else if model == "tts-held" {
                let audio = Bytes::from(speech_audio());
                let gate = gate.clone();
                let s = futures_util::stream::unfold(0u8, move |step| {
                    let (audio, gate) = (audio.clone(), gate.clone());
                    async move {
                        match step {
                            0 => Some((Ok::<_, std::io::Error>(audio.slice(..16 * 1024)), 1)),
                            1 => {
                                for _ in 0..2000 {
                                    if gate.release.load(Ordering::SeqCst) {
                                        break;
                                    }
                                    tokio::time::sleep(Duration::from_millis(10)).await;
                                }
                                gate.sent_all.store(true, Ordering::SeqCst);
                                Some((Ok(audio.slice(16 * 1024..)), 2))
                            }
                            _ => None,
                        }
                    }
                });
                Response::builder()
                    .header(header::CONTENT_TYPE, "audio/mpeg")
                    .body(Body::from_stream(s))
                    .expect("response")
            } else {
                let audio = speech_audio();
                let chunks: Vec<Result<Bytes, std::io::Error>> = audio
                    .chunks(16 * 1024)
                    .map(|c| Ok(Bytes::copy_from_slice(c)))
                    .collect();
                Response::builder()
                    .header(header::CONTENT_TYPE, "audio/mpeg")
                    .body(Body::from_stream(futures_util::stream::iter(chunks)))
                    .expect("response")
            }
        }
        "/audio/transcriptions" | "/audio/translations" => {
            let usage = if tokens {
                json!({"type": "tokens", "input_tokens": 120, "output_tokens": 30, "total_tokens": 150,
                    "input_token_details": {"text_tokens": 0, "audio_tokens": 120}})
            } else {
                json!({"type": "duration", "seconds": 90})
            };
            if stream {
                return Some(sse(vec![
                    json!({"type": "transcript.text.delta", "delta": "hello"}),
                    json!({"type": "transcript.text.done", "text": "hello world", "usage": usage}),
                ]));
            }
            match field("response_format").as_deref() {
                Some("text") => ([(header::CONTENT_TYPE, "text/plain")], "hello world\n").into_response(),
                Some("srt") => (
                    [(header::CONTENT_TYPE, "text/plain")],
                    "1\n00:00:00,000 --> 00:00:05,000\nhello\n\n2\n00:00:05,000 --> 00:02:00,000\nworld\n\n",
                )
                    .into_response(),
                _ => axum::Json(json!({"text": "hello world", "usage": usage})).into_response(),
            }
        }
        "/moderations" => axum::Json(json!({
            "id": "modr-mock", "model": model,
            "results": [{"flagged": false, "categories": {"violence": false}, "category_scores": {"violence": 0.01}}]
        }))
        .into_response(),
        _ => return None,
    })
}

/// Media models on the mock provider: (client name, upstream name, type, prices).
pub fn media_models() -> Vec<(&'static str, &'static str, &'static str, Value)> {
    vec![
        (
            "dall-e",
            "img-units",
            "image",
            json!({"price_per_image": 0.04}),
        ),
        (
            "gpt-image",
            "img-tokens",
            "image",
            json!({"input_price_per_1m": 5.0, "output_price_per_1m": 40.0, "price_per_image": 0.5}),
        ),
        (
            "tts",
            "tts",
            "audio",
            json!({"price_per_1m_chars": 15.0, "input_price_per_1m": 0.6, "output_price_per_1m": 12.0}),
        ),
        (
            "whisper",
            "stt-seconds",
            "audio",
            json!({"price_per_minute": 0.006}),
        ),
        (
            "tts-held",
            "tts-held",
            "audio",
            json!({"price_per_1m_chars": 15.0}),
        ),
        (
            "transcribe",
            "stt-tokens",
            "audio",
            json!({"input_price_per_1m": 2.5, "output_price_per_1m": 10.0, "price_per_minute": 1.0}),
        ),
        (
            "audio-500",
            "err500",
            "audio",
            json!({"price_per_minute": 1.0}),
        ),
        (
            "omni-mod",
            "moderation",
            "moderation",
            json!({"input_price_per_1m": 1.0}),
        ),
    ]
}

/// The gateway of `gateway::setup` with [`media_models`] added.
pub async fn setup_media(app: &TestApp) -> Gateway {
    let gw = setup(app).await;
    for (name, upstream, kind, prices) in media_models() {
        let mut body =
            json!({"name": name, "provider": "mock", "upstream_model": upstream, "type": kind});
        for (k, v) in prices.as_object().expect("prices") {
            body[k] = v.clone();
        }
        let (s, b) = app.post("/api/admin/models", Some(&gw.admin), body).await;
        assert_eq!(s, 201, "create model {name}: {b}");
    }
    gw
}
