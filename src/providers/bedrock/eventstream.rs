//! AWS event-stream framing (`application/vnd.amazon.eventstream`), decoding only: what
//! Bedrock's ConverseStream answers with instead of SSE.
//!
//! A message is `total length (u32 BE) | headers length (u32 BE) | CRC32 of those 8 bytes |
//! headers | payload | CRC32 of everything before it`. A header is `name length (u8) | name |
//! type (u8) | value`. The decoder is bounded: it refuses a message whose declared length is
//! larger than its limit as soon as the 12-byte prelude is in (before buffering any of it),
//! and never holds more than one message.

use crate::providers::StreamFault;

/// The prelude (12 bytes) and the message CRC (4): the smallest message there is.
pub const MIN_MESSAGE: usize = 16;
const PRELUDE: usize = 12;

/// A header's value. Only strings matter to Bedrock; the rest are read so the headers after
/// them can be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderValue {
    Bool(bool),
    Byte(i8),
    Short(i16),
    Int(i32),
    Long(i64),
    Bytes(Vec<u8>),
    String(String),
    /// Milliseconds since the epoch.
    Timestamp(i64),
    Uuid([u8; 16]),
}

/// One decoded message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Message {
    pub headers: Vec<(String, HeaderValue)>,
    pub payload: Vec<u8>,
}

impl Message {
    /// A string header's value (`:event-type`, `:message-type`, …).
    pub fn header_str(&self, name: &str) -> Option<&str> {
        self.headers.iter().find_map(|(n, v)| match v {
            HeaderValue::String(s) if n == name => Some(s.as_str()),
            _ => None,
        })
    }
}

/// Incremental decoder, fed bytes as they arrive.
#[derive(Debug)]
pub struct Decoder {
    max_message: usize,
    /// The message being assembled: never more than its declared length.
    buf: Vec<u8>,
    /// Its declared length, once the prelude is in and checked.
    want: Option<usize>,
}

fn malformed(what: impl Into<String>) -> StreamFault {
    StreamFault::Malformed(what.into())
}

impl Decoder {
    /// `max_message`: the largest message accepted, whole (prelude and CRC included).
    pub fn new(max_message: usize) -> Self {
        Self {
            max_message: max_message.max(MIN_MESSAGE),
            buf: Vec::new(),
            want: None,
        }
    }

    /// Bytes of an unfinished message are held (the stream ended inside a message when this is
    /// true at its end).
    pub fn is_mid_message(&self) -> bool {
        !self.buf.is_empty()
    }

    /// Takes bytes from the front of `input` until one message is complete and returns it, or
    /// until `input` is used up (`Ok(None)`). Call again with the rest while `input` is not
    /// empty.
    pub fn next(&mut self, input: &mut &[u8]) -> Result<Option<Message>, StreamFault> {
        loop {
            let need = match self.want {
                None => PRELUDE - self.buf.len(),
                Some(total) => total - self.buf.len(),
            };
            let take = need.min(input.len());
            self.buf.extend_from_slice(&input[..take]);
            *input = &input[take..];
            if take < need {
                return Ok(None);
            }
            match self.want {
                None => self.want = Some(self.check_prelude()?),
                Some(_) => {
                    let message = decode_message(&self.buf);
                    self.buf.clear();
                    self.want = None;
                    return message.map(Some);
                }
            }
        }
    }

    /// Checks the 12-byte prelude in `buf`; the message's total length.
    fn check_prelude(&mut self) -> Result<usize, StreamFault> {
        let total = be_u32(&self.buf[0..4]) as usize;
        let headers = be_u32(&self.buf[4..8]) as usize;
        let crc = be_u32(&self.buf[8..12]);
        if crc32fast::hash(&self.buf[0..8]) != crc {
            return Err(malformed(
                "an event-stream prelude whose CRC does not match",
            ));
        }
        if total > self.max_message {
            return Err(StreamFault::TooLarge);
        }
        if total < MIN_MESSAGE || headers > total - MIN_MESSAGE {
            return Err(malformed(format!(
                "an event-stream message of {total} bytes with {headers} bytes of headers"
            )));
        }
        self.buf.reserve_exact(total - PRELUDE);
        Ok(total)
    }
}

fn be_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_be_bytes(a)
}

/// A whole message (prelude already checked): its CRC, headers and payload.
fn decode_message(m: &[u8]) -> Result<Message, StreamFault> {
    let total = m.len();
    let headers_len = be_u32(&m[4..8]) as usize;
    let crc = be_u32(&m[total - 4..]);
    if crc32fast::hash(&m[..total - 4]) != crc {
        return Err(malformed(
            "an event-stream message whose CRC does not match",
        ));
    }
    let headers = decode_headers(&m[PRELUDE..PRELUDE + headers_len])?;
    Ok(Message {
        headers,
        payload: m[PRELUDE + headers_len..total - 4].to_vec(),
    })
}

/// A bounded reader over the header section.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], StreamFault> {
        if self.0.len() < n {
            return Err(malformed("an event-stream header runs past its section"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], StreamFault> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
}

fn decode_headers(section: &[u8]) -> Result<Vec<(String, HeaderValue)>, StreamFault> {
    let mut r = Reader(section);
    let mut out = Vec::new();
    while !r.0.is_empty() {
        let [name_len] = r.array::<1>()?;
        let name = std::str::from_utf8(r.take(usize::from(name_len))?)
            .map_err(|_| malformed("an event-stream header name that is not UTF-8"))?
            .to_owned();
        let [kind] = r.array::<1>()?;
        let value = match kind {
            0 => HeaderValue::Bool(true),
            1 => HeaderValue::Bool(false),
            2 => HeaderValue::Byte(i8::from_be_bytes(r.array()?)),
            3 => HeaderValue::Short(i16::from_be_bytes(r.array()?)),
            4 => HeaderValue::Int(i32::from_be_bytes(r.array()?)),
            5 => HeaderValue::Long(i64::from_be_bytes(r.array()?)),
            6 | 7 => {
                let len = usize::from(u16::from_be_bytes(r.array()?));
                let bytes = r.take(len)?;
                if kind == 6 {
                    HeaderValue::Bytes(bytes.to_vec())
                } else {
                    HeaderValue::String(
                        std::str::from_utf8(bytes)
                            .map_err(|_| {
                                malformed("an event-stream string header that is not UTF-8")
                            })?
                            .to_owned(),
                    )
                }
            }
            8 => HeaderValue::Timestamp(i64::from_be_bytes(r.array()?)),
            9 => HeaderValue::Uuid(r.array()?),
            other => {
                return Err(malformed(format!(
                    "an event-stream header of unknown type {other}"
                )));
            }
        };
        out.push((name, value));
    }
    Ok(out)
}
