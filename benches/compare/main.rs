//! knockgate, fwknopd and knockd side by side, in the same lab, in one run. Not a
//! test: it measures and reports, and asserts nothing about time.
//!
//!     make peers                                   # unpack fwknop-server/-client and knockd
//!     cargo bench --bench compare                  # full run, as root (the lab)
//!     cargo bench --bench compare -- --quick       # smoke run (CI): few repetitions
//!     cargo bench --bench compare -- --only latency,sequence   # some scenarios
//!
//! Options: `--out DIR` (default `target/bench`), `--require-peers` (fail instead of
//! skipping a peer that is not unpacked). Writes `compare.md` and `compare.json`.

// Counts become rates for people to read; none comes near 2^52.
#![allow(clippy::cast_precision_loss)]

#[path = "../../tests/support/mod.rs"]
mod support;

mod client;
mod egress;
mod measure;
mod report;
mod scale;
mod sequence;
mod subjects;

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use report::{EgressRow, FloodRow, FootprintRow, LatenessRow, OpenRow, Report, SpoofedRow, Spread};
use subjects::{Kind, KnockDatagrams, Setup, Subject};
use support::{Lab, v4};

/// How much of everything.
struct Plan {
    runs: usize,
    lateness: usize,
    ttl: u64,
    flood: Duration,
    valid_in_flood: usize,
    sizes: Vec<usize>,
    spa_grants: usize,
    connect_window: Duration,
    idle: Duration,
    egress_runs: usize,
}

impl Plan {
    fn full() -> Self {
        Self {
            runs: 200,
            lateness: 5,
            ttl: 2,
            flood: Duration::from_secs(5),
            valid_in_flood: 20,
            sizes: vec![1_000, 10_000, 100_000],
            spa_grants: 100,
            connect_window: Duration::from_secs(5),
            idle: Duration::from_secs(30),
            egress_runs: 50,
        }
    }

    fn quick() -> Self {
        Self {
            runs: 10,
            lateness: 1,
            ttl: 1,
            flood: Duration::from_millis(600),
            valid_in_flood: 2,
            sizes: vec![1_000],
            spa_grants: 5,
            connect_window: Duration::from_millis(300),
            idle: Duration::from_secs(2),
            egress_runs: 3,
        }
    }
}

/// A small deterministic generator for junk (it need not be unpredictable).
struct Junk(u64);

impl Junk {
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n)
            .map(|_| {
                self.0 ^= self.0 << 13;
                self.0 ^= self.0 >> 7;
                self.0 ^= self.0 << 17;
                self.0.to_le_bytes()[0]
            })
            .collect()
    }
}

