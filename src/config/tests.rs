//! Config errors, one test per mistake, each asserting the key is named.

use super::*;

fn load_text(text: &str) -> Result<Loaded, ConfigError> {
    load_env(text, &[])
}

fn load_env(text: &str, env: &[(&str, &str)]) -> Result<Loaded, ConfigError> {
    // Resolvers come from the environment so that no test depends on the host's resolv.conf.
    let env = [("KNOCKGATE_DNS__RESOLVERS", "192.0.2.53")]
        .iter()
        .chain(env)
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()));
    load_str(Path::new("/etc/knockgate/test.toml"), text, env)
}

fn error_text(text: &str) -> String {
    let err = load_text(text).expect_err("config should be refused");
    format!("{err}")
}

#[test]
fn empty_file_gives_the_hardened_web_server_defaults() {
    let loaded = load_text("").unwrap();
    let c = &loaded.config;
    assert_eq!(c.table, "knockgate");
    assert_eq!(c.inbound.tcp_ports, vec![80, 443]);
    assert_eq!(c.inbound.ssh_port, 22);
    assert_eq!(c.knock.port, 62201);
    assert_eq!(c.outbound, Outbound::Locked);
    assert_eq!(c.forward, Forward::Drop);
    assert_eq!(c.on_stop, OnStop::Keep);
    assert_eq!(c.tamper, Tamper::Lock);
    assert_eq!(
        loaded.resolvers,
        vec!["192.0.2.53".parse::<IpAddr>().unwrap()]
    );
}

#[test]
fn unknown_key_is_named_with_its_section() {
    let msg = error_text("[inbound]\ntcp_port = [80]\n");
    assert!(msg.contains("inbound.tcp_port"), "{msg}");
    assert!(msg.contains("/etc/knockgate/test.toml"), "{msg}");
}

#[test]
fn unknown_top_level_key_is_named() {
    let msg = error_text("outbund = \"open\"\n");
    assert!(msg.contains("`outbund`"), "{msg}");
}

#[test]
fn wrong_type_names_the_key() {
    let msg = error_text("[inbound]\nssh_port = \"twenty-two\"\n");
    assert!(msg.contains("inbound.ssh_port"), "{msg}");
}

#[test]
fn port_out_of_range_names_the_key() {
    let msg = error_text("[knock]\nport = 70000\n");
    assert!(msg.contains("knock.port"), "{msg}");
}

#[test]
fn wrong_enum_value_names_the_key() {
    let msg = error_text("outbound = \"closed\"\n");
    assert!(msg.contains("outbound"), "{msg}");
    assert!(msg.contains("locked"), "says what is expected: {msg}");
}

#[test]
fn port_zero_is_refused() {
    let msg = error_text("[inbound]\ntcp_ports = [80, 0]\n");
    assert!(msg.contains("inbound.tcp_ports[1]"), "{msg}");
    assert!(msg.contains("port 0"), "{msg}");
}

#[test]
fn ssh_port_zero_is_refused() {
    let msg = error_text("[inbound]\nssh_port = 0\n");
    assert!(msg.contains("inbound.ssh_port"), "{msg}");
}

#[test]
fn duplicate_port_is_refused() {
    let msg = error_text("[inbound]\ntcp_ports = [80, 443, 80]\n");
    assert!(msg.contains("inbound.tcp_ports[2]"), "{msg}");
    assert!(msg.contains("twice"), "{msg}");
}

#[test]
fn ssh_port_among_public_ports_is_refused() {
    let msg = error_text("[inbound]\ntcp_ports = [80, 22]\n");
    assert!(msg.contains("inbound.tcp_ports[1]"), "{msg}");
    assert!(msg.contains("SSH"), "{msg}");
}

#[test]
fn bad_resolver_address_is_refused() {
    let err = load_str(
        Path::new("k.toml"),
        "[dns]\nresolvers = [\"192.0.2.1\", \"10.0.0.300\"]\n",
        Vec::new(),
    )
    .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("dns.resolvers[1]"), "{msg}");
    assert!(msg.contains("10.0.0.300"), "{msg}");
}

