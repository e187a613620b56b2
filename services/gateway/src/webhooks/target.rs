//! Where webhooks may deliver: the target policy.
//!
//! A webhook makes the gateway send requests on a caller's behalf, from inside the
//! network it runs in; without limits a caller could aim deliveries at the cloud metadata
//! address, a database's admin port or anything else only the gateway reaches. So:
//!
//! - a target is `https://`, unless it is allowlisted (`gateway.webhooks.allow`): its host
//!   name is listed, or its host is an IP address inside a listed network;
//! - a target's address must be public — not loopback, private, link-local, unique-local,
//!   shared (CGNAT), multicast, reserved, documentation or benchmarking space, nor an IPv6
//!   address that stands for such an IPv4 one — unless it lies in a listed network or the
//!   URL's host name is listed;
//! - the URL carries no user name or password.
//!
//! [`Policy::target`] checks a URL's form and an IP-literal host; [`Policy::resolve`]
//! resolves a host name and keeps only the addresses allowed. Both run at registration
//! ([`Policy::check_registration`], which refuses a name resolving to any address not
//! allowed) and again before every connection a delivery opens (the connector in
//! [`super::outbound`]), so a name that resolves elsewhere after it was registered (DNS
//! rebinding) still reaches no address that is not allowed.

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

const fn v4(a: u8, b: u8, c: u8, d: u8, len: u8) -> Ipv4Net {
    Ipv4Net::new_assert(Ipv4Addr::new(a, b, c, d), len)
}

const fn v6(s: [u16; 8], len: u8) -> Ipv6Net {
    Ipv6Net::new_assert(
        Ipv6Addr::new(s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]),
        len,
    )
}

/// IPv4 space that is not public (IANA's special-purpose registry), first match wins.
const V4_NOT_PUBLIC: &[(Ipv4Net, &str)] = &[
    (v4(0, 0, 0, 0, 8), "\"this network\" (0.0.0.0/8)"),
    (v4(10, 0, 0, 0, 8), "private"),
    (v4(100, 64, 0, 0, 10), "shared (carrier-grade NAT)"),
    (v4(127, 0, 0, 0, 8), "loopback"),
    (v4(169, 254, 0, 0, 16), "link-local"),
    (v4(172, 16, 0, 0, 12), "private"),
    (v4(192, 0, 0, 0, 24), "IETF protocol assignment"),
    (v4(192, 0, 2, 0, 24), "documentation"),
    (v4(192, 88, 99, 0, 24), "reserved (6to4 relay anycast)"),
    (v4(192, 168, 0, 0, 16), "private"),
    (v4(198, 18, 0, 0, 15), "benchmarking"),
    (v4(198, 51, 100, 0, 24), "documentation"),
    (v4(203, 0, 113, 0, 24), "documentation"),
    (v4(224, 0, 0, 0, 4), "multicast"),
    (v4(255, 255, 255, 255, 32), "broadcast"),
    (v4(240, 0, 0, 0, 4), "reserved"),
];

/// IPv6 space that is not public, first match wins (after the forms that embed an IPv4
/// address are judged by that address).
const V6_NOT_PUBLIC: &[(Ipv6Net, &str)] = &[
    (v6([0, 0, 0, 0, 0, 0, 0, 0], 128), "unspecified"),
    (v6([0, 0, 0, 0, 0, 0, 0, 1], 128), "loopback"),
    (
        v6([0, 0, 0, 0, 0, 0, 0, 0], 96),
        "IPv4-compatible (deprecated)",
    ),
    (v6([0x64, 0xff9b, 1, 0, 0, 0, 0, 0], 48), "local-use NAT64"),
    (v6([0x100, 0, 0, 0, 0, 0, 0, 0], 64), "discard-only"),
    (v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0], 32), "documentation"),
    (
        v6([0x2001, 0, 0, 0, 0, 0, 0, 0], 23),
        "IETF protocol assignment",
    ),
    (v6([0x3fff, 0, 0, 0, 0, 0, 0, 0], 20), "documentation"),
    (v6([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7), "unique-local"),
    (v6([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10), "link-local"),
    (
        v6([0xfec0, 0, 0, 0, 0, 0, 0, 0], 10),
        "site-local (deprecated)",
    ),
    (v6([0xff00, 0, 0, 0, 0, 0, 0, 0], 8), "multicast"),
];

/// Global unicast: every public IPv6 address is in it.
const V6_GLOBAL_UNICAST: Ipv6Net = v6([0x2000, 0, 0, 0, 0, 0, 0, 0], 3);
/// NAT64's well-known prefix: the last 32 bits are the IPv4 address reached.
const V6_NAT64: Ipv6Net = v6([0x64, 0xff9b, 0, 0, 0, 0, 0, 0], 96);
/// 6to4: bits 16..48 are the IPv4 address of the site's relay.
const V6_6TO4: Ipv6Net = v6([0x2002, 0, 0, 0, 0, 0, 0, 0], 16);

/// What kind of address `ip` is if it is not public (not a unicast address reachable on
/// the internet at large), `None` if it is.
pub(crate) fn not_public(ip: IpAddr) -> Option<&'static str> {
    match ip.to_canonical() {
        IpAddr::V4(ip) => v4_not_public(ip),
        IpAddr::V6(ip) => v6_not_public(ip),
    }
}

