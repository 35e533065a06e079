//! moka caches the hot path reads (gateway keys, catalog, provider keys) and their invalidation.
//!
//! A hit never awaits the database. Every management write that touches a cached fact calls
//! [`Caches::apply`] with an [`Invalidation`] once its transaction has committed; `apply` is the
//! single place invalidation happens: it applies the invalidation here and publishes it on the
//! replicas' bus (`cluster::invalidation`), whose listener calls [`Caches::apply_local`] on the others.
//! Entries also expire after [`TTL`] as a backstop.
//!
//! A load that raced with an invalidation (read the old row, then the write and its invalidation
//! happened, then the load inserted) must not leave the old value behind: a generation counter is
//! bumped by every invalidation, and a loader that sees it move while it loaded drops what it
//! inserted.

use std::collections::{HashMap, HashSet};
use std::hash::Hash;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use entity::{models, providers};
use ipnet::IpNet;
use moka::Expiry;
use moka::future::Cache;
use sea_orm::{DatabaseConnection, DbErr};
use serde::{Deserialize, Serialize};

use crate::cluster::invalidation::Bus;
use crate::store;
use crate::telemetry::Metrics;

/// Backstop lifetime of every entry: even a missed invalidation heals within this.
pub const TTL: Duration = Duration::from_secs(60);
/// Lifetime of "no such gateway key": short, but enough that a flood of one bad key costs one
/// query per this period.
pub const NEGATIVE_TTL: Duration = Duration::from_secs(5);

const MAX_GATEWAY_KEYS: u64 = 200_000;
const MAX_PROVIDER_KEYS: u64 = 200_000;

/// What a gateway key lets its holder do: the key's settings and its owner's, all that admission
/// needs without another query.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyCtx {
    pub key_id: String,
    pub user_id: String,
    pub key_name: String,
    /// `None` = every catalog model.
    pub allowed_models: Option<HashSet<String>>,
    /// `None` = any client address.
    pub allowed_ips: Option<Vec<IpNet>>,
    pub rpm_limit: Option<u32>,
    pub tpm_limit: Option<u32>,
    pub budget_nanos: Option<i64>,
    pub expires_at: Option<DateTime<Utc>>,
    /// The key's own switch (toggle / revoke); see [`KeyCtx::is_active_at`] for expiry too.
    pub is_active: bool,
    /// `pending_totp` | `active` | `disabled`.
    pub user_status: String,
    /// `admin` | `user`.
    pub user_role: String,
    pub user_rpm_limit: Option<u32>,
    pub user_tpm_limit: Option<u32>,
    pub plan: Option<String>,
    pub plan_expires_at: Option<DateTime<Utc>>,
    /// The key's response-cache TTL in seconds (0 = off; `routing::cache`).
    pub cache_ttl_secs: u32,
}

impl KeyCtx {
    pub fn is_expired_at(&self, now: DateTime<Utc>) -> bool {
        self.expires_at.is_some_and(|t| t <= now)
    }

    /// The key is switched on and not past its `expires_at`.
    pub fn is_active_at(&self, now: DateTime<Utc>) -> bool {
        self.is_active && !self.is_expired_at(now)
    }

    /// The owner may use the gateway (not disabled, TOTP enrolment finished).
    pub fn user_is_active(&self) -> bool {
        self.user_status == "active"
    }

    pub fn allows_model(&self, name: &str) -> bool {
        self.allowed_models
            .as_ref()
            .is_none_or(|m| m.contains(name))
    }

    /// Checks the allow-list; an IPv4-mapped IPv6 peer also matches IPv4 networks.
    pub fn allows_ip(&self, ip: IpAddr) -> bool {
        let Some(nets) = &self.allowed_ips else {
            return true;
        };
        let alt = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4),
            IpAddr::V4(_) => None,
        };
        nets.iter()
            .any(|n| n.contains(&ip) || alt.is_some_and(|a| n.contains(&a)))
    }
}

/// Default requests-per-minute limits in force (0 = none).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RuntimeDefaults {
    pub user_rpm: u32,
    pub key_rpm: u32,
}

