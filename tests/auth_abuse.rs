//! Abuse of the public endpoints (issue 18, items 8–11): login floods, lockouts a stranger could
//! cause or race past, out-of-range pagination, slow request bodies and connection floods.

mod common;

use std::time::Duration;

use common::accounts::{PASSWORD, admin_token, create_user, fresh_code};
use common::{TestApp, assert_error};
use sea_orm::{ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tollgate::accounts::signup::Role;

/// Signs in as `username` from `ip` (the app trusts `X-Forwarded-For`).
async fn login_from(
    app: &TestApp,
    ip: &str,
    username: &str,
    password: &str,
    code: &str,
) -> (u16, Value) {
    let resp = app
        .client
        .post(app.url("/api/auth/login"))
        .header("x-forwarded-for", ip)
        .json(&json!({ "username": username, "password": password, "totp_code": code }))
        .send()
        .await
        .expect("request");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Attempts recorded for `username` with this reason.
async fn attempts(app: &TestApp, username: &str, reason: &str) -> u64 {
    entity::login_history::Entity::find()
        .filter(entity::login_history::Column::Username.eq(username))
        .filter(entity::login_history::Column::Reason.eq(reason))
        .count(&app.state.db)
        .await
        .expect("count")
}

/// An app that takes the client address from `X-Forwarded-For`, without the per-address limit
/// (these tests are about the lockout).
async fn app_behind_proxy() -> TestApp {
    TestApp::spawn_with(|c| {
        c.server.trust_forwarded_for = true;
        c.auth.ip_rpm = 0;
    })
    .await
}

/// Every list route, the public model list included, refuses a `page` or `per_page` outside its
/// range with 400 `invalid_value` naming the parameter — instead of overflowing the offset (which
/// panicked the worker and dropped the connection).
#[tokio::test]
async fn out_of_range_pages_are_refused_on_every_list_route() {
    let app = TestApp::spawn().await;
    let admin = admin_token(&app).await;
    let routes = [
        "/api/models",
        "/api/providers",
        "/api/keys",
        "/api/provider-keys",
        "/api/me/login-history",
        "/api/me/ip-records",
        "/api/me/audit-log",
        "/api/me/usage/records",
        "/api/me/balance/transactions",
        "/api/admin/users",
        "/api/admin/audit-log",
        "/api/admin/usage/records",
    ];
    let bad = [
        ("page", "18446744073709551615"),
        ("page", "0"),
        ("page", "1000000001"),
        ("page", "-1"),
        ("per_page", "0"),
        ("per_page", "101"),
        ("per_page", "18446744073709551615"),
        ("per_page", "-5"),
    ];
    for route in routes {
        let (s, b) = app.get(route, Some(&admin)).await;
        assert_eq!(s, 200, "{route}: {b}");
        let (s, b) = app
            .get(
                &format!("{route}?page=1000000000&per_page=100"),
                Some(&admin),
            )
            .await;
        assert_eq!(s, 200, "{route} at the largest page: {b}");
        assert_eq!(b["data"], serde_json::json!([]), "{route}");
        for (param, value) in bad {
            let (s, b) = app
                .get(&format!("{route}?{param}={value}"), Some(&admin))
                .await;
            assert_error(s, &b, 400, "invalid_value");
            assert_eq!(b["error"]["param"], param, "{route}?{param}={value}: {b}");
        }
    }
    // Anonymous on the public list too, and the server is still answering.
    let (s, b) = app.get("/api/models?page=18446744073709551615", None).await;
    assert_error(s, &b, 400, "invalid_value");
    let (s, _) = app.get("/health", None).await;
    assert_eq!(s, 200);
}

/// Five wrong passwords from one address lock the username for that address only: the owner,
/// signing in from elsewhere, is not locked out by a stranger.
#[tokio::test]
async fn a_stranger_cannot_lock_the_owner_out() {
    let app = app_behind_proxy().await;
    let admin = create_user(&app, "root", Role::Admin).await;
    for _ in 0..5 {
        let (s, e) = login_from(&app, "198.51.100.7", "root", "wrong-password", "000000").await;
        assert_error(s, &e, 401, "invalid_credentials");
    }
    // The stranger's address is locked, even with the right password.
    let (s, e) = login_from(&app, "198.51.100.7", "root", PASSWORD, "000000").await;
    assert_error(s, &e, 429, "account_locked");
    // The owner, from their own address, signs in.
    let code = fresh_code(&app, &admin.id, &admin.totp_secret).await;
    let (s, b) = login_from(&app, "203.0.113.9", "root", PASSWORD, &code).await;
    assert_eq!(s, 200, "{b}");
}

/// Fifty failures spread over many addresses lock the username for every address the account
/// never signed in from — but not for the owner's known address.
#[tokio::test]
async fn many_addresses_hit_the_backstop_but_not_the_owners_known_address() {
    let app = app_behind_proxy().await;
    let u = create_user(&app, "carol", Role::User).await;
    let code = fresh_code(&app, &u.id, &u.totp_secret).await;
    let (s, b) = login_from(&app, "203.0.113.20", "carol", PASSWORD, &code).await;
    assert_eq!(s, 200, "{b}");
    for i in 0..50 {
        // Ten addresses, five guesses each: none reaches its own lock before the last round.
        let ip = format!("198.51.100.{}", i % 10 + 1);
        let (s, e) = login_from(&app, &ip, "carol", "wrong-password", "000000").await;
        assert_error(s, &e, 401, "invalid_credentials");
    }
    let (s, e) = login_from(&app, "192.0.2.200", "carol", PASSWORD, "000000").await;
    assert_error(s, &e, 429, "account_locked");
    let code = fresh_code(&app, &u.id, &u.totp_secret).await;
    let (s, b) = login_from(&app, "203.0.113.20", "carol", PASSWORD, &code).await;
    assert_eq!(s, 200, "the owner's known address is not locked: {b}");
}

/// 200 parallel wrong passwords for one username from one address: the count is taken before
/// the hash, so at most five are ever checked (check-then-hash-then-record let 32 through).
#[tokio::test]
async fn parallel_guesses_get_no_more_than_five_checks() {
    let app = app_behind_proxy().await;
    create_user(&app, "dave", Role::User).await;
    let calls = (0..200).map(|i| {
        let app = &app;
        async move {
            login_from(
                app,
                "198.51.100.50",
                "dave",
                &format!("wrong-{i}"),
                "000000",
            )
            .await
        }
    });
    let answers = futures_util::future::join_all(calls).await;
    let checked = attempts(&app, "dave", "bad_password").await;
    assert!(checked <= 5, "{checked} passwords checked");
    for (s, e) in &answers {
        match *s {
            401 => assert_error(*s, e, 401, "invalid_credentials"),
            429 => assert_error(*s, e, 429, "account_locked"),
            503 => assert_error(*s, e, 503, "unavailable"),
            other => panic!("unexpected {other}: {e}"),
        }
    }
    let refused_401 = answers.iter().filter(|(s, _)| *s == 401).count() as u64;
    assert_eq!(refused_401, checked);
    assert_eq!(
        attempts(&app, "dave", "pending").await,
        0,
        "every attempt finished"
    );
    // Attempts in flight count as failures, so a burst may check fewer than five; the lock
    // follows from the failures actually recorded.
    let (s, e) = login_from(&app, "198.51.100.50", "dave", PASSWORD, "000000").await;
    let (status, code) = if checked == 5 {
        (429, "account_locked")
    } else {
        (401, "invalid_credentials")
    };
    assert_error(s, &e, status, code);
}

/// The anonymous `/api/auth/*` routes are limited per client address: past `auth.ip_rpm`, 429
/// `rate_limit_exceeded` with `retry-after`, counted under `scope="auth_ip"`; another address is
/// unaffected, and so are `verify` and `logout` (they need a valid token).
#[tokio::test]
async fn auth_routes_are_limited_per_address() {
    let app = TestApp::spawn_with(|c| {
        c.server.trust_forwarded_for = true;
        c.auth.ip_rpm = 3;
    })
    .await;
    for _ in 0..3 {
        let (s, _) = login_from(&app, "198.51.100.1", "nobody", "wrong-password", "000000").await;
        assert_eq!(s, 401);
    }
    let resp = app
        .client
        .post(app.url("/api/auth/register"))
        .header("x-forwarded-for", "198.51.100.1")
        .json(&json!({ "username": "newbie", "password": PASSWORD }))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 429);
    let retry: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry >= 1);
    let e: Value = resp.json().await.unwrap();
    assert_error(429, &e, 429, "rate_limit_exceeded");
    // Verifying a session and signing out need a valid token and check no password: a console
    // page load from a spent address still keeps its session, and signing out still works.
    let ada = create_user(&app, "ada", Role::User).await;
    let token = common::accounts::session_token(&app, &ada).await;
    for (method, path, want) in [
        (reqwest::Method::GET, "/api/auth/verify", 200),
        (reqwest::Method::GET, "/api/auth/verify", 200),
        (reqwest::Method::POST, "/api/auth/logout", 204),
    ] {
        let resp = app
            .client
            .request(method, app.url(path))
            .header("x-forwarded-for", "198.51.100.1")
            .bearer_auth(&token)
            .send()
            .await
            .expect("request");
        assert_eq!(resp.status().as_u16(), want, "{path}");
    }
    let (s, _) = login_from(&app, "198.51.100.1", "nobody", "wrong-password", "000000").await;
    assert_eq!(s, 429, "the sign-in budget is still spent");
    let (s, _) = login_from(&app, "198.51.100.2", "nobody", "wrong-password", "000000").await;
    assert_eq!(s, 401);
    let limited = app
        .state
        .metrics
        .rate_limited_total
        .with_label_values(&["auth_ip"])
        .get();
    assert_eq!(limited, 2);
    // Nothing was recorded for the refused request.
    assert_eq!(
        store_count_username(&app, "newbie").await,
        0,
        "a refused registration creates nothing"
    );
}

