//! Micro-benchmarks of each stage of the `/v1` hot path, in the order a request meets them:
//! ① auth (gateway key → context on a warm cache) ② admit (allow-lists and the four governor
//! limiters) ③ route (provider key from the cache, opened with the key ring) ④ the request
//! rewrite (model swap + `include_usage` injection on a ~2 KB chat body) ⑤ SSE scanning and
//! mapping, per chunk ⑥ the usage writer's batch insert (500 records into a SQLite file) ⑦ the
//! usage spool's started record (per request) and finished records (per batch) ⑧ the
//! translated paths' work per request, both directions (pivot decode and encode).
//!
//! The setup is a real `App` (SQLite in a temp dir) holding a gateway made through the store
//! modules, exactly what the load harness serves. Run with `cargo bench --bench hot_path`;
//! `benches/crypto.rs` covers sealing and hashing on their own.

mod common;

use std::hint::black_box;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue};
use tokio::runtime::Runtime;
use tollgate::app::App;
use tollgate::cache::KeyCtx;
use tollgate::crypto::generate_master_key;
use tollgate::metering::event::{Prices, Reservation, UsageEvent};
use tollgate::metering::spool::{Spool, Ticket};
use tollgate::metering::writer::{Settled, charges};
use tollgate::providers::openai::OpenAi;
use tollgate::providers::{Adapter, Endpoint, EventCtx, EventOut, Usage};
use tollgate::proxy::meter::RequestFacts;
use tollgate::proxy::request::RequestView;
use tollgate::proxy::stream::SseScanner;
use tollgate::proxy::{admit, auth, route};
use tollgate::store::usage_batch::write_batch;

use common::{Fixture, MODEL, PROVIDER, UPSTREAM_MODEL};

/// Requests admitted per fresh key in the admission bench: far below every limit, so the bench
/// measures admission, never a refusal.
const ADMIT_CHUNK: u64 = 100_000;
/// Prompt-token estimate admission is asked for (a ~2 KB body / 4).
const APPROX_TOKENS: u32 = 512;

struct Env {
    rt: Runtime,
    app: App,
    fx: Fixture,
    _dir: tempfile::TempDir,
}

fn env() -> Env {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("bench.db").display()
    );
    let cfg = common::bench_config(&url, &generate_master_key(), true);
    let (app, fx) = rt.block_on(async {
        let app = App::build(cfg).await.expect("build app");
        let s = &app.state;
        // The upstream is never called here; the URL only has to be valid.
        let fx = common::create_fixture(&s.db, &s.keyring, &s.config, "http://127.0.0.1:9/v1")
            .await
            .expect("fixture");
        (app, fx)
    });
    Env {
        rt,
        app,
        fx,
        _dir: dir,
    }
}

/// The key context as the cache holds it (this also warms the cache).
fn key_ctx(e: &Env) -> Arc<KeyCtx> {
    let s = &e.app.state;
    e.rt.block_on(s.caches.gateway_key(&s.db, &s.metrics, &e.fx.key_hash))
        .expect("lookup")
        .expect("the fixture's key is found")
}

fn stage_auth(c: &mut Criterion, e: &Env) {
    let s = e.app.state.clone();
    let ctx = key_ctx(e);
    assert_eq!(ctx.key_id, e.fx.key_id);
    let mut headers = HeaderMap::new();
    headers.insert(
        http::header::AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {}", e.fx.key_secret)).expect("header"),
    );
    let hash = e.fx.key_hash.clone();

    let mut g = c.benchmark_group("auth");
    g.bench_function("gateway_key_cache_hit", |b| {
        b.to_async(&e.rt).iter(|| async {
            black_box(
                s.caches
                    .gateway_key(&s.db, &s.metrics, black_box(&hash))
                    .await,
            )
        })
    });
    // The whole stage: header, SHA-256, cache hit, key and owner checks.
    g.bench_function("authenticate", |b| {
        b.to_async(&e.rt)
            .iter(|| async { black_box(auth::authenticate(&s, black_box(&headers)).await) })
    });
    g.finish();
}

