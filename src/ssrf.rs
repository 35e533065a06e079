//! SSRF guard for user-supplied upstream base URLs (provider keys' `base_url`).
//!
//! A user could otherwise point the gateway at the cloud metadata service, the database or any
//! other service on the gateway's own network and read the answer back through `/v1`. So a base
//! URL whose host is, or resolves to, a loopback, private, link-local, unique-local, CGNAT,
//! unspecified, multicast, documentation or otherwise non-public address is refused unless
//! `security.allow_private_base_urls` is set. The check runs when the URL is stored and again on
//! every upstream connect (`proxy::upstream::GuardedConnector`), literal or resolved, under the
//! setting the server runs with now. IPv6 forms that carry an IPv4 address (mapped, SIIT, NAT64,
//! 6to4) are judged by the IPv4 rules; Teredo and the rest of `::/8` are refused outright.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use url::{Host, Url};

use crate::error::ApiError;

/// How long a base URL's host name may take to resolve before it is refused.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BaseUrlError {
    #[error("base_url is not a valid URL: {0}")]
    Invalid(String),
    #[error("base_url must use http or https")]
    Scheme,
    #[error("base_url must not contain credentials, a query or a fragment")]
    Extras,
    #[error(
        "base_url points at a private, loopback or link-local address; the gateway refuses those (security.allow_private_base_urls)"
    )]
    Private,
    #[error("base_url host {0} could not be resolved")]
    Unresolvable(String),
}

impl From<BaseUrlError> for ApiError {
    fn from(e: BaseUrlError) -> Self {
        let code = match e {
            BaseUrlError::Private => "private_base_url",
            _ => "invalid_value",
        };
        ApiError::BadRequest {
            message: e.to_string(),
            code,
            param: Some("base_url".into()),
        }
    }
}

/// Parses and normalises an http(s) base URL (WHATWG parsing, so `http://2130706433/` is seen as
/// `127.0.0.1`, as a resolver would see it). Returns it without a trailing slash.
pub fn normalize(raw: &str) -> Result<Url, BaseUrlError> {
    let url = Url::parse(raw.trim()).map_err(|e| BaseUrlError::Invalid(e.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(BaseUrlError::Scheme);
    }
    if url.host().is_none() {
        return Err(BaseUrlError::Invalid("no host".into()));
    }
    if !url.username().is_empty()
        || url.password().is_some()
        || url.query().is_some()
        || url.fragment().is_some()
    {
        return Err(BaseUrlError::Extras);
    }
    Ok(url)
}

/// The form stored: the normalised URL without a trailing slash.
pub fn stored_form(url: &Url) -> String {
    url.as_str().trim_end_matches('/').to_owned()
}

/// Validates a user-supplied base URL and returns the form to store. Unless `allow_private`, the
/// host must be a public address, or a name all of whose addresses are public.
pub async fn check_base_url(raw: &str, allow_private: bool) -> Result<String, BaseUrlError> {
    let url = normalize(raw)?;
    if !allow_private {
        match url.host() {
            Some(Host::Ipv4(ip)) => refuse_if_forbidden(IpAddr::V4(ip))?,
            Some(Host::Ipv6(ip)) => refuse_if_forbidden(IpAddr::V6(ip))?,
            Some(Host::Domain(name)) => {
                let port = url.port_or_known_default().unwrap_or(443);
                let addrs = tokio::time::timeout(
                    RESOLVE_TIMEOUT,
                    tokio::net::lookup_host((name.to_owned(), port)),
                )
                .await
                .map_err(|_| BaseUrlError::Unresolvable(name.to_owned()))?
                .map_err(|_| BaseUrlError::Unresolvable(name.to_owned()))?;
                let mut any = false;
                for a in addrs {
                    any = true;
                    refuse_if_forbidden(a.ip())?;
                }
                if !any {
                    return Err(BaseUrlError::Unresolvable(name.to_owned()));
                }
            }
            None => return Err(BaseUrlError::Invalid("no host".into())),
        }
    }
    Ok(stored_form(&url))
}

fn refuse_if_forbidden(ip: IpAddr) -> Result<(), BaseUrlError> {
    if is_forbidden(ip) {
        Err(BaseUrlError::Private)
    } else {
        Ok(())
    }
}

/// Is this an address the gateway must not send a user's traffic to?
pub fn is_forbidden(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4_forbidden(v4),
        IpAddr::V6(v6) => v6_forbidden(v6),
    }
}

