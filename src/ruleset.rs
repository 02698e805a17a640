//! The firewall as plain data: one `inet` table with its sets and chains.
//!
//! A [`Ruleset`] is what `knockgate ruleset` prints (its `Display` is nft
//! syntax that `nft -f` accepts) and what the nftables backend turns into one
//! netlink batch. Building it from a config lives in [`baseline`]. This module
//! does no I/O and never names a libnftnl type, so it can be tested without root.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub mod baseline;
pub mod sequence;
pub use baseline::{KNOCK_JUNK, baseline};
pub use sequence::SeqStep;

/// Address family of a set key or an address match.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IpFamily {
    /// IPv4 (`ip` in nft).
    V4,
    /// IPv6 (`ip6` in nft).
    V6,
}

impl IpFamily {
    /// The nft keyword for this family's header (`ip`, `ip6`).
    #[must_use]
    pub fn keyword(self) -> &'static str {
        match self {
            Self::V4 => "ip",
            Self::V6 => "ip6",
        }
    }

    /// The nft set key type for this family's addresses.
    #[must_use]
    pub fn addr_type(self) -> &'static str {
        match self {
            Self::V4 => "ipv4_addr",
            Self::V6 => "ipv6_addr",
        }
    }

    /// The family an address belongs to.
    #[must_use]
    pub fn of(addr: IpAddr) -> Self {
        match addr {
            IpAddr::V4(_) => Self::V4,
            IpAddr::V6(_) => Self::V6,
        }
    }
}

/// The whole table knockgate owns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ruleset {
    /// Table name (family is always `inet`, for IPv4 and IPv6 alike).
    pub table: String,
    /// Named sets, declared before the chains that look them up.
    pub sets: Vec<SetDef>,
    /// Base chains.
    pub chains: Vec<ChainDef>,
    /// Named counters the chains count into (`counter name …`), declared with the
    /// table; a replace carries their counts (the daemon fills them in first).
    pub counters: Vec<CounterDef>,
}

impl Ruleset {
    /// The same ruleset without its sets' elements: what the daemon keeps of the one
    /// in force (the kernel holds the elements; with a million grants they would be
    /// ~50 MB held for nothing).
    #[must_use]
    pub fn without_elements(mut self) -> Self {
        for set in &mut self.sets {
            set.elements = Vec::new();
        }
        self
    }
}

/// A named counter object: `counter NAME { packets P bytes B }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CounterDef {
    /// Its name in the table.
    pub name: String,
    /// Packets counted so far (carried across a whole-table replace).
    pub packets: u64,
    /// Bytes counted so far.
    pub bytes: u64,
}

/// What a set's elements are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetKeyType {
    /// Addresses of one family.
    Addr(IpFamily),
    /// cgroup v2 ids (the cgroup directory's inode number), for `socket cgroupv2`.
    Cgroup,
    /// IP protocol numbers (`inet_proto`), used as an on/off switch per protocol.
    Proto,
    /// A cgroup id and a destination address (`cgroupsv2 . ipv4_addr`), for windows
    /// restricted to some destinations.
    CgroupAddr(IpFamily),
    /// A touch: protocol and port (`inet_proto . inet_service`), 8 bytes.
    Touch,
    /// A sequence stage and a touch (`mark . inet_proto . inet_service`), 12 bytes.
    StageTouch,
}

impl SetKeyType {
    /// The nft name of the key type.
    #[must_use]
    pub fn nft_type(self) -> &'static str {
        match self {
            Self::Addr(family) => family.addr_type(),
            Self::Cgroup => "cgroupsv2",
            Self::Proto => "inet_proto",
            Self::CgroupAddr(IpFamily::V4) => "cgroupsv2 . ipv4_addr",
            Self::CgroupAddr(IpFamily::V6) => "cgroupsv2 . ipv6_addr",
            Self::Touch => "inet_proto . inet_service",
            Self::StageTouch => "mark . inet_proto . inet_service",
        }
    }
}

/// A named set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetDef {
    /// Set name, unique in the table.
    pub name: String,
    /// What its elements are.
    pub key: SetKeyType,
    /// What the set is for, which decides its flags.
    pub kind: SetKind,
    /// Live contents carried across a replace (grants with their remaining time).
    /// Not part of the printed ruleset: they are state, not configuration.
    pub elements: Vec<Element>,
}

