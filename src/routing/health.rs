//! Health of each deployment + provider key pair, in this replica's memory (shared with the
//! others through the invalidation bus when there is one, see [`HealthEvent`]):
//!
//! - 429 → cool-down for the upstream's `retry-after`, else exponentially from 1 s to 60 s;
//! - 401/403 → `invalid` (the key is also marked in the database, see `routing::invalidate_key`);
//! - connect errors, timeouts, 5xx → a circuit breaker: open after `routing.failure_threshold`
//!   consecutive failures, one half-open probe after `routing.cooldown_secs`, closed by a success.
//!
//! The hot path asks [`Health::all_healthy`] first: three atomic loads, and no entry is looked
//! up while nothing anywhere is cooling down, open or invalid.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// The process's clock origin: health times are milliseconds since it.
static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

/// Milliseconds since [`EPOCH`] (never 0: 0 means "unset" in the entries).
pub fn now_ms() -> u64 {
    (EPOCH.elapsed().as_millis() as u64).saturating_add(1)
}

/// The most pairs tracked; past it a new pair is routed as healthy and not tracked.
const MAX_ENTRIES: usize = 65_536;
/// The shortest and longest cool-down without `retry-after`.
const MIN_COOL: Duration = Duration::from_secs(1);
const MAX_COOL: Duration = Duration::from_secs(60);
/// The longest `retry-after` honoured (an upstream's hostile value cannot park a key for days).
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);
/// The window the health report covers.
const WINDOW: Duration = Duration::from_secs(300);
const BUCKET_MS: u64 = 10_000;
const BUCKETS: usize = (WINDOW.as_millis() as u64 / BUCKET_MS) as usize;
/// Latency samples kept for the p50.
const SAMPLES: usize = 256;

/// Which pair: the deployment (provider, upstream model) and the provider key.
#[derive(Debug, Clone, Copy)]
pub struct PairRef<'a> {
    pub provider: &'a str,
    pub upstream_model: &'a str,
    pub key_id: &'a str,
}

impl PairRef<'_> {
    /// The pair's map key: a hash of its three names (no allocation).
    pub fn id(&self) -> u64 {
        let mut h = std::hash::DefaultHasher::new();
        (self.provider, self.upstream_model, self.key_id).hash(&mut h);
        h.finish()
    }
}

/// What happened to one attempt, as health sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The upstream answered (any status that says nothing about the deployment or the key).
    Ok,
    /// 429, with its `retry-after` if any.
    RateLimited(Option<Duration>),
    /// 401 or 403: the key is refused.
    Refused,
    /// Connect error, timeout, 5xx.
    Failed,
}

/// A pair's state as routing and the health report see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Healthy,
    CoolingDown,
    Open,
    Invalid,
}

/// A change one replica saw that the others should apply (sent as JSON on the invalidation bus).
/// Durations, not instants: the replicas' clocks differ.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthEvent {
    pub provider: String,
    pub upstream_model: String,
    pub key_id: String,
    pub change: Change,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Change {
    CoolDown { ms: u64 },
    Open { ms: u64 },
    Closed,
    Invalid,
}

struct Window {
    /// (bucket number, requests, failures) per 10 s, ring-indexed by bucket number.
    buckets: [(u64, u32, u32); BUCKETS],
    /// (at ms, latency ms) ring.
    samples: [(u64, u32); SAMPLES],
    next: usize,
}

impl Default for Window {
    fn default() -> Self {
        Self {
            buckets: [(0, 0, 0); BUCKETS],
            samples: [(0, 0); SAMPLES],
            next: 0,
        }
    }
}

impl Window {
    fn add(&mut self, now: u64, latency_ms: u32, failed: bool) {
        let b = now / BUCKET_MS;
        let slot = &mut self.buckets[(b as usize) % BUCKETS];
        if slot.0 != b {
            *slot = (b, 0, 0);
        }
        slot.1 = slot.1.saturating_add(1);
        if failed {
            slot.2 = slot.2.saturating_add(1);
        } else {
            self.samples[self.next] = (now, latency_ms);
            self.next = (self.next + 1) % SAMPLES;
        }
    }

