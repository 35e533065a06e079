//! Usage the signed-in user can see: the metered records of their own requests, grouped
//! reports, the balance and its ledger. Admin views of the same live in `admin_usage`.

use axum::extract::State;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::accounts::session::CurrentUser;
use crate::error::{ApiError, ApiResult, Json, Query};
use crate::routes::admin::LedgerEntryView;
use crate::routes::{PageParams, Paginated, rfc3339};
use crate::state::AppState;
use crate::store::usage::{GroupBy, UsageFilter, UsageGroup, UsageTotals};
use crate::store::{self, nanos_to_usd};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(my_records))
        .routes(routes!(my_usage))
        .routes(routes!(my_balance))
        .routes(routes!(my_transactions))
}

/// A usage record as users see it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct UsageRecordView {
    pub id: String,
    pub at: String,
    /// The gateway key that made the call; `null` for the signed-in chat (`/api/chat`, `/api/ws`).
    pub key_id: Option<String>,
    /// `api` (a gateway key on `/v1`) or `chat` (the signed-in chat).
    pub source: &'static str,
    pub model: String,
    pub provider: String,
    pub endpoint: String,
    pub stream: bool,
    pub status: i32,
    /// Every prompt token, cached and cache-write ones included.
    pub prompt_tokens: i64,
    /// Every completion token, reasoning ones included.
    pub completion_tokens: i64,
    /// Prompt tokens read from the provider's cache.
    pub cached_tokens: i64,
    /// Prompt tokens written to the provider's cache.
    pub cache_write_tokens: i64,
    /// Completion tokens spent on hidden reasoning.
    pub reasoning_tokens: i64,
    pub cost_usd: f64,
    pub latency_ms: i64,
    pub ttft_ms: Option<i64>,
    /// The upstream reported no usage; the gateway counted the tokens itself.
    pub tokens_estimated: bool,
    pub request_id: String,
    /// The stored response (`resp_…`) the call made or continued, if any.
    pub response_id: Option<String>,
    /// The conversation (`conv_…`) the call ran in, if any.
    pub conversation_id: Option<String>,
    /// Upstream attempts behind the answer (≥ 1: retries on other keys, deployments, fallbacks;
    /// 0 for an answer from the response cache).
    pub attempts: i32,
    /// The model the client asked for, when a fallback model answered (`model` is that one).
    pub fallback_from: Option<String>,
    /// Answered from the response cache: no upstream call, `cost_usd` 0.
    pub cache_hit: bool,
}

impl From<entity::usage_records::Model> for UsageRecordView {
    fn from(r: entity::usage_records::Model) -> Self {
        Self {
            id: r.id.to_string(),
            at: rfc3339(r.at),
            source: if r.key_id.is_empty() { "chat" } else { "api" },
            key_id: Some(r.key_id).filter(|k| !k.is_empty()),
            model: r.model,
            provider: r.provider,
            endpoint: r.endpoint,
            stream: r.stream,
            status: r.status,
            prompt_tokens: r.prompt_tokens,
            completion_tokens: r.completion_tokens,
            cached_tokens: r.cached_tokens,
            cache_write_tokens: r.cache_write_tokens,
            reasoning_tokens: r.reasoning_tokens,
            cost_usd: nanos_to_usd(r.cost_nanos),
            latency_ms: r.latency_ms,
            ttft_ms: r.ttft_ms,
            tokens_estimated: r.tokens_estimated,
            request_id: r.request_id,
            response_id: r.response_id,
            conversation_id: r.conversation_id,
            attempts: if r.cache_hit {
                r.attempts.max(0)
            } else {
                r.attempts.max(1)
            },
            fallback_from: r.fallback_from,
            cache_hit: r.cache_hit,
        }
    }
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct RecordsQuery {
    /// RFC 3339; records at or after.
    pub from: Option<String>,
    /// RFC 3339; records before.
    pub to: Option<String>,
    pub model: Option<String>,
    pub key_id: Option<String>,
    pub page: Option<u64>,
    pub per_page: Option<u64>,
}

/// Parses an RFC 3339 bound (a bare `YYYY-MM-DD` means midnight UTC).
pub fn parse_time(param: &str, s: &str) -> ApiResult<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|d| d.and_utc())
        .ok_or_else(|| {
            ApiError::invalid_param(
                param,
                format!("`{param}` must be an RFC 3339 time or YYYY-MM-DD."),
            )
        })
}

