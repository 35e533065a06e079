//! ② admit: IP allow-list, model allow-list, rate limits (governor: key RPM/TPM, user RPM/TPM),
//! in the order API.md §2 gives. With `redis.url` the buckets are shared by every replica
//! (`cluster::limits`); without it, or while Redis does not answer, each replica keeps its own.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::{StateInformationMiddleware, StateSnapshot};
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use http::{HeaderMap, HeaderValue};

use crate::cache::{CatalogModel, KeyCtx, RuntimeDefaults};
use crate::cluster::limits::{SharedLimits, Verdict};
use crate::config::Config;
use crate::error::ApiError;
use crate::telemetry::Metrics;

type Limiter = RateLimiter<NotKeyed, InMemoryState, DefaultClock, StateInformationMiddleware>;

/// Per-key and per-user limiters, created on first use. Keyed by the limit too, so a changed
/// limit takes effect with a fresh bucket.
#[derive(Clone)]
pub struct Limiters {
    buckets: moka::sync::Cache<(Scope, String, u32), Arc<Limiter>>,
    /// Buckets in Redis every replica shares; the local ones serve when it is absent or down.
    shared: Option<SharedLimits>,
    /// Tells this set's entries in the per-thread [`FRONT`] from another set's (tests run many).
    instance: u64,
}

static NEXT_INSTANCE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// How long a thread may use a bucket it took from `buckets` before asking again. Short, so the
/// buckets moka keeps (and evicts when idle) stay the ones every thread counts against.
const FRONT_TTL: Duration = Duration::from_secs(1);
/// Entries a thread keeps before it sweeps the expired ones.
const FRONT_MAX: usize = 4096;

struct FrontEntry {
    instance: u64,
    scope: Scope,
    id: Box<str>,
    per_minute: u32,
    bucket: Arc<Limiter>,
    until: std::time::Instant,
}

thread_local! {
    /// Each thread's recent buckets, keyed by a hash of (set, scope, id, limit) and checked in
    /// full on a hit: a request takes four to six buckets, and a moka lookup (key allocation,
    /// hashing, read bookkeeping) cost ~2,300 instructions each under callgrind.
    static FRONT: std::cell::RefCell<std::collections::HashMap<u64, FrontEntry>> =
        std::cell::RefCell::new(std::collections::HashMap::new());
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    KeyRpm,
    KeyTpm,
    UserRpm,
    UserTpm,
}

impl Scope {
    fn label(self) -> &'static str {
        match self {
            Scope::KeyRpm => "key_rpm",
            Scope::KeyTpm => "key_tpm",
            Scope::UserRpm => "user_rpm",
            Scope::UserTpm => "user_tpm",
        }
    }

    fn is_tokens(self) -> bool {
        matches!(self, Scope::KeyTpm | Scope::UserTpm)
    }
}

impl Default for Limiters {
    fn default() -> Self {
        Self::new()
    }
}

/// A refused request: the error and the limits to report with it.
#[derive(Debug)]
pub struct Refusal {
    pub error: ApiError,
    pub rate: RateInfo,
}

impl From<ApiError> for Refusal {
    fn from(error: ApiError) -> Self {
        Self {
            error,
            rate: RateInfo::default(),
        }
    }
}

/// The limits that applied, for the `x-ratelimit-*` headers (tightest first).
#[derive(Debug, Default, Clone)]
pub struct RateInfo {
    pub requests: Option<Window>,
    pub tokens: Option<Window>,
}

#[derive(Debug, Clone, Copy)]
pub struct Window {
    pub limit: u32,
    pub remaining: u32,
    pub reset: Duration,
}

impl Limiters {
    pub fn new() -> Self {
        Self {
            buckets: moka::sync::Cache::builder()
                .max_capacity(500_000)
                .time_to_idle(Duration::from_secs(600))
                .build(),
            shared: None,
            instance: NEXT_INSTANCE.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        }
    }

    /// Uses `shared` (the Redis buckets) first, the local buckets when it does not answer.
    pub fn with_shared(mut self, shared: Option<SharedLimits>) -> Self {
        self.shared = shared;
        self
    }

