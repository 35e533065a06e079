//! Azure OpenAI: OpenAI's chat format at Azure's URLs, with Azure's `api-key` header.
//!
//! Bodies, streams and errors are [`super::openai::OpenAi`]'s; only where the request goes and
//! how it authenticates differ:
//! - the provider's `api_version` set: the dated API,
//!   `{resource}/openai/deployments/{deployment}/chat/completions?api-version={v}` (and
//!   `/embeddings`, `/completions`, …); operations that are not per deployment (`/responses`)
//!   are `{resource}/openai{path}?api-version={v}`;
//! - unset: the v1 API, `{resource}/openai/v1/chat/completions`, the deployment as the body's
//!   `model` (the body rewrite already puts the upstream model there).
//!
//! `base_url` is the resource endpoint (`https://<resource>.openai.azure.com`); trailing slashes
//! and a trailing `/openai` or `/openai/v1` (pasted from Azure's samples) are dropped.
//! Azure's `prompt_filter_results` / `content_filter_results` are ignored by the decoders, and
//! chunks that carry only them (no delta, no finish, no usage) are dropped from translated
//! streams. A content-filter refusal (400, `code: "content_filter"`) keeps that code.

use http::{HeaderMap, HeaderValue};

use super::openai::{OpenAi, decode_openai_error};
use super::{ChunkDecoder, Endpoint, Operation, StreamFault, Target, Translator, Usage};
use crate::error::ApiError;
use crate::pivot::{ChatChunk, ChatRequest, ChatResponse, Delta, UpstreamError};
use crate::providers::gemini::percent_encode;

pub struct Azure;

/// The resource endpoint without trailing slashes or an `/openai[/v1]` suffix.
fn resource(base_url: &str) -> &str {
    let b = base_url.trim_end_matches('/');
    let b = b
        .strip_suffix("/openai/v1")
        .or_else(|| b.strip_suffix("/openai"))
        .unwrap_or(b);
    b.trim_end_matches('/')
}

/// The deployment as a path segment, refused when it could leave it.
fn deployment(name: &str) -> Result<String, ApiError> {
    if name.is_empty()
        || name == "."
        || name == ".."
        || name.contains(['/', '\\'])
        || name.chars().any(char::is_control)
    {
        return Err(ApiError::bad_request(
            "invalid_value",
            format!("The upstream model {name:?} is not an Azure deployment name."),
        ));
    }
    Ok(percent_encode(name))
}

/// Operations Azure's dated API serves under `/deployments/{deployment}`.
fn per_deployment(path: &str) -> bool {
    [
        "/chat/completions",
        "/completions",
        "/embeddings",
        "/audio/",
        "/images/",
    ]
    .iter()
    .any(|p| path == *p || (p.ends_with('/') && path.starts_with(p)))
}

/// The Azure URL of an OpenAI operation `path` (`/chat/completions`, `/embeddings`,
/// `/completions`, `/responses`, …, without a query), for the translated path and for the
/// zero-copy pass-through alike.
pub fn operation_url(t: &Target<'_>, path: &str) -> Result<String, ApiError> {
    let base = resource(t.base_url);
    match t.api_version.filter(|v| !v.is_empty()) {
        Some(v) => {
            let v = percent_encode(v);
            if per_deployment(path) {
                let dep = deployment(t.upstream_model)?;
                Ok(format!(
                    "{base}/openai/deployments/{dep}{path}?api-version={v}"
                ))
            } else {
                Ok(format!("{base}/openai{path}?api-version={v}"))
            }
        }
        None => {
            // The deployment travels in the body; still refuse a name no deployment has.
            deployment(t.upstream_model)?;
            Ok(format!("{base}/openai/v1{path}"))
        }
    }
}

/// The URL of a chat or embeddings request.
pub fn chat_url(t: &Target<'_>, op: Operation) -> Result<String, ApiError> {
    match op {
        Operation::Chat => operation_url(t, "/chat/completions"),
        Operation::Embeddings => operation_url(t, "/embeddings"),
        Operation::CountTokens => Err(ApiError::internal(anyhow::anyhow!(
            "an Azure OpenAI upstream cannot count tokens"
        ))),
    }
}

