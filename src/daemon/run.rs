//! Wiring: the knock socket, the admin socket, the expiry timer and the signals
//! around one [`Daemon`] on a single-threaded runtime, so every kernel change is
//! serialised (the daemon is borrowed for one synchronous step at a time).

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use anyhow::Context;
use tokio::io::unix::AsyncFd;
use tracing::{info, warn};

use super::admin;
use super::listener::{self, KnockLog};
use super::{Daemon, source_of, unix_now};
use crate::admin::{Request, Response};
use crate::clock::UnixMs;
use crate::config::{Loaded, Tamper};
use crate::daemon::core::SequenceOutcome;
use crate::firewall::Firewall;
use crate::firewall::nft::events::Tampering;
use crate::firewall::nft::nflog::{Logged, SequenceLog};
use crate::firewall::nft::{NftFirewall, TableLock, TamperWatch};
use crate::logging::AUDIT;
use crate::policy::KeyRing;
use crate::ruleset::sequence::{OPENED_PREFIX, REFUSED_PREFIX};

/// How often refusal counts are summarised while there are any.
const SUMMARY_EVERY: Duration = Duration::from_secs(10);
/// How long after a change the grant book is saved (changes in between are coalesced).
const BOOK_SAVE_DELAY: Duration = Duration::from_millis(200);
/// Longest sleep of the expiry timer when no grant is due.
const IDLE_EXPIRY_CHECK: Duration = Duration::from_secs(3600);
/// Most `recvmmsg` batches handled in one turn of the run loop (256 datagrams).
const RECV_BATCHES: usize = 8;

type Shared = Rc<RefCell<Daemon<NftFirewall>>>;

/// Runs knockgated until SIGTERM or SIGINT.
pub fn run(loaded: Loaded, keys: KeyRing) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, serve(loaded, keys))
}

/// Applies the baseline and books what the kernel holds ([`Daemon::start`]), telling
/// the service manager all along that the start goes on: with a million grants to
/// read back it takes minutes.
fn start(
    firewall: NftFirewall,
    loaded: Loaded,
    keys: KeyRing,
) -> Result<Shared, super::StartError> {
    let _keepalive = super::keepalive::StartKeepalive::for_systemd();
    let daemon = Daemon::start(firewall, loaded, keys, UnixMs::now())?;
    Ok(Rc::new(RefCell::new(daemon)))
}

