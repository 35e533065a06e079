//! The usage spool: a local append-only journal that makes usage records survive `kill -9`.
//!
//! Two records per request, in files (*segments*) under `usage.spool_dir`:
//! - a **started** record, written just before the request goes upstream (its facts and body
//!   size: enough to bill it if nothing else survives) — one `pwrite(2)` for all the requests a
//!   worker thread starts in one scheduler round ([`Spool::started_shared`]);
//! - a **finished** record per settled request, written by the usage writer with one `pwrite(2)`
//!   per batch, after pricing and before the batch's transaction.
//!
//! Each request thread writes its started records into a segment of its own and the usage writer
//! its finished records into another ([`Spool::lanes`]): a write holds its file's inode lock, and
//! a request would otherwise sleep behind another thread's record or a whole batch.
//!
//! A record is a small binary frame (postcard payload, length, CRC-32; see [`frame`]): the
//! started record is on every request's path, and encoding it costs a fraction of a JSON line
//! (no field names, no string escaping, no date formatting). A segment is made at its full size
//! (sparse: only what is written takes disk), and each frame is written in place at an offset
//! reserved with an atomic add, so no write extends the file and the file system does not update
//! the inode's size on every request, as an `O_APPEND` write does. The unwritten rest of a
//! segment reads as NUL bytes; a frame cut short by the process dying mid-write fails its CRC, so
//! replay steps over it to the next whole frame. Segments of earlier releases (JSON lines) still
//! replay.
//!
//! A write lands in the kernel's page cache at once, so a killed process loses none of it (no
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
use std::io::Read;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
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
/// … and is made this big (sparse), so records written between two of the usage writer's
/// maintenance passes still fit; a record that does not fit seals it at once.
const SEGMENT_CAP: u64 = 2 * SEGMENT_BYTES;
/// … or this old with something in it.
const SEGMENT_AGE: Duration = Duration::from_secs(5);
/// Records written per transaction by [`replay`].
const REPLAY_BATCH: usize = 256;
/// The finished records of a batch are written in pieces of about this size, so no write needs
/// more than a segment's room however large `usage.batch_size` is.
const WRITE_CHUNK: usize = 1 << 20;
/// Replay reads at most this much of a segment (ours stay within [`SEGMENT_CAP`]; an earlier
/// release's could exceed 4 MiB by one batch): a larger file is not one the gateway wrote whole.
const READ_MAX: u64 = 64 << 20;
/// Damaged candidate records replay steps over in one segment before it gives up on the rest.
const MAX_BAD_CANDIDATES: usize = 4096;
/// A record (or an earlier release's JSON line) longer than this is not one the gateway wrote:
/// skipped.
const MAX_RECORD: usize = 64 * 1024;
/// Started records go into up to this many segments at a time, one per request thread (see
/// [`Spool::lanes`]).
const MAX_STARTED_LANES: usize = 8;
/// Started records staged on one lane are written out before they pass this many bytes (see
/// [`Spool::stage`]).
const STAGE_MAX: usize = 64 * 1024;
/// A lane whose last this many writes each carried one record writes the next at once: a
/// request alone on its worker gains nothing from yielding, and the yield costs it latency.
const LONE_WRITES: u32 = 8;
/// … but every this many records it yields again, to notice company.
const PROBE_EVERY: u64 = 16;
/// `error` of a record for a request cut off by a restart.
pub const RESTARTED: &str = "gateway_restarted";

/// One request's place in the spool: its record's unique id, and the segment holding its started
/// record (released when the record is committed).
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

    /// No started record was written for it.
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
    /// The file's length, fixed when it is made.
    cap: u64,
    /// Bytes reserved so far: the next record's offset (past `cap` once one did not fit).
    bytes: AtomicU64,
    /// Requests started here whose record is not committed yet.
    outstanding: AtomicI64,
    sealed: AtomicBool,
}

impl Segment {
    /// An empty segment in `file`, made `cap` bytes long.
    fn new(path: PathBuf, file: File, cap: u64) -> Arc<Self> {
        Arc::new(Segment {
            path,
            file,
            opened: Instant::now(),
            cap,
            bytes: AtomicU64::new(0),
            outstanding: AtomicI64::new(0),
            sealed: AtomicBool::new(false),
        })
    }

    /// Writes `buf` at the next free offset; `Ok(false)` when it does not fit (the segment is
    /// then full for every later record too).
    fn append(&self, buf: &[u8]) -> std::io::Result<bool> {
        let len = buf.len() as u64;
        // The reserved ranges never overlap, whichever worker thread writes.
        let at = self.bytes.fetch_add(len, Ordering::Relaxed);
        if at.saturating_add(len) > self.cap {
            return Ok(false);
        }
        self.file.write_all_at(buf, at)?;
        Ok(true)
    }
}

/// A request thread's started records waiting for one write ([`Spool::stage`]): contiguous
/// frames for `seg` from offset `at`.
#[derive(Default)]
struct Staging {
    seg: Option<Arc<Segment>>,
    at: u64,
    buf: Vec<u8>,
    /// Records staged on this lane so far, and how many of them have gone out in a write.
    staged: u64,
    written: u64,
    /// Records whose write failed, not reported yet.
    lost: Option<Lost>,
    /// The writes in a row, up to now, that carried one record each.
    lone: u32,
}

impl Staging {
    /// Writes what is staged (one `pwrite(2)`).
    fn write_out(&mut self) {
        let records = self.staged - self.written;
        self.written = self.staged;
        match records {
            0 => {}
            1 => self.lone = self.lone.saturating_add(1),
            _ => self.lone = 0,
        }
        let Some(seg) = self.seg.take() else {
            return;
        };
        let res = seg.file.write_all_at(&self.buf, self.at);
        self.buf.clear();
        if self.buf.capacity() > STAGE_MAX {
            self.buf.shrink_to(STAGE_MAX);
        }
        if let Err(error) = res {
            let records = records.saturating_add(self.lost.take().map_or(0, |l| l.records));
            self.lost = Some(Lost { records, error });
        }
    }
}

/// Started records a failed write (disk full, say) left out of the spool: their requests went
/// on, only as safe as without a spool.
#[derive(Debug)]
pub struct Lost {
    pub records: u64,
    pub error: std::io::Error,
}

