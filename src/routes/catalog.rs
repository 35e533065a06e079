//! The catalog: providers (`/api/providers`, `/api/admin/providers`) and priced models
//! (`/api/models`, `/api/admin/models`).
//!
//! Every write invalidates the catalog cache the `/v1` hot path reads, and is audited.

use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Deserializer, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::accounts::session::{AdminUser, CurrentUser};
use crate::error::{ApiError, ApiResult, Json, Path, Query};
use crate::routes::audit;
use crate::routes::{ClientIp, PageParams, Paginated, rfc3339};
use crate::routing::deployment::{self, DeploymentSpec};
use crate::state::AppState;
use crate::store::models::{ModelFilter, ModelPatch, NewModel};
use crate::store::providers::{NewProvider, ProviderPatch};
use crate::store::{self, is_unique_violation, nanos_to_usd, usd_to_nanos};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_providers))
        .routes(routes!(create_provider))
        .routes(routes!(update_provider, delete_provider))
        .routes(routes!(list_models))
        .routes(routes!(create_model))
        .routes(routes!(update_model, delete_model))
        .routes(routes!(toggle_model))
        .routes(routes!(reorder_models))
}

/// For PATCH bodies: tells an absent field (`None`) from an explicit `null` (`Some(None)`).
pub(crate) fn nullable<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

// ---------------------------------------------------------------------------------------------
// Providers

/// A provider (an upstream API).
#[derive(Debug, Serialize, ToSchema)]
pub struct ProviderView {
    /// `[a-z0-9_-]`, unique; what models name as `provider`.
    pub key: String,
    pub display_name: String,
    pub base_url: String,
    /// `openai` (any OpenAI-compatible API) | `anthropic` | `gemini` | `azure` | `bedrock`.
    pub kind: String,
    pub is_active: bool,
    pub sort_order: i32,
    /// `openai` kind: the upstream serves OpenAI's `/responses`, so `/v1/responses` goes there
    /// instead of being translated to chat completions. Always `false` for other kinds (`azure`
    /// always serves `/responses`; the others are translated).
    pub supports_responses: bool,
    /// `azure`: the `api-version` query; `null` = the `/openai/v1/` API.
    pub api_version: Option<String>,
    /// `bedrock`: the AWS region.
    pub region: Option<String>,
}

impl From<entity::providers::Model> for ProviderView {
    fn from(p: entity::providers::Model) -> Self {
        Self {
            key: p.key,
            display_name: p.display_name,
            base_url: p.base_url,
            kind: p.kind,
            is_active: p.is_active,
            sort_order: p.sort_order,
            supports_responses: p.supports_responses,
            api_version: p.api_version,
            region: p.region,
        }
    }
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ProviderListParams {
    /// Admins only: also list inactive providers (ignored for other users).
    pub include_inactive: Option<bool>,
}

/// Active providers, by `sort_order` then key. Admins may add `include_inactive=true`.
#[utoipa::path(get, path = "/api/providers", tag = "catalog", security(("access_token" = [])),
    params(PageParams, ProviderListParams),
    responses((status = 200, body = Paginated<ProviderView>), (status = 401, body = crate::error::ErrorBody)))]
