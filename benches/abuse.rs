//! Replays the abuse cases of issue 18 against the real gateway and prints, per case, what was
//! expected, what happened and PASS/FAIL (see benches/README.md, "Abuse replay").
//!
//! `cargo bench --bench abuse` starts the release `tollgate` binary on a temporary SQLite
//! database (the load harness's fixture: a user with a balance, a priced model, a gateway key)
//! and a hostile upstream inside this process, both on 127.0.0.1 with free ports, and runs:
//!
//! 1. an upstream reporting 9e15 completion tokens on two requests in one usage batch;
//! 2. 50 parallel bodies repeating `max_tokens` (1, then 2,000,000) against a $0.05 balance;
//! 7. an SSE line without a newline (up to 100 MB);
//! 8. 200 concurrent anonymous logins with random usernames while `/v1` is measured;
//! 6. a 16 MiB prompt whose client disconnects, then an upstream answering 60 MB without usage;
//!    each time, how late an ordinary request's usage record is.
//!
//! `-- --gateway URL [--key sk-…]` runs case 8 alone against a gateway already running on
//! loopback (the others need this harness's upstream and database). Every loop is bounded; the
//! whole run stops within 60 s of the gateway being ready. Exit status 0 whatever the verdicts:
//! the table is the result.
#![allow(clippy::unwrap_used)]

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use bytes::Bytes;
use entity::usage_records;
use http::{Request, Response, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use sea_orm::{ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter};
use tokio::net::TcpListener;
use tollgate::crypto::{KeyRing, generate_master_key, parse_master_key};
use tollgate::store;

use common::{Fixture, MODEL, UPSTREAM_MODEL};

/// The whole replay stops this long after the gateway is ready.
const TOTAL_BUDGET: Duration = Duration::from_secs(60);

type Body = BoxBody<Bytes, Infallible>;

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

fn json(b: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .header(header::CONTENT_TYPE, "application/json")
        .body(full(b))
        .unwrap()
}

fn sse(body: Body) -> Response<Body> {
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .body(body)
        .unwrap()
}

// ----------------------------------------------------------------------------------------------
// The hostile upstream: what it does is chosen by the request's `user` field.

fn marker(body: &[u8], name: &str) -> bool {
    memchr::memmem::find(body, format!("\"user\":\"abuse-{name}\"").as_bytes()).is_some()
}

fn completion(completion_tokens: u64, with_usage: bool, content: &str) -> String {
    let mut v = serde_json::json!({
        "id": "chatcmpl-abuse", "object": "chat.completion", "created": 1_700_000_000,
        "model": UPSTREAM_MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                     "finish_reason": "stop"}],
    });
    if with_usage {
        v["usage"] = serde_json::json!({"prompt_tokens": 10, "completion_tokens": completion_tokens,
                                        "total_tokens": completion_tokens.saturating_add(10)});
    }
    v.to_string()
}

async fn upstream_answer(req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => Bytes::new(),
    };
    // 1: credit minting: an absurd completion count.
    if marker(&body, "mint") {
        return Ok(json(completion(9_000_000_000_000_000, true, "minted")));
    }
    // 2: generates what a last-wins parser reads as the limit.
    if marker(&body, "echo") {
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        let n = ["max_completion_tokens", "max_tokens"]
            .iter()
            .find_map(|k| v.get(k).and_then(|n| n.as_u64()))
            .unwrap_or(16);
        return Ok(json(completion(n, true, "as many tokens as allowed")));
    }
    // 7: one SSE line that never ends, 100 MB in 64 KiB chunks.
    if marker(&body, "sse-no-newline") {
        let chunk = Bytes::from(vec![b'a'; 64 * 1024]);
        let frames = futures_util::stream::iter(
            std::iter::once(Bytes::from_static(b"data: "))
                .chain(std::iter::repeat_n(chunk, 100 * 1024 * 1024 / (64 * 1024)))
                .map(|b| Ok::<_, Infallible>(Frame::data(b))),
        );
        return Ok(sse(BodyExt::boxed(StreamBody::new(frames))));
    }
    // 6a: a stream that starts, then stalls (its client leaves).
    if marker(&body, "stall") {
        let first = format!("data: {}\n\n", common::content_chunk(UPSTREAM_MODEL, "hi"));
        let frames = futures_util::stream::unfold(0u8, move |n| {
            let first = first.clone();
            async move {
                match n {
                    0 => Some((Ok::<_, Infallible>(Frame::data(Bytes::from(first))), 1)),
                    1 => {
                        tokio::time::sleep(Duration::from_secs(10)).await;
                        None
                    }
                    _ => None,
                }
            }
        });
        return Ok(sse(BodyExt::boxed(StreamBody::new(frames))));
    }
    // 6b: 60 MB of answer and no usage: the gateway must estimate.
    if marker(&body, "no-usage-60mb") {
        let content = "lorem ipsum dolor sit amet ".repeat(60_000_000 / 27);
        return Ok(json(completion(0, false, &content)));
    }
    Ok(json(common::completion_body(UPSTREAM_MODEL)))
}

