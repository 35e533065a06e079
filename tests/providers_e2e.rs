//! The non-OpenAI providers end to end through the real App: one scripted upstream per kind
//! (Gemini, Azure OpenAI, Bedrock) on 127.0.0.1:0, each recording what it received. Every
//! client route that reaches them (`/v1/chat/completions`, `/v1/messages`, `/v1/responses`,
//! `/v1/embeddings`), stream and not; the upstream's URL, auth and body; the client's answer;
//! the usage records with the provider's own counts; errors in the client protocol's shape.

mod common;

use axum::http::header;
use common::TestApp;
use common::gateway;
use common::kinds::*;
use serde_json::{Value, json};

#[tokio::test]
async fn gemini_chat_completions_stream_and_not_metered_from_usage_metadata() {
    let app = TestApp::spawn().await;
    let (g, up) = gemini_world(&app).await;

    let (s, body) = call(
        &app,
        &g.key,
        "/v1/chat/completions",
        json!({"model": "gem", "temperature": 0.3, "top_p": 0.9, "stop": ["END"], "max_tokens": 100,
               "messages": [{"role": "system", "content": "Be brief."},
                            {"role": "user", "content": "Hi there, how are you doing today?"}]}),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let v = parse(&body);
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "gem", "the client's model name");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["message"]["content"], "Hello from gemini");
    assert_eq!(
        v["choices"][0]["message"]["reasoning_content"], "Let me think.",
        "thought parts are reasoning, not content"
    );
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["usage"]["prompt_tokens"], 25);
    assert_eq!(v["usage"]["completion_tokens"], 10, "candidates + thoughts");
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 8);
    assert_eq!(
        v["usage"]["completion_tokens_details"]["reasoning_tokens"],
        4
    );

    let seen = up.last();
    assert_eq!(seen.path, "/v1beta/models/gemini-2.5-flash:generateContent");
    assert_eq!(seen.query, None);
    assert_gemini_auth(&seen, &g.key);
    let sent = seen.json();
    assert_eq!(sent["systemInstruction"]["parts"][0]["text"], "Be brief.");
    assert_eq!(sent["contents"][0]["role"], "user");
    assert_eq!(
        sent["contents"][0]["parts"][0]["text"],
        "Hi there, how are you doing today?"
    );
    assert_eq!(sent["generationConfig"]["temperature"], 0.3);
    assert_eq!(sent["generationConfig"]["topP"], 0.9);
    assert_eq!(sent["generationConfig"]["stopSequences"], json!(["END"]));
    assert_eq!(sent["generationConfig"]["maxOutputTokens"], 100);
    assert!(
        sent.get("model").is_none() && sent.get("messages").is_none(),
        "{sent}"
    );

    // Streamed, usage asked for: text deltas, one usage chunk (the last report), [DONE].
    let (s, h, body) = post_raw(
        &app,
        "/v1/chat/completions",
        &[("authorization", &format!("Bearer {}", g.key))],
        json!({"model": "gem", "stream": true, "stream_options": {"include_usage": true},
               "messages": [{"role": "user", "content": "Hi there, how are you doing today?"}]}),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    assert!(
        h[header::CONTENT_TYPE]
            .to_str()
            .unwrap_or_default()
            .starts_with("text/event-stream")
    );
    let chunks = chat_chunks(&body);
    assert_eq!(chunk_text(&chunks), "Hello from gemini");
    let reasoning: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["reasoning_content"].as_str())
        .collect();
    assert_eq!(reasoning, "Let me think.");
    assert!(chunks.iter().all(|c| c["model"] == "gem"), "{body}");
    assert!(
        chunks
            .iter()
            .any(|c| c["choices"][0]["finish_reason"] == "stop"),
        "{body}"
    );
    let usage: Vec<&Value> = chunks.iter().filter(|c| c["usage"].is_object()).collect();
    assert_eq!(usage.len(), 1, "one usage chunk: {body}");
    let u = &usage[0]["usage"];
    assert_eq!(u["prompt_tokens"], 25, "the last cumulative report: {u}");
    assert_eq!(u["completion_tokens"], 10, "{u}");
    assert_eq!(u["prompt_tokens_details"]["cached_tokens"], 8, "{u}");
    assert_eq!(u["completion_tokens_details"]["reasoning_tokens"], 4, "{u}");
    let seen = up.last();
    assert_eq!(
        seen.path,
        "/v1beta/models/gemini-2.5-flash:streamGenerateContent"
    );
    assert_eq!(seen.query.as_deref(), Some("alt=sse"));
    assert_gemini_auth(&seen, &g.key);

    // Streamed without include_usage: no usage chunk reaches the client, yet it is metered.
    let (s, body) = call(
        &app,
        &g.key,
        "/v1/chat/completions",
        json!({"model": "gem", "stream": true,
               "messages": [{"role": "user", "content": "Hi there, how are you doing today?"}]}),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let chunks = chat_chunks(&body);
    assert_eq!(chunk_text(&chunks), "Hello from gemini");
    assert!(
        chunks.iter().all(|c| !c["usage"].is_object()),
        "usage was not asked for: {body}"
    );

    let records = gateway::wait_records(&app, &g.user, 3).await;
    let recs = records_for(&records, "gem", "chat.completions");
    assert_eq!(recs.len(), 3, "{records:?}");
    assert_eq!(recs.iter().filter(|r| r["stream"] == true).count(), 2);
    for r in recs {
        assert_eq!(r["provider"], "google", "{r}");
        assert_record(r, GEMINI_COUNTS);
    }
    app.stop().await;
}

