//! OpenAI chat completions as a client protocol, for when the provider speaks something else:
//! the pivot *is* this protocol, so decoding is `serde_json` and encoding renames the model.
//! (An OpenAI client to an OpenAI-compatible provider never comes here: that pair is the
//! zero-copy pass-through of `providers::openai`'s [`crate::providers::Adapter`].)

use bytes::BytesMut;

use super::{ChunkEncoder, ClientProtocol, EncodeCtx};
use crate::error::ApiError;
use crate::pivot::{ChatChunk, ChatRequest, ChatResponse, ChunkAccumulator, UpstreamError};
use crate::providers::Usage;

pub struct OpenAiChat;

/// `data: <json>\n\n`.
pub fn push_data(out: &mut BytesMut, payload: &[u8]) {
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(payload);
    out.extend_from_slice(b"\n\n");
}

/// OpenAI's error body.
pub fn error_json(err: &UpstreamError) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "error": {
            "message": err.message,
            "type": err.kind,
            "param": null,
            "code": err.code,
        }
    }))
    .unwrap_or_default()
}

impl ClientProtocol for OpenAiChat {
    fn decode_request(&self, body: &[u8]) -> Result<ChatRequest, ApiError> {
        serde_json::from_slice(body).map_err(|e| {
            ApiError::bad_request(
                "invalid_json",
                format!("The body is not a valid chat completion request: {e}"),
            )
        })
    }

    fn encode_response(&self, resp: &ChatResponse, ctx: &EncodeCtx) -> Vec<u8> {
        let mut resp = resp.clone();
        resp.model.clone_from(&ctx.client_model);
        if let Some(id) = &ctx.id {
            resp.id.clone_from(id);
        }
        serde_json::to_vec(&resp).unwrap_or_default()
    }

    fn stream_encoder(&self, ctx: &EncodeCtx) -> Box<dyn ChunkEncoder> {
        Box::new(ChatStream {
            ctx: ctx.clone(),
            id: ctx.id.clone(),
            usage_sent: false,
            // Only a completion the gateway stores is added up.
            acc: ctx.id.as_ref().map(|_| ChunkAccumulator::default()),
        })
    }

    fn error_body(&self, _status: u16, err: &UpstreamError) -> Vec<u8> {
        error_json(err)
    }

    fn errors_are_openai(&self) -> bool {
        true
    }
}

struct ChatStream {
    ctx: EncodeCtx,
    id: Option<String>,
    usage_sent: bool,
    acc: Option<ChunkAccumulator>,
}

impl ChunkEncoder for ChatStream {
    fn start(&mut self, _out: &mut BytesMut) {}

    fn chunk(&mut self, chunk: &ChatChunk, out: &mut BytesMut) {
        let mut chunk = chunk.clone();
        chunk.model.clone_from(&self.ctx.client_model);
        match &self.id {
            Some(id) if self.ctx.id.is_some() => chunk.id.clone_from(id),
            None if !chunk.id.is_empty() => self.id = Some(chunk.id.clone()),
            _ => {}
        }
        if let Some(acc) = self.acc.as_mut() {
            acc.push(&chunk);
        }
        if chunk.usage.is_some() {
            if !self.ctx.include_usage {
                chunk.usage = None;
                if chunk.choices.is_empty() {
                    return;
                }
            } else {
                self.usage_sent = true;
            }
        }
        if let Ok(json) = serde_json::to_vec(&chunk) {
            push_data(out, &json);
        }
    }

    fn finish(&mut self, usage: Option<Usage>, out: &mut BytesMut) {
        if self.ctx.include_usage
            && !self.usage_sent
            && let Some(u) = usage
        {
            let chunk = ChatChunk {
                id: self.id.clone().unwrap_or_default(),
                created: self.ctx.created,
                model: self.ctx.client_model.clone(),
                usage: Some(u.into()),
                ..ChatChunk::default()
            };
            if let Ok(json) = serde_json::to_vec(&chunk) {
                push_data(out, &json);
            }
        }
        out.extend_from_slice(b"data: [DONE]\n\n");
    }

    fn fail(&mut self, err: &UpstreamError, out: &mut BytesMut) {
        push_data(out, &error_json(err));
    }

    fn final_object(&self) -> Option<serde_json::Value> {
        let acc = self.acc.clone().filter(|a| !a.overflowed())?;
        serde_json::to_value(acc.finish()).ok()
    }
}
