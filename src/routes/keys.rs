//! The signed-in user's own keys: provider keys (`/api/provider-keys`, sealed upstream
//! credentials) and gateway keys (`/api/keys`, the `sk-tg-…` secrets SDKs present on `/v1`).
//!
//! Another user's key id is "not found". Every write is audited and invalidates the cache entries
//! the `/v1` hot path reads. Secrets never appear in a response after they were shown once (the
//! gateway key at create / rotate; a provider key never, since the user typed it).

use std::collections::HashSet;

use axum::extract::State;
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use ipnet::IpNet;
use rand::RngExt;
use rand::distr::Alphanumeric;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::catalog::nullable;
use crate::accounts::session::CurrentUser;
use crate::crypto;
use crate::error::{ApiError, ApiResult, Json, Path, Query};
use crate::routes::audit;
use crate::routes::{ClientIp, PageParams, Paginated, rfc3339};
use crate::state::AppState;
use crate::store::gateway_keys::{GatewayKeyPatch, NewGatewayKey};
use crate::store::provider_keys::{NewProviderKey, ProviderKeyPatch};
use crate::store::{self, nanos_to_usd, usd_to_nanos};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_provider_keys, create_provider_key))
        .routes(routes!(update_provider_key, delete_provider_key))
        .routes(routes!(toggle_provider_key))
        .routes(routes!(verify_provider_key))
        .routes(routes!(list_keys, create_key))
        .routes(routes!(get_key, update_key, delete_key))
        .routes(routes!(toggle_key))
        .routes(routes!(rotate_key))
}

fn check_label(s: String) -> ApiResult<String> {
    if s.chars().count() > 128 {
        return Err(ApiError::invalid_param(
            "label",
            "must be at most 128 characters",
        ));
    }
    Ok(s)
}

/// An upstream API key goes into an HTTP header: printable ASCII, no spaces, bounded.
/// A provider key: 1–4096 printable ASCII characters without spaces. A JSON object (Bedrock's
/// `{"access_key_id", "secret_access_key", "session_token"?}`) may be written readably: it is
/// stored compacted.
fn check_api_key(s: &str) -> ApiResult<String> {
    let s = s.trim();
    let compact;
    let s = if s.starts_with('{')
        && let Ok(v @ serde_json::Value::Object(_)) = serde_json::from_str::<serde_json::Value>(s)
    {
        compact = v.to_string();
        compact.as_str()
    } else {
        s
    };
    if s.is_empty() || s.len() > 4096 || !s.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ApiError::invalid_param(
            "api_key",
            "api_key must be 1–4096 printable ASCII characters without spaces (or a JSON object)",
        ));
    }
    Ok(s.to_owned())
}

/// A user-supplied base URL: http(s), and (unless `security.allow_private_base_urls`) not a
/// private, loopback or link-local address, literally or after resolution.
async fn check_user_base_url(state: &AppState, raw: &str) -> ApiResult<String> {
    let url =
        crate::ssrf::check_base_url(raw, state.config.security.allow_private_base_urls).await?;
    if url.len() > 512 {
        return Err(ApiError::invalid_param(
            "base_url",
            "must be at most 512 bytes",
        ));
    }
    Ok(url)
}

/// A pool weight: 1–100 (spec §11).
pub(crate) fn check_weight(w: i32) -> ApiResult<i32> {
    if !(1..=100).contains(&w) {
        return Err(ApiError::invalid_param(
            "weight",
            "weight must be an integer from 1 to 100",
        ));
    }
    Ok(w)
}

fn shared_forbidden() -> ApiError {
    ApiError::forbidden(
        "forbidden",
        "Only administrators can store shared provider keys.",
    )
}

// ---------------------------------------------------------------------------------------------
// Provider keys

/// A stored provider key, masked.
#[derive(Debug, Serialize, ToSchema)]
pub struct ProviderKeyView {
    pub id: String,
    /// The provider's key.
    pub provider: String,
    pub label: Option<String>,
    /// Overrides the provider's base URL for requests with this key.
    pub base_url: Option<String>,
    /// E.g. `sk-ab…wxyz`.
    pub masked: String,
    /// An admin's key that serves every user without a key of their own for this provider.
    pub shared: bool,
    pub is_active: bool,
    /// Share of the pool (1–100) among your keys for this provider.
    pub weight: i32,
    /// `active` | `invalid`: the upstream answered 401/403 with this key, so the gateway no
    /// longer uses it until you edit it or `POST /api/provider-keys/{id}/verify` succeeds.
    pub status: String,
    pub created_at: String,
    pub updated_at: String,
    pub last_used_at: Option<String>,
}

