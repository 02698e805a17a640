//! Set elements: the messages that add, refresh and delete grants, and the dump
//! that reads a set back. nftnl's safe API always sends element adds with
//! `NLM_F_EXCL` and cannot read elements at all, so this builds raw libnftnl sets.
//!
//! Refresh without kernel 6.12's re-add semantics: `add (no EXCL); delete; add` in
//! one batch works whether or not the element exists, on 6.1 and later.

use std::ffi::{CStr, c_void};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::raw::c_char;
use std::ptr::NonNull;
use std::time::Duration;

use nftnl::nftnl_sys::{self as sys, libc};
use nftnl::{MsgType, NlMsg, ProtoFamily};

use crate::ruleset::{Element, ElementKey};

/// Most bytes of element attributes one NEWSETELEM message may carry. Two limits
/// sit above it: the element list is one netlink attribute whose length is 16 bits
/// (65,535 — past it the length wraps and the kernel silently takes a shorter list),
/// and libnftnl's batch leaves one message `nft_nlmsg_maxsize()` bytes (64 KiB + a
/// page — past it libnftnl writes beyond its buffer). Half the smaller one leaves room
/// for the headers and for any error in [`element_bound`].
pub(super) const ELEM_MSG_BUDGET: usize = 32 * 1024;

/// An upper bound on the bytes one element with a `key_len`-byte key adds to a
/// message, counted from the attributes libnftnl can write for it: the element's nest
/// (4), flags (4 + 4), timeout (4 + 8), expiration (4 + 8), the key's nest (4) and its
/// data attribute (4 + the key padded to 4). Checked here, before libnftnl writes:
/// libnftnl itself checks nothing.
#[must_use]
pub(super) const fn element_bound(key_len: usize) -> usize {
    4 + 8 + 12 + 12 + 4 + 4 + key_len.div_ceil(4) * 4
}

/// The key's bytes as the kernel stores them.
fn key_bytes(key: ElementKey) -> Vec<u8> {
    match key {
        ElementKey::Addr(IpAddr::V4(a)) => a.octets().to_vec(),
        ElementKey::Addr(IpAddr::V6(a)) => a.octets().to_vec(),
        // cgroup ids are compared in host byte order (the socket expression loads them so).
        ElementKey::Cgroup(id) => id.to_ne_bytes().to_vec(),
        ElementKey::Proto(p) => vec![p],
        // Concatenations: each field in its own 4-byte-aligned register slots.
        ElementKey::CgroupAddr(id, IpAddr::V4(a)) => [&id.to_ne_bytes()[..], &a.octets()].concat(),
        ElementKey::CgroupAddr(id, IpAddr::V6(a)) => [&id.to_ne_bytes()[..], &a.octets()].concat(),
        // A touch as the rules load it: the protocol in the low byte of a zeroed
        // register, the port's two bytes (network order) at the start of the next.
        ElementKey::SeqStart { proto, port, .. } => touch_bytes(proto, port).to_vec(),
        ElementKey::SeqStep {
            stage, proto, port, ..
        }
        | ElementKey::SeqUsed { stage, proto, port } => {
            [&stage.to_ne_bytes()[..], &touch_bytes(proto, port)].concat()
        }
    }
}

fn touch_bytes(proto: u8, port: u16) -> [u8; 8] {
    let [hi, lo] = port.to_be_bytes();
    [proto, 0, 0, 0, hi, lo, 0, 0]
}

/// A map element's data: stages and completions are compared and marked as the
/// host-order `u32` the registers hold.
fn data_bytes(key: ElementKey) -> Option<[u8; 4]> {
    match key {
        ElementKey::SeqStart { next, .. } | ElementKey::SeqStep { next, .. } => {
            Some(next.to_ne_bytes())
        }
        _ => None,
    }
}

/// The bound of one element of `key`, its data included (the data's nest and
/// attribute: 4 + 4 + 4).
fn bound_of(key: ElementKey) -> usize {
    element_bound(key_bytes(key).len()) + if data_bytes(key).is_some() { 12 } else { 0 }
}

/// A raw libnftnl set holding the elements of one message; freed on drop.
pub(super) struct ElemMsg {
    set: NonNull<sys::nftnl_set>,
    /// Add with `NLM_F_EXCL` (fail if present) rather than create-or-keep.
    exclusive: bool,
    /// The bound ([`element_bound`]) of the elements pushed so far.
    bytes: usize,
    /// How many elements were pushed.
    count: usize,
}

