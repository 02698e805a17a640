//! Which address a knock is bound to.
//!
//! A knock that names its address (bound) opens only for that address: whoever sees
//! it on the wire and sends it first from elsewhere gets nothing, and the owner's own
//! copy still opens. An unbound knock ("for the packet's source") opens for whoever
//! delivers it first. So the client binds whenever it can know the address the
//! server will see:
//!
//! * IPv6: the source the kernel picks for the route to the server (no NAT assumed
//!   for IPv6; link-local sources are never bound);
//! * IPv4 from a public address, or between private addresses (a LAN or VPN): the
//!   route's source;
//! * IPv4 from a private or shared (CGNAT) address to a public one: a NAT rewrites
//!   the source, so the public address comes from the configured discovery
//!   ([`Discovery`]), or the user names it, or — only if the key allows unbound
//!   knocks — `source = "packet"`.
//!
//! "Public" means not private (RFC 1918), shared (100.64/10), loopback, link-local,
//! unspecified or broadcast. The documentation ranges (192.0.2/24, 198.51.100/24,
//! 203.0.113/24) count as public: they never appear on real networks, and the lab
//! uses them to stand for the internet.

use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::time::Duration;

use super::ClientError;
use crate::knock::AddressClaim;

/// How long one discovery attempt may take.
const DISCOVERY_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest name in a `dns:` discovery.
const MAX_NAME: usize = 253;
/// Longest answer read from a discovery URL.
const MAX_URL_ANSWER: usize = 256;

/// What the user asked for (`source` in the config, `--source` on the command line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Binding {
    /// Work the address out per server address (the default).
    Auto,
    /// Unbound: the packet's source. The key must allow it (`allow_unbound`).
    Packet,
    /// This address.
    Address(IpAddr),
}

impl Binding {
    /// Parses `auto` (or nothing), `packet`, or an IP address.
    pub fn parse(text: Option<&str>) -> Result<Self, ClientError> {
        match text {
            None | Some("auto") => Ok(Self::Auto),
            Some("packet") => Ok(Self::Packet),
            Some(text) => text.parse().map(Self::Address).map_err(|_| {
                ClientError::Invalid(format!(
                    "source `{text}` is not `auto`, `packet` or an IP address"
                ))
            }),
        }
    }
}

/// How the client learns its public IPv4 address behind a NAT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Discovery {
    /// Ask `resolver` for the A record of `name`, which it answers with the asker's
    /// address (`myip.opendns.com` at OpenDNS's resolvers does).
    Dns {
        /// The name to ask for.
        name: String,
        /// Where to ask (port 53 unless given).
        resolver: SocketAddr,
    },
    /// Fetch this URL with `curl`; its body is the address (`https://` recommended).
    Url(String),
}

impl Discovery {
    /// Parses `dns:NAME@RESOLVER[:PORT]` or an `http://` / `https://` URL.
    pub fn parse(text: &str) -> Result<Self, ClientError> {
        let invalid = |why: &str| {
            ClientError::Invalid(format!(
                "discover `{text}`: {why} (expected `dns:NAME@RESOLVER`, e.g. `dns:myip.opendns.com@208.67.222.222`, or an https:// URL)"
            ))
        };
        if let Some(rest) = text.strip_prefix("dns:") {
            let (name, resolver) = rest
                .split_once('@')
                .ok_or_else(|| invalid("no @RESOLVER"))?;
            if name.is_empty() || name.len() > MAX_NAME || !name.is_ascii() {
                return Err(invalid("the name is empty, too long or not ASCII"));
            }
            let resolver = resolver
                .parse::<SocketAddr>()
                .or_else(|_| resolver.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
                .map_err(|_| {
                    invalid("the resolver is not an IP address (with an optional port)")
                })?;
            return Ok(Self::Dns {
                name: name.trim_end_matches('.').to_owned(),
                resolver,
            });
        }
        if text.starts_with("https://") || text.starts_with("http://") {
            if text.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(invalid("the URL has spaces or control characters"));
            }
            return Ok(Self::Url(text.to_owned()));
        }
        Err(invalid("unknown kind"))
    }

    /// Asks for this machine's public address.
    pub fn run(&self) -> Result<IpAddr, ClientError> {
        match self {
            Self::Dns { name, resolver } => dns_address(name, *resolver).map(IpAddr::V4),
            Self::Url(url) => url_address(url),
        }
    }
}

/// What the route from `source` to `server` says about the address the server sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// The server sees `source` itself.
    Direct(IpAddr),
    /// A NAT lies between: the server sees some public address we do not know.
    BehindNat,
}

