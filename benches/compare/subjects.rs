//! The three daemons under test, each set up in the lab's server namespace the way
//! its documentation says, guarding SSH (port 22) the same way: closed until a knock.
//!
//! * knockgate: knockgated with one key; the baseline drops 22 without a grant.
//! * fwknopd 2.6.10 in UDP-server mode (`-U`), Rijndael + HMAC-SHA256 keys, one
//!   access stanza opening tcp/22; `iptables -A INPUT -p tcp --dport 22 -j DROP`
//!   below its FWKNOP_INPUT jump.
//! * knockd 0.8: a 3-port UDP sequence whose start command inserts an iptables
//!   ACCEPT for the source and whose stop command removes it after `cmd_timeout`.
//!
//! The peers' binaries come from their Debian packages unpacked (never installed, so
//! no maintainer script starts them on the host) under `$PEERS_ROOT`
//! (default `target/peers/root`, made by `make peers`).

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use knockgate::knock::auth::{ServerId, seal};
use knockgate::knock::{AddressClaim, KeyId, Knock, Secret, ServiceId};

use crate::support::{self, Host, Lab};

pub const KEY_HEX: &str = "6c1e9a4f2b7d0c5e8a3f6b1d4e9c2a7f0b5d8e3a6c1f4b9e2d7a0c5f8b3e6d1a";
/// fwknop's keys, base64: a 32-byte Rijndael key and a 64-byte HMAC-SHA256 key.
pub const FWKNOP_KEY: &str = "AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA=";
pub const FWKNOP_HMAC: &str =
    "ZGVmZ2hpamtsbW5vcHFyc3R1dnd4eXp7fH1+f4CBgoOEhYaHiImKi4yNjo+QkZKTlJWWl5iZmpucnZ6foKGiow==";
/// knockd's sequence.
pub const KNOCKD_PORTS: [u16; 3] = [7000, 8000, 9000];
/// The knock port of knockgate and fwknopd.
pub const SPA_PORT: u16 = 62201;

/// Which daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Knockgate,
    Fwknopd,
    Knockd,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Knockgate, Kind::Fwknopd, Kind::Knockd];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Knockgate => "knockgate",
            Kind::Fwknopd => "fwknopd",
            Kind::Knockd => "knockd",
        }
    }
}

/// Where the unpacked peer binaries live.
pub fn peers_root() -> PathBuf {
    std::env::var_os("PEERS_ROOT").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("target/peers/root"),
        PathBuf::from,
    )
}

/// Whether `kind` can run here (the peers must have been unpacked).
pub fn available(kind: Kind) -> bool {
    let root = peers_root();
    match kind {
        Kind::Knockgate => true,
        Kind::Fwknopd => {
            root.join("usr/sbin/fwknopd").exists() && root.join("usr/bin/fwknop").exists()
        }
        Kind::Knockd => root.join("usr/sbin/knockd").exists(),
    }
}

/// One knock, as the datagrams the laptop sends, in order, to these ports.
pub type KnockDatagrams = Vec<(u16, Vec<u8>)>;

/// A running daemon in `lab`'s server namespace.
pub struct Subject {
    pub kind: Kind,
    /// knockgated (through the lab's runner, which kills it on drop).
    knockgated: Option<support::Daemon>,
    /// A peer, started with `ip netns exec`.
    peer: Option<Child>,
    admin_socket: PathBuf,
    dir: PathBuf,
}

/// How a subject is set up.
pub struct Setup {
    /// How long a grant lasts.
    pub ttl_secs: u64,
}

impl Subject {
    /// Starts `kind` in `lab` and waits until it listens.
    pub fn start(kind: Kind, lab: &Lab, setup: &Setup) -> Self {
        let dir = lab.dir().join(kind.name());
        std::fs::create_dir_all(&dir).unwrap();
        let mut subject = Self {
            kind,
            knockgated: None,
            peer: None,
            admin_socket: lab.dir().join("admin.sock"),
            dir,
        };
        match kind {
            Kind::Knockgate => subject.knockgated = Some(start_knockgated(lab)),
            Kind::Fwknopd => subject.peer = Some(subject.start_fwknopd(lab, setup)),
            Kind::Knockd => subject.peer = Some(subject.start_knockd(lab, setup)),
        }
        subject
    }

