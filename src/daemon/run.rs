//! Wiring: the knock socket, the expiry timer and the signals around one [`Daemon`]
//! on a single-threaded runtime, so every kernel change is serialised.

use std::time::Duration;

use anyhow::Context;
use tracing::info;

use super::listener::{self, KnockLog};
use super::{Daemon, source_of, unix_now};
use crate::config::Loaded;
use crate::firewall::nft::NftFirewall;
use crate::logging::AUDIT;
use crate::policy::KeyRing;

/// How often refusal counts are summarised while there are any.
const SUMMARY_EVERY: Duration = Duration::from_secs(10);
/// Longest sleep of the expiry timer when no grant is due.
const IDLE_EXPIRY_CHECK: Duration = Duration::from_secs(3600);
/// Largest datagram read; anything longer than a knock is refused anyway.
const RECV_LEN: usize = 512;

/// Runs knockgated until SIGTERM or SIGINT.
pub fn run(loaded: Loaded, keys: KeyRing) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    runtime.block_on(serve(loaded, keys))
}

async fn serve(loaded: Loaded, keys: KeyRing) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let port = loaded.config.knock.port;
    let firewall = NftFirewall::open()?;
    let socket = listener::bind(port).with_context(|| format!("cannot bind udp port {port}"))?;
    let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    let mut daemon = Daemon::start(firewall, loaded, keys, unix_now())?;
    info!(target: AUDIT, event = "listen", port, keys = daemon.core().key_count(),
        server_id = %daemon.loaded().server_id.as_str(), "listening for knocks");

    let mut log = KnockLog::new();
    let mut buf = [0u8; RECV_LEN];
    let signal = loop {
        let next_expiry = daemon
            .core()
            .next_expiry(unix_now())
            .map_or(IDLE_EXPIRY_CHECK, Duration::from_secs);
        let summary = if log.has_counts() {
            SUMMARY_EVERY
        } else {
            IDLE_EXPIRY_CHECK
        };
        tokio::select! {
            received = socket.recv_from(&mut buf) => {
                let Ok((len, from)) = received else { continue };
                let source = source_of(from);
                let outcome = daemon.core().knock(&buf[..len], source, unix_now());
                log.outcome(&outcome, source);
            }
            () = tokio::time::sleep(next_expiry) => {
                for record in daemon.core().expire(unix_now()) {
                    info!(target: AUDIT, event = "expire", id = %record.id, service = %record.service,
                        address = %record.address, who = %record.who, "grant ended");
                }
            }
            () = tokio::time::sleep(summary) => log.summarise(),
            _ = term.recv() => break "SIGTERM",
            _ = int.recv() => break "SIGINT",
        }
    };
    log.summarise();
    info!(signal, "stop requested");
    daemon.stop().context("cannot stop cleanly")?;
    Ok(())
}
