//! Anthropic's Messages API as an upstream: the pivot (OpenAI chat) encoded into a Messages
//! request, and its answers, streams, usage and errors decoded back. Also the usage readers of the
//! pass-through (an Anthropic client to an `anthropic` provider), where nothing else is parsed.
//!
//! Usage (API.md §10): prompt = `input_tokens + cache_read_input_tokens +
//! cache_creation_input_tokens`, cached = `cache_read_input_tokens`, cache-write =
//! `cache_creation_input_tokens`, completion = `output_tokens`. In a stream, `message_start`
//! carries the input side and `message_delta` the running totals: every count is cumulative, so
//! the last value of each field wins and nothing is ever summed; a field `message_delta` omits
//! keeps the value `message_start` gave.

use std::collections::HashMap;

use http::{HeaderMap, HeaderName, HeaderValue};
use serde::{Deserialize, Deserializer};
use serde_json::{Map, Value, json};

use super::{ChunkDecoder, Operation, StreamFault, Target, Translator, Usage, scan};
use crate::error::ApiError;
use crate::pivot::{
    ChatChunk, ChatRequest, ChatResponse, Choice, ChunkChoice, Content, Delta, FunctionCall,
    FunctionDelta, Message, Part, ReasoningBlock, Role, ToolCall, ToolCallDelta, UpstreamError,
    WireUsage as PivotUsage,
};
use crate::proxy::stream::{EventTooLarge, SseScanner};

/// The `anthropic-version` every request carries.
pub const API_VERSION: &str = "2023-06-01";

pub struct Anthropic;

// ---- usage ----

/// A token count as an upstream wrote it: a negative, fractional or absurd number is no count.
fn count<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    Ok(match Option::<Value>::deserialize(d)? {
        Some(Value::Number(n)) => n
            .as_i64()
            .or_else(|| n.as_u64().map(|_| i64::MAX))
            .map(|v| v.max(0)),
        _ => None,
    })
}

/// Anthropic's `usage` object; every field optional (a `message_delta` may carry only
/// `output_tokens`).
#[derive(Debug, Clone, Copy, Default, Deserialize)]
struct WireUsage {
    #[serde(default, deserialize_with = "count")]
    input_tokens: Option<i64>,
    #[serde(default, deserialize_with = "count")]
    output_tokens: Option<i64>,
    #[serde(default, deserialize_with = "count")]
    cache_read_input_tokens: Option<i64>,
    #[serde(default, deserialize_with = "count")]
    cache_creation_input_tokens: Option<i64>,
}

/// A usage object read leniently: `null`, not an object, or unreadable is none.
fn usage_value<'de, D: Deserializer<'de>>(d: D) -> Result<Option<WireUsage>, D::Error> {
    let v = Option::<Value>::deserialize(d)?;
    Ok(v.filter(Value::is_object)
        .and_then(|v| serde_json::from_value(v).ok()))
}

/// The running usage of one answer: each field is the last value reported.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct UsageAcc {
    seen: bool,
    input: i64,
    output: i64,
    cache_read: i64,
    cache_creation: i64,
}

impl UsageAcc {
    /// A later report: the fields it has replace the ones held (cumulative, never summed).
    fn update(&mut self, u: &WireUsage) {
        self.seen = true;
        if let Some(v) = u.input_tokens {
            self.input = v;
        }
        if let Some(v) = u.output_tokens {
            self.output = v;
        }
        if let Some(v) = u.cache_read_input_tokens {
            self.cache_read = v;
        }
        if let Some(v) = u.cache_creation_input_tokens {
            self.cache_creation = v;
        }
    }

    fn usage(&self) -> Option<Usage> {
        self.seen.then(|| Usage {
            prompt: self
                .input
                .saturating_add(self.cache_read)
                .saturating_add(self.cache_creation),
            completion: self.output,
            cached: self.cache_read,
            cache_write: self.cache_creation,
            reasoning: 0,
        })
    }
}

/// The usage of a complete (non-streamed) Messages answer, for the pass-through.
pub fn usage_of_message(body: &[u8]) -> Option<Usage> {
    let members = scan::top_level_members(body)?;
    let raw = members.iter().find(|m| m.is("usage"))?.value;
    if raw.trim_ascii_start().first() != Some(&b'{') {
        return None;
    }
    let u: WireUsage = serde_json::from_slice(raw).ok()?;
    let mut acc = UsageAcc::default();
    acc.update(&u);
    acc.usage()
}

/// `object` (a JSON object's text) with its top-level `model` member's value replaced by
/// `model_json`; `None` when it has no such member (or is not an object).
pub fn with_model(object: &[u8], model_json: &[u8]) -> Option<Vec<u8>> {
    let members = scan::top_level_members(object)?;
    let m = members.iter().find(|m| m.is("model"))?;
    let start = m.end - m.value.len();
    let mut out = Vec::with_capacity(object.len() + model_json.len());
    out.extend_from_slice(&object[..start]);
    out.extend_from_slice(model_json);
    out.extend_from_slice(&object[m.end..]);
    Some(out)
}

/// The usage of a relayed Messages stream, fed each event's `data` payload, for the
/// pass-through: `message_start`'s `message.usage`, then each `message_delta`'s `usage` (the last
/// value of each field wins). With a client model name, `message_start`'s `message.model` is
/// replaced by it (the client is told the model it asked for, not the upstream's name).
#[derive(Debug, Default)]
pub struct PassthroughUsage {
    acc: UsageAcc,
    /// The client's model name as a JSON string, until `message_start` has been renamed.
    rename_to: Option<Vec<u8>>,
    /// A terminal event (`message_stop`, or `error`) was seen.
    finished: bool,
}

impl PassthroughUsage {
    pub fn new() -> Self {
        Self::default()
    }

    /// A reader that also renames the model in `message_start` to `client_model`.
    pub fn renaming(client_model: &str) -> Self {
        Self {
            rename_to: Some(super::model_json(client_model)),
            ..Self::default()
        }
    }

    /// `data` with `message.model` renamed, for the one `message_start` event; `None` for every
    /// other event (and once renamed, without looking).
    pub fn rewrite(&mut self, data: &[u8]) -> Option<Vec<u8>> {
        let model = self.rename_to.as_deref()?;
        let members = scan::top_level_members(data)?;
        if members.iter().find(|m| m.is("type"))?.value != b"\"message_start\"" {
            return None;
        }
        let message = members.iter().find(|m| m.is("message"))?;
        let renamed = with_model(message.value, model)?;
        self.rename_to = None;
        let start = message.end - message.value.len();
        let mut out = Vec::with_capacity(data.len() + renamed.len());
        out.extend_from_slice(&data[..start]);
        out.extend_from_slice(&renamed);
        out.extend_from_slice(&data[message.end..]);
        Some(out)
    }

    /// One event's `data:` payload. Only `message_start` and `message_delta` are parsed beyond
    /// their `type`; the many `content_block_delta`s cost one scan of their top level.
    pub fn on_event(&mut self, data: &[u8]) {
        let Some(members) = scan::top_level_members(data) else {
            return;
        };
        let Some(kind) = members.iter().find(|m| m.is("type")) else {
            return;
        };
        let usage = match kind.value {
            b"\"message_start\"" => members
                .iter()
                .find(|m| m.is("message"))
                .and_then(|m| scan::top_level_members(m.value))
                .and_then(|inner| inner.iter().find(|m| m.is("usage")).map(|m| m.value)),
            b"\"message_delta\"" => members.iter().find(|m| m.is("usage")).map(|m| m.value),
            b"\"message_stop\"" | b"\"error\"" => {
                self.finished = true;
                None
            }
            _ => None,
        };
        if let Some(raw) = usage
            && raw.trim_ascii_start().first() == Some(&b'{')
            && let Ok(u) = serde_json::from_slice::<WireUsage>(raw)
        {
            self.acc.update(&u);
        }
    }

