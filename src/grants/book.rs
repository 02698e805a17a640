//! The grant book's storage: every grant one 56-byte slot in one vector, names kept
//! once in tables, and indexes of slot numbers — so a million grants take ~150 MB,
//! not the ~600 MB six heap strings a grant took, and a lookup, a grant, a revoke,
//! an expiry and the next expiry cost the same with a million grants as with one.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::time::Duration;

use super::{
    GrantId, GrantRecord, Granted, WindowRecord, WindowScope, id_text, kernel_end, parse_id,
};
use crate::clock::UnixMs;
use crate::policy::canonical;
use crate::ruleset::Element;

/// One grant as the book holds it: no heap, the names are numbers into the book's
/// tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Slot {
    pub(super) granted_ms: u64,
    pub(super) ends_ms: u64,
    /// When the daemon closes it, in µs of `CLOCK_MONOTONIC`; 0: its kernel
    /// timeout does (a grant booked by an earlier process). Not saved: the clock is
    /// this boot's.
    pub(super) close_us: u64,
    pub(super) id: GrantId,
    pub(super) service: u32,
    pub(super) who: u32,
    pub(super) address: IpAddr,
}

impl Slot {
    pub(super) fn ends(&self) -> UnixMs {
        UnixMs(self.ends_ms)
    }

    /// Whether the daemon closes it (else its kernel timeout does).
    fn closed_by_daemon(&self) -> bool {
        self.close_us != 0
    }
}

/// Names (services, holders) numbered and counted by the grants that use them. A
/// name no grant uses any more is forgotten and its number used again, so a table
/// never holds more names than are in use.
#[derive(Debug, Default, Clone)]
pub(super) struct Names {
    /// By number; an unused number's name is empty.
    pub(super) by_number: Vec<String>,
    pub(super) counts: Vec<usize>,
    pub(super) numbers: HashMap<String, u32>,
    free: Vec<u32>,
}

impl Names {
    /// `name`'s number, with one more use counted.
    pub(super) fn acquire(&mut self, name: &str) -> u32 {
        if let Some(&n) = self.numbers.get(name) {
            self.use_again(n);
            return n;
        }
        let n = if let Some(n) = self.free.pop() {
            if let Some(slot) = self.by_number.get_mut(n as usize) {
                name.clone_into(slot);
            }
            if let Some(count) = self.counts.get_mut(n as usize) {
                *count = 1;
            }
            n
        } else {
            self.by_number.push(name.to_owned());
            self.counts.push(1);
            slot_number(self.by_number.len() - 1)
        };
        self.numbers.insert(name.to_owned(), n);
        n
    }

    /// One more use of the name numbered `n`.
    pub(super) fn use_again(&mut self, n: u32) {
        if let Some(count) = self.counts.get_mut(n as usize) {
            *count += 1;
        }
    }

    /// One use fewer of the name numbered `n`; at none it is forgotten.
    fn release(&mut self, n: u32) {
        let Some(count) = self.counts.get_mut(n as usize) else {
            return;
        };
        *count = count.saturating_sub(1);
        if *count == 0 {
            let name = std::mem::take(&mut self.by_number[n as usize]);
            self.numbers.remove(&name);
            self.free.push(n);
        }
    }

    pub(super) fn name(&self, n: u32) -> &str {
        self.by_number.get(n as usize).map_or("", String::as_str)
    }

    fn number(&self, name: &str) -> Option<u32> {
        self.numbers.get(name).copied()
    }

    fn count(&self, name: &str) -> usize {
        self.number(name)
            .and_then(|n| self.counts.get(n as usize).copied())
            .unwrap_or(0)
    }
}

