//! Reservation leases: each replica reserves balance and key budget in the database in chunks
//! and hands them to requests from memory; the usage writer settles them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use sea_orm::DatabaseConnection;

use crate::store::leases as store;

/// How much more than a request needs a replica reserves in one statement: the lease then serves
/// the next requests of the same user or key from memory.
const LEASE_MULTIPLE: i64 = 16;

/// Whose money a lease holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Holder {
    /// `users.reserved_nanos` against the balance.
    User,
    /// `gateway_keys.reserved_nanos` against the key's budget.
    Key,
}

#[derive(Debug)]
struct Lease {
    /// Reserved in the database by this replica (part of the row's `reserved_nanos`).
    held: i64,
    /// Handed to requests that are not settled yet.
    in_use: i64,
    /// When a request last took from it.
    touched: Instant,
    /// What that request took.
    last: i64,
}

impl Lease {
    fn spare(&self) -> i64 {
        self.held - self.in_use
    }
}

type SlotMap = HashMap<(Holder, String), Arc<Slot>>;

#[derive(Debug)]
struct Slot {
    lease: Mutex<Lease>,
    /// One database refill (or return) at a time per holder.
    refill: tokio::sync::Mutex<()>,
}

impl Slot {
    fn lease(&self) -> std::sync::MutexGuard<'_, Lease> {
        self.lease.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes `n` from what this replica already holds.
    fn try_take(&self, n: i64) -> bool {
        let mut l = self.lease();
        if l.spare() >= n {
            l.in_use += n;
            l.touched = Instant::now();
            l.last = n;
            true
        } else {
            false
        }
    }
}

/// Reservation leases: each replica reserves balance and budget in the database in chunks
/// ([`LEASE_MULTIPLE`] × a request's maximum cost, more while many are in flight) and hands
/// them to requests from memory. The database column still holds every replica's leases, so the
/// conditional `UPDATE` keeps replicas from overdrawing together; only the number of statements
/// changes (one per chunk instead of one per request).
///
/// What this replica holds is also recorded per holder in `reservation_leases` under a replica id
/// (a fresh UUID per process start), in the same transactions, and heartbeated
/// ([`Leases::heartbeat`]); when a replica dies without giving its leases back, any other replica
/// (or itself, restarted) reclaims them once the heartbeat is `billing.lease_ttl_secs` old.
///
/// The usage writer settles each request: what it cost comes out of the lease and the row's
/// `reserved_nanos` in the same transaction that debits it; the rest of its reservation goes back
/// to the lease. Spare lease is given back to the database once idle for a second (and all of it
/// at shutdown), so other replicas and the admin views see it free again.
#[derive(Clone)]
pub struct Leases {
    slots: Arc<Mutex<SlotMap>>,
    replica: Arc<str>,
}

impl Default for Leases {
    /// A new replica id.
    fn default() -> Self {
        Self {
            slots: Arc::default(),
            replica: uuid::Uuid::new_v4().to_string().into(),
        }
    }
}

impl Leases {
    /// This replica's id in `reservation_leases`.
    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// Marks this replica's lease rows alive and reclaims those of replicas whose heartbeat is
    /// older than `ttl` (the usage writer calls it every second).
    pub async fn heartbeat(&self, db: &DatabaseConnection, ttl: Duration) {
        if let Err(e) = store::heartbeat(db, &self.replica).await {
            tracing::warn!(error = %e, "reservation lease heartbeat failed");
        }
        self.reclaim(db, ttl).await;
    }

    /// Reclaims the leases of replicas that stopped heartbeating `ttl` ago (never this one's).
    pub async fn reclaim(&self, db: &DatabaseConnection, ttl: Duration) {
        if let Err(e) = store::reclaim_stale(db, &self.replica, ttl).await {
            tracing::warn!(error = %e, "reclaiming stale reservation leases failed");
        }
    }

    fn slot(&self, holder: Holder, id: &str) -> Arc<Slot> {
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(s) = slots.get(&(holder, id.to_owned())) {
            return s.clone();
        }
        let slot = Arc::new(Slot {
            lease: Mutex::new(Lease {
                held: 0,
                in_use: 0,
                touched: Instant::now(),
                last: 0,
            }),
            refill: tokio::sync::Mutex::new(()),
        });
        slots.insert((holder, id.to_owned()), slot.clone());
        slot
    }

    fn existing(&self, holder: Holder, id: &str) -> Option<Arc<Slot>> {
        let slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        slots.get(&(holder, id.to_owned())).cloned()
    }

