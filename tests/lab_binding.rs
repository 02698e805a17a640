//! Bound knocks in the lab (issue 12): a knock names the address it opens for, so
//! whoever captures it gets nothing; the `knock` binary finds that address itself on
//! an IPv6 route and a public-looking IPv4 route, and behind the lab's NAT asks the
//! configured discovery (DNS and URL); a key that requires binding refuses unbound
//! knocks; replays never ban. Root; CI runs these.

mod support;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, UdpSocket};
use std::path::PathBuf;
use std::process::Output;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use support::{Daemon, Host, Lab, eventually, lab_available, sa, v4, v6};

const SERVER_ID: &str = "lab-server";
const KEY_HEX: &str = "5e1f6a0c4b2e9f7a3c5d8e1b0a6f4c2d9e7b5a3c1f0e8d6b4a2c0e9f7d5b3a1c";
/// Longest a helper server of these tests lives.
const HELPER_LIFETIME: Duration = Duration::from_secs(120);

struct Setup {
    lab: Lab,
    key: PathBuf,
    daemon: Daemon,
}

/// A lab with key `laptop` as `knockgate keygen` writes it (bound knocks required),
/// the SSH echo server, and `forward = "leave"` so that the client and the outside
/// reach each other through the server. Bans after 5 invalid knocks a minute, and a
/// meter loose enough that every test datagram reaches the daemon.
fn setup(lab: Lab) -> Setup {
    use std::os::unix::fs::PermissionsExt;
    let key = lab.write_file("laptop.key", KEY_HEX);
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let config = lab.write_file(
        "knockgate.toml",
        &format!(
            "forward = \"leave\"\n[knock]\nserver_id = \"{SERVER_ID}\"\nrate_per_second = 200\nburst = 200\n\
             [knock.ban]\nafter = 5\n[dns]\nresolvers = [\"10.77.2.53\"]\n\
             [[keys]]\nid = \"laptop\"\nfile = \"{}\"\nservices = [\"ssh\"]\nallow_unbound = false\n",
            key.display()
        ),
    );
    let daemon = lab.start_daemon(&config);
    Setup { lab, key, daemon }
}

