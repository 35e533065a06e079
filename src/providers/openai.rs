//! Any OpenAI-compatible upstream: the identity mapping, apart from the model name and usage.

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, header};
use serde::Deserialize;

use super::{
    Adapter, ChunkDecoder, Endpoint, EventCtx, EventOut, MappedEvent, Operation, StreamFault,
    Target, Translator, Usage, model_json, scan,
};
use crate::error::ApiError;
use crate::pivot::{
    ChatChunk, ChatRequest, ChatResponse, Content, UpstreamError, WireUsage as WireUsageOut,
};
use crate::proxy::request::RequestView;
use crate::proxy::stream::{EventTooLarge, SseScanner};

pub struct OpenAi;

#[derive(Deserialize)]
struct WireUsage {
    #[serde(default)]
    prompt_tokens: i64,
    #[serde(default)]
    completion_tokens: i64,
    #[serde(default)]
    prompt_tokens_details: Option<PromptDetails>,
    #[serde(default)]
    completion_tokens_details: Option<CompletionDetails>,
}

#[derive(Deserialize)]
struct CompletionDetails {
    #[serde(default)]
    reasoning_tokens: Option<i64>,
}

#[derive(Deserialize)]
struct PromptDetails {
    #[serde(default)]
    cached_tokens: Option<i64>,
}

/// The top-level `usage` of an OpenAI answer, whatever the rest of it is.
pub fn usage_of_answer(body: &[u8]) -> Option<Usage> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let u = v.get("usage").filter(|u| u.is_object())?;
    serde_json::from_value::<WireUsage>(u.clone())
        .ok()
        .map(Usage::from)
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
            cache_write: 0,
            reasoning: u
                .completion_tokens_details
                .and_then(|d| d.reasoning_tokens)
                .unwrap_or(0)
                .clamp(0, u.completion_tokens.max(0)),
        }
    }
}

/// A JSON value that is `[]` or `null` (whitespace aside).
fn is_empty_or_null(value: &[u8]) -> bool {
    let mut it = value.iter().filter(|c| !c.is_ascii_whitespace());
    match it.next() {
        Some(b'[') => it.next() == Some(&b']') && it.next().is_none(),
        Some(b'n') => value.trim_ascii() == b"null",
        _ => false,
    }
}

/// A usage object (`null`, not an object, or unreadable: none, so the gateway counts itself).
fn usage_in(value: &[u8]) -> Option<Usage> {
    // serde reads a struct from an array too: `"usage": []` must not count as zero tokens.
    if value.trim_ascii_start().first() != Some(&b'{') {
        return None;
    }
    serde_json::from_slice::<Option<WireUsage>>(value)
        .ok()
        .flatten()
        .map(Usage::from)
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

    fn map_response(
        &self,
        body: Bytes,
        client_model: &str,
        upstream_model: &str,
    ) -> (Bytes, Option<Usage>) {
        let Some(members) = scan::top_level_members(&body) else {
            return (body, None);
        };
        let usage = members
            .iter()
            .find(|m| m.is("usage"))
            .and_then(|m| usage_in(m.value));
        let rename = client_model != upstream_model && members.iter().any(|m| m.is("model"));
        if !rename {
            return (body, usage);
        }
        let model = model_json(client_model);
        let out = scan::edit_members(&body, &members, |m| {
            m.is("model").then_some(Some(model.as_slice()))
        });
        (Bytes::from(out), usage)
    }

    fn map_event(&self, data: &[u8], ctx: &EventCtx<'_>) -> MappedEvent {
        if data == b"[DONE]" {
            return MappedEvent::default();
        }
        // One pass over the chunk: its top-level fields, raw; then `usage` is read, `choices` only
        // checked for being empty, and a rewrite copies the other fields from that same pass.
        let Some(members) = scan::top_level_members(data) else {
            return MappedEvent::default();
        };
        let mut usage = None;
        let mut no_choices = true;
        for m in &members {
            if m.is("choices") {
                no_choices = is_empty_or_null(m.value);
            } else if m.is("usage") {
                usage = usage_in(m.value);
            }
        }
        let strip_usage = usage.is_some() && !ctx.client_wants_usage;
        if strip_usage && no_choices {
            return MappedEvent {
                usage,
                out: EventOut::Drop,
            };
        }
        let rename = ctx.client_model != ctx.upstream_model;
        let out = if rename || strip_usage {
            EventOut::Replace(scan::edit_members(data, &members, |m| {
                if strip_usage && m.is("usage") {
                    Some(None)
                } else if m.is("model") {
                    rename.then_some(Some(ctx.client_model_json))
                } else {
                    None
                }
            }))
        } else {
            EventOut::Unchanged
        };
        MappedEvent { usage, out }
    }
}

