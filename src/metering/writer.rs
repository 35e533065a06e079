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

use crate::metering::estimate;
use crate::metering::event::{Reservation, UsageEvent, cost_nanos};
use crate::metering::leases::{Holder, Leases};
use crate::metering::spool::Spool;
use crate::store::usage_batch::write_batch;
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
        let rows = prepare(std::mem::take(&mut batch)).await;
        // The finished lines first: a kill from here until the commit replays them at start.
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
    pub tokens_estimated: bool,
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
}

/// Counts tokens where the upstream did not (on the blocking pool) and prices every event.
async fn prepare(batch: Vec<UsageEvent>) -> Vec<Settled> {
    let needs_counting = batch.iter().any(|e| e.estimate.is_some());
    let settle = |mut e: UsageEvent| {
        let tokens_estimated = match e.estimate.take() {
            Some(input) => {
                e.usage = estimate::estimate(e.endpoint, &input.request, &input.response);
                true
            }
            None => false,
        };
        Settled {
            cost_nanos: cost_nanos(e.usage, e.prices),
            event: e,
            tokens_estimated,
        }
    };
    if needs_counting {
        tokio::task::spawn_blocking(move || batch.into_iter().map(settle).collect())
            .await
            .unwrap_or_default()
    } else {
        batch.into_iter().map(settle).collect()
    }
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
        match write_batch(db, replica, rows).await {
            Ok(()) => {
                metrics
                    .usage_records_written_total
                    .inc_by(rows.len() as u64);
                // Summed per model and provider first: four label lookups per batch and model
                // rather than per record.
                let mut sums: HashMap<(&str, &str), (u64, u64, u64, i64)> = HashMap::new();
                for r in rows {
                    let e = &r.event;
                    let s = sums
                        .entry((e.model.as_str(), e.provider.as_str()))
                        .or_default();
                    // Saturating: the counts come from the upstream's answer.
                    let count = |n: i64| Ord::max(n, 0) as u64;
                    s.0 = s.0.saturating_add(count(e.usage.prompt));
                    s.1 = s.1.saturating_add(count(e.usage.completion));
                    s.2 = s.2.saturating_add(count(e.usage.cached));
                    s.3 = s.3.saturating_add(r.cost_nanos);
                }
                for ((model, provider), (prompt, completion, cached, cost)) in sums {
                    let tokens = |kind| {
                        metrics
                            .tokens_total
                            .with_label_values(&[model, provider, kind])
                    };
                    tokens("prompt").inc_by(prompt);
                    tokens("completion").inc_by(completion);
                    tokens("cached").inc_by(cached);
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
