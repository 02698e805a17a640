//! The configuration file: reading it (TOML plus `KNOCKGATE_…` environment
//! overrides), and checking every value before anything touches the kernel.
//!
//! This module owns the one rule users rely on most: a bad config changes
//! nothing, and the error names the file, the key and what was expected.
//! It never talks to the kernel; the only I/O is reading the config file and,
//! when no resolvers are listed, the resolv.conf it names.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use crate::knock::auth::ServerId;

mod keys;
mod schema;
mod validate;
pub use keys::load_keys;
pub use schema::*;
use validate::validate;

/// Where the daemon and the admin CLI look for the config unless `--config` says otherwise.
pub const DEFAULT_PATH: &str = "/etc/knockgate/knockgate.toml";

/// Prefix of environment variables that override config keys: `KNOCKGATE_INBOUND__SSH_PORT=2222`
/// sets `inbound.ssh_port` (two underscores separate the levels).
pub const ENV_PREFIX: &str = "KNOCKGATE";

/// Errors from reading or checking a config; each names the file and, where
/// one is at fault, the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file is missing or unreadable.
    #[error("cannot read config file {path}")]
    ReadFile {
        /// The config file.
        path: PathBuf,
        /// Why it could not be read.
        #[source]
        source: std::io::Error,
    },
    /// The TOML does not parse or a value has the wrong type.
    #[error("{path}: {message}")]
    Parse {
        /// The config file.
        path: PathBuf,
        /// The parser's own words, which carry the key (and the line where it knows it).
        message: String,
    },
    /// A key that knockgate does not know (most often a typo).
    #[error("{path}: unknown key `{key}`")]
    UnknownKey {
        /// The config file.
        path: PathBuf,
        /// The key path, e.g. `inbound.tcp_port`.
        key: String,
    },
    /// A value of the right type that is still not acceptable.
    #[error("{path}: key `{key}`: {expected}")]
    Invalid {
        /// The config file.
        path: PathBuf,
        /// The key path, e.g. `inbound.tcp_ports[1]`.
        key: String,
        /// What was wrong and what is expected instead.
        expected: String,
    },
    /// A key file cannot be read.
    #[error("{path}: key `{key}`: cannot read key file {file}")]
    ReadKeyFile {
        /// The config file.
        path: PathBuf,
        /// The key path, e.g. `keys[0].file`.
        key: String,
        /// The key file.
        file: PathBuf,
        /// Why it could not be read.
        #[source]
        source: std::io::Error,
    },
    /// A key file others could read: refused, since anyone who reads it can knock.
    #[error(
        "{path}: key `{key}`: key file {file} is readable by group or others (mode {mode:04o}); run chmod 600 on it"
    )]
    KeyFileMode {
        /// The config file.
        path: PathBuf,
        /// The key path.
        key: String,
        /// The key file.
        file: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A key file that does not hold 64 hex digits.
    #[error("{path}: key `{key}`: key file {file} does not hold a key (expected 64 hex digits)")]
    KeyFileContent {
        /// The config file.
        path: PathBuf,
        /// The key path.
        key: String,
        /// The key file.
        file: PathBuf,
    },
    /// An fwknop key file that does not hold a usable key pair.
    #[error(
        "{path}: key `{key}`: key file {file} does not hold an fwknop key pair (expected a KEY_BASE64 line of 1-32 bytes and an HMAC_KEY_BASE64 line of 1-136 bytes, different keys)"
    )]
    FwknopKeyFileContent {
        /// The config file.
        path: PathBuf,
        /// The key path.
        key: String,
        /// The key file.
        file: PathBuf,
    },
    /// No resolvers were listed and the resolv.conf to take them from is unreadable.
    #[error("{path}: key `dns.resolvers` is empty and {resolv_conf} cannot be read")]
    ReadResolvConf {
        /// The config file.
        path: PathBuf,
        /// The resolv.conf named by `dns.resolv_conf`.
        resolv_conf: PathBuf,
        /// Why it could not be read.
        #[source]
        source: std::io::Error,
    },
}

/// A config that passed every check, with the resolvers it will use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loaded {
    /// The file it came from.
    pub path: PathBuf,
    /// The checked config.
    pub config: Config,
    /// The DNS resolvers: `dns.resolvers`, or the nameservers of `dns.resolv_conf`.
    pub resolvers: Vec<IpAddr>,
    /// What knocks are bound to: `knock.server_id`, or this host's name.
    pub server_id: ServerId,
}

/// Reads `path`, applies `KNOCKGATE_…` overrides from the environment, checks
/// everything, and resolves the DNS resolvers.
pub fn load(path: &Path) -> Result<Loaded, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
        path: path.to_owned(),
        source,
    })?;
    load_str(path, &text, std::env::vars())
}

