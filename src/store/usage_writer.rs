//! The usage writer: one task that turns [`UsageEvent`]s into usage records in batches (by size or
//! every `usage.flush_interval_ms`), and adds each key's spend. Requests never wait on an insert.
//!
//! A failed batch is retried with back-off until it lands (counted in
//! `tollgate_usage_write_errors_total`); meanwhile the bounded queue fills and admission waits for
//! a slot — records are never dropped. `shutdown` closes the queue, waits for every outstanding
//! slot (requests still streaming hold one), and flushes.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use entity::{gateway_keys, usage_records, users};
use sea_orm::sea_query::{Expr, ExprTrait, Query};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseConnection, DbBackend, EntityTrait, QueryFilter,
    Statement, TransactionTrait, Value,
};
use tokio::sync::{Notify, mpsc};

use crate::proxy::estimate;
use crate::proxy::meter::{Reservation, UsageEvent, cost_nanos};
use crate::proxy::reserve::{Holder, Leases};
use crate::store::ledger;
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
}

/// The most rows one INSERT statement carries (18 parameters each, well under every driver's
/// limit); see [`write_batch`].
const MAX_ROWS_PER_INSERT: usize = 256;

/// How long a reservation lease may sit unused before its spare goes back to the database.
const LEASE_IDLE: Duration = Duration::from_secs(1);

pub fn start(
    db: DatabaseConnection,
    metrics: Metrics,
    leases: Leases,
    cfg: WriterConfig,
) -> (UsageQueue, UsageWriter) {
    let (tx, rx) = mpsc::channel(cfg.capacity.max(1));
    let stop = Arc::new(Notify::new());
    let handle = tokio::spawn(run(db, metrics, leases, cfg, rx, stop.clone()));
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
    cfg: WriterConfig,
    mut rx: mpsc::Receiver<UsageEvent>,
    stop: Arc<Notify>,
) {
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
        write_with_retry(&db, &metrics, &rows).await;
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
    }
    leases.give_back(&db, Duration::ZERO).await;
    metrics.usage_queue_depth.set(0);
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

