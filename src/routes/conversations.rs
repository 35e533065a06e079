//! OpenAI's Conversations API (`/v1/conversations…`, gateway keys): conversations and their
//! items, stored by tollgate for any provider (API.md §9). Handlers are thin: `conversations::`
//! holds the rules.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::HeaderMap;
use serde_json::Value;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::cache::KeyCtx;
use crate::conversations::conversation as conv;
use crate::conversations::paging::{ListParams, Order};
use crate::error::{ApiError, Json, Path, Query};
use crate::metering::event::UsageEvent;
use crate::providers::Endpoint;
use crate::routes::ClientIp;
use crate::state::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_conversation))
        .routes(routes!(
            get_conversation,
            update_conversation,
            delete_conversation
        ))
        .routes(routes!(list_items, add_items))
        .routes(routes!(get_item, delete_item))
}

/// The gateway key of a stored-state request: valid and active (as `proxy::auth`), and the
/// caller's address allowed for it. The objects are its user's.
pub(crate) async fn caller(
    state: &AppState,
    headers: &HeaderMap,
    ip: Option<IpAddr>,
) -> Result<Arc<KeyCtx>, ApiError> {
    let key = crate::proxy::auth::authenticate(state, headers).await?;
    if let Some(ip) = ip
        && !key.allows_ip(ip)
    {
        return Err(ApiError::forbidden(
            "ip_not_allowed",
            format!("Requests from {ip} are not allowed for this API key."),
        ));
    }
    Ok(key)
}

/// What a stored-state call was about, for its usage record's `response_id` / `conversation_id`.
/// Recorded only when the call succeeded: an id from a failed call (not found, not the caller's)
/// names nothing of the user's.
#[derive(Clone, Copy)]
pub(crate) enum Subject<'a> {
    /// A conversation by its path id, or (`None`) the one the answer names (create).
    Conversation(Option<&'a str>),
    /// A stored response by its path id (and its conversation, when the answer names one).
    Response(&'a str),
    /// Nothing a usage record has a column for (stored chat completions).
    Other,
}

impl Subject<'_> {
    /// `(response_id, conversation_id)` for a successful call's answer `v`.
    fn ids(self, v: &Value) -> (Option<String>, Option<String>) {
        let id_of = |v: &Value| v.get("id").and_then(Value::as_str).map(str::to_owned);
        match self {
            Subject::Conversation(Some(id)) => (None, Some(id.to_owned())),
            Subject::Conversation(None) => (None, id_of(v)),
            Subject::Response(id) => (Some(id.to_owned()), v.get("conversation").and_then(id_of)),
            Subject::Other => (None, None),
        }
    }
}

/// Writes the request's usage record (API.md §8: every `/v1` route writes one): no model, no
/// tokens, cost 0, the status the client gets, the response or conversation it was about; then
/// answers `result`. The usage queue's back-pressure applies as on the hot path; a queue still
/// full after 5 s is logged and counted, and the answer goes out anyway (these calls cost nothing).
pub(crate) async fn metered(
    state: &AppState,
    key: &KeyCtx,
    headers: &HeaderMap,
    endpoint: Endpoint,
    subject: Subject<'_>,
    started: Instant,
    result: Result<Value, ApiError>,
) -> Result<Json<Value>, ApiError> {
    let (status, (response_id, conversation_id)) = match &result {
        Ok(v) => (200, subject.ids(v)),
        Err(e) => (e.parts().0.as_u16(), (None, None)),
    };
    match state.usage.reserve(Duration::from_secs(5)).await {
        Some(permit) => drop(
            permit.send(UsageEvent {
                at: chrono::Utc::now(),
                user_id: key.user_id.clone(),
                key_id: key.key_id.clone(),
                model: String::new(),
                provider: String::new(),
                endpoint,
                stream: false,
                status,
                usage: Default::default(),
                prices: Default::default(),
                latency_ms: i64::try_from(started.elapsed().as_millis()).unwrap_or(i64::MAX),
                ttft_ms: None,
                tokens_estimated: false,
                request_id: headers
                    .get(crate::edge::X_REQUEST_ID)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned(),
                shared_key: false,
                error: result
                    .as_ref()
                    .err()
                    .and_then(|e| e.parts().2)
                    .map(str::to_owned),
                reservation: Default::default(),
                charged: false,
                ticket: Default::default(),
                response_id,
                conversation_id,
                routed: Default::default(),
                extra_cost_nanos: 0,
            }),
        ),
        None => {
            tracing::error!(
                endpoint = endpoint.as_str(),
                "usage queue full for 5 s: no usage record for this stored-state call"
            );
        }
    }
    result.map(Json)
}

