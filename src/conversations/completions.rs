//! Stored chat completions (`store: true` on `/v1/chat/completions`): saving one, and the
//! `/v1/chat/completions` list / get / update / delete / messages operations.

use chrono::{DateTime, Utc};
use entity::stored_completions;
use sea_orm::{DatabaseConnection, TransactionSession, TransactionTrait};
use serde_json::{Map, Value, json};

use super::paging::{self, ListParams, Order};
use super::{items, parse_json};
use crate::error::ApiError;
use crate::store::completions::{self as store, Filter};

/// A completion to store, as the coordinator hands it over after the upstream answered.
#[derive(Debug, Clone)]
pub struct StoredCompletion {
    /// The `chatcmpl-…` id the client saw. Upstream ids are not reliably unique across
    /// providers: the coordinator gives the response a fresh [`super::ids::completion_id`] when
    /// storing (a duplicate id is refused here as 409).
    pub id: String,
    pub user_id: String,
    pub key_id: String,
    /// The model name the client sent.
    pub model: String,
    /// The request's `metadata`, checked with [`items::metadata`] before forwarding.
    pub metadata: Map<String, Value>,
    /// The request's `messages`.
    pub messages: Vec<Value>,
    /// The `chat.completion` object the client got (for a stream: the one its chunks add up to).
    pub response: Value,
    pub created_at: DateTime<Utc>,
}

/// Saves `c` (one transaction: the completion and its metadata pairs).
/// `db` may be a transaction (a batch of saves, `conversations::writer`): this one then goes in a
/// savepoint of it.
pub async fn save_completion<C: TransactionTrait>(
    db: &C,
    c: StoredCompletion,
) -> Result<(), ApiError> {
    let metadata = items::metadata(Some(&Value::Object(c.metadata)))?;
    let pairs = pairs_of(&metadata);
    let row = stored_completions::Model {
        seq: 0,
        id: c.id,
        user_id: c.user_id,
        key_id: c.key_id,
        model: c.model,
        metadata: Value::Object(metadata).to_string(),
        messages: Value::Array(c.messages).to_string(),
        response: c.response.to_string(),
        created_at: c.created_at,
    };
    let txn = db.begin().await?;
    match store::insert(&txn, row, &pairs).await {
        Err(e) if crate::store::is_unique_violation(&e) => {
            return Err(ApiError::conflict(
                "A stored chat completion with this id exists.",
            ));
        }
        other => other?,
    }
    txn.commit().await?;
    Ok(())
}

fn pairs_of(m: &Map<String, Value>) -> Vec<(String, String)> {
    m.iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
        .collect()
}

/// The stored object: the `chat.completion` with its `metadata`.
fn object(row: &stored_completions::Model) -> Result<Value, ApiError> {
    let mut v = parse_json(&row.response)?;
    if let Value::Object(o) = &mut v {
        o.insert("metadata".into(), parse_json(&row.metadata)?);
    }
    Ok(v)
}

fn find_err(id: &str) -> ApiError {
    ApiError::NotFound {
        message: format!("No chat completion found with id '{id}'."),
        code: "not_found",
    }
}

async fn find(
    db: &DatabaseConnection,
    user_id: &str,
    id: &str,
) -> Result<stored_completions::Model, ApiError> {
    super::pending::settled(id).await;
    store::get(db, user_id, id)
        .await?
        .ok_or_else(|| find_err(id))
}

/// `GET /v1/chat/completions?model=&metadata[k]=v&after=&limit=&order=` (default `asc`).
pub async fn list(
    db: &DatabaseConnection,
    user_id: &str,
    query: &[(String, String)],
) -> Result<Value, ApiError> {
    let params = ListParams::parse(query, Order::Asc)?;
    super::pending::settled(&super::pending::completions_of(user_id)).await;
    let mut filter = Filter::default();
    for (k, v) in query {
        if k == "model" && !v.is_empty() {
            filter.model = Some(v.clone());
        } else if let Some(key) = k
            .strip_prefix("metadata[")
            .and_then(|r| r.strip_suffix(']'))
        {
            filter.metadata.push((key.to_owned(), v.clone()));
        }
    }
    if filter.metadata.len() > items::MAX_METADATA_PAIRS {
        return Err(ApiError::invalid_param(
            "metadata",
            format!("At most {} metadata filters.", items::MAX_METADATA_PAIRS),
        ));
    }
    let after = match &params.after {
        None => None,
        Some(a) => Some(
            store::get(db, user_id, a)
                .await?
                .ok_or_else(|| paging::unknown_after(a))?
                .seq,
        ),
    };
    let rows = store::list(db, user_id, &filter, after, params.limit + 1, params.order).await?;
    let data = rows.iter().map(object).collect::<Result<Vec<_>, _>>()?;
    Ok(paging::list_object(data, params.limit, |v| {
        v.get("id").and_then(Value::as_str).unwrap_or_default()
    }))
}

