//! ④ upstream: per-worker connection pools (rustls for https, plain http for local upstreams;
//! HTTP/1.1 and HTTP/2 by ALPN), with connect and first-byte timeouts.
//!
//! Each server worker has its own pools (`crate::server::worker`), so a request, its upstream
//! connection and that connection's task stay on one thread.
//!
//! Upstreams are asked for `accept-encoding: identity`, so what the gateway meters and relays is
//! the plain body. One that compresses all the same (gzip, deflate, br, zstd) is decoded on the
//! way in by tower-http's decompression body, and the client gets the plain bytes without the
//! `content-encoding` header; an encoding none of those is refused as 502 `upstream_bad_encoding`
//! rather than relayed unreadable.
//!
//! Two pools: admins' provider base URLs are trusted (a local Ollama on 127.0.0.1 is fine), while
//! a user's own `base_url` goes through a connector that refuses private, loopback and link-local
//! addresses at connect time too — the check at save time alone would let DNS rebinding through,
//! and a URL saved while `security.allow_private_base_urls` was on would keep its reach after the
//! switch went off. Names are checked by [`GuardedResolver`], IP literals (which never reach a
//! resolver) by [`GuardedConnector`], before any packet leaves.

mod pool;

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, header};
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::connect::dns::{GaiResolver, Name};
use secrecy::ExposeSecret;

use crate::config::UpstreamConfig;
use crate::error::ApiError;
use crate::proxy::route::Route;

pub use pool::UpstreamBody;
use pool::{Limits, Pool, SendError};

/// An upstream response body, decoded when the upstream compressed it.
pub type ResponseBody = tower_http::decompression::DecompressionBody<UpstreamBody>;

/// A request body that arrives while it is sent.
pub type StreamedBody =
    http_body_util::combinators::UnsyncBoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// A request body sent upstream: whole (every JSON request), or streamed on as the client sends
/// it (a multipart upload, `proxy::multipart`).
pub enum RequestBody {
    Whole(Full<Bytes>),
    Streamed(StreamedBody),
}

impl From<Bytes> for RequestBody {
    fn from(b: Bytes) -> Self {
        Self::Whole(Full::new(b))
    }
}

impl http_body::Body for RequestBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            Self::Whole(b) => Pin::new(b).poll_frame(cx).map_err(|e| match e {}),
            Self::Streamed(b) => Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Whole(b) => b.is_end_stream(),
            Self::Streamed(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            Self::Whole(b) => b.size_hint(),
            Self::Streamed(b) => b.size_hint(),
        }
    }
}

type Pooled<C> = Pool<HttpsConnector<C>>;

/// The upstream clients, one pair per server worker.
#[derive(Clone)]
pub struct HttpClient {
    workers: std::sync::Arc<[Pools]>,
}

struct Pools {
    trusted: Pooled<HttpConnector<GaiResolver>>,
    guarded: Pooled<GuardedConnector>,
}

impl HttpClient {
    async fn request(
        &self,
        req: Request<RequestBody>,
        guarded: bool,
    ) -> Result<Response<UpstreamBody>, SendError> {
        let pools = &self.workers[crate::server::worker() % self.workers.len()];
        if guarded {
            pools.guarded.send(req).await
        } else {
            pools.trusted.send(req).await
        }
    }
}

/// Resolves like the system resolver, then drops every address `ssrf::is_forbidden` refuses
/// (unless `security.allow_private_base_urls`).
#[derive(Clone, Default)]
pub struct GuardedResolver {
    allow_private: bool,
}

impl tower::Service<Name> for GuardedResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let allow_private = self.allow_private;
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((name.as_str(), 0))
                .await?
                .filter(|a| allow_private || !crate::ssrf::is_forbidden(a.ip()))
                .collect();
            if addrs.is_empty() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    "the base URL resolves only to private addresses",
                ));
            }
            Ok(addrs.into_iter())
        })
    }
}