    fn bucket(&self, scope: Scope, id: &str, per_minute: NonZeroU32) -> Arc<Limiter> {
        use std::hash::{Hash, Hasher};
        let mut h = std::hash::DefaultHasher::new();
        (self.instance, scope, id, per_minute.get()).hash(&mut h);
        let slot = h.finish();
        let now = std::time::Instant::now();
        let hit = FRONT.with(|f| {
            f.borrow()
                .get(&slot)
                .filter(|e| {
                    e.instance == self.instance
                        && e.scope == scope
                        && e.per_minute == per_minute.get()
                        && &*e.id == id
                        && now < e.until
                })
                .map(|e| e.bucket.clone())
        });
        if let Some(bucket) = hit {
            return bucket;
        }
        let bucket = self
            .buckets
            .get_with((scope, id.to_owned(), per_minute.get()), || {
                Arc::new(
                    RateLimiter::direct(Quota::per_minute(per_minute))
                        .with_middleware::<StateInformationMiddleware>(),
                )
            });
        FRONT.with(|f| {
            let mut f = f.borrow_mut();
            if f.len() >= FRONT_MAX {
                f.retain(|_, e| now < e.until);
            }
            if f.len() < FRONT_MAX {
                f.insert(
                    slot,
                    FrontEntry {
                        instance: self.instance,
                        scope,
                        id: id.into(),
                        per_minute: per_minute.get(),
                        bucket: bucket.clone(),
                        until: now + FRONT_TTL,
                    },
                );
            }
        });
        bucket
    }

    /// Takes `n` from the bucket (the shared one when Redis answers), or says how long to wait.
    async fn take(
        &self,
        scope: Scope,
        id: &str,
        limit: u32,
        n: u32,
        metrics: &Metrics,
    ) -> Result<Option<Window>, Refusal> {
        let Some(per_minute) = NonZeroU32::new(limit) else {
            return Ok(None);
        };
        let n = NonZeroU32::new(n.clamp(1, limit)).unwrap_or(NonZeroU32::MIN);
        // `wait`: until the `n` asked for are free (`retry-after`); `full`: until the bucket is
        // full again (`x-ratelimit-reset-*`, the same meaning as on an allowed request).
        let refused = |wait: Duration, full: Duration| {
            metrics
                .rate_limited_total
                .with_label_values(&[scope.label()])
                .inc();
            let what = if scope.is_tokens() {
                "tokens"
            } else {
                "requests"
            };
            let who = if matches!(scope, Scope::KeyRpm | Scope::KeyTpm) {
                "API key"
            } else {
                "account"
            };
            let error = ApiError::RateLimited {
                message: format!(
                    "Rate limit reached for this {who}: {limit} {what} per minute. Try again in {}s.",
                    wait.as_secs().max(1)
                ),
                code: "rate_limit_exceeded",
                retry_after_secs: wait.as_secs_f64().ceil().max(1.0) as u64,
            };
            let window = Some(Window {
                limit,
                remaining: 0,
                reset: full,
            });
            let rate = if scope.is_tokens() {
                RateInfo {
                    requests: None,
                    tokens: window,
                }
            } else {
                RateInfo {
                    requests: window,
                    tokens: None,
                }
            };
            Refusal { error, rate }
        };
        let shared = match &self.shared {
            // Boxed: the Redis round trip's state would otherwise be in every request's future.
            Some(s) => Box::pin(s.take(scope.label(), id, limit, n.get())).await,
            None => None,
        };
        match shared {
            Some(Verdict::Allowed { remaining, reset }) => {
                return Ok(Some(Window {
                    limit,
                    remaining,
                    reset,
                }));
            }
            Some(Verdict::Refused { wait, full }) => return Err(refused(wait, full)),
            None => {}
        }
        let bucket = self.bucket(scope, id, per_minute);
        match bucket.check_n(n) {
            Ok(Ok(snap)) => Ok(Some(window(limit, &snap))),
            Ok(Err(not_until)) => {
                let wait = not_until.wait_time_from(DefaultClock::default().now());
                // Once the `n` are free, the other `limit - n` refill one interval each.
                let per = Duration::from_secs(60) / limit;
                Err(refused(wait, wait + per * (limit - n.get())))
            }
            Err(_) => Err(refused(Duration::from_secs(60), Duration::from_secs(60))),
        }
    }

    /// Consumes tokens after the fact (completion tokens); never refuses.
    pub fn consume_tokens(&self, key: &KeyCtx, cfg_user_tpm: Option<u32>, tokens: u32) {
        for (scope, id, limit) in [
            (
                Scope::KeyTpm,
                key.key_id.as_str(),
                key.tpm_limit.unwrap_or(0),
            ),
            (
                Scope::UserTpm,
                key.user_id.as_str(),
                cfg_user_tpm.unwrap_or(0),
            ),
        ] {
            if let (Some(l), Some(n)) = (NonZeroU32::new(limit), NonZeroU32::new(tokens.min(limit)))
            {
                if let Some(shared) = self.shared.clone()
                    && let Ok(rt) = tokio::runtime::Handle::try_current()
                {
                    // Off the response path; the local bucket when Redis does not answer.
                    let (local, id) = (self.clone(), id.to_owned());
                    rt.spawn(async move {
                        if shared
                            .take(scope.label(), &id, l.get(), n.get())
                            .await
                            .is_none()
                        {
                            let _ = local.bucket(scope, &id, l).check_n(n);
                        }
                    });
                    continue;
                }
                let _ = self.bucket(scope, id, l).check_n(n);
            }
        }
    }
}

