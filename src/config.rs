//! The configuration file: reading it (TOML plus `KNOCKGATE_…` environment
//! overrides), and checking every value before anything touches the kernel.
//!
//! This module owns the one rule users rely on most: a bad config changes
//! nothing, and the error names the file, the key and what was expected.
//! It never talks to the kernel; the only I/O is reading the config file and,
//! when no resolvers are listed, the resolv.conf it names.

use std::collections::HashSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

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

/// What the output chain does with traffic the baseline does not name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum Outbound {
    /// Policy drop: the host makes no connections of its own beyond DNS to the resolvers.
    Locked,
    /// Policy accept: outbound is not filtered at all.
    Open,
}

/// Whether knockgate owns forwarding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum Forward {
    /// A forward chain with policy drop.
    Drop,
    /// No forward chain at all, so Docker, libvirt and friends keep control of forwarding.
    Leave,
}

/// What the daemon does with its table when it stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum OnStop {
    /// Leave the baseline in the kernel: stopping the daemon never opens the host (fail closed).
    Keep,
    /// Delete knockgate's own table (and nothing else).
    Remove,
}

/// The whole validated configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct Config {
    /// Name of knockgate's own `inet` table.
    pub table: String,
    /// Output chain policy.
    pub outbound: Outbound,
    /// Forward chain policy, or no forward chain.
    pub forward: Forward,
    /// What happens to the table when the daemon stops.
    pub on_stop: OnStop,
    /// Inbound services.
    pub inbound: Inbound,
    /// The knock port.
    pub knock: Knock,
    /// Where DNS may go.
    pub dns: Dns,
    /// Logging of dropped packets.
    pub log: Log,
}

/// Inbound services and ICMP.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct Inbound {
    /// TCP ports open to everyone (the web server).
    pub tcp_ports: Vec<u16>,
    /// The SSH port, open only to granted source addresses.
    pub ssh_port: u16,
    /// Answer ICMP/ICMPv6 echo requests.
    pub ping: bool,
    /// Echo requests accepted per second (all sources together).
    pub ping_rate_per_second: u32,
}

/// The UDP port that takes knocks.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct Knock {
    /// UDP port of the knock listener.
    pub port: u16,
    /// Knock datagrams accepted per second from one source address.
    pub rate_per_second: u32,
    /// Datagrams one source may send in a burst before the rate applies.
    pub burst: u32,
}

/// DNS resolvers the host may query.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct Dns {
    /// Resolver addresses; empty means "the nameservers of `resolv_conf` at start".
    pub resolvers: Vec<String>,
    /// The resolv.conf read when `resolvers` is empty.
    pub resolv_conf: PathBuf,
}

/// Logging of packets the policy drops.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct Log {
    /// Log dropped packets to the kernel log.
    pub dropped: bool,
    /// Prefix of the kernel log lines; the chain name is appended.
    pub prefix: String,
    /// Log lines per minute for each chain, at most.
    pub rate_per_minute: u32,
}

/// `TryFrom<String>` for a config enum, so that a wrong value is reported with the
/// key and the accepted words (`expected "locked" or "open"`).
macro_rules! config_words {
    ($ty:ident { $($word:literal => $variant:ident),+ $(,)? }) => {
        impl TryFrom<String> for $ty {
            type Error = String;
            fn try_from(word: String) -> Result<Self, String> {
                match word.as_str() {
                    $($word => Ok(Self::$variant),)+
                    _ => Err(format!(
                        "found \"{}\", expected one of: {}",
                        word.escape_debug(),
                        [$(concat!("\"", $word, "\"")),+].join(", ")
                    )),
                }
            }
        }
    };
}

config_words!(Outbound { "locked" => Locked, "open" => Open });
config_words!(Forward { "drop" => Drop, "leave" => Leave });
config_words!(OnStop { "keep" => Keep, "remove" => Remove });

impl Default for Config {
    fn default() -> Self {
        Self {
            table: "knockgate".to_owned(),
            outbound: Outbound::Locked,
            forward: Forward::Drop,
            on_stop: OnStop::Keep,
            inbound: Inbound::default(),
            knock: Knock::default(),
            dns: Dns::default(),
            log: Log::default(),
        }
    }
}

