//! The response cache on the hot path (spec §11; the store is `routing::cache`): which requests
//! look in it, how a hit is answered and metered, and how a miss's answer is kept.
//!
//! A request uses the cache when its gateway key has `cache_ttl_secs > 0` or it sends
//! `x-tollgate-cache-ttl: N` (which wins over the key's; 0 turns the cache off for the request),
//! capped at `routing.max_cache_ttl_secs`, and it is a non-streamed chat completion, completion or
//! embedding that does not ask tollgate to store it (`store: true`). With neither set, nothing is
//! hashed or allocated.

use std::time::Duration;

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, header};

use crate::cache::KeyCtx;
use crate::error::ApiError;
use crate::metering::event::KeptPayloads;
use crate::providers::{Endpoint, Usage};
use crate::proxy::meter::Meter;
use crate::proxy::request::RequestView;
use crate::routing::cache::{Asked, CacheKey, CachedAnswer, now_ms};
use crate::state::AppState;

/// The request header asking for the cache, in seconds.
pub const TTL_HEADER: &str = "x-tollgate-cache-ttl";
/// [`TTL_HEADER`] as a name, looked up without parsing it again.
const TTL_HEADER_NAME: http::HeaderName = http::HeaderName::from_static(TTL_HEADER);
/// The response header: `hit` (answered from the cache) or `miss` (answered upstream, kept).
pub const STATUS_HEADER: http::HeaderName = http::HeaderName::from_static("x-tollgate-cache");

/// A request that uses the response cache.
#[derive(Debug, Clone, Copy)]
pub struct Lookup {
    pub key: CacheKey,
    /// The request's TTL: the oldest answer it takes, and how long its own answer is kept.
    pub ttl: Duration,
}

/// The request's TTL in seconds: the header's (a bad one is a 400), else the key's; at most
/// `max`.
fn ttl_secs(headers: &HeaderMap, key_ttl: u32, max: u64) -> Result<u64, ApiError> {
    let asked = match headers.get(&TTL_HEADER_NAME) {
        None => u64::from(key_ttl),
        Some(v) => {
            let digits = v.to_str().ok().map(str::trim).filter(|s| {
                !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit())
            });
            match digits {
                // Every digit string of 20 characters or fewer that overflows u64 is huge: capped.
                Some(d) => d.parse::<u64>().unwrap_or(u64::MAX),
                None => {
                    return Err(ApiError::invalid_param(
                        TTL_HEADER,
                        format!(
                            "{TTL_HEADER} must be a whole number of seconds (0 = do not cache)."
                        ),
                    ));
                }
            }
        }
    };
    Ok(asked.min(max))
}

/// Whether this request uses the cache, now that its body is parsed: [`early`]'s key, unless
/// the request streams or asks tollgate to store it; 400 for a malformed TTL header.
pub fn lookup(
    state: &AppState,
    key: &KeyCtx,
    view: &RequestView<'_>,
    headers: &HeaderMap,
    early: Option<Lookup>,
    stored: bool,
) -> Result<Option<Lookup>, ApiError> {
    ttl_secs(
        headers,
        key.cache_ttl_secs,
        state.config.routing.max_cache_ttl_secs,
    )?;
    Ok(early.filter(|_| !view.stream && !stored))
}

/// Before the body is parsed: whether the request may use the cache (a cacheable route, and a
/// TTL from its key or header) under which key — made from the raw bytes — and the answer this
/// replica holds for those exact bytes, if any. Such a hit needs no parsing: the bytes were
/// validated when its answer was kept (as a non-streamed request that asked for no storage).
/// `None` (no cache, or a malformed header: [`lookup`]'s 400) and a miss take the usual path:
/// parsed, admitted, then looked up (Redis included).
pub fn early(
    state: &AppState,
    key: &KeyCtx,
    endpoint: Endpoint,
    body: &Bytes,
    headers: &HeaderMap,
    query: Option<&str>,
) -> Option<Early> {
    let cacheable = matches!(
        endpoint,
        Endpoint::ChatCompletions | Endpoint::Completions | Endpoint::Embeddings
    );
    // No gateway key (the signed-in chat): its bodies come from a conversation.
    if !cacheable || key.key_id.is_empty() {
        return None;
    }
    let secs = ttl_secs(
        headers,
        key.cache_ttl_secs,
        state.config.routing.max_cache_ttl_secs,
    )
    .ok()
    .filter(|&s| s > 0)?;
    let lookup = Lookup {
        key: CacheKey::of(&key.user_id, endpoint, query.unwrap_or_default(), body),
        ttl: Duration::from_secs(secs),
    };
    // An entry from a replica that did not record what its request asked: parsed as usual.
    let found = state
        .responses
        .get_local(&lookup.key, lookup.ttl, |a| a.asked.is_some())
        .and_then(|hit| {
            let view = view_of(hit.asked.as_ref()?);
            Some(Hit { answer: hit, view })
        });
    Some(Early { lookup, found })
}