/// `GET /v1/chat/completions/{id}`.
pub async fn get(db: &DatabaseConnection, user_id: &str, id: &str) -> Result<Value, ApiError> {
    object(&find(db, user_id, id).await?)
}

/// `POST /v1/chat/completions/{id}` `{metadata}`: replaces the metadata.
pub async fn update(
    db: &DatabaseConnection,
    user_id: &str,
    id: &str,
    metadata: Option<&Value>,
) -> Result<Value, ApiError> {
    let metadata = items::metadata(metadata)?;
    let pairs = pairs_of(&metadata);
    super::pending::settled(id).await;
    let txn = db.begin().await?;
    if !store::set_metadata(
        &txn,
        user_id,
        id,
        Value::Object(metadata).to_string(),
        &pairs,
    )
    .await?
    {
        return Err(find_err(id));
    }
    txn.commit().await?;
    get(db, user_id, id).await
}

/// `DELETE /v1/chat/completions/{id}`.
pub async fn delete(db: &DatabaseConnection, user_id: &str, id: &str) -> Result<Value, ApiError> {
    super::pending::settled(id).await;
    let txn = db.begin().await?;
    if !store::delete(&txn, user_id, id).await? {
        return Err(find_err(id));
    }
    txn.commit().await?;
    Ok(json!({"object": "chat.completion.deleted", "id": id, "deleted": true}))
}

/// `GET /v1/chat/completions/{id}/messages` (default `asc`): the request's messages, each with
/// the id `<completion id>-<index>`; a message whose `content` is an array of parts gets its text
/// as `content` and the parts as `content_parts` (OpenAI's stored message shape).
pub async fn messages(
    db: &DatabaseConnection,
    user_id: &str,
    id: &str,
    query: &[(String, String)],
) -> Result<Value, ApiError> {
    let params = ListParams::parse(query, Order::Asc)?;
    let row = find(db, user_id, id).await?;
    let Value::Array(msgs) = parse_json(&row.messages)? else {
        return Ok(paging::list_object(Vec::new(), params.limit, |_| ""));
    };
    let mut all: Vec<Value> = msgs
        .into_iter()
        .enumerate()
        .map(|(i, m)| message_object(&row.id, i, m))
        .collect();
    if params.order == Order::Desc {
        all.reverse();
    }
    let start = match &params.after {
        None => 0,
        Some(a) => {
            all.iter()
                .position(|v| v["id"] == a.as_str())
                .ok_or_else(|| paging::unknown_after(a))?
                + 1
        }
    };
    let page: Vec<Value> = all
        .into_iter()
        .skip(start)
        .take(params.limit as usize + 1)
        .collect();
    Ok(paging::list_object(page, params.limit, |v| {
        v.get("id").and_then(Value::as_str).unwrap_or_default()
    }))
}

fn message_object(completion_id: &str, i: usize, m: Value) -> Value {
    let mut o = match m {
        Value::Object(o) => o,
        other => {
            let mut o = Map::new();
            o.insert("content".into(), other);
            o
        }
    };
    if let Some(Value::Array(parts)) = o.get("content").cloned() {
        let text: String = parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("");
        o.insert("content_parts".into(), Value::Array(parts));
        o.insert(
            "content".into(),
            if text.is_empty() {
                Value::Null
            } else {
                Value::String(text)
            },
        );
    }
    o.insert("id".into(), Value::String(format!("{completion_id}-{i}")));
    Value::Object(o)
}
