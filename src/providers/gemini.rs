//! Google AI's Gemini API (`generateContent`, `streamGenerateContent?alt=sse`,
//! `batchEmbedContents`; not Vertex AI), reached through the pivot.
//!
//! Choices made where the two APIs do not line up (README-worthy):
//! - **Images**: a base64 `data:` URL becomes `inlineData`; an `http(s)` URL becomes `fileData`
//!   (the Gemini API fetches public and signed URLs itself, and takes its own Files API URIs), with
//!   the MIME type guessed from the file extension when it has one; any other scheme is 400
//!   `unsupported_content`.
//! - **Thought signatures**: a signature on a response part becomes a `thought_signature`
//!   reasoning block whose `id` is the tool call id when it was on a `functionCall` part and
//!   absent when it was on a text part; the next request puts each back on that part. Gemini 3
//!   refuses a function call turn without its signature, so for Gemini 3 and later an
//!   assistant turn with tool calls and no signature at all (history made by another model)
//!   gets Google's documented placeholder `skip_thought_signature_validator` on its first call
//!   (Gemini 2.x does not require signatures and gets none).
//! - **Blocked prompts**: `promptFeedback.blockReason` with no candidates is a normal answer with
//!   one empty choice whose `finish_reason` is `content_filter` (as OpenAI reports filtered
//!   output), so the client gets a well-formed answer and the prompt tokens are metered.
//! - **Usage**: `prompt = promptTokenCount + toolUsePromptTokenCount` (cached tokens are inside
//!   `promptTokenCount`), `cached = cachedContentTokenCount`,
//!   `completion = candidatesTokenCount + thoughtsTokenCount` (Gemini counts thoughts apart),
//!   `reasoning = thoughtsTokenCount`. A stream's `usageMetadata` is cumulative: the last one
//!   wins, reported in one usage chunk at the end.
//! - **Tool call ids**: Gemini gives none; each call gets a fresh `call_<24 hex>`, and a tool
//!   result finds its function's name from the earlier assistant call with its id.

use std::collections::HashMap;

use http::{HeaderMap, HeaderValue};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::{ChunkDecoder, Operation, StreamFault, Target, Translator, Usage};
use crate::error::ApiError;
use crate::pivot::{
    ChatChunk, ChatRequest, ChatResponse, Choice, ChunkChoice, Content, Delta, FunctionCall,
    FunctionDelta, Message, Part, ReasoningBlock, Role, ToolCall, ToolCallDelta, UpstreamError,
    WireUsage,
};
use crate::proxy::stream::{EventTooLarge, SseScanner};

pub struct Gemini;

/// The reasoning block kind that carries a Gemini `thoughtSignature`.
pub const THOUGHT_SIGNATURE: &str = "thought_signature";

/// Google's documented stand-in for a signature the history does not have (a function call
/// turn made by another model); Gemini 3 skips its validation.
pub const SKIP_SIGNATURE: &str = "skip_thought_signature_validator";

/// More candidates than this in one stream is not Gemini (`candidateCount` is at most 8).
const MAX_CANDIDATES: usize = 64;

// ---- names and URLs ----

/// RFC 3986 unreserved characters stay; every other byte is `%XX`.
pub(crate) fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The model name as Gemini knows it (a leading `models/` is dropped), refused when it could
/// leave its path segment.
fn model_name(upstream_model: &str) -> Result<&str, ApiError> {
    let m = upstream_model
        .strip_prefix("models/")
        .unwrap_or(upstream_model);
    if m.is_empty()
        || m == "."
        || m == ".."
        || m.contains(['/', '\\'])
        || m.chars().any(char::is_control)
    {
        return Err(ApiError::bad_request(
            "invalid_value",
            format!("The upstream model name {upstream_model:?} is not a Gemini model name."),
        ));
    }
    Ok(m)
}

fn bad(code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::bad_request(code, message)
}

fn malformed(what: impl std::fmt::Display) -> ApiError {
    ApiError::Upstream {
        status: http::StatusCode::BAD_GATEWAY,
        message: format!("The upstream's answer is not a Gemini answer: {what}"),
        code: "upstream_error",
    }
}

// ---- request: pivot → generateContent ----

/// The MIME type of an image URL's file extension, when it names one Gemini takes.
fn mime_from_extension(url: &str) -> Option<&'static str> {
    let path = url.split(['?', '#']).next().unwrap_or(url);
    let ext = path.rsplit_once('.')?.1.to_ascii_lowercase();
    Some(match ext.as_str() {
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "webp" => "image/webp",
        "heic" => "image/heic",
        "heif" => "image/heif",
        "gif" => "image/gif",
        "pdf" => "application/pdf",
        _ => return None,
    })
}

fn image_part(url: &str) -> Result<Value, ApiError> {
    let image = crate::pivot::ImageUrl {
        url: url.to_owned(),
        detail: None,
    };
    if let Some((mime, data)) = image.as_data() {
        return Ok(json!({"inlineData": {"mimeType": mime, "data": data}}));
    }
    if url.starts_with("data:") {
        return Err(bad(
            "unsupported_content",
            "An image data URL must be base64 (data:<type>;base64,<data>) for a Gemini model.",
        ));
    }
    let lower = url.get(..8).unwrap_or(url).to_ascii_lowercase();
    if lower.starts_with("https://") || lower.starts_with("http://") {
        let mut fd = Map::new();
        if let Some(mime) = mime_from_extension(url) {
            fd.insert("mimeType".into(), mime.into());
        }
        fd.insert("fileUri".into(), url.into());
        return Ok(json!({ "fileData": fd }));
    }
    let scheme = url.split_once(':').map_or("", |(s, _)| s);
    Err(bad(
        "unsupported_content",
        format!(
            "A Gemini model takes images as base64 data URLs or http(s) URLs, not {scheme:?} URLs."
        ),
    ))
}

/// One pivot content part as Gemini parts (`None`: nothing to send).
fn content_part(p: &Part) -> Result<Option<Value>, ApiError> {
    match p.kind.as_str() {
        "text" | "refusal" | "input_text" | "output_text" => {
            let text = p
                .text
                .as_deref()
                .or_else(|| p.extra.get("refusal").and_then(Value::as_str))
                .unwrap_or("");
            Ok((!text.is_empty()).then(|| json!({ "text": text })))
        }
        "image_url" => {
            let url = p
                .image_url
                .as_ref()
                .map(|i| i.url.as_str())
                .ok_or_else(|| bad("missing_field", "An image_url part needs its url."))?;
            image_part(url).map(Some)
        }
        "input_audio" => {
            let audio = p.extra.get("input_audio");
            let data = audio.and_then(|a| a.get("data")).and_then(Value::as_str);
            let format = audio.and_then(|a| a.get("format")).and_then(Value::as_str);
            match (data, format) {
                (Some(data), Some(format)) => Ok(Some(json!({
                    "inlineData": {"mimeType": format!("audio/{format}"), "data": data}
                }))),
                _ => Err(bad(
                    "missing_field",
                    "An input_audio part needs its data and format.",
                )),
            }
        }
        "file" => {
            let file_data = p
                .extra
                .get("file")
                .and_then(|f| f.get("file_data"))
                .and_then(Value::as_str);
            match file_data {
                Some(url) if url.starts_with("data:") => image_part(url).map(Some),
                _ => Err(bad(
                    "unsupported_content",
                    "A Gemini model takes files as base64 file_data, not by file_id.",
                )),
            }
        }
        other => Err(bad(
            "unsupported_content",
            format!("A Gemini model cannot take a content part of type {other:?}."),
        )),
    }
}

fn content_parts(content: &Option<Content>) -> Result<Vec<Value>, ApiError> {
    match content {
        None => Ok(Vec::new()),
        Some(Content::Text(t)) if t.is_empty() => Ok(Vec::new()),
        Some(Content::Text(t)) => Ok(vec![json!({ "text": t })]),
        Some(Content::Parts(parts)) => {
            let mut out = Vec::with_capacity(parts.len());
            for p in parts {
                if let Some(v) = content_part(p)? {
                    out.push(v);
                }
            }
            Ok(out)
        }
    }
}

/// A function call's arguments: a JSON object (empty text is `{}`).
fn call_args(call: &ToolCall) -> Result<Value, ApiError> {
    if call.function.arguments.trim().is_empty() {
        return Ok(json!({}));
    }
    match serde_json::from_str::<Value>(&call.function.arguments) {
        Ok(v @ Value::Object(_)) => Ok(v),
        _ => Err(bad(
            "invalid_value",
            format!(
                "The arguments of tool call {:?} must be a JSON object for a Gemini model.",
                call.id
            ),
        )),
    }
}

/// An assistant message as a `model` turn's parts, thought signatures back where they were.
/// `placeholder`: the model validates signatures (Gemini 3), so a call turn without any gets
/// [`SKIP_SIGNATURE`].
fn assistant_parts(m: &Message, placeholder: bool) -> Result<Vec<Value>, ApiError> {
    let mut by_call: HashMap<&str, &str> = HashMap::new();
    let mut on_text: Option<&str> = None;
    for b in &m.reasoning_blocks {
        if b.kind != THOUGHT_SIGNATURE {
            continue;
        }
        let Some(sig) = b.signature.as_deref() else {
            continue;
        };
        match b.id.as_deref() {
            Some(id) => {
                by_call.insert(id, sig);
            }
            None => on_text = Some(sig),
        }
    }
    let mut parts = content_parts(&m.content)?;
    if let Some(sig) = on_text
        && let Some(Value::Object(last)) = parts.iter_mut().rev().find(|p| p.get("text").is_some())
    {
        last.insert("thoughtSignature".into(), sig.into());
        on_text = None;
    }
    let first_call = parts.len();
    for call in &m.tool_calls {
        let mut part = Map::new();
        part.insert(
            "functionCall".into(),
            json!({"name": call.function.name, "args": call_args(call)?}),
        );
        if let Some(sig) = by_call.get(call.id.as_str()) {
            part.insert("thoughtSignature".into(), (*sig).into());
        }
        parts.push(Value::Object(part));
    }
    if !m.tool_calls.is_empty() {
        let signed = parts[first_call..]
            .iter()
            .any(|p| p.get("thoughtSignature").is_some());
        // A text signature with no text to sit on goes to the first call; with none at all
        // the placeholder keeps Gemini 3 from refusing history it did not write.
        let sig = on_text.or(placeholder.then_some(SKIP_SIGNATURE));
        if let Some(Value::Object(first)) = parts.get_mut(first_call)
            && let Some(sig) = sig
            && !signed
        {
            first.insert("thoughtSignature".into(), sig.into());
        }
    }
    Ok(parts)
}

