//! One worker's upstream connections: idle HTTP/1.1 connections kept per origin for reuse, and
//! shared HTTP/2 connections per origin when the provider negotiates `h2` by ALPN — each carrying
//! at most [`Limits::max_h2_streams`] requests at once, another opened when all are that busy
//! (a provider refuses streams beyond its `SETTINGS_MAX_CONCURRENT_STREAMS`, and hyper would hold
//! the request back until one of the others ended: behind 30-second streams, a stall).
//!
//! Built on hyper's connection API (`hyper::client::conn`) rather than hyper-util's pooled
//! `Client`: a pool belongs to one server worker, so it needs neither the `Client`'s shared
//! checkout machinery nor a spawned task per request to put an HTTP/1.1 connection back once its
//! response body ends. Here the response body itself puts it back ([`UpstreamBody`]), when its
//! last frame is read; a body dropped half-read takes its connection down with it.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Request, Response, Uri, header};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::{TrySendError, http1, http2};
use hyper_util::client::legacy::connect::Connection;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tower::{Service, ServiceExt};

type Req = Request<super::RequestBody>;

/// How many times a request the upstream never started is tried again on another connection
/// (a pooled connection the provider closed while it sat idle).
const RETRIES: usize = 2;

/// Why a request did not get a response from the upstream.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("connecting: {0}")]
    Connect(Box<dyn std::error::Error + Send + Sync>),
    #[error("the upstream URL has no scheme or host")]
    Url,
    #[error(transparent)]
    Http(#[from] hyper::Error),
}

/// The pool's settings.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// An idle connection unused this long is closed.
    pub idle_timeout: Duration,
    /// At most this many idle HTTP/1.1 connections are kept per origin.
    pub max_idle_per_origin: usize,
    /// At most this many requests at once on one HTTP/2 connection ([`MAX_H2_STREAMS`]).
    pub max_h2_streams: usize,
    /// HTTP/2 without TLS (prior knowledge) to `http` origins (`upstream.http2_cleartext`).
    pub h2c: bool,
}

/// Requests carried at once by one HTTP/2 connection to a provider. RFC 9113 (§6.5.2) asks a
/// server to allow at least 100 concurrent streams, and providers' edges allow 100 (Google) to
/// 256 (Cloudflare); hyper does not tell the peer's own figure, so the pool stays within the
/// one every provider allows.
pub const MAX_H2_STREAMS: usize = 100;

/// Scheme and authority: where a connection goes. Compared and hashed byte for byte, in one
/// write (hashing an `Authority` itself folds case a byte at a time); a host spelt in another
/// case just gets connections of its own.
#[derive(Clone, Debug)]
struct Origin {
    scheme: Scheme,
    authority: Authority,
}

impl PartialEq for Origin {
    fn eq(&self, other: &Self) -> bool {
        self.scheme == other.scheme && self.authority.as_str() == other.authority.as_str()
    }
}

impl Eq for Origin {}

impl std::hash::Hash for Origin {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write(self.authority.as_str().as_bytes());
        state.write_u8(u8::from(self.scheme == Scheme::HTTPS));
    }
}

type H1 = http1::SendRequest<super::RequestBody>;
type H2 = http2::SendRequest<super::RequestBody>;

/// Idle connections of one worker, by origin: HTTP/1.1 ones with the time each came back, and
/// the HTTP/2 ones (idle or not).
#[derive(Default)]
struct Idle {
    h1: HashMap<Origin, Vec<(H1, Instant)>>,
    h2: HashMap<Origin, Vec<Shared>>,
    sweeping: bool,
}

/// An HTTP/2 connection and the requests it carries now.
struct Shared {
    tx: H2,
    open: Arc<AtomicUsize>,
}

impl Shared {
    /// One more request on this connection, counted until its [`Slot`] drops.
    fn slot(&self) -> Slot {
        self.open.fetch_add(1, Ordering::Relaxed);
        Slot(self.open.clone())
    }
}

