//! An in-memory [`Firewall`] for unit tests: it keeps the tables it was given, and can
//! be told to refuse the next change, so callers' handling of kernel refusals is tested
//! without root.

use std::collections::BTreeMap;

use std::time::Duration;

use super::{Adopted, Firewall, FirewallError};
use crate::ruleset::{CounterDef, Element, ElementKey, Ruleset, SetDef};

/// Tables by name, as the kernel would hold them.
#[derive(Debug, Default)]
pub struct MemoryFirewall {
    /// The tables in force.
    pub tables: BTreeMap<String, Ruleset>,
    /// When set, the next change is refused (and nothing changes), as a kernel would.
    pub refuse_next: bool,
    /// When set, this many more changes succeed and the one after is refused.
    pub refuse_after: Option<usize>,
    /// When set, reading a set's elements fails, as a dump cut short would.
    pub fail_dumps: bool,
    /// How many changes were committed, to tell a re-apply from a no-op.
    pub commits: usize,
    /// Conntrack marks of the connections "tracked now", by a test's names for them.
    pub connections: BTreeMap<String, u32>,
    /// Commits by "other processes": a test that changes `tables` behind the daemon's
    /// back adds one, as the kernel's generation would move.
    pub foreign_commits: u32,
    /// The sets whose elements were read, in order (a test of what a start dumps).
    pub dumped: Vec<String>,
    /// The sets the last [`Firewall::replace_keeping`] kept.
    pub kept: Vec<String>,
    /// The generation up to which every commit was this firewall's own.
    pub accounted: Option<u32>,
}

impl MemoryFirewall {
    fn set_mut(&mut self, table: &str, set: &str) -> Result<&mut SetDef, FirewallError> {
        self.tables
            .get_mut(table)
            .and_then(|t| t.sets.iter_mut().find(|s| s.name == set))
            .ok_or_else(|| FirewallError::Refused {
                table: table.to_owned(),
                what: format!("set {set}"),
                source: std::io::Error::from_raw_os_error(2),
            })
    }

    /// Another process puts `key` in set `set` of `table` behind the daemon's back (one
    /// foreign commit, as `nft add element` would be).
    pub fn slip_in(&mut self, table: &str, set: &str, key: ElementKey, ttl: Duration) {
        if let Ok(set) = self.set_mut(table, set) {
            set.elements.retain(|e| e.key != key);
            set.elements.push(Element {
                key,
                expires_in: Some(ttl),
            });
        }
        self.foreign_commits += 1;
    }

    /// The "ruleset generation": every commit, ours or a test's foreign one, moves it.
    fn generation(&self) -> u32 {
        u32::try_from(self.commits)
            .unwrap_or(u32::MAX)
            .wrapping_add(self.foreign_commits)
    }

    /// Counts one commit of ours; `whole` when it replaced the table whole.
    fn commit(&mut self, whole: bool) {
        let before = self.generation();
        self.commits += 1;
        self.accounted = (whole || self.accounted == Some(before)).then(|| self.generation());
    }

    fn refuse(&mut self, table: &str) -> Result<(), FirewallError> {
        match self.refuse_after {
            Some(0) => {
                self.refuse_after = None;
                self.refuse_next = true;
            }
            Some(n) => self.refuse_after = Some(n - 1),
            None => {}
        }
        if std::mem::take(&mut self.refuse_next) {
            return Err(FirewallError::Refused {
                table: table.to_owned(),
                what: "the batch (refusal requested by the test)".to_owned(),
                source: std::io::Error::from_raw_os_error(1),
            });
        }
        Ok(())
    }
}

impl Firewall for MemoryFirewall {
    fn replace(&mut self, ruleset: &Ruleset) -> Result<(), FirewallError> {
        self.refuse(&ruleset.table)?;
        self.tables.insert(ruleset.table.clone(), ruleset.clone());
        self.commit(true);
        Ok(())
    }

    fn keepable(
        &mut self,
        ruleset: &Ruleset,
        candidates: &[&str],
    ) -> Result<Vec<String>, FirewallError> {
        let Some(now) = self.tables.get(&ruleset.table) else {
            return Ok(Vec::new());
        };
        Ok(ruleset
            .sets
            .iter()
            .filter(|def| candidates.contains(&def.name.as_str()))
            .filter(|def| {
                now.sets
                    .iter()
                    .any(|s| s.name == def.name && s.key == def.key && s.kind == def.kind)
            })
            .map(|def| def.name.clone())
            .collect())
    }