/// The URL of a `/v1` endpoint on the pass-through path.
pub fn endpoint_url(t: &Target<'_>, endpoint: Endpoint) -> Result<String, ApiError> {
    operation_url(t, endpoint.path())
}

/// Puts the provider key in Azure's `api-key` header (and no `Authorization`).
pub fn set_api_key(headers: &mut HeaderMap, provider_key: &str) -> Result<(), ApiError> {
    let mut v = HeaderValue::from_str(provider_key).map_err(|_| {
        ApiError::bad_request(
            "invalid_value",
            "The provider key cannot be sent in a header.",
        )
    })?;
    v.set_sensitive(true);
    headers.remove(http::header::AUTHORIZATION);
    headers.insert("api-key", v);
    Ok(())
}

/// Azure's error code as OpenAI's: Azure echoes the HTTP status as its code (`"401"`, `"429"`)
/// and names a missing deployment `DeploymentNotFound`; an OpenAI client acts on
/// `invalid_api_key`, `rate_limit_exceeded` and `model_not_found`. Other codes
/// (`content_filter`, …) are kept.
fn openai_code(status: u16, code: Option<String>) -> Option<String> {
    match code.as_deref() {
        Some(c) if !c.is_empty() && c.bytes().all(|b| b.is_ascii_digit()) => match status {
            401 => Some("invalid_api_key".into()),
            429 => Some("rate_limit_exceeded".into()),
            _ => None,
        },
        Some("DeploymentNotFound") => Some("model_not_found".into()),
        _ => code,
    }
}

/// OpenAI's chunk stream without Azure's filter-only chunks.
struct AzureStream {
    inner: Box<dyn ChunkDecoder>,
    scratch: Vec<ChatChunk>,
}

impl AzureStream {
    fn keep(&mut self, out: &mut Vec<ChatChunk>) {
        for mut chunk in self.scratch.drain(..) {
            chunk
                .choices
                .retain(|c| c.finish_reason.is_some() || c.delta != Delta::default());
            if !chunk.choices.is_empty() || chunk.usage.is_some() {
                out.push(chunk);
            }
        }
    }
}

impl ChunkDecoder for AzureStream {
    fn push(&mut self, bytes: &[u8], out: &mut Vec<ChatChunk>) -> Result<(), StreamFault> {
        let r = self.inner.push(bytes, &mut self.scratch);
        self.keep(out);
        r
    }

    fn finish(&mut self, out: &mut Vec<ChatChunk>) -> Result<(), StreamFault> {
        let r = self.inner.finish(&mut self.scratch);
        self.keep(out);
        r
    }

    fn usage(&self) -> Option<Usage> {
        self.inner.usage()
    }
}

impl Translator for Azure {
    fn url(&self, t: &Target<'_>, op: Operation, _stream: bool) -> Result<String, ApiError> {
        chat_url(t, op)
    }

    fn headers(
        &self,
        headers: &mut HeaderMap,
        provider_key: &str,
        _t: &Target<'_>,
        _url: &str,
        _body: &[u8],
    ) -> Result<(), ApiError> {
        set_api_key(headers, provider_key)
    }

    fn encode_chat(&self, req: &ChatRequest, t: &Target<'_>) -> Result<Vec<u8>, ApiError> {
        OpenAi.encode_chat(req, t)
    }

    fn decode_chat(&self, body: &[u8], t: &Target<'_>) -> Result<ChatResponse, ApiError> {
        OpenAi.decode_chat(body, t)
    }

    fn usage_of_answer(&self, body: &[u8]) -> Option<Usage> {
        OpenAi.usage_of_answer(body)
    }

    fn chat_stream(&self, t: &Target<'_>, max_event_bytes: usize) -> Box<dyn ChunkDecoder> {
        Box::new(AzureStream {
            inner: OpenAi.chat_stream(t, max_event_bytes),
            scratch: Vec::new(),
        })
    }

    fn decode_error(&self, status: u16, body: &[u8]) -> UpstreamError {
        let mut e = decode_openai_error(status, body);
        e.code = openai_code(e.status, e.code.take());
        e
    }

    fn encode_embeddings(
        &self,
        req: &serde_json::Value,
        t: &Target<'_>,
    ) -> Option<Result<Vec<u8>, ApiError>> {
        OpenAi.encode_embeddings(req, t)
    }

