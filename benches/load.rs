//! End-to-end load harness: the same client load against a fixed-response upstream directly,
//! through a bare reverse-proxy hop (nginx, else a minimal hyper pass-through), and through
//! tollgate with every hot-path stage switched on; one table of throughput, latency, CPU per
//! request and memory, plus a check that every request tollgate forwarded became a usage record.
//!
//! `cargo bench --bench load` (release profile). Needs `wrk`; nginx optional (Debian packages
//! `wrk`, `nginx-light`). Loopback only; the output also goes to `benches/results/latest.txt`.
//! Environment: `LOAD_SECS` (per run, default 10), `LOAD_CONNECTIONS` (default 32),
//! `LOAD_NGINX` (an nginx binary; `none` for the hyper pass-through), `LOAD_WRK` (a wrk binary),
//! `LOAD_TOLLGATE_BIN` (another tollgate binary to measure), `LOAD_BASELINE_BIN` (a second build
//! measured in the same run, e.g. the previous commit's), `LOAD_BILLING=0` (no key budget,
//! balance enforcement off: no reservations), `LOAD_MODES` (`non-stream`, `stream`, or both,
//! comma-separated; the default is both), `LOAD_PATHS` (only the other paths whose name contains
//! one of these, comma-separated: e.g. `retries` or `responses,anthropic`).
//! `--quick`: the fixed-upstream set alone with short runs (≤ 2 minutes once built).
//! `--soak` (or `LOAD_SOAK_SECS`) instead runs tollgate alone at a fixed rate
//! (`LOAD_SOAK_RPS`, default 200) and samples its memory every 10 s.

mod common;

use std::cell::Cell;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use bytes::Bytes;
use entity::usage_records;
use http::{Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use sea_orm::{ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter, QuerySelect};
use tokio::net::TcpListener;
use tokio::runtime::Runtime;
use tollgate::crypto::{KeyRing, generate_master_key, parse_master_key};
use tollgate::store;

use common::{Fixture, MODEL, UPSTREAM_MODEL};

/// Linux reports process CPU time in ticks of 1/100 s (USER_HZ) on every architecture.
const US_PER_TICK: u64 = 10_000;
const WARMUP_SECS: u64 = 1;
/// Single-connection rounds per target and mode; together they last about `LOAD_SECS`.
const SINGLE_ROUNDS: u64 = 5;

fn single_round_secs(secs: u64) -> u64 {
    (secs / SINGLE_ROUNDS).max(1)
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("load: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn env_u64(name: &str, default: u64) -> anyhow::Result<u64> {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v
            .trim()
            .parse()
            .with_context(|| format!("{name}={v:?} is not a whole number")),
        _ => Ok(default),
    }
}

/// What the run prints, kept for `benches/results/latest.txt`.
#[derive(Default)]
struct Log {
    text: String,
    raw: String,
}

impl Log {
    fn say(&mut self, line: impl AsRef<str>) {
        println!("{}", line.as_ref());
        self.text.push_str(line.as_ref());
        self.text.push('\n');
    }

    fn raw(&mut self, title: &str, output: &str) {
        let _ = writeln!(self.raw, "---- {title}\n{}", output.trim_end());
    }

    fn save(&self) -> anyhow::Result<PathBuf> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/results");
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("latest.txt");
        let body = format!(
            "{}\n==== raw wrk output, in run order ====\n{}",
            self.text, self.raw
        );
        std::fs::write(&path, body)?;
        Ok(path)
    }
}

