//! The usage writer: one task that turns [`UsageEvent`]s into usage records in batches (by size or
//! every `usage.flush_interval_ms`), and adds each key's spend. Requests never wait on an insert.
//!
//! A failed batch is retried with back-off until it lands (counted in
//! `tollgate_usage_write_errors_total`); meanwhile the bounded queue fills and admission waits for
//! a slot — records are never dropped. `shutdown` closes the queue, waits for every outstanding
//! slot (requests still streaming hold one), and flushes.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use sea_orm::DatabaseConnection;
use tokio::sync::{Notify, mpsc};

use crate::metering::event::{Reservation, UsageEvent};
use crate::metering::leases::{Holder, Leases};
use crate::metering::spool::Spool;
use crate::store::usage_batch::{KeyCharge, RecordRow, UserCharge, write_batch};
use crate::telemetry::Metrics;

/// The sending side, held in `AppState`.
#[derive(Clone)]
pub struct UsageQueue {
    tx: mpsc::Sender<UsageEvent>,
}

impl UsageQueue {
    /// Reserves one slot; waits while the queue is full (back-pressure) up to `wait`.
    pub async fn reserve(&self, wait: Duration) -> Option<mpsc::OwnedPermit<UsageEvent>> {
        match tokio::time::timeout(wait, self.tx.clone().reserve_owned()).await {
            Ok(Ok(p)) => Some(p),
            _ => None,
        }
    }

    /// Events queued or slots reserved but not yet sent.
    pub fn depth(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }
}

/// Owns the writer task.
pub struct UsageWriter {
    stop: Arc<Notify>,
    handle: tokio::task::JoinHandle<()>,
}

#[derive(Debug, Clone, Copy)]
pub struct WriterConfig {
    pub capacity: usize,
    pub batch_size: usize,
    pub flush_interval: Duration,
    /// `billing.lease_ttl_secs`: leases of a replica silent this long are reclaimed.
    pub lease_ttl: Duration,
}

/// How long a reservation lease may sit unused before its spare goes back to the database.
const LEASE_IDLE: Duration = Duration::from_secs(1);

pub fn start(
    db: DatabaseConnection,
    metrics: Metrics,
    leases: Leases,
    spool: Arc<Spool>,
    cfg: WriterConfig,
) -> (UsageQueue, UsageWriter) {
    let (tx, rx) = mpsc::channel(cfg.capacity.max(1));
    let stop = Arc::new(Notify::new());
    let handle = tokio::spawn(run(db, metrics, leases, spool, cfg, rx, stop.clone()));
    (UsageQueue { tx }, UsageWriter { stop, handle })
}

impl UsageWriter {
    /// Closes the queue and returns once every reserved slot was used, every record written and
    /// every reservation lease given back, or after `limit`.
    pub async fn shutdown(self, limit: Duration) {
        self.stop.notify_one();
        let mut handle = self.handle;
        if tokio::time::timeout(limit, &mut handle).await.is_err() {
            tracing::error!(
                "usage writer did not finish within {limit:?}; some records may be lost"
            );
            handle.abort();
        }
    }
}

