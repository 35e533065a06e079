//! OpenAI's Responses API as a client protocol: the request parsed, its items turned into pivot
//! chat messages, the chat answer (and each stream chunk) turned back into a `response` object and
//! `response.*` events; and, for an upstream that speaks the Responses API itself, the stateless
//! body sent to it and the usage read from its answers.
//!
//! Stateless: the items of a `previous_response_id` or a `conversation` are resolved by the caller
//! (the state module) and handed in as `history`. Items are kept as JSON values, in the exact
//! shape the API gives them, so that stored items come back to a client unchanged.
//!
//! Reasoning survives a round trip through a client: an `encrypted` reasoning block becomes the
//! reasoning item's `encrypted_content` verbatim; other blocks (Anthropic thinking signatures,
//! redacted thinking, Gemini thought signatures) travel inside `encrypted_content` in an envelope
//! ([`ENVELOPE_PREFIX`]) that [`to_chat`] opens again on the next turn.

use std::collections::HashMap;

use base64::Engine as _;
use bytes::BytesMut;
use serde::Serialize;
use serde_json::{Map, Value, json};

use super::{ChunkEncoder, ClientProtocol, EncodeCtx};
use crate::error::ApiError;
use crate::pivot::{
    ChatChunk, ChatRequest, ChatResponse, Content, FunctionCall, FunctionDef, Message, Part,
    ReasoningBlock, Role, Tool, ToolCall, UpstreamError,
};
use crate::providers::Usage;

/// One input or output item (`message`, `function_call`, `function_call_output`, `reasoning`, …)
/// in the API's own JSON shape.
pub type Item = Value;

/// `encrypted_content` that tollgate wrote itself: reasoning blocks that are not OpenAI's
/// encrypted reasoning, as base64 of their JSON. An OpenAI upstream never sees it (dropped from
/// pass-through history by [`upstream_body`]).
pub const ENVELOPE_PREFIX: &str = "tollgate.v1:";

/// A new OpenAI-shaped id: `prefix` (`resp_`, `msg_`, `fc_`, `rs_`, `call_`, …) and 32 hex digits.
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}{}", uuid::Uuid::new_v4().simple())
}

// ------------------------------------------------------------------------------------------------
// The request
// ------------------------------------------------------------------------------------------------

/// `input`: a string (one user message) or a list of items.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    Text(String),
    Items(Vec<Item>),
}

impl Default for Input {
    fn default() -> Self {
        Self::Items(Vec::new())
    }
}

/// `POST /v1/responses`' body, parsed. Fields the gateway acts on are typed; structured ones it
/// only echoes or maps (`tools`, `text`, `reasoning`, …) keep the client's JSON; the rest is in
/// `extra`, in the client's order.
#[derive(Debug, Clone, PartialEq)]
pub struct ResponsesRequest {
    pub model: String,
    pub input: Input,
    pub instructions: Option<String>,
    /// Tool definitions as sent (`{type: "function", name, description, parameters, strict}`, or
    /// a built-in tool).
    pub tools: Vec<Value>,
    /// `"none" | "auto" | "required"` or an object (`{type: "function", name}`, …).
    pub tool_choice: Option<Value>,
    pub parallel_tool_calls: Option<bool>,
    /// `{format: {type: "text" | "json_object" | "json_schema", …}, verbosity?}`.
    pub text: Option<Value>,
    pub max_output_tokens: Option<u64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub metadata: Option<Value>,
    /// Save the response (default `true`, as OpenAI).
    pub store: bool,
    pub previous_response_id: Option<String>,
    /// The conversation's id, whichever form the client used (`"conv_…"` or `{"id": "conv_…"}`).
    pub conversation: Option<String>,
    /// `{effort, summary}`.
    pub reasoning: Option<Value>,
    pub include: Vec<String>,
    pub stream: bool,
    pub user: Option<String>,
    pub safety_identifier: Option<String>,
    /// `"auto" | "disabled"`.
    pub truncation: Option<String>,
    /// Every other field, untouched.
    pub extra: Map<String, Value>,
}

impl Default for ResponsesRequest {
    fn default() -> Self {
        Self {
            model: String::new(),
            input: Input::default(),
            instructions: None,
            tools: Vec::new(),
            tool_choice: None,
            parallel_tool_calls: None,
            text: None,
            max_output_tokens: None,
            temperature: None,
            top_p: None,
            metadata: None,
            store: true,
            previous_response_id: None,
            conversation: None,
            reasoning: None,
            include: Vec::new(),
            stream: false,
            user: None,
            safety_identifier: None,
            truncation: None,
            extra: Map::new(),
        }
    }
}

fn bad(param: impl Into<String>, code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::BadRequest {
        message: message.into(),
        code,
        param: Some(param.into()),
    }
}

fn invalid(param: &str, message: impl Into<String>) -> ApiError {
    bad(param, "invalid_value", message)
}

fn missing(param: &str) -> ApiError {
    bad(
        param,
        "missing_field",
        format!("Missing required parameter: '{param}'."),
    )
}

fn unsupported_tool(param: &str, kind: &str) -> ApiError {
    bad(
        param,
        "unsupported_tool",
        format!(
            "The tool '{kind}' is not supported for this model: its provider only serves function tools."
        ),
    )
}

/// The JSON type's name, for error messages.
fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn want_string(param: &str, v: Value) -> Result<String, ApiError> {
    match v {
        Value::String(s) => Ok(s),
        other => Err(invalid(
            param,
            format!(
                "Invalid type for '{param}': expected a string, but got {}.",
                kind_of(&other)
            ),
        )),
    }
}

fn want_bool(param: &str, v: &Value) -> Result<bool, ApiError> {
    v.as_bool().ok_or_else(|| {
        invalid(
            param,
            format!(
                "Invalid type for '{param}': expected a boolean, but got {}.",
                kind_of(v)
            ),
        )
    })
}

fn want_number(param: &str, v: &Value) -> Result<f64, ApiError> {
    v.as_f64().ok_or_else(|| {
        invalid(
            param,
            format!(
                "Invalid type for '{param}': expected a number, but got {}.",
                kind_of(v)
            ),
        )
    })
}

fn want_object(param: &str, v: &Value) -> Result<(), ApiError> {
    if v.is_object() {
        Ok(())
    } else {
        Err(invalid(
            param,
            format!(
                "Invalid type for '{param}': expected an object, but got {}.",
                kind_of(v)
            ),
        ))
    }
}

