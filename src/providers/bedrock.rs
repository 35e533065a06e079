//! AWS Bedrock (`kind = "bedrock"`): the pivot to and from the Converse / ConverseStream APIs,
//! SigV4-signed, and Titan / Cohere embeddings through InvokeModel.
//!
//! - The provider key is JSON: `{"access_key_id", "secret_access_key", "session_token"?}`; the
//!   provider's `region` scopes the signature ([`Target::region`], else read from a
//!   `bedrock-runtime.<region>.amazonaws.com` base URL).
//! - URLs: `{base_url}/model/{model id}/converse`, `/converse-stream`, `/invoke`; the model id
//!   (a base model, an inference profile, or an ARN) is one path segment, `:` and `/` encoded.
//! - Usage: Bedrock's `inputTokens` counts only the input that was neither read from nor written
//!   to the prompt cache (as Anthropic's `input_tokens` does), so prompt tokens are
//!   `inputTokens + cacheReadInputTokens + cacheWriteInputTokens`, cached tokens
//!   `cacheReadInputTokens`, cache-write tokens `cacheWriteInputTokens`: each token billed once.
//! - `tool_choice: "none"`: Converse has no such choice. The tools are left out, unless the
//!   conversation already holds tool calls or results (Converse then requires `toolConfig`): the
//!   tools are sent without a choice, and the model may still call one.
//! - Reasoning: Anthropic models get `thinking` (or `reasoning_effort` as a thinking budget:
//!   low 1024, medium 2048, high 4096 tokens, kept below `maxTokens`) in
//!   `additionalModelRequestFields`; other families ignore both. Reasoning given back without a
//!   signature (plain `reasoning_content`) is not sent: Bedrock would refuse it.
//! - `response_format: json_schema` becomes `outputConfig.textFormat`; `json_object` (JSON
//!   without a schema) has no Converse equivalent and is refused.
//! - Embeddings: Titan text (one input per call, a longer array is refused) and Cohere embed;
//!   the answer is floats, which the gateway encodes as OpenAI does when the client asked for
//!   `encoding_format: "base64"`.

pub mod eventstream;
pub mod sigv4;

use std::collections::HashMap;

use http::{HeaderMap, HeaderValue, StatusCode};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::{ChunkDecoder, Operation, StreamFault, Target, Translator, Usage};
use crate::error::ApiError;
use crate::pivot::{
    ChatChunk, ChatRequest, ChatResponse, Choice, ChunkChoice, Content, Delta, FunctionCall,
    FunctionDelta, ImageUrl, Message, Part, ReasoningBlock, Role, ToolCall, ToolCallDelta,
    UpstreamError, WireUsage,
};

pub struct Bedrock;

/// The Bedrock runtime endpoint of `region`, for a provider whose `base_url` is empty.
pub fn default_base_url(region: &str) -> String {
    format!("https://bedrock-runtime.{region}.amazonaws.com")
}

/// The region in a `https://bedrock-runtime[-fips].<region>.amazonaws.com[.cn]` URL.
fn region_in_url(base_url: &str) -> Option<&str> {
    let host = base_url.split("://").nth(1)?.split(['/', ':']).next()?;
    let mut labels = host.split('.');
    let service = labels.next()?;
    if !service.starts_with("bedrock-runtime") {
        return None;
    }
    let region = labels.next()?;
    (labels.next() == Some("amazonaws") && !region.is_empty()).then_some(region)
}

fn region_of<'a>(t: &Target<'a>) -> Result<&'a str, ApiError> {
    t.region
        .filter(|r| !r.is_empty())
        .or_else(|| region_in_url(t.base_url))
        .ok_or_else(|| {
            ApiError::bad_request(
                "provider_misconfigured",
                "This Bedrock provider has no region: set the provider's `region` (e.g. us-east-1).",
            )
        })
}

/// One path segment: everything but RFC 3986's unreserved characters encoded, so a model id's
/// `:` and an ARN's `/` stay inside the segment.
pub fn encode_path_segment(s: &str) -> String {
    sigv4::uri_encode(s, false)
}

/// The provider key, parsed.
#[derive(Deserialize)]
struct AwsKey {
    #[serde(alias = "accessKeyId", alias = "AccessKeyId")]
    access_key_id: String,
    #[serde(alias = "secretAccessKey", alias = "SecretAccessKey")]
    secret_access_key: String,
    #[serde(default, alias = "sessionToken", alias = "SessionToken")]
    session_token: Option<String>,
}

/// The expected shape, never the key itself (serde's message would quote what it read). The
/// example has no spaces: `POST /api/provider-keys` refuses a key with spaces in it.
fn bad_key() -> ApiError {
    ApiError::bad_request(
        "invalid_provider_key",
        "A Bedrock provider key must be the JSON {\"access_key_id\":\"AKIA…\",\"secret_access_key\":\"…\",\"session_token\":\"…\"} (session_token only for temporary credentials).",
    )
}

/// Checks a provider key for a `bedrock` provider when it is saved (400 `invalid_provider_key`
/// with the expected shape, never the key).
pub fn check_key(key: &str) -> Result<(), ApiError> {
    parse_key(key).map(|_| ())
}

