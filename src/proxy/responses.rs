//! `POST /v1/responses` after admission (spec §8, §9): the history (`previous_response_id`,
//! `conversation`) comes from tollgate's own tables; a Responses-capable upstream gets the full
//! input statelessly (`store: false`), any other is reached through the pivot; the answer is
//! stored when the client asked (`store`, default true).

use axum::response::Response;
use bytes::Bytes;
use secrecy::ExposeSecret;

use crate::error::ApiError;
use crate::pivot::{ChatRequest, ChatResponse, UpstreamError};
use crate::protocols::responses::{self as proto, Item, ResponseCtx, ResponsesRequest};
use crate::protocols::{ChunkEncoder, ClientProtocol, EncodeCtx};
use crate::providers::Usage;
use crate::proxy::meter::Meter;
use crate::proxy::passthrough::{self, Foreign};
use crate::proxy::route::Route;
use crate::proxy::stream::UsageReader;
use crate::proxy::translate::{self, Exchange, OnDone};
use crate::proxy::upstream;
use crate::state::AppState;

use super::Call;

/// The Responses protocol for one request: its encoders echo the request's fields and carry
/// its `resp_…` id.
struct WithCtx(ResponseCtx);

impl ClientProtocol for WithCtx {
    fn decode_request(&self, body: &[u8]) -> Result<ChatRequest, ApiError> {
        proto::to_chat(&proto::parse(body)?, &[])
    }

    fn encode_response(&self, resp: &ChatResponse, _ctx: &EncodeCtx) -> Vec<u8> {
        serde_json::to_vec(&proto::from_chat(resp, &self.0)).unwrap_or_default()
    }

    fn stream_encoder(&self, _ctx: &EncodeCtx) -> Box<dyn ChunkEncoder> {
        Box::new(proto::ResponsesStream::new(self.0.clone()))
    }

    fn error_body(&self, _status: u16, err: &UpstreamError) -> Vec<u8> {
        crate::protocols::openai_chat::error_json(err)
    }

    fn errors_are_openai(&self) -> bool {
        true
    }
}

/// Usage of a relayed Responses stream: the terminal event's `response.usage`.
#[derive(Default)]
struct StreamUsage {
    usage: Option<Usage>,
    /// tollgate's `resp_…` id and the client's model, put into every event's `response`.
    id: String,
    model: String,
    /// The terminal event's `response`, for storage.
    last: Option<serde_json::Value>,
    on_end: Option<OnDone>,
    /// tollgate keeps this response (the upstream was sent `store: false`).
    stored: bool,
    /// The last event's `sequence_number`: a final error event takes the next one.
    sequence: u64,
}

impl UsageReader for StreamUsage {
    fn on_event(&mut self, data: &[u8]) {
        if let Some(u) = proto::usage_of_event(data) {
            self.usage = Some(u);
        }
        if let Some(n) = sequence_number(data) {
            self.sequence = n;
        }
        if self.on_end.is_some()
            && memchr::memmem::find(data, b"response.completed").is_some()
            && let Ok(v) = serde_json::from_slice::<serde_json::Value>(data)
            && v.get("type").and_then(|t| t.as_str()) == Some("response.completed")
            && let Some(r) = v.get("response")
        {
            let mut r = r.clone();
            relabel(&mut r, &self.id, &self.model, self.stored);
            self.last = Some(r);
        }
    }

    fn usage(&self) -> Option<Usage> {
        self.usage
    }

    fn rewrite(&mut self, data: &[u8]) -> Option<Vec<u8>> {
        // Only the few events that carry the whole `response` (created, in_progress, completed,
        // incomplete, failed); a `"response":` key cannot appear unescaped inside a string.
        memchr::memmem::find(data, b"\"response\":")?;
        let mut v: serde_json::Value = serde_json::from_slice(data).ok()?;
        let r = v.get_mut("response")?;
        relabel(r, &self.id, &self.model, self.stored);
        serde_json::to_vec(&v).ok()
    }

