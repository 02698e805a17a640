//! Grant sets in the kernel: add, extend, remove, read back, carry across a
//! replace, and expiry by the kernel alone (root; CI runs these).

mod support;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use knockgate::config::Config;
use knockgate::firewall::Firewall;
use knockgate::firewall::nft::NftFirewall;
use knockgate::ruleset::baseline::{SSH_GRANTS_V4, SSH_GRANTS_V6};
use knockgate::ruleset::{Element, baseline};
use support::{Host, Lab, lab_available, sa, v4, v6};

fn with_fw<T: Send>(lab: &Lab, f: impl FnOnce(&mut NftFirewall) -> T + Send) -> T {
    lab.in_ns(Host::Server, || {
        f(&mut NftFirewall::open().expect("open netlink"))
    })
}

fn grant_set(addr: IpAddr) -> &'static str {
    if addr.is_ipv4() {
        SSH_GRANTS_V4
    } else {
        SSH_GRANTS_V6
    }
}

/// A lab whose server runs the default baseline (applied through the library, no
/// daemon) and an echo service on port 22.
fn lab_with_baseline() -> (Lab, support::EchoServer) {
    let lab = Lab::new();
    let ssh = lab.tcp_echo(Host::Server, "[::]:22".parse().unwrap());
    let resolvers = ["10.77.2.53".parse().unwrap()];
    with_fw(&lab, |fw| {
        fw.replace(&baseline(&Config::default(), &resolvers))
    })
    .unwrap();
    (lab, ssh)
}

#[test]
fn grants_open_extend_list_and_close() {
    if !lab_available("grants_open_extend_list_and_close") {
        return;
    }
    let (lab, _ssh) = lab_with_baseline();
    for plan in [v6(), v4()] {
        let (client, ssh) = (plan.client, sa(plan.server_from_client, 22));
        let set = grant_set(client);
        let other = plan.client_alt;
        assert!(
            !lab.tcp_works_from(Host::Client, client, ssh),
            "closed before the grant"
        );

        with_fw(&lab, |fw| {
            fw.add_element("knockgate", set, client.into(), Duration::from_secs(30))
        })
        .unwrap();
        assert!(
            lab.tcp_works_from(Host::Client, client, ssh),
            "open for the granted source"
        );
        assert!(
            !lab.tcp_works_from(Host::Client, other, ssh),
            "another source stays out"
        );

        // A second grant for the same source extends it, without a duplicate.
        with_fw(&lab, |fw| {
            fw.add_element("knockgate", set, client.into(), Duration::from_secs(600))
        })
        .unwrap();
        let listed = with_fw(&lab, |fw| fw.elements("knockgate", set)).unwrap();
        assert_eq!(listed.len(), 1, "one element per source: {listed:?}");
        let left = listed[0].expires_in.unwrap();
        assert!(
            left > Duration::from_secs(590) && left <= Duration::from_secs(600),
            "extended: {left:?}"
        );

        with_fw(&lab, |fw| {
            fw.remove_element("knockgate", set, client.into())
        })
        .unwrap();
        assert!(
            !lab.tcp_works_from(Host::Client, client, ssh),
            "closed after the revoke"
        );
        // Removing again is not an error.
        with_fw(&lab, |fw| {
            fw.remove_element("knockgate", set, client.into())
        })
        .unwrap();
        assert!(
            with_fw(&lab, |fw| fw.elements("knockgate", set))
                .unwrap()
                .is_empty()
        );
    }
}

#[test]
fn the_kernel_closes_a_grant_on_time() {
    if !lab_available("the_kernel_closes_a_grant_on_time") {
        return;
    }
    let (lab, _ssh) = lab_with_baseline();
    let ttl = Duration::from_secs(2);
    let granted = Instant::now();
    for plan in [v4(), v6()] {
        with_fw(&lab, |fw| {
            fw.add_element("knockgate", grant_set(plan.client), plan.client.into(), ttl)
        })
        .unwrap();
    }
    // No process of ours holds the firewall now: only the kernel can close it.
    for plan in [v4(), v6()] {
        assert!(lab.tcp_works_from(Host::Client, plan.client, sa(plan.server_from_client, 22)));
    }
    std::thread::sleep(
        (granted + ttl + Duration::from_millis(300)).saturating_duration_since(Instant::now()),
    );
    for plan in [v4(), v6()] {
        let ssh = sa(plan.server_from_client, 22);
        assert!(
            !lab.tcp_works_from(Host::Client, plan.client, ssh),
            "expired by the kernel"
        );
    }
}