/// Parses a `POST /v1/responses` body. Every 400 names the parameter at fault.
pub fn parse(body: &[u8]) -> Result<ResponsesRequest, ApiError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request("invalid_json", format!("The body is not valid JSON: {e}"))
    })?;
    let Value::Object(mut obj) = v else {
        return Err(ApiError::bad_request(
            "invalid_json",
            "The body must be a JSON object.",
        ));
    };
    let mut req = ResponsesRequest::default();
    // `null` is absent, as the SDKs send it.
    let mut take = |k: &str| obj.remove(k).filter(|v| !v.is_null());

    req.model = match take("model") {
        None => return Err(missing("model")),
        Some(v) => want_string("model", v)?,
    };
    if let Some(v) = take("input") {
        req.input = match v {
            Value::String(s) => Input::Text(s),
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    check_item(&format!("input[{i}]"), item)?;
                }
                Input::Items(items)
            }
            other => {
                return Err(invalid(
                    "input",
                    format!(
                        "Invalid type for 'input': expected a string or an array of items, but got {}.",
                        kind_of(&other)
                    ),
                ));
            }
        };
    }
    if let Some(v) = take("instructions") {
        req.instructions = Some(want_string("instructions", v)?);
    }
    if let Some(v) = take("tools") {
        let Value::Array(tools) = v else {
            return Err(invalid(
                "tools",
                "Invalid type for 'tools': expected an array.",
            ));
        };
        for (i, t) in tools.iter().enumerate() {
            let param = format!("tools[{i}]");
            want_object(&param, t)?;
            if !t.get("type").is_some_and(Value::is_string) {
                return Err(missing(&format!("{param}.type")));
            }
            if t["type"] == "function" && !t.get("name").is_some_and(Value::is_string) {
                return Err(missing(&format!("{param}.name")));
            }
        }
        req.tools = tools;
    }
    if let Some(v) = take("tool_choice") {
        match &v {
            Value::String(s) if matches!(s.as_str(), "none" | "auto" | "required") => {}
            Value::Object(o) if o.get("type").is_some_and(Value::is_string) => {}
            _ => {
                return Err(invalid(
                    "tool_choice",
                    "Invalid 'tool_choice': expected 'none', 'auto', 'required' or an object with a 'type'.",
                ));
            }
        }
        req.tool_choice = Some(v);
    }
    if let Some(v) = take("parallel_tool_calls") {
        req.parallel_tool_calls = Some(want_bool("parallel_tool_calls", &v)?);
    }
    if let Some(v) = take("text") {
        want_object("text", &v)?;
        if let Some(f) = v.get("format").filter(|f| !f.is_null()) {
            want_object("text.format", f)?;
            match f.get("type").and_then(Value::as_str) {
                Some("text" | "json_object") => {}
                Some("json_schema") => {
                    if !f.get("name").is_some_and(Value::is_string) {
                        return Err(missing("text.format.name"));
                    }
                    if !f.get("schema").is_some_and(Value::is_object) {
                        return Err(missing("text.format.schema"));
                    }
                }
                Some(other) => {
                    return Err(invalid(
                        "text.format.type",
                        format!(
                            "Invalid value: '{other}'. Supported values are: 'text', 'json_object' and 'json_schema'."
                        ),
                    ));
                }
                None => return Err(missing("text.format.type")),
            }
        }
        req.text = Some(v);
    }
    if let Some(v) = take("max_output_tokens") {
        req.max_output_tokens = Some(v.as_u64().ok_or_else(|| {
            invalid(
                "max_output_tokens",
                "Invalid 'max_output_tokens': expected a non-negative integer.",
            )
        })?);
    }
    if let Some(v) = take("temperature") {
        req.temperature = Some(want_number("temperature", &v)?);
    }
    if let Some(v) = take("top_p") {
        req.top_p = Some(want_number("top_p", &v)?);
    }
    if let Some(v) = take("metadata") {
        want_object("metadata", &v)?;
        req.metadata = Some(v);
    }
    if let Some(v) = take("store") {
        req.store = want_bool("store", &v)?;
    }
    if let Some(v) = take("previous_response_id") {
        req.previous_response_id = Some(want_string("previous_response_id", v)?);
    }
    if let Some(v) = take("conversation") {
        req.conversation = Some(match v {
            Value::String(s) => s,
            Value::Object(mut o) => match o.remove("id") {
                Some(Value::String(s)) => s,
                _ => return Err(missing("conversation.id")),
            },
            other => {
                return Err(invalid(
                    "conversation",
                    format!(
                        "Invalid type for 'conversation': expected a string or an object, but got {}.",
                        kind_of(&other)
                    ),
                ));
            }
        });
    }
    if req.previous_response_id.is_some() && req.conversation.is_some() {
        return Err(invalid(
            "conversation",
            "'previous_response_id' and 'conversation' cannot be used together.",
        ));
    }
    if let Some(v) = take("reasoning") {
        want_object("reasoning", &v)?;
        req.reasoning = Some(v);
    }
    if let Some(v) = take("include") {
        let Value::Array(list) = v else {
            return Err(invalid(
                "include",
                "Invalid type for 'include': expected an array of strings.",
            ));
        };
        for (i, s) in list.into_iter().enumerate() {
            req.include.push(want_string(&format!("include[{i}]"), s)?);
        }
    }
    if let Some(v) = take("stream") {
        req.stream = want_bool("stream", &v)?;
    }
    if let Some(v) = take("user") {
        req.user = Some(want_string("user", v)?);
    }
    if let Some(v) = take("safety_identifier") {
        req.safety_identifier = Some(want_string("safety_identifier", v)?);
    }
    if let Some(v) = take("truncation") {
        let t = want_string("truncation", v)?;
        if t != "auto" && t != "disabled" {
            return Err(invalid(
                "truncation",
                format!("Invalid value: '{t}'. Supported values are: 'auto' and 'disabled'."),
            ));
        }
        req.truncation = Some(t);
    }
    req.extra = obj;
    Ok(req)
}

/// The structural check of one input item: an object whose `type` (or `role`, for a message
/// without `type`) says what it is, with the fields the translation reads.
fn check_item(param: &str, item: &Value) -> Result<(), ApiError> {
    want_object(param, item)?;
    let kind = match item.get("type") {
        None | Some(Value::Null) => "message",
        Some(Value::String(s)) => s.as_str(),
        Some(_) => {
            return Err(invalid(
                &format!("{param}.type"),
                "Invalid type: expected a string.",
            ));
        }
    };
    let need_str = |field: &str| -> Result<(), ApiError> {
        if item.get(field).is_some_and(Value::is_string) {
            Ok(())
        } else {
            Err(missing(&format!("{param}.{field}")))
        }
    };
    match kind {
        "message" => {
            need_str("role")?;
            match item["role"].as_str() {
                Some("user" | "system" | "developer" | "assistant") => {}
                _ => {
                    return Err(invalid(
                        &format!("{param}.role"),
                        "Invalid value. Supported values are: 'user', 'system', 'developer' and 'assistant'.",
                    ));
                }
            }
            match item.get("content") {
                Some(Value::String(_) | Value::Array(_)) => Ok(()),
                _ => Err(missing(&format!("{param}.content"))),
            }
        }
        "function_call" => {
            need_str("call_id")?;
            need_str("name")?;
            need_str("arguments")
        }
        "function_call_output" => {
            need_str("call_id")?;
            match item.get("output") {
                Some(Value::String(_) | Value::Array(_)) => Ok(()),
                _ => Err(missing(&format!("{param}.output"))),
            }
        }
        "reasoning" => match item.get("summary") {
            None | Some(Value::Array(_)) => Ok(()),
            Some(_) => Err(invalid(
                &format!("{param}.summary"),
                "Invalid type: expected an array.",
            )),
        },
        _ => Ok(()),
    }
}

/// The client's new input as items to store, each with an id: a string becomes one user
/// message; a message's string content becomes one `input_text` (`output_text` for the
/// assistant) part; items without an `id` get one (`msg_…`, `fc_…`, `fco_…`, `rs_…`).
pub fn normalize_input(req: &ResponsesRequest) -> Vec<Item> {
    match &req.input {
        Input::Text(text) => vec![json!({
            "id": new_id("msg_"),
            "type": "message",
            "role": "user",
            "status": "completed",
            "content": [{"type": "input_text", "text": text}],
        })],
        Input::Items(items) => items.iter().map(normalize_item).collect(),
    }
}

fn normalize_item(item: &Item) -> Item {
    let mut item = item.clone();
    let Some(o) = item.as_object_mut() else {
        return item;
    };
    let kind = o
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("message")
        .to_owned();
    let prefix = match kind.as_str() {
        "message" => {
            o.insert("type".into(), "message".into());
            let assistant = o.get("role").and_then(Value::as_str) == Some("assistant");
            if let Some(Value::String(text)) = o.get("content") {
                let part = if assistant {
                    json!({"type": "output_text", "text": text, "annotations": []})
                } else {
                    json!({"type": "input_text", "text": text})
                };
                o.insert("content".into(), json!([part]));
            }
            "msg_"
        }
        "function_call" => "fc_",
        "function_call_output" => "fco_",
        "reasoning" => "rs_",
        _ => return item,
    };
    if !o.get("id").is_some_and(Value::is_string) {
        o.insert("id".into(), new_id(prefix).into());
    }
    if !o.contains_key("status") && kind != "reasoning" {
        o.insert("status".into(), "completed".into());
    }
    item
}

