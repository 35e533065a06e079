//! The signed-in user's conversations (`/api/conversations…`, API.md §12, access token): list,
//! search, read, rename, delete, messages, export, share. `conversations::library` and
//! `conversations::share` hold the rules; these are the same rows as `/v1/conversations`.

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::accounts::session::CurrentUser;
use crate::conversations::{hub, library, share};
use crate::error::{ApiResult, Json, Path, Query};
use crate::routes::page_req;
use crate::state::AppState;
use crate::store::conversations::ListFilter;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_conversations))
        .routes(routes!(search_messages))
        .routes(routes!(
            get_conversation,
            rename_conversation,
            delete_conversation
        ))
        .routes(routes!(list_messages))
        .routes(routes!(export_conversation))
        .routes(routes!(share_conversation, revoke_share))
}

/// `{data, page, per_page, total}` of conversations or messages.
#[derive(Debug, Serialize, ToSchema)]
pub struct ValuePage {
    pub data: Vec<Value>,
    pub page: u64,
    pub per_page: u64,
    pub total: u64,
}

fn paged(p: crate::store::Page<Value>, req: crate::store::PageReq) -> Json<ValuePage> {
    Json(ValuePage {
        data: p.items,
        page: req.page,
        per_page: req.per_page,
        total: p.total,
    })
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    pub page: Option<u64>,
    pub per_page: Option<u64>,
    /// Matches titles and message text (full-text).
    pub search: Option<String>,
    /// Conversations that last used this model.
    pub model: Option<String>,
}

/// The user's conversations, newest activity first: `{id, title, model, message_count,
/// created_at, updated_at, shared}`.
#[utoipa::path(get, path = "/api/conversations", tag = "chat", security(("access_token" = [])),
    params(ListQuery),
    responses((status = 200, body = ValuePage), (status = 400, body = crate::error::ErrorBody),
              (status = 401, body = crate::error::ErrorBody)))]
async fn list_conversations(
    State(state): State<AppState>,
    me: CurrentUser,
    Query(q): Query<ListQuery>,
) -> ApiResult<Json<ValuePage>> {
    let req = page_req(q.page, q.per_page)?;
    let filter = ListFilter {
        search: q.search,
        model: q.model,
    };
    Ok(paged(
        library::list(&state.db, me.id(), filter, req).await?,
        req,
    ))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct SearchQuery {
    /// Words every matching message holds.
    pub q: String,
    pub page: Option<u64>,
    pub per_page: Option<u64>,
}

/// Messages across the user's conversations holding every word of `q` (each database's own
/// full-text index), newest first, each with `conversation_id` and a `snippet`.
#[utoipa::path(get, path = "/api/conversations/search", tag = "chat", security(("access_token" = [])),
    params(SearchQuery),
    responses((status = 200, body = ValuePage), (status = 400, body = crate::error::ErrorBody),
              (status = 401, body = crate::error::ErrorBody)))]
async fn search_messages(
    State(state): State<AppState>,
    me: CurrentUser,
    Query(q): Query<SearchQuery>,
) -> ApiResult<Json<ValuePage>> {
    let req = page_req(q.page, q.per_page)?;
    Ok(paged(
        library::search(&state.db, me.id(), &q.q, req).await?,
        req,
    ))
}

/// A conversation with its messages in order.
#[utoipa::path(get, path = "/api/conversations/{id}", tag = "chat", security(("access_token" = [])),
    params(("id" = String, Path, description = "Conversation id (`conv_…`)")),
    responses((status = 200, body = Value), (status = 404, body = crate::error::ErrorBody)))]
async fn get_conversation(
    State(state): State<AppState>,
    me: CurrentUser,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    Ok(Json(library::get(&state.db, me.id(), &id).await?))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RenameBody {
    /// 1–255 characters.
    pub title: String,
}

/// Renames a conversation.
#[utoipa::path(patch, path = "/api/conversations/{id}", tag = "chat", security(("access_token" = [])),
    params(("id" = String, Path, description = "Conversation id")), request_body = RenameBody,
    responses((status = 200, body = Value), (status = 400, body = crate::error::ErrorBody),
              (status = 404, body = crate::error::ErrorBody)))]
async fn rename_conversation(
    State(state): State<AppState>,
    me: CurrentUser,
    Path(id): Path<String>,
    Json(b): Json<RenameBody>,
) -> ApiResult<Json<Value>> {
    let v = library::rename(&state.db, me.id(), &id, &b.title).await?;
    hub::updated(&state, me.id(), &id).await;
    Ok(Json(v))
}