async fn serve(loaded: Loaded, keys: KeyRing) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let port = loaded.config.knock.port;
    let admin_path = loaded.config.admin.socket.clone();
    let group = loaded.config.admin.group.clone();
    let tamper = loaded.config.tamper;
    let (firewall, mut watch) = open_firewall(&loaded)?;
    // The baseline first: whatever fails after this point (state directory, sockets,
    // signals) leaves the host locked down rather than open while the service restarts.
    let daemon = start(firewall, loaded, keys)?;
    let mut sequences = SequenceListener::open(&daemon)?;
    let socket = listener::bind(port).with_context(|| format!("cannot bind udp port {port}"))?;
    let admin_socket = admin::bind(&admin_path, &group)?;
    let cgroup_root = cgroup_root();
    let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    let mut hup = signal(SignalKind::hangup()).context("cannot watch SIGHUP")?;
    announce_ready(&mut daemon.borrow_mut(), &admin_path);
    let mut beats = Beats::new(sd_notify::watchdog_enabled().map(|period| period / 2));
    let mut log = KnockLog::new();
    let wake = Rc::new(tokio::sync::Notify::new());
    let mut reader = listener::BatchReader::new();
    let signal = loop {
        heed_heard(&daemon, tamper);
        let Timers {
            next_expiry,
            book_due,
            trial,
            sequences_due,
        } = Timers::of(&mut daemon.borrow_mut());
        if !log.has_counts() {
            beats.summarised();
        }
        tokio::select! {
            ready = socket.readable() => {
                if ready.is_err() { continue; }
                let mut d = daemon.borrow_mut();
                // Whatever is queued, a batch per system call, without going round the
                // loop (and its timers) for each: under a flood this is most of the
                // work saved. Bounded, so timers and admin requests still get a turn.
                for _ in 0..RECV_BATCHES {
                    let read = socket.try_io(tokio::io::Interest::READABLE, || reader.read(&socket));
                    // Until the socket is empty (`WouldBlock`, which also clears
                    // tokio's readiness): what came in meanwhile saves a wake-up.
                    let Ok(_) = read else { break };
                    for (datagram, from) in reader.datagrams() {
                        let source = source_of(from);
                        // The clock per datagram (the vDSO's, cheap): a grant booked
                        // at the batch's start would be booked to end before its
                        // element, added later in the batch, does.
                        let now = UnixMs::now();
                        log.outcome(&d.core().knock(datagram, source, now), source);
                    }
                }
            }
            accepted = admin_socket.accept() => {
                if let Ok((stream, _)) = accepted {
                    let (daemon, group, wake) = (Rc::clone(&daemon), group.clone(), Rc::clone(&wake));
                    let cgroup_root = cgroup_root.clone();
                    tokio::task::spawn_local(async move {
                        admin::serve(stream, &group, cgroup_root.as_deref(), |request, peer| {
                            let answer = answer(&daemon, request, &peer);
                            // New grants, windows or a trial: the timers above must be recomputed.
                            wake.notify_one();
                            answer
                        })
                        .await;
                    });
                }
            }
            () = wake.notified() => {}
            ready = watch.readable_mut() => tamper_seen(&daemon, tamper, ready),
            () = tokio::time::sleep(next_expiry) => {
                drain_sequences(&daemon, &mut sequences);
                expire(&daemon);
            }
            () = tokio::time::sleep(sequences_due.unwrap_or(IDLE_EXPIRY_CHECK)), if sequences_due.is_some() => write_sequences(&daemon),
            ready = readable(sequences.log.as_mut()) => on_sequences(&daemon, ready),
            () = tokio::time::sleep_until(beats.summary_due), if log.has_counts() => {
                log.summarise();
                beats.summarised();
            }
            () = tokio::time::sleep_until(book_due.unwrap_or_else(tokio::time::Instant::now)), if book_due.is_some() => {
                daemon.borrow_mut().core().save_book_now();
            }
            () = tokio::time::sleep(trial.unwrap_or(IDLE_EXPIRY_CHECK)), if trial.is_some() => {
                daemon.borrow_mut().rollback_if_due(std::time::Instant::now());
            }
            () = tokio::time::sleep_until(beats.watchdog_due()), if beats.watchdog.is_some() => {
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
                beats.fed();
            }
            _ = term.recv() => break "SIGTERM",
            _ = int.recv() => break "SIGINT",
            _ = hup.recv() => {
                let _ = reload(&daemon, "SIGHUP");
            }
        }
        sequences.follow(&daemon);
    };
    log.summarise();
    info!(signal, "stop requested");
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    let _ = std::fs::remove_file(&admin_path);
    daemon
        .borrow_mut()
        .shutdown()
        .context("cannot stop cleanly")?;
    Ok(())
}

/// The socket completed sequences are reported on, and the group last tried.
struct SequenceListener {
    log: Option<AsyncFd<SequenceLog>>,
    tried: Option<u16>,
}

impl SequenceListener {
    /// Listens where the config says (nowhere when no key has a sequence).
    fn open(daemon: &Shared) -> anyhow::Result<Self> {
        let mut d = daemon.borrow_mut();
        Ok(Self {
            log: open_sequence_log(&mut d, None)?,
            tried: sequence_group(&mut d),
        })
    }

    /// After a reload that turned sequences on or off, or moved their log group:
    /// listens where the config now says. A group that cannot be bound is tried once
    /// per config, not once per loop.
    fn follow(&mut self, daemon: &Shared) {
        let mut d = daemon.borrow_mut();
        let wanted = sequence_group(&mut d);
        if wanted == self.tried {
            return;
        }
        self.tried = wanted;
        match open_sequence_log(&mut d, self.log.take()) {
            Ok(opened) => self.log = opened,
            Err(e) => {
                // Nothing would book, limit or log what sequences open: they stop (the
                // elements in force end with their steps) until a reload can listen.
                d.core().set_sequencer(None);
                self.tried = None;
                tracing::error!(target: AUDIT, event = "sequence", error = %format!("{e:#}"),
                    "cannot listen for completed sequences; port sequences are off until a reload");
            }
        }
    }
}

