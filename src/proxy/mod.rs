//! The hot path, one file per stage, in the order a request meets them:
//! ① `auth` gateway key → key context (cache first) ② `admit` IP and model allow-lists, rate
//! limits, budget and balance ③ `route` catalog model → provider → provider key ④ `upstream` the
//! pooled client ⑤ `stream` the body passes through ⑥ `meter` one usage record per request.

pub mod admit;
pub mod auth;
pub mod cached;
pub mod media;
pub mod meter;
pub mod multipart;
pub mod passthrough;
pub mod realtime;
pub mod request;
pub mod reserve;
pub mod responses;
pub mod route;
pub mod stored;
pub mod stream;
pub mod translate;
pub mod upstream;

use std::net::IpAddr;
use std::time::Duration;

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use http::{HeaderValue, Request, StatusCode, header};
use http_body_util::BodyExt;

use crate::error::ApiError;
use crate::metering::event::{KeptPayloads, Prices};
use crate::providers::{Endpoint, Usage};
use crate::proxy::admit::{RateInfo, rate_headers};
use crate::proxy::meter::{Meter, RequestFacts};
use crate::proxy::request::RequestView;
use crate::proxy::stream::{MeteredStream, StreamLimits, StreamMapping};
use crate::routing::plan::Plan;
use crate::routing::{Failure, Next, Outcome, judge};
use crate::state::AppState;

/// Largest complete (non-streamed) upstream body the gateway will hold.
const MAX_UPSTREAM_BODY: usize = 64 * 1024 * 1024;

/// How long a stream's response head waits for the first events, so both leave in one write.
pub(crate) const STREAM_HEAD_WAIT: Duration = Duration::from_millis(1);

/// How long admission waits for a usage-queue slot before answering 503.
const USAGE_SLOT_WAIT: Duration = Duration::from_secs(30);

/// Counts an upstream request that got no answer (connect error or timeout before headers) in
/// `upstream_errors_total`.
fn count_no_answer(state: &AppState, e: &ApiError) {
    let kind = if e.parts().0 == StatusCode::GATEWAY_TIMEOUT {
        "timeout"
    } else {
        "connect"
    };
    state
        .metrics
        .upstream_errors_total
        .with_label_values(&[kind])
        .inc();
}

/// Ends a request the gateway could not answer from upstream: metered with `e`'s status and
/// code; `e` is what the client gets.
pub(crate) fn finish_with(meter: Meter, e: ApiError) -> ApiError {
    meter.finish(
        e.parts().0.as_u16(),
        None,
        KeptPayloads::default(),
        e.parts().2,
    );
    e
}

/// An upstream request that got no answer: counted, then metered as [`finish_with`].
pub(crate) fn no_answer(state: &AppState, meter: Meter, e: ApiError) -> ApiError {
    count_no_answer(state, &e);
    finish_with(meter, e)
}

fn with_rate(mut resp: Response, rate: &RateInfo) -> Response {
    if rate.requests.is_some() || rate.tokens.is_some() {
        // The gateway's limits are the ones this client is held to: the upstream's (passed
        // back from its answer) would contradict them.
        let upstream: Vec<_> = resp
            .headers()
            .keys()
            .filter(|k| k.as_str().starts_with("x-ratelimit-"))
            .cloned()
            .collect();
        for k in upstream {
            resp.headers_mut().remove(k);
        }
    }
    rate_headers(resp.headers_mut(), rate);
    resp
}

/// Proxies one OpenAI request through every stage.
pub async fn forward(
    state: AppState,
    endpoint: Endpoint,
    ip: Option<IpAddr>,
    req: Request<Body>,
) -> Response {
    // The stages' state (2.6 KB) is boxed once here, so the layers above move a pointer, not the
    // state, each time they move their futures. Bound by `let`: a temporary in the awaited
    // expression would keep the unboxed future's storage in this future's state as well.
    let run = Box::pin(run(state, endpoint, ip, req));
    let mut resp = run.await;
    if endpoint.multipart() && !resp.status().is_success() {
        // A refused upload may be unread past its head: the connection cannot carry another
        // request, so the client is told to open a new one rather than find it closed.
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    if endpoint.anthropic_errors() {
        // The gateway's own errors (auth, admission, bad input) in Anthropic's shape; upstream
        // errors and translated ones already are.
        return reshape_error(resp, crate::protocols::for_endpoint(endpoint));
    }
    resp
}

/// A response the gateway's OpenAI-shaped renderer made, re-rendered by `protocol`.
fn reshape_error(
    mut resp: Response,
    protocol: Option<&'static dyn crate::protocols::ClientProtocol>,
) -> Response {
    let (Some(protocol), Some(err)) = (
        protocol,
        resp.extensions_mut()
            .remove::<crate::pivot::UpstreamError>(),
    ) else {
        return resp;
    };
    *resp.body_mut() = Body::from(protocol.error_body(err.status, &err));
    resp.headers_mut().remove(header::CONTENT_LENGTH);
    resp
}

/// A client request's life, top to bottom: ① auth ② admit ③ plan ④ attempt (until one answers,
/// retrying only before any byte reached the client) ⑤ relay ⑥ meter (inside relay: one usage
/// record per client request, whatever happens).
async fn run(
    state: AppState,
    endpoint: Endpoint,
    ip: Option<IpAddr>,
    req: Request<Body>,
) -> Response {
    let (parts, body) = req.into_parts();

    // ① auth
    let (key, bytes, upload) = match auth(&state, &parts.headers, body, endpoint).await {
        Ok(x) => x,
        Err(e) => return e.into_response(),
    };
    let caller = Caller {
        key,
        headers: &parts.headers,
        query: parts.uri.query(),
        upload,
        conversation_id: None,
    };
    admitted(state, endpoint, ip, caller, bytes).await
}

/// The hot path for a caller that is not a gateway key: the chat of a signed-in user
/// (`conversations::chat`), with a [`KeyCtx`](crate::cache::KeyCtx) standing for the user (no
/// key of its own: `key_id` empty, no key limits) and a body it built. Every stage after ① runs
/// as for `/v1`: admission, the user's limits and balance, the user's provider keys, metering
/// (the record carries `conversation_id`).
pub async fn forward_as(
    state: AppState,
    endpoint: Endpoint,
    ip: Option<IpAddr>,
    key: std::sync::Arc<crate::cache::KeyCtx>,
    headers: &http::HeaderMap,
    bytes: Bytes,
    conversation_id: Option<String>,
) -> Response {
    let caller = Caller {
        key,
        headers,
        query: None,
        upload: None,
        conversation_id,
    };
    let run = Box::pin(admitted(state, endpoint, ip, caller, bytes));
    run.await
}

/// Who is calling, as ① found them.
struct Caller<'a> {
    key: std::sync::Arc<crate::cache::KeyCtx>,
    headers: &'a http::HeaderMap,
    /// The client's query string, forwarded to a pass-through upstream (spec §8).
    query: Option<&'a str>,
    /// A multipart upload's unread rest.
    upload: Option<multipart::Upload>,
    /// The signed-in chat's conversation, carried into the usage record.
    conversation_id: Option<String>,
}

