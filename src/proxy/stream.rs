//! ⑤ stream: the upstream's body passes through chunk by chunk. An incremental SSE scanner finds
//! whole events (split across reads, `\n` / `\r\n` / `\r` line ends, comments, multi-line data),
//! the adapter maps each one (usage read, usage-only chunk removed when the client did not ask for
//! it, model renamed), and the meter fires when the body ends, fails, or is dropped because the
//! client left.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use tokio::time::Sleep;

use crate::error::ApiError;
use crate::metering::event::{KeptPayloads, Units};
use crate::providers::{Adapter, EventCtx, EventOut, Usage};
use crate::proxy::meter::Meter;

/// Splits a byte stream into SSE events, holding at most one event's bytes (bounded by `max`)
/// beyond the chunk just pushed, and examining each byte once however the events are split.
pub struct SseScanner {
    buf: BytesMut,
    /// Where the line being scanned starts (an event ends at a line that is empty).
    line_start: usize,
    /// Where the search for the next line end resumes: every byte before it has been examined.
    scanned: usize,
    /// The largest event accepted, terminator included.
    max: usize,
    /// Bytes the search has examined (for the tests: each byte once).
    #[cfg(test)]
    examined: usize,
}

/// An event, or the part of one received so far, is larger than the scanner accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventTooLarge;

/// One complete event: its raw bytes (terminator included) and its joined `data` payload.
#[derive(Debug, PartialEq, Eq)]
pub struct SseEvent {
    pub raw: Bytes,
    pub data: Option<Bytes>,
}

/// `upstream.max_sse_event_bytes`' default.
pub const DEFAULT_MAX_EVENT_BYTES: usize = 1024 * 1024;

impl Default for SseScanner {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_EVENT_BYTES)
    }
}

impl SseScanner {
    /// A scanner that refuses an event larger than `max` bytes.
    pub fn new(max: usize) -> Self {
        Self {
            buf: BytesMut::new(),
            line_start: 0,
            scanned: 0,
            max,
            #[cfg(test)]
            examined: 0,
        }
    }