    /// The daemon's process id.
    pub fn pid(&self) -> i32 {
        match (&self.knockgated, &self.peer) {
            (Some(d), _) => d.pid(),
            (None, Some(c)) => i32::try_from(c.id()).unwrap(),
            (None, None) => unreachable!("a subject runs one daemon"),
        }
    }

    /// `n` fwknop packets for `client` (for knockgate's fwknop stanza).
    pub fn fwknop_knocks(&self, n: usize, client: IpAddr) -> Vec<KnockDatagrams> {
        fwknop_packets(&self.dir, n, client)
            .into_iter()
            .map(|p| vec![(SPA_PORT, p)])
            .collect()
    }

    /// `n` valid knocks for `client`, each asking for `ttl_secs`. Made before any
    /// timing starts (fwknop's client is a separate program).
    pub fn knocks(&self, n: usize, client: IpAddr, ttl_secs: u64) -> Vec<KnockDatagrams> {
        match self.kind {
            Kind::Knockgate => (0..n)
                .map(|_| vec![(SPA_PORT, knockgate_knock(ttl_secs))])
                .collect(),
            Kind::Fwknopd => fwknop_packets(&self.dir, n, client)
                .into_iter()
                .map(|p| vec![(SPA_PORT, p)])
                .collect(),
            Kind::Knockd => (0..n)
                .map(|_| KNOCKD_PORTS.iter().map(|&p| (p, b"k".to_vec())).collect())
                .collect(),
        }
    }

    /// Closes `client`'s access now, each daemon its own way, so the next run starts
    /// closed: knockgate revokes through its admin socket; for the peers the rule
    /// they added is deleted (their own expiry later finds it gone).
    pub fn revoke(&self, lab: &Lab, client: IpAddr) {
        match self.kind {
            Kind::Knockgate => {
                use knockgate::admin::{Request, Response, client::call};
                if let Ok(Response::Grants { grants, .. }) =
                    call(&self.admin_socket, &Request::Grants { after: None })
                {
                    for g in grants {
                        let _ = call(&self.admin_socket, &Request::Revoke { id: g.id });
                    }
                }
            }
            Kind::Fwknopd => {
                lab.exec(Host::Server, &["iptables", "-F", "FWKNOP_INPUT"]);
            }
            Kind::Knockd => {
                let ip = client.to_string();
                let _ = lab.try_exec(
                    Host::Server,
                    &[
                        "iptables", "-D", "INPUT", "-s", &ip, "-p", "tcp", "--dport", "22", "-j",
                        "ACCEPT",
                    ],
                );
            }
        }
    }