/// Stages ② to ⑥ of a request whose caller is known and whose body was read.
async fn admitted(
    state: AppState,
    endpoint: Endpoint,
    ip: Option<IpAddr>,
    caller: Caller<'_>,
    bytes: Bytes,
) -> Response {
    let Caller {
        key,
        headers,
        query,
        upload,
        conversation_id,
    } = caller;
    // Set by `edge` (or the router's layer) when the client sent none; forwarded upstream as is.
    let request_id_header = headers.get(crate::edge::X_REQUEST_ID).cloned();
    // A response-cache hit this replica holds is found before the body is parsed: its bytes
    // are those of a request that was validated when the answer was kept (§11).
    let early = cached::early(&state, &key, endpoint, &bytes, headers, query);
    let (early_key, found) = match early {
        Some(e) => (Some(e.lookup), e.found),
        None => (None, None),
    };
    let (view, hit) = match found {
        Some(h) => (h.view, Some(h.answer)),
        None => match RequestView::parse(&bytes) {
            Ok(v) => (v, None),
            Err(e) => return e.into_response(),
        },
    };
    if view.stream && !endpoint.can_stream() {
        return ApiError::invalid_param(
            "stream",
            format!("/v1/{} does not stream.", endpoint.as_str()),
        )
        .into_response();
    }
    // `store: true` on a chat completion: tollgate keeps it (its metadata checked now).
    let to_store = if endpoint == Endpoint::ChatCompletions && hit.is_none() {
        match stored::requested(&state, &view, &key.user_id, &key.key_id) {
            Ok(t) => t,
            Err(e) => return e.into_response(),
        }
    } else {
        None
    };
    // The key made from the raw bytes serves the lookup after admission too: hashed once.
    let cache = if hit.is_some() {
        early_key
    } else {
        match cached::lookup(&state, &key, &view, headers, early_key, to_store.is_some()) {
            Ok(c) => c,
            Err(e) => return e.into_response(),
        }
    };
    let call = Call {
        endpoint,
        view: &view,
        bytes: &bytes,
        request_id: request_id_header.as_ref(),
        headers,
        query,
        cache,
        hit,
    };

    // ② admit, ③ plan (or the answer from the response cache)
    // Each stage's future is boxed where its parent awaits it: a future is copied whole into
    // its parent's state when it starts, so a large one inline is copied again at every level
    // above it (see `tests::stage_futures_stay_small`).
    let admit = Box::pin(admit(&state, &key, ip, &call));
    let mut admitted = match admit.await {
        Ok(Admission::Upstream(a)) => a,
        Ok(Admission::Cached(resp)) => return resp,
        Err(resp) => return resp,
    };
    admitted.meter.facts.conversation_id = conversation_id;
    let rate = admitted.rate.clone();

    // ④ attempt, ⑤ relay, ⑥ meter
    let attempt = Box::pin(attempt(&state, &key, &call, admitted, to_store, upload));
    let resp = attempt.await;
    with_rate(resp, &rate)
}

/// ① auth: the gateway key, then the body (decoded, bounded, read within its timeout). A
/// multipart upload is read only as far as its `model` field; the rest streams upstream later.
async fn auth(
    state: &AppState,
    headers: &http::HeaderMap,
    body: Body,
    endpoint: Endpoint,
) -> Result<
    (
        std::sync::Arc<crate::cache::KeyCtx>,
        Bytes,
        Option<multipart::Upload>,
    ),
    ApiError,
> {
    let key = auth::authenticate(state, headers).await?;
    let body = decoded_body(headers, body, state.config.server.max_body_bytes)?;
    let cfg = &state.config.server;
    if endpoint.multipart() {
        let u = multipart::read_head(
            headers,
            body,
            cfg.max_body_bytes,
            cfg.body_read_timeout_secs,
        )
        .await?;
        return Ok((key, Bytes::from(u.view_json()), Some(u)));
    }
    let bytes = read_body(body, cfg.max_body_bytes, cfg.body_read_timeout_secs).await?;
    Ok((key, bytes, None))
}

/// What admission decided: go upstream, or the answer is in the response cache.
// Moved once, by value: boxing `Admitted` would cost every request that is not a cache hit an
// allocation, to save stack on the rare one that is.
#[allow(clippy::large_enum_variant)]
enum Admission {
    Upstream(Admitted),
    /// A response-cache hit, answered and metered (no plan, nothing reserved).
    Cached(Response),
}

/// What admission decided: the model, its plan, the limits that apply, the meter holding the
/// request's usage slot and reservation.
struct Admitted {
    model: std::sync::Arc<crate::cache::CatalogModel>,
    plan: Plan,
    rate: RateInfo,
    meter: Meter,
}

