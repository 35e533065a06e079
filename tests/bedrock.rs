//! The Bedrock translator: SigV4 against AWS's published test suite, the URL and its canonical
//! form, pivot → Converse, Converse answers and ConverseStream event-stream frames (built here
//! with real CRCs from the published event shapes) → pivot, errors, embeddings.

use http::HeaderMap;
use proptest::prelude::*;
use serde_json::{Value, json};
use tollgate::pivot::{
    ChatChunk, ChatRequest, Content, FunctionCall, FunctionDef, Message, Part, ReasoningBlock,
    Role, Tool, ToolCall,
};
use tollgate::providers::bedrock::{Bedrock, default_base_url, sigv4};
use tollgate::providers::{Operation, StreamFault, Target, Translator, Usage, translator};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/bedrock");

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!("{FIXTURES}/{name}")).expect("fixture")
}

fn target(model: &str) -> Target<'_> {
    Target {
        base_url: "https://bedrock-runtime.us-east-1.amazonaws.com",
        upstream_model: model,
        api_version: None,
        region: Some("us-east-1"),
        default_max_tokens: 4096,
    }
}

const CLAUDE: &str = "anthropic.claude-3-5-sonnet-20240620-v1:0";

// ---------------------------------------------------------------- SigV4 (AWS test suite)

const SUITE_KEY: sigv4::Credentials<'static> = sigv4::Credentials {
    access_key_id: "AKIDEXAMPLE",
    secret_access_key: "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
    session_token: None,
};

const SUITE_SCOPE: sigv4::Scope<'static> = sigv4::Scope {
    region: "us-east-1",
    service: "service",
    amz_date: "20150830T123600Z",
};

fn suite_request<'a>(
    method: &'a str,
    path: &'a str,
    query: &'a str,
    headers: &'a [(&'a str, &'a str)],
    payload: &'a [u8],
) -> sigv4::Request<'a> {
    sigv4::Request {
        method,
        host: "example.amazonaws.com",
        path,
        query,
        headers,
        payload,
    }
}

