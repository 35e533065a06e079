//! Reading usage records (the writer is `metering::writer`): the record list, the grouped reports
//! (aggregated in SQL on every backend) and retention pruning.

use chrono::{DateTime, Utc};
use entity::usage_records;
use sea_orm::sea_query::Expr;
use sea_orm::{
    ColumnTrait, ConnectionTrait, DbBackend, EntityTrait, FromQueryResult, PaginatorTrait,
    QueryFilter, QueryOrder, QuerySelect, QueryTrait, Select, Statement,
};

use super::{Page, PageReq};

/// Filters shared by the record list and the reports.
#[derive(Debug, Clone, Default)]
pub struct UsageFilter {
    /// `None` = every user (admin views).
    pub user_id: Option<String>,
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
    pub model: Option<String>,
    pub key_id: Option<String>,
}

impl UsageFilter {
    pub fn apply(&self, mut q: Select<usage_records::Entity>) -> Select<usage_records::Entity> {
        if let Some(u) = &self.user_id {
            q = q.filter(usage_records::Column::UserId.eq(u.as_str()));
        }
        if let Some(f) = self.from {
            q = q.filter(usage_records::Column::At.gte(f));
        }
        if let Some(t) = self.to {
            q = q.filter(usage_records::Column::At.lt(t));
        }
        if let Some(m) = &self.model {
            q = q.filter(usage_records::Column::Model.eq(m.as_str()));
        }
        if let Some(k) = &self.key_id {
            q = q.filter(usage_records::Column::KeyId.eq(k.as_str()));
        }
        q
    }
}

/// Newest first.
pub async fn records(
    db: &impl ConnectionTrait,
    filter: &UsageFilter,
    page: PageReq,
) -> Result<Page<usage_records::Model>, sea_orm::DbErr> {
    let q = filter.apply(usage_records::Entity::find());
    let total = q.clone().count(db).await?;
    let items = q
        .order_by_desc(usage_records::Column::At)
        .order_by_desc(usage_records::Column::Id)
        .offset(page.offset())
        .limit(page.per_page)
        .all(db)
        .await?;
    Ok(Page { items, total })
}

/// How a usage report groups records (`?group_by=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupBy {
    Model,
    Provider,
    /// The UTC calendar day, `YYYY-MM-DD`.
    Day,
    /// The gateway key id.
    Key,
    /// The user id (admin reports only).
    User,
}

impl GroupBy {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "model" => Self::Model,
            "provider" => Self::Provider,
            "day" => Self::Day,
            "key" => Self::Key,
            "user" => Self::User,
            _ => return None,
        })
    }

    /// The SQL expression of the group, per backend (the day is bucketed in UTC).
    ///
    /// On SQLite the unary `+` on `key_id` / `user_id` keeps the planner (without `ANALYZE`
    /// statistics) from walking a whole `(key_id, at)` / `(user_id, at)` index just to get the
    /// groups in order, when a time window could search `idx_usage_at` instead.
    fn expr(self, backend: DbBackend) -> &'static str {
        let sqlite = !matches!(backend, DbBackend::Postgres | DbBackend::MySql);
        match self {
            Self::Model => "model",
            Self::Provider => "provider",
            Self::Key if sqlite => "+key_id",
            Self::Key => "key_id",
            Self::User if sqlite => "+user_id",
            Self::User => "user_id",
            Self::Day => match backend {
                DbBackend::Postgres => "to_char(\"at\" AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
                DbBackend::MySql => "DATE_FORMAT(`at`, '%Y-%m-%d')",
                _ => "date(\"at\")",
            },
        }
    }
}

/// Sums over a set of usage records. Latency is the sum; divide by `requests` for the mean.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, FromQueryResult)]
pub struct UsageTotals {
    pub requests: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub cached_tokens: i64,
    pub cache_write_tokens: i64,
    pub reasoning_tokens: i64,
    pub cost_nanos: i64,
    pub latency_ms_sum: i64,
    /// Records with status ≥ 400.
    pub errors: i64,
}

impl UsageTotals {
    /// Mean latency in milliseconds (0 without records).
    pub fn avg_latency_ms(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.latency_ms_sum as f64 / self.requests as f64
        }
    }
}

/// One group of a usage report.
#[derive(Debug, Clone, PartialEq, Eq, FromQueryResult)]
pub struct UsageGroup {
    pub grp: String,
    pub requests: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub cached_tokens: i64,
    pub cache_write_tokens: i64,
    pub reasoning_tokens: i64,
    pub cost_nanos: i64,
    pub latency_ms_sum: i64,
    pub errors: i64,
}

impl UsageGroup {
    pub fn totals(&self) -> UsageTotals {
        UsageTotals {
            requests: self.requests,
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.completion_tokens,
            cached_tokens: self.cached_tokens,
            cache_write_tokens: self.cache_write_tokens,
            reasoning_tokens: self.reasoning_tokens,
            cost_nanos: self.cost_nanos,
            latency_ms_sum: self.latency_ms_sum,
            errors: self.errors,
        }
    }
}

