//! [`SeqStep`] → nftnl expressions, built as nft itself builds the same statements
//! (so `nft list ruleset` reads them back), with raw libnftnl calls where the safe
//! API stops (register choice, map lookups, dynset with data and delete, meta set).
//!
//! Register plan (32-bit registers; a concatenation is consecutive registers):
//!
//! | register | holds |
//! |---|---|
//! | `REG32_00`–`03` | the source address (4 or 16 bytes) |
//! | `REG32_04` | `meta mark` (the stage, when part of a key) |
//! | `REG32_05` | the touch's protocol (one byte, zero-padded) |
//! | `REG32_06` | the touch's port (two bytes, network order, zero-padded) |
//! | `REG32_07` | what a lookup led to, then set as the mark |
//! | `REG32_08` | the mark, masked |
//!
//! So `REG32_05`–`06` is the key `inet_proto . inet_service` and `REG32_04`–`06` the
//! key `mark . inet_proto . inet_service`.

use std::ffi::CString;
use std::ptr::NonNull;

use nftnl::expr::{Bitwise, Cmp, CmpOp, Expression};
use nftnl::nftnl_sys::{self as sys, libc};

use super::expr::{
    alloc, cstring, dport_range, l4proto, nfproto, set_data, set_str, set_u32, set_u64,
};
use crate::ruleset::sequence::CLASS_MASK;
use crate::ruleset::{IpFamily, SeqStep};
use crate::service::Protocol;

const REG32_00: u32 = 8;
const R_SOURCE: u32 = REG32_00;
const R_MARK: u32 = REG32_00 + 4;
const R_PROTO: u32 = REG32_00 + 5;
const R_PORT: u32 = REG32_00 + 6;
const R_NEXT: u32 = REG32_00 + 7;
const R_MASKED: u32 = REG32_00 + 8;

/// TCP flags FIN, SYN, RST, ACK; a touch has SYN alone.
const TCP_FLAGS_MASK: u8 = 0x17;
const TCP_SYN: u8 = 0x02;

/// A set's name and id in this batch, or why it cannot be sent.
type Named<'a> = &'a dyn Fn(&str) -> Result<(CString, u32), String>;

/// Adds the expressions of `step` to `rule`.
pub(super) fn add(
    rule: &mut nftnl::Rule<'_>,
    step: &SeqStep,
    set_id: &dyn Fn(&str) -> Option<u32>,
) -> Result<(), String> {
    let named = |set: &str| -> Result<(CString, u32), String> {
        let id = set_id(set).ok_or_else(|| format!("set {set} is not in this batch"))?;
        Ok((cstring(set)?, id))
    };
    match step {
        SeqStep::Guard { protocol, ports } => {
            if *protocol == Protocol::Tcp {
                l4proto(rule, libc::IPPROTO_TCP);
                rule.add_expr(&Payload {
                    base: libc::NFT_PAYLOAD_TRANSPORT_HEADER,
                    offset: 13,
                    len: 1,
                    dreg: reg1(),
                });
                rule.add_expr(&Bitwise::new(TCP_FLAGS_MASK, 0u8));
                rule.add_expr(&Cmp::new(CmpOp::Eq, TCP_SYN));
            }
            dport_range(rule, *protocol, ports.first, ports.last);
        }
        SeqStep::Stage { family, progress } => {
            let (set, id) = named(progress)?;
            load_source(rule, *family);
            rule.add_expr(&Lookup {
                set,
                id,
                sreg: R_SOURCE,
                dreg: Some(R_NEXT),
                invert: false,
            });
            rule.add_expr(&MetaSet {
                key: libc::NFT_META_MARK,
                sreg: R_NEXT,
            });
        }
        SeqStep::Follow { map, first } => {
            let (set, id) = named(map)?;
            if *first {
                load_touch(rule);
            } else {
                load_stage_touch(rule);
            }
            rule.add_expr(&Lookup {
                set,
                id,
                sreg: if *first { R_PROTO } else { R_MARK },
                dreg: Some(R_NEXT),
                invert: false,
            });
            rule.add_expr(&MetaSet {
                key: libc::NFT_META_MARK,
                sreg: R_NEXT,
            });
        }
        SeqStep::Class(class) => {
            masked_mark(rule, CLASS_MASK);
            rule.add_expr(&EqualAt {
                sreg: R_MASKED,
                value: u32::from(*class) << 24,
            });
        }
        SeqStep::Unused { used } => {
            let (set, id) = named(used)?;
            load_stage_touch(rule);
            rule.add_expr(&Lookup {
                set,
                id,
                sreg: R_MARK,
                dreg: None,
                invert: true,
            });
        }
        SeqStep::Use { .. }
        | SeqStep::Grant { .. }
        | SeqStep::Forget { .. }
        | SeqStep::Advance { .. } => write(rule, step, &named)?,
    }
    Ok(())
}

