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

use crate::metering::event::{EstimateInput, Prices, Reservation, UsageEvent};
use crate::metering::spool::{Spool, Ticket};
use crate::providers::{Endpoint, Usage};

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
    /// The record's id, and once [`Meter::spool`] ran, its started line in the usage spool.
    ticket: Ticket,
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
            ticket: Ticket::new(),
        }
    }

    /// Appends the request's started line to the usage spool (one `write(2)`), just before it
    /// goes upstream: a `kill -9` from here on still leaves a record (see `metering::spool`).
    pub fn spool(&mut self, spool: &Spool) {
        if let Err(e) = spool.started(&mut self.ticket, &self.facts, self.at) {
            self.metrics.usage_spool_errors_total.inc();
            tracing::error!(error = %e, "usage spool: cannot append; this record is not crash-safe");
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
            ticket: std::mem::take(&mut self.ticket),
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
                ticket: std::mem::take(&mut self.ticket),
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
