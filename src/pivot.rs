//! The pivot: OpenAI chat completions, typed.
//!
//! Every translated exchange goes client protocol → pivot → provider and back (ARCHITECTURE.md,
//! "Part two"). A client protocol (`protocols/`) decodes its request into a [`ChatRequest`] and
//! encodes [`ChatResponse`]s and [`ChatChunk`]s back; a provider (`providers/`) encodes the
//! [`ChatRequest`] into its own request and decodes its answer, stream and usage into the pivot.
//! When client and provider speak the same protocol nothing here is used: the body passes
//! through.
//!
//! The types follow OpenAI's chat completion objects field by field, so the OpenAI chat protocol
//! is `serde_json` in and out. Two extensions carry what other protocols have and OpenAI's chat
//! objects lack, so it survives a round trip instead of being dropped:
//! - `reasoning_content` (text, as DeepSeek, vLLM and OpenRouter name it) and `reasoning_blocks`
//!   (signed or opaque reasoning: Anthropic thinking with its signature, redacted thinking,
//!   OpenAI encrypted reasoning) on assistant messages and deltas;
//! - `cache_control` on content parts, tools and system text (Anthropic prompt caching);
//!   `thinking` on the request (Anthropic's extended thinking settings).
//!
//! Unknown fields are kept in `extra` maps, so an OpenAI client's field the gateway does not
//! know still reaches an OpenAI-compatible upstream through a translated protocol.

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

use crate::providers::Usage;

fn is_false(b: &bool) -> bool {
    !*b
}

/// `POST /v1/chat/completions`' body.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<Message>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub stream: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_completion_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    /// `stop`: a string or an array of strings; always an array here.
    #[serde(
        default,
        deserialize_with = "string_or_seq",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub stop: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<Tool>,
    /// `"none" | "auto" | "required" | {"type": "function", "function": {"name"}}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_choice: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallel_tool_calls: Option<bool>,
    /// `{"type": "text" | "json_object"}` or `{"type": "json_schema", "json_schema": {name, schema, strict}}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_format: Option<Value>,
    /// `"minimal" | "low" | "medium" | "high"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_effort: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<bool>,
    /// Extension: Anthropic's `thinking` (`{"type": "enabled", "budget_tokens": n}`), carried from
    /// an Anthropic client to an Anthropic-shaped upstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thinking: Option<Value>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl ChatRequest {
    /// The output bound the client set, whichever field it used.
    pub fn max_output(&self) -> Option<u64> {
        self.max_completion_tokens.or(self.max_tokens)
    }

    /// The client asked for usage on the stream.
    pub fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .and_then(|o| o.get("include_usage"))
            .and_then(Value::as_bool)
            .unwrap_or(false)
    }
}

fn string_or_seq<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match Option::<OneOrMany>::deserialize(d)? {
        None => Vec::new(),
        Some(OneOrMany::One(s)) => vec![s],
        Some(OneOrMany::Many(v)) => v,
    })
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    Developer,
    #[default]
    User,
    Assistant,
    Tool,
    /// The legacy `function` role's result (treated as a tool result).
    Function,
}

/// One message of the conversation.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: Role,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<Content>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refusal: Option<String>,
    /// Extension: the assistant's reasoning as plain text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    /// Extension: reasoning that must go back to its provider exactly (signatures, opaque data).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reasoning_blocks: Vec<ReasoningBlock>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Message {
    /// A message of `role` with text content.
    pub fn text(role: Role, text: impl Into<String>) -> Self {
        Self {
            role,
            content: Some(Content::Text(text.into())),
            ..Self::default()
        }
    }

    /// All text parts joined (images and other parts skipped).
    pub fn text_content(&self) -> String {
        match &self.content {
            None => String::new(),
            Some(Content::Text(t)) => t.clone(),
            Some(Content::Parts(parts)) => parts
                .iter()
                .filter_map(|p| p.text.as_deref())
                .collect::<Vec<_>>()
                .join(""),
        }
    }
}

/// A message's content: a string, or an array of parts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

/// One content part. A flat struct rather than an enum, so a part type the gateway does not
/// know (`input_audio`, `file`, …) survives with its fields in `extra`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Part {
    /// `text`, `image_url`, `input_audio`, `file`, `refusal`, …
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_url: Option<ImageUrl>,
    /// Extension: Anthropic's `{"type": "ephemeral", "ttl"?}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_control: Option<Value>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Part {
    pub fn text(text: impl Into<String>) -> Self {
        Self {
            kind: "text".into(),
            text: Some(text.into()),
            ..Self::default()
        }
    }

    pub fn image(url: impl Into<String>) -> Self {
        Self {
            kind: "image_url".into(),
            image_url: Some(ImageUrl {
                url: url.into(),
                detail: None,
            }),
            ..Self::default()
        }
    }
}

