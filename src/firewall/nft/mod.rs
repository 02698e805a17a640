//! The nftables backend: a [`Ruleset`] becomes ONE netlink batch that replaces
//! knockgate's table atomically.
//!
//! This is the only module that names libnftnl types or holds `unsafe` (each block
//! one call, with a `// SAFETY:` comment). It never shells out to `nft`. The replace
//! idiom is `add table; delete table; add table; …everything…` in one transaction, so
//! the table is swapped whole whether or not it existed, and a refused message rolls
//! the whole batch back. It needs nothing newer than Linux 6.1 (no DESTROY messages);
//! where the kernel has them (≥ 6.9) it locks the table with the owner and persist
//! flags, so no other process can change or flush it ([`table`]).
#![allow(unsafe_code)]

mod conntrack;
mod counter;
mod elements;
pub mod events;
mod expr;
mod layout;
pub mod nflog;
mod sequence_expr;
mod socket;
mod table;

use std::collections::HashMap;
use std::ffi::CString;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use nftnl::nftnl_sys::{self as sys, libc};
use nftnl::set::{Set, SetKey};
use nftnl::{Batch, Chain, ChainType, FinalizedBatch, MsgType, ProtoFamily, Table};

use self::elements::ElemMsg;
use self::events::{EventFilter, Tampering};
use self::socket::{EventRead, NetlinkSocket, TransactError};
use self::table::FlaggedTable;
use super::{Adopted, Firewall, FirewallError, MAX_ADOPTED};
use crate::ruleset::{
    ChainDef, CounterDef, Element, ElementKey, Hook, IpFamily, Policy, Ruleset, SetDef, SetKeyType,
};

/// Largest batch sent as one transaction. The biggest knockgate makes — 100,000
/// grants, both ban sets full, every window — is under 16 MiB; the kernel takes the
/// batch in one skb, so this also bounds what one replace asks of kernel memory.
const MAX_BATCH_BYTES: usize = 64 << 20;

/// Dumps of one set before an inconsistent answer is an error.
const DUMP_TRIES: usize = 10;

/// Whether knockgate's table is locked against other processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableLock {
    /// Not asked for: the table is an ordinary one.
    Off,
    /// Asked for; the last replace locked it (owner + persist).
    Locked,
    /// Asked for, but this kernel refused the flags (before 6.9): ordinary table.
    Unsupported,
}

/// The kernel's nftables, through one long-lived netlink socket. When locking is on,
/// this socket owns the table: every change must go through it.
pub struct NftFirewall {
    socket: NetlinkSocket,
    /// Sequence number of the next dump request, so stale replies are told apart.
    dump_seq: u32,
    lock: TableLock,
    want_lock: bool,
    /// The ruleset generation up to which every commit is accounted for: the daemon's
    /// own, back to a whole-table replace, with no other process's in between. When
    /// notifications were lost, a kernel still at this generation has seen no change
    /// but ours ([`NftFirewall::unchanged_since_own`]).
    accounted: Option<u32>,
    /// Whether this kernel has `NFT_TABLE_F_PERSIST` (Linux ≥ 6.9), once asked.
    persist: Option<bool>,
    /// The tamper watch's socket (a duplicate) and what it heard: read here, so the
    /// account can move over other processes' commits to other tables
    /// ([`NftFirewall::hear`]); taken out of the notification group while a big batch
    /// commits ([`NftFirewall::quietly`]).
    watch: Option<Watch>,
    /// The watch could not rejoin the group after a big batch: tried again with the
    /// next batch.
    watch_deaf: bool,
    /// Commits went by unheard while the watch was out of the group (see
    /// [`NftFirewall::take_heard`]).
    missed_events: bool,
}

/// The tamper watch's socket as the firewall reads it.
struct Watch {
    /// A duplicate of the socket [`TamperWatch`] registers for wake-ups.
    fd: std::os::fd::OwnedFd,
    filter: EventFilter,
    buf: Vec<u8>,
    /// Heard and not yet taken by the daemon's tamper handling.
    heard: Tampering,
    /// Forged datagrams ignored since the last log line about them, and when that was.
    forged: (u64, Option<std::time::Instant>),
    /// Generations after this one were heard from their first notification: the
    /// kernel's generation read after the socket last joined the group or lost
    /// notifications (a commit numbers its generation before it notifies). `None`
    /// until read: nothing is vouched for meanwhile.
    whole_above: Option<u32>,
}

/// Datagrams [`NftFirewall::hear_some`] reads at most in one call: a process that
/// commits without pause cannot hold the daemon (or a knock whose chained batch was
/// refused) in the read.
const MAX_HEARD_PER_CALL: usize = 1024;

/// The generation the kernel gives the next commit after `generation`: it skips 0
/// when the count wraps (0 in a batch's BEGIN means "no check").
fn next_generation(generation: u32) -> u32 {
    match generation.wrapping_add(1) {
        0 => 1,
        next => next,
    }
}

/// How many times [`Firewall::unchanged_since_own`] reads the watch and the generation
/// before it answers no.
const UNCHANGED_TRIES: usize = 3;

/// How many helpings of [`MAX_HEARD_PER_CALL`] datagrams [`NftFirewall::hear_all`]
/// reads at most.
const MAX_HEAR_CALLS: usize = 16;

/// Forged datagrams on the notification group are logged at most this often.
const FORGED_LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// How many times a batch chained to the account is sent again after the kernel
/// refused it because another process committed first and the watch vouched for that
/// commit: a bound, so a process committing without pause cannot hold a knock up.
const CHAIN_RETRIES: usize = 4;

/// The account after hearing that `generation` changed nothing of the table but by
/// this firewall: moved on to it if it is exactly the next one and was heard whole
/// (after `whole_above`); otherwise as it was.
fn vouched(accounted: Option<u32>, generation: u32, whole_above: Option<u32>) -> Option<u32> {
    // Generations wrap: "after" is less than half the circle ahead.
    let heard_whole = whole_above.is_some_and(|k| {
        let ahead = generation.wrapping_sub(k);
        ahead != 0 && ahead < 1 << 31
    });
    match accounted {
        Some(a) if heard_whole && next_generation(a) == generation => Some(generation),
        other => other,
    }
}

/// Replaces bigger than this are committed with the tamper watch out of the
/// notification group. With anyone listening, the kernel builds a notification per
/// element: a million elements took 26.6 s with an idle listener against 5.4 s
/// without one (`nft -f`, this VM, 6.18). The watch then learns from the
/// generations whether anyone else committed meanwhile.
const QUIET_ABOVE_BYTES: usize = 256 * 1024;

impl NftFirewall {
    /// Opens the netlink socket in the calling thread's network namespace.
    pub fn open() -> Result<Self, FirewallError> {
        let socket = NetlinkSocket::open().map_err(FirewallError::OpenSocket)?;
        Ok(Self {
            socket,
            dump_seq: 1 << 24,
            lock: TableLock::Off,
            want_lock: false,
            accounted: None,
            persist: None,
            watch: None,
            watch_deaf: false,
            missed_events: false,
        })
    }

    /// The ruleset generation now (every commit, by anyone, advances it).
    fn generation(&mut self) -> Result<u32, FirewallError> {
        self.dump_seq = self.dump_seq.wrapping_add(1);
        let replies = self
            .socket
            .query(&events::generation_request(self.dump_seq), self.dump_seq)
            .map_err(|e| Self::map_error("(generation)", None, e))?;
        replies
            .iter()
            .find_map(|m| events::generation(m))
            .ok_or_else(|| FirewallError::BadReply {
                table: "(generation)".to_owned(),
                detail: "no NEWGEN in the answer to GETGEN".to_owned(),
            })
    }