/// The log group completed sequences are reported on, when some key has a sequence.
fn sequence_group(d: &mut Daemon<NftFirewall>) -> Option<u16> {
    d.core().sequencer()?;
    Some(d.loaded().config.sequence.log_group)
}

/// Listens on the sequence log group (none when no key has a sequence); `old` is
/// closed first (a group can be bound by one socket).
fn open_sequence_log(
    d: &mut Daemon<NftFirewall>,
    old: Option<AsyncFd<SequenceLog>>,
) -> anyhow::Result<Option<AsyncFd<SequenceLog>>> {
    drop(old);
    let Some(group) = sequence_group(d) else {
        return Ok(None);
    };
    let log = SequenceLog::open(group, crate::ruleset::sequence::LOG_SNAPLEN)
        .and_then(SequenceLog::register)
        .with_context(|| {
            format!("cannot listen on netfilter log group {group} (sequence.log_group; is another program, ulogd say, bound to it?)")
        })?;
    info!(target: AUDIT, event = "sequence", group, keys = d.core().sequencer().map_or(0, super::sequencer::Sequencer::key_count),
        "listening for completed port sequences");
    Ok(Some(log))
}

/// Waits until the sequence log has packets (forever without one).
async fn readable(
    log: Option<&mut AsyncFd<SequenceLog>>,
) -> std::io::Result<tokio::io::unix::AsyncFdReadyMutGuard<'_, SequenceLog>> {
    match log {
        Some(log) => log.readable_mut().await,
        None => std::future::pending().await,
    }
}

/// Books (or closes again) what completed sequences opened, one line each.
fn on_sequences(
    daemon: &Shared,
    ready: std::io::Result<tokio::io::unix::AsyncFdReadyMutGuard<'_, SequenceLog>>,
) {
    let Ok(mut ready) = ready else { return };
    let (taken, lost) = ready.get_inner_mut().take_all();
    // Readiness is cleared only once the socket is drained: it is edge-triggered, and
    // reports left behind would wait for the next completion.
    let logged = match taken {
        Ok((logged, drained)) => {
            if drained {
                ready.clear_ready();
            }
            Ok(logged)
        }
        Err(e) => {
            ready.clear_ready();
            Err(e)
        }
    };
    book_sequences(daemon, logged, lost);
}

/// Books what the sequence log holds now, without waiting: before an expiry pass, so
/// that a grant a sequence just extended in the kernel is not closed as if it had
/// not been (its readiness stays set: the next turn finds the log empty).
fn drain_sequences(daemon: &Shared, listener: &mut SequenceListener) {
    if let Some(log) = listener.log.as_mut() {
        let (taken, lost) = log.get_mut().take_all();
        book_sequences(daemon, taken.map(|(logged, _)| logged), lost);
    }
}

/// Books (or closes again) what completed sequences opened, one line each.
fn book_sequences(daemon: &Shared, logged: std::io::Result<Vec<Logged>>, lost: bool) {
    if lost {
        warn!(target: AUDIT, event = "sequence",
            "the kernel dropped completed-sequence reports (socket full); their grants end on time but are not in `knockgate grants`");
    }
    let logged = match logged {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(target: AUDIT, event = "sequence", error = %format!("{e:#}"), "cannot read the sequence log");
            return;
        }
    };
    let mut d = daemon.borrow_mut();
    let now = UnixMs::now();
    for packet in logged {
        let source = packet.source;
        let touch = packet.touch.and_then(|(proto, port)| {
            let protocol = match proto {
                6 => crate::service::Protocol::Tcp,
                17 => crate::service::Protocol::Udp,
                _ => return None,
            };
            Some(crate::sequence::Touch { protocol, port })
        });
        if packet.prefix == REFUSED_PREFIX {
            let key = d
                .core()
                .sequence_key(packet.mark, touch, now)
                .map(|c| c.key.to_string());
            warn!(target: AUDIT, event = "refuse", source = %source, reason = "sequence-used",
                key = key.as_deref().unwrap_or("?"),
                "sequence refused: its last touch was already used (a replay), or the grant set is full");
            continue;
        }
        if packet.prefix != OPENED_PREFIX {
            continue;
        }
        match d.core().sequence_completed(packet.mark, source, touch, now) {
            SequenceOutcome::Opened {
                completed,
                record,
                kind,
            } => info!(
                target: AUDIT,
                event = "grant",
                id = %record.id,
                service = %record.service,
                address = %record.address,
                source = %source,
                who = %record.who,
                key = %completed.key,
                expires_at = record.expires_at,
                ttl_secs = completed.ttl.as_secs(),
                extended = kind == crate::grants::Granted::Extended,
                "port sequence completed"
            ),
            SequenceOutcome::Refused { completed, reason } => warn!(
                target: AUDIT, event = "refuse", source = %source, reason = "sequence-policy",
                key = %completed.key, service = %completed.service, detail = %reason,
                "port sequence completed, grant closed again"
            ),
            SequenceOutcome::Unknown => warn!(target: AUDIT, event = "sequence", source = %source,
                mark = packet.mark, "completed sequence of no key in force (a config reloaded twice since?)"),
        }
    }
}

