//! The daemon's book of grants: ids, who asked, when, until when. The kernel's sets
//! are what close holes on time; the book is for naming, listing and early revoke.
//!
//! One record per (service, address): a new grant for an address that has one
//! extends it and keeps its id. At start the book is reconciled with the kernel's
//! sets, so grants survive a restart. Pure, except `load`/`save` of its JSON file.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::clock::UnixMs;
use crate::ruleset::Element;
use crate::state::{StateError, write_atomically};

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
    /// port within a timer tick or two after it, never before).
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

/// All grants by id, indexed so that a grant, a lookup by address, a revoke, an
/// expiry and the next expiry cost about the same with 100,000 grants as with one
/// (a revoke or an expiry used to scan every record for the next end).
#[derive(Debug, Default, Clone)]
pub struct GrantBook {
    records: BTreeMap<String, GrantRecord>,
    windows: BTreeMap<String, WindowRecord>,
    /// (service, address) → id of its record.
    by_address: HashMap<(String, IpAddr), String>,
    /// How many records each `who` holds (a key's quota is checked per knock).
    by_who: HashMap<String, usize>,
    /// The records' ends, exactly as the records hold them.
    grant_ends: Ends,
    /// The windows' ends, likewise.
    window_ends: Ends,
}

/// Ids by the time they end: the first end, and what is due by a time, without
/// looking at anything else.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Ends(BTreeSet<(UnixMs, String)>);

impl Ends {
    fn insert(&mut self, at: UnixMs, id: &str) {
        self.0.insert((at, id.to_owned()));
    }

    fn remove(&mut self, at: UnixMs, id: &str) {
        self.0.remove(&(at, id.to_owned()));
    }

    fn first(&self) -> Option<UnixMs> {
        self.0.first().map(|(at, _)| *at)
    }

    /// Removes and returns the ids that end at or before `now`, earliest first.
    fn take_due(&mut self, now: UnixMs) -> Vec<String> {
        let mut due = Vec::new();
        while self.first().is_some_and(|at| at <= now) {
            if let Some((_, id)) = self.0.pop_first() {
                due.push(id);
            }
        }
        due
    }
}

impl PartialEq for GrantBook {
    fn eq(&self, other: &Self) -> bool {
        self.records == other.records && self.windows == other.windows
    }
}

impl Eq for GrantBook {}

/// The book as knockgate before format 2 saved it (still read): one object per grant,
/// every name and time spelled out, pretty-printed — 254 bytes a grant.
#[derive(Deserialize, Default)]
struct SavedV1 {
    grants: Vec<GrantRecord>,
    #[serde(default)]
    windows: Vec<WindowRecord>,
}

/// The book as saved (format 2): each grant one row, its service and requester
/// numbers into tables named once, times in milliseconds only — a third of the
/// bytes of format 1, and quicker both ways (the save is serialised on the daemon's
/// loop; `cargo bench --bench knock` has the figures).
#[derive(Deserialize)]
struct SavedV2 {
    /// [`BOOK_FORMAT`].
    version: u32,
    services: Vec<String>,
    holders: Vec<String>,
    grants: Vec<GrantRow>,
    windows: Vec<WindowRecord>,
}

/// One grant in the file: id, service (index), address, who (index), granted and
/// ends (Unix ms).
type GrantRow = (String, usize, IpAddr, usize, u64, u64);

/// The book file's format version.
const BOOK_FORMAT: u32 = 2;

impl SavedV2 {
    /// The records, or `None` if a row names a service or requester the tables lack
    /// (a damaged file).
    fn into_records(self) -> Option<(Vec<GrantRecord>, Vec<WindowRecord>)> {
        if self.version != BOOK_FORMAT {
            return None;
        }
        let grants = self
            .grants
            .into_iter()
            .map(|(id, service, address, who, granted, ends)| {
                let mut record = GrantRecord {
                    id,
                    service: self.services.get(service)?.clone(),
                    address,
                    who: self.holders.get(who)?.clone(),
                    granted_at: 0,
                    expires_at: 0,
                    granted_at_ms: 0,
                    expires_at_ms: 0,
                };
                record.set_times(UnixMs(granted), UnixMs(ends));
                Some(record)
            })
            .collect::<Option<Vec<_>>>()?;
        Some((grants, self.windows))
    }
}

/// Writes `book` in format 2 without copying its records: rows are serialised as
/// they are read.
struct SaveV2<'a>(&'a GrantBook);

/// Names numbered in order of first use.
#[derive(Default)]
struct NameTable<'a> {
    numbers: HashMap<&'a str, usize>,
    names: Vec<&'a str>,
}

impl<'a> NameTable<'a> {
    fn add(&mut self, name: &'a str) {
        if !self.numbers.contains_key(name) {
            self.numbers.insert(name, self.names.len());
            self.names.push(name);
        }
    }

    /// `name`'s number (every name was added first; an unknown one gets a number no
    /// table has, so the file would read as damaged rather than as someone else's).
    fn number(&self, name: &str) -> usize {
        self.numbers.get(name).copied().unwrap_or(usize::MAX)
    }
}

/// The grant rows of format 2.
struct GrantRows<'a> {
    book: &'a GrantBook,
    services: &'a NameTable<'a>,
    holders: &'a NameTable<'a>,
}

impl Serialize for GrantRows<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.book.records.values().map(|r| {
            (
                &r.id,
                self.services.number(&r.service),
                r.address,
                self.holders.number(&r.who),
                r.granted_at_ms,
                r.expires_at_ms,
            )
        }))
    }
}

