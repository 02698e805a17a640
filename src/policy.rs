//! Who may open what, for how long: a verified knock (or an admin request) in, a
//! decision out. Pure; the caller logs the decision.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;

use crate::knock::{AddressClaim, KeyId, Secret, ServiceId};

/// One key's secret and what it may do.
pub struct KeyEntry {
    /// The shared secret.
    pub secret: Secret,
    /// Services it may open, by name.
    pub services: Vec<String>,
    /// Networks a grant's address must lie in.
    pub sources: Vec<IpNet>,
    /// Longest grant for this key, before the server's cap.
    pub max_ttl: Option<Duration>,
    /// May a knock name an address other than its packet's source?
    pub other_source: bool,
    /// May a knock name no address at all (the grant is then for the packet's source,
    /// which anyone who sees the knock can race: NAT mode)?
    pub unbound: bool,
    /// Most grants the key may hold open at once.
    pub max_grants: usize,
}

/// An fwknop client's stanza: its keys and what it may open.
pub struct FwknopEntry {
    /// Its name (logs, grants: `fwknop NAME`).
    pub name: String,
    /// Its two keys and HMAC type.
    pub keys: crate::fwknop::SpaKeys,
    /// Services its ports may open.
    pub services: Vec<String>,
    /// Networks a grant's address must lie in.
    pub sources: Vec<IpNet>,
    /// Grant length when the client asks none.
    pub ttl: Duration,
    /// Longest grant (also for the client's `-f`), before the server's cap.
    pub max_ttl: Option<Duration>,
    /// May a request name no address (`0.0.0.0`: the packet's source)?
    pub unbound: bool,
    /// May the request's address differ from the packet's source?
    pub other_source: bool,
    /// Most grants it may hold open at once.
    pub max_grants: usize,
}

/// What [`decide`] needs to know of whoever asks: a native key or an fwknop stanza.
pub trait Asker {
    /// Services it may open.
    fn services(&self) -> &[String];
    /// Networks a grant's address must lie in.
    fn sources(&self) -> &[IpNet];
    /// Its own cap on grant length.
    fn max_ttl(&self) -> Option<Duration>;
    /// May it name no address?
    fn unbound(&self) -> bool;
    /// May it name another address than its packet's source?
    fn other_source(&self) -> bool;
}

/// Both kinds of asker keep the same fields under the same names.
macro_rules! asker_from_fields {
    ($($ty:ty),+) => {$(
        impl Asker for $ty {
            fn services(&self) -> &[String] {
                &self.services
            }
            fn sources(&self) -> &[IpNet] {
                &self.sources
            }
            fn max_ttl(&self) -> Option<Duration> {
                self.max_ttl
            }
            fn unbound(&self) -> bool {
                self.unbound
            }
            fn other_source(&self) -> bool {
                self.other_source
            }
        }
    )+};
}

asker_from_fields!(KeyEntry, FwknopEntry);

/// The keys by id: one lookup per knock, never a trial of every key. fwknop stanzas
/// (whose packets name no key) are a list, tried in order.
#[derive(Default)]
pub struct KeyRing {
    keys: HashMap<KeyId, KeyEntry>,
    fwknop: Vec<FwknopEntry>,
    fwknop_keys: Vec<crate::fwknop::SpaKeys>,
}

impl KeyRing {
    /// Adds (or replaces) the key `id`.
    pub fn insert(&mut self, id: KeyId, entry: KeyEntry) {
        self.keys.insert(id, entry);
    }

    /// The key named `id`.
    #[must_use]
    pub fn get(&self, id: &KeyId) -> Option<&KeyEntry> {
        self.keys.get(id)
    }

    /// Every native key, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&KeyId, &KeyEntry)> {
        self.keys.iter()
    }

    /// Number of keys (native and fwknop).
    #[must_use]
    pub fn len(&self) -> usize {
        self.keys.len() + self.fwknop.len()
    }

    /// Sets the fwknop stanzas, in the order they are tried.
    pub fn set_fwknop(&mut self, mut entries: Vec<FwknopEntry>) {
        // The decoder takes the keys as one slice; the entries keep the rest.
        self.fwknop_keys = entries
            .iter_mut()
            .map(|e| crate::fwknop::SpaKeys {
                encryption: std::mem::take(&mut e.keys.encryption),
                hmac: std::mem::take(&mut e.keys.hmac),
                digest: e.keys.digest,
            })
            .collect();
        self.fwknop = entries;
    }

    /// The fwknop stanzas' keys, in order (for [`crate::fwknop::open`]).
    #[must_use]
    pub fn fwknop_keys(&self) -> &[crate::fwknop::SpaKeys] {
        &self.fwknop_keys
    }

    /// The fwknop stanza at `index`.
    #[must_use]
    pub fn fwknop(&self, index: usize) -> Option<&FwknopEntry> {
        self.fwknop.get(index)
    }

    /// Whether there are no keys (knocks can then open nothing).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.fwknop.is_empty()
    }
}