/// A JSON body's field (the body must be an object; `/v1` ignores unknown fields).
pub(crate) fn field<'a>(body: &'a Value, name: &str) -> Result<Option<&'a Value>, ApiError> {
    match body {
        Value::Object(o) => Ok(o.get(name)),
        _ => Err(ApiError::bad_request(
            "invalid_json",
            "The request body must be a JSON object.",
        )),
    }
}

/// Creates a conversation, optionally with up to 20 initial items and metadata.
#[utoipa::path(post, path = "/v1/conversations", tag = "conversations",
    request_body(content = serde_json::Value, description = "`{items?: [item], metadata?: {string: string}}`", content_type = "application/json"),
    responses((status = 200, description = "`{id, object: \"conversation\", created_at, metadata}`", body = serde_json::Value),
        (status = 400, body = crate::error::ErrorBody), (status = 401, body = crate::error::ErrorBody)),
    security(("gateway_key" = []), ("gateway_key_header" = [])))]
async fn create_conversation(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    let started = Instant::now();
    let key = caller(&state, &headers, ip).await?;
    // The body is optional here (OpenAI's SDKs send none for `conversations.create()`).
    let body = if body.iter().all(u8::is_ascii_whitespace) {
        Value::Object(Default::default())
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::bad_request(
                "invalid_json",
                format!("We could not parse the JSON body of your request: {e}"),
            )
        })?
    };
    let res = conv::create(
        &state.db,
        &key.user_id,
        field(&body, "items")?,
        field(&body, "metadata")?,
    )
    .await;
    metered(
        &state,
        &key,
        &headers,
        Endpoint::Conversations,
        Subject::Conversation(None),
        started,
        res,
    )
    .await
}

/// A conversation of the key's user.
#[utoipa::path(get, path = "/v1/conversations/{id}", tag = "conversations",
    params(("id" = String, Path, description = "`conv_…`")),
    responses((status = 200, body = serde_json::Value), (status = 404, body = crate::error::ErrorBody)),
    security(("gateway_key" = []), ("gateway_key_header" = [])))]
async fn get_conversation(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let started = Instant::now();
    let key = caller(&state, &headers, ip).await?;
    let res = conv::get(&state.db, &key.user_id, &id).await;
    metered(
        &state,
        &key,
        &headers,
        Endpoint::Conversations,
        Subject::Conversation(Some(&id)),
        started,
        res,
    )
    .await
}

/// Replaces a conversation's metadata.
#[utoipa::path(post, path = "/v1/conversations/{id}", tag = "conversations",
    params(("id" = String, Path, description = "`conv_…`")),
    request_body(content = serde_json::Value, description = "`{metadata: {string: string}}`", content_type = "application/json"),
    responses((status = 200, body = serde_json::Value), (status = 400, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody)),
    security(("gateway_key" = []), ("gateway_key_header" = [])))]
async fn update_conversation(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    Path(id): Path<String>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Result<Json<Value>, ApiError> {
    let started = Instant::now();
    let key = caller(&state, &headers, ip).await?;
    let metadata = field(&body, "metadata")?;
    let res = conv::update(&state.db, &key.user_id, &id, metadata).await;
    metered(
        &state,
        &key,
        &headers,
        Endpoint::Conversations,
        Subject::Conversation(Some(&id)),
        started,
        res,
    )
    .await
}

/// Deletes a conversation and its items.
#[utoipa::path(delete, path = "/v1/conversations/{id}", tag = "conversations",
    params(("id" = String, Path, description = "`conv_…`")),
    responses((status = 200, description = "`{id, object: \"conversation.deleted\", deleted: true}`", body = serde_json::Value), (status = 404, body = crate::error::ErrorBody)),
    security(("gateway_key" = []), ("gateway_key_header" = [])))]
async fn delete_conversation(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let started = Instant::now();
    let key = caller(&state, &headers, ip).await?;
    let res = conv::delete(&state.db, &key.user_id, &id).await;
    metered(
        &state,
        &key,
        &headers,
        Endpoint::Conversations,
        Subject::Conversation(Some(&id)),
        started,
        res,
    )
    .await
}