    /// The Responses API's `error` event, which the SDKs raise.
    fn error_event(&self, err: &UpstreamError, out: &mut bytes::BytesMut) -> bool {
        let event = serde_json::json!({
            "type": "error",
            "code": err.code.as_deref().unwrap_or(err.kind.as_str()),
            "message": err.message,
            "param": null,
            "sequence_number": self.sequence.saturating_add(1),
        });
        out.extend_from_slice(b"event: error\ndata: ");
        out.extend_from_slice(&serde_json::to_vec(&event).unwrap_or_default());
        out.extend_from_slice(b"\n\n");
        true
    }

    fn on_end(&mut self) {
        if let (Some(f), Some(r)) = (self.on_end.take(), self.last.take()) {
            f(r, self.usage);
        }
    }
}

/// What storing needs besides the answer.
pub struct Stored {
    pub state: AppState,
    pub user_id: String,
    pub key_id: String,
    pub request: ResponsesRequest,
    pub input_items: Vec<Item>,
    pub ctx: ResponseCtx,
    /// The response id is being written from the start: a reader of it (the SDKs' `retrieve`
    /// or the next turn's `previous_response_id`, even one sent as soon as the stream ends)
    /// waits for the save instead of a 404.
    pub writing: crate::conversations::pending::Writing,
}

pub async fn forward(state: &AppState, route: &Route, call: &Call<'_>, meter: Meter) -> Response {
    let req = match proto::parse(call.bytes) {
        Ok(r) => r,
        Err(e) => return refuse(meter, e),
    };
    let history = match history(state, &meter.facts.user_id, &req).await {
        Ok(h) => h,
        Err(e) => return refuse(meter, e),
    };
    let mut ctx = ResponseCtx::new(&req, chrono::Utc::now().timestamp());
    ctx.id = crate::conversations::ids::response_id();
    ctx.store = req.store && state.config.storage.enabled;
    let input_items = proto::normalize_input(&req);
    let mut meter = meter;
    meter.facts.response_id = Some(ctx.id.clone());
    meter.facts.conversation_id = req.conversation.clone();
    let stored = (ctx.store || ctx.conversation.is_some()).then(|| Stored {
        state: state.clone(),
        user_id: meter.facts.user_id.clone(),
        key_id: meter.facts.key_id.clone(),
        request: req.clone(),
        input_items: input_items.clone(),
        ctx: ctx.clone(),
        writing: crate::conversations::pending::writing(vec![ctx.id.clone()]),
    });
    let save = stored.map(|s| {
        Box::new(move |response: serde_json::Value, usage: Option<Usage>| {
            save_later(s, response, usage);
        }) as OnDone
    });

    if route.passes_through(crate::providers::Endpoint::Responses) {
        return upstream_responses(state, route, call, &req, &history, meter, save).await;
    }
    let mut pivot = match proto::to_chat(&req, &history) {
        Ok(p) => p,
        Err(e) => {
            // Refused: no response was made, so its record names none (spec §9).
            meter.facts.response_id = None;
            return refuse(meter, e);
        }
    };
    call.view.model.clone_into(&mut pivot.model);
    if !history.is_empty() {
        // The estimate counts the stored history too, which the client's body (kept already)
        // does not carry.
        meter.facts.keep_body(&translate::pivot_body(&pivot));
    }
    let with_ctx = WithCtx(ctx);
    let encode_ctx = EncodeCtx {
        client_model: call.view.model.clone(),
        include_usage: true,
        created: with_ctx.0.created_at,
        id: Some(with_ctx.0.id.clone()),
    };
    translate::forward(
        state,
        route,
        Exchange {
            protocol: &with_ctx,
            pivot,
            ctx: encode_ctx,
            on_done: save,
        },
        meter,
        call.request_id,
        call.headers,
    )
    .await
}

