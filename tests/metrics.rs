//! `/metrics` after real proxied traffic: every name API.md §7 promises, counters that agree with
//! the usage records, no per-user or per-key labels, and (with `TOLLGATE_TEST_PROMTOOL` set to a
//! promtool binary) an exposition that `promtool check metrics` accepts.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::TestApp;
use common::gateway::{new_key, setup, wait_records};
use serde_json::{Value, json};

/// One sample: name, labels, value.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// The samples and `# TYPE` lines of a text exposition (tollgate's label values carry no `,`,
/// `"` or `}`, so a simple split suffices).
fn parse(text: &str) -> (Vec<Sample>, BTreeMap<String, String>) {
    let mut samples = Vec::new();
    let mut types = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            types.insert(name.to_owned(), kind.to_owned());
            continue;
        }
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap();
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => (n, l.trim_end_matches('}')),
            None => (series, ""),
        };
        let labels = labels
            .split(',')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap();
                (k.to_owned(), v.trim_matches('"').to_owned())
            })
            .collect();
        samples.push(Sample {
            name: name.to_owned(),
            labels,
            value: value.parse().unwrap_or_else(|_| panic!("value in {line}")),
        });
    }
    (samples, types)
}

/// Sum of `name` over the series whose labels include every pair of `want`.
fn sum(samples: &[Sample], name: &str, want: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            want.iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .sum()
}

async fn scrape(app: &TestApp) -> String {
    let r = app.client.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    r.text().await.unwrap()
}

async fn send(app: &TestApp, key: &str, path: &str, body: Value) -> u16 {
    let r = app
        .client
        .post(app.url(path))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .unwrap();
    let s = r.status().as_u16();
    r.text().await.unwrap();
    s
}

/// What every record contributes, summed: (prompt, completion, cached, cost nanos).
fn record_sums<'a>(recs: impl IntoIterator<Item = &'a Value>) -> (f64, f64, f64, i64) {
    recs.into_iter().fold((0.0, 0.0, 0.0, 0), |a, r| {
        (
            a.0 + r["prompt_tokens"].as_f64().unwrap(),
            a.1 + r["completion_tokens"].as_f64().unwrap(),
            a.2 + r["cached_tokens"].as_f64().unwrap(),
            a.3 + (r["cost_usd"].as_f64().unwrap() * 1e9).round() as i64,
        )
    })
}

