//! The per-client-address rate limit of `/api/auth/*` (`auth.ip_rpm`): sign-in, registration,
//! enrolment confirmation and password reset are anonymous, and each costs an argon2 check and a
//! database write, so one address gets at most `ip_rpm` of them a minute (a burst of as many),
//! answered 429 `rate_limit_exceeded` with `retry-after` beyond that. `verify` and `logout` need
//! a valid access token and are not counted (`edge::throttle_auth`).
//!
//! The address is the one the rest of the gateway uses (`server.trust_forwarded_for` decides
//! whether `X-Forwarded-For` counts). IPv6 clients are counted per /64, the block one subscriber
//! usually holds, so hopping through addresses of one's own block does not reset the count.
//! Buckets are per replica (a keyed governor limiter); those back to full are dropped once a
//! minute, so memory follows the addresses seen in the last minute.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

/// How often buckets that are full again are dropped.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

pub struct AuthThrottle {
    limiter: Option<DefaultKeyedRateLimiter<IpAddr>>,
    last_prune: Mutex<Instant>,
}

impl AuthThrottle {
    /// `per_minute` = 0: no limit.
    pub fn new(per_minute: u32) -> Self {
        Self {
            limiter: NonZeroU32::new(per_minute).map(|n| RateLimiter::keyed(Quota::per_minute(n))),
            last_prune: Mutex::new(Instant::now()),
        }
    }

    /// Takes one request for `ip`; `Err(seconds to wait)` when its budget is spent.
    pub fn check(&self, ip: Option<IpAddr>) -> Result<(), u64> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        self.prune(limiter);
        limiter.check_key(&bucket_of(ip)).map_err(|not_until| {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            wait.as_millis().div_ceil(1000).max(1) as u64
        })
    }

    /// Addresses currently holding a bucket.
    pub fn tracked(&self) -> usize {
        self.limiter.as_ref().map_or(0, |l| l.len())
    }

    fn prune(&self, limiter: &DefaultKeyedRateLimiter<IpAddr>) {
        let Ok(mut last) = self.last_prune.try_lock() else {
            return;
        };
        if last.elapsed() < PRUNE_EVERY {
            return;
        }
        *last = Instant::now();
        limiter.retain_recent();
        limiter.shrink_to_fit();
    }
}

/// The bucket an address counts against: IPv4 (also IPv4-mapped IPv6) as is, IPv6 by its /64,
/// and requests without an address together.
fn bucket_of(ip: Option<IpAddr>) -> IpAddr {
    match ip {
        None => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        Some(IpAddr::V4(v4)) => IpAddr::V4(v4),
        Some(IpAddr::V6(v6)) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from_bits(v6.to_bits() & !((1u128 << 64) - 1))),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_refusals_per_address() {
        let t = AuthThrottle::new(3);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        for _ in 0..3 {
            assert_eq!(t.check(Some(a)), Ok(()));
        }
        let wait = t.check(Some(a)).unwrap_err();
        assert!((1..=20).contains(&wait), "{wait}");
        assert_eq!(t.check(Some(b)), Ok(()));
        assert_eq!(t.tracked(), 2);
        // Off.
        let off = AuthThrottle::new(0);
        for _ in 0..100 {
            assert_eq!(off.check(Some(a)), Ok(()));
        }
    }

    #[test]
    fn ipv6_counts_per_64() {
        let t = AuthThrottle::new(2);
        let one: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let two: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(t.check(Some(one)), Ok(()));
        assert_eq!(t.check(Some(two)), Ok(()));
        assert!(t.check(Some(one)).is_err());
        assert_eq!(t.check(Some(other)), Ok(()));
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(
            bucket_of(Some(mapped)),
            "192.0.2.7".parse::<IpAddr>().unwrap()
        );
    }
}