fn stage_admit(c: &mut Criterion, e: &Env) {
    let s = e.app.state.clone();
    let base = key_ctx(e);
    let catalog = e.rt.block_on(s.caches.catalog(&s.db)).expect("catalog");
    let model = catalog.get(MODEL);
    assert!(model.is_some(), "the fixture's model is in the catalog");
    let ip: Option<IpAddr> = Some(IpAddr::from([127, 0, 0, 1]));
    let mut fresh = 0u64;

    c.bench_function("admit/allow_lists_and_4_limiters", |b| {
        b.iter_custom(|iters| {
            let mut measured = Duration::ZERO;
            let mut done = 0;
            let mut refused = 0u64;
            while done < iters {
                let n = (iters - done).min(ADMIT_CHUNK);
                // A fresh key and user every chunk keep every bucket far from its limit; the first
                // call (which creates the buckets) is not timed: in steady state they exist.
                fresh += 1;
                let mut ctx = (*base).clone();
                ctx.key_id = format!("bench-key-{fresh}");
                ctx.user_id = format!("bench-user-{fresh}");
                let (elapsed, errs) = e.rt.block_on(async {
                    let mut errs = 0u64;
                    if admit::admit(&s, &ctx, ip, MODEL, model, APPROX_TOKENS)
                        .await
                        .is_err()
                    {
                        errs += 1;
                    }
                    let start = Instant::now();
                    for _ in 0..n {
                        let r = admit::admit(&s, black_box(&ctx), ip, MODEL, model, APPROX_TOKENS)
                            .await;
                        if black_box(r).is_err() {
                            errs += 1;
                        }
                    }
                    (start.elapsed(), errs)
                });
                measured += elapsed;
                refused += errs;
                done += n;
            }
            assert_eq!(
                refused, 0,
                "admission refused: the bench would measure refusals"
            );
            measured
        })
    });
}

fn stage_route(c: &mut Criterion, e: &Env) {
    let s = e.app.state.clone();
    let ctx = key_ctx(e);
    let catalog = e.rt.block_on(s.caches.catalog(&s.db)).expect("catalog");
    let model = catalog.get(MODEL).expect("model").clone();
    let pool =
        e.rt.block_on(s.caches.provider_keys(&s.db, &ctx.user_id, PROVIDER))
            .expect("provider key lookup");
    let entry = pool.keys.first().expect("the fixture's provider key");
    assert_eq!(
        s.keyring
            .open_string(&entry.secret_enc, &entry.id)
            .expect("opens"),
        common::PROVIDER_SECRET
    );

    let mut g = c.benchmark_group("route");
    g.bench_function("provider_key_open_string", |b| {
        b.iter(|| {
            s.keyring
                .open_string(black_box(&entry.secret_enc), black_box(&entry.id))
        })
    });
    // The whole stage: model type check, the plan (key pool from the cache, first pick), adapter,
    // open, URL.
    g.bench_function("route", |b| {
        b.to_async(&e.rt).iter(|| async {
            black_box(route::route(&s, &ctx, &model, Endpoint::ChatCompletions).await)
        })
    });
    g.finish();
}

fn stage_request(c: &mut Criterion) {
    let body = common::chat_body(true);
    {
        let v = RequestView::parse(&body).expect("parse");
        assert!(v.stream && !v.include_usage);
        let out: serde_json::Value =
            serde_json::from_slice(&v.rewrite(UPSTREAM_MODEL)).expect("valid JSON");
        assert_eq!(out["model"], UPSTREAM_MODEL);
        assert_eq!(out["stream_options"]["include_usage"], true);
    }
    let mut g = c.benchmark_group(format!("request_{}B", body.len()));
    g.throughput(Throughput::Bytes(body.len() as u64));
    g.bench_function("parse", |b| {
        b.iter(|| RequestView::parse(black_box(&body)).map(|v| v.fields.len()))
    });
    let view = RequestView::parse(&body).expect("parse");
    g.bench_function("rewrite", |b| {
        b.iter(|| view.rewrite(black_box(UPSTREAM_MODEL)))
    });
    // What stage ④ does per request: parse, then the adapter's mapping (rewrite + Bytes).
    g.bench_function("parse_and_map_request", |b| {
        b.iter(|| {
            let v = RequestView::parse(black_box(&body)).expect("parse");
            OpenAi.map_request(&v, UPSTREAM_MODEL)
        })
    });
    g.finish();
}

