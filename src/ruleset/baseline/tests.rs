//! Config → Ruleset, without root: the golden text pins the whole default
//! baseline; the other tests pin what each config key changes.

use super::*;
use crate::config::{Config, Forward, OnStop, Outbound};

fn resolvers() -> Vec<IpAddr> {
    vec![
        "192.0.2.53".parse().unwrap(),
        "2001:db8::53".parse().unwrap(),
    ]
}

/// A rule admitting new connections, as `admit` writes it: `ct state new <m> ct mark set … accept`.
fn admitted(matches: &str) -> String {
    format!("ct state new {matches} ct mark set ct mark | 0x10000000 accept")
}

fn rules_text(ruleset: &Ruleset, hook: Hook) -> Vec<String> {
    ruleset
        .chain(hook)
        .unwrap()
        .rules
        .iter()
        .map(ToString::to_string)
        .collect()
}

#[test]
fn default_baseline_matches_the_golden_text() {
    let text = baseline(&Config::default(), &resolvers()).to_string();
    let golden = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/default.nft");
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&golden, &text).unwrap();
    }
    let want = std::fs::read_to_string(&golden).unwrap();
    assert_eq!(text, want, "rerun with UPDATE_GOLDEN=1 and review the diff");
}

#[test]
fn default_input_opens_web_and_keeps_ssh_for_grants() {
    let ruleset = baseline(&Config::default(), &resolvers());
    let input = ruleset.chain(Hook::Input).unwrap();
    assert_eq!(input.policy, Policy::Drop);
    let rules = rules_text(&ruleset, Hook::Input);
    assert_eq!(rules[0], "iifname \"lo\" accept");
    assert_eq!(rules[1], "ct state invalid drop");
    assert_eq!(
        rules[2],
        "ct state established,related ct mark & 0x10000000 == 0x10000000 accept"
    );
    assert!(rules.contains(&admitted("tcp dport 80")));
    assert!(rules.contains(&admitted("tcp dport 443")));
    assert!(rules.contains(&admitted("tcp dport 22 ip saddr @ssh_grants_v4")));
    assert!(rules.contains(&admitted("tcp dport 22 ip6 saddr @ssh_grants_v6")));
    // SSH never appears without a grant-set match.
    assert!(!rules.iter().any(|r| r.contains("tcp dport 22 ct")));
    // Knocks only reach a listening daemon: otherwise the port is silent like any other.
    assert!(
        rules
            .iter()
            .any(|r| r.starts_with("udp dport 62201 socket transparent 0 update @knock_sources_v4"))
    );
    assert!(
        rules
            .iter()
            .any(|r| r.starts_with("ct state new icmp type echo-request limit rate 10/second"))
    );
    assert!(rules.contains(&"icmpv6 type nd-neighbor-solicit accept".to_owned()));
}

#[test]
fn default_output_is_locked_except_dns_to_resolvers() {
    let ruleset = baseline(&Config::default(), &resolvers());
    assert_eq!(ruleset.chain(Hook::Output).unwrap().policy, Policy::Drop);
    let rules = rules_text(&ruleset, Hook::Output);
    for want in [
        admitted("ip daddr 192.0.2.53 udp dport 53"),
        admitted("ip daddr 192.0.2.53 tcp dport 53"),
        admitted("ip6 daddr 2001:db8::53 udp dport 53"),
        admitted("ip6 daddr 2001:db8::53 tcp dport 53"),
        "icmp type echo-reply accept".to_owned(),
        "icmpv6 type nd-neighbor-advert accept".to_owned(),
    ] {
        assert!(rules.contains(&want), "missing {want}: {rules:#?}");
    }
    // Web ports go out only through an egress window's set.
    assert!(
        rules
            .iter()
            .filter(|r| r.contains("dport 80") || r.contains("dport 443"))
            .all(|r| r.contains("@egress_")),
        "{rules:#?}"
    );
}

#[test]
fn no_resolvers_means_no_dns_out() {
    let ruleset = baseline(&Config::default(), &[]);
    assert!(
        !rules_text(&ruleset, Hook::Output)
            .iter()
            .any(|r| r.contains("dport 53"))
    );
}

