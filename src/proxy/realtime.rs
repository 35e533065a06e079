//! `GET /v1/realtime` (spec §8): OpenAI's Realtime API, a WebSocket relayed both ways between the
//! client and the model's upstream, metered from each `response.done`.
//!
//! Before the upgrade, the request passes the same stages as a `/v1` POST: ① the gateway key
//! (`Authorization: Bearer`, or a browser's `openai-insecure-api-key.<key>` subprotocol entry),
//! ② admission with the model from `?model=` (a catalog model of type `realtime`), the usage
//! slot, budget and balance, ③ the plan, ④ the upstream WebSocket, opened before the client's is
//! accepted — so a refusal, or an upstream that answers the handshake with an error, reaches the
//! client as an ordinary HTTP error, and the client only ever sees a session that exists.
//!
//! Then frames pass through unchanged (text, binary, ping, pong, close with its code and reason),
//! each at most [`MAX_FRAME_BYTES`]. The upstream's events are read only as far as metering
//! needs: `response.created` starts a response, `response.done` ends it and writes one usage
//! record from its `usage` (bounded like every upstream-reported count). Each response holds a
//! reservation of [`response_cost`]; the next one is reserved when a response ends, and when the
//! balance or the key's budget cannot cover it, the client is told (an `error` event) and the
//! session closes with 1008 (policy violation). A session that ends with no `response.done`
//! still writes one record (status 101, no tokens). A client that closes mid-response: the
//! upstream is asked to cancel it and its `response.done` (with the usage of what was produced)
//! is awaited for [`CANCEL_WAIT`]; without one, the record is estimated from the text seen.

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::ws::{self, WebSocket, WebSocketUpgrade};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use secrecy::ExposeSecret;
use serde::Deserialize;
use tokio_tungstenite::tungstenite::{self as ts, client::IntoClientRequest};

use crate::cache::KeyCtx;
use crate::error::ApiError;
use crate::metering::event::{
    ESTIMATE_KEEP_BYTES, KeptPayloads, Prices, RequestSize, TokenBounds, bounds,
};
use crate::providers::{Endpoint, Usage};
use crate::proxy::meter::{Meter, RequestFacts};
use crate::proxy::reserve::{self, MaxCost};
use crate::proxy::{admit, route};
use crate::routing::Outcome;
use crate::state::AppState;

/// The largest frame (and message) either side may send; a larger one closes the socket (1009).
/// OpenAI's own limit on an input audio append is 15 MiB of base64.
pub const MAX_FRAME_BYTES: usize = 16 << 20;

/// The subprotocol echoed to a browser client (never the entry carrying its key).
const SUBPROTOCOL: &str = "realtime";

/// A browser cannot set headers on a WebSocket: it sends the key as this subprotocol entry.
const KEY_PROTOCOL: &str = "openai-insecure-api-key.";

/// How long a client's close waits for the cancelled response's `response.done`.
const CANCEL_WAIT: Duration = Duration::from_secs(5);

/// How long a session waits for a usage-queue slot for its next response.
const USAGE_SLOT_WAIT: Duration = Duration::from_secs(30);

type Upstream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The gateway key a browser put in its `Sec-WebSocket-Protocol` list, if any.
fn key_from_subprotocols(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .find_map(|p| p.strip_prefix(KEY_PROTOCOL))
        .filter(|k| !k.is_empty())
}

/// The client's headers with its gateway key where ① auth looks for it.
fn auth_headers(headers: &HeaderMap) -> Cow<'_, HeaderMap> {
    if crate::proxy::auth::presented_key(headers).is_some() {
        return Cow::Borrowed(headers);
    }
    let Some(key) = key_from_subprotocols(headers) else {
        return Cow::Borrowed(headers);
    };
    let mut h = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_str(&format!("Bearer {key}")) {
        h.insert(header::AUTHORIZATION, v);
    }
    Cow::Owned(h)
}

/// What one response may cost, reserved before it can start: the model's `max_output_tokens`
/// (else [`reserve::DEFAULT_MAX_OUTPUT_TOKENS`]) of output, and as many prompt tokens at the
/// dearest prompt price. A session's prompt is not known in advance (it grows with the
/// conversation, audio included), so this is a floor the balance must clear, not a bound: each
/// record is settled to its reported cost.
pub fn response_cost(model: &crate::cache::CatalogModel) -> MaxCost {
    let m = &model.model;
    let completion = m
        .max_output_tokens
        .filter(|n| *n > 0)
        .map_or(reserve::DEFAULT_MAX_OUTPUT_TOKENS, i64::from);
    let prices = Prices::from_model(m);
    let nanos = crate::metering::event::cost_nanos(
        Usage {
            prompt: completion,
            completion,
            ..Default::default()
        },
        Prices {
            input: prices.dearest_prompt(),
            ..prices
        },
    );
    MaxCost {
        nanos,
        prompt: completion,
        completion,
    }
}