fn run() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{}", HELP);
        return Ok(());
    }
    let soak = args.iter().any(|a| a == "--soak") || std::env::var_os("LOAD_SOAK_SECS").is_some();
    // --quick: the fixed-upstream set alone, short runs, no extra paths (a check before stopping).
    let quick = args.iter().any(|a| a == "--quick");
    let secs = env_u64("LOAD_SECS", if quick { 3 } else { 10 })?.max(1);
    let conns = env_u64("LOAD_CONNECTIONS", 32)?.max(1);
    let modes = modes_from_env()?;
    let wrk = find_program("wrk", "LOAD_WRK", &[]).context(
        "wrk is not installed (Debian/Ubuntu: `apt-get install -y wrk`); it drives the load",
    )?;

    let tmp = tempfile::Builder::new()
        .prefix("tollgate-load-")
        .tempdir()?;
    let ctl = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut log = Log::default();

    // (a) the upstream.
    let upstream = Upstream::start()?;
    let up_url = format!("http://{}/v1/chat/completions", upstream.addr);

    // (c) tollgate, as the real binary in a child process, on a database prepared here.
    let billing = env_u64("LOAD_BILLING", 1)? != 0;
    let tg = Tollgate::start(
        &ctl,
        tmp.path(),
        "tollgate",
        &format!("http://{}/v1", upstream.addr),
        billing,
    )?;
    let tg_url = format!("http://{}/v1/chat/completions", tg.addr);

    // (d) optionally, another build of tollgate with an upstream of its own (so each upstream
    // counts one gateway's requests), measured in the same run.
    let baseline = match std::env::var_os("LOAD_BASELINE_BIN") {
        Some(bin) if !soak && !quick => {
            let up = Upstream::start()?;
            let base = Tollgate::start_bin(
                &ctl,
                tmp.path(),
                "baseline",
                PathBuf::from(bin),
                true,
                &format!("http://{}/v1", up.addr),
                billing,
            )?;
            Some((up, base))
        }
        _ => None,
    };
    let base_url = baseline
        .as_ref()
        .map(|(_, b)| format!("http://{}/v1/chat/completions", b.addr));

    let plain = tmp.path().join("body-plain.json");
    let stream = tmp.path().join("body-stream.json");
    std::fs::write(&plain, common::chat_body(false))?;
    std::fs::write(&stream, common::chat_body(true))?;
    let key = tg.fixture.key_secret.clone();
    let client = reqwest::Client::new();
    ctl.block_on(sanity(&client, &tg_url, &key, true))
        .context("tollgate does not answer as expected")?;
    if let (Some((_, b)), Some(url)) = (&baseline, &base_url) {
        ctl.block_on(sanity(&client, url, &b.fixture.key_secret, true))
            .context("the baseline tollgate does not answer as expected")?;
    }
    if tg.translated {
        ctl.block_on(sanity_translated(&client, &tg))
            .context("tollgate's translated paths do not answer as expected")?;
    }
    // The sanity requests above went through tollgate too.
    let sanity_requests = if tg.translated { 4u64 } else { 2 };

    if soak {
        return run_soak(
            &mut log,
            &ctl,
            &wrk,
            tmp.path(),
            &tg,
            &upstream,
            &plain,
            &stream,
            sanity_requests,
        );
    }

    // (b) the reference hop.
    let reference = Reference::start(tmp.path(), "nginx", upstream.addr)?;
    let ref_url = format!("http://{}/v1/chat/completions", reference.addr());
    ctl.block_on(sanity(&client, &up_url, &key, false))
        .context("the upstream does not answer as expected")?;
    ctl.block_on(sanity(&client, &ref_url, &key, false))
        .context("the reference proxy does not answer as expected")?;

    // (e) the fixed-answer set: nginx `return 200` as the upstream, a hop and a tollgate to it.
    let fixed = match find_nginx() {
        Some(bin) => {
            let upstream = FixedUpstream::start(&bin, tmp.path())?;
            let reference = start_nginx(&bin, tmp.path(), "nginx-fixed-hop", upstream.addr)?;
            let tollgate = Tollgate::start(
                &ctl,
                tmp.path(),
                "tollgate-fixed",
                &format!("http://{}/v1", upstream.addr),
                billing,
            )?;
            Some(FixedSet {
                upstream,
                reference,
                tollgate,
            })
        }
        None => {
            eprintln!("load: nginx not found: the fixed-upstream set is not measured");
            None
        }
    };
    ensure!(
        !quick || fixed.is_some(),
        "--quick measures against the fixed nginx upstream: install nginx (apt-get install -y nginx-light)"
    );

    let rss_idle = vm_kb(tg.pid(), "VmRSS");
    describe_setup(&mut log, &wrk, secs, conns, &reference, &tg);
    if let Some(f) = &fixed {
        log.say(format!(
            "fixed-upstream set: upstream {}; hop: the same nginx configuration as the reference, to it; tollgate: a second instance, set up as the first, its provider at the fixed upstream",
            f.upstream.describe()
        ));
    }
    if quick {
        log.say("--quick: the fixed-upstream set only, short runs, no extra paths");
    }

    let tg_answered = Cell::new(0u64);
    let rss_peak = Cell::new(0u64);
    let mut rows: Vec<Row> = Vec::new();
    for mode in [Mode::Plain, Mode::Stream] {
        if !modes.contains(&mode) || quick {
            continue;
        }
        let body = if mode == Mode::Stream {
            &stream
        } else {
            &plain
        };
        let script = write_script(tmp.path(), mode.name(), body, &key)?;
        let mut endpoints = vec![
            Endpoint {
                target: Target::Direct,
                url: up_url.clone(),
                script: script.clone(),
                cpu: Box::new(|| upstream.cpu_ticks()),
                answered: None,
                rss: None,
            },
            Endpoint {
                target: Target::Reference,
                url: ref_url.clone(),
                script: script.clone(),
                cpu: Box::new(|| reference.cpu_ticks()),
                answered: None,
                rss: None,
            },
            Endpoint {
                target: Target::Tollgate,
                url: tg_url.clone(),
                script: script.clone(),
                cpu: Box::new(|| proc_cpu_ticks(tg.pid()).unwrap_or(0)),
                answered: Some(&tg_answered),
                rss: Some((tg.pid(), &rss_peak)),
            },
        ];
        if let (Some((_, b)), Some(url)) = (&baseline, &base_url) {
            endpoints.push(Endpoint {
                target: Target::Baseline,
                url: url.clone(),
                script: write_script(
                    tmp.path(),
                    &format!("{}-baseline", mode.name()),
                    body,
                    &b.fixture.key_secret,
                )?,
                cpu: Box::new(move || proc_cpu_ticks(b.pid()).unwrap_or(0)),
                answered: None,
                rss: None,
            });
        }
        rows.extend(measure_set(
            &mut log,
            &wrk,
            Set::Harness,
            mode,
            &endpoints,
            &|| upstream.cpu_ticks(),
            secs,
            conns,
        )?);
    }
    let mut tollgate_answered = tg_answered.get();

    // The same against the fixed-answer nginx upstream (issue 24's stricter reference): nginx
    // answering with `return 200`, an nginx hop to it, and a second tollgate whose provider
    // points at it. Its own database, so its usage check is its own.
    let fixed_answered = Cell::new(0u64);
    let fixed_rss = Cell::new(0u64);
    let fixed_set = match &fixed {
        Some(f) => {
            for mode in modes.iter().copied() {
                f.upstream.serve(mode)?;
                let body = if mode == Mode::Stream {
                    &stream
                } else {
                    &plain
                };
                let script = write_script(
                    tmp.path(),
                    &format!("{}-fixed", mode.name()),
                    body,
                    &f.tollgate.fixture.key_secret,
                )?;
                let (up, hop, tgf) = (
                    format!("http://{}/v1/chat/completions", f.upstream.addr),
                    format!("http://{}/v1/chat/completions", f.reference.addr()),
                    format!("http://{}/v1/chat/completions", f.tollgate.addr),
                );
                ctl.block_on(sanity_mode(&client, &up, &key, false, mode))
                    .context("the fixed upstream does not answer as expected")?;
                ctl.block_on(sanity_mode(&client, &hop, &key, false, mode))
                    .context("the hop to the fixed upstream does not answer as expected")?;
                ctl.block_on(sanity_mode(
                    &client,
                    &tgf,
                    &f.tollgate.fixture.key_secret,
                    true,
                    mode,
                ))
                .context("tollgate on the fixed upstream does not answer as expected")?;
                fixed_answered.set(fixed_answered.get() + 1);
                let endpoints = [
                    Endpoint {
                        target: Target::Direct,
                        url: up,
                        script: script.clone(),
                        cpu: Box::new(|| f.upstream.cpu_ticks()),
                        answered: None,
                        rss: None,
                    },
                    Endpoint {
                        target: Target::Reference,
                        url: hop,
                        script: script.clone(),
                        cpu: Box::new(|| f.reference.cpu_ticks()),
                        answered: None,
                        rss: None,
                    },
                    Endpoint {
                        target: Target::Tollgate,
                        url: tgf,
                        script: script.clone(),
                        cpu: Box::new(|| proc_cpu_ticks(f.tollgate.pid()).unwrap_or(0)),
                        answered: Some(&fixed_answered),
                        rss: Some((f.tollgate.pid(), &fixed_rss)),
                    },
                ];
                rows.extend(measure_set(
                    &mut log,
                    &wrk,
                    Set::Fixed,
                    mode,
                    &endpoints,
                    &|| f.upstream.cpu_ticks(),
                    secs,
                    conns,
                )?);
            }
            true
        }
        None => false,
    };
    let rss_hwm = vm_kb(tg.pid(), "VmHWM");

    // The other paths, tollgate alone (nginx cannot translate, keep state or retry), each
    // against the reference hop's pass-through throughput of the same mode in this run: the
    // translated protocols (OpenAI chat to the `anthropic` provider, Anthropic Messages to the
    // `openai` one), the Responses API translated to chat completions with and without `store`,
    // a model with one of its two deployments failing half its requests (retries on), and the
    // signed-in chat (`/api/chat/stream`, stream mode only: it always streams).
    let mut translated: Vec<Translated> = Vec::new();
    let mut translated_runs = 0u64;
    if tg.translated && !quick {
        let token = tg.chat_token.clone().unwrap_or_default();
        for mode in modes.iter().copied() {
            let stream = mode == Mode::Stream;
            let mut lines = vec![
                (
                    "chat → anthropic",
                    "v1/chat/completions",
                    common::chat_body_for(common::ANTHROPIC_MODEL, stream),
                    key.as_str(),
                    Some(TARGET_TRANSLATED),
                    None,
                ),
                (
                    "messages → openai",
                    "v1/messages",
                    common::messages_body(MODEL, stream),
                    key.as_str(),
                    Some(TARGET_TRANSLATED),
                    None,
                ),
                (
                    "responses, store off",
                    "v1/responses",
                    common::responses_body(MODEL, stream, false),
                    key.as_str(),
                    Some(TARGET_TRANSLATED),
                    None,
                ),
                (
                    "responses, store on",
                    "v1/responses",
                    common::responses_body(MODEL, stream, true),
                    key.as_str(),
                    None,
                    None,
                ),
                (
                    "retries, 1/2 failing",
                    "v1/chat/completions",
                    common::chat_body_for(common::FLAKY_MODEL, stream),
                    key.as_str(),
                    None,
                    None,
                ),
            ];
            if stream {
                lines.push((
                    "/api/chat/stream",
                    "api/chat/stream",
                    common::chat_ui_body(MODEL),
                    token.as_str(),
                    None,
                    None,
                ));
            } else {
                // The response cache (non-stream only): after the first request every one is a
                // hit answered from memory, which should beat the hop to the upstream (issue 21).
                lines.push((
                    "cache hits",
                    "v1/chat/completions",
                    common::chat_body_for(MODEL, false),
                    key.as_str(),
                    Some(TARGET_CACHE_HIT),
                    Some(("x-tollgate-cache-ttl", "3600")),
                ));
            }
            // `LOAD_PATHS`: only the lines whose name contains one of these (comma-separated).
            let only: Vec<String> = std::env::var("LOAD_PATHS")
                .unwrap_or_default()
                .split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(str::to_owned)
                .collect();
            for (i, (name, path, body, auth, goal, extra)) in lines.into_iter().enumerate() {
                if !only.is_empty() && !only.iter().any(|p| name.contains(p.as_str())) {
                    continue;
                }
                let body_path = tmp
                    .path()
                    .join(format!("body-path-{}-{i}.json", mode.name()));
                std::fs::write(&body_path, &body)?;
                let extra: Vec<(&str, &str)> = extra.into_iter().collect();
                let script = write_script_with(
                    tmp.path(),
                    &format!("path-{}-{i}", mode.name()),
                    &body_path,
                    auth,
                    &extra,
                )?;
                let url = format!("http://{}/{path}", tg.addr);
                eprintln!("load: {} / {name} …", mode.name());
                // One request first, read to the end: a path that refuses is an error here,
                // not a line of fast non-2xx answers.
                let first = ctl.block_on(async {
                    // A connection of its own: the shared client's pooled ones may have been
                    // closed by tollgate's idle timeout while this runtime was not driven.
                    let mut req = reqwest::Client::builder()
                        .pool_max_idle_per_host(0)
                        .build()?
                        .post(&url)
                        .bearer_auth(auth)
                        .header(header::CONTENT_TYPE, "application/json")
                        .body(body.clone());
                    for (n, v) in &extra {
                        req = req.header(*n, *v);
                    }
                    let r = req.send().await?;
                    let status = r.status();
                    anyhow::Ok((status, r.text().await?))
                })?;
                ensure!(
                    first.0 == StatusCode::OK,
                    "{} {name}: {}: {}",
                    mode.name(),
                    first.0,
                    first.1
                );
                tollgate_answered += 1;
                let warm = wrk_run(&wrk, &url, &script, conns.min(2), conns, WARMUP_SECS)?;
                let cpu0 = proc_cpu_ticks(tg.pid()).unwrap_or(0);
                let load = wrk_run(&wrk, &url, &script, conns.min(2), conns, secs)?;
                let cpu1 = proc_cpu_ticks(tg.pid()).unwrap_or(0);
                log.raw(
                    &format!("{} {name} {conns} connections", mode.name()),
                    &load.raw,
                );
                tollgate_answered += warm.requests + load.requests;
                translated_runs += 2;
                let cpu_us = (load.requests > 0).then(|| {
                    (cpu1.saturating_sub(cpu0) * US_PER_TICK) as f64 / load.requests as f64
                });
                translated.push(Translated {
                    mode,
                    name,
                    load,
                    cpu_us,
                    goal,
                });
            }
        }
    }

    // Every request tollgate forwarded must become a usage record: wait for the writer.
    let after_wrk = ctl.block_on(tg.wait_for_records(upstream.via_gateway()))?;
    // Then an exact check with a client that waits for every answer.
    let exact = ctl.block_on(exact_metering(&client, &tg, &tg_url, &after_wrk))?;
    std::thread::sleep(Duration::from_secs(2));
    let rss_after = vm_kb(tg.pid(), "VmRSS");
    // The fixed set's tollgate: every answered request metered, none estimated.
    let fixed_check = match &fixed {
        Some(f) if fixed_set => {
            let want = fixed_answered.get();
            let r = ctl.block_on(f.tollgate.wait_for_records(want))?;
            let runs = 2 * (2 + SINGLE_ROUNDS);
            let ok = r.ok >= want && r.total - want <= runs * conns && r.estimated_ok == 0;
            Some((r, want, ok))
        }
        _ => None,
    };

    table(&mut log, &rows);
    translated_table(&mut log, &rows, &translated);
    log.say("");
    let answered = tollgate_answered + sanity_requests;
    // Per mode: the warm-up, the loaded run and every single-connection round; then the
    // translated paths' warm-ups and loaded runs.
    let tollgate_runs = 2 * (2 + SINGLE_ROUNDS) + translated_runs;
    let wrk_ok = after_wrk.total >= after_wrk.upstream
        && after_wrk.ok >= answered
        && after_wrk.total - answered <= tollgate_runs * conns
        && after_wrk.estimated_ok == 0;
    log.say(format!(
        "usage records after the wrk runs: {} — tollgate answered {answered} requests completely (wrk + 2 sanity checks) and sent {} upstream; by status {} × 200, {} × 499, {} other; {} answered with usage yet estimated (want 0) — {}",
        after_wrk.total,
        after_wrk.upstream,
        after_wrk.ok,
        after_wrk.client_left,
        after_wrk.total - after_wrk.ok - after_wrk.client_left,
        after_wrk.estimated_ok,
        if wrk_ok { "consistent" } else { "INCONSISTENT" },
    ));
    log.say(format!(
        "    (wrk drops the requests in flight when a run's time is up — at most {conns} per run, {tollgate_runs} runs — and tollgate meters those as 499 or as a 200 wrk never read, so records ≥ answered, not =)"
    ));
    log.say(format!(
        "usage records, exact check: {} requests answered by tollgate ({} concurrent, half streamed, every answer read to the end) → {} new records, {} with status 200 and the upstream's usage — {}",
        exact.sent,
        EXACT_CONCURRENCY,
        exact.records,
        exact.ok_with_usage,
        if exact.passed() { "equal" } else { "MISMATCH" },
    ));
    log.say(format!(
        "tollgate RSS (child process alone): idle after start {}, peak under load {} (VmHWM {}), idle after load {}",
        mib(rss_idle),
        mib(Some(rss_peak.get())),
        mib(rss_hwm),
        mib(rss_after)
    ));
    let mut fixed_ok = true;
    if let Some((r, want, ok)) = &fixed_check {
        fixed_ok = *ok;
        log.say(format!(
            "fixed set's tollgate: {} usage records for {want} complete answers ({} × 200, {} estimated), peak RSS under load {} — {}",
            r.total,
            r.ok,
            r.estimated_ok,
            mib(Some(fixed_rss.get())),
            if *ok { "consistent" } else { "INCONSISTENT" }
        ));
    }
    log.say(format!("load average at end: {}", loadavg()));
    drop(reference);
    tg.stop();
    if let Some((_, b)) = baseline {
        b.stop();
    }
    let path = log.save()?;
    println!("\nwritten to {}", path.display());
    ensure!(
        wrk_ok && exact.passed() && fixed_ok,
        "usage metering check failed (see above)"
    );
    Ok(())
}