// ------------------------------------------------------------------------------------------------
// Request → pivot
// ------------------------------------------------------------------------------------------------

/// The pivot chat request: `instructions` first (as a system message; a previous response's
/// instructions are not inherited, as OpenAI), then `history` (the items of the previous
/// response or the conversation, oldest first), then the request's own input.
pub fn to_chat(req: &ResponsesRequest, history: &[Item]) -> Result<ChatRequest, ApiError> {
    let mut chat = ChatRequest {
        model: req.model.clone(),
        ..ChatRequest::default()
    };
    let mut b = MessageBuilder::default();
    if let Some(i) = &req.instructions {
        b.messages.push(Message::text(Role::System, i.clone()));
    }
    for (i, item) in history.iter().enumerate() {
        b.item(&format!("history[{i}]"), item)?;
    }
    match &req.input {
        Input::Text(t) => b.push_message(Message::text(Role::User, t.clone())),
        Input::Items(items) => {
            for (i, item) in items.iter().enumerate() {
                b.item(&format!("input[{i}]"), item)?;
            }
        }
    }
    chat.messages = b.finish();
    if chat
        .messages
        .iter()
        .all(|m| matches!(m.role, Role::System | Role::Developer))
    {
        return Err(missing("input"));
    }

    for (i, t) in req.tools.iter().enumerate() {
        chat.tools.push(tool_to_chat(&format!("tools[{i}]"), t)?);
    }
    if let Some(tc) = &req.tool_choice {
        chat.tool_choice = Some(tool_choice_to_chat(tc)?);
    }
    chat.parallel_tool_calls = req.parallel_tool_calls;
    if let Some(text) = &req.text {
        if let Some(f) = text.get("format").filter(|f| !f.is_null()) {
            chat.response_format = format_to_chat(f);
        }
        if let Some(v) = text.get("verbosity").filter(|v| !v.is_null()) {
            chat.extra.insert("verbosity".into(), v.clone());
        }
    }
    chat.max_completion_tokens = req.max_output_tokens;
    chat.temperature = req.temperature;
    chat.top_p = req.top_p;
    chat.reasoning_effort = req
        .reasoning
        .as_ref()
        .and_then(|r| r.get("effort"))
        .and_then(Value::as_str)
        .map(str::to_owned);
    chat.user.clone_from(&req.user);
    if let Some(s) = &req.safety_identifier {
        chat.extra
            .insert("safety_identifier".into(), s.clone().into());
    }
    if req.stream {
        chat.stream = true;
        chat.stream_options = Some(json!({"include_usage": true}));
    }
    if req.extra.get("background").and_then(Value::as_bool) == Some(true) {
        return Err(invalid(
            "background",
            "Background responses are not supported for this model.",
        ));
    }
    if req.extra.get("prompt").is_some_and(|p| !p.is_null()) {
        return Err(invalid(
            "prompt",
            "Prompt templates are not supported for this model.",
        ));
    }
    // Chat completions fields of the same meaning; the rest of `extra` is Responses-only.
    for k in ["prompt_cache_key", "service_tier", "seed"] {
        if let Some(v) = req.extra.get(k).filter(|v| !v.is_null()) {
            chat.extra.insert(k.into(), v.clone());
        }
    }
    if let Some(n) = req.extra.get("top_logprobs").filter(|v| v.is_u64()) {
        chat.extra.insert("top_logprobs".into(), n.clone());
        chat.extra.insert("logprobs".into(), true.into());
    }
    Ok(chat)
}

fn tool_to_chat(param: &str, t: &Value) -> Result<Tool, ApiError> {
    let kind = t.get("type").and_then(Value::as_str).unwrap_or("");
    if kind != "function" {
        return Err(unsupported_tool(&format!("{param}.type"), kind));
    }
    let name = t
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| missing(&format!("{param}.name")))?;
    Ok(Tool {
        kind: "function".into(),
        function: Some(FunctionDef {
            name: name.to_owned(),
            description: t
                .get("description")
                .and_then(Value::as_str)
                .map(str::to_owned),
            parameters: t.get("parameters").filter(|p| !p.is_null()).cloned(),
            strict: t.get("strict").and_then(Value::as_bool),
        }),
        ..Tool::default()
    })
}

fn tool_choice_to_chat(tc: &Value) -> Result<Value, ApiError> {
    let Some(o) = tc.as_object() else {
        return Ok(tc.clone());
    };
    let kind = o.get("type").and_then(Value::as_str).unwrap_or("");
    match kind {
        "function" => {
            let name = o
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| missing("tool_choice.name"))?;
            Ok(json!({"type": "function", "function": {"name": name}}))
        }
        "allowed_tools" => {
            let mut tools = Vec::new();
            for (i, t) in o
                .get("tools")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .enumerate()
            {
                let k = t.get("type").and_then(Value::as_str).unwrap_or("");
                if k != "function" {
                    return Err(unsupported_tool(&format!("tool_choice.tools[{i}].type"), k));
                }
                let name = t
                    .get("name")
                    .and_then(Value::as_str)
                    .ok_or_else(|| missing(&format!("tool_choice.tools[{i}].name")))?;
                tools.push(json!({"type": "function", "function": {"name": name}}));
            }
            let mode = o.get("mode").cloned().unwrap_or_else(|| "auto".into());
            Ok(json!({"type": "allowed_tools", "allowed_tools": {"mode": mode, "tools": tools}}))
        }
        other => Err(unsupported_tool("tool_choice.type", other)),
    }
}

fn format_to_chat(f: &Value) -> Option<Value> {
    match f.get("type").and_then(Value::as_str)? {
        "json_object" => Some(json!({"type": "json_object"})),
        "json_schema" => {
            let mut js = Map::new();
            for k in ["name", "schema", "strict", "description"] {
                if let Some(v) = f.get(k).filter(|v| !v.is_null()) {
                    js.insert(k.into(), v.clone());
                }
            }
            Some(json!({"type": "json_schema", "json_schema": js}))
        }
        _ => None,
    }
}

/// Builds chat messages from items: function calls join the assistant message before them,
/// reasoning joins the assistant message after it.
#[derive(Default)]
struct MessageBuilder {
    messages: Vec<Message>,
    /// Reasoning items waiting for the assistant turn they belong to.
    reasoning_text: Option<String>,
    reasoning_blocks: Vec<ReasoningBlock>,
}

impl MessageBuilder {
    fn push_message(&mut self, m: Message) {
        self.messages.push(m);
    }

    /// The assistant message that a function call (or an assistant text after calls) joins: the
    /// last message when it is the assistant's, else a new one.
    fn assistant(&mut self, merge: impl Fn(&Message) -> bool) -> &mut Message {
        let reuse = self
            .messages
            .last()
            .is_some_and(|m| m.role == Role::Assistant && merge(m));
        if !reuse {
            self.messages.push(Message {
                role: Role::Assistant,
                ..Message::default()
            });
        }
        let text = self.reasoning_text.take();
        let blocks = std::mem::take(&mut self.reasoning_blocks);
        let m = self.messages.last_mut().expect("pushed above");
        if let Some(t) = text {
            match &mut m.reasoning_content {
                Some(existing) => {
                    existing.push_str("\n\n");
                    existing.push_str(&t);
                }
                None => m.reasoning_content = Some(t),
            }
        }
        m.reasoning_blocks.extend(blocks);
        m
    }

