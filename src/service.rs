//! Services a knock (or an admin) can open: the built-in `ssh`, the operator's
//! `[[services]]`, and the special `egress` (a host-wide egress window).
//!
//! A service is known on the wire by an id both sides derive from its name
//! ([`ServiceId::of`]), so a server can add services without any client learning a
//! number, and the client needs no list from the server. Pure: no I/O.

use sha2::{Digest, Sha256};

use crate::ruleset::IpFamily;

/// The built-in service: the SSH port (`inbound.ssh_port`).
pub const SSH: &str = "ssh";
/// The special service that opens a host-wide egress window instead of a port.
pub const EGRESS: &str = "egress";
/// Longest service name: it becomes part of nft set names (`NAME_grants_v4`).
pub const MAX_NAME_LEN: usize = 24;
/// Most services a config may declare (besides `ssh` and `egress`): each adds two
/// sets and two rules to the table (README: the ruleset size by service count).
pub const MAX_SERVICES: usize = 100;

/// Domain of the service id hash: no other hash in knockgate starts with it.
const ID_DOMAIN: &[u8] = b"knockgate service id v1\0";

/// A service's number on the wire: the first 32 bits of
/// SHA-256("knockgate service id v1\0" || name), big-endian (docs/PROTOCOL.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceId(pub u32);

impl ServiceId {
    /// The id of the service called `name`.
    #[must_use]
    pub fn of(name: &str) -> Self {
        let digest = Sha256::new()
            .chain_update(ID_DOMAIN)
            .chain_update(name.as_bytes())
            .finalize();
        Self(u32::from_be_bytes([
            digest[0], digest[1], digest[2], digest[3],
        ]))
    }

    /// The id of `ssh`, the one service version-1 knocks can name.
    #[must_use]
    pub fn ssh() -> Self {
        static ID: std::sync::OnceLock<ServiceId> = std::sync::OnceLock::new();
        *ID.get_or_init(|| Self::of(SSH))
    }

    /// The id of `egress`.
    #[must_use]
    pub fn egress() -> Self {
        static ID: std::sync::OnceLock<ServiceId> = std::sync::OnceLock::new();
        *ID.get_or_init(|| Self::of(EGRESS))
    }
}

impl std::fmt::Display for ServiceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#010x}", self.0)
    }
}

/// Whether `name` may name a service: 1 to [`MAX_NAME_LEN`] of `a-z`, `0-9`, `_`,
/// starting with a letter (it goes into nft set names, which nft's own syntax must
/// be able to read back).
#[must_use]
pub fn valid_name(name: &str) -> bool {
    (1..=MAX_NAME_LEN).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// The transport protocol of a service's port(s).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Deserialize)]
#[serde(try_from = "String")]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Protocol {
    /// `tcp` or `udp`, as in configs and nft.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        }
    }
}

/// An inclusive port range (`first == last` for one port).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ports {
    /// First port.
    pub first: u16,
    /// Last port (≥ `first`).
    pub last: u16,
}

impl Ports {
    /// One port.
    #[must_use]
    pub fn one(port: u16) -> Self {
        Self {
            first: port,
            last: port,
        }
    }

    /// Whether `port` is in the range.
    #[must_use]
    pub fn contains(self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }

    /// Whether the two ranges share a port.
    #[must_use]
    pub fn overlaps(self, other: Self) -> bool {
        self.first <= other.last && other.first <= self.last
    }
}

impl std::fmt::Display for Ports {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

/// A service that opens inbound port(s) for granted source addresses.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PortService {
    /// Its name (config, CLI, logs, set names).
    pub name: String,
    /// Its wire id (derived from the name once, not per knock).
    pub id: ServiceId,
    /// TCP or UDP.
    pub protocol: Protocol,
    /// The port(s) it opens.
    pub ports: Ports,
}

impl PortService {
    /// The grant set of this service for `family`.
    #[must_use]
    pub fn grant_set(&self, family: IpFamily) -> String {
        grant_set(&self.name, family)
    }
}

/// The name of the grant set of service `name` for `family`: `ssh_grants_v4` (the
/// name knockgate 0.1 used) and `NAME_grants_v4` alike.
#[must_use]
pub fn grant_set(name: &str, family: IpFamily) -> String {
    match family {
        IpFamily::V4 => format!("{name}_grants_v4"),
        IpFamily::V6 => format!("{name}_grants_v6"),
    }
}

/// The port services of `config`: `ssh` first, then `[[services]]` in their order.
/// The config is already validated (names, protocols and ports are good).
#[must_use]
pub fn port_services(config: &crate::config::Config) -> Vec<PortService> {
    let mut out = vec![PortService {
        name: SSH.to_owned(),
        id: ServiceId::ssh(),
        protocol: Protocol::Tcp,
        ports: Ports::one(config.inbound.ssh_port),
    }];
    out.extend(config.services.iter().filter_map(|spec| {
        Some(PortService {
            name: spec.name.clone(),
            id: ServiceId::of(&spec.name),
            protocol: spec.protocol,
            ports: spec.port.parse().ok()?,
        })
    }));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_derived_from_the_name_alone() {
        // Fixed: a client in any language computes the same numbers (PROTOCOL.md).
        assert_eq!(ServiceId::of("ssh"), ServiceId::of("ssh"));
        // Pinned against `printf 'knockgate service id v1\0ssh' | sha256sum`.
        assert_eq!(ServiceId::of("ssh").to_string(), "0x7b75441e");
        assert_eq!(ServiceId::of("wireguard").to_string(), "0xefcb86de");
        assert_eq!(ServiceId::of("egress").to_string(), "0xf51fb96f");
        assert_ne!(ServiceId::of("wireguard"), ServiceId::of("wireguarD"));
        assert_ne!(ServiceId::of("egress"), ServiceId::of("ssh"));
    }

    #[test]
    fn names_fit_set_names() {
        for good in ["ssh", "wireguard", "db_admin", "s8443"] {
            assert!(valid_name(good), "{good}");
        }
        for bad in ["", "8443", "Wire", "wire-guard", "a b", &"a".repeat(25)] {
            assert!(!valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn port_ranges_overlap_when_they_share_a_port() {
        let r = |a, b| Ports { first: a, last: b };
        assert!(r(8000, 8010).overlaps(r(8010, 8020)));
        assert!(!r(8000, 8010).overlaps(r(8011, 8020)));
        assert!(r(22, 22).overlaps(r(1, 100)));
        assert_eq!(r(8000, 8010).to_string(), "8000-8010");
        assert_eq!(Ports::one(22).to_string(), "22");
    }
}
