//! Fuzz targets for what reads hostile bytes on the hot path (issue 18, "Fuzzing and soak"),
//! as proptest properties on the stable toolchain, one `#[test]` per target:
//!
//! | target | code under test | properties beyond "does not panic" |
//! |---|---|---|
//! | `request_view` | `RequestView::parse`, `RequestView::rewrite` | accepted ⇒ no decided field repeated, and the view agrees with serde_json's last-wins reading; plain valid bodies accepted; the rewrite is JSON the upstream reads the same way |
//! | `sse_scanner` | `SseScanner`, `OpenAi::map_event` | the same events whatever the chunk boundaries; events = the SSE rules' events, byte for byte; usage read as serde_json reads it; usage and the upstream's model name never reach a client that did not ask |
//! | `json_member_scanner` | `scan::top_level_members`, `scan::edit_members` | agrees with serde_json on every object it reads; spans consistent; edits give the JSON they describe |
//! | `rate_limit_headers` | `admit::rate_headers` | one valid header value each, parsing back to the window |
//! | `ssrf_classifier` | `ssrf::is_forbidden`, `ssrf::check_base_url` | agrees with the IANA special-purpose registries, IPv4 embeddings included, whatever the URL spelling |
//!
//! Each target replays its seed corpus (`tests/fuzz/corpus/<target>/`), then mutates it for
//! `TOLLGATE_FUZZ_SECS` seconds (default 2; CI runs 45): see `fuzz/harness.rs`.

#[path = "fuzz/harness.rs"]
mod harness;
#[path = "fuzz/reference.rs"]
mod reference;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use http::{HeaderMap, HeaderValue};
use proptest::prelude::*;
use proptest::sample::Index;

use harness::{Input, check_corpus, corpus, fuzz, inputs};
use tollgate::providers::openai::OpenAi;
use tollgate::providers::{Adapter, EventCtx, EventOut, scan};
use tollgate::proxy::admit::{RateInfo, Window, rate_headers};
use tollgate::proxy::request::RequestView;
use tollgate::proxy::stream::{EventTooLarge, SseScanner};

// ----------------------------------------------------------------------------------------------
// request_view

/// The top-level fields the gateway decides on (issue 18 item 2): the gateway and a last-wins
/// upstream must read each the same way.
const DECIDED: [&str; 7] = [
    "model",
    "stream",
    "max_tokens",
    "max_completion_tokens",
    "max_output_tokens",
    "n",
    "stream_options",
];

const JSON_DICT: &[&[u8]] = &[
    b"\"",
    b"\\",
    b"\\\"",
    b"{",
    b"}",
    b"[",
    b"]",
    b":",
    b",",
    b" ",
    b"\n",
    b"null",
    b"true",
    b"false",
    b"0",
    b"-1",
    b"-0",
    b"1.5",
    b"1e3",
    b"1e999",
    b"4294967296",
    b"18446744073709551615",
    b"18446744073709551616",
    b"\\u0000",
    b"\\ud800",
    b"\\u006d",
    b"\xc3\xa9",
    b"\xff",
    b"\"model\":\"gpt-bench\",",
    b"\"model\":",
    b",\"model\":\"other\"",
    b"\"mod\\u0065l\":\"esc\",",
    b"\"stream\":true,",
    b",\"stream\":false",
    b"\"stream\":\"yes\",",
    b"\"max_tokens\":",
    b"\"max_tokens\":2000000,",
    b",\"max_tokens\":1",
    b"\"max_completion_tokens\":7,",
    b"\"max_output_tokens\":9,",
    b"\"n\":3,",
    b"\"stream_options\":{\"include_usage\":true},",
    b"\"stream_options\":{\"include_usage\":false,\"x\":1},",
    b"{\"include_usage\":true,\"include_usage\":false}",
    b"\"stream_options\":null,",
    b"\"usage\":",
    b"\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":9000000000000000}",
    b"\"choices\":[]",
    b"\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"}}]",
    b"\"prompt_tokens_details\":{\"cached_tokens\":4}",
];

