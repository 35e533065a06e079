//! Reference readings the targets are compared with, written the straightforward way: serde_json
//! for JSON (last-wins, as the upstreams read it), the SSE rules line by line, and the IANA
//! special-purpose address registries as tables.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

// ----------------------------------------------------------------------------------------------
// JSON

struct Ordered<'a>(Vec<(String, &'a RawValue)>);

impl<'de> de::Deserialize<'de> for Ordered<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Ordered<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some(k) = map.next_key::<String>()? {
                    out.push((k, map.next_value::<&'de RawValue>()?));
                }
                Ok(Ordered(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// The members of the JSON object `text` holds, in order, keys decoded, values as written;
/// `None` when serde_json does not read `text` as one object.
pub fn members(text: &[u8]) -> Option<Vec<(String, &RawValue)>> {
    serde_json::from_slice::<Ordered<'_>>(text)
        .ok()
        .map(|o| o.0)
}

/// The value a last-wins reader (every upstream's JSON parser) sees for `key`.
pub fn last<'a>(members: &[(String, &'a RawValue)], key: &str) -> Option<&'a RawValue> {
    members
        .iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| *v)
}

pub fn count(members: &[(String, &RawValue)], key: &str) -> usize {
    members.iter().filter(|(k, _)| k == key).count()
}

pub fn value(raw: &RawValue) -> Option<serde_json::Value> {
    serde_json::from_str(raw.get()).ok()
}

/// The usage an OpenAI event or body reports, read as the gateway defines it (`prompt` includes
/// `cached`; negative counts are 0; `cached` at most `prompt`), from the last `usage` member.
/// `None` when absent, `null` or not a usage object (a repeated field makes it unreadable).
pub fn usage(data: &[u8]) -> Option<(i64, i64, i64, i64)> {
    let ms = members(data)?;
    let u = members(last(&ms, "usage")?.get().as_bytes())?;
    let int = |raw: Option<&RawValue>| -> Result<i64, ()> {
        raw.map_or(Ok(0), |r| {
            serde_json::from_str::<i64>(r.get()).map_err(|_| ())
        })
    };
    let prompt = int(field(&u, "prompt_tokens").ok()?).ok()?;
    let completion = int(field(&u, "completion_tokens").ok()?).ok()?;
    let cached = match field(&u, "prompt_tokens_details").ok()? {
        None => 0,
        Some(r) if r.get() == "null" => 0,
        Some(r) => {
            let d = members(r.get().as_bytes())?;
            match field(&d, "cached_tokens").ok()? {
                None => 0,
                Some(c) if c.get() == "null" => 0,
                Some(c) => serde_json::from_str::<i64>(c.get()).ok()?,
            }
        }
    };
    let reasoning = match field(&u, "completion_tokens_details").ok()? {
        None => 0,
        Some(r) if r.get() == "null" => 0,
        Some(r) => {
            let d = members(r.get().as_bytes())?;
            match field(&d, "reasoning_tokens").ok()? {
                None => 0,
                Some(c) if c.get() == "null" => 0,
                Some(c) => serde_json::from_str::<i64>(c.get()).ok()?,
            }
        }
    };
    let prompt = prompt.max(0);
    let completion = completion.max(0);
    Some((
        prompt,
        completion,
        cached.clamp(0, prompt),
        reasoning.clamp(0, completion),
    ))
}

/// A field: absent (None), once (its value) or repeated (unreadable: Err).
fn field<'a>(ms: &[(String, &'a RawValue)], name: &str) -> Result<Option<&'a RawValue>, ()> {
    match count(ms, name) {
        0 => Ok(None),
        1 => Ok(last(ms, name)),
        _ => Err(()),
    }
}

// ----------------------------------------------------------------------------------------------
// SSE (the HTML living standard's event stream, as far as the gateway reads it)

/// The stream cut into events: each ends after its first empty line (`\r\n`, `\n` or `\r`
/// ends a line); what follows the last such line is one more event. With each event its `data`:
/// the values of its `data:` lines (one leading space dropped) joined with `\n`.
pub fn sse_events(input: &[u8]) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
    let mut out = Vec::new();
    let mut event_start = 0;
    let mut line_start = 0;
    let mut i = 0;
    while i < input.len() {
        let term = match input[i] {
            b'\n' => 1,
            b'\r' if input.get(i + 1) == Some(&b'\n') => 2,
            b'\r' => 1,
            _ => {
                i += 1;
                continue;
            }
        };
        let empty = i == line_start;
        i += term;
        line_start = i;
        if empty {
            out.push(input[event_start..i].to_vec());
            event_start = i;
        }
    }
    if event_start < input.len() {
        out.push(input[event_start..].to_vec());
    }
    out.into_iter()
        .map(|raw| {
            let data = sse_data(&raw);
            (raw, data)
        })
        .collect()
}

