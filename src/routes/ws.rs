//! The chat WebSocket (`GET /api/ws`, API.md §12); the socket itself is `conversations::socket`.

use axum::extract::State;
use axum::extract::ws::WebSocketUpgrade;
use axum::http::{HeaderMap, Uri};
use axum::response::Response;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::conversations::socket::{self, Upgraded};
use crate::routes::ClientIp;
use crate::state::AppState;

/// Room for a frame's JSON around a message of `server.max_body_bytes` (a larger message is
/// answered with a 413 error frame; a frame past this closes the socket with 1009).
const FRAME_OVERHEAD: usize = 64 * 1024;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(chat_socket))
}

/// The URL carries a token (`?token=`, `?access_token=`): refused with a reason.
fn token_in_url(uri: &Uri) -> bool {
    uri.query().is_some_and(|q| {
        q.split('&').any(|kv| {
            let k = kv.split('=').next().unwrap_or_default();
            k.eq_ignore_ascii_case("token") || k.eq_ignore_ascii_case("access_token")
        })
    })
}

/// The chat over a WebSocket. First message `{"type": "auth", "token": "<access token>"}` within
/// 10 s (else close 4401; a token in the URL is refused with 4401 and a reason); then
/// `{"type": "chat", "conversation_id"?, "model", "content"}` streams `start` / `delta` /
/// `done` / `error` frames as `/api/chat/stream`; `{"type": "regenerate", "conversation_id"}`;
/// `{"type": "ping"}` → `{"type": "pong"}`; server pings every 30 s, closes after 90 s of
/// silence; `{"type": "conversation.updated", "conversation_id"}` when another socket, request or
/// replica changes one of the user's conversations.
#[utoipa::path(get, path = "/api/ws", tag = "chat",
    responses((status = 101, description = "Switching to the WebSocket protocol"),
              (status = 400, body = crate::error::ErrorBody, description = "Not a WebSocket upgrade")))]
async fn chat_socket(
    State(state): State<AppState>,
    ip: ClientIp,
    uri: Uri,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let up = Upgraded {
        ip: ip.0,
        headers,
        token_in_url: token_in_url(&uri),
    };
    let max = state
        .config
        .server
        .max_body_bytes
        .saturating_add(FRAME_OVERHEAD);
    ws.max_message_size(max)
        .max_frame_size(max)
        .read_buffer_size(crate::conversations::socket::READ_BUFFER_BYTES)
        .on_upgrade(move |socket| {
            // Tracked: shutdown waits for the answer under way before the database closes.
            let tracker = state.background.clone();
            tracker.track_future(socket::serve(state, socket, up))
        })
}
