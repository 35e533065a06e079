//! The balance ledger: every balance change appends an entry and moves `users.balance_nanos` in the
//! same transaction, so the entries always sum to the balance.

use chrono::Utc;
use entity::{balance_ledger, users};
use sea_orm::sea_query::{Expr, ExprTrait};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, EntityTrait, PaginatorTrait, QueryFilter,
    QueryOrder, QuerySelect, Set, TransactionSession, TransactionTrait,
};

use super::{Page, PageReq};

/// Why the balance moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Credit given at sign-up.
    Grant,
    /// Metered requests.
    Usage,
    /// An administrator's manual credit or debit.
    Adjustment,
    /// A plan renewal.
    Renewal,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Grant => "grant",
            Kind::Usage => "usage",
            Kind::Adjustment => "adjustment",
            Kind::Renewal => "renewal",
        }
    }
}

/// One balance change to apply.
#[derive(Debug, Clone)]
pub struct Change<'a> {
    pub user_id: &'a str,
    /// Positive credits, negative debits.
    pub amount_nanos: i64,
    pub kind: Kind,
    pub note: Option<&'a str>,
    /// The administrator who made it (`None` for the system).
    pub actor_id: Option<&'a str>,
    /// Refuse the change when the balance would end below zero (usage may overdraw: it has been
    /// served already).
    pub refuse_negative: bool,
}

/// Why a change was not applied.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("user not found")]
    UserNotFound,
    #[error("the balance would become negative")]
    Insufficient,
    #[error(transparent)]
    Db(#[from] sea_orm::DbErr),
}

/// Applies `change` atomically: conditional balance update + ledger entry (with the balance
/// after) in one transaction — a savepoint when `db` is already a transaction. Returns the entry.
pub async fn apply(
    db: &impl TransactionTrait,
    change: Change<'_>,
) -> Result<balance_ledger::Model, LedgerError> {
    let txn = db.begin().await?;
    let amount = change.amount_nanos;
    let balance = || Expr::col(users::Column::BalanceNanos);
    // Saturating at the ends of the column's range rather than failing the statement (an error
    // would fail, and retry, the whole usage batch it is part of).
    let (at_limit, limit) = if amount < 0 {
        (balance().lt(i64::MIN - amount), i64::MIN)
    } else {
        (balance().gt(i64::MAX - amount), i64::MAX)
    };
    let mut update = users::Entity::update_many()
        .col_expr(
            users::Column::BalanceNanos,
            Expr::case(at_limit, Expr::val(limit))
                .finally(balance().add(amount))
                .into(),
        )
        .filter(users::Column::Id.eq(change.user_id));
    if change.refuse_negative && amount < 0 {
        // balance + amount ≥ 0, written so it cannot overflow.
        update = update.filter(balance().gte(amount.saturating_neg()));
    }
    let updated = update.exec(&txn).await?.rows_affected;
    if updated == 0 {
        let exists = users::Entity::find_by_id(change.user_id.to_owned())
            .one(&txn)
            .await?
            .is_some();
        txn.rollback().await?;
        return Err(if exists {
            LedgerError::Insufficient
        } else {
            LedgerError::UserNotFound
        });
    }
    let balance_after: i64 = users::Entity::find_by_id(change.user_id.to_owned())
        .select_only()
        .column(users::Column::BalanceNanos)
        .into_tuple()
        .one(&txn)
        .await?
        .ok_or(LedgerError::UserNotFound)?;
    let entry = balance_ledger::ActiveModel {
        user_id: Set(change.user_id.to_owned()),
        at: Set(Utc::now()),
        amount_nanos: Set(change.amount_nanos),
        kind: Set(change.kind.as_str().to_owned()),
        note: Set(change.note.map(|n| n.chars().take(255).collect())),
        balance_after_nanos: Set(balance_after),
        actor_id: Set(change.actor_id.map(str::to_owned)),
        ..Default::default()
    }
    .insert(&txn)
    .await?;
    txn.commit().await?;
    Ok(entry)
}

/// A user's entries, newest first.
pub async fn list_for_user(
    db: &impl ConnectionTrait,
    user_id: &str,
    page: PageReq,
) -> Result<Page<balance_ledger::Model>, sea_orm::DbErr> {
    let q = balance_ledger::Entity::find().filter(balance_ledger::Column::UserId.eq(user_id));
    let total = q.clone().count(db).await?;
    let items = q
        .order_by_desc(balance_ledger::Column::At)
        .order_by_desc(balance_ledger::Column::Id)
        .offset(page.offset())
        .limit(page.per_page)
        .all(db)
        .await?;
    Ok(Page { items, total })
}
