//! The response cache (spec §11): an exact-match store of complete (non-streamed) 200 answers,
//! opt-in per gateway key (`cache_ttl_secs`) or per request (`x-tollgate-cache-ttl`).
//!
//! - **Key**: SHA-256 of the user id, the endpoint, the requested catalog model, the query string
//!   (forwarded upstream as is) and the client's request body exactly as received (after `content-encoding` is undone; before any rewrite of
//!   the gateway's). Another user's identical request is another key; so is one byte of
//!   difference (whitespace and field order included).
//! - **Local**: a moka cache bounded by bytes (`routing.cache_max_bytes`, weighed by the
//!   answer's size), each entry expiring with its own TTL; an answer above
//!   `routing.cache_max_entry_bytes` is not cached.
//! - **Shared**: with `redis.url` set, an answer is also `SET … PX ttl` in Redis and a local miss
//!   asks Redis. Redis failing is a miss (counted in `tollgate_redis_errors_total{op="cache"}`,
//!   logged once per outage by `cluster::redis`), never an error to the client.
//!
//! An entry remembers when it was stored: a request is answered from it only while it is younger
//! than that request's own TTL (and the entry's TTL has not run out), so a short TTL never gets an
//! older answer than it asked for.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use moka::Expiry;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::cluster::redis::RedisLink;
use crate::providers::{Endpoint, Usage};
use crate::telemetry::Metrics;

/// Bytes an entry weighs beyond its answer (key, names, bookkeeping), so many tiny answers
/// cannot hold much more memory than the bound says.
const ENTRY_OVERHEAD: usize = 160;

/// Where a request's answer is cached: SHA-256 of what makes two requests "the same".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CacheKey([u8; 32]);

impl CacheKey {
    /// The key of `body` sent by `user_id` to `endpoint` (with its query string, which goes
    /// upstream too; the model is in the body). Each part is prefixed with its length, so no two
    /// different requests hash the same bytes. Made from the raw bytes, so a hit is found
    /// before the body is parsed (`proxy::cached::early`).
    pub fn of(user_id: &str, endpoint: Endpoint, query: &str, body: &[u8]) -> Self {
        let mut h = Sha256::new();
        for part in [
            user_id.as_bytes(),
            endpoint.as_str().as_bytes(),
            query.as_bytes(),
            body,
        ] {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part);
        }
        Self(h.finalize().into())
    }

    fn redis_name(&self) -> String {
        format!("rc:{}", hex::encode(self.0))
    }
}

/// What the request a cached answer was kept for asked, as its body said: a hit found before
/// the body is parsed is admitted and metered with these (the body, byte for byte the same, was
/// validated when the answer was kept).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Asked {
    /// The model the client named.
    pub model: String,
    pub max_tokens: Option<u64>,
    /// Choices it may produce (`n`, or a completion's `best_of`).
    pub n: u64,
}

/// A cached answer: what the client got, and what its usage record needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedAnswer {
    /// The response body the client got (already in the client's shape, `model` included).
    pub body: Bytes,
    pub content_type: Option<String>,
    /// The catalog model that answered (a fallback's name when one did).
    pub model: String,
    /// The provider that answered.
    pub provider: String,
    /// The answer's token usage as metered (`None`: the upstream reported none).
    pub usage: Option<Usage>,
    /// Unix milliseconds when it was stored …
    pub stored_ms: u64,
    /// … and when it expires.
    pub expires_ms: u64,
    /// What its request asked (`None`: an entry from a replica that did not say).
    pub asked: Option<Asked>,
}

impl CachedAnswer {
    /// Young enough for a request whose TTL is `max_age`, and not expired.
    fn serves(&self, now_ms: u64, max_age: Duration) -> bool {
        now_ms < self.expires_ms
            && u128::from(now_ms.saturating_sub(self.stored_ms)) < max_age.as_millis()
    }

