//! ④–⑤ through the pivot: the client's protocol is not the provider's. The client's request,
//! already decoded into the pivot, is encoded for the provider by its [`Translator`]; the
//! answer comes back through the pivot into the client's protocol — a complete body at once, a
//! stream chunk by chunk as it arrives (never buffered whole). Usage is the provider's own
//! report; the meter estimates only when there is none.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use http_body::{Body as HttpBody, Frame, SizeHint};
use secrecy::ExposeSecret;

use crate::error::ApiError;
use crate::metering::event::KeptPayloads;
use crate::pivot::{ChatChunk, ChatRequest, UpstreamError};
use crate::protocols::{ChunkEncoder, ClientProtocol, EncodeCtx};
use crate::providers::{ChunkDecoder, Operation, StreamFault, Usage};
use crate::proxy::meter::Meter;
use crate::proxy::route::Route;
use crate::proxy::stream::{self, FLUSH_AT, Gather, IdleTimer};
use crate::proxy::upstream::{self, Outbound};
use crate::state::AppState;

/// Called once with the object the client got (a complete body, or what the stream's encoder
/// built) when the answer is complete: the Responses API stores it.
pub type OnDone = Box<dyn FnOnce(serde_json::Value, Option<Usage>) + Send>;

/// One translated exchange.
pub struct Exchange<'a> {
    pub protocol: &'a dyn ClientProtocol,
    pub pivot: ChatRequest,
    pub ctx: EncodeCtx,
    pub on_done: Option<OnDone>,
}