/// ② admit (allow-lists, rate limits, the usage slot, budget and balance — charged once per
/// client request, whatever the attempts) and ③ plan (the model's deployments and key pools).
/// A request using the response cache whose answer is there is answered once admitted by the
/// allow-lists and rate limits: nothing reserved, no plan, cost 0.
async fn admit(
    state: &AppState,
    key: &std::sync::Arc<crate::cache::KeyCtx>,
    ip: Option<IpAddr>,
    call: &Call<'_>,
) -> Result<Admission, Response> {
    let (view, bytes, endpoint) = (call.view, call.bytes, call.endpoint);
    let catalog = match state.caches.catalog(&state.db).await {
        Ok(c) => c,
        Err(e) => return Err(ApiError::from(e).into_response()),
    };
    let approx_tokens = (bytes.len() / 4).max(1).min(u32::MAX as usize) as u32;
    let (model, rate) = match admit::admit(
        state,
        key,
        ip,
        &view.model,
        catalog.get(&view.model),
        approx_tokens,
    )
    .await
    {
        Ok(x) => x,
        Err(refusal) => return Err(with_rate(refusal.error.into_response(), &refusal.rate)),
    };

    // ⑥ meter: the usage slot is taken before anything is reserved or sent upstream.
    let Some(permit) = state.usage.reserve(USAGE_SLOT_WAIT).await else {
        return Err(with_rate(
            ApiError::Unavailable {
                message: "The gateway is overloaded (usage queue full); retry shortly.".into(),
            }
            .into_response(),
            &rate,
        ));
    };

    // Boxed: the lookup (and its Redis call) is only made for requests using the cache, and its
    // state would otherwise sit in every request's future.
    let hit = match (&call.cache, &call.hit) {
        (_, Some(early)) => Some(early.clone()),
        (Some(lookup), None) => Box::pin(state.responses.get(&lookup.key, lookup.ttl)).await,
        (None, None) => None,
    };
    if let Some(hit) = hit {
        let mut facts = request_facts(key, call, &model, Default::default(), false);
        hit.provider.clone_into(&mut facts.provider);
        facts.prices = Prices::default();
        facts.routed.cache_hit = true;
        let meter = new_meter(state, key, call, permit, facts).await;
        return Ok(Admission::Cached(with_rate(
            cached::answer(meter, &hit),
            &rate,
        )));
    }

    // ③ plan — its errors are reported after the budget and balance checks, in the contract's order.
    let plan = plan(state, key, &model, endpoint).await;

    // ② admit, continued: budget and balance.
    let charged =
        state.config.billing.enforce_balance || plan.as_ref().is_ok_and(Plan::may_use_shared);
    let max_cost = reserve::max_cost(view, bytes.len(), &model, endpoint);
    let reservation = match reserve::reserve(state, key, charged && plan.is_ok(), max_cost).await {
        Ok(r) => r,
        Err(e) => return Err(with_rate(e.into_response(), &rate)),
    };
    let plan = match plan {
        Ok(p) => p,
        Err(e) => {
            reserve::release(state, key, reservation);
            return Err(with_rate(e.into_response(), &rate));
        }
    };
    let facts = request_facts(key, call, &model, reservation, charged);
    let meter = new_meter(state, key, call, permit, facts).await;
    Ok(Admission::Upstream(Admitted {
        model,
        plan,
        rate,
        meter,
    }))
}

/// What the meter knows of an admitted request before any attempt.
fn request_facts(
    key: &crate::cache::KeyCtx,
    call: &Call<'_>,
    model: &crate::cache::CatalogModel,
    reservation: crate::metering::event::Reservation,
    charged: bool,
) -> RequestFacts {
    let (view, bytes, endpoint) = (call.view, call.bytes, call.endpoint);
    RequestFacts {
        user_id: key.user_id.clone(),
        key_id: key.key_id.clone(),
        model: view.model.clone(),
        provider: model.provider.key.clone(),
        endpoint,
        stream: view.stream,
        prices: Prices::from_model(&model.model),
        request_id: call
            .request_id
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned(),
        shared_key: false,
        reservation,
        charged,
        bounds: reserve::token_bounds(view, bytes.len(), model, endpoint),
        request_body: Bytes::new(),
        request_len: 0,
        response_id: None,
        conversation_id: None,
        routed: Default::default(),
        extra_cost_nanos: 0,
        units_metered: false,
    }
}

/// ⑥ meter: the request's meter on its usage slot, keeping the body for an estimate, telling
/// the token-per-minute limiters what the answer used.
async fn new_meter(
    state: &AppState,
    key: &std::sync::Arc<crate::cache::KeyCtx>,
    call: &Call<'_>,
    permit: tokio::sync::mpsc::OwnedPermit<crate::metering::event::UsageEvent>,
    facts: RequestFacts,
) -> Meter {
    let mut meter = Meter::new(permit, facts, state.metrics.clone());
    meter.facts.keep_body(call.bytes);
    let limiters = state.limiters.clone();
    let key = key.clone();
    let defaults = state
        .caches
        .runtime_defaults(&state.db, &state.config)
        .await
        .unwrap_or_default();
    let user_tpm = admit::user_limits(&key, &state.config, defaults).1;
    meter.on_usage(move |u: Usage| {
        let n = u.completion.clamp(0, u32::MAX as i64) as u32;
        limiters.consume_tokens(&key, Some(user_tpm), n);
    });
    meter
}

/// ③ plan: the model serves this endpoint, and the user has a key for one of its deployments.
async fn plan(
    state: &AppState,
    key: &crate::cache::KeyCtx,
    model: &std::sync::Arc<crate::cache::CatalogModel>,
    endpoint: Endpoint,
) -> Result<Plan, ApiError> {
    route::check_endpoint(model, endpoint)?;
    let mut plan = Plan::new(model.clone());
    if endpoint.media() {
        // Refused here, before anything is reserved, when no deployment could serve it.
        route::check_media(&plan, endpoint)?;
    }
    route::load_pools(state, key, &mut plan).await?;
    if !plan.has_keys() {
        return Err(route::key_missing(model));
    }
    Ok(plan)
}

/// The next fallback model with a usable plan: servable, allowed for the key, of the
/// endpoint's type, with a key for one of its deployments.
async fn next_fallback(
    state: &AppState,
    key: &crate::cache::KeyCtx,
    requested: &crate::cache::CatalogModel,
    next: &mut usize,
    endpoint: Endpoint,
) -> Option<Plan> {
    let catalog = state.caches.catalog(&state.db).await.ok()?;
    while *next < requested.fallbacks.len() {
        let name = &requested.fallbacks[*next];
        *next += 1;
        let Some(m) = catalog.servable(name) else {
            continue;
        };
        if !key.allows_model(name) {
            continue;
        }
        if let Ok(p) = plan(state, key, m, endpoint).await {
            return Some(p);
        }
    }
    None
}

/// How a failed attempt ended (nothing of it reached the client).
enum Failed {
    /// The upstream's error answer, its body read.
    Answer {
        head: http::response::Parts,
        body: Bytes,
    },
    /// No answer: connect error or timeout.
    NoAnswer(ApiError),
}

