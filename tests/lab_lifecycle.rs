//! Atomicity, refusals of bad configs, and what stopping the daemon leaves behind,
//! in the lab (root; CI runs these).

mod support;

use knockgate::firewall::nft::NftFirewall;
use knockgate::firewall::{Firewall, FirewallError};
use knockgate::ruleset::{Expr, Rule, Ruleset};
use support::{Host, Lab, lab_available, sa, v4, v6};

const DNS: &str = "[dns]\nresolvers = [\"10.77.2.53\"]\n";

/// The default baseline with one more rule at the very end of the batch that the
/// kernel refuses (a log prefix longer than its 127-byte limit).
fn ruleset_refused_at_the_end(table: &str) -> Ruleset {
    let config = knockgate::config::Config {
        table: table.to_owned(),
        ..Default::default()
    };
    let mut ruleset = knockgate::ruleset::baseline(&config, &["10.77.2.53".parse().unwrap()]);
    let last_chain = ruleset.chains.last_mut().unwrap();
    last_chain.rules.push(Rule(vec![Expr::Log {
        prefix: "x".repeat(200),
    }]));
    ruleset
}

fn apply_in_server(lab: &Lab, ruleset: &Ruleset) -> Result<(), FirewallError> {
    lab.in_ns(Host::Server, || NftFirewall::open()?.replace(ruleset))
}

#[test]
fn refused_batch_leaves_the_previous_ruleset_byte_for_byte() {
    if !lab_available("refused_batch_leaves_the_previous_ruleset_byte_for_byte") {
        return;
    }
    let lab = Lab::new();
    let daemon = lab.start_daemon(&lab.write_file("k.toml", DNS));
    assert_eq!(daemon.terminate(), 0);
    let before = lab.nft(&["-a", "list", "ruleset"]);

    let err = apply_in_server(&lab, &ruleset_refused_at_the_end("knockgate")).unwrap_err();
    let msg = format!("{err:#}");
    assert!(matches!(err, FirewallError::Refused { .. }), "{msg}");
    assert!(
        msg.contains("rule in chain forward: log prefix \"xxx"),
        "the refusal names the rule: {msg}"
    );

    let after = lab.nft(&["-a", "list", "ruleset"]);
    assert_eq!(
        before, after,
        "a refused batch must change nothing (handles included)"
    );
    // And the old baseline still acts.
    let _ssh = lab.tcp_echo(Host::Server, "[::]:22".parse().unwrap());
    assert!(!lab.tcp_works(Host::Client, sa(v4().server_from_client, 22)));
}

#[test]
fn refused_first_apply_creates_nothing() {
    if !lab_available("refused_first_apply_creates_nothing") {
        return;
    }
    let lab = Lab::new();
    let err = apply_in_server(&lab, &ruleset_refused_at_the_end("fresh")).unwrap_err();
    assert!(matches!(err, FirewallError::Refused { .. }), "{err:#}");
    assert_eq!(
        lab.nft(&["list", "ruleset"]),
        "",
        "no half-built table may remain"
    );
}

#[test]
fn bad_configs_exit_2_name_the_key_and_change_nothing() {
    if !lab_available("bad_configs_exit_2_name_the_key_and_change_nothing") {
        return;
    }
    let lab = Lab::new();
    let daemon = lab.start_daemon(&lab.write_file("good.toml", DNS));
    assert_eq!(daemon.terminate(), 0);
    let before = lab.nft(&["-a", "list", "ruleset"]);

    let cases = [
        (
            "unknown key",
            "[inbound]\ntcp_port = [80]\n",
            "inbound.tcp_port",
        ),
        (
            "wrong type",
            "[inbound]\nssh_port = \"twenty-two\"\n",
            "inbound.ssh_port",
        ),
        (
            "bad address",
            "[dns]\nresolvers = [\"10.77.2.300\"]\n",
            "dns.resolvers[0]",
        ),
        (
            "port 0",
            "[inbound]\ntcp_ports = [80, 0]\n",
            "inbound.tcp_ports[1]",
        ),
        (
            "duplicate port",
            "[inbound]\ntcp_ports = [443, 80, 443]\n",
            "inbound.tcp_ports[2]",
        ),
        ("bad enum", "outbound = \"closed\"\n", "outbound"),
    ];
    for (what, text, key) in cases {
        let path = lab.write_file("bad.toml", text);
        let out = lab.run_daemon_to_exit(&path);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{what}: exit 2 expected; stderr: {stderr}"
        );
        assert!(
            stderr.contains(key),
            "{what}: the message must name `{key}`: {stderr}"
        );
        assert!(
            stderr.contains(&path.display().to_string()),
            "{what}: the message must name the file: {stderr}"
        );
        assert_eq!(
            lab.nft(&["-a", "list", "ruleset"]),
            before,
            "{what}: no rule may change"
        );
    }
    let missing = std::path::Path::new("/nonexistent/knockgate.toml");
    let out = lab.run_daemon_to_exit(missing);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "missing file: {stderr}");
    assert!(stderr.contains("/nonexistent/knockgate.toml"), "{stderr}");
    assert_eq!(lab.nft(&["-a", "list", "ruleset"]), before);
}

