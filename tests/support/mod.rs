//! The lab: network namespaces joined by veth pairs, with knockgated running in
//! the `server` one, and helpers that prove behaviour with real connections.
//!
//! ```text
//!  client (eth0) ──── (eth0) server (eth1) ──── (eth0) outside
//!  10.77.1.2, .3        10.77.1.1   10.77.2.1        10.77.2.2   (mirror)
//!  fd77:1::2, ::3       fd77:1::1   fd77:2::1        10.77.2.53  (resolver)
//!                        forwarding on               fd77:2::2, fd77:2::53
//! ```
//!
//! Every address lives only inside the lab's own namespaces, so labs of parallel
//! tests use the same plan without meeting. Namespace names carry the process id
//! and a counter; a leftover of the same name is deleted first. Nothing here
//! touches the host namespace's network or firewall: every `ip` command is `ip -n
//! NS` or `ip netns exec NS`, and sockets are made on threads that entered the
//! namespace. Everything is torn down on drop, also when the test panics. Every
//! wait is bounded.
#![allow(dead_code)] // each test binary uses a different part of the lab

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long a connection that should fail is given before it counts as refused.
pub const FAIL_TIMEOUT: Duration = Duration::from_millis(700);
/// Longest wait for knockgated to apply its baseline: a bound for a hung daemon (a
/// start with 100,000 grants in a debug build on a slow 2-core CI machine takes seconds).
const DAEMON_START_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest an echo server lives, whatever the test does: a bound for a test that
/// leaks one, not a test's length. `lab_scale` keeps one across opening 100,000
/// grants, which took 319 s on a 2-core CI machine (debug build): the old 300 s
/// bound stopped its server there and failed the test.
const SERVER_LIFETIME: Duration = Duration::from_secs(1800);

static NEXT_LAB: AtomicUsize = AtomicUsize::new(0);

/// The lab's hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Host {
    /// The laptop side.
    Client,
    /// Runs knockgated; routes between client and outside.
    Server,
    /// The internet: a mirror and a DNS resolver.
    Outside,
    /// A laptop behind a NAT: made only by [`Lab::home_behind_nat`], with the client
    /// namespace as its NAT router.
    Home,
}

/// Addresses of the lab, per family.
pub struct Plan {
    pub server_from_client: IpAddr,
    pub client: IpAddr,
    /// A second address of the client, for "another source" tests.
    pub client_alt: IpAddr,
    pub server_from_outside: IpAddr,
    pub mirror: IpAddr,
    pub resolver: IpAddr,
}

/// The IPv4 plan.
pub fn v4() -> Plan {
    Plan {
        server_from_client: "10.77.1.1".parse().unwrap(),
        client: "10.77.1.2".parse().unwrap(),
        client_alt: "10.77.1.3".parse().unwrap(),
        server_from_outside: "10.77.2.1".parse().unwrap(),
        mirror: "10.77.2.2".parse().unwrap(),
        resolver: "10.77.2.53".parse().unwrap(),
    }
}

/// The IPv6 plan.
pub fn v6() -> Plan {
    Plan {
        server_from_client: "fd77:1::1".parse().unwrap(),
        client: "fd77:1::2".parse().unwrap(),
        client_alt: "fd77:1::3".parse().unwrap(),
        server_from_outside: "fd77:2::1".parse().unwrap(),
        mirror: "fd77:2::2".parse().unwrap(),
        resolver: "fd77:2::53".parse().unwrap(),
    }
}

/// Whether lab tests can run here. In CI (`CI` set) they must: no root there is a
/// failure. Elsewhere they skip, loudly.
pub fn lab_available(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{test}: lab tests need root, and CI must run them"
    );
    eprintln!("\n*** SKIPPED {test}: lab tests need root (network namespaces, nftables) ***\n");
    false
}

/// A set of namespaces, wired as in the module docs.
pub struct Lab {
    prefix: String,
    dir: tempfile::TempDir,
}

