//! Lockout: how many wrong guesses a username takes before sign-ins are refused, keyed so that a
//! stranger cannot lock the real owner out. Computed from `login_history` rows, so every replica
//! sees the same lock.
//!
//! - **Per username and client address**: five failures for a username from one address within
//!   15 minutes lock that username *for that address* for 15 minutes from the fifth. A success
//!   from the address clears its count.
//! - **Per username, every address (backstop)**: fifty failures within 15 minutes, from any mix
//!   of addresses, lock the username for 15 minutes for every address the account has never
//!   signed in from (`ip_records`); the owner's known addresses keep only their own count. So a
//!   guesser gets at most 5 tries per address and 50 in all per quarter hour, and neither a
//!   stranger nor a botnet locks the owner out of the places they sign in from.
//!
//! Counting is atomic without locks: an attempt is recorded (as pending) *before* its check and
//! counts every other attempt already recorded, decided or still pending. Of any two concurrent
//! attempts the one that counts later sees the other, so no more than five are ever checked
//! against one count of four — where check-then-hash-then-record let 32 of 200 through.

use chrono::{DateTime, Duration, Utc};
use sea_orm::ConnectionTrait;

use crate::store;
use crate::store::login_history::Counted;

/// Failures from one address that lock the username for that address.
pub const MAX_FAILURES: usize = 5;
/// Failures from all addresses that lock the username for every address it was never signed in
/// from.
pub const MAX_FAILURES_ALL_ADDRESSES: usize = 50;
/// The window the failures must fall in, and how long the lock lasts.
pub const WINDOW_SECS: i64 = 15 * 60;
/// Attempts read per count: plenty to find a lock's failures within a window.
const READ_LIMIT: u64 = 1000;

/// When the lock implied by these failure times (oldest first) ends, if any: the latest failure
/// that was the `max`th within a window, plus the lock duration.
pub fn locked_until(failures: &[DateTime<Utc>], max: usize) -> Option<DateTime<Utc>> {
    let window = Duration::seconds(WINDOW_SECS);
    if max == 0 {
        return None;
    }
    failures
        .windows(max)
        .filter(|w| w[max - 1] - w[0] <= window)
        .map(|w| w[max - 1] + window)
        .max()
}

/// Failure times after the latest success (`clear_on_success`) or all of them.
fn failures(attempts: &[Counted], clear_on_success: bool) -> Vec<DateTime<Utc>> {
    let from = if clear_on_success {
        attempts
            .iter()
            .rposition(|a| a.success)
            .map_or(0, |i| i + 1)
    } else {
        0
    };
    attempts[from..]
        .iter()
        .filter(|a| !a.success)
        .map(|a| a.at)
        .collect()
}

fn seconds_until(until: DateTime<Utc>, now: DateTime<Utc>) -> Option<u64> {
    (until > now).then(|| {
        let ms = (until - now).num_milliseconds().max(0) as u64;
        ms.div_ceil(1000).max(1)
    })
}

/// One sign-in attempt to count: recorded already (as pending) with id `attempt`.
#[derive(Debug, Clone, Copy)]
pub struct Attempt<'a> {
    pub username: &'a str,
    /// The account, when the username exists.
    pub user_id: Option<&'a str>,
    pub ip: Option<&'a str>,
    /// The `login_history` row of this attempt (not counted against itself).
    pub attempt: i64,
}

/// Seconds until this attempt's username may be tried again from its address, or `None` when it
/// is not locked for it now.
pub async fn retry_after(
    db: &impl ConnectionTrait,
    a: Attempt<'_>,
) -> Result<Option<u64>, sea_orm::DbErr> {
    let now = Utc::now();
    // A lock still running began at most 15 minutes ago, and its first failure 15 before that.
    let since = now - Duration::seconds(2 * WINDOW_SECS);
    let here = store::login_history::counted_since(
        db,
        a.username,
        Some(a.ip),
        since,
        a.attempt,
        READ_LIMIT,
    )
    .await?;
    if let Some(secs) = locked_until(&failures(&here, true), MAX_FAILURES)
        .and_then(|until| seconds_until(until, now))
    {
        return Ok(Some(secs));
    }
    let everywhere =
        store::login_history::counted_since(db, a.username, None, since, a.attempt, READ_LIMIT)
            .await?;
    let Some(secs) = locked_until(&failures(&everywhere, false), MAX_FAILURES_ALL_ADDRESSES)
        .and_then(|until| seconds_until(until, now))
    else {
        return Ok(None);
    };
    let known = match (a.user_id, a.ip) {
        (Some(user_id), Some(ip)) => store::ip_records::is_known(db, user_id, ip).await?,
        _ => false,
    };
    Ok((!known).then_some(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(mins: i64) -> DateTime<Utc> {
        DateTime::<Utc>::UNIX_EPOCH + Duration::minutes(mins)
    }

    #[test]
    fn five_within_the_window_lock_from_the_fifth() {
        let m = MAX_FAILURES;
        assert_eq!(locked_until(&[], m), None);
        assert_eq!(locked_until(&[at(0), at(1), at(2), at(3)], m), None);
        assert_eq!(
            locked_until(&[at(0), at(1), at(2), at(3), at(4)], m),
            Some(at(19))
        );
        // Spread over more than 15 minutes: no lock.
        assert_eq!(
            locked_until(&[at(0), at(5), at(10), at(15), at(16)], m),
            None
        );
        // A later failure that is again the fifth within a window extends the lock.
        assert_eq!(
            locked_until(&[at(0), at(1), at(2), at(3), at(4), at(10)], m),
            Some(at(25))
        );
        assert_eq!(
            locked_until(&[at(0), at(1), at(2), at(3), at(4), at(20)], m),
            Some(at(19))
        );
    }

    #[test]
    fn a_success_clears_the_count_before_it() {
        let ok = |m| Counted {
            at: at(m),
            success: true,
        };
        let bad = |m| Counted {
            at: at(m),
            success: false,
        };
        let attempts = [bad(0), bad(1), ok(2), bad(3), bad(4)];
        assert_eq!(failures(&attempts, true), vec![at(3), at(4)]);
        assert_eq!(failures(&attempts, false), vec![at(0), at(1), at(3), at(4)]);
        assert_eq!(
            failures(&[bad(0), ok(1)], true),
            Vec::<DateTime<Utc>>::new()
        );
    }
}