/// The most tokens one response can be metered for: the context window (audio makes the
/// prompt's size unknowable from anything the gateway sees), and the model's output bound.
fn response_bounds(model: &crate::cache::CatalogModel) -> TokenBounds {
    bounds(RequestSize {
        body_len: 0,
        max_tokens: None,
        choices: 1,
        context_window: model.model.context_window,
        max_output_tokens: model.model.max_output_tokens,
        vision: true,
        embeddings: false,
    })
}

/// The token counts of a `response.done`'s `response.usage`: `input_tokens` (cached ones
/// included, as OpenAI reports them), `input_token_details.cached_tokens`, `output_tokens`.
fn usage_of(v: &serde_json::Value) -> Option<Usage> {
    let n = |p: &str| v.pointer(p).and_then(serde_json::Value::as_i64);
    let prompt = n("/input_tokens");
    let completion = n("/output_tokens");
    if prompt.is_none() && completion.is_none() {
        return None;
    }
    Some(Usage {
        prompt: prompt.unwrap_or(0),
        completion: completion.unwrap_or(0),
        cached: n("/input_token_details/cached_tokens").unwrap_or(0),
        ..Default::default()
    })
}

/// Opens a session: stages ① to ④, then the upgrade (see the module docs).
pub async fn open(
    state: AppState,
    ip: Option<IpAddr>,
    query: Option<&str>,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    // ① auth
    let key = match crate::proxy::auth::authenticate(&state, &auth_headers(&headers)).await {
        Ok(k) => k,
        Err(e) => return e.into_response(),
    };
    let Ok(upgrade) = upgrade else {
        return ApiError::bad_request(
            "websocket_required",
            "/v1/realtime is a WebSocket: send a GET with `Connection: Upgrade` and `Upgrade: websocket`.",
        )
        .into_response();
    };
    let pairs: Vec<(String, String)> = query
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .collect()
        })
        .unwrap_or_default();
    let Some(model_name) = pairs
        .iter()
        .find(|(k, _)| k == "model")
        .map(|(_, v)| v.clone())
        .filter(|m| !m.is_empty())
    else {
        return ApiError::invalid_param(
            "model",
            "/v1/realtime needs the model in the query: /v1/realtime?model=<model>.",
        )
        .into_response();
    };

    // ② admit
    let catalog = match state.caches.catalog(&state.db).await {
        Ok(c) => c,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let (model, rate) =
        match admit::admit(&state, &key, ip, &model_name, catalog.get(&model_name), 1).await {
            Ok(x) => x,
            Err(refusal) => {
                return super::with_rate(refusal.error.into_response(), &refusal.rate);
            }
        };
    let resp = match connect_session(&state, &key, &model, &model_name, &pairs, &headers).await {
        Ok(session) => {
            let tracker = state.background.clone();
            upgrade
                .protocols([SUBPROTOCOL])
                .max_message_size(MAX_FRAME_BYTES)
                .max_frame_size(MAX_FRAME_BYTES)
                .read_buffer_size(crate::conversations::socket::READ_BUFFER_BYTES)
                .on_upgrade(move |socket| {
                    // Tracked: shutdown waits for the session's last record.
                    tracker.track_future(session.relay(socket))
                })
        }
        Err(resp) => resp,
    };
    super::with_rate(resp, &rate)
}

