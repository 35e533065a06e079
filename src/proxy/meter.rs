//! ⑥ meter: every request that reached an upstream becomes exactly one [`UsageEvent`], sent on
//! end, on error, or when the client goes away (the body wrapper is dropped).
//!
//! The usage queue slot is reserved at admission ([`Meter::new`] takes an `OwnedPermit`), so
//! sending the event can never fail or block: back-pressure is applied before forwarding, and no
//! record is ever dropped.
//!
//! Token counts are untrusted: what the upstream reports (or the estimate counts) is cut to the
//! request's [`TokenBounds`] here, before the event exists. An estimate runs on the blocking pool
//! and the event is sent when it is done, so counting one request's tokens never delays anyone
//! else's record.

use std::time::Instant;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use tokio::sync::mpsc::OwnedPermit;

use crate::metering::estimate;
use crate::metering::event::{
    ESTIMATE_KEEP_BYTES, EstimateInput, KeptPayloads, Prices, Reservation, Routed, TokenBounds,
    Units, UsageEvent, bound_usage, units_cost_nanos,
};
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
    /// The most tokens this request can have used.
    pub bounds: TokenBounds,
    /// The client's body, kept for an estimate only when at most [`ESTIMATE_KEEP_BYTES`] (use
    /// [`RequestFacts::keep_body`]).
    pub request_body: Bytes,
    pub request_len: usize,
    /// The stored response (`resp_…`) the call made or continued, if any.
    pub response_id: Option<String>,
    /// The conversation (`conv_…`) the call ran in, if any.
    pub conversation_id: Option<String>,
    /// Attempts behind the answer and the model it fell back from.
    pub routed: Routed,
    /// A non-token cost ([`Meter::meter_units`]), added to the tokens' cost.
    pub extra_cost_nanos: i64,
    /// [`Meter::meter_units`] ran: the call was metered in units, so no tokens are estimated
    /// when the upstream reports none.
    pub units_metered: bool,
}

impl RequestFacts {
    /// Keeps `body` for an estimate when it is small enough to be tokenized; a larger one is
    /// estimated from its length (holding it would hold up to `server.max_body_bytes` per
    /// request until the request ends).
    pub fn keep_body(&mut self, body: &Bytes) {
        self.request_len = body.len();
        self.request_body = if body.len() <= ESTIMATE_KEEP_BYTES {
            body.clone()
        } else {
            Bytes::new()
        };
    }
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
    /// The record's id, and once [`Meter::spool`] ran, its started record in the usage spool.
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

    /// Appends the request's started record to the usage spool (one `pwrite(2)`) at once, just
    /// before it goes upstream: a `kill -9` from here on still leaves a record (see
    /// `metering::spool`).
    pub fn spool(&mut self, spool: &Spool) {
        match spool.started(&mut self.ticket, &self.facts, self.at) {
            Ok(()) => self.metrics.usage_spool_started_writes_total.inc(),
            Err(lost) => self.spool_lost(lost),
        }
    }

    /// [`Meter::spool`], sharing the write with the other requests this worker starts in the
    /// same scheduler round (see [`Spool::started_shared`]): same guarantee, fewer system calls
    /// under load.
    pub async fn spool_shared(&mut self, spool: &Spool) {
        match spool
            .started_shared(&mut self.ticket, &self.facts, self.at)
            .await
        {
            Ok(true) => self.metrics.usage_spool_started_writes_total.inc(),
            Ok(false) => {}
            Err(lost) => self.spool_lost(lost),
        }
    }

    fn spool_lost(&self, lost: crate::metering::spool::Lost) {
        self.metrics.usage_spool_errors_total.inc_by(lost.records);
        tracing::error!(
            error = %lost.error,
            records = lost.records,
            "usage spool: cannot append; these records are not crash-safe"
        );
    }

