//! Config → the baseline ruleset of a hardened web server.
//!
//! Each helper adds one purpose's rules and is named for it, so the order of
//! the chains reads like the policy. Pure: the resolvers arrive already read.

use std::net::IpAddr;

use super::{
    ChainDef, CounterDef, CtState, Expr, Hook, IpFamily, Per, Policy, Rate, Rule, Ruleset, SetDef,
    SetKeyType, SetKind, Verdict, icmp, icmpv6,
};
use crate::config::{Config, Forward, Outbound};
use crate::service::{PortService, Ports, Protocol, port_services};

/// Name of the set of IPv4 sources granted SSH (every service `NAME` has its
/// `NAME_grants_v4` and `NAME_grants_v6`: [`crate::service::grant_set`]).
pub const SSH_GRANTS_V4: &str = "ssh_grants_v4";
/// Name of the set of IPv6 sources granted SSH.
pub const SSH_GRANTS_V6: &str = "ssh_grants_v6";
/// Name of the set of IPv4 sources banned from the knock port.
pub const KNOCK_BAN_V4: &str = "knock_ban_v4";
/// Name of the set of IPv6 sources banned from the knock port.
pub const KNOCK_BAN_V6: &str = "knock_ban_v6";
/// Name of the set of cgroup ids whose sockets may open egress connections.
pub const EGRESS_CGROUPS: &str = "egress_cgroups";
/// Name of the set of (cgroup id, IPv4 destination) pairs of `--to` windows.
pub const EGRESS_TO_V4: &str = "egress_to_v4";
/// Name of the set of (cgroup id, IPv6 destination) pairs of `--to` windows.
pub const EGRESS_TO_V6: &str = "egress_to_v6";
/// Name of the host-wide egress switch: holds `tcp` while a host-wide window is open.
pub const EGRESS_HOST: &str = "egress_host";
/// Deepest cgroup an egress window may live in (1 = a child of the cgroup2 root; a
/// system scope sits at 2, a user manager's scope at 5:
/// `/user.slice/user-1000.slice/user@1000.service/app.slice/run-….scope`).
pub const MAX_EGRESS_CGROUP_LEVEL: u32 = 6;
/// The named counter of datagrams the kernel dropped on the knock port as junk.
pub const KNOCK_JUNK: &str = "knock_junk";
const KNOCK_METER_V4: &str = "knock_meter_v4";
const KNOCK_METER_V6: &str = "knock_meter_v6";
/// The sources the meters track, in sets without per-element state: a lookup finds
/// them (in a meter set it finds nothing), which tells "over its rate" from "not
/// tracked because the meter is full".
const KNOCK_SOURCES_V4: &str = "knock_sources_v4";
const KNOCK_SOURCES_V6: &str = "knock_sources_v6";
/// Room the meter sets keep beyond the sources sets, so the sources set is always the
/// one that fills first (expired elements linger until the kernel collects them).
const METER_HEADROOM: u32 = 1024;
/// Seconds an idle source stays in a knock meter.
const KNOCK_METER_TIMEOUT_SECS: u32 = 60;
/// Burst for the kernel log rate limit.
const LOG_BURST: u32 = 5;
const DNS_PORT: u16 = 53;

/// ICMPv6 that neighbour discovery (and MLD, which ND's multicast needs) takes in.
const ND_IN: &[u8] = &[
    icmpv6::ND_ROUTER_ADVERT,
    icmpv6::ND_NEIGHBOR_SOLICIT,
    icmpv6::ND_NEIGHBOR_ADVERT,
    icmpv6::MLD_LISTENER_QUERY,
];
/// ICMPv6 that neighbour discovery sends out.
const ND_OUT: &[u8] = &[
    icmpv6::ND_ROUTER_SOLICIT,
    icmpv6::ND_NEIGHBOR_SOLICIT,
    icmpv6::ND_NEIGHBOR_ADVERT,
    icmpv6::MLD2_LISTENER_REPORT,
];
/// ICMPv6 this host may send that conntrack does not always mark as related.
const ICMPV6_OUT: &[u8] = &[
    icmpv6::ECHO_REPLY,
    icmpv6::DESTINATION_UNREACHABLE,
    icmpv6::PACKET_TOO_BIG,
    icmpv6::TIME_EXCEEDED,
    icmpv6::PARAMETER_PROBLEM,
];
const ICMP_OUT: &[u8] = &[icmp::ECHO_REPLY, icmp::DESTINATION_UNREACHABLE];