#[test]
fn duplicate_resolver_is_refused() {
    let err = load_str(
        Path::new("k.toml"),
        "[dns]\nresolvers = [\"2001:db8::53\", \"2001:db8::53\"]\n",
        Vec::new(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("dns.resolvers[1]"), "{err}");
}

#[test]
fn bad_table_name_is_refused() {
    let msg = error_text("table = \"knock gate\"\n");
    assert!(msg.contains("`table`"), "{msg}");
}

#[test]
fn zero_rate_is_refused() {
    let msg = error_text("[log]\nrate_per_minute = 0\n");
    assert!(msg.contains("log.rate_per_minute"), "{msg}");
}

#[test]
fn log_prefix_with_quote_is_refused() {
    let msg = error_text("[log]\nprefix = \"a\\\"b\"\n");
    assert!(msg.contains("log.prefix"), "{msg}");
}

#[test]
fn toml_syntax_error_names_the_line() {
    let msg = error_text("[inbound\n");
    assert!(msg.contains("line"), "{msg}");
}

#[test]
fn missing_file_is_named() {
    let err = load(Path::new("/nonexistent/knockgate.toml")).unwrap_err();
    assert!(matches!(err, ConfigError::ReadFile { .. }));
    assert!(err.to_string().contains("/nonexistent/knockgate.toml"));
}

#[test]
fn environment_overrides_a_key() {
    let loaded = load_env(
        "",
        &[
            ("KNOCKGATE_INBOUND__SSH_PORT", "2222"),
            ("KNOCKGATE_INBOUND__TCP_PORTS", "443,8443"),
            ("KNOCKGATE_ON_STOP", "remove"),
            ("KNOCKGATE_TAMPER", "repair"),
        ],
    )
    .unwrap();
    assert_eq!(loaded.config.tamper, Tamper::Repair);
    assert_eq!(loaded.config.inbound.ssh_port, 2222);
    assert_eq!(loaded.config.inbound.tcp_ports, vec![443, 8443]);
    assert_eq!(loaded.config.on_stop, OnStop::Remove);
}

#[test]
fn environment_override_is_checked_too() {
    let err = load_env("", &[("KNOCKGATE_KNOCK__PORT", "0")]).unwrap_err();
    assert!(err.to_string().contains("knock.port"), "{err}");
}

#[test]
fn unrelated_environment_is_ignored() {
    assert!(load_env("", &[("HOME", "/root"), ("KNOCKGATEX", "1")]).is_ok());
}

#[test]
fn resolvers_default_to_resolv_conf() {
    let dir = tempfile::tempdir().unwrap();
    let resolv = dir.path().join("resolv.conf");
    std::fs::write(
        &resolv,
        "search lab\nnameserver 10.9.0.53\nnameserver fd00::53\n",
    )
    .unwrap();
    let text = format!("[dns]\nresolv_conf = \"{}\"\n", resolv.display());
    let loaded = load_str(Path::new("k.toml"), &text, Vec::new()).unwrap();
    let want: Vec<IpAddr> = vec!["10.9.0.53".parse().unwrap(), "fd00::53".parse().unwrap()];
    assert_eq!(loaded.resolvers, want);
}

#[test]
fn unreadable_resolv_conf_names_the_key() {
    let text = "[dns]\nresolv_conf = \"/nonexistent/resolv.conf\"\n";
    let err = load_str(Path::new("k.toml"), text, Vec::new()).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("dns.resolvers") && msg.contains("/nonexistent/resolv.conf"),
        "{msg}"
    );
}

#[test]
fn nameservers_skips_junk_and_duplicates() {
    let text = "# comment\nnameserver\nnameserver nope\nnameserver 192.0.2.1\n\
                nameserver 192.0.2.1\nnameserver fe80::1%eth0\noptions edns0\n";
    let want: Vec<IpAddr> = vec!["192.0.2.1".parse().unwrap(), "fe80::1".parse().unwrap()];
    assert_eq!(nameservers(text), want);
}

#[test]
fn example_config_is_valid_and_documents_the_defaults() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/knockgate.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    // Resolvers come from the host's resolv.conf in the example, so check parse + validate only.
    let config = parse(&path, &text, Vec::new()).unwrap();
    validate(&path, &config).unwrap();
    assert_eq!(
        config,
        Config::default(),
        "examples/knockgate.toml states every default"
    );
}

fn key_file(dir: &tempfile::TempDir, name: &str, mode: u32, text: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    path
}

fn keys_config(file: &Path, extra: &str) -> String {
    format!(
        "[[keys]]\nid = \"alice\"\nfile = \"{}\"\n{extra}",
        file.display()
    )
}

