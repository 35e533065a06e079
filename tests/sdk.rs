//! The real OpenAI Python SDK against tollgate: non-stream, stream, stream with usage,
//! embeddings, errors, model list.
//!
//! Needs a Python with the `openai` package: `TOLLGATE_TEST_PYTHON=/path/to/venv/bin/python`.
//! `.ci/run` creates that venv and sets the variable, so in CI this test always runs (and fails
//! if the interpreter or the package is missing); without the variable it only says so.

mod common;

use common::TestApp;
use common::gateway::{setup, wait_records};
use serde_json::Value;

#[tokio::test]
async fn openai_python_sdk_works_unchanged() {
    let Ok(python) = std::env::var("TOLLGATE_TEST_PYTHON") else {
        eprintln!(
            "TOLLGATE_TEST_PYTHON is not set: the OpenAI SDK test needs a Python with `openai` installed (see .ci/run)"
        );
        return;
    };
    let app = TestApp::spawn().await;
    let gw = setup(&app).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/openai_sdk.py");
    let out = tokio::process::Command::new(&python)
        .arg(script)
        .env("OPENAI_BASE_URL", app.url("/v1"))
        .env("OPENAI_API_KEY", &gw.key)
        .env_remove("OPENAI_ORG_ID")
        .env_remove("OPENAI_PROJECT_ID")
        .output()
        .await
        .unwrap_or_else(|e| panic!("running {python}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "SDK script failed\nstdout: {stdout}\nstderr: {stderr}"
    );
    let r: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"));

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
