//! The daemon's life: apply the baseline, wait for SIGTERM/SIGINT, and on stop
//! keep the baseline (fail closed) or remove exactly knockgate's own table.
//!
//! Generic over [`Firewall`], so the start/stop decisions are unit-tested with the
//! in-memory firewall. Every decision is logged on the audit target.

mod admin;
pub mod core;
mod keepalive;
mod listener;
mod peer;
mod repair;
mod run;
pub mod sequencer;
mod stamp;
mod trial;

pub use run::run;

use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use self::core::{BOOK_FILE, Core, REPLAY_CAPACITY, Settings};
use sequencer::Sequencer;

use crate::clock::UnixMs;
use crate::config::{Loaded, OnStop};
use crate::firewall::{Firewall, FirewallError};
use crate::grants::{GrantBook, WindowScope, new_id};
use crate::logging::AUDIT;
use crate::policy::{KeyRing, Limits};
use crate::ruleset::baseline::{EGRESS_CGROUPS, EGRESS_HOST, EGRESS_TO_V4, EGRESS_TO_V6};
use crate::ruleset::{Element, ElementKey, Hook, IpFamily, Ruleset, baseline};
use crate::state::{ReplayLog, StateError};

/// Why the daemon could not start. The baseline goes into the kernel first, so
/// any failure after it (state directory, sockets) leaves the host locked down,
/// not open: fail closed.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The state directory is unusable (the baseline is already in force).
    #[error(transparent)]
    State(#[from] StateError),
    /// The kernel refused the baseline.
    #[error("cannot apply the baseline")]
    Firewall(#[from] FirewallError),
}

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The new config (or a key file) is bad.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The kernel refused the new baseline.
    #[error("the kernel refused the new baseline")]
    Firewall(#[from] FirewallError),
    /// An `apply --confirm` waits for its confirmation or rollback.
    #[error(
        "a config applied with --confirm is waiting: run `knockgate confirm`, or wait for its rollback"
    )]
    TrialPending,
    /// A key that only a restart can change.
    #[error("`{0}` cannot change on reload; restart knockgated")]
    NeedsRestart(&'static str),
}

/// Whether `set`'s contents (grants of every service, bans, egress windows) survive
/// a re-apply: every set whose elements end on their own time. Meters start empty.
fn is_live(set: &crate::ruleset::SetDef) -> bool {
    matches!(
        set.kind,
        crate::ruleset::SetKind::Grants
            | crate::ruleset::SetKind::RuleGrants { .. }
            | crate::ruleset::SetKind::Bans { .. }
            | crate::ruleset::SetKind::SeqUsed { .. }
    )
}

/// Fills the sequence maps of `ruleset` with what `sequencer` says they hold now
/// (a replace empties them, and they are the daemon's to write, never read back).
fn fill_sequences(ruleset: &mut Ruleset, sequencer: Option<&mut Sequencer>, now: UnixMs) {
    let Some(sequencer) = sequencer else { return };
    let mut elements = sequencer.elements(now);
    for set in &mut ruleset.sets {
        if set.kind == crate::ruleset::SetKind::SeqMap {
            set.elements = elements.remove(set.name.as_str()).unwrap_or_default();
        }
    }
}

/// Grants still open at a start that get a log line each; the rest get one line.
const RECOVER_LINES: usize = 100;

/// A running daemon: its core and the ruleset it applied.
pub struct Daemon<F: Firewall> {
    core: Core<F>,
    loaded: Loaded,
    ruleset: Ruleset,
    /// A config applied with `apply --confirm` and not yet confirmed.
    trial: Option<trial::Trial>,
}