/// A tool result's `response`: the content as JSON when it is an object, else `{"result": …}`.
fn tool_response(m: &Message) -> Value {
    let text = m.text_content();
    match serde_json::from_str::<Value>(&text) {
        Ok(v @ Value::Object(_)) => v,
        Ok(v) => json!({ "result": v }),
        Err(_) => json!({ "result": text }),
    }
}

/// Adds `parts` as a turn of `role`, merged into the previous turn when it has the same role.
fn push_turn(contents: &mut Vec<Value>, role: &str, parts: Vec<Value>) {
    if parts.is_empty() {
        return;
    }
    if let Some(last) = contents.last_mut()
        && last.get("role").and_then(Value::as_str) == Some(role)
        && let Some(Value::Array(existing)) = last.get_mut("parts")
    {
        existing.extend(parts);
        return;
    }
    contents.push(json!({"role": role, "parts": parts}));
}

fn function_declarations(
    req: &ChatRequest,
    allowed: Option<&[String]>,
) -> Result<Vec<Value>, ApiError> {
    let mut out = Vec::with_capacity(req.tools.len());
    for tool in &req.tools {
        if tool.kind != "function" {
            return Err(bad(
                "unsupported_tool",
                format!("A Gemini model cannot serve the {:?} tool.", tool.kind),
            ));
        }
        let Some(f) = &tool.function else {
            return Err(bad("missing_field", "A function tool needs its function."));
        };
        if allowed.is_some_and(|names| !names.contains(&f.name)) {
            continue;
        }
        let mut decl = Map::new();
        decl.insert("name".into(), f.name.clone().into());
        if let Some(d) = &f.description {
            decl.insert("description".into(), d.clone().into());
        }
        // `parametersJsonSchema` takes JSON Schema as written (`parameters` is an OpenAPI
        // subset that refuses keywords such as `additionalProperties` and `$ref`).
        if let Some(p) = &f.parameters {
            decl.insert("parametersJsonSchema".into(), p.clone());
        }
        out.push(Value::Object(decl));
    }
    Ok(out)
}

/// `tool_choice` → `(functionCallingConfig, names the declarations are limited to)`.
/// `allowed_tools` limits the declarations themselves (Gemini's `allowedFunctionNames` only
/// applies in `ANY` mode).
fn tool_config(choice: &Value) -> Result<(Value, Option<Vec<String>>), ApiError> {
    let invalid = || {
        ApiError::invalid_param(
            "tool_choice",
            "tool_choice must be none, auto, required or a function tool.",
        )
    };
    match choice {
        Value::String(s) => {
            let mode = match s.as_str() {
                "none" => "NONE",
                "auto" => "AUTO",
                "required" => "ANY",
                _ => return Err(invalid()),
            };
            Ok((json!({ "mode": mode }), None))
        }
        Value::Object(o) => match o.get("type").and_then(Value::as_str) {
            Some("function") => {
                let name = o
                    .get("function")
                    .and_then(|f| f.get("name"))
                    .and_then(Value::as_str)
                    .ok_or_else(invalid)?;
                Ok((json!({"mode": "ANY", "allowedFunctionNames": [name]}), None))
            }
            Some("allowed_tools") => {
                let at = o.get("allowed_tools").ok_or_else(invalid)?;
                let mode = match at.get("mode").and_then(Value::as_str) {
                    Some("required") => "ANY",
                    Some("auto") | None => "AUTO",
                    _ => return Err(invalid()),
                };
                let names = at
                    .get("tools")
                    .and_then(Value::as_array)
                    .map(|ts| {
                        ts.iter()
                            .filter_map(|t| {
                                t.get("function")
                                    .and_then(|f| f.get("name"))
                                    .or_else(|| t.get("name"))
                                    .and_then(Value::as_str)
                                    .map(str::to_owned)
                            })
                            .collect::<Vec<_>>()
                    })
                    .ok_or_else(invalid)?;
                Ok((json!({ "mode": mode }), Some(names)))
            }
            _ => Err(invalid()),
        },
        _ => Err(invalid()),
    }
}

/// Whether the model sets its thinking by budget (Gemini 1.x and 2.x) rather than by level
/// (Gemini 3 and later, and names tollgate does not recognise).
fn thinks_by_budget(model: &str) -> bool {
    let m = model.strip_prefix("models/").unwrap_or(model);
    m.starts_with("gemini-1") || m.starts_with("gemini-2")
}

/// `reasoning_effort` → `thinkingConfig`:
///
/// | effort | Gemini 2.x `thinkingBudget` | Gemini 3+ `thinkingLevel` (Flash / Pro) |
/// |---|---|---|
/// | `none` | `0` (thinking off; thoughts not included) | `minimal` / `low` |
/// | `minimal` | `512` | `minimal` / `low` |
/// | `low` | `1024` | `low` |
/// | `medium` | `8192` | `medium` / `high` |
/// | `high`, `xhigh` | `24576` | `high` |
///
/// `includeThoughts` is `true` (thought summaries come back as `reasoning_content`) except for
/// `none`. Gemini 3 Pro takes only `low` and `high`, hence the Pro column. Without
/// `reasoning_effort`, Anthropic's `thinking` extension (`{"type": "enabled",
/// "budget_tokens": n}`) becomes `thinkingBudget: n` (every Gemini model takes a budget).
fn thinking_config(req: &ChatRequest, model: &str) -> Option<Value> {
    if let Some(effort) = req.reasoning_effort.as_deref() {
        let include = effort != "none";
        if thinks_by_budget(model) {
            let budget = match effort {
                "none" => 0,
                "minimal" => 512,
                "low" => 1024,
                "medium" => 8192,
                _ => 24576,
            };
            return Some(json!({"thinkingBudget": budget, "includeThoughts": include}));
        }
        let flash = model.contains("flash");
        let level = match effort {
            "none" | "minimal" if flash => "minimal",
            "none" | "minimal" | "low" => "low",
            "medium" if flash => "medium",
            _ => "high",
        };
        return Some(json!({"thinkingLevel": level, "includeThoughts": include}));
    }
    let thinking = req.thinking.as_ref()?;
    match thinking.get("type").and_then(Value::as_str) {
        Some("enabled") => {
            let budget = thinking.get("budget_tokens").and_then(Value::as_u64)?;
            Some(json!({"thinkingBudget": budget.min(i32::MAX as u64), "includeThoughts": true}))
        }
        Some("disabled") if thinks_by_budget(model) => Some(json!({"thinkingBudget": 0})),
        _ => None,
    }
}

fn generation_config(req: &ChatRequest, model: &str) -> Result<Map<String, Value>, ApiError> {
    let mut g = Map::new();
    if let Some(max) = req.max_output() {
        g.insert("maxOutputTokens".into(), max.min(i32::MAX as u64).into());
    }
    if let Some(t) = req.temperature {
        g.insert("temperature".into(), t.into());
    }
    if let Some(p) = req.top_p {
        g.insert("topP".into(), p.into());
    }
    if !req.stop.is_empty() {
        g.insert("stopSequences".into(), req.stop.clone().into());
    }
    if let Some(n) = req.n {
        g.insert("candidateCount".into(), n.min(i32::MAX as u64).into());
    }
    for (from, to) in [
        ("seed", "seed"),
        ("presence_penalty", "presencePenalty"),
        ("frequency_penalty", "frequencyPenalty"),
    ] {
        if let Some(v) = req.extra.get(from).filter(|v| v.is_number()) {
            g.insert(to.into(), v.clone());
        }
    }
    if let Some(rf) = &req.response_format {
        match rf.get("type").and_then(Value::as_str) {
            Some("json_schema") => {
                let schema = rf
                    .get("json_schema")
                    .and_then(|s| s.get("schema"))
                    .ok_or_else(|| {
                        ApiError::invalid_param(
                            "response_format",
                            "response_format json_schema needs json_schema.schema.",
                        )
                    })?;
                g.insert("responseMimeType".into(), "application/json".into());
                // JSON Schema as written (`responseSchema` is the OpenAPI subset).
                g.insert("responseJsonSchema".into(), schema.clone());
            }
            Some("json_object") => {
                g.insert("responseMimeType".into(), "application/json".into());
            }
            Some("text") | None => {}
            Some(other) => {
                return Err(ApiError::invalid_param(
                    "response_format",
                    format!("A Gemini model cannot take response_format {other:?}."),
                ));
            }
        }
    }
    if let Some(tc) = thinking_config(req, model) {
        g.insert("thinkingConfig".into(), tc);
    }
    Ok(g)
}

