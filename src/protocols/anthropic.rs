//! Anthropic's Messages API as a client protocol (`POST /v1/messages`, API.md §10), for when the
//! provider speaks something else: a Messages request decoded into the pivot, and the pivot's
//! answer, stream and errors encoded back as Anthropic's objects and events. (An Anthropic client
//! to an `anthropic` provider never comes here: that pair is a pass-through, see
//! `providers::anthropic::PassthroughUsage`.)

use std::collections::HashMap;

use bytes::BytesMut;
use rand::RngExt;
use rand::distr::Alphanumeric;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use super::{ChunkEncoder, ClientProtocol, EncodeCtx};
use crate::error::ApiError;
use crate::pivot::{
    ChatChunk, ChatRequest, ChatResponse, Content, FunctionCall, FunctionDef, Message, Part,
    ReasoningBlock, Role, Tool, ToolCall, UpstreamError,
};
use crate::providers::Usage;

pub struct AnthropicMessages;

/// Anthropic's error `type` for an HTTP status (API.md §10). The gateway's own
/// `insufficient_quota` (402 upstream, 429 here) is a `rate_limit_error`.
pub fn error_type(status: u16) -> &'static str {
    match status {
        401 => "authentication_error",
        402 | 429 => "rate_limit_error",
        403 => "permission_error",
        404 => "not_found_error",
        503 | 529 => "overloaded_error",
        500..=599 => "api_error",
        _ => "invalid_request_error",
    }
}

/// Anthropic's error body: `{"type": "error", "error": {"type", "message"}}`.
pub fn error_json(status: u16, message: &str) -> Value {
    json!({"type": "error", "error": {"type": error_type(status), "message": message}})
}

/// Anthropic's `stop_reason` for OpenAI's `finish_reason`.
pub fn stop_reason(finish_reason: &str) -> &'static str {
    match finish_reason {
        "length" => "max_tokens",
        "tool_calls" | "function_call" => "tool_use",
        "content_filter" => "refusal",
        _ => "end_turn",
    }
}

/// A new message id: `msg_` and 24 base62 characters.
pub fn new_message_id() -> String {
    let random: String = rand::rng()
        .sample_iter(Alphanumeric)
        .take(24)
        .map(char::from)
        .collect();
    format!("msg_{random}")
}

/// Anthropic's `usage` for the pivot's: `input_tokens` are the prompt tokens neither read from
/// nor written to the cache.
fn usage_json(u: Usage) -> Value {
    let cached = u.cached.max(0);
    let written = u.cache_write.max(0);
    json!({
        "input_tokens": u.prompt.max(0).saturating_sub(cached).saturating_sub(written).max(0),
        "cache_creation_input_tokens": written,
        "cache_read_input_tokens": cached,
        "output_tokens": u.completion.max(0),
    })
}

// ---- requests ----

#[derive(Deserialize)]
struct Request {
    #[serde(default)]
    model: String,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    messages: Option<Vec<InMessage>>,
    #[serde(default)]
    system: Option<InContent>,
    #[serde(default)]
    stop_sequences: Option<Vec<String>>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    top_p: Option<f64>,
    #[serde(default)]
    top_k: Option<Value>,
    #[serde(default)]
    tools: Option<Vec<Value>>,
    #[serde(default)]
    tool_choice: Option<Value>,
    #[serde(default)]
    metadata: Option<Value>,
    #[serde(default)]
    thinking: Option<Value>,
    #[serde(default)]
    output_config: Option<Value>,
    /// The structured-outputs beta's name for `output_config.format`.
    #[serde(default)]
    output_format: Option<Value>,
}