async fn list_providers(
    State(state): State<AppState>,
    me: CurrentUser,
    Query(page): Query<PageParams>,
    Query(p): Query<ProviderListParams>,
) -> ApiResult<Json<Paginated<ProviderView>>> {
    let active_only = !(me.is_admin() && p.include_inactive.unwrap_or(false));
    let req = page.req()?;
    let rows = store::providers::list(&state.db, active_only, req).await?;
    Ok(Json(Paginated::new(rows, req, ProviderView::from)))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateProvider {
    /// 1–64 of `[a-z0-9_-]`.
    pub key: String,
    /// Default: the key.
    pub display_name: Option<String>,
    /// http(s) URL of the API root, ending at its version path, e.g. `https://api.openai.com/v1`,
    /// `https://api.anthropic.com/v1`, `https://generativelanguage.googleapis.com/v1beta`, an
    /// Azure resource endpoint. Required, except for `bedrock`: then
    /// `https://bedrock-runtime.{region}.amazonaws.com`.
    pub base_url: Option<String>,
    /// `openai` (default: any OpenAI-compatible API) | `anthropic` | `gemini` | `azure` |
    /// `bedrock`.
    pub kind: Option<String>,
    /// Default true.
    pub is_active: Option<bool>,
    /// Default 0.
    pub sort_order: Option<i32>,
    /// `openai` kind only (default false): the upstream serves `/responses`.
    pub supports_responses: Option<bool>,
    /// `azure` only: the `api-version` query, e.g. `2024-10-21`; absent = the `/openai/v1/` API.
    pub api_version: Option<String>,
    /// `bedrock` only, and required there: the AWS region, e.g. `us-east-1`.
    pub region: Option<String>,
}

fn check_display_name(param: &str, s: &str) -> ApiResult<String> {
    let s = s.trim();
    if s.is_empty() || s.chars().count() > 128 {
        return Err(ApiError::invalid_param(param, "must be 1–128 characters"));
    }
    Ok(s.to_owned())
}

fn check_kind(kind: &str) -> ApiResult<String> {
    if !crate::validate::provider_kind(kind) {
        return Err(ApiError::invalid_param(
            "kind",
            "kind must be one of openai (any OpenAI-compatible API), anthropic, gemini, azure, \
             bedrock",
        ));
    }
    Ok(kind.to_owned())
}

fn missing(param: &str, message: impl Into<String>) -> ApiError {
    ApiError::BadRequest {
        message: message.into(),
        code: "missing_field",
        param: Some(param.to_owned()),
    }
}

/// A provider's kind and the fields that belong to one kind only, as they will be stored.
#[derive(Debug, Clone, PartialEq, Eq)]
struct KindFields {
    kind: String,
    supports_responses: bool,
    api_version: Option<String>,
    region: Option<String>,
}

impl KindFields {
    /// Each field only where its kind reads it: `supports_responses` on `openai` (`azure`
    /// always serves `/responses`, the other kinds are translated), `api_version` on `azure`,
    /// `region` on `bedrock`, where it is required.
    fn check(self) -> ApiResult<Self> {
        if self.supports_responses && self.kind != "openai" {
            return Err(ApiError::invalid_param(
                "supports_responses",
                format!(
                    "supports_responses applies to kind \"openai\" only; a {:?} provider {}",
                    self.kind,
                    if self.kind == "azure" {
                        "always serves /responses"
                    } else {
                        "has /v1/responses translated to its own API"
                    }
                ),
            ));
        }
        match (&self.api_version, self.kind.as_str()) {
            (Some(_), k) if k != "azure" => {
                return Err(ApiError::invalid_param(
                    "api_version",
                    "api_version applies to kind \"azure\" only",
                ));
            }
            (Some(v), _) if !crate::validate::api_version(v) => {
                return Err(ApiError::invalid_param(
                    "api_version",
                    "api_version must be 1–32 of [A-Za-z0-9.-], e.g. 2024-10-21",
                ));
            }
            _ => {}
        }
        match (&self.region, self.kind == "bedrock") {
            (None, true) => {
                return Err(missing(
                    "region",
                    "region is required for a bedrock provider (an AWS region such as us-east-1)",
                ));
            }
            (Some(r), true) if !crate::validate::aws_region(r) => {
                return Err(ApiError::invalid_param(
                    "region",
                    "region must be an AWS region such as us-east-1",
                ));
            }
            (Some(_), false) => {
                return Err(ApiError::invalid_param(
                    "region",
                    "region applies to kind \"bedrock\" only",
                ));
            }
            _ => {}
        }
        Ok(self)
    }
}

/// Admin-entered provider URLs are trusted (no private-address check), but must be http(s).
fn check_provider_url(raw: &str) -> ApiResult<String> {
    let url = crate::ssrf::normalize(raw).map_err(|e| {
        ApiError::invalid_param(
            "base_url",
            format!("{e}; expected an http(s) URL such as https://api.openai.com/v1"),
        )
    })?;
    let s = crate::ssrf::stored_form(&url);
    if s.len() > 512 {
        return Err(ApiError::invalid_param(
            "base_url",
            "must be at most 512 bytes",
        ));
    }
    Ok(s)
}

/// Adds a provider.
#[utoipa::path(post, path = "/api/admin/providers", tag = "catalog", security(("access_token" = [])),
    request_body = CreateProvider,
    responses((status = 201, body = ProviderView), (status = 400, body = crate::error::ErrorBody),
              (status = 403, body = crate::error::ErrorBody), (status = 409, body = crate::error::ErrorBody)))]
async fn create_provider(
    State(state): State<AppState>,
    admin: AdminUser,
    ip: ClientIp,
    Json(body): Json<CreateProvider>,
) -> ApiResult<(StatusCode, Json<ProviderView>)> {
    if !crate::validate::provider_key(&body.key) {
        return Err(ApiError::invalid_param(
            "key",
            "key must be 1–64 of [a-z0-9_-]",
        ));
    }
    let fields = KindFields {
        kind: check_kind(body.kind.as_deref().unwrap_or("openai"))?,
        supports_responses: body.supports_responses.unwrap_or(false),
        api_version: body.api_version,
        region: body.region,
    }
    .check()?;
    let base_url = match (&body.base_url, &fields.region) {
        (Some(url), _) => check_provider_url(url)?,
        (None, Some(region)) => crate::validate::bedrock_base_url(region),
        (None, None) => {
            return Err(missing(
                "base_url",
                "base_url is required (only a bedrock provider has a default)",
            ));
        }
    };
    let new = NewProvider {
        display_name: check_display_name(
            "display_name",
            body.display_name.as_deref().unwrap_or(&body.key),
        )?,
        base_url,
        kind: fields.kind,
        is_active: body.is_active.unwrap_or(true),
        sort_order: body.sort_order.unwrap_or(0),
        supports_responses: fields.supports_responses,
        api_version: fields.api_version,
        region: fields.region,
        key: body.key,
    };
    let row = match store::providers::create(&state.db, new).await {
        Ok(row) => row,
        Err(e) if is_unique_violation(&e) => {
            return Err(ApiError::conflict(
                "A provider with this key already exists.",
            ));
        }
        Err(e) => return Err(e.into()),
    };
    state.caches.invalidate_catalog().await;
    audit(
        &state,
        &admin,
        &ip,
        "provider.create",
        format!("provider:{}", row.key),
        Some(serde_json::json!({ "base_url": row.base_url, "kind": row.kind, "is_active": row.is_active })),
    )
    .await?;
    Ok((StatusCode::CREATED, Json(row.into())))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateProvider {
    pub display_name: Option<String>,
    /// A bedrock provider on its region's default endpoint follows a new `region` unless this is
    /// given.
    pub base_url: Option<String>,
    /// Changing the kind clears the fields the new kind does not read (`supports_responses`,
    /// `api_version`, `region`) unless the same body sets them.
    pub kind: Option<String>,
    pub is_active: Option<bool>,
    pub sort_order: Option<i32>,
    pub supports_responses: Option<bool>,
    /// `null` clears it (the `/openai/v1/` API).
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<String>)]
    pub api_version: Option<Option<String>>,
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<String>)]
    pub region: Option<Option<String>>,
}

