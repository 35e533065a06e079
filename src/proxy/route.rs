//! ③ route: catalog model → its provider → the provider key this user's request uses (their own,
//! else a shared platform key), opened with the master key ring.

use std::sync::Arc;

use secrecy::SecretString;

use crate::cache::{CatalogModel, KeyCtx};
use crate::error::ApiError;
use crate::providers::{self, Adapter, Endpoint, Target, Translator};
use crate::routing::plan::{Pick, Plan};
use crate::state::AppState;

/// Where and how to send one request.
pub struct Route {
    /// The zero-copy pass-through, for a client that speaks the provider's protocol (OpenAI
    /// chat, completions, embeddings to an `openai` provider).
    pub adapter: Option<&'static dyn Adapter>,
    /// The pivot translation (every kind but plain pass-through).
    pub translator: Option<&'static dyn Translator>,
    /// The provider's `kind`.
    pub kind: String,
    /// The pass-through URL (the adapter's), empty without an adapter.
    pub url: String,
    /// The base URL in use (the user's own `base_url`, else the provider's).
    pub base_url: String,
    pub upstream_model: String,
    pub api_version: Option<String>,
    pub region: Option<String>,
    /// The provider serves OpenAI's `/responses` (requests go there untranslated).
    pub supports_responses: bool,
    /// The model's `max_output_tokens`, else 4096: sent where an upstream requires a bound.
    pub default_max_tokens: u64,
    pub provider_key: Arc<SecretString>,
    pub shared_key: bool,
    pub provider_key_id: String,
    /// The URL is a user's own `base_url`: connect only to public addresses.
    pub guarded: bool,
}

impl std::fmt::Debug for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Route")
            .field("url", &self.url)
            .field("shared_key", &self.shared_key)
            .finish_non_exhaustive()
    }
}

impl Route {
    /// What a translator needs to know.
    pub fn target(&self) -> Target<'_> {
        Target {
            base_url: &self.base_url,
            upstream_model: &self.upstream_model,
            api_version: self.api_version.as_deref(),
            region: self.region.as_deref(),
            default_max_tokens: self.default_max_tokens,
        }
    }

    /// The client speaks the provider's own protocol: the body passes through.
    pub fn passes_through(&self, endpoint: Endpoint) -> bool {
        match endpoint {
            Endpoint::ChatCompletions | Endpoint::Completions | Endpoint::Embeddings => {
                self.adapter.is_some()
            }
            Endpoint::Messages | Endpoint::CountTokens => self.kind == "anthropic",
            Endpoint::Responses => self.supports_responses,
            Endpoint::Conversations | Endpoint::StoredResponses | Endpoint::StoredCompletions => {
                false
            }
            // OpenAI's own operations: an OpenAI-compatible upstream or Azure (`proxy::media`).
            Endpoint::ImageGenerations
            | Endpoint::ImageEdits
            | Endpoint::ImageVariations
            | Endpoint::AudioSpeech
            | Endpoint::AudioTranscriptions
            | Endpoint::AudioTranslations
            | Endpoint::Moderations => self.adapter.is_some() || self.kind == "azure",
            // The WebSocket is relayed to OpenAI-compatible upstreams (`proxy::realtime`).
            Endpoint::Realtime => self.adapter.is_some(),
        }
    }
}

/// The model can serve `endpoint` (its type), else 400.
pub fn check_endpoint(model: &CatalogModel, endpoint: Endpoint) -> Result<(), ApiError> {
    if model.model.model_type != endpoint.model_type() {
        return Err(ApiError::invalid_param(
            "model",
            format!(
                "The model `{}` is a {} model and cannot be used with /v1/{}.",
                model.model.name,
                model.model.model_type,
                endpoint.path().trim_start_matches('/')
            ),
        ));
    }
    Ok(())
}

/// 400 `provider_key_missing` for a model none of whose providers the user has a key for.
pub fn key_missing(model: &CatalogModel) -> ApiError {
    ApiError::BadRequest {
        message: format!(
            "You have no usable API key for the provider `{}` (none, disabled, or rejected by the provider). Add or fix one with POST /api/provider-keys; POST /api/provider-keys/{{id}}/verify puts a fixed key back.",
            model.provider.key
        ),
        code: "provider_key_missing",
        param: Some("model".into()),
    }
}

