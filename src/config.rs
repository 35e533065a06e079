//! Typed configuration: `config.toml` + `TOLLGATE_<SECTION>__<KEY>` overrides, validated at start.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config: {0}")]
    Load(#[from] Box<figment::Error>),
    #[error("config: {key}: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_owned(),
        message: message.into(),
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub database: DatabaseConfig,
    pub auth: AuthConfig,
    pub security: SecurityConfig,
    pub billing: BillingConfig,
    pub limits: LimitsConfig,
    pub upstream: UpstreamConfig,
    pub usage: UsageConfig,
    pub storage: StorageConfig,
    pub chat: ChatConfig,
    pub redis: RedisConfig,
    pub routing: RoutingConfig,
    /// Providers created at first start when absent.
    pub providers: Vec<ProviderSeed>,
    pub plans: Vec<PlanConfig>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    pub listen: String,
    /// Bearer token `/metrics` requires; empty = open.
    #[serde(skip_serializing)]
    pub metrics_token: Option<SecretString>,
    pub max_body_bytes: usize,
    /// Origins allowed by CORS; `["*"]` allows any.
    pub cors_origins: Vec<String>,
    /// Bound on a management API call (the `/v1` routes use the `upstream` timeouts instead).
    pub request_timeout_secs: u64,
    /// On SIGTERM, how long in-flight requests and streams may take to finish.
    pub shutdown_drain_secs: u64,
    /// Take the client address from `X-Forwarded-For` (only behind a trusted proxy).
    pub trust_forwarded_for: bool,
    /// `json` (default) or `pretty`.
    pub log_format: String,
    /// Threads that serve connections, each with its own event loop; 0 = one per CPU.
    pub workers: usize,
    /// Time allowed to receive a request's whole body once its head arrived (408 past it).
    pub body_read_timeout_secs: u64,
    /// Client connections open at once; at the cap the listener stops accepting (new ones wait
    /// in the kernel's backlog) until one closes.
    pub max_connections: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            metrics_token: None,
            max_body_bytes: 16 * 1024 * 1024,
            cors_origins: Vec::new(),
            request_timeout_secs: 30,
            shutdown_drain_secs: 30,
            trust_forwarded_for: false,
            log_format: "json".into(),
            workers: 0,
            body_read_timeout_secs: 30,
            max_connections: 10_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseConfig {
    #[serde(skip_serializing)]
    pub url: SecretString,
    pub max_connections: u32,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: SecretString::from("sqlite://tollgate.db?mode=rwc"),
            max_connections: 16,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Registration {
    Open,
    Closed,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Default for the runtime setting `registration` (an admin can change it live).
    pub registration: Registration,
    pub access_token_ttl_secs: u64,
    /// Requests per minute one client address may make to `/api/auth/*` (a burst of as many);
    /// 0 = no limit.
    pub ip_rpm: u32,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            registration: Registration::Open,
            access_token_ttl_secs: 3600,
            ip_rpm: 60,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct SecurityConfig {
    pub allow_private_base_urls: bool,
    /// Base64 of 32 bytes. Also `TOLLGATE_MASTER_KEY`. Empty = generated into the secrets file.
    #[serde(skip_serializing)]
    pub master_key: Option<SecretString>,
    /// Older master keys, still used to decrypt until `tollgate master-key rotate` has run.
    #[serde(skip_serializing)]
    pub previous_master_keys: Vec<SecretString>,
    /// Also `TOLLGATE_JWT_SECRET`. Empty = generated into the secrets file.
    #[serde(skip_serializing)]
    pub jwt_secret: Option<SecretString>,
    /// Where generated secrets live; default: beside the SQLite file, else `./tollgate.secrets`.
    pub secrets_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct BillingConfig {
    pub enforce_balance: bool,
    pub initial_balance_usd: f64,
    /// A replica's reservation leases are reclaimed by the others once its heartbeat (every
    /// second) is this many seconds old: what a crashed replica held is free again after it.
    pub lease_ttl_secs: u64,
}

impl Default for BillingConfig {
    fn default() -> Self {
        Self {
            enforce_balance: false,
            initial_balance_usd: 0.0,
            lease_ttl_secs: 30,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Requests per minute per user when the user has no limit of their own; 0 = none.
    pub default_user_rpm: u32,
    /// Requests per minute per gateway key when the key has none; 0 = none.
    pub default_key_rpm: u32,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamConfig {
    pub connect_timeout_secs: u64,
    /// Time allowed until the upstream's response headers arrive.
    pub first_byte_timeout_secs: u64,
    /// Longest silence allowed between two chunks of a streamed response.
    pub idle_timeout_secs: u64,
    pub pool_idle_timeout_secs: u64,
    pub pool_max_idle_per_host: usize,
    /// Largest single server-sent event accepted from a streaming upstream: what the gateway
    /// buffers for one event, so an upstream that never ends a line cannot grow it without bound.
    pub max_sse_event_bytes: usize,
    /// Speak HTTP/2 without TLS (prior knowledge, "h2c") to `http://` base URLs; `https://` ones
    /// negotiate HTTP/2 by ALPN either way.
    pub http2_cleartext: bool,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            connect_timeout_secs: 10,
            first_byte_timeout_secs: 300,
            idle_timeout_secs: 300,
            pool_idle_timeout_secs: 90,
            pool_max_idle_per_host: 256,
            max_sse_event_bytes: crate::proxy::stream::DEFAULT_MAX_EVENT_BYTES,
            http2_cleartext: false,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct UsageConfig {
    /// Bound of the channel between requests and the usage writer.
    pub queue_capacity: usize,
    pub batch_size: usize,
    pub flush_interval_ms: u64,
    /// Delete usage records older than this many days, daily; 0 = keep forever.
    pub retention_days: u32,
    /// The usage spool's directory (records survive `kill -9`); one per process, never shared.
    /// Default: `<sqlite file>.spool` beside a SQLite database, else `./tollgate-spool`.
    pub spool_dir: Option<PathBuf>,
}

impl Default for UsageConfig {
    fn default() -> Self {
        Self {
            queue_capacity: 65536,
            batch_size: 500,
            flush_interval_ms: 50,
            retention_days: 0,
            spool_dir: None,
        }
    }
}

/// Stored state (API.md §9): responses, conversations, stored chat completions.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// `false`: `store` is a no-op (responses say `store: false`) and `previous_response_id` /
    /// `conversation` are refused; what is already stored stays readable.
    pub enabled: bool,
    /// Delete stored responses, stored chat completions and conversation items older than this
    /// many days, daily; 0 = keep forever.
    pub retention_days: u32,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            retention_days: 0,
        }
    }
}

/// Retries, fallbacks and health (API.md §11).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoutingConfig {
    /// Upstream attempts per client request at most (1 = no retries), fallbacks included.
    pub max_attempts: u32,
    /// No new attempt starts this many seconds after the first one began.
    pub retry_budget_secs: u64,
    /// Consecutive failures (connect, timeout, 5xx) that open a deployment + key's breaker.
    pub failure_threshold: u32,
    /// Seconds an open breaker waits before one half-open probe.
    pub cooldown_secs: u64,
    /// The most seconds a response-cache TTL may be (a key's `cache_ttl_secs`, the
    /// `x-tollgate-cache-ttl` header): larger ones are capped to it, not refused.
    pub max_cache_ttl_secs: u64,
    /// Bytes of answers this replica's response cache holds at most (least used go first).
    pub cache_max_bytes: u64,
    /// An answer larger than this many bytes is not cached.
    pub cache_max_entry_bytes: u64,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            retry_budget_secs: 30,
            failure_threshold: 5,
            cooldown_secs: 30,
            max_cache_ttl_secs: 3600,
            cache_max_bytes: 64 * 1024 * 1024,
            cache_max_entry_bytes: 1024 * 1024,
        }
    }
}

/// The signed-in chat's WebSocket (`/api/ws`, API.md §12).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChatConfig {
    /// The first message (`{"type": "auth", "token": …}`) must arrive within this (else 4401).
    pub ws_auth_timeout_secs: u64,
    /// The server pings every this many seconds.
    pub ws_ping_interval_secs: u64,
    /// A socket the client has sent nothing on (pongs included) for this long is closed.
    pub ws_idle_timeout_secs: u64,
    /// Open sockets per user on this replica; one more is closed with 4429.
    pub ws_max_sockets_per_user: usize,
}

impl Default for ChatConfig {
    fn default() -> Self {
        Self {
            ws_auth_timeout_secs: 10,
            ws_ping_interval_secs: 30,
            ws_idle_timeout_secs: 90,
            ws_max_sockets_per_user: 16,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    #[serde(skip_serializing)]
    pub url: Option<SecretString>,
    /// Prefix of every Redis key and channel tollgate uses, so several deployments (or tests)
    /// can share one Redis.
    pub key_prefix: String,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: None,
            key_prefix: "tollgate:".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderSeed {
    pub key: String,
    pub display_name: String,
    /// Empty (or absent) only for `bedrock`: then the region's runtime endpoint.
    #[serde(default)]
    pub base_url: String,
    #[serde(default = "default_kind")]
    pub kind: String,
    #[serde(default = "default_true")]
    pub is_active: bool,
    #[serde(default)]
    pub sort_order: i32,
    /// `openai` kind only: the upstream serves OpenAI's `/responses`.
    #[serde(default)]
    pub supports_responses: bool,
    /// `azure` only: the `api-version` query (the `/openai/v1/` API when unset).
    #[serde(default)]
    pub api_version: Option<String>,
    /// `bedrock` only (and required there): the AWS region.
    #[serde(default)]
    pub region: Option<String>,
}

impl Default for ProviderSeed {
    fn default() -> Self {
        Self {
            key: String::new(),
            display_name: String::new(),
            base_url: String::new(),
            kind: default_kind(),
            is_active: true,
            sort_order: 0,
            supports_responses: false,
            api_version: None,
            region: None,
        }
    }
}

fn default_kind() -> String {
    "openai".into()
}

fn default_true() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlanConfig {
    pub name: String,
    pub rpm_limit: u32,
    pub tpm_limit: u32,
    pub price_usd_per_month: f64,
}

impl Config {
    /// Loads `path` (when it exists, or must exist when `required`) and the environment.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let (file, required) = match path {
            Some(p) => (p.to_path_buf(), true),
            None => match std::env::var_os("TOLLGATE_CONFIG") {
                Some(p) => (PathBuf::from(p), true),
                None => (PathBuf::from("config.toml"), false),
            },
        };
        if required && !file.exists() {
            return Err(invalid(
                "--config",
                format!("file {} does not exist", file.display()),
            ));
        }
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        if file.exists() {
            fig = fig.merge(Toml::file_exact(&file));
        }
        fig = fig.merge(
            Env::prefixed("TOLLGATE_")
                .filter(|k| k.as_str().contains("__"))
                .split("__"),
        );
        if let Ok(url) = std::env::var("DATABASE_URL") {
            fig = fig.merge(("database.url", url));
        }
        if let Ok(k) = std::env::var("TOLLGATE_MASTER_KEY") {
            fig = fig.merge(("security.master_key", k));
        }
        if let Ok(k) = std::env::var("TOLLGATE_JWT_SECRET") {
            fig = fig.merge(("security.jwt_secret", k));
        }
        let cfg: Config = fig.extract().map_err(Box::new)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// `server.workers`, with 0 resolved to the number of CPUs this process may use.
    pub fn workers(&self) -> usize {
        match self.server.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }

    /// Checks what serde cannot; every message names the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.listen_addr()?;
        if self.server.max_body_bytes < 1024 {
            return Err(invalid("server.max_body_bytes", "must be at least 1024"));
        }
        if !matches!(self.server.log_format.as_str(), "json" | "pretty") {
            return Err(invalid(
                "server.log_format",
                "must be \"json\" or \"pretty\"",
            ));
        }
        if self.server.workers > 1024 {
            return Err(invalid(
                "server.workers",
                "must be at most 1024 (0 = one per CPU)",
            ));
        }
        if self.server.body_read_timeout_secs == 0 {
            return Err(invalid(
                "server.body_read_timeout_secs",
                "must be at least 1",
            ));
        }
        if !(1..=1_000_000).contains(&self.server.max_connections) {
            return Err(invalid("server.max_connections", "must be 1–1000000"));
        }
        let url = self.database.url.expose_secret();
        if crate::store::DbKind::from_url(url).is_none() {
            return Err(invalid(
                "database.url",
                "must start with sqlite:, postgres://, postgresql:// or mysql://",
            ));
        }
        if !(1..=10).contains(&self.routing.max_attempts) {
            return Err(invalid("routing.max_attempts", "must be 1–10"));
        }
        if self.routing.failure_threshold == 0 {
            return Err(invalid("routing.failure_threshold", "must be at least 1"));
        }
        if !(1..=3600).contains(&self.routing.cooldown_secs) {
            return Err(invalid("routing.cooldown_secs", "must be 1–3600"));
        }
        if self.routing.retry_budget_secs > 3600 {
            return Err(invalid("routing.retry_budget_secs", "must be at most 3600"));
        }
        if self.routing.max_cache_ttl_secs > 30 * 86_400 {
            return Err(invalid(
                "routing.max_cache_ttl_secs",
                "must be at most 2592000 (30 days)",
            ));
        }
        if self.routing.cache_max_entry_bytes > 64 * 1024 * 1024 {
            return Err(invalid(
                "routing.cache_max_entry_bytes",
                "must be at most 67108864 (64 MiB)",
            ));
        }
        if self.routing.cache_max_entry_bytes > self.routing.cache_max_bytes {
            return Err(invalid(
                "routing.cache_max_entry_bytes",
                "must be at most routing.cache_max_bytes",
            ));
        }
        if let Some(url) = self.redis_url()
            && !url.starts_with("redis://")
        {
            return Err(invalid(
                "redis.url",
                "must start with redis:// (e.g. redis://127.0.0.1:6379)",
            ));
        }
        if !(1024..=256 * 1024 * 1024).contains(&self.upstream.max_sse_event_bytes) {
            return Err(invalid(
                "upstream.max_sse_event_bytes",
                "must be between 1024 and 268435456",
            ));
        }
        if self.database.max_connections == 0 {
            return Err(invalid("database.max_connections", "must be at least 1"));
        }
        if self.auth.access_token_ttl_secs < 60 {
            return Err(invalid("auth.access_token_ttl_secs", "must be at least 60"));
        }
        if let Some(k) = non_empty(&self.security.master_key) {
            crate::crypto::parse_master_key(k)
                .map_err(|e| invalid("security.master_key", e.to_string()))?;
        }
        for k in &self.security.previous_master_keys {
            crate::crypto::parse_master_key(k.expose_secret())
                .map_err(|e| invalid("security.previous_master_keys", e.to_string()))?;
        }
        if let Some(s) = non_empty(&self.security.jwt_secret)
            && s.len() < 32
        {
            return Err(invalid(
                "security.jwt_secret",
                "must be at least 32 characters",
            ));
        }
        if !(3..=86_400).contains(&self.billing.lease_ttl_secs) {
            return Err(invalid(
                "billing.lease_ttl_secs",
                "must be 3–86400 (leases heartbeat every second)",
            ));
        }
        if self
            .usage
            .spool_dir
            .as_ref()
            .is_some_and(|d| d.as_os_str().is_empty())
        {
            return Err(invalid("usage.spool_dir", "must not be empty"));
        }
        if !self.billing.initial_balance_usd.is_finite() || self.billing.initial_balance_usd < 0.0 {
            return Err(invalid(
                "billing.initial_balance_usd",
                "must be a number ≥ 0",
            ));
        }
        for (i, p) in self.providers.iter().enumerate() {
            if !crate::validate::provider_key(&p.key) {
                return Err(invalid(
                    &format!("providers[{i}].key"),
                    "must be 1–64 of [a-z0-9_-]",
                ));
            }
            let field = |f: &str| format!("providers[{i}].{f}");
            if !crate::validate::provider_kind(&p.kind) {
                return Err(invalid(
                    &field("kind"),
                    "must be openai, anthropic, gemini, azure or bedrock",
                ));
            }
            let bedrock = p.kind == "bedrock";
            if !(p.base_url.starts_with("http://")
                || p.base_url.starts_with("https://")
                || (bedrock && p.base_url.is_empty()))
            {
                return Err(invalid(&field("base_url"), "must be an http(s) URL"));
            }
            if p.supports_responses && p.kind != "openai" {
                return Err(invalid(
                    &field("supports_responses"),
                    "applies to kind \"openai\" only (azure always uses /responses)",
                ));
            }
            match (&p.api_version, p.kind.as_str()) {
                (Some(v), "azure") if !crate::validate::api_version(v) => {
                    return Err(invalid(
                        &field("api_version"),
                        "must be 1–32 of [A-Za-z0-9.-], e.g. 2024-10-21",
                    ));
                }
                (Some(_), k) if k != "azure" => {
                    return Err(invalid(
                        &field("api_version"),
                        "applies to kind \"azure\" only",
                    ));
                }
                _ => {}
            }
            match (&p.region, bedrock) {
                (None, true) => {
                    return Err(invalid(
                        &field("region"),
                        "is required for kind \"bedrock\"",
                    ));
                }
                (Some(r), true) if !crate::validate::aws_region(r) => {
                    return Err(invalid(
                        &field("region"),
                        "must be an AWS region such as us-east-1",
                    ));
                }
                (Some(_), false) => {
                    return Err(invalid(
                        &field("region"),
                        "applies to kind \"bedrock\" only",
                    ));
                }
                _ => {}
            }
        }
        let mut names = std::collections::HashSet::new();
        for (i, p) in self.plans.iter().enumerate() {
            if p.name.is_empty() || !names.insert(p.name.as_str()) {
                return Err(invalid(
                    &format!("plans[{i}].name"),
                    "must be non-empty and unique",
                ));
            }
            if !p.price_usd_per_month.is_finite() || p.price_usd_per_month < 0.0 {
                return Err(invalid(
                    &format!("plans[{i}].price_usd_per_month"),
                    "must be a number ≥ 0",
                ));
            }
        }
        if self.usage.queue_capacity == 0 || self.usage.batch_size == 0 {
            return Err(invalid(
                "usage.queue_capacity",
                "queue and batch sizes must be ≥ 1",
            ));
        }
        Ok(())
    }

    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.server.listen.parse().map_err(|_| {
            invalid(
                "server.listen",
                format!("not a socket address: {:?}", self.server.listen),
            )
        })
    }

    pub fn database_url(&self) -> &str {
        self.database.url.expose_secret()
    }

    pub fn redis_url(&self) -> Option<&str> {
        non_empty(&self.redis.url)
    }

    pub fn metrics_token(&self) -> Option<&str> {
        non_empty(&self.server.metrics_token)
    }

    /// The usage spool's directory: `usage.spool_dir`, else beside a SQLite file, else
    /// `./tollgate-spool`.
    pub fn spool_dir(&self) -> PathBuf {
        if let Some(d) = &self.usage.spool_dir {
            return d.clone();
        }
        if let Some(rest) = self.database_url().strip_prefix("sqlite:") {
            let path = rest.trim_start_matches("//");
            let path = path.split('?').next().unwrap_or_default();
            if !path.is_empty() && path != ":memory:" && !rest.contains("mode=memory") {
                return PathBuf::from(format!("{path}.spool"));
            }
        }
        PathBuf::from("tollgate-spool")
    }

    /// The file generated secrets go to: beside a SQLite file, else the working directory.
    pub fn secrets_path(&self) -> Option<PathBuf> {
        if let Some(p) = &self.security.secrets_file {
            return Some(p.clone());
        }
        let url = self.database_url();
        if let Some(rest) = url.strip_prefix("sqlite:") {
            let path = rest.trim_start_matches("//");
            let path = path.split('?').next().unwrap_or_default();
            if path.is_empty() || path == ":memory:" || path.contains("mode=memory") {
                return None;
            }
            return Some(PathBuf::from(format!("{path}.secrets")));
        }
        Some(PathBuf::from("tollgate.secrets"))
    }
}

/// `Some(secret)` when set and not blank.
pub fn non_empty(s: &Option<SecretString>) -> Option<&str> {
    s.as_ref()
        .map(|s| s.expose_secret())
        .filter(|s| !s.trim().is_empty())
}