/// A Responses-capable upstream: the full input, `store: false`, relayed untouched.
async fn upstream_responses(
    state: &AppState,
    route: &Route,
    call: &Call<'_>,
    req: &ResponsesRequest,
    history: &[Item],
    meter: Meter,
    save: Option<OnDone>,
) -> Response {
    let protocol: &'static dyn ClientProtocol = &crate::protocols::responses::Responses;
    let body = proto::upstream_body(req, history, &route.upstream_model);
    let t = route.target();
    let mut headers = upstream::client_headers(call.headers, true);
    let url = if route.kind == "azure" {
        let Some(translator) = route.translator else {
            return refuse(
                meter,
                ApiError::internal(anyhow::anyhow!("azure route without a translator")),
            );
        };
        let url = match crate::providers::azure::operation_url(&t, "/responses") {
            Ok(u) => u,
            Err(e) => return refuse(meter, e),
        };
        if let Err(e) = translator.headers(
            &mut headers,
            route.provider_key.expose_secret(),
            &t,
            &url,
            &body,
        ) {
            return refuse(meter, e);
        }
        url
    } else {
        if let Some(a) = route.adapter {
            a.auth(&mut headers, route.provider_key.expose_secret());
        }
        let url = format!("{}/responses", route.base_url.trim_end_matches('/'));
        crate::proxy::upstream::with_query(&url, call.query).into_owned()
    };
    // The client sees tollgate's `resp_…` id and its own model name (the id is what
    // `previous_response_id` and `GET /v1/responses/{id}` take), and that is what is stored.
    let ctx_id = meter.facts.response_id.clone().unwrap_or_default();
    let client_model = call.view.model.clone();
    let stored = save.is_some();
    let (on_body, on_end): (Option<passthrough::OnBody>, _) = if req.stream {
        (None, save)
    } else {
        let (id, model) = (ctx_id.clone(), client_model.clone());
        let on_body = Box::new(move |body: Bytes, usage: Option<Usage>| {
            let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(&body) else {
                return body;
            };
            relabel(&mut v, &id, &model, save.is_some());
            let out = serde_json::to_vec(&v).map(Bytes::from).unwrap_or(body);
            if let Some(save) = save {
                save(v, usage);
            }
            out
        }) as passthrough::OnBody;
        (Some(on_body), None)
    };
    passthrough::forward(
        state,
        route,
        Foreign {
            url,
            headers,
            body: Bytes::from(body),
            stream: req.stream,
            reader: Box::new(StreamUsage {
                on_end,
                id: ctx_id,
                model: client_model,
                stored,
                ..StreamUsage::default()
            }),
            usage_of_body: proto::usage_of_response,
            protocol,
            on_body,
        },
        &call.view.model,
        meter,
        call.request_id,
    )
    .await
}

/// The items before this turn's input: the `previous_response_id` chain or the conversation,
/// from tollgate's own tables.
async fn history(
    state: &AppState,
    user_id: &str,
    req: &ResponsesRequest,
) -> Result<Vec<Item>, ApiError> {
    let (prev, conv) = (
        req.previous_response_id.as_deref(),
        req.conversation.as_deref(),
    );
    if prev.is_none() && conv.is_none() {
        return Ok(Vec::new());
    }
    if !state.config.storage.enabled {
        let param = if prev.is_some() {
            "previous_response_id"
        } else {
            "conversation"
        };
        return Err(ApiError::invalid_param(
            param,
            format!(
                "`{param}` needs stored state, and this gateway stores none (storage.enabled = false)."
            ),
        ));
    }
    crate::conversations::history_for(&state.db, user_id, prev, conv).await
}

/// A request refused before any upstream was asked: metered (free) as
/// [`passthrough::refuse`] does, and answered by the gateway's own OpenAI-shaped renderer, which
/// keeps the error's `param` (re-rendering through the protocol's `error_body` drops it).
fn refuse(meter: Meter, e: ApiError) -> Response {
    meter.finish(
        e.parts().0.as_u16(),
        None,
        crate::metering::event::KeptPayloads::default(),
        Some("invalid_request"),
    );
    axum::response::IntoResponse::into_response(e)
}

