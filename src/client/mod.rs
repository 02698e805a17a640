//! The laptop side: build and send knocks, wait for the port to open, relay for
//! ssh's `ProxyCommand`. Needs no firewall library: `knock` builds without the
//! `daemon` feature.

pub mod binding;
pub mod config;
pub mod sequence;

use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream, ToSocketAddrs, UdpSocket};
use std::time::{Duration, Instant};

use crate::keyfile::KeyFileError;
use crate::knock::auth::{ServerId, seal};
use crate::knock::{AddressClaim, KeyId, Knock, Secret, ServiceId};

pub use binding::{Binding, Discovery};

/// Most addresses one name is knocked on (A and AAAA records).
const MAX_ADDRESSES: usize = 4;
/// How long one connection attempt of `--wait` may take.
const PROBE_TIMEOUT: Duration = Duration::from_millis(300);

/// Why a knock could not be sent or did not open the port.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server name does not resolve.
    #[error("cannot resolve {host}")]
    Resolve {
        /// The name.
        host: String,
        /// The resolver's error.
        #[source]
        source: std::io::Error,
    },
    /// The name resolved to nothing.
    #[error("{host} has no addresses")]
    NoAddress {
        /// The name.
        host: String,
    },
    /// The datagram could not be sent.
    #[error("cannot send the knock to {addr}")]
    Send {
        /// Where to.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// No randomness for the nonce.
    #[error("cannot get random bytes for the nonce: {0}")]
    Random(String),
    /// The key file is unusable.
    #[error(transparent)]
    KeyFile(#[from] KeyFileError),
    /// A key id, server id or source address in the config or flags is wrong.
    #[error("{0}")]
    Invalid(String),
    /// A NAT lies between this machine and the server, and nothing says what address
    /// the server will see.
    #[error(
        "cannot bind the knock to {server}: this machine's address on the route ({local}) is private, so a NAT rewrites it. Set `discover` (e.g. `discover = \"https://api.ipify.org\"`, a URL that answers your address, fetched with curl; or `dns:myip.opendns.com@208.67.222.222`, which anyone on your network can forge), or `source = \"<your public address>\"`; or, if the key allows unbound knocks (keygen --nat), `source = \"packet\"`"
    )]
    BehindNat {
        /// The route's source address.
        local: IpAddr,
        /// The server address.
        server: SocketAddr,
    },
    /// Asking for the public address failed.
    #[error("cannot learn this machine's public address from {0}")]
    Discovery(String),
    /// The port did not open.
    #[error(
        "port {port} did not open within {} s after the knock (wrong key, server id or clock, or bound to an address the server does not see? the server's log says which: e.g. reason=\"other-address\" — then set `discover` or `source`)",
        .waited.as_secs()
    )]
    NotOpened {
        /// The port polled.
        port: u16,
        /// How long it was polled.
        waited: Duration,
    },
}

/// Everything needed to knock on one server.
pub struct Target {
    /// The name or address as the user wrote it.
    pub host: String,
    /// Knock port.
    pub port: u16,
    /// The server's id.
    pub server_id: ServerId,
    /// The key's id.
    pub key_id: KeyId,
    /// The key.
    pub secret: Secret,
    /// Requested grant length; `None` asks for the server's default.
    pub ttl: Option<Duration>,
    /// Which address each knock is bound to.
    pub binding: Binding,
    /// How to learn the public address behind a NAT, if configured.
    pub discovery: Option<Discovery>,
    /// The services to open: one knock each, to every address (`ssh` by default).
    pub services: Vec<String>,
}

/// The addresses `host` (a name, an address, or `[v6]`) resolves to, at most four.
pub fn resolve(host: &str, port: u16) -> Result<Vec<SocketAddr>, ClientError> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let mut found: Vec<SocketAddr> = (bare, port)
        .to_socket_addrs()
        .map_err(|source| ClientError::Resolve {
            host: host.to_owned(),
            source,
        })?
        .collect();
    found.dedup();
    found.truncate(MAX_ADDRESSES);
    if found.is_empty() {
        return Err(ClientError::NoAddress {
            host: host.to_owned(),
        });
    }
    Ok(found)
}

/// What one [`send`] did: the addresses knocked, and those it could not knock (no
/// route, or no address to bind the knock to — a dual-stack server seen from behind
/// an IPv4 NAT with native IPv6), with why.
#[derive(Debug, Default)]
pub struct Sent {
    /// Knocked, in the resolver's order.
    pub knocked: Vec<SocketAddr>,
    /// Every datagram built (and sent, unless a dry run), in order.
    pub packets: Vec<Built>,
    /// Not knocked, and why.
    pub skipped: Vec<(SocketAddr, ClientError)>,
}

/// One knock as built: where it goes, what it asks for, its bytes.
#[derive(Debug, Clone)]
pub struct Built {
    /// The server address and knock port.
    pub to: SocketAddr,
    /// The service it asks for.
    pub service: String,
    /// The address it is bound to.
    pub claim: AddressClaim,
    /// The datagram (114 bytes for ssh, 118 for any other service).
    pub datagram: Vec<u8>,
}

/// Whether [`send`] sends what it builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Build and send.
    Send,
    /// Build only (`--dry-run`, `--save-packet`): nothing leaves but what finding the
    /// bound address needs (a discovery query behind a NAT).
    Build,
}

