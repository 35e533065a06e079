//! ③ route: catalog model → its provider → the provider key this user's request uses (their own,
//! else a shared platform key), opened with the master key ring.

use std::sync::Arc;

use secrecy::SecretString;

use crate::cache::{CatalogModel, KeyCtx};
use crate::error::ApiError;
use crate::providers::{self, Adapter, Endpoint, Target, Translator};
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
        }
    }
}

pub async fn route(
    state: &AppState,
    key: &KeyCtx,
    model: &Arc<CatalogModel>,
    endpoint: Endpoint,
) -> Result<Route, ApiError> {
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
    let provider = &model.provider;
    let adapter = providers::adapter(&provider.kind);
    let translator = providers::translator(&provider.kind);
    if adapter.is_none() && translator.is_none() {
        return Err(ApiError::internal(anyhow::anyhow!(
            "provider {} has unsupported kind {}",
            provider.key,
            provider.kind
        )));
    }
    if endpoint.media() && adapter.is_none() && provider.kind != "azure" {
        return Err(ApiError::invalid_param(
            "model",
            format!(
                "{} is served only by OpenAI-compatible (`openai`) and `azure` providers; the model `{}` is on a `{}` provider.",
                endpoint.v1_path(),
                model.model.name,
                provider.kind
            ),
        ));
    }
    let entry = state
        .caches
        .provider_key(&state.db, &key.user_id, &provider.key)
        .await?
        .ok_or_else(|| ApiError::BadRequest {
            message: format!(
                "You have no API key for the provider `{}`. Add one with POST /api/provider-keys.",
                provider.key
            ),
            code: "provider_key_missing",
            param: Some("model".into()),
        })?;
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
        upstream_model: model.model.upstream_model.clone(),
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
