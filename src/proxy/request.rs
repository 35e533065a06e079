//! A cheap view of an OpenAI request body: the top-level fields, each kept as raw JSON text.
//!
//! Only what the gateway must read (`model`, `stream`, `stream_options`, `max_tokens`) is parsed;
//! `messages` and everything else stay raw and are copied through byte for byte, so rewriting the
//! model never re-serialises the whole body.

use std::fmt;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

use crate::error::ApiError;

/// The body's top-level fields, in order, values unparsed.
pub struct RequestView<'a> {
    pub fields: Vec<(std::borrow::Cow<'a, str>, &'a RawValue)>,
    pub model: String,
    pub stream: bool,
    /// The client asked for `stream_options.include_usage = true`.
    pub include_usage: bool,
    /// `max_completion_tokens`, else `max_tokens`.
    pub max_tokens: Option<u64>,
}

struct Fields<'a>(Vec<(std::borrow::Cow<'a, str>, &'a RawValue)>);

impl<'de> de::Deserialize<'de> for Fields<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Fields<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some(k) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    let v: &'de RawValue = map.next_value()?;
                    out.push((k, v));
                }
                Ok(Fields(out))
            }
        }
        d.deserialize_map(V)
    }
}

impl<'a> RequestView<'a> {
    pub fn parse(body: &'a [u8]) -> Result<Self, ApiError> {
        let invalid = |e: &dyn fmt::Display| {
            ApiError::bad_request(
                "invalid_json",
                format!("We could not parse the JSON body of your request: {e}"),
            )
        };
        // UTF-8 checked once over the whole body, so the raw values are not checked again.
        let text = std::str::from_utf8(body).map_err(|e| invalid(&e))?;
        let Fields(fields) = serde_json::from_str(text).map_err(|e| invalid(&e))?;
        let get = |name: &str| fields.iter().find(|(k, _)| k == name).map(|(_, v)| *v);
        let model = match get("model") {
            Some(raw) => serde_json::from_str::<String>(raw.get())
                .map_err(|_| ApiError::invalid_param("model", "`model` must be a string."))?,
            None => {
                return Err(ApiError::BadRequest {
                    message: "you must provide a model parameter".into(),
                    code: "missing_field",
                    param: Some("model".into()),
                });
            }
        };
        let stream = match get("stream") {
            Some(raw) => match raw.get() {
                "true" => true,
                "false" | "null" => false,
                _ => {
                    return Err(ApiError::invalid_param(
                        "stream",
                        "`stream` must be a boolean.",
                    ));
                }
            },
            None => false,
        };
        #[derive(serde::Deserialize)]
        struct StreamOptions {
            include_usage: Option<bool>,
        }
        let include_usage = match get("stream_options") {
            Some(raw) if raw.get() != "null" => serde_json::from_str::<StreamOptions>(raw.get())
                .map_err(|_| {
                    ApiError::invalid_param("stream_options", "`stream_options` must be an object.")
                })?
                .include_usage
                .unwrap_or(false),
            _ => false,
        };
        let max_tokens = ["max_completion_tokens", "max_tokens"]
            .iter()
            .find_map(|k| get(k).and_then(|raw| serde_json::from_str::<u64>(raw.get()).ok()));
        Ok(Self {
            fields,
            model,
            stream,
            include_usage,
            max_tokens,
        })
    }