impl Serialize for SaveV2<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let book = self.0;
        let (mut services, mut holders) = (NameTable::default(), NameTable::default());
        for r in book.records.values() {
            services.add(&r.service);
            holders.add(&r.who);
        }
        let rows = GrantRows {
            book,
            services: &services,
            holders: &holders,
        };
        let mut out = serializer.serialize_struct("SavedV2", 5)?;
        out.serialize_field("version", &BOOK_FORMAT)?;
        out.serialize_field("services", &services.names)?;
        out.serialize_field("holders", &holders.names)?;
        out.serialize_field("grants", &rows)?;
        out.serialize_field("windows", &book.windows.values().collect::<Vec<_>>())?;
        out.end()
    }
}

impl GrantBook {
    /// Records a grant of `service` for `address` until `now + ttl`; returns the record
    /// and whether it is new. `new_id` is called only for a new hole. A record whose
    /// time is over (and not yet expired from the book) is not extended: it ended, and
    /// this is a new grant.
    pub fn grant(
        &mut self,
        service: &str,
        address: IpAddr,
        who: &str,
        now: UnixMs,
        ttl: Duration,
        mut new_id: impl FnMut() -> String,
    ) -> (GrantRecord, Granted) {
        let expires_at = now.plus(ttl);
        let key = (service.to_owned(), address);
        let ended = self
            .by_address
            .get(&key)
            .and_then(|id| self.records.get(id))
            .filter(|r| r.ends() <= now)
            .map(|r| r.id.clone());
        if let Some(id) = ended {
            self.revoke(&id);
        }
        if let Some(existing) = self
            .by_address
            .get(&key)
            .and_then(|id| self.records.get_mut(id))
        {
            if existing.who != who {
                let previous = std::mem::replace(&mut existing.who, who.to_owned());
                uncount(&mut self.by_who, &previous);
                *self.by_who.entry(who.to_owned()).or_default() += 1;
            }
            self.grant_ends.remove(existing.ends(), &existing.id);
            existing.set_times(now, expires_at);
            self.grant_ends.insert(existing.ends(), &existing.id);
            return (existing.clone(), Granted::Extended);
        }
        let mut record = GrantRecord {
            id: self.fresh_id(&mut new_id),
            service: service.to_owned(),
            address,
            who: who.to_owned(),
            granted_at: 0,
            expires_at: 0,
            granted_at_ms: 0,
            expires_at_ms: 0,
        };
        record.set_times(now, expires_at);
        self.by_address.insert(key, record.id.clone());
        *self.by_who.entry(record.who.clone()).or_default() += 1;
        self.grant_ends.insert(record.ends(), &record.id);
        self.records.insert(record.id.clone(), record.clone());
        (record, Granted::New)
    }

    /// How many grants `who` (like `key alice`) holds open.
    #[must_use]
    pub fn held_by(&self, who: &str) -> usize {
        self.by_who.get(who).copied().unwrap_or(0)
    }

    /// How many grants are open.
    #[must_use]
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether no grant is open.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Whether `service` is open for `address` (a renewal, not a new hole).
    #[must_use]
    pub fn holds(&self, service: &str, address: IpAddr) -> bool {
        self.by_address.contains_key(&(service.to_owned(), address))
    }

    /// Books `record` again as it was (a rolled-back trial's grants), replacing any
    /// record for the same service and address. If its id went to another grant or a
    /// window meanwhile, it gets a fresh one: ids name one thing each.
    pub fn restore(&mut self, mut record: GrantRecord) {
        let key = (record.service.clone(), record.address);
        if let Some(id) = self.by_address.get(&key).cloned() {
            self.revoke(&id);
        }
        if self.records.contains_key(&record.id) || self.windows.contains_key(&record.id) {
            let taken = record.id.clone();
            record.id = self.fresh_id(&mut || taken.clone());
        }
        self.by_address.insert(key, record.id.clone());
        *self.by_who.entry(record.who.clone()).or_default() += 1;
        self.grant_ends.insert(record.ends(), &record.id);
        self.records.insert(record.id.clone(), record);
    }

    /// Removes the grant `id`.
    pub fn revoke(&mut self, id: &str) -> Option<GrantRecord> {
        let record = self.records.remove(id)?;
        self.unindex_address(&record);
        uncount(&mut self.by_who, &record.who);
        self.grant_ends.remove(record.ends(), &record.id);
        Some(record)
    }

    /// Removes and returns the grants whose time is over, earliest first.
    pub fn expire(&mut self, now: UnixMs) -> Vec<GrantRecord> {
        let gone: Vec<GrantRecord> = self
            .grant_ends
            .take_due(now)
            .iter()
            .filter_map(|id| self.records.remove(id))
            .collect();
        for r in &gone {
            self.unindex_address(r);
            uncount(&mut self.by_who, &r.who);
        }
        gone
    }

    /// Forgets `record`'s address entry if it is `record`'s (never another record's).
    fn unindex_address(&mut self, record: &GrantRecord) {
        let key = (record.service.clone(), record.address);
        if self.by_address.get(&key) == Some(&record.id) {
            self.by_address.remove(&key);
        }
    }

