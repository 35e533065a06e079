//! One chat WebSocket (`GET /api/ws`, API.md §12), after the upgrade.
//!
//! - Auth by the first message `{"type": "auth", "token": "<access token>"}` within
//!   `chat.ws_auth_timeout_secs`; anything else, or nothing in time, closes with 4401. A client
//!   that put its token in the URL is closed with 4401 at once, the reason saying to send it in
//!   the first message instead (tokens in URLs end up in logs).
//! - Then `{"type": "chat", "conversation_id"?, "model", "content", …}` runs a turn
//!   (`conversations::chat`) and streams its `start` / `delta` / `done` / `error` frames, as
//!   `/api/chat/stream` does; `{"type": "regenerate", "conversation_id"}` answers again. One turn
//!   at a time per socket.
//! - `{"type": "ping"}` → `{"type": "pong"}`. The server pings every `chat.ws_ping_interval_secs`
//!   and closes a socket the client sent nothing on (pongs included) for
//!   `chat.ws_idle_timeout_secs`.
//! - A malformed frame gets an `error` frame; the socket stays open.
//! - `{"type": "conversation.updated", "conversation_id"}` arrives when another socket, a request
//!   or another replica changed one of the user's conversations.
//! - On shutdown the answer under way finishes, then the socket closes with 1001.

use std::net::IpAddr;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use http::HeaderMap;
use serde_json::{Value, json};
use tokio::time::Instant;

use super::chat::{self, Caller, ChatEvent, ChatInput, Turn};
use crate::accounts::session::{CurrentUser, authenticate_token};
use crate::error::ApiError;
use crate::state::AppState;

/// Close code: not authenticated (the HTTP 401 of WebSockets, by the usual 4000 + status).
pub const CLOSE_UNAUTHORIZED: u16 = 4401;
/// Close code: the user has too many sockets open.
pub const CLOSE_TOO_MANY: u16 = 4429;
/// Close code: going away (idle, shutdown).
const CLOSE_GOING_AWAY: u16 = 1001;

/// The socket's read buffer to start with. tungstenite allocates 128 KiB per connection by
/// default, before any frame arrives: for thousands of idle sockets that is most of their memory
/// (benches/state.rs, `ws`). Chat frames are small; a larger one grows the buffer as it arrives
/// (up to the frame limit), so this only sets the idle cost.
pub const READ_BUFFER_BYTES: usize = 4 * 1024;

/// The reason given to a client that sent its token in the URL.
pub const TOKEN_IN_URL: &str = "Tokens in URLs are refused: connect without it and send {\"type\":\"auth\",\"token\":\"…\"} as the first message.";

/// What the upgrade request carried that the socket needs.
pub struct Upgraded {
    pub ip: Option<IpAddr>,
    pub headers: HeaderMap,
    /// The URL had a `token` / `access_token` query parameter.
    pub token_in_url: bool,
}

async fn close(ws: &mut WebSocket, code: u16, reason: &str) {
    let _ = ws
        .send(Message::Close(Some(CloseFrame {
            code,
            reason: reason.into(),
        })))
        .await;
}

async fn send(ws: &mut WebSocket, v: &Value) -> bool {
    ws.send(Message::Text(v.to_string().into())).await.is_ok()
}

fn error_frame(code: &str, message: &str) -> Value {
    json!({"type": "error", "error": {"message": message, "type": "invalid_request_error", "param": null, "code": code}})
}

fn api_error_frame(e: ApiError) -> Value {
    ChatEvent::from_api_error(e).frame()
}