    /// What the stream reported so far (`None` before any usage).
    pub fn usage(&self) -> Option<Usage> {
        self.acc.usage()
    }

    /// The stream reached its terminal event (`message_stop`, or an `error` event).
    pub fn finished(&self) -> bool {
        self.finished
    }
}

// ---- answers ----

/// One content block of an answer (or of a stream's `content_block_start`).
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Block {
    Text {
        #[serde(default)]
        text: String,
    },
    Thinking {
        #[serde(default)]
        thinking: String,
        #[serde(default)]
        signature: Option<String>,
    },
    RedactedThinking {
        #[serde(default)]
        data: String,
    },
    ToolUse {
        #[serde(default)]
        id: String,
        #[serde(default)]
        name: String,
        #[serde(default)]
        input: Value,
    },
    /// Server tool calls and results, citations-only blocks, blocks added later: not carried.
    #[serde(other)]
    Other,
}

#[derive(Debug, Deserialize)]
struct WireMessage {
    #[serde(default)]
    id: String,
    #[serde(default)]
    model: String,
    #[serde(default)]
    content: Vec<Block>,
    #[serde(default)]
    stop_reason: Option<String>,
    #[serde(default, deserialize_with = "usage_value")]
    usage: Option<WireUsage>,
}

/// OpenAI's `finish_reason` for Anthropic's `stop_reason`.
pub fn finish_reason(stop_reason: &str) -> &'static str {
    match stop_reason {
        "max_tokens" | "model_context_window_exceeded" => "length",
        "tool_use" => "tool_calls",
        "refusal" => "content_filter",
        // end_turn, stop_sequence, pause_turn, and whatever comes later.
        _ => "stop",
    }
}

/// A tool call's input as OpenAI's `arguments` text.
fn arguments_of(input: &Value) -> String {
    match input {
        Value::Null => "{}".into(),
        v => serde_json::to_string(v).unwrap_or_else(|_| "{}".into()),
    }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(0))
        .unwrap_or(0)
}

fn malformed(what: impl std::fmt::Display) -> ApiError {
    ApiError::Upstream {
        status: http::StatusCode::BAD_GATEWAY,
        message: format!("The upstream's answer is not an Anthropic message: {what}"),
        code: "upstream_error",
    }
}

// ---- errors ----

#[derive(Deserialize)]
struct ErrorEnvelope {
    error: ErrorObj,
}

#[derive(Debug, Deserialize)]
struct ErrorObj {
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

/// The HTTP status an Anthropic error `type` goes with (for errors inside a stream).
fn status_of_kind(kind: &str) -> u16 {
    match kind {
        "invalid_request_error" => 400,
        "authentication_error" => 401,
        "billing_error" => 402,
        "permission_error" => 403,
        "not_found_error" => 404,
        "request_too_large" => 413,
        "rate_limit_error" => 429,
        "timeout_error" => 504,
        "overloaded_error" => 503,
        _ => 502,
    }
}

fn error_of(status: u16, obj: Option<ErrorObj>) -> UpstreamError {
    let overloaded = status == 529;
    let status = if overloaded { 503 } else { status };
    let (kind, message) = match obj {
        Some(o) => (o.kind, o.message),
        None => (None, None),
    };
    let kind = if overloaded {
        "overloaded_error".to_owned()
    } else {
        kind.filter(|k| !k.is_empty())
            .unwrap_or_else(|| UpstreamError::kind_for_status(status).to_owned())
    };
    UpstreamError {
        status,
        kind,
        message: message.unwrap_or_else(|| format!("The upstream answered {status}.")),
        code: None,
    }
}

// ---- requests ----

/// A 400 that names a parameter.
fn bad(param: impl Into<String>, code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::BadRequest {
        message: message.into(),
        code,
        param: Some(param.into()),
    }
}

/// Anthropic's `thinking` for OpenAI's `reasoning_effort`, when the client set no `thinking`:
/// `none`/`minimal` → no thinking; `low` → 1,024 budget tokens (Anthropic's minimum); `medium` →
/// 4,096; `high` → 16,384; `xhigh` → 32,768. The budget must stay below `max_tokens`: it is cut
/// to `max_tokens − 1`, and when that is under the minimum of 1,024 no thinking is asked for.
/// Nor is it when the request sets what Anthropic refuses beside thinking (a temperature other
/// than 1, `top_k`, a forced tool choice): the effort is a hint, the rest is what the client
/// asked for.
fn thinking_for_effort(effort: &str, max_tokens: u64) -> Option<Value> {
    let budget: u64 = match effort {
        "low" => 1024,
        "medium" => 4096,
        "high" => 16_384,
        "xhigh" => 32_768,
        _ => return None,
    };
    let budget = budget.min(max_tokens.saturating_sub(1));
    (budget >= 1024).then(|| json!({"type": "enabled", "budget_tokens": budget}))
}

/// An image part as an Anthropic image block.
fn image_block(url: &crate::pivot::ImageUrl) -> Value {
    match url.as_data() {
        Some((media_type, data)) => json!({
            "type": "image",
            "source": {"type": "base64", "media_type": media_type, "data": data},
        }),
        None => json!({"type": "image", "source": {"type": "url", "url": url.url}}),
    }
}

fn with_cache_control(mut block: Value, cc: Option<&Value>) -> Value {
    if let (Some(cc), Some(o)) = (cc, block.as_object_mut()) {
        o.insert("cache_control".into(), cc.clone());
    }
    block
}

/// A message's content parts as Anthropic content blocks (text, images, PDF files).
fn part_blocks(content: Option<&Content>, param: &str) -> Result<Vec<Value>, ApiError> {
    let mut out = Vec::new();
    match content {
        None => {}
        Some(Content::Text(t)) if t.is_empty() => {}
        Some(Content::Text(t)) => out.push(json!({"type": "text", "text": t})),
        Some(Content::Parts(parts)) => {
            for (i, p) in parts.iter().enumerate() {
                if let Some(b) = part_block(p, &format!("{param}[{i}]"))? {
                    out.push(b);
                }
            }
        }
    }
    Ok(out)
}

fn part_block(p: &Part, param: &str) -> Result<Option<Value>, ApiError> {
    let block = match p.kind.as_str() {
        "text" | "refusal" => {
            let text = p
                .text
                .as_deref()
                .or_else(|| p.extra.get("refusal").and_then(Value::as_str))
                .unwrap_or("");
            if text.is_empty() {
                return Ok(None);
            }
            json!({"type": "text", "text": text})
        }
        "image_url" => match &p.image_url {
            Some(url) => image_block(url),
            None => return Err(bad(param, "invalid_value", "An image_url part has no URL.")),
        },
        "file" => {
            let data_url = p
                .extra
                .get("file")
                .and_then(|f| f.get("file_data"))
                .and_then(Value::as_str)
                .unwrap_or("");
            let url = crate::pivot::ImageUrl {
                url: data_url.to_owned(),
                detail: None,
            };
            match url.as_data() {
                Some(("application/pdf", data)) => json!({
                    "type": "document",
                    "source": {"type": "base64", "media_type": "application/pdf", "data": data},
                }),
                _ => {
                    return Err(bad(
                        param,
                        "invalid_value",
                        "Anthropic takes files as inline PDF data (file_data: data:application/pdf;base64,…) only.",
                    ));
                }
            }
        }
        other => {
            return Err(bad(
                param,
                "invalid_value",
                format!("Anthropic does not take content parts of type '{other}'."),
            ));
        }
    };
    Ok(Some(with_cache_control(block, p.cache_control.as_ref())))
}

/// The Messages API's `tool_choice` for OpenAI's.
fn tool_choice(choice: &Value, parallel: Option<bool>) -> Result<Option<Value>, ApiError> {
    let mut out = match choice {
        Value::String(s) => match s.as_str() {
            "auto" => json!({"type": "auto"}),
            "required" => json!({"type": "any"}),
            "none" => json!({"type": "none"}),
            other => {
                return Err(bad(
                    "tool_choice",
                    "invalid_value",
                    format!("Unknown tool_choice '{other}'."),
                ));
            }
        },
        Value::Object(o) => {
            let name = o
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str);
            match (o.get("type").and_then(Value::as_str), name) {
                (Some("function"), Some(name)) => json!({"type": "tool", "name": name}),
                _ => {
                    return Err(bad(
                        "tool_choice",
                        "invalid_value",
                        "Anthropic takes tool_choice auto, required, none or one function.",
                    ));
                }
            }
        }
        Value::Null => return Ok(None),
        _ => {
            return Err(bad(
                "tool_choice",
                "invalid_value",
                "tool_choice is a string or an object.",
            ));
        }
    };
    if parallel == Some(false)
        && out["type"] != "none"
        && let Some(o) = out.as_object_mut()
    {
        o.insert("disable_parallel_tool_use".into(), Value::Bool(true));
    }
    Ok(Some(out))
}

