//! The `knockgated` command line (the daemon).

use std::path::PathBuf;

use clap::Parser;

use crate::config;

/// knockgate daemon: a locked-down nftables baseline with short-lived holes.
#[derive(Parser)]
#[command(name = "knockgated", version)]
pub struct Args {
    /// Config file.
    #[arg(long, default_value = config::DEFAULT_PATH)]
    pub config: PathBuf,
    /// Validate the config and print the ruleset it would apply; change nothing.
    #[arg(long)]
    pub check: bool,
    /// Log lines as text or as JSON objects (for log shippers).
    #[arg(
        long,
        value_enum,
        default_value = "text",
        env = "KNOCKGATED_LOG_FORMAT"
    )]
    pub log_format: crate::logging::LogFormat,
}
