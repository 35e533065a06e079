//! Users: lookups and the conditional updates that keep second factors single-use.

use chrono::{DateTime, Utc};
use entity::users;
use sea_orm::sea_query::ExprTrait;
use sea_orm::sea_query::{Expr, Func, LikeExpr};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, EntityTrait, IntoActiveModel, PaginatorTrait,
    QueryFilter, QueryOrder, QuerySelect,
};

use super::{Page, PageReq};

pub async fn find(
    db: &impl ConnectionTrait,
    id: &str,
) -> Result<Option<users::Model>, sea_orm::DbErr> {
    users::Entity::find_by_id(id.to_owned()).one(db).await
}

/// The account whose username equals `username` ignoring case (usernames are unique that way on
/// every database). MySQL/MariaDB's collation already compares without case, through the plain
/// unique index; PostgreSQL and SQLite match `LOWER(username)`, which their unique expression
/// index (migration `m20261203_000001_username_case`) serves.
pub async fn find_by_username(
    db: &impl ConnectionTrait,
    username: &str,
) -> Result<Option<users::Model>, sea_orm::DbErr> {
    let q = users::Entity::find();
    let q = if db.get_database_backend() == sea_orm::DbBackend::MySql {
        q.filter(users::Column::Username.eq(username))
    } else {
        q.filter(
            Expr::expr(Func::lower(Expr::col(users::Column::Username)))
                .eq(username.to_ascii_lowercase()),
        )
    };
    q.one(db).await
}

/// Records `step` as the last accepted TOTP step, only if it is newer than the one stored.
/// Returns false when the code was already used (or an older one): the caller must refuse it.
/// Atomic in SQL, so two replicas cannot both accept one code.
pub async fn consume_totp_step(
    db: &impl ConnectionTrait,
    user_id: &str,
    step: i64,
) -> Result<bool, sea_orm::DbErr> {
    let res = users::Entity::update_many()
        .col_expr(users::Column::TotpLastStep, Expr::value(step))
        .filter(users::Column::Id.eq(user_id))
        .filter(
            users::Column::TotpLastStep
                .is_null()
                .or(users::Column::TotpLastStep.lt(step)),
        )
        .exec(db)
        .await?;
    Ok(res.rows_affected == 1)
}

/// Inserts a new user row as given.
pub async fn insert(
    db: &impl ConnectionTrait,
    user: users::Model,
) -> Result<users::Model, sea_orm::DbErr> {
    user.into_active_model().reset_all().insert(db).await
}

/// Filters of the admin user list; `None` = any.
#[derive(Debug, Clone, Default)]
pub struct UserFilter<'a> {
    /// Case-insensitive substring of the username or the e-mail address.
    pub search: Option<&'a str>,
    pub role: Option<&'a str>,
    pub status: Option<&'a str>,
}

/// `%`, `_` and the escape character itself match literally.
fn like_contains(s: &str) -> LikeExpr {
    let mut pattern = String::with_capacity(s.len() + 2);
    pattern.push('%');
    for c in s.to_lowercase().chars() {
        if matches!(c, '%' | '_' | '!') {
            pattern.push('!');
        }
        pattern.push(c);
    }
    pattern.push('%');
    LikeExpr::new(pattern).escape('!')
}

/// Users, newest first.
pub async fn list(
    db: &impl ConnectionTrait,
    filter: UserFilter<'_>,
    page: PageReq,
) -> Result<Page<users::Model>, sea_orm::DbErr> {
    let mut q = users::Entity::find();
    if let Some(s) = filter.search.map(str::trim).filter(|s| !s.is_empty()) {
        let lower = |c: users::Column| Expr::expr(Func::lower(Expr::col(c)));
        q = q.filter(
            lower(users::Column::Username)
                .like(like_contains(s))
                .or(lower(users::Column::Email).like(like_contains(s))),
        );
    }
    if let Some(r) = filter.role {
        q = q.filter(users::Column::Role.eq(r));
    }
    if let Some(st) = filter.status {
        q = q.filter(users::Column::Status.eq(st));
    }
    let total = q.clone().count(db).await?;
    let items = q
        .order_by_desc(users::Column::CreatedAt)
        .order_by_desc(users::Column::Id)
        .offset(page.offset())
        .limit(page.per_page)
        .all(db)
        .await?;
    Ok(Page { items, total })
}