#[test]
fn outbound_open_gives_an_accepting_output_chain() {
    let config = Config {
        outbound: Outbound::Open,
        ..Config::default()
    };
    let output = baseline(&config, &resolvers())
        .chain(Hook::Output)
        .cloned()
        .unwrap();
    assert_eq!(output.policy, Policy::Accept);
    // Only the mark for the host's own new connections, so their replies pass input.
    let rules: Vec<String> = output.rules.iter().map(ToString::to_string).collect();
    assert_eq!(
        rules,
        ["ct state new ct mark set ct mark | 0x10000000 accept"]
    );
}

#[test]
fn forward_leave_creates_no_forward_chain() {
    let config = Config {
        forward: Forward::Leave,
        ..Config::default()
    };
    let ruleset = baseline(&config, &resolvers());
    assert!(ruleset.chain(Hook::Forward).is_none());
    assert!(!ruleset.to_string().contains("hook forward"));
}

#[test]
fn forward_drop_is_the_default() {
    let ruleset = baseline(&Config::default(), &resolvers());
    assert_eq!(ruleset.chain(Hook::Forward).unwrap().policy, Policy::Drop);
}

#[test]
fn ports_and_knock_settings_follow_the_config() {
    let mut config = Config::default();
    config.inbound.tcp_ports = vec![8443];
    config.inbound.ssh_port = 2222;
    config.knock.port = 40000;
    config.knock.rate_per_second = 3;
    config.knock.burst = 7;
    let rules = rules_text(&baseline(&config, &resolvers()), Hook::Input);
    assert!(rules.contains(&admitted("tcp dport 8443")));
    assert!(
        !rules
            .iter()
            .any(|r| r.contains("dport 80 ") || r.contains("dport 443 "))
    );
    assert!(rules.contains(&admitted("tcp dport 2222 ip saddr @ssh_grants_v4")));
    assert!(rules.contains(
        &"udp dport 40000 socket transparent 0 update @knock_sources_v6 { ip6 saddr & ffff:ffff:ffff:ffff:: } update @knock_meter_v6 { ip6 saddr & ffff:ffff:ffff:ffff:: limit rate 3/second burst 7 packets } accept"
            .to_owned()
    ));
}

#[test]
fn ping_off_drops_echo_requests() {
    let mut config = Config::default();
    config.inbound.ping = false;
    let rules = rules_text(&baseline(&config, &resolvers()), Hook::Input);
    assert!(!rules.iter().any(|r| r.contains("echo-request")));
    // Neighbour discovery must stay, or IPv6 stops working altogether.
    assert!(rules.iter().any(|r| r.contains("nd-neighbor-solicit")));
}

#[test]
fn dropped_packets_are_logged_with_prefix_and_rate() {
    let mut config = Config::default();
    config.log.prefix = "kg".into();
    config.log.rate_per_minute = 3;
    let ruleset = baseline(&config, &resolvers());
    for (hook, chain) in [
        (Hook::Input, "input"),
        (Hook::Output, "output"),
        (Hook::Forward, "forward"),
    ] {
        let last = rules_text(&ruleset, hook).pop().unwrap();
        assert_eq!(
            last,
            format!("limit rate 3/minute log prefix \"kg {chain} drop: \"")
        );
    }
}

#[test]
fn logging_off_adds_no_log_rules() {
    let mut config = Config::default();
    config.log.dropped = false;
    assert!(
        !baseline(&config, &resolvers())
            .to_string()
            .contains("log prefix")
    );
}

#[test]
fn table_name_and_on_stop_do_not_change_the_rules() {
    let config = Config {
        table: "gate".into(),
        on_stop: OnStop::Remove,
        ..Config::default()
    };
    let ruleset = baseline(&config, &resolvers());
    assert_eq!(ruleset.table, "gate");
    assert_eq!(
        ruleset.chains,
        baseline(&Config::default(), &resolvers()).chains
    );
}

#[test]
fn grant_sets_carry_the_timeout_flag() {
    let ruleset = baseline(&Config::default(), &resolvers());
    for name in [SSH_GRANTS_V4, SSH_GRANTS_V6] {
        let set = ruleset.sets.iter().find(|s| s.name == name).unwrap();
        assert_eq!(set.kind, SetKind::Grants);
    }
}