    /// Asks that the next replace lock the table (owner + persist flags) where the kernel
    /// can; see [`NftFirewall::lock`] for the outcome.
    pub fn want_lock(&mut self, want: bool) {
        self.want_lock = want;
    }

    /// Whether the table in force is locked.
    #[must_use]
    pub fn lock(&self) -> TableLock {
        self.lock
    }

    /// What the tamper watch heard since the last call (read already by
    /// [`Firewall::hear`]: the daemon calls that when the watch wakes it, and the
    /// firewall whenever it needs the account current), with commits that went by
    /// while the watch was out of the notification group (a big batch committed, and
    /// someone else committed meanwhile, or the generations could not be read)
    /// counted as lost notifications. Reads nothing itself: cheap at every turn of the
    /// daemon's loop.
    pub fn take_heard(&mut self) -> Tampering {
        self.rejoin_watch();
        let mut heard = self
            .watch
            .as_mut()
            .map(|w| std::mem::take(&mut w.heard))
            .unwrap_or_default();
        if std::mem::take(&mut self.missed_events) {
            heard.lost_events = true;
        }
        heard
    }

    /// Reads what the tamper watch heard, up to [`MAX_HEARD_PER_CALL`] datagrams
    /// ([`Firewall::hear`]); returns whether it read all there was. Each generation
    /// heard whole that no other socket's message changed the table in moves the
    /// account on; anything lost — an overflow (ENOBUFS), a malformed datagram, a
    /// failed read — stops that until the socket has been read empty: the kernel
    /// drops quietly while a socket stays congested, and only an empty queue ends
    /// that. Datagrams another process sent to the group are ignored, and logged (at
    /// most once a minute, counted). Returns `false` while there may be more to read:
    /// then the daemon's loop comes back to the watch.
    pub fn hear_some(&mut self) -> bool {
        fn lost(watch: &mut Watch) {
            watch.heard.lost_events = true;
            watch.heard.untouched.clear();
            watch.whole_above = None;
        }
        let Some(mut watch) = self.watch.take() else {
            return true;
        };
        let (mut drained, mut failed) = (false, false);
        for _ in 0..MAX_HEARD_PER_CALL {
            match socket::read_event(&watch.fd, &mut watch.buf) {
                Ok(EventRead::Datagram(len)) => {
                    if !watch.filter.read(&watch.buf[..len], &mut watch.heard) {
                        lost(&mut watch);
                        continue;
                    }
                    for generation in std::mem::take(&mut watch.heard.untouched) {
                        let moved = vouched(self.accounted, generation, watch.whole_above);
                        if moved != self.accounted {
                            tracing::debug!(
                                generation,
                                "a commit that left knockgate's table alone; the account moves on"
                            );
                        }
                        self.accounted = moved;
                    }
                }
                Ok(EventRead::Forged) => watch.forged.0 += 1,
                Ok(EventRead::Overrun) => lost(&mut watch),
                Ok(EventRead::Empty) => {
                    drained = true;
                    break;
                }
                Err(e) => {
                    // The next datagram wakes the loop again; until then, nothing is
                    // vouched for.
                    tracing::warn!(error = %e, "cannot read nftables notifications");
                    lost(&mut watch);
                    failed = true;
                    break;
                }
            }
        }
        if drained && watch.whole_above.is_none() {
            // Read empty: the kernel drops nothing more unreported (a drop now sets
            // ENOBUFS again), and a commit numbers its generation before it notifies,
            // so every generation after this one is heard whole. A foreign change
            // half heard before is of an earlier generation: forgotten.
            watch.whole_above = self.generation().ok();
            watch.filter.forget_pending();
        }
        let (forged, logged_at) = watch.forged;
        if forged > 0 && logged_at.is_none_or(|at| at.elapsed() >= FORGED_LOG_EVERY) {
            tracing::warn!(target: crate::logging::AUDIT, event = "tamper", forged,
                "datagrams on the nftables notification group that the kernel did not send (another process with CAP_NET_ADMIN sent them) were ignored");
            watch.forged = (0, Some(std::time::Instant::now()));
        }
        self.watch = Some(watch);
        drained || failed
    }

    /// [`NftFirewall::hear_some`] until it has read all there was (at most
    /// [`MAX_HEAR_CALLS`] helpings).
    fn hear_all(&mut self) {
        for _ in 0..MAX_HEAR_CALLS {
            if self.hear_some() {
                return;
            }
        }
    }

    /// The netlink port id of this socket: notifications caused by it carry it.
    pub fn port_id(&self) -> Result<u32, FirewallError> {
        self.socket.port_id().map_err(FirewallError::OpenSocket)
    }

    /// The flags of inet table `table`, or `None` if there is no such table.
    fn table_flags(&mut self, table: &str) -> Result<Option<u32>, FirewallError> {
        self.dump_seq = self.dump_seq.wrapping_add(1);
        let request = events::table_dump_request(self.dump_seq);
        let messages = self
            .socket
            .dump(&request, self.dump_seq)
            .map_err(|e| Self::map_error(table, None, e))?;
        Ok(messages.iter().find_map(|words| {
            let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
            events::table_flags(&bytes, table)
        }))
    }

    fn replace_with_flags(
        &mut self,
        ruleset: &Ruleset,
        now: Option<u32>,
        wanted: u32,
    ) -> Result<(), FirewallError> {
        let batch = replace_batch(ruleset, now.unwrap_or(wanted), wanted).map_err(|detail| {
            FirewallError::InvalidRuleset {
                table: ruleset.table.clone(),
                detail,
            }
        })?;
        self.send(&ruleset.table, &batch, true)
    }

    /// What table `table` holds now: its chains, named sets (with their shapes) and
    /// counters. Empty when there is no such table.
    fn layout(&mut self, table: &str) -> Result<Layout, FirewallError> {
        let mut dump = |request: fn(u32) -> Vec<u8>| {
            self.dump_seq = self.dump_seq.wrapping_add(1);
            let messages = self
                .socket
                .dump(&request(self.dump_seq), self.dump_seq)
                .map_err(|e| Self::map_error(table, None, e))?;
            Ok::<_, FirewallError>(
                messages
                    .iter()
                    .map(|words| words.iter().flat_map(|w| w.to_ne_bytes()).collect())
                    .collect::<Vec<Vec<u8>>>(),
            )
        };
        let chains = dump(layout::chain_dump_request)?
            .iter()
            .filter_map(|m| layout::chain_name(m, table))
            .collect();
        let sets = dump(layout::set_dump_request)?
            .iter()
            .filter_map(|m| layout::set_shape(m, table))
            .filter(|(_, shape)| !layout::is_anonymous(shape))
            .collect();
        let mut counters = Vec::new();
        let mut foreign: Vec<String> = dump(layout::flowtable_dump_request)?
            .iter()
            .filter_map(|m| layout::flowtable(m, table))
            .collect();
        for object in dump(layout::object_dump_request)?
            .iter()
            .filter_map(|m| layout::object(m, table))
        {
            match object {
                layout::Object::Counter(name) => counters.push(name),
                layout::Object::Other(what) => foreign.push(what),
            }
        }
        Ok(Layout {
            chains,
            sets,
            counters,
            foreign,
        })
    }