#[test]
fn sigterm_leaves_the_baseline_in_force() {
    if !lab_available("sigterm_leaves_the_baseline_in_force") {
        return;
    }
    let lab = Lab::new();
    let _servers: Vec<_> = [22, 80]
        .iter()
        .map(|&p| lab.tcp_echo(Host::Server, sa(std::net::Ipv6Addr::UNSPECIFIED.into(), p)))
        .collect();
    let daemon = lab.start_daemon(&lab.write_file("k.toml", DNS));
    assert_eq!(daemon.terminate(), 0, "a clean stop exits 0");
    assert!(
        lab.nft(&["list", "tables"])
            .contains("table inet knockgate")
    );
    for plan in [v4(), v6()] {
        assert!(
            lab.tcp_works(Host::Client, sa(plan.server_from_client, 80)),
            "web still served"
        );
        assert!(
            !lab.tcp_works(Host::Client, sa(plan.server_from_client, 22)),
            "ssh still closed: fail closed"
        );
    }
}

#[test]
fn on_stop_remove_removes_exactly_its_own_table() {
    if !lab_available("on_stop_remove_removes_exactly_its_own_table") {
        return;
    }
    let lab = Lab::new();
    lab.nft(&["add", "table", "inet", "other"]);
    lab.nft(&[
        "add",
        "chain",
        "inet",
        "other",
        "watch",
        "{ type filter hook input priority 10; policy accept; }",
    ]);
    let other_before = lab.nft(&["list", "table", "inet", "other"]);
    let daemon =
        lab.start_daemon(&lab.write_file("k.toml", &format!("on_stop = \"remove\"\n{DNS}")));
    assert!(
        lab.nft(&["list", "tables"])
            .contains("table inet knockgate")
    );
    assert_eq!(daemon.terminate(), 0);
    let tables = lab.nft(&["list", "tables"]);
    assert!(!tables.contains("knockgate"), "our table is gone: {tables}");
    assert_eq!(
        lab.nft(&["list", "table", "inet", "other"]),
        other_before,
        "the other table is untouched"
    );
    // With the table gone, nothing filters any more: ssh is reachable again.
    let _ssh = lab.tcp_echo(Host::Server, "[::]:22".parse().unwrap());
    assert!(lab.tcp_works(Host::Client, sa(v6().server_from_client, 22)));
}

#[test]
fn readiness_is_signalled_only_after_the_baseline_is_in_the_kernel() {
    if !lab_available("readiness_is_signalled_only_after_the_baseline_is_in_the_kernel") {
        return;
    }
    let lab = Lab::new();
    let (notify_path, notify) = notify_socket(&lab, std::time::Duration::from_secs(15));
    let config = lab.write_file("k.toml", DNS);
    let _daemon = lab.start_daemon_with_env(&config, &[("NOTIFY_SOCKET", &notify_path)]);
    let mut buf = [0u8; 512];
    let n = notify.recv(&mut buf).expect("a notification");
    let message = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(message.contains("READY=1"), "{message}");
    // At the moment it said ready, the table was there.
    let listed = lab.nft(&["list", "table", "inet", "knockgate"]);
    assert!(listed.contains("chain input"), "{listed}");
}

#[test]
fn log_format_json_gives_one_object_per_decision() {
    if !lab_available("log_format_json_gives_one_object_per_decision") {
        return;
    }
    let lab = Lab::new();
    let config = lab.write_file("k.toml", DNS);
    let json = std::path::Path::new("json");
    let daemon = lab.start_daemon_with_env(&config, &[("KNOCKGATED_LOG_FORMAT", json)]);
    let log = daemon.log_text();
    let applied = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["event"] == "apply")
        .unwrap_or_else(|| panic!("no JSON apply line in: {log}"));
    assert_eq!(applied["target"], "knockgate::audit");
    assert_eq!(applied["table"], "knockgate");
    assert!(applied["rules"].as_u64().unwrap() > 10);
}

/// The watchdog keeps being fed while the daemon is busy: a ping timer restarted by
/// every knock never fired under a steady trickle of datagrams, and systemd killed
/// the daemon (found in the VM lab). Here: a 1 s ping period, a datagram every 200 ms.
#[test]
fn the_watchdog_is_fed_while_knocks_keep_arriving() {
    if !lab_available("the_watchdog_is_fed_while_knocks_keep_arriving") {
        return;
    }
    let lab = Lab::new();
    let (notify_path, notify) = notify_socket(&lab, std::time::Duration::from_millis(100));
    let config = lab.write_file("k.toml", DNS);
    let usec = std::path::Path::new("2000000");
    let _daemon = lab.start_daemon_with_env(
        &config,
        &[("NOTIFY_SOCKET", &notify_path), ("WATCHDOG_USEC", usec)],
    );
    let knock_port = sa(v4().server_from_client, 62201);
    let mut pings = 0;
    let mut buf = [0u8; 512];
    for _ in 0..20 {
        lab.udp_send(Host::Client, v4().client, knock_port, &[vec![0u8; 114]]);
        let until = std::time::Instant::now() + std::time::Duration::from_millis(200);
        while std::time::Instant::now() < until {
            if let Ok(n) = notify.recv(&mut buf) {
                pings += usize::from(String::from_utf8_lossy(&buf[..n]).contains("WATCHDOG=1"));
            }
        }
    }
    // 4 s of traffic with a ping due every second.
    assert!(pings >= 2, "{pings} watchdog pings in 4 s");
}

/// A stand-in for systemd's notify socket in the lab's directory, reads bounded by `wait`.
fn notify_socket(
    lab: &Lab,
    wait: std::time::Duration,
) -> (std::path::PathBuf, std::os::unix::net::UnixDatagram) {
    let path = lab.dir().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    socket.set_read_timeout(Some(wait)).unwrap();
    (path, socket)
}
