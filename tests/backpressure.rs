//! Slow readers (issue 24, "bad input under load"): a streaming client that stops reading must
//! not make the gateway buffer the upstream's answer. The relay is pulled by the client's
//! connection: hyper asks the stream body for its next frame only when its write buffer has
//! room, and the body reads the upstream only when asked. So a client that reads nothing holds
//! at most a bounded amount in the gateway (its write buffer, one gathered frame, one event
//! being scanned) and the rest waits in the kernel's socket buffers, then at the upstream,
//! whose writes block.
//!
//! The upstream here is a raw HTTP/1.1 server that writes a large SSE answer as fast as its
//! socket accepts it and counts the bytes each write handed to the kernel. The client sets a
//! 64 KiB receive buffer, sends a streamed chat request, reads the response head, then nothing
//! for 3 s: the upstream must have got only a bounded part of its answer out, and stopped; the
//! gateway (this process: the server runs in-process) must not have grown by more than a bound.
//! Then the client reads everything: the stream completes intact, with a usage record.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use common::TestApp;
use common::accounts::{admin_token, user_token};
use common::gateway::{new_key, wait_records};

/// Characters of content per SSE event (a large event, so the scan and copy dominate).
const EVENT_CONTENT: usize = 8 * 1024;
/// Events per upstream write (one HTTP chunk of about 64 KiB).
const EVENTS_PER_WRITE: usize = 8;
/// The client's receive buffer, as the slow reader has.
const CLIENT_RCVBUF: u32 = 64 * 1024;
/// The upstream's send buffer: fixed, so what it got out is the gateway's doing, not its own
/// kernel buffer growing.
const UPSTREAM_SNDBUF: u32 = 64 * 1024;
/// How long the client reads nothing.
const PAUSE: Duration = Duration::from_secs(3);
/// Usage the upstream reports at the end.
const PROMPT_TOKENS: u64 = 21;

fn content_event(n: usize) -> String {
    let text = "x".repeat(EVENT_CONTENT);
    let chunk = json!({
        "id": format!("chatcmpl-slow{n}"), "object": "chat.completion.chunk", "created": 1,
        "model": "slow-upstream",
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": null}]
    });
    format!("data: {chunk}\n\n")
}

/// A raw HTTP/1.1 upstream: answers every request with `writes` chunks of
/// [`EVENTS_PER_WRITE`] content events, then a usage chunk and `[DONE]`, as fast as its socket
/// takes them. `accepted` counts the bytes of the answer handed to the kernel, per connection.
struct Upstream {
    addr: std::net::SocketAddr,
    accepted: Arc<std::sync::Mutex<Vec<Arc<AtomicU64>>>>,
    finished: Arc<AtomicU64>,
}