    /// The flags a replace that keeps the table (and some of its sets) asks for, given
    /// the flags it has now; `None` when only a whole replace can give the table the
    /// flags it should have: one with a flag knockgate never sets (dormant), or one
    /// made unlocked on a kernel that has the lock.
    fn keep_flags(&mut self, current: u32) -> Option<u32> {
        // Any flag but the lock's (dormant above all: its base chains hook nothing) is
        // not knockgate's; only a whole replace, which deletes the table, clears it.
        if current & !(table::OWNER | table::PERSIST) != 0 {
            return None;
        }
        if !self.want_lock || self.lock == TableLock::Unsupported {
            return (current == 0).then_some(0);
        }
        if current & table::PERSIST != 0 {
            // Ours already, or orphaned by the daemon before us: the owner flag takes it.
            return Some(table::OWNER | table::PERSIST);
        }
        // Unlocked: fine on a kernel without the lock; elsewhere only a whole replace
        // can lock it (PERSIST cannot be switched on in place). A probe that cannot
        // tell means a whole replace, which learns it.
        match self.persist_supported() {
            Ok(false) => {
                self.lock = TableLock::Unsupported;
                Some(0)
            }
            Ok(true) | Err(_) => None,
        }
    }

    /// Whether this kernel has `NFT_TABLE_F_PERSIST`, asked without changing anything:
    /// a batch that makes a locked probe table and then deletes a table whose name is
    /// too long to exist always fails, so nothing is committed; a kernel without the
    /// flag refuses the first message (EOPNOTSUPP), one with it only the second. Any
    /// other answer (another socket owns a table of the probe's name) is an error.
    fn persist_supported(&mut self) -> Result<bool, FirewallError> {
        const PROBE: &str = "knockgate-lock-probe";
        if let Some(known) = self.persist {
            return Ok(known);
        }
        let probe = cstring(PROBE).map_err(|detail| FirewallError::InvalidRuleset {
            table: PROBE.to_owned(),
            detail,
        })?;
        // Longer than any table name the kernel takes (NFT_NAME_MAXLEN, 256): this
        // message fails whatever exists, so the probe never commits.
        let missing =
            cstring(&"x".repeat(300)).map_err(|detail| FirewallError::InvalidRuleset {
                table: PROBE.to_owned(),
                detail,
            })?;
        let mut builder = Builder::new();
        builder.add(
            &FlaggedTable::new(&probe, table::OWNER | table::PERSIST),
            MsgType::Add,
            format!("table inet {PROBE} (probe)"),
        );
        builder.add(
            &Table::new(&missing, ProtoFamily::Inet),
            MsgType::Del,
            "a missing table (probe)".to_owned(),
        );
        let batch = builder.finish();
        let first = batch.batch.sequence_numbers().start;
        let known = match self.socket.transact(
            &batch.batch.iter().collect::<Vec<_>>(),
            batch.batch.sequence_numbers(),
        ) {
            Err(TransactError::Refused(r)) if r.errno == libc::EOPNOTSUPP && r.seq <= first + 1 => {
                false
            }
            Err(TransactError::Refused(r)) if r.seq > first + 1 => true,
            Ok(()) => true,
            Err(e) => return Err(Self::map_error(PROBE, Some(&batch), e)),
        };
        self.persist = Some(known);
        Ok(known)
    }

    /// Gives table `table` (with `current` flags) the `wanted` ones, alone in one
    /// transaction guarded by `generation`: an orphaned persistent table becomes this
    /// socket's.
    fn take_over(
        &mut self,
        table: &str,
        current: u32,
        wanted: u32,
        generation: u32,
    ) -> Result<(), FirewallError> {
        let name = cstring(table).map_err(|detail| FirewallError::InvalidRuleset {
            table: table.to_owned(),
            detail,
        })?;
        let mut builder = Builder::new();
        ensure_table(&mut builder, &name, table, current);
        builder.add(
            &FlaggedTable::new(&name, wanted),
            MsgType::Add,
            format!("table inet {table} (take over: flags {wanted:#x})"),
        );
        self.send_guarded(table, &builder.finish(), generation)
    }

    /// [`Self::send`] for a batch that is only valid at ruleset `generation`: the
    /// batch's BEGIN carries it (`NFNL_BATCH_GENID`), so the kernel refuses the whole
    /// batch if anything was committed since. Accounted like a whole replace.
    fn send_guarded(
        &mut self,
        table: &str,
        batch: &LabelledBatch,
        generation: u32,
    ) -> Result<(), FirewallError> {
        self.quietly(batch, |me| me.send_guarded_heard(table, batch, generation))
    }

    fn send_guarded_heard(
        &mut self,
        table: &str,
        batch: &LabelledBatch,
        generation: u32,
    ) -> Result<(), FirewallError> {
        let sent = self.transact_guarded(table, batch, generation);
        let after = self.generation().ok();
        self.accounted = match (&sent, after) {
            (Ok(()), Some(after)) if after == next_generation(generation) => Some(after),
            (Err(_), Some(after)) if after == generation => self.accounted,
            _ => None,
        };
        sent
    }

    /// Commits `batch` only if the kernel is still at `generation` (it refuses the
    /// whole batch with ERESTART otherwise); committed, the kernel is at the next.
    fn transact_guarded(
        &self,
        table: &str,
        batch: &LabelledBatch,
        generation: u32,
    ) -> Result<(), FirewallError> {
        let pages: Vec<&[u8]> = batch.batch.iter().collect();
        let bytes: usize = pages.iter().map(|p| p.len()).sum();
        if bytes > MAX_BATCH_BYTES {
            return Err(FirewallError::InvalidRuleset {
                table: table.to_owned(),
                detail: format!("the batch is {bytes} bytes, more than {MAX_BATCH_BYTES}"),
            });
        }
        let Some((begin, rest)) = pages.split_first() else {
            return Err(FirewallError::InvalidRuleset {
                table: table.to_owned(),
                detail: "an empty batch".to_owned(),
            });
        };
        let guarded = events::with_generation(begin, generation).ok_or_else(|| {
            FirewallError::InvalidRuleset {
                table: table.to_owned(),
                detail: "the batch does not start with a BEGIN message".to_owned(),
            }
        })?;
        let mut parts: Vec<&[u8]> = vec![&guarded.0, &begin[guarded.1..]];
        parts.extend_from_slice(rest);
        self.socket
            .transact(&parts, batch.batch.sequence_numbers())
            .map_err(|e| Self::map_error(table, Some(batch), e))
    }

    fn map_error(table: &str, batch: Option<&LabelledBatch>, e: TransactError) -> FirewallError {
        match e {
            TransactError::Send(source) => FirewallError::SendBatch {
                table: table.to_owned(),
                source,
            },
            TransactError::Receive(source) => FirewallError::ReceiveAcks {
                table: table.to_owned(),
                source,
            },
            TransactError::BadReply(detail) => FirewallError::BadReply {
                table: table.to_owned(),
                detail,
            },
            TransactError::Refused(refusal) => FirewallError::Refused {
                table: table.to_owned(),
                what: batch.map_or_else(|| "the request".to_owned(), |b| b.label(refusal.seq)),
                source: std::io::Error::from_raw_os_error(refusal.errno),
            },
        }
    }

