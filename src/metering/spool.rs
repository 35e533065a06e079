//! The usage spool: a local append-only journal that makes usage records survive `kill -9`.
//!
//! Two lines per request, in files (*segments*) under `usage.spool_dir`:
//! - a **started** line, written with one `write(2)` just before the request goes upstream (its
//!   facts and body size: enough to bill it if nothing else survives);
//! - a **finished** line per settled record, written by the usage writer with one `write(2)` per
//!   batch, after pricing and before the batch's transaction.
//!
//! A `write(2)` lands in the kernel's page cache at once, so a killed process loses none of it (no
//! `fsync`: the spool guards against the process dying, not the machine; see README). At start,
//! before serving, [`replay`] reads what a previous process left: every record whose `event_id` is
//! not in `usage_records` is written — the finished record when there is one, else a record for a
//! request cut off by the restart (status 499, `error: "gateway_restarted"`, prompt tokens
//! estimated from the body size, no completion) — then the files are deleted. Replay keys on the
//! unique `usage_records.event_id` (a UUIDv7 made per request), so replaying twice writes nothing
//! twice and debits nothing twice.
//!
//! Segments rotate (see [`Spool::maintain`]); a sealed segment is deleted once every request
//! started in it has been committed. One directory per process: it is locked while open, and a
//! second process on the same directory refuses to start.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, Utc};
use sea_orm::DatabaseConnection;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::metering::event::{Prices, Reservation, UsageEvent};
use crate::metering::writer::Settled;
use crate::providers::{Endpoint, Usage};
use crate::proxy::meter::RequestFacts;
use crate::store::usage_batch;

/// A segment is sealed once this big …
const SEGMENT_BYTES: u64 = 4 << 20;
/// … or this old with something in it.
const SEGMENT_AGE: Duration = Duration::from_secs(5);
/// Records written per transaction by [`replay`].
const REPLAY_BATCH: usize = 256;
/// A spool line longer than this is not one the gateway wrote: skipped.
const MAX_LINE: usize = 64 * 1024;
/// `error` of a record for a request cut off by a restart.
pub const RESTARTED: &str = "gateway_restarted";

/// One request's place in the spool: its record's unique id, and the segment holding its started
/// line (released when the record is committed).
#[derive(Debug)]
pub struct Ticket {
    pub id: Uuid,
    seg: Option<Arc<Segment>>,
}

impl Ticket {
    /// A new record id (UUIDv7: time-ordered), not yet in the spool.
    pub fn new() -> Self {
        Self {
            id: Uuid::now_v7(),
            seg: None,
        }
    }

    /// No started line was written for it.
    pub fn is_unspooled(&self) -> bool {
        self.seg.is_none()
    }
}

impl Default for Ticket {
    fn default() -> Self {
        Self::new()
    }
}

#[derive(Debug)]
struct Segment {
    path: PathBuf,
    file: File,
    opened: Instant,
    bytes: AtomicU64,
    /// Requests started here whose record is not committed yet.
    outstanding: AtomicI64,
    sealed: AtomicBool,
}

impl Segment {
    fn append(&self, buf: &[u8]) -> std::io::Result<()> {
        // O_APPEND: each write(2) lands whole at the end, whichever worker thread makes it.
        (&self.file).write_all(buf)?;
        self.bytes.fetch_add(buf.len() as u64, Ordering::Relaxed);
        Ok(())
    }
}

/// The spool of this process (see the module docs).
pub struct Spool {
    dir: PathBuf,
    current: Mutex<Arc<Segment>>,
    sealed: Mutex<Vec<Arc<Segment>>>,
    next: AtomicU64,
    /// Held (locked) for the life of the process.
    _lock: File,
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spool").field("dir", &self.dir).finish()
    }
}

/// A model's prices. Fields added after the first release default when absent, so a spool an
/// older process left still replays (the same holds for every line's later fields).
#[derive(Serialize, Deserialize)]
struct SPrices {
    i: i64,
    o: i64,
    c: Option<i64>,
    /// Cache-write input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cw: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    img: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    min: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    chars: Option<i64>,
}

