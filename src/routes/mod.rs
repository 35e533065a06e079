//! HTTP surfaces, one file each; handlers stay thin and call `accounts`, `proxy`, `store`.

pub mod admin;
pub mod admin_usage;
pub mod auth;
pub mod catalog;
pub mod chat;
pub mod chat_conversations;
pub mod conversations;
pub mod keys;
pub mod me;
pub mod openai;
pub mod ops;
pub mod plans;
pub mod share;
pub mod stored_completions;
pub mod stored_responses;
pub mod usage;
pub mod ws;

use std::net::{IpAddr, SocketAddr};

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use crate::state::AppState;

/// The caller's address: the socket peer, or the first `X-Forwarded-For` hop when
/// `server.trust_forwarded_for` is set.
#[derive(Debug, Clone, Copy)]
pub struct ClientIp(pub Option<IpAddr>);

impl ClientIp {
    pub fn string(&self) -> Option<String> {
        self.0.map(|ip| ip.to_string())
    }
}

pub fn client_ip(parts: &Parts, trust_forwarded_for: bool) -> Option<IpAddr> {
    let peer = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0);
    client_ip_of(&parts.headers, peer, trust_forwarded_for)
}

/// [`client_ip`] from the headers and the socket peer.
pub fn client_ip_of(
    headers: &http::HeaderMap,
    peer: Option<SocketAddr>,
    trust_forwarded_for: bool,
) -> Option<IpAddr> {
    if trust_forwarded_for
        && let Some(ip) = headers
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(',').next())
            .and_then(|v| v.trim().parse().ok())
    {
        return Some(ip);
    }
    peer.map(|p| p.ip())
}

impl FromRequestParts<AppState> for ClientIp {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        Ok(ClientIp(client_ip(
            parts,
            state.config.server.trust_forwarded_for,
        )))
    }
}

/// The caller's `User-Agent`, truncated to 255 characters.
#[derive(Debug, Clone)]
pub struct UserAgent(pub Option<String>);

impl<S: Send + Sync> FromRequestParts<S> for UserAgent {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        Ok(UserAgent(
            parts
                .headers
                .get(axum::http::header::USER_AGENT)
                .and_then(|v| v.to_str().ok())
                .map(|s| s.chars().take(255).collect()),
        ))
    }
}

/// `?page=&per_page=` on every list route.
#[derive(Debug, Clone, Copy, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageParams {
    /// 1-based page number (default 1, at most 1,000,000,000); out of range is 400.
    pub page: Option<u64>,
    /// Rows per page (default 20, 1–100); out of range is 400.
    pub per_page: Option<u64>,
}

impl PageParams {
    pub fn req(&self) -> Result<crate::store::PageReq, ApiError> {
        page_req(self.page, self.per_page)
    }
}

/// A list route's `page` and `per_page`, checked once here for every list: out of range is 400
/// `invalid_value` naming the parameter.
pub fn page_req(
    page: Option<u64>,
    per_page: Option<u64>,
) -> Result<crate::store::PageReq, ApiError> {
    crate::store::PageReq::parse(page, per_page)
        .map_err(|e| ApiError::invalid_param(e.param, e.to_string()))
}

/// `{"data": [...], "page", "per_page", "total"}`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Paginated<T> {
    pub data: Vec<T>,
    pub page: u64,
    pub per_page: u64,
    pub total: u64,
}

impl<T> Paginated<T> {
    pub fn new<M>(
        page: crate::store::Page<M>,
        req: crate::store::PageReq,
        f: impl FnMut(M) -> T,
    ) -> Self {
        Self {
            data: page.items.into_iter().map(f).collect(),
            page: req.page,
            per_page: req.per_page,
            total: page.total,
        }
    }
}

/// RFC 3339 UTC with seconds, as every `/api` timestamp is rendered.
pub fn rfc3339(t: chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// Records the audit entry of a change `actor` made from `ip` (never put a secret in `detail`).
pub async fn audit(
    state: &AppState,
    actor: &crate::accounts::session::CurrentUser,
    ip: &ClientIp,
    action: &str,
    target: String,
    detail: Option<serde_json::Value>,
) -> Result<(), sea_orm::DbErr> {
    crate::store::audit::record(
        &state.db,
        crate::store::audit::AuditEntry {
            actor_id: Some(actor.id()),
            action,
            target: Some(target),
            ip: ip.string().as_deref(),
            detail,
        },
    )
    .await
}