impl Upstream {
    async fn start(writes: usize) -> Self {
        let sock = TcpSocket::new_v4().expect("socket");
        // Inherited by every accepted connection.
        sock.set_send_buffer_size(UPSTREAM_SNDBUF)
            .expect("SO_SNDBUF");
        sock.bind("127.0.0.1:0".parse().expect("addr"))
            .expect("bind");
        let listener = sock.listen(1024).expect("listen");
        let addr = listener.local_addr().expect("addr");
        let accepted: Arc<std::sync::Mutex<Vec<Arc<AtomicU64>>>> = Arc::default();
        let finished = Arc::new(AtomicU64::new(0));
        // One write's bytes, built once and shared by every connection (no allocation per write).
        let events: String = (0..EVENTS_PER_WRITE).map(content_event).collect();
        let chunk = Bytes::from(format!("{:x}\r\n{events}\r\n", events.len()));
        let usage = json!({
            "id": "chatcmpl-slow", "object": "chat.completion.chunk", "created": 1,
            "model": "slow-upstream", "choices": [],
            "usage": {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": writes * EVENTS_PER_WRITE,
                      "total_tokens": PROMPT_TOKENS as usize + writes * EVENTS_PER_WRITE}
        });
        let tail = format!("data: {usage}\n\ndata: [DONE]\n\n");
        let tail = Bytes::from(format!("{:x}\r\n{tail}\r\n0\r\n\r\n", tail.len()));
        let (acc, fin) = (accepted.clone(), finished.clone());
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let counter = Arc::new(AtomicU64::new(0));
                acc.lock().expect("lock").push(counter.clone());
                let (chunk, tail, fin) = (chunk.clone(), tail.clone(), fin.clone());
                tokio::spawn(async move {
                    if read_request(&mut conn).await.is_none() {
                        return;
                    }
                    let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
                                transfer-encoding: chunked\r\nconnection: close\r\n\r\n";
                    if conn.write_all(head.as_bytes()).await.is_err() {
                        return;
                    }
                    for _ in 0..writes {
                        if conn.write_all(&chunk).await.is_err() {
                            return;
                        }
                        counter.fetch_add(chunk.len() as u64, Ordering::SeqCst);
                    }
                    if conn.write_all(&tail).await.is_ok() && conn.flush().await.is_ok() {
                        fin.fetch_add(1, Ordering::SeqCst);
                    }
                    // Let the gateway read to the end before the socket closes.
                    let mut rest = [0u8; 64];
                    let _ =
                        tokio::time::timeout(Duration::from_secs(60), conn.read(&mut rest)).await;
                });
            }
        });
        Self {
            addr,
            accepted,
            finished,
        }
    }

    fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Bytes of the answer each connection has handed to its socket so far.
    fn accepted(&self) -> Vec<u64> {
        self.accepted
            .lock()
            .expect("lock")
            .iter()
            .map(|c| c.load(Ordering::SeqCst))
            .collect()
    }
}

/// Reads one request (head and a `content-length` body); `None` if the connection ends first.
async fn read_request(conn: &mut TcpStream) -> Option<()> {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 16 * 1024];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = conn.read(&mut tmp).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&tmp[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + len {
        let n = conn.read(&mut tmp).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&tmp[..n]);
    }
    let body = &buf[head_end..head_end + len];
    assert!(
        body.windows(13).any(|w| w == b"\"stream\":true"),
        "the gateway asked for a stream: {}",
        String::from_utf8_lossy(body)
    );
    Some(())
}

/// The gateway with the raw upstream as provider `slow` and model `slow-model`; returns the
/// user's token and a gateway key.
async fn setup(app: &TestApp, upstream: &Upstream) -> (String, String) {
    let admin = admin_token(app).await;
    let (s, b) = app
        .post(
            "/api/admin/providers",
            Some(&admin),
            json!({"key": "slow", "display_name": "Slow", "base_url": upstream.base_url(), "kind": "openai"}),
        )
        .await;
    assert_eq!(s, 201, "create provider: {b}");
    let (s, b) = app
        .post(
            "/api/admin/models",
            Some(&admin),
            json!({"name": "slow-model", "provider": "slow", "upstream_model": "slow-upstream",
                   "type": "chat", "input_price_per_1m": 1.0, "output_price_per_1m": 2.0}),
        )
        .await;
    assert_eq!(s, 201, "create model: {b}");
    let user = user_token(app, "reader").await;
    let (s, b) = app
        .post(
            "/api/provider-keys",
            Some(&user),
            json!({"provider": "slow", "api_key": "sk-upstream-slow-0123456789"}),
        )
        .await;
    assert_eq!(s, 201, "provider key: {b}");
    let (key, _) = new_key(app, &user, json!({"name": "slow"})).await;
    (user, key)
}

/// A client connection with a 64 KiB receive buffer that has sent a streamed chat request and
/// read the response head, and nothing of the body yet.
async fn open_slow_stream(app: &TestApp, key: &str) -> hyper::Response<Incoming> {
    let body = json!({"model": "slow-model", "stream": true,
                      "stream_options": {"include_usage": true},
                      "messages": [{"role": "user", "content": "Tell me everything."}]});
    open_slow(app, key, "/v1/chat/completions", body).await
}