/// Classifies the route from `source` (what the kernel picks) to `server`. Pure.
#[must_use]
pub fn classify(source: IpAddr, server: IpAddr) -> Route {
    match (source, server) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            if is_public_v4(src) || !is_public_v4(dst) {
                Route::Direct(source)
            } else {
                Route::BehindNat
            }
        }
        (IpAddr::V6(src), IpAddr::V6(dst)) if is_bindable_v6(src) => {
            // A unique-local source reaches a global server only through NAT66 /
            // NPTv6, and a NAT64 prefix (64:ff9b::/96) means an IPv4 server behind a
            // translator: either way the server sees another address.
            let ula = |a: Ipv6Addr| (a.segments()[0] & 0xfe00) == 0xfc00;
            let nat64 = dst.segments()[..6] == [0x64, 0xff9b, 0, 0, 0, 0];
            if nat64 || (ula(src) && !ula(dst)) {
                Route::BehindNat
            } else {
                Route::Direct(source)
            }
        }
        _ => Route::BehindNat,
    }
}

/// Whether `a` is a public IPv4 address (see the module docs).
#[must_use]
pub fn is_public_v4(a: Ipv4Addr) -> bool {
    let [first, second, third, _] = a.octets();
    let shared = first == 100 && (second & 0xc0) == 64;
    let this_network = first == 0;
    // 192.0.0.0/24: DS-Lite and 464XLAT's own addresses; 198.18.0.0/15: benchmarking,
    // used by VPN and proxy tunnels; 240.0.0.0/4: reserved.
    let ietf = first == 192 && second == 0 && third == 0;
    let benchmarking = first == 198 && (second & 0xfe) == 18;
    let reserved = first >= 240;
    !(a.is_private()
        || shared
        || ietf
        || benchmarking
        || reserved
        || a.is_loopback()
        || a.is_link_local()
        || a.is_unspecified()
        || a.is_broadcast()
        || a.is_multicast()
        || this_network)
}

fn is_bindable_v6(a: Ipv6Addr) -> bool {
    let link_local = (a.segments()[0] & 0xffc0) == 0xfe80;
    !(a.is_loopback() || a.is_unspecified() || a.is_multicast() || link_local)
        && a.to_ipv4_mapped().is_none()
}

/// The claim for a knock sent on `socket` (already connected to `server`), under
/// `binding`; `discovered` caches the discovery's answer across a name's addresses.
pub fn claim_for(
    binding: &Binding,
    discovery: Option<&Discovery>,
    discovered: &mut Option<IpAddr>,
    socket: &UdpSocket,
    server: SocketAddr,
) -> Result<AddressClaim, ClientError> {
    let address = match binding {
        Binding::Packet => return Ok(AddressClaim::PacketSource),
        Binding::Address(a) => *a,
        Binding::Auto => {
            let source = socket
                .local_addr()
                .map_err(|source| ClientError::Send {
                    addr: server,
                    source,
                })?
                .ip();
            match classify(source, server.ip()) {
                Route::Direct(a) => a,
                Route::BehindNat => {
                    let Some(discovery) = discovery else {
                        return Err(ClientError::BehindNat {
                            local: source,
                            server,
                        });
                    };
                    let found = match discovered {
                        Some(found) => *found,
                        None => *discovered.insert(discovery.run()?),
                    };
                    let usable = match found {
                        IpAddr::V4(a) => server.is_ipv4() && is_public_v4(a),
                        IpAddr::V6(_) => false,
                    };
                    if !usable {
                        return Err(ClientError::Discovery(format!(
                            "{discovery:?} answered {found}, which cannot be this machine's public address seen from {server}"
                        )));
                    }
                    found
                }
            }
        }
    };
    Ok(match address {
        IpAddr::V4(a) => AddressClaim::V4(a),
        IpAddr::V6(a) => AddressClaim::V6(a),
    })
}