    /// Commits `batch` — a replace, whole or keeping sets — through `commit`; a big
    /// one with the tamper watch out of the notification group. A replace starts the
    /// account afresh ([`Self::accounted`]: what anyone did to the table before it
    /// is gone, or, for a keeping one, refused by the kernel if anyone committed
    /// since the generation it carries), so what the watch could not hear matters
    /// only if someone else committed after it: if the kernel is not at the
    /// account's generation once the watch is back in the group, that counts as
    /// missed notifications (the tamper handling then repairs). Other batches are
    /// always heard.
    fn quietly(
        &mut self,
        batch: &LabelledBatch,
        commit: impl FnOnce(&mut Self) -> Result<(), FirewallError>,
    ) -> Result<(), FirewallError> {
        self.rejoin_watch();
        let bytes: usize = batch.batch.iter().map(<[u8]>::len).sum();
        let Some(mut watch) = self.watch.take() else {
            return commit(self);
        };
        if self.watch_deaf
            || bytes <= QUIET_ABOVE_BYTES
            || socket::hear_events(&watch.fd, false).is_err()
        {
            self.watch = Some(watch);
            return commit(self);
        }
        watch.whole_above = None;
        let sent = commit(self);
        if let Err(e) = socket::hear_events(&watch.fd, true) {
            self.watch_deaf = true;
            tracing::error!(target: crate::logging::AUDIT, event = "tamper", error = %e,
                "the tamper watch cannot rejoin the nftables notification group; tried again at each turn of the daemon's loop");
        }
        self.watch = Some(watch);
        if self.watch_deaf || !self.unchanged_since_own() {
            self.missed_events = true;
        }
        sent
    }

    /// Puts the watch back in the notification group if a rejoin failed; what went
    /// by meanwhile counts as missed.
    fn rejoin_watch(&mut self) {
        if !self.watch_deaf {
            return;
        }
        if let Some(watch) = &mut self.watch {
            watch.whole_above = None;
            self.watch_deaf = socket::hear_events(&watch.fd, true).is_err();
            if !self.watch_deaf {
                tracing::warn!(target: crate::logging::AUDIT, event = "tamper",
                    "the tamper watch is back in the nftables notification group; what went by meanwhile is checked");
            }
        }
        self.missed_events = true;
    }

    /// Sends `batch` as one transaction; `whole` when it replaces the table whole (so
    /// anyone's earlier changes to it no longer count). Keeps [`Self::accounted`].
    fn send(
        &mut self,
        table: &str,
        batch: &LabelledBatch,
        whole: bool,
    ) -> Result<(), FirewallError> {
        if whole {
            self.quietly(batch, |me| me.send_heard(table, batch, whole))
        } else {
            self.rejoin_watch();
            self.send_heard(table, batch, whole)
        }
    }

    fn send_heard(
        &mut self,
        table: &str,
        batch: &LabelledBatch,
        whole: bool,
    ) -> Result<(), FirewallError> {
        if !whole {
            return match self.accounted {
                // The kernel never numbers a generation 0, and would not check it.
                Some(accounted) if accounted != 0 => self.send_chained(table, batch, accounted),
                // Nothing to chain to: only a whole replace starts an account again.
                _ => self.transact(table, batch),
            };
        }
        let before = self.generation().ok();
        let sent = self.transact(table, batch);
        let after = self.generation().ok();
        let ours_alone = matches!((before, after), (Some(b), Some(a)) if a == next_generation(b));
        let chained = whole || (before.is_some() && self.accounted == before);
        self.accounted = if sent.is_ok() && ours_alone && chained {
            after
        } else if sent.is_err() && before.is_some() && before == after {
            self.accounted // refused: nothing was committed
        } else {
            None
        };
        sent
    }

    /// Sends a batch chained to the account: carrying the accounted generation, so
    /// the kernel refuses it (ERESTART) if anyone else committed since and otherwise
    /// commits it as exactly the next one. The account moves on without reading the
    /// generation before or after: a knock's grant waits on no extra round trip.
    /// Refused so, the batch goes again unchained and the account is over.
    ///
    /// Refused because another process committed first, the batch goes again chained
    /// if the watch heard that commit whole and it left the table alone (the account
    /// moved over it, [`Firewall::hear`]), up to [`CHAIN_RETRIES`] times.
    fn send_chained(
        &mut self,
        table: &str,
        batch: &LabelledBatch,
        accounted: u32,
    ) -> Result<(), FirewallError> {
        let mut accounted = accounted;
        for _ in 0..=CHAIN_RETRIES {
            match self.transact_guarded(table, batch, accounted) {
                Ok(()) => {
                    self.accounted = Some(next_generation(accounted));
                    return Ok(());
                }
                Err(FirewallError::Refused { source, .. })
                    if source.raw_os_error() == Some(libc::ERESTART) =>
                {
                    // The other commit's notifications are queued by now: the kernel
                    // sends them before it lets the next transaction look.
                    self.hear();
                    match self.accounted {
                        Some(moved) if moved != accounted => accounted = moved,
                        _ => break,
                    }
                }
                Err(e) => {
                    // Refused for what it asked (nothing committed), or lost on the
                    // way: the generation says which.
                    if self.generation().ok() != Some(accounted) {
                        self.accounted = None;
                    }
                    return Err(e);
                }
            }
        }
        self.accounted = None;
        self.transact(table, batch)
    }

    fn transact(&self, table: &str, batch: &LabelledBatch) -> Result<(), FirewallError> {
        let pages: Vec<&[u8]> = batch.batch.iter().collect();
        let bytes: usize = pages.iter().map(|p| p.len()).sum();
        if bytes > MAX_BATCH_BYTES {
            return Err(FirewallError::InvalidRuleset {
                table: table.to_owned(),
                detail: format!(
                    "the batch is {bytes} bytes, more than the {MAX_BATCH_BYTES} knockgate sends in one transaction"
                ),
            });
        }
        let seqs = batch.batch.sequence_numbers();
        self.socket
            .transact(&pages, seqs)
            .map_err(|e| Self::map_error(table, Some(batch), e))
    }

    /// One batch on one set: `add (no EXCL)` makes the element exist, `delete` removes
    /// it, and with a `ttl` a final `add` puts it back with the new timeout.
    fn element_batch(
        &mut self,
        table: &str,
        set: &str,
        key: ElementKey,
        ttl: Option<Duration>,
    ) -> Result<(), FirewallError> {
        let invalid = |detail| FirewallError::InvalidRuleset {
            table: table.to_owned(),
            detail,
        };
        let (t, s) = (
            cstring(table).map_err(invalid)?,
            cstring(set).map_err(invalid)?,
        );
        let placeholder = ttl.unwrap_or(Duration::from_secs(1));
        let mut ensure = ElemMsg::new(&t, &s, 0, false);
        ensure.push(key, Some(placeholder));
        let mut delete = ElemMsg::new(&t, &s, 0, false);
        delete.push_key(key);
        let mut builder = Builder::new();
        builder.add(&ensure, MsgType::Add, format!("element {key} in set {set}"));
        builder.add(
            &delete,
            MsgType::Del,
            format!("element {key} in set {set} (delete)"),
        );
        if let Some(ttl) = ttl {
            let mut add = ElemMsg::new(&t, &s, 0, true);
            add.push(key, Some(ttl));
            builder.add(&add, MsgType::Add, format!("element {key} in set {set}"));
        }
        self.send(table, &builder.finish(), false)
    }

