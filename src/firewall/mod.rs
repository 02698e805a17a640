//! The one narrow door to the kernel's packet filter.
//!
//! Everything above this module speaks [`Ruleset`]; only [`nft`] speaks
//! netlink, and only it may hold `unsafe`. [`memory::MemoryFirewall`] stands in
//! for the kernel in unit tests, so policy and daemon logic are tested without root.

use std::time::Duration;

use crate::ruleset::{CounterDef, Element, ElementKey, Ruleset};

pub mod memory;
#[cfg(feature = "daemon")]
pub mod nft;

/// What the daemon needs from a packet filter.
pub trait Firewall {
    /// Replaces knockgate's table with `ruleset` in one atomic transaction: either the
    /// whole new table is in force afterwards, or the kernel refused and nothing changed.
    fn replace(&mut self, ruleset: &Ruleset) -> Result<(), FirewallError>;

    /// The sets of `ruleset` named in `candidates` that its table holds now with the
    /// very shape `ruleset` gives them (key, flags, timeout, size), so that
    /// [`Firewall::replace_keeping`] can leave them — and their elements — in place.
    /// Empty when there is no table, or when only a whole replace will do.
    fn keepable(
        &mut self,
        ruleset: &Ruleset,
        candidates: &[&str],
    ) -> Result<Vec<String>, FirewallError>;

    /// [`Firewall::replace`], except that the sets named in `keep` (from
    /// [`Firewall::keepable`]) are not touched: they keep what the kernel holds, and
    /// `ruleset`'s elements for them are ignored. One transaction, like `replace`; if a
    /// set to keep is gone or changed shape, nothing changes and this is an error.
    /// Reload and restart cost the same with a million grants as with none. Accounted
    /// like a whole replace ([`Firewall::unchanged_since_own`]): the kept sets' contents
    /// are the caller's to vouch for (the kernel's own truth, like bans, or grant sets
    /// kept only while the account says nobody else committed).
    fn replace_keeping(&mut self, ruleset: &Ruleset, keep: &[String]) -> Result<(), FirewallError>;

    /// Whether no process but this one has committed anything to the kernel's
    /// ruleset since its last whole-table replace (or since the generation it resumed
    /// from): then the table's sets hold exactly what this firewall put there (less
    /// what timed out). `false` whenever it cannot tell.
    fn unchanged_since_own(&mut self) -> bool;

    /// The ruleset generation up to which every commit is accounted for as this
    /// firewall's own (see [`Firewall::unchanged_since_own`]), if it is.
    fn accounted(&self) -> Option<u32>;

    /// Reads what the tamper watch heard (kernels with one): every generation heard
    /// whole whose changes to the table were all this firewall's — another process's
    /// commit to other tables — moves the account of [`Firewall::accounted`] on, so
    /// such commits do not cost the next reload or restart its kept grant sets. What
    /// else was heard waits for the daemon's tamper handling.
    fn hear(&mut self) {}

    /// Takes up the account of an earlier process (its [`Firewall::accounted`],
    /// saved): if the kernel's ruleset is still at `generation`, nobody committed
    /// anything since, and this firewall carries on from it. Returns whether it did.
    fn resume_accounting(&mut self, generation: u32) -> bool;

    /// A number for the network namespace this firewall's kernel is in, unique within
    /// the boot (none if the kernel cannot say).
    fn namespace(&self) -> Option<u64>;

    /// Deletes the table named `table`, and nothing else; a missing table is not an error.
    fn remove(&mut self, table: &str) -> Result<(), FirewallError>;

    /// Puts `key` in set `set` for `ttl`, replacing any earlier timeout (a re-knock
    /// extends; it never duplicates). The kernel removes it when `ttl` ends.
    fn add_element(
        &mut self,
        table: &str,
        set: &str,
        key: ElementKey,
        ttl: Duration,
    ) -> Result<(), FirewallError>;

    /// [`Firewall::add_element`] for each of `elements` (set, key, ttl), in one
    /// transaction: all of them or none.
    fn put_elements(
        &mut self,
        table: &str,
        elements: &[(&str, ElementKey, Duration)],
    ) -> Result<(), FirewallError> {
        for (set, key, ttl) in elements {
            self.add_element(table, set, *key, *ttl)?;
        }
        Ok(())
    }

    /// Takes `key` out of set `set` now; an absent element is not an error.
    fn remove_element(
        &mut self,
        table: &str,
        set: &str,
        key: ElementKey,
    ) -> Result<(), FirewallError>;

    /// [`Firewall::remove_element`] for each of `elements` (set, key), in one
    /// transaction: all of them or none.
    fn remove_elements(
        &mut self,
        table: &str,
        elements: &[(&str, ElementKey)],
    ) -> Result<(), FirewallError> {
        for (set, key) in elements {
            self.remove_element(table, set, *key)?;
        }
        Ok(())
    }

    /// What set `set` holds now, with each element's remaining time; empty when the
    /// table or the set does not exist. Any other failure to read it is an error —
    /// never an empty set.
    fn elements(&mut self, table: &str, set: &str) -> Result<Vec<Element>, FirewallError>;

    /// Whether a table named `table` is in force now.
    fn table_exists(&mut self, table: &str) -> Result<bool, FirewallError>;

