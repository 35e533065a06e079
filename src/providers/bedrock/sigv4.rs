//! AWS Signature Version 4, header form, for one request: what Bedrock needs and no more.
//!
//! Hand-written on `sha2` + `hmac` (both already in the tree) rather than `aws-sigv4`, whose
//! dependency set (the smithy runtime, `aws-credential-types`, `time`, a second `sha2`/`hmac`
//! generation) is larger than this file. Checked against AWS's published SigV4 test suite.
//!
//! The canonical URI is the path *as sent on the wire*, percent-encoded once more: AWS services
//! other than S3 double-encode. A Bedrock model id `a.b-v1:0` travels as `a.b-v1%3A0` and is
//! signed as `a.b-v1%253A0`; signing the single-encoded form is the classic
//! "signature does not match" bug.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

/// AWS credentials, borrowed for one signature.
#[derive(Clone, Copy)]
pub struct Credentials<'a> {
    pub access_key_id: &'a str,
    pub secret_access_key: &'a str,
    /// Temporary credentials' token: sent as `x-amz-security-token`, and signed.
    pub session_token: Option<&'a str>,
}

impl std::fmt::Debug for Credentials<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .finish_non_exhaustive()
    }
}

/// The request being signed.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub method: &'a str,
    /// The `Host` header's value: the URL's host, with `:port` when it is not the scheme's default.
    pub host: &'a str,
    /// The path as it goes on the wire (already percent-encoded where the URL needs it).
    pub path: &'a str,
    /// The query string without `?` (empty for none).
    pub query: &'a str,
    /// Further headers to sign, any case (`host`, `x-amz-date` and the token are added here).
    pub headers: &'a [(&'a str, &'a str)],
    pub payload: &'a [u8],
}

/// Where and when a signature is made.
#[derive(Debug, Clone, Copy)]
pub struct Scope<'a> {
    pub region: &'a str,
    pub service: &'a str,
    /// `YYYYMMDD'T'HHMMSS'Z'`, UTC.
    pub amz_date: &'a str,
}

/// A signature and the headers that carry it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signed {
    /// `AWS4-HMAC-SHA256 Credential=…, SignedHeaders=…, Signature=…`.
    pub authorization: String,
    /// The `x-amz-date` header's value.
    pub amz_date: String,
    /// Exposed for tests and debugging: what was hashed.
    pub canonical_request: String,
    pub string_to_sign: String,
}

/// `x-amz-date` for an instant.
pub fn amz_date(at: chrono::DateTime<chrono::Utc>) -> String {
    at.format("%Y%m%dT%H%M%SZ").to_string()
}

/// Percent-encodes everything but RFC 3986's unreserved characters (and `/` when `keep_slash`),
/// as SigV4 requires: uppercase hex, space as `%20`, `~` left alone.
pub fn uri_encode(s: &str, keep_slash: bool) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric()
            || matches!(b, b'-' | b'_' | b'.' | b'~')
            || (keep_slash && b == b'/')
        {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xf)]));
        }
    }
    out
}

/// `%XX` sequences decoded (invalid ones kept as they are).
fn percent_decode(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex_val(b[i + 1]), hex_val(b[i + 2]))
        {
            out.push(h << 4 | l);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// The canonical URI of a non-S3 service: the wire path encoded once more, `/` kept.
pub fn canonical_uri(path: &str) -> String {
    if path.is_empty() {
        return "/".into();
    }
    uri_encode(path, true)
}

/// The canonical query: every `name=value` decoded, re-encoded strictly, sorted.
fn canonical_query(query: &str) -> String {
    let mut pairs: Vec<(String, String)> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            let enc = |s: &str| uri_encode(&String::from_utf8_lossy(&percent_decode(s)), false);
            (enc(k), enc(v))
        })
        .collect();
    pairs.sort();
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

/// A header value as SigV4 canonicalises it: trimmed, runs of spaces collapsed to one.
fn canonical_value(v: &str) -> String {
    v.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let Ok(mut mac) = HmacSha256::new_from_slice(key) else {
        unreachable!("HMAC takes a key of any length")
    };
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// Signs `req` for `scope` with `creds`.
pub fn sign(req: &Request<'_>, creds: &Credentials<'_>, scope: &Scope<'_>) -> Signed {
    let mut headers: Vec<(String, String)> = req
        .headers
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), canonical_value(v)))
        .collect();
    headers.push(("host".into(), canonical_value(req.host)));
    headers.push(("x-amz-date".into(), scope.amz_date.to_owned()));
    if let Some(token) = creds.session_token {
        headers.push(("x-amz-security-token".into(), canonical_value(token)));
    }
    headers.sort();
    // A header named twice is signed once, its values joined by commas.
    let mut merged: Vec<(String, String)> = Vec::with_capacity(headers.len());
    for (k, v) in headers {
        match merged.last_mut() {
            Some((lk, lv)) if *lk == k => {
                lv.push(',');
                lv.push_str(&v);
            }
            _ => merged.push((k, v)),
        }
    }
    let signed_headers = merged
        .iter()
        .map(|(k, _)| k.as_str())
        .collect::<Vec<_>>()
        .join(";");
    let mut canonical_headers = String::new();
    for (k, v) in &merged {
        canonical_headers.push_str(k);
        canonical_headers.push(':');
        canonical_headers.push_str(v);
        canonical_headers.push('\n');
    }
    let canonical_request = format!(
        "{}\n{}\n{}\n{}\n{}\n{}",
        req.method,
        canonical_uri(req.path),
        canonical_query(req.query),
        canonical_headers,
        signed_headers,
        hex::encode(Sha256::digest(req.payload)),
    );
    let date = scope.amz_date.get(..8).unwrap_or(scope.amz_date);
    let credential_scope = format!("{date}/{}/{}/aws4_request", scope.region, scope.service);
    let string_to_sign = format!(
        "AWS4-HMAC-SHA256\n{}\n{credential_scope}\n{}",
        scope.amz_date,
        hex::encode(Sha256::digest(canonical_request.as_bytes())),
    );
    let k_date = hmac(
        format!("AWS4{}", creds.secret_access_key).as_bytes(),
        date.as_bytes(),
    );
    let k_region = hmac(&k_date, scope.region.as_bytes());
    let k_service = hmac(&k_region, scope.service.as_bytes());
    let k_signing = hmac(&k_service, b"aws4_request");
    let signature = hex::encode(hmac(&k_signing, string_to_sign.as_bytes()));
    Signed {
        authorization: format!(
            "AWS4-HMAC-SHA256 Credential={}/{credential_scope}, SignedHeaders={signed_headers}, Signature={signature}",
            creds.access_key_id
        ),
        amz_date: scope.amz_date.to_owned(),
        canonical_request,
        string_to_sign,
    }
}
