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

/// What the gateway must count itself when the upstream reported no usage.
#[derive(Debug, Default)]
pub struct EstimateInput {
    /// The client's request body.
    pub request: Bytes,
    /// `data:` payloads of a stream, or the whole body of a complete response.
    pub response: Vec<Bytes>,
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
    /// `Some` when the upstream gave no usage: the writer counts tokens from it.
    pub estimate: Option<EstimateInput>,
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
                    cached: 0
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
                    cached: 0
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
