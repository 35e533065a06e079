//! ② admit, continued: the key's budget and (when charged) the user's balance. The request's
//! maximum cost is reserved before forwarding — from this replica's [`Leases`], which reserve in
//! SQL in chunks — and settled by the usage writer.
//!
//! A request is *charged* to the user's balance when it uses a shared platform provider key, or
//! for every request when `billing.enforce_balance` is on. Keys with a budget reserve against it
//! either way. Nothing here touches the database for an uncharged request on a key without budget.

use crate::cache::{CatalogModel, KeyCtx};
use crate::error::ApiError;
use crate::metering::event::{Prices, Reservation, cost_nanos};
use crate::metering::leases::Holder;
use crate::providers::{Endpoint, Usage};
use crate::proxy::request::RequestView;
use crate::state::AppState;

/// Completion tokens assumed when neither the request nor the model bounds them.
pub const DEFAULT_MAX_OUTPUT_TOKENS: i64 = 4096;

/// The most a request can cost: prompt estimated at 4 bytes a token (rounded up) plus
/// `max_tokens`, else the model's `max_output_tokens`, for each of the `n` choices, at the
/// model's prices.
pub fn max_cost(
    view: &RequestView<'_>,
    body_len: usize,
    model: &CatalogModel,
    endpoint: Endpoint,
) -> i64 {
    let m = &model.model;
    let prompt = body_len.div_ceil(4) as i64;
    let completion = match endpoint {
        Endpoint::Embeddings => 0,
        _ => view
            .max_tokens
            .map(|t| t.min(i64::MAX as u64) as i64)
            .or(m.max_output_tokens.map(i64::from))
            .unwrap_or(DEFAULT_MAX_OUTPUT_TOKENS)
            // Each of the `n` choices may use the bound.
            .saturating_mul(i64::try_from(view.n).unwrap_or(i64::MAX)),
    };
    cost_nanos(
        Usage {
            prompt,
            completion,
            cached: 0,
        },
        Prices {
            input: m.input_price_nanos,
            output: m.output_price_nanos,
            cached_input: m.cached_input_price_nanos,
        },
    )
}

/// Reserves `max_cost` against the key budget (if any) and the balance (if `charged`).
pub async fn reserve(
    state: &AppState,
    key: &KeyCtx,
    charged: bool,
    max_cost: i64,
) -> Result<Reservation, ApiError> {
    let mut r = Reservation::default();
    if key.budget_nanos.is_some() {
        if !state
            .leases
            .take(&state.db, Holder::Key, &key.key_id, max_cost)
            .await?
        {
            return Err(ApiError::quota(
                "This API key has reached its budget (budget_usd).",
            ));
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
            return Err(ApiError::quota(
                "You exceeded your current quota: your balance does not cover this request. Add credit and retry.",
            ));
        }
        r.user_nanos = max_cost;
    }
    Ok(r)
}

/// Gives a reservation back (the request was refused after reserving).
pub fn release(state: &AppState, key: &KeyCtx, r: Reservation) {
    state.leases.release(Holder::Key, &key.key_id, r.key_nanos);
    state
        .leases
        .release(Holder::User, &key.user_id, r.user_nanos);
}
