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
        ],
    )
    .unwrap();
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