    pub fn push(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// Bytes held: the incomplete event, and complete ones not yet taken.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next complete event, if the buffer holds one; `Err` once the next event is larger
    /// than the limit, complete or not (the scanner is then of no further use).
    pub fn next_event(&mut self) -> Result<Option<SseEvent>, EventTooLarge> {
        let Some(end) = self.find_event_end() else {
            return if self.buf.len() > self.max {
                Err(EventTooLarge)
            } else {
                Ok(None)
            };
        };
        if end > self.max {
            return Err(EventTooLarge);
        }
        let raw = self.buf.split_to(end).freeze();
        self.line_start = 0;
        self.scanned = 0;
        Ok(Some(SseEvent {
            data: data_of(&raw),
            raw,
        }))
    }

    /// Whatever is left when the stream ends (an event without its blank line).
    pub fn finish(&mut self) -> Option<SseEvent> {
        if self.buf.is_empty() || self.buf.len() > self.max {
            return None;
        }
        let raw = self.buf.split().freeze();
        self.line_start = 0;
        self.scanned = 0;
        Some(SseEvent {
            data: data_of(&raw),
            raw,
        })
    }

    /// Drops what is held (an event that was too large).
    pub fn discard(&mut self) {
        self.buf = BytesMut::new();
        self.line_start = 0;
        self.scanned = 0;
    }

    /// End offset (exclusive) of the first event: the end of its first empty line. A blank line
    /// at the very start is an event of its own (forwarded as is). Resumes where the last call
    /// stopped, so a long line arriving in many chunks is searched once, not once per chunk.
    fn find_event_end(&mut self) -> Option<usize> {
        let b = &self.buf[..];
        let mut line_start = self.line_start;
        let mut i = self.scanned;
        let found = loop {
            let Some(at) = memchr::memchr2(b'\n', b'\r', &b[i..]) else {
                i = b.len();
                break None;
            };
            i += at;
            let term = if b[i] == b'\r' {
                match b.get(i + 1) {
                    // A lone '\r' at the end may be the first half of "\r\n": wait for more.
                    None => break None,
                    Some(b'\n') => 2,
                    Some(_) => 1,
                }
            } else {
                1
            };
            let next = i + term;
            if i == line_start {
                break Some(next);
            }
            line_start = next;
            i = next;
        };
        #[cfg(test)]
        {
            self.examined += i.min(b.len()) - self.scanned;
        }
        if found.is_none() {
            self.line_start = line_start;
            self.scanned = i;
        }
        found
    }
}

/// The `data` field of an event: its `data:` lines joined with `\n` (one leading space dropped).
/// A single `data:` line (the usual case) is a slice of `raw`, not a copy.
fn data_of(raw: &Bytes) -> Option<Bytes> {
    // The usual event, one `data:` line and its blank line: a slice, found with one search.
    if let Some(rest) = raw.strip_prefix(b"data:") {
        let end = memchr::memchr2(b'\n', b'\r', rest).unwrap_or(rest.len());
        if rest[end..].iter().all(|&c| c == b'\n' || c == b'\r') {
            let skip = 5 + usize::from(rest.first() == Some(&b' '));
            return Some(raw.slice(skip..5 + end));
        }
    }
    let mut out: Option<Vec<u8>> = None;
    let mut single: Option<(usize, usize)> = None;
    let mut start = 0;
    for line in raw.split(|&c| c == b'\n' || c == b'\r') {
        let line_start = start;
        start += line.len() + 1;
        let Some(rest) = line.strip_prefix(b"data:") else {
            continue;
        };
        let skip = 5 + usize::from(rest.first() == Some(&b' '));
        let rest = &line[skip..];
        match (&mut out, single) {
            (Some(v), _) => {
                v.push(b'\n');
                v.extend_from_slice(rest);
            }
            (None, Some((a, b))) => {
                let mut v = raw[a..b].to_vec();
                v.push(b'\n');
                v.extend_from_slice(rest);
                out = Some(v);
            }
            (None, None) => single = Some((line_start + skip, line_start + line.len())),
        }
    }
    match (out, single) {
        (Some(v), _) => Some(Bytes::from(v)),
        (None, Some((a, b))) => Some(raw.slice(a..b)),
        (None, None) => None,
    }
}

/// Mapped events are sent once this much is gathered, even while the upstream has more at hand.
pub(crate) const FLUSH_AT: usize = 16 * 1024;

/// The most hyper buffers per HTTP/1.1 connection each way: a client connection's queued writes
/// (`src/server.rs`) and an upstream connection's read buffer (`proxy/upstream/pool.rs`); also
/// the largest request or response head accepted. hyper's default is ~400 KiB, which a client
/// that stops reading fills on each side: about 1 MiB held per slow stream (measured,
/// `tests/backpressure.rs`). With 64 KiB a paused stream holds at most this on each connection,
/// plus one gathered frame ([`FLUSH_AT`] and an event) and the event being scanned; the body is
/// only polled when hyper has room, so the upstream is then not read until the client reads.
pub const CONN_BUF_BYTES: usize = 64 * 1024;

/// The room a frame's buffer starts with.
const OUT_CHUNK: usize = 2048;

/// Appends the event `raw` with its `data` lines replaced by one `data: payload` line (its
/// `event:`, `id:` and other lines kept, in place).
fn replace_data(raw: &[u8], payload: &[u8], out: &mut BytesMut) {
    let mut written = false;
    let mut rest = raw;
    while !rest.is_empty() {
        let end = memchr::memchr(b'\n', rest).map_or(rest.len(), |i| i + 1);
        let (line, tail) = rest.split_at(end);
        rest = tail;
        if line.starts_with(b"data:") {
            if !written {
                written = true;
                out.extend_from_slice(b"data: ");
                out.extend_from_slice(payload);
                out.extend_from_slice(b"\n");
            }
        } else {
            out.extend_from_slice(line);
        }
    }
    if !written {
        push_data(out, payload);
    }
}

/// Appends `payload` to `out` as one SSE event.
fn push_data(out: &mut BytesMut, payload: &[u8]) {
    out.reserve(payload.len() + 8);
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(payload);
    out.extend_from_slice(b"\n\n");
}

/// What a stream is allowed to wait for the next chunk.
pub struct StreamLimits {
    pub idle_timeout: Duration,
    /// The largest single event taken from the upstream (`upstream.max_sse_event_bytes`).
    pub max_event_bytes: usize,
}

/// How a stream's events are mapped for the client.
/// Reads the usage of a stream relayed untouched in a protocol other than OpenAI chat
/// (Anthropic's Messages, the Responses API), whose usage is spread over several events.
pub trait UsageReader: Send {
    /// One event's `data` payload.
    fn on_event(&mut self, data: &[u8]);
    /// The usage so far.
    fn usage(&self) -> Option<Usage>;
    /// A replacement for this event's payload (the Responses API's ids), else `None`.
    fn rewrite(&mut self, _data: &[u8]) -> Option<Vec<u8>> {
        None
    }
    /// The stream ended normally (after its last event).
    fn on_end(&mut self) {}
    /// What to meter in units (images, audio, characters) when the stream reported no usage.
    fn units(&self) -> Option<Units> {
        None
    }
    /// The upstream's stream ended without its protocol's terminal event (a cut, not an end).
    fn cut_short(&self) -> bool {
        false
    }
    /// Writes the stream's final error event in the client's protocol; false (the default):
    /// OpenAI's `data: {"error": …}` is written instead.
    fn error_event(&self, _err: &crate::pivot::UpstreamError, _out: &mut BytesMut) -> bool {
        false
    }
}

/// The idle timeout between an upstream body's data frames: one timer, re-armed from the last
/// data only when it fires, so frames do not touch the timer wheel.
pub(crate) struct IdleTimer {
    sleep: Pin<Box<Sleep>>,
    timeout: Duration,
    last_data: tokio::time::Instant,
}

impl IdleTimer {
    pub(crate) fn new(timeout: Duration) -> Self {
        Self {
            sleep: Box::pin(tokio::time::sleep(timeout)),
            timeout,
            last_data: tokio::time::Instant::now(),
        }
    }