/// The `generateContent` body for `req`.
pub fn encode_request(req: &ChatRequest, model: &str) -> Result<Value, ApiError> {
    let mut system: Vec<Value> = Vec::new();
    let mut contents: Vec<Value> = Vec::with_capacity(req.messages.len());
    // Tool call id → function name, from the assistant turns seen so far.
    let mut call_names: HashMap<&str, &str> = HashMap::new();
    for m in &req.messages {
        match m.role {
            Role::System | Role::Developer => system.extend(content_parts(&m.content)?),
            Role::User => push_turn(&mut contents, "user", content_parts(&m.content)?),
            Role::Assistant => {
                for c in &m.tool_calls {
                    call_names.insert(c.id.as_str(), c.function.name.as_str());
                }
                push_turn(
                    &mut contents,
                    "model",
                    assistant_parts(m, !thinks_by_budget(model))?,
                );
            }
            Role::Tool | Role::Function => {
                let name = m
                    .tool_call_id
                    .as_deref()
                    .and_then(|id| call_names.get(id).copied())
                    .or(m.name.as_deref())
                    .ok_or_else(|| {
                        bad(
                            "invalid_value",
                            format!(
                                "The tool result for {:?} answers no earlier assistant tool call.",
                                m.tool_call_id.as_deref().unwrap_or("")
                            ),
                        )
                    })?;
                let part =
                    json!({"functionResponse": {"name": name, "response": tool_response(m)}});
                push_turn(&mut contents, "user", vec![part]);
            }
        }
    }
    let mut body = Map::new();
    body.insert("contents".into(), contents.into());
    if !system.is_empty() {
        body.insert("systemInstruction".into(), json!({ "parts": system }));
    }
    let (tool_cfg, allowed) = match &req.tool_choice {
        Some(tc) if !req.tools.is_empty() => {
            let (cfg, allowed) = tool_config(tc)?;
            (Some(cfg), allowed)
        }
        _ => (None, None),
    };
    let decls = function_declarations(req, allowed.as_deref())?;
    if !decls.is_empty() {
        body.insert("tools".into(), json!([{ "functionDeclarations": decls }]));
    }
    if let Some(cfg) = tool_cfg {
        body.insert("toolConfig".into(), json!({ "functionCallingConfig": cfg }));
    }
    let g = generation_config(req, model)?;
    if !g.is_empty() {
        body.insert("generationConfig".into(), Value::Object(g));
    }
    Ok(Value::Object(body))
}

