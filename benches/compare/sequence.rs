//! Port sequences (issue 15): last touch → open beside knockd's sequence, the kernel
//! elements per key, and what writing a step costs with 1, 100 and 1,000 keys.

use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use knockgate::knock::Secret;
use knockgate::knock::auth::ServerId;
use knockgate::sequence::{SequenceSpec, TouchProtocols};
use knockgate::service::Ports;

use crate::measure;
use crate::report::{OpenRow, RotationRow, Spread};
use crate::support::{self, Host, Lab, v4};

const SERVER_ID: &str = "bench";
const STEP_SECS: u32 = 2;

fn spec() -> SequenceSpec {
    SequenceSpec {
        ports: Ports {
            first: 30_000,
            last: 60_999,
        },
        length: 4,
        protocols: TouchProtocols::Udp,
        step_secs: STEP_SECS,
    }
}

fn key_hex(i: usize) -> String {
    format!("{:064x}", 0x5eed_0000_u128 + i as u128)
}

/// knockgated with `n` sequence keys (UDP touches, 2 s steps), debug lines for the
/// step writes.
fn start(lab: &Lab, n: usize) -> support::Daemon {
    use std::fmt::Write as _;
    let mut keys = String::new();
    for i in 0..n {
        let file = lab.write_file(&format!("k{i}.key"), &key_hex(i));
        std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        let _ = write!(
            keys,
            "[[keys]]\nid = \"k{i}\"\nfile = \"{}\"\nsequence = true\nsequence_ttl = \"1h\"\n",
            file.display()
        );
    }
    let config = lab.write_file(
        "knockgate.toml",
        &format!(
            "[knock]\nserver_id = \"{SERVER_ID}\"\nmax_ttl = \"1h\"\n[dns]\nresolvers = [\"10.77.2.53\"]\n\
             [sequence]\nprotocol = \"udp\"\nstep = \"{STEP_SECS}s\"\n{keys}"
        ),
    );
    let filter = PathBuf::from("info,knockgate::daemon::run=debug");
    lab.start_daemon_with_env(&config, &[("RUST_LOG", &filter)])
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Last touch → first TCP connect to 22 that succeeds, once per key (each key's
/// sequence opens once a step), then revoked.
pub fn last_touch_to_open(plan_runs: usize, poll: Duration) -> OpenRow {
    let lab = Lab::new();
    let p = v4();
    let daemon = start(&lab, plan_runs);
    assert!(daemon.logged_soon("listening for completed port sequences"));
    let _ssh = lab.tcp_echo(Host::Server, "0.0.0.0:22".parse().unwrap());
    let server = ServerId::new(SERVER_ID).unwrap();
    let socket = lab.dir().join("admin.sock");
    let took: Vec<Option<Duration>> = (0..plan_runs)
        .map(|i| {
            let secret = Secret::from_hex(&key_hex(i)).unwrap();
            let derived_at = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis();
            let step = spec().step_at(unix_now());
            let touches = spec().derive(&secret, &server, step).unwrap();
            let took = lab.in_ns(Host::Client, || {
                let udp = UdpSocket::bind(SocketAddr::new(p.client, 0)).unwrap();
                for (i, t) in touches.iter().enumerate() {
                    if i > 0 {
                        // As `knock --sequence` does: back to back, a touch can overtake
                        // the one before on a busy host.
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    let _ = udp.send_to(&[0], SocketAddr::new(p.server_from_client, t.port));
                }
                let started = Instant::now();
                measure::poll_open(
                    SocketAddr::new(p.server_from_client, 22),
                    started,
                    Duration::from_secs(3),
                    poll,
                )
            });
            if took.is_none() {
                println!(
                    "sequence of key k{i} (step {step}, derived {} ms into a {STEP_SECS} s step) did not open: {touches:?}",
                    derived_at % (u128::from(STEP_SECS) * 1000)
                );
            }
            revoke_all(&socket);
            took
        })
        .collect();
    let opened: Vec<Duration> = took.iter().flatten().copied().collect();
    if opened.len() < took.len() {
        for line in daemon
            .log_text()
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        {
            println!("  daemon: {line}");
        }
    }
    OpenRow {
        daemon: "knockgate (port sequence, from the last touch)",
        runs: took.len(),
        opened: opened.len(),
        spread: Spread::of_durations(&opened),
        fine: None,
    }
}

fn revoke_all(socket: &std::path::Path) {
    use knockgate::admin::{Request, Response, client::call};
    // The daemon books a completion a moment after the kernel opened it.
    for _ in 0..50 {
        if let Ok(Response::Grants { grants, .. }) = call(socket, &Request::Grants { after: None })
        {
            if !grants.is_empty() {
                for g in grants {
                    let _ = call(socket, &Request::Revoke { id: g.id });
                }
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// With `n` keys: the elements in the kernel's sequence maps per key, and the daemon's
/// step writes (µs each, from its own debug lines) over `steps` steps.
pub fn rotation(n: usize, steps: u32) -> RotationRow {
    let lab = Lab::new();
    let daemon = start(&lab, n);
    assert!(daemon.logged_soon("listening for completed port sequences"));
    let until = Instant::now() + Duration::from_secs(u64::from(STEP_SECS * steps) + 1);
    while Instant::now() < until {
        std::thread::sleep(Duration::from_millis(200));
    }
    let elements: usize = ["seq_start", "seq_next", "seq_last"]
        .iter()
        .map(|set| {
            lab.in_ns(Host::Server, || {
                let mut fw = knockgate::firewall::nft::NftFirewall::open().unwrap();
                knockgate::firewall::Firewall::elements(&mut fw, "knockgate", set)
                    .unwrap()
                    .len()
            })
        })
        .sum();
    let writes: Vec<f64> = daemon
        .log_text()
        .lines()
        .filter(|l| l.contains("sequences written"))
        .filter_map(|l| {
            let us = l.split("write_us=").nth(1)?.split_whitespace().next()?;
            us.parse::<f64>().ok()
        })
        .collect();
    let per_write: Vec<usize> = daemon
        .log_text()
        .lines()
        .filter(|l| l.contains("sequences written"))
        .filter_map(|l| {
            l.split("elements=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect();
    RotationRow {
        keys: n,
        elements_per_key: elements as f64 / n as f64,
        written_per_step: per_write.first().copied().unwrap_or(0),
        write_ms: writes.iter().map(|us| us / 1000.0).collect(),
    }
}
