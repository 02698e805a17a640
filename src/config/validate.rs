//! Checks that go beyond types: ranges, duplicates, addresses, names. Each error
//! names the key path (`inbound.tcp_ports[2]`) and what was expected.

use std::collections::HashSet;
use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use super::schema::{LEAST_GRANTS, MOST_GRANTS};
use super::{Config, ConfigError};
use crate::knock::KeyId;
use crate::knock::auth::ServerId;

/// Longest log prefix accepted; the kernel allows 127 bytes and knockgate appends the chain name.
const MAX_LOG_PREFIX: usize = 100;
/// Longest table name accepted (the kernel allows 255; short names keep `nft list` readable).
const MAX_TABLE_NAME: usize = 64;
/// Longest clock skew accepted: a wider window keeps more nonces and helps replays.
const MAX_SKEW: Duration = Duration::from_secs(10 * 60);
/// Longest grant anything may ask for.
const MAX_GRANT: Duration = Duration::from_secs(24 * 60 * 60);

/// Builds errors for one config file.
struct Checker<'a> {
    path: &'a Path,
}

impl Checker<'_> {
    fn invalid(&self, key: &str, expected: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_owned(),
            key: key.to_owned(),
            expected: expected.into(),
        }
    }

    fn port(&self, key: &str, port: u16) -> Result<(), ConfigError> {
        if port == 0 {
            return Err(self.invalid(key, "port 0 is not a port; expected 1-65535"));
        }
        Ok(())
    }

    fn positive(&self, key: &str, n: u32) -> Result<(), ConfigError> {
        if n == 0 {
            return Err(self.invalid(key, "expected a number of at least 1"));
        }
        Ok(())
    }

    fn duration(&self, key: &str, d: Duration, max: Duration) -> Result<(), ConfigError> {
        if d < Duration::from_secs(1) || d > max {
            let max = humantime::format_duration(max);
            return Err(self.invalid(key, format!("expected a duration from 1s to {max}")));
        }
        Ok(())
    }
}

/// Every check of `config`, read from `path`.
pub(super) fn validate(path: &Path, config: &Config) -> Result<(), ConfigError> {
    let c = Checker { path };
    table(&c, config)?;
    inbound(&c, config)?;
    knock(&c, config)?;
    services(&c, config)?;
    keys(&c, config)?;
    fwknop_keys(&c, config)?;
    sequence(&c, config)?;
    log(&c, config)?;
    dns(&c, config)?;
    egress(&c, config)?;
    if config.admin.group.is_empty() {
        return Err(c.invalid("admin.group", "expected a group name"));
    }
    if config.conntrack_mark == 0 {
        return Err(c.invalid(
            "conntrack_mark",
            "expected a non-zero mark (one bit, e.g. 0x10000000)",
        ));
    }
    Ok(())
}

/// Most grants one key may be allowed: what knocks may take of the daemon's 100,000
/// (the rest is kept for admins).
const MAX_KEY_GRANTS: u32 = 99_000;
fn table(c: &Checker<'_>, config: &Config) -> Result<(), ConfigError> {
    let ok = !config.table.is_empty()
        && config.table.len() <= MAX_TABLE_NAME
        && config
            .table
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if !ok {
        let expected = format!("expected 1 to {MAX_TABLE_NAME} letters, digits, `_` or `-`");
        return Err(c.invalid("table", expected));
    }
    Ok(())
}

fn inbound(c: &Checker<'_>, config: &Config) -> Result<(), ConfigError> {
    let mut seen = HashSet::new();
    for (i, &port) in config.inbound.tcp_ports.iter().enumerate() {
        let key = format!("inbound.tcp_ports[{i}]");
        c.port(&key, port)?;
        if !seen.insert(port) {
            return Err(c.invalid(&key, format!("port {port} is listed twice")));
        }
        if port == config.inbound.ssh_port {
            let why =
                format!("port {port} is the SSH port, which opens only for grants; remove it here");
            return Err(c.invalid(&key, why));
        }
    }
    c.port("inbound.ssh_port", config.inbound.ssh_port)?;
    c.positive(
        "inbound.ping_rate_per_second",
        config.inbound.ping_rate_per_second,
    )
}