/// Server-wide limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Grant length when none is asked for.
    pub default_ttl: Duration,
    /// Cap on every grant.
    pub max_ttl: Duration,
}

/// What a knock may open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    /// The address the hole is for.
    pub address: IpAddr,
    /// How long it stays open.
    pub ttl: Duration,
    /// Whether the requested TTL was cut to a cap.
    pub capped: bool,
}

/// Why a verified knock opens nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyRefusal {
    /// No service on this server has the id the knock names (a service removed, or
    /// not yet added, here; or a client's typo).
    #[error("no service on this server has id {0} (a service name the config does not define?)")]
    UnknownService(ServiceId),
    /// The key may not open this service.
    #[error("service `{0}` not allowed for this key")]
    Service(String),
    /// The knock names no address, and the key requires one.
    #[error(
        "knock is unbound (names no address) and the key requires a bound one (allow_unbound = false; an old client, or `source = \"packet\"`? for an fwknop stanza: require_source_address = true, and the client sent -s)"
    )]
    Unbound,
    /// The knock names another address than the one it came from, and the key does
    /// not allow that.
    #[error("knock is bound to {claimed}, not to its source")]
    OtherSource {
        /// The address in the knock.
        claimed: IpAddr,
    },
    /// The address is outside the key's allowed networks.
    #[error("address {0} outside the key's allowed sources")]
    Source(IpAddr),
    /// The key holds as many grants as it may (`max_grants`); renewals still work.
    #[error(
        "the key holds {max} grants already, its max_grants; a renewal works, a new address does not"
    )]
    KeyGrants {
        /// The key's `max_grants`.
        max: usize,
    },
}

/// The address as the firewall sees it: IPv4-mapped IPv6 (`::ffff:a.b.c.d`, what a
/// dual-stack socket reports) becomes plain IPv4.
#[must_use]
pub fn canonical(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        IpAddr::V4(_) => addr,
    }
}

/// Decides what a knock verified for `key` and received from `source` may open.
pub fn decide(
    key: &impl Asker,
    service: &str,
    claim: AddressClaim,
    requested_ttl_secs: u32,
    source: IpAddr,
    limits: Limits,
) -> Result<Grant, PolicyRefusal> {
    if !key.services().iter().any(|s| s == service) {
        return Err(PolicyRefusal::Service(service.to_owned()));
    }
    if claim == AddressClaim::PacketSource && !key.unbound() {
        return Err(PolicyRefusal::Unbound);
    }
    let source = canonical(source);
    let address = match claim {
        AddressClaim::PacketSource => source,
        AddressClaim::V4(a) => canonical(IpAddr::V4(a)),
        AddressClaim::V6(a) => canonical(IpAddr::V6(a)),
    };
    if address != source && !key.other_source() {
        return Err(PolicyRefusal::OtherSource { claimed: address });
    }
    if !key.sources().iter().any(|net| net.contains(&address)) {
        return Err(PolicyRefusal::Source(address));
    }
    let (ttl, capped) = cap_ttl(requested_ttl_secs, key.max_ttl(), limits);
    Ok(Grant {
        address,
        ttl,
        capped,
    })
}

