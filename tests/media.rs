//! Images, audio and moderations through the gateway (spec §8): what the upstream received (the
//! multipart upload byte for byte, the model renamed), what the client got back (the audio byte
//! for byte), the usage records and their exact costs, and every refusal costing nothing.

mod common;

use common::gateway::{PROVIDER_SECRET, new_key, wait_records};
use common::media_mock::{form_field, setup_media, speech_audio};
use common::{TestApp, assert_error};
use serde_json::{Value, json};

const BOUNDARY: &str = "----tollgate-test-boundary-7MA4YWxkTrZu0gW";

/// A multipart body with these parts, in order: (name, filename, content).
fn form(parts: &[(&str, Option<&str>, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, filename, content) in parts {
        out.extend_from_slice(format!("--{BOUNDARY}\r\n").as_bytes());
        match filename {
            Some(f) => out.extend_from_slice(
                format!(
                    "Content-Disposition: form-data; name=\"{name}\"; filename=\"{f}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
                )
                .as_bytes(),
            ),
            None => out.extend_from_slice(
                format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes(),
            ),
        }
        out.extend_from_slice(content);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    out
}

/// A file's bytes that no offset repeats, so a lost, doubled or moved chunk shows.
fn file_bytes(len: usize) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(2_246_822_519) >> 11) as u8)
        .collect()
}

/// Posts a multipart body, chunked (`chunk` bytes a frame, no content-length) or whole.
async fn post_form(
    app: &TestApp,
    path: &str,
    key: &str,
    body: Vec<u8>,
    chunk: Option<usize>,
) -> reqwest::Response {
    let req = app.client.post(app.url(path)).bearer_auth(key).header(
        "content-type",
        format!("multipart/form-data; boundary={BOUNDARY}"),
    );
    let req = match chunk {
        Some(n) => {
            let pieces: Vec<Result<Vec<u8>, std::io::Error>> =
                body.chunks(n).map(|c| Ok(c.to_vec())).collect();
            req.body(reqwest::Body::wrap_stream(futures_util::stream::iter(
                pieces,
            )))
        }
        None => req.body(body),
    };
    req.send().await.expect("request")
}

async fn json_of(r: reqwest::Response) -> (u16, Value) {
    let s = r.status().as_u16();
    let text = r.text().await.expect("body");
    (
        s,
        serde_json::from_str(&text).unwrap_or_else(|_| json!({ "raw": text })),
    )
}

/// The record for `endpoint` with `model`, among `records` (newest first).
fn record<'a>(records: &'a [Value], endpoint: &str, model: &str) -> &'a Value {
    records
        .iter()
        .find(|r| r["endpoint"] == endpoint && r["model"] == model)
        .unwrap_or_else(|| panic!("no {endpoint} record for {model} in {records:?}"))
}

#[track_caller]
fn assert_cost(r: &Value, usd: f64) {
    let got = r["cost_usd"].as_f64().expect("cost");
    assert!(
        (got - usd).abs() < 1e-12,
        "cost {got} != {usd} in record {r}"
    );
}