impl From<entity::provider_keys::Model> for ProviderKeyView {
    fn from(k: entity::provider_keys::Model) -> Self {
        Self {
            id: k.id,
            provider: k.provider_key,
            label: k.label,
            base_url: k.base_url,
            masked: k.masked,
            shared: k.shared,
            is_active: k.is_active,
            weight: k.weight,
            status: k.status,
            created_at: rfc3339(k.created_at),
            updated_at: rfc3339(k.updated_at),
            last_used_at: k.last_used_at.map(rfc3339),
        }
    }
}

/// Drops the cache entries a provider key change affects: the owner's, or everyone's when the
/// key is (or was) shared.
async fn invalidate_provider_key(state: &AppState, owner: &str, shared: bool) {
    if shared {
        state.caches.invalidate_all_provider_keys().await;
    } else {
        state.caches.invalidate_provider_keys(owner).await;
    }
}

/// Your provider keys, newest first, masked.
#[utoipa::path(get, path = "/api/provider-keys", tag = "keys", security(("access_token" = [])),
    params(PageParams),
    responses((status = 200, body = Paginated<ProviderKeyView>), (status = 401, body = crate::error::ErrorBody)))]
async fn list_provider_keys(
    State(state): State<AppState>,
    me: CurrentUser,
    Query(page): Query<PageParams>,
) -> ApiResult<Json<Paginated<ProviderKeyView>>> {
    let req = page.req()?;
    let rows = store::provider_keys::list_owned(&state.db, me.id(), req).await?;
    Ok(Json(Paginated::new(rows, req, ProviderKeyView::from)))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateProviderKey {
    /// The provider's key.
    pub provider: String,
    /// The upstream API key; stored encrypted, never shown again (only masked).
    pub api_key: String,
    /// Overrides the provider's base URL; must not be a private address.
    pub base_url: Option<String>,
    pub label: Option<String>,
    /// Admins only: serve every user who has no key of their own for this provider.
    pub shared: Option<bool>,
    /// Share of the pool (1–100, default 1) among your keys for this provider.
    pub weight: Option<i32>,
}

/// Stores a provider key, encrypted (AES-256-GCM under the master key).
#[utoipa::path(post, path = "/api/provider-keys", tag = "keys", security(("access_token" = [])),
    request_body = CreateProviderKey,
    responses((status = 201, body = ProviderKeyView), (status = 400, body = crate::error::ErrorBody),
              (status = 403, body = crate::error::ErrorBody)))]
async fn create_provider_key(
    State(state): State<AppState>,
    me: CurrentUser,
    ip: ClientIp,
    Json(b): Json<CreateProviderKey>,
) -> ApiResult<(StatusCode, Json<ProviderKeyView>)> {
    let shared = b.shared.unwrap_or(false);
    if shared && !me.is_admin() {
        return Err(shared_forbidden());
    }
    let api_key = check_api_key(&b.api_key)?;
    let Some(provider) = store::providers::find(&state.db, &b.provider).await? else {
        return Err(ApiError::invalid_param(
            "provider",
            format!("unknown provider {:?}", b.provider),
        ));
    };
    if provider.kind == "bedrock" {
        crate::providers::bedrock::check_key(&api_key)?;
    }
    let base_url = match b.base_url.as_deref() {
        Some(u) => Some(check_user_base_url(&state, u).await?),
        None => None,
    };
    let label = b.label.map(check_label).transpose()?;
    let row = store::provider_keys::create(
        &state.db,
        &state.keyring,
        NewProviderKey {
            user_id: me.id(),
            provider_key: &b.provider,
            api_key: &api_key,
            base_url,
            label,
            shared,
            weight: check_weight(b.weight.unwrap_or(1))?,
        },
    )
    .await?;
    invalidate_provider_key(&state, me.id(), row.shared).await;
    audit(
        &state,
        &me,
        &ip,
        "provider_key.create",
        format!("provider_key:{}", row.id),
        Some(serde_json::json!({ "provider": row.provider_key, "shared": row.shared })),
    )
    .await?;
    Ok((StatusCode::CREATED, Json(row.into())))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateProviderKey {
    /// A new upstream secret (replaces the stored one).
    pub api_key: Option<String>,
    /// `null` clears the override.
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<String>)]
    pub base_url: Option<Option<String>>,
    /// `null` clears it.
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<String>)]
    pub label: Option<Option<String>>,
    /// Admins only when setting it to true.
    pub shared: Option<bool>,
    pub is_active: Option<bool>,
    /// Share of the pool (1–100).
    pub weight: Option<i32>,
}