#[test]
fn durations_are_read_like_humans_write_them() {
    let loaded =
        load_text("[knock]\nskew = \"45s\"\nmax_ttl = \"2h\"\ndefault_ttl = \"10m\"\n").unwrap();
    assert_eq!(
        loaded.config.knock.skew.0,
        std::time::Duration::from_secs(45)
    );
    assert_eq!(
        loaded.config.knock.max_ttl.0,
        std::time::Duration::from_secs(7200)
    );
}

#[test]
fn bad_duration_names_the_key() {
    let msg = error_text("[knock]\nskew = \"soon\"\n");
    assert!(msg.contains("knock.skew") && msg.contains("30s"), "{msg}");
}

#[test]
fn default_ttl_over_max_ttl_is_refused() {
    let msg = error_text("[knock]\ndefault_ttl = \"2h\"\nmax_ttl = \"1h\"\n");
    assert!(msg.contains("knock.default_ttl"), "{msg}");
}

#[test]
fn server_id_defaults_to_the_host_name() {
    let loaded = load_text("").unwrap();
    let host = nix::unistd::gethostname().unwrap().into_string().unwrap();
    assert_eq!(loaded.server_id.as_str(), host);
    let named = load_text("[knock]\nserver_id = \"web1\"\n").unwrap();
    assert_eq!(named.server_id.as_str(), "web1");
}

#[test]
fn key_settings_are_checked() {
    let f = Path::new("/k");
    for (extra, key) in [
        ("services = [\"telnet\"]\n", "keys[0].services[0]"),
        ("sources = [\"10.0.0.0/33\"]\n", "keys[0].sources[0]"),
        ("max_ttl = \"0s\"\n", "keys[0].max_ttl"),
        ("colour = \"blue\"\n", "colour"),
    ] {
        let msg = error_text(&keys_config(f, extra));
        assert!(msg.contains(key), "{extra}: {msg}");
    }
    let msg = error_text("[[keys]]\nid = \"bad id\"\nfile = \"/k\"\n");
    assert!(msg.contains("keys[0].id"), "{msg}");
    let twice = format!("{}{}", keys_config(f, ""), keys_config(f, ""));
    assert!(error_text(&twice).contains("keys[1].id"));
}

#[test]
fn key_files_load_into_the_ring() {
    let dir = tempfile::tempdir().unwrap();
    let file = key_file(&dir, "alice.key", 0o600, &format!("{}\n", "0f".repeat(32)));
    let loaded = load_text(&keys_config(&file, "sources = [\"198.51.100.0/24\"]\n")).unwrap();
    let ring = load_keys(&loaded).unwrap();
    let entry = ring
        .get(&crate::knock::KeyId::new("alice").unwrap())
        .unwrap();
    assert_eq!(
        entry.sources,
        vec!["198.51.100.0/24".parse::<ipnet::IpNet>().unwrap()]
    );
    assert_eq!(entry.services, vec!["ssh".to_owned()]);
}

#[test]
fn key_file_readable_by_others_is_refused_and_named() {
    let dir = tempfile::tempdir().unwrap();
    let file = key_file(&dir, "alice.key", 0o640, &"0f".repeat(32));
    let loaded = load_text(&keys_config(&file, "")).unwrap();
    let msg = load_keys(&loaded).err().unwrap().to_string();
    assert!(
        msg.contains("keys[0].file") && msg.contains("alice.key") && msg.contains("0640"),
        "{msg}"
    );
}

#[test]
fn key_file_without_a_key_is_refused_without_printing_it() {
    let dir = tempfile::tempdir().unwrap();
    let file = key_file(&dir, "alice.key", 0o600, "secret-but-not-hex");
    let loaded = load_text(&keys_config(&file, "")).unwrap();
    let msg = load_keys(&loaded).err().unwrap().to_string();
    assert!(msg.contains("64 hex digits"), "{msg}");
    assert!(
        !msg.contains("secret-but-not-hex"),
        "the file's content is never printed: {msg}"
    );
}

#[test]
fn missing_key_file_is_named() {
    let loaded = load_text(&keys_config(Path::new("/nonexistent/alice.key"), "")).unwrap();
    let msg = load_keys(&loaded).err().unwrap().to_string();
    assert!(msg.contains("/nonexistent/alice.key"), "{msg}");
}