#[derive(Deserialize)]
struct InMessage {
    role: String,
    content: InContent,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum InContent {
    Text(String),
    Blocks(Vec<Value>),
}

fn bad(param: impl Into<String>, code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::BadRequest {
        message: message.into(),
        code,
        param: Some(param.into()),
    }
}

fn str_of<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

fn cache_control(block: &Value) -> Option<Value> {
    block.get("cache_control").filter(|c| !c.is_null()).cloned()
}

/// An image or document block's `source` as an OpenAI part.
fn source_part(block: &Value, param: &str) -> Result<Part, ApiError> {
    let kind = str_of(block, "type").unwrap_or("");
    let source = block.get("source").unwrap_or(&Value::Null);
    let mut part = match (kind, str_of(source, "type")) {
        ("image", Some("base64")) => Part::image(format!(
            "data:{};base64,{}",
            str_of(source, "media_type").unwrap_or("image/png"),
            str_of(source, "data").unwrap_or("")
        )),
        ("image", Some("url")) => Part::image(str_of(source, "url").unwrap_or("")),
        ("document", Some("base64")) => {
            let mut file = Map::new();
            file.insert(
                "file_data".into(),
                format!(
                    "data:{};base64,{}",
                    str_of(source, "media_type").unwrap_or("application/pdf"),
                    str_of(source, "data").unwrap_or("")
                )
                .into(),
            );
            if let Some(title) = str_of(block, "title") {
                file.insert("filename".into(), title.into());
            }
            let mut extra = Map::new();
            extra.insert("file".into(), Value::Object(file));
            Part {
                kind: "file".into(),
                extra,
                ..Part::default()
            }
        }
        ("document", Some("text")) => Part::text(str_of(source, "data").unwrap_or("")),
        (_, source) => {
            return Err(bad(
                param,
                "invalid_value",
                format!(
                    "A {kind} with source type '{}' cannot be translated for this model's provider.",
                    source.unwrap_or("none")
                ),
            ));
        }
    };
    part.cache_control = cache_control(block);
    Ok(part)
}

/// A content block that is text, an image or a document, as an OpenAI part.
fn content_part(block: &Value, param: &str) -> Result<Part, ApiError> {
    match str_of(block, "type") {
        Some("text") => Ok(Part {
            cache_control: cache_control(block),
            ..Part::text(str_of(block, "text").unwrap_or(""))
        }),
        Some("image" | "document") => source_part(block, param),
        other => Err(bad(
            param,
            "invalid_value",
            format!(
                "Content blocks of type '{}' cannot be translated for this model's provider.",
                other.unwrap_or("none")
            ),
        )),
    }
}

/// A `tool_result` block as a `tool` message.
fn tool_result(block: &Value, param: &str) -> Result<Message, ApiError> {
    let mut content = match block.get("content") {
        None | Some(Value::Null) => Content::Text(String::new()),
        Some(Value::String(s)) => Content::Text(s.clone()),
        Some(Value::Array(blocks)) => Content::Parts(
            blocks
                .iter()
                .enumerate()
                .map(|(i, b)| content_part(b, &format!("{param}.content[{i}]")))
                .collect::<Result<_, _>>()?,
        ),
        Some(_) => {
            return Err(bad(
                param,
                "invalid_value",
                "A tool_result's content is a string or content blocks.",
            ));
        }
    };
    // The cache breakpoint of a tool result moves onto its (last) content part.
    if let Some(cc) = cache_control(block) {
        if let Content::Text(t) = &content {
            content = Content::Parts(vec![Part::text(t.clone())]);
        }
        if let Content::Parts(parts) = &mut content
            && let Some(last) = parts.last_mut()
        {
            last.cache_control = Some(cc);
        }
    }
    let mut m = Message {
        role: Role::Tool,
        content: Some(content),
        tool_call_id: Some(str_of(block, "tool_use_id").unwrap_or("").to_owned()),
        ..Message::default()
    };
    if block.get("is_error") == Some(&Value::Bool(true)) {
        m.extra.insert("is_error".into(), Value::Bool(true));
    }
    Ok(m)
}

/// One user turn: its tool results as `tool` messages (first, in order), then the rest as one
/// user message.
fn user_turn(content: InContent, param: &str, out: &mut Vec<Message>) -> Result<(), ApiError> {
    let blocks = match content {
        InContent::Text(t) => {
            out.push(Message::text(Role::User, t));
            return Ok(());
        }
        InContent::Blocks(b) => b,
    };
    let mut parts = Vec::new();
    for (i, b) in blocks.iter().enumerate() {
        let p = format!("{param}[{i}]");
        if str_of(b, "type") == Some("tool_result") {
            out.push(tool_result(b, &p)?);
        } else {
            parts.push(content_part(b, &p)?);
        }
    }
    if !parts.is_empty() {
        out.push(Message {
            role: Role::User,
            content: Some(Content::Parts(parts)),
            ..Message::default()
        });
    }
    Ok(())
}

/// One assistant turn: thinking → reasoning, text → content, `tool_use` → tool calls.
fn assistant_turn(content: InContent, param: &str) -> Result<Message, ApiError> {
    let blocks = match content {
        InContent::Text(t) => return Ok(Message::text(Role::Assistant, t)),
        InContent::Blocks(b) => b,
    };
    let mut m = Message {
        role: Role::Assistant,
        ..Message::default()
    };
    let mut parts: Vec<Part> = Vec::new();
    let mut reasoning = String::new();
    for (i, b) in blocks.iter().enumerate() {
        let p = format!("{param}[{i}]");
        match str_of(b, "type") {
            Some("text") => parts.push(content_part(b, &p)?),
            Some("thinking") => {
                let text = str_of(b, "thinking").unwrap_or("");
                reasoning.push_str(text);
                m.reasoning_blocks.push(ReasoningBlock {
                    kind: "thinking".into(),
                    text: Some(text.to_owned()),
                    signature: str_of(b, "signature").map(str::to_owned),
                    ..ReasoningBlock::default()
                });
            }
            Some("redacted_thinking") => m.reasoning_blocks.push(ReasoningBlock {
                kind: "redacted_thinking".into(),
                data: str_of(b, "data").map(str::to_owned),
                ..ReasoningBlock::default()
            }),
            Some("tool_use") => {
                let input = b.get("input").cloned().unwrap_or(json!({}));
                m.tool_calls.push(ToolCall {
                    id: str_of(b, "id").unwrap_or("").to_owned(),
                    kind: "function".into(),
                    function: FunctionCall {
                        name: str_of(b, "name").unwrap_or("").to_owned(),
                        arguments: serde_json::to_string(&input).unwrap_or_else(|_| "{}".into()),
                    },
                });
            }
            other => {
                return Err(bad(
                    p,
                    "invalid_value",
                    format!(
                        "Assistant content blocks of type '{}' cannot be translated for this model's provider.",
                        other.unwrap_or("none")
                    ),
                ));
            }
        }
    }
    if !reasoning.is_empty() {
        m.reasoning_content = Some(reasoning);
    }
    // Plain text goes as a string (every OpenAI-compatible server takes that for an assistant);
    // parts only when one carries a cache breakpoint.
    if parts.iter().any(|p| p.cache_control.is_some()) {
        m.content = Some(Content::Parts(parts));
    } else {
        let text: String = parts.iter().filter_map(|p| p.text.as_deref()).collect();
        if !text.is_empty() || m.tool_calls.is_empty() {
            m.content = Some(Content::Text(text));
        }
    }
    Ok(m)
}

/// `system`: a string, or text blocks (each with its cache breakpoint).
fn system_message(system: InContent) -> Result<Option<Message>, ApiError> {
    match system {
        InContent::Text(t) if t.is_empty() => Ok(None),
        InContent::Text(t) => Ok(Some(Message::text(Role::System, t))),
        InContent::Blocks(blocks) if blocks.is_empty() => Ok(None),
        InContent::Blocks(blocks) => {
            let parts = blocks
                .iter()
                .enumerate()
                .map(|(i, b)| match str_of(b, "type") {
                    Some("text") => content_part(b, &format!("system[{i}]")),
                    _ => Err(bad(
                        format!("system[{i}]"),
                        "invalid_value",
                        "system takes text blocks only.",
                    )),
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Some(Message {
                role: Role::System,
                content: Some(Content::Parts(parts)),
                ..Message::default()
            }))
        }
    }
}

/// A Messages tool as a function tool; a server tool (any `type` but `custom`) is refused.
fn tool(v: &Value, i: usize) -> Result<Tool, ApiError> {
    let name = str_of(v, "name").unwrap_or("");
    match str_of(v, "type") {
        None | Some("custom") => {}
        Some(kind) => {
            return Err(bad(
                format!("tools[{i}]"),
                "unsupported_tool",
                format!(
                    "The tool '{name}' (type '{kind}') runs on Anthropic's servers; this model's provider cannot serve it."
                ),
            ));
        }
    }
    if name.is_empty() {
        return Err(bad(
            format!("tools[{i}].name"),
            "missing_field",
            "A tool needs a name.",
        ));
    }
    Ok(Tool {
        kind: "function".into(),
        function: Some(FunctionDef {
            name: name.to_owned(),
            description: str_of(v, "description").map(str::to_owned),
            parameters: v.get("input_schema").cloned(),
            strict: v.get("strict").and_then(Value::as_bool),
        }),
        cache_control: cache_control(v),
        extra: Map::new(),
    })
}

/// OpenAI's `tool_choice` and `parallel_tool_calls` for a Messages `tool_choice`.
fn tool_choice(v: &Value) -> Result<(Option<Value>, Option<bool>), ApiError> {
    let choice = match str_of(v, "type") {
        Some("auto") => json!("auto"),
        Some("any") => json!("required"),
        Some("none") => json!("none"),
        Some("tool") => {
            json!({"type": "function", "function": {"name": str_of(v, "name").unwrap_or("")}})
        }
        _ => {
            return Err(bad(
                "tool_choice",
                "invalid_value",
                "tool_choice.type is auto, any, tool or none.",
            ));
        }
    };
    let parallel =
        (v.get("disable_parallel_tool_use") == Some(&Value::Bool(true))).then_some(false);
    Ok((Some(choice), parallel))
}

/// A Messages request (or a count_tokens one, which has no `max_tokens`) as the pivot.
fn decode(body: &[u8], need_max_tokens: bool) -> Result<ChatRequest, ApiError> {
    let r: Request = serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(
            "invalid_json",
            format!("The body is not a valid Messages request: {e}"),
        )
    })?;
    if need_max_tokens && r.max_tokens.is_none() {
        return Err(bad(
            "max_tokens",
            "missing_field",
            "max_tokens is required.",
        ));
    }
    let Some(in_messages) = r.messages else {
        return Err(bad("messages", "missing_field", "messages is required."));
    };
    let mut messages = Vec::with_capacity(in_messages.len() + 1);
    if let Some(system) = r.system
        && let Some(m) = system_message(system)?
    {
        messages.push(m);
    }
    for (i, m) in in_messages.into_iter().enumerate() {
        let param = format!("messages[{i}].content");
        match m.role.as_str() {
            "user" => user_turn(m.content, &param, &mut messages)?,
            "assistant" => messages.push(assistant_turn(m.content, &param)?),
            other => {
                return Err(bad(
                    format!("messages[{i}].role"),
                    "invalid_value",
                    format!("A message's role is user or assistant, not '{other}'."),
                ));
            }
        }
    }
    let tools = r
        .tools
        .unwrap_or_default()
        .iter()
        .enumerate()
        .map(|(i, t)| tool(t, i))
        .collect::<Result<Vec<_>, _>>()?;
    let (tool_choice, parallel_tool_calls) = match &r.tool_choice {
        Some(v) if !v.is_null() => tool_choice(v)?,
        _ => (None, None),
    };
    let format = r
        .output_config
        .as_ref()
        .and_then(|c| c.get("format"))
        .or(r.output_format.as_ref())
        .filter(|f| str_of(f, "type") == Some("json_schema"));
    let response_format = format.map(|f| {
        json!({"type": "json_schema", "json_schema": {
            "name": "output",
            "schema": f.get("schema").cloned().unwrap_or(json!({})),
            "strict": true,
        }})
    });
    let reasoning_effort = r
        .output_config
        .as_ref()
        .and_then(|c| str_of(c, "effort"))
        .filter(|e| matches!(*e, "low" | "medium" | "high"))
        .map(str::to_owned);
    let mut extra = Map::new();
    if let Some(k) = r.top_k.filter(|k| !k.is_null()) {
        extra.insert("top_k".into(), k);
    }
    Ok(ChatRequest {
        model: r.model,
        messages,
        stream: r.stream.unwrap_or(false),
        max_tokens: r.max_tokens,
        temperature: r.temperature,
        top_p: r.top_p,
        stop: r.stop_sequences.unwrap_or_default(),
        tools,
        tool_choice,
        parallel_tool_calls,
        response_format,
        reasoning_effort,
        user: r
            .metadata
            .as_ref()
            .and_then(|m| str_of(m, "user_id"))
            .map(str::to_owned),
        thinking: r.thinking.filter(|t| !t.is_null()),
        extra,
        ..ChatRequest::default()
    })
}