/// `elements` of set `set` (id `set_id`, see [`ElemMsg::new`]) as as many messages as
/// the [`ELEM_MSG_BUDGET`] needs, in order, each built only when the one before is
/// taken: a batch writes a message as it is added, so its libnftnl objects (a couple
/// of hundred bytes an element) are freed before the next are made — a whole replace
/// of a million elements would otherwise hold all of them at once.
pub(super) fn element_messages<'a>(
    table: &'a CStr,
    set: &'a CStr,
    set_id: u32,
    exclusive: bool,
    elements: &'a [Element],
) -> impl Iterator<Item = ElemMsg> + 'a {
    messages_of(
        elements,
        move || ElemMsg::new(table, set, set_id, exclusive),
        |m, e| {
            m.push(e.key, e.expires_in);
        },
    )
}

/// One phase of refreshing `elements` of set `set` (existing, id 0), as as many
/// messages as the budget needs, built one at a time likewise.
pub(super) fn refresh_messages<'a>(
    table: &'a CStr,
    set: &'a CStr,
    elements: &'a [Element],
    phase: super::Phase,
) -> impl Iterator<Item = ElemMsg> + 'a {
    let exclusive = phase == super::Phase::Add;
    messages_of(
        elements,
        move || ElemMsg::new(table, set, 0, exclusive),
        move |m, e| match phase {
            super::Phase::Ensure => m.push(e.key, Some(Duration::from_secs(1))),
            super::Phase::Delete => m.push_key(e.key),
            super::Phase::Add => m.push(e.key, e.expires_in),
        },
    )
}

/// `elements` split into messages made by `new`, each filled by `push` while the next
/// element [`ElemMsg::fits`].
fn messages_of<'a>(
    elements: &'a [Element],
    new: impl Fn() -> ElemMsg + 'a,
    push: impl Fn(&mut ElemMsg, &Element) + 'a,
) -> impl Iterator<Item = ElemMsg> + 'a {
    let mut rest = elements;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut message = new();
        // `fits` is true of any element in an empty message: each takes at least one.
        let mut taken = 0;
        for e in rest {
            if !message.fits(e.key) {
                break;
            }
            push(&mut message, e);
            taken += 1;
        }
        rest = &rest[taken..];
        Some(message)
    })
}

impl ElemMsg {
    /// An empty element list for set `set` (id `set_id` in this batch, 0 if it already
    /// exists) in the inet table `table`.
    pub(super) fn new(table: &CStr, set: &CStr, set_id: u32, exclusive: bool) -> Self {
        // SAFETY: allocation has no preconditions; NULL (out of memory) aborts below.
        let raw = unsafe { sys::nftnl_set_alloc() };
        let raw = NonNull::new(raw).unwrap_or_else(|| std::process::abort());
        let family = u32::try_from(libc::NFPROTO_INET).unwrap_or(1);
        // SAFETY: `raw` is live; libnftnl copies the strings and values.
        unsafe { sys::nftnl_set_set_str(raw.as_ptr(), attr(sys::NFTNL_SET_TABLE), table.as_ptr()) };
        // SAFETY: as above.
        unsafe { sys::nftnl_set_set_str(raw.as_ptr(), attr(sys::NFTNL_SET_NAME), set.as_ptr()) };
        // SAFETY: as above.
        unsafe { sys::nftnl_set_set_u32(raw.as_ptr(), attr(sys::NFTNL_SET_FAMILY), family) };
        if set_id != 0 {
            // SAFETY: as above.
            unsafe { sys::nftnl_set_set_u32(raw.as_ptr(), attr(sys::NFTNL_SET_ID), set_id) };
        }
        Self {
            set: raw,
            exclusive,
            bytes: 0,
            count: 0,
        }
    }

    /// Whether one more element with `key` stays within [`ELEM_MSG_BUDGET`] (an empty
    /// message always takes one: no key is anywhere near the budget).
    pub(super) fn fits(&self, key: ElementKey) -> bool {
        self.count == 0 || self.bytes + bound_of(key) <= ELEM_MSG_BUDGET
    }

    /// Adds `key` to the list, to expire after `timeout` (rounded up to whole ms).
    /// Callers keep to [`ElemMsg::fits`]; [`element_messages`] does.
    pub(super) fn push(&mut self, key: ElementKey, timeout: Option<Duration>) {
        self.push_with(key, timeout, true);
    }

