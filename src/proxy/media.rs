//! ④–⑥ for OpenAI's media routes (spec §8): images (generations, edits, variations), audio
//! (speech, transcriptions, translations) and moderations, passed through to an OpenAI-compatible
//! upstream (`openai`) or Azure OpenAI (`azure`) with only the model replaced.
//!
//! Metering, in the order spec §8 gives: the upstream's token `usage` when it reports one; else
//! images × `price_per_image`, seconds of audio (the upstream's `usage.seconds` or `duration`, or
//! the last cue of an `srt`/`vtt` answer) × `price_per_minute`, or characters of speech input ×
//! `price_per_1m_chars`. Moderations report nothing and are estimated in tokens like embeddings.
//! Spoken audio is relayed as it arrives ([`MeteredBytes`]); image and transcription streams
//! (`stream: true`) pass through as server-sent events, their usage read from the final event.

use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderValue, header};
use secrecy::ExposeSecret;
use serde_json::Value;

use crate::error::ApiError;
use crate::metering::event::{KeptPayloads, Units};
use crate::providers::{Endpoint, Usage};
use crate::proxy::Call;
use crate::proxy::meter::Meter;
use crate::proxy::multipart::Upload;
use crate::proxy::passthrough::passed_headers;
use crate::proxy::route::Route;
use crate::proxy::stream::{MeteredBytes, MeteredStream, StreamLimits, StreamMapping, UsageReader};
use crate::proxy::upstream::{self, Outbound, RequestBody};
use crate::state::AppState;

/// Where the request goes and with which headers: the provider's own URL for the operation.
fn destination(route: &Route, call: &Call<'_>) -> Result<(String, http::HeaderMap), ApiError> {
    let mut headers = upstream::client_headers(call.headers, true);
    let key = route.provider_key.expose_secret();
    if route.kind == "azure" {
        let t = route.target();
        let url = crate::providers::azure::operation_url(&t, call.endpoint.path())?;
        crate::providers::azure::set_api_key(&mut headers, key)?;
        return Ok((url, headers));
    }
    match route.adapter {
        Some(a) => {
            a.auth(&mut headers, key);
            Ok((
                upstream::with_query(&route.url, call.query).into_owned(),
                headers,
            ))
        }
        None => Err(ApiError::internal(anyhow::anyhow!(
            "media route on a `{}` provider",
            route.kind
        ))),
    }
}

/// Characters of a speech request's `input`.
fn speech_chars(call: &Call<'_>) -> u64 {
    call.view
        .get("input")
        .and_then(|raw| serde_json::from_str::<String>(raw.get()).ok())
        .map_or(0, |s| s.chars().count() as u64)
}