async fn write_with_retry(db: &DatabaseConnection, metrics: &Metrics, rows: &[Settled]) {
    if rows.is_empty() {
        return;
    }
    let mut backoff = Duration::from_millis(100);
    loop {
        match write_batch(db, rows).await {
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

/// The columns of a usage record, in the order [`record_values`] gives them.
const RECORD_COLUMNS: [usage_records::Column; 18] = {
    use usage_records::Column as C;
    [
        C::At,
        C::UserId,
        C::KeyId,
        C::Model,
        C::Provider,
        C::Endpoint,
        C::Stream,
        C::Status,
        C::PromptTokens,
        C::CompletionTokens,
        C::CachedTokens,
        C::CostNanos,
        C::LatencyMs,
        C::TtftMs,
        C::TokensEstimated,
        C::RequestId,
        C::SharedKey,
        C::Error,
    ]
};

/// One record's values, in [`RECORD_COLUMNS`] order (the same conversions its `ActiveModel` uses).
fn record_values(r: &Settled, out: &mut Vec<Value>) {
    let e = &r.event;
    out.extend([
        e.at.into(),
        e.user_id.clone().into(),
        e.key_id.clone().into(),
        e.model.clone().into(),
        e.provider.clone().into(),
        e.endpoint.as_str().into(),
        e.stream.into(),
        (e.status as i32).into(),
        e.usage.prompt.into(),
        e.usage.completion.into(),
        e.usage.cached.into(),
        r.cost_nanos.into(),
        e.latency_ms.into(),
        e.ttft_ms.into(),
        r.tokens_estimated.into(),
        // At most 128 characters; the usual id is shorter in bytes and is copied as is.
        if e.request_id.len() <= 128 {
            e.request_id.clone().into()
        } else {
            e.request_id.chars().take(128).collect::<String>().into()
        },
        e.shared_key.into(),
        e.error.clone().into(),
    ]);
}

/// The text of an INSERT of 2^`exp` usage records (`exp` ≤ log2 [`MAX_ROWS_PER_INSERT`]),
/// rendered by sea-query once per backend and size and kept: building the statement through
/// `ActiveModel`s and `insert_many` for every batch cost more than the insert itself.
fn insert_sql(backend: DbBackend, exp: u32) -> String {
    const SIZES: usize = MAX_ROWS_PER_INSERT.ilog2() as usize + 1;
    static CACHE: [[OnceLock<String>; SIZES]; 3] =
        [const { [const { OnceLock::new() }; SIZES] }; 3];
    let per_backend = match backend {
        DbBackend::Sqlite => &CACHE[0],
        DbBackend::Postgres => &CACHE[1],
        _ => &CACHE[2],
    };
    per_backend[exp as usize]
        .get_or_init(|| {
            let mut q = Query::insert();
            q.into_table(usage_records::Entity).columns(RECORD_COLUMNS);
            for _ in 0..1usize << exp {
                q.values_panic(RECORD_COLUMNS.map(|_| Expr::val(0)));
            }
            backend.build(&q).sql
        })
        .clone()
}

/// One transaction: the records, each key's spend and last use, and each charged user's balance
/// (one `usage` ledger entry per user per batch), releasing what admission reserved.
pub async fn write_batch(db: &DatabaseConnection, rows: &[Settled]) -> Result<(), sea_orm::DbErr> {
    let txn = db.begin().await?;
    // Rows go in as statements of 256, 128, …, 1 rows: a batch of any size then uses at most nine
    // distinct statements, which the driver's prepared-statement cache keeps. One statement per
    // batch size made every size a new cached statement (each large), and memory grew with load.
    let backend = txn.get_database_backend();
    let mut rest = rows;
    while !rest.is_empty() {
        let exp = rest.len().min(MAX_ROWS_PER_INSERT).ilog2();
        let n = 1usize << exp;
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        let mut values = Vec::with_capacity(n * RECORD_COLUMNS.len());
        chunk.iter().for_each(|r| record_values(r, &mut values));
        txn.execute_raw(Statement::from_sql_and_values(
            backend,
            insert_sql(backend, exp),
            values,
        ))
        .await?;
    }

    let mut per_key: HashMap<&str, (i64, i64, DateTime<Utc>)> = HashMap::new();
    for r in rows {
        let e = &r.event;
        let entry = per_key.entry(e.key_id.as_str()).or_insert((0, 0, e.at));
        entry.0 += r.cost_nanos;
        entry.1 += r.consumed().key_nanos;
        entry.2 = std::cmp::max(entry.2, e.at);
    }
    // Users: debit what charged requests cost; that much leaves the reservation too.
    let mut per_user: HashMap<&str, (i64, i64, usize)> = HashMap::new();
    for r in rows {
        let e = &r.event;
        if e.charged || e.reservation.user_nanos != 0 {
            let entry = per_user.entry(e.user_id.as_str()).or_insert((0, 0, 0));
            if e.charged {
                entry.0 += r.cost_nanos;
                entry.2 += 1;
            }
            entry.1 += r.consumed().user_nanos;
        }
    }
    for (user_id, (cost, released, n)) in per_user {
        if released != 0 {
            users::Entity::update_many()
                .col_expr(
                    users::Column::ReservedNanos,
                    Expr::col(users::Column::ReservedNanos).sub(released),
                )
                .filter(users::Column::Id.eq(user_id))
                .exec(&txn)
                .await?;
        }
        if cost != 0 {
            let note = format!("{n} request{}", if n == 1 { "" } else { "s" });
            match ledger::apply(
                &txn,
                ledger::Change {
                    user_id,
                    amount_nanos: -cost,
                    kind: ledger::Kind::Usage,
                    note: Some(&note),
                    actor_id: None,
                    refuse_negative: false,
                },
            )
            .await
            {
                Ok(_) => {}
                // Users are never deleted (only disabled); should one vanish, the record still lands.
                Err(ledger::LedgerError::UserNotFound) => {
                    tracing::error!(user_id, "usage charged to a user that does not exist");
                }
                Err(ledger::LedgerError::Db(db)) => return Err(db),
                Err(other) => return Err(sea_orm::DbErr::Custom(other.to_string())),
            }
        }
    }
    for (key_id, (spent, released, last)) in per_key {
        gateway_keys::Entity::update_many()
            .col_expr(
                gateway_keys::Column::SpentNanos,
                Expr::col(gateway_keys::Column::SpentNanos).add(spent),
            )
            .col_expr(
                gateway_keys::Column::ReservedNanos,
                Expr::col(gateway_keys::Column::ReservedNanos).sub(released),
            )
            .col_expr(gateway_keys::Column::LastUsedAt, Expr::value(last))
            .filter(gateway_keys::Column::Id.eq(key_id))
            .exec(&txn)
            .await?;
    }
    txn.commit().await
}