    fn weight(&self) -> u32 {
        let n = self.body.len()
            + self.model.len()
            + self.provider.len()
            + self.content_type.as_ref().map_or(0, String::len)
            + self.asked.as_ref().map_or(0, |a| a.model.len())
            + ENTRY_OVERHEAD;
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// Redis form: one JSON line of facts, then the body as is.
    fn encode(&self) -> Vec<u8> {
        let head = Head {
            m: &self.model,
            p: &self.provider,
            ct: self.content_type.as_deref(),
            u: self
                .usage
                .map(|u| [u.prompt, u.completion, u.cached, u.cache_write, u.reasoning]),
            at: self.stored_ms,
            exp: self.expires_ms,
            rm: self.asked.as_ref().map(|a| a.model.as_str()),
            mt: self.asked.as_ref().and_then(|a| a.max_tokens),
            n: self.asked.as_ref().map(|a| a.n),
        };
        // A struct of strings and numbers always serializes; JSON escapes every newline.
        let mut out = serde_json::to_vec(&head).unwrap_or_default();
        out.push(b'\n');
        out.extend_from_slice(&self.body);
        out
    }

    fn decode(raw: Vec<u8>) -> Option<Self> {
        let raw = Bytes::from(raw);
        let nl = memchr::memchr(b'\n', &raw)?;
        let head: Head<'_> = serde_json::from_slice(&raw[..nl]).ok()?;
        Some(Self {
            model: head.m.to_owned(),
            provider: head.p.to_owned(),
            content_type: head.ct.map(str::to_owned),
            usage: head.u.map(
                |[prompt, completion, cached, cache_write, reasoning]| Usage {
                    prompt,
                    completion,
                    cached,
                    cache_write,
                    reasoning,
                },
            ),
            stored_ms: head.at,
            expires_ms: head.exp,
            asked: head.rm.map(|m| Asked {
                model: m.to_owned(),
                max_tokens: head.mt,
                n: head.n.unwrap_or(1).max(1),
            }),
            body: raw.slice(nl + 1..),
        })
    }
}

#[derive(Serialize, Deserialize)]
struct Head<'a> {
    #[serde(borrow)]
    m: &'a str,
    #[serde(borrow)]
    p: &'a str,
    #[serde(borrow, default)]
    ct: Option<&'a str>,
    #[serde(default)]
    u: Option<[i64; 5]>,
    at: u64,
    exp: u64,
    /// [`Asked`]: the requested model, its token bound and `n`.
    #[serde(borrow, default)]
    rm: Option<&'a str>,
    #[serde(default)]
    mt: Option<u64>,
    #[serde(default)]
    n: Option<u64>,
}

/// Unix time in milliseconds: entries move between replicas, so not a process-local clock.
pub fn now_ms() -> u64 {
    u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap_or(0)
}

/// Each entry lives until its own `expires_ms`.
struct UntilExpiry;

impl Expiry<CacheKey, Arc<CachedAnswer>> for UntilExpiry {
    fn expire_after_create(
        &self,
        _: &CacheKey,
        v: &Arc<CachedAnswer>,
        _: Instant,
    ) -> Option<Duration> {
        Some(Duration::from_millis(v.expires_ms.saturating_sub(now_ms())))
    }

    fn expire_after_update(
        &self,
        k: &CacheKey,
        v: &Arc<CachedAnswer>,
        at: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        self.expire_after_create(k, v, at)
    }
}

/// This replica's response cache, and the Redis it shares answers through.
#[derive(Clone)]
pub struct ResponseCache {
    local: moka::sync::Cache<CacheKey, Arc<CachedAnswer>>,
    redis: Option<RedisLink>,
    max_entry_bytes: usize,
    metrics: Metrics,
}

impl std::fmt::Debug for ResponseCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseCache")
            .field("entries", &self.local.entry_count())
            .field("bytes", &self.local.weighted_size())
            .field("shared", &self.redis.is_some())
            .finish()
    }
}

impl ResponseCache {
    /// At most `max_bytes` of answers here, none above `max_entry_bytes`; shared through `redis`
    /// when given.
    pub fn new(
        max_bytes: u64,
        max_entry_bytes: u64,
        redis: Option<RedisLink>,
        metrics: Metrics,
    ) -> Self {
        Self {
            local: moka::sync::Cache::builder()
                .name("responses")
                .max_capacity(max_bytes)
                .weigher(|_: &CacheKey, v: &Arc<CachedAnswer>| v.weight())
                .expire_after(UntilExpiry)
                .build(),
            redis,
            max_entry_bytes: usize::try_from(max_entry_bytes).unwrap_or(usize::MAX),
            metrics,
        }
    }

