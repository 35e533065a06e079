//! Providers: the upstream APIs in the catalog, seeded from the config and managed by admins.

use chrono::Utc;
use entity::providers;
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, DbErr, EntityTrait, IntoActiveModel,
    PaginatorTrait, QueryFilter, QueryOrder, QuerySelect, Set,
};

use super::{Page, PageReq};
use crate::config::ProviderSeed;

/// A provider to create.
#[derive(Debug, Clone, Default)]
pub struct NewProvider {
    pub key: String,
    pub display_name: String,
    pub base_url: String,
    pub kind: String,
    pub is_active: bool,
    pub sort_order: i32,
    pub supports_responses: bool,
    pub api_version: Option<String>,
    pub region: Option<String>,
}

/// Fields an admin may change: `None` = unchanged; `Some(None)` clears a nullable column.
#[derive(Debug, Clone, Default)]
pub struct ProviderPatch {
    pub display_name: Option<String>,
    pub base_url: Option<String>,
    pub kind: Option<String>,
    pub is_active: Option<bool>,
    pub sort_order: Option<i32>,
    pub supports_responses: Option<bool>,
    pub api_version: Option<Option<String>>,
    pub region: Option<Option<String>>,
}

/// Creates the configured providers that do not exist yet; existing rows are left as the admin
/// edited them. Safe when several replicas start at once. Returns how many were created.
pub async fn seed(db: &impl ConnectionTrait, seeds: &[ProviderSeed]) -> Result<u64, DbErr> {
    let mut created = 0;
    for s in seeds {
        let now = Utc::now();
        // `Config::validate` made sure only a bedrock provider (with a region) has no base_url.
        let base_url = match (&s.region, s.base_url.is_empty()) {
            (Some(region), true) => crate::validate::bedrock_base_url(region),
            _ => s.base_url.trim_end_matches('/').to_owned(),
        };
        let row = providers::ActiveModel {
            key: Set(s.key.clone()),
            display_name: Set(s.display_name.clone()),
            base_url: Set(base_url),
            kind: Set(s.kind.clone()),
            is_active: Set(s.is_active),
            sort_order: Set(s.sort_order),
            supports_responses: Set(s.supports_responses),
            api_version: Set(s.api_version.clone()),
            region: Set(s.region.clone()),
            created_at: Set(now),
            updated_at: Set(now),
        };
        let res = providers::Entity::insert(row)
            .on_conflict_do_nothing()
            .exec_without_returning(db)
            .await?;
        if let sea_orm::TryInsertResult::Inserted(n) = res {
            created += n.min(1);
        }
    }
    Ok(created)
}

pub async fn find(db: &impl ConnectionTrait, key: &str) -> Result<Option<providers::Model>, DbErr> {
    providers::Entity::find_by_id(key.to_owned()).one(db).await
}

/// Ordered by `sort_order`, then key.
pub async fn list(
    db: &impl ConnectionTrait,
    active_only: bool,
    page: PageReq,
) -> Result<Page<providers::Model>, DbErr> {
    let mut q = providers::Entity::find();
    if active_only {
        q = q.filter(providers::Column::IsActive.eq(true));
    }
    let total = q.clone().count(db).await?;
    let items = q
        .order_by_asc(providers::Column::SortOrder)
        .order_by_asc(providers::Column::Key)
        .offset(page.offset())
        .limit(page.per_page)
        .all(db)
        .await?;
    Ok(Page { items, total })
}

/// Every provider, active or not (the catalog cache).
pub async fn all(db: &impl ConnectionTrait) -> Result<Vec<providers::Model>, DbErr> {
    providers::Entity::find()
        .order_by_asc(providers::Column::SortOrder)
        .order_by_asc(providers::Column::Key)
        .all(db)
        .await
}

/// Inserts; a duplicate key is a unique violation (`store::is_unique_violation`).
pub async fn create(db: &impl ConnectionTrait, p: NewProvider) -> Result<providers::Model, DbErr> {
    let now = Utc::now();
    providers::ActiveModel {
        key: Set(p.key),
        display_name: Set(p.display_name),
        base_url: Set(p.base_url),
        kind: Set(p.kind),
        is_active: Set(p.is_active),
        sort_order: Set(p.sort_order),
        supports_responses: Set(p.supports_responses),
        api_version: Set(p.api_version),
        region: Set(p.region),
        created_at: Set(now),
        updated_at: Set(now),
    }
    .insert(db)
    .await
}

/// Applies a patch; `None` when there is no such provider.
pub async fn update(
    db: &impl ConnectionTrait,
    key: &str,
    patch: ProviderPatch,
) -> Result<Option<providers::Model>, DbErr> {
    let Some(row) = find(db, key).await? else {
        return Ok(None);
    };
    let mut am = row.into_active_model();
    if let Some(v) = patch.display_name {
        am.display_name = Set(v);
    }
    if let Some(v) = patch.base_url {
        am.base_url = Set(v);
    }
    if let Some(v) = patch.kind {
        am.kind = Set(v);
    }
    if let Some(v) = patch.is_active {
        am.is_active = Set(v);
    }
    if let Some(v) = patch.sort_order {
        am.sort_order = Set(v);
    }
    if let Some(v) = patch.supports_responses {
        am.supports_responses = Set(v);
    }
    if let Some(v) = patch.api_version {
        am.api_version = Set(v);
    }
    if let Some(v) = patch.region {
        am.region = Set(v);
    }
    am.updated_at = Set(Utc::now());
    am.update(db).await.map(Some)
}