#[test]
fn meter_prefix_and_grant_settings_are_bounded() {
    for (text, key) in [
        ("[knock]\nipv6_prefix = 129\n", "knock.ipv6_prefix"),
        ("[knock]\nipv6_prefix = 8\n", "knock.ipv6_prefix"),
        ("[knock]\nmeter_size = 0\n", "knock.meter_size"),
        ("[knock]\nmeter_size = 2000000\n", "knock.meter_size"),
        ("[knock]\nmax_grants = 1999\n", "knock.max_grants"),
        ("[knock]\nmax_grants = 1000001\n", "knock.max_grants"),
        (
            "[knock]\nfull_meter_rate_per_second = 0\n",
            "knock.full_meter_rate_per_second",
        ),
    ] {
        let msg = error_text(text);
        assert!(msg.contains(key), "{text}: {msg}");
    }
}

/// Lines a config file might hold, with keys and values drawn at random.
fn config_like() -> impl proptest::strategy::Strategy<Value = String> {
    use proptest::prelude::*;
    let section = prop_oneof![
        Just(""),
        Just("[inbound]"),
        Just("[knock]"),
        Just("[knock.ban]"),
        Just("[dns]"),
        Just("[log]"),
        Just("[egress]"),
        Just("[admin]"),
        Just("[[keys]]"),
        Just("[x.y]"),
    ];
    let key = prop_oneof![
        Just("port"),
        Just("tcp_ports"),
        Just("ssh_port"),
        Just("skew"),
        Just("max_ttl"),
        Just("meter_size"),
        Just("max_grants"),
        Just("ipv6_prefix"),
        Just("after"),
        Just("max"),
        Just("id"),
        Just("file"),
        Just("services"),
        Just("sources"),
        Just("resolvers"),
        Just("table"),
        Just("outbound"),
        Just("conntrack_mark"),
        Just("prefix"),
        Just("ports"),
    ];
    let value = prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        Just("18446744073709551616".to_owned()),
        "\\PC{0,24}".prop_map(|s| format!("{s:?}")),
        Just("[1, 0, 65536]".to_owned()),
        Just("[\"10.0.0.300\", \"::1\"]".to_owned()),
        Just("\"99999999999999h\"".to_owned()),
        Just("{ a = 1 }".to_owned()),
        Just("true".to_owned()),
    ];
    proptest::collection::vec((section, key, value), 0..8).prop_map(|lines| {
        let lines: Vec<String> = lines
            .into_iter()
            .map(|(s, k, v)| format!("{s}\n{k} = {v}\n"))
            .collect();
        lines.concat()
    })
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(1024))]

    /// The loader never panics: any text gives a config or an error naming the file.
    #[test]
    fn loading_never_panics_on_any_text(text in "\\PC{0,400}") {
        if let Err(e) = load_str(Path::new("k.toml"), &text, Vec::new()) {
            proptest::prop_assert!(e.to_string().contains("k.toml"), "{}", e);
        }
    }

    #[test]
    fn loading_never_panics_on_config_like_text(text in config_like()) {
        if let Err(e) = load_str(Path::new("k.toml"), &text, Vec::new()) {
            proptest::prop_assert!(e.to_string().contains("k.toml"), "{}", e);
        }
    }
}

const SERVICES: &str = r#"
[[services]]
name = "wireguard"
protocol = "udp"
port = 51820

[[services]]
name = "staging"
protocol = "tcp"
port = "8443-8445"

[[keys]]
id = "alice"
file = "/nonexistent"
services = ["ssh", "wireguard", "egress"]
"#;

#[test]
fn services_are_read_with_ports_and_ranges() {
    let loaded = load_text(SERVICES).unwrap();
    let services = crate::service::port_services(&loaded.config);
    let described: Vec<String> = services
        .iter()
        .map(|s| format!("{} {} {}", s.name, s.protocol.name(), s.ports))
        .collect();
    assert_eq!(
        described,
        ["ssh tcp 22", "wireguard udp 51820", "staging tcp 8443-8445"]
    );
}