    pub fn get(&self, name: &str) -> Option<&'a RawValue> {
        self.fields.iter().find(|(k, _)| k == name).map(|(_, v)| *v)
    }

    /// Serialises the fields back, replacing `model`, and for streams forcing
    /// `stream_options.include_usage = true` (other stream options kept).
    pub fn rewrite(&self, upstream_model: &str) -> Vec<u8> {
        let cap = self
            .fields
            .iter()
            .map(|(k, v)| k.len() + v.get().len() + 4)
            .sum::<usize>()
            + 64;
        let mut out = Vec::with_capacity(cap);
        out.push(b'{');
        let mut first = true;
        let mut push_key = |out: &mut Vec<u8>, k: &str| {
            if !first {
                out.push(b',');
            }
            first = false;
            // Keys came from valid JSON; re-escaping through serde keeps them valid.
            let _ = serde_json::to_writer(&mut *out, k);
            out.push(b':');
        };
        let mut saw_options = false;
        for (k, v) in &self.fields {
            push_key(&mut out, k);
            match k.as_ref() {
                "model" => {
                    let _ = serde_json::to_writer(&mut out, upstream_model);
                }
                "stream_options" if self.stream => {
                    saw_options = true;
                    out.extend_from_slice(&with_include_usage(v));
                }
                _ => out.extend_from_slice(v.get().as_bytes()),
            }
        }
        if self.stream && !saw_options {
            push_key(&mut out, "stream_options");
            out.extend_from_slice(br#"{"include_usage":true}"#);
        }
        out.push(b'}');
        out
    }
}

fn with_include_usage(raw: &RawValue) -> Vec<u8> {
    match serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(raw.get()) {
        Ok(mut m) => {
            m.insert("include_usage".into(), serde_json::Value::Bool(true));
            serde_json::to_vec(&m).unwrap_or_else(|_| br#"{"include_usage":true}"#.to_vec())
        }
        Err(_) => br#"{"include_usage":true}"#.to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> serde_json::Value {
        serde_json::from_str(s).expect("json")
    }

    #[test]
    fn rewrites_model_and_injects_usage_keeping_the_rest_raw() {
        let body = br#"{"model":"gpt-x","messages":[{"role":"user","content":"h\u00e9 \"q\""}],"stream":true,"temperature":0.5,"extra":{"a":[1,2]}}"#;
        let v = RequestView::parse(body).expect("parse");
        assert_eq!(v.model, "gpt-x");
        assert!(v.stream && !v.include_usage);
        let out = v.rewrite("upstream-1");
        let got = parse(std::str::from_utf8(&out).expect("utf8"));
        assert_eq!(got["model"], "upstream-1");
        assert_eq!(got["stream_options"]["include_usage"], true);
        assert_eq!(got["messages"][0]["content"], "hé \"q\"");
        assert_eq!(got["extra"]["a"][1], 2);
        assert_eq!(got["temperature"], 0.5);
        // Raw values are copied verbatim (escapes preserved).
        assert!(
            std::str::from_utf8(&out)
                .expect("utf8")
                .contains(r#""h\u00e9 \"q\"""#)
        );
    }

    #[test]
    fn keeps_other_stream_options_and_reads_client_choice() {
        let body = br#"{"model":"m","stream":true,"stream_options":{"include_usage":false,"x":1},"max_tokens":7}"#;
        let v = RequestView::parse(body).expect("parse");
        assert!(!v.include_usage);
        assert_eq!(v.max_tokens, Some(7));
        let got = parse(std::str::from_utf8(&v.rewrite("m")).expect("utf8"));
        assert_eq!(
            got["stream_options"],
            serde_json::json!({"include_usage": true, "x": 1})
        );
    }

    #[test]
    fn non_stream_is_not_given_stream_options() {
        let v = RequestView::parse(br#"{"model":"m","input":"x"}"#).expect("parse");
        let got = parse(std::str::from_utf8(&v.rewrite("u")).expect("utf8"));
        assert!(got.get("stream_options").is_none());
        assert_eq!(got["model"], "u");
    }

    #[test]
    fn errors() {
        assert!(RequestView::parse(b"{").is_err());
        assert!(RequestView::parse(b"[1]").is_err());
        assert!(RequestView::parse(br#"{"messages":[]}"#).is_err());
        assert!(RequestView::parse(br#"{"model":3}"#).is_err());
        assert!(RequestView::parse(br#"{"model":"m","stream":"yes"}"#).is_err());
        assert!(RequestView::parse(b"{\"model\":\"m\xff\"}").is_err());
    }
}