fn parse_key(key: &str) -> Result<AwsKey, ApiError> {
    let k: AwsKey = serde_json::from_str(key.trim()).map_err(|_| bad_key())?;
    let printable = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic());
    if !printable(&k.access_key_id)
        || !printable(&k.secret_access_key)
        || k.session_token.as_deref().is_some_and(|t| !printable(t))
    {
        return Err(bad_key());
    }
    Ok(k)
}

fn upstream_bad(message: String) -> ApiError {
    ApiError::Upstream {
        status: StatusCode::BAD_GATEWAY,
        message,
        code: "upstream_error",
    }
}

/// What differs between the model families behind Converse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Anthropic,
    Nova,
    Other,
}

impl Family {
    fn of(model: &str) -> Self {
        if model.contains("anthropic.") {
            Self::Anthropic
        } else if model.contains("amazon.nova") {
            Self::Nova
        } else {
            Self::Other
        }
    }

    /// Prompt caching (`cachePoint` blocks) is offered for Claude and Nova models.
    fn caches(self) -> bool {
        matches!(self, Self::Anthropic | Self::Nova)
    }
}

fn cache_point() -> Value {
    json!({"cachePoint": {"type": "default"}})
}

/// An image part as a Converse `image` block: base64 `data:` URLs, and `s3://` URLs whose
/// extension names the format. Converse cannot fetch an http(s) URL.
fn image_block(img: &ImageUrl, param: &str) -> Result<Value, ApiError> {
    fn format_of(media: &str) -> Option<&'static str> {
        match media.to_ascii_lowercase().as_str() {
            "image/png" | "png" => Some("png"),
            "image/jpeg" | "image/jpg" | "jpeg" | "jpg" => Some("jpeg"),
            "image/gif" | "gif" => Some("gif"),
            "image/webp" | "webp" => Some("webp"),
            _ => None,
        }
    }
    if let Some((media, data)) = img.as_data() {
        let format = format_of(media).ok_or_else(|| {
            ApiError::invalid_param(
                param,
                format!("Bedrock takes png, jpeg, gif or webp images, not {media}."),
            )
        })?;
        return Ok(json!({"image": {"format": format, "source": {"bytes": data}}}));
    }
    if img.url.starts_with("s3://")
        && let Some(format) = img.url.rsplit_once('.').and_then(|(_, ext)| format_of(ext))
    {
        return Ok(
            json!({"image": {"format": format, "source": {"s3Location": {"uri": img.url}}}}),
        );
    }
    let shown: String = img.url.chars().take(120).collect();
    Err(ApiError::invalid_param(
        param,
        format!(
            "Bedrock's Converse API takes images as base64 data (or from S3), not by URL: send {shown} inline as a data: URL."
        ),
    ))
}

/// The content blocks of a user (or tool result) message.
fn content_blocks(
    content: Option<&Content>,
    param: &str,
    family: Family,
    out: &mut Vec<Value>,
) -> Result<(), ApiError> {
    match content {
        Some(Content::Text(t)) if !t.is_empty() => out.push(json!({"text": t})),
        None | Some(Content::Text(_)) => {}
        Some(Content::Parts(parts)) => {
            for p in parts {
                part_block(p, param, family, out)?;
            }
        }
    }
    Ok(())
}

fn part_block(p: &Part, param: &str, family: Family, out: &mut Vec<Value>) -> Result<(), ApiError> {
    match p.kind.as_str() {
        "text" | "input_text" | "refusal" => {
            let text = p
                .text
                .as_deref()
                .or_else(|| p.extra.get("refusal").and_then(Value::as_str))
                .unwrap_or("");
            if !text.is_empty() {
                out.push(json!({"text": text}));
            }
        }
        "image_url" => {
            let Some(img) = &p.image_url else {
                return Err(ApiError::invalid_param(
                    param,
                    "An image_url part without its url.",
                ));
            };
            out.push(image_block(img, param)?);
        }
        other => {
            return Err(ApiError::invalid_param(
                param,
                format!("Bedrock providers do not take `{other}` content parts here."),
            ));
        }
    }
    if p.cache_control.is_some() && family.caches() && !out.is_empty() {
        out.push(cache_point());
    }
    Ok(())
}

/// A tool call's arguments as the JSON object Converse's `toolUse.input` must be.
fn tool_input(call: &ToolCall, param: &str) -> Result<Value, ApiError> {
    let args = call.function.arguments.trim();
    if args.is_empty() {
        return Ok(json!({}));
    }
    match serde_json::from_str::<Value>(args) {
        Ok(v @ Value::Object(_)) => Ok(v),
        _ => Err(ApiError::invalid_param(
            param,
            format!(
                "The arguments of tool call `{}` must be a JSON object for Bedrock.",
                call.id
            ),
        )),
    }
}

