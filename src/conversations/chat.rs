//! Chat for signed-in users (API.md §12): one turn of `POST /api/chat`, `/api/chat/stream`,
//! `/api/chat/regenerate` and the WebSocket's `chat` frame, on the conversations of §9.
//!
//! A turn is checked and its history read here (bad input, someone else's conversation: an
//! error before anything runs), then runs as a task on `AppState::background` (so shutdown waits
//! for it) that sends [`ChatEvent`]s to its caller:
//!
//! 1. the request goes through the hot path as the user (`proxy::forward_as`: admission, the
//!    user's limits and balance, the user's provider keys, metering with `conversation_id`; the
//!    usage record has no key: `key_id` empty, shown as `null` with `source: "chat"`), always
//!    streamed upstream so a client that leaves stops it;
//! 2. refused or failed upstream: one [`ChatEvent::Error`] and nothing is stored;
//! 3. accepted: the conversation (new one titled from the message) and the user's message are
//!    stored, then [`ChatEvent::Start`], a [`ChatEvent::Delta`] per piece of text, and when the
//!    answer completes the assistant message is stored and [`ChatEvent::Done`] sent. A caller
//!    that goes away (its receiver dropped) stops the upstream; what was produced is stored with
//!    `status: "incomplete"`.

use std::net::IpAddr;
use std::sync::Arc;

use chrono::Utc;
use entity::{conversation_items, conversations, users};
use http::{HeaderMap, StatusCode};
use http_body_util::BodyExt;
use sea_orm::TransactionTrait;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::{ids, items, not_found_conversation, parse_json};
use crate::cache::KeyCtx;
use crate::error::ApiError;
use crate::providers::Endpoint;
use crate::proxy::stream::SseScanner;
use crate::state::AppState;
use crate::store::conversations::{self as store, NewItem};

/// Longest title made from a first message, in characters.
pub const TITLE_CHARS: usize = 80;
/// Longest title a client may set, in characters (the column holds 255).
pub const MAX_TITLE_CHARS: usize = 255;
/// Longest model name accepted.
const MAX_MODEL_CHARS: usize = 128;
/// Events a turn may have queued for a slow reader before it waits for it.
const EVENT_QUEUE: usize = 64;
/// Most bytes of an upstream error body read to relay it.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// What the client asked for: a message (or, to regenerate, none) in a conversation.
#[derive(Debug, Clone, Default)]
pub struct ChatInput {
    pub model: Option<String>,
    /// `None`: regenerate the last answer of `conversation_id`.
    pub message: Option<String>,
    pub conversation_id: Option<String>,
    pub system: Option<String>,
    pub temperature: Option<f64>,
    pub max_tokens: Option<u64>,
}

/// What a turn tells its caller, in order: `Start`, `Delta`s, then `Done` or `Error` (or only an
/// `Error` when the turn was refused).
#[derive(Debug, Clone)]
pub enum ChatEvent {
    Start {
        conversation_id: String,
        message_id: String,
    },
    Delta(String),
    Done {
        conversation_id: String,
        message: Value,
        usage: Value,
    },
    /// `status`: the HTTP status a refusal before `Start` is answered with; `headers`: the
    /// refusal's `retry-after` and `x-ratelimit-*`.
    Error {
        status: StatusCode,
        error: Value,
        headers: HeaderMap,
    },
}

impl ChatEvent {
    /// The event as §12's frame (`data:` of the SSE stream, a text frame of the WebSocket).
    pub fn frame(&self) -> Value {
        match self {
            ChatEvent::Start {
                conversation_id,
                message_id,
            } => {
                json!({"type": "start", "conversation_id": conversation_id, "message_id": message_id})
            }
            ChatEvent::Delta(content) => json!({"type": "delta", "content": content}),
            ChatEvent::Done { message, usage, .. } => {
                json!({"type": "done", "message": message, "usage": usage})
            }
            ChatEvent::Error { error, .. } => json!({"type": "error", "error": error}),
        }
    }

    pub fn from_api_error(e: ApiError) -> Self {
        let error = serde_json::to_value(e.body().error).unwrap_or(Value::Null);
        if let ApiError::Internal(inner) = &e {
            tracing::error!(error = %format!("{inner:#}"), "chat turn failed");
        }
        let resp = axum::response::IntoResponse::into_response(e);
        ChatEvent::Error {
            status: resp.status(),
            error,
            headers: kept_headers(resp.headers()),
        }
    }
}