/// A request's place on an HTTP/2 connection: held by its response body, freed when the body
/// ends or is dropped (or when the request failed).
#[derive(Debug)]
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A connection pool over connector `C` (TCP, then TLS where the scheme says so).
pub struct Pool<C> {
    connector: C,
    idle: Arc<Mutex<Idle>>,
    limits: Limits,
    h2: http2::Builder<TokioExecutor>,
}

impl<C> Pool<C>
where
    C: Service<Uri> + Clone + Send + 'static,
    C::Response: hyper::rt::Read + hyper::rt::Write + Connection + Unpin + Send + 'static,
    C::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    C::Future: Send,
{
    pub fn new(connector: C, limits: Limits) -> Self {
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new());
        Self {
            connector,
            idle: Arc::default(),
            limits,
            h2,
        }
    }

    /// Sends `req` (absolute URI) and resolves with the response's head; the body streams on.
    pub async fn send(&self, mut req: Req) -> Result<Response<UpstreamBody>, SendError> {
        let uri = req.uri().clone();
        let origin = match (uri.scheme(), uri.authority()) {
            (Some(s), Some(a)) => Origin {
                scheme: s.clone(),
                authority: a.clone(),
            },
            _ => return Err(SendError::Url),
        };
        let mut retries = 0;
        loop {
            let pooled = if retries < RETRIES {
                self.checkout(&origin)
            } else {
                None
            };
            let reused = pooled.is_some();
            let conn = match pooled {
                Some(c) => c,
                // Boxed: the rare path's state stays out of every request's future.
                None => Box::pin(self.connect(&origin)).await?,
            };
            let err = match conn {
                Conn::H2(mut tx, slot) => match tx.try_send_request(req).await {
                    Ok(resp) => return Ok(resp.map(|b| UpstreamBody::shared(b, slot))),
                    Err(e) => e,
                },
                Conn::H1(mut tx) => {
                    if reused && tx.ready().await.is_err() {
                        // Closed while idle, before we sent anything.
                        retries += 1;
                        continue;
                    }
                    to_origin_form(&mut req, &origin);
                    match tx.try_send_request(req).await {
                        Ok(resp) => {
                            let home = Home {
                                idle: Arc::downgrade(&self.idle),
                                origin,
                                tx,
                                max: self.limits.max_idle_per_origin,
                            };
                            return Ok(resp.map(|b| UpstreamBody::pooled(b, home)));
                        }
                        Err(e) => e,
                    }
                }
            };
            match retryable(err, reused) {
                Ok(mut r) => {
                    *r.uri_mut() = uri.clone();
                    r.headers_mut().remove(header::HOST);
                    req = r;
                    retries += 1;
                }
                Err(e) => return Err(SendError::Http(e)),
            }
        }
    }

    /// An open HTTP/2 connection to `origin` with room for one more request, else an idle
    /// HTTP/1.1 one that is still open, most recently used first.
    fn checkout(&self, origin: &Origin) -> Option<Conn> {
        let mut idle = self.idle.lock().expect("pool lock");
        if let Some(list) = idle.h2.get_mut(origin) {
            list.retain(|c| !c.tx.is_closed());
            let max = self.limits.max_h2_streams.max(1);
            if let Some(c) = list.iter().find(|c| c.open.load(Ordering::Relaxed) < max) {
                return Some(Conn::H2(c.tx.clone(), c.slot()));
            }
            if !list.is_empty() {
                // Every HTTP/2 connection is full: a new one (`connect`), not an HTTP/1.1 one.
                return None;
            }
            idle.h2.remove(origin);
        }
        let list = idle.h1.get_mut(origin)?;
        let now = Instant::now();
        while let Some((tx, since)) = list.pop() {
            if !tx.is_closed() && now.duration_since(since) < self.limits.idle_timeout {
                return Some(Conn::H1(tx));
            }
        }
        None
    }

    /// Opens a new connection to `origin`; HTTP/2 when the provider chose it by ALPN.
    async fn connect(&self, origin: &Origin) -> Result<Conn, SendError> {
        let dst = Uri::builder()
            .scheme(origin.scheme.clone())
            .authority(origin.authority.clone())
            .path_and_query("/")
            .build()
            .map_err(|_| SendError::Url)?;
        let io = self
            .connector
            .clone()
            .oneshot(dst)
            .await
            .map_err(|e| SendError::Connect(e.into()))?;
        self.start_sweeping();
        let h2c = self.limits.h2c && origin.scheme == Scheme::HTTP;
        if h2c || io.connected().is_negotiated_h2() {
            let (mut tx, conn) = self.h2.handshake(io).await?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "upstream connection ended");
                }
            });
            tx.ready().await?;
            let shared = Shared {
                tx: tx.clone(),
                open: Arc::default(),
            };
            let slot = shared.slot();
            self.idle
                .lock()
                .expect("pool lock")
                .h2
                .entry(origin.clone())
                .or_default()
                .push(shared);
            Ok(Conn::H2(tx, slot))
        } else {
            let (mut tx, conn) = http1::Builder::new()
                .max_buf_size(crate::proxy::stream::CONN_BUF_BYTES)
                .handshake(io)
                .await?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "upstream connection ended");
                }
            });
            tx.ready().await?;
            Ok(Conn::H1(tx))
        }
    }

    /// On this worker's first connection: a task that closes connections idle too long. It ends
    /// with the pool.
    fn start_sweeping(&self) {
        {
            let mut idle = self.idle.lock().expect("pool lock");
            if idle.sweeping {
                return;
            }
            idle.sweeping = true;
        }
        let pool = Arc::downgrade(&self.idle);
        let timeout = self.limits.idle_timeout;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(timeout.max(Duration::from_millis(100)) / 2);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(idle) = pool.upgrade() else { return };
                sweep(&mut idle.lock().expect("pool lock"), timeout);
            }
        });
    }

    #[cfg(test)]
    fn idle_h1(&self) -> usize {
        let idle = self.idle.lock().expect("pool lock");
        idle.h1.values().map(Vec::len).sum()
    }
}