// ---- through the pivot: another client protocol (Anthropic, Responses) to an OpenAI upstream ----

/// Removes the pivot's extensions an OpenAI-compatible API does not take (strict servers answer
/// 400 to unknown fields).
fn strip_extensions(req: &mut ChatRequest) {
    req.thinking = None;
    req.store = None;
    req.metadata = None;
    for m in &mut req.messages {
        m.reasoning_blocks.clear();
        m.reasoning_content = None;
        // An Anthropic tool result's error flag (protocols/anthropic.rs); not an OpenAI field.
        m.extra.remove("is_error");
        if let Some(Content::Parts(parts)) = &mut m.content {
            for p in parts {
                p.cache_control = None;
            }
        }
    }
    for t in &mut req.tools {
        t.cache_control = None;
    }
}

/// OpenAI's error body: `{"error": {"message", "type", "code"}}`.
pub fn decode_openai_error(status: u16, body: &[u8]) -> UpstreamError {
    #[derive(Deserialize)]
    struct Body {
        error: Obj,
    }
    #[derive(Deserialize)]
    struct Obj {
        #[serde(default)]
        message: Option<String>,
        #[serde(default, rename = "type")]
        kind: Option<String>,
        #[serde(default)]
        code: Option<serde_json::Value>,
    }
    let parsed = serde_json::from_slice::<Body>(body).ok();
    let status = if status == 529 { 503 } else { status };
    let (message, kind, code) = match parsed {
        Some(b) => (
            b.error.message,
            b.error.kind,
            b.error.code.and_then(|c| match c {
                serde_json::Value::String(s) => Some(s),
                serde_json::Value::Number(n) => Some(n.to_string()),
                _ => None,
            }),
        ),
        None => (None, None, None),
    };
    UpstreamError {
        status,
        kind: kind.unwrap_or_else(|| UpstreamError::kind_for_status(status).to_owned()),
        message: message.unwrap_or_else(|| format!("The upstream answered {status}.")),
        code,
    }
}

impl Translator for OpenAi {
    fn url(&self, t: &Target<'_>, op: Operation, _stream: bool) -> Result<String, ApiError> {
        let path = match op {
            Operation::Chat => "/chat/completions",
            Operation::Embeddings => "/embeddings",
            Operation::CountTokens => {
                return Err(ApiError::internal(anyhow::anyhow!(
                    "an OpenAI upstream cannot count tokens"
                )));
            }
        };
        Ok(format!("{}{path}", t.base_url.trim_end_matches('/')))
    }

    fn headers(
        &self,
        headers: &mut HeaderMap,
        provider_key: &str,
        _t: &Target<'_>,
        _url: &str,
        _body: &[u8],
    ) -> Result<(), ApiError> {
        Adapter::auth(self, headers, provider_key);
        Ok(())
    }

    fn encode_chat(&self, req: &ChatRequest, t: &Target<'_>) -> Result<Vec<u8>, ApiError> {
        let mut req = req.clone();
        req.model = t.upstream_model.to_owned();
        strip_extensions(&mut req);
        if req.stream {
            req.stream_options = Some(serde_json::json!({"include_usage": true}));
        } else {
            req.stream_options = None;
        }
        serde_json::to_vec(&req).map_err(ApiError::internal)
    }

    fn decode_chat(&self, body: &[u8], _t: &Target<'_>) -> Result<ChatResponse, ApiError> {
        let mut resp: ChatResponse =
            serde_json::from_slice(body).map_err(|e| ApiError::Upstream {
                status: http::StatusCode::BAD_GATEWAY,
                message: format!("The upstream's answer is not a chat completion: {e}"),
                code: "upstream_error",
            })?;
        resp.usage = resp.usage.map(bounded_wire);
        Ok(resp)
    }