/// Changes one of your provider keys.
#[utoipa::path(patch, path = "/api/provider-keys/{id}", tag = "keys", security(("access_token" = [])),
    params(("id" = String, Path, description = "Provider key id")),
    request_body = UpdateProviderKey,
    responses((status = 200, body = ProviderKeyView), (status = 400, body = crate::error::ErrorBody),
              (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody)))]
async fn update_provider_key(
    State(state): State<AppState>,
    me: CurrentUser,
    ip: ClientIp,
    Path(id): Path<String>,
    Json(b): Json<UpdateProviderKey>,
) -> ApiResult<Json<ProviderKeyView>> {
    let before = store::provider_keys::find_owned(&state.db, me.id(), &id)
        .await?
        .ok_or_else(|| ApiError::not_found("provider key"))?;
    if b.shared == Some(true) && !me.is_admin() {
        return Err(shared_forbidden());
    }
    let api_key = b.api_key.as_deref().map(check_api_key).transpose()?;
    if let Some(k) = &api_key
        && store::providers::find(&state.db, &before.provider_key)
            .await?
            .is_some_and(|p| p.kind == "bedrock")
    {
        crate::providers::bedrock::check_key(k)?;
    }
    let base_url = match b.base_url {
        Some(Some(u)) => Some(Some(check_user_base_url(&state, &u).await?)),
        Some(None) => Some(None),
        None => None,
    };
    let mut fields: Vec<&str> = Vec::new();
    for (set, name) in [
        (api_key.is_some(), "api_key"),
        (base_url.is_some(), "base_url"),
        (b.label.is_some(), "label"),
        (b.shared.is_some(), "shared"),
        (b.is_active.is_some(), "is_active"),
        (b.weight.is_some(), "weight"),
    ] {
        if set {
            fields.push(name);
        }
    }
    let patch = ProviderKeyPatch {
        api_key,
        base_url,
        label: b
            .label
            .map(|o| o.map(check_label).transpose())
            .transpose()?,
        shared: b.shared,
        is_active: b.is_active,
        weight: b.weight.map(check_weight).transpose()?,
    };
    let row = store::provider_keys::update_owned(&state.db, &state.keyring, me.id(), &id, patch)
        .await?
        .ok_or_else(|| ApiError::not_found("provider key"))?;
    state.health.key_restored(&id);
    invalidate_provider_key(&state, me.id(), before.shared || row.shared).await;
    audit(
        &state,
        &me,
        &ip,
        "provider_key.update",
        format!("provider_key:{id}"),
        Some(serde_json::json!({ "fields": fields })),
    )
    .await?;
    Ok(Json(row.into()))
}

/// Deletes one of your provider keys (hard delete: the ciphertext is gone).
#[utoipa::path(delete, path = "/api/provider-keys/{id}", tag = "keys", security(("access_token" = [])),
    params(("id" = String, Path, description = "Provider key id")),
    responses((status = 204, description = "Deleted"), (status = 404, body = crate::error::ErrorBody)))]
async fn delete_provider_key(
    State(state): State<AppState>,
    me: CurrentUser,
    ip: ClientIp,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let row = store::provider_keys::delete_owned(&state.db, me.id(), &id)
        .await?
        .ok_or_else(|| ApiError::not_found("provider key"))?;
    invalidate_provider_key(&state, me.id(), row.shared).await;
    audit(
        &state,
        &me,
        &ip,
        "provider_key.delete",
        format!("provider_key:{id}"),
        Some(serde_json::json!({ "provider": row.provider_key })),
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Switches one of your provider keys on or off.
#[utoipa::path(post, path = "/api/provider-keys/{id}/toggle", tag = "keys", security(("access_token" = [])),
    params(("id" = String, Path, description = "Provider key id")),
    responses((status = 200, body = ProviderKeyView), (status = 404, body = crate::error::ErrorBody)))]
