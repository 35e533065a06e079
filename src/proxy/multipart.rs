//! A `multipart/form-data` request (image edits and variations, audio transcriptions and
//! translations): read only as far as its `model` form field, then streamed to the upstream.
//!
//! The gateway needs the model before it can admit and route the request, and the upstream must
//! be told its own name for it, so the body's head is read — part by part, never more than
//! `server.max_body_bytes` — until `model` and the small text fields after it are known (up to the
//! next file part, or the end). That head, with the model's value replaced, goes upstream first;
//! the rest of the body follows as the client sends it, still counted against the limit. The
//! OpenAI SDKs put the text fields before the file (Python) or after it (Node): either way the
//! file is never held beyond the limit, and in the common order not at all.
//!
//! A hand-written scanner rather than a multipart crate: the value's byte range is needed to
//! rewrite it in place, and everything else must reach the upstream byte for byte.

use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use bytes::{Bytes, BytesMut};
use http::HeaderValue;
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;

use crate::error::ApiError;
use crate::proxy::upstream::StreamedBody;

/// Text fields whose values the gateway reads (each at most [`MAX_FIELD_BYTES`]).
const READ_FIELDS: [&str; 4] = ["model", "stream", "n", "response_format"];

/// The largest value of a field in [`READ_FIELDS`].
const MAX_FIELD_BYTES: usize = 1024;

/// The largest block of headers one part may have.
const MAX_PART_HEADERS: usize = 16 * 1024;

