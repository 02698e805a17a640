//! egress-window: outbound HTTP/HTTPS for one command and its children, for at most
//! DURATION, closed when the command exits.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use knockgate::admin::client::DEFAULT_SOCKET;
use knockgate::egress::{Plan, run};

/// Run COMMAND with outbound HTTP/HTTPS (and DNS to the resolvers) for it and its
/// children only; exit with COMMAND's exit code.
#[derive(Parser)]
#[command(version, trailing_var_arg = true)]
struct Args {
    /// Open egress for every process on the host, not just COMMAND.
    #[arg(long)]
    host_wide: bool,
    /// Only to these destinations (names resolved when the window opens, IPv4 and IPv6).
    #[arg(long, value_delimiter = ',', value_name = "NAME")]
    to: Vec<String>,
    /// The daemon's admin socket.
    #[arg(long, default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Longest the window stays open, like 10m.
    #[arg(value_parser = humantime::parse_duration)]
    duration: Duration,
    /// The command and its arguments (after --).
    #[arg(required = true, num_args = 1.., allow_hyphen_values = true)]
    command: Vec<OsString>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let plan = Plan {
        socket: args.socket,
        host_wide: args.host_wide,
        to: args.to,
        duration: args.duration,
        command: args.command,
    };
    match run(&plan) {
        Ok(code) => code,
        Err(err) => knockgate::exit::report("egress-window", &err),
    }
}