/// A slot's number as the indexes keep it. A book never holds anywhere near 2³²
/// grants (`MAX_GRANTS`); were it to, the number would name no slot and lookups
/// would fail rather than find the wrong grant.
pub(super) fn slot_number(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Keys by the time they end: the first end, and what is due by a time, without
/// looking at anything else.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Ends<K: Ord>(pub(super) BTreeSet<(UnixMs, K)>);

impl<K: Ord> Default for Ends<K> {
    fn default() -> Self {
        Self(BTreeSet::new())
    }
}

impl<K: Ord> Ends<K> {
    fn insert(&mut self, at: UnixMs, key: K) {
        self.0.insert((at, key));
    }

    fn remove(&mut self, at: UnixMs, key: K) {
        self.0.remove(&(at, key));
    }

    fn first(&self) -> Option<UnixMs> {
        self.0.first().map(|(at, _)| *at)
    }

    /// Removes and returns the keys that end at or before `now`, earliest first.
    fn take_due(&mut self, now: UnixMs) -> Vec<K> {
        let mut due = Vec::new();
        while self.first().is_some_and(|at| at <= now) {
            if let Some((_, key)) = self.0.pop_first() {
                due.push(key);
            }
        }
        due
    }
}

impl<K: Ord> FromIterator<(UnixMs, K)> for Ends<K> {
    fn from_iter<I: IntoIterator<Item = (UnixMs, K)>>(iter: I) -> Self {
        Self(iter.into_iter().collect())
    }
}

/// All grants and windows, indexed so that a grant, a lookup by id or address, a
/// revoke, an expiry and the next expiry cost about the same with a million grants
/// as with one.
#[derive(Debug, Default, Clone)]
pub struct GrantBook {
    /// The grants, in no order: a removal moves the last slot into the gap.
    pub(super) slots: Vec<Slot>,
    /// Id → slot number. B-trees, not hash maps: a load builds them from sorted
    /// rows in one sequential pass (a million hash inserts wait on a cache miss
    /// each, twice), and they are about half the size.
    pub(super) by_id: BTreeMap<GrantId, u32>,
    /// (service number, address) → slot number: one grant per hole.
    pub(super) by_address: BTreeMap<(u32, IpAddr), u32>,
    pub(super) services: Names,
    /// Who asked, counted (a key's quota is checked per knock).
    pub(super) holders: Names,
    /// The ends of the grants left to their kernel timeouts, exactly as the slots
    /// hold them.
    pub(super) grant_ends: Ends<GrantId>,
    /// When the daemon closes each of the others (µs, `CLOCK_MONOTONIC`).
    pub(super) closes: BTreeSet<(u64, GrantId)>,
    pub(super) windows: BTreeMap<String, WindowRecord>,
    /// The windows' ends, likewise.
    pub(super) window_ends: Ends<String>,
}

impl PartialEq for GrantBook {
    fn eq(&self, other: &Self) -> bool {
        self.sorted() == other.sorted() && self.windows == other.windows
    }
}

impl Eq for GrantBook {}

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
        mut new_id: impl FnMut() -> GrantId,
    ) -> (GrantRecord, Granted) {
        let address = canonical(address);
        let ends = now.plus(ttl);
        if let Some(n) = self.slot_of(service, address) {
            if self.slots[n].ends() <= now {
                self.remove_slot(n);
            } else {
                if self.holders.name(self.slots[n].who) != who {
                    let previous = self.slots[n].who;
                    self.slots[n].who = self.holders.acquire(who);
                    self.holders.release(previous);
                }
                self.retime(n, now, ends);
                return (self.record(&self.slots[n]), Granted::Extended);
            }
        }
        let id = self.fresh_id(&mut new_id);
        let slot = self.new_slot(id, service, address, who, now, ends);
        (self.record(&slot), Granted::New)
    }

    /// How many grants `who` (like `key alice`) holds open.
    #[must_use]
    pub fn held_by(&self, who: &str) -> usize {
        self.holders.count(who)
    }

    /// How many grants are open.
    #[must_use]
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether no grant is open.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Whether `service` is open for `address` (a renewal, not a new hole).
    #[must_use]
    pub fn holds(&self, service: &str, address: IpAddr) -> bool {
        self.slot_of(service, canonical(address)).is_some()
    }

    /// Books `record` again as it was (a rolled-back trial's grants), replacing any
    /// record for the same service and address. If its id went to another grant or a
    /// window meanwhile, it gets a fresh one: ids name one thing each. Returns the id
    /// it is booked under.
    pub fn restore(&mut self, record: &GrantRecord) -> GrantId {
        let address = canonical(record.address);
        if let Some(n) = self.slot_of(&record.service, address) {
            self.remove_slot(n);
        }
        let wanted = parse_id(&record.id);
        let id = match wanted {
            Some(id) if !self.id_taken(id) => id,
            // The same id again and again: the draws end in a search from it.
            _ => {
                let taken = wanted.unwrap_or_else(super::new_id);
                self.fresh_id(&mut || taken)
            }
        };
        self.new_slot(
            id,
            &record.service,
            address,
            &record.who,
            UnixMs(record.granted_at_ms),
            record.ends(),
        );
        id
    }

    /// Removes the grant `id`.
    pub fn revoke(&mut self, id: &str) -> Option<GrantRecord> {
        let n = self.slot_of_id(parse_id(id)?)?;
        self.remove_slot(n)
    }

    /// Removes and returns the grants left to their kernel timeouts whose time is
    /// over, earliest first.
    pub fn expire(&mut self, now: UnixMs) -> Vec<GrantRecord> {
        let due = self.grant_ends.take_due(now);
        self.remove_ids(&due)
    }

    /// The first end of a grant left to its kernel timeout or of a window, if any.
    #[must_use]
    pub fn next_expiry(&self) -> Option<UnixMs> {
        match (self.grant_ends.first(), self.window_ends.first()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Has the daemon close grant `id` at `close_us` (µs of `CLOCK_MONOTONIC`), or
    /// with `None` leaves it to its kernel timeout.
    pub fn close_at(&mut self, id: GrantId, close_us: Option<u64>) {
        let Some(n) = self.slot_of_id(id) else {
            return;
        };
        self.unindex_end(n);
        // 0 stands for "the kernel's timeout": a close at 0 µs is a close at 1.
        self.slots[n].close_us = close_us.map_or(0, |at| at.max(1));
        self.index_end(n);
    }

    /// At most `limit` grants the daemon closes at or before `now_us` (µs,
    /// `CLOCK_MONOTONIC`), earliest first; the book keeps them (the caller closes
    /// them, then revokes).
    #[must_use]
    pub fn closing_by(&self, now_us: u64, limit: usize) -> Vec<GrantRecord> {
        self.closes
            .iter()
            .take_while(|(at, _)| *at <= now_us)
            .take(limit)
            .filter_map(|&(_, id)| self.slot_of_id(id))
            .map(|n| self.record(&self.slots[n]))
            .collect()
    }

    /// When the daemon next closes a grant (µs, `CLOCK_MONOTONIC`).
    #[must_use]
    pub fn first_close(&self) -> Option<u64> {
        self.closes.first().map(|(at, _)| *at)
    }

    /// Drops the records of every service not in `services` and returns them (a
    /// reload removed the service, and its sets with it).
    pub fn drop_services_except(&mut self, services: &[&str]) -> Vec<GrantRecord> {
        let gone: Vec<GrantId> = self
            .slots
            .iter()
            .filter(|s| !services.contains(&self.services.name(s.service)))
            .map(|s| s.id)
            .collect();
        self.remove_ids(&gone)
    }

    /// Makes the `service` records agree with what the kernel's set holds: records
    /// without an element are dropped; elements without a record get one marked
    /// `recovered`; expiry times are taken from the kernel.
    pub fn reconcile(
        &mut self,
        service: &str,
        kernel: &[Element],
        now: UnixMs,
        mut new_id: impl FnMut() -> GrantId,
    ) {
        // One hole per address as the rules match it: `::ffff:192.0.2.1` in a v6 set is
        // 192.0.2.1's hole (two records for it would be two elements in one set).
        let addr_of = |e: &Element| e.addr().map(canonical);
        let in_kernel: HashSet<IpAddr> = kernel.iter().filter_map(addr_of).collect();
        if let Some(number) = self.services.number(service) {
            let gone: Vec<GrantId> = self
                .slots
                .iter()
                .filter(|s| s.service == number && !in_kernel.contains(&s.address))
                .map(|s| s.id)
                .collect();
            self.remove_ids(&gone);
        }
        // The kernel's time reads back in ticks, less the tick every timeout gets
        // (`kernel_end`): a booked end from a tick after that to the most an element
        // outlives its TTL before it is one the kernel keeps, and stands (the kernel's
        // would move the promise earlier at every restart); any other, the kernel is
        // right — never a booked end after the port closes.
        let timer = crate::clock::kernel_timer();
        let (tick, overshoot) = (timer.tick(), timer.overshoot());
        for (element, address) in kernel.iter().filter_map(|e| Some((e, addr_of(e)?))) {
            let kernel_ends = kernel_end(now, element.expires_in);
            if let Some(n) = self.slot_of(service, address) {
                let booked = self.slots[n].ends();
                let kept =
                    booked <= kernel_ends.plus(tick) && booked.plus(overshoot) >= kernel_ends;
                let ends = if kept { booked } else { kernel_ends };
                let granted = UnixMs(self.slots[n].granted_ms);
                self.retime(n, granted, ends);
            } else {
                let id = self.fresh_id(&mut new_id);
                self.new_slot(id, service, address, "recovered", now, kernel_ends);
            }
        }
    }

    /// Makes the windows agree with the kernel's egress sets (`elements` of both):
    /// windows whose element is gone are dropped, expiry times come from the kernel,
    /// and elements with no window get a `recovered` one so they can be listed and
    /// revoked.
    pub fn reconcile_windows(
        &mut self,
        elements: &[(WindowScope, Option<Duration>)],
        now: UnixMs,
        mut new_id: impl FnMut() -> GrantId,
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
                let id = id_text(self.fresh_id(&mut new_id));
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

    /// An id no grant or window holds: ids are 32 random bits, so among a million
    /// grants two would meet often. Drawn again until unused; after 64 draws (a broken
    /// `new_id`) the ids after the last draw are searched — among one more than are in
    /// use, one is free.
    pub fn fresh_id(&self, new_id: &mut impl FnMut() -> GrantId) -> GrantId {
        let mut id = new_id();
        for _ in 0..64 {
            if !self.id_taken(id) {
                return id;
            }
            id = new_id();
        }
        (1..=u32::MAX)
            .map(|step| id.wrapping_add(step))
            .find(|&candidate| !self.id_taken(candidate))
            .unwrap_or(id)
    }

    /// Books a new egress window.
    pub fn open_window(&mut self, window: WindowRecord) {
        if let Some(replaced) = self.windows.remove(&window.id) {
            self.window_ends.remove(replaced.ends(), replaced.id);
        }
        self.window_ends.insert(window.ends(), window.id.clone());
        self.windows.insert(window.id.clone(), window);
    }

    /// Removes the window `id`.
    pub fn close_window(&mut self, id: &str) -> Option<WindowRecord> {
        let window = self.windows.remove(id)?;
        self.window_ends.remove(window.ends(), window.id.clone());
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

    /// Every grant, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = GrantRecord> + '_ {
        self.slots.iter().map(|s| self.record(s))
    }

    /// Every grant's hole — service, address, end, and when the daemon closes it (µs
    /// of `CLOCK_MONOTONIC`; 0: its kernel timeout does) — without making records.
    pub fn holes(&self) -> impl Iterator<Item = (&str, IpAddr, UnixMs, u64)> + '_ {
        self.slots.iter().map(|s| {
            (
                self.services.name(s.service),
                s.address,
                s.ends(),
                s.close_us,
            )
        })
    }

    /// When the daemon closes grant `id` (µs of `CLOCK_MONOTONIC`), if it does.
    #[must_use]
    pub fn close_of(&self, id: &str) -> Option<u64> {
        let n = self.slot_of_id(parse_id(id)?)?;
        Some(self.slots[n].close_us).filter(|at| *at != 0)
    }

    /// Every grant, by id.
    #[must_use]
    pub fn sorted(&self) -> Vec<GrantRecord> {
        let mut slots: Vec<&Slot> = self.slots.iter().collect();
        slots.sort_unstable_by_key(|s| s.id);
        slots.into_iter().map(|s| self.record(s)).collect()
    }

    /// At most `limit` grants by id, after `after` (from the first without), and the
    /// last one's id if more follow: a listing in pages costs each page its own size.
    #[must_use]
    pub fn page(
        &self,
        after: Option<GrantId>,
        limit: usize,
    ) -> (Vec<GrantRecord>, Option<GrantId>) {
        use std::ops::Bound;
        let from = after.map_or(Bound::Unbounded, Bound::Excluded);
        let mut ids = self.by_id.range((from, Bound::Unbounded));
        let page: Vec<GrantRecord> = ids
            .by_ref()
            .take(limit)
            .filter_map(|(_, &n)| self.slots.get(n as usize))
            .map(|s| self.record(s))
            .collect();
        let more = ids.next().is_some();
        let next = page.last().and_then(|r| parse_id(&r.id)).filter(|_| more);
        (page, next)
    }

    /// The grant `id`.
    #[must_use]
    pub fn get(&self, id: &str) -> Option<GrantRecord> {
        let n = self.slot_of_id(parse_id(id)?)?;
        Some(self.record(&self.slots[n]))
    }

    /// The record a slot stands for.
    fn record(&self, slot: &Slot) -> GrantRecord {
        let mut record = GrantRecord {
            id: id_text(slot.id),
            service: self.services.name(slot.service).to_owned(),
            address: slot.address,
            who: self.holders.name(slot.who).to_owned(),
            granted_at: 0,
            expires_at: 0,
            granted_at_ms: 0,
            expires_at_ms: 0,
        };
        record.set_times(UnixMs(slot.granted_ms), slot.ends());
        record
    }

    /// Whether a grant or a window holds `id`.
    pub(super) fn id_taken(&self, id: GrantId) -> bool {
        self.by_id.contains_key(&id)
            || (!self.windows.is_empty() && self.windows.contains_key(&id_text(id)))
    }

    /// The slot of `service`'s grant for `address`.
    fn slot_of(&self, service: &str, address: IpAddr) -> Option<usize> {
        let number = self.services.number(service)?;
        let n = *self.by_address.get(&(number, address))?;
        Some(n as usize)
    }

    fn slot_of_id(&self, id: GrantId) -> Option<usize> {
        self.by_id.get(&id).map(|&n| n as usize)
    }

    /// Books a grant no slot holds (neither its id nor its hole).
    fn new_slot(
        &mut self,
        id: GrantId,
        service: &str,
        address: IpAddr,
        who: &str,
        granted: UnixMs,
        ends: UnixMs,
    ) -> Slot {
        let slot = Slot {
            granted_ms: granted.0,
            ends_ms: ends.0,
            close_us: 0,
            id,
            service: self.services.acquire(service),
            who: self.holders.acquire(who),
            address,
        };
        self.index_slot(slot);
        self.grant_ends.insert(slot.ends(), slot.id);
        slot
    }

    /// Puts `slot` (its names counted already) in the book and the id and address
    /// indexes, not the ends (a load indexes those at once at the end); `false`, and
    /// nothing changed, if its id or its hole is booked already.
    pub(super) fn index_slot(&mut self, slot: Slot) -> bool {
        use std::collections::btree_map::Entry;
        let n = slot_number(self.slots.len());
        let Entry::Vacant(by_id) = self.by_id.entry(slot.id) else {
            return false;
        };
        let Entry::Vacant(by_address) = self.by_address.entry((slot.service, slot.address)) else {
            return false;
        };
        by_address.insert(n);
        by_id.insert(n);
        self.slots.push(slot);
        true
    }

    /// Room for `more` grants without growing (a load knows about how many come).
    pub(super) fn reserve(&mut self, more: usize) {
        self.slots.reserve_exact(more);
    }

    /// Indexes every slot at once (a load pushed them unindexed): each index sorted
    /// and built in one pass. `false` if an id or a hole is in two slots.
    pub(super) fn index_all(&mut self) -> bool {
        let numbered = || {
            self.slots
                .iter()
                .enumerate()
                .map(|(n, s)| (s, slot_number(n)))
        };
        let mut ids: Vec<(GrantId, u32)> = numbered().map(|(s, n)| (s.id, n)).collect();
        ids.sort_unstable();
        if ids.windows(2).any(|w| w[0].0 == w[1].0) {
            return false;
        }
        let mut holes: Vec<((u32, IpAddr), u32)> = numbered()
            .map(|(s, n)| ((s.service, s.address), n))
            .collect();
        holes.sort_unstable();
        if holes.windows(2).any(|w| w[0].0 == w[1].0) {
            return false;
        }
        // Sorted already, so collecting only checks the order and builds.
        self.by_id = ids.into_iter().collect();
        self.by_address = holes.into_iter().collect();
        true
    }

    /// Sets slot `n`'s times, keeping the ends index in step.
    fn retime(&mut self, n: usize, granted: UnixMs, ends: UnixMs) {
        self.unindex_end(n);
        let slot = &mut self.slots[n];
        (slot.granted_ms, slot.ends_ms) = (granted.0, ends.0);
        self.index_end(n);
    }

    /// Takes slot `n` out of the index of its end (the daemon's closes or the
    /// kernel-timed ends).
    fn unindex_end(&mut self, n: usize) {
        let slot = self.slots[n];
        if slot.closed_by_daemon() {
            self.closes.remove(&(slot.close_us, slot.id));
        } else {
            self.grant_ends.remove(slot.ends(), slot.id);
        }
    }

    /// Puts slot `n` in the index of its end.
    fn index_end(&mut self, n: usize) {
        let slot = self.slots[n];
        if slot.closed_by_daemon() {
            self.closes.insert((slot.close_us, slot.id));
        } else {
            self.grant_ends.insert(slot.ends(), slot.id);
        }
    }

    /// Takes the grant in slot `n` out of the book and every index; the last slot
    /// moves into its place.
    fn remove_slot(&mut self, n: usize) -> Option<GrantRecord> {
        let slot = *self.slots.get(n)?;
        let record = self.record(&slot);
        self.slots.swap_remove(n);
        let (here, last) = (slot_number(n), slot_number(self.slots.len()));
        if self.by_id.get(&slot.id) == Some(&here) {
            self.by_id.remove(&slot.id);
        }
        let hole = (slot.service, slot.address);
        if self.by_address.get(&hole) == Some(&here) {
            self.by_address.remove(&hole);
        }
        if slot.closed_by_daemon() {
            self.closes.remove(&(slot.close_us, slot.id));
        } else {
            self.grant_ends.remove(slot.ends(), slot.id);
        }
        self.services.release(slot.service);
        self.holders.release(slot.who);
        if let Some(moved) = self.slots.get(n) {
            if let Some(at) = self.by_id.get_mut(&moved.id).filter(|at| **at == last) {
                *at = here;
            }
            if let Some(at) = self
                .by_address
                .get_mut(&(moved.service, moved.address))
                .filter(|at| **at == last)
            {
                *at = here;
            }
        }
        Some(record)
    }

    /// Removes the grants `ids` and returns them.
    fn remove_ids(&mut self, ids: &[GrantId]) -> Vec<GrantRecord> {
        ids.iter()
            .filter_map(|&id| {
                let n = self.slot_of_id(id)?;
                self.remove_slot(n)
            })
            .collect()
    }

    /// Indexes the grants' ends anew, at once (a load).
    pub(super) fn rebuild_grant_ends(&mut self) {
        let (closed, timed): (Vec<&Slot>, Vec<&Slot>) =
            self.slots.iter().partition(|s| s.closed_by_daemon());
        self.grant_ends = timed.iter().map(|s| (s.ends(), s.id)).collect();
        self.closes = closed.iter().map(|s| (s.close_us, s.id)).collect();
    }

    /// Indexes the windows' ends anew.
    pub(super) fn rebuild_window_ends(&mut self) {
        self.window_ends = self
            .windows
            .values()
            .map(|w| (w.ends(), w.id.clone()))
            .collect();
    }
}