async fn toggle_provider_key(
    State(state): State<AppState>,
    me: CurrentUser,
    ip: ClientIp,
    Path(id): Path<String>,
) -> ApiResult<Json<ProviderKeyView>> {
    let before = store::provider_keys::find_owned(&state.db, me.id(), &id)
        .await?
        .ok_or_else(|| ApiError::not_found("provider key"))?;
    let row = store::provider_keys::update_owned(
        &state.db,
        &state.keyring,
        me.id(),
        &id,
        ProviderKeyPatch {
            is_active: Some(!before.is_active),
            ..Default::default()
        },
    )
    .await?
    .ok_or_else(|| ApiError::not_found("provider key"))?;
    invalidate_provider_key(&state, me.id(), row.shared).await;
    audit(
        &state,
        &me,
        &ip,
        "provider_key.toggle",
        format!("provider_key:{id}"),
        Some(serde_json::json!({ "is_active": row.is_active })),
    )
    .await?;
    Ok(Json(row.into()))
}

/// Checks one of your provider keys against its provider (its models list, or a one-token call
/// where the provider has no OpenAI-compatible list). A key the provider accepts is back in use
/// (`status: active`); one it refuses (401/403) is marked `invalid`.
#[utoipa::path(post, path = "/api/provider-keys/{id}/verify", tag = "keys", security(("access_token" = [])),
    params(("id" = String, Path, description = "Provider key id")),
    responses((status = 200, body = crate::routing::verify::Verification), (status = 404, body = crate::error::ErrorBody)))]
async fn verify_provider_key(
    State(state): State<AppState>,
    me: CurrentUser,
    ip: ClientIp,
    Path(id): Path<String>,
) -> ApiResult<Json<crate::routing::verify::Verification>> {
    let row = store::provider_keys::find_owned(&state.db, me.id(), &id)
        .await?
        .ok_or_else(|| ApiError::not_found("provider key"))?;
    let v = crate::routing::verify::verify(&state, &row).await?;
    let status = if v.ok {
        Some(store::provider_keys::STATUS_ACTIVE)
    } else if matches!(v.status, 401 | 403) {
        Some(store::provider_keys::STATUS_INVALID)
    } else {
        None
    };
    if let Some(status) = status
        && store::provider_keys::set_status(&state.db, &id, status).await?
    {
        if v.ok {
            state.health.key_restored(&id);
        }
        invalidate_provider_key(&state, me.id(), row.shared).await;
    }
    audit(
        &state,
        &me,
        &ip,
        "provider_key.verify",
        format!("provider_key:{id}"),
        Some(serde_json::json!({ "ok": v.ok, "status": v.status })),
    )
    .await?;
    Ok(Json(v))
}

// ---------------------------------------------------------------------------------------------
// Gateway keys

/// Length of the random part of a gateway key (base62, ~285 bits).
const SECRET_CHARS: usize = 48;
pub const GATEWAY_KEY_PREFIX: &str = "sk-tg-";

/// A new gateway key secret: `sk-tg-` + 48 base62 characters from the thread-local CSPRNG.
pub fn new_gateway_secret() -> String {
    let random: String = rand::rng()
        .sample_iter(Alphanumeric)
        .take(SECRET_CHARS)
        .map(char::from)
        .collect();
    format!("{GATEWAY_KEY_PREFIX}{random}")
}

/// A gateway key as listed (never its secret).
#[derive(Debug, Serialize, ToSchema)]
pub struct GatewayKeyView {
    pub id: String,
    pub name: String,
    /// E.g. `sk-tg…wxyz`.
    pub masked: String,
    /// `null` = every model.
    pub allowed_models: Option<Vec<String>>,
    /// CIDRs; `null` = any address.
    pub allowed_ips: Option<Vec<String>>,
    pub rpm_limit: Option<i32>,
    pub tpm_limit: Option<i32>,
    /// `null` = no budget.
    pub budget_usd: Option<f64>,
    pub spent_usd: f64,
    pub expires_at: Option<String>,
    pub is_active: bool,
    pub last_used_at: Option<String>,
    pub created_at: String,
    /// Seconds an identical non-streamed request is answered from the response cache; 0 = off
    /// (capped at `routing.max_cache_ttl_secs` when used).
    pub cache_ttl_secs: i32,
}

