//! The `egress-window` command line.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::admin::client::DEFAULT_SOCKET;

/// Run COMMAND with outbound HTTP/HTTPS (and DNS to the resolvers) for it and its
/// children only; exit with COMMAND's exit code. Without COMMAND, run your login
/// shell ($SHELL -l) in the window: a session that ends with `exit` or at DURATION.
#[derive(Parser)]
#[command(name = "egress-window", version, trailing_var_arg = true)]
pub struct Args {
    /// Open egress for every process on the host, not just COMMAND.
    #[arg(long)]
    pub host_wide: bool,
    /// Only to these destinations (names resolved when the window opens, IPv4 and IPv6).
    #[arg(long, value_delimiter = ',', value_name = "NAME")]
    pub to: Vec<String>,
    /// The daemon's admin socket.
    #[arg(long, default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Longest the window stays open, like 10m.
    #[arg(value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// The command and its arguments (after --) [default: $SHELL -l, a session].
    #[arg(num_args = 0.., allow_hyphen_values = true)]
    pub command: Vec<OsString>,
}
