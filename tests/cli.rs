//! The binaries as a user runs them: exit codes and messages. No root needed.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/knockgate.toml")
}

/// Runs a binary with `resolv_conf` pointed at a file of ours, so no test depends
/// on the host's /etc/resolv.conf.
fn run(bin: &str, args: &[&str], dir: &tempfile::TempDir) -> Output {
    let resolv = dir.path().join("resolv.conf");
    std::fs::write(&resolv, "nameserver 192.0.2.53\n").unwrap();
    Command::new(bin)
        .args(args)
        .env("KNOCKGATE_DNS__RESOLV_CONF", &resolv)
        .output()
        .expect("run binary")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn check_accepts_the_example_config() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = example();
    let out = run(
        env!("CARGO_BIN_EXE_knockgate"),
        &["check", "--config", cfg.to_str().unwrap()],
        &dir,
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("ok"));
}

#[test]
fn ruleset_and_daemon_check_print_the_same_nft_text() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = example();
    let cfg = cfg.to_str().unwrap();
    let admin = run(
        env!("CARGO_BIN_EXE_knockgate"),
        &["ruleset", "--config", cfg],
        &dir,
    );
    let daemon = run(
        env!("CARGO_BIN_EXE_knockgated"),
        &["--check", "--config", cfg],
        &dir,
    );
    assert_eq!(admin.status.code(), Some(0), "{}", text(&admin.stderr));
    assert_eq!(daemon.status.code(), Some(0), "{}", text(&daemon.stderr));
    let printed = text(&admin.stdout);
    assert!(printed.starts_with("table inet knockgate {"), "{printed}");
    assert!(
        printed.contains("ip daddr 192.0.2.53 udp dport 53 ct mark set"),
        "resolver from resolv_conf: {printed}"
    );
    assert_eq!(printed, text(&daemon.stdout));
}

#[test]
fn environment_overrides_reach_the_ruleset() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = example();
    let out = Command::new(env!("CARGO_BIN_EXE_knockgate"))
        .args(["ruleset", "--config", cfg.to_str().unwrap()])
        .env("KNOCKGATE_INBOUND__SSH_PORT", "2222")
        .env("KNOCKGATE_DNS__RESOLVERS", "192.0.2.1")
        .env("KNOCKGATE_DNS__RESOLV_CONF", dir.path().join("absent"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("tcp dport 2222 ip saddr @ssh_grants_v4 ct mark set"));
}

#[test]
fn bad_configs_exit_2_and_name_the_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("[inbound]\ntcp_port = [80]\n", "inbound.tcp_port"),
        ("[inbound]\nssh_port = \"twenty-two\"\n", "inbound.ssh_port"),
        ("[dns]\nresolvers = [\"nope\"]\n", "dns.resolvers[0]"),
        ("[knock]\nport = 0\n", "knock.port"),
        ("[inbound]\ntcp_ports = [80, 80]\n", "inbound.tcp_ports[1]"),
        ("forward = \"accept\"\n", "forward"),
        ("[inbound\n", "line 1"),
    ];
    for (body, key) in cases {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, body).unwrap();
        for (bin, args) in [
            (env!("CARGO_BIN_EXE_knockgate"), vec!["check", "--config"]),
            (
                env!("CARGO_BIN_EXE_knockgated"),
                vec!["--check", "--config"],
            ),
        ] {
            let mut args = args.clone();
            args.push(path.to_str().unwrap());
            let out = run(bin, &args, &dir);
            let stderr = text(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{bin} {body:?}: {stderr}");
            assert!(
                stderr.contains(key),
                "{bin} {body:?} must name {key}: {stderr}"
            );
            assert!(
                stderr.contains(path.to_str().unwrap()),
                "{bin} must name the file: {stderr}"
            );
            assert!(
                out.stdout.is_empty(),
                "nothing printed on stdout for a bad config"
            );
        }
    }
}

#[test]
fn missing_config_file_exits_2_and_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(
        env!("CARGO_BIN_EXE_knockgate"),
        &["check", "--config", "/nonexistent/k.toml"],
        &dir,
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("/nonexistent/k.toml"));
}