/// Asks `resolver` for the A record of `name` (one query, retried once), and returns
/// the first address in the answer section for that name.
fn dns_address(name: &str, resolver: SocketAddr) -> Result<Ipv4Addr, ClientError> {
    use simple_dns::rdata::RData;
    use simple_dns::{CLASS, Name, Packet, QCLASS, QTYPE, Question, TYPE};
    let fail = |why: String| ClientError::Discovery(format!("dns:{name}@{resolver}: {why}"));
    let qname = Name::new(name).map_err(|e| fail(format!("bad name: {e}")))?;
    let any: SocketAddr = if resolver.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(any).map_err(|e| fail(e.to_string()))?;
    socket.connect(resolver).map_err(|e| fail(e.to_string()))?;
    socket
        .set_read_timeout(Some(DISCOVERY_TIMEOUT))
        .map_err(|e| fail(e.to_string()))?;
    let mut id = [0u8; 2];
    getrandom::fill(&mut id).map_err(|e| ClientError::Random(e.to_string()))?;
    let id = u16::from_be_bytes(id);
    let mut query = Packet::new_query(id);
    query.set_flags(simple_dns::PacketFlag::RECURSION_DESIRED);
    query.questions.push(Question::new(
        qname.clone(),
        QTYPE::TYPE(TYPE::A),
        QCLASS::CLASS(CLASS::IN),
        false,
    ));
    let bytes = query
        .build_bytes_vec()
        .map_err(|e| fail(format!("cannot build the query: {e}")))?;
    let mut buf = [0u8; 1500];
    for _ in 0..2 {
        socket.send(&bytes).map_err(|e| fail(e.to_string()))?;
        let n = match socket.recv(&mut buf) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue;
            }
            Err(e) => return Err(fail(e.to_string())),
        };
        let answer = Packet::parse(&buf[..n]).map_err(|e| fail(format!("bad answer: {e}")))?;
        if answer.id() != id {
            continue;
        }
        return answer
            .answers
            .iter()
            .find_map(|record| match &record.rdata {
                RData::A(a) if record.name == qname => Some(Ipv4Addr::from(a.address)),
                _ => None,
            })
            .ok_or_else(|| fail("the answer holds no A record for the name".to_owned()));
    }
    Err(fail(format!(
        "no answer within {} s (twice)",
        DISCOVERY_TIMEOUT.as_secs()
    )))
}

