//! IP records: per user, the addresses they signed in from, when first and last, how often.

use chrono::{DateTime, Utc};
use entity::ip_records;
use sea_orm::sea_query::{Expr, ExprTrait};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, EntityTrait, PaginatorTrait, QueryFilter,
    QueryOrder, QuerySelect, Set,
};

use super::{Page, PageReq};

/// Counts one sign-in of `user_id` from `ip` at `at`: bumps the row, or creates it. Portable (no
/// backend-specific upsert) and safe when two replicas record the first sign-in at once.
pub async fn touch(
    db: &impl ConnectionTrait,
    user_id: &str,
    ip: &str,
    at: DateTime<Utc>,
) -> Result<(), sea_orm::DbErr> {
    for _ in 0..2 {
        if bump(db, user_id, ip, at).await? {
            return Ok(());
        }
        let inserted = ip_records::ActiveModel {
            user_id: Set(user_id.to_owned()),
            ip: Set(ip.to_owned()),
            first_seen: Set(at),
            last_seen: Set(at),
            count: Set(1),
            ..Default::default()
        }
        .insert(db)
        .await;
        match inserted {
            Ok(_) => return Ok(()),
            // Someone else inserted it between our update and insert: bump theirs.
            Err(e) if super::is_unique_violation(&e) => continue,
            Err(e) => return Err(e),
        }
    }
    bump(db, user_id, ip, at).await.map(|_| ())
}

async fn bump(
    db: &impl ConnectionTrait,
    user_id: &str,
    ip: &str,
    at: DateTime<Utc>,
) -> Result<bool, sea_orm::DbErr> {
    let res = ip_records::Entity::update_many()
        .col_expr(
            ip_records::Column::Count,
            Expr::col(ip_records::Column::Count).add(1),
        )
        .col_expr(ip_records::Column::LastSeen, Expr::value(at))
        .filter(ip_records::Column::UserId.eq(user_id))
        .filter(ip_records::Column::Ip.eq(ip))
        .exec(db)
        .await?;
    Ok(res.rows_affected > 0)
}

/// Has `user_id` signed in from `ip` before?
pub async fn is_known(
    db: &impl ConnectionTrait,
    user_id: &str,
    ip: &str,
) -> Result<bool, sea_orm::DbErr> {
    Ok(ip_records::Entity::find()
        .filter(ip_records::Column::UserId.eq(user_id))
        .filter(ip_records::Column::Ip.eq(ip))
        .count(db)
        .await?
        > 0)
}

/// A user's addresses, most recently seen first.
pub async fn list_for_user(
    db: &impl ConnectionTrait,
    user_id: &str,
    page: PageReq,
) -> Result<Page<ip_records::Model>, sea_orm::DbErr> {
    let q = ip_records::Entity::find().filter(ip_records::Column::UserId.eq(user_id));
    let total = q.clone().count(db).await?;
    let items = q
        .order_by_desc(ip_records::Column::LastSeen)
        .order_by_desc(ip_records::Column::Id)
        .offset(page.offset())
        .limit(page.per_page)
        .all(db)
        .await?;
    Ok(Page { items, total })
}
