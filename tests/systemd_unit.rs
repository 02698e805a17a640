//! The shipped unit: `systemd-analyze verify` is clean, and the offline security
//! score does not get worse than it is (lower is better). Needs systemd-analyze,
//! which CI installs; no systemd as PID 1 is needed.

use std::path::Path;
use std::process::Command;

/// The score the unit has now; a change that makes it worse fails here.
const MAX_EXPOSURE: f64 = 1.6;

/// The unit with its ExecStart paths pointing at the built daemon, so verify can
/// check them.
fn unit_for_test(dir: &Path) -> std::path::PathBuf {
    let unit = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/knockgated.service"),
    )
    .unwrap();
    let path = dir.join("knockgated.service");
    std::fs::write(
        &path,
        unit.replace("/usr/bin/knockgated", env!("CARGO_BIN_EXE_knockgated")),
    )
    .unwrap();
    path
}

fn analyze_available() -> bool {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok()
    {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "CI must install systemd (systemd-analyze)"
    );
    eprintln!("\n*** SKIPPED: systemd-analyze is not installed ***\n");
    false
}

#[test]
fn the_unit_verifies_cleanly() {
    if !analyze_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(unit_for_test(dir.path()))
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify: {said}"
    );
}

#[test]
fn the_unit_is_sandboxed_and_may_still_do_its_job() {
    if !analyze_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true"])
        .arg(unit_for_test(dir.path()))
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    let score: f64 = report
        .lines()
        .find_map(|l| l.split("exposure level for knockgated.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no score in: {report}"));
    eprintln!("systemd-analyze security --offline=true: {score}");
    assert!(
        score <= MAX_EXPOSURE,
        "exposure {score} > {MAX_EXPOSURE}:\n{report}"
    );
    // What the daemon needs must stay allowed: the knock socket (INET6), netlink.
    let unit = std::fs::read_to_string(unit_for_test(dir.path())).unwrap();
    assert!(
        unit.contains("RestrictAddressFamilies=AF_UNIX AF_NETLINK AF_INET AF_INET6"),
        "{unit}"
    );
    assert!(
        unit.contains("CapabilityBoundingSet=CAP_NET_ADMIN"),
        "{unit}"
    );
}
