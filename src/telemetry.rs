//! Logging (tracing, JSON by default) and the Prometheus registry with typed metric handles.
//!
//! Metric names are part of the contract (API.md §7). No per-user or per-key labels.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};
use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

use tracing_subscriber::EnvFilter;

#[cfg(target_os = "linux")]
mod process;

/// Installs the global subscriber. `RUST_LOG` overrides the default `info` level.
///
/// Lines are formatted on the thread that logs and collected in memory; a background thread
/// writes them to stderr every [`LOG_FLUSH_EVERY`] (sooner once [`LOG_FLUSH_AT`] bytes wait), so
/// a request never waits on, or wakes a thread for, a `write(2)`. Keep the returned guard alive
/// until exit: dropping it writes what is left.
pub fn init_logging(format: &str) -> LogGuard {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,sea_orm=warn,hyper=warn"));
    let (writer, guard) = LogWriter::start(Box::new(std::io::stderr()));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    // Ignore the error: a test may have installed one already.
    if format == "pretty" {
        let _ = builder.try_init();
    } else if builder
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .try_init()
        .is_ok()
    {
        let _ = ACCESS_LOG.set(LogWriter(guard.shared.clone()));
    }
    guard
}

/// Where [`access_line`] writes: the JSON subscriber's own buffer, once that is installed.
static ACCESS_LOG: std::sync::OnceLock<LogWriter> = std::sync::OnceLock::new();