/// A `/v1/messages/count_tokens` body as the pivot (it has no `max_tokens`).
pub fn count_tokens_request(body: &[u8]) -> Result<ChatRequest, ApiError> {
    decode(body, false)
}

// ---- answers ----

/// An assistant message's content blocks: thinking (with signatures) first, then text, then
/// tool uses.
fn content_blocks(m: &Message) -> Vec<Value> {
    let mut out = Vec::new();
    let mut reasoning_text = m.reasoning_content.as_deref().filter(|t| !t.is_empty());
    for b in &m.reasoning_blocks {
        match b.kind.as_str() {
            "thinking" => {
                let text = b
                    .text
                    .as_deref()
                    .filter(|t| !t.is_empty())
                    .or(reasoning_text.take())
                    .unwrap_or("");
                out.push(json!({
                    "type": "thinking",
                    "thinking": text,
                    "signature": b.signature.as_deref().unwrap_or(""),
                }));
            }
            "redacted_thinking" => {
                out.push(
                    json!({"type": "redacted_thinking", "data": b.data.as_deref().unwrap_or("")}),
                );
            }
            _ => {}
        }
    }
    if !out.iter().any(|b| b["type"] == "thinking")
        && let Some(text) = reasoning_text
    {
        out.insert(
            0,
            json!({"type": "thinking", "thinking": text, "signature": ""}),
        );
    }
    let text = m.text_content();
    if !text.is_empty() {
        out.push(json!({"type": "text", "text": text}));
    } else if let Some(r) = m.refusal.as_deref().filter(|r| !r.is_empty()) {
        out.push(json!({"type": "text", "text": r}));
    }
    for c in &m.tool_calls {
        let input = match serde_json::from_str::<Value>(&c.function.arguments) {
            Ok(v @ Value::Object(_)) => v,
            _ => json!({}),
        };
        out.push(json!({"type": "tool_use", "id": c.id, "name": c.function.name, "input": input}));
    }
    out
}

