//! Token counts the gateway computes itself when an upstream reports no usage (o200k_base, the
//! tokenizer of current OpenAI models; embedded in the binary, no download).
//!
//! Bounded in time and memory whatever the sizes: the tokenizer runs over at most
//! [`ESTIMATE_KEEP_BYTES`] of request and of response each. A request body above that is counted
//! at 4 bytes a token (as admission reserves it); response payloads beyond what was kept are
//! counted at the token-per-byte rate of the kept ones (4 bytes a token when none was kept).

use bytes::Bytes;
use serde::Deserialize;
use serde_json::Value;

use crate::metering::event::{ESTIMATE_KEEP_BYTES, EstimateInput};
use crate::providers::{Endpoint, Usage};

/// Tokens of `text`, which is at most [`ESTIMATE_KEEP_BYTES`] (the callers' inputs are): `tokenized`
/// counts the bytes.
fn count(text: &str, tokenized: &mut usize) -> i64 {
    if text.is_empty() {
        return 0;
    }
    *tokenized += text.len();
    tiktoken_rs::o200k_base_singleton()
        .encode_with_special_tokens(text)
        .len() as i64
}

/// Bytes at 4 per token, rounded up (admission's prompt estimate).
fn by_bytes(n: usize) -> i64 {
    i64::try_from(n.div_ceil(4)).unwrap_or(i64::MAX)
}

/// Collects every string under `v` (message contents, prompts, inputs, tool arguments), each
/// followed by `sep`.
fn strings(v: &Value, out: &mut String, sep: &str) {
    match v {
        Value::String(s) => {
            out.push_str(s);
            out.push_str(sep);
        }
        Value::Array(a) => a.iter().for_each(|x| strings(x, out, sep)),
        Value::Object(o) => o.values().for_each(|x| strings(x, out, sep)),
        _ => {}
    }
}

/// Prompt tokens of a request body: the text of `messages` (plus ~4 tokens of framing per
/// message, as OpenAI counts), `prompt`, or `input`.
pub fn prompt_tokens(endpoint: Endpoint, body: &[u8]) -> i64 {
    prompt_tokens_counted(endpoint, body, &mut 0)
}

fn prompt_tokens_counted(endpoint: Endpoint, body: &[u8], tokenized: &mut usize) -> i64 {
    #[derive(Deserialize)]
    struct Req {
        #[serde(default)]
        messages: Option<Vec<Value>>,
        #[serde(default)]
        prompt: Option<Value>,
        #[serde(default)]
        input: Option<Value>,
        /// Anthropic's system prompt (a string or text blocks).
        #[serde(default)]
        system: Option<Value>,
        /// The Responses API's system prompt.
        #[serde(default)]
        instructions: Option<Value>,
    }
    let Ok(req) = serde_json::from_slice::<Req>(body) else {
        return 0;
    };
    let mut text = String::new();
    let mut framing = 0;
    match endpoint {
        // Each protocol's own body (the client's, translated or not): chat `messages`,
        // Responses `instructions` and `input`, Anthropic `system` and `messages`.
        Endpoint::ChatCompletions
        | Endpoint::Responses
        | Endpoint::Messages
        | Endpoint::CountTokens => {
            for p in [&req.system, &req.instructions].into_iter().flatten() {
                framing += 4;
                strings(p, &mut text, "\n");
            }
            req.input.iter().for_each(|p| strings(p, &mut text, "\n"));
            for m in req.messages.iter().flatten() {
                framing += 4;
                strings(m, &mut text, "\n");
            }
            framing += 3;
        }
        Endpoint::Completions => req.prompt.iter().for_each(|p| strings(p, &mut text, "\n")),
        Endpoint::Embeddings | Endpoint::Moderations | Endpoint::AudioSpeech => {
            req.input.iter().for_each(|p| strings(p, &mut text, "\n"))
        }
        Endpoint::ImageGenerations => req.prompt.iter().for_each(|p| strings(p, &mut text, "\n")),
        // Multipart bodies are not kept; their calls are metered in units.
        Endpoint::ImageEdits
        | Endpoint::ImageVariations
        | Endpoint::AudioTranscriptions
        | Endpoint::AudioTranslations => {}
        // Stored state: no model call, nothing to count.
        Endpoint::Conversations | Endpoint::StoredResponses | Endpoint::StoredCompletions => {}
        // A session has no request body; its responses report their own usage.
        Endpoint::Realtime => {}
    }
    // The strings of a body are never longer than it.
    count(&text, tokenized) + framing
}

/// Completion tokens of a response: streamed `data:` payloads or one complete body.
pub fn completion_tokens(endpoint: Endpoint, payloads: &[Bytes]) -> i64 {
    completion_tokens_counted(endpoint, payloads, &mut 0)
}

