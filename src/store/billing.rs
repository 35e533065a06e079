//! Reservations against a user's balance and a gateway key's budget: atomic conditional SQL, so
//! several replicas on one database cannot overdraw by more than what is in flight.
//!
//! Admission reserves a request's maximum cost from a lease (`metering::leases::Leases`), which
//! reserves here in chunks; the usage writer takes what the request cost out of
//! `reserved_nanos` in the same transaction that debits it and writes the usage record.

use entity::{gateway_keys, users};
use sea_orm::sea_query::{Expr, ExprTrait};
use sea_orm::{
    ColumnTrait, Condition, ConnectionTrait, DbBackend, EntityTrait, QueryFilter, QuerySelect,
};

/// A 64-bit column in a wider type, so sums over it cannot overflow in SQL: a spend that
/// saturated at the top of the range must refuse a reservation, not fail the statement.
/// (SQLite turns an overflowing integer into a float by itself.)
fn wide(backend: DbBackend, column: &str) -> Expr {
    Expr::cust(match backend {
        DbBackend::Postgres => format!("CAST({column} AS NUMERIC)"),
        DbBackend::MySql => format!("CAST({column} AS DECIMAL(65, 0))"),
        _ => column.to_owned(),
    })
}

/// Reserves `nanos` against the key's budget: false when the budget cannot cover it
/// (spent + in flight + this > budget) or the key is gone. A key without a budget (removed since
/// the caller looked) reserves too, so settling stays symmetric.
pub async fn reserve_key(
    db: &impl ConnectionTrait,
    key_id: &str,
    nanos: i64,
) -> Result<bool, sea_orm::DbErr> {
    let res = gateway_keys::Entity::update_many()
        .col_expr(
            gateway_keys::Column::ReservedNanos,
            Expr::col(gateway_keys::Column::ReservedNanos).add(nanos),
        )
        .filter(gateway_keys::Column::Id.eq(key_id))
        .filter(
            Condition::any()
                .add(gateway_keys::Column::BudgetNanos.is_null())
                .add(
                    wide(db.get_database_backend(), "spent_nanos")
                        .add(wide(db.get_database_backend(), "reserved_nanos"))
                        .add(nanos)
                        .lte(Expr::col(gateway_keys::Column::BudgetNanos)),
                ),
        )
        .exec(db)
        .await?;
    Ok(res.rows_affected == 1)
}

/// Reserves `nanos` against the user's balance. False when balance − in flight < `nanos`.
pub async fn reserve_balance(
    db: &impl ConnectionTrait,
    user_id: &str,
    nanos: i64,
) -> Result<bool, sea_orm::DbErr> {
    let res = users::Entity::update_many()
        .col_expr(
            users::Column::ReservedNanos,
            Expr::col(users::Column::ReservedNanos).add(nanos),
        )
        .filter(users::Column::Id.eq(user_id))
        .filter(
            wide(db.get_database_backend(), "balance_nanos")
                .sub(wide(db.get_database_backend(), "reserved_nanos"))
                .gte(nanos),
        )
        .exec(db)
        .await?;
    Ok(res.rows_affected == 1)
}

/// Gives back `nanos` of the user's reserved balance (a lease's spare).
pub async fn release_balance(
    db: &impl ConnectionTrait,
    user_id: &str,
    nanos: i64,
) -> Result<(), sea_orm::DbErr> {
    users::Entity::update_many()
        .col_expr(
            users::Column::ReservedNanos,
            Expr::col(users::Column::ReservedNanos).sub(nanos),
        )
        .filter(users::Column::Id.eq(user_id))
        .exec(db)
        .await?;
    Ok(())
}

/// Gives back `nanos` of the key's reserved budget (a lease's spare).
pub async fn release_key(
    db: &impl ConnectionTrait,
    key_id: &str,
    nanos: i64,
) -> Result<(), sea_orm::DbErr> {
    gateway_keys::Entity::update_many()
        .col_expr(
            gateway_keys::Column::ReservedNanos,
            Expr::col(gateway_keys::Column::ReservedNanos).sub(nanos),
        )
        .filter(gateway_keys::Column::Id.eq(key_id))
        .exec(db)
        .await?;
    Ok(())
}

/// A budget or balance and what is taken from it, for a refusal's message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Headroom {
    /// The key's budget, or the user's balance.
    pub limit: i64,
    /// The key's spend (0 for a balance: spending lowers it).
    pub used: i64,
    /// Reserved by requests in flight (and replicas' lease spare).
    pub reserved: i64,
}

impl Headroom {
    /// What is left: limit − used − reserved, never below 0.
    pub fn available(&self) -> i64 {
        Ord::max(
            self.limit
                .saturating_sub(self.used)
                .saturating_sub(self.reserved),
            0,
        )
    }
}

/// The key's budget, spend and reservations (`None`: no such key, or no budget).
pub async fn key_headroom(
    db: &impl ConnectionTrait,
    key_id: &str,
) -> Result<Option<Headroom>, sea_orm::DbErr> {
    let row: Option<(Option<i64>, i64, i64)> = gateway_keys::Entity::find_by_id(key_id.to_owned())
        .select_only()
        .column(gateway_keys::Column::BudgetNanos)
        .column(gateway_keys::Column::SpentNanos)
        .column(gateway_keys::Column::ReservedNanos)
        .into_tuple()
        .one(db)
        .await?;
    Ok(row.and_then(|(budget, spent, reserved)| {
        budget.map(|limit| Headroom {
            limit,
            used: spent,
            reserved,
        })
    }))
}

/// The user's balance and reservations (`None`: no such user).
pub async fn balance_headroom(
    db: &impl ConnectionTrait,
    user_id: &str,
) -> Result<Option<Headroom>, sea_orm::DbErr> {
    let row: Option<(i64, i64)> = users::Entity::find_by_id(user_id.to_owned())
        .select_only()
        .column(users::Column::BalanceNanos)
        .column(users::Column::ReservedNanos)
        .into_tuple()
        .one(db)
        .await?;
    Ok(row.map(|(balance, reserved)| Headroom {
        limit: balance,
        used: 0,
        reserved,
    }))
}