#[test]
fn bad_services_are_refused_naming_the_key() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "[[services]]\nname = \"vpn\"\nprotocol = \"sctp\"\nport = 1",
            // The parser's own key path (`services[0]protocol`).
            "services[0]",
            "expected one of: \"tcp\", \"udp\"",
        ),
        (
            "[[services]]\nname = \"vpn\"\nprotocol = \"udp\"\nport = 0",
            "services[0].port",
            "port 0",
        ),
        (
            "[[services]]\nname = \"vpn\"\nprotocol = \"udp\"\nport = 70000",
            "services[0].port",
            "1 to 65535",
        ),
        (
            "[[services]]\nname = \"vpn\"\nprotocol = \"udp\"\nport = \"9-3\"",
            "services[0].port",
            "ends before it starts",
        ),
        (
            "[[services]]\nname = \"web\"\nprotocol = \"tcp\"\nport = \"440-450\"",
            "services[0].port",
            "public port 443",
        ),
        (
            "[[services]]\nname = \"k\"\nprotocol = \"udp\"\nport = 62201",
            "services[0].port",
            "knock port",
        ),
        (
            "[[services]]\nname = \"alt\"\nprotocol = \"tcp\"\nport = 22",
            "services[0].port",
            "service `ssh`",
        ),
        (
            "[[services]]\nname = \"a\"\nprotocol = \"tcp\"\nport = \"8000-8010\"\n[[services]]\nname = \"b\"\nprotocol = \"tcp\"\nport = 8010",
            "services[1].port",
            "service `a`",
        ),
        (
            "[[services]]\nname = \"a\"\nprotocol = \"tcp\"\nport = 8000\n[[services]]\nname = \"a\"\nprotocol = \"udp\"\nport = 9000",
            "services[1].name",
            "defined twice",
        ),
        (
            "[[services]]\nname = \"ssh\"\nprotocol = \"tcp\"\nport = 2222",
            "services[0].name",
            "built in",
        ),
        (
            "[[services]]\nname = \"Wire-Guard\"\nprotocol = \"udp\"\nport = 51820",
            "services[0].name",
            "not a service name",
        ),
        (
            "[[keys]]\nid = \"alice\"\nfile = \"/k\"\nservices = [\"ssh\", \"postgres\"]",
            "keys[0].services[1]",
            "unknown service `postgres`",
        ),
        (
            "[[keys]]\nid = \"alice\"\nfile = \"/k\"\nservices = [\"ssh\", \"ssh\"]",
            "keys[0].services[1]",
            "listed twice",
        ),
        (
            "outbound = \"open\"\n[[keys]]\nid = \"alice\"\nfile = \"/k\"\nservices = [\"egress\"]",
            "keys[0].services[0]",
            "outbound",
        ),
    ];
    for (text, key, words) in cases {
        let err = error_text(text);
        assert!(err.contains(key), "{text}\n→ {err}\n(should name {key})");
        assert!(err.contains(words), "{text}\n→ {err}\n(should say {words})");
    }
    // Same port, other protocol: no overlap.
    load_text("[[services]]\nname = \"dns_udp\"\nprotocol = \"udp\"\nport = 443").unwrap();
}

#[test]
fn bad_fwknop_stanzas_are_refused_naming_the_key() {
    let stanza = |extra: &str| {
        format!(
            "[[keys]]\nid = \"alice\"\nfile = \"/k\"\n[[fwknop_keys]]\nname = \"phone\"\nfile = \"/f\"\n{extra}"
        )
    };
    let cases: &[(&str, &str, &str)] = &[
        (
            "hmac_digest = \"md5\"",
            "fwknop_keys[0].hmac_digest",
            "sha256",
        ),
        (
            "services = [\"egress\"]",
            "fwknop_keys[0].services[0]",
            "not egress",
        ),
        (
            "services = [\"postgres\"]",
            "fwknop_keys[0].services[0]",
            "unknown service",
        ),
        (
            "sources = [\"nowhere\"]",
            "fwknop_keys[0].sources[0]",
            "not an address",
        ),
        ("ttl = \"0s\"", "fwknop_keys[0].ttl", "from 1s"),
        ("max_grants = 0", "fwknop_keys[0].max_grants", "1 to"),
    ];
    for (extra, key, words) in cases {
        let err = error_text(&stanza(extra));
        assert!(err.contains(key) && err.contains(words), "{extra}\n→ {err}");
    }
    let same_name = "[[keys]]\nid = \"phone\"\nfile = \"/k\"\n[[fwknop_keys]]\nname = \"phone\"\nfile = \"/f\"\n";
    assert!(error_text(same_name).contains("fwknop_keys[0].name"));
    let bad_name = "[[fwknop_keys]]\nname = \"a b\"\nfile = \"/f\"\n";
    assert!(error_text(bad_name).contains("fwknop_keys[0].name"));
    let loaded = load_text(&stanza("")).unwrap();
    let spec = &loaded.config.fwknop_keys[0];
    assert!(spec.require_source_address && !spec.other_source);
    assert_eq!(spec.ttl.0, std::time::Duration::from_secs(30));
}