#[tokio::test]
async fn image_generations_are_metered_by_usage_else_per_image() {
    let app = TestApp::spawn().await;
    let gw = setup_media(&app).await;
    let r = app
        .client
        .post(app.url("/v1/images/generations"))
        .bearer_auth(&gw.key)
        .json(&json!({"model": "dall-e", "prompt": "a lighthouse", "n": 3, "size": "1024x1024"}))
        .send()
        .await
        .unwrap();
    let (s, b) = json_of(r).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["data"].as_array().map(Vec::len), Some(3), "{b}");
    let up = gw.mock.last();
    assert_eq!(up.path, "/v1/images/generations");
    assert_eq!(up.body["model"], "img-units", "the upstream's own name");
    assert_eq!(
        up.body["prompt"], "a lighthouse",
        "the rest passes untouched"
    );
    assert_eq!(up.body["size"], "1024x1024");
    assert_eq!(
        up.headers["authorization"],
        format!("Bearer {PROVIDER_SECRET}").as_str()
    );

    let r = app
        .client
        .post(app.url("/v1/images/generations"))
        .bearer_auth(&gw.key)
        .json(&json!({"model": "gpt-image", "prompt": "a lighthouse"}))
        .send()
        .await
        .unwrap();
    let (s, b) = json_of(r).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["usage"]["output_tokens"], 4160);

    // A stream passes through; its usage is read from the completed events.
    let r = app
        .client
        .post(app.url("/v1/images/generations"))
        .bearer_auth(&gw.key)
        .json(&json!({"model": "dall-e", "prompt": "x", "n": 2, "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let text = r.text().await.unwrap();
    assert_eq!(
        text.matches("image_generation.completed").count(),
        4,
        "{text}"
    );
    // Images have no `stream_options`: the body goes up with only its model replaced.
    assert_eq!(
        gw.mock.last().body,
        json!({"model": "img-units", "prompt": "x", "n": 2, "stream": true})
    );

    let records = wait_records(&app, &gw.user, 3).await;
    let per_image = record(&records, "images.generations", "gpt-image");
    assert_eq!(per_image["prompt_tokens"], 50);
    assert_eq!(per_image["completion_tokens"], 4160);
    assert_eq!(per_image["tokens_estimated"], false);
    // 50 × $5/1M + 4160 × $40/1M: the tokens, not the per-image price.
    assert_cost(per_image, 0.00025 + 0.1664);
    let units: Vec<&Value> = records.iter().filter(|r| r["model"] == "dall-e").collect();
    assert_eq!(units.len(), 2);
    let mut costs: Vec<f64> = units
        .iter()
        .map(|r| {
            assert_eq!(r["prompt_tokens"], 0, "{r}");
            assert_eq!(r["tokens_estimated"], false, "{r}");
            assert_eq!(r["status"], 200);
            r["cost_usd"].as_f64().unwrap()
        })
        .collect();
    costs.sort_by(f64::total_cmp);
    // 2 streamed images, then 3 images at $0.04.
    assert!((costs[0] - 0.08).abs() < 1e-12, "{costs:?}");
    assert!((costs[1] - 0.12).abs() < 1e-12, "{costs:?}");
}

#[tokio::test]
async fn an_image_edit_reaches_the_upstream_intact_in_either_field_order() {
    let app = TestApp::spawn().await;
    let gw = setup_media(&app).await;
    let image = file_bytes(3 * 1024 * 1024 + 17);
    let mask = file_bytes(70_001);

    // The Python SDK's order (text fields, then files), sent chunked without a length.
    let sent = form(&[
        ("model", None, b"dall-e"),
        ("prompt", None, "add a red door — please".as_bytes()),
        ("n", None, b"2"),
        ("image", Some("house.png"), &image),
        ("mask", Some("mask.png"), &mask),
    ]);
    let r = post_form(
        &app,
        "/v1/images/edits",
        &gw.key,
        sent.clone(),
        Some(65_536),
    )
    .await;
    let (s, b) = json_of(r).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["data"].as_array().map(Vec::len), Some(2), "{b}");
    let up = gw.mock.last();
    assert_eq!(up.path, "/v1/images/edits");
    let want = form(&[
        ("model", None, b"img-units"),
        ("prompt", None, "add a red door — please".as_bytes()),
        ("n", None, b"2"),
        ("image", Some("house.png"), &image),
        ("mask", Some("mask.png"), &mask),
    ]);
    assert_eq!(up.raw.len(), want.len(), "byte count upstream");
    assert!(
        up.raw.as_ref() == want.as_slice(),
        "the upstream got the form byte for byte, model renamed"
    );
    assert_eq!(
        up.headers["content-type"],
        format!("multipart/form-data; boundary={BOUNDARY}").as_str()
    );
    assert_eq!(
        up.headers["authorization"],
        format!("Bearer {PROVIDER_SECRET}").as_str()
    );

    // The Node SDK's order (the file first), with a content-length: the upstream gets the
    // exact length of the renamed body.
    let sent = form(&[
        ("image", Some("house.png"), &image),
        ("prompt", None, b"door"),
        ("model", None, b"dall-e"),
    ]);
    let r = post_form(&app, "/v1/images/variations", &gw.key, sent, None).await;
    let (s, b) = json_of(r).await;
    assert_eq!(s, 200, "{b}");
    let up = gw.mock.last();
    assert_eq!(up.path, "/v1/images/variations");
    let want = form(&[
        ("image", Some("house.png"), &image),
        ("prompt", None, b"door"),
        ("model", None, b"img-units"),
    ]);
    assert!(up.raw.as_ref() == want.as_slice(), "file-first form intact");
    assert_eq!(
        up.headers["content-length"],
        want.len().to_string().as_str()
    );
    assert_eq!(form_field(&up.raw, "model").as_deref(), Some("img-units"));

    let records = wait_records(&app, &gw.user, 2).await;
    assert_cost(record(&records, "images.edits", "dall-e"), 0.08);
    assert_cost(record(&records, "images.variations", "dall-e"), 0.04);
}

#[tokio::test]
async fn speech_audio_comes_back_byte_for_byte_and_is_metered_per_character() {
    let app = TestApp::spawn().await;
    let gw = setup_media(&app).await;
    let input = "Héllo wörld, ça va? 你好"; // 22 characters, more bytes
    assert_eq!(input.chars().count(), 22);
    let r = app
        .client
        .post(app.url("/v1/audio/speech"))
        .bearer_auth(&gw.key)
        .json(&json!({"model": "tts", "input": input, "voice": "alloy"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "audio/mpeg");
    let audio = r.bytes().await.unwrap();
    assert!(
        audio.as_ref() == speech_audio().as_slice(),
        "audio intact ({} bytes)",
        audio.len()
    );
    let up = gw.mock.last();
    assert_eq!(up.path, "/v1/audio/speech");
    assert_eq!(
        (up.body["model"].as_str(), up.body["voice"].as_str()),
        (Some("tts"), Some("alloy"))
    );

    // `stream_format: "sse"`: the events pass through and the reported tokens are billed.
    let r = app
        .client
        .post(app.url("/v1/audio/speech"))
        .bearer_auth(&gw.key)
        .json(&json!({"model": "tts", "input": input, "voice": "alloy", "stream_format": "sse"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    assert!(text.contains("speech.audio.done"), "{text}");

    let records = wait_records(&app, &gw.user, 2).await;
    let (by_chars, by_tokens): (Vec<&Value>, Vec<&Value>) = records
        .iter()
        .filter(|r| r["endpoint"] == "audio.speech")
        .partition(|r| r["prompt_tokens"] == 0);
    assert_eq!((by_chars.len(), by_tokens.len()), (1, 1), "{records:?}");
    // 22 characters × $15 / 1M.
    assert_cost(by_chars[0], 22.0 * 15.0 / 1e6);
    assert_eq!(by_chars[0]["tokens_estimated"], false);
    assert_eq!(by_tokens[0]["completion_tokens"], 101);
    assert_cost(by_tokens[0], (14.0 * 0.6 + 101.0 * 12.0) / 1e6);
}

#[tokio::test]
async fn transcriptions_are_metered_by_seconds_tokens_or_cues() {
    let app = TestApp::spawn().await;
    let gw = setup_media(&app).await;
    let audio = file_bytes(200_000);
    let cases: [(&str, &str, Option<&str>, Option<&str>); 6] = [
        ("/v1/audio/transcriptions", "whisper", None, None),
        ("/v1/audio/transcriptions", "whisper", Some("srt"), None),
        ("/v1/audio/transcriptions", "whisper", Some("text"), None),
        ("/v1/audio/transcriptions", "transcribe", Some("json"), None),
        ("/v1/audio/transcriptions", "transcribe", None, Some("true")),
        ("/v1/audio/translations", "whisper", None, None),
    ];
    for (path, model, format, stream) in cases {
        let mut parts: Vec<(&str, Option<&str>, &[u8])> = vec![("model", None, model.as_bytes())];
        if let Some(f) = format {
            parts.push(("response_format", None, f.as_bytes()));
        }
        if let Some(s) = stream {
            parts.push(("stream", None, s.as_bytes()));
        }
        parts.push(("file", Some("speech.mp3"), &audio));
        let r = post_form(&app, path, &gw.key, form(&parts), Some(32_768)).await;
        let status = r.status();
        let ct = r.headers()["content-type"].to_str().unwrap().to_owned();
        let text = r.text().await.unwrap();
        assert_eq!(status, 200, "{path} {model} {format:?}: {text}");
        match (format, stream) {
            (_, Some(_)) => {
                assert!(ct.starts_with("text/event-stream"), "{ct}");
                assert!(text.contains("transcript.text.done"), "{text}");
            }
            (Some("text"), _) => assert_eq!(text, "hello world\n"),
            (Some("srt"), _) => assert!(text.contains("00:02:00,000"), "{text}"),
            _ => assert!(text.contains("hello world"), "{text}"),
        }
        let up = gw.mock.last();
        assert!(
            up.raw.windows(audio.len()).any(|w| w == audio.as_slice()),
            "file intact"
        );
    }
    let records = wait_records(&app, &gw.user, 6).await;
    let whisper: Vec<f64> = records
        .iter()
        .filter(|r| r["model"] == "whisper" && r["endpoint"] == "audio.transcriptions")
        .map(|r| r["cost_usd"].as_f64().unwrap())
        .collect();
    let mut whisper = whisper;
    whisper.sort_by(f64::total_cmp);
    // text: no duration known → 0; json: 90 s; srt: the last cue ends at 120 s; $0.006 a minute.
    assert_eq!(whisper.len(), 3);
    assert!(whisper[0].abs() < 1e-12, "{whisper:?}");
    assert!((whisper[1] - 0.009).abs() < 1e-12, "{whisper:?}");
    assert!((whisper[2] - 0.012).abs() < 1e-12, "{whisper:?}");
    assert_cost(record(&records, "audio.translations", "whisper"), 0.009);
    for r in records.iter().filter(|r| r["model"] == "transcribe") {
        // Tokens reported: billed by them, not by the minute price.
        assert_eq!(
            (r["prompt_tokens"].as_i64(), r["completion_tokens"].as_i64()),
            (Some(120), Some(30))
        );
        assert_cost(r, (120.0 * 2.5 + 30.0 * 10.0) / 1e6);
    }
    assert!(records.iter().all(|r| r["tokens_estimated"] == false));
}

#[tokio::test]
async fn moderations_pass_through_with_the_client_model_name() {
    let app = TestApp::spawn().await;
    let gw = setup_media(&app).await;
    let (s, b) = {
        let r = app
            .client
            .post(app.url("/v1/moderations"))
            .bearer_auth(&gw.key)
            .json(&json!({"model": "omni-mod", "input": "I want to hug a cat"}))
            .send()
            .await
            .unwrap();
        json_of(r).await
    };
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["model"], "omni-mod");
    assert_eq!(b["results"][0]["flagged"], false);
    assert_eq!(gw.mock.last().body["model"], "moderation");
    let records = wait_records(&app, &gw.user, 1).await;
    let r = record(&records, "moderations", "omni-mod");
    // No usage upstream: the input's tokens are counted, at $1/1M; nothing for output.
    assert_eq!(r["tokens_estimated"], true);
    let prompt = r["prompt_tokens"].as_i64().unwrap();
    assert!((3..=12).contains(&prompt), "{r}");
    assert_eq!(r["completion_tokens"], 0);
    assert_cost(r, prompt as f64 / 1e6);
}

#[tokio::test]
async fn bad_media_requests_are_refused_and_cost_nothing() {
    let app = TestApp::spawn_with(|c| c.server.max_body_bytes = 256 * 1024).await;
    let gw = setup_media(&app).await;
    let audio = file_bytes(10_000);

    // A form without `model`.
    let r = post_form(
        &app,
        "/v1/audio/transcriptions",
        &gw.key,
        form(&[("file", Some("a.mp3"), &audio)]),
        Some(4096),
    )
    .await;
    let (s, b) = json_of(r).await;
    assert_error(s, &b, 400, "missing_field");
    assert_eq!(b["error"]["param"], "model");
    // `model` twice.
    let twice = form(&[
        ("model", None, b"whisper"),
        ("model", None, b"transcribe"),
        ("file", Some("a.mp3"), &audio),
    ]);
    let (s, b) =
        json_of(post_form(&app, "/v1/audio/transcriptions", &gw.key, twice, None).await).await;
    assert_error(s, &b, 400, "invalid_value");
    // A `model` longer than any name.
    let long = "m".repeat(5000);
    let (s, b) = json_of(
        post_form(
            &app,
            "/v1/audio/transcriptions",
            &gw.key,
            form(&[
                ("model", None, long.as_bytes()),
                ("file", Some("a.mp3"), &audio),
            ]),
            Some(1000),
        )
        .await,
    )
    .await;
    assert_error(s, &b, 400, "invalid_value");
    // JSON where a form is expected.
    let r = app
        .client
        .post(app.url("/v1/audio/transcriptions"))
        .bearer_auth(&gw.key)
        .json(&json!({"model": "whisper"}))
        .send()
        .await
        .unwrap();
    let (s, b) = json_of(r).await;
    assert_error(s, &b, 400, "invalid_value");
    // A form cut off before its end.
    let mut cut = form(&[("model", None, b"whisper"), ("prompt", None, b"x")]);
    cut.truncate(cut.len() - 10);
    let (s, b) = json_of(post_form(&app, "/v1/audio/translations", &gw.key, cut, None).await).await;
    assert_error(s, &b, 400, "invalid_multipart");
    // An unknown model; a model of the wrong type, both ways.
    let (s, b) = json_of(
        post_form(
            &app,
            "/v1/audio/transcriptions",
            &gw.key,
            form(&[("model", None, b"nope"), ("file", Some("a.mp3"), &audio)]),
            None,
        )
        .await,
    )
    .await;
    assert_error(s, &b, 404, "model_not_found");
    let (s, b) = app
        .call(
            reqwest::Method::POST,
            "/v1/images/generations",
            Some(&gw.key),
            Some(json!({"model": "gpt-test", "prompt": "x"})),
        )
        .await;
    assert_error(s, &b, 400, "invalid_value");
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("chat model"),
        "{b}"
    );
    let (s, b) = app
        .call(
            reqwest::Method::POST,
            "/v1/chat/completions",
            Some(&gw.key),
            Some(json!({"model": "dall-e", "messages": []})),
        )
        .await;
    assert_error(s, &b, 400, "invalid_value");
    let (s, b) = app
        .call(
            reqwest::Method::POST,
            "/v1/moderations",
            Some(&gw.key),
            Some(json!({"model": "whisper", "input": "x"})),
        )
        .await;
    assert_error(s, &b, 400, "invalid_value");
    // Streams only where the upstream streams.
    let (s, b) = app
        .call(
            reqwest::Method::POST,
            "/v1/moderations",
            Some(&gw.key),
            Some(json!({"model": "omni-mod", "input": "x", "stream": true})),
        )
        .await;
    assert_error(s, &b, 400, "invalid_value");
    // Over the limit, declared: 413 before the body is read; with the file before the model
    // (chunked), 413 while looking for the model.
    let big = file_bytes(300 * 1024);
    let (s, b) = json_of(
        post_form(
            &app,
            "/v1/images/edits",
            &gw.key,
            form(&[("model", None, b"dall-e"), ("image", Some("a.png"), &big)]),
            None,
        )
        .await,
    )
    .await;
    assert_error(s, &b, 413, "payload_too_large");
    let (s, b) = json_of(
        post_form(
            &app,
            "/v1/images/edits",
            &gw.key,
            form(&[("image", Some("a.png"), &big), ("model", None, b"dall-e")]),
            Some(8192),
        )
        .await,
    )
    .await;
    assert_error(s, &b, 413, "payload_too_large");
    // A kind that is not OpenAI-compatible: a clear 400.
    let (s, b) = app
        .post("/api/admin/providers", Some(&gw.admin), json!({"key": "claude", "display_name": "C", "base_url": gw.mock.base_url(), "kind": "anthropic"}))
        .await;
    assert_eq!(s, 201, "{b}");
    let (s, b) = app
        .post("/api/admin/models", Some(&gw.admin), json!({"name": "claude-img", "provider": "claude", "type": "image", "price_per_image": 1.0}))
        .await;
    assert_eq!(s, 201, "{b}");
    let (s, b) = app
        .call(
            reqwest::Method::POST,
            "/v1/images/generations",
            Some(&gw.key),
            Some(json!({"model": "claude-img", "prompt": "x"})),
        )
        .await;
    assert_error(s, &b, 400, "invalid_value");
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("anthropic"),
        "{b}"
    );

    // None of it reached the upstream or was metered.
    assert!(
        gw.mock.requests().is_empty(),
        "{:?}",
        gw.mock
            .requests()
            .iter()
            .map(|r| r.path.clone())
            .collect::<Vec<_>>()
    );
    let (s, b) = app.get("/api/me/usage/records", Some(&gw.user)).await;
    assert_eq!(s, 200);
    assert_eq!(b["total"], 0, "{b}");
}

#[tokio::test]
async fn an_upload_over_the_limit_after_the_model_is_413_and_costs_nothing() {
    let app = TestApp::spawn_with(|c| c.server.max_body_bytes = 256 * 1024).await;
    let gw = setup_media(&app).await;
    let big = file_bytes(600 * 1024);
    let body = form(&[("model", None, b"whisper"), ("file", Some("a.mp3"), &big)]);
    let (s, b) = json_of(
        post_form(
            &app,
            "/v1/audio/transcriptions",
            &gw.key,
            body,
            Some(16 * 1024),
        )
        .await,
    )
    .await;
    assert_error(s, &b, 413, "payload_too_large");
    // It was admitted and had started upstream: one record, its status 413, at no cost.
    let records = wait_records(&app, &gw.user, 1).await;
    assert_eq!(records[0]["status"], 413, "{records:?}");
    assert_cost(&records[0], 0.0);
}

#[tokio::test]
async fn upstream_errors_pass_through_and_admission_applies() {
    let app = TestApp::spawn_with(|c| c.billing.enforce_balance = true).await;
    let gw = setup_media(&app).await;
    // No balance: refused before the upstream, on a form route too.
    let r = post_form(
        &app,
        "/v1/audio/transcriptions",
        &gw.key,
        form(&[("model", None, b"whisper"), ("file", Some("a.mp3"), b"abc")]),
        None,
    )
    .await;
    assert_eq!(r.headers()["x-should-retry"], "false");
    let (s, b) = json_of(r).await;
    assert_error(s, &b, 429, "insufficient_quota");
    assert!(gw.mock.requests().is_empty());
    // A key limited to other models.
    let (limited, _) = new_key(
        &app,
        &gw.user,
        json!({"name": "only-chat", "allowed_models": ["gpt-test"]}),
    )
    .await;
    let r = post_form(
        &app,
        "/v1/images/edits",
        &limited,
        form(&[("model", None, b"dall-e"), ("image", Some("a.png"), b"abc")]),
        None,
    )
    .await;
    let (s, b) = json_of(r).await;
    assert_error(s, &b, 403, "model_not_allowed");
    let (s, b) = app
        .call(
            reqwest::Method::POST,
            "/v1/audio/speech",
            Some(&limited),
            Some(json!({"model": "tts", "input": "x", "voice": "alloy"})),
        )
        .await;
    assert_error(s, &b, 403, "model_not_allowed");
    assert!(gw.mock.requests().is_empty());
    let (s, _) = app.get("/api/me/usage/records", Some(&gw.user)).await;
    assert_eq!(s, 200);

    // With a balance: an upstream 500 comes back as sent and is metered at no cost.
    let alice = {
        let (s, b) = app.get("/api/me", Some(&gw.user)).await;
        assert_eq!(s, 200);
        b["id"].as_str().unwrap().to_owned()
    };
    let (s, b) = app
        .post(
            &format!("/api/admin/users/{alice}/balance"),
            Some(&gw.admin),
            json!({"amount_usd": 5.0, "note": "t"}),
        )
        .await;
    assert!(s == 200 || s == 201, "{s} {b}");
    let r = post_form(
        &app,
        "/v1/audio/transcriptions",
        &gw.key,
        form(&[
            ("model", None, b"audio-500"),
            ("file", Some("a.mp3"), b"abc"),
        ]),
        None,
    )
    .await;
    let (s, b) = json_of(r).await;
    assert_eq!(s, 500, "{b}");
    assert_eq!(b["error"]["message"], "boom");
    let r = post_form(
        &app,
        "/v1/audio/transcriptions",
        &gw.key,
        form(&[("model", None, b"whisper"), ("file", Some("a.mp3"), b"abc")]),
        None,
    )
    .await;
    assert_eq!(r.status(), 200);
    let records = wait_records(&app, &gw.user, 2).await;
    let failed = record(&records, "audio.transcriptions", "audio-500");
    assert_eq!(failed["status"], 500);
    assert_cost(failed, 0.0);
    assert_cost(record(&records, "audio.transcriptions", "whisper"), 0.009);
    // The balance was debited exactly that.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (_, me) = app.get("/api/me", Some(&gw.user)).await;
        if (me["balance_usd"].as_f64().unwrap() - (5.0 - 0.009)).abs() < 1e-9 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "balance {me}");
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
}

#[tokio::test]
async fn azure_serves_media_at_its_deployment_urls_with_its_api_key() {
    let app = TestApp::spawn().await;
    let gw = setup_media(&app).await;
    let base = format!("http://{}", gw.mock.addr);
    let (s, b) = app
        .post("/api/admin/providers", Some(&gw.admin), json!({"key": "az", "display_name": "Azure", "base_url": base, "kind": "azure", "api_version": "2024-10-21"}))
        .await;
    assert_eq!(s, 201, "{b}");
    let (s, b) = app
        .post("/api/admin/models", Some(&gw.admin), json!({"name": "az-whisper", "provider": "az", "upstream_model": "my-whisper", "type": "audio", "price_per_minute": 0.006}))
        .await;
    assert_eq!(s, 201, "{b}");
    let (s, b) = app
        .post(
            "/api/provider-keys",
            Some(&gw.user),
            json!({"provider": "az", "api_key": "azure-key-0123456789"}),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    let r = post_form(
        &app,
        "/v1/audio/transcriptions",
        &gw.key,
        form(&[
            ("model", None, b"az-whisper"),
            ("file", Some("a.mp3"), b"abc"),
        ]),
        None,
    )
    .await;
    let (s, b) = json_of(r).await;
    assert_eq!(s, 200, "{b}");
    let up = gw.mock.last();
    assert_eq!(
        up.path,
        "/openai/deployments/my-whisper/audio/transcriptions"
    );
    assert_eq!(up.headers["api-key"], "azure-key-0123456789");
    assert!(!up.headers.contains_key("authorization"));
    let records = wait_records(&app, &gw.user, 1).await;
    assert_cost(
        record(&records, "audio.transcriptions", "az-whisper"),
        0.009,
    );
}

#[tokio::test]
async fn every_media_route_is_in_the_openapi_document() {
    let app = TestApp::spawn().await;
    let (s, doc) = app.get("/openapi.json", None).await;
    assert_eq!(s, 200);
    for path in [
        "/v1/images/generations",
        "/v1/images/edits",
        "/v1/images/variations",
        "/v1/audio/speech",
        "/v1/audio/transcriptions",
        "/v1/audio/translations",
        "/v1/moderations",
    ] {
        assert!(doc["paths"][path]["post"].is_object(), "{path} missing");
    }
    assert!(
        doc["paths"]["/v1/images/edits"]["post"]["requestBody"]["content"]["multipart/form-data"]
            .is_object()
    );
}

#[tokio::test]
async fn speech_is_relayed_before_the_upstream_has_finished() {
    let app = TestApp::spawn().await;
    let gw = setup_media(&app).await;
    let gate = gw.mock.speech_gate();
    let mut r = app
        .client
        .post(app.url("/v1/audio/speech"))
        .bearer_auth(&gw.key)
        .json(&json!({"model": "tts-held", "input": "abc", "voice": "alloy"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let audio = speech_audio();
    let mut got = Vec::new();
    while got.len() < 16 * 1024 {
        got.extend_from_slice(&r.chunk().await.unwrap().expect("the first chunk"));
    }
    // The client has the first chunk while the upstream still holds the rest: nothing buffered.
    assert!(
        !gate.sent_all.load(std::sync::atomic::Ordering::SeqCst),
        "the gateway waited for the whole answer"
    );
    gate.release
        .store(true, std::sync::atomic::Ordering::SeqCst);
    while let Some(c) = r.chunk().await.unwrap() {
        got.extend_from_slice(&c);
    }
    assert!(got == audio, "audio intact");
    let records = wait_records(&app, &gw.user, 1).await;
    assert_cost(
        record(&records, "audio.speech", "tts-held"),
        3.0 * 15.0 / 1e6,
    );
}

#[tokio::test]
async fn an_upload_reaches_the_upstream_before_the_client_has_sent_it_all() {
    let app = TestApp::spawn().await;
    let gw = setup_media(&app).await;
    let file = file_bytes(512 * 1024);
    let body = form(&[("model", None, b"whisper"), ("file", Some("a.mp3"), &file)]);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(4);
    let first = body[..64 * 1024].to_vec();
    let rest = body[64 * 1024..].to_vec();
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    let req = app
        .client
        .post(app.url("/v1/audio/transcriptions"))
        .bearer_auth(&gw.key)
        .header(
            "content-type",
            format!("multipart/form-data; boundary={BOUNDARY}"),
        )
        .body(reqwest::Body::wrap_stream(stream))
        .send();
    let sending = tokio::spawn(req);
    tx.send(Ok(first)).await.unwrap();
    // The upstream sees the upload begin while the client still holds most of it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while gw.mock.bodies_started() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the gateway held the upload back"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    for c in rest.chunks(100 * 1024) {
        tx.send(Ok(c.to_vec())).await.unwrap();
    }
    drop(tx);
    let r = sending.await.unwrap().unwrap();
    assert_eq!(r.status(), 200);
    let up = gw.mock.last();
    let want = form(&[
        ("model", None, b"stt-seconds"),
        ("file", Some("a.mp3"), &file),
    ]);
    assert!(up.raw.as_ref() == want.as_slice(), "upload intact");
}
