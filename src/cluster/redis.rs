//! The link to the Redis every replica shares: one lazily (re)connecting multiplexed connection,
//! and an outage breaker so a Redis that is down costs one probe per second instead of a timeout
//! on every request.
//!
//! Callers get `None` whenever Redis cannot answer and fall back to what the replica can do alone.
//! Every failed call is counted in `tollgate_redis_errors_total{op}`; an outage is logged once when
//! it starts and once when it ends.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::telemetry::Metrics;

/// Time allowed to open a connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Time allowed for Redis to answer one command.
const RESPONSE_TIMEOUT: Duration = Duration::from_millis(500);
/// Bound on a whole call, including waiting for a reconnect in progress.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// While Redis is down, at most one call per this interval tries it (the others fall back at once).
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// A cheap handle (clone it freely) to the shared Redis.
#[derive(Clone)]
pub struct RedisLink(Arc<Inner>);

struct Inner {
    client: redis::Client,
    conn: ConnectionManager,
    prefix: String,
    metrics: Metrics,
    outage: Outage,
}

impl std::fmt::Debug for RedisLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the URL: it may carry a password.
        f.debug_struct("RedisLink")
            .field("prefix", &self.0.prefix)
            .field("down", &self.is_down())
            .finish_non_exhaustive()
    }
}

impl RedisLink {
    /// A link to `url` whose keys and channels all start with `prefix`. Does not connect: the
    /// first call does, so a replica starts (and serves, on its own limits) while Redis is down.
    /// Must be called inside the Tokio runtime.
    pub fn new(url: &str, prefix: &str, metrics: Metrics) -> anyhow::Result<Self> {
        // The URL may hold a password: the error names the key, never the value.
        let client = redis::Client::open(url)
            .map_err(|e| anyhow::anyhow!("redis.url is not a usable Redis URL: {:?}", e.kind()))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            // The breaker paces reconnection attempts; the manager must not add its own waits.
            .set_number_of_retries(0);
        let conn = client
            .get_connection_manager_lazy(config)
            .map_err(|e| anyhow::anyhow!("redis: {:?}", e.kind()))?;
        // Exported as 0 from the start, so rates and alerts work before the first error.
        for op in ["rate_limit", "publish", "subscribe", "cache"] {
            metrics.redis_errors_total.with_label_values(&[op]);
        }
        Ok(Self(Arc::new(Inner {
            client,
            conn,
            prefix: prefix.to_owned(),
            metrics,
            outage: Outage::new(),
        })))
    }

    /// `prefix` + `name`: every key and channel tollgate uses goes through here.
    pub fn key(&self, name: &str) -> String {
        format!("{}{name}", self.0.prefix)
    }

    /// For connections of their own (pub/sub).
    pub fn client(&self) -> &redis::Client {
        &self.0.client
    }

    /// Redis failed its last call and has not answered since.
    pub fn is_down(&self) -> bool {
        self.0.outage.down.load(Ordering::Acquire)
    }

    /// Counts one failed call in `tollgate_redis_errors_total{op}`.
    pub fn count_error(&self, op: &str) {
        self.0
            .metrics
            .redis_errors_total
            .with_label_values(&[op])
            .inc();
    }

    /// Runs `f` on the shared connection unless Redis is known to be down (then only one call per
    /// [`PROBE_INTERVAL`] tries it). `None` = no answer; the caller falls back.
    pub async fn call<T, F, Fut>(&self, op: &'static str, f: F) -> Option<T>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        if !self.0.outage.may_try(self.0.outage.now_ms()) {
            return None;
        }
        self.call_now(op, f).await
    }

    /// Like [`call`](Self::call) but tries even during an outage: for rare calls whose loss costs
    /// more than a timeout (publishing an invalidation).
    pub async fn call_now<T, F, Fut>(&self, op: &'static str, f: F) -> Option<T>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let result = match tokio::time::timeout(CALL_TIMEOUT, f(self.0.conn.clone())).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("timed out".to_owned()),
        };
        let outage = &self.0.outage;
        match result {
            Ok(v) => {
                if outage.succeeded() {
                    tracing::info!(
                        op,
                        "Redis answers again: rate limits and the response cache are shared by every replica again"
                    );
                }
                Some(v)
            }
            Err(error) => {
                self.count_error(op);
                if outage.failed(outage.now_ms()) {
                    tracing::warn!(
                        op,
                        %error,
                        "Redis is unreachable or failing: each replica enforces rate limits (and caches answers) on its own until it answers again"
                    );
                }
                None
            }
        }
    }
}

/// Whether Redis is down, and when it may next be tried.
struct Outage {
    epoch: Instant,
    down: AtomicBool,
    /// Milliseconds since `epoch` before which no call tries Redis while it is down.
    next_probe_ms: AtomicU64,
}

impl Outage {
    fn new() -> Self {
        Self {
            epoch: Instant::now(),
            down: AtomicBool::new(false),
            next_probe_ms: AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Always while up; while down, true for one caller per [`PROBE_INTERVAL`].
    fn may_try(&self, now_ms: u64) -> bool {
        if !self.down.load(Ordering::Acquire) {
            return true;
        }
        let next = self.next_probe_ms.load(Ordering::Acquire);
        now_ms >= next
            && self
                .next_probe_ms
                .compare_exchange(
                    next,
                    now_ms + PROBE_INTERVAL.as_millis() as u64,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_ok()
    }

    /// Records a failure; true when it starts an outage.
    fn failed(&self, now_ms: u64) -> bool {
        self.next_probe_ms.store(
            now_ms + PROBE_INTERVAL.as_millis() as u64,
            Ordering::Release,
        );
        !self.down.swap(true, Ordering::AcqRel)
    }

    /// Records a success; true when it ends an outage.
    fn succeeded(&self) -> bool {
        self.down.load(Ordering::Acquire) && self.down.swap(false, Ordering::AcqRel)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn breaker_probes_once_per_interval_while_down() {
        let o = Outage::new();
        assert!(o.may_try(0) && o.may_try(0), "up: every call tries");
        assert!(o.failed(10), "the first failure starts the outage");
        assert!(!o.failed(20), "later failures do not start another");
        let probe = 20 + PROBE_INTERVAL.as_millis() as u64;
        assert!(!o.may_try(probe - 1), "no call before the probe time");
        assert!(o.may_try(probe), "one probe");
        assert!(!o.may_try(probe), "and only one");
        assert!(o.succeeded(), "a success ends the outage");
        assert!(!o.succeeded());
        assert!(o.may_try(probe), "up again: every call tries");
    }
}