/// What both lines carry (borrowed when written, owned when read back).
#[derive(Serialize, Deserialize)]
struct Common<'a> {
    id: Uuid,
    at: DateTime<Utc>,
    user: Cow<'a, str>,
    key: Cow<'a, str>,
    model: Cow<'a, str>,
    provider: Cow<'a, str>,
    endpoint: Cow<'a, str>,
    stream: bool,
    prices: SPrices,
    request_id: Cow<'a, str>,
    shared_key: bool,
    charged: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    response_id: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    conversation_id: Option<Cow<'a, str>>,
    /// Upstream attempts (absent: 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    attempts: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    fallback_from: Option<Cow<'a, str>>,
    /// Answered from the response cache (absent: false).
    #[serde(default, skip_serializing_if = "is_false")]
    hit: bool,
}

#[derive(Serialize, Deserialize)]
struct Started<'a> {
    #[serde(flatten)]
    c: Common<'a>,
    body_len: u64,
}

#[derive(Serialize, Deserialize)]
struct Finished<'a> {
    #[serde(flatten)]
    c: Common<'a>,
    status: u16,
    prompt: i64,
    completion: i64,
    cached: i64,
    /// Cache-write tokens.
    #[serde(default, skip_serializing_if = "is_zero")]
    cw: i64,
    /// Reasoning tokens.
    #[serde(default, skip_serializing_if = "is_zero")]
    rs: i64,
    /// The non-token part of `cost` (already inside it).
    #[serde(default, skip_serializing_if = "is_zero")]
    extra: i64,
    cost: i64,
    latency_ms: i64,
    ttft_ms: Option<i64>,
    estimated: bool,
    error: Option<Cow<'a, str>>,
}