    /// Adds `key` alone (no data, no timeout), for a delete message.
    pub(super) fn push_key(&mut self, key: ElementKey) {
        self.push_with(key, None, false);
    }

    fn push_with(&mut self, key: ElementKey, timeout: Option<Duration>, with_data: bool) {
        // SAFETY: allocation has no preconditions; NULL aborts below.
        let elem = unsafe { sys::nftnl_set_elem_alloc() };
        let elem = NonNull::new(elem).unwrap_or_else(|| std::process::abort());
        self.bytes += bound_of(key);
        self.count += 1;
        if with_data {
            if let Some(data) = data_bytes(key) {
                // SAFETY: `elem` is live; `data` is 4 readable bytes that libnftnl copies.
                unsafe {
                    sys::nftnl_set_elem_set(
                        elem.as_ptr(),
                        attr(sys::NFTNL_SET_ELEM_DATA),
                        data.as_ptr().cast::<c_void>(),
                        4,
                    );
                }
            }
        }
        let key = key_bytes(key);
        let len = u32::try_from(key.len()).unwrap_or(16);
        // SAFETY: `elem` is live; `key` is `len` readable bytes that libnftnl copies.
        unsafe {
            sys::nftnl_set_elem_set(
                elem.as_ptr(),
                attr(sys::NFTNL_SET_ELEM_KEY),
                key.as_ptr().cast::<c_void>(),
                len,
            );
        }
        if let Some(timeout) = timeout {
            let ms = u64::try_from(timeout.as_millis())
                .unwrap_or(u64::MAX)
                .max(1);
            // SAFETY: `elem` is live; libnftnl copies the value.
            unsafe {
                sys::nftnl_set_elem_set_u64(elem.as_ptr(), attr(sys::NFTNL_SET_ELEM_TIMEOUT), ms);
            }
        }
        // SAFETY: both are live; the set takes ownership of `elem` and frees it with itself.
        unsafe { sys::nftnl_set_elem_add(self.set.as_ptr(), elem.as_ptr()) };
    }
}

impl Drop for ElemMsg {
    fn drop(&mut self) {
        // SAFETY: `self.set` came from `nftnl_set_alloc` and is freed exactly once, here.
        unsafe { sys::nftnl_set_free(self.set.as_ptr()) };
    }
}

// SAFETY: `write` builds one message into the buffer nftnl's batch hands it, which is
// at least `nft_nlmsg_maxsize()` bytes, the bound libnftnl assumes.
unsafe impl NlMsg for ElemMsg {
    unsafe fn write(&self, buf: *mut c_void, seq: u32, msg_type: MsgType) {
        let (kind, flags) = match msg_type {
            MsgType::Add if self.exclusive => (
                libc::NFT_MSG_NEWSETELEM,
                libc::NLM_F_CREATE | libc::NLM_F_EXCL | libc::NLM_F_ACK,
            ),
            MsgType::Add => (
                libc::NFT_MSG_NEWSETELEM,
                libc::NLM_F_CREATE | libc::NLM_F_ACK,
            ),
            MsgType::Del => (libc::NFT_MSG_DELSETELEM, libc::NLM_F_ACK),
        };
        let family = u16::try_from(ProtoFamily::Inet as i32).unwrap_or(1);
        // SAFETY: `buf` is the batch's current message buffer (see the impl's comment).
        let header = unsafe {
            sys::nftnl_nlmsg_build_hdr(
                buf.cast::<c_char>(),
                u16::try_from(kind).unwrap_or(0),
                family,
                u16::try_from(flags).unwrap_or(0),
                seq,
            )
        };
        // SAFETY: `header` was just built in `buf`; `self.set` is live.
        unsafe { sys::nftnl_set_elems_nlmsg_build_payload(header, self.set.as_ptr()) };
    }
}

/// The GETSETELEM dump request for `set` in `table`.
pub(super) fn dump_request(table: &CStr, set: &CStr, seq: u32) -> Vec<u8> {
    let msg = ElemMsg::new(table, set, 0, false);
    let size = usize::try_from(nftnl::nft_nlmsg_maxsize()).unwrap_or(65536);
    let mut buf = vec![0u8; size];
    let family = u16::try_from(ProtoFamily::Inet as i32).unwrap_or(1);
    let flags = u16::try_from(libc::NLM_F_DUMP).unwrap_or(0);
    let kind = u16::try_from(libc::NFT_MSG_GETSETELEM).unwrap_or(0);
    // SAFETY: `buf` holds `nft_nlmsg_maxsize()` bytes, the bound libnftnl writes within.
    let header = unsafe {
        sys::nftnl_nlmsg_build_hdr(buf.as_mut_ptr().cast::<c_char>(), kind, family, flags, seq)
    };
    // SAFETY: `header` points into `buf`; `msg.set` is live.
    unsafe { sys::nftnl_set_elems_nlmsg_build_payload(header, msg.set.as_ptr()) };
    // SAFETY: `header` points at the header just written into `buf`.
    let len = unsafe { (*header).nlmsg_len };
    buf.truncate(usize::try_from(len).unwrap_or(0));
    buf
}