    /// (requests, failures, p50 latency ms) over the last five minutes.
    fn report(&self, now: u64) -> (u64, u64, Option<u32>) {
        let first = now.saturating_sub(WINDOW.as_millis() as u64) / BUCKET_MS;
        let (mut req, mut fail) = (0u64, 0u64);
        for (b, r, f) in &self.buckets {
            if *b >= first && *b <= now / BUCKET_MS && (*r > 0 || *f > 0) {
                req += u64::from(*r);
                fail += u64::from(*f);
            }
        }
        let since = now.saturating_sub(WINDOW.as_millis() as u64);
        let mut lat: Vec<u32> = self
            .samples
            .iter()
            .filter(|(at, _)| *at != 0 && *at >= since)
            .map(|(_, l)| *l)
            .collect();
        lat.sort_unstable();
        let p50 = (!lat.is_empty()).then(|| lat[(lat.len() - 1) / 2]);
        (req, fail, p50)
    }
}

/// One pair.
struct Entry {
    provider: String,
    upstream_model: String,
    key_id: String,
    key_masked: String,
    consecutive: AtomicU32,
    /// Breaker open until (ms); 0 = closed. Past it: half-open.
    open_until: AtomicU64,
    /// The half-open probe started at (ms); 0 = none in flight.
    probe_at: AtomicU64,
    cool_until: AtomicU64,
    cool_step: AtomicU32,
    /// Times the breaker opened.
    opens: AtomicU64,
    /// Marked invalid at (ms); 0 = not.
    invalid_at: AtomicU64,
    window: Mutex<Window>,
}

/// Told when a breaker opens (+1) or closes (−1), with its provider.
type BreakerHook = Box<dyn Fn(&str, i64) + Send + Sync>;

struct Inner {
    entries: RwLock<HashMap<u64, Arc<Entry>>>,
    /// Breakers open or half-open.
    open: AtomicUsize,
    /// Pairs marked invalid.
    invalid: AtomicUsize,
    /// The latest cool-down end (ms) of any pair.
    cooling_until: AtomicU64,
    failure_threshold: u32,
    cooldown: Duration,
    /// Per provider: breakers open now (exported as a gauge).
    on_breaker: Option<BreakerHook>,
    /// Whether the pairs' changes are published (set once the bus is known).
    publish: AtomicBool,
    outbox: Mutex<Vec<HealthEvent>>,
}

/// Health of every deployment + key pair this replica routed to.
#[derive(Clone)]
pub struct Health(Arc<Inner>);

impl std::fmt::Debug for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Health")
            .field("open", &self.0.open.load(Ordering::Relaxed))
            .field("invalid", &self.0.invalid.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// A [`Health`] that may be gone.
pub struct WeakHealth(std::sync::Weak<Inner>);

impl WeakHealth {
    pub fn upgrade(&self) -> Option<Health> {
        self.0.upgrade().map(Health)
    }
}

/// What routing may do with a pair now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usable {
    Yes,
    /// Half-open: one probe may go.
    Probe,
    /// Not before this (ms); `u64::MAX` for an invalid key.
    No(u64),
}

/// One line of the health report.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct PairReport {
    pub provider: String,
    pub upstream_model: String,
    pub key_id: String,
    /// The provider key, masked.
    pub key: String,
    #[schema(value_type = String)]
    pub state: State,
    pub requests: u64,
    pub failures: u64,
    pub consecutive_failures: u32,
    /// Times this replica saw the breaker open.
    pub breaker_opens: u64,
    pub p50_latency_ms: Option<u32>,
}

impl Health {
    pub fn new(failure_threshold: u32, cooldown: Duration) -> Self {
        Self(Arc::new(Inner {
            entries: RwLock::new(HashMap::new()),
            open: AtomicUsize::new(0),
            invalid: AtomicUsize::new(0),
            cooling_until: AtomicU64::new(0),
            failure_threshold: failure_threshold.max(1),
            cooldown,
            on_breaker: None,
            publish: AtomicBool::new(false),
            outbox: Mutex::new(Vec::new()),
        }))
    }