#[derive(Serialize, Deserialize)]
enum Line<'a> {
    S(Started<'a>),
    F(Finished<'a>),
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn endpoint_of(s: &str) -> Endpoint {
    Endpoint::ALL
        .into_iter()
        .find(|e| e.as_str() == s)
        .unwrap_or(Endpoint::ChatCompletions)
}

fn segment_name(seq: u64) -> String {
    format!(
        "{:016}-{seq:08}.spool",
        Utc::now().timestamp_millis().max(0)
    )
}

impl Spool {
    /// Opens (creating) `dir`, locks it, and returns the spool with the segments a previous
    /// process left, oldest first, for [`replay`].
    pub fn open(dir: &Path) -> anyhow::Result<(Self, Vec<PathBuf>)> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("usage.spool_dir {}: cannot create", dir.display()))?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("lock"))
            .with_context(|| format!("usage.spool_dir {}: cannot open its lock", dir.display()))?;
        if lock.try_lock().is_err() {
            anyhow::bail!(
                "usage.spool_dir {} is in use by another tollgate process: give every replica its own",
                dir.display()
            );
        }
        let mut left: Vec<PathBuf> = std::fs::read_dir(dir)?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "spool"))
            .collect();
        left.sort();
        let first = Self::new_segment(dir, 0)?;
        Ok((
            Self {
                dir: dir.to_owned(),
                current: Mutex::new(first),
                sealed: Mutex::new(Vec::new()),
                next: AtomicU64::new(1),
                _lock: lock,
            },
            left,
        ))
    }

    fn new_segment(dir: &Path, seq: u64) -> anyhow::Result<Arc<Segment>> {
        let path = dir.join(segment_name(seq));
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot create spool segment {}", path.display()))?;
        Ok(Arc::new(Segment {
            path,
            file,
            opened: Instant::now(),
            bytes: AtomicU64::new(0),
            outstanding: AtomicI64::new(0),
            sealed: AtomicBool::new(false),
        }))
    }

    /// The started line of a request about to go upstream: one `write(2)`. On a write error
    /// (disk full) the request still proceeds — its record is then only as safe as without a
    /// spool — and the error is counted and logged.
    pub fn started(
        &self,
        ticket: &mut Ticket,
        facts: &RequestFacts,
        at: DateTime<Utc>,
    ) -> std::io::Result<()> {
        let line = Line::S(Started {
            c: common(ticket.id, at, facts_parts(facts)),
            body_len: facts.request_len as u64,
        });
        let mut buf = Vec::with_capacity(512);
        serde_json::to_writer(&mut buf, &line).map_err(std::io::Error::other)?;
        buf.push(b'\n');
        let seg = {
            let cur = self.current.lock().unwrap_or_else(PoisonError::into_inner);
            // Counted under the lock: a segment sealed after this sees the request.
            cur.outstanding.fetch_add(1, Ordering::Relaxed);
            cur.clone()
        };
        let res = seg.append(&buf);
        ticket.seg = Some(seg);
        res
    }

    /// The finished lines of a batch about to be written: one `write(2)`.
    pub fn finished(&self, rows: &[Settled]) -> std::io::Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::with_capacity(rows.len() * 400);
        for r in rows {
            let e = &r.event;
            let line = Line::F(Finished {
                c: common(
                    e.ticket.id,
                    e.at,
                    Parts {
                        user: &e.user_id,
                        key: &e.key_id,
                        model: &e.model,
                        provider: &e.provider,
                        endpoint: e.endpoint,
                        stream: e.stream,
                        prices: e.prices,
                        request_id: &e.request_id,
                        shared_key: e.shared_key,
                        charged: e.charged,
                        response_id: e.response_id.as_deref(),
                        conversation_id: e.conversation_id.as_deref(),
                        routed: &e.routed,
                    },
                ),
                status: e.status,
                prompt: e.usage.prompt,
                completion: e.usage.completion,
                cached: e.usage.cached,
                cw: e.usage.cache_write,
                rs: e.usage.reasoning,
                extra: e.extra_cost_nanos,
                cost: r.cost_nanos,
                latency_ms: e.latency_ms,
                ttft_ms: e.ttft_ms,
                estimated: r.event.tokens_estimated,
                error: e.error.as_deref().map(Cow::Borrowed),
            });
            serde_json::to_writer(&mut buf, &line).map_err(std::io::Error::other)?;
            buf.push(b'\n');
        }
        let seg = self
            .current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        seg.append(&buf)
    }

    /// The batch's transaction committed: its requests no longer keep their segments.
    pub fn committed(&self, rows: &[Settled]) {
        for r in rows {
            if let Some(seg) = &r.event.ticket.seg {
                seg.outstanding.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    /// Seals the current segment when it is big or old enough, and deletes sealed segments whose
    /// requests are all committed. The usage writer calls it between batches only, so a sealed
    /// segment never holds the finished line of a batch still being written.
    pub fn maintain(&self) {
        let cur = self
            .current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let bytes = cur.bytes.load(Ordering::Relaxed);
        if bytes >= SEGMENT_BYTES || (bytes > 0 && cur.opened.elapsed() >= SEGMENT_AGE) {
            let seq = self.next.fetch_add(1, Ordering::Relaxed);
            match Self::new_segment(&self.dir, seq) {
                Ok(new) => {
                    let old = {
                        let mut c = self.current.lock().unwrap_or_else(PoisonError::into_inner);
                        std::mem::replace(&mut *c, new)
                    };
                    old.sealed.store(true, Ordering::Relaxed);
                    self.sealed
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push(old);
                }
                Err(e) => tracing::warn!(error = %e, "usage spool: cannot rotate"),
            }
        }
        let done: Vec<Arc<Segment>> = {
            let mut sealed = self.sealed.lock().unwrap_or_else(PoisonError::into_inner);
            let (done, keep) = std::mem::take(&mut *sealed)
                .into_iter()
                .partition(|s| s.outstanding.load(Ordering::Relaxed) <= 0);
            *sealed = keep;
            done
        };
        for s in done {
            if let Err(e) = std::fs::remove_file(&s.path) {
                tracing::warn!(error = %e, path = %s.path.display(), "usage spool: cannot delete a segment");
            }
        }
    }

    /// Clean shutdown: every record is committed, so every segment goes.
    pub fn close(&self) {
        let cur = self
            .current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if cur.outstanding.load(Ordering::Relaxed) <= 0 {
            cur.sealed.store(true, Ordering::Relaxed);
            self.sealed
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(cur);
        }
        // Sealed segments still outstanding (a writer that gave up) stay for the next start.
        let done: Vec<Arc<Segment>> = {
            let mut sealed = self.sealed.lock().unwrap_or_else(PoisonError::into_inner);
            let (done, keep) = std::mem::take(&mut *sealed)
                .into_iter()
                .partition(|s| s.outstanding.load(Ordering::Relaxed) <= 0);
            *sealed = keep;
            done
        };
        for s in done {
            let _ = std::fs::remove_file(&s.path);
        }
    }

    /// Segment files in the directory now (tests).
    pub fn segments(&self) -> usize {
        std::fs::read_dir(&self.dir).map_or(0, |d| {
            d.filter_map(Result::ok)
                .filter(|e| e.path().extension().is_some_and(|x| x == "spool"))
                .count()
        })
    }
}

struct Parts<'a> {
    user: &'a str,
    key: &'a str,
    model: &'a str,
    provider: &'a str,
    endpoint: Endpoint,
    stream: bool,
    prices: Prices,
    request_id: &'a str,
    shared_key: bool,
    charged: bool,
    response_id: Option<&'a str>,
    conversation_id: Option<&'a str>,
    routed: &'a crate::metering::event::Routed,
}

fn facts_parts(f: &RequestFacts) -> Parts<'_> {
    Parts {
        user: &f.user_id,
        key: &f.key_id,
        model: &f.model,
        provider: &f.provider,
        endpoint: f.endpoint,
        stream: f.stream,
        prices: f.prices,
        request_id: &f.request_id,
        shared_key: f.shared_key,
        charged: f.charged,
        response_id: f.response_id.as_deref(),
        conversation_id: f.conversation_id.as_deref(),
        routed: &f.routed,
    }
}

