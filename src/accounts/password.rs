//! Password hashing with argon2id, on the blocking pool behind one gate for the whole process.
//!
//! argon2id is deliberately costly: ~40 ms of a core and 19 MiB per hash or check. Unbounded, 200
//! concurrent anonymous logins ran 200 of them at once (3 GB of memory, every core busy, `/v1`
//! latency ×100). So every hash and check — login, registration, enrolment confirmation, password
//! reset and change, admin-created accounts — passes [`Gate`]: at most half the cores (at least
//! one) hash at once, so the other half keep serving `/v1`; a short queue waits for them; anything
//! beyond is refused at once with [`HashError::Busy`] (503 with `retry-after`) instead of piling
//! up memory and latency.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use argon2::{Argon2, PasswordHasher, PasswordVerifier};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Waiting checks allowed per running one before new ones are refused.
const QUEUE_PER_PERMIT: usize = 4;

/// Seconds a refused caller is told to wait (a queue drains in well under a second).
pub const BUSY_RETRY_AFTER_SECS: u64 = 1;

#[derive(Debug, thiserror::Error)]
pub enum HashError {
    /// Every hashing slot and the queue are taken.
    #[error("too many password checks at once; retry in a moment")]
    Busy,
    #[error("argon2: {0}")]
    Failed(String),
}

/// The process-wide bound on argon2 work.
struct Gate {
    running: Arc<Semaphore>,
    /// Admitted calls, running or queued, and the most there may be.
    admitted: AtomicUsize,
    limit: usize,
}

fn gate() -> &'static Gate {
    static GATE: OnceLock<Gate> = OnceLock::new();
    GATE.get_or_init(|| {
        let permits = concurrency();
        Gate {
            running: Arc::new(Semaphore::new(permits)),
            admitted: AtomicUsize::new(0),
            limit: permits * (1 + QUEUE_PER_PERMIT),
        }
    })
}

/// How many hashes run at once: half the cores this process may use, at least one.
pub fn concurrency() -> usize {
    std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
}

/// One admitted call; leaves the count when dropped (with the hash, not with the caller, so a
/// client that hangs up does not free a slot its hash still occupies).
struct Admitted(&'static Gate);

impl Drop for Admitted {
    fn drop(&mut self) {
        self.0.admitted.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Runs `f` on the blocking pool once a slot is free; `Busy` when the queue is full.
async fn run<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, HashError> {
    let gate = gate();
    let admitted = gate.admitted.fetch_add(1, Ordering::AcqRel);
    let ticket = Admitted(gate);
    if admitted >= gate.limit {
        return Err(HashError::Busy);
    }
    let permit: OwnedSemaphorePermit = gate
        .running
        .clone()
        .acquire_owned()
        .await
        .map_err(|_| HashError::Busy)?;
    tokio::task::spawn_blocking(move || {
        let out = f();
        drop((permit, ticket));
        out
    })
    .await
    .map_err(|e| HashError::Failed(e.to_string()))
}

pub async fn hash(password: &str) -> Result<String, HashError> {
    let pw = password.to_owned();
    run(move || {
        Argon2::default()
            .hash_password(pw.as_bytes())
            .map(|h| h.to_string())
            .map_err(|e| HashError::Failed(e.to_string()))
    })
    .await?
}

/// True when `password` matches `phc`; `None` checks against [`dummy_hash`] (same cost, never
/// matches), so an unknown username takes as long as a known one. A malformed hash never matches.
pub async fn verify(password: &str, phc: Option<&str>) -> Result<bool, HashError> {
    let pw = password.to_owned();
    let phc = phc.map(str::to_owned);
    run(move || match phc {
        Some(phc) => Argon2::default()
            .verify_password(pw.as_bytes(), phc.as_str())
            .is_ok(),
        None => {
            let _ = Argon2::default().verify_password(pw.as_bytes(), dummy_hash());
            false
        }
    })
    .await
}

/// A valid hash of a random password, verified against when the username does not exist so that
/// a login's timing does not reveal whether an account exists.
pub fn dummy_hash() -> &'static str {
    static DUMMY: OnceLock<String> = OnceLock::new();
    DUMMY.get_or_init(|| {
        let pw: [u8; 16] = rand::random();
        Argon2::default()
            .hash_password(&pw)
            .map(|h| h.to_string())
            .unwrap_or_default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // One test: the gate is process-wide, and a second test hashing in parallel would take slots.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hash_verify_and_the_gate_bound() {
        let h = hash("correct horse").await.expect("hash");
        assert!(h.starts_with("$argon2id$"));
        assert!(verify("correct horse", Some(&h)).await.expect("verify"));
        assert!(!verify("wrong horse", Some(&h)).await.expect("verify"));
        assert!(!verify("x", Some("not a hash")).await.expect("verify"));
        assert!(!verify("correct horse", None).await.expect("verify"));

        // Every slot taken: `limit` callers are admitted and wait, the rest are refused at once.
        let g = gate();
        let held = g
            .running
            .clone()
            .acquire_many_owned(concurrency() as u32)
            .await
            .expect("permits");
        let n = g.limit * 3;
        let calls: Vec<_> = (0..n)
            .map(|_| tokio::spawn(verify("guess", None)))
            .collect();
        // The refused ones answer at once; the admitted ones wait for the held slots.
        while calls.iter().filter(|c| c.is_finished()).count() < n - g.limit {
            tokio::task::yield_now().await;
        }
        assert_eq!(g.admitted.load(Ordering::Acquire), g.limit);
        drop(held);
        let (mut checked, mut busy) = (0, 0);
        for c in calls {
            match c.await.expect("join") {
                Err(HashError::Busy) => busy += 1,
                Ok(false) => checked += 1,
                other => panic!("{other:?}"),
            }
        }
        assert_eq!((checked, busy), (g.limit, n - g.limit));
        assert_eq!(
            g.admitted.load(Ordering::Acquire),
            0,
            "every slot given back"
        );
    }
}
