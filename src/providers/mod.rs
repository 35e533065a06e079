//! Upstream adapters. The hot path talks to an upstream only through [`Adapter`]: URL and auth
//! headers, request body mapping, response body mapping, stream event mapping, usage extraction.
//! `openai` (any OpenAI-compatible API) is the identity mapping; translating adapters (Anthropic,
//! Gemini, Azure) are added as new files implementing the same trait.

pub mod openai;
pub mod scan;

use bytes::Bytes;
use http::HeaderMap;

/// Which OpenAI operation a request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    ChatCompletions,
    Completions,
    Embeddings,
}

impl Endpoint {
    /// Name used in usage records and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ChatCompletions => "chat.completions",
            Self::Completions => "completions",
            Self::Embeddings => "embeddings",
        }
    }

    /// The endpoint served at `path` (`/v1/…`), if any.
    pub fn from_v1_path(path: &str) -> Option<Self> {
        match path {
            "/v1/chat/completions" => Some(Self::ChatCompletions),
            "/v1/completions" => Some(Self::Completions),
            "/v1/embeddings" => Some(Self::Embeddings),
            _ => None,
        }
    }

    /// The full route, `/v1` included.
    pub fn v1_path(self) -> &'static str {
        match self {
            Self::ChatCompletions => "/v1/chat/completions",
            Self::Completions => "/v1/completions",
            Self::Embeddings => "/v1/embeddings",
        }
    }

    /// 0, 1, 2: for per-endpoint arrays.
    pub fn index(self) -> usize {
        match self {
            Self::ChatCompletions => 0,
            Self::Completions => 1,
            Self::Embeddings => 2,
        }
    }

    /// Path below the provider's base URL.
    pub fn path(self) -> &'static str {
        match self {
            Self::ChatCompletions => "/chat/completions",
            Self::Completions => "/completions",
            Self::Embeddings => "/embeddings",
        }
    }

    /// The catalog model type that serves this endpoint.
    pub fn model_type(self) -> &'static str {
        match self {
            Self::ChatCompletions => "chat",
            Self::Completions => "completion",
            Self::Embeddings => "embedding",
        }
    }

    pub fn can_stream(self) -> bool {
        !matches!(self, Self::Embeddings)
    }
}

/// Token counts as an upstream reports them (`prompt` includes `cached`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt: i64,
    pub completion: i64,
    pub cached: i64,
}

/// What an adapter must do for the hot path.
pub trait Adapter: Send + Sync + 'static {
    /// Full upstream URL for `endpoint` under `base_url`.
    fn url(&self, base_url: &str, endpoint: Endpoint) -> String;
    /// Puts the provider key where the upstream expects it.
    fn auth(&self, headers: &mut HeaderMap, provider_key: &str);
    /// The upstream body: the client's request with the upstream model name and, for streams,
    /// usage reporting switched on. Everything else passes through untouched.
    fn map_request(
        &self,
        req: &crate::proxy::request::RequestView<'_>,
        upstream_model: &str,
    ) -> Bytes;
    /// A complete (non-streamed) success body, with `model` reported as the client's name, and
    /// the usage it reports (one parse for both).
    fn map_response(
        &self,
        body: Bytes,
        client_model: &str,
        upstream_model: &str,
    ) -> (Bytes, Option<Usage>);
    /// One streamed event's `data:` payload: its usage, and what the client should see of it.
    fn map_event(&self, data: &[u8], ctx: &EventCtx<'_>) -> MappedEvent;
}

/// What a stream mapping needs to know about the request.
#[derive(Debug, Clone, Copy)]
pub struct EventCtx<'a> {
    pub client_model: &'a str,
    /// `client_model` as a JSON string, encoded once per stream rather than once per event.
    pub client_model_json: &'a [u8],
    pub upstream_model: &'a str,
    /// The client asked for usage (`stream_options.include_usage`); else usage is removed.
    pub client_wants_usage: bool,
}

/// A model name as a JSON string, as the adapters write it into bodies and events.
pub fn model_json(name: &str) -> Vec<u8> {
    serde_json::to_vec(name).unwrap_or_else(|_| b"\"\"".to_vec())
}

/// The result of mapping one event.
#[derive(Debug, Default)]
pub struct MappedEvent {
    pub usage: Option<Usage>,
    pub out: EventOut,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub enum EventOut {
    /// Forward the original bytes.
    #[default]
    Unchanged,
    /// Forward this payload instead (the `data: ` framing is added by the caller).
    Replace(Vec<u8>),
    /// The client must not see this event at all.
    Drop,
}

/// The adapter for a provider `kind`.
pub fn adapter(kind: &str) -> Option<&'static dyn Adapter> {
    match kind {
        "openai" => Some(&openai::OpenAi),
        _ => None,
    }
}
