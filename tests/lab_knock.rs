//! Knocks end to end in the lab: the `knock` binary from the client namespace,
//! knockgated in the server namespace, the outside namespace as the intruder.
//! Root; CI runs these.

mod support;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use knockgate::knock::auth::{ServerId, seal};
use knockgate::knock::{AddressClaim, KeyId, Knock, Secret, ServiceId};
use support::{Daemon, Host, Lab, Plan, eventually, lab_available, sa, v4, v6};

const SERVER_ID: &str = "lab-server";
const KEY_HEX: &str = "8d1f6a0c4b2e9f7a3c5d8e1b0a6f4c2d9e7b5a3c1f0e8d6b4a2c0e9f7d5b3a1c";

struct Knocking {
    lab: Lab,
    key_file: PathBuf,
    config: PathBuf,
}

fn write_key(lab: &Lab, name: &str, hex: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = lab.write_file(name, hex);
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// A lab with a key `alice` (ssh), a key `no-ssh` (no services), and a config.
fn knocking(extra: &str) -> Knocking {
    let lab = Lab::new();
    let key_file = write_key(&lab, "alice.key", KEY_HEX);
    let other = write_key(&lab, "no-ssh.key", &"42".repeat(32));
    let text = format!(
        "[knock]\nserver_id = \"{SERVER_ID}\"\n{extra}\n[dns]\nresolvers = [\"10.77.2.53\"]\n\n\
         [[keys]]\nid = \"alice\"\nfile = \"{}\"\n\n[[keys]]\nid = \"no-ssh\"\nfile = \"{}\"\nservices = []\n",
        key_file.display(),
        other.display()
    );
    let config = lab.write_file("knockgate.toml", &text);
    Knocking {
        lab,
        key_file,
        config,
    }
}

impl Knocking {
    fn start(&self) -> Daemon {
        self.lab.start_daemon(&self.config)
    }

    /// Runs the `knock` binary in the client namespace.
    fn knock(&self, args: &[&str]) -> Output {
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.lab.ns(Host::Client),
                env!("CARGO_BIN_EXE_knock"),
            ])
            .args(args)
            .output()
            .expect("run knock")
    }

    fn knock_server(&self, server: IpAddr, extra: &[&str]) -> Output {
        let server = SocketAddr::new(server, 62201).to_string();
        let key = self.key_file.to_str().unwrap();
        let mut args = vec![
            "--server",
            &server,
            "--key-id",
            "alice",
            "--key-file",
            key,
            "--server-id",
            SERVER_ID,
        ];
        args.extend_from_slice(extra);
        self.knock(&args)
    }

    fn ssh_open_for(&self, host: Host, from: IpAddr, plan: &Plan) -> bool {
        self.lab
            .tcp_works_from(host, from, sa(plan.server_from_client_or_outside(host), 22))
    }
}

trait ServerAddr {
    fn server_from_client_or_outside(&self, host: Host) -> IpAddr;
}