    /// The named counters of table `table` with what they have counted; empty when
    /// the table does not exist.
    fn counters(&mut self, table: &str) -> Result<Vec<CounterDef>, FirewallError>;

    /// Sets the bits of `mark` in the conntrack mark of every connection tracked now,
    /// keeping their other bits (at most [`MAX_ADOPTED`]). Used once, when knockgate
    /// first takes over a host, so connections that were already up (an admin's SSH
    /// session) pass its established rules, which require the mark.
    fn mark_connections(&mut self, mark: u32) -> Result<Adopted, FirewallError>;
}

/// Most connections [`Firewall::mark_connections`] marks in one go: beyond it the
/// rest are left unmarked (a bound on the daemon's memory at start).
pub const MAX_ADOPTED: usize = 1 << 18;

/// What [`Firewall::mark_connections`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Adopted {
    /// Connections whose mark now carries the bits.
    pub marked: usize,
    /// Connections that ended before they could be marked.
    pub gone: usize,
    /// Whether there were more than [`MAX_ADOPTED`] connections (the rest are unmarked).
    pub cut_off: bool,
}

/// Failures talking to the packet filter. The kernel's refusal names the message it refused.
#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    /// The netlink socket could not be opened or configured (most often: not root, or
    /// missing CAP_NET_ADMIN).
    #[error("cannot open the nftables netlink socket")]
    OpenSocket(#[source] std::io::Error),
    /// The batch could not be sent.
    #[error("cannot send the nftables batch for table {table}")]
    SendBatch {
        /// The table the batch was for.
        table: String,
        /// The socket error.
        #[source]
        source: std::io::Error,
    },
    /// The kernel's answers could not be read.
    #[error("cannot read the kernel's answer for table {table}")]
    ReceiveAcks {
        /// The table the batch was for.
        table: String,
        /// The socket error (a timeout if the kernel went silent).
        #[source]
        source: std::io::Error,
    },
    /// The kernel refused a message; the whole batch was rolled back.
    #[error("the kernel refused {what} (table {table}); nothing was changed")]
    Refused {
        /// The table the batch was for.
        table: String,
        /// The refused message, in nft words (`rule in chain input: tcp dport 22 …`).
        what: String,
        /// The kernel's errno.
        #[source]
        source: std::io::Error,
    },
    /// The ruleset holds a name or prefix that cannot be sent (an interior NUL byte).
    #[error("invalid ruleset for table {table}: {detail}")]
    InvalidRuleset {
        /// The table the ruleset is for.
        table: String,
        /// What cannot be sent.
        detail: String,
    },
    /// The kernel answered with something that is not a netlink acknowledgement.
    #[error("malformed netlink answer for table {table}: {detail}")]
    BadReply {
        /// The table the batch was for.
        table: String,
        /// What was wrong with it.
        detail: String,
    },
}

impl<F: Firewall + ?Sized> Firewall for &mut F {
    fn replace(&mut self, ruleset: &Ruleset) -> Result<(), FirewallError> {
        (**self).replace(ruleset)
    }

    fn keepable(
        &mut self,
        ruleset: &Ruleset,
        candidates: &[&str],
    ) -> Result<Vec<String>, FirewallError> {
        (**self).keepable(ruleset, candidates)
    }

    fn replace_keeping(&mut self, ruleset: &Ruleset, keep: &[String]) -> Result<(), FirewallError> {
        (**self).replace_keeping(ruleset, keep)
    }

    fn unchanged_since_own(&mut self) -> bool {
        (**self).unchanged_since_own()
    }

    fn accounted(&self) -> Option<u32> {
        (**self).accounted()
    }

    fn hear(&mut self) {
        (**self).hear();
    }

    fn resume_accounting(&mut self, generation: u32) -> bool {
        (**self).resume_accounting(generation)
    }

    fn namespace(&self) -> Option<u64> {
        (**self).namespace()
    }

    fn remove(&mut self, table: &str) -> Result<(), FirewallError> {
        (**self).remove(table)
    }

    fn add_element(
        &mut self,
        table: &str,
        set: &str,
        key: ElementKey,
        ttl: Duration,
    ) -> Result<(), FirewallError> {
        (**self).add_element(table, set, key, ttl)
    }

    fn put_elements(
        &mut self,
        table: &str,
        elements: &[(&str, ElementKey, Duration)],
    ) -> Result<(), FirewallError> {
        (**self).put_elements(table, elements)
    }

    fn remove_element(
        &mut self,
        table: &str,
        set: &str,
        key: ElementKey,
    ) -> Result<(), FirewallError> {
        (**self).remove_element(table, set, key)
    }

    fn remove_elements(
        &mut self,
        table: &str,
        elements: &[(&str, ElementKey)],
    ) -> Result<(), FirewallError> {
        (**self).remove_elements(table, elements)
    }

    fn elements(&mut self, table: &str, set: &str) -> Result<Vec<Element>, FirewallError> {
        (**self).elements(table, set)
    }

    fn table_exists(&mut self, table: &str) -> Result<bool, FirewallError> {
        (**self).table_exists(table)
    }

    fn counters(&mut self, table: &str) -> Result<Vec<CounterDef>, FirewallError> {
        (**self).counters(table)
    }

    fn mark_connections(&mut self, mark: u32) -> Result<Adopted, FirewallError> {
        (**self).mark_connections(mark)
    }
}