/// An image by URL, or inline as `data:<media type>;base64,<data>`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ImageUrl {
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl ImageUrl {
    /// `(media type, base64 data)` when the URL is a base64 `data:` URL.
    pub fn as_data(&self) -> Option<(&str, &str)> {
        let rest = self.url.strip_prefix("data:")?;
        let (media, data) = rest.split_once(',')?;
        let media = media.strip_suffix(";base64")?;
        Some((media, data))
    }
}

/// An assistant's call of a function tool.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    pub id: String,
    #[serde(rename = "type", default = "function_type")]
    pub kind: String,
    pub function: FunctionCall,
}

fn function_type() -> String {
    "function".into()
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FunctionCall {
    pub name: String,
    /// JSON text, as OpenAI sends it.
    #[serde(default)]
    pub arguments: String,
}

/// A tool the model may call. `kind` other than `function` (OpenAI's built-in tools) is kept
/// in `extra`; a provider that cannot serve it refuses with 400 `unsupported_tool`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Tool {
    #[serde(rename = "type", default = "function_type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub function: Option<FunctionDef>,
    /// Extension: Anthropic prompt caching on the tool list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_control: Option<Value>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FunctionDef {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// JSON Schema of the arguments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strict: Option<bool>,
}

/// Reasoning a provider needs back verbatim on the next turn.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReasoningBlock {
    /// `thinking` (Anthropic, text + signature), `redacted_thinking` (Anthropic, opaque `data`),
    /// `encrypted` (OpenAI Responses `encrypted_content` in `data`, with its item `id`),
    /// `thought_signature` (Gemini, in `signature`).
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

/// A complete chat completion.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatResponse {
    pub id: String,
    #[serde(default = "completion_object")]
    pub object: String,
    #[serde(default)]
    pub created: i64,
    pub model: String,
    pub choices: Vec<Choice>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<WireUsage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_fingerprint: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

fn completion_object() -> String {
    "chat.completion".into()
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Choice {
    #[serde(default)]
    pub index: u32,
    pub message: Message,
    /// `stop`, `length`, `tool_calls`, `content_filter`.
    #[serde(default)]
    pub finish_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<Value>,
}

/// One streamed chunk.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatChunk {
    #[serde(default)]
    pub id: String,
    #[serde(default = "chunk_object")]
    pub object: String,
    #[serde(default)]
    pub created: i64,
    #[serde(default)]
    pub model: String,
    #[serde(default)]
    pub choices: Vec<ChunkChoice>,
    /// Only on the last chunk (`stream_options.include_usage`), with `choices` empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<WireUsage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_fingerprint: Option<String>,
}

fn chunk_object() -> String {
    "chat.completion.chunk".into()
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChunkChoice {
    #[serde(default)]
    pub index: u32,
    #[serde(default)]
    pub delta: Delta,
    #[serde(default)]
    pub finish_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Delta {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refusal: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    /// A reasoning block, complete, or its signature arriving after its text.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reasoning_blocks: Vec<ReasoningBlock>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCallDelta>,
}

/// A piece of a tool call: the first piece of a call has `id` and the function's `name`, later
/// ones add to `arguments`; `index` says which call.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ToolCallDelta {
    pub index: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default)]
    pub function: FunctionDelta,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FunctionDelta {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arguments: Option<String>,
}

/// OpenAI's `usage` object, with the details tollgate meters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireUsage {
    #[serde(default)]
    pub prompt_tokens: i64,
    #[serde(default)]
    pub completion_tokens: i64,
    #[serde(default)]
    pub total_tokens: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens_details: Option<PromptDetails>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_tokens_details: Option<CompletionDetails>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromptDetails {
    #[serde(default)]
    pub cached_tokens: i64,
    /// Extension: prompt tokens written to the provider's cache (Anthropic cache creation).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub cache_write_tokens: i64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompletionDetails {
    #[serde(default)]
    pub reasoning_tokens: i64,
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

impl From<Usage> for WireUsage {
    fn from(u: Usage) -> Self {
        Self {
            prompt_tokens: u.prompt,
            completion_tokens: u.completion,
            total_tokens: u.prompt.saturating_add(u.completion),
            prompt_tokens_details: Some(PromptDetails {
                cached_tokens: u.cached,
                cache_write_tokens: u.cache_write,
            }),
            completion_tokens_details: Some(CompletionDetails {
                reasoning_tokens: u.reasoning,
            }),
        }
    }
}

impl From<WireUsage> for Usage {
    fn from(w: WireUsage) -> Self {
        let p = w.prompt_tokens_details.unwrap_or_default();
        Self {
            prompt: w.prompt_tokens,
            completion: w.completion_tokens,
            cached: p.cached_tokens,
            cache_write: p.cache_write_tokens,
            reasoning: w
                .completion_tokens_details
                .unwrap_or_default()
                .reasoning_tokens,
        }
    }
}

/// An error an upstream answered with, in protocol-neutral terms, for the client protocol to
/// render in its own shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamError {
    /// The HTTP status the client gets (an upstream's 529 is 503 on OpenAI routes).
    pub status: u16,
    /// OpenAI-style `type`: `invalid_request_error`, `authentication_error`,
    /// `permission_error`, `not_found_error`, `rate_limit_error`, `api_error`,
    /// `overloaded_error`.
    pub kind: String,
    pub message: String,
    /// OpenAI-style `code` when the upstream gave one (`context_length_exceeded`, …).
    pub code: Option<String>,
}