/// The elements in one NEWSETELEM message of a dump. `message` is one whole netlink
/// message copied into 4-byte-aligned storage.
pub(super) fn parse_dump_message(message: &[u32]) -> Vec<Element> {
    let mut out = Vec::new();
    // SAFETY: allocation has no preconditions; NULL aborts below.
    let set = unsafe { sys::nftnl_set_alloc() };
    let Some(set) = NonNull::new(set) else {
        std::process::abort()
    };
    let header = message.as_ptr().cast::<libc::nlmsghdr>();
    // SAFETY: `message` is an aligned, complete netlink message from the kernel
    // (the caller checked its length field); libnftnl only reads within nlmsg_len.
    let parsed = unsafe { sys::nftnl_set_elems_nlmsg_parse(header, set.as_ptr()) };
    if parsed >= 0 {
        let data: *mut c_void = (&raw mut out).cast();
        // SAFETY: `set` is live; `collect` only runs during this call, while `out` lives.
        unsafe { sys::nftnl_set_elem_foreach(set.as_ptr(), Some(collect), data) };
    }
    // SAFETY: `set` came from `nftnl_set_alloc` and is freed once, here.
    unsafe { sys::nftnl_set_free(set.as_ptr()) };
    out
}

/// `nftnl_set_elem_foreach` callback: appends one element to the `Vec<Element>` in `data`.
extern "C" fn collect(elem: *mut sys::nftnl_set_elem, data: *mut c_void) -> i32 {
    // SAFETY: `data` is the `&mut Vec<Element>` passed by `parse_dump_message`.
    let out = unsafe { &mut *data.cast::<Vec<Element>>() };
    let mut len = 0u32;
    // SAFETY: `elem` is live for the callback; libnftnl returns a pointer to `len` bytes.
    let raw = unsafe { sys::nftnl_set_elem_get(elem, attr(sys::NFTNL_SET_ELEM_KEY), &raw mut len) };
    if raw.is_null() {
        return 0;
    }
    let len = usize::try_from(len).unwrap_or(0);
    // SAFETY: libnftnl guarantees `len` readable bytes at `key` while `elem` lives.
    let bytes = unsafe { std::slice::from_raw_parts(raw.cast::<u8>(), len) };
    // The key length tells the set's type apart: knockgate's sets hold addresses
    // (4, 16 bytes), cgroup ids (8), protocol numbers (1) or cgroup-address pairs
    // (12, 24).
    let key = match len {
        4 => <[u8; 4]>::try_from(bytes)
            .ok()
            .map(|b| ElementKey::Addr(IpAddr::V4(Ipv4Addr::from(b)))),
        16 => <[u8; 16]>::try_from(bytes)
            .ok()
            .map(|b| ElementKey::Addr(IpAddr::V6(Ipv6Addr::from(b)))),
        8 => <[u8; 8]>::try_from(bytes)
            .ok()
            .map(|b| ElementKey::Cgroup(u64::from_ne_bytes(b))),
        12 | 24 => cgroup_addr(bytes),
        1 => bytes.first().map(|&p| ElementKey::Proto(p)),
        _ => None,
    };
    // SAFETY: `elem` is live; absent attributes read as 0.
    let expires_ms =
        unsafe { sys::nftnl_set_elem_get_u64(elem, attr(sys::NFTNL_SET_ELEM_EXPIRATION)) };
    if let Some(key) = key {
        out.push(Element {
            key,
            expires_in: (expires_ms > 0).then(|| Duration::from_millis(expires_ms)),
        });
    }
    0
}

