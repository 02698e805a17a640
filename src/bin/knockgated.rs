//! knockgated: applies the baseline and keeps it until SIGTERM/SIGINT.

use std::process::ExitCode;

use clap::Parser;
use knockgate::config;
use knockgate::ruleset::baseline;

use knockgate::cli::knockgated::Args;

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
        knockgate::exit::write_stdout(&baseline(&loaded.config, &loaded.resolvers).to_string())?;
        return Ok(ExitCode::SUCCESS);
    }
    let keys = config::load_keys(&loaded)?;
    knockgate::daemon::run(loaded, keys)?;
    Ok(ExitCode::SUCCESS)
}
