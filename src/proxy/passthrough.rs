//! ④–⑤ for a client that speaks its provider's own protocol other than OpenAI chat: Anthropic's
//! Messages API to an `anthropic` provider, the Responses API to a Responses-capable one. The body
//! goes up with only its model replaced (and, for Responses, its history filled in); the answer
//! and the stream come back untouched, read only for their usage. Errors the upstream answers
//! are already in the client's shape and pass through too.

use std::time::Duration;

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, header};
use secrecy::ExposeSecret;

use crate::error::ApiError;
use crate::metering::event::KeptPayloads;
use crate::protocols::ClientProtocol;
use crate::providers::Usage;
use crate::proxy::meter::Meter;
use crate::proxy::route::Route;
use crate::proxy::stream::{MeteredStream, StreamLimits, StreamMapping, UsageReader};
use crate::proxy::translate::api_error_response;
use crate::proxy::upstream::{self, Outbound};
use crate::state::AppState;

/// Called with a complete success body (non-stream) once it is metered; what it returns is what
/// the client gets (the Responses API puts its own id in, and stores the response).
pub type OnBody = Box<dyn FnOnce(Bytes, Option<Usage>) -> Bytes + Send>;

/// One pass-through request.
pub struct Foreign {
    pub url: String,
    /// Auth and protocol headers.
    pub headers: HeaderMap,
    pub body: Bytes,
    pub stream: bool,
    /// Reads a stream's usage.
    pub reader: Box<dyn UsageReader>,
    /// Reads a complete body's usage.
    pub usage_of_body: fn(&[u8]) -> Option<Usage>,
    /// Renders the gateway's own errors.
    pub protocol: &'static dyn ClientProtocol,
    pub on_body: Option<OnBody>,
}

/// One attempt: sends `f` and answers (the attempt loop uses [`send`] and [`answer`] to retry
/// Anthropic's Messages before any byte left).
pub async fn forward(
    state: &AppState,
    route: &Route,
    mut f: Foreign,
    client_model: &str,
    meter: Meter,
    request_id: Option<&HeaderValue>,
) -> Response {
    match send(state, route, &mut f, request_id).await {
        Ok(resp) => answer(state, route, f, client_model, meter, resp).await,
        Err(e) => api_error_response(f.protocol, super::no_answer(state, meter, e)),
    }
}

/// Sends `f`'s request (its headers and body taken), up to the response head.
pub async fn send(
    state: &AppState,
    route: &Route,
    f: &mut Foreign,
    request_id: Option<&HeaderValue>,
) -> Result<http::Response<upstream::ResponseBody>, ApiError> {
    upstream::send_to(
        &state.http,
        Outbound {
            url: &f.url,
            guarded: route.guarded,
            headers: std::mem::take(&mut f.headers),
            body: std::mem::take(&mut f.body).into(),
            stream: f.stream,
            request_id,
        },
        Duration::from_secs(state.config.upstream.first_byte_timeout_secs),
    )
    .await
}

/// The answer to a sent request, as the upstream gave it (model renamed, usage read); finishes
/// `meter`.
pub async fn answer(
    state: &AppState,
    route: &Route,
    f: Foreign,
    client_model: &str,
    mut meter: Meter,
    resp: http::Response<upstream::ResponseBody>,
) -> Response {
    let cfg = &state.config.upstream;
    let status = resp.status();
    let idle = Duration::from_secs(cfg.idle_timeout_secs);
    let is_sse = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let passed = passed_headers(resp.headers());

    if status.is_success() && f.stream && is_sse {
        let body = MeteredStream::new(
            resp.into_body(),
            StreamMapping {
                adapter: None,
                reader: Some(f.reader),
                client_model: client_model.to_owned(),
                upstream_model: route.upstream_model.clone(),
                client_wants_usage: true,
            },
            meter,
            StreamLimits {
                idle_timeout: idle,
                max_event_bytes: cfg.max_sse_event_bytes,
            },
            state.metrics.active_streams.clone(),
        );
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

    let content_type = resp.headers().get(header::CONTENT_TYPE).cloned();
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
            return api_error_response(f.protocol, e);
        }
    };
    let mut body = body;
    if status.is_success() {
        let usage = (f.usage_of_body)(&body);
        let kept = if usage.is_none() {
            KeptPayloads::one(body.clone())
        } else {
            KeptPayloads::default()
        };
        meter.finish(status.as_u16(), usage, kept, None);
        if let Some(on_body) = f.on_body {
            body = on_body(body, usage);
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
    }
    let mut out = Response::new(Body::from(body));
    *out.status_mut() = status;
    let h = out.headers_mut();
    h.extend(passed);
    h.insert(
        header::CONTENT_TYPE,
        content_type.unwrap_or_else(|| HeaderValue::from_static("application/json")),
    );
    out
}