/// What [`early`] found.
pub struct Early {
    pub lookup: Lookup,
    /// The answer held here for these bytes.
    pub found: Option<Hit>,
}

/// An answer found before the body was parsed.
pub struct Hit {
    pub answer: std::sync::Arc<CachedAnswer>,
    /// The request it stands for (no fields: nothing of it is sent anywhere).
    pub view: RequestView<'static>,
}

fn view_of(asked: &Asked) -> RequestView<'static> {
    RequestView {
        fields: Vec::new(),
        model: asked.model.clone(),
        stream: false,
        include_usage: false,
        max_tokens: asked.max_tokens,
        n: asked.n,
    }
}

/// What `view`'s request asked, kept with its answer.
pub fn asked(view: &RequestView<'_>) -> Asked {
    Asked {
        model: view.model.clone(),
        max_tokens: view.max_tokens,
        n: crate::proxy::reserve::choices(view),
    }
}

/// A hit: the cached body as it was, `x-tollgate-cache: hit`, the model that answered it and no
/// upstream attempt; metered with the answer's tokens (the meter's prices are zero).
pub fn answer(meter: Meter, hit: &CachedAnswer) -> Response {
    let kept = if hit.usage.is_none() {
        KeptPayloads::one(hit.body.clone())
    } else {
        KeptPayloads::default()
    };
    meter.finish(200, hit.usage, kept, None);
    let mut out = Response::new(Body::from(hit.body.clone()));
    let h = out.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        hit.content_type
            .as_deref()
            .and_then(|v| HeaderValue::from_str(v).ok())
            .unwrap_or_else(|| HeaderValue::from_static("application/json")),
    );
    h.insert(STATUS_HEADER, HeaderValue::from_static("hit"));
    crate::proxy::routing_headers(h, &hit.model, 0);
    out
}

/// What a miss's answer carries into the cache.
pub struct Answered<'a> {
    pub body: &'a Bytes,
    pub content_type: Option<&'a HeaderValue>,
    pub model: &'a str,
    pub provider: &'a str,
    pub usage: Option<Usage>,
    /// What the request asked ([`early`] admits a later hit with it).
    pub asked: Asked,
}

/// Keeps a miss's 200 answer for the request's TTL; true when it was kept (not too large).
pub async fn keep(state: &AppState, lookup: &Lookup, a: Answered<'_>) -> bool {
    let now = now_ms();
    let ttl_ms = u64::try_from(lookup.ttl.as_millis()).unwrap_or(u64::MAX);
    state
        .responses
        .put(
            lookup.key,
            CachedAnswer {
                body: a.body.clone(),
                content_type: a
                    .content_type
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned),
                model: a.model.to_owned(),
                provider: a.provider.to_owned(),
                usage: a.usage,
                stored_ms: now,
                expires_ms: now.saturating_add(ttl_ms),
                asked: Some(a.asked),
            },
        )
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(TTL_HEADER, HeaderValue::from_str(v).unwrap());
        h
    }

    #[test]
    fn header_wins_and_is_capped_not_refused() {
        assert_eq!(ttl_secs(&HeaderMap::new(), 0, 3600).unwrap(), 0);
        assert_eq!(ttl_secs(&HeaderMap::new(), 60, 3600).unwrap(), 60);
        assert_eq!(ttl_secs(&HeaderMap::new(), 9000, 3600).unwrap(), 3600);
        assert_eq!(ttl_secs(&with("30"), 60, 3600).unwrap(), 30);
        assert_eq!(ttl_secs(&with(" 0 "), 60, 3600).unwrap(), 0);
        assert_eq!(ttl_secs(&with("999999"), 0, 3600).unwrap(), 3600);
        assert_eq!(
            ttl_secs(&with("99999999999999999999"), 0, 3600).unwrap(),
            3600
        );
        for bad in ["abc", "-1", "1.5", "", "10s", "123456789012345678901"] {
            let e = ttl_secs(&with(bad), 0, 3600).unwrap_err();
            assert_eq!(e.parts().2, Some("invalid_value"), "{bad}");
        }
    }
}
