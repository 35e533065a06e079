//! Any OpenAI-compatible upstream: the identity mapping, apart from the model name and usage.

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, header};
use serde::Deserialize;
use serde::de::IgnoredAny;

use super::{Adapter, Endpoint, EventCtx, EventOut, MappedEvent, Usage};
use crate::proxy::request::RequestView;

pub struct OpenAi;

#[derive(Deserialize)]
struct WireUsage {
    #[serde(default)]
    prompt_tokens: i64,
    #[serde(default)]
    completion_tokens: i64,
    #[serde(default)]
    prompt_tokens_details: Option<PromptDetails>,
}

#[derive(Deserialize)]
struct PromptDetails {
    #[serde(default)]
    cached_tokens: Option<i64>,
}

impl From<WireUsage> for Usage {
    fn from(u: WireUsage) -> Self {
        Usage {
            prompt: u.prompt_tokens.max(0),
            completion: u.completion_tokens.max(0),
            cached: u
                .prompt_tokens_details
                .and_then(|d| d.cached_tokens)
                .unwrap_or(0)
                .clamp(0, u.prompt_tokens.max(0)),
        }
    }
}

#[derive(Deserialize)]
struct WithUsage {
    #[serde(default)]
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
struct ChunkChoice {
    #[serde(default)]
    delta: Option<Delta>,
    #[serde(default)]
    text: Option<IgnoredAny>,
}

#[derive(Deserialize)]
struct Delta {
    #[serde(default)]
    content: Option<IgnoredAny>,
    #[serde(default)]
    tool_calls: Option<IgnoredAny>,
    #[serde(default)]
    refusal: Option<IgnoredAny>,
}

/// Replaces the top-level `"model"` value and/or removes the top-level `"usage"` of a JSON object,
/// copying every other field verbatim. `None` when the input is not a JSON object.
fn edit_top_level(body: &[u8], model: Option<&str>, drop_usage: bool) -> Option<Vec<u8>> {
    let fields = crate::proxy::request::top_level_fields(body)?;
    Some(write_fields(&fields, body.len(), model, drop_usage))
}

/// Writes an object's top-level fields back out, with `model` replaced and/or `usage` dropped.
fn write_fields(
    fields: &[(std::borrow::Cow<'_, str>, &serde_json::value::RawValue)],
    size_hint: usize,
    model: Option<&str>,
    drop_usage: bool,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(size_hint + 16);
    out.push(b'{');
    let mut first = true;
    for (k, v) in fields {
        if drop_usage && k == "usage" {
            continue;
        }
        if !first {
            out.push(b',');
        }
        first = false;
        let _ = serde_json::to_writer(&mut out, k.as_ref());
        out.push(b':');
        match (k.as_ref(), model) {
            ("model", Some(m)) => {
                let _ = serde_json::to_writer(&mut out, m);
            }
            _ => out.extend_from_slice(v.get().as_bytes()),
        }
    }
    out.push(b'}');
    out
}

impl Adapter for OpenAi {
    fn url(&self, base_url: &str, endpoint: Endpoint) -> String {
        format!("{}{}", base_url.trim_end_matches('/'), endpoint.path())
    }

    fn auth(&self, headers: &mut HeaderMap, provider_key: &str) {
        if let Ok(v) = HeaderValue::from_str(&format!("Bearer {provider_key}")) {
            let mut v = v;
            v.set_sensitive(true);
            headers.insert(header::AUTHORIZATION, v);
        }
    }

    fn map_request(&self, req: &RequestView<'_>, upstream_model: &str) -> Bytes {
        Bytes::from(req.rewrite(upstream_model))
    }

    fn map_response(&self, body: Bytes, client_model: &str, upstream_model: &str) -> Bytes {
        if client_model == upstream_model || memchr::memmem::find(&body, b"\"model\"").is_none() {
            return body;
        }
        match edit_top_level(&body, Some(client_model), false) {
            Some(v) => Bytes::from(v),
            None => body,
        }
    }

    fn usage_of(&self, body: &[u8]) -> Option<Usage> {
        serde_json::from_slice::<WithUsage>(body)
            .ok()?
            .usage
            .map(Usage::from)
    }

    fn map_event(&self, data: &[u8], ctx: &EventCtx<'_>) -> MappedEvent {
        if data == b"[DONE]" {
            return MappedEvent::default();
        }
        // One pass over the chunk: its top-level fields, raw; then only `choices` and `usage`
        // are read, and a rewrite copies the other fields from that same pass.
        let Some(fields) = crate::proxy::request::top_level_fields(data) else {
            // Not ours to judge: pass through what the upstream sent.
            return MappedEvent::default();
        };
        let mut choices: Vec<ChunkChoice> = Vec::new();
        let mut usage = None;
        for (k, v) in &fields {
            match k.as_ref() {
                "choices" => {
                    choices = serde_json::from_str::<Option<Vec<ChunkChoice>>>(v.get())
                        .ok()
                        .flatten()
                        .unwrap_or_default();
                }
                "usage" => {
                    usage = serde_json::from_str::<Option<WireUsage>>(v.get())
                        .ok()
                        .flatten()
                        .map(Usage::from);
                }
                _ => {}
            }
        }
        let has_output = choices.iter().any(|c| {
            c.text.is_some()
                || c.delta.as_ref().is_some_and(|d| {
                    d.content.is_some() || d.tool_calls.is_some() || d.refusal.is_some()
                })
        });
        let strip_usage = usage.is_some() && !ctx.client_wants_usage;
        if strip_usage && choices.is_empty() {
            return MappedEvent {
                usage,
                has_output,
                out: EventOut::Drop,
            };
        }
        let rename = ctx.client_model != ctx.upstream_model;
        let out = if rename || strip_usage {
            EventOut::Replace(write_fields(
                &fields,
                data.len(),
                rename.then_some(ctx.client_model),
                strip_usage,
            ))
        } else {
            EventOut::Unchanged
        };
        MappedEvent {
            usage,
            has_output,
            out,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(wants: bool, rename: bool) -> EventCtx<'static> {
        EventCtx {
            client_model: "mine",
            upstream_model: if rename { "theirs" } else { "mine" },
            client_wants_usage: wants,
        }
    }

    #[test]
    fn usage_only_chunk_is_dropped_unless_asked() {
        let data = br#"{"id":"c","model":"theirs","choices":[],"usage":{"prompt_tokens":9,"completion_tokens":3,"prompt_tokens_details":{"cached_tokens":4}}}"#;
        let m = OpenAi.map_event(data, &ctx(false, false));
        assert_eq!(
            m.usage,
            Some(Usage {
                prompt: 9,
                completion: 3,
                cached: 4
            })
        );
        assert_eq!(m.out, EventOut::Drop);
        let m = OpenAi.map_event(data, &ctx(true, false));
        assert_eq!(m.out, EventOut::Unchanged);
    }

    #[test]
    fn usage_in_a_content_chunk_is_stripped_and_model_renamed() {
        let data = br#"{"id":"c","model":"theirs","choices":[{"index":0,"delta":{"content":"hi"}}],"usage":{"prompt_tokens":1,"completion_tokens":1}}"#;
        let m = OpenAi.map_event(data, &ctx(false, true));
        assert!(m.has_output);
        assert_eq!(m.usage.map(|u| u.prompt), Some(1));
        let EventOut::Replace(v) = m.out else {
            panic!("expected a rewrite")
        };
        let v: serde_json::Value = serde_json::from_slice(&v).expect("json");
        assert_eq!(v["model"], "mine");
        assert!(v.get("usage").is_none());
        assert_eq!(v["choices"][0]["delta"]["content"], "hi");
    }

    #[test]
    fn plain_chunk_passes_unchanged() {
        let data = br#"{"model":"mine","choices":[{"delta":{"content":"x"}}],"usage":null}"#;
        let m = OpenAi.map_event(data, &ctx(false, false));
        assert_eq!(m.out, EventOut::Unchanged);
        assert!(m.usage.is_none() && m.has_output);
        assert_eq!(
            OpenAi.map_event(b"[DONE]", &ctx(false, false)).out,
            EventOut::Unchanged
        );
    }

    #[test]
    fn response_model_is_renamed_and_usage_read() {
        let body = Bytes::from_static(br#"{"id":"x","model":"theirs","usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7}}"#);
        assert_eq!(
            OpenAi.usage_of(&body),
            Some(Usage {
                prompt: 5,
                completion: 2,
                cached: 0
            })
        );
        let out = OpenAi.map_response(body, "mine", "theirs");
        let v: serde_json::Value = serde_json::from_slice(&out).expect("json");
        assert_eq!(v["model"], "mine");
        assert_eq!(v["usage"]["total_tokens"], 7);
    }
}
