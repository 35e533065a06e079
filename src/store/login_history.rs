//! Login history: every sign-in attempt, successful or not; also what the lockout counts.

use chrono::{DateTime, Utc};
use entity::login_history;
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, EntityTrait, PaginatorTrait, QueryFilter,
    QueryOrder, QuerySelect, Set,
};

use super::{Page, PageReq};

/// Failure reasons that say nothing about whether the credentials were right: an attempt refused
/// because the username was already locked, or a correct sign-in to a disabled account. They are
/// recorded but do not count towards a lockout.
pub const NOT_COUNTED: [&str; 2] = [REASON_LOCKED, REASON_DISABLED];
pub const REASON_LOCKED: &str = "locked";
pub const REASON_DISABLED: &str = "account_disabled";

/// The username column is 64 characters; longer attempted names are cut (they cannot exist).
pub fn column_username(username: &str) -> String {
    username.chars().take(64).collect()
}

/// One attempt. `reason` is a short machine word (`bad_password`, `bad_totp`, ...), never a secret.
#[derive(Debug, Clone)]
pub struct Attempt<'a> {
    pub user_id: Option<&'a str>,
    pub username: &'a str,
    pub ip: Option<&'a str>,
    pub user_agent: Option<&'a str>,
    pub success: bool,
    pub reason: Option<&'a str>,
}

pub async fn record(db: &impl ConnectionTrait, a: Attempt<'_>) -> Result<(), sea_orm::DbErr> {
    login_history::ActiveModel {
        user_id: Set(a.user_id.map(str::to_owned)),
        username: Set(column_username(a.username)),
        at: Set(Utc::now()),
        ip: Set(a.ip.map(str::to_owned)),
        user_agent: Set(a.user_agent.map(|s| s.chars().take(255).collect())),
        success: Set(a.success),
        reason: Set(a.reason.map(str::to_owned)),
        ..Default::default()
    }
    .insert(db)
    .await?;
    Ok(())
}

/// Times of the counted failures for `username` since `since` that came after its latest success,
/// oldest first.
pub async fn failures_since(
    db: &impl ConnectionTrait,
    username: &str,
    since: DateTime<Utc>,
) -> Result<Vec<DateTime<Utc>>, sea_orm::DbErr> {
    let username = column_username(username);
    let last_success: Option<DateTime<Utc>> = login_history::Entity::find()
        .select_only()
        .column(login_history::Column::At)
        .filter(login_history::Column::Username.eq(username.as_str()))
        .filter(login_history::Column::Success.eq(true))
        .filter(login_history::Column::At.gte(since))
        .order_by_desc(login_history::Column::At)
        .into_tuple()
        .one(db)
        .await?;
    let from = last_success.map_or(since, |s| s.max(since));
    let mut q = login_history::Entity::find()
        .select_only()
        .column(login_history::Column::At)
        .filter(login_history::Column::Username.eq(username.as_str()))
        .filter(login_history::Column::Success.eq(false))
        .filter(login_history::Column::Reason.is_not_in(NOT_COUNTED));
    q = if last_success.is_some() {
        q.filter(login_history::Column::At.gt(from))
    } else {
        q.filter(login_history::Column::At.gte(from))
    };
    // Newest 100 are plenty to find five within a window; older ones cannot extend a lock.
    let mut times: Vec<DateTime<Utc>> = q
        .order_by_desc(login_history::Column::At)
        .limit(100)
        .into_tuple()
        .all(db)
        .await?;
    times.reverse();
    Ok(times)
}

/// A user's own attempts, newest first.
pub async fn list_for_user(
    db: &impl ConnectionTrait,
    user_id: &str,
    page: PageReq,
) -> Result<Page<login_history::Model>, sea_orm::DbErr> {
    let q = login_history::Entity::find().filter(login_history::Column::UserId.eq(user_id));
    let total = q.clone().count(db).await?;
    let items = q
        .order_by_desc(login_history::Column::At)
        .order_by_desc(login_history::Column::Id)
        .offset(page.offset())
        .limit(page.per_page)
        .all(db)
        .await?;
    Ok(Page { items, total })
}
