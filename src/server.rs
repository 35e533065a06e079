//! `serve(listener, app, shutdown)`: the seam `main` and the tests share.
//!
//! At most `server.max_connections` connections are open at once: at the cap the accept loop
//! waits for one to close (new ones queue in the kernel's backlog), logs that at most every
//! [`LIMIT_WARN_EVERY`] and counts each time in `tollgate_connection_limit_reached_total`;
//! `tollgate_connections_open` is the gauge.
//!
//! Connections are served by `server.workers` threads, each running its own single-threaded
//! runtime; the accept loop hands each new connection to the next worker in turn. A request, its
//! upstream connection (each worker has its own pool) and that connection's task then live on one
//! thread, so handing a body from one to the other is a queue push rather than a cross-thread
//! wake-up — the shape nginx has. Background work (the usage writer, retention, the invalidation
//! listener) stays on the main runtime.
//!
//! On shutdown it stops accepting, lets in-flight requests and streams finish (bounded by
//! `server.shutdown_drain_secs`), aborts what is still open after that (their metered bodies are
//! dropped, which meters them), and finally flushes every pending usage record.
//!
//! Every client connection closes by lingering ([`linger`]): a client still sending a body the
//! gateway answered early (413, a bad form) reads that answer instead of a reset.

use std::cell::Cell;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::app::App;

mod linger;
use linger::Lingering;

/// See `Workers::start`.
const WORKER_TICK: Duration = Duration::from_secs(1);

/// At most one "connection limit reached" warning per this interval.
const LIMIT_WARN_EVERY: Duration = Duration::from_secs(10);

/// An open connection: holds its slot of `server.max_connections` and its place in the gauge
/// until the connection's task ends (or is dropped).
struct OpenConnection {
    _slot: OwnedSemaphorePermit,
    gauge: prometheus::IntGauge,
}