/// A conversation's items, paged: `after` (an item id; one not in the conversation is 400),
/// `limit` 1–100 (default 20), `order` `asc` | `desc` (default `desc`).
#[utoipa::path(get, path = "/v1/conversations/{id}/items", tag = "conversations",
    params(("id" = String, Path, description = "`conv_…`"),
        ("after" = Option<String>, Query, description = "Item id to list after"),
        ("limit" = Option<u64>, Query, description = "1–100, default 20"),
        ("order" = Option<String>, Query, description = "`asc` | `desc` (default)")),
    responses((status = 200, description = "`{object: \"list\", data, first_id, last_id, has_more}`", body = serde_json::Value),
        (status = 400, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody)),
    security(("gateway_key" = []), ("gateway_key_header" = [])))]
async fn list_items(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    Path(id): Path<String>,
    Query(query): Query<Vec<(String, String)>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let started = Instant::now();
    let key = caller(&state, &headers, ip).await?;
    let params = ListParams::parse(&query, Order::Desc)?;
    let res = conv::list_items(&state.db, &key.user_id, &id, &params).await;
    metered(
        &state,
        &key,
        &headers,
        Endpoint::Conversations,
        Subject::Conversation(Some(&id)),
        started,
        res,
    )
    .await
}

/// Appends up to 20 items to a conversation; answers them as a list.
#[utoipa::path(post, path = "/v1/conversations/{id}/items", tag = "conversations",
    params(("id" = String, Path, description = "`conv_…`")),
    request_body(content = serde_json::Value, description = "`{items: [item]}`", content_type = "application/json"),
    responses((status = 200, body = serde_json::Value), (status = 400, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody)),
    security(("gateway_key" = []), ("gateway_key_header" = [])))]
async fn add_items(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    Path(id): Path<String>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Result<Json<Value>, ApiError> {
    let started = Instant::now();
    let key = caller(&state, &headers, ip).await?;
    let items = field(&body, "items")?;
    let res = conv::add_items(&state.db, &key.user_id, &id, items).await;
    metered(
        &state,
        &key,
        &headers,
        Endpoint::Conversations,
        Subject::Conversation(Some(&id)),
        started,
        res,
    )
    .await
}

/// One item of a conversation.
#[utoipa::path(get, path = "/v1/conversations/{id}/items/{item_id}", tag = "conversations",
    params(("id" = String, Path, description = "`conv_…`"), ("item_id" = String, Path, description = "`msg_…`, `fc_…`, …")),
    responses((status = 200, body = serde_json::Value), (status = 404, body = crate::error::ErrorBody)),
    security(("gateway_key" = []), ("gateway_key_header" = [])))]
async fn get_item(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    Path((id, item_id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let started = Instant::now();
    let key = caller(&state, &headers, ip).await?;
    let res = conv::get_item(&state.db, &key.user_id, &id, &item_id).await;
    metered(
        &state,
        &key,
        &headers,
        Endpoint::Conversations,
        Subject::Conversation(Some(&id)),
        started,
        res,
    )
    .await
}

/// Deletes one item; answers the conversation.
#[utoipa::path(delete, path = "/v1/conversations/{id}/items/{item_id}", tag = "conversations",
    params(("id" = String, Path, description = "`conv_…`"), ("item_id" = String, Path, description = "`msg_…`, `fc_…`, …")),
    responses((status = 200, description = "The conversation object", body = serde_json::Value), (status = 404, body = crate::error::ErrorBody)),
    security(("gateway_key" = []), ("gateway_key_header" = [])))]
async fn delete_item(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    Path((id, item_id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let started = Instant::now();
    let key = caller(&state, &headers, ip).await?;
    let res = conv::delete_item(&state.db, &key.user_id, &id, &item_id).await;
    metered(
        &state,
        &key,
        &headers,
        Endpoint::Conversations,
        Subject::Conversation(Some(&id)),
        started,
        res,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::Subject;
    use serde_json::json;

    #[test]
    fn a_usage_record_names_what_the_call_was_about() {
        let conv = json!({"id": "conv_new", "object": "conversation"});
        assert_eq!(
            Subject::Conversation(None).ids(&conv),
            (None, Some("conv_new".into()))
        );
        let list = json!({"object": "list", "data": []});
        assert_eq!(
            Subject::Conversation(Some("conv_path")).ids(&list),
            (None, Some("conv_path".into()))
        );
        let attached = json!({"id": "resp_1", "conversation": {"id": "conv_a"}});
        assert_eq!(
            Subject::Response("resp_1").ids(&attached),
            (Some("resp_1".into()), Some("conv_a".into()))
        );
        let alone = json!({"id": "resp_2", "conversation": null});
        assert_eq!(
            Subject::Response("resp_2").ids(&alone),
            (Some("resp_2".into()), None)
        );
        assert_eq!(Subject::Other.ids(&conv), (None, None));
    }
}