impl ServerAddr for Plan {
    fn server_from_client_or_outside(&self, host: Host) -> IpAddr {
        if host == Host::Outside {
            self.server_from_outside
        } else {
            self.server_from_client
        }
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A knock built in the test, as an attacker or a replaying capture would have it.
fn crafted(
    key_hex: &str,
    key_id: &str,
    timestamp: u64,
    nonce: u8,
    ttl: u32,
    claim: AddressClaim,
) -> Vec<u8> {
    let knock = Knock {
        key_id: KeyId::new(key_id).unwrap(),
        service: ServiceId::ssh(),
        timestamp,
        nonce: [nonce; 16],
        ttl_secs: ttl,
        address: claim,
    };
    let secret = Secret::from_hex(key_hex).unwrap();
    seal(&knock, &secret, &ServerId::new(SERVER_ID).unwrap())
}

/// The claim of a knock bound to `address` (what `knock` sends by default).
fn bound(address: IpAddr) -> AddressClaim {
    match address {
        IpAddr::V4(a) => AddressClaim::V4(a),
        IpAddr::V6(a) => AddressClaim::V6(a),
    }
}

fn knock_port(plan: &Plan, host: Host) -> SocketAddr {
    sa(plan.server_from_client_or_outside(host), 62201)
}

#[test]
fn a_knock_opens_ssh_for_the_laptop_only_and_the_kernel_closes_it() {
    if !lab_available("a_knock_opens_ssh_for_the_laptop_only_and_the_kernel_closes_it") {
        return;
    }
    let k = knocking("");
    let _ssh = k.lab.tcp_echo(Host::Server, "[::]:22".parse().unwrap());
    let daemon = k.start();
    for plan in [v4(), v6()] {
        assert!(
            !k.ssh_open_for(Host::Client, plan.client, &plan),
            "closed before the knock"
        );
        let out = k.knock_server(plan.server_from_client, &["--ttl", "3s", "--wait"]);
        assert!(
            out.status.success(),
            "knock --wait: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let granted = Instant::now();
        assert!(
            k.ssh_open_for(Host::Client, plan.client, &plan),
            "open for the laptop"
        );
        assert!(
            !k.ssh_open_for(Host::Client, plan.client_alt, &plan),
            "not for another address of it"
        );
        assert!(
            !k.ssh_open_for(Host::Outside, plan.mirror, &plan),
            "not for the intruder"
        );
        std::thread::sleep(
            (granted + Duration::from_millis(3300)).saturating_duration_since(Instant::now()),
        );
        assert!(
            !k.ssh_open_for(Host::Client, plan.client, &plan),
            "closed after the TTL"
        );
    }
    let log = daemon.log_text();
    assert!(
        log.contains("knock accepted") && log.contains("who=key alice"),
        "{log}"
    );
    assert!(
        log.contains("grant ended") || log.contains("event=\"expire\""),
        "expiry is logged: {log}"
    );
}

#[test]
fn a_captured_knock_opens_once_also_across_a_restart() {
    if !lab_available("a_captured_knock_opens_once_also_across_a_restart") {
        return;
    }
    let k = knocking("[knock.ban]\nenabled = false\n");
    let _ssh = k.lab.tcp_echo(Host::Server, "[::]:22".parse().unwrap());
    let daemon = k.start();
    let four = v4();
    let to_v4 = knock_port(&four, Host::Client);
    // A capture: the first copy opens (for 2 s: a probe that misses costs 0.7 s, so a
    // 1 s grant could end between two probes on a loaded machine), the replay does not.
    let capture = vec![crafted(KEY_HEX, "alice", now(), 1, 2, bound(four.client))];
    k.lab.udp_send(Host::Client, four.client, to_v4, &capture);
    let open = || k.ssh_open_for(Host::Client, four.client, &four);
    assert!(
        eventually(Duration::from_secs(2), open),
        "the first copy opens"
    );
    assert!(
        eventually(Duration::from_secs(4), || !open()),
        "and closes after 2 s"
    );
    k.lab.udp_send(Host::Client, four.client, to_v4, &capture);
    std::thread::sleep(Duration::from_millis(300));
    assert!(!open(), "a replay opens nothing");
    // After a restart the capture is still a replay.
    assert_eq!(daemon.terminate(), 0);
    let daemon = k.start();
    k.lab.udp_send(Host::Client, four.client, to_v4, &capture);
    std::thread::sleep(Duration::from_millis(300));
    assert!(!open(), "a replay after a restart opens nothing");
    let log = daemon.log_text();
    assert!(
        log.contains("reason=\"replay\"") && log.contains("source=10.77.1.2"),
        "{log}"
    );
}

/// A torn write in the replay log (a full disk) before a later record: after a
/// kill -9 and a start, the knock recorded after the tear is still a replay.
#[test]
fn a_torn_replay_log_record_hides_no_later_knock() {
    if !lab_available("a_torn_replay_log_record_hides_no_later_knock") {
        return;
    }
    let k = knocking("[knock.ban]\nenabled = false\n");
    let _ssh = k.lab.tcp_echo(Host::Server, "[::]:22".parse().unwrap());
    let daemon = k.start();
    let four = v4();
    let to_v4 = knock_port(&four, Host::Client);
    let open = || k.ssh_open_for(Host::Client, four.client, &four);
    let knock = |nonce| {
        vec![crafted(
            KEY_HEX,
            "alice",
            now(),
            nonce,
            2,
            bound(four.client),
        )]
    };
    let (first, later) = (knock(31), knock(32));
    k.lab.udp_send(Host::Client, four.client, to_v4, &first);
    assert!(eventually(Duration::from_secs(2), open));
    // The next append stops part-way: 13 bytes of a record, as on a full disk.
    let log = k.lab.dir().join("state/replay.v2.log");
    let mut file = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
    std::io::Write::write_all(&mut file, &[0xee; 13]).unwrap();
    k.lab.udp_send(Host::Client, four.client, to_v4, &later);
    let accepted = || daemon.log_text().matches("knock accepted").count() == 2;
    assert!(
        eventually(Duration::from_secs(3), accepted),
        "{}",
        daemon.log_text()
    );
    daemon.kill_9();
    assert!(
        eventually(Duration::from_secs(4), || !open()),
        "the grants end"
    );

    let daemon = k.start();
    k.lab.udp_send(Host::Client, four.client, to_v4, &later);
    k.lab.udp_send(Host::Client, four.client, to_v4, &first);
    std::thread::sleep(Duration::from_millis(300));
    assert!(!open(), "neither capture opens after the restart");
    assert!(
        daemon.logged_soon("reason=\"replay\""),
        "{}",
        daemon.log_text()
    );
    assert_eq!(
        daemon.log_text().matches("reason=\"replay\"").count(),
        2,
        "{}",
        daemon.log_text()
    );
}

#[test]
fn forged_stale_foreign_and_malformed_knocks_open_nothing() {
    if !lab_available("forged_stale_foreign_and_malformed_knocks_open_nothing") {
        return;
    }
    let k = knocking("[knock.ban]\nenabled = false\n");
    let _ssh = k.lab.tcp_echo(Host::Server, "[::]:22".parse().unwrap());
    let mut daemon = k.start();
    let (four, six) = (v4(), v6());
    let to_v4 = knock_port(&four, Host::Client);
    let t = now();
    let refused: Vec<Vec<u8>> = vec![
        crafted(KEY_HEX, "alice", t - 600, 2, 60, AddressClaim::PacketSource), // stale
        crafted(
            &"13".repeat(32),
            "alice",
            t,
            3,
            60,
            AddressClaim::PacketSource,
        ), // wrong key
        crafted(KEY_HEX, "mallory", t, 4, 60, AddressClaim::PacketSource),     // unknown id
        crafted(
            &"42".repeat(32),
            "no-ssh",
            t,
            5,
            60,
            AddressClaim::PacketSource,
        ), // no ssh
    ];
    k.lab.udp_send(Host::Client, four.client, to_v4, &refused);
    let mut corpus = malformed_corpus(&crafted(
        KEY_HEX,
        "alice",
        t,
        6,
        60,
        AddressClaim::PacketSource,
    ));
    k.lab.udp_send(Host::Client, four.client, to_v4, &corpus);
    corpus.truncate(40);
    k.lab.udp_send(
        Host::Client,
        six.client,
        knock_port(&six, Host::Client),
        &corpus,
    );
    // A knock for the laptop's address, sent by the intruder.
    let IpAddr::V4(laptop) = four.client else {
        unreachable!()
    };
    let bound = crafted(KEY_HEX, "alice", t, 7, 60, AddressClaim::V4(laptop));
    k.lab.udp_send(
        Host::Outside,
        four.mirror,
        knock_port(&four, Host::Outside),
        &[bound],
    );
    std::thread::sleep(Duration::from_millis(300));
    for plan in [&four, &six] {
        assert!(
            !k.ssh_open_for(Host::Client, plan.client, plan),
            "nothing opened for the laptop"
        );
        assert!(
            !k.ssh_open_for(Host::Outside, plan.mirror, plan),
            "nothing opened for the intruder"
        );
    }
    assert!(
        daemon.is_running(),
        "knockgated survives the corpus:\n{}",
        daemon.log_text()
    );
    let log = daemon.log_text();
    for reason in [
        "clock",
        "bad-mac",
        "unknown-key",
        "service-not-allowed",
        "malformed",
    ] {
        assert!(
            log.contains(&format!("reason=\"{reason}\"")),
            "{reason} is logged: {log}"
        );
    }
    assert!(
        log.contains("source=10.77.2.2"),
        "the intruder's address is logged"
    );
    assert!(
        !log.to_lowercase().contains(KEY_HEX),
        "the key is never logged"
    );
}

/// Empty, truncated, oversized, random and bit-flipped versions of a valid knock.
fn malformed_corpus(valid: &[u8]) -> Vec<Vec<u8>> {
    // First (the meter lets ten through at once): a knock's header and nothing after
    // it, which passes the kernel's shape filter and reaches the daemon; most of the
    // rest the kernel drops as junk.
    let mut header_only = valid.to_vec();
    header_only[4..].fill(0);
    let mut corpus = vec![
        header_only,
        Vec::new(),
        valid[..1].to_vec(),
        valid[..113].to_vec(),
        vec![0u8; 1400],
    ];
    let mut long = valid.to_vec();
    long.push(0);
    corpus.push(long);
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    for len in [16usize, 114, 114, 300] {
        corpus.push(
            (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed.to_le_bytes()[0]
                })
                .collect(),
        );
    }
    for bit in (0..valid.len() * 8).step_by(7) {
        let mut flipped = valid.to_vec();
        flipped[bit / 8] ^= 1 << (bit % 8);
        corpus.push(flipped);
    }
    corpus
}

/// What the server sends back when the client sends `datagrams` to `port`: whether a
/// UDP reply came, and how many ICMP errors from the server (port unreachable and
/// the like; neighbour discovery chatter is not an answer).
fn answers(lab: &Lab, client: IpAddr, port: SocketAddr, datagrams: Vec<Vec<u8>>) -> (bool, usize) {
    lab.in_ns(Host::Client, move || {
        use socket2::{Domain, Protocol, Socket, Type};
        let (domain, proto) = if port.is_ipv4() {
            (Domain::IPV4, Protocol::ICMPV4)
        } else {
            (Domain::IPV6, Protocol::ICMPV6)
        };
        let icmp = Socket::new(domain, Type::RAW, Some(proto)).expect("raw icmp socket");
        icmp.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        // recvfrom on a raw socket through std's safe wrapper.
        let icmp = std::net::UdpSocket::from(icmp);
        let udp = std::net::UdpSocket::bind(SocketAddr::new(client, 0)).unwrap();
        udp.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        for d in &datagrams {
            udp.send_to(d, port).unwrap();
        }
        let udp_reply = udp.recv_from(&mut [0u8; 512]).is_ok();
        let mut icmp_errors_from_server = 0;
        let mut buf = [0u8; 1500];
        let end = Instant::now() + Duration::from_millis(500);
        while Instant::now() < end {
            let Ok((n, from)) = icmp.recv_from(&mut buf) else {
                continue;
            };
            let bytes = &buf[..n];
            let icmp_type = if port.is_ipv4() {
                let header = usize::from(bytes.first().map_or(0, |b| b & 0x0f)) * 4;
                bytes.get(header).copied()
            } else {
                bytes.first().copied()
            };
            let is_error = matches!(
                (port.is_ipv4(), icmp_type),
                (true, Some(3 | 11 | 12)) | (false, Some(1..=4))
            );
            if is_error && from.ip() == port.ip() {
                icmp_errors_from_server += 1;
            }
        }
        (udp_reply, icmp_errors_from_server)
    })
}

#[test]
fn nothing_ever_answers_a_knock() {
    if !lab_available("nothing_ever_answers_a_knock") {
        return;
    }
    let k = knocking("");
    let _daemon = k.start();
    for plan in [v4(), v6()] {
        let port = knock_port(&plan, Host::Client);
        let valid = crafted(KEY_HEX, "alice", now(), 9, 5, bound(plan.client));
        let datagrams = vec![valid, b"junk".to_vec(), vec![0u8; 114]];
        assert_eq!(
            answers(&k.lab, plan.client, port, datagrams),
            (false, 0),
            "no UDP reply and no ICMP from the server"
        );
    }
}

/// With knockgated stopped, and after kill -9, the knock port answers exactly as a
/// closed port does — nothing — over IPv4 and IPv6: nothing tells a scanner where
/// knocks would go.
#[test]
fn the_knock_port_looks_closed_when_the_daemon_is_down() {
    if !lab_available("the_knock_port_looks_closed_when_the_daemon_is_down") {
        return;
    }
    let k = knocking("");
    let probe = |k: &Knocking, state: &str| {
        for plan in [v4(), v6()] {
            let knock = answers(
                &k.lab,
                plan.client,
                knock_port(&plan, Host::Client),
                vec![vec![0u8; 114]],
            );
            let closed = answers(
                &k.lab,
                plan.client,
                sa(plan.server_from_client, 62202),
                vec![vec![0u8; 114]],
            );
            assert_eq!(
                knock, closed,
                "{state}: the knock port vs a closed port ({})",
                plan.client
            );
            assert_eq!(
                knock,
                (false, 0),
                "{state}: nothing answers ({})",
                plan.client
            );
        }
    };
    assert_eq!(k.start().terminate(), 0);
    probe(&k, "stopped");
    k.start().kill_9();
    probe(&k, "killed");
}

#[test]
fn a_junk_flood_does_not_stop_a_valid_knock() {
    if !lab_available("a_junk_flood_does_not_stop_a_valid_knock") {
        return;
    }
    // The nft meter lets ~5 junk datagrams a second through to the daemon; ban after 5.
    let k = knocking("[knock.ban]\nafter = 5\n");
    let _ssh = k.lab.tcp_echo(Host::Server, "[::]:22".parse().unwrap());
    let daemon = k.start();
    let four = v4();
    let target = knock_port(&four, Host::Outside);
    let flood = std::thread::scope(|s| {
        let flooder = s.spawn(|| {
            let started = Instant::now();
            // Shaped like a knock (the kernel drops anything else before the daemon).
            let junk: Vec<Vec<u8>> = (0u8..100).map(|i| shaped_junk(i, 114)).collect();
            for _ in 0..1000 {
                k.lab.udp_send(Host::Outside, four.mirror, target, &junk);
                if started.elapsed() > Duration::from_secs(20) {
                    break;
                }
            }
            started.elapsed()
        });
        std::thread::sleep(Duration::from_millis(200));
        let out = k.knock_server(four.server_from_client, &["--wait", "--timeout", "5s"]);
        assert!(
            out.status.success(),
            "valid knock during the flood: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        flooder.join().unwrap()
    });
    eprintln!("flood of 100,000 datagrams took {flood:?}");
    assert!(k.ssh_open_for(Host::Client, four.client, &four));
    let log = daemon.log_text();
    assert!(
        log.contains("event=\"ban\"") && log.contains("source=10.77.2.2"),
        "the flooder is banned: {log}"
    );
}

#[test]
fn kill_9_of_the_daemon_still_ends_the_grant_on_time() {
    if !lab_available("kill_9_of_the_daemon_still_ends_the_grant_on_time") {
        return;
    }
    let k = knocking("");
    let _ssh = k.lab.tcp_echo(Host::Server, "[::]:22".parse().unwrap());
    let daemon = k.start();
    let six = v6();
    let out = k.knock_server(six.server_from_client, &["--ttl", "2s", "--wait"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let granted = Instant::now();
    daemon.kill_9();
    assert!(
        k.ssh_open_for(Host::Client, six.client, &six),
        "still open right after kill -9"
    );
    std::thread::sleep(
        (granted + Duration::from_millis(2300)).saturating_duration_since(Instant::now()),
    );
    assert!(
        !k.ssh_open_for(Host::Client, six.client, &six),
        "closed on time with no daemon"
    );
}

#[test]
fn knock_reads_named_hosts_from_its_config() {
    if !lab_available("knock_reads_named_hosts_from_its_config") {
        return;
    }
    let k = knocking("");
    let _ssh = k.lab.tcp_echo(Host::Server, "[::]:22".parse().unwrap());
    let daemon = k.start();
    let client_config = k.lab.write_file(
        "knock.toml",
        &format!(
            "[hosts.lab]\naddress = \"fd77:1::1\"\nkey_id = \"alice\"\nkey_file = \"{}\"\nserver_id = \"{SERVER_ID}\"\nttl = \"1m\"\n",
            k.key_file.display()
        ),
    );
    let out = k.knock(&["--config", client_config.to_str().unwrap(), "lab", "--wait"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let six = v6();
    assert!(k.ssh_open_for(Host::Client, six.client, &six));
    // A TTL over the server's cap (1 h by default) is capped, not refused.
    let out = k.knock(&[
        "--config",
        client_config.to_str().unwrap(),
        "lab",
        "--ttl",
        "48h",
        "--wait",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The port was open already, so --wait returned at once: give the daemon a moment.
    let capped = |log: String| log.contains("capped=true") && log.contains("ttl_secs=3600");
    assert!(
        eventually(Duration::from_secs(2), || capped(daemon.log_text())),
        "capped to max_ttl: {}",
        daemon.log_text()
    );
    let out = k.knock(&["--config", client_config.to_str().unwrap(), "nosuch"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no host `nosuch`"));
}

/// The uid and gid knockgated runs as in the unprivileged test (no passwd entry needed).
const DAEMON_UID: u32 = 64_123;

/// Hands the lab's files to [`DAEMON_UID`] (as the package and `knockgate keygen` do)
/// and starts knockgated as that user with only CAP_NET_ADMIN, ambient, and the
/// admin group `nogroup` (65534) as a supplementary group.
fn start_as_own_user(k: &Knocking) -> Daemon {
    let id = DAEMON_UID.to_string();
    for path in [k.lab.dir().to_owned(), k.config.clone(), k.key_file.clone()]
        .into_iter()
        .chain([k.lab.dir().join("no-ssh.key")])
    {
        nix::unistd::chown(
            &path,
            Some(nix::unistd::Uid::from_raw(DAEMON_UID)),
            Some(nix::unistd::Gid::from_raw(DAEMON_UID)),
        )
        .unwrap();
    }
    k.lab.start_daemon_wrapped(
        &k.config,
        &[],
        &[
            "setpriv",
            "--reuid",
            &id,
            "--regid",
            &id,
            "--groups",
            "65534",
            "--inh-caps=-all,+net_admin",
            "--ambient-caps=-all,+net_admin",
            "--bounding-set=-all,+net_admin",
            "--",
        ],
    )
}

/// A field of /proc/PID/status, whitespace squeezed (`Uid:` → `64123 64123 64123 64123`).
fn proc_status_field(pid: i32, name: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix(name)
                .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
        })
        .unwrap_or_default()
}

/// The packaged unit runs knockgated as its own user with nothing but an ambient
/// CAP_NET_ADMIN (and the admin group as a supplementary group). `setpriv` does the
/// same here: the daemon must apply and lock its table, take knocks, hand the admin
/// socket to the admin group and save a confirmed config, with no other privilege.
#[test]
fn the_daemon_works_as_its_own_user_with_only_cap_net_admin() {
    if !lab_available("the_daemon_works_as_its_own_user_with_only_cap_net_admin") {
        return;
    }
    let k = knocking("[admin]\ngroup = \"nogroup\"\n");
    let _ssh = k.lab.tcp_echo(Host::Server, "[::]:22".parse().unwrap());
    let daemon = start_as_own_user(&k);
    let uid = DAEMON_UID.to_string();
    let field = |name: &str| proc_status_field(daemon.pid(), name);
    assert!(field("Uid:").starts_with(&uid), "{}", field("Uid:"));
    // CAP_NET_ADMIN is bit 12, and nothing else.
    assert_eq!(field("CapEff:"), "0000000000001000");
    assert!(daemon.logged_soon("table locked"), "{}", daemon.log_text());

    let plan = v4();
    let out = k.knock_server(plan.server_from_client, &["--wait"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(k.ssh_open_for(Host::Client, plan.client, &plan));
    assert!(!k.ssh_open_for(Host::Client, plan.client_alt, &plan));
    let out = k.lab.try_exec(Host::Server, &["nft", "flush", "ruleset"]);
    assert!(out.status.success());
    assert!(
        !k.ssh_open_for(Host::Client, plan.client_alt, &plan),
        "still locked"
    );

    // The admin socket belongs to the admin group; a confirmed config is saved.
    let socket = k.lab.dir().join("admin.sock");
    let meta = std::fs::metadata(&socket).unwrap();
    assert_eq!(std::os::unix::fs::MetadataExt::gid(&meta), 65_534);
    let new_text = std::fs::read_to_string(&k.config)
        .unwrap()
        .replace("[dns]", "[inbound]\ntcp_ports = [80, 443, 8443]\n\n[dns]");
    let new = k.lab.write_file("new.toml", &new_text);
    let admin = |args: &[&str]| support::admin(&socket, args);
    let out = admin(&[
        "apply",
        "--confirm",
        "1m",
        "--config",
        new.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = admin(&["confirm"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read_to_string(&k.config).unwrap(), new_text);
    assert!(
        k.lab
            .nft(&["list", "chain", "inet", "knockgate", "input"])
            .contains("8443"),
        "the confirmed config is in force"
    );
}

/// One 114-byte junk datagram from each of `sources` to `to`.
fn spoof_from(lab: &Lab, sources: impl Iterator<Item = IpAddr> + Send, to: SocketAddr) -> usize {
    lab.spoof(sources, |_| to, &shaped_junk(0x5a, 114))
}

/// `len` bytes of `fill` behind a version-1 knock's header: junk the kernel's shape
/// filter lets through to the daemon, which refuses it.
fn shaped_junk(fill: u8, len: usize) -> Vec<u8> {
    let mut junk = vec![fill; len];
    junk[..4].copy_from_slice(&knockgate::knock::packet::V1_HEADER);
    junk
}

/// Spoofed addresses: IPv4 from 10.80.0.0/16, IPv6 from one /64 (fd77:9::/64).
fn spoofed_v4(n: u32) -> IpAddr {
    IpAddr::V4(std::net::Ipv4Addr::from(0x0a50_0000 + n))
}

fn spoofed_v6(n: u32) -> IpAddr {
    IpAddr::V6(std::net::Ipv6Addr::from(
        (0xfd77_0009_u128 << 96) | (0x1234_u128 << 32) | u128::from(n),
    ))
}

#[test]
fn a_full_meter_still_lets_a_knock_from_a_new_source_in() {
    if !lab_available("a_full_meter_still_lets_a_knock_from_a_new_source_in") {
        return;
    }
    let k = knocking("meter_size = 16\n");
    let _ssh = k.lab.tcp_echo(Host::Server, "[::]:22".parse().unwrap());
    let _daemon = k.start();
    k.lab.allow_spoofing();
    let four = v4();
    let port = knock_port(&four, Host::Client);
    assert_eq!(spoof_from(&k.lab, (0..40).map(spoofed_v4), port), 40);
    let tracked = k
        .lab
        .nft(&["list", "set", "inet", "knockgate", "knock_sources_v4"]);
    assert_eq!(
        tracked.matches("10.80.").count(),
        16,
        "the sources set is full: {tracked}"
    );

    let out = k.knock_server(four.server_from_client, &["--wait", "--timeout", "5s"]);
    assert!(
        out.status.success(),
        "a knock from a source the full meter cannot track: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(k.ssh_open_for(Host::Client, four.client, &four));
}

#[test]
fn a_spoofed_flood_leaves_the_daemon_up_bounded_and_open_to_real_knocks() {
    if !lab_available("a_spoofed_flood_leaves_the_daemon_up_bounded_and_open_to_real_knocks") {
        return;
    }
    let k = knocking("");
    let _ssh = k.lab.tcp_echo(Host::Server, "[::]:22".parse().unwrap());
    let mut daemon = k.start();
    k.lab.allow_spoofing();
    let (four, six) = (v4(), v6());
    let (port4, port6) = (
        knock_port(&four, Host::Client),
        knock_port(&six, Host::Client),
    );
    let rss_before = proc_status_field(daemon.pid(), "VmRSS:");
    let started = Instant::now();
    let (sent, knocked) = std::thread::scope(|s| {
        let flood = s.spawn(|| {
            // 20,000 IPv4 sources and 100,000 IPv6 sources of one /64, twice over.
            let mut sent = 0;
            for _ in 0..2 {
                sent += spoof_from(&k.lab, (0..20_000).map(spoofed_v4), port4);
                sent += spoof_from(&k.lab, (0..100_000).map(spoofed_v6), port6);
            }
            sent
        });
        std::thread::sleep(Duration::from_millis(300));
        let during = k.knock_server(four.server_from_client, &["--wait", "--timeout", "10s"]);
        (flood.join().unwrap(), during)
    });
    let took = started.elapsed();
    assert!(
        knocked.status.success(),
        "a valid knock during the flood: {}",
        String::from_utf8_lossy(&knocked.stderr)
    );
    assert!(daemon.is_running(), "{}", daemon.log_text());
    // Right after, from a fresh address of the other family.
    let after = k.knock_server(six.server_from_client, &["--wait", "--timeout", "5s"]);
    assert!(
        after.status.success(),
        "{}",
        String::from_utf8_lossy(&after.stderr)
    );
    assert!(k.ssh_open_for(Host::Client, six.client, &six));
    let rss = proc_status_field(daemon.pid(), "VmRSS:");
    let kb: u64 = rss
        .split(' ')
        .next()
        .unwrap_or("0")
        .parse()
        .unwrap_or(u64::MAX);
    eprintln!("FLOOD {sent} spoofed datagrams in {took:?}; daemon RSS {rss_before} → {rss}");
    assert!(kb < 64 * 1024, "RSS {rss} after the flood (bound: 64 MB)");
    // The /64 shares one meter slot: the kernel dropped nearly all of its 200,000.
    let sources = k
        .lab
        .nft(&["list", "set", "inet", "knockgate", "knock_sources_v6"]);
    assert!(sources.matches("fd77:9:").count() <= 1, "{sources}");
}

#[test]
fn a_full_ban_set_refuses_new_bans_and_nothing_else() {
    if !lab_available("a_full_ban_set_refuses_new_bans_and_nothing_else") {
        return;
    }
    let k = knocking("[knock.ban]\nafter = 1\nmax = 8\n");
    let _ssh = k.lab.tcp_echo(Host::Server, "[::]:22".parse().unwrap());
    let daemon = k.start();
    k.lab.allow_spoofing();
    let four = v4();
    let port = knock_port(&four, Host::Client);
    for _ in 0..3 {
        spoof_from(&k.lab, (0..20).map(spoofed_v4), port);
    }
    let banned = |lab: &Lab| {
        lab.nft(&["list", "set", "inet", "knockgate", "knock_ban_v4"])
            .matches("10.80.")
            .count()
    };
    assert!(eventually(Duration::from_secs(5), || banned(&k.lab) == 8));
    assert!(
        daemon.logged_soon("event=\"ban-refused\""),
        "{}",
        daemon.log_text()
    );
    let out = k.knock_server(four.server_from_client, &["--wait", "--timeout", "5s"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(banned(&k.lab), 8);
}

#[test]
fn the_kernel_drops_junk_on_the_knock_port_before_the_daemon_and_counts_it() {
    if !lab_available("the_kernel_drops_junk_on_the_knock_port_before_the_daemon_and_counts_it") {
        return;
    }
    // Bans off and a meter wide enough for all of it: whatever the daemon does not
    // see, the kernel's shape filter dropped.
    let k = knocking("rate_per_second = 10000\nburst = 10000\n[knock.ban]\nenabled = false\n");
    let _ssh = k.lab.tcp_echo(Host::Server, "[::]:22".parse().unwrap());
    let daemon = k.start();
    let (four, six) = (v4(), v6());
    let valid = crafted(KEY_HEX, "alice", now(), 1, 60, AddressClaim::PacketSource);
    // Every way a datagram can fail the shape: lengths no knock has, a knock's length
    // without the magic, with another version, with the other version's service byte.
    let mut junk: Vec<Vec<u8>> = vec![
        Vec::new(),
        vec![0x4b],
        valid[..113].to_vec(),
        vec![0; 1400],
        vec![b'A'; 200], // base64-like, but no fwknop keys are configured
        vec![0x5a; 114],
        vec![0x5a; 118],
    ];
    for (at, value) in [(0, b'X'), (1, b'X'), (2, 2), (2, 9), (3, 0), (3, 7)] {
        let mut bad = valid.clone();
        bad[at] = value;
        junk.push(bad);
    }
    let mut v2_as_v1 = vec![0x5a; 118];
    v2_as_v1[..4].copy_from_slice(&knockgate::knock::packet::V1_HEADER);
    junk.push(v2_as_v1);
    let rounds = 50;
    let (junk_before, refused_before) = support::knock_port_counts(&k.lab);
    for _ in 0..rounds {
        k.lab.udp_send(
            Host::Client,
            four.client,
            knock_port(&four, Host::Client),
            &junk,
        );
        k.lab.udp_send(
            Host::Client,
            six.client,
            knock_port(&six, Host::Client),
            &junk,
        );
    }
    let sent = u64::try_from(2 * rounds * junk.len()).unwrap();
    assert!(
        eventually(Duration::from_secs(5), || {
            support::knock_port_counts(&k.lab).0 == junk_before + sent
        }),
        "every junk datagram counted by the kernel: {:?}, want {} more",
        support::knock_port_counts(&k.lab),
        sent
    );
    // What is shaped like a knock still reaches the daemon (which refuses it): a
    // knock's size and header with a wrong MAC, and longer datagrams starting "KG" —
    // which is also how knocks merged by an interface's UDP GRO look here.
    let shaped = vec![
        shaped_junk(0x5a, 114),
        [valid.as_slice(), &[0]].concat(),
        [valid.as_slice(), valid.as_slice()].concat(),
    ];
    k.lab.udp_send(
        Host::Client,
        four.client,
        knock_port(&four, Host::Client),
        &shaped,
    );
    let daemons = refused_before + u64::try_from(shaped.len()).unwrap();
    assert!(
        eventually(Duration::from_secs(5), || {
            support::knock_port_counts(&k.lab).1 == daemons
        }),
        "the shaped ones are the daemon's: {:?}",
        support::knock_port_counts(&k.lab)
    );
    // …and the junk never did: the refusals are the shaped ones.
    let (junk_after, refused_after) = support::knock_port_counts(&k.lab);
    assert_eq!(
        junk_after,
        junk_before + sent,
        "the shaped ones are not junk"
    );
    assert_eq!(refused_after, daemons, "{}", daemon.log_text());
    assert_eq!(
        daemon.log_text().matches("knock refused").count(),
        shaped.len(),
        "the daemon logged only the shaped ones"
    );
    // A valid knock still opens, over IPv4 and IPv6.
    for plan in [&four, &six] {
        let out = k.knock_server(plan.server_from_client, &["--wait", "--timeout", "5s"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(k.ssh_open_for(Host::Client, plan.client, plan));
    }
    // The count survives a reload (a whole-table replace).
    let reloaded = support::admin(&k.lab.dir().join("admin.sock"), &["reload"]);
    assert!(reloaded.status.success());
    assert!(support::knock_port_counts(&k.lab).0 >= junk_before + sent);
}