fn check_request_view(body: &[u8]) -> Result<(), String> {
    let parsed = RequestView::parse(body);
    let reference = reference::members(body);
    let Ok(view) = parsed else {
        if let Some(ms) = &reference
            && plainly_valid(ms)
        {
            return Err("refused a plain, valid request body".into());
        }
        return Ok(());
    };
    let ms = reference.ok_or("accepted a body serde_json does not read as one JSON object")?;

    // Issue 18 item 2: a repeated decided field means one thing to the gateway (first) and
    // another to the upstream (last). Fixed by refusing such bodies (helper "proto").
    for k in DECIDED {
        if reference::count(&ms, k) > 1 {
            return Err(format!(
                "DUPLICATE DECIDED FIELD accepted: the body repeats `{k}` (issue 18 item 2)"
            ));
        }
    }
    if let Some(opts) = reference::last(&ms, "stream_options")
        && let Some(inner) = reference::members(opts.get().as_bytes())
        && reference::count(&inner, "include_usage") > 1
    {
        return Err("DUPLICATE DECIDED FIELD accepted: `stream_options.include_usage`".into());
    }

    // The view reads each decided field as serde_json (last-wins) does.
    let model = reference::last(&ms, "model")
        .and_then(|r| serde_json::from_str::<String>(r.get()).ok())
        .ok_or("accepted a body without a string `model`")?;
    if view.model != model {
        return Err(format!(
            "model: view {:?}, serde_json {model:?}",
            view.model
        ));
    }
    let stream = reference::last(&ms, "stream").and_then(reference::value);
    if view.stream != (stream == Some(serde_json::Value::Bool(true))) {
        return Err(format!(
            "stream: view {}, serde_json {stream:?}",
            view.stream
        ));
    }
    let include_usage = reference::last(&ms, "stream_options")
        .and_then(reference::value)
        .and_then(|v| v.get("include_usage").cloned());
    if view.include_usage != (include_usage == Some(serde_json::Value::Bool(true))) {
        return Err(format!(
            "stream_options.include_usage: view {}, serde_json {include_usage:?}",
            view.include_usage
        ));
    }
    // The largest of the three bounds (upstreams differ on which wins), 0 meaning none.
    let max_tokens = ["max_completion_tokens", "max_tokens", "max_output_tokens"]
        .iter()
        .filter_map(|k| {
            reference::last(&ms, k)
                .and_then(reference::value)
                .and_then(|v| v.as_u64())
        })
        .max()
        .filter(|&t| t > 0);
    if view.max_tokens != max_tokens {
        return Err(format!(
            "max tokens: view {:?}, serde_json {max_tokens:?}",
            view.max_tokens
        ));
    }

    // The rewritten body: JSON, the upstream model, usage asked for on streams, every other
    // member as the client wrote it, and read back the same way.
    let out = view.rewrite("upstream-model");
    let om = reference::members(&out).ok_or_else(|| {
        format!(
            "the rewrite is not one JSON object: {:?}",
            Input(out.clone())
        )
    })?;
    for k in DECIDED {
        if reference::count(&om, k) > 1 {
            return Err(format!("the rewrite repeats `{k}`"));
        }
    }
    if reference::last(&om, "model").map(|r| r.get()) != Some("\"upstream-model\"") {
        return Err("the rewrite does not name the upstream model".into());
    }
    if view.stream {
        let asked = reference::last(&om, "stream_options")
            .and_then(reference::value)
            .and_then(|v| v.get("include_usage").cloned());
        if asked != Some(serde_json::Value::Bool(true)) {
            return Err("a streamed rewrite does not ask for usage".into());
        }
    }
    let others = |ms: &[(String, &serde_json::value::RawValue)]| -> Vec<(String, String)> {
        ms.iter()
            .filter(|(k, _)| k != "model" && k != "stream_options")
            .map(|(k, v)| (k.clone(), v.get().to_owned()))
            .collect()
    };
    if others(&ms) != others(&om) {
        return Err("the rewrite changed members other than model and stream_options".into());
    }
    let again = RequestView::parse(&out).map_err(|e| format!("the rewrite is refused: {e:?}"))?;
    if again.model != "upstream-model"
        || again.stream != view.stream
        || again.max_tokens != view.max_tokens
    {
        return Err("the rewrite reads differently from the original".into());
    }
    Ok(())
}

/// A body any version of the gateway must take: one object, each decided field once, `model` a
/// string, `stream` a boolean, `stream_options` an object with at most a boolean
/// `include_usage`, token counts and `n` small positive integers.
fn plainly_valid(ms: &[(String, &serde_json::value::RawValue)]) -> bool {
    use serde_json::Value;
    if DECIDED.iter().any(|k| reference::count(ms, k) > 1) {
        return false;
    }
    let get = |k: &str| reference::last(ms, k).map(reference::value);
    let model_ok = matches!(get("model"), Some(Some(Value::String(_))));
    let stream_ok = matches!(get("stream"), None | Some(Some(Value::Bool(_))));
    let options_ok = match reference::last(ms, "stream_options") {
        None => true,
        Some(raw) => match reference::members(raw.get().as_bytes()) {
            Some(inner) => {
                reference::count(&inner, "include_usage") <= 1
                    && matches!(
                        reference::last(&inner, "include_usage").map(reference::value),
                        None | Some(Some(Value::Bool(_)))
                    )
            }
            None => false,
        },
    };
    let counts_ok = [
        "max_tokens",
        "max_completion_tokens",
        "max_output_tokens",
        "n",
    ]
    .iter()
    .all(|k| match get(k) {
        None => true,
        Some(v) => v
            .and_then(|v| v.as_u64())
            .is_some_and(|n| (1..=1_000_000).contains(&n)),
    });
    model_ok && stream_ok && options_ok && counts_ok
}

