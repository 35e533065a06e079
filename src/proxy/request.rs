//! A cheap view of an OpenAI request body: the top-level fields, each kept as raw JSON text.
//!
//! Only what the gateway must read (`model`, `stream`, `stream_options`, the output-token bounds
//! and `n`) is parsed; `messages` and everything else stay raw and are copied through byte for
//! byte, so rewriting the model never re-serialises the whole body.
//!
//! The fields the gateway decides on must mean to it what they mean to the upstream. JSON lets a
//! key repeat and upstreams keep the last value, so a body that repeats one of [`DECIDED`] (or
//! `include_usage` inside `stream_options`) is refused — found in the same pass that splits the
//! body — and their values are read strictly: a bound that is not an integer is refused rather
//! than ignored, since an upstream may still read `1e6` or `1000000.0` as a number.

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;

use crate::error::ApiError;

/// The top-level fields whose values the gateway decides on (routing, streaming, the reserved
/// maximum cost): each may appear once.
pub const DECIDED: [&str; 7] = [
    "model",
    "stream",
    "stream_options",
    "max_tokens",
    "max_completion_tokens",
    "max_output_tokens",
    "n",
];

fn decided_index(key: &str) -> Option<usize> {
    Some(match key {
        "model" => 0,
        "stream" => 1,
        "stream_options" => 2,
        "max_tokens" => 3,
        "max_completion_tokens" => 4,
        "max_output_tokens" => 5,
        "n" => 6,
        _ => return None,
    })
}

/// The body's top-level fields, in order, values unparsed.
pub struct RequestView<'a> {
    pub fields: Vec<(std::borrow::Cow<'a, str>, &'a RawValue)>,
    pub model: String,
    pub stream: bool,
    /// The client asked for `stream_options.include_usage = true`.
    pub include_usage: bool,
    /// The most completion tokens one choice may produce: the largest of `max_completion_tokens`,
    /// `max_tokens` and `max_output_tokens` (upstreams differ on which wins when several are
    /// given, so the gateway assumes the largest). `None` when none is given or it is 0 (which
    /// some upstreams read as "no limit").
    pub max_tokens: Option<u64>,
    /// Choices asked for (`n`, at least 1).
    pub n: u64,
}

/// The top-level fields, with where each decided field is, or the first decided field repeated.
struct Split<'a, 'v> {
    decided: &'v mut [Option<usize>; DECIDED.len()],
    repeated: &'v mut Option<&'static str>,
    _body: std::marker::PhantomData<&'a ()>,
}

type Fields<'a> = Vec<(std::borrow::Cow<'a, str>, &'a RawValue)>;

impl<'de> Visitor<'de> for Split<'de, '_> {
    type Value = Fields<'de>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::with_capacity(map.size_hint().unwrap_or(8));
        while let Some(k) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            if let Some(d) = decided_index(&k) {
                if self.decided[d].is_some() {
                    *self.repeated = Some(DECIDED[d]);
                    return Err(de::Error::custom("a decided field repeats"));
                }
                self.decided[d] = Some(out.len());
            }
            let v: &'de RawValue = map.next_value()?;
            out.push((k, v));
        }
        Ok(out)
    }
}

/// `stream_options.include_usage`, refusing a repeated `include_usage`.
struct IncludeUsage<'v> {
    repeated: &'v mut bool,
}

impl<'de> DeserializeSeed<'de> for IncludeUsage<'_> {
    type Value = Option<bool>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for IncludeUsage<'_> {
    type Value = Option<bool>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut include_usage: Option<Option<bool>> = None;
        while let Some(k) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            if k == "include_usage" {
                if include_usage.is_some() {
                    *self.repeated = true;
                    return Err(de::Error::custom("include_usage repeats"));
                }
                include_usage = Some(map.next_value()?);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(include_usage.flatten())
    }
}

fn repeated(name: &str) -> ApiError {
    ApiError::BadRequest {
        message: format!(
            "The request body gives `{name}` more than once. Give each of {} once.",
            "model, stream, stream_options (and its include_usage), max_tokens, \
             max_completion_tokens, max_output_tokens and n"
        ),
        code: "invalid_json",
        param: Some(name.to_owned()),
    }
}

