//! The daemon's decisions, with the firewall, the grant book, the replay guard and
//! the ban counter it owns. Generic over [`Firewall`]: unit tests call
//! [`Core::knock`] with a chosen source address and the in-memory firewall, no
//! sockets and no root. Time is passed in.
//!
//! Order for a knock (docs/PROTOCOL.md): authenticate (shape, key, MAC, clock) →
//! replay guard → policy → persist the nonce (fsync) → kernel → book.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::Duration;

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::clock::{UnixMs, kernel_timer};
use crate::firewall::{Firewall, FirewallError};
use crate::grants::{GrantBook, GrantRecord, Granted, WindowRecord, WindowScope, id_text, new_id};
use crate::knock::auth::{KnockMac, ServerId};
use crate::knock::replay::{ReplayError, ReplayGuard};
use crate::knock::verify::{Refusal, authenticate_with};
use crate::knock::{KeyId, ServiceId};
use crate::policy::{self, KeyRing, Limits, PolicyRefusal};
use crate::ruleset::baseline::{
    EGRESS_CGROUPS, EGRESS_HOST, EGRESS_TO_V4, EGRESS_TO_V6, KNOCK_BAN_V4, KNOCK_BAN_V6,
};
use crate::ruleset::{Element, ElementKey, IpFamily};
use crate::service::{self, PortService};
use crate::state::{ReplayLog, SnapshotWriter};

/// Most live nonces remembered; beyond it knocks are refused until old ones expire.
pub const REPLAY_CAPACITY: usize = 1 << 16;
/// Name of the grant book in the state directory.
pub const BOOK_FILE: &str = "grants.json";

/// The result of one knock datagram.
#[derive(Debug)]
pub enum KnockOutcome {
    /// A hole was opened or extended.
    Granted {
        /// The grant as booked.
        record: GrantRecord,
        /// New or extended.
        kind: Granted,
        /// Whether the requested TTL was cut to a cap.
        capped: bool,
        /// Whether the knock named its address (bound) rather than leaving it to the
        /// packet's source.
        bound: bool,
        /// Further grants the same packet opened (an fwknop request for several ports).
        more: Vec<GrantRecord>,
    },
    /// A knock for `egress`: a host-wide egress window was opened (or renewed).
    Window {
        /// The window as booked.
        window: WindowRecord,
        /// Whether it replaced a window the same key had open.
        renewed: bool,
        /// Whether the requested TTL was cut to a cap.
        capped: bool,
        /// Whether the knock named its address.
        bound: bool,
    },
    /// Nothing was opened.
    Refused {
        /// Why.
        reason: KnockRefusal,
        /// Whether this refusal got the source banned from the knock port.
        banned: bool,
    },
}

/// Why a knock opened nothing.
#[derive(Debug, thiserror::Error)]
pub enum KnockRefusal {
    /// Shape, key, MAC or clock.
    #[error(transparent)]
    Auth(#[from] Refusal),
    /// Replayed (or the guard is full).
    #[error("{1} (key {0})")]
    Replay(KeyId, ReplayError),
    /// The key may not do this.
    #[error("{1} (key {0})")]
    Policy(KeyId, PolicyRefusal),
    /// Knocks have taken all the grants they may: the last [`ADMIN_RESERVE`] are
    /// kept for admins.
    #[error(
        "{0} grants are open, all that knocks may take (the last {ADMIN_RESERVE} are kept for admins); refused until some end"
    )]
    Full(usize),
    /// The nonce could not be made durable, so nothing was granted.
    #[error("cannot persist the replay guard: {0}")]
    State(String),
    /// The kernel refused the grant.
    #[error("cannot add the grant: {0}")]
    Firewall(String),
    /// An fwknop packet that is not authentic (no stanza's HMAC matched, or not
    /// even the shape).
    #[error(transparent)]
    Fwknop(#[from] crate::fwknop::Refusal),
    /// An fwknop packet whose HMAC matched `stanza`, but that does not decode or asks
    /// for what knockgate does not do (a command, NAT).
    #[error("{refusal} (stanza {stanza})")]
    FwknopStanza {
        /// The stanza whose HMAC matched.
        stanza: String,
        /// What was wrong.
        refusal: crate::fwknop::Refusal,
    },
    /// An authentic fwknop packet whose timestamp is outside the allowed skew.
    #[error(
        "fwknop packet timestamp off by {skew_secs} s for stanza {stanza} (client clock wrong?)"
    )]
    FwknopClock {
        /// The stanza whose keys matched.
        stanza: String,
        /// Client time minus server time, in seconds.
        skew_secs: i64,
    },
}

impl KnockRefusal {
    /// Whether the sender is to blame (counts toward a ban), rather than the server.
    fn is_invalid(&self) -> bool {
        // A replay is authentic: counting it would let anyone who races a knock get
        // its owner banned when the owner's own copy arrives second. For fwknop
        // packets: the shape, no matching HMAC, and the clock (as for native knocks).
        matches!(
            self,
            Self::Auth(_)
                | Self::FwknopClock { .. }
                | Self::Fwknop(
                    crate::fwknop::Refusal::Shape(_) | crate::fwknop::Refusal::NoKeyMatched
                )
        )
    }
}

/// Most sources whose invalid knocks are counted at once (~100 bytes each). Past it,
/// sources that have gone quiet are dropped; if none have, the counts start afresh.
pub const MAX_COUNTED_SOURCES: usize = 65_536;

/// Grants only an admin may open: knocks (whatever their keys' quotas add up to) stop
/// short of `knock.max_grants` by this many, so an admin can always let someone in.
pub const ADMIN_RESERVE: usize = 1_000;

/// Why a grant was not opened.
#[derive(Debug, thiserror::Error)]
pub enum GrantError {
    /// `knock.max_grants` holes are open already; renewing one of them still works.
    #[error("{0} grants are open, the most knockgated holds; refused until some end")]
    Full(usize),
    /// No port service of that name in the config.
    #[error(
        "no service `{0}` (ssh, or one of [[services]]; egress windows open with egress-window)"
    )]
    UnknownService(String),
    /// The kernel refused the element.
    #[error(transparent)]
    Firewall(#[from] FirewallError),
}