fn completion_tokens_counted(endpoint: Endpoint, payloads: &[Bytes], tokenized: &mut usize) -> i64 {
    if matches!(endpoint, Endpoint::Embeddings | Endpoint::CountTokens) || endpoint.media() {
        return 0;
    }
    let mut text = String::new();
    completion_text(payloads, &mut text);
    count(&text, tokenized)
}

/// Appends the answer text of `payloads` (chat deltas and messages, tool calls, completion
/// texts) to `text`: what the completion estimate tokenizes.
pub fn completion_text(payloads: &[Bytes], text: &mut String) {
    for p in payloads {
        let Ok(v) = serde_json::from_slice::<Value>(p) else {
            continue;
        };
        for c in v
            .get("choices")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            for field in [
                c.pointer("/delta/content"),
                c.pointer("/delta/tool_calls"),
                c.pointer("/message/content"),
                c.pointer("/message/tool_calls"),
                c.get("text"),
            ]
            .into_iter()
            .flatten()
            {
                // Deltas concatenate: no separator, or every chunk would add a token.
                strings(field, text, "");
            }
        }
    }
}

/// An estimate and the bytes the tokenizer ran over to make it (at most
/// 2 × [`ESTIMATE_KEEP_BYTES`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Estimate {
    pub usage: Usage,
    pub tokenized_bytes: usize,
}

