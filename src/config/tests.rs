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
    assert_eq!(entry.services, vec![crate::knock::Service::Ssh]);
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
fn meter_and_prefix_settings_are_bounded() {
    for (text, key) in [
        ("[knock]\nipv6_prefix = 129\n", "knock.ipv6_prefix"),
        ("[knock]\nipv6_prefix = 8\n", "knock.ipv6_prefix"),
        ("[knock]\nmeter_size = 0\n", "knock.meter_size"),
        ("[knock]\nmeter_size = 2000000\n", "knock.meter_size"),
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