impl Lab {
    /// Builds the namespaces, links, addresses and routes.
    pub fn new() -> Self {
        let n = NEXT_LAB.fetch_add(1, Ordering::Relaxed);
        let lab = Self {
            prefix: format!("kg{}-{n}", std::process::id()),
            dir: tempfile::tempdir().expect("tempdir"),
        };
        for host in [Host::Client, Host::Server, Host::Outside] {
            let ns = lab.ns(host);
            // A leftover of a crashed run with a reused pid must not break this one.
            let _ = Command::new("ip").args(["netns", "del", &ns]).output();
            ip(&["netns", "add", &ns]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            // No duplicate address detection: link-local addresses usable at once.
            lab.exec(
                host,
                &[
                    "sysctl",
                    "-qw",
                    "net.ipv6.conf.default.accept_dad=0",
                    "net.ipv6.conf.all.accept_dad=0",
                ],
            );
        }
        let (client, server, outside) = (
            lab.ns(Host::Client),
            lab.ns(Host::Server),
            lab.ns(Host::Outside),
        );
        ip(&[
            "-n", &client, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns",
            &server,
        ]);
        ip(&[
            "-n", &server, "link", "add", "eth1", "type", "veth", "peer", "name", "eth0", "netns",
            &outside,
        ]);
        let addrs: [(&str, &str, &[&str]); 4] = [
            (
                &client,
                "eth0",
                &[
                    "10.77.1.2/24",
                    "10.77.1.3/24",
                    "fd77:1::2/64",
                    "fd77:1::3/64",
                ],
            ),
            (&server, "eth0", &["10.77.1.1/24", "fd77:1::1/64"]),
            (&server, "eth1", &["10.77.2.1/24", "fd77:2::1/64"]),
            (
                &outside,
                "eth0",
                &[
                    "10.77.2.2/24",
                    "10.77.2.53/24",
                    "fd77:2::2/64",
                    "fd77:2::53/64",
                ],
            ),
        ];
        for (ns, dev, list) in addrs {
            for addr in list {
                // The client's second address is deprecated, so the kernel never picks
                // it as a source by itself: tests that want it bind to it.
                let deprecated = *addr == "10.77.1.3/24" || *addr == "fd77:1::3/64";
                let lifetime: &[&str] = if deprecated {
                    &["preferred_lft", "0"]
                } else {
                    &[]
                };
                let mut args = vec!["-n", ns, "addr", "add", addr, "dev", dev];
                args.extend_from_slice(lifetime);
                ip(&args);
            }
            ip(&["-n", ns, "link", "set", dev, "up"]);
        }
        for (ns, via4, via6) in [
            (&client, "10.77.1.1", "fd77:1::1"),
            (&outside, "10.77.2.1", "fd77:2::1"),
        ] {
            ip(&["-n", ns, "route", "add", "default", "via", via4]);
            ip(&["-n", ns, "-6", "route", "add", "default", "via", via6]);
        }
        for key in ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"] {
            lab.exec(Host::Server, &["sysctl", "-qw", key]);
        }
        lab.wait_for_carrier();
        lab
    }

    /// Waits (bounded) until every veth reports carrier: the kernel activates a link's
    /// queue some time after `link set up`, and drops packets until then.
    fn wait_for_carrier(&self) {
        wait_for_links(&[
            (self.ns(Host::Client), "eth0"),
            (self.ns(Host::Server), "eth0"),
            (self.ns(Host::Server), "eth1"),
            (self.ns(Host::Outside), "eth0"),
        ]);
    }

    /// Gives the client–server link a public-looking IPv4 network (203.0.113.0/24, a
    /// documentation range that stands for the internet in the lab): the server is
    /// 203.0.113.1, the client 203.0.113.2. Returns (server, client).
    pub fn public_link(&self) -> (IpAddr, IpAddr) {
        ip(&[
            "-n",
            &self.ns(Host::Server),
            "addr",
            "add",
            "203.0.113.1/24",
            "dev",
            "eth0",
        ]);
        ip(&[
            "-n",
            &self.ns(Host::Client),
            "addr",
            "add",
            "203.0.113.2/24",
            "dev",
            "eth0",
        ]);
        // The outside reaches it through the server, as it reaches the client.
        ip(&[
            "-n",
            &self.ns(Host::Outside),
            "route",
            "add",
            "203.0.113.0/24",
            "via",
            "10.77.2.1",
        ]);
        (
            "203.0.113.1".parse().unwrap(),
            "203.0.113.2".parse().unwrap(),
        )
    }