    fn item(&mut self, param: &str, item: &Value) -> Result<(), ApiError> {
        check_item(param, item)?;
        let kind = item
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("message");
        match kind {
            "message" => self.message(param, item),
            "function_call" => {
                let call = ToolCall {
                    id: item["call_id"].as_str().unwrap_or_default().to_owned(),
                    kind: "function".into(),
                    function: FunctionCall {
                        name: item["name"].as_str().unwrap_or_default().to_owned(),
                        arguments: item["arguments"].as_str().unwrap_or_default().to_owned(),
                    },
                };
                self.assistant(|_| true).tool_calls.push(call);
                Ok(())
            }
            "function_call_output" => {
                let (content, _) = parts_to_chat(&format!("{param}.output"), &item["output"])?;
                self.reasoning_text = None;
                self.reasoning_blocks.clear();
                self.messages.push(Message {
                    role: Role::Tool,
                    tool_call_id: item["call_id"].as_str().map(str::to_owned),
                    content: Some(collapse_text(content)),
                    ..Message::default()
                });
                Ok(())
            }
            "reasoning" => {
                let summary = item
                    .get("summary")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .chain(
                        item.get("content")
                            .and_then(Value::as_array)
                            .into_iter()
                            .flatten(),
                    )
                    .filter_map(|p| p.get("text").and_then(Value::as_str))
                    .collect::<Vec<_>>()
                    .join("\n\n");
                if !summary.is_empty() {
                    match &mut self.reasoning_text {
                        Some(t) => {
                            t.push_str("\n\n");
                            t.push_str(&summary);
                        }
                        None => self.reasoning_text = Some(summary),
                    }
                }
                if let Some(enc) = item.get("encrypted_content").and_then(Value::as_str) {
                    let id = item.get("id").and_then(Value::as_str);
                    self.reasoning_blocks.extend(open_envelope(enc, id));
                }
                Ok(())
            }
            "item_reference" => Err(invalid(
                param,
                "Item references are not supported: send the item itself, or use 'previous_response_id' or 'conversation'.",
            )),
            other => Err(invalid(
                &format!("{param}.type"),
                format!("Input items of type '{other}' are not supported for this model."),
            )),
        }
    }

    fn message(&mut self, param: &str, item: &Value) -> Result<(), ApiError> {
        let role = match item["role"].as_str() {
            Some("system") => Role::System,
            Some("developer") => Role::Developer,
            Some("assistant") => Role::Assistant,
            _ => Role::User,
        };
        let (parts, refusal) = parts_to_chat(&format!("{param}.content"), &item["content"])?;
        if role == Role::Assistant {
            let content = collapse_text(parts);
            // Text after the calls of the same turn joins that message when it has no text yet.
            let m = self.assistant(|m| m.content.is_none() && m.refusal.is_none());
            m.content = Some(content);
            m.refusal = refusal;
            return Ok(());
        }
        // Reasoning belongs to the assistant turn right after it; one that never came is dropped.
        self.reasoning_text = None;
        self.reasoning_blocks.clear();
        let content = if role == Role::User {
            match parts.as_slice() {
                [p] if p.kind == "text" => Content::Text(p.text.clone().unwrap_or_default()),
                _ => Content::Parts(parts),
            }
        } else {
            collapse_text(parts)
        };
        self.messages.push(Message {
            role,
            content: Some(content),
            ..Message::default()
        });
        Ok(())
    }

    /// Reasoning with no assistant turn after it has nothing to belong to and is dropped.
    fn finish(self) -> Vec<Message> {
        self.messages
    }
}

/// Text-only content as one string (what every upstream takes for system, assistant and tool
/// messages); anything else stays parts.
fn collapse_text(parts: Vec<Part>) -> Content {
    if parts.iter().all(|p| p.kind == "text") {
        Content::Text(
            parts
                .into_iter()
                .filter_map(|p| p.text)
                .collect::<Vec<_>>()
                .join(""),
        )
    } else {
        Content::Parts(parts)
    }
}

/// A message's content (or a function output): a string, or Responses content parts → chat
/// parts, and the refusal text if any.
fn parts_to_chat(param: &str, content: &Value) -> Result<(Vec<Part>, Option<String>), ApiError> {
    let parts = match content {
        Value::String(s) => return Ok((vec![Part::text(s.clone())], None)),
        Value::Array(parts) => parts,
        _ => return Err(missing(param)),
    };
    let mut out = Vec::new();
    let mut refusal: Option<String> = None;
    for (j, p) in parts.iter().enumerate() {
        let pp = format!("{param}[{j}]");
        want_object(&pp, p)?;
        let kind = p.get("type").and_then(Value::as_str).unwrap_or("");
        match kind {
            "input_text" | "output_text" | "text" | "summary_text" | "reasoning_text" => {
                let text = p
                    .get("text")
                    .and_then(Value::as_str)
                    .ok_or_else(|| missing(&format!("{pp}.text")))?;
                out.push(Part::text(text));
            }
            "refusal" => {
                let r = p.get("refusal").and_then(Value::as_str).unwrap_or_default();
                refusal.get_or_insert_with(String::new).push_str(r);
            }
            "input_image" => {
                if p.get("file_id").is_some_and(|f| !f.is_null()) {
                    return Err(invalid(
                        &format!("{pp}.file_id"),
                        "Images by 'file_id' are not supported for this model: send 'image_url' (a URL or a base64 data URL).",
                    ));
                }
                let url = p
                    .get("image_url")
                    .and_then(Value::as_str)
                    .ok_or_else(|| missing(&format!("{pp}.image_url")))?;
                let mut part = Part::image(url);
                if let (Some(img), Some(d)) = (
                    part.image_url.as_mut(),
                    p.get("detail").and_then(Value::as_str),
                ) {
                    img.detail = Some(d.to_owned());
                }
                out.push(part);
            }
            "input_file" => {
                for k in ["file_id", "file_url"] {
                    if p.get(k).is_some_and(|f| !f.is_null()) {
                        return Err(invalid(
                            &format!("{pp}.{k}"),
                            format!(
                                "Files by '{k}' are not supported for this model: send 'file_data'."
                            ),
                        ));
                    }
                }
                let data = p
                    .get("file_data")
                    .and_then(Value::as_str)
                    .ok_or_else(|| missing(&format!("{pp}.file_data")))?;
                let mut file = Map::new();
                file.insert("file_data".into(), data.into());
                if let Some(name) = p.get("filename").and_then(Value::as_str) {
                    file.insert("filename".into(), name.into());
                }
                let mut part = Part {
                    kind: "file".into(),
                    ..Part::default()
                };
                part.extra.insert("file".into(), Value::Object(file));
                out.push(part);
            }
            other => {
                return Err(invalid(
                    &format!("{pp}.type"),
                    format!("Content parts of type '{other}' are not supported here."),
                ));
            }
        }
    }
    Ok((out, refusal))
}

/// Reasoning blocks as one `encrypted_content`: an `encrypted` block that belongs to the item
/// (`id` none or `item_id`) is its data verbatim; anything else goes in the envelope.
pub fn seal_reasoning(blocks: &[ReasoningBlock], item_id: &str) -> Option<String> {
    match blocks {
        [] => None,
        [b] if b.kind == "encrypted"
            && b.data.is_some()
            && b.id.as_deref().is_none_or(|id| id == item_id) =>
        {
            b.data.clone()
        }
        _ => {
            let json = serde_json::to_vec(blocks).ok()?;
            Some(format!(
                "{ENVELOPE_PREFIX}{}",
                base64::engine::general_purpose::STANDARD.encode(json)
            ))
        }
    }
}

