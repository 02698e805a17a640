//! Egress sets in the kernel: outbound HTTP/HTTPS for the sockets of one cgroup (and
//! its children) only, or host-wide, each closed by removal or by the kernel's
//! timeout. Real processes in a real cgroup, real connections (root; CI runs these).

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use knockgate::cgroup::{WindowCgroup, cgroup2_root};
use knockgate::config::Config;
use knockgate::firewall::Firewall;
use knockgate::firewall::nft::NftFirewall;
use knockgate::ruleset::baseline::{EGRESS_CGROUPS, EGRESS_HOST};
use knockgate::ruleset::{ElementKey, baseline};
use support::{Host, Lab, lab_available, sa, v4, v6};

fn with_fw<T: Send>(lab: &Lab, f: impl FnOnce(&mut NftFirewall) -> T + Send) -> T {
    lab.in_ns(Host::Server, || {
        f(&mut NftFirewall::open().expect("open netlink"))
    })
}

/// Whether a TCP connection to `to` succeeds from a process in the server
/// namespace, started inside `cgroup` (or left where it is).
fn connects_from(lab: &Lab, cgroup: Option<&Path>, to: std::net::SocketAddr) -> bool {
    let netns = format!("/run/netns/{}", lab.ns(Host::Server));
    let target = match to.ip() {
        std::net::IpAddr::V4(a) => format!("{a}"),
        std::net::IpAddr::V6(a) => format!("{a}"),
    };
    let probe = format!("exec 3<>/dev/tcp/{target}/{}", to.port());
    // The shell joins the cgroup first, then enters the namespace and connects;
    // nsenter keeps the host's /sys (ip netns exec would remount it).
    let join = cgroup.map_or(String::new(), |c| {
        format!("echo $$ > {}/cgroup.procs && ", c.display())
    });
    let script = format!("{join}exec nsenter --net={netns} timeout 1 bash -c '{probe}'");
    Command::new("sh")
        .args(["-c", &script])
        .status()
        .expect("run sh")
        .success()
}

#[test]
fn a_window_cgroup_and_its_children_get_out_and_nothing_else_does() {
    if !lab_available("a_window_cgroup_and_its_children_get_out_and_nothing_else_does") {
        return;
    }
    let lab = Lab::new();
    let _mirrors: Vec<_> = [v4(), v6()]
        .iter()
        .flat_map(|p| [80, 443].map(|port| lab.tcp_echo(Host::Outside, sa(p.mirror, port))))
        .collect();
    let resolvers = ["10.77.2.53".parse().unwrap()];
    with_fw(&lab, |fw| {
        fw.replace(&baseline(&Config::default(), &resolvers))
    })
    .unwrap();
    let root = cgroup2_root().expect("cgroup2 is mounted on the test machines");
    let window =
        WindowCgroup::create(&root, &format!("knockgate-test-{}", lab.ns(Host::Server))).unwrap();
    let child = window.path().join("child");
    std::fs::create_dir(&child).unwrap();
    let mirror = sa(v4().mirror, 443);
    assert!(
        !connects_from(&lab, Some(window.path()), mirror),
        "closed before the window"
    );

    let key = ElementKey::Cgroup(window.id());
    with_fw(&lab, |fw| {
        fw.add_element("knockgate", EGRESS_CGROUPS, key, Duration::from_secs(30))
    })
    .unwrap();
    for plan in [v4(), v6()] {
        for port in [80, 443] {
            assert!(
                connects_from(&lab, Some(window.path()), sa(plan.mirror, port)),
                "the window's process gets out to {port}"
            );
        }
        assert!(
            connects_from(&lab, Some(&child), sa(plan.mirror, 443)),
            "so does a child cgroup"
        );
        assert!(
            !connects_from(&lab, None, sa(plan.mirror, 443)),
            "a process outside the window does not"
        );
    }
    assert!(
        !connects_from(&lab, Some(window.path()), sa(v4().mirror, 22)),
        "only the egress ports"
    );

    with_fw(&lab, |fw| {
        fw.remove_element("knockgate", EGRESS_CGROUPS, key)
    })
    .unwrap();
    assert!(
        !connects_from(&lab, Some(window.path()), mirror),
        "closed at once when removed"
    );

    // The kernel ends a window on time by itself.
    with_fw(&lab, |fw| {
        fw.add_element("knockgate", EGRESS_CGROUPS, key, Duration::from_secs(1))
    })
    .unwrap();
    assert!(connects_from(&lab, Some(window.path()), mirror));
    std::thread::sleep(Duration::from_millis(1300));
    assert!(
        !connects_from(&lab, Some(window.path()), mirror),
        "closed by the kernel's timeout"
    );
    std::fs::remove_dir(&child).unwrap();
}

#[test]
fn the_host_wide_switch_lets_everyone_out_until_it_ends() {
    if !lab_available("the_host_wide_switch_lets_everyone_out_until_it_ends") {
        return;
    }
    let lab = Lab::new();
    let _mirror = lab.tcp_echo(Host::Outside, sa(v4().mirror, 80));
    let resolvers = ["10.77.2.53".parse().unwrap()];
    with_fw(&lab, |fw| {
        fw.replace(&baseline(&Config::default(), &resolvers))
    })
    .unwrap();
    let mirror = sa(v4().mirror, 80);
    assert!(
        !lab.tcp_works(Host::Server, mirror),
        "closed before the window"
    );
    let tcp = ElementKey::Proto(6);
    with_fw(&lab, |fw| {
        fw.add_element("knockgate", EGRESS_HOST, tcp, Duration::from_secs(1))
    })
    .unwrap();
    assert!(
        lab.tcp_works(Host::Server, mirror),
        "any process gets out during a host-wide window"
    );
    std::thread::sleep(Duration::from_millis(1300));
    assert!(!lab.tcp_works(Host::Server, mirror), "and nobody after it");
}