/// A catalog model with its provider.
#[derive(Debug, Clone, PartialEq)]
pub struct CatalogModel {
    pub model: models::Model,
    /// The provider of the model's row (its first deployment).
    pub provider: providers::Model,
    /// Where the model is served (at least one; the row's own provider when it lists none).
    pub deployments: Vec<crate::routing::deployment::Deployment>,
    /// Catalog model names tried in order when every deployment failed.
    pub fallbacks: Vec<String>,
}

impl CatalogModel {
    /// `/v1` serves it: the model is active and so is one of its deployments' providers.
    pub fn is_servable(&self) -> bool {
        self.model.is_active && self.deployments.iter().any(|d| d.provider.is_active)
    }
}

/// The whole catalog, active or not, so the proxy can tell "no such model" from "not served".
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    by_name: HashMap<String, Arc<CatalogModel>>,
    /// Every model, by `sort_order` then name.
    ordered: Vec<Arc<CatalogModel>>,
}

impl Catalog {
    /// Builds from rows; a model whose provider row is missing is left out.
    pub fn new(models: Vec<models::Model>, providers: Vec<providers::Model>) -> Self {
        let providers: HashMap<String, Arc<providers::Model>> = providers
            .into_iter()
            .map(|p| (p.key.clone(), Arc::new(p)))
            .collect();
        let mut ordered: Vec<Arc<CatalogModel>> = models
            .into_iter()
            .filter_map(|m| {
                let provider = (**providers.get(&m.provider_key)?).clone();
                let deployments = crate::routing::deployment::from_row(&m, &providers);
                let fallbacks = crate::routing::deployment::fallbacks_of(&m);
                Some(Arc::new(CatalogModel {
                    model: m,
                    provider,
                    deployments,
                    fallbacks,
                }))
            })
            .collect();
        ordered.sort_by(|a, b| {
            (a.model.sort_order, &a.model.name).cmp(&(b.model.sort_order, &b.model.name))
        });
        let by_name = ordered
            .iter()
            .map(|m| (m.model.name.clone(), m.clone()))
            .collect();
        Self { by_name, ordered }
    }

    /// Any model by name, served or not.
    pub fn get(&self, name: &str) -> Option<&Arc<CatalogModel>> {
        self.by_name.get(name)
    }

    /// A model `/v1` serves (active, on an active provider).
    pub fn servable(&self, name: &str) -> Option<&Arc<CatalogModel>> {
        self.get(name).filter(|m| m.is_servable())
    }

    /// Every model, by `sort_order` then name.
    pub fn models(&self) -> &[Arc<CatalogModel>] {
        &self.ordered
    }

    /// The served models, in catalog order (`/v1/models`).
    pub fn servable_models(&self) -> impl Iterator<Item = &Arc<CatalogModel>> {
        self.ordered.iter().filter(|m| m.is_servable())
    }
}

/// The provider key a request uses, still sealed: the hot path opens it with the key ring
/// (associated data = `id`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderKeyEntry {
    pub id: String,
    /// The key's owner (for a shared key, the admin who stored it).
    pub user_id: String,
    pub provider: String,
    pub secret_enc: String,
    /// Overrides the provider's base URL.
    pub base_url: Option<String>,
    /// The caller borrows someone else's shared key (the platform's), so the request is charged
    /// to the caller's balance. An admin using their own key gets `false`.
    pub shared: bool,
    /// Share of the pool (1–100).
    pub weight: u32,
    /// Display form (`sk-ab…wxyz`) for the health report.
    pub masked: String,
    /// The key, opened by the first request that used this entry (see `proxy::route`).
    pub opened: OpenedKey,
}

/// The provider keys one user's requests to one provider may use (spec §11): the user's own
/// active keys, else the shared platform ones. Empty: the user has no key for the provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderKeyPool {
    pub keys: Vec<ProviderKeyEntry>,
    /// When it was read (`routing::health::now_ms`): a key marked invalid after this is skipped.
    pub loaded_ms: u64,
}