fn knock(c: &Checker<'_>, config: &Config) -> Result<(), ConfigError> {
    let k = &config.knock;
    c.port("knock.port", k.port)?;
    c.positive("knock.rate_per_second", k.rate_per_second)?;
    c.positive("knock.burst", k.burst)?;
    if !(16..=1 << 20).contains(&k.meter_size) {
        return Err(c.invalid("knock.meter_size", "expected 16 to 1048576 sources"));
    }
    if !(LEAST_GRANTS..=MOST_GRANTS).contains(&k.max_grants) {
        return Err(c.invalid(
            "knock.max_grants",
            format!("expected {LEAST_GRANTS} to {MOST_GRANTS} grants"),
        ));
    }
    c.positive(
        "knock.full_meter_rate_per_second",
        k.full_meter_rate_per_second,
    )?;
    if !(32..=128).contains(&k.ipv6_prefix) {
        return Err(c.invalid("knock.ipv6_prefix", "expected a prefix length of 32 to 128"));
    }
    if !k.server_id.is_empty() && ServerId::new(&k.server_id).is_err() {
        return Err(c.invalid(
            "knock.server_id",
            "expected 1 to 255 bytes without control characters",
        ));
    }
    c.duration("knock.skew", k.skew.0, MAX_SKEW)?;
    c.duration("knock.max_ttl", k.max_ttl.0, MAX_GRANT)?;
    c.duration("knock.default_ttl", k.default_ttl.0, k.max_ttl.0)?;
    if k.state_dir.as_os_str().is_empty() {
        return Err(c.invalid("knock.state_dir", "expected a directory"));
    }
    c.positive("knock.ban.after", k.ban.after)?;
    // The most that was measured through every whole-table change within the unit's
    // MemoryMax (README, "Bounded"): more could make a full ban set unappliable.
    if !(1..=65_536).contains(&k.ban.max) {
        return Err(c.invalid("knock.ban.max", "expected 1 to 65536 bans"));
    }
    c.duration("knock.ban.within", k.ban.within.0, MAX_GRANT)?;
    c.duration("knock.ban.duration", k.ban.duration.0, MAX_GRANT)
}

fn keys(c: &Checker<'_>, config: &Config) -> Result<(), ConfigError> {
    let mut ids = HashSet::new();
    for (i, key) in config.keys.iter().enumerate() {
        let at = |field: &str| format!("keys[{i}].{field}");
        if KeyId::new(&key.id).is_err() {
            let expected = "expected 1 to 32 letters, digits, `.`, `_` or `-`";
            return Err(c.invalid(&at("id"), expected));
        }
        if !ids.insert(key.id.as_str()) {
            return Err(c.invalid(&at("id"), format!("key id `{}` is used twice", key.id)));
        }
        let mut listed = HashSet::new();
        for (j, service) in key.services.iter().enumerate() {
            let at = at(&format!("services[{j}]"));
            let known = service == crate::service::SSH
                || service == crate::service::EGRESS
                || config.services.iter().any(|s| &s.name == service);
            if !known {
                let mut names = vec!["\"ssh\"".to_owned(), "\"egress\"".to_owned()];
                names.extend(config.services.iter().map(|s| format!("\"{}\"", s.name)));
                let expected = format!(
                    "unknown service `{service}`; define it under [[services]] or use one of: {}",
                    names.join(", ")
                );
                return Err(c.invalid(&at, expected));
            }
            if !listed.insert(service.as_str()) {
                return Err(c.invalid(&at, format!("service `{service}` is listed twice")));
            }
            if service == crate::service::EGRESS && config.outbound != super::Outbound::Locked {
                let expected = "`egress` opens outbound HTTP/HTTPS, which outbound = \"open\" never closes; remove it or set outbound = \"locked\"";
                return Err(c.invalid(&at, expected));
            }
        }
        for (j, net) in key.sources.iter().enumerate() {
            if super::parse_network(net).is_none() {
                let expected =
                    format!("`{net}` is not an address or a network like 198.51.100.0/24");
                return Err(c.invalid(&at(&format!("sources[{j}]")), expected));
            }
        }
        if let Some(max) = key.max_ttl {
            c.duration(&at("max_ttl"), max.0, MAX_GRANT)?;
        }
        if !(1..=MAX_KEY_GRANTS).contains(&key.max_grants) {
            return Err(c.invalid(
                &at("max_grants"),
                format!("expected 1 to {MAX_KEY_GRANTS} grants"),
            ));
        }
    }
    Ok(())
}