/// The reverse of [`seal_reasoning`]: the blocks of an envelope, or one `encrypted` block (with
/// the reasoning item's id) for OpenAI's own encrypted reasoning.
pub fn open_envelope(encrypted: &str, item_id: Option<&str>) -> Vec<ReasoningBlock> {
    if let Some(b64) = encrypted.strip_prefix(ENVELOPE_PREFIX)
        && let Ok(json) = base64::engine::general_purpose::STANDARD.decode(b64)
        && let Ok(blocks) = serde_json::from_slice::<Vec<ReasoningBlock>>(&json)
    {
        return blocks;
    }
    vec![ReasoningBlock {
        kind: "encrypted".into(),
        data: Some(encrypted.to_owned()),
        id: item_id.map(str::to_owned),
        ..ReasoningBlock::default()
    }]
}

// ------------------------------------------------------------------------------------------------
// Pivot → the `response` object
// ------------------------------------------------------------------------------------------------

/// What the `response` object says besides what the model produced.
#[derive(Debug, Clone, Default)]
pub struct ResponseCtx {
    /// `resp_…`.
    pub id: String,
    /// Unix seconds.
    pub created_at: i64,
    /// The model the client asked for (never the upstream's name).
    pub model: String,
    /// The request, for the fields the response echoes (`instructions`, `tools`, `text`, …).
    pub request: ResponsesRequest,
    pub previous_response_id: Option<String>,
    /// `conv_…`.
    pub conversation: Option<String>,
    /// Whether the response is saved (`false` when storage is off, whatever the client asked).
    pub store: bool,
}

impl ResponseCtx {
    /// A context for `req` with a new `resp_…` id.
    pub fn new(req: &ResponsesRequest, created_at: i64) -> Self {
        Self {
            id: new_id("resp_"),
            created_at,
            model: req.model.clone(),
            request: req.clone(),
            previous_response_id: req.previous_response_id.clone(),
            conversation: req.conversation.clone(),
            store: req.store,
        }
    }
}

fn now_secs() -> i64 {
    chrono::Utc::now().timestamp()
}

/// The Responses `usage` object.
pub fn usage_json(u: &Usage) -> Value {
    let prompt = u.prompt.max(0);
    let completion = u.completion.max(0);
    json!({
        "input_tokens": prompt,
        "input_tokens_details": {
            "cached_tokens": u.cached.clamp(0, prompt),
            "cache_write_tokens": u.cache_write.clamp(0, prompt),
        },
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": u.reasoning.clamp(0, completion)},
        "total_tokens": prompt.saturating_add(completion),
    })
}

/// `incomplete_details.reason` for a chat `finish_reason`, when it ends the response short.
fn incomplete_reason(finish_reason: Option<&str>) -> Option<&'static str> {
    match finish_reason {
        Some("length") => Some("max_output_tokens"),
        Some("content_filter") => Some("content_filter"),
        _ => None,
    }
}

/// The `response` object around `output`, every field the SDKs' `Response` model has.
fn response_object(
    ctx: &ResponseCtx,
    status: &str,
    output: Vec<Value>,
    usage: Option<&Usage>,
    incomplete: Option<&str>,
    error: Option<Value>,
) -> Value {
    let r = &ctx.request;
    json!({
        "id": ctx.id,
        "object": "response",
        "created_at": ctx.created_at,
        "status": status,
        "background": false,
        "completed_at": if status == "completed" { json!(now_secs()) } else { Value::Null },
        "error": error,
        "incomplete_details": incomplete.map(|reason| json!({"reason": reason})),
        "instructions": r.instructions,
        "max_output_tokens": r.max_output_tokens,
        "max_tool_calls": r.extra.get("max_tool_calls"),
        "model": ctx.model,
        "output": output,
        "parallel_tool_calls": r.parallel_tool_calls.unwrap_or(true),
        "previous_response_id": ctx.previous_response_id,
        "conversation": ctx.conversation.as_ref().map(|id| json!({"id": id})),
        "prompt_cache_key": r.extra.get("prompt_cache_key"),
        "reasoning": r.reasoning.clone().unwrap_or_else(|| json!({"effort": null, "summary": null})),
        "safety_identifier": r.safety_identifier,
        "service_tier": r.extra.get("service_tier"),
        "store": ctx.store,
        "temperature": r.temperature.unwrap_or(1.0),
        "text": r.text.clone().unwrap_or_else(|| json!({"format": {"type": "text"}})),
        "tool_choice": r.tool_choice.clone().unwrap_or_else(|| "auto".into()),
        "tools": r.tools,
        "top_logprobs": r.extra.get("top_logprobs").filter(|v| v.is_u64()).cloned().unwrap_or(json!(0)),
        "top_p": r.top_p.unwrap_or(1.0),
        "truncation": r.truncation.as_deref().unwrap_or("disabled"),
        "usage": usage.map(usage_json),
        "user": r.user,
        "metadata": r.metadata.clone().unwrap_or_else(|| json!({})),
    })
}

fn reasoning_item(id: &str, text: &str, blocks: &[ReasoningBlock], status: &str) -> Value {
    let mut item = json!({
        "id": id,
        "type": "reasoning",
        "summary": if text.is_empty() { json!([]) } else { json!([{"type": "summary_text", "text": text}]) },
        "status": status,
    });
    if let Some(enc) = seal_reasoning(blocks, id) {
        item["encrypted_content"] = enc.into();
    }
    item
}

fn text_part(text: &str) -> Value {
    json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []})
}

fn refusal_part(refusal: &str) -> Value {
    json!({"type": "refusal", "refusal": refusal})
}

fn message_item(id: &str, content: Vec<Value>, status: &str) -> Value {
    json!({"id": id, "type": "message", "role": "assistant", "status": status, "content": content})
}

fn function_item(id: &str, call_id: &str, name: &str, arguments: &str, status: &str) -> Value {
    json!({
        "id": id,
        "type": "function_call",
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    })
}

/// The `response` object for a complete chat answer (its first choice).
pub fn from_chat(resp: &ChatResponse, ctx: &ResponseCtx) -> Value {
    let choice = resp.choices.first();
    let finish = choice.and_then(|c| c.finish_reason.as_deref());
    let incomplete = incomplete_reason(finish);
    let item_status = if incomplete.is_some() {
        "incomplete"
    } else {
        "completed"
    };
    let mut output = Vec::new();
    if let Some(m) = choice.map(|c| &c.message) {
        let text = m.reasoning_content.as_deref().unwrap_or_default();
        if !text.is_empty() || !m.reasoning_blocks.is_empty() {
            let id = m
                .reasoning_blocks
                .iter()
                .find(|b| b.kind == "encrypted")
                .and_then(|b| b.id.clone())
                .unwrap_or_else(|| new_id("rs_"));
            output.push(reasoning_item(&id, text, &m.reasoning_blocks, item_status));
        }
        let mut content = Vec::new();
        if m.content.is_some() {
            content.push(text_part(&m.text_content()));
        }
        if let Some(r) = &m.refusal {
            content.push(refusal_part(r));
        }
        if content.is_empty() && m.tool_calls.is_empty() {
            content.push(text_part(""));
        }
        if !content.is_empty() {
            output.push(message_item(&new_id("msg_"), content, item_status));
        }
        for call in &m.tool_calls {
            let call_id = if call.id.is_empty() {
                new_id("call_")
            } else {
                call.id.clone()
            };
            output.push(function_item(
                &new_id("fc_"),
                &call_id,
                &call.function.name,
                &call.function.arguments,
                "completed",
            ));
        }
    }
    let usage = resp.usage.map(Usage::from);
    let status = if incomplete.is_some() {
        "incomplete"
    } else {
        "completed"
    };
    response_object(ctx, status, output, usage.as_ref(), incomplete, None)
}