/// An output-token bound: a non-negative integer or `null`.
fn token_bound(name: &str, raw: &RawValue) -> Result<Option<u64>, ApiError> {
    serde_json::from_str::<Option<u64>>(raw.get()).map_err(|_| {
        ApiError::invalid_param(
            name,
            format!("`{name}` must be a non-negative integer (at most 18446744073709551615)."),
        )
    })
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
        let mut decided = [None; DECIDED.len()];
        let mut first_repeated = None;
        let mut de = serde_json::Deserializer::from_str(text);
        let split = Split {
            decided: &mut decided,
            repeated: &mut first_repeated,
            _body: std::marker::PhantomData,
        };
        let fields = match (&mut de).deserialize_map(split) {
            Ok(f) => f,
            Err(e) => return Err(first_repeated.map_or_else(|| invalid(&e), repeated)),
        };
        de.end().map_err(|e| invalid(&e))?;
        let get = |name: &str| {
            decided_index(name)
                .and_then(|d| decided[d])
                .map(|i| fields[i].1)
        };
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
        let include_usage = match get("stream_options") {
            Some(raw) if raw.get() != "null" => {
                let mut again = false;
                let mut de = serde_json::Deserializer::from_str(raw.get());
                let read = IncludeUsage {
                    repeated: &mut again,
                }
                .deserialize(&mut de);
                match read {
                    Ok(v) => v.unwrap_or(false),
                    Err(_) if again => return Err(repeated("stream_options.include_usage")),
                    Err(_) => {
                        return Err(ApiError::invalid_param(
                            "stream_options",
                            "`stream_options` must be an object whose `include_usage` is a boolean.",
                        ));
                    }
                }
            }
            _ => false,
        };
        let mut max_tokens: Option<u64> = None;
        for name in ["max_completion_tokens", "max_tokens", "max_output_tokens"] {
            if let Some(raw) = get(name)
                && let Some(t) = token_bound(name, raw)?
            {
                max_tokens = Some(max_tokens.map_or(t, |m| m.max(t)));
            }
        }
        let n = match get("n") {
            Some(raw) => match serde_json::from_str::<Option<u64>>(raw.get()) {
                Ok(None) => 1,
                Ok(Some(n)) if n >= 1 => n,
                _ => {
                    return Err(ApiError::invalid_param(
                        "n",
                        "`n` must be a positive integer.",
                    ));
                }
            },
            None => 1,
        };
        Ok(Self {
            fields,
            model,
            stream,
            include_usage,
            max_tokens: max_tokens.filter(|&t| t > 0),
            n,
        })
    }

    pub fn get(&self, name: &str) -> Option<&'a RawValue> {
        self.fields.iter().find(|(k, _)| k == name).map(|(_, v)| *v)
    }

    /// Serialises the fields back, replacing `model`, and for streams forcing
    /// `stream_options.include_usage = true` (other stream options kept).
    pub fn rewrite(&self, upstream_model: &str) -> Vec<u8> {
        self.build(upstream_model, true, &[])
    }

    /// [`RequestView::rewrite`] without the fields in `skip` (the gateway's own: `store`,
    /// `metadata` of a chat completion tollgate stores itself).
    pub fn rewrite_without(&self, upstream_model: &str, skip: &[&str]) -> Vec<u8> {
        self.build(upstream_model, true, skip)
    }

    /// The body with only `model` replaced: for protocols that have no `stream_options`
    /// (Anthropic's Messages API, the Responses API).
    pub fn with_model(&self, upstream_model: &str) -> Vec<u8> {
        self.build(upstream_model, false, &[])
    }

    fn build(&self, upstream_model: &str, inject_usage: bool, skip: &[&str]) -> Vec<u8> {
        let inject = inject_usage && self.stream;
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
            if skip.contains(&k.as_ref()) {
                continue;
            }
            push_key(&mut out, k);
            match k.as_ref() {
                "model" => {
                    let _ = serde_json::to_writer(&mut out, upstream_model);
                }
                "stream_options" if inject => {
                    saw_options = true;
                    out.extend_from_slice(&with_include_usage(v));
                }
                _ => out.extend_from_slice(v.get().as_bytes()),
            }
        }
        if inject && !saw_options {
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

    fn refusal(body: &str) -> (String, Option<String>) {
        match RequestView::parse(body.as_bytes()) {
            Ok(_) => panic!("accepted {body}"),
            Err(ApiError::BadRequest { code, param, .. }) => (code.to_owned(), param),
            Err(e) => panic!("{e:?}"),
        }
    }

    #[test]
    fn a_repeated_decided_field_is_refused_naming_it() {
        for name in DECIDED {
            let body = format!(r#"{{"model":"m","{name}":1,"messages":[],"{name}":2}}"#);
            assert_eq!(
                refusal(&body),
                ("invalid_json".to_owned(), Some(name.to_owned())),
                "{body}"
            );
        }
        // The same key written with an escape is the same key to every JSON reader.
        assert_eq!(
            refusal(r#"{"max_tokens":1,"model":"m","max\u005ftokens":2000000}"#),
            ("invalid_json".to_owned(), Some("max_tokens".to_owned()))
        );
        assert_eq!(
            refusal(
                r#"{"model":"m","stream":true,"stream_options":{"include_usage":false,"include_usage":true}}"#
            ),
            (
                "invalid_json".to_owned(),
                Some("stream_options.include_usage".to_owned())
            )
        );
        // Other fields may repeat: the gateway does not read them.
        let v =
            RequestView::parse(br#"{"model":"m","temperature":1,"temperature":2}"#).expect("parse");
        assert_eq!(v.fields.len(), 3);
    }

    #[test]
    fn decided_values_are_read_strictly() {
        for (body, param) in [
            (r#"{"model":"m","max_tokens":-1}"#, "max_tokens"),
            (r#"{"model":"m","max_tokens":1.5}"#, "max_tokens"),
            (r#"{"model":"m","max_tokens":1e6}"#, "max_tokens"),
            (r#"{"model":"m","max_tokens":1000000.0}"#, "max_tokens"),
            (r#"{"model":"m","max_tokens":"100"}"#, "max_tokens"),
            (
                r#"{"model":"m","max_completion_tokens":18446744073709551616}"#,
                "max_completion_tokens",
            ),
            (
                r#"{"model":"m","max_output_tokens":true}"#,
                "max_output_tokens",
            ),
            (r#"{"model":"m","n":0}"#, "n"),
            (r#"{"model":"m","n":2.0}"#, "n"),
            (r#"{"model":"m","stream":1}"#, "stream"),
            (r#"{"model":"m","stream":"true"}"#, "stream"),
            (r#"{"model":"m","stream_options":[]}"#, "stream_options"),
            (
                r#"{"model":"m","stream_options":{"include_usage":"yes"}}"#,
                "stream_options",
            ),
        ] {
            assert_eq!(
                refusal(body),
                ("invalid_value".to_owned(), Some(param.to_owned())),
                "{body}"
            );
        }
        // The largest bound wins; 0 bounds nothing; null is absent.
        let v = RequestView::parse(
            br#"{"model":"m","max_tokens":10,"max_completion_tokens":5,"max_output_tokens":null,"n":3}"#,
        )
        .expect("parse");
        assert_eq!((v.max_tokens, v.n), (Some(10), 3));
        let v = RequestView::parse(br#"{"model":"m","max_tokens":0,"n":null}"#).expect("parse");
        assert_eq!((v.max_tokens, v.n), (None, 1));
    }

    mod agreement {
        use proptest::prelude::*;

        use super::super::RequestView;

        /// Keys as written in the body (some with escapes that decode to a decided name).
        const KEYS: &[&str] = &[
            r#""model""#,
            r#""m\u006fdel""#,
            r#""stream""#,
            r#""stream_options""#,
            r#""max_tokens""#,
            r#""max\u005ftokens""#,
            r#""max_completion_tokens""#,
            r#""max_output_tokens""#,
            r#""n""#,
            r#""messages""#,
            r#""temperature""#,
        ];

        const VALUES: &[&str] = &[
            r#""gpt""#,
            r#""other\"model""#,
            "true",
            "false",
            "null",
            "0",
            "1",
            "7",
            "2000000",
            "18446744073709551615",
            "18446744073709551616",
            "-1",
            "1.0",
            "1e6",
            r#""5""#,
            "[]",
            r#"[{"role":"user","content":"hi"}]"#,
            "{}",
            r#"{"include_usage":true}"#,
            r#"{"include_usage":false,"x":1}"#,
            r#"{"include_usage":null}"#,
            r#"{"include_usage":true,"include_usage":false}"#,
        ];

        fn body() -> impl Strategy<Value = String> {
            proptest::collection::vec(
                (
                    0..KEYS.len(),
                    0..VALUES.len(),
                    prop_oneof![Just(""), Just(" "), Just("\n")],
                ),
                0..10,
            )
            .prop_map(|members| {
                let inner: Vec<String> = members
                    .into_iter()
                    .map(|(k, v, ws)| format!("{ws}{}{ws}:{ws}{}", KEYS[k], VALUES[v]))
                    .collect();
                format!("{{{}}}", inner.join(","))
            })
        }

        /// What a last-wins reader (serde_json's `Value`, like the upstreams) takes each decided
        /// field to be.
        fn last_wins(body: &serde_json::Value) -> (String, bool, bool, Option<u64>, u64) {
            let bound = ["max_completion_tokens", "max_tokens", "max_output_tokens"]
                .iter()
                .filter_map(|k| body.get(*k).and_then(serde_json::Value::as_u64))
                .max()
                .filter(|&t| t > 0);
            (
                body["model"].as_str().unwrap_or_default().to_owned(),
                body["stream"].as_bool().unwrap_or(false),
                body["stream_options"]["include_usage"]
                    .as_bool()
                    .unwrap_or(false),
                bound,
                body["n"].as_u64().unwrap_or(1),
            )
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            /// Whenever the gateway accepts a body, it reads every decided field as a last-wins
            /// upstream does — in the client's body and in the body sent upstream.
            #[test]
            fn the_view_agrees_with_a_last_wins_reader(body in body()) {
                let Ok(view) = RequestView::parse(body.as_bytes()) else {
                    return Ok(());
                };
                let theirs: serde_json::Value =
                    serde_json::from_str(&body).expect("accepted bodies are JSON");
                let ours = (
                    view.model.clone(),
                    view.stream,
                    view.include_usage,
                    view.max_tokens,
                    view.n,
                );
                prop_assert_eq!(&ours, &last_wins(&theirs), "{}", body);

                let sent: serde_json::Value =
                    serde_json::from_slice(&view.rewrite("up")).expect("rewrite is JSON");
                let (model, stream, include_usage, bound, n) = last_wins(&sent);
                prop_assert_eq!(model, "up");
                prop_assert_eq!((stream, bound, n), (view.stream, view.max_tokens, view.n));
                if view.stream {
                    prop_assert!(include_usage, "{}", body);
                }
            }
        }
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