impl Lost {
    fn one(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self {
            records: 1,
            error: std::io::Error::other(error),
        }
    }
}

/// A started record [`Spool::stage`] took: [`Spool::write_staged`] makes sure it is written.
#[derive(Debug)]
#[must_use = "a staged record must be written before its request goes upstream"]
pub struct Staged {
    lane: usize,
    seq: u64,
    /// Worth yielding for: the lane's recent writes carried several records, or it is time to
    /// look again.
    share: bool,
}

/// The spool of this process (see the module docs).
pub struct Spool {
    dir: PathBuf,
    /// The segment each lane writes into now. A file's writes queue on its inode lock (ext4 takes
    /// it for every buffered write), so a request thread keeps a lane of its own for its started
    /// records (the first lanes, one per CPU up to [`MAX_STARTED_LANES`]) and the usage writer's
    /// finished records, whose batch-sized writes hold that lock longest, have the last: no
    /// request thread sleeps on another's write or on a batch's.
    lanes: Box<[Mutex<Arc<Segment>>]>,
    /// Per started lane, the records staged for its next write.
    staging: Box<[Mutex<Staging>]>,
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

/// A model's prices. In the JSON lines of earlier releases, fields added after the first
/// release default when absent (the same holds for every line's later fields).
#[derive(Serialize, Deserialize)]
struct SPrices {
    i: i64,
    o: i64,
    c: Option<i64>,
    /// Cache-write input.
    #[serde(default)]
    cw: Option<i64>,
    #[serde(default)]
    img: Option<i64>,
    #[serde(default)]
    min: Option<i64>,
    #[serde(default)]
    chars: Option<i64>,
}

/// What both records carry (borrowed when written, owned when read back).
#[derive(Serialize, Deserialize)]
struct Common<'a> {
    id: Uuid,
    #[serde(with = "at_micros")]
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
    #[serde(default)]
    response_id: Option<Cow<'a, str>>,
    #[serde(default)]
    conversation_id: Option<Cow<'a, str>>,
    /// Upstream attempts (absent: 1).
    #[serde(default)]
    attempts: Option<u32>,
    #[serde(default)]
    fallback_from: Option<Cow<'a, str>>,
    /// Answered from the response cache (absent: false).
    #[serde(default)]
    hit: bool,
}

/// What a finished record adds.
#[derive(Serialize, Deserialize)]
struct Tail<'a> {
    status: u16,
    prompt: i64,
    completion: i64,
    cached: i64,
    /// Cache-write tokens.
    #[serde(default)]
    cw: i64,
    /// Reasoning tokens.
    #[serde(default)]
    rs: i64,
    /// The non-token part of `cost` (already inside it).
    #[serde(default)]
    extra: i64,
    cost: i64,
    latency_ms: i64,
    ttft_ms: Option<i64>,
    estimated: bool,
    error: Option<Cow<'a, str>>,
}

/// A record as written: postcard, every field present in declaration order (so a field is only
/// ever added as a new record version, see [`VERSION`]).
#[derive(Serialize, Deserialize)]
enum Rec<'a> {
    /// A started request and its body's size.
    S(Common<'a>, u64),
    F(Common<'a>, Tail<'a>),
}

/// A JSON line as releases before the binary records wrote it; still read, so a spool left by
/// one replays after an upgrade.
#[derive(Deserialize)]
enum Line<'a> {
    S(Started<'a>),
    F(Finished<'a>),
}

#[derive(Deserialize)]
struct Started<'a> {
    #[serde(flatten)]
    c: Common<'a>,
    body_len: u64,
}

#[derive(Deserialize)]
struct Finished<'a> {
    #[serde(flatten)]
    c: Common<'a>,
    #[serde(flatten)]
    t: Tail<'a>,
}

impl<'a> From<Line<'a>> for Rec<'a> {
    fn from(line: Line<'a>) -> Self {
        match line {
            Line::S(s) => Rec::S(s.c, s.body_len),
            Line::F(f) => Rec::F(f.c, f.t),
        }
    }
}