impl Setup {
    /// Runs `knock --server SERVER:62201` for key `laptop` from `host`, with `extra`.
    fn knock(&self, host: Host, server: IpAddr, extra: &[&str]) -> Output {
        let server = SocketAddr::new(server, 62201).to_string();
        let mut args = vec![
            "--server",
            &server,
            "--key-id",
            "laptop",
            "--key-file",
            self.key.to_str().unwrap(),
            "--server-id",
            SERVER_ID,
        ];
        args.extend_from_slice(extra);
        std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.lab.ns(host),
                env!("CARGO_BIN_EXE_knock"),
            ])
            .args(&args)
            .output()
            .expect("run knock")
    }

    /// How many knocks the daemon has logged as accepted, bound, for `address`.
    fn bound_grants_for(&self, address: IpAddr) -> usize {
        self.daemon
            .log_text()
            .lines()
            .filter(|l| {
                l.contains("knock accepted")
                    && l.contains("bound=true")
                    && l.contains(&format!("address={address} "))
            })
            .count()
    }

    fn ssh_from(&self, host: Host, from: IpAddr, server: IpAddr) -> bool {
        self.lab.tcp_works_from(host, from, sa(server, 22))
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Stops a helper server thread on drop.
struct Helper {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Helper {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A DNS server at `addr` in `host` that answers every A question with the asker's
/// own IPv4 address (what `myip.opendns.com` does).
fn whoami_dns(lab: &Lab, host: Host, addr: SocketAddr) -> Helper {
    use simple_dns::rdata::{A, RData};
    use simple_dns::{CLASS, Packet, ResourceRecord};
    let socket = lab.in_ns(host, || UdpSocket::bind(addr)).expect("bind dns");
    socket
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let thread = std::thread::spawn(move || {
        let started = Instant::now();
        let mut buf = [0u8; 1500];
        while !flag.load(Ordering::Relaxed) && started.elapsed() < HELPER_LIFETIME {
            let Ok((n, peer)) = socket.recv_from(&mut buf) else {
                continue;
            };
            let IpAddr::V4(asker) = peer.ip() else {
                continue;
            };
            let Ok(query) = Packet::parse(&buf[..n]) else {
                continue;
            };
            let mut reply = query.clone().into_reply();
            for q in &query.questions {
                reply.answers.push(ResourceRecord::new(
                    q.qname.clone(),
                    CLASS::IN,
                    0,
                    RData::A(A::from(asker)),
                ));
            }
            if let Ok(bytes) = reply.build_bytes_vec() {
                let _ = socket.send_to(&bytes, peer);
            }
        }
    });
    Helper {
        stop,
        thread: Some(thread),
    }
}

/// An HTTP server at `addr` in `host` whose every answer is the asker's address.
fn whoami_http(lab: &Lab, host: Host, addr: SocketAddr) -> Helper {
    let listener = lab
        .in_ns(host, || TcpListener::bind(addr))
        .expect("bind http");
    listener.set_nonblocking(true).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let thread = std::thread::spawn(move || {
        let started = Instant::now();
        while !flag.load(Ordering::Relaxed) && started.elapsed() < HELPER_LIFETIME {
            let Ok((mut stream, peer)) = listener.accept() else {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            };
            let _ = stream.set_nonblocking(false);
            let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
            let mut request = [0u8; 2048];
            let _ = stream.read(&mut request);
            let body = format!("{}\n", peer.ip());
            let _ = write!(
                stream,
                "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
        }
    });
    Helper {
        stop,
        thread: Some(thread),
    }
}

#[test]
fn a_captured_bound_knock_opens_nothing_for_the_intruder_and_replays_never_ban() {
    if !lab_available("a_captured_bound_knock_opens_nothing_for_the_intruder_and_replays_never_ban")
    {
        return;
    }
    let s = setup(Lab::new());
    let _ssh = s.lab.tcp_echo(Host::Server, "[::]:22".parse().unwrap());
    let four = v4();
    // The laptop's knock goes where its name resolved: the intruder (a spoofed DNS
    // answer, or anyone on the path), who captures it.
    let trap = s
        .lab
        .in_ns(Host::Outside, || UdpSocket::bind(sa(four.mirror, 62201)))
        .unwrap();
    trap.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let out = s.knock(Host::Client, four.mirror, &[]);
    assert!(out.status.success(), "{}", text(&out));
    let mut buf = [0u8; 512];
    let (n, from) = trap
        .recv_from(&mut buf)
        .expect("the intruder captures the knock");
    assert_eq!(from.ip(), four.client);
    let captured = buf[..n].to_vec();

    // The intruder sends it first, from its own address, again and again.
    let server_from_outside = sa(four.server_from_outside, 62201);
    for _ in 0..10 {
        s.lab.udp_send(
            Host::Outside,
            four.mirror,
            server_from_outside,
            std::slice::from_ref(&captured),
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        s.daemon.logged_soon("reason=\"other-address\""),
        "{}",
        s.daemon.log_text()
    );
    assert!(
        !s.ssh_from(Host::Outside, four.mirror, four.server_from_outside),
        "the intruder got nothing"
    );
    assert!(!s.daemon.log_text().contains("knock accepted"));

    // The laptop's own copy, sent after, opens for the laptop.
    let knock_port = sa(four.server_from_client, 62201);
    s.lab.udp_send(
        Host::Client,
        four.client,
        knock_port,
        std::slice::from_ref(&captured),
    );
    assert!(
        eventually(Duration::from_secs(2), || s.ssh_from(
            Host::Client,
            four.client,
            four.server_from_client
        )),
        "{}",
        s.daemon.log_text()
    );
    assert!(
        eventually(Duration::from_secs(2), || s.bound_grants_for(four.client)
            == 1),
        "{}",
        s.daemon.log_text()
    );

    // Replays, well past the ban limit (5 a minute here), never ban the laptop.
    for _ in 0..15 {
        s.lab.udp_send(
            Host::Client,
            four.client,
            knock_port,
            std::slice::from_ref(&captured),
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        eventually(Duration::from_secs(3), || {
            s.daemon.log_text().matches("reason=\"replay\"").count() >= 10
        }),
        "{}",
        s.daemon.log_text()
    );
    let bans = s
        .lab
        .nft(&["list", "set", "inet", "knockgate", "knock_ban_v4"]);
    assert!(!bans.contains("10.77."), "no one is banned: {bans}");
    assert!(!s.daemon.log_text().contains("event=\"ban\""));
    let out = s.knock(Host::Client, four.server_from_client, &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        eventually(Duration::from_secs(2), || s.bound_grants_for(four.client)
            == 2),
        "a fresh knock from the laptop still works: {}",
        s.daemon.log_text()
    );
}

#[test]
fn knock_binds_on_its_own_over_ipv6_and_a_public_ipv4_route_and_unbound_is_refused() {
    if !lab_available(
        "knock_binds_on_its_own_over_ipv6_and_a_public_ipv4_route_and_unbound_is_refused",
    ) {
        return;
    }
    let lab = Lab::new();
    let (server, client) = lab.public_link();
    let s = setup(lab);
    let _ssh = s.lab.tcp_echo(Host::Server, "[::]:22".parse().unwrap());

    // A public-looking IPv4 route: bound to the route's source.
    let out = s.knock(Host::Client, server, &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        eventually(Duration::from_secs(2), || s.ssh_from(
            Host::Client,
            client,
            server
        )),
        "{}",
        s.daemon.log_text()
    );
    assert!(
        eventually(Duration::from_secs(2), || s.bound_grants_for(client) == 1),
        "{}",
        s.daemon.log_text()
    );

    // IPv6: bound to the route's source.
    let six = v6();
    let out = s.knock(Host::Client, six.server_from_client, &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        eventually(Duration::from_secs(2), || s.ssh_from(
            Host::Client,
            six.client,
            six.server_from_client
        )),
        "{}",
        s.daemon.log_text()
    );
    assert!(
        eventually(Duration::from_secs(2), || s.bound_grants_for(six.client)
            == 1),
        "{}",
        s.daemon.log_text()
    );

    // Unbound, the key refuses it, and the log says why.
    let four = v4();
    let out = s.knock(
        Host::Client,
        four.server_from_client,
        &["--source", "packet"],
    );
    assert!(out.status.success(), "sent: {}", text(&out));
    assert!(
        s.daemon.logged_soon("reason=\"unbound\""),
        "{}",
        s.daemon.log_text()
    );
    assert!(
        s.daemon.log_text().contains("allow_unbound = false"),
        "{}",
        s.daemon.log_text()
    );
    assert!(!s.ssh_from(Host::Client, four.client, four.server_from_client));
}

#[test]
fn behind_a_nat_knock_asks_the_configured_discovery() {
    if !lab_available("behind_a_nat_knock_asks_the_configured_discovery") {
        return;
    }
    let lab = Lab::new();
    let (laptop, public) = lab.home_behind_nat();
    let s = setup(lab);
    let _ssh = s.lab.tcp_echo(Host::Server, "[::]:22".parse().unwrap());
    let server: IpAddr = "203.0.113.1".parse().unwrap();
    let four = v4();

    // Without discovery the client will not guess: it says what to configure.
    let out = s.knock(Host::Home, server, &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("(192.168.77.2) is private, so a NAT rewrites it")
            && text(&out).contains("discover"),
        "{}",
        text(&out)
    );
    assert!(!s.ssh_from(Host::Home, laptop, server));

    // DNS discovery, through the NAT to the lab's outside resolver address.
    let _dns = whoami_dns(&s.lab, Host::Outside, sa(four.resolver, 53));
    let dns = format!("dns:myip.lab@{}", four.resolver);
    let out = s.knock(Host::Home, server, &["--discover", &dns]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        eventually(Duration::from_secs(2), || s.ssh_from(
            Host::Home,
            laptop,
            server
        )),
        "{}",
        s.daemon.log_text()
    );
    assert!(
        eventually(Duration::from_secs(2), || s.bound_grants_for(public) == 1),
        "{}",
        s.daemon.log_text()
    );

    // URL discovery (curl), from a web server on the server's open port 80.
    let _http = whoami_http(&s.lab, Host::Server, sa(server, 80));
    let out = s.knock(Host::Home, server, &["--discover", "http://203.0.113.1/"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        eventually(Duration::from_secs(2), || s.bound_grants_for(public) == 2),
        "{}",
        s.daemon.log_text()
    );

    // A discovery that answers wrong binds the knock to the wrong address: refused,
    // nothing opens for anyone.
    let out = s.knock(Host::Home, server, &["--source", "198.51.100.99"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        s.daemon.logged_soon("reason=\"other-address\""),
        "{}",
        s.daemon.log_text()
    );
}