/// The book file and its digest (a missing file: an empty book and no digest). The
/// file is read once: with a million grants it is 64 MB.
fn read_book(path: &Path) -> Result<(GrantBook, Option<String>), StateError> {
    match std::fs::read(path) {
        Ok(bytes) => {
            let digest = stamp::digest(&bytes);
            Ok((GrantBook::from_file(bytes, path)?, Some(digest)))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok((GrantBook::default(), None)),
        Err(source) => Err(StateError::File {
            path: path.to_owned(),
            source,
        }),
    }
}

impl<F: Firewall> Daemon<F> {
    /// Applies the baseline built from `loaded` in one transaction, carrying the
    /// grants and bans the kernel holds with their remaining time, then opens the
    /// state directory and reconciles the grant book with the kernel. The baseline
    /// comes first so that nothing that can fail leaves the host without it.
    /// `now` is the wall clock (milliseconds).
    pub fn start(
        mut firewall: F,
        loaded: Loaded,
        keys: KeyRing,
        now: UnixMs,
    ) -> Result<Self, StartError> {
        let first_takeover = !firewall.table_exists(&loaded.config.table)?;
        let state_dir = loaded.config.knock.state_dir.clone();
        let book_path = state_dir.join(BOOK_FILE);
        // What the book file holds now, as a stamp names it (a missing file: nothing).
        // A book that cannot be read is never vouched for, whatever a stamp says of
        // its bytes: its grant sets are read back.
        let (mut book, book_digest) = match read_book(&book_path) {
            Ok(read) => read,
            Err(e) => {
                warn!(error = %format!("{e:#}"), "cannot read the grant book; rebuilding it from the kernel");
                (GrantBook::default(), None)
            }
        };
        let services = crate::service::port_services(&loaded.config);
        let keep = if first_takeover {
            Vec::new()
        } else {
            kept_at_start(
                &mut firewall,
                &loaded,
                book_digest.as_deref().unwrap_or_default(),
                &book_path,
                &services,
            )
        };
        let mut ruleset = baseline_with_live_elements(&mut firewall, &loaded, &keep)?;
        let mut sequencer = Sequencer::new(&loaded.config, &keys, &loaded.server_id);
        fill_sequences(&mut ruleset, sequencer.as_mut(), now);
        let started = Instant::now();
        let keep = apply(&mut firewall, &mut ruleset, keep)?;
        log_applied(&loaded, &ruleset, &keep, started.elapsed());
        if first_takeover {
            adopt_connections(&mut firewall, loaded.config.conntrack_mark);
        }
        let replay = ReplayLog::open(&state_dir, REPLAY_CAPACITY, now.secs())?;
        let names: Vec<&str> = services.iter().map(|s| s.name.as_str()).collect();
        let mut changed = false;
        for gone in book.drop_services_except(&names) {
            changed = true;
            info!(target: AUDIT, event = "expire", id = %gone.id, service = %gone.service,
                address = %gone.address, who = %gone.who,
                "grant ended: its service is no longer in the config");
        }
        for service in &services {
            let sets = [IpFamily::V4, IpFamily::V6].map(|f| service.grant_set(f));
            if sets.iter().all(|s| keep.contains(s)) {
                // The book is exact for these (nobody committed since it was saved).
                continue;
            }
            changed = true;
            let live: Vec<Element> = ruleset
                .sets
                .iter()
                .filter(|s| sets.contains(&s.name))
                .flat_map(|s| s.elements.iter().copied())
                .collect();
            book.reconcile(&service.name, &live, now, new_id);
        }
        let windows: Vec<(WindowScope, Option<Duration>)> = ruleset
            .sets
            .iter()
            .filter(|s| {
                [EGRESS_CGROUPS, EGRESS_HOST, EGRESS_TO_V4, EGRESS_TO_V6].contains(&s.name.as_str())
            })
            .flat_map(|s| s.elements.iter())
            .filter_map(|e| match e.key {
                ElementKey::Cgroup(id) | ElementKey::CgroupAddr(id, _) => {
                    Some((WindowScope::Cgroup(id), e.expires_in))
                }
                ElementKey::Proto(_) => Some((WindowScope::Host, e.expires_in)),
                _ => None,
            })
            .collect();
        changed |= !windows.is_empty() || book.windows().next().is_some();
        book.reconcile_windows(&windows, now, new_id);
        // One line per grant up to a point: with 100,000 grants the journal gets a count.
        for record in book.iter().take(RECOVER_LINES) {
            info!(target: AUDIT, event = "recover", id = %record.id, service = %record.service, address = %record.address,
                who = %record.who, expires_at = record.expires_at, "grant still open from before the start");
        }
        if book.len() > RECOVER_LINES {
            info!(target: AUDIT, event = "recover", grants = book.len(), logged = RECOVER_LINES,
                "more grants still open from before the start; `knockgate grants` lists them all");
        }
        let settings = settings(&loaded, book_path);
        let mut core = Core::new(firewall, settings, keys, replay, book);
        core.set_sequencer(sequencer);
        if changed {
            core.book_changed();
        } else if let Some(digest) = book_digest {
            core.book_on_disk(digest);
        }
        Ok(Self {
            core,
            loaded,
            ruleset: ruleset.without_elements(),
            trial: None,
        })
    }

    /// Re-reads the config file and its keys and applies the new baseline in one
    /// transaction, carrying the live grants, bans and windows. On any error the old
    /// config and ruleset stay in force. The table name and the state directory
    /// cannot change without a restart.
    pub fn reload(&mut self) -> Result<(), ReloadError> {
        if self.trial.is_some() {
            return Err(ReloadError::TrialPending);
        }
        let loaded = crate::config::load(&self.loaded.path)?;
        let keys = crate::config::load_keys(&loaded)?;
        self.switch_to(loaded, keys).map(drop)
    }

    /// Applies `loaded` (and `keys`) in place of the config in force, carrying live
    /// state; on any error nothing changes. Returns the grants it closed because
    /// their service is gone (a rollback puts them back).
    fn switch_to(
        &mut self,
        loaded: Loaded,
        keys: KeyRing,
    ) -> Result<Vec<crate::grants::GrantRecord>, ReloadError> {
        if loaded.config.table != self.loaded.config.table {
            return Err(ReloadError::NeedsRestart("table"));
        }
        if loaded.config.knock.state_dir != self.loaded.config.knock.state_dir {
            return Err(ReloadError::NeedsRestart("knock.state_dir"));
        }
        let now = UnixMs::now();
        let started = Instant::now();
        let keep = self.keep_on_reload(&loaded);
        let mut ruleset = self.ruleset_from_book(&loaded, now, repair::BanRead::Required, &keep)?;
        let mut sequencer = Sequencer::new(&loaded.config, &keys, &loaded.server_id);
        fill_sequences(&mut ruleset, sequencer.as_mut(), now);
        let keep = if keep.is_empty() {
            self.core.firewall_mut().replace(&ruleset)?;
            keep
        } else if let Err(e) = self.core.firewall_mut().replace_keeping(&ruleset, &keep) {
            // As after someone else's change: grants and windows from the book, bans
            // from the kernel, the table whole.
            log_not_kept(&e);
            ruleset = self.ruleset_from_book(&loaded, now, repair::BanRead::Required, &[])?;
            fill_sequences(&mut ruleset, sequencer.as_mut(), now);
            self.core.firewall_mut().replace(&ruleset)?;
            Vec::new()
        } else {
            keep
        };
        log_applied(&loaded, &ruleset, &keep, started.elapsed());
        let book_path = loaded.config.knock.state_dir.join(BOOK_FILE);
        let dropped = self.core.reconfigure(settings(&loaded, book_path), keys);
        self.core.set_sequencer(sequencer);
        for gone in &dropped {
            info!(target: AUDIT, event = "expire", id = %gone.id, service = %gone.service,
                address = %gone.address, who = %gone.who,
                "grant closed: its service was removed from the config");
        }
        self.loaded = loaded;
        self.ruleset = ruleset.without_elements();
        Ok(dropped)
    }

    /// The sets a reload may leave in place: the sets whose contents are the kernel's
    /// own truth (bans, used sequence steps: always read back and carried anyway), and
    /// the grant sets only while every commit since the last whole replace was the
    /// daemon's own (then they hold exactly what the book says, and copying a million
    /// of them back in is waste; otherwise the book fills them anew, as after any change
    /// by someone else) — each only if the table holds it with the same shape.
    fn keep_on_reload(&mut self, loaded: &Loaded) -> Vec<String> {
        let ruleset = baseline(&loaded.config, &loaded.resolvers);
        let firewall = self.core.firewall_mut();
        let mut candidates = kernel_truth_sets(&ruleset);
        if firewall.unchanged_since_own() {
            let services = crate::service::port_services(&loaded.config);
            candidates.extend(grant_sets_to_keep(&ruleset, &services));
        }
        let names: Vec<&str> = candidates.iter().map(String::as_str).collect();
        keepable_or_none(firewall, &ruleset, &names)
    }

    /// The ruleset in force.
    #[must_use]
    pub fn ruleset(&self) -> &Ruleset {
        &self.ruleset
    }

    /// The daemon's decisions.
    pub fn core(&mut self) -> &mut Core<F> {
        &mut self.core
    }

    /// The config it runs with.
    #[must_use]
    pub fn loaded(&self) -> &Loaded {
        &self.loaded
    }

    /// Stops: leaves the baseline (and the grants, which end on time in the kernel) in
    /// place unless `on_stop = "remove"`, in which case exactly knockgate's table (and
    /// no other) is deleted.
    pub fn shutdown(&mut self) -> Result<(), FirewallError> {
        self.core.save_book_and_wait();
        let table = self.ruleset.table.clone();
        match self.loaded.config.on_stop {
            OnStop::Keep => info!(
                target: AUDIT,
                event = "stop",
                table = %table,
                "stopping; baseline stays in force (on_stop = keep)"
            ),
            OnStop::Remove => {
                self.core.firewall_mut().remove(&table)?;
                info!(
                    target: AUDIT,
                    event = "remove",
                    table = %table,
                    "stopping; table removed (on_stop = remove)"
                );
            }
        }
        Ok(())
    }

    /// [`Daemon::shutdown`], then hands the firewall back (tests reuse it).
    pub fn stop(mut self) -> Result<F, FirewallError> {
        self.shutdown()?;
        Ok(self.core.into_firewall())
    }
}

/// Marks the connections that were up before knockgate's table existed, so its
/// established rules (which require the mark) carry them on: an admin's SSH session
/// survives the first start. Never again after that: a connection that appears
/// unmarked later got in while the table was gone, and stays cut off.
fn adopt_connections<F: Firewall>(firewall: &mut F, mark: u32) {
    match firewall.mark_connections(mark) {
        Ok(adopted) => info!(target: AUDIT, event = "adopt", marked = adopted.marked,
            gone = adopted.gone, cut_off = adopted.cut_off,
            "connections that were up before the first start are kept"),
        Err(e) => warn!(target: AUDIT, event = "adopt", error = %format!("{e:#}"),
            "cannot mark the connections that were up before the first start; they will be cut"),
    }
}

/// The grant sets a start may leave in place, elements and all: only when the book's
/// stamp says nobody committed anything since the book was saved (this boot, this
/// namespace, the kernel still at the saved generation — then the book is exact for
/// them), and only those the table holds with the same shape, by service (both
/// families or neither, as the book is reconciled per service). Sets port sequences add
/// to are always read back: the packet path writes them without a commit.
fn kept_at_start<F: Firewall>(
    firewall: &mut F,
    loaded: &Loaded,
    book_digest: &str,
    book_path: &std::path::Path,
    services: &[crate::service::PortService],
) -> Vec<String> {
    let ruleset = baseline(&loaded.config, &loaded.resolvers);
    let stamp = crate::grants::KernelStamp::load(&stamp::path_beside(book_path));
    let netns = firewall.namespace();
    let resumed = stamp.is_some_and(|s| {
        stamp::is_here(&s, book_digest, netns) && firewall.resume_accounting(s.generation)
    });
    let mut candidates = kernel_truth_sets(&ruleset);
    if resumed {
        candidates.extend(grant_sets_to_keep(&ruleset, services));
    } else {
        info!(target: AUDIT, event = "recover", table = %loaded.config.table,
            "the kernel may have changed since the grant book was saved; reading its grant sets back");
    }
    let names: Vec<&str> = candidates.iter().map(String::as_str).collect();
    let keepable = keepable_or_none(firewall, &ruleset, &names);
    // Grant sets by service, both families or neither (the book is reconciled per
    // service); the others one by one.
    let grant_sets: Vec<[String; 2]> = services
        .iter()
        .map(|s| [IpFamily::V4, IpFamily::V6].map(|f| s.grant_set(f)))
        .collect();
    keepable
        .iter()
        .filter(|set| {
            grant_sets
                .iter()
                .find(|pair| pair.contains(set))
                .is_none_or(|pair| pair.iter().all(|s| keepable.contains(s)))
        })
        .cloned()
        .collect()
}

/// [`Firewall::keepable`], or nothing (the table replaced whole, as always) when the
/// table cannot be read to tell.
fn keepable_or_none<F: Firewall>(
    firewall: &mut F,
    ruleset: &Ruleset,
    names: &[&str],
) -> Vec<String> {
    firewall.keepable(ruleset, names).unwrap_or_else(|e| {
        log_not_kept(&e);
        Vec::new()
    })
}

fn log_not_kept(e: &FirewallError) {
    let cause = std::error::Error::source(e).map(ToString::to_string);
    warn!(target: AUDIT, event = "apply", error = %format!("{e:#}"), cause = ?cause,
        "cannot leave sets in place; replacing the table whole");
}

/// The sets whose contents are the kernel's own truth — bans, and the last steps of
/// sequences already taken — read back and carried by every replace, so they may as
/// well stay where they are when their shape did not change.
fn kernel_truth_sets(ruleset: &Ruleset) -> Vec<String> {
    ruleset
        .sets
        .iter()
        .filter(|d| {
            matches!(
                d.kind,
                crate::ruleset::SetKind::Bans { .. } | crate::ruleset::SetKind::SeqUsed { .. }
            )
        })
        .map(|d| d.name.clone())
        .collect()
}

/// The sets a replace may leave in place when the kernel holds exactly what the book
/// says: every port service's grant sets, except those port sequences add to.
fn grant_sets_to_keep(ruleset: &Ruleset, services: &[crate::service::PortService]) -> Vec<String> {
    services
        .iter()
        .flat_map(|s| [IpFamily::V4, IpFamily::V6].map(|f| s.grant_set(f)))
        .filter(|name| {
            ruleset
                .sets
                .iter()
                .any(|d| d.name == *name && d.kind == crate::ruleset::SetKind::Grants)
        })
        .collect()
}

/// Puts `ruleset` in force, leaving the sets in `keep` as they are; returns the sets
/// it kept. If the kernel will not keep them (one changed or went away meanwhile), they
/// are read back and the table is replaced whole, as it always could be.
fn apply<F: Firewall>(
    firewall: &mut F,
    ruleset: &mut Ruleset,
    keep: Vec<String>,
) -> Result<Vec<String>, FirewallError> {
    if keep.is_empty() {
        firewall.replace(ruleset)?;
        return Ok(keep);
    }
    match firewall.replace_keeping(ruleset, &keep) {
        Ok(()) => Ok(keep),
        Err(e) => {
            log_not_kept(&e);
            for set in ruleset.sets.iter_mut().filter(|s| keep.contains(&s.name)) {
                set.elements = firewall.elements(&ruleset.table, &set.name)?;
                set.trim_to_size();
            }
            firewall.replace(ruleset)?;
            Ok(Vec::new())
        }
    }
}

/// The baseline for `loaded`, with the elements the kernel's live sets hold now
/// (grants, bans, windows with their remaining time) except those in `keep`, which stay
/// where they are; none when there is no table yet. A set that cannot be read is an
/// error, never an empty set: replacing the table with it would drop its grants or bans
/// without a word. The caller then changes nothing, and the table in force stays.
fn baseline_with_live_elements<F: Firewall>(
    firewall: &mut F,
    loaded: &Loaded,
    keep: &[String],
) -> Result<Ruleset, FirewallError> {
    let mut ruleset = baseline(&loaded.config, &loaded.resolvers);
    for set in &mut ruleset.sets {
        if is_live(set) && !keep.contains(&set.name) {
            set.elements = firewall.elements(&ruleset.table, &set.name)?;
            set.trim_to_size();
        }
    }
    carry_counters(firewall, &mut ruleset);
    Ok(ruleset)
}

/// Gives `ruleset`'s named counters the counts the kernel's table has now, so a
/// whole-table replace does not reset them. Best effort: a count is worth a log line,
/// not a refused reload.
fn carry_counters<F: Firewall>(firewall: &mut F, ruleset: &mut Ruleset) {
    match firewall.counters(&ruleset.table) {
        Ok(live) => {
            for counter in &mut ruleset.counters {
                if let Some(now) = live.iter().find(|c| c.name == counter.name) {
                    counter.packets = now.packets;
                    counter.bytes = now.bytes;
                }
            }
        }
        Err(e) => {
            warn!(error = %format!("{e:#}"), "cannot read the table's counters; they start again at 0");
        }
    }
}

/// The core's settings for `loaded`.
fn settings(loaded: &Loaded, book_path: std::path::PathBuf) -> Settings {
    let knock = &loaded.config.knock;
    Settings {
        table: loaded.config.table.clone(),
        server_id: loaded.server_id.clone(),
        skew: knock.skew.0,
        limits: Limits {
            default_ttl: knock.default_ttl.0,
            max_ttl: knock.max_ttl.0,
        },
        ban: knock.ban.enabled.then_some((
            knock.ban.after,
            knock.ban.within.0,
            knock.ban.duration.0,
        )),
        ipv6_prefix: loaded.config.knock.ipv6_prefix,
        book_path,
        egress_max_ttl: loaded.config.egress.max_ttl.0,
        services: crate::service::port_services(&loaded.config),
        egress_service: loaded.config.outbound == crate::config::Outbound::Locked,
        max_grants: usize::try_from(knock.max_grants).unwrap_or(usize::MAX),
    }
}

fn log_applied(loaded: &Loaded, ruleset: &Ruleset, kept: &[String], took: Duration) {
    let carried: usize = ruleset
        .sets
        .iter()
        .filter(|s| !kept.contains(&s.name))
        .map(|s| s.elements.len())
        .sum();
    info!(
        target: AUDIT,
        event = "apply",
        table = %ruleset.table,
        config = %loaded.path.display(),
        rules = ruleset.rule_count(),
        tcp_ports = ?loaded.config.inbound.tcp_ports,
        ssh_port = loaded.config.inbound.ssh_port,
        knock_port = loaded.config.knock.port,
        resolvers = ?loaded.resolvers,
        outbound = ?loaded.config.outbound,
        forward_chain = ruleset.chain(Hook::Forward).is_some(),
        carried_elements = carried,
        kept_sets = %kept.join(","),
        apply_us = took.as_micros(),
        "baseline applied"
    );
    if loaded.resolvers.is_empty() && loaded.config.outbound == crate::config::Outbound::Locked {
        warn!(
            target: AUDIT,
            resolv_conf = %loaded.config.dns.resolv_conf.display(),
            "no DNS resolvers configured or found: this host cannot resolve names"
        );
    }
}

/// The current Unix time in seconds.
#[must_use]
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The address a listener reports, as the firewall sees it.
#[must_use]
pub fn source_of(addr: std::net::SocketAddr) -> IpAddr {
    crate::policy::canonical(addr.ip())
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::config::Config;
    use crate::firewall::memory::MemoryFirewall;

    const NOW: u64 = 1_790_000_000;

    fn loaded(on_stop: OnStop, state: &std::path::Path) -> Loaded {
        let mut config = Config {
            on_stop,
            ..Config::default()
        };
        config.knock.state_dir = state.to_owned();
        Loaded {
            path: PathBuf::from("test.toml"),
            config,
            resolvers: vec!["192.0.2.53".parse().unwrap()],
            server_id: crate::knock::auth::ServerId::new("test").unwrap(),
        }
    }

    fn start(
        fw: MemoryFirewall,
        on_stop: OnStop,
        dir: &tempfile::TempDir,
    ) -> Result<Daemon<MemoryFirewall>, StartError> {
        Daemon::start(
            fw,
            loaded(on_stop, dir.path()),
            KeyRing::default(),
            UnixMs::from_secs(NOW),
        )
    }

    #[test]
    fn start_applies_the_baseline() {
        let dir = tempfile::tempdir().unwrap();
        let daemon = start(MemoryFirewall::default(), OnStop::Keep, &dir).unwrap();
        let want = baseline(&Config::default(), &["192.0.2.53".parse().unwrap()]);
        assert_eq!(daemon.ruleset(), &want.clone().without_elements());
        let fw = daemon.stop().unwrap();
        assert_eq!(fw.tables.get("knockgate"), Some(&want));
    }

    #[test]
    fn refused_start_is_an_error_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let fw = MemoryFirewall {
            refuse_next: true,
            ..MemoryFirewall::default()
        };
        assert!(matches!(
            start(fw, OnStop::Keep, &dir),
            Err(StartError::Firewall(_))
        ));
    }

    #[test]
    fn an_unusable_state_directory_stops_the_start_with_the_baseline_in_force() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, "").unwrap();
        let mut fw = MemoryFirewall::default();
        let result = Daemon::start(
            &mut fw,
            loaded(OnStop::Keep, &file),
            KeyRing::default(),
            UnixMs::from_secs(NOW),
        );
        assert!(matches!(result, Err(StartError::State(_))));
        assert_eq!(fw.commits, 1, "the baseline went in first");
        assert!(
            fw.tables.contains_key("knockgate"),
            "and stays: fail closed"
        );
    }

    #[test]
    fn connections_are_adopted_at_the_first_takeover_only() {
        let dir = tempfile::tempdir().unwrap();
        let mut fw = MemoryFirewall::default();
        fw.connections.insert("admin ssh".into(), 0x1);
        let daemon = start(fw, OnStop::Keep, &dir).unwrap();
        let mut fw = daemon.stop().unwrap();
        assert_eq!(
            fw.connections["admin ssh"],
            0x1 | 0x1000_0000,
            "marked, other bits kept"
        );
        // Later starts find the table (kept at stop) and mark nothing: a connection
        // that shows up unmarked got in while the table was gone.
        fw.connections.insert("while flushed".into(), 0);
        let daemon = start(fw, OnStop::Keep, &dir).unwrap();
        let fw = daemon.stop().unwrap();
        assert_eq!(fw.connections["while flushed"], 0);
    }

    #[test]
    fn grants_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let (mut fw, addr, id) = stopped_with_a_grant(&dir);
        fw.dumped.clear();
        let mut again = start(fw, OnStop::Keep, &dir).unwrap();
        let fw = again.core().firewall_mut();
        assert!(
            !fw.dumped.iter().any(|s| s.contains("_grants_v")),
            "nobody committed since the stop: the grant sets are not read back ({:?})",
            fw.dumped
        );
        assert!(
            fw.kept
                .contains(&crate::ruleset::baseline::SSH_GRANTS_V4.to_owned())
        );
        let grants = again.core().grants(UnixMs::from_secs(NOW + 1));
        assert_eq!(grants.len(), 1);
        assert_eq!(
            (grants[0].id.as_str(), grants[0].address),
            (id.as_str(), addr)
        );
        let fw = again.stop().unwrap();
        let set = fw.tables["knockgate"]
            .sets
            .iter()
            .find(|s| s.name == crate::ruleset::baseline::SSH_GRANTS_V4)
            .unwrap();
        assert_eq!(
            set.elements.len(),
            1,
            "the element was carried across the replace"
        );
    }

    /// A daemon with one grant, stopped; its firewall, the grant's address and its id.
    fn stopped_with_a_grant(dir: &tempfile::TempDir) -> (MemoryFirewall, IpAddr, String) {
        let mut daemon = start(MemoryFirewall::default(), OnStop::Keep, dir).unwrap();
        let addr: IpAddr = "198.51.100.7".parse().unwrap();
        let (record, _, _) = daemon
            .core()
            .open(
                "ssh",
                addr,
                Some(Duration::from_secs(600)),
                "uid 0",
                UnixMs::from_secs(NOW),
            )
            .unwrap();
        (daemon.stop().unwrap(), addr, record.id)
    }

    #[test]
    fn a_commit_by_someone_else_while_stopped_makes_the_start_read_the_grant_sets_back() {
        let dir = tempfile::tempdir().unwrap();
        let (mut fw, addr, _) = stopped_with_a_grant(&dir);
        let stranger: IpAddr = "203.0.113.66".parse().unwrap();
        fw.slip_in(
            "knockgate",
            crate::ruleset::baseline::SSH_GRANTS_V4,
            ElementKey::Addr(stranger),
            Duration::from_secs(60),
        );
        fw.dumped.clear();
        let mut again = start(fw, OnStop::Keep, &dir).unwrap();
        let fw = again.core().firewall_mut();
        assert!(!fw.kept.iter().any(|s| s.contains("_grants_")));
        assert!(
            fw.dumped
                .contains(&crate::ruleset::baseline::SSH_GRANTS_V4.to_owned())
        );
        let mut booked: Vec<(IpAddr, String)> = again
            .core()
            .grants(UnixMs::from_secs(NOW + 1))
            .into_iter()
            .map(|g| (g.address, g.who))
            .collect();
        booked.sort();
        assert_eq!(
            booked,
            vec![
                (addr, "uid 0".to_owned()),
                (stranger, "recovered".to_owned())
            ],
            "the book learns what the kernel holds, as at any start it cannot vouch for"
        );
    }

    #[test]
    fn a_torn_or_missing_stamp_makes_the_start_read_the_grant_sets_back() {
        for damage in ["{\"book_serial\": 1, \"boot", ""] {
            let dir = tempfile::tempdir().unwrap();
            let (mut fw, addr, _) = stopped_with_a_grant(&dir);
            let stamp = stamp::path_beside(&dir.path().join(BOOK_FILE));
            assert!(stamp.exists(), "the stop wrote a stamp");
            std::fs::write(&stamp, damage).unwrap();
            fw.dumped.clear();
            let mut again = start(fw, OnStop::Keep, &dir).unwrap();
            let kept = &again.core().firewall_mut().kept;
            assert!(!kept.iter().any(|s| s.contains("_grants_")), "{damage:?}");
            let grants = again.core().grants(UnixMs::from_secs(NOW + 1));
            assert_eq!(grants.len(), 1, "{damage:?}");
            assert_eq!(grants[0].address, addr);
        }
    }

    /// Starts on `fw` (stopped with a grant for `addr`) and checks that the grant
    /// sets were read back, not kept, and the grant booked `recovered`: not hidden.
    fn starts_reading_the_grant_back(fw: MemoryFirewall, addr: IpAddr, dir: &tempfile::TempDir) {
        let mut again = start(fw, OnStop::Keep, dir).unwrap();
        let kept = &again.core().firewall_mut().kept;
        assert!(!kept.iter().any(|s| s.contains("_grants_")), "{kept:?}");
        let grants = again.core().grants(UnixMs::from_secs(NOW + 1));
        assert_eq!(
            grants
                .iter()
                .map(|g| (g.address, g.who.as_str()))
                .collect::<Vec<_>>(),
            vec![(addr, "recovered")],
            "read back from the kernel, not hidden"
        );
    }

    #[test]
    fn a_book_file_changed_while_stopped_is_not_vouched_for() {
        let dir = tempfile::tempdir().unwrap();
        let (fw, addr, _) = stopped_with_a_grant(&dir);
        // Someone takes the grant out of the book file (or a crash left the book one
        // save ahead of its stamp): the kernel still holds the element.
        std::fs::write(dir.path().join(BOOK_FILE), "{\"grants\": []}").unwrap();
        starts_reading_the_grant_back(fw, addr, &dir);
    }

    #[test]
    fn a_damaged_book_is_not_vouched_for_even_by_a_stamp_naming_its_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let (fw, addr, _) = stopped_with_a_grant(&dir);
        // A book file that reads as damaged (one id twice), and a stamp that names
        // exactly its bytes: the book vouches for nothing it cannot read.
        let damaged = r#"{"version":2,"services":["ssh"],"holders":["uid 0"],"grants":[["000000a1",0,"192.0.2.9",0,1,2],["000000a1",0,"192.0.2.8",0,1,2]],"windows":[]}"#;
        let book_path = dir.path().join(BOOK_FILE);
        std::fs::write(&book_path, damaged).unwrap();
        let stamp_path = stamp::path_beside(&book_path);
        let mut vouching = crate::grants::KernelStamp::load(&stamp_path).expect("a stamp at stop");
        vouching.book_sha256 = stamp::digest(damaged.as_bytes());
        std::fs::write(&stamp_path, vouching.to_json()).unwrap();
        starts_reading_the_grant_back(fw, addr, &dir);
    }

    #[test]
    fn stop_keeps_the_baseline_by_default() {
        let dir = tempfile::tempdir().unwrap();
        let daemon = start(MemoryFirewall::default(), OnStop::Keep, &dir).unwrap();
        let fw = daemon.stop().unwrap();
        assert!(fw.tables.contains_key("knockgate"));
    }

    #[test]
    fn stop_with_remove_deletes_only_our_table() {
        let dir = tempfile::tempdir().unwrap();
        let mut fw = MemoryFirewall::default();
        let other = Ruleset {
            table: "other".into(),
            sets: Vec::new(),
            chains: Vec::new(),
            counters: Vec::new(),
        };
        fw.replace(&other).unwrap();
        let daemon = start(fw, OnStop::Remove, &dir).unwrap();
        let fw = daemon.stop().unwrap();
        assert!(!fw.tables.contains_key("knockgate"));
        assert_eq!(fw.tables.get("other"), Some(&other));
    }

    #[test]
    fn a_rolled_back_trial_puts_back_the_grants_of_a_service_it_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().display().to_string();
        let text = |services: &str| {
            format!(
                "{services}[knock]\nstate_dir = \"{state}\"\n[dns]\nresolvers = [\"192.0.2.53\"]\n"
            )
        };
        let with = text("[[services]]\nname = \"wireguard\"\nprotocol = \"udp\"\nport = 51820\n");
        let path = dir.path().join("k.toml");
        let loaded = crate::config::load_str(&path, &with, std::env::vars()).unwrap();
        let now = UnixMs::now();
        let mut daemon =
            Daemon::start(MemoryFirewall::default(), loaded, KeyRing::default(), now).unwrap();
        let addr: IpAddr = "198.51.100.7".parse().unwrap();
        let (record, _, _) = daemon
            .core()
            .open(
                "wireguard",
                addr,
                Some(Duration::from_secs(600)),
                "uid 0",
                now,
            )
            .unwrap();
        daemon
            .apply_trial(&path, &text(""), Duration::from_secs(30), now.secs())
            .unwrap();
        assert!(daemon.core().grants(now).is_empty(), "the trial closed it");
        daemon.rollback_if_due(Instant::now() + Duration::from_secs(3600));
        let grants = daemon.core().grants(UnixMs::now());
        assert_eq!(grants.len(), 1, "the rollback put it back");
        assert_eq!(
            (grants[0].id.as_str(), grants[0].address),
            (record.id.as_str(), addr)
        );
        let fw = daemon.stop().unwrap();
        let set = fw.tables["knockgate"]
            .sets
            .iter()
            .find(|s| s.name == "wireguard_grants_v4")
            .unwrap();
        assert_eq!(set.elements.len(), 1, "and the kernel holds it again");
    }
}