/// An allowed request's window: `reset` is the time until the bucket is full again (each used
/// request or token refills after 60/limit seconds) — OpenAI's meaning, and the one a refusal
/// reports too.
fn window(limit: u32, snap: &StateSnapshot) -> Window {
    let remaining = snap.remaining_burst_capacity().min(limit);
    let per = Duration::from_secs(60) / limit.max(1);
    Window {
        limit,
        remaining,
        reset: per * (limit - remaining),
    }
}

fn tighter(a: Option<Window>, b: Option<Window>) -> Option<Window> {
    match (a, b) {
        (Some(x), Some(y)) => Some(if y.remaining < x.remaining { y } else { x }),
        (x, None) => x,
        (None, y) => y,
    }
}

/// The per-user limits in force: the user's own, else an unexpired plan's, else the defaults.
pub fn user_limits(key: &KeyCtx, cfg: &Config, defaults: RuntimeDefaults) -> (u32, u32) {
    let plan = key
        .plan
        .as_deref()
        .filter(|_| key.plan_expires_at.is_none_or(|t| t > chrono::Utc::now()))
        .and_then(|p| cfg.plans.iter().find(|x| x.name == p));
    let rpm = key
        .user_rpm_limit
        .or(plan.map(|p| p.rpm_limit))
        .unwrap_or(defaults.user_rpm);
    let tpm = key
        .user_tpm_limit
        .or(plan.map(|p| p.tpm_limit))
        .unwrap_or(0);
    (rpm, tpm)
}

/// Admission for one request to `model` from `ip` with about `tokens` prompt tokens.
pub async fn admit(
    state: &crate::state::AppState,
    key: &KeyCtx,
    ip: Option<IpAddr>,
    model_name: &str,
    model: Option<&Arc<CatalogModel>>,
    tokens: u32,
) -> Result<(Arc<CatalogModel>, RateInfo), Refusal> {
    let (limiters, cfg, metrics) = (&state.limiters, &state.config, &state.metrics);
    if let Some(ip) = ip
        && !key.allows_ip(ip)
    {
        return Err(ApiError::forbidden(
            "ip_not_allowed",
            format!("Requests from {ip} are not allowed for this API key."),
        )
        .into());
    }
    let model = model
        .filter(|m| m.is_servable())
        .ok_or_else(|| ApiError::NotFound {
            message: format!(
                "The model `{model_name}` does not exist or you do not have access to it."
            ),
            code: "model_not_found",
        })?;
    if !key.allows_model(model_name) {
        return Err(ApiError::forbidden(
            "model_not_allowed",
            format!("This API key is not allowed to use the model `{model_name}`."),
        )
        .into());
    }
    let defaults = state
        .caches
        .runtime_defaults(&state.db, cfg)
        .await
        .map_err(ApiError::from)?;
    let (user_rpm, user_tpm) = user_limits(key, cfg, defaults);
    let key_rpm = key.rpm_limit.unwrap_or(defaults.key_rpm);
    let mut info = RateInfo::default();
    let k = limiters
        .take(Scope::KeyRpm, &key.key_id, key_rpm, 1, metrics)
        .await?;
    let u = limiters
        .take(Scope::UserRpm, &key.user_id, user_rpm, 1, metrics)
        .await?;
    info.requests = tighter(k, u);
    let with_requests = |mut r: Refusal| {
        r.rate.requests = info.requests;
        r
    };
    let kt = limiters
        .take(
            Scope::KeyTpm,
            &key.key_id,
            key.tpm_limit.unwrap_or(0),
            tokens,
            metrics,
        )
        .await
        .map_err(with_requests)?;
    let ut = limiters
        .take(Scope::UserTpm, &key.user_id, user_tpm, tokens, metrics)
        .await
        .map_err(with_requests)?;
    info.tokens = tighter(kt, ut);
    Ok((model.clone(), info))
}

/// Writes `6s`, `1m30s`: OpenAI's format for the reset headers.
fn write_reset(out: &mut impl bytes::BufMut, d: Duration) {
    let secs = d.as_secs_f64().ceil() as u64;
    let mut n = itoa::Buffer::new();
    if secs >= 60 {
        out.put_slice(n.format(secs / 60).as_bytes());
        out.put_u8(b'm');
    }
    out.put_slice(n.format(secs % 60).as_bytes());
    out.put_u8(b's');
}