#[tokio::test]
async fn gemini_tool_call_round_trip_resolves_the_function_name_and_keeps_the_signature() {
    let app = TestApp::spawn().await;
    let (g, up) = gemini_world(&app).await;
    let tools = json!([{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]);
    let user = json!({"role": "user", "content": "What is the weather in Paris today?"});

    let (s, body) = call(
        &app,
        &g.key,
        "/v1/chat/completions",
        json!({"model": "gem", "tools": tools, "tool_choice": "auto", "messages": [user]}),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let v = parse(&body);
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
    let message = v["choices"][0]["message"].clone();
    let call0 = &message["tool_calls"][0];
    assert_eq!(call0["type"], "function");
    assert_eq!(call0["function"]["name"], "get_weather");
    assert_eq!(
        parse(call0["function"]["arguments"].as_str().expect("arguments")),
        json!({"city": "Paris"})
    );
    let call_id = call0["id"].as_str().expect("call id").to_owned();
    assert!(call_id.starts_with("call_"), "{call_id}");
    let sent = up.last().json();
    assert_eq!(
        sent["tools"][0]["functionDeclarations"][0]["name"],
        "get_weather"
    );
    assert_eq!(
        sent["toolConfig"]["functionCallingConfig"]["mode"], "AUTO",
        "{sent}"
    );

    // The client sends the assistant message back as it got it, with the tool's result.
    let (s, body) = call(
        &app,
        &g.key,
        "/v1/chat/completions",
        json!({"model": "gem", "tools": tools, "messages": [
            user, message,
            {"role": "tool", "tool_call_id": call_id, "content": "{\"forecast\": \"sunny\", \"celsius\": 24}"}]}),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let v = parse(&body);
    assert_eq!(
        v["choices"][0]["message"]["content"],
        "It is sunny in Paris."
    );
    let sent = up.last().json();
    let contents = sent["contents"].as_array().expect("contents");
    assert_eq!(contents.len(), 3, "{sent}");
    assert_eq!(contents[1]["role"], "model");
    assert_eq!(
        contents[1]["parts"][0]["functionCall"],
        json!({"name": "get_weather", "args": {"city": "Paris"}})
    );
    assert_eq!(
        contents[1]["parts"][0]["thoughtSignature"], "c2lnLXdlYXRoZXItMQ==",
        "the thought signature goes back on its call: {sent}"
    );
    assert_eq!(contents[2]["role"], "user");
    assert_eq!(
        contents[2]["parts"][0]["functionResponse"],
        json!({"name": "get_weather", "response": {"forecast": "sunny", "celsius": 24}}),
        "the result carries the name resolved from the call id"
    );

    // A result for a call that never happened is the client's 400, and nothing is sent.
    let before = up.count();
    let (s, body) = call(
        &app,
        &g.key,
        "/v1/chat/completions",
        json!({"model": "gem", "messages": [user,
            {"role": "tool", "tool_call_id": "call_unknown", "content": "x"}]}),
    )
    .await;
    assert_eq!(s, 400, "{body}");
    assert!(
        parse(&body)["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("call_unknown"),
        "{body}"
    );
    assert_eq!(up.count(), before);
    app.stop().await;
}

#[tokio::test]
async fn gemini_embeddings_go_to_batch_embed_contents_and_are_estimated() {
    let app = TestApp::spawn().await;
    let (g, up) = gemini_world(&app).await;
    let (s, body) = call(
        &app,
        &g.key,
        "/v1/embeddings",
        json!({"model": "gem-embed", "input": ["hello world", "goodbye moon"], "dimensions": 3}),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let v = parse(&body);
    assert_eq!(v["object"], "list");
    assert_eq!(v["model"], "gem-embed");
    let data = v["data"].as_array().expect("data");
    assert_eq!(data.len(), 2);
    assert_eq!(data[1]["index"], 1);
    assert_eq!(data[1]["object"], "embedding");
    assert_eq!(data[1]["embedding"], json!([0.25, -0.5, 0.125]));

    let seen = up.last();
    assert_eq!(
        seen.path,
        "/v1beta/models/text-embedding-004:batchEmbedContents"
    );
    assert_gemini_auth(&seen, &g.key);
    let sent = seen.json();
    let requests = sent["requests"].as_array().expect("requests");
    assert_eq!(requests.len(), 2);
    assert_eq!(requests[0]["model"], "models/text-embedding-004");
    assert_eq!(requests[1]["content"]["parts"][0]["text"], "goodbye moon");
    assert_eq!(requests[0]["outputDimensionality"], 3);

    // `encoding_format: base64` (the OpenAI SDKs' default): OpenAI's little-endian f32 base64.
    let (s, body) = call(
        &app,
        &g.key,
        "/v1/embeddings",
        json!({"model": "gem-embed", "input": ["hello world", "goodbye moon"], "encoding_format": "base64"}),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let v = parse(&body);
    let b64 = v["data"][1]["embedding"]
        .as_str()
        .unwrap_or_else(|| panic!("a base64 string: {v}"));
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .expect("base64");
    let floats: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect();
    assert_eq!(floats, [0.25, -0.5, 0.125]);
    assert!(up.last().json().get("encoding_format").is_none());

    // Gemini reports no usage for embeddings: the gateway counts, and says so.
    let records = gateway::wait_records(&app, &g.user, 2).await;
    let r = records_for(&records, "gem-embed", "embeddings")[0];
    assert_eq!(r["status"], 200, "{r}");
    assert_eq!(r["tokens_estimated"], true, "{r}");
    let prompt = r["prompt_tokens"].as_i64().expect("prompt");
    assert!((2..=20).contains(&prompt), "a count of the inputs: {r}");
    assert_eq!(r["completion_tokens"], 0, "{r}");
    app.stop().await;
}

#[tokio::test]
async fn messages_and_responses_to_gemini_are_translated_stream_and_not() {
    let app = TestApp::spawn().await;
    let (g, up) = gemini_world(&app).await;
    let anthropic = [
        ("x-api-key", g.key.as_str()),
        ("anthropic-version", "2023-06-01"),
    ];

    // Anthropic's Messages API, non-stream.
    let (s, _, body) = post_raw(
        &app,
        "/v1/messages",
        &anthropic,
        json!({"model": "gem", "max_tokens": 200, "system": "Be brief.",
               "messages": [{"role": "user", "content": "Hi there, how are you doing today?"}]}),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let v = parse(&body);
    assert_eq!(v["type"], "message");
    assert_eq!(v["role"], "assistant");
    assert_eq!(v["model"], "gem");
    assert_eq!(anthropic_text(&v), "Hello from gemini");
    assert_eq!(v["stop_reason"], "end_turn");
    assert_eq!(
        v["usage"]["input_tokens"], 17,
        "Anthropic's input_tokens exclude cache reads"
    );
    assert_eq!(v["usage"]["cache_read_input_tokens"], 8);
    assert_eq!(v["usage"]["output_tokens"], 10);
    let seen = up.last();
    assert_eq!(seen.path, "/v1beta/models/gemini-2.5-flash:generateContent");
    assert_gemini_auth(&seen, &g.key);
    assert!(
        seen.header("anthropic-version").is_some(),
        "forwarded request headers follow §8"
    );
    let sent = seen.json();
    assert_eq!(sent["systemInstruction"]["parts"][0]["text"], "Be brief.");
    assert_eq!(sent["generationConfig"]["maxOutputTokens"], 200);

    // Streamed: message_start first, text deltas, message_delta with usage, message_stop.
    let (s, _, body) = post_raw(
        &app,
        "/v1/messages",
        &anthropic,
        json!({"model": "gem", "max_tokens": 200, "stream": true,
               "messages": [{"role": "user", "content": "Hi there, how are you doing today?"}]}),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let events = sse(&body);
    assert_eq!(events[0].0.as_deref(), Some("message_start"), "{body}");
    assert_eq!(
        events.last().and_then(|e| e.0.as_deref()),
        Some("message_stop"),
        "{body}"
    );
    assert_eq!(anthropic_stream_text(&events), "Hello from gemini");
    let delta = events
        .iter()
        .rfind(|e| e.0.as_deref() == Some("message_delta"))
        .map(|e| parse(&e.1))
        .expect("message_delta");
    assert_eq!(delta["delta"]["stop_reason"], "end_turn", "{delta}");
    assert_eq!(delta["usage"]["output_tokens"], 10, "{delta}");
    assert_eq!(up.last().query.as_deref(), Some("alt=sse"));

    // OpenAI's Responses API, non-stream and streamed.
    let (s, body) = call(
        &app,
        &g.key,
        "/v1/responses",
        json!({"model": "gem", "instructions": "Be brief.", "input": "Hi there, how are you doing today?"}),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let v = parse(&body);
    assert_eq!(v["object"], "response");
    assert_eq!(v["status"], "completed");
    assert_eq!(v["model"], "gem");
    let response_id = v["id"].as_str().expect("id").to_owned();
    assert!(response_id.starts_with("resp_"), "{response_id}");
    let msg = v["output"]
        .as_array()
        .and_then(|o| o.iter().find(|i| i["type"] == "message"))
        .expect("a message item");
    assert_eq!(msg["content"][0]["type"], "output_text");
    assert_eq!(msg["content"][0]["text"], "Hello from gemini");
    assert_eq!(v["usage"]["input_tokens"], 25);
    assert_eq!(v["usage"]["input_tokens_details"]["cached_tokens"], 8);
    assert_eq!(v["usage"]["output_tokens"], 10);
    assert_eq!(v["usage"]["output_tokens_details"]["reasoning_tokens"], 4);
    let seen = up.last();
    assert_eq!(seen.path, "/v1beta/models/gemini-2.5-flash:generateContent");
    assert_gemini_auth(&seen, &g.key);
    assert_eq!(
        seen.json()["systemInstruction"]["parts"][0]["text"],
        "Be brief."
    );

    let (s, body) = call(
        &app,
        &g.key,
        "/v1/responses",
        json!({"model": "gem", "input": "Hi there, how are you doing today?", "stream": true, "store": false}),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let events = sse(&body);
    let names: Vec<&str> = events.iter().filter_map(|e| e.0.as_deref()).collect();
    assert_eq!(names.first(), Some(&"response.created"), "{body}");
    assert_eq!(names.last(), Some(&"response.completed"), "{body}");
    let text: String = events
        .iter()
        .filter(|e| e.0.as_deref() == Some("response.output_text.delta"))
        .filter_map(|e| parse(&e.1)["delta"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(text, "Hello from gemini");
    let done = parse(&events.last().expect("last").1);
    assert_eq!(done["response"]["usage"]["input_tokens"], 25, "{done}");
    assert_eq!(done["response"]["usage"]["output_tokens"], 10, "{done}");
    assert_eq!(up.last().query.as_deref(), Some("alt=sse"));

    let records = gateway::wait_records(&app, &g.user, 4).await;
    let messages = records_for(&records, "gem", "messages");
    let responses = records_for(&records, "gem", "responses");
    assert_eq!((messages.len(), responses.len()), (2, 2), "{records:?}");
    for r in messages.iter().chain(&responses) {
        assert_record(r, GEMINI_COUNTS);
    }
    assert!(
        responses
            .iter()
            .any(|r| r["response_id"] == response_id.as_str()),
        "{responses:?}"
    );
    app.stop().await;
}

#[tokio::test]
async fn azure_dated_and_v1_apis_with_the_deployment_and_api_key() {
    let app = TestApp::spawn().await;
    let (g, up) = azure_world(&app).await;

    // Dated API, non-stream.
    let (s, body) = call(
        &app,
        &g.key,
        "/v1/chat/completions",
        json!({"model": "az-gpt", "messages": [{"role": "system", "content": "Be brief."},
                                               {"role": "user", "content": "What is the capital of France?"}]}),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let v = parse(&body);
    assert_eq!(v["model"], "az-gpt");
    assert_eq!(
        v["choices"][0]["message"]["content"],
        "Paris is the capital of France."
    );
    assert_eq!(v["usage"]["prompt_tokens"], 24);
    assert_eq!(v["usage"]["completion_tokens"], 8);
    let seen = up.last();
    assert_eq!(seen.path, "/openai/deployments/gpt4o-prod/chat/completions");
    assert_eq!(seen.query.as_deref(), Some("api-version=2024-10-21"));
    assert_azure_auth(&seen, &g.key);
    let sent = seen.json();
    assert_eq!(sent["messages"][0]["role"], "system");
    assert_eq!(
        sent["messages"][1]["content"],
        "What is the capital of France?"
    );

    // Dated API, streamed: Azure's filter-only chunks never reach the client.
    let (s, body) = call(
        &app,
        &g.key,
        "/v1/chat/completions",
        json!({"model": "az-gpt", "stream": true, "stream_options": {"include_usage": true},
               "messages": [{"role": "user", "content": "What is the capital of France?"}]}),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let chunks = chat_chunks(&body);
    assert_eq!(chunk_text(&chunks), "Paris.");
    for c in &chunks {
        assert_eq!(c["model"], "az-gpt", "{c}");
        assert!(
            c["usage"].is_object() || c["choices"].as_array().is_some_and(|a| !a.is_empty()),
            "a filter-only chunk leaked: {c}"
        );
        assert!(c.get("prompt_filter_results").is_none(), "{c}");
    }
    let usage: Vec<&Value> = chunks.iter().filter(|c| c["usage"].is_object()).collect();
    assert_eq!(usage.len(), 1, "{body}");
    assert_eq!(usage[0]["usage"]["prompt_tokens"], 14);
    assert_eq!(usage[0]["usage"]["completion_tokens"], 2);
    let seen = up.last();
    assert_eq!(seen.path, "/openai/deployments/gpt4o-prod/chat/completions");
    assert_eq!(seen.json()["stream"], true);
    assert_eq!(
        seen.json()["stream_options"]["include_usage"],
        true,
        "the gateway always asks for usage"
    );

    // No api_version: the v1 API, the deployment in the body.
    let (s, body) = call(
        &app,
        &g.key,
        "/v1/chat/completions",
        json!({"model": "az1-gpt", "messages": [{"role": "user", "content": "What is the capital of France?"}]}),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(parse(&body)["model"], "az1-gpt");
    let seen = up.last();
    assert_eq!(seen.path, "/openai/v1/chat/completions");
    assert_eq!(seen.query, None);
    assert_eq!(seen.json()["model"], "gpt4o-v1");
    assert_azure_auth(&seen, &g.key);

    // Anthropic's Messages API to Azure.
    let (s, _, body) = post_raw(
        &app,
        "/v1/messages",
        &[("x-api-key", &g.key)],
        json!({"model": "az-gpt", "max_tokens": 64,
               "messages": [{"role": "user", "content": "What is the capital of France?"}]}),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let v = parse(&body);
    assert_eq!(v["type"], "message");
    assert_eq!(anthropic_text(&v), "Paris is the capital of France.");
    assert_eq!(v["usage"]["input_tokens"], 24);
    assert_eq!(v["usage"]["output_tokens"], 8);
    let seen = up.last();
    assert_eq!(seen.path, "/openai/deployments/gpt4o-prod/chat/completions");
    assert_azure_auth(&seen, &g.key);
    assert_eq!(seen.json()["max_tokens"], 64, "{}", seen.json());

    // Embeddings per deployment.
    let (s, body) = call(
        &app,
        &g.key,
        "/v1/embeddings",
        json!({"model": "az-embed", "input": "hello world"}),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let v = parse(&body);
    assert_eq!(v["model"], "az-embed");
    assert_eq!(v["data"][0]["embedding"], json!([0.5, -0.25]));
    let seen = up.last();
    assert_eq!(seen.path, "/openai/deployments/embed-prod/embeddings");
    assert_eq!(seen.query.as_deref(), Some("api-version=2024-10-21"));
    assert_azure_auth(&seen, &g.key);

    let records = gateway::wait_records(&app, &g.user, 5).await;
    let chat = records_for(&records, "az-gpt", "chat.completions");
    assert_eq!(chat.len(), 2, "{records:?}");
    for r in chat {
        let want = if r["stream"] == true {
            Counts {
                prompt: 14,
                completion: 2,
                cached: 0,
                cache_write: 0,
                reasoning: 0,
            }
        } else {
            Counts {
                prompt: 24,
                completion: 8,
                cached: 0,
                cache_write: 0,
                reasoning: 0,
            }
        };
        assert_record(r, want);
    }
    let full = Counts {
        prompt: 24,
        completion: 8,
        cached: 0,
        cache_write: 0,
        reasoning: 0,
    };
    assert_record(
        records_for(&records, "az1-gpt", "chat.completions")[0],
        full,
    );
    assert_record(records_for(&records, "az-gpt", "messages")[0], full);
    let e = records_for(&records, "az-embed", "embeddings")[0];
    assert_record(
        e,
        Counts {
            prompt: 6,
            completion: 0,
            cached: 0,
            cache_write: 0,
            reasoning: 0,
        },
    );
    app.stop().await;
}

#[tokio::test]
async fn responses_to_azure_go_to_its_responses_api_untranslated() {
    let app = TestApp::spawn().await;
    let (g, up) = azure_world(&app).await;
    for (model, deployment, path, query) in [
        (
            "az-gpt",
            "gpt4o-prod",
            "/openai/responses",
            Some("api-version=2024-10-21"),
        ),
        ("az1-gpt", "gpt4o-v1", "/openai/v1/responses", None),
    ] {
        let (s, body) = call(
            &app,
            &g.key,
            "/v1/responses",
            json!({"model": model, "instructions": "Be brief.", "input": "Hi there, how are you?",
                   "text": {"format": {"type": "text"}}}),
        )
        .await;
        assert_eq!(s, 200, "{model}: {body}");
        let v = parse(&body);
        assert_eq!(v["model"], model);
        let id = v["id"].as_str().expect("id");
        assert!(
            id.starts_with("resp_") && id != "resp_azure_own",
            "tollgate's id: {id}"
        );
        assert_eq!(v["output"][0]["content"][0]["text"], "Azure says hi");
        let seen = up.last();
        assert_eq!(seen.path, path);
        assert_eq!(seen.query.as_deref(), query);
        assert_azure_auth(&seen, &g.key);
        let sent = seen.json();
        assert_eq!(sent["model"], deployment);
        assert_eq!(
            sent["instructions"], "Be brief.",
            "passed as the Responses API: {sent}"
        );
        assert_eq!(sent["store"], false, "upstreams are stateless");
        assert!(
            sent.get("messages").is_none(),
            "not translated to chat: {sent}"
        );
    }
    let records = gateway::wait_records(&app, &g.user, 2).await;
    for model in ["az-gpt", "az1-gpt"] {
        let r = records_for(&records, model, "responses");
        assert_eq!(r.len(), 1, "{records:?}");
        assert_record(
            r[0],
            Counts {
                prompt: 21,
                completion: 9,
                cached: 5,
                cache_write: 0,
                reasoning: 3,
            },
        );
    }
    app.stop().await;
}

#[tokio::test]
async fn bedrock_converse_signed_stream_and_not_on_chat_and_messages() {
    let app = TestApp::spawn().await;
    let (g, up) = bedrock_world(&app).await;

    let (s, body) = call(
        &app,
        &g.key,
        "/v1/chat/completions",
        json!({"model": "claude-br", "max_tokens": 100, "temperature": 0.2, "stop": ["END"],
               "messages": [{"role": "system", "content": "Be brief."},
                            {"role": "user", "content": "Hi there, how are you doing today?"}]}),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let v = parse(&body);
    assert_eq!(v["model"], "claude-br");
    assert_eq!(v["choices"][0]["message"]["content"], "Hello from bedrock");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(
        v["usage"]["prompt_tokens"], 37,
        "input + cache read + cache write"
    );
    assert_eq!(v["usage"]["completion_tokens"], 7);
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 20);
    let seen = up.last();
    assert_eq!(seen.path, format!("/model/{CLAUDE_SEGMENT}/converse"));
    assert_eq!(seen.query, None);
    assert_sigv4(&seen, &g.key);
    let sent = seen.json();
    assert_eq!(sent["system"][0]["text"], "Be brief.");
    assert_eq!(sent["messages"][0]["role"], "user");
    assert_eq!(
        sent["messages"][0]["content"][0]["text"],
        "Hi there, how are you doing today?"
    );
    assert_eq!(sent["inferenceConfig"]["maxTokens"], 100);
    assert_eq!(sent["inferenceConfig"]["temperature"], 0.2);
    assert_eq!(sent["inferenceConfig"]["stopSequences"], json!(["END"]));

    // Streamed: the event-stream frames become OpenAI chunks.
    let (s, body) = call(
        &app,
        &g.key,
        "/v1/chat/completions",
        json!({"model": "claude-br", "stream": true, "stream_options": {"include_usage": true},
               "messages": [{"role": "user", "content": "Hi there, how are you doing today?"}]}),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let chunks = chat_chunks(&body);
    assert_eq!(chunk_text(&chunks), "Hello from bedrock");
    assert!(
        chunks
            .iter()
            .any(|c| c["choices"][0]["finish_reason"] == "stop")
    );
    let usage: Vec<&Value> = chunks.iter().filter(|c| c["usage"].is_object()).collect();
    assert_eq!(usage.len(), 1, "{body}");
    assert_eq!(usage[0]["usage"]["prompt_tokens"], 37);
    assert_eq!(usage[0]["usage"]["completion_tokens"], 7);
    let seen = up.last();
    assert_eq!(
        seen.path,
        format!("/model/{CLAUDE_SEGMENT}/converse-stream")
    );
    assert_sigv4(&seen, &g.key);

    // Anthropic's Messages API, non-stream and streamed.
    let anthropic = [
        ("x-api-key", g.key.as_str()),
        ("anthropic-version", "2023-06-01"),
    ];
    let (s, _, body) = post_raw(
        &app,
        "/v1/messages",
        &anthropic,
        json!({"model": "claude-br", "max_tokens": 300, "system": "Be brief.",
               "messages": [{"role": "user", "content": "Hi there, how are you doing today?"}]}),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let v = parse(&body);
    assert_eq!(v["type"], "message");
    assert_eq!(v["model"], "claude-br");
    assert_eq!(anthropic_text(&v), "Hello from bedrock");
    assert_eq!(v["stop_reason"], "end_turn");
    assert_eq!(v["usage"]["input_tokens"], 12);
    assert_eq!(v["usage"]["cache_read_input_tokens"], 20);
    assert_eq!(v["usage"]["cache_creation_input_tokens"], 5);
    assert_eq!(v["usage"]["output_tokens"], 7);
    let seen = up.last();
    assert_eq!(seen.path, format!("/model/{CLAUDE_SEGMENT}/converse"));
    assert_sigv4(&seen, &g.key);
    assert_eq!(seen.json()["inferenceConfig"]["maxTokens"], 300);

    let (s, _, body) = post_raw(
        &app,
        "/v1/messages",
        &anthropic,
        json!({"model": "claude-br", "max_tokens": 300, "stream": true,
               "messages": [{"role": "user", "content": "Hi there, how are you doing today?"}]}),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let events = sse(&body);
    assert_eq!(events[0].0.as_deref(), Some("message_start"), "{body}");
    assert_eq!(
        events.last().and_then(|e| e.0.as_deref()),
        Some("message_stop"),
        "{body}"
    );
    assert_eq!(anthropic_stream_text(&events), "Hello from bedrock");
    let delta = events
        .iter()
        .rfind(|e| e.0.as_deref() == Some("message_delta"))
        .map(|e| parse(&e.1))
        .expect("message_delta");
    assert_eq!(delta["usage"]["output_tokens"], 7, "{delta}");
    assert_eq!(
        up.last().path,
        format!("/model/{CLAUDE_SEGMENT}/converse-stream")
    );

    let records = gateway::wait_records(&app, &g.user, 4).await;
    let chat = records_for(&records, "claude-br", "chat.completions");
    let messages = records_for(&records, "claude-br", "messages");
    assert_eq!((chat.len(), messages.len()), (2, 2), "{records:?}");
    for r in chat.iter().chain(&messages) {
        assert_eq!(r["provider"], "aws", "{r}");
        assert_record(r, BEDROCK_COUNTS);
    }
    app.stop().await;
}

#[tokio::test]
async fn a_bedrock_key_that_is_not_aws_json_is_a_clear_400_at_save_time_that_never_echoes_it() {
    let app = TestApp::spawn().await;
    let (g, up) = bedrock_world(&app).await;
    let user = common::accounts::user_token(&app, "bob").await;
    for secret in [
        "AKIASECRETSECRETKEY1234",
        r#"{"access_key_id":"AKIASECRETSECRETKEY1234"}"#,
    ] {
        let (s, b) = app
            .post(
                "/api/provider-keys",
                Some(&user),
                json!({"provider": "aws", "api_key": secret}),
            )
            .await;
        assert_eq!(s, 400, "{b}");
        assert_eq!(b["error"]["code"], "invalid_provider_key", "{b}");
        let msg = b["error"]["message"].as_str().expect("message");
        assert!(
            msg.contains("access_key_id") && msg.contains("secret_access_key"),
            "names the expected shape: {msg}"
        );
        assert!(!b.to_string().contains("SECRETSECRET"), "never echoed: {b}");
    }
    let (s, b) = app.get("/api/provider-keys", Some(&user)).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["total"], 0, "nothing was saved: {b}");

    // Written readably (spaces, new lines), the JSON key is accepted, stored compacted, and works.
    let readable = "{\n  \"access_key_id\": \"AKIDEXAMPLE\",\n  \"secret_access_key\": \"wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY\"\n}";
    let (s, b) = app
        .post(
            "/api/provider-keys",
            Some(&user),
            json!({"provider": "aws", "api_key": readable}),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    let (key, _) = gateway::new_key(&app, &user, json!({"name": "k"})).await;
    let before = up.count();
    let (s, body) = call(
        &app,
        &key,
        "/v1/chat/completions",
        json!({"model": "claude-br", "messages": [{"role": "user", "content": "Hi"}]}),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(up.count(), before + 1);
    // The first user's key still works too.
    let (s, body) = call(
        &app,
        &g.key,
        "/v1/chat/completions",
        json!({"model": "claude-br", "messages": [{"role": "user", "content": "Hi there, how are you doing today?"}]}),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    app.stop().await;
}

// ---------------------------------------------------------------- errors

#[tokio::test]
async fn upstream_errors_reach_each_client_in_its_own_shape() {
    let app = TestApp::spawn().await;
    let g = gateway::setup(&app).await;
    let gem = Upstream::start(gemini).await;
    let az = Upstream::start(azure).await;
    let br = Upstream::start(bedrock).await;
    add_provider(
        &app,
        &g,
        json!({"key": "google", "display_name": "Gemini", "kind": "gemini",
               "base_url": format!("{}/v1beta", gem.addr)}),
        &[("gem-busy", "gem-busy", "chat")],
        GEMINI_SECRET,
    )
    .await;
    add_provider(
        &app,
        &g,
        json!({"key": "az", "display_name": "Azure", "kind": "azure", "base_url": az.addr,
               "api_version": AZURE_VERSION}),
        &[("az-filter", "filtered", "chat")],
        AZURE_SECRET,
    )
    .await;
    add_provider(
        &app,
        &g,
        json!({"key": "aws", "display_name": "Bedrock", "kind": "bedrock", "region": "us-east-1",
               "base_url": br.addr}),
        &[
            ("br-busy", "anthropic.claude-busy-v1:0", "chat"),
            ("br-cut", "anthropic.claude-cut-v1:0", "chat"),
        ],
        &aws_key(),
    )
    .await;

    // (model, status, OpenAI type, OpenAI code, Anthropic type, message fragment)
    let cases = [
        (
            "gem-busy",
            429,
            "rate_limit_error",
            Some("rate_limit_exceeded"),
            "rate_limit_error",
            "exceeded your current quota",
        ),
        (
            "br-busy",
            429,
            "rate_limit_error",
            None,
            "rate_limit_error",
            "Too many requests",
        ),
        (
            "az-filter",
            400,
            "invalid_request_error",
            Some("content_filter"),
            "invalid_request_error",
            "content management policy",
        ),
    ];
    let mut calls = 0;
    for (model, status, openai_type, openai_code, anthropic_type, fragment) in cases {
        for stream in [false, true] {
            let (s, body) = call(
                &app,
                &g.key,
                "/v1/chat/completions",
                json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": "Hi"}]}),
            )
            .await;
            calls += 1;
            assert_eq!(s, status, "{model} stream={stream}: {body}");
            let v = parse(&body);
            assert_eq!(v["error"]["type"], openai_type, "{model}: {v}");
            assert_eq!(v["error"]["code"].as_str(), openai_code, "{model}: {v}");
            assert!(
                v["error"]["message"]
                    .as_str()
                    .unwrap_or_default()
                    .contains(fragment),
                "{model}: {v}"
            );
            assert!(v.get("type").is_none(), "OpenAI's shape: {v}");

            let (s, _, body) = post_raw(
                &app,
                "/v1/messages",
                &[("x-api-key", &g.key)],
                json!({"model": model, "stream": stream, "max_tokens": 10,
                       "messages": [{"role": "user", "content": "Hi"}]}),
            )
            .await;
            calls += 1;
            assert_eq!(s, status, "{model} stream={stream}: {body}");
            let v = parse(&body);
            assert_eq!(v["type"], "error", "Anthropic's shape: {v}");
            assert_eq!(v["error"]["type"], anthropic_type, "{model}: {v}");
            assert!(
                v["error"]["message"]
                    .as_str()
                    .unwrap_or_default()
                    .contains(fragment),
                "{model}: {v}"
            );
        }
    }
    assert_eq!(
        gem.count() + az.count() + br.count(),
        calls,
        "each reached its upstream"
    );
    assert!(gem.last().path.ends_with("/gem-busy:streamGenerateContent"));
    assert_eq!(
        br.last().path,
        "/model/anthropic.claude-busy-v1%3A0/converse-stream"
    );

    // A Bedrock stream that ends in a throttling exception: what came before, then the error
    // event in each client's shape.
    let (s, body) = call(
        &app,
        &g.key,
        "/v1/chat/completions",
        json!({"model": "br-cut", "stream": true, "messages": [{"role": "user", "content": "Hi"}]}),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let events = sse(&body);
    let texts: String = events
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(&e.1).ok())
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(texts, "Hello");
    let err = events
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(&e.1).ok())
        .find(|c| c.get("error").is_some())
        .unwrap_or_else(|| panic!("an error event: {body}"));
    assert_eq!(err["error"]["type"], "rate_limit_error", "{err}");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("Too many tokens"),
        "{err}"
    );
    let (s, _, body) = post_raw(
        &app,
        "/v1/messages",
        &[("x-api-key", &g.key)],
        json!({"model": "br-cut", "stream": true, "max_tokens": 10,
               "messages": [{"role": "user", "content": "Hi"}]}),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let events = sse(&body);
    assert_eq!(events[0].0.as_deref(), Some("message_start"), "{body}");
    let last = events.last().expect("events");
    assert_eq!(last.0.as_deref(), Some("error"), "{body}");
    let last = parse(&last.1);
    assert_eq!(last["type"], "error");
    assert_eq!(last["error"]["type"], "rate_limit_error", "{last}");

    // Each is one record with the upstream's status.
    let records = gateway::wait_records(&app, &g.user, calls + 2).await;
    check_error_records(&records);

    // Users whose keys the providers refuse: the key's fault, in each client's shape. A key an
    // upstream refused (401/403) is not used again (routing), so each protocol gets its own user.
    let mut refused_keys = Vec::new();
    for name in ["dave", "erin"] {
        let token = common::accounts::user_token(&app, name).await;
        for (provider, secret) in [
            ("google", "AIzaSy-revoked-key-000000000000000"),
            ("az", "ffffffffffffffffffffffffffffffff"),
            (
                "aws",
                r#"{"access_key_id":"AKIDEXAMPLE","secret_access_key":"not-the-secret"}"#,
            ),
        ] {
            let (s, b) = app
                .post(
                    "/api/provider-keys",
                    Some(&token),
                    json!({"provider": provider, "api_key": secret}),
                )
                .await;
            assert_eq!(s, 201, "{b}");
        }
        refused_keys.push(gateway::new_key(&app, &token, json!({"name": "d"})).await.0);
    }
    let (dave_key, erin_key) = (&refused_keys[0], &refused_keys[1]);
    // (model, status on both routes, OpenAI code)
    for (model, status, code) in [
        ("gem-busy", 400, Some("invalid_api_key")),
        ("az-filter", 401, Some("invalid_api_key")),
        ("br-busy", 401, Some("invalid_api_key")),
    ] {
        let (s, body) = call(
            &app,
            dave_key,
            "/v1/chat/completions",
            json!({"model": model, "messages": [{"role": "user", "content": "Hi"}]}),
        )
        .await;
        assert_eq!(s, status, "{model}: {body}");
        let v = parse(&body);
        assert_eq!(v["error"]["code"].as_str(), code, "{model}: {v}");
        if status == 401 {
            assert_eq!(v["error"]["type"], "authentication_error", "{model}: {v}");
        }
        let (s, _, body) = post_raw(
            &app,
            "/v1/messages",
            &[("x-api-key", erin_key)],
            json!({"model": model, "max_tokens": 10, "messages": [{"role": "user", "content": "Hi"}]}),
        )
        .await;
        assert_eq!(s, status, "{model}: {body}");
        let want = if status == 401 {
            "authentication_error"
        } else {
            "invalid_request_error"
        };
        assert_eq!(parse(&body)["error"]["type"], want, "{model}: {body}");
    }
    // The refused Azure key is now out of use: the next call does not reach the upstream and
    // says why.
    let (s, body) = call(
        &app,
        dave_key,
        "/v1/chat/completions",
        json!({"model": "az-filter", "messages": [{"role": "user", "content": "Hi"}]}),
    )
    .await;
    assert_eq!(s, 400, "{body}");
    let v = parse(&body);
    assert_eq!(v["error"]["code"], "provider_key_missing", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("rejected")),
        "{v}"
    );
    app.stop().await;
}

fn check_error_records(records: &[Value]) {
    for (model, status) in [
        ("gem-busy", 429),
        ("br-busy", 429),
        ("az-filter", 400),
        ("br-cut", 429),
    ] {
        let rs: Vec<&Value> = records.iter().filter(|r| r["model"] == model).collect();
        assert_eq!(
            rs.len(),
            if model == "br-cut" { 2 } else { 4 },
            "{model}: {records:?}"
        );
        assert!(rs.iter().all(|r| r["status"] == status), "{model}: {rs:?}");
    }
}

// ---------------------------------------------------------------- more paths

#[tokio::test]
async fn gemini_streamed_tool_calls_in_both_protocols_and_an_error_inside_a_stream() {
    let app = TestApp::spawn().await;
    let (g, up) = gemini_world(&app).await;

    // Anthropic client, tools in Anthropic's shape: a tool_use block with its JSON input.
    let (s, _, body) = post_raw(
        &app,
        "/v1/messages",
        &[("x-api-key", &g.key), ("x-request-id", "req-e2e-gemini-1")],
        json!({"model": "gem", "max_tokens": 200, "stream": true,
               "tools": [{"name": "get_weather", "description": "Weather of a city",
                          "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}],
               "messages": [{"role": "user", "content": "What is the weather in Paris today?"}]}),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let seen = up.last();
    assert_eq!(
        seen.header("x-request-id"),
        Some("req-e2e-gemini-1"),
        "x-request-id reaches the upstream"
    );
    assert_eq!(
        seen.json()["tools"][0]["functionDeclarations"][0]["name"],
        "get_weather"
    );
    let events = sse(&body);
    let start = events
        .iter()
        .filter(|e| e.0.as_deref() == Some("content_block_start"))
        .map(|e| parse(&e.1))
        .find(|e| e["content_block"]["type"] == "tool_use")
        .unwrap_or_else(|| panic!("a tool_use block: {body}"));
    assert_eq!(start["content_block"]["name"], "get_weather");
    assert!(
        start["content_block"]["id"]
            .as_str()
            .is_some_and(|id| !id.is_empty())
    );
    let input: String = events
        .iter()
        .filter(|e| e.0.as_deref() == Some("content_block_delta"))
        .map(|e| parse(&e.1))
        .filter(|e| e["delta"]["type"] == "input_json_delta")
        .filter_map(|e| e["delta"]["partial_json"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(parse(&input), json!({"city": "Paris"}), "{body}");
    let delta = events
        .iter()
        .rfind(|e| e.0.as_deref() == Some("message_delta"))
        .map(|e| parse(&e.1))
        .expect("message_delta");
    assert_eq!(delta["delta"]["stop_reason"], "tool_use", "{delta}");

    // OpenAI client, streamed: the call arrives whole, finish_reason tool_calls.
    let (s, body) = call(
        &app,
        &g.key,
        "/v1/chat/completions",
        json!({"model": "gem", "stream": true,
               "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}],
               "messages": [{"role": "user", "content": "What is the weather in Paris today?"}]}),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let chunks = chat_chunks(&body);
    let calls: Vec<&Value> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["tool_calls"].as_array())
        .flatten()
        .collect();
    assert_eq!(calls.len(), 1, "{body}");
    assert_eq!(calls[0]["function"]["name"], "get_weather");
    assert_eq!(
        parse(calls[0]["function"]["arguments"].as_str().expect("args")),
        json!({"city": "Paris"})
    );
    assert!(
        chunks
            .iter()
            .any(|c| c["choices"][0]["finish_reason"] == "tool_calls"),
        "{body}"
    );

    // Google's error object inside a stream: what came before, then the error, in each shape.
    let (s, body) = call(
        &app,
        &g.key,
        "/v1/chat/completions",
        json!({"model": "gem-flaky", "stream": true, "messages": [{"role": "user", "content": "Hi"}]}),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let payloads: Vec<Value> = sse(&body)
        .iter()
        .filter_map(|e| serde_json::from_str(&e.1).ok())
        .collect();
    assert_eq!(chunk_text(&payloads), "Hel");
    let err = payloads
        .iter()
        .find(|p| p.get("error").is_some())
        .unwrap_or_else(|| panic!("an error event: {body}"));
    assert_eq!(err["error"]["type"], "overloaded_error", "{err}");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("overloaded"),
        "{err}"
    );
    let (s, _, body) = post_raw(
        &app,
        "/v1/messages",
        &[("x-api-key", &g.key)],
        json!({"model": "gem-flaky", "stream": true, "max_tokens": 10,
               "messages": [{"role": "user", "content": "Hi"}]}),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let events = sse(&body);
    let last = events.last().expect("events");
    assert_eq!(last.0.as_deref(), Some("error"), "{body}");
    assert_eq!(parse(&last.1)["error"]["type"], "overloaded_error");

    let records = gateway::wait_records(&app, &g.user, 4).await;
    let flaky: Vec<&Value> = records
        .iter()
        .filter(|r| r["model"] == "gem-flaky")
        .collect();
    assert_eq!(flaky.len(), 2, "{records:?}");
    for r in flaky {
        assert_eq!(r["status"], 503, "{r}");
        assert_eq!(
            r["prompt_tokens"], 25,
            "what Gemini reported before failing: {r}"
        );
        assert_eq!(r["completion_tokens"], 1, "{r}");
        assert_eq!(r["tokens_estimated"], false, "{r}");
    }
    app.stop().await;
}

#[tokio::test]
async fn azure_responses_stream_and_a_client_authenticating_with_api_key() {
    let app = TestApp::spawn().await;
    let (g, up) = azure_world(&app).await;

    // The client's own `api-key` header is the gateway key: Azure gets the provider's.
    let (s, _, body) = post_raw(
        &app,
        "/v1/chat/completions",
        &[("api-key", &g.key)],
        json!({"model": "az-gpt", "messages": [{"role": "user", "content": "What is the capital of France?"}]}),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    assert_azure_auth(&up.last(), &g.key);

    // /v1/responses streamed to Azure's Responses API, relayed with tollgate's id and model.
    let (s, body) = call(
        &app,
        &g.key,
        "/v1/responses",
        json!({"model": "az-gpt", "input": "Hi there, how are you?", "stream": true}),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let events = sse(&body);
    assert_eq!(
        events.last().and_then(|e| e.0.as_deref()),
        Some("response.completed"),
        "{body}"
    );
    for (_, data) in &events {
        let e = parse(data);
        if let Some(r) = e.get("response") {
            assert_ne!(r["id"], "resp_azure_own", "{e}");
            assert_eq!(r["model"], "az-gpt", "{e}");
        }
    }
    let seen = up.last();
    assert_eq!(seen.path, "/openai/responses");
    assert_eq!(seen.query.as_deref(), Some("api-version=2024-10-21"));
    assert_eq!(seen.json()["stream"], true);
    assert_eq!(seen.json()["model"], "gpt4o-prod");
    assert_azure_auth(&seen, &g.key);

    let records = gateway::wait_records(&app, &g.user, 2).await;
    let r = records_for(&records, "az-gpt", "responses");
    assert_eq!(r.len(), 1, "{records:?}");
    assert_eq!(r[0]["stream"], true);
    assert_record(
        r[0],
        Counts {
            prompt: 21,
            completion: 9,
            cached: 5,
            cache_write: 0,
            reasoning: 3,
        },
    );
    app.stop().await;
}

#[tokio::test]
async fn responses_to_bedrock_are_translated_stream_and_not() {
    let app = TestApp::spawn().await;
    let (g, up) = bedrock_world(&app).await;
    let (s, body) = call(
        &app,
        &g.key,
        "/v1/responses",
        json!({"model": "claude-br", "instructions": "Be brief.", "input": "Hi there, how are you doing today?",
               "max_output_tokens": 120}),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let v = parse(&body);
    assert_eq!(v["object"], "response");
    assert_eq!(v["model"], "claude-br");
    let msg = v["output"]
        .as_array()
        .and_then(|o| o.iter().find(|i| i["type"] == "message"))
        .expect("a message item");
    assert_eq!(msg["content"][0]["text"], "Hello from bedrock");
    assert_eq!(v["usage"]["input_tokens"], 37);
    assert_eq!(v["usage"]["input_tokens_details"]["cached_tokens"], 20);
    assert_eq!(v["usage"]["output_tokens"], 7);
    let seen = up.last();
    assert_eq!(seen.path, format!("/model/{CLAUDE_SEGMENT}/converse"));
    assert_sigv4(&seen, &g.key);
    let sent = seen.json();
    assert_eq!(sent["system"][0]["text"], "Be brief.");
    assert_eq!(sent["inferenceConfig"]["maxTokens"], 120);

    let (s, body) = call(
        &app,
        &g.key,
        "/v1/responses",
        json!({"model": "claude-br", "input": "Hi there, how are you doing today?", "stream": true}),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let events = sse(&body);
    assert_eq!(
        events.last().and_then(|e| e.0.as_deref()),
        Some("response.completed"),
        "{body}"
    );
    let text: String = events
        .iter()
        .filter(|e| e.0.as_deref() == Some("response.output_text.delta"))
        .filter_map(|e| parse(&e.1)["delta"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(text, "Hello from bedrock");
    let seen = up.last();
    assert_eq!(
        seen.path,
        format!("/model/{CLAUDE_SEGMENT}/converse-stream")
    );
    assert_sigv4(&seen, &g.key);

    let records = gateway::wait_records(&app, &g.user, 2).await;
    let r = records_for(&records, "claude-br", "responses");
    assert_eq!(r.len(), 2, "{records:?}");
    for r in r {
        assert_record(r, BEDROCK_COUNTS);
    }
    app.stop().await;
}

#[tokio::test]
async fn bedrock_titan_embeddings_through_invoke_model() {
    let app = TestApp::spawn().await;
    let (g, up) = bedrock_world(&app).await;
    for format in ["float", "base64"] {
        let (s, body) = call(
            &app,
            &g.key,
            "/v1/embeddings",
            json!({"model": "titan", "input": "hello world", "dimensions": 256, "encoding_format": format}),
        )
        .await;
        assert_eq!(s, 200, "{body}");
        let v = parse(&body);
        assert_eq!(v["model"], "titan");
        assert_eq!(v["usage"]["prompt_tokens"], 7);
        let e = &v["data"][0]["embedding"];
        if format == "float" {
            assert_eq!(e.as_array().map(Vec::len), Some(4), "{v}");
        } else {
            use base64::Engine;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(e.as_str().unwrap_or_else(|| panic!("base64: {v}")))
                .expect("base64");
            assert_eq!(bytes.len(), 16, "four f32: {v}");
            assert_eq!(
                f32::from_le_bytes(bytes[..4].try_into().expect("4 bytes")),
                0.019_531_25
            );
        }
        let seen = up.last();
        assert_eq!(seen.path, "/model/amazon.titan-embed-text-v2%3A0/invoke");
        assert_sigv4(&seen, &g.key);
        assert_eq!(
            seen.json(),
            json!({"inputText": "hello world", "dimensions": 256})
        );
    }
    let records = gateway::wait_records(&app, &g.user, 2).await;
    let rs = records_for(&records, "titan", "embeddings");
    assert_eq!(rs.len(), 2, "{records:?}");
    for r in rs {
        assert_record(
            r,
            Counts {
                prompt: 7,
                completion: 0,
                cached: 0,
                cache_write: 0,
                reasoning: 0,
            },
        );
    }
    app.stop().await;
}