/// What the core needs from the config.
pub struct Settings {
    /// knockgate's table.
    pub table: String,
    /// The server id knocks are bound to.
    pub server_id: ServerId,
    /// Allowed clock skew.
    pub skew: Duration,
    /// Default and maximum grant lengths.
    pub limits: Limits,
    /// Ban settings, if banning is on: (invalid knocks allowed, within, ban length).
    pub ban: Option<(u32, Duration, Duration)>,
    /// IPv6 sources are counted and banned by this prefix.
    pub ipv6_prefix: u8,
    /// Where the grant book is saved.
    pub book_path: PathBuf,
    /// Longest egress window.
    pub egress_max_ttl: Duration,
    /// The port services (ssh first).
    pub services: Vec<PortService>,
    /// Whether `egress` can be opened by a knock (outbound is locked).
    pub egress_service: bool,
    /// Most grants open at once, every service and both families (`knock.max_grants`):
    /// a key holder who binds knocks to address after address cannot grow the book
    /// and the kernel's sets past it.
    pub max_grants: usize,
}

impl Settings {
    /// The name of the service with wire id `id`, if this server has one.
    fn service_named_by(&self, id: ServiceId) -> Option<&str> {
        if self.egress_service && id == ServiceId::egress() {
            return Some(service::EGRESS);
        }
        self.services
            .iter()
            .find(|s| s.id == id)
            .map(|s| s.name.as_str())
    }

    /// The port service called `name`.
    fn port_service(&self, name: &str) -> Option<&PortService> {
        self.services.iter().find(|s| s.name == name)
    }
}

/// The daemon's state and decisions.
pub struct Core<F: Firewall> {
    firewall: F,
    settings: Settings,
    keys: KeyRing,
    guard: ReplayGuard,
    replay_log: ReplayLog,
    book: GrantBook,
    /// Since when the book has changes not yet on disk (saves are coalesced).
    book_dirty_since: Option<std::time::Instant>,
    /// Writes the book off the daemon's loop.
    book_writer: SnapshotWriter,
    /// Writes the book's kernel stamp (see [`crate::grants::KernelStamp`]).
    stamp_writer: SnapshotWriter,
    /// The digest of the book as last handed to its writer (or found at the start).
    book_digest: Option<String>,
    /// What the last stamp handed to its writer says (book digest, generation).
    stamped: Option<(String, u32)>,
    invalid: Option<DefaultKeyedRateLimiter<IpAddr>>,
    /// Bans the kernel refused since the last log line about them, and when that was.
    bans_refused: u64,
    bans_refused_logged: Option<std::time::Instant>,
    /// When the full invalid-knock counter was last swept.
    counter_swept: Option<std::time::Instant>,
    /// The port sequences in force, when some key has one.
    sequencer: Option<super::sequencer::Sequencer>,
    /// Datagrams refused since the start (`knockgate status`).
    knocks_refused: u64,
    /// Each key's HMAC state for this server, ready to clone per knock.
    macs: HashMap<KeyId, KnockMac>,
    /// The clock the daemon's closes of grants are timed by.
    mono: crate::clock::MonoClock,
}

/// The most grants one expiry pass closes (the rest in the next, right after).
pub const CLOSES_PER_PASS: usize = 4096;

/// What an expiry pass ended.
#[derive(Debug, Default)]
pub struct Ended {
    /// Grants the daemon closed now, at their booked end.
    pub closed: Vec<GrantRecord>,
    /// Grants their kernel timeouts closed, now dropped from the book.
    pub timed_out: Vec<GrantRecord>,
    /// Windows that ended.
    pub windows: Vec<WindowRecord>,
    /// How many grants could not be closed, and the first reason (their kernel
    /// timeouts close them).
    pub close_failed: Option<(usize, FirewallError)>,
}

/// Each key's HMAC state for `server`.
fn knock_macs(keys: &KeyRing, server: &ServerId) -> HashMap<KeyId, KnockMac> {
    keys.iter()
        .map(|(id, key)| (id.clone(), KnockMac::new(&key.secret, server)))
        .collect()
}

/// Who a grant a key's port sequence opened is booked for.
fn sequence_who(id: &KeyId) -> String {
    format!("key {id} (sequence)")
}

fn grant_set(service: &str, addr: IpAddr) -> String {
    service::grant_set(service, IpFamily::of(addr))
}

/// Whether something that ends at `ends` may still be open at `now`: its kernel
/// timeout has not surely closed it yet.
fn not_settled(ends: UnixMs, now: UnixMs) -> bool {
    ends.plus(kernel_timer().settle()) > now
}

/// The timeout the kernel is asked for so that an element lasts at least `ttl`.
fn kernel_timeout(ttl: Duration) -> Duration {
    kernel_timer().timeout_behind(ttl, crate::clock::tick_lag())
}

/// What a knock opened.
enum Opened {
    Grant(GrantRecord, Granted),
    /// At least one (an fwknop packet may ask for several ports).
    Grants(Vec<(GrantRecord, Granted)>),
    Window(WindowRecord, bool),
}

/// The `command` of a window a knock opened (one per key; a new knock replaces it).
pub const KNOCK_WINDOW_COMMAND: &str = "(knock)";

/// The per-source counter of invalid knocks, when banning is on.
fn invalid_limiter(
    ban: Option<(u32, Duration, Duration)>,
) -> Option<DefaultKeyedRateLimiter<IpAddr>> {
    let (after, within, _) = ban?;
    let after = NonZeroU32::new(after)?;
    let quota = Quota::with_period(within / after.get())?.allow_burst(after);
    Some(RateLimiter::keyed(quota))
}

/// The set and element that hold a window of `scope`.
fn window_elements(scope: WindowScope, to: &[IpAddr]) -> Vec<(&'static str, ElementKey)> {
    match scope {
        WindowScope::Cgroup(id) if to.is_empty() => vec![(EGRESS_CGROUPS, ElementKey::Cgroup(id))],
        WindowScope::Cgroup(id) => to
            .iter()
            .map(|&addr| {
                let addr = policy::canonical(addr);
                let set = match IpFamily::of(addr) {
                    IpFamily::V4 => EGRESS_TO_V4,
                    IpFamily::V6 => EGRESS_TO_V6,
                };
                (set, ElementKey::CgroupAddr(id, addr))
            })
            .collect(),
        WindowScope::Host => vec![(EGRESS_HOST, ElementKey::Proto(TCP))],
    }
}