fn stage_stream(c: &mut Criterion) {
    let events = common::sse_events(UPSTREAM_MODEL);
    let content = events[0].as_bytes().to_vec();
    let usage = events[events.len() - 2].as_bytes().to_vec();
    let whole: Vec<u8> = events.concat().into_bytes();
    let (model_json, upstream_json) = (
        tollgate::providers::model_json(MODEL),
        tollgate::providers::model_json(UPSTREAM_MODEL),
    );
    let renamed = EventCtx {
        client_model: MODEL,
        client_model_json: &model_json,
        upstream_model: UPSTREAM_MODEL,
        client_wants_usage: false,
    };
    let same = EventCtx {
        client_model: UPSTREAM_MODEL,
        client_model_json: &upstream_json,
        ..renamed
    };

    // One event through the scanner and the adapter, as `MeteredStream` does per upstream read.
    fn one(scanner: &mut SseScanner, chunk: &[u8], ctx: &EventCtx<'_>) -> (Bytes, EventOut) {
        scanner.push(chunk);
        let ev = scanner.next_event().ok().flatten().expect("a whole event");
        let data = ev.data.expect("a data event");
        (ev.raw, OpenAi.map_event(&data, ctx).out)
    }
    {
        let mut s = SseScanner::default();
        assert!(matches!(
            one(&mut s, &content, &renamed).1,
            EventOut::Replace(_)
        ));
        assert_eq!(one(&mut s, &content, &same).1, EventOut::Unchanged);
        assert_eq!(one(&mut s, &usage, &renamed).1, EventOut::Drop);
    }

    let mut g = c.benchmark_group(format!("stream_chunk_{}B", content.len()));
    g.throughput(Throughput::Bytes(content.len() as u64));
    let mut s = SseScanner::default();
    g.bench_function("content_model_renamed", |b| {
        b.iter(|| one(&mut s, black_box(&content), &renamed))
    });
    g.bench_function("content_same_model", |b| {
        b.iter(|| one(&mut s, black_box(&content), &same))
    });
    g.bench_function("usage_chunk_dropped", |b| {
        b.iter(|| one(&mut s, black_box(&usage), &renamed))
    });
    g.finish();

    let mut g = c.benchmark_group(format!("stream_response_{}_events", events.len()));
    g.throughput(Throughput::Bytes(whole.len() as u64));
    g.bench_function("one_read_model_renamed", |b| {
        b.iter_batched_ref(
            SseScanner::default,
            |s| {
                s.push(black_box(&whole));
                let mut usage = None;
                while let Ok(Some(ev)) = s.next_event() {
                    if let Some(d) = ev.data {
                        let m = OpenAi.map_event(&d, &renamed);
                        usage = usage.or(m.usage);
                        black_box(m.out);
                    }
                }
                usage
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

/// One translated exchange's per-request work, both directions, as `proxy::translate` does it
/// (the three paths of the load harness's other lines): the client's body decoded into the
/// pivot and encoded for the provider; the provider's answer decoded and encoded for the
/// client — a complete body, or a whole stream read at once (what one upstream read brings).
fn stage_translate(c: &mut Criterion) {
    use tollgate::pivot::ChatChunk;
    use tollgate::protocols::{ClientProtocol, EncodeCtx, anthropic::AnthropicMessages};
    use tollgate::protocols::{openai_chat::OpenAiChat, responses::Responses};
    use tollgate::providers::Translator;
    use tollgate::providers::anthropic::Anthropic;

    let target = |up: &'static str| tollgate::providers::Target {
        base_url: "http://127.0.0.1:1/v1",
        upstream_model: up,
        api_version: None,
        region: None,
        default_max_tokens: 4096,
    };
    let ctx = |id: Option<&str>| EncodeCtx {
        client_model: MODEL.into(),
        include_usage: false,
        created: 1_700_000_000,
        id: id.map(str::to_owned),
    };
    let anthropic_sse: Vec<u8> = common::anthropic_events(common::ANTHROPIC_UPSTREAM_MODEL)
        .concat()
        .into_bytes();
    let openai_sse: Vec<u8> = common::sse_events(UPSTREAM_MODEL).concat().into_bytes();
    let anthropic_msg = common::anthropic_message(common::ANTHROPIC_UPSTREAM_MODEL).into_bytes();
    let completion = common::completion_body(UPSTREAM_MODEL).into_bytes();

    // (name, client protocol, provider, upstream stream body, upstream complete body, client
    // request body, encoder id)
    type Case<'a> = (
        &'static str,
        &'static dyn ClientProtocol,
        &'static dyn Translator,
        &'a [u8],
        &'a [u8],
        Vec<u8>,
        Option<&'static str>,
    );
    let cases: [Case<'_>; 3] = [
        (
            "chat_to_anthropic",
            &OpenAiChat,
            &Anthropic,
            &anthropic_sse,
            &anthropic_msg,
            common::chat_body_for(MODEL, true),
            None,
        ),
        (
            "messages_to_openai",
            &AnthropicMessages,
            &OpenAi,
            &openai_sse,
            &completion,
            common::messages_body(MODEL, true),
            Some("msg_bench"),
        ),
        (
            "responses_to_openai",
            &Responses,
            &OpenAi,
            &openai_sse,
            &completion,
            common::responses_body(MODEL, true, false),
            Some("resp_bench"),
        ),
    ];
    let mut g = c.benchmark_group("translate");
    for (name, client, provider, sse, complete, request, id) in cases {
        let t = target(UPSTREAM_MODEL);
        // Checked once: each direction yields what the bench then times.
        let pivot = client.decode_request(&request).expect("client request");
        assert!(
            !provider
                .encode_chat(&pivot, &t)
                .expect("provider body")
                .is_empty()
        );
        let answer = provider.decode_chat(complete, &t).expect("complete answer");
        assert!(!client.encode_response(&answer, &ctx(id)).is_empty());
        let stream = |sse: &[u8]| {
            let mut dec = provider.chat_stream(&t, 1 << 20);
            let mut enc = client.stream_encoder(&ctx(id));
            let mut out = bytes::BytesMut::new();
            let mut chunks: Vec<ChatChunk> = Vec::new();
            enc.start(&mut out);
            dec.push(sse, &mut chunks).expect("stream");
            dec.finish(&mut chunks).expect("stream end");
            for c in chunks.drain(..) {
                enc.chunk(&c, &mut out);
            }
            enc.finish(dec.usage(), &mut out);
            out
        };
        assert!(stream(sse).len() > 100, "{name}: a stream");
        g.bench_function(format!("{name}/request"), |b| {
            b.iter(|| {
                let p = client.decode_request(black_box(&request)).expect("request");
                provider.encode_chat(&p, &t).expect("provider body")
            })
        });
        g.bench_function(format!("{name}/answer"), |b| {
            b.iter(|| {
                let a = provider
                    .decode_chat(black_box(complete), &t)
                    .expect("answer");
                client.encode_response(&a, &ctx(id))
            })
        });
        g.bench_function(format!("{name}/stream"), |b| {
            b.iter(|| stream(black_box(sse)))
        });
    }
    g.finish();
}

const BATCH: usize = 500;

fn usage_rows(fx: &Fixture) -> Vec<Settled> {
    (0..BATCH)
        .map(|i| Settled {
            event: UsageEvent {
                at: chrono::Utc::now(),
                user_id: fx.user_id.clone(),
                key_id: fx.key_id.clone(),
                model: MODEL.into(),
                provider: PROVIDER.into(),
                endpoint: Endpoint::ChatCompletions,
                stream: i % 2 == 0,
                status: 200,
                usage: Usage {
                    prompt: 412,
                    completion: 38 + i as i64 % 50,
                    cached: 128,
                    ..Default::default()
                },
                prices: Prices {
                    input: 2_500_000_000,
                    output: 10_000_000_000,
                    cached_input: Some(1_250_000_000),
                    ..Default::default()
                },
                latency_ms: 840,
                ttft_ms: Some(210),
                tokens_estimated: false,
                request_id: uuid::Uuid::new_v4().to_string(),
                shared_key: false,
                error: None,
                extra_cost_nanos: 0,
                response_id: None,
                conversation_id: None,
                routed: Default::default(),
                reservation: Reservation::default(),
                charged: true,
                ticket: Ticket::new(),
            },
            cost_nanos: 1_745_000,
        })
        .collect()
}

fn stage_usage_writer(c: &mut Criterion, e: &Env) {
    let db = e.app.state.db.clone();
    let replica = e.app.state.leases.replica().to_owned();
    // What the writer hands the store: the rows and the per-key and per-user amounts.
    let write = |settled: Vec<Settled>| {
        let (db, replica) = (&db, &replica);
        async move {
            let rows: Vec<_> = settled.iter().map(Settled::record).collect();
            let (keys, users) = charges(&settled);
            write_batch(db, replica, black_box(&rows), &keys, &users).await
        }
    };
    e.rt.block_on(write(usage_rows(&e.fx)))
        .expect("a batch lands");

    let mut g = c.benchmark_group("usage_writer");
    g.sample_size(20);
    g.measurement_time(Duration::from_secs(8));
    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function("write_batch_500_sqlite_file", |b| {
        // Fresh rows per batch: `event_id` is unique.
        b.to_async(&e.rt).iter_batched(
            || usage_rows(&e.fx),
            |rows| async { write(rows).await.expect("write") },
            criterion::BatchSize::SmallInput,
        )
    });
    g.finish();
}

/// ⑦ The usage spool's started record, written on the request path just before a request goes
/// upstream (one per request), and the finished records of a writer batch (500). The ids
/// `started_line` and `finished_lines_500` are kept from when they were JSON lines, so runs
/// compare across the change.
fn stage_spool(c: &mut Criterion, e: &Env) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (spool, _) = Spool::open(dir.path()).expect("spool");
    let facts = RequestFacts {
        user_id: e.fx.user_id.clone(),
        key_id: e.fx.key_id.clone(),
        model: MODEL.into(),
        provider: PROVIDER.into(),
        endpoint: Endpoint::ChatCompletions,
        stream: true,
        prices: Prices {
            input: 2_500_000_000,
            output: 10_000_000_000,
            cached_input: Some(1_250_000_000),
            ..Default::default()
        },
        request_id: uuid::Uuid::new_v4().to_string(),
        shared_key: false,
        reservation: Reservation::default(),
        charged: true,
        bounds: Default::default(),
        request_body: Bytes::new(),
        request_len: 2048,
        response_id: None,
        conversation_id: None,
        routed: Default::default(),
        extra_cost_nanos: 0,
        units_metered: false,
    };
    // Every started request is committed (outside the timing) so sealed segments go away, as
    // the writer does it.
    let commit = |tickets: Vec<Ticket>| {
        let mut tickets = tickets.into_iter();
        loop {
            let mut rows = usage_rows(&e.fx);
            rows.truncate(tickets.len());
            if rows.is_empty() {
                break;
            }
            for r in &mut rows {
                r.event.ticket = tickets.next().expect("a ticket per row");
            }
            spool.committed(&rows);
        }
        spool.maintain();
    };
    let mut g = c.benchmark_group("spool");
    g.throughput(Throughput::Elements(1));
    g.bench_function("started_line", |b| {
        b.iter_custom(|iters| {
            let mut tickets: Vec<Ticket> = (0..iters).map(|_| Ticket::new()).collect();
            let at = chrono::Utc::now();
            let t0 = Instant::now();
            for t in &mut tickets {
                spool.started(t, black_box(&facts), at).expect("append");
            }
            let took = t0.elapsed();
            commit(tickets);
            took
        })
    });
    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function("finished_lines_500", |b| {
        b.iter_batched(
            || usage_rows(&e.fx),
            |rows| {
                spool.finished(black_box(&rows)).expect("append");
                spool.maintain();
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn hot_path(c: &mut Criterion) {
    let e = env();
    stage_auth(c, &e);
    stage_admit(c, &e);
    stage_route(c, &e);
    stage_request(c);
    stage_stream(c);
    stage_translate(c);
    stage_usage_writer(c, &e);
    stage_spool(c, &e);
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = hot_path
}
criterion_main!(benches);
