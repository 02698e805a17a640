//! [`Expr`] → nftnl expressions. The safe `nftnl` API covers meta, cmp, payload,
//! ct, bitwise and verdicts; `limit`, `log`, set lookups by name and `dynset`
//! (the per-source meter) are built here with raw libnftnl calls.

use std::ffi::{CStr, CString};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::ptr::NonNull;

use nftnl::expr::{
    Bitwise, Cmp, CmpOp, Conntrack, Expression, Icmpv6HeaderField, Ipv4HeaderField,
    Ipv6HeaderField, Meta, NetworkHeaderField, Payload, Socket, SocketKey, States, TcpHeaderField,
    TransportHeaderField, UdpHeaderField, Verdict as NftVerdict,
};
use nftnl::nftnl_sys::{self as sys, libc};

use crate::ruleset::{CtState, Expr, IpFamily, Per, Rate, Verdict};

/// Room for an interface name in the `meta iifname` register (IFNAMSIZ).
const IFNAMSIZ: usize = 16;

/// Adds the nftnl expressions for `expr` to `rule`. `set_id` maps a set name to the
/// id it was given in this batch. Errors name what cannot be sent.
pub(super) fn add(
    rule: &mut nftnl::Rule<'_>,
    expr: &Expr,
    set_id: &dyn Fn(&str) -> Option<u32>,
) -> Result<(), String> {
    match expr {
        Expr::IifName(name) => {
            rule.add_expr(&Meta::IifName);
            rule.add_expr(&Cmp::new(CmpOp::Eq, &ifname(name)?[..]));
        }
        Expr::OifName(name) => {
            rule.add_expr(&Meta::OifName);
            rule.add_expr(&Cmp::new(CmpOp::Eq, &ifname(name)?[..]));
        }
        Expr::CtState(states) => {
            let mask = states.iter().fold(States::empty(), |m, s| m | ct_bit(*s));
            rule.add_expr(&Conntrack::State);
            rule.add_expr(&Bitwise::new(mask.bits(), 0u32));
            rule.add_expr(&Cmp::new(CmpOp::Neq, 0u32));
        }
        Expr::TcpDport(port) => {
            l4proto(rule, libc::IPPROTO_TCP);
            rule.add_expr(&Payload::Transport(TransportHeaderField::Tcp(
                TcpHeaderField::Dport,
            )));
            rule.add_expr(&Cmp::new(CmpOp::Eq, port.to_be()));
        }
        Expr::UdpDport(port) => {
            l4proto(rule, libc::IPPROTO_UDP);
            rule.add_expr(&Payload::Transport(TransportHeaderField::Udp(
                UdpHeaderField::Dport,
            )));
            rule.add_expr(&Cmp::new(CmpOp::Eq, port.to_be()));
        }
        Expr::DportRange {
            protocol,
            first,
            last,
        } => dport_range(rule, *protocol, *first, *last),
        Expr::SaddrInSet { .. } | Expr::MeterSaddr { .. } => by_source(rule, expr, set_id)?,
        Expr::Daddr(addr) => {
            let family = IpFamily::of(*addr);
            nfproto(rule, family);
            rule.add_expr(&Payload::Network(match family {
                IpFamily::V4 => NetworkHeaderField::Ipv4(Ipv4HeaderField::Daddr),
                IpFamily::V6 => NetworkHeaderField::Ipv6(Ipv6HeaderField::Daddr),
            }));
            rule.add_expr(&Cmp::new(CmpOp::Eq, *addr));
        }
        Expr::IcmpType(t) => icmp_type(rule, libc::IPPROTO_ICMP, *t),
        Expr::Icmpv6Type(t) => icmp_type(rule, libc::IPPROTO_ICMPV6, *t),
        Expr::Limit(rate) => rule.add_expr(&Limit(*rate)),
        Expr::SocketCgroupInSet { level, set } => {
            rule.add_expr(&Socket::new(SocketKey::CgroupV2, *level));
            rule.add_expr(&Lookup::new(set, set_id)?);
        }
        Expr::SocketCgroupDaddrInSet { level, family, set } => {
            // The concatenation: cgroup id into the 32-bit registers 0–1, the
            // destination right after it, then one lookup of both.
            nfproto(rule, *family);
            rule.add_expr(&Socket::new(SocketKey::CgroupV2, *level));
            let (offset, len) = match family {
                IpFamily::V4 => (16, 4),
                IpFamily::V6 => (24, 16),
            };
            rule.add_expr(&RawPayload {
                base: libc::NFT_PAYLOAD_NETWORK_HEADER,
                offset,
                len,
                dreg: reg32_02(),
            });
            rule.add_expr(&Lookup::new(set, set_id)?);
        }
        Expr::L4ProtoInSet { set } => {
            rule.add_expr(&Meta::L4Proto);
            rule.add_expr(&Lookup::new(set, set_id)?);
        }
        Expr::CtMarkHas(mark) => {
            rule.add_expr(&Conntrack::Mark { set: false });
            rule.add_expr(&Bitwise::new(*mark, 0u32));
            rule.add_expr(&Cmp::new(CmpOp::Eq, *mark));
        }
        Expr::CtMarkAdd(mark) => {
            // (mark & !M) ^ M == mark | M, which is how nft itself compiles `|`.
            rule.add_expr(&Conntrack::Mark { set: false });
            rule.add_expr(&Bitwise::new(!*mark, *mark));
            rule.add_expr(&Conntrack::Mark { set: true });
        }
        Expr::LocalSocket => {
            rule.add_expr(&Socket::new(SocketKey::Transparent, 0));
            rule.add_expr(&Cmp::new(CmpOp::Eq, 0u8));
        }
        Expr::Log { prefix } => rule.add_expr(&Log {
            prefix: cstring(prefix)?,
        }),
        Expr::LogGroup { group, prefix } => rule.add_expr(&LogGroup {
            group: *group,
            prefix: cstring(prefix)?,
        }),
        Expr::UdpLength { .. } | Expr::UdpPayload { .. } | Expr::Counter(_) => {
            udp_shape(rule, expr)?;
        }
        Expr::Seq(step) => super::sequence_expr::add(rule, step, set_id)?,
        Expr::Verdict(Verdict::Accept) => rule.add_expr(&NftVerdict::Accept),
        Expr::Verdict(Verdict::Drop) => rule.add_expr(&NftVerdict::Drop),
    }
    Ok(())
}

