//! The lockout guard: `knockgate apply --confirm 2m` puts a new config in force
//! in memory only, and rolls back to the previous one unless `knockgate confirm`
//! comes in time — like `iptables-apply` or commit-confirmed on routers.
//!
//! Only a confirm writes the new config over the daemon's config file; so a
//! daemon restart during the trial also comes back on the old config.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::{Daemon, ReloadError};
use crate::config::Loaded;
use crate::firewall::Firewall;
use crate::logging::AUDIT;
use crate::state::{StateError, write_atomically};

/// A config on trial.
#[derive(Debug)]
pub(super) struct Trial {
    /// When the rollback is due, on the monotonic clock: exactly the time given.
    due: Instant,
    /// The config to return to.
    previous: Loaded,
    /// Grants the trial config closed (their service is not in it): a rollback puts
    /// them back with the time they have left.
    closed: Vec<crate::grants::GrantRecord>,
    /// The trial config's text, as applied (a confirm saves exactly this).
    text: String,
}

/// Why a confirm did nothing.
#[derive(Debug, thiserror::Error)]
pub enum ConfirmError {
    /// Nothing is on trial.
    #[error("no config is waiting for confirmation")]
    NothingPending,
    /// The confirmed config could not be saved.
    #[error("cannot save the confirmed config")]
    Save(#[source] StateError),
}

impl<F: Firewall> Daemon<F> {
    /// Puts config `text` (read by the requester from `path`) in force until
    /// `now + confirm`; returns that deadline.
    pub fn apply_trial(
        &mut self,
        path: &Path,
        text: &str,
        confirm: Duration,
        now: u64,
    ) -> Result<u64, ReloadError> {
        if self.trial.is_some() {
            return Err(ReloadError::TrialPending);
        }
        let loaded = crate::config::load_str(path, text, std::env::vars())?;
        let keys = crate::config::load_keys(&loaded)?;
        let previous = self.loaded.clone();
        let closed = self.switch_to(loaded, keys)?;
        // The Unix second by which it has rolled back, for the requester; the rollback
        // itself is due exactly `confirm` from now (the monotonic `due`).
        let deadline = now
            .saturating_add(confirm.as_secs().max(1))
            .saturating_add(1);
        self.trial = Some(Trial {
            due: Instant::now() + confirm.max(Duration::from_secs(1)),
            previous,
            text: text.to_owned(),
            closed,
        });
        info!(target: AUDIT, event = "apply-trial", config = %path.display(), deadline,
            "new config in force until confirmed, else rolled back");
        Ok(deadline)
    }

    /// Keeps the config on trial: writes it over the daemon's config file.
    pub fn confirm(&mut self) -> Result<PathBuf, ConfirmError> {
        let trial = self.trial.take().ok_or(ConfirmError::NothingPending)?;
        let target = trial.previous.path.clone();
        let saved = write_atomically(
            &target.with_extension("toml.tmp"),
            &target,
            trial.text.as_bytes(),
        )
        .map_err(ConfirmError::Save);
        if let Err(e) = saved {
            // Still on trial: the rollback stays armed.
            self.trial = Some(trial);
            return Err(e);
        }
        self.loaded.path.clone_from(&target);
        info!(target: AUDIT, event = "confirm", config = %target.display(), "new config confirmed and saved");
        Ok(target)
    }

    /// When the pending rollback is due, if a config is on trial.
    #[must_use]
    pub fn trial_due(&self) -> Option<Instant> {
        self.trial.as_ref().map(|t| t.due)
    }

    /// Rolls back to the previous config if the trial's time is up at `now`.
    pub fn rollback_if_due(&mut self, now: Instant) {
        if self.trial.as_ref().is_none_or(|t| t.due > now) {
            return;
        }
        let Some(trial) = self.trial.take() else {
            return;
        };
        let result = crate::config::load_keys(&trial.previous)
            .map_err(ReloadError::from)
            .and_then(|keys| self.switch_to(trial.previous, keys));
        match result {
            Ok(_) => {
                let restored = self
                    .core
                    .restore_grants(trial.closed, crate::clock::UnixMs::now());
                warn!(target: AUDIT, event = "rollback", grants_restored = restored,
                    "no confirmation in time: previous config restored");
            }
            Err(e) => warn!(target: AUDIT, event = "rollback-failed", error = %format!("{e:#}"),
                "could not restore the previous config; the trial config stays in force"),
        }
    }
}