    /// Data came from the upstream.
    pub(crate) fn touch(&mut self) {
        self.last_data = tokio::time::Instant::now();
    }

    /// The upstream has nothing right now: whether it has been silent for the whole timeout
    /// (if not, `cx` is woken when it could be).
    pub(crate) fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        while self.sleep.as_mut().poll(cx).is_ready() {
            let due = self.last_data + self.timeout;
            if due <= tokio::time::Instant::now() {
                return true;
            }
            self.sleep.as_mut().reset(due);
        }
        false
    }
}

pub struct StreamMapping {
    /// Maps OpenAI chat events (`None`: events pass untouched and `reader` reads the usage).
    pub adapter: Option<&'static dyn Adapter>,
    pub reader: Option<Box<dyn UsageReader>>,
    pub client_model: String,
    pub upstream_model: String,
    /// The client asked for usage; else the usage-only chunk is removed.
    pub client_wants_usage: bool,
}

/// The body returned to a streaming client.
pub struct MeteredStream<B> {
    upstream: Pin<Box<B>>,
    map: StreamMapping,
    /// `map.client_model` as a JSON string.
    client_model_json: Vec<u8>,
    scanner: SseScanner,
    /// Mapped events waiting to be sent, framed, back to back: one buffer, so a frame of several
    /// events is neither a list of pieces nor a second copy.
    out: BytesMut,
    usage: Option<Usage>,
    /// Payloads kept for estimation until the upstream reports usage (bounded).
    kept: KeptPayloads,
    meter: Option<Meter>,
    idle: IdleTimer,
    /// Data frames read from the upstream so far (progress, even when an event is dropped).
    received: u64,
    ended: bool,
    active_streams: prometheus::IntGauge,
}

