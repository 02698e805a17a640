//! The replay guard: every accepted nonce is remembered until its knock's timestamp
//! can no longer pass the clock check, so a captured knock opens nothing twice.
//!
//! Bounded: at most `capacity` live nonces, and at most `key_quota` of them for any
//! one key, so one key holder (even one allowed nothing, who knocks again and again)
//! cannot fill it for everyone; when full, new knocks are refused (fail closed) until
//! old ones expire. A clock step back cannot revive a forgotten nonce: the guard keeps
//! a floor — the latest expiry among the nonces it forgot — and refuses any knock
//! that would expire at or before it. Pure: the caller passes the time, and persists
//! [`ReplayGuard::entries`] and [`ReplayGuard::floor`] (see `state.rs`) before acting
//! on an accepted knock.

use std::collections::HashMap;

use super::packet::NONCE_LEN;

/// One remembered nonce.
#[derive(Debug, Clone)]
struct Entry {
    /// Unix second after which it can be forgotten.
    until: u64,
    /// The key that used it, for the quota; none for nonces read back at a start.
    key: Option<String>,
}

/// Remembered nonces and the Unix second after which each can be forgotten.
#[derive(Debug, Clone)]
pub struct ReplayGuard {
    seen: HashMap<[u8; NONCE_LEN], Entry>,
    per_key: HashMap<String, usize>,
    capacity: usize,
    key_quota: usize,
    floor: u64,
}

/// Why the guard refused a nonce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReplayError {
    /// The nonce was accepted before: this is a replay.
    #[error("replayed nonce")]
    Replayed,
    /// The guard is full of live nonces; refusing is safer than forgetting one.
    #[error("replay guard full")]
    Full,
    /// This key has its quota of live nonces (it knocks faster than anyone needs to).
    #[error("replay guard quota of this key used up")]
    KeyQuota,
    /// The knock would expire before nonces already forgotten: only a clock that
    /// stepped back (or a knock older than any remembered) gets here.
    #[error("knock older than the replay guard remembers (clock stepped back?)")]
    BeforeFloor,
}

impl ReplayGuard {
    /// An empty guard holding at most `capacity` nonces, at most a sixteenth of them
    /// (and at least one) for any one key.
    #[must_use]
    pub fn new(capacity: usize) -> Self {
        Self {
            seen: HashMap::new(),
            per_key: HashMap::new(),
            capacity,
            key_quota: (capacity / 16).max(1),
            floor: 0,
        }
    }

    /// Records `nonce` as used until `forget_after` (Unix seconds), unless it was
    /// used before or is not newer than the floor. Expired nonces are dropped first
    /// when room is needed. For nonces read back from the disk (no key).
    pub fn admit(
        &mut self,
        nonce: [u8; NONCE_LEN],
        forget_after: u64,
        now: u64,
    ) -> Result<(), ReplayError> {
        self.admit_entry(nonce, forget_after, now, None)
    }

    /// [`ReplayGuard::admit`] for a knock by `key`, within the key's quota.
    pub fn admit_for(
        &mut self,
        key: &str,
        nonce: [u8; NONCE_LEN],
        forget_after: u64,
        now: u64,
    ) -> Result<(), ReplayError> {
        self.admit_entry(nonce, forget_after, now, Some(key))
    }

    fn admit_entry(
        &mut self,
        nonce: [u8; NONCE_LEN],
        forget_after: u64,
        now: u64,
        key: Option<&str>,
    ) -> Result<(), ReplayError> {
        if self.seen.contains_key(&nonce) {
            return Err(ReplayError::Replayed);
        }
        if forget_after <= self.floor {
            return Err(ReplayError::BeforeFloor);
        }
        let used = |g: &Self| key.map_or(0, |k| g.per_key.get(k).copied().unwrap_or(0));
        if self.seen.len() >= self.capacity || used(self) >= self.key_quota {
            self.expire(now);
            if self.seen.len() >= self.capacity {
                return Err(ReplayError::Full);
            }
            if used(self) >= self.key_quota {
                return Err(ReplayError::KeyQuota);
            }
        }
        if let Some(k) = key {
            *self.per_key.entry(k.to_owned()).or_default() += 1;
        }
        let key = key.map(str::to_owned);
        self.seen.insert(
            nonce,
            Entry {
                until: forget_after,
                key,
            },
        );
        Ok(())
    }

    /// Whether `nonce` is remembered (a cheap look before costlier checks; admitting
    /// checks again).
    #[must_use]
    pub fn seen(&self, nonce: &[u8; NONCE_LEN]) -> bool {
        self.seen.contains_key(nonce)
    }

    /// Forgets a nonce admitted by mistake (its grant could not be persisted).
    pub fn forget(&mut self, nonce: &[u8; NONCE_LEN]) {
        if let Some(entry) = self.seen.remove(nonce) {
            self.uncount(entry.key.as_deref());
        }
    }

    /// Drops every nonce whose time has passed; the floor rises to the latest of them.
    pub fn expire(&mut self, now: u64) {
        let mut floor = self.floor;
        let mut gone = Vec::new();
        self.seen.retain(|_, entry| {
            let live = entry.until >= now;
            if !live {
                floor = floor.max(entry.until);
                gone.push(entry.key.take());
            }
            live
        });
        self.floor = floor;
        for key in gone {
            self.uncount(key.as_deref());
        }
    }

    fn uncount(&mut self, key: Option<&str>) {
        let Some(key) = key else { return };
        if let Some(n) = self.per_key.get_mut(key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_key.remove(key);
            }
        }
    }

    /// Raises the floor to `floor` (read back from the disk); never lowers it.
    pub fn raise_floor(&mut self, floor: u64) {
        self.floor = self.floor.max(floor);
    }

    /// The latest expiry among the nonces forgotten: knocks expiring at or before it
    /// are refused. Persisted with the entries.
    #[must_use]
    pub fn floor(&self) -> u64 {
        self.floor
    }

    /// Live entries, for persisting.
    pub fn entries(&self) -> impl Iterator<Item = (&[u8; NONCE_LEN], u64)> {
        self.seen.iter().map(|(n, e)| (n, e.until))
    }

    /// Number of remembered nonces.
    #[must_use]
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// Whether no nonce is remembered.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}
