//! The local admin socket in the lab: status, open, list, revoke, grants across a
//! restart, and refusal of users outside the admin group (root; CI runs these).

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Output};

use support::{Host, Lab, admin, lab_available, sa, v4, v6};

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn setup(lab: &Lab) -> (PathBuf, PathBuf) {
    let socket = lab.dir().join("admin.sock");
    let config = lab.write_file(
        "k.toml",
        &format!(
            "[knock]\nmax_ttl = \"2h\"\n[admin]\nsocket = \"{}\"\n[dns]\nresolvers = [\"10.77.2.53\"]\n",
            socket.display()
        ),
    );
    (socket, config)
}

/// [`setup`] with `tamper = "repair"`: the table not locked, so another process's
/// change reaches it (a kernel ≥ 6.9 would refuse it outright) and is repaired.
fn setup_unlocked(lab: &Lab) -> (PathBuf, PathBuf) {
    let (socket, locked) = setup(lab);
    let config = lab.write_file(
        "repair.toml",
        &format!(
            "tamper = \"repair\"\n{}",
            std::fs::read_to_string(&locked).unwrap()
        ),
    );
    (socket, config)
}

#[test]
fn an_admin_opens_lists_and_revokes_grants() {
    if !lab_available("an_admin_opens_lists_and_revokes_grants") {
        return;
    }
    let lab = Lab::new();
    let _ssh = lab.tcp_echo(Host::Server, "[::]:22".parse().unwrap());
    let (socket, config) = setup(&lab);
    let daemon = lab.start_daemon(&config);
    let out = admin(&socket, &["status"]);
    assert!(
        out.status.success() && text(&out).contains("knockgated running"),
        "{}",
        text(&out)
    );

    let (four, six) = (v4(), v6());
    let from = four.client.to_string();
    let out = admin(&socket, &["open", "ssh", "--from", &from, "--ttl", "30m"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("opened ssh for 10.77.1.2"),
        "{}",
        text(&out)
    );
    let ssh = sa(four.server_from_client, 22);
    assert!(
        lab.tcp_works_from(Host::Client, four.client, ssh),
        "open for the named address"
    );
    assert!(
        !lab.tcp_works_from(Host::Client, four.client_alt, ssh),
        "and no other"
    );

    let out = admin(
        &socket,
        &[
            "open",
            "ssh",
            "--from",
            &six.client.to_string(),
            "--ttl",
            "48h",
        ],
    );
    assert!(text(&out).contains("capped"), "{}", text(&out));

    let out = admin(&socket, &["grants", "--json"]);
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let grants = listed["grants"].as_array().expect("grants").clone();
    assert_eq!(grants.len(), 2);
    let id = grants
        .iter()
        .find(|g| g["address"] == "10.77.1.2")
        .and_then(|g| g["id"].as_str())
        .unwrap()
        .to_owned();
    assert!(grants.iter().all(|g| g["who"] == "uid 0"));
    assert!(text(&admin(&socket, &["grants"])).contains(&id));

    // The grants outlive a restart of the daemon.
    assert_eq!(daemon.terminate(), 0);
    let _daemon = lab.start_daemon(&config);
    assert!(
        text(&admin(&socket, &["grants"])).contains(&id),
        "listed after a restart"
    );
    assert!(
        lab.tcp_works_from(Host::Client, four.client, ssh),
        "still open after a restart"
    );

    let out = admin(&socket, &["revoke", &id]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        !lab.tcp_works_from(Host::Client, four.client, ssh),
        "closed at once by revoke"
    );
    let out = admin(&socket, &["revoke", &id]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains("no grant or window with id"),
        "{}",
        text(&out)
    );
}

#[test]
fn users_outside_the_admin_group_are_refused_clearly() {
    if !lab_available("users_outside_the_admin_group_are_refused_clearly") {
        return;
    }
    let lab = Lab::new();
    let (socket, config) = setup(&lab);
    let _daemon = lab.start_daemon(&config);
    // The lab's temporary directory is private to root; let nobody reach the socket's
    // directory so the socket's own permissions and the daemon decide.
    std::fs::set_permissions(lab.dir(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_knockgate"))
        .arg("--socket")
        .arg(&socket)
        .args(["open", "ssh", "--from", "10.77.1.2"])
        .output()
        .expect("run setpriv");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let said = text(&out);
    assert!(
        said.contains("only root and members of the admin group")
            || said.contains("not in the admin group"),
        "{said}"
    );
    let out = admin(&socket, &["grants", "--json"]);
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(
        listed["grants"],
        serde_json::json!([]),
        "nothing was opened"
    );
}

#[test]
fn reload_applies_a_good_config_keeps_grants_and_refuses_a_bad_one() {
    if !lab_available("reload_applies_a_good_config_keeps_grants_and_refuses_a_bad_one") {
        return;
    }
    let lab = Lab::new();
    let _servers: Vec<_> = [22, 8080]
        .iter()
        .map(|&p| lab.tcp_echo(Host::Server, sa(std::net::Ipv6Addr::UNSPECIFIED.into(), p)))
        .collect();
    let (socket, config) = setup(&lab);
    let mut daemon = lab.start_daemon(&config);
    let four = v4();
    let out = admin(
        &socket,
        &["open", "ssh", "--from", &four.client.to_string()],
    );
    assert!(out.status.success(), "{}", text(&out));
    let (ssh, web) = (
        sa(four.server_from_client, 22),
        sa(four.server_from_client, 8080),
    );
    assert!(!lab.tcp_works_from(Host::Client, four.client, web));

    let good =
        std::fs::read_to_string(&config).unwrap() + "[inbound]\ntcp_ports = [80, 443, 8080]\n";
    std::fs::write(&config, good).unwrap();
    let out = admin(&socket, &["reload"]);
    assert!(
        out.status.success() && text(&out).contains("reloaded"),
        "{}",
        text(&out)
    );
    assert!(
        lab.tcp_works_from(Host::Client, four.client, web),
        "the new port is open"
    );
    assert!(
        lab.tcp_works_from(Host::Client, four.client, ssh),
        "the grant survived the reload"
    );

    let before = lab.nft(&["-a", "list", "chain", "inet", "knockgate", "input"]);
    std::fs::write(&config, "[inbound]\ntcp_ports = [0]\n").unwrap();
    let out = admin(&socket, &["reload"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("inbound.tcp_ports[0]"),
        "{}",
        text(&out)
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.pid()),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(
        daemon.is_running(),
        "a bad config on SIGHUP does not stop the daemon"
    );
    assert_eq!(
        lab.nft(&["-a", "list", "chain", "inet", "knockgate", "input"]),
        before,
        "nothing changed"
    );
    assert!(
        lab.tcp_works_from(Host::Client, four.client, web),
        "the previous config stays in force"
    );
    assert!(
        daemon.log_text().contains("reload-refused"),
        "the refusal is logged"
    );
}

#[test]
fn apply_with_confirm_rolls_back_unless_confirmed() {
    if !lab_available("apply_with_confirm_rolls_back_unless_confirmed") {
        return;
    }
    let lab = Lab::new();
    let _web = lab.tcp_echo(Host::Server, "[::]:8080".parse().unwrap());
    let (socket, config) = setup(&lab);
    let daemon = lab.start_daemon(&config);
    let four = v4();
    let web = sa(four.server_from_client, 8080);
    let trial_text =
        std::fs::read_to_string(&config).unwrap() + "[inbound]\ntcp_ports = [80, 443, 8080]\n";
    let trial = lab.write_file("trial.toml", &trial_text);
    let trial_arg = trial.to_str().unwrap();

    let out = admin(
        &socket,
        &["--config", trial_arg, "apply", "--confirm", "2s"],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        lab.tcp_works_from(Host::Client, four.client, web),
        "the trial config is in force"
    );
    std::thread::sleep(std::time::Duration::from_millis(3500));
    assert!(
        !lab.tcp_works_from(Host::Client, four.client, web),
        "rolled back without a confirm"
    );
    assert!(
        daemon.log_text().contains("event=\"rollback\""),
        "the rollback is logged"
    );

    let out = admin(
        &socket,
        &["--config", trial_arg, "apply", "--confirm", "60s"],
    );
    assert!(out.status.success(), "{}", text(&out));
    let out = admin(&socket, &["confirm"]);
    assert!(
        out.status.success() && text(&out).contains("confirmed"),
        "{}",
        text(&out)
    );
    assert_eq!(
        std::fs::read_to_string(&config).unwrap(),
        trial_text,
        "saved over the daemon's config"
    );
    assert_eq!(daemon.terminate(), 0);
    let _again = lab.start_daemon(&config);
    assert!(
        lab.tcp_works_from(Host::Client, four.client, web),
        "confirmed config survives a restart"
    );
    let out = admin(&socket, &["confirm"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains("no config is waiting"),
        "{}",
        text(&out)
    );
}

/// `knockgate ARGS` run as nobody (uid 65534) whose primary group is `nogroup`.
fn as_nobody(socket: &std::path::Path, args: &[&str]) -> Output {
    Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_knockgate"))
        .arg("--socket")
        .arg(socket)
        .args(args)
        .output()
        .expect("run setpriv")
}

#[test]
fn config_changes_are_roots_unless_the_group_may() {
    if !lab_available("config_changes_are_roots_unless_the_group_may") {
        return;
    }
    let lab = Lab::new();
    let _web = lab.tcp_echo(Host::Server, "[::]:8080".parse().unwrap());
    let socket = lab.dir().join("admin.sock");
    let base = format!(
        "[knock]\nmax_ttl = \"2h\"\n[admin]\nsocket = \"{}\"\ngroup = \"nogroup\"\n",
        socket.display()
    );
    let config = lab.write_file(
        "k.toml",
        &format!("{base}[dns]\nresolvers = [\"10.77.2.53\"]\n"),
    );
    let daemon = lab.start_daemon(&config);
    // nobody (primary group nogroup, the admin group here) reaches the socket.
    std::fs::set_permissions(lab.dir(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let four = v4();
    let web = sa(four.server_from_client, 8080);
    let open_web = format!(
        "{base}group_may_change_config = true\n[dns]\nresolvers = [\"10.77.2.53\"]\n[inbound]\ntcp_ports = [80, 443, 8080]\n"
    );
    let trial = lab.write_file("trial.toml", &open_web);
    std::fs::set_permissions(&trial, std::fs::Permissions::from_mode(0o644)).unwrap();
    let trial_arg = trial.to_str().unwrap();

    // Opening and listing stay the group's.
    let out = as_nobody(&socket, &["open", "ssh", "--from", "10.77.1.2"]);
    assert!(out.status.success(), "{}", text(&out));
    // Changing the config does not: each refusal says how to allow it, and is logged.
    for args in [
        vec!["reload"],
        vec!["--config", trial_arg, "apply", "--confirm", "60s"],
        vec!["confirm"],
    ] {
        let out = as_nobody(&socket, &args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", text(&out));
        assert!(
            text(&out).contains("group_may_change_config = true"),
            "{args:?}: {}",
            text(&out)
        );
    }
    assert_eq!(
        daemon.log_text().matches("config change refused").count(),
        3,
        "{}",
        daemon.log_text()
    );
    assert!(
        !lab.tcp_works_from(Host::Client, four.client, web),
        "nothing was applied"
    );

    // Root allows it (a reload of a config that says so); then the group may.
    std::fs::write(&config, &open_web).unwrap();
    let out = admin(&socket, &["reload"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = as_nobody(&socket, &["reload"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = as_nobody(
        &socket,
        &["--config", trial_arg, "apply", "--confirm", "60s"],
    );
    assert!(out.status.success(), "{}", text(&out));
    let out = as_nobody(&socket, &["confirm"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        lab.tcp_works_from(Host::Client, four.client, web),
        "the group's apply is in force"
    );
}

/// SSH opens for each family's client address and for no other.
fn ssh_open_for_the_clients_only(lab: &Lab, after: &str) {
    for plan in [v4(), v6()] {
        let ssh = sa(plan.server_from_client, 22);
        assert!(
            lab.tcp_works_from(Host::Client, plan.client, ssh),
            "{after}"
        );
        assert!(
            !lab.tcp_works_from(Host::Client, plan.client_alt, ssh),
            "no other {after}"
        );
    }
}

/// Other processes commit all the time on a real server (fail2ban, docker,
/// libvirt): commits to their own tables, heard whole by the tamper watch, must not
/// cost the next reload or restart its kept grant sets. The attacker: one transaction
/// that touches another table *and* slips an address into the grant set. It must
/// not be vouched for as harmless: the watch repairs it and the address gets no SSH.
#[test]
fn other_processes_commits_to_other_tables_keep_the_grant_sets_one_that_touches_the_table_does_not()
{
    if !lab_available(
        "other_processes_commits_to_other_tables_keep_the_grant_sets_one_that_touches_the_table_does_not",
    ) {
        return;
    }
    let lab = Lab::new();
    let _ssh = lab.tcp_echo(Host::Server, "[::]:22".parse().unwrap());
    let (socket, config) = setup_unlocked(&lab);
    let mut daemon = lab.start_daemon(&config);
    let (four, six) = (v4(), v6());
    for plan in [&four, &six] {
        let from = plan.client.to_string();
        let out = admin(&socket, &["open", "ssh", "--from", &from, "--ttl", "30m"]);
        assert!(out.status.success(), "{}", text(&out));
    }
    let someone_else_commits = || {
        lab.nft(&["add", "table", "inet", "someone-else"]);
        lab.nft(&["add", "chain", "inet", "someone-else", "input"]);
        lab.nft(&["delete", "table", "inet", "someone-else"]);
    };

    // Commits elsewhere, then a reload at once: nothing waits for the loop to have
    // read the watch (the reload reads it).
    someone_else_commits();
    let out = admin(&socket, &["reload"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(daemon.kept_grant_sets(), Some(2), "{}", daemon.log_text());
    ssh_open_for_the_clients_only(&lab, "after a reload that followed commits elsewhere");

    // A grant opened right after a commit elsewhere (its batch is chained to the
    // account: refused, then sent again once the watch has vouched for the commit),
    // then commits elsewhere and a restart: the stop's stamp carries the account on.
    someone_else_commits();
    let alt = four.client_alt.to_string();
    let out = admin(&socket, &["open", "ssh", "--from", &alt, "--ttl", "30m"]);
    assert!(out.status.success(), "{}", text(&out));
    let ssh = sa(four.server_from_client, 22);
    assert!(lab.tcp_works_from(Host::Client, four.client_alt, ssh));
    let id = text(&admin(&socket, &["grants"]))
        .lines()
        .find(|l| l.contains(&alt))
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .expect("the new grant is listed");
    assert!(admin(&socket, &["revoke", &id]).status.success());
    someone_else_commits();
    assert_eq!(daemon.terminate(), 0);
    daemon = lab.start_daemon(&config);
    assert_eq!(daemon.kept_grant_sets(), Some(2), "{}", daemon.log_text());
    ssh_open_for_the_clients_only(&lab, "after a restart that followed commits elsewhere");

    // The attacker: one transaction, another table and an address in the grant set.
    let stranger = four.client_alt.to_string();
    let both = lab.write_file(
        "both.nft",
        &format!(
            "add table inet someone-else\n\
             add element inet knockgate ssh_grants_v4 {{ {stranger} timeout 1h }}\n\
             delete table inet someone-else\n"
        ),
    );
    lab.nft(&["-f", &both.display().to_string()]);
    // Vouched for, the change would be taken for one the daemon had already undone
    // ("nothing left to repair") and the stranger would keep the hole.
    assert!(
        daemon.logged_soon("action=\"repaired\""),
        "the watch repairs the table: {}",
        daemon.log_text()
    );
    ssh_open_for_the_clients_only(&lab, "after a commit that also touched the table");
    assert!(
        !text(&admin(&socket, &["grants"])).contains(&stranger),
        "the slipped-in address is not booked"
    );
    // The repair's whole replace starts the account afresh.
    someone_else_commits();
    let out = admin(&socket, &["reload"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(daemon.kept_grant_sets(), Some(2), "{}", daemon.log_text());
    assert_eq!(daemon.terminate(), 0);
}

/// A netlink socket to nf_tables in the server's namespace, as another process
/// with CAP_NET_ADMIN would open.
fn nfnetlink_socket() -> std::os::fd::OwnedFd {
    use nix::sys::socket::{
        AddressFamily, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, socket,
    };
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkNetFilter,
    )
    .expect("netlink socket");
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &NetlinkAddr::new(0, 0),
    )
    .expect("bind");
    fd
}

/// One nf_tables message: header, nfgenmsg, `attrs`.
fn nf_tables_message(kind: u16, flags: u16, attrs: &[u8]) -> Vec<u8> {
    let len = u32::try_from(16 + 4 + attrs.len()).unwrap();
    let mut m = len.to_ne_bytes().to_vec();
    m.extend_from_slice(&((10u16 << 8) | kind).to_ne_bytes()); // NFNL_SUBSYS_NFTABLES
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&1u32.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&[0, 0, 0, 0]);
    m.extend_from_slice(attrs);
    m
}

/// The ruleset's generation now (`GETGEN`), in the server's namespace.
fn ruleset_generation(lab: &Lab) -> u32 {
    use nix::sys::socket::{MsgFlags, NetlinkAddr, recv, sendto};
    lab.in_ns(Host::Server, || {
        let fd = nfnetlink_socket();
        let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
        let request = nf_tables_message(16, 1, &[]); // NFT_MSG_GETGEN, NLM_F_REQUEST
        sendto(raw, &request, &NetlinkAddr::new(0, 0), MsgFlags::empty()).expect("GETGEN");
        let mut buf = vec![0u8; 4096];
        let len = recv(raw, &mut buf, MsgFlags::empty()).expect("NEWGEN");
        // The first attribute of the NEWGEN is NFTA_GEN_ID, big-endian.
        assert!(len >= 28, "short NEWGEN");
        u32::from_be_bytes([buf[24], buf[25], buf[26], buf[27]])
    })
}

/// The attacker of decision 76: a process with CAP_NET_ADMIN multicasts a forged
/// `NEWGEN` for the next generation to the nf_tables group, then slips an address
/// into the grant set (which the kernel numbers that generation). Were the forgery read
/// as the kernel's, the daemon would vouch for the generation, take the real change
/// for one it had already undone, and leave the address its SSH hole.
#[test]
fn a_forged_notification_does_not_vouch_for_a_change_to_the_table() {
    use nix::sys::socket::{MsgFlags, NetlinkAddr, sendto};
    if !lab_available("a_forged_notification_does_not_vouch_for_a_change_to_the_table") {
        return;
    }
    let lab = Lab::new();
    let _ssh = lab.tcp_echo(Host::Server, "[::]:22".parse().unwrap());
    let (socket, config) = setup_unlocked(&lab);
    let daemon = lab.start_daemon(&config);
    let four = v4();
    let from = four.client.to_string();
    let out = admin(&socket, &["open", "ssh", "--from", &from, "--ttl", "30m"]);
    assert!(out.status.success(), "{}", text(&out));

    // The daemon's own commits after the grant settle first: the attacker's commit must
    // be the next generation (the race is then a few microseconds wide).
    let mut now = ruleset_generation(&lab);
    for _ in 0..20 {
        std::thread::sleep(std::time::Duration::from_millis(200));
        let later = ruleset_generation(&lab);
        if later == now {
            break;
        }
        now = later;
    }
    let next = now + 1;
    let mut gen_id = 8u16.to_ne_bytes().to_vec();
    gen_id.extend_from_slice(&1u16.to_ne_bytes()); // NFTA_GEN_ID
    gen_id.extend_from_slice(&next.to_be_bytes());
    let forged = nf_tables_message(15, 0, &gen_id); // NFT_MSG_NEWGEN
    lab.in_ns(Host::Server, || {
        let fd = nfnetlink_socket();
        let group = NetlinkAddr::new(0, 1 << 6); // NFNLGRP_NFTABLES (7)
        sendto(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            &forged,
            &group,
            MsgFlags::empty(),
        )
        .expect("multicast to the nf_tables group");
    });
    let stranger = four.client_alt.to_string();
    lab.nft(&[
        "add",
        "element",
        "inet",
        "knockgate",
        "ssh_grants_v4",
        &format!("{{ {stranger} timeout 1h }}"),
    ]);
    // The change took the forged number (the daemon's repair may already have taken
    // the one after it).
    assert!(ruleset_generation(&lab) >= next);
    assert!(
        daemon.logged_soon("action=\"repaired\""),
        "the change is repaired: {}",
        daemon.log_text()
    );
    assert!(
        daemon.log_text().contains("the kernel did not send"),
        "the forgery is logged: {}",
        daemon.log_text()
    );
    let ssh = sa(four.server_from_client, 22);
    assert!(lab.tcp_works_from(Host::Client, four.client, ssh));
    assert!(
        !lab.tcp_works_from(Host::Client, four.client_alt, ssh),
        "the stranger has no SSH"
    );
    assert_eq!(daemon.terminate(), 0);
}

#[test]
fn grant_sets_stay_in_place_across_reload_and_restart_unless_someone_else_committed() {
    if !lab_available(
        "grant_sets_stay_in_place_across_reload_and_restart_unless_someone_else_committed",
    ) {
        return;
    }
    let lab = Lab::new();
    let _ssh = lab.tcp_echo(Host::Server, "[::]:22".parse().unwrap());
    let (socket, config) = setup(&lab);
    let mut daemon = lab.start_daemon(&config);
    let (four, six) = (v4(), v6());
    for (plan, ssh) in [
        (&four, sa(four.server_from_client, 22)),
        (&six, sa(six.server_from_client, 22)),
    ] {
        let from = plan.client.to_string();
        let out = admin(&socket, &["open", "ssh", "--from", &from, "--ttl", "30m"]);
        assert!(out.status.success(), "{}", text(&out));
        assert!(lab.tcp_works_from(Host::Client, plan.client, ssh));
    }
    // Id, service, address, who of each grant listed (not the time left).
    let grants = || -> Vec<String> {
        text(&admin(&socket, &["grants"]))
            .lines()
            .map(|l| l.split_whitespace().take(4).collect::<Vec<_>>().join(" "))
            .collect()
    };
    let listed = grants();

    // A reload with no commit but the daemon's own since its start: both ssh sets stay.
    let out = admin(&socket, &["reload"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(daemon.kept_grant_sets(), Some(2), "{}", daemon.log_text());
    ssh_open_for_the_clients_only(&lab, "after the reload");

    // A restart with nobody committing in between: the book's stamp vouches for the sets.
    assert_eq!(daemon.terminate(), 0);
    daemon = lab.start_daemon(&config);
    assert_eq!(daemon.kept_grant_sets(), Some(2), "{}", daemon.log_text());
    assert_eq!(grants(), listed, "the same grants, ids and all");
    ssh_open_for_the_clients_only(&lab, "after the restart");

    // Someone slips an address into the grant set while the daemon is stopped: the start
    // must not leave it there unseen. It reads the sets back and books it (`recovered`),
    // so `knockgate grants` shows it and `revoke` can close it.
    assert_eq!(daemon.terminate(), 0);
    let stranger = four.client_alt.to_string();
    lab.nft(&[
        "add",
        "element",
        "inet",
        "knockgate",
        "ssh_grants_v4",
        &format!("{{ {stranger} timeout 1h }}"),
    ]);
    daemon = lab.start_daemon(&config);
    assert_eq!(daemon.kept_grant_sets(), Some(0), "{}", daemon.log_text());
    assert!(
        daemon.log_text().contains("reading its grant sets back"),
        "{}",
        daemon.log_text()
    );
    let listed = text(&admin(&socket, &["grants"]));
    let line = listed
        .lines()
        .find(|l| l.contains(&stranger))
        .unwrap_or_else(|| panic!("the slipped-in address is booked: {listed}"));
    assert!(line.contains("recovered"), "{listed}");
    let ssh = sa(four.server_from_client, 22);
    assert!(
        lab.tcp_works_from(Host::Client, four.client, ssh),
        "ours still works"
    );
    let id = line.split_whitespace().next().unwrap();
    assert!(admin(&socket, &["revoke", id]).status.success());
    assert!(
        !lab.tcp_works_from(Host::Client, four.client_alt, ssh),
        "revoked"
    );

    assert_eq!(daemon.terminate(), 0);
}

#[test]
fn a_table_made_dormant_while_stopped_is_replaced_not_kept() {
    if !lab_available("a_table_made_dormant_while_stopped_is_replaced_not_kept") {
        return;
    }
    let lab = Lab::new();
    let _ssh = lab.tcp_echo(Host::Server, "[::]:22".parse().unwrap());
    let (socket, config) = setup(&lab);
    // An unlocked table: Debian 12's nft cannot keep a locked table's persist flag.
    let text = std::fs::read_to_string(&config).unwrap();
    let config = lab.write_file("unlocked.toml", &format!("tamper = \"repair\"\n{text}"));
    let four = v4();
    let ssh = sa(four.server_from_client, 22);
    let daemon = lab.start_daemon(&config);
    let from = four.client.to_string();
    assert!(
        admin(&socket, &["open", "ssh", "--from", &from, "--ttl", "30m"])
            .status
            .success()
    );
    assert_eq!(daemon.terminate(), 0);
    // Someone makes the table dormant while the daemon is stopped: its base chains hook
    // nothing, the host is open. The start must replace that table, not keep it.
    lab.nft(&["add", "table", "inet", "knockgate", "{ flags dormant; }"]);
    assert!(
        lab.tcp_works_from(Host::Client, four.client_alt, ssh),
        "dormant: open"
    );
    let daemon = lab.start_daemon(&config);
    assert!(
        !lab.nft(&["list", "table", "inet", "knockgate"])
            .contains("dormant")
    );
    assert!(
        !lab.tcp_works_from(Host::Client, four.client_alt, ssh),
        "closed again"
    );
    assert!(
        lab.tcp_works_from(Host::Client, four.client, ssh),
        "the grant still works"
    );
    assert_eq!(daemon.terminate(), 0);
}
