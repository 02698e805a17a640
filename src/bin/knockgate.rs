//! knockgate: the local admin's command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use knockgate::config;
use knockgate::ruleset::baseline;

/// knockgate admin CLI.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Config file.
    #[arg(long, global = true, default_value = config::DEFAULT_PATH)]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the nft ruleset the config produces (changes nothing).
    Ruleset,
    /// Validate the config; exit 2 with the file and key at fault if it is bad.
    Check,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(code) => code,
        Err(err) => knockgate::exit::report("knockgate", &err),
    }
}

fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let loaded = config::load(&args.config)?;
    match args.command {
        Command::Ruleset => print!("{}", baseline(&loaded.config, &loaded.resolvers)),
        Command::Check => {
            let keys = config::load_keys(&loaded)?;
            println!("{}: ok ({} knock keys)", loaded.path.display(), keys.len());
        }
    }
    Ok(ExitCode::SUCCESS)
}