/// Request bodies built from parts, so decided fields come repeated, escaped and mistyped.
fn request_bodies() -> BoxedStrategy<Input> {
    let key = prop_oneof![
        8 => proptest::sample::select(DECIDED.to_vec()).prop_map(|k| format!("\"{k}\"")),
        2 => proptest::sample::select(vec!["messages", "input", "temperature", "user", "tools"])
            .prop_map(|k| format!("\"{k}\"")),
        1 => Just("\"mod\\u0065l\"".to_owned()),
        1 => Just("\"max\\u005ftokens\"".to_owned()),
        1 => "[a-z_]{0,12}".prop_map(|k| format!("\"{k}\"")),
    ];
    let value = prop_oneof![
        Just("null".to_owned()),
        Just("true".to_owned()),
        Just("false".to_owned()),
        any::<u32>().prop_map(|n| n.to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<u64>().prop_map(|n| n.to_string()),
        Just("18446744073709551616".to_owned()),
        Just("1e3".to_owned()),
        Just("-0".to_owned()),
        Just("2.5".to_owned()),
        "[a-z0-9 -]{0,10}".prop_map(|s| format!("\"{s}\"")),
        Just("\"gpt-bench\"".to_owned()),
        Just("\"m\\u00e9\\\"q\"".to_owned()),
        Just("[{\"role\":\"user\",\"content\":\"hi\"}]".to_owned()),
        Just("{\"include_usage\":true}".to_owned()),
        Just("{\"include_usage\":false,\"x\":[1]}".to_owned()),
        Just("{\"include_usage\":null}".to_owned()),
        Just("{\"include_usage\":\"yes\"}".to_owned()),
        Just("{\"include_usage\":true,\"include_usage\":false}".to_owned()),
        Just("{}".to_owned()),
        Just("[]".to_owned()),
    ];
    let ws = proptest::sample::select(vec!["", "", " ", "\n  ", "\t"]);
    prop::collection::vec((key, ws, value), 0..9)
        .prop_map(|members| {
            let inner: Vec<String> = members
                .into_iter()
                .map(|(k, ws, v)| format!("{ws}{k}{ws}:{ws}{v}"))
                .collect();
            Input(format!("{{{}}}", inner.join(",")).into_bytes())
        })
        .boxed()
}

#[test]
fn request_view() {
    let seeds = corpus("request_view");
    check_corpus("request_view", &seeds, check_request_view);
    fuzz(
        "request_view",
        prop_oneof![3 => inputs(&seeds, JSON_DICT, 6), 2 => request_bodies()],
        |input| check_request_view(&input.0),
    );
}

/// The sub-case of `request_view` that fails until repeated decided fields are refused
/// (issue 18 item 2): the issue's own body, and each decided field repeated.
#[test]
fn request_view_refuses_repeated_decided_fields() {
    let issue = br#"{"model":"gpt-bench","max_tokens":1,"messages":[{"role":"user","content":"hi"}],"max_tokens":2000000}"#;
    let mut refused_wrongly_accepted = Vec::new();
    if RequestView::parse(issue).is_ok() {
        refused_wrongly_accepted.push("the issue's max_tokens body".to_owned());
    }
    let values = [
        ("model", "\"a\"", "\"b\""),
        ("stream", "false", "true"),
        ("max_tokens", "1", "2000000"),
        ("max_completion_tokens", "1", "2000000"),
        ("max_output_tokens", "1", "2000000"),
        ("n", "1", "128"),
        ("stream_options", "{}", "{\"include_usage\":true}"),
    ];
    for (k, first, second) in values {
        let model = if k == "model" {
            String::new()
        } else {
            "\"model\":\"m\",".to_owned()
        };
        let body = format!("{{{model}\"{k}\":{first},\"messages\":[],\"{k}\":{second}}}");
        if RequestView::parse(body.as_bytes()).is_ok() {
            refused_wrongly_accepted.push(body);
        }
    }
    assert!(
        refused_wrongly_accepted.is_empty(),
        "accepted bodies that repeat a decided field (issue 18 item 2): {refused_wrongly_accepted:#?}"
    );
}

// ----------------------------------------------------------------------------------------------
// sse_scanner (+ the OpenAI event mapper)

const SSE_DICT: &[&[u8]] = &[
    b"\n",
    b"\r",
    b"\r\n",
    b"\n\n",
    b"\r\n\r\n",
    b"\r\r",
    b"data:",
    b"data: ",
    b"data:  ",
    b"data",
    b": keep-alive\n\n",
    b"event: message\n",
    b"id: 7\n",
    b"retry: 10\n",
    b"data: [DONE]\n\n",
    b"[DONE]",
    b"\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":9000000000000000}",
    b"\"usage\":null",
    b"\"usage\":{\"prompt_tokens\":-3,\"prompt_tokens_details\":{\"cached_tokens\":99}}",
    b"\"choices\":[]",
    b"\"model\":\"upstream-model\"",
    b"\"mod\\u0065l\":\"x\"",
    b",",
    b"{",
    b"}",
    b"\"",
    b"\\",
    b"\xc3\xa9",
];

/// The client's model, and the upstream's when the test renames.
const CLIENT_MODEL: &str = "client-model";
const UPSTREAM_MODEL: &str = "upstream-model";

#[derive(Clone, Debug)]
struct SseCase {
    stream: Input,
    /// Chunk boundaries, as positions into the stream.
    cuts: Vec<Index>,
    client_wants_usage: bool,
    rename: bool,
}

type Events = Vec<(Vec<u8>, Option<Vec<u8>>)>;

fn scan_chunks(stream: &[u8], cuts: &[usize]) -> Events {
    scan_capped(stream, cuts, usize::MAX).expect("no cap, no refusal")
}