    /// Puts a laptop (`Host::Home`, 192.168.77.2) behind the client namespace, which
    /// becomes a NAT router (SNAT by masquerade, in its own namespace) on the public
    /// link of [`Lab::public_link`] (called here). Returns the laptop's address and the
    /// address the server sees for it.
    pub fn home_behind_nat(&self) -> (IpAddr, IpAddr) {
        let (_, public) = self.public_link();
        let (home, client) = (self.ns(Host::Home), self.ns(Host::Client));
        let _ = Command::new("ip").args(["netns", "del", &home]).output();
        ip(&["netns", "add", &home]);
        ip(&["-n", &home, "link", "set", "lo", "up"]);
        ip(&[
            "-n", &home, "link", "add", "eth0", "type", "veth", "peer", "name", "eth1", "netns",
            &client,
        ]);
        ip(&["-n", &home, "addr", "add", "192.168.77.2/24", "dev", "eth0"]);
        ip(&[
            "-n",
            &client,
            "addr",
            "add",
            "192.168.77.1/24",
            "dev",
            "eth1",
        ]);
        ip(&["-n", &home, "link", "set", "eth0", "up"]);
        ip(&["-n", &client, "link", "set", "eth1", "up"]);
        ip(&[
            "-n",
            &home,
            "route",
            "add",
            "default",
            "via",
            "192.168.77.1",
        ]);
        self.exec(Host::Client, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        let nat = "table ip lab_nat {\n chain post {\n  type nat hook postrouting priority srcnat; policy accept;\n  oifname \"eth0\" ip saddr 192.168.77.0/24 snat to 203.0.113.2\n }\n}\n";
        let file = self.write_file("nat.nft", nat);
        self.exec(Host::Client, &["nft", "-f", file.to_str().unwrap()]);
        wait_for_links(&[(home, "eth0"), (client, "eth1")]);
        ("192.168.77.2".parse().unwrap(), public)
    }

    /// The namespace name of `host`.
    pub fn ns(&self, host: Host) -> String {
        let role = match host {
            Host::Client => "cli",
            Host::Server => "srv",
            Host::Outside => "out",
            Host::Home => "home",
        };
        format!("{}-{role}", self.prefix)
    }

    /// Runs a command in `host`'s namespace; panics with its output if it fails.
    pub fn exec(&self, host: Host, args: &[&str]) -> String {
        let out = self.try_exec(host, args);
        assert!(
            out.status.success(),
            "{args:?} in {host:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs a command in `host`'s namespace and returns whatever happened.
    pub fn try_exec(&self, host: Host, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.ns(host)])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run ip netns exec")
    }

    /// `nft ARGS` in the server namespace.
    pub fn nft(&self, args: &[&str]) -> String {
        let mut all = vec!["nft"];
        all.extend_from_slice(args);
        self.exec(Host::Server, &all)
    }

    /// Runs `f` on a thread that has entered `host`'s network namespace, so sockets
    /// it creates live there.
    pub fn in_ns<T: Send>(&self, host: Host, f: impl FnOnce() -> T + Send) -> T {
        let path = PathBuf::from("/run/netns").join(self.ns(host));
        std::thread::scope(|s| {
            s.spawn(move || {
                let file = std::fs::File::open(&path).expect("open netns");
                nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
                f()
            })
            .join()
            .expect("namespace thread panicked")
        })
    }

    /// Writes `text` to a file in the lab's temporary directory.
    pub fn write_file(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).expect("write lab file");
        path
    }

    /// Gives `host` its own /etc/resolv.conf (`ip netns exec` bind-mounts it over /etc/resolv.conf).
    pub fn set_resolv_conf(&self, host: Host, text: &str) {
        let dir = self.etc_dir(host);
        std::fs::create_dir_all(&dir).expect("create /etc/netns dir");
        std::fs::write(dir.join("resolv.conf"), text).expect("write resolv.conf");
    }

    fn etc_dir(&self, host: Host) -> PathBuf {
        Path::new("/etc/netns").join(self.ns(host))
    }

    /// A TCP echo server on `addr` in `host`.
    pub fn tcp_echo(&self, host: Host, addr: SocketAddr) -> EchoServer {
        let listener = self
            .in_ns(host, || TcpListener::bind(addr))
            .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        EchoServer::tcp(listener)
    }

    /// A UDP echo server on `addr` in `host`.
    pub fn udp_echo(&self, host: Host, addr: SocketAddr) -> EchoServer {
        let socket = self
            .in_ns(host, || UdpSocket::bind(addr))
            .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        EchoServer::udp(socket)
    }

    /// Whether a new TCP connection from `host` to `to` gets through and echoes.
    pub fn tcp_works(&self, host: Host, to: SocketAddr) -> bool {
        self.in_ns(host, || {
            match TcpStream::connect_timeout(&to, FAIL_TIMEOUT) {
                Ok(mut stream) => echo_round_trip(&mut stream),
                Err(_) => false,
            }
        })
    }

