//! A million grants in the lab (root): `knock.max_grants = 1000000`, the grant sets
//! filled by another process (`nft -f`, 500,000 addresses of each family) while
//! knockgated is stopped; the start reads them back and books them. Then restart and
//! reload leaving the grant sets in place — with only the daemon committing, and
//! after another process's commits to its own table, which the tamper watch heard —
//! and a start after another process committed while knockgated was stopped (read
//! back), timed, with the daemon's peak RSS. Every step checks that the million is
//! still booked.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use knockgate::admin::client::call;
use knockgate::admin::{Request, Response};

use crate::support::{Daemon, Lab};

const PER_FAMILY: u32 = 500_000;
/// How long a start may take here: reading a million elements back takes the kernel
/// a minute or more (each dump message walks the set from its first element).
const START_LIMIT: Duration = Duration::from_secs(900);

/// The `n`-th address of each family (never routed: set elements only).
fn addresses(n: u32) -> (Ipv4Addr, Ipv6Addr) {
    (
        Ipv4Addr::from(0x6440_0000 + n),
        Ipv6Addr::from((0x2001_0db8_0001_u128 << 80) | u128::from(n)),
    )
}

/// `nft -f` text adding the million, 10,000 to a command.
fn fill_text() -> String {
    let mut text = String::new();
    for (set, v4) in [("ssh_grants_v4", true), ("ssh_grants_v6", false)] {
        for chunk in (0..PER_FAMILY).collect::<Vec<_>>().chunks(10_000) {
            let _ = write!(text, "add element inet knockgate {set} {{ ");
            for &n in chunk {
                let (a, b) = addresses(n);
                let addr: IpAddr = if v4 { a.into() } else { b.into() };
                let _ = write!(text, "{addr} timeout 20h, ");
            }
            text.push_str("}\n");
        }
    }
    text
}

fn ask(socket: &Path, request: &Request) -> Response {
    call(socket, request).unwrap_or_else(|e| panic!("{request:?}: {e:#}"))
}

/// That the daemon books all of them.
fn assert_all_booked(socket: &Path, after: &str) {
    match ask(socket, &Request::Status) {
        Response::Status { grants, .. } => {
            assert_eq!(grants, 2 * PER_FAMILY as usize, "after {after}");
        }
        other => panic!("status after {after}: {other:?}"),
    }
}

/// The daemon's peak RSS so far, in MB.
fn peak_mb(daemon: &Daemon) -> f64 {
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", daemon.pid())).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u32>().ok())
        .map_or(0.0, |kb| f64::from(kb) / 1024.0)
}

/// Another process commits to a table of its own (as fail2ban or docker do).
fn someone_else_commits(lab: &Lab) {
    lab.nft(&["add", "table", "inet", "someone-else"]);
    lab.nft(&["delete", "table", "inet", "someone-else"]);
}

struct Row {
    what: &'static str,
    seconds: f64,
    kept: Option<usize>,
    /// The daemon's peak RSS in this step.
    peak: Option<f64>,
}

fn timed<T>(rows: &mut Vec<Row>, what: &'static str, f: impl FnOnce() -> T) -> T {
    let started = Instant::now();
    let out = f();
    rows.push(Row {
        what,
        seconds: started.elapsed().as_secs_f64(),
        kept: None,
        peak: None,
    });
    out
}

/// Starts the daemon's peak RSS again from its present RSS.
fn reset_peak(daemon: &Daemon) {
    std::fs::write(format!("/proc/{}/clear_refs", daemon.pid()), "5").ok();
}

/// Notes the daemon's kept sets and peak RSS on the last row.
fn note(rows: &mut [Row], daemon: &Daemon) {
    if let Some(r) = rows.last_mut() {
        r.kept = daemon.kept_grant_sets();
        r.peak = Some(peak_mb(daemon));
    }
}