/// The TCP connector for users' own base URLs: an IP-literal host is judged by
/// `ssrf::is_forbidden` before connecting (hyper's connector skips the resolver for literals);
/// a name goes through [`GuardedResolver`]. Runs once per new connection, not per request.
#[derive(Clone)]
pub struct GuardedConnector {
    http: HttpConnector<GuardedResolver>,
    allow_private: bool,
}

impl GuardedConnector {
    /// Is `uri`'s host an IP literal the gateway must not connect to? Parsed the way hyper's
    /// `HttpConnector` reads it (brackets trimmed, then an IPv4 or IPv6 address).
    fn refuses(&self, uri: &http::Uri) -> bool {
        if self.allow_private {
            return false;
        }
        let host = uri.host().unwrap_or_default();
        let host = host.trim_start_matches('[').trim_end_matches(']');
        host.parse::<std::net::IpAddr>()
            .is_ok_and(crate::ssrf::is_forbidden)
    }
}

impl tower::Service<http::Uri> for GuardedConnector {
    type Response = <HttpConnector<GuardedResolver> as tower::Service<http::Uri>>::Response;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.http.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, dst: http::Uri) -> Self::Future {
        if self.refuses(&dst) {
            return Box::pin(std::future::ready(Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                "the base URL is a private address",
            )
            .into())));
        }
        let connecting = self.http.call(dst);
        Box::pin(async move { connecting.await.map_err(Into::into) })
    }
}

/// Pools for `workers` server workers (at least one).
pub fn client(
    cfg: &UpstreamConfig,
    allow_private: bool,
    workers: usize,
) -> anyhow::Result<HttpClient> {
    let workers = (0..workers.max(1))
        .map(|_| {
            Ok(Pools {
                trusted: pool(cfg, http_connector(cfg, GaiResolver::new()))?,
                guarded: pool(
                    cfg,
                    GuardedConnector {
                        http: http_connector(cfg, GuardedResolver { allow_private }),
                        allow_private,
                    },
                )?,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(HttpClient {
        workers: workers.into(),
    })
}

fn http_connector<R>(cfg: &UpstreamConfig, resolver: R) -> HttpConnector<R> {
    let mut http = HttpConnector::new_with_resolver(resolver);
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(Duration::from_secs(cfg.connect_timeout_secs)));
    http.set_keepalive(Some(Duration::from_secs(60)));
    http
}

fn pool<C>(cfg: &UpstreamConfig, http: C) -> anyhow::Result<Pooled<C>>
where
    C: tower::Service<http::Uri> + Clone + Send + Sync + 'static,
    C::Response: hyper::rt::Read
        + hyper::rt::Write
        + hyper_util::client::legacy::connect::Connection
        + Unpin
        + Send
        + 'static,
    C::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    C::Future: Send + Unpin + 'static,
{
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())?
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Ok(Pool::new(
        https,
        Limits {
            idle_timeout: Duration::from_secs(cfg.pool_idle_timeout_secs),
            max_idle_per_origin: cfg.pool_max_idle_per_host,
            max_h2_streams: pool::MAX_H2_STREAMS,
            h2c: cfg.http2_cleartext,
        },
    ))
}

/// Request headers a client sends that its upstream must see (spec §8; never the client's
/// `authorization`, `api-key` or `x-api-key`). Names, not strings: a lookup by `&str` parses the
/// name again on every request.
pub const FORWARDED_REQUEST_HEADERS: [http::HeaderName; 7] = [
    http::HeaderName::from_static("openai-beta"),
    http::HeaderName::from_static("openai-organization"),
    http::HeaderName::from_static("openai-project"),
    header::USER_AGENT,
    header::ACCEPT,
    http::HeaderName::from_static("anthropic-version"),
    http::HeaderName::from_static("anthropic-beta"),
];

/// The [`FORWARDED_REQUEST_HEADERS`] the client sent (`accept` only when `with_accept`: a
/// translated request asks its upstream for the upstream's own media type).
pub fn client_headers(from: &http::HeaderMap, with_accept: bool) -> http::HeaderMap {
    let mut out = http::HeaderMap::new();
    for name in FORWARDED_REQUEST_HEADERS {
        if name == header::ACCEPT && !with_accept {
            continue;
        }
        for v in from.get_all(&name) {
            out.append(name.clone(), v.clone());
        }
    }
    out
}

/// Sends `body` along `route`; resolves when the upstream's response headers arrive.
#[allow(clippy::too_many_arguments)] // the request's parts, each borrowed from a different owner
pub async fn send(
    client: &HttpClient,
    route: &Route,
    body: Bytes,
    stream: bool,
    request_id: Option<&HeaderValue>,
    client_sent: &http::HeaderMap,
    query: Option<&str>,
    first_byte_timeout: Duration,
) -> Result<Response<ResponseBody>, ApiError> {
    let mut headers = client_headers(client_sent, true);
    if let Some(adapter) = route.adapter {
        adapter.auth(&mut headers, route.provider_key.expose_secret());
    }
    send_to(
        client,
        Outbound {
            url: &with_query(&route.url, query),
            guarded: route.guarded,
            headers,
            body: body.into(),
            stream,
            request_id,
        },
        first_byte_timeout,
    )
    .await
}

/// `url` with the client's query string appended (spec §8), borrowed when there is none.
pub fn with_query<'a>(url: &'a str, query: Option<&str>) -> std::borrow::Cow<'a, str> {
    match query {
        Some(q) if !q.is_empty() => {
            let sep = if url.contains('?') { '&' } else { '?' };
            std::borrow::Cow::Owned(format!("{url}{sep}{q}"))
        }
        _ => std::borrow::Cow::Borrowed(url),
    }
}

