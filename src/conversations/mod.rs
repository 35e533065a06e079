//! State for any provider (API.md §9): stored responses, conversations and their items, stored
//! chat completions. The domain lives here — ids, item shapes, paging, ownership — and every
//! query in `store::{responses, conversations, completions}`.
//!
//! # What the hot path calls
//!
//! - [`history_for`]`(db, user_id, previous_response_id, conversation_id)` before the upstream
//!   call of `POST /v1/responses`: the items to put before the request's own input (the
//!   previous response chain's input and output items, or the conversation's items, oldest
//!   first). Another user's id is 404 with OpenAI's message; too long a history is 400.
//! - [`save_response`]`(db, StoredResponse { … })` after it, when `store` is true (and
//!   `storage.enabled`): the response row and, with a conversation, its input then output items
//!   appended to the conversation, atomically. Make the id first with [`ids::response_id`] so
//!   the stream's events carry it.
//! - [`save_completion`]`(db, StoredCompletion { … })` after a chat completion with
//!   `store: true`; check its `metadata` with [`items::metadata`] before forwarding (400), and
//!   strip `store` and `metadata` from the upstream request.
//! - [`items::input_items`] turns a Responses `input` (string or array) into stored items.
//!
//! Both saves run after the client has its answer, batched with other requests' saves into one
//! transaction ([`writer`]); [`pending`] makes the next read on this replica wait for them
//! (mark with [`pending::writing`] before the answer ends).
//!
//! With `storage.enabled = false` the hot path calls none of these (it answers `store: false`,
//! and refuses `previous_response_id` / `conversation` with 400); the routes still serve what is
//! stored.
//!
//! # Ownership
//!
//! Every object belongs to the user of the gateway key that made it; every key of that user sees
//! it; another user's id is answered exactly as an unknown one (404 `not_found`). Admins see
//! counts only (`GET /api/admin/stats`).
//!
//! # Ordering
//!
//! A conversation's items have a per-conversation position; appends take consecutive positions
//! under the conversation row's lock (see `store::conversations`), so concurrent appends keep a
//! total order without duplicates or gaps.

pub mod chat;
pub mod completions;
pub mod conversation;
pub mod hub;
pub mod ids;
pub mod items;
pub mod library;
pub mod paging;
pub mod pending;
pub mod responses;
pub mod share;
pub mod socket;
pub mod writer;

pub use completions::{StoredCompletion, save_completion};
pub use responses::{StoredResponse, history_for, save_response};

use serde_json::Value;

use crate::error::ApiError;

/// A stored JSON column back as a value (a parse failure is corruption: 500, logged).
pub(crate) fn parse_json(s: &str) -> Result<Value, ApiError> {
    serde_json::from_str(s).map_err(|e| ApiError::internal(anyhow::anyhow!("stored JSON: {e}")))
}

/// OpenAI's 404 for a response id that is unknown or another user's.
pub fn not_found_response(id: &str) -> ApiError {
    ApiError::NotFound {
        message: format!("No response found with id '{id}'."),
        code: "not_found",
    }
}

/// OpenAI's 404 for a conversation id that is unknown or another user's.
pub fn not_found_conversation(id: &str) -> ApiError {
    ApiError::NotFound {
        message: format!("Conversation with id '{id}' not found."),
        code: "not_found",
    }
}