/// `response.error.code` for an upstream failure: the SDKs know a closed list of codes.
fn error_code(err: &UpstreamError) -> &'static str {
    if err.status == 429 || err.kind == "rate_limit_error" {
        "rate_limit_exceeded"
    } else {
        "server_error"
    }
}

// ------------------------------------------------------------------------------------------------
// Pivot stream → `response.*` events
// ------------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PartKind {
    Text,
    Refusal,
}

#[derive(Debug)]
enum OutItem {
    Message {
        id: String,
        parts: Vec<(PartKind, String)>,
    },
    Reasoning {
        id: String,
        text: String,
        /// The summary part was announced (first text).
        summary_open: bool,
        blocks: Vec<ReasoningBlock>,
    },
    Function {
        id: String,
        call_id: String,
        name: String,
        arguments: String,
    },
}

#[derive(Debug)]
struct Slot {
    item: OutItem,
    done: bool,
    status: &'static str,
}

impl Slot {
    fn json(&self) -> Value {
        match &self.item {
            OutItem::Message { id, parts } => message_item(
                id,
                parts
                    .iter()
                    .map(|(k, t)| match k {
                        PartKind::Text => text_part(t),
                        PartKind::Refusal => refusal_part(t),
                    })
                    .collect(),
                self.status,
            ),
            OutItem::Reasoning {
                id, text, blocks, ..
            } => reasoning_item(id, text, blocks, self.status),
            OutItem::Function {
                id,
                call_id,
                name,
                arguments,
            } => function_item(id, call_id, name, arguments, self.status),
        }
    }
}

/// Writes one Responses stream from pivot chunks: `response.created`, `response.in_progress`,
/// the items' events, then `response.completed` / `response.incomplete` (or `response.failed`).
/// Every event has `type` and a `sequence_number` counting from 0.
///
/// A message or reasoning item is closed as soon as another item opens; function call items stay
/// open until the end (a chat stream may interleave parallel calls' arguments), and are closed
/// in output order.
pub struct ResponsesStream {
    ctx: ResponseCtx,
    seq: u64,
    started: bool,
    ended: bool,
    slots: Vec<Slot>,
    /// The open message or reasoning slot.
    current: Option<usize>,
    /// Chat tool call index → slot.
    calls: HashMap<u32, usize>,
    finish_reason: Option<String>,
    usage: Option<Usage>,
    status: &'static str,
    error: Option<Value>,
}

/// Writes one event, framed: `event: <kind>` and its `data:` line, the JSON being `type`,
/// `sequence_number` (then incremented) and `body`'s fields — encoded straight into `out`.
fn emit(seq: &mut u64, out: &mut BytesMut, kind: &str, body: impl Serialize) {
    #[derive(Serialize)]
    struct Event<'a, B> {
        #[serde(rename = "type")]
        kind: &'a str,
        sequence_number: u64,
        #[serde(flatten)]
        body: B,
    }
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(kind.as_bytes());
    out.extend_from_slice(b"\ndata: ");
    let event = Event {
        kind,
        sequence_number: *seq,
        body,
    };
    *seq += 1;
    let _ = serde_json::to_writer(bytes::BufMut::writer(&mut *out), &event);
    out.extend_from_slice(b"\n\n");
}

/// `response.created`, `….in_progress`, `….completed`, …: the response object.
#[derive(Serialize)]
struct WithResponse<'a> {
    response: &'a Value,
}

/// `response.output_text.delta` (with its empty `logprobs`) and `response.refusal.delta`.
#[derive(Serialize)]
struct PartDelta<'a> {
    item_id: &'a str,
    output_index: usize,
    content_index: usize,
    delta: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    logprobs: Option<[(); 0]>,
}

/// `response.reasoning_summary_text.delta`.
#[derive(Serialize)]
struct SummaryDelta<'a> {
    item_id: &'a str,
    output_index: usize,
    summary_index: usize,
    delta: &'a str,
}

/// `response.function_call_arguments.delta`.
#[derive(Serialize)]
struct ArgumentsDelta<'a> {
    item_id: &'a str,
    output_index: usize,
    delta: &'a str,
}

impl ResponsesStream {
    pub fn new(ctx: ResponseCtx) -> Self {
        Self {
            ctx,
            seq: 0,
            started: false,
            ended: false,
            slots: Vec::new(),
            current: None,
            calls: HashMap::new(),
            finish_reason: None,
            usage: None,
            status: "in_progress",
            error: None,
        }
    }

    /// The response as it stands (the final one once the stream ended).
    pub fn response(&self) -> Value {
        let incomplete = if self.status == "incomplete" {
            incomplete_reason(self.finish_reason.as_deref())
        } else {
            None
        };
        response_object(
            &self.ctx,
            self.status,
            self.slots.iter().map(Slot::json).collect(),
            self.usage.as_ref(),
            incomplete,
            self.error.clone(),
        )
    }

    fn emit(&mut self, out: &mut BytesMut, kind: &str, body: impl Serialize) {
        emit(&mut self.seq, out, kind, body);
    }

    fn ensure_started(&mut self, out: &mut BytesMut) {
        if self.started {
            return;
        }
        self.started = true;
        // The same object both times: built and encoded once.
        let r = self.response();
        self.emit(out, "response.created", WithResponse { response: &r });
        self.emit(out, "response.in_progress", WithResponse { response: &r });
    }

    fn open(&mut self, out: &mut BytesMut, item: OutItem) -> usize {
        let idx = self.slots.len();
        self.slots.push(Slot {
            item,
            done: false,
            status: "in_progress",
        });
        let item = self.slots[idx].json();
        self.emit(
            out,
            "response.output_item.added",
            json!({"output_index": idx, "item": item}),
        );
        idx
    }

    /// Closes a slot: its parts' `done` events, then `response.output_item.done`.
    fn close(&mut self, out: &mut BytesMut, idx: usize, status: &'static str) {
        if self.slots[idx].done {
            return;
        }
        let seq = &mut self.seq;
        match &self.slots[idx].item {
            OutItem::Message { id, parts } => {
                for (j, (kind, text)) in parts.iter().enumerate() {
                    let part = match kind {
                        PartKind::Text => {
                            emit(
                                seq,
                                out,
                                "response.output_text.done",
                                json!({"item_id": id, "output_index": idx, "content_index": j, "text": text, "logprobs": []}),
                            );
                            text_part(text)
                        }
                        PartKind::Refusal => {
                            emit(
                                seq,
                                out,
                                "response.refusal.done",
                                json!({"item_id": id, "output_index": idx, "content_index": j, "refusal": text}),
                            );
                            refusal_part(text)
                        }
                    };
                    emit(
                        seq,
                        out,
                        "response.content_part.done",
                        json!({"item_id": id, "output_index": idx, "content_index": j, "part": part}),
                    );
                }
            }
            OutItem::Reasoning {
                id,
                text,
                summary_open,
                ..
            } => {
                if *summary_open {
                    emit(
                        seq,
                        out,
                        "response.reasoning_summary_text.done",
                        json!({"item_id": id, "output_index": idx, "summary_index": 0, "text": text}),
                    );
                    emit(
                        seq,
                        out,
                        "response.reasoning_summary_part.done",
                        json!({"item_id": id, "output_index": idx, "summary_index": 0, "part": {"type": "summary_text", "text": text}}),
                    );
                }
            }
            OutItem::Function {
                id,
                name,
                arguments,
                ..
            } => {
                emit(
                    seq,
                    out,
                    "response.function_call_arguments.done",
                    json!({"item_id": id, "output_index": idx, "name": name, "arguments": arguments}),
                );
            }
        }
        let slot = &mut self.slots[idx];
        slot.done = true;
        slot.status = status;
        let item = slot.json();
        self.emit(
            out,
            "response.output_item.done",
            json!({"output_index": idx, "item": item}),
        );
        if self.current == Some(idx) {
            self.current = None;
        }
    }

