//! Stored responses: saving one (and appending its items to its conversation), the history a
//! new response continues, and the `/v1/responses/{id}` routes' operations.

use chrono::{DateTime, Utc};
use entity::responses;
use sea_orm::{DatabaseConnection, TransactionSession, TransactionTrait};
use serde_json::{Value, json};

use super::conversation::rows;
use super::paging::{self, ListParams, Order};
use super::{ids, items, not_found_conversation, not_found_response, parse_json};
use crate::error::ApiError;
use crate::store;

/// Most responses a `previous_response_id` chain replays; a longer chain is 400.
pub const MAX_CHAIN_DEPTH: usize = 1000;
/// Most bytes of items a history replays (JSON text as stored); more is 400.
pub const MAX_HISTORY_BYTES: usize = 32 * 1024 * 1024;
/// Most items a conversation's history replays; more is 400.
pub const MAX_HISTORY_ITEMS: usize = 10_000;
/// Conversation items read per query while gathering a history.
const HISTORY_PAGE: u64 = 500;

/// A response to store (`store: true`), as the coordinator hands it over after the upstream
/// answered.
#[derive(Debug, Clone)]
pub struct StoredResponse {
    /// `resp_…`: from [`ids::response_id`], made before the upstream call so streamed events
    /// carry it.
    pub id: String,
    /// The owner: the gateway key's user.
    pub user_id: String,
    pub key_id: String,
    /// The model name the client sent.
    pub model: String,
    /// The response's `status` (`completed`, `incomplete`, `failed`, …).
    pub status: String,
    pub previous_response_id: Option<String>,
    pub conversation_id: Option<String>,
    /// This turn's own input items (not the replayed history), in any form the Responses API
    /// accepts (see [`items::input_items`]); normalized and given ids here.
    pub input_items: Vec<Value>,
    /// The response object as the client got it, `output` included. Output items without an
    /// `id` get one.
    pub response: Value,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub created_at: DateTime<Utc>,
}

/// Saves `r` and, when it ran in a conversation, appends its input items then its output items
/// to that conversation — in one transaction: both land or neither does. The conversation must
/// be the user's (else 404 and nothing is written). Returns the stored input items (with ids).
pub async fn save_response<C: TransactionTrait>(
    db: &C,
    mut r: StoredResponse,
) -> Result<Vec<Value>, ApiError> {
    let input = r
        .input_items
        .drain(..)
        .enumerate()
        .map(|(i, v)| items::normalize(v, &format!("input[{i}]")))
        .collect::<Result<Vec<_>, _>>()?;
    let output = match r.response.get_mut("output") {
        Some(Value::Array(out)) => {
            for it in out.iter_mut() {
                if let Value::Object(o) = it
                    && !o.get("id").is_some_and(Value::is_string)
                {
                    let ty = o.get("type").and_then(Value::as_str).unwrap_or("message");
                    let id = ids::item_id(ty);
                    o.insert("id".into(), Value::String(id));
                }
            }
            out.iter().filter(|v| v.is_object()).cloned().collect()
        }
        _ => Vec::new(),
    };
    let row = responses::Model {
        id: r.id.clone(),
        user_id: r.user_id.clone(),
        key_id: r.key_id,
        model: r.model,
        status: r.status,
        previous_response_id: r.previous_response_id,
        conversation_id: r.conversation_id.clone(),
        input_items: Value::Array(input.clone()).to_string(),
        response: r.response.to_string(),
        input_tokens: r.input_tokens.max(0),
        output_tokens: r.output_tokens.max(0),
        created_at: r.created_at,
    };
    let txn = db.begin().await?;
    store::responses::insert(&txn, row).await?;
    if let Some(conv) = &r.conversation_id {
        let mut new = rows(&input, Some(&r.id))?;
        new.extend(rows(&output, Some(&r.id))?);
        if !new.is_empty()
            && store::conversations::append(&txn, &r.user_id, conv, new, r.created_at)
                .await?
                .is_none()
        {
            return Err(not_found_conversation(conv));
        }
    }
    txn.commit().await?;
    Ok(input)
}

/// The items a new response continues, oldest first:
/// - `previous_response_id`: each response of the chain (walked back through their own
///   `previous_response_id`), oldest first, its input items then its output items. A response
///   deeper in the chain that no longer exists (deleted, or past `storage.retention_days`) ends
///   the walk there; the named one itself missing, or another user's, is 404.
/// - `conversation_id`: the conversation's items in order (another user's: 404).
/// - both: 400, as OpenAI (they are exclusive); neither: empty.
///
/// Bounded: more than [`MAX_CHAIN_DEPTH`] responses, [`MAX_HISTORY_ITEMS`] conversation items or
/// [`MAX_HISTORY_BYTES`] of items is 400 `invalid_value` naming the parameter.
pub async fn history_for(
    db: &DatabaseConnection,
    user_id: &str,
    previous_response_id: Option<&str>,
    conversation_id: Option<&str>,
) -> Result<Vec<Value>, ApiError> {
    match (previous_response_id, conversation_id) {
        (Some(_), Some(_)) => Err(ApiError::invalid_param(
            "previous_response_id",
            "Mutually exclusive parameters: Ensure you are only providing one of: 'previous_response_id' or 'conversation'.",
        )),
        (Some(p), None) => chain_history(db, user_id, p).await,
        (None, Some(c)) => conversation_history(db, user_id, c).await,
        (None, None) => Ok(Vec::new()),
    }
}

