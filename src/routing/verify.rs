//! `POST /api/provider-keys/{id}/verify`: asks the key's upstream whether it takes the key — the
//! models list of an OpenAI-compatible provider, else a one-token chat call on a catalog model
//! that provider serves.

use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use utoipa::ToSchema;

use crate::error::ApiError;
use crate::providers::{self, Endpoint, Operation, Target};
use crate::proxy::upstream;
use crate::state::AppState;

/// How long a verification waits for the upstream.
const VERIFY_TIMEOUT: Duration = Duration::from_secs(15);
/// The most of an upstream error message shown back.
const MAX_MESSAGE_CHARS: usize = 300;

/// What the upstream said about a provider key.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Verification {
    /// The upstream accepted the key.
    pub ok: bool,
    /// The upstream's HTTP status (0 when it could not be reached).
    pub status: u16,
    pub message: String,
}

/// Checks one provider key (`row`, its secret opened here) against its provider.
pub async fn verify(
    state: &AppState,
    row: &entity::provider_keys::Model,
) -> Result<Verification, ApiError> {
    let Some(provider) = crate::store::providers::find(&state.db, &row.provider_key).await? else {
        return Ok(Verification {
            ok: false,
            status: 0,
            message: format!("The provider {:?} no longer exists.", row.provider_key),
        });
    };
    let secret = state
        .keyring
        .open_string(&row.secret_enc, &row.id)
        .map_err(|e| ApiError::internal(anyhow::anyhow!("provider key does not open: {e}")))?;
    let base = row.base_url.as_deref().unwrap_or(&provider.base_url);
    let guarded = row.base_url.is_some();
    let sent = if let Some(adapter) = providers::adapter(&provider.kind) {
        let mut headers = http::HeaderMap::new();
        adapter.auth(&mut headers, &secret);
        let url = format!("{}/models", base.trim_end_matches('/'));
        upstream::get(&state.http, &url, guarded, headers, VERIFY_TIMEOUT).await
    } else if let Some(tr) = providers::translator(&provider.kind) {
        let catalog = state.caches.catalog(&state.db).await?;
        let Some(model) = catalog.models().iter().find_map(|m| {
            m.deployments
                .iter()
                .find(|d| d.provider.key == provider.key && m.model.model_type == "chat")
                .map(|d| d.upstream_model.clone())
        }) else {
            return Ok(Verification {
                ok: false,
                status: 0,
                message: format!(
                    "No chat model of the catalog is served by {:?}: nothing to verify the key with.",
                    provider.key
                ),
            });
        };
        let target = Target {
            base_url: base,
            upstream_model: &model,
            api_version: provider.api_version.as_deref(),
            region: provider.region.as_deref(),
            default_max_tokens: 1,
        };
        let probe = serde_json::json!({
            "model": model,
            "messages": [{"role": "user", "content": "ping"}],
            "max_tokens": 1,
        })
        .to_string();
        let Some(protocol) = crate::protocols::for_endpoint(Endpoint::ChatCompletions) else {
            return Err(ApiError::internal(anyhow::anyhow!("no chat protocol")));
        };
        let pivot = crate::proxy::translate::decode(protocol, probe.as_bytes(), &model)?;
        let body = tr.encode_chat(&pivot, &target)?;
        let url = tr.url(&target, Operation::Chat, false)?;
        let mut headers = http::HeaderMap::new();
        tr.headers(&mut headers, &secret, &target, &url, &body)?;
        upstream::send_to(
            &state.http,
            upstream::Outbound {
                url: &url,
                guarded,
                headers,
                body: Bytes::from(body).into(),
                stream: false,
                request_id: None,
            },
            VERIFY_TIMEOUT,
        )
        .await
    } else {
        return Err(ApiError::internal(anyhow::anyhow!(
            "provider {} has unsupported kind {}",
            provider.key,
            provider.kind
        )));
    };
    drop(secret);
    let resp = match sent {
        Ok(r) => r,
        Err(e) => {
            let (_, _, code) = e.parts();
            return Ok(Verification {
                ok: false,
                status: 0,
                message: format!(
                    "Could not get an answer from the provider ({}).",
                    code.unwrap_or("upstream_error")
                ),
            });
        }
    };
    let status = resp.status();
    let body =
        http_body_util::BodyExt::collect(http_body_util::Limited::new(resp.into_body(), 64 * 1024));
    let body = tokio::time::timeout(VERIFY_TIMEOUT, body)
        .await
        .ok()
        .and_then(Result::ok)
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let message = if status.is_success() {
        "The provider accepted the key.".to_owned()
    } else {
        upstream_message(&body).unwrap_or_else(|| {
            format!(
                "The provider answered {}.",
                status.canonical_reason().unwrap_or("an error")
            )
        })
    };
    Ok(Verification {
        ok: status.is_success(),
        status: status.as_u16(),
        message,
    })
}

/// `error.message` (or `message`) of an upstream error body, bounded, with the key's own
/// characters never echoed (the upstream may quote the key it refused).
fn upstream_message(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let m = v
        .pointer("/error/message")
        .or_else(|| v.get("message"))
        .and_then(|m| m.as_str())?;
    let cleaned: String = m
        .split_whitespace()
        .map(|w| {
            if w.len() >= 16
                && w.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_*.".contains(c))
            {
                "[redacted]"
            } else {
                w
            }
        })
        .collect::<Vec<_>>()
        .join(" ");
    Some(cleaned.chars().take(MAX_MESSAGE_CHARS).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_message_hides_key_like_words_and_is_bounded() {
        let body = br#"{"error":{"message":"Incorrect API key provided: sk-abcdefghijklmnopqrstuvwxyz1234. You can find your API key at https://x."}}"#;
        let m = upstream_message(body).unwrap();
        assert!(!m.contains("sk-abcdefghijklmnop"), "{m}");
        assert!(m.contains("Incorrect API key provided"));
        let long = format!(r#"{{"message":"{}"}}"#, "word ".repeat(500));
        assert!(upstream_message(long.as_bytes()).unwrap().chars().count() <= MAX_MESSAGE_CHARS);
        assert_eq!(upstream_message(b"not json"), None);
    }
}