/// IP protocol number of TCP, the element of the host-wide switch.
const TCP: u8 = 6;

fn ban_set(addr: IpAddr) -> &'static str {
    match IpFamily::of(addr) {
        IpFamily::V4 => KNOCK_BAN_V4,
        IpFamily::V6 => KNOCK_BAN_V6,
    }
}

impl<F: Firewall> Core<F> {
    /// A core over `firewall`, whose table is already in place with the live grants.
    pub fn new(
        firewall: F,
        settings: Settings,
        keys: KeyRing,
        (replay_log, guard): (ReplayLog, ReplayGuard),
        book: GrantBook,
    ) -> Self {
        let invalid = invalid_limiter(settings.ban);
        let book_writer = SnapshotWriter::new(settings.book_path.clone());
        let stamp_writer = SnapshotWriter::new(super::stamp::path_beside(&settings.book_path));
        let macs = knock_macs(&keys, &settings.server_id);
        Self {
            firewall,
            settings,
            keys,
            guard,
            replay_log,
            book,
            book_dirty_since: None,
            book_writer,
            stamp_writer,
            book_digest: None,
            stamped: None,
            invalid,
            bans_refused: 0,
            bans_refused_logged: None,
            counter_swept: None,
            sequencer: None,
            knocks_refused: 0,
            macs,
            mono: crate::clock::MonoClock::default(),
        }
    }

    /// Handles one datagram from `source` at `now`.
    pub fn knock(&mut self, datagram: &[u8], source: IpAddr, now: UnixMs) -> KnockOutcome {
        match self.try_knock(datagram, source, now) {
            Ok((Opened::Grant(record, kind), capped, bound)) => KnockOutcome::Granted {
                record,
                kind,
                capped,
                bound,
                more: Vec::new(),
            },
            Ok((Opened::Grants(mut records), capped, bound)) => {
                let (record, kind) = records.remove(0);
                KnockOutcome::Granted {
                    record,
                    kind,
                    capped,
                    bound,
                    more: records.into_iter().map(|(r, _)| r).collect(),
                }
            }
            Ok((Opened::Window(window, renewed), capped, bound)) => KnockOutcome::Window {
                window,
                renewed,
                capped,
                bound,
            },
            Err(reason) => {
                self.knocks_refused += 1;
                let banned = reason.is_invalid() && self.count_invalid(source);
                KnockOutcome::Refused { reason, banned }
            }
        }
    }

    fn try_knock(
        &mut self,
        datagram: &[u8],
        source: IpAddr,
        now: UnixMs,
    ) -> Result<(Opened, bool, bool), KnockRefusal> {
        // fwknop packets are base64 text; native knocks are binary with a magic: told
        // apart by shape before any MAC.
        if !self.keys.fwknop_keys().is_empty() && crate::fwknop::looks_like_spa(datagram) {
            return self.try_fwknop(datagram, source, now);
        }
        let macs = &self.macs;
        let skew = self.settings.skew.as_secs();
        let knock = authenticate_with(datagram, |id| macs.get(id).cloned(), now.secs(), skew)?;
        let key_id = knock.key_id.clone();
        let forget_after = knock.timestamp.saturating_add(skew);
        let Some(key) = self.keys.get(&key_id) else {
            return Err(Refusal::UnknownKey(key_id).into());
        };
        // The policy first: a knock it refuses takes no room in the replay guard, so a
        // key allowed nothing cannot fill it.
        let Some(service) = self.settings.service_named_by(knock.service) else {
            let refusal = PolicyRefusal::UnknownService(knock.service);
            return Err(KnockRefusal::Policy(key_id, refusal));
        };
        let service = service.to_owned();
        let grant = policy::decide(
            key,
            &service,
            knock.address,
            knock.ttl_secs,
            source,
            self.settings.limits,
        )
        .map_err(|e| KnockRefusal::Policy(key_id.clone(), e))?;
        // Room for a new hole (a renewal needs none), checked before the nonce is
        // used, so a knock refused here can be sent again later. An egress window
        // takes no grant: a key has at most one, which a new knock replaces.
        let who = format!("key {key_id}");
        let is_window = service == service::EGRESS;
        if !is_window && !self.book.holds(&service, grant.address) {
            if self.key_grants(&key_id) >= key.max_grants {
                let max = key.max_grants;
                return Err(KnockRefusal::Policy(
                    key_id,
                    PolicyRefusal::KeyGrants { max },
                ));
            }
            if self.book.len() >= self.knocks_may_hold() {
                return Err(KnockRefusal::Full(self.book.len()));
            }
        }
        self.guard
            .admit_for(key_id.as_str(), knock.nonce, forget_after, now.secs())
            .map_err(|e| KnockRefusal::Replay(key_id.clone(), e))?;
        // The nonce is written before the hole opens, so no restart of the daemon can
        // reopen it; it is forced to the disk right after (decision 14: a disk flush
        // takes 0.3 ms typically and 15 ms at p99 on a shared VM, and only a host crash
        // in that instant could lose it — which also empties the kernel's table).
        self.replay_log
            .append(&knock.nonce, forget_after)
            .map_err(|e| KnockRefusal::State(format!("{e:#}")))?;
        let mut capped = grant.capped;
        let opened = if is_window {
            capped |= grant.ttl > self.settings.egress_max_ttl;
            self.open_knock_window(&who, grant.address, grant.ttl, now)
                .map(|(w, renewed)| Opened::Window(w, renewed))
                .map_err(|e| KnockRefusal::Firewall(format!("{e:#}")))
        } else {
            self.grant(&service, grant.address, &who, grant.ttl, now)
                .map(|(r, kind)| Opened::Grant(r, kind))
                .map_err(|e| KnockRefusal::Firewall(format!("{e:#}")))
        };
        if let Err(e) = self.replay_log.sync() {
            tracing::error!(error = %format!("{e:#}"), "cannot flush the replay log to disk");
        }
        let _ = self.replay_log.compact(&self.guard);
        let bound = knock.address != crate::knock::AddressClaim::PacketSource;
        Ok((opened?, capped, bound))
    }

