//! Cache invalidation across replicas: every [`Invalidation`] a management write applies on this
//! replica is published on a bus, and every replica applies what the others publish to its own
//! caches, within milliseconds.
//!
//! The bus is Redis pub/sub (channel `<redis.key_prefix>invalidate`) when `redis.url` is set, else
//! PostgreSQL LISTEN/NOTIFY (channel [`PG_CHANNEL`]) when the database is PostgreSQL, else there is
//! none (a single replica). Both carry the same JSON message, `{"origin": <replica id>,
//! "invalidation": {...}}`; a replica skips its own messages.
//!
//! While a listener is disconnected, messages are lost; the caches' TTL bounds how stale an entry
//! can get, and every (re)subscription clears this replica's caches, since something may have
//! been missed.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use sea_orm::DatabaseConnection;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::redis::{CONNECT_TIMEOUT, RedisLink};
use crate::cache::{Caches, Invalidation};
use crate::store;

/// The LISTEN/NOTIFY channel (notifications are per database, so no prefix is needed).
pub const PG_CHANNEL: &str = "tollgate_invalidate";

/// Bound on publishing one message; a management write never waits longer for the bus.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(2);
/// First and longest wait between two attempts to (re)subscribe.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// What goes over the wire.
#[derive(Debug, Serialize, Deserialize)]
struct Message {
    /// The replica that applied it already.
    origin: String,
    invalidation: Invalidation,
}

/// Where invalidations are published and heard.
#[derive(Clone)]
pub struct Bus {
    origin: Arc<str>,
    transport: Transport,
}

#[derive(Clone)]
enum Transport {
    Redis {
        link: RedisLink,
        channel: String,
    },
    Postgres {
        db: DatabaseConnection,
        /// The listener opens its own connection with this.
        url: String,
    },
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus")
            .field("origin", &self.origin)
            .field("transport", &self.kind())
            .finish()
    }
}

impl Bus {
    /// Redis pub/sub for replica `origin`.
    pub fn redis(origin: &str, link: RedisLink) -> Self {
        Self {
            origin: origin.into(),
            transport: Transport::Redis {
                channel: link.key("invalidate"),
                link,
            },
        }
    }

    /// PostgreSQL LISTEN/NOTIFY for replica `origin` on the database `db` (opened from `url`).
    pub fn postgres(origin: &str, db: DatabaseConnection, url: &str) -> Self {
        Self {
            origin: origin.into(),
            transport: Transport::Postgres {
                db,
                url: url.to_owned(),
            },
        }
    }

    /// `redis` or `postgres`.
    pub fn kind(&self) -> &'static str {
        match self.transport {
            Transport::Redis { .. } => "redis",
            Transport::Postgres { .. } => "postgres",
        }
    }

    /// Tells the other replicas. Failures are logged (and counted for Redis), never returned: the
    /// write has committed and this replica's caches are right; the others heal by TTL.
    pub async fn publish(&self, invalidation: &Invalidation) {
        let message = Message {
            origin: self.origin.to_string(),
            invalidation: invalidation.clone(),
        };
        let Ok(payload) = serde_json::to_string(&message) else {
            return;
        };
        match &self.transport {
            Transport::Redis { link, channel } => {
                let sent = link
                    .call_now("publish", |mut conn| {
                        let (channel, payload) = (channel.clone(), payload.clone());
                        async move {
                            redis::cmd("PUBLISH")
                                .arg(channel)
                                .arg(payload)
                                .query_async::<i64>(&mut conn)
                                .await
                        }
                    })
                    .await;
                if sent.is_none() {
                    tracing::warn!(
                        kind = invalidation_kind(invalidation),
                        "could not publish a cache invalidation to the other replicas; their entries expire within the cache TTL"
                    );
                }
            }
            Transport::Postgres { db, .. } => {
                let sent = tokio::time::timeout(
                    PUBLISH_TIMEOUT,
                    store::notify::notify(db, PG_CHANNEL, &payload),
                )
                .await;
                if let Err(error) = sent
                    .map_err(|_| "timed out".to_owned())
                    .and_then(|r| r.map_err(|e| e.to_string()))
                {
                    tracing::warn!(
                        kind = invalidation_kind(invalidation),
                        %error,
                        "could not notify the other replicas of a cache invalidation; their entries expire within the cache TTL"
                    );
                }
            }
        }
    }

    /// Starts applying the other replicas' invalidations to `caches`, in a task that lives as
    /// long as the returned [`Listener`]. Call [`Listener::started`] once the replica is about to
    /// serve.
    pub fn listen(&self, caches: Caches) -> Listener {
        let (status, watch) = watch::channel(Status::Starting);
        let started = Arc::new(AtomicBool::new(false));
        let ctx = ListenCtx {
            origin: self.origin.clone(),
            caches,
            status,
            started: started.clone(),
        };
        let task = match &self.transport {
            Transport::Redis { link, channel } => {
                tokio::spawn(listen_redis(ctx, link.clone(), channel.clone()))
            }
            Transport::Postgres { url, .. } => tokio::spawn(listen_postgres(ctx, url.clone())),
        };
        Listener {
            task,
            status: watch,
            started,
        }
    }
}

/// Where a listener stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    /// No attempt has finished yet.
    Starting,
    Subscribed,
    /// The last attempt failed or the subscription was lost; retrying.
    Down,
}

/// The background task applying other replicas' invalidations; stopped when dropped.
#[derive(Debug)]
pub struct Listener {
    task: JoinHandle<()>,
    status: watch::Receiver<Status>,
    /// Set once the replica serves: from then on every subscription starts by clearing the caches.
    started: Arc<AtomicBool>,
}