fn v4_not_public(ip: Ipv4Addr) -> Option<&'static str> {
    V4_NOT_PUBLIC
        .iter()
        .find(|(net, _)| net.contains(&ip))
        .map(|(_, kind)| *kind)
}

fn v6_not_public(ip: Ipv6Addr) -> Option<&'static str> {
    let s = ip.segments();
    if V6_NAT64.contains(&ip) {
        return v4_not_public(Ipv4Addr::from((u32::from(s[6]) << 16) | u32::from(s[7])));
    }
    if V6_6TO4.contains(&ip) {
        return v4_not_public(Ipv4Addr::from((u32::from(s[1]) << 16) | u32::from(s[2])));
    }
    if let Some((_, kind)) = V6_NOT_PUBLIC.iter().find(|(net, _)| net.contains(&ip)) {
        return Some(kind);
    }
    (!V6_GLOBAL_UNICAST.contains(&ip)).then_some("reserved")
}

/// One entry of `gateway.webhooks.allow`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Allowed {
    /// An IP network (a bare address is one address).
    Network(IpNet),
    /// A host name, lower case, without a trailing dot.
    Name(String),
}

impl Allowed {
    /// Parses an entry: an IP network in CIDR form (`10.1.0.0/16`, `::1/128`), an IP
    /// address (one address), or a host name (`receiver.internal`).
    pub(crate) fn parse(entry: &str) -> Result<Allowed, String> {
        let entry = entry.trim();
        if let Ok(net) = entry.parse::<IpNet>() {
            return Ok(Allowed::Network(net.trunc()));
        }
        if let Ok(ip) = entry.parse::<IpAddr>() {
            return Ok(Allowed::Network(IpNet::from(ip)));
        }
        let name = normalize_name(entry);
        if is_host_name(&name) {
            return Ok(Allowed::Name(name));
        }
        Err(format!(
            "{entry:?} is neither an IP network (\"10.1.0.0/16\", \"127.0.0.1\") nor a host name (\"receiver.internal\")"
        ))
    }
}

fn normalize_name(name: &str) -> String {
    name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase()
}

/// A DNS host name: labels of 1-63 letters, digits and hyphens (not at either end),
/// at most 253 bytes, not all digits and dots (that would be an IP address).
fn is_host_name(name: &str) -> bool {
    name.len() <= 253
        && !name.chars().all(|c| c.is_ascii_digit() || c == '.')
        && name.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

/// Where a webhook URL points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Target {
    /// `https://` (else `http://`).
    pub(crate) https: bool,
    /// The host.
    pub(crate) host: Host,
    /// The port (the scheme's when the URL has none).
    pub(crate) port: u16,
}

/// A URL's host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Host {
    /// An IP address written in the URL.
    Ip(IpAddr),
    /// A name to resolve, lower case, without a trailing dot.
    Name(String),
}

/// Why a webhook target is refused: the message says what, never which addresses a
/// name resolved to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Refusal {
    /// The URL is not one a webhook may have.
    #[error("{0}")]
    Url(String),
    /// `http://` to a target that is not allowlisted.
    #[error("http:// is allowed only to targets listed in gateway.webhooks.allow: use https://")]
    PlainHttp,
    /// The target's address is not public and not allowlisted.
    #[error("{0}")]
    Address(String),
}

/// How a delivery whose URL the policy refuses shows in the webhook's status.
pub(crate) const URL_REFUSED: &str = "url refused";
/// How a delivery over `http://` to a target not allowlisted shows in the status.
pub(crate) const PLAIN_HTTP_REFUSED: &str = "plain http refused";
/// How a delivery to an address that is not allowed shows in the status.
pub(crate) const ADDRESS_REFUSED: &str = "address refused";