/// ② admit, continued (usage slot, budget, balance), ③ plan, ④ the upstream's handshake: a
/// session ready to relay, or the response refusing it (metered once it went upstream).
async fn connect_session(
    state: &AppState,
    key: &Arc<KeyCtx>,
    model: &Arc<crate::cache::CatalogModel>,
    model_name: &str,
    pairs: &[(String, String)],
    headers: &HeaderMap,
) -> Result<Session, Response> {
    let Some(permit) = state.usage.reserve(super::USAGE_SLOT_WAIT).await else {
        return Err(ApiError::Unavailable {
            message: "The gateway is overloaded (usage queue full); retry shortly.".into(),
        }
        .into_response());
    };
    let plan = super::plan(state, key, model, Endpoint::Realtime).await;
    let charged =
        state.config.billing.enforce_balance || plan.as_ref().is_ok_and(|p| p.may_use_shared());
    let max_cost = response_cost(model);
    let reservation = reserve::reserve(state, key, charged && plan.is_ok(), max_cost)
        .await
        .map_err(IntoResponse::into_response)?;
    let mut plan = match plan {
        Ok(p) => p,
        Err(e) => {
            reserve::release(state, key, reservation);
            return Err(e.into_response());
        }
    };
    let defaults = state
        .caches
        .runtime_defaults(&state.db, &state.config)
        .await
        .unwrap_or_default();
    let user_tpm = admit::user_limits(key, &state.config, defaults).1;
    let mut meter = Meter::new(
        permit,
        RequestFacts {
            user_id: key.user_id.clone(),
            key_id: key.key_id.clone(),
            model: model_name.to_owned(),
            provider: model.provider.key.clone(),
            endpoint: Endpoint::Realtime,
            stream: true,
            prices: Prices::from_model(&model.model),
            request_id: headers
                .get(crate::edge::X_REQUEST_ID)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned(),
            shared_key: false,
            reservation,
            charged,
            bounds: response_bounds(model),
            request_body: Bytes::new(),
            request_len: 0,
            response_id: None,
            conversation_id: None,
            routed: Default::default(),
            extra_cost_nanos: 0,
            units_metered: false,
        },
        state.metrics.clone(),
    );
    count_tokens(&mut meter, state, key, user_tpm);

    // ③ the first usable deployment and key (a WebSocket is not retried: the session is the
    // client's, and a handshake that failed may have been refused for a reason a retry repeats).
    let Some(pick) = plan
        .next(&state.health, false)
        .or_else(|| plan.next(&state.health, true))
    else {
        let e = route::key_missing(model);
        return Err(super::finish_with(meter, e).into_response());
    };
    let route = match route::build(state, &plan, pick, Endpoint::Realtime) {
        Ok(r) => r,
        Err(e) => return Err(super::finish_with(meter, e).into_response()),
    };
    let provider = plan.deployments()[pick.deployment].provider.key.clone();
    super::answering(&mut meter, model, &plan, &route, &provider, 1);
    if route.adapter.is_none() {
        let e = ApiError::invalid_param(
            "model",
            format!(
                "/v1/realtime is served only by OpenAI-compatible (`openai`) providers; the model `{model_name}` is on a `{}` provider.",
                route.kind
            ),
        );
        meter.finish(400, None, KeptPayloads::default(), Some("untranslatable"));
        return Err(e.into_response());
    }

    // ④ upstream: from here the session is billed even if the process is killed.
    meter.spool(&state.spool);
    let began = Instant::now();
    let connected = connect_upstream(state, &route, pairs, headers).await;
    let outcome = match &connected {
        Ok(_) => Outcome::Ok,
        Err(Refused::Status(s, _)) if matches!(s.as_u16(), 401 | 403) => Outcome::Refused,
        Err(Refused::Status(s, _)) if s.as_u16() == 429 => Outcome::RateLimited(None),
        Err(Refused::Status(s, _)) if !s.is_server_error() => Outcome::Ok,
        Err(_) => Outcome::Failed,
    };
    if let Some(pair) = plan.pair_of(pick) {
        super::note(
            state,
            pair,
            plan.masked_of(pick),
            &route,
            outcome,
            began.elapsed(),
        );
    }
    let upstream = match connected {
        Ok(u) => u,
        Err(Refused::Status(status, body)) => {
            state
                .metrics
                .upstream_errors_total
                .with_label_values(&[if status.is_client_error() {
                    "status_4xx"
                } else {
                    "status_5xx"
                }])
                .inc();
            meter.finish(
                status.as_u16(),
                None,
                KeptPayloads::default(),
                Some("upstream_status"),
            );
            let mut out = Response::new(axum::body::Body::from(body));
            *out.status_mut() = status;
            out.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            return Err(out);
        }
        Err(Refused::NoAnswer(e)) => return Err(super::no_answer(state, meter, e).into_response()),
    };
    let template = meter.facts.clone();
    Ok(Session {
        state: state.clone(),
        key: key.clone(),
        user_tpm,
        upstream,
        meter: Some(meter),
        spooled: true,
        template,
        max_cost,
        open: 0,
        responses: 0,
        text: String::new(),
        text_bytes: 0,
    })
}