    /// Whether a new TCP connection from address `from` of `host` to `to` gets through
    /// and echoes (the source is chosen, not left to the kernel: the client has two).
    pub fn tcp_works_from(&self, host: Host, from: IpAddr, to: SocketAddr) -> bool {
        self.in_ns(host, || {
            let domain = socket2::Domain::for_address(to);
            let socket = socket2::Socket::new(domain, socket2::Type::STREAM, None).expect("socket");
            socket
                .bind(&SocketAddr::new(from, 0).into())
                .expect("bind source");
            match socket.connect_timeout(&to.into(), FAIL_TIMEOUT) {
                Ok(()) => echo_round_trip(&mut socket.into()),
                Err(_) => false,
            }
        })
    }

    /// Sends each of `datagrams` from address `from` of `host` to `to`.
    pub fn udp_send(&self, host: Host, from: IpAddr, to: SocketAddr, datagrams: &[Vec<u8>]) {
        self.in_ns(host, || {
            let socket = UdpSocket::bind(SocketAddr::new(from, 0)).expect("bind udp");
            for d in datagrams {
                let _ = socket.send_to(d, to);
            }
        });
    }

    /// Lets the client namespace send from addresses it does not have (a spoofer).
    pub fn allow_spoofing(&self) {
        self.exec(
            Host::Client,
            &["sysctl", "-qw", "net.ipv4.ip_nonlocal_bind=1"],
        );
        self.exec(
            Host::Client,
            &["sysctl", "-qw", "net.ipv6.ip_nonlocal_bind=1"],
        );
    }

    /// Sends `datagram` from each of `sources` — addresses the client namespace does
    /// not have: bound with `ip_nonlocal_bind`, IPv4 sockets made transparent, as a
    /// spoofer's raw socket would send them — to `to` of the matching family; returns
    /// how many went out. Call [`Lab::allow_spoofing`] first. Bounded by the count.
    pub fn spoof(
        &self,
        sources: impl Iterator<Item = IpAddr> + Send,
        to: impl Fn(IpAddr) -> SocketAddr + Sync,
        datagram: &[u8],
    ) -> usize {
        self.in_ns(Host::Client, || {
            let mut sent = 0;
            for from in sources {
                let Ok(socket) = UdpSocket::bind(SocketAddr::new(from, 0)) else {
                    continue;
                };
                if from.is_ipv4() {
                    // IPv4 routes a datagram from a foreign address only for a
                    // transparent socket (IPv6 takes the nonlocal bind alone).
                    use nix::sys::socket::{setsockopt, sockopt};
                    let _ = setsockopt(&socket, sockopt::IpTransparent, &true);
                }
                if socket.send_to(datagram, to(from)).is_ok() {
                    sent += 1;
                }
            }
            sent
        })
    }

    /// The lab's temporary directory (configs, keys, logs, state).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Whether something in `host` accepts TCP connections on `addr` (no echo needed).
    pub fn tcp_listening(&self, host: Host, addr: SocketAddr) -> bool {
        self.in_ns(host, || {
            TcpStream::connect_timeout(&addr, FAIL_TIMEOUT).is_ok()
        })
    }

    /// A TCP connection from `host` to `to`, for tests that keep it open.
    pub fn tcp_connect(&self, host: Host, to: SocketAddr) -> TcpStream {
        self.in_ns(host, || TcpStream::connect_timeout(&to, FAIL_TIMEOUT))
            .unwrap_or_else(|e| panic!("connect {to}: {e}"))
    }