pub fn estimate(endpoint: Endpoint, input: &EstimateInput) -> Estimate {
    let mut tokenized = 0;
    let prompt =
        if input.request_len <= ESTIMATE_KEEP_BYTES && input.request.len() == input.request_len {
            prompt_tokens_counted(endpoint, &input.request, &mut tokenized)
        } else {
            by_bytes(input.request_len)
        };
    let r = &input.response;
    let completion =
        if matches!(endpoint, Endpoint::Embeddings | Endpoint::Moderations) || r.total_bytes == 0 {
            0
        } else if r.kept_bytes == 0 {
            by_bytes(r.total_bytes)
        } else {
            let kept = if matches!(endpoint, Endpoint::CountTokens) || endpoint.media() {
                0
            } else {
                // The folded payloads' text, then the rest's: the same text in the same order.
                let mut text = r.folded.clone();
                completion_text(&r.payloads, &mut text);
                count(&text, &mut tokenized)
            };
            // The rest at the kept payloads' rate (exact when everything was kept).
            let scaled = i128::from(kept) * r.total_bytes as i128 / r.kept_bytes as i128;
            i64::try_from(scaled).unwrap_or(i64::MAX)
        };
    Estimate {
        usage: Usage {
            prompt,
            completion,
            cached: 0,
            ..Default::default()
        },
        tokenized_bytes: tokenized,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_prompt_and_completion_separately() {
        let req =
            br#"{"model":"m","messages":[{"role":"user","content":"Hello there, how are you?"}]}"#;
        let p = prompt_tokens(Endpoint::ChatCompletions, req);
        assert!((8..=20).contains(&p), "prompt {p}");
        let chunks = vec![
            Bytes::from_static(br#"{"choices":[{"delta":{"content":"I am"}}]}"#),
            Bytes::from_static(br#"{"choices":[{"delta":{"content":" fine, thanks."}}]}"#),
        ];
        let c = completion_tokens(Endpoint::ChatCompletions, &chunks);
        assert!((4..=8).contains(&c), "completion {c}");
        assert_eq!(completion_tokens(Endpoint::ChatCompletions, &[]), 0);
        let e = prompt_tokens(
            Endpoint::Embeddings,
            br#"{"model":"e","input":["a b c","d"]}"#,
        );
        assert!(e >= 2);
    }

    /// Translated requests keep the client's own body: Anthropic's `system` and the Responses
    /// API's `instructions` count as a chat body's system message does.
    #[test]
    fn system_and_instructions_count_like_a_system_message() {
        let sys = "You are a careful assistant for an online bookshop; cite catalogue numbers.";
        let chat = serde_json::json!({"model": "m", "messages": [
            {"role": "system", "content": sys}, {"role": "user", "content": "Any dragons?"}]});
        let messages = serde_json::json!({"model": "m", "max_tokens": 5,
            "system": [{"type": "text", "text": sys}],
            "messages": [{"role": "user", "content": "Any dragons?"}]});
        let responses =
            serde_json::json!({"model": "m", "instructions": sys, "input": "Any dragons?"});
        let bare = prompt_tokens(
            Endpoint::Messages,
            br#"{"messages":[{"role":"user","content":"Any dragons?"}]}"#,
        );
        let c = prompt_tokens(Endpoint::ChatCompletions, chat.to_string().as_bytes());
        let m = prompt_tokens(Endpoint::Messages, messages.to_string().as_bytes());
        let r = prompt_tokens(Endpoint::Responses, responses.to_string().as_bytes());
        assert!(
            m >= bare + 14 && r >= 14 + 3,
            "system counted: {bare} {m} {r}"
        );
        assert!((m - c).abs() <= 4, "messages {m} vs chat {c}");
        assert!((r - c).abs() <= 8, "responses {r} vs chat {c}");
    }

    /// A long stream's kept payloads are folded into their text as they come: it holds the
    /// text, not the chunks, and the estimate is the one the chunks themselves give.
    #[test]
    fn folded_stream_payloads_hold_their_text_and_estimate_the_same() {
        use crate::metering::event::{FOLD_AT, KeptPayloads};
        let chunks: Vec<Bytes> = (0..1500)
            .map(|i| {
                let v = if i % 500 == 7 {
                    serde_json::json!({"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0,
                        "delta": {"tool_calls": [{"index": 0, "function": {"arguments": format!("{{\"n\":{i}}}")}}]}}]})
                } else {
                    serde_json::json!({"id": "chatcmpl-0123456789", "object": "chat.completion.chunk",
                        "created": 1, "model": "m", "choices": [{"index": 0,
                        "delta": {"content": format!(" word{i}")}, "finish_reason": null}]})
                };
                Bytes::from(serde_json::to_vec(&v).expect("json"))
            })
            .collect();
        let mut kept = KeptPayloads::default();
        for c in &chunks {
            kept.push(c.clone());
            let held: usize = kept.payloads.iter().map(Bytes::len).sum();
            assert!(held < FOLD_AT + c.len(), "{held} bytes of chunks held");
        }
        let all: usize = chunks.iter().map(Bytes::len).sum();
        assert!(all > 10 * FOLD_AT && all < ESTIMATE_KEEP_BYTES);
        assert_eq!(kept.kept_bytes, all);
        assert!(
            kept.folded.len() < all / 10,
            "{} bytes of text",
            kept.folded.len()
        );
        let want = completion_tokens(Endpoint::ChatCompletions, &chunks);
        assert!(want > 1500);
        let e = estimate(
            Endpoint::ChatCompletions,
            &EstimateInput {
                response: kept,
                ..Default::default()
            },
        );
        assert_eq!(e.usage.completion, want);
    }

    /// Whatever the sizes, the tokenizer sees at most the kept bytes, and the estimate grows
    /// with the size.
    #[test]
    fn large_inputs_are_estimated_by_bytes_beyond_the_kept_prefix() {
        use crate::metering::event::KeptPayloads;
        let text = "lorem ipsum dolor sit amet ".repeat(16 * 1024 * 1024 / 27);
        let body = serde_json::to_vec(&serde_json::json!({
            "model": "m", "messages": [{"role": "user", "content": text}]
        }))
        .expect("json");
        assert!(body.len() > 16_000_000);
        // A 16 MiB prompt: by bytes, nothing tokenized.
        let big = EstimateInput {
            request: Bytes::new(),
            request_len: body.len(),
            response: KeptPayloads::default(),
        };
        let e = estimate(Endpoint::ChatCompletions, &big);
        assert_eq!(e.usage.prompt, body.len().div_ceil(4) as i64);
        assert_eq!(e.tokenized_bytes, 0);
        // A 60 MB complete body: kept nothing, by bytes.
        let huge = EstimateInput {
            response: KeptPayloads::one(Bytes::from(vec![b' '; 60_000_000])),
            ..Default::default()
        };
        let e = estimate(Endpoint::ChatCompletions, &huge);
        assert_eq!(e.usage.completion, 15_000_000);
        assert_eq!(e.tokenized_bytes, 0);
        // 60 MB of stream chunks: the first 256 KiB tokenized, the rest at their rate.
        let chunk = Bytes::from_static(br#"{"choices":[{"delta":{"content":" word"}}]}"#);
        let mut kept = KeptPayloads::default();
        let n = 60_000_000 / chunk.len();
        for _ in 0..n {
            kept.push(chunk.clone());
        }
        assert!(kept.kept_bytes <= ESTIMATE_KEEP_BYTES);
        let e = estimate(
            Endpoint::ChatCompletions,
            &EstimateInput {
                response: kept,
                ..Default::default()
            },
        );
        assert!(
            e.tokenized_bytes <= ESTIMATE_KEEP_BYTES,
            "{}",
            e.tokenized_bytes
        );
        let per_chunk = e.usage.completion as f64 / n as f64;
        assert!((0.99..=1.01).contains(&per_chunk), "{per_chunk}");
        // A small request is still counted exactly.
        let small = br#"{"model":"m","messages":[{"role":"user","content":"Hello there"}]}"#;
        let e = estimate(
            Endpoint::ChatCompletions,
            &EstimateInput {
                request: Bytes::from_static(small),
                request_len: small.len(),
                response: KeptPayloads::default(),
            },
        );
        assert_eq!(
            e.usage.prompt,
            prompt_tokens(Endpoint::ChatCompletions, small)
        );
        assert!(e.tokenized_bytes > 0 && e.tokenized_bytes < small.len());
    }
}