/// ④ attempt: walks the plan — the requested model's deployments and keys, then its fallback
/// models in order — until an attempt answers. A failure (connect error, timeout before headers,
/// 401/403, 408, 429, 5xx) moves on while `routing.max_attempts` and `routing.retry_budget_secs`
/// allow; any other answer, or the last failure, goes to the client through ⑤ relay.
async fn attempt(
    state: &AppState,
    key: &crate::cache::KeyCtx,
    call: &Call<'_>,
    admitted: Admitted,
    to_store: Option<stored::ToStore>,
    mut upload: Option<multipart::Upload>,
) -> Response {
    let Admitted {
        model: requested,
        mut plan,
        mut meter,
        ..
    } = admitted;
    let cfg = &state.config;
    let budget = Duration::from_secs(cfg.routing.retry_budget_secs);
    let max_attempts = cfg.routing.max_attempts.max(1);
    let health = &state.health;
    let mut fallback_at = 0usize;
    let mut attempts = 0u32;
    let mut started: Option<std::time::Instant> = None;
    // The last failure, answered when nothing else can be tried.
    let mut last: Option<Failed> = None;
    // The client's request as the pivot, decoded at the first attempt that translates it.
    let mut pivot: Option<crate::pivot::ChatRequest> = None;
    let mut to_store = to_store;
    // ④ upstream — from here the request is billed even if the process is killed.
    meter.spool_shared(&state.spool).await;
    loop {
        let within = attempts < max_attempts && started.is_none_or(|t| t.elapsed() < budget);
        let pick = if !within {
            None
        } else {
            match plan.next(health, false) {
                Some(p) => Some(p),
                None => loop {
                    // Boxed: a fallback's plan (its catalog and key pools) is the rare path.
                    let fallback = Box::pin(next_fallback(
                        state,
                        key,
                        &requested,
                        &mut fallback_at,
                        call.endpoint,
                    ));
                    match fallback.await {
                        Some(p) => {
                            plan = p;
                            if let Some(pick) = plan.next(health, false) {
                                break Some(pick);
                            }
                        }
                        // Nothing healthy anywhere: the pair that recovers soonest, once.
                        None if attempts == 0 => break plan.next(health, true),
                        None => break None,
                    }
                },
            }
        };
        let Some(pick) = pick else {
            return answer_failure(state, meter, last, &plan, attempts);
        };
        let route = match route::build(state, &plan, pick, call.endpoint) {
            Ok(r) => r,
            Err(e) => {
                meter.facts.routed.attempts = attempts.max(1);
                meter.finish(
                    e.parts().0.as_u16(),
                    None,
                    KeptPayloads::default(),
                    e.parts().2,
                );
                return e.into_response();
            }
        };
        attempts += 1;
        started.get_or_insert_with(std::time::Instant::now);
        let provider = plan.deployments()[pick.deployment].provider.key.as_str();
        if attempts > 1 {
            state
                .metrics
                .routing_retries_total
                .with_label_values(&[provider])
                .inc();
        }
        answering(&mut meter, &requested, &plan, &route, provider, attempts);
        let began = std::time::Instant::now();
        let pair = plan.pair_of(pick);
        let masked = plan.masked_of(pick);

        let passes = route.adapter.is_some()
            && route.passes_through(call.endpoint)
            && matches!(
                call.endpoint,
                Endpoint::ChatCompletions | Endpoint::Completions | Endpoint::Embeddings
            );
        if !passes && retried_foreign(call.endpoint, &route) {
            // Through the pivot, or Anthropic's Messages to an `anthropic` provider: retried
            // like the pass-through until a byte reached the client.
            let foreign = Box::pin(attempt_foreign(
                state,
                &route,
                call,
                &mut pivot,
                meter,
                &mut to_store,
            ));
            let (m, failed, failure) = match foreign.await {
                Ok(resp) => {
                    if let Some(pair) = pair {
                        note(state, pair, masked, &route, Outcome::Ok, began.elapsed());
                    }
                    return with_routing(resp, &plan.model.model.name, attempts);
                }
                Err(f) => *f,
            };
            meter = m;
            let (next, outcome) = judge(failure);
            if let Some(pair) = pair {
                note(state, pair, masked, &route, outcome, began.elapsed());
            }
            match next {
                Next::Answer => {
                    return answer_failure(state, meter, Some(failed), &plan, attempts);
                }
                Next::Retry => {}
                Next::Fallback => plan.give_up(),
            }
            last = Some(failed);
            continue;
        }
        if !passes {
            // Through another protocol's pass-through or the media paths: one attempt, its
            // answer is the client's; health still learns from it.
            // Boxed: the pivot's and the media paths' state (≈ 10 KB) would otherwise sit in
            // every request's future, and be copied with it, pass-through ones included.
            let translated = Box::pin(translated(
                state,
                &route,
                call,
                meter,
                to_store,
                upload.take(),
            ));
            let resp = translated.await;
            let outcome = outcome_of_status(resp.status(), resp.headers());
            if let Some(pair) = pair {
                note(state, pair, masked, &route, outcome, began.elapsed());
            }
            return with_routing(resp, &plan.model.model.name, attempts);
        }

        let send = Box::pin(send(state, &route, call));
        let head = match send.await {
            Ok(r) if r.status().is_success() || r.status().is_redirection() => {
                if let Some(pair) = pair {
                    note(state, pair, masked, &route, Outcome::Ok, began.elapsed());
                }
                let relay = Box::pin(relay(state, &route, call, r, meter, to_store));
                let out = relay.await;
                return with_routing(out, &plan.model.model.name, attempts);
            }
            Ok(r) => r,
            Err(e) => {
                let failure = if e.parts().0 == StatusCode::GATEWAY_TIMEOUT {
                    Failure::Timeout
                } else {
                    Failure::Connect
                };
                let (_, outcome) = judge(failure);
                if let Some(pair) = pair {
                    note(state, pair, masked, &route, outcome, began.elapsed());
                }
                last = Some(Failed::NoAnswer(e));
                continue;
            }
        };
        // An error answer: its body (small, bounded) says whether the context was too long.
        let status = head.status();
        let retry_after = crate::routing::retry_after(head.headers());
        let (head, body) = head.into_parts();
        let idle = Duration::from_secs(cfg.upstream.idle_timeout_secs);
        // Boxed, like the stages: an error answer's body is the rare path.
        let body = Box::pin(collect(body, idle, &mut meter));
        let body = body.await.unwrap_or_default();
        let (next, outcome) = judge(Failure::Status {
            status,
            retry_after,
            context_too_long: status == StatusCode::BAD_REQUEST
                && crate::routing::is_context_too_long(&body),
        });
        if let Some(pair) = pair {
            note(state, pair, masked, &route, outcome, began.elapsed());
        }
        let failed = Failed::Answer { head, body };
        match next {
            Next::Answer => return answer_failure(state, meter, Some(failed), &plan, attempts),
            Next::Retry => {}
            Next::Fallback => plan.give_up(),
        }
        last = Some(failed);
    }
}