fn assistant_blocks(m: &Message, param: &str, family: Family) -> Result<Vec<Value>, ApiError> {
    let mut out = Vec::new();
    for b in &m.reasoning_blocks {
        match b.kind.as_str() {
            "thinking" => {
                let mut text = Map::new();
                text.insert("text".into(), b.text.clone().unwrap_or_default().into());
                if let Some(sig) = &b.signature {
                    text.insert("signature".into(), sig.clone().into());
                }
                out.push(json!({"reasoningContent": {"reasoningText": text}}));
            }
            "redacted_thinking" => {
                if let Some(data) = &b.data {
                    out.push(json!({"reasoningContent": {"redactedContent": data}}));
                }
            }
            // Other providers' opaque reasoning means nothing to Bedrock.
            _ => {}
        }
    }
    content_blocks(m.content.as_ref(), param, family, &mut out)?;
    for call in &m.tool_calls {
        out.push(json!({"toolUse": {
            "toolUseId": call.id,
            "name": call.function.name,
            "input": tool_input(call, param)?,
        }}));
    }
    Ok(out)
}

fn tool_result(m: &Message, param: &str, family: Family) -> Result<Value, ApiError> {
    let id = m
        .tool_call_id
        .as_deref()
        .or(m.name.as_deref())
        .ok_or_else(|| ApiError::invalid_param(param, "A tool message without tool_call_id."))?;
    let mut content = Vec::new();
    match &m.content {
        // A JSON object result goes as `json` (some families take only that), anything else as text.
        Some(Content::Text(t)) => match serde_json::from_str::<Value>(t) {
            Ok(v @ Value::Object(_)) => content.push(json!({"json": v})),
            _ => content.push(json!({"text": t})),
        },
        other => content_blocks(other.as_ref(), param, family, &mut content)?,
    }
    content.retain(|b| b.get("cachePoint").is_none());
    if content.is_empty() {
        content.push(json!({"text": ""}));
    }
    let mut result = Map::new();
    result.insert("toolUseId".into(), id.into());
    result.insert("content".into(), content.into());
    if m.extra.get("is_error").and_then(Value::as_bool) == Some(true) {
        result.insert("status".into(), "error".into());
    }
    Ok(json!({"toolResult": result}))
}

/// Appends blocks to the conversation, merging consecutive messages of one role (Converse
/// requires user and assistant to alternate).
fn push_turn(turns: &mut Vec<(&'static str, Vec<Value>)>, role: &'static str, blocks: Vec<Value>) {
    if blocks.is_empty() {
        return;
    }
    match turns.last_mut() {
        Some((r, b)) if *r == role => b.extend(blocks),
        _ => turns.push((role, blocks)),
    }
}

fn tool_config(
    req: &ChatRequest,
    family: Family,
    history_has_tools: bool,
) -> Result<Option<Value>, ApiError> {
    if req.tools.is_empty() {
        return Ok(None);
    }
    let choice = req.tool_choice.as_ref();
    let none = choice.and_then(Value::as_str) == Some("none");
    if none && !history_has_tools {
        return Ok(None);
    }
    let mut tools = Vec::new();
    for (i, t) in req.tools.iter().enumerate() {
        let f = match (&t.function, t.kind.as_str()) {
            (Some(f), "function") => f,
            _ => {
                return Err(ApiError::BadRequest {
                    message: format!(
                        "Bedrock providers take function tools only, not `{}`.",
                        t.kind
                    ),
                    code: "unsupported_tool",
                    param: Some(format!("tools[{i}]")),
                });
            }
        };
        let mut spec = Map::new();
        spec.insert("name".into(), f.name.clone().into());
        if let Some(d) = f.description.as_deref().filter(|d| !d.is_empty()) {
            spec.insert("description".into(), d.into());
        }
        let schema = f
            .parameters
            .clone()
            .unwrap_or_else(|| json!({"type": "object", "properties": {}}));
        spec.insert("inputSchema".into(), json!({"json": schema}));
        tools.push(json!({"toolSpec": spec}));
        if t.cache_control.is_some() && family.caches() {
            tools.push(cache_point());
        }
    }
    let mut config = Map::new();
    config.insert("tools".into(), tools.into());
    let tool_choice = match choice {
        None => None,
        Some(Value::String(s)) => match s.as_str() {
            "auto" => Some(json!({"auto": {}})),
            "required" | "any" => Some(json!({"any": {}})),
            "none" => None,
            other => {
                return Err(ApiError::invalid_param(
                    "tool_choice",
                    format!("Unknown tool_choice `{other}`."),
                ));
            }
        },
        Some(v) => {
            let name = v
                .pointer("/function/name")
                .or_else(|| v.get("name"))
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    ApiError::invalid_param("tool_choice", "A tool_choice object names a function.")
                })?;
            Some(json!({"tool": {"name": name}}))
        }
    };
    if let Some(c) = tool_choice {
        config.insert("toolChoice".into(), c);
    }
    Ok(Some(Value::Object(config)))
}

/// Anthropic's thinking settings, from `thinking` or `reasoning_effort`.
fn thinking(req: &ChatRequest, max_tokens: u64) -> Option<Value> {
    if let Some(t) = &req.thinking {
        return Some(t.clone());
    }
    let budget: u64 = match req.reasoning_effort.as_deref()? {
        "minimal" | "low" => 1024,
        "medium" => 2048,
        "high" => 4096,
        _ => return None,
    };
    let budget = budget.min(max_tokens.saturating_sub(1));
    (budget >= 1024).then(|| json!({"type": "enabled", "budget_tokens": budget}))
}