/// The netmask of a `bits`-long prefix in `family` (bits past the family's length
/// count as all of it).
#[must_use]
pub fn prefix_mask(family: IpFamily, bits: u8) -> IpAddr {
    match family {
        IpFamily::V4 => {
            let bits = u32::from(bits.min(32));
            IpAddr::V4(Ipv4Addr::from(u32::MAX.checked_shl(32 - bits).unwrap_or(0)))
        }
        IpFamily::V6 => {
            let bits = u32::from(bits.min(128));
            IpAddr::V6(Ipv6Addr::from(
                u128::MAX.checked_shl(128 - bits).unwrap_or(0),
            ))
        }
    }
}

/// `addr` with every bit past the first `bits` cleared.
#[must_use]
pub fn mask_addr(addr: IpAddr, bits: u8) -> IpAddr {
    match (addr, prefix_mask(IpFamily::of(addr), bits)) {
        (IpAddr::V4(a), IpAddr::V4(m)) => IpAddr::V4(Ipv4Addr::from(a.to_bits() & m.to_bits())),
        (IpAddr::V6(a), IpAddr::V6(m)) => IpAddr::V6(Ipv6Addr::from(a.to_bits() & m.to_bits())),
        _ => addr,
    }
}

/// One set element's key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ElementKey {
    /// An address.
    Addr(IpAddr),
    /// A cgroup v2 id.
    Cgroup(u64),
    /// An IP protocol number.
    Proto(u8),
    /// A cgroup id and a destination address.
    CgroupAddr(u64, IpAddr),
    /// A sequence's first touch, and the stage it leads to (map data).
    SeqStart {
        /// IP protocol number.
        proto: u8,
        /// Port.
        port: u16,
        /// The stage (map data).
        next: u32,
    },
    /// A touch from a stage, and what it leads to (map data): the next stage, or for
    /// a last touch the key it completes.
    SeqStep {
        /// The stage the source is at.
        stage: u32,
        /// IP protocol number.
        proto: u8,
        /// Port.
        port: u16,
        /// The map data.
        next: u32,
    },
    /// A completed sequence's last step (stage and touch), in the used set.
    SeqUsed {
        /// The stage before the last touch.
        stage: u32,
        /// IP protocol number.
        proto: u8,
        /// Port.
        port: u16,
    },
}

impl From<IpAddr> for ElementKey {
    fn from(addr: IpAddr) -> Self {
        Self::Addr(addr)
    }
}

impl fmt::Display for ElementKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Addr(a) => write!(f, "{a}"),
            Self::Cgroup(id) => write!(f, "cgroup {id}"),
            Self::Proto(p) => write!(f, "protocol {p}"),
            Self::CgroupAddr(id, a) => write!(f, "cgroup {id} to {a}"),
            Self::SeqStart { proto, port, next } => {
                write!(f, "{proto} . {port} : {next:#010x}")
            }
            Self::SeqStep {
                stage,
                proto,
                port,
                next,
            } => write!(f, "{stage:#010x} . {proto} . {port} : {next:#010x}"),
            Self::SeqUsed { stage, proto, port } => write!(f, "{stage:#010x} . {proto} . {port}"),
        }
    }
}

/// One set element, with the time it has left (none: it stays until removed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Element {
    /// Its key.
    pub key: ElementKey,
    /// Time left before the kernel removes it.
    pub expires_in: Option<std::time::Duration>,
}

impl Element {
    /// The address, for elements of address sets.
    #[must_use]
    pub fn addr(&self) -> Option<IpAddr> {
        match self.key {
            ElementKey::Addr(a) => Some(a),
            _ => None,
        }
    }
}