/// Serves one socket to its end.
pub async fn serve(state: AppState, mut ws: WebSocket, up: Upgraded) {
    if up.token_in_url {
        close(&mut ws, CLOSE_UNAUTHORIZED, TOKEN_IN_URL).await;
        return;
    }
    let cfg = state.config.chat.clone();
    let Some((user, token)) = authenticate(&state, &mut ws, cfg.ws_auth_timeout_secs).await else {
        return;
    };
    let hub = state.caches.hub().clone();
    let Some(mut reg) = hub.register(user.id(), cfg.ws_max_sockets_per_user) else {
        close(
            &mut ws,
            CLOSE_TOO_MANY,
            "Too many open sockets for this user (chat.ws_max_sockets_per_user).",
        )
        .await;
        return;
    };
    if !send(
        &mut ws,
        &json!({"type": "authenticated", "user_id": user.id()}),
    )
    .await
    {
        return;
    }
    let mut shutdown = hub.shutting_down();
    let mut closing = *shutdown.borrow();
    let idle = Duration::from_secs(cfg.ws_idle_timeout_secs.max(1));
    let every = Duration::from_secs(cfg.ws_ping_interval_secs.max(1));
    let mut ping = tokio::time::interval_at(Instant::now() + every, every);
    let mut heard = Instant::now();
    let mut turn: Option<Turn> = None;
    loop {
        if closing && turn.is_none() {
            close(&mut ws, CLOSE_GOING_AWAY, "The server is shutting down.").await;
            return;
        }
        tokio::select! {
            msg = ws.recv() => {
                let Some(Ok(msg)) = msg else { return };
                heard = Instant::now();
                let frame = match msg {
                    Message::Text(t) => t,
                    Message::Binary(_) => {
                        if !send(&mut ws, &error_frame("invalid_frame", "Send JSON in text frames.")).await {
                            return;
                        }
                        continue;
                    }
                    Message::Close(_) => return,
                    // Pings are answered by the WebSocket layer; pongs only count as life.
                    _ => continue,
                };
                let reply = on_frame(&state, &token, reg.id, &up, &mut turn, frame.as_str()).await;
                match reply {
                    Reply::Frame(v) => {
                        if !send(&mut ws, &v).await {
                            return;
                        }
                    }
                    Reply::None => {}
                    Reply::Close(code, reason) => {
                        close(&mut ws, code, &reason).await;
                        return;
                    }
                }
            }
            ev = next_event(&mut turn) => {
                let Some(ev) = ev else {
                    turn = None;
                    continue;
                };
                if matches!(ev, ChatEvent::Done { .. } | ChatEvent::Error { .. }) {
                    turn = None;
                }
                if !send(&mut ws, &ev.frame()).await {
                    return;
                }
            }
            pushed = reg.frames.recv() => {
                if let Some(v) = pushed && !send(&mut ws, &v).await {
                    return;
                }
            }
            _ = ping.tick() => {
                if heard.elapsed() >= idle {
                    close(&mut ws, CLOSE_GOING_AWAY, "Closed after a silence (chat.ws_idle_timeout_secs).").await;
                    return;
                }
                if ws.send(Message::Ping(Default::default())).await.is_err() {
                    return;
                }
            }
            _ = shutdown.changed(), if !closing => {
                closing = true;
            }
        }
    }
}

async fn next_event(turn: &mut Option<Turn>) -> Option<ChatEvent> {
    match turn {
        Some(t) => t.events.recv().await,
        None => std::future::pending().await,
    }
}

/// The first message: the access token, in time. `None`: the socket was closed (4401).
async fn authenticate(
    state: &AppState,
    ws: &mut WebSocket,
    timeout_secs: u64,
) -> Option<(CurrentUser, String)> {
    let first = tokio::time::timeout(Duration::from_secs(timeout_secs.max(1)), ws.recv()).await;
    let text = match first {
        Err(_) => {
            close(
                ws,
                CLOSE_UNAUTHORIZED,
                "No auth message in time: send {\"type\":\"auth\",\"token\":\"…\"} first.",
            )
            .await;
            return None;
        }
        Ok(Some(Ok(Message::Text(t)))) => t,
        Ok(None | Some(Err(_))) => return None,
        Ok(Some(Ok(_))) => {
            close(
                ws,
                CLOSE_UNAUTHORIZED,
                "The first message must be {\"type\":\"auth\",\"token\":\"…\"}.",
            )
            .await;
            return None;
        }
    };
    let v: Value = serde_json::from_str(text.as_str()).unwrap_or(Value::Null);
    let token = match (v["type"].as_str(), v["token"].as_str()) {
        (Some("auth"), Some(t)) if !t.is_empty() && t.len() <= 4096 => t.to_owned(),
        _ => {
            close(
                ws,
                CLOSE_UNAUTHORIZED,
                "The first message must be {\"type\":\"auth\",\"token\":\"…\"}.",
            )
            .await;
            return None;
        }
    };
    match authenticate_token(state, &token).await {
        Ok(u) => Some((u, token)),
        Err(e) => {
            let reason = match &e {
                ApiError::Unauthorized { code, .. } if *code == "token_expired" => {
                    "The access token has expired; sign in again."
                }
                ApiError::Forbidden { .. } => "This account is disabled.",
                _ => "Invalid or revoked access token.",
            };
            close(ws, CLOSE_UNAUTHORIZED, reason).await;
            None
        }
    }
}