/// One target of a measured set: where wrk sends, with which script, and whose CPU counts.
struct Endpoint<'a> {
    target: Target,
    url: String,
    script: PathBuf,
    /// CPU ticks of the process that serves this target (the upstream's for `direct`).
    cpu: Box<dyn Fn() -> u64 + 'a>,
    /// Requests wrk saw answered here are added to this count (a tollgate's usage check).
    answered: Option<&'a Cell<u64>>,
    /// A process whose RSS is sampled during the loaded run, and the peak seen so far.
    rss: Option<(u32, &'a Cell<u64>)>,
}

/// One mode of one set: a warm-up and a loaded run per target, then the single-connection
/// rounds with the targets taking turns, so a neighbour's burst lands on all of them.
#[allow(clippy::too_many_arguments)]
fn measure_set(
    log: &mut Log,
    wrk: &Path,
    set: Set,
    mode: Mode,
    endpoints: &[Endpoint<'_>],
    upstream_cpu: &dyn Fn() -> u64,
    secs: u64,
    conns: u64,
) -> anyhow::Result<Vec<Row>> {
    let label = |e: &Endpoint<'_>| format!("{} {} {}", set.name(), mode.name(), e.target.name());
    let count = |e: &Endpoint<'_>, n: u64| {
        if let Some(c) = e.answered {
            c.set(c.get() + n);
        }
    };
    let mut rows = Vec::new();
    for e in endpoints {
        eprintln!("load: {} …", label(e));
        let warm = wrk_run(wrk, &e.url, &e.script, conns.min(2), conns, WARMUP_SECS)?;
        log.raw(&format!("{} warm-up", label(e)), &warm.raw);
        let (up0, cpu0) = (upstream_cpu(), (e.cpu)());
        let sampler = e.rss.map(|(pid, _)| RssSampler::start(pid));
        let load = wrk_run(wrk, &e.url, &e.script, conns.min(2), conns, secs)?;
        if let (Some(s), Some((_, peak))) = (sampler, e.rss) {
            peak.set(peak.get().max(s.stop()));
        }
        let (up1, cpu1) = (upstream_cpu(), (e.cpu)());
        log.raw(&format!("{} {conns} connections", label(e)), &load.raw);
        count(e, warm.requests + load.requests);
        let n = load.requests;
        let per_req =
            |a: u64, b: u64| (n > 0).then(|| (b.saturating_sub(a) * US_PER_TICK) as f64 / n as f64);
        rows.push(Row {
            set,
            mode,
            target: e.target,
            cpu_us: per_req(cpu0, cpu1),
            upstream_cpu_us: per_req(up0, up1),
            load,
            singles: Vec::new(),
            pairs: Vec::new(),
        });
    }
    ab_pairs(wrk, endpoints, &mut rows, secs, conns, &label, &count)?;
    let round_secs = single_round_secs(secs);
    for round in 1..=SINGLE_ROUNDS {
        for (e, row) in endpoints.iter().zip(rows.iter_mut()) {
            eprintln!(
                "load: {} 1 connection, round {round}/{SINGLE_ROUNDS} …",
                label(e)
            );
            let single = wrk_run(wrk, &e.url, &e.script, 1, 1, round_secs)?;
            log.raw(
                &format!("{} 1 connection, round {round}/{SINGLE_ROUNDS}", label(e)),
                &single.raw,
            );
            count(e, single.requests);
            row.singles.push(single);
        }
    }
    Ok(rows)
}

/// `LOAD_AB_PAIRS` (default 4; 0 turns it off): with a baseline build, that many more loaded runs
/// of tollgate and of the baseline, taking turns (the order swapped every pair, so a drift of the
/// machine cannot favour one), each pair giving its own ratio. Their median is steadier than the
/// ratio of one run of each, which a noisy neighbour can move by 20%.
fn ab_pairs(
    wrk: &Path,
    endpoints: &[Endpoint<'_>],
    rows: &mut [Row],
    secs: u64,
    conns: u64,
    label: &dyn Fn(&Endpoint<'_>) -> String,
    count: &dyn Fn(&Endpoint<'_>, u64),
) -> anyhow::Result<()> {
    let pairs = env_u64("LOAD_AB_PAIRS", 4)?;
    let find = |t: Target| endpoints.iter().position(|e| e.target == t);
    let (Some(ti), Some(bi)) = (find(Target::Tollgate), find(Target::Baseline)) else {
        return Ok(());
    };
    for pair in 1..=pairs {
        let order = if pair % 2 == 1 { [ti, bi] } else { [bi, ti] };
        let mut got = [(0.0, None); 2];
        for i in order {
            let e = &endpoints[i];
            eprintln!("load: {} A/B pair {pair}/{pairs} …", label(e));
            let cpu0 = (e.cpu)();
            let load = wrk_run(wrk, &e.url, &e.script, conns.min(2), conns, secs)?;
            let cpu1 = (e.cpu)();
            count(e, load.requests);
            let n = load.requests;
            let cpu = (n > 0).then(|| (cpu1.saturating_sub(cpu0) * US_PER_TICK) as f64 / n as f64);
            got[usize::from(i == bi)] = (load.rps(), cpu);
        }
        let [(t_rps, t_cpu), (b_rps, b_cpu)] = got;
        rows[ti].pairs.push((
            if b_rps > 0.0 { t_rps / b_rps } else { 0.0 },
            t_cpu
                .zip(b_cpu)
                .filter(|(_, b)| *b > 0.0)
                .map(|(t, b)| t / b),
        ));
    }
    Ok(())
}

/// One extra path's loaded run (translated, Responses, retries, chat).
struct Translated {
    mode: Mode,
    name: &'static str,
    load: WrkResult,
    cpu_us: Option<f64>,
    /// Its goal: throughput at least this × the reference hop's, where an issue sets one.
    goal: Option<f64>,
}

/// The translated paths' goal: throughput at least this × the reference hop's (issue 20).
const TARGET_TRANSLATED: f64 = 0.6;
/// A response-cache hit's goal: faster than the reference hop's pass-through (issue 21).
const TARGET_CACHE_HIT: f64 = 1.0;

/// The extra paths beside the pass-through and the reference hop of the same mode.
fn translated_table(log: &mut Log, rows: &[Row], lines: &[Translated]) {
    if lines.is_empty() {
        return;
    }
    log.say("");
    log.say(
        "other paths (tollgate alone against the harness upstream, which answers in each provider's own shapes; goal where an issue sets one: throughput ≥ that × the reference hop's pass-through)",
    );
    log.say(format!(
        "{:<11} {:<22} {:>9} {:>9} {:>9} {:>8} {:>16} {:>13} {:>8}",
        "mode",
        "path",
        "req/s",
        "p50",
        "p99",
        "CPU/req",
        "÷ reference",
        "÷ pass-through",
        "non-2xx"
    ));
    for t in lines {
        let of = |target: Target| {
            rows.iter()
                .find(|r| r.set == Set::Harness && r.mode == t.mode && r.target == target)
                .map(|r| r.load.rps())
                .filter(|rps| *rps > 0.0)
                .map(|rps| t.load.rps() / rps)
        };
        let vs_ref = of(Target::Reference).map_or_else(
            || "-".into(),
            |r| match t.goal {
                Some(g) if r >= g => format!("{r:.2} ≥{g} met"),
                Some(g) => format!("{r:.2} ≥{g} NOT"),
                None => format!("{r:.2}"),
            },
        );
        log.say(format!(
            "{:<11} {:<22} {:>9.0} {:>7.0}µs {:>7.0}µs {:>6}µs {:>16} {:>13} {:>8}",
            t.mode.name(),
            t.name,
            t.load.rps(),
            t.load.p50_us,
            t.load.p99_us,
            t.cpu_us.map_or_else(|| "-".into(), |c| format!("{c:.0}")),
            vs_ref,
            of(Target::Tollgate).map_or_else(|| "-".into(), |r| format!("{r:.2}")),
            t.load.non2xx + t.load.sock_errors,
        ));
    }
}

/// Requests of the exact metering check, and how many are in flight at once.
const EXACT_REQUESTS: u64 = 1000;
const EXACT_CONCURRENCY: usize = 16;

struct Exact {
    sent: u64,
    records: u64,
    ok_with_usage: u64,
}

impl Exact {
    fn passed(&self) -> bool {
        self.records == self.sent && self.ok_with_usage == self.sent
    }
}

/// Sends [`EXACT_REQUESTS`] requests (half streamed), reads every answer to the end, and counts
/// the usage records that appear on top of `before` (a settled count).
async fn exact_metering(
    client: &reqwest::Client,
    tg: &Tollgate,
    url: &str,
    before: &Records,
) -> anyhow::Result<Exact> {
    use futures_util::StreamExt;
    let key = &tg.fixture.key_secret;
    let results: Vec<anyhow::Result<()>> = futures_util::stream::iter(0..EXACT_REQUESTS)
        .map(|i| async move {
            let r = client
                .post(url)
                .bearer_auth(key)
                .header(header::CONTENT_TYPE, "application/json")
                .body(common::chat_body(i % 2 == 1))
                .send()
                .await?;
            ensure!(r.status() == StatusCode::OK, "status {}", r.status());
            r.bytes().await?;
            Ok(())
        })
        .buffer_unordered(EXACT_CONCURRENCY)
        .collect()
        .await;
    let failed: Vec<String> = results
        .into_iter()
        .filter_map(|r| r.err().map(|e| e.to_string()))
        .collect();
    ensure!(
        failed.is_empty(),
        "{} of the exact check's requests failed, e.g. {}",
        failed.len(),
        failed[0]
    );
    let after = tg.wait_for_records(before.total + EXACT_REQUESTS).await?;
    Ok(Exact {
        sent: EXACT_REQUESTS,
        records: after.total - before.total,
        ok_with_usage: after.ok_with_usage - before.ok_with_usage,
    })
}

const HELP: &str = "cargo bench --bench load [-- --quick | --soak]

Drives direct / reference (nginx) / tollgate with wrk, twice: in front of the harness's own
hyper upstream and in front of a fixed-answer nginx upstream (`return 200`); then the other paths
(translated, Responses with and without store, retries, chat); prints the comparison tables and
writes them, with every raw wrk report, to benches/results/latest.txt.

  --quick               the fixed-upstream set only, LOAD_SECS=3, no extra paths: the ratios in
                        about a minute and a half (a check before you stop)

  LOAD_SECS=10          seconds per loaded run, and for each target's single-connection rounds together
                        (3 targets × 2 modes, plus 1 s warm-ups)
  LOAD_CONNECTIONS=32   connections of the loaded runs
  LOAD_NGINX=PATH       nginx binary (default: nginx on PATH, /usr/sbin/nginx); `none` uses
                        the hyper pass-through as the reference instead
  LOAD_WRK=PATH         wrk binary (default: wrk on PATH)
  LOAD_TOLLGATE_BIN=P   tollgate binary to measure (default: the one cargo built)
  LOAD_BASELINE_BIN=P   another tollgate build (e.g. the previous commit's) measured in the same
                        run, on its own database and upstream: adds tollgate ÷ baseline ratios
  LOAD_AB_PAIRS=4       with a baseline: that many more loaded runs of each, taking turns; prints
                        each pair's ratio and their median (0: none)
  LOAD_BILLING=0        no key budget, balance enforcement off (no reservations)
  LOAD_MODES=stream     only these modes (comma-separated: non-stream, stream; default both)
  LOAD_PATHS=retries    only the other paths whose name contains one of these (comma-separated)
  --soak, LOAD_SOAK_SECS=300, LOAD_SOAK_RPS=200
                        tollgate alone at a fixed rate, memory sampled every 10 s";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Plain,
    Stream,
}

/// `LOAD_MODES`: the modes to run (both when unset or empty); an unknown name is an error
/// rather than a run that measures nothing.
fn modes_from_env() -> anyhow::Result<Vec<Mode>> {
    let all = [Mode::Plain, Mode::Stream];
    let raw = std::env::var("LOAD_MODES").unwrap_or_default();
    if raw.trim().is_empty() {
        return Ok(all.to_vec());
    }
    let mut modes = Vec::new();
    for name in raw.split(',').map(str::trim) {
        let Some(mode) = all.into_iter().find(|m| m.name() == name) else {
            bail!("LOAD_MODES: unknown mode {name:?} (the modes are non-stream and stream)");
        };
        if !modes.contains(&mode) {
            modes.push(mode);
        }
    }
    Ok(modes)
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Plain => "non-stream",
            Mode::Stream => "stream",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Direct,
    Reference,
    Tollgate,
    /// `LOAD_BASELINE_BIN`: another tollgate build (e.g. the previous commit's), in the same run.
    Baseline,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Direct => "direct",
            Target::Reference => "reference",
            Target::Tollgate => "tollgate",
            Target::Baseline => "baseline",
        }
    }
}

/// Which upstream a row's targets stand in front of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Set {
    /// The hyper upstream inside the harness (it shares the CPUs with the targets).
    Harness,
    /// nginx answering with `return 200 '…'`: the physical floor (issue 24).
    Fixed,
}