/// The grant length for a request of `requested_secs` (0 = default), capped by the
/// key's and the server's maximum; capped requests are granted the cap, not refused.
#[must_use]
pub fn cap_ttl(requested_secs: u32, key_max: Option<Duration>, limits: Limits) -> (Duration, bool) {
    let cap = key_max.map_or(limits.max_ttl, |k| k.min(limits.max_ttl));
    let wanted = if requested_secs == 0 {
        limits.default_ttl
    } else {
        Duration::from_secs(u64::from(requested_secs))
    };
    if wanted > cap {
        (cap, requested_secs != 0)
    } else {
        (wanted, false)
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn key(other_source: bool, sources: &[&str]) -> KeyEntry {
        KeyEntry {
            secret: Secret::from_hex(&"ab".repeat(32)).unwrap(),
            services: vec!["ssh".to_owned()],
            sources: sources.iter().map(|s| s.parse().unwrap()).collect(),
            max_ttl: Some(Duration::from_secs(600)),
            other_source,
            unbound: true,
            max_grants: 64,
        }
    }

    const LIMITS: Limits = Limits {
        default_ttl: Duration::from_secs(300),
        max_ttl: Duration::from_secs(3600),
    };

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn grants_the_packet_source_for_the_default_ttl() {
        let k = key(false, &["0.0.0.0/0"]);
        let g = decide(
            &k,
            "ssh",
            AddressClaim::PacketSource,
            0,
            ip("198.51.100.7"),
            LIMITS,
        );
        assert_eq!(
            g,
            Ok(Grant {
                address: ip("198.51.100.7"),
                ttl: Duration::from_secs(300),
                capped: false
            })
        );
    }

    #[test]
    fn mapped_ipv6_sources_become_ipv4() {
        let k = key(false, &["198.51.100.0/24"]);
        let g = decide(
            &k,
            "ssh",
            AddressClaim::PacketSource,
            60,
            ip("::ffff:198.51.100.7"),
            LIMITS,
        );
        assert_eq!(g.unwrap().address, ip("198.51.100.7"));
    }

    #[test]
    fn ttl_over_the_key_cap_is_capped_not_refused() {
        let k = key(false, &["::/0", "0.0.0.0/0"]);
        let g = decide(
            &k,
            "ssh",
            AddressClaim::PacketSource,
            7200,
            ip("2001:db8::1"),
            LIMITS,
        )
        .unwrap();
        assert_eq!((g.ttl, g.capped), (Duration::from_secs(600), true));
    }

    #[test]
    fn server_cap_applies_when_the_key_has_none() {
        let mut k = key(false, &["0.0.0.0/0"]);
        k.max_ttl = None;
        let g = decide(
            &k,
            "ssh",
            AddressClaim::PacketSource,
            99_999,
            ip("192.0.2.1"),
            LIMITS,
        )
        .unwrap();
        assert_eq!(g.ttl, Duration::from_secs(3600));
    }

    #[test]
    fn an_unbound_knock_needs_the_key_to_allow_it() {
        let mut k = key(false, &["0.0.0.0/0"]);
        k.unbound = false;
        let source = ip("198.51.100.7");
        assert_eq!(
            decide(&k, "ssh", AddressClaim::PacketSource, 0, source, LIMITS),
            Err(PolicyRefusal::Unbound)
        );
        let bound = AddressClaim::V4(Ipv4Addr::new(198, 51, 100, 7));
        assert_eq!(
            decide(&k, "ssh", bound, 0, source, LIMITS).map(|g| g.address),
            Ok(source)
        );
    }

    #[test]
    fn another_address_needs_the_key_to_allow_it() {
        let claim = AddressClaim::V4(Ipv4Addr::new(203, 0, 113, 9));
        let strict = key(false, &["0.0.0.0/0"]);
        assert_eq!(
            decide(&strict, "ssh", claim, 60, ip("198.51.100.7"), LIMITS),
            Err(PolicyRefusal::OtherSource {
                claimed: ip("203.0.113.9")
            })
        );
        let nat = key(true, &["0.0.0.0/0"]);
        let g = decide(&nat, "ssh", claim, 60, ip("198.51.100.7"), LIMITS).unwrap();
        assert_eq!(g.address, ip("203.0.113.9"));
    }

    #[test]
    fn claiming_its_own_source_is_fine_without_nat_permission() {
        let k = key(false, &["0.0.0.0/0"]);
        let claim = AddressClaim::V4(Ipv4Addr::new(198, 51, 100, 7));
        assert!(decide(&k, "ssh", claim, 60, ip("198.51.100.7"), LIMITS).is_ok());
    }

    #[test]
    fn addresses_outside_the_key_networks_are_refused() {
        let k = key(false, &["198.51.100.0/24"]);
        assert_eq!(
            decide(
                &k,
                "ssh",
                AddressClaim::PacketSource,
                60,
                ip("203.0.113.1"),
                LIMITS
            ),
            Err(PolicyRefusal::Source(ip("203.0.113.1")))
        );
    }

    #[test]
    fn a_key_without_the_service_opens_nothing() {
        let mut k = key(false, &["0.0.0.0/0"]);
        k.services.clear();
        assert_eq!(
            decide(
                &k,
                "ssh",
                AddressClaim::PacketSource,
                60,
                ip("192.0.2.1"),
                LIMITS
            ),
            Err(PolicyRefusal::Service("ssh".to_owned()))
        );
    }

    #[test]
    fn a_key_opens_the_services_it_lists_and_no_other() {
        let mut k = key(false, &["0.0.0.0/0"]);
        k.services = vec!["ssh".to_owned(), "wireguard".to_owned()];
        let source = ip("192.0.2.1");
        let claim = AddressClaim::V4("192.0.2.1".parse().unwrap());
        for allowed in ["ssh", "wireguard"] {
            assert!(
                decide(&k, allowed, claim, 60, source, LIMITS).is_ok(),
                "{allowed}"
            );
        }
        for refused in ["staging", "egress", "Wireguard"] {
            assert_eq!(
                decide(&k, refused, claim, 60, source, LIMITS),
                Err(PolicyRefusal::Service(refused.to_owned())),
                "{refused}"
            );
        }
    }
}