impl RecordsQuery {
    pub fn filter(&self, user_id: Option<String>) -> ApiResult<UsageFilter> {
        usage_filter(
            self.from.as_deref(),
            self.to.as_deref(),
            self.model.clone(),
            self.key_id.clone(),
            user_id,
        )
    }
}

/// The records a report or listing covers: `from`/`to` parsed (RFC 3339 or YYYY-MM-DD), the
/// other filters as given; `user_id` `None` = every user.
pub fn usage_filter(
    from: Option<&str>,
    to: Option<&str>,
    model: Option<String>,
    key_id: Option<String>,
    user_id: Option<String>,
) -> ApiResult<UsageFilter> {
    Ok(UsageFilter {
        user_id,
        from: from.map(|s| parse_time("from", s)).transpose()?,
        to: to.map(|s| parse_time("to", s)).transpose()?,
        model,
        key_id,
    })
}

/// The signed-in user's usage records, newest first.
#[utoipa::path(get, path = "/api/me/usage/records", tag = "usage", security(("access_token" = [])),
    params(RecordsQuery),
    responses((status = 200, body = Paginated<UsageRecordView>), (status = 400, body = crate::error::ErrorBody),
              (status = 401, body = crate::error::ErrorBody)))]
async fn my_records(
    State(state): State<AppState>,
    user: CurrentUser,
    Query(q): Query<RecordsQuery>,
) -> ApiResult<Json<Paginated<UsageRecordView>>> {
    let filter = q.filter(Some(user.id().to_owned()))?;
    let req = crate::routes::page_req(q.page, q.per_page)?;
    let page = store::usage::records(&state.db, &filter, req).await?;
    Ok(Json(Paginated::new(page, req, UsageRecordView::from)))
}

/// Sums over a set of usage records.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct UsageTotalsView {
    pub requests: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub cached_tokens: i64,
    pub cache_write_tokens: i64,
    pub reasoning_tokens: i64,
    pub cost_usd: f64,
    pub avg_latency_ms: f64,
    /// Records with status ≥ 400.
    pub errors: i64,
}

impl From<UsageTotals> for UsageTotalsView {
    fn from(t: UsageTotals) -> Self {
        Self {
            requests: t.requests,
            prompt_tokens: t.prompt_tokens,
            completion_tokens: t.completion_tokens,
            cached_tokens: t.cached_tokens,
            cache_write_tokens: t.cache_write_tokens,
            reasoning_tokens: t.reasoning_tokens,
            cost_usd: nanos_to_usd(t.cost_nanos),
            avg_latency_ms: t.avg_latency_ms(),
            errors: t.errors,
        }
    }
}

/// One group of a usage report.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct UsageGroupView {
    /// The model name, provider key, day (`YYYY-MM-DD`, UTC), gateway key id or user id.
    pub group: String,
    #[serde(flatten)]
    pub totals: UsageTotalsView,
}

impl From<UsageGroup> for UsageGroupView {
    fn from(g: UsageGroup) -> Self {
        Self {
            totals: g.totals().into(),
            group: g.grp,
        }
    }
}

/// `{data: [groups], totals}`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct UsageReport {
    pub data: Vec<UsageGroupView>,
    pub totals: UsageTotalsView,
}

/// `?from=&to=&group_by=&model=&key_id=`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct UsageQuery {
    /// RFC 3339 or YYYY-MM-DD; records at or after.
    pub from: Option<String>,
    /// RFC 3339 or YYYY-MM-DD; records before.
    pub to: Option<String>,
    /// `model` (default) | `provider` | `day` | `key`.
    pub group_by: Option<String>,
    pub model: Option<String>,
    pub key_id: Option<String>,
}