/// Changes a provider (its key is permanent: models refer to it).
#[utoipa::path(patch, path = "/api/admin/providers/{key}", tag = "catalog", security(("access_token" = [])),
    params(("key" = String, Path, description = "Provider key")),
    request_body = UpdateProvider,
    responses((status = 200, body = ProviderView), (status = 400, body = crate::error::ErrorBody),
              (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody)))]
async fn update_provider(
    State(state): State<AppState>,
    admin: AdminUser,
    ip: ClientIp,
    Path(key): Path<String>,
    Json(body): Json<UpdateProvider>,
) -> ApiResult<Json<ProviderView>> {
    let Some(current) = store::providers::find(&state.db, &key).await? else {
        return Err(ApiError::not_found("provider"));
    };
    let kind = match body.kind.as_deref() {
        Some(k) => check_kind(k)?,
        None => current.kind.clone(),
    };
    let kind_changed = kind != current.kind;
    // A field the body leaves out keeps its value, unless the kind changed to one that does
    // not read it.
    let keep = |reads: bool| !kind_changed || reads;
    let fields = KindFields {
        supports_responses: body
            .supports_responses
            .unwrap_or(current.supports_responses && keep(kind == "openai")),
        api_version: body.api_version.clone().unwrap_or_else(|| {
            current
                .api_version
                .clone()
                .filter(|_| keep(kind == "azure"))
        }),
        region: body
            .region
            .clone()
            .unwrap_or_else(|| current.region.clone().filter(|_| keep(kind == "bedrock"))),
        kind,
    }
    .check()?;
    let base_url = match (&body.base_url, &fields.region) {
        (Some(url), _) => Some(check_provider_url(url)?),
        // Bedrock on its region's default endpoint (or just turned into bedrock): the new
        // region's endpoint.
        (None, Some(region))
            if kind_changed
                || current
                    .region
                    .as_deref()
                    .map(crate::validate::bedrock_base_url)
                    == Some(current.base_url.clone()) =>
        {
            Some(crate::validate::bedrock_base_url(region))
        }
        _ => None,
    };
    let patch = ProviderPatch {
        display_name: body
            .display_name
            .as_deref()
            .map(|s| check_display_name("display_name", s))
            .transpose()?,
        base_url,
        kind: kind_changed.then(|| fields.kind.clone()),
        is_active: body.is_active,
        sort_order: body.sort_order,
        supports_responses: Some(fields.supports_responses),
        api_version: Some(fields.api_version),
        region: Some(fields.region),
    };
    let row = store::providers::update(&state.db, &key, patch)
        .await?
        .ok_or_else(|| ApiError::not_found("provider"))?;
    state.caches.invalidate_catalog().await;
    audit(
        &state,
        &admin,
        &ip,
        "provider.update",
        format!("provider:{key}"),
        Some(serde_json::json!({ "base_url": row.base_url, "kind": row.kind, "is_active": row.is_active })),
    )
    .await?;
    Ok(Json(row.into()))
}

/// Soft delete: the provider becomes inactive, so its models stop being served; its models and
/// keys are kept and come back when it is re-activated with PATCH `{"is_active": true}`.
#[utoipa::path(delete, path = "/api/admin/providers/{key}", tag = "catalog", security(("access_token" = [])),
    params(("key" = String, Path, description = "Provider key")),
    responses((status = 204, description = "Deactivated"), (status = 403, body = crate::error::ErrorBody),
              (status = 404, body = crate::error::ErrorBody)))]
