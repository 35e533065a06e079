//! ② admit, continued: the key's budget and (when charged) the user's balance. The request's
//! maximum cost is reserved before forwarding — from this replica's [`Leases`], which reserve in
//! SQL in chunks — and settled by the usage writer.
//!
//! A request is *charged* to the user's balance when it uses a shared platform provider key, or
//! for every request when `billing.enforce_balance` is on. Keys with a budget reserve against it
//! either way. Nothing here touches the database for an uncharged request on a key without budget.

use crate::cache::{CatalogModel, KeyCtx};
use crate::error::ApiError;
use crate::metering::event::{
    Prices, RequestSize, Reservation, TokenBounds, Units, bounds, cost_nanos, units_cost_nanos,
};
use crate::metering::leases::Holder;
use crate::providers::{Endpoint, Usage};
use crate::proxy::request::RequestView;
use crate::state::AppState;

/// Completion tokens assumed when neither the request nor the model bounds them.
pub const DEFAULT_MAX_OUTPUT_TOKENS: i64 = 4096;

/// Completions the request asks for: `n` (chat, completions) or `best_of` (completions),
/// whichever is larger; each may run to `max_tokens`. At least 1.
/// Choices the request may produce: `n` (as parsed into the view) or a completion's `best_of`,
/// whichever is larger, at least 1.
pub(crate) fn choices(view: &RequestView<'_>) -> u64 {
    view.get("best_of")
        .and_then(|raw| serde_json::from_str::<u64>(raw.get()).ok())
        .into_iter()
        .fold(view.n.max(1), u64::max)
}

/// The most a request can cost, with what it was computed from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaxCost {
    pub nanos: i64,
    /// Prompt tokens assumed: the body at 4 bytes a token, rounded up.
    pub prompt: i64,
    /// Completion tokens assumed: `max_tokens` (else the model's `max_output_tokens`, else
    /// [`DEFAULT_MAX_OUTPUT_TOKENS`]) × `n`.
    pub completion: i64,
}

/// The most a request can cost: prompt estimated at 4 bytes a token (rounded up) plus
/// `max_tokens`, else the model's `max_output_tokens`, times `n`, at the model's prices.
pub fn max_cost(
    view: &RequestView<'_>,
    body_len: usize,
    model: &CatalogModel,
    endpoint: Endpoint,
) -> MaxCost {
    let m = &model.model;
    let prompt = i64::try_from(body_len.div_ceil(4)).unwrap_or(i64::MAX);
    let completion = match endpoint {
        Endpoint::Embeddings | Endpoint::Moderations => 0,
        _ => view
            .max_tokens
            .map(|t| i64::try_from(t).unwrap_or(i64::MAX))
            .or(m.max_output_tokens.map(i64::from))
            .unwrap_or(DEFAULT_MAX_OUTPUT_TOKENS)
            .saturating_mul(i64::try_from(choices(view)).unwrap_or(i64::MAX)),
    };
    // Every prompt token at the dearest prompt price (a cache write may cost more than input).
    let prices = Prices::from_model(m);
    let nanos = cost_nanos(
        Usage {
            prompt,
            completion,
            ..Default::default()
        },
        Prices {
            input: prices.dearest_prompt(),
            ..prices
        },
    )
    .saturating_add(units_cost_nanos(
        max_units(view, body_len, endpoint),
        prices,
    ));
    MaxCost {
        nanos,
        prompt,
        completion,
    }
}

/// The most units (spec §8) a media request can be metered for: `n` images; a character per
/// byte of a speech request; a minute of audio for a transcription or translation, whose length
/// is not known before the upstream says it (the record is settled to the actual).
fn max_units(view: &RequestView<'_>, body_len: usize, endpoint: Endpoint) -> Units {
    match endpoint {
        Endpoint::ImageGenerations | Endpoint::ImageEdits | Endpoint::ImageVariations => Units {
            images: choices(view),
            ..Default::default()
        },
        Endpoint::AudioSpeech => Units {
            chars: body_len as u64,
            ..Default::default()
        },
        Endpoint::AudioTranscriptions | Endpoint::AudioTranslations => Units {
            audio_seconds: 60.0,
            ..Default::default()
        },
        _ => Units::default(),
    }
}