    /// The first end of a grant or a window, if anything is open.
    #[must_use]
    pub fn next_expiry(&self) -> Option<UnixMs> {
        match (self.grant_ends.first(), self.window_ends.first()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Indexes the records' ends anew (after a change to many).
    fn rebuild_grant_ends(&mut self) {
        self.grant_ends = Ends::default();
        for r in self.records.values() {
            self.grant_ends.insert(r.ends(), &r.id);
        }
    }

    /// Indexes the windows' ends anew.
    fn rebuild_window_ends(&mut self) {
        self.window_ends = Ends::default();
        for w in self.windows.values() {
            self.window_ends.insert(w.ends(), &w.id);
        }
    }

    fn rebuild_index(&mut self) {
        self.by_address = self
            .records
            .values()
            .map(|r| ((r.service.clone(), r.address), r.id.clone()))
            .collect();
        self.by_who.clear();
        for r in self.records.values() {
            *self.by_who.entry(r.who.clone()).or_default() += 1;
        }
        self.rebuild_grant_ends();
        self.rebuild_window_ends();
    }

    /// Drops the records of every service not in `services` and returns them (a
    /// reload removed the service, and its sets with it).
    pub fn drop_services_except(&mut self, services: &[&str]) -> Vec<GrantRecord> {
        let gone: Vec<String> = self
            .records
            .values()
            .filter(|r| !services.contains(&r.service.as_str()))
            .map(|r| r.id.clone())
            .collect();
        if gone.is_empty() {
            return Vec::new();
        }
        let dropped = gone
            .iter()
            .filter_map(|id| self.records.remove(id))
            .collect();
        self.rebuild_index();
        dropped
    }

    /// Makes the `service` records agree with what the kernel's set holds: records
    /// without an element are dropped; elements without a record get one marked
    /// `recovered`; expiry times are taken from the kernel.
    pub fn reconcile(
        &mut self,
        service: &str,
        kernel: &[Element],
        now: UnixMs,
        mut new_id: impl FnMut() -> String,
    ) {
        let in_kernel: HashSet<IpAddr> = kernel.iter().filter_map(Element::addr).collect();
        self.records
            .retain(|_, r| r.service != service || in_kernel.contains(&r.address));
        self.rebuild_index();
        for (element, address) in kernel.iter().filter_map(|e| Some((e, e.addr()?))) {
            let expires_at = kernel_end(now, element.expires_in);
            let known = self.by_address.get(&(service.to_owned(), address));
            if let Some(record) = known.and_then(|id| self.records.get_mut(id)) {
                let granted = UnixMs(record.granted_at_ms);
                // The kernel's time reads back in ticks: within that of the book's own
                // end, the book's stands (the kernel's would move the promise up to a
                // tick earlier at every restart); further off, the kernel is right.
                let booked = UnixMs(record.expires_at_ms);
                let slack = crate::clock::kernel_timer().overshoot().as_millis();
                let end = if u128::from(booked.0.abs_diff(expires_at.0)) <= slack {
                    booked
                } else {
                    expires_at
                };
                record.set_times(granted, end);
            } else {
                let mut record = GrantRecord {
                    id: self.fresh_id(&mut new_id),
                    service: service.to_owned(),
                    address,
                    who: "recovered".to_owned(),
                    granted_at: 0,
                    expires_at: 0,
                    granted_at_ms: 0,
                    expires_at_ms: 0,
                };
                record.set_times(now, expires_at);
                self.by_address
                    .insert((service.to_owned(), address), record.id.clone());
                *self.by_who.entry(record.who.clone()).or_default() += 1;
                self.records.insert(record.id.clone(), record);
            }
        }
        self.rebuild_grant_ends();
    }

    /// Makes the windows agree with the kernel's egress sets (`elements` of both):
    /// windows whose element is gone are dropped, expiry times come from the kernel,
    /// and elements with no window get a `recovered` one so they can be listed and
    /// revoked.
    pub fn reconcile_windows(
        &mut self,
        elements: &[(WindowScope, Option<Duration>)],
        now: UnixMs,
        mut new_id: impl FnMut() -> String,
    ) {
        self.windows
            .retain(|_, w| elements.iter().any(|(scope, _)| *scope == w.scope));
        for &(scope, expires_in) in elements {
            let expires_at = kernel_end(now, expires_in);
            let mut found = false;
            // The kernel has one element per scope, lasting as long as the longest
            // window that shares it: a booked window keeps its own (earlier) end.
            for w in self.windows.values_mut().filter(|w| w.scope == scope) {
                let granted = UnixMs(w.granted_at_ms);
                let ends = w.ends().min(expires_at);
                w.set_times(granted, ends);
                found = true;
            }
            if !found {
                let id = self.fresh_id(&mut new_id);
                let mut window = WindowRecord {
                    id,
                    scope,
                    who: "recovered".to_owned(),
                    command: String::new(),
                    to: Vec::new(),
                    granted_at: 0,
                    expires_at: 0,
                    granted_at_ms: 0,
                    expires_at_ms: 0,
                };
                window.set_times(now, expires_at);
                self.open_window(window);
            }
        }
        self.rebuild_window_ends();
    }

    /// An id no grant or window holds: ids are 32 random bits, so among 100,000
    /// grants two would meet about once (and one record would overwrite the other).
    /// Drawn again until unused; after 64 draws (a broken `new_id`) a counter is added.
    pub fn fresh_id(&self, new_id: &mut impl FnMut() -> String) -> String {
        let used = |id: &str| self.records.contains_key(id) || self.windows.contains_key(id);
        let mut id = new_id();
        for _ in 0..64 {
            if !used(&id) {
                return id;
            }
            id = new_id();
        }
        // Among one more candidate than there are ids in use, one is free.
        (0..=self.records.len() + self.windows.len())
            .map(|n| format!("{id}-{n}"))
            .find(|candidate| !used(candidate))
            .unwrap_or(id)
    }

    /// Books a new egress window.
    pub fn open_window(&mut self, window: WindowRecord) {
        if let Some(replaced) = self.windows.remove(&window.id) {
            self.window_ends.remove(replaced.ends(), &replaced.id);
        }
        self.window_ends.insert(window.ends(), &window.id);
        self.windows.insert(window.id.clone(), window);
    }

    /// Removes the window `id`.
    pub fn close_window(&mut self, id: &str) -> Option<WindowRecord> {
        let window = self.windows.remove(id)?;
        self.window_ends.remove(window.ends(), &window.id);
        Some(window)
    }

    /// Removes and returns the windows whose time is over, earliest first.
    pub fn expire_windows(&mut self, now: UnixMs) -> Vec<WindowRecord> {
        self.window_ends
            .take_due(now)
            .iter()
            .filter_map(|id| self.windows.remove(id))
            .collect()
    }

    /// Every egress window, by id.
    pub fn windows(&self) -> impl Iterator<Item = &WindowRecord> {
        self.windows.values()
    }

    /// Every grant, by id.
    pub fn iter(&self) -> impl Iterator<Item = &GrantRecord> {
        self.records.values()
    }

    /// The grant `id`.
    #[must_use]
    pub fn get(&self, id: &str) -> Option<&GrantRecord> {
        self.records.get(id)
    }

    /// Reads the book saved in `path`; a missing file is an empty book.
    pub fn load(path: &Path) -> Result<Self, StateError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(source) => {
                return Err(StateError::File {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        Self::from_text(&text).ok_or_else(|| StateError::Damaged {
            path: path.to_owned(),
        })
    }

    /// The book a file's `text` holds, or `None` if it is damaged (the start then
    /// reads the kernel's sets back and reconciles an empty book with them). Damaged
    /// is also a book that names an id twice (among grants and windows alike) or an
    /// address twice for one service: one record per hole is what every index relies
    /// on.
    fn from_text(text: &str) -> Option<Self> {
        let (grants, windows) = serde_json::from_str::<SavedV2>(text)
            .ok()
            .and_then(SavedV2::into_records)
            .or_else(|| {
                let old: SavedV1 = serde_json::from_str(text).ok()?;
                Some((old.grants, old.windows))
            })?;
        let mut saved = SavedV1 { grants, windows };
        // A book written in whole seconds (knockgate 0.1): the same times in ms.
        for r in &mut saved.grants {
            if r.expires_at_ms == 0 {
                r.granted_at_ms = r.granted_at.saturating_mul(1000);
                r.expires_at_ms = r.expires_at.saturating_mul(1000);
            }
        }
        for w in &mut saved.windows {
            if w.expires_at_ms == 0 {
                w.granted_at_ms = w.granted_at.saturating_mul(1000);
                w.expires_at_ms = w.expires_at.saturating_mul(1000);
            }
        }
        let (grants, windows) = (saved.grants.len(), saved.windows.len());
        let mut book = Self {
            records: saved
                .grants
                .into_iter()
                .map(|r| (r.id.clone(), r))
                .collect(),
            windows: saved
                .windows
                .into_iter()
                .map(|w| (w.id.clone(), w))
                .collect(),
            ..Self::default()
        };
        book.rebuild_index();
        let one_each = book.records.len() == grants
            && book.windows.len() == windows
            && book.by_address.len() == grants
            && !book.windows.keys().any(|id| book.records.contains_key(id));
        one_each.then_some(book)
    }

    /// Saves the book to `path` atomically.
    pub fn save(&self, path: &Path) -> Result<(), StateError> {
        write_atomically(&path.with_extension("tmp"), path, &self.to_json())
    }

    /// The book as its file holds it.
    #[must_use]
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(&SaveV2(self)).unwrap_or_default()
    }
}

/// One record fewer for `who`.
fn uncount(by_who: &mut HashMap<String, usize>, who: &str) {
    if let Some(n) = by_who.get_mut(who) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            by_who.remove(who);
        }
    }
}

/// When a kernel element with `expires_in` left at `now` ends, as the book counts
/// it: less the tick every timeout knockgate sets adds (so a time read back and set
/// again does not creep later by a tick each time).
fn kernel_end(now: UnixMs, expires_in: Option<Duration>) -> UnixMs {
    expires_in.map_or(UnixMs::NEVER, |d| {
        now.plus(d.saturating_sub(crate::clock::kernel_timer().tick()))
    })
}

/// A fresh random grant id: 8 hex digits.
#[must_use]
pub fn new_id() -> String {
    let mut bytes = [0u8; 4];
    // Without randomness, fall back to the clock: ids only need to be unique locally.
    if getrandom::fill(&mut bytes).is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        bytes = nanos.to_be_bytes();
    }
    format!("{:08x}", u32::from_be_bytes(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// Books an SSH grant for `addr` at `now` for `ttl` seconds.
    fn ssh(
        book: &mut GrantBook,
        addr: &str,
        who: &str,
        now: u64,
        ttl: u64,
        id: &mut impl FnMut() -> String,
    ) -> (GrantRecord, Granted) {
        book.grant(
            "ssh",
            ip(addr),
            who,
            UnixMs::from_secs(now),
            Duration::from_secs(ttl),
            id,
        )
    }

    fn ids() -> impl FnMut() -> String {
        let mut n = 0;
        move || {
            n += 1;
            format!("g{n}")
        }
    }

    #[test]
    fn a_second_grant_for_the_same_address_extends_the_first() {
        let mut book = GrantBook::default();
        let mut id = ids();
        let (first, kind) = ssh(&mut book, "192.0.2.1", "key a", 100, 60, &mut id);
        assert_eq!(kind, Granted::New);
        let (second, kind) = ssh(&mut book, "192.0.2.1", "key b", 130, 60, &mut id);
        assert_eq!(kind, Granted::Extended);
        assert_eq!(second.id, first.id);
        assert_eq!(second.expires_at, 190);
        assert_eq!(book.iter().count(), 1);
    }

    #[test]
    fn expiry_and_revoke_remove_records() {
        let mut book = GrantBook::default();
        let mut id = ids();
        ssh(&mut book, "192.0.2.1", "key a", 100, 10, &mut id);
        let (b, _) = ssh(&mut book, "2001:db8::1", "uid 0", 100, 100, &mut id);
        let gone = book.expire(UnixMs::from_secs(110));
        assert_eq!(gone.len(), 1);
        assert_eq!(
            book.revoke(&b.id).map(|r| r.address),
            Some(ip("2001:db8::1"))
        );
        assert_eq!(book.iter().count(), 0);
    }

    #[test]
    fn grants_are_counted_per_holder_through_every_change() {
        let mut book = GrantBook::default();
        let mut id = ids();
        ssh(&mut book, "192.0.2.1", "key a", 100, 10, &mut id);
        let (b, _) = ssh(&mut book, "192.0.2.2", "key a", 100, 100, &mut id);
        ssh(&mut book, "192.0.2.3", "uid 0", 100, 100, &mut id);
        assert_eq!((book.held_by("key a"), book.held_by("uid 0")), (2, 1));
        // Extending another's grant moves it to the extender; extending one's own does not count twice.
        ssh(&mut book, "192.0.2.3", "key a", 101, 100, &mut id);
        ssh(&mut book, "192.0.2.2", "key a", 101, 100, &mut id);
        assert_eq!((book.held_by("key a"), book.held_by("uid 0")), (3, 0));
        book.expire(UnixMs::from_secs(110));
        assert_eq!(book.held_by("key a"), 2);
        book.revoke(&b.id);
        assert_eq!(book.held_by("key a"), 1);
        // Saved and loaded, the counts are rebuilt.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grants.json");
        book.save(&path).unwrap();
        let loaded = GrantBook::load(&path).unwrap();
        assert_eq!(loaded.held_by("key a"), 1);
        assert_eq!(loaded.held_by("nobody"), 0);
    }

    #[test]
    fn reconcile_follows_the_kernel() {
        let mut book = GrantBook::default();
        let mut id = ids();
        ssh(&mut book, "192.0.2.1", "key a", 100, 60, &mut id);
        ssh(&mut book, "192.0.2.2", "key a", 100, 60, &mut id);
        let kernel = [
            Element {
                key: ip("192.0.2.1").into(),
                expires_in: Some(Duration::from_secs(40)),
            },
            Element {
                key: ip("192.0.2.9").into(),
                expires_in: Some(Duration::from_secs(5)),
            },
        ];
        book.reconcile("ssh", &kernel, UnixMs::from_secs(120), &mut id);
        let mut seen: Vec<(IpAddr, String, u64)> = book
            .iter()
            .map(|r| (r.address, r.who.clone(), r.expires_at))
            .collect();
        seen.sort();
        assert_eq!(
            seen,
            vec![
                (ip("192.0.2.1"), "key a".into(), 160),
                (ip("192.0.2.9"), "recovered".into(), 125)
            ]
        );
    }

    #[test]
    fn the_book_round_trips_through_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grants.json");
        assert_eq!(GrantBook::load(&path).unwrap(), GrantBook::default());
        let mut book = GrantBook::default();
        book.grant(
            "ssh",
            ip("192.0.2.1"),
            "key a",
            UnixMs::from_secs(100),
            Duration::from_secs(60),
            new_id,
        );
        book.save(&path).unwrap();
        assert_eq!(GrantBook::load(&path).unwrap(), book);
        std::fs::write(&path, "{not json").unwrap();
        assert!(is_damaged(&GrantBook::load(&path)));
    }

    fn is_damaged(loaded: &Result<GrantBook, StateError>) -> bool {
        matches!(loaded, Err(StateError::Damaged { .. }))
    }

    #[test]
    fn next_expiry_is_exact_after_every_change() {
        let mut book = GrantBook::default();
        let mut id = ids();
        book.grant(
            "ssh",
            ip("192.0.2.1"),
            "k",
            UnixMs::from_secs(100),
            Duration::from_secs(10),
            &mut id,
        );
        book.grant(
            "ssh",
            ip("192.0.2.2"),
            "k",
            UnixMs::from_secs(100),
            Duration::from_secs(50),
            &mut id,
        );
        assert_eq!(book.next_expiry(), Some(UnixMs::from_secs(110)));
        // Extending the first moves the next expiry to the second's end at once.
        book.grant(
            "ssh",
            ip("192.0.2.1"),
            "k",
            UnixMs::from_secs(105),
            Duration::from_secs(100),
            &mut id,
        );
        assert_eq!(book.next_expiry(), Some(UnixMs::from_secs(150)));
        assert!(book.expire(UnixMs::from_secs(110)).is_empty());
        assert_eq!(book.next_expiry(), Some(UnixMs::from_secs(150)));
        let second = book
            .iter()
            .find(|r| r.address == ip("192.0.2.2"))
            .unwrap()
            .id
            .clone();
        book.revoke(&second);
        assert_eq!(book.next_expiry(), Some(UnixMs::from_secs(205)));
        assert_eq!(book.expire(UnixMs::from_secs(205)).len(), 1);
        assert_eq!(book.next_expiry(), None);
    }

    #[test]
    fn ids_are_short_and_differ() {
        let (a, b) = (new_id(), new_id());
        assert_eq!(a.len(), 8);
        assert_ne!(a, b);
    }

    #[test]
    fn colliding_ids_never_overwrite_a_grant() {
        let mut book = GrantBook::default();
        let mut same = || "cafe0001".to_owned();
        let (a, _) = ssh(&mut book, "192.0.2.1", "uid 0", 0, 60, &mut same);
        let (b, _) = ssh(&mut book, "192.0.2.2", "uid 0", 0, 60, &mut same);
        assert_ne!(a.id, b.id);
        assert_eq!(book.len(), 2);
        assert!(book.get(&a.id).is_some() && book.get(&b.id).is_some());
    }

    /// A book with two services, three holders, both address families, a recovered
    /// grant and a window.
    fn varied_book() -> GrantBook {
        let mut book = GrantBook::default();
        let mut id = ids();
        let at = UnixMs(1_800_000_000_123);
        for (service, addr, who) in [
            ("ssh", "192.0.2.1", "key alice"),
            ("web", "192.0.2.1", "key alice"),
            ("ssh", "2001:db8::7", "uid 0"),
            ("web", "198.51.100.9", "recovered"),
        ] {
            book.grant(
                service,
                ip(addr),
                who,
                at,
                Duration::from_millis(60_007),
                &mut id,
            );
        }
        let mut window = WindowRecord {
            id: "w1".to_owned(),
            scope: WindowScope::Cgroup(42),
            who: "uid 0".to_owned(),
            command: "apt upgrade".to_owned(),
            to: vec![ip("192.0.2.80")],
            granted_at: 0,
            expires_at: 0,
            granted_at_ms: 0,
            expires_at_ms: 0,
        };
        window.set_times(at, at.plus(Duration::from_secs(600)));
        book.open_window(window);
        book
    }

    #[test]
    fn the_file_names_each_service_and_holder_once_and_reads_back_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grants.json");
        let book = varied_book();
        book.save(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.matches("key alice").count(), 1, "{text}");
        assert!(text.starts_with(r#"{"version":2,"#), "{text}");
        let loaded = GrantBook::load(&path).unwrap();
        assert_eq!(loaded, book);
        assert_eq!(loaded.held_by("key alice"), 2);
        assert_eq!(loaded.next_expiry(), book.next_expiry());
        let record = loaded
            .iter()
            .find(|r| r.address == ip("2001:db8::7"))
            .unwrap();
        assert_eq!(
            (record.granted_at, record.expires_at),
            (1_800_000_000, 1_800_000_061)
        );
    }

    #[test]
    fn a_book_of_format_one_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grants.json");
        // What knockgate wrote before format 2 (pretty, every field spelled out).
        std::fs::write(
            &path,
            r#"{
  "grants": [
    {"id": "a1", "service": "ssh", "address": "192.0.2.1", "who": "key alice",
     "granted_at": 100, "expires_at": 161, "granted_at_ms": 100250, "expires_at_ms": 160500}
  ],
  "windows": []
}"#,
        )
        .unwrap();
        let book = GrantBook::load(&path).unwrap();
        let record = book.get("a1").unwrap();
        assert_eq!(
            (record.granted_at_ms, record.expires_at_ms),
            (100_250, 160_500)
        );
        assert_eq!(record.who, "key alice");
        assert_eq!(book.next_expiry(), Some(UnixMs(160_500)));
    }