    /// Whether a UDP datagram from `host` to `to` is echoed back.
    pub fn udp_works(&self, host: Host, to: SocketAddr) -> bool {
        self.in_ns(host, || {
            let any: SocketAddr = if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }
                .parse()
                .unwrap();
            let socket = UdpSocket::bind(any).expect("bind udp");
            socket.set_read_timeout(Some(FAIL_TIMEOUT)).unwrap();
            socket.send_to(b"knockgate-lab", to).is_ok()
                && matches!(socket.recv_from(&mut [0u8; 64]), Ok((13, from)) if from == to)
        })
    }

    /// Whether one ping from `host` to `addr` is answered within a second.
    pub fn ping(&self, host: Host, addr: IpAddr) -> bool {
        let addr = addr.to_string();
        self.try_exec(host, &["ping", "-n", "-q", "-c", "1", "-W", "1", &addr])
            .status
            .success()
    }

    /// Starts knockgated in the server namespace and waits until it has applied its
    /// baseline; panics with its log if it exits or takes too long.
    pub fn start_daemon(&self, config: &Path) -> Daemon {
        self.start_daemon_with_env(config, &[])
    }

    /// [`Lab::start_daemon`] with extra environment variables.
    pub fn start_daemon_with_env(&self, config: &Path, env: &[(&str, &Path)]) -> Daemon {
        self.start_daemon_wrapped(config, env, &[])
    }

    /// [`Lab::start_daemon_with_env`], with knockgated run by `wrapper` (a command that
    /// execs its arguments, like `setpriv … --`), so it can run as another user.
    pub fn start_daemon_wrapped(
        &self,
        config: &Path,
        env: &[(&str, &Path)],
        wrapper: &[&str],
    ) -> Daemon {
        self.start_daemon_within(config, env, wrapper, DAEMON_START_TIMEOUT)
    }

    /// [`Lab::start_daemon_wrapped`], waiting up to `limit` for it to listen (a bench
    /// whose start has a million elements to read back).
    pub fn start_daemon_within(
        &self,
        config: &Path,
        env: &[(&str, &Path)],
        wrapper: &[&str],
        limit: Duration,
    ) -> Daemon {
        let n = NEXT_LAB.fetch_add(1, Ordering::Relaxed);
        let log = self.dir.path().join(format!("knockgated-{n}.log"));
        let child = self.spawn_daemon(config, &log, env, wrapper);
        let mut daemon = Daemon { child, log };
        let deadline = Instant::now() + limit;
        while !daemon.log_text().contains("listening for knocks") {
            if let Ok(Some(status)) = daemon.child.try_wait() {
                panic!("knockgated exited with {status}:\n{}", daemon.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "knockgated did not apply its baseline:\n{}",
                daemon.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        daemon
    }

    /// Runs knockgated to its end (for configs it must refuse); returns its output.
    pub fn run_daemon_to_exit(&self, config: &Path) -> Output {
        self.daemon_command(config, &[])
            .output()
            .expect("run knockgated")
    }

    fn spawn_daemon(
        &self,
        config: &Path,
        log: &Path,
        env: &[(&str, &Path)],
        wrapper: &[&str],
    ) -> Child {
        let file = std::fs::File::create(log).expect("create daemon log");
        let mut command = self.daemon_command(config, wrapper);
        // `info` unless the caller says otherwise.
        command.env("RUST_LOG", "info");
        for (key, value) in env {
            command.env(key, value);
        }
        command
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("spawn knockgated")
    }

    /// `ip netns exec SERVER [WRAPPER…] knockgated --config CONFIG`, with no stdin.
    /// `ip netns exec` mounts a fresh /sys, without the cgroup2 file system: it is
    /// mounted again (in that mount namespace only: the same hierarchy, the same ids),
    /// as a systemd host has it, so the daemon can read an egress requester's cgroup.
    fn daemon_command(&self, config: &Path, wrapper: &[&str]) -> Command {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.ns(Host::Server), "sh", "-c"])
            .arg("mount -t cgroup2 none /sys/fs/cgroup 2>/dev/null; exec \"$@\"")
            .arg("sh")
            .args(wrapper)
            .arg(env!("CARGO_BIN_EXE_knockgated"))
            .arg("--config")
            .arg(config)
            // Each lab keeps its own replay log and grant book.
            .env("KNOCKGATE_KNOCK__STATE_DIR", self.dir.path().join("state"))
            // …and its own admin socket, never the host's /run/knockgate.
            .env(
                "KNOCKGATE_ADMIN__SOCKET",
                self.dir.path().join("admin.sock"),
            )
            .stdin(Stdio::null());
        command
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for host in [Host::Client, Host::Server, Host::Outside, Host::Home] {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.ns(host)])
                .output();
            let _ = std::fs::remove_dir_all(self.etc_dir(host));
        }
    }
}