async fn store_count_username(app: &TestApp, username: &str) -> u64 {
    entity::users::Entity::find()
        .filter(entity::users::Column::Username.eq(username))
        .count(&app.state.db)
        .await
        .expect("count")
}

/// Reads one HTTP/1.1 response head and returns its status (bounded, so a missing answer fails
/// the test instead of hanging it).
async fn read_status(conn: &mut (impl tokio::io::AsyncRead + Unpin)) -> u16 {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    let read = async {
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = conn.read(&mut chunk).await.expect("read");
            assert!(n > 0, "connection closed without an answer");
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(Duration::from_secs(60), read)
        .await
        .expect("an answer within a minute");
    let head = String::from_utf8_lossy(&buf);
    head.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status line")
}

/// Polls `f` until it holds (bounded, so a condition that never comes fails the test).
async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A `/v1` client that sends its head and then dribbles the body gets 408 `request_timeout` once
/// `server.body_read_timeout_secs` has passed; nothing reaches the upstream, and the connection
/// is closed and leaves the open-connections gauge.
#[tokio::test]
async fn a_dribbled_v1_body_times_out_with_408() {
    let app = TestApp::spawn_with(|c| c.server.body_read_timeout_secs = 1).await;
    let gw = common::gateway::setup(&app).await;
    let open_before = app.state.metrics.connections_open.get();
    let conn = tokio::net::TcpStream::connect(app.addr)
        .await
        .expect("connect");
    let (mut rx, mut tx) = conn.into_split();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: {}\r\nauthorization: Bearer {}\r\ncontent-type: application/json\r\ncontent-length: 100000\r\n\r\n{{\"model\":",
        app.addr, gw.key
    );
    tx.write_all(head.as_bytes()).await.expect("write");
    until("the connection is open", || {
        app.state.metrics.connections_open.get() > open_before
    })
    .await;
    // A byte every 100 ms, for as long as the server reads.
    let dribble = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if tx.write_all(b" ").await.is_err() {
                break;
            }
        }
    });
    let status = read_status(&mut rx).await;
    assert_eq!(status, 408);
    assert!(gw.mock.requests().is_empty(), "nothing went upstream");
    drop(rx);
    until("the connection is closed", || {
        app.state.metrics.connections_open.get() == open_before
    })
    .await;
    dribble.abort();
}

