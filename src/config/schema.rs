//! The config file's shape: every key, its type and its default. `mod.rs` reads and
//! checks it; nothing here does I/O.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

pub use crate::service::{Ports, Protocol};

/// The conntrack mark bit knockgate uses unless configured: one high bit, clear of
/// the low bits other tools (and `connmark` recipes) usually take.
pub const DEFAULT_CONNTRACK_MARK: u32 = 0x1000_0000;

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

/// What the daemon does when someone else changes or deletes its table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum Tamper {
    /// Lock the table so nobody else can change it (owner + persist flags, Linux ≥ 6.9);
    /// where the kernel cannot, repair as below.
    Lock,
    /// Put the baseline and the booked grants back within a second, and log a warning.
    Repair,
    /// Only log a warning.
    Warn,
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
    /// What happens when someone else changes the table.
    pub tamper: Tamper,
    /// The conntrack mark bit(s) knockgate's accepting rules set on the connections
    /// they admit, and its established rules require: a connection that slipped in
    /// while the table was gone (flushed on a kernel without the table lock) is not
    /// carried on by the repaired baseline.
    pub conntrack_mark: u32,
    /// Inbound services.
    pub inbound: Inbound,
    /// The knock port.
    pub knock: Knock,
    /// Where DNS may go.
    pub dns: Dns,
    /// Logging of dropped packets.
    pub log: Log,
    /// Egress windows (`egress-window`).
    pub egress: Egress,
    /// The local admin socket.
    pub admin: Admin,
    /// Services knocks and admins can open besides `ssh` (`[[services]]`).
    pub services: Vec<ServiceSpec>,
    /// Knock keys, each with its own policy.
    pub keys: Vec<KeySpec>,
    /// Keys of fwknop clients (`[[fwknop_keys]]`), tried in this order.
    pub fwknop_keys: Vec<FwknopKeySpec>,
    /// The shape of authenticated port sequences (keys with `sequence = true`).
    pub sequence: Sequence,
}

/// `[sequence]`: what every key's port sequence looks like. Only keys with
/// `sequence = true` have one; with none, nothing of this is in the ruleset.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct Sequence {
    /// The ports touches go to (`"30000-60999"`): never a port the baseline uses.
    pub ports: PortValue,
    /// Touches per sequence (3 to 8).
    pub length: u8,
    /// `tcp` (SYNs), `udp` (datagrams) or `mixed`.
    pub protocol: String,
    /// How long one step's sequence is current; the previous step's is accepted too.
    pub step: Dur,
    /// The netfilter log group the kernel tells the daemon of completed sequences on.
    pub log_group: u16,
    /// Sources in the middle of a sequence the kernel tracks at once, per family; when
    /// it is full, new sequences fail until entries time out (a few seconds).
    pub max_sources: u32,
}

impl Default for Sequence {
    fn default() -> Self {
        Self {
            ports: PortValue::Text("30000-60999".to_owned()),
            length: 4,
            protocol: "tcp".to_owned(),
            step: Dur(Duration::from_secs(30)),
            log_group: 7_201,
            max_sources: 65_536,
        }
    }
}

/// An fwknop client's stanza (what an access.conf `SOURCE` block says): its keys in a
/// file, and what its packets may open.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct FwknopKeySpec {
    /// A name for logs and grants (`fwknop NAME`); like a key id.
    pub name: String,
    /// File with `KEY_BASE64` and `HMAC_KEY_BASE64` lines, mode 0600.
    pub file: PathBuf,
    /// `HMAC_DIGEST_TYPE`: `sha256` (default), `sha384` or `sha512`.
    #[serde(default = "default_hmac_digest")]
    pub hmac_digest: String,
    /// Services its requested ports may open (`OPEN_PORTS`, mapped to services).
    #[serde(default = "default_services")]
    pub services: Vec<String>,
    /// Networks a grant's address must lie in (`SOURCE`).
    #[serde(default = "default_sources")]
    pub sources: Vec<String>,
    /// Grant length when the client asks none (`FW_ACCESS_TIMEOUT`, default 30 s).
    #[serde(default = "default_fwknop_ttl")]
    pub ttl: Dur,
    /// Longest grant, also for the client's own `-f` (`MAX_FW_TIMEOUT`); the server's
    /// `knock.max_ttl` caps it too.
    #[serde(default)]
    pub max_ttl: Option<Dur>,
    /// Refuse a request that names no address (the client's `-s`, `0.0.0.0`):
    /// `REQUIRE_SOURCE_ADDRESS`. On by default.
    #[serde(default = "default_true")]
    pub require_source_address: bool,
    /// Allow the request's address to differ from the packet's source.
    #[serde(default)]
    pub other_source: bool,
    /// Most grants this stanza may hold open at once.
    #[serde(default = "default_key_max_grants")]
    pub max_grants: u32,
}

fn default_hmac_digest() -> String {
    "sha256".to_owned()
}

fn default_fwknop_ttl() -> Dur {
    Dur(Duration::from_secs(30))
}

fn default_true() -> bool {
    true
}