impl Refusal {
    /// How a delivery refused this way shows in the webhook's status.
    pub(crate) fn class(&self) -> &'static str {
        match self {
            Refusal::Url(_) => URL_REFUSED,
            Refusal::PlainHttp => PLAIN_HTTP_REFUSED,
            Refusal::Address(_) => ADDRESS_REFUSED,
        }
    }
}

/// How long a registration waits for its host name to resolve before it takes the URL
/// anyway (deliveries check the addresses again).
const REGISTRATION_LOOKUP_PATIENCE: Duration = Duration::from_secs(5);

/// The target policy: the allowlist and the rules above.
#[derive(Debug, Clone, Default)]
pub(crate) struct Policy {
    networks: Vec<IpNet>,
    names: Vec<String>,
}

impl Policy {
    /// The policy for `gateway.webhooks.allow`; the error names the entry that does not
    /// parse.
    pub(crate) fn new(allow: &[String]) -> Result<Policy, String> {
        let mut policy = Policy::default();
        for (i, entry) in allow.iter().enumerate() {
            match Allowed::parse(entry).map_err(|e| format!("allow[{i}]: {e}"))? {
                Allowed::Network(net) => policy.networks.push(net),
                Allowed::Name(name) => policy.names.push(name),
            }
        }
        Ok(policy)
    }

    fn lists_ip(&self, ip: IpAddr) -> bool {
        let canonical = ip.to_canonical();
        self.networks
            .iter()
            .any(|net| net.contains(&ip) || net.contains(&canonical))
    }

    fn lists_name(&self, name: &str) -> bool {
        self.names.iter().any(|listed| listed == name)
    }

    /// Whether deliveries may go to `ip`: it is public or in a listed network.
    pub(crate) fn allows_ip(&self, ip: IpAddr) -> bool {
        not_public(ip).is_none() || self.lists_ip(ip)
    }

    /// Whether `target` is allowlisted (which lets it use `http://`): its host name is
    /// listed, or its host is an IP address in a listed network.
    fn lists(&self, host: &Host) -> bool {
        match host {
            Host::Ip(ip) => self.lists_ip(*ip),
            Host::Name(name) => self.lists_name(name),
        }
    }

    /// The target of `url` if its form is allowed: `http` or `https`, no user name or
    /// password, a host that is a name or an allowed IP address, and `http` only to an
    /// allowlisted target.
    pub(crate) fn target(&self, url: &str) -> Result<Target, Refusal> {
        let uri = url
            .parse::<http::Uri>()
            .map_err(|e| Refusal::Url(format!("{url:?} does not parse: {e}")))?;
        self.target_of(&uri)
    }