/// Adds the `x-ratelimit-*` headers for the limits that applied.
pub fn rate_headers(headers: &mut HeaderMap, info: &RateInfo) {
    use bytes::{BufMut, BytesMut};
    use http::HeaderName;
    const NAMES: [[HeaderName; 3]; 2] = [
        [
            HeaderName::from_static("x-ratelimit-limit-requests"),
            HeaderName::from_static("x-ratelimit-remaining-requests"),
            HeaderName::from_static("x-ratelimit-reset-requests"),
        ],
        [
            HeaderName::from_static("x-ratelimit-limit-tokens"),
            HeaderName::from_static("x-ratelimit-remaining-tokens"),
            HeaderName::from_static("x-ratelimit-reset-tokens"),
        ],
    ];
    if info.requests.is_none() && info.tokens.is_none() {
        return;
    }
    // Room for these and the few headers added after, so the map grows once.
    headers.reserve(12);
    // The values are written into one buffer and each split off it, sharing its allocation.
    let mut buf = BytesMut::with_capacity(96);
    let split = |buf: &mut BytesMut| HeaderValue::from_maybe_shared(buf.split().freeze());
    for (names, w) in NAMES.into_iter().zip([info.requests, info.tokens]) {
        let Some(w) = w else { continue };
        let [limit, remaining, reset] = names;
        let mut n = itoa::Buffer::new();
        buf.put_slice(n.format(w.limit).as_bytes());
        if let Ok(v) = split(&mut buf) {
            headers.insert(limit, v);
        }
        buf.put_slice(n.format(w.remaining).as_bytes());
        if let Ok(v) = split(&mut buf) {
            headers.insert(remaining, v);
        }
        write_reset(&mut buf, w.reset);
        if let Ok(v) = split(&mut buf) {
            headers.insert(reset, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_headers_carry_each_window() {
        let mut h = HeaderMap::new();
        let window = |limit, remaining, secs| Window {
            limit,
            remaining,
            reset: Duration::from_secs(secs),
        };
        rate_headers(
            &mut h,
            &RateInfo {
                requests: Some(window(60, 59, 1)),
                tokens: Some(window(4_000_000_000, 1234, 125)),
            },
        );
        let got = |n: &str| h.get(n).and_then(|v| v.to_str().ok()).map(str::to_owned);
        assert_eq!(got("x-ratelimit-limit-requests").as_deref(), Some("60"));
        assert_eq!(got("x-ratelimit-remaining-requests").as_deref(), Some("59"));
        assert_eq!(got("x-ratelimit-reset-requests").as_deref(), Some("1s"));
        assert_eq!(
            got("x-ratelimit-limit-tokens").as_deref(),
            Some("4000000000")
        );
        assert_eq!(got("x-ratelimit-remaining-tokens").as_deref(), Some("1234"));
        assert_eq!(got("x-ratelimit-reset-tokens").as_deref(), Some("2m5s"));

        let mut h = HeaderMap::new();
        rate_headers(
            &mut h,
            &RateInfo {
                requests: None,
                tokens: Some(window(10, 0, 3)),
            },
        );
        assert_eq!(h.len(), 3);
        assert_eq!(h["x-ratelimit-remaining-tokens"], "0");
        assert_eq!(h["x-ratelimit-reset-tokens"], "3s");
        rate_headers(&mut h, &RateInfo::default());
        assert_eq!(h.len(), 3);
    }

    fn reset_string(d: Duration) -> String {
        let mut out = Vec::new();
        write_reset(&mut out, d);
        String::from_utf8(out).expect("ASCII")
    }

    #[test]
    fn reset_format() {
        assert_eq!(reset_string(Duration::from_millis(5200)), "6s");
        assert_eq!(reset_string(Duration::from_secs(90)), "1m30s");
        assert_eq!(reset_string(Duration::from_secs(60)), "1m0s");
        assert_eq!(reset_string(Duration::ZERO), "0s");
    }

    #[tokio::test]
    async fn buckets_refuse_after_the_limit() {
        let l = Limiters::new();
        let m = Metrics::new();
        for i in 0..3 {
            let w = l
                .take(Scope::KeyRpm, "k", 3, 1, &m)
                .await
                .expect("allowed")
                .expect("window");
            assert_eq!(w.remaining, 2 - i);
        }
        let r = l
            .take(Scope::KeyRpm, "k", 3, 1, &m)
            .await
            .expect_err("refused");
        let ApiError::RateLimited {
            retry_after_secs, ..
        } = r.error
        else {
            panic!("{:?}", r.error)
        };
        // `retry-after`: the next request's interval (20 s), less the moments the test took.
        assert!((19..=20).contains(&retry_after_secs), "{retry_after_secs}");
        let w = r.rate.requests.expect("a window");
        assert_eq!((w.limit, w.remaining), (3, 0));
        // The reset keeps the allowed responses' meaning: until all three are back (60 s).
        assert!(
            w.reset > Duration::from_secs(59) && w.reset <= Duration::from_secs(60),
            "{:?}",
            w.reset
        );
        // No limit configured: nothing applies.
        assert!(
            l.take(Scope::KeyRpm, "k2", 0, 1, &m)
                .await
                .expect("ok")
                .is_none()
        );
    }
}
