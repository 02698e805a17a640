//! Knock benchmarks (not tests: they print figures and assert nothing about time).
//!
//!     cargo bench --bench knock            # as root for the lab part
//!
//! 1. Rejection rate of the knock handler on one core, in process, for junk of
//!    three kinds (malformed, unknown key id, well-formed with a bad MAC — the
//!    costliest, one HMAC each).
//! 2. Knock → open latency in the lab: from sending a knock in the client namespace
//!    to the first TCP connect to port 22 that succeeds (polled every 1 ms), with
//!    knockgated in the server namespace. Median and p99 over many runs.
//! 3. The grant book's operations with many grants booked (in process): a new grant,
//!    an extension, a revoke, an expiry of one grant, and the next expiry asked.
//! 4. A million grants in the lab: start, stop, restart and reload (`million.rs`).

#[path = "../tests/support/mod.rs"]
mod support;

#[path = "knock/million.rs"]
mod million;

use std::hint::black_box;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use knockgate::config::Config;
use knockgate::daemon::core::{Core, REPLAY_CAPACITY, Settings};
use knockgate::firewall::Firewall;
use knockgate::firewall::memory::MemoryFirewall;
use knockgate::grants::GrantBook;
use knockgate::knock::auth::{ServerId, seal};
use knockgate::knock::{AddressClaim, KeyId, Knock, Secret, ServiceId};
use knockgate::policy::{KeyEntry, KeyRing, Limits};
use knockgate::state::ReplayLog;
use support::{Host, Lab, sa, v4};

const KEY_HEX: &str = "6c1e9a4f2b7d0c5e8a3f6b1d4e9c2a7f0b5d8e3a6c1f4b9e2d7a0c5f8b3e6d1a";

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn knock(key_hex: &str, key_id: &str, nonce: [u8; 16]) -> Vec<u8> {
    knock_for("ssh", key_hex, key_id, nonce)
}

fn knock_for(service: &str, key_hex: &str, key_id: &str, nonce: [u8; 16]) -> Vec<u8> {
    let k = Knock {
        key_id: KeyId::new(key_id).unwrap(),
        service: ServiceId::of(service),
        timestamp: unix_now(),
        nonce,
        ttl_secs: 60,
        address: AddressClaim::PacketSource,
    };
    seal(
        &k,
        &Secret::from_hex(key_hex).unwrap(),
        &ServerId::new("bench").unwrap(),
    )
}

fn rejection_rates() {
    rejection_rates_with(0);
    for stanzas in [1, 10, 100] {
        rejection_rates_with(stanzas);
    }
}

/// `n` fwknop stanzas with distinct keys (no packet matches any).
fn fwknop_stanzas_for_bench(n: usize) -> Vec<knockgate::policy::FwknopEntry> {
    (0..n)
        .map(|i| knockgate::policy::FwknopEntry {
            name: format!("s{i}"),
            keys: knockgate::fwknop::SpaKeys {
                encryption: zeroize::Zeroizing::new(vec![u8::try_from(i % 250).unwrap() + 1; 32]),
                hmac: zeroize::Zeroizing::new(vec![u8::try_from(i % 250).unwrap() + 2; 64]),
                digest: knockgate::fwknop::HmacDigest::Sha256,
            },
            services: vec!["ssh".to_owned()],
            sources: vec!["0.0.0.0/0".parse().unwrap()],
            ttl: Duration::from_secs(30),
            max_ttl: None,
            unbound: false,
            other_source: false,
            max_grants: 64,
        })
        .collect()
}

