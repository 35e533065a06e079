//! Provider keys: users' own upstream credentials, sealed with the master key ring (AAD = row id).

use chrono::Utc;
use entity::provider_keys;
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, DbErr, EntityTrait, IntoActiveModel,
    PaginatorTrait, QueryFilter, QueryOrder, QuerySelect, Set,
};

use super::{Page, PageReq};
use crate::crypto::{self, KeyRing};

/// A provider key to store. The secret is sealed here, never written in clear.
#[derive(Debug, Clone)]
pub struct NewProviderKey<'a> {
    pub user_id: &'a str,
    pub provider_key: &'a str,
    pub api_key: &'a str,
    pub base_url: Option<String>,
    pub label: Option<String>,
    pub shared: bool,
    /// Share of the pool (1–100).
    pub weight: i32,
}

/// Fields an owner may change: `None` = unchanged; `Some(None)` clears a nullable column.
#[derive(Debug, Clone, Default)]
pub struct ProviderKeyPatch {
    /// A new secret (sealed here).
    pub api_key: Option<String>,
    pub base_url: Option<Option<String>>,
    pub label: Option<Option<String>>,
    pub shared: Option<bool>,
    pub is_active: Option<bool>,
    pub weight: Option<i32>,
}

/// A key in use.
pub const STATUS_ACTIVE: &str = "active";
/// A key its upstream answered 401/403: out of use until its owner edits or re-verifies it.
pub const STATUS_INVALID: &str = "invalid";

/// The most keys one pool holds (a user's own for one provider, or the shared ones): the
/// newest are used.
pub const MAX_POOL: u64 = 32;

/// Seals `api_key` under the ring's newest key with the new row's id as associated data.
pub async fn create(
    db: &impl ConnectionTrait,
    ring: &KeyRing,
    k: NewProviderKey<'_>,
) -> Result<provider_keys::Model, DbErr> {
    let id = super::new_id();
    let now = Utc::now();
    provider_keys::ActiveModel {
        secret_enc: Set(ring.seal(k.api_key.as_bytes(), &id)),
        master_key_id: Set(ring.current_id().to_owned()),
        masked: Set(crypto::mask(k.api_key)),
        id: Set(id),
        user_id: Set(k.user_id.to_owned()),
        provider_key: Set(k.provider_key.to_owned()),
        label: Set(k.label),
        base_url: Set(k.base_url),
        shared: Set(k.shared),
        is_active: Set(true),
        weight: Set(k.weight),
        status: Set(STATUS_ACTIVE.to_owned()),
        created_at: Set(now),
        updated_at: Set(now),
        last_used_at: Set(None),
    }
    .insert(db)
    .await
}

/// The row when it belongs to `user_id` (another user's id is "not found").
pub async fn find_owned(
    db: &impl ConnectionTrait,
    user_id: &str,
    id: &str,
) -> Result<Option<provider_keys::Model>, DbErr> {
    provider_keys::Entity::find_by_id(id.to_owned())
        .filter(provider_keys::Column::UserId.eq(user_id))
        .one(db)
        .await
}

/// A user's own provider keys, newest first.
pub async fn list_owned(
    db: &impl ConnectionTrait,
    user_id: &str,
    page: PageReq,
) -> Result<Page<provider_keys::Model>, DbErr> {
    let q = provider_keys::Entity::find().filter(provider_keys::Column::UserId.eq(user_id));
    let total = q.clone().count(db).await?;
    let items = q
        .order_by_desc(provider_keys::Column::CreatedAt)
        .order_by_desc(provider_keys::Column::Id)
        .offset(page.offset())
        .limit(page.per_page)
        .all(db)
        .await?;
    Ok(Page { items, total })
}

/// Applies a patch to a row the user owns; `None` when there is no such row for them.
pub async fn update_owned(
    db: &impl ConnectionTrait,
    ring: &KeyRing,
    user_id: &str,
    id: &str,
    p: ProviderKeyPatch,
) -> Result<Option<provider_keys::Model>, DbErr> {
    let Some(row) = find_owned(db, user_id, id).await? else {
        return Ok(None);
    };
    let mut am = row.into_active_model();
    if let Some(secret) = p.api_key {
        am.secret_enc = Set(ring.seal(secret.as_bytes(), id));
        am.master_key_id = Set(ring.current_id().to_owned());
        am.masked = Set(crypto::mask(&secret));
    }
    if let Some(v) = p.base_url {
        am.base_url = Set(v);
    }
    if let Some(v) = p.label {
        am.label = Set(v);
    }
    if let Some(v) = p.shared {
        am.shared = Set(v);
    }
    if let Some(v) = p.is_active {
        am.is_active = Set(v);
    }
    if let Some(v) = p.weight {
        am.weight = Set(v);
    }
    // An owner's edit puts a key its upstream refused back into use (spec §11).
    am.status = Set(STATUS_ACTIVE.to_owned());
    am.updated_at = Set(Utc::now());
    am.update(db).await.map(Some)
}