    fn usage_of_answer(&self, body: &[u8]) -> Option<Usage> {
        usage_of_answer(body)
    }

    fn chat_stream(&self, _t: &Target<'_>, max_event_bytes: usize) -> Box<dyn ChunkDecoder> {
        Box::new(ChunkStream {
            scanner: SseScanner::new(max_event_bytes),
            usage: None,
            done: false,
        })
    }

    fn decode_error(&self, status: u16, body: &[u8]) -> UpstreamError {
        decode_openai_error(status, body)
    }

    fn encode_embeddings(
        &self,
        req: &serde_json::Value,
        t: &Target<'_>,
    ) -> Option<Result<Vec<u8>, ApiError>> {
        let mut req = req.clone();
        if let Some(o) = req.as_object_mut() {
            o.insert("model".into(), t.upstream_model.into());
        }
        Some(serde_json::to_vec(&req).map_err(ApiError::internal))
    }

    fn decode_embeddings(
        &self,
        body: &[u8],
        _t: &Target<'_>,
    ) -> Result<(serde_json::Value, Option<Usage>), ApiError> {
        let v: serde_json::Value =
            serde_json::from_slice(body).map_err(|e| ApiError::Upstream {
                status: http::StatusCode::BAD_GATEWAY,
                message: format!("The upstream's answer is not JSON: {e}"),
                code: "upstream_error",
            })?;
        let usage = v
            .get("usage")
            .and_then(|u| serde_json::to_vec(u).ok())
            .and_then(|u| usage_in(&u));
        Ok((v, usage))
    }
}

/// Negative counts are no counts (the meter bounds the rest).
fn bounded_wire(mut w: WireUsageOut) -> WireUsageOut {
    w.prompt_tokens = w.prompt_tokens.max(0);
    w.completion_tokens = w.completion_tokens.max(0);
    w.total_tokens = w.prompt_tokens.saturating_add(w.completion_tokens);
    w
}

/// An OpenAI chat stream, decoded into pivot chunks.
struct ChunkStream {
    scanner: SseScanner,
    usage: Option<Usage>,
    done: bool,
}

impl ChunkStream {
    fn event(&mut self, data: &[u8], out: &mut Vec<ChatChunk>) -> Result<(), StreamFault> {
        if data == b"[DONE]" {
            self.done = true;
            return Ok(());
        }
        let parsed = serde_json::from_slice::<ChatChunk>(data);
        // An error event (`{"error": …}` and no `choices`) parses as an empty chunk, or not at
        // all: only then is the event looked at as plain JSON (a content chunk is parsed once).
        let maybe_error = parsed.as_ref().map_or(true, |c| c.choices.is_empty())
            && memchr::memmem::find(data, b"\"error\"").is_some();
        if maybe_error
            && let Ok(v) = serde_json::from_slice::<serde_json::Value>(data)
            && v.get("error").is_some()
            && v.get("choices").is_none()
        {
            return Err(StreamFault::Upstream(decode_openai_error(502, data)));
        }
        let mut chunk: ChatChunk = parsed.map_err(|e| {
            StreamFault::Malformed(format!("a chunk that is not a chat chunk: {e}"))
        })?;
        if let Some(u) = chunk.usage.take() {
            let u = bounded_wire(u);
            self.usage = Some(Usage::from(u));
            chunk.usage = Some(u);
        }
        out.push(chunk);
        Ok(())
    }
}

impl ChunkDecoder for ChunkStream {
    fn push(&mut self, bytes: &[u8], out: &mut Vec<ChatChunk>) -> Result<(), StreamFault> {
        self.scanner.push(bytes);
        loop {
            match self.scanner.next_event() {
                Ok(Some(ev)) => {
                    if let Some(data) = ev.data {
                        self.event(&data, out)?;
                    }
                }
                Ok(None) => return Ok(()),
                Err(EventTooLarge) => return Err(StreamFault::TooLarge),
            }
        }
    }

    fn finish(&mut self, out: &mut Vec<ChatChunk>) -> Result<(), StreamFault> {
        if let Some(ev) = self.scanner.finish()
            && let Some(data) = ev.data
        {
            self.event(&data, out)?;
        }
        if self.done || self.usage.is_some() {
            Ok(())
        } else {
            Err(StreamFault::Malformed(
                "the upstream ended the stream before [DONE]".into(),
            ))
        }
    }