/// Junk rejected with `fwknop_stanzas` fwknop stanzas configured (0: native only).
fn rejection_rates_with(fwknop_stanzas: usize) {
    let dir = tempfile::tempdir().unwrap();
    let mut fw = MemoryFirewall::default();
    fw.replace(&knockgate::ruleset::baseline(&Config::default(), &[]))
        .unwrap();
    let mut keys = KeyRing::default();
    keys.insert(
        KeyId::new("alice").unwrap(),
        KeyEntry {
            secret: Secret::from_hex(KEY_HEX).unwrap(),
            services: vec!["ssh".to_owned()],
            sources: vec!["0.0.0.0/0".parse().unwrap()],
            max_ttl: None,
            other_source: false,
            unbound: true,
            max_grants: 64,
        },
    );
    keys.set_fwknop(fwknop_stanzas_for_bench(fwknop_stanzas));
    let settings = Settings {
        table: "knockgate".into(),
        server_id: ServerId::new("bench").unwrap(),
        skew: Duration::from_secs(30),
        limits: Limits {
            default_ttl: Duration::from_secs(60),
            max_ttl: Duration::from_secs(3600),
        },
        ban: None,
        ipv6_prefix: 64,
        book_path: dir.path().join("grants.json"),
        egress_max_ttl: Duration::from_secs(3600),
        services: knockgate::service::port_services(&knockgate::config::Config::default()),
        egress_service: false,
        max_grants: 100_000,
    };
    let replay = ReplayLog::open(dir.path(), REPLAY_CAPACITY, unix_now()).unwrap();
    let mut core = Core::new(fw, settings, keys, replay, GrantBook::default());
    let source: IpAddr = "203.0.113.9".parse().unwrap();
    let now = unix_now();
    // fwknop-shaped junk: 204 characters of base64, the size of a real packet.
    let spa_junk: Vec<u8> = (0..204u8)
        .map(|i| {
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
                [usize::from(i * 7) % 64]
        })
        .collect();
    let kinds = if fwknop_stanzas == 0 {
        vec![
            ("malformed (random 114 bytes)", vec![0x5au8; 114]),
            ("unknown key id", knock(KEY_HEX, "mallory", [1; 16])),
            (
                "bad MAC (one HMAC-SHA256 each)",
                knock(&"00".repeat(32), "alice", [2; 16]),
            ),
        ]
    } else {
        vec![
            ("native bad MAC", knock(&"00".repeat(32), "alice", [2; 16])),
            ("fwknop-shaped, no stanza's HMAC", spa_junk),
        ]
    };
    if fwknop_stanzas == 0 {
        println!("## Junk rejected by the knock handler, one core, in process\n");
    } else {
        println!("\n### … with {fwknop_stanzas} fwknop stanza(s) configured\n");
    }
    println!("| junk | datagrams/s | ns each |\n|---|---:|---:|");
    for (name, datagram) in kinds {
        let n = if fwknop_stanzas >= 10 {
            20_000u32
        } else {
            200_000u32
        };
        let started = Instant::now();
        for _ in 0..n {
            black_box(core.knock(
                black_box(&datagram),
                source,
                knockgate::clock::UnixMs::from_secs(now),
            ));
        }
        let took = started.elapsed();
        let per = took / n;
        let rate = f64::from(n) / took.as_secs_f64();
        println!("| {name} | {rate:.0} | {} |", per.as_nanos());
    }
}

/// The `p`-th percentile (0–100) of sorted samples, by nearest rank.
fn percentile(sorted: &[Duration], p: usize) -> Duration {
    let last = sorted.len().saturating_sub(1);
    sorted[(p * last).div_ceil(100).min(last)]
}