const SEQ_KEY: &str =
    "[[keys]]\nid = \"phone\"\nfile = \"/etc/knockgate/keys/phone.key\"\nsequence = true\n";

#[test]
fn sequences_default_to_the_documented_shape() {
    let loaded = load_text(SEQ_KEY).unwrap();
    let spec = loaded.config.sequence_spec().unwrap();
    assert_eq!(spec, crate::sequence::SequenceSpec::default());
    assert_eq!(sequence_service(&loaded.config.keys[0]), "ssh");
    assert_eq!(
        sequence_ttl(&loaded.config, &loaded.config.keys[0]),
        loaded.config.knock.default_ttl.0
    );
    // No key with a sequence: nothing of it in the ruleset.
    assert!(load_text("").unwrap().config.sequence_spec().is_none());
}

#[test]
fn a_sequence_of_exactly_forty_bits_is_enough() {
    // 4 touches of 1,024 TCP ports: 2^40 sequences, the least allowed.
    let text = format!("[sequence]\nports = \"40000-41023\"\nprotocol = \"tcp\"\n{SEQ_KEY}");
    assert!(load_text(&text).is_ok(), "{}", error_text(&text));
    // 8 touches of 121,954 (mixed over 60,977 ports): more sequences than a u128
    // counts, which is plenty, not an overflow.
    let text = format!("[sequence]\nports = \"1024-62000\"\nlength = 8\n{SEQ_KEY}");
    assert!(load_text(&text).is_ok(), "{}", error_text(&text));
}

#[test]
fn bad_sequences_are_refused_naming_the_key() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "[sequence]\nports = \"1-2000\"\n",
            "sequence.ports",
            "public port 80",
        ),
        (
            "[sequence]\nports = \"40000-40100\"\n",
            "sequence.ports",
            "at least 1024",
        ),
        (
            "[sequence]\nports = \"62000-63500\"\nprotocol = \"udp\"\n",
            "sequence.ports",
            "knock port",
        ),
        (
            "[sequence]\nprotocol = \"icmp\"\n",
            "sequence.protocol",
            "mixed",
        ),
        ("[sequence]\nlength = 2\n", "sequence.length", "3 to 8"),
        (
            "[sequence]\nports = \"40000-41023\"\nlength = 3\nprotocol = \"tcp\"\n",
            "sequence.length",
            "3 touches of 1024 ports are 30 bits; at least 40",
        ),
        ("[sequence]\nlength = 9\n", "sequence.length", "3 to 8"),
        ("[sequence]\nstep = \"1s\"\n", "sequence.step", "2s to 1h"),
        (
            "[sequence]\nstep = \"2500ms\"\n",
            "sequence.step",
            "whole seconds",
        ),
        (
            "[sequence]\nmax_sources = 0\n",
            "sequence.max_sources",
            "16 to",
        ),
        (
            "[[services]]\nname = \"db\"\nprotocol = \"tcp\"\nport = 45000\n",
            "sequence.ports",
            "service `db`",
        ),
        (
            "sources = [\"10.0.0.0/8\"]\n",
            "keys[0].sequence",
            "sources",
        ),
        ("sources = [\"0.0.0.0/0\"]\n", "keys[0].sequence", "sources"),
        (
            "services = [\"ssh\", \"egress\"]\nsequence_service = \"egress\"\n",
            "keys[0].sequence_service",
            "egress cannot",
        ),
        (
            "sequence_service = \"wireguard\"\n",
            "keys[0].sequence_service",
            "not one of this key's services",
        ),
        ("sequence_ttl = \"2d\"\n", "keys[0].sequence_ttl", "1s to"),
    ];
    for (extra, key, expected) in cases {
        // Key fields go after the key's table header; sections before it.
        let text = if extra.starts_with('[') {
            format!("{extra}{SEQ_KEY}")
        } else {
            format!("{SEQ_KEY}{extra}")
        };
        let msg = error_text(&text);
        assert!(msg.contains(key), "{text}\n→ {msg}");
        assert!(msg.contains(expected), "{text}\n→ {msg}");
    }
    let off = "[[keys]]\nid = \"phone\"\nfile = \"/k\"\nsequence_ttl = \"1m\"\n";
    let msg = error_text(off);
    assert!(
        msg.contains("keys[0].sequence") && msg.contains("sequence = true"),
        "{msg}"
    );
}