    /// Reports breaker openings and closings per provider (`delta` +1 / −1) to `f`.
    pub fn with_breaker_gauge(
        failure_threshold: u32,
        cooldown: Duration,
        f: impl Fn(&str, i64) + Send + Sync + 'static,
    ) -> Self {
        let mut h = Self::new(failure_threshold, cooldown);
        if let Some(inner) = Arc::get_mut(&mut h.0) {
            inner.on_breaker = Some(Box::new(f));
        }
        h
    }

    /// A handle that does not keep the health alive.
    pub fn downgrade(&self) -> WeakHealth {
        WeakHealth(Arc::downgrade(&self.0))
    }

    /// Collects this replica's changes for the other replicas from now on ([`Health::drain`]).
    pub fn publish_changes(&self) {
        self.0.publish.store(true, Ordering::Relaxed);
    }

    /// The changes to publish since the last call.
    pub fn drain(&self) -> Vec<HealthEvent> {
        std::mem::take(&mut *lock(&self.0.outbox))
    }

    /// Nothing is cooling down, open or invalid anywhere: every pair is usable.
    pub fn all_healthy(&self, now: u64) -> bool {
        let i = &self.0;
        i.open.load(Ordering::Relaxed) == 0
            && i.invalid.load(Ordering::Relaxed) == 0
            && now >= i.cooling_until.load(Ordering::Relaxed)
    }