fn sweep(idle: &mut Idle, timeout: Duration) {
    let now = Instant::now();
    idle.h1.retain(|_, list| {
        list.retain(|(tx, since)| !tx.is_closed() && now.duration_since(*since) < timeout);
        !list.is_empty()
    });
    // HTTP/2: closed connections go, and so does every idle one but the first (opened for a
    // burst beyond one connection's streams).
    idle.h2.retain(|_, list| {
        let mut first = true;
        list.retain(|c| {
            let keep = !c.tx.is_closed() && (first || c.open.load(Ordering::Relaxed) > 0);
            first &= !keep;
            keep
        });
        !list.is_empty()
    });
}

enum Conn {
    H1(H1),
    H2(H2, Slot),
}

/// The request back if the upstream never started on it on a reused connection (so it is safe
/// to send again); else the error.
fn retryable(mut e: TrySendError<Req>, reused: bool) -> Result<Req, hyper::Error> {
    match e.take_message() {
        Some(req) if reused => Ok(req),
        _ => Err(e.into_error()),
    }
}

/// HTTP/1.1 wants `/path?query` on the request line and the host in `Host`.
fn to_origin_form(req: &mut Req, Origin { scheme, authority }: &Origin) {
    let default_port = if *scheme == Scheme::HTTPS { 443 } else { 80 };
    let host = match authority.port_u16() {
        Some(p) if p != default_port => HeaderValue::from_str(authority.as_str()),
        _ => HeaderValue::from_str(authority.host()),
    };
    if let Ok(host) = host {
        req.headers_mut().insert(header::HOST, host);
    }
    let path = req
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    *req.uri_mut() = Uri::from(path);
}

/// Where an HTTP/1.1 connection goes back to once its response has been read.
#[derive(Debug)]
struct Home {
    idle: Weak<Mutex<Idle>>,
    origin: Origin,
    tx: H1,
    max: usize,
}

