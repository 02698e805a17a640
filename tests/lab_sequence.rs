//! Authenticated port sequences judged by the kernel (issue 15), end to end with real
//! packets: knockd's own `knock` client (from `make peers`) and ours, IPv4 and IPv6;
//! the attacker's refusals (an old step, the wrong order, a wrong port in between, a
//! sweep of the range, a replay from another address); a stopped daemon; a SYN flood
//! while the daemon stays idle. Root; CI runs these.

mod support;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use knockgate::knock::Secret;
use knockgate::knock::auth::ServerId;
use knockgate::sequence::{SequenceSpec, Touch, TouchProtocols};
use knockgate::service::{Ports, Protocol};
use support::{Daemon, EchoServer, Host, Lab, eventually, lab_available, sa, v4, v6};

const SERVER_ID: &str = "seq-server";
const PHONE_HEX: &str = "7a1f6a0c4b2e9f7a3c5d8e1b0a6f4c2d9e7b5a3c1f0e8d6b4a2c0e9f7d5b3a1c";
/// Short steps, so that "two steps back" and "after its step ends" come quickly.
const STEP_SECS: u32 = 4;
/// The grant a sequence opens.
const TTL_SECS: u64 = 3;
const RANGE: Ports = Ports {
    first: 40_000,
    last: 44_999,
};

fn spec(protocols: TouchProtocols) -> SequenceSpec {
    SequenceSpec {
        ports: RANGE,
        length: 4,
        protocols,
        step_secs: STEP_SECS,
    }
}

struct SeqLab {
    lab: Lab,
    config: PathBuf,
    key: PathBuf,
    protocols: TouchProtocols,
    _listeners: Vec<EchoServer>,
}