/// A provider key opened once per cache entry, so a request does not run AES-GCM (and allocate)
/// for it: it lives exactly as long as the entry — a key edit, an invalidation or the TTL drops
/// both. The sealed text stays beside it; only the process's memory holds the plaintext, as it
/// holds the master key that opens it.
#[derive(Clone, Default)]
pub struct OpenedKey(std::sync::OnceLock<Arc<secrecy::SecretString>>);

impl OpenedKey {
    /// The opened key, opening it with `open` the first time.
    pub fn get_or_open<E>(
        &self,
        open: impl FnOnce() -> Result<String, E>,
    ) -> Result<Arc<secrecy::SecretString>, E> {
        if let Some(k) = self.0.get() {
            return Ok(k.clone());
        }
        let k = Arc::new(secrecy::SecretString::from(open()?));
        Ok(self.0.get_or_init(|| k).clone())
    }
}

/// Derived from `secret_enc`: two entries are equal whatever was opened.
impl PartialEq for OpenedKey {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for OpenedKey {}

impl std::fmt::Debug for OpenedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.get().is_some() {
            "OpenedKey(<redacted>)"
        } else {
            "OpenedKey(not yet)"
        })
    }
}

/// One cache invalidation. Serializable: it is published to the other replicas as JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Invalidation {
    /// One gateway key, by secret hash (revoked, toggled, rotated, re-scoped, deleted, created).
    GatewayKey { hash: String },
    /// Everything derived from a user: their gateway keys' contexts and their provider keys.
    User { user_id: String },
    /// Providers or models changed.
    Catalog,
    /// A runtime setting changed (`PUT /api/admin/settings/{key}`).
    Settings,
    /// One user's provider keys changed.
    ProviderKeys { user_id: String },
    /// A shared provider key changed: it may serve anyone.
    AllProviderKeys,
    /// Routing health another replica saw (cool-downs, open breakers, invalid keys).
    Health {
        events: Vec<crate::routing::health::HealthEvent>,
    },
    /// Not a cache entry: a conversation of the user changed; their open WebSockets hear it
    /// (`conversations::hub`), except the socket `origin_socket` that made the change.
    Conversation {
        user_id: String,
        conversation_id: String,
        origin_socket: Option<u64>,
    },
}

type KeyEntry = Option<Arc<KeyCtx>>;
type ProviderKeyCacheKey = (String, String);

/// Short life for "no such key", [`TTL`] for found keys.
struct KeyExpiry;

impl Expiry<String, KeyEntry> for KeyExpiry {
    fn expire_after_create(&self, _: &String, v: &KeyEntry, _: Instant) -> Option<Duration> {
        Some(if v.is_some() { TTL } else { NEGATIVE_TTL })
    }

    fn expire_after_update(
        &self,
        _: &String,
        v: &KeyEntry,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(if v.is_some() { TTL } else { NEGATIVE_TTL })
    }
}

/// How long a [`Snapshot`] may serve its copy before asking its cache again.
const SNAPSHOT_TTL: Duration = Duration::from_secs(1);

/// The value of a single-entry cache as a hit reads it twice per request, without moka's
/// hashing and read bookkeeping: valid while no invalidation happened since it was taken (the
/// generation did not move) and for at most [`SNAPSHOT_TTL`].
struct Snapshot<V>(std::sync::RwLock<Option<(u64, Instant, V)>>);

impl<V: Clone> Snapshot<V> {
    fn new() -> Self {
        Self(std::sync::RwLock::new(None))
    }

    fn get(&self, generation: u64) -> Option<V> {
        let held = self
            .0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match &*held {
            Some((g, until, v)) if *g == generation && Instant::now() < *until => Some(v.clone()),
            _ => None,
        }
    }

    /// `generation` is the one read before the value was fetched, so a value fetched across an
    /// invalidation is never served.
    fn set(&self, generation: u64, v: V) {
        *self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some((generation, Instant::now() + SNAPSHOT_TTL, v));
    }
}

