//! The Conversations API's operations (`/v1/conversations…`): what the routes call.

use chrono::Utc;
use entity::{conversation_items, conversations};
use sea_orm::{DatabaseConnection, TransactionTrait};
use serde_json::{Map, Value, json};

use super::items;
use super::paging::{self, ListParams};
use super::{ids, not_found_conversation, parse_json};
use crate::error::ApiError;
use crate::store::conversations::{self as store, NewItem};

/// Most items one call may add (OpenAI's limit), at creation or through `POST …/items`.
pub const MAX_ITEMS_PER_CALL: usize = 20;

/// `{id, object: "conversation", created_at, metadata}`.
pub fn object(row: &conversations::Model) -> Result<Value, ApiError> {
    Ok(json!({
        "id": row.id,
        "object": "conversation",
        "created_at": row.created_at.timestamp(),
        "metadata": parse_json(&row.metadata)?,
    }))
}

/// An item as the API renders it.
pub fn item_object(row: &conversation_items::Model) -> Result<Value, ApiError> {
    parse_json(&row.item)
}

/// Validates and normalizes a client's `items` (absent = none; at most [`MAX_ITEMS_PER_CALL`]).
pub fn new_items(items: Option<&Value>) -> Result<Vec<Value>, ApiError> {
    let list = match items {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(a)) => a,
        Some(_) => {
            return Err(ApiError::invalid_param(
                "items",
                "Invalid 'items': expected an array of items.",
            ));
        }
    };
    if list.len() > MAX_ITEMS_PER_CALL {
        return Err(ApiError::invalid_param(
            "items",
            format!(
                "Invalid 'items': at most {MAX_ITEMS_PER_CALL} items can be added at a time, got {}.",
                list.len()
            ),
        ));
    }
    list.iter()
        .enumerate()
        .map(|(i, v)| items::normalize(v.clone(), &format!("items[{i}]")))
        .collect()
}

/// Rows to append for normalized items.
pub(super) fn rows(items: &[Value], response_id: Option<&str>) -> Result<Vec<NewItem>, ApiError> {
    items
        .iter()
        .map(|it| {
            Ok(NewItem {
                item_id: items::id_of(it).to_owned(),
                item: serde_json::to_string(it).map_err(ApiError::internal)?,
                response_id: response_id.map(str::to_owned),
                content_text: items::indexed_text(it),
                model: None,
                tokens: None,
            })
        })
        .collect()
}

/// `POST /v1/conversations`: a new conversation of `user_id` with `items` and `metadata`.
pub async fn create(
    db: &DatabaseConnection,
    user_id: &str,
    items: Option<&Value>,
    metadata: Option<&Value>,
) -> Result<Value, ApiError> {
    let metadata = items::metadata(metadata)?;
    let items = new_items(items)?;
    let now = Utc::now();
    let row = conversations::Model {
        id: ids::conversation_id(),
        user_id: user_id.to_owned(),
        metadata: Value::Object(metadata).to_string(),
        title: None,
        model: None,
        next_position: 0,
        created_at: now,
        updated_at: now,
        share_token_hash: None,
    };
    let new = rows(&items, None)?;
    let txn = db.begin().await?;
    store::insert(&txn, row.clone()).await?;
    if !new.is_empty() {
        store::append(&txn, user_id, &row.id, new, now).await?;
    }
    txn.commit().await?;
    object(&row)
}

/// The user's conversation, else 404.
pub async fn find(
    db: &DatabaseConnection,
    user_id: &str,
    id: &str,
) -> Result<conversations::Model, ApiError> {
    super::pending::settled(id).await;
    store::get(db, user_id, id)
        .await?
        .ok_or_else(|| not_found_conversation(id))
}

/// `GET /v1/conversations/{id}`.
pub async fn get(db: &DatabaseConnection, user_id: &str, id: &str) -> Result<Value, ApiError> {
    object(&find(db, user_id, id).await?)
}

/// `POST /v1/conversations/{id}`: replaces the metadata.
pub async fn update(
    db: &DatabaseConnection,
    user_id: &str,
    id: &str,
    metadata: Option<&Value>,
) -> Result<Value, ApiError> {
    let metadata: Map<String, Value> = items::metadata(metadata)?;
    if !store::set_metadata(
        db,
        user_id,
        id,
        Value::Object(metadata).to_string(),
        Utc::now(),
    )
    .await?
    {
        return Err(not_found_conversation(id));
    }
    get(db, user_id, id).await
}

/// `DELETE /v1/conversations/{id}`: the conversation and its items.
pub async fn delete(db: &DatabaseConnection, user_id: &str, id: &str) -> Result<Value, ApiError> {
    super::pending::settled(id).await;
    let txn = db.begin().await?;
    if !store::delete(&txn, user_id, id).await? {
        return Err(not_found_conversation(id));
    }
    txn.commit().await?;
    Ok(json!({"id": id, "object": "conversation.deleted", "deleted": true}))
}

/// `GET /v1/conversations/{id}/items`.
pub async fn list_items(
    db: &DatabaseConnection,
    user_id: &str,
    id: &str,
    params: &ListParams,
) -> Result<Value, ApiError> {
    let conv = find(db, user_id, id).await?;
    let after = match &params.after {
        None => None,
        Some(a) => Some(
            store::find_item(db, &conv.id, a)
                .await?
                .ok_or_else(|| paging::unknown_after(a))?
                .position,
        ),
    };
    let rows = store::list_items(db, &conv.id, after, params.limit + 1, params.order).await?;
    let data = rows
        .iter()
        .map(item_object)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(paging::list_object(data, params.limit, items::id_of))
}

/// `POST /v1/conversations/{id}/items`: appends; answers the added items as a list.
pub async fn add_items(
    db: &DatabaseConnection,
    user_id: &str,
    id: &str,
    items: Option<&Value>,
) -> Result<Value, ApiError> {
    if items.is_none_or(Value::is_null) {
        return Err(ApiError::BadRequest {
            message: "Missing required parameter: 'items'.".into(),
            code: "missing_field",
            param: Some("items".into()),
        });
    }
    let items = new_items(items)?;
    let new = rows(&items, None)?;
    if !new.is_empty() {
        let txn = db.begin().await?;
        if store::append(&txn, user_id, id, new, Utc::now())
            .await?
            .is_none()
        {
            return Err(not_found_conversation(id));
        }
        txn.commit().await?;
    } else {
        find(db, user_id, id).await?;
    }
    let n = items.len() as u64;
    Ok(paging::list_object(items, n, items::id_of))
}

/// `GET /v1/conversations/{id}/items/{item_id}`.
pub async fn get_item(
    db: &DatabaseConnection,
    user_id: &str,
    id: &str,
    item_id: &str,
) -> Result<Value, ApiError> {
    let conv = find(db, user_id, id).await?;
    let row = store::find_item(db, &conv.id, item_id)
        .await?
        .ok_or_else(|| not_found_item(item_id))?;
    item_object(&row)
}

/// `DELETE /v1/conversations/{id}/items/{item_id}`: answers the conversation.
pub async fn delete_item(
    db: &DatabaseConnection,
    user_id: &str,
    id: &str,
    item_id: &str,
) -> Result<Value, ApiError> {
    let conv = find(db, user_id, id).await?;
    if !store::delete_item(db, &conv.id, item_id, Utc::now()).await? {
        return Err(not_found_item(item_id));
    }
    get(db, user_id, id).await
}

fn not_found_item(id: &str) -> ApiError {
    ApiError::NotFound {
        message: format!("Item with id '{id}' not found."),
        code: "not_found",
    }
}