// ---- answers: generateContent → pivot ----

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct GenResponse {
    #[serde(default)]
    candidates: Option<Vec<Candidate>>,
    #[serde(default)]
    prompt_feedback: Option<PromptFeedback>,
    #[serde(default)]
    usage_metadata: Option<Value>,
    #[serde(default)]
    model_version: Option<String>,
    #[serde(default)]
    response_id: Option<String>,
    #[serde(default)]
    error: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Candidate {
    #[serde(default)]
    content: Option<CandidateContent>,
    #[serde(default)]
    finish_reason: Option<String>,
    #[serde(default)]
    index: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
struct CandidateContent {
    #[serde(default)]
    parts: Option<Vec<RespPart>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RespPart {
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    thought: Option<bool>,
    #[serde(default)]
    thought_signature: Option<String>,
    #[serde(default)]
    function_call: Option<RespCall>,
}

#[derive(Debug, Default, Deserialize)]
struct RespCall {
    #[serde(default)]
    name: String,
    #[serde(default)]
    args: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PromptFeedback {
    #[serde(default)]
    block_reason: Option<String>,
}

/// A token count from hostile JSON: a number or a numeric string, never negative.
fn count(v: Option<&Value>) -> i64 {
    let n = match v {
        Some(Value::Number(n)) => n
            .as_i64()
            .or_else(|| n.as_u64().map(|_| i64::MAX))
            .or_else(|| n.as_f64().map(|f| f as i64)),
        Some(Value::String(s)) => s.trim().parse::<i64>().ok(),
        _ => None,
    };
    n.unwrap_or(0).max(0)
}

/// `usageMetadata` in tollgate's terms (`None` unless it is an object).
pub fn usage_from_metadata(meta: &Value) -> Option<Usage> {
    let o = meta.as_object()?;
    let prompt =
        count(o.get("promptTokenCount")).saturating_add(count(o.get("toolUsePromptTokenCount")));
    let thoughts = count(o.get("thoughtsTokenCount"));
    let completion = count(o.get("candidatesTokenCount")).saturating_add(thoughts);
    Some(Usage {
        prompt,
        completion,
        cached: count(o.get("cachedContentTokenCount")).min(prompt),
        cache_write: 0,
        reasoning: thoughts.min(completion),
    })
}

/// Gemini's `finishReason` as OpenAI's.
fn finish_reason(reason: &str, has_calls: bool) -> &'static str {
    match reason {
        "MAX_TOKENS" => "length",
        "SAFETY"
        | "RECITATION"
        | "BLOCKLIST"
        | "PROHIBITED_CONTENT"
        | "SPII"
        | "IMAGE_SAFETY"
        | "IMAGE_PROHIBITED_CONTENT" => "content_filter",
        _ if has_calls => "tool_calls",
        _ => "stop",
    }
}

fn new_call_id() -> String {
    let u = uuid::Uuid::new_v4().simple().to_string();
    format!("call_{}", &u[..24])
}

fn new_completion_id() -> String {
    format!("chatcmpl-{}", uuid::Uuid::new_v4().simple())
}

fn signature_block(sig: &str, call_id: Option<&str>) -> ReasoningBlock {
    ReasoningBlock {
        kind: THOUGHT_SIGNATURE.into(),
        signature: Some(sig.to_owned()),
        id: call_id.map(str::to_owned),
        ..ReasoningBlock::default()
    }
}

/// A candidate's parts, decoded: (text, thoughts, tool calls, signature blocks).
#[derive(Default)]
struct Decoded {
    text: String,
    thoughts: String,
    calls: Vec<ToolCall>,
    blocks: Vec<ReasoningBlock>,
}

fn decode_parts(parts: &[RespPart]) -> Decoded {
    let mut d = Decoded::default();
    for p in parts {
        let mut call_id = None;
        if let Some(fc) = &p.function_call {
            let id = new_call_id();
            d.calls.push(ToolCall {
                id: id.clone(),
                kind: "function".into(),
                function: FunctionCall {
                    name: fc.name.clone(),
                    arguments: args_text(fc.args.as_ref()),
                },
            });
            call_id = Some(id);
        } else if let Some(t) = &p.text {
            if p.thought == Some(true) {
                d.thoughts.push_str(t);
            } else {
                d.text.push_str(t);
            }
        }
        if let Some(sig) = p.thought_signature.as_deref().filter(|s| !s.is_empty()) {
            d.blocks.push(signature_block(sig, call_id.as_deref()));
        }
    }
    d
}

fn args_text(args: Option<&Value>) -> String {
    match args {
        None | Some(Value::Null) => "{}".into(),
        Some(v) => serde_json::to_string(v).unwrap_or_else(|_| "{}".into()),
    }
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

fn blocked_choice(index: u32) -> Choice {
    Choice {
        index,
        message: Message {
            role: Role::Assistant,
            content: Some(Content::Text(String::new())),
            ..Message::default()
        },
        finish_reason: Some("content_filter".into()),
        logprobs: None,
    }
}

/// A complete `generateContent` answer as a chat completion.
pub fn decode_response(body: &[u8], upstream_model: &str) -> Result<ChatResponse, ApiError> {
    let r: GenResponse = serde_json::from_slice(body).map_err(malformed)?;
    let mut choices = Vec::new();
    for (pos, c) in r.candidates.unwrap_or_default().into_iter().enumerate() {
        let parts = c.content.and_then(|c| c.parts).unwrap_or_default();
        let d = decode_parts(&parts);
        let has_calls = !d.calls.is_empty();
        let content = if d.text.is_empty() && has_calls {
            None
        } else {
            Some(Content::Text(d.text))
        };
        choices.push(Choice {
            index: c.index.unwrap_or(pos as u32),
            message: Message {
                role: Role::Assistant,
                content,
                tool_calls: d.calls,
                reasoning_content: (!d.thoughts.is_empty()).then_some(d.thoughts),
                reasoning_blocks: d.blocks,
                ..Message::default()
            },
            finish_reason: Some(
                finish_reason(c.finish_reason.as_deref().unwrap_or("STOP"), has_calls).into(),
            ),
            logprobs: None,
        });
    }
    if choices.is_empty() {
        if r.prompt_feedback.and_then(|f| f.block_reason).is_some() {
            choices.push(blocked_choice(0));
        } else {
            return Err(malformed("no candidates"));
        }
    }
    let usage = r
        .usage_metadata
        .as_ref()
        .and_then(usage_from_metadata)
        .map(WireUsage::from);
    Ok(ChatResponse {
        id: r
            .response_id
            .filter(|s| !s.is_empty())
            .unwrap_or_else(new_completion_id),
        object: "chat.completion".into(),
        created: now(),
        model: r.model_version.unwrap_or_else(|| upstream_model.to_owned()),
        choices,
        usage,
        system_fingerprint: None,
        extra: Map::new(),
    })
}

// ---- errors ----

/// The HTTP status that goes with a `google.rpc.Code` name.
fn status_for(code: &str) -> Option<u16> {
    Some(match code {
        "INVALID_ARGUMENT" | "FAILED_PRECONDITION" | "OUT_OF_RANGE" => 400,
        "UNAUTHENTICATED" => 401,
        "PERMISSION_DENIED" => 403,
        "NOT_FOUND" => 404,
        "ALREADY_EXISTS" | "ABORTED" => 409,
        "RESOURCE_EXHAUSTED" => 429,
        "CANCELLED" => 499,
        "INTERNAL" | "UNKNOWN" | "DATA_LOSS" => 500,
        "UNIMPLEMENTED" => 501,
        "UNAVAILABLE" => 503,
        "DEADLINE_EXCEEDED" => 504,
        _ => return None,
    })
}

/// Gemini's error body, `{"error": {"code", "message", "status", "details"}}` (also inside a
/// one-element array, as a failed stream without `alt=sse` sends it).
pub fn decode_gemini_error(status: u16, body: &[u8]) -> UpstreamError {
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let v = match v {
        Value::Array(mut a) if !a.is_empty() => a.swap_remove(0),
        v => v,
    };
    let err = v.get("error");
    let rpc = err
        .and_then(|e| e.get("status"))
        .and_then(Value::as_str)
        .unwrap_or("");
    let message = err
        .and_then(|e| e.get("message"))
        .and_then(Value::as_str)
        .map(str::to_owned);
    let status = if status >= 400 {
        status
    } else {
        status_for(rpc)
            .or_else(|| {
                err.and_then(|e| e.get("code"))
                    .and_then(Value::as_u64)
                    .and_then(|c| u16::try_from(c).ok())
                    .filter(|c| (400..600).contains(c))
            })
            .unwrap_or(502)
    };
    let status = if status == 529 { 503 } else { status };
    let kind = match rpc {
        "RESOURCE_EXHAUSTED" => "rate_limit_error",
        "UNAVAILABLE" => "overloaded_error",
        "UNAUTHENTICATED" => "authentication_error",
        "PERMISSION_DENIED" => "permission_error",
        _ => UpstreamError::kind_for_status(status),
    };
    let key_invalid = err
        .and_then(|e| e.get("details"))
        .and_then(Value::as_array)
        .is_some_and(|ds| {
            ds.iter()
                .any(|d| d.get("reason").and_then(Value::as_str) == Some("API_KEY_INVALID"))
        });
    let code = if key_invalid {
        Some("invalid_api_key".to_owned())
    } else if rpc == "RESOURCE_EXHAUSTED" {
        Some("rate_limit_exceeded".to_owned())
    } else if rpc.is_empty() {
        None
    } else {
        Some(rpc.to_ascii_lowercase())
    };
    UpstreamError {
        status,
        kind: kind.to_owned(),
        message: message.unwrap_or_else(|| format!("The upstream answered {status}.")),
        code,
    }
}

// ---- streams ----

/// What a stream knows about one candidate.
#[derive(Default)]
struct CandidateState {
    /// The role went out in this candidate's first delta.
    started: bool,
    /// Tool calls so far (the next call's index).
    calls: u32,
    finished: bool,
}

/// A `streamGenerateContent?alt=sse` stream, decoded into pivot chunks.
struct GeminiStream {
    scanner: SseScanner,
    upstream_model: String,
    id: Option<String>,
    model: Option<String>,
    created: i64,
    candidates: HashMap<u32, CandidateState>,
    usage: Option<Usage>,
    /// A blocked prompt answered (no candidates will come).
    blocked: bool,
}

impl GeminiStream {
    fn new(upstream_model: &str, max_event_bytes: usize) -> Self {
        Self {
            scanner: SseScanner::new(max_event_bytes),
            upstream_model: upstream_model.to_owned(),
            id: None,
            model: None,
            created: now(),
            candidates: HashMap::new(),
            usage: None,
            blocked: false,
        }
    }

    fn chunk(&mut self, choices: Vec<ChunkChoice>, usage: Option<WireUsage>) -> ChatChunk {
        ChatChunk {
            id: self.id.get_or_insert_with(new_completion_id).clone(),
            object: "chat.completion.chunk".into(),
            created: self.created,
            model: self
                .model
                .clone()
                .unwrap_or_else(|| self.upstream_model.clone()),
            choices,
            usage,
            system_fingerprint: None,
        }
    }

    fn event(&mut self, data: &[u8], out: &mut Vec<ChatChunk>) -> Result<(), StreamFault> {
        if data.trim_ascii().is_empty() || data == b"[DONE]" {
            return Ok(());
        }
        let r: GenResponse = serde_json::from_slice(data).map_err(|e| {
            StreamFault::Malformed(format!("an event that is not a Gemini answer: {e}"))
        })?;
        if r.error.is_some() {
            return Err(StreamFault::Upstream(decode_gemini_error(200, data)));
        }
        if self.id.is_none() {
            self.id = r.response_id.filter(|s| !s.is_empty());
        }
        if self.model.is_none() {
            self.model = r.model_version;
        }
        if let Some(u) = r.usage_metadata.as_ref().and_then(usage_from_metadata) {
            // Cumulative: the last report wins.
            self.usage = Some(u);
        }
        let mut choices = Vec::new();
        let candidates = r.candidates.unwrap_or_default();
        if candidates.is_empty()
            && !self.blocked
            && r.prompt_feedback.and_then(|f| f.block_reason).is_some()
        {
            self.blocked = true;
            choices.push(ChunkChoice {
                index: 0,
                delta: Delta {
                    role: Some(Role::Assistant),
                    ..Delta::default()
                },
                finish_reason: Some("content_filter".into()),
                logprobs: None,
            });
        }
        for (pos, c) in candidates.into_iter().enumerate() {
            let index = c.index.unwrap_or(pos as u32);
            if !self.candidates.contains_key(&index) && self.candidates.len() >= MAX_CANDIDATES {
                return Err(StreamFault::Malformed("too many candidates".into()));
            }
            let state = self.candidates.entry(index).or_default();
            let parts = c.content.and_then(|c| c.parts).unwrap_or_default();
            let mut delta = Delta::default();
            for p in &parts {
                let mut call_id = None;
                if let Some(fc) = &p.function_call {
                    let id = new_call_id();
                    delta.tool_calls.push(ToolCallDelta {
                        index: state.calls,
                        id: Some(id.clone()),
                        kind: Some("function".into()),
                        function: FunctionDelta {
                            name: Some(fc.name.clone()),
                            arguments: Some(args_text(fc.args.as_ref())),
                        },
                    });
                    state.calls = state.calls.saturating_add(1);
                    call_id = Some(id);
                } else if let Some(t) = p.text.as_deref().filter(|t| !t.is_empty()) {
                    let field = if p.thought == Some(true) {
                        &mut delta.reasoning_content
                    } else {
                        &mut delta.content
                    };
                    field.get_or_insert_with(String::new).push_str(t);
                }
                if let Some(sig) = p.thought_signature.as_deref().filter(|s| !s.is_empty()) {
                    delta
                        .reasoning_blocks
                        .push(signature_block(sig, call_id.as_deref()));
                }
            }
            let finish = c
                .finish_reason
                .as_deref()
                .filter(|_| !state.finished)
                .map(|r| finish_reason(r, state.calls > 0).to_owned());
            if finish.is_some() {
                state.finished = true;
            }
            if delta == Delta::default() && finish.is_none() {
                continue;
            }
            if !state.started {
                state.started = true;
                delta.role = Some(Role::Assistant);
            }
            choices.push(ChunkChoice {
                index,
                delta,
                finish_reason: finish,
                logprobs: None,
            });
        }
        if !choices.is_empty() {
            let chunk = self.chunk(choices, None);
            out.push(chunk);
        }
        Ok(())
    }
}

impl ChunkDecoder for GeminiStream {
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
        if self.scanner.buffered() > 0 {
            match self.scanner.finish() {
                Some(ev) => {
                    if let Some(data) = ev.data {
                        self.event(&data, out)?;
                    }
                }
                None => return Err(StreamFault::TooLarge),
            }
        }
        let done = self.blocked
            || (!self.candidates.is_empty() && self.candidates.values().all(|c| c.finished));
        if !done {
            return Err(StreamFault::Malformed(
                "the upstream ended the stream before its finishReason".into(),
            ));
        }
        if let Some(u) = self.usage {
            let chunk = self.chunk(Vec::new(), Some(WireUsage::from(u)));
            out.push(chunk);
        }
        Ok(())
    }

    fn usage(&self) -> Option<Usage> {
        self.usage
    }
}

// ---- embeddings ----

/// The texts of an OpenAI embeddings `input` (a string or an array of strings).
fn embedding_texts(input: Option<&Value>) -> Result<Vec<&str>, ApiError> {
    let refuse = || {
        ApiError::invalid_param(
            "input",
            "A Gemini embedding model takes input as a string or an array of strings (not tokens).",
        )
    };
    match input {
        Some(Value::String(s)) => Ok(vec![s.as_str()]),
        Some(Value::Array(items)) if !items.is_empty() => items
            .iter()
            .map(|i| i.as_str().ok_or_else(refuse))
            .collect(),
        Some(Value::Array(_)) => Err(ApiError::invalid_param("input", "input must not be empty.")),
        _ => Err(refuse()),
    }
}

/// The `batchEmbedContents` body for an OpenAI embeddings request.
pub fn encode_embeddings_request(req: &Value, upstream_model: &str) -> Result<Value, ApiError> {
    let model = format!("models/{}", model_name(upstream_model)?);
    let dims = match req.get("dimensions") {
        None | Some(Value::Null) => None,
        Some(d) => Some(d.as_u64().filter(|d| *d > 0).ok_or_else(|| {
            ApiError::invalid_param("dimensions", "dimensions must be a positive integer.")
        })?),
    };
    let requests: Vec<Value> = embedding_texts(req.get("input"))?
        .into_iter()
        .map(|text| {
            let mut r = json!({"model": model, "content": {"parts": [{"text": text}]}});
            if let (Some(d), Some(o)) = (dims, r.as_object_mut()) {
                o.insert("outputDimensionality".into(), d.into());
            }
            r
        })
        .collect();
    Ok(json!({ "requests": requests }))
}

/// A `batchEmbedContents` answer as OpenAI's embeddings list (floats; see
/// [`super::embeddings::to_base64`] for `encoding_format: base64`). Gemini reports no usage.
pub fn decode_embeddings_response(body: &[u8], upstream_model: &str) -> Result<Value, ApiError> {
    let v: Value = serde_json::from_slice(body).map_err(malformed)?;
    let embeddings = v
        .get("embeddings")
        .and_then(Value::as_array)
        .ok_or_else(|| malformed("no embeddings"))?;
    let mut data = Vec::with_capacity(embeddings.len());
    for (index, e) in embeddings.iter().enumerate() {
        let values = e
            .get("values")
            .filter(|vs| {
                vs.as_array()
                    .is_some_and(|a| a.iter().all(Value::is_number))
            })
            .ok_or_else(|| malformed("an embedding without its values"))?;
        data.push(json!({"object": "embedding", "index": index, "embedding": values}));
    }
    Ok(json!({
        "object": "list",
        "data": data,
        "model": upstream_model,
        "usage": {"prompt_tokens": 0, "total_tokens": 0},
    }))
}

// ---- the translator ----

impl Translator for Gemini {
    fn url(&self, t: &Target<'_>, op: Operation, stream: bool) -> Result<String, ApiError> {
        let model = percent_encode(model_name(t.upstream_model)?);
        let method = match op {
            Operation::Chat if stream => "streamGenerateContent?alt=sse",
            Operation::Chat => "generateContent",
            Operation::Embeddings => "batchEmbedContents",
            Operation::CountTokens => {
                return Err(ApiError::internal(anyhow::anyhow!(
                    "a Gemini upstream does not count tokens for the Messages API"
                )));
            }
        };
        Ok(format!(
            "{}/models/{model}:{method}",
            t.base_url.trim_end_matches('/')
        ))
    }

    fn headers(
        &self,
        headers: &mut HeaderMap,
        provider_key: &str,
        _t: &Target<'_>,
        _url: &str,
        _body: &[u8],
    ) -> Result<(), ApiError> {
        let mut v = HeaderValue::from_str(provider_key).map_err(|_| {
            ApiError::bad_request(
                "invalid_value",
                "The provider key cannot be sent in a header.",
            )
        })?;
        v.set_sensitive(true);
        headers.insert("x-goog-api-key", v);
        Ok(())
    }

    fn encode_chat(&self, req: &ChatRequest, t: &Target<'_>) -> Result<Vec<u8>, ApiError> {
        let body = encode_request(req, t.upstream_model)?;
        serde_json::to_vec(&body).map_err(ApiError::internal)
    }

    fn decode_chat(&self, body: &[u8], t: &Target<'_>) -> Result<ChatResponse, ApiError> {
        decode_response(body, t.upstream_model)
    }

    fn usage_of_answer(&self, body: &[u8]) -> Option<Usage> {
        let v: Value = serde_json::from_slice(body).ok()?;
        usage_from_metadata(v.get("usageMetadata")?)
    }

    fn chat_stream(&self, t: &Target<'_>, max_event_bytes: usize) -> Box<dyn ChunkDecoder> {
        Box::new(GeminiStream::new(t.upstream_model, max_event_bytes))
    }

    fn decode_error(&self, status: u16, body: &[u8]) -> UpstreamError {
        decode_gemini_error(status, body)
    }

    fn encode_embeddings(&self, req: &Value, t: &Target<'_>) -> Option<Result<Vec<u8>, ApiError>> {
        Some(
            encode_embeddings_request(req, t.upstream_model)
                .and_then(|b| serde_json::to_vec(&b).map_err(ApiError::internal)),
        )
    }

    fn decode_embeddings(
        &self,
        body: &[u8],
        t: &Target<'_>,
    ) -> Result<(Value, Option<Usage>), ApiError> {
        Ok((decode_embeddings_response(body, t.upstream_model)?, None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pivot::{FunctionDef, ImageUrl, Tool};
    use proptest::prelude::*;

    const RESPONSE: &str = include_str!("../../tests/fixtures/gemini/generate_content.json");
    const STREAM: &str = include_str!("../../tests/fixtures/gemini/stream.sse");
    const STREAM_TOOLS: &str = include_str!("../../tests/fixtures/gemini/stream_tools.sse");
    const RATE_LIMIT: &str = include_str!("../../tests/fixtures/gemini/error_rate_limit.json");
    const API_KEY: &str = include_str!("../../tests/fixtures/gemini/error_api_key.json");
    const BLOCKED: &str = include_str!("../../tests/fixtures/gemini/blocked_prompt.json");
    const EMBED: &str = include_str!("../../tests/fixtures/gemini/batch_embed_contents.json");

    fn target(model: &str) -> Target<'_> {
        Target {
            base_url: "https://generativelanguage.googleapis.com/v1beta/",
            upstream_model: model,
            api_version: None,
            region: None,
            default_max_tokens: 4096,
        }
    }

    fn encode(req: &ChatRequest) -> Value {
        let body = Gemini
            .encode_chat(req, &target("gemini-2.5-flash"))
            .expect("encodes");
        serde_json::from_slice(&body).expect("json")
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

    fn tool_result(id: &str, content: &str) -> Message {
        Message {
            tool_call_id: Some(id.into()),
            ..Message::text(Role::Tool, content)
        }
    }

    fn assistant_calls(calls: Vec<ToolCall>) -> Message {
        Message {
            role: Role::Assistant,
            tool_calls: calls,
            ..Message::default()
        }
    }

    fn weather_tool() -> Tool {
        Tool {
            kind: "function".into(),
            function: Some(FunctionDef {
                name: "get_weather".into(),
                description: Some("The weather".into()),
                parameters: Some(json!({
                    "type": "object",
                    "properties": {"location": {"type": "string"}},
                    "required": ["location"],
                    "additionalProperties": false
                })),
                strict: Some(true),
            }),
            ..Tool::default()
        }
    }

    #[test]
    fn urls_encode_the_model_and_refuse_names_that_leave_their_segment() {
        let t = target("gemini-2.5-flash");
        assert_eq!(
            Gemini.url(&t, Operation::Chat, false).expect("url"),
            "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.5-flash:generateContent"
        );
        assert_eq!(
            Gemini.url(&t, Operation::Chat, true).expect("url"),
            "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
        );
        assert_eq!(
            Gemini.url(&t, Operation::Embeddings, false).expect("url"),
            "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.5-flash:batchEmbedContents"
        );
        let prefixed = target("models/gemini-embedding-001");
        assert!(
            Gemini
                .url(&prefixed, Operation::Embeddings, false)
                .expect("url")
                .ends_with("/models/gemini-embedding-001:batchEmbedContents")
        );
        let odd = target("a b:c?d#e%");
        assert!(
            Gemini
                .url(&odd, Operation::Chat, false)
                .expect("url")
                .ends_with("/models/a%20b%3Ac%3Fd%23e%25:generateContent")
        );
        for bad in ["", "..", ".", "a/b", "../x", "models/../x", "a\\b", "a\nb"] {
            assert!(
                Gemini.url(&target(bad), Operation::Chat, false).is_err(),
                "{bad:?}"
            );
        }
        assert!(Gemini.url(&t, Operation::CountTokens, false).is_err());
    }

    #[test]
    fn the_key_goes_in_x_goog_api_key_marked_sensitive() {
        let mut h = HeaderMap::new();
        Gemini
            .headers(&mut h, "AIza-secret", &target("gemini-2.5-flash"), "", b"")
            .expect("headers");
        let v = h.get("x-goog-api-key").expect("the key header");
        assert_eq!(v, "AIza-secret");
        assert!(v.is_sensitive());
        assert!(h.get(http::header::AUTHORIZATION).is_none());
        assert!(
            Gemini
                .headers(&mut h, "bad\nkey", &target("m"), "", b"")
                .is_err()
        );
    }

    #[test]
    fn system_roles_text_images_stop_and_n_are_kept() {
        let req = ChatRequest {
            model: "mine".into(),
            messages: vec![
                Message::text(Role::System, "Be brief."),
                Message::text(Role::Developer, "Answer in French."),
                Message::text(Role::User, "Hi"),
                Message {
                    role: Role::User,
                    content: Some(Content::Parts(vec![
                        Part::text("What is this?"),
                        Part::image("data:image/png;base64,iVBORw0KGgo="),
                        Part::image("https://example.com/cat.JPG?size=large"),
                        Part::image("https://example.com/image"),
                    ])),
                    ..Message::default()
                },
                Message::text(Role::Assistant, "Un chat."),
                Message::text(Role::Assistant, "Voilà."),
            ],
            stop: vec!["END".into(), "\n\n".into()],
            n: Some(2),
            max_completion_tokens: Some(256),
            temperature: Some(0.2),
            top_p: Some(0.9),
            ..ChatRequest::default()
        };
        let v = encode(&req);
        assert_eq!(
            v["systemInstruction"],
            json!({"parts": [{"text": "Be brief."}, {"text": "Answer in French."}]})
        );
        let contents = v["contents"].as_array().expect("contents");
        assert_eq!(contents.len(), 2, "{v}");
        assert_eq!(contents[0]["role"], "user");
        assert_eq!(
            contents[0]["parts"],
            json!([
                {"text": "Hi"},
                {"text": "What is this?"},
                {"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgo="}},
                {"fileData": {"mimeType": "image/jpeg", "fileUri": "https://example.com/cat.JPG?size=large"}},
                {"fileData": {"fileUri": "https://example.com/image"}},
            ])
        );
        assert_eq!(contents[1]["role"], "model");
        assert_eq!(
            contents[1]["parts"],
            json!([{"text": "Un chat."}, {"text": "Voilà."}])
        );
        let g = &v["generationConfig"];
        assert_eq!(g["stopSequences"], json!(["END", "\n\n"]));
        assert_eq!(g["candidateCount"], 2);
        assert_eq!(g["maxOutputTokens"], 256);
        assert_eq!(g["temperature"], 0.2);
        assert_eq!(g["topP"], 0.9);
        assert!(v.get("tools").is_none());
    }

    #[test]
    fn images_gemini_cannot_fetch_are_refused_by_name() {
        for url in [
            "ftp://example.com/a.png",
            "gs://bucket/a.png",
            "data:image/png,raw",
        ] {
            let req = ChatRequest {
                messages: vec![Message {
                    role: Role::User,
                    content: Some(Content::Parts(vec![Part {
                        image_url: Some(ImageUrl {
                            url: url.into(),
                            detail: None,
                        }),
                        kind: "image_url".into(),
                        ..Part::default()
                    }])),
                    ..Message::default()
                }],
                ..ChatRequest::default()
            };
            let err = Gemini
                .encode_chat(&req, &target("gemini-2.5-flash"))
                .expect_err(url);
            assert_eq!(err.parts().2, Some("unsupported_content"), "{url}");
        }
    }

    #[test]
    fn tool_calls_and_results_become_function_parts_with_names_resolved() {
        let req = ChatRequest {
            messages: vec![
                Message::text(Role::User, "Weather in Paris and London?"),
                assistant_calls(vec![
                    call("call_a", "get_weather", r#"{"location":"Paris"}"#),
                    call("call_b", "lookup", ""),
                ]),
                tool_result("call_b", "plain text"),
                tool_result("call_a", r#"{"temp": 21}"#),
                Message {
                    role: Role::Function,
                    name: Some("legacy".into()),
                    ..Message::text(Role::Function, "[1,2]")
                },
            ],
            tools: vec![weather_tool()],
            tool_choice: Some(json!("required")),
            ..ChatRequest::default()
        };
        let v = encode(&req);
        let contents = v["contents"].as_array().expect("contents");
        assert_eq!(contents.len(), 3, "{v}");
        assert_eq!(contents[1]["role"], "model");
        let parts = contents[1]["parts"].as_array().expect("parts");
        assert_eq!(
            parts[0]["functionCall"],
            json!({"name": "get_weather", "args": {"location": "Paris"}})
        );
        assert_eq!(
            parts[1]["functionCall"],
            json!({"name": "lookup", "args": {}})
        );
        // No signature in the history at all: Gemini 2.5 gets none, Gemini 3 gets Google's
        // placeholder on the first call.
        assert!(parts.iter().all(|p| p.get("thoughtSignature").is_none()));
        let v3 = encode_request(&req, "gemini-3-pro-preview").expect("encodes");
        let parts3 = v3["contents"][1]["parts"].as_array().expect("parts");
        assert_eq!(parts3[0]["thoughtSignature"], SKIP_SIGNATURE);
        assert!(parts3[1].get("thoughtSignature").is_none());
        assert_eq!(contents[2]["role"], "user");
        assert_eq!(
            contents[2]["parts"],
            json!([
                {"functionResponse": {"name": "lookup", "response": {"result": "plain text"}}},
                {"functionResponse": {"name": "get_weather", "response": {"temp": 21}}},
                {"functionResponse": {"name": "legacy", "response": {"result": [1, 2]}}},
            ])
        );
        assert_eq!(
            v["tools"],
            json!([{"functionDeclarations": [{
                "name": "get_weather",
                "description": "The weather",
                "parametersJsonSchema": {
                    "type": "object",
                    "properties": {"location": {"type": "string"}},
                    "required": ["location"],
                    "additionalProperties": false
                }
            }]}])
        );
        assert_eq!(
            v["toolConfig"],
            json!({"functionCallingConfig": {"mode": "ANY"}})
        );
    }

    #[test]
    fn bad_tool_input_is_refused() {
        let base = |messages: Vec<Message>| ChatRequest {
            messages,
            ..ChatRequest::default()
        };
        let t = target("gemini-2.5-flash");
        // Arguments that are not a JSON object.
        let req = base(vec![assistant_calls(vec![call("c", "f", "[1]")])]);
        assert_eq!(
            Gemini
                .encode_chat(&req, &t)
                .expect_err("array args")
                .parts()
                .0,
            http::StatusCode::BAD_REQUEST
        );
        // A result for a call nobody made.
        let req = base(vec![tool_result("nope", "x")]);
        assert!(Gemini.encode_chat(&req, &t).is_err());
        // A built-in tool.
        let mut req = base(vec![Message::text(Role::User, "x")]);
        req.tools = vec![Tool {
            kind: "web_search".into(),
            ..Tool::default()
        }];
        let err = Gemini.encode_chat(&req, &t).expect_err("web_search");
        assert_eq!(err.parts().2, Some("unsupported_tool"));
        assert!(err.to_string().contains("web_search"));
    }

    #[test]
    fn tool_choice_maps_to_function_calling_modes() {
        let mut req = ChatRequest {
            messages: vec![Message::text(Role::User, "x")],
            tools: vec![weather_tool()],
            ..ChatRequest::default()
        };
        for (choice, cfg) in [
            (json!("none"), json!({"mode": "NONE"})),
            (json!("auto"), json!({"mode": "AUTO"})),
            (
                json!({"type": "function", "function": {"name": "get_weather"}}),
                json!({"mode": "ANY", "allowedFunctionNames": ["get_weather"]}),
            ),
        ] {
            req.tool_choice = Some(choice);
            assert_eq!(encode(&req)["toolConfig"]["functionCallingConfig"], cfg);
        }
        // allowed_tools limits the declarations.
        req.tool_choice = Some(json!({"type": "allowed_tools", "allowed_tools": {
            "mode": "required", "tools": [{"type": "function", "function": {"name": "other"}}]}}));
        let v = encode(&req);
        assert!(v.get("tools").is_none(), "{v}");
        assert_eq!(v["toolConfig"]["functionCallingConfig"]["mode"], "ANY");
        req.tool_choice = Some(json!("sometimes"));
        assert!(
            Gemini
                .encode_chat(&req, &target("gemini-2.5-flash"))
                .is_err()
        );
    }

    #[test]
    fn structured_output_and_reasoning_effort() {
        let mut req = ChatRequest {
            messages: vec![Message::text(Role::User, "x")],
            response_format: Some(json!({"type": "json_schema", "json_schema": {
                "name": "answer", "strict": true,
                "schema": {"type": "object", "properties": {"a": {"type": "integer"}}}}})),
            reasoning_effort: Some("low".into()),
            ..ChatRequest::default()
        };
        let g = encode(&req)["generationConfig"].clone();
        assert_eq!(g["responseMimeType"], "application/json");
        assert_eq!(
            g["responseJsonSchema"],
            json!({"type": "object", "properties": {"a": {"type": "integer"}}})
        );
        assert_eq!(
            g["thinkingConfig"],
            json!({"thinkingBudget": 1024, "includeThoughts": true})
        );
        req.response_format = Some(json!({"type": "json_object"}));
        req.reasoning_effort = Some("none".into());
        let g = encode(&req)["generationConfig"].clone();
        assert_eq!(g["responseMimeType"], "application/json");
        assert!(g.get("responseJsonSchema").is_none());
        assert_eq!(
            g["thinkingConfig"],
            json!({"thinkingBudget": 0, "includeThoughts": false})
        );
        // Gemini 3 thinks by level.
        for (model, effort, level) in [
            ("gemini-3-pro-preview", "high", "high"),
            ("gemini-3-pro-preview", "minimal", "low"),
            ("gemini-3-pro-preview", "medium", "high"),
            ("gemini-3-flash-preview", "minimal", "minimal"),
            ("gemini-3-flash-preview", "medium", "medium"),
        ] {
            req.reasoning_effort = Some(effort.into());
            let v = encode_request(&req, model).expect("encodes");
            assert_eq!(
                v["generationConfig"]["thinkingConfig"]["thinkingLevel"], level,
                "{model} {effort}"
            );
        }
        // Anthropic's thinking extension: a budget.
        req.reasoning_effort = None;
        req.thinking = Some(json!({"type": "enabled", "budget_tokens": 2048}));
        let v = encode_request(&req, "gemini-3-pro-preview").expect("encodes");
        assert_eq!(
            v["generationConfig"]["thinkingConfig"],
            json!({"thinkingBudget": 2048, "includeThoughts": true})
        );
    }

    #[test]
    fn a_complete_answer_decodes_text_thoughts_calls_signatures_and_usage() {
        let r = Gemini
            .decode_chat(RESPONSE.as_bytes(), &target("gemini-2.5-flash"))
            .expect("decodes");
        assert_eq!(r.id, "r2ZyaJ7fJ8S-1PIPgNbS2Ak");
        assert_eq!(r.model, "gemini-2.5-flash");
        assert_eq!(r.object, "chat.completion");
        assert_eq!(r.choices.len(), 1);
        let c = &r.choices[0];
        assert_eq!(c.finish_reason.as_deref(), Some("tool_calls"));
        assert_eq!(c.message.role, Role::Assistant);
        assert_eq!(c.message.text_content(), "Let me look that up.");
        assert!(
            c.message
                .reasoning_content
                .as_deref()
                .is_some_and(|r| r.starts_with("**Checking the forecast**"))
        );
        let calls = &c.message.tool_calls;
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].function.name, "get_weather");
        assert_eq!(
            serde_json::from_str::<Value>(&calls[0].function.arguments).expect("json"),
            json!({"location": "Paris, France", "unit": "celsius"})
        );
        assert_eq!(calls[1].function.name, "get_time");
        assert!(
            calls
                .iter()
                .all(|c| c.id.starts_with("call_") && c.id.len() == 29)
        );
        assert_ne!(calls[0].id, calls[1].id);
        assert_eq!(c.message.reasoning_blocks.len(), 1);
        let b = &c.message.reasoning_blocks[0];
        assert_eq!(b.kind, THOUGHT_SIGNATURE);
        assert_eq!(b.id.as_deref(), Some(calls[0].id.as_str()));
        assert!(
            b.signature
                .as_deref()
                .is_some_and(|s| s.starts_with("CiQBVKhc"))
        );
        let u = Usage::from(r.usage.expect("usage"));
        assert_eq!(
            u,
            Usage {
                prompt: 1290,
                completion: 138,
                cached: 1024,
                cache_write: 0,
                reasoning: 100,
            }
        );
    }

    #[test]
    fn thought_signatures_go_back_on_their_parts_next_turn() {
        let t = target("gemini-2.5-flash");
        let r = Gemini
            .decode_chat(RESPONSE.as_bytes(), &t)
            .expect("decodes");
        let answer = r.choices[0].message.clone();
        let (a, b) = (
            answer.tool_calls[0].id.clone(),
            answer.tool_calls[1].id.clone(),
        );
        let req = ChatRequest {
            messages: vec![
                Message::text(Role::User, "Weather and time in Paris?"),
                answer,
                tool_result(&a, r#"{"temp": 21}"#),
                tool_result(&b, r#"{"time": "10:00"}"#),
            ],
            ..ChatRequest::default()
        };
        let v = encode(&req);
        let model = &v["contents"][1];
        assert_eq!(model["role"], "model");
        let parts = model["parts"].as_array().expect("parts");
        assert_eq!(parts.len(), 3, "{model}");
        assert_eq!(parts[0], json!({"text": "Let me look that up."}));
        assert_eq!(parts[1]["functionCall"]["name"], "get_weather");
        assert!(
            parts[1]["thoughtSignature"]
                .as_str()
                .is_some_and(|s| s.starts_with("CiQBVKhc"))
        );
        assert_eq!(parts[2]["functionCall"]["name"], "get_time");
        assert!(parts[2].get("thoughtSignature").is_none());
        let results = &v["contents"][2]["parts"];
        assert_eq!(results[0]["functionResponse"]["name"], "get_weather");
        assert_eq!(results[1]["functionResponse"]["name"], "get_time");
        // Thoughts are not sent back.
        assert!(!v.to_string().contains("Checking the forecast"));
    }

    /// Splits `text` at `cuts` (sorted, deduplicated) and runs one stream.
    fn run(
        text: &[u8],
        cuts: &[usize],
    ) -> (Vec<ChatChunk>, Result<(), StreamFault>, Option<Usage>) {
        let mut dec = Gemini.chat_stream(&target("gemini-2.5-flash"), 64 * 1024);
        let mut out = Vec::new();
        let mut last = 0;
        for &c in cuts.iter().chain(std::iter::once(&text.len())) {
            if let Err(e) = dec.push(&text[last..c], &mut out) {
                return (out, Err(e), dec.usage());
            }
            last = c;
        }
        let r = dec.finish(&mut out);
        (out, r, dec.usage())
    }

    /// Tool call ids are random: number them by first appearance; `created` is the clock.
    fn normalized(mut chunks: Vec<ChatChunk>) -> Vec<ChatChunk> {
        let mut ids: HashMap<String, String> = HashMap::new();
        let mut rename = |id: &mut String| {
            let n = ids.len();
            *id = ids
                .entry(id.clone())
                .or_insert_with(|| format!("id{n}"))
                .clone();
        };
        for c in &mut chunks {
            c.created = 0;
            for ch in &mut c.choices {
                for t in &mut ch.delta.tool_calls {
                    if let Some(id) = &mut t.id {
                        rename(id);
                    }
                }
                for b in &mut ch.delta.reasoning_blocks {
                    if let Some(id) = &mut b.id {
                        rename(id);
                    }
                }
            }
        }
        chunks
    }

    /// The assistant message a client builds from the deltas of choice 0.
    fn accumulate(chunks: &[ChatChunk]) -> (Message, Option<String>) {
        let mut m = Message {
            role: Role::Assistant,
            ..Message::default()
        };
        let mut text = String::new();
        let mut finish = None;
        for ch in chunks
            .iter()
            .flat_map(|c| &c.choices)
            .filter(|c| c.index == 0)
        {
            if let Some(t) = &ch.delta.content {
                text.push_str(t);
            }
            if let Some(t) = &ch.delta.reasoning_content {
                m.reasoning_content
                    .get_or_insert_with(String::new)
                    .push_str(t);
            }
            m.reasoning_blocks
                .extend(ch.delta.reasoning_blocks.iter().cloned());
            for t in &ch.delta.tool_calls {
                let i = t.index as usize;
                if m.tool_calls.len() <= i {
                    m.tool_calls.resize(i + 1, ToolCall::default());
                }
                let call = &mut m.tool_calls[i];
                if let Some(id) = &t.id {
                    call.id.clone_from(id);
                }
                if let Some(n) = &t.function.name {
                    call.function.name.clone_from(n);
                }
                if let Some(a) = &t.function.arguments {
                    call.function.arguments.push_str(a);
                }
            }
            if ch.finish_reason.is_some() {
                finish.clone_from(&ch.finish_reason);
            }
        }
        m.content = Some(Content::Text(text));
        (m, finish)
    }

    #[test]
    fn a_text_stream_decodes_deltas_and_one_final_usage() {
        let (chunks, r, usage) = run(STREAM.as_bytes(), &[]);
        r.expect("a whole stream");
        let (m, finish) = accumulate(&chunks);
        assert_eq!(
            m.text_content(),
            "Hello there! How can I help you today? ☀️"
        );
        assert!(
            m.reasoning_content
                .as_deref()
                .is_some_and(|r| r.contains("Planning"))
        );
        assert_eq!(finish.as_deref(), Some("stop"));
        assert_eq!(chunks[0].choices[0].delta.role, Some(Role::Assistant));
        assert!(chunks.iter().all(|c| c.id == "mWtyaNnBFpWa1PIPp9yW8QU"));
        assert_eq!(
            chunks.iter().filter(|c| c.usage.is_some()).count(),
            1,
            "usage once, at the end"
        );
        let last = chunks.last().expect("chunks");
        assert!(last.choices.is_empty());
        let expected = Usage {
            prompt: 12,
            completion: 39,
            cached: 4,
            cache_write: 0,
            reasoning: 28,
        };
        assert_eq!(last.usage.map(Usage::from), Some(expected));
        assert_eq!(usage, Some(expected));
        // The text signature came on an empty text part: it is kept without an id and goes back
        // on the text next turn.
        assert_eq!(m.reasoning_blocks.len(), 1);
        assert_eq!(m.reasoning_blocks[0].id, None);
        let req = ChatRequest {
            messages: vec![
                Message::text(Role::User, "Hi"),
                m,
                Message::text(Role::User, "Bye"),
            ],
            ..ChatRequest::default()
        };
        let v = encode(&req);
        let part = &v["contents"][1]["parts"][0];
        assert_eq!(part["text"], "Hello there! How can I help you today? ☀️");
        assert!(
            part["thoughtSignature"]
                .as_str()
                .is_some_and(|s| s.starts_with("Cs4B"))
        );
    }

    #[test]
    fn a_tool_stream_gives_whole_calls_with_their_signature() {
        let (chunks, r, _) = run(STREAM_TOOLS.as_bytes(), &[]);
        r.expect("a whole stream");
        let deltas: Vec<&ToolCallDelta> = chunks
            .iter()
            .flat_map(|c| &c.choices)
            .flat_map(|c| &c.delta.tool_calls)
            .collect();
        assert_eq!(deltas.len(), 2);
        assert_eq!(deltas[0].index, 0);
        assert_eq!(deltas[1].index, 1);
        for d in &deltas {
            assert!(d.id.as_deref().is_some_and(|i| i.starts_with("call_")));
            assert_eq!(d.function.name.as_deref(), Some("get_weather"));
        }
        assert_eq!(
            deltas[1].function.arguments.as_deref(),
            Some(r#"{"location":"London, UK"}"#)
        );
        let (m, finish) = accumulate(&chunks);
        assert_eq!(finish.as_deref(), Some("tool_calls"));
        assert_eq!(m.reasoning_blocks.len(), 1);
        assert_eq!(
            m.reasoning_blocks[0].id,
            m.tool_calls.first().map(|c| c.id.clone())
        );
        // Round trip: the signature is back on the first call, the second has none.
        let ids: Vec<String> = m.tool_calls.iter().map(|c| c.id.clone()).collect();
        let req = ChatRequest {
            messages: vec![
                Message::text(Role::User, "Weather?"),
                Message { content: None, ..m },
                tool_result(&ids[0], "sunny"),
                tool_result(&ids[1], "rain"),
            ],
            ..ChatRequest::default()
        };
        let v = encode_request(&req, "gemini-3-flash-preview").expect("encodes");
        let parts = v["contents"][1]["parts"].as_array().expect("parts");
        assert_eq!(parts.len(), 2);
        assert!(
            parts[0]["thoughtSignature"]
                .as_str()
                .is_some_and(|s| s.starts_with("CiQB"))
        );
        assert!(parts[1].get("thoughtSignature").is_none());
        assert_eq!(
            v["contents"][2]["parts"][1],
            json!({"functionResponse": {"name": "get_weather", "response": {"result": "rain"}}})
        );
    }

    #[test]
    fn every_split_decodes_like_the_whole() {
        for fixture in [STREAM, STREAM_TOOLS] {
            let text = fixture.as_bytes();
            let (whole, r, usage) = run(text, &[]);
            r.expect("whole");
            let whole = normalized(whole);
            for cut in 0..=text.len() {
                let (parts, r, u) = run(text, &[cut]);
                r.expect("split");
                assert_eq!(normalized(parts), whole, "cut at {cut}");
                assert_eq!(u, usage);
            }
        }
    }

    proptest! {
        #[test]
        fn any_splits_decode_like_the_whole(cuts in proptest::collection::vec(0usize..1650, 0..12)) {
            let text = STREAM.as_bytes();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(text.len())).collect();
            cuts.sort_unstable();
            cuts.dedup();
            let (whole, _, wu) = run(text, &[]);
            let (parts, r, u) = run(text, &cuts);
            prop_assert!(r.is_ok());
            prop_assert_eq!(normalized(parts), normalized(whole));
            prop_assert_eq!(u, wu);
        }

        /// Cumulative reports: the stream's usage is the last one, never a sum.
        #[test]
        fn stream_usage_is_the_last_report(reports in proptest::collection::vec((0i64..1_000_000, 0i64..100_000, 0i64..10_000), 1..8)) {
            let mut sse = String::new();
            for (i, (p, c, t)) in reports.iter().enumerate() {
                let finish = if i + 1 == reports.len() { r#","finishReason":"STOP""# } else { "" };
                sse.push_str(&format!(
                    "data: {{\"candidates\":[{{\"content\":{{\"parts\":[{{\"text\":\"x\"}}],\"role\":\"model\"}}{finish}}}],\"usageMetadata\":{{\"promptTokenCount\":{p},\"candidatesTokenCount\":{c},\"thoughtsTokenCount\":{t}}}}}\r\n\r\n"
                ));
            }
            let (chunks, r, usage) = run(sse.as_bytes(), &[]);
            prop_assert!(r.is_ok());
            let (p, c, t) = *reports.last().expect("one report");
            let expected = Usage { prompt: p, completion: c + t, cached: 0, cache_write: 0, reasoning: t };
            prop_assert_eq!(usage, Some(expected));
            let reported: Vec<Usage> = chunks.iter().filter_map(|c| c.usage).map(Usage::from).collect();
            prop_assert_eq!(reported, vec![expected]);
        }

        /// pivot → Gemini keeps the system prompt, turn order, every text, every call and
        /// every result's name.
        #[test]
        fn requests_keep_the_conversation(
            system in "[a-z ]{1,20}",
            turns in proptest::collection::vec(("[a-zA-Z0-9 ]{1,12}", proptest::option::of(("[a-z_]{1,8}", 0i64..1000))), 1..8),
        ) {
            let mut messages = vec![Message::text(Role::System, system.clone())];
            let mut texts = Vec::new();
            let mut calls = Vec::new();
            for (i, (text, call_spec)) in turns.iter().enumerate() {
                messages.push(Message::text(Role::User, text.clone()));
                texts.push(text.clone());
                let id = format!("call_{i}");
                match call_spec {
                    Some((name, arg)) => {
                        messages.push(assistant_calls(vec![call(&id, name, &format!(r#"{{"n":{arg}}}"#))]));
                        messages.push(tool_result(&id, &arg.to_string()));
                        calls.push((name.clone(), *arg));
                    }
                    None => {
                        messages.push(Message::text(Role::Assistant, format!("re {text}")));
                        texts.push(format!("re {text}"));
                    }
                }
            }
            let req = ChatRequest { messages, stop: vec!["S".into()], n: Some(1), ..ChatRequest::default() };
            let v = encode(&req);
            prop_assert_eq!(&v["systemInstruction"]["parts"][0]["text"], &json!(system));
            let contents = v["contents"].as_array().expect("contents");
            for w in contents.windows(2) {
                prop_assert_ne!(&w[0]["role"], &w[1]["role"]);
            }
            let parts: Vec<&Value> = contents.iter().flat_map(|c| c["parts"].as_array().expect("parts")).collect();
            let got_texts: Vec<String> = parts.iter().filter_map(|p| p["text"].as_str().map(str::to_owned)).collect();
            prop_assert_eq!(got_texts, texts);
            let got_calls: Vec<(String, i64)> = parts.iter().filter_map(|p| {
                let fc = p.get("functionCall")?;
                Some((fc["name"].as_str()?.to_owned(), fc["args"]["n"].as_i64()?))
            }).collect();
            prop_assert_eq!(&got_calls, &calls);
            let got_results: Vec<(String, i64)> = parts.iter().filter_map(|p| {
                let fr = p.get("functionResponse")?;
                Some((fr["name"].as_str()?.to_owned(), fr["response"]["result"].as_i64()?))
            }).collect();
            prop_assert_eq!(got_results, calls);
            prop_assert_eq!(&v["generationConfig"]["stopSequences"], &json!(["S"]));
            prop_assert_eq!(&v["generationConfig"]["candidateCount"], &json!(1));
        }
    }

    #[test]
    fn a_stream_without_finish_reason_or_with_an_error_fails() {
        let text = STREAM.as_bytes();
        // Drop the last event (the one with finishReason).
        let cut = STREAM.rfind("data:").expect("events");
        let (_, r, _) = run(&text[..cut], &[]);
        assert!(matches!(r, Err(StreamFault::Malformed(_))));
        let (_, r, _) = run(b"", &[]);
        assert!(r.is_err());
        let err = format!("data: {}\r\n\r\n", RATE_LIMIT.replace('\n', ""));
        let (_, r, _) = run(err.as_bytes(), &[]);
        match r {
            Err(StreamFault::Upstream(e)) => {
                assert_eq!(e.status, 429);
                assert_eq!(e.kind, "rate_limit_error");
            }
            other => panic!("expected an upstream fault, got {other:?}"),
        }
        let (_, r, _) = run(b"data: {not json\r\n\r\n", &[]);
        assert!(matches!(r, Err(StreamFault::Malformed(_))));
        // An event larger than the limit.
        let mut dec = Gemini.chat_stream(&target("gemini-2.5-flash"), 64);
        let mut out = Vec::new();
        assert_eq!(dec.push(&[b'a'; 100], &mut out), Err(StreamFault::TooLarge));
    }

    #[test]
    fn a_blocked_prompt_is_a_content_filter_choice() {
        let r = Gemini
            .decode_chat(BLOCKED.as_bytes(), &target("gemini-2.5-flash"))
            .expect("decodes");
        assert_eq!(r.choices.len(), 1);
        assert_eq!(
            r.choices[0].finish_reason.as_deref(),
            Some("content_filter")
        );
        assert_eq!(r.usage.map(|u| u.prompt_tokens), Some(7));
        let sse = format!("data: {}\r\n\r\n", BLOCKED.replace('\n', ""));
        let (chunks, r, usage) = run(sse.as_bytes(), &[]);
        r.expect("a blocked stream is whole");
        assert_eq!(
            chunks[0].choices[0].finish_reason.as_deref(),
            Some("content_filter")
        );
        assert_eq!(usage.map(|u| u.prompt), Some(7));
        assert!(
            Gemini
                .decode_chat(br#"{"candidates": []}"#, &target("m"))
                .is_err()
        );
    }

    #[test]
    fn finish_reasons_map_to_openai() {
        for (gemini, calls, openai) in [
            ("STOP", false, "stop"),
            ("STOP", true, "tool_calls"),
            ("MAX_TOKENS", true, "length"),
            ("SAFETY", false, "content_filter"),
            ("RECITATION", false, "content_filter"),
            ("BLOCKLIST", false, "content_filter"),
            ("PROHIBITED_CONTENT", false, "content_filter"),
            ("SPII", false, "content_filter"),
            ("OTHER", false, "stop"),
        ] {
            assert_eq!(finish_reason(gemini, calls), openai, "{gemini}");
        }
    }

    #[test]
    fn hostile_counts_are_bounded() {
        let u = usage_from_metadata(&json!({
            "promptTokenCount": -5,
            "candidatesTokenCount": 18446744073709551615u64,
            "thoughtsTokenCount": 9223372036854775807i64,
            "cachedContentTokenCount": 50,
            "toolUsePromptTokenCount": "7",
        }))
        .expect("an object");
        assert_eq!(u.prompt, 7);
        assert_eq!(u.cached, 7, "cached never above prompt");
        assert_eq!(u.completion, i64::MAX);
        assert_eq!(u.reasoning, i64::MAX);
        assert!(usage_from_metadata(&json!([1, 2])).is_none());
        let u = usage_from_metadata(&json!({"promptTokenCount": 1e30})).expect("object");
        assert_eq!(u.prompt, i64::MAX);
    }

    #[test]
    fn errors_map_status_type_and_code() {
        let e = Gemini.decode_error(429, RATE_LIMIT.as_bytes());
        assert_eq!(
            (e.status, e.kind.as_str(), e.code.as_deref()),
            (429, "rate_limit_error", Some("rate_limit_exceeded"))
        );
        assert!(e.message.starts_with("You exceeded your current quota"));
        let e = Gemini.decode_error(400, API_KEY.as_bytes());
        assert_eq!(
            (e.status, e.kind.as_str(), e.code.as_deref()),
            (400, "invalid_request_error", Some("invalid_api_key"))
        );
        let unavailable =
            br#"[{"error": {"code": 503, "message": "The model is overloaded.", "status": "UNAVAILABLE"}}]"#;
        let e = Gemini.decode_error(503, unavailable);
        assert_eq!((e.status, e.kind.as_str()), (503, "overloaded_error"));
        for (rpc, status, kind) in [
            ("UNAUTHENTICATED", 401, "authentication_error"),
            ("PERMISSION_DENIED", 403, "permission_error"),
            ("NOT_FOUND", 404, "invalid_request_error"),
            ("INVALID_ARGUMENT", 400, "invalid_request_error"),
        ] {
            let body =
                format!(r#"{{"error": {{"code": {status}, "message": "m", "status": "{rpc}"}}}}"#);
            let e = Gemini.decode_error(status, body.as_bytes());
            assert_eq!((e.status, e.kind.as_str()), (status, kind), "{rpc}");
            assert_eq!(e.code.as_deref(), Some(rpc.to_ascii_lowercase().as_str()));
        }
        let e = Gemini.decode_error(500, b"<html>oops</html>");
        assert_eq!((e.status, e.kind.as_str()), (500, "api_error"));
    }

    #[test]
    fn embeddings_both_ways() {
        let t = target("gemini-embedding-001");
        let body = Gemini
            .encode_embeddings(
                &json!({"model": "mine", "input": ["a", "b"], "dimensions": 768}),
                &t,
            )
            .expect("has embeddings")
            .expect("encodes");
        let v: Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(
            v,
            json!({"requests": [
                {"model": "models/gemini-embedding-001", "content": {"parts": [{"text": "a"}]}, "outputDimensionality": 768},
                {"model": "models/gemini-embedding-001", "content": {"parts": [{"text": "b"}]}, "outputDimensionality": 768},
            ]})
        );
        let one = encode_embeddings_request(&json!({"input": "solo"}), "gemini-embedding-001")
            .expect("encodes");
        assert_eq!(one["requests"].as_array().map(Vec::len), Some(1));
        assert!(one["requests"][0].get("outputDimensionality").is_none());
        for bad in [
            json!([1, 2, 3]),
            json!([[1, 2]]),
            json!([]),
            json!(null),
            json!(5),
        ] {
            assert!(
                encode_embeddings_request(&json!({ "input": bad }), "m").is_err(),
                "{bad}"
            );
        }
        let (resp, usage) = Gemini
            .decode_embeddings(EMBED.as_bytes(), &t)
            .expect("decodes");
        assert!(usage.is_none());
        assert_eq!(resp["object"], "list");
        assert_eq!(resp["model"], "gemini-embedding-001");
        let data = resp["data"].as_array().expect("data");
        assert_eq!(data.len(), 2);
        assert_eq!(data[1]["index"], 1);
        assert_eq!(data[1]["object"], "embedding");
        assert_eq!(data[0]["embedding"][0], 0.013168523);
        assert!(
            Gemini
                .decode_embeddings(br#"{"embeddings": [{}]}"#, &t)
                .is_err()
        );
    }
}