/// The route of a request's first attempt (no retries): the model's plan, its first pick.
pub async fn route(
    state: &AppState,
    key: &KeyCtx,
    model: &Arc<CatalogModel>,
    endpoint: Endpoint,
) -> Result<Route, ApiError> {
    check_endpoint(model, endpoint)?;
    let mut plan = Plan::new(model.clone());
    load_pools(state, key, &mut plan).await?;
    let pick = plan
        .next(&state.health, true)
        .ok_or_else(|| key_missing(model))?;
    build(state, &plan, pick, endpoint)
}

/// Loads the key pool of every deployment of `plan`'s model (cache hits on the hot path).
pub async fn load_pools(state: &AppState, key: &KeyCtx, plan: &mut Plan) -> Result<(), ApiError> {
    for i in 0..plan.deployments().len() {
        let provider = plan.deployments()[i].provider.clone();
        // Deployments on one provider share a pool: read it once.
        let pool = match (0..i).find(|j| plan.deployments()[*j].provider.key == provider.key) {
            Some(j) => plan.pool(j).cloned(),
            None => Some(
                state
                    .caches
                    .provider_keys(&state.db, &key.user_id, &provider.key)
                    .await?,
            ),
        };
        plan.set_pool(i, pool);
    }
    Ok(())
}

/// The route of one attempt: deployment `pick.deployment` of the plan's model with key
/// `pick.key` of its pool, the key opened with the master key ring.
pub fn build(
    state: &AppState,
    plan: &Plan,
    pick: Pick,
    endpoint: Endpoint,
) -> Result<Route, ApiError> {
    let model = &plan.model;
    let dep = &plan.deployments()[pick.deployment];
    let entry = plan
        .pool(pick.deployment)
        .and_then(|p| p.keys.get(pick.key))
        .ok_or_else(|| key_missing(model))?;
    let provider = &dep.provider;
    let adapter = providers::adapter(&provider.kind);
    let translator = providers::translator(&provider.kind);
    if adapter.is_none() && translator.is_none() {
        return Err(ApiError::internal(anyhow::anyhow!(
            "provider {} has unsupported kind {}",
            provider.key,
            provider.kind
        )));
    }
    if endpoint.media() && !serves_media(&provider.kind) {
        return Err(media_refused(model, endpoint, &provider.kind));
    }
    let secret = entry
        .opened
        .get_or_open(|| state.keyring.open_string(&entry.secret_enc, &entry.id))
        .map_err(|e| {
            ApiError::internal(anyhow::anyhow!(
                "provider key {} does not open: {e}",
                entry.id
            ))
        })?;
    let base = entry.base_url.as_deref().unwrap_or(&provider.base_url);
    Ok(Route {
        adapter,
        translator,
        kind: provider.kind.clone(),
        url: adapter.map(|a| a.url(base, endpoint)).unwrap_or_default(),
        base_url: base.to_owned(),
        upstream_model: dep.upstream_model.clone(),
        api_version: provider.api_version.clone(),
        region: provider.region.clone(),
        // Azure serves the Responses API too (spec §9).
        supports_responses: provider.supports_responses || provider.kind == "azure",
        default_max_tokens: model
            .model
            .max_output_tokens
            .and_then(|n| u64::try_from(n).ok())
            .filter(|n| *n > 0)
            .unwrap_or(4096),
        provider_key: secret,
        shared_key: entry.shared,
        provider_key_id: entry.id.clone(),
        guarded: entry.base_url.is_some(),
    })
}

/// Images, audio and moderations go to OpenAI-compatible and Azure providers only.
fn serves_media(kind: &str) -> bool {
    providers::adapter(kind).is_some() || kind == "azure"
}

fn media_refused(model: &CatalogModel, endpoint: Endpoint, kind: &str) -> ApiError {
    ApiError::invalid_param(
        "model",
        format!(
            "{} is served only by OpenAI-compatible (`openai`) and `azure` providers; the model `{}` is on a `{}` provider.",
            endpoint.v1_path(),
            model.model.name,
            kind
        ),
    )
}

/// A media endpoint on a model none of whose deployments can serve it: refused before any
/// reservation (a deployment that cannot is also refused when an attempt reaches it).
pub fn check_media(plan: &Plan, endpoint: Endpoint) -> Result<(), ApiError> {
    let deployments = plan.deployments();
    if deployments.iter().any(|d| serves_media(&d.provider.kind)) {
        return Ok(());
    }
    let kind = deployments.first().map_or("", |d| d.provider.kind.as_str());
    Err(media_refused(&plan.model, endpoint, kind))
}