async fn delete_provider(
    State(state): State<AppState>,
    admin: AdminUser,
    ip: ClientIp,
    Path(key): Path<String>,
) -> ApiResult<StatusCode> {
    store::providers::update(
        &state.db,
        &key,
        ProviderPatch {
            is_active: Some(false),
            ..Default::default()
        },
    )
    .await?
    .ok_or_else(|| ApiError::not_found("provider"))?;
    state.caches.invalidate_catalog().await;
    audit(
        &state,
        &admin,
        &ip,
        "provider.delete",
        format!("provider:{key}"),
        None,
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

// ---------------------------------------------------------------------------------------------
// Models

/// A catalog model. Token prices are USD per 1M tokens; `price_per_*` are USD per unit.
#[derive(Debug, Serialize, ToSchema)]
pub struct ModelView {
    pub id: String,
    /// What clients send as `model`.
    pub name: String,
    pub display_name: String,
    /// The provider's key.
    pub provider: String,
    /// The model name sent upstream.
    pub upstream_model: String,
    /// `chat` | `completion` | `embedding` | `image` | `audio` | `moderation` | `realtime`.
    #[serde(rename = "type")]
    #[schema(rename = "type")]
    pub model_type: String,
    pub input_price_per_1m: f64,
    pub output_price_per_1m: f64,
    /// `null`: cached (cache-read) input tokens cost the input price.
    pub cached_input_price_per_1m: Option<f64>,
    /// `null`: cache-write input tokens (Anthropic's cache creation) cost the input price.
    pub cache_write_input_price_per_1m: Option<f64>,
    /// USD per image generated, when the upstream reports no token usage; `null`: free.
    pub price_per_image: Option<f64>,
    /// USD per minute of audio, when the upstream reports no token usage; `null`: free.
    pub price_per_minute: Option<f64>,
    /// USD per 1M characters of input (text to speech); `null`: free.
    pub price_per_1m_chars: Option<f64>,
    pub context_window: Option<i32>,
    pub max_output_tokens: Option<i32>,
    pub supports_streaming: bool,
    pub supports_tools: bool,
    pub supports_vision: bool,
    pub description: Option<String>,
    pub is_active: bool,
    pub sort_order: i32,
    /// Where the model is served: the lowest `priority` tier with a healthy deployment takes
    /// the requests, shared by `weight`. One entry (`provider`, `upstream_model`) for most models.
    pub deployments: Vec<DeploymentSpec>,
    /// Catalog models tried in order when every deployment failed or the context was too long.
    pub fallbacks: Vec<String>,
    pub created_at: String,
    pub updated_at: String,
}

impl From<entity::models::Model> for ModelView {
    fn from(m: entity::models::Model) -> Self {
        let deployments = deployment::specs_of(&m);
        let fallbacks = deployment::fallbacks_of(&m);
        Self {
            deployments,
            fallbacks,
            id: m.id,
            name: m.name,
            display_name: m.display_name,
            provider: m.provider_key,
            upstream_model: m.upstream_model,
            model_type: m.model_type,
            input_price_per_1m: nanos_to_usd(m.input_price_nanos),
            output_price_per_1m: nanos_to_usd(m.output_price_nanos),
            cached_input_price_per_1m: m.cached_input_price_nanos.map(nanos_to_usd),
            cache_write_input_price_per_1m: m.cache_write_input_price_nanos.map(nanos_to_usd),
            price_per_image: m.price_per_image_nanos.map(nanos_to_usd),
            price_per_minute: m.price_per_minute_nanos.map(nanos_to_usd),
            price_per_1m_chars: m.price_per_1m_chars_nanos.map(nanos_to_usd),
            context_window: m.context_window,
            max_output_tokens: m.max_output_tokens,
            supports_streaming: m.supports_streaming,
            supports_tools: m.supports_tools,
            supports_vision: m.supports_vision,
            description: m.description,
            is_active: m.is_active,
            sort_order: m.sort_order,
            created_at: rfc3339(m.created_at),
            updated_at: rfc3339(m.updated_at),
        }
    }
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ModelListParams {
    /// Default true: only models `/v1` serves (active, on an active provider). `false` lists all.
    pub active_only: Option<bool>,
    /// A provider key.
    pub provider: Option<String>,
    /// `chat` | `completion` | `embedding` | `image` | `audio` | `moderation` | `realtime`.
    #[serde(rename = "type")]
    #[param(rename = "type")]
    pub model_type: Option<String>,
}

const MODEL_TYPES: [&str; 7] = [
    "chat",
    "completion",
    "embedding",
    "image",
    "audio",
    "moderation",
    "realtime",
];

fn check_model_type(t: &str) -> ApiResult<String> {
    if !MODEL_TYPES.contains(&t) {
        return Err(ApiError::invalid_param(
            "type",
            format!("type must be one of {}", MODEL_TYPES.join(", ")),
        ));
    }
    Ok(t.to_owned())
}

/// The catalog with prices, by `sort_order` then name. Public: no sign-in needed.
#[utoipa::path(get, path = "/api/models", tag = "catalog",
    params(PageParams, ModelListParams),
    responses((status = 200, body = Paginated<ModelView>), (status = 400, body = crate::error::ErrorBody)))]
async fn list_models(
    State(state): State<AppState>,
    Query(page): Query<PageParams>,
    Query(p): Query<ModelListParams>,
) -> ApiResult<Json<Paginated<ModelView>>> {
    let filter = ModelFilter {
        active_only: p.active_only.unwrap_or(true),
        provider_key: p.provider,
        model_type: p.model_type.as_deref().map(check_model_type).transpose()?,
    };
    let req = page.req()?;
    let rows = store::models::list(&state.db, &filter, req).await?;
    Ok(Json(Paginated::new(rows, req, ModelView::from)))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateModel {
    /// What clients send as `model`; unique. 1–128 characters, no spaces.
    pub name: String,
    /// Default: the name.
    pub display_name: Option<String>,
    /// A provider key (one deployment); required unless `deployments` is given.
    pub provider: Option<String>,
    /// Several deployments (1–16) instead of `provider` / `upstream_model`.
    pub deployments: Option<Vec<DeploymentSpec>>,
    /// Catalog model names (at most 8) tried in order when every deployment failed.
    pub fallbacks: Option<Vec<String>>,
    /// Default: the name.
    pub upstream_model: Option<String>,
    /// `chat` (default) | `completion` | `embedding` | `image` | `audio` | `moderation` |
    /// `realtime`.
    #[serde(rename = "type")]
    #[schema(rename = "type")]
    pub model_type: Option<String>,
    /// USD per 1M input tokens (default 0).
    pub input_price_per_1m: Option<f64>,
    /// USD per 1M output tokens (default 0).
    pub output_price_per_1m: Option<f64>,
    /// USD per 1M cached (cache-read) input tokens; absent = the input price.
    pub cached_input_price_per_1m: Option<f64>,
    /// USD per 1M cache-write input tokens; absent = the input price.
    pub cache_write_input_price_per_1m: Option<f64>,
    /// USD per image (when the upstream reports no token usage); absent = free.
    pub price_per_image: Option<f64>,
    /// USD per minute of audio (when the upstream reports no token usage); absent = free.
    pub price_per_minute: Option<f64>,
    /// USD per 1M characters of input (speech); absent = free.
    pub price_per_1m_chars: Option<f64>,
    pub context_window: Option<i32>,
    pub max_output_tokens: Option<i32>,
    /// Default true.
    pub supports_streaming: Option<bool>,
    /// Default false.
    pub supports_tools: Option<bool>,
    /// Default false.
    pub supports_vision: Option<bool>,
    pub description: Option<String>,
    /// Default true.
    pub is_active: Option<bool>,
    /// Default 0.
    pub sort_order: Option<i32>,
}

fn check_model_name(param: &str, s: &str) -> ApiResult<String> {
    if s.is_empty()
        || s.chars().count() > 128
        || s.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(ApiError::invalid_param(
            param,
            format!("{param} must be 1–128 characters without spaces"),
        ));
    }
    Ok(s.to_owned())
}

/// A price in USD → nano-dollars; finite, ≥ 0, at most $1M (per 1M tokens, per image, …).
fn check_price(param: &str, usd: f64) -> ApiResult<i64> {
    if !usd.is_finite() || !(0.0..=1_000_000.0).contains(&usd) {
        let unit = match param {
            "price_per_image" => "USD per image",
            "price_per_minute" => "USD per minute of audio",
            "price_per_1m_chars" => "USD per 1M characters",
            _ => "USD per 1M tokens",
        };
        return Err(ApiError::invalid_param(
            param,
            format!("{param} must be a number between 0 and 1000000 ({unit})"),
        ));
    }
    Ok(usd_to_nanos(usd))
}

/// An optional price (create): absent stays absent.
fn check_opt_price(param: &str, usd: Option<f64>) -> ApiResult<Option<i64>> {
    usd.map(|p| check_price(param, p)).transpose()
}

/// A nullable price (patch): absent = unchanged, `null` = cleared.
fn check_patch_price(param: &str, usd: Option<Option<f64>>) -> ApiResult<Option<Option<i64>>> {
    usd.map(|o| check_opt_price(param, o)).transpose()
}

fn check_tokens(param: &str, v: i32) -> ApiResult<i32> {
    if v < 1 {
        return Err(ApiError::invalid_param(
            param,
            format!("{param} must be at least 1"),
        ));
    }
    Ok(v)
}

fn check_description(s: String) -> ApiResult<String> {
    if s.chars().count() > 4000 {
        return Err(ApiError::invalid_param(
            "description",
            "must be at most 4000 characters",
        ));
    }
    Ok(s)
}

/// A deployment list checked (spec §11: known active providers, weights 1–100) and ordered by
/// tier: the first deployment's provider and upstream model (the row's own columns), and the
/// list to store (`None` for a single deployment).
async fn checked_deployments(
    state: &AppState,
    mut specs: Vec<DeploymentSpec>,
    default_upstream: &str,
    param: &str,
) -> ApiResult<(String, String, Option<String>)> {
    let providers: std::collections::HashMap<String, bool> = store::providers::all(&state.db)
        .await?
        .into_iter()
        .map(|p| (p.key, p.is_active))
        .collect();
    deployment::check_deployments(&specs, &providers)
        .map_err(|r| ApiError::invalid_param(param, r.message))?;
    specs.sort_by_key(|s| s.priority);
    for s in &mut specs {
        if s.upstream_model.is_none() {
            s.upstream_model = Some(default_upstream.to_owned());
        }
    }
    let first = &specs[0];
    let provider = first.provider.clone();
    let upstream = first
        .upstream_model
        .clone()
        .unwrap_or_else(|| default_upstream.to_owned());
    let stored = (specs.len() > 1)
        .then(|| serde_json::to_string(&specs))
        .transpose()
        .map_err(|e| ApiError::internal(anyhow::anyhow!(e)))?;
    Ok((provider, upstream, stored))
}

/// A fallback list checked against the catalog (existing models, no cycle); `None` when empty.
/// `id`: the model being changed (its stored fallbacks are replaced by these).
async fn checked_fallbacks(
    state: &AppState,
    id: Option<&str>,
    name: &str,
    fallbacks: Vec<String>,
) -> ApiResult<Option<String>> {
    let edges: std::collections::HashMap<String, Vec<String>> = store::models::all(&state.db)
        .await?
        .iter()
        .filter(|m| Some(m.id.as_str()) != id)
        .map(|m| (m.name.clone(), deployment::fallbacks_of(m)))
        .collect();
    deployment::check_fallbacks(name, &fallbacks, &edges)
        .map_err(|r| ApiError::invalid_param(r.param, r.message))?;
    if fallbacks.is_empty() {
        return Ok(None);
    }
    serde_json::to_string(&fallbacks)
        .map(Some)
        .map_err(|e| ApiError::internal(anyhow::anyhow!(e)))
}

fn duplicate_model() -> ApiError {
    ApiError::conflict("A model with this name already exists.")
}

/// Adds a model to the catalog.
#[utoipa::path(post, path = "/api/admin/models", tag = "catalog", security(("access_token" = [])),
    request_body = CreateModel,
    responses((status = 201, body = ModelView), (status = 400, body = crate::error::ErrorBody),
              (status = 403, body = crate::error::ErrorBody), (status = 409, body = crate::error::ErrorBody)))]
