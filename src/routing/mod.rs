//! Routing (spec §11): where a client request's attempts go and what each failure means.
//!
//! - `deployment`: a catalog model's deployments and fallback models, and their save-time checks;
//! - `plan`: the next deployment + provider key to try for one model (tiers, weights, health);
//! - `health`: cool-downs, circuit breakers and invalid keys per deployment + key;
//! - `cache`: the response cache (exact match, opt-in, per user; local and through Redis);
//! - this file: the retry policy ([`judge`]) and what the gateway does when a key is refused.
//!
//! `proxy::forward` walks the plan: the requested model's deployments, then its fallbacks in
//! order, until an attempt answered — never retrying once a byte reached the client.

pub mod cache;
pub mod deployment;
pub mod health;
pub mod plan;
pub mod verify;

use std::time::Duration;

use http::StatusCode;

use crate::state::AppState;
use crate::store;

pub use health::{Health, Outcome};

/// What to do after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Give the client this answer.
    Answer,
    /// Try the next pair (another key, deployment or tier, then the fallbacks).
    Retry,
    /// Skip the rest of this model: go to its fallback models.
    Fallback,
}

/// The failure of an attempt before any byte reached the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The upstream answered with this status (its `retry-after`, whether its body says the
    /// context is too long).
    Status {
        status: StatusCode,
        retry_after: Option<Duration>,
        context_too_long: bool,
    },
    /// No connection, or it broke before the response head.
    Connect,
    /// No response head in time.
    Timeout,
}

/// The retry policy of spec §11, and what the attempt tells health: 401/403 (the key), 408, 429
/// and 5xx are retried; a context too long goes to the fallbacks; any other 4xx is the answer.
pub fn judge(f: Failure) -> (Next, Outcome) {
    match f {
        Failure::Connect | Failure::Timeout => (Next::Retry, Outcome::Failed),
        Failure::Status {
            status,
            retry_after,
            context_too_long,
        } => match status.as_u16() {
            401 | 403 => (Next::Retry, Outcome::Refused),
            429 => (Next::Retry, Outcome::RateLimited(retry_after)),
            408 => (Next::Retry, Outcome::Failed),
            s if s >= 500 => (Next::Retry, Outcome::Failed),
            _ if context_too_long => (Next::Fallback, Outcome::Ok),
            _ => (Next::Answer, Outcome::Ok),
        },
    }
}

/// `retry-after` as seconds (what OpenAI sends) or `retry-after-ms`.
pub fn retry_after(headers: &http::HeaderMap) -> Option<Duration> {
    if let Some(ms) = headers
        .get("retry-after-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|v| v.is_finite() && *v >= 0.0)
    {
        return Some(Duration::from_millis(ms.min(3_600_000.0) as u64));
    }
    headers
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|v| v.is_finite() && *v >= 0.0)
        .map(|s| Duration::from_millis((s.min(3600.0) * 1000.0) as u64))
}

/// The upstream's error body says the prompt does not fit the model (OpenAI's
/// `context_length_exceeded`). Only a small error body is looked at.
pub fn is_context_too_long(body: &[u8]) -> bool {
    body.len() <= 64 * 1024 && memchr::memmem::find(body, b"context_length_exceeded").is_some()
}

/// The upstream refused a provider key (401/403): it is marked `invalid` in the database (its
/// owner sees it in `GET /api/provider-keys`), an audit entry goes in the owner's log, and every
/// replica's pool drops it. Runs in the background; the request goes on to its next attempt.
pub fn invalidate_key(state: &AppState, key_id: String) {
    let state2 = state.clone();
    state.background.spawn(async move {
        let state = state2;
        let row = match store::provider_keys::find(&state.db, &key_id).await {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(e) => {
                tracing::error!(error = %e, "routing: cannot read a refused provider key");
                return;
            }
        };
        match store::provider_keys::set_status(
            &state.db,
            &key_id,
            store::provider_keys::STATUS_INVALID,
        )
        .await
        {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                tracing::error!(error = %e, "routing: cannot mark a provider key invalid");
                return;
            }
        }
        tracing::warn!(provider = %row.provider_key, key = %row.masked, "provider key refused upstream (401/403): marked invalid");
        if let Err(e) = store::audit::record(
            &state.db,
            store::audit::AuditEntry {
                actor_id: Some(&row.user_id),
                action: "provider_key.invalid",
                target: Some(format!("provider_key:{key_id}")),
                ip: None,
                detail: Some(serde_json::json!({
                    "provider": row.provider_key,
                    "reason": "the upstream answered 401/403 to this key",
                    "by": "gateway",
                })),
            },
        )
        .await
        {
            tracing::error!(error = %e, "routing: cannot audit an invalid provider key");
        }
        if row.shared {
            state.caches.invalidate_all_provider_keys().await;
        } else {
            state.caches.invalidate_provider_keys(&row.user_id).await;
        }
    });
}

/// How often this replica's health changes go to the others (spec: within a second).
const SHARE_EVERY: Duration = Duration::from_millis(200);
/// Health changes per bus message (PostgreSQL NOTIFY payloads stop at 8000 bytes).
const EVENTS_PER_MESSAGE: usize = 16;

/// Publishes this replica's health changes on the invalidation bus, every [`SHARE_EVERY`], for
/// as long as `health` is in use; the other replicas apply them (`Caches::apply_local`).
pub fn share_health(health: &Health, bus: crate::cluster::invalidation::Bus) {
    health.publish_changes();
    let weak = health.downgrade();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(SHARE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(health) = weak.upgrade() else {
                return;
            };
            let events = health.drain();
            drop(health);
            for chunk in events.chunks(EVENTS_PER_MESSAGE) {
                bus.publish(&crate::cache::Invalidation::Health {
                    events: chunk.to_vec(),
                })
                .await;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(s: u16) -> Failure {
        Failure::Status {
            status: StatusCode::from_u16(s).unwrap(),
            retry_after: None,
            context_too_long: false,
        }
    }

    #[test]
    fn retried_statuses() {
        for s in [401, 403, 408, 429, 500, 502, 503, 504] {
            assert_eq!(judge(status(s)).0, Next::Retry, "{s}");
        }
        for s in [400, 404, 409, 413, 422] {
            assert_eq!(judge(status(s)).0, Next::Answer, "{s}");
        }
        assert_eq!(judge(Failure::Connect), (Next::Retry, Outcome::Failed));
        assert_eq!(judge(Failure::Timeout), (Next::Retry, Outcome::Failed));
        assert_eq!(judge(status(401)).1, Outcome::Refused);
        assert_eq!(judge(status(500)).1, Outcome::Failed);
        let ctx = Failure::Status {
            status: StatusCode::BAD_REQUEST,
            retry_after: None,
            context_too_long: true,
        };
        assert_eq!(judge(ctx).0, Next::Fallback);
    }

    #[test]
    fn retry_after_forms() {
        let mut h = http::HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert("retry-after", "7".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(7)));
        h.insert("retry-after", "99999999".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(3600)));
        h.insert("retry-after-ms", "250".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_millis(250)));
        h.insert("retry-after-ms", "nan".parse().unwrap());
        h.insert("retry-after", "-3".parse().unwrap());
        assert_eq!(retry_after(&h), None);
        assert!(is_context_too_long(
            br#"{"error":{"code":"context_length_exceeded"}}"#
        ));
        assert!(!is_context_too_long(
            br#"{"error":{"code":"invalid_value"}}"#
        ));
    }
}