/// The bench (see the module's doc).
pub fn million_grants(unit_env: &[(&str, &Path)]) {
    if !nix::unistd::geteuid().is_root() {
        println!("\n(a million grants in the lab skipped: the lab needs root)");
        return;
    }
    let lab = Lab::new();
    let socket = lab.dir().join("admin.sock");
    let config: PathBuf = lab.write_file(
        "million.toml",
        "[knock]\nserver_id = \"bench\"\nmax_grants = 1000000\nmax_ttl = \"24h\"\n\
         [dns]\nresolvers = [\"10.77.2.53\"]\n",
    );
    let start = |rows: &mut Vec<Row>, what| {
        let daemon = timed(rows, what, || {
            lab.start_daemon_within(&config, unit_env, &[], START_LIMIT)
        });
        note(rows, &daemon);
        daemon
    };
    // A restart as an operator sees it: the stop (the book unchanged: only its stamp
    // is written) and the start, together.
    let restart = |rows: &mut Vec<Row>, daemon: Daemon, what| {
        let daemon = timed(rows, what, || {
            assert_eq!(daemon.terminate(), 0);
            lab.start_daemon_within(&config, unit_env, &[], START_LIMIT)
        });
        note(rows, &daemon);
        daemon
    };
    let mut rows = Vec::new();
    let daemon = lab.start_daemon_with_env(&config, unit_env);
    assert_eq!(daemon.terminate(), 0);
    let fill = lab.write_file("fill.nft", &fill_text());
    timed(
        &mut rows,
        "nft -f: 1,000,000 elements added by another process (while stopped)",
        || {
            lab.nft(&["-f", &fill.display().to_string()]);
        },
    );
    let mut daemon = start(&mut rows, "start: all read back and booked `recovered`");
    assert_all_booked(&socket, "the first start");
    timed(
        &mut rows,
        "stop (SIGTERM): the book written, 1,000,000 rows",
        || {
            assert_eq!(daemon.terminate(), 0);
        },
    );
    daemon = start(&mut rows, "start: grant sets left in place");
    assert_all_booked(&socket, "a restart");
    let reload = |rows: &mut Vec<Row>, daemon: &Daemon, what| {
        reset_peak(daemon);
        timed(rows, what, || {
            assert!(matches!(
                ask(&socket, &Request::Reload),
                Response::Reloaded { .. }
            ));
        });
        note(rows, daemon);
    };
    reload(&mut rows, &daemon, "reload: grant sets left in place");
    assert_all_booked(&socket, "a reload");
    reset_peak(&daemon);
    let listed = timed(
        &mut rows,
        "`knockgate grants`: all, in pages of 50,000",
        || match knockgate::admin::client::all_grants(&socket) {
            Ok(Response::Grants { grants, .. }) => grants.len(),
            other => panic!("grants: {other:?}"),
        },
    );
    note(&mut rows, &daemon);
    assert_eq!(listed, 2 * PER_FAMILY as usize, "listed");
    daemon = restart(
        &mut rows,
        daemon,
        "SIGTERM + start: grant sets left in place",
    );
    assert_all_booked(&socket, "a second restart");
    someone_else_commits(&lab);
    reload(
        &mut rows,
        &daemon,
        "reload after another process's commits to its own table (heard)",
    );
    assert_all_booked(&socket, "a reload after commits elsewhere");
    someone_else_commits(&lab);
    daemon = restart(
        &mut rows,
        daemon,
        "SIGTERM + start after another process's commits to its own table (heard)",
    );
    assert_all_booked(&socket, "a restart after commits elsewhere");
    assert_eq!(daemon.terminate(), 0);
    someone_else_commits(&lab);
    daemon = start(
        &mut rows,
        "start after another process's commit while stopped (read back)",
    );
    assert_all_booked(&socket, "a start after a commit while stopped");
    assert_eq!(daemon.terminate(), 0);

    print_rows(&rows);
}

/// The steps as a Markdown table.
fn print_rows(rows: &[Row]) {
    println!("\n## A million grants in the lab (release, `knock.max_grants = 1000000`)\n");
    println!("| step | seconds | grant sets kept | the daemon's peak RSS |");
    println!("|---|---:|---:|---:|");
    for row in rows {
        let kept = row
            .kept
            .map_or_else(|| "–".to_owned(), |k| format!("{k} of 2"));
        let peak = row
            .peak
            .map_or_else(|| "–".to_owned(), |p| format!("{p:.0} MB"));
        println!("| {} | {:.2} | {kept} | {peak} |", row.what, row.seconds);
    }
}