/// Like [`load`], with the file's text and the environment given, so tests need no files
/// or process-wide environment changes.
pub fn load_str(
    path: &Path,
    text: &str,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Loaded, ConfigError> {
    let config = parse(path, text, env)?;
    validate(path, &config)?;
    let resolvers = resolvers(path, &config)?;
    let server_id = server_id(path, &config)?;
    Ok(Loaded {
        path: path.to_owned(),
        config,
        resolvers,
        server_id,
    })
}

fn parse(
    path: &Path,
    text: &str,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Config, ConfigError> {
    let parse_error = |e: config::ConfigError| ConfigError::Parse {
        path: path.to_owned(),
        message: e.to_string(),
    };
    let env: config::Map<String, String> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with(ENV_PREFIX))
        .collect();
    let source = config::Config::builder()
        .add_source(config::File::from_str(text, config::FileFormat::Toml))
        .add_source(
            config::Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("_")
                .separator("__")
                .try_parsing(true)
                .list_separator(",")
                .with_list_parse_key("inbound.tcp_ports")
                .with_list_parse_key("dns.resolvers")
                .source(Some(env)),
        )
        .build()
        .map_err(parse_error)?;
    let mut unknown = Vec::new();
    let config: Config = serde_ignored::deserialize(source, |key| unknown.push(key.to_string()))
        .map_err(parse_error)?;
    if let Some(key) = unknown.into_iter().next() {
        return Err(ConfigError::UnknownKey {
            path: path.to_owned(),
            key,
        });
    }
    Ok(config)
}

fn server_id(path: &Path, config: &Config) -> Result<ServerId, ConfigError> {
    let text = if config.knock.server_id.is_empty() {
        nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_default()
    } else {
        config.knock.server_id.clone()
    };
    ServerId::new(&text).map_err(|_| ConfigError::Invalid {
        path: path.to_owned(),
        key: "knock.server_id".to_owned(),
        expected: "this host has no usable name; set knock.server_id".to_owned(),
    })
}

fn resolvers(path: &Path, config: &Config) -> Result<Vec<IpAddr>, ConfigError> {
    if !config.dns.resolvers.is_empty() {
        // Already checked by `validate`; parse again rather than keep two representations.
        return Ok(config
            .dns
            .resolvers
            .iter()
            .filter_map(|text| text.parse().ok())
            .collect());
    }
    let text = std::fs::read_to_string(&config.dns.resolv_conf).map_err(|source| {
        ConfigError::ReadResolvConf {
            path: path.to_owned(),
            resolv_conf: config.dns.resolv_conf.clone(),
            source,
        }
    })?;
    Ok(nameservers(&text))
}

/// What a key's completed sequence opens: `sequence_service`, else `ssh` if the key
/// lists it, else the first service it lists.
#[must_use]
pub fn sequence_service(key: &KeySpec) -> &str {
    if let Some(s) = &key.sequence_service {
        return s;
    }
    if key.services.iter().any(|s| s == crate::service::SSH) {
        return crate::service::SSH;
    }
    key.services
        .first()
        .map_or(crate::service::SSH, String::as_str)
}

/// How long a key's completed sequence's grant lasts: `sequence_ttl`, else the
/// knock default capped by the key's and the server's longest.
#[must_use]
pub fn sequence_ttl(config: &Config, key: &KeySpec) -> std::time::Duration {
    let max = key
        .max_ttl
        .map_or(config.knock.max_ttl.0, |m| m.0.min(config.knock.max_ttl.0));
    key.sequence_ttl
        .map_or(config.knock.default_ttl.0, |t| t.0)
        .min(max)
}

impl Config {
    /// The sequence shape, when some key has a sequence (`validate` checked it).
    #[must_use]
    pub fn sequence_spec(&self) -> Option<crate::sequence::SequenceSpec> {
        if !self.keys.iter().any(|k| k.sequence) {
            return None;
        }
        let q = &self.sequence;
        Some(crate::sequence::SequenceSpec {
            ports: q.ports.parse().ok()?,
            length: q.length,
            protocols: crate::sequence::TouchProtocols::from_name(&q.protocol)?,
            step_secs: u32::try_from(q.step.0.as_secs()).ok()?,
        })
    }
}

/// A `sources` entry: a network (`198.51.100.0/24`) or a single address.
#[must_use]
pub fn parse_network(text: &str) -> Option<ipnet::IpNet> {
    text.parse::<ipnet::IpNet>()
        .ok()
        .or_else(|| text.parse::<IpAddr>().ok().map(ipnet::IpNet::from))
}

/// The `nameserver` addresses of a resolv.conf, in order, without duplicates; lines
/// that do not parse are skipped, as the C resolver skips them.
#[must_use]
pub fn nameservers(resolv_conf: &str) -> Vec<IpAddr> {
    let mut found = Vec::new();
    for line in resolv_conf.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        // A scoped IPv6 address (fe80::1%eth0) names its interface; the address is enough here.
        let Some(addr) = words
            .next()
            .and_then(|w| w.split('%').next())
            .and_then(|w| w.parse::<IpAddr>().ok())
        else {
            continue;
        };
        if !found.contains(&addr) {
            found.push(addr);
        }
    }
    found
}

#[cfg(test)]
mod tests;