/// The two kinds of set the baseline uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetKind {
    /// Grants: elements carry their own timeout, so the kernel closes each hole on time.
    Grants,
    /// Grants that rules also add to (a completed port sequence), at most `size`: the
    /// kernel caps a set a rule adds to at 65,535 elements unless it has a size.
    RuleGrants {
        /// Most elements at once.
        size: u32,
    },
    /// Bans: like grants (each element ends on time), and at most `size` of them: the
    /// kernel refuses one more.
    Bans {
        /// Most elements at once.
        size: u32,
    },
    /// A per-source rate meter filled by the packet path (`update @set { … limit … }`).
    Meter {
        /// Most sources tracked at once.
        size: u32,
        /// Seconds an idle source stays in the meter.
        timeout_secs: u32,
    },
    /// Where each source is in a sequence: a map from its address to its stage,
    /// written by the packet path, each entry gone after `timeout_secs`.
    SeqProgress {
        /// Most sources at once.
        size: u32,
        /// Seconds a source has for its next touch.
        timeout_secs: u32,
    },
    /// The sequences in force: a map from (stage,) touch to the next stage, written by
    /// the daemon at each step, each element ending with its step.
    SeqMap,
    /// Last steps already taken (one-time sequences), written by the packet path.
    SeqUsed {
        /// Most at once.
        size: u32,
    },
}

/// Which netfilter hook a base chain sits on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// Packets for this host.
    Input,
    /// Packets this host sends.
    Output,
    /// Packets routed through this host.
    Forward,
}

/// What a base chain does with packets no rule accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Let them pass.
    Accept,
    /// Drop them silently.
    Drop,
}

/// A base chain of filter type at priority `filter` (0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainDef {
    /// Chain name.
    pub name: String,
    /// Hook it is attached to.
    pub hook: Hook,
    /// Default verdict.
    pub policy: Policy,
    /// Rules, in order.
    pub rules: Vec<Rule>,
}

/// One rule: its expressions, evaluated left to right as nft does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule(pub Vec<Expr>);

/// Conntrack states a rule can match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CtState {
    /// Packets conntrack cannot place.
    Invalid,
    /// Packets of a connection that has seen traffic both ways.
    Established,
    /// Packets related to a known connection (ICMP errors, FTP data).
    Related,
    /// The first packet of a connection.
    New,
}

/// A packet rate: `packets` per `per`, after a burst of `burst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Packets per unit.
    pub packets: u32,
    /// The unit.
    pub per: Per,
    /// Packets allowed at once before the rate applies.
    pub burst: u32,
}

/// The burst nft assumes when none is given.
const DEFAULT_BURST: u32 = 5;

/// Unit of a [`Rate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Per {
    /// Per second.
    Second,
    /// Per minute.
    Minute,
}

/// Final verdict of a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Accept the packet.
    Accept,
    /// Drop the packet.
    Drop,
}

