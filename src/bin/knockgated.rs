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
    /// Log lines as text or as JSON objects (for log shippers).
    #[arg(
        long,
        value_enum,
        default_value = "text",
        env = "KNOCKGATED_LOG_FORMAT"
    )]
    log_format: knockgate::logging::LogFormat,
}

fn main() -> ExitCode {
    let args = Args::parse();
    knockgate::logging::init(args.log_format);
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