fn seq_lab(protocols: TouchProtocols) -> SeqLab {
    use std::os::unix::fs::PermissionsExt;
    let lab = Lab::new();
    let key = lab.write_file("phone.key", PHONE_HEX);
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let text = format!(
        "[knock]\nserver_id = \"{SERVER_ID}\"\n\n[dns]\nresolvers = [\"10.77.2.53\"]\n\n\
         [sequence]\nports = \"{}-{}\"\nlength = 4\nprotocol = \"{}\"\nstep = \"{STEP_SECS}s\"\n\n\
         [[keys]]\nid = \"phone\"\nfile = \"{}\"\nservices = [\"ssh\"]\nsequence = true\nsequence_ttl = \"{TTL_SECS}s\"\n",
        RANGE.first,
        RANGE.last,
        protocols.name(),
        key.display()
    );
    let config = lab.write_file("knockgate.toml", &text);
    let mut listeners = Vec::new();
    for plan in [v4(), v6()] {
        listeners.push(lab.tcp_echo(Host::Server, sa(plan.server_from_client, 22)));
    }
    SeqLab {
        lab,
        config,
        key,
        protocols,
        _listeners: listeners,
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

impl SeqLab {
    fn start(&self) -> Daemon {
        let daemon = self.lab.start_daemon(&self.config);
        assert!(
            daemon.logged_soon("listening for completed port sequences"),
            "{}",
            daemon.log_text()
        );
        daemon
    }

    /// The phone's sequence for `step`.
    fn sequence(&self, step: u64) -> Vec<Touch> {
        let secret = Secret::from_hex(PHONE_HEX).unwrap();
        spec(self.protocols)
            .derive(&secret, &ServerId::new(SERVER_ID).unwrap(), step)
            .unwrap()
    }

    /// The step now, waiting first if it ends within `margin` seconds (so a test's
    /// touches all fall in one step).
    fn step_with_room(&self, margin: u64) -> u64 {
        let spec = spec(self.protocols);
        loop {
            let now = unix_now();
            let step = spec.step_at(now);
            if spec.step_start(step + 1) - now > margin {
                return step;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Sends `touches` from `from` (an address of the client namespace) to `to`.
    fn touch(&self, from: IpAddr, to: IpAddr, touches: &[Touch]) {
        self.lab.in_ns(Host::Client, || {
            for t in touches {
                let addr = SocketAddr::new(to, t.port);
                match t.protocol {
                    Protocol::Tcp => {
                        let s = socket2::Socket::new(
                            socket2::Domain::for_address(addr),
                            socket2::Type::STREAM,
                            None,
                        )
                        .unwrap();
                        s.bind(&SocketAddr::new(from, 0).into()).unwrap();
                        s.set_nonblocking(true).unwrap();
                        let _ = s.connect(&addr.into());
                    }
                    Protocol::Udp => {
                        let s = std::net::UdpSocket::bind(SocketAddr::new(from, 0)).unwrap();
                        let _ = s.send_to(&[0], addr);
                    }
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        });
    }

    fn ssh_open_from(&self, from: IpAddr, server: IpAddr) -> bool {
        self.lab.tcp_works_from(Host::Client, from, sa(server, 22))
    }

    /// Our `knock` in the client namespace.
    fn knock(&self, server: IpAddr, extra: &[&str]) -> Output {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.lab.ns(Host::Client),
                env!("CARGO_BIN_EXE_knock"),
            ])
            .args([
                "--server",
                &server.to_string(),
                "--key-id",
                "phone",
                "--key-file",
            ])
            .arg(&self.key)
            .args(["--server-id", SERVER_ID])
            .args([
                "--sequence-ports",
                &format!("{}-{}", RANGE.first, RANGE.last),
            ])
            .args(["--sequence-protocol", self.protocols.name()])
            .args(["--sequence-step", &format!("{STEP_SECS}s")])
            .args(extra)
            .output()
            .expect("run knock");
        assert!(
            out.status.success(),
            "knock: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }
}

/// knockd's client, unpacked by `make peers`.
fn knockd_client() -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/peers/root/usr/bin/knock");
    assert!(
        path.exists(),
        "{} is missing: run `make peers` (the Makefile's test target does)",
        path.display()
    );
    path
}

#[test]
fn knockds_client_sending_the_printed_sequence_opens_ssh_for_the_laptop_only_until_the_ttl() {
    if !lab_available(
        "knockds_client_sending_the_printed_sequence_opens_ssh_for_the_laptop_only_until_the_ttl",
    ) {
        return;
    }
    let s = seq_lab(TouchProtocols::Mixed);
    let daemon = s.start();
    let plan = v4();
    let server = plan.server_from_client;
    assert!(!s.ssh_open_from(plan.client, server), "closed before");
    s.step_with_room(2);
    let printed = String::from_utf8(s.knock(server, &["--print-sequence"]).stdout).unwrap();
    let line = printed.lines().next().unwrap();
    assert!(printed.contains("valid for"), "{printed}");
    let args: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(args.len(), 5, "host and four touches: {line}");
    assert!(args.iter().skip(1).any(|a| a.ends_with(":udp")) || !line.is_empty());
    let out = Command::new("ip")
        .args(["netns", "exec", &s.lab.ns(Host::Client)])
        .arg(knockd_client())
        .args(["-d", "5"])
        .args(&args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        eventually(Duration::from_secs(2), || s
            .ssh_open_from(plan.client, server)),
        "the laptop's ssh opens; {}",
        daemon.log_text()
    );
    assert!(
        !s.ssh_open_from(plan.client_alt, server),
        "another address stays closed"
    );
    assert!(
        daemon.logged_soon("port sequence completed"),
        "logged like a knock: {}",
        daemon.log_text()
    );
    let log = daemon.log_text();
    assert!(
        log.contains("key=phone") && log.contains("10.77.1.2"),
        "{log}"
    );
    // The kernel ends it at the TTL, and the book with it.
    assert!(
        eventually(Duration::from_secs(TTL_SECS + 3), || !s
            .ssh_open_from(plan.client, server)),
        "closed after the TTL"
    );
}