    /// [`Policy::target`] of a parsed URL.
    pub(crate) fn target_of(&self, uri: &http::Uri) -> Result<Target, Refusal> {
        let https = match uri.scheme_str() {
            Some(scheme) if scheme.eq_ignore_ascii_case("https") => true,
            Some(scheme) if scheme.eq_ignore_ascii_case("http") => false,
            _ => {
                return Err(Refusal::Url(
                    "must be an https:// URL (http:// only to targets in gateway.webhooks.allow)"
                        .into(),
                ));
            }
        };
        let authority = uri
            .authority()
            .ok_or_else(|| Refusal::Url("has no host".into()))?;
        if authority.as_str().contains('@') {
            return Err(Refusal::Url(
                "must not carry a user name or password (the signature authenticates deliveries)"
                    .into(),
            ));
        }
        let host = authority.host();
        let host = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            Some(v6) => {
                Host::Ip(IpAddr::V6(v6.parse().map_err(|_| {
                    Refusal::Url(format!("host {host} is not an IPv6 address"))
                })?))
            }
            None => match host.parse::<Ipv4Addr>() {
                Ok(ip) => Host::Ip(IpAddr::V4(ip)),
                Err(_) if host.is_empty() => return Err(Refusal::Url("has no host".into())),
                Err(_) => Host::Name(normalize_name(host)),
            },
        };
        if let Host::Ip(ip) = host
            && let Some(kind) = not_public(ip)
            && !self.lists_ip(ip)
        {
            return Err(Refusal::Address(format!(
                "{ip} is a {kind} address, which webhooks may target only if gateway.webhooks.allow lists it"
            )));
        }
        if !https && !self.lists(&host) {
            return Err(Refusal::PlainHttp);
        }
        let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
        Ok(Target { https, host, port })
    }

    /// Of the addresses `name` resolved to, those a delivery may connect to: all of them
    /// if the name is listed, else those [`Policy::allows_ip`].
    pub(crate) fn keep(
        &self,
        name: &str,
        resolved: impl IntoIterator<Item = SocketAddr>,
    ) -> Vec<SocketAddr> {
        let listed = self.lists_name(name);
        resolved
            .into_iter()
            .filter(|addr| listed || self.allows_ip(addr.ip()))
            .collect()
    }

    /// The addresses a delivery to `target` may connect to, resolved now. An error if the
    /// name does not resolve, or resolves to no address that is allowed (which the error
    /// lists, for the log).
    pub(crate) async fn resolve(&self, target: &Target) -> Result<Vec<SocketAddr>, Unreachable> {
        let name = match &target.host {
            Host::Ip(ip) => return Ok(vec![SocketAddr::new(*ip, target.port)]),
            Host::Name(name) => name,
        };
        let resolved: Vec<SocketAddr> = tokio::net::lookup_host((name.as_str(), target.port))
            .await
            .map_err(Unreachable::Lookup)?
            .collect();
        let kept = self.keep(name, resolved.iter().copied());
        if kept.is_empty() {
            return Err(Unreachable::Refused {
                name: name.clone(),
                resolved: resolved.iter().map(SocketAddr::ip).collect(),
            });
        }
        Ok(kept)
    }

    /// Whether a webhook may be registered for `url`: [`Policy::target`], and a host name
    /// that is not listed must not resolve to any address that is not allowed (one that
    /// does not resolve now is taken: deliveries check again).
    pub(crate) async fn check_registration(&self, url: &str) -> Result<(), Refusal> {
        let target = self.target(url)?;
        let Host::Name(name) = &target.host else {
            return Ok(());
        };
        if self.lists_name(name) {
            return Ok(());
        }
        let lookup = tokio::net::lookup_host((name.as_str(), target.port));
        let Ok(Ok(resolved)) = tokio::time::timeout(REGISTRATION_LOOKUP_PATIENCE, lookup).await
        else {
            return Ok(());
        };
        for addr in resolved {
            if let Some(kind) = not_public(addr.ip())
                && !self.lists_ip(addr.ip())
            {
                return Err(Refusal::Address(format!(
                    "{name} resolves to a {kind} address, which webhooks may target only if gateway.webhooks.allow lists it"
                )));
            }
        }
        Ok(())
    }
}