impl<B> MeteredStream<B> {
    pub fn new(
        upstream: B,
        map: StreamMapping,
        meter: Meter,
        limits: StreamLimits,
        active_streams: prometheus::IntGauge,
    ) -> Self {
        active_streams.inc();
        Self {
            upstream: Box::pin(upstream),
            client_model_json: crate::providers::model_json(&map.client_model),
            map,
            scanner: SseScanner::new(limits.max_event_bytes),
            out: BytesMut::new(),
            usage: None,
            kept: KeptPayloads::default(),
            meter: Some(meter),
            idle: IdleTimer::new(limits.idle_timeout),
            received: 0,
            ended: false,
            active_streams,
        }
    }

    /// The stream ended, or [`FLUSH_AT`] bytes wait to be sent.
    fn ready_to_send(&self) -> bool {
        self.ended || self.out.len() >= FLUSH_AT
    }

    /// Everything mapped so far as one frame (one write to the client instead of one per event).
    /// The buffer goes with it, spare room and all: kept for the next frame, that room would
    /// hold the frame's whole allocation ([`OUT_CHUNK`]) while a long stream waits between
    /// events; the next frame allocates its own.
    fn take_out(&mut self) -> Option<Bytes> {
        (!self.out.is_empty()).then(|| std::mem::take(&mut self.out).freeze())
    }

    fn handle_event(&mut self, ev: SseEvent) {
        if self.out.is_empty() {
            // A frame starts: room for a typical frame's events at once, rather than growing
            // the buffer event by event (it keeps what the last frame left unused).
            self.out.reserve(OUT_CHUNK);
        }
        let Some(data) = ev.data else {
            self.out.extend_from_slice(&ev.raw);
            return;
        };
        let Some(adapter) = self.map.adapter else {
            let mut replaced = None;
            if let Some(r) = self.map.reader.as_mut() {
                r.on_event(&data);
                replaced = r.rewrite(&data);
                let usage = r.usage();
                if usage.is_some() {
                    self.usage = usage;
                    self.kept.clear();
                } else {
                    self.kept.push(data);
                }
            }
            match replaced {
                Some(payload) => replace_data(&ev.raw, &payload, &mut self.out),
                None => self.out.extend_from_slice(&ev.raw),
            }
            return;
        };
        let ctx = EventCtx {
            client_model: &self.map.client_model,
            client_model_json: &self.client_model_json,
            upstream_model: &self.map.upstream_model,
            client_wants_usage: self.map.client_wants_usage,
        };
        let mapped = adapter.map_event(&data, &ctx);
        if let Some(u) = mapped.usage {
            self.usage = Some(u);
            self.kept.clear();
        } else if self.usage.is_none() {
            // Kept for an estimate should the usage never come (events without output count 0).
            self.kept.push(data.clone());
        }
        // An observer (a stored completion) sees what the client sees, and may rewrite it.
        if let Some(r) = self.map.reader.as_mut() {
            match mapped.out {
                EventOut::Unchanged => {
                    r.on_event(&data);
                    match r.rewrite(&data) {
                        Some(p) => push_data(&mut self.out, &p),
                        None => self.out.extend_from_slice(&ev.raw),
                    }
                }
                EventOut::Replace(payload) => {
                    r.on_event(&payload);
                    let p = r.rewrite(&payload).unwrap_or(payload);
                    push_data(&mut self.out, &p);
                }
                EventOut::Drop => r.on_event(&data),
            }
            return;
        }
        match mapped.out {
            EventOut::Unchanged => self.out.extend_from_slice(&ev.raw),
            EventOut::Replace(payload) => push_data(&mut self.out, &payload),
            EventOut::Drop => {}
        }
    }

    /// Ends the stream with an error event in the client's protocol (OpenAI's unless the usage
    /// reader writes its own) and meters what was produced.
    fn fail(&mut self, status: u16, err: ApiError, reason: &str) {
        if let Some(ev) = self.scanner.finish() {
            self.handle_event(ev);
        }
        let written = self.map.reader.as_ref().is_some_and(|r| {
            r.error_event(&crate::pivot::UpstreamError::from(&err), &mut self.out)
        });
        if !written {
            let body = serde_json::to_vec(&err.body()).unwrap_or_default();
            push_data(&mut self.out, &body);
        }
        self.ended = true;
        self.finish_meter(status, Some(reason));
    }

