//! Reservation leases per replica (`reservation_leases`): every change to what a replica holds of
//! a user's or key's `reserved_nanos` changes its lease row in the same transaction, so the row
//! always says how much of `reserved_nanos` that replica is responsible for. A replica heartbeats
//! its rows; rows whose heartbeat is older than `billing.lease_ttl_secs` belong to a replica that
//! died (`kill -9`, a crash, a lost machine) and any replica reclaims them: the row is deleted and
//! its amount leaves `reserved_nanos` in one transaction.

use std::time::Duration;

use chrono::Utc;
use entity::{gateway_keys, reservation_leases as rl, users};
use sea_orm::sea_query::{Expr, ExprTrait};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, DatabaseConnection, EntityTrait, QueryFilter,
    QuerySelect, TransactionTrait,
};

use crate::metering::leases::Holder;
use crate::store::billing;

/// How many stale rows one reclaim pass looks at (the next pass takes the rest).
const RECLAIM_BATCH: u64 = 500;

fn holder_name(h: Holder) -> &'static str {
    match h {
        Holder::User => "user",
        Holder::Key => "key",
    }
}

fn row(replica: &str, holder: Holder, id: &str) -> sea_orm::Condition {
    sea_orm::Condition::all()
        .add(rl::Column::ReplicaId.eq(replica))
        .add(rl::Column::Holder.eq(holder_name(holder)))
        .add(rl::Column::HolderId.eq(id))
}

/// Adds `nanos` (may be negative) to this replica's lease row, creating it when missing.
async fn add_to_lease(
    db: &impl ConnectionTrait,
    replica: &str,
    holder: Holder,
    id: &str,
    nanos: i64,
) -> Result<(), sea_orm::DbErr> {
    let res = rl::Entity::update_many()
        .col_expr(
            rl::Column::HeldNanos,
            Expr::col(rl::Column::HeldNanos).add(nanos),
        )
        .filter(row(replica, holder, id))
        .exec(db)
        .await?;
    if res.rows_affected == 0 && nanos > 0 {
        // Only this replica writes its own rows (the reclaimer deletes rows of replicas that
        // stopped heartbeating), so no other insert races this one.
        rl::Entity::insert(rl::ActiveModel {
            replica_id: Set(replica.to_owned()),
            holder: Set(holder_name(holder).to_owned()),
            holder_id: Set(id.to_owned()),
            held_nanos: Set(nanos),
            heartbeat_at: Set(Utc::now()),
        })
        .exec_without_returning(db)
        .await?;
    }
    Ok(())
}

/// Reserves `nanos` against the balance or budget for this replica's lease: the conditional
/// `UPDATE` and the lease row in one transaction. False when the balance or budget cannot cover it.
pub async fn reserve(
    db: &DatabaseConnection,
    replica: &str,
    holder: Holder,
    id: &str,
    nanos: i64,
) -> Result<bool, sea_orm::DbErr> {
    let txn = db.begin().await?;
    let ok = match holder {
        Holder::User => billing::reserve_balance(&txn, id, nanos).await?,
        Holder::Key => billing::reserve_key(&txn, id, nanos).await?,
    };
    if ok {
        add_to_lease(&txn, replica, holder, id, nanos).await?;
        txn.commit().await?;
    } else {
        txn.rollback().await?;
    }
    Ok(ok)
}

/// Gives `nanos` of this replica's lease back: out of `reserved_nanos` and the lease row together.
pub async fn release(
    db: &DatabaseConnection,
    replica: &str,
    holder: Holder,
    id: &str,
    nanos: i64,
) -> Result<(), sea_orm::DbErr> {
    let txn = db.begin().await?;
    match holder {
        Holder::User => billing::release_balance(&txn, id, nanos).await?,
        Holder::Key => billing::release_key(&txn, id, nanos).await?,
    }
    add_to_lease(&txn, replica, holder, id, -nanos).await?;
    txn.commit().await
}