/// At `server.max_connections` the listener stops accepting: a further connection waits, is
/// counted in `tollgate_connection_limit_reached_total`, and is served as soon as one closes;
/// the open-connections gauge drops back to 0.
#[tokio::test]
async fn connections_past_the_cap_wait_for_a_free_slot() {
    let app = TestApp::spawn_with(|c| c.server.max_connections = 2).await;
    let m = &app.state.metrics;
    let first = tokio::net::TcpStream::connect(app.addr)
        .await
        .expect("connect");
    let second = tokio::net::TcpStream::connect(app.addr)
        .await
        .expect("connect");
    until("two connections open", || m.connections_open.get() == 2).await;
    until("the cap is reported", || {
        m.connection_limit_reached_total.get() >= 1
    })
    .await;
    let mut third = tokio::net::TcpStream::connect(app.addr)
        .await
        .expect("connect");
    third
        .write_all(b"GET /health HTTP/1.1\r\nhost: t\r\n\r\n")
        .await
        .expect("write");
    // Not accepted, so not answered, while both slots are held.
    assert_eq!(m.connections_open.get(), 2);
    let mut probe = [0u8; 16];
    assert!(matches!(
        third.try_read(&mut probe),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
    ));
    drop(first);
    assert_eq!(read_status(&mut third).await, 200);
    drop((second, third));
    until("every connection closed", || m.connections_open.get() == 0).await;
}