/// A turn under way: its events.
pub struct Turn {
    pub conversation_id: String,
    pub events: mpsc::Receiver<ChatEvent>,
}

/// Who is chatting: the signed-in user, their address, the request's headers (its
/// `x-request-id` goes upstream and into the usage record).
pub struct Caller {
    pub user: users::Model,
    pub ip: Option<IpAddr>,
    pub headers: HeaderMap,
    /// The WebSocket the turn came from (it is not told `conversation.updated` of its own turn).
    pub origin_socket: Option<u64>,
}

/// The user as the hot path's caller: no gateway key (empty `key_id`, no key limits, every
/// model of the catalog), the user's own limits, plan and status.
pub fn user_ctx(u: &users::Model) -> KeyCtx {
    let limit = |v: Option<i32>| v.and_then(|v| u32::try_from(v).ok());
    KeyCtx {
        key_id: String::new(),
        user_id: u.id.clone(),
        key_name: "chat".into(),
        allowed_models: None,
        allowed_ips: None,
        rpm_limit: Some(0),
        tpm_limit: Some(0),
        budget_nanos: None,
        expires_at: None,
        is_active: true,
        user_status: u.status.clone(),
        user_role: u.role.clone(),
        user_rpm_limit: limit(u.rpm_limit),
        user_tpm_limit: limit(u.tpm_limit),
        plan: u.plan.clone(),
        plan_expires_at: u.plan_expires_at,
        // The chat builds its bodies from a conversation: nothing to answer from the cache.
        cache_ttl_secs: 0,
    }
}

/// A title from the first message: its first non-empty line, at most [`TITLE_CHARS`]
/// characters (cut ones end with `…`).
pub fn title_from(message: &str) -> String {
    let line = message
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("New chat");
    let mut t: String = line.chars().take(TITLE_CHARS).collect();
    if line.chars().nth(TITLE_CHARS).is_some() {
        t.pop();
        t.push('…');
    }
    t
}

/// A stored item as a chat message: `{id, role, content, model, tokens, created_at, status}`.
pub fn message_view(row: &conversation_items::Model) -> Result<Value, ApiError> {
    let item = parse_json(&row.item)?;
    Ok(message_json(
        &item,
        row.model.as_deref(),
        row.tokens,
        row.created_at,
    ))
}