async fn create_model(
    State(state): State<AppState>,
    admin: AdminUser,
    ip: ClientIp,
    Json(b): Json<CreateModel>,
) -> ApiResult<(StatusCode, Json<ModelView>)> {
    let name = check_model_name("name", &b.name)?;
    let new = NewModel {
        display_name: check_display_name(
            "display_name",
            b.display_name.as_deref().unwrap_or(&name),
        )?,
        upstream_model: check_model_name(
            "upstream_model",
            b.upstream_model.as_deref().unwrap_or(&name),
        )?,
        provider_key: String::new(),
        model_type: check_model_type(b.model_type.as_deref().unwrap_or("chat"))?,
        input_price_nanos: check_price("input_price_per_1m", b.input_price_per_1m.unwrap_or(0.0))?,
        output_price_nanos: check_price(
            "output_price_per_1m",
            b.output_price_per_1m.unwrap_or(0.0),
        )?,
        cached_input_price_nanos: check_opt_price(
            "cached_input_price_per_1m",
            b.cached_input_price_per_1m,
        )?,
        cache_write_input_price_nanos: check_opt_price(
            "cache_write_input_price_per_1m",
            b.cache_write_input_price_per_1m,
        )?,
        price_per_image_nanos: check_opt_price("price_per_image", b.price_per_image)?,
        price_per_minute_nanos: check_opt_price("price_per_minute", b.price_per_minute)?,
        price_per_1m_chars_nanos: check_opt_price("price_per_1m_chars", b.price_per_1m_chars)?,
        context_window: b
            .context_window
            .map(|v| check_tokens("context_window", v))
            .transpose()?,
        max_output_tokens: b
            .max_output_tokens
            .map(|v| check_tokens("max_output_tokens", v))
            .transpose()?,
        supports_streaming: b.supports_streaming.unwrap_or(true),
        supports_tools: b.supports_tools.unwrap_or(false),
        supports_vision: b.supports_vision.unwrap_or(false),
        description: b.description.map(check_description).transpose()?,
        is_active: b.is_active.unwrap_or(true),
        sort_order: b.sort_order.unwrap_or(0),
        deployments: None,
        fallbacks: None,
        name,
    };
    let mut new = new;
    let param = if b.deployments.is_some() {
        "deployments"
    } else {
        "provider"
    };
    let specs = match (b.provider, b.deployments) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid_param(
                "deployments",
                "give either provider (and upstream_model) or deployments, not both",
            ));
        }
        (None, None) => {
            return Err(ApiError::invalid_param(
                "provider",
                "provider (or deployments) is required",
            ));
        }
        (Some(p), None) => vec![DeploymentSpec {
            provider: p,
            upstream_model: Some(new.upstream_model.clone()),
            weight: 1,
            priority: 0,
        }],
        (None, Some(d)) => d,
    };
    (new.provider_key, new.upstream_model, new.deployments) =
        checked_deployments(&state, specs, &new.upstream_model, param).await?;
    if let Some(f) = b.fallbacks {
        new.fallbacks = checked_fallbacks(&state, None, &new.name, f).await?;
    }
    let row = match store::models::create(&state.db, new).await {
        Ok(row) => row,
        Err(e) if is_unique_violation(&e) => return Err(duplicate_model()),
        Err(e) => return Err(e.into()),
    };
    state.caches.invalidate_catalog().await;
    audit(
        &state,
        &admin,
        &ip,
        "model.create",
        format!("model:{}", row.id),
        Some(serde_json::json!({ "name": row.name, "provider": row.provider_key })),
    )
    .await?;
    Ok((StatusCode::CREATED, Json(row.into())))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateModel {
    pub name: Option<String>,
    pub display_name: Option<String>,
    /// The (first) deployment's provider.
    pub provider: Option<String>,
    /// Replaces every deployment (1–16).
    pub deployments: Option<Vec<DeploymentSpec>>,
    /// Replaces the fallback models (`[]` for none).
    pub fallbacks: Option<Vec<String>>,
    pub upstream_model: Option<String>,
    #[serde(rename = "type")]
    #[schema(rename = "type")]
    pub model_type: Option<String>,
    pub input_price_per_1m: Option<f64>,
    pub output_price_per_1m: Option<f64>,
    /// `null` clears it (cached tokens then cost the input price).
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<f64>)]
    pub cached_input_price_per_1m: Option<Option<f64>>,
    /// `null` clears it (cache-write tokens then cost the input price).
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<f64>)]
    pub cache_write_input_price_per_1m: Option<Option<f64>>,
    /// `null` clears it (images are then free).
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<f64>)]
    pub price_per_image: Option<Option<f64>>,
    /// `null` clears it (audio is then free).
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<f64>)]
    pub price_per_minute: Option<Option<f64>>,
    /// `null` clears it (characters are then free).
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<f64>)]
    pub price_per_1m_chars: Option<Option<f64>>,
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<i32>)]
    pub context_window: Option<Option<i32>>,
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<i32>)]
    pub max_output_tokens: Option<Option<i32>>,
    pub supports_streaming: Option<bool>,
    pub supports_tools: Option<bool>,
    pub supports_vision: Option<bool>,
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<String>)]
    pub description: Option<Option<String>>,
    pub is_active: Option<bool>,
    pub sort_order: Option<i32>,
}

