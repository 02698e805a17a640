//! Table messages with flags, which nftnl's `Table` cannot carry: knockgate locks its
//! table with `NFT_TABLE_F_OWNER | NFT_TABLE_F_PERSIST` where the kernel has them.
//!
//! Kernel facts (`shared/research/nftnl-notes.md` §5, re-checked by the lab tests):
//! an owned table refuses every change from other sockets (EPERM) and `nft flush
//! ruleset` passes over it; PERSIST (Linux ≥ 6.9) keeps it, orphaned, when the owner
//! exits, and a later `NEWTABLE` with both flags takes it over; toggling PERSIST on an
//! existing table is EOPNOTSUPP, so a replace first re-adds the table with the flags it
//! has now.

use std::ffi::{CStr, c_char, c_void};
use std::ptr::NonNull;

use nftnl::nftnl_sys::{self as sys, libc};
use nftnl::{MsgType, NlMsg};

/// `NFT_TABLE_F_OWNER`: only the creating netlink socket may change the table.
pub const OWNER: u32 = 0x2;
/// `NFT_TABLE_F_PERSIST`: the table outlives its owner's socket.
pub const PERSIST: u32 = 0x4;
const NFPROTO_INET: u16 = 1;

/// An inet table message with explicit flags.
pub struct FlaggedTable {
    raw: NonNull<sys::nftnl_table>,
}

impl FlaggedTable {
    /// Inet table `name` with `flags`.
    pub fn new(name: &CStr, flags: u32) -> Self {
        // SAFETY: plain allocation; null (out of memory) is handled below.
        let raw = unsafe { sys::nftnl_table_alloc() };
        let raw = NonNull::new(raw).expect("libnftnl could not allocate a table");
        // SAFETY: `raw` is a live table; libnftnl copies the string.
        unsafe {
            sys::nftnl_table_set_str(raw.as_ptr(), attr(sys::NFTNL_TABLE_NAME), name.as_ptr())
        };
        // SAFETY: as above; plain value.
        unsafe {
            sys::nftnl_table_set_u32(
                raw.as_ptr(),
                attr(sys::NFTNL_TABLE_FAMILY),
                u32::from(NFPROTO_INET),
            );
        };
        // SAFETY: as above.
        unsafe { sys::nftnl_table_set_u32(raw.as_ptr(), attr(sys::NFTNL_TABLE_FLAGS), flags) };
        Self { raw }
    }
}

// SAFETY: `write` builds exactly one table message into the buffer the batch hands
// it, which the batch sizes for the largest message (nftnl's contract for `NlMsg`).
unsafe impl NlMsg for FlaggedTable {
    unsafe fn write(&self, buf: *mut c_void, seq: u32, msg_type: MsgType) {
        let kind = match msg_type {
            MsgType::Add => libc::NFT_MSG_NEWTABLE,
            MsgType::Del => libc::NFT_MSG_DELTABLE,
        };
        let kind = u16::try_from(kind).unwrap_or(u16::MAX);
        let flags = u16::try_from(libc::NLM_F_ACK).unwrap_or(0);
        // SAFETY: `buf` has room for one message (the caller's contract).
        let header = unsafe {
            sys::nftnl_nlmsg_build_hdr(buf.cast::<c_char>(), kind, NFPROTO_INET, flags, seq)
        };
        // SAFETY: `header` was just built in `buf`; `self.raw` is a live table.
        unsafe { sys::nftnl_table_nlmsg_build_payload(header, self.raw.as_ptr()) };
    }
}

impl Drop for FlaggedTable {
    fn drop(&mut self) {
        // SAFETY: allocated in `new`, freed once, here.
        unsafe { sys::nftnl_table_free(self.raw.as_ptr()) };
    }
}

fn attr(a: sys::nftnl_table_attr) -> u16 {
    u16::try_from(a).unwrap_or(u16::MAX)
}
