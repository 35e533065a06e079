//! Who hears about a changed conversation: the user's open WebSockets (`/api/ws`), on this
//! replica and every other.
//!
//! A change (a chat turn, a rename, a deletion, a share) is an [`Invalidation::Conversation`]
//! applied through the caches: on this replica it reaches the user's sockets here, and it goes
//! out on the invalidation bus (Redis pub/sub with `redis.url`, else PostgreSQL LISTEN/NOTIFY)
//! so every other replica delivers it to the sockets it holds. The socket that made the change
//! is skipped. Share revocations need no message: every replica reads the share from the
//! database on each request, so a revoked link is 404 everywhere at once.
//!
//! The hub also counts each user's sockets (`chat.ws_max_sockets_per_user`) and tells them when
//! the server shuts down.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};

use crate::cache::Invalidation;
use crate::state::AppState;

/// Frames queued for one socket before further `conversation.updated` are dropped for it (a
/// client that reads nothing does not hold memory; it re-reads the list when it catches up).
const SOCKET_QUEUE: usize = 64;

type Sockets = HashMap<String, HashMap<u64, mpsc::Sender<Value>>>;

#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

struct Inner {
    sockets: Mutex<Sockets>,
    shutdown: watch::Sender<bool>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub").finish_non_exhaustive()
    }
}

impl Default for Hub {
    fn default() -> Self {
        Self::new()
    }
}

/// One registered socket: its id, the frames pushed to it; unregistered when dropped.
pub struct Registration {
    pub id: u64,
    pub frames: mpsc::Receiver<Value>,
    user_id: String,
    hub: Hub,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut s = self.hub.lock();
        if let Some(mine) = s.get_mut(&self.user_id) {
            mine.remove(&self.id);
            if mine.is_empty() {
                s.remove(&self.user_id);
            }
        }
    }
}

impl Hub {
    pub fn new() -> Self {
        Self {
            inner: Arc::new(Inner {
                sockets: Mutex::new(HashMap::new()),
                shutdown: watch::channel(false).0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Sockets> {
        self.inner.sockets.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a socket of `user_id`; `None` when the user already has `max` open here.
    pub fn register(&self, user_id: &str, max: usize) -> Option<Registration> {
        let mut s = self.lock();
        let mine = s.entry(user_id.to_owned()).or_default();
        if mine.len() >= max {
            return None;
        }
        let (tx, rx) = mpsc::channel(SOCKET_QUEUE);
        // Random: ids travel to other replicas (the origin to skip) and must not collide there.
        let id = loop {
            let id: u64 = rand::random();
            if !mine.contains_key(&id) {
                break id;
            }
        };
        mine.insert(id, tx);
        Some(Registration {
            id,
            frames: rx,
            user_id: user_id.to_owned(),
            hub: self.clone(),
        })
    }

    /// Open sockets of `user_id` on this replica.
    pub fn count(&self, user_id: &str) -> usize {
        self.lock().get(user_id).map_or(0, HashMap::len)
    }

    /// Pushes `conversation.updated` to the user's sockets here, except `origin`.
    pub fn deliver(&self, user_id: &str, conversation_id: &str, origin: Option<u64>) {
        let frame = json!({"type": "conversation.updated", "conversation_id": conversation_id});
        if let Some(mine) = self.lock().get(user_id) {
            for (id, tx) in mine {
                if Some(*id) != origin {
                    let _ = tx.try_send(frame.clone());
                }
            }
        }
    }

    /// The server is shutting down: sockets finish the answer under way and close.
    pub fn shutdown(&self) {
        self.inner.shutdown.send_replace(true);
    }

    /// Changes to `true` when the server shuts down.
    pub fn shutting_down(&self) -> watch::Receiver<bool> {
        self.inner.shutdown.subscribe()
    }
}

/// A conversation of `user_id` changed: tell the user's sockets here and on every replica
/// (except the socket `origin` that changed it).
pub async fn updated(state: &AppState, user_id: &str, conversation_id: &str) {
    updated_from(state, user_id, conversation_id, None).await;
}

pub async fn updated_from(
    state: &AppState,
    user_id: &str,
    conversation_id: &str,
    origin: Option<u64>,
) {
    state
        .caches
        .apply(&Invalidation::Conversation {
            user_id: user_id.to_owned(),
            conversation_id: conversation_id.to_owned(),
            origin_socket: origin,
        })
        .await;
}