impl Set {
    fn name(self) -> &'static str {
        match self {
            Set::Harness => "harness-upstream",
            Set::Fixed => "fixed-upstream",
        }
    }

    /// The goals tollgate ÷ the reference hop, per set: throughput at least, p50@1 at most.
    fn targets(self) -> (f64, f64) {
        match self {
            Set::Harness => (TARGET_THROUGHPUT, TARGET_SINGLE_P50),
            Set::Fixed => (TARGET_THROUGHPUT_FIXED, TARGET_SINGLE_P50),
        }
    }
}

struct Row {
    set: Set,
    mode: Mode,
    target: Target,
    load: WrkResult,
    /// The single-connection rounds, in order.
    singles: Vec<WrkResult>,
    /// CPU of the server process per request: the upstream for `direct`, else the proxy alone.
    cpu_us: Option<f64>,
    upstream_cpu_us: Option<f64>,
    /// `LOAD_AB_PAIRS` (tollgate's row only): per interleaved pair of loaded runs, tollgate ÷
    /// baseline throughput and CPU per request.
    pairs: Vec<(f64, Option<f64>)>,
}

impl Row {
    /// p50 with one connection: the median of the rounds' p50s.
    fn single_p50(&self) -> f64 {
        median(self.singles.iter().map(|s| s.p50_us).collect())
    }

    fn single_errors(&self) -> (u64, u64) {
        self.singles
            .iter()
            .fold((0, 0), |(a, b), s| (a + s.non2xx, b + s.sock_errors))
    }
}

/// The performance issue's targets, tollgate ÷ reference in one run: throughput at least this…
const TARGET_THROUGHPUT: f64 = 0.5;
/// …and the single-request p50 at most this.
const TARGET_SINGLE_P50: f64 = 1.5;
/// Against the fixed nginx upstream (issue 24): throughput at least this × the hop's.
const TARGET_THROUGHPUT_FIXED: f64 = 0.8;

/// tollgate ÷ reference p50 at one connection: the median of the per-round ratios, each taken
/// from two runs seconds apart.
fn single_ratio(t: &Row, n: &Row) -> String {
    single_ratio_value(t, n).map_or_else(|| "-".into(), |r| format!("{r:.2}"))
}

/// [`single_ratio`] as a number.
fn single_ratio_value(t: &Row, n: &Row) -> Option<f64> {
    let per_round: Vec<f64> = t
        .singles
        .iter()
        .zip(&n.singles)
        .filter(|(a, b)| a.p50_us > 0.0 && b.p50_us > 0.0)
        .map(|(a, b)| a.p50_us / b.p50_us)
        .collect();
    (!per_round.is_empty()).then(|| median(per_round))
}

/// `value` to three decimals and whether it meets its target, so a near miss cannot read as met.
fn verdict(value: Option<f64>, met: impl Fn(f64) -> bool) -> String {
    match value {
        Some(v) if met(v) => format!("{v:.3} met"),
        Some(v) => format!("{v:.3} NOT met"),
        None => "- (not measured)".into(),
    }
}

fn describe_setup(
    log: &mut Log,
    wrk: &Path,
    secs: u64,
    conns: u64,
    reference: &Reference,
    tg: &Tollgate,
) {
    let wrk_version = Command::new(wrk)
        .arg("--version")
        .output()
        .map(|o| {
            let s = String::from_utf8_lossy(&o.stdout).into_owned()
                + &String::from_utf8_lossy(&o.stderr);
            s.lines()
                .next()
                .unwrap_or("")
                .split(" Copyright")
                .next()
                .unwrap_or("")
                .trim()
                .to_owned()
        })
        .unwrap_or_default();
    log.say("== tollgate load harness ==");
    log.say(format!(
        "date: {} UTC; machine: {}, {} logical CPUs, {} RAM, Linux {}",
        chrono::Utc::now().format("%Y-%m-%d %H:%M"),
        cpu_model(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        mem_total(),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
    ));
    log.say(format!(
        "load average at start: {} (anything above 0 is other work sharing the CPUs)",
        loadavg()
    ));
    log.say(format!(
        "load: {wrk_version}; {conns} connections / {} threads for {secs} s per target and mode, after a {WARMUP_SECS} s warm-up; then 1 connection in {SINGLE_ROUNDS} rounds of {} s with the three targets taking turns (single-request latency: the median round; its ratio: the median of the rounds' ratios)",
        conns.min(2),
        single_round_secs(secs)
    ));
    log.say(format!(
        "request: POST /v1/chat/completions, {} B JSON chat body (non-stream) / {} B (\"stream\":true); Authorization: Bearer <gateway key>",
        common::chat_body(false).len(),
        common::chat_body(true).len()
    ));
    log.say(format!(
        "upstream: hyper HTTP/1.1 server inside the harness (2 threads), fixed answers: a {} B chat completion with usage, or an SSE stream of {} events (5 content chunks, usage chunk, [DONE])",
        common::completion_body(UPSTREAM_MODEL).len(),
        common::sse_events(UPSTREAM_MODEL).len()
    ));
    log.say(format!("reference: {}", reference.describe()));
    log.say(format!(
        "tollgate: {} serve, a child process (RSS and CPU are tollgate's alone); SQLite (WAL) in a temp dir; JSON access log at info to a file; gateway key with model + IP allow-lists, RPM/TPM limits, {}, expiry; user on a plan with RPM/TPM; {}; model renamed both ways; every request metered into usage_records",
        tg.bin.display(),
        if tg.billing { "a budget" } else { "NO budget" },
        if tg.billing {
            "balance enforcement on (budget and balance reserved per request, from leases taken in SQL)"
        } else {
            "balance enforcement OFF (LOAD_BILLING=0: no reservations)"
        },
    ));
    log.say("CPUs: wrk, the upstream, the reference and tollgate all share them; nothing is pinned, so throughput is bounded by the machine, not by one process. CPU µs/req is the steadier figure.");
}

fn fmt_ms(us: f64) -> String {
    format!("{:.2}", us / 1000.0)
}

fn fmt_opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.digits$}"))
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.2}", a / b)
    } else {
        "-".into()
    }
}

