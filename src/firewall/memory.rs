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
        self.commits += 1;
        Ok(())
    }

    fn remove(&mut self, table: &str) -> Result<(), FirewallError> {
        self.refuse(table)?;
        self.tables.remove(table);
        self.commits += 1;
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
        self.commits += 1;
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
        self.commits += 1;
        Ok(())
    }

    fn elements(&mut self, table: &str, set: &str) -> Result<Vec<Element>, FirewallError> {
        if self.fail_dumps {
            return Err(FirewallError::BadReply {
                table: table.to_owned(),
                detail: "dump failed (test)".to_owned(),
            });
        }
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