    /// Refreshes (or with no `Add` phase, removes) `elements` in one transaction:
    /// each of `phases` over every element, set by set.
    fn refresh_batch(
        &mut self,
        table: &str,
        elements: &[(&str, ElementKey, Duration)],
        phases: &[Phase],
    ) -> Result<(), FirewallError> {
        if elements.is_empty() {
            return Ok(());
        }
        let invalid = |detail| FirewallError::InvalidRuleset {
            table: table.to_owned(),
            detail,
        };
        let t = cstring(table).map_err(invalid)?;
        let mut by_set: Vec<(&str, Vec<Element>)> = Vec::new();
        for (set, key, ttl) in elements {
            let e = Element {
                key: *key,
                expires_in: Some(*ttl),
            };
            match by_set.iter_mut().find(|(s, _)| s == set) {
                Some((_, list)) => list.push(e),
                None => by_set.push((set, vec![e])),
            }
        }
        // The phases of one element's refresh, each over every element.
        let mut builder = Builder::new();
        for &phase in phases {
            for (set, list) in &by_set {
                let s = cstring(set).map_err(invalid)?;
                let (kind, label) = match phase {
                    Phase::Delete => (MsgType::Del, "(delete)"),
                    Phase::Ensure | Phase::Add => (MsgType::Add, ""),
                };
                for msg in elements::refresh_messages(&t, &s, list, phase) {
                    builder.add(&msg, kind, format!("elements of set {set} {label}"));
                }
            }
        }
        self.send(table, &builder.finish(), false)
    }
}

impl Firewall for NftFirewall {
    fn replace(&mut self, ruleset: &Ruleset) -> Result<(), FirewallError> {
        let now = self.table_flags(&ruleset.table)?;
        if !self.want_lock || self.lock == TableLock::Unsupported {
            return self.replace_with_flags(ruleset, now, 0);
        }
        match self.replace_with_flags(ruleset, now, table::OWNER | table::PERSIST) {
            Ok(()) => {
                self.lock = TableLock::Locked;
                self.persist = Some(true);
                Ok(())
            }
            // A kernel before 6.9 does not know PERSIST; without it OWNER would fail
            // open (the table dies with the daemon), so the table stays unlocked.
            Err(FirewallError::Refused { source, .. })
                if source.raw_os_error() == Some(libc::EOPNOTSUPP) =>
            {
                self.lock = TableLock::Unsupported;
                self.persist = Some(false);
                self.replace_with_flags(ruleset, now, 0)
            }
            Err(e) => Err(e),
        }
    }

    fn keepable(
        &mut self,
        ruleset: &Ruleset,
        candidates: &[&str],
    ) -> Result<Vec<String>, FirewallError> {
        let Some(current) = self.table_flags(&ruleset.table)? else {
            return Ok(Vec::new());
        };
        if self.keep_flags(current).is_none() {
            return Ok(Vec::new());
        }
        let layout = self.layout(&ruleset.table)?;
        if !layout.foreign.is_empty() {
            return Ok(Vec::new());
        }
        Ok(layout.keepable(ruleset, candidates))
    }

    fn replace_keeping(&mut self, ruleset: &Ruleset, keep: &[String]) -> Result<(), FirewallError> {
        let refuse = |detail: String| FirewallError::InvalidRuleset {
            table: ruleset.table.clone(),
            detail,
        };
        // The generation everything below is true of: the account's, when it vouches
        // for the table, or the kernel's now. The batch carries it, and the kernel
        // refuses the batch (ERESTART) if anyone committed since — nothing another
        // process did in between survives the replace unseen.
        let generation = match self.accounted {
            Some(accounted) => accounted,
            None => self.generation()?,
        };
        let Some(current) = self.table_flags(&ruleset.table)? else {
            return Err(refuse("there is no table to keep sets of".to_owned()));
        };
        let now = self.layout(&ruleset.table)?;
        if let Some(what) = now.foreign.first() {
            return Err(refuse(format!(
                "the table holds {what}, which knockgate does not make; it is replaced whole"
            )));
        }
        let names: Vec<&str> = keep.iter().map(String::as_str).collect();
        if now.keepable(ruleset, &names).len() != keep.len() {
            return Err(refuse(format!(
                "the sets to keep ({}) are no longer all there with the same shape",
                keep.join(", ")
            )));
        }
        let Some(wanted) = self.keep_flags(current) else {
            return Err(refuse(format!(
                "the table's flags ({current:#x}) can only be set right by a whole replace"
            )));
        };
        let mut generation = generation;
        if wanted != current {
            // Taking an orphaned table over is its own transaction: the kernel refuses
            // base chains made in the same one as the takeover (EINVAL).
            self.take_over(&ruleset.table, current, wanted, generation)?;
            generation = next_generation(generation);
        }
        let batch = keep_batch(ruleset, &now, wanted, keep).map_err(refuse)?;
        // Accounted as a whole replace: what it keeps is the caller's to vouch for, and
        // the generation guard makes sure nobody slipped anything in meanwhile.
        self.send_guarded(&ruleset.table, &batch, generation)?;
        if wanted & table::OWNER != 0 {
            self.lock = TableLock::Locked;
        }
        Ok(())
    }

    fn unchanged_since_own(&mut self) -> bool {
        // What the watch heard first: other processes' commits that left the table
        // alone move the account on. The kernel numbers a commit before it notifies,
        // so a generation read ahead of the account may only not be heard yet: heard
        // again, a few times, before the answer is no.
        for _ in 0..UNCHANGED_TRIES {
            self.hear_all();
            match (self.accounted, self.generation()) {
                (Some(accounted), Ok(now)) if accounted == now => return true,
                (Some(_), Ok(_)) => {}
                _ => return false,
            }
        }
        // The account stays: a later notification can still move it on (only ever to
        // the next generation, heard whole), and whatever rests on it is refused by the
        // kernel (the generation in each batch) while it lags.
        false
    }

    fn accounted(&self) -> Option<u32> {
        self.accounted
    }

    fn hear(&mut self) {
        self.hear_all();
    }

    fn namespace(&self) -> Option<u64> {
        self.socket.netns_cookie().ok()
    }

    fn resume_accounting(&mut self, generation: u32) -> bool {
        let resumed = self.generation().ok() == Some(generation);
        if resumed {
            self.accounted = Some(generation);
        }
        resumed
    }

    fn remove(&mut self, table: &str) -> Result<(), FirewallError> {
        let invalid = |detail| FirewallError::InvalidRuleset {
            table: table.to_owned(),
            detail,
        };
        let name = cstring(table).map_err(invalid)?;
        let Some(flags) = self.table_flags(table)? else {
            return Ok(());
        };
        let nft_table = FlaggedTable::new(&name, flags);
        let mut builder = Builder::new();
        builder.add(
            &nft_table,
            MsgType::Del,
            format!("table inet {table} (delete)"),
        );
        self.send(table, &builder.finish(), false)
    }

    fn add_element(
        &mut self,
        table: &str,
        set: &str,
        key: ElementKey,
        ttl: Duration,
    ) -> Result<(), FirewallError> {
        self.element_batch(table, set, key, Some(ttl))
    }

    fn put_elements(
        &mut self,
        table: &str,
        elements: &[(&str, ElementKey, Duration)],
    ) -> Result<(), FirewallError> {
        self.refresh_batch(table, elements, &[Phase::Ensure, Phase::Delete, Phase::Add])
    }