/// The same for any streamed `/v1` request.
async fn open_slow(
    app: &TestApp,
    key: &str,
    path: &str,
    body: serde_json::Value,
) -> hyper::Response<Incoming> {
    let sock = TcpSocket::new_v4().expect("socket");
    sock.set_recv_buffer_size(CLIENT_RCVBUF).expect("SO_RCVBUF");
    let stream = sock.connect(app.addr).await.expect("connect");
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let req = hyper::Request::post(path)
        .header("host", app.addr.to_string())
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("request");
    let resp = tx.send_request(req).await.expect("response head");
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .is_ok_and(|v| v.starts_with("text/event-stream")),
        "{:?}",
        resp.headers()
    );
    resp
}

/// What a client read: content events, characters of content, the usage chunk, `[DONE]` last.
#[derive(Debug, Default, PartialEq)]
struct Read {
    content_events: usize,
    content_chars: usize,
    usage_prompt_tokens: Option<u64>,
    done_last: bool,
}

/// Reads the whole stream, one event at a time (never more than one frame and one event held).
async fn read_all(resp: hyper::Response<Incoming>) -> Read {
    let mut body = resp.into_body();
    let mut buf = BytesMut::new();
    let mut out = Read::default();
    while let Some(frame) = body.frame().await {
        let frame = frame.expect("the stream broke off");
        let Ok(data) = frame.into_data() else {
            continue;
        };
        buf.extend_from_slice(&data);
        while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
            let ev = buf.split_to(end + 2);
            assert!(!out.done_last, "an event after [DONE]");
            let payload = ev
                .strip_prefix(b"data: ")
                .expect("a data event")
                .strip_suffix(b"\n\n")
                .expect("terminated");
            if payload == b"[DONE]" {
                out.done_last = true;
                continue;
            }
            let v: serde_json::Value = serde_json::from_slice(payload).expect("JSON event");
            assert_eq!(v["model"], "slow-model", "the model is renamed back");
            if let Some(p) = v["usage"]["prompt_tokens"].as_u64() {
                out.usage_prompt_tokens = Some(p);
            }
            if let Some(c) = v["choices"][0]["delta"]["content"].as_str() {
                out.content_events += 1;
                out.content_chars += c.len();
            }
        }
    }
    assert!(buf.is_empty(), "{} bytes after the last event", buf.len());
    out
}

/// This process's resident set in KiB (the gateway runs in it).
fn rss_kb() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS")
}

const MIB: u64 = 1024 * 1024;

/// While the client reads nothing for [`PAUSE`]: the upstream (one connection, offering
/// `writes` writes) got only a bounded part out and then stopped, and this process (the gateway)
/// grew by at most 8 MiB since `before_kb`.
async fn held_back(upstream: &Upstream, before_kb: u64, writes: usize) {
    tokio::time::sleep(PAUSE - Duration::from_secs(1)).await;
    let at_2s = upstream.accepted();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let at_3s = upstream.accepted();
    let grown_kb = rss_kb().saturating_sub(before_kb);
    assert_eq!(at_3s.len(), 1, "one upstream connection");
    let offered = (writes * EVENTS_PER_WRITE * (EVENT_CONTENT + 150)) as u64;
    eprintln!(
        "one slow reader: upstream got out {} KiB of {} KiB after 2 s, {} KiB after 3 s; gateway RSS +{grown_kb} KiB",
        at_2s[0] / 1024,
        offered / 1024,
        at_3s[0] / 1024
    );
    // Back-pressure: blocked, not merely slow — nothing more went out in the last second.
    assert_eq!(at_2s, at_3s, "the upstream kept writing into the gateway");
    assert!(
        at_3s[0] <= 12 * MIB,
        "the upstream got {} KiB out while the client read nothing",
        at_3s[0] / 1024
    );
    assert!(
        grown_kb <= 8 * 1024,
        "the gateway grew by {grown_kb} KiB for one paused stream"
    );
}