/// Hard delete of a row the user owns; the deleted row, or `None` when there was none.
pub async fn delete_owned(
    db: &impl ConnectionTrait,
    user_id: &str,
    id: &str,
) -> Result<Option<provider_keys::Model>, DbErr> {
    let Some(row) = find_owned(db, user_id, id).await? else {
        return Ok(None);
    };
    provider_keys::Entity::delete_by_id(row.id.clone())
        .exec(db)
        .await?;
    Ok(Some(row))
}

/// The pool a request by `user_id` to `provider` uses: the user's own active keys, else the
/// active keys an admin marked shared (while that admin is still an active administrator);
/// newest first, at most [`MAX_POOL`], keys marked invalid left out.
pub async fn find_pool(
    db: &impl ConnectionTrait,
    user_id: &str,
    provider: &str,
) -> Result<Vec<provider_keys::Model>, DbErr> {
    let own = provider_keys::Entity::find()
        .filter(provider_keys::Column::UserId.eq(user_id))
        .filter(provider_keys::Column::ProviderKey.eq(provider))
        .filter(provider_keys::Column::IsActive.eq(true))
        .filter(provider_keys::Column::Status.ne(STATUS_INVALID))
        .order_by_desc(provider_keys::Column::CreatedAt)
        .order_by_desc(provider_keys::Column::Id)
        .limit(MAX_POOL)
        .all(db)
        .await?;
    if !own.is_empty() {
        return Ok(own);
    }
    let active_admins = sea_orm::sea_query::Query::select()
        .column(entity::users::Column::Id)
        .from(entity::users::Entity)
        .and_where(entity::users::Column::Status.eq("active"))
        .and_where(entity::users::Column::Role.eq("admin"))
        .to_owned();
    provider_keys::Entity::find()
        .filter(provider_keys::Column::ProviderKey.eq(provider))
        .filter(provider_keys::Column::Shared.eq(true))
        .filter(provider_keys::Column::IsActive.eq(true))
        .filter(provider_keys::Column::Status.ne(STATUS_INVALID))
        .filter(provider_keys::Column::UserId.in_subquery(active_admins))
        .order_by_desc(provider_keys::Column::CreatedAt)
        .order_by_desc(provider_keys::Column::Id)
        .limit(MAX_POOL)
        .all(db)
        .await
}

/// Any row by id (the gateway marking a key its upstream refused; the owner is in the row).
pub async fn find(
    db: &impl ConnectionTrait,
    id: &str,
) -> Result<Option<provider_keys::Model>, DbErr> {
    provider_keys::Entity::find_by_id(id.to_owned())
        .one(db)
        .await
}

/// Sets `status` (`active` | `invalid`); true when the row changed.
pub async fn set_status(db: &impl ConnectionTrait, id: &str, status: &str) -> Result<bool, DbErr> {
    let res = provider_keys::Entity::update_many()
        .col_expr(
            provider_keys::Column::Status,
            sea_orm::sea_query::Expr::value(status),
        )
        .col_expr(
            provider_keys::Column::UpdatedAt,
            sea_orm::sea_query::Expr::value(Utc::now()),
        )
        .filter(provider_keys::Column::Id.eq(id))
        .filter(provider_keys::Column::Status.ne(status))
        .exec(db)
        .await?;
    Ok(res.rows_affected > 0)
}

/// The key a request by `user_id` to `provider` uses: the user's own newest active key, else the
/// newest active key an admin marked shared.
pub async fn find_for_use(
    db: &impl ConnectionTrait,
    user_id: &str,
    provider: &str,
) -> Result<Option<provider_keys::Model>, DbErr> {
    let own = provider_keys::Entity::find()
        .filter(provider_keys::Column::UserId.eq(user_id))
        .filter(provider_keys::Column::ProviderKey.eq(provider))
        .filter(provider_keys::Column::IsActive.eq(true))
        .order_by_desc(provider_keys::Column::CreatedAt)
        .order_by_desc(provider_keys::Column::Id)
        .one(db)
        .await?;
    if own.is_some() {
        return Ok(own);
    }
    // A shared key serves others only while its owner is still an active administrator.
    let active_admins = sea_orm::sea_query::Query::select()
        .column(entity::users::Column::Id)
        .from(entity::users::Entity)
        .and_where(entity::users::Column::Status.eq("active"))
        .and_where(entity::users::Column::Role.eq("admin"))
        .to_owned();
    provider_keys::Entity::find()
        .filter(provider_keys::Column::ProviderKey.eq(provider))
        .filter(provider_keys::Column::Shared.eq(true))
        .filter(provider_keys::Column::IsActive.eq(true))
        .filter(provider_keys::Column::UserId.in_subquery(active_admins))
        .order_by_desc(provider_keys::Column::CreatedAt)
        .order_by_desc(provider_keys::Column::Id)
        .one(db)
        .await
}