enum Reply {
    None,
    Frame(Value),
    Close(u16, String),
}

/// One text frame after auth.
async fn on_frame(
    state: &AppState,
    token: &str,
    socket: u64,
    up: &Upgraded,
    turn: &mut Option<Turn>,
    text: &str,
) -> Reply {
    let Ok(v) = serde_json::from_str::<Value>(text) else {
        return Reply::Frame(error_frame("invalid_json", "The frame is not JSON."));
    };
    let ty = v.get("type").and_then(Value::as_str).unwrap_or_default();
    match ty {
        "ping" => Reply::Frame(json!({"type": "pong"})),
        "auth" => Reply::Frame(error_frame(
            "invalid_value",
            "This socket is already authenticated.",
        )),
        "chat" | "regenerate" => {
            if turn.is_some() {
                return Reply::Frame(error_frame(
                    "conflict",
                    "An answer is still streaming on this socket; wait for its done or error frame.",
                ));
            }
            let input = match chat_input(ty, &v) {
                Ok(i) => i,
                Err(e) => return Reply::Frame(api_error_frame(e)),
            };
            // The session is checked again: logout or a disabled account ends the socket.
            let user = match authenticate_token(state, token).await {
                Ok(u) => u,
                Err(_) => {
                    return Reply::Close(
                        CLOSE_UNAUTHORIZED,
                        "The session has ended; sign in again.".into(),
                    );
                }
            };
            let caller = Caller {
                user: user.user,
                ip: up.ip,
                headers: up.headers.clone(),
                origin_socket: Some(socket),
            };
            match chat::start(state, caller, input).await {
                Ok(t) => {
                    *turn = Some(t);
                    Reply::None
                }
                Err(e) => Reply::Frame(api_error_frame(e)),
            }
        }
        "" => Reply::Frame(error_frame("missing_field", "The frame has no 'type'.")),
        _ => Reply::Frame(error_frame(
            "invalid_value",
            "Unknown frame type: expected auth, chat, regenerate or ping.",
        )),
    }
}

/// A `chat` / `regenerate` frame's fields, typed (a wrong type is 400 naming the field).
fn chat_input(ty: &str, v: &Value) -> Result<ChatInput, ApiError> {
    let string = |k: &str| -> Result<Option<String>, ApiError> {
        match v.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(ApiError::invalid_param(
                k,
                format!("'{k}' must be a string."),
            )),
        }
    };
    let temperature = match v.get("temperature") {
        None | Some(Value::Null) => None,
        Some(t) => Some(t.as_f64().ok_or_else(|| {
            ApiError::invalid_param("temperature", "'temperature' must be a number.")
        })?),
    };
    let max_tokens = match v.get("max_tokens") {
        None | Some(Value::Null) => None,
        Some(t) => Some(t.as_u64().ok_or_else(|| {
            ApiError::invalid_param("max_tokens", "'max_tokens' must be a positive integer.")
        })?),
    };
    let missing = |k: &str| ApiError::BadRequest {
        message: format!("Missing required parameter: '{k}'."),
        code: "missing_field",
        param: Some(k.to_owned()),
    };
    let message = if ty == "chat" {
        Some(string("content")?.ok_or_else(|| missing("content"))?)
    } else {
        None
    };
    let conversation_id = string("conversation_id")?;
    if ty == "regenerate" && conversation_id.is_none() {
        return Err(missing("conversation_id"));
    }
    let model = string("model")?;
    if ty == "chat" && model.is_none() {
        return Err(missing("model"));
    }
    Ok(ChatInput {
        model,
        message,
        conversation_id,
        system: string("system")?,
        temperature,
        max_tokens,
    })
}
