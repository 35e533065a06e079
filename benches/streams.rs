//! Long-lived streams (issue 24): N clients hold streams open at once while the upstream answers
//! each with a 30-second stream, one `chat.completion.chunk` event every 100 ms, then a usage
//! chunk and `[DONE]`. The same load goes through the real `tollgate serve` binary and through a
//! bare nginx hop (the load harness's settings: upstream `keepalive 64`, `proxy_http_version
//! 1.1`, `proxy_buffering off`) to the same upstream; per proxy and N it reports:
//!
//! * RSS per open stream: (RSS at the plateau − RSS idle before the run) / N, from
//!   `/proc/<pid>/status` (nginx: master + workers);
//! * CPU per relayed event: utime + stime of the proxy over the steady window (every stream
//!   open, none ended) ÷ the events the clients received in it;
//! * time to first byte p50 / p99 (request written → first event read; the upstream sends its
//!   first event at once);
//! * inter-event delay p50 / p99 / max: per stream, the gap between consecutive content events
//!   minus the upstream's 100 ms;
//! * starved streams: any gap over 1 s, or a stream that failed or ended early.
//!
//! `cargo bench --bench streams` (release profile). Loopback only; writes
//! `benches/results/streams.txt`. Environment: `STREAMS_N` (default `1000,5000,10000`),
//! `LONG_STREAM_SECS` (default 30), `STREAMS_RAMP_PER_SEC` (new streams per second while
//! opening, default 2000), `STREAMS_SRC_ADDRS` (client source addresses 127.0.0.1..=127.0.0.x,
//! default 4), `STREAMS_TOLLGATE_BIN` (the binary to measure; default this build's),
//! `STREAMS_NGINX` (an nginx binary; `none` to measure tollgate alone), `STREAMS_H2C=1`
//! (tollgate speaks HTTP/2 to the upstream, `upstream.http2_cleartext`: many streams on one
//! connection, as with a provider reached over `https://`; nginx cannot, it stays on HTTP/1.1).
//!
//! `STREAMS_PATHS` (issue 20; unset: the pass-through alone, as above) adds, at each N and after
//! the pass-through and nginx runs, the same N clients through tollgate's translated paths:
//! `chat-anthropic` (`/v1/chat/completions` to an `anthropic`-kind provider; the upstream
//! answers `/v1/messages` in Anthropic's SSE: `message_start` and `content_block_start`, then a
//! `content_block_delta` every 100 ms, then `content_block_stop`, `message_delta` with usage and
//! `message_stop`) and `messages-openai` (`/v1/messages` to the OpenAI-kind upstream above);
//! `passthrough` is always measured, as the reference. At each N each proxy first streams N
//! once through the pass-through, unmeasured (a proxy's first run at a new N is slower, and the
//! paths would otherwise be compared cold against warm); before the first N one non-streamed
//! request goes along each path. Per path: TTFB (first body byte) and time to the first content
//! event, p50 / p99, the TTFB added against the nginx hop and against tollgate's own
//! pass-through, inter-event delay, and the usage records each path's run wrote (with the
//! upstream's reported token counts) against its completed streams.
//!
//! The upstream runs in a process of its own (this binary again, `STREAMS_UPSTREAM_EVENTS` set):
//! a process may hold at most `RLIMIT_NOFILE` sockets (a hard 20,000 on some machines), and
//! the clients and the upstream's end of each connection then need not share that budget.

mod common;

use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpSocket};
use tokio::runtime::Runtime;
use tollgate::crypto::{KeyRing, generate_master_key, parse_master_key};
use tollgate::store;

use common::{Fixture, UPSTREAM_MODEL};

/// The upstream's pace.
const EVENT_EVERY: Duration = Duration::from_millis(100);
/// A gap longer than this starves a stream.
const STARVED_GAP: Duration = Duration::from_secs(1);
const US_PER_TICK: f64 = 10_000.0;

fn main() -> ExitCode {
    if let Ok(events) = std::env::var(UPSTREAM_CHILD) {
        return match upstream_child(&events) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("streams upstream: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("streams: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn env_u64(name: &str, default: u64) -> anyhow::Result<u64> {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .with_context(|| format!("{name}={v}: not a number")),
        Err(_) => Ok(default),
    }
}

struct Log(String);

impl Log {
    fn say(&mut self, line: impl AsRef<str>) {
        println!("{}", line.as_ref());
        self.0.push_str(line.as_ref());
        self.0.push('\n');
    }
}

/// A client protocol → provider path through tollgate (`STREAMS_PATHS`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum StreamPath {
    /// `/v1/chat/completions` to the OpenAI-kind provider: the bytes pass through.
    Passthrough,
    /// `/v1/chat/completions` translated to the `anthropic`-kind provider.
    ChatAnthropic,
    /// `/v1/messages` translated to the OpenAI-kind provider.
    MessagesOpenai,
}

impl StreamPath {
    const ALL: [StreamPath; 3] = [
        StreamPath::Passthrough,
        StreamPath::ChatAnthropic,
        StreamPath::MessagesOpenai,
    ];

    fn key(self) -> &'static str {
        match self {
            StreamPath::Passthrough => "passthrough",
            StreamPath::ChatAnthropic => "chat-anthropic",
            StreamPath::MessagesOpenai => "messages-openai",
        }
    }

    fn label(self) -> &'static str {
        match self {
            StreamPath::Passthrough => "pass-through",
            StreamPath::ChatAnthropic => "chat → anthropic",
            StreamPath::MessagesOpenai => "messages → openai",
        }
    }

    fn uri(self) -> &'static str {
        match self {
            StreamPath::Passthrough | StreamPath::ChatAnthropic => "/v1/chat/completions",
            StreamPath::MessagesOpenai => "/v1/messages",
        }
    }

    fn body(self, stream: bool) -> Bytes {
        Bytes::from(match self {
            StreamPath::Passthrough => common::chat_body(stream),
            StreamPath::ChatAnthropic => common::chat_body_for(common::ANTHROPIC_MODEL, stream),
            StreamPath::MessagesOpenai => common::messages_body(common::MODEL, stream),
        })
    }
}

/// One non-streamed request along `path`, read to the end, so that no path's first measured
/// run is also the one that fills tollgate's caches (gateway key, provider key, route).
async fn warm_up(target: SocketAddr, path: StreamPath, auth: String) -> anyhow::Result<()> {
    let stream = tokio::net::TcpStream::connect(target).await?;
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = Request::post(path.uri())
        .header(header::HOST, target.to_string())
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::AUTHORIZATION, auth)
        .body(Full::new(path.body(false)))?;
    let resp = tx.send_request(req).await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    ensure!(
        status == StatusCode::OK,
        "{} warm-up: {status}: {}",
        path.label(),
        String::from_utf8_lossy(&body)
    );
    Ok(())
}