fn sse_data(raw: &[u8]) -> Option<Vec<u8>> {
    let mut lines: Vec<&[u8]> = Vec::new();
    let mut rest = raw;
    while !rest.is_empty() {
        let end = rest
            .iter()
            .position(|&c| c == b'\n' || c == b'\r')
            .unwrap_or(rest.len());
        lines.push(&rest[..end]);
        let term = match (rest.get(end), rest.get(end + 1)) {
            (Some(b'\r'), Some(b'\n')) => 2,
            (Some(_), _) => 1,
            (None, _) => 0,
        };
        rest = &rest[end + term..];
    }
    let values: Vec<&[u8]> = lines
        .into_iter()
        .filter_map(|l| l.strip_prefix(b"data:"))
        .map(|v| v.strip_prefix(b" ").unwrap_or(v))
        .collect();
    (!values.is_empty()).then(|| values.join(&b'\n'))
}

// ----------------------------------------------------------------------------------------------
// SSRF: the IANA IPv4 and IPv6 Special-Purpose Address Registries (RFC 6890 and updates)

/// What the gateway must do with an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Not globally reachable, or an embedding of such an IPv4 address: must be refused.
    Forbidden(&'static str),
    /// A global unicast address: must be allowed.
    Public,
    /// Globally reachable but special (anycast services, deprecated ranges): either is defensible.
    Either(&'static str),
}

fn v4net(s: &str) -> Ipv4Net {
    s.parse().expect("IPv4 network")
}

fn v6net(s: &str) -> Ipv6Net {
    s.parse().expect("IPv6 network")
}

/// The IPv4 rule: the most specific entry of the table that holds `ip`, else public.
pub fn v4_verdict(ip: Ipv4Addr) -> Verdict {
    use Verdict::*;
    // Std's predicates first, where std has them.
    if ip.is_unspecified() || ip.is_broadcast() {
        return Forbidden("unspecified or broadcast");
    }
    if ip.is_loopback() {
        return Forbidden("127.0.0.0/8 loopback");
    }
    if ip.is_private() {
        return Forbidden("RFC 1918 private");
    }
    if ip.is_link_local() {
        return Forbidden("169.254.0.0/16 link-local");
    }
    if ip.is_documentation() {
        return Forbidden("documentation (TEST-NET-1/2/3)");
    }
    if ip.is_multicast() {
        return Forbidden("224.0.0.0/4 multicast");
    }
    // The registry's other entries (most specific first).
    let table: [(&str, Verdict); 11] = [
        (
            "192.0.0.9/32",
            Either("192.0.0.9 PCP anycast (globally reachable)"),
        ),
        (
            "192.0.0.10/32",
            Either("192.0.0.10 TURN anycast (globally reachable)"),
        ),
        (
            "192.0.0.0/24",
            Forbidden("192.0.0.0/24 IETF protocol assignments"),
        ),
        ("192.31.196.0/24", Public), // AS112-v4, globally reachable
        ("192.52.193.0/24", Public), // AMT, globally reachable
        ("192.175.48.0/24", Public), // AS112 direct delegation, globally reachable
        (
            "192.88.99.0/24",
            Either("192.88.99.0/24 deprecated 6to4 relay anycast"),
        ),
        ("0.0.0.0/8", Forbidden("0.0.0.0/8 this network")),
        (
            "100.64.0.0/10",
            Forbidden("100.64.0.0/10 shared address space (CGNAT)"),
        ),
        ("198.18.0.0/15", Forbidden("198.18.0.0/15 benchmarking")),
        ("240.0.0.0/4", Forbidden("240.0.0.0/4 reserved")),
    ];
    table
        .iter()
        .find(|(net, _)| v4net(net).contains(&ip))
        .map_or(Public, |(_, v)| *v)
}

fn embedded(hi: u16, lo: u16) -> Ipv4Addr {
    Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo))
}

/// An embedding of an IPv4 address: forbidden with it; otherwise `public` says what it is.
fn judge_embedded(v4: Ipv4Addr, what: &'static str, public: Verdict) -> Verdict {
    match v4_verdict(v4) {
        Verdict::Forbidden(_) => Verdict::Forbidden(what),
        Verdict::Either(why) => Verdict::Either(why),
        _ => public,
    }
}