/// Writes the sequences of the step about to begin.
fn write_sequences(daemon: &Shared) {
    let mut d = daemon.borrow_mut();
    let now = UnixMs::now();
    let started = std::time::Instant::now();
    match d.core().write_sequences(now) {
        Ok(0) => {}
        Ok(n) => tracing::debug!(
            elements = n,
            write_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
            "sequences written for the next step"
        ),
        Err(e) => tracing::error!(target: AUDIT, event = "sequence", error = %format!("{e:#}"),
            "cannot write the next step's sequences; they open nothing until the next write"),
    }
}

/// Closes the grants whose time is up and books them as ended, one log line each
/// (saying whether knockgated closed the port now or the kernel's timeout did).
fn expire(daemon: &Shared) {
    let ended = daemon.borrow_mut().core().expire_all(UnixMs::now());
    for window in ended.windows {
        info!(target: AUDIT, event = "egress-expire", id = %window.id, scope = %window.scope,
            who = %window.who, command = ?window.command, "egress window ended");
    }
    if let Some((count, e)) = ended.close_failed {
        tracing::warn!(target: AUDIT, event = "expire", grants = count, error = %format!("{e:#}"),
            "cannot close grants at their end; their kernel timeouts close them within a few ticks");
    }
    for (record, closer) in ended
        .closed
        .into_iter()
        .map(|r| (r, "knockgated"))
        .chain(ended.timed_out.into_iter().map(|r| (r, "kernel timeout")))
    {
        info!(target: AUDIT, event = "expire", id = %record.id, service = %record.service,
            address = %record.address, who = %record.who, closed_by = closer, "grant ended");
    }
}

/// The loop's periodic duties, kept as deadlines rather than sleeps made anew each
/// turn: the loop turns for every knock, admin request and timer, and a sleep
/// restarted each time never ends while they come more often than it lasts (under
/// systemd the watchdog then killed the daemon).
struct Beats {
    /// Half of systemd's watchdog period, when it asks for pings.
    watchdog: Option<Duration>,
    next_ping: tokio::time::Instant,
    /// When the refusal counts are next summarised (SUMMARY_EVERY after the first
    /// count of a quiet spell).
    summary_due: tokio::time::Instant,
}

impl Beats {
    fn new(watchdog: Option<Duration>) -> Self {
        let now = tokio::time::Instant::now();
        Self {
            watchdog,
            next_ping: now + watchdog.unwrap_or(IDLE_EXPIRY_CHECK),
            summary_due: now + SUMMARY_EVERY,
        }
    }

    fn watchdog_due(&self) -> tokio::time::Instant {
        self.next_ping
    }

    fn fed(&mut self) {
        self.next_ping = tokio::time::Instant::now() + self.watchdog.unwrap_or(IDLE_EXPIRY_CHECK);
    }

    fn summarised(&mut self) {
        self.summary_due = tokio::time::Instant::now() + SUMMARY_EVERY;
    }
}