    #[test]
    fn a_row_naming_a_service_or_holder_the_file_lacks_makes_it_damaged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grants.json");
        for row in [
            r#"["a1",1,"192.0.2.1",0,100000,160000]"#,
            r#"["a1",0,"192.0.2.1",9,100000,160000]"#,
            r#"["a1",18446744073709551615,"192.0.2.1",0,100000,160000]"#,
        ] {
            std::fs::write(
                &path,
                format!(r#"{{"version":2,"services":["ssh"],"holders":["uid 0"],"grants":[{row}],"windows":[]}}"#),
            )
            .unwrap();
            // Damaged: the start books nothing from it and reads the kernel's sets back.
            assert!(is_damaged(&GrantBook::load(&path)), "{row}");
        }
        std::fs::write(
            &path,
            r#"{"version":3,"services":["ssh"],"holders":["uid 0"],"grants":[["a1",0,"192.0.2.1",0,1,2]],"windows":[]}"#,
        )
        .unwrap();
        assert!(is_damaged(&GrantBook::load(&path)), "a later format");
    }

    #[test]
    fn a_book_naming_an_id_or_a_hole_twice_is_damaged() {
        let window = r#"{"id":"w1","scope":{"cgroup":7},"who":"uid 0","command":"","to":[],"granted_at":0,"expires_at":1,"granted_at_ms":0,"expires_at_ms":1000}"#;
        for (what, grants, windows) in [
            (
                "one id twice",
                r#"["a1",0,"192.0.2.1",0,1,2000],["a1",0,"192.0.2.2",0,1,2000]"#,
                "",
            ),
            (
                "one hole twice",
                r#"["a1",0,"192.0.2.1",0,1,2000],["a2",0,"192.0.2.1",0,1,3000]"#,
                "",
            ),
            (
                "a grant's id on a window",
                r#"["w1",0,"192.0.2.1",0,1,2000]"#,
                window,
            ),
        ] {
            let text = format!(
                r#"{{"version":2,"services":["ssh"],"holders":["uid 0"],"grants":[{grants}],"windows":[{windows}]}}"#
            );
            assert_eq!(GrantBook::from_text(&text), None, "{what}");
        }
        // The same, well formed, is read.
        let text = format!(
            r#"{{"version":2,"services":["ssh"],"holders":["uid 0"],"grants":[["a1",0,"192.0.2.1",0,1,2000],["a2",0,"192.0.2.2",0,1,3000]],"windows":[{window}]}}"#
        );
        let book = GrantBook::from_text(&text).unwrap();
        assert_eq!((book.len(), book.windows().count()), (2, 1));
    }

