//! knockgated: applies the baseline and keeps it until SIGTERM/SIGINT.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use knockgate::config;
use knockgate::ruleset::baseline;

/// knockgate daemon: a locked-down nftables baseline with short-lived holes.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Config file.
    #[arg(long, default_value = config::DEFAULT_PATH)]
    config: PathBuf,
    /// Validate the config and print the ruleset it would apply; change nothing.
    #[arg(long)]
    check: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    knockgate::logging::init();
    match run(&args) {
        Ok(code) => code,
        Err(err) => knockgate::exit::report("knockgated", &err),
    }
}

fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let loaded = config::load(&args.config)?;
    if args.check {
        print!("{}", baseline(&loaded.config, &loaded.resolvers));
        return Ok(ExitCode::SUCCESS);
    }
    let keys = config::load_keys(&loaded)?;
    knockgate::daemon::run(loaded, keys)?;
    Ok(ExitCode::SUCCESS)
}
