//! Models: the priced catalog clients choose from (prices in nano-dollars: per 1M tokens, per
//! image, per minute of audio, per 1M characters).

use chrono::Utc;
use entity::{models, providers};
use sea_orm::sea_query::{Expr, ExprTrait, Query};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, DatabaseConnection, DbErr, EntityTrait,
    IntoActiveModel, PaginatorTrait, QueryFilter, QueryOrder, QuerySelect, Set, TransactionTrait,
};

use super::{Page, PageReq};

/// A model to create.
#[derive(Debug, Clone, Default)]
pub struct NewModel {
    pub name: String,
    pub display_name: String,
    pub provider_key: String,
    pub upstream_model: String,
    pub model_type: String,
    pub input_price_nanos: i64,
    pub output_price_nanos: i64,
    pub cached_input_price_nanos: Option<i64>,
    pub cache_write_input_price_nanos: Option<i64>,
    pub price_per_image_nanos: Option<i64>,
    pub price_per_minute_nanos: Option<i64>,
    pub price_per_1m_chars_nanos: Option<i64>,
    pub context_window: Option<i32>,
    pub max_output_tokens: Option<i32>,
    pub supports_streaming: bool,
    pub supports_tools: bool,
    pub supports_vision: bool,
    pub description: Option<String>,
    pub is_active: bool,
    pub sort_order: i32,
    /// JSON list of deployments when there are several (see `routing::deployment`).
    pub deployments: Option<String>,
    /// JSON list of fallback model names.
    pub fallbacks: Option<String>,
}

/// Fields an admin may change: `None` = unchanged; `Some(None)` clears a nullable column.
#[derive(Debug, Clone, Default)]
pub struct ModelPatch {
    pub name: Option<String>,
    pub display_name: Option<String>,
    pub provider_key: Option<String>,
    pub upstream_model: Option<String>,
    pub model_type: Option<String>,
    pub input_price_nanos: Option<i64>,
    pub output_price_nanos: Option<i64>,
    pub cached_input_price_nanos: Option<Option<i64>>,
    pub cache_write_input_price_nanos: Option<Option<i64>>,
    pub price_per_image_nanos: Option<Option<i64>>,
    pub price_per_minute_nanos: Option<Option<i64>>,
    pub price_per_1m_chars_nanos: Option<Option<i64>>,
    pub context_window: Option<Option<i32>>,
    pub max_output_tokens: Option<Option<i32>>,
    pub supports_streaming: Option<bool>,
    pub supports_tools: Option<bool>,
    pub supports_vision: Option<bool>,
    pub description: Option<Option<String>>,
    pub is_active: Option<bool>,
    pub sort_order: Option<i32>,
    pub deployments: Option<Option<String>>,
    pub fallbacks: Option<Option<String>>,
}

/// `GET /api/models` filters.
#[derive(Debug, Clone, Default)]
pub struct ModelFilter {
    /// Only models that are active on an active provider (what `/v1` serves).
    pub active_only: bool,
    pub provider_key: Option<String>,
    pub model_type: Option<String>,
}

pub async fn find(db: &impl ConnectionTrait, id: &str) -> Result<Option<models::Model>, DbErr> {
    models::Entity::find_by_id(id.to_owned()).one(db).await
}

/// Ordered by `sort_order`, then name.
pub async fn list(
    db: &impl ConnectionTrait,
    f: &ModelFilter,
    page: PageReq,
) -> Result<Page<models::Model>, DbErr> {
    let mut q = models::Entity::find();
    if f.active_only {
        q = q.filter(models::Column::IsActive.eq(true)).filter(
            models::Column::ProviderKey.in_subquery(
                Query::select()
                    .column(providers::Column::Key)
                    .from(providers::Entity)
                    .and_where(Expr::col(providers::Column::IsActive).eq(true))
                    .to_owned(),
            ),
        );
    }
    if let Some(p) = &f.provider_key {
        q = q.filter(models::Column::ProviderKey.eq(p.as_str()));
    }
    if let Some(t) = &f.model_type {
        q = q.filter(models::Column::ModelType.eq(t.as_str()));
    }
    let total = q.clone().count(db).await?;
    let items = q
        .order_by_asc(models::Column::SortOrder)
        .order_by_asc(models::Column::Name)
        .offset(page.offset())
        .limit(page.per_page)
        .all(db)
        .await?;
    Ok(Page { items, total })
}

/// Every model, active or not (the catalog cache).
pub async fn all(db: &impl ConnectionTrait) -> Result<Vec<models::Model>, DbErr> {
    models::Entity::find()
        .order_by_asc(models::Column::SortOrder)
        .order_by_asc(models::Column::Name)
        .all(db)
        .await
}