impl ClientProtocol for AnthropicMessages {
    fn decode_request(&self, body: &[u8]) -> Result<ChatRequest, ApiError> {
        decode(body, true)
    }

    fn encode_response(&self, resp: &ChatResponse, ctx: &EncodeCtx) -> Vec<u8> {
        let choice = resp.choices.first();
        let content = choice
            .map(|c| content_blocks(&c.message))
            .unwrap_or_default();
        let has_tools = choice.is_some_and(|c| !c.message.tool_calls.is_empty());
        let stop = match choice.and_then(|c| c.finish_reason.as_deref()) {
            Some(f) => stop_reason(f),
            None if has_tools => "tool_use",
            None => "end_turn",
        };
        let usage = resp.usage.map(Usage::from).unwrap_or_default();
        let body = json!({
            "id": ctx.id.clone().unwrap_or_else(new_message_id),
            "type": "message",
            "role": "assistant",
            "model": ctx.client_model,
            "content": content,
            "stop_reason": stop,
            "stop_sequence": null,
            "usage": usage_json(usage),
        });
        serde_json::to_vec(&body).unwrap_or_default()
    }

    fn stream_encoder(&self, ctx: &EncodeCtx) -> Box<dyn ChunkEncoder> {
        Box::new(MessagesStream {
            id: ctx.id.clone().unwrap_or_else(new_message_id),
            ctx: ctx.clone(),
            started: false,
            next_index: 0,
            open: None,
            tools: HashMap::new(),
            stop_reason: None,
            usage: None,
        })
    }

    fn error_body(&self, status: u16, err: &UpstreamError) -> Vec<u8> {
        serde_json::to_vec(&error_json(status, &err.message)).unwrap_or_default()
    }
}

// ---- streams ----

/// `event: <name>\ndata: <json>\n\n`, the JSON encoded straight into `out`.
fn frame(out: &mut BytesMut, name: &str, data: &impl Serialize) {
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\ndata: ");
    let _ = serde_json::to_writer(bytes::BufMut::writer(&mut *out), data);
    out.extend_from_slice(b"\n\n");
}

/// `content_block_delta` around `delta`.
#[derive(Serialize)]
struct BlockDelta<D> {
    #[serde(rename = "type")]
    kind: &'static str,
    index: u32,
    delta: D,
}

/// A `text_delta` (the streamed text's own event: typed, not built as a JSON tree).
#[derive(Serialize)]
struct TextDelta<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    text: &'a str,
}

/// The content block being written.
#[derive(Debug, Clone, Copy)]
enum OpenBlock {
    Text(u32),
    /// `streamed`: thinking text was sent in this block (a complete reasoning block arriving
    /// later then adds only its signature).
    Thinking {
        index: u32,
        streamed: bool,
    },
    Tool(u32),
}

/// One Messages stream written from pivot chunks.
struct MessagesStream {
    ctx: EncodeCtx,
    id: String,
    started: bool,
    next_index: u32,
    open: Option<OpenBlock>,
    /// OpenAI tool-call index → the Anthropic block index of its `tool_use`.
    tools: HashMap<u32, u32>,
    stop_reason: Option<&'static str>,
    usage: Option<Usage>,
}