async fn run(
    db: DatabaseConnection,
    metrics: Metrics,
    leases: Leases,
    spool: Arc<Spool>,
    cfg: WriterConfig,
    mut rx: mpsc::Receiver<UsageEvent>,
    stop: Arc<Notify>,
) {
    // The leases' heartbeat runs on its own, so a batch retrying against a slow database does
    // not make other replicas take this one for dead.
    let heartbeat = AbortOnDrop(tokio::spawn({
        let (db, leases) = (db.clone(), leases.clone());
        async move {
            let mut tick = tokio::time::interval(LEASE_IDLE);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                leases.heartbeat(&db, cfg.lease_ttl).await;
            }
        }
    }));
    let mut stopping = false;
    let mut batch: Vec<UsageEvent> = Vec::with_capacity(cfg.batch_size);
    let mut tick = tokio::time::interval(LEASE_IDLE);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // Wait for the first event of a batch (or the stop signal); give back idle leases meanwhile.
        let first = if stopping {
            rx.recv().await
        } else {
            tokio::select! {
                ev = rx.recv() => ev,
                _ = tick.tick() => {
                    leases.give_back(&db, LEASE_IDLE).await;
                    spool.maintain();
                    continue;
                }
                _ = stop.notified() => {
                    stopping = true;
                    rx.close();
                    continue;
                }
            }
        };
        let Some(first) = first else { break };
        batch.push(first);
        // Let the batch gather for `flush_interval` — the writer sleeps rather than waking for
        // every event — unless a full batch is already waiting or the writer is stopping.
        if !stopping && rx.len() + 1 < cfg.batch_size {
            tokio::select! {
                _ = tokio::time::sleep(cfg.flush_interval) => {}
                _ = stop.notified() => {
                    stopping = true;
                    rx.close();
                }
            }
        }
        while batch.len() < cfg.batch_size {
            match rx.try_recv() {
                Ok(ev) => batch.push(ev),
                Err(_) => break,
            }
        }
        metrics.usage_queue_depth.set(rx.len() as i64);
        let rows = prepare(std::mem::take(&mut batch));
        // The finished records first: a kill from here until the commit replays them at start.
        if let Err(e) = spool.finished(&rows) {
            metrics.usage_spool_errors_total.inc();
            tracing::error!(error = %e, "usage spool: cannot append a batch");
        }
        write_with_retry(&db, &metrics, leases.replica(), &rows).await;
        spool.committed(&rows);
        // Only now is the debit in the database: the rest of each reservation is spare again.
        for r in &rows {
            let (e, used) = (&r.event, r.consumed());
            leases.settle(
                Holder::User,
                &e.user_id,
                e.reservation.user_nanos,
                used.user_nanos,
            );
            leases.settle(
                Holder::Key,
                &e.key_id,
                e.reservation.key_nanos,
                used.key_nanos,
            );
        }
        spool.maintain();
    }
    leases.give_back(&db, Duration::ZERO).await;
    drop(heartbeat);
    spool.close();
    metrics.usage_queue_depth.set(0);
}

/// Aborts the task when dropped (also when the writer itself is aborted).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A usage record ready to insert, with its settled cost.
pub struct Settled {
    pub event: UsageEvent,
    pub cost_nanos: i64,
}

impl Settled {
    /// What leaves the reservations: the cost, up to what was reserved (a request that cost more
    /// than its maximum is still debited in full, but holds no more in reservation than it took).
    pub fn consumed(&self) -> Reservation {
        let r = self.event.reservation;
        Reservation {
            user_nanos: Ord::clamp(self.cost_nanos, 0, Ord::max(r.user_nanos, 0)),
            key_nanos: Ord::clamp(self.cost_nanos, 0, Ord::max(r.key_nanos, 0)),
        }
    }

    /// The record's row.
    pub fn record(&self) -> RecordRow<'_> {
        let e = &self.event;
        RecordRow {
            at: e.at,
            user_id: &e.user_id,
            key_id: &e.key_id,
            model: &e.model,
            provider: &e.provider,
            endpoint: e.endpoint.as_str(),
            stream: e.stream,
            status: e.status,
            prompt_tokens: e.usage.prompt,
            completion_tokens: e.usage.completion,
            cached_tokens: e.usage.cached,
            cache_write_tokens: e.usage.cache_write,
            reasoning_tokens: e.usage.reasoning,
            cost_nanos: self.cost_nanos,
            latency_ms: e.latency_ms,
            ttft_ms: e.ttft_ms,
            tokens_estimated: e.tokens_estimated,
            request_id: &e.request_id,
            shared_key: e.shared_key,
            error: e.error.as_deref(),
            event_id: e.ticket.id.to_string(),
            response_id: e.response_id.as_deref(),
            conversation_id: e.conversation_id.as_deref(),
            // A cache hit made no upstream attempt; any other record at least one.
            attempts: if e.routed.cache_hit {
                0
            } else {
                e.routed.attempts.max(1)
            },
            fallback_from: e.routed.fallback_from.as_deref(),
            cache_hit: e.routed.cache_hit,
        }
    }
}

