//! Reading usage records (the writer is `usage_writer`).

use chrono::{DateTime, Utc};
use entity::usage_records;
use sea_orm::{
    ColumnTrait, ConnectionTrait, EntityTrait, PaginatorTrait, QueryFilter, QueryOrder,
    QuerySelect, Select,
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