/// Plausibly shaped junk for `kind`'s knock port(s); knockgate's second kind (`alt`)
/// is junk its nft filter drops before the socket.
fn junk_for(
    kind: Kind,
    subject: &Subject,
    client: IpAddr,
    alt: bool,
) -> (&'static str, Vec<KnockDatagrams>) {
    let mut rng = Junk(0x9e37_79b9_7f4a_7c15);
    match kind {
        Kind::Knockgate if alt => (
            "malformed: random 114 bytes (the kernel's shape filter drops them)",
            (0..256)
                .map(|_| vec![(subjects::SPA_PORT, rng.bytes(114))])
                .collect(),
        ),
        Kind::Knockgate => (
            "well-shaped 114-byte knocks sealed with a wrong key (one HMAC each)",
            (0..256)
                .map(|_| vec![(subjects::SPA_PORT, subjects::knockgate_bad_mac())])
                .collect(),
        ),
        Kind::Fwknopd => {
            let len = subject.knocks(1, client, 2)[0][0].1.len();
            let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
            (
                "random base64 of an SPA packet's length",
                (0..256)
                    .map(|_| {
                        let d = rng
                            .bytes(len)
                            .iter()
                            .map(|b| alphabet[usize::from(b % 64)])
                            .collect();
                        vec![(subjects::SPA_PORT, d)]
                    })
                    .collect(),
            )
        }
        Kind::Knockd => (
            "datagrams to its sequence ports, in random order",
            (0..256)
                .map(|_| {
                    let port = subjects::KNOCKD_PORTS[usize::from(rng.bytes(1)[0] % 3)];
                    vec![(port, b"j".to_vec())]
                })
                .collect(),
        ),
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn machine() -> String {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name\t: ").map(str::to_owned))
        .unwrap_or_default();
    format!("Linux {}, {cpus} vCPU ({model})", kernel.trim())
}

fn today() -> String {
    let out = std::process::Command::new("date")
        .arg("+%Y-%m-%d %H:%M UTC")
        .env("TZ", "UTC")
        .output();
    out.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// Knock → open and revoke lateness, one lab.
fn latency(kind: Kind, plan: &Plan, r: &mut Report) {
    let lab = Lab::new();
    let p = v4();
    let subject = Subject::start(kind, &lab, &Setup { ttl_secs: plan.ttl });
    let _ssh = lab.tcp_echo(support::Host::Server, "0.0.0.0:22".parse().unwrap());
    let addrs = (p.client, p.server_from_client);
    let knocks = subject.knocks(plan.runs, p.client, plan.ttl);
    let took = measure::knock_to_open(&lab, &subject, &knocks, addrs, measure::POLL);
    let opened: Vec<Duration> = took.iter().flatten().copied().collect();
    println!(
        "{}: knock → open {}/{} opened",
        kind.name(),
        opened.len(),
        took.len()
    );
    // The same with a 0.1 ms poll: below the 1 ms poll's resolution.
    let knocks = subject.knocks(plan.runs, p.client, plan.ttl);
    let fine = Duration::from_micros(100);
    let fine: Vec<Duration> = measure::knock_to_open(&lab, &subject, &knocks, addrs, fine)
        .into_iter()
        .flatten()
        .collect();
    r.knock_to_open.push(OpenRow {
        daemon: kind.name(),
        runs: took.len(),
        opened: opened.len(),
        spread: Spread::of_durations(&opened),
        fine: Spread::of_durations(&fine),
    });
    if kind == Kind::Knockgate && subjects::available(Kind::Fwknopd) {
        // The same daemon, knocked by fwknop's own client (its [[fwknop_keys]] stanza).
        let knocks = subject.fwknop_knocks(plan.runs, p.client);
        let took = measure::knock_to_open(&lab, &subject, &knocks, addrs, measure::POLL);
        let opened: Vec<Duration> = took.iter().flatten().copied().collect();
        let knocks = subject.fwknop_knocks(plan.runs, p.client);
        let fine: Vec<Duration> =
            measure::knock_to_open(&lab, &subject, &knocks, addrs, Duration::from_micros(100))
                .into_iter()
                .flatten()
                .collect();
        r.knock_to_open.push(OpenRow {
            daemon: "knockgate (fwknop packets)",
            runs: took.len(),
            opened: opened.len(),
            spread: Spread::of_durations(&opened),
            fine: Spread::of_durations(&fine),
        });
    }
    // Timers the runs above left behind (knockd's stop commands) run out first: a
    // stale one would close the next grant early and be counted against it.
    std::thread::sleep(Duration::from_secs(plan.ttl + 1));
    let knocks = subject.knocks(plan.lateness, p.client, plan.ttl);
    let ttl = Duration::from_secs(plan.ttl);
    let late =
        measure::revoke_lateness(&lab, &subject, &knocks, ttl, p.client, p.server_from_client);
    r.revoke_lateness.push(LatenessRow {
        daemon: kind.name(),
        ttl_secs: plan.ttl,
        late_ms: late,
    });
}

fn flood(kind: Kind, plan: &Plan, r: &mut Report) {
    flood_of(kind, plan, r, false);
    if kind == Kind::Knockgate {
        flood_of(kind, plan, r, true);
    }
}

fn flood_of(kind: Kind, plan: &Plan, r: &mut Report, alt: bool) {
    let lab = Lab::new();
    let p = v4();
    let subject = Subject::start(kind, &lab, &Setup { ttl_secs: 60 });
    let _ssh = lab.tcp_echo(support::Host::Server, "0.0.0.0:22".parse().unwrap());
    let (what, junk) = junk_for(kind, &subject, p.client, alt);
    let valid = subject.knocks(plan.valid_in_flood, p.client, 60);
    let addrs = (p.client, p.client_alt, p.server_from_client);
    let result = measure::flood(&lab, &subject, &junk, &valid, plan.flood, addrs);
    println!(
        "{}: flood {:.0}/s sent, {} valid opened",
        kind.name(),
        result.sent as f64 / result.seconds,
        result.valid_opened_ms.len()
    );
    let valid = Spread::of(result.valid_opened_ms.clone());
    r.flood.push(FloodRow {
        daemon: kind.name(),
        junk: what,
        result,
        valid,
    });
}

/// knockgate under junk from 20,000 forged IPv4 sources and 100,000 of one IPv6 /64
/// (issue 11): the meters and the ban counter meet many sources, the daemon must
/// stay small and keep opening for the laptop.
fn spoofed_flood(plan: &Plan, r: &mut Report) {
    let lab = Lab::new();
    let (p4, p6) = (v4(), support::v6());
    let subject = Subject::start(Kind::Knockgate, &lab, &Setup { ttl_secs: 60 });
    let _ssh = lab.tcp_echo(support::Host::Server, "0.0.0.0:22".parse().unwrap());
    let valid = subject.knocks(plan.valid_in_flood, p4.client, 60);
    let addrs = (p4.client, p4.server_from_client, p6.server_from_client);
    let result =
        measure::spoofed_flood(&lab, &subject, &valid, plan.flood, addrs, (20_000, 100_000));
    println!(
        "knockgate: spoofed flood {:.0}/s sent, {} valid opened, RSS {} → {} KiB",
        result.flood.sent as f64 / result.flood.seconds,
        result.flood.valid_opened_ms.len(),
        result.rss_before_kib,
        result.rss_after_kib
    );
    let valid = Spread::of(result.flood.valid_opened_ms.clone());
    r.spoofed.push(SpoofedRow {
        daemon: Kind::Knockgate.name(),
        result,
        valid,
    });
}

fn grant_scale(kind: Kind, plan: &Plan, r: &mut Report) {
    let lab = Lab::new();
    let p = v4();
    let subject = Subject::start(kind, &lab, &Setup { ttl_secs: 3600 });
    let rows = match kind {
        Kind::Knockgate => scale::knockgate(
            &lab,
            &plan.sizes,
            p.client,
            p.server_from_client,
            plan.connect_window,
        ),
        Kind::Fwknopd => scale::fwknopd(
            &lab,
            &subject,
            &plan.sizes,
            plan.spa_grants,
            (p.client, p.server_from_client),
            plan.connect_window,
        ),
        Kind::Knockd => Vec::new(),
    };
    for row in &rows {
        println!(
            "{}: {} grants, {:.0} connects/s ({:.0}%)",
            row.daemon,
            row.grants,
            row.connect_rate,
            row.connect_ratio * 100.0
        );
    }
    r.scale.extend(rows);
}

/// All daemons idle at once, each in its own lab.
fn footprint(kinds: &[Kind], plan: &Plan, r: &mut Report) {
    let labs: Vec<Lab> = kinds.iter().map(|_| Lab::new()).collect();
    let subjects: Vec<Subject> = kinds
        .iter()
        .zip(&labs)
        .map(|(&k, lab)| Subject::start(k, lab, &Setup { ttl_secs: 30 }))
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    let before: Vec<_> = subjects
        .iter()
        .map(|s| measure::context_switches(s.pid()))
        .collect();
    std::thread::sleep(plan.idle);
    for (s, b) in subjects.iter().zip(before) {
        let woke = measure::wakeups_between(&b, &measure::context_switches(s.pid()));
        let (rss_kib, rss_anon_kib) = measure::rss_kib(s.pid());
        r.footprint.push(FootprintRow {
            daemon: s.kind.name(),
            rss_kib,
            rss_anon_kib,
            pss_kib: measure::pss_kib(s.pid()),
            wakeups_per_sec: woke as f64 / plan.idle.as_secs_f64(),
            seconds: plan.idle.as_secs_f64(),
        });
    }
}

fn egress_overhead(plan: &Plan, r: &mut Report) {
    let lab = Lab::new();
    let _daemon = Subject::start(Kind::Knockgate, &lab, &Setup { ttl_secs: 60 });
    let t = egress::measure(&lab, plan.egress_runs);
    let d = median(t.direct);
    r.egress = Some(EgressRow {
        runs: plan.egress_runs,
        direct_ms: ms(d),
        command_scope_added_ms: ms(median(t.command_scope).saturating_sub(d)),
        host_wide_added_ms: ms(median(t.host_wide).saturating_sub(d)),
    });
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let require = args.iter().any(|a| a == "--require-peers");
    let out = args
        .iter()
        .position(|a| a == "--out")
        .and_then(|i| args.get(i + 1))
        .map_or_else(
            || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench"),
            PathBuf::from,
        );
    if !nix::unistd::geteuid().is_root() {
        println!("(compare bench skipped: the lab needs root)");
        return;
    }
    // `--only NAME[,NAME…]`: some scenarios (latency, flood, scale, spoofed, sequence,
    // footprint, client, egress).
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .cloned();
    let runs = |name: &str| {
        only.as_deref()
            .is_none_or(|o| o.split(',').any(|n| n == name))
    };
    let plan = if quick { Plan::quick() } else { Plan::full() };
    let mut report = Report {
        date: today(),
        machine: machine(),
        quick,
        ..Report::default()
    };
    let kinds: Vec<Kind> = Kind::ALL
        .into_iter()
        .filter(|&k| subjects::available(k))
        .collect();
    for k in Kind::ALL.into_iter().filter(|k| !kinds.contains(k)) {
        assert!(
            !require,
            "{} is not unpacked under {}: run `make peers`",
            k.name(),
            subjects::peers_root().display()
        );
        report.missing_peers.push(k.name());
    }
    // First, on a quiet machine: later scenarios leave namespaces (one with 100,000
    // iptables rules) that the kernel tears down in the background for a while.
    if runs("client") {
        let runs = if quick { 50 } else { 1_000 };
        report.clients = client::startup(runs).unwrap_or_default();
    }
    for &k in &kinds {
        if runs("latency") {
            latency(k, &plan, &mut report);
        }
        if runs("flood") {
            flood(k, &plan, &mut report);
        }
        if runs("scale") {
            grant_scale(k, &plan, &mut report);
        }
    }
    if kinds.contains(&Kind::Knockgate) && runs("spoofed") {
        spoofed_flood(&plan, &mut report);
    }
    if kinds.contains(&Kind::Knockgate) && runs("sequence") {
        let row = sequence::last_touch_to_open(plan.runs, measure::POLL);
        println!(
            "knockgate port sequence: {}/{} opened",
            row.opened, row.runs
        );
        report.knock_to_open.push(row);
        let sizes: &[usize] = if quick { &[1, 100] } else { &[1, 100, 1_000] };
        for &n in sizes {
            report
                .sequence_rotation
                .push(sequence::rotation(n, if quick { 2 } else { 5 }));
        }
    }
    if runs("footprint") {
        footprint(&kinds, &plan, &mut report);
    }
    if runs("egress") {
        egress_overhead(&plan, &mut report);
    }
    std::fs::create_dir_all(&out).unwrap();
    let md = report.markdown();
    std::fs::write(out.join("compare.md"), &md).unwrap();
    std::fs::write(
        out.join("compare.json"),
        serde_json::to_string_pretty(&report).unwrap(),
    )
    .unwrap();
    println!(
        "\n{md}\nwrote {} and compare.json",
        out.join("compare.md").display()
    );
}
