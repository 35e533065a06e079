//! Retention: with `usage.retention_days > 0`, `serve` deletes older usage records, and with
//! `storage.retention_days > 0` older stored responses, stored chat completions and conversation
//! items — once at start and then daily, in bounded batches, from one tracked task that shutdown
//! stops.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, DatabaseConnection};
use tokio::sync::Notify;

use super::usage::{PRUNE_BATCH, prune_batch};

/// How often the pruner runs.
pub const INTERVAL: Duration = Duration::from_secs(24 * 60 * 60);

/// The running pruner.
pub struct Pruner {
    stop: Arc<Notify>,
    stopping: Arc<AtomicBool>,
    handle: tokio::task::JoinHandle<()>,
}

/// Starts the pruner, or nothing when both retentions are off (0 days).
pub fn start(db: DatabaseConnection, usage_days: u32, storage_days: u32) -> Option<Pruner> {
    if usage_days == 0 && storage_days == 0 {
        return None;
    }
    let stop = Arc::new(Notify::new());
    let stopping = Arc::new(AtomicBool::new(false));
    let handle = tokio::spawn(run(
        db,
        usage_days,
        storage_days,
        stop.clone(),
        stopping.clone(),
    ));
    Some(Pruner {
        stop,
        stopping,
        handle,
    })
}

impl Pruner {
    /// Stops between two batches and waits for the task.
    pub async fn shutdown(self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.stop.notify_one();
        if let Err(e) = self.handle.await {
            tracing::error!(error = %e, "retention task failed");
        }
    }
}

/// Deletes up to `limit` stored objects created before `cutoff` of each kind (responses,
/// completions, conversation items); returns how many in all, and whether any kind had `limit`
/// (so there may be more).
pub async fn prune_stored_batch(
    db: &impl ConnectionTrait,
    cutoff: DateTime<Utc>,
    limit: u64,
) -> Result<(u64, bool), sea_orm::DbErr> {
    let r = super::responses::prune_batch(db, cutoff, limit).await?;
    let c = super::completions::prune_batch(db, cutoff, limit).await?;
    let i = super::conversations::prune_items_batch(db, cutoff, limit).await?;
    Ok((r + c + i, r == limit || c == limit || i == limit))
}

/// Deletes every stored response, completion and conversation item created before `cutoff`.
pub async fn prune_stored(
    db: &impl ConnectionTrait,
    cutoff: DateTime<Utc>,
) -> Result<u64, sea_orm::DbErr> {
    let mut total = 0;
    loop {
        let (n, more) = prune_stored_batch(db, cutoff, PRUNE_BATCH).await?;
        total += n;
        if !more {
            return Ok(total);
        }
    }
}

async fn run(
    db: DatabaseConnection,
    usage_days: u32,
    storage_days: u32,
    stop: Arc<Notify>,
    stopping: Arc<AtomicBool>,
) {
    loop {
        if usage_days > 0 {
            prune_usage(&db, usage_days, &stopping).await;
        }
        if storage_days > 0 {
            prune_storage(&db, storage_days, &stopping).await;
        }
        tokio::select! {
            _ = stop.notified() => return,
            _ = tokio::time::sleep(INTERVAL) => {}
        }
        if stopping.load(Ordering::SeqCst) {
            return;
        }
    }
}

async fn prune_usage(db: &DatabaseConnection, retention_days: u32, stopping: &AtomicBool) {
    let cutoff = Utc::now() - chrono::Duration::days(i64::from(retention_days));
    let mut deleted = 0u64;
    while !stopping.load(Ordering::SeqCst) {
        match prune_batch(db, cutoff, PRUNE_BATCH).await {
            Ok(n) => {
                deleted += n;
                if n < PRUNE_BATCH {
                    break;
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "usage retention: deleting old usage records failed; retrying at the next run");
                break;
            }
        }
        // Let the usage writer and the requests in between batches.
        tokio::task::yield_now().await;
    }
    if deleted > 0 {
        tracing::info!(
            deleted,
            retention_days,
            %cutoff,
            "usage retention: deleted old usage records"
        );
    }
}

async fn prune_storage(db: &DatabaseConnection, retention_days: u32, stopping: &AtomicBool) {
    let cutoff = Utc::now() - chrono::Duration::days(i64::from(retention_days));
    let mut deleted = 0u64;
    while !stopping.load(Ordering::SeqCst) {
        match prune_stored_batch(db, cutoff, PRUNE_BATCH).await {
            Ok((n, more)) => {
                deleted += n;
                if !more {
                    break;
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "storage retention: deleting old stored objects failed; retrying at the next run");
                break;
            }
        }
        tokio::task::yield_now().await;
    }
    if deleted > 0 {
        tracing::info!(
            deleted,
            retention_days,
            %cutoff,
            "storage retention: deleted old stored responses, completions and conversation items"
        );
    }
}