/// One upstream request, its auth headers already made.
pub struct Outbound<'a> {
    pub url: &'a str,
    /// Connect only to public addresses (a user's own `base_url`).
    pub guarded: bool,
    /// Auth and protocol headers (`content-type`, unless given, and `accept` are set here).
    pub headers: http::HeaderMap,
    pub body: RequestBody,
    pub stream: bool,
    pub request_id: Option<&'a HeaderValue>,
}

/// A GET (a provider's models list, for `POST /api/provider-keys/{id}/verify`), with `headers`,
/// answered within `timeout`.
pub async fn get(
    client: &HttpClient,
    url: &str,
    guarded: bool,
    headers: http::HeaderMap,
    timeout: Duration,
) -> Result<Response<ResponseBody>, ApiError> {
    let mut req = Request::get(url)
        .body(RequestBody::from(Bytes::new()))
        .map_err(|e| ApiError::internal(anyhow::anyhow!("building upstream request: {e}")))?;
    req.headers_mut().extend(headers);
    req.headers_mut().insert(
        header::ACCEPT_ENCODING,
        HeaderValue::from_static("identity"),
    );
    let decoding = tower_http::decompression::Decompression::new(tower::service_fn(|req| {
        client.request(req, guarded)
    }));
    match tokio::time::timeout(timeout, tower::ServiceExt::oneshot(decoding, req)).await {
        Ok(Ok(resp)) => Ok(resp),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, url = %url, "upstream request failed");
            Err(ApiError::Upstream {
                status: http::StatusCode::BAD_GATEWAY,
                message: "Could not reach the upstream provider.".into(),
                code: "upstream_unreachable",
            })
        }
        Err(_) => Err(ApiError::Upstream {
            status: http::StatusCode::GATEWAY_TIMEOUT,
            message: "The upstream provider did not answer in time.".into(),
            code: "upstream_timeout",
        }),
    }
}