/// The steps that write set elements.
fn write(rule: &mut nftnl::Rule<'_>, step: &SeqStep, named: Named<'_>) -> Result<(), String> {
    match step {
        SeqStep::Use { used, timeout_ms } => {
            let (set, id) = named(used)?;
            load_stage_touch(rule);
            rule.add_expr(&Dynset {
                set,
                id,
                op: DynsetOp::Add,
                key: R_MARK,
                data: None,
                timeout_ms: Some(*timeout_ms),
            });
        }
        SeqStep::Grant {
            family,
            set,
            timeout_ms,
        } => {
            let (set, id) = named(set)?;
            load_source(rule, *family);
            rule.add_expr(&Dynset {
                set,
                id,
                op: DynsetOp::Add,
                key: R_SOURCE,
                data: None,
                timeout_ms: Some(*timeout_ms),
            });
        }
        SeqStep::Forget { family, progress } | SeqStep::Advance { family, progress } => {
            let (set, id) = named(progress)?;
            load_source(rule, *family);
            // The data of both is the mark: what a delete carries is not compared (the
            // kernel wants a data register for any dynset on a map), and an add puts
            // the source at the stage the mark holds.
            rule.add_expr(&MetaLoad {
                key: libc::NFT_META_MARK,
                dreg: R_NEXT,
            });
            let op = if matches!(step, SeqStep::Forget { .. }) {
                DynsetOp::Delete
            } else {
                DynsetOp::Add
            };
            rule.add_expr(&Dynset {
                set,
                id,
                op,
                key: R_SOURCE,
                data: Some(R_NEXT),
                timeout_ms: None,
            });
        }
        _ => {}
    }
    Ok(())
}

/// `meta nfproto F` and the source address into [`R_SOURCE`].
fn load_source(rule: &mut nftnl::Rule<'_>, family: IpFamily) {
    nfproto(rule, family);
    let (offset, len) = match family {
        IpFamily::V4 => (12, 4),
        IpFamily::V6 => (8, 16),
    };
    rule.add_expr(&Payload {
        base: libc::NFT_PAYLOAD_NETWORK_HEADER,
        offset,
        len,
        dreg: R_SOURCE,
    });
}

/// `meta l4proto . th dport` into [`R_PROTO`]–[`R_PORT`].
fn load_touch(rule: &mut nftnl::Rule<'_>) {
    rule.add_expr(&MetaLoad {
        key: libc::NFT_META_L4PROTO,
        dreg: R_PROTO,
    });
    rule.add_expr(&Payload {
        base: libc::NFT_PAYLOAD_TRANSPORT_HEADER,
        offset: 2,
        len: 2,
        dreg: R_PORT,
    });
}

/// `meta mark . meta l4proto . th dport` into [`R_MARK`]–[`R_PORT`].
fn load_stage_touch(rule: &mut nftnl::Rule<'_>) {
    rule.add_expr(&MetaLoad {
        key: libc::NFT_META_MARK,
        dreg: R_MARK,
    });
    load_touch(rule);
}

/// `meta mark & mask` into [`R_MASKED`].
fn masked_mark(rule: &mut nftnl::Rule<'_>, mask: u32) {
    rule.add_expr(&MetaLoad {
        key: libc::NFT_META_MARK,
        dreg: R_MASKED,
    });
    rule.add_expr(&MaskBits {
        sreg: R_MASKED,
        dreg: R_MASKED,
        mask,
    });
}

fn reg1() -> u32 {
    u32::try_from(libc::NFT_REG_1).unwrap_or(1)
}

fn unsigned(v: libc::c_int) -> u32 {
    u32::try_from(v).unwrap_or(0)
}

/// A payload load into any register.
struct Payload {
    base: libc::c_int,
    offset: u32,
    len: u32,
    dreg: u32,
}

impl Expression for Payload {
    fn to_expr(&self, _rule: &nftnl::Rule<'_>) -> NonNull<sys::nftnl_expr> {
        let e = alloc(c"payload");
        set_u32(e, sys::NFTNL_EXPR_PAYLOAD_BASE, unsigned(self.base));
        set_u32(e, sys::NFTNL_EXPR_PAYLOAD_OFFSET, self.offset);
        set_u32(e, sys::NFTNL_EXPR_PAYLOAD_LEN, self.len);
        set_u32(e, sys::NFTNL_EXPR_PAYLOAD_DREG, self.dreg);
        e
    }
}

/// A meta load into any register.
struct MetaLoad {
    key: libc::c_int,
    dreg: u32,
}

impl Expression for MetaLoad {
    fn to_expr(&self, _rule: &nftnl::Rule<'_>) -> NonNull<sys::nftnl_expr> {
        let e = alloc(c"meta");
        set_u32(e, sys::NFTNL_EXPR_META_KEY, unsigned(self.key));
        set_u32(e, sys::NFTNL_EXPR_META_DREG, self.dreg);
        e
    }
}