    fn close_current(&mut self, out: &mut BytesMut) {
        if let Some(idx) = self.current.take() {
            self.close(out, idx, "completed");
        }
    }

    /// The open message slot, opening one (and closing a reasoning slot) if needed.
    fn message_slot(&mut self, out: &mut BytesMut) -> usize {
        if let Some(idx) = self.current
            && matches!(self.slots[idx].item, OutItem::Message { .. })
        {
            return idx;
        }
        self.close_current(out);
        let idx = self.open(
            out,
            OutItem::Message {
                id: new_id("msg_"),
                parts: Vec::new(),
            },
        );
        self.current = Some(idx);
        idx
    }

    fn reasoning_slot(&mut self, out: &mut BytesMut) -> usize {
        if let Some(idx) = self.current
            && matches!(self.slots[idx].item, OutItem::Reasoning { .. })
        {
            return idx;
        }
        self.close_current(out);
        let idx = self.open(
            out,
            OutItem::Reasoning {
                id: new_id("rs_"),
                text: String::new(),
                summary_open: false,
                blocks: Vec::new(),
            },
        );
        self.current = Some(idx);
        idx
    }

    /// Text or refusal into the open message: into its last part when of the same kind, else a
    /// new part.
    fn message_delta(&mut self, out: &mut BytesMut, kind: PartKind, delta: &str) {
        let idx = self.message_slot(out);
        let OutItem::Message { id, parts } = &mut self.slots[idx].item else {
            return;
        };
        let seq = &mut self.seq;
        let new_part = parts.last().is_none_or(|(k, _)| *k != kind);
        if new_part {
            parts.push((kind, String::new()));
        }
        let j = parts.len() - 1;
        parts[j].1.push_str(delta);
        if new_part {
            let part = match kind {
                PartKind::Text => text_part(""),
                PartKind::Refusal => refusal_part(""),
            };
            emit(
                seq,
                out,
                "response.content_part.added",
                json!({"item_id": id, "output_index": idx, "content_index": j, "part": part}),
            );
        }
        let (kind, logprobs) = match kind {
            PartKind::Text => ("response.output_text.delta", Some([(); 0])),
            PartKind::Refusal => ("response.refusal.delta", None),
        };
        emit(
            seq,
            out,
            kind,
            PartDelta {
                item_id: id,
                output_index: idx,
                content_index: j,
                delta,
                logprobs,
            },
        );
    }

    fn reasoning_delta(&mut self, out: &mut BytesMut, delta: &str) {
        let idx = self.reasoning_slot(out);
        let OutItem::Reasoning {
            id,
            text,
            summary_open,
            ..
        } = &mut self.slots[idx].item
        else {
            return;
        };
        let seq = &mut self.seq;
        text.push_str(delta);
        let announce = !*summary_open;
        *summary_open = true;
        if announce {
            emit(
                seq,
                out,
                "response.reasoning_summary_part.added",
                json!({"item_id": id, "output_index": idx, "summary_index": 0, "part": {"type": "summary_text", "text": ""}}),
            );
        }
        emit(
            seq,
            out,
            "response.reasoning_summary_text.delta",
            SummaryDelta {
                item_id: id,
                output_index: idx,
                summary_index: 0,
                delta,
            },
        );
    }

    fn reasoning_block(&mut self, out: &mut BytesMut, block: &ReasoningBlock) {
        let idx = self.reasoning_slot(out);
        if let OutItem::Reasoning { blocks, .. } = &mut self.slots[idx].item {
            blocks.push(block.clone());
        }
    }

    fn tool_delta(&mut self, out: &mut BytesMut, d: &crate::pivot::ToolCallDelta) {
        let idx = match self.calls.get(&d.index) {
            Some(&idx) if !self.slots[idx].done => idx,
            _ => {
                self.close_current(out);
                let call_id =
                    d.id.clone()
                        .filter(|s| !s.is_empty())
                        .unwrap_or_else(|| new_id("call_"));
                let idx = self.open(
                    out,
                    OutItem::Function {
                        id: new_id("fc_"),
                        call_id,
                        name: d.function.name.clone().unwrap_or_default(),
                        arguments: String::new(),
                    },
                );
                self.calls.insert(d.index, idx);
                idx
            }
        };
        let OutItem::Function {
            id,
            name,
            arguments,
            ..
        } = &mut self.slots[idx].item
        else {
            return;
        };
        if name.is_empty()
            && let Some(n) = &d.function.name
        {
            n.clone_into(name);
        }
        if let Some(delta) = d.function.arguments.as_deref().filter(|a| !a.is_empty()) {
            arguments.push_str(delta);
            emit(
                &mut self.seq,
                out,
                "response.function_call_arguments.delta",
                ArgumentsDelta {
                    item_id: id,
                    output_index: idx,
                    delta,
                },
            );
        }
    }

    fn end(&mut self, out: &mut BytesMut) {
        self.ensure_started(out);
        let incomplete = incomplete_reason(self.finish_reason.as_deref()).is_some();
        let status = if incomplete {
            "incomplete"
        } else {
            "completed"
        };
        self.current = None;
        for idx in 0..self.slots.len() {
            self.close(out, idx, status);
        }
        self.status = status;
        self.ended = true;
        let r = self.response();
        let kind = if incomplete {
            "response.incomplete"
        } else {
            "response.completed"
        };
        self.emit(out, kind, WithResponse { response: &r });
    }
}

impl ChunkEncoder for ResponsesStream {
    fn start(&mut self, out: &mut BytesMut) {
        self.ensure_started(out);
    }

    fn chunk(&mut self, chunk: &ChatChunk, out: &mut BytesMut) {
        if self.ended {
            return;
        }
        self.ensure_started(out);
        if let Some(u) = chunk.usage {
            self.usage = Some(Usage::from(u));
        }
        let Some(choice) = chunk.choices.iter().find(|c| c.index == 0) else {
            return;
        };
        let d = &choice.delta;
        if let Some(r) = d.reasoning_content.as_deref().filter(|r| !r.is_empty()) {
            self.reasoning_delta(out, r);
        }
        for b in &d.reasoning_blocks {
            self.reasoning_block(out, b);
        }
        if let Some(t) = d.content.as_deref().filter(|t| !t.is_empty()) {
            self.message_delta(out, PartKind::Text, t);
        }
        if let Some(r) = d.refusal.as_deref().filter(|r| !r.is_empty()) {
            self.message_delta(out, PartKind::Refusal, r);
        }
        for t in &d.tool_calls {
            self.tool_delta(out, t);
        }
        if let Some(f) = &choice.finish_reason {
            self.finish_reason = Some(f.clone());
        }
    }

    fn finish(&mut self, usage: Option<Usage>, out: &mut BytesMut) {
        if self.ended {
            return;
        }
        if usage.is_some() {
            self.usage = usage;
        }
        self.end(out);
    }

    fn fail(&mut self, err: &UpstreamError, out: &mut BytesMut) {
        if self.ended {
            return;
        }
        self.ensure_started(out);
        for slot in self.slots.iter_mut().filter(|s| !s.done) {
            slot.status = "incomplete";
        }
        self.status = "failed";
        self.error = Some(json!({"code": error_code(err), "message": err.message}));
        self.ended = true;
        let r = self.response();
        self.emit(out, "response.failed", WithResponse { response: &r });
    }

    fn final_object(&self) -> Option<Value> {
        Some(self.response())
    }
}

// ------------------------------------------------------------------------------------------------
// The generic pipeline's view
// ------------------------------------------------------------------------------------------------