fn json_list(s: Option<&str>) -> Option<Vec<String>> {
    s.map(|s| serde_json::from_str(s).unwrap_or_default())
}

impl From<entity::gateway_keys::Model> for GatewayKeyView {
    fn from(k: entity::gateway_keys::Model) -> Self {
        Self {
            allowed_models: json_list(k.allowed_models.as_deref()),
            allowed_ips: json_list(k.allowed_ips.as_deref()),
            id: k.id,
            name: k.name,
            masked: k.masked,
            rpm_limit: k.rpm_limit,
            tpm_limit: k.tpm_limit,
            budget_usd: k.budget_nanos.map(nanos_to_usd),
            spent_usd: nanos_to_usd(k.spent_nanos),
            expires_at: k.expires_at.map(rfc3339),
            is_active: k.is_active,
            last_used_at: k.last_used_at.map(rfc3339),
            created_at: rfc3339(k.created_at),
            cache_ttl_secs: k.cache_ttl_secs,
        }
    }
}

/// A gateway key with its secret: only in the response to create and rotate.
#[derive(Debug, Serialize, ToSchema)]
pub struct GatewayKeyWithSecret {
    #[serde(flatten)]
    pub view: GatewayKeyView,
    /// The secret (`sk-tg-…`). Shown once: store it now.
    pub key: String,
}

fn check_key_name(s: &str) -> ApiResult<String> {
    let s = s.trim();
    if s.is_empty() || s.chars().count() > 128 {
        return Err(ApiError::invalid_param(
            "name",
            "name must be 1–128 characters",
        ));
    }
    Ok(s.to_owned())
}

/// Model names that must exist in the catalog (active or not); stored as a JSON array.
async fn check_allowed_models(state: &AppState, names: Vec<String>) -> ApiResult<String> {
    if names.is_empty() || names.len() > 1000 {
        return Err(ApiError::invalid_param(
            "allowed_models",
            "allowed_models must list 1–1000 model names (omit it or send null for every model)",
        ));
    }
    let catalog = state.caches.catalog(&state.db).await?;
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for n in names {
        if catalog.get(&n).is_none() {
            return Err(ApiError::BadRequest {
                message: format!("allowed_models: the model {n:?} does not exist in the catalog"),
                code: "model_not_found",
                param: Some("allowed_models".into()),
            });
        }
        if seen.insert(n.clone()) {
            out.push(n);
        }
    }
    Ok(serde_json::Value::from(out).to_string())
}

/// CIDRs (v4 or v6; a bare address means /32 or /128), normalised; stored as a JSON array.
fn check_allowed_ips(items: Vec<String>) -> ApiResult<String> {
    if items.is_empty() || items.len() > 1000 {
        return Err(ApiError::invalid_param(
            "allowed_ips",
            "allowed_ips must list 1–1000 CIDRs (omit it or send null for any address)",
        ));
    }
    let mut out = Vec::with_capacity(items.len());
    for s in items {
        let t = s.trim();
        let net = t
            .parse::<IpNet>()
            .or_else(|_| t.parse::<std::net::IpAddr>().map(IpNet::from))
            .map_err(|_| {
                ApiError::invalid_param(
                    "allowed_ips",
                    format!(
                        "{s:?} is not an IP address or CIDR (e.g. 203.0.113.0/24, 2001:db8::/32)"
                    ),
                )
            })?;
        let net = net.trunc().to_string();
        if !out.contains(&net) {
            out.push(net);
        }
    }
    Ok(serde_json::Value::from(out).to_string())
}

fn check_limit(param: &str, v: i64) -> ApiResult<i32> {
    i32::try_from(v)
        .ok()
        .filter(|v| *v >= 0)
        .ok_or_else(|| ApiError::invalid_param(param, format!("{param} must be an integer ≥ 0")))
}

fn check_budget(usd: f64) -> ApiResult<i64> {
    if !usd.is_finite() || !(0.0..=1e9).contains(&usd) {
        return Err(ApiError::invalid_param(
            "budget_usd",
            "budget_usd must be a number ≥ 0 (USD)",
        ));
    }
    Ok(usd_to_nanos(usd))
}

