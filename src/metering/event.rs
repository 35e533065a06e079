//! A usage event and its cost: what the meter stage hands the usage writer for each request.

use bytes::Bytes;
use chrono::{DateTime, Utc};

use crate::providers::{Endpoint, Usage};

/// Prices of one catalog model in nano-dollars per 1M tokens.
#[derive(Debug, Clone, Copy, Default)]
pub struct Prices {
    pub input: i64,
    pub output: i64,
    /// `None`: cached tokens cost the input price.
    pub cached_input: Option<i64>,
}

/// Cost in nano-dollars: (prompt − cached) × input + cached × cached-input + completion × output,
/// prices per 1M tokens, rounded half up to the nano-dollar.
pub fn cost_nanos(u: Usage, p: Prices) -> i64 {
    let cached = u.cached.clamp(0, u.prompt.max(0)) as i128;
    let uncached = (u.prompt.max(0) as i128) - cached;
    let total = uncached * p.input as i128
        + cached * p.cached_input.unwrap_or(p.input) as i128
        + u.completion.max(0) as i128 * p.output as i128;
    let nanos = (total + 500_000) / 1_000_000;
    nanos.clamp(0, i64::MAX as i128) as i64
}

/// The most token counts a request may be metered for when the catalog gives no context window:
/// what an upstream reports above it is taken as false.
pub const TOKEN_CAP: i64 = 10_000_000;

/// The most tokens a request can really have used; what an upstream reports (or the estimate
/// counts) above them is cut to them. See [`bounds`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenBounds {
    pub prompt: i64,
    pub completion: i64,
}

impl Default for TokenBounds {
    fn default() -> Self {
        Self {
            prompt: TOKEN_CAP,
            completion: TOKEN_CAP,
        }
    }
}

/// What the catalog and the request say about a request's size.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestSize {
    /// Bytes of the client's request body.
    pub body_len: usize,
    /// `max_completion_tokens`, else `max_tokens`.
    pub max_tokens: Option<u64>,
    /// `n` (or `best_of`): completions generated per request, each up to `max_tokens`.
    pub choices: u64,
    pub context_window: Option<i32>,
    pub max_output_tokens: Option<i32>,
    /// The model takes images: a few bytes of URL can stand for hundreds of prompt tokens.
    pub vision: bool,
    pub embeddings: bool,
}

/// A request's token bounds:
/// - prompt ≤ the context window ([`TOKEN_CAP`] when unknown, never above it) and, unless the
///   model takes images, ≤ the body's length in bytes (a byte-level BPE token is at least one
///   byte of text, and JSON only adds bytes);
/// - completion ≤ `max_tokens` and the model's `max_output_tokens` (whichever are known) and the
///   window, times `n`; embeddings: 0.
pub fn bounds(r: RequestSize) -> TokenBounds {
    let window = r
        .context_window
        .filter(|&w| w > 0)
        .map_or(TOKEN_CAP, |w| i64::from(w).min(TOKEN_CAP));
    let prompt = if r.vision {
        window
    } else {
        window.min(i64::try_from(r.body_len).unwrap_or(i64::MAX))
    };
    let completion = if r.embeddings {
        0
    } else {
        let per_choice = [
            r.max_tokens.map(|t| i64::try_from(t).unwrap_or(i64::MAX)),
            r.max_output_tokens.filter(|&m| m > 0).map(i64::from),
        ]
        .into_iter()
        .flatten()
        .fold(window, i64::min);
        per_choice
            .saturating_mul(i64::try_from(r.choices.max(1)).unwrap_or(i64::MAX))
            .min(TOKEN_CAP)
    };
    TokenBounds { prompt, completion }
}

/// Which fields [`clamp`] cut.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Clamped {
    pub prompt: bool,
    pub completion: bool,
    pub cached: bool,
}

impl Clamped {
    pub fn any(self) -> bool {
        self.prompt || self.completion || self.cached
    }
}

/// `u` within `b`: every count ≥ 0, prompt and completion at most their bounds, cached at most
/// prompt. A count below zero becomes 0 without counting as cut.
pub fn clamp(u: Usage, b: TokenBounds) -> (Usage, Clamped) {
    let prompt = u.prompt.max(0);
    let completion = u.completion.max(0);
    let out_prompt = prompt.min(b.prompt.max(0));
    let out_completion = completion.min(b.completion.max(0));
    let cached = u.cached.max(0);
    let out_cached = cached.min(out_prompt);
    (
        Usage {
            prompt: out_prompt,
            completion: out_completion,
            cached: out_cached,
            ..Default::default()
        },
        Clamped {
            prompt: out_prompt < prompt,
            completion: out_completion < completion,
            // Cut only when above the reported prompt (following a cut prompt is not news).
            cached: cached > prompt,
        },
    )
}