/// `STREAMS_PATHS`: `None` when unset or empty (the pass-through alone, the default output);
/// otherwise the pass-through first, then the translated paths named, in their fixed order.
fn stream_paths() -> anyhow::Result<Option<Vec<StreamPath>>> {
    let v = std::env::var("STREAMS_PATHS").unwrap_or_default();
    let names: Vec<&str> = v
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    if names.is_empty() {
        return Ok(None);
    }
    for name in &names {
        ensure!(
            StreamPath::ALL.iter().any(|p| p.key() == *name),
            "STREAMS_PATHS: unknown path {name:?} (passthrough, chat-anthropic, messages-openai)"
        );
    }
    Ok(Some(
        StreamPath::ALL
            .into_iter()
            .filter(|p| *p == StreamPath::Passthrough || names.contains(&p.key()))
            .collect(),
    ))
}

fn run() -> anyhow::Result<()> {
    let ns: Vec<usize> = std::env::var("STREAMS_N")
        .unwrap_or_else(|_| "1000,5000,10000".into())
        .split(',')
        .map(|s| {
            s.trim()
                .parse()
                .context("STREAMS_N: comma-separated counts")
        })
        .collect::<anyhow::Result<_>>()?;
    ensure!(
        !ns.is_empty() && ns.iter().all(|&n| n > 0),
        "STREAMS_N: at least one count"
    );
    let secs = env_u64("LONG_STREAM_SECS", 30)?.max(3);
    let h2c = env_u64("STREAMS_H2C", 0)? != 0;
    let ramp = env_u64("STREAMS_RAMP_PER_SEC", 2000)?.max(1);
    let src_addrs = env_u64("STREAMS_SRC_ADDRS", 4)?.clamp(1, 250) as u8;
    let events = (secs * 1000 / EVENT_EVERY.as_millis() as u64) as usize;
    let max_n = ns.iter().copied().max().unwrap_or(0);

    // This process holds each stream's client socket, the upstream process its end of each
    // upstream connection, tollgate one socket per stream and one per upstream connection (one
    // per stream over HTTP/1.1, a few over HTTP/2), nginx's two workers half of both: raise
    // RLIMIT_NOFILE as far as allowed (children inherit it) and skip the counts tollgate
    // cannot hold (raising the hard limit needs CAP_SYS_RESOURCE).
    let files = raise_nofile((max_n as u64 * 2 + 1024).max(65_536));
    let per_stream = if h2c { 1 } else { 2 };
    let (ns, skipped): (Vec<usize>, Vec<usize>) = ns
        .into_iter()
        .partition(|&n| n as u64 * per_stream + 512 <= files);
    let max_n = ns.iter().copied().max().unwrap_or(0);
    let paths = stream_paths()?;
    let translated = paths.as_ref().is_some_and(|p| p.len() > 1);

    let mut log = Log(String::new());
    let tmp = tempfile::tempdir()?;
    let client_rt = runtime("streams-client")?;
    let ctl = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;

    // tollgate, then nginx, each with an upstream process of its own (a fresh port per run,
    // so the TIME_WAITs one run leaves do not meet the next).
    let tollgate = Tollgate::start(&ctl, tmp.path(), events, max_n, h2c, translated)?;
    let nginx = match find_program(
        "nginx",
        "STREAMS_NGINX",
        &["/usr/sbin/nginx", "/usr/local/sbin/nginx"],
    ) {
        Some(bin) => Some(Nginx::start(&bin, tmp.path(), events, max_n, files)?),
        None => {
            eprintln!("streams: nginx not found (apt-get install -y nginx-light): tollgate alone");
            None
        }
    };

    log.say(format!(
        "# Long-lived streams — {} UTC",
        chrono::Utc::now().format("%Y-%m-%d %H:%M")
    ));
    log.say(format!(
        "machine: {} × {}, load average before: {}; RLIMIT_NOFILE {files}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model(),
        loadavg()
    ));
    log.say(format!(
        "tollgate: {} (pid {}), upstream over {}; reference: {}",
        tollgate.bin.display(),
        tollgate.child.id(),
        if h2c {
            "HTTP/2 (upstream.http2_cleartext)"
        } else {
            "HTTP/1.1"
        },
        nginx.as_ref().map_or_else(
            || "none".into(),
            |n| format!("{} (worker_processes 2, keepalive 64, proxy_http_version 1.1, proxy_buffering off)", n.version)
        )
    ));
    for n in &skipped {
        log.say(format!(
            "N={n} SKIPPED: tollgate needs about {} open files; RLIMIT_NOFILE is {files} here and could not be raised (the hard limit needs CAP_SYS_RESOURCE)",
            *n as u64 * per_stream + 512
        ));
    }
    ensure!(!ns.is_empty(), "no stream count fits RLIMIT_NOFILE {files}");
    log.say(format!(
        "each stream: {events} content events {} ms apart ({secs} s), then usage + [DONE]; streams opened at {ramp}/s from {src_addrs} source address(es)",
        EVENT_EVERY.as_millis()
    ));
    if let Some(paths) = &paths {
        log.say(format!(
            "paths through tollgate, one after another at each N, after a priming run of N streams through each proxy (not measured) and the measured pass-through and nginx runs; before the first N, one non-streamed request along each path: {}; the upstream answers `/v1/messages` in Anthropic's SSE (message_start + content_block_start at once, then the same pacing of content_block_delta events, then content_block_stop, message_delta with usage, message_stop)",
            paths
                .iter()
                .map(|p| format!("{} ({} {})", p.label(), p.uri(), p.key()))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }

    let mut results: Vec<(usize, RunResult, Option<RunResult>)> = Vec::new();
    // With `STREAMS_PATHS`: every tollgate run (pass-through included) with the usage records
    // it wrote, counted after it.
    let mut path_runs: Vec<PathRun> = Vec::new();
    let mut counted = (0u64, 0u64);
    if let Some(paths) = &paths {
        let auth = format!("Bearer {}", tollgate.fixture.key_secret);
        for &path in paths {
            client_rt.block_on(warm_up(tollgate.addr, path, auth.clone()))?;
        }
        // Their records are not streams: the counts start after them.
        counted = ctl.block_on(tollgate.count_records_exact(paths.len() as u64))?;
    }
    let counted_warm_up = counted.0;
    // Streams tollgate completed in the priming runs.
    let mut primed = 0u64;
    for (round, &n) in ns.iter().enumerate() {
        let params = RunParams {
            n,
            events,
            ramp,
            src_addrs,
        };
        let mut primes: Option<(RunResult, Option<RunResult>)> = None;
        if paths.is_some() {
            // The first run of a proxy at a new N pays for it (heap growth, new upstream
            // connections: once at N = 1000 tollgate's TTFB p99 was 2.6× its second run's, and
            // nginx's too was slower), and the paths run one after another: so each proxy
            // streams N once, unmeasured, before the runs that are compared.
            let t = run_streams(
                &client_rt,
                &Proxy::Tollgate(&tollgate),
                &params,
                &tollgate.fixture,
                StreamPath::Passthrough,
            )?;
            log.say(format!(
                "N={n} tollgate, priming run (its RSS / stream goes in the first table): {}",
                t.line()
            ));
            PathRun::count(
                &ctl,
                &tollgate,
                &mut counted,
                round,
                StreamPath::Passthrough,
                &t,
            )?;
            primed += t.completed as u64;
            let g = match &nginx {
                Some(ng) => {
                    let r = run_streams(
                        &client_rt,
                        &Proxy::Nginx(ng),
                        &params,
                        &tollgate.fixture,
                        StreamPath::Passthrough,
                    )?;
                    log.say(format!(
                        "N={n} nginx, priming run (its RSS / stream goes in the first table):    {}",
                        r.line()
                    ));
                    Some(r)
                }
                None => None,
            };
            primes = Some((t, g));
        }
        let t = run_streams(
            &client_rt,
            &Proxy::Tollgate(&tollgate),
            &params,
            &tollgate.fixture,
            StreamPath::Passthrough,
        )?;
        log.say(format!("N={n} tollgate: {}", t.line()));
        if paths.is_some() {
            let run = PathRun::count(
                &ctl,
                &tollgate,
                &mut counted,
                round,
                StreamPath::Passthrough,
                &t,
            )?;
            path_runs.push(run);
        }
        let g = match &nginx {
            Some(ng) => {
                let r = run_streams(
                    &client_rt,
                    &Proxy::Nginx(ng),
                    &params,
                    &tollgate.fixture,
                    StreamPath::Passthrough,
                )?;
                log.say(format!("N={n} nginx:    {}", r.line()));
                Some(r)
            }
            None => None,
        };
        for &path in paths.iter().flatten().skip(1) {
            let r = run_streams(
                &client_rt,
                &Proxy::Tollgate(&tollgate),
                &params,
                &tollgate.fixture,
                path,
            )?;
            let run = PathRun::count(&ctl, &tollgate, &mut counted, round, path, &r)?;
            log.say(format!(
                "N={n} tollgate {}: {}; first content event p50 {:.2} ms p99 {:.2} ms; usage records {} ({} with the upstream's token counts) for {} completed streams",
                path.label(),
                r.line(),
                r.first_content_ms.0,
                r.first_content_ms.1,
                run.records,
                run.exact,
                r.completed
            ));
            path_runs.push(run);
        }
        // After a priming run the heap is already grown: RSS per open stream is the priming
        // run's, the other figures the measured run's.
        let (t, g) = match primes {
            Some((pt, pg)) => (
                t.with_rss_of(&pt),
                g.map(|g| match &pg {
                    Some(pg) => g.with_rss_of(pg),
                    None => g,
                }),
            ),
            None => (t, g),
        };
        results.push((n, t, g));
    }

    // Every stream tollgate completed is one usage record.
    let want: u64 = results
        .iter()
        .map(|(_, t, _)| t.completed as u64)
        .sum::<u64>()
        + path_runs
            .iter()
            .filter(|r| r.path != StreamPath::Passthrough)
            .map(|r| r.result.completed as u64)
            .sum::<u64>()
        + primed;
    let records = ctl
        .block_on(tollgate.count_records(want + counted_warm_up))?
        .saturating_sub(counted_warm_up);
    log.say(format!(
        "usage records: {records} written for {want} streams tollgate completed ({})",
        if records == want {
            "exact"
        } else {
            "NOT exact"
        }
    ));

    log.say(String::new());
    table(&mut log, &results);
    if paths.is_some() {
        log.say("(STREAMS_PATHS: RSS / stream from each proxy's priming run at that N; every other figure from the measured run after it.)");
        log.say(String::new());
        paths_table(&mut log, &results, &path_runs);
    }
    drop(nginx);
    tollgate.stop();

    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/results/streams.txt");
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&path, &log.0)?;
    println!("written to {}", path.display());
    Ok(())
}

fn table(log: &mut Log, results: &[(usize, RunResult, Option<RunResult>)]) {
    log.say(
        "| N | proxy | RSS / stream | CPU µs / event | TTFB p50 / p99 | inter-event delay p50 / p99 / max | starved |",
    );
    log.say("|---|---|---|---|---|---|---|");
    for (n, t, g) in results {
        for (name, r) in [("tollgate", Some(t)), ("nginx", g.as_ref())] {
            let Some(r) = r else { continue };
            log.say(format!(
                "| {n} | {name} | {:.1} KiB | {:.2} | {:.2} / {:.2} ms | {:.2} / {:.2} / {:.1} ms | {} of {n} |",
                r.rss_per_stream_kib,
                r.cpu_us_per_event,
                r.ttfb_ms.0,
                r.ttfb_ms.1,
                r.delay_ms.0,
                r.delay_ms.1,
                r.delay_ms.2,
                r.starved
            ));
        }
    }
    log.say(String::new());
    log.say("Goals at each N: RSS per open stream < 32 KiB; added inter-event p99 (tollgate − nginx) < 5 ms; no stream starved.");
    for (n, t, g) in results {
        let added_p99 = g.as_ref().map(|g| t.delay_ms.1 - g.delay_ms.1);
        let added_ttfb = g
            .as_ref()
            .map(|g| (t.ttfb_ms.0 - g.ttfb_ms.0, t.ttfb_ms.1 - g.ttfb_ms.1));
        log.say(format!(
            "N={n}: RSS {:.1} KiB/stream ({}), added inter-event p99 {} ({}), starved {} ({}); added TTFB p50/p99 {}; CPU/event {}",
            t.rss_per_stream_kib,
            met(t.rss_per_stream_kib < 32.0),
            added_p99.map_or("?".into(), |v| format!("{v:+.2} ms")),
            added_p99.map_or("no reference", |v| met(v < 5.0)),
            t.starved,
            met(t.starved == 0),
            added_ttfb.map_or("?".into(), |(a, b)| format!("{a:+.2} / {b:+.2} ms")),
            g.as_ref().map_or_else(
                || format!("{:.2} µs", t.cpu_us_per_event),
                |g| format!(
                    "{:.2} vs {:.2} µs ({:.2}×)",
                    t.cpu_us_per_event,
                    g.cpu_us_per_event,
                    t.cpu_us_per_event / g.cpu_us_per_event.max(1e-9)
                )
            ),
        ));
    }
}

fn met(ok: bool) -> &'static str {
    if ok { "met" } else { "NOT met" }
}

