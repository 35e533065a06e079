//! Anthropic both ways, without a network: the provider (`providers::anthropic`) and the client
//! protocol (`protocols::anthropic`) checked against each other and against recorded-shape
//! fixtures (tests/fixtures/anthropic/): requests keep what they say through a round trip,
//! streams decode the same however the bytes are split, and usage is cumulative, never summed.

use bytes::BytesMut;
use proptest::prelude::*;
use serde_json::{Value, json};
use tollgate::pivot::{
    ChatChunk, ChatRequest, ChatResponse, Choice, ChunkChoice, Content, Delta, FunctionCall,
    FunctionDelta, Message, Part, ReasoningBlock, Role, ToolCall, ToolCallDelta,
};
use tollgate::protocols::anthropic::AnthropicMessages;
use tollgate::protocols::{ClientProtocol, EncodeCtx};
use tollgate::providers::anthropic::{Anthropic, PassthroughUsage, usage_of_message};
use tollgate::providers::{StreamFault, Target, Translator, Usage};

const STREAM: &str = include_str!("fixtures/anthropic/stream.sse");
const MESSAGE: &str = include_str!("fixtures/anthropic/message.json");
const CLAUDE_CODE: &str = include_str!("fixtures/anthropic/claude_code_request.json");

fn target() -> Target<'static> {
    Target {
        base_url: "https://api.anthropic.com/v1",
        upstream_model: "claude-up",
        api_version: None,
        region: None,
        default_max_tokens: 4096,
    }
}

// ---- requests ----

/// What a conversation says, independent of how it is split into messages and parts.
#[derive(Debug, PartialEq)]
enum Said {
    System(String),
    User {
        texts: Vec<String>,
        images: Vec<String>,
    },
    Assistant {
        text: String,
        calls: Vec<(String, String, Value)>,
    },
    ToolResult {
        id: String,
        text: String,
    },
}

fn said(req: &ChatRequest) -> (Vec<Said>, Vec<String>) {
    let mut out = Vec::new();
    for m in &req.messages {
        let parts: Vec<Part> = match &m.content {
            None => Vec::new(),
            Some(Content::Text(t)) => vec![Part::text(t.clone())],
            Some(Content::Parts(p)) => p.clone(),
        };
        let texts: Vec<String> = parts.iter().filter_map(|p| p.text.clone()).collect();
        match m.role {
            Role::System | Role::Developer => out.push(Said::System(texts.concat())),
            Role::User => out.push(Said::User {
                texts,
                images: parts
                    .iter()
                    .filter_map(|p| p.image_url.as_ref().map(|u| u.url.clone()))
                    .collect(),
            }),
            Role::Assistant => out.push(Said::Assistant {
                text: texts.concat(),
                calls: m
                    .tool_calls
                    .iter()
                    .map(|c| {
                        (
                            c.id.clone(),
                            c.function.name.clone(),
                            serde_json::from_str(&c.function.arguments).expect("arguments"),
                        )
                    })
                    .collect(),
            }),
            Role::Tool | Role::Function => out.push(Said::ToolResult {
                id: m.tool_call_id.clone().unwrap_or_default(),
                text: texts.concat(),
            }),
        }
    }
    (out, req.stop.clone())
}

fn word() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9 .,!?\"\\\\é]{1,24}"
}

fn image() -> impl Strategy<Value = String> {
    prop_oneof![
        "[A-Za-z0-9+/]{4,40}".prop_map(|d| format!("data:image/png;base64,{d}")),
        "[a-z]{1,10}".prop_map(|p| format!("https://img.test/{p}.jpg")),
    ]
}

fn args() -> impl Strategy<Value = Value> {
    prop::collection::btree_map(
        "[a-z]{1,6}",
        prop_oneof![
            any::<i32>().prop_map(Value::from),
            word().prop_map(Value::from),
            any::<bool>().prop_map(Value::from),
        ],
        0..4,
    )
    .prop_map(|m| Value::Object(m.into_iter().collect()))
}