/// Sends one knock, each with a fresh nonce, to every address of the target that it
/// can bind a knock for. Nothing ever answers, so success means "sent"; it fails only
/// if no address was knocked (with the first address's reason).
pub fn send(target: &Target, mode: Mode) -> Result<Sent, ClientError> {
    let addrs = resolve(&target.host, target.port)?;
    let ttl_secs = target
        .ttl
        .map_or(0, |d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX).max(1));
    let timestamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut discovered = None;
    let mut sent = Sent::default();
    for &addr in &addrs {
        match knock_one(target, addr, timestamp, ttl_secs, &mut discovered, mode) {
            Ok(built) => {
                sent.knocked.push(addr);
                sent.packets.extend(built);
            }
            Err(e @ ClientError::Random(_)) => return Err(e),
            Err(e) => sent.skipped.push((addr, e)),
        }
    }
    if sent.knocked.is_empty() && !sent.skipped.is_empty() {
        let (_, first) = sent.skipped.swap_remove(0);
        return Err(first);
    }
    Ok(sent)
}

/// Binds and sends the knocks (one per service) to `addr`.
fn knock_one(
    target: &Target,
    addr: SocketAddr,
    timestamp: u64,
    ttl_secs: u32,
    discovered: &mut Option<IpAddr>,
    mode: Mode,
) -> Result<Vec<Built>, ClientError> {
    let any: SocketAddr = if addr.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let send_error = |source| ClientError::Send { addr, source };
    let socket = UdpSocket::bind(any).map_err(send_error)?;
    // Connected, so the kernel has picked the route's source address.
    socket.connect(addr).map_err(send_error)?;
    let claim = binding::claim_for(
        &target.binding,
        target.discovery.as_ref(),
        discovered,
        &socket,
        addr,
    )?;
    let mut built = Vec::with_capacity(target.services.len());
    for service in &target.services {
        let mut nonce = [0u8; 16];
        getrandom::fill(&mut nonce).map_err(|e| ClientError::Random(e.to_string()))?;
        let knock = Knock {
            key_id: target.key_id.clone(),
            service: ServiceId::of(service),
            timestamp,
            nonce,
            ttl_secs,
            address: claim,
        };
        let datagram = seal(&knock, &target.secret, &target.server_id);
        if mode == Mode::Send {
            socket.send(&datagram).map_err(send_error)?;
        }
        built.push(Built {
            to: addr,
            service: service.clone(),
            claim,
            datagram,
        });
    }
    Ok(built)
}

/// Polls `port` on `addrs` until one accepts a TCP connection or `timeout` passes;
/// returns the open connection.
pub fn wait_open(
    addrs: &[SocketAddr],
    port: u16,
    timeout: Duration,
) -> Result<TcpStream, ClientError> {
    let started = Instant::now();
    loop {
        for addr in addrs {
            let target = SocketAddr::new(addr.ip(), port);
            if let Ok(stream) = TcpStream::connect_timeout(&target, PROBE_TIMEOUT) {
                return Ok(stream);
            }
        }
        if started.elapsed() >= timeout {
            return Err(ClientError::NotOpened {
                port,
                waited: started.elapsed(),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Relays stdin → `stream` and `stream` → stdout until both sides are done (ssh's
/// `ProxyCommand`).
pub fn relay(stream: &TcpStream) -> std::io::Result<()> {
    let mut upstream = stream.try_clone()?;
    let writer = std::thread::spawn(move || {
        let result = copy_all(&mut std::io::stdin().lock(), &mut upstream);
        let _ = upstream.shutdown(Shutdown::Write);
        result
    });
    let mut downstream = stream.try_clone()?;
    let read = copy_all(&mut downstream, &mut std::io::stdout().lock());
    // When the server closes, stdin may never end; the writer thread ends with the process.
    if writer.is_finished() {
        writer.join().unwrap_or(Ok(()))?;
    }
    read
}

fn copy_all(from: &mut impl Read, to: &mut impl Write) -> std::io::Result<()> {
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return to.flush(),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        to.write_all(&buf[..n])?;
        to.flush()?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literal_addresses_resolve_without_dns() {
        assert_eq!(
            resolve("192.0.2.1", 62201).unwrap(),
            vec!["192.0.2.1:62201".parse().unwrap()]
        );
        assert_eq!(
            resolve("[2001:db8::1]", 1).unwrap(),
            vec!["[2001:db8::1]:1".parse().unwrap()]
        );
    }

    #[test]
    fn a_knock_reaches_a_local_socket_and_verifies() {
        let receiver = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = receiver.local_addr().unwrap().port();
        let target = Target {
            host: "127.0.0.1".into(),
            port,
            server_id: ServerId::new("web1").unwrap(),
            key_id: KeyId::new("alice").unwrap(),
            secret: Secret::from_hex(&"11".repeat(32)).unwrap(),
            ttl: Some(Duration::from_secs(600)),
            binding: Binding::Auto,
            discovery: None,
            services: vec!["ssh".into()],
        };
        let sent = send(&target, Mode::Send).unwrap();
        assert_eq!(sent.knocked.len(), 1);
        assert!(sent.skipped.is_empty());
        let mut buf = [0u8; 512];
        receiver
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let (n, _) = receiver.recv_from(&mut buf).unwrap();
        let secret = Secret::from_hex(&"11".repeat(32)).unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let knock = crate::knock::verify::authenticate(
            &buf[..n],
            |_| Some(&secret),
            &target.server_id,
            now,
            30,
        )
        .unwrap();
        assert_eq!(knock.ttl_secs, 600);
        assert_eq!(
            knock.address,
            crate::knock::AddressClaim::V4(std::net::Ipv4Addr::LOCALHOST),
            "bound to the route's source"
        );
    }
}