/// Changes a model. Renaming it does not rewrite gateway keys' `allowed_models`.
#[utoipa::path(patch, path = "/api/admin/models/{id}", tag = "catalog", security(("access_token" = [])),
    params(("id" = String, Path, description = "Model id")),
    request_body = UpdateModel,
    responses((status = 200, body = ModelView), (status = 400, body = crate::error::ErrorBody),
              (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody),
              (status = 409, body = crate::error::ErrorBody)))]
async fn update_model(
    State(state): State<AppState>,
    admin: AdminUser,
    ip: ClientIp,
    Path(id): Path<String>,
    Json(b): Json<UpdateModel>,
) -> ApiResult<Json<ModelView>> {
    let patch = ModelPatch {
        name: b
            .name
            .as_deref()
            .map(|s| check_model_name("name", s))
            .transpose()?,
        display_name: b
            .display_name
            .as_deref()
            .map(|s| check_display_name("display_name", s))
            .transpose()?,
        provider_key: b.provider.clone(),
        upstream_model: b
            .upstream_model
            .as_deref()
            .map(|s| check_model_name("upstream_model", s))
            .transpose()?,
        model_type: b.model_type.as_deref().map(check_model_type).transpose()?,
        input_price_nanos: b
            .input_price_per_1m
            .map(|p| check_price("input_price_per_1m", p))
            .transpose()?,
        output_price_nanos: b
            .output_price_per_1m
            .map(|p| check_price("output_price_per_1m", p))
            .transpose()?,
        cached_input_price_nanos: check_patch_price(
            "cached_input_price_per_1m",
            b.cached_input_price_per_1m,
        )?,
        cache_write_input_price_nanos: check_patch_price(
            "cache_write_input_price_per_1m",
            b.cache_write_input_price_per_1m,
        )?,
        price_per_image_nanos: check_patch_price("price_per_image", b.price_per_image)?,
        price_per_minute_nanos: check_patch_price("price_per_minute", b.price_per_minute)?,
        price_per_1m_chars_nanos: check_patch_price("price_per_1m_chars", b.price_per_1m_chars)?,
        context_window: b
            .context_window
            .map(|o| o.map(|v| check_tokens("context_window", v)).transpose())
            .transpose()?,
        max_output_tokens: b
            .max_output_tokens
            .map(|o| o.map(|v| check_tokens("max_output_tokens", v)).transpose())
            .transpose()?,
        supports_streaming: b.supports_streaming,
        supports_tools: b.supports_tools,
        supports_vision: b.supports_vision,
        description: b
            .description
            .map(|o| o.map(check_description).transpose())
            .transpose()?,
        is_active: b.is_active,
        sort_order: b.sort_order,
        deployments: None,
        fallbacks: None,
    };
    let mut patch = patch;
    let Some(before) = store::models::find(&state.db, &id).await? else {
        return Err(ApiError::not_found("model"));
    };
    if b.deployments.is_some() && (patch.provider_key.is_some() || patch.upstream_model.is_some()) {
        return Err(ApiError::invalid_param(
            "deployments",
            "give either provider / upstream_model or deployments, not both",
        ));
    }
    let name = patch.name.clone().unwrap_or_else(|| before.name.clone());
    let default_upstream = patch
        .upstream_model
        .clone()
        .unwrap_or_else(|| before.upstream_model.clone());
    let param = if b.deployments.is_some() {
        "deployments"
    } else {
        "provider"
    };
    let specs = match b.deployments {
        Some(d) => Some(d),
        None if patch.provider_key.is_some() || patch.upstream_model.is_some() => {
            // The first deployment changes; the others stay.
            let mut specs = deployment::specs_of(&before);
            if let Some(first) = specs.first_mut() {
                if let Some(p) = &patch.provider_key {
                    first.provider.clone_from(p);
                }
                if let Some(u) = &patch.upstream_model {
                    first.upstream_model = Some(u.clone());
                }
            }
            Some(specs)
        }
        None => None,
    };
    if let Some(specs) = specs {
        let (provider, upstream, stored) =
            checked_deployments(&state, specs, &default_upstream, param).await?;
        patch.provider_key = Some(provider);
        patch.upstream_model = Some(upstream);
        patch.deployments = Some(stored);
    }
    if let Some(f) = b.fallbacks {
        patch.fallbacks = Some(checked_fallbacks(&state, Some(&id), &name, f).await?);
    }
    let row = match store::models::update(&state.db, &id, patch).await {
        Ok(Some(row)) => row,
        Ok(None) => return Err(ApiError::not_found("model")),
        Err(e) if is_unique_violation(&e) => return Err(duplicate_model()),
        Err(e) => return Err(e.into()),
    };
    state.caches.invalidate_catalog().await;
    audit(
        &state,
        &admin,
        &ip,
        "model.update",
        format!("model:{id}"),
        Some(serde_json::json!({ "name": row.name, "is_active": row.is_active })),
    )
    .await?;
    Ok(Json(row.into()))
}