fn common<'a>(id: Uuid, at: DateTime<Utc>, p: Parts<'a>) -> Common<'a> {
    Common {
        id,
        at,
        user: Cow::Borrowed(p.user),
        key: Cow::Borrowed(p.key),
        model: Cow::Borrowed(p.model),
        provider: Cow::Borrowed(p.provider),
        endpoint: Cow::Borrowed(p.endpoint.as_str()),
        stream: p.stream,
        prices: SPrices {
            i: p.prices.input,
            o: p.prices.output,
            c: p.prices.cached_input,
            cw: p.prices.cache_write_input,
            img: p.prices.per_image,
            min: p.prices.per_minute,
            chars: p.prices.per_1m_chars,
        },
        request_id: Cow::Borrowed(p.request_id),
        shared_key: p.shared_key,
        charged: p.charged,
        response_id: p.response_id.map(Cow::Borrowed),
        conversation_id: p.conversation_id.map(Cow::Borrowed),
        attempts: (p.routed.attempts > 1).then_some(p.routed.attempts),
        fallback_from: p.routed.fallback_from.as_deref().map(Cow::Borrowed),
        hit: p.routed.cache_hit,
    }
}

fn event(c: Common<'_>) -> UsageEvent {
    UsageEvent {
        at: c.at,
        user_id: c.user.into_owned(),
        key_id: c.key.into_owned(),
        model: c.model.into_owned(),
        provider: c.provider.into_owned(),
        endpoint: endpoint_of(&c.endpoint),
        stream: c.stream,
        status: 0,
        usage: Usage::default(),
        prices: Prices {
            input: c.prices.i,
            output: c.prices.o,
            cached_input: c.prices.c,
            cache_write_input: c.prices.cw,
            per_image: c.prices.img,
            per_minute: c.prices.min,
            per_1m_chars: c.prices.chars,
        },
        latency_ms: 0,
        ttft_ms: None,
        request_id: c.request_id.into_owned(),
        shared_key: c.shared_key,
        error: None,
        extra_cost_nanos: 0,
        response_id: c.response_id.map(Cow::into_owned),
        conversation_id: c.conversation_id.map(Cow::into_owned),
        routed: crate::metering::event::Routed {
            attempts: c.attempts.unwrap_or(1),
            fallback_from: c.fallback_from.map(Cow::into_owned),
            cache_hit: c.hit,
        },
        // The dead process's leases are reclaimed whole (`reservation_leases`): nothing of
        // them is settled here.
        reservation: Reservation::default(),
        charged: c.charged,
        tokens_estimated: false,
        ticket: Ticket {
            id: c.id,
            seg: None,
        },
    }
}

fn settled(line: Line<'_>) -> Settled {
    match line {
        Line::F(f) => {
            let mut e = event(f.c);
            e.status = f.status;
            e.usage = Usage {
                prompt: f.prompt,
                completion: f.completion,
                cached: f.cached,
                cache_write: f.cw,
                reasoning: f.rs,
            };
            e.extra_cost_nanos = f.extra;
            e.latency_ms = f.latency_ms;
            e.ttft_ms = f.ttft_ms;
            e.error = f.error.map(Cow::into_owned);
            e.tokens_estimated = f.estimated;
            Settled {
                event: e,
                cost_nanos: f.cost,
            }
        }
        Line::S(s) => {
            let mut e = event(s.c);
            e.status = 499;
            e.error = Some(RESTARTED.to_owned());
            // The upstream had the prompt: ~4 bytes a token, as admission estimates it.
            e.usage = Usage {
                prompt: s.body_len.div_ceil(4).min(i64::MAX as u64) as i64,
                completion: 0,
                cached: 0,
                ..Default::default()
            };
            e.tokens_estimated = true;
            Settled {
                cost_nanos: e.cost_nanos(),
                event: e,
            }
        }
    }
}