/// Knock → open for `service`, whose TCP port is `port` (ssh: 22; `staging`: 8443).
fn knock_to_open(service: &str, port: u16) {
    if !nix::unistd::geteuid().is_root() {
        println!("\n(knock → open skipped: the lab needs root)");
        return;
    }
    let lab = Lab::new();
    let _ssh = lab.tcp_echo(Host::Server, SocketAddr::new("::".parse().unwrap(), port));
    let key = lab.write_file("alice.key", KEY_HEX);
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let socket = lab.dir().join("admin.sock");
    let config = lab.write_file(
        "k.toml",
        &format!(
            "[knock]\nserver_id = \"bench\"\nrate_per_second = 1000\nburst = 1000\n[knock.ban]\nenabled = false\n[admin]\nsocket = \"{}\"\n\
             [dns]\nresolvers = [\"10.77.2.53\"]\n[[services]]\nname = \"staging\"\nprotocol = \"tcp\"\nport = 8443\n\
             [[keys]]\nid = \"alice\"\nfile = \"{}\"\nallow_unbound = true\nservices = [\"ssh\", \"staging\"]\n",
            socket.display(),
            key.display()
        ),
    );
    let daemon = lab.start_daemon(&config);
    let plan = v4();
    let (to_knock, to_ssh) = (
        sa(plan.server_from_client, 62201),
        sa(plan.server_from_client, port),
    );
    let runs = 200u8;
    let mut samples = Vec::new();
    for i in 0..runs {
        let mut nonce = [0u8; 16];
        nonce[0] = i;
        nonce[1] = 0xbe;
        let datagram = knock_for(service, KEY_HEX, "alice", nonce);
        let took = lab.in_ns(Host::Client, || {
            let udp = std::net::UdpSocket::bind(SocketAddr::new(plan.client, 0)).unwrap();
            let started = Instant::now();
            udp.send_to(&datagram, to_knock).unwrap();
            loop {
                if TcpStream::connect_timeout(&to_ssh, Duration::from_millis(1)).is_ok() {
                    return Some(started.elapsed());
                }
                if started.elapsed() > Duration::from_secs(2) {
                    return None;
                }
            }
        });
        let Some(took) = took else {
            panic!(
                "run {i}: the knock did not open the port:\n{}",
                daemon.log_text()
            )
        };
        samples.push(took);
        // Close it again for the next run.
        let grants = knockgate::admin::client::call(
            &socket,
            &knockgate::admin::Request::Grants { after: None },
        )
        .unwrap();
        if let knockgate::admin::Response::Grants { grants, .. } = grants {
            for g in grants {
                knockgate::admin::client::call(
                    &socket,
                    &knockgate::admin::Request::Revoke { id: g.id },
                )
                .unwrap();
            }
        }
    }
    samples.sort();
    println!(
        "\n## Knock → open in the lab: {service} (tcp/{port}, IPv4, {runs} runs, connect polled every 1 ms)\n"
    );
    println!("| median | p90 | p99 | max |\n|---:|---:|---:|---:|");
    println!(
        "| {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms |",
        ms(percentile(&samples, 50)),
        ms(percentile(&samples, 90)),
        ms(percentile(&samples, 99)),
        ms(*samples.last().unwrap())
    );
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The table with 1, 10 and 50 port services (ssh and N-1 more): rules, sets, the
/// nft text, and the time of a whole-table replace in the lab.
fn ruleset_sizes() {
    use knockgate::config::{PortValue, Protocol, ServiceSpec};
    println!("\n## Ruleset size by number of services (ssh included)\n");
    println!("| services | sets | input rules | all rules | nft text | replace (median of 20) |");
    println!("|---:|---:|---:|---:|---:|---:|");
    let lab = nix::unistd::geteuid().is_root().then(Lab::new);
    for n in [1usize, 10, 50] {
        let config = Config {
            services: (1..n)
                .map(|i| ServiceSpec {
                    name: format!("svc{i}"),
                    protocol: if i % 2 == 0 {
                        Protocol::Udp
                    } else {
                        Protocol::Tcp
                    },
                    port: PortValue::Number(i64::try_from(20_000 + i).unwrap()),
                })
                .collect(),
            ..Config::default()
        };
        let ruleset = knockgate::ruleset::baseline(&config, &["10.77.2.53".parse().unwrap()]);
        let rules: usize = ruleset.chains.iter().map(|c| c.rules.len()).sum();
        let input = ruleset.chains[0].rules.len();
        let text = ruleset.to_string();
        let replace = lab.as_ref().map_or_else(
            || "(needs root)".to_owned(),
            |lab| {
                let mut times: Vec<Duration> = lab.in_ns(Host::Server, || {
                    let mut fw = knockgate::firewall::nft::NftFirewall::open().unwrap();
                    (0..20)
                        .map(|_| {
                            let started = Instant::now();
                            fw.replace(&ruleset).unwrap();
                            started.elapsed()
                        })
                        .collect()
                });
                times.sort();
                format!("{:.2} ms", ms(times[times.len() / 2]))
            },
        );
        println!(
            "| {n} | {} | {input} | {rules} | {} lines, {} bytes | {replace} |",
            ruleset.sets.len(),
            text.lines().count(),
            text.len()
        );
    }
}

/// One operation on a book of `n` grants, `ops` times; returns µs per operation.
fn per_op(ops: u32, mut op: impl FnMut(u32)) -> f64 {
    let t = Instant::now();
    for i in 0..ops {
        op(i);
    }
    t.elapsed().as_secs_f64() * 1e6 / f64::from(ops)
}

/// A distinct address per grant number (IPv6, one /64).
fn grant_address(n: u32) -> IpAddr {
    IpAddr::V6(std::net::Ipv6Addr::from(
        (0x2001_0db8_u128 << 96) | u128::from(n),
    ))
}

/// A figure of this process's memory from `/proc/self/status`, in MB (0 if absent).
fn memory_mb(field: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u32>().ok())
        .map_or(0.0, |kb| f64::from(kb) / 1024.0)
}