/// One match or statement of a rule, as nft writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expr {
    /// `iifname "lo"`.
    IifName(String),
    /// `oifname "lo"`.
    OifName(String),
    /// `ct state established,related`: any of the states.
    CtState(Vec<CtState>),
    /// `tcp dport N`.
    TcpDport(u16),
    /// `udp dport N`.
    UdpDport(u16),
    /// `tcp dport A-B` / `udp dport A-B`: a service's port range.
    DportRange {
        /// TCP or UDP.
        protocol: crate::service::Protocol,
        /// First port.
        first: u16,
        /// Last port.
        last: u16,
    },
    /// `ip saddr @set` / `ip6 saddr @set`; with a prefix, `ip6 saddr & MASK == @set`.
    SaddrInSet {
        /// Family of the set's keys.
        family: IpFamily,
        /// Set name.
        set: String,
        /// Compare only the first this many bits (the set holds masked addresses).
        prefix: Option<u8>,
    },
    /// `ip daddr A` / `ip6 daddr A`.
    Daddr(IpAddr),
    /// `icmp type T` (ICMP for IPv4).
    IcmpType(u8),
    /// `icmpv6 type T`.
    Icmpv6Type(u8),
    /// `limit rate …`: matches while under the rate.
    Limit(Rate),
    /// `update @set { ip saddr limit rate … }`: matches while this source is under the
    /// rate (always, without one). Does not match when the set is full and the source
    /// is not in it.
    MeterSaddr {
        /// Family of the source address.
        family: IpFamily,
        /// The meter set.
        set: String,
        /// The per-source rate; none to only track the source.
        rate: Option<Rate>,
        /// Meter by the first this many bits of the source (`ip6 saddr & MASK`).
        prefix: Option<u8>,
    },
    /// `socket cgroupv2 level L @set`: the sending socket's cgroup, at depth `level`
    /// below the cgroup2 root, is in the set (so a cgroup and all its children match).
    SocketCgroupInSet {
        /// Depth of the ancestor compared (1 = a direct child of the root).
        level: u32,
        /// Set of cgroup ids.
        set: String,
    },
    /// `socket cgroupv2 level L . ip daddr @set`: the pair (the socket's cgroup at
    /// depth `level`, the destination address) is in the set.
    SocketCgroupDaddrInSet {
        /// Depth of the ancestor compared.
        level: u32,
        /// Family of the destination.
        family: IpFamily,
        /// Set of (cgroup id, address) pairs.
        set: String,
    },
    /// `meta l4proto @set`: the packet's transport protocol is in the set (an on/off
    /// switch with a timeout).
    L4ProtoInSet {
        /// Set of protocol numbers.
        set: String,
    },
    /// `ct mark & M == M`: every bit of `M` is set in the connection's mark.
    CtMarkHas(u32),
    /// `ct mark set ct mark | M`: set the bits of `M` in the connection's mark,
    /// keeping the others.
    CtMarkAdd(u32),
    /// `socket transparent 0`: a local (ordinary, non-transparent) socket will take
    /// the packet. Without one the rule does not match, so the packet falls to the
    /// drop policy instead of drawing an ICMP port-unreachable.
    LocalSocket,
    /// `log prefix "…"`.
    Log {
        /// Prefix of the kernel log line.
        prefix: String,
    },
    /// `log group N prefix "…"`: the packet's headers to the netlink log group `N`
    /// (the daemon listens there), not to the kernel log.
    LogGroup {
        /// The nflog group.
        group: u16,
        /// The prefix the listener sees.
        prefix: String,
    },
    /// `udp length A-B` (`udp length A` when `first == last`; `!=` when `negate`): the
    /// datagram's length as its UDP header gives it, header included — what the
    /// socket would be given (the kernel drops or trims datagrams whose header lies).
    UdpLength {
        /// Shortest.
        first: u16,
        /// Longest.
        last: u16,
        /// Matches when the length is outside.
        negate: bool,
    },
    /// `@th,OFF,LEN A-B`: bytes of a UDP payload (`offset` bytes after the header)
    /// between `from` and `to` as big-endian numbers (one value when equal; `!=`
    /// when `negate`). Both the same length, 1 to 4 bytes. It checks no protocol of
    /// its own: only after a UDP match in the same rule (`udp dport`, `udp length`),
    /// as nft writes such a rule back.
    UdpPayload {
        /// Bytes after the UDP header.
        offset: u8,
        /// Lowest value.
        from: Vec<u8>,
        /// Highest value.
        to: Vec<u8>,
        /// Matches when the bytes are outside.
        negate: bool,
    },
    /// `counter name "NAME"`: counts the packet in the named counter.
    Counter(String),
    /// One step of judging a port sequence ([`SeqStep`]).
    Seq(SeqStep),
    /// `accept` / `drop`.
    Verdict(Verdict),
}

/// ICMP (v4) type numbers the baseline names.
pub mod icmp {
    /// Answer to a ping.
    pub const ECHO_REPLY: u8 = 0;
    /// "Port/host unreachable" and "fragmentation needed" (path MTU discovery).
    pub const DESTINATION_UNREACHABLE: u8 = 3;
    /// A ping.
    pub const ECHO_REQUEST: u8 = 8;
}