/// When the run loop must next wake up for each of its timers.
struct Timers {
    next_expiry: Duration,
    book_due: Option<tokio::time::Instant>,
    trial: Option<Duration>,
    sequences_due: Option<Duration>,
}

impl Timers {
    fn of(d: &mut Daemon<NftFirewall>) -> Self {
        let trial = d
            .trial_due()
            .map(|at| at.saturating_duration_since(std::time::Instant::now()));
        let core = d.core();
        Self {
            next_expiry: core
                .next_expiry(UnixMs::now())
                .map_or(IDLE_EXPIRY_CHECK, |d| d.min(IDLE_EXPIRY_CHECK)),
            book_due: core
                .book_dirty_since()
                .map(|since| tokio::time::Instant::from_std(since + BOOK_SAVE_DELAY)),
            trial,
            sequences_due: core.next_sequence_write(UnixMs::now()),
        }
    }
}

/// The firewall (asked to lock the table when `tamper = "lock"`) and the watch on its
/// table, opened before the first replace so that every later change is seen.
fn open_firewall(loaded: &Loaded) -> anyhow::Result<(NftFirewall, AsyncFd<TamperWatch>)> {
    let mut firewall = NftFirewall::open()?;
    firewall.want_lock(loaded.config.tamper == Tamper::Lock);
    let watch = TamperWatch::open(&mut firewall, &loaded.config.table)?
        .register()
        .context("cannot watch nftables notifications")?;
    Ok((firewall, watch))
}

/// Logs what is in force and tells the service manager: ready only now, with the
/// baseline in the kernel and both sockets listening.
fn announce_ready(d: &mut Daemon<NftFirewall>, admin_path: &std::path::Path) {
    let (port, tamper) = (d.loaded().config.knock.port, d.loaded().config.tamper);
    let table = d.ruleset().table.clone();
    let keys = d.core().key_count();
    // The tick grants are rounded up to (measured once, before the first grant).
    let kernel_hz = crate::clock::kernel_timer().hz();
    info!(target: AUDIT, event = "listen", port, keys, admin_socket = %admin_path.display(),
        server_id = %d.loaded().server_id.as_str(), kernel_hz, "listening for knocks and admin requests");
    log_lock(tamper, d.core().firewall_mut().lock(), &table);
    if let Err(e) = sd_notify::notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status("baseline applied; listening"),
    ]) {
        warn!(error = %e, "cannot tell the service manager we are ready");
    }
}

/// Logs whether the table is locked against other processes, and what that means.
fn log_lock(tamper: Tamper, lock: TableLock, table: &str) {
    match (tamper, lock) {
        (Tamper::Lock, TableLock::Locked) => info!(target: AUDIT, event = "lock", table,
            "table locked: only knockgated can change it; it stays when knockgated stops"),
        (Tamper::Lock, _) => warn!(target: AUDIT, event = "lock", table,
            "this kernel cannot lock the table (owner+persist need Linux 6.9); changes by others will be repaired"),
        (Tamper::Repair, _) => info!(target: AUDIT, event = "lock", table,
            "table not locked (tamper = repair); changes by others will be repaired"),
        (Tamper::Warn, _) => info!(target: AUDIT, event = "lock", table,
            "table not locked (tamper = warn); changes by others will only be logged"),
    }
}

/// Acts on what the notification watch saw: a warning always; a repair unless
/// `tamper = "warn"`.
/// The tamper watch woke: what it saw, to [`on_tamper`].
fn tamper_seen(
    daemon: &Shared,
    tamper: Tamper,
    ready: std::io::Result<tokio::io::unix::AsyncFdReadyMutGuard<'_, TamperWatch>>,
) {
    let Ok(mut ready) = ready else { return };
    // The firewall reads the watch's socket (a duplicate of this one), so that its
    // account can move over other processes' commits to other tables. In bounded
    // helpings: while it has not read it empty the watch stays ready, and the loop
    // comes back to it after a turn for everything else.
    if daemon.borrow_mut().core().firewall_mut().hear_some() {
        ready.clear_ready();
    }
    heed_heard(daemon, tamper);
}

