//! The top-level members of a JSON object found by one byte scan, for the hot path's edits of
//! upstream bodies (rename `model`, read or drop `usage`) without parsing every value.
//!
//! A streamed answer is hundreds of small events, each of which needs at most two members looked
//! at and one replaced. Parsing each event into raw values with serde cost about 7,000
//! instructions per 250-byte chunk (callgrind); this scan tracks only strings and nesting and
//! copies nothing. Values are not validated: what is not understood goes to the client as the
//! upstream sent it.

/// One top-level member, as spans into the scanned text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Member<'a> {
    /// The key between its quotes, escapes not decoded.
    pub key: &'a [u8],
    /// The value, exactly as written.
    pub value: &'a [u8],
    /// Where the member starts (the key's opening quote) and ends (just after the value).
    pub start: usize,
    pub end: usize,
}

impl Member<'_> {
    /// Whether the key is `name` (a key written with escapes never matches).
    pub fn is(&self, name: &str) -> bool {
        self.key == name.as_bytes()
    }
}

fn skip_ws(text: &[u8], mut i: usize) -> usize {
    while i < text.len() && matches!(text[i], b' ' | b'\t' | b'\n' | b'\r') {
        i += 1;
    }
    i
}

/// `text[i]` is an opening quote: the index just after the closing one.
fn string_end(text: &[u8], i: usize) -> Option<usize> {
    let mut j = i + 1;
    loop {
        j += memchr::memchr2(b'"', b'\\', text.get(j..)?)?;
        if text[j] == b'\\' {
            j += 2;
        } else {
            return Some(j + 1);
        }
    }
}