struct Inner {
    gateway_keys: Cache<String, KeyEntry>,
    catalog: Cache<(), Arc<Catalog>>,
    catalog_snapshot: Snapshot<Arc<Catalog>>,
    /// Runtime settings the hot path reads (default rate limits).
    defaults: Cache<(), RuntimeDefaults>,
    defaults_snapshot: Snapshot<RuntimeDefaults>,
    provider_keys: Cache<ProviderKeyCacheKey, Arc<ProviderKeyPool>>,
    /// Routing health, which remote [`Invalidation::Health`] messages update.
    health: std::sync::OnceLock<crate::routing::Health>,
    /// Bumped by every invalidation (see the module comment).
    generation: AtomicU64,
    /// Tells the other replicas; `None` when this one is alone.
    bus: Option<Bus>,
    /// The WebSockets of this replica that hear `Invalidation::Conversation`.
    hub: crate::conversations::hub::Hub,
}

/// The caches; every management write that touches an entry invalidates it.
#[derive(Clone)]
pub struct Caches {
    inner: Arc<Inner>,
}

impl Default for Caches {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Caches {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Caches")
            .field("gateway_keys", &self.inner.gateway_keys.entry_count())
            .field("provider_keys", &self.inner.provider_keys.entry_count())
            .finish_non_exhaustive()
    }
}

impl Caches {
    /// Caches of a replica that is alone (no invalidation bus).
    pub fn new() -> Self {
        Self::with_bus(None)
    }

    /// Caches whose invalidations are also published on `bus`.
    pub fn with_bus(bus: Option<Bus>) -> Self {
        Self {
            inner: Arc::new(Inner {
                gateway_keys: Cache::builder()
                    .name("gateway_keys")
                    .max_capacity(MAX_GATEWAY_KEYS)
                    .expire_after(KeyExpiry)
                    .support_invalidation_closures()
                    .build(),
                catalog: Cache::builder()
                    .name("catalog")
                    .max_capacity(1)
                    .time_to_live(TTL)
                    .build(),
                catalog_snapshot: Snapshot::new(),
                defaults: Cache::builder()
                    .name("runtime_defaults")
                    .max_capacity(1)
                    .time_to_live(TTL)
                    .build(),
                defaults_snapshot: Snapshot::new(),
                provider_keys: Cache::builder()
                    .name("provider_keys")
                    .max_capacity(MAX_PROVIDER_KEYS)
                    .time_to_live(TTL)
                    .support_invalidation_closures()
                    .build(),
                generation: AtomicU64::new(0),
                health: std::sync::OnceLock::new(),
                bus,
                hub: crate::conversations::hub::Hub::new(),
            }),
        }
    }

