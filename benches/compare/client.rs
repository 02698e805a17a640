//! The knock clients run alone, side by side with a process that does nothing
//! (`/bin/true`), in one hyperfine run inside the lab's client namespace: what a user
//! pays to knock, over what starting any program costs. Each sends a real knock to
//! the server's address (no daemon need answer).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::subjects::{self, FWKNOP_HMAC, FWKNOP_KEY, KEY_HEX, KNOCKD_PORTS, SPA_PORT};
use crate::support::{Host, Lab, v4};

/// One client's start-to-exit time.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ClientRow {
    /// Which client, as run.
    pub client: String,
    /// Median wall time of one run, in ms (robust to the odd run a shared VM delays).
    pub median_ms: f64,
    /// Mean wall time of one run, in ms.
    pub mean_ms: f64,
    /// Its standard deviation, in ms.
    pub stddev_ms: f64,
    /// The median less `/bin/true`'s in the same run, in ms.
    pub over_true_ms: f64,
}

/// knockgate's client as the package ships it (statically linked, `make
/// client-static`), else the release build.
fn knock_binary() -> (PathBuf, &'static str) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let shipped = root.join("target/static/knock");
    if shipped.exists() {
        (shipped, "knock (knockgate, static as packaged)")
    } else {
        (
            root.join("target/release/knock"),
            "knock (knockgate, dynamically linked)",
        )
    }
}

/// Runs hyperfine over `/bin/true` and each available client; `None` without
/// hyperfine (it says so).
pub fn startup(runs: usize) -> Option<Vec<ClientRow>> {
    if Command::new("hyperfine").arg("--version").output().is_err() {
        println!("(client start-up skipped: hyperfine is not installed; `make peers` installs it)");
        return None;
    }
    let lab = Lab::new();
    let p = v4();
    let server = p.server_from_client;
    let key = lab.write_file("alice.key", KEY_HEX);
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let (knock, knock_name) = knock_binary();
    let mut commands: Vec<(String, String)> = vec![
        ("/bin/true".to_owned(), "/bin/true".to_owned()),
        (
            knock_name.to_owned(),
            format!(
                "{} --server {server}:{SPA_PORT} --key-id alice --key-file {} --server-id bench",
                knock.display(),
                key.display()
            ),
        ),
    ];
    let peers = subjects::peers_root();
    if subjects::available(subjects::Kind::Fwknopd) {
        commands.push((
            "fwknop 2.6.10 (fwknopd's client)".to_owned(),
            format!(
                "{} --no-rc-file -A tcp/22 -a {} -D {server} --use-hmac --key-base64-rijndael {FWKNOP_KEY} --key-base64-hmac {FWKNOP_HMAC}",
                peers.join("usr/bin/fwknop").display(),
                p.client
            ),
        ));
    }
    if subjects::available(subjects::Kind::Knockd) {
        let ports: Vec<String> = KNOCKD_PORTS.iter().map(|p| format!("{p}:udp")).collect();
        commands.push((
            "knock 0.8 (knockd's client)".to_owned(),
            format!(
                "{} {server} {}",
                peers.join("usr/bin/knock").display(),
                ports.join(" ")
            ),
        ));
    }
    let json = lab.dir().join("hyperfine.json");
    let mut hyperfine = Command::new("ip");
    hyperfine
        .args(["netns", "exec", &lab.ns(Host::Client), "hyperfine", "-N"])
        .args([
            "--warmup",
            "50",
            "--runs",
            &runs.to_string(),
            "--style",
            "none",
        ])
        .arg("--export-json")
        .arg(&json)
        .env("HOME", lab.dir());
    for (_, command) in &commands {
        hyperfine.arg(command);
    }
    let out = hyperfine.output().expect("run hyperfine");
    assert!(
        out.status.success(),
        "hyperfine: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let results = report["results"].as_array().cloned().unwrap_or_default();
    let stat = |i: usize, name: &str| {
        results.get(i).and_then(|r| r[name].as_f64()).unwrap_or(0.0) * 1000.0
    };
    let floor = stat(0, "median");
    Some(
        commands
            .iter()
            .enumerate()
            .map(|(i, (name, _))| ClientRow {
                client: name.clone(),
                median_ms: stat(i, "median"),
                mean_ms: stat(i, "mean"),
                stddev_ms: stat(i, "stddev"),
                over_true_ms: stat(i, "median") - floor,
            })
            .collect(),
    )
}