impl OpenConnection {
    fn new(slot: OwnedSemaphorePermit, gauge: &prometheus::IntGauge) -> Self {
        gauge.inc();
        Self {
            _slot: slot,
            gauge: gauge.clone(),
        }
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// The first bytes of every HTTP/2 connection (RFC 9113 §3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How long a new connection may stay silent: the same fixed bound as a request head's.
const FIRST_BYTES_TIMEOUT: Duration = Duration::from_secs(30);

/// What a new connection's first bytes say it speaks.
#[derive(Debug, PartialEq, Eq)]
enum Sniffed {
    Http1,
    Http2,
    /// Only part of HTTP/2's preface so far (a client writing it in pieces): left to the
    /// protocol detection of hyper-util, which reads until it knows.
    Unsure,
    /// Closed, failed, or silent past [`FIRST_BYTES_TIMEOUT`].
    Gone,
}

/// Tells HTTP/1.1 from HTTP/2 by peeking at the connection's first bytes, without reading
/// them. hyper-util's detection reads them instead, 24 bytes, and hands them back in front of
/// the socket, so hyper's HTTP/1.1 side first reads those 24 alone, then reserves a second
/// 8 KiB for the rest: every client connection then held a 16 KiB read buffer where 8 do
/// (`benches/README.md`, long-lived streams), and made one more `read(2)`.
async fn sniff(stream: &TcpStream) -> Sniffed {
    let mut first = [0u8; H2_PREFACE.len()];
    match tokio::time::timeout(FIRST_BYTES_TIMEOUT, stream.peek(&mut first)).await {
        Ok(Ok(0)) | Ok(Err(_)) | Err(_) => Sniffed::Gone,
        Ok(Ok(n)) if first[..n] != H2_PREFACE[..n] => Sniffed::Http1,
        Ok(Ok(n)) if n == H2_PREFACE.len() => Sniffed::Http2,
        Ok(Ok(_)) => Sniffed::Unsure,
    }
}

/// Serves `conn` until it ends; once `stopping` is cancelled, it finishes the request under
/// way (`graceful`: hyper's graceful shutdown of that kind of connection) and closes.
async fn until_done<C: Future>(conn: C, stopping: &CancellationToken, graceful: fn(Pin<&mut C>)) {
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => return,
        _ = stopping.cancelled() => graceful(conn.as_mut()),
    }
    let _ = conn.await;
}

/// How long the usage writer may take to flush after the drain.
const FLUSH_LIMIT: Duration = Duration::from_secs(60);

pub async fn serve(
    listener: TcpListener,
    app: App,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let App {
        state,
        router,
        usage_writer,
        retention,
    } = app;
    let drain = Duration::from_secs(state.config.server.shutdown_drain_secs);
    // Cancelled on shutdown: every connection then finishes what it is serving and closes.
    let stopping = CancellationToken::new();
    let mut connections = JoinSet::new();
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .keep_alive(true)
        // Bounds what a client that reads slowly makes the connection hold (see the constant).
        .max_buf_size(crate::proxy::stream::CONN_BUF_BYTES);
    builder.http2().timer(hyper_util::rt::TokioTimer::new());
    // The same settings, for a connection whose protocol `sniff` already knows.
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1
        .timer(hyper_util::rt::TokioTimer::new())
        .keep_alive(true)
        .max_buf_size(crate::proxy::stream::CONN_BUF_BYTES);
    let mut http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    http2.timer(hyper_util::rt::TokioTimer::new());
    let mut workers = Workers::start(state.config.workers())?;
    // The proxied `/v1` routes skip the router (see `edge`), unless CORS needs its layer.
    let fast = state
        .config
        .server
        .cors_origins
        .is_empty()
        .then(|| state.clone());
    let mut shutdown = std::pin::pin!(shutdown);
    let max_connections = state.config.server.max_connections;
    let slots = Arc::new(Semaphore::new(max_connections));
    let mut last_limit_warning: Option<Instant> = None;

    loop {
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                state.metrics.connection_limit_reached_total.inc();
                if last_limit_warning.is_none_or(|t| t.elapsed() >= LIMIT_WARN_EVERY) {
                    last_limit_warning = Some(Instant::now());
                    tracing::warn!(
                        max_connections,
                        "connection limit reached (server.max_connections): not accepting until a connection closes"
                    );
                }
                tokio::select! {
                    slot = slots.clone().acquire_owned() => match slot {
                        Ok(slot) => slot,
                        Err(_) => break,
                    },
                    _ = &mut shutdown => break,
                }
            }
        };
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        // Out of descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                // Re-registered with the worker's reactor below.
                let stream = match stream.into_std() {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "handing a connection to a worker");
                        continue;
                    }
                };
                let (router, fast) = (router.clone(), fast.clone());
                let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let endpoint = fast.as_ref().and(crate::edge::proxied(&req));
                    let (router, fast) = (router.clone(), fast.clone());
                    async move {
                        if let (Some(state), Some(endpoint)) = (fast, endpoint) {
                            return Ok(crate::edge::proxy(state, endpoint, peer, req).await);
                        }
                        let mut req = req.map(axum::body::Body::new);
                        req.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
                        // Boxed: the router's future is large, and hyper moves this one into
                        // place for every request, the proxied ones included.
                        Box::pin(router.oneshot(req)).await
                    }
                });
                let (builder, stopping) = (builder.clone(), stopping.clone());
                let (http1, http2) = (http1.clone(), http2.clone());
                let open = OpenConnection::new(slot, &state.metrics.connections_open);
                connections.spawn_on(
                    async move {
                        let _open = open;
                        let Ok(stream) = TcpStream::from_std(stream) else {
                            return;
                        };
                        let io = TokioIo::new(Lingering::new(stream, &linger::BOUNDS));
                        // A shutdown does not wait for a connection that has said nothing yet.
                        let sniffed = tokio::select! {
                            s = sniff(io.inner().get_ref()) => s,
                            _ = stopping.cancelled() => Sniffed::Gone,
                        };
                        match sniffed {
                            Sniffed::Gone => {}
                            Sniffed::Http1 => {
                                let conn = http1.serve_connection(io, svc).with_upgrades();
                                until_done(conn, &stopping, |c| c.graceful_shutdown()).await;
                            }
                            Sniffed::Http2 => {
                                let conn = http2.serve_connection(io, svc);
                                until_done(conn, &stopping, |c| c.graceful_shutdown()).await;
                            }
                            Sniffed::Unsure => {
                                let conn = builder.serve_connection_with_upgrades(io, svc);
                                until_done(conn, &stopping, |c| c.graceful_shutdown()).await;
                            }
                        }
                    },
                    workers.next(),
                );
                // Reap finished connection tasks so the set does not grow.
                while connections.try_join_next().is_some() {}
            }
            _ = &mut shutdown => break,
        }
    }
    drop(listener);
    // Chat WebSockets finish the answer under way, then close (1001).
    state.caches.hub().shutdown();
    tracing::info!(
        open_connections = connections.len(),
        "shutting down: not accepting; draining in-flight requests"
    );
    tokio::select! {
        _ = async {
            stopping.cancel();
            while connections.join_next().await.is_some() {}
        } => {}
        _ = tokio::time::sleep(drain) => {
            tracing::warn!(drain_secs = drain.as_secs(), "drain timeout reached; closing remaining connections");
        }
    }
    connections.abort_all();
    while connections.join_next().await.is_some() {}
    drop(router);
    if let Some(pruner) = retention {
        pruner.shutdown().await;
    }
    // Stored responses and completions still being written.
    state.background.close();
    if tokio::time::timeout(FLUSH_LIMIT, state.background.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            pending = state.background.len(),
            "stored-state writes still running at shutdown"
        );
    }
    usage_writer.shutdown(FLUSH_LIMIT).await;
    // Close the pool so SQLite checkpoints its WAL and PostgreSQL/MySQL see a clean goodbye.
    if let Err(e) = state.db.close_by_ref().await {
        tracing::warn!(error = %e, "closing the database pool");
    }
    drop(state);
    // Last: database connections opened on a worker are registered with its reactor.
    let _ = tokio::task::spawn_blocking(move || workers.stop()).await;
    tracing::info!("stopped; usage records flushed");
    Ok(())
}

