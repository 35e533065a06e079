//! Stored chat completions (`GET /v1/chat/completions`, `GET/POST/DELETE
//! /v1/chat/completions/{id}`, `GET /v1/chat/completions/{id}/messages`, gateway keys).
//! `POST /v1/chat/completions` itself is the hot path's (it never reaches the router unless CORS
//! is on; see `edge`).

use axum::extract::State;
use axum::http::HeaderMap;
use serde_json::Value;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::conversations::completions as sc;
use crate::error::{ApiError, Json, Path, Query};
use crate::routes::ClientIp;
use std::time::Instant;

use crate::providers::Endpoint;
use crate::routes::conversations::{Subject, caller, field, metered};
use crate::state::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_completions))
        .routes(routes!(
            get_completion,
            update_completion,
            delete_completion
        ))
        .routes(routes!(list_messages))
}

/// The key's user's stored chat completions: `model`, `metadata[k]=v` (each must match),
/// `after` (a completion id), `limit` 1–100 (default 20), `order` (`asc`, default, | `desc`).
#[utoipa::path(get, path = "/v1/chat/completions", tag = "openai",
    params(("model" = Option<String>, Query, description = "Only this model"),
        ("after" = Option<String>, Query, description = "Completion id to list after"),
        ("limit" = Option<u64>, Query, description = "1–100, default 20"),
        ("order" = Option<String>, Query, description = "`asc` (default) | `desc`")),
    responses((status = 200, description = "`{object: \"list\", data, first_id, last_id, has_more}`", body = serde_json::Value),
        (status = 400, body = crate::error::ErrorBody), (status = 401, body = crate::error::ErrorBody)),
    security(("gateway_key" = []), ("gateway_key_header" = [])))]
async fn list_completions(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    Query(query): Query<Vec<(String, String)>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let started = Instant::now();
    let key = caller(&state, &headers, ip).await?;
    let res = sc::list(&state.db, &key.user_id, &query).await;
    metered(
        &state,
        &key,
        &headers,
        Endpoint::StoredCompletions,
        Subject::Other,
        started,
        res,
    )
    .await
}

/// A stored chat completion (the `chat.completion` object with its `metadata`).
#[utoipa::path(get, path = "/v1/chat/completions/{id}", tag = "openai",
    params(("id" = String, Path, description = "`chatcmpl-…`")),
    responses((status = 200, body = serde_json::Value), (status = 404, body = crate::error::ErrorBody)),
    security(("gateway_key" = []), ("gateway_key_header" = [])))]
async fn get_completion(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let started = Instant::now();
    let key = caller(&state, &headers, ip).await?;
    let res = sc::get(&state.db, &key.user_id, &id).await;
    metered(
        &state,
        &key,
        &headers,
        Endpoint::StoredCompletions,
        Subject::Other,
        started,
        res,
    )
    .await
}

/// Replaces a stored chat completion's metadata.
#[utoipa::path(post, path = "/v1/chat/completions/{id}", tag = "openai",
    params(("id" = String, Path, description = "`chatcmpl-…`")),
    request_body(content = serde_json::Value, description = "`{metadata: {string: string}}`", content_type = "application/json"),
    responses((status = 200, body = serde_json::Value), (status = 400, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody)),
    security(("gateway_key" = []), ("gateway_key_header" = [])))]
async fn update_completion(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    Path(id): Path<String>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Result<Json<Value>, ApiError> {
    let started = Instant::now();
    let key = caller(&state, &headers, ip).await?;
    let metadata = field(&body, "metadata")?;
    let res = sc::update(&state.db, &key.user_id, &id, metadata).await;
    metered(
        &state,
        &key,
        &headers,
        Endpoint::StoredCompletions,
        Subject::Other,
        started,
        res,
    )
    .await
}

/// Deletes a stored chat completion.
#[utoipa::path(delete, path = "/v1/chat/completions/{id}", tag = "openai",
    params(("id" = String, Path, description = "`chatcmpl-…`")),
    responses((status = 200, description = "`{object: \"chat.completion.deleted\", id, deleted: true}`", body = serde_json::Value), (status = 404, body = crate::error::ErrorBody)),
    security(("gateway_key" = []), ("gateway_key_header" = [])))]
async fn delete_completion(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let started = Instant::now();
    let key = caller(&state, &headers, ip).await?;
    let res = sc::delete(&state.db, &key.user_id, &id).await;
    metered(
        &state,
        &key,
        &headers,
        Endpoint::StoredCompletions,
        Subject::Other,
        started,
        res,
    )
    .await
}

/// A stored chat completion's request messages, each with an id (`after`, `limit`, `order`,
/// default `asc`).
#[utoipa::path(get, path = "/v1/chat/completions/{id}/messages", tag = "openai",
    params(("id" = String, Path, description = "`chatcmpl-…`"),
        ("after" = Option<String>, Query, description = "Message id to list after"),
        ("limit" = Option<u64>, Query, description = "1–100, default 20"),
        ("order" = Option<String>, Query, description = "`asc` (default) | `desc`")),
    responses((status = 200, body = serde_json::Value), (status = 400, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody)),
    security(("gateway_key" = []), ("gateway_key_header" = [])))]
async fn list_messages(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    Path(id): Path<String>,
    Query(query): Query<Vec<(String, String)>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let started = Instant::now();
    let key = caller(&state, &headers, ip).await?;
    let res = sc::messages(&state.db, &key.user_id, &id, &query).await;
    metered(
        &state,
        &key,
        &headers,
        Endpoint::StoredCompletions,
        Subject::Other,
        started,
        res,
    )
    .await
}