/// The meter's facts follow the attempt that may answer: its provider, model and prices, its
/// key (a shared one is charged to the balance), the attempts so far.
fn answering(
    meter: &mut Meter,
    requested: &crate::cache::CatalogModel,
    plan: &Plan,
    route: &route::Route,
    provider: &str,
    attempts: u32,
) {
    let f = &mut meter.facts;
    f.routed.attempts = attempts;
    if f.provider != provider {
        provider.clone_into(&mut f.provider);
    }
    f.shared_key = route.shared_key;
    f.charged |= route.shared_key;
    let answering = &plan.model.model;
    if answering.id != requested.model.id {
        if f.routed.fallback_from.is_none() {
            f.routed.fallback_from = Some(requested.model.name.clone());
        }
        answering.name.clone_into(&mut f.model);
        f.prices = Prices::from_model(answering);
    }
}

/// Health and metrics learn one attempt's outcome; a refused key is marked invalid.
fn note(
    state: &AppState,
    pair: crate::routing::health::PairRef<'_>,
    masked: &str,
    route: &route::Route,
    outcome: Outcome,
    took: Duration,
) {
    state.health.record(pair, masked, outcome, took);
    let label = match outcome {
        Outcome::Ok => "ok",
        Outcome::RateLimited(_) => "rate_limited",
        Outcome::Refused => "refused",
        Outcome::Failed => "failed",
    };
    state
        .metrics
        .routing_attempts_total
        .with_label_values(&[pair.provider, label])
        .inc();
    if outcome == Outcome::Refused {
        crate::routing::invalidate_key(state, route.provider_key_id.clone());
    }
}

/// What a finished response (the gateway's own, or translated) says about its attempt.
fn outcome_of_status(status: StatusCode, headers: &http::HeaderMap) -> Outcome {
    match status.as_u16() {
        401 | 403 => Outcome::Refused,
        429 => Outcome::RateLimited(crate::routing::retry_after(headers)),
        408 | 500.. => Outcome::Failed,
        _ => Outcome::Ok,
    }
}

/// `x-tollgate-model` (the model that answered) and `x-tollgate-attempts`.
fn with_routing(mut resp: Response, model: &str, attempts: u32) -> Response {
    routing_headers(resp.headers_mut(), model, attempts.max(1));
    resp
}

/// The response header naming the model that answered.
const X_TOLLGATE_MODEL: http::HeaderName = http::HeaderName::from_static("x-tollgate-model");
/// The response header counting the upstream attempts behind the answer (0: a cache hit).
const X_TOLLGATE_ATTEMPTS: http::HeaderName = http::HeaderName::from_static("x-tollgate-attempts");

/// Sets `x-tollgate-model` and `x-tollgate-attempts` (names built once, not parsed per request).
pub(crate) fn routing_headers(h: &mut http::HeaderMap, model: &str, attempts: u32) {
    if let Ok(v) = HeaderValue::from_str(model) {
        h.insert(X_TOLLGATE_MODEL, v);
    }
    h.insert(X_TOLLGATE_ATTEMPTS, HeaderValue::from(attempts));
}

/// One pass-through attempt: the request for this route's deployment, up to its response head.
async fn send(
    state: &AppState,
    route: &route::Route,
    call: &Call<'_>,
) -> Result<http::Response<upstream::ResponseBody>, ApiError> {
    let Some(adapter) = route.adapter else {
        return Err(ApiError::internal(anyhow::anyhow!(
            "no pass-through adapter"
        )));
    };
    let view = call.view;
    let upstream_body =
        if call.endpoint == Endpoint::ChatCompletions && stored::has_private_fields(view) {
            Bytes::from(view.rewrite_without(&route.upstream_model, &stored::NOT_FORWARDED))
        } else {
            adapter.map_request(view, &route.upstream_model)
        };
    let res = upstream::send(
        &state.http,
        route,
        upstream_body,
        view.stream,
        call.request_id,
        call.headers,
        call.query,
        Duration::from_secs(state.config.upstream.first_byte_timeout_secs),
    )
    .await;
    if let Err(e) = &res {
        count_no_answer(state, e);
    }
    res
}

/// Whether an attempt that is not OpenAI's pass-through can be retried: a chat completion or an
/// Anthropic Message through the pivot, or Anthropic's Messages passed through. (The Responses
/// API, token counting, embeddings and the media routes make one attempt.)
fn retried_foreign(endpoint: Endpoint, route: &route::Route) -> bool {
    match endpoint {
        Endpoint::Messages => route.translator.is_some(),
        Endpoint::ChatCompletions => {
            route.translator.is_some() && !route.passes_through(Endpoint::ChatCompletions)
        }
        _ => false,
    }
}

/// A failed attempt: the meter back, the failure as the client would get it, and what it was.
type ForeignFailure = Box<(Meter, Failed, Failure)>;