/// The baseline for `config`, with DNS allowed to `resolvers` only.
#[must_use]
pub fn baseline(config: &Config, resolvers: &[IpAddr]) -> Ruleset {
    let mut chains = vec![input_chain(config), output_chain(config, resolvers)];
    if config.forward == Forward::Drop {
        chains.push(forward_chain(config));
    }
    Ruleset {
        table: config.table.clone(),
        sets: sets(config),
        chains,
        counters: vec![CounterDef {
            name: KNOCK_JUNK.to_owned(),
            packets: 0,
            bytes: 0,
        }],
    }
}

fn sets(config: &Config) -> Vec<SetDef> {
    let sources = SetKind::Meter {
        size: config.knock.meter_size,
        timeout_secs: KNOCK_METER_TIMEOUT_SECS,
    };
    let meter = SetKind::Meter {
        size: config.knock.meter_size.saturating_add(METER_HEADROOM),
        timeout_secs: KNOCK_METER_TIMEOUT_SECS,
    };
    let grant_sets: Vec<(String, IpFamily)> = port_services(config)
        .iter()
        .flat_map(|s| [IpFamily::V4, IpFamily::V6].map(|f| (s.grant_set(f), f)))
        .collect();
    // Grant sets that sequence rules add to need a size (the kernel would cap them
    // at 65,535): the most `knock.max_grants` may be, whatever it is now — sized by
    // it, a set could not be kept, nor filled again, after it was lowered below the
    // grants it holds (the kernel refuses adds past a set's size). The daemon closes
    // what rules add past a key's grants or the daemon's.
    let ruled: Vec<String> = super::sequence::classes(config)
        .iter()
        .flat_map(|c| {
            [IpFamily::V4, IpFamily::V6].map(|f| crate::service::grant_set(&c.service, f))
        })
        .collect();
    let mut sets: Vec<(&str, IpFamily, SetKind)> = grant_sets
        .iter()
        .map(|(name, family)| {
            let kind = if ruled.contains(name) {
                SetKind::RuleGrants {
                    size: crate::config::MOST_GRANTS,
                }
            } else {
                SetKind::Grants
            };
            (name.as_str(), *family, kind)
        })
        .collect();
    if config.knock.ban.enabled {
        let bans = SetKind::Bans {
            size: config.knock.ban.max,
        };
        sets.push((KNOCK_BAN_V4, IpFamily::V4, bans));
        sets.push((KNOCK_BAN_V6, IpFamily::V6, bans));
    }
    sets.push((KNOCK_SOURCES_V4, IpFamily::V4, sources));
    sets.push((KNOCK_SOURCES_V6, IpFamily::V6, sources));
    sets.push((KNOCK_METER_V4, IpFamily::V4, meter));
    sets.push((KNOCK_METER_V6, IpFamily::V6, meter));
    let mut defs: Vec<SetDef> = sets
        .into_iter()
        .map(|(name, family, kind)| set(name, SetKeyType::Addr(family), kind))
        .collect();
    if config.outbound == Outbound::Locked {
        defs.push(set(EGRESS_CGROUPS, SetKeyType::Cgroup, SetKind::Grants));
        defs.push(set(EGRESS_HOST, SetKeyType::Proto, SetKind::Grants));
        defs.push(set(
            EGRESS_TO_V4,
            SetKeyType::CgroupAddr(IpFamily::V4),
            SetKind::Grants,
        ));
        defs.push(set(
            EGRESS_TO_V6,
            SetKeyType::CgroupAddr(IpFamily::V6),
            SetKind::Grants,
        ));
    }
    defs.extend(super::sequence::sets(config));
    defs
}

fn set(name: &str, key: SetKeyType, kind: SetKind) -> SetDef {
    SetDef {
        name: name.to_owned(),
        key,
        kind,
        elements: Vec::new(),
    }
}