fn v4_forbidden(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    a == 0 // 0.0.0.0/8 "this network", incl. unspecified
        || ip.is_loopback() // 127/8
        || ip.is_private() // 10/8, 172.16/12, 192.168/16
        || ip.is_link_local() // 169.254/16 (cloud metadata)
        || (a == 100 && (b & 0xc0) == 64) // 100.64/10 CGNAT
        || (a == 192 && b == 0 && c == 0) // 192.0.0/24 IETF protocol assignments
        || ip.is_documentation() // 192.0.2/24, 198.51.100/24, 203.0.113/24
        || (a == 198 && (b & 0xfe) == 18) // 198.18/15 benchmarking
        || ip.is_multicast() // 224/4
        || a >= 240 // 240/4 reserved, 255.255.255.255 broadcast
}

fn v6_forbidden(ip: Ipv6Addr) -> bool {
    let s = ip.segments();
    // Addresses that carry an IPv4 address are judged by the IPv4 rules.
    if let Some(v4) = ip.to_ipv4_mapped() {
        return v4_forbidden(v4); // ::ffff:0:0/96 IPv4-mapped
    }
    if s[..6] == [0, 0, 0, 0, 0xffff, 0] {
        return v4_forbidden(embedded_v4(s[6], s[7])); // ::ffff:0:0:0/96 SIIT IPv4-translated
    }
    if s[0] == 0x64 && s[1] == 0xff9b {
        if s[2..6] == [0; 4] {
            // 64:ff9b::/96 NAT64: judge the IPv4 address inside.
            return v4_forbidden(embedded_v4(s[6], s[7]));
        }
        return true; // 64:ff9b:1::/48 local-use NAT64 and the rest of the block
    }
    if s[0] == 0x2002 {
        return v4_forbidden(embedded_v4(s[1], s[2])); // 6to4
    }
    s[0] < 0x0100 // ::/8 reserved: unspecified, loopback, IPv4-compatible, everything unassigned
        || ip.is_multicast() // ff00::/8
        || ip.is_unique_local() // fc00::/7
        || ip.is_unicast_link_local() // fe80::/10
        || (s[0] & 0xffc0) == 0xfec0 // fec0::/10 deprecated site-local
        || (s[0] == 0x2001 && s[1] == 0) // 2001::/32 Teredo (hides an IPv4 address)
        || (s[0] == 0x2001 && s[1] == 2 && s[2] == 0) // 2001:2::/48 benchmarking
        || (s[0] == 0x2001 && s[1] == 0x0db8) // 2001:db8::/32 documentation
        || (s[0] == 0x3fff && (s[1] & 0xf000) == 0) // 3fff::/20 documentation
        || s[0] == 0x5f00 // 5f00::/16 SRv6 SIDs, internal to an operator (RFC 9602)
        || (s[0] == 0x0100 && s[1..4] == [0; 3]) // 100::/64 discard-only
}