    fn remove_elements(
        &mut self,
        table: &str,
        elements: &[(&str, ElementKey)],
    ) -> Result<(), FirewallError> {
        // Made to exist (a placeholder timeout), then deleted: an element the kernel
        // already timed out is not an error.
        let placeholder = Duration::from_secs(1);
        let elements: Vec<(&str, ElementKey, Duration)> = elements
            .iter()
            .map(|&(set, key)| (set, key, placeholder))
            .collect();
        self.refresh_batch(table, &elements, &[Phase::Ensure, Phase::Delete])
    }

    fn remove_element(
        &mut self,
        table: &str,
        set: &str,
        key: ElementKey,
    ) -> Result<(), FirewallError> {
        self.element_batch(table, set, key, None)
    }

    fn elements(&mut self, table: &str, set: &str) -> Result<Vec<Element>, FirewallError> {
        let invalid = |detail| FirewallError::InvalidRuleset {
            table: table.to_owned(),
            detail,
        };
        let (t, s) = (
            cstring(table).map_err(invalid)?,
            cstring(set).map_err(invalid)?,
        );
        // A big hash set resizes itself in the background after it grew (a replace
        // that carried 100,000 grants): a dump that meets a resize walks it again from
        // the start and, across its messages, skips by count in the new order — some
        // elements come twice and as many not at all. A duplicate is the sign: dump again.
        for _ in 0..DUMP_TRIES {
            self.dump_seq = self.dump_seq.wrapping_add(1);
            let request = elements::dump_request(&t, &s, self.dump_seq);
            let messages = match self.socket.dump(&request, self.dump_seq) {
                Ok(messages) => messages,
                // No such table or set: it holds nothing.
                Err(TransactError::Refused(r)) if r.errno == libc::ENOENT => return Ok(Vec::new()),
                Err(e) => return Err(Self::map_error(table, None, e)),
            };
            let mut elements: Vec<Element> = messages
                .iter()
                .flat_map(|m| elements::parse_dump_message(m))
                .collect();
            if set == crate::ruleset::sequence::SEQ_USED {
                for e in &mut elements {
                    e.key = elements::as_stage_touch(e.key);
                }
            }
            let mut seen = std::collections::HashSet::with_capacity(elements.len());
            if elements.iter().all(|e| seen.insert(e.key)) {
                return Ok(elements);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(FirewallError::BadReply {
            table: table.to_owned(),
            detail: format!("set {set} read back with duplicates {DUMP_TRIES} times (resizing)"),
        })
    }

    fn table_exists(&mut self, table: &str) -> Result<bool, FirewallError> {
        Ok(self.table_flags(table)?.is_some())
    }

    fn counters(&mut self, table: &str) -> Result<Vec<CounterDef>, FirewallError> {
        let t = cstring(table).map_err(|detail| FirewallError::InvalidRuleset {
            table: table.to_owned(),
            detail,
        })?;
        self.dump_seq = self.dump_seq.wrapping_add(1);
        let request = counter::dump_request(&t, self.dump_seq);
        let messages = match self.socket.dump(&request, self.dump_seq) {
            Ok(messages) => messages,
            Err(TransactError::Refused(r)) if r.errno == libc::ENOENT => return Ok(Vec::new()),
            Err(e) => return Err(Self::map_error(table, None, e)),
        };
        Ok(messages
            .iter()
            .filter_map(|m| counter::parse_dump_message(m))
            .filter(|(of, ..)| of == table)
            .map(|(_, name, packets, bytes)| CounterDef {
                name,
                packets,
                bytes,
            })
            .collect())
    }

    fn mark_connections(&mut self, mark: u32) -> Result<Adopted, FirewallError> {
        /// Update requests per datagram (each ~100 bytes; the socket buffer is 4 MiB).
        const CHUNK: usize = 512;
        let fail = |e| Self::map_error("conntrack", None, e);
        self.dump_seq = self.dump_seq.wrapping_add(1);
        let (messages, complete) = self
            .socket
            .dump_bounded(
                &conntrack::dump_request(self.dump_seq),
                self.dump_seq,
                MAX_ADOPTED,
            )
            .map_err(fail)?;
        let connections: Vec<conntrack::Connection> = messages
            .iter()
            .filter_map(|words| {
                let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
                conntrack::parse_dump_message(&bytes)
            })
            .filter(|c| !c.has(mark))
            .collect();
        let mut adopted = Adopted {
            cut_off: !complete,
            ..Adopted::default()
        };
        for chunk in connections.chunks(CHUNK) {
            self.dump_seq = self.dump_seq.wrapping_add(1);
            let first = self.dump_seq;
            let mut datagram = Vec::new();
            for c in chunk {
                datagram.extend_from_slice(&conntrack::mark_request(c, mark, self.dump_seq));
                self.dump_seq = self.dump_seq.wrapping_add(1);
            }
            let refusals = self
                .socket
                .requests(&datagram, first..self.dump_seq)
                .map_err(fail)?;
            // ENOENT: the connection ended between the dump and the update.
            let gone = refusals.iter().filter(|r| r.errno == libc::ENOENT).count();
            if let Some(other) = refusals.iter().find(|r| r.errno != libc::ENOENT) {
                return Err(FirewallError::Refused {
                    table: "conntrack".to_owned(),
                    what: "a conntrack mark update".to_owned(),
                    source: std::io::Error::from_raw_os_error(other.errno),
                });
            }
            adopted.gone += gone;
            adopted.marked += chunk.len() - gone;
        }
        Ok(adopted)
    }
}

/// Watches nf_tables notifications for changes to knockgate's table made by anyone but
/// the daemon's own socket. Non-blocking: the async runtime polls its descriptor, and
/// the firewall reads it ([`NftFirewall::hear_some`], [`NftFirewall::take_heard`]).
pub struct TamperWatch {
    fd: std::os::fd::OwnedFd,
}

impl TamperWatch {
    /// Subscribes to notifications for `table`, trusting only `firewall`'s socket.
    /// The firewall keeps a duplicate of the socket, to take it out of the group
    /// while a big batch commits.
    pub fn open(firewall: &mut NftFirewall, table: &str) -> Result<Self, FirewallError> {
        let fd = socket::open_events().map_err(FirewallError::OpenSocket)?;
        firewall.watch = Some(Watch {
            fd: fd.try_clone().map_err(FirewallError::OpenSocket)?,
            filter: EventFilter::new(table, firewall.port_id()?),
            buf: vec![0u8; 256 * 1024],
            heard: Tampering::default(),
            forged: (0, None),
            whole_above: None,
        });
        Ok(Self { fd })
    }

    /// Hands the watch to the async runtime, which wakes the caller when notifications
    /// arrive.
    pub fn register(self) -> std::io::Result<tokio::io::unix::AsyncFd<Self>> {
        // SAFETY: `self.fd` is an open, non-blocking socket owned by `self`; it is neither
        // closed nor replaced while the `AsyncFd` holds `self` (it is closed only when
        // the `AsyncFd` drops `self`, after deregistering).
        let registered = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(self, tokio::io::Interest::READABLE)
        };
        registered.map_err(std::io::Error::from)
    }
}

impl std::os::fd::AsRawFd for TamperWatch {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
}

/// The three parts of a refresh (`add (no EXCL); delete; add`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    /// Make each element exist (a short placeholder timeout).
    Ensure,
    /// Delete each.
    Delete,
    /// Add each with its timeout.
    Add,
}

/// A finalized batch with a description of every message, so a refusal can say
/// which rule the kernel did not take.
struct LabelledBatch {
    batch: FinalizedBatch,
    labels: Vec<String>,
}

