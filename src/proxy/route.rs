//! ③ route: catalog model → its provider → the provider key this user's request uses (their own,
//! else a shared platform key), opened with the master key ring.

use std::sync::Arc;

use secrecy::SecretString;

use crate::cache::{CatalogModel, KeyCtx};
use crate::error::ApiError;
use crate::providers::{self, Adapter, Endpoint};
use crate::state::AppState;

/// Where and how to send one request.
pub struct Route {
    pub adapter: &'static dyn Adapter,
    pub url: String,
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
    let adapter = providers::adapter(&provider.kind).ok_or_else(|| {
        ApiError::internal(anyhow::anyhow!(
            "provider {} has unsupported kind {}",
            provider.key,
            provider.kind
        ))
    })?;
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
        url: adapter.url(base, endpoint),
        provider_key: secret,
        shared_key: entry.shared,
        provider_key_id: entry.id.clone(),
        guarded: entry.base_url.is_some(),
    })
}