/// The events of `stream` pushed in the pieces `cuts` makes, with events capped at `max` bytes:
/// `Err` once the scanner refuses one as too large.
fn scan_capped(stream: &[u8], cuts: &[usize], max: usize) -> Result<Events, EventTooLarge> {
    let mut s = SseScanner::new(max);
    let mut out = Vec::new();
    let mut from = 0;
    for &cut in cuts.iter().chain(std::iter::once(&stream.len())) {
        s.push(&stream[from..cut]);
        from = cut;
        while let Some(e) = s.next_event()? {
            out.push(e);
        }
    }
    if s.buffered() > max {
        return Err(EventTooLarge);
    }
    out.extend(s.finish());
    Ok(out
        .into_iter()
        .map(|e| (e.raw.to_vec(), e.data.map(|d| d.to_vec())))
        .collect())
}

fn check_sse(case: &SseCase) -> Result<(), String> {
    let stream = &case.stream.0;
    let whole = scan_chunks(stream, &[]);
    let mut cuts: Vec<usize> = case
        .cuts
        .iter()
        .map(|i| i.index(stream.len() + 1))
        .collect();
    cuts.sort_unstable();
    let chunked = scan_chunks(stream, &cuts);
    if whole != chunked {
        return Err(format!(
            "events depend on chunk boundaries {cuts:?}: whole {} events, chunked {}",
            whole.len(),
            chunked.len()
        ));
    }
    // The event cap: events as large as the largest pass unchanged, whatever the pieces; one
    // byte less and the scanner refuses.
    let largest = whole.iter().map(|(raw, _)| raw.len()).max().unwrap_or(0);
    match scan_capped(stream, &cuts, largest) {
        Ok(capped) if capped == whole => {}
        Ok(_) => return Err(format!("a cap of {largest} bytes changed the events")),
        Err(_) => {
            return Err(format!(
                "a cap of {largest} bytes refused an event that fits"
            ));
        }
    }
    if largest > 0 && scan_capped(stream, &cuts, largest - 1).is_ok() {
        return Err(format!(
            "a {largest}-byte event passed a cap of {}",
            largest - 1
        ));
    }
    let joined: Vec<u8> = whole.iter().flat_map(|(raw, _)| raw.clone()).collect();
    if &joined != stream {
        return Err("the events' bytes are not the stream's bytes".into());
    }
    let expected = reference::sse_events(stream);
    if whole != expected {
        let at = whole
            .iter()
            .zip(&expected)
            .position(|(a, b)| a != b)
            .unwrap_or(whole.len().min(expected.len()));
        return Err(format!(
            "events differ from the SSE rules' at event {at}: scanner {:?}, reference {:?}",
            whole
                .get(at)
                .map(|e| (Input(e.0.clone()), e.1.clone().map(Input))),
            expected
                .get(at)
                .map(|e| (Input(e.0.clone()), e.1.clone().map(Input))),
        ));
    }
    let upstream_model = if case.rename {
        UPSTREAM_MODEL
    } else {
        CLIENT_MODEL
    };
    let client_model_json = serde_json::to_vec(CLIENT_MODEL).map_err(|e| e.to_string())?;
    let ctx = EventCtx {
        client_model: CLIENT_MODEL,
        client_model_json: &client_model_json,
        upstream_model,
        client_wants_usage: case.client_wants_usage,
    };
    for data in whole.iter().filter_map(|(_, d)| d.as_ref()) {
        check_event(data, &ctx).map_err(|why| {
            format!(
                "event {:?} (client_wants_usage={}, rename={}): {why}",
                Input(data.clone()),
                case.client_wants_usage,
                case.rename
            )
        })?;
    }
    Ok(())
}

/// How many top-level members the byte scan sees under `name` (keys as written).
fn raw_key_count(text: &[u8], name: &str) -> Option<usize> {
    scan::top_level_members(text).map(|ms| ms.iter().filter(|m| m.is(name)).count())
}

fn check_event(data: &[u8], ctx: &EventCtx<'_>) -> Result<(), String> {
    let mapped = OpenAi.map_event(data, ctx);
    if let Some(u) = mapped.usage
        && (u.prompt < 0 || u.completion < 0 || u.cached < 0 || u.cached > u.prompt)
    {
        return Err(format!("usage out of range: {u:?}"));
    }
    if data == b"[DONE]" {
        return match (&mapped.out, mapped.usage) {
            (EventOut::Unchanged, None) => Ok(()),
            _ => Err("[DONE] is not passed through unchanged".into()),
        };
    }
    let Some(ms) = reference::members(data) else {
        return Ok(()); // not JSON: passed on or not, nothing to agree on
    };
    if scan::top_level_members(data).is_none() {
        return Err("the member scanner refuses an object serde_json reads".into());
    }
    // Keys written with escapes are not the gateway's to recognise; compare when none is.
    let plain = |name: &str| raw_key_count(data, name) == Some(reference::count(&ms, name));
    if plain("usage") {
        let want = reference::usage(data);
        let got = mapped
            .usage
            .map(|u| (u.prompt, u.completion, u.cached, u.reasoning));
        if got != want {
            return Err(format!("usage: mapper {got:?}, serde_json {want:?}"));
        }
    }
    let forwarded: Option<Vec<u8>> = match &mapped.out {
        EventOut::Unchanged => Some(data.to_vec()),
        EventOut::Replace(v) => Some(v.clone()),
        EventOut::Drop => None,
    };
    let Some(fwd) = forwarded else {
        let choices = reference::last(&ms, "choices").map(reference::value);
        let empty = match choices {
            None | Some(Some(serde_json::Value::Null)) => true,
            Some(Some(serde_json::Value::Array(a))) => a.is_empty(),
            _ => false,
        };
        if ctx.client_wants_usage || mapped.usage.is_none() || !empty {
            return Err("an event was dropped that the client must see".into());
        }
        return Ok(());
    };
    let fm = reference::members(&fwd).ok_or_else(|| {
        format!(
            "the event the client gets is not JSON: {:?}",
            Input(fwd.clone())
        )
    })?;
    if !ctx.client_wants_usage && mapped.usage.is_some() && raw_key_count(&fwd, "usage") != Some(0)
    {
        return Err("usage the client did not ask for reaches it".into());
    }
    if ctx.client_model != ctx.upstream_model && plain("model") {
        for (k, v) in &fm {
            if k == "model" && v.get().as_bytes() != ctx.client_model_json {
                return Err(format!(
                    "the upstream's model name reaches the client: {}",
                    v.get()
                ));
            }
        }
    }
    // Everything else as the upstream wrote it, in order.
    let others = |ms: &[(String, &serde_json::value::RawValue)]| -> Vec<(String, String)> {
        ms.iter()
            .filter(|(k, _)| k != "model" && k != "usage")
            .map(|(k, v)| (k.clone(), v.get().to_owned()))
            .collect()
    };
    if others(&ms) != others(&fm) {
        return Err("the mapper changed members other than model and usage".into());
    }
    Ok(())
}

