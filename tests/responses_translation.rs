//! The Responses API translation (`protocols::responses`) on its own: requests in OpenAI's
//! published shapes → pivot chat requests, chat answers and chunk streams → `response` objects
//! and `response.*` events, and the pass-through helpers. No server, no network.
//!
//! The stream checker below is also run on a stream in OpenAI's own shape
//! (`tests/fixtures/responses/stream.sse`), so what it demands is what OpenAI does.
//!
//! With `TOLLGATE_TEST_PYTHON` set to a Python that has `openai`, the official SDK parses the
//! objects and streams this module writes (`tests/sdk/responses_parse.py`).

use std::collections::HashMap;

use bytes::BytesMut;
use proptest::prelude::*;
use serde_json::{Value, json};
use tollgate::pivot::{
    ChatChunk, ChatResponse, Choice, ChunkChoice, Content, Delta, FunctionCall, FunctionDelta,
    Message, ReasoningBlock, Role, ToolCall, ToolCallDelta, UpstreamError, WireUsage,
};
use tollgate::protocols::ChunkEncoder;
use tollgate::protocols::responses::{
    self, ENVELOPE_PREFIX, Input, ResponseCtx, ResponsesStream, from_chat, normalize_input,
    output_items, parse, to_chat, upstream_body, usage_of_event, usage_of_response,
};
use tollgate::providers::Usage;

fn fixture(name: &str) -> String {
    let path = format!(
        "{}/tests/fixtures/responses/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn err_of(body: Value) -> (String, Option<String>, String) {
    let e = parse(body.to_string().as_bytes())
        .and_then(|r| to_chat(&r, &[]))
        .expect_err("should be refused");
    let (status, _, code) = e.parts();
    assert_eq!(status.as_u16(), 400, "{e}");
    let param = match &e {
        tollgate::error::ApiError::BadRequest { param, .. } => param.clone(),
        _ => None,
    };
    (code.unwrap_or_default().to_owned(), param, e.to_string())
}

// ---------------------------------------------------------------------------------------------
// Request → chat
// ---------------------------------------------------------------------------------------------

#[test]
fn published_request_becomes_the_chat_request() {
    let req = parse(fixture("request.json").as_bytes()).expect("parse");
    assert!(req.store);
    let chat = to_chat(&req, &[]).expect("to_chat");
    assert_eq!(chat.model, "gpt-4.1");
    let roles: Vec<Role> = chat.messages.iter().map(|m| m.role).collect();
    assert_eq!(
        roles,
        [Role::System, Role::User, Role::Assistant, Role::Tool]
    );
    assert_eq!(
        chat.messages[0].text_content(),
        "You are a helpful weather assistant. Answer in JSON."
    );
    // User: text and image parts, detail kept.
    let Some(Content::Parts(parts)) = &chat.messages[1].content else {
        panic!("user parts: {:?}", chat.messages[1].content)
    };
    assert_eq!(parts[0].kind, "text");
    assert_eq!(parts[1].kind, "image_url");
    let img = parts[1].image_url.as_ref().expect("image");
    assert!(img.url.ends_with("Paris_sky.jpg"));
    assert_eq!(img.detail.as_deref(), Some("low"));
    // Reasoning joins the assistant turn that the function call opens.
    let a = &chat.messages[2];
    assert_eq!(
        a.reasoning_content.as_deref(),
        Some("The user wants the weather in Paris; call get_weather.")
    );
    assert_eq!(a.reasoning_blocks.len(), 1);
    assert_eq!(a.reasoning_blocks[0].kind, "encrypted");
    assert_eq!(
        a.reasoning_blocks[0].data.as_deref(),
        Some("gAAAAABor_Q7encryptedBlobFromOpenAI==")
    );
    assert_eq!(
        a.reasoning_blocks[0].id.as_deref(),
        Some("rs_68af3c4b2a1c8190a1f4e0d6b5c2a9f00b8c5e7d3f2a1b0c")
    );
    assert_eq!(a.tool_calls.len(), 1);
    assert_eq!(a.tool_calls[0].id, "call_Xu1mtqFhlQzGpNS8dDCJ0JQu");
    assert_eq!(a.tool_calls[0].function.name, "get_weather");
    assert_eq!(
        a.tool_calls[0].function.arguments,
        r#"{"location":"Paris, France"}"#
    );
    let t = &chat.messages[3];
    assert_eq!(
        t.tool_call_id.as_deref(),
        Some("call_Xu1mtqFhlQzGpNS8dDCJ0JQu")
    );
    assert!(t.text_content().contains("partly cloudy"));
    // Tools, format, bounds.
    assert_eq!(chat.tools.len(), 1);
    let f = chat.tools[0].function.as_ref().expect("function");
    assert_eq!(f.name, "get_weather");
    assert_eq!(f.strict, Some(true));
    assert_eq!(
        f.parameters.as_ref().expect("schema")["required"][0],
        "location"
    );
    assert_eq!(chat.tool_choice, Some(json!("auto")));
    assert_eq!(chat.parallel_tool_calls, Some(true));
    let rf = chat.response_format.as_ref().expect("response_format");
    assert_eq!(rf["type"], "json_schema");
    assert_eq!(rf["json_schema"]["name"], "weather_report");
    assert_eq!(rf["json_schema"]["strict"], true);
    assert_eq!(
        rf["json_schema"]["schema"]["required"],
        json!(["city", "temperature_c", "summary"])
    );
    assert_eq!(chat.max_completion_tokens, Some(1024));
    assert_eq!(chat.max_tokens, None);
    assert_eq!(chat.temperature, Some(0.2));
    assert_eq!(chat.reasoning_effort.as_deref(), Some("low"));
    assert_eq!(chat.user.as_deref(), Some("user_1234"));
    assert_eq!(
        chat.extra.get("prompt_cache_key"),
        Some(&json!("weather-v1"))
    );
    // Responses-only fields do not reach a chat upstream.
    assert!(chat.metadata.is_none() && chat.store.is_none());
    assert!(!chat.stream && chat.stream_options.is_none());
}

#[test]
fn string_input_is_one_user_message_and_stream_asks_for_usage() {
    let req = parse(br#"{"model":"m","input":"Hello","stream":true,"instructions":"Be brief."}"#)
        .expect("parse");
    assert_eq!(req.input, Input::Text("Hello".into()));
    let chat = to_chat(&req, &[]).expect("chat");
    assert_eq!(chat.messages.len(), 2);
    assert_eq!(chat.messages[0].role, Role::System);
    assert_eq!(chat.messages[1].role, Role::User);
    assert_eq!(
        chat.messages[1].content,
        Some(Content::Text("Hello".into()))
    );
    assert!(chat.stream);
    assert_eq!(chat.stream_options, Some(json!({"include_usage": true})));

    let items = normalize_input(&req);
    assert_eq!(items.len(), 1);
    assert!(items[0]["id"].as_str().expect("id").starts_with("msg_"));
    assert_eq!(items[0]["type"], "message");
    assert_eq!(items[0]["role"], "user");
    assert_eq!(
        items[0]["content"],
        json!([{"type": "input_text", "text": "Hello"}])
    );
}

#[test]
fn item_input_maps_roles_merges_calls_and_keeps_ids_when_normalized() {
    let body = json!({
        "model": "m",
        "input": [
            {"role": "developer", "content": "Use tools."},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "a"}, {"type": "input_text", "text": "b"}]},
            {"role": "assistant", "content": "Checking."},
            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
            {"type": "function_call", "call_id": "c2", "name": "g", "arguments": "{\"x\":1}"},
            {"type": "function_call_output", "call_id": "c1", "output": [{"type": "input_text", "text": "one"}]},
            {"type": "function_call_output", "call_id": "c2", "output": "two"},
            {"role": "user", "content": "thanks", "id": "msg_mine"},
        ]
    });
    let req = parse(body.to_string().as_bytes()).expect("parse");
    let chat = to_chat(&req, &[]).expect("chat");
    let roles: Vec<Role> = chat.messages.iter().map(|m| m.role).collect();
    assert_eq!(
        roles,
        [
            Role::Developer,
            Role::User,
            Role::Assistant,
            Role::Tool,
            Role::Tool,
            Role::User
        ]
    );
    let a = &chat.messages[2];
    assert_eq!(a.content, Some(Content::Text("Checking.".into())));
    let ids: Vec<&str> = a.tool_calls.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids, ["c1", "c2"]);
    assert_eq!(chat.messages[3].content, Some(Content::Text("one".into())));
    assert_eq!(chat.messages[4].tool_call_id.as_deref(), Some("c2"));

    let items = normalize_input(&req);
    assert_eq!(items.len(), 8);
    assert_eq!(items[7]["id"], "msg_mine", "a client's id is kept");
    assert!(items[3]["id"].as_str().expect("id").starts_with("fc_"));
    assert!(items[5]["id"].as_str().expect("id").starts_with("fco_"));
    assert_eq!(items[2]["content"][0]["type"], "output_text");
    assert_eq!(items[0]["content"][0]["type"], "input_text");
    assert!(items.iter().all(|i| i["type"].is_string()));
}