async fn start_upstream() -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service_fn(upstream_answer))
                    .await;
            });
        }
    });
    Ok(addr)
}

// ----------------------------------------------------------------------------------------------
// The gateway under test (as in benches/load.rs: the real binary, a child process).

struct Gateway {
    addr: SocketAddr,
    child: Child,
    db_url: String,
    fixture: Fixture,
}

impl Gateway {
    async fn start(tmp: &Path, upstream_base: &str) -> anyhow::Result<Self> {
        let bin = match std::env::var_os("ABUSE_TOLLGATE_BIN") {
            Some(p) => PathBuf::from(p),
            None => PathBuf::from(env!("CARGO_BIN_EXE_tollgate")),
        };
        ensure!(bin.exists(), "no tollgate binary at {}", bin.display());
        let db_url = format!("sqlite://{}?mode=rwc", tmp.join("tollgate.db").display());
        let master_key = generate_master_key();
        let cfg = common::bench_config(&db_url, &master_key, true);
        let ring = KeyRing::new(&[parse_master_key(&master_key)?])?;
        let db = store::connect(&db_url, 2).await?;
        store::migrate(&db, &db_url).await?;
        let fixture = common::create_fixture(&db, &ring, &cfg, upstream_base).await?;
        db.close().await?;
        let config_path = tmp.join("config.toml");
        std::fs::write(
            &config_path,
            common::bench_config_toml(&db_url, &master_key, true),
        )?;
        let log_path = tmp.join("tollgate.log");
        let log = std::fs::File::create(&log_path)?;
        let mut cmd = Command::new(&bin);
        cmd.arg("--config")
            .arg(&config_path)
            .arg("serve")
            .current_dir(tmp)
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
        let deadline = Instant::now() + Duration::from_secs(30);
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
                bail!("tollgate did not log `tollgate listening` within 30 s:\n{text}");
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        };
        Ok(Self {
            addr,
            child,
            db_url,
            fixture,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        terminate(&mut self.child, Duration::from_secs(5));
    }
}

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

fn rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Samples the gateway's RSS every 50 ms until dropped; `peak()` is the highest seen.
struct RssWatch {
    peak: Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl RssWatch {
    fn start(pid: Option<u32>) -> Self {
        let peak = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let p = peak.clone();
        let task = tokio::spawn(async move {
            let Some(pid) = pid else { return };
            loop {
                if let Some(kb) = rss_kb(pid) {
                    p.fetch_max(kb, std::sync::atomic::Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        Self { peak, task }
    }

    fn peak_mib(&self) -> f64 {
        self.peak.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1024.0
    }
}

impl Drop for RssWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ----------------------------------------------------------------------------------------------
// The cases

struct Outcome {
    case: &'static str,
    expected: String,
    happened: String,
    pass: Option<bool>,
}

fn chat(user: &str, extra: &str, stream: bool) -> String {
    format!(
        r#"{{"model":"{MODEL}","messages":[{{"role":"user","content":"hello"}}],"user":"abuse-{user}","stream":{stream}{extra}}}"#
    )
}

struct Ctx {
    gw: Option<Gateway>,
    base: String,
    key: Option<String>,
    client: reqwest::Client,
}

impl Ctx {
    fn gw(&self) -> &Gateway {
        self.gw.as_ref().expect("the harness's own gateway")
    }

    async fn post(&self, body: impl Into<reqwest::Body>) -> reqwest::Result<reqwest::Response> {
        let mut r = self
            .client
            .post(format!("{}/v1/chat/completions", self.base))
            .header(header::CONTENT_TYPE, "application/json")
            .body(body);
        if let Some(k) = &self.key {
            r = r.bearer_auth(k);
        }
        r.send().await
    }

    async fn db(&self) -> anyhow::Result<sea_orm::DatabaseConnection> {
        store::connect(&self.gw().db_url, 1).await
    }

    async fn balance_nanos(&self) -> anyhow::Result<i64> {
        let db = self.db().await?;
        let u = store::users::find(&db, &self.gw().fixture.user_id)
            .await?
            .context("fixture user")?;
        Ok(u.balance_nanos)
    }

    async fn records(&self, status: Option<i32>) -> anyhow::Result<u64> {
        let db = self.db().await?;
        let mut q = usage_records::Entity::find();
        if let Some(s) = status {
            q = q.filter(usage_records::Column::Status.eq(s));
        }
        Ok(q.count(&db).await?)
    }

    /// Polls the record count until it reaches `want` or `limit` passes; the count and the wait.
    async fn wait_records(
        &self,
        status: Option<i32>,
        want: u64,
        limit: Duration,
    ) -> anyhow::Result<(u64, Duration)> {
        let start = Instant::now();
        loop {
            let n = self.records(status).await?;
            if n >= want || start.elapsed() > limit {
                return Ok((n, start.elapsed()));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

fn usd(nanos: i64) -> String {
    format!("${:.2}", nanos as f64 / 1e9)
}

async fn case_1(cx: &Ctx) -> anyhow::Result<Outcome> {
    let before = cx.balance_nanos().await?;
    let records = cx.records(None).await?;
    let body = chat("mint", "", false);
    let (a, b) = tokio::join!(cx.post(body.clone()), cx.post(body));
    let statuses = [a?.status().as_u16(), b?.status().as_u16()];
    let (n, _) = cx
        .wait_records(None, records + 2, Duration::from_secs(5))
        .await?;
    let after = cx.balance_nanos().await?;
    let db = cx.db().await?;
    let key = entity::gateway_keys::Entity::find_by_id(cx.gw().fixture.key_id.clone())
        .one(&db)
        .await?
        .context("fixture key")?;
    let totals = store::usage::totals(
        &db,
        &store::usage::UsageFilter {
            user_id: Some(cx.gw().fixture.user_id.clone()),
            ..Default::default()
        },
    )
    .await;
    let pass = after <= before && key.spent_nanos >= 0 && totals.is_ok();
    Ok(Outcome {
        case: "1 upstream reports 9e15 completion tokens ×2",
        expected: "no credit minted (balance does not rise), key spent ≥ 0, usage totals readable"
            .into(),
        happened: format!(
            "answers {statuses:?}, {} new records; balance {} → {}; key spent {}; usage totals: {}",
            n - records,
            usd(before),
            usd(after),
            usd(key.spent_nanos),
            match &totals {
                Ok(t) => format!("ok ({} completion tokens)", t.completion_tokens),
                Err(e) => format!("ERROR {e}"),
            }
        ),
        pass: Some(pass),
    })
}

async fn case_2(cx: &Ctx) -> anyhow::Result<Outcome> {
    // Bring the balance to $0.05.
    let db = cx.db().await?;
    let now = cx.balance_nanos().await?;
    let target = store::usd_to_nanos(0.05);
    store::ledger::apply(
        &db,
        store::ledger::Change {
            user_id: &cx.gw().fixture.user_id,
            amount_nanos: target.saturating_sub(now),
            kind: store::ledger::Kind::Adjustment,
            note: Some("abuse replay: case 2"),
            actor_id: None,
            refuse_negative: false,
        },
    )
    .await?;
    let records = cx.records(None).await?;
    let body = chat("echo", r#","max_tokens":1,"max_tokens":2000000"#, false);
    let answers = futures_util::future::join_all((0..50).map(|_| cx.post(body.clone()))).await;
    let mut ok = 0;
    let mut bad_request = 0;
    let mut other = 0;
    for a in answers {
        match a.map(|r| r.status().as_u16()) {
            Ok(200) => ok += 1,
            Ok(400) => bad_request += 1,
            _ => other += 1,
        }
    }
    cx.wait_records(None, records + ok, Duration::from_secs(5))
        .await?;
    let after = cx.balance_nanos().await?;
    Ok(Outcome {
        case: "2 duplicate max_tokens ×50 vs $0.05",
        expected: "each body refused (400 invalid_json), balance stays ≥ $0.00".into(),
        happened: format!(
            "{ok} answered 200, {bad_request} refused 400, {other} other; balance $0.05 → {}",
            usd(after)
        ),
        pass: Some(ok == 0 && after >= 0),
    })
}

async fn case_7(cx: &Ctx) -> anyhow::Result<Outcome> {
    let pid = cx.gw.as_ref().map(Gateway::pid);
    let idle = pid.and_then(rss_kb).unwrap_or(0) as f64 / 1024.0;
    let watch = RssWatch::start(pid);
    let start = Instant::now();
    let resp = cx.post(chat("sse-no-newline", "", true)).await?;
    let status = resp.status().as_u16();
    let mut stream = resp.bytes_stream();
    let mut got = 0usize;
    let mut tail = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(15), async {
        use futures_util::StreamExt;
        while let Some(chunk) = stream.next().await {
            let Ok(c) = chunk else { break };
            got += c.len();
            tail.extend_from_slice(&c);
            let keep = tail.len().saturating_sub(4096);
            tail.drain(..keep);
        }
    })
    .await;
    let took = start.elapsed();
    let error_event = memchr::memmem::find(&tail, b"\"error\"").is_some();
    let peak = watch.peak_mib();
    let pass = read.is_ok() && error_event && peak - idle < 64.0;
    Ok(Outcome {
        case: "7 SSE line without newline (100 MB)",
        expected: "the stream ends early with an error event; gateway RSS grows < 64 MiB".into(),
        happened: format!(
            "status {status}; client got {:.1} MB in {:.1}s{}; error event: {}; RSS {idle:.0} → peak {peak:.0} MiB",
            got as f64 / 1e6,
            took.as_secs_f64(),
            if read.is_err() {
                " (cut at the 15 s bound)"
            } else {
                ""
            },
            if error_event { "yes" } else { "no" },
        ),
        pass: Some(pass),
    })
}

async fn v1_latency_ms(cx: &Ctx, n: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        let ok = if cx.gw.is_some() {
            cx.post(chat("plain", "", false)).await.is_ok()
        } else {
            let mut r = cx.client.get(format!("{}/v1/models", cx.base));
            if let Some(k) = &cx.key {
                r = r.bearer_auth(k);
            }
            r.send().await.is_ok()
        };
        if ok {
            out.push(start.elapsed().as_secs_f64() * 1e3);
        }
    }
    out
}

fn p50(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

async fn case_8(cx: &Ctx) -> anyhow::Result<Outcome> {
    let pid = cx.gw.as_ref().map(Gateway::pid);
    let idle = pid.and_then(rss_kb).unwrap_or(0) as f64 / 1024.0;
    let before = p50(v1_latency_ms(cx, 30).await);
    let watch = RssWatch::start(pid);
    let logins = (0..200).map(|i| {
        let client = cx.client.clone();
        let url = format!("{}/api/auth/login", cx.base);
        async move {
            let name = format!("flood-{i}-{:016x}", rand::random::<u64>());
            client
                .post(url)
                .json(&serde_json::json!({"username": name, "password": "wrong-password-123", "totp_code": ""}))
                .send()
                .await
                .map(|r| r.status().as_u16())
        }
    });
    let flood = tokio::spawn(futures_util::future::join_all(logins));
    let during = p50(v1_latency_ms(cx, 30).await);
    let statuses = tokio::time::timeout(Duration::from_secs(15), flood).await;
    let mut counts = std::collections::BTreeMap::<String, u32>::new();
    match &statuses {
        Ok(Ok(all)) => {
            for s in all {
                let k = s
                    .as_ref()
                    .map_or_else(|_| "error".to_owned(), u16::to_string);
                *counts.entry(k).or_default() += 1;
            }
        }
        _ => {
            counts.insert("unfinished after 15 s".into(), 200);
        }
    }
    let peak = watch.peak_mib();
    let rss_ok = pid.is_none() || peak - idle < 256.0;
    let latency_ok = during <= (before * 2.0).max(before + 5.0);
    Ok(Outcome {
        case: "8 200 concurrent anonymous logins",
        expected: "/v1 p50 at most 2× (or +5 ms) its idle value; RSS grows < 256 MiB; logins beyond the bound refused".into(),
        happened: format!(
            "/v1 p50 {before:.1} ms idle → {during:.1} ms during; RSS {idle:.0} → peak {peak:.0} MiB; login answers {counts:?}"
        ),
        pass: Some(statuses.is_ok() && rss_ok && latency_ok),
    })
}

/// An ordinary request right after `hostile` finished; how long until its usage record exists.
async fn probe_record_delay(cx: &Ctx) -> anyhow::Result<Duration> {
    let ok_before = cx.records(Some(200)).await?;
    let resp = cx.post(chat("plain", "", false)).await?;
    let _ = resp.bytes().await;
    let (n, waited) = cx
        .wait_records(Some(200), ok_before + 1, Duration::from_secs(6))
        .await?;
    Ok(if n > ok_before { waited } else { Duration::MAX })
}

fn fmt_delay(d: Duration) -> String {
    if d == Duration::MAX {
        "not written within 6 s".into()
    } else {
        format!("{:.2}s", d.as_secs_f64())
    }
}

async fn case_6(cx: &Ctx) -> anyhow::Result<Outcome> {
    let pid = cx.gw.as_ref().map(Gateway::pid);
    let idle = pid.and_then(rss_kb).unwrap_or(0) as f64 / 1024.0;
    let watch = RssWatch::start(pid);
    // 6a: a 16 MiB prompt (just under the default body limit), the client leaves after the
    // first event.
    let filler = "lorem ipsum ".repeat((16 * 1024 * 1024 - 4096) / 12);
    let body = chat("stall", "", true).replace("\"hello\"", &format!("\"{filler}\""));
    let mut left = "no answer".to_owned();
    if let Ok(Ok(resp)) = tokio::time::timeout(Duration::from_secs(10), cx.post(body)).await {
        left = format!("status {}", resp.status().as_u16());
        let mut s = resp.bytes_stream();
        use futures_util::StreamExt;
        let _ = tokio::time::timeout(Duration::from_secs(5), s.next()).await;
    }
    let delay_a = probe_record_delay(cx).await?;
    // 6b: 60 MB answered without usage.
    let big = tokio::time::timeout(Duration::from_secs(10), async {
        let r = cx.post(chat("no-usage-60mb", "", false)).await?;
        let status = r.status().as_u16();
        let n = r.bytes().await?.len();
        anyhow::Ok((status, n))
    })
    .await;
    let delay_b = probe_record_delay(cx).await?;
    let peak = watch.peak_mib();
    let bound = Duration::from_secs(2);
    Ok(Outcome {
        case: "6 16 MiB prompt + disconnect; 60 MB without usage",
        expected: "an ordinary request's usage record is written within 2 s after each; RSS grows < 512 MiB".into(),
        happened: format!(
            "6a ({left}, client left): next record after {}; 6b ({}): next record after {}; RSS {idle:.0} → peak {peak:.0} MiB",
            fmt_delay(delay_a),
            match &big {
                Ok(Ok((s, n))) => format!("status {s}, {:.0} MB", *n as f64 / 1e6),
                Ok(Err(e)) => format!("error {e}"),
                Err(_) => "cut at 10 s".into(),
            },
            fmt_delay(delay_b),
        ),
        pass: Some(delay_a <= bound && delay_b <= bound && peak - idle < 512.0),
    })
}

// ----------------------------------------------------------------------------------------------

fn main() -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("abuse: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("abuse: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()?;
    let tmp = tempfile::Builder::new()
        .prefix("tollgate-abuse-")
        .tempdir()?;
    let cx = match arg("--gateway") {
        Some(url) => {
            let u = url::Url::parse(&url).context("--gateway URL")?;
            ensure!(
                matches!(u.host_str(), Some("127.0.0.1" | "localhost" | "[::1]")),
                "--gateway must be on loopback"
            );
            Ctx {
                gw: None,
                base: url.trim_end_matches('/').to_owned(),
                key: arg("--key"),
                client,
            }
        }
        None => {
            let upstream = start_upstream().await?;
            let gw = Gateway::start(tmp.path(), &format!("http://{upstream}/v1")).await?;
            Ctx {
                base: format!("http://{}", gw.addr),
                key: Some(gw.fixture.key_secret.clone()),
                gw: Some(gw),
                client,
            }
        }
    };
    println!("abuse replay (issue 18) against {}", cx.base);
    let deadline = Instant::now() + TOTAL_BUDGET;
    let mut out: Vec<Outcome> = Vec::new();
    type Case = for<'a> fn(
        &'a Ctx,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = anyhow::Result<Outcome>> + 'a>,
    >;
    let cases: [(&str, bool, Case); 5] = [
        ("1", true, |cx| Box::pin(case_1(cx))),
        ("2", true, |cx| Box::pin(case_2(cx))),
        ("7", true, |cx| Box::pin(case_7(cx))),
        ("8", false, |cx| Box::pin(case_8(cx))),
        ("6", true, |cx| Box::pin(case_6(cx))),
    ];
    for (name, needs_own, case) in cases {
        let left = deadline.saturating_duration_since(Instant::now());
        let outcome = if needs_own && cx.gw.is_none() {
            skipped(
                name,
                "needs the harness's own gateway and upstream (run without --gateway)",
            )
        } else if left.is_zero() {
            skipped(name, "the 60 s budget is spent")
        } else {
            match tokio::time::timeout(left, case(&cx)).await {
                Ok(Ok(o)) => o,
                Ok(Err(e)) => Outcome {
                    case: leak(format!("{name} (harness error)")),
                    expected: "the case runs".into(),
                    happened: format!("{e:#}"),
                    pass: Some(false),
                },
                Err(_) => Outcome {
                    case: leak(format!("{name} (cut)")),
                    expected: "the case ends within the budget".into(),
                    happened: "cut at the 60 s budget".into(),
                    pass: Some(false),
                },
            }
        };
        print_outcome(&outcome);
        out.push(outcome);
    }
    let passed = out.iter().filter(|o| o.pass == Some(true)).count();
    let failed = out.iter().filter(|o| o.pass == Some(false)).count();
    let skipped = out.len() - passed - failed;
    println!("\nabuse: {passed} passed, {failed} failed, {skipped} skipped");
    Ok(())
}

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

fn skipped(name: &str, why: &str) -> Outcome {
    Outcome {
        case: leak(format!("case {name}")),
        expected: "-".into(),
        happened: why.into(),
        pass: None,
    }
}

fn print_outcome(o: &Outcome) {
    let verdict = match o.pass {
        Some(true) => "PASS",
        Some(false) => "FAIL",
        None => "SKIP",
    };
    println!("\n[{verdict}] case {}", o.case);
    println!("  expected: {}", o.expected);
    println!("  happened: {}", o.happened);
}