/// The ports the baseline itself uses: the public ones, the knock port and SSH, each
/// with its protocol and how an error names it.
fn baseline_ports(
    config: &Config,
) -> Vec<(crate::service::Protocol, crate::service::Ports, String)> {
    use crate::service::{Ports, Protocol};
    let mut taken: Vec<(Protocol, Ports, String)> = config
        .inbound
        .tcp_ports
        .iter()
        .map(|&p| {
            (
                Protocol::Tcp,
                Ports::one(p),
                format!("public port {p} (inbound.tcp_ports)"),
            )
        })
        .collect();
    taken.push((
        Protocol::Udp,
        Ports::one(config.knock.port),
        format!("the knock port {} (knock.port)", config.knock.port),
    ));
    taken.push((
        Protocol::Tcp,
        Ports::one(config.inbound.ssh_port),
        format!("service `ssh` (port {})", config.inbound.ssh_port),
    ));
    taken
}

/// `[[services]]`: good names, used once, not `ssh` or `egress`; ports that are not
/// public, not the knock port, and not another service's (same protocol).
fn services(c: &Checker<'_>, config: &Config) -> Result<(), ConfigError> {
    use crate::service;
    if config.services.len() > service::MAX_SERVICES {
        return Err(c.invalid(
            "services",
            format!(
                "{} services; at most {} are supported",
                config.services.len(),
                service::MAX_SERVICES
            ),
        ));
    }
    // Everything a service may not overlap: the public ports, the knock port, and
    // every service before it (ssh first).
    let mut taken = baseline_ports(config);
    let mut names = HashSet::new();
    for (i, spec) in config.services.iter().enumerate() {
        let at = |field: &str| format!("services[{i}].{field}");
        let name = spec.name.as_str();
        if !service::valid_name(name) {
            let expected = format!(
                "`{}` is not a service name; expected 1 to {} of a-z, 0-9 and `_`, starting with a letter",
                name.escape_debug(),
                service::MAX_NAME_LEN
            );
            return Err(c.invalid(&at("name"), expected));
        }
        if name == service::SSH || name == service::EGRESS {
            let expected = format!(
                "`{name}` is built in (ssh: inbound.ssh_port; egress: an egress window); choose another name"
            );
            return Err(c.invalid(&at("name"), expected));
        }
        if !names.insert(name) {
            return Err(c.invalid(&at("name"), format!("service `{name}` is defined twice")));
        }
        let ports = spec.port.parse().map_err(|e| c.invalid(&at("port"), e))?;
        if let Some((_, _, what)) = taken
            .iter()
            .find(|(proto, p, _)| *proto == spec.protocol && p.overlaps(ports))
        {
            let expected = format!(
                "{} {ports} overlaps {what}; a service's port opens only for grants",
                spec.protocol.name()
            );
            return Err(c.invalid(&at("port"), expected));
        }
        let id = service::ServiceId::of(name);
        if let Some(other) = config.services[..i]
            .iter()
            .map(|s| s.name.as_str())
            .chain([service::SSH, service::EGRESS])
            .find(|other| service::ServiceId::of(other) == id)
        {
            // One in four billion; refused rather than letting two names share knocks.
            let expected = format!("`{name}` has the same wire id ({id}) as `{other}`; rename one");
            return Err(c.invalid(&at("name"), expected));
        }
        taken.push((
            spec.protocol,
            ports,
            format!("service `{name}` ({} {ports})", spec.protocol.name()),
        ));
    }
    Ok(())
}

/// Most keys with a port sequence: each takes `length` kernel elements per step (the
/// bench measures a rotation of 1, 100 and 1,000).
pub const MAX_SEQUENCE_KEYS: usize = 4_096;

/// Fewest bits of guessing a sequence may take (`length` × log2 of the touches one can
/// be): 3 touches of 31,000 ports are 44.7, 4 of 1,024 are 40. Checked in integers
/// (`slots^length ≥ 2^40`), which also spares the daemon libm.
const MIN_SEQUENCE_BITS: u32 = 40;