    /// The answer kept here (not asking Redis) under `key`, no older than `max_age`, that
    /// `usable` takes; counted only as a hit: a request that misses here goes on to
    /// [`Self::get`].
    pub fn get_local(
        &self,
        key: &CacheKey,
        max_age: Duration,
        usable: impl Fn(&CachedAnswer) -> bool,
    ) -> Option<Arc<CachedAnswer>> {
        let found = self
            .local
            .get(key)
            .filter(|a| a.serves(now_ms(), max_age) && usable(a))?;
        self.metrics.response_cache_hits_total.inc();
        Some(found)
    }

    /// The answer stored under `key` no older than `max_age`: here, else in Redis (then kept
    /// here too). Counted as a hit or a miss.
    pub async fn get(&self, key: &CacheKey, max_age: Duration) -> Option<Arc<CachedAnswer>> {
        let now = now_ms();
        let found = match self.local.get(key) {
            Some(a) if a.serves(now, max_age) => Some(a),
            _ => self.get_shared(key, now, max_age).await,
        };
        match &found {
            Some(_) => self.metrics.response_cache_hits_total.inc(),
            None => self.metrics.response_cache_misses_total.inc(),
        }
        found
    }

    async fn get_shared(
        &self,
        key: &CacheKey,
        now: u64,
        max_age: Duration,
    ) -> Option<Arc<CachedAnswer>> {
        let link = self.redis.as_ref()?;
        let name = link.key(&key.redis_name());
        let raw: Vec<u8> = link
            .call("cache", |mut conn| async move {
                redis::cmd("GET")
                    .arg(name)
                    .query_async::<Option<Vec<u8>>>(&mut conn)
                    .await
            })
            .await??;
        let answer = Arc::new(CachedAnswer::decode(raw)?);
        if answer.body.len() > self.max_entry_bytes || now >= answer.expires_ms {
            return None;
        }
        self.local.insert(*key, answer.clone());
        answer.serves(now, max_age).then_some(answer)
    }

    /// Keeps `answer` under `key` (here, and in Redis when shared) until its `expires_ms`.
    /// False, and nothing kept, when it is larger than `routing.cache_max_entry_bytes` or
    /// already expired. Waits for Redis (bounded by its call timeout, skipped while it is down)
    /// so the next request, on any replica, finds it.
    pub async fn put(&self, key: CacheKey, answer: CachedAnswer) -> bool {
        let now = now_ms();
        if answer.body.len() > self.max_entry_bytes || answer.expires_ms <= now {
            return false;
        }
        let ttl_ms = answer.expires_ms - now;
        let encoded = self.redis.as_ref().map(|_| answer.encode());
        self.local.insert(key, Arc::new(answer));
        if let (Some(link), Some(value)) = (&self.redis, encoded) {
            let name = link.key(&key.redis_name());
            let _: Option<()> = link
                .call("cache", |mut conn| async move {
                    redis::cmd("SET")
                        .arg(name)
                        .arg(value)
                        .arg("PX")
                        .arg(ttl_ms)
                        .query_async(&mut conn)
                        .await
                })
                .await;
        }
        true
    }

