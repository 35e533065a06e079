//! Token counts the gateway computes itself when an upstream reports no usage (o200k_base, the
//! tokenizer of current OpenAI models; embedded in the binary, no download).

use bytes::Bytes;
use serde::Deserialize;
use serde_json::Value;

use crate::providers::{Endpoint, Usage};

fn count(text: &str) -> i64 {
    if text.is_empty() {
        return 0;
    }
    tiktoken_rs::o200k_base_singleton()
        .encode_with_special_tokens(text)
        .len() as i64
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
    #[derive(Deserialize)]
    struct Req {
        #[serde(default)]
        messages: Option<Vec<Value>>,
        #[serde(default)]
        prompt: Option<Value>,
        #[serde(default)]
        input: Option<Value>,
    }
    let Ok(req) = serde_json::from_slice::<Req>(body) else {
        return 0;
    };
    let mut text = String::new();
    let mut framing = 0;
    match endpoint {
        Endpoint::ChatCompletions => {
            for m in req.messages.iter().flatten() {
                framing += 4;
                strings(m, &mut text, "\n");
            }
            framing += 3;
        }
        Endpoint::Completions => req.prompt.iter().for_each(|p| strings(p, &mut text, "\n")),
        Endpoint::Embeddings => req.input.iter().for_each(|p| strings(p, &mut text, "\n")),
    }
    count(&text) + framing
}

/// Completion tokens of a response: streamed `data:` payloads or one complete body.
pub fn completion_tokens(endpoint: Endpoint, payloads: &[Bytes]) -> i64 {
    if endpoint == Endpoint::Embeddings {
        return 0;
    }
    let mut text = String::new();
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
                strings(field, &mut text, "");
            }
        }
    }
    count(&text)
}

pub fn estimate(endpoint: Endpoint, request: &[u8], response: &[Bytes]) -> Usage {
    Usage {
        prompt: prompt_tokens(endpoint, request),
        completion: completion_tokens(endpoint, response),
        cached: 0,
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
}