/// One tollgate run along one path (`STREAMS_PATHS`), with the usage records it wrote.
struct PathRun {
    /// The index of its N in `STREAMS_N`.
    round: usize,
    path: StreamPath,
    result: RunResult,
    /// Records with status 200 the run added.
    records: u64,
    /// Of those, the ones with the upstream's own token counts (not estimated; 412 prompt
    /// tokens, one completion token per content event).
    exact: u64,
}

impl PathRun {
    /// Counts the records the run just finished wrote: `counted` holds the totals before it.
    fn count(
        ctl: &Runtime,
        tollgate: &Tollgate,
        counted: &mut (u64, u64),
        round: usize,
        path: StreamPath,
        r: &RunResult,
    ) -> anyhow::Result<Self> {
        let now = ctl.block_on(tollgate.count_records_exact(counted.0 + r.completed as u64))?;
        let run = Self {
            round,
            path,
            result: r.clone(),
            records: now.0.saturating_sub(counted.0),
            exact: now.1.saturating_sub(counted.1),
        };
        *counted = now;
        Ok(run)
    }
}

/// Time to first byte per path (issue 20: a translated stream adds no waiting): against the
/// nginx hop (which only passes through) and against tollgate's own pass-through, same N.
fn paths_table(log: &mut Log, results: &[(usize, RunResult, Option<RunResult>)], runs: &[PathRun]) {
    log.say(
        "| N | path | TTFB p50 / p99 | first content p50 / p99 | added TTFB p50 / p99 vs nginx hop | added TTFB p50 / p99 vs tollgate pass-through | inter-event p99 | CPU µs / event | usage records / completed streams (with the upstream's token counts) | starved |",
    );
    log.say("|---|---|---|---|---|---|---|---|---|---|");
    let pair = |a: (f64, f64), b: (f64, f64)| format!("{:+.2} / {:+.2} ms", a.0 - b.0, a.1 - b.1);
    for (round, (n, _, g)) in results.iter().enumerate() {
        let pass = runs
            .iter()
            .find(|r| r.round == round && r.path == StreamPath::Passthrough);
        if let Some(g) = g {
            log.say(format!(
                "| {n} | nginx hop (pass-through) | {:.2} / {:.2} ms | {:.2} / {:.2} ms | — | — | {:.2} ms | {:.2} | — | {} of {n} |",
                g.ttfb_ms.0,
                g.ttfb_ms.1,
                g.first_content_ms.0,
                g.first_content_ms.1,
                g.delay_ms.1,
                g.cpu_us_per_event,
                g.starved
            ));
        }
        for run in runs.iter().filter(|r| r.round == round) {
            let r = &run.result;
            let vs_pass = match pass {
                Some(p) if run.path != StreamPath::Passthrough => pair(r.ttfb_ms, p.result.ttfb_ms),
                _ => "—".into(),
            };
            log.say(format!(
                "| {n} | tollgate {} | {:.2} / {:.2} ms | {:.2} / {:.2} ms | {} | {vs_pass} | {:.2} ms | {:.2} | {} / {} ({}; {}) | {} of {n} |",
                run.path.label(),
                r.ttfb_ms.0,
                r.ttfb_ms.1,
                r.first_content_ms.0,
                r.first_content_ms.1,
                g.as_ref()
                    .map_or("—".into(), |g| pair(r.ttfb_ms, g.ttfb_ms)),
                r.delay_ms.1,
                r.cpu_us_per_event,
                run.records,
                r.completed,
                run.exact,
                if run.records == r.completed as u64 && run.exact == run.records {
                    "exact"
                } else {
                    "NOT exact"
                },
                r.starved
            ));
        }
    }
    log.say(String::new());
    log.say("TTFB: request written → first body byte of the client stream; first content: → the first event carrying text. The upstream sends its first event at once (Anthropic: message_start and content_block_start, then the first delta).");
    for (round, (n, _, g)) in results.iter().enumerate() {
        let Some(pass) = runs
            .iter()
            .find(|r| r.round == round && r.path == StreamPath::Passthrough)
        else {
            continue;
        };
        let p = &pass.result;
        for run in runs
            .iter()
            .filter(|r| r.round == round && r.path != StreamPath::Passthrough)
        {
            let r = &run.result;
            log.say(format!(
                "N={n} {}: TTFB p50 / p99 {:.2} / {:.2} ms = {:.2}× / {:.2}× tollgate's pass-through ({:.2} / {:.2} ms){}; first content {:.2} / {:.2} ms; inter-event p99 {:.2} ms against the pass-through's {:.2} ms",
                run.path.label(),
                r.ttfb_ms.0,
                r.ttfb_ms.1,
                r.ttfb_ms.0 / p.ttfb_ms.0.max(1e-9),
                r.ttfb_ms.1 / p.ttfb_ms.1.max(1e-9),
                p.ttfb_ms.0,
                p.ttfb_ms.1,
                g.as_ref().map_or(String::new(), |g| format!(
                    ", {:.2}× / {:.2}× the nginx hop's ({:.2} / {:.2} ms)",
                    r.ttfb_ms.0 / g.ttfb_ms.0.max(1e-9),
                    r.ttfb_ms.1 / g.ttfb_ms.1.max(1e-9),
                    g.ttfb_ms.0,
                    g.ttfb_ms.1
                )),
                r.first_content_ms.0,
                r.first_content_ms.1,
                r.delay_ms.1,
                p.delay_ms.1
            ));
        }
    }
}