impl From<&crate::error::ApiError> for UpstreamError {
    fn from(e: &crate::error::ApiError) -> Self {
        let (status, kind, code) = e.parts();
        Self {
            status: status.as_u16(),
            kind: kind.to_owned(),
            message: e.public_message(),
            code: code.map(str::to_owned),
        }
    }
}

impl UpstreamError {
    /// An upstream answer that is not its protocol.
    pub fn malformed(what: impl Into<String>) -> Self {
        Self {
            status: 502,
            kind: "api_error".into(),
            message: what.into(),
            code: Some("upstream_error".into()),
        }
    }

    /// The OpenAI error `type` that goes with an HTTP status, for upstreams that give none.
    pub fn kind_for_status(status: u16) -> &'static str {
        match status {
            400 | 404 | 409 | 413 | 415 | 422 => "invalid_request_error",
            401 => "authentication_error",
            403 => "permission_error",
            429 => "rate_limit_error",
            503 | 529 => "overloaded_error",
            _ => "api_error",
        }
    }
}

/// The most text a [`ChunkAccumulator`] adds up (the bound of a complete upstream answer).
pub const MAX_ACCUMULATED_BYTES: usize = 64 * 1024 * 1024;
/// The most choices, and tool calls per choice, it keeps: an index beyond is the upstream's
/// nonsense, not a reason to allocate.
pub const MAX_ACCUMULATED_INDEX: u32 = 128;

/// Adds up a stream's chunks into the complete answer they make (for storing a streamed chat
/// completion). Holds what the stream said, nothing more, and at most
/// [`MAX_ACCUMULATED_BYTES`] of it: past that it stops and says so ([`Self::overflowed`]).
#[derive(Debug, Clone, Default)]
pub struct ChunkAccumulator {
    bytes: usize,
    overflowed: bool,
    id: String,
    created: i64,
    model: String,
    choices: std::collections::BTreeMap<u32, Choice>,
    usage: Option<WireUsage>,
    system_fingerprint: Option<String>,
}

impl ChunkAccumulator {
    /// The stream said more than it keeps: the sum is incomplete and must not be stored.
    pub fn overflowed(&self) -> bool {
        self.overflowed
    }