    /// Answers held here now (after pending evictions ran): for tests and the debug view.
    pub fn local_entries(&self) -> u64 {
        self.local.run_pending_tasks();
        self.local.entry_count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(body: &str, ttl_ms: u64) -> CachedAnswer {
        let now = now_ms();
        CachedAnswer {
            body: Bytes::from(body.to_owned()),
            content_type: Some("application/json".into()),
            model: "gpt-x".into(),
            provider: "openai".into(),
            usage: Some(Usage {
                prompt: 11,
                completion: 7,
                cached: 4,
                cache_write: 0,
                reasoning: 2,
            }),
            stored_ms: now,
            expires_ms: now + ttl_ms,
            asked: Some(Asked {
                model: "gpt".into(),
                max_tokens: Some(50),
                n: 2,
            }),
        }
    }

    #[test]
    fn keys_differ_by_user_endpoint_query_and_body() {
        let body = br#"{"model":"m"}"#;
        let k = CacheKey::of("u1", Endpoint::ChatCompletions, "", body);
        assert_eq!(k, CacheKey::of("u1", Endpoint::ChatCompletions, "", body));
        assert_ne!(k, CacheKey::of("u2", Endpoint::ChatCompletions, "", body));
        assert_ne!(k, CacheKey::of("u1", Endpoint::Completions, "", body));
        // The model is in the body: another model is another body.
        assert_ne!(
            k,
            CacheKey::of("u1", Endpoint::ChatCompletions, "", br#"{"model":"n"}"#)
        );
        assert_ne!(
            k,
            CacheKey::of("u1", Endpoint::ChatCompletions, "v=2", body)
        );
        assert_ne!(
            k,
            CacheKey::of("u1", Endpoint::ChatCompletions, "", br#"{"model": "m"}"#)
        );
        // Length prefixes: moving a byte from one part to the next is another key.
        assert_ne!(
            CacheKey::of("ab", Endpoint::ChatCompletions, "c", b""),
            CacheKey::of("a", Endpoint::ChatCompletions, "bc", b"")
        );
    }

    #[test]
    fn redis_form_round_trips() {
        let a = answer("{\"id\":\"x\",\n\"model\":\"gpt-x\"}", 5000);
        assert_eq!(CachedAnswer::decode(a.encode()), Some(a.clone()));
        let mut none = a;
        none.usage = None;
        none.content_type = None;
        none.asked = None;
        assert_eq!(CachedAnswer::decode(none.encode()), Some(none));
        assert_eq!(CachedAnswer::decode(b"no newline".to_vec()), None);
        assert_eq!(CachedAnswer::decode(b"{\"m\":1}\n{}".to_vec()), None);
    }

    #[test]
    fn serves_only_within_the_requesters_ttl() {
        let mut a = answer("{}", 60_000);
        let now = a.stored_ms;
        assert!(a.serves(now + 1000, Duration::from_secs(2)));
        assert!(!a.serves(now + 3000, Duration::from_secs(2)));
        assert!(a.serves(now + 3000, Duration::from_secs(60)));
        a.expires_ms = now + 1000;
        assert!(!a.serves(now + 1000, Duration::from_secs(60)));
    }

    #[tokio::test]
    async fn bounded_by_entry_size_and_expiring() {
        let cache = ResponseCache::new(1 << 20, 64, None, Metrics::new());
        let key = CacheKey::of("u", Endpoint::ChatCompletions, "", b"{}");
        assert!(!cache.put(key, answer(&"x".repeat(65), 60_000)).await);
        assert_eq!(cache.get(&key, Duration::from_secs(60)).await, None);
        assert!(cache.put(key, answer("{}", 60_000)).await);
        let hit = cache.get(&key, Duration::from_secs(60)).await.expect("hit");
        assert_eq!(hit.body, "{}");
        assert_eq!(cache.metrics.response_cache_hits_total.get(), 1);
        assert_eq!(cache.metrics.response_cache_misses_total.get(), 1);
        let short = CacheKey::of("u", Endpoint::ChatCompletions, "", b"[]");
        assert!(cache.put(short, answer("[]", 50)).await);
        tokio::time::sleep(Duration::from_millis(80)).await;
        assert_eq!(cache.get(&short, Duration::from_secs(60)).await, None);
    }

    #[tokio::test]
    async fn bounded_by_bytes_in_all() {
        let cache = ResponseCache::new(4096, 1024, None, Metrics::new());
        for i in 0..64u32 {
            let key = CacheKey::of("u", Endpoint::ChatCompletions, "", &i.to_be_bytes());
            assert!(cache.put(key, answer(&"y".repeat(800), 60_000)).await);
        }
        cache.local.run_pending_tasks();
        assert!(
            cache.local.weighted_size() <= 4096,
            "{}",
            cache.local.weighted_size()
        );
        assert!(cache.local_entries() <= 4);
    }
}