/// `u` cut to `bounds` ([`clamp`]), counted in `tollgate_usage_clamped_total{field}` and logged
/// (request id and numbers, nothing secret) when cut. `source`: `upstream` or `estimate`.
pub fn bound_usage(
    metrics: &crate::telemetry::Metrics,
    request_id: &str,
    u: Usage,
    bounds: TokenBounds,
    source: &str,
) -> Usage {
    let (out, clamped) = clamp(u, bounds);
    if clamped.any() {
        for (field, cut) in [
            ("prompt", clamped.prompt),
            ("completion", clamped.completion),
            ("cached", clamped.cached),
        ] {
            if cut {
                metrics
                    .usage_clamped_total
                    .with_label_values(&[field])
                    .inc();
            }
        }
        tracing::warn!(
            request_id,
            source,
            reported_prompt = u.prompt,
            reported_completion = u.completion,
            reported_cached = u.cached,
            bound_prompt = bounds.prompt,
            bound_completion = bounds.completion,
            "token counts above what the request can have used; metered at the bounds"
        );
    }
    out
}

/// Bytes of a request body, or of response payloads, kept for an estimate; beyond them tokens
/// are estimated from byte counts (see `metering::estimate`).
pub const ESTIMATE_KEEP_BYTES: usize = 256 * 1024;

/// What the gateway must count itself when the upstream reported no usage.
#[derive(Debug, Default)]
pub struct EstimateInput {
    /// The client's request body when it is at most [`ESTIMATE_KEEP_BYTES`], else empty.
    pub request: Bytes,
    /// The request body's length in bytes.
    pub request_len: usize,
    /// The response payloads kept for the estimate.
    pub response: KeptPayloads,
}

/// Response payloads (`data:` payloads of a stream, or one complete body) kept for an estimate:
/// whole payloads up to [`ESTIMATE_KEEP_BYTES`] in all, and how many bytes there were in all.
#[derive(Debug, Default)]
pub struct KeptPayloads {
    pub payloads: Vec<Bytes>,
    pub kept_bytes: usize,
    pub total_bytes: usize,
}

impl KeptPayloads {
    pub fn one(p: Bytes) -> Self {
        let mut k = Self::default();
        k.push(p);
        k
    }

    /// Counts `p`; keeps it while the kept payloads stay within [`ESTIMATE_KEEP_BYTES`].
    pub fn push(&mut self, p: Bytes) {
        self.total_bytes = self.total_bytes.saturating_add(p.len());
        if self.kept_bytes + p.len() <= ESTIMATE_KEEP_BYTES {
            self.kept_bytes += p.len();
            self.payloads.push(p);
        }
    }

    pub fn clear(&mut self) {
        *self = Self::default();
    }

    pub fn is_empty(&self) -> bool {
        self.total_bytes == 0
    }
}

/// One usage record on its way to the writer.
#[derive(Debug)]
pub struct UsageEvent {
    pub at: DateTime<Utc>,
    pub user_id: String,
    pub key_id: String,
    pub model: String,
    pub provider: String,
    pub endpoint: Endpoint,
    pub stream: bool,
    pub status: u16,
    pub usage: Usage,
    pub prices: Prices,
    pub latency_ms: i64,
    pub ttft_ms: Option<i64>,
    /// The gateway counted the tokens itself (the upstream reported none).
    pub tokens_estimated: bool,
    pub request_id: String,
    pub shared_key: bool,
    pub error: Option<String>,
    /// Amounts reserved at admission, released when this event is settled.
    pub reservation: Reservation,
    /// The cost is debited from the user's balance (shared platform key, or
    /// `billing.enforce_balance`).
    pub charged: bool,
    /// The record's unique id (`usage_records.event_id`) and its place in the usage spool.
    pub ticket: crate::metering::spool::Ticket,
}

/// What admission reserved against the balance and the key budget.
#[derive(Debug, Clone, Copy, Default)]
pub struct Reservation {
    pub user_nanos: i64,
    pub key_nanos: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cost_formula() {
        let p = Prices {
            input: 2_500_000_000,
            output: 10_000_000_000,
            cached_input: Some(1_250_000_000),
        };
        // 1000 prompt (200 cached), 500 completion at $2.50 / $1.25 / $10 per 1M.
        let u = Usage {
            prompt: 1000,
            completion: 500,
            cached: 200,
            ..Default::default()
        };
        // 800 × 2.5e9 + 200 × 1.25e9 + 500 × 10e9 = 2e12 + 0.25e12 + 5e12 = 7.25e12 → / 1e6 = 7_250_000 nanos
        assert_eq!(cost_nanos(u, p), 7_250_000);
        // Without a cached price, cached tokens cost the input price.
        let p2 = Prices {
            cached_input: None,
            ..p
        };
        assert_eq!(cost_nanos(u, p2), 7_500_000);
        // Rounding: 1 token at $0.0000015/1M = 1.5e-3 nanos → 0; at 1.5 nanos per token → 2.
        assert_eq!(
            cost_nanos(
                Usage {
                    prompt: 1,
                    completion: 0,
                    cached: 0,
                    ..Default::default()
                },
                Prices {
                    input: 1_500,
                    ..Default::default()
                }
            ),
            0
        );
        assert_eq!(
            cost_nanos(
                Usage {
                    prompt: 1,
                    completion: 0,
                    cached: 0,
                    ..Default::default()
                },
                Prices {
                    input: 1_500_000,
                    ..Default::default()
                }
            ),
            2
        );
    }
}