/// A service: a port (or a range) of one protocol that opens, like SSH, only for
/// granted source addresses, IPv4 and IPv6.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ServiceSpec {
    /// Its name: what keys list, knocks ask for and logs say.
    pub name: String,
    /// `tcp` or `udp`.
    pub protocol: Protocol,
    /// One port (`51820`) or a range (`"8000-8010"`).
    pub port: PortValue,
}

/// A port as written in the config: a number, or `"FIRST-LAST"`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum PortValue {
    /// `port = 51820`.
    Number(i64),
    /// `port = "8000-8010"` (or `"8443"`).
    Text(String),
}

impl PortValue {
    /// The port range, or what is wrong with it.
    pub fn parse(&self) -> Result<Ports, String> {
        let port = |n: i64| -> Result<u16, String> {
            match u16::try_from(n) {
                Ok(0) => Err("port 0 is not a port; expected 1-65535".to_owned()),
                Ok(p) => Ok(p),
                Err(_) => Err(format!("found {n}, expected a port from 1 to 65535")),
            }
        };
        let number = |t: &str| -> Result<u16, String> {
            t.trim()
                .parse::<i64>()
                .map_err(|_| {
                    format!(
                        "found \"{}\", expected a port (22) or a range (\"8000-8010\")",
                        t.escape_debug()
                    )
                })
                .and_then(port)
        };
        match self {
            Self::Number(n) => port(*n).map(Ports::one),
            Self::Text(text) => {
                let (first, last) = if let Some((a, b)) = text.split_once('-') {
                    (number(a)?, number(b)?)
                } else {
                    let p = number(text)?;
                    (p, p)
                };
                if first > last {
                    return Err(format!("range {first}-{last} ends before it starts"));
                }
                Ok(Ports { first, last })
            }
        }
    }
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
    /// Sources the per-source meter tracks at once, per family. When it is full (a
    /// spoofed flood), new sources share `full_meter_rate_per_second` instead of
    /// being dropped.
    pub meter_size: u32,
    /// Knock datagrams accepted per second from all sources together that the full
    /// meter cannot track.
    pub full_meter_rate_per_second: u32,
    /// IPv6 sources are metered, counted and banned by this prefix (a host gets a
    /// whole /64: per address, one host could fill the meter and escape its ban).
    pub ipv6_prefix: u8,
    /// What knocks are bound to; empty means this host's name.
    pub server_id: String,
    /// How far a knock's timestamp may be from the server's clock, either way.
    pub skew: Dur,
    /// Grant length when a knock asks for none.
    pub default_ttl: Dur,
    /// Longest grant any knock or admin request gets; longer requests are capped.
    pub max_ttl: Dur,
    /// Where the replay guard and the grant book are kept across restarts.
    pub state_dir: PathBuf,
    /// Most grants open at once, all services and both families together (the last
    /// 1,000 are kept for admins). Each costs the daemon ~150 bytes and the kernel
    /// ~120 (charged to the daemon's cgroup): past 100,000, raise the unit's
    /// `MemoryMax` with it.
    pub max_grants: u32,
    /// Banning sources that keep sending invalid knocks.
    pub ban: Ban,
}

/// Sources that send `after` invalid knocks within `within` are dropped at the knock
/// port for `duration` (kernel set with timeouts).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct Ban {
    /// Whether to ban at all.
    pub enabled: bool,
    /// Invalid knocks tolerated from one source…
    pub after: u32,
    /// …within this window.
    pub within: Dur,
    /// How long a ban lasts.
    pub duration: Dur,
    /// Most sources (IPv6: prefixes) banned at once, per family; past it new bans are
    /// refused (and logged) until old ones end.
    pub max: u32,
}

/// What an egress window lets out.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct Egress {
    /// TCP ports a window opens outbound (HTTP, HTTPS).
    pub ports: Vec<u16>,
    /// Longest window; longer requests are capped.
    pub max_ttl: Dur,
}

impl Default for Egress {
    fn default() -> Self {
        Self {
            ports: vec![80, 443],
            max_ttl: Dur(Duration::from_secs(60 * 60)),
        }
    }
}

/// The local admin socket (`knockgate`, `egress-window`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct Admin {
    /// Socket path.
    pub socket: PathBuf,
    /// Members of this group may use the socket; root always may.
    pub group: String,
    /// May members of the admin group also change the config (`reload`, `apply`,
    /// `confirm`)? Off by default: a confirmed `apply` rewrites the firewall for good,
    /// so only root may, while opening, listing and revoking stay the group's.
    pub group_may_change_config: bool,
}

