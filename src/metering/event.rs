//! A usage event and its cost: what the meter stage hands the usage writer for each request.

use bytes::Bytes;
use chrono::{DateTime, Utc};

use crate::providers::{Endpoint, Usage};

/// Prices of one catalog model, nano-dollars: tokens per 1M, and the units of calls that are not
/// metered in tokens (images, audio, characters).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Prices {
    pub input: i64,
    pub output: i64,
    /// `None`: cached (cache-read) tokens cost the input price.
    pub cached_input: Option<i64>,
    /// `None`: cache-write tokens cost the input price.
    pub cache_write_input: Option<i64>,
    /// Per image generated; `None`: images are free.
    pub per_image: Option<i64>,
    /// Per minute of audio; `None`: audio is free.
    pub per_minute: Option<i64>,
    /// Per 1M characters of input (speech); `None`: free.
    pub per_1m_chars: Option<i64>,
}

impl Prices {
    /// The catalog model's prices.
    pub fn from_model(m: &entity::models::Model) -> Self {
        Self {
            input: m.input_price_nanos,
            output: m.output_price_nanos,
            cached_input: m.cached_input_price_nanos,
            cache_write_input: m.cache_write_input_price_nanos,
            per_image: m.price_per_image_nanos,
            per_minute: m.price_per_minute_nanos,
            per_1m_chars: m.price_per_1m_chars_nanos,
        }
    }

    /// The dearest price a prompt token can have (input, cache read or cache write): what a
    /// reservation must assume of a prompt not yet counted.
    pub fn dearest_prompt(&self) -> i64 {
        [self.cached_input, self.cache_write_input]
            .into_iter()
            .flatten()
            .fold(self.input, i64::max)
    }
}

/// `nanos_per_unit × units / per`, rounded half up, in `0..=i64::MAX` whatever the inputs (a
/// negative price counts as 0; the i128 product of two values below 2⁶⁴ cannot overflow).
fn priced(units: u128, nanos_per_unit: i64, per: u128) -> i64 {
    let p = nanos_per_unit.max(0) as u128;
    let total = units.saturating_mul(p).saturating_add(per / 2) / per;
    total.min(i64::MAX as u128) as i64
}

/// Cost in nano-dollars, each prompt token billed once at the price of what it was:
///
/// (prompt − cached − cache_write) × input + cached × cached-input + cache_write ×
/// cache-write-input + completion × output
///
/// prices per 1M tokens (an unset cached or cache-write price is the input price), rounded half
/// up to the nano-dollar. Reasoning tokens are inside `completion`, billed there. Counts below
/// zero count as 0; cached and cache-write tokens are taken within prompt (cached first), so no
/// token is billed twice whatever an upstream reports. Never overflows: i128 throughout, the
/// result saturates at `i64::MAX`.
pub fn cost_nanos(u: Usage, p: Prices) -> i64 {
    let prompt = u.prompt.max(0);
    let cached = u.cached.clamp(0, prompt);
    let cache_write = u.cache_write.clamp(0, prompt - cached);
    let uncached = prompt - cached - cache_write;
    let price = |n: i64| i128::from(n.max(0));
    let terms = [
        i128::from(uncached) * price(p.input),
        i128::from(cached) * price(p.cached_input.unwrap_or(p.input)),
        i128::from(cache_write) * price(p.cache_write_input.unwrap_or(p.input)),
        i128::from(u.completion.max(0)) * price(p.output),
    ];
    // Each term is below 2¹²⁶ and the prompt's three share one count, so the sum fits; it
    // saturates all the same.
    let total = terms
        .into_iter()
        .fold(500_000i128, |acc, t| acc.saturating_add(t));
    (total / 1_000_000).clamp(0, i128::from(i64::MAX)) as i64
}

/// What a call used that is not tokens (spec §8: images, audio, speech input), metered when the
/// upstream reports no token usage.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Units {
    /// Images generated (or edited).
    pub images: u64,
    /// Seconds of audio (transcribed, translated or spoken). NaN or below 0 counts as 0.
    pub audio_seconds: f64,
    /// Characters of input (text to speech).
    pub chars: u64,
}