/// `meta KEY set <register>`.
struct MetaSet {
    key: libc::c_int,
    sreg: u32,
}

impl Expression for MetaSet {
    fn to_expr(&self, _rule: &nftnl::Rule<'_>) -> NonNull<sys::nftnl_expr> {
        let e = alloc(c"meta");
        set_u32(e, sys::NFTNL_EXPR_META_KEY, unsigned(self.key));
        set_u32(e, sys::NFTNL_EXPR_META_SREG, self.sreg);
        e
    }
}

/// A set lookup keyed at `sreg`; with `dreg`, a map lookup loading the data there;
/// `invert`: matches when the key is absent.
struct Lookup {
    set: CString,
    id: u32,
    sreg: u32,
    dreg: Option<u32>,
    invert: bool,
}

impl Expression for Lookup {
    fn to_expr(&self, _rule: &nftnl::Rule<'_>) -> NonNull<sys::nftnl_expr> {
        let e = alloc(c"lookup");
        set_u32(e, sys::NFTNL_EXPR_LOOKUP_SREG, self.sreg);
        set_str(e, sys::NFTNL_EXPR_LOOKUP_SET, &self.set);
        set_u32(e, sys::NFTNL_EXPR_LOOKUP_SET_ID, self.id);
        if let Some(dreg) = self.dreg {
            set_u32(e, sys::NFTNL_EXPR_LOOKUP_DREG, dreg);
        }
        if self.invert {
            set_u32(
                e,
                sys::NFTNL_EXPR_LOOKUP_FLAGS,
                unsigned(libc::NFT_LOOKUP_F_INV),
            );
        }
        e
    }
}

/// `<dreg> = <sreg> & mask` (4 bytes).
struct MaskBits {
    sreg: u32,
    dreg: u32,
    mask: u32,
}

impl Expression for MaskBits {
    fn to_expr(&self, _rule: &nftnl::Rule<'_>) -> NonNull<sys::nftnl_expr> {
        let e = alloc(c"bitwise");
        set_u32(e, sys::NFTNL_EXPR_BITWISE_SREG, self.sreg);
        set_u32(e, sys::NFTNL_EXPR_BITWISE_DREG, self.dreg);
        set_u32(e, sys::NFTNL_EXPR_BITWISE_LEN, 4);
        set_data(e, sys::NFTNL_EXPR_BITWISE_MASK, &self.mask.to_ne_bytes());
        set_data(e, sys::NFTNL_EXPR_BITWISE_XOR, &0u32.to_ne_bytes());
        e
    }
}

/// `<sreg> == value` (4 bytes, as the register holds it).
struct EqualAt {
    sreg: u32,
    value: u32,
}

impl Expression for EqualAt {
    fn to_expr(&self, _rule: &nftnl::Rule<'_>) -> NonNull<sys::nftnl_expr> {
        let e = alloc(c"cmp");
        set_u32(e, sys::NFTNL_EXPR_CMP_SREG, self.sreg);
        set_u32(e, sys::NFTNL_EXPR_CMP_OP, unsigned(libc::NFT_CMP_EQ));
        set_data(e, sys::NFTNL_EXPR_CMP_DATA, &self.value.to_ne_bytes());
        e
    }
}

/// The dynset operations used here.
#[derive(Clone, Copy)]
enum DynsetOp {
    Add,
    Delete,
}

/// `add @set { <key> [: <data>] [timeout T] }` / `delete @set { <key> }`.
struct Dynset {
    set: CString,
    id: u32,
    op: DynsetOp,
    key: u32,
    data: Option<u32>,
    timeout_ms: Option<u64>,
}

impl Expression for Dynset {
    fn to_expr(&self, _rule: &nftnl::Rule<'_>) -> NonNull<sys::nftnl_expr> {
        let e = alloc(c"dynset");
        let op = match self.op {
            DynsetOp::Add => libc::NFT_DYNSET_OP_ADD,
            // NFT_DYNSET_OP_DELETE (Linux 5.11); not in every libc release.
            DynsetOp::Delete => 2,
        };
        set_u32(e, sys::NFTNL_EXPR_DYNSET_OP, unsigned(op));
        set_u32(e, sys::NFTNL_EXPR_DYNSET_SREG_KEY, self.key);
        if let Some(data) = self.data {
            set_u32(e, sys::NFTNL_EXPR_DYNSET_SREG_DATA, data);
        }
        set_str(e, sys::NFTNL_EXPR_DYNSET_SET_NAME, &self.set);
        set_u32(e, sys::NFTNL_EXPR_DYNSET_SET_ID, self.id);
        if let Some(ms) = self.timeout_ms {
            set_u64(e, sys::NFTNL_EXPR_DYNSET_TIMEOUT, ms);
        }
        e
    }
}