fn input_chain(config: &Config) -> ChainDef {
    let mut rules = Vec::new();
    rules.push(accept(vec![Expr::IifName("lo".into())]));
    let mark = config.conntrack_mark;
    rules.push(drop_invalid());
    rules.push(accept_established(mark));
    accept_neighbour_discovery(&mut rules, ND_IN);
    if config.inbound.ping {
        accept_ping(&mut rules, config.inbound.ping_rate_per_second, mark);
    }
    allow_public_tcp(&mut rules, &config.inbound.tcp_ports, mark);
    allow_services_from_grants(&mut rules, &port_services(config), mark);
    if config.knock.ban.enabled {
        drop_banned_knockers(&mut rules, config);
    }
    drop_junk_knocks(&mut rules, config);
    accept_knocks_rate_limited(&mut rules, config);
    rules.extend(super::sequence::rules(config));
    log_dropped(&mut rules, config, "input");
    ChainDef {
        name: "input".into(),
        hook: Hook::Input,
        policy: Policy::Drop,
        rules,
    }
}

fn output_chain(config: &Config, resolvers: &[IpAddr]) -> ChainDef {
    let mark = config.conntrack_mark;
    if config.outbound == Outbound::Open {
        // Everything may leave, but the input chain's established rule wants the mark
        // on the replies' connection: the host's own new connections get it here.
        return ChainDef {
            name: "output".into(),
            hook: Hook::Output,
            policy: Policy::Accept,
            rules: vec![admit(Vec::new(), mark)],
        };
    }
    let mut rules = Vec::new();
    rules.push(accept(vec![Expr::OifName("lo".into())]));
    rules.push(drop_invalid());
    rules.push(accept_established(mark));
    accept_neighbour_discovery(&mut rules, ND_OUT);
    accept_icmp_replies_and_errors(&mut rules);
    allow_dns_to_resolvers(&mut rules, resolvers, mark);
    allow_egress_windows(&mut rules, &config.egress.ports, mark);
    log_dropped(&mut rules, config, "output");
    ChainDef {
        name: "output".into(),
        hook: Hook::Output,
        policy: Policy::Drop,
        rules,
    }
}

fn forward_chain(config: &Config) -> ChainDef {
    let mut rules = Vec::new();
    log_dropped(&mut rules, config, "forward");
    ChainDef {
        name: "forward".into(),
        hook: Hook::Forward,
        policy: Policy::Drop,
        rules,
    }
}

fn accept(mut exprs: Vec<Expr>) -> Rule {
    exprs.push(Expr::Verdict(Verdict::Accept));
    Rule(exprs)
}

fn drop_invalid() -> Rule {
    Rule(vec![
        Expr::CtState(vec![CtState::Invalid]),
        Expr::Verdict(Verdict::Drop),
    ])
}

/// A new connection this rule admits: it is marked, so that its later packets pass
/// [`accept_established`]. Only `ct state new`: a connection that exists without
/// the mark got in while the table was gone, and no rule here takes it on.
fn admit(mut exprs: Vec<Expr>, mark: u32) -> Rule {
    exprs.insert(0, Expr::CtState(vec![CtState::New]));
    exprs.push(Expr::CtMarkAdd(mark));
    accept(exprs)
}

/// Packets of connections knockgate admitted (their conntrack entry carries the
/// mark). Connections that slipped in while the table was missing carry no mark, so
/// a repaired baseline drops them (decision 37).
fn accept_established(mark: u32) -> Rule {
    accept(vec![
        Expr::CtState(vec![CtState::Established, CtState::Related]),
        Expr::CtMarkHas(mark),
    ])
}

fn accept_neighbour_discovery(rules: &mut Vec<Rule>, types: &[u8]) {
    for &t in types {
        rules.push(accept(vec![Expr::Icmpv6Type(t)]));
    }
}

fn accept_ping(rules: &mut Vec<Rule>, per_second: u32, mark: u32) {
    let rate = Rate {
        packets: per_second,
        per: Per::Second,
        burst: per_second.saturating_mul(2),
    };
    rules.push(admit(
        vec![Expr::IcmpType(icmp::ECHO_REQUEST), Expr::Limit(rate)],
        mark,
    ));
    rules.push(admit(
        vec![Expr::Icmpv6Type(icmpv6::ECHO_REQUEST), Expr::Limit(rate)],
        mark,
    ));
}

fn allow_public_tcp(rules: &mut Vec<Rule>, ports: &[u16], mark: u32) {
    for &port in ports {
        rules.push(admit(vec![Expr::TcpDport(port)], mark));
    }
}

/// Each service's port(s), for the sources in its grant sets (ssh first).
fn allow_services_from_grants(rules: &mut Vec<Rule>, services: &[PortService], mark: u32) {
    for service in services {
        for family in [IpFamily::V4, IpFamily::V6] {
            rules.push(admit(
                vec![
                    dport(service.protocol, service.ports),
                    Expr::SaddrInSet {
                        family,
                        set: service.grant_set(family),
                        prefix: None,
                    },
                ],
                mark,
            ));
        }
    }
}

