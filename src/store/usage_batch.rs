//! The usage writer's queries: one transaction per batch inserts the usage records, adds each
//! key's spend and debits each charged user's balance (the metering layer computes the amounts).

use std::collections::{HashMap, HashSet};
use std::sync::OnceLock;

use chrono::{DateTime, Utc};
use entity::{gateway_keys, usage_records, users};
use sea_orm::sea_query::{Expr, ExprTrait, Query};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseConnection, DbBackend, EntityTrait, QueryFilter,
    QuerySelect, Statement, TransactionTrait, Value,
};

use crate::metering::leases::Holder;
use crate::metering::writer::Settled;
use crate::store::{leases, ledger};

/// The most rows one INSERT statement carries (19 parameters each, well under every driver's
/// limit); see [`write_batch`].
const MAX_ROWS_PER_INSERT: usize = 256;

/// The columns of a usage record, in the order [`record_values`] gives them.
const RECORD_COLUMNS: [usage_records::Column; 19] = {
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
        C::CostNanos,
        C::LatencyMs,
        C::TtftMs,
        C::TokensEstimated,
        C::RequestId,
        C::SharedKey,
        C::Error,
        C::EventId,
    ]
};

/// One record's values, in [`RECORD_COLUMNS`] order (the same conversions its `ActiveModel` uses).
fn record_values(r: &Settled, out: &mut Vec<Value>) {
    let e = &r.event;
    out.extend([
        e.at.into(),
        e.user_id.clone().into(),
        e.key_id.clone().into(),
        e.model.clone().into(),
        e.provider.clone().into(),
        e.endpoint.as_str().into(),
        e.stream.into(),
        (e.status as i32).into(),
        e.usage.prompt.into(),
        e.usage.completion.into(),
        e.usage.cached.into(),
        r.cost_nanos.into(),
        e.latency_ms.into(),
        e.ttft_ms.into(),
        r.tokens_estimated.into(),
        // At most 128 characters; the usual id is shorter in bytes and is copied as is.
        if e.request_id.len() <= 128 {
            e.request_id.clone().into()
        } else {
            e.request_id.chars().take(128).collect::<String>().into()
        },
        e.shared_key.into(),
        e.error.clone().into(),
        Some(e.ticket.id.to_string()).into(),
    ]);
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
/// (one `usage` ledger entry per user per batch), releasing what admission reserved — from
/// `reserved_nanos` and from `replica`'s lease rows alike.
pub async fn write_batch(
    db: &DatabaseConnection,
    replica: &str,
    rows: &[Settled],
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

    let mut per_key: HashMap<&str, (i64, i64, DateTime<Utc>)> = HashMap::new();
    for r in rows {
        let e = &r.event;
        let entry = per_key.entry(e.key_id.as_str()).or_insert((0, 0, e.at));
        entry.0 += r.cost_nanos;
        entry.1 += r.consumed().key_nanos;
        entry.2 = std::cmp::max(entry.2, e.at);
    }
    // Users: debit what charged requests cost; that much leaves the reservation too.
    let mut per_user: HashMap<&str, (i64, i64, usize)> = HashMap::new();
    for r in rows {
        let e = &r.event;
        if e.charged || e.reservation.user_nanos != 0 {
            let entry = per_user.entry(e.user_id.as_str()).or_insert((0, 0, 0));
            if e.charged {
                entry.0 += r.cost_nanos;
                entry.2 += 1;
            }
            entry.1 += r.consumed().user_nanos;
        }
    }
    for (user_id, (cost, released, n)) in per_user {
        if released != 0 {
            users::Entity::update_many()
                .col_expr(
                    users::Column::ReservedNanos,
                    Expr::col(users::Column::ReservedNanos).sub(released),
                )
                .filter(users::Column::Id.eq(user_id))
                .exec(&txn)
                .await?;
            leases::settle(&txn, replica, Holder::User, user_id, released).await?;
        }
        if cost != 0 {
            let note = format!("{n} request{}", if n == 1 { "" } else { "s" });
            match ledger::apply(
                &txn,
                ledger::Change {
                    user_id,
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
    for (key_id, (spent, released, last)) in per_key {
        gateway_keys::Entity::update_many()
            .col_expr(
                gateway_keys::Column::SpentNanos,
                Expr::col(gateway_keys::Column::SpentNanos).add(spent),
            )
            .col_expr(
                gateway_keys::Column::ReservedNanos,
                Expr::col(gateway_keys::Column::ReservedNanos).sub(released),
            )
            .col_expr(gateway_keys::Column::LastUsedAt, Expr::value(last))
            .filter(gateway_keys::Column::Id.eq(key_id))
            .exec(&txn)
            .await?;
        leases::settle(&txn, replica, Holder::Key, key_id, released).await?;
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