#[test]
fn a_replace_carries_live_grants_with_their_remaining_time() {
    if !lab_available("a_replace_carries_live_grants_with_their_remaining_time") {
        return;
    }
    let lab = Lab::new();
    let _ssh = lab.tcp_echo(Host::Server, "[::]:22".parse().unwrap());
    let resolvers = ["10.77.2.53".parse().unwrap()];
    let mut ruleset = baseline(&Config::default(), &resolvers);
    with_fw(&lab, |fw| fw.replace(&ruleset)).unwrap();
    let four = v4();
    with_fw(&lab, |fw| {
        fw.add_element(
            "knockgate",
            SSH_GRANTS_V4,
            four.client.into(),
            Duration::from_secs(300),
        )
    })
    .unwrap();
    let live = with_fw(&lab, |fw| fw.elements("knockgate", SSH_GRANTS_V4)).unwrap();
    let set = ruleset
        .sets
        .iter_mut()
        .find(|s| s.name == SSH_GRANTS_V4)
        .unwrap();
    set.elements = live;
    with_fw(&lab, |fw| fw.replace(&ruleset)).unwrap();
    let after: Vec<Element> = with_fw(&lab, |fw| fw.elements("knockgate", SSH_GRANTS_V4)).unwrap();
    assert_eq!(after.len(), 1);
    assert_eq!(after[0].addr(), Some(four.client));
    let left = after[0].expires_in.unwrap();
    assert!(
        left <= Duration::from_secs(300) && left > Duration::from_secs(250),
        "{left:?}"
    );
    let ssh = sa(four.server_from_client, 22);
    assert!(
        lab.tcp_works_from(Host::Client, four.client, ssh),
        "still open after the replace"
    );
}

#[test]
fn a_keeping_replace_is_refused_if_anyone_committed_since_the_generation_it_vouches_for() {
    if !lab_available(
        "a_keeping_replace_is_refused_if_anyone_committed_since_the_generation_it_vouches_for",
    ) {
        return;
    }
    let lab = Lab::new();
    let resolvers = ["10.77.2.53".parse().unwrap()];
    let ruleset = baseline(&Config::default(), &resolvers);
    let keep = vec![SSH_GRANTS_V4.to_owned()];
    let client = v4().client;
    with_fw(&lab, |fw| {
        fw.replace(&ruleset).unwrap();
        fw.add_element(
            "knockgate",
            SSH_GRANTS_V4,
            client.into(),
            Duration::from_secs(600),
        )
        .unwrap();
        assert_eq!(fw.keepable(&ruleset, &[SSH_GRANTS_V4]).unwrap(), keep);
        // Only this firewall committed: the keeping replace goes through, the element stays.
        fw.replace_keeping(&ruleset, &keep).unwrap();
        assert_eq!(fw.elements("knockgate", SSH_GRANTS_V4).unwrap().len(), 1);
        // Another process adds an address to the grant set; this firewall has not
        // looked since.
        let out = std::process::Command::new("nft")
            .args([
                "add",
                "element",
                "inet",
                "knockgate",
                SSH_GRANTS_V4,
                "{ 10.77.1.99 timeout 1h }",
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        // The batch carries the generation it vouches for: the kernel refuses it whole.
        let refused = fw.replace_keeping(&ruleset, &keep);
        assert!(
            matches!(&refused, Err(knockgate::firewall::FirewallError::Refused { source, .. })
                if source.raw_os_error() == Some(85)),
            "ERESTART expected: {refused:?}"
        );
        assert_eq!(
            fw.elements("knockgate", SSH_GRANTS_V4).unwrap().len(),
            2,
            "nothing changed"
        );
        assert!(!fw.unchanged_since_own());
        // A whole replace takes the table back (the slipped-in address is gone).
        fw.replace(&ruleset).unwrap();
        assert!(fw.elements("knockgate", SSH_GRANTS_V4).unwrap().is_empty());
        assert!(fw.unchanged_since_own());
    });
}

#[test]
fn a_table_holding_what_knockgate_never_makes_is_not_kept() {
    if !lab_available("a_table_holding_what_knockgate_never_makes_is_not_kept") {
        return;
    }
    let lab = Lab::new();
    let resolvers = ["10.77.2.53".parse().unwrap()];
    let ruleset = baseline(&Config::default(), &resolvers);
    with_fw(&lab, |fw| fw.replace(&ruleset)).unwrap();
    lab.nft(&[
        "add",
        "quota",
        "inet",
        "knockgate",
        "q",
        "{ over 1 mbytes }",
    ]);
    let kept = with_fw(&lab, |fw| fw.keepable(&ruleset, &[SSH_GRANTS_V4])).unwrap();
    assert!(kept.is_empty(), "{kept:?}");
    let refused = with_fw(&lab, |fw| {
        fw.replace_keeping(&ruleset, &[SSH_GRANTS_V4.to_owned()])
    });
    assert!(refused.is_err(), "{refused:?}");
    // A whole replace clears it, and then the set may stay.
    with_fw(&lab, |fw| fw.replace(&ruleset)).unwrap();
    assert!(
        !lab.nft(&["list", "table", "inet", "knockgate"])
            .contains("quota")
    );
    let kept = with_fw(&lab, |fw| fw.keepable(&ruleset, &[SSH_GRANTS_V4])).unwrap();
    assert_eq!(kept, vec![SSH_GRANTS_V4.to_owned()]);
}