/// Hard delete: the model leaves the catalog. Usage records keep its name; to stop serving a
/// model but keep it listed for admins, toggle it instead.
#[utoipa::path(delete, path = "/api/admin/models/{id}", tag = "catalog", security(("access_token" = [])),
    params(("id" = String, Path, description = "Model id")),
    responses((status = 204, description = "Deleted"), (status = 403, body = crate::error::ErrorBody),
              (status = 404, body = crate::error::ErrorBody)))]
async fn delete_model(
    State(state): State<AppState>,
    admin: AdminUser,
    ip: ClientIp,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let Some(row) = store::models::find(&state.db, &id).await? else {
        return Err(ApiError::not_found("model"));
    };
    if !store::models::delete(&state.db, &id).await? {
        return Err(ApiError::not_found("model"));
    }
    state.caches.invalidate_catalog().await;
    audit(
        &state,
        &admin,
        &ip,
        "model.delete",
        format!("model:{id}"),
        Some(serde_json::json!({ "name": row.name })),
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Switches a model on or off (`is_active`).
#[utoipa::path(post, path = "/api/admin/models/{id}/toggle", tag = "catalog", security(("access_token" = [])),
    params(("id" = String, Path, description = "Model id")),
    responses((status = 200, body = ModelView), (status = 403, body = crate::error::ErrorBody),
              (status = 404, body = crate::error::ErrorBody)))]