/// Appends `blocks` as a message of `role`, merged into the previous one when it has the same
/// role (the Messages API wants user and assistant turns to alternate).
fn push_turn(turns: &mut Vec<(&'static str, Vec<Value>)>, role: &'static str, blocks: Vec<Value>) {
    if blocks.is_empty() {
        return;
    }
    match turns.last_mut() {
        Some((r, b)) if *r == role => b.extend(blocks),
        _ => turns.push((role, blocks)),
    }
}

/// The Messages request for a pivot request, as a JSON object (model, max_tokens, …).
fn encode_request(req: &ChatRequest, t: &Target<'_>) -> Result<Map<String, Value>, ApiError> {
    if req.n.is_some_and(|n| n > 1) {
        return Err(ApiError::invalid_param(
            "n",
            "Anthropic returns one choice per request: n must be 1.",
        ));
    }
    let mut system: Vec<Value> = Vec::new();
    let mut turns: Vec<(&'static str, Vec<Value>)> = Vec::new();
    for (i, m) in req.messages.iter().enumerate() {
        let param = format!("messages[{i}].content");
        match m.role {
            Role::System | Role::Developer => {
                for b in part_blocks(m.content.as_ref(), &param)? {
                    if b["type"] != "text" {
                        return Err(bad(
                            param,
                            "invalid_value",
                            "A system message takes text only.",
                        ));
                    }
                    system.push(b);
                }
            }
            Role::User => {
                let blocks = part_blocks(m.content.as_ref(), &param)?;
                push_turn(&mut turns, "user", blocks);
            }
            Role::Tool | Role::Function => {
                let id = m
                    .tool_call_id
                    .clone()
                    .or_else(|| m.name.clone())
                    .unwrap_or_default();
                let content = match &m.content {
                    Some(Content::Text(t)) => Value::String(t.clone()),
                    other => Value::Array(part_blocks(other.as_ref(), &param)?),
                };
                let mut block =
                    json!({"type": "tool_result", "tool_use_id": id, "content": content});
                if m.extra.get("is_error") == Some(&Value::Bool(true)) {
                    block["is_error"] = Value::Bool(true);
                }
                push_turn(&mut turns, "user", vec![block]);
            }
            Role::Assistant => {
                let mut blocks = Vec::new();
                for r in &m.reasoning_blocks {
                    match r.kind.as_str() {
                        // A thinking block goes back only with its signature (Anthropic checks it).
                        "thinking" => {
                            if let Some(sig) = r.signature.as_deref().filter(|s| !s.is_empty()) {
                                blocks.push(json!({
                                    "type": "thinking",
                                    "thinking": r.text.as_deref().unwrap_or(""),
                                    "signature": sig,
                                }));
                            }
                        }
                        "redacted_thinking" => {
                            if let Some(data) = &r.data {
                                blocks.push(json!({"type": "redacted_thinking", "data": data}));
                            }
                        }
                        // Other providers' reasoning (encrypted, thought signatures) means nothing here.
                        _ => {}
                    }
                }
                blocks.extend(part_blocks(m.content.as_ref(), &param)?);
                for (j, c) in m.tool_calls.iter().enumerate() {
                    let args = c.function.arguments.trim();
                    let input = if args.is_empty() {
                        Value::Object(Map::new())
                    } else {
                        match serde_json::from_str::<Value>(args) {
                            Ok(v @ Value::Object(_)) => v,
                            _ => {
                                return Err(bad(
                                    format!("messages[{i}].tool_calls[{j}].function.arguments"),
                                    "invalid_value",
                                    format!(
                                        "The arguments of tool call '{}' ({}) are not a JSON object.",
                                        c.id, c.function.name
                                    ),
                                ));
                            }
                        }
                    };
                    blocks.push(json!({
                        "type": "tool_use",
                        "id": c.id,
                        "name": c.function.name,
                        "input": input,
                    }));
                }
                push_turn(&mut turns, "assistant", blocks);
            }
        }
    }
    // In a user turn, tool results come first (the Messages API requires it).
    let messages: Vec<Value> = turns
        .into_iter()
        .map(|(role, mut blocks)| {
            if role == "user" {
                blocks.sort_by_key(|b| b["type"] != "tool_result");
            }
            json!({"role": role, "content": blocks})
        })
        .collect();

    let max_tokens = req.max_output().unwrap_or(t.default_max_tokens);
    let mut out = Map::new();
    out.insert("model".into(), t.upstream_model.into());
    out.insert("max_tokens".into(), max_tokens.into());
    if !system.is_empty() {
        out.insert("system".into(), Value::Array(system));
    }
    out.insert("messages".into(), Value::Array(messages));
    if !req.stop.is_empty() {
        out.insert("stop_sequences".into(), json!(req.stop));
    }
    if let Some(v) = req.temperature {
        out.insert("temperature".into(), json!(v));
    }
    if let Some(v) = req.top_p {
        out.insert("top_p".into(), json!(v));
    }
    if let Some(v) = req.extra.get("top_k") {
        out.insert("top_k".into(), v.clone());
    }
    if !req.tools.is_empty() {
        let mut tools = Vec::with_capacity(req.tools.len());
        for (i, tool) in req.tools.iter().enumerate() {
            let f = match (&tool.function, tool.kind.as_str()) {
                (Some(f), "function") => f,
                _ => {
                    let name = tool
                        .function
                        .as_ref()
                        .map_or(tool.kind.as_str(), |f| f.name.as_str());
                    return Err(bad(
                        format!("tools[{i}]"),
                        "unsupported_tool",
                        format!(
                            "Anthropic cannot serve the tool '{name}' (type '{}'): only function tools are translated.",
                            tool.kind
                        ),
                    ));
                }
            };
            let mut def = Map::new();
            def.insert("name".into(), f.name.clone().into());
            if let Some(d) = &f.description {
                def.insert("description".into(), d.clone().into());
            }
            def.insert(
                "input_schema".into(),
                f.parameters
                    .clone()
                    .unwrap_or_else(|| json!({"type": "object", "properties": {}})),
            );
            if f.strict == Some(true) {
                def.insert("strict".into(), Value::Bool(true));
            }
            if let Some(cc) = &tool.cache_control {
                def.insert("cache_control".into(), cc.clone());
            }
            tools.push(Value::Object(def));
        }
        out.insert("tools".into(), Value::Array(tools));
        if let Some(choice) = &req.tool_choice {
            if let Some(c) = tool_choice(choice, req.parallel_tool_calls)? {
                out.insert("tool_choice".into(), c);
            }
        } else if req.parallel_tool_calls == Some(false) {
            out.insert(
                "tool_choice".into(),
                json!({"type": "auto", "disable_parallel_tool_use": true}),
            );
        }
    }
    if let Some(user) = &req.user {
        out.insert("metadata".into(), json!({"user_id": user}));
    }
    match (&req.thinking, &req.reasoning_effort) {
        (Some(th), _) => {
            out.insert("thinking".into(), th.clone());
        }
        (None, Some(effort)) => {
            let forced = out
                .get("tool_choice")
                .is_some_and(|c| c["type"] == "any" || c["type"] == "tool");
            let compatible =
                req.temperature.is_none_or(|t| t == 1.0) && !out.contains_key("top_k") && !forced;
            if compatible && let Some(th) = thinking_for_effort(effort, max_tokens) {
                out.insert("thinking".into(), th);
            }
        }
        (None, None) => {}
    }
    if let Some(rf) = &req.response_format {
        match rf.get("type").and_then(Value::as_str) {
            None | Some("text") => {}
            Some("json_schema") => {
                let Some(schema) = rf.get("json_schema").and_then(|j| j.get("schema")) else {
                    return Err(bad(
                        "response_format",
                        "invalid_value",
                        "response_format json_schema needs json_schema.schema.",
                    ));
                };
                out.insert(
                    "output_config".into(),
                    json!({"format": {"type": "json_schema", "schema": schema}}),
                );
            }
            Some(other) => {
                return Err(bad(
                    "response_format",
                    "invalid_value",
                    format!(
                        "Anthropic has no response_format '{other}': it takes structured output with a schema (json_schema) only."
                    ),
                ));
            }
        }
    }
    if req.stream {
        out.insert("stream".into(), Value::Bool(true));
    }
    Ok(out)
}

/// The body of `/messages/count_tokens` for a pivot request: the Messages request without the
/// fields that endpoint does not take.
pub fn encode_count_tokens(req: &ChatRequest, t: &Target<'_>) -> Result<Vec<u8>, ApiError> {
    let mut out = encode_request(req, t)?;
    for k in [
        "max_tokens",
        "stream",
        "stop_sequences",
        "temperature",
        "top_p",
        "top_k",
        "metadata",
    ] {
        out.remove(k);
    }
    serde_json::to_vec(&out).map_err(ApiError::internal)
}

impl Translator for Anthropic {
    fn url(&self, t: &Target<'_>, op: Operation, _stream: bool) -> Result<String, ApiError> {
        let path = match op {
            Operation::Chat => "/messages",
            Operation::CountTokens => "/messages/count_tokens",
            Operation::Embeddings => {
                return Err(ApiError::bad_request(
                    "unsupported_operation",
                    "Anthropic has no embeddings API.",
                ));
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
        let mut key = HeaderValue::from_str(provider_key).map_err(|_| {
            ApiError::bad_request(
                "invalid_provider_key",
                "The provider key cannot be sent as a header.",
            )
        })?;
        key.set_sensitive(true);
        headers.insert(HeaderName::from_static("x-api-key"), key);
        headers.insert(
            HeaderName::from_static("anthropic-version"),
            HeaderValue::from_static(API_VERSION),
        );
        Ok(())
    }

    fn encode_chat(&self, req: &ChatRequest, t: &Target<'_>) -> Result<Vec<u8>, ApiError> {
        serde_json::to_vec(&encode_request(req, t)?).map_err(ApiError::internal)
    }

    fn decode_chat(&self, body: &[u8], _t: &Target<'_>) -> Result<ChatResponse, ApiError> {
        let m: WireMessage = serde_json::from_slice(body).map_err(malformed)?;
        let mut text = String::new();
        let mut reasoning = String::new();
        let mut blocks = Vec::new();
        let mut calls = Vec::new();
        for b in m.content {
            match b {
                Block::Text { text: t } => text.push_str(&t),
                Block::Thinking {
                    thinking,
                    signature,
                } => {
                    reasoning.push_str(&thinking);
                    blocks.push(ReasoningBlock {
                        kind: "thinking".into(),
                        text: Some(thinking),
                        signature,
                        ..ReasoningBlock::default()
                    });
                }
                Block::RedactedThinking { data } => blocks.push(ReasoningBlock {
                    kind: "redacted_thinking".into(),
                    data: Some(data),
                    ..ReasoningBlock::default()
                }),
                Block::ToolUse { id, name, input } => calls.push(ToolCall {
                    id,
                    kind: "function".into(),
                    function: FunctionCall {
                        name,
                        arguments: arguments_of(&input),
                    },
                }),
                Block::Other => {}
            }
        }
        let content = (!text.is_empty() || calls.is_empty()).then_some(Content::Text(text));
        let message = Message {
            role: Role::Assistant,
            content,
            tool_calls: calls,
            reasoning_content: (!reasoning.is_empty()).then_some(reasoning),
            reasoning_blocks: blocks,
            ..Message::default()
        };
        let usage = m.usage.and_then(|u| {
            let mut acc = UsageAcc::default();
            acc.update(&u);
            acc.usage()
        });
        Ok(ChatResponse {
            id: m.id,
            object: "chat.completion".into(),
            created: now(),
            model: m.model,
            choices: vec![Choice {
                index: 0,
                message,
                finish_reason: Some(
                    finish_reason(m.stop_reason.as_deref().unwrap_or("end_turn")).to_owned(),
                ),
                logprobs: None,
            }],
            usage: usage.map(PivotUsage::from),
            ..ChatResponse::default()
        })
    }

    fn usage_of_answer(&self, body: &[u8]) -> Option<Usage> {
        usage_of_message(body)
    }

    fn chat_stream(&self, _t: &Target<'_>, max_event_bytes: usize) -> Box<dyn ChunkDecoder> {
        Box::new(MessageStream::new(max_event_bytes))
    }

    fn decode_error(&self, status: u16, body: &[u8]) -> UpstreamError {
        error_of(
            status,
            serde_json::from_slice::<ErrorEnvelope>(body)
                .ok()
                .map(|e| e.error),
        )
    }
}

// ---- streams ----

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Event {
    MessageStart {
        message: StartMessage,
    },
    ContentBlockStart {
        index: u64,
        content_block: Block,
    },
    ContentBlockDelta {
        index: u64,
        delta: BlockDelta,
    },
    ContentBlockStop {
        index: u64,
    },
    MessageDelta {
        #[serde(default)]
        delta: MessageDeltaBody,
        #[serde(default, deserialize_with = "usage_value")]
        usage: Option<WireUsage>,
    },
    MessageStop,
    Ping,
    Error {
        error: ErrorObj,
    },
    /// Events added to the API later are ignored, as Anthropic asks of clients.
    #[serde(other)]
    Unknown,
}

#[derive(Debug, Deserialize)]
struct StartMessage {
    #[serde(default)]
    id: String,
    #[serde(default)]
    model: String,
    #[serde(default, deserialize_with = "usage_value")]
    usage: Option<WireUsage>,
}

#[derive(Debug, Default, Deserialize)]
struct MessageDeltaBody {
    #[serde(default)]
    stop_reason: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum BlockDelta {
    TextDelta {
        #[serde(default)]
        text: String,
    },
    InputJsonDelta {
        #[serde(default)]
        partial_json: String,
    },
    ThinkingDelta {
        #[serde(default)]
        thinking: String,
    },
    SignatureDelta {
        #[serde(default)]
        signature: String,
    },
    /// `citations_delta` and later kinds.
    #[serde(other)]
    Other,
}

/// What an open content block is, by its Anthropic index.
#[derive(Debug, Clone, Copy)]
enum Open {
    Text,
    Thinking,
    /// A `tool_use` block and the OpenAI tool-call index it was given.
    Tool(u32),
    Other,
}

/// An Anthropic Messages stream, decoded into pivot chunks.
struct MessageStream {
    scanner: SseScanner,
    id: String,
    model: String,
    created: i64,
    /// Blocks started and not yet stopped.
    open: HashMap<u64, Open>,
    /// The next OpenAI tool-call index (tool_use blocks in order: 0, 1, 2, …).
    next_tool: u32,
    usage: UsageAcc,
    done: bool,
}

impl MessageStream {
    fn new(max_event_bytes: usize) -> Self {
        Self {
            scanner: SseScanner::new(max_event_bytes),
            id: String::new(),
            model: String::new(),
            created: now(),
            open: HashMap::new(),
            next_tool: 0,
            usage: UsageAcc::default(),
            done: false,
        }
    }

    fn chunk(&self, delta: Delta, finish_reason: Option<String>) -> ChatChunk {
        ChatChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk".into(),
            created: self.created,
            model: self.model.clone(),
            choices: vec![ChunkChoice {
                index: 0,
                delta,
                finish_reason,
                logprobs: None,
            }],
            usage: None,
            system_fingerprint: None,
        }
    }

    fn event(&mut self, data: &[u8], out: &mut Vec<ChatChunk>) -> Result<(), StreamFault> {
        let ev: Event = serde_json::from_slice(data).map_err(|e| {
            StreamFault::Malformed(format!("an event that is not Anthropic's: {e}"))
        })?;
        match ev {
            Event::MessageStart { message } => {
                self.id = message.id;
                self.model = message.model;
                if let Some(u) = message.usage {
                    self.usage.update(&u);
                }
                out.push(self.chunk(
                    Delta {
                        role: Some(Role::Assistant),
                        content: Some(String::new()),
                        ..Delta::default()
                    },
                    None,
                ));
            }
            Event::ContentBlockStart {
                index,
                content_block,
            } => {
                let (open, delta) = match content_block {
                    Block::Text { text } => (
                        Open::Text,
                        (!text.is_empty()).then(|| Delta {
                            content: Some(text),
                            ..Delta::default()
                        }),
                    ),
                    Block::Thinking {
                        thinking,
                        signature,
                    } => {
                        let mut d = Delta::default();
                        if !thinking.is_empty() {
                            d.reasoning_content = Some(thinking);
                        }
                        if let Some(sig) = signature.filter(|s| !s.is_empty()) {
                            d.reasoning_blocks.push(signature_block(sig));
                        }
                        let any = d.reasoning_content.is_some() || !d.reasoning_blocks.is_empty();
                        (Open::Thinking, any.then_some(d))
                    }
                    Block::RedactedThinking { data } => (
                        Open::Other,
                        Some(Delta {
                            reasoning_blocks: vec![ReasoningBlock {
                                kind: "redacted_thinking".into(),
                                data: Some(data),
                                ..ReasoningBlock::default()
                            }],
                            ..Delta::default()
                        }),
                    ),
                    Block::ToolUse { id, name, input } => {
                        let at = self.next_tool;
                        self.next_tool = self.next_tool.saturating_add(1);
                        // The input arrives as `input_json_delta`s; a start with a non-empty
                        // input (not what the API sends today) is passed on as the first piece.
                        let first = match &input {
                            Value::Object(o) if !o.is_empty() => arguments_of(&input),
                            _ => String::new(),
                        };
                        (
                            Open::Tool(at),
                            Some(Delta {
                                tool_calls: vec![ToolCallDelta {
                                    index: at,
                                    id: Some(id),
                                    kind: Some("function".into()),
                                    function: FunctionDelta {
                                        name: Some(name),
                                        arguments: Some(first),
                                    },
                                }],
                                ..Delta::default()
                            }),
                        )
                    }
                    Block::Other => (Open::Other, None),
                };
                self.open.insert(index, open);
                if let Some(d) = delta {
                    out.push(self.chunk(d, None));
                }
            }
            Event::ContentBlockDelta { index, delta } => {
                let open = self.open.get(&index).copied().unwrap_or(Open::Other);
                let d = match (delta, open) {
                    (BlockDelta::TextDelta { text }, _) => Delta {
                        content: Some(text),
                        ..Delta::default()
                    },
                    (BlockDelta::ThinkingDelta { thinking }, _) => Delta {
                        reasoning_content: Some(thinking),
                        ..Delta::default()
                    },
                    (BlockDelta::SignatureDelta { signature }, _) => Delta {
                        reasoning_blocks: vec![signature_block(signature)],
                        ..Delta::default()
                    },
                    (BlockDelta::InputJsonDelta { partial_json }, Open::Tool(at)) => Delta {
                        tool_calls: vec![ToolCallDelta {
                            index: at,
                            function: FunctionDelta {
                                name: None,
                                arguments: Some(partial_json),
                            },
                            ..ToolCallDelta::default()
                        }],
                        ..Delta::default()
                    },
                    // Input of a server tool call, citations, later kinds: not carried.
                    _ => return Ok(()),
                };
                out.push(self.chunk(d, None));
            }
            Event::ContentBlockStop { index } => {
                self.open.remove(&index);
            }
            Event::MessageDelta { delta, usage } => {
                if let Some(u) = usage {
                    self.usage.update(&u);
                }
                if let Some(r) = delta.stop_reason {
                    out.push(self.chunk(Delta::default(), Some(finish_reason(&r).to_owned())));
                }
            }
            Event::MessageStop => {
                self.done = true;
                if let Some(u) = self.usage.usage() {
                    out.push(ChatChunk {
                        id: self.id.clone(),
                        object: "chat.completion.chunk".into(),
                        created: self.created,
                        model: self.model.clone(),
                        choices: Vec::new(),
                        usage: Some(u.into()),
                        system_fingerprint: None,
                    });
                }
            }
            Event::Ping | Event::Unknown => {}
            Event::Error { error } => {
                let status = status_of_kind(error.kind.as_deref().unwrap_or(""));
                return Err(StreamFault::Upstream(error_of(status, Some(error))));
            }
        }
        Ok(())
    }
}

/// A thinking block's signature, arriving after its text.
fn signature_block(signature: String) -> ReasoningBlock {
    ReasoningBlock {
        kind: "thinking".into(),
        signature: Some(signature),
        ..ReasoningBlock::default()
    }
}

impl ChunkDecoder for MessageStream {
    fn push(&mut self, bytes: &[u8], out: &mut Vec<ChatChunk>) -> Result<(), StreamFault> {
        self.scanner.push(bytes);
        loop {
            match self.scanner.next_event() {
                Ok(Some(ev)) => {
                    if let Some(data) = ev.data
                        && !self.done
                    {
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
            && !self.done
        {
            self.event(&data, out)?;
        }
        if self.done {
            Ok(())
        } else {
            Err(StreamFault::Malformed(
                "the upstream ended the stream before message_stop".into(),
            ))
        }
    }

    fn usage(&self) -> Option<Usage> {
        self.usage.usage()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pivot::{FunctionDef, ImageUrl, Tool};

    const MESSAGE: &str = include_str!("../../tests/fixtures/anthropic/message.json");
    const STREAM: &str = include_str!("../../tests/fixtures/anthropic/stream.sse");
    const ERROR: &str = include_str!("../../tests/fixtures/anthropic/error.json");

    #[test]
    fn the_pass_through_renames_the_model_in_the_message_and_in_message_start_only() {
        let body =
            with_model(MESSAGE.as_bytes(), &super::super::model_json("mine")).expect("renamed");
        let v: Value = serde_json::from_slice(&body).expect("json");
        let orig: Value = serde_json::from_str(MESSAGE).expect("json");
        assert_eq!(v["model"], "mine");
        assert_eq!(v["content"], orig["content"], "nothing else changes");
        assert_eq!(v["usage"], orig["usage"]);
        assert!(with_model(b"[1]", b"\"x\"").is_none());

        let mut r = PassthroughUsage::renaming("a \"quoted\" name");
        let mut starts = 0;
        for line in STREAM.lines() {
            let Some(data) = line.strip_prefix("data: ") else {
                continue;
            };
            let out = r.rewrite(data.as_bytes());
            let kind = serde_json::from_str::<Value>(data).expect("json")["type"].clone();
            if kind == "message_start" {
                starts += 1;
                let v: Value = serde_json::from_slice(&out.expect("renamed")).expect("json");
                assert_eq!(v["message"]["model"], "a \"quoted\" name");
                assert!(v["message"]["usage"]["input_tokens"].as_i64().is_some());
            } else {
                assert!(out.is_none(), "{kind} untouched");
            }
            r.on_event(data.as_bytes());
        }
        assert_eq!(starts, 1);
        assert!(r.usage().is_some());
        // Without a name nothing is rewritten.
        assert!(
            PassthroughUsage::new()
                .rewrite(br#"{"type":"message_start","message":{"model":"m"}}"#)
                .is_none()
        );
    }

    fn target() -> Target<'static> {
        Target {
            base_url: "https://api.anthropic.com/v1/",
            upstream_model: "claude-up",
            api_version: None,
            region: None,
            default_max_tokens: 4096,
        }
    }

    fn encode(req: &ChatRequest) -> Value {
        let body = Anthropic.encode_chat(req, &target()).expect("encodes");
        serde_json::from_slice(&body).expect("json")
    }

    fn err_of(req: &ChatRequest) -> (String, Option<String>, String) {
        match Anthropic.encode_chat(req, &target()) {
            Err(ApiError::BadRequest {
                code,
                param,
                message,
            }) => (code.to_owned(), param, message),
            other => panic!("expected a 400, got {other:?}"),
        }
    }

    fn call(id: &str, name: &str, args: &str) -> ToolCall {
        ToolCall {
            id: id.into(),
            kind: "function".into(),
            function: FunctionCall {
                name: name.into(),
                arguments: args.into(),
            },
        }
    }

    #[test]
    fn url_and_headers() {
        let t = target();
        assert_eq!(
            Anthropic.url(&t, Operation::Chat, true).expect("url"),
            "https://api.anthropic.com/v1/messages"
        );
        assert_eq!(
            Anthropic
                .url(&t, Operation::CountTokens, false)
                .expect("url"),
            "https://api.anthropic.com/v1/messages/count_tokens"
        );
        assert!(Anthropic.url(&t, Operation::Embeddings, false).is_err());
        let mut h = HeaderMap::new();
        Anthropic
            .headers(&mut h, "sk-ant-secret", &t, "", b"")
            .expect("headers");
        let key = h.get("x-api-key").expect("key");
        assert_eq!(key, "sk-ant-secret");
        assert!(key.is_sensitive());
        assert_eq!(h.get("anthropic-version").expect("version"), API_VERSION);
        assert!(h.get("authorization").is_none());
    }

    #[test]
    fn messages_are_hoisted_merged_and_ordered() {
        let mut sys = Message::text(Role::System, "be brief");
        sys.content = Some(Content::Parts(vec![Part {
            cache_control: Some(json!({"type": "ephemeral"})),
            ..Part::text("be brief")
        }]));
        let req = ChatRequest {
            model: "mine".into(),
            messages: vec![
                sys,
                Message::text(Role::Developer, "and kind"),
                Message::text(Role::User, "hi"),
                Message {
                    role: Role::User,
                    content: Some(Content::Parts(vec![
                        Part::image("data:image/png;base64,AAAA"),
                        Part::image("https://x.test/a.jpg"),
                    ])),
                    ..Message::default()
                },
                Message {
                    role: Role::Assistant,
                    content: Some(Content::Text("calling".into())),
                    reasoning_blocks: vec![
                        ReasoningBlock {
                            kind: "thinking".into(),
                            text: Some("hmm".into()),
                            signature: Some("sig".into()),
                            ..ReasoningBlock::default()
                        },
                        ReasoningBlock {
                            kind: "redacted_thinking".into(),
                            data: Some("opaque".into()),
                            ..ReasoningBlock::default()
                        },
                        // Unsigned thinking and other providers' reasoning are not sent.
                        ReasoningBlock {
                            kind: "thinking".into(),
                            text: Some("unsigned".into()),
                            ..ReasoningBlock::default()
                        },
                        ReasoningBlock {
                            kind: "encrypted".into(),
                            data: Some("x".into()),
                            ..ReasoningBlock::default()
                        },
                    ],
                    tool_calls: vec![call("c1", "f", r#"{"a":1}"#), call("c2", "g", "")],
                    ..Message::default()
                },
                Message {
                    role: Role::Tool,
                    tool_call_id: Some("c1".into()),
                    content: Some(Content::Text("one".into())),
                    ..Message::default()
                },
                Message {
                    role: Role::Tool,
                    tool_call_id: Some("c2".into()),
                    content: Some(Content::Text("two".into())),
                    extra: [("is_error".to_owned(), Value::Bool(true))]
                        .into_iter()
                        .collect(),
                    ..Message::default()
                },
                Message::text(Role::User, "thanks"),
            ],
            ..ChatRequest::default()
        };
        let v = encode(&req);
        assert_eq!(v["model"], "claude-up");
        assert_eq!(v["max_tokens"], 4096);
        assert_eq!(
            v["system"],
            json!([
                {"type": "text", "text": "be brief", "cache_control": {"type": "ephemeral"}},
                {"type": "text", "text": "and kind"},
            ])
        );
        let msgs = v["messages"].as_array().expect("messages");
        assert_eq!(msgs.len(), 3, "{msgs:?}");
        assert_eq!(msgs[0]["role"], "user");
        assert_eq!(
            msgs[0]["content"],
            json!([
                {"type": "text", "text": "hi"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}},
                {"type": "image", "source": {"type": "url", "url": "https://x.test/a.jpg"}},
            ])
        );
        assert_eq!(
            msgs[1]["content"],
            json!([
                {"type": "thinking", "thinking": "hmm", "signature": "sig"},
                {"type": "redacted_thinking", "data": "opaque"},
                {"type": "text", "text": "calling"},
                {"type": "tool_use", "id": "c1", "name": "f", "input": {"a": 1}},
                {"type": "tool_use", "id": "c2", "name": "g", "input": {}},
            ])
        );
        assert_eq!(
            msgs[2]["content"],
            json!([
                {"type": "tool_result", "tool_use_id": "c1", "content": "one"},
                {"type": "tool_result", "tool_use_id": "c2", "content": "two", "is_error": true},
                {"type": "text", "text": "thanks"},
            ])
        );
        assert!(v.get("stream").is_none());
    }

    #[test]
    fn parameters_map() {
        let req = ChatRequest {
            model: "m".into(),
            messages: vec![Message::text(Role::User, "x")],
            max_completion_tokens: Some(777),
            stop: vec!["END".into()],
            temperature: Some(0.5),
            top_p: Some(0.9),
            user: Some("u-1".into()),
            stream: true,
            tools: vec![Tool {
                kind: "function".into(),
                function: Some(FunctionDef {
                    name: "f".into(),
                    description: Some("does f".into()),
                    parameters: Some(
                        json!({"type": "object", "properties": {"a": {"type": "string"}}}),
                    ),
                    strict: None,
                }),
                cache_control: Some(json!({"type": "ephemeral"})),
                extra: Map::new(),
            }],
            tool_choice: Some(json!({"type": "function", "function": {"name": "f"}})),
            parallel_tool_calls: Some(false),
            response_format: Some(
                json!({"type": "json_schema", "json_schema": {"name": "o", "schema": {"type": "object"}}}),
            ),
            extra: [("top_k".to_owned(), json!(5))].into_iter().collect(),
            ..ChatRequest::default()
        };
        let v = encode(&req);
        assert_eq!(v["max_tokens"], 777);
        assert_eq!(v["stop_sequences"], json!(["END"]));
        assert_eq!(v["temperature"], 0.5);
        assert_eq!(v["top_p"], 0.9);
        assert_eq!(v["top_k"], 5);
        assert_eq!(v["metadata"], json!({"user_id": "u-1"}));
        assert_eq!(v["stream"], true);
        assert_eq!(
            v["tools"],
            json!([{"name": "f", "description": "does f",
                    "input_schema": {"type": "object", "properties": {"a": {"type": "string"}}},
                    "cache_control": {"type": "ephemeral"}}])
        );
        assert_eq!(
            v["tool_choice"],
            json!({"type": "tool", "name": "f", "disable_parallel_tool_use": true})
        );
        assert_eq!(
            v["output_config"],
            json!({"format": {"type": "json_schema", "schema": {"type": "object"}}})
        );
        for (choice, want) in [("auto", "auto"), ("required", "any"), ("none", "none")] {
            let mut r = req.clone();
            r.tool_choice = Some(json!(choice));
            r.parallel_tool_calls = None;
            assert_eq!(encode(&r)["tool_choice"], json!({"type": want}));
        }
        // Without tools there is no tool_choice to send.
        let mut r = req.clone();
        r.tools.clear();
        assert!(encode(&r).get("tool_choice").is_none());
    }

    #[test]
    fn thinking_and_effort() {
        let base = ChatRequest {
            messages: vec![Message::text(Role::User, "x")],
            max_tokens: Some(8000),
            ..ChatRequest::default()
        };
        let mut r = base.clone();
        r.thinking = Some(json!({"type": "enabled", "budget_tokens": 2000}));
        r.reasoning_effort = Some("high".into());
        assert_eq!(encode(&r)["thinking"]["budget_tokens"], 2000);
        let mut r = base.clone();
        r.reasoning_effort = Some("medium".into());
        assert_eq!(
            encode(&r)["thinking"],
            json!({"type": "enabled", "budget_tokens": 4096})
        );
        r.reasoning_effort = Some("high".into());
        assert_eq!(encode(&r)["thinking"]["budget_tokens"], 7999);
        r.reasoning_effort = Some("minimal".into());
        assert!(encode(&r).get("thinking").is_none());
        r.reasoning_effort = Some("low".into());
        r.temperature = Some(0.2);
        assert!(
            encode(&r).get("thinking").is_none(),
            "temperature 0.2 and thinking conflict"
        );
        r.temperature = Some(1.0);
        assert_eq!(encode(&r)["thinking"]["budget_tokens"], 1024);
        r.max_tokens = Some(1000);
        assert!(encode(&r).get("thinking").is_none(), "no room for a budget");
    }

    #[test]
    fn what_anthropic_cannot_do_is_a_400_that_names_it() {
        let base = ChatRequest {
            messages: vec![Message::text(Role::User, "x")],
            ..ChatRequest::default()
        };
        let mut r = base.clone();
        r.n = Some(2);
        let (code, param, msg) = err_of(&r);
        assert_eq!(
            (code.as_str(), param.as_deref()),
            ("invalid_value", Some("n"))
        );
        assert!(msg.contains("one choice"), "{msg}");

        let mut r = base.clone();
        r.tools = vec![Tool {
            kind: "web_search".into(),
            ..Tool::default()
        }];
        let (code, _, msg) = err_of(&r);
        assert_eq!(code, "unsupported_tool");
        assert!(msg.contains("web_search"), "{msg}");

        let mut r = base.clone();
        r.messages.push(Message {
            role: Role::Assistant,
            tool_calls: vec![call("call_9", "f", "[1,2]")],
            ..Message::default()
        });
        let (code, param, msg) = err_of(&r);
        assert_eq!(code, "invalid_value");
        assert_eq!(
            param.as_deref(),
            Some("messages[1].tool_calls[0].function.arguments")
        );
        assert!(msg.contains("call_9"), "{msg}");

        let mut r = base.clone();
        r.response_format = Some(json!({"type": "json_object"}));
        let (_, param, msg) = err_of(&r);
        assert_eq!(param.as_deref(), Some("response_format"));
        assert!(msg.contains("json_object"), "{msg}");

        let mut r = base.clone();
        r.messages[0].content = Some(Content::Parts(vec![Part {
            kind: "input_audio".into(),
            ..Part::default()
        }]));
        let (_, _, msg) = err_of(&r);
        assert!(msg.contains("input_audio"), "{msg}");
    }

    #[test]
    fn count_tokens_body_drops_generation_fields() {
        let req = ChatRequest {
            messages: vec![Message::text(Role::User, "x")],
            stream: true,
            temperature: Some(1.0),
            ..ChatRequest::default()
        };
        let v: Value = serde_json::from_slice(&encode_count_tokens(&req, &target()).expect("body"))
            .expect("json");
        assert_eq!(v["model"], "claude-up");
        assert!(v.get("max_tokens").is_none() && v.get("stream").is_none());
        assert!(v.get("temperature").is_none());
        assert_eq!(v["messages"][0]["content"][0]["text"], "x");
    }

    #[test]
    fn message_decodes_with_thinking_tools_and_cache_usage() {
        let r = Anthropic
            .decode_chat(MESSAGE.as_bytes(), &target())
            .expect("decodes");
        assert_eq!(r.id, "msg_01Aq9w938a90dw8q");
        let c = &r.choices[0];
        assert_eq!(c.finish_reason.as_deref(), Some("tool_calls"));
        let m = &c.message;
        assert_eq!(
            m.text_content(),
            "I'll check the current weather in Paris for you."
        );
        assert!(
            m.reasoning_content
                .as_deref()
                .expect("reasoning")
                .starts_with("The user")
        );
        assert_eq!(m.reasoning_blocks.len(), 1);
        assert!(
            m.reasoning_blocks[0]
                .signature
                .as_deref()
                .expect("sig")
                .starts_with("EqQB")
        );
        assert_eq!(m.tool_calls[0].id, "toolu_01A09q90qw90lq917835lq9");
        assert_eq!(m.tool_calls[0].function.name, "get_weather");
        let args: Value = serde_json::from_str(&m.tool_calls[0].function.arguments).expect("json");
        assert_eq!(
            args,
            json!({"location": "Paris, France", "unit": "celsius"})
        );
        let u = Usage::from(r.usage.expect("usage"));
        assert_eq!(
            u,
            Usage {
                prompt: 472 + 2048 + 1024,
                completion: 89,
                cached: 2048,
                cache_write: 1024,
                reasoning: 0
            }
        );
        assert_eq!(usage_of_message(MESSAGE.as_bytes()), Some(u));
    }

    #[test]
    fn stop_reasons_map() {
        for (s, f) in [
            ("end_turn", "stop"),
            ("stop_sequence", "stop"),
            ("pause_turn", "stop"),
            ("max_tokens", "length"),
            ("tool_use", "tool_calls"),
            ("refusal", "content_filter"),
        ] {
            assert_eq!(finish_reason(s), f);
        }
    }

    #[test]
    fn hostile_usage_is_bounded() {
        let body = br#"{"id":"msg_1","content":[{"type":"text","text":"x"}],"usage":{"input_tokens":-5,"output_tokens":1.5,"cache_read_input_tokens":9223372036854775807,"cache_creation_input_tokens":18446744073709551615}}"#;
        let u = usage_of_message(body).expect("usage");
        assert_eq!(u.completion, 0);
        assert_eq!(u.cached, i64::MAX);
        assert_eq!(u.cache_write, i64::MAX);
        assert_eq!(u.prompt, i64::MAX, "saturates");
        let r = Anthropic.decode_chat(body, &target()).expect("decodes");
        assert_eq!(r.usage.expect("usage").prompt_tokens, i64::MAX);
        // Usage that is not an object is none.
        assert_eq!(usage_of_message(br#"{"usage":[1]}"#), None);
        assert!(Anthropic.decode_chat(b"not json", &target()).is_err());
    }

    fn decode_stream(bytes: &[u8]) -> (Vec<ChatChunk>, Result<(), StreamFault>, Option<Usage>) {
        let mut d = Anthropic.chat_stream(&target(), 1 << 20);
        let mut out = Vec::new();
        let r = d.push(bytes, &mut out).and_then(|()| d.finish(&mut out));
        (out, r, d.usage())
    }

    #[test]
    fn stream_decodes() {
        let (chunks, r, usage) = decode_stream(STREAM.as_bytes());
        r.expect("complete");
        assert!(
            chunks
                .iter()
                .all(|c| c.id == "msg_01WBeG2NaYQ8w99747S3n8MZ")
        );
        let deltas: Vec<&Delta> = chunks
            .iter()
            .flat_map(|c| c.choices.iter().map(|ch| &ch.delta))
            .collect();
        assert_eq!(deltas[0].role, Some(Role::Assistant));
        let reasoning: String = deltas
            .iter()
            .filter_map(|d| d.reasoning_content.as_deref())
            .collect();
        assert_eq!(
            reasoning,
            "The user is asking for the weather in Florence. I'll use the weather tool."
        );
        let sigs: Vec<&ReasoningBlock> = deltas.iter().flat_map(|d| &d.reasoning_blocks).collect();
        assert_eq!(sigs.len(), 1);
        assert!(
            sigs[0]
                .signature
                .as_deref()
                .expect("sig")
                .starts_with("EqQB")
        );
        let text: String = deltas.iter().filter_map(|d| d.content.as_deref()).collect();
        assert_eq!(text, "I'll check the weather in Florence for you.");
        let calls: Vec<&ToolCallDelta> = deltas.iter().flat_map(|d| &d.tool_calls).collect();
        assert!(
            calls.iter().all(|c| c.index == 0),
            "block index 2 is tool call 0"
        );
        assert_eq!(
            calls[0].id.as_deref(),
            Some("toolu_01T1x1fJ34qAmk2tNTrN7Up6")
        );
        assert_eq!(calls[0].function.name.as_deref(), Some("weather"));
        let args: String = calls
            .iter()
            .filter_map(|c| c.function.arguments.as_deref())
            .collect();
        assert_eq!(args, r#"{"location": "Florence, Italy"}"#);
        let finish: Vec<&str> = chunks
            .iter()
            .flat_map(|c| {
                c.choices
                    .iter()
                    .filter_map(|ch| ch.finish_reason.as_deref())
            })
            .collect();
        assert!(finish.iter().all(|f| *f == "tool_calls") && !finish.is_empty());
        // Cumulative: the last message_delta's 89, not 6 + 60 + 89; cache fields from
        // message_start survive deltas that omit them.
        let want = Usage {
            prompt: 423 + 2000 + 100,
            completion: 89,
            cached: 2000,
            cache_write: 100,
            reasoning: 0,
        };
        assert_eq!(usage, Some(want));
        let last = chunks.last().expect("chunks");
        assert!(last.choices.is_empty());
        assert_eq!(last.usage.map(Usage::from), Some(want));
        // The pass-through reader agrees.
        let mut p = PassthroughUsage::new();
        let mut sc = SseScanner::new(1 << 20);
        sc.push(STREAM.as_bytes());
        while let Ok(Some(ev)) = sc.next_event() {
            if let Some(d) = ev.data {
                p.on_event(&d);
            }
        }
        assert_eq!(p.usage(), Some(want));
    }

    #[test]
    fn stream_without_message_stop_is_incomplete() {
        let cut = STREAM.find("event: message_stop").expect("stop");
        let (_, r, usage) = decode_stream(&STREAM.as_bytes()[..cut]);
        assert!(matches!(r, Err(StreamFault::Malformed(_))), "{r:?}");
        assert_eq!(
            usage.map(|u| u.completion),
            Some(89),
            "usage so far is kept"
        );
    }

    /// Cut anywhere after `message_start` — between events, inside one, after a `message_delta`
    /// that omits the cache fields — the usage so far keeps message_start's input, cache read
    /// and cache write (never zeroed, never summed), both in the translating decoder and in the
    /// pass-through's reader.
    #[test]
    fn a_cut_stream_keeps_the_cache_fields_it_reported() {
        let bytes = STREAM.as_bytes();
        let head_end = STREAM.find("\n\n").expect("message_start") + 2;
        let stop = STREAM.find("event: message_stop").expect("stop");
        let first_delta = STREAM.find("event: message_delta").expect("delta");
        let last_delta = STREAM.rfind("event: message_delta").expect("delta");
        // Where an event's JSON ends: a stream cut there, without the blank line, still ends
        // with the whole event (the decoder takes it at the end; the pass-through's scanner,
        // run here without its `finish`, only once the blank line is in).
        let json_end = |at: usize| at + STREAM[at..].find("\n\n").expect("end");
        let want = |cut: usize, slack: usize| {
            if cut >= json_end(last_delta) + slack {
                89
            } else if cut >= json_end(first_delta) + slack {
                60
            } else {
                6
            }
        };
        let cached = |completion| Usage {
            prompt: 423 + 2000 + 100,
            completion,
            cached: 2000,
            cache_write: 100,
            reasoning: 0,
        };
        for cut in head_end..stop {
            let (_, r, usage) = decode_stream(&bytes[..cut]);
            assert!(
                matches!(r, Err(StreamFault::Malformed(_))),
                "cut at {cut}: {r:?}"
            );
            assert_eq!(usage, Some(cached(want(cut, 0))), "cut at {cut}");

            let mut p = PassthroughUsage::new();
            let mut sc = SseScanner::new(1 << 20);
            sc.push(&bytes[..cut]);
            while let Ok(Some(ev)) = sc.next_event() {
                if let Some(d) = ev.data {
                    p.on_event(&d);
                }
            }
            assert_eq!(
                p.usage(),
                Some(cached(want(cut, 2))),
                "pass-through cut at {cut}"
            );
        }
        // Before message_start is whole there is nothing reported.
        let (_, r, usage) = decode_stream(&bytes[..head_end - 3]);
        assert!(r.is_err());
        assert_eq!(usage, None);
        // A later report that gives the cache fields as null or leaves them out keeps them.
        let nulls = STREAM.replace(
            r#""usage":{"output_tokens":60}"#,
            r#""usage":{"output_tokens":60,"cache_read_input_tokens":null,"cache_creation_input_tokens":null}"#,
        );
        assert_ne!(nulls, STREAM);
        let cut = nulls.find("event: message_stop").expect("stop");
        let (_, _, usage) = decode_stream(&nulls.as_bytes()[..cut]);
        assert_eq!(usage, Some(cached(89)));
    }

    #[test]
    fn stream_error_event_is_an_upstream_fault() {
        let s = include_str!("../../tests/fixtures/anthropic/stream_error.sse");
        let (chunks, r, _) = decode_stream(s.as_bytes());
        let Err(StreamFault::Upstream(e)) = r else {
            panic!("expected an upstream fault, got {r:?}")
        };
        assert_eq!(
            (e.status, e.kind.as_str(), e.message.as_str()),
            (503, "overloaded_error", "Overloaded")
        );
        assert!(chunks.iter().any(|c| {
            c.choices
                .iter()
                .any(|ch| ch.delta.content.as_deref() == Some("Hel"))
        }));
    }

    #[test]
    fn an_oversized_event_is_refused() {
        let mut d = Anthropic.chat_stream(&target(), 64);
        let mut out = Vec::new();
        let big = format!(
            "data: {{\"type\":\"ping\",\"x\":\"{}\"}}\n\n",
            "a".repeat(100)
        );
        assert_eq!(d.push(big.as_bytes(), &mut out), Err(StreamFault::TooLarge));
    }

    #[test]
    fn errors_decode() {
        let e = Anthropic.decode_error(529, ERROR.as_bytes());
        assert_eq!(
            (e.status, e.kind.as_str(), e.message.as_str()),
            (503, "overloaded_error", "Overloaded")
        );
        let e = Anthropic.decode_error(
            400,
            br#"{"type":"error","error":{"type":"invalid_request_error","message":"max_tokens: Field required"}}"#,
        );
        assert_eq!((e.status, e.kind.as_str()), (400, "invalid_request_error"));
        assert!(e.message.contains("max_tokens"));
        let e = Anthropic.decode_error(429, b"<html>");
        assert_eq!((e.status, e.kind.as_str()), (429, "rate_limit_error"));
        let _ = ImageUrl::default();
    }
}