/// Logs one request's access line (`message: "request"`, target `tollgate::edge`) straight into
/// the log buffer, byte for byte as the JSON subscriber writes any event, when that subscriber
/// is installed and the line is enabled. tracing's JSON formatter spent ~16,000 instructions on
/// this line (callgrind), a tenth of a request. `false`: log it through `tracing` instead
/// (pretty format, or no global subscriber as in tests).
pub fn access_line(
    method: &http::Method,
    path: &str,
    status: u16,
    latency_ms: f64,
    request_id: &str,
) -> bool {
    let Some(writer) = ACCESS_LOG.get() else {
        return false;
    };
    if !tracing::enabled!(target: "tollgate::edge", tracing::Level::INFO) {
        return true;
    }
    thread_local! {
        static LINE: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    LINE.with(|line| {
        let mut l = line.borrow_mut();
        l.clear();
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        write_access_line(&mut l, &now, method, path, status, latency_ms, request_id);
        writer.push(&l);
    });
    true
}

/// The access line as the JSON subscriber formats it (see the test that compares the two).
fn write_access_line(
    l: &mut Vec<u8>,
    timestamp: &str,
    method: &http::Method,
    path: &str,
    status: u16,
    latency_ms: f64,
    request_id: &str,
) {
    l.extend_from_slice(b"{\"timestamp\":");
    let _ = serde_json::to_writer(&mut *l, timestamp);
    l.extend_from_slice(b",\"level\":\"INFO\",\"message\":\"request\",\"method\":");
    let _ = serde_json::to_writer(&mut *l, method.as_str());
    l.extend_from_slice(b",\"path\":");
    let _ = serde_json::to_writer(&mut *l, path);
    let _ = write!(l, ",\"status\":{status},\"latency_ms\":");
    let _ = serde_json::to_writer(&mut *l, &latency_ms);
    l.extend_from_slice(b",\"request_id\":");
    let _ = serde_json::to_writer(&mut *l, request_id);
    l.extend_from_slice(b",\"target\":\"tollgate::edge\"}\n");
}

/// How often buffered log lines are written out.
pub const LOG_FLUSH_EVERY: Duration = Duration::from_millis(50);
/// Buffered bytes that make the writer thread write at once.
pub const LOG_FLUSH_AT: usize = 256 * 1024;
/// Buffered bytes past which new lines are dropped (and counted) rather than growing memory
/// while the output is blocked.
const LOG_BUFFER_CAP: usize = 16 * 1024 * 1024;

struct LogShared {
    state: Mutex<LogBuf>,
    wake: Condvar,
}

#[derive(Default)]
struct LogBuf {
    bytes: Vec<u8>,
    dropped: u64,
    closed: bool,
}

/// A `MakeWriter` that appends formatted lines to a shared buffer.
#[derive(Clone)]
pub struct LogWriter(Arc<LogShared>);

/// Writes what is buffered and stops the writer thread when dropped.
pub struct LogGuard {
    shared: Arc<LogShared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LogWriter {
    /// Starts the thread that writes the buffer to `out`.
    pub fn start(mut out: Box<dyn Write + Send>) -> (Self, LogGuard) {
        let shared = Arc::new(LogShared {
            state: Mutex::new(LogBuf::default()),
            wake: Condvar::new(),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("tollgate-log".into())
            .spawn(move || {
                let mut spare = Vec::new();
                loop {
                    let (closed, dropped) = {
                        let mut st = s.state.lock().unwrap_or_else(PoisonError::into_inner);
                        if !st.closed && st.bytes.len() < LOG_FLUSH_AT {
                            st = s
                                .wake
                                .wait_timeout(st, LOG_FLUSH_EVERY)
                                .unwrap_or_else(PoisonError::into_inner)
                                .0;
                        }
                        std::mem::swap(&mut st.bytes, &mut spare);
                        (st.closed, std::mem::take(&mut st.dropped))
                    };
                    if dropped > 0 {
                        let _ = writeln!(
                            spare,
                            r#"{{"level":"WARN","message":"{dropped} log lines dropped: the log output was blocked"}}"#
                        );
                    }
                    if !spare.is_empty() {
                        let _ = out.write_all(&spare);
                        let _ = out.flush();
                        spare.clear();
                        if spare.capacity() > LOG_FLUSH_AT * 4 {
                            spare.shrink_to(LOG_FLUSH_AT);
                        }
                    }
                    if closed {
                        return;
                    }
                }
            })
            .ok();
        (Self(shared.clone()), LogGuard { shared, thread })
    }
}

impl LogWriter {
    /// Appends one formatted line (or counts it as dropped past the cap).
    fn push(&self, line: &[u8]) {
        let mut st = self.0.state.lock().unwrap_or_else(PoisonError::into_inner);
        if st.bytes.len() + line.len() > LOG_BUFFER_CAP {
            st.dropped += 1;
        } else {
            st.bytes.extend_from_slice(line);
            if st.bytes.len() >= LOG_FLUSH_AT {
                self.0.wake.notify_one();
            }
        }
    }
}

impl Write for LogWriter {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        self.push(line);
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LogWriter;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        self.shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .closed = true;
        self.shared.wake.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Which part of the API a route belongs to (the `surface` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Surface {
    /// `/v1`, gateway keys.
    OpenAi,
    /// `/api`, access tokens.
    Api,
    /// Everything else: health, metrics, docs.
    Ops,
}

impl Surface {
    pub fn of(path: &str) -> Self {
        if path.starts_with("/v1/") || path == "/v1" {
            Self::OpenAi
        } else if path.starts_with("/api/") {
            Self::Api
        } else {
            Self::Ops
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Self::OpenAi => "openai",
            Self::Api => "api",
            Self::Ops => "ops",
        }
    }
}

/// Every metric tollgate exports; cloned by every proxied request, so one `Arc` to clone.
#[derive(Clone)]
pub struct Metrics(Arc<MetricsInner>);

impl std::ops::Deref for Metrics {
    type Target = MetricsInner;
    fn deref(&self) -> &MetricsInner {
        &self.0
    }
}

/// The metrics a [`Metrics`] handle points to.
pub struct MetricsInner {
    pub registry: Registry,
    pub requests_total: IntCounterVec,
    pub request_duration: HistogramVec,
    pub ttft: HistogramVec,
    pub tokens_total: IntCounterVec,
    /// Counted in nano-dollars internally, exposed in dollars by the name's contract.
    pub cost_usd_total: prometheus::CounterVec,
    pub rate_limited_total: IntCounterVec,
    pub active_streams: IntGauge,
    pub usage_queue_depth: IntGauge,
    pub usage_write_errors_total: IntCounter,
    pub usage_records_written_total: IntCounter,
    /// Failed appends to the usage spool (those records are not crash-safe).
    pub usage_spool_errors_total: IntCounter,
    /// `pwrite(2)`s of started records; under load one carries several requests' records.
    pub usage_spool_started_writes_total: IntCounter,
    pub auth_cache_hits_total: IntCounter,
    pub auth_cache_misses_total: IntCounter,
    /// Requests answered from the response cache (`routing::cache`).
    pub response_cache_hits_total: IntCounter,
    /// Requests that looked in the response cache and went upstream.
    pub response_cache_misses_total: IntCounter,
    pub upstream_errors_total: IntCounterVec,
    /// Upstream attempts by provider and outcome (ok, rate_limited, refused, failed): a client
    /// request that was retried counts each attempt.
    pub routing_attempts_total: IntCounterVec,
    /// Attempts after the first of a client request, by the provider retried on.
    pub routing_retries_total: IntCounterVec,
    /// Circuit breakers (deployment + key) open or half-open now, by provider.
    pub routing_breakers_open: prometheus::IntGaugeVec,
    /// Failed Redis calls by operation (rate_limit, publish, subscribe); while Redis is down,
    /// limits fall back to each replica's own.
    pub redis_errors_total: IntCounterVec,
    pub http_requests_total: IntCounterVec,
    pub management_duration: Histogram,
    /// Upstream-reported (or estimated) token counts cut to the request's bounds, by field
    /// (prompt, completion, cached).
    pub usage_clamped_total: IntCounterVec,
    /// Bytes the token estimator ran the tokenizer over (bounded per request).
    pub usage_estimate_tokenized_bytes_total: IntCounter,
    /// Client connections open now (bounded by `server.max_connections`).
    pub connections_open: IntGauge,
    /// Times the accept loop reached `server.max_connections` and waited for a connection to close.
    pub connection_limit_reached_total: IntCounter,
    /// Handles of the series every proxied request touches, looked up once: a labelled lookup
    /// hashes its labels and takes a lock.
    hot: HotSeries,
}

#[derive(Default)]
struct HotSeries {
    /// By [`Surface`] and status class (1xx … 5xx).
    http: [[std::sync::OnceLock<IntCounter>; 5]; 3],
    /// By endpoint.
    duration: [std::sync::OnceLock<Histogram>; crate::providers::Endpoint::COUNT],
    ttft: [std::sync::OnceLock<Histogram>; crate::providers::Endpoint::COUNT],
}

const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0,
];

fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: T) -> T {
    // Names are static and distinct: registering cannot collide.
    let _ = r.register(Box::new(c.clone()));
    c
}

impl Metrics {
    pub fn new() -> Self {
        let r = Registry::new();
        #[cfg(target_os = "linux")]
        {
            let _ = r.register(Box::new(process::ProcessMetrics::for_self()));
        }
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            reg(
                &r,
                IntCounterVec::new(Opts::new(name, help), labels)
                    .unwrap_or_else(|e| panic!("{name}: {e}")),
            )
        };
        let hist_vec = |name: &str, help: &str, labels: &[&str]| {
            reg(
                &r,
                HistogramVec::new(
                    HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()),
                    labels,
                )
                .unwrap_or_else(|e| panic!("{name}: {e}")),
            )
        };
        let counter = |name: &str, help: &str| {
            reg(
                &r,
                IntCounter::new(name, help).unwrap_or_else(|e| panic!("{name}: {e}")),
            )
        };
        let gauge = |name: &str, help: &str| {
            reg(
                &r,
                IntGauge::new(name, help).unwrap_or_else(|e| panic!("{name}: {e}")),
            )
        };
        Self(Arc::new(MetricsInner {
            requests_total: counter_vec(
                "tollgate_requests_total",
                "Proxied /v1 requests by endpoint, model, provider and final status.",
                &["endpoint", "model", "provider", "status"],
            ),
            request_duration: hist_vec(
                "tollgate_request_duration_seconds",
                "Time from request to the last byte of the proxied response.",
                &["endpoint"],
            ),
            ttft: hist_vec(
                "tollgate_time_to_first_token_seconds",
                "Time from request to the first byte of the upstream's response body.",
                &["endpoint"],
            ),
            tokens_total: counter_vec(
                "tollgate_tokens_total",
                "Tokens metered, by kind (prompt, completion, cached, cache_write, reasoning).",
                &["model", "provider", "kind"],
            ),
            cost_usd_total: reg(
                &r,
                prometheus::CounterVec::new(
                    Opts::new("tollgate_cost_usd_total", "Metered cost in US dollars."),
                    &["model", "provider"],
                )
                .unwrap_or_else(|e| panic!("cost: {e}")),
            ),
            rate_limited_total: counter_vec(
                "tollgate_rate_limited_total",
                "Requests refused by a rate limit, by scope (key_rpm, key_tpm, user_rpm, login, auth_ip).",
                &["scope"],
            ),
            active_streams: gauge(
                "tollgate_active_streams",
                "Responses currently streaming to clients.",
            ),
            usage_queue_depth: gauge(
                "tollgate_usage_queue_depth",
                "Usage records waiting for the batch writer.",
            ),
            usage_write_errors_total: counter(
                "tollgate_usage_write_errors_total",
                "Failed usage batch writes (each is retried; nothing is dropped).",
            ),
            usage_records_written_total: counter(
                "tollgate_usage_records_written_total",
                "Usage records written to the database.",
            ),
            usage_spool_errors_total: counter(
                "tollgate_usage_spool_errors_total",
                "Failed appends to the local usage spool (those records would not survive a kill -9).",
            ),
            usage_spool_started_writes_total: counter(
                "tollgate_usage_spool_started_writes_total",
                "Writes of started records to the local usage spool; one write carries the records of every request a worker started in one scheduler round.",
            ),
            auth_cache_hits_total: counter(
                "tollgate_auth_cache_hits_total",
                "Gateway key lookups answered from the cache.",
            ),
            auth_cache_misses_total: counter(
                "tollgate_auth_cache_misses_total",
                "Gateway key lookups that went to the database.",
            ),
            response_cache_hits_total: counter(
                "tollgate_cache_hits_total",
                "Requests answered from the response cache, without an upstream call.",
            ),
            response_cache_misses_total: counter(
                "tollgate_cache_misses_total",
                "Requests with the response cache on that found no answer in it and went upstream.",
            ),
            upstream_errors_total: counter_vec(
                "tollgate_upstream_errors_total",
                "Upstream failures by kind (connect, timeout, body, status_4xx, status_5xx).",
                &["kind"],
            ),
            routing_attempts_total: counter_vec(
                "tollgate_routing_attempts_total",
                "Upstream attempts by provider and outcome (ok, rate_limited, refused, failed).",
                &["provider", "outcome"],
            ),
            routing_retries_total: counter_vec(
                "tollgate_routing_retries_total",
                "Attempts after a client request's first, by the provider retried on.",
                &["provider"],
            ),
            routing_breakers_open: reg(
                &r,
                prometheus::IntGaugeVec::new(
                    Opts::new(
                        "tollgate_routing_breakers_open",
                        "Circuit breakers (deployment + provider key) open or half-open, by provider.",
                    ),
                    &["provider"],
                )
                .unwrap_or_else(|e| panic!("tollgate_routing_breakers_open: {e}")),
            ),
            redis_errors_total: counter_vec(
                "tollgate_redis_errors_total",
                "Failed Redis calls by operation (rate_limit, publish, subscribe, cache).",
                &["op"],
            ),
            http_requests_total: counter_vec(
                "tollgate_http_requests_total",
                "Every HTTP response by route surface and status class.",
                &["surface", "class"],
            ),
            management_duration: reg(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "tollgate_management_request_duration_seconds",
                        "Duration of /api and operational calls.",
                    )
                    .buckets(LATENCY_BUCKETS.to_vec()),
                )
                .unwrap_or_else(|e| panic!("mgmt: {e}")),
            ),
            usage_clamped_total: counter_vec(
                "tollgate_usage_clamped_total",
                "Token counts cut to the request's bounds (context window, max output), by field.",
                &["field"],
            ),
            usage_estimate_tokenized_bytes_total: counter(
                "tollgate_usage_estimate_tokenized_bytes_total",
                "Bytes of text the token estimator tokenized (upstreams that reported no usage).",
            ),
            connections_open: gauge(
                "tollgate_connections_open",
                "Client connections open now (at most server.max_connections).",
            ),
            connection_limit_reached_total: counter(
                "tollgate_connection_limit_reached_total",
                "Times the listener reached server.max_connections and waited for a connection to close.",
            ),
            registry: r,
            hot: HotSeries::default(),
        }))
        .with_known_series()
    }

    /// Series that exist from the start at 0, so dashboards and `rate()` see them before the
    /// first event.
    fn with_known_series(self) -> Self {
        for scope in [
            "key_rpm", "key_tpm", "user_rpm", "user_tpm", "login", "auth_ip",
        ] {
            self.rate_limited_total.with_label_values(&[scope]);
        }
        for field in ["prompt", "completion", "cached", "cache_write", "reasoning"] {
            self.usage_clamped_total.with_label_values(&[field]);
        }
        self
    }

    /// `tollgate_http_requests_total` for one answer.
    pub fn http_requests(&self, surface: Surface, status: u16) -> &IntCounter {
        const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];
        let c = usize::from(status.clamp(100, 599) / 100 - 1);
        self.hot.http[surface as usize][c].get_or_init(|| {
            self.http_requests_total
                .with_label_values(&[surface.label(), CLASSES[c]])
        })
    }

    /// `tollgate_request_duration_seconds` of one endpoint.
    pub fn request_duration_of(&self, endpoint: crate::providers::Endpoint) -> &Histogram {
        self.hot.duration[endpoint.index()].get_or_init(|| {
            self.request_duration
                .with_label_values(&[endpoint.as_str()])
        })
    }

    /// The time-to-first-byte histogram of one endpoint.
    pub fn ttft_of(&self, endpoint: crate::providers::Endpoint) -> &Histogram {
        self.hot.ttft[endpoint.index()]
            .get_or_init(|| self.ttft.with_label_values(&[endpoint.as_str()]))
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `Write` whose bytes the test can read back.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Sink {
        fn text(&self) -> String {
            let bytes = self
                .0
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            String::from_utf8(bytes).unwrap_or_default()
        }
    }

    impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Sink {
        type Writer = Sink;
        fn make_writer(&'a self) -> Sink {
            self.clone()
        }
    }

    /// The access line written by hand is the line the JSON subscriber writes for the same
    /// event, timestamp aside.
    #[test]
    fn access_line_matches_the_json_subscriber() {
        let sink = Sink::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(sink.clone())
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .finish();
        let method = http::Method::POST;
        let (path, request_id, latency_ms) = ("/v1/chat/\"x\"\u{e9}\t", "id-\\1", 0.030966_f64);
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(target: "tollgate::edge", %method, %path, status = 200u16, latency_ms, request_id, "request");
        });
        let from_tracing = sink.text();
        let ts = from_tracing
            .split("\"timestamp\":\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .unwrap_or_default()
            .to_owned();
        assert!(ts.ends_with('Z') && ts.len() == 27, "{from_tracing}");
        let mut mine = Vec::new();
        write_access_line(&mut mine, &ts, &method, path, 200, latency_ms, request_id);
        assert_eq!(String::from_utf8(mine).unwrap_or_default(), from_tracing);
        // And our timestamp has the same shape.
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        assert_eq!(
            (now.len(), now.as_bytes()[10], now.ends_with('Z')),
            (27, b'T', true)
        );
    }

    #[test]
    fn buffered_lines_are_written_in_order_and_flushed_on_drop() {
        let sink = Sink::default();
        let (writer, guard) = LogWriter::start(Box::new(sink.clone()));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let mut w = writer.clone();
                std::thread::spawn(move || {
                    for i in 0..1000 {
                        w.write_all(format!("{t} {i}\n").as_bytes()).ok();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().ok();
        }
        drop(guard);
        let out = sink.text();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 4000, "every line arrives, whole");
        for t in 0..4 {
            let mine: Vec<usize> = lines
                .iter()
                .filter_map(|l| l.strip_prefix(&format!("{t} ")))
                .filter_map(|n| n.parse().ok())
                .collect();
            assert_eq!(mine, (0..1000).collect::<Vec<_>>(), "thread {t} in order");
        }
    }
}