    fn decode_embeddings(
        &self,
        body: &[u8],
        t: &Target<'_>,
    ) -> Result<(serde_json::Value, Option<Usage>), ApiError> {
        OpenAi.decode_embeddings(body, t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pivot::{Message, Role};

    const COMPLETION: &str = include_str!("../../tests/fixtures/azure/chat_completion.json");
    const STREAM: &str = include_str!("../../tests/fixtures/azure/stream.sse");
    const FILTERED: &str = include_str!("../../tests/fixtures/azure/error_content_filter.json");

    fn target<'a>(base: &'a str, deployment: &'a str, version: Option<&'a str>) -> Target<'a> {
        Target {
            base_url: base,
            upstream_model: deployment,
            api_version: version,
            region: None,
            default_max_tokens: 4096,
        }
    }

    #[test]
    fn dated_and_v1_urls() {
        let dated = target(
            "https://res.openai.azure.com/",
            "gpt-4o prod",
            Some("2024-10-21"),
        );
        assert_eq!(
            Azure.url(&dated, Operation::Chat, true).expect("url"),
            "https://res.openai.azure.com/openai/deployments/gpt-4o%20prod/chat/completions?api-version=2024-10-21"
        );
        assert_eq!(
            Azure
                .url(&dated, Operation::Embeddings, false)
                .expect("url"),
            "https://res.openai.azure.com/openai/deployments/gpt-4o%20prod/embeddings?api-version=2024-10-21"
        );
        assert_eq!(
            endpoint_url(&dated, Endpoint::Completions).expect("url"),
            "https://res.openai.azure.com/openai/deployments/gpt-4o%20prod/completions?api-version=2024-10-21"
        );
        assert_eq!(
            operation_url(&dated, "/responses").expect("url"),
            "https://res.openai.azure.com/openai/responses?api-version=2024-10-21"
        );
        let odd_version = target("https://res.openai.azure.com", "d", Some("x&y=z"));
        assert!(
            chat_url(&odd_version, Operation::Chat)
                .expect("url")
                .ends_with("?api-version=x%26y%3Dz")
        );
        for base in [
            "https://res.openai.azure.com",
            "https://res.openai.azure.com//",
            "https://res.openai.azure.com/openai/",
            "https://res.openai.azure.com/openai/v1",
        ] {
            for version in [None, Some("")] {
                let v1 = target(base, "gpt-4o", version);
                assert_eq!(
                    Azure.url(&v1, Operation::Chat, false).expect("url"),
                    "https://res.openai.azure.com/openai/v1/chat/completions",
                    "{base}"
                );
                assert_eq!(
                    endpoint_url(&v1, Endpoint::Embeddings).expect("url"),
                    "https://res.openai.azure.com/openai/v1/embeddings"
                );
            }
        }
        for bad in ["", "..", "a/b", "a\\b"] {
            for version in [None, Some("2024-10-21")] {
                let t = target("https://res.openai.azure.com", bad, version);
                assert!(chat_url(&t, Operation::Chat).is_err(), "{bad:?}");
            }
        }
        assert!(chat_url(&dated, Operation::CountTokens).is_err());
    }

    #[test]
    fn the_key_goes_in_api_key_not_authorization() {
        let mut h = HeaderMap::new();
        h.insert(
            http::header::AUTHORIZATION,
            HeaderValue::from_static("Bearer client"),
        );
        let t = target("https://res.openai.azure.com", "d", None);
        Azure
            .headers(&mut h, "azure-secret", &t, "", b"")
            .expect("headers");
        let v = h.get("api-key").expect("api-key");
        assert_eq!(v, "azure-secret");
        assert!(v.is_sensitive());
        assert!(h.get(http::header::AUTHORIZATION).is_none());
    }

    #[test]
    fn the_pivot_body_round_trips_with_the_deployment_as_model() {
        let req = ChatRequest {
            model: "client-name".into(),
            messages: vec![
                Message::text(Role::System, "Be brief."),
                Message::text(Role::User, "Capital of France?"),
            ],
            stop: vec!["END".into()],
            temperature: Some(0.5),
            n: Some(2),
            stream: true,
            ..ChatRequest::default()
        };
        let t = target("https://res.openai.azure.com", "gpt-4o-prod", None);
        let body = Azure.encode_chat(&req, &t).expect("encodes");
        let back: ChatRequest = serde_json::from_slice(&body).expect("a chat request");
        assert_eq!(back.model, "gpt-4o-prod");
        assert_eq!(back.messages, req.messages);
        assert_eq!(back.stop, req.stop);
        assert_eq!(back.n, Some(2));
        assert!(back.include_usage(), "streams ask for usage");
    }