/// `at` in a record: microseconds since the Unix epoch (no text formatting on the request
/// path); an RFC 3339 string in the JSON lines of earlier releases.
mod at_micros {
    use chrono::{DateTime, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(at: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_i64(at.timestamp_micros())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        if d.is_human_readable() {
            DateTime::<Utc>::deserialize(d)
        } else {
            let us = i64::deserialize(d)?;
            DateTime::from_timestamp_micros(us)
                .ok_or_else(|| serde::de::Error::custom("time out of range"))
        }
    }
}

/// A record's frame: [`MAGIC`], [`VERSION`], the payload's length (u32 LE) and CRC-32 (u32 LE),
/// the payload. A frame cut short by the process dying mid-write fails its CRC and is skipped.
const MAGIC: u8 = 0xA5;
/// The record layout ([`Rec`]) a frame holds.
const VERSION: u8 = 1;
const HEADER: usize = 10;

/// Appends `rec`'s frame to `buf` (a record too large is refused, `buf` left as it was).
fn frame(buf: &mut Vec<u8>, rec: &Rec<'_>) -> std::io::Result<()> {
    let at = buf.len();
    buf.extend_from_slice(&[MAGIC, VERSION, 0, 0, 0, 0, 0, 0, 0, 0]);
    let mut out = match postcard::to_extend(rec, std::mem::take(buf)) {
        Ok(out) => out,
        // Not reachable for these types (no maps of unknown length, no `deserialize_any`).
        Err(e) => return Err(std::io::Error::other(e)),
    };
    let payload = &out[at + HEADER..];
    if payload.len() > MAX_RECORD {
        out.truncate(at);
        *buf = out;
        return Err(std::io::Error::other("usage spool record too large"));
    }
    let len = (payload.len() as u32).to_le_bytes();
    let crc = crc32fast::hash(payload).to_le_bytes();
    out[at + 2..at + 6].copy_from_slice(&len);
    out[at + 6..at + HEADER].copy_from_slice(&crc);
    *buf = out;
    Ok(())
}

/// The record of the frame at the start of `b` and the frame's length, if it is whole.
fn unframe(b: &[u8]) -> Option<(Rec<'static>, usize)> {
    let head = b.get(..HEADER)?;
    if head[0] != MAGIC || head[1] != VERSION {
        return None;
    }
    let len = u32::from_le_bytes(head[2..6].try_into().ok()?) as usize;
    if len > MAX_RECORD {
        return None;
    }
    let payload = b.get(HEADER..HEADER + len)?;
    if crc32fast::hash(payload).to_le_bytes() != head[6..HEADER] {
        return None;
    }
    // `Cow`s deserialize owned: the record outlives `b`.
    let rec = postcard::from_bytes::<Rec<'static>>(payload).ok()?;
    Some((rec, HEADER + len))
}

impl Rec<'_> {
    fn id(&self) -> Uuid {
        match self {
            Rec::S(c, _) | Rec::F(c, _) => c.id,
        }
    }
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
        // Owner-only, as the database: the records name users, keys and requests.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("usage.spool_dir {}: cannot create", dir.display()))?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(dir.join("lock"))
            .with_context(|| format!("usage.spool_dir {}: cannot open its lock", dir.display()))?;
        if lock.try_lock().is_err() {
            anyhow::bail!(
                "usage.spool_dir {} is in use by another tollgate process: give every replica its own",
                dir.display()
            );
        }
        let left = segment_files(dir)?;
        let started = std::thread::available_parallelism()
            .map_or(1, usize::from)
            .clamp(1, MAX_STARTED_LANES);
        let lanes = (0..=started as u64)
            .map(|seq| Self::new_segment(dir, seq, SEGMENT_CAP).map(Mutex::new))
            .collect::<anyhow::Result<Box<[_]>>>()?;
        Ok((
            Self {
                dir: dir.to_owned(),
                next: AtomicU64::new(lanes.len() as u64),
                staging: (0..started).map(|_| Mutex::default()).collect(),
                lanes,
                sealed: Mutex::new(Vec::new()),
                _lock: lock,
            },
            left,
        ))
    }

    fn new_segment(dir: &Path, seq: u64, cap: u64) -> anyhow::Result<Arc<Segment>> {
        let path = dir.join(segment_name(seq));
        let file = OpenOptions::new()
            .create_new(true)
            .write(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("cannot create spool segment {}", path.display()))?;
        file.set_len(cap)
            .with_context(|| format!("cannot size spool segment {}", path.display()))?;
        Ok(Segment::new(path, file, cap))
    }

    /// The started record of a request about to go upstream, written at once: one `pwrite(2)`
    /// (with whatever this thread had staged). On a write error (disk full) the request still
    /// proceeds — its record is then only as safe as without a spool — and the caller counts and
    /// logs it.
    pub fn started(
        &self,
        ticket: &mut Ticket,
        facts: &RequestFacts,
        at: DateTime<Utc>,
    ) -> Result<(), Lost> {
        let staged = self.stage(ticket, facts, at)?;
        self.write_staged(staged).map(drop)
    }

    /// [`Spool::started`], sharing the write with the other requests of this scheduler round:
    /// the record is staged, the task yields once (tokio runs the worker's other ready tasks,
    /// then polls for I/O), and the first of them to run again writes every record the worker
    /// staged in one `pwrite(2)`. Returns once this record is written (`Ok(true)`: by this
    /// call), so the guarantee is [`Spool::started`]'s; under load one system call serves
    /// several requests. A lane whose last [`LONE_WRITES`] writes carried one record each (a
    /// request alone on its worker) writes at once instead, yielding only every
    /// [`PROBE_EVERY`]th record to notice when company comes back.
    pub async fn started_shared(
        &self,
        ticket: &mut Ticket,
        facts: &RequestFacts,
        at: DateTime<Utc>,
    ) -> Result<bool, Lost> {
        let staged = self.stage(ticket, facts, at)?;
        if staged.share {
            tokio::task::yield_now().await;
        }
        self.write_staged(staged)
    }

    /// Stages a request's started record in the calling thread's lane, written by the next
    /// [`Spool::write_staged`] on that lane, whoever calls it: the requests of one scheduler
    /// round on a worker stage theirs, yield, and the first to run again writes them all in one
    /// `pwrite(2)` ([`Spool::started_shared`]). The record's place in its segment is reserved
    /// here, so a lane's staged records are contiguous and nothing else lands between them.
    /// Staged records count in their segment's outstanding requests, so it is not deleted
    /// before they are written.
    pub fn stage(
        &self,
        ticket: &mut Ticket,
        facts: &RequestFacts,
        at: DateTime<Utc>,
    ) -> Result<Staged, Lost> {
        let rec = Rec::S(
            common(ticket.id, at, facts_parts(facts)),
            facts.request_len as u64,
        );
        let mut buf = Vec::with_capacity(256);
        frame(&mut buf, &rec).map_err(Lost::one)?;
        let lane = self.started_lane();
        let len = buf.len() as u64;
        let mut st = self.staging[lane]
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let (seg, at) = loop {
            let seg = {
                let cur = self.lanes[lane]
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                // Counted under the lock: a segment sealed after this sees the request.
                cur.outstanding.fetch_add(1, Ordering::Relaxed);
                cur.clone()
            };
            // The reserved ranges never overlap, whichever thread reserves.
            let at = seg.bytes.fetch_add(len, Ordering::Relaxed);
            if at.saturating_add(len) <= seg.cap {
                break (seg, at);
            }
            seg.outstanding.fetch_sub(1, Ordering::Relaxed);
            self.rotate(lane, &seg, len)
                .map_err(|e| Lost::one(format!("{e:#}")))?;
        };
        let joins = st.seg.as_ref().is_some_and(|s| Arc::ptr_eq(s, &seg))
            && st.at.saturating_add(st.buf.len() as u64) == at
            && st.buf.len() < STAGE_MAX;
        if !joins {
            st.write_out();
            st.seg = Some(seg.clone());
            st.at = at;
        }
        st.buf.extend_from_slice(&buf);
        st.staged += 1;
        ticket.seg = Some(seg);
        Ok(Staged {
            lane,
            seq: st.staged,
            share: st.lone < LONE_WRITES || st.staged.is_multiple_of(PROBE_EVERY),
        })
    }

    /// Writes `staged`'s record unless a write of its lane took it already (`Ok(true)`: this
    /// call wrote); reports records whose write failed since the last report (this one's or
    /// others').
    pub fn write_staged(&self, staged: Staged) -> Result<bool, Lost> {
        let mut st = self.staging[staged.lane]
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let wrote = st.written < staged.seq;
        if wrote {
            st.write_out();
        }
        st.lost.take().map_or(Ok(wrote), Err)
    }

    /// The calling thread's lane for started records: threads take the started lanes in turn
    /// as they first write, and keep theirs. (`open` makes at least one started lane besides the
    /// finished one.)
    fn started_lane(&self) -> usize {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        thread_local! {
            static LANE: usize = NEXT.fetch_add(1, Ordering::Relaxed);
        }
        LANE.with(|l| *l) % (self.lanes.len() - 1)
    }

    /// The lane of the finished records.
    fn finished_lane(&self) -> usize {
        self.lanes.len() - 1
    }

    /// Writes `buf` (finished records) into `lane`'s current segment, sealing it and making the
    /// next when it is full.
    fn append(&self, lane: usize, buf: &[u8]) -> std::io::Result<()> {
        loop {
            let seg = self.lanes[lane]
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            if seg.append(buf)? {
                return Ok(());
            }
            self.rotate(lane, &seg, buf.len() as u64)
                .map_err(|e| std::io::Error::other(format!("{e:#}")))?;
        }
    }

    /// Seals `full`, `lane`'s segment, and makes the lane's next (at least `need` bytes), unless
    /// another thread did it already.
    fn rotate(&self, lane: usize, full: &Arc<Segment>, need: u64) -> anyhow::Result<()> {
        let old = {
            let mut cur = self.lanes[lane]
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if !Arc::ptr_eq(&cur, full) {
                return Ok(());
            }
            let seq = self.next.fetch_add(1, Ordering::Relaxed);
            let new = Self::new_segment(&self.dir, seq, SEGMENT_CAP.max(need))?;
            std::mem::replace(&mut *cur, new)
        };
        old.sealed.store(true, Ordering::Relaxed);
        self.sealed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(old);
        Ok(())
    }

    /// The finished records of a batch about to be written: one `pwrite(2)` (one per
    /// [`WRITE_CHUNK`] of records for a batch larger than that).
    pub fn finished(&self, rows: &[Settled]) -> std::io::Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let lane = self.finished_lane();
        let mut buf = Vec::with_capacity(rows.len().saturating_mul(256).min(2 * WRITE_CHUNK));
        for r in rows {
            if buf.len() >= WRITE_CHUNK {
                self.append(lane, &buf)?;
                buf.clear();
            }
            let e = &r.event;
            let rec = Rec::F(
                common(e.ticket.id, e.at, event_parts(e)),
                Tail {
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
                },
            );
            frame(&mut buf, &rec)?;
        }
        self.append(lane, &buf)
    }

    /// The batch's transaction committed: its requests no longer keep their segments.
    pub fn committed(&self, rows: &[Settled]) {
        for r in rows {
            if let Some(seg) = &r.event.ticket.seg {
                seg.outstanding.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    /// Seals each lane's segment when it is big or old enough, and deletes sealed segments whose
    /// requests are all committed. A request that finds a segment full seals it at any time
    /// (even while a batch's finished records are going into it), but only this deletes, and
    /// the usage writer calls it between batches only: a segment is never deleted while it holds
    /// the finished records of a batch not yet committed.
    pub fn maintain(&self) {
        for (lane, current) in self.lanes.iter().enumerate() {
            let cur = current
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            let bytes = cur.bytes.load(Ordering::Relaxed);
            if (bytes >= SEGMENT_BYTES || (bytes > 0 && cur.opened.elapsed() >= SEGMENT_AGE))
                && let Err(e) = self.rotate(lane, &cur, 0)
            {
                tracing::warn!(error = %e, "usage spool: cannot rotate");
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
        for current in &self.lanes {
            let cur = current
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
        segment_files(&self.dir).map_or(0, |f| f.len())
    }
}

/// The segment files in `dir`, oldest first (their names start with the time they were made).
fn segment_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "spool"))
        .collect();
    files.sort();
    Ok(files)
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

fn event_parts(e: &UsageEvent) -> Parts<'_> {
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

fn settled(rec: Rec<'_>) -> Settled {
    match rec {
        Rec::F(c, f) => {
            let mut e = event(c);
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
        Rec::S(c, body_len) => {
            let mut e = event(c);
            e.status = 499;
            e.error = Some(RESTARTED.to_owned());
            // The upstream had the prompt: ~4 bytes a token, as admission estimates it.
            e.usage = Usage {
                prompt: body_len.div_ceil(4).min(i64::MAX as u64) as i64,
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

/// The records a segment holds, in order: whole frames, and the JSON lines an earlier release
/// wrote. Between and after them are NUL bytes (a segment's unwritten rest) and whatever a
/// process killed mid-write left of a record (its CRC fails): both are stepped over a byte at a
/// time until the next whole record.
fn read_segment(path: &Path) -> anyhow::Result<Vec<Rec<'static>>> {
    let file = File::open(path).with_context(|| format!("open {}", path.display()))?;
    let len = file.metadata().map_or(0, |m| m.len());
    if len > READ_MAX {
        tracing::warn!(path = %path.display(), bytes = len, read = READ_MAX, "usage spool: a segment larger than any the gateway writes; reading only its start");
    }
    let mut bytes = Vec::new();
    file.take(READ_MAX)
        .read_to_end(&mut bytes)
        .with_context(|| format!("read {}", path.display()))?;
    let mut out = Vec::new();
    // Candidate records that did not check out: a killed process leaves one or two per thread
    // that was writing; past this many the file is not one the gateway wrote, and the rest of
    // it is not scanned (each check can read up to a record's length).
    let mut failed = 0usize;
    let mut i = 0;
    while i < bytes.len() {
        if failed > MAX_BAD_CANDIDATES {
            tracing::warn!(path = %path.display(), at = i, "usage spool: a segment full of damaged records; not reading the rest of it");
            break;
        }
        let rest = &bytes[i..];
        match rest[0] {
            0 | b'\n' => {
                i += rest
                    .iter()
                    .position(|b| *b != 0 && *b != b'\n')
                    .unwrap_or(rest.len());
            }
            MAGIC => match unframe(rest) {
                Some((rec, n)) => {
                    out.push(rec);
                    i += n;
                }
                None => {
                    failed += 1;
                    i += 1;
                }
            },
            // An earlier release's JSON line: only where a line starts.
            b'{' if i == 0 || bytes[i - 1] == b'\n' => {
                let end = memchr::memchr2(b'\n', 0, rest).unwrap_or(rest.len());
                match (end <= MAX_RECORD)
                    .then(|| serde_json::from_slice::<Line<'static>>(&rest[..end]).ok())
                    .flatten()
                {
                    Some(line) => {
                        out.push(line.into());
                        i += end;
                    }
                    None => {
                        failed += 1;
                        i += 1;
                    }
                }
            }
            _ => i += 1,
        }
    }
    Ok(out)
}

/// What [`replay`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Replayed {
    /// Records written from finished records.
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
    // The finished record wins over the started one.
    let mut recs: HashMap<Uuid, Rec<'static>> = HashMap::new();
    let mut order: Vec<Uuid> = Vec::new();
    for path in files {
        for rec in read_segment(path)? {
            let id = rec.id();
            match recs.get(&id) {
                None => {
                    order.push(id);
                    recs.insert(id, rec);
                }
                Some(Rec::S(..)) if matches!(rec, Rec::F(..)) => {
                    recs.insert(id, rec);
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
            if let Some(rec) = recs.remove(id) {
                match rec {
                    Rec::F(..) => out.finished += 1,
                    Rec::S(..) => out.restarted += 1,
                }
                rows.push(settled(rec));
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

    /// A spool in a new directory (kept while the `TempDir` lives) and a request's facts.
    fn fresh() -> (tempfile::TempDir, Spool, RequestFacts) {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _) = Spool::open(dir.path()).unwrap();
        (dir, spool, facts())
    }

    fn facts() -> RequestFacts {
        RequestFacts {
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
        }
    }

    /// The settled row of a request whose started record `ticket` holds (status 200).
    fn settled_row(ticket: Ticket, facts: &RequestFacts, cost_nanos: i64) -> Settled {
        let mut e = event(common(ticket.id, Utc::now(), facts_parts(facts)));
        e.ticket = ticket;
        e.status = 200;
        Settled {
            event: e,
            cost_nanos,
        }
    }

    #[test]
    fn records_round_trip_and_a_cut_request_is_estimated_from_its_size() {
        let facts = facts();
        let dir = tempfile::tempdir().unwrap();
        let (spool, left) = Spool::open(dir.path()).unwrap();
        assert!(left.is_empty());
        // A second process on the same directory is refused.
        assert!(Spool::open(dir.path()).is_err());
        let mut t = Ticket::new();
        spool.started(&mut t, &facts, Utc::now()).unwrap();
        let mut lines = read_segment(&t.seg.as_ref().unwrap().path).unwrap();
        assert_eq!(lines.len(), 1);
        let s = settled(lines.pop().unwrap());
        assert_eq!(s.event.ticket.id, t.id);
        assert_eq!(s.event.status, 499);
        assert_eq!(s.event.error.as_deref(), Some(RESTARTED));
        assert_eq!(s.event.usage.prompt, 1000);
        // 1000 tokens at $1 per 1M tokens: $0.001.
        assert_eq!(s.cost_nanos, 1_000_000);
        assert!(s.event.tokens_estimated && s.event.charged);
        assert_eq!(s.event.endpoint, Endpoint::Embeddings);
    }

    /// A finished record carries cache writes, reasoning, the non-token cost and the stored
    /// response and conversation; a JSON line an earlier release wrote still replays.
    #[test]
    fn finished_records_carry_every_field_and_old_json_lines_still_read() {
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
        let files = segment_files(dir.path()).unwrap();
        let holding: Vec<&PathBuf> = files
            .iter()
            .filter(|f| !read_segment(f).unwrap().is_empty())
            .collect();
        let [path] = &holding[..] else {
            panic!("one segment holds it: {files:?}")
        };
        let mut lines = read_segment(path).unwrap();
        assert_eq!(lines.len(), 1);
        let back = settled(lines.pop().unwrap());
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
        let s = settled(serde_json::from_str::<Line<'_>>(old_f).unwrap().into());
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
        let s = settled(serde_json::from_str::<Line<'_>>(old_s).unwrap().into());
        assert_eq!(
            (s.event.status, s.event.usage.prompt, s.cost_nanos),
            (499, 1000, 1_000_000)
        );
        // A segment of such lines, as an earlier release left it, replays.
        let old = dir.path().join("0000000000000000-00000000.spool");
        std::fs::write(&old, format!("{old_f}\n{old_s}\n")).unwrap();
        let recs = read_segment(&old).unwrap();
        assert_eq!(
            ids(&recs),
            [
                "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"
                    .parse::<Uuid>()
                    .unwrap(),
                "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5c".parse().unwrap()
            ]
        );
        assert!(matches!(recs[..], [Rec::F(..), Rec::S(..)]));
    }

    fn ids(recs: &[Rec<'_>]) -> Vec<Uuid> {
        recs.iter().map(Rec::id).collect()
    }

    /// A process killed mid-write leaves part of a record and NULs where the rest was to go
    /// (whichever part the copy reached), then the records other threads wrote after it, then
    /// the segment's unwritten rest: replay keeps every whole record and nothing else.
    #[test]
    fn a_record_cut_short_and_the_unwritten_rest_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let sdir = dir.path().join("spool");
        let (spool, _) = Spool::open(&sdir).unwrap();
        let facts = facts();
        let tickets: Vec<Ticket> = (0..3)
            .map(|_| {
                let mut t = Ticket::new();
                spool.started(&mut t, &facts, Utc::now()).unwrap();
                t
            })
            .collect();
        let path = tickets[0].seg.as_ref().unwrap().path.clone();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len() as u64, SEGMENT_CAP, "made at its full size");
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode(&path), 0o600, "owner-only, as the database");
            assert_eq!(mode(&sdir), 0o700);
        }
        let mut whole: Vec<&[u8]> = Vec::new();
        let mut at = 0;
        for t in &tickets {
            let (rec, n) = unframe(&bytes[at..]).expect("a whole frame");
            assert_eq!(rec.id(), t.id);
            whole.push(&bytes[at..at + n]);
            at += n;
        }
        assert!(bytes[at..].iter().all(|b| *b == 0));
        let (a, b, c) = (whole[0], whole[1], whole[2]);
        assert_ne!(b.last(), Some(&0));
        for cut in [
            // The head of b copied, not its tail.
            [&b[..b.len() / 2], &vec![0u8; b.len() - b.len() / 2][..]].concat(),
            // Its tail copied, not its head.
            [&vec![0u8; b.len() - 20][..], &b[b.len() - 20..]].concat(),
            // Both ends, not the middle.
            [&b[..30], &vec![0u8; b.len() - 60][..], &b[b.len() - 30..]].concat(),
            // All but its last byte.
            [&b[..b.len() - 1], &[0u8][..]].concat(),
            // Its header, with a length reaching into the next record.
            [&b[..HEADER], &vec![0u8; b.len() - HEADER][..]].concat(),
            // Bytes that start a frame and a JSON line, then nothing.
            [
                &[MAGIC, VERSION, 3, 0][..],
                b"{\"S\":{",
                &vec![0u8; b.len() - 10][..],
            ]
            .concat(),
        ] {
            assert_eq!(cut.len(), b.len());
            let torn = [a, &cut[..], c, &[0u8; 4096][..]].concat();
            std::fs::write(&path, &torn).unwrap();
            let got = ids(&read_segment(&path).unwrap());
            assert_eq!(got, [tickets[0].id, tickets[2].id]);
        }
        // Nothing cut: all three.
        std::fs::write(&path, [a, b, c].concat()).unwrap();
        assert_eq!(
            ids(&read_segment(&path).unwrap()),
            tickets.iter().map(|t| t.id).collect::<Vec<_>>()
        );
    }

    /// A segment that fills up between two of the writer's maintenance passes is sealed by the
    /// request that found it full; every record is in one of the two segments, and once the
    /// records are committed the sealed one is deleted.
    #[test]
    fn a_full_segment_is_sealed_and_the_next_takes_the_rest() {
        let (dir, spool, facts) = fresh();
        // One segment per lane, made at open.
        let lanes = spool.segments();
        assert_eq!(lanes, spool.lanes.len());
        let mut tickets = Vec::new();
        let first = loop {
            let mut t = Ticket::new();
            spool.started(&mut t, &facts, Utc::now()).unwrap();
            let path = t.seg.as_ref().unwrap().path.clone();
            tickets.push(t);
            if path != tickets[0].seg.as_ref().unwrap().path {
                break tickets[0].seg.as_ref().unwrap().clone();
            }
            assert!(tickets.len() < 1_000_000, "never rotated");
        };
        assert!(first.sealed.load(Ordering::Relaxed));
        assert!(first.bytes.load(Ordering::Relaxed) > SEGMENT_BYTES);
        assert_eq!(spool.segments(), lanes + 1);
        let mut got: Vec<Uuid> = Vec::new();
        let files = segment_files(dir.path()).unwrap();
        for f in &files {
            got.extend(ids(&read_segment(f).unwrap()));
        }
        assert_eq!(got, tickets.iter().map(|t| t.id).collect::<Vec<_>>());
        // Commit them all (as the writer does, through the events' tickets).
        let rows: Vec<Settled> = tickets
            .into_iter()
            .map(|ticket| settled_row(ticket, &facts, 0))
            .collect();
        drop(first);
        spool.committed(&rows);
        spool.maintain();
        assert_eq!(spool.segments(), lanes, "the sealed segment is deleted");
    }

    /// A batch far larger than a segment (a large `usage.batch_size`) is written in pieces: every
    /// record lands, and no segment grows past its size.
    #[test]
    fn a_huge_batch_is_written_in_pieces_within_segments() {
        let (dir, spool, facts) = fresh();
        // One and a half segments' worth of finished records.
        let mut one = Vec::new();
        frame(
            &mut one,
            &Rec::F(
                common(Uuid::now_v7(), Utc::now(), facts_parts(&facts)),
                Tail {
                    status: 200,
                    prompt: 0,
                    completion: 0,
                    cached: 0,
                    cw: 0,
                    rs: 0,
                    extra: 0,
                    cost: 1,
                    latency_ms: 0,
                    ttft_ms: None,
                    estimated: false,
                    error: None,
                },
            ),
        )
        .unwrap();
        let n = SEGMENT_CAP as usize / one.len() * 3 / 2;
        let rows: Vec<Settled> = (0..n)
            .map(|_| settled_row(Ticket::new(), &facts, 1))
            .collect();
        spool.finished(&rows).unwrap();
        let files = segment_files(dir.path()).unwrap();
        let mut got = Vec::new();
        let mut holding = 0;
        for f in &files {
            assert!(std::fs::metadata(f).unwrap().len() <= SEGMENT_CAP);
            let recs = read_segment(f).unwrap();
            holding += usize::from(!recs.is_empty());
            got.extend(ids(&recs));
        }
        assert!(holding > 1, "more than a segment's worth");
        let want: Vec<Uuid> = rows.iter().map(|r| r.event.ticket.id).collect();
        assert_eq!(got, want);
    }

    /// Started records go into the writing thread's own lane, finished records into another: a
    /// request's `pwrite` never queues behind another thread's on one file's inode lock. Every
    /// record still replays, whichever file holds it.
    #[test]
    fn each_request_thread_and_the_writer_write_their_own_segment() {
        let (dir, spool, facts) = fresh();
        let (spool, facts) = (Arc::new(spool), Arc::new(facts));
        let started = |spool: Arc<Spool>, facts: Arc<RequestFacts>| {
            std::thread::spawn(move || {
                (0..3)
                    .map(|_| {
                        let mut t = Ticket::new();
                        spool.started(&mut t, &facts, Utc::now()).unwrap();
                        t
                    })
                    .collect::<Vec<_>>()
            })
        };
        let a = started(spool.clone(), facts.clone()).join().unwrap();
        let b = started(spool.clone(), facts.clone()).join().unwrap();
        let path = |t: &Ticket| t.seg.as_ref().unwrap().path.clone();
        assert!(
            a.iter().all(|t| path(t) == path(&a[0])),
            "a thread keeps its lane"
        );
        assert!(b.iter().all(|t| path(t) == path(&b[0])));
        if spool.lanes.len() > 2 {
            assert_ne!(path(&a[0]), path(&b[0]), "two threads, two lanes");
        }
        let rows: Vec<Settled> = a
            .into_iter()
            .chain(b)
            .map(|ticket| settled_row(ticket, &facts, 7))
            .collect();
        spool.finished(&rows).unwrap();
        let finished = spool.lanes[spool.finished_lane()]
            .lock()
            .unwrap()
            .path
            .clone();
        assert!(
            rows.iter()
                .all(|r| r.event.ticket.seg.as_ref().unwrap().path != finished)
        );
        let recs = read_segment(&finished).unwrap();
        assert_eq!(recs.len(), rows.len());
        assert!(recs.iter().all(|r| matches!(r, Rec::F(..))));
        // Across the files, each request has its started and its finished record.
        let mut all = Vec::new();
        for f in segment_files(dir.path()).unwrap() {
            all.extend(read_segment(&f).unwrap());
        }
        for r in &rows {
            let id = r.event.ticket.id;
            assert!(all.iter().any(|x| x.id() == id && matches!(x, Rec::S(..))));
            assert!(all.iter().any(|x| x.id() == id && matches!(x, Rec::F(..))));
        }
    }

    /// The records staged on a lane go out in one write, by whichever staged request asks
    /// first; the others find theirs written, and nothing is written twice.
    #[test]
    fn staged_records_go_out_in_one_write() {
        let (_dir, spool, facts) = fresh();
        let mut tickets: Vec<Ticket> = (0..3).map(|_| Ticket::new()).collect();
        let staged: Vec<Staged> = tickets
            .iter_mut()
            .map(|t| spool.stage(t, &facts, Utc::now()).unwrap())
            .collect();
        let seg = tickets[0].seg.clone().unwrap();
        assert!(
            tickets
                .iter()
                .all(|t| Arc::ptr_eq(t.seg.as_ref().unwrap(), &seg))
        );
        assert!(
            read_segment(&seg.path).unwrap().is_empty(),
            "staged, not written"
        );
        let mut staged = staged.into_iter();
        let (a, b, c) = (
            staged.next().unwrap(),
            staged.next().unwrap(),
            staged.next().unwrap(),
        );
        assert!(spool.write_staged(b).unwrap(), "the first to ask writes");
        let want: Vec<Uuid> = tickets.iter().map(|t| t.id).collect();
        assert_eq!(ids(&read_segment(&seg.path).unwrap()), want);
        assert!(!spool.write_staged(a).unwrap(), "already written");
        assert!(!spool.write_staged(c).unwrap());
        assert_eq!(ids(&read_segment(&seg.path).unwrap()), want, "once each");
        // The next round starts a new write after the last.
        let mut d = Ticket::new();
        let sd = spool.stage(&mut d, &facts, Utc::now()).unwrap();
        assert!(spool.write_staged(sd).unwrap());
        let mut want = want;
        want.push(d.id);
        assert_eq!(ids(&read_segment(&seg.path).unwrap()), want);
    }

    /// Requests started in one round of a worker's scheduler share one write: each gets its
    /// record written before `started_shared` returns, and one of them did the writing.
    #[test]
    fn one_rounds_requests_share_a_write() {
        let (_dir, spool, facts) = fresh();
        let (spool, facts) = (Arc::new(spool), Arc::new(facts));
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let (wrote, tickets): (Vec<bool>, Vec<Ticket>) = rt.block_on(async {
            let tasks: Vec<_> = (0..5)
                .map(|_| {
                    let (spool, facts) = (spool.clone(), facts.clone());
                    tokio::spawn(async move {
                        let mut t = Ticket::new();
                        let wrote = spool.started_shared(&mut t, &facts, Utc::now()).await;
                        // Written by the time it returns.
                        let seg = t.seg.as_ref().unwrap();
                        assert!(ids(&read_segment(&seg.path).unwrap()).contains(&t.id));
                        (wrote.unwrap(), t)
                    })
                })
                .collect();
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await.unwrap());
            }
            out.into_iter().unzip()
        });
        assert_eq!(wrote.iter().filter(|w| **w).count(), 1, "{wrote:?}");
        let seg = tickets[0].seg.clone().unwrap();
        let want: Vec<Uuid> = tickets.iter().map(|t| t.id).collect();
        assert_eq!(ids(&read_segment(&seg.path).unwrap()), want);
    }

    /// A lane whose writes keep carrying one record stops yielding (but for a probe now and
    /// then); one write that carries several turns sharing back on.
    #[test]
    fn a_lone_lane_writes_at_once_until_company_comes() {
        let (_dir, spool, facts) = fresh();
        let one = |spool: &Spool| {
            let mut t = Ticket::new();
            let s = spool.stage(&mut t, &facts, Utc::now()).unwrap();
            let share = s.share;
            assert!(spool.write_staged(s).unwrap());
            share
        };
        let shares: Vec<bool> = (0..2 * PROBE_EVERY).map(|_| one(&spool)).collect();
        let lone = LONE_WRITES as usize;
        assert!(shares[..lone].iter().all(|s| *s), "{shares:?}");
        let probes = shares[lone..].iter().filter(|s| **s).count();
        assert!((1..=2).contains(&probes), "only probes yield: {shares:?}");
        // Two requests in one round: their write carries both, and sharing is back.
        let (mut a, mut b) = (Ticket::new(), Ticket::new());
        let sa = spool.stage(&mut a, &facts, Utc::now()).unwrap();
        let sb = spool.stage(&mut b, &facts, Utc::now()).unwrap();
        assert!(spool.write_staged(sa).unwrap());
        assert!(!spool.write_staged(sb).unwrap());
        assert!(one(&spool), "sharing again");
    }

    /// A lane whose segment is replaced between two staged records (rotated, say) writes the
    /// first one into the old segment before staging the second: each lands where it was
    /// reserved. What a lane holds staged is bounded by [`STAGE_MAX`].
    #[test]
    fn staging_follows_rotation_and_is_bounded() {
        let (_dir, spool, facts) = fresh();
        let (mut a, mut b) = (Ticket::new(), Ticket::new());
        let sa = spool.stage(&mut a, &facts, Utc::now()).unwrap();
        let lane = spool.started_lane();
        let old = spool.lanes[lane].lock().unwrap().clone();
        spool.rotate(lane, &old, 0).unwrap();
        let sb = spool.stage(&mut b, &facts, Utc::now()).unwrap();
        assert_eq!(
            ids(&read_segment(&old.path).unwrap()),
            [a.id],
            "written at once"
        );
        let new = b.seg.clone().unwrap();
        assert!(!Arc::ptr_eq(&old, &new));
        assert!(read_segment(&new.path).unwrap().is_empty());
        assert!(!spool.write_staged(sa).unwrap());
        assert!(spool.write_staged(sb).unwrap());
        assert_eq!(ids(&read_segment(&new.path).unwrap()), [b.id]);

        // Staged without a write, a lane holds at most STAGE_MAX bytes.
        let mut tickets = Vec::new();
        let mut staged = Vec::new();
        let mut one = Vec::new();
        frame(
            &mut one,
            &Rec::S(common(a.id, Utc::now(), facts_parts(&facts)), 0),
        )
        .unwrap();
        for _ in 0..2 * STAGE_MAX / one.len() {
            let mut t = Ticket::new();
            staged.push(spool.stage(&mut t, &facts, Utc::now()).unwrap());
            tickets.push(t);
            let held = spool.staging[lane].lock().unwrap().buf.len();
            assert!(held <= STAGE_MAX + one.len(), "{held}");
        }
        let on_disk = read_segment(&new.path).unwrap().len() - 1;
        assert!(on_disk > 0 && on_disk < tickets.len(), "{on_disk}");
        for s in staged {
            spool.write_staged(s).unwrap();
        }
        let mut want = vec![b.id];
        want.extend(tickets.iter().map(|t| t.id));
        assert_eq!(ids(&read_segment(&new.path).unwrap()), want);
    }

    /// A failed write is reported with the number of records it held, once, to whoever asks
    /// next; the requests go on.
    #[test]
    fn a_failed_staged_write_reports_its_records() {
        let (dir, spool, facts) = fresh();
        let lane = spool.started_lane();
        // A segment whose file is open read-only: every write to it fails.
        let path = dir.path().join("readonly.spool");
        File::create(&path).unwrap().set_len(SEGMENT_CAP).unwrap();
        let broken = Segment::new(path.clone(), File::open(&path).unwrap(), SEGMENT_CAP);
        *spool.lanes[lane].lock().unwrap() = broken;
        let (mut a, mut b) = (Ticket::new(), Ticket::new());
        let sa = spool.stage(&mut a, &facts, Utc::now()).unwrap();
        let sb = spool.stage(&mut b, &facts, Utc::now()).unwrap();
        let lost = spool.write_staged(sa).unwrap_err();
        assert_eq!(lost.records, 2);
        assert!(!spool.write_staged(sb).unwrap(), "reported once");
        let mut c = Ticket::new();
        let lost = spool.started(&mut c, &facts, Utc::now()).unwrap_err();
        assert_eq!(lost.records, 1);
    }

    /// Replay reads at most [`READ_MAX`] of a file: a record past it is not read.
    #[test]
    fn replay_reads_a_bounded_part_of_a_segment() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0000000000000000-00000000.spool");
        let facts = facts();
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let mut fa = Vec::new();
        frame(
            &mut fa,
            &Rec::S(common(a, Utc::now(), facts_parts(&facts)), 1),
        )
        .unwrap();
        let mut fb = Vec::new();
        frame(
            &mut fb,
            &Rec::S(common(b, Utc::now(), facts_parts(&facts)), 1),
        )
        .unwrap();
        let file = File::create(&path).unwrap();
        // Sparse: the test writes two records, not 64 MiB.
        file.set_len(READ_MAX + 4096).unwrap();
        file.write_all_at(&fa, 0).unwrap();
        file.write_all_at(&fb, READ_MAX + 16).unwrap();
        assert_eq!(ids(&read_segment(&path).unwrap()), [a]);
        // Within the bound, both are read.
        file.write_all_at(&fb, READ_MAX - fb.len() as u64).unwrap();
        assert_eq!(ids(&read_segment(&path).unwrap()), [a, b]);
    }

    /// Damage is stepped over at a bounded cost: a file of candidate frame headers that all
    /// fail their check is given up on after [`MAX_BAD_CANDIDATES`], and a `{` that does not
    /// start a line is not parsed as JSON.
    #[test]
    fn damaged_segments_cost_a_bounded_scan() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0000000000000000-00000000.spool");
        let facts = facts();
        let good = Uuid::now_v7();
        let mut frame_bytes = Vec::new();
        frame(
            &mut frame_bytes,
            &Rec::S(common(good, Utc::now(), facts_parts(&facts)), 1),
        )
        .unwrap();
        // Headers claiming the largest record, each failing its CRC, then a whole record.
        let bad = [MAGIC, VERSION, 0, 0, 1, 0, 1, 2, 3, 4];
        let mut few = bad.repeat(10);
        few.extend_from_slice(&vec![0u8; 64 * 1024]);
        few.extend_from_slice(&frame_bytes);
        std::fs::write(&path, &few).unwrap();
        assert_eq!(
            ids(&read_segment(&path).unwrap()),
            [good],
            "a few are stepped over"
        );
        let mut many = bad.repeat(MAX_BAD_CANDIDATES + 10);
        many.extend_from_slice(&vec![0u8; 64 * 1024]);
        many.extend_from_slice(&frame_bytes);
        std::fs::write(&path, &many).unwrap();
        assert!(
            read_segment(&path).unwrap().is_empty(),
            "past the bound the rest is not read"
        );
        // A JSON line glued to the end of a frame is not a line: not read.
        let old_s = r#"{"S":{"id":"0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5c","at":"2026-11-30T10:00:00Z","user":"u","key":"k","model":"m","provider":"p","endpoint":"embeddings","stream":false,"prices":{"i":1000000000,"o":0,"c":null},"request_id":"r","shared_key":true,"charged":true,"body_len":4000}}"#;
        std::fs::write(&path, [&frame_bytes[..], old_s.as_bytes(), b"\n"].concat()).unwrap();
        assert_eq!(ids(&read_segment(&path).unwrap()), [good]);
        std::fs::write(
            &path,
            [&frame_bytes[..], b"\n", old_s.as_bytes(), b"\n"].concat(),
        )
        .unwrap();
        assert_eq!(ids(&read_segment(&path).unwrap()).len(), 2);
    }
}