fn sse_cases(seeds: &[harness::Seed]) -> BoxedStrategy<SseCase> {
    (
        inputs(seeds, SSE_DICT, 6),
        prop::collection::vec(any::<Index>(), 0..12),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(stream, cuts, client_wants_usage, rename)| SseCase {
            stream,
            cuts,
            client_wants_usage,
            rename,
        })
        .boxed()
}

#[test]
fn sse_scanner() {
    let seeds = corpus("sse_scanner");
    for s in &seeds {
        // Each seed whole, byte by byte, and every way of asking for usage and renaming.
        for (client_wants_usage, rename) in
            [(false, false), (false, true), (true, false), (true, true)]
        {
            let case = SseCase {
                stream: Input(s.bytes.clone()),
                cuts: Vec::new(),
                client_wants_usage,
                rename,
            };
            if let Err(why) = check_sse(&case) {
                panic!("sse_scanner: corpus file {} fails: {why}", s.name);
            }
        }
        let bytewise: Vec<usize> = (0..=s.bytes.len()).collect();
        assert_eq!(
            scan_chunks(&s.bytes, &bytewise),
            scan_chunks(&s.bytes, &[]),
            "sse_scanner: corpus file {} read byte by byte",
            s.name
        );
    }
    fuzz("sse_scanner", sse_cases(&seeds), check_sse);
}

// ----------------------------------------------------------------------------------------------
// json_member_scanner

#[derive(Clone, Debug)]
struct MemberCase {
    text: Input,
    /// Per member: 0/1 keep, 2 remove, 3.. replace with `REPLACEMENTS[n - 3]`.
    edits: Vec<u8>,
}

const REPLACEMENTS: [&[u8]; 3] = [b"null", b"{\"x\":[1,\"}\\\"\"]}", b"\"re\\\"placed\""];

fn check_members(case: &MemberCase) -> Result<(), String> {
    let text = &case.text.0;
    let scanned = scan::top_level_members(text);
    let reference = reference::members(text);
    if let Some(ms) = &scanned {
        let mut prev_end = 0;
        for m in ms {
            let ok = m.start >= prev_end
                && m.start < m.end
                && m.end <= text.len()
                && text[m.start] == b'"'
                && text.get(m.start + 1..m.start + 1 + m.key.len()) == Some(m.key)
                && !m.value.is_empty()
                && m.end >= m.value.len()
                && &text[m.end - m.value.len()..m.end] == m.value;
            if !ok {
                return Err(format!("inconsistent member spans: {m:?}"));
            }
            prev_end = m.end;
        }
    }
    let Some(refms) = reference else {
        return Ok(()); // values are not validated: the scan may read what serde_json refuses
    };
    let ms = scanned.ok_or("refuses an object serde_json reads")?;
    if ms.len() != refms.len() {
        return Err(format!("{} members, serde_json {}", ms.len(), refms.len()));
    }
    for (m, (k, v)) in ms.iter().zip(&refms) {
        let mut quoted = Vec::with_capacity(m.key.len() + 2);
        quoted.push(b'"');
        quoted.extend_from_slice(m.key);
        quoted.push(b'"');
        let key: Option<String> = serde_json::from_slice(&quoted).ok();
        if key.as_deref() != Some(k.as_str()) || m.value != v.get().as_bytes() {
            return Err(format!(
                "member {:?}: {:?} differs from serde_json's {k:?}: {}",
                Input(m.key.to_vec()),
                Input(m.value.to_vec()),
                v.get()
            ));
        }
    }
    // Edits: remove some members, replace others; the result is the JSON that says.
    let plan = |n: usize| case.edits.get(n).copied().unwrap_or(0);
    let mut n = 0;
    let out = scan::edit_members(text, &ms, |_| {
        let e = plan(n);
        n += 1;
        match e {
            0 | 1 => None,
            2 => Some(None),
            r => Some(Some(REPLACEMENTS[usize::from(r - 3) % REPLACEMENTS.len()])),
        }
    });
    let want: Vec<(String, String)> = refms
        .iter()
        .enumerate()
        .filter_map(|(i, (k, v))| match plan(i) {
            0 | 1 => Some((k.clone(), v.get().to_owned())),
            2 => None,
            r => Some((
                k.clone(),
                String::from_utf8_lossy(REPLACEMENTS[usize::from(r - 3) % REPLACEMENTS.len()])
                    .into_owned(),
            )),
        })
        .collect();
    let got: Option<Vec<(String, String)>> = reference::members(&out).map(|ms| {
        ms.iter()
            .map(|(k, v)| (k.clone(), v.get().to_owned()))
            .collect()
    });
    if got.as_ref() != Some(&want) {
        return Err(format!(
            "edits {:?} gave {:?}, which is not the JSON {want:?}",
            case.edits,
            Input(out)
        ));
    }
    if case.edits.iter().all(|&e| e <= 1) && &out != text {
        return Err("an edit that changes nothing changed bytes".into());
    }
    Ok(())
}