    /// Reserves `n` for one request: from the lease when it has room, else by reserving a new
    /// chunk in the database (falling back to exactly what is missing). False when the balance
    /// or budget cannot cover it.
    pub async fn take(
        &self,
        db: &DatabaseConnection,
        holder: Holder,
        id: &str,
        n: i64,
    ) -> Result<bool, sea_orm::DbErr> {
        let n = n.max(0);
        let slot = self.slot(holder, id);
        if slot.try_take(n) {
            return Ok(true);
        }
        // The refill's database round trips are kilobytes of future state: boxed, only the
        // requests that refill carry them, not every request's future.
        Box::pin(self.refill(db, holder, id, n, slot)).await
    }

    /// `take`'s slow path: the lease has no room for `n`.
    async fn refill(
        &self,
        db: &DatabaseConnection,
        holder: Holder,
        id: &str,
        n: i64,
        slot: Arc<Slot>,
    ) -> Result<bool, sea_orm::DbErr> {
        let _refill = slot.refill.lock().await;
        if slot.try_take(n) {
            return Ok(true);
        }
        loop {
            let (need, in_use) = {
                let l = slot.lease();
                (n - l.spare().max(0), l.in_use)
            };
            if need <= 0 {
                if slot.try_take(n) {
                    return Ok(true);
                }
                continue;
            }
            let chunk = need
                .saturating_add(n.saturating_mul(LEASE_MULTIPLE))
                .saturating_add(in_use);
            let mut got = None;
            for want in [chunk, need] {
                let ok = store::reserve(db, &self.replica, holder, id, want).await?;
                if ok {
                    got = Some(want);
                    break;
                }
            }
            let Some(want) = got else {
                return Ok(false);
            };
            let mut l = slot.lease();
            l.held += want;
            if l.spare() >= n {
                l.in_use += n;
                l.touched = Instant::now();
                l.last = n;
                return Ok(true);
            }
            // Requests took from the spare while the database answered: reserve what is
            // still missing (what was reserved stays in the lease).
        }
    }

    /// A request that took `n` was refused before reaching the upstream: all of it is spare again.
    pub fn release(&self, holder: Holder, id: &str, n: i64) {
        self.settle(holder, id, n, 0);
    }

    /// A request that took `n` was settled and `consumed` (≤ `n`) of it left the database's
    /// `reserved_nanos` with the debit; the rest is spare again.
    pub fn settle(&self, holder: Holder, id: &str, n: i64, consumed: i64) {
        if n <= 0 {
            return;
        }
        if let Some(slot) = self.existing(holder, id) {
            let mut l = slot.lease();
            l.in_use = (l.in_use - n).max(0);
            l.held = (l.held - consumed.clamp(0, n)).max(0);
        }
    }

    /// Gives spare lease back to the database: all of it where nothing took from it for `idle`,
    /// and where a busy lease holds far more than is in flight, the excess. Forgets empty leases.
    pub async fn give_back(&self, db: &DatabaseConnection, idle: Duration) {
        let slots: Vec<((Holder, String), Arc<Slot>)> = {
            let slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
            slots.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
        };
        let mut forgot = false;
        for ((holder, id), slot) in slots {
            // A refill in progress: leave this one for the next round.
            let Ok(_refill) = slot.refill.try_lock() else {
                continue;
            };
            let amount = {
                let mut l = slot.lease();
                let spare = l.spare();
                let amount = if l.touched.elapsed() >= idle {
                    spare
                } else {
                    // Keep enough for what is in flight twice over, and one chunk.
                    spare
                        - l.in_use
                            .saturating_mul(2)
                            .max(l.last.saturating_mul(LEASE_MULTIPLE))
                };
                if amount <= 0 {
                    0
                } else {
                    l.held -= amount;
                    amount
                }
            };
            if amount > 0 {
                let given = store::release(db, &self.replica, holder, &id, amount).await;
                if let Err(e) = given {
                    tracing::warn!(error = %e, "giving back a reservation lease failed; retrying later");
                    slot.lease().held += amount;
                    continue;
                }
            }
            let empty = {
                let l = slot.lease();
                l.held == 0 && l.in_use == 0
            };
            if empty {
                let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
                // Only if no request picked the slot up meanwhile (the map's and ours are the
                // only references).
                if Arc::strong_count(&slot) == 2 {
                    slots.remove(&(holder, id));
                    forgot = true;
                }
            }
        }
        if forgot && let Err(e) = store::forget_empty(db, &self.replica).await {
            tracing::warn!(error = %e, "deleting empty reservation lease rows failed");
        }
    }

    /// What this replica holds in the database for `holder`/`id` and hands out now (tests).
    pub fn held(&self, holder: Holder, id: &str) -> (i64, i64) {
        self.existing(holder, id).map_or((0, 0), |s| {
            let l = s.lease();
            (l.held, l.in_use)
        })
    }
}
