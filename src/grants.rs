//! The daemon's book of grants: ids, who asked, when, until when. The kernel's sets
//! are what close holes on time; the book is for naming, listing and early revoke.
//!
//! One record per (service, address): a new grant for an address that has one
//! extends it and keeps its id. At start the book is reconciled with the kernel's
//! sets, so grants survive a restart. Pure, except `load`/`save` of its JSON file.
//!
//! [`GrantRecord`] is a grant as the admin protocol and the logs show it; the book
//! keeps grants far smaller (`book`), and its file is in `file`.

mod book;
mod file;
#[cfg(test)]
mod tests;

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use book::GrantBook;

use crate::clock::UnixMs;

/// One open hole.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantRecord {
    /// Short id for `knockgate revoke`.
    pub id: String,
    /// What is open (`ssh`).
    pub service: String,
    /// For which source address.
    pub address: IpAddr,
    /// Who asked: `key alice-laptop`, `uid 0`, or `recovered` (found in the kernel at
    /// start with no record).
    pub who: String,
    /// Unix seconds when it was granted (or last extended), rounded down.
    pub granted_at: u64,
    /// Unix seconds when it ends, rounded up.
    pub expires_at: u64,
    /// Unix milliseconds when it was granted: the book's own time.
    #[serde(default)]
    pub granted_at_ms: u64,
    /// Unix milliseconds when it ends (its TTL after the grant; the kernel closes the
    /// port within a few timer ticks after it, never before: `KernelTimer::overshoot`).
    #[serde(default)]
    pub expires_at_ms: u64,
}

impl GrantRecord {
    /// When it ends, in milliseconds.
    #[must_use]
    pub fn ends(&self) -> UnixMs {
        UnixMs(self.expires_at_ms)
    }

    fn set_times(&mut self, granted: UnixMs, expires: UnixMs) {
        (self.granted_at, self.granted_at_ms) = (granted.secs(), granted.0);
        (self.expires_at, self.expires_at_ms) = (expires.secs_ceil(), expires.0);
    }
}

impl WindowRecord {
    /// When it ends, in milliseconds.
    #[must_use]
    pub fn ends(&self) -> UnixMs {
        UnixMs(self.expires_at_ms)
    }

    /// Sets when it opened and when it ends (seconds and milliseconds alike).
    pub fn set_times(&mut self, granted: UnixMs, expires: UnixMs) {
        (self.granted_at, self.granted_at_ms) = (granted.secs(), granted.0);
        (self.expires_at, self.expires_at_ms) = (expires.secs_ceil(), expires.0);
    }
}

/// What an egress window opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WindowScope {
    /// The sockets of one cgroup (a command and its children).
    Cgroup(u64),
    /// The whole host.
    Host,
}

impl std::fmt::Display for WindowScope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cgroup(id) => write!(f, "cgroup {id}"),
            Self::Host => f.write_str("host-wide"),
        }
    }
}

/// One open egress window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowRecord {
    /// Short id for `knockgate revoke`.
    pub id: String,
    /// What it opens.
    pub scope: WindowScope,
    /// Who asked: `uid 0`, or `recovered`.
    pub who: String,
    /// The command it was opened for, as the requester described it.
    pub command: String,
    /// Destinations it is restricted to (`--to`); empty means any.
    #[serde(default)]
    pub to: Vec<IpAddr>,
    /// Unix seconds when it opened, rounded down.
    pub granted_at: u64,
    /// Unix seconds when it ends, rounded up.
    pub expires_at: u64,
    /// Unix milliseconds when it opened.
    #[serde(default)]
    pub granted_at_ms: u64,
    /// Unix milliseconds when it ends.
    #[serde(default)]
    pub expires_at_ms: u64,
}

/// That the book file with digest `book_sha256` was true of the kernel: the boot and
/// network namespace, and the ruleset generation up to which every commit was
/// knockgated's own. A start that finds the kernel still at that generation (same
/// boot, same namespace) and the book file with that digest knows nobody changed a
/// thing since — neither the table nor the file — and can leave the grant sets as they
/// are instead of reading them back. Saved in a small file of its own beside the book,
/// so that a stop with an unchanged book rewrites only this.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelStamp {
    /// SHA-256 of the book file it speaks for, in hex.
    pub book_sha256: String,
    /// `/proc/sys/kernel/random/boot_id`.
    pub boot_id: String,
    /// The network namespace's cookie (unique within the boot).
    pub netns: u64,
    /// The nf_tables ruleset generation.
    pub generation: u32,
}

impl KernelStamp {
    /// The stamp saved in `path`, if it is there and whole (anything else: none, and
    /// the start reads the kernel's sets back as it always could).
    #[must_use]
    pub fn load(path: &Path) -> Option<Self> {
        let text = std::fs::read(path).ok()?;
        serde_json::from_slice(&text).ok()
    }

    /// The stamp as its file holds it.
    #[must_use]
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// Whether a grant opened a new hole or extended one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Granted {
    /// A new hole.
    New,
    /// An existing hole for the same address, now open longer.
    Extended,
}

/// A grant's id as the book keeps it: 32 random bits, shown as 8 hex digits.
pub type GrantId = u32;

/// An id as `knockgate grants` shows it and `knockgate revoke` takes it.
#[must_use]
pub fn id_text(id: GrantId) -> String {
    format!("{id:08x}")
}

/// The id `text` names, if it is one as [`id_text`] writes ids.
#[must_use]
pub fn parse_id(text: &str) -> Option<GrantId> {
    let hex = text.len() == 8 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    hex.then(|| u32::from_str_radix(text, 16).ok()).flatten()
}

/// When a kernel element with `expires_in` left at `now` ends, as the book counts
/// it: less the tick every timeout knockgate sets adds (so a time read back and set
/// again does not creep later by a tick each time).
fn kernel_end(now: UnixMs, expires_in: Option<Duration>) -> UnixMs {
    expires_in.map_or(UnixMs::NEVER, |d| {
        now.plus(d.saturating_sub(crate::clock::kernel_timer().tick()))
    })
}

/// A fresh random grant id.
#[must_use]
pub fn new_id() -> GrantId {
    let mut bytes = [0u8; 4];
    // Without randomness, fall back to the clock: ids only need to be unique locally.
    if getrandom::fill(&mut bytes).is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        bytes = nanos.to_be_bytes();
    }
    u32::from_be_bytes(bytes)
}