/// The usage writer's part, inside its batch transaction: `nanos` of the lease left
/// `reserved_nanos` with a debit.
pub async fn settle(
    txn: &impl ConnectionTrait,
    replica: &str,
    holder: Holder,
    id: &str,
    nanos: i64,
) -> Result<(), sea_orm::DbErr> {
    if nanos == 0 {
        return Ok(());
    }
    add_to_lease(txn, replica, holder, id, -nanos).await
}

/// Marks every lease row of this replica alive (one statement, however many rows).
pub async fn heartbeat(db: &DatabaseConnection, replica: &str) -> Result<u64, sea_orm::DbErr> {
    let res = rl::Entity::update_many()
        .col_expr(rl::Column::HeartbeatAt, Expr::value(Utc::now()))
        .filter(rl::Column::ReplicaId.eq(replica))
        .exec(db)
        .await?;
    Ok(res.rows_affected)
}

/// Deletes this replica's rows that hold nothing (after its leases were given back).
pub async fn forget_empty(db: &DatabaseConnection, replica: &str) -> Result<(), sea_orm::DbErr> {
    rl::Entity::delete_many()
        .filter(rl::Column::ReplicaId.eq(replica))
        .filter(rl::Column::HeldNanos.lte(0))
        .exec(db)
        .await?;
    Ok(())
}

/// Reclaims the leases of replicas whose heartbeat is older than `ttl` (never `replica`'s own):
/// each row is deleted and what it held leaves `reserved_nanos`, in one transaction per row; a
/// row another reclaimer (or a late heartbeat) changed first is left alone. Returns the nanos
/// reclaimed.
pub async fn reclaim_stale(
    db: &DatabaseConnection,
    replica: &str,
    ttl: Duration,
) -> Result<i64, sea_orm::DbErr> {
    let cutoff = Utc::now() - chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::MAX);
    let stale = rl::Entity::find()
        .filter(rl::Column::HeartbeatAt.lt(cutoff))
        .filter(rl::Column::ReplicaId.ne(replica))
        .limit(RECLAIM_BATCH)
        .all(db)
        .await?;
    let mut reclaimed = 0i64;
    for lease in stale {
        let txn = db.begin().await?;
        let gone = rl::Entity::delete_many()
            .filter(rl::Column::ReplicaId.eq(&lease.replica_id))
            .filter(rl::Column::Holder.eq(&lease.holder))
            .filter(rl::Column::HolderId.eq(&lease.holder_id))
            .filter(rl::Column::HeldNanos.eq(lease.held_nanos))
            .filter(rl::Column::HeartbeatAt.lt(cutoff))
            .exec(&txn)
            .await?;
        if gone.rows_affected != 1 {
            txn.rollback().await?;
            continue;
        }
        let held = lease.held_nanos;
        if held != 0 {
            match lease.holder.as_str() {
                "user" => {
                    users::Entity::update_many()
                        .col_expr(
                            users::Column::ReservedNanos,
                            Expr::col(users::Column::ReservedNanos).sub(held),
                        )
                        .filter(users::Column::Id.eq(&lease.holder_id))
                        .exec(&txn)
                        .await?;
                }
                _ => {
                    gateway_keys::Entity::update_many()
                        .col_expr(
                            gateway_keys::Column::ReservedNanos,
                            Expr::col(gateway_keys::Column::ReservedNanos).sub(held),
                        )
                        .filter(gateway_keys::Column::Id.eq(&lease.holder_id))
                        .exec(&txn)
                        .await?;
                }
            }
        }
        txn.commit().await?;
        reclaimed = reclaimed.saturating_add(held);
        tracing::warn!(
            replica = %lease.replica_id,
            holder = %lease.holder,
            held_nanos = held,
            "reclaimed the reservation lease of a replica that stopped heartbeating"
        );
    }
    Ok(reclaimed)
}
