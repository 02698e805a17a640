//! Log output for the daemon and the CLI: plain lines on stderr, which journald
//! stores as they are, or one JSON object per line for log shippers. Under
//! journald (`JOURNAL_STREAM` set) no colours and no timestamps, since the journal
//! adds its own.
//!
//! Decisions (grant, refusal, revoke, expiry, apply, reload, remove) go to the
//! [`AUDIT`] target with fields, one line each, so they can be filtered out of the
//! rest.

use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// The tracing target of audit events.
pub const AUDIT: &str = "knockgate::audit";

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// `LEVEL target: message key=value …`
    Text,
    /// One JSON object per line, fields included.
    Json,
}

/// Installs the global subscriber; `RUST_LOG` (`debug`, or `target=level,…`)
/// overrides the default level `info`. A plain target filter, not the regex-based
/// `EnvFilter`: the daemon's idle memory is mostly the code it has touched.
pub fn init(format: LogFormat) {
    let under_journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let filter: Targets = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| Targets::new().with_default(tracing::Level::INFO));
    // The builder's own level cap (INFO by default) would hide `RUST_LOG=debug`:
    // the filter decides alone.
    let builder = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(std::io::stderr)
        .with_target(true);
    // A second init (tests) keeps the first subscriber, which is what we want.
    let _ = match (format, under_journald) {
        (LogFormat::Json, _) => builder
            .json()
            .flatten_event(true)
            .finish()
            .with(filter)
            .try_init(),
        (LogFormat::Text, true) => builder
            .with_ansi(false)
            .without_time()
            .finish()
            .with(filter)
            .try_init(),
        (LogFormat::Text, false) => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .finish()
            .with(filter)
            .try_init(),
    };
}
