//! Upstream adapters. The hot path talks to an upstream only through [`Adapter`]: URL and auth
//! headers, request body mapping, response body mapping, stream event mapping, usage extraction.
//! `openai` (any OpenAI-compatible API) is the identity mapping; translating adapters (Anthropic,
//! Gemini, Azure) are added as new files implementing the same trait.

pub mod anthropic;
pub mod azure;
pub mod bedrock;
pub mod embeddings;
pub mod gemini;
pub mod openai;
pub mod scan;

use bytes::Bytes;
use http::HeaderMap;

/// Which `/v1` operation a request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    ChatCompletions,
    Completions,
    Embeddings,
    /// OpenAI's Responses API (`POST /v1/responses`).
    Responses,
    /// Anthropic's Messages API.
    Messages,
    /// Anthropic's `/v1/messages/count_tokens`.
    CountTokens,
    /// The Conversations API (`/v1/conversations…`): stored state, no upstream.
    Conversations,
    /// `GET/DELETE /v1/responses/{id}…`: stored state, no upstream.
    StoredResponses,
    /// `GET/POST/DELETE /v1/chat/completions/{id}…`, `GET /v1/chat/completions`: stored state.
    StoredCompletions,
    /// `POST /v1/images/generations` (JSON).
    ImageGenerations,
    /// `POST /v1/images/edits` (multipart).
    ImageEdits,
    /// `POST /v1/images/variations` (multipart).
    ImageVariations,
    /// `POST /v1/audio/speech`: JSON in, audio bytes out.
    AudioSpeech,
    /// `POST /v1/audio/transcriptions` (multipart).
    AudioTranscriptions,
    /// `POST /v1/audio/translations` (multipart).
    AudioTranslations,
    /// `POST /v1/moderations`.
    Moderations,
    /// `GET /v1/realtime`: OpenAI's Realtime API, a WebSocket relayed both ways
    /// (`proxy::realtime`); one usage record per `response.done`.
    Realtime,
}

impl Endpoint {
    /// Every endpoint, in [`Endpoint::index`] order.
    pub const ALL: [Self; 17] = [
        Self::ChatCompletions,
        Self::Completions,
        Self::Embeddings,
        Self::Responses,
        Self::Messages,
        Self::CountTokens,
        Self::Conversations,
        Self::StoredResponses,
        Self::StoredCompletions,
        Self::ImageGenerations,
        Self::ImageEdits,
        Self::ImageVariations,
        Self::AudioSpeech,
        Self::AudioTranscriptions,
        Self::AudioTranslations,
        Self::Moderations,
        Self::Realtime,
    ];
    pub const COUNT: usize = Self::ALL.len();

    /// The endpoints a `POST` to their exact path proxies to an upstream.
    pub const PROXIED: [Self; 13] = [
        Self::ChatCompletions,
        Self::Completions,
        Self::Embeddings,
        Self::Responses,
        Self::Messages,
        Self::CountTokens,
        Self::ImageGenerations,
        Self::ImageEdits,
        Self::ImageVariations,
        Self::AudioSpeech,
        Self::AudioTranscriptions,
        Self::AudioTranslations,
        Self::Moderations,
    ];