/// Raises RLIMIT_NOFILE to `want` (soft and hard; root with CAP_SYS_RESOURCE may), else the soft
/// limit to the hard one, with util-linux's `prlimit` (the crate forbids `unsafe`, so no direct
/// `setrlimit`); returns the soft limit in force.
fn raise_nofile(want: u64) -> u64 {
    let pid = std::process::id().to_string();
    let set = |v: u64| {
        Command::new("prlimit")
            .args(["--pid", &pid, &format!("--nofile={v}:{v}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !set(want)
        && let Some(hard) = nofile(4)
    {
        set(hard);
    }
    nofile(3).unwrap_or(0)
}

/// RLIMIT_NOFILE of this process: soft (`column` 3) or hard (4), from `/proc/self/limits`.
fn nofile(column: usize) -> Option<u64> {
    std::fs::read_to_string("/proc/self/limits")
        .ok()?
        .lines()
        .find(|l| l.starts_with("Max open files"))?
        .split_whitespace()
        .nth(column)?
        .parse()
        .ok()
}

fn runtime(name: &str) -> anyhow::Result<Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(name)
        .enable_all()
        .build()?)
}

// ---------------------------------------------------------------------------------------------
// The upstream: a hyper HTTP/1.1 server whose streamed answer paces itself.

/// One protocol's streamed answer (the same bytes every time: no allocation per event).
struct Shape {
    /// Sent at once, before the first content event (Anthropic's `message_start` and
    /// `content_block_start`); empty for OpenAI.
    head: Bytes,
    /// One content event.
    event: Bytes,
    /// OpenAI: the usage chunk and `[DONE]`; Anthropic: `content_block_stop`, `message_delta`
    /// with usage, `message_stop`.
    tail: Bytes,
}

struct UpstreamState {
    /// `chat.completion.chunk`s, for `…/chat/completions`.
    openai: Shape,
    /// Anthropic Messages SSE, for `…/messages` (the `anthropic`-kind provider).
    anthropic: Shape,
    events: usize,
    /// Streams answered to the end.
    finished: AtomicU64,
}

/// The text of every content event, quoted as it appears in each protocol's JSON: what the
/// clients count as a content event.
const CONTENT_MARK: &[u8] = b"\" tok\"";

impl UpstreamState {
    fn new(events: usize) -> Self {
        use serde_json::json;
        let event = format!(
            "data: {}\n\n",
            common::content_chunk(UPSTREAM_MODEL, " tok")
        );
        let usage = json!({
            "id": "chatcmpl-bench0000000000000000000000", "object": "chat.completion.chunk",
            "created": 1_700_000_000, "model": UPSTREAM_MODEL, "choices": [],
            "usage": {"prompt_tokens": 412, "completion_tokens": events, "total_tokens": 412 + events}
        });
        // Anthropic's event sequence; 284 + 128 cached = the same 412 prompt tokens.
        let ev = |name: &str, data: serde_json::Value| format!("event: {name}\ndata: {data}\n\n");
        let model = common::ANTHROPIC_UPSTREAM_MODEL;
        let head = ev(
            "message_start",
            json!({"type": "message_start", "message": {
                "id": "msg_bench000000000000000000", "type": "message", "role": "assistant",
                "model": model, "content": [], "stop_reason": null, "stop_sequence": null,
                "usage": {"input_tokens": 284, "cache_read_input_tokens": 128,
                          "cache_creation_input_tokens": 0, "output_tokens": 1}}}),
        ) + &ev(
            "content_block_start",
            json!({"type": "content_block_start", "index": 0,
                   "content_block": {"type": "text", "text": ""}}),
        );
        let delta = ev(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0,
                   "delta": {"type": "text_delta", "text": " tok"}}),
        );
        let tail = ev(
            "content_block_stop",
            json!({"type": "content_block_stop", "index": 0}),
        ) + &ev(
            "message_delta",
            json!({"type": "message_delta",
                   "delta": {"stop_reason": "end_turn", "stop_sequence": null},
                   "usage": {"output_tokens": events}}),
        ) + &ev("message_stop", json!({"type": "message_stop"}));
        Self {
            openai: Shape {
                head: Bytes::new(),
                event: Bytes::from(event),
                tail: Bytes::from(format!("data: {usage}\n\ndata: [DONE]\n\n")),
            },
            anthropic: Shape {
                head: Bytes::from(head),
                event: Bytes::from(delta),
                tail: Bytes::from(tail),
            },
            events,
            finished: AtomicU64::new(0),
        }
    }
}

