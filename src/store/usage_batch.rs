//! The usage writer's queries: one transaction per batch inserts the usage records, adds each
//! key's spend and debits each charged user's balance. The metering layer computes the amounts
//! (saturating) and hands them over as the plain rows below; the SQL saturates too, so no value
//! already in the database can make a batch fail (a failing batch is retried, holding up every
//! record behind it).

use std::collections::HashSet;
use std::sync::OnceLock;

use chrono::{DateTime, Utc};
use entity::{gateway_keys, usage_records, users};
use sea_orm::sea_query::{Expr, ExprTrait, Query};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseConnection, DbBackend, EntityTrait, QueryFilter,
    QuerySelect, Statement, TransactionTrait, Value,
};

use crate::metering::leases::Holder;
use crate::store::{leases, ledger};

/// One usage record to insert.
#[derive(Debug, Clone)]
pub struct RecordRow<'a> {
    pub at: DateTime<Utc>,
    pub user_id: &'a str,
    pub key_id: &'a str,
    pub model: &'a str,
    pub provider: &'a str,
    pub endpoint: &'static str,
    pub stream: bool,
    pub status: u16,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub cached_tokens: i64,
    /// Inside `prompt_tokens`: written to the provider's cache.
    pub cache_write_tokens: i64,
    /// Inside `completion_tokens`: hidden reasoning.
    pub reasoning_tokens: i64,
    pub cost_nanos: i64,
    pub latency_ms: i64,
    pub ttft_ms: Option<i64>,
    pub tokens_estimated: bool,
    pub request_id: &'a str,
    pub shared_key: bool,
    pub error: Option<&'a str>,
    /// Unique per usage record (made at admission): the usage spool's replay skips recorded ones.
    pub event_id: String,
    /// The stored response (`resp_…`) or conversation (`conv_…`) of the call, if any.
    pub response_id: Option<&'a str>,
    pub conversation_id: Option<&'a str>,
    /// Upstream attempts (≥ 1; 0 for a response-cache hit).
    pub attempts: u32,
    /// The requested model, when a fallback answered.
    pub fallback_from: Option<&'a str>,
    /// Answered from the response cache.
    pub cache_hit: bool,
}

/// What one batch adds to a gateway key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyCharge<'a> {
    pub key_id: &'a str,
    /// Added to `spent_nanos` (≥ 0).
    pub spent: i64,
    /// Taken out of `reserved_nanos` (≥ 0).
    pub released: i64,
    pub last_used: DateTime<Utc>,
}

/// What one batch takes from a user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserCharge<'a> {
    pub user_id: &'a str,
    /// Debited from the balance (≥ 0), one `usage` ledger entry.
    pub cost: i64,
    /// Taken out of `reserved_nanos` (≥ 0).
    pub released: i64,
    /// Charged requests in `cost`.
    pub requests: usize,
}

/// The most rows one INSERT statement carries (26 parameters each: 6,656 in all, well under
/// every driver's limit); see [`write_batch`].
const MAX_ROWS_PER_INSERT: usize = 256;

/// The columns of a usage record, in the order [`record_values`] gives them.
const RECORD_COLUMNS: [usage_records::Column; 26] = {
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
        C::CacheWriteTokens,
        C::ReasoningTokens,
        C::CostNanos,
        C::LatencyMs,
        C::TtftMs,
        C::TokensEstimated,
        C::RequestId,
        C::SharedKey,
        C::Error,
        C::EventId,
        C::ResponseId,
        C::ConversationId,
        C::Attempts,
        C::FallbackFrom,
        C::CacheHit,
    ]
};