/// Parses `group_by`; `user` only where `allow_user`.
pub fn parse_group_by(s: Option<&str>, allow_user: bool) -> ApiResult<GroupBy> {
    let allowed = if allow_user {
        "`model`, `provider`, `day`, `key` or `user`"
    } else {
        "`model`, `provider`, `day` or `key`"
    };
    match s.filter(|s| !s.is_empty()).map(GroupBy::parse) {
        None => Ok(GroupBy::Model),
        Some(Some(GroupBy::User)) if !allow_user => Err(ApiError::invalid_param(
            "group_by",
            format!("group_by must be {allowed}"),
        )),
        Some(Some(g)) => Ok(g),
        Some(None) => Err(ApiError::invalid_param(
            "group_by",
            format!("group_by must be {allowed}"),
        )),
    }
}

/// Runs a grouped report and its totals.
pub async fn build_report(
    state: &AppState,
    filter: &UsageFilter,
    group: GroupBy,
) -> ApiResult<UsageReport> {
    let groups = store::usage::report(&state.db, filter, group).await?;
    let totals = store::usage::totals(&state.db, filter).await?;
    Ok(UsageReport {
        data: groups.into_iter().map(UsageGroupView::from).collect(),
        totals: totals.into(),
    })
}

/// The signed-in user's usage, grouped and summed.
#[utoipa::path(get, path = "/api/me/usage", tag = "usage", security(("access_token" = [])),
    params(UsageQuery),
    responses((status = 200, body = UsageReport), (status = 400, body = crate::error::ErrorBody),
              (status = 401, body = crate::error::ErrorBody)))]
async fn my_usage(
    State(state): State<AppState>,
    user: CurrentUser,
    Query(q): Query<UsageQuery>,
) -> ApiResult<Json<UsageReport>> {
    let group = parse_group_by(q.group_by.as_deref(), false)?;
    let filter = usage_filter(
        q.from.as_deref(),
        q.to.as_deref(),
        q.model,
        q.key_id,
        Some(user.id().to_owned()),
    )?;
    Ok(Json(build_report(&state, &filter, group).await?))
}

/// Spend on one provider.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ProviderSpend {
    pub provider: String,
    pub cost_usd: f64,
}

/// The balance and what the last 30 days of usage cost.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct BalanceView {
    pub balance_usd: f64,
    /// The metered cost of the last 30 days' usage records (whoever paid the upstream).
    pub spent_usd_30d: f64,
    /// The same, per provider (providers with a cost only), highest first.
    pub by_provider: Vec<ProviderSpend>,
}

/// The signed-in user's balance and 30-day spend.
#[utoipa::path(get, path = "/api/me/balance", tag = "usage", security(("access_token" = [])),
    responses((status = 200, body = BalanceView), (status = 401, body = crate::error::ErrorBody)))]
async fn my_balance(
    State(state): State<AppState>,
    user: CurrentUser,
) -> ApiResult<Json<BalanceView>> {
    let filter = UsageFilter {
        user_id: Some(user.id().to_owned()),
        from: Some(Utc::now() - chrono::Duration::days(30)),
        ..Default::default()
    };
    let groups = store::usage::report(&state.db, &filter, GroupBy::Provider).await?;
    // Saturating: each group already is (`store::usage::saturating_sum`).
    let spent = groups
        .iter()
        .fold(0i64, |acc, g| acc.saturating_add(g.cost_nanos));
    Ok(Json(BalanceView {
        balance_usd: nanos_to_usd(user.user.balance_nanos),
        spent_usd_30d: nanos_to_usd(spent),
        by_provider: groups
            .into_iter()
            .filter(|g| g.cost_nanos != 0)
            .map(|g| ProviderSpend {
                provider: g.grp,
                cost_usd: nanos_to_usd(g.cost_nanos),
            })
            .collect(),
    }))
}

/// The signed-in user's balance ledger, newest first; the entries sum to the balance.
#[utoipa::path(get, path = "/api/me/balance/transactions", tag = "usage",
    security(("access_token" = [])),
    params(PageParams),
    responses((status = 200, body = Paginated<LedgerEntryView>), (status = 401, body = crate::error::ErrorBody)))]
async fn my_transactions(
    State(state): State<AppState>,
    user: CurrentUser,
    Query(p): Query<PageParams>,
) -> ApiResult<Json<Paginated<LedgerEntryView>>> {
    let req = p.req()?;
    let page = store::ledger::list_for_user(&state.db, user.id(), req).await?;
    Ok(Json(Paginated::new(page, req, LedgerEntryView::from)))
}
