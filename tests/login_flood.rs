//! An anonymous login flood while `/v1` traffic flows (issue 18, item 8). Its own test binary:
//! the argon2 gate is process-wide, and other tests hashing in parallel would share it.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use common::{TestApp, assert_error};
use serde_json::{Value, json};

/// Resident memory of this process (server included), in bytes.
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS")
        * 1024
}

/// 200 concurrent logins with random usernames from 200 addresses, and 100 more from one
/// address, while `/v1` requests go through the mock upstream: the argon2 gate refuses what is
/// beyond its queue (503 with `retry-after`), the per-address limit refuses the single address's
/// excess (429), every `/v1` request succeeds, and memory stays bounded (unbounded, 200 argon2
/// checks at once took ~3 GB).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_login_flood_is_bounded_and_v1_keeps_working() {
    let app = TestApp::spawn_with(|c| c.server.trust_forwarded_for = true).await;
    let gw = common::gateway::setup(&app).await;
    let app = Arc::new(app);

    let before = rss();
    let peak = Arc::new(AtomicU64::new(before));
    let flooding = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (peak, flooding) = (peak.clone(), flooding.clone());
        tokio::spawn(async move {
            while flooding.load(Ordering::Acquire) {
                peak.fetch_max(rss(), Ordering::AcqRel);
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        })
    };

    let login = |ip: String, i: usize| {
        let app = app.clone();
        tokio::spawn(async move {
            let resp = app
                .client
                .post(app.url("/api/auth/login"))
                .header("x-forwarded-for", ip)
                .json(&json!({ "username": format!("user{i:08x}"), "password": "guess-guess", "totp_code": "000000" }))
                .send()
                .await
                .expect("login request");
            let status = resp.status().as_u16();
            let retry_after = resp.headers().contains_key("retry-after");
            let body: Value = resp.json().await.unwrap_or(Value::Null);
            (status, retry_after, body)
        })
    };
    let mut flood: Vec<_> = (0..200)
        .map(|i| login(format!("10.{}.{}.1", i / 250, i % 250), i))
        .collect();
    flood.extend((200..300).map(|i| login("192.0.2.99".to_owned(), i)));

    let v1 = (0..40).map(|_| {
        let (app, key) = (app.clone(), gw.key.clone());
        tokio::spawn(async move {
            app.client
                .post(app.url("/v1/chat/completions"))
                .bearer_auth(key)
                .json(&json!({ "model": "gpt-test", "messages": [{"role": "user", "content": "hi"}] }))
                .send()
                .await
                .expect("/v1 request")
                .status()
                .as_u16()
        })
    });
    let v1 = futures_util::future::join_all(v1).await;
    let answers = futures_util::future::join_all(flood).await;
    flooding.store(false, Ordering::Release);
    sampler.await.expect("sampler");

    for s in v1 {
        assert_eq!(s.expect("join"), 200, "every /v1 request succeeds");
    }
    let (mut busy, mut limited) = (0, 0);
    for a in answers {
        let (status, retry_after, body) = a.expect("join");
        match status {
            401 => assert_error(status, &body, 401, "invalid_credentials"),
            503 => {
                assert_error(status, &body, 503, "unavailable");
                assert!(retry_after, "503 carries retry-after");
                busy += 1;
            }
            429 => {
                assert!(retry_after, "429 carries retry-after");
                assert!(
                    matches!(
                        body["error"]["code"].as_str(),
                        Some("rate_limit_exceeded" | "account_locked")
                    ),
                    "{body}"
                );
                limited += 1;
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert!(busy > 0, "the argon2 gate refused the excess");
    assert!(limited > 0, "the per-address limit refused the excess");
    let grown = peak.load(Ordering::Acquire).saturating_sub(before);
    assert!(
        grown < 1024 * 1024 * 1024,
        "resident memory grew by {} MiB",
        grown / (1024 * 1024)
    );
}
