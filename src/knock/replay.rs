//! The replay guard: every accepted nonce is remembered until its knock's timestamp
//! can no longer pass the clock check, so a captured knock opens nothing twice.
//!
//! Bounded: at most `capacity` live nonces; when full, new knocks are refused (fail
//! closed) until old ones expire. Pure: the caller passes the time, and persists
//! [`ReplayGuard::entries`] (see `state.rs`) before acting on an accepted knock.

use std::collections::HashMap;

use super::packet::NONCE_LEN;

/// Remembered nonces and the Unix second after which each can be forgotten.
#[derive(Debug, Clone)]
pub struct ReplayGuard {
    seen: HashMap<[u8; NONCE_LEN], u64>,
    capacity: usize,
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
}

impl ReplayGuard {
    /// An empty guard holding at most `capacity` nonces.
    #[must_use]
    pub fn new(capacity: usize) -> Self {
        Self {
            seen: HashMap::new(),
            capacity,
        }
    }

    /// Records `nonce` as used until `forget_after` (Unix seconds), unless it was
    /// used before. Expired nonces are dropped first when room is needed.
    pub fn admit(
        &mut self,
        nonce: [u8; NONCE_LEN],
        forget_after: u64,
        now: u64,
    ) -> Result<(), ReplayError> {
        if self.seen.contains_key(&nonce) {
            return Err(ReplayError::Replayed);
        }
        if self.seen.len() >= self.capacity {
            self.expire(now);
            if self.seen.len() >= self.capacity {
                return Err(ReplayError::Full);
            }
        }
        self.seen.insert(nonce, forget_after);
        Ok(())
    }

    /// Forgets a nonce admitted by mistake (its grant could not be persisted).
    pub fn forget(&mut self, nonce: &[u8; NONCE_LEN]) {
        self.seen.remove(nonce);
    }

    /// Drops every nonce whose time has passed.
    pub fn expire(&mut self, now: u64) {
        self.seen.retain(|_, &mut until| until >= now);
    }

    /// Live entries, for persisting.
    pub fn entries(&self) -> impl Iterator<Item = (&[u8; NONCE_LEN], u64)> {
        self.seen.iter().map(|(n, &t)| (n, t))
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