/// A client speaking HTTP/2 from its first byte (prior knowledge) is served as one speaking
/// HTTP/1.1 is: the server tells them apart by peeking at the connection's first bytes.
#[tokio::test]
async fn an_http2_client_is_served_on_the_same_port() {
    let app = TestApp::spawn().await;
    let tcp = tokio::net::TcpStream::connect(app.addr)
        .await
        .expect("connect");
    let (mut tx, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .expect("HTTP/2 handshake");
    tokio::spawn(conn);
    for _ in 0..2 {
        let req = http::Request::get(format!("http://{}/health", app.addr))
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let resp = tx.send_request(req).await.expect("response");
        assert_eq!(resp.version(), http::Version::HTTP_2);
        assert_eq!(resp.status(), 200);
    }
    // And HTTP/1.1 beside it.
    let (status, _) = app.get("/health", None).await;
    assert_eq!(status, 200);
}

/// A connection that has sent nothing does not hold a shutdown for the whole drain: it is closed
/// at once (the drain is for requests under way).
#[tokio::test]
async fn a_silent_connection_does_not_hold_the_shutdown() {
    let app = TestApp::spawn_with(|c| c.server.shutdown_drain_secs = 120).await;
    let m = app.state.metrics.clone();
    let mut silent = tokio::net::TcpStream::connect(app.addr)
        .await
        .expect("connect");
    until("the connection is open", || m.connections_open.get() == 1).await;
    // Well inside the 120 s drain: the server returns without waiting for it.
    tokio::time::timeout(Duration::from_secs(20), app.stop())
        .await
        .expect("shutdown waited for a silent connection");
    let mut buf = [0u8; 1];
    assert_eq!(silent.read(&mut buf).await.expect("closed, not reset"), 0);
}

/// A client still sending a body the gateway answered early (here a declared body over
/// `server.max_body_bytes`, refused before it is read) reads that answer and then the end of the
/// connection: the server reads and discards the rest before closing, instead of closing on
/// unread data, which resets the connection under the client's writes.
#[tokio::test]
async fn an_early_answer_reaches_a_client_still_sending() {
    let app = TestApp::spawn_with(|c| c.server.max_body_bytes = 4096).await;
    let mut tcp = tokio::net::TcpStream::connect(app.addr)
        .await
        .expect("connect");
    let head = format!(
        "POST /api/auth/login HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        app.addr,
        1024 * 1024
    );
    tcp.write_all(head.as_bytes()).await.expect("head");
    tcp.write_all(&[b' '; 64 * 1024]).await.expect("first part");
    // The answer is sent (and the connection closed by the server) while the client, not
    // reading, goes on sending.
    tokio::time::sleep(Duration::from_millis(200)).await;
    for _ in 0..20 {
        tcp.write_all(&[b' '; 16 * 1024])
            .await
            .expect("still sending, not reset");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut answer = Vec::new();
    tcp.read_to_end(&mut answer)
        .await
        .expect("the answer, then the end");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("payload_too_large"), "{answer}");
}
