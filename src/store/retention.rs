//! Usage retention: with `usage.retention_days > 0`, `serve` deletes older usage records once at
//! start and then daily, in bounded batches, from one tracked task that shutdown stops.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chrono::Utc;
use sea_orm::DatabaseConnection;
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

/// Starts the pruner, or nothing when retention is off (`retention_days == 0`).
pub fn start(db: DatabaseConnection, retention_days: u32) -> Option<Pruner> {
    if retention_days == 0 {
        return None;
    }
    let stop = Arc::new(Notify::new());
    let stopping = Arc::new(AtomicBool::new(false));
    let handle = tokio::spawn(run(db, retention_days, stop.clone(), stopping.clone()));
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
            tracing::error!(error = %e, "usage retention task failed");
        }
    }
}

async fn run(
    db: DatabaseConnection,
    retention_days: u32,
    stop: Arc<Notify>,
    stopping: Arc<AtomicBool>,
) {
    loop {
        let cutoff = Utc::now() - chrono::Duration::days(i64::from(retention_days));
        let mut deleted = 0u64;
        while !stopping.load(Ordering::SeqCst) {
            match prune_batch(&db, cutoff, PRUNE_BATCH).await {
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
        tokio::select! {
            _ = stop.notified() => return,
            _ = tokio::time::sleep(INTERVAL) => {}
        }
        if stopping.load(Ordering::SeqCst) {
            return;
        }
    }
}
