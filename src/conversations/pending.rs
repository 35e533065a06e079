//! Saves in flight: read-your-writes for stored state on this replica.
//!
//! The hot path saves a response (and its conversation items) or a stored chat completion off
//! the request's path, after the client has its answer. A client that reads it back at once —
//! the next turn's `previous_response_id` or `conversation`, `GET /v1/responses/{id}`, the
//! SDKs' `retrieve` right after `create` — must find it, as OpenAI's API guarantees. So the hot
//! path marks the keys it is about to write ([`writing`], before the client can see the end of
//! the answer) and readers wait for them ([`settled`], bounded by [`MAX_WAIT`]) before they
//! query. Another replica does not see these marks.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::sync::Notify;

/// The longest a reader waits for a save in flight; past it, it reads what is there.
pub const MAX_WAIT: Duration = Duration::from_secs(5);

/// Key → (saves in flight, woken when the last one lands).
type Marks = Mutex<HashMap<String, (usize, Arc<Notify>)>>;

fn marks() -> &'static Marks {
    static MARKS: OnceLock<Marks> = OnceLock::new();
    MARKS.get_or_init(Marks::default)
}

/// The key of "some stored chat completion of this user" (what a list must wait for).
pub fn completions_of(user_id: &str) -> String {
    format!("completions of {user_id}")
}

/// Marks `keys` as being written until the returned guard is dropped.
#[must_use = "the keys are marked only while the guard lives"]
pub fn writing(keys: Vec<String>) -> Writing {
    let mut m = marks().lock().unwrap_or_else(|e| e.into_inner());
    for k in &keys {
        m.entry(k.clone())
            .or_insert_with(|| (0, Arc::new(Notify::new())))
            .0 += 1;
    }
    Writing { keys }
}

/// Saves in flight for some keys; dropping it (the save landed, or failed) wakes their readers.
pub struct Writing {
    keys: Vec<String>,
}

impl Drop for Writing {
    fn drop(&mut self) {
        let mut m = marks().lock().unwrap_or_else(|e| e.into_inner());
        for k in &self.keys {
            if let Some((n, notify)) = m.get_mut(k) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    notify.notify_waiters();
                    m.remove(k);
                }
            }
        }
    }
}

/// Waits until no save of `key` is in flight on this replica (at most [`MAX_WAIT`]).
pub async fn settled(key: &str) {
    let deadline = tokio::time::Instant::now() + MAX_WAIT;
    loop {
        let Some(notify) = marks()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .map(|(_, n)| n.clone())
        else {
            return;
        };
        let notified = notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        // The last save may have landed between the lookup and `enable`.
        if !marks()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(key)
        {
            return;
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_reader_waits_for_the_save_in_flight_and_no_longer() {
        let key = crate::conversations::ids::response_id();
        settled(&key).await; // nothing in flight: at once
        let guard = writing(vec![key.clone()]);
        let second = writing(vec![key.clone()]);
        let started = tokio::time::Instant::now();
        let k = key.clone();
        let reader = tokio::spawn(async move { settled(&k).await });
        tokio::time::sleep(Duration::from_millis(30)).await;
        drop(guard);
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(!reader.is_finished(), "one save is still in flight");
        drop(second);
        reader.await.expect("reader");
        assert!(started.elapsed() < MAX_WAIT);
        assert!(!marks().lock().expect("lock").contains_key(&key));
    }
}