/// One attempt of [`retried_foreign`] kind. `Ok`: the client's answer (a success relayed, or a
/// request this route cannot take); `Err`: the upstream failed before any byte reached the
/// client, its error answer already in the client's shape.
async fn attempt_foreign(
    state: &AppState,
    route: &route::Route,
    call: &Call<'_>,
    pivot: &mut Option<crate::pivot::ChatRequest>,
    mut meter: Meter,
    to_store: &mut Option<stored::ToStore>,
) -> Result<Response, ForeignFailure> {
    let endpoint = call.endpoint;
    let Some(protocol) = crate::protocols::for_endpoint(endpoint) else {
        return Ok(translate::refuse(
            &crate::protocols::openai_chat::OpenAiChat,
            meter,
            ApiError::internal(anyhow::anyhow!("no client protocol for {endpoint:?}")),
        ));
    };
    let passes = route.passes_through(endpoint);
    let sent = if passes {
        // Anthropic's Messages to an `anthropic` provider: the body as the client sent it.
        let mut f = match passthrough::anthropic_request(route, call) {
            Ok(f) => f,
            Err(e) => return Ok(passthrough::refuse(protocol, meter, e)),
        };
        match passthrough::send(state, route, &mut f, call.request_id).await {
            Ok(r) if r.status().is_success() => {
                let out = passthrough::answer(state, route, f, &call.view.model, meter, r);
                return Ok(Box::pin(out).await);
            }
            other => other,
        }
    } else {
        // The pivot is this attempt's while it runs, and goes back for the next one.
        let p = match pivot.take() {
            Some(p) => p,
            None => match translate::decode(protocol, call.bytes, &call.view.model) {
                Ok(p) => p,
                Err(e) => {
                    meter.finish(400, None, KeptPayloads::default(), Some("invalid_request"));
                    return Ok(translate::api_error_response(protocol, e));
                }
            },
        };
        let prepared = match translate::prepare(route, &p, call.headers) {
            Ok(x) => x,
            Err(e) => return Ok(translate::refuse(protocol, meter, e)),
        };
        match translate::send(state, route, prepared, p.stream, call.request_id).await {
            Ok(r) if r.status().is_success() => {
                let x = translated_exchange(protocol, p, &call.view.model, to_store.take());
                let out = translate::answer(state, route, x, meter, r);
                return Ok(Box::pin(out).await);
            }
            other => {
                *pivot = Some(p);
                other
            }
        }
    };
    let head = match sent {
        Ok(r) => r,
        Err(e) => {
            count_no_answer(state, &e);
            let failure = if e.parts().0 == StatusCode::GATEWAY_TIMEOUT {
                Failure::Timeout
            } else {
                Failure::Connect
            };
            return Err(Box::new((meter, Failed::NoAnswer(e), failure)));
        }
    };
    // An error answer: its body (small, bounded) read, and put in the client's shape.
    let status = head.status();
    let retry_after = crate::routing::retry_after(head.headers());
    let (head, body) = head.into_parts();
    let idle = Duration::from_secs(state.config.upstream.idle_timeout_secs);
    let body = collect(body, idle, &mut meter).await.unwrap_or_default();
    let context_too_long =
        status == StatusCode::BAD_REQUEST && crate::routing::is_context_too_long(&body);
    let (head, body, context_too_long) = if passes {
        (head, body, context_too_long)
    } else {
        let (shaped, shaped_body, err) =
            translate::shaped_error(route, protocol, status, &head.headers, &body);
        let too_long = context_too_long
            || (status == StatusCode::BAD_REQUEST
                && err.code.as_deref() == Some("context_length_exceeded"));
        (shaped, shaped_body, too_long)
    };
    let failure = Failure::Status {
        status,
        retry_after,
        context_too_long,
    };
    Err(Box::new((meter, Failed::Answer { head, body }, failure)))
}

/// The exchange a translated answer is encoded with: the client's model, its usage option, and
/// (for a stored chat completion) the store that keeps the answer.
fn translated_exchange<'a>(
    protocol: &'a dyn crate::protocols::ClientProtocol,
    pivot: crate::pivot::ChatRequest,
    client_model: &str,
    to_store: Option<stored::ToStore>,
) -> translate::Exchange<'a> {
    let ctx = crate::protocols::EncodeCtx {
        client_model: client_model.to_owned(),
        include_usage: pivot.include_usage(),
        created: chrono::Utc::now().timestamp(),
        id: to_store.as_ref().map(|t| t.id.clone()),
    };
    let on_done = to_store.map(|t| {
        Box::new(move |answer: serde_json::Value, _usage: Option<Usage>| t.save(answer))
            as translate::OnDone
    });
    translate::Exchange {
        protocol,
        pivot,
        ctx,
        on_done,
    }
}

/// The last failure goes to the client as it was: the upstream's error answer (status and
/// body), or 502/504 for no answer; metered once.
fn answer_failure(
    state: &AppState,
    mut meter: Meter,
    last: Option<Failed>,
    plan: &Plan,
    attempts: u32,
) -> Response {
    meter.facts.routed.attempts = attempts.max(1);
    let resp = match last {
        Some(Failed::Answer { head, body }) => {
            let status = head.status;
            let kind = if status.is_client_error() {
                "status_4xx"
            } else {
                "status_5xx"
            };
            state
                .metrics
                .upstream_errors_total
                .with_label_values(&[kind])
                .inc();
            meter.finish(
                status.as_u16(),
                None,
                KeptPayloads::default(),
                Some("upstream_status"),
            );
            let mut out = Response::new(Body::from(body));
            *out.status_mut() = status;
            out.headers_mut()
                .extend(passthrough::passed_headers(&head.headers));
            out.headers_mut().insert(
                header::CONTENT_TYPE,
                head.headers
                    .get(header::CONTENT_TYPE)
                    .cloned()
                    .unwrap_or_else(|| HeaderValue::from_static("application/json")),
            );
            out
        }
        Some(Failed::NoAnswer(e)) => finish_with(meter, e).into_response(),
        None if attempts == 0 && plan.every_key_refused(&state.health) => {
            finish_with(meter, route::key_missing(&plan.model)).into_response()
        }
        None => {
            let e = ApiError::Upstream {
                status: StatusCode::SERVICE_UNAVAILABLE,
                message: format!(
                    "No deployment of `{}` can take the request now: its provider keys are cooling down, failing, or were rejected by the provider (see GET /api/provider-keys; POST /api/provider-keys/{{id}}/verify puts a fixed key back).",
                    plan.model.model.name
                ),
                code: "upstream_unavailable",
            };
            meter.finish(
                503,
                None,
                KeptPayloads::default(),
                Some("no_healthy_deployment"),
            );
            e.into_response()
        }
    };
    with_routing(resp, &plan.model.model.name, attempts)
}

