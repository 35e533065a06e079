//! The hot path, one file per stage, in the order a request meets them:
//! ① `auth` gateway key → key context (cache first) ② `admit` IP and model allow-lists, rate
//! limits, budget and balance ③ `route` catalog model → provider → provider key ④ `upstream` the
//! pooled client ⑤ `stream` the body passes through ⑥ `meter` one usage record per request.

pub mod admit;
pub mod auth;
pub mod meter;
pub mod passthrough;
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
use crate::state::AppState;

/// Largest complete (non-streamed) upstream body the gateway will hold.
const MAX_UPSTREAM_BODY: usize = 64 * 1024 * 1024;

/// How long a stream's response head waits for the first events, so both leave in one write.
const STREAM_HEAD_WAIT: Duration = Duration::from_millis(1);

/// How long admission waits for a usage-queue slot before answering 503.
const USAGE_SLOT_WAIT: Duration = Duration::from_secs(30);

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
    let resp = run.await;
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

async fn run(
    state: AppState,
    endpoint: Endpoint,
    ip: Option<IpAddr>,
    req: Request<Body>,
) -> Response {
    let (parts, body) = req.into_parts();
    let headers = &parts.headers;

    // ① auth
    let key = match auth::authenticate(&state, headers).await {
        Ok(k) => k,
        Err(e) => return e.into_response(),
    };
    let body = match decoded_body(headers, body, state.config.server.max_body_bytes) {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let bytes = match read_body(
        body,
        state.config.server.max_body_bytes,
        state.config.server.body_read_timeout_secs,
    )
    .await
    {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    admitted(state, endpoint, ip, key, headers, bytes, None).await
}

/// The hot path for a caller that is not a gateway key: the chat of a signed-in user
/// (`conversations::chat`), with a [`KeyCtx`] standing for the user (no key of its own:
/// `key_id` empty, no key limits) and a body it built. Every stage after ① runs as for `/v1`:
/// admission, the user's limits and balance, the user's provider keys, metering (the record
/// carries `conversation_id`).
pub async fn forward_as(
    state: AppState,
    endpoint: Endpoint,
    ip: Option<IpAddr>,
    key: std::sync::Arc<crate::cache::KeyCtx>,
    headers: &http::HeaderMap,
    bytes: Bytes,
    conversation_id: Option<String>,
) -> Response {
    let run = Box::pin(admitted(
        state,
        endpoint,
        ip,
        key,
        headers,
        bytes,
        conversation_id,
    ));
    run.await
}

/// Stages ② to ⑥ of a request whose caller is known and whose body was read.
async fn admitted(
    state: AppState,
    endpoint: Endpoint,
    ip: Option<IpAddr>,
    key: std::sync::Arc<crate::cache::KeyCtx>,
    headers: &http::HeaderMap,
    bytes: Bytes,
    conversation_id: Option<String>,
) -> Response {
    // Set by `edge` (or the router's layer) when the client sent none; forwarded upstream as is.
    let request_id_header = headers.get(crate::edge::X_REQUEST_ID).cloned();
    let request_id = request_id_header
        .as_ref()
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let view = match RequestView::parse(&bytes) {
        Ok(v) => v,
        Err(e) => return e.into_response(),
    };
    if view.stream && !endpoint.can_stream() {
        return ApiError::invalid_param(
            "stream",
            format!("/v1/{} does not stream.", endpoint.as_str()),
        )
        .into_response();
    }
    // `store: true` on a chat completion: tollgate keeps it (its metadata checked now).
    let mut to_store = if endpoint == Endpoint::ChatCompletions {
        match stored::requested(&state, &view, &key.user_id, &key.key_id) {
            Ok(t) => t,
            Err(e) => return e.into_response(),
        }
    } else {
        None
    };

    // ② admit
    let catalog = match state.caches.catalog(&state.db).await {
        Ok(c) => c,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let approx_tokens = (bytes.len() / 4).max(1).min(u32::MAX as usize) as u32;
    let (model, rate) = match admit::admit(
        &state,
        &key,
        ip,
        &view.model,
        catalog.get(&view.model),
        approx_tokens,
    )
    .await
    {
        Ok(x) => x,
        Err(refusal) => return with_rate(refusal.error.into_response(), &refusal.rate),
    };

    // ⑥ meter: the usage slot is taken before anything is reserved or sent upstream.
    let Some(permit) = state.usage.reserve(USAGE_SLOT_WAIT).await else {
        return with_rate(
            ApiError::Unavailable {
                message: "The gateway is overloaded (usage queue full); retry shortly.".into(),
            }
            .into_response(),
            &rate,
        );
    };

    // ③ route — its errors are reported after the budget and balance checks, in the contract's order.
    let route = route::route(&state, &key, &model, endpoint).await;

    // ② admit, continued: budget and balance.
    let charged =
        state.config.billing.enforce_balance || route.as_ref().is_ok_and(|r| r.shared_key);
    let max_cost = reserve::max_cost(&view, bytes.len(), &model, endpoint);
    let reservation = match reserve::reserve(&state, &key, charged && route.is_ok(), max_cost).await
    {
        Ok(r) => r,
        Err(e) => return with_rate(e.into_response(), &rate),
    };
    let route = match route {
        Ok(r) => r,
        Err(e) => {
            reserve::release(&state, &key, reservation);
            return with_rate(e.into_response(), &rate);
        }
    };
    let m = &model.model;
    let mut meter = Meter::new(
        permit,
        RequestFacts {
            user_id: key.user_id.clone(),
            key_id: key.key_id.clone(),
            model: view.model.clone(),
            provider: model.provider.key.clone(),
            endpoint,
            stream: view.stream,
            prices: Prices::from_model(m),
            request_id: request_id.clone(),
            shared_key: route.shared_key,
            reservation,
            charged,
            bounds: reserve::token_bounds(&view, bytes.len(), &model, endpoint),
            request_body: Bytes::new(),
            request_len: 0,
            response_id: None,
            conversation_id,
            extra_cost_nanos: 0,
            units_metered: false,
        },
        state.metrics.clone(),
    );
    meter.facts.keep_body(&bytes);
    {
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
    }

    // ④ upstream — from here the request is billed even if the process is killed.
    meter.spool(&state.spool);
    let adapter = match route.adapter {
        Some(a)
            if route.passes_through(endpoint)
                && matches!(
                    endpoint,
                    Endpoint::ChatCompletions | Endpoint::Completions | Endpoint::Embeddings
                ) =>
        {
            a
        }
        _ => {
            let call = Call {
                endpoint,
                view: &view,
                bytes: &bytes,
                request_id: request_id_header.as_ref(),
                headers,
            };
            let resp = translated(&state, &route, &call, meter, to_store).await;
            return with_rate(resp, &rate);
        }
    };
    let upstream_body =
        if endpoint == Endpoint::ChatCompletions && stored::has_private_fields(&view) {
            Bytes::from(view.rewrite_without(&m.upstream_model, &stored::NOT_FORWARDED))
        } else {
            adapter.map_request(&view, &m.upstream_model)
        };
    let cfg = &state.config.upstream;
    let resp = match upstream::send(
        &state.http,
        &route,
        upstream_body,
        view.stream,
        request_id_header.as_ref(),
        headers,
        Duration::from_secs(cfg.first_byte_timeout_secs),
    )
    .await
    {
        Ok(r) => r,
        Err(e) => {
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
            meter.finish(
                e.parts().0.as_u16(),
                None,
                KeptPayloads::default(),
                e.parts().2,
            );
            return with_rate(e.into_response(), &rate);
        }
    };
    let status = resp.status();
    let passed = passthrough::passed_headers(resp.headers());
    let idle = Duration::from_secs(cfg.idle_timeout_secs);
    let is_sse = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));

    // ⑤ stream
    if status.is_success() && view.stream && is_sse {
        let mut body = MeteredStream::new(
            resp.into_body(),
            StreamMapping {
                adapter: Some(adapter),
                reader: to_store.take().map(stored::ToStore::observer),
                client_model: view.model.clone(),
                upstream_model: m.upstream_model.clone(),
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
        return with_rate(out, &rate);
    }

    // A complete body: an upstream error, or a non-streamed success.
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
            return with_rate(e.into_response(), &rate);
        }
    };
    let out_body = if status.is_success() {
        let (mapped, usage) = adapter.map_response(body.clone(), &view.model, &m.upstream_model);
        let kept = if usage.is_none() {
            KeptPayloads::one(body)
        } else {
            KeptPayloads::default()
        };
        meter.finish(status.as_u16(), usage, kept, None);
        match to_store.take() {
            Some(t) => t.answer(mapped),
            None => mapped,
        }
    } else {
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
        body
    };
    let mut out = Response::new(Body::from(out_body));
    *out.status_mut() = status;
    out.headers_mut().extend(passed);
    out.headers_mut().insert(
        header::CONTENT_TYPE,
        content_type.unwrap_or_else(|| HeaderValue::from_static("application/json")),
    );
    with_rate(out, &rate)
}

/// What the client sent, as the stages after admission need it.
pub struct Call<'a> {
    pub endpoint: Endpoint,
    pub view: &'a RequestView<'a>,
    pub bytes: &'a Bytes,
    pub request_id: Option<&'a HeaderValue>,
    pub headers: &'a http::HeaderMap,
}

/// A request whose client protocol is not its provider's: through the pivot.
async fn translated(
    state: &AppState,
    route: &route::Route,
    call: &Call<'_>,
    mut meter: Meter,
    to_store: Option<stored::ToStore>,
) -> Response {
    let Call {
        endpoint,
        view,
        bytes,
        request_id,
        headers: client_sent,
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
    meter.facts.keep_body(&translate::pivot_body(&pivot));
    let ctx = crate::protocols::EncodeCtx {
        client_model: view.model.clone(),
        include_usage: pivot.include_usage(),
        created: chrono::Utc::now().timestamp(),
        id: to_store.as_ref().map(|t| t.id.clone()),
    };
    let on_done = to_store.map(|t| {
        Box::new(move |answer: serde_json::Value, _usage: Option<Usage>| t.save(answer))
            as translate::OnDone
    });
    translate::forward(
        state,
        route,
        translate::Exchange {
            protocol,
            pivot,
            ctx,
            on_done,
        },
        meter,
        request_id,
        client_sent,
    )
    .await
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
