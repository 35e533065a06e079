//! Sessions: one row per access token, revocable at once.

use chrono::{DateTime, Utc};
use entity::sessions;
use sea_orm::sea_query::Expr;
use sea_orm::{ActiveModelTrait, ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, Set};

pub async fn create(
    db: &impl ConnectionTrait,
    user_id: &str,
    expires_at: DateTime<Utc>,
    ip: Option<&str>,
    user_agent: Option<&str>,
) -> Result<sessions::Model, sea_orm::DbErr> {
    sessions::ActiveModel {
        id: Set(super::new_id()),
        user_id: Set(user_id.to_owned()),
        created_at: Set(Utc::now()),
        expires_at: Set(expires_at),
        revoked_at: Set(None),
        ip: Set(ip.map(str::to_owned)),
        user_agent: Set(user_agent.map(|s| s.chars().take(255).collect())),
    }
    .insert(db)
    .await
}

pub async fn find(
    db: &impl ConnectionTrait,
    id: &str,
) -> Result<Option<sessions::Model>, sea_orm::DbErr> {
    sessions::Entity::find_by_id(id.to_owned()).one(db).await
}

pub async fn revoke(db: &impl ConnectionTrait, id: &str) -> Result<(), sea_orm::DbErr> {
    sessions::Entity::update_many()
        .col_expr(sessions::Column::RevokedAt, Expr::value(Utc::now()))
        .filter(sessions::Column::Id.eq(id))
        .filter(sessions::Column::RevokedAt.is_null())
        .exec(db)
        .await?;
    Ok(())
}

/// Revokes every live session of a user, except `keep` (the caller's own, when it should survive).
pub async fn revoke_all(
    db: &impl ConnectionTrait,
    user_id: &str,
    keep: Option<&str>,
) -> Result<u64, sea_orm::DbErr> {
    let mut q = sessions::Entity::update_many()
        .col_expr(sessions::Column::RevokedAt, Expr::value(Utc::now()))
        .filter(sessions::Column::UserId.eq(user_id))
        .filter(sessions::Column::RevokedAt.is_null());
    if let Some(k) = keep {
        q = q.filter(sessions::Column::Id.ne(k));
    }
    Ok(q.exec(db).await?.rows_affected)
}