fn output_config(req: &ChatRequest) -> Result<Option<Value>, ApiError> {
    let Some(rf) = &req.response_format else {
        return Ok(None);
    };
    match rf.get("type").and_then(Value::as_str) {
        None | Some("text") => Ok(None),
        Some("json_schema") => {
            let js = rf.get("json_schema").ok_or_else(|| {
                ApiError::invalid_param(
                    "response_format",
                    "json_schema needs its `json_schema` object.",
                )
            })?;
            let schema = js
                .get("schema")
                .cloned()
                .unwrap_or_else(|| json!({"type": "object"}));
            let mut def = Map::new();
            def.insert("schema".into(), schema.to_string().into());
            if let Some(n) = js.get("name").and_then(Value::as_str) {
                def.insert("name".into(), n.into());
            }
            if let Some(d) = js.get("description").and_then(Value::as_str) {
                def.insert("description".into(), d.into());
            }
            Ok(Some(json!({"textFormat": {
                "type": "json_schema",
                "structure": {"jsonSchema": def},
            }})))
        }
        Some(other) => Err(ApiError::invalid_param(
            "response_format",
            format!(
                "Bedrock's Converse API has no `{other}` response format; use `json_schema` with a schema."
            ),
        )),
    }
}

/// A token count from an upstream: a non-negative integer, whatever was sent.
fn count(v: Option<&Value>) -> i64 {
    match v {
        Some(Value::Number(n)) => n
            .as_i64()
            .or_else(|| n.as_u64().map(|_| i64::MAX))
            .or_else(|| n.as_f64().map(|f| f as i64))
            .unwrap_or(0)
            .max(0),
        _ => 0,
    }
}

/// Converse's `usage` (`TokenUsage`) as tollgate's.
pub fn usage_from(u: &Value) -> Option<Usage> {
    if !u.is_object() {
        return None;
    }
    let input = count(u.get("inputTokens"));
    let read = count(u.get("cacheReadInputTokens"));
    let write = count(u.get("cacheWriteInputTokens"));
    Some(Usage {
        prompt: input.saturating_add(read).saturating_add(write),
        completion: count(u.get("outputTokens")),
        cached: read,
        cache_write: write,
        reasoning: 0,
    })
}

/// Converse's `stopReason` as OpenAI's `finish_reason`.
pub fn finish_reason(stop: &str) -> &'static str {
    match stop {
        "max_tokens" | "model_context_window_exceeded" => "length",
        "tool_use" => "tool_calls",
        "guardrail_intervened" | "content_filtered" => "content_filter",
        _ => "stop",
    }
}

