//! How long `egress-window` takes before COMMAND starts (it asks knockgated for the
//! window, makes a cgroup, moves into it, then spawns COMMAND), against starting
//! COMMAND directly. Shared by `cargo bench --bench egress` and `--bench compare`.

use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::support::{Host, Lab};

/// Spawn → COMMAND running, per way of starting it.
pub struct EgressTimes {
    pub direct: Vec<Duration>,
    pub command_scope: Vec<Duration>,
    pub host_wide: Vec<Duration>,
}

fn nanos_now() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

/// Spawns `prefix… date +%s%N` and returns the time from spawn to the command's own
/// clock reading.
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

/// `runs` starts each way, with knockgated already running in `lab`.
pub fn measure(lab: &Lab, runs: usize) -> EgressTimes {
    let socket = lab.dir().join("admin.sock");
    let netns = format!("--net=/run/netns/{}", lab.ns(Host::Server));
    let window = env!("CARGO_BIN_EXE_egress-window");
    let sock = socket.to_str().unwrap();
    let times = |prefix: &[&str]| -> Vec<Duration> {
        (0..runs).map(|_| until_command_starts(prefix)).collect()
    };
    EgressTimes {
        direct: times(&["nsenter", &netns, "--"]),
        command_scope: times(&["nsenter", &netns, window, "--socket", sock, "1m", "--"]),
        host_wide: times(&[
            "nsenter",
            &netns,
            window,
            "--socket",
            sock,
            "--host-wide",
            "1m",
            "--",
        ]),
    }
}