/// `[sequence]` and the keys' `sequence*` fields.
fn sequence(c: &Checker<'_>, config: &Config) -> Result<(), ConfigError> {
    use crate::sequence::{LENGTHS, MIN_RANGE, STEP_SECS, TouchProtocols};
    use crate::service::Ports;
    let q = &config.sequence;
    let ports: Ports = q
        .ports
        .parse()
        .map_err(|e| c.invalid("sequence.ports", e))?;
    let size = u32::from(ports.last) - u32::from(ports.first) + 1;
    if size < MIN_RANGE {
        return Err(c.invalid(
            "sequence.ports",
            format!(
                "{size} ports; a sequence range needs at least {MIN_RANGE} (fewer are guessable)"
            ),
        ));
    }
    let Some(protocols) = TouchProtocols::from_name(&q.protocol) else {
        return Err(c.invalid(
            "sequence.protocol",
            format!(
                "found \"{}\", expected one of: \"tcp\", \"udp\", \"mixed\"",
                q.protocol.escape_debug()
            ),
        ));
    };
    // Never a port the baseline uses, in a protocol the touches use.
    let mut taken = baseline_ports(config);
    for s in &config.services {
        if let Ok(p) = s.port.parse() {
            taken.push((
                s.protocol,
                p,
                format!("service `{}` ({} {p})", s.name, s.protocol.name()),
            ));
        }
    }
    if let Some((_, _, what)) = taken
        .iter()
        .find(|(proto, p, _)| protocols.protocols().contains(proto) && p.overlaps(ports))
    {
        return Err(c.invalid(
            "sequence.ports",
            format!("{ports} overlaps {what}; touches must go to ports nothing else uses"),
        ));
    }
    if !LENGTHS.contains(&q.length) {
        return Err(c.invalid("sequence.length", "expected 3 to 8 touches"));
    }
    // Each touch is one of `slots`; a random guess of a whole sequence must be at least
    // this unlikely (a sweep tests a new guess with almost every packet).
    let slots = if protocols == TouchProtocols::Mixed {
        2 * size
    } else {
        size
    };
    // Every sequence there can be; too many to count is plenty.
    let space = u128::from(slots).checked_pow(u32::from(q.length));
    if let Some(space) = space.filter(|&n| n < 1 << MIN_SEQUENCE_BITS) {
        return Err(c.invalid(
            "sequence.length",
            format!(
                "{} touches of {slots} ports are {} bits; at least {MIN_SEQUENCE_BITS} are needed (more touches or a wider range)",
                q.length,
                space.ilog2()
            ),
        ));
    }
    let step = q.step.0;
    let whole = step.subsec_nanos() == 0
        && u32::try_from(step.as_secs()).is_ok_and(|s| STEP_SECS.contains(&s));
    if !whole {
        return Err(c.invalid("sequence.step", "expected whole seconds from 2s to 1h"));
    }
    if !(16..=1 << 20).contains(&q.max_sources) {
        return Err(c.invalid("sequence.max_sources", "expected 16 to 1048576 sources"));
    }
    sequence_keys(c, config)
}

/// The keys' `sequence*` fields: what a sequence opens, for how long, and for whom.
fn sequence_keys(c: &Checker<'_>, config: &Config) -> Result<(), ConfigError> {
    let mut count = 0;
    for (i, key) in config.keys.iter().enumerate() {
        let at = |field: &str| format!("keys[{i}].{field}");
        if !key.sequence {
            if key.sequence_service.is_some() || key.sequence_ttl.is_some() {
                return Err(c.invalid(
                    &at("sequence"),
                    "sequence_service and sequence_ttl need sequence = true",
                ));
            }
            continue;
        }
        count += 1;
        let service = super::sequence_service(key);
        if !key.services.iter().any(|s| s == service) || service == crate::service::EGRESS {
            return Err(c.invalid(
                &at("sequence_service"),
                format!("`{service}` is not one of this key's services (egress cannot be opened by a sequence)"),
            ));
        }
        let nets: Vec<ipnet::IpNet> = key
            .sources
            .iter()
            .filter_map(|s| super::parse_network(s))
            .collect();
        let anywhere = |v4: bool| {
            nets.iter()
                .any(|n| n.prefix_len() == 0 && matches!(n, ipnet::IpNet::V4(_)) == v4)
        };
        if !(anywhere(true) && anywhere(false)) {
            return Err(c.invalid(
                &at("sequence"),
                "a sequence is judged by the kernel, which does not see a key's `sources`; a key restricted to some networks cannot have one (use knocks, which check them)",
            ));
        }
        if let Some(ttl) = key.sequence_ttl {
            let max = key
                .max_ttl
                .map_or(config.knock.max_ttl.0, |m| m.0.min(config.knock.max_ttl.0));
            c.duration(&at("sequence_ttl"), ttl.0, max)?;
        }
    }
    if count > MAX_SEQUENCE_KEYS {
        return Err(c.invalid(
            "keys",
            format!("{count} keys with sequence = true; at most {MAX_SEQUENCE_KEYS} are supported"),
        ));
    }
    let classes = crate::ruleset::sequence::classes(config).len();
    if classes > crate::ruleset::sequence::MAX_CLASSES {
        return Err(c.invalid(
            "keys",
            format!(
                "the sequence keys open {classes} different (service, sequence_ttl) pairs; at most {} are supported: give keys the same TTLs",
                crate::ruleset::sequence::MAX_CLASSES
            ),
        ));
    }
    Ok(())
}