fn embedded_v4(hi: u16, lo: u16) -> Ipv4Addr {
    Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forbidden(s: &str) -> bool {
        is_forbidden(s.parse().expect("ip"))
    }

    #[test]
    fn classifies_ipv4() {
        for ip in [
            "0.0.0.0",
            "0.1.2.3",
            "127.0.0.1",
            "127.255.255.254",
            "10.0.0.1",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "100.127.255.255",
            "192.0.0.8",
            "192.0.2.1",
            "198.18.0.1",
            "198.19.255.255",
            "224.0.0.1",
            "240.0.0.1",
            "255.255.255.255",
        ] {
            assert!(forbidden(ip), "{ip} should be forbidden");
        }
        for ip in [
            "8.8.8.8",
            "1.1.1.1",
            "172.15.255.255",
            "172.32.0.1",
            "100.63.255.255",
            "100.128.0.1",
            "104.18.7.192",
            "198.20.0.1",
            "169.253.0.1",
        ] {
            assert!(!forbidden(ip), "{ip} should be allowed");
        }
    }

    #[test]
    fn classifies_ipv6() {
        for ip in [
            "::",
            "::1",
            "::127.0.0.1",
            "::ffff:127.0.0.1",
            "::ffff:10.1.2.3",
            "::ffff:169.254.169.254",
            "fd00::1",
            "fc00::1",
            "fe80::1",
            "febf::1",
            "fec0::1",
            "ff02::1",
            "64:ff9b::7f00:1",
            "64:ff9b:1::1",
            "2002:7f00:1::1",
            "2001::1",
            "2001:db8::1",
            "100::1",
            // SIIT (IPv4-translated) and other ::/8 forms of private IPv4 addresses.
            "::ffff:0:7f00:1",
            "::ffff:0:a00:1",
            "::ffff:0:a9fe:a9fe",
            "::ffff:0:0:0",
            "::ffff:0:6440:1",
            "::1:7f00:1",
            "64:ff9b::a9fe:a9fe",
            "64:ff9b::6440:1",
            "2002:a00:1::1",
            "2002:0:1::1",
            "2001:0:4136:e378::1",
            "2001:2::1",
            "3fff::1",
        ] {
            assert!(forbidden(ip), "{ip} should be forbidden");
        }
        for ip in [
            "2606:4700:4700::1111",
            "2a00:1450:4001:80b::200e",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:808:808::1",
            "::ffff:0:808:808",
            "2001:4860:4860::8888",
        ] {
            assert!(!forbidden(ip), "{ip} should be allowed");
        }
    }

    #[test]
    fn normalises_and_rejects_shapes() {
        let u = normalize("https://API.example.com/v1/").expect("ok");
        assert_eq!(stored_form(&u), "https://api.example.com/v1");
        assert_eq!(normalize("ftp://x.com").unwrap_err(), BaseUrlError::Scheme);
        assert_eq!(
            normalize("file:///etc/passwd").unwrap_err(),
            BaseUrlError::Scheme
        );
        assert_eq!(
            normalize("http://u:p@x.com").unwrap_err(),
            BaseUrlError::Extras
        );
        assert_eq!(
            normalize("http://x.com?a=1").unwrap_err(),
            BaseUrlError::Extras
        );
        assert!(matches!(
            normalize("not a url"),
            Err(BaseUrlError::Invalid(_))
        ));
        // Numeric and short forms are normalised the way resolvers read them.
        let u = normalize("http://2130706433/").expect("ok");
        assert_eq!(u.host(), Some(Host::Ipv4(Ipv4Addr::LOCALHOST)));
        let u = normalize("http://0x7f.1/").expect("ok");
        assert_eq!(u.host(), Some(Host::Ipv4(Ipv4Addr::LOCALHOST)));
    }

    #[tokio::test]
    async fn checks_literals_and_names() {
        assert_eq!(
            check_base_url("http://127.0.0.1:8080/v1", false).await,
            Err(BaseUrlError::Private)
        );
        assert_eq!(
            check_base_url("http://2130706433/", false).await,
            Err(BaseUrlError::Private)
        );
        assert_eq!(
            check_base_url("http://[::ffff:a00:1]/", false).await,
            Err(BaseUrlError::Private)
        );
        assert_eq!(
            check_base_url("http://localhost:9/", false).await,
            Err(BaseUrlError::Private)
        );
        assert_eq!(
            check_base_url("https://8.8.8.8/v1/", false).await,
            Ok("https://8.8.8.8/v1".to_owned())
        );
        assert_eq!(
            check_base_url("http://localhost:9/v1", true).await,
            Ok("http://localhost:9/v1".to_owned())
        );
    }
}
