//! The admin dashboard's headline numbers (`GET /api/admin/stats`), counted in SQL.

use chrono::{DateTime, Utc};
use entity::{gateway_keys, users};
use sea_orm::sea_query::ExprTrait;
use sea_orm::{ColumnTrait, ConnectionTrait, EntityTrait, PaginatorTrait, QueryFilter};

use super::usage::{self, UsageFilter, UsageTotals};

#[derive(Debug, Clone, Copy)]
pub struct Overview {
    /// Every account, whatever its status.
    pub users: u64,
    /// Gateway keys that are switched on and not expired.
    pub active_keys: u64,
    /// Usage since `since`, across all users.
    pub usage: UsageTotals,
    /// Stored state (API.md §9): counts only, never content.
    pub stored_responses: u64,
    pub conversations: u64,
    pub stored_completions: u64,
}

pub async fn overview(
    db: &impl ConnectionTrait,
    now: DateTime<Utc>,
    since: DateTime<Utc>,
) -> Result<Overview, sea_orm::DbErr> {
    let users = users::Entity::find().count(db).await?;
    let active_keys = gateway_keys::Entity::find()
        .filter(gateway_keys::Column::IsActive.eq(true))
        .filter(
            gateway_keys::Column::ExpiresAt
                .is_null()
                .or(gateway_keys::Column::ExpiresAt.gt(now)),
        )
        .count(db)
        .await?;
    let usage = usage::totals(
        db,
        &UsageFilter {
            from: Some(since),
            ..Default::default()
        },
    )
    .await?;
    Ok(Overview {
        users,
        active_keys,
        usage,
        stored_responses: super::responses::count(db).await?,
        conversations: super::conversations::count(db).await?,
        stored_completions: super::completions::count(db).await?,
    })
}
