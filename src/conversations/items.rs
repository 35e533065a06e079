//! The item objects of the Responses and Conversations APIs as tollgate stores and renders them,
//! and OpenAI's metadata limits.
//!
//! A client may send an item in its short forms (`{"role": "user", "content": "Hi"}`); what is
//! stored, listed and replayed is the full object OpenAI renders: `type`, an `id` with the
//! type's prefix, and for messages `status` and a `content` array of typed parts
//! (`input_text` for user, system and developer text, `output_text` for the assistant's).

use serde_json::{Map, Value, json};

use super::ids;
use crate::error::ApiError;

/// Most metadata pairs on an object (OpenAI's limit).
pub const MAX_METADATA_PAIRS: usize = 16;
/// Longest metadata key, in characters.
pub const MAX_METADATA_KEY_CHARS: usize = 64;
/// Longest metadata value, in characters.
pub const MAX_METADATA_VALUE_CHARS: usize = 512;
/// Longest item id tollgate keeps (a longer client-sent id is 400).
pub const MAX_ITEM_ID_CHARS: usize = 128;

/// Message roles an input or conversation item may have.
const ROLES: &[&str] = &["user", "assistant", "system", "developer"];

/// A client's `metadata`: absent or `null` is `{}`; otherwise an object of at most
/// [`MAX_METADATA_PAIRS`] string values, keys of at most [`MAX_METADATA_KEY_CHARS`] characters,
/// values of at most [`MAX_METADATA_VALUE_CHARS`]. Anything else is 400 naming `metadata`.
pub fn metadata(v: Option<&Value>) -> Result<Map<String, Value>, ApiError> {
    let bad = |m: String| ApiError::invalid_param("metadata", format!("Invalid 'metadata': {m}"));
    let obj = match v {
        None | Some(Value::Null) => return Ok(Map::new()),
        Some(Value::Object(o)) => o,
        Some(_) => return Err(bad("expected an object of string values.".into())),
    };
    if obj.len() > MAX_METADATA_PAIRS {
        return Err(bad(format!(
            "too many properties. Expected an object with at most {MAX_METADATA_PAIRS} properties, but got an object with {} properties instead.",
            obj.len()
        )));
    }
    for (k, v) in obj {
        if k.chars().count() > MAX_METADATA_KEY_CHARS {
            return Err(bad(format!(
                "key '{}…' is longer than {MAX_METADATA_KEY_CHARS} characters.",
                k.chars().take(16).collect::<String>()
            )));
        }
        let Some(s) = v.as_str() else {
            return Err(bad(format!("the value of '{k}' must be a string.")));
        };
        if s.chars().count() > MAX_METADATA_VALUE_CHARS {
            return Err(bad(format!(
                "the value of '{k}' is longer than {MAX_METADATA_VALUE_CHARS} characters."
            )));
        }
    }
    Ok(obj.clone())
}

/// The Responses API `input` as items: a string is one user message; an array is its items.
pub fn input_items(input: &Value) -> Result<Vec<Value>, ApiError> {
    match input {
        Value::String(s) => Ok(vec![normalize(
            json!({"type": "message", "role": "user", "content": s}),
            "input",
        )?]),
        Value::Array(a) => a
            .iter()
            .enumerate()
            .map(|(i, v)| normalize(v.clone(), &format!("input[{i}]")))
            .collect(),
        Value::Null => Ok(Vec::new()),
        _ => Err(ApiError::invalid_param(
            "input",
            "Invalid 'input': expected a string or an array of items.",
        )),
    }
}

/// One item in the full shape tollgate stores (see the module docs); `param` names it in errors
/// (`items[2]`). Unknown fields of the item are kept as they are.
pub fn normalize(item: Value, param: &str) -> Result<Value, ApiError> {
    let bad = |m: &str| ApiError::invalid_param(param, format!("Invalid '{param}': {m}"));
    let Value::Object(mut obj) = item else {
        return Err(bad("expected an item object."));
    };
    let ty = match obj.get("type") {
        Some(Value::String(t)) => t.clone(),
        None if obj.contains_key("role") => "message".to_owned(),
        _ => return Err(bad("missing the item's 'type'.")),
    };
    if ty == "item_reference" {
        return Err(bad(
            "an item_reference cannot be stored; send the item it refers to.",
        ));
    }
    obj.insert("type".into(), Value::String(ty.clone()));
    match obj.get("id") {
        None | Some(Value::Null) => {
            obj.insert("id".into(), Value::String(ids::item_id(&ty)));
        }
        Some(Value::String(id)) if valid_item_id(id) => {}
        Some(_) => {
            return Err(bad(&format!(
                "'id' must be 1 to {MAX_ITEM_ID_CHARS} letters, digits, '_' or '-'."
            )));
        }
    }
    if ty == "message" {
        let role = match obj.get("role") {
            Some(Value::String(r)) if ROLES.contains(&r.as_str()) => r.clone(),
            _ => {
                return Err(bad(
                    "a message's 'role' must be one of user, assistant, system, developer.",
                ));
            }
        };
        let text_part = if role == "assistant" {
            "output_text"
        } else {
            "input_text"
        };
        match obj.get_mut("content") {
            Some(Value::String(s)) => {
                let text = std::mem::take(s);
                let part = if role == "assistant" {
                    json!({"type": text_part, "text": text, "annotations": []})
                } else {
                    json!({"type": text_part, "text": text})
                };
                obj.insert("content".into(), Value::Array(vec![part]));
            }
            Some(Value::Array(parts)) => {
                if parts.iter().any(|p| !p.is_object()) {
                    return Err(bad("a message's content parts must be objects."));
                }
            }
            _ => {
                return Err(bad(
                    "a message needs 'content': a string or an array of parts.",
                ));
            }
        }
        obj.entry("status")
            .or_insert_with(|| Value::String("completed".into()));
    }
    Ok(Value::Object(obj))
}