/// ICMPv6 type numbers the baseline names.
pub mod icmpv6 {
    /// No route, port unreachable.
    pub const DESTINATION_UNREACHABLE: u8 = 1;
    /// Path MTU discovery; IPv6 routers never fragment, so dropping this breaks connections.
    pub const PACKET_TOO_BIG: u8 = 2;
    /// Hop limit reached.
    pub const TIME_EXCEEDED: u8 = 3;
    /// Bad header.
    pub const PARAMETER_PROBLEM: u8 = 4;
    /// A ping.
    pub const ECHO_REQUEST: u8 = 128;
    /// Answer to a ping.
    pub const ECHO_REPLY: u8 = 129;
    /// Multicast listener query (routers ask which groups, including solicited-node ones).
    pub const MLD_LISTENER_QUERY: u8 = 130;
    /// Router solicitation.
    pub const ND_ROUTER_SOLICIT: u8 = 133;
    /// Router advertisement (SLAAC, default route).
    pub const ND_ROUTER_ADVERT: u8 = 134;
    /// Neighbour solicitation: IPv6's ARP request.
    pub const ND_NEIGHBOR_SOLICIT: u8 = 135;
    /// Neighbour advertisement: IPv6's ARP reply.
    pub const ND_NEIGHBOR_ADVERT: u8 = 136;
    /// MLDv2 report: joining the solicited-node groups ND listens on.
    pub const MLD2_LISTENER_REPORT: u8 = 143;
}

/// ICMP (v4) type numbers and the names nft uses for them.
pub const ICMP_TYPES: &[(u8, &str)] = &[
    (0, "echo-reply"),
    (3, "destination-unreachable"),
    (8, "echo-request"),
    (11, "time-exceeded"),
    (12, "parameter-problem"),
];

/// ICMPv6 type numbers and the names nft uses for them.
pub const ICMPV6_TYPES: &[(u8, &str)] = &[
    (1, "destination-unreachable"),
    (2, "packet-too-big"),
    (3, "time-exceeded"),
    (4, "parameter-problem"),
    (128, "echo-request"),
    (129, "echo-reply"),
    (130, "mld-listener-query"),
    (133, "nd-router-solicit"),
    (134, "nd-router-advert"),
    (135, "nd-neighbor-solicit"),
    (136, "nd-neighbor-advert"),
    (143, "mld2-listener-report"),
];

fn write_icmp_type(f: &mut fmt::Formatter<'_>, table: &[(u8, &str)], t: u8) -> fmt::Result {
    match table.iter().find(|(n, _)| *n == t) {
        Some((_, name)) => f.write_str(name),
        None => write!(f, "{t}"),
    }
}

/// A duration as nft lists it: `1h30m`, `1m`, `45s`.
fn nft_duration(secs: u32) -> String {
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    let mut out = String::new();
    for (n, unit) in [(h, 'h'), (m, 'm'), (s, 's')] {
        if n > 0 {
            out.push_str(&n.to_string());
            out.push(unit);
        }
    }
    if out.is_empty() {
        out.push_str("0s");
    }
    out
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let per = match self.per {
            Per::Second => "second",
            Per::Minute => "minute",
        };
        write!(f, "limit rate {}/{per}", self.packets)?;
        // nft leaves out the kernel's default burst of 5 when it lists a ruleset; doing
        // the same keeps this text identical to `nft list table`.
        if self.burst != DEFAULT_BURST {
            write!(f, " burst {} packets", self.burst)?;
        }
        Ok(())
    }
}

impl fmt::Display for CtState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Invalid => "invalid",
            Self::Established => "established",
            Self::Related => "related",
            Self::New => "new",
        })
    }
}

impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::IifName(name) => write!(f, "iifname \"{name}\""),
            Self::OifName(name) => write!(f, "oifname \"{name}\""),
            Self::CtState(states) => {
                f.write_str("ct state ")?;
                for (i, state) in states.iter().enumerate() {
                    if i > 0 {
                        f.write_str(",")?;
                    }
                    write!(f, "{state}")?;
                }
                Ok(())
            }
            Self::TcpDport(port) => write!(f, "tcp dport {port}"),
            Self::UdpDport(port) => write!(f, "udp dport {port}"),
            Self::DportRange {
                protocol,
                first,
                last,
            } => write!(f, "{} dport {first}-{last}", protocol.name()),
            Self::SaddrInSet {
                family,
                set,
                prefix: None,
            } => write!(f, "{} saddr @{set}", family.keyword()),
            Self::SaddrInSet {
                family,
                set,
                prefix: Some(bits),
            } => write!(
                f,
                "{} saddr & {} == @{set}",
                family.keyword(),
                prefix_mask(*family, *bits)
            ),
            Self::Daddr(addr) => write!(f, "{} daddr {addr}", IpFamily::of(*addr).keyword()),
            Self::IcmpType(t) => {
                f.write_str("icmp type ")?;
                write_icmp_type(f, ICMP_TYPES, *t)
            }
            Self::Icmpv6Type(t) => {
                f.write_str("icmpv6 type ")?;
                write_icmp_type(f, ICMPV6_TYPES, *t)
            }
            Self::Limit(rate) => write!(f, "{rate}"),
            Self::MeterSaddr {
                family,
                set,
                rate,
                prefix,
            } => {
                let mask = prefix.map(|bits| format!(" & {}", prefix_mask(*family, bits)));
                let mask = mask.unwrap_or_default();
                let rate = rate.map(|r| format!(" {r}")).unwrap_or_default();
                write!(
                    f,
                    "update @{set} {{ {} saddr{mask}{rate} }}",
                    family.keyword()
                )
            }
            Self::SocketCgroupInSet { level, set } => {
                write!(f, "socket cgroupv2 level {level} @{set}")
            }
            Self::SocketCgroupDaddrInSet { level, family, set } => write!(
                f,
                "socket cgroupv2 level {level} . {} daddr @{set}",
                family.keyword()
            ),
            Self::L4ProtoInSet { set } => write!(f, "meta l4proto @{set}"),
            Self::CtMarkHas(mark) => write!(f, "ct mark & {mark:#010x} == {mark:#010x}"),
            Self::CtMarkAdd(mark) => write!(f, "ct mark set ct mark | {mark:#010x}"),
            Self::LocalSocket => f.write_str("socket transparent 0"),
            Self::Log { prefix } => write!(f, "log prefix \"{prefix}\""),
            Self::LogGroup { group, prefix } => {
                write!(
                    f,
                    "log prefix \"{prefix}\" group {group} snaplen {}",
                    sequence::LOG_SNAPLEN
                )
            }
            Self::UdpLength { .. } | Self::UdpPayload { .. } => self.fmt_shape(f),
            Self::Counter(name) => write!(f, "counter name \"{name}\""),
            Self::Seq(step) => write!(f, "{step}"),
            Self::Verdict(Verdict::Accept) => f.write_str("accept"),
            Self::Verdict(Verdict::Drop) => f.write_str("drop"),
        }
    }
}

impl Expr {
    /// `udp length …` and `@th,…` matches, as nft writes them.
    fn fmt_shape(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UdpLength {
                first,
                last,
                negate,
            } => {
                let op = if *negate { "!= " } else { "" };
                if first == last {
                    write!(f, "udp length {op}{first}")
                } else {
                    write!(f, "udp length {op}{first}-{last}")
                }
            }
            Self::UdpPayload {
                offset,
                from,
                to,
                negate,
            } => {
                let op = if *negate { "!= " } else { "" };
                let hex = |b: &[u8]| {
                    b.iter()
                        .fold(String::from("0x"), |s, x| s + &format!("{x:02x}"))
                };
                write!(
                    f,
                    "@th,{},{} {op}{}",
                    64 + u32::from(*offset) * 8,
                    from.len() * 8,
                    hex(from)
                )?;
                if from != to {
                    write!(f, "-{}", hex(to))?;
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, expr) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{expr}")?;
        }
        Ok(())
    }
}

impl SetDef {
    /// Keeps at most the set's size of its elements, those with the most time left:
    /// a reload that made the ban set smaller must not be refused for the bans it
    /// carries.
    pub fn trim_to_size(&mut self) {
        let size = match self.kind {
            SetKind::Bans { size }
            | SetKind::Meter { size, .. }
            | SetKind::SeqProgress { size, .. }
            | SetKind::SeqUsed { size } => size,
            // Never trimmed: the daemon holds no more grants than the size.
            SetKind::Grants | SetKind::RuleGrants { .. } | SetKind::SeqMap => return,
        };
        let size = usize::try_from(size).unwrap_or(usize::MAX);
        if self.elements.len() > size {
            self.elements.sort_by_key(|e| {
                std::cmp::Reverse(e.expires_in.unwrap_or(std::time::Duration::MAX))
            });
            self.elements.truncate(size);
        }
    }
}