/// Deletes a conversation, its messages and its share link.
#[utoipa::path(delete, path = "/api/conversations/{id}", tag = "chat", security(("access_token" = [])),
    params(("id" = String, Path, description = "Conversation id")),
    responses((status = 204), (status = 404, body = crate::error::ErrorBody)))]
async fn delete_conversation(
    State(state): State<AppState>,
    me: CurrentUser,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    library::delete(&state.db, me.id(), &id).await?;
    hub::updated(&state, me.id(), &id).await;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct PageQuery {
    pub page: Option<u64>,
    pub per_page: Option<u64>,
}

/// A conversation's messages, oldest first: `{id, role, content, model, tokens, created_at, status}`.
#[utoipa::path(get, path = "/api/conversations/{id}/messages", tag = "chat", security(("access_token" = [])),
    params(("id" = String, Path, description = "Conversation id"), PageQuery),
    responses((status = 200, body = ValuePage), (status = 404, body = crate::error::ErrorBody)))]
async fn list_messages(
    State(state): State<AppState>,
    me: CurrentUser,
    Path(id): Path<String>,
    Query(q): Query<PageQuery>,
) -> ApiResult<Json<ValuePage>> {
    let req = page_req(q.page, q.per_page)?;
    Ok(paged(
        library::messages(&state.db, me.id(), &id, req).await?,
        req,
    ))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ExportQuery {
    /// `json` (default) or `markdown`.
    pub format: Option<String>,
}

/// The conversation as a download (`content-disposition: attachment`), JSON or Markdown.
#[utoipa::path(get, path = "/api/conversations/{id}/export", tag = "chat", security(("access_token" = [])),
    params(("id" = String, Path, description = "Conversation id"), ExportQuery),
    responses((status = 200, description = "The file"), (status = 400, body = crate::error::ErrorBody),
              (status = 404, body = crate::error::ErrorBody)))]
async fn export_conversation(
    State(state): State<AppState>,
    me: CurrentUser,
    Path(id): Path<String>,
    Query(q): Query<ExportQuery>,
) -> ApiResult<Response> {
    let format = q.format.as_deref().unwrap_or("json");
    let file = library::export(&state.db, me.id(), &id, format).await?;
    let mut resp = file.body.into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(file.content_type),
    );
    // The id is letters, digits and `_` only when it exists (it was found above).
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{}\"", file.filename)) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    Ok(resp)
}

/// `{url, token}` of a share link.
#[derive(Debug, Serialize, ToSchema)]
pub struct ShareLink {
    pub url: String,
    pub token: String,
}

/// The scheme and host the client reached this server by (for absolute share URLs).
fn origin(state: &AppState, headers: &HeaderMap) -> String {
    let get = |h: &str| headers.get(h).and_then(|v| v.to_str().ok());
    let trusted = state.config.server.trust_forwarded_for;
    let proto = trusted
        .then(|| get("x-forwarded-proto"))
        .flatten()
        .filter(|p| *p == "https" || *p == "http")
        .unwrap_or("http");
    let host = trusted
        .then(|| get("x-forwarded-host"))
        .flatten()
        .or_else(|| get("host"))
        .filter(|h| {
            !h.is_empty()
                && h.len() <= 255
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
        })
        .unwrap_or("localhost");
    format!("{proto}://{host}")
}

/// Makes a read-only public link `/share/{token}` (a new token each time: an older link stops
/// working).
#[utoipa::path(post, path = "/api/conversations/{id}/share", tag = "chat", security(("access_token" = [])),
    params(("id" = String, Path, description = "Conversation id")),
    responses((status = 200, body = ShareLink), (status = 404, body = crate::error::ErrorBody)))]
async fn share_conversation(
    State(state): State<AppState>,
    me: CurrentUser,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let token = share::share(&state.db, me.id(), &id).await?;
    hub::updated(&state, me.id(), &id).await;
    Ok(Json(share::link(&origin(&state, &headers), &token)))
}

/// Revokes the share link: it is 404 at once.
#[utoipa::path(delete, path = "/api/conversations/{id}/share", tag = "chat", security(("access_token" = [])),
    params(("id" = String, Path, description = "Conversation id")),
    responses((status = 204), (status = 404, body = crate::error::ErrorBody)))]
async fn revoke_share(
    State(state): State<AppState>,
    me: CurrentUser,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    share::revoke(&state.db, me.id(), &id).await?;
    hub::updated(&state, me.id(), &id).await;
    Ok(StatusCode::NO_CONTENT)
}