/// Whatever the firewall heard (when the watch woke the loop, or when it read the
/// watch itself to bring its account up to date) is handled here, at every turn of
/// the loop. A big commit (a start, reload or repair with many grants) is made with
/// the watch out of the notification group; if anyone else committed meanwhile, that
/// is handled as lost notifications.
fn heed_heard(daemon: &Shared, tamper: Tamper) {
    let heard = daemon.borrow_mut().core().firewall_mut().take_heard();
    on_tamper(daemon, tamper, &heard);
}

fn on_tamper(daemon: &Shared, tamper: Tamper, seen: &Tampering) {
    if seen.is_empty() {
        return;
    }
    // The generation tells whether anyone else committed since knockgated's last
    // whole-table change (and its own changes after it, chained). If not, what was
    // seen is already undone: notifications lost to the daemon's own big replace
    // (without this, a repair of a large table would overflow the watch and repair
    // forever), or the rest of a foreign transaction whose first part a repair already
    // answered (a flush of a 100,000-element table arrives in several datagrams).
    if daemon
        .borrow_mut()
        .core()
        .firewall_mut()
        .unchanged_since_own()
    {
        if seen.changes.is_empty() {
            info!(target: AUDIT, event = "tamper", changes = "notifications lost", action = "none",
                "nftables notifications were lost, but no other process has committed since knockgated's last change; nothing to repair");
        } else {
            info!(target: AUDIT, event = "tamper", changes = %seen.summary(), action = "none",
                "notifications of a change made before knockgated's last repair or replace; nothing left to repair");
        }
        return;
    }
    let (changes, by) = (seen.summary(), seen.by.join(", "));
    if seen.changes.is_empty() {
        // Only notifications lost: someone committed, perhaps to another table.
        lost_and_committed(daemon, tamper, &changes);
        return;
    }
    if tamper == Tamper::Warn {
        warn!(target: AUDIT, event = "tamper", changes = %changes, by = %by, action = "none",
            "knockgate's table was changed by another process; left as it is (tamper = warn)");
        return;
    }
    let started = std::time::Instant::now();
    let result = daemon.borrow_mut().repair(UnixMs::now());
    match result {
        Ok(restored) => warn!(target: AUDIT, event = "tamper", changes = %changes, by = %by,
            action = "repaired", restored_elements = restored, repair_us = started.elapsed().as_micros(),
            "knockgate's table was changed by another process; baseline and booked grants re-applied"),
        Err(e) => tracing::error!(target: AUDIT, event = "tamper", changes = %changes, by = %by,
            action = "repair-failed", error = %format!("{e:#}"),
            "knockgate's table was changed by another process and could not be repaired"),
    }
}

/// Notifications were lost (or not heard during a big replace) while another process
/// committed: what it changed is not known, so the table is re-applied as a
/// precaution (or, with `tamper = "warn"`, only logged).
fn lost_and_committed(daemon: &Shared, tamper: Tamper, changes: &str) {
    if tamper == Tamper::Warn {
        warn!(target: AUDIT, event = "tamper", changes, action = "none",
            "nftables notifications were lost while another process committed; knockgate's table may have been changed (tamper = warn)");
        return;
    }
    let started = std::time::Instant::now();
    let result = daemon.borrow_mut().repair(UnixMs::now());
    match result {
        Ok(restored) => warn!(target: AUDIT, event = "tamper", changes, action = "repaired",
            restored_elements = restored, repair_us = started.elapsed().as_micros(),
            "nftables notifications were lost while another process committed (to any table); baseline and booked grants re-applied as a precaution"),
        Err(e) => {
            tracing::error!(target: AUDIT, event = "tamper", changes, action = "repair-failed",
            error = %format!("{e:#}"),
            "nftables notifications were lost while another process committed, and the table could not be re-applied");
        }
    }
}

/// Where the daemon reads a requester's cgroup, for command-scoped egress windows.
fn cgroup_root() -> Option<Rc<std::path::Path>> {
    match crate::cgroup::cgroup2_root() {
        Ok(root) => Some(Rc::from(root.as_path())),
        Err(e) => {
            tracing::warn!(error = %e, "no cgroup2 file system: command-scoped egress windows will be refused (--host-wide still works)");
            None
        }
    }
}