fn table(log: &mut Log, rows: &[Row]) {
    for set in [Set::Harness, Set::Fixed] {
        if rows.iter().any(|r| r.set == set) {
            set_table(log, set, rows);
        }
    }
}

fn set_table(log: &mut Log, set: Set, rows: &[Row]) {
    log.say("");
    log.say(format!(
        "-- {} set: {}",
        set.name(),
        match set {
            Set::Harness => "the hyper upstream inside the harness",
            Set::Fixed => "nginx answering with `return 200` (issue 24's stricter reference)",
        }
    ));
    log.say(format!(
        "{:<11} {:<10} {:>9} {:>8} {:>8} {:>10} {:>8} {:>9} {:>11} {:>12}",
        "mode",
        "target",
        "req/s",
        "p50 ms",
        "p99 ms",
        "p50@1 ms",
        "non-2xx",
        "sock err",
        "CPU µs/req",
        "upstream CPU"
    ));
    for r in rows.iter().filter(|r| r.set == set) {
        log.say(format!(
            "{:<11} {:<10} {:>9.0} {:>8} {:>8} {:>10} {:>8} {:>9} {:>11} {:>12}",
            r.mode.name(),
            r.target.name(),
            r.load.rps(),
            fmt_ms(r.load.p50_us),
            fmt_ms(r.load.p99_us),
            fmt_ms(r.single_p50()),
            r.load.non2xx + r.single_errors().0,
            r.load.sock_errors + r.single_errors().1,
            fmt_opt(r.cpu_us, 0),
            fmt_opt(r.upstream_cpu_us, 0),
        ));
    }
    log.say("(CPU µs/req: the upstream's for direct, the proxy process's own for reference and tollgate; upstream CPU: the upstream's in that run)");
    log.say("");
    let (want_throughput, want_p50) = set.targets();
    for mode in [Mode::Plain, Mode::Stream] {
        let get = |t| {
            rows.iter()
                .find(|r| r.set == set && r.mode == mode && r.target == t)
        };
        let (Some(d), Some(n), Some(t)) = (
            get(Target::Direct),
            get(Target::Reference),
            get(Target::Tollgate),
        ) else {
            continue;
        };
        log.say(format!(
            "{:<11} tollgate ÷ reference: throughput {}, p50 {}, p99 {}, p50@1 {}, CPU/req {}",
            mode.name(),
            ratio(t.load.rps(), n.load.rps()),
            ratio(t.load.p50_us, n.load.p50_us),
            ratio(t.load.p99_us, n.load.p99_us),
            single_ratio(t, n),
            match (t.cpu_us, n.cpu_us) {
                (Some(a), Some(b)) => ratio(a, b),
                _ => "-".into(),
            }
        ));
        log.say(format!(
            "{:<11} added by one hop at 1 connection (p50 − direct p50): reference {:+.0} µs, tollgate {:+.0} µs",
            "",
            n.single_p50() - d.single_p50(),
            t.single_p50() - d.single_p50()
        ));
        let throughput = (n.load.rps() > 0.0).then(|| t.load.rps() / n.load.rps());
        log.say(format!(
            "{:<11} targets ({}): throughput ≥ {want_throughput}: {}; p50@1 ≤ {want_p50}: {}",
            "",
            set.name(),
            verdict(throughput, |r| r >= want_throughput),
            verdict(single_ratio_value(t, n), |r| r <= want_p50),
        ));
        if let Some(b) = get(Target::Baseline) {
            log.say(format!(
                "{:<11} tollgate ÷ baseline (LOAD_BASELINE_BIN, same run): throughput {}, p50@1 {}, CPU/req {}; baseline ÷ reference: throughput {}, p50@1 {}",
                "",
                ratio(t.load.rps(), b.load.rps()),
                single_ratio(t, b),
                match (t.cpu_us, b.cpu_us) {
                    (Some(x), Some(y)) => ratio(x, y),
                    _ => "-".into(),
                },
                ratio(b.load.rps(), n.load.rps()),
                single_ratio(b, n),
            ));
            if !t.pairs.is_empty() {
                let cpus: Vec<f64> = t.pairs.iter().filter_map(|p| p.1).collect();
                log.say(format!(
                    "{:<11} tollgate ÷ baseline, {} interleaved pairs (LOAD_AB_PAIRS): throughput {} (median {:.3}), CPU/req {} (median {})",
                    "",
                    t.pairs.len(),
                    t.pairs.iter().map(|p| format!("{:.3}", p.0)).collect::<Vec<_>>().join(" "),
                    median(t.pairs.iter().map(|p| p.0).collect()),
                    cpus.iter().map(|c| format!("{c:.3}")).collect::<Vec<_>>().join(" "),
                    if cpus.is_empty() { "-".into() } else { format!("{:.3}", median(cpus)) },
                ));
            }
        }
        let rounds: Vec<String> = (0..t.singles.len())
            .map(|i| {
                let p = |r: &Row| r.singles.get(i).map_or(0.0, |s| s.p50_us / 1000.0);
                format!("{:.2}/{:.2}/{:.2}", p(d), p(n), p(t))
            })
            .collect();
        log.say(format!(
            "{:<11} p50@1 ms by round (direct/reference/tollgate): {}",
            "",
            rounds.join(", ")
        ));
    }
}

// ---------------------------------------------------------------------------------------------
// wrk

#[derive(Debug, Default, Clone)]
struct WrkResult {
    requests: u64,
    duration_us: f64,
    non2xx: u64,
    sock_errors: u64,
    p50_us: f64,
    p99_us: f64,
    raw: String,
}

impl WrkResult {
    fn rps(&self) -> f64 {
        if self.duration_us > 0.0 {
            self.requests as f64 / (self.duration_us / 1e6)
        } else {
            0.0
        }
    }
}

/// The `done` hook every script ends with: one machine-readable line next to wrk's own report.
const DONE_HOOK: &str = r#"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("LOAD_RESULT requests=%.0f duration_us=%.0f status=%.0f connect=%.0f read=%.0f write=%.0f timeout=%.0f p50=%.0f p90=%.0f p99=%.0f max=%.0f\n",
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"#;

fn lua_string(s: &str) -> String {
    format!("{s:?}")
}

fn write_script(dir: &Path, name: &str, body: &Path, key: &str) -> anyhow::Result<PathBuf> {
    write_script_with(dir, name, body, key, &[])
}

/// [`write_script`] with more request headers.
fn write_script_with(
    dir: &Path,
    name: &str,
    body: &Path,
    key: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<PathBuf> {
    let path = dir.join(format!("{name}.lua"));
    let extra: String = headers
        .iter()
        .map(|(n, v)| format!("wrk.headers[{}] = {}\n", lua_string(n), lua_string(v)))
        .collect();
    let script = format!(
        r#"-- POST a JSON body with the gateway key (written by benches/load.rs)
local f = assert(io.open({body}, "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = {auth}
{extra}{DONE_HOOK}"#,
        body = lua_string(&body.display().to_string()),
        auth = lua_string(&format!("Bearer {key}")),
    );
    std::fs::write(&path, script)?;
    Ok(path)
}

fn wrk_command(
    wrk: &Path,
    url: &str,
    script: &Path,
    threads: u64,
    conns: u64,
    secs: u64,
) -> Command {
    let mut cmd = Command::new(wrk);
    cmd.arg(format!("-t{threads}"))
        .arg(format!("-c{conns}"))
        .arg(format!("-d{secs}s"))
        .arg("--timeout")
        .arg("10s")
        .arg("--latency")
        .arg("-s")
        .arg(script)
        .arg(url)
        .stdin(Stdio::null());
    cmd
}

fn wrk_run(
    wrk: &Path,
    url: &str,
    script: &Path,
    threads: u64,
    conns: u64,
    secs: u64,
) -> anyhow::Result<WrkResult> {
    let out = wrk_command(wrk, url, script, threads, conns, secs)
        .output()
        .context("running wrk")?;
    let raw =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.success(), "wrk failed: {raw}");
    parse_wrk(&raw)
}

fn parse_wrk(raw: &str) -> anyhow::Result<WrkResult> {
    let line = raw
        .lines()
        .find(|l| l.starts_with("LOAD_RESULT "))
        .with_context(|| format!("no LOAD_RESULT line in wrk's output:\n{raw}"))?;
    let mut r = WrkResult {
        raw: raw.to_owned(),
        ..Default::default()
    };
    for kv in line.split_whitespace().skip(1) {
        let Some((k, v)) = kv.split_once('=') else {
            continue;
        };
        let v: f64 = v.parse().with_context(|| format!("wrk field {kv}"))?;
        match k {
            "requests" => r.requests = v as u64,
            "duration_us" => r.duration_us = v,
            "status" => r.non2xx = v as u64,
            "connect" | "read" | "write" | "timeout" => r.sock_errors += v as u64,
            "p50" => r.p50_us = v,
            "p99" => r.p99_us = v,
            _ => {}
        }
    }
    Ok(r)
}

// ---------------------------------------------------------------------------------------------
// The upstream: fixed answers, counted.

struct UpstreamState {
    completion: Bytes,
    events: Vec<Bytes>,
    /// The Anthropic Messages answers (`…/messages`), for the translated paths.
    message: Bytes,
    message_events: Vec<Bytes>,
    /// `x-api-key` tollgate sends to the `anthropic` provider.
    gateway_api_key: String,
    /// `Authorization` tollgate sends (the provider key): tells its requests from the others.
    gateway_auth: String,
    total: AtomicU64,
    via_gateway: AtomicU64,
    /// Requests to [`common::FLAKY_PREFIX`] seen, and how many of them were failed on purpose
    /// (not counted in `via_gateway`: they are attempts, not answers).
    flaky_seen: AtomicU64,
    flaky_failed: AtomicU64,
}

struct Upstream {
    addr: SocketAddr,
    state: Arc<UpstreamState>,
    _rt: Runtime,
}

type HarnessBody = BoxBody<Bytes, hyper::Error>;

fn runtime(name: &str) -> anyhow::Result<Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(name)
        .enable_all()
        .build()?)
}