impl Default for Inbound {
    fn default() -> Self {
        Self {
            tcp_ports: vec![80, 443],
            ssh_port: 22,
            ping: true,
            ping_rate_per_second: 10,
        }
    }
}

impl Default for Knock {
    fn default() -> Self {
        Self {
            port: 62201,
            rate_per_second: 5,
            burst: 10,
        }
    }
}

impl Default for Dns {
    fn default() -> Self {
        Self {
            resolvers: Vec::new(),
            resolv_conf: PathBuf::from("/etc/resolv.conf"),
        }
    }
}

impl Default for Log {
    fn default() -> Self {
        Self {
            dropped: true,
            prefix: "knockgate".to_owned(),
            rate_per_minute: 10,
        }
    }
}

/// Longest log prefix accepted; the kernel allows 127 bytes and knockgate appends the chain name.
const MAX_LOG_PREFIX: usize = 100;
/// Longest table name accepted (the kernel allows 255; short names keep `nft list` readable).
const MAX_TABLE_NAME: usize = 64;

/// A config that passed every check, with the resolvers it will use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loaded {
    /// The file it came from.
    pub path: PathBuf,
    /// The checked config.
    pub config: Config,
    /// The DNS resolvers: `dns.resolvers`, or the nameservers of `dns.resolv_conf`.
    pub resolvers: Vec<IpAddr>,
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
    Ok(Loaded {
        path: path.to_owned(),
        config,
        resolvers,
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

fn validate(path: &Path, config: &Config) -> Result<(), ConfigError> {
    let invalid = |key: &str, expected: String| ConfigError::Invalid {
        path: path.to_owned(),
        key: key.to_owned(),
        expected,
    };
    let table_ok = !config.table.is_empty()
        && config.table.len() <= MAX_TABLE_NAME
        && config
            .table
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if !table_ok {
        return Err(invalid(
            "table",
            format!("expected 1 to {MAX_TABLE_NAME} letters, digits, `_` or `-`"),
        ));
    }
    let mut seen = HashSet::new();
    for (i, &port) in config.inbound.tcp_ports.iter().enumerate() {
        let key = format!("inbound.tcp_ports[{i}]");
        if port == 0 {
            return Err(invalid(
                &key,
                "port 0 is not a port; expected 1-65535".into(),
            ));
        }
        if !seen.insert(port) {
            return Err(invalid(&key, format!("port {port} is listed twice")));
        }
        if port == config.inbound.ssh_port {
            return Err(invalid(
                &key,
                format!("port {port} is the SSH port, which opens only for grants; remove it here"),
            ));
        }
    }
    for (key, port) in [
        ("inbound.ssh_port", config.inbound.ssh_port),
        ("knock.port", config.knock.port),
    ] {
        if port == 0 {
            return Err(invalid(
                key,
                "port 0 is not a port; expected 1-65535".into(),
            ));
        }
    }
    for (key, rate) in [
        (
            "inbound.ping_rate_per_second",
            config.inbound.ping_rate_per_second,
        ),
        ("knock.rate_per_second", config.knock.rate_per_second),
        ("knock.burst", config.knock.burst),
        ("log.rate_per_minute", config.log.rate_per_minute),
    ] {
        if rate == 0 {
            return Err(invalid(key, "expected a number of at least 1".into()));
        }
    }
    let prefix_ok = config.log.prefix.len() <= MAX_LOG_PREFIX
        && config
            .log
            .prefix
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\' || b == b' ');
    if !prefix_ok {
        return Err(invalid(
            "log.prefix",
            format!(
                "expected at most {MAX_LOG_PREFIX} printable ASCII characters without quotes or backslashes"
            ),
        ));
    }
    let mut seen = HashSet::new();
    for (i, text) in config.dns.resolvers.iter().enumerate() {
        let key = format!("dns.resolvers[{i}]");
        let addr: IpAddr = text
            .parse()
            .map_err(|_| invalid(&key, format!("`{text}` is not an IPv4 or IPv6 address")))?;
        if !seen.insert(addr) {
            return Err(invalid(&key, format!("resolver {addr} is listed twice")));
        }
    }
    Ok(())
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