/// The index just after the value that starts at `text[i]`.
fn value_end(text: &[u8], i: usize) -> Option<usize> {
    match *text.get(i)? {
        b'"' => string_end(text, i),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut j = i;
            while j < text.len() {
                match text[j] {
                    b'"' => {
                        j = string_end(text, j)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(j + 1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
            None
        }
        _ => {
            // A number, true, false or null: up to the next delimiter.
            let len = text[i..]
                .iter()
                .position(|b| matches!(b, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r'))
                .unwrap_or(text.len() - i);
            (len > 0).then_some(i + len)
        }
    }
}

/// The members of the object `text` holds, in order; `None` unless `text` is one object whose
/// structure (quotes, nesting, `key: value` pairs and commas) is whole.
pub fn top_level_members(text: &[u8]) -> Option<Vec<Member<'_>>> {
    let mut i = skip_ws(text, 0);
    if text.get(i) != Some(&b'{') {
        return None;
    }
    let mut members = Vec::with_capacity(8);
    i = skip_ws(text, i + 1);
    if text.get(i) == Some(&b'}') {
        i += 1;
    } else {
        loop {
            if text.get(i) != Some(&b'"') {
                return None;
            }
            let start = i;
            let key_end = string_end(text, i)?;
            i = skip_ws(text, key_end);
            if text.get(i) != Some(&b':') {
                return None;
            }
            let value_start = skip_ws(text, i + 1);
            let end = value_end(text, value_start)?;
            members.push(Member {
                key: &text[start + 1..key_end - 1],
                value: &text[value_start..end],
                start,
                end,
            });
            i = skip_ws(text, end);
            match text.get(i) {
                Some(b',') => i = skip_ws(text, i + 1),
                Some(b'}') => {
                    i += 1;
                    break;
                }
                _ => return None,
            }
        }
    }
    (skip_ws(text, i) == text.len()).then_some(members)
}

/// `text` with the members `edit` answers for changed: `Some(Some(v))` writes `v` as the
/// member's new value, `Some(None)` removes the member with one separating comma, `None` keeps
/// it. Every other byte is copied as it was.
pub fn edit_members<'a, 'v>(
    text: &[u8],
    members: &[Member<'a>],
    mut edit: impl FnMut(&Member<'a>) -> Option<Option<&'v [u8]>>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len() + 32);
    // `text[..copied]` is dealt with.
    let mut copied = 0;
    let mut kept_any = false;
    for (n, m) in members.iter().enumerate() {
        match edit(m) {
            Some(None) if kept_any => {
                // The comma after the previous member goes with this one.
                out.extend_from_slice(&text[copied..members[n - 1].end.max(copied)]);
                copied = m.end;
            }
            Some(None) => {
                // Nothing kept before it: it goes with the comma after it.
                out.extend_from_slice(&text[copied..m.start.max(copied)]);
                copied = members.get(n + 1).map_or(m.end, |next| next.start);
            }
            Some(Some(v)) => {
                out.extend_from_slice(&text[copied..m.end - m.value.len()]);
                out.extend_from_slice(v);
                copied = m.end;
                kept_any = true;
            }
            None => kept_any = true,
        }
    }
    out.extend_from_slice(&text[copied..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(text: &str) -> Option<Vec<(String, String)>> {
        top_level_members(text.as_bytes()).map(|ms| {
            ms.iter()
                .map(|m| {
                    (
                        String::from_utf8_lossy(m.key).into_owned(),
                        String::from_utf8_lossy(m.value).into_owned(),
                    )
                })
                .collect()
        })
    }

    #[test]
    fn finds_members_with_nested_values_and_tricky_strings() {
        let text = r#" { "id" : "a\"}b", "n":-1.5e3,"ok":true,"z":null,
            "choices":[{"delta":{"content":"{[\\\"}"}}],"usage":{"prompt_tokens":3} } "#;
        assert_eq!(
            keys(text).expect("an object"),
            vec![
                ("id".into(), r#""a\"}b""#.into()),
                ("n".into(), "-1.5e3".into()),
                ("ok".into(), "true".into()),
                ("z".into(), "null".into()),
                (
                    "choices".into(),
                    r#"[{"delta":{"content":"{[\\\"}"}}]"#.into()
                ),
                ("usage".into(), r#"{"prompt_tokens":3}"#.into()),
            ]
        );
        assert_eq!(keys("{}"), Some(vec![]));
    }

    #[test]
    fn refuses_what_is_not_one_whole_object() {
        for bad in [
            "",
            "[]",
            "\"x\"",
            "{",
            "{\"a\"}",
            "{\"a\":}",
            "{\"a\":1,}",
            "{\"a\":1 \"b\":2}",
            "{\"a\":\"open}",
            "{\"a\":[1,2}",
            "{\"a\":1}x",
            "{a:1}",
        ] {
            assert_eq!(keys(bad), None, "{bad:?}");
        }
    }

    fn edited(text: &str, rename: Option<&str>, drop: &[&str]) -> String {
        let ms = top_level_members(text.as_bytes()).expect("an object");
        let renamed_to = rename.map(|r| serde_json::to_vec(r).expect("json"));
        let out = edit_members(text.as_bytes(), &ms, |m| {
            if drop.iter().any(|d| m.is(d)) {
                Some(None)
            } else if m.is("model") {
                renamed_to.as_deref().map(Some)
            } else {
                None
            }
        });
        String::from_utf8(out).expect("utf-8")
    }

    #[test]
    fn edits_replace_and_remove_members_keeping_the_rest_byte_for_byte() {
        let text = r#"{"id":"c", "model":"theirs","choices":[],"usage":{"a":1}}"#;
        assert_eq!(
            edited(text, Some("mine"), &[]),
            r#"{"id":"c", "model":"mine","choices":[],"usage":{"a":1}}"#
        );
        assert_eq!(
            edited(text, Some("m\"q"), &["usage"]),
            r#"{"id":"c", "model":"m\"q","choices":[]}"#
        );
        // Removing the first member takes the comma after it; removing all leaves `{}`.
        assert_eq!(
            edited(r#"{"usage":1, "model":"x","b":2}"#, Some("y"), &["usage"]),
            r#"{"model":"y","b":2}"#
        );
        assert_eq!(edited(r#"{"usage":1,"b":2}"#, None, &["usage", "b"]), "{}");
        assert_eq!(
            edited(r#"{"a":1,"usage":2}"#, None, &["usage"]),
            r#"{"a":1}"#
        );
        // Each edit result is still JSON.
        for t in [
            edited(text, Some("mine"), &["usage", "id"]),
            edited(text, None, &["choices"]),
        ] {
            serde_json::from_str::<serde_json::Value>(&t).expect(&t);
        }
    }
}