#[test]
fn history_comes_before_input_and_old_instructions_are_not_inherited() {
    let prev = parse(br#"{"model":"m","input":"first","instructions":"OLD"}"#).expect("parse");
    let mut history = normalize_input(&prev);
    history.push(json!({"id": "msg_a", "type": "message", "role": "assistant", "status": "completed", "content": [{"type": "output_text", "text": "answer one", "annotations": []}]}));
    let req = parse(br#"{"model":"m","input":"second","instructions":"NEW"}"#).expect("parse");
    let chat = to_chat(&req, &history).expect("chat");
    let texts: Vec<String> = chat.messages.iter().map(Message::text_content).collect();
    assert_eq!(texts, ["NEW", "first", "answer one", "second"]);
}

#[test]
fn reasoning_without_its_turn_does_not_move_to_a_later_one() {
    let body = json!({"model": "m", "input": [
        {"role": "user", "content": "q1"},
        {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "orphan"}], "encrypted_content": "E1"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "a2"},
        {"role": "user", "content": "q3"},
    ]});
    let chat = to_chat(&parse(body.to_string().as_bytes()).expect("parse"), &[]).expect("chat");
    assert_eq!(chat.messages.len(), 4);
    assert!(chat.messages[2].reasoning_content.is_none());
    assert!(chat.messages[2].reasoning_blocks.is_empty());
}