thread_local! {
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// The server worker running on this thread (0 off the workers), to pick per-worker resources.
pub fn worker() -> usize {
    WORKER.with(Cell::get)
}

/// The worker threads, each blocked in its runtime until stopped. Stopping (or dropping) ends
/// each runtime, which drops whatever is still spawned on it.
struct Workers {
    handles: Vec<Handle>,
    stops: Vec<oneshot::Sender<()>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    next: usize,
}

impl Workers {
    fn start(n: usize) -> anyhow::Result<Self> {
        let mut workers = Workers {
            handles: Vec::with_capacity(n),
            stops: Vec::with_capacity(n),
            threads: Vec::with_capacity(n),
            next: 0,
        };
        for i in 0..n.max(1) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (stop, stopped) = oneshot::channel::<()>();
            workers.handles.push(rt.handle().clone());
            workers.stops.push(stop);
            workers.threads.push(
                std::thread::Builder::new()
                    .name(format!("tollgate-worker-{i}"))
                    .spawn(move || {
                        WORKER.with(|w| w.set(i));
                        rt.block_on(async {
                            // A timer that expires before the runtime's next wake-up makes tokio
                            // wake its driver through the eventfd — one more write(2) and epoll
                            // round per request — even when the runtime is running, not parked.
                            // A 1 s tick keeps the next wake-up close, so the per-request timers
                            // (the upstream's timeouts, hyper's header read) never come earlier.
                            let mut tick = tokio::time::interval(WORKER_TICK);
                            let mut stopped = std::pin::pin!(stopped);
                            loop {
                                tokio::select! {
                                    _ = &mut stopped => break,
                                    _ = tick.tick() => {}
                                }
                            }
                        });
                    })?,
            );
        }
        Ok(workers)
    }

    /// The worker for the next connection, in turn.
    fn next(&mut self) -> &Handle {
        self.next = (self.next + 1) % self.handles.len();
        &self.handles[self.next]
    }

    /// Ends the runtimes and waits for their threads.
    fn stop(mut self) {
        self.stops.clear();
        for t in std::mem::take(&mut self.threads) {
            let _ = t.join();
        }
    }
}

/// Resolves on SIGINT or SIGTERM. The handlers are installed when this is called (not when the
/// future is first polled), so a signal that arrives while the server is still starting is not
/// lost and does not kill the process.
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    #[cfg(unix)]
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).ok();
    async move {
        #[cfg(unix)]
        {
            let term = async {
                match term.as_mut() {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            let int = async {
                match int.as_mut() {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = term => {},
                _ = int => {},
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;

    use super::*;

    /// A connection on which the client has written `sent` (and then `close`s if asked): what
    /// `sniff` makes of it.
    async fn sniffed(sent: &[u8], close: bool) -> Sniffed {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        client.write_all(sent).await.unwrap();
        if close {
            client.shutdown().await.unwrap();
        }
        let verdict = sniff(&server).await;
        // Peeked, not read: hyper still gets every byte.
        let mut all = vec![0u8; sent.len()];
        if !sent.is_empty() {
            let n = server.peek(&mut all).await.unwrap();
            assert_eq!(&all[..n], &sent[..n]);
        }
        verdict
    }

    #[tokio::test]
    async fn the_first_bytes_tell_the_protocol_without_being_read() {
        assert_eq!(
            sniffed(b"POST /v1/chat/completions HTTP/1.1\r\n", false).await,
            Sniffed::Http1
        );
        assert_eq!(
            sniffed(b"GET / HTTP/1.1\r\n\r\n", false).await,
            Sniffed::Http1
        );
        let mut h2 = H2_PREFACE.to_vec();
        h2.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
        assert_eq!(sniffed(&h2, false).await, Sniffed::Http2);
        // A prefix of the preface ("P" could still be "POST"): hyper-util's detection decides.
        assert_eq!(sniffed(b"P", false).await, Sniffed::Unsure);
        assert_eq!(sniffed(&H2_PREFACE[..10], false).await, Sniffed::Unsure);
        assert_eq!(sniffed(b"", true).await, Sniffed::Gone);
    }
}