/// The tests measure this process's RSS, so they must not run at the same time (the test
/// runner runs a file's tests in parallel threads): each holds this for its whole run.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// One slow reader against an upstream offering 64 MiB: the upstream gets out only a few MiB
/// (kernel buffers on three sockets and the gateway's bounded buffers), then stays blocked; the
/// gateway does not grow; then the client reads all 64 MiB intact, and the usage is recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_throttles_its_upstream_and_the_gateway_holds_a_bounded_amount() {
    const WRITES: usize = 1024; // × ~65 KiB ≈ 64 MiB
    let _alone = ONE_AT_A_TIME.lock().await;
    let upstream = Upstream::start(WRITES).await;
    let app = TestApp::spawn().await;
    let (user, key) = setup(&app, &upstream).await;

    let before = rss_kb();
    let resp = open_slow_stream(&app, &key).await;
    held_back(&upstream, before, WRITES).await;

    let read = read_all(resp).await;
    assert_eq!(
        read,
        Read {
            content_events: WRITES * EVENTS_PER_WRITE,
            content_chars: WRITES * EVENTS_PER_WRITE * EVENT_CONTENT,
            usage_prompt_tokens: Some(PROMPT_TOKENS),
            done_last: true,
        }
    );
    assert_eq!(upstream.finished.load(Ordering::SeqCst), 1);
    let recs = wait_records(&app, &user, 1).await;
    assert_eq!(recs[0]["status"], 200, "{}", recs[0]);
    assert_eq!(recs[0]["stream"], true);
    assert_eq!(recs[0]["prompt_tokens"], PROMPT_TOKENS);
    assert_eq!(
        recs[0]["completion_tokens"],
        (WRITES * EVENTS_PER_WRITE) as u64
    );
    assert_eq!(recs[0]["tokens_estimated"], false);
}

/// 200 slow readers at once, each upstream offering 16 MiB: every upstream is held back (none
/// gets its answer out), the gateway's growth stays within a per-stream bound; then ten clients
/// read their streams to the end (complete, metered from the upstream's usage) and the others
/// hang up (metered as 499, their upstream connections closed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_slow_readers_stay_bounded() {
    use entity::usage_records;
    use sea_orm::{ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter};
    const STREAMS: usize = 200;
    const READERS: usize = 10;
    const WRITES: usize = 256; // × ~65 KiB ≈ 16 MiB each
    let _alone = ONE_AT_A_TIME.lock().await;
    let upstream = Upstream::start(WRITES).await;
    let app = TestApp::spawn().await;
    let (_user, key) = setup(&app, &upstream).await;

    let before = rss_kb();
    let mut opened =
        futures_util::future::join_all((0..STREAMS).map(|_| open_slow_stream(&app, &key))).await;
    tokio::time::sleep(PAUSE).await;
    let out = upstream.accepted();
    let grown_kb = rss_kb().saturating_sub(before);
    assert_eq!(out.len(), STREAMS, "one upstream connection per stream");
    let total: u64 = out.iter().sum();
    let most = out.iter().copied().max().unwrap_or(0);
    eprintln!(
        "{STREAMS} slow readers: upstreams got out {} MiB in all (at most {} KiB on one) of {} MiB; gateway RSS +{} MiB ({} KiB per stream)",
        total / MIB,
        most / 1024,
        (STREAMS * WRITES * 65) / 1024,
        grown_kb / 1024,
        grown_kb / STREAMS as u64
    );
    assert_eq!(
        upstream.finished.load(Ordering::SeqCst),
        0,
        "an upstream got its whole answer out while its client read nothing"
    );
    assert!(
        most <= 12 * MIB,
        "an upstream got {} KiB out while its client read nothing",
        most / 1024
    );
    // What the gateway holds per paused stream — hyper's 64 KiB each way, a gathered frame, the
    // scanner's chunk, and up to 256 KiB of answer text kept for an estimate (these events are
    // all text) — with room for the connections' own state and this test's clients and
    // upstreams, which live in the same process. Measured ~650 KiB, the same with 3 MiB offered
    // per stream as with 16 MiB: it does not grow with what the upstream offers.
    assert!(
        grown_kb <= STREAMS as u64 * 1024,
        "the gateway grew by {grown_kb} KiB for {STREAMS} paused streams"
    );

    let readers: Vec<_> = opened.drain(..READERS).collect();
    drop(opened);
    let reads = futures_util::future::join_all(readers.into_iter().map(read_all)).await;
    for r in &reads {
        assert_eq!(
            r,
            &Read {
                content_events: WRITES * EVENTS_PER_WRITE,
                content_chars: WRITES * EVENTS_PER_WRITE * EVENT_CONTENT,
                usage_prompt_tokens: Some(PROMPT_TOKENS),
                done_last: true,
            }
        );
    }
    assert_eq!(upstream.finished.load(Ordering::SeqCst), READERS as u64);
    // One record per stream: the readers' with the upstream's usage, the others' as 499.
    let count = |status: i32| {
        usage_records::Entity::find()
            .filter(usage_records::Column::Status.eq(status))
            .count(&app.state.db)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let (ok, left) = (
            count(200).await.expect("count"),
            count(499).await.expect("count"),
        );
        if ok == READERS as u64 && left == (STREAMS - READERS) as u64 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{ok} records with 200 and {left} with 499 for {READERS} read and {} left",
            STREAMS - READERS
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let estimated = usage_records::Entity::find()
        .filter(usage_records::Column::Status.eq(200))
        .filter(usage_records::Column::TokensEstimated.eq(true))
        .count(&app.state.db)
        .await
        .expect("count");
    assert_eq!(
        estimated, 0,
        "the completed streams carry the upstream's usage"
    );
}