#[test]
fn json_member_scanner() {
    let seeds = corpus("json_member_scanner");
    check_corpus("json_member_scanner", &seeds, |b| {
        check_members(&MemberCase {
            text: Input(b.to_vec()),
            edits: vec![2, 3, 0, 4, 2, 5],
        })
    });
    let cases = (
        prop_oneof![2 => inputs(&seeds, JSON_DICT, 6), 1 => request_bodies()],
        prop::collection::vec(0u8..6, 0..10),
    )
        .prop_map(|(text, edits)| MemberCase { text, edits });
    fuzz("json_member_scanner", cases, check_members);
}

// ----------------------------------------------------------------------------------------------
// rate_limit_headers

#[derive(Clone, Debug)]
struct RateCase {
    requests: Option<(u32, u32, Duration)>,
    tokens: Option<(u32, u32, Duration)>,
    /// The map already holds headers, some under the names written.
    prefilled: bool,
}

/// `6s`, `1m30s` back to seconds; `None` when not that shape.
fn parse_reset(s: &str) -> Option<u64> {
    let body = s.strip_suffix('s')?;
    let (mins, secs) = match body.split_once('m') {
        Some((m, s)) => (Some(m), s),
        None => (None, body),
    };
    let digits = |t: &str| !t.is_empty() && t.bytes().all(|c| c.is_ascii_digit());
    if !digits(secs) || mins.is_some_and(|m| !digits(m)) {
        return None;
    }
    let secs: u64 = secs.parse().ok()?;
    match mins {
        Some(m) => {
            let m: u64 = m.parse().ok()?;
            (secs < 60 && m > 0).then(|| m.checked_mul(60)?.checked_add(secs))?
        }
        None => (secs < 60).then_some(secs),
    }
}

fn check_rate(case: &RateCase) -> Result<(), String> {
    let mut h = HeaderMap::new();
    if case.prefilled {
        h.insert("content-type", HeaderValue::from_static("application/json"));
        h.append(
            "x-ratelimit-limit-requests",
            HeaderValue::from_static("junk"),
        );
        h.append(
            "x-ratelimit-limit-requests",
            HeaderValue::from_static("junk2"),
        );
        h.append("x-ratelimit-reset-tokens", HeaderValue::from_static("junk"));
    }
    let before = h.clone();
    let window = |w: Option<(u32, u32, Duration)>| {
        w.map(|(limit, remaining, reset)| Window {
            limit,
            remaining,
            reset,
        })
    };
    rate_headers(
        &mut h,
        &RateInfo {
            requests: window(case.requests),
            tokens: window(case.tokens),
        },
    );
    for (kind, w) in [("requests", case.requests), ("tokens", case.tokens)] {
        let names = [
            format!("x-ratelimit-limit-{kind}"),
            format!("x-ratelimit-remaining-{kind}"),
            format!("x-ratelimit-reset-{kind}"),
        ];
        let Some((limit, remaining, reset)) = w else {
            for n in &names {
                let was: Vec<_> = before.get_all(n).iter().collect();
                let now: Vec<_> = h.get_all(n).iter().collect();
                if was != now {
                    return Err(format!("{n} written for a window that did not apply"));
                }
            }
            continue;
        };
        let mut values = Vec::new();
        for n in &names {
            let all: Vec<&HeaderValue> = h.get_all(n).iter().collect();
            let [v] = all.as_slice() else {
                return Err(format!("{n}: {} values", all.len()));
            };
            let s = v.to_str().map_err(|_| format!("{n}: not visible ASCII"))?;
            if s.is_empty() || !s.bytes().all(|c| c.is_ascii_graphic()) {
                return Err(format!("{n}: {s:?} is not a token"));
            }
            values.push(s.to_owned());
        }
        if values[0].parse::<u32>().ok() != Some(limit) {
            return Err(format!("{}: {:?}, want {limit}", names[0], values[0]));
        }
        if values[1].parse::<u32>().ok() != Some(remaining) {
            return Err(format!("{}: {:?}, want {remaining}", names[1], values[1]));
        }
        let secs = parse_reset(&values[2])
            .ok_or_else(|| format!("{}: {:?} is not `1m30s`-shaped", names[2], values[2]))?;
        // Exact for any window a limiter can have (a day and less); beyond, only the shape.
        if reset.as_secs() <= 86_400 {
            let want = reset.as_secs() + u64::from(reset.subsec_nanos() > 0);
            if secs != want {
                return Err(format!("{}: {secs}s, want {want}s ({reset:?})", names[2]));
            }
        }
    }
    if h.get("content-type") != before.get("content-type") {
        return Err("an unrelated header changed".into());
    }
    Ok(())
}