/// An element read from a set of `mark . inet_proto . inet_service` keys (the dump
/// cannot tell them from `cgroupsv2 . ipv4_addr`, which are 12 bytes too).
pub(super) fn as_stage_touch(key: ElementKey) -> ElementKey {
    let ElementKey::CgroupAddr(_, IpAddr::V4(_)) = key else {
        return key;
    };
    let bytes = key_bytes(key);
    ElementKey::SeqUsed {
        stage: u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]),
        proto: bytes[4],
        port: u16::from_be_bytes([bytes[8], bytes[9]]),
    }
}

/// A `cgroupsv2 . ipv4_addr` (12 bytes) or `cgroupsv2 . ipv6_addr` (24 bytes) key.
fn cgroup_addr(bytes: &[u8]) -> Option<ElementKey> {
    let id = u64::from_ne_bytes(<[u8; 8]>::try_from(bytes.get(..8)?).ok()?);
    let addr = match bytes.len() {
        12 => IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(&bytes[8..]).ok()?)),
        24 => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&bytes[8..]).ok()?)),
        _ => return None,
    };
    Some(ElementKey::CgroupAddr(id, addr))
}

fn attr(a: u32) -> u16 {
    u16::try_from(a).unwrap_or(u16::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn written_len(msg: &ElemMsg) -> usize {
        let size = usize::try_from(nftnl::nft_nlmsg_maxsize()).unwrap();
        let mut buf = vec![0u32; size / 4 + 1];
        // SAFETY: `buf` holds at least `nft_nlmsg_maxsize()` bytes, 4-byte aligned, the
        // room `write` may use.
        unsafe { msg.write(buf.as_mut_ptr().cast::<c_void>(), 1, MsgType::Add) };
        usize::try_from(buf[0]).unwrap()
    }

    fn elements(n: usize, key: impl Fn(u32) -> ElementKey) -> Vec<Element> {
        (0..u32::try_from(n).unwrap())
            .map(|i| Element {
                key: key(i),
                expires_in: Some(Duration::from_secs(3600)),
            })
            .collect()
    }

    fn v4(i: u32) -> ElementKey {
        ElementKey::Addr(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)))
    }

    fn v6(i: u32) -> ElementKey {
        ElementKey::Addr(IpAddr::V6(Ipv6Addr::from(
            0xfd77_u128 << 112 | u128::from(i),
        )))
    }

    fn cgroup_v6(i: u32) -> ElementKey {
        ElementKey::CgroupAddr(
            u64::from(i) << 20,
            IpAddr::V6(Ipv6Addr::from(u128::from(i))),
        )
    }

    #[test]
    fn every_message_stays_within_the_budget_and_the_bound_holds_per_element() {
        let (t, s) = (c"knockgate", c"ssh_grants_v6");
        let keys: [(&str, &dyn Fn(u32) -> ElementKey); 3] =
            [("v4", &v4), ("v6", &v6), ("cgroup.v6", &cgroup_v6)];
        for (name, key) in keys {
            let all = elements(20_000, key);
            let messages: Vec<ElemMsg> = element_messages(t, s, 1, true, &all).collect();
            assert_eq!(
                messages.iter().map(|m| m.count).sum::<usize>(),
                all.len(),
                "{name}"
            );
            let empty = written_len(&ElemMsg::new(t, s, 1, true));
            for m in &messages {
                let len = written_len(m);
                assert!(
                    len - empty <= m.bytes,
                    "{name}: wrote {len} bytes, bound {}",
                    m.bytes
                );
                assert!(m.bytes <= ELEM_MSG_BUDGET, "{name}");
                assert!(len < usize::from(u16::MAX), "{name}: {len} bytes");
            }
            // Full messages are really full: no budget left for one more element.
            let first = &messages[0];
            assert!(!first.fits(key(0)), "{name}: {} elements", first.count);
        }
    }

    #[test]
    fn elements_split_in_order_with_nothing_lost_at_the_boundaries() {
        let (t, s) = (c"knockgate", c"ssh_grants_v4");
        let per_message = ELEM_MSG_BUDGET / element_bound(4);
        for n in [
            0,
            1,
            per_message - 1,
            per_message,
            per_message + 1,
            3 * per_message + 7,
        ] {
            let list = elements(n, v4);
            let messages: Vec<ElemMsg> = element_messages(t, s, 0, false, &list).collect();
            let counts: Vec<usize> = messages.iter().map(|m| m.count).collect();
            assert_eq!(counts.iter().sum::<usize>(), n);
            assert_eq!(messages.len(), n.div_ceil(per_message), "{n}: {counts:?}");
            assert!(counts.iter().all(|&c| c > 0));
        }
    }
}
