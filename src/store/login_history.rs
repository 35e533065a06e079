//! Login history: every sign-in attempt, successful or not; also what the lockout counts.

use chrono::{DateTime, Utc};
use entity::login_history;
use sea_orm::sea_query::{Expr, ExprTrait};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, EntityTrait, PaginatorTrait, QueryFilter,
    QueryOrder, QuerySelect, Set,
};

use super::{Page, PageReq};

/// Failure reasons that say nothing about whether the credentials were right: an attempt refused
/// because the username was already locked, a correct sign-in to a disabled account, or an
/// attempt refused before any check because password hashing was at capacity, or a correct
/// confirmation of an enrolment that was already confirmed. They are recorded but do not count
/// towards a lockout.
pub const NOT_COUNTED: [&str; 4] = [
    REASON_LOCKED,
    REASON_DISABLED,
    REASON_BUSY,
    REASON_ALREADY_CONFIRMED,
];
pub const REASON_LOCKED: &str = "locked";
pub const REASON_DISABLED: &str = "account_disabled";
pub const REASON_BUSY: &str = "busy";
pub const REASON_ALREADY_CONFIRMED: &str = "already_confirmed";
/// An attempt being checked: recorded before the check so concurrent attempts count it (as a
/// failure) until [`finish`] records how it ended.
pub const REASON_PENDING: &str = "pending";

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

/// Records an attempt that is starting (`success = false`, reason [`REASON_PENDING`]); returns
/// its id for [`finish`].
pub async fn begin(db: &impl ConnectionTrait, a: Attempt<'_>) -> Result<i64, sea_orm::DbErr> {
    let row = login_history::ActiveModel {
        user_id: Set(a.user_id.map(str::to_owned)),
        username: Set(column_username(a.username)),
        at: Set(Utc::now()),
        ip: Set(a.ip.map(str::to_owned)),
        user_agent: Set(a.user_agent.map(|s| s.chars().take(255).collect())),
        success: Set(false),
        reason: Set(Some(REASON_PENDING.to_owned())),
        ..Default::default()
    }
    .insert(db)
    .await?;
    Ok(row.id)
}

/// Records how the attempt `id` from [`begin`] ended.
pub async fn finish(
    db: &impl ConnectionTrait,
    id: i64,
    success: bool,
    reason: Option<&str>,
) -> Result<(), sea_orm::DbErr> {
    login_history::Entity::update_many()
        .col_expr(login_history::Column::Success, Expr::value(success))
        .col_expr(
            login_history::Column::Reason,
            Expr::value(reason.map(str::to_owned)),
        )
        .filter(login_history::Column::Id.eq(id))
        .exec(db)
        .await?;
    Ok(())
}

/// An attempt as the lockout counts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counted {
    pub at: DateTime<Utc>,
    pub success: bool,
}

/// The counted attempts (successes, failures, attempts still pending) for `username` since
/// `since`, oldest first, other than `except` (the caller's own): all of them, or those from
/// `ip` (`None` = attempts recorded without an address). At most the newest `limit`.
pub async fn counted_since(
    db: &impl ConnectionTrait,
    username: &str,
    ip: Option<Option<&str>>,
    since: DateTime<Utc>,
    except: i64,
    limit: u64,
) -> Result<Vec<Counted>, sea_orm::DbErr> {
    let username = column_username(username);
    let mut q = login_history::Entity::find()
        .select_only()
        .column(login_history::Column::At)
        .column(login_history::Column::Success)
        .filter(login_history::Column::Username.eq(username.as_str()))
        .filter(login_history::Column::At.gte(since))
        .filter(login_history::Column::Id.ne(except))
        .filter(
            login_history::Column::Reason
                .is_null()
                .or(login_history::Column::Reason.is_not_in(NOT_COUNTED)),
        );
    q = match ip {
        None => q,
        Some(Some(ip)) => q.filter(login_history::Column::Ip.eq(ip)),
        Some(None) => q.filter(login_history::Column::Ip.is_null()),
    };
    let mut rows: Vec<(DateTime<Utc>, bool)> = q
        .order_by_desc(login_history::Column::At)
        .order_by_desc(login_history::Column::Id)
        .limit(limit)
        .into_tuple()
        .all(db)
        .await?;
    rows.reverse();
    Ok(rows
        .into_iter()
        .map(|(at, success)| Counted { at, success })
        .collect())
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