impl MessagesStream {
    fn close(&mut self, out: &mut BytesMut) {
        if let Some(b) = self.open.take() {
            let index = match b {
                OpenBlock::Text(i) | OpenBlock::Tool(i) => i,
                OpenBlock::Thinking { index, .. } => index,
            };
            frame(
                out,
                "content_block_stop",
                &json!({"type": "content_block_stop", "index": index}),
            );
        }
    }

    /// Closes the open block and starts `block`; its index.
    fn begin(&mut self, out: &mut BytesMut, block: Value) -> u32 {
        self.close(out);
        let index = self.next_index;
        self.next_index = self.next_index.saturating_add(1);
        frame(
            out,
            "content_block_start",
            &json!({"type": "content_block_start", "index": index, "content_block": block}),
        );
        index
    }

    fn delta(out: &mut BytesMut, index: u32, delta: impl Serialize) {
        frame(
            out,
            "content_block_delta",
            &BlockDelta {
                kind: "content_block_delta",
                index,
                delta,
            },
        );
    }

    fn text(&mut self, out: &mut BytesMut, text: &str) {
        let index = match self.open {
            Some(OpenBlock::Text(i)) => i,
            _ => {
                let i = self.begin(out, json!({"type": "text", "text": ""}));
                self.open = Some(OpenBlock::Text(i));
                i
            }
        };
        Self::delta(
            out,
            index,
            TextDelta {
                kind: "text_delta",
                text,
            },
        );
    }

    /// The open thinking block (started when another kind is open): its index and whether text
    /// was streamed in it.
    fn thinking_block(&mut self, out: &mut BytesMut) -> (u32, bool) {
        match self.open {
            Some(OpenBlock::Thinking { index, streamed }) => (index, streamed),
            _ => {
                let index = self.begin(
                    out,
                    json!({"type": "thinking", "thinking": "", "signature": ""}),
                );
                self.open = Some(OpenBlock::Thinking {
                    index,
                    streamed: false,
                });
                (index, false)
            }
        }
    }

    fn thinking_text(&mut self, out: &mut BytesMut, text: &str) {
        let (index, _) = self.thinking_block(out);
        self.open = Some(OpenBlock::Thinking {
            index,
            streamed: true,
        });
        Self::delta(
            out,
            index,
            json!({"type": "thinking_delta", "thinking": text}),
        );
    }

    fn reasoning_block(&mut self, out: &mut BytesMut, b: &ReasoningBlock) {
        match b.kind.as_str() {
            "thinking" => {
                let (index, streamed) = self.thinking_block(out);
                if !streamed && let Some(text) = b.text.as_deref().filter(|t| !t.is_empty()) {
                    self.thinking_text(out, text);
                }
                // The signature ends its thinking block.
                if let Some(sig) = b.signature.as_deref().filter(|s| !s.is_empty()) {
                    Self::delta(
                        out,
                        index,
                        json!({"type": "signature_delta", "signature": sig}),
                    );
                    self.close(out);
                }
            }
            "redacted_thinking" => {
                let data = b.data.as_deref().unwrap_or("");
                let index = self.begin(out, json!({"type": "redacted_thinking", "data": data}));
                frame(
                    out,
                    "content_block_stop",
                    &json!({"type": "content_block_stop", "index": index}),
                );
            }
            // Other providers' opaque reasoning has no Anthropic form.
            _ => {}
        }
    }

    fn tool_call(&mut self, out: &mut BytesMut, c: &crate::pivot::ToolCallDelta) {
        let index = match self.tools.get(&c.index) {
            Some(&i) => i,
            None => {
                let id =
                    c.id.clone()
                        .unwrap_or_else(|| format!("toolu_{}", &new_message_id()[4..]));
                let name = c.function.name.clone().unwrap_or_default();
                let i = self.begin(
                    out,
                    json!({"type": "tool_use", "id": id, "name": name, "input": {}}),
                );
                self.open = Some(OpenBlock::Tool(i));
                self.tools.insert(c.index, i);
                i
            }
        };
        if let Some(args) = c.function.arguments.as_deref().filter(|a| !a.is_empty()) {
            Self::delta(
                out,
                index,
                json!({"type": "input_json_delta", "partial_json": args}),
            );
        }
    }
}

impl ChunkEncoder for MessagesStream {
    fn start(&mut self, out: &mut BytesMut) {
        if self.started {
            return;
        }
        self.started = true;
        frame(
            out,
            "message_start",
            &json!({"type": "message_start", "message": {
                "id": self.id,
                "type": "message",
                "role": "assistant",
                "model": self.ctx.client_model,
                "content": [],
                "stop_reason": null,
                "stop_sequence": null,
                "usage": usage_json(Usage::default()),
            }}),
        );
    }

    fn chunk(&mut self, chunk: &ChatChunk, out: &mut BytesMut) {
        self.start(out);
        if let Some(u) = chunk.usage {
            self.usage = Some(u.into());
        }
        for choice in chunk.choices.iter().filter(|c| c.index == 0) {
            let d = &choice.delta;
            if let Some(r) = d.reasoning_content.as_deref().filter(|r| !r.is_empty()) {
                self.thinking_text(out, r);
            }
            for b in &d.reasoning_blocks {
                self.reasoning_block(out, b);
            }
            if let Some(t) = d.content.as_deref().filter(|t| !t.is_empty()) {
                self.text(out, t);
            }
            if let Some(t) = d.refusal.as_deref().filter(|t| !t.is_empty()) {
                self.text(out, t);
            }
            for c in &d.tool_calls {
                self.tool_call(out, c);
            }
            if let Some(f) = choice.finish_reason.as_deref() {
                self.stop_reason = Some(stop_reason(f));
            }
        }
    }