impl LabelledBatch {
    fn label(&self, seq: u32) -> String {
        let seqs = self.batch.sequence_numbers();
        let acked = usize::try_from(seqs.end - seqs.start).unwrap_or(usize::MAX);
        // On kernels that acknowledge BEGIN/END (6.10+, nftnl decides), BEGIN takes the
        // first sequence number; otherwise the messages start at it.
        let first = if acked == self.labels.len() + 2 {
            seqs.start + 1
        } else {
            seqs.start
        };
        seq.checked_sub(first)
            .and_then(|i| usize::try_from(i).ok())
            .and_then(|i| self.labels.get(i))
            .cloned()
            .unwrap_or_else(|| format!("batch message {seq}"))
    }
}

struct Builder {
    batch: Batch,
    labels: Vec<String>,
}

impl Builder {
    fn new() -> Self {
        Self {
            batch: Batch::new(),
            labels: Vec::new(),
        }
    }

    fn add<T: nftnl::NlMsg>(&mut self, msg: &T, kind: MsgType, label: String) {
        self.batch.add(msg, kind);
        self.labels.push(label);
    }

    fn finish(self) -> LabelledBatch {
        LabelledBatch {
            batch: self.batch.finalize(),
            labels: self.labels,
        }
    }
}

fn cstring(text: &str) -> Result<CString, String> {
    CString::new(text).map_err(|_| format!("`{}` contains a NUL byte", text.escape_debug()))
}

/// Adds table `t` with the flags it has now (`current`): a no-op if it exists, an error
/// if another process owns it — so what follows in the batch cannot fail for its lack.
fn ensure_table(builder: &mut Builder, name: &CString, t: &str, current: u32) {
    builder.add(
        &FlaggedTable::new(name, current),
        MsgType::Add,
        format!("table inet {t} (create; refused if another process owns it)"),
    );
}

/// The whole replace transaction for `ruleset`: the table is (re-)added with the flags
/// it has now (`current`; a no-op if it exists, so the delete cannot fail), deleted, and
/// built anew with `flags`.
fn replace_batch(ruleset: &Ruleset, current: u32, flags: u32) -> Result<LabelledBatch, String> {
    let name = cstring(&ruleset.table)?;
    let table = Table::new(&name, ProtoFamily::Inet);
    let t = &ruleset.table;
    let mut builder = Builder::new();
    ensure_table(&mut builder, &name, t, current);
    builder.add(&table, MsgType::Del, format!("table inet {t} (delete)"));
    builder.add(
        &FlaggedTable::new(&name, flags),
        MsgType::Add,
        format!("table inet {t}"),
    );
    add_contents(&mut builder, ruleset, &table, &[])?;
    Ok(builder.finish())
}

/// The replace transaction that leaves the sets named in `keep` — and their
/// elements — where they are: everything else `now` (the table as dumped) holds is
/// deleted by name (rules, then chains, then sets and counters), and `ruleset` is
/// added around the kept sets. The table is never deleted: it keeps its flags
/// (`current`; a takeover is a transaction of its own).
fn keep_batch(
    ruleset: &Ruleset,
    now: &Layout,
    current: u32,
    keep: &[String],
) -> Result<LabelledBatch, String> {
    let name = cstring(&ruleset.table)?;
    let table = Table::new(&name, ProtoFamily::Inet);
    let t = &ruleset.table;
    let mut builder = Builder::new();
    ensure_table(&mut builder, &name, t, current);
    let chains: Vec<CString> = now
        .chains
        .iter()
        .map(|c| cstring(c))
        .collect::<Result<_, _>>()?;
    for (chain, label) in chains.iter().zip(&now.chains) {
        let chain = Chain::new(chain, &table);
        let flush = nftnl::Rule::new(&chain);
        builder.add(
            &flush,
            MsgType::Del,
            format!("rules of chain {label} (flush)"),
        );
    }
    for (chain, label) in chains.iter().zip(&now.chains) {
        let chain = Chain::new(chain, &table);
        builder.add(&chain, MsgType::Del, format!("chain {label} (delete)"));
    }
    for (set, _) in &now.sets {
        if keep.contains(set) {
            continue;
        }
        let set_name = cstring(set)?;
        let doomed = Set::<Ipv4Addr>::new_named(&set_name, 0, &table, ProtoFamily::Inet);
        builder.add(&doomed, MsgType::Del, format!("set {set} (delete)"));
    }
    for counter in &now.counters {
        let obj = counter::CounterObj::new(&name, &cstring(counter)?, 0, 0);
        builder.add(&obj, MsgType::Del, format!("counter {counter} (delete)"));
    }
    let kept: Vec<&str> = keep.iter().map(String::as_str).collect();
    add_contents(&mut builder, ruleset, &table, &kept)?;
    Ok(builder.finish())
}

/// Adds `ruleset`'s sets (with their elements), counters and chains to `builder`,
/// except the sets named in `kept`, which the table already holds: rules find those
/// by name (the kernel looks a set up by name before it tries the batch's ids).
fn add_contents(
    builder: &mut Builder,
    ruleset: &Ruleset,
    table: &Table,
    kept: &[&str],
) -> Result<(), String> {
    let name = cstring(&ruleset.table)?;
    let mut set_ids = HashMap::new();
    for (def, id) in ruleset.sets.iter().zip(1u32..) {
        set_ids.insert(def.name.as_str(), id);
        if kept.contains(&def.name.as_str()) {
            continue;
        }
        match def.key {
            SetKeyType::Addr(IpFamily::V4) => add_set::<Ipv4Addr>(builder, table, def, id)?,
            SetKeyType::Addr(IpFamily::V6) => add_set::<Ipv6Addr>(builder, table, def, id)?,
            SetKeyType::Cgroup => add_set::<CgroupId>(builder, table, def, id)?,
            SetKeyType::Proto => add_set::<InetProto>(builder, table, def, id)?,
            SetKeyType::CgroupAddr(IpFamily::V4) => add_set::<CgroupV4>(builder, table, def, id)?,
            SetKeyType::CgroupAddr(IpFamily::V6) => add_set::<CgroupV6>(builder, table, def, id)?,
            SetKeyType::Touch => add_set::<TouchKey>(builder, table, def, id)?,
            SetKeyType::StageTouch => add_set::<StageTouchKey>(builder, table, def, id)?,
        }
        let set = cstring(&def.name)?;
        let messages = elements::element_messages(&name, &set, id, true, &def.elements);
        for (part, elems) in messages.enumerate() {
            let label = format!("elements of set {} (message {})", def.name, part + 1);
            builder.add(&elems, MsgType::Add, label);
        }
    }
    for counter in &ruleset.counters {
        let obj = counter::CounterObj::new(
            &name,
            &cstring(&counter.name)?,
            counter.packets,
            counter.bytes,
        );
        builder.add(&obj, MsgType::Add, format!("counter {}", counter.name));
    }
    let set_id = |name: &str| set_ids.get(name).copied();
    for def in &ruleset.chains {
        add_chain(builder, table, def, &set_id)?;
    }
    Ok(())
}

/// What a table holds now, by name (see [`layout`]).
#[derive(Debug, Default)]
struct Layout {
    chains: Vec<String>,
    /// Named sets (anonymous ones go with the rules they belong to).
    sets: Vec<(String, layout::SetShape)>,
    counters: Vec<String>,
    /// What knockgate never makes (flowtables, objects other than counters): a table
    /// holding any of it is replaced whole, never kept.
    foreign: Vec<String>,
}