    /// An fwknop packet: the stanza whose HMAC matches, the clock, the policy for each
    /// port asked (each must be a service the stanza may open), the replay guard (the
    /// packet's digest, fwknop's own rule), then the grants.
    fn try_fwknop(
        &mut self,
        datagram: &[u8],
        source: IpAddr,
        now: UnixMs,
    ) -> Result<(Opened, bool, bool), KnockRefusal> {
        let opened =
            crate::fwknop::open(datagram, self.keys.fwknop_keys()).map_err(
                |refusal| match refusal {
                    crate::fwknop::Refusal::Content { key, .. }
                    | crate::fwknop::Refusal::Type { key, .. } => {
                        let stanza = self
                            .keys
                            .fwknop(key)
                            .map(|e| e.name.clone())
                            .unwrap_or_default();
                        KnockRefusal::FwknopStanza { stanza, refusal }
                    }
                    other => KnockRefusal::Fwknop(other),
                },
            )?;
        let Some(entry) = self.keys.fwknop(opened.key) else {
            return Err(crate::fwknop::Refusal::NoKeyMatched.into());
        };
        let request = &opened.request;
        let skew = self.settings.skew.as_secs();
        let off = i128::from(request.timestamp) - i128::from(now.secs());
        if off.unsigned_abs() > u128::from(skew) {
            return Err(KnockRefusal::FwknopClock {
                stanza: entry.name.clone(),
                skew_secs: i64::try_from(off).unwrap_or(i64::MAX),
            });
        }
        // The name was checked to be a valid key id when the config was loaded.
        let id = KeyId::new(&entry.name).map_err(|_| crate::fwknop::Refusal::NoKeyMatched)?;
        let decided = self.decide_fwknop(entry, request, &id, source)?;
        let who = format!("fwknop {}", entry.name);
        let new_holes = decided
            .iter()
            .filter(|(s, g)| !self.book.holds(s, g.address))
            .count();
        if new_holes > 0 {
            if self.book.held_by(&who) + new_holes > entry.max_grants {
                let max = entry.max_grants;
                return Err(KnockRefusal::Policy(id, PolicyRefusal::KeyGrants { max }));
            }
            if self.book.len() + new_holes > self.knocks_may_hold() {
                return Err(KnockRefusal::Full(self.book.len()));
            }
        }
        let mut nonce = [0u8; crate::knock::packet::NONCE_LEN];
        nonce.copy_from_slice(&opened.digest[..crate::knock::packet::NONCE_LEN]);
        let forget_after = request.timestamp.saturating_add(skew);
        let quota_key = format!("fwknop/{}", entry.name);
        self.guard
            .admit_for(&quota_key, nonce, forget_after, now.secs())
            .map_err(|e| KnockRefusal::Replay(id.clone(), e))?;
        self.replay_log
            .append(&nonce, forget_after)
            .map_err(|e| KnockRefusal::State(format!("{e:#}")))?;
        let mut granted = Vec::new();
        let mut capped = false;
        let mut failed = None;
        for (service, grant) in decided {
            capped |= grant.capped;
            match self.grant(&service, grant.address, &who, grant.ttl, now) {
                Ok(g) => granted.push(g),
                Err(e) => {
                    tracing::warn!(target: crate::logging::AUDIT, event = "grant-failed",
                        service = %service, address = %grant.address, who = %who,
                        error = %format!("{e:#}"), "cannot add an fwknop request's grant");
                    failed = Some(KnockRefusal::Firewall(format!("{e:#}")));
                    break;
                }
            }
        }
        if let Err(e) = self.replay_log.sync() {
            tracing::error!(error = %format!("{e:#}"), "cannot flush the replay log to disk");
        }
        let _ = self.replay_log.compact(&self.guard);
        if granted.is_empty() {
            return Err(failed.unwrap_or(KnockRefusal::Firewall("nothing granted".into())));
        }
        let bound = request.address.is_some();
        Ok((Opened::Grants(granted), capped, bound))
    }

    /// Each port an fwknop request asks for, as the service the stanza may open and
    /// the grant the policy allows; a port no allowed service has refuses them all.
    fn decide_fwknop(
        &self,
        entry: &policy::FwknopEntry,
        request: &crate::fwknop::AccessRequest,
        id: &KeyId,
        source: IpAddr,
    ) -> Result<Vec<(String, policy::Grant)>, KnockRefusal> {
        let claim = request
            .address
            .map_or(crate::knock::AddressClaim::PacketSource, |a| {
                crate::knock::AddressClaim::V4(a)
            });
        let asked = request
            .client_timeout
            .map(|t| Duration::from_secs(u64::from(t.max(1))));
        let wanted = asked.map_or(entry.ttl, |asked| {
            entry.max_ttl.map_or(asked, |max| asked.min(max))
        });
        let cut_by_stanza = asked.is_some_and(|asked| asked > wanted);
        let ttl_secs = u32::try_from(wanted.as_secs()).unwrap_or(u32::MAX).max(1);
        let mut decided = Vec::new();
        for &(protocol, port) in &request.ports {
            let service = self
                .settings
                .services
                .iter()
                .find(|s| s.protocol == protocol && s.ports.contains(port))
                .filter(|s| entry.services.contains(&s.name))
                .map(|s| s.name.clone())
                .ok_or_else(|| {
                    let asked = format!("{}/{port}", protocol.name());
                    KnockRefusal::Policy(id.clone(), PolicyRefusal::Service(asked))
                })?;
            let mut grant = policy::decide(
                entry,
                &service,
                claim,
                ttl_secs,
                source,
                self.settings.limits,
            )
            .map_err(|e| KnockRefusal::Policy(id.clone(), e))?;
            grant.capped |= cut_by_stanza;
            if !decided.iter().any(|(s, _)| *s == service) {
                decided.push((service, grant));
            }
        }
        Ok(decided)
    }