/// The head of a multipart body: what was read of it, and the rest still to come.
pub struct Upload {
    /// The raw bytes read so far.
    head: BytesMut,
    /// Where the `model` value is in `head`.
    model_at: Range<usize>,
    /// The text fields in [`READ_FIELDS`] that were read, by name.
    pub fields: Vec<(&'static str, String)>,
    rest: Body,
    /// Bytes of the client's body still allowed after `head`.
    left: usize,
    /// The client's declared body length (no content-encoding), for an exact upstream length.
    declared: Option<u64>,
    pub content_type: HeaderValue,
}

impl Upload {
    pub fn field(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The form's fields as a small JSON object (`model` a string, `stream` a boolean, `n` a
    /// number), for the stages that read a JSON request view.
    pub fn view_json(&self) -> Vec<u8> {
        let mut o = serde_json::Map::new();
        for (name, value) in &self.fields {
            let v = match *name {
                "stream" => match value.trim() {
                    "true" | "True" | "1" => serde_json::Value::Bool(true),
                    _ => serde_json::Value::Bool(false),
                },
                "n" => match value.trim().parse::<u64>() {
                    Ok(n) => n.into(),
                    Err(_) => continue,
                },
                _ => value.clone().into(),
            };
            o.insert((*name).to_owned(), v);
        }
        serde_json::to_vec(&o).unwrap_or_default()
    }

    /// The upstream body: the head with `model` set to `upstream_model`, then the rest as it
    /// arrives. The flag turns true when the client's body ran over the limit on the way.
    pub fn into_body(self, upstream_model: &str) -> (StreamedBody, Arc<AtomicBool>) {
        let mut head = BytesMut::with_capacity(self.head.len() + upstream_model.len());
        head.extend_from_slice(&self.head[..self.model_at.start]);
        head.extend_from_slice(upstream_model.as_bytes());
        head.extend_from_slice(&self.head[self.model_at.end..]);
        let read = self.head.len() as u64;
        let remaining = self
            .declared
            .and_then(|d| d.checked_sub(read))
            .map(|r| r + head.len() as u64);
        let over = Arc::new(AtomicBool::new(false));
        let body = Rest {
            head: Some(head.freeze()),
            inner: self.rest,
            left: self.left,
            remaining,
            over: over.clone(),
        };
        (StreamedBody::new(body), over)
    }
}

/// The boundary of a `multipart/form-data` content type.
fn boundary(content_type: &str) -> Option<String> {
    let mut parts = content_type.split(';');
    let media = parts.next()?.trim();
    if !media.eq_ignore_ascii_case("multipart/form-data") {
        return None;
    }
    for p in parts {
        let (k, v) = p.split_once('=')?;
        if k.trim().eq_ignore_ascii_case("boundary") {
            let v = v.trim().trim_matches('"');
            // RFC 2046: 1 to 70 characters.
            return (1..=70).contains(&v.len()).then(|| v.to_owned());
        }
    }
    None
}

fn malformed(what: &str) -> ApiError {
    ApiError::bad_request(
        "invalid_multipart",
        format!("The multipart/form-data body is malformed: {what}."),
    )
}

/// What one part's headers say.
struct PartHead {
    name: String,
    file: bool,
}

/// `name` and whether a `filename` is given, from a part's header block.
fn part_head(block: &[u8]) -> Result<PartHead, ApiError> {
    let text = std::str::from_utf8(block).map_err(|_| malformed("part headers are not UTF-8"))?;
    for line in text.split("\r\n") {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        if !k.trim().eq_ignore_ascii_case("content-disposition") {
            continue;
        }
        let mut name = None;
        let mut file = false;
        for p in v.split(';').skip(1) {
            let Some((pk, pv)) = p.split_once('=') else {
                continue;
            };
            let pk = pk.trim().to_ascii_lowercase();
            let pv = pv.trim().trim_matches('"');
            match pk.as_str() {
                "name" => name = Some(pv.to_owned()),
                "filename" | "filename*" => file = true,
                _ => {}
            }
        }
        return Ok(PartHead {
            name: name.ok_or_else(|| malformed("a part has no name"))?,
            file,
        });
    }
    Err(malformed("a part has no Content-Disposition"))
}

/// Where the scanner is in the body.
enum At {
    /// Before the first delimiter (a preamble may come first).
    Preamble,
    /// In a part's headers, which start at `start`.
    Headers { start: usize },
    /// In a part's data, from `start`; bytes before `searched` hold no delimiter.
    Data {
        start: usize,
        searched: usize,
        part: PartHead,
    },
}

/// Reads `body` until its `model` field is known and the part after it (or the end) has begun.
/// `limit` bounds the whole body; `timeout_secs` the time this reading may take.
pub async fn read_head(
    headers: &http::HeaderMap,
    body: Body,
    limit: usize,
    timeout_secs: u64,
) -> Result<Upload, ApiError> {
    let content_type = headers
        .get(http::header::CONTENT_TYPE)
        .cloned()
        .unwrap_or_else(|| HeaderValue::from_static(""));
    let Some(boundary) = content_type.to_str().ok().and_then(boundary) else {
        return Err(ApiError::bad_request(
            "invalid_value",
            "This route takes a multipart/form-data body (with a boundary).",
        ));
    };
    let declared = if headers.contains_key(http::header::CONTENT_ENCODING) {
        None
    } else {
        headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    let read = scan(body, boundary.as_bytes(), limit);
    let (head, rest, model_at, fields) =
        match tokio::time::timeout(Duration::from_secs(timeout_secs), read).await {
            Err(_) => return Err(ApiError::RequestTimeout(timeout_secs)),
            Ok(r) => r?,
        };
    Ok(Upload {
        left: limit - head.len(),
        head,
        model_at,
        fields,
        rest,
        declared,
        content_type,
    })
}

type Scanned = (BytesMut, Body, Range<usize>, Vec<(&'static str, String)>);

async fn scan(mut body: Body, boundary: &[u8], limit: usize) -> Result<Scanned, ApiError> {
    let first = [b"--", boundary].concat();
    // Between parts the delimiter follows a line end.
    let delimiter = [b"\r\n--", boundary].concat();
    let mut buf = BytesMut::new();
    let mut at = At::Preamble;
    let mut model_at: Option<Range<usize>> = None;
    let mut fields: Vec<(&'static str, String)> = Vec::new();
    let mut ended = false;
    let mut preamble_from = 0;
    loop {
        // Take every step the bytes at hand allow.
        loop {
            match &mut at {
                At::Preamble => {
                    let found = if buf.starts_with(&first) {
                        Some(0)
                    } else {
                        memchr::memmem::find(&buf[preamble_from..], &delimiter)
                            .map(|i| preamble_from + i + 2)
                    };
                    let Some(i) = found else {
                        // Each byte searched once: only a delimiter's length is searched again.
                        preamble_from = buf.len().saturating_sub(delimiter.len());
                        break;
                    };
                    let after = i + first.len();
                    if buf.len() < after + 2 {
                        break;
                    }
                    if &buf[after..after + 2] == b"--" {
                        ended = true;
                        break;
                    }
                    if &buf[after..after + 2] != b"\r\n" {
                        return Err(malformed("a delimiter is not followed by a line end"));
                    }
                    at = At::Headers { start: after + 2 };
                }
                At::Headers { start } => {
                    let start = *start;
                    let Some(end) = memchr::memmem::find(&buf[start..], b"\r\n\r\n") else {
                        if buf.len() - start > MAX_PART_HEADERS {
                            return Err(malformed("a part's headers are too long"));
                        }
                        break;
                    };
                    if end > MAX_PART_HEADERS {
                        return Err(malformed("a part's headers are too long"));
                    }
                    let part = part_head(&buf[start..start + end])?;
                    if part.file && model_at.is_some() {
                        // The model is known and a file begins: the rest streams.
                        return finish(buf, body, model_at, fields);
                    }
                    let data = start + end + 4;
                    at = At::Data {
                        start: data,
                        searched: data,
                        part,
                    };
                }
                At::Data {
                    start,
                    searched,
                    part,
                } => {
                    let Some(i) = memchr::memmem::find(&buf[*searched..], &delimiter) else {
                        // Keep the last bytes: a delimiter may straddle the next read.
                        *searched = buf.len().saturating_sub(delimiter.len()).max(*searched);
                        if !part.file {
                            let name = part.name.as_str();
                            if READ_FIELDS.contains(&name)
                                && buf.len() - *start > MAX_FIELD_BYTES + delimiter.len()
                            {
                                return Err(ApiError::invalid_param(
                                    name,
                                    format!("The form field `{name}` is too long."),
                                ));
                            }
                        }
                        break;
                    };
                    let end = *searched + i;
                    let after = end + delimiter.len();
                    if buf.len() < after + 2 {
                        // Wait for what follows the delimiter: rescan from it.
                        *searched = end;
                        break;
                    }
                    let value = *start..end;
                    if !part.file
                        && let Some(name) = READ_FIELDS.iter().find(|n| **n == part.name)
                    {
                        if value.len() > MAX_FIELD_BYTES {
                            return Err(ApiError::invalid_param(
                                name,
                                format!("The form field `{name}` is too long."),
                            ));
                        }
                        if fields.iter().any(|(n, _)| n == name) {
                            return Err(ApiError::invalid_param(
                                name,
                                format!("The form field `{name}` is given more than once."),
                            ));
                        }
                        let text = String::from_utf8_lossy(&buf[value.clone()]).into_owned();
                        if *name == "model" {
                            model_at = Some(value);
                        }
                        fields.push((name, text));
                    }
                    if &buf[after..after + 2] == b"--" {
                        ended = true;
                        break;
                    }
                    if &buf[after..after + 2] != b"\r\n" {
                        return Err(malformed("a delimiter is not followed by a line end"));
                    }
                    at = At::Headers { start: after + 2 };
                }
            }
        }
        if ended {
            return finish(buf, body, model_at, fields);
        }
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    if buf.len() + data.len() > limit {
                        return Err(ApiError::PayloadTooLarge);
                    }
                    buf.extend_from_slice(&data);
                }
            }
            Some(Err(e)) => {
                let too_large = e.to_string().contains("length limit");
                return Err(if too_large {
                    ApiError::PayloadTooLarge
                } else {
                    ApiError::bad_request("invalid_body", "Could not read the request body.")
                });
            }
            None => {
                if model_at.is_none() {
                    return Err(missing_model());
                }
                return Err(malformed("the body ends before its closing delimiter"));
            }
        }
    }
}

fn missing_model() -> ApiError {
    ApiError::BadRequest {
        message: "The multipart/form-data body has no `model` field.".into(),
        code: "missing_field",
        param: Some("model".into()),
    }
}

fn finish(
    buf: BytesMut,
    body: Body,
    model_at: Option<Range<usize>>,
    fields: Vec<(&'static str, String)>,
) -> Result<Scanned, ApiError> {
    match model_at {
        Some(m) => Ok((buf, body, m, fields)),
        None => Err(missing_model()),
    }
}

/// The upstream body: the rewritten head, then the client's remaining bytes within the limit.
struct Rest {
    head: Option<Bytes>,
    inner: Body,
    left: usize,
    /// Bytes still to send, when the client declared its length.
    remaining: Option<u64>,
    over: Arc<AtomicBool>,
}

impl http_body::Body for Rest {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if let Some(h) = this.head.take() {
            if let Some(r) = this.remaining.as_mut() {
                *r = r.saturating_sub(h.len() as u64);
            }
            return Poll::Ready(Some(Ok(Frame::data(h))));
        }
        match std::task::ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
            Some(Ok(frame)) => {
                if let Some(d) = frame.data_ref() {
                    if d.len() > this.left {
                        this.over.store(true, Ordering::SeqCst);
                        return Poll::Ready(Some(Err("the request body is over the limit".into())));
                    }
                    this.left -= d.len();
                    if let Some(r) = this.remaining.as_mut() {
                        *r = r.saturating_sub(d.len() as u64);
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => Poll::Ready(Some(Err(Box::new(e)))),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.head.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        match self.remaining {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: &str = "XyZ";

    fn form(parts: &[(&str, bool, &str)]) -> Vec<u8> {
        let mut out = b"preamble to ignore\r\n".to_vec();
        for (name, file, value) in parts {
            let disp = if *file {
                format!(
                    "Content-Disposition: form-data; name=\"{name}\"; filename=\"f.bin\"\r\nContent-Type: application/octet-stream"
                )
            } else {
                format!("content-disposition: form-data; name={name}")
            };
            out.extend_from_slice(format!("--{B}\r\n{disp}\r\n\r\n{value}\r\n").as_bytes());
        }
        out.extend_from_slice(format!("--{B}--\r\n").as_bytes());
        out
    }

    fn headers(len: Option<usize>) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        h.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_str(&format!("multipart/form-data; boundary=\"{B}\"")).unwrap(),
        );
        if let Some(n) = len {
            h.insert(http::header::CONTENT_LENGTH, n.into());
        }
        h
    }

    /// `bytes` as a body arriving `chunk` bytes at a time.
    fn body(bytes: &[u8], chunk: usize) -> Body {
        let pieces: Vec<Result<Bytes, std::io::Error>> = bytes
            .chunks(chunk)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        Body::from_stream(futures_util::stream::iter(pieces))
    }

    async fn upstream_bytes(u: Upload, model: &str) -> (Vec<u8>, Option<u64>) {
        let (b, over) = u.into_body(model);
        let exact = http_body::Body::size_hint(&b).exact();
        let out = b.collect().await.expect("body").to_bytes().to_vec();
        assert!(!over.load(Ordering::SeqCst));
        (out, exact)
    }

    #[tokio::test]
    async fn the_model_is_found_and_renamed_however_the_body_is_split() {
        let sent = form(&[
            ("prompt", false, "a --XyZ lookalike"),
            ("model", false, "whisper-1"),
            ("stream", false, "true"),
            ("file", true, "\r\n-XyZ --XyZ\r\n\r\nbinary"),
            ("language", false, "en"),
        ]);
        let want = String::from_utf8(sent.clone())
            .unwrap()
            .replace("\r\n\r\nwhisper-1\r\n", "\r\n\r\nup-model\r\n");
        for chunk in 1..=sent.len() {
            let u = read_head(&headers(Some(sent.len())), body(&sent, chunk), 1 << 20, 5)
                .await
                .unwrap_or_else(|e| panic!("chunk {chunk}: {:?}", e.parts()));
            assert_eq!(u.field("model"), Some("whisper-1"), "chunk {chunk}");
            assert_eq!(u.field("stream"), Some("true"), "chunk {chunk}");
            assert_eq!(
                serde_json::from_slice::<serde_json::Value>(&u.view_json()).unwrap(),
                serde_json::json!({"model": "whisper-1", "stream": true})
            );
            let (out, exact) = upstream_bytes(u, "up-model").await;
            assert_eq!(String::from_utf8(out).unwrap(), want, "chunk {chunk}");
            assert_eq!(exact, Some(want.len() as u64));
        }
    }

    #[tokio::test]
    async fn a_model_after_the_file_is_found_within_the_limit() {
        let file = "x".repeat(10_000);
        let sent = form(&[("file", true, &file), ("model", false, "m")]);
        let u = read_head(&headers(None), body(&sent, 777), sent.len(), 5)
            .await
            .expect("read");
        let (out, exact) = upstream_bytes(u, "mm").await;
        assert_eq!(out.len(), sent.len() + 1);
        assert_eq!(exact, None, "no declared length, none sent on");
        // One byte less than the body: refused while looking for the model.
        let err = read_head(&headers(None), body(&sent, 777), sent.len() - 1, 5)
            .await
            .err()
            .expect("over the limit");
        assert_eq!(err.parts().0, http::StatusCode::PAYLOAD_TOO_LARGE);
    }

    #[tokio::test]
    async fn the_rest_of_an_upload_is_held_to_the_limit() {
        let file = "y".repeat(5_000);
        let sent = form(&[("model", false, "m"), ("file", true, &file)]);
        let u = read_head(&headers(None), body(&sent, 100), 4_000, 5)
            .await
            .expect("the head fits");
        let (b, over) = u.into_body("m");
        assert!(b.collect().await.is_err(), "the body fails past the limit");
        assert!(over.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn malformed_forms_are_refused() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (form(&[("file", true, "abc")]), "missing_field"),
            (
                form(&[("model", false, "a"), ("model", false, "b")]),
                "invalid_value",
            ),
            (
                form(&[("model", false, &"m".repeat(MAX_FIELD_BYTES + 1))]),
                "invalid_value",
            ),
            (
                format!("--{B}\r\nX-Other: 1\r\n\r\nv\r\n--{B}--").into_bytes(),
                "invalid_multipart",
            ),
            (
                format!(
                    "--{B}\r\nX: {}\r\n\r\nv\r\n--{B}--",
                    "h".repeat(MAX_PART_HEADERS)
                )
                .into_bytes(),
                "invalid_multipart",
            ),
            (
                format!("--{B}\r\ncontent-disposition: form-data; name=model\r\n\r\nm")
                    .into_bytes(),
                "missing_field",
            ),
            (
                format!(
                    "--{B}\r\ncontent-disposition: form-data; name=model\r\n\r\nm\r\n--{B}\r\n"
                )
                .into_bytes(),
                "invalid_multipart",
            ),
            (
                format!("--{B}Xcontent-disposition").into_bytes(),
                "invalid_multipart",
            ),
        ];
        for (sent, code) in cases {
            let err = read_head(&headers(None), body(&sent, 64), 1 << 20, 5)
                .await
                .err()
                .unwrap_or_else(|| panic!("accepted {}", String::from_utf8_lossy(&sent)));
            assert_eq!(
                err.parts().2,
                Some(code),
                "{}",
                String::from_utf8_lossy(&sent)
            );
        }
        let mut h = headers(None);
        h.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        let err = read_head(&h, body(b"{}", 2), 1024, 5)
            .await
            .err()
            .expect("not a form");
        assert_eq!(err.parts().2, Some("invalid_value"));
    }

    #[test]
    fn boundaries_are_read_from_the_content_type() {
        assert_eq!(
            boundary("multipart/form-data; boundary=abc").as_deref(),
            Some("abc")
        );
        assert_eq!(
            boundary("Multipart/Form-Data;charset=utf-8; BOUNDARY=\"a b\"").as_deref(),
            Some("a b")
        );
        assert_eq!(boundary("multipart/mixed; boundary=abc"), None);
        assert_eq!(boundary("multipart/form-data"), None);
        assert_eq!(
            boundary(&format!("multipart/form-data; boundary={}", "b".repeat(71))),
            None
        );
    }
}