/// Upstream response headers a client reads (rate limits, retry hints, request ids): passed
/// back on successes and errors (spec §8). The gateway's own `x-ratelimit-*` replace the
/// upstream's when the key or user has a limit (`proxy::with_rate`).
pub fn passed_headers(from: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    for (name, value) in from {
        let n = name.as_str();
        if n == "retry-after"
            || n == "retry-after-ms"
            || n == "request-id"
            || n == "x-should-retry"
            || n == "openai-processing-ms"
            || n.starts_with("anthropic-ratelimit-")
            || n.starts_with("x-ratelimit-")
        {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

/// A Responses or Messages request the gateway cannot send anywhere: the error in the client's
/// shape, metered.
pub fn refuse(protocol: &'static dyn ClientProtocol, meter: Meter, e: ApiError) -> Response {
    meter.finish(
        e.parts().0.as_u16(),
        None,
        KeptPayloads::default(),
        Some("invalid_request"),
    );
    api_error_response(protocol, e)
}

impl UsageReader for crate::providers::anthropic::PassthroughUsage {
    fn on_event(&mut self, data: &[u8]) {
        crate::providers::anthropic::PassthroughUsage::on_event(self, data);
    }

    fn usage(&self) -> Option<Usage> {
        crate::providers::anthropic::PassthroughUsage::usage(self)
    }

    fn rewrite(&mut self, data: &[u8]) -> Option<Vec<u8>> {
        crate::providers::anthropic::PassthroughUsage::rewrite(self, data)
    }

    fn cut_short(&self) -> bool {
        !self.finished()
    }

    /// Anthropic's `event: error`, which its SDKs raise as an error.
    fn error_event(&self, err: &crate::pivot::UpstreamError, out: &mut bytes::BytesMut) -> bool {
        let body = crate::protocols::anthropic::AnthropicMessages.error_body(err.status, err);
        out.extend_from_slice(b"event: error\ndata: ");
        out.extend_from_slice(&body);
        out.extend_from_slice(b"\n\n");
        true
    }
}

/// An Anthropic client to an `anthropic` provider: `/v1/messages` (and `count_tokens`) with
/// only the model replaced; `anthropic-version` and `anthropic-beta` as the client sent them.
pub async fn anthropic(
    state: &AppState,
    route: &Route,
    call: &super::Call<'_>,
    meter: Meter,
) -> Response {
    match anthropic_request(route, call) {
        Ok(f) => forward(state, route, f, &call.view.model, meter, call.request_id).await,
        Err(e) => refuse(&crate::protocols::anthropic::AnthropicMessages, meter, e),
    }
}

/// The request [`anthropic`] sends: the client's body with the upstream's model, the provider's
/// auth and Anthropic's version headers, the client's `anthropic-*` headers.
pub fn anthropic_request(route: &Route, call: &super::Call<'_>) -> Result<Foreign, ApiError> {
    use crate::providers::{Operation, anthropic};
    let protocol: &'static dyn ClientProtocol = &crate::protocols::anthropic::AnthropicMessages;
    let Some(translator) = route.translator else {
        return Err(ApiError::internal(anyhow::anyhow!(
            "anthropic route without a translator"
        )));
    };
    let t = route.target();
    let count = call.endpoint == crate::providers::Endpoint::CountTokens;
    let op = if count {
        Operation::CountTokens
    } else {
        Operation::Chat
    };
    let body = call.view.with_model(&route.upstream_model);
    let url = translator.url(&t, op, call.view.stream)?;
    let mut headers = HeaderMap::new();
    translator.headers(
        &mut headers,
        route.provider_key.expose_secret(),
        &t,
        &url,
        &body,
    )?;
    headers.extend(upstream::client_headers(call.headers, true));
    let usage_of_body: fn(&[u8]) -> Option<Usage> = if count {
        // Counting is free upstream: a record with no tokens, never an estimate.
        |_| Some(Usage::default())
    } else {
        anthropic::usage_of_message
    };
    Ok(Foreign {
        url,
        headers,
        body: Bytes::from(body),
        stream: call.view.stream && !count,
        reader: Box::new(anthropic::PassthroughUsage::renaming(&call.view.model)),
        usage_of_body,
        protocol,
        // The client is told the model it asked for, not the upstream's name.
        on_body: (!count).then(|| -> OnBody {
            let model = crate::providers::model_json(&call.view.model);
            Box::new(move |body: Bytes, _| {
                anthropic::with_model(&body, &model).map_or(body, Bytes::from)
            })
        }),
    })
}