    /// Name used in usage records and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ChatCompletions => "chat.completions",
            Self::Completions => "completions",
            Self::Embeddings => "embeddings",
            Self::Responses => "responses",
            Self::Messages => "messages",
            Self::CountTokens => "messages.count_tokens",
            Self::Conversations => "conversations",
            Self::StoredResponses => "responses.stored",
            Self::StoredCompletions => "chat.completions.stored",
            Self::ImageGenerations => "images.generations",
            Self::ImageEdits => "images.edits",
            Self::ImageVariations => "images.variations",
            Self::AudioSpeech => "audio.speech",
            Self::AudioTranscriptions => "audio.transcriptions",
            Self::AudioTranslations => "audio.translations",
            Self::Moderations => "moderations",
            Self::Realtime => "realtime",
        }
    }

    /// The proxied endpoint a `POST` to `path` (`/v1/…`) is, if any.
    pub fn from_v1_path(path: &str) -> Option<Self> {
        Self::PROXIED.into_iter().find(|e| e.v1_path() == path)
    }

    /// The full route, `/v1` included (the collection's, for stored state).
    pub fn v1_path(self) -> &'static str {
        match self {
            Self::ChatCompletions | Self::StoredCompletions => "/v1/chat/completions",
            Self::Completions => "/v1/completions",
            Self::Embeddings => "/v1/embeddings",
            Self::Responses | Self::StoredResponses => "/v1/responses",
            Self::Messages => "/v1/messages",
            Self::CountTokens => "/v1/messages/count_tokens",
            Self::Conversations => "/v1/conversations",
            Self::ImageGenerations => "/v1/images/generations",
            Self::ImageEdits => "/v1/images/edits",
            Self::ImageVariations => "/v1/images/variations",
            Self::AudioSpeech => "/v1/audio/speech",
            Self::AudioTranscriptions => "/v1/audio/transcriptions",
            Self::AudioTranslations => "/v1/audio/translations",
            Self::Moderations => "/v1/moderations",
            Self::Realtime => "/v1/realtime",
        }
    }

    /// Position in [`Endpoint::ALL`]: for per-endpoint arrays.
    pub fn index(self) -> usize {
        self as usize
    }

    /// Path below an OpenAI-compatible provider's base URL (`""` for stored state, which never
    /// goes upstream).
    pub fn path(self) -> &'static str {
        match self {
            Self::ChatCompletions => "/chat/completions",
            Self::Completions => "/completions",
            Self::Embeddings => "/embeddings",
            Self::Responses => "/responses",
            Self::Messages => "/messages",
            Self::CountTokens => "/messages/count_tokens",
            Self::Conversations | Self::StoredResponses | Self::StoredCompletions => "",
            Self::ImageGenerations => "/images/generations",
            Self::ImageEdits => "/images/edits",
            Self::ImageVariations => "/images/variations",
            Self::AudioSpeech => "/audio/speech",
            Self::AudioTranscriptions => "/audio/transcriptions",
            Self::AudioTranslations => "/audio/translations",
            Self::Moderations => "/moderations",
            Self::Realtime => "/realtime",
        }
    }

    /// The catalog model type that serves this endpoint (`""` for stored state: no model).
    pub fn model_type(self) -> &'static str {
        match self {
            Self::ChatCompletions | Self::Responses | Self::Messages | Self::CountTokens => "chat",
            Self::Completions => "completion",
            Self::Embeddings => "embedding",
            Self::Conversations | Self::StoredResponses | Self::StoredCompletions => "",
            Self::ImageGenerations | Self::ImageEdits | Self::ImageVariations => "image",
            Self::AudioSpeech | Self::AudioTranscriptions | Self::AudioTranslations => "audio",
            Self::Moderations => "moderation",
            Self::Realtime => "realtime",
        }
    }

    /// The body is `multipart/form-data` (files), streamed to the upstream rather than read
    /// whole; its `model` is a form field.
    pub fn multipart(self) -> bool {
        matches!(
            self,
            Self::ImageEdits
                | Self::ImageVariations
                | Self::AudioTranscriptions
                | Self::AudioTranslations
        )
    }

    /// Images, audio and moderations: passed through to OpenAI-compatible upstreams only, and
    /// metered in the units spec §8 names when the upstream reports no tokens.
    pub fn media(self) -> bool {
        matches!(
            self,
            Self::ImageGenerations
                | Self::ImageEdits
                | Self::ImageVariations
                | Self::AudioSpeech
                | Self::AudioTranscriptions
                | Self::AudioTranslations
                | Self::Moderations
        )
    }

    pub fn can_stream(self) -> bool {
        matches!(
            self,
            Self::ChatCompletions
                | Self::Completions
                | Self::Responses
                | Self::Messages
                | Self::ImageGenerations
                | Self::ImageEdits
                | Self::AudioTranscriptions
        )
    }

    /// Errors on this route have Anthropic's shape.
    pub fn anthropic_errors(self) -> bool {
        matches!(self, Self::Messages | Self::CountTokens)
    }
}

/// Token counts as an upstream reports them, one struct for every provider: `prompt` includes
/// `cached` (read from the provider's cache) and `cache_write` (written to it); `completion`
/// includes `reasoning`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt: i64,
    pub completion: i64,
    pub cached: i64,
    pub cache_write: i64,
    pub reasoning: i64,
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

/// What a translating provider needs to know beyond the pivot request.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    /// The provider's `base_url` (or the user's own), ending at the API's version path.
    pub base_url: &'a str,
    /// The model name the upstream knows (Azure: the deployment).
    pub upstream_model: &'a str,
    /// Azure's `api-version` (the `/openai/v1/` API when unset).
    pub api_version: Option<&'a str>,
    /// Bedrock's AWS region.
    pub region: Option<&'a str>,
    /// Sent where the upstream requires an output bound and the client gave none (Anthropic's
    /// `max_tokens`): the model's `max_output_tokens`, else 4096.
    pub default_max_tokens: u64,
}

