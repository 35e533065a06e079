//! The real OpenAI and Anthropic Python SDKs against tollgate: chat completions, embeddings,
//! errors and the model list (`openai_sdk.py`); the Responses API with its stored state, the
//! Conversations API and stored chat completions (`openai_responses.py`); images, audio and
//! moderations (`openai_media.py`); the Anthropic Messages API passed through and translated
//! (`anthropic_sdk.py`). The OpenAI Agents SDK running a tool-calling agent on its default
//! Responses model (`openai_agents.py`), and the OpenAI Node SDK's calls of all those kinds
//! (`openai_node.mjs`).
//!
//! Needs a Python with the `openai`, `anthropic` and `openai-agents` packages:
//! `TOLLGATE_TEST_PYTHON=/path/to/venv/bin/python`; and for the Node test a folder where
//! `npm install openai@6` was run: `TOLLGATE_TEST_NODE_MODULES=/path/to/it` (`node` is taken
//! from `TOLLGATE_TEST_NODE`, else the `PATH`). `.ci/run` installs both and sets the variables,
//! so in CI these tests always run (and fail if an interpreter or a package is missing); without
//! a variable its tests only say so.

mod common;

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use common::TestApp;
use common::gateway::{Gateway, PROVIDER_SECRET, new_key, setup, wait_records};
use common::kinds::{self, Counts};
use common::mock::{TOOL_ARGS, TOOL_CALL_ID};
use serde_json::{Value, json};

/// The interpreter to run the SDK scripts with, or `None` (and a note) when it is not set.
fn python() -> Option<String> {
    let p = std::env::var("TOLLGATE_TEST_PYTHON").ok();
    if p.is_none() {
        eprintln!(
            "TOLLGATE_TEST_PYTHON is not set: the SDK tests need a Python with `openai`, `anthropic` and `openai-agents` installed (see .ci/run); they did not run"
        );
    }
    p
}