/// Starts `VmHWM` (peak RSS) again from the present RSS.
fn reset_peak_memory() {
    // "5" resets the peak RSS (Linux 4.0 on); without it the peak is the process's.
    std::fs::write("/proc/self/clear_refs", "5").ok();
}

/// `bytes` in MB.
fn megabytes(bytes: usize) -> f64 {
    f64::from(u32::try_from(bytes).unwrap_or(u32::MAX)) / 1e6
}

fn book_operations() {
    use knockgate::clock::UnixMs;
    println!("\n## The grant book with many grants (in process, µs per operation)\n");
    println!(
        "| grants | fill | new grant | extend | revoke | expire one | next expiry | save: serialise + digest | load: read + digest + parse | file | book in memory | load's peak |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for n in [10_000u32, 100_000, 1_000_000] {
        let before = memory_mb("VmRSS:");
        let mut book = GrantBook::default();
        let mut next = 0u32;
        let mut id = || {
            next += 1;
            next
        };
        let start = UnixMs(1_800_000_000_000);
        // Ends spread over an hour, one per grant: n + 1 ms apart would be too close
        // for a million, so they wrap; what matters is that they differ.
        let ttl = |i: u32| Duration::from_millis(60_000 + u64::from(i % 3_600_000));
        let fill = per_op(n, |i| {
            book.grant("ssh", grant_address(i), "key alice", start, ttl(i), &mut id);
        });
        let held = memory_mb("VmRSS:") - before;
        let ops = 1_000;
        let fresh = per_op(ops, |i| {
            book.grant(
                "ssh",
                grant_address(n + i),
                "key bob",
                start,
                ttl(i),
                &mut id,
            );
        });
        let extend = per_op(ops, |i| {
            book.grant(
                "ssh",
                grant_address(i * 7),
                "key alice",
                start,
                ttl(i + 1),
                &mut id,
            );
        });
        let victims: Vec<String> = book
            .iter()
            .step_by((n / ops) as usize)
            .take(ops as usize)
            .map(|r| r.id)
            .collect();
        let revoke = per_op(ops, |i| {
            black_box(book.revoke(&victims[i as usize]));
        });
        let mut now = start;
        let expire = per_op(ops, |_| {
            now = book.next_expiry().unwrap_or(now);
            black_box(book.expire(now));
        });
        let next_expiry = per_op(ops, |_| {
            black_box(book.next_expiry());
        });
        // What a save does on the daemon's loop (the file is written on a thread), and
        // what a start does with the file.
        let t = Instant::now();
        let bytes = book.to_json();
        let digest = <sha2::Sha256 as sha2::Digest>::digest(&bytes);
        let save = t.elapsed().as_secs_f64() * 1e3;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grants.json");
        std::fs::write(&path, &bytes).unwrap();
        let (len, file_mb) = (book.len(), megabytes(bytes.len()));
        drop((book, bytes));
        // What a start does with the file: read it once, digest it, parse it.
        let base = memory_mb("VmRSS:");
        reset_peak_memory();
        let t = Instant::now();
        let text = std::fs::read(&path).unwrap();
        black_box(<sha2::Sha256 as sha2::Digest>::digest(&text));
        let loaded = GrantBook::from_file(text, &path).unwrap();
        let load = t.elapsed().as_secs_f64() * 1e3;
        let peak = memory_mb("VmHWM:") - base;
        assert_eq!(loaded.len(), len);
        black_box(digest);
        println!(
            "| {n} | {fill:.2} | {fresh:.2} | {extend:.2} | {revoke:.2} | {expire:.2} | {next_expiry:.3} | {save:.0} ms | {load:.0} ms | {file_mb:.1} MB | {held:.0} MB | {peak:.0} MB |"
        );
    }
}

fn main() {
    // The unit's environment (`systemd/knockgated.service`): the daemon as installed.
    let tunables = std::path::Path::new("glibc.malloc.trim_threshold=131072");
    let unit_env = [("GLIBC_TUNABLES", tunables)];
    // `cargo bench --bench knock -- million`: only that (it takes a minute or two).
    if std::env::args().any(|a| a == "million") {
        million::million_grants(&unit_env);
        return;
    }
    book_operations();
    million::million_grants(&unit_env);
    rejection_rates();
    knock_to_open("ssh", 22);
    knock_to_open("staging", 8443);
    ruleset_sizes();
}