fn durations() -> impl Strategy<Value = Duration> {
    prop_oneof![
        4 => (0u64..=120, 0u32..1_000_000_000).prop_map(|(s, n)| Duration::new(s, n)),
        2 => (0u64..=86_400, 0u32..1_000_000_000).prop_map(|(s, n)| Duration::new(s, n)),
        1 => proptest::sample::select(vec![
            Duration::ZERO,
            Duration::from_nanos(1),
            Duration::from_secs(59),
            Duration::new(59, 1),
            Duration::from_secs(60),
            Duration::new(60, 999_999_999),
            Duration::from_secs(86_400),
            Duration::MAX,
        ]),
        1 => (any::<u64>(), 0u32..1_000_000_000).prop_map(|(s, n)| Duration::new(s, n)),
    ]
}

fn windows() -> impl Strategy<Value = Option<(u32, u32, Duration)>> {
    let n = prop_oneof![
        2 => any::<u32>(),
        1 => Just(0u32),
        1 => Just(u32::MAX),
        2 => 0u32..100,
    ];
    proptest::option::of((n.clone(), n, durations()))
}

#[test]
fn rate_limit_headers() {
    let seeds = corpus("rate_limit_headers");
    // Seeds: `limit remaining secs nanos` per line, `-` for a window that does not apply;
    // two lines (requests, tokens) per file.
    for s in &seeds {
        let text = String::from_utf8_lossy(&s.bytes);
        let mut lines = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty());
        let mut next = || -> Option<(u32, u32, Duration)> {
            let l = lines.next().unwrap_or("-");
            let f: Vec<&str> = l.split_whitespace().collect();
            match f.as_slice() {
                [l, r, s, n] => Some((
                    l.parse().expect("limit"),
                    r.parse().expect("remaining"),
                    Duration::new(s.parse().expect("secs"), n.parse().expect("nanos")),
                )),
                _ => None,
            }
        };
        let (requests, tokens) = (next(), next());
        for prefilled in [false, true] {
            let case = RateCase {
                requests,
                tokens,
                prefilled,
            };
            if let Err(why) = check_rate(&case) {
                panic!("rate_limit_headers: corpus file {} fails: {why}", s.name);
            }
        }
    }
    let cases =
        (windows(), windows(), any::<bool>()).prop_map(|(requests, tokens, prefilled)| RateCase {
            requests,
            tokens,
            prefilled,
        });
    fuzz("rate_limit_headers", cases, check_rate);
}

// ----------------------------------------------------------------------------------------------
// ssrf_classifier

/// Ranges whose insides and edges are generated often: the registries' entries and neighbours.
const V4_RANGES: &[&str] = &[
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.0.2.0/24",
    "192.31.196.0/24",
    "192.52.193.0/24",
    "192.88.99.0/24",
    "192.168.0.0/16",
    "192.175.48.0/24",
    "198.18.0.0/15",
    "198.51.100.0/24",
    "203.0.113.0/24",
    "224.0.0.0/4",
    "240.0.0.0/4",
    "8.8.8.0/24",
];

const V6_RANGES: &[&str] = &[
    "::/96",
    "::ffff:0:0/96",
    "::ffff:0:0:0/96",
    "64:ff9b::/96",
    "64:ff9b:1::/48",
    "100::/64",
    "2001::/23",
    "2001::/32",
    "2001:2::/48",
    "2001:db8::/32",
    "2002::/16",
    "2606:4700::/32",
    "2001:40::/26",
    "4000::/3",
    "::/8",
    "3fff::/20",
    "5f00::/16",
    "fc00::/7",
    "fe80::/10",
    "fec0::/10",
    "ff00::/8",
];

fn v4_in(net: &str, r: u32, edge: u8) -> Ipv4Addr {
    let net: ipnet::Ipv4Net = net.parse().expect("range");
    let lo = u32::from(net.network());
    let hi = u32::from(net.broadcast());
    Ipv4Addr::from(match edge {
        0 => lo,
        1 => hi,
        2 => lo.wrapping_sub(1),
        3 => hi.wrapping_add(1),
        _ => lo | (r & !u32::from(net.netmask())),
    })
}

fn v6_in(net: &str, r: u128, edge: u8) -> Ipv6Addr {
    let net: ipnet::Ipv6Net = net.parse().expect("range");
    let lo = u128::from(net.network());
    let hi = u128::from(net.broadcast());
    Ipv6Addr::from(match edge {
        0 => lo,
        1 => hi,
        2 => lo.wrapping_sub(1),
        3 => hi.wrapping_add(1),
        _ => lo | (r & !u128::from(net.netmask())),
    })
}

fn v4s() -> BoxedStrategy<Ipv4Addr> {
    prop_oneof![
        1 => any::<u32>().prop_map(Ipv4Addr::from),
        3 => (proptest::sample::select(V4_RANGES), any::<u32>(), 0u8..8)
            .prop_map(|(n, r, e)| v4_in(n, r, e)),
    ]
    .boxed()
}

