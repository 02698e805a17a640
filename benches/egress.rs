//! How long `egress-window` takes before COMMAND starts (it asks knockgated for the
//! window, makes a cgroup, moves into it, then spawns COMMAND). Not a test: prints
//! figures, asserts nothing about time.
//!
//!     cargo bench --bench egress        # as root (the lab)

#[path = "../tests/support/mod.rs"]
mod support;

use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use support::{Host, Lab};

fn nanos_now() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

/// Spawns `program args… -- date +%s%N` and returns the time from spawn to the
/// command's own clock reading.
fn until_command_starts(prefix: &[&str]) -> Duration {
    let started = nanos_now();
    let out = Command::new(prefix[0])
        .args(&prefix[1..])
        .args(["date", "+%s%N"])
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let at: u128 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("nanoseconds");
    Duration::from_nanos(u64::try_from(at.saturating_sub(started)).unwrap_or(0))
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        println!("(egress-window bench skipped: the lab needs root)");
        return;
    }
    let lab = Lab::new();
    let _daemon =
        lab.start_daemon(&lab.write_file("k.toml", "[dns]\nresolvers = [\"10.77.2.53\"]\n"));
    let socket = lab.dir().join("admin.sock");
    let netns = format!("--net=/run/netns/{}", lab.ns(Host::Server));
    let window = env!("CARGO_BIN_EXE_egress-window");
    let sock = socket.to_str().unwrap();
    let runs = 50;
    let direct: Vec<Duration> = (0..runs)
        .map(|_| until_command_starts(&["nsenter", &netns, "--"]))
        .collect();
    let cgroup: Vec<Duration> = (0..runs)
        .map(|_| until_command_starts(&["nsenter", &netns, window, "--socket", sock, "1m", "--"]))
        .collect();
    let host: Vec<Duration> = (0..runs)
        .map(|_| {
            until_command_starts(&[
                "nsenter",
                &netns,
                window,
                "--socket",
                sock,
                "--host-wide",
                "1m",
                "--",
            ])
        })
        .collect();
    let (d, c, h) = (median(direct), median(cgroup), median(host));
    println!("## egress-window: time before COMMAND starts ({runs} runs each, medians)\n");
    println!("| how COMMAND is started | spawn → COMMAND running | added by egress-window |");
    println!("|---|---:|---:|");
    println!("| directly (nsenter) | {:.2} ms | — |", ms(d));
    println!(
        "| egress-window, command scope (cgroup) | {:.2} ms | {:.2} ms |",
        ms(c),
        ms(c.saturating_sub(d))
    );
    println!(
        "| egress-window --host-wide | {:.2} ms | {:.2} ms |",
        ms(h),
        ms(h.saturating_sub(d))
    );
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