async fn toggle_model(
    State(state): State<AppState>,
    admin: AdminUser,
    ip: ClientIp,
    Path(id): Path<String>,
) -> ApiResult<Json<ModelView>> {
    let row = store::models::toggle(&state.db, &id)
        .await?
        .ok_or_else(|| ApiError::not_found("model"))?;
    state.caches.invalidate_catalog().await;
    audit(
        &state,
        &admin,
        &ip,
        "model.toggle",
        format!("model:{id}"),
        Some(serde_json::json!({ "is_active": row.is_active })),
    )
    .await?;
    Ok(Json(row.into()))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReorderItem {
    pub id: String,
    pub sort_order: i32,
}

/// The reordered models.
#[derive(Debug, Serialize, ToSchema)]
pub struct ModelList {
    pub data: Vec<ModelView>,
}

/// Sets `sort_order` on several models at once (all or nothing); returns them in the new order.
#[utoipa::path(post, path = "/api/admin/models/reorder", tag = "catalog", security(("access_token" = [])),
    request_body = Vec<ReorderItem>,
    responses((status = 200, body = ModelList), (status = 400, body = crate::error::ErrorBody),
              (status = 403, body = crate::error::ErrorBody)))]
async fn reorder_models(
    State(state): State<AppState>,
    admin: AdminUser,
    ip: ClientIp,
    Json(items): Json<Vec<ReorderItem>>,
) -> ApiResult<Json<ModelList>> {
    if items.is_empty() || items.len() > 1000 {
        return Err(ApiError::bad_request(
            "invalid_value",
            "Send between 1 and 1000 {id, sort_order} items.",
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for it in &items {
        if !seen.insert(it.id.as_str()) {
            return Err(ApiError::invalid_param(
                "id",
                format!("model {:?} is listed twice", it.id),
            ));
        }
    }
    let order: Vec<(String, i32)> = items.into_iter().map(|i| (i.id, i.sort_order)).collect();
    let missing = store::models::reorder(&state.db, &order).await?;
    if let Some(first) = missing.first() {
        return Err(ApiError::invalid_param(
            "id",
            format!("unknown model id {first:?}"),
        ));
    }
    state.caches.invalidate_catalog().await;
    let ids: Vec<String> = order.iter().map(|(id, _)| id.clone()).collect();
    audit(
        &state,
        &admin,
        &ip,
        "model.reorder",
        "models".to_owned(),
        Some(serde_json::json!({ "count": ids.len() })),
    )
    .await?;
    let rows = store::models::find_many(&state.db, &ids).await?;
    Ok(Json(ModelList {
        data: rows.into_iter().map(ModelView::from).collect(),
    }))
}