pub async fn forward(
    state: &AppState,
    route: &Route,
    call: &Call<'_>,
    mut meter: Meter,
    upload: Option<Upload>,
) -> Response {
    let endpoint = call.endpoint;
    let (url, mut headers) = match destination(route, call) {
        Ok(d) => d,
        Err(e) => {
            meter.finish(
                e.parts().0.as_u16(),
                None,
                KeptPayloads::default(),
                Some("untranslatable"),
            );
            return e.into_response();
        }
    };
    let (body, over) = match upload {
        Some(u) => {
            headers.insert(header::CONTENT_TYPE, u.content_type.clone());
            let (b, over) = u.into_body(&route.upstream_model);
            (RequestBody::Streamed(b), Some(over))
        }
        None => (
            RequestBody::from(Bytes::from(call.view.with_model(&route.upstream_model))),
            None,
        ),
    };
    if endpoint == Endpoint::AudioSpeech && !headers.contains_key(header::ACCEPT) {
        headers.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
    }
    let cfg = &state.config.upstream;
    let sent = upstream::send_to(
        &state.http,
        Outbound {
            url: &url,
            guarded: route.guarded,
            headers,
            body,
            stream: call.view.stream,
            request_id: call.request_id,
        },
        Duration::from_secs(cfg.first_byte_timeout_secs),
    )
    .await;
    let resp = match sent {
        Ok(r) => r,
        // The client's upload ran over the limit on its way up: that, not the upstream.
        Err(_) if over.is_some_and(|o| o.load(Ordering::SeqCst)) => {
            return super::finish_with(meter, ApiError::PayloadTooLarge).into_response();
        }
        Err(e) => return super::no_answer(state, meter, e).into_response(),
    };
    let status = resp.status();
    let passed = passed_headers(resp.headers());
    let content_type = resp.headers().get(header::CONTENT_TYPE).cloned();
    let is_sse = content_type
        .as_ref()
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let idle = Duration::from_secs(cfg.idle_timeout_secs);
    let speech_units = Units {
        chars: if endpoint == Endpoint::AudioSpeech {
            speech_chars(call)
        } else {
            0
        },
        ..Default::default()
    };

    if status.is_success() && is_sse {
        let body = MeteredStream::new(
            resp.into_body(),
            StreamMapping {
                adapter: None,
                reader: Some(Box::new(EventUsage {
                    fallback: speech_units,
                    ..EventUsage::default()
                })),
                client_model: call.view.model.clone(),
                upstream_model: route.upstream_model.clone(),
                client_wants_usage: true,
            },
            meter,
            StreamLimits {
                idle_timeout: idle,
                max_event_bytes: cfg.max_sse_event_bytes.max(MAX_IMAGE_EVENT_BYTES),
            },
            state.metrics.active_streams.clone(),
        );
        let mut out = Response::new(Body::new(body));
        let h = out.headers_mut();
        h.extend(passed);
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream; charset=utf-8"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        h.insert("x-accel-buffering", HeaderValue::from_static("no"));
        return out;
    }

    if status.is_success() && endpoint == Endpoint::AudioSpeech {
        // The audio is what the upstream made of the input: metered once it starts to come.
        meter.meter_units(speech_units);
        let body = MeteredBytes::new(
            resp.into_body(),
            meter,
            idle,
            state.metrics.active_streams.clone(),
        );
        let mut out = Response::new(Body::new(body));
        let h = out.headers_mut();
        h.extend(passed);
        if let Some(ct) = content_type {
            h.insert(header::CONTENT_TYPE, ct);
        }
        return out;
    }

    let body = match super::collect(resp.into_body(), idle, &mut meter).await {
        Ok(b) => b,
        Err(e) => {
            state
                .metrics
                .upstream_errors_total
                .with_label_values(&["body"])
                .inc();
            meter.finish(
                e.parts().0.as_u16(),
                None,
                KeptPayloads::default(),
                Some("upstream_body"),
            );
            return e.into_response();
        }
    };
    let body = if status.is_success() {
        let (body, usage, units) = complete(endpoint, body, call, route);
        if let Some(u) = units {
            meter.meter_units(u);
        }
        let kept = if usage.is_none() && units.is_none() {
            KeptPayloads::one(body.clone())
        } else {
            KeptPayloads::default()
        };
        meter.finish(status.as_u16(), usage, kept, None);
        body
    } else {
        let kind = if status.is_client_error() {
            "status_4xx"
        } else {
            "status_5xx"
        };
        state
            .metrics
            .upstream_errors_total
            .with_label_values(&[kind])
            .inc();
        meter.finish(
            status.as_u16(),
            None,
            KeptPayloads::default(),
            Some("upstream_status"),
        );
        body
    };
    let mut out = Response::new(Body::from(body));
    *out.status_mut() = status;
    let h = out.headers_mut();
    h.extend(passed);
    h.insert(
        header::CONTENT_TYPE,
        content_type.unwrap_or_else(|| HeaderValue::from_static("application/json")),
    );
    out
}

/// An image stream's events carry whole images (base64): larger than a chat event.
const MAX_IMAGE_EVENT_BYTES: usize = 64 * 1024 * 1024;

/// A complete success body: the body the client gets, the token usage it reports, and else the
/// units to meter.
fn complete(
    endpoint: Endpoint,
    body: Bytes,
    call: &Call<'_>,
    route: &Route,
) -> (Bytes, Option<Usage>, Option<Units>) {
    if endpoint == Endpoint::Moderations {
        // OpenAI's shape with `model`: reported back as the client's name; usage rarely given.
        let (body, usage) = crate::providers::Adapter::map_response(
            &crate::providers::openai::OpenAi,
            body,
            &call.view.model,
            &route.upstream_model,
        );
        return (body, usage, None);
    }
    let parsed = serde_json::from_slice::<Value>(&body).ok();
    let usage = parsed.as_ref().and_then(|v| token_usage(&v["usage"]));
    if usage.is_some() {
        return (body, usage, None);
    }
    let units = match endpoint {
        Endpoint::ImageGenerations | Endpoint::ImageEdits | Endpoint::ImageVariations => Units {
            images: parsed
                .as_ref()
                .and_then(|v| v["data"].as_array())
                .map_or(0, |d| d.len() as u64),
            ..Default::default()
        },
        Endpoint::AudioTranscriptions | Endpoint::AudioTranslations => Units {
            audio_seconds: match &parsed {
                Some(v) => seconds_of(v).unwrap_or(0.0),
                // `text`, `srt`, `vtt`: the last cue's end, when there are cues.
                None => last_cue_end(&body).unwrap_or(0.0),
            },
            ..Default::default()
        },
        _ => Units::default(),
    };
    (body, None, Some(units))
}