/// What [`replay`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Replayed {
    /// Records written from finished lines.
    pub finished: usize,
    /// Records written for requests the restart cut off.
    pub restarted: usize,
}

/// Writes every record the spool files `files` hold that `usage_records` does not, then deletes
/// the files (see the module docs). Runs before the process serves, so nothing else writes these
/// records meanwhile.
pub async fn replay(
    db: &DatabaseConnection,
    replica: &str,
    files: &[PathBuf],
) -> anyhow::Result<Replayed> {
    if files.is_empty() {
        return Ok(Replayed::default());
    }
    // The finished line wins over the started one.
    let mut lines: HashMap<Uuid, Line<'static>> = HashMap::new();
    let mut order: Vec<Uuid> = Vec::new();
    for path in files {
        let file = File::open(path).with_context(|| format!("open {}", path.display()))?;
        let mut reader = BufReader::new(file);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            let n = Read::take(&mut reader, MAX_LINE as u64 + 1).read_until(b'\n', &mut buf)?;
            if n == 0 {
                break;
            }
            if buf.last() != Some(&b'\n') {
                if n > MAX_LINE {
                    // Not ours: skip to the end of the line.
                    let mut rest = Vec::new();
                    reader.read_until(b'\n', &mut rest)?;
                }
                // A line cut short (the machine, not just the process, went down): skipped.
                continue;
            }
            let Ok(line) = serde_json::from_slice::<Line<'static>>(&buf) else {
                continue;
            };
            let id = match &line {
                Line::S(s) => s.c.id,
                Line::F(f) => f.c.id,
            };
            match lines.get(&id) {
                None => {
                    order.push(id);
                    lines.insert(id, line);
                }
                Some(Line::S(_)) if matches!(line, Line::F(_)) => {
                    lines.insert(id, line);
                }
                Some(_) => {}
            }
        }
    }
    let mut out = Replayed::default();
    for chunk in order.chunks(REPLAY_BATCH) {
        let ids: Vec<String> = chunk.iter().map(Uuid::to_string).collect();
        let present = usage_batch::existing_event_ids(db, &ids).await?;
        let mut rows = Vec::new();
        for id in chunk {
            if present.contains(&id.to_string()) {
                continue;
            }
            if let Some(line) = lines.remove(id) {
                match line {
                    Line::F(_) => out.finished += 1,
                    Line::S(_) => out.restarted += 1,
                }
                rows.push(settled(line));
            }
        }
        crate::metering::writer::write_settled(db, replica, &rows).await?;
    }
    for path in files {
        std::fs::remove_file(path).with_context(|| format!("delete {}", path.display()))?;
    }
    if out != Replayed::default() {
        tracing::warn!(
            finished = out.finished,
            restarted = out.restarted,
            "usage spool: wrote the records a previous process left"
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_round_trip_and_a_cut_request_is_estimated_from_its_size() {
        let facts = RequestFacts {
            user_id: "u".into(),
            key_id: "k".into(),
            model: "m".into(),
            provider: "p".into(),
            endpoint: Endpoint::Embeddings,
            stream: false,
            prices: Prices {
                input: 1_000_000_000,
                ..Default::default()
            },
            request_id: "r".into(),
            shared_key: true,
            reservation: Reservation::default(),
            charged: true,
            bounds: crate::metering::event::TokenBounds::default(),
            request_body: bytes::Bytes::from(vec![b'x'; 4000]),
            request_len: 4000,
            response_id: None,
            conversation_id: None,
            routed: Default::default(),
            extra_cost_nanos: 0,
            units_metered: false,
        };
        let dir = tempfile::tempdir().unwrap();
        let (spool, left) = Spool::open(dir.path()).unwrap();
        assert!(left.is_empty());
        // A second process on the same directory is refused.
        assert!(Spool::open(dir.path()).is_err());
        let mut t = Ticket::new();
        spool.started(&mut t, &facts, Utc::now()).unwrap();
        let text = std::fs::read_to_string(&t.seg.as_ref().unwrap().path).unwrap();
        let line: Line<'static> = serde_json::from_str(text.trim_end()).unwrap();
        let s = settled(line);
        assert_eq!(s.event.ticket.id, t.id);
        assert_eq!(s.event.status, 499);
        assert_eq!(s.event.error.as_deref(), Some(RESTARTED));
        assert_eq!(s.event.usage.prompt, 1000);
        // 1000 tokens at $1 per 1M tokens: $0.001.
        assert_eq!(s.cost_nanos, 1_000_000);
        assert!(s.event.tokens_estimated && s.event.charged);
        assert_eq!(s.event.endpoint, Endpoint::Embeddings);
    }

    /// A finished line carries cache writes, reasoning, the non-token cost and the stored
    /// response and conversation; a line written before those existed still replays.
    #[test]
    fn finished_lines_carry_the_new_fields_and_old_lines_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _) = Spool::open(dir.path()).unwrap();
        let event = UsageEvent {
            at: Utc::now(),
            user_id: "u".into(),
            key_id: "k".into(),
            model: "m".into(),
            provider: "p".into(),
            endpoint: Endpoint::ChatCompletions,
            stream: true,
            status: 200,
            usage: Usage {
                prompt: 100,
                completion: 50,
                cached: 20,
                cache_write: 30,
                reasoning: 10,
            },
            prices: Prices {
                input: 1,
                output: 2,
                cached_input: Some(3),
                cache_write_input: Some(4),
                per_image: Some(5),
                per_minute: Some(6),
                per_1m_chars: Some(7),
            },
            latency_ms: 9,
            ttft_ms: Some(3),
            tokens_estimated: false,
            request_id: "r".into(),
            shared_key: false,
            error: None,
            extra_cost_nanos: 77,
            response_id: Some("resp_1".into()),
            conversation_id: Some("conv_1".into()),
            routed: crate::metering::event::Routed {
                attempts: 3,
                fallback_from: Some("gpt-big".into()),
                cache_hit: true,
            },
            reservation: Reservation::default(),
            charged: true,
            ticket: Ticket::new(),
        };
        let rows = [Settled {
            cost_nanos: event.cost_nanos(),
            event,
        }];
        spool.finished(&rows).unwrap();
        let path = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "spool"))
            .unwrap();
        let text = std::fs::read_to_string(path).unwrap();
        let back = settled(serde_json::from_str(text.trim_end()).unwrap());
        let (e, want) = (&back.event, &rows[0].event);
        assert_eq!(e.usage, want.usage);
        assert_eq!(e.prices, want.prices);
        assert_eq!(e.extra_cost_nanos, 77);
        assert_eq!(e.response_id.as_deref(), Some("resp_1"));
        assert_eq!(e.conversation_id.as_deref(), Some("conv_1"));
        assert_eq!(e.routed.attempts, 3);
        assert_eq!(e.routed.fallback_from.as_deref(), Some("gpt-big"));
        assert!(e.routed.cache_hit);
        assert_eq!(back.cost_nanos, rows[0].cost_nanos);

        // Lines as the previous release wrote them.
        let old_f = r#"{"F":{"id":"0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b","at":"2026-11-30T10:00:00Z","user":"u","key":"k","model":"m","provider":"p","endpoint":"chat.completions","stream":false,"prices":{"i":2500000000,"o":10000000000,"c":null},"request_id":"r","shared_key":false,"charged":true,"status":200,"prompt":1000,"completion":500,"cached":200,"cost":7500000,"latency_ms":12,"ttft_ms":null,"estimated":false,"error":null}}"#;
        let s = settled(serde_json::from_str(old_f).unwrap());
        assert_eq!(
            s.event.usage,
            Usage {
                prompt: 1000,
                completion: 500,
                cached: 200,
                ..Default::default()
            }
        );
        assert_eq!(s.cost_nanos, 7_500_000);
        assert_eq!(s.event.prices.cache_write_input, None);
        assert_eq!((s.event.response_id, s.event.extra_cost_nanos), (None, 0));
        let old_s = r#"{"S":{"id":"0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5c","at":"2026-11-30T10:00:00Z","user":"u","key":"k","model":"m","provider":"p","endpoint":"embeddings","stream":false,"prices":{"i":1000000000,"o":0,"c":null},"request_id":"r","shared_key":true,"charged":true,"body_len":4000}}"#;
        let s = settled(serde_json::from_str(old_s).unwrap());
        assert_eq!(
            (s.event.status, s.event.usage.prompt, s.cost_nanos),
            (499, 1000, 1_000_000)
        );
    }
}
