//! Log output for the daemon and the CLI: plain lines on stderr, which journald
//! stores as they are, or one JSON object per line for log shippers. Under
//! journald (`JOURNAL_STREAM` set) no colours and no timestamps, since the journal
//! adds its own.
//!
//! Decisions (grant, refusal, revoke, expiry, apply, reload, remove) go to the
//! [`AUDIT`] target with fields, one line each, so they can be filtered out of the
//! rest.

use tracing_subscriber::EnvFilter;

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

/// Installs the global subscriber; `RUST_LOG` overrides the default level `info`.
pub fn init(format: LogFormat) {
    let under_journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(true);
    // A second init (tests) keeps the first subscriber, which is what we want.
    let _ = match (format, under_journald) {
        (LogFormat::Json, _) => builder.json().flatten_event(true).try_init(),
        (LogFormat::Text, true) => builder.with_ansi(false).without_time().try_init(),
        (LogFormat::Text, false) => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
    };
}