fn check_expires_at(s: &str) -> ApiResult<DateTime<Utc>> {
    let t = DateTime::parse_from_rfc3339(s.trim())
        .map_err(|_| {
            ApiError::invalid_param(
                "expires_at",
                "expires_at must be an RFC 3339 timestamp, e.g. 2030-01-01T00:00:00Z",
            )
        })?
        .with_timezone(&Utc);
    if t <= Utc::now() {
        return Err(ApiError::invalid_param(
            "expires_at",
            "expires_at is in the past",
        ));
    }
    Ok(t)
}

/// Your gateway keys, newest first (secrets are never listed).
#[utoipa::path(get, path = "/api/keys", tag = "keys", security(("access_token" = [])),
    params(PageParams),
    responses((status = 200, body = Paginated<GatewayKeyView>), (status = 401, body = crate::error::ErrorBody)))]
async fn list_keys(
    State(state): State<AppState>,
    me: CurrentUser,
    Query(page): Query<PageParams>,
) -> ApiResult<Json<Paginated<GatewayKeyView>>> {
    let req = page.req()?;
    let rows = store::gateway_keys::list_owned(&state.db, me.id(), req).await?;
    Ok(Json(Paginated::new(rows, req, GatewayKeyView::from)))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateGatewayKey {
    pub name: String,
    /// Catalog model names this key may use; absent or `null` = every model.
    pub allowed_models: Option<Vec<String>>,
    /// CIDRs (or bare addresses) allowed to use this key; absent or `null` = any.
    pub allowed_ips: Option<Vec<String>>,
    /// Requests per minute; absent = the configured default, 0 = no limit.
    pub rpm_limit: Option<i64>,
    /// Tokens per minute; absent = no limit.
    pub tpm_limit: Option<i64>,
    /// Spending cap in USD; absent = none.
    pub budget_usd: Option<f64>,
    /// RFC 3339; must be in the future.
    pub expires_at: Option<String>,
    /// Seconds an identical non-streamed request (same user, model and body) is answered from
    /// the response cache; absent or 0 = off. Capped at `routing.max_cache_ttl_secs` when used.
    pub cache_ttl_secs: Option<i64>,
}

/// Creates a gateway key. The secret `key` is in this response only.
#[utoipa::path(post, path = "/api/keys", tag = "keys", security(("access_token" = [])),
    request_body = CreateGatewayKey,
    responses((status = 201, body = GatewayKeyWithSecret), (status = 400, body = crate::error::ErrorBody),
              (status = 401, body = crate::error::ErrorBody)))]
async fn create_key(
    State(state): State<AppState>,
    me: CurrentUser,
    ip: ClientIp,
    Json(b): Json<CreateGatewayKey>,
) -> ApiResult<(StatusCode, Json<GatewayKeyWithSecret>)> {
    let name = check_key_name(&b.name)?;
    let allowed_models = match b.allowed_models {
        Some(v) => Some(check_allowed_models(&state, v).await?),
        None => None,
    };
    let allowed_ips = b.allowed_ips.map(check_allowed_ips).transpose()?;
    let rpm_limit = b
        .rpm_limit
        .map(|v| check_limit("rpm_limit", v))
        .transpose()?;
    let tpm_limit = b
        .tpm_limit
        .map(|v| check_limit("tpm_limit", v))
        .transpose()?;
    let budget_nanos = b.budget_usd.map(check_budget).transpose()?;
    let expires_at = b.expires_at.as_deref().map(check_expires_at).transpose()?;
    let cache_ttl_secs = b
        .cache_ttl_secs
        .map(|v| check_limit("cache_ttl_secs", v))
        .transpose()?
        .unwrap_or(0);
    let secret = new_gateway_secret();
    let hash = crypto::sha256_hex(&secret);
    let row = store::gateway_keys::create_with_cache(
        &state.db,
        NewGatewayKey {
            user_id: me.id().to_owned(),
            name,
            key_hash: hash.clone(),
            masked: crypto::mask(&secret),
            allowed_models,
            allowed_ips,
            rpm_limit,
            tpm_limit,
            budget_nanos,
            expires_at,
        },
        cache_ttl_secs,
    )
    .await?;
    // A "no such key" answer may be cached for this hash if someone guessed it: drop it.
    state.caches.invalidate_gateway_key(&hash).await;
    audit(
        &state,
        &me,
        &ip,
        "gateway_key.create",
        format!("gateway_key:{}", row.id),
        Some(serde_json::json!({ "name": row.name })),
    )
    .await?;
    Ok((
        StatusCode::CREATED,
        Json(GatewayKeyWithSecret {
            view: row.into(),
            key: secret,
        }),
    ))
}