fn new_id() -> String {
    format!("chatcmpl-{}", uuid::Uuid::new_v4().simple())
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// The status and error type of a Bedrock exception name (`ThrottlingException`, …).
fn exception_status(name: &str) -> (u16, &'static str) {
    let n = name.to_ascii_lowercase();
    let n = n.trim_end_matches("exception");
    match n {
        "throttling" | "modelnotready" => (429, "rate_limit_error"),
        "validation" | "servicequotaexceeded" => (400, "invalid_request_error"),
        "accessdenied" => (403, "permission_error"),
        "resourcenotfound" => (404, "invalid_request_error"),
        "serviceunavailable" => (503, "overloaded_error"),
        "modeltimeout" => (504, "api_error"),
        "internalserver" => (500, "api_error"),
        // modelStreamError, modelError and whatever else: the model failed upstream.
        _ => (502, "api_error"),
    }
}

fn error_message(body: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(body).ok()?;
    v.get("message")
        .or_else(|| v.get("Message"))
        .and_then(Value::as_str)
        .map(str::to_owned)
}

impl Translator for Bedrock {
    fn url(&self, t: &Target<'_>, op: Operation, stream: bool) -> Result<String, ApiError> {
        let action = match op {
            Operation::Chat if stream => "converse-stream",
            Operation::Chat => "converse",
            Operation::Embeddings => "invoke",
            Operation::CountTokens => {
                return Err(ApiError::bad_request(
                    "unsupported_operation",
                    "Counting tokens is not available through a Bedrock provider.",
                ));
            }
        };
        let base = if t.base_url.trim().is_empty() {
            default_base_url(region_of(t)?)
        } else {
            t.base_url.trim_end_matches('/').to_owned()
        };
        Ok(format!(
            "{base}/model/{}/{action}",
            encode_path_segment(t.upstream_model)
        ))
    }

    fn headers(
        &self,
        headers: &mut HeaderMap,
        provider_key: &str,
        t: &Target<'_>,
        url: &str,
        body: &[u8],
    ) -> Result<(), ApiError> {
        let key = parse_key(provider_key)?;
        let region = region_of(t)?;
        let parsed = url::Url::parse(url).map_err(ApiError::internal)?;
        let host = parsed
            .host_str()
            .ok_or_else(|| ApiError::internal(anyhow::anyhow!("a Bedrock URL without a host")))?;
        let host = match parsed.port() {
            Some(p) => format!("{host}:{p}"),
            None => host.to_owned(),
        };
        let amz_date = sigv4::amz_date(chrono::Utc::now());
        let creds = sigv4::Credentials {
            access_key_id: &key.access_key_id,
            secret_access_key: &key.secret_access_key,
            session_token: key.session_token.as_deref(),
        };
        let signed = sigv4::sign(
            &sigv4::Request {
                method: "POST",
                host: &host,
                path: parsed.path(),
                query: parsed.query().unwrap_or(""),
                headers: &[],
                payload: body,
            },
            &creds,
            &sigv4::Scope {
                region,
                service: "bedrock",
                amz_date: &amz_date,
            },
        );
        let mut auth = HeaderValue::from_str(&signed.authorization).map_err(|_| bad_key())?;
        auth.set_sensitive(true);
        headers.insert(http::header::AUTHORIZATION, auth);
        headers.insert(
            "x-amz-date",
            HeaderValue::from_str(&signed.amz_date).map_err(ApiError::internal)?,
        );
        if let Some(token) = creds.session_token {
            let mut v = HeaderValue::from_str(token).map_err(|_| bad_key())?;
            v.set_sensitive(true);
            headers.insert("x-amz-security-token", v);
        }
        Ok(())
    }

    fn encode_chat(&self, req: &ChatRequest, t: &Target<'_>) -> Result<Vec<u8>, ApiError> {
        if req.n.is_some_and(|n| n > 1) {
            return Err(ApiError::invalid_param(
                "n",
                "Bedrock's Converse API answers with one choice: `n` above 1 is not supported.",
            ));
        }
        let family = Family::of(t.upstream_model);
        let mut system: Vec<Value> = Vec::new();
        let mut turns: Vec<(&'static str, Vec<Value>)> = Vec::new();
        let mut history_has_tools = false;
        for (i, m) in req.messages.iter().enumerate() {
            let param = format!("messages[{i}]");
            match m.role {
                Role::System | Role::Developer => {
                    content_blocks(m.content.as_ref(), &param, family, &mut system)?;
                    if system.iter().any(|b| b.get("image").is_some()) {
                        return Err(ApiError::invalid_param(
                            &param,
                            "Bedrock takes text only in system prompts.",
                        ));
                    }
                }
                Role::User => {
                    let mut blocks = Vec::new();
                    content_blocks(m.content.as_ref(), &param, family, &mut blocks)?;
                    push_turn(&mut turns, "user", blocks);
                }
                Role::Assistant => {
                    history_has_tools |= !m.tool_calls.is_empty();
                    push_turn(
                        &mut turns,
                        "assistant",
                        assistant_blocks(m, &param, family)?,
                    );
                }
                Role::Tool | Role::Function => {
                    history_has_tools = true;
                    push_turn(&mut turns, "user", vec![tool_result(m, &param, family)?]);
                }
            }
        }
        // A cache point cannot open a message or the system prompt.
        for (_, blocks) in &mut turns {
            while blocks
                .first()
                .is_some_and(|b| b.get("cachePoint").is_some())
            {
                blocks.remove(0);
            }
        }
        let max_tokens = req.max_output().unwrap_or(t.default_max_tokens);
        let mut inference = Map::new();
        inference.insert("maxTokens".into(), max_tokens.into());
        if let Some(x) = req.temperature {
            inference.insert("temperature".into(), x.into());
        }
        if let Some(x) = req.top_p {
            inference.insert("topP".into(), x.into());
        }
        if !req.stop.is_empty() {
            inference.insert("stopSequences".into(), req.stop.clone().into());
        }
        let mut body = Map::new();
        body.insert(
            "messages".into(),
            turns
                .into_iter()
                .map(|(role, content)| json!({"role": role, "content": content}))
                .collect::<Vec<_>>()
                .into(),
        );
        if !system.is_empty() {
            body.insert("system".into(), system.into());
        }
        body.insert("inferenceConfig".into(), inference.into());
        if let Some(tc) = tool_config(req, family, history_has_tools)? {
            body.insert("toolConfig".into(), tc);
        }
        if family == Family::Anthropic
            && let Some(th) = thinking(req, max_tokens)
        {
            body.insert(
                "additionalModelRequestFields".into(),
                json!({"thinking": th}),
            );
        }
        if let Some(oc) = output_config(req)? {
            body.insert("outputConfig".into(), oc);
        }
        serde_json::to_vec(&Value::Object(body)).map_err(ApiError::internal)
    }

    fn decode_chat(&self, body: &[u8], t: &Target<'_>) -> Result<ChatResponse, ApiError> {
        let v: Value = serde_json::from_slice(body)
            .map_err(|e| upstream_bad(format!("Bedrock's answer is not JSON: {e}")))?;
        let blocks = v
            .pointer("/output/message/content")
            .and_then(Value::as_array)
            .ok_or_else(|| upstream_bad("Bedrock's answer has no output.message.content".into()))?;
        let mut text = String::new();
        let mut reasoning = String::new();
        let mut message = Message {
            role: Role::Assistant,
            ..Message::default()
        };
        for b in blocks {
            if let Some(s) = b.get("text").and_then(Value::as_str) {
                text.push_str(s);
            } else if let Some(tu) = b.get("toolUse") {
                let input = tu.get("input").cloned().unwrap_or_else(|| json!({}));
                message.tool_calls.push(ToolCall {
                    id: tu
                        .get("toolUseId")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_owned(),
                    kind: "function".into(),
                    function: FunctionCall {
                        name: tu
                            .get("name")
                            .and_then(Value::as_str)
                            .unwrap_or_default()
                            .to_owned(),
                        arguments: input.to_string(),
                    },
                });
            } else if let Some(rc) = b.get("reasoningContent") {
                if let Some(rt) = rc.get("reasoningText") {
                    let t = rt.get("text").and_then(Value::as_str).unwrap_or_default();
                    reasoning.push_str(t);
                    message.reasoning_blocks.push(ReasoningBlock {
                        kind: "thinking".into(),
                        text: Some(t.to_owned()),
                        signature: rt
                            .get("signature")
                            .and_then(Value::as_str)
                            .map(str::to_owned),
                        ..ReasoningBlock::default()
                    });
                } else if let Some(data) = rc.get("redactedContent").and_then(Value::as_str) {
                    message.reasoning_blocks.push(ReasoningBlock {
                        kind: "redacted_thinking".into(),
                        data: Some(data.to_owned()),
                        ..ReasoningBlock::default()
                    });
                }
            }
        }
        message.content = if text.is_empty() && !message.tool_calls.is_empty() {
            None
        } else {
            Some(Content::Text(text))
        };
        if !reasoning.is_empty() {
            message.reasoning_content = Some(reasoning);
        }
        let finish = v
            .get("stopReason")
            .and_then(Value::as_str)
            .map(|s| finish_reason(s).to_owned());
        Ok(ChatResponse {
            id: new_id(),
            object: "chat.completion".into(),
            created: now(),
            model: t.upstream_model.to_owned(),
            choices: vec![Choice {
                index: 0,
                message,
                finish_reason: finish,
                logprobs: None,
            }],
            usage: v.get("usage").and_then(usage_from).map(WireUsage::from),
            ..ChatResponse::default()
        })
    }

    fn usage_of_answer(&self, body: &[u8]) -> Option<Usage> {
        let v: Value = serde_json::from_slice(body).ok()?;
        usage_from(v.get("usage")?)
    }

    fn chat_stream(&self, t: &Target<'_>, max_event_bytes: usize) -> Box<dyn ChunkDecoder> {
        Box::new(ConverseStream {
            frames: eventstream::Decoder::new(max_event_bytes),
            id: new_id(),
            created: now(),
            model: t.upstream_model.to_owned(),
            tools: HashMap::new(),
            usage: None,
            stopped: false,
        })
    }

    fn decode_error(&self, status: u16, body: &[u8]) -> UpstreamError {
        let message = error_message(body).unwrap_or_else(|| format!("Bedrock answered {status}."));
        let lower = message.to_ascii_lowercase();
        let (status, kind, code) = match status {
            400 if lower.contains("too long")
                || lower.contains("too many input tokens")
                || lower.contains("context window")
                || lower.contains("context length") =>
            {
                (
                    400,
                    "invalid_request_error",
                    Some("context_length_exceeded"),
                )
            }
            // A bad or expired key, or a bad signature, is the key's fault, not a permission.
            401 | 403
                if lower.contains("security token")
                    || lower.contains("signature")
                    || lower.contains("access key") =>
            {
                (401, "authentication_error", Some("invalid_api_key"))
            }
            403 => (403, "permission_error", None),
            408 => (504, "api_error", None),
            424 => (502, "api_error", None),
            429 => (429, "rate_limit_error", None),
            503 => (503, "overloaded_error", None),
            s => (s, UpstreamError::kind_for_status(s), None),
        };
        UpstreamError {
            status,
            kind: kind.to_owned(),
            message,
            code: code.map(str::to_owned),
        }
    }

    fn encode_embeddings(&self, req: &Value, t: &Target<'_>) -> Option<Result<Vec<u8>, ApiError>> {
        Some(encode_embeddings(req, t.upstream_model))
    }

    fn decode_embeddings(
        &self,
        body: &[u8],
        t: &Target<'_>,
    ) -> Result<(Value, Option<Usage>), ApiError> {
        decode_embeddings(body, t.upstream_model)
    }
}

// ---- embeddings (InvokeModel) ----

fn is_titan(model: &str) -> bool {
    model.contains("amazon.titan-embed")
}

fn is_cohere(model: &str) -> bool {
    model.contains("cohere.embed")
}

/// The request's `input` as strings (token arrays are refused: neither family takes them).
fn inputs(req: &Value) -> Result<Vec<String>, ApiError> {
    let bad = || {
        ApiError::invalid_param(
            "input",
            "Bedrock embeddings take `input` as a string or an array of strings.",
        )
    };
    match req.get("input") {
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| i.as_str().map(str::to_owned).ok_or_else(bad))
            .collect(),
        _ => Err(bad()),
    }
}

fn encode_embeddings(req: &Value, model: &str) -> Result<Vec<u8>, ApiError> {
    let texts = inputs(req)?;
    let dimensions = req.get("dimensions").and_then(Value::as_u64);
    let body = if is_titan(model) {
        if texts.len() != 1 {
            return Err(ApiError::invalid_param(
                "input",
                format!(
                    "Titan text embeddings take one input per request, not {}: send them one at a time.",
                    texts.len()
                ),
            ));
        }
        let mut b = Map::new();
        b.insert("inputText".into(), texts[0].clone().into());
        if let Some(d) = dimensions {
            b.insert("dimensions".into(), d.into());
        }
        Value::Object(b)
    } else if is_cohere(model) {
        let mut b = Map::new();
        b.insert("texts".into(), texts.into());
        let input_type = req
            .get("input_type")
            .and_then(Value::as_str)
            .unwrap_or("search_document");
        b.insert("input_type".into(), input_type.into());
        if let Some(d) = dimensions {
            if !model.contains("embed-v4") {
                return Err(ApiError::invalid_param(
                    "dimensions",
                    "This Cohere embedding model has a fixed size: leave `dimensions` out.",
                ));
            }
            b.insert("output_dimension".into(), d.into());
        }
        Value::Object(b)
    } else {
        return Err(ApiError::bad_request(
            "model_not_supported",
            "Through Bedrock, tollgate serves embeddings of Titan text (amazon.titan-embed-*) and Cohere (cohere.embed-*) models.",
        ));
    };
    serde_json::to_vec(&body).map_err(ApiError::internal)
}

fn embedding_item(index: usize, embedding: Value) -> Value {
    json!({"object": "embedding", "index": index, "embedding": embedding})
}

fn decode_embeddings(body: &[u8], model: &str) -> Result<(Value, Option<Usage>), ApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| upstream_bad(format!("Bedrock's embeddings answer is not JSON: {e}")))?;
    let (data, usage) = if let Some(e) = v.get("embedding").filter(|e| e.is_array()) {
        // Titan: one embedding and its input's token count.
        let usage = v.get("inputTextTokenCount").map(|n| Usage {
            prompt: count(Some(n)),
            ..Usage::default()
        });
        (vec![embedding_item(0, e.clone())], usage)
    } else if let Some(e) = v.get("embeddings") {
        // Cohere: `[[…], …]`, or by type `{"float": [[…], …]}`.
        let list = e
            .as_array()
            .or_else(|| e.get("float").and_then(Value::as_array))
            .ok_or_else(|| {
                upstream_bad("Bedrock's Cohere answer has no float embeddings".into())
            })?;
        let data = list
            .iter()
            .enumerate()
            .map(|(i, x)| embedding_item(i, x.clone()))
            .collect();
        let usage = v.pointer("/meta/billed_units/input_tokens").map(|n| Usage {
            prompt: count(Some(n)),
            ..Usage::default()
        });
        (data, usage)
    } else {
        return Err(upstream_bad("Bedrock's answer holds no embedding".into()));
    };
    let prompt = usage.map(|u| u.prompt).unwrap_or(0);
    let mut out = json!({"object": "list", "data": data, "model": model});
    if usage.is_some() {
        out["usage"] = json!({"prompt_tokens": prompt, "total_tokens": prompt});
    }
    Ok((out, usage))
}