fn full(b: Bytes) -> HarnessBody {
    Full::new(b)
        .map_err(|never: Infallible| match never {})
        .boxed()
}

/// `"stream":true` anywhere at the top level (the compact bodies the harness and tollgate send).
fn wants_stream(body: &[u8]) -> bool {
    body.windows(13).any(|w| w == b"\"stream\":true")
}

async fn upstream_answer(
    req: Request<Incoming>,
    st: Arc<UpstreamState>,
) -> Result<Response<HarnessBody>, Infallible> {
    let via_gateway = req
        .headers()
        .get(header::AUTHORIZATION)
        .is_some_and(|v| v.as_bytes() == st.gateway_auth.as_bytes())
        || req
            .headers()
            .get("x-api-key")
            .is_some_and(|v| v.as_bytes() == st.gateway_api_key.as_bytes());
    let anthropic = req.uri().path().ends_with("/messages");
    let flaky = req.uri().path().starts_with(common::FLAKY_PREFIX);
    let (completion, events) = if anthropic {
        (&st.message, &st.message_events)
    } else {
        (&st.completion, &st.events)
    };
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => Bytes::new(),
    };
    st.total.fetch_add(1, Ordering::Relaxed);
    // The flaky deployment fails every other request, alternating 500 and 503.
    if flaky {
        let n = st.flaky_seen.fetch_add(1, Ordering::Relaxed);
        if n % 2 == 1 {
            st.flaky_failed.fetch_add(1, Ordering::Relaxed);
            let mut r = Response::new(full(Bytes::from_static(
                br#"{"error":{"message":"flaky upstream","type":"server_error"}}"#,
            )));
            *r.status_mut() = if n % 4 == 1 {
                StatusCode::INTERNAL_SERVER_ERROR
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            return Ok(r);
        }
    }
    if via_gateway {
        st.via_gateway.fetch_add(1, Ordering::Relaxed);
    }
    let mut resp = if wants_stream(&body) {
        let frames: Vec<Result<Frame<Bytes>, hyper::Error>> =
            events.iter().map(|e| Ok(Frame::data(e.clone()))).collect();
        let mut r = Response::new(StreamBody::new(futures_util::stream::iter(frames)).boxed());
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/event-stream"),
        );
        r.headers_mut().insert(
            header::CACHE_CONTROL,
            http::HeaderValue::from_static("no-cache"),
        );
        r
    } else {
        let mut r = Response::new(full(completion.clone()));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        r
    };
    *resp.status_mut() = StatusCode::OK;
    Ok(resp)
}