#[test]
fn banned_knockers_are_dropped_before_the_meter() {
    let rules = rules_text(&baseline(&Config::default(), &resolvers()), Hook::Input);
    let ban = rules
        .iter()
        .position(|r| r == "udp dport 62201 ip saddr @knock_ban_v4 drop")
        .expect("ban rule");
    let meter = rules
        .iter()
        .position(|r| {
            r.starts_with("udp dport 62201 socket transparent 0 update @knock_sources_v4")
        })
        .unwrap();
    assert!(ban < meter);
    assert!(rules.contains(
        &"udp dport 62201 ip6 saddr & ffff:ffff:ffff:ffff:: == @knock_ban_v6 drop".to_owned()
    ));
}

#[test]
fn a_full_meter_leaves_new_sources_a_shared_rate_and_sources_over_theirs_are_dropped() {
    let mut config = Config::default();
    config.knock.full_meter_rate_per_second = 40;
    config.knock.ipv6_prefix = 56;
    let rules = rules_text(&baseline(&config, &resolvers()), Hook::Input);
    let at = |want: &str| {
        rules
            .iter()
            .position(|r| r == want)
            .unwrap_or_else(|| panic!("no `{want}` in {rules:#?}"))
    };
    let meter = at(
        "udp dport 62201 socket transparent 0 update @knock_sources_v6 { ip6 saddr & ffff:ffff:ffff:ff00:: } update @knock_meter_v6 { ip6 saddr & ffff:ffff:ffff:ff00:: limit rate 5/second burst 10 packets } accept",
    );
    let over = at("udp dport 62201 ip saddr @knock_sources_v4 drop");
    let over6 = at("udp dport 62201 ip6 saddr & ffff:ffff:ffff:ff00:: == @knock_sources_v6 drop");
    let shared =
        at("udp dport 62201 socket transparent 0 limit rate 40/second burst 40 packets accept");
    assert!(meter < over && over < over6 && over6 < shared);
    config.knock.ipv6_prefix = 128;
    let rules = rules_text(&baseline(&config, &resolvers()), Hook::Input);
    assert!(rules.contains(&"udp dport 62201 ip6 saddr @knock_sources_v6 drop".to_owned()));
}

#[test]
fn egress_windows_open_only_the_egress_ports_from_their_sets() {
    let ruleset = baseline(&Config::default(), &resolvers());
    let rules = rules_text(&ruleset, Hook::Output);
    for port in [80, 443] {
        for level in 1..=4 {
            let want = admitted(&format!(
                "tcp dport {port} socket cgroupv2 level {level} @egress_cgroups"
            ));
            assert!(rules.contains(&want), "missing {want}");
        }
        assert!(rules.contains(&admitted(&format!(
            "tcp dport {port} meta l4proto @egress_host"
        ))));
    }
    // Nothing but those ports, and nothing without a window set.
    assert!(!rules.iter().any(|r| r.contains("tcp dport 80 ct")));
    let sets: Vec<&str> = ruleset.sets.iter().map(|s| s.name.as_str()).collect();
    assert!(sets.contains(&"egress_cgroups") && sets.contains(&"egress_host"));
}

#[test]
fn egress_ports_follow_the_config() {
    let mut config = Config::default();
    config.egress.ports = vec![8443];
    let rules = rules_text(&baseline(&config, &resolvers()), Hook::Output);
    assert!(
        rules
            .iter()
            .any(|r| r.starts_with("ct state new tcp dport 8443 socket cgroupv2"))
    );
    assert!(!rules.iter().any(|r| r.contains("dport 443 ")));
}

#[test]
fn ban_off_means_no_ban_sets_or_rules() {
    let mut config = Config::default();
    config.knock.ban.enabled = false;
    let text = baseline(&config, &resolvers()).to_string();
    assert!(!text.contains("knock_ban"), "{text}");
}

#[test]
fn every_rule_that_admits_a_connection_marks_it_and_only_marked_ones_continue() {
    let config = Config {
        conntrack_mark: 0x0000_0100,
        ..Config::default()
    };
    let ruleset = baseline(&config, &resolvers());
    for hook in [Hook::Input, Hook::Output] {
        for rule in rules_text(&ruleset, hook) {
            if rule.starts_with("ct state established") {
                assert_eq!(
                    rule,
                    "ct state established,related ct mark & 0x00000100 == 0x00000100 accept"
                );
            } else if rule.starts_with("ct state new") {
                assert!(
                    rule.ends_with("ct mark set ct mark | 0x00000100 accept"),
                    "{rule}"
                );
            } else {
                // Everything else accepting is stateless (lo, ND, ICMP errors, knocks).
                assert!(!rule.contains("tcp dport 80 ") || rule.contains("ct state new"));
            }
        }
    }
}