/// Prices every event (the meter already bounded and, where needed, estimated its tokens): its
/// tokens plus its non-token cost ([`UsageEvent::cost_nanos`]).
fn prepare(batch: Vec<UsageEvent>) -> Vec<Settled> {
    batch
        .into_iter()
        .map(|e| Settled {
            cost_nanos: e.cost_nanos(),
            event: e,
        })
        .collect()
}

/// What a batch adds to each key and takes from each user, summed saturating: each amount is
/// ≥ 0 and at most `i64::MAX`, whatever the batch holds. Keys and users come in first-seen order.
pub fn charges(rows: &[Settled]) -> (Vec<KeyCharge<'_>>, Vec<UserCharge<'_>>) {
    let mut keys: Vec<KeyCharge<'_>> = Vec::new();
    let mut key_at: HashMap<&str, usize> = HashMap::new();
    let mut users: Vec<UserCharge<'_>> = Vec::new();
    let mut user_at: HashMap<&str, usize> = HashMap::new();
    for r in rows {
        let e = &r.event;
        let cost = r.cost_nanos.max(0);
        let used = r.consumed();
        let i = *key_at.entry(e.key_id.as_str()).or_insert_with(|| {
            keys.push(KeyCharge {
                key_id: &e.key_id,
                spent: 0,
                released: 0,
                last_used: e.at,
            });
            keys.len() - 1
        });
        let k = &mut keys[i];
        k.spent = k.spent.saturating_add(cost);
        k.released = k.released.saturating_add(used.key_nanos);
        k.last_used = k.last_used.max(e.at);
        // Users: debit what charged requests cost; that much leaves the reservation too.
        if e.charged || e.reservation.user_nanos != 0 {
            let i = *user_at.entry(e.user_id.as_str()).or_insert_with(|| {
                users.push(UserCharge {
                    user_id: &e.user_id,
                    cost: 0,
                    released: 0,
                    requests: 0,
                });
                users.len() - 1
            });
            let u = &mut users[i];
            if e.charged {
                u.cost = u.cost.saturating_add(cost);
                u.requests += 1;
            }
            u.released = u.released.saturating_add(used.user_nanos);
        }
    }
    (keys, users)
}

/// One batch in one transaction: its records and what it adds to each key and takes from each
/// user, settled against `replica`'s leases.
pub async fn write_settled(
    db: &DatabaseConnection,
    replica: &str,
    rows: &[Settled],
) -> Result<(), sea_orm::DbErr> {
    let records: Vec<RecordRow<'_>> = rows.iter().map(Settled::record).collect();
    let (keys, users) = charges(rows);
    write_batch(db, replica, &records, &keys, &users).await
}