/// The same slow reader on a translated stream (an Anthropic Messages client, the OpenAI
/// upstream's chunks re-encoded event by event): the translated body gathers at most a frame's
/// worth and is pulled by the client's connection like the pass-through, so the upstream is held
/// back and the gateway does not grow; read to the end, the text arrives whole and is metered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_of_a_translated_stream_holds_its_upstream_back() {
    const WRITES: usize = 256; // × ~65 KiB ≈ 16 MiB
    let _alone = ONE_AT_A_TIME.lock().await;
    let upstream = Upstream::start(WRITES).await;
    let app = TestApp::spawn().await;
    let (user, key) = setup(&app, &upstream).await;

    let before = rss_kb();
    let body = json!({"model": "slow-model", "max_tokens": 64, "stream": true,
                      "messages": [{"role": "user", "content": "Tell me everything."}]});
    let resp = open_slow(&app, &key, "/v1/messages", body).await;
    held_back(&upstream, before, WRITES).await;

    // Read it all: Anthropic events, the text whole, `message_stop` last.
    let mut body = resp.into_body();
    let mut buf = BytesMut::new();
    let (mut text_chars, mut last) = (0usize, String::new());
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.expect("the stream broke off").into_data() else {
            continue;
        };
        buf.extend_from_slice(&data);
        while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
            let ev = buf.split_to(end + 2);
            let ev = std::str::from_utf8(&ev).expect("utf-8");
            let data = ev
                .lines()
                .find_map(|l| l.strip_prefix("data: "))
                .expect("a data line");
            let v: serde_json::Value = serde_json::from_str(data).expect("JSON event");
            if v["type"] == "content_block_delta" {
                text_chars += v["delta"]["text"].as_str().map_or(0, str::len);
            }
            last = v["type"].as_str().unwrap_or_default().to_owned();
        }
    }
    assert!(buf.is_empty(), "{} bytes after the last event", buf.len());
    assert_eq!(last, "message_stop");
    assert_eq!(text_chars, WRITES * EVENTS_PER_WRITE * EVENT_CONTENT);
    assert_eq!(upstream.finished.load(Ordering::SeqCst), 1);
    let recs = wait_records(&app, &user, 1).await;
    assert_eq!(recs[0]["status"], 200, "{}", recs[0]);
    assert_eq!(recs[0]["endpoint"], "messages");
    assert_eq!(recs[0]["prompt_tokens"], PROMPT_TOKENS);
    assert_eq!(recs[0]["tokens_estimated"], false);
}