/// The knock port's shape filter: `udp length`, raw payload bytes, a named counter.
fn udp_shape(rule: &mut nftnl::Rule<'_>, expr: &Expr) -> Result<(), String> {
    match expr {
        Expr::UdpLength {
            first,
            last,
            negate,
        } => {
            l4proto(rule, libc::IPPROTO_UDP);
            rule.add_expr(&Payload::Transport(TransportHeaderField::Udp(
                UdpHeaderField::Len,
            )));
            compare(rule, &first.to_be_bytes(), &last.to_be_bytes(), *negate)?;
        }
        Expr::UdpPayload {
            offset,
            from,
            to,
            negate,
        } => {
            if from.is_empty() || from.len() > 4 || from.len() != to.len() {
                return Err(format!("cannot compare {} payload bytes", from.len()));
            }
            // No protocol check of its own: it follows the rule's `udp dport` and
            // `udp length` (which have one), as nft writes such rules back.
            rule.add_expr(&RawPayload {
                base: libc::NFT_PAYLOAD_TRANSPORT_HEADER,
                offset: UDP_HEADER_LEN + u32::from(*offset),
                len: u32::try_from(from.len()).unwrap_or(4),
                dreg: reg1(),
            });
            compare(rule, from, to, *negate)?;
        }
        Expr::Counter(name) => rule.add_expr(&CounterRef {
            name: cstring(name)?,
        }),
        _ => return Err(format!("`{expr}` is not a shape match")),
    }
    Ok(())
}