    fn start_fwknopd(&self, lab: &Lab, setup: &Setup) -> Child {
        let root = peers_root();
        let run = self.dir.join("run");
        std::fs::create_dir_all(&run).unwrap();
        let conf = private_file(
            &self.dir.join("fwknopd.conf"),
            &format!(
                "PCAP_INTF eth0;\nENABLE_UDP_SERVER Y;\nUDPSERV_PORT {SPA_PORT};\n\
                 FWKNOP_RUN_DIR {};\nENABLE_DIGEST_PERSISTENCE N;\n",
                run.display()
            ),
        );
        let access = private_file(
            &self.dir.join("access.conf"),
            &format!(
                "SOURCE ANY\nKEY_BASE64 {FWKNOP_KEY}\nHMAC_KEY_BASE64 {FWKNOP_HMAC}\n\
                 OPEN_PORTS tcp/22\nFW_ACCESS_TIMEOUT {}\n",
                setup.ttl_secs
            ),
        );
        drop_ssh_below_peer_rules(lab);
        let log = std::fs::File::create(self.dir.join("fwknopd.log")).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &lab.ns(Host::Server)])
            .arg(root.join("usr/sbin/fwknopd"))
            .args(["-f", "-U", "-c"])
            .arg(&conf)
            .arg("-a")
            .arg(&access)
            .arg("-d")
            .arg(self.dir.join("digest.cache"))
            .arg("-p")
            .arg(run.join("fwknopd.pid"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn fwknopd");
        wait_for_log(&self.dir.join("fwknopd.log"), "Kicking off UDP server");
        child
    }

    fn start_knockd(&self, lab: &Lab, setup: &Setup) -> Child {
        let log = self.dir.join("knockd.log");
        let sequence: Vec<String> = KNOCKD_PORTS.iter().map(|p| format!("{p}:udp")).collect();
        let conf = private_file(
            &self.dir.join("knockd.conf"),
            &format!(
                "[options]\n\tlogfile = {}\n[openSSH]\n\tsequence = {}\n\tseq_timeout = 5\n\
                 \tstart_command = iptables -I INPUT -s %IP% -p tcp --dport 22 -j ACCEPT\n\
                 \tcmd_timeout = {}\n\
                 \tstop_command = iptables -D INPUT -s %IP% -p tcp --dport 22 -j ACCEPT\n",
                log.display(),
                sequence.join(","),
                setup.ttl_secs
            ),
        );
        drop_ssh_below_peer_rules(lab);
        let child = Command::new("ip")
            .args(["netns", "exec", &lab.ns(Host::Server)])
            .arg(peers_root().join("usr/sbin/knockd"))
            .arg("-c")
            .arg(&conf)
            .args(["-i", "eth0"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn knockd");
        wait_for_log(&log, "listening on eth0");
        child
    }
}

impl Drop for Subject {
    fn drop(&mut self) {
        if let Some(child) = &mut self.peer {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn start_knockgated(lab: &Lab) -> support::Daemon {
    let key = lab.write_file("alice.key", KEY_HEX);
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    // The keys fwknopd gets, as a knockgate fwknop stanza: the same client packets
    // open both (the "knockgate (fwknop packets)" rows).
    let spa_keys = lab.write_file(
        "phone.fwknop",
        &format!("KEY_BASE64 {FWKNOP_KEY}\nHMAC_KEY_BASE64 {FWKNOP_HMAC}\n"),
    );
    std::fs::set_permissions(
        &spa_keys,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    // The per-source knock meter (10 at once, then 5/s) is lifted: every datagram of
    // a flood, and every one of hundreds of knocks a second, reaches the daemon. With
    // it, the kernel drops a one-source flood before the daemon sees it.
    let meter = "rate_per_second = 10000000\nburst = 10000000\n";
    // The admin group is one /etc/group names, as the package's `knockgate` is (its
    // postinst adds it): a group only NSS knows would load libnss_systemd, libcap and
    // libm into the daemon (0.65 MB of idle RSS) — a host without the package.
    let admin = "[admin]\ngroup = \"root\"\n";
    let config = lab.write_file(
        "knockgate.toml",
        &format!(
            "{admin}[knock]\nserver_id = \"bench\"\nmax_ttl = \"1h\"\n{meter}[knock.ban]\nenabled = false\n\
             [dns]\nresolvers = [\"10.77.2.53\"]\n[[keys]]\nid = \"alice\"\nfile = \"{}\"\nallow_unbound = true\n\
             [[fwknop_keys]]\nname = \"phone\"\nfile = \"{}\"\nttl = \"1h\"\nmax_ttl = \"1h\"\n",
            key.display(),
            spa_keys.display()
        ),
    );
    // As the package's unit runs it: with the unit's environment.
    let env = unit_environment();
    let env: Vec<(&str, &Path)> = env
        .iter()
        .map(|(k, v)| (k.as_str(), Path::new(v.as_str())))
        .collect();
    lab.start_daemon_with_env(&config, &env)
}

/// The `Environment=` settings of the package's unit (`systemd/knockgated.service`),
/// so that the daemon measured here runs as an installed one does.
fn unit_environment() -> Vec<(String, String)> {
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/knockgated.service");
    let text =
        std::fs::read_to_string(&unit).unwrap_or_else(|e| panic!("read {}: {e}", unit.display()));
    text.lines()
        .filter_map(|l| l.strip_prefix("Environment="))
        .map(|kv| {
            // One plain assignment per line: systemd's quoting and several
            // assignments on a line are not read here, so they must not be misread.
            assert!(
                !kv.contains(['"', '\'', ' ', '\\']),
                "{}: read only one unquoted assignment per Environment= line: {kv}",
                unit.display()
            );
            let (k, v) = kv
                .split_once('=')
                .unwrap_or_else(|| panic!("{}: Environment={kv}", unit.display()));
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

/// The peers' guard: SSH dropped unless a rule they insert above accepts it.
fn drop_ssh_below_peer_rules(lab: &Lab) {
    lab.exec(
        Host::Server,
        &[
            "iptables", "-A", "INPUT", "-p", "tcp", "--dport", "22", "-j", "DROP",
        ],
    );
}

fn private_file(path: &Path, text: &str) -> PathBuf {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    path.to_owned()
}

/// Waits (bounded) until `path` contains `needle`.
fn wait_for_log(path: &Path, needle: &str) {
    for _ in 0..500 {
        if std::fs::read_to_string(path).is_ok_and(|t| t.contains(needle)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!(
        "{} never said {needle:?}:\n{}",
        path.display(),
        std::fs::read_to_string(path).unwrap_or_default()
    );
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Knocks made so far by this process: every knock gets a nonce of its own.
static KNOCKS_MADE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A fresh valid knock for key alice (a nonce never used before in this run).
pub fn knockgate_knock(ttl_secs: u64) -> Vec<u8> {
    sealed(KEY_HEX, ttl_secs)
}

/// A well-formed knock sealed with a wrong key: the daemon must compute one HMAC to
/// refuse it (the costliest junk).
pub fn knockgate_bad_mac() -> Vec<u8> {
    sealed(&"00".repeat(32), 60)
}

/// A knock by key id alice, sealed with `key_hex`, with a nonce of its own.
fn sealed(key_hex: &str, ttl_secs: u64) -> Vec<u8> {
    let n = KNOCKS_MADE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut nonce = [0u8; 16];
    nonce[..8].copy_from_slice(&n.to_le_bytes());
    nonce[8..].copy_from_slice(&unix_now().to_le_bytes());
    let k = Knock {
        key_id: KeyId::new("alice").unwrap(),
        service: ServiceId::ssh(),
        timestamp: unix_now(),
        nonce,
        ttl_secs: u32::try_from(ttl_secs).unwrap(),
        address: AddressClaim::PacketSource,
    };
    seal(
        &k,
        &Secret::from_hex(key_hex).unwrap(),
        &ServerId::new("bench").unwrap(),
    )
}

/// `n` SPA packets from fwknop's own client (`-T -B`: built, saved, not sent),
/// each granting tcp/22 to `allow`.
pub fn fwknop_packets(dir: &Path, n: usize, allow: IpAddr) -> Vec<Vec<u8>> {
    fwknop_packets_for(dir, &vec![allow; n])
}

/// One fwknop SPA packet per address in `allow` (the address it asks access for).
pub fn fwknop_packets_for(dir: &Path, allow: &[IpAddr]) -> Vec<Vec<u8>> {
    let file = dir.join("spa.txt");
    let _ = std::fs::remove_file(&file);
    for ip in allow {
        let out = Command::new(peers_root().join("usr/bin/fwknop"))
            .env("HOME", dir)
            .args(["-A", "tcp/22", "-a", &ip.to_string(), "-D", "127.0.0.1"])
            .args([
                "--key-base64-rijndael",
                FWKNOP_KEY,
                "--key-base64-hmac",
                FWKNOP_HMAC,
            ])
            .args(["--use-hmac", "-T", "-b", "-B"])
            .arg(&file)
            .output()
            .expect("run fwknop");
        assert!(
            out.status.success(),
            "fwknop: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    std::fs::read_to_string(&file)
        .unwrap()
        .lines()
        .map(|l| l.as_bytes().to_vec())
        .collect()
}

/// Sends one knock's datagrams from `socket` to `server`.
pub fn send_knock(socket: &UdpSocket, server: IpAddr, knock: &KnockDatagrams) {
    for (port, datagram) in knock {
        let _ = socket.send_to(datagram, SocketAddr::new(server, *port));
    }
}