fn dport(protocol: Protocol, ports: Ports) -> Expr {
    match (protocol, ports.first == ports.last) {
        (Protocol::Tcp, true) => Expr::TcpDport(ports.first),
        (Protocol::Udp, true) => Expr::UdpDport(ports.first),
        (protocol, false) => Expr::DportRange {
            protocol,
            first: ports.first,
            last: ports.last,
        },
    }
}

/// The prefix IPv6 sources are metered, counted and banned by (none for /128).
#[must_use]
pub fn source_prefix(config: &Config, family: IpFamily) -> Option<u8> {
    match family {
        IpFamily::V4 => None,
        IpFamily::V6 => Some(config.knock.ipv6_prefix).filter(|&bits| bits < 128),
    }
}

fn drop_banned_knockers(rules: &mut Vec<Rule>, config: &Config) {
    for (family, set) in [(IpFamily::V4, KNOCK_BAN_V4), (IpFamily::V6, KNOCK_BAN_V6)] {
        rules.push(Rule(vec![
            Expr::UdpDport(config.knock.port),
            Expr::SaddrInSet {
                family,
                set: set.into(),
                prefix: source_prefix(config, family),
            },
            Expr::Verdict(Verdict::Drop),
        ]));
    }
}

/// The UDP length (header included) of a datagram of `payload` bytes.
fn udp_len(payload: usize) -> u16 {
    u16::try_from(payload + 8).unwrap_or(u16::MAX)
}

/// Datagrams to the knock port that cannot be a knock are dropped here, before the
/// socket, and counted in [`KNOCK_JUNK`] (`knockgate status` shows it): shorter than
/// any knock; not starting with "KG" (nor, with fwknop keys, an fwknop packet's
/// length starting with a base64 character); a native knock's exact length without
/// its magic, version and service byte. Longer datagrams starting with "KG" pass:
/// where an interface merges a flow's datagrams (UDP GRO fraglist: one client's
/// knocks for several services, back to back), the kernel shows them here as one,
/// with their summed length, and splits them again for the socket. The daemon then
/// spends its time — at most one HMAC each — only on datagrams shaped like a knock.
/// Before the meters, so junk neither spends a source's rate nor fills them.
fn drop_junk_knocks(rules: &mut Vec<Rule>, config: &Config) {
    let port = config.knock.port;
    let fwknop = !config.fwknop_keys.is_empty();
    let (v1, v2) = (
        udp_len(crate::knock::packet::PACKET_LEN),
        udp_len(crate::knock::packet::PACKET_V2_LEN),
    );
    // The fwknop packets the daemon reads: base64, 140–399 characters.
    let spa = (
        udp_len(crate::fwknop::MIN_LEN),
        udp_len(crate::fwknop::MAX_LEN),
    );
    let length = |first, last, negate| Expr::UdpLength {
        first,
        last,
        negate,
    };
    let bytes = |from: &[u8], to: &[u8], negate| Expr::UdpPayload {
        offset: 0,
        from: from.to_vec(),
        to: to.to_vec(),
        negate,
    };
    let junk = |mut exprs: Vec<Expr>| {
        exprs.insert(0, Expr::UdpDport(port));
        exprs.push(Expr::Counter(KNOCK_JUNK.to_owned()));
        exprs.push(Expr::Verdict(Verdict::Drop));
        Rule(exprs)
    };
    let magic = &crate::knock::packet::V1_HEADER[..2];
    rules.push(junk(vec![length(0, v1.min(spa.0) - 1, false)]));
    if fwknop {
        // '+' (0x2b) to 'z' (0x7a): every base64 character is in between.
        rules.push(junk(vec![
            length(spa.0, spa.1, true),
            bytes(magic, magic, true),
        ]));
        rules.push(junk(vec![
            length(spa.0, spa.1, false),
            bytes(magic, magic, true),
            bytes(b"+", b"z", true),
        ]));
    } else {
        rules.push(junk(vec![bytes(magic, magic, true)]));
    }
    for (len, header) in [
        (v1, crate::knock::packet::V1_HEADER),
        (v2, crate::knock::packet::V2_HEADER),
    ] {
        rules.push(junk(vec![
            length(len, len, false),
            bytes(&header, &header, true),
        ]));
    }
}