/// Bytes of a UDP header: what a payload offset counts from.
const UDP_HEADER_LEN: u32 = 8;
/// `NFT_OBJECT_COUNTER`: the type of a named counter object.
pub(super) const NFT_OBJECT_COUNTER: u32 = 1;

/// Compares register 1 (loaded just before) with `from`–`to` as big-endian numbers:
/// one value when they are equal, a range otherwise; `negate` matches outside.
fn compare(rule: &mut nftnl::Rule<'_>, from: &[u8], to: &[u8], negate: bool) -> Result<(), String> {
    if from == to {
        rule.add_expr(&Cmp::new(if negate { CmpOp::Neq } else { CmpOp::Eq }, from));
    } else if negate {
        rule.add_expr(&RangeNeq {
            from: from.to_vec(),
            to: to.to_vec(),
        });
    } else {
        rule.add_expr(&Cmp::new(CmpOp::Gte, from));
        rule.add_expr(&Cmp::new(CmpOp::Lte, to));
    }
    if from.len() != to.len() || from > to {
        return Err("a range must run from its low end to its high end".to_owned());
    }
    Ok(())
}

/// `tcp dport A-B` / `udp dport A-B`. Ports are compared as the packet's big-endian
/// bytes (the kernel's cmp is a memcmp), which orders them as numbers.
pub(super) fn dport_range(
    rule: &mut nftnl::Rule<'_>,
    protocol: crate::service::Protocol,
    first: u16,
    last: u16,
) {
    match protocol {
        crate::service::Protocol::Tcp => {
            l4proto(rule, libc::IPPROTO_TCP);
            rule.add_expr(&Payload::Transport(TransportHeaderField::Tcp(
                TcpHeaderField::Dport,
            )));
        }
        crate::service::Protocol::Udp => {
            l4proto(rule, libc::IPPROTO_UDP);
            rule.add_expr(&Payload::Transport(TransportHeaderField::Udp(
                UdpHeaderField::Dport,
            )));
        }
    }
    rule.add_expr(&Cmp::new(CmpOp::Gte, first.to_be()));
    rule.add_expr(&Cmp::new(CmpOp::Lte, last.to_be()));
}

fn ct_bit(state: CtState) -> States {
    match state {
        CtState::Invalid => States::INVALID,
        CtState::Established => States::ESTABLISHED,
        CtState::Related => States::RELATED,
        CtState::New => States::NEW,
    }
}

pub(super) fn cstring(text: &str) -> Result<CString, String> {
    CString::new(text).map_err(|_| format!("`{}` contains a NUL byte", text.escape_debug()))
}

/// An interface name as the kernel puts it in a register: zero-padded to IFNAMSIZ.
fn ifname(name: &str) -> Result<[u8; IFNAMSIZ], String> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= IFNAMSIZ || bytes.contains(&0) {
        return Err(format!(
            "`{}` is not an interface name",
            name.escape_debug()
        ));
    }
    let mut padded = [0u8; IFNAMSIZ];
    padded[..bytes.len()].copy_from_slice(bytes);
    Ok(padded)
}

pub(super) fn nfproto(rule: &mut nftnl::Rule<'_>, family: IpFamily) {
    let proto = match family {
        IpFamily::V4 => libc::NFPROTO_IPV4,
        IpFamily::V6 => libc::NFPROTO_IPV6,
    };
    rule.add_expr(&Meta::NfProto);
    rule.add_expr(&Cmp::new(CmpOp::Eq, u8::try_from(proto).unwrap_or(u8::MAX)));
}

pub(super) fn l4proto(rule: &mut nftnl::Rule<'_>, proto: libc::c_int) {
    rule.add_expr(&Meta::L4Proto);
    rule.add_expr(&Cmp::new(CmpOp::Eq, u8::try_from(proto).unwrap_or(u8::MAX)));
}