#[tokio::test]
async fn metrics_agree_with_the_usage_records() {
    let app = TestApp::spawn().await;
    let gw = setup(&app).await;
    let chat = "/v1/chat/completions";
    let traffic = [
        (chat, json!({"model": "gpt-test", "messages": []})),
        (
            chat,
            json!({"model": "gpt-test", "stream": true, "messages": []}),
        ),
        (chat, json!({"model": "gpt-cached", "messages": []})),
        (
            chat,
            json!({"model": "gpt-cached", "stream": true, "stream_options": {"include_usage": true}, "messages": []}),
        ),
        (chat, json!({"model": "gpt-400", "messages": []})),
        (chat, json!({"model": "gpt-500", "messages": []})),
        (
            "/v1/completions",
            json!({"model": "text-test", "prompt": "hi"}),
        ),
        (
            "/v1/embeddings",
            json!({"model": "embed-test", "input": "hi"}),
        ),
    ];
    for (path, body) in &traffic {
        send(&app, &gw.key, path, body.clone()).await;
    }
    // A key with 1 request per minute: the second request is refused by `key_rpm`.
    let (slow_key, _) = new_key(&app, &gw.user, json!({"name": "one-rpm", "rpm_limit": 1})).await;
    let body = json!({"model": "gpt-test", "messages": []});
    assert_eq!(send(&app, &slow_key, chat, body.clone()).await, 200);
    assert_eq!(send(&app, &slow_key, chat, body).await, 429);
    let gateway_requests = traffic.len() + 2;

    let recs = wait_records(&app, &gw.user, traffic.len() + 1).await;
    assert_eq!(recs.len(), traffic.len() + 1);
    let (prompt, completion, cached, cost) = record_sums(&recs);
    assert!(prompt > 0.0 && completion > 0.0 && cached > 0.0);

    // The writer counts tokens right after the batch commits: poll until it caught up.
    let deadline = Instant::now() + Duration::from_secs(10);
    let (text, samples, types) = loop {
        let text = scrape(&app).await;
        let (samples, types) = parse(&text);
        if sum(&samples, "tollgate_tokens_total", &[("kind", "prompt")]) == prompt {
            break (text, samples, types);
        }
        assert!(Instant::now() < deadline, "tokens never matched:\n{text}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    };

    // Every contract name, with its type.
    for (name, kind) in [
        ("tollgate_requests_total", "counter"),
        ("tollgate_request_duration_seconds", "histogram"),
        ("tollgate_time_to_first_token_seconds", "histogram"),
        ("tollgate_tokens_total", "counter"),
        ("tollgate_cost_usd_total", "counter"),
        ("tollgate_rate_limited_total", "counter"),
        ("tollgate_active_streams", "gauge"),
        ("tollgate_usage_queue_depth", "gauge"),
        ("tollgate_usage_write_errors_total", "counter"),
        ("tollgate_auth_cache_hits_total", "counter"),
        ("tollgate_auth_cache_misses_total", "counter"),
    ] {
        assert_eq!(
            types.get(name).map(String::as_str),
            Some(kind),
            "{name} missing or mistyped"
        );
        assert!(
            text.contains(&format!("# HELP {name} ")),
            "{name} has no HELP"
        );
    }
    // Process metrics.
    for name in [
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_start_time_seconds",
    ] {
        assert!(samples.iter().any(|s| s.name == name), "{name} missing");
    }

    // Labels exactly as the contract says; never a user or a key.
    let label_set = |name: &str| -> BTreeSet<String> {
        samples
            .iter()
            .filter(|s| s.name == name)
            .flat_map(|s| s.labels.keys().cloned())
            .collect()
    };
    let set = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<BTreeSet<_>>();
    assert_eq!(
        label_set("tollgate_requests_total"),
        set(&["endpoint", "model", "provider", "status"])
    );
    assert_eq!(
        label_set("tollgate_tokens_total"),
        set(&["kind", "model", "provider"])
    );
    assert_eq!(
        label_set("tollgate_cost_usd_total"),
        set(&["model", "provider"])
    );
    assert_eq!(label_set("tollgate_rate_limited_total"), set(&["scope"]));
    for s in &samples {
        for k in s.labels.keys() {
            assert!(
                !k.contains("user") && !k.contains("key"),
                "per-user/key label {k} on {}",
                s.name
            );
        }
        for v in s.labels.values() {
            assert!(
                !v.contains(&gw.key_id) && !v.starts_with("sk-"),
                "a key in a label: {s:?}"
            );
        }
    }

    // Counters equal the records, overall and per model and status.
    assert_eq!(
        sum(&samples, "tollgate_tokens_total", &[("kind", "completion")]),
        completion
    );
    assert_eq!(
        sum(&samples, "tollgate_tokens_total", &[("kind", "cached")]),
        cached
    );
    let cost_metric = sum(&samples, "tollgate_cost_usd_total", &[]);
    assert!(
        (cost_metric - cost as f64 / 1e9).abs() < 1e-9,
        "cost {cost_metric} vs records {cost}"
    );
    assert_eq!(
        sum(&samples, "tollgate_requests_total", &[]),
        recs.len() as f64
    );
    let mut per: BTreeMap<(String, String, String), usize> = BTreeMap::new();
    for r in &recs {
        *per.entry((
            r["endpoint"].as_str().unwrap().to_owned(),
            r["model"].as_str().unwrap().to_owned(),
            r["status"].to_string(),
        ))
        .or_default() += 1;
        let model = r["model"].as_str().unwrap();
        let (p, c, _, _) = record_sums(recs.iter().filter(|x| x["model"] == model));
        assert_eq!(
            sum(
                &samples,
                "tollgate_tokens_total",
                &[("model", model), ("provider", "mock"), ("kind", "prompt")]
            ),
            p,
            "{model}"
        );
        assert_eq!(
            sum(
                &samples,
                "tollgate_tokens_total",
                &[("model", model), ("kind", "completion")]
            ),
            c,
            "{model}"
        );
    }
    for ((endpoint, model, status), n) in &per {
        assert_eq!(
            sum(
                &samples,
                "tollgate_requests_total",
                &[
                    ("endpoint", endpoint),
                    ("model", model),
                    ("provider", "mock"),
                    ("status", status)
                ]
            ),
            *n as f64,
            "{endpoint} {model} {status}"
        );
    }
    assert_eq!(
        sum(&samples, "tollgate_request_duration_seconds_count", &[]),
        recs.len() as f64
    );
    let first_bytes = sum(&samples, "tollgate_time_to_first_token_seconds_count", &[]);
    assert!(
        first_bytes >= 2.0 && first_bytes <= recs.len() as f64,
        "{first_bytes}"
    );
    assert_eq!(
        sum(
            &samples,
            "tollgate_rate_limited_total",
            &[("scope", "key_rpm")]
        ),
        1.0
    );
    for scope in ["key_tpm", "user_rpm", "user_tpm", "login"] {
        assert_eq!(
            sum(&samples, "tollgate_rate_limited_total", &[("scope", scope)]),
            0.0,
            "{scope} exists from the start at 0"
        );
    }
    // One key lookup per /v1 request: the first of each key misses, the rest hit.
    let hits = sum(&samples, "tollgate_auth_cache_hits_total", &[]);
    let misses = sum(&samples, "tollgate_auth_cache_misses_total", &[]);
    assert_eq!(hits + misses, gateway_requests as f64);
    assert!(misses >= 2.0 && hits >= 1.0, "{hits} hits, {misses} misses");
    assert_eq!(sum(&samples, "tollgate_active_streams", &[]), 0.0);
    assert_eq!(sum(&samples, "tollgate_usage_write_errors_total", &[]), 0.0);
    assert_eq!(sum(&samples, "tollgate_usage_queue_depth", &[]), 0.0);

    promtool_check(&text);
}

#[tokio::test]
async fn queue_depth_counts_requests_in_flight() {
    let app = TestApp::spawn().await;
    let gw = setup(&app).await;
    // A slow stream holds its usage slot until it ends.
    let r = app
        .client
        .post(app.url("/v1/chat/completions"))
        .bearer_auth(&gw.key)
        .json(&json!({"model": "gpt-slow", "stream": true, "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (samples, _) = parse(&scrape(&app).await);
    assert_eq!(sum(&samples, "tollgate_usage_queue_depth", &[]), 1.0);
    assert_eq!(sum(&samples, "tollgate_active_streams", &[]), 1.0);
    r.text().await.unwrap();
    wait_records(&app, &gw.user, 1).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (samples, _) = parse(&scrape(&app).await);
        if sum(&samples, "tollgate_usage_queue_depth", &[]) == 0.0 {
            assert_eq!(sum(&samples, "tollgate_active_streams", &[]), 0.0);
            break;
        }
        assert!(Instant::now() < deadline, "the slot was never given back");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test]
async fn metrics_token_guards_the_endpoint() {
    let app = TestApp::spawn_with(|c| {
        c.server.metrics_token = Some(secrecy::SecretString::from("scrape-me".to_owned()));
    })
    .await;
    let r = app.client.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = app
        .client
        .get(app.url("/metrics"))
        .bearer_auth("scrape-me")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    assert!(text.contains("tollgate_usage_queue_depth 0"));
    promtool_check(&text);
}

/// `promtool check metrics` on the exposition, when `TOLLGATE_TEST_PROMTOOL` names the binary.
fn promtool_check(text: &str) {
    use std::io::Write;
    let Some(promtool) = std::env::var_os("TOLLGATE_TEST_PROMTOOL").filter(|p| !p.is_empty())
    else {
        return;
    };
    let mut child = std::process::Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("running {}: {e}", promtool.to_string_lossy()));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\n--- exposition ---\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
