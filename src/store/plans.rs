//! Plan renewal: one transaction debits the balance (ledger kind `renewal`) and moves the
//! user's plan and expiry, so a renewal is never paid without being granted, or the reverse.

use chrono::{DateTime, Duration, Utc};
use entity::{balance_ledger, users};
use sea_orm::{DatabaseConnection, TransactionTrait};

use super::ledger::{self, LedgerError};
use super::users::UserChanges;

/// Days one month of a plan lasts.
pub const DAYS_PER_MONTH: i64 = 30;

/// What to renew.
#[derive(Debug, Clone, Copy)]
pub struct Renew<'a> {
    pub user_id: &'a str,
    pub plan: &'a str,
    pub months: u32,
    /// The whole price (per month × months), in nano-dollars.
    pub price_nanos: i64,
}

/// A renewal that went through.
#[derive(Debug, Clone)]
pub struct Renewed {
    pub user: users::Model,
    pub entry: balance_ledger::Model,
}

/// The new expiry: `months × 30` days from the current expiry when the user renews the plan they
/// already have and it has not expired yet, else from `now` (switching plans forfeits the rest of
/// the old one; a plan without expiry counts from `now`).
pub fn new_expiry(
    current_plan: Option<&str>,
    current_expiry: Option<DateTime<Utc>>,
    plan: &str,
    months: u32,
    now: DateTime<Utc>,
) -> DateTime<Utc> {
    let base = match (current_plan, current_expiry) {
        (Some(p), Some(t)) if p == plan && t > now => t,
        _ => now,
    };
    base + Duration::days(DAYS_PER_MONTH * i64::from(months))
}

/// Debits `price_nanos` (refused when the balance does not cover it), then sets the plan and
/// its new expiry, in one transaction. The debit's conditional UPDATE locks the user's row first,
/// so concurrent renewals of one user extend one after the other.
pub async fn renew(db: &DatabaseConnection, r: Renew<'_>) -> Result<Renewed, LedgerError> {
    let txn = db.begin().await?;
    let note = format!(
        "plan {} × {} month{}",
        r.plan,
        r.months,
        if r.months == 1 { "" } else { "s" }
    );
    let entry = ledger::apply(
        &txn,
        ledger::Change {
            user_id: r.user_id,
            amount_nanos: -r.price_nanos,
            kind: ledger::Kind::Renewal,
            note: Some(&note),
            actor_id: None,
            refuse_negative: true,
        },
    )
    .await?;
    let user = super::users::find(&txn, r.user_id)
        .await?
        .ok_or(LedgerError::UserNotFound)?;
    let expires = new_expiry(
        user.plan.as_deref(),
        user.plan_expires_at,
        r.plan,
        r.months,
        Utc::now(),
    );
    super::users::update(
        &txn,
        r.user_id,
        UserChanges {
            plan: Some(Some(r.plan.to_owned())),
            plan_expires_at: Some(Some(expires)),
            ..Default::default()
        },
    )
    .await?;
    let user = super::users::find(&txn, r.user_id)
        .await?
        .ok_or(LedgerError::UserNotFound)?;
    txn.commit().await?;
    Ok(Renewed { user, entry })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_extends_the_same_unexpired_plan_only() {
        let now = Utc::now();
        let later = now + Duration::days(10);
        let d = |n| Duration::days(n);
        assert_eq!(new_expiry(None, None, "pro", 1, now), now + d(30));
        assert_eq!(
            new_expiry(Some("pro"), Some(later), "pro", 2, now),
            later + d(60)
        );
        // Another plan, an expired one, or one without expiry: from now.
        assert_eq!(
            new_expiry(Some("basic"), Some(later), "pro", 1, now),
            now + d(30)
        );
        assert_eq!(
            new_expiry(Some("pro"), Some(now - d(1)), "pro", 1, now),
            now + d(30)
        );
        assert_eq!(new_expiry(Some("pro"), None, "pro", 1, now), now + d(30));
    }
}