    /// Loads `key` through `cache` unless present, coalescing concurrent misses, and drops the
    /// loaded value again if an invalidation happened while it was being read.
    ///
    /// The returned future is boxed: moka's loading future and the load are kilobytes, and every
    /// caller's future would otherwise carry (and copy, per request) that much for the miss it
    /// almost never takes. Callers try the cache's `get` first.
    fn load<'a, K, V, F>(
        &'a self,
        cache: &'a Cache<K, V>,
        key: K,
        load: F,
    ) -> Pin<Box<dyn Future<Output = Result<V, DbErr>> + Send + 'a>>
    where
        K: Hash + Eq + Clone + Send + Sync + 'static,
        V: Clone + Send + Sync + 'static,
        F: Future<Output = Result<V, DbErr>> + Send + 'a,
    {
        Box::pin(async move {
            let generation = self.inner.generation.load(Ordering::SeqCst);
            let value = cache
                .try_get_with(key.clone(), load)
                .await
                .map_err(|e| (*e).clone())?;
            if self.inner.generation.load(Ordering::SeqCst) != generation {
                cache.invalidate(&key).await;
            }
            Ok(value)
        })
    }

    /// A single-entry cache read through its [`Snapshot`]: the snapshot when current, else the
    /// cache (loading on a miss), which then refreshes the snapshot.
    ///
    /// `load` makes the loading future only on a miss: an unstarted future is as large as its
    /// whole state, and this one's would otherwise sit in every caller's.
    async fn single<V, F>(
        &self,
        snapshot: &Snapshot<V>,
        cache: &Cache<(), V>,
        load: impl FnOnce() -> F,
    ) -> Result<V, DbErr>
    where
        V: Clone + Send + Sync + 'static,
        F: Future<Output = Result<V, DbErr>> + Send,
    {
        let generation = self.inner.generation.load(Ordering::SeqCst);
        if let Some(hit) = snapshot.get(generation) {
            return Ok(hit);
        }
        let value = match cache.get(&()).await {
            Some(hit) => hit,
            None => self.load(cache, (), load()).await?,
        };
        snapshot.set(generation, value.clone());
        Ok(value)
    }

    /// The context of the gateway key whose secret hashes to `key_hash`; `None` for an unknown
    /// key (also cached, briefly). A hit never touches the database.
    pub async fn gateway_key(
        &self,
        db: &DatabaseConnection,
        metrics: &Metrics,
        key_hash: &str,
    ) -> Result<Option<Arc<KeyCtx>>, DbErr> {
        if let Some(hit) = self.inner.gateway_keys.get(key_hash).await {
            metrics.auth_cache_hits_total.inc();
            return Ok(hit);
        }
        metrics.auth_cache_misses_total.inc();
        self.load(
            &self.inner.gateway_keys,
            key_hash.to_owned(),
            load_key_ctx(db, key_hash),
        )
        .await
    }

    /// The whole catalog (providers and models, active or not).
    pub async fn catalog(&self, db: &DatabaseConnection) -> Result<Arc<Catalog>, DbErr> {
        let inner = &self.inner;
        self.single(&inner.catalog_snapshot, &inner.catalog, || async {
            let providers = store::providers::all(db).await?;
            let models = store::models::all(db).await?;
            Ok(Arc::new(Catalog::new(models, providers)))
        })
        .await
    }

    /// The runtime default rate limits (settings table over config), cached like the catalog.
    pub async fn runtime_defaults(
        &self,
        db: &DatabaseConnection,
        config: &crate::config::Config,
    ) -> Result<RuntimeDefaults, DbErr> {
        let inner = &self.inner;
        self.single(&inner.defaults_snapshot, &inner.defaults, || async {
            Ok(RuntimeDefaults {
                user_rpm: crate::settings::default_user_rpm(db, config).await?,
                key_rpm: crate::settings::default_key_rpm(db, config).await?,
            })
        })
        .await
    }

    /// The provider-key pool a request by `user_id` to `provider` uses: the user's own active
    /// keys, else the active shared ones (empty when there are neither).
    pub async fn provider_keys(
        &self,
        db: &DatabaseConnection,
        user_id: &str,
        provider: &str,
    ) -> Result<Arc<ProviderKeyPool>, DbErr> {
        let key = (user_id.to_owned(), provider.to_owned());
        if let Some(hit) = self.inner.provider_keys.get(&key).await {
            return Ok(hit);
        }
        self.load(&self.inner.provider_keys, key, async {
            let loaded_ms = crate::routing::health::now_ms();
            let rows = store::provider_keys::find_pool(db, user_id, provider).await?;
            Ok(Arc::new(ProviderKeyPool {
                keys: rows
                    .into_iter()
                    .map(|r| ProviderKeyEntry {
                        shared: r.shared && r.user_id != user_id,
                        weight: r.weight.clamp(1, 100) as u32,
                        masked: r.masked,
                        id: r.id,
                        user_id: r.user_id,
                        provider: r.provider_key,
                        secret_enc: r.secret_enc,
                        base_url: r.base_url,
                        opened: OpenedKey::default(),
                    })
                    .collect(),
                loaded_ms,
            }))
        })
        .await
    }

    /// The newest key of that pool (`None`: the user has no key for the provider).
    pub async fn provider_key(
        &self,
        db: &DatabaseConnection,
        user_id: &str,
        provider: &str,
    ) -> Result<Option<ProviderKeyEntry>, DbErr> {
        Ok(self
            .provider_keys(db, user_id, provider)
            .await?
            .keys
            .first()
            .cloned())
    }

    /// The routing health remote health messages apply to (set once at start).
    pub fn attach_health(&self, health: crate::routing::Health) {
        let _ = self.inner.health.set(health);
    }

    /// Applies one invalidation to this replica's caches and publishes it to the others. Every
    /// invalidation a management write makes goes through here, after its transaction committed.
    pub async fn apply(&self, inv: &Invalidation) {
        self.apply_local(inv).await;
        if let Some(bus) = &self.inner.bus {
            bus.publish(inv).await;
        }
    }

    /// This replica's open chat WebSockets.
    pub fn hub(&self) -> &crate::conversations::hub::Hub {
        &self.inner.hub
    }

    /// Applies one invalidation to this replica's caches only (one another replica published).
    pub async fn apply_local(&self, inv: &Invalidation) {
        let inner = &self.inner;
        if let Invalidation::Health { events } = inv {
            // Not a cached fact: nothing to drop, the snapshots stay valid.
            if let Some(h) = inner.health.get() {
                for e in events {
                    h.apply_remote(e);
                }
            }
            return;
        }
        if let Invalidation::Conversation {
            user_id,
            conversation_id,
            origin_socket,
        } = inv
        {
            inner.hub.deliver(user_id, conversation_id, *origin_socket);
            return;
        }
        inner.generation.fetch_add(1, Ordering::SeqCst);
        match inv {
            Invalidation::GatewayKey { hash } => inner.gateway_keys.invalidate(hash).await,
            Invalidation::User { user_id } => {
                let uid = user_id.clone();
                if inner
                    .gateway_keys
                    .invalidate_entries_if(move |_, v| v.as_ref().is_some_and(|c| c.user_id == uid))
                    .is_err()
                {
                    inner.gateway_keys.invalidate_all();
                }
                self.invalidate_provider_keys_of(user_id);
            }
            Invalidation::Catalog => inner.catalog.invalidate_all(),
            Invalidation::Settings => inner.defaults.invalidate_all(),
            Invalidation::ProviderKeys { user_id } => self.invalidate_provider_keys_of(user_id),
            Invalidation::AllProviderKeys => inner.provider_keys.invalidate_all(),
            Invalidation::Health { .. } => {}
            Invalidation::Conversation { .. } => {}
        }
    }

    /// Empties this replica's caches (after invalidations may have been missed).
    pub async fn clear_local(&self) {
        let inner = &self.inner;
        inner.generation.fetch_add(1, Ordering::SeqCst);
        inner.gateway_keys.invalidate_all();
        inner.catalog.invalidate_all();
        inner.defaults.invalidate_all();
        inner.provider_keys.invalidate_all();
    }

    fn invalidate_provider_keys_of(&self, user_id: &str) {
        let uid = user_id.to_owned();
        let cache = &self.inner.provider_keys;
        // The user's own lookups, and everyone else's that the user's shared key answered.
        if cache
            .invalidate_entries_if(move |(caller, _), pool| {
                *caller == uid || pool.keys.iter().any(|e| e.user_id == uid)
            })
            .is_err()
        {
            cache.invalidate_all();
        }
    }

    /// A gateway key was created, changed, rotated or deleted.
    pub async fn invalidate_gateway_key(&self, hash: &str) {
        self.apply(&Invalidation::GatewayKey {
            hash: hash.to_owned(),
        })
        .await;
    }

    /// A user's status, role or limits changed: drop everything derived from that user.
    pub async fn invalidate_user(&self, user_id: &str) {
        self.apply(&Invalidation::User {
            user_id: user_id.to_owned(),
        })
        .await;
    }

    /// A provider or model changed.
    pub async fn invalidate_catalog(&self) {
        self.apply(&Invalidation::Catalog).await;
    }

    /// A user's own provider key changed.
    pub async fn invalidate_provider_keys(&self, user_id: &str) {
        self.apply(&Invalidation::ProviderKeys {
            user_id: user_id.to_owned(),
        })
        .await;
    }

    /// A shared provider key changed (it may be serving anyone).
    pub async fn invalidate_all_provider_keys(&self) {
        self.apply(&Invalidation::AllProviderKeys).await;
    }
}