/// Stores a completed response (and appends to its conversation) off the request's path.
fn save_later(s: Stored, response: serde_json::Value, usage: Option<Usage>) {
    let Stored {
        state,
        user_id,
        key_id,
        request,
        input_items,
        ctx,
        writing,
    } = s;
    // The conversation is marked only now, when the answer is complete (a reader of it must not
    // wait for a turn still being generated).
    let conversation =
        crate::conversations::pending::writing(request.conversation.iter().cloned().collect());
    let status = response
        .get("status")
        .and_then(|v| v.as_str())
        .unwrap_or("completed")
        .to_owned();
    let u = usage.unwrap_or_default();
    let stored = crate::conversations::StoredResponse {
        id: ctx.id.clone(),
        user_id,
        key_id,
        model: ctx.model.clone(),
        status,
        previous_response_id: request.previous_response_id.clone(),
        conversation_id: request.conversation.clone(),
        input_items,
        response,
        input_tokens: u.prompt,
        output_tokens: u.completion,
        created_at: chrono::DateTime::from_timestamp(ctx.created_at, 0)
            .unwrap_or_else(chrono::Utc::now),
    };
    state.stored.submit(
        crate::conversations::writer::Save::Response(stored),
        vec![writing, conversation],
    );
}

/// The stored copy of an upstream's response carries tollgate's id and the client's model name.
fn relabel(v: &mut serde_json::Value, id: &str, model: &str, stored: bool) {
    if let Some(o) = v.as_object_mut() {
        o.insert("id".into(), id.into());
        o.insert("model".into(), model.into());
        // The upstream was sent `store: false`; what the client is told is what tollgate did.
        o.insert("store".into(), stored.into());
    }
}

/// An event's `sequence_number`, found without parsing the event (the last unescaped
/// `"sequence_number":` in it; a nested object of an event carries none).
fn sequence_number(data: &[u8]) -> Option<u64> {
    const KEY: &[u8] = b"\"sequence_number\":";
    let at = memchr::memmem::rfind(data, KEY)? + KEY.len();
    let digits = data[at..]
        .iter()
        .skip_while(|b| b.is_ascii_whitespace())
        .take_while(|b| b.is_ascii_digit())
        .take(19)
        .fold(0u64, |n, b| {
            n.saturating_mul(10).saturating_add(u64::from(b - b'0'))
        });
    Some(digits)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::stream::UsageReader;

    #[test]
    fn a_cut_stream_ends_with_the_responses_error_event_numbered_next() {
        let mut r = StreamUsage::default();
        for data in [
            &br#"{"type":"response.created","sequence_number":0,"response":{"id":"x","metadata":{"note":"\"sequence_number\":99"}}}"#[..],
            br#"{"type":"response.output_text.delta","sequence_number":7,"delta":"hi"}"#,
            br#"{"type":"response.output_text.delta","delta":"no number"}"#,
        ] {
            r.on_event(data);
        }
        let mut out = bytes::BytesMut::new();
        let err = UpstreamError {
            status: 502,
            kind: "api_error".into(),
            message: "The upstream connection was lost mid-stream.".into(),
            code: Some("upstream_disconnected".into()),
        };
        assert!(r.error_event(&err, &mut out));
        let text = std::str::from_utf8(&out).expect("utf-8");
        let data = text
            .strip_prefix("event: error\ndata: ")
            .and_then(|t| t.strip_suffix("\n\n"))
            .expect("one SSE event");
        let v: serde_json::Value = serde_json::from_str(data).expect("json");
        assert_eq!(v["type"], "error");
        assert_eq!(v["code"], "upstream_disconnected");
        assert_eq!(
            v["sequence_number"], 8,
            "after the last numbered event: {v}"
        );
        assert_eq!(
            sequence_number(br#"{"a":"\"sequence_number\":5"}"#),
            None,
            "an escaped key inside a string is not the event's"
        );
        assert_eq!(
            sequence_number(br#"{"sequence_number": 99999999999999999999999}"#),
            Some(9_999_999_999_999_999_999),
            "at most 19 digits are read: no overflow"
        );
    }

    #[test]
    fn relabel_says_what_tollgate_did() {
        let mut v = serde_json::json!({"id": "resp_up", "model": "up", "store": false});
        relabel(&mut v, "resp_ours", "mine", true);
        assert_eq!(
            v,
            serde_json::json!({"id": "resp_ours", "model": "mine", "store": true})
        );
    }
}