async fn chain_history(
    db: &DatabaseConnection,
    user_id: &str,
    id: &str,
) -> Result<Vec<Value>, ApiError> {
    let too_long = |what: String| {
        ApiError::invalid_param(
            "previous_response_id",
            format!(
                "The history of response '{id}' is too long to replay: {what}. Start a new chain or use a conversation."
            ),
        )
    };
    super::pending::settled(id).await;
    let mut links = Vec::new();
    let mut bytes = 0usize;
    let mut next = Some(id.to_owned());
    while let Some(cur) = next.take() {
        let Some(link) = store::responses::link(db, user_id, &cur).await? else {
            if links.is_empty() {
                return Err(not_found_response(id));
            }
            break;
        };
        if links.len() == MAX_CHAIN_DEPTH {
            return Err(too_long(format!("more than {MAX_CHAIN_DEPTH} responses")));
        }
        bytes = bytes
            .saturating_add(link.input_items.len())
            .saturating_add(link.response.len());
        if bytes > MAX_HISTORY_BYTES {
            return Err(too_long(format!("more than {MAX_HISTORY_BYTES} bytes")));
        }
        next = link.previous_response_id.clone();
        links.push(link);
    }
    let mut out = Vec::new();
    for link in links.iter().rev() {
        if let Value::Array(a) = parse_json(&link.input_items)? {
            out.extend(a);
        }
        if let Value::Array(a) = parse_json(&link.response)?
            .get_mut("output")
            .map(Value::take)
            .unwrap_or_default()
        {
            out.extend(a);
        }
    }
    Ok(out)
}

async fn conversation_history(
    db: &DatabaseConnection,
    user_id: &str,
    id: &str,
) -> Result<Vec<Value>, ApiError> {
    conversation_rows(db, user_id, id, "conversation")
        .await?
        .iter()
        .map(|row| parse_json(&row.item))
        .collect()
}

/// The rows of the user's conversation `id`, oldest first, within the history bounds
/// ([`MAX_HISTORY_ITEMS`], [`MAX_HISTORY_BYTES`]: past them 400 naming `param`); another user's
/// is 404.
pub(crate) async fn conversation_rows(
    db: &DatabaseConnection,
    user_id: &str,
    id: &str,
    param: &str,
) -> Result<Vec<entity::conversation_items::Model>, ApiError> {
    let too_long = |what: String| {
        ApiError::invalid_param(
            param,
            format!("Conversation '{id}' is too long to replay: {what}."),
        )
    };
    super::pending::settled(id).await;
    let conv = store::conversations::get(db, user_id, id)
        .await?
        .ok_or_else(|| not_found_conversation(id))?;
    let mut out = Vec::new();
    let mut bytes = 0usize;
    let mut after = None;
    loop {
        let page =
            store::conversations::list_items(db, &conv.id, after, HISTORY_PAGE, Order::Asc).await?;
        let done = (page.len() as u64) < HISTORY_PAGE;
        for row in page {
            bytes = bytes.saturating_add(row.item.len());
            if bytes > MAX_HISTORY_BYTES {
                return Err(too_long(format!("more than {MAX_HISTORY_BYTES} bytes")));
            }
            if out.len() == MAX_HISTORY_ITEMS {
                return Err(too_long(format!("more than {MAX_HISTORY_ITEMS} items")));
            }
            after = Some(row.position);
            out.push(row);
        }
        if done {
            return Ok(out);
        }
    }
}

/// The user's stored response row, else 404.
async fn find(
    db: &DatabaseConnection,
    user_id: &str,
    id: &str,
) -> Result<responses::Model, ApiError> {
    super::pending::settled(id).await;
    store::responses::get(db, user_id, id)
        .await?
        .ok_or_else(|| not_found_response(id))
}

/// `GET /v1/responses/{id}`: the response object as stored.
pub async fn get(db: &DatabaseConnection, user_id: &str, id: &str) -> Result<Value, ApiError> {
    parse_json(&find(db, user_id, id).await?.response)
}

/// `DELETE /v1/responses/{id}`. Items it added to a conversation stay there (as OpenAI).
pub async fn delete(db: &DatabaseConnection, user_id: &str, id: &str) -> Result<Value, ApiError> {
    super::pending::settled(id).await;
    if !store::responses::delete(db, user_id, id).await? {
        return Err(not_found_response(id));
    }
    Ok(json!({"id": id, "object": "response", "deleted": true}))
}

/// `GET /v1/responses/{id}/input_items`: this response's own input items, paged (default
/// `desc`: newest first, as OpenAI).
pub async fn input_items(
    db: &DatabaseConnection,
    user_id: &str,
    id: &str,
    params: &ListParams,
) -> Result<Value, ApiError> {
    let row = find(db, user_id, id).await?;
    let Value::Array(mut all) = parse_json(&row.input_items)? else {
        return Ok(paging::list_object(Vec::new(), params.limit, items::id_of));
    };
    if params.order == Order::Desc {
        all.reverse();
    }
    let start = match &params.after {
        None => 0,
        Some(a) => {
            all.iter()
                .position(|v| items::id_of(v) == a)
                .ok_or_else(|| paging::unknown_after(a))?
                + 1
        }
    };
    let page: Vec<Value> = all
        .into_iter()
        .skip(start)
        .take(params.limit as usize + 1)
        .collect();
    Ok(paging::list_object(page, params.limit, items::id_of))
}