    #[test]
    fn content_filter_results_do_not_break_decoding() {
        let t = target("https://res.openai.azure.com", "gpt-4o", None);
        let r = Azure
            .decode_chat(COMPLETION.as_bytes(), &t)
            .expect("decodes");
        assert_eq!(
            r.choices[0].message.text_content(),
            "Paris is the capital of France."
        );
        assert_eq!(r.choices[0].finish_reason.as_deref(), Some("stop"));
        let u = r.usage.expect("usage");
        assert_eq!((u.prompt_tokens, u.completion_tokens), (24, 8));
    }

    fn run(text: &[u8], cut: usize) -> (Vec<ChatChunk>, Result<(), StreamFault>, Option<Usage>) {
        let t = target("https://res.openai.azure.com", "gpt-4o", None);
        let mut dec = Azure.chat_stream(&t, 64 * 1024);
        let mut out = Vec::new();
        for piece in [&text[..cut], &text[cut..]] {
            if let Err(e) = dec.push(piece, &mut out) {
                return (out, Err(e), dec.usage());
            }
        }
        let r = dec.finish(&mut out);
        (out, r, dec.usage())
    }

    #[test]
    fn a_stream_drops_filter_only_chunks_and_splits_anywhere() {
        let text = STREAM.as_bytes();
        let (whole, r, usage) = run(text, 0);
        r.expect("a whole stream");
        assert!(
            whole
                .iter()
                .all(|c| !c.choices.is_empty() || c.usage.is_some()),
            "no empty chunk"
        );
        let content: String = whole
            .iter()
            .flat_map(|c| &c.choices)
            .filter_map(|c| c.delta.content.as_deref())
            .collect();
        assert_eq!(content, "Paris.");
        // role chunk, two text chunks, the finish, the usage chunk.
        assert_eq!(whole.len(), 5, "{whole:?}");
        assert_eq!(whole[3].choices[0].finish_reason.as_deref(), Some("stop"));
        assert_eq!(usage.map(|u| (u.prompt, u.completion)), Some((14, 2)));
        for cut in 0..=text.len() {
            let (parts, r, u) = run(text, cut);
            r.expect("split");
            assert_eq!(parts, whole, "cut at {cut}");
            assert_eq!(u, usage);
        }
    }

    #[test]
    fn a_content_filter_refusal_keeps_its_code() {
        let e = Azure.decode_error(400, FILTERED.as_bytes());
        assert_eq!(e.status, 400);
        assert_eq!(e.kind, "invalid_request_error");
        assert_eq!(e.code.as_deref(), Some("content_filter"));
        assert!(e.message.contains("content management policy"));
    }

    #[test]
    fn azure_codes_become_openai_codes() {
        let cases = [
            (
                401,
                r#"{"error": {"code": "401", "message": "Access denied due to invalid subscription key or wrong API endpoint."}}"#,
                "authentication_error",
                Some("invalid_api_key"),
            ),
            (
                429,
                r#"{"error": {"code": "429", "message": "Requests to the ChatCompletions_Create Operation under Azure OpenAI API version 2024-10-21 have exceeded token rate limit of your current OpenAI S0 pricing tier. Please retry after 6 seconds."}}"#,
                "rate_limit_error",
                Some("rate_limit_exceeded"),
            ),
            (
                404,
                r#"{"error": {"code": "DeploymentNotFound", "message": "The API deployment for this resource does not exist."}}"#,
                "invalid_request_error",
                Some("model_not_found"),
            ),
            (
                500,
                r#"{"error": {"code": "500", "message": "Internal server error"}}"#,
                "api_error",
                None,
            ),
        ];
        for (status, body, kind, code) in cases {
            let e = Azure.decode_error(status, body.as_bytes());
            assert_eq!(e.status, status, "{body}");
            assert_eq!(e.kind, kind, "{body}");
            assert_eq!(e.code.as_deref(), code, "{body}");
            assert!(!e.message.is_empty());
        }
    }
}
