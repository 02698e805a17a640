//! The core's side of port sequences: writing each step, and booking what the kernel
//! opened when a sequence completed.

use std::net::IpAddr;
use std::time::Duration;

use super::{Core, grant_set};
use crate::clock::UnixMs;
use crate::daemon::sequencer::{Completed, Sequencer};
use crate::firewall::{Firewall, FirewallError};
use crate::grants::{GrantRecord, Granted};
use crate::policy;
use crate::sequence::Touch;

/// What a completion the kernel reported came to.
#[derive(Debug)]
pub enum SequenceOutcome {
    /// Booked (the kernel had opened it already).
    Opened {
        /// Whose sequence, what it opened.
        completed: Completed,
        /// The grant.
        record: GrantRecord,
        /// New or renewed.
        kind: Granted,
    },
    /// The kernel opened it, the policy did not allow it: closed again.
    Refused {
        /// Whose sequence.
        completed: Completed,
        /// Why.
        reason: String,
    },
    /// Not a completion of any sequence of this daemon's (an old generation).
    Unknown,
}

impl<F: Firewall> Core<F> {
    /// Puts `sequencer` in force (none: no key has a sequence), keeping the keys of
    /// the one before so its late completions still resolve.
    pub fn set_sequencer(&mut self, mut sequencer: Option<Sequencer>) {
        if let (Some(new), Some(old)) = (sequencer.as_mut(), self.sequencer.as_ref()) {
            new.follow(old);
        }
        self.sequencer = sequencer;
    }

    /// The sequencer in force.
    #[must_use]
    pub fn sequencer(&self) -> Option<&Sequencer> {
        self.sequencer.as_ref()
    }

    /// Writes the sequences due at `now` in one batch; returns how many elements.
    pub fn write_sequences(&mut self, now: UnixMs) -> Result<usize, FirewallError> {
        let Some(sequencer) = self.sequencer.as_mut() else {
            return Ok(0);
        };
        let due = sequencer.due(now);
        if due.is_empty() {
            return Ok(0);
        }
        let count = due.len();
        if let Err(e) = self.firewall.put_elements(&self.settings.table, &due) {
            // Written again at the next step's write, from scratch.
            if let Some(s) = self.sequencer.as_mut() {
                s.forget_written();
            }
            return Err(e);
        }
        Ok(count)
    }

    /// How long until sequences must be written next.
    #[must_use]
    pub fn next_sequence_write(&self, now: UnixMs) -> Option<Duration> {
        self.sequencer
            .as_ref()
            .map(|s| now.until(s.next_write(now)))
    }

    /// The kernel completed a sequence (`mark` says whose) for `source` and opened its
    /// service: book it like a knock's grant, or close it again if the key's or the
    /// server's grant limits say no.
    pub fn sequence_completed(
        &mut self,
        mark: u32,
        source: IpAddr,
        touch: Option<Touch>,
        now: UnixMs,
    ) -> SequenceOutcome {
        let resolved = self
            .sequencer
            .as_ref()
            .and_then(|s| s.resolve(mark, touch, now));
        let Some(completed) = resolved else {
            return SequenceOutcome::Unknown;
        };
        let address = policy::canonical(source);
        let who = super::sequence_who(&completed.key);
        let refusal = if self.book.holds(&completed.service, address) {
            None
        } else {
            let max = self.keys.get(&completed.key).map_or(0, |k| k.max_grants);
            if self.key_grants(&completed.key) >= max {
                Some(format!("the key holds its most grants ({max})"))
            } else if self.book.len() >= self.knocks_may_hold() {
                Some(format!(
                    "{} grants are open, all that knocks may take",
                    self.book.len()
                ))
            } else {
                None
            }
        };
        if let Some(reason) = refusal {
            let set = grant_set(&completed.service, address);
            let _ = self
                .firewall
                .remove_element(&self.settings.table, &set, address.into());
            return SequenceOutcome::Refused { completed, reason };
        }
        match self.grant(&completed.service, address, &who, completed.ttl, now) {
            Ok((record, kind)) => SequenceOutcome::Opened {
                completed,
                record,
                kind,
            },
            Err(e) => SequenceOutcome::Refused {
                completed,
                reason: format!("{e:#}"),
            },
        }
    }

    /// The key a refused completion (logged by the kernel) was for, if any.
    #[must_use]
    pub fn sequence_key(&self, mark: u32, touch: Option<Touch>, now: UnixMs) -> Option<Completed> {
        self.sequencer
            .as_ref()
            .and_then(|s| s.resolve(mark, touch, now))
    }
}
