//! Stored responses of the Responses API (`GET/DELETE /v1/responses/{id}`,
//! `GET /v1/responses/{id}/input_items`, gateway keys). `POST /v1/responses` is the hot path's.

use axum::extract::State;
use axum::http::HeaderMap;
use serde_json::Value;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::conversations::paging::{ListParams, Order};
use crate::conversations::responses as resp;
use crate::error::{ApiError, Json, Path, Query};
use crate::routes::ClientIp;
use std::time::Instant;

use crate::providers::Endpoint;
use crate::routes::conversations::{Subject, caller, metered};
use crate::state::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(get_response, delete_response))
        .routes(routes!(input_items))
}

/// A stored response of the key's user, as it was returned.
#[utoipa::path(get, path = "/v1/responses/{id}", tag = "responses",
    params(("id" = String, Path, description = "`resp_…`")),
    responses((status = 200, description = "The response object", body = serde_json::Value), (status = 404, body = crate::error::ErrorBody)),
    security(("gateway_key" = []), ("gateway_key_header" = [])))]
async fn get_response(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let started = Instant::now();
    let key = caller(&state, &headers, ip).await?;
    let res = resp::get(&state.db, &key.user_id, &id).await;
    metered(
        &state,
        &key,
        &headers,
        Endpoint::StoredResponses,
        Subject::Response(&id),
        started,
        res,
    )
    .await
}

/// Deletes a stored response (items it added to a conversation stay).
#[utoipa::path(delete, path = "/v1/responses/{id}", tag = "responses",
    params(("id" = String, Path, description = "`resp_…`")),
    responses((status = 200, description = "`{id, object: \"response\", deleted: true}`", body = serde_json::Value), (status = 404, body = crate::error::ErrorBody)),
    security(("gateway_key" = []), ("gateway_key_header" = [])))]
async fn delete_response(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let started = Instant::now();
    let key = caller(&state, &headers, ip).await?;
    let res = resp::delete(&state.db, &key.user_id, &id).await;
    metered(
        &state,
        &key,
        &headers,
        Endpoint::StoredResponses,
        Subject::Response(&id),
        started,
        res,
    )
    .await
}

/// A stored response's own input items, paged (`after`, `limit` 1–100, `order`, default `desc`).
#[utoipa::path(get, path = "/v1/responses/{id}/input_items", tag = "responses",
    params(("id" = String, Path, description = "`resp_…`"),
        ("after" = Option<String>, Query, description = "Item id to list after"),
        ("limit" = Option<u64>, Query, description = "1–100, default 20"),
        ("order" = Option<String>, Query, description = "`asc` | `desc` (default)")),
    responses((status = 200, description = "`{object: \"list\", data, first_id, last_id, has_more}`", body = serde_json::Value),
        (status = 400, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody)),
    security(("gateway_key" = []), ("gateway_key_header" = [])))]
async fn input_items(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    Path(id): Path<String>,
    Query(query): Query<Vec<(String, String)>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let started = Instant::now();
    let key = caller(&state, &headers, ip).await?;
    let params = ListParams::parse(&query, Order::Desc)?;
    let res = resp::input_items(&state.db, &key.user_id, &id, &params).await;
    metered(
        &state,
        &key,
        &headers,
        Endpoint::StoredResponses,
        Subject::Response(&id),
        started,
        res,
    )
    .await
}