/// One of your gateway keys.
#[utoipa::path(get, path = "/api/keys/{id}", tag = "keys", security(("access_token" = [])),
    params(("id" = String, Path, description = "Gateway key id")),
    responses((status = 200, body = GatewayKeyView), (status = 404, body = crate::error::ErrorBody)))]
async fn get_key(
    State(state): State<AppState>,
    me: CurrentUser,
    Path(id): Path<String>,
) -> ApiResult<Json<GatewayKeyView>> {
    let row = store::gateway_keys::find_owned(&state.db, me.id(), &id)
        .await?
        .ok_or_else(|| ApiError::not_found("key"))?;
    Ok(Json(row.into()))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateGatewayKey {
    pub name: Option<String>,
    /// `null` = every model.
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<Vec<String>>)]
    pub allowed_models: Option<Option<Vec<String>>>,
    /// `null` = any address.
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<Vec<String>>)]
    pub allowed_ips: Option<Option<Vec<String>>>,
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<i64>)]
    pub rpm_limit: Option<Option<i64>>,
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<i64>)]
    pub tpm_limit: Option<Option<i64>>,
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<f64>)]
    pub budget_usd: Option<Option<f64>>,
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<String>)]
    pub expires_at: Option<Option<String>>,
    pub is_active: Option<bool>,
    /// Seconds of response caching; 0 (or `null`) = off.
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<i64>)]
    pub cache_ttl_secs: Option<Option<i64>>,
}

/// Applies a patch to a key `me` owns and drops its cache entry; 404 when not theirs.
async fn patch_key(
    state: &AppState,
    me: &CurrentUser,
    id: &str,
    patch: GatewayKeyPatch,
) -> ApiResult<entity::gateway_keys::Model> {
    let (before, after) = store::gateway_keys::update_owned(&state.db, me.id(), id, patch)
        .await?
        .ok_or_else(|| ApiError::not_found("key"))?;
    state.caches.invalidate_gateway_key(&before.key_hash).await;
    if after.key_hash != before.key_hash {
        state.caches.invalidate_gateway_key(&after.key_hash).await;
    }
    Ok(after)
}

/// Changes one of your gateway keys (scope, limits, budget, expiry, name, on/off).
#[utoipa::path(patch, path = "/api/keys/{id}", tag = "keys", security(("access_token" = [])),
    params(("id" = String, Path, description = "Gateway key id")),
    request_body = UpdateGatewayKey,
    responses((status = 200, body = GatewayKeyView), (status = 400, body = crate::error::ErrorBody),
              (status = 404, body = crate::error::ErrorBody)))]
async fn update_key(
    State(state): State<AppState>,
    me: CurrentUser,
    ip: ClientIp,
    Path(id): Path<String>,
    Json(b): Json<UpdateGatewayKey>,
) -> ApiResult<Json<GatewayKeyView>> {
    // 404 before validating against the catalog, so ids of others reveal nothing.
    store::gateway_keys::find_owned(&state.db, me.id(), &id)
        .await?
        .ok_or_else(|| ApiError::not_found("key"))?;
    let allowed_models = match b.allowed_models {
        Some(Some(v)) => Some(Some(check_allowed_models(&state, v).await?)),
        Some(None) => Some(None),
        None => None,
    };
    let patch = GatewayKeyPatch {
        name: b.name.as_deref().map(check_key_name).transpose()?,
        allowed_models,
        allowed_ips: b
            .allowed_ips
            .map(|o| o.map(check_allowed_ips).transpose())
            .transpose()?,
        rpm_limit: b
            .rpm_limit
            .map(|o| o.map(|v| check_limit("rpm_limit", v)).transpose())
            .transpose()?,
        tpm_limit: b
            .tpm_limit
            .map(|o| o.map(|v| check_limit("tpm_limit", v)).transpose())
            .transpose()?,
        budget_nanos: b
            .budget_usd
            .map(|o| o.map(check_budget).transpose())
            .transpose()?,
        expires_at: b
            .expires_at
            .map(|o| o.as_deref().map(check_expires_at).transpose())
            .transpose()?,
        is_active: b.is_active,
        cache_ttl_secs: b
            .cache_ttl_secs
            .map(|o| o.map_or(Ok(0), |v| check_limit("cache_ttl_secs", v)))
            .transpose()?,
        secret: None,
    };
    let mut fields = Vec::new();
    for (set, name) in [
        (patch.name.is_some(), "name"),
        (patch.allowed_models.is_some(), "allowed_models"),
        (patch.allowed_ips.is_some(), "allowed_ips"),
        (patch.rpm_limit.is_some(), "rpm_limit"),
        (patch.tpm_limit.is_some(), "tpm_limit"),
        (patch.budget_nanos.is_some(), "budget_usd"),
        (patch.expires_at.is_some(), "expires_at"),
        (patch.is_active.is_some(), "is_active"),
        (patch.cache_ttl_secs.is_some(), "cache_ttl_secs"),
    ] {
        if set {
            fields.push(name);
        }
    }
    let row = patch_key(&state, &me, &id, patch).await?;
    audit(
        &state,
        &me,
        &ip,
        "gateway_key.update",
        format!("gateway_key:{id}"),
        Some(serde_json::json!({ "fields": fields })),
    )
    .await?;
    Ok(Json(row.into()))
}

