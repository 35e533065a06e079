//! What several replicas of one deployment share: rate limits (`limits`, through Redis) and cache
//! invalidations (`invalidation`, through Redis pub/sub or PostgreSQL LISTEN/NOTIFY).
//!
//! Everything else replicas share lives in the database; migrations already take a cross-process
//! lock (`store::migrate`). Without `redis.url` each replica keeps its own rate limits.

pub mod invalidation;
pub mod limits;
pub mod redis;

use sea_orm::DatabaseConnection;

use self::invalidation::{Bus, Listener};
use self::limits::SharedLimits;
use self::redis::RedisLink;
use crate::cache::Caches;
use crate::config::Config;
use crate::store::DbKind;
use crate::telemetry::Metrics;

/// The longest a replica's start waits for its invalidation listener.
pub const START_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// This replica's place in the deployment.
#[derive(Debug)]
pub struct Cluster {
    /// Identifies this process on the invalidation bus (it skips its own messages).
    pub replica_id: String,
    /// The shared Redis, when `redis.url` is set.
    pub redis: Option<RedisLink>,
    /// Where cache invalidations go; `None` = this replica is alone.
    pub bus: Option<Bus>,
    listener: Option<Listener>,
}

impl Cluster {
    /// Picks the shared services from the config. Does not connect: a replica starts while
    /// Redis is down, and catches up when it answers.
    pub fn new(
        config: &Config,
        db: &DatabaseConnection,
        metrics: &Metrics,
    ) -> anyhow::Result<Self> {
        let replica_id = uuid::Uuid::new_v4().simple().to_string();
        let redis = match config.redis_url() {
            Some(url) => Some(RedisLink::new(
                url,
                &config.redis.key_prefix,
                metrics.clone(),
            )?),
            None => None,
        };
        let bus = match (&redis, DbKind::of(db)) {
            (Some(link), _) => Some(Bus::redis(&replica_id, link.clone())),
            (None, DbKind::Postgres) => Some(Bus::postgres(
                &replica_id,
                db.clone(),
                config.database_url(),
            )),
            (None, _) => None,
        };
        tracing::info!(
            replica_id,
            rate_limits = if redis.is_some() {
                "redis"
            } else {
                "per replica"
            },
            cache_invalidation = bus.as_ref().map_or("this replica only", Bus::kind),
            "replica coordination"
        );
        Ok(Self {
            replica_id,
            redis,
            bus,
            listener: None,
        })
    }

    /// The rate-limit buckets every replica shares, when there is a Redis.
    pub fn shared_limits(&self) -> Option<SharedLimits> {
        self.redis.clone().map(SharedLimits::new)
    }

    /// Starts applying other replicas' invalidations to `caches` (until this is dropped), and
    /// waits a moment for the first subscription, so a replica whose bus is up serves its first
    /// request already hearing the others. A bus that is down delays the start by at most
    /// [`START_WAIT`]; the listener keeps retrying in the background.
    pub async fn listen(&mut self, caches: &Caches) {
        if let Some(bus) = &self.bus {
            let listener = bus.listen(caches.clone());
            listener.started(START_WAIT).await;
            self.listener = Some(listener);
        }
    }

    /// Hearing the other replicas right now (always false without a bus).
    pub fn is_listening(&self) -> bool {
        self.listener.as_ref().is_some_and(Listener::is_subscribed)
    }
}
