//! The OpenAI-compatible surface (`/v1`, gateway keys). Handlers hand the request to
//! `proxy::forward`; `/v1/models` lists what the presented key may use.

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::{ApiError, Json, Path};
use crate::providers::Endpoint;
use crate::proxy;
use crate::routes::ClientIp;
use crate::state::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(chat_completions))
        .routes(routes!(completions))
        .routes(routes!(embeddings))
        .routes(routes!(responses))
        .routes(routes!(messages))
        .routes(routes!(count_tokens))
        .routes(routes!(image_generations))
        .routes(routes!(image_edits))
        .routes(routes!(image_variations))
        .routes(routes!(audio_speech))
        .routes(routes!(audio_transcriptions))
        .routes(routes!(audio_translations))
        .routes(routes!(moderations))
        .routes(routes!(realtime))
        .routes(routes!(list_models))
        .routes(routes!(get_model))
}

/// Chat completions, streamed (`"stream": true`, server-sent events) or not. The body is
/// OpenAI's; unknown fields pass through to the upstream untouched.
#[utoipa::path(post, path = "/v1/chat/completions", tag = "openai",
    request_body(content = serde_json::Value, description = "An OpenAI chat completion request", content_type = "application/json"),
    responses(
        (status = 200, description = "The upstream's completion (JSON, or `text/event-stream` when streaming)"),
        (status = 400, body = crate::error::ErrorBody), (status = 401, body = crate::error::ErrorBody),
        (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody),
        (status = 413, body = crate::error::ErrorBody), (status = 429, body = crate::error::ErrorBody),
        (status = 502, body = crate::error::ErrorBody), (status = 504, body = crate::error::ErrorBody)),
    security(("gateway_key" = []), ("gateway_key_header" = [])))]
async fn chat_completions(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    req: Request,
) -> Response {
    proxy::forward(state, Endpoint::ChatCompletions, ip, req).await
}

/// Legacy text completions, streamed or not.
#[utoipa::path(post, path = "/v1/completions", tag = "openai",
    request_body(content = serde_json::Value, description = "An OpenAI completion request", content_type = "application/json"),
    responses((status = 200, description = "The upstream's completion"), (status = 400, body = crate::error::ErrorBody),
        (status = 401, body = crate::error::ErrorBody), (status = 429, body = crate::error::ErrorBody)),
    security(("gateway_key" = []), ("gateway_key_header" = [])))]
async fn completions(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    req: Request,
) -> Response {
    proxy::forward(state, Endpoint::Completions, ip, req).await
}

/// Embeddings.
#[utoipa::path(post, path = "/v1/embeddings", tag = "openai",
    request_body(content = serde_json::Value, description = "An OpenAI embeddings request", content_type = "application/json"),
    responses((status = 200, description = "The upstream's embeddings"), (status = 400, body = crate::error::ErrorBody),
        (status = 401, body = crate::error::ErrorBody), (status = 429, body = crate::error::ErrorBody)),
    security(("gateway_key" = []), ("gateway_key_header" = [])))]
async fn embeddings(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    req: Request,
) -> Response {
    proxy::forward(state, Endpoint::Embeddings, ip, req).await
}

/// OpenAI's Responses API (spec §8, §9), streamed (`event:`/`data:` server-sent events with
/// `sequence_number`) or not. `previous_response_id` and `conversation` are resolved from
/// tollgate's own tables for every provider; `store` (default true) saves the response.
#[utoipa::path(post, path = "/v1/responses", tag = "openai",
    request_body(content = serde_json::Value, description = "An OpenAI Responses API request", content_type = "application/json"),
    responses(
        (status = 200, description = "A `response` object (JSON, or `text/event-stream` of `response.*` events when streaming)"),
        (status = 400, body = crate::error::ErrorBody), (status = 401, body = crate::error::ErrorBody),
        (status = 404, body = crate::error::ErrorBody), (status = 429, body = crate::error::ErrorBody),
        (status = 502, body = crate::error::ErrorBody)),
    security(("gateway_key" = []), ("gateway_key_header" = [])))]
async fn responses(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    req: Request,
) -> Response {
    proxy::forward(state, Endpoint::Responses, ip, req).await
}