/// Fetches `url` with curl over IPv4 (TLS and proxies are curl's business, and it is
/// on every machine that has a package manager) and parses its trimmed body as an
/// address. No `~/.curlrc` (`-q`: it could turn certificate checks off), no URL
/// globbing, and at most [`MAX_URL_ANSWER`] bytes read whatever the server sends.
fn url_address(url: &str) -> Result<IpAddr, ClientError> {
    use std::process::{Command, Stdio};
    let fail = |why: String| ClientError::Discovery(format!("{url}: {why}"));
    let mut child = Command::new("curl")
        .args([
            "-q",
            "--ipv4",
            "--globoff",
            "--silent",
            "--show-error",
            "--fail",
        ])
        .arg("--max-time")
        .arg(DISCOVERY_TIMEOUT.as_secs().to_string())
        .args([
            "--max-filesize",
            &MAX_URL_ANSWER.to_string(),
            "--proto",
            "=https,http",
            "--",
        ])
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            fail(if e.kind() == std::io::ErrorKind::NotFound {
                "discovery by URL runs curl, which is not installed".to_owned()
            } else {
                format!("cannot run curl: {e}")
            })
        })?;
    let mut body = Vec::new();
    let limit = u64::try_from(MAX_URL_ANSWER).unwrap_or(u64::MAX) + 1;
    if let Some(out) = child.stdout.take() {
        let _ = out.take(limit).read_to_end(&mut body);
    }
    let _ = child.kill();
    let mut err = Vec::new();
    if let Some(e) = child.stderr.take() {
        let _ = e.take(1024).read_to_end(&mut err);
    }
    let status = child.wait().map_err(|e| fail(format!("curl: {e}")))?;
    if body.len() > MAX_URL_ANSWER {
        return Err(fail(format!(
            "the answer is longer than {MAX_URL_ANSWER} bytes"
        )));
    }
    let text = String::from_utf8_lossy(&body);
    match text.trim().parse() {
        Ok(address) => Ok(address),
        Err(_) if !status.success() => Err(fail(format!(
            "curl failed: {}",
            String::from_utf8_lossy(&err).trim()
        ))),
        Err(_) => Err(fail(format!(
            "the answer `{}` is not an IP address",
            text.trim().escape_debug()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn routes_are_classified() {
        // A public source: what the server sees.
        assert_eq!(
            classify(ip("198.51.100.2"), ip("203.0.113.1")),
            Route::Direct(ip("198.51.100.2"))
        );
        // Private to private: a LAN or a VPN, no NAT.
        assert_eq!(
            classify(ip("10.77.1.2"), ip("10.77.1.1")),
            Route::Direct(ip("10.77.1.2"))
        );
        // Private or shared (CGNAT) to public: a NAT.
        for src in ["192.168.1.20", "10.0.0.5", "172.16.3.4", "100.64.1.1"] {
            assert_eq!(
                classify(ip(src), ip("203.0.113.1")),
                Route::BehindNat,
                "{src}"
            );
        }
        // IPv6: global and unique-local sources bind; link-local never does.
        assert_eq!(
            classify(ip("2001:db8::2"), ip("2001:db8::1")),
            Route::Direct(ip("2001:db8::2"))
        );
        assert_eq!(
            classify(ip("fd77:1::2"), ip("fd77:1::1")),
            Route::Direct(ip("fd77:1::2"))
        );
        assert_eq!(classify(ip("fe80::2"), ip("2001:db8::1")), Route::BehindNat);
        // A unique-local source to a global server: NAT66. A NAT64 server: IPv4 behind.
        assert_eq!(classify(ip("fd00::2"), ip("2001:db8::1")), Route::BehindNat);
        assert_eq!(
            classify(ip("2001:db8::2"), ip("64:ff9b::cb00:7101")),
            Route::BehindNat
        );
    }

    #[test]
    fn public_means_not_special() {
        for a in [
            "10.1.2.3",
            "172.31.0.1",
            "192.168.0.1",
            "100.127.0.1",
            "127.0.0.1",
            "169.254.1.1",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "192.0.0.4",
            "198.18.0.1",
            "198.19.255.1",
            "240.0.0.1",
        ] {
            assert!(!is_public_v4(a.parse().unwrap()), "{a}");
        }
        for a in [
            "8.8.8.8",
            "100.128.0.1",
            "172.32.0.1",
            "198.51.100.7",
            "203.0.113.1",
        ] {
            assert!(is_public_v4(a.parse().unwrap()), "{a}");
        }
    }

    #[test]
    fn bindings_and_discoveries_parse() {
        assert_eq!(Binding::parse(None).unwrap(), Binding::Auto);
        assert_eq!(Binding::parse(Some("auto")).unwrap(), Binding::Auto);
        assert_eq!(Binding::parse(Some("packet")).unwrap(), Binding::Packet);
        assert_eq!(
            Binding::parse(Some("2001:db8::1")).unwrap(),
            Binding::Address(ip("2001:db8::1"))
        );
        assert!(Binding::parse(Some("laptop")).is_err());

        assert_eq!(
            Discovery::parse("dns:myip.opendns.com@208.67.222.222").unwrap(),
            Discovery::Dns {
                name: "myip.opendns.com".into(),
                resolver: "208.67.222.222:53".parse().unwrap()
            }
        );
        assert_eq!(
            Discovery::parse("dns:me.lab.@[fd77:2::53]:5353").unwrap(),
            Discovery::Dns {
                name: "me.lab".into(),
                resolver: "[fd77:2::53]:5353".parse().unwrap()
            }
        );
        assert_eq!(
            Discovery::parse("https://example.org/ip").unwrap(),
            Discovery::Url("https://example.org/ip".into())
        );
        for bad in [
            "dns:myip.opendns.com",
            "dns:@1.1.1.1",
            "dns:x@resolver",
            "ftp://x",
            "https://a b",
            "",
        ] {
            let e = Discovery::parse(bad).unwrap_err().to_string();
            assert!(e.contains("expected `dns:NAME@RESOLVER`"), "{bad}: {e}");
        }
    }

    #[test]
    fn auto_binds_to_the_routes_source_and_asks_discovery_only_behind_a_nat() {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = server.local_addr().unwrap();
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.connect(to).unwrap();
        // Loopback to loopback: neither is public, so no NAT: bound to the source.
        let mut cache = None;
        let claim = claim_for(&Binding::Auto, None, &mut cache, &socket, to).unwrap();
        assert_eq!(claim, AddressClaim::V4(Ipv4Addr::LOCALHOST));
        assert_eq!(
            claim_for(&Binding::Packet, None, &mut cache, &socket, to).unwrap(),
            AddressClaim::PacketSource
        );
        let named = Binding::Address(ip("203.0.113.9"));
        assert_eq!(
            claim_for(&named, None, &mut cache, &socket, to).unwrap(),
            AddressClaim::V4(Ipv4Addr::new(203, 0, 113, 9))
        );
        assert!(cache.is_none(), "no discovery was needed");
    }

    #[test]
    fn a_silent_resolver_is_an_error_not_a_hang() {
        let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
        let resolver = silent.local_addr().unwrap();
        let e = dns_address("myip.lab", resolver).unwrap_err().to_string();
        assert!(e.contains("no answer within"), "{e}");
    }
}
