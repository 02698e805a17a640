//! The laptop side's config: `~/.config/knock/config.toml` with named hosts.
//!
//! ```toml
//! [hosts.myserver]
//! address = "myserver.example.org"   # name or IP; every address it resolves to is knocked
//! port = 62201                       # knock port (default 62201)
//! key_id = "alice-laptop"
//! key_file = "~/.config/knock/alice-laptop.key"
//! server_id = "web1"                 # the server's knock.server_id (`knockgate keygen` prints it)
//! ttl = "30m"                        # default: the server's default
//! source = "auto"                    # bind the knock to the address the server sees (default);
//!                                    # or an IP address; or "packet" (unbound: the key must allow it)
//! discover = "https://api.ipify.org" # behind a NAT: how to learn that address (curl, IPv4);
//!                                    # or "dns:myip.opendns.com@208.67.222.222" (plain DNS: forgeable)
//! ssh_port = 22                      # port `--wait` polls after an ssh knock
//! services = ["ssh"]                 # what a plain `knock myserver` opens (default ["ssh"]);
//!                                    # e.g. ["ssh", "egress"]: one knock each
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::config::Dur;

/// Default knock port.
pub const DEFAULT_PORT: u16 = 62201;

/// The whole client config.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// Named hosts.
    #[serde(default)]
    pub hosts: BTreeMap<String, HostEntry>,
}

/// One server the user knocks on.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostEntry {
    /// Name or address of the server.
    pub address: String,
    /// Knock port.
    #[serde(default = "default_port")]
    pub port: u16,
    /// Key id.
    pub key_id: String,
    /// Key file (`~/` expands to the home directory).
    pub key_file: PathBuf,
    /// The server's id; default: the host name as written in `address`.
    #[serde(default)]
    pub server_id: Option<String>,
    /// Requested grant length; default: the server's.
    #[serde(default)]
    pub ttl: Option<Dur>,
    /// `auto` (default), `packet` (unbound) or the address the knock is bound to.
    #[serde(default)]
    pub source: Option<String>,
    /// How to learn the public address behind a NAT (`dns:NAME@RESOLVER` or a URL).
    #[serde(default)]
    pub discover: Option<String>,
    /// The SSH port (what `--wait` polls after an ssh knock).
    #[serde(default = "default_ssh_port")]
    pub ssh_port: u16,
    /// The services a knock opens unless `--service` says otherwise.
    #[serde(default = "default_services")]
    pub services: Vec<String>,
    /// The server's `sequence.ports`, for `--sequence` (default 30000-60999).
    #[serde(default)]
    pub sequence_ports: Option<String>,
    /// The server's `sequence.length` (default 4).
    #[serde(default)]
    pub sequence_length: Option<u8>,
    /// The server's `sequence.protocol` (default tcp).
    #[serde(default)]
    pub sequence_protocol: Option<String>,
    /// The server's `sequence.step` (default 30s).
    #[serde(default)]
    pub sequence_step: Option<Dur>,
}

fn default_services() -> Vec<String> {
    vec![crate::service::SSH.to_owned()]
}

fn default_port() -> u16 {
    DEFAULT_PORT
}

fn default_ssh_port() -> u16 {
    22
}

/// Why the client config cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ClientConfigError {
    /// Unreadable.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Not valid TOML for this format.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's words, with the key and line.
        message: String,
    },
    /// No such host.
    #[error("no host `{host}` in {path}; known: {known}")]
    NoSuchHost {
        /// The file.
        path: PathBuf,
        /// The name asked for.
        host: String,
        /// The names it has.
        known: String,
    },
}

/// The default config path: `$XDG_CONFIG_HOME/knock/config.toml` or
/// `~/.config/knock/config.toml`.
#[must_use]
pub fn default_path() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_CONFIG_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("knock/config.toml");
    }
    home().join(".config/knock/config.toml")
}

fn home() -> PathBuf {
    std::env::var_os("HOME").map_or_else(|| PathBuf::from("/"), PathBuf::from)
}

/// `~/x` → `$HOME/x`; other paths unchanged.
#[must_use]
pub fn expand_home(path: &Path) -> PathBuf {
    match path.strip_prefix("~") {
        Ok(rest) => home().join(rest),
        Err(_) => path.to_owned(),
    }
}

/// Reads the client config at `path`.
pub fn load(path: &Path) -> Result<ClientConfig, ClientConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ClientConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(path, &text)
}

/// Parses client config text (for tests and `load`).
pub fn parse(path: &Path, text: &str) -> Result<ClientConfig, ClientConfigError> {
    config::Config::builder()
        .add_source(config::File::from_str(text, config::FileFormat::Toml))
        .build()
        .and_then(config::Config::try_deserialize)
        .map_err(|e| ClientConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })
}

impl ClientConfig {
    /// The entry named `host`, or else the one whose `address` is `host` (ssh's `%h`
    /// is the `HostName`, not the alias), or an error listing the known names.
    pub fn host(&self, path: &Path, host: &str) -> Result<&HostEntry, ClientConfigError> {
        self.hosts
            .get(host)
            .or_else(|| {
                self.hosts
                    .values()
                    .find(|e| e.address.eq_ignore_ascii_case(host))
            })
            .ok_or_else(|| ClientConfigError::NoSuchHost {
                path: path.to_owned(),
                host: host.to_owned(),
                known: if self.hosts.is_empty() {
                    "none".to_owned()
                } else {
                    self.hosts.keys().cloned().collect::<Vec<_>>().join(", ")
                },
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_entry_with_defaults() {
        let text = "[hosts.web]\naddress = \"192.0.2.1\"\nkey_id = \"a\"\nkey_file = \"~/k\"\n";
        let c = parse(Path::new("c.toml"), text).unwrap();
        let h = c.host(Path::new("c.toml"), "web").unwrap();
        assert_eq!((h.port, h.ssh_port), (62201, 22));
        assert!(h.ttl.is_none() && h.server_id.is_none());
        assert_eq!(expand_home(&h.key_file), home().join("k"));
    }

    #[test]
    fn a_host_is_found_by_its_address_too() {
        let text =
            "[hosts.web]\naddress = \"web1.example.org\"\nkey_id = \"a\"\nkey_file = \"k\"\n";
        let c = parse(Path::new("c.toml"), text).unwrap();
        assert!(c.host(Path::new("c.toml"), "web1.example.org").is_ok());
    }

    #[test]
    fn unknown_host_lists_the_known_ones() {
        let text = "[hosts.web]\naddress = \"a\"\nkey_id = \"a\"\nkey_file = \"k\"\n";
        let c = parse(Path::new("c.toml"), text).unwrap();
        let msg = c.host(Path::new("c.toml"), "db").unwrap_err().to_string();
        assert!(msg.contains("`db`") && msg.contains("web"), "{msg}");
    }

    #[test]
    fn typos_are_refused_with_the_key() {
        let text =
            "[hosts.web]\naddress = \"a\"\nkey_id = \"a\"\nkey_file = \"k\"\nkey_fiel = \"x\"\n";
        let msg = parse(Path::new("c.toml"), text).unwrap_err().to_string();
        assert!(msg.contains("key_fiel"), "{msg}");
    }
}