fn answer(
    daemon: &Shared,
    request: Request,
    peer: &admin::Peer,
) -> (Response, Option<admin::OnClose>) {
    let response = respond(daemon, request, peer);
    let on_close = match &response {
        Response::WindowOpened { window, .. } => {
            let (daemon, id) = (Rc::clone(daemon), window.id.clone());
            let close: admin::OnClose = Box::new(move || {
                // Already closed by revoke or expiry: nothing to do.
                match daemon.borrow_mut().core().close_window(&id, UnixMs::now()) {
                    Ok(Some(window)) => {
                        info!(target: AUDIT, event = "egress-close", id = %window.id, scope = %window.scope,
                            who = %window.who, "egress window closed: its requester is gone");
                    }
                    Ok(None) => {}
                    Err(e) => tracing::error!(target: AUDIT, event = "egress-close", id = %id,
                        error = %format!("{e:#}"),
                        "egress window's requester is gone, but its elements could not all be removed; the kernel's timeout ends them"),
                }
            });
            Some(close)
        }
        _ => None,
    };
    (response, on_close)
}

/// Puts `config` (with `text`) on trial for `confirm_secs`.
fn apply(daemon: &Shared, config: &std::path::Path, text: &str, confirm_secs: u64) -> Response {
    let confirm = Duration::from_secs(confirm_secs);
    let result = daemon
        .borrow_mut()
        .apply_trial(config, text, confirm, unix_now());
    match result {
        Ok(deadline) => Response::Applied { deadline },
        Err(e) => {
            let code = if matches!(e, super::ReloadError::Firewall(_)) {
                "failed"
            } else {
                "bad_request"
            };
            Response::error(code, format!("{e:#}"))
        }
    }
}

/// Reloads the config; logs the outcome either way.
fn reload(daemon: &Shared, by: &str) -> Response {
    let result = daemon.borrow_mut().reload();
    match result {
        Ok(()) => {
            let rules = daemon.borrow().ruleset().rule_count();
            info!(target: AUDIT, event = "reload", by, rules, "config reloaded");
            Response::Reloaded { rules }
        }
        Err(e) => {
            let message = format!("{e:#}");
            tracing::warn!(target: AUDIT, event = "reload-refused", by, error = %message,
                "config not reloaded; the previous one stays in force");
            let code = if matches!(e, super::ReloadError::Firewall(_)) {
                "failed"
            } else {
                "bad_request"
            };
            Response::error(code, message)
        }
    }
}

fn respond(daemon: &Shared, request: Request, peer: &admin::Peer) -> Response {
    if matches!(
        request,
        Request::Reload | Request::Apply { .. } | Request::Confirm
    ) {
        let allowed = admin::may_change_config(peer, &daemon.borrow().loaded().config.admin);
        if let Err(why) = allowed {
            tracing::warn!(target: AUDIT, event = "admin-refuse", uid = peer.uid, pid = ?peer.pid,
                request = request.name(), reason = %why, "config change refused");
            return Response::error("forbidden", why);
        }
    }
    match request {
        Request::Reload => return reload(daemon, &format!("uid {}", peer.uid)),
        Request::Apply {
            config,
            text,
            confirm_secs,
        } => return apply(daemon, &config, &text, confirm_secs),
        Request::Confirm => {
            return match daemon.borrow_mut().confirm() {
                Ok(path) => Response::Confirmed { path },
                Err(e) => Response::error("not_found", format!("{e:#}")),
            };
        }
        _ => {}
    }
    let mut d = daemon.borrow_mut();
    let table = d.ruleset().table.clone();
    let server_id = d.loaded().server_id.as_str().to_owned();
    let knock_port = d.loaded().config.knock.port;
    let status = |core: &mut super::core::Core<NftFirewall>| Response::Status {
        table,
        server_id,
        knock_port,
        keys: core.key_count(),
        grants: core.grants(UnixMs::now()).len(),
        sequence_keys: core
            .sequencer()
            .map_or(0, super::sequencer::Sequencer::key_count),
        junk_dropped: core.junk_dropped(),
        knocks_refused: core.knocks_refused(),
    };
    admin::dispatch(d.core(), status, request, peer, UnixMs::now())
}
