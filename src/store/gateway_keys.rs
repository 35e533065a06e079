//! Gateway keys: the `sk-tg-…` keys SDKs present on `/v1`; only a SHA-256 of the secret is kept.

use chrono::{DateTime, Utc};
use entity::gateway_keys;
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, DbErr, EntityTrait, IntoActiveModel,
    PaginatorTrait, QueryFilter, QueryOrder, QuerySelect, Set,
};

use super::{Page, PageReq};

/// A gateway key to store. `allowed_models` / `allowed_ips` are JSON arrays (`None` = any).
#[derive(Debug, Clone)]
pub struct NewGatewayKey {
    pub user_id: String,
    pub name: String,
    pub key_hash: String,
    pub masked: String,
    pub allowed_models: Option<String>,
    pub allowed_ips: Option<String>,
    pub rpm_limit: Option<i32>,
    pub tpm_limit: Option<i32>,
    pub budget_nanos: Option<i64>,
    pub expires_at: Option<DateTime<Utc>>,
}

/// Fields an owner may change: `None` = unchanged; `Some(None)` clears a nullable column.
#[derive(Debug, Clone, Default)]
pub struct GatewayKeyPatch {
    pub name: Option<String>,
    pub allowed_models: Option<Option<String>>,
    pub allowed_ips: Option<Option<String>>,
    pub rpm_limit: Option<Option<i32>>,
    pub tpm_limit: Option<Option<i32>>,
    pub budget_nanos: Option<Option<i64>>,
    pub expires_at: Option<Option<DateTime<Utc>>>,
    pub is_active: Option<bool>,
    /// Seconds of response caching (0 = off).
    pub cache_ttl_secs: Option<i32>,
    /// A rotated secret: `(key_hash, masked)`.
    pub secret: Option<(String, String)>,
}

pub async fn create(
    db: &impl ConnectionTrait,
    k: NewGatewayKey,
) -> Result<gateway_keys::Model, DbErr> {
    create_with_cache(db, k, 0).await
}

/// [`create`] with the key's response-cache TTL in seconds (0 = off).
pub async fn create_with_cache(
    db: &impl ConnectionTrait,
    k: NewGatewayKey,
    cache_ttl_secs: i32,
) -> Result<gateway_keys::Model, DbErr> {
    let now = Utc::now();
    gateway_keys::ActiveModel {
        id: Set(super::new_id()),
        user_id: Set(k.user_id),
        name: Set(k.name),
        key_hash: Set(k.key_hash),
        masked: Set(k.masked),
        allowed_models: Set(k.allowed_models),
        allowed_ips: Set(k.allowed_ips),
        rpm_limit: Set(k.rpm_limit),
        tpm_limit: Set(k.tpm_limit),
        budget_nanos: Set(k.budget_nanos),
        spent_nanos: Set(0),
        reserved_nanos: Set(0),
        expires_at: Set(k.expires_at),
        is_active: Set(true),
        last_used_at: Set(None),
        created_at: Set(now),
        updated_at: Set(now),
        cache_ttl_secs: Set(cache_ttl_secs.max(0)),
    }
    .insert(db)
    .await
}

/// The key with this secret hash (the hot path's lookup, on a cache miss).
pub async fn find_by_hash(
    db: &impl ConnectionTrait,
    key_hash: &str,
) -> Result<Option<gateway_keys::Model>, DbErr> {
    gateway_keys::Entity::find()
        .filter(gateway_keys::Column::KeyHash.eq(key_hash))
        .one(db)
        .await
}

/// The row when it belongs to `user_id` (another user's id is "not found").
pub async fn find_owned(
    db: &impl ConnectionTrait,
    user_id: &str,
    id: &str,
) -> Result<Option<gateway_keys::Model>, DbErr> {
    gateway_keys::Entity::find_by_id(id.to_owned())
        .filter(gateway_keys::Column::UserId.eq(user_id))
        .one(db)
        .await
}

/// A user's gateway keys, newest first.
pub async fn list_owned(
    db: &impl ConnectionTrait,
    user_id: &str,
    page: PageReq,
) -> Result<Page<gateway_keys::Model>, DbErr> {
    let q = gateway_keys::Entity::find().filter(gateway_keys::Column::UserId.eq(user_id));
    let total = q.clone().count(db).await?;
    let items = q
        .order_by_desc(gateway_keys::Column::CreatedAt)
        .order_by_desc(gateway_keys::Column::Id)
        .offset(page.offset())
        .limit(page.per_page)
        .all(db)
        .await?;
    Ok(Page { items, total })
}

/// Applies a patch to a key the user owns. Returns `(before, after)`, or `None` when there is
/// no such key for them (the caller invalidates the old hash).
pub async fn update_owned(
    db: &impl ConnectionTrait,
    user_id: &str,
    id: &str,
    p: GatewayKeyPatch,
) -> Result<Option<(gateway_keys::Model, gateway_keys::Model)>, DbErr> {
    let Some(before) = find_owned(db, user_id, id).await? else {
        return Ok(None);
    };
    let mut am = before.clone().into_active_model();
    if let Some(v) = p.name {
        am.name = Set(v);
    }
    if let Some(v) = p.allowed_models {
        am.allowed_models = Set(v);
    }
    if let Some(v) = p.allowed_ips {
        am.allowed_ips = Set(v);
    }
    if let Some(v) = p.rpm_limit {
        am.rpm_limit = Set(v);
    }
    if let Some(v) = p.tpm_limit {
        am.tpm_limit = Set(v);
    }
    if let Some(v) = p.budget_nanos {
        am.budget_nanos = Set(v);
    }
    if let Some(v) = p.expires_at {
        am.expires_at = Set(v);
    }
    if let Some(v) = p.is_active {
        am.is_active = Set(v);
    }
    if let Some(v) = p.cache_ttl_secs {
        am.cache_ttl_secs = Set(v.max(0));
    }
    if let Some((hash, masked)) = p.secret {
        am.key_hash = Set(hash);
        am.masked = Set(masked);
    }
    am.updated_at = Set(Utc::now());
    let after = am.update(db).await?;
    Ok(Some((before, after)))
}

/// Hard delete of a key the user owns (usage records keep its id); the deleted row, if any.
pub async fn delete_owned(
    db: &impl ConnectionTrait,
    user_id: &str,
    id: &str,
) -> Result<Option<gateway_keys::Model>, DbErr> {
    let Some(row) = find_owned(db, user_id, id).await? else {
        return Ok(None);
    };
    gateway_keys::Entity::delete_by_id(row.id.clone())
        .exec(db)
        .await?;
    Ok(Some(row))
}