/// An operation a translating provider may serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Chat,
    Embeddings,
    /// Anthropic's `/v1/messages/count_tokens`.
    CountTokens,
}

/// Something went wrong inside an upstream stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamFault {
    /// One event (or frame) is larger than `upstream.max_sse_event_bytes`.
    TooLarge,
    /// The upstream reported an error in the stream (Anthropic's `event: error`, a Bedrock
    /// exception frame, …).
    Upstream(crate::pivot::UpstreamError),
    /// The upstream sent something that is not its protocol.
    Malformed(String),
}

/// A provider reached through the pivot (`providers/<kind>.rs`): it encodes the OpenAI chat
/// request into its own and decodes its answers, streams, usage and errors back.
pub trait Translator: Send + Sync + 'static {
    /// The full upstream URL of `op`.
    fn url(
        &self,
        t: &Target<'_>,
        op: Operation,
        stream: bool,
    ) -> Result<String, crate::error::ApiError>;
    /// Auth and protocol headers (`content-type` is set by the caller). `url` and `body` are the
    /// exact request, for providers that sign it (Bedrock, SigV4).
    fn headers(
        &self,
        headers: &mut HeaderMap,
        provider_key: &str,
        t: &Target<'_>,
        url: &str,
        body: &[u8],
    ) -> Result<(), crate::error::ApiError>;
    /// The upstream body of a chat request. A feature the upstream cannot serve is a 400 that
    /// names it (`unsupported_tool`, `n` above 1, …).
    fn encode_chat(
        &self,
        req: &crate::pivot::ChatRequest,
        t: &Target<'_>,
    ) -> Result<Vec<u8>, crate::error::ApiError>;
    /// A complete chat answer, usage included (`usage` `None` only when the upstream gave none).
    fn decode_chat(
        &self,
        body: &[u8],
        t: &Target<'_>,
    ) -> Result<crate::pivot::ChatResponse, crate::error::ApiError>;
    /// The usage a complete answer reports, read on its own: an answer [`Self::decode_chat`]
    /// refused (not the provider's shape) is metered from what it reports, not estimated.
    fn usage_of_answer(&self, _body: &[u8]) -> Option<Usage> {
        None
    }
    /// A decoder for one chat stream.
    fn chat_stream(&self, t: &Target<'_>, max_event_bytes: usize) -> Box<dyn ChunkDecoder>;
    /// An upstream error answer in neutral terms (status mapped for OpenAI routes).
    fn decode_error(&self, status: u16, body: &[u8]) -> crate::pivot::UpstreamError;
    /// The upstream body of an OpenAI embeddings request (`None`: this kind has no embeddings).
    fn encode_embeddings(
        &self,
        _req: &serde_json::Value,
        _t: &Target<'_>,
    ) -> Option<Result<Vec<u8>, crate::error::ApiError>> {
        None
    }
    /// An OpenAI embeddings response (`{object: "list", data, model, usage}`) from the upstream's.
    fn decode_embeddings(
        &self,
        _body: &[u8],
        _t: &Target<'_>,
    ) -> Result<(serde_json::Value, Option<Usage>), crate::error::ApiError> {
        Err(crate::error::ApiError::internal(anyhow::anyhow!(
            "this provider has no embeddings"
        )))
    }
}

/// Turns one upstream stream into pivot chunks. Fed the raw bytes as they arrive (it does its
/// own framing: SSE, or AWS event-stream frames), bounded by the limit it was made with.
pub trait ChunkDecoder: Send {
    /// Bytes in; the chunks they complete appended to `out`.
    fn push(
        &mut self,
        bytes: &[u8],
        out: &mut Vec<crate::pivot::ChatChunk>,
    ) -> Result<(), StreamFault>;
    /// The upstream ended: whatever is left. `Err` when it ended before its protocol's end
    /// (the client is then told the answer is incomplete).
    fn finish(&mut self, out: &mut Vec<crate::pivot::ChatChunk>) -> Result<(), StreamFault>;
    /// The usage the stream reported so far (cumulative where the protocol is).
    fn usage(&self) -> Option<Usage>;
}

/// The translator for a provider `kind`, when it has one.
pub fn translator(kind: &str) -> Option<&'static dyn Translator> {
    match kind {
        "openai" => Some(&openai::OpenAi),
        "anthropic" => Some(&anthropic::Anthropic),
        "azure" => Some(&azure::Azure),
        "bedrock" => Some(&bedrock::Bedrock),
        "gemini" => Some(&gemini::Gemini),
        _ => None,
    }
}
