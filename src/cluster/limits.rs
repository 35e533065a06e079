//! Rate limits shared by every replica: one GCRA bucket per (scope, limit, id) in Redis, checked
//! and updated atomically by a Lua script on Redis's own clock, so N replicas together allow what
//! one would.
//!
//! The semantics match the per-replica governor buckets (`proxy::admit`): a limit of L per minute
//! refills one request (or token) every 60/L seconds, holds at most L, and a refused take consumes
//! nothing. The bucket's key includes the limit, so a changed limit starts a fresh bucket.

use std::sync::Arc;
use std::time::Duration;

use super::redis::RedisLink;

/// Theoretical-arrival-time GCRA. KEYS[1] holds the bucket's TAT in microseconds of Redis time.
/// ARGV[1] = limit per minute, ARGV[2] = cells to take (1..limit).
/// Returns {allowed 1|0, remaining, wait_us (refused: until the cells are free), reset_us (until
/// the bucket is full again)}.
const GCRA: &str = r"
if redis.replicate_commands then pcall(redis.replicate_commands) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local limit = tonumber(ARGV[1])
local n = tonumber(ARGV[2])
local period = 60000000
local interval = period / limit
local tat = tonumber(redis.call('GET', KEYS[1]))
if tat == nil or tat < now then tat = now end
local new_tat = tat + n * interval
local allow_at = new_tat - period
if allow_at > now then
  return {0, 0, math.ceil(allow_at - now), math.ceil(tat - now)}
end
new_tat = math.ceil(new_tat)
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1)
local remaining = math.floor((now + period - new_tat) / interval + 0.000001)
if remaining < 0 then remaining = 0 end
return {1, remaining, 0, new_tat - now}
";

/// What a bucket said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Taken; `remaining` left, full again after `reset`.
    Allowed { remaining: u32, reset: Duration },
    /// Not enough left: retry after `wait`; full again after `full`.
    Refused { wait: Duration, full: Duration },
}

/// The shared buckets.
#[derive(Clone)]
pub struct SharedLimits {
    link: RedisLink,
    script: Arc<redis::Script>,
}

impl std::fmt::Debug for SharedLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedLimits")
            .field("link", &self.link)
            .finish()
    }
}

impl SharedLimits {
    pub fn new(link: RedisLink) -> Self {
        Self {
            link,
            script: Arc::new(redis::Script::new(GCRA)),
        }
    }

    /// Takes `n` (clamped to 1..=`limit`) from the `scope` bucket of `id` allowing `limit` per
    /// minute. `None` when Redis did not answer: the caller uses its own bucket instead.
    pub async fn take(&self, scope: &str, id: &str, limit: u32, n: u32) -> Option<Verdict> {
        if limit == 0 {
            return None;
        }
        let key = self.link.key(&format!("rl:{scope}:{limit}:{id}"));
        let n = n.clamp(1, limit);
        let script = &self.script;
        let (allowed, remaining, wait_us, reset_us): (i64, i64, i64, i64) = self
            .link
            .call("rate_limit", |mut conn| async move {
                script
                    .key(key)
                    .arg(limit)
                    .arg(n)
                    .invoke_async(&mut conn)
                    .await
            })
            .await?;
        let micros = |us: i64| Duration::from_micros(us.max(0) as u64);
        Some(if allowed == 1 {
            Verdict::Allowed {
                remaining: remaining.clamp(0, i64::from(limit)) as u32,
                reset: micros(reset_us),
            }
        } else {
            Verdict::Refused {
                wait: micros(wait_us),
                full: micros(reset_us),
            }
        })
    }
}