    /// A knock's `egress`: a host-wide window for `ttl` (capped at `egress.max_ttl`),
    /// replacing the window the same key opened before, if any (the new one is opened
    /// first, so the switch never blinks off).
    fn open_knock_window(
        &mut self,
        who: &str,
        address: IpAddr,
        ttl: Duration,
        now: UnixMs,
    ) -> Result<(WindowRecord, bool), FirewallError> {
        let previous: Vec<String> = self
            .book
            .windows()
            .filter(|w| w.who == who && w.command.starts_with(KNOCK_WINDOW_COMMAND))
            .map(|w| w.id.clone())
            .collect();
        let command = format!("{KNOCK_WINDOW_COMMAND} for {address}");
        let (window, _) = self.open_window(WindowScope::Host, &[], ttl, who, &command, now)?;
        // The new window is open and booked: a failure to close the old one is
        // logged, never reported as a refused knock (the kernel still ends it).
        for id in &previous {
            match self.close_window(id, now) {
                Ok(_) => tracing::info!(target: crate::logging::AUDIT, event = "egress-close",
                    id = %id, by = %who, replaced_by = %window.id,
                    "egress window replaced by a new knock"),
                Err(e) => tracing::warn!(target: crate::logging::AUDIT, event = "egress-close",
                    id = %id, by = %who, error = %format!("{e:#}"),
                    "cannot close the egress window a new knock replaces; it ends at its time"),
            }
        }
        Ok((window, !previous.is_empty()))
    }

    /// How many nonces the replay guard remembers.
    #[must_use]
    pub fn replay_guard_len(&self) -> usize {
        self.guard.len()
    }

    /// Counts an invalid knock from `source`; bans it when it crosses the limit.
    fn count_invalid(&mut self, source: IpAddr) -> bool {
        let (Some(limiter), Some((_, _, duration))) = (&self.invalid, self.settings.ban) else {
            return false;
        };
        if limiter.len() >= MAX_COUNTED_SOURCES {
            // Full: sweep at most once a second (a sweep walks every source); until
            // then, new junk is not counted.
            if self
                .counter_swept
                .is_some_and(|at| at.elapsed() < Duration::from_secs(1))
            {
                return false;
            }
            self.counter_swept = Some(std::time::Instant::now());
            limiter.retain_recent();
            limiter.shrink_to_fit();
            if limiter.len() >= MAX_COUNTED_SOURCES / 4 * 3 {
                // Still mostly sources that all sent junk within the window: a spoofed
                // flood. Start counting afresh rather than grow: the kernel's meters and
                // the bans in force still hold; only counts towards new bans reset.
                // At most one line a second: resets follow sweeps.
                tracing::warn!(target: crate::logging::AUDIT, event = "ban-counter-reset",
                    sources = limiter.len(), "invalid-knock counter full (spoofed flood?); counts reset");
                self.invalid = invalid_limiter(self.settings.ban);
                return false;
            }
        }
        // IPv6 by prefix: one host holds a whole /64, and must not dodge its ban by
        // moving to the next address.
        let source = policy::canonical(source);
        let source = match source {
            IpAddr::V6(_) => crate::ruleset::mask_addr(source, self.settings.ipv6_prefix),
            IpAddr::V4(_) => source,
        };
        if limiter.check_key(&source).is_ok() {
            return false;
        }
        let added = self.firewall.add_element(
            &self.settings.table,
            ban_set(source),
            source.into(),
            duration,
        );
        match added {
            Ok(()) => true,
            Err(e) => {
                // Most often the ban set is full (the kernel refuses one more): logged
                // once a minute with a count, so a flood cannot flood the journal too.
                self.bans_refused += 1;
                let due = self
                    .bans_refused_logged
                    .is_none_or(|at| at.elapsed() >= Duration::from_secs(60));
                if due {
                    tracing::warn!(target: crate::logging::AUDIT, event = "ban-refused",
                        source = %source, refused = self.bans_refused, error = %format!("{e:#}"),
                        "cannot ban (ban set full?); the meters still limit every source");
                    self.bans_refused = 0;
                    self.bans_refused_logged = Some(std::time::Instant::now());
                }
                false
            }
        }
    }

    /// Grants key `id` holds, by knock and by port sequence together: one limit.
    fn key_grants(&self, id: &KeyId) -> usize {
        self.book.held_by(&format!("key {id}")) + self.book.held_by(&sequence_who(id))
    }

    /// Opens `service` for `address` for `ttl` on behalf of `who`, in the kernel first
    /// and then in the book.
    pub fn grant(
        &mut self,
        service: &str,
        address: IpAddr,
        who: &str,
        ttl: Duration,
        now: UnixMs,
    ) -> Result<(GrantRecord, Granted), GrantError> {
        if self.settings.port_service(service).is_none() {
            return Err(GrantError::UnknownService(service.to_owned()));
        }
        let address = policy::canonical(address);
        let most = self.settings.max_grants;
        if self.book.len() >= most && !self.book.holds(service, address) {
            return Err(GrantError::Full(most));
        }
        // The kernel is asked for a little more than the TTL, so the port never
        // closes early; the book keeps the TTL.
        self.firewall.add_element(
            &self.settings.table,
            &grant_set(service, address),
            address.into(),
            kernel_timeout(ttl),
        )?;
        let booked = self.book.grant(service, address, who, now, ttl, new_id);
        // Timed from now, with the element in the kernel: the port is open the TTL.
        if let Some(id) = crate::grants::parse_id(&booked.0.id) {
            self.close_after(id, ttl);
        }
        self.save_book();
        Ok(booked)
    }