/// One exchange: a user message (text and images), the assistant's answer (text and tool
/// calls), then a result for each call.
fn turn() -> impl Strategy<Value = Vec<Message>> {
    (
        word(),
        prop::collection::vec(image(), 0..3),
        word(),
        prop::collection::vec(("[a-z_]{1,12}", args(), word()), 0..3),
        any::<u32>(),
    )
        .prop_map(|(text, images, answer, calls, salt)| {
            let mut parts = vec![Part::text(text)];
            parts.extend(images.into_iter().map(Part::image));
            let mut msgs = vec![
                Message {
                    role: Role::User,
                    content: Some(Content::Parts(parts)),
                    ..Message::default()
                },
                Message {
                    role: Role::Assistant,
                    content: Some(Content::Text(answer)),
                    tool_calls: calls
                        .iter()
                        .enumerate()
                        .map(|(i, (name, args, _))| ToolCall {
                            id: format!("toolu_{salt}_{i}"),
                            kind: "function".into(),
                            function: FunctionCall {
                                name: name.clone(),
                                arguments: args.to_string(),
                            },
                        })
                        .collect(),
                    ..Message::default()
                },
            ];
            for (i, (_, _, result)) in calls.into_iter().enumerate() {
                msgs.push(Message {
                    role: Role::Tool,
                    tool_call_id: Some(format!("toolu_{salt}_{i}")),
                    content: Some(Content::Text(result)),
                    ..Message::default()
                });
            }
            msgs
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// pivot → Anthropic request (provider) → pivot (client protocol) keeps the system prompt,
    /// text, images, tool calls and results, and stop sequences.
    #[test]
    fn request_round_trip(
        system in word(),
        turns in prop::collection::vec(turn(), 1..4),
        last in word(),
        stop in prop::collection::vec("[A-Z]{1,5}", 0..3),
    ) {
        let mut messages = vec![Message::text(Role::System, system)];
        messages.extend(turns.into_iter().flatten());
        messages.push(Message::text(Role::User, last));
        let req = ChatRequest {
            model: "mine".into(),
            messages,
            stop,
            ..ChatRequest::default()
        };
        let body = Anthropic.encode_chat(&req, &target()).expect("encodes");
        let back = AnthropicMessages.decode_request(&body).expect("decodes");
        prop_assert_eq!(back.model.as_str(), "claude-up");
        prop_assert_eq!(back.max_tokens, Some(4096));
        prop_assert_eq!(said(&back), said(&req));
    }
}

#[test]
fn claude_code_request_survives_both_ways() {
    let pivot = AnthropicMessages
        .decode_request(CLAUDE_CODE.as_bytes())
        .expect("decodes");
    let body = Anthropic.encode_chat(&pivot, &target()).expect("encodes");
    let v: Value = serde_json::from_slice(&body).expect("json");
    let orig: Value = serde_json::from_str(CLAUDE_CODE).expect("json");
    // What Anthropic would see again: system blocks, thinking with its signature, tool uses,
    // tool results (is_error kept), tools with cache_control, thinking, metadata.
    assert_eq!(v["system"], orig["system"]);
    assert_eq!(v["messages"][1], orig["messages"][1]);
    assert_eq!(
        v["messages"][2]["content"][0],
        orig["messages"][2]["content"][0]
    );
    let r2 = &v["messages"][2]["content"][1];
    assert_eq!(r2["is_error"], true);
    assert_eq!(r2["tool_use_id"], "toolu_01Hq2aG7bXo3kCLfzF2tC9nK");
    assert_eq!(
        r2["content"][0]["cache_control"],
        json!({"type": "ephemeral"})
    );
    assert_eq!(v["tools"], orig["tools"]);
    assert_eq!(v["thinking"], orig["thinking"]);
    assert_eq!(v["metadata"], orig["metadata"]);
    assert_eq!(v["max_tokens"], 32000);
    assert_eq!(v["stream"], true);
}

// ---- answers ----

#[test]
fn message_round_trip_through_the_client_protocol() {
    let resp = Anthropic
        .decode_chat(MESSAGE.as_bytes(), &target())
        .expect("decodes");
    let ctx = EncodeCtx {
        client_model: "claude-sonnet-4-5-20250929".into(),
        id: Some("msg_01Aq9w938a90dw8q".into()),
        ..EncodeCtx::default()
    };
    let again: Value =
        serde_json::from_slice(&AnthropicMessages.encode_response(&resp, &ctx)).expect("json");
    let orig: Value = serde_json::from_str(MESSAGE).expect("json");
    for k in [
        "id",
        "type",
        "role",
        "model",
        "content",
        "stop_reason",
        "stop_sequence",
    ] {
        assert_eq!(again[k], orig[k], "{k}");
    }
    for k in [
        "input_tokens",
        "cache_read_input_tokens",
        "cache_creation_input_tokens",
        "output_tokens",
    ] {
        assert_eq!(again["usage"][k], orig["usage"][k], "{k}");
    }
    assert_eq!(
        usage_of_message(&serde_json::to_vec(&again).expect("json")),
        usage_of_message(MESSAGE.as_bytes())
    );
}

// ---- streams ----

fn decode_in_pieces(
    bytes: &[u8],
    cuts: &[usize],
) -> (Vec<ChatChunk>, Result<(), StreamFault>, Option<Usage>) {
    let mut d = Anthropic.chat_stream(&target(), 1 << 20);
    let mut out = Vec::new();
    let mut at = 0;
    let mut r = Ok(());
    for &c in cuts.iter().chain(std::iter::once(&bytes.len())) {
        let c = c.clamp(at, bytes.len());
        r = d.push(&bytes[at..c], &mut out);
        if r.is_err() {
            break;
        }
        at = c;
    }
    if r.is_ok() {
        r = d.finish(&mut out);
    }
    (out, r, d.usage())
}

/// Chunks with the per-stream clock removed (two decoders may straddle a second).
fn timeless(mut v: Vec<ChatChunk>) -> Vec<ChatChunk> {
    for c in &mut v {
        c.created = 0;
    }
    v
}

#[test]
fn stream_split_at_every_byte_decodes_the_same() {
    let bytes = STREAM.as_bytes();
    let (whole, r, usage) = decode_in_pieces(bytes, &[]);
    r.expect("complete");
    let whole = timeless(whole);
    for cut in 0..=bytes.len() {
        let (split, r, u) = decode_in_pieces(bytes, &[cut]);
        r.expect("complete");
        assert_eq!(timeless(split), whole, "cut at {cut}");
        assert_eq!(u, usage, "cut at {cut}");
    }
    // CRLF line ends decode the same too.
    let crlf = STREAM.replace('\n', "\r\n");
    let (c, r, u) = decode_in_pieces(crlf.as_bytes(), &[]);
    r.expect("complete");
    assert_eq!((timeless(c), u), (whole, usage));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn stream_split_anywhere_decodes_the_same(mut cuts in prop::collection::vec(0usize..4000, 0..12)) {
        cuts.sort_unstable();
        let bytes = STREAM.as_bytes();
        let (whole, _, usage) = decode_in_pieces(bytes, &[]);
        let (split, r, u) = decode_in_pieces(bytes, &cuts);
        prop_assert!(r.is_ok());
        prop_assert_eq!(timeless(split), timeless(whole));
        prop_assert_eq!(u, usage);
    }

    /// Each usage field is the last value reported; message_delta never adds to what came
    /// before, and the cache counts message_start gave survive deltas that omit them.
    #[test]
    fn usage_is_cumulative_never_summed(
        input in 0i64..100_000,
        read in 0i64..100_000,
        created in 0i64..100_000,
        deltas in prop::collection::vec((0i64..50_000, any::<bool>(), 0i64..100_000), 1..5),
    ) {
        let mut s = format!(
            "event: message_start\ndata: {}\n\n",
            json!({"type": "message_start", "message": {"id": "msg_p", "type": "message",
                "role": "assistant", "model": "c", "content": [], "stop_reason": null,
                "stop_sequence": null, "usage": {"input_tokens": input,
                "cache_read_input_tokens": read, "cache_creation_input_tokens": created,
                "output_tokens": 1}}})
        );
        let mut want_read = read;
        let mut want_out = 1;
        for (out, with_cache, new_read) in &deltas {
            let usage = if *with_cache {
                want_read = *new_read;
                json!({"output_tokens": out, "cache_read_input_tokens": new_read})
            } else {
                json!({"output_tokens": out})
            };
            want_out = *out;
            s.push_str(&format!(
                "event: message_delta\ndata: {}\n\n",
                json!({"type": "message_delta", "delta": {"stop_reason": "end_turn",
                       "stop_sequence": null}, "usage": usage})
            ));
        }
        s.push_str("event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n");
        let want = Usage {
            prompt: input + want_read + created,
            completion: want_out,
            cached: want_read,
            cache_write: created,
            reasoning: 0,
        };
        let (chunks, r, u) = decode_in_pieces(s.as_bytes(), &[]);
        prop_assert!(r.is_ok());
        prop_assert_eq!(u, Some(want));
        prop_assert_eq!(chunks.last().and_then(|c| c.usage).map(Usage::from), Some(want));
        let mut p = PassthroughUsage::new();
        for frame in s.split_terminator("\n\n") {
            let data = frame.split_once("data: ").expect("data").1;
            p.on_event(data.as_bytes());
        }
        prop_assert_eq!(p.usage(), Some(want));
    }
}

/// One piece of a generated pivot stream.
#[derive(Debug, Clone)]
enum Piece {
    Thinking(Vec<String>, String),
    Text(Vec<String>),
    Tool(String, Vec<String>),
}

fn piece() -> impl Strategy<Value = Piece> {
    prop_oneof![
        (prop::collection::vec(word(), 1..4), "[A-Za-z0-9+/=]{8,40}")
            .prop_map(|(t, s)| Piece::Thinking(t, s)),
        prop::collection::vec(word(), 1..4).prop_map(Piece::Text),
        ("[a-z_]{1,10}", prop::collection::vec(word(), 0..4)).prop_map(|(n, a)| Piece::Tool(n, a)),
    ]
}

fn delta_chunk(delta: Delta, finish: Option<&str>) -> ChatChunk {
    ChatChunk {
        id: "chatcmpl-1".into(),
        model: "up".into(),
        choices: vec![ChunkChoice {
            index: 0,
            delta,
            finish_reason: finish.map(str::to_owned),
            logprobs: None,
        }],
        ..ChatChunk::default()
    }
}

/// What a stream said: reasoning text, signatures, text, tool calls (id, name, arguments).
#[derive(Debug, Default, PartialEq)]
struct StreamSaid {
    reasoning: String,
    signatures: Vec<String>,
    text: String,
    calls: Vec<(String, String, String)>,
}

fn collect(chunks: &[ChatChunk]) -> StreamSaid {
    let mut s = StreamSaid::default();
    for c in chunks {
        for ch in &c.choices {
            let d = &ch.delta;
            s.reasoning
                .push_str(d.reasoning_content.as_deref().unwrap_or(""));
            s.signatures.extend(
                d.reasoning_blocks
                    .iter()
                    .filter_map(|b| b.signature.clone()),
            );
            s.text.push_str(d.content.as_deref().unwrap_or(""));
            for t in &d.tool_calls {
                let i = t.index as usize;
                if s.calls.len() <= i {
                    s.calls.resize(i + 1, Default::default());
                }
                if let Some(id) = &t.id {
                    s.calls[i].0.clone_from(id);
                }
                if let Some(n) = &t.function.name {
                    s.calls[i].1.clone_from(n);
                }
                s.calls[i]
                    .2
                    .push_str(t.function.arguments.as_deref().unwrap_or(""));
            }
        }
    }
    s
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// pivot stream → Anthropic SSE (client protocol) → pivot stream (provider) keeps text,
    /// thinking with its signature, tool calls, the finish reason and usage.
    #[test]
    fn stream_round_trip(pieces in prop::collection::vec(piece(), 0..6), prompt in 0i64..10_000, cached in 0i64..10_000) {
        let mut chunks = vec![delta_chunk(Delta { role: Some(Role::Assistant), ..Delta::default() }, None)];
        let mut tools = 0u32;
        for p in &pieces {
            match p {
                Piece::Thinking(texts, sig) => {
                    for t in texts {
                        chunks.push(delta_chunk(Delta { reasoning_content: Some(t.clone()), ..Delta::default() }, None));
                    }
                    chunks.push(delta_chunk(Delta { reasoning_blocks: vec![ReasoningBlock {
                        kind: "thinking".into(), signature: Some(sig.clone()), ..ReasoningBlock::default()
                    }], ..Delta::default() }, None));
                }
                Piece::Text(texts) => for t in texts {
                    chunks.push(delta_chunk(Delta { content: Some(t.clone()), ..Delta::default() }, None));
                },
                Piece::Tool(name, args) => {
                    chunks.push(delta_chunk(Delta { tool_calls: vec![ToolCallDelta {
                        index: tools, id: Some(format!("call_{tools}")), kind: Some("function".into()),
                        function: FunctionDelta { name: Some(name.clone()), arguments: Some(String::new()) },
                    }], ..Delta::default() }, None));
                    for a in args {
                        chunks.push(delta_chunk(Delta { tool_calls: vec![ToolCallDelta {
                            index: tools, function: FunctionDelta { arguments: Some(a.clone()), name: None },
                            ..ToolCallDelta::default()
                        }], ..Delta::default() }, None));
                    }
                    tools += 1;
                }
            }
        }
        let finish = if tools > 0 { "tool_calls" } else { "stop" };
        chunks.push(delta_chunk(Delta::default(), Some(finish)));
        let usage = Usage { prompt: prompt + cached, completion: 42, cached, cache_write: 0, reasoning: 0 };

        let mut enc = AnthropicMessages.stream_encoder(&EncodeCtx {
            client_model: "mine".into(),
            ..EncodeCtx::default()
        });
        let mut sse = BytesMut::new();
        enc.start(&mut sse);
        for c in &chunks {
            enc.chunk(c, &mut sse);
        }
        enc.finish(Some(usage), &mut sse);

        let (back, r, u) = decode_in_pieces(&sse, &[]);
        prop_assert!(r.is_ok(), "{:?}", r);
        prop_assert_eq!(collect(&back), collect(&chunks));
        prop_assert_eq!(u, Some(usage));
        let finishes: Vec<&str> = back.iter()
            .flat_map(|c| c.choices.iter().filter_map(|ch| ch.finish_reason.as_deref()))
            .collect();
        prop_assert_eq!(finishes, vec![finish]);
        prop_assert!(back.iter().all(|c| c.model == "mine"));
    }
}

#[test]
fn an_answer_without_text_or_tools_still_encodes() {
    let resp = ChatResponse {
        id: "x".into(),
        model: "m".into(),
        choices: vec![Choice {
            message: Message {
                role: Role::Assistant,
                content: None,
                ..Message::default()
            },
            ..Choice::default()
        }],
        ..ChatResponse::default()
    };
    let v: Value =
        serde_json::from_slice(&AnthropicMessages.encode_response(&resp, &EncodeCtx::default()))
            .expect("json");
    assert_eq!(v["content"], json!([]));
    assert_eq!(v["stop_reason"], "end_turn");
    assert_eq!(v["usage"]["input_tokens"], 0);
}