/// Knocks: per source (IPv6: per prefix) at `rate_per_second`; a tracked source over
/// its rate is dropped; a source the full sources set cannot track shares one global
/// rate, so a spoofed flood that fills it does not shut out a real knock from a new
/// address (decision 48).
fn accept_knocks_rate_limited(rules: &mut Vec<Rule>, config: &Config) {
    let rate = Rate {
        packets: config.knock.rate_per_second,
        per: Per::Second,
        burst: config.knock.burst,
    };
    let families = [
        (IpFamily::V4, KNOCK_SOURCES_V4, KNOCK_METER_V4),
        (IpFamily::V6, KNOCK_SOURCES_V6, KNOCK_METER_V6),
    ];
    let port = config.knock.port;
    for (family, sources, meter) in families {
        let prefix = source_prefix(config, family);
        // `socket`: with no daemon listening (stopped, killed, restarting) the knock
        // port is dropped like any closed port instead of drawing a port-unreachable.
        rules.push(accept(vec![
            Expr::UdpDport(port),
            Expr::LocalSocket,
            Expr::MeterSaddr {
                family,
                set: sources.into(),
                rate: None,
                prefix,
            },
            Expr::MeterSaddr {
                family,
                set: meter.into(),
                rate: Some(rate),
                prefix,
            },
        ]));
    }
    for (family, sources, _) in families {
        rules.push(Rule(vec![
            Expr::UdpDport(port),
            Expr::SaddrInSet {
                family,
                set: sources.into(),
                prefix: source_prefix(config, family),
            },
            Expr::Verdict(Verdict::Drop),
        ]));
    }
    let shared = config.knock.full_meter_rate_per_second;
    rules.push(accept(vec![
        Expr::UdpDport(port),
        Expr::LocalSocket,
        Expr::Limit(Rate {
            packets: shared,
            per: Per::Second,
            burst: shared,
        }),
    ]));
}

fn accept_icmp_replies_and_errors(rules: &mut Vec<Rule>) {
    for &t in ICMP_OUT {
        rules.push(accept(vec![Expr::IcmpType(t)]));
    }
    for &t in ICMPV6_OUT {
        rules.push(accept(vec![Expr::Icmpv6Type(t)]));
    }
}

fn allow_dns_to_resolvers(rules: &mut Vec<Rule>, resolvers: &[IpAddr], mark: u32) {
    for &resolver in resolvers {
        rules.push(admit(
            vec![Expr::Daddr(resolver), Expr::UdpDport(DNS_PORT)],
            mark,
        ));
        rules.push(admit(
            vec![Expr::Daddr(resolver), Expr::TcpDport(DNS_PORT)],
            mark,
        ));
    }
}

/// New outbound TCP to the egress ports from sockets in a window's cgroup (or any
/// deeper one), and from anywhere while the host-wide switch holds `tcp`.
fn allow_egress_windows(rules: &mut Vec<Rule>, ports: &[u16], mark: u32) {
    for &port in ports {
        for level in 1..=MAX_EGRESS_CGROUP_LEVEL {
            rules.push(admit(
                vec![
                    Expr::TcpDport(port),
                    Expr::SocketCgroupInSet {
                        level,
                        set: EGRESS_CGROUPS.into(),
                    },
                ],
                mark,
            ));
            for (family, set) in [(IpFamily::V4, EGRESS_TO_V4), (IpFamily::V6, EGRESS_TO_V6)] {
                rules.push(admit(
                    vec![
                        Expr::TcpDport(port),
                        Expr::SocketCgroupDaddrInSet {
                            level,
                            family,
                            set: set.into(),
                        },
                    ],
                    mark,
                ));
            }
        }
        rules.push(admit(
            vec![
                Expr::TcpDport(port),
                Expr::L4ProtoInSet {
                    set: EGRESS_HOST.into(),
                },
            ],
            mark,
        ));
    }
}

fn log_dropped(rules: &mut Vec<Rule>, config: &Config, chain: &str) {
    if !config.log.dropped {
        return;
    }
    rules.push(Rule(vec![
        Expr::Limit(Rate {
            packets: config.log.rate_per_minute,
            per: Per::Minute,
            burst: LOG_BURST,
        }),
        Expr::Log {
            prefix: format!("{} {chain} drop: ", config.log.prefix),
        },
    ]));
}

#[cfg(test)]
mod tests;
