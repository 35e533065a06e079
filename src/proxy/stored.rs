//! A chat completion the client asked tollgate to keep (`store: true`, spec §9): `store` and
//! `metadata` stay here (never forwarded), the answer gets a fresh `chatcmpl-…` id — the one the
//! client sees and `GET /v1/chat/completions/{id}` takes — and is saved after it is complete,
//! off the request's path. A stream is added up chunk by chunk as it is relayed.

use bytes::Bytes;
use serde_json::{Map, Value};

use crate::conversations::{StoredCompletion, ids, items};
use crate::error::ApiError;
use crate::pivot::{ChatChunk, ChunkAccumulator};
use crate::providers::Usage;
use crate::proxy::request::RequestView;
use crate::proxy::stream::UsageReader;
use crate::state::AppState;

/// The fields tollgate keeps to itself on a stored chat completion.
pub const NOT_FORWARDED: [&str; 2] = ["store", "metadata"];

/// What saving one completion needs.
pub struct ToStore {
    pub id: String,
    state: AppState,
    user_id: String,
    key_id: String,
    model: String,
    metadata: Map<String, Value>,
    messages: Vec<Value>,
    /// The id is being written from the start: `retrieve` right after the answer waits for the
    /// save instead of a 404.
    writing: crate::conversations::pending::Writing,
}

/// The request's `store` is `true` (and storage is on): what to save, its `metadata` checked
/// (400 before anything is admitted). `None` when nothing is to be stored.
pub fn requested(
    state: &AppState,
    view: &RequestView<'_>,
    user_id: &str,
    key_id: &str,
) -> Result<Option<ToStore>, ApiError> {
    let store = view.get("store").is_some_and(|v| v.get().trim() == "true");
    if !store || !state.config.storage.enabled {
        return Ok(None);
    }
    let metadata = match view.get("metadata") {
        None => None,
        Some(raw) => Some(serde_json::from_str::<Value>(raw.get()).map_err(|_| {
            ApiError::invalid_param("metadata", "`metadata` must be an object of strings.")
        })?),
    };
    let metadata = items::metadata(metadata.as_ref().filter(|m| !m.is_null()))?;
    let messages = view
        .get("messages")
        .and_then(|raw| serde_json::from_str::<Vec<Value>>(raw.get()).ok())
        .unwrap_or_default();
    let id = ids::completion_id();
    Ok(Some(ToStore {
        writing: crate::conversations::pending::writing(vec![id.clone()]),
        id,
        state: state.clone(),
        user_id: user_id.to_owned(),
        key_id: key_id.to_owned(),
        model: view.model.clone(),
        metadata,
        messages,
    }))
}

/// `store` or `metadata` is in the body: the upstream must not see them.
pub fn has_private_fields(view: &RequestView<'_>) -> bool {
    NOT_FORWARDED.iter().any(|f| view.get(f).is_some())
}

impl ToStore {
    /// Saves `response` (with this id) in the background.
    pub fn save(self, mut response: Value) {
        if let Some(o) = response.as_object_mut() {
            o.insert("id".into(), self.id.clone().into());
            o.insert("model".into(), self.model.clone().into());
        }
        let c = StoredCompletion {
            id: self.id,
            user_id: self.user_id,
            key_id: self.key_id,
            model: self.model,
            metadata: self.metadata,
            messages: self.messages,
            response,
            created_at: chrono::Utc::now(),
        };
        // A list of the user's completions waits for this one too.
        let listed = crate::conversations::pending::writing(vec![
            crate::conversations::pending::completions_of(&c.user_id),
        ]);
        self.state.stored.submit(
            crate::conversations::writer::Save::Completion(c),
            vec![self.writing, listed],
        );
    }

    /// A complete answer: the client's copy carries this id; it is saved.
    pub fn answer(self, body: Bytes) -> Bytes {
        let Ok(mut v) = serde_json::from_slice::<Value>(&body) else {
            return body;
        };
        if let Some(o) = v.as_object_mut() {
            o.insert("id".into(), self.id.clone().into());
        }
        let out = serde_json::to_vec(&v).map(Bytes::from).unwrap_or(body);
        self.save(v);
        out
    }

    /// Watches a relayed stream: every chunk gets this id, and the chunks are added up and
    /// saved when the stream ends normally.
    pub fn observer(self) -> Box<dyn UsageReader> {
        Box::new(StreamStore {
            to_store: Some(self),
            acc: ChunkAccumulator::default(),
        })
    }
}

struct StreamStore {
    to_store: Option<ToStore>,
    acc: ChunkAccumulator,
}

impl UsageReader for StreamStore {
    fn on_event(&mut self, data: &[u8]) {
        if data != b"[DONE]"
            && let Ok(c) = serde_json::from_slice::<ChatChunk>(data)
        {
            self.acc.push(&c);
        }
    }

    fn usage(&self) -> Option<Usage> {
        None
    }

    fn rewrite(&mut self, data: &[u8]) -> Option<Vec<u8>> {
        let id = &self.to_store.as_ref()?.id;
        if data == b"[DONE]" {
            return None;
        }
        let mut v: Value = serde_json::from_slice(data).ok()?;
        v.as_object_mut()?.insert("id".into(), id.clone().into());
        serde_json::to_vec(&v).ok()
    }

    fn on_end(&mut self) {
        if let Some(t) = self.to_store.take() {
            if self.acc.overflowed() {
                tracing::warn!(
                    completion_id = %t.id,
                    "a streamed completion larger than the gateway adds up is not stored"
                );
                return;
            }
            let acc = std::mem::take(&mut self.acc);
            if let Ok(v) = serde_json::to_value(acc.finish()) {
                t.save(v);
            }
        }
    }
}