impl fmt::Display for SetDef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let word = match self.kind {
            SetKind::SeqProgress { .. } | SetKind::SeqMap => "map",
            _ => "set",
        };
        writeln!(f, "\t{word} {} {{", self.name)?;
        match self.kind {
            SetKind::SeqProgress { .. } | SetKind::SeqMap => {
                writeln!(f, "\t\ttype {} : mark", self.key.nft_type())?;
            }
            _ => writeln!(f, "\t\ttype {}", self.key.nft_type())?,
        }
        match self.kind {
            SetKind::Grants | SetKind::SeqMap => writeln!(f, "\t\tflags timeout")?,
            SetKind::Bans { size } | SetKind::RuleGrants { size } => {
                writeln!(f, "\t\tsize {size}")?;
                writeln!(f, "\t\tflags timeout")?;
            }
            SetKind::Meter { size, timeout_secs } | SetKind::SeqProgress { size, timeout_secs } => {
                writeln!(f, "\t\tsize {size}")?;
                writeln!(f, "\t\tflags dynamic,timeout")?;
                writeln!(f, "\t\ttimeout {}", nft_duration(timeout_secs))?;
            }
            SetKind::SeqUsed { size } => {
                writeln!(f, "\t\tsize {size}")?;
                writeln!(f, "\t\tflags dynamic,timeout")?;
            }
        }
        writeln!(f, "\t}}")
    }
}

impl fmt::Display for ChainDef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hook = match self.hook {
            Hook::Input => "input",
            Hook::Output => "output",
            Hook::Forward => "forward",
        };
        let policy = match self.policy {
            Policy::Accept => "accept",
            Policy::Drop => "drop",
        };
        writeln!(f, "\tchain {} {{", self.name)?;
        writeln!(
            f,
            "\t\ttype filter hook {hook} priority filter; policy {policy};"
        )?;
        for rule in &self.rules {
            writeln!(f, "\t\t{rule}")?;
        }
        writeln!(f, "\t}}")
    }
}

impl fmt::Display for Ruleset {
    /// nft syntax that `nft -f` accepts, sets first, then chains.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "table inet {} {{", self.table)?;
        // Counters first, as `nft list` shows a table.
        for counter in &self.counters {
            writeln!(f, "\tcounter {} {{", counter.name)?;
            writeln!(f, "\t\tpackets {} bytes {}", counter.packets, counter.bytes)?;
            writeln!(f, "\t}}\n")?;
        }
        for (i, set) in self.sets.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{set}")?;
        }
        for chain in &self.chains {
            writeln!(f)?;
            write!(f, "{chain}")?;
        }
        writeln!(f, "}}")
    }
}

impl Ruleset {
    /// The chain on `hook`, if the ruleset has one.
    #[must_use]
    pub fn chain(&self, hook: Hook) -> Option<&ChainDef> {
        self.chains.iter().find(|c| c.hook == hook)
    }

    /// Number of rules over all chains, for the log line that says what was applied.
    #[must_use]
    pub fn rule_count(&self) -> usize {
        self.chains.iter().map(|c| c.rules.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_nft() {
        assert_eq!(nft_duration(60), "1m");
        assert_eq!(nft_duration(5400), "1h30m");
        assert_eq!(nft_duration(61), "1m1s");
        assert_eq!(nft_duration(0), "0s");
    }

    #[test]
    fn default_burst_is_left_out_like_nft_does() {
        let rate = |burst| Rate {
            packets: 3,
            per: Per::Minute,
            burst,
        };
        assert_eq!(rate(5).to_string(), "limit rate 3/minute");
        assert_eq!(rate(6).to_string(), "limit rate 3/minute burst 6 packets");
    }

    #[test]
    fn unknown_icmp_types_print_as_numbers() {
        assert_eq!(Expr::IcmpType(42).to_string(), "icmp type 42");
        assert_eq!(
            Expr::Icmpv6Type(135).to_string(),
            "icmpv6 type nd-neighbor-solicit"
        );
    }
}
