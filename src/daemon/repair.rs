//! Tamper repair: after another process changed or deleted knockgate's table, put the
//! baseline of the config in force back, with the grants and windows from the book.
//!
//! The book is the truth, not the kernel: the other process may have emptied the sets
//! (`nft flush ruleset`) or added an address of its own (`nft add element … ssh_grants_v4`),
//! and neither may survive the repair. Bans are the exception: they only ever deny,
//! so the ones the kernel still holds are carried.

use super::Daemon;
use crate::firewall::{Firewall, FirewallError};
use crate::ruleset::baseline::{KNOCK_BAN_V4, KNOCK_BAN_V6};
use crate::ruleset::{Ruleset, baseline};

/// The ban sets, carried from the kernel when they are still there.
const BAN_SETS: [&str; 2] = [KNOCK_BAN_V4, KNOCK_BAN_V6];

impl<F: Firewall> Daemon<F> {
    /// Re-applies the baseline in one transaction with the booked grants and windows
    /// (and the kernel's surviving bans); returns how many elements it put back. On a
    /// refusal nothing changed, as with every replace.
    pub fn repair(&mut self, now: crate::clock::UnixMs) -> Result<usize, FirewallError> {
        let loaded = self.loaded.clone();
        let ruleset = self.ruleset_from_book(&loaded, now, BanRead::BestEffort, &[])?;
        self.core.firewall_mut().replace(&ruleset)?;
        let restored = ruleset.sets.iter().map(|s| s.elements.len()).sum();
        self.ruleset = ruleset.without_elements();
        Ok(restored)
    }

    /// The baseline for `loaded` with the grants and windows of the book (never the
    /// kernel's: an element someone else slipped in, or one a dump skipped while the
    /// kernel collected expired ones, must not decide what is open) and the bans the
    /// kernel holds, at most the sets' size.
    pub(super) fn ruleset_from_book(
        &mut self,
        loaded: &crate::config::Loaded,
        now: crate::clock::UnixMs,
        bans: BanRead,
        keep: &[String],
    ) -> Result<Ruleset, FirewallError> {
        let mut ruleset = baseline(&loaded.config, &loaded.resolvers);
        let mut booked = self.core.booked_elements(now, keep);
        for set in &mut ruleset.sets {
            if keep.contains(&set.name) {
                // Left in place by the replace: nothing to fill in.
                continue;
            }
            if let Some(elements) = booked.remove(set.name.as_str()) {
                set.elements = elements;
            } else if BAN_SETS.contains(&set.name.as_str())
                || set.name == crate::ruleset::sequence::SEQ_USED
            {
                match (
                    self.core.firewall_mut().elements(&ruleset.table, &set.name),
                    bans,
                ) {
                    (Ok(elements), _) => {
                        set.elements = elements;
                        set.trim_to_size();
                    }
                    (Err(e), BanRead::Required) => return Err(e),
                    // The repair must not wait on the bans: a table that cannot be read
                    // back is put right without them, and the log says so.
                    (Err(e), BanRead::BestEffort) => tracing::warn!(target: crate::logging::AUDIT,
                        event = "tamper", set = %set.name, error = %format!("{e:#}"),
                        "cannot read the bans back; the repair drops them"),
                }
            }
        }
        super::carry_counters(self.core.firewall_mut(), &mut ruleset);
        Ok(ruleset)
    }
}