/// The response's completion tokens count against the key's and user's TPM limits.
fn count_tokens(meter: &mut Meter, state: &AppState, key: &Arc<KeyCtx>, user_tpm: u32) {
    let limiters = state.limiters.clone();
    let key = key.clone();
    meter.on_usage(move |u: Usage| {
        let n = u.completion.clamp(0, u32::MAX as i64) as u32;
        limiters.consume_tokens(&key, Some(user_tpm), n);
    });
}

/// Why the upstream's WebSocket did not open.
enum Refused {
    /// It answered the handshake with this status and body.
    Status(StatusCode, Bytes),
    /// No answer: connect error, TLS error, timeout (502/504).
    NoAnswer(ApiError),
}

fn unreachable_upstream() -> Refused {
    Refused::NoAnswer(ApiError::Upstream {
        status: StatusCode::BAD_GATEWAY,
        message: "Could not reach the upstream provider.".into(),
        code: "upstream_unreachable",
    })
}

/// The upstream URL: the provider's base URL with `http` → `ws` (`https` → `wss`), `/realtime`,
/// `?model=<upstream model>` and the rest of the client's query as it sent it.
pub fn upstream_url(
    base_url: &str,
    upstream_model: &str,
    pairs: &[(String, String)],
) -> Option<url::Url> {
    let mut url = url::Url::parse(base_url).ok()?;
    let scheme = match url.scheme() {
        "http" | "ws" => "ws",
        "https" | "wss" => "wss",
        _ => return None,
    };
    url.set_scheme(scheme).ok()?;
    let path = format!("{}/realtime", url.path().trim_end_matches('/'));
    url.set_path(&path);
    url.set_query(None);
    {
        let mut q = url.query_pairs_mut();
        q.append_pair("model", upstream_model);
        for (k, v) in pairs.iter().filter(|(k, _)| k != "model") {
            q.append_pair(k, v);
        }
    }
    Some(url)
}

/// The rustls client configuration of upstream WebSockets: ring and the webpki roots, as the
/// HTTP upstream client has.
fn tls() -> Result<Arc<rustls::ClientConfig>, ApiError> {
    static TLS: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    if let Some(c) = TLS.get() {
        return Ok(c.clone());
    }
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| ApiError::internal(anyhow::anyhow!("upstream WebSocket TLS: {e}")))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(TLS.get_or_init(|| Arc::new(config)).clone())
}

/// The addresses of the upstream's host. A user's own base URL (`route.guarded`) may reach only
/// public ones, judged after resolution as the HTTP client's guarded connector does (unless
/// `security.allow_private_base_urls`).
async fn addresses(
    host: &url::Host<&str>,
    port: u16,
    guarded: bool,
) -> Result<Vec<SocketAddr>, Refused> {
    let addrs: Vec<SocketAddr> = match host {
        url::Host::Ipv4(ip) => vec![SocketAddr::new(IpAddr::V4(*ip), port)],
        url::Host::Ipv6(ip) => vec![SocketAddr::new(IpAddr::V6(*ip), port)],
        url::Host::Domain(name) => match tokio::net::lookup_host((*name, port)).await {
            Ok(a) => a.collect(),
            Err(e) => {
                tracing::warn!(error = %e, host = %name, "upstream WebSocket: resolve failed");
                return Err(unreachable_upstream());
            }
        },
    };
    let addrs: Vec<SocketAddr> = addrs
        .into_iter()
        .filter(|a| !guarded || !crate::ssrf::is_forbidden(a.ip()))
        .collect();
    if addrs.is_empty() {
        tracing::warn!(host = %host, "upstream WebSocket: only private addresses; refused");
        return Err(unreachable_upstream());
    }
    Ok(addrs)
}

