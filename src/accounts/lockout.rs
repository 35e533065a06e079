//! Lockout: five failed sign-ins for one username within 15 minutes lock it for 15 minutes from
//! the fifth. Computed from `login_history` rows, so every replica sees the same lock.

use chrono::{DateTime, Duration, Utc};
use sea_orm::ConnectionTrait;

use crate::store;

/// Failures that trigger a lock.
pub const MAX_FAILURES: usize = 5;
/// The window the failures must fall in, and how long the lock lasts.
pub const WINDOW_SECS: i64 = 15 * 60;

/// When the lock implied by these failure times (oldest first) ends, if any: the latest failure
/// that was the fifth within a window, plus the lock duration.
pub fn locked_until(failures: &[DateTime<Utc>]) -> Option<DateTime<Utc>> {
    let window = Duration::seconds(WINDOW_SECS);
    failures
        .windows(MAX_FAILURES)
        .filter(|w| w[MAX_FAILURES - 1] - w[0] <= window)
        .map(|w| w[MAX_FAILURES - 1] + window)
        .max()
}

/// Seconds until `username` may try again, or `None` when it is not locked now.
pub async fn retry_after(
    db: &impl ConnectionTrait,
    username: &str,
) -> Result<Option<u64>, sea_orm::DbErr> {
    let now = Utc::now();
    // A lock still running began at most 15 minutes ago, and its first failure 15 before that.
    let since = now - Duration::seconds(2 * WINDOW_SECS);
    let failures = store::login_history::failures_since(db, username, since).await?;
    Ok(locked_until(&failures)
        .filter(|until| *until > now)
        .map(|until| {
            let ms = (until - now).num_milliseconds().max(0) as u64;
            ms.div_ceil(1000).max(1)
        }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(mins: i64) -> DateTime<Utc> {
        DateTime::<Utc>::UNIX_EPOCH + Duration::minutes(mins)
    }

    #[test]
    fn five_within_the_window_lock_from_the_fifth() {
        assert_eq!(locked_until(&[]), None);
        assert_eq!(locked_until(&[at(0), at(1), at(2), at(3)]), None);
        assert_eq!(
            locked_until(&[at(0), at(1), at(2), at(3), at(4)]),
            Some(at(19))
        );
        // Spread over more than 15 minutes: no lock.
        assert_eq!(locked_until(&[at(0), at(5), at(10), at(15), at(16)]), None);
        // A later failure that is again the fifth within a window extends the lock.
        assert_eq!(
            locked_until(&[at(0), at(1), at(2), at(3), at(4), at(10)]),
            Some(at(25))
        );
        assert_eq!(
            locked_until(&[at(0), at(1), at(2), at(3), at(4), at(20)]),
            Some(at(19))
        );
    }
}