/// The Responses API for the generic client-protocol pipeline. Without the parsed request the
/// answer cannot echo the request's fields: callers that have it use [`from_chat`] and
/// [`ResponsesStream::new`] with a full [`ResponseCtx`].
pub struct Responses;

impl Responses {
    fn ctx(ctx: &EncodeCtx) -> ResponseCtx {
        ResponseCtx {
            id: ctx.id.clone().unwrap_or_else(|| new_id("resp_")),
            created_at: ctx.created,
            model: ctx.client_model.clone(),
            request: ResponsesRequest {
                model: ctx.client_model.clone(),
                ..ResponsesRequest::default()
            },
            store: false,
            ..ResponseCtx::default()
        }
    }
}

impl ClientProtocol for Responses {
    fn decode_request(&self, body: &[u8]) -> Result<ChatRequest, ApiError> {
        to_chat(&parse(body)?, &[])
    }

    fn encode_response(&self, resp: &ChatResponse, ctx: &EncodeCtx) -> Vec<u8> {
        serde_json::to_vec(&from_chat(resp, &Self::ctx(ctx))).unwrap_or_default()
    }

    fn stream_encoder(&self, ctx: &EncodeCtx) -> Box<dyn ChunkEncoder> {
        Box::new(ResponsesStream::new(Self::ctx(ctx)))
    }

    fn error_body(&self, _status: u16, err: &UpstreamError) -> Vec<u8> {
        super::openai_chat::error_json(err)
    }

    fn errors_are_openai(&self) -> bool {
        true
    }
}

// ------------------------------------------------------------------------------------------------
// Pass-through to a Responses-capable upstream
// ------------------------------------------------------------------------------------------------

/// A history item as an upstream that stores nothing takes it: ids of tollgate's own items
/// mean nothing there and are dropped (they are optional in input); reasoning keeps its id but
/// only with OpenAI's own `encrypted_content` (an envelope or a summary alone is dropped).
fn upstream_item(item: &Item) -> Option<Item> {
    let mut item = item.clone();
    let o = item.as_object_mut()?;
    match o.get("type").and_then(Value::as_str).unwrap_or("message") {
        "reasoning" => {
            let enc = o.get("encrypted_content").and_then(Value::as_str)?;
            if enc.starts_with(ENVELOPE_PREFIX) {
                return None;
            }
            o.remove("status");
        }
        "message" | "function_call" | "function_call_output" => {
            o.remove("id");
        }
        _ => {}
    }
    Some(item)
}

/// The body for a Responses-capable upstream: the request with the full input (`history` then
/// the new input), `model` replaced, `store: false`, `previous_response_id` and `conversation`
/// removed (tollgate resolved them), and `include` asking for `reasoning.encrypted_content` so
/// reasoning can be stored and sent back next turn.
pub fn upstream_body(req: &ResponsesRequest, history: &[Item], upstream_model: &str) -> Vec<u8> {
    let mut o = Map::new();
    o.insert("model".into(), upstream_model.into());
    let input = if history.is_empty() {
        match &req.input {
            Input::Text(t) => Value::String(t.clone()),
            Input::Items(items) => Value::Array(items.clone()),
        }
    } else {
        let mut items: Vec<Item> = history.iter().filter_map(upstream_item).collect();
        match &req.input {
            Input::Text(t) => items.push(json!({"type": "message", "role": "user", "content": t})),
            Input::Items(new) => items.extend(new.iter().cloned()),
        }
        Value::Array(items)
    };
    o.insert("input".into(), input);
    let opt = |o: &mut Map<String, Value>, k: &str, v: Option<Value>| {
        if let Some(v) = v {
            o.insert(k.into(), v);
        }
    };
    opt(
        &mut o,
        "instructions",
        req.instructions.clone().map(Value::from),
    );
    if !req.tools.is_empty() {
        o.insert("tools".into(), Value::Array(req.tools.clone()));
    }
    opt(&mut o, "tool_choice", req.tool_choice.clone());
    opt(
        &mut o,
        "parallel_tool_calls",
        req.parallel_tool_calls.map(Value::from),
    );
    opt(&mut o, "text", req.text.clone());
    opt(
        &mut o,
        "max_output_tokens",
        req.max_output_tokens.map(Value::from),
    );
    opt(&mut o, "temperature", req.temperature.map(Value::from));
    opt(&mut o, "top_p", req.top_p.map(Value::from));
    opt(&mut o, "metadata", req.metadata.clone());
    opt(&mut o, "reasoning", req.reasoning.clone());
    let mut include = req.include.clone();
    if !include.iter().any(|i| i == "reasoning.encrypted_content") {
        include.push("reasoning.encrypted_content".into());
    }
    o.insert("include".into(), json!(include));
    if req.stream {
        o.insert("stream".into(), true.into());
    }
    opt(&mut o, "user", req.user.clone().map(Value::from));
    opt(
        &mut o,
        "safety_identifier",
        req.safety_identifier.clone().map(Value::from),
    );
    opt(
        &mut o,
        "truncation",
        req.truncation.clone().map(Value::from),
    );
    for (k, v) in &req.extra {
        if !matches!(
            k.as_str(),
            "previous_response_id" | "conversation" | "store"
        ) {
            o.insert(k.clone(), v.clone());
        }
    }
    o.insert("store".into(), false.into());
    serde_json::to_vec(&Value::Object(o)).unwrap_or_default()
}

/// A token count from untrusted JSON: anything but a number, and negatives, are 0; a huge
/// count saturates (`as` from a float saturates, and NaN cannot come out of JSON).
fn count(v: Option<&Value>) -> i64 {
    match v {
        Some(Value::Number(n)) => match n.as_i64() {
            Some(i) => i.max(0),
            None => n.as_f64().map_or(0, |f| f.max(0.0) as i64),
        },
        _ => 0,
    }
}

/// A Responses `usage` object as tollgate's [`Usage`] (`None` when it is not an object).
pub fn usage_from_json(u: &Value) -> Option<Usage> {
    let u = u.as_object()?;
    let prompt = count(u.get("input_tokens"));
    let completion = count(u.get("output_tokens"));
    let input_details = u.get("input_tokens_details");
    let output_details = u.get("output_tokens_details");
    Some(Usage {
        prompt,
        completion,
        cached: count(input_details.and_then(|d| d.get("cached_tokens"))).min(prompt),
        cache_write: count(input_details.and_then(|d| d.get("cache_write_tokens"))).min(prompt),
        reasoning: count(output_details.and_then(|d| d.get("reasoning_tokens"))).min(completion),
    })
}

/// The usage of a complete `response` body from the upstream.
pub fn usage_of_response(body: &[u8]) -> Option<Usage> {
    let v: Value = serde_json::from_slice(body).ok()?;
    usage_from_json(v.get("usage")?)
}

/// The usage of one streamed event's `data:`: only the terminal events (`response.completed`,
/// `response.incomplete`, `response.failed`) carry it; other events are not parsed.
pub fn usage_of_event(data: &[u8]) -> Option<Usage> {
    let terminal = [
        &b"response.completed"[..],
        b"response.incomplete",
        b"response.failed",
    ];
    if !terminal
        .iter()
        .any(|t| memchr::memmem::find(data, t).is_some())
    {
        return None;
    }
    let v: Value = serde_json::from_slice(data).ok()?;
    match v.get("type").and_then(Value::as_str) {
        Some("response.completed" | "response.incomplete" | "response.failed") => {
            usage_from_json(v.get("response")?.get("usage")?)
        }
        _ => None,
    }
}

/// A response's output items, for storage.
pub fn output_items(response: &Value) -> Vec<Item> {
    response
        .get("output")
        .and_then(Value::as_array)
        .map(|items| items.iter().filter(|i| i.is_object()).cloned().collect())
        .unwrap_or_default()
}
