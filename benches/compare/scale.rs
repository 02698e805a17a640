//! Grant scale: many concurrent grants, and what they cost new connections.
//!
//! knockgate keeps grants in an nftables set (one hash lookup per new connection);
//! fwknopd adds one iptables rule per grant to its FWKNOP_INPUT chain (a linear walk),
//! and forks iptables to do it. knockd does the same as fwknopd (an iptables command
//! per grant), so it is not run again here.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use crate::measure::{AcceptAll, connect_rate};
use crate::subjects::{Kind, SPA_PORT, Subject, fwknop_packets_for};
use crate::support::{Host, Lab};

/// One row: `grants` concurrent grants.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ScaleRow {
    pub daemon: &'static str,
    pub grants: usize,
    /// Grants opened per second, and how that was measured.
    pub grant_rate: Option<f64>,
    pub grant_rate_how: String,
    /// New connections per second from a granted client with `grants` grants in force.
    pub connect_rate: f64,
    /// … relative to the same with only the client's own grant.
    pub connect_ratio: f64,
}

/// The `i`-th address that is not the lab's (100.64.0.0/10, shared address space).
fn other_address(i: usize) -> IpAddr {
    let i = u32::try_from(i).unwrap();
    IpAddr::V4(Ipv4Addr::from(0x6440_0000 + 1 + i))
}

/// knockgate: `n - 1` grants for other addresses through the admin socket (what
/// `knockgate open ssh` sends), plus the client's own, then the connect rate.
pub fn knockgate(
    lab: &Lab,
    sizes: &[usize],
    client: IpAddr,
    server: IpAddr,
    window: Duration,
) -> Vec<ScaleRow> {
    use knockgate::admin::{Request, Response, client::call};
    let socket = lab.dir().join("admin.sock");
    let _accept = AcceptAll::start(lab, SocketAddr::new(server, 22));
    let open = |from: IpAddr| {
        let answer = call(
            &socket,
            &Request::Open {
                service: "ssh".into(),
                from,
                ttl_secs: Some(3600),
            },
        );
        assert!(matches!(answer, Ok(Response::Opened { .. })), "{answer:?}");
    };
    open(client);
    let to = SocketAddr::new(server, 22);
    let base = connect_rate(lab, client, to, window);
    let mut opened = 0;
    sizes
        .iter()
        .map(|&n| {
            let started = Instant::now();
            let before = opened;
            while opened < n.saturating_sub(1) {
                open(other_address(opened));
                opened += 1;
            }
            let rate = (opened - before) as f64 / started.elapsed().as_secs_f64();
            let connect = connect_rate(lab, client, to, window);
            ScaleRow {
                daemon: "knockgate",
                grants: n,
                grant_rate: Some(rate),
                grant_rate_how: format!("admin socket, {} grants", opened - before),
                connect_rate: connect,
                connect_ratio: connect / base,
            }
        })
        .collect()
}

/// fwknopd: its grant rate measured with `spa_count` real SPA packets (each asking
/// for another address); for the connect rate, the chain is filled with the rules
/// fwknopd would have added for `n - 1` other grants (by iptables-restore: fwknopd
/// itself would need minutes), with the client's own rule last.
pub fn fwknopd(
    lab: &Lab,
    subject: &Subject,
    sizes: &[usize],
    spa_count: usize,
    (client, server): (IpAddr, IpAddr),
    window: Duration,
) -> Vec<ScaleRow> {
    assert_eq!(subject.kind, Kind::Fwknopd);
    let grant_rate = fwknopd_grant_rate(lab, spa_count, server);
    let _accept = AcceptAll::start(lab, SocketAddr::new(server, 22));
    let to = SocketAddr::new(server, 22);
    let client_rule = rule(client);
    restore(lab, &client_rule);
    let base = connect_rate(lab, client, to, window);
    sizes
        .iter()
        .map(|&n| {
            let mut rules: String = (0..n.saturating_sub(1))
                .map(|i| rule(other_address(i)))
                .collect();
            rules.push_str(&client_rule);
            restore(lab, &rules);
            let connect = connect_rate(lab, client, to, window);
            ScaleRow {
                daemon: "fwknopd",
                grants: n,
                grant_rate: Some(grant_rate),
                grant_rate_how: format!("{spa_count} SPA packets"),
                connect_rate: connect,
                connect_ratio: connect / base,
            }
        })
        .collect()
}

/// The rule fwknopd adds for a grant to `ip` (as `iptables -S` shows it).
fn rule(ip: IpAddr) -> String {
    format!(
        "-A FWKNOP_INPUT -s {ip}/32 -p tcp -m tcp --dport 22 -m comment --comment _exp_4102444800 -j ACCEPT\n"
    )
}

/// Replaces FWKNOP_INPUT's rules with `rules` in one iptables-restore.
fn restore(lab: &Lab, rules: &str) {
    let text = format!("*filter\n-F FWKNOP_INPUT\n{rules}COMMIT\n");
    let file = lab.write_file("fwknop-rules.txt", &text);
    lab.exec(
        Host::Server,
        &[
            "sh",
            "-c",
            &format!("iptables-restore --noflush < {}", file.display()),
        ],
    );
}

/// Grants per second of a running fwknopd: `n` SPA packets for `n` addresses sent at
/// once from the client, until all `n` rules are in its chain.
fn fwknopd_grant_rate(lab: &Lab, n: usize, server: IpAddr) -> f64 {
    let dir = lab.dir().join("fwknopd");
    let addresses: Vec<IpAddr> = (0..n).map(|i| other_address(500_000 + i)).collect();
    let packets = fwknop_packets_for(&dir, &addresses);
    let started = Instant::now();
    lab.in_ns(Host::Client, || {
        let udp = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        for p in &packets {
            let _ = udp.send_to(p, SocketAddr::new(server, SPA_PORT));
            // fwknopd reads one datagram per loop turn; do not overrun its socket.
            std::thread::sleep(Duration::from_micros(200));
        }
    });
    let deadline = Duration::from_secs(120);
    loop {
        let listed = lab.exec(Host::Server, &["iptables", "-S", "FWKNOP_INPUT"]);
        let rules = listed.lines().filter(|l| l.starts_with("-A")).count();
        if rules >= n || started.elapsed() > deadline {
            return rules as f64 / started.elapsed().as_secs_f64();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
