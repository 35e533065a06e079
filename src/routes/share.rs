//! Shared conversations (`GET /share/{token}`, API.md §12): no login, read-only, not indexed.

use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::conversations::share;
use crate::error::{ApiError, Path, Query};
use crate::state::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(shared_conversation))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ShareQuery {
    /// `json` for the conversation as JSON; otherwise the HTML page.
    pub format: Option<String>,
}

fn not_indexed(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    h.insert(
        "x-robots-tag",
        HeaderValue::from_static("noindex, nofollow"),
    );
    // Revoking must take effect at once: nothing on the way may keep a copy.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    resp
}

/// A shared conversation: an HTML page (Markdown rendered and sanitized) or, with
/// `?format=json`, the conversation and its messages. Unknown or revoked: 404.
#[utoipa::path(get, path = "/share/{token}", tag = "chat",
    params(("token" = String, Path, description = "The share token"), ShareQuery),
    responses((status = 200, content_type = "text/html", description = "The page, or JSON with ?format=json"),
              (status = 404, body = crate::error::ErrorBody)))]
async fn shared_conversation(
    State(state): State<AppState>,
    Path(token): Path<String>,
    Query(q): Query<ShareQuery>,
) -> Response {
    let conv = match share::shared(&state.db, &token).await {
        Ok(c) => c,
        Err(e) => return not_indexed(e.into_response()),
    };
    match q.format.as_deref() {
        Some("json") => not_indexed(axum::Json(conv).into_response()),
        None | Some("html") => {
            let mut resp = axum::response::Html(share::page(&conv)).into_response();
            resp.headers_mut().insert(
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(
                    "default-src 'none'; style-src 'unsafe-inline'; img-src https: data:",
                ),
            );
            not_indexed(resp)
        }
        Some(_) => not_indexed(
            ApiError::invalid_param("format", "'format' must be json or html.").into_response(),
        ),
    }
}