/// Cost in nano-dollars of `u` at the model's unit prices: images × per-image + minutes of audio
/// × per-minute (to the millisecond) + chars × per-1M-chars / 1M, each rounded half up to the
/// nano-dollar; a unit without a price is free. Saturates at `i64::MAX`, never negative.
pub fn units_cost_nanos(u: Units, p: Prices) -> i64 {
    // `as` saturates a float: NaN → 0, ∞ → u64::MAX.
    let audio_ms = (u.audio_seconds.max(0.0) * 1000.0).round() as u64;
    [
        priced(u128::from(u.images), p.per_image.unwrap_or(0), 1),
        priced(u128::from(audio_ms), p.per_minute.unwrap_or(0), 60_000),
        priced(u128::from(u.chars), p.per_1m_chars.unwrap_or(0), 1_000_000),
    ]
    .into_iter()
    .fold(0i64, i64::saturating_add)
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
    pub cache_write: bool,
    pub reasoning: bool,
}

impl Clamped {
    pub fn any(self) -> bool {
        self.prompt || self.completion || self.cached || self.cache_write || self.reasoning
    }
}

/// `u` within `b`: every count ≥ 0, prompt and completion at most their bounds, cached plus
/// cache-write at most prompt (cached first), reasoning at most completion. A count below zero
/// becomes 0 without counting as cut.
pub fn clamp(u: Usage, b: TokenBounds) -> (Usage, Clamped) {
    let prompt = u.prompt.max(0);
    let completion = u.completion.max(0);
    let out_prompt = prompt.min(b.prompt.max(0));
    let out_completion = completion.min(b.completion.max(0));
    let cached = u.cached.max(0);
    let out_cached = cached.min(out_prompt);
    let cache_write = u.cache_write.max(0);
    let out_cache_write = cache_write.min(out_prompt - out_cached);
    let reasoning = u.reasoning.max(0);
    let out_reasoning = reasoning.min(out_completion);
    (
        Usage {
            prompt: out_prompt,
            completion: out_completion,
            cached: out_cached,
            cache_write: out_cache_write,
            reasoning: out_reasoning,
        },
        Clamped {
            prompt: out_prompt < prompt,
            completion: out_completion < completion,
            // Cut only when above the reported counts (following a cut prompt is not news).
            cached: cached > prompt,
            cache_write: cache_write > prompt - cached.min(prompt),
            reasoning: reasoning > completion,
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
            ("cache_write", clamped.cache_write),
            ("reasoning", clamped.reasoning),
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
            reported_cache_write = u.cache_write,
            reported_reasoning = u.reasoning,
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
///
/// A stream's payloads are folded, every [`FOLD_AT`] bytes, into the text the estimate reads of
/// them (`metering::estimate::completion_text`): an open stream then holds its answer's text
/// (a few bytes an event) instead of every chunk's JSON (about 250 bytes an event, 72 KB for a
/// 30-second stream at ten events a second). The estimate is the same: the text is what it
/// would have extracted, in the same order.
#[derive(Debug, Default)]
pub struct KeptPayloads {
    pub payloads: Vec<Bytes>,
    /// The text of the payloads folded so far (they come before `payloads`).
    pub folded: String,
    /// Bytes of the payloads kept, folded ones included (the estimate scales by it).
    pub kept_bytes: usize,
    pub total_bytes: usize,
    /// Bytes in `payloads` (not yet folded).
    unfolded_bytes: usize,
}

/// Kept stream payloads are folded into their text once this many bytes of them wait.
pub const FOLD_AT: usize = 16 * 1024;

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
            self.unfolded_bytes += p.len();
            self.payloads.push(p);
            // A lone payload (a complete body) is never folded: read at most once, if needed.
            if self.unfolded_bytes >= FOLD_AT && self.payloads.len() > 1 {
                crate::metering::estimate::completion_text(&self.payloads, &mut self.folded);
                self.payloads = Vec::new();
                self.unfolded_bytes = 0;
            }
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
    /// A non-token cost (images, audio, characters: [`units_cost_nanos`]), ≥ 0, added
    /// (saturating) to the tokens' cost.
    pub extra_cost_nanos: i64,
    /// The stored response (`resp_…`) the call made or continued, if any.
    pub response_id: Option<String>,
    /// The conversation (`conv_…`) the call ran in, if any.
    pub conversation_id: Option<String>,
    /// The attempts behind the answer (retries, fallbacks).
    pub routed: Routed,
    /// Amounts reserved at admission, released when this event is settled.
    pub reservation: Reservation,
    /// The cost is debited from the user's balance (shared platform key, or
    /// `billing.enforce_balance`).
    pub charged: bool,
    /// The record's unique id (`usage_records.event_id`) and its place in the usage spool.
    pub ticket: crate::metering::spool::Ticket,
}

impl UsageEvent {
    /// What the record costs: its tokens at its prices plus its non-token cost, saturating.
    pub fn cost_nanos(&self) -> i64 {
        cost_nanos(self.usage, self.prices).saturating_add(self.extra_cost_nanos.max(0))
    }
}

/// What routing adds to a usage record (spec §11).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Routed {
    /// Upstream attempts (0 is read as 1: a request the gateway answered itself made none).
    pub attempts: u32,
    /// The model the client asked for, when a fallback model answered.
    pub fallback_from: Option<String>,
    /// Answered from the response cache (`routing::cache`): no upstream call, priced at 0.
    pub cache_hit: bool,
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
            ..Default::default()
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

    #[test]
    fn cache_writes_and_reasoning() {
        // Anthropic-like prices: $3 input, $0.30 cache read, $3.75 cache write, $15 output.
        let p = Prices {
            input: 3_000_000_000,
            output: 15_000_000_000,
            cached_input: Some(300_000_000),
            cache_write_input: Some(3_750_000_000),
            ..Default::default()
        };
        // 10,000 prompt = 1,000 plain + 6,000 read + 3,000 written; 500 completion (200 reasoning).
        let u = Usage {
            prompt: 10_000,
            completion: 500,
            cached: 6_000,
            cache_write: 3_000,
            reasoning: 200,
        };
        // 1000×3e9 + 6000×0.3e9 + 3000×3.75e9 + 500×15e9 = 3e12 + 1.8e12 + 11.25e12 + 7.5e12
        assert_eq!(cost_nanos(u, p), 23_550_000);
        // Reasoning is inside completion: it changes nothing.
        assert_eq!(cost_nanos(Usage { reasoning: 0, ..u }, p), 23_550_000);
        // No cache-write price: written tokens cost the input price.
        let plain = Prices {
            cache_write_input: None,
            ..p
        };
        assert_eq!(cost_nanos(u, plain), 23_550_000 - 3_000 * 750);
        // More cache reads and writes than prompt: the prompt is billed once, reads first.
        let over = Usage {
            prompt: 100,
            completion: 0,
            cached: 80,
            cache_write: 80,
            reasoning: 0,
        };
        assert_eq!(
            cost_nanos(over, p),
            (80 * 300_000_000 + 20 * 3_750_000_000) / 1_000_000
        );
        // Negative counts and prices count as 0.
        let neg = Usage {
            prompt: -5,
            completion: -5,
            cached: -5,
            cache_write: -5,
            reasoning: -5,
        };
        assert_eq!(cost_nanos(neg, p), 0);
        assert_eq!(
            cost_nanos(
                u,
                Prices {
                    input: -1,
                    output: -1,
                    ..Default::default()
                }
            ),
            0
        );
    }

    #[test]
    fn clamp_keeps_cache_reads_and_writes_within_prompt() {
        let b = TokenBounds {
            prompt: 1_000,
            completion: 100,
        };
        let (u, c) = clamp(
            Usage {
                prompt: 5_000,
                completion: 500,
                cached: 700,
                cache_write: 700,
                reasoning: 900,
            },
            b,
        );
        assert_eq!(
            u,
            Usage {
                prompt: 1_000,
                completion: 100,
                cached: 700,
                cache_write: 300,
                reasoning: 100,
            }
        );
        // Within the reported counts: following a cut bound is not news …
        assert!(c.prompt && c.completion && !c.cached && !c.cache_write && c.reasoning);
        // … above them is.
        let (u, c) = clamp(
            Usage {
                prompt: 10,
                completion: 10,
                cached: 6,
                cache_write: 6,
                reasoning: 3,
            },
            b,
        );
        assert_eq!((u.cached, u.cache_write, u.reasoning), (6, 4, 3));
        assert!(c.cache_write && !c.cached && !c.reasoning && !c.prompt);
    }

    #[test]
    fn units_are_priced_per_image_minute_and_character() {
        let p = Prices {
            per_image: Some(40_000_000),        // $0.04 an image
            per_minute: Some(6_000_000),        // $0.006 a minute
            per_1m_chars: Some(15_000_000_000), // $15 per 1M characters
            ..Default::default()
        };
        let cost = |images, audio_seconds, chars| {
            units_cost_nanos(
                Units {
                    images,
                    audio_seconds,
                    chars,
                },
                p,
            )
        };
        assert_eq!(cost(3, 0.0, 0), 120_000_000);
        assert_eq!(cost(0, 90.0, 0), 9_000_000);
        // To the millisecond: 1 ms at $0.006/min = 100 nano-dollars.
        assert_eq!(cost(0, 0.001, 0), 100);
        // Rounded half up: 1 ms at 90,000 nano-dollars a minute = 1.5 → 2; 0.4 ms rounds to 0 ms.
        let cheap = Prices {
            per_minute: Some(90_000),
            ..Default::default()
        };
        let audio = |audio_seconds| {
            units_cost_nanos(
                Units {
                    audio_seconds,
                    ..Default::default()
                },
                cheap,
            )
        };
        assert_eq!((audio(0.001), audio(0.0004), audio(0.002)), (2, 0, 3));
        assert_eq!(cost(0, 0.0, 1_000), 15_000_000);
        assert_eq!(
            cost(2, 60.0, 1_000_000),
            80_000_000 + 6_000_000 + 15_000_000_000
        );
        // Untrusted durations: NaN and negatives are nothing, infinity saturates.
        assert_eq!(cost(0, f64::NAN, 0), 0);
        assert_eq!(cost(0, -30.0, 0), 0);
        assert!(cost(0, f64::INFINITY, 0) > 0);
        assert_eq!(cost(u64::MAX, f64::INFINITY, u64::MAX), i64::MAX);
        // A unit without a price is free.
        assert_eq!(
            units_cost_nanos(
                Units {
                    images: 5,
                    audio_seconds: 60.0,
                    chars: 9
                },
                Prices::default()
            ),
            0
        );
    }

    #[test]
    fn an_event_adds_its_non_token_cost() {
        let p = Prices {
            input: 1_000_000_000,
            per_image: Some(40_000_000),
            ..Default::default()
        };
        let mut e = UsageEvent {
            at: Utc::now(),
            user_id: "u".into(),
            key_id: "k".into(),
            model: "m".into(),
            provider: "p".into(),
            endpoint: Endpoint::ChatCompletions,
            stream: false,
            status: 200,
            usage: Usage {
                prompt: 1_000,
                ..Default::default()
            },
            prices: p,
            latency_ms: 0,
            ttft_ms: None,
            tokens_estimated: false,
            request_id: "r".into(),
            shared_key: false,
            error: None,
            extra_cost_nanos: units_cost_nanos(
                Units {
                    images: 2,
                    ..Default::default()
                },
                p,
            ),
            response_id: None,
            conversation_id: None,
            routed: Routed::default(),
            reservation: Reservation::default(),
            charged: true,
            ticket: crate::metering::spool::Ticket::new(),
        };
        assert_eq!(e.cost_nanos(), 1_000_000 + 80_000_000);
        e.extra_cost_nanos = i64::MAX;
        assert_eq!(e.cost_nanos(), i64::MAX);
        e.extra_cost_nanos = -5;
        assert_eq!(e.cost_nanos(), 1_000_000);
    }

    /// The formula, with exact arithmetic, for counts already within prompt.
    fn reference(u: Usage, p: Prices) -> i128 {
        let uncached = i128::from(u.prompt - u.cached - u.cache_write);
        let total = uncached * i128::from(p.input)
            + i128::from(u.cached) * i128::from(p.cached_input.unwrap_or(p.input))
            + i128::from(u.cache_write) * i128::from(p.cache_write_input.unwrap_or(p.input))
            + i128::from(u.completion) * i128::from(p.output);
        (total + 500_000) / 1_000_000
    }

    fn arb_prices() -> impl proptest::strategy::Strategy<Value = Prices> {
        use proptest::prelude::*;
        (
            0i64..=i64::MAX,
            0i64..=i64::MAX,
            proptest::option::of(0i64..=i64::MAX),
            proptest::option::of(0i64..=i64::MAX),
        )
            .prop_map(|(input, output, cached_input, cache_write_input)| Prices {
                input,
                output,
                cached_input,
                cache_write_input,
                ..Default::default()
            })
    }

    proptest::proptest! {
        /// Whatever an upstream reports, over the whole i64 range: the cost never overflows,
        /// is never negative, and equals the formula over the counts taken within prompt.
        #[test]
        fn cost_never_overflows_and_bills_each_token_once(
            prompt in proptest::num::i64::ANY, completion in proptest::num::i64::ANY,
            cached in proptest::num::i64::ANY, cache_write in proptest::num::i64::ANY,
            reasoning in proptest::num::i64::ANY, p in arb_prices(),
        ) {
            let u = Usage { prompt, completion, cached, cache_write, reasoning };
            let cost = cost_nanos(u, p);
            proptest::prop_assert!(cost >= 0);
            let prompt = prompt.max(0);
            let cached = cached.clamp(0, prompt);
            let cache_write = cache_write.clamp(0, prompt - cached);
            let within = Usage { prompt, completion: completion.max(0), cached, cache_write, reasoning: 0 };
            proptest::prop_assert_eq!(i128::from(cost), reference(within, p).min(i128::from(i64::MAX)));
            // Reasoning is never billed on top of completion.
            proptest::prop_assert_eq!(cost, cost_nanos(Usage { reasoning: 0, ..u }, p));
        }

        /// Each prompt token is billed once, at the price of what it was: moving a token from
        /// plain input to cache read or cache write changes the cost by exactly the price
        /// difference, and a cache-write token without its own price costs the input price.
        #[test]
        fn a_prompt_token_costs_its_own_price(
            prompt in 2i64..=10_000_000, cached in 0i64..=10_000_000, cache_write in 0i64..=10_000_000,
            completion in 0i64..=10_000_000,
            input in 0i64..=1_000_000_000_000, output in 0i64..=1_000_000_000_000,
            read in 0i64..=1_000_000_000_000, write in 0i64..=1_000_000_000_000,
        ) {
            let cached = cached % prompt;
            let cache_write = cache_write % (prompt - cached);
            let p = Prices { input, output, cached_input: Some(read), cache_write_input: Some(write), ..Default::default() };
            let u = Usage { prompt, completion, cached, cache_write, reasoning: 0 };
            let one_more_write = Usage { cache_write: cache_write + 1, ..u };
            let one_more_read = Usage { cached: cached + 1, ..u };
            // The unrounded sum (nano-dollars × 1M), so rounding does not blur the check.
            let raw = |u: Usage, p: Prices| {
                i128::from(u.prompt - u.cached - u.cache_write) * i128::from(p.input)
                    + i128::from(u.cached) * i128::from(p.cached_input.unwrap_or(p.input))
                    + i128::from(u.cache_write) * i128::from(p.cache_write_input.unwrap_or(p.input))
                    + i128::from(u.completion) * i128::from(p.output)
            };
            proptest::prop_assert_eq!(
                raw(one_more_write, p) - raw(u, p),
                i128::from(write) - i128::from(input)
            );
            proptest::prop_assert_eq!(
                raw(one_more_read, p) - raw(u, p),
                i128::from(read) - i128::from(input)
            );
            // cost_nanos is the rounded raw sum.
            proptest::prop_assert_eq!(i128::from(cost_nanos(u, p)), (raw(u, p) + 500_000) / 1_000_000);
            // Without a cache-write price, written tokens cost exactly the input price.
            let unpriced = Prices { cache_write_input: None, ..p };
            let as_input = Usage { cache_write: 0, ..u };
            proptest::prop_assert_eq!(cost_nanos(u, unpriced), cost_nanos(as_input, unpriced));
        }

        /// Clamped usage: cached + cache-write within prompt, reasoning within completion.
        #[test]
        fn clamped_counts_nest(
            prompt in proptest::num::i64::ANY, completion in proptest::num::i64::ANY,
            cached in proptest::num::i64::ANY, cache_write in proptest::num::i64::ANY,
            reasoning in proptest::num::i64::ANY,
            bp in 0i64..=TOKEN_CAP, bc in 0i64..=TOKEN_CAP,
        ) {
            let (u, _) = clamp(
                Usage { prompt, completion, cached, cache_write, reasoning },
                TokenBounds { prompt: bp, completion: bc },
            );
            proptest::prop_assert!(u.cached >= 0 && u.cache_write >= 0 && u.reasoning >= 0);
            proptest::prop_assert!(u.cached + u.cache_write <= u.prompt);
            proptest::prop_assert!(u.reasoning <= u.completion);
            proptest::prop_assert!(u.prompt <= bp && u.completion <= bc);
        }

        /// Units never overflow nor go negative, whatever is counted.
        #[test]
        fn units_cost_is_bounded(
            images in proptest::num::u64::ANY, chars in proptest::num::u64::ANY,
            secs in proptest::num::f64::ANY,
            a in proptest::option::of(proptest::num::i64::ANY),
            b in proptest::option::of(proptest::num::i64::ANY),
            c in proptest::option::of(proptest::num::i64::ANY),
        ) {
            let p = Prices { per_image: a, per_minute: b, per_1m_chars: c, ..Default::default() };
            let cost = units_cost_nanos(Units { images, audio_seconds: secs, chars }, p);
            proptest::prop_assert!(cost >= 0);
            if let Some(a) = a.filter(|&a| a > 0) {
                let images_only = units_cost_nanos(Units { images, ..Default::default() }, p);
                proptest::prop_assert_eq!(
                    i128::from(images_only),
                    (i128::from(images) * i128::from(a)).min(i128::from(i64::MAX))
                );
            }
        }
    }
}