    fn finish(&mut self, usage: Option<Usage>, out: &mut BytesMut) {
        self.start(out);
        self.close(out);
        let usage = usage.or(self.usage).unwrap_or_default();
        let stop = self.stop_reason.unwrap_or(if self.tools.is_empty() {
            "end_turn"
        } else {
            "tool_use"
        });
        frame(
            out,
            "message_delta",
            &json!({"type": "message_delta",
                    "delta": {"stop_reason": stop, "stop_sequence": null},
                    "usage": usage_json(usage)}),
        );
        frame(out, "message_stop", &json!({"type": "message_stop"}));
    }

    fn fail(&mut self, err: &UpstreamError, out: &mut BytesMut) {
        frame(out, "error", &error_json(err.status, &err.message));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pivot::{ChunkChoice, Delta, FunctionDelta, ToolCallDelta, WireUsage};

    const CLAUDE_CODE: &str =
        include_str!("../../tests/fixtures/anthropic/claude_code_request.json");

    fn err_of(r: Result<ChatRequest, ApiError>) -> (String, Option<String>, String) {
        match r {
            Err(ApiError::BadRequest {
                code,
                param,
                message,
            }) => (code.to_owned(), param, message),
            other => panic!("expected a 400, got {other:?}"),
        }
    }

    /// The `(event name, data)` pairs of an SSE text, checking every frame's shape.
    fn frames(b: &[u8]) -> Vec<(String, Value)> {
        let s = std::str::from_utf8(b).expect("utf-8");
        assert!(s.is_empty() || s.ends_with("\n\n"), "{s}");
        s.split_terminator("\n\n")
            .map(|f| {
                let (ev, data) = f.split_once('\n').expect("two lines");
                let name = ev.strip_prefix("event: ").expect("event line");
                let data: Value =
                    serde_json::from_str(data.strip_prefix("data: ").expect("data line"))
                        .expect("json");
                assert_eq!(data["type"], name, "the data's type is the event's name");
                (name.to_owned(), data)
            })
            .collect()
    }

    #[test]
    fn claude_codes_request_decodes() {
        let r = AnthropicMessages
            .decode_request(CLAUDE_CODE.as_bytes())
            .expect("decodes");
        assert_eq!(r.model, "claude-sonnet-4-5-20250929");
        assert_eq!(r.max_tokens, Some(32000));
        assert!(r.stream);
        assert_eq!(r.temperature, Some(1.0));
        assert_eq!(
            r.thinking,
            Some(json!({"type": "enabled", "budget_tokens": 1024}))
        );
        assert!(r.user.as_deref().expect("user").starts_with("user_2f1c"));
        // system (2 cached text blocks), user, assistant, tool, tool.
        let roles: Vec<Role> = r.messages.iter().map(|m| m.role).collect();
        assert_eq!(
            roles,
            [
                Role::System,
                Role::User,
                Role::Assistant,
                Role::Tool,
                Role::Tool
            ]
        );
        let Some(Content::Parts(sys)) = &r.messages[0].content else {
            panic!("system parts")
        };
        assert_eq!(sys.len(), 2);
        assert!(
            sys.iter()
                .all(|p| p.cache_control == Some(json!({"type": "ephemeral"})))
        );
        assert!(
            sys[0]
                .text
                .as_deref()
                .expect("text")
                .starts_with("You are Claude Code")
        );
        let a = &r.messages[2];
        assert_eq!(a.text_content(), "I'll read the file.");
        assert_eq!(
            a.reasoning_content.as_deref(),
            Some("I should read the file first.")
        );
        assert!(
            a.reasoning_blocks[0]
                .signature
                .as_deref()
                .expect("sig")
                .starts_with("ErUB")
        );
        assert_eq!(a.tool_calls.len(), 2);
        assert_eq!(a.tool_calls[0].id, "toolu_01VGqmxwCb7YeW4dnD9rWZ8N");
        assert_eq!(a.tool_calls[0].function.name, "Read");
        let args: Value = serde_json::from_str(&a.tool_calls[0].function.arguments).expect("json");
        assert_eq!(args, json!({"file_path": "/home/user/project/src/main.rs"}));
        let t1 = &r.messages[3];
        assert_eq!(
            t1.tool_call_id.as_deref(),
            Some("toolu_01VGqmxwCb7YeW4dnD9rWZ8N")
        );
        assert!(t1.text_content().contains("println!"));
        assert!(!t1.extra.contains_key("is_error"));
        let t2 = &r.messages[4];
        assert_eq!(t2.extra.get("is_error"), Some(&Value::Bool(true)));
        let Some(Content::Parts(p)) = &t2.content else {
            panic!("tool result parts")
        };
        assert_eq!(p[0].cache_control, Some(json!({"type": "ephemeral"})));
        assert_eq!(r.tools.len(), 2);
        let read = r.tools[1].function.as_ref().expect("function");
        assert_eq!(read.name, "Read");
        assert_eq!(
            read.parameters.as_ref().expect("schema")["required"],
            json!(["file_path"])
        );
        assert_eq!(r.tools[1].cache_control, Some(json!({"type": "ephemeral"})));
    }

    #[test]
    fn request_fields_map() {
        let body = json!({
            "model": "m", "max_tokens": 100,
            "system": "be brief",
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": "look"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "QUJD"}},
                {"type": "image", "source": {"type": "url", "url": "https://x.test/i.png"}},
            ]}],
            "stop_sequences": ["\n\nHuman:"], "top_p": 0.5, "top_k": 40,
            "tools": [{"name": "f", "input_schema": {"type": "object"}, "type": "custom"}],
            "tool_choice": {"type": "any", "disable_parallel_tool_use": true},
            "output_config": {"format": {"type": "json_schema", "schema": {"type": "object"}}},
        });
        let r = AnthropicMessages
            .decode_request(body.to_string().as_bytes())
            .expect("decodes");
        assert_eq!(r.messages[0], Message::text(Role::System, "be brief"));
        let Some(Content::Parts(p)) = &r.messages[1].content else {
            panic!("parts")
        };
        assert_eq!(
            p[1].image_url.as_ref().expect("image").url,
            "data:image/jpeg;base64,QUJD"
        );
        assert_eq!(
            p[2].image_url.as_ref().expect("image").url,
            "https://x.test/i.png"
        );
        assert_eq!(r.stop, ["\n\nHuman:"]);
        assert_eq!(r.extra.get("top_k"), Some(&json!(40)));
        assert_eq!(r.tool_choice, Some(json!("required")));
        assert_eq!(r.parallel_tool_calls, Some(false));
        assert_eq!(
            r.response_format.expect("format")["json_schema"]["schema"],
            json!({"type": "object"})
        );
        assert!(!r.stream);
    }

    #[test]
    fn refusals_name_what_they_refuse() {
        let (code, param, _) = err_of(
            AnthropicMessages
                .decode_request(br#"{"model":"m","messages":[{"role":"user","content":"x"}]}"#),
        );
        assert_eq!(
            (code.as_str(), param.as_deref()),
            ("missing_field", Some("max_tokens"))
        );
        // count_tokens has no max_tokens.
        let r =
            count_tokens_request(br#"{"model":"m","messages":[{"role":"user","content":"x"}]}"#)
                .expect("count_tokens body");
        assert_eq!(r.max_tokens, None);
        for (tool, name) in [
            (
                json!({"type": "web_search_20250305", "name": "web_search", "max_uses": 5}),
                "web_search",
            ),
            (json!({"type": "bash_20250124", "name": "bash"}), "bash"),
        ] {
            let body = json!({"model": "m", "max_tokens": 5, "tools": [tool],
                              "messages": [{"role": "user", "content": "x"}]});
            let (code, _, msg) =
                err_of(AnthropicMessages.decode_request(body.to_string().as_bytes()));
            assert_eq!(code, "unsupported_tool");
            assert!(msg.contains(name), "{msg}");
        }
        let (code, _, _) = err_of(AnthropicMessages.decode_request(b"{"));
        assert_eq!(code, "invalid_json");
    }

    #[test]
    fn error_types_follow_the_status() {
        for (status, t) in [
            (400, "invalid_request_error"),
            (413, "invalid_request_error"),
            (401, "authentication_error"),
            (403, "permission_error"),
            (404, "not_found_error"),
            (429, "rate_limit_error"),
            (402, "rate_limit_error"),
            (500, "api_error"),
            (502, "api_error"),
            (503, "overloaded_error"),
            (529, "overloaded_error"),
        ] {
            assert_eq!(error_type(status), t, "{status}");
        }
        let e = UpstreamError {
            status: 429,
            kind: "insufficient_quota".into(),
            message: "Your balance is exhausted.".into(),
            code: Some("insufficient_quota".into()),
        };
        let v: Value =
            serde_json::from_slice(&AnthropicMessages.error_body(429, &e)).expect("json");
        assert_eq!(
            v,
            json!({"type": "error", "error": {"type": "rate_limit_error", "message": "Your balance is exhausted."}})
        );
    }

    #[test]
    fn response_encodes() {
        let resp = ChatResponse {
            id: "chatcmpl-1".into(),
            model: "upstream".into(),
            choices: vec![crate::pivot::Choice {
                index: 0,
                message: Message {
                    role: Role::Assistant,
                    content: Some(Content::Text("Sunny.".into())),
                    reasoning_content: Some("think".into()),
                    reasoning_blocks: vec![ReasoningBlock {
                        kind: "thinking".into(),
                        text: Some("think".into()),
                        signature: Some("sig".into()),
                        ..ReasoningBlock::default()
                    }],
                    tool_calls: vec![
                        ToolCall {
                            id: "call_1".into(),
                            kind: "function".into(),
                            function: FunctionCall {
                                name: "f".into(),
                                arguments: r#"{"a":1}"#.into(),
                            },
                        },
                        ToolCall {
                            id: "call_2".into(),
                            kind: "function".into(),
                            function: FunctionCall {
                                name: "g".into(),
                                arguments: "{not json".into(),
                            },
                        },
                    ],
                    ..Message::default()
                },
                finish_reason: Some("tool_calls".into()),
                logprobs: None,
            }],
            usage: Some(WireUsage::from(Usage {
                prompt: 100,
                completion: 7,
                cached: 60,
                cache_write: 10,
                reasoning: 0,
            })),
            ..ChatResponse::default()
        };
        let ctx = EncodeCtx {
            client_model: "mine".into(),
            ..EncodeCtx::default()
        };
        let v: Value =
            serde_json::from_slice(&AnthropicMessages.encode_response(&resp, &ctx)).expect("json");
        assert!(v["id"].as_str().expect("id").starts_with("msg_"));
        assert_eq!(v["type"], "message");
        assert_eq!(v["role"], "assistant");
        assert_eq!(v["model"], "mine");
        assert_eq!(v["stop_reason"], "tool_use");
        assert_eq!(v["stop_sequence"], Value::Null);
        assert_eq!(
            v["content"],
            json!([
                {"type": "thinking", "thinking": "think", "signature": "sig"},
                {"type": "text", "text": "Sunny."},
                {"type": "tool_use", "id": "call_1", "name": "f", "input": {"a": 1}},
                {"type": "tool_use", "id": "call_2", "name": "g", "input": {}},
            ])
        );
        assert_eq!(
            v["usage"],
            json!({"input_tokens": 30, "cache_read_input_tokens": 60,
                   "cache_creation_input_tokens": 10, "output_tokens": 7})
        );
        let ctx = EncodeCtx {
            id: Some("msg_given".into()),
            ..ctx
        };
        let v: Value =
            serde_json::from_slice(&AnthropicMessages.encode_response(&resp, &ctx)).expect("json");
        assert_eq!(v["id"], "msg_given");
    }

    fn chunk(delta: Delta, finish: Option<&str>) -> ChatChunk {
        ChatChunk {
            choices: vec![ChunkChoice {
                index: 0,
                delta,
                finish_reason: finish.map(str::to_owned),
                logprobs: None,
            }],
            ..ChatChunk::default()
        }
    }

    #[test]
    fn stream_opens_at_once_and_closes_blocks_in_order() {
        let mut e = AnthropicMessages.stream_encoder(&EncodeCtx {
            client_model: "mine".into(),
            id: Some("msg_x".into()),
            ..EncodeCtx::default()
        });
        let mut out = BytesMut::new();
        e.start(&mut out);
        let f = frames(&out);
        assert_eq!(f.len(), 1, "message_start before any upstream byte");
        assert_eq!(f[0].0, "message_start");
        assert_eq!(f[0].1["message"]["id"], "msg_x");
        assert_eq!(f[0].1["message"]["model"], "mine");
        assert_eq!(f[0].1["message"]["usage"]["input_tokens"], 0);
        out.clear();
        e.chunk(
            &chunk(
                Delta {
                    reasoning_content: Some("hm".into()),
                    ..Delta::default()
                },
                None,
            ),
            &mut out,
        );
        e.chunk(
            &chunk(
                Delta {
                    reasoning_blocks: vec![ReasoningBlock {
                        kind: "thinking".into(),
                        signature: Some("sig".into()),
                        ..ReasoningBlock::default()
                    }],
                    ..Delta::default()
                },
                None,
            ),
            &mut out,
        );
        e.chunk(
            &chunk(
                Delta {
                    content: Some("Hi".into()),
                    ..Delta::default()
                },
                None,
            ),
            &mut out,
        );
        for (i, id, name, args) in [
            (0, Some("c0"), Some("f"), "{\"a\""),
            (0, None, None, ":1}"),
            (1, Some("c1"), Some("g"), "{}"),
        ] {
            e.chunk(
                &chunk(
                    Delta {
                        tool_calls: vec![ToolCallDelta {
                            index: i,
                            id: id.map(str::to_owned),
                            kind: None,
                            function: FunctionDelta {
                                name: name.map(str::to_owned),
                                arguments: Some(args.into()),
                            },
                        }],
                        ..Delta::default()
                    },
                    None,
                ),
                &mut out,
            );
        }
        e.chunk(&chunk(Delta::default(), Some("tool_calls")), &mut out);
        e.finish(
            Some(Usage {
                prompt: 50,
                completion: 9,
                cached: 20,
                cache_write: 0,
                reasoning: 0,
            }),
            &mut out,
        );
        let f = frames(&out);
        let names: Vec<&str> = f.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop",
            ]
        );
        assert_eq!(f[0].1["content_block"]["type"], "thinking");
        assert_eq!(
            f[1].1["delta"],
            json!({"type": "thinking_delta", "thinking": "hm"})
        );
        assert_eq!(
            f[2].1["delta"],
            json!({"type": "signature_delta", "signature": "sig"})
        );
        assert_eq!(f[4].1["index"], 1);
        assert_eq!(f[5].1["delta"], json!({"type": "text_delta", "text": "Hi"}));
        assert_eq!(
            f[7].1["content_block"],
            json!({"type": "tool_use", "id": "c0", "name": "f", "input": {}})
        );
        assert_eq!(
            f[9].1["delta"],
            json!({"type": "input_json_delta", "partial_json": ":1}"})
        );
        assert_eq!(f[11].1["index"], 3);
        assert_eq!(f[14].1["delta"]["stop_reason"], "tool_use");
        assert_eq!(
            f[14].1["usage"],
            json!({"input_tokens": 30, "cache_read_input_tokens": 20,
                   "cache_creation_input_tokens": 0, "output_tokens": 9})
        );
    }

    #[test]
    fn stream_failure_is_an_error_event() {
        let mut e = AnthropicMessages.stream_encoder(&EncodeCtx::default());
        let mut out = BytesMut::new();
        e.start(&mut out);
        out.clear();
        e.fail(
            &UpstreamError {
                status: 503,
                kind: "overloaded_error".into(),
                message: "Overloaded".into(),
                code: None,
            },
            &mut out,
        );
        let f = frames(&out);
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].0, "error");
        assert_eq!(
            f[0].1,
            json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
        );
    }
}