/// ⑤ relay: an answer that succeeded goes to the client — a stream event by event, a complete
/// body mapped once — and ⑥ the meter records it when it ends.
async fn relay(
    state: &AppState,
    route: &route::Route,
    call: &Call<'_>,
    resp: http::Response<upstream::ResponseBody>,
    mut meter: Meter,
    mut to_store: Option<stored::ToStore>,
) -> Response {
    let view = call.view;
    let Some(adapter) = route.adapter else {
        return ApiError::internal(anyhow::anyhow!("no pass-through adapter")).into_response();
    };
    let cfg = &state.config.upstream;
    // The model the client sees: the one that answered (a fallback's name when one did).
    let client_model = meter.facts.model.clone();
    let status = resp.status();
    let passed = passthrough::passed_headers(resp.headers());
    let idle = Duration::from_secs(cfg.idle_timeout_secs);
    let is_sse = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));

    if view.stream && is_sse {
        let mut body = MeteredStream::new(
            resp.into_body(),
            StreamMapping {
                adapter: Some(adapter),
                reader: to_store.take().map(stored::ToStore::observer),
                client_model,
                upstream_model: route.upstream_model.clone(),
                client_wants_usage: view.include_usage,
            },
            meter,
            StreamLimits {
                idle_timeout: idle,
                max_event_bytes: cfg.max_sse_event_bytes,
            },
            state.metrics.active_streams.clone(),
        );
        body.prime(STREAM_HEAD_WAIT).await;
        let mut out = Response::new(Body::new(body));
        let h = out.headers_mut();
        h.extend(passed);
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream; charset=utf-8"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        h.insert("x-accel-buffering", HeaderValue::from_static("no"));
        return out;
    }

    // A complete body.
    let content_type = resp.headers().get(header::CONTENT_TYPE).cloned();
    let body = match collect(resp.into_body(), idle, &mut meter).await {
        Ok(b) => b,
        Err(e) => {
            state
                .metrics
                .upstream_errors_total
                .with_label_values(&["body"])
                .inc();
            meter.finish(
                e.parts().0.as_u16(),
                None,
                KeptPayloads::default(),
                Some("upstream_body"),
            );
            return e.into_response();
        }
    };
    let (mapped, usage) = adapter.map_response(body.clone(), &client_model, &route.upstream_model);
    let kept = if usage.is_none() {
        KeptPayloads::one(body)
    } else {
        KeptPayloads::default()
    };
    // Read before `finish` takes the meter: the facts a cached copy of this answer carries.
    let provider = call.cache.is_some().then(|| meter.facts.provider.clone());
    meter.finish(status.as_u16(), usage, kept, None);
    let out_body = match to_store.take() {
        Some(t) => t.answer(mapped),
        None => mapped,
    };
    let kept_in_cache = match (&call.cache, provider) {
        (Some(lookup), Some(provider)) if status == StatusCode::OK => {
            let answered = cached::Answered {
                body: &out_body,
                content_type: content_type.as_ref(),
                model: &client_model,
                provider: &provider,
                usage,
                asked: cached::asked(call.view),
            };
            // Boxed like the lookup: only requests using the cache carry its state.
            Box::pin(cached::keep(state, lookup, answered)).await
        }
        _ => false,
    };
    let mut out = Response::new(Body::from(out_body));
    *out.status_mut() = status;
    out.headers_mut().extend(passed);
    out.headers_mut().insert(
        header::CONTENT_TYPE,
        content_type.unwrap_or_else(|| HeaderValue::from_static("application/json")),
    );
    if kept_in_cache {
        out.headers_mut()
            .insert(cached::STATUS_HEADER, HeaderValue::from_static("miss"));
    }
    out
}

/// What the client sent, as the stages after admission need it.
pub struct Call<'a> {
    pub endpoint: Endpoint,
    pub view: &'a RequestView<'a>,
    pub bytes: &'a Bytes,
    pub request_id: Option<&'a HeaderValue>,
    pub headers: &'a http::HeaderMap,
    /// The client's query string (spec §8: forwarded to a pass-through upstream as is).
    pub query: Option<&'a str>,
    /// The request uses the response cache (its answer is kept when it is a 200).
    pub cache: Option<cached::Lookup>,
    /// The answer [`cached::early`] found for it before the body was parsed.
    pub hit: Option<std::sync::Arc<crate::routing::cache::CachedAnswer>>,
}

/// A request whose client protocol is not its provider's: through the pivot.
async fn translated(
    state: &AppState,
    route: &route::Route,
    call: &Call<'_>,
    meter: Meter,
    to_store: Option<stored::ToStore>,
    upload: Option<multipart::Upload>,
) -> Response {
    if call.endpoint.media() {
        return media::forward(state, route, call, meter, upload).await;
    }
    let Call {
        endpoint,
        view,
        bytes,
        request_id,
        headers: client_sent,
        ..
    } = *call;
    match endpoint {
        Endpoint::Messages | Endpoint::CountTokens if route.passes_through(endpoint) => {
            return passthrough::anthropic(state, route, call, meter).await;
        }
        Endpoint::CountTokens => return count_tokens_locally(call, meter),
        Endpoint::Responses => return responses::forward(state, route, call, meter).await,
        _ => {}
    }
    if endpoint == Endpoint::Embeddings {
        return translate::embeddings(
            state,
            route,
            bytes,
            &view.model,
            meter,
            request_id,
            client_sent,
        )
        .await;
    }
    let Some(protocol) = crate::protocols::for_endpoint(endpoint) else {
        let e = ApiError::invalid_param(
            "model",
            format!(
                "{} is served only by OpenAI-compatible providers; the model `{}` is on a `{}` provider.",
                endpoint.v1_path(),
                view.model,
                route.kind
            ),
        );
        meter.finish(400, None, KeptPayloads::default(), Some("untranslatable"));
        return e.into_response();
    };
    let pivot = match translate::decode(protocol, bytes, &view.model) {
        Ok(p) => p,
        Err(e) => {
            meter.finish(400, None, KeptPayloads::default(), Some("invalid_request"));
            return translate::api_error_response(protocol, e);
        }
    };
    // The meter keeps the client's own body for an estimate (`meter` did): the estimator reads
    // each protocol's messages, system and instructions, so the pivot is not encoded again.
    let x = translated_exchange(protocol, pivot, &view.model, to_store);
    translate::forward(state, route, x, meter, request_id, client_sent).await
}