/// ④ the upstream's WebSocket: TCP (connect timeout), TLS for `wss`, the handshake with the
/// provider key (first-byte timeout).
async fn connect_upstream(
    state: &AppState,
    route: &route::Route,
    pairs: &[(String, String)],
    client_sent: &HeaderMap,
) -> Result<Upstream, Refused> {
    let cfg = &state.config.upstream;
    let Some(url) = upstream_url(&route.base_url, &route.upstream_model, pairs) else {
        tracing::warn!(base_url = %route.base_url, "upstream WebSocket: base URL unusable");
        return Err(unreachable_upstream());
    };
    let (Some(host), Some(port)) = (url.host(), url.port_or_known_default()) else {
        return Err(unreachable_upstream());
    };
    let guarded = route.guarded && !state.config.security.allow_private_base_urls;
    let connect = async {
        for addr in addresses(&host, port, guarded).await? {
            match tokio::net::TcpStream::connect(addr).await {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    return Ok(s);
                }
                Err(e) => tracing::warn!(error = %e, %addr, "upstream WebSocket: connect failed"),
            }
        }
        Err(unreachable_upstream())
    };
    let tcp =
        match tokio::time::timeout(Duration::from_secs(cfg.connect_timeout_secs), connect).await {
            Ok(r) => r?,
            Err(_) => return Err(timed_out()),
        };
    let mut req = match url.as_str().into_client_request() {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "upstream WebSocket: request");
            return Err(unreachable_upstream());
        }
    };
    // `openai-beta`, `user-agent`, … as the client sent them; never its gateway key.
    req.headers_mut()
        .extend(super::upstream::client_headers(client_sent, false));
    if let Some(v) = client_sent.get(crate::edge::X_REQUEST_ID) {
        req.headers_mut()
            .insert(crate::edge::X_REQUEST_ID, v.clone());
    }
    if let Some(adapter) = route.adapter {
        adapter.auth(req.headers_mut(), route.provider_key.expose_secret());
    }
    let tls = tls().map_err(Refused::NoAnswer)?;
    let config = ts::protocol::WebSocketConfig::default()
        .max_message_size(Some(MAX_FRAME_BYTES))
        .max_frame_size(Some(MAX_FRAME_BYTES))
        .read_buffer_size(crate::conversations::socket::READ_BUFFER_BYTES);
    let handshake = tokio_tungstenite::client_async_tls_with_config(
        req,
        tcp,
        Some(config),
        Some(tokio_tungstenite::Connector::Rustls(tls)),
    );
    match tokio::time::timeout(Duration::from_secs(cfg.first_byte_timeout_secs), handshake).await {
        Ok(Ok((ws, _))) => Ok(ws),
        Ok(Err(ts::Error::Http(resp))) => {
            let status = resp.status();
            let body = resp
                .into_body()
                .filter(|b| !b.is_empty())
                .map(Bytes::from)
                .unwrap_or_else(|| {
                    Bytes::from(
                        serde_json::json!({"error": {
                            "message": format!("The upstream provider refused the WebSocket with status {}.", status.as_u16()),
                            "type": "upstream_error", "param": null, "code": "upstream_status"}})
                        .to_string(),
                    )
                });
            Err(Refused::Status(status, body))
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, url = %url.origin().ascii_serialization(), "upstream WebSocket handshake failed");
            Err(unreachable_upstream())
        }
        Err(_) => Err(timed_out()),
    }
}

fn timed_out() -> Refused {
    Refused::NoAnswer(ApiError::Upstream {
        status: StatusCode::GATEWAY_TIMEOUT,
        message: "The upstream provider did not answer in time.".into(),
        code: "upstream_timeout",
    })
}

/// An upstream event's `type`, read without the rest.
#[derive(Deserialize)]
struct Kind<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
}

/// A text or transcript delta's `delta`.
#[derive(Deserialize)]
struct Delta {
    delta: String,
}

/// How the relay ends.
struct Close {
    code: u16,
    reason: &'static str,
    /// An OpenAI `error` event sent before the close frame: the full reason.
    event: Option<String>,
}

/// An open session: the upstream's socket and the meter of the response under way (or of the
/// next one).
struct Session {
    state: AppState,
    key: Arc<KeyCtx>,
    user_tpm: u32,
    upstream: Upstream,
    meter: Option<Meter>,
    /// `meter`'s started record is in the usage spool (it must finish, not be discarded).
    spooled: bool,
    /// The facts every response's meter starts from.
    template: RequestFacts,
    max_cost: MaxCost,
    /// Responses created and not yet done.
    open: u32,
    /// Responses done (each metered).
    responses: u32,
    /// Text and transcript deltas of the response under way, for an estimate if it never ends.
    text: String,
    text_bytes: usize,
}