fn load_saddr(rule: &mut nftnl::Rule<'_>, family: IpFamily) {
    nfproto(rule, family);
    rule.add_expr(&Payload::Network(match family {
        IpFamily::V4 => NetworkHeaderField::Ipv4(Ipv4HeaderField::Saddr),
        IpFamily::V6 => NetworkHeaderField::Ipv6(Ipv6HeaderField::Saddr),
    }));
}

/// The expressions that look up or meter the packet's source address.
fn by_source(
    rule: &mut nftnl::Rule<'_>,
    expr: &Expr,
    set_id: &dyn Fn(&str) -> Option<u32>,
) -> Result<(), String> {
    match expr {
        Expr::SaddrInSet {
            family,
            set,
            prefix,
        } => {
            load_saddr(rule, *family);
            mask_saddr(rule, *family, *prefix);
            rule.add_expr(&Lookup::new(set, set_id)?);
        }
        Expr::MeterSaddr {
            family,
            set,
            rate,
            prefix,
        } => {
            load_saddr(rule, *family);
            mask_saddr(rule, *family, *prefix);
            let Lookup { set, id } = Lookup::new(set, set_id)?;
            rule.add_expr(&MeterUpdate {
                set,
                id,
                rate: *rate,
            });
        }
        _ => {}
    }
    Ok(())
}

/// `& MASK` on the source address just loaded, for a prefix (none: the whole address).
fn mask_saddr(rule: &mut nftnl::Rule<'_>, family: IpFamily, prefix: Option<u8>) {
    let Some(bits) = prefix else { return };
    match crate::ruleset::prefix_mask(family, bits) {
        IpAddr::V4(mask) => rule.add_expr(&Bitwise::new(mask, Ipv4Addr::UNSPECIFIED)),
        IpAddr::V6(mask) => rule.add_expr(&Bitwise::new(mask, Ipv6Addr::UNSPECIFIED)),
    }
}

fn icmp_type(rule: &mut nftnl::Rule<'_>, proto: libc::c_int, t: u8) {
    l4proto(rule, proto);
    // ICMP and ICMPv6 both keep the type in the first byte of the transport header;
    // nftnl names that field only for ICMPv6, and the load is the same for both.
    rule.add_expr(&Payload::Transport(TransportHeaderField::Icmpv6(
        Icmpv6HeaderField::Type,
    )));
    rule.add_expr(&Cmp::new(CmpOp::Eq, t));
}

/// `lookup` of the packet field in register 1 in a named set.
struct Lookup {
    set: CString,
    id: u32,
}

impl Lookup {
    /// A lookup in the set named `set`, which must be in this batch.
    fn new(set: &str, set_id: &dyn Fn(&str) -> Option<u32>) -> Result<Self, String> {
        let id = set_id(set).ok_or_else(|| format!("set {set} is not in this batch"))?;
        Ok(Self {
            set: cstring(set)?,
            id,
        })
    }
}

/// `limit rate N/unit burst B packets`.
struct Limit(Rate);

/// A header load (`NFT_PAYLOAD_NETWORK_HEADER` or `_TRANSPORT_HEADER`) into a
/// register of our choosing — nftnl's payload expression knows only named fields
/// and always loads into register 1.
struct RawPayload {
    base: libc::c_int,
    offset: u32,
    len: u32,
    dreg: u32,
}

impl Expression for RawPayload {
    fn to_expr(&self, _rule: &nftnl::Rule<'_>) -> NonNull<sys::nftnl_expr> {
        let e = alloc(c"payload");
        set_u32(
            e,
            sys::NFTNL_EXPR_PAYLOAD_BASE,
            u32::try_from(self.base).unwrap_or(u32::MAX),
        );
        set_u32(e, sys::NFTNL_EXPR_PAYLOAD_OFFSET, self.offset);
        set_u32(e, sys::NFTNL_EXPR_PAYLOAD_LEN, self.len);
        set_u32(e, sys::NFTNL_EXPR_PAYLOAD_DREG, self.dreg);
        e
    }
}