#[test]
fn refusals_name_the_parameter() {
    for (tool, name) in [
        (json!({"type": "web_search"}), "web_search"),
        (json!({"type": "web_search_preview"}), "web_search_preview"),
        (
            json!({"type": "file_search", "vector_store_ids": ["vs_1"]}),
            "file_search",
        ),
        (
            json!({"type": "code_interpreter", "container": {"type": "auto"}}),
            "code_interpreter",
        ),
        (
            json!({"type": "computer_use_preview"}),
            "computer_use_preview",
        ),
        (json!({"type": "image_generation"}), "image_generation"),
        (
            json!({"type": "mcp", "server_label": "x", "server_url": "https://x"}),
            "mcp",
        ),
    ] {
        let (code, param, msg) = err_of(json!({
            "model": "m", "input": "hi",
            "tools": [{"type": "function", "name": "ok"}, tool]
        }));
        assert_eq!(code, "unsupported_tool");
        assert_eq!(param.as_deref(), Some("tools[1].type"));
        assert!(msg.contains(name), "{msg}");
    }
    let (code, param, _) =
        err_of(json!({"model": "m", "input": "hi", "tool_choice": {"type": "file_search"}}));
    assert_eq!(
        (code.as_str(), param.as_deref()),
        ("unsupported_tool", Some("tool_choice.type"))
    );

    let (code, param, _) = err_of(json!({"input": "hi"}));
    assert_eq!(
        (code.as_str(), param.as_deref()),
        ("missing_field", Some("model"))
    );

    let (code, param, _) = err_of(
        json!({"model": "m", "input": [{"role": "user", "content": [{"type": "input_image", "file_id": "file-abc"}]}]}),
    );
    assert_eq!(code, "invalid_value");
    assert_eq!(param.as_deref(), Some("input[0].content[0].file_id"));

    let (_, param, _) = err_of(
        json!({"model": "m", "input": "x", "previous_response_id": "resp_1", "conversation": "conv_1"}),
    );
    assert_eq!(param.as_deref(), Some("conversation"));

    let (code, param, _) = err_of(
        json!({"model": "m", "input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}),
    );
    assert_eq!(
        (code.as_str(), param.as_deref()),
        ("missing_field", Some("input[0].call_id"))
    );

    let (_, param, _) = err_of(json!({"model": "m", "input": 7}));
    assert_eq!(param.as_deref(), Some("input"));

    let (_, param, _) = err_of(
        json!({"model": "m", "input": "x", "text": {"format": {"type": "json_schema", "schema": {}}}}),
    );
    assert_eq!(param.as_deref(), Some("text.format.name"));

    let (_, param, _) = err_of(json!({"model": "m", "input": "x", "max_output_tokens": -1}));
    assert_eq!(param.as_deref(), Some("max_output_tokens"));

    let (_, param, _) =
        err_of(json!({"model": "m", "input": [{"type": "item_reference", "id": "msg_1"}]}));
    assert_eq!(param.as_deref(), Some("input[0]"));

    let (code, _, _) = err_of(json!({"model": "m"}));
    assert_eq!(code, "missing_field", "no input at all");

    let e = parse(b"{not json").expect_err("json");
    assert_eq!(e.parts().2, Some("invalid_json"));
}

#[test]
fn conversation_both_forms_and_defaults() {
    let a = parse(br#"{"model":"m","input":"x","conversation":"conv_1"}"#).expect("a");
    let b = parse(br#"{"model":"m","input":"x","conversation":{"id":"conv_1"},"store":false}"#)
        .expect("b");
    assert_eq!(a.conversation.as_deref(), Some("conv_1"));
    assert_eq!(b.conversation.as_deref(), Some("conv_1"));
    assert!(a.store, "store defaults to true");
    assert!(!b.store);
    let c = parse(
        br#"{"model":"m","input":"x","stream":null,"store":null,"background":false,"x_custom":1}"#,
    )
    .expect("c");
    assert!(!c.stream && c.store);
    assert_eq!(c.extra.get("x_custom"), Some(&json!(1)));
}

#[test]
fn tool_choice_and_formats_map_to_chat() {
    let chat = |extra: Value| {
        let mut body =
            json!({"model": "m", "input": "x", "tools": [{"type": "function", "name": "f"}]});
        for (k, v) in extra.as_object().expect("object") {
            body[k] = v.clone();
        }
        to_chat(&parse(body.to_string().as_bytes()).expect("parse"), &[]).expect("chat")
    };
    assert_eq!(
        chat(json!({"tool_choice": {"type": "function", "name": "f"}})).tool_choice,
        Some(json!({"type": "function", "function": {"name": "f"}}))
    );
    assert_eq!(
        chat(json!({"tool_choice": "required"})).tool_choice,
        Some(json!("required"))
    );
    assert_eq!(
        chat(json!({"tool_choice": {"type": "allowed_tools", "mode": "required", "tools": [{"type": "function", "name": "f"}]}})).tool_choice,
        Some(json!({"type": "allowed_tools", "allowed_tools": {"mode": "required", "tools": [{"type": "function", "function": {"name": "f"}}]}}))
    );
    assert_eq!(
        chat(json!({"text": {"format": {"type": "json_object"}}})).response_format,
        Some(json!({"type": "json_object"}))
    );
    assert_eq!(
        chat(json!({"text": {"format": {"type": "text"}}})).response_format,
        None
    );
}

// ---------------------------------------------------------------------------------------------
// Chat answer → response, and back
// ---------------------------------------------------------------------------------------------

fn ctx_for(body: Value) -> ResponseCtx {
    let req = parse(body.to_string().as_bytes()).expect("parse");
    ResponseCtx::new(&req, 1_756_314_698)
}

fn chat_answer(message: Message, finish: &str, usage: Option<Usage>) -> ChatResponse {
    ChatResponse {
        id: "chatcmpl-1".into(),
        object: "chat.completion".into(),
        created: 1,
        model: "upstream-model".into(),
        choices: vec![Choice {
            index: 0,
            message,
            finish_reason: Some(finish.into()),
            logprobs: None,
        }],
        usage: usage.map(WireUsage::from),
        ..ChatResponse::default()
    }
}

#[test]
fn chat_answer_becomes_a_complete_response_object() {
    let ctx = ctx_for(json!({
        "model": "client-model", "input": "hi", "instructions": "Be nice.",
        "metadata": {"k": "v"}, "max_output_tokens": 50, "temperature": 0.5,
        "tools": [{"type": "function", "name": "lookup", "parameters": {"type": "object"}}],
        "previous_response_id": "resp_prev"
    }));
    let msg = Message {
        role: Role::Assistant,
        content: Some(Content::Text("Hello there".into())),
        reasoning_content: Some("thinking about it".into()),
        tool_calls: vec![ToolCall {
            id: "call_1".into(),
            kind: "function".into(),
            function: FunctionCall {
                name: "lookup".into(),
                arguments: r#"{"q":"x"}"#.into(),
            },
        }],
        ..Message::default()
    };
    let usage = Usage {
        prompt: 20,
        completion: 10,
        cached: 5,
        cache_write: 0,
        reasoning: 4,
    };
    let r = from_chat(&chat_answer(msg, "tool_calls", Some(usage)), &ctx);
    assert_eq!(r["object"], "response");
    assert!(r["id"].as_str().expect("id").starts_with("resp_"));
    assert_eq!(r["id"], ctx.id.as_str());
    assert_eq!(r["created_at"], 1_756_314_698);
    assert_eq!(r["status"], "completed");
    assert_eq!(r["model"], "client-model");
    assert_eq!(r["instructions"], "Be nice.");
    assert_eq!(r["metadata"], json!({"k": "v"}));
    assert_eq!(r["max_output_tokens"], 50);
    assert_eq!(r["temperature"], 0.5);
    assert_eq!(r["previous_response_id"], "resp_prev");
    assert_eq!(r["tools"][0]["name"], "lookup");
    assert_eq!(r["tool_choice"], "auto");
    assert_eq!(r["parallel_tool_calls"], true);
    assert_eq!(r["text"], json!({"format": {"type": "text"}}));
    assert_eq!(r["error"], Value::Null);
    assert_eq!(r["incomplete_details"], Value::Null);
    assert_eq!(r["store"], true);
    assert!(
        r.get("output_text").is_none(),
        "an SDK convenience, not a field"
    );
    let types: Vec<&str> = r["output"]
        .as_array()
        .expect("output")
        .iter()
        .map(|i| i["type"].as_str().expect("type"))
        .collect();
    assert_eq!(types, ["reasoning", "message", "function_call"]);
    let rs = &r["output"][0];
    assert!(rs["id"].as_str().expect("id").starts_with("rs_"));
    assert_eq!(rs["summary"][0]["type"], "summary_text");
    assert_eq!(rs["summary"][0]["text"], "thinking about it");
    assert!(rs.get("encrypted_content").is_none());
    let m = &r["output"][1];
    assert!(m["id"].as_str().expect("id").starts_with("msg_"));
    assert_eq!(m["role"], "assistant");
    assert_eq!(m["status"], "completed");
    assert_eq!(
        m["content"][0],
        json!({"type": "output_text", "text": "Hello there", "annotations": [], "logprobs": []})
    );
    let fc = &r["output"][2];
    assert!(fc["id"].as_str().expect("id").starts_with("fc_"));
    assert_eq!(fc["call_id"], "call_1");
    assert_eq!(fc["name"], "lookup");
    assert_eq!(fc["arguments"], r#"{"q":"x"}"#);
    assert_eq!(fc["status"], "completed");
    assert_eq!(
        r["usage"],
        json!({
            "input_tokens": 20,
            "input_tokens_details": {"cached_tokens": 5, "cache_write_tokens": 0},
            "output_tokens": 10,
            "output_tokens_details": {"reasoning_tokens": 4},
            "total_tokens": 30
        })
    );
}

#[test]
fn length_and_refusal_answers() {
    let ctx = ctx_for(json!({"model": "m", "input": "hi"}));
    let r = from_chat(
        &chat_answer(Message::text(Role::Assistant, "cut sho"), "length", None),
        &ctx,
    );
    assert_eq!(r["status"], "incomplete");
    assert_eq!(
        r["incomplete_details"],
        json!({"reason": "max_output_tokens"})
    );
    assert_eq!(r["output"][0]["status"], "incomplete");
    assert_eq!(r["completed_at"], Value::Null);
    assert_eq!(r["usage"], Value::Null);

    let refusal = Message {
        role: Role::Assistant,
        refusal: Some("I can't help with that.".into()),
        ..Message::default()
    };
    let r = from_chat(&chat_answer(refusal, "stop", None), &ctx);
    assert_eq!(
        r["output"][0]["content"],
        json!([{"type": "refusal", "refusal": "I can't help with that."}])
    );
}

#[test]
fn tool_round_trip_keeps_call_ids() {
    let ctx = ctx_for(json!({"model": "m", "input": "weather?"}));
    let calls: Vec<ToolCall> = (0..3)
        .map(|i| ToolCall {
            id: format!("call_{i}"),
            kind: "function".into(),
            function: FunctionCall {
                name: format!("tool_{i}"),
                arguments: format!(r#"{{"n":{i}}}"#),
            },
        })
        .collect();
    let msg = Message {
        role: Role::Assistant,
        tool_calls: calls.clone(),
        ..Message::default()
    };
    let r = from_chat(&chat_answer(msg, "tool_calls", None), &ctx);
    let items = output_items(&r);
    assert_eq!(items.len(), 3, "function calls only, no empty message");
    // Next turn: the outputs of the calls.
    let mut input: Vec<Value> = (0..3)
        .map(|i| json!({"type": "function_call_output", "call_id": format!("call_{i}"), "output": format!("result {i}")}))
        .collect();
    input.reverse();
    let next = parse(json!({"model": "m", "input": input}).to_string().as_bytes()).expect("parse");
    let mut history = normalize_input(&parse(br#"{"model":"m","input":"weather?"}"#).expect("p"));
    history.extend(items);
    let chat = to_chat(&next, &history).expect("chat");
    let a = &chat.messages[1];
    assert_eq!(a.role, Role::Assistant);
    assert_eq!(a.tool_calls, calls);
    let results: Vec<&str> = chat.messages[2..]
        .iter()
        .map(|m| m.tool_call_id.as_deref().expect("tool"))
        .collect();
    assert_eq!(results, ["call_2", "call_1", "call_0"]);
}

#[test]
fn encrypted_reasoning_survives_to_the_next_request() {
    let ctx = ctx_for(json!({"model": "m", "input": "q"}));
    let msg = Message {
        role: Role::Assistant,
        content: Some(Content::Text("A".into())),
        reasoning_content: Some("summary".into()),
        reasoning_blocks: vec![ReasoningBlock {
            kind: "encrypted".into(),
            data: Some("gAAAA-opaque".into()),
            id: Some("rs_upstream".into()),
            ..ReasoningBlock::default()
        }],
        ..Message::default()
    };
    let r = from_chat(&chat_answer(msg, "stop", None), &ctx);
    assert_eq!(r["output"][0]["id"], "rs_upstream");
    assert_eq!(r["output"][0]["encrypted_content"], "gAAAA-opaque");
    let next = parse(br#"{"model":"m","input":"q2"}"#).expect("parse");
    let chat = to_chat(&next, &output_items(&r)).expect("chat");
    let a = &chat.messages[0];
    assert_eq!(a.role, Role::Assistant);
    assert_eq!(a.reasoning_content.as_deref(), Some("summary"));
    assert_eq!(
        a.reasoning_blocks,
        [ReasoningBlock {
            kind: "encrypted".into(),
            data: Some("gAAAA-opaque".into()),
            id: Some("rs_upstream".into()),
            ..ReasoningBlock::default()
        }]
    );
}

#[test]
fn other_reasoning_blocks_travel_in_the_envelope_and_never_reach_openai() {
    let ctx = ctx_for(json!({"model": "m", "input": "q"}));
    let blocks = vec![
        ReasoningBlock {
            kind: "thinking".into(),
            text: Some("let me think".into()),
            signature: Some("sig==".into()),
            ..ReasoningBlock::default()
        },
        ReasoningBlock {
            kind: "redacted_thinking".into(),
            data: Some("opaque".into()),
            ..ReasoningBlock::default()
        },
    ];
    let msg = Message {
        role: Role::Assistant,
        content: Some(Content::Text("A".into())),
        reasoning_content: Some("let me think".into()),
        reasoning_blocks: blocks.clone(),
        ..Message::default()
    };
    let r = from_chat(&chat_answer(msg, "stop", None), &ctx);
    let enc = r["output"][0]["encrypted_content"].as_str().expect("enc");
    assert!(enc.starts_with(ENVELOPE_PREFIX));
    let items = output_items(&r);
    let next = parse(br#"{"model":"m","input":"q2"}"#).expect("parse");
    let chat = to_chat(&next, &items).expect("chat");
    assert_eq!(chat.messages[0].reasoning_blocks, blocks);

    // A Responses upstream gets no envelope (it could not decrypt it), and no ids of ours.
    let body: Value =
        serde_json::from_slice(&upstream_body(&next, &items, "gpt-up")).expect("json");
    let input = body["input"].as_array().expect("input");
    assert!(input.iter().all(|i| i["type"] != "reasoning"));
    assert!(input.iter().all(|i| i.get("id").is_none()));
    assert_eq!(input.last().expect("last")["content"], "q2");
}

#[test]
fn upstream_body_is_stateless_and_complete() {
    let req = parse(
        json!({
            "model": "client-model", "input": [{"role": "user", "content": "now"}],
            "previous_response_id": "resp_prev", "store": true,
            "include": ["message.output_text.logprobs"], "stream": true,
            "tools": [{"type": "web_search"}], "service_tier": "flex",
            "instructions": "I"
        })
        .to_string()
        .as_bytes(),
    )
    .expect("parse");
    let resp: Value = serde_json::from_str(&fixture("response.json")).expect("fixture");
    let history = output_items(&resp);
    let body: Value =
        serde_json::from_slice(&upstream_body(&req, &history, "gpt-up")).expect("json");
    assert_eq!(body["model"], "gpt-up");
    assert_eq!(body["store"], false);
    assert!(body.get("previous_response_id").is_none());
    assert!(body.get("conversation").is_none());
    assert_eq!(
        body["include"],
        json!([
            "message.output_text.logprobs",
            "reasoning.encrypted_content"
        ])
    );
    assert_eq!(body["stream"], true);
    assert_eq!(body["service_tier"], "flex");
    assert_eq!(body["instructions"], "I");
    assert_eq!(
        body["tools"][0]["type"], "web_search",
        "built-in tools pass through"
    );
    let input = body["input"].as_array().expect("input");
    assert_eq!(input.len(), 4);
    assert_eq!(input[0]["type"], "reasoning");
    assert_eq!(
        input[0]["id"], resp["output"][0]["id"],
        "reasoning keeps its id"
    );
    assert_eq!(
        input[0]["encrypted_content"],
        resp["output"][0]["encrypted_content"]
    );
    assert_eq!(input[2]["call_id"], "call_Xu1mtqFhlQzGpNS8dDCJ0JQu");
    assert_eq!(input[3], json!({"role": "user", "content": "now"}));

    // No history: the input goes as the client sent it.
    let req = parse(br#"{"model":"m","input":"plain"}"#).expect("parse");
    let body: Value = serde_json::from_slice(&upstream_body(&req, &[], "up")).expect("json");
    assert_eq!(body["input"], "plain");
    assert_eq!(body["include"], json!(["reasoning.encrypted_content"]));
}

#[test]
fn usage_from_published_response_and_stream() {
    let u = usage_of_response(fixture("response.json").as_bytes()).expect("usage");
    assert_eq!(
        u,
        Usage {
            prompt: 81,
            completion: 214,
            cached: 64,
            cache_write: 0,
            reasoning: 192
        }
    );
    let sse = fixture("stream.sse");
    let found: Vec<Usage> = sse_events(&sse)
        .iter()
        .filter_map(|(_, data)| usage_of_event(data.to_string().as_bytes()))
        .collect();
    assert_eq!(found.len(), 1, "only the terminal event carries usage");
    assert_eq!(
        (found[0].prompt, found[0].completion, found[0].reasoning),
        (37, 75, 64)
    );

    // Hostile counts.
    let u = usage_of_response(
        br#"{"usage":{"input_tokens":-5,"output_tokens":99999999999999999999,"input_tokens_details":{"cached_tokens":7},"output_tokens_details":{"reasoning_tokens":-1}}}"#,
    )
    .expect("usage");
    assert_eq!(u.prompt, 0);
    assert_eq!(u.cached, 0, "cached never above prompt");
    assert_eq!(u.completion, i64::MAX);
    assert_eq!(u.reasoning, 0);
    assert!(usage_of_response(br#"{"usage":[]}"#).is_none());
    assert!(usage_of_response(br#"{"usage":null}"#).is_none());
    assert!(
        usage_of_event(br#"{"type":"response.output_text.delta","delta":"response.completed"}"#)
            .is_none()
    );
    let failed = json!({"type": "response.failed", "sequence_number": 3, "response": {"usage": {"input_tokens": 3, "output_tokens": 1}}});
    assert_eq!(
        usage_of_event(failed.to_string().as_bytes()).map(|u| u.prompt),
        Some(3)
    );
}

// ---------------------------------------------------------------------------------------------
// Streams
// ---------------------------------------------------------------------------------------------

/// `event:`/`data:` blocks: (event name, parsed data).
fn sse_events(text: &str) -> Vec<(String, Value)> {
    text.split("\n\n")
        .filter(|b| !b.trim().is_empty())
        .map(|block| {
            let mut name = String::new();
            let mut data = String::new();
            for line in block.lines() {
                if let Some(n) = line.strip_prefix("event: ") {
                    name = n.to_owned();
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data.push_str(d);
                }
            }
            let v: Value = serde_json::from_str(&data).unwrap_or_else(|e| panic!("{e}: {data}"));
            (name, v)
        })
        .collect()
}

/// What a well-formed stream added up to.
#[derive(Debug, Default)]
struct Summary {
    text: String,
    refusal: String,
    reasoning: String,
    /// call_id → (name, arguments), in output order.
    calls: Vec<(String, String, String)>,
    terminal: String,
    final_response: Value,
}

/// Checks every rule a Responses stream keeps (the SDKs' accumulators rely on them) and
/// returns what it carried.
fn check_stream(text: &str) -> Summary {
    #[derive(Debug)]
    struct Open {
        id: String,
        kind: String,
        done: bool,
        parts: Vec<(String, String, bool)>, // (type, text, done)
        summary: String,
        summary_open: bool,
        arguments: String,
        done_item: Value,
    }
    let events = sse_events(text);
    assert!(events.len() >= 3, "too short: {events:?}");
    let mut items: Vec<Open> = Vec::new();
    let mut s = Summary::default();
    let mut response_id = None;
    for (i, (name, e)) in events.iter().enumerate() {
        let ty = e["type"].as_str().unwrap_or_else(|| panic!("no type: {e}"));
        assert_eq!(name, ty, "event line and type differ");
        assert_eq!(e["sequence_number"], i as u64, "sequence at {i}: {e}");
        match (i, ty) {
            (0, t) => assert_eq!(t, "response.created"),
            (1, t) => assert_eq!(t, "response.in_progress"),
            _ => assert!(s.terminal.is_empty(), "event after the terminal one: {ty}"),
        }
        if let Some(r) = e.get("response") {
            let id = r["id"].as_str().expect("response id").to_owned();
            assert_eq!(
                response_id.get_or_insert(id.clone()),
                &id,
                "response id changed"
            );
            assert_eq!(r["object"], "response");
        }
        let idx = e
            .get("output_index")
            .and_then(Value::as_u64)
            .map(|n| n as usize);
        let open = |items: &mut Vec<Open>| -> usize {
            let idx = idx.expect("output_index");
            let it = items
                .get(idx)
                .unwrap_or_else(|| panic!("{ty} for an item never added"));
            assert!(!it.done, "{ty} after its item was done");
            if let Some(item_id) = e.get("item_id") {
                assert_eq!(item_id, it.id.as_str(), "item_id mismatch");
            }
            idx
        };
        match ty {
            "response.created" | "response.in_progress" => {
                assert_eq!(e["response"]["status"], "in_progress");
            }
            "response.output_item.added" => {
                assert_eq!(idx, Some(items.len()), "output_index not the next");
                let item = &e["item"];
                let id = item["id"].as_str().expect("item id").to_owned();
                assert!(items.iter().all(|o| o.id != id), "duplicate item id");
                if item["type"] == "function_call" {
                    assert_eq!(item["arguments"], "");
                }
                items.push(Open {
                    id,
                    kind: item["type"].as_str().expect("type").to_owned(),
                    done: false,
                    parts: Vec::new(),
                    summary: String::new(),
                    summary_open: false,
                    arguments: String::new(),
                    done_item: Value::Null,
                });
            }
            "response.content_part.added" => {
                let k = open(&mut items);
                assert_eq!(items[k].kind, "message");
                assert_eq!(e["content_index"], items[k].parts.len() as u64);
                let pt = e["part"]["type"].as_str().expect("part type").to_owned();
                items[k].parts.push((pt, String::new(), false));
            }
            "response.output_text.delta" | "response.refusal.delta" => {
                let k = open(&mut items);
                let j = e["content_index"].as_u64().expect("content_index") as usize;
                let part = items[k].parts.get_mut(j).expect("part added");
                assert!(!part.2, "delta after part done");
                let want = if ty == "response.output_text.delta" {
                    "output_text"
                } else {
                    "refusal"
                };
                assert_eq!(part.0, want);
                if ty == "response.output_text.delta" {
                    assert!(e["logprobs"].is_array());
                }
                part.1.push_str(e["delta"].as_str().expect("delta"));
            }
            "response.output_text.done" | "response.refusal.done" => {
                let k = open(&mut items);
                let j = e["content_index"].as_u64().expect("content_index") as usize;
                let part = &items[k].parts[j];
                let field = if ty == "response.output_text.done" {
                    "text"
                } else {
                    "refusal"
                };
                assert_eq!(e[field], part.1.as_str(), "done text is the deltas");
            }
            "response.content_part.done" => {
                let k = open(&mut items);
                let j = e["content_index"].as_u64().expect("content_index") as usize;
                let part = &mut items[k].parts[j];
                assert!(!part.2);
                part.2 = true;
                let field = if part.0 == "output_text" {
                    "text"
                } else {
                    "refusal"
                };
                assert_eq!(e["part"][field], part.1.as_str());
            }
            "response.reasoning_summary_part.added" => {
                let k = open(&mut items);
                assert_eq!(items[k].kind, "reasoning");
                assert!(!items[k].summary_open);
                items[k].summary_open = true;
            }
            "response.reasoning_summary_text.delta" => {
                let k = open(&mut items);
                assert!(items[k].summary_open);
                items[k]
                    .summary
                    .push_str(e["delta"].as_str().expect("delta"));
            }
            "response.reasoning_summary_text.done" | "response.reasoning_summary_part.done" => {
                let k = open(&mut items);
                let text = e.get("text").unwrap_or(&e["part"]["text"]);
                assert_eq!(text, items[k].summary.as_str());
            }
            "response.function_call_arguments.delta" => {
                let k = open(&mut items);
                assert_eq!(items[k].kind, "function_call");
                items[k]
                    .arguments
                    .push_str(e["delta"].as_str().expect("delta"));
            }
            "response.function_call_arguments.done" => {
                let k = open(&mut items);
                assert_eq!(e["arguments"], items[k].arguments.as_str());
            }
            "response.output_item.done" => {
                let k = open(&mut items);
                let item = &e["item"];
                assert_eq!(item["id"], items[k].id.as_str());
                assert_eq!(item["type"], items[k].kind.as_str());
                match items[k].kind.as_str() {
                    "message" => {
                        assert!(items[k].parts.iter().all(|p| p.2), "part left open");
                        let content = item["content"].as_array().expect("content");
                        assert_eq!(content.len(), items[k].parts.len());
                        for (c, p) in content.iter().zip(&items[k].parts) {
                            let field = if p.0 == "output_text" {
                                "text"
                            } else {
                                "refusal"
                            };
                            assert_eq!(c[field], p.1.as_str());
                        }
                    }
                    "function_call" => {
                        assert_eq!(item["arguments"], items[k].arguments.as_str());
                    }
                    "reasoning" => {
                        let summary: String = item["summary"]
                            .as_array()
                            .expect("summary")
                            .iter()
                            .map(|p| p["text"].as_str().unwrap_or_default())
                            .collect();
                        assert_eq!(summary, items[k].summary);
                    }
                    _ => {}
                }
                items[k].done = true;
                items[k].done_item = item.clone();
            }
            "response.completed" | "response.incomplete" | "response.failed" => {
                s.terminal = ty.to_owned();
                s.final_response = e["response"].clone();
                let status = &e["response"]["status"];
                assert_eq!(
                    status,
                    ty.trim_start_matches("response."),
                    "terminal status"
                );
            }
            other => panic!("unexpected event {other}"),
        }
    }
    assert!(!s.terminal.is_empty(), "no terminal event");
    let r = &s.final_response;
    if s.terminal != "response.failed" {
        assert!(items.iter().all(|i| i.done), "an item was never done");
        let out = r["output"].as_array().expect("output");
        assert_eq!(out.len(), items.len());
        for (o, it) in out.iter().zip(&items) {
            assert_eq!(o, &it.done_item, "final output differs from the done item");
        }
    } else {
        assert!(r["error"]["message"].is_string());
    }
    for it in &items {
        for (k, t, _) in &it.parts {
            if k == "output_text" {
                s.text.push_str(t);
            } else {
                s.refusal.push_str(t);
            }
        }
        s.reasoning.push_str(&it.summary);
        if it.kind == "function_call" {
            let call_id = r["output"]
                .as_array()
                .and_then(|o| o.iter().find(|o| o["id"] == it.id.as_str()))
                .map(|o| o["call_id"].as_str().unwrap_or_default().to_owned())
                .unwrap_or_default();
            let name = it.done_item["name"].as_str().unwrap_or_default().to_owned();
            s.calls.push((call_id, name, it.arguments.clone()));
        }
    }
    s
}

#[test]
fn checker_accepts_openais_own_stream() {
    let s = check_stream(&fixture("stream.sse"));
    assert_eq!(s.text, "Hi there! How can I help you today?");
    assert_eq!(s.reasoning, "**Greeting the user**\n\nA simple hello.");
    assert_eq!(s.terminal, "response.completed");
}

fn text_chunk(t: &str) -> ChatChunk {
    delta_chunk(Delta {
        content: Some(t.into()),
        ..Delta::default()
    })
}

fn delta_chunk(delta: Delta) -> ChatChunk {
    ChatChunk {
        id: "chatcmpl-1".into(),
        model: "up".into(),
        choices: vec![ChunkChoice {
            index: 0,
            delta,
            finish_reason: None,
            logprobs: None,
        }],
        ..ChatChunk::default()
    }
}

fn finish_chunk(reason: &str) -> ChatChunk {
    ChatChunk {
        choices: vec![ChunkChoice {
            finish_reason: Some(reason.into()),
            ..ChunkChoice::default()
        }],
        ..ChatChunk::default()
    }
}

fn tool_chunk(index: u32, id: Option<&str>, name: Option<&str>, args: &str) -> ChatChunk {
    delta_chunk(Delta {
        tool_calls: vec![ToolCallDelta {
            index,
            id: id.map(str::to_owned),
            kind: id.map(|_| "function".to_owned()),
            function: FunctionDelta {
                name: name.map(str::to_owned),
                arguments: Some(args.into()),
            },
        }],
        ..Delta::default()
    })
}

fn run(ctx: ResponseCtx, chunks: &[ChatChunk], usage: Option<Usage>) -> (String, ResponsesStream) {
    let mut enc = ResponsesStream::new(ctx);
    let mut out = BytesMut::new();
    enc.start(&mut out);
    for c in chunks {
        enc.chunk(c, &mut out);
    }
    enc.finish(usage, &mut out);
    (String::from_utf8(out.to_vec()).expect("utf8"), enc)
}

#[test]
fn stream_of_reasoning_text_and_calls() {
    let ctx = ctx_for(json!({"model": "client-model", "input": "hi", "stream": true}));
    let chunks = vec![
        delta_chunk(Delta {
            role: Some(Role::Assistant),
            ..Delta::default()
        }),
        delta_chunk(Delta {
            reasoning_content: Some("Think".into()),
            ..Delta::default()
        }),
        delta_chunk(Delta {
            reasoning_content: Some("ing.".into()),
            reasoning_blocks: vec![ReasoningBlock {
                kind: "encrypted".into(),
                data: Some("ENC".into()),
                ..ReasoningBlock::default()
            }],
            ..Delta::default()
        }),
        text_chunk("Hel"),
        text_chunk("lo"),
        tool_chunk(0, Some("call_a"), Some("f"), ""),
        tool_chunk(0, None, None, "{\"a\":"),
        tool_chunk(1, Some("call_b"), Some("g"), "{}"),
        tool_chunk(0, None, None, "1}"),
        finish_chunk("tool_calls"),
    ];
    let usage = Usage {
        prompt: 9,
        completion: 8,
        cached: 1,
        cache_write: 0,
        reasoning: 3,
    };
    let (sse, enc) = run(ctx.clone(), &chunks, Some(usage));
    let s = check_stream(&sse);
    assert_eq!(s.terminal, "response.completed");
    assert_eq!(s.text, "Hello");
    assert_eq!(s.reasoning, "Thinking.");
    assert_eq!(
        s.calls,
        [
            ("call_a".into(), "f".into(), "{\"a\":1}".into()),
            ("call_b".into(), "g".into(), "{}".into())
        ]
    );
    let r = &s.final_response;
    assert_eq!(r["id"], ctx.id.as_str());
    assert_eq!(r["model"], "client-model");
    assert_eq!(r["usage"]["input_tokens"], 9);
    assert_eq!(r["usage"]["output_tokens_details"]["reasoning_tokens"], 3);
    assert_eq!(r["output"][0]["encrypted_content"], "ENC");
    assert_eq!(
        enc.final_object().as_ref(),
        Some(r),
        "final_object is what completed carried"
    );
    // The event names OpenAI uses, in its order for a reasoning item.
    let names: Vec<String> = sse_events(&sse).into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names[..6],
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.reasoning_summary_part.added",
            "response.reasoning_summary_text.delta",
            "response.reasoning_summary_text.delta"
        ]
    );
}

#[test]
fn stream_cut_by_length_is_incomplete_and_failure_is_failed() {
    let ctx = ctx_for(json!({"model": "m", "input": "hi", "stream": true}));
    let (sse, _) = run(
        ctx.clone(),
        &[text_chunk("abc"), finish_chunk("length")],
        None,
    );
    let s = check_stream(&sse);
    assert_eq!(s.terminal, "response.incomplete");
    assert_eq!(
        s.final_response["incomplete_details"],
        json!({"reason": "max_output_tokens"})
    );

    let mut enc = ResponsesStream::new(ctx);
    let mut out = BytesMut::new();
    enc.start(&mut out);
    enc.chunk(&text_chunk("partial"), &mut out);
    enc.fail(
        &UpstreamError {
            status: 502,
            kind: "api_error".into(),
            message: "upstream went away".into(),
            code: None,
        },
        &mut out,
    );
    // Nothing after the end.
    enc.chunk(&text_chunk("late"), &mut out);
    enc.finish(None, &mut out);
    let s = check_stream(std::str::from_utf8(&out).expect("utf8"));
    assert_eq!(s.terminal, "response.failed");
    assert_eq!(
        s.final_response["error"],
        json!({"code": "server_error", "message": "upstream went away"})
    );
    assert_eq!(
        s.final_response["output"][0]["content"][0]["text"],
        "partial"
    );
}

#[test]
fn empty_stream_still_completes_and_usage_chunk_counts() {
    let ctx = ctx_for(json!({"model": "m", "input": "hi"}));
    let usage_chunk = ChatChunk {
        usage: Some(WireUsage::from(Usage {
            prompt: 4,
            completion: 0,
            ..Usage::default()
        })),
        ..ChatChunk::default()
    };
    let (sse, _) = run(ctx, &[usage_chunk], None);
    let s = check_stream(&sse);
    assert_eq!(s.final_response["output"], json!([]));
    assert_eq!(s.final_response["usage"]["input_tokens"], 4);
}

#[test]
fn generic_protocol_decodes_and_renders_errors_in_openai_shape() {
    use tollgate::protocols::{ClientProtocol, EncodeCtx};
    let p = responses::Responses;
    let chat = p
        .decode_request(br#"{"model":"m","input":"hi","max_output_tokens":5}"#)
        .expect("decode");
    assert_eq!(chat.max_completion_tokens, Some(5));
    let err = UpstreamError {
        status: 400,
        kind: "invalid_request_error".into(),
        message: "bad".into(),
        code: Some("context_length_exceeded".into()),
    };
    let body: Value = serde_json::from_slice(&p.error_body(400, &err)).expect("json");
    assert_eq!(body["error"]["message"], "bad");
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert_eq!(body["error"]["code"], "context_length_exceeded");
    let ctx = EncodeCtx {
        client_model: "m".into(),
        created: 5,
        id: Some("resp_given".into()),
        ..EncodeCtx::default()
    };
    let r: Value = serde_json::from_slice(&p.encode_response(
        &chat_answer(Message::text(Role::Assistant, "x"), "stop", None),
        &ctx,
    ))
    .expect("json");
    assert_eq!(r["id"], "resp_given");
    assert_eq!(r["output"][0]["content"][0]["text"], "x");
}

// ---------------------------------------------------------------------------------------------
// Property: any chunk sequence gives a well-formed stream
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Op {
    Text(String),
    Refusal(String),
    Reasoning(String),
    Block,
    Tool {
        index: u32,
        first: bool,
        args: String,
    },
    Usage(i64, i64),
    Finish(&'static str),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => "[a-z é\n\"{}]{1,6}".prop_map(Op::Text),
        1 => "[a-z ]{1,4}".prop_map(Op::Refusal),
        2 => "[a-z ]{1,5}".prop_map(Op::Reasoning),
        1 => Just(Op::Block),
        3 => (0u32..3, any::<bool>(), "[a-z{}:\"0-9]{0,5}")
            .prop_map(|(index, first, args)| Op::Tool { index, first, args }),
        1 => (-5i64..50, -5i64..50).prop_map(|(p, c)| Op::Usage(p, c)),
        1 => prop_oneof![Just("stop"), Just("length"), Just("tool_calls"), Just("content_filter")]
            .prop_map(Op::Finish),
    ]
}

fn op_chunk(op: &Op) -> ChatChunk {
    match op {
        Op::Text(t) => text_chunk(t),
        Op::Refusal(r) => delta_chunk(Delta {
            refusal: Some(r.clone()),
            ..Delta::default()
        }),
        Op::Reasoning(r) => delta_chunk(Delta {
            reasoning_content: Some(r.clone()),
            ..Delta::default()
        }),
        Op::Block => delta_chunk(Delta {
            reasoning_blocks: vec![ReasoningBlock {
                kind: "thinking".into(),
                signature: Some("sig".into()),
                ..ReasoningBlock::default()
            }],
            ..Delta::default()
        }),
        Op::Tool { index, first, args } => {
            let id = format!("call_{index}");
            let name = format!("fn_{index}");
            if *first {
                tool_chunk(*index, Some(&id), Some(&name), args)
            } else {
                tool_chunk(*index, None, None, args)
            }
        }
        Op::Usage(p, c) => ChatChunk {
            usage: Some(WireUsage {
                prompt_tokens: *p,
                completion_tokens: *c,
                total_tokens: p + c,
                ..WireUsage::default()
            }),
            ..ChatChunk::default()
        },
        Op::Finish(r) => finish_chunk(r),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn any_chunk_sequence_is_a_well_formed_stream(ops in prop::collection::vec(op(), 0..40), fail in any::<bool>()) {
        let ctx = ResponseCtx::new(&parse(br#"{"model":"m","input":"x","stream":true}"#).expect("parse"), 1);
        let mut enc = ResponsesStream::new(ctx);
        let mut out = BytesMut::new();
        enc.start(&mut out);
        for op in &ops {
            enc.chunk(&op_chunk(op), &mut out);
        }
        if fail {
            enc.fail(&UpstreamError { status: 429, kind: "rate_limit_error".into(), message: "slow down".into(), code: None }, &mut out);
        } else {
            enc.finish(None, &mut out);
        }
        let s = check_stream(std::str::from_utf8(&out).expect("utf8"));

        let want_text: String = ops.iter().filter_map(|o| match o { Op::Text(t) => Some(t.as_str()), _ => None }).collect();
        let want_refusal: String = ops.iter().filter_map(|o| match o { Op::Refusal(t) => Some(t.as_str()), _ => None }).collect();
        let want_reasoning: String = ops.iter().filter_map(|o| match o { Op::Reasoning(t) => Some(t.as_str()), _ => None }).collect();
        prop_assert_eq!(&s.text, &want_text);
        prop_assert_eq!(&s.refusal, &want_refusal);
        prop_assert_eq!(&s.reasoning, &want_reasoning);
        // Each chat tool index is one function call item with all its arguments.
        let mut want_args: HashMap<u32, String> = HashMap::new();
        for o in &ops {
            if let Op::Tool { index, args, .. } = o {
                want_args.entry(*index).or_default().push_str(args);
            }
        }
        prop_assert_eq!(s.calls.len(), want_args.len());
        for (_, _, args) in &s.calls {
            prop_assert!(want_args.values().any(|a| a == args));
        }
        let output_text: String = s.final_response["output"].as_array().expect("output").iter()
            .filter(|i| i["type"] == "message")
            .flat_map(|i| i["content"].as_array().cloned().unwrap_or_default())
            .filter(|c| c["type"] == "output_text")
            .map(|c| c["text"].as_str().unwrap_or_default().to_owned())
            .collect();
        prop_assert_eq!(output_text, want_text);
        if fail {
            prop_assert_eq!(&s.final_response["error"]["code"], "rate_limit_exceeded");
        } else {
            let last_usage = ops.iter().rev().find_map(|o| match o { Op::Usage(p, c) => Some((*p, *c)), _ => None });
            match last_usage {
                Some((p, c)) => {
                    let u = &s.final_response["usage"];
                    prop_assert_eq!(u["input_tokens"].as_i64(), Some(p.max(0)));
                    prop_assert_eq!(u["output_tokens"].as_i64(), Some(c.max(0)));
                    prop_assert_eq!(u["total_tokens"].as_i64(), Some(p.max(0) + c.max(0)));
                }
                None => prop_assert!(s.final_response["usage"].is_null()),
            }
        }
    }

    #[test]
    fn string_and_item_inputs_always_translate(texts in prop::collection::vec("[a-zA-Z0-9 ]{0,12}", 1..6)) {
        let items: Vec<Value> = texts.iter().enumerate().map(|(i, t)| {
            if i % 2 == 0 { json!({"role": "user", "content": t}) }
            else { json!({"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": t}]}) }
        }).collect();
        let req = parse(json!({"model": "m", "input": items}).to_string().as_bytes()).expect("parse");
        let chat = to_chat(&req, &[]).expect("chat");
        let got: Vec<String> = chat.messages.iter().map(Message::text_content).collect();
        prop_assert_eq!(got, texts.clone());
        let normalized = normalize_input(&req);
        // Normalized items translate to the same messages.
        let again = to_chat(&parse(br#"{"model":"m","input":[]}"#).expect("p"), &normalized);
        // An empty new input after history is fine when history has a user message.
        let again = again.expect("history alone");
        let got2: Vec<String> = again.messages.iter().map(Message::text_content).collect();
        prop_assert_eq!(got2, texts);
    }
}

// ---------------------------------------------------------------------------------------------
// The official SDK
// ---------------------------------------------------------------------------------------------

#[test]
fn openai_python_sdk_parses_what_we_write() {
    let Ok(python) = std::env::var("TOLLGATE_TEST_PYTHON") else {
        eprintln!(
            "TOLLGATE_TEST_PYTHON is not set: skipping the OpenAI SDK parse of Responses objects"
        );
        return;
    };
    let request = json!({
        "model": "client-model", "input": "What's the weather?", "instructions": "Be brief.",
        "tools": [{"type": "function", "name": "get_weather", "description": "Weather.",
                   "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"], "additionalProperties": false},
                   "strict": true}],
        "metadata": {"k": "v"}, "reasoning": {"effort": "low", "summary": "auto"}
    });
    let req = parse(request.to_string().as_bytes()).expect("parse");
    let ctx = ResponseCtx::new(&req, 1_756_314_698);
    let msg = Message {
        role: Role::Assistant,
        content: Some(Content::Text("Let me check.".into())),
        reasoning_content: Some("Need the tool.".into()),
        reasoning_blocks: vec![ReasoningBlock {
            kind: "encrypted".into(),
            data: Some("gAAAA".into()),
            ..ReasoningBlock::default()
        }],
        tool_calls: vec![ToolCall {
            id: "call_1".into(),
            kind: "function".into(),
            function: FunctionCall {
                name: "get_weather".into(),
                arguments: r#"{"city":"Paris"}"#.into(),
            },
        }],
        ..Message::default()
    };
    let usage = Usage {
        prompt: 12,
        completion: 9,
        cached: 2,
        cache_write: 0,
        reasoning: 4,
    };
    let response = from_chat(&chat_answer(msg, "tool_calls", Some(usage)), &ctx);
    let chunks = vec![
        delta_chunk(Delta {
            reasoning_content: Some("Need the tool.".into()),
            ..Delta::default()
        }),
        text_chunk("Let me "),
        text_chunk("check."),
        delta_chunk(Delta {
            refusal: Some("(no)".into()),
            ..Delta::default()
        }),
        tool_chunk(0, Some("call_1"), Some("get_weather"), "{\"city\":"),
        tool_chunk(0, None, None, "\"Paris\"}"),
        finish_chunk("tool_calls"),
    ];
    let (sse, _) = run(ResponseCtx::new(&req, 1_756_314_698), &chunks, Some(usage));
    let (incomplete, _) = run(
        ResponseCtx::new(&req, 1),
        &[text_chunk("cut"), finish_chunk("length")],
        None,
    );
    let mut enc = ResponsesStream::new(ResponseCtx::new(&req, 1));
    let mut failed = BytesMut::new();
    enc.start(&mut failed);
    enc.chunk(&text_chunk("part"), &mut failed);
    enc.fail(
        &UpstreamError {
            status: 503,
            kind: "overloaded_error".into(),
            message: "Overloaded".into(),
            code: None,
        },
        &mut failed,
    );
    let failed = String::from_utf8(failed.to_vec()).expect("utf8");
    let case = json!({"response": response, "sse": sse, "request": request, "other_sse": [incomplete, failed]});
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("case.json");
    std::fs::write(&path, case.to_string()).expect("write");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/responses_parse.py");
    let out = std::process::Command::new(&python)
        .arg(script)
        .arg(&path)
        .output()
        .unwrap_or_else(|e| panic!("running {python}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "SDK parse failed\nstdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert_eq!(r["strict_output_text"], "Let me check.");
    assert_eq!(r["non_stream"]["status"], "completed");
    assert_eq!(r["non_stream"]["output_text"], "Let me check.");
    assert_eq!(
        r["non_stream"]["types"],
        json!(["reasoning", "message", "function_call"])
    );
    assert_eq!(r["non_stream"]["usage"]["input_tokens"], 12);
    assert_eq!(
        r["non_stream"]["usage"]["input_tokens_details"]["cached_tokens"],
        2
    );
    assert_eq!(r["raw_stream"]["delta_text"], "Let me check.");
    let n = r["raw_stream"]["sequence"].as_array().expect("seq").len();
    assert_eq!(
        r["raw_stream"]["sequence"],
        json!((0..n).collect::<Vec<_>>())
    );
    assert_eq!(r["helper_stream"]["status"], "completed");
    assert_eq!(r["helper_stream"]["output_text"], "Let me check.");
    assert_eq!(r["helper_stream"]["call_ids"], json!(["call_1"]));
    assert_eq!(r["helper_stream"]["usage"]["output_tokens"], 9);
    assert_eq!(
        r["other_terminals"],
        json!(["response.incomplete", "response.failed"])
    );
    assert_eq!(r["failed_error"]["code"], "server_error");
    assert_eq!(r["failed_error"]["message"], "Overloaded");
}