/// One record's values, in [`RECORD_COLUMNS`] order (the same conversions its `ActiveModel` uses).
fn record_values(r: &RecordRow<'_>, out: &mut Vec<Value>) {
    out.extend([
        r.at.into(),
        r.user_id.to_owned().into(),
        r.key_id.to_owned().into(),
        r.model.to_owned().into(),
        r.provider.to_owned().into(),
        r.endpoint.into(),
        r.stream.into(),
        (r.status as i32).into(),
        r.prompt_tokens.into(),
        r.completion_tokens.into(),
        r.cached_tokens.into(),
        r.cache_write_tokens.into(),
        r.reasoning_tokens.into(),
        r.cost_nanos.into(),
        r.latency_ms.into(),
        r.ttft_ms.into(),
        r.tokens_estimated.into(),
        bounded(r.request_id, 128).into(),
        r.shared_key.into(),
        r.error.map(str::to_owned).into(),
        Some(r.event_id.clone()).into(),
        // Ids the gateway made (`resp_…`, `conv_…`); bounded to the columns all the same.
        r.response_id.map(|s| bounded(s, 64)).into(),
        r.conversation_id.map(|s| bounded(s, 64)).into(),
        (Ord::min(r.attempts, i32::MAX as u32) as i32).into(),
        r.fallback_from.map(|s| bounded(s, 128)).into(),
        r.cache_hit.into(),
    ]);
}

/// At most `max` characters; the usual value is shorter in bytes and is copied as is.
fn bounded(s: &str, max: usize) -> String {
    if s.len() <= max {
        s.to_owned()
    } else {
        s.chars().take(max).collect()
    }
}

/// `col + n` (n ≥ 0) that stops at `i64::MAX` instead of failing (PostgreSQL and MySQL raise an
/// error on overflow, SQLite turns the value into a float).
fn saturating_add(col: impl sea_orm::sea_query::IntoColumnRef + Copy, n: i64) -> Expr {
    let n = Ord::max(n, 0);
    Expr::case(Expr::col(col).gt(i64::MAX - n), Expr::val(i64::MAX))
        .finally(Expr::col(col).add(n))
        .into()
}

/// `col - n` (n ≥ 0) that stops at 0: a reservation is never below zero.
fn release(col: impl sea_orm::sea_query::IntoColumnRef + Copy, n: i64) -> Expr {
    let n = Ord::max(n, 0);
    Expr::case(Expr::col(col).lt(n), Expr::val(0i64))
        .finally(Expr::col(col).sub(n))
        .into()
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
pub async fn write_batch(
    db: &DatabaseConnection,
    replica: &str,
    rows: &[RecordRow<'_>],
    keys: &[KeyCharge<'_>],
    users: &[UserCharge<'_>],
) -> Result<(), sea_orm::DbErr> {
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

    for &UserCharge {
        user_id,
        cost,
        released,
        requests: n,
    } in users
    {
        if released > 0 {
            users::Entity::update_many()
                .col_expr(
                    users::Column::ReservedNanos,
                    release(users::Column::ReservedNanos, released),
                )
                .filter(users::Column::Id.eq(user_id))
                .exec(&txn)
                .await?;
            leases::settle(&txn, replica, Holder::User, user_id, released).await?;
        }
        if cost > 0 {
            let note = format!("{n} request{}", if n == 1 { "" } else { "s" });
            match ledger::apply(
                &txn,
                ledger::Change {
                    user_id,
                    // cost ≥ 0, so its negation is in range.
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
    for &KeyCharge {
        key_id,
        spent,
        released,
        last_used: last,
    } in keys
    {
        gateway_keys::Entity::update_many()
            .col_expr(
                gateway_keys::Column::SpentNanos,
                saturating_add(gateway_keys::Column::SpentNanos, spent),
            )
            .col_expr(
                gateway_keys::Column::ReservedNanos,
                release(gateway_keys::Column::ReservedNanos, released),
            )
            .col_expr(gateway_keys::Column::LastUsedAt, Expr::value(last))
            .filter(gateway_keys::Column::Id.eq(key_id))
            .exec(&txn)
            .await?;
        if released > 0 {
            leases::settle(&txn, replica, Holder::Key, key_id, released).await?;
        }
    }
    txn.commit().await
}

/// Which of `event_ids` are already recorded (the usage spool's replay skips those).
pub async fn existing_event_ids(
    db: &DatabaseConnection,
    event_ids: &[String],
) -> Result<HashSet<String>, sea_orm::DbErr> {
    if event_ids.is_empty() {
        return Ok(HashSet::new());
    }
    let found: Vec<Option<String>> = usage_records::Entity::find()
        .select_only()
        .column(usage_records::Column::EventId)
        .filter(usage_records::Column::EventId.is_in(event_ids.iter().cloned()))
        .into_tuple()
        .all(db)
        .await?;
    Ok(found.into_iter().flatten().collect())
}