/// Why a delivery found no address to connect to.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Unreachable {
    /// The name did not resolve.
    #[error("lookup: {0}")]
    Lookup(std::io::Error),
    /// Every address the name resolved to is refused.
    #[error("{name} resolves to no allowed address (only to {resolved:?})")]
    Refused {
        /// The name.
        name: String,
        /// What it resolved to.
        resolved: Vec<IpAddr>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn policy(allow: &[&str]) -> Policy {
        Policy::new(&allow.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn internal_addresses_are_not_public() {
        for (addr, kind) in [
            ("169.254.169.254", "link-local"),
            ("10.0.0.1", "private"),
            ("172.16.0.1", "private"),
            ("172.31.255.254", "private"),
            ("192.168.1.1", "private"),
            ("127.0.0.1", "loopback"),
            ("127.1.2.3", "loopback"),
            ("100.64.0.1", "shared (carrier-grade NAT)"),
            ("0.0.0.0", "\"this network\" (0.0.0.0/8)"),
            ("224.0.0.1", "multicast"),
            ("255.255.255.255", "broadcast"),
            ("240.0.0.1", "reserved"),
            ("192.0.2.7", "documentation"),
            ("198.18.0.1", "benchmarking"),
            ("::1", "loopback"),
            ("::", "unspecified"),
            ("fd00::1", "unique-local"),
            ("fc00::1", "unique-local"),
            ("fe80::1", "link-local"),
            ("ff02::1", "multicast"),
            ("2001:db8::1", "documentation"),
            // IPv6 forms that reach an IPv4 address are judged by it.
            ("::ffff:127.0.0.1", "loopback"),
            ("::ffff:169.254.169.254", "link-local"),
            ("64:ff9b::a9fe:a9fe", "link-local"),
            ("2002:0a00:0001::1", "private"),
            ("::127.0.0.1", "IPv4-compatible (deprecated)"),
            ("fec0::1", "site-local (deprecated)"),
            ("4000::1", "reserved"),
        ] {
            assert_eq!(not_public(ip(addr)), Some(kind), "{addr}");
        }
    }

    #[test]
    fn internet_addresses_are_public() {
        for addr in [
            "8.8.8.8",
            "1.1.1.1",
            "172.32.0.1",
            "100.128.0.1",
            "2001:4860:4860::8888",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:0808:0808::1",
        ] {
            assert_eq!(not_public(ip(addr)), None, "{addr}");
        }
    }

    #[test]
    fn allowlisted_networks_let_internal_addresses_through() {
        let none = policy(&[]);
        let some = policy(&["127.0.0.0/8", "10.1.0.0/16", "fd00::1", "169.254.169.253"]);
        for (addr, allowed) in [
            ("127.0.0.1", true),
            ("::ffff:127.0.0.1", true),
            ("10.1.200.3", true),
            ("10.2.0.1", false),
            ("fd00::1", true),
            ("fd00::2", false),
            ("169.254.169.254", false),
            ("8.8.8.8", true),
        ] {
            assert!(!none.allows_ip(ip(addr)) || addr == "8.8.8.8", "{addr}");
            assert_eq!(some.allows_ip(ip(addr)), allowed, "{addr}");
        }
    }

    #[test]
    fn allowlist_entries_are_networks_addresses_or_names() {
        assert_eq!(
            Allowed::parse("10.1.2.3/16"),
            Ok(Allowed::Network("10.1.0.0/16".parse().unwrap()))
        );
        assert_eq!(
            Allowed::parse("::1"),
            Ok(Allowed::Network("::1/128".parse().unwrap()))
        );
        assert_eq!(
            Allowed::parse("Receiver.Internal."),
            Ok(Allowed::Name("receiver.internal".into()))
        );
        for bad in [
            "10.0.0.0/33",
            "*.example.com",
            "",
            "a..b",
            "-x.example",
            "10.0.0",
        ] {
            assert!(Allowed::parse(bad).is_err(), "{bad:?}");
        }
        let error = Policy::new(&["127.0.0.1/8".into(), "http://x".into()]).unwrap_err();
        assert!(error.starts_with("allow[1]:"), "{error}");
    }

    #[test]
    fn targets_are_https_to_public_addresses_unless_allowlisted() {
        let none = policy(&[]);
        let refused = |policy: &Policy, url: &str| policy.target(url).unwrap_err();
        for url in [
            "https://169.254.169.254/latest/meta-data",
            "https://10.0.0.1/hook",
            "https://[fd00::1]:8443/hook",
            "https://[::ffff:127.0.0.1]/hook",
            "https://0.0.0.0/hook",
            "http://127.0.0.1:9000/hook",
        ] {
            assert!(
                matches!(refused(&none, url), Refusal::Address(_)),
                "{url}: {:?}",
                none.target(url)
            );
        }
        assert_eq!(refused(&none, "http://8.8.8.8/hook"), Refusal::PlainHttp);
        assert_eq!(
            refused(&none, "http://receiver.example/"),
            Refusal::PlainHttp
        );
        for url in [
            "ftp://example.com/",
            "/hook",
            "https://user:pw@example.com/",
        ] {
            assert!(matches!(refused(&none, url), Refusal::Url(_)), "{url}");
        }
        assert_eq!(
            none.target("https://8.8.8.8/hook").unwrap(),
            Target {
                https: true,
                host: Host::Ip(ip("8.8.8.8")),
                port: 443
            }
        );
        assert_eq!(
            none.target("HTTPS://Receiver.Example.:8443/x").unwrap(),
            Target {
                https: true,
                host: Host::Name("receiver.example".into()),
                port: 8443
            }
        );

        let some = policy(&["127.0.0.1/32", "receiver.internal"]);
        assert_eq!(
            some.target("http://127.0.0.1:9000/hook").unwrap().port,
            9000
        );
        assert_eq!(some.target("http://receiver.internal/").unwrap().port, 80);
        assert!(some.target("https://[::1]/").is_err(), "::1 is not listed");
        // A name resolving into a listed network may be reached, over https only.
        assert_eq!(refused(&some, "http://other.internal/"), Refusal::PlainHttp);
    }

    #[test]
    fn resolved_addresses_are_filtered_unless_the_name_is_listed() {
        let addr = |text: &str| SocketAddr::new(ip(text), 443);
        let resolved = [
            addr("127.0.0.1"),
            addr("169.254.169.254"),
            addr("10.1.0.5"),
            addr("93.184.215.14"),
        ];
        let none = policy(&[]);
        assert_eq!(
            none.keep("rebinding.example", resolved),
            [addr("93.184.215.14")]
        );
        assert!(none.keep("internal.example", [addr("10.0.0.1")]).is_empty());
        let some = policy(&["10.1.0.0/16", "receiver.internal"]);
        assert_eq!(
            some.keep("rebinding.example", resolved),
            [addr("10.1.0.5"), addr("93.184.215.14")]
        );
        assert_eq!(some.keep("receiver.internal", resolved), resolved);
    }
}