/// `!= A-B` on register 1 (nft's `range` expression; `cmp` has no "outside").
struct RangeNeq {
    from: Vec<u8>,
    to: Vec<u8>,
}

impl Expression for RangeNeq {
    fn to_expr(&self, _rule: &nftnl::Rule<'_>) -> NonNull<sys::nftnl_expr> {
        let e = alloc(c"range");
        set_u32(e, sys::NFTNL_EXPR_RANGE_SREG, reg1());
        set_u32(
            e,
            sys::NFTNL_EXPR_RANGE_OP,
            u32::try_from(libc::NFT_RANGE_NEQ).unwrap_or(1),
        );
        set_data(e, sys::NFTNL_EXPR_RANGE_FROM_DATA, &self.from);
        set_data(e, sys::NFTNL_EXPR_RANGE_TO_DATA, &self.to);
        e
    }
}

/// `counter name "NAME"`: an object reference to a named counter.
struct CounterRef {
    name: CString,
}

impl Expression for CounterRef {
    fn to_expr(&self, _rule: &nftnl::Rule<'_>) -> NonNull<sys::nftnl_expr> {
        let e = alloc(c"objref");
        set_u32(e, sys::NFTNL_EXPR_OBJREF_IMM_TYPE, NFT_OBJECT_COUNTER);
        set_str(e, sys::NFTNL_EXPR_OBJREF_IMM_NAME, &self.name);
        e
    }
}

/// The 32-bit register right after an 8-byte value loaded into register 1.
fn reg32_02() -> u32 {
    u32::try_from(libc::NFT_REG32_02).unwrap_or(10)
}

/// `log prefix "…"`.
struct Log {
    prefix: CString,
}

/// `log group N snaplen S prefix "…"`: to nfnetlink_log, where the daemon listens.
struct LogGroup {
    group: u16,
    prefix: CString,
}

impl Expression for LogGroup {
    fn to_expr(&self, _rule: &nftnl::Rule<'_>) -> NonNull<sys::nftnl_expr> {
        let e = alloc(c"log");
        set_str(e, sys::NFTNL_EXPR_LOG_PREFIX, &self.prefix);
        // SAFETY: `e` is a live expression from `alloc`; libnftnl copies the value.
        unsafe { sys::nftnl_expr_set_u16(e.as_ptr(), attr(sys::NFTNL_EXPR_LOG_GROUP), self.group) };
        set_u32(
            e,
            sys::NFTNL_EXPR_LOG_SNAPLEN,
            crate::ruleset::sequence::LOG_SNAPLEN,
        );
        e
    }
}

/// `update @set { <register 1> limit rate … }`: one limiter per key in a dynamic set.
struct MeterUpdate {
    set: CString,
    id: u32,
    rate: Option<Rate>,
}

impl Expression for Lookup {
    fn to_expr(&self, _rule: &nftnl::Rule<'_>) -> NonNull<sys::nftnl_expr> {
        let e = alloc(c"lookup");
        set_u32(e, sys::NFTNL_EXPR_LOOKUP_SREG, reg1());
        set_str(e, sys::NFTNL_EXPR_LOOKUP_SET, &self.set);
        set_u32(e, sys::NFTNL_EXPR_LOOKUP_SET_ID, self.id);
        e
    }
}

impl Expression for Limit {
    fn to_expr(&self, _rule: &nftnl::Rule<'_>) -> NonNull<sys::nftnl_expr> {
        limit(self.0)
    }
}

impl Expression for Log {
    fn to_expr(&self, _rule: &nftnl::Rule<'_>) -> NonNull<sys::nftnl_expr> {
        let e = alloc(c"log");
        set_str(e, sys::NFTNL_EXPR_LOG_PREFIX, &self.prefix);
        e
    }
}

