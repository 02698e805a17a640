//! Named counter objects (`counter NAME { … }`): created with the table, carried
//! across a whole-table replace with the counts they had, and read back by a dump.
//! The safe `nftnl` API has no objects; these are raw libnftnl calls.

use std::ffi::{CStr, c_char, c_void};
use std::ptr::NonNull;

use nftnl::nftnl_sys::{self as sys, libc};
use nftnl::{MsgType, NlMsg};

use super::expr::NFT_OBJECT_COUNTER;

const NFPROTO_INET: u16 = 1;

/// A counter object message: its table, name and (for a new one) the counts.
pub(super) struct CounterObj {
    raw: NonNull<sys::nftnl_obj>,
}

impl CounterObj {
    /// Counter `name` of inet table `table`, starting at `packets` and `bytes`.
    pub(super) fn new(table: &CStr, name: &CStr, packets: u64, bytes: u64) -> Self {
        let obj = Self::blank();
        let raw = obj.raw.as_ptr();
        // SAFETY: `raw` is a live object; libnftnl copies the strings and values.
        unsafe {
            sys::nftnl_obj_set_str(raw, attr(sys::NFTNL_OBJ_TABLE), table.as_ptr());
            sys::nftnl_obj_set_str(raw, attr(sys::NFTNL_OBJ_NAME), name.as_ptr());
            sys::nftnl_obj_set_u32(raw, attr(sys::NFTNL_OBJ_TYPE), NFT_OBJECT_COUNTER);
            sys::nftnl_obj_set_u32(raw, attr(sys::NFTNL_OBJ_FAMILY), u32::from(NFPROTO_INET));
            sys::nftnl_obj_set_u64(raw, attr(sys::NFTNL_OBJ_CTR_PKTS), packets);
            sys::nftnl_obj_set_u64(raw, attr(sys::NFTNL_OBJ_CTR_BYTES), bytes);
        }
        obj
    }

    fn blank() -> Self {
        // SAFETY: plain allocation; null (out of memory) aborts, as nftnl itself does.
        let raw = unsafe { sys::nftnl_obj_alloc() };
        Self {
            raw: NonNull::new(raw).unwrap_or_else(|| std::process::abort()),
        }
    }
}

// SAFETY: `write` builds exactly one object message into the buffer the batch hands
// it, which the batch sizes for the largest message (nftnl's contract for `NlMsg`).
unsafe impl NlMsg for CounterObj {
    unsafe fn write(&self, buf: *mut c_void, seq: u32, msg_type: MsgType) {
        let kind = match msg_type {
            MsgType::Add => libc::NFT_MSG_NEWOBJ,
            MsgType::Del => libc::NFT_MSG_DELOBJ,
        };
        let kind = u16::try_from(kind).unwrap_or(u16::MAX);
        let flags = u16::try_from(libc::NLM_F_CREATE | libc::NLM_F_ACK).unwrap_or(0);
        // SAFETY: `buf` has room for one message (the caller's contract).
        let header = unsafe {
            sys::nftnl_nlmsg_build_hdr(buf.cast::<c_char>(), kind, NFPROTO_INET, flags, seq)
        };
        // SAFETY: `header` was just built in `buf`; `self.raw` is a live object.
        unsafe { sys::nftnl_obj_nlmsg_build_payload(header, self.raw.as_ptr()) };
    }
}

impl Drop for CounterObj {
    fn drop(&mut self) {
        // SAFETY: allocated in `blank`, freed once, here.
        unsafe { sys::nftnl_obj_free(self.raw.as_ptr()) };
    }
}

/// A dump request for the counter objects of inet table `table`.
pub(super) fn dump_request(table: &CStr, seq: u32) -> Vec<u8> {
    let obj = CounterObj::blank();
    // SAFETY: `obj.raw` is live; libnftnl copies the string and value.
    unsafe {
        sys::nftnl_obj_set_str(obj.raw.as_ptr(), attr(sys::NFTNL_OBJ_TABLE), table.as_ptr());
        sys::nftnl_obj_set_u32(
            obj.raw.as_ptr(),
            attr(sys::NFTNL_OBJ_TYPE),
            NFT_OBJECT_COUNTER,
        );
    }
    let size = usize::try_from(nftnl::nft_nlmsg_maxsize()).unwrap_or(65536);
    let mut buf = vec![0u8; size];
    let flags = u16::try_from(libc::NLM_F_DUMP).unwrap_or(0);
    let kind = u16::try_from(libc::NFT_MSG_GETOBJ).unwrap_or(0);
    // SAFETY: `buf` holds `nft_nlmsg_maxsize()` bytes, the bound libnftnl writes within.
    let header = unsafe {
        sys::nftnl_nlmsg_build_hdr(
            buf.as_mut_ptr().cast::<c_char>(),
            kind,
            NFPROTO_INET,
            flags,
            seq,
        )
    };
    // SAFETY: `header` points into `buf`; `obj.raw` is live.
    unsafe { sys::nftnl_obj_nlmsg_build_payload(header, obj.raw.as_ptr()) };
    // SAFETY: `header` points at the header just written into `buf`.
    let len = unsafe { (*header).nlmsg_len };
    buf.truncate(usize::try_from(len).unwrap_or(0));
    buf
}

/// The table, name and packet and byte counts of one NEWOBJ message of a dump (none
/// if it is not a counter or does not parse). `message` is one whole netlink message
/// copied into 4-byte-aligned storage.
pub(super) fn parse_dump_message(message: &[u32]) -> Option<(String, String, u64, u64)> {
    let obj = CounterObj::blank();
    let raw = obj.raw.as_ptr();
    let header = message.as_ptr().cast::<libc::nlmsghdr>();
    // SAFETY: `message` is an aligned, complete netlink message from the kernel (the
    // socket checked its length field); libnftnl only reads within nlmsg_len.
    if unsafe { sys::nftnl_obj_nlmsg_parse(header, raw) } < 0 {
        return None;
    }
    // SAFETY: `raw` is live; the getters return values or pointers it owns, copied
    // below before `obj` is dropped.
    unsafe {
        if sys::nftnl_obj_get_u32(raw, attr(sys::NFTNL_OBJ_TYPE)) != NFT_OBJECT_COUNTER {
            return None;
        }
        let text = |a| {
            let p = sys::nftnl_obj_get_str(raw, attr(a));
            (!p.is_null()).then(|| CStr::from_ptr(p).to_string_lossy().into_owned())
        };
        Some((
            text(sys::NFTNL_OBJ_TABLE)?,
            text(sys::NFTNL_OBJ_NAME)?,
            sys::nftnl_obj_get_u64(raw, attr(sys::NFTNL_OBJ_CTR_PKTS)),
            sys::nftnl_obj_get_u64(raw, attr(sys::NFTNL_OBJ_CTR_BYTES)),
        ))
    }
}

fn attr(a: u32) -> u16 {
    u16::try_from(a).unwrap_or(u16::MAX)
}
