//! OpenAI's embeddings answer, for translating providers: `encoding_format: "base64"`.
//!
//! An OpenAI upstream encodes base64 itself; a translated one (Gemini, Bedrock) answers floats,
//! and the gateway encodes them as OpenAI does: each vector's floats as little-endian `f32`
//! bytes, base64 (standard alphabet, padded). [`crate::providers::Translator::decode_embeddings`]
//! does not see the request, so the caller applies this when [`wants_base64`] says so.

use base64::Engine;
use serde_json::Value;

/// The request asked for `encoding_format: "base64"`.
pub fn wants_base64(req: &Value) -> bool {
    req.get("encoding_format").and_then(Value::as_str) == Some("base64")
}

/// One vector as OpenAI's base64 string.
pub fn encode_vector(values: &[Value]) -> String {
    let mut bytes = Vec::with_capacity(values.len() * 4);
    for v in values {
        let f = v.as_f64().unwrap_or(0.0) as f32;
        bytes.extend_from_slice(&f.to_le_bytes());
    }
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Rewrites every `data[].embedding` array of an OpenAI embeddings list as base64.
pub fn to_base64(resp: &mut Value) {
    let Some(data) = resp.get_mut("data").and_then(Value::as_array_mut) else {
        return;
    };
    for item in data {
        if let Some(e) = item.get_mut("embedding")
            && let Some(values) = e.as_array()
        {
            *e = Value::String(encode_vector(values));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn floats_become_little_endian_f32_base64() {
        let mut resp = json!({"object": "list", "data": [
            {"object": "embedding", "index": 0, "embedding": [1.0, -2.5]}
        ]});
        to_base64(&mut resp);
        let b64 = resp["data"][0]["embedding"].as_str().expect("a string");
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .expect("base64");
        assert_eq!(bytes.len(), 8);
        let f0 = f32::from_le_bytes(bytes[0..4].try_into().expect("4 bytes"));
        let f1 = f32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes"));
        assert_eq!((f0, f1), (1.0, -2.5));
        assert!(wants_base64(&json!({"encoding_format": "base64"})));
        assert!(!wants_base64(&json!({"encoding_format": "float"})));
    }
}