impl Home {
    fn release(self) {
        let Some(idle) = self.idle.upgrade() else {
            return;
        };
        let mut idle = idle.lock().expect("pool lock");
        let list = idle.h1.entry(self.origin).or_default();
        if list.len() < self.max {
            list.push((self.tx, Instant::now()));
        }
    }
}

/// An upstream response body. Reading it to the end hands an HTTP/1.1 connection back to its
/// pool; dropping it earlier closes that connection (what is left of the response is unread).
#[derive(Debug)]
pub struct UpstreamBody {
    inner: Incoming,
    home: Option<Home>,
    /// The request's place on its HTTP/2 connection, freed with the body.
    slot: Option<Slot>,
}

impl UpstreamBody {
    fn shared(inner: Incoming, slot: Slot) -> Self {
        Self {
            inner,
            home: None,
            slot: Some(slot),
        }
    }

    fn pooled(inner: Incoming, home: Home) -> Self {
        let mut body = Self {
            inner,
            home: Some(home),
            slot: None,
        };
        if body.inner.is_end_stream() {
            body.release();
        }
        body
    }

    fn release(&mut self) {
        self.slot = None;
        if let Some(home) = self.home.take() {
            home.release();
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        match &frame {
            None => this.release(),
            Some(Ok(_)) if this.inner.is_end_stream() => this.release(),
            Some(Err(_)) => {
                this.home = None;
                this.slot = None;
            }
            Some(Ok(_)) => {}
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::{BodyExt, Full};
    use hyper_util::client::legacy::connect::HttpConnector;
    use hyper_util::rt::TokioIo;

    use super::*;

    /// A listener on 127.0.0.1 that counts the connections it accepts and serves each with
    /// `serve` on a task of its own; the URL of a chat completion on it.
    async fn listen<F, Fut>(serve: F) -> (String, Arc<AtomicUsize>)
    where
        F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(tcp));
            }
        });
        (format!("http://{addr}/v1/chat/completions"), accepted)
    }

    /// An HTTP/1.1 upstream that answers every request with `body`.
    async fn upstream(body: &'static [u8]) -> (String, Arc<AtomicUsize>) {
        listen(move |tcp| async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| async move {
                let _ = req.into_body().collect().await;
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(body))))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        })
        .await
    }

    /// An upstream that answers one request per connection as if it would keep the connection
    /// open (no `Connection: close`), then closes it: what a provider does to a connection it
    /// times out while it sits in our pool.
    async fn upstream_closing_silently() -> (String, Arc<AtomicUsize>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        listen(|mut tcp| async move {
            let mut seen = Vec::new();
            let mut buf = [0u8; 1024];
            // The request: head, then the 2-byte body.
            while !seen.windows(6).any(|w| w == b"\r\n\r\n{}") {
                let n = tcp.read(&mut buf).await.unwrap();
                assert!(n > 0, "request cut short");
                seen.extend_from_slice(&buf[..n]);
            }
            tcp.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello")
                .await
                .unwrap();
        })
        .await
    }

    fn pool(max: usize, idle_timeout: Duration) -> Pool<HttpConnector> {
        Pool::new(
            HttpConnector::new(),
            Limits {
                idle_timeout,
                max_idle_per_origin: max,
                max_h2_streams: MAX_H2_STREAMS,
                h2c: false,
            },
        )
    }

    fn post(url: &str) -> Req {
        Request::post(url)
            .body(super::super::RequestBody::from(Bytes::from_static(b"{}")))
            .unwrap()
    }

    async fn read(resp: Response<UpstreamBody>) -> Bytes {
        resp.into_body().collect().await.unwrap().to_bytes()
    }

    #[tokio::test]
    async fn a_read_response_hands_its_connection_back_for_the_next_request() {
        let (url, accepted) = upstream(b"hello").await;
        let pool = pool(8, Duration::from_secs(60));
        for _ in 0..5 {
            let resp = pool.send(post(&url)).await.unwrap();
            assert_eq!(read(resp).await, "hello");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(pool.idle_h1(), 1);
    }

    #[tokio::test]
    async fn concurrent_requests_get_their_own_connections_and_all_come_back() {
        let (url, accepted) = upstream(b"hello").await;
        let pool = pool(8, Duration::from_secs(60));
        let a = pool.send(post(&url)).await.unwrap();
        let b = pool.send(post(&url)).await.unwrap();
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        assert_eq!(
            (read(a).await, read(b).await),
            ("hello".into(), "hello".into())
        );
        assert_eq!(pool.idle_h1(), 2);
    }

    #[tokio::test]
    async fn idle_connections_beyond_the_limit_are_closed() {
        let (url, _) = upstream(b"hello").await;
        let pool = pool(1, Duration::from_secs(60));
        let a = pool.send(post(&url)).await.unwrap();
        let b = pool.send(post(&url)).await.unwrap();
        read(a).await;
        read(b).await;
        assert_eq!(pool.idle_h1(), 1);
    }

    #[tokio::test]
    async fn a_body_dropped_half_read_does_not_go_back_to_the_pool() {
        let (url, accepted) = upstream(b"hello").await;
        let pool = pool(8, Duration::from_secs(60));
        let resp = pool.send(post(&url)).await.unwrap();
        drop(resp);
        assert_eq!(pool.idle_h1(), 0);
        let resp = pool.send(post(&url)).await.unwrap();
        assert_eq!(read(resp).await, "hello");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_connection_the_upstream_closed_while_idle_is_not_reused() {
        let (url, accepted) = upstream_closing_silently().await;
        let pool = pool(8, Duration::from_secs(60));
        for i in 0..6 {
            let resp = pool.send(post(&url)).await.unwrap();
            assert_eq!(read(resp).await, "hello");
            // With or without a pause for the close to arrive, the next request must succeed
            // on a new connection.
            if i % 2 == 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 6);
    }

    #[tokio::test]
    async fn connections_idle_past_the_timeout_are_swept() {
        let (url, accepted) = upstream(b"hello").await;
        let pool = pool(8, Duration::from_millis(200));
        read(pool.send(post(&url)).await.unwrap()).await;
        assert_eq!(pool.idle_h1(), 1);
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(pool.idle_h1(), 0);
        read(pool.send(post(&url)).await.unwrap()).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    /// A TCP connection that says HTTP/2 was negotiated, as rustls does when a provider picks
    /// `h2` by ALPN (here without TLS: the upstream speaks HTTP/2 in the clear).
    struct H2Tcp(TokioIo<tokio::net::TcpStream>);

    impl Connection for H2Tcp {
        fn connected(&self) -> hyper_util::client::legacy::connect::Connected {
            hyper_util::client::legacy::connect::Connected::new().negotiated_h2()
        }
    }

    impl hyper::rt::Read for H2Tcp {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: hyper::rt::ReadBufCursor<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.0).poll_read(cx, buf)
        }
    }

    impl hyper::rt::Write for H2Tcp {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            Pin::new(&mut self.0).poll_write(cx, buf)
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.0).poll_flush(cx)
        }

        fn poll_shutdown(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.0).poll_shutdown(cx)
        }
    }

    /// A pool whose connections say HTTP/2 was negotiated ([`H2Tcp`]).
    fn h2_pool(
        max_h2_streams: usize,
    ) -> Pool<
        impl Service<
            Uri,
            Response = H2Tcp,
            Error = std::io::Error,
            Future = impl Future<Output = std::io::Result<H2Tcp>> + Send,
        > + Clone
        + Send
        + 'static,
    > {
        let connector = tower::service_fn(|uri: Uri| async move {
            let host = uri.authority().expect("authority").as_str().to_owned();
            Ok::<_, std::io::Error>(H2Tcp(TokioIo::new(
                tokio::net::TcpStream::connect(host).await?,
            )))
        });
        Pool::new(
            connector,
            Limits {
                idle_timeout: Duration::from_secs(60),
                max_idle_per_origin: 8,
                max_h2_streams,
                h2c: false,
            },
        )
    }

    #[tokio::test]
    async fn an_http2_upstream_carries_concurrent_requests_on_one_connection() {
        let (url, accepted) = listen(|tcp| async move {
            let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                // HTTP/2 carries the origin in the URI, not in a Host header.
                let answer = format!(
                    "{} {}",
                    req.uri().path(),
                    req.headers().contains_key(header::HOST)
                );
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(answer))))
            });
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        })
        .await;
        let pool = h2_pool(MAX_H2_STREAMS);
        let a = pool.send(post(&url)).await.unwrap();
        let b = pool.send(post(&url)).await.unwrap();
        assert_eq!(a.version(), http::Version::HTTP_2);
        assert_eq!(read(a).await, "/v1/chat/completions false");
        assert_eq!(read(b).await, "/v1/chat/completions false");
        read(pool.send(post(&url)).await.unwrap()).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(pool.idle_h1(), 0);
    }

    /// Streams held open beyond what one HTTP/2 connection carries each get their head at once,
    /// on further connections (the provider allows 2 streams a connection here, as the pool's
    /// limit says): none waits for another to end. Once they end, the extra connections are
    /// closed by the sweep and the first one carries the next request.
    #[tokio::test]
    async fn http2_streams_beyond_a_connections_limit_go_on_another_connection() {
        let (release, released) = tokio::sync::watch::channel(false);
        let (url, accepted) = listen(move |tcp| {
            let released = released.clone();
            async move {
                let svc = hyper::service::service_fn(move |_req: Request<Incoming>| {
                    let mut released = released.clone();
                    async move {
                        // A body whose one frame comes when the test says so: a long stream.
                        let frame = futures_util::stream::once(async move {
                            let _ = released.wait_for(|r| *r).await;
                            Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"done")))
                        });
                        let body = http_body_util::StreamBody::new(Box::pin(frame));
                        Ok::<_, Infallible>(Response::new(body))
                    }
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .max_concurrent_streams(2)
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            }
        })
        .await;
        let pool = h2_pool(2);
        let mut open = Vec::new();
        for i in 0..5 {
            let head = tokio::time::timeout(Duration::from_secs(5), pool.send(post(&url))).await;
            let resp = head
                .unwrap_or_else(|_| panic!("stream {i} waited for another to end"))
                .unwrap();
            open.push(resp);
        }
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            3,
            "5 streams, 2 a connection"
        );
        release.send(true).unwrap();
        for resp in open {
            assert_eq!(read(resp).await, "done");
        }
        sweep(&mut pool.idle.lock().unwrap(), Duration::from_secs(60));
        assert_eq!(
            pool.idle
                .lock()
                .unwrap()
                .h2
                .values()
                .map(Vec::len)
                .sum::<usize>(),
            1
        );
        let next = tokio::time::timeout(Duration::from_secs(5), pool.send(post(&url)))
            .await
            .expect("a free connection")
            .unwrap();
        drop(next);
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    /// With `upstream.http2_cleartext`, an `http://` upstream gets HTTP/2 at once (no TLS, no
    /// ALPN), and concurrent requests share its connection.
    #[tokio::test]
    async fn http2_cleartext_speaks_http2_to_an_http_origin() {
        let (url, accepted) = listen(|tcp| async move {
            let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                let answer = format!("{:?}", req.version());
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(answer))))
            });
            // Only HTTP/2: an HTTP/1.1 request would fail here.
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        })
        .await;
        let pool = Pool::new(
            HttpConnector::new(),
            Limits {
                idle_timeout: Duration::from_secs(60),
                max_idle_per_origin: 8,
                max_h2_streams: MAX_H2_STREAMS,
                h2c: true,
            },
        );
        let a = pool.send(post(&url)).await.unwrap();
        let b = pool.send(post(&url)).await.unwrap();
        assert_eq!(read(a).await, "HTTP/2.0");
        assert_eq!(read(b).await, "HTTP/2.0");
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_connect_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/v1", listener.local_addr().unwrap());
        drop(listener);
        let err = pool(8, Duration::from_secs(60))
            .send(post(&url))
            .await
            .expect_err("refused");
        assert!(matches!(err, SendError::Connect(_)), "{err:?}");
    }
}
