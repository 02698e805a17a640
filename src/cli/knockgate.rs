//! The `knockgate` command line (the local admin).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::admin::client::DEFAULT_SOCKET;
use crate::config;

/// knockgate admin CLI.
#[derive(Parser)]
#[command(name = "knockgate", version)]
pub struct Args {
    /// Config file (ruleset, check, keygen; and where the admin socket is) [default:
    /// /etc/knockgate/knockgate.toml].
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    /// The daemon's admin socket [default: the config's `admin.socket`, else
    /// /run/knockgate/admin.sock].
    #[arg(long, global = true)]
    pub socket: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

impl Args {
    /// The config file: `--config`, or the default path.
    #[must_use]
    pub fn config_path(&self) -> PathBuf {
        self.config
            .clone()
            .unwrap_or_else(|| PathBuf::from(config::DEFAULT_PATH))
    }

    /// The admin socket: `--socket`; else the config's `admin.socket` — an error if
    /// `--config` was given and cannot be read, the default socket if the default
    /// config cannot (a member of the admin group need not read it).
    pub fn socket_path(&self) -> Result<PathBuf, config::ConfigError> {
        if let Some(socket) = &self.socket {
            return Ok(socket.clone());
        }
        match (&self.config, config::load(&self.config_path())) {
            (_, Ok(loaded)) => Ok(loaded.config.admin.socket),
            (Some(_), Err(e)) => Err(e),
            (None, Err(e)) => {
                if self.config_path().exists() {
                    eprintln!("knockgate: warning: {e}; using the default socket {DEFAULT_SOCKET}");
                }
                Ok(PathBuf::from(DEFAULT_SOCKET))
            }
        }
    }
}

#[derive(Subcommand)]
pub enum Command {
    /// The daemon's state in brief.
    Status,
    /// List the open grants.
    Grants {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Open a service (ssh, or one of the config's [[services]]) for one source address.
    Open {
        /// The service, like ssh or wireguard.
        service: String,
        /// The source address.
        #[arg(long)]
        from: std::net::IpAddr,
        /// How long, like 30m [default: the server's default; capped at its maximum].
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
    },
    /// Re-read the config and apply it, keeping grants and windows (exit 2 if it is bad).
    Reload,
    /// Apply --config in memory; roll back unless `knockgate confirm` comes within --confirm.
    Apply {
        /// Time to confirm, like 2m.
        #[arg(long, value_parser = humantime::parse_duration)]
        confirm: Duration,
    },
    /// Keep the config applied with `apply --confirm` (saved over the daemon's config file).
    Confirm,
    /// Close a grant now.
    Revoke {
        /// The grant's id (see `knockgate grants`).
        id: String,
    },
    /// Create a knock key: writes DIR/ID.key (mode 0600) and prints the config to add.
    Keygen {
        /// Key id, like alice-laptop.
        id: String,
        /// Where to write the key file.
        #[arg(long, default_value = "/etc/knockgate/keys")]
        dir: PathBuf,
        /// The name or address laptops reach this server by.
        #[arg(long)]
        address: Option<String>,
        /// The user knockgated runs as, who must be able to read the key [default:
        /// knockgated, when that user exists]. The key file is handed to it (mode 0600
        /// stays), which needs root.
        #[arg(long)]
        owner: Option<String>,
        /// NAT mode: let this key's knocks name no address (the grant is then for the
        /// packet's source, and anyone who sees the knock can race it). Only for
        /// clients behind a NAT that cannot learn their public address.
        #[arg(long)]
        nat: bool,
        /// Also give this key a port sequence (`sequence = true`), for clients that
        /// can only touch ports: knockd's `knock`, phone apps, router scripts.
        #[arg(long)]
        sequence: bool,
    },
    /// Translate fwknopd's access.conf into [[fwknop_keys]] (and [[services]]) stanzas;
    /// prints them, naming what cannot be carried over.
    ImportFwknop {
        /// fwknopd's access.conf.
        access_conf: PathBuf,
        /// Also write each stanza's key file (mode 0600, never overwriting) into DIR,
        /// and point the stanzas there.
        #[arg(long, value_name = "DIR")]
        write_keys: Option<PathBuf>,
    },
    /// Print the nft ruleset the config produces (changes nothing).
    Ruleset,
    /// Validate the config and its key files; exit 2 naming the file and key at fault.
    Check,
}