/// One knock key and what it may open.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct KeySpec {
    /// The key id sent in knocks.
    pub id: String,
    /// File holding the key as 64 hex digits; must not be readable by group or others.
    pub file: PathBuf,
    /// Services this key may open.
    #[serde(default = "default_services")]
    pub services: Vec<String>,
    /// Source networks grants may be for (CIDR); default: anywhere.
    #[serde(default = "default_sources")]
    pub sources: Vec<String>,
    /// Longest grant for this key (the server's `knock.max_ttl` caps it too).
    #[serde(default)]
    pub max_ttl: Option<Dur>,
    /// Allow a knock to name an address other than the one it comes from.
    #[serde(default)]
    pub other_source: bool,
    /// Allow knocks bound to no address (the grant is for the packet's source, so
    /// anyone who sees the knock can race it from their own address): for clients
    /// behind a NAT that cannot learn their public address. Off by default.
    #[serde(default)]
    pub allow_unbound: bool,
    /// Most grants this key may hold open at once (a laptop needs a few: one per
    /// family and network it moves through). Past it a knock for a new address is
    /// refused; renewals work. Bounds what one key — or one stolen key, with spoofed
    /// sources — can take of the server's 100,000.
    #[serde(default = "default_key_max_grants")]
    pub max_grants: u32,
    /// This key also has an authenticated port sequence (`[sequence]`), for clients
    /// that can only touch ports (knockd's `knock`, phone apps). Off by default.
    #[serde(default)]
    pub sequence: bool,
    /// What a completed sequence opens: one of `services` (default: `ssh` if listed,
    /// else the first listed).
    #[serde(default)]
    pub sequence_service: Option<String>,
    /// How long a completed sequence's grant lasts (default: `knock.default_ttl`,
    /// capped by `max_ttl`).
    #[serde(default)]
    pub sequence_ttl: Option<Dur>,
}

#[cfg(test)]
impl KeySpec {
    /// A test key `id` that may open ssh from anywhere and has a port sequence whose
    /// grants last `ttl_secs`.
    pub(crate) fn with_sequence(id: &str, ttl_secs: u64) -> Self {
        Self {
            id: id.into(),
            file: "/k".into(),
            services: default_services(),
            sources: default_sources(),
            max_ttl: None,
            other_source: false,
            allow_unbound: false,
            max_grants: default_key_max_grants(),
            sequence: true,
            sequence_service: None,
            sequence_ttl: Some(Dur(Duration::from_secs(ttl_secs))),
        }
    }
}

fn default_key_max_grants() -> u32 {
    64
}

fn default_services() -> Vec<String> {
    vec!["ssh".to_owned()]
}

fn default_sources() -> Vec<String> {
    vec!["0.0.0.0/0".to_owned(), "::/0".to_owned()]
}

/// A duration written like `30s`, `10m`, `1h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct Dur(pub Duration);

impl TryFrom<String> for Dur {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        humantime::parse_duration(text.trim())
            .map(Dur)
            .map_err(|_| {
                format!(
                    "found \"{}\", expected a duration like 30s, 10m or 1h",
                    text.escape_debug()
                )
            })
    }
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
config_words!(Protocol { "tcp" => Tcp, "udp" => Udp });
config_words!(Tamper { "lock" => Lock, "repair" => Repair, "warn" => Warn });

impl Default for Config {
    fn default() -> Self {
        Self {
            table: "knockgate".to_owned(),
            outbound: Outbound::Locked,
            forward: Forward::Drop,
            on_stop: OnStop::Keep,
            tamper: Tamper::Lock,
            conntrack_mark: DEFAULT_CONNTRACK_MARK,
            inbound: Inbound::default(),
            knock: Knock::default(),
            dns: Dns::default(),
            log: Log::default(),
            egress: Egress::default(),
            admin: Admin::default(),
            services: Vec::new(),
            keys: Vec::new(),
            fwknop_keys: Vec::new(),
            sequence: Sequence::default(),
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

/// `knock.max_grants` unless the config says otherwise.
pub const DEFAULT_MAX_GRANTS: u32 = 100_000;
/// The most `knock.max_grants` may be: what is measured (`cargo bench --bench knock`,
/// "a million grants in the lab").
pub const MOST_GRANTS: u32 = 1_000_000;
/// The least it may be: more than the admins' reserve.
pub const LEAST_GRANTS: u32 = 2_000;

impl Default for Knock {
    fn default() -> Self {
        Self {
            port: 62201,
            rate_per_second: 5,
            burst: 10,
            meter_size: 65_535,
            full_meter_rate_per_second: 1_000,
            ipv6_prefix: 64,
            server_id: String::new(),
            skew: Dur(Duration::from_secs(30)),
            default_ttl: Dur(Duration::from_secs(15 * 60)),
            max_ttl: Dur(Duration::from_secs(60 * 60)),
            state_dir: PathBuf::from("/var/lib/knockgate"),
            max_grants: DEFAULT_MAX_GRANTS,
            ban: Ban::default(),
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

impl Default for Ban {
    fn default() -> Self {
        Self {
            enabled: true,
            after: 20,
            within: Dur(Duration::from_secs(60)),
            duration: Dur(Duration::from_secs(10 * 60)),
            max: 65_536,
        }
    }
}

impl Default for Admin {
    fn default() -> Self {
        Self {
            socket: PathBuf::from("/run/knockgate/admin.sock"),
            group: "knockgate".to_owned(),
            group_may_change_config: false,
        }
    }
}