/// The default config with a UDP service and a TCP range.
fn with_services() -> Config {
    use crate::config::{PortValue, Protocol, ServiceSpec};
    Config {
        services: vec![
            ServiceSpec {
                name: "wireguard".into(),
                protocol: Protocol::Udp,
                port: PortValue::Number(51820),
            },
            ServiceSpec {
                name: "staging".into(),
                protocol: Protocol::Tcp,
                port: PortValue::Text("8443-8445".into()),
            },
        ],
        ..Config::default()
    }
}

#[test]
fn services_match_the_golden_text() {
    let text = baseline(&with_services(), &resolvers()).to_string();
    let golden = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/services.nft");
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&golden, &text).unwrap();
    }
    let want = std::fs::read_to_string(&golden).unwrap();
    assert_eq!(text, want, "rerun with UPDATE_GOLDEN=1 and review the diff");
}

#[test]
fn each_service_opens_its_ports_for_its_own_grant_sets_only() {
    let ruleset = baseline(&with_services(), &resolvers());
    let input = rules_text(&ruleset, Hook::Input);
    for (matches, set) in [
        ("tcp dport 22", "ssh_grants_v4"),
        ("tcp dport 22", "ssh_grants_v6"),
        ("udp dport 51820", "wireguard_grants_v4"),
        ("udp dport 51820", "wireguard_grants_v6"),
        ("tcp dport 8443-8445", "staging_grants_v4"),
        ("tcp dport 8443-8445", "staging_grants_v6"),
    ] {
        let family = if set.ends_with("v4") { "ip" } else { "ip6" };
        let rule = admitted(&format!("{matches} {family} saddr @{set}"));
        assert!(input.contains(&rule), "missing: {rule}\n{input:#?}");
    }
    for set in ["wireguard_grants_v4", "staging_grants_v6"] {
        let def = ruleset.sets.iter().find(|s| s.name == set).unwrap();
        assert_eq!(def.kind, SetKind::Grants, "{set} has element timeouts");
    }
    // Nothing else mentions the service ports.
    let mentions = input.iter().filter(|r| r.contains("51820")).count();
    assert_eq!(mentions, 2);
}

/// Two keys with sequences (different TTLs: two classes), touches TCP or UDP.
fn with_sequences() -> Config {
    let key = crate::config::KeySpec::with_sequence;
    let mut c = Config {
        keys: vec![key("phone", 300), key("router", 60), key("tablet", 300)],
        ..Config::default()
    };
    c.sequence.protocol = "mixed".into();
    c
}

#[test]
fn sequences_match_the_golden_text() {
    let text = baseline(&with_sequences(), &resolvers()).to_string();
    let golden =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/sequences.nft");
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&golden, &text).unwrap();
    }
    let want = std::fs::read_to_string(&golden).unwrap();
    assert_eq!(text, want, "rerun with UPDATE_GOLDEN=1 and review the diff");
}

#[test]
fn sequence_rules_come_per_protocol_and_family_with_one_completion_rule_per_class() {
    let ruleset = baseline(&with_sequences(), &resolvers());
    let input = rules_text(&ruleset, Hook::Input);
    // Two classes (300 s, 60 s) + refused + next + start + reset, for tcp and udp, v4 and v6.
    let judged = input
        .iter()
        .filter(|r| r.contains("dport 30000-60999"))
        .count();
    assert_eq!(judged, (2 + 4) * 2 * 2);
    let completions: Vec<&String> = input
        .iter()
        .filter(|r| r.contains("add @ssh_grants_v4"))
        .collect();
    assert_eq!(completions.len(), 4, "{completions:#?}");
    assert!(completions.iter().any(|r| r.contains("timeout 300004ms")));
    assert!(completions.iter().any(|r| r.contains("timeout 60004ms")));
    // Judged after the knock port's rules, before the drop log.
    let knock = input
        .iter()
        .rposition(|r| r.contains("udp dport 62201"))
        .unwrap();
    let first = input
        .iter()
        .position(|r| r.contains("dport 30000-60999"))
        .unwrap();
    assert!(first > knock);
    // None of it without a key that has a sequence.
    let plain = baseline(&Config::default(), &resolvers());
    assert!(!plain.to_string().contains("seq_"));
}