/// The body as sent, or decoded from its `content-encoding` (gzip, deflate, br, zstd): the
/// decoded size is what `server.max_body_bytes` bounds. Any other encoding is 415, and a
/// declared `content-length` over the limit is 413 before a byte is read (so hyper never sends
/// `100 Continue` for it).
fn decoded_body(headers: &http::HeaderMap, body: Body, limit: usize) -> Result<Body, ApiError> {
    use async_compression::tokio::bufread::{BrotliDecoder, GzipDecoder, ZlibDecoder, ZstdDecoder};
    use futures_util::TryStreamExt;
    use tokio_util::io::{ReaderStream, StreamReader};

    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::PayloadTooLarge);
    }
    let mut encodings = headers.get_all(header::CONTENT_ENCODING).iter();
    let (Some(enc), None) = (encodings.next(), encodings.next()) else {
        if headers.contains_key(header::CONTENT_ENCODING) {
            return Err(ApiError::UnsupportedEncoding("several encodings".into()));
        }
        return Ok(body);
    };
    let enc = enc.to_str().unwrap_or("").trim().to_ascii_lowercase();
    if enc.is_empty() || enc == "identity" {
        return Ok(body);
    }
    let reader = StreamReader::new(TryStreamExt::map_err(body.into_data_stream(), |e| {
        std::io::Error::other(e.to_string())
    }));
    let decoded = match enc.as_str() {
        "gzip" | "x-gzip" => Body::from_stream(ReaderStream::new(GzipDecoder::new(reader))),
        "deflate" => Body::from_stream(ReaderStream::new(ZlibDecoder::new(reader))),
        "br" => Body::from_stream(ReaderStream::new(BrotliDecoder::new(reader))),
        "zstd" => Body::from_stream(ReaderStream::new(ZstdDecoder::new(reader))),
        _ => {
            let shown: String = enc.chars().take(32).collect();
            return Err(ApiError::UnsupportedEncoding(shown));
        }
    };
    Ok(decoded)
}

/// `/v1/messages/count_tokens` for a model whose provider cannot count: the gateway's own
/// count (the estimator's tokenizer over the request as the pivot), `{"input_tokens": n}`.
fn count_tokens_locally(call: &Call<'_>, meter: Meter) -> Response {
    let protocol = &crate::protocols::anthropic::AnthropicMessages;
    let pivot = match crate::protocols::anthropic::count_tokens_request(call.bytes) {
        Ok(p) => p,
        Err(e) => return passthrough::refuse(protocol, meter, e),
    };
    let n = crate::metering::estimate::prompt_tokens(
        Endpoint::ChatCompletions,
        &translate::pivot_body(&pivot),
    );
    meter.finish(200, Some(Usage::default()), KeptPayloads::default(), None);
    let mut resp = Response::new(Body::from(
        serde_json::json!({ "input_tokens": n.max(0) }).to_string(),
    ));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// The client's body, at most `limit` bytes, all of it within `timeout_secs` (408 past it: a
/// client dribbling its body would otherwise hold the connection and its buffer forever).
/// A body that has already arrived completes on the first poll, before the timer is registered.
async fn read_body(body: Body, limit: usize, timeout_secs: u64) -> Result<Bytes, ApiError> {
    let read = axum::body::to_bytes(body, limit);
    match tokio::time::timeout(Duration::from_secs(timeout_secs), read).await {
        Err(_) => Err(ApiError::RequestTimeout(timeout_secs)),
        Ok(Ok(b)) => Ok(b),
        Ok(Err(e)) => {
            let too_large = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
                || e.to_string().contains("length limit");
            if too_large {
                Err(ApiError::PayloadTooLarge)
            } else {
                Err(ApiError::bad_request(
                    "invalid_body",
                    "Could not read the request body.",
                ))
            }
        }
    }
}

/// Reads a complete upstream body with an idle timeout between chunks.
pub(crate) async fn collect(
    mut body: upstream::ResponseBody,
    idle: Duration,
    meter: &mut Meter,
) -> Result<Bytes, ApiError> {
    let mut buf = BytesMut::new();
    loop {
        match tokio::time::timeout(idle, body.frame()).await {
            Ok(Some(Ok(frame))) => {
                meter.mark_first_byte();
                if let Ok(data) = frame.into_data() {
                    if buf.len() + data.len() > MAX_UPSTREAM_BODY {
                        return Err(ApiError::Upstream {
                            status: StatusCode::BAD_GATEWAY,
                            message: "The upstream response is too large.".into(),
                            code: "upstream_error",
                        });
                    }
                    buf.extend_from_slice(&data);
                }
            }
            Ok(None) => return Ok(buf.freeze()),
            Ok(Some(Err(e))) => {
                tracing::warn!(error = %e, "upstream body failed");
                return Err(ApiError::Upstream {
                    status: StatusCode::BAD_GATEWAY,
                    message: "The upstream connection was lost.".into(),
                    code: "upstream_disconnected",
                });
            }
            Err(_) => {
                return Err(ApiError::Upstream {
                    status: StatusCode::GATEWAY_TIMEOUT,
                    message: "The upstream stopped sending data.".into(),
                    code: "upstream_timeout",
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future an async fn returns, without calling it (by its arity).
    fn size3<A, B, C, F: FnOnce(A, B, C) -> R, R>(_: F) -> usize {
        std::mem::size_of::<R>()
    }
    fn size4<A, B, C, D, F: FnOnce(A, B, C, D) -> R, R>(_: F) -> usize {
        std::mem::size_of::<R>()
    }
    fn size5<A, B, C, D, E, F: FnOnce(A, B, C, D, E) -> R, R>(_: F) -> usize {
        std::mem::size_of::<R>()
    }
    fn size6<A, B, C, D, E, G, F: FnOnce(A, B, C, D, E, G) -> R, R>(_: F) -> usize {
        std::mem::size_of::<R>()
    }

    /// hyper moves a request's future into place, and a stage's future is copied whole into its
    /// parent's state when it starts. With the pivot and a fallback's plan awaited inline in
    /// `attempt`, `run` was 15.8 KB (`attempt` 13.6 KB, `admitted` 15.3 KB) and a pass-through
    /// request copied tens of kilobytes through L1 (callgrind: memcpy from the connection's
    /// service closure 16k instructions a request, 0.7k before part two). The stages are boxed;
    /// each bound is about 1.5× its size today (a rare path inline again is ~10 KB).
    #[test]
    fn stage_futures_stay_small() {
        let sizes = [
            ("run", size4(run), 3 * 1024),
            ("admitted", size5(admitted), 3 * 1024),
            ("admit", size4(admit), 4 * 1024),
            ("attempt", size6(attempt), 6 * 1024),
            ("send", size3(send), 4 * 1024),
            ("relay", size6(relay), 6 * 1024),
        ];
        for (stage, size, bound) in sizes {
            eprintln!("{stage}: {size} bytes");
            assert!(
                size <= bound,
                "{stage}'s future is {size} bytes (bound {bound})"
            );
        }
    }
}