/// A streamed answer: event k at start + k × 100 ms (absolute deadlines, so a late wake-up
/// does not push the later events back), then the tail.
struct Paced {
    st: Arc<UpstreamState>,
    /// Anthropic's shape, else OpenAI's.
    anthropic: bool,
    /// The shape's head is still to send.
    head: bool,
    start: tokio::time::Instant,
    sent: usize,
    sleep: Pin<Box<tokio::time::Sleep>>,
    done: bool,
}

impl Body for Paced {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        let shape = if this.anthropic {
            &this.st.anthropic
        } else {
            &this.st.openai
        };
        if this.head {
            this.head = false;
            if !shape.head.is_empty() {
                return Poll::Ready(Some(Ok(Frame::data(shape.head.clone()))));
            }
        }
        if this.sent > 0 && this.sleep.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        if this.sent == this.st.events {
            this.done = true;
            this.st.finished.fetch_add(1, Ordering::Relaxed);
            return Poll::Ready(Some(Ok(Frame::data(shape.tail.clone()))));
        }
        this.sent += 1;
        let next = this.start + EVENT_EVERY * this.sent as u32;
        this.sleep.as_mut().reset(next);
        Poll::Ready(Some(Ok(Frame::data(shape.event.clone()))))
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

type AnswerBody = http_body_util::Either<Paced, Full<Bytes>>;

async fn answer(
    req: Request<Incoming>,
    st: Arc<UpstreamState>,
) -> Result<Response<AnswerBody>, Infallible> {
    let anthropic = req.uri().path().ends_with("/messages");
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    if !body.windows(13).any(|w| w == b"\"stream\":true") {
        let mut r = Response::new(http_body_util::Either::Right(Full::new(Bytes::from(
            if anthropic {
                common::anthropic_message(common::ANTHROPIC_UPSTREAM_MODEL)
            } else {
                common::completion_body(UPSTREAM_MODEL)
            },
        ))));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        return Ok(r);
    }
    let now = tokio::time::Instant::now();
    let mut r = Response::new(http_body_util::Either::Left(Paced {
        st,
        anthropic,
        head: true,
        start: now,
        sent: 0,
        sleep: Box::pin(tokio::time::sleep_until(now)),
        done: false,
    }));
    *r.status_mut() = StatusCode::OK;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/event-stream"),
    );
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-cache"),
    );
    Ok(r)
}

/// The environment variable that makes this binary the upstream: its value is the count of
/// content events per stream.
const UPSTREAM_CHILD: &str = "STREAMS_UPSTREAM_EVENTS";

/// The upstream process: a listener on a free port (its address the first line on stdout),
/// served until the process is killed.
fn upstream_child(events: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let events: usize = events.trim().parse().context(UPSTREAM_CHILD)?;
    let rt = runtime("streams-upstream")?;
    let listener = rt.block_on(async {
        let s = TcpSocket::new_v4()?;
        s.set_reuseaddr(true)?;
        s.bind((Ipv4Addr::LOCALHOST, 0).into())?;
        s.listen(4096)
    })?;
    let mut out = std::io::stdout();
    writeln!(out, "{}", listener.local_addr()?)?;
    out.flush()?;
    rt.block_on(serve_upstream(
        listener,
        Arc::new(UpstreamState::new(events)),
    ));
    Ok(())
}

/// An upstream process of this harness; killed when dropped.
struct Upstream {
    child: Child,
    addr: SocketAddr,
}

impl Upstream {
    fn spawn(events: usize) -> anyhow::Result<Self> {
        use std::io::BufRead as _;
        let mut child = Command::new(std::env::current_exe()?)
            .env(UPSTREAM_CHILD, events.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the upstream process")?;
        let mut line = String::new();
        let stdout = child.stdout.take().context("upstream stdout")?;
        std::io::BufReader::new(stdout).read_line(&mut line)?;
        let addr = match line.trim().parse() {
            Ok(a) => a,
            Err(_) => {
                terminate(&mut child, Duration::from_secs(1));
                bail!("the upstream process said {line:?}, not its address");
            }
        };
        Ok(Self { child, addr })
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        terminate(&mut self.child, Duration::from_secs(2));
    }
}

async fn serve_upstream(listener: TcpListener, st: Arc<UpstreamState>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(x) => x,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let st = st.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| answer(req, st.clone()));
            let _ =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
        });
    }
}

// ---------------------------------------------------------------------------------------------
// The proxies.

struct Tollgate {
    child: Child,
    bin: PathBuf,
    addr: SocketAddr,
    db_url: String,
    fixture: Fixture,
    /// Content events per stream (a record's completion tokens).
    events: usize,
    _upstream: Upstream,
}

