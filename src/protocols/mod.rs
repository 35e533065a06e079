//! Client protocols: what the client speaks (ARCHITECTURE.md, "Part two"). Each decodes its
//! request into the pivot ([`crate::pivot::ChatRequest`]) and encodes the pivot's answers,
//! stream chunks and errors back in its own shape. One file per protocol.

use bytes::BytesMut;

pub mod anthropic;
pub mod openai_chat;
pub mod responses;

use crate::error::ApiError;
use crate::pivot::{ChatChunk, ChatRequest, ChatResponse, UpstreamError};
use crate::providers::Usage;

/// What an encoder needs to know about the exchange.
#[derive(Debug, Clone, Default)]
pub struct EncodeCtx {
    /// The model name the client asked for (answers name it, never the upstream's).
    pub client_model: String,
    /// The client asked for usage on the stream (OpenAI chat's `stream_options.include_usage`).
    pub include_usage: bool,
    /// Unix seconds the request arrived.
    pub created: i64,
    /// The id the answer carries, when the gateway assigns it (`resp_…`, `msg_…`).
    pub id: Option<String>,
}

/// A client protocol.
pub trait ClientProtocol: Send + Sync + 'static {
    /// The client's body as the pivot request.
    fn decode_request(&self, body: &[u8]) -> Result<ChatRequest, ApiError>;
    /// A complete answer in the client's shape.
    fn encode_response(&self, resp: &ChatResponse, ctx: &EncodeCtx) -> Vec<u8>;
    /// An encoder for one stream.
    fn stream_encoder(&self, ctx: &EncodeCtx) -> Box<dyn ChunkEncoder>;
    /// An error body in the client's shape (`status` is the HTTP status it goes with).
    fn error_body(&self, status: u16, err: &UpstreamError) -> Vec<u8>;
    /// Its errors are OpenAI's error object: the gateway's own errors go out as the gateway
    /// renders them (`param` included), not re-rendered through [`UpstreamError`].
    fn errors_are_openai(&self) -> bool {
        false
    }
}

/// Writes one stream in the client's protocol, framing included.
pub trait ChunkEncoder: Send {
    /// Before the upstream's first byte (Anthropic's `message_start`, `response.created`): the
    /// client sees the stream open at once.
    fn start(&mut self, out: &mut BytesMut);
    /// One pivot chunk.
    fn chunk(&mut self, chunk: &ChatChunk, out: &mut BytesMut);
    /// The upstream ended normally; `usage` is what it reported.
    fn finish(&mut self, usage: Option<Usage>, out: &mut BytesMut);
    /// The stream failed after it started: tell the client in its shape and end.
    fn fail(&mut self, err: &UpstreamError, out: &mut BytesMut);
    /// The complete object the stream built, for storage (the Responses API's final
    /// `response`); `None` for protocols that store nothing.
    fn final_object(&self) -> Option<serde_json::Value> {
        None
    }
}

/// The client protocol of a `/v1` endpoint, when requests to it can be translated.
pub fn for_endpoint(endpoint: crate::providers::Endpoint) -> Option<&'static dyn ClientProtocol> {
    use crate::providers::Endpoint;
    match endpoint {
        Endpoint::ChatCompletions => Some(&openai_chat::OpenAiChat),
        Endpoint::Messages | Endpoint::CountTokens => Some(&anthropic::AnthropicMessages),
        Endpoint::Responses => Some(&responses::Responses),
        // Completions, embeddings, stored state and the media routes: OpenAI's own, never
        // translated.
        _ => None,
    }
}