/// `SUM(e)` as a 64-bit integer that saturates at the ends of the range instead of failing, so
/// no record (an upstream's absurd counts written before they were bounded) can make a report
/// answer 500. PostgreSQL's `SUM(bigint)` is `numeric` and MySQL's `DECIMAL`: exact, clamped,
/// then cast. SQLite's `SUM` raises "integer overflow", so it sums the quotient and remainder by
/// 10⁹ separately (neither can overflow below 10⁹ rows) and joins them: exact in range, and an
/// out-of-range join becomes a float, which `CAST … AS INTEGER` saturates.
pub fn saturating_sum(backend: DbBackend, e: &str) -> String {
    match backend {
        DbBackend::Sqlite => format!(
            "CAST(COALESCE(SUM(({e}) / 1000000000), 0) * 1000000000 \
             + COALESCE(SUM(({e}) % 1000000000), 0) AS INTEGER)"
        ),
        _ => {
            let int = if backend == DbBackend::MySql {
                "SIGNED"
            } else {
                "BIGINT"
            };
            format!(
                "CAST(LEAST(GREATEST(COALESCE(SUM({e}), 0), -9223372036854775808), \
                 9223372036854775807) AS {int})"
            )
        }
    }
}

/// The aggregate columns over the filtered records, as 64-bit integers that decode alike
/// everywhere ([`saturating_sum`]).
fn aggregate(backend: DbBackend, filter: &UsageFilter) -> Select<usage_records::Entity> {
    let int = if backend == DbBackend::MySql {
        "SIGNED"
    } else {
        "BIGINT"
    };
    let sum = |e: &str| Expr::cust(saturating_sum(backend, e));
    filter
        .apply(usage_records::Entity::find())
        .select_only()
        .column_as(Expr::cust(format!("CAST(COUNT(*) AS {int})")), "requests")
        .column_as(sum("prompt_tokens"), "prompt_tokens")
        .column_as(sum("completion_tokens"), "completion_tokens")
        .column_as(sum("cached_tokens"), "cached_tokens")
        .column_as(sum("cache_write_tokens"), "cache_write_tokens")
        .column_as(sum("reasoning_tokens"), "reasoning_tokens")
        .column_as(sum("cost_nanos"), "cost_nanos")
        .column_as(sum("latency_ms"), "latency_ms_sum")
        .column_as(sum("CASE WHEN status >= 400 THEN 1 ELSE 0 END"), "errors")
}

/// The grouped report's SQL (public so tests can `EXPLAIN` exactly what runs). Groups by day
/// come in date order, the others by cost, then requests, descending.
pub fn report_statement(backend: DbBackend, filter: &UsageFilter, group: GroupBy) -> Statement {
    let g = group.expr(backend);
    let q = aggregate(backend, filter)
        .column_as(Expr::cust(g), "grp")
        .group_by(Expr::cust(g));
    let q = if group == GroupBy::Day {
        q.order_by_asc(Expr::cust("grp"))
    } else {
        q.order_by_desc(Expr::cust("cost_nanos"))
            .order_by_desc(Expr::cust("requests"))
            .order_by_asc(Expr::cust("grp"))
    };
    q.build(backend)
}

/// The totals' SQL (public for `EXPLAIN`, as `report_statement`).
pub fn totals_statement(backend: DbBackend, filter: &UsageFilter) -> Statement {
    aggregate(backend, filter).build(backend)
}

/// Usage grouped by `group`, aggregated in the database.
pub async fn report(
    db: &impl ConnectionTrait,
    filter: &UsageFilter,
    group: GroupBy,
) -> Result<Vec<UsageGroup>, sea_orm::DbErr> {
    let stmt = report_statement(db.get_database_backend(), filter, group);
    UsageGroup::find_by_statement(stmt).all(db).await
}

/// Totals over every record the filter selects.
pub async fn totals(
    db: &impl ConnectionTrait,
    filter: &UsageFilter,
) -> Result<UsageTotals, sea_orm::DbErr> {
    let stmt = totals_statement(db.get_database_backend(), filter);
    Ok(UsageTotals::find_by_statement(stmt)
        .one(db)
        .await?
        .unwrap_or_default())
}

/// Deletes up to `limit` usage records older than `cutoff`; returns how many went. Ids are
/// selected first and deleted by id (MySQL allows no `LIMIT` in an `IN` subquery), so each
/// statement stays bounded on every backend.
pub async fn prune_batch(
    db: &impl ConnectionTrait,
    cutoff: DateTime<Utc>,
    limit: u64,
) -> Result<u64, sea_orm::DbErr> {
    let ids: Vec<i64> = usage_records::Entity::find()
        .select_only()
        .column(usage_records::Column::Id)
        .filter(usage_records::Column::At.lt(cutoff))
        .limit(limit)
        .into_tuple()
        .all(db)
        .await?;
    if ids.is_empty() {
        return Ok(0);
    }
    let res = usage_records::Entity::delete_many()
        .filter(usage_records::Column::Id.is_in(ids))
        .exec(db)
        .await?;
    Ok(res.rows_affected)
}

/// Rows per `prune_batch` statement.
pub const PRUNE_BATCH: u64 = 10_000;

/// Deletes every usage record older than `cutoff`, `PRUNE_BATCH` rows per statement.
pub async fn prune_older_than(
    db: &impl ConnectionTrait,
    cutoff: DateTime<Utc>,
) -> Result<u64, sea_orm::DbErr> {
    let mut total = 0;
    loop {
        let n = prune_batch(db, cutoff, PRUNE_BATCH).await?;
        total += n;
        if n < PRUNE_BATCH {
            return Ok(total);
        }
    }
}