impl Expression for MeterUpdate {
    fn to_expr(&self, _rule: &nftnl::Rule<'_>) -> NonNull<sys::nftnl_expr> {
        let e = alloc(c"dynset");
        set_u32(e, sys::NFTNL_EXPR_DYNSET_SREG_KEY, reg1());
        set_u32(
            e,
            sys::NFTNL_EXPR_DYNSET_OP,
            u32::try_from(libc::NFT_DYNSET_OP_UPDATE).unwrap_or(1),
        );
        set_str(e, sys::NFTNL_EXPR_DYNSET_SET_NAME, &self.set);
        set_u32(e, sys::NFTNL_EXPR_DYNSET_SET_ID, self.id);
        let Some(rate) = self.rate else { return e };
        let inner = limit(rate);
        // SAFETY: `e` is a live dynset expression and `inner` a live expression that no
        // one else owns; libnftnl takes `inner` into the dynset's list and frees it with `e`.
        unsafe {
            sys::nftnl_expr_set(
                e.as_ptr(),
                attr(sys::NFTNL_EXPR_DYNSET_EXPR),
                inner.as_ptr().cast(),
                0,
            );
        }
        e
    }
}

fn limit(rate: Rate) -> NonNull<sys::nftnl_expr> {
    let unit_secs: u64 = match rate.per {
        Per::Second => 1,
        Per::Minute => 60,
    };
    let e = alloc(c"limit");
    set_u64(e, sys::NFTNL_EXPR_LIMIT_RATE, u64::from(rate.packets));
    set_u64(e, sys::NFTNL_EXPR_LIMIT_UNIT, unit_secs);
    set_u32(e, sys::NFTNL_EXPR_LIMIT_BURST, rate.burst);
    set_u32(
        e,
        sys::NFTNL_EXPR_LIMIT_TYPE,
        u32::try_from(libc::NFT_LIMIT_PKTS).unwrap_or(0),
    );
    set_u32(e, sys::NFTNL_EXPR_LIMIT_FLAGS, 0);
    e
}

fn reg1() -> u32 {
    u32::try_from(libc::NFT_REG_1).unwrap_or(1)
}

/// libnftnl's attribute numbers are small constants; its setters take them as u16.
pub(super) fn attr(a: u32) -> u16 {
    u16::try_from(a).unwrap_or(u16::MAX)
}

/// A new expression of type `name`; aborts on allocation failure, as nftnl itself does.
pub(super) fn alloc(name: &CStr) -> NonNull<sys::nftnl_expr> {
    // SAFETY: `name` is a NUL-terminated expression type name that libnftnl copies.
    let e = unsafe { sys::nftnl_expr_alloc(name.as_ptr()) };
    NonNull::new(e).unwrap_or_else(|| std::process::abort())
}

pub(super) fn set_u32(e: NonNull<sys::nftnl_expr>, a: u32, value: u32) {
    // SAFETY: `e` is a live expression from `alloc`; libnftnl copies the value.
    unsafe { sys::nftnl_expr_set_u32(e.as_ptr(), attr(a), value) };
}

pub(super) fn set_u64(e: NonNull<sys::nftnl_expr>, a: u32, value: u64) {
    // SAFETY: `e` is a live expression from `alloc`; libnftnl copies the value.
    unsafe { sys::nftnl_expr_set_u64(e.as_ptr(), attr(a), value) };
}

pub(super) fn set_data(e: NonNull<sys::nftnl_expr>, a: u32, value: &[u8]) {
    let len = u32::try_from(value.len()).unwrap_or(0);
    // SAFETY: `e` is a live expression from `alloc`; `value` is valid for `len` bytes
    // and libnftnl copies them before this call returns.
    unsafe { sys::nftnl_expr_set(e.as_ptr(), attr(a), value.as_ptr().cast(), len) };
}

pub(super) fn set_str(e: NonNull<sys::nftnl_expr>, a: u32, value: &CStr) {
    // SAFETY: `e` is a live expression from `alloc`; `value` is NUL-terminated and
    // libnftnl duplicates it (strdup) before this call returns.
    unsafe { sys::nftnl_expr_set_str(e.as_ptr(), attr(a), value.as_ptr()) };
}