async fn write_with_retry(
    db: &DatabaseConnection,
    metrics: &Metrics,
    replica: &str,
    rows: &[Settled],
) {
    if rows.is_empty() {
        return;
    }
    let mut backoff = Duration::from_millis(100);
    loop {
        match write_settled(db, replica, rows).await {
            Ok(()) => {
                metrics
                    .usage_records_written_total
                    .inc_by(rows.len() as u64);
                // Summed per model and provider first: four label lookups per batch and model
                // rather than per record.
                let mut sums: HashMap<(&str, &str), ([u64; 5], i64)> = HashMap::new();
                for r in rows {
                    let e = &r.event;
                    let s = sums
                        .entry((e.model.as_str(), e.provider.as_str()))
                        .or_default();
                    // Saturating: the counts come from the upstream's answer.
                    let u = e.usage;
                    let counts = [u.prompt, u.completion, u.cached, u.cache_write, u.reasoning];
                    for (sum, n) in s.0.iter_mut().zip(counts) {
                        *sum = sum.saturating_add(Ord::max(n, 0) as u64);
                    }
                    s.1 = s.1.saturating_add(r.cost_nanos);
                }
                for ((model, provider), (counts, cost)) in sums {
                    let tokens = |kind| {
                        metrics
                            .tokens_total
                            .with_label_values(&[model, provider, kind])
                    };
                    let [prompt, completion, cached, cache_write, reasoning] = counts;
                    tokens("prompt").inc_by(prompt);
                    tokens("completion").inc_by(completion);
                    tokens("cached").inc_by(cached);
                    // Only models that have them get these series.
                    if cache_write > 0 {
                        tokens("cache_write").inc_by(cache_write);
                    }
                    if reasoning > 0 {
                        tokens("reasoning").inc_by(reasoning);
                    }
                    metrics
                        .cost_usd_total
                        .with_label_values(&[model, provider])
                        .inc_by(cost as f64 / 1e9);
                }
                return;
            }
            Err(err) => {
                metrics.usage_write_errors_total.inc();
                tracing::error!(error = %err, records = rows.len(), retry_in_ms = backoff.as_millis() as u64, "usage batch write failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use chrono::{TimeZone, Utc};
    use proptest::prelude::*;

    use super::*;
    use crate::metering::event::{Prices, TokenBounds, bounds, clamp, cost_nanos};
    use crate::providers::{Endpoint, Usage};

    fn event(
        key: u8,
        user: u8,
        usage: Usage,
        prices: Prices,
        r: (i64, i64),
        charged: bool,
    ) -> UsageEvent {
        UsageEvent {
            at: Utc
                .timestamp_opt(1_700_000_000 + i64::from(key), 0)
                .unwrap(),
            user_id: format!("u{user}"),
            key_id: format!("k{key}"),
            model: "m".into(),
            provider: "p".into(),
            endpoint: Endpoint::ChatCompletions,
            stream: false,
            status: 200,
            usage,
            prices,
            latency_ms: 1,
            ttft_ms: None,
            tokens_estimated: false,
            request_id: "r".into(),
            shared_key: false,
            error: None,
            extra_cost_nanos: 0,
            response_id: None,
            conversation_id: None,
            routed: Default::default(),
            reservation: Reservation {
                user_nanos: r.0,
                key_nanos: r.1,
            },
            charged,
            ticket: crate::metering::spool::Ticket::new(),
        }
    }

    fn arb_event() -> impl Strategy<Value = UsageEvent> {
        (
            0u8..3,
            0u8..3,
            (any::<i64>(), any::<i64>(), any::<i64>()),
            (
                0i64..=i64::MAX,
                0i64..=i64::MAX,
                proptest::option::of(0i64..=i64::MAX),
            ),
            (0i64..=i64::MAX, 0i64..=i64::MAX),
            any::<bool>(),
        )
            .prop_map(|(k, u, (p, c, ca), (i, o, cached), r, charged)| {
                let usage = Usage {
                    prompt: p,
                    completion: c,
                    cached: ca,
                    ..Default::default()
                };
                let prices = Prices {
                    input: i,
                    output: o,
                    cached_input: cached,
                    ..Default::default()
                };
                event(k, u, usage, prices, r, charged)
            })
    }

    fn sat(xs: impl Iterator<Item = i64>) -> i64 {
        xs.map(i128::from).sum::<i128>().min(i128::from(i64::MAX)) as i64
    }

    proptest! {
        /// Whatever the upstream reported and the catalog charges, a batch's per-key and per-user
        /// amounts are the exact sums, saturated at `i64::MAX`, never negative, never wrapped.
        #[test]
        fn batch_amounts_are_exact_or_saturated(events in proptest::collection::vec(arb_event(), 0..40)) {
            let rows = prepare(events);
            for r in &rows {
                prop_assert!(r.cost_nanos >= 0);
            }
            let (keys, users) = charges(&rows);
            let mut seen_keys = HashMap::new();
            for k in &keys {
                prop_assert!(seen_keys.insert(k.key_id, ()).is_none(), "one entry per key");
                let mine = || rows.iter().filter(|r| r.event.key_id == k.key_id);
                prop_assert_eq!(k.spent, sat(mine().map(|r| r.cost_nanos)));
                prop_assert_eq!(k.released, sat(mine().map(|r| r.consumed().key_nanos)));
                prop_assert_eq!(Some(k.last_used), mine().map(|r| r.event.at).max());
                prop_assert!(k.spent >= 0 && k.released >= 0);
            }
            prop_assert_eq!(keys.len(), rows.iter().map(|r| &r.event.key_id).collect::<std::collections::HashSet<_>>().len());
            for u in &users {
                let mine = || rows.iter().filter(|r| r.event.user_id == u.user_id);
                prop_assert_eq!(u.cost, sat(mine().filter(|r| r.event.charged).map(|r| r.cost_nanos)));
                prop_assert_eq!(u.requests, mine().filter(|r| r.event.charged).count());
                prop_assert_eq!(u.released, sat(mine().map(|r| r.consumed().user_nanos)));
                prop_assert!(u.cost >= 0 && u.released >= 0);
            }
        }

        /// Clamped usage is within its bounds, and costs no more than the bounds at the same
        /// prices (cached tokens at the dearer of the two input prices).
        #[test]
        fn clamped_usage_stays_within_bounds(
            p in any::<i64>(), c in any::<i64>(), ca in any::<i64>(),
            bp in 0i64..=20_000_000, bc in 0i64..=20_000_000,
            i in 0i64..=1_000_000_000_000, o in 0i64..=1_000_000_000_000,
        ) {
            let b = TokenBounds { prompt: bp, completion: bc };
            let (u, _) = clamp(Usage { prompt: p, completion: c, cached: ca, ..Default::default() }, b);
            prop_assert!((0..=bp).contains(&u.prompt));
            prop_assert!((0..=bc).contains(&u.completion));
            prop_assert!((0..=u.prompt).contains(&u.cached));
            let prices = Prices { input: i, output: o, cached_input: Some(i / 2), ..Default::default() };
            let most = cost_nanos(Usage { prompt: bp, completion: bc, cached: 0, ..Default::default() }, prices);
            prop_assert!(cost_nanos(u, prices) <= most);
        }

        /// The bounds never exceed the absolute cap, the window, or (without vision) the body.
        #[test]
        fn bounds_respect_window_body_and_cap(
            body_len in 0usize..100_000_000, max_tokens in proptest::option::of(any::<u64>()),
            choices in 0u64..1000, window in proptest::option::of(any::<i32>()),
            max_out in proptest::option::of(any::<i32>()), vision in any::<bool>(),
        ) {
            let b = bounds(crate::metering::event::RequestSize {
                body_len, max_tokens, choices, context_window: window,
                max_output_tokens: max_out, vision, embeddings: false,
            });
            let cap = crate::metering::event::TOKEN_CAP;
            prop_assert!((0..=cap).contains(&b.prompt) && (0..=cap).contains(&b.completion));
            if let Some(w) = window.filter(|&w| w > 0) {
                prop_assert!(b.prompt <= i64::from(w));
            }
            if !vision {
                prop_assert!(b.prompt <= body_len as i64);
            }
            if let Some(t) = max_tokens {
                prop_assert!(b.completion as u128 <= u128::from(t) * u128::from(choices.max(1)));
            }
        }
    }

    /// The issue's case: two records of 9e15 completion tokens each in one batch.
    #[test]
    fn two_absurd_records_in_one_batch_saturate() {
        let u = Usage {
            prompt: 0,
            completion: 9_000_000_000_000_000,
            cached: 0,
            ..Default::default()
        };
        let p = Prices {
            input: 0,
            output: 10_000_000_000,
            ..Default::default()
        };
        let rows = prepare(vec![
            event(0, 0, u, p, (0, 0), true),
            event(0, 0, u, p, (0, 0), true),
        ]);
        let (keys, users) = charges(&rows);
        assert_eq!(keys[0].spent, i64::MAX);
        assert_eq!(users[0].cost, i64::MAX);
    }
}