impl Tollgate {
    /// Prepares a SQLite database through the store modules (the load harness's fixture, its
    /// provider at an upstream listener of its own) and runs `tollgate serve` on it, with
    /// `server.max_connections` above the largest N; with `translated`, also the load harness's
    /// `anthropic`-kind provider and model at the same upstream.
    fn start(
        ctl: &Runtime,
        tmp: &Path,
        events: usize,
        max_n: usize,
        h2c: bool,
        translated: bool,
    ) -> anyhow::Result<Self> {
        let (bin, own_schema) = match std::env::var_os("STREAMS_TOLLGATE_BIN") {
            Some(p) => (PathBuf::from(p), true),
            None => (PathBuf::from(env!("CARGO_BIN_EXE_tollgate")), false),
        };
        ensure!(bin.exists(), "no tollgate binary at {}", bin.display());
        let upstream = Upstream::spawn(events)?;
        let upstream_base = format!("http://{}/v1", upstream.addr);
        let dir = tmp.join("tollgate");
        std::fs::create_dir_all(&dir)?;
        let db_url = format!("sqlite://{}?mode=rwc", dir.join("tollgate.db").display());
        let master_key = generate_master_key();
        let cfg = common::bench_config(&db_url, &master_key, true);
        let ring = KeyRing::new(&[parse_master_key(&master_key)?])?;
        let config_path = dir.join("config.toml");
        let mut toml = common::bench_config_toml(&db_url, &master_key, true).replacen(
            "[server]\n",
            &format!("[server]\nmax_connections = {}\n", (max_n * 2).max(20_000)),
            1,
        );
        if h2c {
            toml.push_str("\n[upstream]\nhttp2_cleartext = true\n");
        }
        std::fs::write(&config_path, toml)?;
        if own_schema {
            // Another build migrates its own schema; the fixture then goes in on it.
            let out = Command::new(&bin)
                .arg("--config")
                .arg(&config_path)
                .arg("migrate")
                .current_dir(&dir)
                .output()
                .with_context(|| format!("{} migrate", bin.display()))?;
            ensure!(
                out.status.success(),
                "{} migrate failed: {}",
                bin.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let fixture = ctl.block_on(async {
            let db = store::connect(&db_url, 2).await?;
            store::migrate(&db, &db_url).await?;
            let fx = common::create_fixture(&db, &ring, &cfg, &upstream_base).await?;
            if translated {
                common::add_anthropic(&db, &ring, &fx.user_id, &upstream_base).await?;
            }
            db.close().await?;
            anyhow::Ok(fx)
        })?;
        let log_path = dir.join("tollgate.log");
        let log = std::fs::File::create(&log_path)?;
        let mut cmd = Command::new(&bin);
        cmd.arg("--config")
            .arg(&config_path)
            .arg("serve")
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        for (name, _) in std::env::vars_os() {
            let name = name.to_string_lossy();
            if name.starts_with("TOLLGATE_") || name == "DATABASE_URL" || name == "RUST_LOG" {
                cmd.env_remove(name.as_ref());
            }
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let deadline = Instant::now() + Duration::from_secs(60);
        let addr = loop {
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            if let Some(addr) = text.lines().find_map(listening_addr) {
                break addr;
            }
            if let Some(status) = child.try_wait()? {
                bail!("tollgate exited ({status}) before listening:\n{text}");
            }
            if Instant::now() > deadline {
                terminate(&mut child, Duration::from_secs(2));
                bail!("tollgate did not log `tollgate listening` within 60 s:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(25));
        };
        Ok(Self {
            child,
            bin,
            addr,
            db_url,
            fixture,
            events,
            _upstream: upstream,
        })
    }

    /// Usage records with status 200, once the count has stopped changing for 2 s (≤ 30 s).
    async fn count_records(&self, want: u64) -> anyhow::Result<u64> {
        Ok(self.count_records_exact(want).await?.0)
    }

    /// [`Self::count_records`], and of those the records with the upstream's own token counts:
    /// not estimated, the 412 prompt tokens every upstream answer reports.
    async fn count_records_exact(&self, want: u64) -> anyhow::Result<(u64, u64)> {
        use entity::usage_records;
        use sea_orm::{ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter, QuerySelect};
        let db = store::connect(&self.db_url, 1).await?;
        let start = Instant::now();
        let mut last = (u64::MAX, Instant::now());
        loop {
            let n = usage_records::Entity::find()
                .select_only()
                .column(usage_records::Column::Id)
                .filter(usage_records::Column::Status.eq(200))
                .count(&db)
                .await?;
            if n != last.0 {
                last = (n, Instant::now());
            } else if (n >= want && last.1.elapsed() > Duration::from_secs(1))
                || last.1.elapsed() > Duration::from_secs(2)
                || start.elapsed() > Duration::from_secs(30)
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let exact = usage_records::Entity::find()
            .select_only()
            .column(usage_records::Column::Id)
            .filter(usage_records::Column::Status.eq(200))
            .filter(usage_records::Column::TokensEstimated.eq(false))
            .filter(usage_records::Column::PromptTokens.eq(412))
            .filter(usage_records::Column::CompletionTokens.eq(self.events as i64))
            .count(&db)
            .await?;
        db.close().await?;
        Ok((last.0, exact))
    }

    fn stop(mut self) {
        terminate(&mut self.child, Duration::from_secs(30));
    }
}

impl Drop for Tollgate {
    fn drop(&mut self) {
        terminate(&mut self.child, Duration::from_secs(30));
    }
}

/// The address in tollgate's `tollgate listening` log line.
fn listening_addr(line: &str) -> Option<SocketAddr> {
    if !line.contains("tollgate listening") {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    v.get("addr")
        .or_else(|| v.pointer("/fields/addr"))?
        .as_str()?
        .parse()
        .ok()
}

struct Nginx {
    child: Child,
    addr: SocketAddr,
    version: String,
    pids: Vec<u32>,
    _upstream: Upstream,
}

impl Nginx {
    /// nginx from the distribution as in the load harness (`benches/load.rs`), with room for
    /// the streams: `worker_connections` above 2 × N per worker, `worker_rlimit_nofile` as high
    /// as `nofile_limit` allows.
    fn start(
        bin: &Path,
        tmp: &Path,
        events: usize,
        max_n: usize,
        nofile_limit: u64,
    ) -> anyhow::Result<Self> {
        let upstream = Upstream::spawn(events)?;
        let up = upstream.addr;
        let dir = tmp.join("nginx");
        for sub in ["logs", "temp"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        let version = Command::new(bin)
            .arg("-v")
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stderr)
                    .trim()
                    .replace("nginx version: ", "")
            })
            .unwrap_or_else(|_| "nginx".into());
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let conns = (max_n * 2 + 1024).max(4096);
        let d = dir.display();
        let conf = dir.join("nginx.conf");
        std::fs::write(
            &conf,
            format!(
                r#"# Written by benches/streams.rs: a bare reverse-proxy hop to the harness's upstream.
daemon off;
master_process on;
worker_processes 2;
worker_rlimit_nofile {files};
pid {d}/nginx.pid;
error_log {d}/logs/error.log warn;
events {{ worker_connections {conns}; }}
http {{
    access_log {d}/logs/access.log;
    client_body_temp_path {d}/temp/body;
    proxy_temp_path {d}/temp/proxy;
    fastcgi_temp_path {d}/temp/fastcgi;
    uwsgi_temp_path {d}/temp/uwsgi;
    scgi_temp_path {d}/temp/scgi;
    client_max_body_size 16m;
    client_body_buffer_size 64k;
    keepalive_requests 1000000;
    upstream llm {{
        server {up};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://llm;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 120s;
        }}
    }}
}}
"#,
                // Within the limit this process could raise (each worker holds about N).
                files = (conns as u64 * 2).min(nofile_limit),
            ),
        )?;
        let log = std::fs::File::create(dir.join("logs/stderr.log"))?;
        let mut child = Command::new(bin)
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(&conf)
            .arg("-e")
            .arg(dir.join("logs/error.log"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if std::net::TcpStream::connect(addr).is_ok() {
                let mut pids = vec![child.id()];
                for _ in 0..50 {
                    let workers = children_of(child.id());
                    if workers.len() >= 2 {
                        pids.extend(workers);
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                return Ok(Self {
                    child,
                    addr,
                    version,
                    pids,
                    _upstream: upstream,
                });
            }
            if let Some(status) = child.try_wait()? {
                bail!(
                    "nginx exited ({status}): {}{}",
                    std::fs::read_to_string(dir.join("logs/stderr.log")).unwrap_or_default(),
                    std::fs::read_to_string(dir.join("logs/error.log")).unwrap_or_default()
                );
            }
            if Instant::now() > deadline {
                terminate(&mut child, Duration::from_secs(2));
                bail!("nginx did not start listening within 10 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM to the master makes it stop its workers too.
        terminate(&mut self.child, Duration::from_secs(5));
    }
}

enum Proxy<'a> {
    Tollgate(&'a Tollgate),
    Nginx(&'a Nginx),
}

impl Proxy<'_> {
    fn addr(&self) -> SocketAddr {
        match self {
            Proxy::Tollgate(t) => t.addr,
            Proxy::Nginx(n) => n.addr,
        }
    }

    fn pids(&self) -> Vec<u32> {
        match self {
            Proxy::Tollgate(t) => vec![t.child.id()],
            Proxy::Nginx(n) => n.pids.clone(),
        }
    }

    fn rss_kib(&self) -> u64 {
        self.pids().iter().filter_map(|p| vm_kb(*p, "VmRSS")).sum()
    }

    fn cpu_ticks(&self) -> u64 {
        self.pids().iter().filter_map(|p| proc_cpu_ticks(*p)).sum()
    }
}

// ---------------------------------------------------------------------------------------------
// The clients.

struct RunParams {
    n: usize,
    events: usize,
    ramp: u64,
    src_addrs: u8,
}

/// What one client saw.
#[derive(Default)]
struct StreamStats {
    ttfb_us: Option<u64>,
    /// Request written → the first content event read.
    first_content_us: Option<u64>,
    /// Gaps between consecutive content events, minus the upstream's interval, in µs.
    delays_us: Vec<i32>,
    content_events: usize,
    done: bool,
    error: Option<String>,
}

/// Content events received by all clients so far (for the steady window's CPU per event).
static RECEIVED: AtomicU64 = AtomicU64::new(0);

async fn one_stream(
    target: SocketAddr,
    src: Ipv4Addr,
    uri: &'static str,
    body: Bytes,
    auth: Option<String>,
) -> StreamStats {
    let mut st = StreamStats::default();
    match drive(target, src, uri, body, auth, &mut st).await {
        Ok(()) => {}
        Err(e) => st.error = Some(format!("{e:#}")),
    }
    st
}

async fn drive(
    target: SocketAddr,
    src: Ipv4Addr,
    uri: &'static str,
    body: Bytes,
    auth: Option<String>,
    st: &mut StreamStats,
) -> anyhow::Result<()> {
    let sock = TcpSocket::new_v4()?;
    sock.bind((src, 0).into())?;
    let stream = sock.connect(target).await.context("connect")?;
    stream.set_nodelay(true)?;
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let mut req = Request::post(uri)
        .header(header::HOST, target.to_string())
        .header(header::CONTENT_TYPE, "application/json");
    if let Some(a) = auth {
        req = req.header(header::AUTHORIZATION, a);
    }
    let req = req.body(Full::new(body))?;
    let sent = Instant::now();
    let resp = tx.send_request(req).await.context("response head")?;
    ensure!(resp.status() == StatusCode::OK, "status {}", resp.status());
    let mut body = resp.into_body();
    let mut last: Option<Instant> = None;
    let interval = EVENT_EVERY.as_micros() as i64;
    // The tail of an event split across frames.
    let mut partial: Vec<u8> = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.context("body")?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        let now = Instant::now();
        if st.ttfb_us.is_none() {
            st.ttfb_us = Some(now.duration_since(sent).as_micros() as u64);
        }
        partial.extend_from_slice(&data);
        let mut start = 0;
        while let Some(i) = memchr::memmem::find(&partial[start..], b"\n\n") {
            let ev = &partial[start..start + i];
            start += i + 2;
            // The end of a chat stream, or of an Anthropic Messages one.
            if ev == b"data: [DONE]"
                || memchr::memmem::find(ev, b"\"type\":\"message_stop\"").is_some()
            {
                st.done = true;
            } else if memchr::memmem::find(ev, CONTENT_MARK).is_some() {
                if st.first_content_us.is_none() {
                    st.first_content_us = Some(now.duration_since(sent).as_micros() as u64);
                }
                st.content_events += 1;
                RECEIVED.fetch_add(1, Ordering::Relaxed);
                if let Some(prev) = last {
                    let gap = now.duration_since(prev).as_micros() as i64;
                    st.delays_us
                        .push((gap - interval).clamp(i32::MIN as i64, i32::MAX as i64) as i32);
                }
                last = Some(now);
            }
        }
        partial.drain(..start);
    }
    Ok(())
}

#[derive(Clone)]
struct RunResult {
    n: usize,
    rss_idle_kib: u64,
    rss_plateau_kib: u64,
    rss_per_stream_kib: f64,
    cpu_us_per_event: f64,
    /// p50, p99 in ms.
    ttfb_ms: (f64, f64),
    /// Request written → first content event read, p50, p99 in ms.
    first_content_ms: (f64, f64),
    /// p50, p99, max in ms.
    delay_ms: (f64, f64, f64),
    starved: usize,
    completed: usize,
    errors: Vec<String>,
    window_secs: f64,
}

impl RunResult {
    fn with_rss_of(self, other: &RunResult) -> Self {
        Self {
            rss_idle_kib: other.rss_idle_kib,
            rss_plateau_kib: other.rss_plateau_kib,
            rss_per_stream_kib: other.rss_per_stream_kib,
            ..self
        }
    }

    fn line(&self) -> String {
        let mut s = format!(
            "RSS idle {:.1} MiB, plateau {:.1} MiB ({:.1} KiB/stream); CPU {:.2} µs/event over a {:.1} s steady window; TTFB p50 {:.2} ms p99 {:.2} ms; inter-event delay p50 {:.2} ms p99 {:.2} ms max {:.1} ms; completed {} of {}, starved {}",
            self.rss_idle_kib as f64 / 1024.0,
            self.rss_plateau_kib as f64 / 1024.0,
            self.rss_per_stream_kib,
            self.cpu_us_per_event,
            self.window_secs,
            self.ttfb_ms.0,
            self.ttfb_ms.1,
            self.delay_ms.0,
            self.delay_ms.1,
            self.delay_ms.2,
            self.completed,
            self.n,
            self.starved
        );
        if !self.errors.is_empty() {
            let _ = write!(s, "; {} failed, e.g. {}", self.errors.len(), self.errors[0]);
        }
        s
    }
}

fn percentile<T: Copy>(sorted: &[T], p: f64) -> Option<T> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i.min(sorted.len() - 1)).copied()
}

fn run_streams(
    rt: &Runtime,
    proxy: &Proxy<'_>,
    p: &RunParams,
    fx: &Fixture,
    path: StreamPath,
) -> anyhow::Result<RunResult> {
    // Settle: the previous run's connections close, then the idle figure.
    std::thread::sleep(Duration::from_secs(2));
    let rss_idle = proxy.rss_kib();
    let target = proxy.addr();
    let body = path.body(true);
    let uri = path.uri();
    let auth = Some(format!("Bearer {}", fx.key_secret));

    // Open the streams at the ramp rate, in 10 ms steps.
    let started = Instant::now();
    let per_step = (p.ramp as usize / 100).max(1);
    let mut handles = Vec::with_capacity(p.n);
    let mut opened = 0;
    let mut step = 0u32;
    while opened < p.n {
        let due = started + Duration::from_millis(10) * step;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        for _ in 0..per_step.min(p.n - opened) {
            let src = Ipv4Addr::new(127, 0, 0, 1 + (opened % p.src_addrs as usize) as u8);
            handles.push(rt.spawn(one_stream(target, src, uri, body.clone(), auth.clone())));
            opened += 1;
        }
        step += 1;
    }
    let all_open = Instant::now();
    // The steady window: from 1 s after the last stream opened to 1 s before the first ends.
    let stream_len = EVENT_EVERY * p.events as u32;
    let window_end = started + stream_len - Duration::from_secs(1);
    let window_start = all_open + Duration::from_secs(1);
    ensure!(
        window_end > window_start + Duration::from_secs(1),
        "streams of {} s are too short to open {} of them at {}/s and still measure a steady window",
        stream_len.as_secs(),
        p.n,
        p.ramp
    );
    std::thread::sleep(window_start.saturating_duration_since(Instant::now()));
    let (cpu0, ev0, t0) = (
        proxy.cpu_ticks(),
        RECEIVED.load(Ordering::SeqCst),
        Instant::now(),
    );
    // RSS at the plateau: the highest of samples taken every 250 ms through the window.
    let mut rss_plateau = 0;
    while Instant::now() < window_end {
        rss_plateau = rss_plateau.max(proxy.rss_kib());
        std::thread::sleep(Duration::from_millis(250));
    }
    let (cpu1, ev1, t1) = (
        proxy.cpu_ticks(),
        RECEIVED.load(Ordering::SeqCst),
        Instant::now(),
    );

    let stats: Vec<StreamStats> = rt.block_on(async {
        let mut out = Vec::with_capacity(handles.len());
        for h in handles {
            out.push(h.await.unwrap_or_else(|e| StreamStats {
                error: Some(format!("client task: {e}")),
                ..Default::default()
            }));
        }
        out
    });

    let mut ttfb: Vec<u64> = stats.iter().filter_map(|s| s.ttfb_us).collect();
    ttfb.sort_unstable();
    let mut first_content: Vec<u64> = stats.iter().filter_map(|s| s.first_content_us).collect();
    first_content.sort_unstable();
    let mut delays: Vec<i32> = stats
        .iter()
        .flat_map(|s| s.delays_us.iter().copied())
        .collect();
    delays.sort_unstable();
    let starved_gap = (STARVED_GAP - EVENT_EVERY).as_micros() as i32;
    let completed = stats
        .iter()
        .filter(|s| s.error.is_none() && s.done && s.content_events == p.events)
        .count();
    let starved = stats
        .iter()
        .filter(|s| {
            s.error.is_some()
                || !s.done
                || s.content_events != p.events
                || s.delays_us.iter().any(|&d| d > starved_gap)
        })
        .count();
    let events = ev1.saturating_sub(ev0).max(1);
    let ms = |us: f64| us / 1000.0;
    Ok(RunResult {
        n: p.n,
        rss_idle_kib: rss_idle,
        rss_plateau_kib: rss_plateau,
        rss_per_stream_kib: rss_plateau.saturating_sub(rss_idle) as f64 / p.n as f64,
        cpu_us_per_event: cpu1.saturating_sub(cpu0) as f64 * US_PER_TICK / events as f64,
        ttfb_ms: (
            ms(percentile(&ttfb, 0.5).unwrap_or(0) as f64),
            ms(percentile(&ttfb, 0.99).unwrap_or(0) as f64),
        ),
        first_content_ms: (
            ms(percentile(&first_content, 0.5).unwrap_or(0) as f64),
            ms(percentile(&first_content, 0.99).unwrap_or(0) as f64),
        ),
        delay_ms: (
            ms(percentile(&delays, 0.5).unwrap_or(0) as f64),
            ms(percentile(&delays, 0.99).unwrap_or(0) as f64),
            ms(delays.last().copied().unwrap_or(0) as f64),
        ),
        starved,
        completed,
        errors: stats.iter().filter_map(|s| s.error.clone()).collect(),
        window_secs: (t1 - t0).as_secs_f64(),
    })
}

// ---------------------------------------------------------------------------------------------
// /proc and process helpers (as in benches/load.rs).

fn find_program(name: &str, env: &str, extra: &[&str]) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        return (p != "none").then(|| PathBuf::from(p));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .chain(extra.iter().map(PathBuf::from))
        .find(|p| p.is_file())
}

/// Ends a child process this harness started: SIGTERM, then SIGKILL after `grace`.
fn terminate(child: &mut Child, grace: Duration) {
    if matches!(child.try_wait(), Ok(Some(_))) {
        return;
    }
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn stat_fields(stat: &str) -> Option<(&str, Vec<&str>)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    Some((
        &stat[open + 1..close],
        stat[close + 1..].split_whitespace().collect(),
    ))
}

/// utime + stime of a process (all its threads), in ticks.
fn proc_cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, f) = stat_fields(&stat)?;
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn children_of(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|s| stat_fields(&s).and_then(|(_, f)| f.get(1)?.parse::<u32>().ok()))
                == Some(pid)
        })
        .collect()
}

/// A `/proc/<pid>/status` memory field in KiB.
fn vm_kb(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("model name")?
                    .split_once(':')
                    .map(|(_, v)| v.trim().to_owned())
            })
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}