    fn replace_keeping(&mut self, ruleset: &Ruleset, keep: &[String]) -> Result<(), FirewallError> {
        let names: Vec<&str> = keep.iter().map(String::as_str).collect();
        if self.keepable(ruleset, &names)?.len() != keep.len() {
            return Err(FirewallError::InvalidRuleset {
                table: ruleset.table.clone(),
                detail: "a set to keep is gone or changed shape".to_owned(),
            });
        }
        self.refuse(&ruleset.table)?;
        let mut new = ruleset.clone();
        if let Some(old) = self.tables.get(&ruleset.table) {
            for set in new.sets.iter_mut().filter(|s| keep.contains(&s.name)) {
                if let Some(was) = old.sets.iter().find(|s| s.name == set.name) {
                    set.elements.clone_from(&was.elements);
                }
            }
        }
        self.tables.insert(ruleset.table.clone(), new);
        self.kept = keep.to_vec();
        self.commit(true);
        Ok(())
    }

    fn unchanged_since_own(&mut self) -> bool {
        self.accounted == Some(self.generation())
    }

    fn accounted(&self) -> Option<u32> {
        self.accounted
    }

    fn resume_accounting(&mut self, generation: u32) -> bool {
        let resumed = self.generation() == generation;
        if resumed {
            self.accounted = Some(generation);
        }
        resumed
    }

    fn namespace(&self) -> Option<u64> {
        Some(1)
    }

    fn remove(&mut self, table: &str) -> Result<(), FirewallError> {
        self.refuse(table)?;
        self.tables.remove(table);
        self.commit(false);
        Ok(())
    }

    fn add_element(
        &mut self,
        table: &str,
        set: &str,
        key: ElementKey,
        ttl: Duration,
    ) -> Result<(), FirewallError> {
        self.refuse(table)?;
        let set = self.set_mut(table, set)?;
        set.elements.retain(|e| e.key != key);
        set.elements.push(Element {
            key,
            expires_in: Some(ttl),
        });
        self.commit(false);
        Ok(())
    }

    fn remove_element(
        &mut self,
        table: &str,
        set: &str,
        key: ElementKey,
    ) -> Result<(), FirewallError> {
        self.refuse(table)?;
        self.set_mut(table, set)?.elements.retain(|e| e.key != key);
        self.commit(false);
        Ok(())
    }

    fn remove_elements(
        &mut self,
        table: &str,
        elements: &[(&str, ElementKey)],
    ) -> Result<(), FirewallError> {
        // All or none, as the kernel's one transaction: every set is looked up first.
        self.refuse(table)?;
        for (set, _) in elements {
            self.set_mut(table, set)?;
        }
        for (set, key) in elements {
            self.set_mut(table, set)?.elements.retain(|e| e.key != *key);
        }
        self.commit(false);
        Ok(())
    }

    fn elements(&mut self, table: &str, set: &str) -> Result<Vec<Element>, FirewallError> {
        if self.fail_dumps {
            return Err(FirewallError::BadReply {
                table: table.to_owned(),
                detail: "dump failed (test)".to_owned(),
            });
        }
        self.dumped.push(set.to_owned());
        let found = self
            .tables
            .get(table)
            .and_then(|t| t.sets.iter().find(|s| s.name == set));
        Ok(found.map(|s| s.elements.clone()).unwrap_or_default())
    }

    fn table_exists(&mut self, table: &str) -> Result<bool, FirewallError> {
        Ok(self.tables.contains_key(table))
    }

    fn counters(&mut self, table: &str) -> Result<Vec<CounterDef>, FirewallError> {
        Ok(self
            .tables
            .get(table)
            .map(|t| t.counters.clone())
            .unwrap_or_default())
    }

    fn mark_connections(&mut self, mark: u32) -> Result<Adopted, FirewallError> {
        for m in self.connections.values_mut() {
            *m |= mark;
        }
        Ok(Adopted {
            marked: self.connections.len(),
            ..Adopted::default()
        })
    }
}