fn message_json(
    item: &Value,
    model: Option<&str>,
    tokens: Option<i64>,
    at: chrono::DateTime<Utc>,
) -> Value {
    let role = item
        .get("role")
        .or_else(|| item.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("unknown");
    json!({
        "id": items::id_of(item),
        "role": role,
        "content": items::text_of(item).unwrap_or_default(),
        "model": model,
        "tokens": tokens,
        "status": item.get("status").and_then(Value::as_str).unwrap_or("completed"),
        "created_at": crate::routes::rfc3339(at),
    })
}

fn bad(param: &str, message: impl Into<String>) -> ApiError {
    ApiError::invalid_param(param, message)
}

/// Checks `input`, reads the history, and starts the turn (see the module docs). Errors here
/// are the client's (400, 404, 413) and nothing has run.
pub async fn start(state: &AppState, caller: Caller, input: ChatInput) -> Result<Turn, ApiError> {
    let regenerate = input.message.is_none();
    if let Some(m) = &input.message {
        if m.len() > state.config.server.max_body_bytes {
            return Err(ApiError::PayloadTooLarge);
        }
        if m.trim().is_empty() {
            return Err(bad("message", "'message' must not be empty."));
        }
    }
    if let Some(s) = &input.system
        && s.len() > state.config.server.max_body_bytes
    {
        return Err(ApiError::PayloadTooLarge);
    }
    if let Some(t) = input.temperature
        && !(0.0..=2.0).contains(&t)
    {
        return Err(bad("temperature", "'temperature' must be between 0 and 2."));
    }
    if input.max_tokens == Some(0) {
        return Err(bad("max_tokens", "'max_tokens' must be at least 1."));
    }
    let user_id = caller.user.id.clone();
    let (conv, history) = match &input.conversation_id {
        Some(id) => {
            let rows =
                super::responses::conversation_rows(&state.db, &user_id, id, "conversation_id")
                    .await?;
            let conv = store::get(&state.db, &user_id, id)
                .await?
                .ok_or_else(|| not_found_conversation(id))?;
            (Some(conv), rows)
        }
        None if regenerate => {
            return Err(ApiError::BadRequest {
                message: "Missing required parameter: 'conversation_id'.".into(),
                code: "missing_field",
                param: Some("conversation_id".into()),
            });
        }
        None => (None, Vec::new()),
    };
    let model = input
        .model
        .clone()
        .filter(|m| !m.trim().is_empty())
        .or_else(|| conv.as_ref().and_then(|c| c.model.clone()))
        .ok_or_else(|| ApiError::BadRequest {
            message: "Missing required parameter: 'model'.".into(),
            code: "missing_field",
            param: Some("model".into()),
        })?;
    if model.chars().count() > MAX_MODEL_CHARS {
        return Err(bad(
            "model",
            format!("'model' is longer than {MAX_MODEL_CHARS} characters."),
        ));
    }

    // The messages sent upstream: the system prompt, the stored history, the new message. To
    // regenerate, the history up to its last user message (what follows it is replaced).
    let mut replace_from = None;
    let mut kept = history.len();
    if regenerate {
        let last_user = history
            .iter()
            .rposition(|r| {
                parse_json(&r.item)
                    .is_ok_and(|v| v.get("role").and_then(Value::as_str) == Some("user"))
            })
            .ok_or_else(|| {
                bad(
                    "conversation_id",
                    "This conversation has no message to answer again.",
                )
            })?;
        kept = last_user + 1;
        replace_from = history.get(kept).map(|r| r.position);
    }
    let mut messages = Vec::with_capacity(kept + 2);
    if let Some(s) = input.system.as_deref().filter(|s| !s.trim().is_empty()) {
        messages.push(json!({"role": "system", "content": s}));
    }
    for row in &history[..kept] {
        let item = parse_json(&row.item)?;
        let (Some(role), Some(text)) = (
            item.get("role").and_then(Value::as_str),
            items::text_of(&item),
        ) else {
            // Tool calls and their outputs (from `/v1`) have no chat text to replay.
            continue;
        };
        let role = if role == "developer" { "system" } else { role };
        messages.push(json!({"role": role, "content": text}));
    }
    if let Some(m) = &input.message {
        messages.push(json!({"role": "user", "content": m}));
    }
    let mut body = json!({
        "model": model,
        "messages": messages,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    if let Some(t) = input.temperature {
        body["temperature"] = json!(t);
    }
    if let Some(n) = input.max_tokens {
        body["max_tokens"] = json!(n);
    }
    let body = bytes::Bytes::from(serde_json::to_vec(&body).map_err(ApiError::internal)?);

    let conversation_id = conv
        .as_ref()
        .map(|c| c.id.clone())
        .unwrap_or_else(ids::conversation_id);
    let plan = Plan {
        user_id,
        conversation_id: conversation_id.clone(),
        new: conv.is_none(),
        model,
        user_message: input.message,
        replace_from,
    };
    let (tx, rx) = mpsc::channel(EVENT_QUEUE);
    state
        .background
        .spawn(run(state.clone(), caller, body, plan, tx));
    Ok(Turn {
        conversation_id,
        events: rx,
    })
}

/// What the turn stores once the upstream has accepted it.
struct Plan {
    user_id: String,
    conversation_id: String,
    /// The conversation is made by this turn.
    new: bool,
    model: String,
    /// `None`: a regeneration.
    user_message: Option<String>,
    /// A regeneration replaces the items from this position on.
    replace_from: Option<i64>,
}

/// The headers of a refusal a client needs: `retry-after`, `x-should-retry`, `x-ratelimit-*`.
fn kept_headers(from: &HeaderMap) -> HeaderMap {
    from.iter()
        .filter(|(k, _)| {
            let k = k.as_str();
            k == "retry-after" || k == "x-should-retry" || k.starts_with("x-ratelimit-")
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn upstream_error(message: &str, code: &str) -> Value {
    json!({"message": message, "type": "upstream_error", "param": null, "code": code})
}

/// Most bytes of answer text one turn keeps; past it the answer is cut and marked incomplete.
pub const MAX_ANSWER_BYTES: usize = 64 * 1024 * 1024;

async fn run(
    state: AppState,
    caller: Caller,
    body: bytes::Bytes,
    plan: Plan,
    tx: mpsc::Sender<ChatEvent>,
) {
    let key = Arc::new(user_ctx(&caller.user));
    let origin = caller.origin_socket;
    let forward = crate::proxy::forward_as(
        state.clone(),
        Endpoint::ChatCompletions,
        caller.ip,
        key,
        &caller.headers,
        body,
        Some(plan.conversation_id.clone()),
    );
    // The caller may leave while admission runs or the upstream's first byte is awaited.
    let resp = tokio::select! {
        r = forward => r,
        _ = tx.closed() => return,
    };
    if !resp.status().is_success() {
        let status = resp.status();
        let headers = kept_headers(resp.headers());
        let bytes = http_body_util::Limited::new(resp.into_body(), MAX_ERROR_BODY)
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        let error = serde_json::from_slice::<Value>(&bytes)
            .ok()
            .and_then(|mut v| v.get_mut("error").map(Value::take))
            .filter(Value::is_object)
            .unwrap_or_else(|| upstream_error("The upstream failed.", "upstream_error"));
        let _ = tx
            .send(ChatEvent::Error {
                status,
                error,
                headers,
            })
            .await;
        return;
    }
    if let Err(e) = begin(&state, &plan).await {
        let _ = tx.send(ChatEvent::from_api_error(e)).await;
        return;
    }
    super::hub::updated_from(&state, &plan.user_id, &plan.conversation_id, origin).await;
    let message_id = ids::item_id("message");
    let _ = tx
        .send(ChatEvent::Start {
            conversation_id: plan.conversation_id.clone(),
            message_id: message_id.clone(),
        })
        .await;

    let mut body = resp.into_body();
    let mut scanner = SseScanner::new(state.config.upstream.max_sse_event_bytes);
    let mut content = String::new();
    let mut usage = Value::Null;
    let mut failure: Option<Value> = None;
    let mut gone = false;
    'read: loop {
        let frame = tokio::select! {
            f = body.frame() => f,
            _ = tx.closed() => {
                gone = true;
                break;
            }
        };
        let data = match frame {
            None => break,
            Some(Err(_)) => {
                failure = Some(upstream_error(
                    "The upstream connection was lost.",
                    "upstream_disconnected",
                ));
                break;
            }
            Some(Ok(f)) => match f.into_data() {
                Ok(d) => d,
                Err(_) => continue,
            },
        };
        scanner.push(&data);
        loop {
            let ev = match scanner.next_event() {
                Ok(Some(ev)) => ev,
                Ok(None) => break,
                Err(_) => {
                    failure = Some(upstream_error(
                        "An upstream event was too large.",
                        "upstream_error",
                    ));
                    break 'read;
                }
            };
            let Some(d) = ev.data else { continue };
            if d.as_ref() == b"[DONE]" {
                continue;
            }
            let Ok(mut chunk) = serde_json::from_slice::<Value>(&d) else {
                continue;
            };
            if let Some(err) = chunk.get_mut("error").filter(|e| e.is_object()) {
                failure = Some(err.take());
                break 'read;
            }
            if let Some(u) = chunk.get_mut("usage").filter(|u| u.is_object()) {
                usage = u.take();
            }
            let piece = chunk
                .pointer("/choices/0/delta/content")
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty());
            if let Some(piece) = piece {
                if content.len().saturating_add(piece.len()) > MAX_ANSWER_BYTES {
                    failure = Some(upstream_error(
                        "The answer is longer than the gateway keeps.",
                        "answer_too_long",
                    ));
                    break 'read;
                }
                content.push_str(piece);
                if tx.send(ChatEvent::Delta(piece.to_owned())).await.is_err() {
                    gone = true;
                    break 'read;
                }
            }
        }
    }
    // Stops the upstream when the answer did not end (and meters what was used).
    drop(body);

    let complete = failure.is_none() && !gone;
    let status = if complete { "completed" } else { "incomplete" };
    let item = json!({
        "type": "message",
        "id": message_id,
        "role": "assistant",
        "status": status,
        "content": [{"type": "output_text", "text": content, "annotations": []}],
    });
    let tokens = usage.get("completion_tokens").and_then(Value::as_i64);
    let now = Utc::now();
    let saved = finish(&state, &plan, &item, tokens, now).await;
    super::hub::updated_from(&state, &plan.user_id, &plan.conversation_id, origin).await;
    let event = match (saved, failure) {
        (Err(e), _) => ChatEvent::from_api_error(e),
        (Ok(()), Some(error)) => ChatEvent::Error {
            status: StatusCode::BAD_GATEWAY,
            error,
            headers: HeaderMap::new(),
        },
        (Ok(()), None) => ChatEvent::Done {
            conversation_id: plan.conversation_id.clone(),
            message: message_json(&item, Some(&plan.model), tokens, now),
            usage,
        },
    };
    if !gone {
        let _ = tx.send(event).await;
    }
}

/// The upstream accepted the turn: the conversation (when new) and the user's message are
/// stored; a regeneration drops the answer it replaces.
async fn begin(state: &AppState, plan: &Plan) -> Result<(), ApiError> {
    let now = Utc::now();
    let txn = state.db.begin().await?;
    if plan.new {
        let title = plan.user_message.as_deref().map(title_from);
        store::insert(
            &txn,
            conversations::Model {
                id: plan.conversation_id.clone(),
                user_id: plan.user_id.clone(),
                metadata: "{}".into(),
                title,
                model: Some(plan.model.clone()),
                next_position: 0,
                created_at: now,
                updated_at: now,
                share_token_hash: None,
            },
        )
        .await?;
    } else if !store::set_chat(&txn, &plan.user_id, &plan.conversation_id, &plan.model, now).await?
    {
        return Err(not_found_conversation(&plan.conversation_id));
    }
    if let Some(p) = plan.replace_from {
        store::delete_items_from(&txn, &plan.conversation_id, p).await?;
    }
    if let Some(m) = &plan.user_message {
        let item = items::normalize(json!({"role": "user", "content": m}), "message")?;
        let row = NewItem {
            item_id: items::id_of(&item).to_owned(),
            content_text: items::indexed_text(&item),
            item: item.to_string(),
            response_id: None,
            model: None,
            tokens: None,
        };
        if store::append(&txn, &plan.user_id, &plan.conversation_id, vec![row], now)
            .await?
            .is_none()
        {
            return Err(not_found_conversation(&plan.conversation_id));
        }
    }
    txn.commit().await?;
    Ok(())
}

/// Stores the answer (a conversation deleted meanwhile takes it nowhere).
async fn finish(
    state: &AppState,
    plan: &Plan,
    item: &Value,
    tokens: Option<i64>,
    now: chrono::DateTime<Utc>,
) -> Result<(), ApiError> {
    let row = NewItem {
        item_id: items::id_of(item).to_owned(),
        content_text: items::indexed_text(item),
        item: item.to_string(),
        response_id: None,
        model: Some(plan.model.clone()),
        tokens,
    };
    let txn = state.db.begin().await?;
    store::append(&txn, &plan.user_id, &plan.conversation_id, vec![row], now).await?;
    txn.commit().await?;
    Ok(())
}

/// Runs a turn to its end: the answer as `POST /api/chat` gives it, or the turn's error.
pub async fn complete(mut turn: Turn) -> Result<Value, ChatEvent> {
    let mut conversation_id = turn.conversation_id.clone();
    while let Some(ev) = turn.events.recv().await {
        match ev {
            ChatEvent::Start {
                conversation_id: c, ..
            } => conversation_id = c,
            ChatEvent::Delta(_) => {}
            ChatEvent::Done { message, usage, .. } => {
                return Ok(
                    json!({"conversation_id": conversation_id, "message": message, "usage": usage}),
                );
            }
            e @ ChatEvent::Error { .. } => return Err(e),
        }
    }
    Err(ChatEvent::from_api_error(ApiError::internal(
        anyhow::anyhow!("the chat turn ended without an answer"),
    )))
}
