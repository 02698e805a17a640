//! The `knock` command line (the laptop side).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args as ClapArgs, Parser, Subcommand};

/// Send one authenticated knock (nothing ever answers it).
#[derive(Parser)]
#[command(name = "knock", version, args_conflicts_with_subcommands = true)]
pub struct Args {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// A host named in the config file.
    pub host: Option<String>,
    #[command(flatten)]
    pub knock: KnockArgs,
}

#[derive(ClapArgs)]
pub struct KnockArgs {
    /// Client config file [default: ~/.config/knock/config.toml].
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    /// Server to knock without a config entry: ADDR or ADDR:PORT ([v6]:PORT).
    #[arg(long, requires_all = ["key_id", "key_file"])]
    pub server: Option<String>,
    /// Key id (with --server).
    #[arg(long)]
    pub key_id: Option<String>,
    /// Key file (with --server).
    #[arg(long)]
    pub key_file: Option<PathBuf>,
    /// The server's id (its knock.server_id) [default: the server name as given].
    #[arg(long, global = true)]
    pub server_id: Option<String>,
    /// Grant length to ask for, like 30m [default: the server's].
    #[arg(long, global = true, value_parser = humantime::parse_duration)]
    pub ttl: Option<Duration>,
    /// Address the knock is bound to: `auto` (the route's source, or --discover's answer
    /// behind a NAT), an IP, or `packet` (unbound: the key must allow it) [default: auto].
    #[arg(long, global = true)]
    pub source: Option<String>,
    /// How to learn the public address behind a NAT: `dns:NAME@RESOLVER` or an https:// URL.
    #[arg(long, global = true)]
    pub discover: Option<String>,
    /// Service to open, like ssh, wireguard or egress; repeat for several (one knock
    /// each) [default: the host's `services`, or ssh].
    #[arg(long = "service", global = true, value_name = "NAME")]
    pub services: Vec<String>,
    /// Build the knock(s) and print what would be sent where; send nothing.
    #[arg(long, conflicts_with = "wait")]
    pub dry_run: bool,
    /// Write the knock(s) to a new FILE (mode 0600) instead of sending them: one line
    /// each, `ADDR:PORT SERVICE HEX` — to debug, or to send from elsewhere within the
    /// server's clock skew (30 s by default).
    #[arg(long, value_name = "FILE", conflicts_with = "wait")]
    pub save_packet: Option<PathBuf>,
    /// Port sequences instead of a knock.
    #[command(flatten)]
    pub seq: SequenceArgs,
    /// After knocking, poll the opened port until it answers.
    #[arg(long)]
    pub wait: bool,
    /// Port to poll with --wait [default: the host's ssh_port, or 22, when ssh is
    /// among the services].
    #[arg(long, global = true)]
    pub wait_port: Option<u16>,
    /// Longest wait for the port to open.
    #[arg(long, global = true, default_value = "10s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

/// `--sequence`, `--print-sequence` and the server's sequence shape.
#[derive(ClapArgs)]
pub struct SequenceArgs {
    /// Touch the key's current port sequence instead of sending a knock (for a key
    /// with `sequence = true` on the server): TCP SYNs or UDP datagrams, nothing else.
    #[arg(long, conflicts_with_all = ["dry_run", "save_packet", "print_sequence"])]
    pub sequence: bool,
    /// Print the key's current port sequence the way knockd's `knock` client takes it
    /// (`HOST PORT[:udp] …`), and how long it stays valid; send nothing.
    #[arg(long, conflicts_with_all = ["wait", "dry_run", "save_packet"])]
    pub print_sequence: bool,
    /// The server's `sequence.ports` [default: the host's, or 30000-60999].
    #[arg(long, global = true, value_name = "FIRST-LAST")]
    pub sequence_ports: Option<String>,
    /// The server's `sequence.length` [default: the host's, or 4].
    #[arg(long, global = true, value_name = "N")]
    pub sequence_length: Option<u8>,
    /// The server's `sequence.protocol`: tcp, udp or mixed [default: the host's, or tcp].
    #[arg(long, global = true, value_name = "PROTOCOL")]
    pub sequence_protocol: Option<String>,
    /// The server's `sequence.step` [default: the host's, or 30s].
    #[arg(long, global = true, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub sequence_step: Option<Duration>,
}

#[derive(Subcommand)]
pub enum Command {
    /// Knock, wait for PORT to open, then relay stdin/stdout to it (for ssh's ProxyCommand).
    Proxy {
        /// Host as ssh names it (%h): a config entry, or the server itself with --key-id/--key-file.
        host: String,
        /// Port as ssh names it (%p).
        port: u16,
    },
}