#[test]
fn sigv4_get_vanilla() {
    let s = sigv4::sign(
        &suite_request("GET", "/", "", &[], b""),
        &SUITE_KEY,
        &SUITE_SCOPE,
    );
    assert_eq!(
        s.canonical_request,
        "GET\n/\n\nhost:example.amazonaws.com\nx-amz-date:20150830T123600Z\n\nhost;x-amz-date\ne3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
    assert_eq!(
        s.string_to_sign,
        "AWS4-HMAC-SHA256\n20150830T123600Z\n20150830/us-east-1/service/aws4_request\nbb579772317eb040ac9ed261061d46c1f17a8133879d6129b6e1c25292927e63"
    );
    assert_eq!(
        s.authorization,
        "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, SignedHeaders=host;x-amz-date, Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"
    );
}

#[test]
fn sigv4_get_vanilla_query_and_utf8_path() {
    let s = sigv4::sign(
        &suite_request("GET", "/", "Param1=value1", &[], b""),
        &SUITE_KEY,
        &SUITE_SCOPE,
    );
    assert!(
        s.authorization.ends_with(
            "Signature=a67d582fa61cc504c4bae71f336f98b97f1ea3c7a6bfe1b6e45aec72011b9aeb"
        )
    );
    // get-utf8: the raw path `/ሴ` is encoded once.
    let s = sigv4::sign(
        &suite_request("GET", "/\u{1234}", "", &[], b""),
        &SUITE_KEY,
        &SUITE_SCOPE,
    );
    assert!(s.canonical_request.starts_with("GET\n/%E1%88%B4\n"));
    assert!(
        s.authorization.ends_with(
            "Signature=8318018e0b0f223aa2bbf98705b62bb787dc9c0e678f255a891fd03141be5d85"
        )
    );
}

#[test]
fn sigv4_post_x_www_form_urlencoded() {
    let s = sigv4::sign(
        &suite_request(
            "POST",
            "/",
            "",
            &[("Content-Type", "application/x-www-form-urlencoded")],
            b"Param1=value1",
        ),
        &SUITE_KEY,
        &SUITE_SCOPE,
    );
    assert!(
        s.canonical_request
            .ends_with("\n9095672bbd1f56dfc5b65f3e153adc8731a4a654192329106275f4c7b24d0b6e")
    );
    assert_eq!(
        s.authorization,
        "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, SignedHeaders=content-type;host;x-amz-date, Signature=ff11897932ad3f4e8b18135d722051e5ac45fc38421b1da7b9d196a0fe09473a"
    );
}

#[test]
fn sigv4_post_sts_header_before_signs_the_session_token() {
    let creds = sigv4::Credentials {
        session_token: Some(
            "AQoDYXdzEPT//////////wEXAMPLEtc764bNrC9SAPBSM22wDOk4x4HIZ8j4FZTwdQWLWsKWHGBuFqwAeMicRXmxfpSPfIeoIYRqTflfKD8YUuwthAx7mSEI/qkPpKPi/kMcGdQrmGdeehM4IC1NtBmUpp2wUE8phUZampKsburEDy0KPkyQDYwT7WZ0wq5VSXDvp75YU9HFvlRd8Tx6q6fE8YQcHNVXAkiY9q6d+xo0rKwT38xVqr7ZD0u0iPPkUL64lIZbqBAz+scqKmlzm8FDrypNC9Yjc8fPOLn9FX9KSYvKTr4rvx3iSIlTJabIQwj2ICCR/oLxBA==",
        ),
        ..SUITE_KEY
    };
    let s = sigv4::sign(
        &suite_request("POST", "/", "", &[], b""),
        &creds,
        &SUITE_SCOPE,
    );
    assert_eq!(
        s.authorization,
        "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, SignedHeaders=host;x-amz-date;x-amz-security-token, Signature=85d96828115b5dc0cfc3bd16ad9e210dd772bbebba041836c64533a82be05ead"
    );
    // The secret never appears in what is sent or logged.
    assert!(!format!("{s:?}{creds:?}").contains("wJalrXUtnFEMI"));
}

// ---------------------------------------------------------------- URL and signing a real request

#[test]
fn model_id_is_one_segment_and_double_encoded_for_signing() {
    let t = target(CLAUDE);
    let url = Bedrock.url(&t, Operation::Chat, false).expect("url");
    assert_eq!(
        url,
        "https://bedrock-runtime.us-east-1.amazonaws.com/model/anthropic.claude-3-5-sonnet-20240620-v1%3A0/converse"
    );
    assert!(
        Bedrock
            .url(&t, Operation::Chat, true)
            .expect("url")
            .ends_with("v1%3A0/converse-stream")
    );
    // The canonical URI encodes the wire path once more: `%3A` → `%253A`.
    assert_eq!(
        sigv4::canonical_uri("/model/anthropic.claude-3-5-sonnet-20240620-v1%3A0/converse"),
        "/model/anthropic.claude-3-5-sonnet-20240620-v1%253A0/converse"
    );
    // An inference profile ARN: `/` and `:` stay inside the segment.
    let arn = "arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.anthropic.claude-3-7-sonnet-20250219-v1:0";
    let url = Bedrock
        .url(&target(arn), Operation::Chat, false)
        .expect("url");
    assert_eq!(
        url,
        "https://bedrock-runtime.us-east-1.amazonaws.com/model/arn%3Aaws%3Abedrock%3Aus-east-1%3A123456789012%3Ainference-profile%2Fus.anthropic.claude-3-7-sonnet-20250219-v1%3A0/converse"
    );
    // Embeddings go through InvokeModel.
    let url = Bedrock
        .url(
            &target("amazon.titan-embed-text-v2:0"),
            Operation::Embeddings,
            false,
        )
        .expect("url");
    assert!(url.ends_with("/model/amazon.titan-embed-text-v2%3A0/invoke"));
    // An empty base URL falls back to the region's endpoint.
    let t = Target {
        base_url: "",
        ..target(CLAUDE)
    };
    assert!(
        Bedrock
            .url(&t, Operation::Chat, false)
            .expect("url")
            .starts_with(&default_base_url("us-east-1"))
    );
    assert_eq!(
        default_base_url("eu-west-3"),
        "https://bedrock-runtime.eu-west-3.amazonaws.com"
    );
    assert!(translator("bedrock").is_some());
}

/// The `Authorization` header Bedrock receives is the one computed over the exact URL path
/// (double-encoded), host, date and body.
#[test]
fn headers_sign_the_exact_request() {
    let t = target(CLAUDE);
    let url = Bedrock.url(&t, Operation::Chat, false).expect("url");
    let body = br#"{"messages":[]}"#;
    let key = r#"{"access_key_id":"AKIDEXAMPLE","secret_access_key":"wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY","session_token":"TOKEN123"}"#;
    let mut h = HeaderMap::new();
    Bedrock
        .headers(&mut h, key, &t, &url, body)
        .expect("signed");
    let date = h["x-amz-date"].to_str().expect("date").to_owned();
    assert_eq!(date.len(), 16);
    assert!(h["authorization"].is_sensitive());
    assert!(h["x-amz-security-token"].is_sensitive());
    assert_eq!(h["x-amz-security-token"], "TOKEN123");
    let expected = sigv4::sign(
        &sigv4::Request {
            method: "POST",
            host: "bedrock-runtime.us-east-1.amazonaws.com",
            path: "/model/anthropic.claude-3-5-sonnet-20240620-v1%3A0/converse",
            query: "",
            headers: &[],
            payload: body,
        },
        &sigv4::Credentials {
            access_key_id: "AKIDEXAMPLE",
            secret_access_key: "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
            session_token: Some("TOKEN123"),
        },
        &sigv4::Scope {
            region: "us-east-1",
            service: "bedrock",
            amz_date: &date,
        },
    );
    assert_eq!(h["authorization"], expected.authorization.as_str());
    assert!(expected.canonical_request.contains("v1%253A0/converse\n"));
    assert!(expected.authorization.contains(
        "/us-east-1/bedrock/aws4_request, SignedHeaders=host;x-amz-date;x-amz-security-token,"
    ));
    // A different body is a different signature.
    let mut h2 = HeaderMap::new();
    Bedrock
        .headers(&mut h2, key, &t, &url, b"{}")
        .expect("signed");
    if h2["x-amz-date"] == h["x-amz-date"] {
        assert_ne!(h2["authorization"], h["authorization"]);
    }
}

#[test]
fn a_key_that_is_not_the_json_shape_is_refused_without_echoing_it() {
    let t = target(CLAUDE);
    for key in [
        "AKIASECRETSECRET",
        r#"{"access_key_id":"AKIASECRETSECRET"}"#,
        r#"{"access_key_id":"","secret_access_key":"hunter2hunter2"}"#,
        r#"["hunter2hunter2"]"#,
    ] {
        let mut h = HeaderMap::new();
        let err = Bedrock
            .headers(
                &mut h,
                key,
                &t,
                "https://bedrock-runtime.us-east-1.amazonaws.com/model/x/converse",
                b"",
            )
            .expect_err("refused");
        let (status, _, code) = err.parts();
        assert_eq!(status.as_u16(), 400);
        assert_eq!(code, Some("invalid_provider_key"));
        let msg = err.public_message();
        assert!(msg.contains("access_key_id") && msg.contains("secret_access_key"));
        assert!(
            !msg.contains("SECRETSECRET") && !msg.contains("hunter2"),
            "{msg}"
        );
        assert!(h.is_empty());
    }
    // No region anywhere: refused, naming the setting.
    let t = Target {
        base_url: "http://127.0.0.1:9/bedrock",
        region: None,
        ..target(CLAUDE)
    };
    let key = r#"{"access_key_id":"A","secret_access_key":"B"}"#;
    let err = Bedrock
        .headers(
            &mut HeaderMap::new(),
            key,
            &t,
            "http://127.0.0.1:9/bedrock/model/x/converse",
            b"",
        )
        .expect_err("no region");
    assert!(err.public_message().contains("region"));
    // The region is read from a Bedrock runtime URL when the provider has none.
    let t = Target {
        region: None,
        base_url: "https://bedrock-runtime.ap-northeast-1.amazonaws.com",
        ..target(CLAUDE)
    };
    let mut h = HeaderMap::new();
    Bedrock
        .headers(
            &mut h,
            key,
            &t,
            "https://bedrock-runtime.ap-northeast-1.amazonaws.com/model/x/converse",
            b"",
        )
        .expect("signed");
    assert!(
        h["authorization"]
            .to_str()
            .expect("ascii")
            .contains("/ap-northeast-1/bedrock/aws4_request")
    );
}

// ---------------------------------------------------------------- pivot → Converse

fn encode(req: &ChatRequest, model: &str) -> Value {
    serde_json::from_slice(&Bedrock.encode_chat(req, &target(model)).expect("encoded"))
        .expect("json")
}

fn call(id: &str, name: &str, args: &str) -> ToolCall {
    ToolCall {
        id: id.into(),
        kind: "function".into(),
        function: FunctionCall {
            name: name.into(),
            arguments: args.into(),
        },
    }
}

fn tool_msg(id: &str, content: &str) -> Message {
    Message {
        tool_call_id: Some(id.into()),
        ..Message::text(Role::Tool, content)
    }
}

fn weather_tool() -> Tool {
    Tool {
        kind: "function".into(),
        function: Some(FunctionDef {
            name: "get_weather".into(),
            description: Some("Weather of a city".into()),
            parameters: Some(json!({"type": "object", "properties": {"city": {"type": "string"}}})),
            strict: None,
        }),
        ..Tool::default()
    }
}

#[test]
fn a_conversation_becomes_converse() {
    let png = "data:image/png;base64,iVBORw0KGgo=";
    let req = ChatRequest {
        model: "m".into(),
        messages: vec![
            Message::text(Role::System, "Be brief."),
            Message {
                role: Role::Developer,
                content: Some(Content::Parts(vec![Part {
                    cache_control: Some(json!({"type": "ephemeral"})),
                    ..Part::text("Long cached rules.")
                }])),
                ..Message::default()
            },
            Message::text(Role::User, "Hello"),
            Message {
                role: Role::User,
                content: Some(Content::Parts(vec![
                    Part::text("What is this?"),
                    Part::image(png),
                ])),
                ..Message::default()
            },
            Message {
                role: Role::Assistant,
                content: Some(Content::Text("Checking.".into())),
                reasoning_blocks: vec![
                    ReasoningBlock {
                        kind: "thinking".into(),
                        text: Some("hmm".into()),
                        signature: Some("sig1".into()),
                        ..ReasoningBlock::default()
                    },
                    ReasoningBlock {
                        kind: "redacted_thinking".into(),
                        data: Some("b3BhcXVl".into()),
                        ..ReasoningBlock::default()
                    },
                ],
                tool_calls: vec![
                    call("t1", "get_weather", r#"{"city":"Paris"}"#),
                    call("t2", "get_weather", ""),
                ],
                ..Message::default()
            },
            tool_msg("t1", "sunny"),
            tool_msg("t2", r#"{"temp": 21}"#),
            Message::text(Role::User, "Thanks"),
        ],
        temperature: Some(0.5),
        top_p: Some(0.9),
        stop: vec!["END".into()],
        max_tokens: Some(300),
        tools: vec![weather_tool()],
        tool_choice: Some(json!({"type": "function", "function": {"name": "get_weather"}})),
        ..ChatRequest::default()
    };
    let v = encode(&req, CLAUDE);
    assert_eq!(
        v["system"],
        json!([{"text": "Be brief."}, {"text": "Long cached rules."}, {"cachePoint": {"type": "default"}}])
    );
    assert_eq!(
        v["inferenceConfig"],
        json!({"maxTokens": 300, "temperature": 0.5, "topP": 0.9, "stopSequences": ["END"]})
    );
    let msgs = v["messages"].as_array().expect("messages");
    assert_eq!(msgs.len(), 3, "{msgs:#?}");
    assert_eq!(msgs[0]["role"], "user");
    assert_eq!(
        msgs[0]["content"],
        json!([
            {"text": "Hello"},
            {"text": "What is this?"},
            {"image": {"format": "png", "source": {"bytes": "iVBORw0KGgo="}}},
        ])
    );
    assert_eq!(msgs[1]["role"], "assistant");
    assert_eq!(
        msgs[1]["content"],
        json!([
            {"reasoningContent": {"reasoningText": {"text": "hmm", "signature": "sig1"}}},
            {"reasoningContent": {"redactedContent": "b3BhcXVl"}},
            {"text": "Checking."},
            {"toolUse": {"toolUseId": "t1", "name": "get_weather", "input": {"city": "Paris"}}},
            {"toolUse": {"toolUseId": "t2", "name": "get_weather", "input": {}}},
        ])
    );
    assert_eq!(msgs[2]["role"], "user");
    assert_eq!(
        msgs[2]["content"],
        json!([
            {"toolResult": {"toolUseId": "t1", "content": [{"text": "sunny"}]}},
            {"toolResult": {"toolUseId": "t2", "content": [{"json": {"temp": 21}}]}},
            {"text": "Thanks"},
        ])
    );
    assert_eq!(
        v["toolConfig"],
        json!({
            "tools": [{"toolSpec": {
                "name": "get_weather",
                "description": "Weather of a city",
                "inputSchema": {"json": {"type": "object", "properties": {"city": {"type": "string"}}}},
            }}],
            "toolChoice": {"tool": {"name": "get_weather"}},
        })
    );
    assert!(v.get("additionalModelRequestFields").is_none());
    // Cache points only for the families that have them.
    let v = encode(&req, "meta.llama3-70b-instruct-v1:0");
    assert_eq!(
        v["system"],
        json!([{"text": "Be brief."}, {"text": "Long cached rules."}])
    );
}

#[test]
fn tool_choice_and_reasoning_and_response_format() {
    let base = ChatRequest {
        messages: vec![Message::text(Role::User, "hi")],
        tools: vec![weather_tool()],
        ..ChatRequest::default()
    };
    let with = |choice: Value| ChatRequest {
        tool_choice: Some(choice),
        ..base.clone()
    };
    assert_eq!(
        encode(&with(json!("auto")), CLAUDE)["toolConfig"]["toolChoice"],
        json!({"auto": {}})
    );
    assert_eq!(
        encode(&with(json!("required")), CLAUDE)["toolConfig"]["toolChoice"],
        json!({"any": {}})
    );
    // `none` with no tool history: no tools at all.
    assert!(
        encode(&with(json!("none")), CLAUDE)
            .get("toolConfig")
            .is_none()
    );
    // `none` after tool use: Converse needs the tools, sent without a choice.
    let mut after = with(json!("none"));
    after.messages.push(Message {
        role: Role::Assistant,
        tool_calls: vec![call("t1", "get_weather", "{}")],
        ..Message::default()
    });
    after.messages.push(tool_msg("t1", "ok"));
    let v = encode(&after, CLAUDE);
    assert!(v["toolConfig"]["tools"].is_array() && v["toolConfig"].get("toolChoice").is_none());
    // No default max: the model's own is sent.
    assert_eq!(encode(&base, CLAUDE)["inferenceConfig"]["maxTokens"], 4096);

    let effort = ChatRequest {
        reasoning_effort: Some("medium".into()),
        max_completion_tokens: Some(8000),
        ..base.clone()
    };
    assert_eq!(
        encode(&effort, CLAUDE)["additionalModelRequestFields"],
        json!({"thinking": {"type": "enabled", "budget_tokens": 2048}})
    );
    assert!(
        encode(&effort, "amazon.nova-pro-v1:0")
            .get("additionalModelRequestFields")
            .is_none()
    );
    let thinking = ChatRequest {
        thinking: Some(json!({"type": "enabled", "budget_tokens": 5000})),
        ..base.clone()
    };
    assert_eq!(
        encode(&thinking, "us.anthropic.claude-sonnet-4-20250514-v1:0")["additionalModelRequestFields"]
            ["thinking"]["budget_tokens"],
        5000
    );

    let schema = json!({"type": "object", "properties": {"a": {"type": "string"}}});
    let rf = ChatRequest {
        response_format: Some(
            json!({"type": "json_schema", "json_schema": {"name": "out", "schema": schema}}),
        ),
        ..base.clone()
    };
    let v = encode(&rf, CLAUDE);
    assert_eq!(v["outputConfig"]["textFormat"]["type"], "json_schema");
    let def = &v["outputConfig"]["textFormat"]["structure"]["jsonSchema"];
    assert_eq!(def["name"], "out");
    let back: Value =
        serde_json::from_str(def["schema"].as_str().expect("a string")).expect("json");
    assert_eq!(back, schema);
}

#[test]
fn what_converse_cannot_take_is_a_400_that_names_it() {
    let t = target(CLAUDE);
    let user = |parts: Vec<Part>| ChatRequest {
        messages: vec![Message {
            role: Role::User,
            content: Some(Content::Parts(parts)),
            ..Message::default()
        }],
        ..ChatRequest::default()
    };
    let err = Bedrock
        .encode_chat(&user(vec![Part::image("https://example.com/cat.png")]), &t)
        .expect_err("url image");
    assert_eq!(err.parts().0.as_u16(), 400);
    assert!(err.public_message().contains("https://example.com/cat.png"));
    // An S3 image is taken by reference.
    let v: Value = serde_json::from_slice(
        &Bedrock
            .encode_chat(&user(vec![Part::image("s3://bucket/cat.jpg")]), &t)
            .expect("s3"),
    )
    .expect("json");
    assert_eq!(
        v["messages"][0]["content"][0]["image"],
        json!({"format": "jpeg", "source": {"s3Location": {"uri": "s3://bucket/cat.jpg"}}})
    );
    let err = Bedrock
        .encode_chat(&user(vec![Part::image("data:image/tiff;base64,AAAA")]), &t)
        .expect_err("tiff");
    assert!(err.public_message().contains("image/tiff"));

    let n = ChatRequest {
        n: Some(2),
        messages: vec![Message::text(Role::User, "hi")],
        ..ChatRequest::default()
    };
    let err = Bedrock.encode_chat(&n, &t).expect_err("n");
    assert_eq!(err.body().error.param.as_deref(), Some("n"));
    assert_eq!(err.parts().2, Some("invalid_value"));

    let builtin = ChatRequest {
        messages: vec![Message::text(Role::User, "hi")],
        tools: vec![Tool {
            kind: "web_search".into(),
            ..Tool::default()
        }],
        ..ChatRequest::default()
    };
    let err = Bedrock.encode_chat(&builtin, &t).expect_err("tool");
    assert_eq!(err.parts().2, Some("unsupported_tool"));
    assert!(err.public_message().contains("web_search"));

    let bad_args = ChatRequest {
        messages: vec![
            Message::text(Role::User, "hi"),
            Message {
                role: Role::Assistant,
                tool_calls: vec![call("t9", "f", "[1,2]")],
                ..Message::default()
            },
        ],
        ..ChatRequest::default()
    };
    let err = Bedrock.encode_chat(&bad_args, &t).expect_err("args");
    assert!(err.public_message().contains("t9"));

    let json_mode = ChatRequest {
        messages: vec![Message::text(Role::User, "hi")],
        response_format: Some(json!({"type": "json_object"})),
        ..ChatRequest::default()
    };
    let err = Bedrock
        .encode_chat(&json_mode, &t)
        .expect_err("json_object");
    assert!(err.public_message().contains("json_object"));
}

// ---------------------------------------------------------------- Converse → pivot

#[test]
fn a_converse_answer_decodes_with_reasoning_tools_and_cache_usage() {
    let r = Bedrock
        .decode_chat(&fixture("converse_answer.json"), &target(CLAUDE))
        .expect("decoded");
    assert!(r.id.starts_with("chatcmpl-") && r.id.len() > 12);
    assert_eq!(r.object, "chat.completion");
    let c = &r.choices[0];
    assert_eq!(c.finish_reason.as_deref(), Some("tool_calls"));
    assert_eq!(c.message.role, Role::Assistant);
    assert_eq!(
        c.message.text_content(),
        "Let me check the weather in Paris."
    );
    assert_eq!(c.message.tool_calls.len(), 1);
    let tc = &c.message.tool_calls[0];
    assert_eq!(tc.id, "tooluse_kZJMlvQmRJ6eAyJE5GIl7Q");
    assert_eq!(tc.function.name, "top_song");
    let args: Value = serde_json::from_str(&tc.function.arguments).expect("json args");
    assert_eq!(args, json!({"sign": "WZPZ"}));
    assert_eq!(
        c.message.reasoning_content.as_deref(),
        Some("The user wants the weather in Paris; I should call the tool.")
    );
    assert_eq!(
        c.message.reasoning_blocks[0].signature.as_deref(),
        Some("EqoBCkgIARABGAIiQL2Zs7eJ9Y0Zq3w2Yb8n")
    );
    // inputTokens excludes the cache: 12 + 1800 read + 200 written.
    let u = Usage::from(r.usage.expect("usage"));
    assert_eq!(
        u,
        Usage {
            prompt: 2012,
            completion: 65,
            cached: 1800,
            cache_write: 200,
            reasoning: 0
        }
    );
}

#[test]
fn stop_reasons_and_hostile_usage() {
    for (stop, want) in [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("max_tokens", "length"),
        ("tool_use", "tool_calls"),
        ("guardrail_intervened", "content_filter"),
        ("content_filtered", "content_filter"),
    ] {
        let body = json!({
            "output": {"message": {"role": "assistant", "content": [{"text": "x"}]}},
            "stopReason": stop,
            "usage": {"inputTokens": -5, "outputTokens": 18446744073709551615u64, "cacheReadInputTokens": "x"},
        });
        let r = Bedrock
            .decode_chat(body.to_string().as_bytes(), &target(CLAUDE))
            .expect("decoded");
        assert_eq!(r.choices[0].finish_reason.as_deref(), Some(want), "{stop}");
        let u = r.usage.expect("usage");
        assert_eq!(u.prompt_tokens, 0);
        assert_eq!(u.completion_tokens, i64::MAX);
        assert_eq!(u.total_tokens, i64::MAX);
    }
    let err = Bedrock
        .decode_chat(b"{\"nothing\": 1}", &target(CLAUDE))
        .expect_err("not converse");
    assert_eq!(err.parts().0.as_u16(), 502);
}

// ---------------------------------------------------------------- ConverseStream frames

/// An event-stream message with string headers and real CRCs.
fn frame(headers: &[(&str, &str)], payload: &[u8]) -> Vec<u8> {
    let mut h = Vec::new();
    for (name, value) in headers {
        h.push(u8::try_from(name.len()).expect("short name"));
        h.extend_from_slice(name.as_bytes());
        h.push(7);
        h.extend_from_slice(
            &u16::try_from(value.len())
                .expect("short value")
                .to_be_bytes(),
        );
        h.extend_from_slice(value.as_bytes());
    }
    let total = 12 + h.len() + payload.len() + 4;
    let mut m = Vec::with_capacity(total);
    m.extend_from_slice(&u32::try_from(total).expect("size").to_be_bytes());
    m.extend_from_slice(&u32::try_from(h.len()).expect("size").to_be_bytes());
    let prelude_crc = crc32fast::hash(&m);
    m.extend_from_slice(&prelude_crc.to_be_bytes());
    m.extend_from_slice(&h);
    m.extend_from_slice(payload);
    let crc = crc32fast::hash(&m);
    m.extend_from_slice(&crc.to_be_bytes());
    m
}

fn event(name: &str, payload: &Value) -> Vec<u8> {
    frame(
        &[
            (":event-type", name),
            (":content-type", "application/json"),
            (":message-type", "event"),
        ],
        payload.to_string().as_bytes(),
    )
}

fn recorded_stream() -> Vec<u8> {
    let events: Vec<Value> =
        serde_json::from_slice(&fixture("converse_stream_events.json")).expect("events");
    events
        .iter()
        .flat_map(|e| event(e["event"].as_str().expect("name"), &e["payload"]))
        .collect()
}

const MAX: usize = 1 << 20;

/// Feeds `pieces` to a fresh decoder; the chunks (ids and times blanked) and the outcome.
fn run(pieces: &[&[u8]]) -> (Vec<ChatChunk>, Result<(), StreamFault>, Option<Usage>) {
    let mut d = Bedrock.chat_stream(&target(CLAUDE), MAX);
    let mut out = Vec::new();
    let mut res = Ok(());
    for p in pieces {
        res = d.push(p, &mut out);
        if res.is_err() {
            break;
        }
    }
    if res.is_ok() {
        res = d.finish(&mut out);
    }
    for c in &mut out {
        c.id.clear();
        c.created = 0;
    }
    (out, res, d.usage())
}

#[test]
fn a_converse_stream_decodes_to_chunks() {
    let bytes = recorded_stream();
    let (chunks, res, usage) = run(&[&bytes]);
    res.expect("complete stream");
    let deltas: Vec<_> = chunks.iter().filter_map(|c| c.choices.first()).collect();
    assert_eq!(deltas[0].delta.role, Some(Role::Assistant));
    let text: String = deltas
        .iter()
        .filter_map(|c| c.delta.content.as_deref())
        .collect();
    assert_eq!(text, "Let me check the weather.");
    let reasoning: String = deltas
        .iter()
        .filter_map(|c| c.delta.reasoning_content.as_deref())
        .collect();
    assert_eq!(reasoning, "Need the tool.");
    let sig = deltas
        .iter()
        .flat_map(|c| &c.delta.reasoning_blocks)
        .find_map(|b| b.signature.as_deref());
    assert_eq!(sig, Some("EqoBCkgIARABGAIiQL2Zs7eJ9Y0Zq3w2Yb8n"));
    // Content blocks 2 and 3 are tool calls 0 and 1.
    let calls: Vec<_> = deltas.iter().flat_map(|c| &c.delta.tool_calls).collect();
    let starts: Vec<_> = calls
        .iter()
        .filter(|c| c.id.is_some())
        .map(|c| (c.index, c.id.as_deref(), c.function.name.as_deref()))
        .collect();
    assert_eq!(
        starts,
        vec![
            (
                0,
                Some("tooluse_kZJMlvQmRJ6eAyJE5GIl7Q"),
                Some("get_weather")
            ),
            (1, Some("tooluse_2nd"), Some("get_time")),
        ]
    );
    let args = |i: u32| -> String {
        calls
            .iter()
            .filter(|c| c.index == i)
            .filter_map(|c| c.function.arguments.as_deref())
            .collect()
    };
    assert_eq!(args(0), r#"{"city": "Paris"}"#);
    assert_eq!(args(1), r#"{"tz": "CET"}"#);
    let finish: Vec<_> = deltas
        .iter()
        .filter_map(|c| c.finish_reason.as_deref())
        .collect();
    assert_eq!(finish, vec!["tool_calls"]);
    // The usage chunk comes last, with no choices.
    let last = chunks.last().expect("chunks");
    assert!(last.choices.is_empty());
    let want = Usage {
        prompt: 1040,
        completion: 91,
        cached: 1000,
        cache_write: 0,
        reasoning: 0,
    };
    assert_eq!(last.usage.map(Usage::from), Some(want));
    assert_eq!(usage, Some(want));
    // One id for the whole stream.
    let mut d = Bedrock.chat_stream(&target(CLAUDE), MAX);
    let mut out = Vec::new();
    d.push(&bytes, &mut out).expect("push");
    d.finish(&mut out).expect("finish");
    assert!(
        out.iter()
            .all(|c| c.id == out[0].id && c.id.starts_with("chatcmpl-"))
    );
}

#[test]
fn a_stream_split_at_every_byte_decodes_the_same() {
    let bytes = recorded_stream();
    let (whole, res, usage) = run(&[&bytes]);
    res.expect("whole");
    for cut in 0..=bytes.len() {
        let (a, b) = bytes.split_at(cut);
        let (split, res, u) = run(&[a, b]);
        assert!(res.is_ok(), "cut at {cut}: {res:?}");
        assert_eq!(split, whole, "cut at {cut}");
        assert_eq!(u, usage);
    }
    // One byte at a time.
    let singles: Vec<&[u8]> = bytes.chunks(1).collect();
    assert_eq!(run(&singles).0, whole);
}

proptest! {
    #[test]
    fn a_stream_split_anywhere_decodes_the_same(cuts in proptest::collection::vec(0usize..10_000, 0..12)) {
        let bytes = recorded_stream();
        let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (bytes.len() + 1)).collect();
        cuts.sort_unstable();
        let mut pieces = Vec::new();
        let mut at = 0;
        for c in cuts {
            pieces.push(&bytes[at..c]);
            at = c;
        }
        pieces.push(&bytes[at..]);
        let (whole, _, _) = run(&[&bytes]);
        let (split, res, _) = run(&pieces);
        prop_assert!(res.is_ok());
        prop_assert_eq!(split, whole);
    }

    #[test]
    fn corrupt_bytes_are_a_fault_never_a_panic(pos in 0usize..100_000, bit in 0u8..8) {
        let mut bytes = recorded_stream();
        let pos = pos % bytes.len();
        bytes[pos] ^= 1 << bit;
        let (_, res, _) = run(&[&bytes]);
        // Every byte of a frame is covered by a CRC: a flipped bit cannot pass.
        prop_assert!(matches!(res, Err(StreamFault::Malformed(_)) | Err(StreamFault::TooLarge)), "{:?}", res);
    }
}

#[test]
fn bad_frames_are_faults() {
    let good = event("messageStart", &json!({"role": "assistant"}));
    // Message CRC.
    let mut bad = good.clone();
    let n = bad.len();
    bad[n - 1] ^= 0xff;
    assert!(matches!(run(&[&bad]).1, Err(StreamFault::Malformed(_))));
    // Prelude CRC.
    let mut bad = good.clone();
    bad[9] ^= 0x01;
    assert!(matches!(run(&[&bad]).1, Err(StreamFault::Malformed(_))));
    // A declared length of 4 GiB with a valid prelude CRC: refused from the prelude alone.
    let mut huge = Vec::new();
    huge.extend_from_slice(&u32::MAX.to_be_bytes());
    huge.extend_from_slice(&0u32.to_be_bytes());
    let crc = crc32fast::hash(&huge);
    huge.extend_from_slice(&crc.to_be_bytes());
    assert_eq!(run(&[&huge]).1, Err(StreamFault::TooLarge));
    // Shorter than the smallest message, and headers longer than the message.
    for (total, headers) in [(8u32, 0u32), (20, 10)] {
        let mut m = Vec::new();
        m.extend_from_slice(&total.to_be_bytes());
        m.extend_from_slice(&headers.to_be_bytes());
        let crc = crc32fast::hash(&m);
        m.extend_from_slice(&crc.to_be_bytes());
        m.extend_from_slice(&[0; 8]);
        assert!(
            matches!(run(&[&m]).1, Err(StreamFault::Malformed(_))),
            "{total}/{headers}"
        );
    }
    // A frame larger than the limit the decoder was given.
    let big = event(
        "contentBlockDelta",
        &json!({"contentBlockIndex": 0, "delta": {"text": "x".repeat(2000)}}),
    );
    let mut d = Bedrock.chat_stream(&target(CLAUDE), 1024);
    assert_eq!(d.push(&big, &mut Vec::new()), Err(StreamFault::TooLarge));
    // A header running past its section.
    let mut h = frame(&[(":event-type", "messageStart")], b"{}");
    h[12] = 200; // the name's length
    let total = h.len();
    let crc = crc32fast::hash(&h[..total - 4]);
    h[total - 4..].copy_from_slice(&crc.to_be_bytes());
    assert!(matches!(run(&[&h]).1, Err(StreamFault::Malformed(_))));
}

#[test]
fn a_stream_that_stops_early_is_an_error() {
    let bytes = recorded_stream();
    // Cut inside a frame.
    let (_, res, _) = run(&[&bytes[..bytes.len() - 3]]);
    assert!(matches!(res, Err(StreamFault::Malformed(_))));
    // Whole frames, but no messageStop.
    let partial: Vec<u8> = [
        event("messageStart", &json!({"role": "assistant"})),
        event(
            "contentBlockDelta",
            &json!({"contentBlockIndex": 0, "delta": {"text": "Hi"}}),
        ),
        event(
            "metadata",
            &json!({"usage": {"inputTokens": 3, "outputTokens": 1}}),
        ),
    ]
    .concat();
    let (chunks, res, usage) = run(&[&partial]);
    assert!(matches!(res, Err(StreamFault::Malformed(m)) if m.contains("messageStop")));
    assert!(
        chunks
            .iter()
            .any(|c| c.choices.first().and_then(|c| c.delta.content.as_deref()) == Some("Hi"))
    );
    // What was reported is still there for metering.
    assert_eq!(usage.map(|u| u.prompt), Some(3));
}

#[test]
fn usage_is_taken_never_summed() {
    let bytes: Vec<u8> = [
        event("messageStart", &json!({"role": "assistant"})),
        event(
            "metadata",
            &json!({"usage": {"inputTokens": 10, "outputTokens": 5, "cacheWriteInputTokens": 7}}),
        ),
        event("messageStop", &json!({"stopReason": "end_turn"})),
        event(
            "metadata",
            &json!({"usage": {"inputTokens": 10, "outputTokens": 6, "cacheWriteInputTokens": 7}}),
        ),
    ]
    .concat();
    let (chunks, res, usage) = run(&[&bytes]);
    res.expect("complete");
    let want = Usage {
        prompt: 17,
        completion: 6,
        cached: 0,
        cache_write: 7,
        reasoning: 0,
    };
    assert_eq!(usage, Some(want));
    let usage_chunks: Vec<_> = chunks.iter().filter_map(|c| c.usage).collect();
    assert_eq!(usage_chunks.len(), 1);
    assert_eq!(Usage::from(usage_chunks[0]), want);
}

#[test]
fn exception_frames_are_upstream_faults_with_their_status() {
    for (kind, status, err_type) in [
        ("throttlingException", 429, "rate_limit_error"),
        ("modelStreamErrorException", 502, "api_error"),
        ("validationException", 400, "invalid_request_error"),
        ("serviceUnavailableException", 503, "overloaded_error"),
        ("internalServerException", 500, "api_error"),
    ] {
        let bytes: Vec<u8> = [
            event("messageStart", &json!({"role": "assistant"})),
            frame(
                &[
                    (":exception-type", kind),
                    (":content-type", "application/json"),
                    (":message-type", "exception"),
                ],
                br#"{"message":"Too many tokens, please wait before trying again."}"#,
            ),
        ]
        .concat();
        let (_, res, _) = run(&[&bytes]);
        let Err(StreamFault::Upstream(e)) = res else {
            panic!("{kind}: {res:?}")
        };
        assert_eq!((e.status, e.kind.as_str()), (status, err_type), "{kind}");
        assert_eq!(
            e.message,
            "Too many tokens, please wait before trying again."
        );
    }
}

// ---------------------------------------------------------------- errors

#[test]
fn errors_map_to_statuses_and_types() {
    let bodies: Value = serde_json::from_slice(&fixture("errors.json")).expect("errors");
    let body = |k: &str| bodies[k].to_string().into_bytes();
    let cases = [
        (400, "validation", 400, "invalid_request_error", None),
        (
            400,
            "too_long",
            400,
            "invalid_request_error",
            Some("context_length_exceeded"),
        ),
        (403, "access_denied", 403, "permission_error", None),
        (
            403,
            "bad_token",
            401,
            "authentication_error",
            Some("invalid_api_key"),
        ),
        (404, "validation", 404, "invalid_request_error", None),
        (429, "throttling", 429, "rate_limit_error", None),
        (424, "model_error", 502, "api_error", None),
        (503, "unavailable", 503, "overloaded_error", None),
    ];
    for (status, key, want_status, want_type, want_code) in cases {
        let e = Bedrock.decode_error(status, &body(key));
        assert_eq!(e.status, want_status, "{key}");
        assert_eq!(e.kind, want_type, "{key}");
        assert_eq!(e.code.as_deref(), want_code, "{key}");
        assert_eq!(e.message, bodies[key]["message"].as_str().expect("message"));
    }
    let e = Bedrock.decode_error(500, b"<html>oops</html>");
    assert_eq!((e.status, e.kind.as_str()), (500, "api_error"));
    assert!(e.message.contains("500"));
}

// ---------------------------------------------------------------- embeddings

#[test]
fn titan_embeddings() {
    let t = target("amazon.titan-embed-text-v2:0");
    let body = Bedrock
        .encode_embeddings(
            &json!({"model": "x", "input": "hello", "dimensions": 256}),
            &t,
        )
        .expect("served")
        .expect("encoded");
    let v: Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(v, json!({"inputText": "hello", "dimensions": 256}));
    let one: Value = serde_json::from_slice(
        &Bedrock
            .encode_embeddings(&json!({"input": ["only"]}), &t)
            .expect("served")
            .expect("encoded"),
    )
    .expect("json");
    assert_eq!(one, json!({"inputText": "only"}));
    let err = Bedrock
        .encode_embeddings(&json!({"input": ["a", "b"]}), &t)
        .expect("served")
        .expect_err("two inputs");
    assert!(err.public_message().contains("one input"));
    assert!(
        Bedrock
            .encode_embeddings(&json!({"input": [1, 2, 3]}), &t)
            .expect("served")
            .is_err()
    );

    let (out, usage) = Bedrock
        .decode_embeddings(&fixture("titan_embedding.json"), &t)
        .expect("decoded");
    assert_eq!(out["object"], "list");
    assert_eq!(out["data"][0]["object"], "embedding");
    assert_eq!(out["data"][0]["index"], 0);
    assert_eq!(
        out["data"][0]["embedding"].as_array().map(Vec::len),
        Some(4)
    );
    assert_eq!(out["usage"], json!({"prompt_tokens": 7, "total_tokens": 7}));
    assert_eq!(usage.map(|u| (u.prompt, u.completion)), Some((7, 0)));
}

#[test]
fn cohere_embeddings() {
    let t = target("cohere.embed-english-v3");
    let v: Value = serde_json::from_slice(
        &Bedrock
            .encode_embeddings(&json!({"input": ["hello world", "goodbye world"]}), &t)
            .expect("served")
            .expect("encoded"),
    )
    .expect("json");
    assert_eq!(
        v,
        json!({"texts": ["hello world", "goodbye world"], "input_type": "search_document"})
    );
    let (out, usage) = Bedrock
        .decode_embeddings(&fixture("cohere_embedding.json"), &t)
        .expect("decoded");
    let data = out["data"].as_array().expect("data");
    assert_eq!(data.len(), 2);
    assert_eq!(data[1]["index"], 1);
    assert_eq!(data[1]["embedding"][0], json!(-0.0119857));
    assert!(usage.is_none());
    assert!(out.get("usage").is_none());
    // Another family: refused, naming the ones served.
    let err = Bedrock
        .encode_embeddings(&json!({"input": "x"}), &target("foo.bar-v1"))
        .expect("answered")
        .expect_err("unknown");
    assert!(err.public_message().contains("cohere.embed"));
}

// ---------------------------------------------------------------- round trip

fn text_strategy() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9 .,!?'\"\\\\{}:é中]{1,40}"
}

proptest! {
    /// An assistant turn encoded for Converse, answered back as Converse content, decodes to the
    /// same text and tool calls (id, name, arguments).
    #[test]
    fn assistant_turn_round_trips(
        text in text_strategy(),
        calls in proptest::collection::vec(("[a-z0-9_]{1,12}", "[a-z_]{1,12}", text_strategy()), 0..4),
    ) {
        let tool_calls: Vec<ToolCall> = calls
            .iter()
            .map(|(id, name, arg)| call(id, name, &json!({"q": arg}).to_string()))
            .collect();
        let req = ChatRequest {
            messages: vec![
                Message::text(Role::System, "sys"),
                Message::text(Role::User, "hi"),
                Message { role: Role::Assistant, content: Some(Content::Text(text.clone())), tool_calls: tool_calls.clone(), ..Message::default() },
            ],
            stop: vec!["STOP".into()],
            ..ChatRequest::default()
        };
        let v = encode(&req, CLAUDE);
        prop_assert_eq!(&v["system"][0]["text"], "sys");
        prop_assert_eq!(&v["inferenceConfig"]["stopSequences"], &json!(["STOP"]));
        let assistant = &v["messages"][1];
        prop_assert_eq!(&assistant["role"], "assistant");
        let answer = json!({
            "output": {"message": assistant},
            "stopReason": if tool_calls.is_empty() { "end_turn" } else { "tool_use" },
            "usage": {"inputTokens": 1, "outputTokens": 2},
        });
        let r = Bedrock.decode_chat(answer.to_string().as_bytes(), &target(CLAUDE)).expect("decoded");
        let m = &r.choices[0].message;
        prop_assert_eq!(m.text_content(), text);
        prop_assert_eq!(m.tool_calls.len(), tool_calls.len());
        for (got, want) in m.tool_calls.iter().zip(&tool_calls) {
            prop_assert_eq!(&got.id, &want.id);
            prop_assert_eq!(&got.function.name, &want.function.name);
            let a: Value = serde_json::from_str(&got.function.arguments).expect("json");
            let b: Value = serde_json::from_str(&want.function.arguments).expect("json");
            prop_assert_eq!(a, b);
        }
        let want_finish = if tool_calls.is_empty() { "stop" } else { "tool_calls" };
        prop_assert_eq!(r.choices[0].finish_reason.as_deref(), Some(want_finish));
    }
}

// ---------------------------------------------------------------- event-stream: published vectors

/// Botocore's event-stream test vectors (aws-cli `tests/unit/botocore/test_eventstream.py`):
/// the decoder is checked against bytes it did not make.
#[test]
fn eventstream_decodes_botocore_vectors() {
    use tollgate::providers::bedrock::eventstream::{Decoder, HeaderValue};
    let decode = |h: &str| {
        let bytes = hex::decode(h).expect("hex");
        let mut input = bytes.as_slice();
        let m = Decoder::new(MAX)
            .next(&mut input)
            .expect("valid")
            .expect("whole");
        assert!(input.is_empty());
        m
    };
    let m = decode("000000100000000005c248eb7d98c8ff");
    assert!(m.headers.is_empty() && m.payload.is_empty());
    let m = decode("0000001d00000000fd528c5a7b27666f6f273a27626172277dc3653936");
    assert_eq!(m.payload, b"{'foo':'bar'}");
    let m = decode(
        "0000003d0000002007fd83960c636f6e74656e742d747970650700106170706c69636174696f6e2f6a736f6e7b27666f6f273a27626172277d8d9c08b1",
    );
    assert_eq!(m.header_str("content-type"), Some("application/json"));
    assert_eq!(m.payload, b"{'foo':'bar'}");
    let m = decode(
        "000000620000005203b5cb9c0130000131010132020201330300030134040000000401350500000000000000050136060005627974657301370700047574663801380800000000000000080139093031323334353637383961626364656663353671",
    );
    let want = vec![
        ("0".to_owned(), HeaderValue::Bool(true)),
        ("1".to_owned(), HeaderValue::Bool(false)),
        ("2".to_owned(), HeaderValue::Byte(2)),
        ("3".to_owned(), HeaderValue::Short(3)),
        ("4".to_owned(), HeaderValue::Int(4)),
        ("5".to_owned(), HeaderValue::Long(5)),
        ("6".to_owned(), HeaderValue::Bytes(b"bytes".to_vec())),
        ("7".to_owned(), HeaderValue::String("utf8".into())),
        ("8".to_owned(), HeaderValue::Timestamp(8)),
        ("9".to_owned(), HeaderValue::Uuid(*b"0123456789abcdef")),
    ];
    assert_eq!(m.headers, want);
    // An error message (`:message-type: error`) ends a ConverseStream with its code and message.
    let error = hex::decode(
        "0000005200000042bf23637e0d3a6d6573736167652d747970650700056572726f720b3a6572726f722d636f6465070004636f64650e3a6572726f722d6d6573736167650700076d6573736167656b6cea3d",
    )
    .expect("hex");
    let Err(StreamFault::Upstream(e)) = run(&[&error]).1 else {
        panic!("an error message is a fault")
    };
    assert_eq!((e.status, e.message.as_str()), (502, "code: message"));
    // Our test encoder agrees with the published bytes.
    assert_eq!(
        frame(&[("content-type", "application/json")], b"{'foo':'bar'}"),
        hex::decode("0000003d0000002007fd83960c636f6e74656e742d747970650700106170706c69636174696f6e2f6a736f6e7b27666f6f273a27626172277d8d9c08b1").expect("hex")
    );
}
