//! The daemon's life: apply the baseline, wait for SIGTERM/SIGINT, and on stop
//! keep the baseline (fail closed) or remove exactly knockgate's own table.
//!
//! Generic over [`Firewall`], so the start/stop decisions are unit-tested with the
//! in-memory firewall. Every decision is logged on the audit target.

pub mod core;

use std::time::Instant;

use tracing::{info, warn};

use crate::config::{Loaded, OnStop};
use crate::firewall::{Firewall, FirewallError};
use crate::logging::AUDIT;
use crate::ruleset::{Hook, Ruleset, baseline};

/// A running daemon: the firewall it owns and the ruleset it applied.
pub struct Daemon<F: Firewall> {
    firewall: F,
    loaded: Loaded,
    ruleset: Ruleset,
}

impl<F: Firewall> Daemon<F> {
    /// Applies the baseline built from `loaded` in one transaction; on a refusal nothing
    /// changed in the kernel and the error says which message was refused.
    pub fn start(mut firewall: F, loaded: Loaded) -> Result<Self, FirewallError> {
        let ruleset = baseline(&loaded.config, &loaded.resolvers);
        let started = Instant::now();
        firewall.replace(&ruleset)?;
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
            apply_us = started.elapsed().as_micros(),
            "baseline applied"
        );
        if loaded.resolvers.is_empty() && loaded.config.outbound == crate::config::Outbound::Locked
        {
            warn!(
                target: AUDIT,
                resolv_conf = %loaded.config.dns.resolv_conf.display(),
                "no DNS resolvers configured or found: this host cannot resolve names"
            );
        }
        Ok(Self {
            firewall,
            loaded,
            ruleset,
        })
    }

    /// The ruleset in force.
    #[must_use]
    pub fn ruleset(&self) -> &Ruleset {
        &self.ruleset
    }

    /// Stops: leaves the baseline in place unless `on_stop = "remove"`, in which case
    /// exactly knockgate's table (and no other) is deleted.
    pub fn stop(mut self) -> Result<F, FirewallError> {
        let table = &self.ruleset.table;
        match self.loaded.config.on_stop {
            OnStop::Keep => info!(
                target: AUDIT,
                event = "stop",
                table = %table,
                "stopping; baseline stays in force (on_stop = keep)"
            ),
            OnStop::Remove => {
                self.firewall.remove(table)?;
                info!(
                    target: AUDIT,
                    event = "remove",
                    table = %table,
                    "stopping; table removed (on_stop = remove)"
                );
            }
        }
        Ok(self.firewall)
    }
}

/// Waits for SIGTERM or SIGINT; returns the signal's name.
pub fn wait_for_stop_signal() -> std::io::Result<&'static str> {
    use tokio::signal::unix::{SignalKind, signal};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    runtime.block_on(async {
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        tokio::select! {
            _ = term.recv() => Ok("SIGTERM"),
            _ = int.recv() => Ok("SIGINT"),
        }
    })
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::config::Config;
    use crate::firewall::memory::MemoryFirewall;

    fn loaded(on_stop: OnStop) -> Loaded {
        Loaded {
            path: PathBuf::from("test.toml"),
            config: Config {
                on_stop,
                ..Config::default()
            },
            resolvers: vec!["192.0.2.53".parse().unwrap()],
            server_id: crate::knock::auth::ServerId::new("test").unwrap(),
        }
    }

    #[test]
    fn start_applies_the_baseline() {
        let daemon = Daemon::start(MemoryFirewall::default(), loaded(OnStop::Keep)).unwrap();
        let want = baseline(&Config::default(), &["192.0.2.53".parse().unwrap()]);
        assert_eq!(daemon.ruleset(), &want);
        assert_eq!(daemon.firewall.tables.get("knockgate"), Some(&want));
    }

    #[test]
    fn refused_start_is_an_error_and_changes_nothing() {
        let fw = MemoryFirewall {
            refuse_next: true,
            ..MemoryFirewall::default()
        };
        assert!(Daemon::start(fw, loaded(OnStop::Keep)).is_err());
    }

    #[test]
    fn stop_keeps_the_baseline_by_default() {
        let daemon = Daemon::start(MemoryFirewall::default(), loaded(OnStop::Keep)).unwrap();
        let fw = daemon.stop().unwrap();
        assert!(fw.tables.contains_key("knockgate"));
    }

    #[test]
    fn stop_with_remove_deletes_only_our_table() {
        let mut fw = MemoryFirewall::default();
        let other = Ruleset {
            table: "other".into(),
            sets: Vec::new(),
            chains: Vec::new(),
        };
        fw.replace(&other).unwrap();
        let daemon = Daemon::start(fw, loaded(OnStop::Remove)).unwrap();
        let fw = daemon.stop().unwrap();
        assert!(!fw.tables.contains_key("knockgate"));
        assert_eq!(fw.tables.get("other"), Some(&other));
    }
}
