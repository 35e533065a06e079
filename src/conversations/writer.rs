//! Group commit for stored state: the responses (`store: true`, with their conversation items)
//! and stored chat completions the hot path saves after the client has its answer.
//!
//! Saving one on its own costs a transaction and its commit (an fsync on SQLite and PostgreSQL)
//! per request. Here saves queue up while one batch is being written, and the next batch writes
//! all of them in one transaction, each in its own savepoint: one save that fails (a conversation
//! deleted meanwhile, a duplicate id) rolls back alone and the others land. Under a light load a
//! batch is a single save, written at once as before; under a heavy one the commits per second
//! stay bounded by the database while the saves per commit grow.
//!
//! Read-your-writes is unchanged: each save's `pending::Writing` marks are released only when its
//! batch has committed (or failed), so a reader waiting on them sees the committed state.
//!
//! No long-lived task: the first save that finds no batch being written starts one on the
//! shutdown tracker (`AppState::background`), and it ends when the queue is empty — so shutdown
//! waits for every queued save, and nothing needs to be closed.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use sea_orm::{DatabaseConnection, TransactionTrait};
use tokio_util::task::TaskTracker;

use super::pending::Writing;
use super::{StoredCompletion, StoredResponse, save_completion, save_response};

/// Most saves one transaction writes; more wait for the next one. Bounds a transaction's length
/// (a writer lock held on SQLite) and the work one failing commit can send to the slow path.
pub const MAX_BATCH: usize = 128;

/// One thing to keep.
pub enum Save {
    Response(StoredResponse),
    Completion(StoredCompletion),
}

impl Save {
    fn id(&self) -> &str {
        match self {
            Save::Response(r) => &r.id,
            Save::Completion(c) => &c.id,
        }
    }

    fn conversation(&self) -> Option<&str> {
        match self {
            Save::Response(r) => r.conversation_id.as_deref(),
            Save::Completion(_) => None,
        }
    }

    async fn write<C: TransactionTrait>(self, db: &C) -> Result<(), crate::error::ApiError> {
        match self {
            Save::Response(r) => save_response(db, r).await.map(drop),
            Save::Completion(c) => save_completion(db, c).await,
        }
    }
}

/// A save and the read-your-writes marks it releases once written.
struct Job {
    save: Save,
    marks: Vec<Writing>,
}

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    /// A task is writing batches (and will take what is queued before it ends).
    flushing: bool,
}

/// The queue of saves to write, shared by every request of this replica.
#[derive(Clone)]
pub struct StateWriter {
    db: DatabaseConnection,
    tracker: TaskTracker,
    queue: Arc<Mutex<Queue>>,
    /// Batches written since start (a batch of one included).
    batches: Arc<AtomicU64>,
}

impl StateWriter {
    pub fn new(db: DatabaseConnection, tracker: TaskTracker) -> Self {
        Self {
            db,
            tracker,
            queue: Arc::default(),
            batches: Arc::default(),
        }
    }

    /// Queues `save`; `marks` are dropped (their readers woken) once it is written or has failed.
    pub fn submit(&self, save: Save, marks: Vec<Writing>) {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        q.jobs.push_back(Job { save, marks });
        if q.flushing {
            return;
        }
        q.flushing = true;
        drop(q);
        let this = self.clone();
        self.tracker.spawn(async move { this.flush().await });
    }

    /// Saves queued and not yet taken by a batch.
    pub fn queued(&self) -> usize {
        self.queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .jobs
            .len()
    }

    /// Batches written since this replica started.
    pub fn batches(&self) -> u64 {
        self.batches.load(Ordering::Relaxed)
    }

    /// Writes batches until the queue is empty.
    async fn flush(self) {
        loop {
            let batch: Vec<Job> = {
                let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
                if q.jobs.is_empty() {
                    q.flushing = false;
                    return;
                }
                let n = q.jobs.len().min(MAX_BATCH);
                q.jobs.drain(..n).collect()
            };
            self.batches.fetch_add(1, Ordering::Relaxed);
            self.write_batch(batch).await;
        }
    }

    async fn write_batch(&self, mut batch: Vec<Job>) {
        // Conversations are locked in one order on every replica (their appends take the
        // conversation row's lock): two replicas' batches cannot deadlock. The sort is stable,
        // so two turns of one conversation keep their order.
        batch.sort_by(|a, b| a.save.conversation().cmp(&b.save.conversation()));
        if batch.len() == 1 {
            for job in batch {
                write_alone(&self.db, job).await;
            }
            return;
        }
        let txn = match self.db.begin().await {
            Ok(t) => t,
            // No transaction to be had: each save on its own, as they would have been.
            Err(e) => {
                tracing::warn!(error = %e, saves = batch.len(), "cannot start a batch of stored state; writing its saves one by one");
                for job in batch {
                    write_alone(&self.db, job).await;
                }
                return;
            }
        };
        let mut marks = Vec::with_capacity(batch.len());
        let mut failed: Vec<(String, crate::error::ApiError)> = Vec::new();
        let mut ids = Vec::with_capacity(batch.len());
        for job in batch {
            let id = job.save.id().to_owned();
            // Each save in a savepoint (a nested transaction): its failure rolls back only it.
            if let Err(e) = job.save.write(&txn).await {
                failed.push((id.clone(), e));
            }
            ids.push(id);
            marks.push(job.marks);
        }
        match txn.commit().await {
            Ok(()) => {
                for (id, e) in failed {
                    tracing::error!(error = %e, id = %id, "storing a response or chat completion failed");
                }
            }
            Err(e) => {
                tracing::error!(error = %e, ids = ?ids, "a batch of stored responses and chat completions did not commit");
            }
        }
        drop(marks);
    }
}

async fn write_alone(db: &DatabaseConnection, job: Job) {
    let id = job.save.id().to_owned();
    if let Err(e) = job.save.write(db).await {
        tracing::error!(error = %e, id = %id, "storing a response or chat completion failed");
    }
    drop(job.marks);
}