    fn get(&self, id: u64) -> Option<Arc<Entry>> {
        self.0
            .entries
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&id)
            .cloned()
    }

    fn get_or_insert(&self, pair: PairRef<'_>, masked: &str) -> Option<Arc<Entry>> {
        let id = pair.id();
        if let Some(e) = self.get(id) {
            return Some(e);
        }
        let mut map = self
            .0
            .entries
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if map.len() >= MAX_ENTRIES && !map.contains_key(&id) {
            return None;
        }
        Some(
            map.entry(id)
                .or_insert_with(|| {
                    Arc::new(Entry {
                        provider: pair.provider.to_owned(),
                        upstream_model: pair.upstream_model.to_owned(),
                        key_id: pair.key_id.to_owned(),
                        key_masked: masked.to_owned(),
                        consecutive: AtomicU32::new(0),
                        open_until: AtomicU64::new(0),
                        probe_at: AtomicU64::new(0),
                        cool_until: AtomicU64::new(0),
                        cool_step: AtomicU32::new(0),
                        opens: AtomicU64::new(0),
                        invalid_at: AtomicU64::new(0),
                        window: Mutex::new(Window::default()),
                    })
                })
                .clone(),
        )
    }

    /// May routing use `pair` now? `pool_loaded` (ms): when the key's pool was read from the
    /// database; a key marked invalid before that was put back into use by its owner.
    pub fn usable(&self, pair: PairRef<'_>, pool_loaded: u64, now: u64) -> Usable {
        let Some(e) = self.get(pair.id()) else {
            return Usable::Yes;
        };
        let invalid_at = e.invalid_at.load(Ordering::Relaxed);
        if invalid_at != 0 && invalid_at >= pool_loaded {
            return Usable::No(u64::MAX);
        }
        let cool = e.cool_until.load(Ordering::Relaxed);
        let open = e.open_until.load(Ordering::Relaxed);
        if open != 0 {
            if now < open {
                return Usable::No(open.max(cool));
            }
            let probe = e.probe_at.load(Ordering::Relaxed);
            // A probe that never reported (its client left) is given up after a cool-down.
            if probe != 0 && now < probe.saturating_add(self.cooldown_ms()) {
                return Usable::No(probe.saturating_add(self.cooldown_ms()));
            }
            if now < cool {
                return Usable::No(cool);
            }
            return Usable::Probe;
        }
        if now < cool {
            return Usable::No(cool);
        }
        Usable::Yes
    }

    /// Takes the half-open probe of `pair`; false when another request took it first.
    pub fn claim_probe(&self, pair: PairRef<'_>, now: u64) -> bool {
        let Some(e) = self.get(pair.id()) else {
            return true;
        };
        let seen = e.probe_at.load(Ordering::Relaxed);
        if seen != 0 && now < seen.saturating_add(self.cooldown_ms()) {
            return false;
        }
        e.probe_at
            .compare_exchange(seen, now, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
    }

    fn cooldown_ms(&self) -> u64 {
        self.0.cooldown.as_millis() as u64
    }

    /// Records one attempt's outcome; returns the pair's state after it.
    pub fn record(
        &self,
        pair: PairRef<'_>,
        masked: &str,
        outcome: Outcome,
        latency: Duration,
    ) -> State {
        let now = now_ms();
        let Some(e) = self.get_or_insert(pair, masked) else {
            return State::Healthy;
        };
        let failed = !matches!(outcome, Outcome::Ok);
        lock(&e.window).add(
            now,
            latency.as_millis().min(u32::MAX as u128) as u32,
            failed,
        );
        match outcome {
            Outcome::Ok => {
                e.consecutive.store(0, Ordering::Relaxed);
                e.cool_step.store(0, Ordering::Relaxed);
                e.probe_at.store(0, Ordering::Relaxed);
                if e.invalid_at.swap(0, Ordering::Relaxed) != 0 {
                    self.0.invalid.fetch_sub(1, Ordering::Relaxed);
                }
                if e.open_until.swap(0, Ordering::AcqRel) != 0 {
                    self.closed(&e);
                    self.publish(&e, Change::Closed);
                }
            }
            Outcome::RateLimited(after) => {
                let d = match after {
                    Some(d) => d.min(MAX_RETRY_AFTER),
                    None => {
                        let step = e.cool_step.fetch_add(1, Ordering::Relaxed).min(6);
                        (MIN_COOL * (1u32 << step)).min(MAX_COOL)
                    }
                };
                let ms = d.as_millis() as u64;
                self.cool(&e, now, ms);
                self.publish(&e, Change::CoolDown { ms });
            }
            Outcome::Refused => {
                if e.invalid_at.swap(now, Ordering::Relaxed) == 0 {
                    self.0.invalid.fetch_add(1, Ordering::Relaxed);
                }
                self.publish(&e, Change::Invalid);
            }
            Outcome::Failed => {
                let n = e
                    .consecutive
                    .fetch_add(1, Ordering::Relaxed)
                    .saturating_add(1);
                let open = e.open_until.load(Ordering::Acquire);
                let probing = open != 0 && now >= open;
                if (open == 0 && n >= self.0.failure_threshold) || probing {
                    let until = now.saturating_add(self.cooldown_ms());
                    e.probe_at.store(0, Ordering::Relaxed);
                    if e.open_until.swap(until, Ordering::AcqRel) == 0 {
                        self.opened(&e);
                    }
                    self.publish(
                        &e,
                        Change::Open {
                            ms: self.cooldown_ms(),
                        },
                    );
                }
            }
        }
        state_of(&e, now)
    }

    fn cool(&self, e: &Entry, now: u64, ms: u64) {
        let until = now.saturating_add(ms);
        e.cool_until.fetch_max(until, Ordering::Relaxed);
        self.0.cooling_until.fetch_max(until, Ordering::Relaxed);
    }

    fn opened(&self, e: &Entry) {
        self.0.open.fetch_add(1, Ordering::Relaxed);
        e.opens.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(provider = %e.provider, upstream_model = %e.upstream_model, "circuit breaker open");
        if let Some(f) = &self.0.on_breaker {
            f(&e.provider, 1);
        }
    }

    fn closed(&self, e: &Entry) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
        tracing::info!(provider = %e.provider, upstream_model = %e.upstream_model, "circuit breaker closed");
        if let Some(f) = &self.0.on_breaker {
            f(&e.provider, -1);
        }
    }

    fn publish(&self, e: &Entry, change: Change) {
        if self.0.publish.load(Ordering::Relaxed) {
            let mut out = lock(&self.0.outbox);
            if out.len() < 1024 {
                out.push(HealthEvent {
                    provider: e.provider.clone(),
                    upstream_model: e.upstream_model.clone(),
                    key_id: e.key_id.clone(),
                    change,
                });
            }
        }
    }

    /// Applies a change another replica saw.
    pub fn apply_remote(&self, ev: &HealthEvent) {
        let pair = PairRef {
            provider: &ev.provider,
            upstream_model: &ev.upstream_model,
            key_id: &ev.key_id,
        };
        let Some(e) = self.get_or_insert(pair, "") else {
            return;
        };
        let now = now_ms();
        match ev.change {
            Change::CoolDown { ms } => {
                self.cool(&e, now, ms.min(MAX_RETRY_AFTER.as_millis() as u64))
            }
            Change::Open { ms } => {
                let until = now.saturating_add(ms.min(3_600_000));
                e.probe_at.store(0, Ordering::Relaxed);
                if e.open_until.swap(until, Ordering::AcqRel) == 0 {
                    self.opened(&e);
                }
            }
            Change::Closed => {
                e.consecutive.store(0, Ordering::Relaxed);
                if e.open_until.swap(0, Ordering::AcqRel) != 0 {
                    self.closed(&e);
                }
            }
            Change::Invalid => {
                if e.invalid_at.swap(now, Ordering::Relaxed) == 0 {
                    self.0.invalid.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// The owner put the key back into use (edited or verified it): forget it was invalid.
    pub fn key_restored(&self, key_id: &str) {
        let map = self
            .0
            .entries
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for e in map.values().filter(|e| e.key_id == key_id) {
            if e.invalid_at.swap(0, Ordering::Relaxed) != 0 {
                self.0.invalid.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    /// Every tracked pair, by provider, upstream model, key.
    pub fn report(&self) -> Vec<PairReport> {
        let now = now_ms();
        let entries: Vec<Arc<Entry>> = self
            .0
            .entries
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        let mut out: Vec<PairReport> = entries
            .iter()
            .map(|e| {
                let (requests, failures, p50) = lock(&e.window).report(now);
                PairReport {
                    provider: e.provider.clone(),
                    upstream_model: e.upstream_model.clone(),
                    key_id: e.key_id.clone(),
                    key: e.key_masked.clone(),
                    state: state_of(e, now),
                    requests,
                    failures,
                    consecutive_failures: e.consecutive.load(Ordering::Relaxed),
                    breaker_opens: e.opens.load(Ordering::Relaxed),
                    p50_latency_ms: p50,
                }
            })
            .collect();
        out.sort_by(|a, b| {
            (&a.provider, &a.upstream_model, &a.key_id).cmp(&(
                &b.provider,
                &b.upstream_model,
                &b.key_id,
            ))
        });
        out
    }
}

fn state_of(e: &Entry, now: u64) -> State {
    if e.invalid_at.load(Ordering::Relaxed) != 0 {
        State::Invalid
    } else if e.open_until.load(Ordering::Relaxed) != 0 {
        State::Open
    } else if now < e.cool_until.load(Ordering::Relaxed) {
        State::CoolingDown
    } else {
        State::Healthy
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: PairRef<'static> = PairRef {
        provider: "p",
        upstream_model: "m",
        key_id: "k",
    };

    #[test]
    fn breaker_opens_after_threshold_and_a_probe_closes_it() {
        let h = Health::new(3, Duration::from_millis(50));
        assert!(h.all_healthy(now_ms()));
        let fail = |h: &Health| h.record(P, "sk…", Outcome::Failed, Duration::ZERO);
        assert_eq!(fail(&h), State::Healthy);
        assert_eq!(fail(&h), State::Healthy);
        assert_eq!(fail(&h), State::Open);
        assert!(!h.all_healthy(now_ms()));
        assert!(matches!(h.usable(P, 0, now_ms()), Usable::No(_)));
        // After the cool-down: half-open, one probe only.
        std::thread::sleep(Duration::from_millis(60));
        let later = now_ms();
        assert_eq!(h.usable(P, 0, later), Usable::Probe);
        assert!(h.claim_probe(P, later));
        assert!(!h.claim_probe(P, later));
        assert!(matches!(h.usable(P, 0, later), Usable::No(_)));
        // The probe fails: open again, for another cool-down.
        assert_eq!(fail(&h), State::Open);
        assert!(matches!(h.usable(P, 0, now_ms()), Usable::No(_)));
        std::thread::sleep(Duration::from_millis(60));
        assert!(h.claim_probe(P, now_ms()));
        assert_eq!(
            h.record(P, "sk…", Outcome::Ok, Duration::from_millis(5)),
            State::Healthy
        );
        assert!(h.all_healthy(now_ms()));
        assert_eq!(h.usable(P, 0, now_ms()), Usable::Yes);
    }

    #[test]
    fn open_breaker_is_not_usable_until_its_cooldown() {
        let h = Health::new(1, Duration::from_secs(30));
        h.record(P, "", Outcome::Failed, Duration::ZERO);
        let now = now_ms();
        assert!(matches!(h.usable(P, 0, now), Usable::No(t) if t >= now + 29_000));
        assert!(matches!(h.usable(P, 0, now + 30_001), Usable::Probe));
    }

    #[test]
    fn rate_limit_cools_down_for_retry_after_else_exponentially() {
        let h = Health::new(5, Duration::from_secs(30));
        let now = now_ms();
        h.record(
            P,
            "",
            Outcome::RateLimited(Some(Duration::from_secs(7))),
            Duration::ZERO,
        );
        match h.usable(P, 0, now) {
            Usable::No(t) => assert!((now + 6_000..=now + 8_000).contains(&t), "{t} {now}"),
            u => panic!("{u:?}"),
        }
        let q = PairRef { key_id: "q", ..P };
        let mut last = 0;
        for expect_s in [1u64, 2, 4, 8, 16, 32, 60, 60] {
            let t0 = now_ms();
            h.record(q, "", Outcome::RateLimited(None), Duration::ZERO);
            let Usable::No(t) = h.usable(q, 0, t0) else {
                panic!()
            };
            let d = t - t0;
            assert!(
                d >= expect_s * 1000 && d <= expect_s * 1000 + 500,
                "{d} vs {expect_s}"
            );
            assert!(t >= last);
            last = t;
        }
        // A hostile retry-after is capped.
        let r = PairRef { key_id: "r", ..P };
        h.record(
            r,
            "",
            Outcome::RateLimited(Some(Duration::from_secs(u32::MAX as u64))),
            Duration::ZERO,
        );
        let Usable::No(t) = h.usable(r, 0, now) else {
            panic!()
        };
        assert!(t <= now_ms() + 3_600_000);
    }

    #[test]
    fn invalid_key_stays_out_until_its_pool_is_reloaded() {
        let h = Health::new(5, Duration::from_secs(30));
        let before = now_ms();
        h.record(P, "", Outcome::Refused, Duration::ZERO);
        assert_eq!(h.usable(P, before, now_ms()), Usable::No(u64::MAX));
        assert!(!h.all_healthy(now_ms()));
        // A pool read after the key was marked (its owner edited it) uses it again.
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(h.usable(P, now_ms(), now_ms()), Usable::Yes);
        h.key_restored("k");
        assert!(h.all_healthy(now_ms()));
    }

    #[test]
    fn remote_changes_apply() {
        let h = Health::new(5, Duration::from_secs(30));
        h.publish_changes();
        h.record(P, "", Outcome::Refused, Duration::ZERO);
        let events = h.drain();
        assert_eq!(events.len(), 1);
        let other = Health::new(5, Duration::from_secs(30));
        let json = serde_json::to_string(&events[0]).unwrap();
        other.apply_remote(&serde_json::from_str(&json).unwrap());
        assert_eq!(other.usable(P, 0, now_ms()), Usable::No(u64::MAX));
        other.apply_remote(&HealthEvent {
            provider: "p".into(),
            upstream_model: "m".into(),
            key_id: "z".into(),
            change: Change::Open { ms: 10_000 },
        });
        assert!(matches!(
            other.usable(PairRef { key_id: "z", ..P }, 0, now_ms()),
            Usable::No(_)
        ));
    }

    #[test]
    fn report_counts_and_p50() {
        let h = Health::new(5, Duration::from_secs(30));
        for ms in [10, 20, 30] {
            h.record(P, "sk-ab…wxyz", Outcome::Ok, Duration::from_millis(ms));
        }
        h.record(P, "sk-ab…wxyz", Outcome::Failed, Duration::ZERO);
        let r = h.report();
        assert_eq!(r.len(), 1);
        assert_eq!((r[0].requests, r[0].failures), (4, 1));
        assert_eq!(r[0].p50_latency_ms, Some(20));
        assert_eq!(r[0].key, "sk-ab…wxyz");
    }
}