/// An error answer in the client protocol's shape.
pub fn error_response(protocol: &dyn ClientProtocol, err: &UpstreamError) -> Response {
    let status = StatusCode::from_u16(err.status).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut resp = Response::new(Body::from(protocol.error_body(err.status, err)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// A gateway error in the client protocol's shape, keeping the headers the gateway's own
/// renderer sets (`retry-after`, …).
pub fn api_error_response(protocol: &dyn ClientProtocol, err: ApiError) -> Response {
    if protocol.errors_are_openai() {
        return err.into_response();
    }
    let neutral = UpstreamError::from(&err);
    let mut resp = err.into_response();
    *resp.body_mut() = Body::from(protocol.error_body(neutral.status, &neutral));
    resp
}

fn fault_error(fault: StreamFault, max: usize) -> (UpstreamError, &'static str) {
    match fault {
        StreamFault::TooLarge => (
            UpstreamError {
                status: 502,
                kind: "api_error".into(),
                message: format!(
                    "The upstream sent an event larger than this gateway accepts ({max} bytes); the stream was ended."
                ),
                code: Some("upstream_event_too_large".into()),
            },
            "upstream_event_too_large",
        ),
        StreamFault::Upstream(e) => (e, "upstream_stream_error"),
        StreamFault::Malformed(what) => {
            tracing::warn!(%what, "upstream stream is not its protocol");
            (
                UpstreamError::malformed(
                    "The upstream's stream ended early or was not in its protocol.",
                ),
                "upstream_malformed",
            )
        }
    }
}

/// Sends the exchange along `route` (which has a translator) and answers in the client's
/// protocol. Every outcome finishes `meter` exactly once. One attempt: the attempt loop
/// (`proxy::attempt`) uses [`prepare`], [`send`] and [`answer`] to retry before any byte left.
pub async fn forward(
    state: &AppState,
    route: &Route,
    x: Exchange<'_>,
    meter: Meter,
    request_id: Option<&HeaderValue>,
    client_sent: &HeaderMap,
) -> Response {
    let prepared = match prepare(route, &x.pivot, client_sent) {
        Ok(p) => p,
        Err(e) => return refuse(x.protocol, meter, e),
    };
    match send(state, route, prepared, x.pivot.stream, request_id).await {
        Ok(resp) => answer(state, route, x, meter, resp).await,
        Err(e) => api_error_response(x.protocol, super::no_answer(state, meter, e)),
    }
}

/// The request to `route`'s provider: its URL, headers (auth included) and body.
pub struct Prepared {
    url: String,
    headers: HeaderMap,
    body: Vec<u8>,
}

/// Encodes `pivot` for `route`'s provider; an error is the client's (a request this provider
/// cannot take, or a route without a translator).
pub fn prepare(
    route: &Route,
    pivot: &ChatRequest,
    client_sent: &HeaderMap,
) -> Result<Prepared, ApiError> {
    let Some(translator) = route.translator else {
        return Err(ApiError::internal(anyhow::anyhow!(
            "route {} has no translator",
            route.kind
        )));
    };
    let t = route.target();
    let body = translator.encode_chat(pivot, &t)?;
    let url = translator.url(&t, Operation::Chat, pivot.stream)?;
    let mut headers = upstream::client_headers(client_sent, false);
    translator.headers(
        &mut headers,
        route.provider_key.expose_secret(),
        &t,
        &url,
        &body,
    )?;
    Ok(Prepared { url, headers, body })
}

/// A request [`prepare`] refused: the error in the client's shape, metered.
pub fn refuse(protocol: &dyn ClientProtocol, meter: Meter, e: ApiError) -> Response {
    let reason = if e.parts().0 == StatusCode::INTERNAL_SERVER_ERROR {
        "internal"
    } else {
        "untranslatable"
    };
    meter.finish(
        e.parts().0.as_u16(),
        None,
        KeptPayloads::default(),
        Some(reason),
    );
    api_error_response(protocol, e)
}

/// Sends a prepared request, up to the response head (a connect error or no head within
/// `upstream.first_byte_timeout_secs` is the error).
pub async fn send(
    state: &AppState,
    route: &Route,
    p: Prepared,
    stream: bool,
    request_id: Option<&HeaderValue>,
) -> Result<http::Response<upstream::ResponseBody>, ApiError> {
    let cfg = &state.config.upstream;
    upstream::send_to(
        &state.http,
        Outbound {
            url: &p.url,
            guarded: route.guarded,
            headers: p.headers,
            body: Bytes::from(p.body).into(),
            stream,
            request_id,
        },
        Duration::from_secs(cfg.first_byte_timeout_secs),
    )
    .await
}

/// An upstream error answer in the client protocol's shape: its status (as the protocol maps
/// it: Anthropic's 529 is 503 to an OpenAI client) and body, with the upstream's retry and
/// rate-limit headers.
pub fn shaped_error(
    route: &Route,
    protocol: &dyn ClientProtocol,
    status: StatusCode,
    upstream_headers: &HeaderMap,
    body: &[u8],
) -> (http::response::Parts, Bytes, UpstreamError) {
    let err = match route.translator {
        Some(t) => t.decode_error(status.as_u16(), body),
        None => UpstreamError::malformed("The upstream answered with an error."),
    };
    let (mut head, ()) = http::Response::new(()).into_parts();
    head.status = StatusCode::from_u16(err.status).unwrap_or(StatusCode::BAD_GATEWAY);
    head.headers = super::passthrough::passed_headers(upstream_headers);
    head.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let body = Bytes::from(protocol.error_body(err.status, &err));
    (head, body, err)
}

/// The answer to a sent exchange, in the client's protocol: a stream relayed event by event, a
/// complete body translated once, an error answer in the client's shape. Finishes `meter`.
pub async fn answer(
    state: &AppState,
    route: &Route,
    x: Exchange<'_>,
    mut meter: Meter,
    resp: http::Response<upstream::ResponseBody>,
) -> Response {
    let Some(translator) = route.translator else {
        return refuse(
            x.protocol,
            meter,
            ApiError::internal(anyhow::anyhow!("route {} has no translator", route.kind)),
        );
    };
    let t = route.target();
    let stream = x.pivot.stream;
    let cfg = &state.config.upstream;
    let status = resp.status();
    // The upstream's rate-limit and retry headers reach the client as on the pass-through (§8).
    let passed = super::passthrough::passed_headers(resp.headers());
    let idle = Duration::from_secs(cfg.idle_timeout_secs);

    if status.is_success() && stream {
        let max = cfg.max_sse_event_bytes;
        let mut encoder = x.protocol.stream_encoder(&x.ctx);
        let mut out = BytesMut::new();
        encoder.start(&mut out);
        let mut body = TranslatedStream {
            upstream: Box::pin(resp.into_body()),
            decoder: translator.chat_stream(&t, max),
            encoder,
            chunks: Vec::new(),
            out,
            kept: KeptPayloads::default(),
            meter: Some(meter),
            idle: IdleTimer::new(idle),
            received: 0,
            max_event_bytes: max,
            ended: false,
            on_done: x.on_done,
            active_streams: state.metrics.active_streams.clone(),
        };
        body.active_streams.inc();
        // The head waits (at most `STREAM_HEAD_WAIT`) for the upstream's first events, so the
        // opening events and the first answer leave together, and a short stream in one write.
        stream::prime(&mut body, super::STREAM_HEAD_WAIT).await;
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

    let body = match super::collect(resp.into_body(), idle, &mut meter).await {
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
            return api_error_response(x.protocol, e);
        }
    };
    if !status.is_success() {
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
        let err = translator.decode_error(status.as_u16(), &body);
        meter.finish(
            status.as_u16(),
            None,
            KeptPayloads::default(),
            Some("upstream_status"),
        );
        let mut out = error_response(x.protocol, &err);
        out.headers_mut().extend(passed);
        return out;
    }
    let answer = match translator.decode_chat(&body, &t) {
        Ok(a) => a,
        Err(e) => {
            state
                .metrics
                .upstream_errors_total
                .with_label_values(&["body"])
                .inc();
            // The upstream did work: metered from the usage it reports if it can be read,
            // else estimated from what came back.
            let usage = translator.usage_of_answer(&body);
            let kept = if usage.is_some() {
                KeptPayloads::default()
            } else {
                KeptPayloads::one(body)
            };
            meter.finish(
                e.parts().0.as_u16(),
                usage,
                kept,
                Some("upstream_malformed"),
            );
            return api_error_response(x.protocol, e);
        }
    };
    let usage = answer.usage.map(Usage::from);
    let out = x.protocol.encode_response(&answer, &x.ctx);
    let kept = if usage.is_none() {
        serde_json::to_vec(&answer)
            .map(|b| KeptPayloads::one(Bytes::from(b)))
            .unwrap_or_default()
    } else {
        KeptPayloads::default()
    };
    meter.finish(status.as_u16(), usage, kept, None);
    if let Some(done) = x.on_done
        && let Ok(v) = serde_json::from_slice(&out)
    {
        done(v, usage);
    }
    let mut resp = Response::new(Body::from(out));
    resp.headers_mut().extend(passed);
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// A translated stream: upstream bytes → the provider's decoder → pivot chunks → the client
/// protocol's encoder. Holds at most one upstream event (the decoder's bound) and what the
/// upstream had at hand, up to [`FLUSH_AT`] of encoded output: like the pass-through, what is
/// read together leaves in one frame (one write to the client), and the last frame carries the
/// closing chunk.
struct TranslatedStream<B> {
    upstream: Pin<Box<B>>,
    decoder: Box<dyn ChunkDecoder>,
    encoder: Box<dyn ChunkEncoder>,
    chunks: Vec<ChatChunk>,
    out: BytesMut,
    /// The pivot chunks, for the estimate when the upstream reports no usage.
    kept: KeptPayloads,
    meter: Option<Meter>,
    idle: IdleTimer,
    /// Data frames read from the upstream so far.
    received: u64,
    max_event_bytes: usize,
    ended: bool,
    on_done: Option<OnDone>,
    active_streams: prometheus::IntGauge,
}

impl<B> TranslatedStream<B> {
    fn encode_chunks(&mut self) {
        for c in self.chunks.drain(..) {
            self.encoder.chunk(&c, &mut self.out);
            if self.decoder.usage().is_none()
                && let Ok(json) = serde_json::to_vec(&c)
            {
                self.kept.push(Bytes::from(json));
            }
        }
    }

    fn end(&mut self, result: Result<(), StreamFault>) {
        self.encode_chunks();
        let usage = self.decoder.usage();
        let (status, error) = match result {
            Ok(()) => {
                self.encoder.finish(usage, &mut self.out);
                (200, None)
            }
            Err(fault) => {
                let (err, reason) = fault_error(fault, self.max_event_bytes);
                self.encoder.fail(&err, &mut self.out);
                (err.status, Some(reason))
            }
        };
        self.ended = true;
        if let Some(m) = self.meter.take() {
            let kept = if usage.is_some() {
                KeptPayloads::default()
            } else {
                std::mem::take(&mut self.kept)
            };
            m.finish(status, usage, kept, error);
        }
        if status == 200
            && let Some(done) = self.on_done.take()
            && let Some(obj) = self.encoder.final_object()
        {
            done(obj, usage);
        }
    }

    fn fail(&mut self, err: UpstreamError, reason: &'static str) {
        self.encode_chunks();
        self.encoder.fail(&err, &mut self.out);
        self.ended = true;
        if let Some(m) = self.meter.take() {
            let usage = self.decoder.usage();
            let kept = std::mem::take(&mut self.kept);
            m.finish(err.status, usage, kept, Some(reason));
        }
    }
}

impl<B> Gather for TranslatedStream<B>
where
    B: HttpBody<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    /// Reads, decodes and encodes what the upstream has: `Ready` once the stream ended (the
    /// meter finished, the closing events written) or [`FLUSH_AT`] bytes wait, `Pending` when
    /// the upstream has nothing more right now.
    fn gather(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            if self.ready_to_send() {
                return Poll::Ready(());
            }
            match self.upstream.as_mut().poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    if let Some(m) = self.meter.as_mut() {
                        m.mark_first_byte();
                    }
                    self.idle.touch();
                    self.received += 1;
                    match self.decoder.push(&data, &mut self.chunks) {
                        Ok(()) => self.encode_chunks(),
                        Err(fault) => self.end(Err(fault)),
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    tracing::warn!(error = %e, "upstream stream broke off");
                    self.fail(
                        UpstreamError {
                            status: 502,
                            kind: "api_error".into(),
                            message: "The upstream connection was lost mid-stream.".into(),
                            code: Some("upstream_disconnected".into()),
                        },
                        "upstream_disconnected",
                    );
                }
                Poll::Ready(None) => {
                    let mut chunks = std::mem::take(&mut self.chunks);
                    let result = self.decoder.finish(&mut chunks);
                    self.chunks = chunks;
                    self.end(result);
                }
                Poll::Pending => {
                    if self.idle.expired(cx) {
                        self.fail(
                            UpstreamError {
                                status: 504,
                                kind: "api_error".into(),
                                message: "The upstream stopped sending data.".into(),
                                code: Some("upstream_timeout".into()),
                            },
                            "upstream_idle_timeout",
                        );
                        continue;
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    /// The encoder's opening events (`message_start`, `response.created`) do not count: the
    /// head waits for the upstream's first frame.
    fn awaiting_first(&self) -> bool {
        self.received == 0 && !self.ended
    }

    fn ready_to_send(&self) -> bool {
        self.ended || self.out.len() >= FLUSH_AT
    }

    fn received(&self) -> u64 {
        self.received
    }

    fn take_out(&mut self) -> Option<Bytes> {
        (!self.out.is_empty()).then(|| self.out.split().freeze())
    }

    fn ended(&self) -> bool {
        self.ended
    }
}

impl<B> HttpBody for TranslatedStream<B>
where
    B: HttpBody<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    type Data = Bytes;
    type Error = std::convert::Infallible;

    /// Gathered as the pass-through's (the meter is finished by the last frame, so
    /// `is_end_stream` lets hyper write the closing chunk with the last data).
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.poll_gathered(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.ended && self.out.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

impl<B> Drop for TranslatedStream<B> {
    fn drop(&mut self) {
        self.active_streams.dec();
        // The client left before the end: what the upstream reported (or produced) is billed.
        if let Some(m) = self.meter.take() {
            let usage = self.decoder.usage();
            let kept = std::mem::take(&mut self.kept);
            m.finish(499, usage, kept, Some("client_disconnected"));
        }
    }
}

/// The pivot chat request the client's body decodes to, its model the client's name.
pub fn decode(
    protocol: &dyn ClientProtocol,
    body: &[u8],
    client_model: &str,
) -> Result<ChatRequest, ApiError> {
    let mut pivot = protocol.decode_request(body)?;
    client_model.clone_into(&mut pivot.model);
    Ok(pivot)
}

/// Encodes the pivot as the OpenAI chat JSON the meter keeps for an estimate.
pub fn pivot_body(pivot: &ChatRequest) -> Bytes {
    serde_json::to_vec(pivot)
        .map(Bytes::from)
        .unwrap_or_default()
}

/// An OpenAI embeddings request to a provider with its own embeddings API.
pub async fn embeddings(
    state: &AppState,
    route: &Route,
    body: &[u8],
    client_model: &str,
    mut meter: Meter,
    request_id: Option<&HeaderValue>,
    client_sent: &HeaderMap,
) -> Response {
    let openai = &crate::protocols::openai_chat::OpenAiChat;
    let Some(translator) = route.translator else {
        meter.finish(500, None, KeptPayloads::default(), Some("internal"));
        return ApiError::internal(anyhow::anyhow!("route {} has no translator", route.kind))
            .into_response();
    };
    let t = route.target();
    let mut base64 = false;
    let prepared = serde_json::from_slice::<serde_json::Value>(body)
        .map_err(|e| ApiError::bad_request("invalid_json", format!("The body is not JSON: {e}")))
        .and_then(|req| {
            base64 = crate::providers::embeddings::wants_base64(&req);
            translator.encode_embeddings(&req, &t).unwrap_or_else(|| {
                Err(ApiError::invalid_param(
                    "model",
                    format!(
                        "The model `{client_model}` is served by a `{}` provider, which has no embeddings API.",
                        route.kind
                    ),
                ))
            })
        })
        .and_then(|body| {
            let url = translator.url(&t, Operation::Embeddings, false)?;
            let mut headers = upstream::client_headers(client_sent, false);
            translator.headers(
                &mut headers,
                route.provider_key.expose_secret(),
                &t,
                &url,
                &body,
            )?;
            Ok((url, headers, body))
        });
    let (url, headers, body) = match prepared {
        Ok(p) => p,
        Err(e) => {
            meter.finish(
                e.parts().0.as_u16(),
                None,
                KeptPayloads::default(),
                Some("untranslatable"),
            );
            return e.into_response();
        }
    };
    let cfg = &state.config.upstream;
    let sent = upstream::send_to(
        &state.http,
        Outbound {
            url: &url,
            guarded: route.guarded,
            headers,
            body: Bytes::from(body).into(),
            stream: false,
            request_id,
        },
        Duration::from_secs(cfg.first_byte_timeout_secs),
    )
    .await;
    let resp = match sent {
        Ok(r) => r,
        Err(e) => {
            meter.finish(
                e.parts().0.as_u16(),
                None,
                KeptPayloads::default(),
                e.parts().2,
            );
            return e.into_response();
        }
    };
    let status = resp.status();
    let idle = Duration::from_secs(cfg.idle_timeout_secs);
    let body = match super::collect(resp.into_body(), idle, &mut meter).await {
        Ok(b) => b,
        Err(e) => {
            meter.finish(
                e.parts().0.as_u16(),
                None,
                KeptPayloads::default(),
                Some("upstream_body"),
            );
            return e.into_response();
        }
    };
    if !status.is_success() {
        let err = translator.decode_error(status.as_u16(), &body);
        meter.finish(
            status.as_u16(),
            None,
            KeptPayloads::default(),
            Some("upstream_status"),
        );
        return error_response(openai, &err);
    }
    match translator.decode_embeddings(&body, &t) {
        Ok((mut v, usage)) => {
            if let Some(o) = v.as_object_mut() {
                o.insert("model".into(), client_model.into());
            }
            // The upstream answered floats; the client asked for OpenAI's base64.
            if base64 {
                crate::providers::embeddings::to_base64(&mut v);
            }
            meter.finish(200, usage, KeptPayloads::default(), None);
            let mut resp = Response::new(Body::from(serde_json::to_vec(&v).unwrap_or_default()));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            resp
        }
        Err(e) => {
            meter.finish(
                e.parts().0.as_u16(),
                None,
                KeptPayloads::default(),
                Some("upstream_malformed"),
            );
            e.into_response()
        }
    }
}