impl Listener {
    /// Subscribed right now (messages published from here on are heard).
    pub fn is_subscribed(&self) -> bool {
        *self.status.borrow() == Status::Subscribed
    }

    /// The replica is about to serve: waits (at most `limit`) for the first subscription attempt
    /// to finish, so a replica whose bus is up hears every invalidation from its first request on.
    /// Until now nothing can have been cached, so a first subscription before this point needs no
    /// clearing; one after it clears the caches, as a re-subscription does.
    pub async fn started(&self, limit: Duration) {
        let mut status = self.status.clone();
        let _ = tokio::time::timeout(limit, status.wait_for(|s| *s != Status::Starting)).await;
        self.started.store(true, Ordering::Release);
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        // Nothing to finish: a missed message only costs freshness, which the TTL bounds.
        self.task.abort();
    }
}

struct ListenCtx {
    origin: Arc<str>,
    caches: Caches,
    status: watch::Sender<Status>,
    started: Arc<AtomicBool>,
}

impl ListenCtx {
    /// Now subscribed: anything published while we were not is lost, so the caches start empty
    /// (unless the replica has not served yet: then they are).
    async fn on_subscribed(&self, was_lost: bool, bus: &str) {
        if was_lost || self.started.load(Ordering::Acquire) {
            self.caches.clear_local().await;
        }
        self.status.send_replace(Status::Subscribed);
        if was_lost {
            tracing::info!(
                bus,
                "listening for other replicas' cache invalidations again"
            );
        } else {
            tracing::debug!(bus, "listening for other replicas' cache invalidations");
        }
    }

    /// An attempt failed or the subscription dropped.
    fn on_down(&self) {
        self.status.send_replace(Status::Down);
    }

    /// Applies one message unless this replica sent it. One that cannot be read (from a newer
    /// version, say) clears everything: over-invalidating is always safe.
    async fn handle(&self, payload: &[u8]) {
        match serde_json::from_slice::<Message>(payload) {
            Ok(m) if *m.origin == *self.origin => {}
            Ok(m) => self.caches.apply_local(&m.invalidation).await,
            Err(error) => {
                tracing::debug!(%error, "unreadable invalidation message; clearing the caches");
                self.caches.clear_local().await;
            }
        }
    }
}

async fn listen_redis(ctx: ListenCtx, link: RedisLink, channel: String) {
    let mut backoff = MIN_BACKOFF;
    // Logged once per outage, not once per attempt.
    let mut lost = false;
    loop {
        let attempt = tokio::time::timeout(CONNECT_TIMEOUT, async {
            let mut pubsub = link.client().get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            Ok::<_, redis::RedisError>(pubsub)
        })
        .await;
        match attempt {
            Ok(Ok(pubsub)) => {
                ctx.on_subscribed(lost, "redis").await;
                backoff = MIN_BACKOFF;
                let mut messages = pubsub.into_on_message();
                while let Some(msg) = messages.next().await {
                    ctx.handle(msg.get_payload_bytes()).await;
                }
                ctx.on_down();
                link.count_error("subscribe");
                lost = true;
                tracing::warn!(
                    "lost the Redis subscription for cache invalidations; reconnecting (cached entries expire within the cache TTL meanwhile)"
                );
            }
            Ok(Err(error)) => {
                ctx.on_down();
                link.count_error("subscribe");
                if !lost {
                    lost = true;
                    tracing::warn!(%error, "cannot subscribe to cache invalidations on Redis; retrying");
                }
            }
            Err(_) => {
                ctx.on_down();
                link.count_error("subscribe");
                if !lost {
                    lost = true;
                    tracing::warn!(
                        "subscribing to cache invalidations on Redis timed out; retrying"
                    );
                }
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

async fn listen_postgres(ctx: ListenCtx, url: String) {
    let mut backoff = MIN_BACKOFF;
    let mut lost = false;
    loop {
        match store::notify::listen(&url, PG_CHANNEL).await {
            Ok(mut listener) => {
                ctx.on_subscribed(lost, "postgres").await;
                backoff = MIN_BACKOFF;
                let error = loop {
                    match listener.try_recv().await {
                        Ok(Some(n)) => ctx.handle(n.payload().as_bytes()).await,
                        // The connection dropped and was re-established (LISTEN included):
                        // whatever was sent in between is lost.
                        Ok(None) => ctx.on_subscribed(true, "postgres").await,
                        Err(e) => break e,
                    }
                };
                ctx.on_down();
                lost = true;
                tracing::warn!(%error, "lost the PostgreSQL LISTEN connection for cache invalidations; reconnecting");
            }
            Err(error) => {
                ctx.on_down();
                if !lost {
                    lost = true;
                    tracing::warn!(%error, "cannot LISTEN for cache invalidations on PostgreSQL; retrying");
                }
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

fn invalidation_kind(inv: &Invalidation) -> &'static str {
    match inv {
        Invalidation::GatewayKey { .. } => "gateway_key",
        Invalidation::User { .. } => "user",
        Invalidation::Catalog => "catalog",
        Invalidation::ProviderKeys { .. } => "provider_keys",
        Invalidation::AllProviderKeys => "all_provider_keys",
        Invalidation::Settings => "settings",
        Invalidation::Health { .. } => "routing_health",
        Invalidation::Conversation { .. } => "conversation",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_shape_is_stable() {
        let m = Message {
            origin: "r1".into(),
            invalidation: Invalidation::GatewayKey { hash: "h".into() },
        };
        let json = serde_json::to_value(&m).expect("serialises");
        assert_eq!(
            json,
            serde_json::json!({"origin": "r1", "invalidation": {"kind": "gateway_key", "hash": "h"}})
        );
        let back: Message = serde_json::from_value(json).expect("parses");
        assert_eq!(back.invalidation, m.invalidation);
    }
}
