//! ⑥ meter: every request that reached an upstream becomes exactly one [`UsageEvent`], sent on
//! end, on error, or when the client goes away (the body wrapper is dropped).
//!
//! The usage queue slot is reserved at admission ([`Meter::new`] takes an `OwnedPermit`), so
//! sending the event can never fail or block: back-pressure is applied before forwarding, and no
//! record is ever dropped.

use std::time::Instant;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use tokio::sync::mpsc::OwnedPermit;

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
}

/// What admission reserved against the balance and the key budget.
#[derive(Debug, Clone, Copy, Default)]
pub struct Reservation {
    pub user_nanos: i64,
    pub key_nanos: i64,
}

/// The facts of a request the meter needs at the end.
#[derive(Debug, Clone)]
pub struct RequestFacts {
    pub user_id: String,
    pub key_id: String,
    pub model: String,
    pub provider: String,
    pub endpoint: Endpoint,
    pub stream: bool,
    pub prices: Prices,
    pub request_id: String,
    pub shared_key: bool,
    pub reservation: Reservation,
    pub charged: bool,
    pub request_body: Bytes,
}

/// Carried by a request from admission to its end; turns into one [`UsageEvent`].
pub struct Meter {
    permit: Option<OwnedPermit<UsageEvent>>,
    pub facts: RequestFacts,
    pub started: Instant,
    pub at: DateTime<Utc>,
    pub first_byte: Option<Instant>,
    metrics: crate::telemetry::Metrics,
    /// Told the reported usage when the request ends (token-per-minute limiters).
    on_usage: Option<Box<dyn FnOnce(Usage) + Send + Sync>>,
}

impl Meter {
    pub fn new(
        permit: OwnedPermit<UsageEvent>,
        facts: RequestFacts,
        metrics: crate::telemetry::Metrics,
    ) -> Self {
        Self {
            permit: Some(permit),
            facts,
            started: Instant::now(),
            at: Utc::now(),
            first_byte: None,
            metrics,
            on_usage: None,
        }
    }

    pub fn on_usage(&mut self, f: impl FnOnce(Usage) + Send + Sync + 'static) {
        self.on_usage = Some(Box::new(f));
    }

    pub fn mark_first_byte(&mut self) {
        if self.first_byte.is_none() {
            self.first_byte = Some(Instant::now());
        }
    }

    /// Sends the record. `usage = None` makes the writer estimate from `response`.
    pub fn finish(
        mut self,
        status: u16,
        usage: Option<Usage>,
        response: Vec<Bytes>,
        error: Option<&str>,
    ) {
        let Some(permit) = self.permit.take() else {
            return;
        };
        if let (Some(u), Some(f)) = (usage, self.on_usage.take()) {
            f(u);
        }
        let latency = self.started.elapsed();
        let ttft = self.first_byte.map(|t| t.duration_since(self.started));
        let endpoint = self.facts.endpoint.as_str();
        let m = &self.metrics;
        m.requests_total
            .with_label_values(&[
                endpoint,
                &self.facts.model,
                &self.facts.provider,
                status_label(status),
            ])
            .inc();
        m.request_duration_of(self.facts.endpoint)
            .observe(latency.as_secs_f64());
        if let Some(t) = ttft {
            m.ttft_of(self.facts.endpoint).observe(t.as_secs_f64());
        }
        // Count ourselves when the upstream said nothing but did work: a success, a client that
        // left (the prompt was processed), or a stream cut after producing output.
        let estimate = if usage.is_none() && (status < 400 || status == 499 || !response.is_empty())
        {
            Some(EstimateInput {
                request: std::mem::take(&mut self.facts.request_body),
                response,
            })
        } else {
            None
        };
        let f = &mut self.facts;
        permit.send(UsageEvent {
            at: self.at,
            user_id: std::mem::take(&mut f.user_id),
            key_id: std::mem::take(&mut f.key_id),
            model: std::mem::take(&mut f.model),
            provider: std::mem::take(&mut f.provider),
            endpoint: f.endpoint,
            stream: f.stream,
            status,
            usage: usage.unwrap_or_default(),
            prices: f.prices,
            latency_ms: latency.as_millis() as i64,
            ttft_ms: ttft.map(|t| t.as_millis() as i64),
            estimate,
            request_id: std::mem::take(&mut f.request_id),
            shared_key: f.shared_key,
            error: error.map(str::to_owned),
            reservation: f.reservation,
            charged: f.charged,
        });
    }
}

impl Drop for Meter {
    /// The request ended without reaching `finish` (the client left while waiting for a
    /// complete response): still exactly one record.
    fn drop(&mut self) {
        if self.permit.is_some() {
            let this = Meter {
                permit: self.permit.take(),
                facts: self.facts.clone(),
                started: self.started,
                at: self.at,
                first_byte: self.first_byte,
                metrics: self.metrics.clone(),
                on_usage: None,
            };
            this.finish(499, None, Vec::new(), Some("client_disconnected"));
        }
    }
}

fn status_label(status: u16) -> &'static str {
    match status {
        200 => "200",
        400 => "400",
        401 => "401",
        403 => "403",
        404 => "404",
        408 => "408",
        413 => "413",
        422 => "422",
        429 => "429",
        499 => "499",
        500 => "500",
        502 => "502",
        503 => "503",
        504 => "504",
        s if s < 300 => "2xx",
        s if s < 500 => "4xx",
        _ => "5xx",
    }
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