/// The item's `id` (every normalized item has one).
pub fn id_of(item: &Value) -> &str {
    item.get("id").and_then(Value::as_str).unwrap_or_default()
}

/// Most bytes of an item's text the full-text index keeps.
pub const MAX_INDEXED_CHARS: usize = 1 << 20;

/// The text of a message item (its `text` parts joined by newlines), as the full-text index and
/// the chat see it; `None` for other items and messages without text.
pub fn text_of(item: &Value) -> Option<String> {
    if item.get("type").and_then(Value::as_str) != Some("message") {
        return None;
    }
    let mut out = String::new();
    match item.get("content") {
        Some(Value::String(s)) => out.push_str(s),
        Some(Value::Array(parts)) => {
            for p in parts {
                if let Some(t) = p.get("text").and_then(Value::as_str) {
                    if !out.is_empty() {
                        out.push('\n');
                    }
                    out.push_str(t);
                }
            }
        }
        _ => {}
    }
    (!out.is_empty()).then_some(out)
}

/// [`text_of`] cut to [`MAX_INDEXED_CHARS`] bytes (on a character boundary): what is indexed.
pub fn indexed_text(item: &Value) -> Option<String> {
    let mut out = text_of(item)?;
    if out.len() > MAX_INDEXED_CHARS {
        let mut end = MAX_INDEXED_CHARS;
        while !out.is_char_boundary(end) {
            end -= 1;
        }
        out.truncate(end);
    }
    Some(out)
}

fn valid_item_id(id: &str) -> bool {
    (1..=MAX_ITEM_ID_CHARS).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_messages_become_full_items() {
        let v = normalize(json!({"role": "user", "content": "Hi"}), "items[0]").unwrap();
        assert_eq!(v["type"], "message");
        assert_eq!(v["status"], "completed");
        assert_eq!(v["content"], json!([{"type": "input_text", "text": "Hi"}]));
        assert!(id_of(&v).starts_with("msg_"));
        let a = normalize(json!({"role": "assistant", "content": "Yo"}), "x").unwrap();
        assert_eq!(a["content"][0]["type"], "output_text");
        let fc = normalize(
            json!({"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"}),
            "x",
        )
        .unwrap();
        assert!(id_of(&fc).starts_with("fc_"));
        assert_eq!(fc["call_id"], "c1");
        // A client's own id is kept.
        let own = normalize(
            json!({"type": "message", "id": "msg_abc", "role": "user", "content": []}),
            "x",
        )
        .unwrap();
        assert_eq!(id_of(&own), "msg_abc");
    }

    #[test]
    fn bad_items_are_400_naming_the_param() {
        for bad in [
            json!("text"),
            json!({"content": "no type"}),
            json!({"role": "robot", "content": "x"}),
            json!({"role": "user"}),
            json!({"role": "user", "content": "x", "id": "has space"}),
            json!({"type": "item_reference", "id": "msg_1"}),
        ] {
            let e = normalize(bad.clone(), "items[3]").unwrap_err();
            assert!(
                matches!(&e, ApiError::BadRequest { param: Some(p), .. } if p == "items[3]"),
                "{bad}: {e:?}"
            );
        }
    }

    #[test]
    fn metadata_limits() {
        assert!(metadata(None).unwrap().is_empty());
        let ok: Map<String, Value> = (0..16).map(|i| (format!("k{i}"), json!("v"))).collect();
        assert_eq!(
            metadata(Some(&Value::Object(ok.clone()))).unwrap().len(),
            16
        );
        let mut many = ok;
        many.insert("k16".into(), json!("v"));
        for bad in [
            Value::Object(many),
            json!({"k".repeat(65): "v"}),
            json!({"k": "v".repeat(513)}),
            json!({"k": 1}),
            json!(["k"]),
        ] {
            assert!(metadata(Some(&bad)).is_err(), "{bad}");
        }
        assert!(metadata(Some(&json!({"k".repeat(64): "é".repeat(512)}))).is_ok());
    }
}