// ---- ConverseStream ----

/// One ConverseStream answer, decoded into pivot chunks.
struct ConverseStream {
    frames: eventstream::Decoder,
    id: String,
    created: i64,
    model: String,
    /// Content block index → tool call index (0, 1, 2, … in the order the calls start).
    tools: HashMap<u64, u32>,
    /// The latest `metadata` usage (each report replaces the last, never summed).
    usage: Option<Usage>,
    stopped: bool,
}

impl ConverseStream {
    fn chunk(&self, delta: Delta, finish: Option<String>) -> ChatChunk {
        ChatChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk".into(),
            created: self.created,
            model: self.model.clone(),
            choices: vec![ChunkChoice {
                index: 0,
                delta,
                finish_reason: finish,
                logprobs: None,
            }],
            ..ChatChunk::default()
        }
    }

    fn tool_index(&mut self, block: u64) -> (u32, bool) {
        let next = u32::try_from(self.tools.len()).unwrap_or(u32::MAX);
        let mut fresh = false;
        let i = *self.tools.entry(block).or_insert_with(|| {
            fresh = true;
            next
        });
        (i, fresh)
    }

    fn message(
        &mut self,
        m: &eventstream::Message,
        out: &mut Vec<ChatChunk>,
    ) -> Result<(), StreamFault> {
        match m.header_str(":message-type").unwrap_or("event") {
            "event" => {}
            "exception" => {
                let name = m
                    .header_str(":exception-type")
                    .unwrap_or("unknownException");
                let (status, kind) = exception_status(name);
                let message = error_message(&m.payload)
                    .unwrap_or_else(|| format!("Bedrock's stream failed: {name}."));
                return Err(StreamFault::Upstream(UpstreamError {
                    status,
                    kind: kind.into(),
                    message,
                    code: None,
                }));
            }
            _ => {
                let code = m.header_str(":error-code").unwrap_or("error");
                let message = m
                    .header_str(":error-message")
                    .unwrap_or("Bedrock's stream failed.");
                return Err(StreamFault::Upstream(UpstreamError {
                    status: 502,
                    kind: "api_error".into(),
                    message: format!("{code}: {message}"),
                    code: None,
                }));
            }
        }
        let Some(event) = m.header_str(":event-type") else {
            return Ok(());
        };
        let parse = || {
            serde_json::from_slice::<Value>(&m.payload).map_err(|e| {
                StreamFault::Malformed(format!("a {event} event that is not JSON: {e}"))
            })
        };
        match event {
            "messageStart" => out.push(self.chunk(
                Delta {
                    role: Some(Role::Assistant),
                    content: Some(String::new()),
                    ..Delta::default()
                },
                None,
            )),
            "contentBlockStart" => {
                let v = parse()?;
                if let Some(tu) = v.pointer("/start/toolUse") {
                    let block = v
                        .get("contentBlockIndex")
                        .and_then(Value::as_u64)
                        .unwrap_or(0);
                    let (index, _) = self.tool_index(block);
                    out.push(self.chunk(
                        Delta {
                            tool_calls: vec![ToolCallDelta {
                                index,
                                id: tu.get("toolUseId").and_then(Value::as_str).map(str::to_owned),
                                kind: Some("function".into()),
                                function: FunctionDelta {
                                    name: tu.get("name").and_then(Value::as_str).map(str::to_owned),
                                    arguments: Some(String::new()),
                                },
                            }],
                            ..Delta::default()
                        },
                        None,
                    ));
                }
            }
            "contentBlockDelta" => {
                let v = parse()?;
                let block = v
                    .get("contentBlockIndex")
                    .and_then(Value::as_u64)
                    .unwrap_or(0);
                let Some(d) = v.get("delta") else {
                    return Ok(());
                };
                let mut delta = Delta::default();
                if let Some(t) = d.get("text").and_then(Value::as_str) {
                    delta.content = Some(t.to_owned());
                } else if let Some(tu) = d.get("toolUse") {
                    let (index, _) = self.tool_index(block);
                    delta.tool_calls.push(ToolCallDelta {
                        index,
                        function: FunctionDelta {
                            arguments: Some(
                                tu.get("input")
                                    .and_then(Value::as_str)
                                    .unwrap_or_default()
                                    .to_owned(),
                            ),
                            ..FunctionDelta::default()
                        },
                        ..ToolCallDelta::default()
                    });
                } else if let Some(rc) = d.get("reasoningContent") {
                    if let Some(t) = rc.get("text").and_then(Value::as_str) {
                        delta.reasoning_content = Some(t.to_owned());
                    } else if let Some(sig) = rc.get("signature").and_then(Value::as_str) {
                        delta.reasoning_blocks.push(ReasoningBlock {
                            kind: "thinking".into(),
                            signature: Some(sig.to_owned()),
                            ..ReasoningBlock::default()
                        });
                    } else if let Some(data) = rc.get("redactedContent").and_then(Value::as_str) {
                        delta.reasoning_blocks.push(ReasoningBlock {
                            kind: "redacted_thinking".into(),
                            data: Some(data.to_owned()),
                            ..ReasoningBlock::default()
                        });
                    } else {
                        return Ok(());
                    }
                } else {
                    return Ok(());
                }
                out.push(self.chunk(delta, None));
            }
            "messageStop" => {
                let v = parse()?;
                let reason = v
                    .get("stopReason")
                    .and_then(Value::as_str)
                    .unwrap_or("end_turn");
                self.stopped = true;
                out.push(self.chunk(Delta::default(), Some(finish_reason(reason).to_owned())));
            }
            "metadata" => {
                let v = parse()?;
                if let Some(u) = v.get("usage").and_then(usage_from) {
                    self.usage = Some(u);
                }
            }
            // contentBlockStop, and events added later.
            _ => {}
        }
        Ok(())
    }
}

impl ChunkDecoder for ConverseStream {
    fn push(&mut self, bytes: &[u8], out: &mut Vec<ChatChunk>) -> Result<(), StreamFault> {
        let mut input = bytes;
        while let Some(m) = self.frames.next(&mut input)? {
            self.message(&m, out)?;
        }
        Ok(())
    }

    fn finish(&mut self, out: &mut Vec<ChatChunk>) -> Result<(), StreamFault> {
        if self.frames.is_mid_message() {
            return Err(StreamFault::Malformed(
                "Bedrock's stream ended inside an event-stream message".into(),
            ));
        }
        if !self.stopped {
            return Err(StreamFault::Malformed(
                "Bedrock's stream ended before messageStop".into(),
            ));
        }
        if let Some(u) = self.usage {
            out.push(ChatChunk {
                id: self.id.clone(),
                object: "chat.completion.chunk".into(),
                created: self.created,
                model: self.model.clone(),
                usage: Some(WireUsage::from(u)),
                ..ChatChunk::default()
            });
        }
        Ok(())
    }

    fn usage(&self) -> Option<Usage> {
        self.usage
    }
}