/// Sends `out`; resolves when the upstream's response headers arrive.
pub async fn send_to(
    client: &HttpClient,
    out: Outbound<'_>,
    first_byte_timeout: Duration,
) -> Result<Response<ResponseBody>, ApiError> {
    let url = out.url;
    let mut req = Request::post(url)
        .header(header::CONTENT_TYPE, "application/json")
        .body(out.body)
        .map_err(|e| ApiError::internal(anyhow::anyhow!("building upstream request: {e}")))?;
    if !out.headers.contains_key(header::ACCEPT) {
        req.headers_mut().insert(
            header::ACCEPT,
            HeaderValue::from_static(if out.stream {
                "text/event-stream"
            } else {
                "application/json"
            }),
        );
    }
    if let Some(v) = out.request_id {
        req.headers_mut()
            .insert(crate::edge::X_REQUEST_ID, v.clone());
    }
    req.headers_mut().extend(out.headers);
    req.headers_mut().insert(
        header::ACCEPT_ENCODING,
        HeaderValue::from_static("identity"),
    );
    let guarded = out.guarded;
    let decoding = tower_http::decompression::Decompression::new(tower::service_fn(|req| {
        client.request(req, guarded)
    }));
    match tokio::time::timeout(
        first_byte_timeout,
        tower::ServiceExt::oneshot(decoding, req),
    )
    .await
    {
        Ok(Ok(resp)) => match resp.headers().get(header::CONTENT_ENCODING) {
            // Still encoded: one tower-http does not decode (the header is removed when it does).
            Some(enc) if !enc.as_bytes().eq_ignore_ascii_case(b"identity") => {
                tracing::warn!(encoding = ?enc, url = %url, "upstream answered in an unreadable encoding");
                Err(ApiError::Upstream {
                    status: http::StatusCode::BAD_GATEWAY,
                    message: "The upstream provider answered in a content-encoding the gateway cannot read.".into(),
                    code: "upstream_bad_encoding",
                })
            }
            _ => Ok(resp),
        },
        Ok(Err(e)) => {
            tracing::warn!(error = %e, url = %url, "upstream request failed");
            Err(ApiError::Upstream {
                status: http::StatusCode::BAD_GATEWAY,
                message: "Could not reach the upstream provider.".into(),
                code: "upstream_unreachable",
            })
        }
        Err(_) => Err(ApiError::Upstream {
            status: http::StatusCode::GATEWAY_TIMEOUT,
            message: "The upstream provider did not answer in time.".into(),
            code: "upstream_timeout",
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use tower::Service;

    use super::*;

    #[tokio::test]
    async fn guarded_resolver_refuses_private_addresses_unless_allowed() {
        let name = Name::from_str("localhost").expect("name");
        let err = GuardedResolver {
            allow_private: false,
        }
        .call(name.clone())
        .await
        .expect_err("refused");
        assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied);
        let addrs: Vec<_> = GuardedResolver {
            allow_private: true,
        }
        .call(name)
        .await
        .expect("allowed")
        .collect();
        assert!(addrs.iter().all(|a| a.ip().is_loopback()) && !addrs.is_empty());
    }

    #[tokio::test]
    async fn guarded_connector_refuses_private_literals_before_connecting() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let cfg = UpstreamConfig::default();
        let connector = |allow_private| GuardedConnector {
            http: http_connector(&cfg, GuardedResolver { allow_private }),
            allow_private,
        };
        for host in [
            format!("127.0.0.1:{port}"),
            format!("[::ffff:127.0.0.1]:{port}"),
            format!("[::ffff:0:7f00:1]:{port}"),
            format!("[::1]:{port}"),
        ] {
            let uri: http::Uri = format!("http://{host}/").parse().expect("uri");
            let err = connector(false).call(uri).await.expect_err("refused");
            let io = err.downcast_ref::<std::io::Error>().expect("io error");
            assert_eq!(io.kind(), std::io::ErrorKind::PermissionDenied, "{host}");
        }
        // Nothing reached the listener; with the switch on, the same literal connects.
        let uri: http::Uri = format!("http://127.0.0.1:{port}/").parse().expect("uri");
        let _conn = connector(true).call(uri).await.expect("allowed");
        let (_, peer) = listener.accept().await.expect("accept");
        assert!(peer.ip().is_loopback());
        let accepted_more = tokio::time::timeout(Duration::ZERO, listener.accept()).await;
        assert!(accepted_more.is_err(), "the refused connects never arrived");
    }
}