/// Inserts; a duplicate name is a unique violation (`store::is_unique_violation`).
pub async fn create(db: &impl ConnectionTrait, m: NewModel) -> Result<models::Model, DbErr> {
    let now = Utc::now();
    models::ActiveModel {
        id: Set(super::new_id()),
        name: Set(m.name),
        display_name: Set(m.display_name),
        provider_key: Set(m.provider_key),
        upstream_model: Set(m.upstream_model),
        model_type: Set(m.model_type),
        input_price_nanos: Set(m.input_price_nanos),
        output_price_nanos: Set(m.output_price_nanos),
        cached_input_price_nanos: Set(m.cached_input_price_nanos),
        cache_write_input_price_nanos: Set(m.cache_write_input_price_nanos),
        price_per_image_nanos: Set(m.price_per_image_nanos),
        price_per_minute_nanos: Set(m.price_per_minute_nanos),
        price_per_1m_chars_nanos: Set(m.price_per_1m_chars_nanos),
        context_window: Set(m.context_window),
        max_output_tokens: Set(m.max_output_tokens),
        supports_streaming: Set(m.supports_streaming),
        supports_tools: Set(m.supports_tools),
        supports_vision: Set(m.supports_vision),
        description: Set(m.description),
        is_active: Set(m.is_active),
        sort_order: Set(m.sort_order),
        deployments: Set(m.deployments),
        fallbacks: Set(m.fallbacks),
        created_at: Set(now),
        updated_at: Set(now),
    }
    .insert(db)
    .await
}

/// Applies a patch; `None` when there is no such model.
pub async fn update(
    db: &impl ConnectionTrait,
    id: &str,
    p: ModelPatch,
) -> Result<Option<models::Model>, DbErr> {
    let Some(row) = find(db, id).await? else {
        return Ok(None);
    };
    let mut am = row.into_active_model();
    macro_rules! apply {
        ($($field:ident),*) => {$(
            if let Some(v) = p.$field {
                am.$field = Set(v);
            }
        )*};
    }
    apply!(
        name,
        display_name,
        provider_key,
        upstream_model,
        model_type,
        input_price_nanos,
        output_price_nanos,
        cached_input_price_nanos,
        cache_write_input_price_nanos,
        price_per_image_nanos,
        price_per_minute_nanos,
        price_per_1m_chars_nanos,
        context_window,
        max_output_tokens,
        supports_streaming,
        supports_tools,
        supports_vision,
        description,
        is_active,
        sort_order,
        deployments,
        fallbacks
    );
    am.updated_at = Set(Utc::now());
    am.update(db).await.map(Some)
}

/// Flips `is_active`; `None` when there is no such model.
pub async fn toggle(db: &impl ConnectionTrait, id: &str) -> Result<Option<models::Model>, DbErr> {
    let Some(row) = find(db, id).await? else {
        return Ok(None);
    };
    let active = !row.is_active;
    update(
        db,
        id,
        ModelPatch {
            is_active: Some(active),
            ..Default::default()
        },
    )
    .await
}

/// Hard delete; true when a row went away. Usage records keep the model's name as text.
pub async fn delete(db: &impl ConnectionTrait, id: &str) -> Result<bool, DbErr> {
    let res = models::Entity::delete_by_id(id.to_owned()).exec(db).await?;
    Ok(res.rows_affected > 0)
}

/// Sets `sort_order` for each `(id, sort_order)` in one transaction. Returns the ids that do not
/// exist (nothing is changed then).
pub async fn reorder(
    db: &DatabaseConnection,
    order: &[(String, i32)],
) -> Result<Vec<String>, DbErr> {
    let txn = db.begin().await?;
    let ids: Vec<String> = order.iter().map(|(id, _)| id.clone()).collect();
    let found: Vec<String> = models::Entity::find()
        .select_only()
        .column(models::Column::Id)
        .filter(models::Column::Id.is_in(ids.clone()))
        .into_tuple()
        .all(&txn)
        .await?;
    let missing: Vec<String> = ids.into_iter().filter(|id| !found.contains(id)).collect();
    if !missing.is_empty() {
        txn.rollback().await?;
        return Ok(missing);
    }
    let now = Utc::now();
    for (id, sort_order) in order {
        models::Entity::update_many()
            .col_expr(models::Column::SortOrder, Expr::value(*sort_order))
            .col_expr(models::Column::UpdatedAt, Expr::value(now))
            .filter(models::Column::Id.eq(id.as_str()))
            .exec(&txn)
            .await?;
    }
    txn.commit().await?;
    Ok(Vec::new())
}

/// The models with these ids, ordered as the catalog is.
pub async fn find_many(
    db: &impl ConnectionTrait,
    ids: &[String],
) -> Result<Vec<models::Model>, DbErr> {
    models::Entity::find()
        .filter(models::Column::Id.is_in(ids.to_vec()))
        .order_by_asc(models::Column::SortOrder)
        .order_by_asc(models::Column::Name)
        .all(db)
        .await
}