/// Reads a gateway key and its owner into a `KeyCtx`; `None` when either is missing.
async fn load_key_ctx(db: &DatabaseConnection, key_hash: &str) -> Result<KeyEntry, DbErr> {
    let Some(k) = store::gateway_keys::find_by_hash(db, key_hash).await? else {
        return Ok(None);
    };
    let Some(u) = store::users::find(db, &k.user_id).await? else {
        return Ok(None);
    };
    let limit = |v: Option<i32>| v.and_then(|v| u32::try_from(v).ok());
    Ok(Some(Arc::new(KeyCtx {
        allowed_models: k.allowed_models.as_deref().map(parse_allowed_models),
        allowed_ips: k.allowed_ips.as_deref().map(parse_allowed_ips),
        rpm_limit: limit(k.rpm_limit),
        tpm_limit: limit(k.tpm_limit),
        budget_nanos: k.budget_nanos,
        expires_at: k.expires_at,
        is_active: k.is_active,
        key_id: k.id,
        key_name: k.name,
        user_id: k.user_id,
        user_status: u.status,
        user_role: u.role,
        user_rpm_limit: limit(u.rpm_limit),
        user_tpm_limit: limit(u.tpm_limit),
        plan: u.plan,
        plan_expires_at: u.plan_expires_at,
        cache_ttl_secs: u32::try_from(k.cache_ttl_secs).unwrap_or(0),
    })))
}