#[test]
fn unknown_subcommand_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(env!("CARGO_BIN_EXE_knockgate"), &["frobnicate"], &dir);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn keygen_writes_a_private_key_and_prints_both_configs() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let cfg = example();
    let out = run(
        env!("CARGO_BIN_EXE_knockgate"),
        &[
            "keygen",
            "alice-laptop",
            "--dir",
            dir.path().to_str().unwrap(),
            "--address",
            "web1.example.org",
            "--config",
            cfg.to_str().unwrap(),
        ],
        &dir,
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let key = dir.path().join("alice-laptop.key");
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let printed = text(&out.stdout);
    assert!(
        printed.contains("[[keys]]\nid = \"alice-laptop\""),
        "{printed}"
    );
    assert!(
        printed.contains("[hosts.web1]") && printed.contains("server_id = "),
        "{printed}"
    );
    assert!(
        printed.contains("allow_unbound = false") && !printed.contains("source = \"packet\""),
        "keys require bound knocks by default: {printed}"
    );
    let secret = std::fs::read_to_string(&key).unwrap();
    assert!(!printed.contains(secret.trim()), "the key is not printed");
    // NAT mode says what it gives up, and the client stanza sends unbound knocks.
    let nat = run(
        env!("CARGO_BIN_EXE_knockgate"),
        &[
            "keygen",
            "bob-phone",
            "--nat",
            "--dir",
            dir.path().to_str().unwrap(),
            "--config",
            cfg.to_str().unwrap(),
        ],
        &dir,
    );
    assert_eq!(nat.status.code(), Some(0), "{}", text(&nat.stderr));
    let printed = text(&nat.stdout);
    assert!(
        printed.contains("allow_unbound = true")
            && printed.contains("source = \"packet\"")
            && printed.contains("can send the same datagram first from their own"),
        "{printed}"
    );
    // A second keygen never overwrites the key.
    let again = run(
        env!("CARGO_BIN_EXE_knockgate"),
        &[
            "keygen",
            "alice-laptop",
            "--dir",
            dir.path().to_str().unwrap(),
            "--config",
            cfg.to_str().unwrap(),
        ],
        &dir,
    );
    assert_ne!(again.status.code(), Some(0));
    assert!(
        text(&again.stderr).contains("exists"),
        "{}",
        text(&again.stderr)
    );
    assert_eq!(std::fs::read_to_string(&key).unwrap(), secret);
}

#[test]
fn keygen_hands_the_key_to_the_daemon_user_and_refuses_an_unknown_one() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().to_str().unwrap();
    let cfg = example();
    let cfg = cfg.to_str().unwrap();
    let unknown = run(
        env!("CARGO_BIN_EXE_knockgate"),
        &[
            "keygen",
            "k1",
            "--dir",
            keys,
            "--owner",
            "no-such-user-kg",
            "--config",
            cfg,
        ],
        &dir,
    );
    assert_ne!(unknown.status.code(), Some(0));
    assert!(
        text(&unknown.stderr).contains("--owner no-such-user-kg: no such user"),
        "{}",
        text(&unknown.stderr)
    );
    assert!(!dir.path().join("k1.key").exists(), "nothing written");
    if !nix::unistd::geteuid().is_root() {
        eprintln!("\n*** SKIPPED the chown half: handing a file to another user needs root ***\n");
        return;
    }
    let nobody = nix::unistd::User::from_name("nobody")
        .unwrap()
        .expect("user nobody");
    let out = run(
        env!("CARGO_BIN_EXE_knockgate"),
        &[
            "keygen", "k1", "--dir", keys, "--owner", "nobody", "--config", cfg,
        ],
        &dir,
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("owned by nobody"),
        "{}",
        text(&out.stdout)
    );
    let meta = std::fs::metadata(dir.path().join("k1.key")).unwrap();
    assert_eq!(meta.uid(), nobody.uid.as_raw());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
}