impl Upstream {
    fn start() -> anyhow::Result<Self> {
        let rt = runtime("load-upstream")?;
        let listener = rt.block_on(TcpListener::bind("127.0.0.1:0"))?;
        let addr = listener.local_addr()?;
        let state = Arc::new(UpstreamState {
            completion: Bytes::from(common::completion_body(UPSTREAM_MODEL)),
            events: common::sse_events(UPSTREAM_MODEL)
                .into_iter()
                .map(Bytes::from)
                .collect(),
            message: Bytes::from(common::anthropic_message(common::ANTHROPIC_UPSTREAM_MODEL)),
            message_events: common::anthropic_events(common::ANTHROPIC_UPSTREAM_MODEL)
                .into_iter()
                .map(Bytes::from)
                .collect(),
            gateway_auth: format!("Bearer {}", common::PROVIDER_SECRET),
            gateway_api_key: common::PROVIDER_SECRET.to_owned(),
            total: AtomicU64::new(0),
            via_gateway: AtomicU64::new(0),
            flaky_seen: AtomicU64::new(0),
            flaky_failed: AtomicU64::new(0),
        });
        let st = state.clone();
        rt.spawn(async move {
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
                    let svc = service_fn(move |req| upstream_answer(req, st.clone()));
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Ok(Self {
            addr,
            state,
            _rt: rt,
        })
    }

    fn via_gateway(&self) -> u64 {
        self.state.via_gateway.load(Ordering::SeqCst)
    }

    fn cpu_ticks(&self) -> u64 {
        threads_cpu_ticks("load-upstream")
    }
}

// ---------------------------------------------------------------------------------------------
// The reference hop: nginx, else a minimal hyper pass-through.

enum Reference {
    Nginx {
        addr: SocketAddr,
        child: Child,
        version: String,
        pids: Vec<u32>,
    },
    Hyper {
        addr: SocketAddr,
        _rt: Runtime,
    },
}

impl Reference {
    fn start(tmp: &Path, name: &str, upstream: SocketAddr) -> anyhow::Result<Self> {
        match find_nginx() {
            Some(bin) => start_nginx(&bin, tmp, name, upstream),
            None => {
                eprintln!(
                    "load: nginx not found (apt-get install -y nginx-light); using the hyper pass-through as the reference"
                );
                start_hyper_reference(upstream)
            }
        }
    }

    fn addr(&self) -> SocketAddr {
        match self {
            Reference::Nginx { addr, .. } | Reference::Hyper { addr, .. } => *addr,
        }
    }

    fn describe(&self) -> String {
        match self {
            Reference::Nginx { version, .. } => format!(
                "{version} (worker_processes 2, upstream keepalive 64, proxy_http_version 1.1, proxy_buffering off, access log on), a child process"
            ),
            Reference::Hyper { .. } => "NOT nginx (not found, or LOAD_NGINX=none): a minimal hyper HTTP/1.1 pass-through inside the harness (2 threads, pooled client), streaming bodies both ways".into(),
        }
    }

    /// CPU ticks used so far by the reference proxy (nginx master + workers, or its threads).
    fn cpu_ticks(&self) -> u64 {
        match self {
            Reference::Nginx { pids, .. } => pids.iter().filter_map(|p| proc_cpu_ticks(*p)).sum(),
            Reference::Hyper { .. } => threads_cpu_ticks("load-reference"),
        }
    }
}

impl Drop for Reference {
    fn drop(&mut self) {
        if let Reference::Nginx { child, .. } = self {
            // SIGTERM to the master makes it stop its workers too (SIGKILL would orphan them).
            terminate(child, Duration::from_secs(5));
        }
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn find_nginx() -> Option<PathBuf> {
    find_program(
        "nginx",
        "LOAD_NGINX",
        &[
            "/usr/sbin/nginx",
            "/usr/local/sbin/nginx",
            "/usr/local/nginx/sbin/nginx",
        ],
    )
}

fn nginx_version(bin: &Path) -> String {
    Command::new(bin)
        .arg("-v")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stderr)
                .trim()
                .replace("nginx version: ", "")
        })
        .unwrap_or_else(|_| "nginx".into())
}

fn start_nginx(
    bin: &Path,
    tmp: &Path,
    name: &str,
    upstream: SocketAddr,
) -> anyhow::Result<Reference> {
    let dir = tmp.join(name);
    for sub in ["logs", "temp"] {
        std::fs::create_dir_all(dir.join(sub))?;
    }
    let version = nginx_version(bin);
    let mut last_err = String::new();
    // The port is picked free and handed over; retry if something took it in between.
    for _ in 0..3 {
        let port = free_port()?;
        let conf = dir.join("nginx.conf");
        let d = dir.display();
        std::fs::write(
            &conf,
            format!(
                r#"# Written by benches/load.rs: a bare reverse-proxy hop to the harness's upstream.
daemon off;
master_process on;
worker_processes 2;
pid {d}/nginx.pid;
error_log {d}/logs/error.log warn;
events {{ worker_connections 4096; }}
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
        server {upstream};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://llm;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
}}
"#
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
                // Wait until both workers exist so their CPU is counted from the start.
                let mut pids = vec![child.id()];
                for _ in 0..50 {
                    let workers = children_of(child.id());
                    if workers.len() >= 2 {
                        pids.extend(workers);
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                return Ok(Reference::Nginx {
                    addr,
                    child,
                    version,
                    pids,
                });
            }
            if let Some(status) = child.try_wait()? {
                last_err = format!(
                    "nginx exited ({status}): {}{}",
                    std::fs::read_to_string(dir.join("logs/stderr.log")).unwrap_or_default(),
                    std::fs::read_to_string(dir.join("logs/error.log")).unwrap_or_default()
                );
                break;
            }
            if Instant::now() > deadline {
                terminate(&mut child, Duration::from_secs(2));
                last_err = "nginx did not start listening within 10 s".into();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    bail!("{last_err}")
}

fn start_hyper_reference(upstream: SocketAddr) -> anyhow::Result<Reference> {
    let rt = runtime("load-reference")?;
    let listener = rt.block_on(TcpListener::bind("127.0.0.1:0"))?;
    let addr = listener.local_addr()?;
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<HttpConnector, Incoming> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(64)
        .build(connector);
    rt.spawn(async move {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(x) => x,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let client = client.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |mut req: Request<Incoming>| {
                    let client = client.clone();
                    async move {
                        let pq = req
                            .uri()
                            .path_and_query()
                            .map_or("/", |p| p.as_str())
                            .to_owned();
                        let answer = match format!("http://{upstream}{pq}").parse() {
                            Ok(uri) => {
                                *req.uri_mut() = uri;
                                req.headers_mut().remove(header::HOST);
                                client.request(req).await.ok()
                            }
                            Err(_) => None,
                        };
                        Ok::<_, Infallible>(match answer {
                            Some(r) => r.map(|b| b.boxed()),
                            None => {
                                let mut r = Response::new(full(Bytes::from_static(b"bad gateway")));
                                *r.status_mut() = StatusCode::BAD_GATEWAY;
                                r
                            }
                        })
                    }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(Reference::Hyper { addr, _rt: rt })
}

// ---------------------------------------------------------------------------------------------
// The fixed-answer upstream: nginx answering every request with `return 200 '…'`, the floor no
// process in the harness competes with (issue 24). One mode at a time: `serve` rewrites the
// answer and reloads nginx.

struct FixedUpstream {
    addr: SocketAddr,
    child: Child,
    dir: PathBuf,
    bin: PathBuf,
}

/// The pieces of `FixedUpstream`, the hop to it and the tollgate that uses it.
struct FixedSet {
    upstream: FixedUpstream,
    reference: Reference,
    tollgate: Tollgate,
}

/// `text` as an nginx quoted string (nginx interpolates `$`, which the fixed answers never hold).
fn nginx_quoted(text: &str) -> anyhow::Result<String> {
    ensure!(
        !text.contains('$'),
        "an nginx `return` text cannot hold `$`"
    );
    Ok(format!(
        "'{}'",
        text.replace('\\', "\\\\").replace('\'', "\\'")
    ))
}

impl FixedUpstream {
    fn start(bin: &Path, tmp: &Path) -> anyhow::Result<Self> {
        let dir = tmp.join("nginx-fixed");
        for sub in ["logs", "temp"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        let port = free_port()?;
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let me = |child| Self {
            addr,
            child,
            dir: dir.clone(),
            bin: bin.to_owned(),
        };
        std::fs::write(dir.join("nginx.conf"), Self::conf(&dir, addr, Mode::Plain)?)?;
        let log = std::fs::File::create(dir.join("logs/stderr.log"))?;
        let child = Command::new(bin)
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .arg("-e")
            .arg(dir.join("logs/error.log"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut up = me(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(addr).is_err() {
            if let Some(status) = up.child.try_wait()? {
                bail!(
                    "the fixed nginx upstream exited ({status}): {}",
                    std::fs::read_to_string(up.dir.join("logs/error.log")).unwrap_or_default()
                );
            }
            ensure!(
                Instant::now() < deadline,
                "the fixed nginx upstream did not listen within 10 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(up)
    }

    fn conf(dir: &Path, addr: SocketAddr, mode: Mode) -> anyhow::Result<String> {
        let (content_type, answer) = match mode {
            Mode::Plain => ("application/json", common::completion_body(UPSTREAM_MODEL)),
            Mode::Stream => (
                "text/event-stream",
                common::sse_events(UPSTREAM_MODEL).concat(),
            ),
        };
        let d = dir.display();
        Ok(format!(
            r#"# Written by benches/load.rs: a fixed answer to every request ({mode}).
daemon off;
master_process on;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/logs/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {d}/temp/body;
    proxy_temp_path {d}/temp/proxy;
    fastcgi_temp_path {d}/temp/fastcgi;
    uwsgi_temp_path {d}/temp/uwsgi;
    scgi_temp_path {d}/temp/scgi;
    client_max_body_size 16m;
    client_body_buffer_size 64k;
    keepalive_requests 1000000;
    server {{
        listen {addr};
        location / {{
            default_type {content_type};
            return 200 {answer};
        }}
    }}
}}
"#,
            mode = mode.name(),
            answer = nginx_quoted(&answer)?,
        ))
    }

    /// Answers in `mode` from now on: rewrites the configuration and reloads nginx, then waits
    /// until a request gets the new answer.
    fn serve(&self, mode: Mode) -> anyhow::Result<()> {
        std::fs::write(
            self.dir.join("nginx.conf"),
            Self::conf(&self.dir, self.addr, mode)?,
        )?;
        let status = Command::new("kill")
            .arg("-HUP")
            .arg(self.child.id().to_string())
            .status()?;
        ensure!(
            status.success(),
            "reloading the fixed nginx upstream failed"
        );
        let want = match mode {
            Mode::Plain => "application/json",
            Mode::Stream => "text/event-stream",
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            use std::io::{Read, Write};
            let mut got = String::new();
            if let Ok(mut c) = std::net::TcpStream::connect(self.addr) {
                let _ = c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
                let _ = c.read_to_string(&mut got);
            }
            // The old workers finish their connections and leave; their CPU is not counted.
            if got.contains(want) && children_of(self.child.id()).len() == 1 {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "the fixed nginx upstream did not switch to {} within 10 s",
                mode.name()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The master's and its current worker's CPU ticks.
    fn cpu_ticks(&self) -> u64 {
        let master = self.child.id();
        std::iter::once(master)
            .chain(children_of(master))
            .filter_map(proc_cpu_ticks)
            .sum()
    }

    fn describe(&self) -> String {
        format!(
            "{} with `return 200 '…'` (1 worker, access log off) answering every request with the same bytes as the in-harness upstream",
            nginx_version(&self.bin)
        )
    }
}

impl Drop for FixedUpstream {
    fn drop(&mut self) {
        terminate(&mut self.child, Duration::from_secs(5));
    }
}

// ---------------------------------------------------------------------------------------------
// tollgate

struct Tollgate {
    addr: SocketAddr,
    /// Key budget and balance enforcement on (a SQL reservation per request).
    billing: bool,
    /// The fixture has the translated paths' `anthropic` provider and model, the flaky
    /// deployment and a chat access token (a build of this schema, not an older one).
    translated: bool,
    /// An access token for `/api/chat/…` (this build only).
    chat_token: Option<String>,
    child: Child,
    bin: PathBuf,
    db_url: String,
    fixture: Fixture,
}

struct Records {
    total: u64,
    /// How many records were waited for (the upstream's count of tollgate's requests, or the
    /// settled count before the exact check plus its requests).
    upstream: u64,
    ok: u64,
    client_left: u64,
    /// Status 200 yet no usage from the upstream (should not happen with this upstream).
    estimated_ok: u64,
    /// Status 200 with the upstream's usage.
    ok_with_usage: u64,
}

impl Tollgate {
    /// Prepares the database through the store modules, then runs `tollgate serve` on it.
    fn start(
        ctl: &Runtime,
        tmp: &Path,
        name: &str,
        upstream_base: &str,
        billing: bool,
    ) -> anyhow::Result<Self> {
        // Another binary (LOAD_TOLLGATE_BIN) may be an older build: it migrates its own schema.
        let (bin, own_schema) = match std::env::var_os("LOAD_TOLLGATE_BIN") {
            Some(p) => (PathBuf::from(p), true),
            None => (PathBuf::from(env!("CARGO_BIN_EXE_tollgate")), false),
        };
        Self::start_bin(ctl, tmp, name, bin, own_schema, upstream_base, billing)
    }

    /// Runs `bin` on a database of its own in `tmp/name`. With `own_schema` the binary migrates
    /// the database itself (an older build does not know this build's migrations); the fixture
    /// goes in through this build's store modules on this build's schema, whose later
    /// migrations are then rolled back so the older build finds exactly its own.
    fn start_bin(
        ctl: &Runtime,
        tmp: &Path,
        name: &str,
        bin: PathBuf,
        own_schema: bool,
        upstream_base: &str,
        billing: bool,
    ) -> anyhow::Result<Self> {
        ensure!(bin.exists(), "no tollgate binary at {}", bin.display());
        let dir = tmp.join(name);
        std::fs::create_dir_all(&dir)?;
        let db_url = format!("sqlite://{}?mode=rwc", dir.join("tollgate.db").display());
        let master_key = generate_master_key();
        let cfg = common::bench_config(&db_url, &master_key, billing);
        let ring = KeyRing::new(&[parse_master_key(&master_key)?])?;
        let config_path = dir.join("config.toml");
        std::fs::write(
            &config_path,
            common::bench_config_toml(&db_url, &master_key, billing),
        )?;
        if own_schema {
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
        let (fixture, chat_token, translated) = ctl.block_on(async {
            use migration::{Migrator, MigratorTrait};
            use sea_orm::ConnectionTrait;
            // One connection: SQLite checks DDL against the schema a connection cached.
            let db = store::connect(&db_url, 1).await?;
            // The migrations the older build knows (it applied them), so this build's later ones
            // can be rolled back once the fixture is in: the older build then finds its schema.
            let known: Vec<String> = if own_schema {
                db.query_all_raw(sea_orm::Statement::from_string(
                    db.get_database_backend(),
                    "SELECT version FROM seaql_migrations",
                ))
                .await?
                .iter()
                .filter_map(|r| r.try_get::<String>("", "version").ok())
                .collect()
            } else {
                Vec::new()
            };
            store::migrate(&db, &db_url).await?;
            let fx = common::create_fixture(&db, &ring, &cfg, upstream_base).await?;
            // This build's migrations the other build does not know: none when it is a build
            // of this schema (e.g. this tree with a change), which then gets the other paths too.
            let newer = if own_schema {
                Migrator::migrations()
                    .iter()
                    .filter(|m| !known.iter().any(|k| k == m.name()))
                    .count()
            } else {
                0
            };
            let mut chat_token = None;
            if newer == 0 {
                // This build's translated paths, retries and chat (an older build may not have
                // them).
                common::add_anthropic(&db, &ring, &fx.user_id, upstream_base).await?;
                let origin = upstream_base.trim_end_matches('/').trim_end_matches("/v1");
                common::add_flaky(&db, &ring, &fx.user_id, origin).await?;
                chat_token = Some(common::access_token(&db, &cfg, &fx.user_id).await?);
            } else {
                Migrator::down(&db, Some(newer as u32)).await?;
            }
            db.close().await?;
            anyhow::Ok((fx, chat_token, newer == 0))
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
            addr,
            billing,
            translated,
            chat_token,
            child,
            bin,
            db_url,
            fixture,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    async fn count(
        &self,
        db: &sea_orm::DatabaseConnection,
        filter: Option<sea_orm::Condition>,
    ) -> Result<u64, sea_orm::DbErr> {
        // Only `id`: an older build's schema lacks this build's later columns.
        let mut q = usage_records::Entity::find()
            .select_only()
            .column(usage_records::Column::Id);
        if let Some(f) = filter {
            q = q.filter(f);
        }
        q.count(db).await
    }

    /// Polls `usage_records` until it holds at least `want` rows and has not changed for 1 s (the
    /// writer flushes every 50 ms), or has not grown for 10 s; then counts by kind.
    async fn wait_for_records(&self, want: u64) -> anyhow::Result<Records> {
        let db = store::connect(&self.db_url, 1).await?;
        let mut last = (u64::MAX, Instant::now());
        loop {
            let n = self.count(&db, None).await?;
            if n != last.0 {
                last = (n, Instant::now());
            } else if (n >= want && last.1.elapsed() > Duration::from_secs(1))
                || last.1.elapsed() > Duration::from_secs(10)
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        use sea_orm::Condition;
        use usage_records::Column as C;
        let ok = || Condition::all().add(C::Status.eq(200));
        let r = Records {
            total: last.0,
            upstream: want,
            ok: self.count(&db, Some(ok())).await?,
            client_left: self
                .count(&db, Some(Condition::all().add(C::Status.eq(499))))
                .await?,
            estimated_ok: self
                .count(&db, Some(ok().add(C::TokensEstimated.eq(true))))
                .await?,
            ok_with_usage: self
                .count(&db, Some(ok().add(C::TokensEstimated.eq(false))))
                .await?,
        };
        db.close().await?;
        Ok(r)
    }

    /// SIGTERM: tollgate drains and flushes; killed if it takes longer than 30 s.
    fn stop(mut self) {
        terminate(&mut self.child, Duration::from_secs(30));
    }
}

impl Drop for Tollgate {
    fn drop(&mut self) {
        terminate(&mut self.child, Duration::from_secs(30));
    }
}

/// The address in tollgate's `tollgate listening` log line (JSON, flattened or not).
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

/// One non-stream and one stream request, checked the way a client would.
/// One non-streamed request along each translated path, answered with the upstream's usage
/// in the client's protocol.
async fn sanity_translated(client: &reqwest::Client, tg: &Tollgate) -> anyhow::Result<()> {
    let key = &tg.fixture.key_secret;
    let post = |path: &str, body: Vec<u8>| {
        client
            .post(format!("http://{}/v1/{path}", tg.addr))
            .bearer_auth(key)
            .header(header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
    };
    let r = post(
        "chat/completions",
        common::chat_body_for(common::ANTHROPIC_MODEL, false),
    )
    .await?;
    let status = r.status();
    let text = r.text().await?;
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    ensure!(
        status == StatusCode::OK
            && v["model"] == common::ANTHROPIC_MODEL
            && v["usage"]["prompt_tokens"] == 412,
        "chat → anthropic: {status}: {text}"
    );
    let r = post("messages", common::messages_body(MODEL, false)).await?;
    let status = r.status();
    let text = r.text().await?;
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    ensure!(
        status == StatusCode::OK
            && v["type"] == "message"
            && v["usage"]["cache_read_input_tokens"] == 128,
        "messages → openai: {status}: {text}"
    );
    Ok(())
}

async fn sanity(
    client: &reqwest::Client,
    url: &str,
    key: &str,
    via_tollgate: bool,
) -> anyhow::Result<()> {
    sanity_mode(client, url, key, via_tollgate, Mode::Plain).await?;
    sanity_mode(client, url, key, via_tollgate, Mode::Stream).await
}

/// One request of `mode`, checked the way a client would.
async fn sanity_mode(
    client: &reqwest::Client,
    url: &str,
    key: &str,
    via_tollgate: bool,
    mode: Mode,
) -> anyhow::Result<()> {
    let want_model = if via_tollgate { MODEL } else { UPSTREAM_MODEL };
    // A transport error is tried again once: after the fixed upstream's reload the client's
    // pooled connection to its old worker may be closed, and the harness's runtime only
    // notices that when it next sends on it.
    let mut tries = 0;
    let (status, text) = loop {
        tries += 1;
        let sent = client
            .post(url)
            .bearer_auth(key)
            .header(header::CONTENT_TYPE, "application/json")
            .body(common::chat_body(mode == Mode::Stream))
            .send()
            .await;
        match sent {
            Ok(r) => {
                let status = r.status();
                break (status, r.text().await?);
            }
            Err(e) if tries < 3 && (e.is_connect() || e.is_request()) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e.into()),
        }
    };
    ensure!(
        status == StatusCode::OK,
        "{}: {status}: {text}",
        mode.name()
    );
    if mode == Mode::Plain {
        let v: serde_json::Value = serde_json::from_str(&text)?;
        ensure!(
            v["model"] == want_model && v["usage"]["prompt_tokens"] == 412,
            "non-stream body: {text}"
        );
        return Ok(());
    }
    let events = text.matches("data: ").count();
    // Through tollgate the usage-only chunk is removed: the client did not ask for it.
    let want_events = common::sse_events(UPSTREAM_MODEL).len() - usize::from(via_tollgate);
    ensure!(
        events == want_events
            && text.ends_with("data: [DONE]\n\n")
            && text.contains(&format!("\"model\":\"{want_model}\"")),
        "stream body ({events} events, want {want_events}): {text}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Soak: tollgate alone at a fixed rate, memory sampled.

#[allow(clippy::too_many_arguments)]
fn run_soak(
    log: &mut Log,
    ctl: &Runtime,
    wrk: &Path,
    tmp: &Path,
    tg: &Tollgate,
    upstream: &Upstream,
    plain: &Path,
    stream: &Path,
    sanity_requests: u64,
) -> anyhow::Result<()> {
    let secs = env_u64("LOAD_SOAK_SECS", 300)?.max(10);
    let rps = env_u64("LOAD_SOAK_RPS", 200)?.max(1);
    let conns = 4u64;
    // Each connection waits this long between its requests (plus the request's own latency), so
    // the rate is at most `rps`.
    let delay_ms = (conns * 1000 / rps).max(1);
    let script = tmp.join("soak.lua");
    std::fs::write(
        &script,
        format!(
            r#"-- Alternate non-stream and stream requests at a fixed pace (written by benches/load.rs)
local bodies = {{}}
for i, p in ipairs({{{plain}, {stream}}}) do
  local f = assert(io.open(p, "rb")); bodies[i] = f:read("*a"); f:close()
end
local headers = {{["Content-Type"] = "application/json", ["Authorization"] = {auth}}}
local n = 0
request = function()
  n = n + 1
  return wrk.format("POST", "/v1/chat/completions", headers, bodies[(n % 2) + 1])
end
delay = function() return {delay_ms} end
{DONE_HOOK}"#,
            plain = lua_string(&plain.display().to_string()),
            stream = lua_string(&stream.display().to_string()),
            auth = lua_string(&format!("Bearer {}", tg.fixture.key_secret)),
        ),
    )?;
    log.say("== tollgate soak ==");
    log.say(format!(
        "{secs} s at ≤ {rps} req/s ({conns} connections, {delay_ms} ms pause each), alternating non-stream and stream; tollgate {} as a child process (RSS is its own)",
        tg.bin.display()
    ));
    log.say(format!(
        "{:>6} {:>10} {:>10} {:>12}",
        "t s", "RSS", "VmHWM", "records"
    ));
    let url = format!("http://{}/v1/chat/completions", tg.addr);
    let out_path = tmp.join("soak-wrk.txt");
    let out = std::fs::File::create(&out_path)?;
    let mut child = wrk_command(wrk, &url, &script, 1, conns, secs)
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .context("running wrk")?;
    let db = ctl.block_on(store::connect(&tg.db_url, 1))?;
    let start = Instant::now();
    let mut next = Duration::ZERO;
    loop {
        if start.elapsed() >= next {
            let records = ctl.block_on(usage_records::Entity::find().count(&db))?;
            log.say(format!(
                "{:>6} {:>10} {:>10} {:>12}",
                next.as_secs(),
                mib(vm_kb(tg.pid(), "VmRSS")),
                mib(vm_kb(tg.pid(), "VmHWM")),
                records
            ));
            next += Duration::from_secs(10);
        }
        if child.try_wait()?.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let raw = std::fs::read_to_string(&out_path)?;
    log.raw("soak", &raw);
    let r = parse_wrk(&raw)?;
    let records = ctl.block_on(tg.wait_for_records(upstream.via_gateway()))?;
    log.say(format!(
        "{} requests answered ({:.0} req/s), p50 {} ms, p99 {} ms, non-2xx {}, socket errors {}",
        r.requests,
        r.rps(),
        fmt_ms(r.p50_us),
        fmt_ms(r.p99_us),
        r.non2xx,
        r.sock_errors
    ));
    let answered = r.requests + sanity_requests;
    let ok = records.total >= records.upstream
        && records.ok >= answered
        && records.total - answered <= conns
        && records.estimated_ok == 0;
    log.say(format!(
        "usage records: {} for {} upstream requests tollgate made and {answered} complete answers (incl. 2 sanity checks; wrk drops ≤ {conns} in flight at the end) — {}; RSS at end {}",
        records.total,
        records.upstream,
        if ok { "consistent" } else { "INCONSISTENT" },
        mib(vm_kb(tg.pid(), "VmRSS"))
    ));
    let path = log.save()?;
    println!("\nwritten to {}", path.display());
    ensure!(ok, "usage metering check failed (see above)");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// /proc and processes

/// `$env` when set (`none`: pretend the program is absent), else `name` on `PATH` or in `extra`.
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

/// Fields after the `(comm)` of a `/proc/…/stat` line (field 3 onwards), and the comm.
fn stat_fields(stat: &str) -> Option<(&str, Vec<&str>)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    Some((
        &stat[open + 1..close],
        stat[close + 1..].split_whitespace().collect(),
    ))
}

/// utime + stime of a process (all its threads, finished ones included), in ticks.
fn proc_cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, f) = stat_fields(&stat)?;
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// utime + stime of this process's threads named `name`, in ticks.
fn threads_cpu_ticks(name: &str) -> u64 {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    dir.flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("stat")).ok())
        .filter_map(|s| {
            let (comm, f) = stat_fields(&s)?;
            (comm == name)
                .then(|| Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?))?
        })
        .sum()
}

/// Processes whose parent is `pid`.
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

/// A `/proc/<pid>/status` memory field (`VmRSS`, `VmHWM`) in KiB.
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

fn mib(kb: Option<u64>) -> String {
    kb.map_or_else(|| "?".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0))
}

/// Samples a process's RSS every 250 ms on a thread; `stop` returns the highest, in KiB.
struct RssSampler {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<u64>,
}

impl RssSampler {
    fn start(pid: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut peak = 0;
            while !flag.load(Ordering::SeqCst) {
                peak = peak.max(vm_kb(pid, "VmRSS").unwrap_or(0));
                std::thread::sleep(Duration::from_millis(250));
            }
            peak
        });
        Self { stop, handle }
    }

    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.join().unwrap_or(0)
    }
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

fn mem_total() -> String {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            let kb: u64 = s
                .lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))?
                .split_whitespace()
                .next()?
                .parse()
                .ok()?;
            Some(format!("{:.0} GiB", kb as f64 / 1024.0 / 1024.0))
        })
        .unwrap_or_else(|| "?".into())
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}
