//! Chat for signed-in users (API.md §12, access token): `POST /api/chat`, `/api/chat/stream`,
//! `/api/chat/regenerate`. The turn itself is `conversations::chat`.

use std::convert::Infallible;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::accounts::session::CurrentUser;
use crate::conversations::chat::{self, Caller, ChatEvent, ChatInput, Turn};
use crate::error::{ApiError, Json, Query};
use crate::routes::ClientIp;
use crate::state::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(chat_once))
        .routes(routes!(chat_stream))
        .routes(routes!(regenerate))
}

/// A message to the model in a new or stored conversation.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChatBody {
    /// A chat model of the catalog.
    pub model: String,
    /// The user's message (not empty).
    pub message: String,
    /// Continue this conversation (yours, else 404); absent: a new one, titled from `message`.
    pub conversation_id: Option<String>,
    /// A system prompt for this turn (not stored).
    pub system: Option<String>,
    /// 0–2.
    pub temperature: Option<f64>,
    pub max_tokens: Option<u64>,
}

impl From<ChatBody> for ChatInput {
    fn from(b: ChatBody) -> Self {
        ChatInput {
            model: Some(b.model),
            message: Some(b.message),
            conversation_id: b.conversation_id,
            system: b.system,
            temperature: b.temperature,
            max_tokens: b.max_tokens,
        }
    }
}

/// Answer the last user message of a conversation again, replacing the answer after it.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegenerateBody {
    pub conversation_id: String,
    /// Default: the model the conversation last used.
    pub model: Option<String>,
    pub system: Option<String>,
    pub temperature: Option<f64>,
    pub max_tokens: Option<u64>,
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct StreamParam {
    /// `true`: answer as `/api/chat/stream` does (SSE).
    pub stream: Option<bool>,
}

/// `{conversation_id, message: {id, role, content, model, tokens, created_at, status}, usage}`.
#[derive(Debug, serde::Serialize, ToSchema)]
pub struct ChatAnswer {
    pub conversation_id: String,
    pub message: Value,
    pub usage: Value,
}

fn caller(me: CurrentUser, ip: ClientIp, headers: HeaderMap) -> Caller {
    Caller {
        user: me.user,
        ip: ip.0,
        headers,
        origin_socket: None,
    }
}

/// A turn's error before it started, as an HTTP answer (with its `retry-after` and limits).
fn error_response(ev: ChatEvent) -> Response {
    let ChatEvent::Error {
        status,
        error,
        headers,
    } = ev
    else {
        return ApiError::internal(anyhow::anyhow!("not an error event")).into_response();
    };
    let mut resp = (status, axum::Json(serde_json::json!({ "error": error }))).into_response();
    resp.headers_mut().extend(headers);
    resp
}

async fn answer(turn: Turn) -> Response {
    match chat::complete(turn).await {
        Ok(v) => Json(v).into_response(),
        Err(ev) => error_response(ev),
    }
}

/// The turn as SSE (`data: {"type": …}` frames); a refusal before the answer starts is an
/// ordinary error response with its status.
async fn sse(mut turn: Turn) -> Response {
    let Some(first) = turn.events.recv().await else {
        return ApiError::internal(anyhow::anyhow!("the chat turn ended without an answer"))
            .into_response();
    };
    if matches!(first, ChatEvent::Error { .. }) {
        return error_response(first);
    }
    let events =
        futures_util::stream::unfold((Some(first), turn.events), |(first, mut rx)| async move {
            let ev = match first {
                Some(ev) => ev,
                None => rx.recv().await?,
            };
            let frame = Event::default().data(ev.frame().to_string());
            Some((Ok::<_, Infallible>(frame), (None, rx)))
        });
    let mut resp = Sse::new(events).into_response();
    resp.headers_mut().insert(
        "x-accel-buffering",
        axum::http::HeaderValue::from_static("no"),
    );
    resp
}

/// Sends a message and answers when the model is done.
#[utoipa::path(post, path = "/api/chat", tag = "chat", security(("access_token" = [])),
    request_body = ChatBody,
    responses((status = 200, body = ChatAnswer), (status = 400, body = crate::error::ErrorBody),
              (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody),
              (status = 404, body = crate::error::ErrorBody), (status = 413, body = crate::error::ErrorBody),
              (status = 429, body = crate::error::ErrorBody), (status = 502, body = crate::error::ErrorBody)))]
async fn chat_once(
    State(state): State<AppState>,
    me: CurrentUser,
    ip: ClientIp,
    headers: HeaderMap,
    Json(b): Json<ChatBody>,
) -> Response {
    match chat::start(&state, caller(me, ip, headers), b.into()).await {
        Ok(turn) => answer(turn).await,
        Err(e) => e.into_response(),
    }
}

/// Sends a message and streams the answer: SSE frames `start`, `delta`…, `done` (or `error`).
#[utoipa::path(post, path = "/api/chat/stream", tag = "chat", security(("access_token" = [])),
    request_body = ChatBody,
    responses((status = 200, content_type = "text/event-stream", description = "`data: {\"type\": \"start\", \"conversation_id\", \"message_id\"}`, then `{\"type\": \"delta\", \"content\"}`…, then `{\"type\": \"done\", \"message\", \"usage\"}`; on failure `{\"type\": \"error\", \"error\": {…}}`"),
              (status = 400, body = crate::error::ErrorBody), (status = 401, body = crate::error::ErrorBody),
              (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody),
              (status = 413, body = crate::error::ErrorBody), (status = 429, body = crate::error::ErrorBody)))]
async fn chat_stream(
    State(state): State<AppState>,
    me: CurrentUser,
    ip: ClientIp,
    headers: HeaderMap,
    Json(b): Json<ChatBody>,
) -> Response {
    match chat::start(&state, caller(me, ip, headers), b.into()).await {
        Ok(turn) => sse(turn).await,
        Err(e) => e.into_response(),
    }
}

/// Answers the conversation's last user message again; the answer after it is replaced.
#[utoipa::path(post, path = "/api/chat/regenerate", tag = "chat", security(("access_token" = [])),
    request_body = RegenerateBody, params(StreamParam),
    responses((status = 200, body = ChatAnswer, description = "JSON, or SSE frames as /api/chat/stream with ?stream=true"),
              (status = 400, body = crate::error::ErrorBody), (status = 401, body = crate::error::ErrorBody),
              (status = 404, body = crate::error::ErrorBody), (status = 429, body = crate::error::ErrorBody)))]
async fn regenerate(
    State(state): State<AppState>,
    me: CurrentUser,
    ip: ClientIp,
    headers: HeaderMap,
    Query(q): Query<StreamParam>,
    Json(b): Json<RegenerateBody>,
) -> Response {
    let input = ChatInput {
        model: b.model,
        message: None,
        conversation_id: Some(b.conversation_id),
        system: b.system,
        temperature: b.temperature,
        max_tokens: b.max_tokens,
    };
    match chat::start(&state, caller(me, ip, headers), input).await {
        Ok(turn) if q.stream == Some(true) => sse(turn).await,
        Ok(turn) => answer(turn).await,
        Err(e) => e.into_response(),
    }
}