    fn usage(&self) -> Option<Usage> {
        self.usage
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(wants: bool, rename: bool) -> EventCtx<'static> {
        EventCtx {
            client_model: "mine",
            client_model_json: b"\"mine\"",
            upstream_model: if rename { "theirs" } else { "mine" },
            client_wants_usage: wants,
        }
    }

    /// The translated stream's decoder: content chunks become pivot chunks; an `error` event
    /// (no `choices`) ends the stream with the upstream's error, however it is typed.
    #[test]
    fn translated_stream_chunks_and_error_events() {
        let t = Target {
            base_url: "http://127.0.0.1:1/v1",
            upstream_model: "theirs",
            api_version: None,
            region: None,
            default_max_tokens: 16,
        };
        let run = |events: &[&str]| {
            let mut d = OpenAi.chat_stream(&t, 1 << 16);
            let mut out = Vec::new();
            let body: String = events.iter().map(|e| format!("data: {e}\n\n")).collect();
            (d.push(body.as_bytes(), &mut out), out)
        };
        let content =
            r#"{"id":"c","model":"theirs","choices":[{"index":0,"delta":{"content":"Hi"}}]}"#;
        let (res, out) = run(&[content, "[DONE]"]);
        assert!(res.is_ok());
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].choices[0].delta.content.as_deref(), Some("Hi"));
        for error in [
            r#"{"error":{"message":"overloaded","type":"server_error"}}"#,
            // Not a chat chunk at all (`id` a number), yet an error event.
            r#"{"id":5,"error":{"message":"overloaded","type":"server_error"}}"#,
        ] {
            let (res, out) = run(&[content, error]);
            let Err(StreamFault::Upstream(e)) = res else {
                panic!("{error}: {res:?}");
            };
            assert_eq!(e.message, "overloaded");
            assert_eq!(out.len(), 1, "what came before is kept");
        }
        // `choices` present: a chunk, whatever else it carries.
        let both =
            r#"{"id":"c","error":{"message":"x"},"choices":[{"index":0,"delta":{"content":"!"}}]}"#;
        let (res, out) = run(&[both]);
        assert!(res.is_ok(), "{res:?}");
        assert_eq!(out.len(), 1);
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
                cached: 4,
                ..Default::default()
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
    fn usage_that_is_not_an_object_is_no_usage() {
        for usage in ["[]", "[1,2,3]", "0", "\"x\""] {
            let data = format!(r#"{{"model":"mine","choices":[],"usage":{usage}}}"#);
            let m = OpenAi.map_event(data.as_bytes(), &ctx(false, false));
            assert!(m.usage.is_none(), "{usage}");
        }
    }

    #[test]
    fn plain_chunk_passes_unchanged() {
        let data = br#"{"model":"mine","choices":[{"delta":{"content":"x"}}],"usage":null}"#;
        let m = OpenAi.map_event(data, &ctx(false, false));
        assert_eq!(m.out, EventOut::Unchanged);
        assert!(m.usage.is_none());
        assert_eq!(
            OpenAi.map_event(b"[DONE]", &ctx(false, false)).out,
            EventOut::Unchanged
        );
    }

    #[test]
    fn response_model_is_renamed_and_usage_read() {
        let body = Bytes::from_static(br#"{"id":"x","model":"theirs","usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7}}"#);
        let (out, usage) = OpenAi.map_response(body.clone(), "mine", "theirs");
        assert_eq!(
            usage,
            Some(Usage {
                prompt: 5,
                completion: 2,
                cached: 0,
                ..Default::default()
            })
        );
        let v: serde_json::Value = serde_json::from_slice(&out).expect("json");
        assert_eq!(v["model"], "mine");
        assert_eq!(v["usage"]["total_tokens"], 7);
        // Same name both ways: the body goes through untouched, usage still read.
        let (same, usage) = OpenAi.map_response(body.clone(), "theirs", "theirs");
        assert_eq!(same, body);
        assert_eq!(usage.map(|u| u.prompt), Some(5));
        // Not JSON: untouched, no usage.
        let junk = Bytes::from_static(b"not json");
        assert_eq!(
            OpenAi.map_response(junk.clone(), "mine", "theirs"),
            (junk, None)
        );
    }
}