/// Runs `tests/sdk/<script>` with `interpreter` (a Python, or `node`) and `env`; returns the
/// JSON it printed. A script that exits non-zero fails the test with every step's error.
async fn run_script(interpreter: &str, script: &str, env: &[(&str, String)]) -> Value {
    let path = format!("{}/tests/sdk/{script}", env!("CARGO_MANIFEST_DIR"));
    let mut cmd = tokio::process::Command::new(interpreter);
    cmd.arg(&path);
    for name in [
        "OPENAI_ORG_ID",
        "OPENAI_PROJECT_ID",
        "OPENAI_BASE_URL",
        "OPENAI_API_KEY",
        "ANTHROPIC_BASE_URL",
        "ANTHROPIC_API_KEY",
        "ANTHROPIC_AUTH_TOKEN",
    ] {
        cmd.env_remove(name);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd
        .output()
        .await
        .unwrap_or_else(|e| panic!("running {interpreter} {path}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let parsed: Option<Value> = serde_json::from_str(stdout.trim()).ok();
    if !out.status.success() {
        let errors = parsed
            .as_ref()
            .and_then(|v| v["errors"].as_object())
            .map(|e| {
                e.iter()
                    .map(|(step, tb)| format!("--- step {step}:\n{}", tb.as_str().unwrap_or("")))
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .unwrap_or_default();
        panic!("{script} failed\n{errors}\nstdout: {stdout}\nstderr: {stderr}");
    }
    parsed.unwrap_or_else(|| panic!("{script} printed no JSON: {stdout}\nstderr: {stderr}"))
}

/// Usage records of the signed-in user that `pred` picks, polled until `n` of them exist.
async fn records_where(
    app: &TestApp,
    token: &str,
    n: usize,
    pred: impl Fn(&Value) -> bool,
) -> Vec<Value> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let (s, b) = app
            .get("/api/me/usage/records?per_page=100", Some(token))
            .await;
        assert_eq!(s, 200, "{b}");
        let picked: Vec<Value> = b["data"]
            .as_array()
            .map(|d| d.iter().filter(|r| pred(r)).cloned().collect())
            .unwrap_or_default();
        if picked.len() >= n {
            return picked;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "only {} of {n} usage records arrived: {b}",
            picked.len()
        );
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
}

/// Adds a chat model to a provider the gateway already has.
async fn add_model(app: &TestApp, g: &Gateway, name: &str, provider: &str, upstream: &str) {
    let (s, b) = app
        .post(
            "/api/admin/models",
            Some(&g.admin),
            json!({"name": name, "provider": provider, "upstream_model": upstream, "type": "chat",
                   "input_price_per_1m": 3.0, "output_price_per_1m": 15.0,
                   "cached_input_price_per_1m": 0.3, "cache_write_input_price_per_1m": 3.75,
                   "max_output_tokens": 1000}),
        )
        .await;
    assert_eq!(s, 201, "model {name}: {b}");
}

/// Adds a provider of `kind` at `base_url` (extra fields merged in), and the user's key for it.
async fn add_provider(
    app: &TestApp,
    g: &Gateway,
    key: &str,
    kind: &str,
    base_url: &str,
    extra: Value,
) {
    let mut body = json!({"key": key, "display_name": key, "base_url": base_url, "kind": kind});
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    let (s, b) = app.post("/api/admin/providers", Some(&g.admin), body).await;
    assert_eq!(s, 201, "provider {key}: {b}");
    let (s, b) = app
        .post(
            "/api/provider-keys",
            Some(&g.user),
            json!({"provider": key, "api_key": PROVIDER_SECRET}),
        )
        .await;
    assert_eq!(s, 201, "provider key {key}: {b}");
}

/// Starts `app` on 127.0.0.1:0; returns its base URL (`…/v1`).
async fn serve(app: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    format!("http://{addr}/v1")
}

fn sse_response(events: &[(&str, Value)]) -> Response {
    let text: String = events
        .iter()
        .map(|(name, data)| format!("event: {name}\ndata: {data}\n\n"))
        .collect();
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .body(Body::from(text))
        .expect("response")
}

#[tokio::test]
async fn openai_python_sdk_works_unchanged() {
    let Some(python) = python() else { return };
    let app = TestApp::spawn().await;
    let gw = setup(&app).await;
    let r = run_script(
        &python,
        "openai_sdk.py",
        &[
            ("OPENAI_BASE_URL", app.url("/v1")),
            ("OPENAI_API_KEY", gw.key.clone()),
        ],
    )
    .await;

    assert_eq!(r["non_stream"]["model"], "gpt-test");
    assert_eq!(r["non_stream"]["content"], "Hello from mock");
    assert_eq!(r["non_stream"]["prompt_tokens"], 11);
    assert_eq!(r["stream"]["content"], "Hello from mock");
    assert_eq!(
        r["stream"]["usage_chunks"], 0,
        "usage is not shown unless asked for"
    );
    assert_eq!(r["stream"]["models"], serde_json::json!(["gpt-test"]));
    assert_eq!(r["stream_usage"]["completion_tokens"], 7);
    assert_eq!(r["embeddings"]["dims"], 3);
    assert_eq!(r["embeddings"]["model"], "embed-test");
    assert_eq!(r["error"]["status"], 400);
    assert_eq!(r["error"]["code"], "upstream_says_no");
    assert_eq!(r["not_found"]["status"], 404);
    assert_eq!(r["not_found"]["code"], "model_not_found");
    assert!(
        r["models"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m == "gpt-test")
    );

    // Every call that reached the upstream was metered (4 successes + the upstream 400).
    let recs = wait_records(&app, &gw.user, 5).await;
    assert_eq!(recs.len(), 5);
    assert!(recs.iter().all(|r| r["tokens_estimated"] == false));
}

/// The bytes `openai_media.py` uploads.
fn media_file() -> Vec<u8> {
    (0..150_000u32)
        .map(|i| ((i * 131 + 7) % 256) as u8)
        .collect()
}

#[tokio::test]
async fn openai_python_sdk_media_calls_work_unchanged() {
    let Some(python) = python() else { return };
    let app = TestApp::spawn().await;
    let gw = common::media_mock::setup_media(&app).await;
    let r = run_script(
        &python,
        "openai_media.py",
        &[
            ("OPENAI_BASE_URL", app.url("/v1")),
            ("OPENAI_API_KEY", gw.key.clone()),
        ],
    )
    .await;

    assert_eq!(r["generate"]["n"], 2);
    assert_eq!(r["generate"]["b64"], "aW1hZ2U0");
    assert_eq!(r["edit"]["n"], 1);
    let audio = common::media_mock::speech_audio();
    let hex: String = audio.iter().map(|b| format!("{b:02x}")).collect();
    assert!(r["speech"]["hex"] == hex.as_str(), "speech bytes intact");
    assert!(
        r["speech_streamed"]["hex"] == hex.as_str(),
        "streamed speech bytes intact"
    );
    assert_eq!(r["speech_streamed"]["content_type"], "audio/mpeg");
    assert_eq!(r["transcription"]["text"], "hello world");
    assert!(
        r["transcription_srt"]
            .as_str()
            .unwrap_or_default()
            .contains("00:02:00,000"),
        "{r}"
    );
    assert_eq!(
        r["transcription_stream"]["types"],
        json!(["transcript.text.delta", "transcript.text.done"])
    );
    assert_eq!(r["transcription_stream"]["text"], "hello world");
    assert_eq!(r["translation"]["text"], "hello world");
    assert_eq!(r["moderation"]["model"], "omni-mod");
    assert_eq!(r["moderation"]["flagged"], false);

    // Each upload reached the upstream whole, under the upstream's model name.
    let file = media_file();
    let uploads: Vec<_> = gw
        .mock
        .requests()
        .into_iter()
        .filter(|q| q.path.contains("/audio/trans") || q.path.ends_with("/images/edits"))
        .collect();
    assert_eq!(uploads.len(), 5);
    for q in &uploads {
        assert!(
            q.raw.windows(file.len()).any(|w| w == file.as_slice()),
            "{} upload intact",
            q.path
        );
        let model = common::media_mock::form_field(&q.raw, "model").expect("model field");
        assert!(
            ["img-units", "stt-seconds", "stt-tokens"].contains(&model.as_str()),
            "{model}"
        );
    }

    // One record per call, each at its exact cost.
    let recs = wait_records(&app, &gw.user, 9).await;
    assert_eq!(recs.len(), 9);
    let cost = |endpoint: &str, model: &str| -> Vec<f64> {
        let mut v: Vec<f64> = recs
            .iter()
            .filter(|r| r["endpoint"] == endpoint && r["model"] == model)
            .map(|r| r["cost_usd"].as_f64().unwrap())
            .collect();
        v.sort_by(f64::total_cmp);
        v
    };
    let close = |a: &[f64], b: &[f64]| {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-12)
    };
    assert!(close(&cost("images.generations", "dall-e"), &[0.08]));
    assert!(close(&cost("images.edits", "dall-e"), &[0.04]));
    // "Hello there": 11 characters at $15 per 1M, twice.
    assert!(close(
        &cost("audio.speech", "tts"),
        &[11.0 * 15.0 / 1e6, 11.0 * 15.0 / 1e6]
    ));
    // 90 s at $0.006 a minute (json), 120 s (srt's last cue).
    assert!(
        close(&cost("audio.transcriptions", "whisper"), &[0.009, 0.012]),
        "{recs:?}"
    );
    assert!(close(
        &cost("audio.transcriptions", "transcribe"),
        &[(120.0 * 2.5 + 30.0 * 10.0) / 1e6]
    ));
    assert!(close(&cost("audio.translations", "whisper"), &[0.009]));
    assert_eq!(cost("moderations", "omni-mod").len(), 1);
}

// ------------------------------------------------------------------------------------------------
// The OpenAI Node SDK (`openai` 6.x) and the OpenAI Agents SDK (Python `openai-agents`).
// ------------------------------------------------------------------------------------------------

/// The folder where `npm install openai@6` was run, or `None` (and a note) when it is not set.
fn node_modules() -> Option<String> {
    let m = std::env::var("TOLLGATE_TEST_NODE_MODULES")
        .ok()
        .filter(|m| !m.trim().is_empty());
    if m.is_none() {
        eprintln!(
            "TOLLGATE_TEST_NODE_MODULES is not set: the Node SDK test needs a folder where `npm install openai@6` was run (see .ci/run); it did not run"
        );
    }
    m
}

/// What a usage record list holds per endpoint, sorted.
fn endpoints(recs: &[Value]) -> Vec<String> {
    let mut v: Vec<String> = recs
        .iter()
        .map(|r| r["endpoint"].as_str().unwrap_or_default().to_owned())
        .collect();
    v.sort();
    v
}

/// Every usage record of the user once `n` have arrived, checked again a moment later so that a
/// record too many (one arriving after the n-th) is seen.
async fn exactly_records(app: &TestApp, token: &str, n: usize) -> Vec<Value> {
    wait_records(app, token, n).await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let recs = wait_records(app, token, n).await;
    assert_eq!(recs.len(), n, "{recs:?}");
    recs
}

#[tokio::test]
async fn openai_node_sdk_works_unchanged() {
    let Some(modules) = node_modules() else {
        return;
    };
    let node = std::env::var("TOLLGATE_TEST_NODE")
        .ok()
        .filter(|n| !n.trim().is_empty())
        .unwrap_or_else(|| "node".to_owned());
    let node_path = std::path::Path::new(&modules).join("node_modules");
    let app = TestApp::spawn().await;
    let gw = common::media_mock::setup_media(&app).await;
    let r = run_script(
        &node,
        "openai_node.mjs",
        &[
            ("OPENAI_BASE_URL", app.url("/v1")),
            ("OPENAI_API_KEY", gw.key.clone()),
            ("TOLLGATE_TEST_NODE_MODULES", modules.clone()),
            ("NODE_PATH", node_path.display().to_string()),
        ],
    )
    .await;
    assert!(
        r["sdk_version"]
            .as_str()
            .is_some_and(|v| v.starts_with("6.")),
        "the Node SDK 6.x: {r}"
    );
    const TEXT: &str = "Hello from mock";
    let chat_usage = json!({"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18});

    // Chat completions, streamed and not.
    let c = &r["chat"];
    assert_eq!(c["model"], "gpt-test");
    assert_eq!(c["content"], TEXT);
    assert_eq!(c["finish_reason"], "stop");
    for k in ["prompt_tokens", "completion_tokens", "total_tokens"] {
        assert_eq!(c["usage"][k], chat_usage[k], "{c}");
    }
    let s = &r["chat_stream"];
    assert_eq!(s["content"], TEXT, "{s}");
    for k in ["prompt_tokens", "completion_tokens", "total_tokens"] {
        assert_eq!(s["usage"][k], chat_usage[k], "{s}");
    }

    // Stored chat completions: listed by metadata, read, their messages, updated, deleted.
    let sc = &r["stored"];
    let ids: Vec<String> = sc["ids"]
        .as_array()
        .expect("ids")
        .iter()
        .map(|i| i.as_str().expect("id").to_owned())
        .collect();
    assert_eq!(ids.len(), 2);
    assert!(ids.iter().all(|i| i.starts_with("chatcmpl-")), "{ids:?}");
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(sc["listed"], json!(sorted), "only the stored ones: {sc}");
    assert_eq!(sc["retrieved"]["id"], ids[0].as_str());
    assert_eq!(sc["retrieved"]["model"], "gpt-test");
    assert_eq!(sc["retrieved"]["text"], TEXT);
    assert_eq!(
        sc["retrieved"]["metadata"],
        json!({"sdk": "node", "n": "0"})
    );
    assert_eq!(sc["retrieved"]["prompt_tokens"], 11);
    assert_eq!(
        sc["messages"],
        json!([{"role": "user", "content": "Node 0"}]),
        "{sc}"
    );
    assert_eq!(
        sc["updated_metadata"],
        json!({"sdk": "node", "n": "0", "updated": "yes"})
    );
    assert_eq!(
        sc["deleted"],
        json!({"id": ids[1], "object": "chat.completion.deleted", "deleted": true})
    );
    assert_eq!(sc["retrieve_after"], 404);

    // The Responses API, translated to the chat-only mock, its state kept by tollgate.
    let resp_usage = json!({"input_tokens": 11, "output_tokens": 7, "total_tokens": 18});
    let c = &r["responses"];
    let first = c["id"].as_str().expect("id").to_owned();
    assert!(first.starts_with("resp_"), "{c}");
    assert_eq!(c["object"], "response");
    assert_eq!(c["status"], "completed");
    assert_eq!(c["model"], "gpt-test");
    assert_eq!(c["text"], TEXT);
    assert_eq!(c["usage"], resp_usage);
    assert_eq!(c["metadata"], json!({"sdk": "node"}));
    let s = &r["responses_stream"];
    assert_eq!(s["first"], "response.created", "{s}");
    assert_eq!(s["last"], "response.completed", "{s}");
    assert_eq!(s["sequence_ok"], true, "{s}");
    assert_eq!(s["deltas"], TEXT, "{s}");
    assert_eq!(s["usage"], resp_usage, "{s}");
    assert_eq!(s["previous_response_id"], first.as_str(), "{s}");
    let streamed = s["final_id"].as_str().expect("final id").to_owned();
    assert!(streamed.starts_with("resp_") && streamed != first, "{s}");
    let f = &r["responses_follow_up"];
    assert_eq!(f["text"], TEXT);
    assert_eq!(f["previous_response_id"], streamed.as_str());
    assert_eq!(
        roles_and_texts(&upstream_chat_ending_with(&gw, "Once more")),
        pairs(&[
            ("user", "Hi there"),
            ("assistant", TEXT),
            ("user", "And again"),
            ("assistant", TEXT),
            ("user", "Once more"),
        ]),
        "the whole chain, instructions not inherited"
    );
    assert_eq!(
        roles_and_texts(&upstream_chat_ending_with(&gw, "Hi there")),
        pairs(&[("system", "Be brief."), ("user", "Hi there")])
    );
    let got = &r["responses_retrieve"];
    assert_eq!(got["id"], first.as_str());
    assert_eq!(got["status"], "completed");
    assert_eq!(got["text"], TEXT);
    assert_eq!(got["usage"], resp_usage);
    assert_eq!(got["metadata"], json!({"sdk": "node"}));
    let items = r["input_items"].as_array().expect("input items");
    assert!(
        items
            .iter()
            .any(|i| i["type"] == "message" && i["role"] == "user" && i["text"] == "Once more"),
        "{items:?}"
    );
    assert!(
        items
            .iter()
            .all(|i| i["id"].as_str().is_some_and(|id| !id.is_empty())),
        "every input item has an id: {items:?}"
    );

    // The Conversations API: created with an item, one added, a turn in it, listed, deleted.
    let cv = &r["conversation"];
    let conv_id = cv["id"].as_str().expect("conversation id").to_owned();
    assert!(conv_id.starts_with("conv_"), "{cv}");
    assert_eq!(cv["object"], "conversation");
    assert_eq!(cv["metadata"], json!({"sdk": "node"}));
    assert_eq!(cv["added"], 1);
    assert_eq!(cv["text"], TEXT);
    let listed: Vec<(String, String)> = cv["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|i| {
            assert_eq!(i["type"], "message", "{i}");
            (
                i["role"].as_str().unwrap_or_default().to_owned(),
                i["text"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    let want = pairs(&[
        ("user", "My colour is green."),
        ("user", "Remember it."),
        ("user", "What colour?"),
        ("assistant", TEXT),
    ]);
    assert_eq!(listed, want);
    assert_eq!(
        roles_and_texts(&upstream_chat_ending_with(&gw, "What colour?")),
        want[..3].to_vec(),
        "the conversation's items went upstream"
    );
    assert_eq!(
        cv["deleted"],
        json!({"id": conv_id, "object": "conversation.deleted", "deleted": true})
    );
    assert_eq!(cv["retrieve_after"], 404);

    // Images, speech (the mock's bytes, intact), a multipart transcription, a moderation.
    assert_eq!(r["image"], json!({"n": 2, "b64": ["aW1hZ2U0", "aW1hZ2U1"]}));
    let audio = common::media_mock::speech_audio();
    let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&audio));
    assert_eq!(
        r["speech"],
        json!({"len": audio.len(), "sha256": sha, "content_type": "audio/mpeg"})
    );
    assert_eq!(r["transcription"]["text"], "hello world");
    let upload: Vec<u8> = (0..4096u32).map(|i| ((i * 131 + 7) % 256) as u8).collect();
    let uploads: Vec<_> = gw
        .mock
        .requests()
        .into_iter()
        .filter(|q| q.path.ends_with("/audio/transcriptions"))
        .collect();
    assert_eq!(uploads.len(), 1);
    assert!(
        uploads[0]
            .raw
            .windows(upload.len())
            .any(|w| w == upload.as_slice()),
        "the upload reached the upstream whole"
    );
    assert_eq!(
        common::media_mock::form_field(&uploads[0].raw, "model").as_deref(),
        Some("stt-seconds")
    );
    assert_eq!(
        r["moderation"],
        json!({"model": "omni-mod", "flagged": false})
    );

    // An unknown model: the SDK's NotFoundError, carrying the gateway's message.
    assert_eq!(
        r["unknown_model"],
        json!({"thrown": true, "class": "NotFoundError", "not_found": true, "api_error": true,
               "status": 404, "code": "model_not_found", "type": "invalid_request_error",
               "message": "The model `no-such-model` does not exist or you do not have access to it."})
    );

    // One usage record per request the gateway admitted (§8), none for the refused one; those
    // that reached the upstream carry its model and counts.
    let requests = r["requests"].as_u64().expect("requests") as usize;
    assert_eq!(requests, 25, "{r}");
    let recs = exactly_records(&app, &gw.user, requests).await;
    let (up, state): (Vec<Value>, Vec<Value>) =
        recs.into_iter().partition(|x| x["provider"] == "mock");
    assert_eq!(r["upstream"], up.len(), "{up:?}");
    let mut want: Vec<String> = [
        ["chat.completions"; 4].as_slice(),
        &["responses"; 4],
        &[
            "images.generations",
            "audio.speech",
            "audio.transcriptions",
            "moderations",
        ],
    ]
    .concat()
    .into_iter()
    .map(str::to_owned)
    .collect();
    want.sort();
    assert_eq!(endpoints(&up), want, "{up:?}");
    assert!(up.iter().all(|x| x["status"] == 200), "{up:?}");
    for rec in up
        .iter()
        .filter(|x| x["endpoint"] == "chat.completions" || x["endpoint"] == "responses")
    {
        assert_eq!(rec["model"], "gpt-test", "{rec}");
        assert_eq!(rec["prompt_tokens"], 11, "{rec}");
        assert_eq!(rec["completion_tokens"], 7, "{rec}");
        assert_eq!(rec["tokens_estimated"], false, "{rec}");
        // $1 input and $2 output per 1M tokens.
        let cost = rec["cost_usd"].as_f64().expect("cost");
        assert!((cost - (11.0 + 14.0) / 1e6).abs() < 1e-12, "{rec}");
    }
    // The stored-state calls: list, retrieve, messages, update, delete and a 404 for stored
    // completions; a response read and its input items; a conversation's create, item add, list,
    // delete and a 404 — recorded, never charged.
    let mut want: Vec<String> = [
        ["chat.completions.stored"; 6].as_slice(),
        &["responses.stored"; 2],
        &["conversations"; 5],
    ]
    .concat()
    .into_iter()
    .map(str::to_owned)
    .collect();
    want.sort();
    assert_eq!(endpoints(&state), want, "{state:?}");
    assert!(state.iter().all(|x| x["cost_usd"] == 0.0), "{state:?}");
    assert_eq!(
        state.iter().filter(|x| x["status"] == 404).count(),
        2,
        "{state:?}"
    );
    app.stop().await;
}

#[tokio::test]
async fn openai_agents_sdk_runs_a_tool_agent() {
    let Some(python) = python() else { return };
    let app = TestApp::spawn().await;
    let g = setup(&app).await;
    // The mock's `tool` behaviour: a call of the request's first function tool, then (once the
    // tool's result is the last message) text.
    add_model(&app, &g, "gpt-tool", "mock", "tool").await;
    let r = run_script(
        &python,
        "openai_agents.py",
        &[
            ("OPENAI_BASE_URL", app.url("/v1")),
            ("OPENAI_API_KEY", g.key.clone()),
            ("TG_MODEL", "gpt-tool".to_owned()),
        ],
    )
    .await;
    let run = &r["run"];
    assert_eq!(run["final_output"], "Hello from mock", "{r}");
    assert_eq!(
        run["tool_calls"],
        json!(["Paris"]),
        "the tool ran once: {r}"
    );
    assert_eq!(
        run["tool_outputs"],
        json!(["21C and clear in Paris"]),
        "{r}"
    );
    assert_eq!(
        run["items"],
        json!([
            "tool_call_item",
            "tool_call_output_item",
            "message_output_item"
        ]),
        "{r}"
    );
    assert_eq!(run["responses"], 2, "{r}");
    let ids = run["response_ids"].as_array().expect("response ids");
    assert!(
        ids.iter()
            .all(|i| i.as_str().is_some_and(|i| i.starts_with("resp_"))),
        "{r}"
    );
    assert_eq!(
        run["usage"],
        json!({"requests": 2, "input_tokens": 22, "output_tokens": 14, "total_tokens": 36}),
        "the upstream's counts, twice: {r}"
    );

    // Upstream: two chat completions, the tool offered, then its result sent back.
    let turns: Vec<Value> = g
        .mock
        .requests()
        .into_iter()
        .filter(|q| q.body["model"] == "tool")
        .map(|q| q.body)
        .collect();
    assert_eq!(turns.len(), 2, "{turns:?}");
    for t in &turns {
        assert_eq!(t["tools"][0]["type"], "function", "{t}");
        assert_eq!(t["tools"][0]["function"]["name"], "get_weather", "{t}");
        assert_eq!(
            t["tools"][0]["function"]["parameters"]["properties"]["city"]["type"], "string",
            "{t}"
        );
    }
    assert_eq!(
        roles_and_texts(&turns[0]),
        pairs(&[
            ("system", "Answer with the weather, using the tool."),
            ("user", "What is the weather in Paris?")
        ])
    );
    let msgs = turns[1]["messages"].as_array().expect("messages");
    let last = msgs.last().expect("a message");
    assert_eq!(last["role"], "tool", "{}", turns[1]);
    assert_eq!(last["tool_call_id"], TOOL_CALL_ID);
    assert_eq!(content_text(last), "21C and clear in Paris");
    let call = &msgs[msgs.len() - 2];
    assert_eq!(call["role"], "assistant", "{}", turns[1]);
    assert_eq!(call["tool_calls"][0]["id"], TOOL_CALL_ID);
    assert_eq!(call["tool_calls"][0]["function"]["name"], "get_weather");
    assert_eq!(
        call["tool_calls"][0]["function"]["arguments"],
        TOOL_ARGS.concat()
    );

    // Two usage records, one per model call, each with the upstream's counts.
    let recs = exactly_records(&app, &g.user, 2).await;
    for rec in &recs {
        assert_eq!(rec["endpoint"], "responses", "{rec}");
        assert_eq!(rec["model"], "gpt-tool", "{rec}");
        assert_eq!(rec["status"], 200, "{rec}");
        assert_eq!(rec["prompt_tokens"], 11, "{rec}");
        assert_eq!(rec["completion_tokens"], 7, "{rec}");
        assert_eq!(rec["tokens_estimated"], false, "{rec}");
    }
    app.stop().await;
}

// ------------------------------------------------------------------------------------------------
// A Responses-capable upstream (`supports_responses: true`), in the shapes of OpenAI's API
// reference: the full event sequence a real one streams, so the SDK's stream accumulator is
// exercised on relayed events, not only on tollgate's own.
// ------------------------------------------------------------------------------------------------

const UPSTREAM_TEXT: [&str; 2] = ["Upstream", " says hi"];

/// The response object for request `req`: its `instructions` and `metadata` echoed, as OpenAI's.
fn upstream_response(req: &Value, status: &str, done: bool) -> Value {
    let text = UPSTREAM_TEXT.concat();
    let output = if done {
        json!([{"id": "msg_up", "type": "message", "status": "completed", "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}]}])
    } else {
        json!([])
    };
    let usage = if done {
        json!({"input_tokens": 9, "input_tokens_details": {"cached_tokens": 2}, "output_tokens": 4,
               "output_tokens_details": {"reasoning_tokens": 1}, "total_tokens": 13})
    } else {
        Value::Null
    };
    json!({"id": "resp_upstream", "object": "response", "created_at": 1_741_476_542, "status": status,
        "error": null, "incomplete_details": null, "instructions": req["instructions"], "max_output_tokens": null,
        "model": req["model"], "output": output, "parallel_tool_calls": true, "previous_response_id": null,
        "reasoning": {"effort": null, "summary": null}, "store": false, "temperature": 1.0,
        "text": {"format": {"type": "text"}}, "tool_choice": "auto", "tools": [], "top_p": 1.0,
        "truncation": "disabled", "usage": usage, "user": null,
        "metadata": req.get("metadata").cloned().unwrap_or_else(|| json!({}))})
}

async fn responses_upstream() -> (Arc<Mutex<Vec<Value>>>, String) {
    let seen: Arc<Mutex<Vec<Value>>> = Arc::default();
    let s2 = seen.clone();
    let app = Router::new().fallback(move |body: Bytes| {
        let seen = s2.clone();
        async move {
            let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            seen.lock().expect("lock").push(v.clone());
            if v["stream"] != true {
                return axum::Json(upstream_response(&v, "completed", true)).into_response();
            }
            let text = UPSTREAM_TEXT.concat();
            let part = |t: &str| json!({"type": "output_text", "text": t, "annotations": []});
            let mut events = vec![
                ("response.created", json!({"type": "response.created", "response": upstream_response(&v, "in_progress", false)})),
                ("response.in_progress", json!({"type": "response.in_progress", "response": upstream_response(&v, "in_progress", false)})),
                ("response.output_item.added", json!({"type": "response.output_item.added", "output_index": 0,
                    "item": {"id": "msg_up", "type": "message", "status": "in_progress", "role": "assistant", "content": []}})),
                ("response.content_part.added", json!({"type": "response.content_part.added", "item_id": "msg_up",
                    "output_index": 0, "content_index": 0, "part": part("")})),
            ];
            for d in UPSTREAM_TEXT {
                events.push(("response.output_text.delta", json!({"type": "response.output_text.delta",
                    "item_id": "msg_up", "output_index": 0, "content_index": 0, "delta": d, "logprobs": []})));
            }
            events.extend([
                ("response.output_text.done", json!({"type": "response.output_text.done", "item_id": "msg_up",
                    "output_index": 0, "content_index": 0, "text": text, "logprobs": []})),
                ("response.content_part.done", json!({"type": "response.content_part.done", "item_id": "msg_up",
                    "output_index": 0, "content_index": 0, "part": part(&text)})),
                ("response.output_item.done", json!({"type": "response.output_item.done", "output_index": 0,
                    "item": {"id": "msg_up", "type": "message", "status": "completed", "role": "assistant",
                             "content": [part(&text)]}})),
                ("response.completed", json!({"type": "response.completed", "response": upstream_response(&v, "completed", true)})),
            ]);
            for (i, (_, e)) in events.iter_mut().enumerate() {
                e["sequence_number"] = json!(i);
            }
            sse_response(&events)
        }
    });
    (seen, serve(app).await)
}

/// The text of a chat message's `content` (a string, or text parts).
fn content_text(m: &Value) -> String {
    match &m["content"] {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts.iter().filter_map(|p| p["text"].as_str()).collect(),
        _ => String::new(),
    }
}

/// The chat request the mock upstream received whose last message says `text`.
fn upstream_chat_ending_with(g: &Gateway, text: &str) -> Value {
    g.mock
        .requests()
        .into_iter()
        .rev()
        .find(|r| {
            r.body["messages"]
                .as_array()
                .and_then(|m| m.last())
                .is_some_and(|m| content_text(m) == text)
        })
        .unwrap_or_else(|| panic!("no upstream request ends with {text:?}"))
        .body
}

fn roles_and_texts(req: &Value) -> Vec<(String, String)> {
    req["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| {
            (
                m["role"].as_str().unwrap_or_default().to_owned(),
                content_text(m),
            )
        })
        .collect()
}

fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
    v.iter()
        .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
        .collect()
}

#[tokio::test]
async fn openai_sdk_responses_conversations_and_stored_completions() {
    let Some(python) = python() else { return };
    let app = TestApp::spawn().await;
    let g = setup(&app).await;
    add_model(&app, &g, "gpt-tool", "mock", "tool").await;
    let (seen, base) = responses_upstream().await;
    add_provider(
        &app,
        &g,
        "oai",
        "openai",
        &base,
        json!({"supports_responses": true}),
    )
    .await;
    add_model(&app, &g, "o-resp", "oai", "o-up").await;
    let openai_env = |model: &str| {
        vec![
            ("OPENAI_BASE_URL", app.url("/v1")),
            ("OPENAI_API_KEY", g.key.clone()),
            ("TG_MODEL", model.to_owned()),
        ]
    };

    // ---- A chat-only upstream: /v1/responses translated, state kept by tollgate. ----
    let mut env = openai_env("gpt-test");
    env.push(("TG_TOOL_MODEL", "gpt-tool".to_owned()));
    env.push(("TG_FULL", "1".to_owned()));
    let r = run_script(&python, "openai_responses.py", &env).await;
    const TEXT: &str = "Hello from mock";
    let want_usage = json!({"input_tokens": 11, "output_tokens": 7, "total_tokens": 18,
                            "cached_tokens": 0, "reasoning_tokens": 0});

    let c = &r["create"];
    let first_id = c["id"].as_str().expect("id").to_owned();
    assert!(first_id.starts_with("resp_"), "{c}");
    assert_eq!(c["object"], "response");
    assert_eq!(c["status"], "completed");
    assert_eq!(c["model"], "gpt-test");
    assert_eq!(c["text"], TEXT);
    assert_eq!(c["output_types"], json!(["message"]));
    assert_eq!(c["usage"], want_usage);
    assert_eq!(c["instructions"], "Be brief.");
    assert_eq!(c["metadata"], json!({"run": "sdk"}));
    let up = upstream_chat_ending_with(&g, "Hi there");
    assert_eq!(
        roles_and_texts(&up),
        pairs(&[("system", "Be brief."), ("user", "Hi there")])
    );

    for name in ["stream", "streamed_follow_up"] {
        let s = &r[name];
        assert_eq!(s["first"], "response.created", "{name}: {s}");
        assert_eq!(s["last"], "response.completed", "{name}: {s}");
        assert_eq!(s["completed_events"], 1, "{name}: {s}");
        assert_eq!(s["sequence_ok"], true, "{name}: {s}");
        assert_eq!(s["deltas"], TEXT, "{name}: {s}");
        assert_eq!(s["final_text"], TEXT, "{name}: {s}");
        assert_eq!(s["done_texts"], json!([TEXT]), "{name}: {s}");
        assert_eq!(s["usage"], want_usage, "{name}: {s}");
        let id = s["final_id"].as_str().expect("final id");
        assert!(id.starts_with("resp_") && id != first_id, "{name}: {s}");
        assert_eq!(
            s["created_id"], id,
            "{name}: one id from created to completed"
        );
    }
    let h = &r["stream_helper"];
    assert_eq!(h["deltas"], TEXT, "{h}");
    assert_eq!(h["final_text"], TEXT, "{h}");
    assert_eq!(h["usage"], want_usage, "{h}");
    assert!(
        h["id"].as_str().is_some_and(|i| i.starts_with("resp_")),
        "{h}"
    );

    // previous_response_id: tollgate sends the whole chain; instructions are not inherited.
    let f = &r["follow_up"];
    assert_eq!(f["text"], TEXT);
    assert_eq!(f["previous_response_id"], first_id.as_str(), "{f}");
    let up = upstream_chat_ending_with(&g, "And again");
    assert_eq!(
        roles_and_texts(&up),
        pairs(&[
            ("user", "Hi there"),
            ("assistant", TEXT),
            ("user", "And again")
        ])
    );
    let up = upstream_chat_ending_with(&g, "Once more");
    assert_eq!(
        roles_and_texts(&up),
        pairs(&[
            ("user", "Hi there"),
            ("assistant", TEXT),
            ("user", "And again"),
            ("assistant", TEXT),
            ("user", "Once more"),
        ]),
        "a stream chained on a response made just before it"
    );

    let got = &r["retrieve"];
    assert_eq!(got["id"], first_id.as_str());
    assert_eq!(got["status"], "completed");
    assert_eq!(got["model"], "gpt-test");
    assert_eq!(got["text"], TEXT);
    assert_eq!(got["usage"], want_usage);
    assert_eq!(got["metadata"], json!({"run": "sdk"}));
    let items = r["input_items"]["items"].as_array().expect("items");
    assert!(
        items
            .iter()
            .any(|i| i["type"] == "message" && i["role"] == "user" && i["text"] == "And again"),
        "{items:?}"
    );
    assert!(
        items
            .iter()
            .all(|i| i["id"].as_str().is_some_and(|id| !id.is_empty())),
        "every input item has an id: {items:?}"
    );
    assert_eq!(r["delete"]["retrieve_after"], 404);
    assert_eq!(r["delete"]["delete_again"], 404);

    // A function tool, called by the upstream, answered with function_call_output.
    let t = &r["tool_round_trip"];
    assert_eq!(t["calls"], 1, "{t}");
    assert_eq!(t["name"], "get_weather");
    assert_eq!(t["arguments"], json!({"city": "Paris"}));
    assert_eq!(t["call_id"], TOOL_CALL_ID);
    assert!(
        t["item_id"].as_str().is_some_and(|i| i.starts_with("fc_")),
        "{t}"
    );
    assert_eq!(t["text_after"], TEXT);
    assert_eq!(t["output_types_after"], json!(["message"]));
    let tool_turns: Vec<Value> = g
        .mock
        .requests()
        .into_iter()
        .filter(|q| q.body["model"] == "tool")
        .map(|q| q.body)
        .collect();
    assert_eq!(tool_turns.len(), 4, "two round trips");
    let first_turn = &tool_turns[0];
    assert_eq!(first_turn["tools"][0]["type"], "function");
    assert_eq!(first_turn["tools"][0]["function"]["name"], "get_weather");
    assert_eq!(
        first_turn["tools"][0]["function"]["parameters"]["required"],
        json!(["city"])
    );
    for (turn, output) in [
        (
            &tool_turns[1],
            r#"{"temp_c": 21, "sky": "clear"}"#.to_owned(),
        ),
        (&tool_turns[3], "21C".to_owned()),
    ] {
        let msgs = turn["messages"].as_array().expect("messages");
        assert_eq!(msgs.len(), 3, "user, assistant's call, tool result: {turn}");
        assert_eq!(msgs[1]["role"], "assistant");
        assert_eq!(msgs[1]["tool_calls"][0]["id"], TOOL_CALL_ID, "{turn}");
        assert_eq!(msgs[1]["tool_calls"][0]["function"]["name"], "get_weather");
        assert_eq!(
            msgs[1]["tool_calls"][0]["function"]["arguments"],
            TOOL_ARGS.concat()
        );
        assert_eq!(msgs[2]["role"], "tool");
        assert_eq!(msgs[2]["tool_call_id"], TOOL_CALL_ID);
        assert_eq!(content_text(&msgs[2]), output, "{turn}");
    }
    let t = &r["tool_stream"];
    assert!(
        t["added"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x == "function_call")),
        "{t}"
    );
    assert_eq!(t["arg_deltas"], TOOL_ARGS.concat());
    assert_eq!(t["name"], "get_weather");
    assert_eq!(t["arguments"], json!({"city": "Paris"}));
    assert_eq!(t["call_id"], TOOL_CALL_ID);
    assert_eq!(t["text_after"], TEXT);
    assert_eq!(t["store_after"], false);

    // The Conversations API: initial items, two turns, listed in order, deleted.
    let cv = &r["conversation"];
    let conv_id = cv["id"].as_str().expect("conv id").to_owned();
    assert!(conv_id.starts_with("conv_"), "{cv}");
    assert_eq!(cv["object"], "conversation");
    assert_eq!(cv["metadata"], json!({"topic": "sdk"}));
    assert_eq!(cv["first_text"], TEXT);
    assert_eq!(cv["second_text"], TEXT);
    assert_eq!(cv["response_conversation"], conv_id.as_str());
    let listed: Vec<(String, String)> = cv["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|i| {
            assert_eq!(i["type"], "message", "{i}");
            (
                i["role"].as_str().unwrap_or_default().to_owned(),
                i["text"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    let want = pairs(&[
        ("user", "My colour is blue."),
        ("user", "What colour?"),
        ("assistant", TEXT),
        ("user", "And now?"),
        ("assistant", TEXT),
    ]);
    assert_eq!(listed, want, "a turn's items are there for the next call");
    assert_eq!(cv["has_more"], false);
    assert_eq!(
        roles_and_texts(&upstream_chat_ending_with(&g, "And now?")),
        want[..4].to_vec()
    );
    assert_eq!(
        cv["deleted"],
        json!({"id": conv_id, "object": "conversation.deleted", "deleted": true})
    );
    assert_eq!(cv["retrieve_after"], 404);

    // Stored chat completions: kept by tollgate, listed by metadata, updated, deleted.
    let sc = &r["stored_completions"];
    let ids: Vec<String> = sc["ids"]
        .as_array()
        .expect("ids")
        .iter()
        .map(|i| i.as_str().expect("id").to_owned())
        .collect();
    assert!(ids.iter().all(|i| i.starts_with("chatcmpl-")), "{ids:?}");
    assert_eq!(sc["retrieved"]["id"], ids[0].as_str());
    assert_eq!(sc["retrieved"]["model"], "gpt-test");
    assert_eq!(sc["retrieved"]["text"], TEXT);
    assert_eq!(sc["retrieved"]["metadata"], json!({"run": "sdk", "n": "0"}));
    assert_eq!(sc["retrieved"]["prompt_tokens"], 11);
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(sc["listed"], json!(sorted), "only the stored ones");
    assert_eq!(sc["listed_n1"], json!([ids[1]]));
    let msgs = sc["messages"].as_array().expect("messages");
    assert!(
        msgs.iter()
            .any(|m| m["role"] == "user" && m["content"] == "Hi 0"),
        "{msgs:?}"
    );
    assert_eq!(
        sc["updated_metadata"],
        json!({"run": "sdk", "n": "0", "x": "y"})
    );
    assert_eq!(
        sc["deleted"],
        json!({"id": ids[1], "object": "chat.completion.deleted", "deleted": true})
    );
    assert_eq!(sc["retrieve_after"], 404);
    let stored_turn = upstream_chat_ending_with(&g, "Hi 0");
    assert!(
        stored_turn.get("store").is_none() && stored_turn.get("metadata").is_none(),
        "store and metadata stay with the gateway: {stored_turn}"
    );

    // ---- A Responses-capable upstream: relayed statelessly, under tollgate's ids. ----
    let r = run_script(&python, "openai_responses.py", &openai_env("o-resp")).await;
    const UP: &str = "Upstream says hi";
    let up_usage = json!({"input_tokens": 9, "output_tokens": 4, "total_tokens": 13,
                          "cached_tokens": 2, "reasoning_tokens": 1});
    let c = &r["create"];
    let up_first = c["id"].as_str().expect("id").to_owned();
    assert!(
        up_first.starts_with("resp_") && up_first != "resp_upstream",
        "{c}"
    );
    assert_eq!(c["model"], "o-resp");
    assert_eq!(c["text"], UP);
    assert_eq!(c["usage"], up_usage);
    assert_eq!(c["instructions"], "Be brief.", "forwarded, and echoed: {c}");
    assert_eq!(c["metadata"], json!({"run": "sdk"}), "{c}");
    assert_eq!(r["retrieve"]["metadata"], json!({"run": "sdk"}));
    for name in ["stream", "streamed_follow_up"] {
        let s = &r[name];
        assert_eq!(s["deltas"], UP, "{name}: {s}");
        assert_eq!(s["final_text"], UP, "{name}: {s}");
        assert_eq!(s["sequence_ok"], true, "{name}: {s}");
        assert_eq!(s["usage"], up_usage, "{name}: {s}");
        let id = s["final_id"].as_str().expect("final id");
        assert!(
            id.starts_with("resp_") && id != "resp_upstream",
            "{name}: {s}"
        );
        assert_eq!(s["created_id"], id, "{name}: {s}");
    }
    assert_eq!(r["stream_helper"]["final_text"], UP);
    assert_eq!(r["follow_up"]["text"], UP);
    assert_eq!(r["retrieve"]["id"], up_first.as_str());
    assert_eq!(r["retrieve"]["text"], UP);
    assert_eq!(r["retrieve"]["model"], "o-resp");
    assert_eq!(r["delete"]["retrieve_after"], 404);
    let seen = seen.lock().expect("lock").clone();
    assert!(
        seen.iter()
            .all(|q| q["store"] == false && q.get("previous_response_id").is_none())
    );
    let last = seen.last().expect("a request");
    let input = last["input"].as_array().expect("input");
    assert_eq!(input.len(), 5, "the whole chain, sent by tollgate: {last}");

    // ---- Every call is one usage record with the upstream's own counts. ----
    let ok = |r: &Value, model: &str, endpoint: &str| {
        r["model"] == model && r["endpoint"] == endpoint && r["status"] == 200
    };
    let recs = records_where(&app, &g.user, 7, |r| ok(r, "gpt-test", "responses")).await;
    assert_eq!(
        recs.len(),
        7,
        "create, stream, helper, 2 follow-ups, 2 conversation turns"
    );
    for rec in &recs {
        assert_eq!(rec["prompt_tokens"], 11, "{rec}");
        assert_eq!(rec["completion_tokens"], 7, "{rec}");
        assert_eq!(rec["tokens_estimated"], false, "{rec}");
    }
    assert!(recs.iter().any(|x| x["response_id"] == first_id.as_str()));
    assert_eq!(
        recs.iter()
            .filter(|x| x["conversation_id"] == conv_id.as_str())
            .count(),
        2
    );
    let recs = records_where(&app, &g.user, 4, |r| ok(r, "gpt-tool", "responses")).await;
    assert_eq!(recs.len(), 4);
    let recs = records_where(&app, &g.user, 3, |r| ok(r, "gpt-test", "chat.completions")).await;
    assert_eq!(recs.len(), 3);
    let recs = records_where(&app, &g.user, 5, |r| ok(r, "o-resp", "responses")).await;
    assert_eq!(recs.len(), 5, "create, stream, helper, 2 follow-ups");
    for rec in &recs {
        assert_eq!(rec["prompt_tokens"], 9, "{rec}");
        assert_eq!(rec["cached_tokens"], 2, "{rec}");
        assert_eq!(rec["reasoning_tokens"], 1, "{rec}");
    }
    // Stored-state calls are metered too (cost 0): per run a retrieve, the input items, a delete,
    // and the retrieve and delete that found nothing.
    let recs = records_where(&app, &g.user, 10, |r| r["endpoint"] == "responses.stored").await;
    assert_eq!(recs.len(), 10);
    assert!(recs.iter().all(|r| r["cost_usd"].as_f64() == Some(0.0)));
    app.stop().await;
}

// ------------------------------------------------------------------------------------------------
// A scripted Anthropic Messages API (as tests/protocols.rs's): `claude-ok` answers text, or a
// `tool_use` of the request's first tool when it has tools and the last turn is not a
// `tool_result`; `claude-overloaded` is a 529; `count_tokens` says 42.
// ------------------------------------------------------------------------------------------------

const CLAUDE_TEXT: [&str; 2] = ["Hello", " from claude"];
const TOOLU_ID: &str = "toolu_mock_1";

#[derive(Clone, Default)]
struct Anthropic {
    requests: Arc<Mutex<Vec<(String, Value)>>>,
}

fn wants_tool_use(body: &Value) -> Option<String> {
    let name = body["tools"][0]["name"].as_str()?.to_owned();
    let last = body["messages"].as_array()?.last()?;
    let answered = last["content"]
        .as_array()
        .is_some_and(|c| c.iter().any(|b| b["type"] == "tool_result"));
    (!answered).then_some(name)
}

async fn anthropic_handle(State(m): State<Anthropic>, uri: Uri, body: Bytes) -> Response {
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    m.requests
        .lock()
        .expect("lock")
        .push((uri.path().to_owned(), body.clone()));
    if uri.path().ends_with("/messages/count_tokens") {
        return axum::Json(json!({"input_tokens": 42})).into_response();
    }
    if body["model"] == "claude-overloaded" {
        return (
            StatusCode::from_u16(529).expect("status"),
            axum::Json(json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})),
        )
            .into_response();
    }
    let tool = wants_tool_use(&body);
    let usage = json!({"input_tokens": 20, "cache_read_input_tokens": 30, "cache_creation_input_tokens": 10, "output_tokens": 6});
    let stop = if tool.is_some() {
        "tool_use"
    } else {
        "end_turn"
    };
    if body["stream"] != true {
        let mut content = vec![json!({"type": "text", "text": CLAUDE_TEXT.concat()})];
        if let Some(name) = &tool {
            content.push(json!({"type": "tool_use", "id": TOOLU_ID, "name": name, "input": {"city": "Paris"}}));
        }
        return axum::Json(json!({
            "id": "msg_mock", "type": "message", "role": "assistant", "model": body["model"],
            "content": content, "stop_reason": stop, "stop_sequence": null, "usage": usage
        }))
        .into_response();
    }
    let mut events = vec![
        (
            "message_start",
            json!({"type": "message_start", "message": {"id": "msg_mock", "type": "message", "role": "assistant",
            "model": body["model"], "content": [], "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": 20, "cache_read_input_tokens": 30, "cache_creation_input_tokens": 10, "output_tokens": 1}}}),
        ),
        (
            "content_block_start",
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ),
        ("ping", json!({"type": "ping"})),
    ];
    for t in CLAUDE_TEXT {
        events.push(("content_block_delta", json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": t}})));
    }
    events.push((
        "content_block_stop",
        json!({"type": "content_block_stop", "index": 0}),
    ));
    if let Some(name) = &tool {
        events.push((
            "content_block_start",
            json!({"type": "content_block_start", "index": 1,
            "content_block": {"type": "tool_use", "id": TOOLU_ID, "name": name, "input": {}}}),
        ));
        for piece in TOOL_ARGS {
            events.push((
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 1,
                "delta": {"type": "input_json_delta", "partial_json": piece}}),
            ));
        }
        events.push((
            "content_block_stop",
            json!({"type": "content_block_stop", "index": 1}),
        ));
    }
    events.extend([
        ("message_delta", json!({"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": null}, "usage": {"output_tokens": 6}})),
        ("message_stop", json!({"type": "message_stop"})),
    ]);
    sse_response(&events)
}

impl Anthropic {
    async fn start() -> (Self, String) {
        let m = Anthropic::default();
        let app = Router::new()
            .fallback(anthropic_handle)
            .with_state(m.clone());
        (m.clone(), serve(app).await)
    }

    fn requests(&self) -> Vec<(String, Value)> {
        self.requests.lock().expect("lock").clone()
    }
}

#[tokio::test]
async fn anthropic_sdk_passed_through_and_translated() {
    let Some(python) = python() else { return };
    let app = TestApp::spawn().await;
    let g = setup(&app).await;
    add_model(&app, &g, "gpt-tool", "mock", "tool").await;
    let (anthropic, base) = Anthropic::start().await;
    add_provider(&app, &g, "claude", "anthropic", &base, json!({})).await;
    add_model(&app, &g, "claude", "claude", "claude-ok").await;
    add_model(&app, &g, "claude-overloaded", "claude", "claude-overloaded").await;
    // A key whose budget covers no request (each may cost up to 1000 × $15 / 1M).
    let (poor, _) = new_key(
        &app,
        &g.user,
        json!({"name": "poor", "budget_usd": 0.000001}),
    )
    .await;
    let env = |model: &str, tool: &str, error: &str| {
        vec![
            ("ANTHROPIC_BASE_URL", app.base.clone()),
            ("ANTHROPIC_API_KEY", g.key.clone()),
            ("TG_MODEL", model.to_owned()),
            ("TG_TOOL_MODEL", tool.to_owned()),
            ("TG_ERROR_MODEL", error.to_owned()),
            ("TG_POOR_KEY", poor.clone()),
        ]
    };

    // ---- (a) An `anthropic` provider: passed through, model replaced. ----
    let r = run_script(
        &python,
        "anthropic_sdk.py",
        &env("claude", "claude", "claude-overloaded"),
    )
    .await;
    let claude_usage = json!({"input_tokens": 20, "output_tokens": 6,
                              "cache_read_input_tokens": 30, "cache_creation_input_tokens": 10});
    let m = &r["create"];
    assert_eq!(m["type"], "message");
    assert_eq!(m["role"], "assistant");
    // The answer comes back untouched but for the model: the name the client asked for (as on
    // every other path), not the upstream's `claude-ok`.
    assert_eq!(m["model"], "claude", "{m}");
    assert_eq!(m["text"], CLAUDE_TEXT.concat());
    assert_eq!(m["stop_reason"], "end_turn");
    assert_eq!(m["usage"], claude_usage);
    let s = &r["stream"];
    assert_eq!(s["first_event"], "message_start");
    assert_eq!(s["saw_stop"], true);
    assert_eq!(s["deltas"], CLAUDE_TEXT.concat());
    assert_eq!(s["text"], CLAUDE_TEXT.concat());
    assert_eq!(s["model"], "claude", "{s}");
    assert_eq!(s["stop_reason"], "end_turn");
    assert_eq!(s["usage"], claude_usage);
    for name in ["tool_use", "tool_use_stream"] {
        let t = &r[name];
        assert_eq!(t["uses"], 1, "{name}: {t}");
        assert_eq!(t["id"], TOOLU_ID, "{name}: {t}");
        assert_eq!(t["name"], "get_weather");
        assert_eq!(t["input"], json!({"city": "Paris"}), "{name}: {t}");
        assert_eq!(t["stop_reason"], "tool_use");
        assert_eq!(t["after"]["text"], CLAUDE_TEXT.concat());
        assert_eq!(t["after"]["stop_reason"], "end_turn");
    }
    assert_eq!(r["tool_use_stream"]["partial_json"], TOOL_ARGS.concat());
    assert_eq!(r["count_tokens"]["input_tokens"], 42);
    let reqs = anthropic.requests();
    let results: Vec<&Value> = reqs
        .iter()
        .filter(|(_, b)| {
            b["messages"]
                .as_array()
                .and_then(|m| m.last())
                .is_some_and(|m| m["content"][0]["type"] == "tool_result")
        })
        .map(|(_, b)| b)
        .collect();
    assert_eq!(results.len(), 2, "two tool_result turns");
    for b in results {
        assert_eq!(b["model"], "claude-ok");
        assert_eq!(b["messages"][1]["content"][1]["type"], "tool_use", "{b}");
        assert_eq!(b["messages"][2]["content"][0]["tool_use_id"], TOOLU_ID);
        assert_eq!(b["messages"][2]["content"][0]["content"], "21C and clear");
    }
    assert!(reqs.iter().any(|(p, _)| p == "/v1/messages/count_tokens"));
    let e = &r["errors"];
    assert_eq!(e.as_object().map(|o| o.len()), Some(0), "{e}");
    let e = &r["errors_seen"];
    // A 529 is `OverloadedError` (an `InternalServerError`) in the SDKs that know it.
    let class = e["upstream"]["class"].as_str().unwrap_or_default();
    assert!(
        class == "OverloadedError" || class == "InternalServerError",
        "{e}"
    );
    check_errors(
        e,
        json!({"class": class, "expected_class": true, "status": 529,
               "type": "overloaded_error", "should_retry": null}),
    );

    // ---- (b) An OpenAI-compatible provider: translated both ways. ----
    let r = run_script(
        &python,
        "anthropic_sdk.py",
        &env("gpt-test", "gpt-tool", "gpt-500"),
    )
    .await;
    let mock_usage = json!({"input_tokens": 11, "output_tokens": 7,
                            "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0});
    let m = &r["create"];
    assert!(
        m["id"].as_str().is_some_and(|i| i.starts_with("msg_")),
        "{m}"
    );
    assert_eq!(m["model"], "gpt-test");
    assert_eq!(m["content_types"], json!(["text"]));
    assert_eq!(m["text"], "Hello from mock");
    assert_eq!(m["stop_reason"], "end_turn");
    assert_eq!(m["usage"], mock_usage, "{m}");
    let up = upstream_chat_ending_with(&g, "Hello there");
    assert_eq!(
        roles_and_texts(&up),
        pairs(&[("system", "Be brief."), ("user", "Hello there")])
    );
    assert_eq!(up["max_tokens"], 100);
    let s = &r["stream"];
    assert_eq!(s["first_event"], "message_start");
    assert_eq!(s["saw_stop"], true);
    assert_eq!(s["deltas"], "Hello from mock");
    assert_eq!(s["text"], "Hello from mock");
    assert_eq!(s["stop_reason"], "end_turn");
    assert_eq!(s["usage"]["output_tokens"], 7, "{s}");
    assert_eq!(s["usage"]["input_tokens"], 11, "{s}");
    assert_eq!(
        roles_and_texts(&upstream_chat_ending_with(&g, "Again")),
        pairs(&[
            ("system", "Be brief."),
            ("user", "Hi"),
            ("assistant", "Hello."),
            ("user", "Again")
        ])
    );
    for name in ["tool_use", "tool_use_stream"] {
        let t = &r[name];
        assert_eq!(t["uses"], 1, "{name}: {t}");
        assert_eq!(t["id"], TOOL_CALL_ID, "{name}: {t}");
        assert_eq!(t["name"], "get_weather");
        assert_eq!(t["input"], json!({"city": "Paris"}), "{name}: {t}");
        assert_eq!(t["stop_reason"], "tool_use", "{name}: {t}");
        assert_eq!(t["after"]["text"], "Hello from mock");
        assert_eq!(t["after"]["stop_reason"], "end_turn");
    }
    assert_eq!(r["tool_use_stream"]["partial_json"], TOOL_ARGS.concat());
    let tool_turns: Vec<Value> = g
        .mock
        .requests()
        .into_iter()
        .filter(|q| q.body["model"] == "tool")
        .map(|q| q.body)
        .collect();
    assert_eq!(tool_turns.len(), 4, "two round trips");
    assert_eq!(tool_turns[0]["tools"][0]["function"]["name"], "get_weather");
    for turn in [&tool_turns[1], &tool_turns[3]] {
        let msgs = turn["messages"].as_array().expect("messages");
        assert_eq!(msgs.len(), 3, "user, assistant's call, tool result: {turn}");
        assert_eq!(msgs[1]["tool_calls"][0]["id"], TOOL_CALL_ID, "{turn}");
        assert_eq!(msgs[2]["role"], "tool");
        assert_eq!(msgs[2]["tool_call_id"], TOOL_CALL_ID);
        assert_eq!(content_text(&msgs[2]), "21C and clear", "{turn}");
    }
    let counted = r["count_tokens"]["input_tokens"].as_i64().expect("count");
    assert!(
        counted > 0 && counted < 100,
        "the gateway's own count: {counted}"
    );
    check_errors(
        &r["errors_seen"],
        json!({"class": "InternalServerError", "expected_class": true,
                                            "status": 500, "type": "api_error", "should_retry": null}),
    );

    // ---- Usage records: one per call, with the upstream's own counts. ----
    let ok = |r: &Value, model: &str, endpoint: &str| {
        r["model"] == model && r["endpoint"] == endpoint && r["status"] == 200
    };
    let recs = records_where(&app, &g.user, 6, |r| ok(r, "claude", "messages")).await;
    assert_eq!(recs.len(), 6, "create, stream, 2 × 2 tool turns");
    for rec in &recs {
        assert_eq!(rec["prompt_tokens"], 60, "{rec}");
        assert_eq!(rec["cached_tokens"], 30, "{rec}");
        assert_eq!(rec["cache_write_tokens"], 10, "{rec}");
        assert_eq!(rec["completion_tokens"], 6, "{rec}");
        assert_eq!(rec["tokens_estimated"], false, "{rec}");
    }
    assert_eq!(recs.iter().filter(|x| x["stream"] == true).count(), 2);
    let recs = records_where(&app, &g.user, 2, |r| ok(r, "gpt-test", "messages")).await;
    assert_eq!(recs.len(), 2);
    assert!(
        recs.iter()
            .all(|x| x["prompt_tokens"] == 11 && x["completion_tokens"] == 7)
    );
    let recs = records_where(&app, &g.user, 4, |r| ok(r, "gpt-tool", "messages")).await;
    assert_eq!(recs.len(), 4);
    let recs = records_where(&app, &g.user, 2, |r| {
        r["endpoint"] == "messages.count_tokens"
    })
    .await;
    assert_eq!(recs.len(), 2);
    let recs = records_where(&app, &g.user, 1, |r| r["model"] == "claude-overloaded").await;
    assert_eq!(recs[0]["status"], 529, "{:?}", recs[0]);
    app.stop().await;
}

/// The error classes the Anthropic SDK raised: the gateway's own (a wrong key, an exhausted
/// budget, an unknown model) and `upstream`'s.
#[track_caller]
fn check_errors(e: &Value, upstream: Value) {
    assert_eq!(
        e["wrong_key"],
        json!({"class": "AuthenticationError", "expected_class": true, "status": 401,
               "type": "authentication_error", "should_retry": null}),
        "{e}"
    );
    assert_eq!(
        e["over_budget"],
        json!({"class": "RateLimitError", "expected_class": true, "status": 429,
               "type": "rate_limit_error", "should_retry": "false"}),
        "{e}"
    );
    assert_eq!(e["unknown_model"]["class"], "NotFoundError", "{e}");
    assert_eq!(e["unknown_model"]["type"], "not_found_error", "{e}");
    assert_eq!(e["upstream"], upstream, "{e}");
}

// ------------------------------------------------------------------------------------------------
// Every client SDK to every provider kind: the `openai` SDK's chat completions and Responses API
// and the `anthropic` SDK's Messages API, streamed and not (`tests/sdk/matrix.py`), against one
// model of each kind. Per step the client reads the upstream's text and the upstream's usage in
// its own protocol's terms, and the usage record carries exactly the upstream's counts and cost.
// ------------------------------------------------------------------------------------------------

/// The steps of `matrix.py`: (step, endpoint of its usage record, streamed).
const MATRIX_STEPS: [(&str, &str, bool); 6] = [
    ("chat", "chat.completions", false),
    ("chat_stream", "chat.completions", true),
    ("messages", "messages", false),
    ("messages_stream", "messages", true),
    ("responses", "responses", false),
    ("responses_stream", "responses", true),
];

/// What one kind's upstream answers `model`: the text, and its counts per step.
struct Kind<'a> {
    model: &'a str,
    text: fn(&str) -> &'static str,
    counts: fn(&str) -> Counts,
}

/// Runs `matrix.py` against `kind.model` and checks what each client read and what was metered.
async fn sdk_matrix(python: &str, app: &TestApp, g: &Gateway, kind: Kind<'_>) {
    let r = run_script(
        python,
        "matrix.py",
        &[
            ("OPENAI_BASE_URL", app.url("/v1")),
            ("OPENAI_API_KEY", g.key.clone()),
            ("ANTHROPIC_BASE_URL", app.base.clone()),
            ("ANTHROPIC_API_KEY", g.key.clone()),
            ("TG_MODEL", kind.model.to_owned()),
        ],
    )
    .await;
    for (step, _, _) in MATRIX_STEPS {
        let seen = &r[step];
        assert_eq!(seen["text"], (kind.text)(step), "{step} text: {seen}");
        // The client is told the model it asked for, never the upstream's name.
        let models = match &seen["model"] {
            Value::Array(ms) => ms.clone(),
            m => vec![m.clone()],
        };
        assert!(
            models.iter().all(|m| m == kind.model),
            "{step} model: {seen}"
        );
        let want = (kind.counts)(step);
        let u = &seen["usage"];
        assert_eq!(u["prompt"], want.prompt, "{step} prompt: {seen}");
        assert_eq!(
            u["completion"], want.completion,
            "{step} completion: {seen}"
        );
        assert_eq!(u["cached"], want.cached, "{step} cached: {seen}");
        if step.starts_with("messages") {
            // Anthropic's usage has cache writes and no reasoning count.
            assert_eq!(u["cache_write"], want.cache_write, "{step}: {seen}");
        } else {
            assert_eq!(u["reasoning"], want.reasoning, "{step} reasoning: {seen}");
        }
    }
    let recs = records_where(app, &g.user, MATRIX_STEPS.len(), |r| {
        r["model"] == kind.model
    })
    .await;
    assert_eq!(recs.len(), MATRIX_STEPS.len(), "{recs:?}");
    for (step, endpoint, stream) in MATRIX_STEPS {
        let rec = recs
            .iter()
            .find(|r| r["endpoint"] == endpoint && r["stream"] == stream)
            .unwrap_or_else(|| panic!("no {endpoint} record (stream {stream}): {recs:?}"));
        kinds::assert_record(rec, (kind.counts)(step));
    }
}

/// A chat model at the provider tests' prices ($1 input, $0.50 cached, $2 output per 1M).
async fn add_priced_model(app: &TestApp, g: &Gateway, name: &str, provider: &str, upstream: &str) {
    let (s, b) = app
        .post(
            "/api/admin/models",
            Some(&g.admin),
            json!({"name": name, "provider": provider, "upstream_model": upstream, "type": "chat",
                   "input_price_per_1m": 1.0, "output_price_per_1m": 2.0,
                   "cached_input_price_per_1m": 0.5, "max_output_tokens": 1000}),
        )
        .await;
    assert_eq!(s, 201, "model {name}: {b}");
}

#[tokio::test]
async fn every_sdk_to_an_openai_compatible_provider() {
    let Some(python) = python() else { return };
    let app = TestApp::spawn().await;
    let g = setup(&app).await;
    // The mock's `cached` behaviour: 11 prompt tokens of which 4 cached, 7 completion.
    add_priced_model(&app, &g, "m-openai", "mock", "cached").await;
    let kind = Kind {
        model: "m-openai",
        text: |_| "Hello from mock",
        counts: |_| Counts {
            prompt: 11,
            completion: 7,
            cached: 4,
            cache_write: 0,
            reasoning: 0,
        },
    };
    sdk_matrix(&python, &app, &g, kind).await;
    app.stop().await;
}

#[tokio::test]
async fn every_sdk_to_an_anthropic_provider() {
    let Some(python) = python() else { return };
    let app = TestApp::spawn().await;
    let g = setup(&app).await;
    let (_, base) = Anthropic::start().await;
    add_provider(&app, &g, "claude", "anthropic", &base, json!({})).await;
    add_priced_model(&app, &g, "m-anthropic", "claude", "claude-ok").await;
    // 20 uncached input + 30 read from the cache + 10 written to it; 6 output.
    let kind = Kind {
        model: "m-anthropic",
        text: |_| "Hello from claude",
        counts: |_| Counts {
            prompt: 60,
            completion: 6,
            cached: 30,
            cache_write: 10,
            reasoning: 0,
        },
    };
    sdk_matrix(&python, &app, &g, kind).await;
    app.stop().await;
}

#[tokio::test]
async fn every_sdk_to_a_gemini_provider() {
    let Some(python) = python() else { return };
    let app = TestApp::spawn().await;
    let (g, _up) = kinds::gemini_world(&app).await;
    let kind = Kind {
        model: "gem",
        text: |_| "Hello from gemini",
        counts: |_| kinds::GEMINI_COUNTS,
    };
    sdk_matrix(&python, &app, &g, kind).await;
    app.stop().await;
}

#[tokio::test]
async fn every_sdk_to_an_azure_provider() {
    let Some(python) = python() else { return };
    let app = TestApp::spawn().await;
    let (g, _up) = kinds::azure_world(&app).await;
    // Chat and Messages go to the deployment's chat completions (whose recorded answers differ
    // streamed and not); Responses to Azure's own Responses API.
    let kind = Kind {
        model: "az-gpt",
        text: |step| match step {
            "chat" | "messages" => "Paris is the capital of France.",
            "chat_stream" | "messages_stream" => "Paris.",
            _ => "Azure says hi",
        },
        counts: |step| {
            let (prompt, completion, cached, reasoning) = match step {
                "chat" | "messages" => (24, 8, 0, 0),
                "chat_stream" | "messages_stream" => (14, 2, 0, 0),
                _ => (21, 9, 5, 3),
            };
            Counts {
                prompt,
                completion,
                cached,
                cache_write: 0,
                reasoning,
            }
        },
    };
    sdk_matrix(&python, &app, &g, kind).await;
    app.stop().await;
}

#[tokio::test]
async fn every_sdk_to_a_bedrock_provider() {
    let Some(python) = python() else { return };
    let app = TestApp::spawn().await;
    let (g, _up) = kinds::bedrock_world(&app).await;
    let kind = Kind {
        model: "claude-br",
        text: |_| "Hello from bedrock",
        counts: |_| kinds::BEDROCK_COUNTS,
    };
    sdk_matrix(&python, &app, &g, kind).await;
    app.stop().await;
}