/// Deletes one of your gateway keys (hard delete; it stops working at once; usage records keep
/// its id). To pause a key instead, toggle it.
#[utoipa::path(delete, path = "/api/keys/{id}", tag = "keys", security(("access_token" = [])),
    params(("id" = String, Path, description = "Gateway key id")),
    responses((status = 204, description = "Deleted"), (status = 404, body = crate::error::ErrorBody)))]
async fn delete_key(
    State(state): State<AppState>,
    me: CurrentUser,
    ip: ClientIp,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let row = store::gateway_keys::delete_owned(&state.db, me.id(), &id)
        .await?
        .ok_or_else(|| ApiError::not_found("key"))?;
    state.caches.invalidate_gateway_key(&row.key_hash).await;
    audit(
        &state,
        &me,
        &ip,
        "gateway_key.delete",
        format!("gateway_key:{id}"),
        Some(serde_json::json!({ "name": row.name })),
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Switches one of your gateway keys on or off; takes effect on the next request.
#[utoipa::path(post, path = "/api/keys/{id}/toggle", tag = "keys", security(("access_token" = [])),
    params(("id" = String, Path, description = "Gateway key id")),
    responses((status = 200, body = GatewayKeyView), (status = 404, body = crate::error::ErrorBody)))]
async fn toggle_key(
    State(state): State<AppState>,
    me: CurrentUser,
    ip: ClientIp,
    Path(id): Path<String>,
) -> ApiResult<Json<GatewayKeyView>> {
    let current = store::gateway_keys::find_owned(&state.db, me.id(), &id)
        .await?
        .ok_or_else(|| ApiError::not_found("key"))?;
    let row = patch_key(
        &state,
        &me,
        &id,
        GatewayKeyPatch {
            is_active: Some(!current.is_active),
            ..Default::default()
        },
    )
    .await?;
    audit(
        &state,
        &me,
        &ip,
        "gateway_key.toggle",
        format!("gateway_key:{id}"),
        Some(serde_json::json!({ "is_active": row.is_active })),
    )
    .await?;
    Ok(Json(row.into()))
}

/// Replaces a gateway key's secret: the old one stops working at once. The new `key` is in this
/// response only.
#[utoipa::path(post, path = "/api/keys/{id}/rotate", tag = "keys", security(("access_token" = [])),
    params(("id" = String, Path, description = "Gateway key id")),
    responses((status = 200, body = GatewayKeyWithSecret), (status = 404, body = crate::error::ErrorBody)))]
async fn rotate_key(
    State(state): State<AppState>,
    me: CurrentUser,
    ip: ClientIp,
    Path(id): Path<String>,
) -> ApiResult<Json<GatewayKeyWithSecret>> {
    let secret = new_gateway_secret();
    let row = patch_key(
        &state,
        &me,
        &id,
        GatewayKeyPatch {
            secret: Some((crypto::sha256_hex(&secret), crypto::mask(&secret))),
            ..Default::default()
        },
    )
    .await?;
    audit(
        &state,
        &me,
        &ip,
        "gateway_key.rotate",
        format!("gateway_key:{id}"),
        None,
    )
    .await?;
    Ok(Json(GatewayKeyWithSecret {
        view: row.into(),
        key: secret,
    }))
}