fn to_upstream(m: ws::Message) -> ts::Message {
    match m {
        ws::Message::Text(t) => ts::Message::Text(
            ts::Utf8Bytes::try_from(Bytes::from(t)).unwrap_or_else(|_| ts::Utf8Bytes::from("")),
        ),
        ws::Message::Binary(b) => ts::Message::Binary(b),
        ws::Message::Ping(b) => ts::Message::Ping(b),
        ws::Message::Pong(b) => ts::Message::Pong(b),
        ws::Message::Close(f) => ts::Message::Close(f.map(|f| {
            ts::protocol::CloseFrame {
                code: f.code.into(),
                reason: ts::Utf8Bytes::try_from(Bytes::from(f.reason))
                    .unwrap_or_else(|_| ts::Utf8Bytes::from("")),
            }
        })),
    }
}

fn to_client(m: ts::Message) -> Option<ws::Message> {
    Some(match m {
        ts::Message::Text(t) => ws::Message::Text(
            ws::Utf8Bytes::try_from(Bytes::from(t)).unwrap_or_else(|_| ws::Utf8Bytes::from("")),
        ),
        ts::Message::Binary(b) => ws::Message::Binary(b),
        ts::Message::Ping(b) => ws::Message::Ping(b),
        ts::Message::Pong(b) => ws::Message::Pong(b),
        ts::Message::Close(f) => ws::Message::Close(f.map(|f| {
            ws::CloseFrame {
                code: f.code.into(),
                reason: ws::Utf8Bytes::try_from(Bytes::from(f.reason))
                    .unwrap_or_else(|_| ws::Utf8Bytes::from("")),
            }
        })),
        ts::Message::Frame(_) => return None,
    })
}

/// A Realtime API `error` event for an `insufficient_quota` refusal.
fn error_event(message: &str) -> String {
    serde_json::json!({
        "type": "error",
        "event_id": format!("event_tollgate_{}", uuid::Uuid::now_v7().simple()),
        "error": {"type": "insufficient_quota", "code": "insufficient_quota", "message": message, "param": null},
    })
    .to_string()
}

fn close_frame(code: u16, reason: &str) -> ws::Message {
    ws::Message::Close(Some(ws::CloseFrame {
        code,
        reason: reason.into(),
    }))
}