    /// The upstream sent an event over the limit: it is dropped unseen, the client gets an error
    /// event, and what was relayed before it is metered.
    fn event_too_large(&mut self) {
        let limit = self.scanner.max;
        self.scanner.discard();
        tracing::warn!(
            limit,
            "upstream sent a server-sent event larger than upstream.max_sse_event_bytes"
        );
        self.fail(
            502,
            ApiError::Upstream {
                status: http::StatusCode::BAD_GATEWAY,
                message: format!(
                    "The upstream sent an event larger than this gateway accepts ({limit} bytes); the stream was ended."
                ),
                code: "upstream_event_too_large",
            },
            "upstream_event_too_large",
        );
    }

    fn finish_meter(&mut self, status: u16, error: Option<&str>) {
        if status == 200
            && self.meter.is_some()
            && let Some(r) = self.map.reader.as_mut()
        {
            r.on_end();
        }
        if let Some(mut m) = self.meter.take() {
            if self.usage.is_none()
                && let Some(u) = self.map.reader.as_ref().and_then(|r| r.units())
            {
                m.meter_units(u);
            }
            m.finish(status, self.usage, std::mem::take(&mut self.kept), error);
        }
    }
}

impl<B> MeteredStream<B>
where
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    /// Reads and maps what the upstream has: `Ready` once the stream ended or [`FLUSH_AT`] bytes
    /// wait in `out`, `Pending` when the upstream has nothing more right now (or the idle timer
    /// is armed).
    fn gather(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            if self.ready_to_send() {
                return Poll::Ready(());
            }
            match self.upstream.as_mut().poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    let Ok(data) = frame.into_data() else {
                        continue; // trailers: nothing for an SSE client
                    };
                    if let Some(m) = self.meter.as_mut() {
                        m.mark_first_byte();
                    }
                    self.idle.touch();
                    self.received += 1;
                    self.scanner.push(&data);
                    loop {
                        match self.scanner.next_event() {
                            Ok(Some(ev)) => self.handle_event(ev),
                            Ok(None) => break,
                            Err(EventTooLarge) => {
                                self.event_too_large();
                                break;
                            }
                        }
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    tracing::warn!(error = %e, "upstream stream broke off");
                    self.fail(
                        502,
                        ApiError::Upstream {
                            status: http::StatusCode::BAD_GATEWAY,
                            message: "The upstream connection was lost mid-stream.".into(),
                            code: "upstream_disconnected",
                        },
                        "upstream_disconnected",
                    );
                }
                Poll::Ready(None) => {
                    if let Some(ev) = self.scanner.finish() {
                        self.handle_event(ev);
                    }
                    if self.map.reader.as_ref().is_some_and(|r| r.cut_short()) {
                        self.fail(
                            502,
                            ApiError::Upstream {
                                status: http::StatusCode::BAD_GATEWAY,
                                message: "The upstream's stream ended before its last event."
                                    .into(),
                                code: "upstream_malformed",
                            },
                            "upstream_malformed",
                        );
                    }
                    self.ended = true;
                }
                Poll::Pending => {
                    if self.idle.expired(cx) {
                        self.fail(
                            504,
                            ApiError::Upstream {
                                status: http::StatusCode::GATEWAY_TIMEOUT,
                                message: "The upstream stopped sending data.".into(),
                                code: "upstream_timeout",
                            },
                            "upstream_idle_timeout",
                        );
                        continue;
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    /// Runs before the response head is sent: see [`prime`].
    pub async fn prime(&mut self, wait: Duration) {
        prime(self, wait).await;
    }
}

impl<B> Gather for MeteredStream<B>
where
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    fn gather(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        MeteredStream::gather(self, cx)
    }
    fn awaiting_first(&self) -> bool {
        self.out.is_empty()
    }
    fn ready_to_send(&self) -> bool {
        MeteredStream::ready_to_send(self)
    }
    fn received(&self) -> u64 {
        self.received
    }
    fn take_out(&mut self) -> Option<Bytes> {
        MeteredStream::take_out(self)
    }
    fn ended(&self) -> bool {
        self.ended
    }
    /// The last frame: metering now lets `is_end_stream` say so, and hyper writes the closing
    /// chunk with this data instead of on its own.
    fn on_last(&mut self) {
        self.finish_meter(200, None);
    }
}

/// A streamed body that reads what its upstream has at hand and maps it into one outgoing
/// frame (the pass-through's [`MeteredStream`], the translated stream of `proxy::translate`).
pub(crate) trait Gather {
    /// Reads and maps what the upstream has: `Ready` once the stream ended or enough waits to
    /// be sent, `Pending` when the upstream has nothing more right now.
    fn gather(&mut self, cx: &mut Context<'_>) -> Poll<()>;
    /// Nothing from the upstream is ready to send yet.
    fn awaiting_first(&self) -> bool;
    /// The stream ended, or a full frame waits.
    fn ready_to_send(&self) -> bool;
    /// Data frames read from the upstream so far.
    fn received(&self) -> u64;
    /// Everything mapped so far, as one frame's data.
    fn take_out(&mut self) -> Option<Bytes>;
    /// The upstream's stream is over (or failed) and its last events are mapped.
    fn ended(&self) -> bool;
    /// Runs as the last frame (or the end) is handed over.
    fn on_last(&mut self) {}

    /// The body's next frame: what the upstream has at hand, gathered into one (sent when it has
    /// nothing more right now, when enough is gathered, or at the end).
    fn poll_gathered(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::convert::Infallible>>> {
        loop {
            let gathered = self.gather(cx);
            if let Some(b) = self.take_out() {
                if self.ended() {
                    self.on_last();
                }
                return Poll::Ready(Some(Ok(Frame::data(b))));
            }
            if self.ended() {
                self.on_last();
                return Poll::Ready(None);
            }
            if gathered.is_pending() {
                return Poll::Pending;
            }
        }
    }
}

/// Runs before the response head is sent: waits up to `wait` for the first events, then takes
/// what follows at once (one scheduler turn at a time, while each turn brings more — hyper's
/// client hands a body over chunk by chunk). The head and the first events then leave in one
/// write, and a short stream in one write altogether. Waiting never delays an event: only the
/// head, and only while no event has come.
pub(crate) async fn prime<G: Gather>(g: &mut G, wait: Duration) {
    let first = std::future::poll_fn(|cx| match g.gather(cx) {
        Poll::Pending if g.awaiting_first() => Poll::Pending,
        _ => Poll::Ready(()),
    });
    if tokio::time::timeout(wait, first).await.is_err() {
        return;
    }
    // hyper's client hands the body over one chunk per turn of its connection task, so keep
    // yielding to it while each turn brings more: a stream that is already complete upstream
    // then leaves in one write, closing chunk included. Progress is counted in upstream
    // frames, not mapped events, since some events (the injected usage chunk) are dropped.
    loop {
        if g.ready_to_send() {
            return;
        }
        let before = g.received();
        tokio::task::yield_now().await;
        std::future::poll_fn(|cx| {
            let _ = g.gather(cx);
            Poll::Ready(())
        })
        .await;
        if g.received() == before {
            return;
        }
    }
}

impl<B> Body for MeteredStream<B>
where
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.poll_gathered(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.ended && self.out.is_empty() && self.meter.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

impl<B> Drop for MeteredStream<B> {
    fn drop(&mut self) {
        self.active_streams.dec();
        // Still metering: the client went away before the end. 499 = client closed request.
        if self.meter.is_some() {
            if let Some(ev) = self.scanner.finish() {
                self.handle_event(ev);
            }
            self.finish_meter(499, Some("client_disconnected"));
        }
    }
}

/// A binary body (spoken audio) relayed frame by frame as it arrives, never held: the meter
/// fires when it ends, fails, goes idle too long, or is dropped because the client left.
pub struct MeteredBytes<B> {
    upstream: Pin<Box<B>>,
    meter: Option<Meter>,
    idle: IdleTimer,
    active_streams: prometheus::IntGauge,
}

impl<B> MeteredBytes<B> {
    pub fn new(
        upstream: B,
        meter: Meter,
        idle_timeout: Duration,
        active_streams: prometheus::IntGauge,
    ) -> Self {
        active_streams.inc();
        Self {
            upstream: Box::pin(upstream),
            meter: Some(meter),
            idle: IdleTimer::new(idle_timeout),
            active_streams,
        }
    }

    fn finish(&mut self, status: u16, error: Option<&str>) {
        if let Some(m) = self.meter.take() {
            m.finish(status, None, KeptPayloads::default(), error);
        }
    }
}

impl<B> Body for MeteredBytes<B>
where
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if this.meter.is_none() {
            return Poll::Ready(None);
        }
        match this.upstream.as_mut().poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(m) = this.meter.as_mut() {
                    m.mark_first_byte();
                }
                this.idle.touch();
                if this.upstream.is_end_stream() {
                    this.finish(200, None);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                tracing::warn!(error = %e, "upstream body broke off");
                this.finish(502, Some("upstream_disconnected"));
                Poll::Ready(Some(Err("the upstream connection was lost".into())))
            }
            Poll::Ready(None) => {
                this.finish(200, None);
                Poll::Ready(None)
            }
            Poll::Pending => {
                if this.idle.expired(cx) {
                    this.finish(504, Some("upstream_idle_timeout"));
                    return Poll::Ready(Some(Err("the upstream stopped sending data".into())));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.meter.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        self.upstream.size_hint()
    }
}

impl<B> Drop for MeteredBytes<B> {
    fn drop(&mut self) {
        self.active_streams.dec();
        self.finish(499, Some("client_disconnected"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Data re-arms the idle timer only when it fires: silent for less than the timeout since
    /// the last data is not idle, even past the first deadline; silent for all of it is.
    #[tokio::test]
    async fn idle_timer_counts_from_the_last_data() {
        async fn check(t: &mut IdleTimer) -> bool {
            std::future::poll_fn(|cx| Poll::Ready(t.expired(cx))).await
        }
        let mut t = IdleTimer::new(Duration::from_millis(1000));
        tokio::time::sleep(Duration::from_millis(600)).await;
        t.touch();
        tokio::time::sleep(Duration::from_millis(600)).await;
        // 1.2 s after the start, 0.6 s after the data (due at 1.6 s).
        assert!(!check(&mut t).await, "idle with data 0.6 s ago");
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(check(&mut t).await, "not idle after 1.2 s without data");
    }

    fn events(chunks: &[&[u8]]) -> Vec<(String, Option<String>)> {
        let mut s = SseScanner::default();
        let mut out = Vec::new();
        for c in chunks {
            s.push(c);
            while let Some(e) = s.next_event().expect("within the limit") {
                out.push(e);
            }
        }
        out.extend(s.finish());
        out.into_iter()
            .map(|e| {
                (
                    String::from_utf8(e.raw.to_vec()).expect("utf8"),
                    e.data.map(|d| String::from_utf8(d.to_vec()).expect("utf8")),
                )
            })
            .collect()
    }

    #[test]
    fn events_split_across_reads() {
        let got = events(&[b"data: {\"a\"", b":1}\n", b"\ndata: [DONE]\n\n"]);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].1.as_deref(), Some("{\"a\":1}"));
        assert_eq!(got[0].0, "data: {\"a\":1}\n\n");
        assert_eq!(got[1].1.as_deref(), Some("[DONE]"));
    }

    #[test]
    fn crlf_and_cr_line_ends() {
        let got = events(&[b"data: x\r\n\r\ndata: y\r", b"\r", b"data: z\r\n", b"\r\n"]);
        let data: Vec<_> = got.iter().map(|e| e.1.clone()).collect();
        assert_eq!(
            data,
            vec![Some("x".into()), Some("y".into()), Some("z".into())]
        );
    }

    #[test]
    fn comments_multiline_and_other_fields() {
        let got = events(&[b": keep-alive\n\nevent: msg\ndata: line1\ndata:line2\nid: 7\n\n"]);
        assert_eq!(got[0].1, None);
        assert_eq!(got[0].0, ": keep-alive\n\n");
        assert_eq!(got[1].1.as_deref(), Some("line1\nline2"));
    }

    #[test]
    fn data_lines_with_and_without_space_or_payload() {
        let got = events(&[b"data:\n\ndata:x\n\ndata:  two\n\ndata: a\ndata: b\n\n"]);
        let data: Vec<_> = got.iter().map(|e| e.1.clone()).collect();
        assert_eq!(
            data,
            vec![
                Some(String::new()),
                Some("x".into()),
                Some(" two".into()),
                Some("a\nb".into())
            ]
        );
    }

    #[test]
    fn unterminated_last_event_is_flushed() {
        let got = events(&[b"data: a\n\ndata: tail"]);
        assert_eq!(got[1].1.as_deref(), Some("tail"));
    }

    #[test]
    fn a_line_that_never_ends_is_refused_at_the_limit_with_bounded_memory() {
        const MAX: usize = 1024 * 1024;
        const CHUNK: usize = 64 * 1024;
        let mut s = SseScanner::new(MAX);
        let chunk = vec![b'x'; CHUNK];
        s.push(b"data: ");
        // An upstream offering 100 MB without a newline: refused once the event passes the
        // limit, having held at most the limit plus the chunk that crossed it.
        let mut pushed = 6;
        let refused = loop {
            assert!(pushed < 100 * 1024 * 1024, "never refused");
            s.push(&chunk);
            pushed += CHUNK;
            assert!(s.buffered() <= MAX + CHUNK, "{} held", s.buffered());
            match s.next_event() {
                Ok(None) => {}
                Ok(Some(_)) => panic!("no event ends here"),
                Err(e) => break e,
            }
        };
        assert_eq!(refused, EventTooLarge);
        assert!(pushed > MAX && pushed <= MAX + CHUNK);
        // Nothing of it is handed on at the end.
        assert_eq!(s.finish(), None);
        s.discard();
        assert_eq!(s.buffered(), 0);

        // A complete event over the limit, arriving in one read, is refused too; the events
        // before it come through.
        let mut s = SseScanner::new(1024);
        s.push(b"data: small\n\n");
        s.push(&[b"data: ".as_slice(), &[b'y'; 2000], b"\n\n"].concat());
        assert!(
            matches!(s.next_event(), Ok(Some(e)) if e.data.as_deref() == Some(b"small".as_slice()))
        );
        assert_eq!(s.next_event(), Err(EventTooLarge));
    }

    #[test]
    fn each_byte_is_examined_once_however_a_line_is_split() {
        // One 1 MiB line in 1 KiB reads (rescanning the line on each read would examine about
        // 512 MiB), then several small events split at every byte.
        let mut s = SseScanner::new(2 * 1024 * 1024);
        let line = [b"data: ".as_slice(), &[b'z'; 1024 * 1024]].concat();
        for c in line.chunks(1024) {
            s.push(c);
            assert_eq!(s.next_event(), Ok(None));
        }
        s.push(b"\n\n");
        let ev = s.next_event().expect("within").expect("an event");
        assert_eq!(ev.data.map(|d| d.len()), Some(1024 * 1024));
        let small = b"data: {\"a\":1}\r\n\r\n: c\n\n".repeat(100);
        for b in small.chunks(1) {
            s.push(b);
            while s.next_event().expect("within").is_some() {}
        }
        let total = line.len() + 2 + small.len();
        // Each byte once; a '\r' at the end of a read is looked at again with the next one.
        assert!(
            s.examined <= total + 200,
            "{} bytes examined for {total}",
            s.examined
        );
    }

    #[test]
    fn byte_by_byte() {
        let input = b"data: {\"x\":\"\xc3\xa9\"}\r\n\r\n: c\n\ndata: [DONE]\n\n";
        let chunks: Vec<&[u8]> = input.chunks(1).collect();
        let got = events(&chunks);
        assert_eq!(got.len(), 3);
        assert_eq!(got[0].1.as_deref(), Some("{\"x\":\"é\"}"));
        assert_eq!(got[2].1.as_deref(), Some("[DONE]"));
        let joined: String = got.iter().map(|e| e.0.clone()).collect();
        assert_eq!(joined.as_bytes(), input);
    }
}