    #[test]
    fn a_restored_grant_whose_id_went_to_a_window_gets_a_fresh_one() {
        let mut book = GrantBook::default();
        let mut same = || "cafe0001".to_owned();
        let (grant, _) = ssh(&mut book, "192.0.2.1", "key a", 0, 60, &mut same);
        let revoked = book.revoke(&grant.id).unwrap();
        let mut window = WindowRecord {
            id: book.fresh_id(&mut same),
            scope: WindowScope::Host,
            who: "uid 0".to_owned(),
            command: String::new(),
            to: Vec::new(),
            granted_at: 0,
            expires_at: 0,
            granted_at_ms: 0,
            expires_at_ms: 0,
        };
        window.set_times(UnixMs(0), UnixMs(60_000));
        book.open_window(window);
        assert_eq!(book.windows().next().unwrap().id, "cafe0001");
        book.restore(revoked);
        let restored = book.iter().next().unwrap();
        assert_ne!(restored.id, "cafe0001");
        assert!(book.holds("ssh", ip("192.0.2.1")));
        let text = String::from_utf8(book.to_json()).unwrap();
        assert_eq!(
            GrantBook::from_text(&text),
            Some(book),
            "still one id each after a save"
        );
    }

    #[test]
    fn a_torn_book_file_is_damaged_never_read_in_part() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grants.json");
        let book = varied_book();
        let whole = book.to_json();
        for cut in 0..whole.len() {
            std::fs::write(&path, &whole[..cut]).unwrap();
            let loaded = GrantBook::load(&path);
            assert!(is_damaged(&loaded), "cut at {cut} read as {loaded:?}");
        }
        std::fs::write(&path, &whole).unwrap();
        assert_eq!(GrantBook::load(&path).unwrap(), book);
    }

    #[test]
    fn a_book_in_whole_seconds_is_read_in_milliseconds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grants.json");
        // What knockgate 0.1 wrote: seconds only.
        std::fs::write(
            &path,
            r#"{"grants":[{"id":"a1","service":"ssh","address":"192.0.2.1","who":"uid 0","granted_at":100,"expires_at":160}],"windows":[]}"#,
        )
        .unwrap();
        let book = GrantBook::load(&path).unwrap();
        let record = book.get("a1").unwrap();
        assert_eq!(
            (record.granted_at_ms, record.expires_at_ms),
            (100_000, 160_000)
        );
        assert_eq!(book.next_expiry(), Some(UnixMs::from_secs(160)));
    }

    /// One step of [`the_indexes_agree_with_the_records_after_any_steps`].
    #[derive(Debug, Clone)]
    enum Step {
        Grant {
            service: u8,
            host: u8,
            who: u8,
            at: u16,
            ttl: u16,
        },
        Revoke(u8),
        Restore(u8),
        Expire(u16),
        Open {
            scope: u8,
            at: u16,
            ttl: u16,
        },
        Close(u8),
        ExpireWindows(u16),
        DropServices(u8),
        /// The kernel's set for a service holds the hosts in the mask, each `left`.
        Reconcile {
            service: u8,
            hosts: u8,
            now: u16,
            left: u16,
        },
        /// Saved and read back.
        Reload,
    }

    fn step() -> impl proptest::strategy::Strategy<Value = Step> {
        use proptest::prelude::*;
        prop_oneof![
            4 => (0..2u8, 0..6u8, 0..3u8, 0..500u16, 0..200u16)
                .prop_map(|(service, host, who, at, ttl)| Step::Grant { service, host, who, at, ttl }),
            1 => any::<u8>().prop_map(Step::Revoke),
            1 => any::<u8>().prop_map(Step::Restore),
            2 => (0..700u16).prop_map(Step::Expire),
            1 => (0..3u8, 0..500u16, 0..200u16).prop_map(|(scope, at, ttl)| Step::Open { scope, at, ttl }),
            1 => any::<u8>().prop_map(Step::Close),
            1 => (0..700u16).prop_map(Step::ExpireWindows),
            1 => (0..3u8).prop_map(Step::DropServices),
            1 => (0..2u8, any::<u8>(), 0..500u16, 0..300u16)
                .prop_map(|(service, hosts, now, left)| Step::Reconcile { service, hosts, now, left }),
            1 => Just(Step::Reload),
        ]
    }

    /// What must hold after any change: the next expiry is the first end of what is
    /// booked, each index is exactly what indexing the records anew gives, and there
    /// is one record per service and address.
    fn assert_indexes_agree(book: &GrantBook) {
        let first = book
            .iter()
            .map(GrantRecord::ends)
            .chain(book.windows().map(WindowRecord::ends))
            .min();
        assert_eq!(book.next_expiry(), first);
        let mut fresh = book.clone();
        fresh.rebuild_index();
        assert_eq!(book.grant_ends, fresh.grant_ends);
        assert_eq!(book.window_ends, fresh.window_ends);
        assert_eq!(book.by_address, fresh.by_address);
        assert_eq!(book.by_who, fresh.by_who);
        assert_eq!(book.by_address.len(), book.len());
    }

    /// Ids from a pool of five, so that ids are drawn again, fall back to a suffix,
    /// and come back to a revoked record's id.
    fn pooled_ids() -> impl FnMut() -> String {
        let mut n = 0;
        move || {
            n += 1;
            format!("g{}", n % 5)
        }
    }

    /// Expires grants at `now` and checks that exactly the due ones went, earliest
    /// first.
    fn expire_and_check(book: &mut GrantBook, now: UnixMs) {
        let before: Vec<GrantRecord> = book.iter().cloned().collect();
        let gone = book.expire(now);
        assert_took_due(&before, &gone, now, GrantRecord::ends, |r| &r.id);
    }

    /// The same for windows.
    fn expire_windows_and_check(book: &mut GrantBook, now: UnixMs) {
        let before: Vec<WindowRecord> = book.windows().cloned().collect();
        let gone = book.expire_windows(now);
        assert_took_due(&before, &gone, now, WindowRecord::ends, |w| &w.id);
    }

    /// That `gone` is exactly those of `before` due by `now`, earliest first.
    fn assert_took_due<T>(
        before: &[T],
        gone: &[T],
        now: UnixMs,
        ends: impl Fn(&T) -> UnixMs,
        id: impl Fn(&T) -> &String,
    ) {
        assert!(
            gone.windows(2).all(|w| ends(&w[0]) <= ends(&w[1])),
            "earliest first"
        );
        let mut due: Vec<&String> = before.iter().filter(|b| ends(b) <= now).map(&id).collect();
        let mut gone: Vec<&String> = gone.iter().map(&id).collect();
        gone.sort();
        due.sort();
        assert_eq!(gone, due);
    }

    fn apply(
        book: &mut GrantBook,
        step: &Step,
        revoked: &mut Vec<GrantRecord>,
        id: &mut impl FnMut() -> String,
    ) {
        let nth = |n: u8, ids: Vec<String>| {
            (!ids.is_empty()).then(|| ids[usize::from(n) % ids.len()].clone())
        };
        match *step {
            Step::Grant {
                service,
                host,
                who,
                at,
                ttl,
            } => {
                book.grant(
                    ["ssh", "web"][usize::from(service)],
                    IpAddr::from([192, 0, 2, host]),
                    &format!("key k{who}"),
                    UnixMs(u64::from(at)),
                    Duration::from_millis(u64::from(ttl)),
                    id,
                );
            }
            Step::Revoke(n) => {
                if let Some(target) = nth(n, book.iter().map(|r| r.id.clone()).collect()) {
                    revoked.extend(book.revoke(&target));
                }
            }
            Step::Restore(n) => {
                if !revoked.is_empty() {
                    let record = revoked.remove(usize::from(n) % revoked.len());
                    book.restore(record);
                }
            }
            Step::Expire(now) => expire_and_check(book, UnixMs(u64::from(now))),
            Step::Open { scope, at, ttl } => {
                let mut window = WindowRecord {
                    id: book.fresh_id(id),
                    scope: WindowScope::Cgroup(u64::from(scope)),
                    who: "uid 0".to_owned(),
                    command: String::new(),
                    to: Vec::new(),
                    granted_at: 0,
                    expires_at: 0,
                    granted_at_ms: 0,
                    expires_at_ms: 0,
                };
                window.set_times(
                    UnixMs(u64::from(at)),
                    UnixMs(u64::from(at) + u64::from(ttl)),
                );
                book.open_window(window);
            }
            Step::Close(n) => {
                if let Some(target) = nth(n, book.windows().map(|w| w.id.clone()).collect()) {
                    book.close_window(&target);
                }
            }
            Step::ExpireWindows(now) => expire_windows_and_check(book, UnixMs(u64::from(now))),
            Step::DropServices(keep) => {
                let keep: &[&str] = match keep {
                    0 => &["ssh"],
                    1 => &["web"],
                    _ => &["ssh", "web"],
                };
                revoked.extend(book.drop_services_except(keep));
            }
            Step::Reconcile {
                service,
                hosts,
                now,
                left,
            } => {
                let kernel: Vec<Element> = (0..6u8)
                    .filter(|h| hosts & (1 << h) != 0)
                    .map(|h| Element {
                        key: crate::ruleset::ElementKey::Addr(IpAddr::from([192, 0, 2, h])),
                        expires_in: Some(Duration::from_millis(u64::from(left))),
                    })
                    .collect();
                book.reconcile(
                    ["ssh", "web"][usize::from(service)],
                    &kernel,
                    UnixMs(u64::from(now)),
                    id,
                );
            }
            Step::Reload => {
                let text = String::from_utf8(book.to_json()).unwrap();
                let loaded = GrantBook::from_text(&text).expect("a saved book reads back");
                assert_eq!(&loaded, book);
                *book = loaded;
            }
        }
    }

    proptest::proptest! {
        /// Whatever is granted, extended, revoked, restored, opened, closed or expired,
        /// in any order, the indexes (ends, addresses, holders) agree with the records.
        #[test]
        fn the_indexes_agree_with_the_records_after_any_steps(steps in proptest::collection::vec(step(), 1..60)) {
            let mut book = GrantBook::default();
            let mut revoked = Vec::new();
            let mut id = pooled_ids();
            for step in &steps {
                apply(&mut book, step, &mut revoked, &mut id);
                assert_indexes_agree(&book);
            }
        }
    }
}