/// Anthropic's Messages API (spec §10), for the Anthropic SDKs and Claude Code: passed through
/// to `anthropic` providers, translated to every other kind. Gateway key as `x-api-key` or
/// `Authorization: Bearer`; errors in Anthropic's shape.
#[utoipa::path(post, path = "/v1/messages", tag = "anthropic",
    request_body(content = serde_json::Value, description = "An Anthropic Messages API request", content_type = "application/json"),
    responses(
        (status = 200, description = "A `message` (JSON, or `text/event-stream` of Anthropic's events when streaming)"),
        (status = 400, description = "`{\"type\": \"error\", \"error\": {\"type\": \"invalid_request_error\", …}}`"),
        (status = 401, description = "`authentication_error`"), (status = 429, description = "`rate_limit_error`"),
        (status = 529, description = "`overloaded_error` (from the upstream)")),
    security(("gateway_key" = []), ("gateway_key_header" = [])))]
async fn messages(State(state): State<AppState>, ClientIp(ip): ClientIp, req: Request) -> Response {
    proxy::forward(state, Endpoint::Messages, ip, req).await
}

/// Anthropic's token counting: the provider's own count for `anthropic` providers, the
/// gateway's tokenizer otherwise. `{"input_tokens": n}`.
#[utoipa::path(post, path = "/v1/messages/count_tokens", tag = "anthropic",
    request_body(content = serde_json::Value, description = "A Messages request without `max_tokens`", content_type = "application/json"),
    responses((status = 200, description = "`{\"input_tokens\": n}`"), (status = 400, description = "Anthropic-shaped error")),
    security(("gateway_key" = []), ("gateway_key_header" = [])))]
async fn count_tokens(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    req: Request,
) -> Response {
    proxy::forward(state, Endpoint::CountTokens, ip, req).await
}

/// Image generation (spec §8): passed through to `openai` and `azure` providers, metered by the
/// upstream's token `usage` when it gives one, else by the model's `price_per_image` per image
/// returned. `stream: true` relays the upstream's `image_generation.*` events.
#[utoipa::path(post, path = "/v1/images/generations", tag = "openai",
    request_body(content = serde_json::Value, description = "An OpenAI image generation request", content_type = "application/json"),
    responses(
        (status = 200, description = "The upstream's images (`{created, data: [...], usage?}`, or `text/event-stream` when streaming)"),
        (status = 400, body = crate::error::ErrorBody), (status = 401, body = crate::error::ErrorBody),
        (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody),
        (status = 413, body = crate::error::ErrorBody), (status = 429, body = crate::error::ErrorBody),
        (status = 502, body = crate::error::ErrorBody)),
    security(("gateway_key" = []), ("gateway_key_header" = [])))]
async fn image_generations(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    req: Request,
) -> Response {
    proxy::forward(state, Endpoint::ImageGenerations, ip, req).await
}

/// Image edits, `multipart/form-data` (`image`, `mask`, `prompt`, `model`, …): the body is
/// streamed to the upstream, read only as far as its `model` field. Metered as generations.
#[utoipa::path(post, path = "/v1/images/edits", tag = "openai",
    request_body(content = String, description = "An OpenAI image edit form (the `model` field is required)", content_type = "multipart/form-data"),
    responses(
        (status = 200, description = "The upstream's images"),
        (status = 400, body = crate::error::ErrorBody), (status = 401, body = crate::error::ErrorBody),
        (status = 404, body = crate::error::ErrorBody), (status = 413, body = crate::error::ErrorBody),
        (status = 429, body = crate::error::ErrorBody), (status = 502, body = crate::error::ErrorBody)),
    security(("gateway_key" = []), ("gateway_key_header" = [])))]
async fn image_edits(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    req: Request,
) -> Response {
    proxy::forward(state, Endpoint::ImageEdits, ip, req).await
}

/// Image variations, `multipart/form-data` (`image`, `model`, `n`, …), streamed like edits.
#[utoipa::path(post, path = "/v1/images/variations", tag = "openai",
    request_body(content = String, description = "An OpenAI image variation form (the `model` field is required)", content_type = "multipart/form-data"),
    responses(
        (status = 200, description = "The upstream's images"),
        (status = 400, body = crate::error::ErrorBody), (status = 401, body = crate::error::ErrorBody),
        (status = 413, body = crate::error::ErrorBody), (status = 429, body = crate::error::ErrorBody)),
    security(("gateway_key" = []), ("gateway_key_header" = [])))]