/// Token usage in the media routes' shapes: `input_tokens`/`output_tokens` (images, audio),
/// `prompt_tokens`/`completion_tokens` (some compatible servers). `type: "duration"` and
/// anything without a count is not token usage.
fn token_usage(u: &Value) -> Option<Usage> {
    if !u.is_object() || u["type"] == "duration" {
        return None;
    }
    let count = |names: [&str; 2]| {
        names
            .iter()
            .find_map(|n| u.get(*n).and_then(Value::as_i64))
            .map(|n| n.max(0))
    };
    let prompt = count(["input_tokens", "prompt_tokens"]);
    let completion = count(["output_tokens", "completion_tokens"]);
    if prompt.is_none() && completion.is_none() {
        return None;
    }
    let prompt = prompt.unwrap_or(0);
    let cached = ["input_tokens_details", "input_token_details"]
        .iter()
        .find_map(|d| u[*d]["cached_tokens"].as_i64())
        .unwrap_or(0)
        .clamp(0, prompt);
    Some(Usage {
        prompt,
        completion: completion.unwrap_or(0),
        cached,
        ..Default::default()
    })
}

/// Seconds of audio a transcription reports: `usage.seconds` (`type: "duration"`), else
/// `duration` (`verbose_json`).
fn seconds_of(v: &Value) -> Option<f64> {
    v["usage"]["seconds"]
        .as_f64()
        .or_else(|| v["duration"].as_f64())
        .filter(|s| s.is_finite() && *s >= 0.0)
}

/// The end of the last cue of an SRT (`00:01:02,500`) or WebVTT (`01:02.500`) answer, seconds.
fn last_cue_end(body: &[u8]) -> Option<f64> {
    let text = std::str::from_utf8(body).ok()?;
    let line = text.lines().rev().find(|l| l.contains("-->"))?;
    let end = line.split("-->").nth(1)?.split_whitespace().next()?;
    let mut secs = 0.0;
    for part in end.replace(',', ".").split(':') {
        secs = secs * 60.0 + part.parse::<f64>().ok()?;
    }
    (secs.is_finite() && secs >= 0.0).then_some(secs)
}

/// Reads the usage of a media stream: image streams end with `image_generation.completed` /
/// `image_edit.completed` (usage, one per image), transcriptions with `transcript.text.done`,
/// speech with `speech.audio.done`.
#[derive(Default)]
struct EventUsage {
    usage: Option<Usage>,
    images: u64,
    seconds: Option<f64>,
    /// Units known before the stream (speech input characters).
    fallback: Units,
}

impl UsageReader for EventUsage {
    fn on_event(&mut self, data: &[u8]) {
        let Ok(v) = serde_json::from_slice::<Value>(data) else {
            return;
        };
        let kind = v["type"].as_str().unwrap_or_default();
        if kind.ends_with(".completed") && kind.starts_with("image_") {
            self.images += 1;
        }
        if let Some(u) = token_usage(&v["usage"]) {
            let total = self.usage.get_or_insert_with(Usage::default);
            total.prompt = total.prompt.saturating_add(u.prompt);
            total.completion = total.completion.saturating_add(u.completion);
            total.cached = total.cached.saturating_add(u.cached);
        } else if let Some(s) = seconds_of(&v) {
            self.seconds = Some(s);
        }
    }

    fn usage(&self) -> Option<Usage> {
        self.usage
    }

    fn units(&self) -> Option<Units> {
        Some(Units {
            images: self.images,
            audio_seconds: self.seconds.unwrap_or(0.0),
            ..self.fallback
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn token_usage_reads_the_media_shapes_and_not_durations() {
        let u = token_usage(
            &json!({"input_tokens": 50, "output_tokens": 4160, "total_tokens": 4210,
            "input_tokens_details": {"text_tokens": 40, "image_tokens": 10, "cached_tokens": 8}}),
        )
        .expect("tokens");
        assert_eq!((u.prompt, u.completion, u.cached), (50, 4160, 8));
        assert_eq!(
            token_usage(&json!({"type": "duration", "seconds": 9})),
            None
        );
        assert_eq!(token_usage(&json!({"total_tokens": 3})), None);
        assert_eq!(token_usage(&json!([1])), None);
        let neg = token_usage(&json!({"input_tokens": -5, "output_tokens": 3, "input_tokens_details": {"cached_tokens": 99}}))
            .expect("tokens");
        assert_eq!((neg.prompt, neg.completion, neg.cached), (0, 3, 0));
    }

    #[test]
    fn seconds_come_from_usage_duration_or_the_last_cue() {
        assert_eq!(
            seconds_of(&json!({"usage": {"type": "duration", "seconds": 9}})),
            Some(9.0)
        );
        assert_eq!(
            seconds_of(&json!({"text": "x", "duration": 12.5})),
            Some(12.5)
        );
        assert_eq!(seconds_of(&json!({"duration": -1})), None);
        let srt =
            b"1\n00:00:00,000 --> 00:00:04,000\nHello\n\n2\n00:00:04,000 --> 00:01:02,500\nWorld\n";
        assert_eq!(last_cue_end(srt), Some(62.5));
        let vtt = b"WEBVTT\n\n00:00.000 --> 00:07.250\nHi\n";
        assert_eq!(last_cue_end(vtt), Some(7.25));
        assert_eq!(last_cue_end(b"just text"), None);
        assert_eq!(last_cue_end(b"a --> b"), None);
    }
}