/// A stored JSON array of model names. Unreadable data fails closed (no model allowed).
fn parse_allowed_models(json: &str) -> HashSet<String> {
    serde_json::from_str::<Vec<String>>(json)
        .map(|v| v.into_iter().collect())
        .unwrap_or_default()
}

/// A stored JSON array of CIDRs. Unreadable data fails closed (no address allowed).
fn parse_allowed_ips(json: &str) -> Vec<IpNet> {
    serde_json::from_str::<Vec<String>>(json)
        .ok()
        .and_then(|v| v.iter().map(|s| s.parse().ok()).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> KeyCtx {
        KeyCtx {
            key_id: "k".into(),
            user_id: "u".into(),
            key_name: "n".into(),
            allowed_models: None,
            allowed_ips: None,
            rpm_limit: None,
            tpm_limit: None,
            budget_nanos: None,
            expires_at: None,
            is_active: true,
            user_status: "active".into(),
            user_role: "user".into(),
            user_rpm_limit: None,
            user_tpm_limit: None,
            plan: None,
            plan_expires_at: None,
            cache_ttl_secs: 0,
        }
    }

    #[test]
    fn ip_allow_list_matches_mapped_v4() {
        let mut c = ctx();
        assert!(c.allows_ip("203.0.113.9".parse().expect("ip")));
        c.allowed_ips = Some(parse_allowed_ips(r#"["10.0.0.0/8","2001:db8::/32"]"#));
        assert!(c.allows_ip("10.1.2.3".parse().expect("ip")));
        assert!(c.allows_ip("::ffff:10.1.2.3".parse().expect("ip")));
        assert!(c.allows_ip("2001:db8::5".parse().expect("ip")));
        assert!(!c.allows_ip("11.0.0.1".parse().expect("ip")));
        // Corrupt data allows nothing.
        c.allowed_ips = Some(parse_allowed_ips("not json"));
        assert!(!c.allows_ip("10.1.2.3".parse().expect("ip")));
    }

    #[test]
    fn expiry_and_models() {
        let mut c = ctx();
        let now = Utc::now();
        assert!(c.is_active_at(now));
        c.expires_at = Some(now + chrono::Duration::hours(1));
        assert!(c.is_active_at(now));
        assert!(!c.is_active_at(now + chrono::Duration::hours(2)));
        assert!(c.allows_model("anything"));
        c.allowed_models = Some(parse_allowed_models(r#"["gpt-x"]"#));
        assert!(c.allows_model("gpt-x"));
        assert!(!c.allows_model("gpt-y"));
    }
}