/// Most fwknop stanzas: each costs one HMAC per packet that looks like fwknop's
/// (the bench measures 1, 10 and 100).
pub const MAX_FWKNOP_KEYS: usize = 100;

fn fwknop_keys(c: &Checker<'_>, config: &Config) -> Result<(), ConfigError> {
    if config.fwknop_keys.len() > MAX_FWKNOP_KEYS {
        return Err(c.invalid(
            "fwknop_keys",
            format!(
                "{} stanzas; at most {MAX_FWKNOP_KEYS} (each costs one HMAC per packet)",
                config.fwknop_keys.len()
            ),
        ));
    }
    let mut names: HashSet<&str> = config.keys.iter().map(|k| k.id.as_str()).collect();
    for (i, spec) in config.fwknop_keys.iter().enumerate() {
        let at = |field: &str| format!("fwknop_keys[{i}].{field}");
        if KeyId::new(&spec.name).is_err() {
            return Err(c.invalid(
                &at("name"),
                "expected 1 to 32 letters, digits, `.`, `_` or `-`",
            ));
        }
        if !names.insert(spec.name.as_str()) {
            return Err(c.invalid(
                &at("name"),
                format!(
                    "`{}` is already the name of a key or another fwknop stanza",
                    spec.name
                ),
            ));
        }
        if crate::fwknop::HmacDigest::from_name(&spec.hmac_digest).is_none() {
            return Err(c.invalid(
                &at("hmac_digest"),
                format!(
                    "found \"{}\", expected one of: \"sha256\", \"sha384\", \"sha512\"",
                    spec.hmac_digest.escape_debug()
                ),
            ));
        }
        for (j, service) in spec.services.iter().enumerate() {
            let known = service == crate::service::SSH
                || config.services.iter().any(|s| &s.name == service);
            if !known {
                return Err(c.invalid(
                    &at(&format!("services[{j}]")),
                    format!("unknown service `{service}`; fwknop clients open ports: ssh or one of [[services]] (not egress)"),
                ));
            }
        }
        for (j, net) in spec.sources.iter().enumerate() {
            if super::parse_network(net).is_none() {
                return Err(c.invalid(
                    &at(&format!("sources[{j}]")),
                    format!("`{net}` is not an address or a network like 198.51.100.0/24"),
                ));
            }
        }
        c.duration(&at("ttl"), spec.ttl.0, MAX_GRANT)?;
        if let Some(max) = spec.max_ttl {
            c.duration(&at("max_ttl"), max.0, MAX_GRANT)?;
        }
        if !(1..=MAX_KEY_GRANTS).contains(&spec.max_grants) {
            return Err(c.invalid(
                &at("max_grants"),
                format!("expected 1 to {MAX_KEY_GRANTS} grants"),
            ));
        }
    }
    Ok(())
}

fn log(c: &Checker<'_>, config: &Config) -> Result<(), ConfigError> {
    c.positive("log.rate_per_minute", config.log.rate_per_minute)?;
    let prefix = &config.log.prefix;
    let ok = prefix.len() <= MAX_LOG_PREFIX
        && prefix
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\' || b == b' ');
    if !ok {
        let expected = format!(
            "expected at most {MAX_LOG_PREFIX} printable ASCII characters without quotes or backslashes"
        );
        return Err(c.invalid("log.prefix", expected));
    }
    Ok(())
}

fn egress(c: &Checker<'_>, config: &Config) -> Result<(), ConfigError> {
    let mut seen = HashSet::new();
    for (i, &port) in config.egress.ports.iter().enumerate() {
        let key = format!("egress.ports[{i}]");
        c.port(&key, port)?;
        if !seen.insert(port) {
            return Err(c.invalid(&key, format!("port {port} is listed twice")));
        }
    }
    c.duration("egress.max_ttl", config.egress.max_ttl.0, MAX_GRANT)
}

fn dns(c: &Checker<'_>, config: &Config) -> Result<(), ConfigError> {
    let mut seen = HashSet::new();
    for (i, text) in config.dns.resolvers.iter().enumerate() {
        let key = format!("dns.resolvers[{i}]");
        let addr: IpAddr = text
            .parse()
            .map_err(|_| c.invalid(&key, format!("`{text}` is not an IPv4 or IPv6 address")))?;
        if !seen.insert(addr) {
            return Err(c.invalid(&key, format!("resolver {addr} is listed twice")));
        }
    }
    Ok(())
}