async fn image_variations(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    req: Request,
) -> Response {
    proxy::forward(state, Endpoint::ImageVariations, ip, req).await
}

/// Text to speech: JSON in, the upstream's audio bytes out (relayed as they arrive, with its
/// `content-type`). Metered by the model's `price_per_1m_chars` of `input`, or by the token usage
/// of a `stream_format: "sse"` answer.
#[utoipa::path(post, path = "/v1/audio/speech", tag = "openai",
    request_body(content = serde_json::Value, description = "An OpenAI speech request", content_type = "application/json"),
    responses(
        (status = 200, description = "Audio (`audio/mpeg`, `audio/wav`, …, as the upstream answers)", content_type = "application/octet-stream"),
        (status = 400, body = crate::error::ErrorBody), (status = 401, body = crate::error::ErrorBody),
        (status = 404, body = crate::error::ErrorBody), (status = 429, body = crate::error::ErrorBody),
        (status = 502, body = crate::error::ErrorBody)),
    security(("gateway_key" = []), ("gateway_key_header" = [])))]
async fn audio_speech(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    req: Request,
) -> Response {
    proxy::forward(state, Endpoint::AudioSpeech, ip, req).await
}

/// Speech to text, `multipart/form-data` (`file`, `model`, `response_format`, `stream`, …),
/// streamed to the upstream. Metered by token `usage` when reported, else by seconds of audio
/// (`usage.seconds`, `duration`, or an `srt`/`vtt` answer's last cue) × `price_per_minute`.
#[utoipa::path(post, path = "/v1/audio/transcriptions", tag = "openai",
    request_body(content = String, description = "An OpenAI transcription form (the `model` field is required)", content_type = "multipart/form-data"),
    responses(
        (status = 200, description = "The transcription (JSON, text, or `text/event-stream` of `transcript.text.*` events)"),
        (status = 400, body = crate::error::ErrorBody), (status = 401, body = crate::error::ErrorBody),
        (status = 404, body = crate::error::ErrorBody), (status = 413, body = crate::error::ErrorBody),
        (status = 429, body = crate::error::ErrorBody), (status = 502, body = crate::error::ErrorBody)),
    security(("gateway_key" = []), ("gateway_key_header" = [])))]
async fn audio_transcriptions(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    req: Request,
) -> Response {
    proxy::forward(state, Endpoint::AudioTranscriptions, ip, req).await
}

/// Speech to English text, `multipart/form-data`, streamed and metered like transcriptions.
#[utoipa::path(post, path = "/v1/audio/translations", tag = "openai",
    request_body(content = String, description = "An OpenAI translation form (the `model` field is required)", content_type = "multipart/form-data"),
    responses(
        (status = 200, description = "The translation (JSON or text)"),
        (status = 400, body = crate::error::ErrorBody), (status = 401, body = crate::error::ErrorBody),
        (status = 413, body = crate::error::ErrorBody), (status = 429, body = crate::error::ErrorBody)),
    security(("gateway_key" = []), ("gateway_key_header" = [])))]
async fn audio_translations(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    req: Request,
) -> Response {
    proxy::forward(state, Endpoint::AudioTranslations, ip, req).await
}

/// Moderations: passed through; metered by the upstream's usage, else the input's estimated
/// tokens at the model's input price (OpenAI reports none).
#[utoipa::path(post, path = "/v1/moderations", tag = "openai",
    request_body(content = serde_json::Value, description = "An OpenAI moderation request", content_type = "application/json"),
    responses(
        (status = 200, description = "The upstream's moderation results"),
        (status = 400, body = crate::error::ErrorBody), (status = 401, body = crate::error::ErrorBody),
        (status = 404, body = crate::error::ErrorBody), (status = 429, body = crate::error::ErrorBody)),
    security(("gateway_key" = []), ("gateway_key_header" = [])))]
async fn moderations(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    req: Request,
) -> Response {
    proxy::forward(state, Endpoint::Moderations, ip, req).await
}