#[test]
fn knock_without_a_target_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(
        env!("CARGO_BIN_EXE_knock"),
        &["--config", "/nonexistent/knock.toml", "web"],
        &dir,
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("/nonexistent/knock.toml"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn knock_refuses_a_group_readable_key() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k.key");
    std::fs::write(&key, "ab".repeat(32)).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
    let out = run(
        env!("CARGO_BIN_EXE_knock"),
        &[
            "--server",
            "192.0.2.1",
            "--key-id",
            "a",
            "--key-file",
            key.to_str().unwrap(),
        ],
        &dir,
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("chmod 600"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn a_reader_that_goes_away_ends_the_output_quietly() {
    // `knockgate ruleset | head -1`, `knockgated --check | head`: the pipe closes
    // before the ruleset is written; no panic, no error, exit 0.
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/knockgate.toml");
    for (program, args) in [
        (
            env!("CARGO_BIN_EXE_knockgate"),
            vec!["--config", config, "ruleset"],
        ),
        (
            env!("CARGO_BIN_EXE_knockgated"),
            vec!["--config", config, "--check"],
        ),
    ] {
        let mut child = std::process::Command::new(program)
            .args(&args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{program}: {}",
            text(&out.stderr)
        );
        assert!(out.stderr.is_empty(), "{program}: {}", text(&out.stderr));
    }
}

#[test]
fn keygen_with_a_config_it_cannot_read_writes_nothing_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    let broken = dir.path().join("broken.toml");
    std::fs::write(&broken, "[knock]\nport = \"many\"\n").unwrap();
    let missing = dir.path().join("missing.toml");
    for (config, says) in [
        (&broken, "knock.port"),
        (&missing, "cannot read config file"),
    ] {
        let out = run(
            env!("CARGO_BIN_EXE_knockgate"),
            &[
                "keygen",
                "k1",
                "--dir",
                keys.to_str().unwrap(),
                "--config",
                config.to_str().unwrap(),
            ],
            &dir,
        );
        assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
        assert!(text(&out.stderr).contains(says), "{}", text(&out.stderr));
        assert!(
            text(&out.stdout).is_empty(),
            "no stanza with a guessed server id"
        );
        assert!(!keys.join("k1.key").exists(), "no key written");
    }
}

#[test]
fn keygen_names_a_host_given_by_ip_address_by_the_whole_address() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = example();
    for (address, stanza, command) in [
        (
            "10.203.9.1",
            "[hosts.\"10.203.9.1\"]",
            "knock 10.203.9.1 --wait",
        ),
        (
            "2001:db8::7",
            "[hosts.\"2001:db8::7\"]",
            "knock 2001:db8::7 --wait",
        ),
        ("web1.example.org", "[hosts.web1]", "knock web1 --wait"),
    ] {
        let keys = dir.path().join(address.replace(':', "_"));
        let out = run(
            env!("CARGO_BIN_EXE_knockgate"),
            &[
                "keygen",
                "k1",
                "--dir",
                keys.to_str().unwrap(),
                "--address",
                address,
                "--config",
                cfg.to_str().unwrap(),
            ],
            &dir,
        );
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        let printed = text(&out.stdout);
        assert!(printed.contains(stanza), "{address}: {printed}");
        assert!(printed.contains(command), "{address}: {printed}");
        // The printed client stanza is a config the client reads.
        let start = printed.find("[hosts.").unwrap();
        let file = dir.path().join("client.toml");
        std::fs::write(&file, &printed[start..]).unwrap();
        let client = knockgate::client::config::load(&file).unwrap();
        let name = command.split(' ').nth(1).unwrap();
        assert!(client.hosts.contains_key(name), "{printed}");
    }
}

#[test]
fn knockgate_takes_the_admin_socket_from_the_config_it_is_given() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("elsewhere.sock");
    let config = dir.path().join("k.toml");
    std::fs::write(
        &config,
        format!("[admin]\nsocket = \"{}\"\n", socket.display()),
    )
    .unwrap();
    let out = run(
        env!("CARGO_BIN_EXE_knockgate"),
        &["--config", config.to_str().unwrap(), "grants"],
        &dir,
    );
    assert_ne!(out.status.code(), Some(0));
    let said = text(&out.stderr);
    assert!(said.contains(socket.to_str().unwrap()), "{said}");
    assert!(!said.contains("/run/knockgate"), "{said}");
    // --socket still wins; a --config that cannot be read is an error (exit 2).
    let out = run(
        env!("CARGO_BIN_EXE_knockgate"),
        &["--config", "/nonexistent/k.toml", "grants"],
        &dir,
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
}

#[test]
fn knock_dry_run_and_save_packet_build_without_sending() {
    use knockgate::knock::auth::{ServerId, verify};
    use knockgate::knock::packet::decode;
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k.key");
    let hex = "ab".repeat(32);
    std::fs::write(&key, &hex).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    // A socket on the knock port: nothing may arrive on it.
    let receiver = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    receiver.set_nonblocking(true).unwrap();
    let server = receiver.local_addr().unwrap().to_string();
    let base = [
        "--server",
        server.as_str(),
        "--key-id",
        "alice",
        "--key-file",
        key.to_str().unwrap(),
        "--server-id",
        "web1",
        "--service",
        "ssh",
        "--service",
        "wireguard",
    ];
    let mut args = base.to_vec();
    args.push("--dry-run");
    let out = run(env!("CARGO_BIN_EXE_knock"), &args, &dir);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let printed = text(&out.stdout);
    assert!(
        printed.contains("would send 114 bytes to 127.0.0.1"),
        "{printed}"
    );
    assert!(printed.contains("would send 118 bytes"), "{printed}");
    assert!(
        printed.contains("service wireguard (id 0xefcb86de)"),
        "{printed}"
    );
    let saved = dir.path().join("knock.txt");
    let mut args = base.to_vec();
    args.extend(["--save-packet", saved.to_str().unwrap()]);
    let out = run(env!("CARGO_BIN_EXE_knock"), &args, &dir);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(receiver.recv(&mut [0u8; 256]).is_err(), "nothing was sent");
    // Each saved line is a whole knock that verifies with the key.
    let lines = std::fs::read_to_string(&saved).unwrap();
    let secret = knockgate::knock::Secret::from_hex(&hex).unwrap();
    let mut services = Vec::new();
    for line in lines.lines() {
        let words: Vec<&str> = line.split(' ').collect();
        assert_eq!(words.len(), 3, "{line}");
        assert_eq!(words[0], server);
        let bytes: Vec<u8> = (0..words[2].len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&words[2][i..i + 2], 16).unwrap())
            .collect();
        let decoded = decode(&bytes).unwrap();
        assert!(verify(
            &secret,
            &ServerId::new("web1").unwrap(),
            decoded.signed,
            decoded.mac
        ));
        assert_eq!(
            decoded.knock.service,
            knockgate::knock::ServiceId::of(words[1])
        );
        services.push(words[1].to_owned());
    }
    assert_eq!(services, ["ssh", "wireguard"]);
}

#[test]
fn egress_window_without_command_and_without_a_terminal_runs_no_shell() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_egress-window"))
        .args(["--socket", "/nonexistent.sock", "5m"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("not a terminal"),
        "{}",
        text(&out.stderr)
    );
    drop(dir);
}

#[test]
fn a_bad_service_definition_exits_2_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("k.toml");
    std::fs::write(
        &config,
        "[[services]]\nname = \"web\"\nprotocol = \"tcp\"\nport = 443\n",
    )
    .unwrap();
    let out = run(
        env!("CARGO_BIN_EXE_knockgate"),
        &["check", "--config", config.to_str().unwrap()],
        &dir,
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let said = text(&out.stderr);
    assert!(
        said.contains("services[0].port") && said.contains("public port 443"),
        "{said}"
    );
}

#[test]
fn import_fwknop_carries_over_what_it_can_and_names_the_rest() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let access = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fwknop-access.conf");
    let keys = dir.path().join("keys");
    let out = run(
        env!("CARGO_BIN_EXE_knockgate"),
        &[
            "import-fwknop",
            access.to_str().unwrap(),
            "--write-keys",
            keys.to_str().unwrap(),
            "--config",
            example().to_str().unwrap(),
        ],
        &dir,
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stanzas = text(&out.stdout);
    let said = text(&out.stderr);
    // Two stanzas imported; the GPG one and the one without an HMAC key named.
    assert_eq!(stanzas.matches("[[fwknop_keys]]").count(), 2, "{stanzas}");
    assert!(
        stanzas.contains("services = [\"ssh\", \"udp_51820\"]"),
        "{stanzas}"
    );
    assert!(
        stanzas.contains("name = \"udp_51820\"\nprotocol = \"udp\"\nport = 51820"),
        "{stanzas}"
    );
    assert!(
        stanzas.contains("require_source_address = true"),
        "{stanzas}"
    );
    assert!(
        stanzas.contains("sources = [\"198.51.100.0/24\", \"203.0.113.7\"]"),
        "{stanzas}"
    );
    for named in [
        "ENABLE_CMD_EXEC",
        "CMD_EXEC_USER",
        "FORCE_NAT",
        "REQUIRE_USERNAME",
        "no KEY_BASE64",
        "no HMAC key",
    ] {
        assert!(said.contains(named), "{named} is named:\n{said}");
    }
    assert!(!stanzas.contains("Bk5nxiS1"), "no key is printed");
    for name in ["fwknop-1", "fwknop-2"] {
        let file = keys.join(format!("{name}.fwknop"));
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{name}");
    }
    // What it printed is a config `knockgate check` accepts.
    let config = dir.path().join("k.toml");
    std::fs::write(
        &config,
        format!("[dns]\nresolvers = [\"192.0.2.53\"]\n{stanzas}"),
    )
    .unwrap();
    let check = run(
        env!("CARGO_BIN_EXE_knockgate"),
        &["check", "--config", config.to_str().unwrap()],
        &dir,
    );
    assert_eq!(
        check.status.code(),
        Some(0),
        "{}\n{stanzas}",
        text(&check.stderr)
    );
    // Never overwrites a key file.
    let again = run(
        env!("CARGO_BIN_EXE_knockgate"),
        &[
            "import-fwknop",
            access.to_str().unwrap(),
            "--write-keys",
            keys.to_str().unwrap(),
        ],
        &dir,
    );
    assert_ne!(again.status.code(), Some(0));
}

#[test]
fn two_fwknop_stanzas_with_one_hmac_key_are_refused_naming_both() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let keys =
        "KEY_BASE64 AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA=\nHMAC_KEY_BASE64 ZGVmZ2hp\n";
    for name in ["a", "b"] {
        let file = dir.path().join(format!("{name}.fwknop"));
        std::fs::write(&file, keys).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let config = dir.path().join("k.toml");
    let d = dir.path().display();
    std::fs::write(
        &config,
        format!("[[fwknop_keys]]\nname = \"office\"\nfile = \"{d}/a.fwknop\"\n[[fwknop_keys]]\nname = \"home\"\nfile = \"{d}/b.fwknop\"\n"),
    )
    .unwrap();
    let out = run(
        env!("CARGO_BIN_EXE_knockgate"),
        &["check", "--config", config.to_str().unwrap()],
        &dir,
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let said = text(&out.stderr);
    assert!(
        said.contains("fwknop_keys[1].file") && said.contains("`office`"),
        "{said}"
    );
}

#[test]
fn print_sequence_gives_knockds_arguments_and_keygen_sequence_both_configs() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = example();
    let out = run(
        env!("CARGO_BIN_EXE_knockgate"),
        &[
            "keygen",
            "phone",
            "--sequence",
            "--dir",
            dir.path().to_str().unwrap(),
            "--address",
            "198.51.100.1",
            "--config",
            cfg.to_str().unwrap(),
        ],
        &dir,
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let printed = text(&out.stdout);
    assert!(printed.contains("sequence = true"), "{printed}");
    assert!(printed.contains("NTP"), "a note on clocks: {printed}");
    assert!(printed.contains("--print-sequence"), "{printed}");
    let key = dir.path().join("phone.key");
    let hex = std::fs::read_to_string(&key).unwrap();
    let args = [
        "--server",
        "198.51.100.1",
        "--key-id",
        "phone",
        "--key-file",
        key.to_str().unwrap(),
        "--server-id",
        "web1",
        "--sequence-protocol",
        "mixed",
        "--print-sequence",
    ];
    let out = run(env!("CARGO_BIN_EXE_knock"), &args, &dir);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let printed = text(&out.stdout);
    let mut lines = printed.lines();
    let words: Vec<&str> = lines.next().unwrap().split(' ').collect();
    assert_eq!(words[0], "198.51.100.1");
    assert_eq!(words.len(), 5, "{printed}");
    assert!(
        lines.next().unwrap().starts_with("# valid for "),
        "{printed}"
    );
    // The same ports the library derives for this step (or the next, if it turned).
    let spec = knockgate::sequence::SequenceSpec {
        protocols: knockgate::sequence::TouchProtocols::Mixed,
        ..knockgate::sequence::SequenceSpec::default()
    };
    let secret = knockgate::knock::Secret::from_hex(&hex).unwrap();
    let server = knockgate::knock::auth::ServerId::new("web1").unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let step = spec.step_at(now);
    let expected: Vec<String> = [step, step.saturating_sub(1)]
        .iter()
        .map(|s| {
            knockgate::sequence::knockd_arguments(
                "198.51.100.1",
                &spec.derive(&secret, &server, *s).unwrap(),
            )
        })
        .collect();
    assert!(
        expected.contains(&words.join(" ")),
        "{printed} vs {expected:?}"
    );
    // A bad shape is refused before anything is sent.
    let mut bad = args.to_vec();
    bad.extend(["--sequence-length", "9"]);
    let out = run(env!("CARGO_BIN_EXE_knock"), &bad, &dir);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
}
