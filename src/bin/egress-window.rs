//! egress-window: outbound HTTP/HTTPS for one command and its children, for at most
//! DURATION, closed when the command exits.

use std::process::ExitCode;

use clap::Parser;
use knockgate::egress::{Plan, run};

use knockgate::cli::egress_window::Args;

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