/// OpenAI's Realtime API over a WebSocket (spec §8): the session is relayed both ways to the
/// model's upstream (a catalog model of type `realtime`), frames unchanged, each at most 16 MiB.
/// The gateway key goes in `Authorization: Bearer`, or — from a browser, which cannot set
/// headers — as the subprotocol entry `openai-insecure-api-key.<key>` (the answer echoes only
/// `realtime`). Every `response.done` writes one usage record from its `usage`; a session with
/// none writes one record (status 101). When the balance or the key's budget cannot cover
/// another response, the socket closes with 1008 after the response that used it up.
#[utoipa::path(get, path = "/v1/realtime", tag = "openai",
    params(("model" = String, Query, description = "A catalog model of type `realtime`; the rest of the query is forwarded upstream")),
    responses(
        (status = 101, description = "Switching to the WebSocket protocol: OpenAI's Realtime events both ways"),
        (status = 400, body = crate::error::ErrorBody, description = "Not a WebSocket upgrade, no `model`, or not a realtime model"),
        (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody),
        (status = 404, body = crate::error::ErrorBody), (status = 429, body = crate::error::ErrorBody),
        (status = 502, body = crate::error::ErrorBody), (status = 504, body = crate::error::ErrorBody)),
    security(("gateway_key" = []), ("gateway_key_header" = [])))]
async fn realtime(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    uri: axum::http::Uri,
    headers: axum::http::HeaderMap,
    upgrade: Result<
        axum::extract::ws::WebSocketUpgrade,
        axum::extract::ws::rejection::WebSocketUpgradeRejection,
    >,
) -> Response {
    proxy::realtime::open(state, ip, uri.query(), headers, upgrade).await
}

/// OpenAI's model object.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ModelObject {
    id: String,
    object: &'static str,
    /// Unix seconds.
    created: i64,
    owned_by: String,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ModelList {
    object: &'static str,
    data: Vec<ModelObject>,
}

fn model_object(m: &crate::cache::CatalogModel) -> ModelObject {
    ModelObject {
        id: m.model.name.clone(),
        object: "model",
        created: m.model.created_at.timestamp(),
        owned_by: m.provider.key.clone(),
    }
}

/// The catalog's active models this key may use.
#[utoipa::path(get, path = "/v1/models", tag = "openai",
    responses((status = 200, body = ModelList), (status = 401, body = crate::error::ErrorBody)),
    security(("gateway_key" = []), ("gateway_key_header" = [])))]
async fn list_models(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    req: Request,
) -> Result<Json<ModelList>, ApiError> {
    let key = proxy::auth::authenticate(&state, req.headers()).await?;
    check_ip(&key, ip)?;
    let catalog = state.caches.catalog(&state.db).await?;
    Ok(Json(ModelList {
        object: "list",
        data: catalog
            .servable_models()
            .filter(|m| key.allows_model(&m.model.name))
            .map(|m| model_object(m))
            .collect(),
    }))
}

/// One model, when this key may use it.
#[utoipa::path(get, path = "/v1/models/{id}", tag = "openai",
    params(("id" = String, Path, description = "Model name")),
    responses((status = 200, body = ModelObject), (status = 404, body = crate::error::ErrorBody)),
    security(("gateway_key" = []), ("gateway_key_header" = [])))]
async fn get_model(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    Path(id): Path<String>,
    req: Request,
) -> Result<Response, ApiError> {
    let key = proxy::auth::authenticate(&state, req.headers()).await?;
    check_ip(&key, ip)?;
    let catalog = state.caches.catalog(&state.db).await?;
    let m = catalog
        .servable(&id)
        .filter(|m| key.allows_model(&m.model.name))
        .ok_or_else(|| ApiError::NotFound {
            message: format!("The model `{id}` does not exist or you do not have access to it."),
            code: "model_not_found",
        })?;
    Ok(Json(model_object(m)).into_response())
}

fn check_ip(key: &crate::cache::KeyCtx, ip: Option<std::net::IpAddr>) -> Result<(), ApiError> {
    match ip {
        Some(ip) if !key.allows_ip(ip) => Err(ApiError::forbidden(
            "ip_not_allowed",
            format!("Requests from {ip} are not allowed for this API key."),
        )),
        _ => Ok(()),
    }
}