impl Layout {
    /// The sets of `ruleset` named in `candidates` that this table holds with the very
    /// shape `ruleset` gives them.
    fn keepable(&self, ruleset: &Ruleset, candidates: &[&str]) -> Vec<String> {
        ruleset
            .sets
            .iter()
            .filter(|def| candidates.contains(&def.name.as_str()))
            .filter(|def| {
                self.sets
                    .iter()
                    .any(|(name, shape)| *name == def.name && *shape == layout::shape_of(def))
            })
            .map(|def| def.name.clone())
            .collect()
    }
}

/// Key type of cgroup-id sets: nft's `cgroupsv2`, 8 bytes in host order.
struct CgroupId;

impl SetKey for CgroupId {
    const TYPE: u32 = 46;
    const LEN: u32 = 8;

    fn data(&self) -> Box<[u8]> {
        Box::new([0; 8])
    }
}

/// Key type of protocol sets: nft's `inet_proto`, one byte.
struct InetProto;

impl SetKey for InetProto {
    const TYPE: u32 = 12;
    const LEN: u32 = 1;

    fn data(&self) -> Box<[u8]> {
        Box::new([0])
    }
}

/// nft's concatenated key types: `(first << 6) | second` (nft's TYPE_BITS is 6).
const CGROUPSV2_TYPE: u32 = 46;

/// Key type `cgroupsv2 . ipv4_addr`: 8 + 4 bytes.
struct CgroupV4;

impl SetKey for CgroupV4 {
    const TYPE: u32 = (CGROUPSV2_TYPE << 6) | 7;
    const LEN: u32 = 12;

    fn data(&self) -> Box<[u8]> {
        Box::new([0; 12])
    }
}

/// Key type `cgroupsv2 . ipv6_addr`: 8 + 16 bytes.
struct CgroupV6;

impl SetKey for CgroupV6 {
    const TYPE: u32 = (CGROUPSV2_TYPE << 6) | 8;
    const LEN: u32 = 24;

    fn data(&self) -> Box<[u8]> {
        Box::new([0; 24])
    }
}

/// nft's type ids for the sequence keys: `inet_proto`, `inet_service`, `mark`.
const INET_PROTO_TYPE: u32 = 12;
const INET_SERVICE_TYPE: u32 = 13;
const MARK_TYPE: u32 = 19;

/// Key type `inet_proto . inet_service`: two 4-byte register slots.
struct TouchKey;

impl SetKey for TouchKey {
    const TYPE: u32 = (INET_PROTO_TYPE << 6) | INET_SERVICE_TYPE;
    const LEN: u32 = 8;

    fn data(&self) -> Box<[u8]> {
        Box::new([0; 8])
    }
}

/// Key type `mark . inet_proto . inet_service`: three 4-byte register slots.
struct StageTouchKey;

impl SetKey for StageTouchKey {
    const TYPE: u32 = (((MARK_TYPE << 6) | INET_PROTO_TYPE) << 6) | INET_SERVICE_TYPE;
    const LEN: u32 = 12;

    fn data(&self) -> Box<[u8]> {
        Box::new([0; 12])
    }
}

fn add_set<K: SetKey>(
    builder: &mut Builder,
    table: &Table,
    def: &SetDef,
    id: u32,
) -> Result<(), String> {
    let name = cstring(&def.name)?;
    let set = Set::<K>::new_named(&name, id, table, ProtoFamily::Inet);
    let raw = set.as_ptr().as_ptr();
    let shape = layout::shape_of(def);
    // SAFETY: `raw` is the live set owned by `set`; libnftnl copies the value.
    unsafe { sys::nftnl_set_set_u32(raw, attr(sys::NFTNL_SET_FLAGS), shape.flags) };
    if let Some(size) = shape.size {
        // SAFETY: as above.
        unsafe { sys::nftnl_set_set_u32(raw, attr(sys::NFTNL_SET_DESC_SIZE), size) };
    }
    if let Some(timeout_ms) = shape.timeout_ms {
        // SAFETY: as above.
        unsafe { sys::nftnl_set_set_u64(raw, attr(sys::NFTNL_SET_TIMEOUT), timeout_ms) };
    }
    if let Some((data_type, data_len)) = shape.data {
        // SAFETY: as above.
        unsafe { sys::nftnl_set_set_u32(raw, attr(sys::NFTNL_SET_DATA_TYPE), data_type) };
        // SAFETY: as above.
        unsafe { sys::nftnl_set_set_u32(raw, attr(sys::NFTNL_SET_DATA_LEN), data_len) };
    }
    builder.add(&set, MsgType::Add, format!("set {}", def.name));
    Ok(())
}

fn add_chain(
    builder: &mut Builder,
    table: &Table,
    def: &ChainDef,
    set_id: &dyn Fn(&str) -> Option<u32>,
) -> Result<(), String> {
    let name = cstring(&def.name)?;
    let mut chain = Chain::new(&name, table);
    chain.set_hook(
        match def.hook {
            Hook::Input => nftnl::Hook::In,
            Hook::Output => nftnl::Hook::Out,
            Hook::Forward => nftnl::Hook::Forward,
        },
        0,
    );
    chain.set_type(ChainType::Filter);
    chain.set_policy(match def.policy {
        Policy::Accept => nftnl::Policy::Accept,
        Policy::Drop => nftnl::Policy::Drop,
    });
    builder.add(&chain, MsgType::Add, format!("chain {}", def.name));
    for rule in &def.rules {
        let mut nft_rule = nftnl::Rule::new(&chain);
        for e in &rule.0 {
            expr::add(&mut nft_rule, e, set_id)
                .map_err(|detail| format!("rule `{rule}` in chain {}: {detail}", def.name))?;
        }
        builder.add(
            &nft_rule,
            MsgType::Add,
            format!("rule in chain {}: {rule}", def.name),
        );
    }
    Ok(())
}

fn attr(a: sys::nftnl_set_attr) -> u16 {
    u16::try_from(a).unwrap_or(u16::MAX)
}

#[cfg(test)]
mod tests {
    use super::vouched;

    #[test]
    fn the_account_moves_only_to_the_next_generation_heard_whole() {
        // Heard whole (after 10), exactly the next one: the account moves.
        assert_eq!(vouched(Some(11), 12, Some(10)), Some(12));
        // Not the next one: a generation in between was not vouched for.
        assert_eq!(vouched(Some(11), 13, Some(10)), Some(11));
        assert_eq!(vouched(Some(11), 11, Some(10)), Some(11));
        // Numbered before the watch could hear it from its first notification.
        assert_eq!(vouched(Some(11), 12, Some(12)), Some(11));
        assert_eq!(vouched(Some(11), 12, Some(13)), Some(11));
        // The watch cannot say where it started hearing whole: nothing is vouched.
        assert_eq!(vouched(Some(11), 12, None), Some(11));
        // No account: nothing to move.
        assert_eq!(vouched(None, 12, Some(10)), None);
        // Generations wrap, skipping 0.
        assert_eq!(vouched(Some(u32::MAX), 1, Some(u32::MAX - 1)), Some(1));
        assert_eq!(
            vouched(Some(u32::MAX), 0, Some(u32::MAX - 1)),
            Some(u32::MAX)
        );
        assert_eq!(vouched(Some(u32::MAX), 1, Some(1)), Some(u32::MAX));
        assert_eq!(super::next_generation(7), 8);
        assert_eq!(super::next_generation(u32::MAX), 1);
    }
}