/// Columns to change; `None` leaves a column as it is (`Some(None)` sets it to NULL).
#[derive(Debug, Clone, Default)]
pub struct UserChanges {
    pub email: Option<Option<String>>,
    pub password_hash: Option<String>,
    pub role: Option<String>,
    pub status: Option<String>,
    pub totp_secret_enc: Option<String>,
    pub totp_pending_enc: Option<Option<String>>,
    pub totp_last_step: Option<Option<i64>>,
    pub plan: Option<Option<String>>,
    pub plan_expires_at: Option<Option<DateTime<Utc>>>,
    pub rpm_limit: Option<Option<i32>>,
    pub last_login_at: Option<DateTime<Utc>>,
}

/// Applies `changes` (and bumps `updated_at`). Returns false when there is no such user.
pub async fn update(
    db: &impl ConnectionTrait,
    id: &str,
    changes: UserChanges,
) -> Result<bool, sea_orm::DbErr> {
    use users::Column as C;
    let mut q = users::Entity::update_many()
        .col_expr(C::UpdatedAt, Expr::value(Utc::now()))
        .filter(C::Id.eq(id));
    if let Some(v) = changes.email {
        q = q.col_expr(C::Email, Expr::value(v));
    }
    if let Some(v) = changes.password_hash {
        q = q.col_expr(C::PasswordHash, Expr::value(v));
    }
    if let Some(v) = changes.role {
        q = q.col_expr(C::Role, Expr::value(v));
    }
    if let Some(v) = changes.status {
        q = q.col_expr(C::Status, Expr::value(v));
    }
    if let Some(v) = changes.totp_secret_enc {
        q = q.col_expr(C::TotpSecretEnc, Expr::value(v));
    }
    if let Some(v) = changes.totp_pending_enc {
        q = q.col_expr(C::TotpPendingEnc, Expr::value(v));
    }
    if let Some(v) = changes.totp_last_step {
        q = q.col_expr(C::TotpLastStep, Expr::value(v));
    }
    if let Some(v) = changes.plan {
        q = q.col_expr(C::Plan, Expr::value(v));
    }
    if let Some(v) = changes.plan_expires_at {
        q = q.col_expr(C::PlanExpiresAt, Expr::value(v));
    }
    if let Some(v) = changes.rpm_limit {
        q = q.col_expr(C::RpmLimit, Expr::value(v));
    }
    if let Some(v) = changes.last_login_at {
        q = q.col_expr(C::LastLoginAt, Expr::value(v));
    }
    Ok(q.exec(db).await?.rows_affected > 0)
}

/// `pending_totp` → `active`, only from `pending_totp`. False when the status was something else.
pub async fn activate_pending(db: &impl ConnectionTrait, id: &str) -> Result<bool, sea_orm::DbErr> {
    let res = users::Entity::update_many()
        .col_expr(users::Column::Status, Expr::value("active"))
        .col_expr(users::Column::UpdatedAt, Expr::value(Utc::now()))
        .filter(users::Column::Id.eq(id))
        .filter(users::Column::Status.eq("pending_totp"))
        .exec(db)
        .await?;
    Ok(res.rows_affected == 1)
}

/// Makes the pending (rotated) TOTP secret the active one and records `step` as used — only if
/// the pending secret is still `expected`, so two concurrent confirmations cannot both succeed.
pub async fn promote_pending_totp(
    db: &impl ConnectionTrait,
    id: &str,
    expected: &str,
    step: i64,
) -> Result<bool, sea_orm::DbErr> {
    let res = users::Entity::update_many()
        .col_expr(users::Column::TotpSecretEnc, Expr::value(expected))
        .col_expr(users::Column::TotpPendingEnc, Expr::value(None::<String>))
        .col_expr(users::Column::TotpLastStep, Expr::value(step))
        .col_expr(users::Column::UpdatedAt, Expr::value(Utc::now()))
        .filter(users::Column::Id.eq(id))
        .filter(users::Column::TotpPendingEnc.eq(expected))
        .exec(db)
        .await?;
    Ok(res.rows_affected == 1)
}