/// Whether a failure to read the kernel's bans stops a whole-table change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum BanRead {
    /// Reload and `apply`: nothing changes rather than losing bans.
    Required,
    /// Repair: the damaged table is put right without them.
    BestEffort,
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use crate::clock::UnixMs;
    use std::path::PathBuf;
    use std::time::Duration;

    use crate::config::{Config, Loaded};
    use crate::daemon::Daemon;
    use crate::firewall::Firewall;
    use crate::firewall::memory::MemoryFirewall;
    use crate::policy::KeyRing;
    use crate::ruleset::ElementKey;
    use crate::ruleset::baseline::{KNOCK_BAN_V4, SSH_GRANTS_V4};

    const NOW: u64 = 1_790_000_000;

    fn daemon(dir: &tempfile::TempDir) -> Daemon<MemoryFirewall> {
        let mut config = Config::default();
        config.knock.state_dir = dir.path().to_owned();
        let loaded = Loaded {
            path: PathBuf::from("test.toml"),
            config,
            resolvers: vec!["192.0.2.53".parse().unwrap()],
            server_id: crate::knock::auth::ServerId::new("test").unwrap(),
        };
        Daemon::start(
            MemoryFirewall::default(),
            loaded,
            KeyRing::default(),
            UnixMs::from_secs(NOW),
        )
        .unwrap()
    }

    /// Puts the daemon's closes on a clock the test sets (µs), at `NOW` seconds.
    fn manual_clock(d: &mut Daemon<MemoryFirewall>) -> std::rc::Rc<std::cell::Cell<u64>> {
        let clock = std::rc::Rc::new(std::cell::Cell::new(NOW * 1_000_000));
        d.core()
            .use_clock(crate::clock::MonoClock::Manual(std::rc::Rc::clone(&clock)));
        clock
    }

    fn keys_of(daemon: &mut Daemon<MemoryFirewall>, set: &str) -> Vec<(ElementKey, u64)> {
        let fw = daemon.core().firewall_mut();
        let mut keys: Vec<_> = fw
            .elements("knockgate", set)
            .unwrap()
            .into_iter()
            .map(|e| (e.key, e.expires_in.map_or(0, |d| d.as_secs())))
            .collect();
        keys.sort_by_key(|(k, _)| format!("{k}"));
        keys
    }

    #[test]
    fn a_flushed_table_comes_back_with_the_booked_grants_and_their_time_left() {
        let dir = tempfile::tempdir().unwrap();
        let mut d = daemon(&dir);
        let clock = manual_clock(&mut d);
        let laptop: IpAddr = "198.51.100.7".parse().unwrap();
        d.core()
            .open(
                "ssh",
                laptop,
                Some(Duration::from_secs(600)),
                "uid 0",
                UnixMs::from_secs(NOW),
            )
            .unwrap();
        let applied = d.ruleset().clone();
        d.core().firewall_mut().tables.clear();

        clock.set((NOW + 100) * 1_000_000);
        let restored = d.repair(UnixMs::from_secs(NOW + 100)).unwrap();

        assert_eq!(restored, 1);
        assert_eq!(
            keys_of(&mut d, SSH_GRANTS_V4),
            vec![(ElementKey::Addr(laptop), 500)]
        );
        let in_force = d.core().firewall_mut().tables["knockgate"].clone();
        let without_elements = in_force.without_elements();
        let want = applied.without_elements();
        assert_eq!(without_elements, want, "the same baseline, rule for rule");
        // The daemon keeps the ruleset in force without its elements (the kernel's).
        assert_eq!(d.ruleset(), &without_elements);
    }

    #[test]
    fn an_address_someone_else_slipped_in_does_not_survive_but_bans_do() {
        let dir = tempfile::tempdir().unwrap();
        let mut d = daemon(&dir);
        let stranger: IpAddr = "203.0.113.66".parse().unwrap();
        let banned: IpAddr = "203.0.113.9".parse().unwrap();
        let fw = d.core().firewall_mut();
        fw.add_element(
            "knockgate",
            SSH_GRANTS_V4,
            ElementKey::Addr(stranger),
            Duration::from_secs(3600),
        )
        .unwrap();
        fw.add_element(
            "knockgate",
            KNOCK_BAN_V4,
            ElementKey::Addr(banned),
            Duration::from_secs(60),
        )
        .unwrap();

        d.repair(UnixMs::from_secs(NOW + 1)).unwrap();

        assert_eq!(keys_of(&mut d, SSH_GRANTS_V4), vec![]);
        assert_eq!(
            keys_of(&mut d, KNOCK_BAN_V4),
            vec![(ElementKey::Addr(banned), 60)]
        );
    }

    #[test]
    fn expired_bookings_are_not_put_back_and_a_refusal_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut d = daemon(&dir);
        let clock = manual_clock(&mut d);
        let laptop: IpAddr = "198.51.100.7".parse().unwrap();
        d.core()
            .open(
                "ssh",
                laptop,
                Some(Duration::from_secs(60)),
                "uid 0",
                UnixMs::from_secs(NOW),
            )
            .unwrap();
        clock.set((NOW + 61) * 1_000_000);
        assert_eq!(d.repair(UnixMs::from_secs(NOW + 61)).unwrap(), 0);
        d.core().firewall_mut().refuse_next = true;
        let before = d.ruleset().clone();
        assert!(d.repair(UnixMs::from_secs(NOW + 62)).is_err());
        assert_eq!(d.ruleset(), &before);
    }

    #[test]
    fn bans_that_cannot_be_read_back_do_not_stop_the_repair() {
        let dir = tempfile::tempdir().unwrap();
        let mut d = daemon(&dir);
        let clock = manual_clock(&mut d);
        let laptop: IpAddr = "198.51.100.7".parse().unwrap();
        d.core()
            .open(
                "ssh",
                laptop,
                Some(Duration::from_secs(600)),
                "uid 0",
                UnixMs::from_secs(NOW),
            )
            .unwrap();
        d.core().firewall_mut().tables.clear();
        d.core().firewall_mut().fail_dumps = true;

        clock.set((NOW + 1) * 1_000_000);
        assert_eq!(d.repair(UnixMs::from_secs(NOW + 1)).unwrap(), 1);

        d.core().firewall_mut().fail_dumps = false;
        assert_eq!(
            keys_of(&mut d, SSH_GRANTS_V4),
            vec![(ElementKey::Addr(laptop), 599)]
        );
    }

    #[test]
    fn a_reapply_that_cannot_read_the_live_sets_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut d = daemon(&dir);
        let banned: IpAddr = "203.0.113.9".parse().unwrap();
        d.core()
            .firewall_mut()
            .add_element(
                "knockgate",
                KNOCK_BAN_V4,
                ElementKey::Addr(banned),
                Duration::from_secs(60),
            )
            .unwrap();
        let (before, commits) = (d.ruleset().clone(), d.core().firewall_mut().commits);
        // A smaller ban set: the bans cannot stay in place and must be read back.
        let mut loaded = d.loaded().clone();
        loaded.config.knock.ban.max = 1000;
        d.core().firewall_mut().fail_dumps = true;

        assert!(d.switch_to(loaded, KeyRing::default()).is_err());

        d.core().firewall_mut().fail_dumps = false;
        assert_eq!(d.core().firewall_mut().commits, commits, "nothing sent");
        assert_eq!(d.ruleset(), &before);
        assert_eq!(
            keys_of(&mut d, KNOCK_BAN_V4),
            vec![(ElementKey::Addr(banned), 60)]
        );
    }

    #[test]
    fn a_smaller_ban_set_keeps_the_longest_bans_and_is_not_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut d = daemon(&dir);
        for (n, secs) in [(1u8, 60u64), (2, 600), (3, 300)] {
            let addr = IpAddr::from([203, 0, 113, n]);
            d.core()
                .firewall_mut()
                .add_element(
                    "knockgate",
                    KNOCK_BAN_V4,
                    ElementKey::Addr(addr),
                    Duration::from_secs(secs),
                )
                .unwrap();
        }
        let mut loaded = d.loaded().clone();
        loaded.config.knock.ban.max = 2;

        d.switch_to(loaded, KeyRing::default()).unwrap();

        let kept: Vec<u64> = keys_of(&mut d, KNOCK_BAN_V4)
            .into_iter()
            .map(|(_, s)| s)
            .collect();
        assert_eq!(kept, vec![600, 300]);
    }

    #[test]
    fn a_reload_carries_the_booked_grants_and_no_address_slipped_in() {
        let dir = tempfile::tempdir().unwrap();
        let mut d = daemon(&dir);
        let now = crate::daemon::unix_now();
        let laptop: IpAddr = "198.51.100.7".parse().unwrap();
        let stranger: IpAddr = "203.0.113.66".parse().unwrap();
        d.core()
            .open(
                "ssh",
                laptop,
                Some(Duration::from_secs(600)),
                "uid 0",
                UnixMs::from_secs(now),
            )
            .unwrap();
        d.core().firewall_mut().slip_in(
            "knockgate",
            SSH_GRANTS_V4,
            ElementKey::Addr(stranger),
            Duration::from_secs(3600),
        );
        let loaded = d.loaded().clone();

        d.switch_to(loaded, KeyRing::default()).unwrap();

        let kept: Vec<ElementKey> = keys_of(&mut d, SSH_GRANTS_V4)
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(kept, vec![ElementKey::Addr(laptop)]);
        assert!(
            !d.core()
                .firewall_mut()
                .kept
                .iter()
                .any(|s| s.contains("_grants_")),
            "after someone else's commit the book fills the grant sets anew"
        );
    }

    #[test]
    fn a_reload_with_no_commit_but_ours_leaves_the_grant_sets_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let mut d = daemon(&dir);
        let now = crate::daemon::unix_now();
        let laptop: IpAddr = "198.51.100.7".parse().unwrap();
        d.core()
            .open(
                "ssh",
                laptop,
                Some(Duration::from_secs(600)),
                "uid 0",
                UnixMs::from_secs(now),
            )
            .unwrap();
        let before = keys_of(&mut d, SSH_GRANTS_V4);
        let loaded = d.loaded().clone();

        d.switch_to(loaded, KeyRing::default()).unwrap();

        let fw = d.core().firewall_mut();
        assert!(fw.kept.contains(&SSH_GRANTS_V4.to_owned()), "{:?}", fw.kept);
        assert!(
            fw.kept
                .iter()
                .all(|s| s.contains("_grants_v") || s.contains("_ban_")),
            "only grant and ban sets: {:?}",
            fw.kept
        );
        assert_eq!(
            keys_of(&mut d, SSH_GRANTS_V4),
            before,
            "the element stayed as it was"
        );
        // And the reload's own commit keeps the account: the next reload keeps them too.
        let loaded = d.loaded().clone();
        d.core().firewall_mut().kept.clear();
        d.switch_to(loaded, KeyRing::default()).unwrap();
        assert!(!d.core().firewall_mut().kept.is_empty());
    }
}