    /// Meters what the call used that is not tokens (images, audio, characters) at the model's
    /// unit prices: for a call whose upstream reported no token usage (spec §8). Its tokens are
    /// then not estimated; call it before [`Meter::finish`].
    pub fn meter_units(&mut self, units: Units) {
        let cost = units_cost_nanos(units, self.facts.prices);
        self.facts.extra_cost_nanos = self.facts.extra_cost_nanos.saturating_add(cost);
        self.facts.units_metered = true;
    }

    /// Gives up a meter that turned out to stand for no request (a realtime session's next
    /// response, made ready after the last one, that never came): no record is sent, its usage
    /// slot is freed, and its reservation is returned for the caller to release. Only for a
    /// meter [`Meter::spool`] never ran on (its started record would wait for a finished one forever).
    pub fn discard(mut self) -> Reservation {
        debug_assert!(self.ticket.is_unspooled(), "a spooled meter must finish");
        self.permit = None;
        self.facts.reservation
    }

    pub fn on_usage(&mut self, f: impl FnOnce(Usage) + Send + Sync + 'static) {
        self.on_usage = Some(Box::new(f));
    }

    pub fn mark_first_byte(&mut self) {
        if self.first_byte.is_none() {
            self.first_byte = Some(Instant::now());
        }
    }

    /// Sends the record. `usage = None`: the tokens are estimated from the request and
    /// `response` (see [`estimate`]).
    pub fn finish(
        mut self,
        status: u16,
        usage: Option<Usage>,
        response: KeptPayloads,
        error: Option<&str>,
    ) {
        let Some(permit) = self.permit.take() else {
            return;
        };
        let bounds = self.facts.bounds;
        let usage = usage.map(|u| self.bounded(u, "upstream"));
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
        let estimate = if usage.is_none()
            && !self.facts.units_metered
            && (status < 400 || status == 499 || !response.is_empty())
        {
            Some(EstimateInput {
                request: std::mem::take(&mut self.facts.request_body),
                request_len: self.facts.request_len,
                response,
            })
        } else {
            None
        };
        let f = &mut self.facts;
        let mut event = UsageEvent {
            at: self.at,
            user_id: std::mem::take(&mut f.user_id),
            key_id: std::mem::take(&mut f.key_id),
            model: std::mem::take(&mut f.model),
            provider: std::mem::take(&mut f.provider),
            endpoint: f.endpoint,
            stream: f.stream,
            status,
            usage: usage.unwrap_or_default(),
            tokens_estimated: estimate.is_some(),
            prices: f.prices,
            latency_ms: latency.as_millis() as i64,
            ttft_ms: ttft.map(|t| t.as_millis() as i64),
            request_id: std::mem::take(&mut f.request_id),
            shared_key: f.shared_key,
            error: error.map(str::to_owned),
            extra_cost_nanos: f.extra_cost_nanos.max(0),
            response_id: f.response_id.take(),
            conversation_id: f.conversation_id.take(),
            routed: std::mem::take(&mut f.routed),
            reservation: f.reservation,
            charged: f.charged,
            ticket: std::mem::take(&mut self.ticket),
        };
        let Some(input) = estimate else {
            permit.send(event);
            return;
        };
        let metrics = self.metrics.clone();
        let count = move || {
            let e = estimate::estimate(event.endpoint, &input);
            drop(input);
            metrics
                .usage_estimate_tokenized_bytes_total
                .inc_by(e.tokenized_bytes as u64);
            event.usage = bound_usage(&metrics, &event.request_id, e.usage, bounds, "estimate");
            permit.send(event);
        };
        // Off this task and off the writer's: the slot is held until the event is sent, so
        // shutdown still waits for it.
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn_blocking(count)),
            Err(_) => count(),
        }
    }

    fn bounded(&self, u: Usage, source: &str) -> Usage {
        bound_usage(
            &self.metrics,
            &self.facts.request_id,
            u,
            self.facts.bounds,
            source,
        )
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
            this.finish(
                499,
                None,
                KeptPayloads::default(),
                Some("client_disconnected"),
            );
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