/// The IPv6 rule, IPv4 embeddings judged by the IPv4 rule.
pub fn v6_verdict(ip: Ipv6Addr) -> Verdict {
    use Verdict::*;
    let s = ip.segments();
    if ip.is_unspecified() {
        return Forbidden("::/128 unspecified");
    }
    if ip.is_loopback() {
        return Forbidden("::1/128 loopback");
    }
    if let Some(v4) = ip.to_ipv4_mapped() {
        // ::ffff:0:0/96 IPv4-mapped: the IPv4 address itself.
        return v4_verdict(v4);
    }
    if v6net("::ffff:0:0:0/96").contains(&ip) {
        // SIIT IPv4-translated (RFC 6145, `::ffff:0:a.b.c.d`): a translator sends it to the IPv4
        // address. Refusing the whole range is as defensible as judging the address inside.
        return judge_embedded(
            embedded(s[6], s[7]),
            "::ffff:0:0:0/96 SIIT embedding a forbidden IPv4 address",
            Either("::ffff:0:0:0/96 SIIT"),
        );
    }
    if v6net("::/96").contains(&ip) {
        // Deprecated IPv4-compatible addresses (RFC 4291).
        return judge_embedded(
            embedded(s[6], s[7]),
            "::/96 IPv4-compatible embedding a forbidden IPv4 address",
            Either("::/96 deprecated IPv4-compatible"),
        );
    }
    if v6net("64:ff9b::/96").contains(&ip) {
        // NAT64 well-known prefix (RFC 6052): the translator connects to the address inside.
        return v4_verdict(embedded(s[6], s[7]));
    }
    if v6net("2002::/16").contains(&ip) {
        // 6to4 (RFC 3056): the relay connects to the address in bits 16..48.
        return judge_embedded(
            embedded(s[1], s[2]),
            "2002::/16 6to4 embedding a forbidden IPv4 address",
            Public,
        );
    }
    if ip.is_multicast() {
        return Forbidden("ff00::/8 multicast");
    }
    if ip.is_unique_local() {
        return Forbidden("fc00::/7 unique local");
    }
    if ip.is_unicast_link_local() {
        return Forbidden("fe80::/10 link-local");
    }
    let table: [(&str, Verdict); 17] = [
        (
            "64:ff9b:1::/48",
            Forbidden("64:ff9b:1::/48 local-use NAT64"),
        ),
        ("100::/64", Forbidden("100::/64 discard-only")),
        ("2001:1::1/128", Either("2001:1::1 PCP anycast")),
        ("2001:1::2/128", Either("2001:1::2 TURN anycast")),
        ("2001:1::3/128", Either("2001:1::3 DNS-SD SRP anycast")),
        ("2001:3::/32", Either("2001:3::/32 AMT")),
        ("2001:4:112::/48", Either("2001:4:112::/48 AS112-v6")),
        ("2001:10::/28", Either("2001:10::/28 deprecated ORCHID")),
        ("2001:20::/28", Either("2001:20::/28 ORCHIDv2")),
        ("2001:30::/28", Either("2001:30::/28 DRIP DETs")),
        (
            "2001::/32",
            Forbidden("2001::/32 Teredo (hides IPv4 addresses)"),
        ),
        ("2001:2::/48", Forbidden("2001:2::/48 benchmarking")),
        // The rest of the IETF protocol assignments block: unassigned, routed nowhere.
        (
            "2001::/23",
            Either("2001::/23 unassigned IETF protocol assignments"),
        ),
        ("2001:db8::/32", Forbidden("2001:db8::/32 documentation")),
        ("3fff::/20", Forbidden("3fff::/20 documentation (RFC 9637)")),
        (
            "5f00::/16",
            Forbidden("5f00::/16 SRv6 SIDs, internal to an operator (RFC 9602)"),
        ),
        ("fec0::/10", Forbidden("fec0::/10 deprecated site-local")),
    ];
    if let Some((_, v)) = table.iter().find(|(net, _)| v6net(net).contains(&ip)) {
        return *v;
    }
    if v6net("2000::/3").contains(&ip) {
        Public
    } else {
        // Outside global unicast: reserved by the IETF, routed nowhere (refusing is as good).
        Either("outside 2000::/3, reserved")
    }
}

pub fn verdict(ip: IpAddr) -> Verdict {
    match ip {
        IpAddr::V4(v4) => v4_verdict(v4),
        IpAddr::V6(v6) => v6_verdict(v6),
    }
}