    pub fn push(&mut self, c: &ChatChunk) {
        if self.overflowed {
            return;
        }
        let size: usize = c
            .choices
            .iter()
            .map(|ch| {
                let d = &ch.delta;
                let text = [&d.content, &d.refusal, &d.reasoning_content]
                    .iter()
                    .filter_map(|t| t.as_ref().map(String::len))
                    .sum::<usize>();
                let calls = d
                    .tool_calls
                    .iter()
                    .map(|t| {
                        t.id.as_ref().map_or(0, String::len)
                            + t.function.name.as_ref().map_or(0, String::len)
                            + t.function.arguments.as_ref().map_or(0, String::len)
                    })
                    .sum::<usize>();
                let blocks = d
                    .reasoning_blocks
                    .iter()
                    .map(|b| {
                        [&b.text, &b.signature, &b.data]
                            .iter()
                            .filter_map(|t| t.as_ref().map(String::len))
                            .sum::<usize>()
                    })
                    .sum::<usize>();
                text + calls + blocks
            })
            .sum();
        self.bytes = self.bytes.saturating_add(size);
        let too_wide = c.choices.iter().any(|ch| {
            ch.index >= MAX_ACCUMULATED_INDEX
                || ch
                    .delta
                    .tool_calls
                    .iter()
                    .any(|t| t.index >= MAX_ACCUMULATED_INDEX)
        });
        if self.bytes > MAX_ACCUMULATED_BYTES || too_wide {
            self.overflowed = true;
            return;
        }
        if self.id.is_empty() {
            self.id.clone_from(&c.id);
            self.created = c.created;
            self.model.clone_from(&c.model);
        }
        if c.usage.is_some() {
            self.usage = c.usage;
        }
        if c.system_fingerprint.is_some() {
            self.system_fingerprint.clone_from(&c.system_fingerprint);
        }
        for ch in &c.choices {
            let choice = self.choices.entry(ch.index).or_insert_with(|| Choice {
                index: ch.index,
                message: Message {
                    role: Role::Assistant,
                    ..Message::default()
                },
                ..Choice::default()
            });
            let d = &ch.delta;
            let m = &mut choice.message;
            if let Some(t) = &d.content {
                match &mut m.content {
                    Some(Content::Text(s)) => s.push_str(t),
                    _ => m.content = Some(Content::Text(t.clone())),
                }
            }
            if let Some(t) = &d.refusal {
                m.refusal.get_or_insert_with(String::new).push_str(t);
            }
            if let Some(t) = &d.reasoning_content {
                m.reasoning_content
                    .get_or_insert_with(String::new)
                    .push_str(t);
            }
            m.reasoning_blocks
                .extend(d.reasoning_blocks.iter().cloned());
            for tc in &d.tool_calls {
                let at = tc.index as usize;
                while m.tool_calls.len() <= at {
                    m.tool_calls.push(ToolCall {
                        kind: "function".into(),
                        ..ToolCall::default()
                    });
                }
                let call = &mut m.tool_calls[at];
                if let Some(id) = &tc.id {
                    call.id.clone_from(id);
                }
                if let Some(n) = &tc.function.name {
                    call.function.name.push_str(n);
                }
                if let Some(a) = &tc.function.arguments {
                    call.function.arguments.push_str(a);
                }
            }
            if ch.finish_reason.is_some() {
                choice.finish_reason.clone_from(&ch.finish_reason);
            }
        }
    }

    /// The `chat.completion` the chunks add up to.
    pub fn finish(self) -> ChatResponse {
        ChatResponse {
            id: self.id,
            object: completion_object(),
            created: self.created,
            model: self.model,
            choices: self.choices.into_values().collect(),
            usage: self.usage,
            system_fingerprint: self.system_fingerprint,
            extra: Map::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(json: serde_json::Value) -> ChatChunk {
        serde_json::from_value(json).expect("chunk")
    }

    #[test]
    fn chunks_add_up_to_the_completion() {
        let mut acc = ChunkAccumulator::default();
        for c in [
            serde_json::json!({"id": "c1", "created": 5, "model": "m", "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hel"}}]}),
            serde_json::json!({"id": "c1", "model": "m", "choices": [{"index": 0, "delta": {"content": "lo", "tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"a\""}}]}}]}),
            serde_json::json!({"id": "c1", "model": "m", "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": ":1}"}}]}, "finish_reason": "tool_calls"}]}),
            serde_json::json!({"id": "c1", "model": "m", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}),
        ] {
            acc.push(&chunk(c));
        }
        let r = acc.finish();
        assert_eq!(r.id, "c1");
        assert_eq!(r.created, 5);
        let m = &r.choices[0].message;
        assert_eq!(m.text_content(), "Hello");
        assert_eq!(m.tool_calls[0].id, "call_1");
        assert_eq!(m.tool_calls[0].function.name, "f");
        assert_eq!(m.tool_calls[0].function.arguments, "{\"a\":1}");
        assert_eq!(r.choices[0].finish_reason.as_deref(), Some("tool_calls"));
        assert_eq!(r.usage.map(|u| u.completion_tokens), Some(4));
    }

    #[test]
    fn a_hostile_stream_is_not_added_up_without_bound() {
        // A tool-call index of four billion must not allocate four billion calls.
        let mut acc = ChunkAccumulator::default();
        acc.push(&chunk(serde_json::json!({"id": "c", "choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": 4_000_000_000u32, "id": "x", "function": {"name": "f", "arguments": "{}"}}]}}]})));
        assert!(acc.overflowed());
        assert!(acc.finish().choices.is_empty());

        // Text past the byte bound stops the sum, and it says so.
        let mut acc = ChunkAccumulator::default();
        let piece = "x".repeat(1024 * 1024);
        for _ in 0..=MAX_ACCUMULATED_BYTES / piece.len() {
            acc.push(&chunk(serde_json::json!({"id": "c", "choices": [{"index": 0, "delta": {"content": piece}}]})));
        }
        assert!(acc.overflowed());
        let kept = acc.finish().choices[0].message.text_content().len();
        assert!(kept <= MAX_ACCUMULATED_BYTES, "{kept}");
    }
}
