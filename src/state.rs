//! `AppState`: everything a request may need, built once in `App::build`.

use std::sync::Arc;
use std::time::Instant;

use sea_orm::DatabaseConnection;

use crate::accounts::throttle::AuthThrottle;
use crate::accounts::tokens::JwtKeys;
use crate::cache::Caches;
use crate::cluster::Cluster;
use crate::config::Config;
use crate::crypto::KeyRing;
use crate::metering::leases::Leases;
use crate::metering::spool::Spool;
use crate::metering::writer::UsageQueue;
use crate::proxy::admit::Limiters;
use crate::proxy::upstream::HttpClient;
use crate::store::DbKind;
use crate::telemetry::Metrics;

#[derive(Clone)]
pub struct AppState(pub Arc<Inner>);

pub struct Inner {
    pub config: Config,
    /// Writes that run after the answer (stored responses and completions): shutdown waits for
    /// them before the database closes.
    pub background: tokio_util::task::TaskTracker,
    /// Stored responses and chat completions, written in batches on `background`.
    pub stored: crate::conversations::writer::StateWriter,
    pub db: DatabaseConnection,
    pub db_kind: DbKind,
    /// Opens provider keys and TOTP secrets; seals with the newest master key.
    pub keyring: KeyRing,
    pub jwt: JwtKeys,
    pub metrics: Metrics,
    /// Gateway keys, catalog and provider-key ciphertexts, so the hot path skips the database.
    pub caches: Caches,
    /// Routing health per deployment + provider key (cool-downs, breakers, invalid keys).
    pub health: crate::routing::Health,
    /// Complete answers kept for identical requests (`routing::cache`; opt-in per key/request).
    pub responses: crate::routing::cache::ResponseCache,
    /// The pooled upstream client.
    pub http: HttpClient,
    /// Per-key and per-user rate limiters.
    pub limiters: Limiters,
    /// The per-client-address limit of `/api/auth/*` (`auth.ip_rpm`).
    pub auth_throttle: AuthThrottle,
    /// What this replica shares with the others (Redis, the invalidation bus and its listener).
    pub cluster: Cluster,
    /// The queue to the usage writer.
    pub usage: UsageQueue,
    /// Balance and budget this replica has reserved in the database, handed to requests.
    pub leases: Leases,
    /// The usage spool: started records of requests going upstream (`metering::spool`).
    pub spool: Arc<Spool>,
    pub started_at: Instant,
}

impl std::ops::Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}