/// The most tokens the request can have used: what the upstream reports above them is cut
/// (`metering::event::bounds`).
pub fn token_bounds(
    view: &RequestView<'_>,
    body_len: usize,
    model: &CatalogModel,
    endpoint: Endpoint,
) -> TokenBounds {
    let m = &model.model;
    bounds(RequestSize {
        body_len,
        max_tokens: view.max_tokens,
        choices: choices(view),
        context_window: m.context_window,
        max_output_tokens: m.max_output_tokens,
        // Images and audio in a request are tokens its JSON length does not bound.
        vision: m.supports_vision || (endpoint.media() && endpoint != Endpoint::Moderations),
        embeddings: matches!(endpoint, Endpoint::Embeddings | Endpoint::Moderations),
    })
}

fn usd(nanos: i64) -> String {
    format!("${:.6}", crate::store::nanos_to_usd(nanos))
}

/// What a refusal says the request may cost.
fn may_cost(c: MaxCost) -> String {
    format!(
        "This request may cost up to {} (a prompt estimate of {} tokens + {} completion tokens \
         (max_tokens, else the model's maximum output) at the model's prices)",
        usd(c.nanos),
        c.prompt,
        c.completion
    )
}

/// Reserves `max_cost` against the key budget (if any) and the balance (if `charged`).
pub async fn reserve(
    state: &AppState,
    key: &KeyCtx,
    charged: bool,
    cost: MaxCost,
) -> Result<Reservation, ApiError> {
    let max_cost = cost.nanos;
    let mut r = Reservation::default();
    if key.budget_nanos.is_some() {
        if !state
            .leases
            .take(&state.db, Holder::Key, &key.key_id, max_cost)
            .await?
        {
            return Err(budget_refusal(state, key, cost).await);
        }
        r.key_nanos = max_cost;
    }
    if charged {
        let taken = state
            .leases
            .take(&state.db, Holder::User, &key.user_id, max_cost)
            .await;
        if !matches!(taken, Ok(true)) {
            release(state, key, r);
            taken?;
            return Err(balance_refusal(state, key, cost).await);
        }
        r.user_nanos = max_cost;
    }
    Ok(r)
}

/// What this replica's lease holds spare for `id`: free for the next request, though the
/// database counts it reserved.
fn spare(state: &AppState, holder: Holder, id: &str) -> i64 {
    let (held, in_use) = state.leases.held(holder, id);
    held.saturating_sub(in_use).max(0)
}

/// The key's budget cannot cover `cost`: what it may cost, what is left, what to do. (A refusal
/// only: one query, off the hot path.)
async fn budget_refusal(state: &AppState, key: &KeyCtx, cost: MaxCost) -> ApiError {
    let left = match crate::store::billing::key_headroom(&state.db, &key.key_id).await {
        Ok(Some(h)) => format!(
            "this API key's remaining budget is {} (budget {}, spent {}, {} reserved by \
             requests in flight)",
            usd(h
                .available()
                .saturating_add(spare(state, Holder::Key, &key.key_id))),
            usd(h.limit),
            usd(h.used),
            usd(h.reserved),
        ),
        _ => "this API key's remaining budget does not cover it".to_owned(),
    };
    ApiError::quota(format!(
        "{}; {left}. Lower max_tokens (or the prompt), or raise the key's budget (budget_usd).",
        may_cost(cost)
    ))
}

/// The balance cannot cover `cost`.
async fn balance_refusal(state: &AppState, key: &KeyCtx, cost: MaxCost) -> ApiError {
    let left = match crate::store::billing::balance_headroom(&state.db, &key.user_id).await {
        Ok(Some(h)) => format!(
            "your balance has {} available (balance {}, {} reserved by requests in flight)",
            usd(h
                .available()
                .saturating_add(spare(state, Holder::User, &key.user_id))),
            usd(h.limit),
            usd(h.reserved),
        ),
        _ => "your balance does not cover it".to_owned(),
    };
    ApiError::quota(format!(
        "You exceeded your current quota. {}; {left}. Lower max_tokens (or the prompt), or add \
         credit and retry.",
        may_cost(cost)
    ))
}

/// Gives a reservation back (the request was refused after reserving).
pub fn release(state: &AppState, key: &KeyCtx, r: Reservation) {
    state.leases.release(Holder::Key, &key.key_id, r.key_nanos);
    state
        .leases
        .release(Holder::User, &key.user_id, r.user_nanos);
}