fn ips() -> impl Strategy<Value = IpAddr> {
    let embed = |prefix: u128, shift: u32| {
        move |v4: Ipv4Addr| Ipv6Addr::from(prefix | (u128::from(u32::from(v4)) << shift))
    };
    prop_oneof![
        2 => v4s().prop_map(IpAddr::V4),
        1 => any::<u128>().prop_map(|n| IpAddr::V6(Ipv6Addr::from(n))),
        3 => (proptest::sample::select(V6_RANGES), any::<u128>(), 0u8..8)
            .prop_map(|(n, r, e)| IpAddr::V6(v6_in(n, r, e))),
        // IPv4 embeddings: mapped, compatible, SIIT, NAT64 (well-known and local-use), 6to4.
        1 => v4s().prop_map(|v4| IpAddr::V6(v4.to_ipv6_mapped())),
        1 => v4s().prop_map(move |v4| IpAddr::V6(embed(0, 0)(v4))),
        1 => v4s().prop_map(move |v4| IpAddr::V6(embed(0xffff << 32, 0)(v4))),
        1 => v4s().prop_map(move |v4| IpAddr::V6(embed(0x0064_ff9b << 96, 0)(v4))),
        1 => v4s().prop_map(move |v4| IpAddr::V6(embed(0x0064_ff9b_0001 << 80, 0)(v4))),
        1 => (v4s(), any::<u128>()).prop_map(move |(v4, r)| {
            IpAddr::V6(embed((0x2002 << 112) | (r & ((1 << 80) - 1)), 80)(v4))
        }),
    ]
}

/// The ways a base URL can spell the address (the WHATWG parser reads them all the same).
fn spellings(ip: IpAddr) -> Vec<String> {
    match ip {
        IpAddr::V4(v4) => {
            let n = u32::from(v4);
            let [a, b, c, d] = v4.octets();
            vec![
                format!("http://{v4}/v1"),
                format!("https://{n}/"),
                format!("http://0x{n:x}:8080/v1"),
                format!(
                    "http://{a}.{}/",
                    u32::from(b) << 16 | u32::from(c) << 8 | u32::from(d)
                ),
                format!("http://0{a:o}.0x{b:x}.{c}.{d}/"),
                format!("http://[::ffff:{v4}]/"),
            ]
        }
        IpAddr::V6(v6) => vec![format!("http://[{v6}]/v1"), format!("https://[{v6}]:443/")],
    }
}

fn check_ssrf(ip: &IpAddr, rt: &tokio::runtime::Runtime) -> Result<(), String> {
    let got = tollgate::ssrf::is_forbidden(*ip);
    match reference::verdict(*ip) {
        reference::Verdict::Forbidden(why) if !got => {
            return Err(format!("{ip} is allowed; it must be refused: {why}"));
        }
        reference::Verdict::Public if got => {
            return Err(format!("{ip} is refused; it is a public address"));
        }
        _ => {}
    }
    for url in spellings(*ip) {
        let checked = rt.block_on(tollgate::ssrf::check_base_url(&url, false));
        let refused = checked == Err(tollgate::ssrf::BaseUrlError::Private);
        // The URL's address is the classifier's (or, for the mapped spelling, the IPv4 one's).
        let judged = match (ip, url.contains("[::ffff:")) {
            (IpAddr::V4(v4), true) => tollgate::ssrf::is_forbidden(IpAddr::V6(v4.to_ipv6_mapped())),
            _ => got,
        };
        if refused != judged {
            return Err(format!(
                "{url}: check_base_url says {checked:?}, the classifier says forbidden={judged}"
            ));
        }
        if !refused && checked.is_err() {
            return Err(format!("{url}: refused for another reason: {checked:?}"));
        }
    }
    Ok(())
}

#[test]
fn ssrf_classifier() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let seeds = corpus("ssrf_classifier");
    for s in &seeds {
        for line in String::from_utf8_lossy(&s.bytes).lines() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let ip: IpAddr = line
                .parse()
                .unwrap_or_else(|_| panic!("{}: {line:?} is not an address", s.name));
            if let Err(why) = check_ssrf(&ip, &rt) {
                panic!("ssrf_classifier: corpus file {} fails: {why}", s.name);
            }
        }
    }
    fuzz("ssrf_classifier", ips(), |ip| check_ssrf(ip, &rt));
}

/// The sub-case of `ssrf_classifier` that fails until the classifier refuses IPv6 forms of
/// internal addresses it let through (issue 18 item 12): SIIT embeddings of private IPv4
/// addresses, and the registry's internal-use ranges (benchmarking, the 2024 documentation
/// prefix, SRv6 SIDs). The addresses are `corpus/ssrf_classifier/siit_and_new_ranges.txt`.
#[test]
fn ssrf_classifier_refuses_siit_and_internal_ranges() {
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fuzz/corpus/ssrf_classifier/siit_and_new_ranges.txt"),
    )
    .expect("corpus file");
    let allowed: Vec<&str> = text
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .filter(|l| !tollgate::ssrf::is_forbidden(l.parse().expect("address")))
        .collect();
    assert!(
        allowed.is_empty(),
        "allowed as upstream addresses, must be refused: {allowed:?}"
    );
}