impl Session {
    /// Relays until either side closes (see the module docs); every response metered.
    async fn relay(mut self, mut client: WebSocket) {
        let mut shutting_down = self.state.caches.hub().shutting_down();
        let mut stopping = *shutting_down.borrow();
        loop {
            if stopping && self.open == 0 {
                let _ = client.send(close_frame(1001, "server shutting down")).await;
                let _ = self
                    .upstream
                    .close(Some(ts::protocol::CloseFrame {
                        code: 1001.into(),
                        reason: "going away".into(),
                    }))
                    .await;
                break;
            }
            tokio::select! {
                m = client.recv() => match m {
                    Some(Ok(ws::Message::Close(f))) => {
                        self.client_left(to_upstream(ws::Message::Close(f))).await;
                        break;
                    }
                    Some(Ok(m)) => {
                        if self.upstream.send(to_upstream(m)).await.is_err() {
                            let _ = client.send(close_frame(1011, "upstream connection lost")).await;
                            self.upstream_lost();
                            break;
                        }
                    }
                    // Gone without a close frame (or a frame past the limit).
                    Some(Err(_)) | None => {
                        self.client_left(ts::Message::Close(Some(ts::protocol::CloseFrame {
                            code: 1001.into(),
                            reason: "client went away".into(),
                        })))
                        .await;
                        break;
                    }
                },
                m = self.upstream.next() => match m {
                    Some(Ok(ts::Message::Close(f))) => {
                        if let Some(m) = to_client(ts::Message::Close(f)) {
                            let _ = client.send(m).await;
                        }
                        self.upstream_lost();
                        break;
                    }
                    Some(Ok(m)) => {
                        let done = match &m {
                            ts::Message::Text(t) => self.observe(t.as_str()),
                            _ => false,
                        };
                        if let Some(m) = to_client(m)
                            && client.send(m).await.is_err()
                        {
                            self.client_left(ts::Message::Close(Some(ts::protocol::CloseFrame {
                                code: 1001.into(),
                                reason: "client went away".into(),
                            })))
                            .await;
                            break;
                        }
                        if done && let Err(close) = self.next_response().await {
                            if let Some(e) = close.event {
                                let _ = client.send(ws::Message::Text(e.into())).await;
                            }
                            let _ = client.send(close_frame(close.code, close.reason)).await;
                            let _ = self.upstream.close(None).await;
                            break;
                        }
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "upstream WebSocket failed");
                        let code = if matches!(e, ts::Error::Capacity(_)) { 1009 } else { 1011 };
                        let _ = client.send(close_frame(code, "upstream connection lost")).await;
                        self.upstream_lost();
                        break;
                    }
                    None => {
                        let _ = client.send(close_frame(1011, "upstream connection lost")).await;
                        self.upstream_lost();
                        break;
                    }
                },
                changed = shutting_down.changed(), if !stopping => {
                    stopping = changed.is_err() || *shutting_down.borrow();
                }
            }
        }
        self.end();
    }

    /// Reads an upstream event as far as metering needs; true when a response just ended (its
    /// record sent).
    fn observe(&mut self, text: &str) -> bool {
        let Ok(Kind { kind }) = serde_json::from_str::<Kind<'_>>(text) else {
            return false;
        };
        match kind.as_ref() {
            "response.created" => {
                self.open = self.open.saturating_add(1);
                if let Some(m) = self.meter.as_mut() {
                    if !self.spooled {
                        m.spool(&self.state.spool);
                        self.spooled = true;
                    }
                    if self.open == 1 {
                        // The record's time and latency are the response's, not the wait before.
                        m.started = Instant::now();
                        m.at = chrono::Utc::now();
                    }
                }
                false
            }
            "response.text.delta"
            | "response.output_text.delta"
            | "response.audio_transcript.delta"
            | "response.output_audio_transcript.delta" => {
                if let Some(m) = self.meter.as_mut() {
                    m.mark_first_byte();
                }
                if let Ok(d) = serde_json::from_str::<Delta>(text)
                    && self.text_bytes.saturating_add(d.delta.len()) <= ESTIMATE_KEEP_BYTES
                {
                    self.text_bytes += d.delta.len();
                    self.text.push_str(&d.delta);
                }
                false
            }
            "response.audio.delta" | "response.output_audio.delta" => {
                if let Some(m) = self.meter.as_mut() {
                    m.mark_first_byte();
                }
                false
            }
            "response.done" => {
                let done: serde_json::Value = serde_json::from_str(text).unwrap_or_default();
                let usage = done.pointer("/response/usage").and_then(usage_of);
                let failed =
                    done.pointer("/response/status").and_then(|s| s.as_str()) == Some("failed");
                self.open = self.open.saturating_sub(1);
                self.responses = self.responses.saturating_add(1);
                let Some(mut m) = self.meter.take() else {
                    return true;
                };
                if !self.spooled {
                    // A `response.done` without its `response.created`: billed all the same.
                    m.spool(&self.state.spool);
                }
                if let Some(id) = done.pointer("/response/id").and_then(|v| v.as_str()) {
                    m.facts.response_id = Some(id.chars().take(128).collect());
                }
                let kept = if usage.is_none() {
                    self.kept_text()
                } else {
                    KeptPayloads::default()
                };
                self.text.clear();
                self.text_bytes = 0;
                m.finish(200, usage, kept, failed.then_some("response_failed"));
                true
            }
            _ => false,
        }
    }

    /// The deltas seen, as a chat chunk the estimator reads.
    fn kept_text(&self) -> KeptPayloads {
        if self.text.is_empty() {
            return KeptPayloads::default();
        }
        KeptPayloads::one(Bytes::from(
            serde_json::json!({"choices": [{"delta": {"content": self.text}}]}).to_string(),
        ))
    }

    /// After a response ended: the next one's usage slot and reservation, or why the session
    /// must close (1008 when the balance or the key's budget cannot cover another response).
    async fn next_response(&mut self) -> Result<(), Close> {
        if self.meter.is_some() {
            return Ok(());
        }
        let state = &self.state;
        let Some(permit) = state.usage.reserve(USAGE_SLOT_WAIT).await else {
            return Err(Close {
                code: 1013,
                reason: "the gateway is overloaded (usage queue full); reconnect shortly",
                event: None,
            });
        };
        let charged = self.template.charged;
        let reservation = match reserve::reserve(state, &self.key, charged, self.max_cost).await {
            Ok(r) => r,
            Err(e) => {
                let quota = matches!(e, ApiError::InsufficientQuota { .. });
                if !quota {
                    tracing::error!(error = %e, "realtime: reserving the next response failed");
                }
                return Err(if quota {
                    Close {
                        code: 1008,
                        reason: "insufficient_quota: the balance or the key's budget cannot cover another response",
                        event: Some(error_event(&e.to_string())),
                    }
                } else {
                    Close {
                        code: 1011,
                        reason: "internal error",
                        event: None,
                    }
                });
            }
        };
        let mut facts = self.template.clone();
        facts.reservation = reservation;
        let mut m = Meter::new(permit, facts, state.metrics.clone());
        count_tokens(&mut m, state, &self.key, self.user_tpm);
        self.meter = Some(m);
        self.spooled = false;
        Ok(())
    }

    /// The client closed (or went away): a response under way is cancelled and its usage
    /// awaited for a while, then the upstream is closed with the client's code and reason.
    async fn client_left(&mut self, close: ts::Message) {
        if self.open > 0 {
            let cancel = ts::Message::Text(r#"{"type":"response.cancel"}"#.into());
            if self.upstream.send(cancel).await.is_ok() {
                let wait = async {
                    while let Some(Ok(m)) = self.upstream.next().await {
                        if let ts::Message::Text(t) = &m
                            && self.observe(t.as_str())
                            && self.open == 0
                        {
                            return;
                        }
                        if matches!(m, ts::Message::Close(_)) {
                            return;
                        }
                    }
                };
                let _ = tokio::time::timeout(CANCEL_WAIT, wait).await;
            }
        }
        let _ = self.upstream.send(close).await;
        let _ = self.upstream.flush().await;
        if self.open > 0 {
            self.finish_open(499, "client_disconnected");
        }
    }

    /// The upstream closed or failed: a response under way is metered from what was seen.
    fn upstream_lost(&mut self) {
        if self.open > 0 {
            self.finish_open(502, "upstream_closed");
        }
    }

    /// Meters the response under way, which never reported its usage: estimated from its text.
    fn finish_open(&mut self, status: u16, error: &str) {
        self.open = 0;
        if let Some(m) = self.meter.take() {
            let kept = self.kept_text();
            self.responses = self.responses.saturating_add(1);
            m.finish(status, None, kept, Some(error));
        }
    }

    /// The session is over: one record for a session that had no response (status 101); the
    /// next response's reservation, made ready and never used, goes back.
    fn end(mut self) {
        let Some(m) = self.meter.take() else {
            return;
        };
        if self.responses == 0 || self.spooled {
            m.finish(101, Some(Usage::default()), KeptPayloads::default(), None);
        } else {
            let r = m.discard();
            reserve::release(&self.state, &self.key, r);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_url_maps_scheme_path_and_query() {
        let pairs = vec![
            ("model".to_owned(), "client-name".to_owned()),
            ("intent".to_owned(), "transcription".to_owned()),
        ];
        let u = upstream_url("https://api.openai.com/v1", "gpt-realtime", &pairs).expect("url");
        assert_eq!(
            u.as_str(),
            "wss://api.openai.com/v1/realtime?model=gpt-realtime&intent=transcription"
        );
        let u = upstream_url("http://127.0.0.1:8080/v1/", "m a", &[]).expect("url");
        assert_eq!(u.as_str(), "ws://127.0.0.1:8080/v1/realtime?model=m+a");
        assert!(upstream_url("ftp://x/v1", "m", &[]).is_none());
    }

    #[test]
    fn key_is_read_from_the_subprotocol_list() {
        let mut h = HeaderMap::new();
        h.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(
                "realtime, openai-insecure-api-key.sk-tg-abc, openai-beta.realtime-v1",
            ),
        );
        assert_eq!(key_from_subprotocols(&h), Some("sk-tg-abc"));
        let a = auth_headers(&h);
        assert_eq!(
            a.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()),
            Some("Bearer sk-tg-abc")
        );
        // A header key wins; nothing else of the subprotocols is taken.
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer sk-tg-header"),
        );
        assert_eq!(
            auth_headers(&h)
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok()),
            Some("Bearer sk-tg-header")
        );
        let mut none = HeaderMap::new();
        none.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("realtime"),
        );
        assert_eq!(key_from_subprotocols(&none), None);
    }

    #[test]
    fn usage_is_read_from_response_done() {
        let v = serde_json::json!({
            "total_tokens": 300, "input_tokens": 200, "output_tokens": 100,
            "input_token_details": {"cached_tokens": 50, "text_tokens": 120, "audio_tokens": 80},
            "output_token_details": {"text_tokens": 40, "audio_tokens": 60}
        });
        assert_eq!(
            usage_of(&v),
            Some(Usage {
                prompt: 200,
                completion: 100,
                cached: 50,
                ..Default::default()
            })
        );
        assert_eq!(usage_of(&serde_json::json!({})), None);
    }
}