/// Waits (bounded by `within`) until `check` holds, polling every 20 ms; returns
/// whether it did.
pub fn eventually(within: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if check() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits (at most 10 s) until every (namespace, device) reports carrier.
fn wait_for_links(links: &[(String, &str)]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    for (ns, dev) in links {
        loop {
            let out = Command::new("ip")
                .args(["-n", ns, "-o", "link", "show", "dev", dev])
                .output()
                .expect("ip link show");
            if String::from_utf8_lossy(&out.stdout).contains("state UP") {
                break;
            }
            assert!(Instant::now() < deadline, "{dev} in {ns} never came up");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// knockgated running in the lab; killed on drop if the test did not stop it.
pub struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    /// How many grant sets its last "baseline applied" line says it left in place
    /// (`None` if no such line has a `kept_sets`).
    pub fn kept_grant_sets(&self) -> Option<usize> {
        let log = self.log_text();
        log.lines()
            .rfind(|l| l.contains("baseline applied"))
            .and_then(|l| l.split("kept_sets=").nth(1))
            .and_then(|rest| rest.split_whitespace().next())
            .map(|sets| sets.split(',').filter(|s| s.contains("_grants_")).count())
    }

    /// What it has logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (at most 5 s) until it has logged `needle`; whether it did. For lines
    /// logged after "listening for knocks", which is all the start waits for.
    pub fn logged_soon(&self, needle: &str) -> bool {
        self.logged_within(needle, Duration::from_secs(5))
    }

    /// Whether `needle` appears in the log within `limit`: for work whose length
    /// scales with what the test built (100,000 grants in a debug build on a slow
    /// 2-core CI machine take many seconds to dump and replace).
    pub fn logged_within(&self, needle: &str, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while !self.log_text().contains(needle) {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }

    /// Its process id (`ip netns exec` execs it, so this is knockgated's).
    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).expect("pid")
    }

    /// Whether the daemon is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Kills it with SIGKILL (no chance to clean up) and reaps it.
    pub fn kill_9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits (bounded) for it to exit; returns its exit code.
    pub fn terminate(mut self) -> i32 {
        // `ip netns exec` execs the daemon, so the child's pid is knockgated's.
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap());
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status.code().unwrap_or(-1);
            }
            assert!(
                Instant::now() < deadline,
                "knockgated ignored SIGTERM:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs the `knockgate` admin CLI against the admin socket `socket`.
pub fn admin(socket: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_knockgate"))
        .arg("--socket")
        .arg(socket)
        .args(args)
        .output()
        .expect("run knockgate")
}

/// Writes a line and expects it back: proof that data flows both ways.
pub fn echo_round_trip(stream: &mut TcpStream) -> bool {
    let msg = b"knockgate-lab\n";
    stream.set_read_timeout(Some(FAIL_TIMEOUT)).ok();
    let mut back = [0u8; 14];
    stream.write_all(msg).is_ok() && stream.read_exact(&mut back).is_ok() && &back == msg
}

/// An echo server on a socket made inside a namespace, served from a plain thread.
pub struct EchoServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EchoServer {
    fn tcp(listener: TcpListener) -> Self {
        listener.set_nonblocking(true).unwrap();
        Self::serve(move |stop| {
            let started = Instant::now();
            while !stop.load(Ordering::Relaxed) && started.elapsed() < SERVER_LIFETIME {
                match listener.accept() {
                    Ok((stream, _)) => {
                        std::thread::spawn(move || echo_tcp(stream));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        })
    }

    fn udp(socket: UdpSocket) -> Self {
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        Self::serve(move |stop| {
            let started = Instant::now();
            let mut buf = [0u8; 512];
            while !stop.load(Ordering::Relaxed) && started.elapsed() < SERVER_LIFETIME {
                if let Ok((n, from)) = socket.recv_from(&mut buf) {
                    let _ = socket.send_to(&buf[..n], from);
                }
            }
        })
    }

    fn serve(body: impl FnOnce(&AtomicBool) + Send + 'static) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || body(&flag));
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

fn echo_tcp(mut stream: TcpStream) {
    stream.set_nonblocking(false).ok();
    stream.set_read_timeout(Some(Duration::from_secs(30))).ok();
    let mut buf = [0u8; 512];
    // Bounded by the read timeout and by the peer closing.
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 || stream.write_all(&buf[..n]).is_err() {
            break;
        }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A socket address.
pub fn sa(ip: IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(ip, port)
}

/// `knockgate status`'s junk and refusal counts: (dropped by the kernel, refused by
/// the daemon).
pub fn knock_port_counts(lab: &Lab) -> (u64, u64) {
    let out = admin(&lab.dir().join("admin.sock"), &["status"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("knock port: "))
        .unwrap_or_else(|| panic!("no knock port line in: {text}"));
    let words: Vec<&str> = line.split_whitespace().collect();
    let junk = words[0].parse().unwrap_or_else(|_| panic!("{line}"));
    let refused = words[words.len() - 5]
        .parse()
        .unwrap_or_else(|_| panic!("{line}"));
    (junk, refused)
}