    /// An admin's request to open `service`: the server's cap applies, as for knocks.
    pub fn open(
        &mut self,
        service: &str,
        address: IpAddr,
        ttl: Option<Duration>,
        who: &str,
        now: UnixMs,
    ) -> Result<(GrantRecord, Granted, bool), GrantError> {
        let limits = self.settings.limits;
        let requested = ttl.map_or(0, |d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX));
        let (ttl, capped) = policy::cap_ttl(requested, None, limits);
        let (record, kind) = self.grant(service, address, who, ttl, now)?;
        Ok((record, kind, capped))
    }

    /// Opens an egress window for `scope` for `ttl` (capped at `egress.max_ttl`) on
    /// behalf of `who`, running `command`.
    pub fn open_window(
        &mut self,
        scope: WindowScope,
        to: &[IpAddr],
        ttl: Duration,
        who: &str,
        command: &str,
        now: UnixMs,
    ) -> Result<(WindowRecord, bool), FirewallError> {
        let capped = ttl > self.settings.egress_max_ttl;
        let ttl = ttl
            .min(self.settings.egress_max_ttl)
            .max(Duration::from_secs(1));
        // An element another window also holds (the host-wide switch; a cgroup with
        // two windows) must last as long as the longest of them.
        let elements = window_elements(scope, to);
        for (n, &(set, key)) in elements.iter().enumerate() {
            let shared = self.remaining_of_others(set, key, "", now);
            let kernel_ttl = kernel_timeout(shared.map_or(ttl, |other| other.max(ttl)));
            if let Err(e) = self
                .firewall
                .add_element(&self.settings.table, set, key, kernel_ttl)
            {
                // Nothing half-open: what this window added goes again (or back to
                // the time of the window that shares it).
                for &(set, key) in &elements[..n] {
                    let _ = self.release(set, key, "", now);
                }
                return Err(e);
            }
        }
        let mut window = WindowRecord {
            id: id_text(self.book.fresh_id(&mut new_id)),
            scope,
            who: who.to_owned(),
            command: command.to_owned(),
            to: to.iter().map(|&a| policy::canonical(a)).collect(),
            granted_at: 0,
            expires_at: 0,
            granted_at_ms: 0,
            expires_at_ms: 0,
        };
        window.set_times(now, now.plus(ttl));
        self.book.open_window(window.clone());
        self.save_book();
        Ok((window, capped))
    }

    /// Closes window `id` now; `Ok(None)` if there is no such window. Element by
    /// element: one that another open window also holds (the host-wide switch, the
    /// same cgroup or cgroup–address pair) stays for that window's time only; every
    /// other goes — so an unrestricted window's end leaves a restricted window of the
    /// same cgroup restricted.
    pub fn close_window(
        &mut self,
        id: &str,
        now: UnixMs,
    ) -> Result<Option<WindowRecord>, FirewallError> {
        let Some(window) = self.book.windows().find(|w| w.id == id).cloned() else {
            return Ok(None);
        };
        // Every element is tried, and the window leaves the book even if one failed:
        // the kernel's timeout still ends what could not be removed.
        let mut failed = None;
        for (set, key) in window_elements(window.scope, &window.to) {
            if let Err(e) = self.release(set, key, id, now) {
                failed.get_or_insert(e);
            }
        }
        self.book.close_window(id);
        self.save_book();
        match failed {
            Some(e) => Err(e),
            None => Ok(Some(window)),
        }
    }

    /// Lets go of element `key` of `set` for window `id`: another open window that
    /// holds it keeps it, for its own time only; otherwise it goes.
    fn release(
        &mut self,
        set: &'static str,
        key: ElementKey,
        id: &str,
        now: UnixMs,
    ) -> Result<(), FirewallError> {
        match self.remaining_of_others(set, key, id, now) {
            Some(left) => {
                self.firewall
                    .add_element(&self.settings.table, set, key, kernel_timeout(left))
            }
            None => self.firewall.remove_element(&self.settings.table, set, key),
        }
    }

    /// The longest time left of the open windows other than `id` that hold element
    /// `key` of `set`, if any.
    fn remaining_of_others(
        &self,
        set: &str,
        key: ElementKey,
        id: &str,
        now: UnixMs,
    ) -> Option<Duration> {
        self.book
            .windows()
            .filter(|w| w.id != id && w.ends() > now)
            .filter(|w| window_elements(w.scope, &w.to).contains(&(set, key)))
            .map(|w| now.until(w.ends()))
            .max()
    }

    /// The open egress windows.
    pub fn windows(&mut self, now: UnixMs) -> Vec<WindowRecord> {
        self.book
            .windows()
            .filter(|w| not_settled(w.ends(), now))
            .cloned()
            .collect()
    }

    /// Closes grant `id` now; `Ok(None)` if there is no such grant.
    pub fn revoke(&mut self, id: &str) -> Result<Option<GrantRecord>, FirewallError> {
        let Some(record) = self.book.get(id) else {
            return Ok(None);
        };
        self.firewall.remove_element(
            &self.settings.table,
            &grant_set(&record.service, record.address),
            record.address.into(),
        )?;
        self.book.revoke(id);
        self.save_book();
        Ok(Some(record))
    }

    /// Closes the grants whose time is up and drops them from the book, with those
    /// the kernel's timeouts closed; returns them, for the expiry log lines.
    pub fn expire(&mut self, now: UnixMs) -> Vec<GrantRecord> {
        let mut ended = self.expire_all(now);
        ended.closed.append(&mut ended.timed_out);
        ended.closed
    }

    /// What is over at `now`: each grant the daemon booked is closed at its TTL,
    /// its element taken out of the kernel in one batch with the others due (at most
    /// [`CLOSES_PER_PASS`]); a grant the daemon does not close (booked by an earlier
    /// process, or whose removal failed) leaves the book once its kernel timeout has
    /// surely closed it. Windows likewise.
    pub fn expire_all(&mut self, now: UnixMs) -> Ended {
        let (closed, close_failed) = self.close_due();
        let (timed_out, windows) = self.expire_settled(now);
        Ended {
            closed,
            timed_out,
            windows,
            close_failed,
        }
    }

    /// Closes the grants whose close time (`CLOCK_MONOTONIC`, read after the kernel
    /// took the element, plus the TTL) has come: the port closes at the TTL, not up
    /// to the two ticks and the tick lag later that the kernel's timeout allows for,
    /// and a wall clock set meanwhile changes nothing. A batch the kernel refuses is
    /// tried element by element; what still fails is left to its kernel timeout.
    fn close_due(&mut self) -> (Vec<GrantRecord>, Option<(usize, FirewallError)>) {
        let Some(now_us) = self.mono.now_us() else {
            return (Vec::new(), None);
        };
        let due = self.book.closing_by(now_us, CLOSES_PER_PASS);
        if due.is_empty() {
            return (Vec::new(), None);
        }
        let table = self.settings.table.clone();
        let sets: Vec<String> = due
            .iter()
            .map(|r| grant_set(&r.service, r.address))
            .collect();
        let elements: Vec<(&str, ElementKey)> = sets
            .iter()
            .zip(&due)
            .map(|(set, r)| (set.as_str(), r.address.into()))
            .collect();
        let (mut closed, mut failed) = (Vec::new(), None::<(usize, FirewallError)>);
        let all = self.firewall.remove_elements(&table, &elements);
        for (record, &(set, key)) in due.into_iter().zip(&elements) {
            let alone = match &all {
                Ok(()) => Ok(()),
                Err(_) => self.firewall.remove_element(&table, set, key),
            };
            match alone {
                Ok(()) => {
                    self.book.revoke(&record.id);
                    closed.push(record);
                }
                Err(e) => {
                    if let Some(id) = crate::grants::parse_id(&record.id) {
                        self.book.close_at(id, None);
                    }
                    match &mut failed {
                        Some((n, _)) => *n += 1,
                        None => failed = Some((1, e)),
                    }
                }
            }
        }
        self.save_book();
        (closed, failed)
    }

    /// Drops from the book the grants and windows the kernel has surely closed by
    /// now (the TTL plus the slack its timeout was given), so "ended" never comes
    /// before the port closes. A knock in between is a new grant, not an extension
    /// (the book's `grant` looks at the time, not at whether the record is still
    /// there).
    fn expire_settled(&mut self, now: UnixMs) -> (Vec<GrantRecord>, Vec<WindowRecord>) {
        self.guard.expire(now.secs());
        let settle = u64::try_from(kernel_timer().settle().as_millis()).unwrap_or(0);
        let settled = UnixMs(now.0.saturating_sub(settle));
        let gone = self.book.expire(settled);
        let windows_gone = self.book.expire_windows(settled);
        if !gone.is_empty() || !windows_gone.is_empty() {
            self.save_book();
        }
        (gone, windows_gone)
    }

    /// Puts back `records` (grants a trial config closed, now rolled back) with the
    /// time each has left, under their own ids; those whose time is over or whose
    /// service is not in the config stay closed. Returns how many came back.
    pub fn restore_grants(&mut self, records: Vec<GrantRecord>, now: UnixMs) -> usize {
        let mut restored = 0;
        for record in records {
            let left = now.until(record.ends());
            if left.is_zero() || self.settings.port_service(&record.service).is_none() {
                continue;
            }
            let added = self.firewall.add_element(
                &self.settings.table,
                &grant_set(&record.service, record.address),
                record.address.into(),
                kernel_timeout(left),
            );
            match added {
                Ok(()) => {
                    // Under the id the book gave it (its own, unless another took it).
                    let id = self.book.restore(&record);
                    self.close_after(id, left);
                    restored += 1;
                }
                Err(e) => tracing::warn!(target: crate::logging::AUDIT, event = "rollback",
                    id = %record.id, error = %format!("{e:#}"), "cannot put a grant back"),
            }
        }
        if restored > 0 {
            self.save_book();
        }
        restored
    }

    /// The live grants, by id. A listing changes nothing: what ended is dropped
    /// (and logged) by the expiry timer alone; until then it is left out here once
    /// its kernel timeout has surely closed it.
    pub fn grants(&mut self, now: UnixMs) -> Vec<GrantRecord> {
        let mut grants = self.book.sorted();
        grants.retain(|r| self.listed(r, now));
        grants
    }

    /// At most `limit` live grants by id, after the grant `after` (from the first
    /// without), and the last one's id if more follow.
    pub fn grants_page(
        &mut self,
        now: UnixMs,
        after: Option<crate::grants::GrantId>,
        limit: usize,
    ) -> (Vec<GrantRecord>, Option<crate::grants::GrantId>) {
        let (mut page, next) = self.book.page(after, limit);
        page.retain(|r| self.listed(r, now));
        (page, next)
    }

    /// Whether a listing shows `record`: a grant the daemon closes is open until it
    /// does (and leaves the book then); another, until its kernel timeout surely
    /// closed it.
    fn listed(&self, record: &GrantRecord, now: UnixMs) -> bool {
        self.book.close_of(&record.id).is_some() || not_settled(record.ends(), now)
    }

    /// How many grants knocks may fill: all but the admins' reserve.
    fn knocks_may_hold(&self) -> usize {
        self.settings.max_grants.saturating_sub(ADMIN_RESERVE)
    }

    /// Number of keys that can knock.
    #[must_use]
    pub fn key_count(&self) -> usize {
        self.keys.len()
    }

    /// Datagrams on the knock port refused since the start.
    #[must_use]
    pub fn knocks_refused(&self) -> u64 {
        self.knocks_refused
    }

    /// Datagrams the kernel dropped on the knock port as junk (its `knock_junk`
    /// counter), or none if the table's counters cannot be read.
    pub fn junk_dropped(&mut self) -> Option<u64> {
        let table = self.settings.table.clone();
        let counters = self.firewall.counters(&table).ok()?;
        counters
            .iter()
            .find(|c| c.name == crate::ruleset::KNOCK_JUNK)
            .map(|c| c.packets)
    }

    /// How long until the next grant is to be closed or dropped, or window ends,
    /// for the daemon's expiry timer.
    #[must_use]
    pub fn next_expiry(&self, now: UnixMs) -> Option<Duration> {
        let close = self
            .book
            .first_close()
            .zip(self.mono.now_us())
            .map(|(at, now_us)| Duration::from_micros(at.saturating_sub(now_us)));
        let settled = self
            .book
            .next_expiry()
            .map(|at| now.until(at.plus(kernel_timer().settle())));
        match (close, settled) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Times the daemon's closes by `clock` (a test's, set by hand).
    #[cfg(test)]
    pub fn use_clock(&mut self, clock: crate::clock::MonoClock) {
        self.mono = clock;
    }

    /// Has the daemon close grant `id` `ttl` from now (or, if its clock cannot be
    /// read, leaves it to its kernel timeout).
    fn close_after(&mut self, id: crate::grants::GrantId, ttl: Duration) {
        let ttl_us = u64::try_from(ttl.as_micros()).unwrap_or(u64::MAX);
        let at = self.mono.now_us().map(|now| now.saturating_add(ttl_us));
        self.book.close_at(id, at);
    }

    /// The firewall, for the daemon's stop.
    pub fn into_firewall(self) -> F {
        self.firewall
    }

    /// New settings and keys after a reload; the grant book, replay guard and bans
    /// carry on.
    /// Returns the grants of services the new config no longer has: the new ruleset
    /// has no set for them, so the kernel closed them with the replace.
    pub fn reconfigure(&mut self, settings: Settings, keys: KeyRing) -> Vec<GrantRecord> {
        if settings.ban != self.settings.ban {
            self.invalid = invalid_limiter(settings.ban);
        }
        let kept: Vec<&str> = settings.services.iter().map(|s| s.name.as_str()).collect();
        let dropped = self.book.drop_services_except(&kept);
        if !dropped.is_empty() {
            self.save_book();
        }
        self.macs = knock_macs(&keys, &settings.server_id);
        self.settings = settings;
        self.keys = keys;
        dropped
    }

    /// The firewall, for the daemon's stop.
    pub fn firewall_mut(&mut self) -> &mut F {
        &mut self.firewall
    }

    /// What the grant and window sets should hold at `now` according to the book, by
    /// set: each element with the time its longest booking has left. The book, not the
    /// kernel, is the truth after someone else changed the table.
    #[must_use]
    pub fn booked_elements(&self, now: UnixMs, kept: &[String]) -> HashMap<String, Vec<Element>> {
        let mut out: HashMap<String, Vec<Element>> = self
            .sequencer
            .as_ref()
            .map(|s| s.held(now))
            .unwrap_or_default();
        // The tick's lag read once for all (a million elements: a million reads).
        let (timer, lag) = (kernel_timer(), crate::clock::tick_lag());
        let element = |key, at: UnixMs| Element {
            key,
            expires_in: (at != UnixMs::NEVER).then(|| timer.timeout_behind(now.until(at), lag)),
        };
        // One grant per service and address: straight into its set (a million grants
        // make no key, string or map entry each on the way).
        // Sets left in place by the replace need none (their names: `None`).
        let mut names: HashMap<(&str, IpFamily), Option<String>> = HashMap::new();
        let mono_now = self.mono.now_us();
        for (service, address, ends, close_us) in self.book.holes() {
            // A grant the daemon closes has the time left by its own clock (a wall
            // clock set since moves nothing); the others, by the booked end.
            let left = match (close_us, mono_now) {
                (0, _) | (_, None) => now.until(ends),
                (at, Some(mono)) => Duration::from_micros(at.saturating_sub(mono)),
            };
            if !left.is_zero() || ends == UnixMs::NEVER {
                let addr = policy::canonical(address);
                let family = IpFamily::of(addr);
                let set_name = names.entry((service, family)).or_insert_with(|| {
                    Some(service::grant_set(service, family)).filter(|s| !kept.contains(s))
                });
                let Some(set) = set_name else {
                    continue;
                };
                if !out.contains_key(set.as_str()) {
                    out.insert(set.clone(), Vec::new());
                }
                if let Some(list) = out.get_mut(set.as_str()) {
                    list.push(Element {
                        key: ElementKey::Addr(addr),
                        expires_in: (ends != UnixMs::NEVER)
                            .then(|| timer.timeout_behind(left, lag)),
                    });
                }
            }
        }
        // Windows may share an element (a scope, a destination): the longest wins.
        let mut until: HashMap<(&str, ElementKey), UnixMs> = HashMap::new();
        for window in self.book.windows() {
            for (set, key) in window_elements(window.scope, &window.to) {
                if window.ends() > now {
                    let at = until.entry((set, key)).or_insert(window.ends());
                    *at = (*at).max(window.ends());
                }
            }
        }
        for ((set, key), at) in until {
            out.entry(set.to_owned())
                .or_default()
                .push(element(key, at));
        }
        out
    }

    /// Marks the book changed. Saving rewrites the whole file (and fsyncs), so saves
    /// are coalesced: the run loop calls [`Core::save_book_now`] shortly after the first
    /// change, and the stop does too. A crash in between loses only names and ids: the
    /// kernel keeps the grants, and the next start books them as `recovered`.
    fn save_book(&mut self) {
        self.book_dirty_since
            .get_or_insert_with(std::time::Instant::now);
    }

    /// Since when the book has unsaved changes, if it has any.
    #[must_use]
    pub fn book_dirty_since(&self) -> Option<std::time::Instant> {
        self.book_dirty_since
    }

    /// Marks the book changed, to be saved shortly (a start that reconciled it).
    pub fn book_changed(&mut self) {
        self.save_book();
    }

    /// Hands the book to its writer if it changed (written in the background), and
    /// its stamp after it.
    pub fn save_book_now(&mut self) {
        if self.book_dirty_since.take().is_some() {
            let bytes = self.book.to_json();
            self.book_digest = Some(super::stamp::digest(&bytes));
            self.book_writer.write(bytes);
            self.stamp_book();
        }
    }

    /// Takes `digest` as the book file's as it is on disk (a start that found it true).
    pub fn book_on_disk(&mut self, digest: String) {
        self.book_digest = Some(digest);
    }

    /// Hands the stamp for the book as last saved to its writer: the firewall's
    /// accounted generation, or no stamp (an empty file) when it has none.
    fn stamp_book(&mut self) {
        // Other processes' commits the watch heard leave the account current.
        self.firewall.hear();
        let now = self
            .firewall
            .accounted()
            .zip(self.book_digest.clone())
            .map(|(generation, digest)| (digest, generation));
        if now == self.stamped {
            return;
        }
        let stamp = now.as_ref().zip(self.firewall.namespace()).and_then(
            |((digest, generation), netns)| super::stamp::stamp(digest, netns, *generation),
        );
        self.stamped = now;
        self.stamp_writer
            .write(stamp.map(|s| s.to_json()).unwrap_or_default());
    }

    /// Saves the book if it changed, and its stamp if the kernel moved on since, and
    /// waits until both are on disk (for the stop). A book that did not change is not
    /// written again: only its small stamp is.
    pub fn save_book_and_wait(&mut self) {
        self.save_book_now();
        self.stamp_book();
        self.book_writer.finish();
        self.stamp_writer.finish();
    }
}

mod sequences;
pub use sequences::SequenceOutcome;

#[cfg(test)]
mod tests;
