//! Reservations against a user's balance and a gateway key's budget: atomic conditional SQL, so
//! several replicas on one database cannot overdraw by more than what is in flight.
//!
//! Admission reserves a request's maximum cost from a lease (`metering::leases::Leases`), which
//! reserves here in chunks; the usage writer takes what the request cost out of
//! `reserved_nanos` in the same transaction that debits it and writes the usage record.

use entity::{gateway_keys, users};
use sea_orm::sea_query::{Expr, ExprTrait};
use sea_orm::{ColumnTrait, Condition, ConnectionTrait, EntityTrait, QueryFilter};

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
                    Expr::col(gateway_keys::Column::SpentNanos)
                        .add(Expr::col(gateway_keys::Column::ReservedNanos))
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
            Expr::col(users::Column::BalanceNanos)
                .sub(Expr::col(users::Column::ReservedNanos))
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
