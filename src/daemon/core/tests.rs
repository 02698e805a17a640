//! The knock handler with the in-memory firewall and a chosen source address:
//! every refusal of the acceptance list, binding, capping, bans, replays across a
//! restart. No sockets, no root.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use super::*;
use crate::config::Config;
use crate::firewall::memory::MemoryFirewall;
use crate::knock::auth::seal;
use crate::knock::{AddressClaim, Knock, Secret};
use crate::policy::KeyEntry;
use crate::ruleset::baseline;
use crate::ruleset::baseline::{SSH_GRANTS_V4, SSH_GRANTS_V6};

const NOW: u64 = 1_790_000_000;

fn secret() -> Secret {
    Secret::from_hex(&"5a".repeat(32)).unwrap()
}

fn server() -> ServerId {
    ServerId::new("web1").unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

struct Fixture {
    dir: tempfile::TempDir,
    core: Core<MemoryFirewall>,
}

fn keys() -> KeyRing {
    let mut ring = KeyRing::default();
    // Most keys here allow unbound knocks (the tests knock "for the packet's
    // source"); `bound` requires the knock to name its address, as keygen's keys do.
    let entry = |services: Vec<&str>, other_source| KeyEntry {
        secret: secret(),
        services: services.into_iter().map(str::to_owned).collect(),
        sources: vec!["0.0.0.0/0".parse().unwrap(), "::/0".parse().unwrap()],
        max_ttl: Some(Duration::from_secs(1800)),
        other_source,
        unbound: true,
        max_grants: 64,
    };
    ring.insert(
        KeyId::new("two").unwrap(),
        KeyEntry {
            max_grants: 2,
            ..entry(vec!["ssh"], false)
        },
    );
    ring.insert(
        KeyId::new("bound").unwrap(),
        KeyEntry {
            unbound: false,
            ..entry(vec!["ssh"], false)
        },
    );
    ring.insert(KeyId::new("alice").unwrap(), entry(vec!["ssh"], false));
    ring.insert(KeyId::new("nat").unwrap(), entry(vec!["ssh"], true));
    ring.insert(KeyId::new("no-ssh").unwrap(), entry(vec![], false));
    ring.insert(
        KeyId::new("multi").unwrap(),
        entry(vec!["ssh", "wireguard", "web", "egress"], false),
    );
    ring
}

/// The default config with two services: `wireguard` (udp 51820) and `web` (tcp
/// 8000-8010).
fn config() -> Config {
    use crate::config::{PortValue, Protocol, ServiceSpec};
    Config {
        services: vec![
            ServiceSpec {
                name: "wireguard".into(),
                protocol: Protocol::Udp,
                port: PortValue::Number(51820),
            },
            ServiceSpec {
                name: "web".into(),
                protocol: Protocol::Tcp,
                port: PortValue::Text("8000-8010".into()),
            },
        ],
        ..Config::default()
    }
}

fn settings(dir: &std::path::Path, config: &Config) -> Settings {
    Settings {
        table: "knockgate".into(),
        server_id: server(),
        skew: Duration::from_secs(30),
        limits: Limits {
            default_ttl: Duration::from_secs(900),
            max_ttl: Duration::from_secs(3600),
        },
        ban: Some((3, Duration::from_secs(60), Duration::from_secs(600))),
        ipv6_prefix: 64,
        book_path: dir.join(BOOK_FILE),
        egress_max_ttl: Duration::from_secs(600),
        services: crate::service::port_services(config),
        egress_service: true,
        max_grants: usize::try_from(config.knock.max_grants).unwrap(),
    }
}

fn core_in(dir: &std::path::Path, now: u64) -> Core<MemoryFirewall> {
    let mut fw = MemoryFirewall::default();
    let config = config();
    fw.replace(&baseline(&config, &[])).unwrap();
    let settings = settings(dir, &config);
    let replay = ReplayLog::open(dir, REPLAY_CAPACITY, now).unwrap();
    Core::new(fw, settings, keys(), replay, GrantBook::default())
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let core = core_in(dir.path(), NOW);
    Fixture { dir, core }
}

fn knock_bytes(key: &str, ts: u64, ttl: u32, address: AddressClaim, nonce: u8) -> Vec<u8> {
    knock_for("ssh", key, ts, ttl, address, nonce)
}

fn knock_for(
    service: &str,
    key: &str,
    ts: u64,
    ttl: u32,
    address: AddressClaim,
    nonce: u8,
) -> Vec<u8> {
    let k = Knock {
        key_id: KeyId::new(key).unwrap(),
        service: crate::knock::ServiceId::of(service),
        timestamp: ts,
        nonce: [nonce; 16],
        ttl_secs: ttl,
        address,
    };
    seal(&k, &secret(), &server())
}

fn elements(core: &mut Core<MemoryFirewall>, set: &str) -> Vec<IpAddr> {
    core.firewall
        .elements("knockgate", set)
        .unwrap()
        .iter()
        .filter_map(crate::ruleset::Element::addr)
        .collect()
}

fn refusal(outcome: KnockOutcome) -> KnockRefusal {
    match outcome {
        KnockOutcome::Refused { reason, .. } => reason,
        KnockOutcome::Granted { record, .. } => panic!("granted {record:?}"),
        KnockOutcome::Window { window, .. } => panic!("window {window:?}"),
    }
}

#[test]
fn a_valid_knock_opens_ssh_for_its_source_only() {
    let mut f = fixture();
    let outcome = f.core.knock(
        &knock_bytes("alice", NOW, 0, AddressClaim::PacketSource, 1),
        ip("198.51.100.7"),
        UnixMs::from_secs(NOW),
    );
    let KnockOutcome::Granted {
        record,
        kind,
        capped,
        bound,
        ..
    } = outcome
    else {
        panic!("{outcome:?}")
    };
    assert_eq!(
        (record.address, kind, capped, bound),
        (ip("198.51.100.7"), Granted::New, false, false)
    );
    assert_eq!(record.expires_at, NOW + 900, "default ttl");
    assert_eq!(record.who, "key alice");
    assert_eq!(
        elements(&mut f.core, SSH_GRANTS_V4),
        vec![ip("198.51.100.7")]
    );
    assert!(elements(&mut f.core, SSH_GRANTS_V6).is_empty());
}

#[test]
fn ipv6_and_mapped_sources_land_in_the_right_set() {
    let mut f = fixture();
    f.core.knock(
        &knock_bytes("alice", NOW, 60, AddressClaim::PacketSource, 1),
        ip("2001:db8::7"),
        UnixMs::from_secs(NOW),
    );
    f.core.knock(
        &knock_bytes("alice", NOW, 60, AddressClaim::PacketSource, 2),
        ip("::ffff:192.0.2.9"),
        UnixMs::from_secs(NOW),
    );
    assert_eq!(
        elements(&mut f.core, SSH_GRANTS_V6),
        vec![ip("2001:db8::7")]
    );
    assert_eq!(elements(&mut f.core, SSH_GRANTS_V4), vec![ip("192.0.2.9")]);
}

#[test]
fn a_replay_opens_nothing_also_after_a_restart() {
    let mut f = fixture();
    let bytes = knock_bytes("alice", NOW, 60, AddressClaim::PacketSource, 1);
    assert!(matches!(
        f.core
            .knock(&bytes, ip("198.51.100.7"), UnixMs::from_secs(NOW)),
        KnockOutcome::Granted { .. }
    ));
    let r = refusal(
        f.core
            .knock(&bytes, ip("198.51.100.7"), UnixMs::from_secs(NOW + 1)),
    );
    assert!(
        matches!(r, KnockRefusal::Replay(_, ReplayError::Replayed)),
        "{r}"
    );
    // A new daemon on the same state directory still knows the nonce.
    let mut restarted = core_in(f.dir.path(), NOW + 2);
    let r = refusal(restarted.knock(&bytes, ip("198.51.100.7"), UnixMs::from_secs(NOW + 2)));
    assert!(
        matches!(r, KnockRefusal::Replay(_, ReplayError::Replayed)),
        "{r}"
    );
}

#[test]
fn stale_forged_unknown_and_malformed_knocks_open_nothing() {
    let mut f = fixture();
    let src = ip("198.51.100.7");
    let stale = knock_bytes("alice", NOW - 120, 60, AddressClaim::PacketSource, 1);
    assert!(matches!(
        refusal(f.core.knock(&stale, src, UnixMs::from_secs(NOW))),
        KnockRefusal::Auth(Refusal::Clock {
            skew_secs: -120,
            ..
        })
    ));
    let mut forged = knock_bytes("alice", NOW, 60, AddressClaim::PacketSource, 2);
    forged[100] ^= 1;
    assert!(matches!(
        refusal(f.core.knock(&forged, src, UnixMs::from_secs(NOW))),
        KnockRefusal::Auth(Refusal::BadMac(_))
    ));
    let unknown = knock_bytes("mallory", NOW, 60, AddressClaim::PacketSource, 3);
    assert!(matches!(
        refusal(f.core.knock(&unknown, src, UnixMs::from_secs(NOW))),
        KnockRefusal::Auth(Refusal::UnknownKey(_))
    ));
    assert!(matches!(
        refusal(f.core.knock(b"hello", src, UnixMs::from_secs(NOW))),
        KnockRefusal::Auth(Refusal::Shape(_))
    ));
    assert!(elements(&mut f.core, SSH_GRANTS_V4).is_empty());
}

#[test]
fn a_key_without_ssh_opens_nothing() {
    let mut f = fixture();
    let bytes = knock_bytes("no-ssh", NOW, 60, AddressClaim::PacketSource, 1);
    let r = refusal(
        f.core
            .knock(&bytes, ip("198.51.100.7"), UnixMs::from_secs(NOW)),
    );
    assert!(
        matches!(r, KnockRefusal::Policy(_, PolicyRefusal::Service(_))),
        "{r}"
    );
}

#[test]
fn a_ttl_over_the_cap_is_capped() {
    let mut f = fixture();
    let bytes = knock_bytes("alice", NOW, 86_400, AddressClaim::PacketSource, 1);
    let KnockOutcome::Granted { record, capped, .. } =
        f.core
            .knock(&bytes, ip("198.51.100.7"), UnixMs::from_secs(NOW))
    else {
        panic!()
    };
    assert!(capped);
    assert_eq!(
        record.expires_at,
        NOW + 1800,
        "the key's cap (under the server's)"
    );
}

#[test]
fn a_knock_bound_to_another_address_is_refused_unless_the_key_allows_nat() {
    let mut f = fixture();
    let claim = AddressClaim::V4(Ipv4Addr::new(198, 51, 100, 7));
    let r = refusal(f.core.knock(
        &knock_bytes("alice", NOW, 60, claim, 1),
        ip("203.0.113.66"),
        UnixMs::from_secs(NOW),
    ));
    assert!(
        matches!(
            r,
            KnockRefusal::Policy(_, PolicyRefusal::OtherSource { .. })
        ),
        "{r}"
    );
    let ok = f.core.knock(
        &knock_bytes("nat", NOW, 60, claim, 2),
        ip("203.0.113.66"),
        UnixMs::from_secs(NOW),
    );
    let KnockOutcome::Granted { record, .. } = ok else {
        panic!("{ok:?}")
    };
    assert_eq!(record.address, ip("198.51.100.7"));
}

#[test]
fn an_unbound_knock_is_refused_when_the_key_requires_binding() {
    let mut f = fixture();
    let src = ip("198.51.100.7");
    let outcome = f.core.knock(
        &knock_bytes("bound", NOW, 60, AddressClaim::PacketSource, 1),
        src,
        UnixMs::from_secs(NOW),
    );
    let KnockOutcome::Refused { reason, banned } = outcome else {
        panic!("{outcome:?}")
    };
    assert!(
        matches!(reason, KnockRefusal::Policy(_, PolicyRefusal::Unbound)),
        "{reason}"
    );
    assert!(
        reason.to_string().contains("allow_unbound = false"),
        "{reason}"
    );
    assert!(!banned);
    assert!(elements(&mut f.core, SSH_GRANTS_V4).is_empty());
    // Bound to its own source, the same key opens.
    let claim = AddressClaim::V4(Ipv4Addr::new(198, 51, 100, 7));
    let ok = f.core.knock(
        &knock_bytes("bound", NOW, 60, claim, 2),
        src,
        UnixMs::from_secs(NOW),
    );
    assert!(
        matches!(ok, KnockOutcome::Granted { bound: true, .. }),
        "{ok:?}"
    );
}

#[test]
fn a_bound_knock_raced_from_another_address_opens_nothing_and_its_owner_still_gets_in() {
    let mut f = fixture();
    let laptop = ip("198.51.100.7");
    let intruder = ip("203.0.113.66");
    let bytes = knock_bytes(
        "bound",
        NOW,
        60,
        AddressClaim::V4(Ipv4Addr::new(198, 51, 100, 7)),
        1,
    );
    // The intruder sends the captured datagram first, many times: it is refused as
    // bound to another address, takes no room in the replay guard, and bans no one.
    for _ in 0..10 {
        let r = f.core.knock(&bytes, intruder, UnixMs::from_secs(NOW));
        assert!(
            matches!(
                r,
                KnockOutcome::Refused {
                    reason: KnockRefusal::Policy(_, PolicyRefusal::OtherSource { .. }),
                    banned: false
                }
            ),
            "{r:?}"
        );
    }
    assert!(elements(&mut f.core, SSH_GRANTS_V4).is_empty());
    assert!(elements(&mut f.core, KNOCK_BAN_V4).is_empty());
    // The laptop's own copy, arriving after, opens for the laptop.
    assert!(matches!(
        f.core.knock(&bytes, laptop, UnixMs::from_secs(NOW + 1)),
        KnockOutcome::Granted { .. }
    ));
    assert_eq!(elements(&mut f.core, SSH_GRANTS_V4), vec![laptop]);
}

#[test]
fn a_key_holds_at_most_its_max_grants_and_a_refused_knock_can_come_again() {
    let mut f = fixture();
    let knock = |core: &mut Core<MemoryFirewall>, from: &str, nonce: u8, at: u64| {
        core.knock(
            &knock_bytes("two", at, 60, AddressClaim::PacketSource, nonce),
            ip(from),
            UnixMs::from_secs(at),
        )
    };
    // Spoofed sources, each a valid knock of one key: two grants, no more.
    assert!(matches!(
        knock(&mut f.core, "198.51.100.1", 1, NOW),
        KnockOutcome::Granted { .. }
    ));
    assert!(matches!(
        knock(&mut f.core, "198.51.100.2", 2, NOW),
        KnockOutcome::Granted { .. }
    ));
    let third = knock(&mut f.core, "198.51.100.3", 3, NOW);
    let KnockOutcome::Refused { reason, banned } = third else {
        panic!("{third:?}")
    };
    assert!(
        matches!(
            reason,
            KnockRefusal::Policy(_, PolicyRefusal::KeyGrants { max: 2 })
        ),
        "{reason}"
    );
    assert!(!banned);
    assert_eq!(elements(&mut f.core, SSH_GRANTS_V4).len(), 2);
    // Renewing one of its own still works; other keys are not affected.
    assert!(matches!(
        knock(&mut f.core, "198.51.100.1", 4, NOW + 1),
        KnockOutcome::Granted { .. }
    ));
    assert!(matches!(
        f.core.knock(
            &knock_bytes("alice", NOW, 60, AddressClaim::PacketSource, 5),
            ip("198.51.100.9"),
            UnixMs::from_secs(NOW)
        ),
        KnockOutcome::Granted { .. }
    ));
    // Once one of its grants ends, the refused knock itself (its nonce unused) opens.
    let first = f
        .core
        .grants(UnixMs::from_secs(NOW + 1))
        .into_iter()
        .find(|g| g.address == ip("198.51.100.2"))
        .unwrap();
    f.core.revoke(&first.id).unwrap();
    let retried = f.core.knock(
        &knock_bytes("two", NOW, 60, AddressClaim::PacketSource, 3),
        ip("198.51.100.3"),
        UnixMs::from_secs(NOW + 2),
    );
    assert!(
        matches!(retried, KnockOutcome::Granted { .. }),
        "{retried:?}"
    );
}

#[test]
fn replays_never_count_toward_a_ban() {
    let mut f = fixture();
    let src = ip("198.51.100.7");
    let bytes = knock_bytes("alice", NOW, 60, AddressClaim::PacketSource, 1);
    assert!(matches!(
        f.core.knock(&bytes, src, UnixMs::from_secs(NOW)),
        KnockOutcome::Granted { .. }
    ));
    // Past the ban limit (3 a minute here) many times over: a replay is refused and
    // never bans (whoever raced the owner's copy must not get the owner banned).
    for _ in 0..20 {
        let r = f.core.knock(&bytes, src, UnixMs::from_secs(NOW));
        assert!(
            matches!(
                r,
                KnockOutcome::Refused {
                    reason: KnockRefusal::Replay(_, ReplayError::Replayed),
                    banned: false
                }
            ),
            "{r:?}"
        );
    }
    assert!(elements(&mut f.core, KNOCK_BAN_V4).is_empty());
}

#[test]
fn a_re_knock_extends_the_same_grant() {
    let mut f = fixture();
    let src = ip("198.51.100.7");
    let first = f.core.knock(
        &knock_bytes("alice", NOW, 60, AddressClaim::PacketSource, 1),
        src,
        UnixMs::from_secs(NOW),
    );
    let second = f.core.knock(
        &knock_bytes("alice", NOW + 10, 600, AddressClaim::PacketSource, 2),
        src,
        UnixMs::from_secs(NOW + 10),
    );
    let (
        KnockOutcome::Granted { record: a, .. },
        KnockOutcome::Granted {
            record: b, kind, ..
        },
    ) = (first, second)
    else {
        panic!()
    };
    assert_eq!(
        (a.id, kind, b.expires_at),
        (b.id.clone(), Granted::Extended, NOW + 610)
    );
    assert_eq!(f.core.grants(UnixMs::from_secs(NOW + 10)).len(), 1);
    assert_eq!(elements(&mut f.core, SSH_GRANTS_V4).len(), 1);
}

#[test]
fn repeated_invalid_knocks_ban_the_source() {
    let mut f = fixture();
    let src = ip("203.0.113.66");
    let banned: Vec<bool> = (0..5)
        .map(|_| {
            matches!(
                f.core.knock(b"junk", src, UnixMs::from_secs(NOW)),
                KnockOutcome::Refused { banned: true, .. }
            )
        })
        .collect();
    assert_eq!(
        banned,
        vec![false, false, false, true, true],
        "3 allowed per minute"
    );
    assert_eq!(elements(&mut f.core, KNOCK_BAN_V4), vec![src]);
    // Another source is not affected.
    assert!(matches!(
        f.core
            .knock(b"junk", ip("198.51.100.7"), UnixMs::from_secs(NOW)),
        KnockOutcome::Refused { banned: false, .. }
    ));
}

#[test]
fn admin_open_revoke_and_expiry() {
    let mut f = fixture();
    let (record, _, capped) = f
        .core
        .open(
            "ssh",
            ip("2001:db8::9"),
            Some(Duration::from_secs(7200)),
            "uid 0",
            UnixMs::from_secs(NOW),
        )
        .unwrap();
    assert!(capped, "the server's max_ttl caps admins too");
    assert_eq!(record.expires_at, NOW + 3600);
    assert_eq!(
        elements(&mut f.core, SSH_GRANTS_V6),
        vec![ip("2001:db8::9")]
    );
    assert_eq!(
        f.core.revoke(&record.id).unwrap().map(|r| r.address),
        Some(ip("2001:db8::9"))
    );
    assert!(elements(&mut f.core, SSH_GRANTS_V6).is_empty());
    assert!(f.core.revoke(&record.id).unwrap().is_none());

    let clock = manual_clock(&mut f.core);
    let (short, _, _) = f
        .core
        .open(
            "ssh",
            ip("192.0.2.1"),
            Some(Duration::from_secs(5)),
            "uid 0",
            UnixMs::from_secs(NOW),
        )
        .unwrap();
    // The daemon closes it five seconds (its own clock) after the kernel took it.
    let now = UnixMs::from_secs(NOW);
    assert_eq!(f.core.next_expiry(now), Some(Duration::from_secs(5)));
    clock.set(T0 + 5_000_000 - 1);
    assert!(f.core.expire_all(now).closed.is_empty());
    assert_eq!(elements(&mut f.core, SSH_GRANTS_V4), vec![ip("192.0.2.1")]);
    clock.set(T0 + 5_000_000);
    let ended = f.core.expire_all(now);
    assert_eq!(
        ended.closed.iter().map(|r| &r.id).collect::<Vec<_>>(),
        vec![&short.id]
    );
    assert!(ended.timed_out.is_empty() && ended.close_failed.is_none());
    assert!(
        elements(&mut f.core, SSH_GRANTS_V4).is_empty(),
        "closed now"
    );
    assert!(f.core.grants(now).is_empty());
    assert_eq!(f.core.next_expiry(now), None);
}

/// Where the tests' `CLOCK_MONOTONIC` stands when they set it by hand (µs).
const T0: u64 = 1_000_000_000;

/// Puts `core`'s closes on a clock the test sets, at [`T0`].
fn manual_clock(core: &mut Core<MemoryFirewall>) -> std::rc::Rc<std::cell::Cell<u64>> {
    let clock = std::rc::Rc::new(std::cell::Cell::new(T0));
    core.mono = crate::clock::MonoClock::Manual(std::rc::Rc::clone(&clock));
    clock
}

/// Opens `n` five-second grants for 10.9.x.y at `NOW`.
fn open_many(core: &mut Core<MemoryFirewall>, n: u32) -> Vec<GrantRecord> {
    (0..n)
        .map(|i| {
            let [_, _, high, low] = i.to_be_bytes();
            let address = IpAddr::from([10, 9, high, low]);
            let ttl = Some(Duration::from_secs(5));
            core.open("ssh", address, ttl, "uid 0", UnixMs::from_secs(NOW))
                .unwrap()
                .0
        })
        .collect()
}

#[test]
fn grants_due_together_close_in_bounded_batches_each_pass_right_after_the_last() {
    let mut f = fixture();
    let clock = manual_clock(&mut f.core);
    let n = u32::try_from(CLOSES_PER_PASS).unwrap() + 10;
    open_many(&mut f.core, n);
    clock.set(T0 + 5_000_000);
    let now = UnixMs::from_secs(NOW + 5);
    let first = f.core.expire_all(now);
    assert_eq!(first.closed.len(), CLOSES_PER_PASS);
    // The rest are due at once: the loop's next turn closes them.
    assert_eq!(f.core.next_expiry(now), Some(Duration::ZERO));
    assert_eq!(elements(&mut f.core, SSH_GRANTS_V4).len(), 10);
    assert_eq!(f.core.expire_all(now).closed.len(), 10);
    assert!(elements(&mut f.core, SSH_GRANTS_V4).is_empty());
}

#[test]
fn a_refused_batch_is_closed_one_by_one_and_what_still_fails_is_left_to_the_kernel() {
    let mut f = fixture();
    let clock = manual_clock(&mut f.core);
    let opened = open_many(&mut f.core, 2);
    clock.set(T0 + 5_000_000);
    // The batch and then the first grant alone are refused; the second goes.
    f.core.firewall.refuse_next = true;
    f.core.firewall.refuse_after = Some(1);
    let now = UnixMs::from_secs(NOW + 5);
    let ended = f.core.expire_all(now);
    assert_eq!(ended.closed.len(), 1);
    assert_eq!(ended.close_failed.as_ref().map(|(n, _)| *n), Some(1));
    // The two have the same end: which went first is the ids' order.
    let left = opened.iter().find(|r| r.id != ended.closed[0].id).unwrap();
    assert_eq!(elements(&mut f.core, SSH_GRANTS_V4), vec![left.address]);
    // Not tried again: the book drops it once its kernel timeout has surely closed it.
    assert!(f.core.expire_all(now).closed.is_empty());
    let settled = Duration::from_secs(5) + crate::clock::kernel_timer().settle();
    assert_eq!(f.core.next_expiry(UnixMs::from_secs(NOW)), Some(settled));
    let ended = f.core.expire_all(UnixMs::from_secs(NOW).plus(settled));
    assert_eq!(ended.timed_out.len(), 1);
    assert_eq!(ended.timed_out[0].id, left.id);
}

#[test]
fn a_wall_clock_set_forward_or_back_moves_no_close() {
    let mut f = fixture();
    let clock = manual_clock(&mut f.core);
    let opened = open_many(&mut f.core, 1);
    // An hour on by the wall clock, a second by the real one: still open, and not
    // dropped from the book either.
    clock.set(T0 + 1_000_000);
    let ended = f.core.expire_all(UnixMs::from_secs(NOW + 3600));
    assert!(ended.closed.is_empty() && ended.timed_out.is_empty());
    assert_eq!(
        elements(&mut f.core, SSH_GRANTS_V4),
        vec![opened[0].address]
    );
    // An hour back by the wall clock, five seconds on by the real one: closed.
    clock.set(T0 + 5_000_000);
    let ended = f.core.expire_all(UnixMs::from_secs(NOW - 3600));
    assert_eq!(ended.closed[0].id, opened[0].id);
    assert!(elements(&mut f.core, SSH_GRANTS_V4).is_empty());
}

#[test]
fn an_extended_or_reopened_grant_closes_at_its_new_end_only() {
    let mut f = fixture();
    let clock = manual_clock(&mut f.core);
    let ttl = Some(Duration::from_secs(5));
    // Extended three seconds in; reopened (IPv4-mapped) after its end, before a pass.
    let extended = ip("192.0.2.1");
    f.core
        .open("ssh", extended, ttl, "uid 0", UnixMs::from_secs(NOW))
        .unwrap();
    let reopened = f
        .core
        .open("ssh", ip("192.0.2.2"), ttl, "uid 0", UnixMs::from_secs(NOW))
        .unwrap()
        .0;
    clock.set(T0 + 3_000_000);
    f.core
        .open("ssh", extended, ttl, "uid 0", UnixMs::from_secs(NOW + 3))
        .unwrap();
    clock.set(T0 + 5_000_100);
    let mapped = ip("::ffff:192.0.2.2");
    let again = f
        .core
        .open("ssh", mapped, ttl, "uid 0", UnixMs::from_secs(NOW + 5))
        .unwrap()
        .0;
    assert_ne!(again.id, reopened.id, "after its end: a new grant");
    assert!(
        f.core
            .expire_all(UnixMs::from_secs(NOW + 5))
            .closed
            .is_empty()
    );
    assert_eq!(elements(&mut f.core, SSH_GRANTS_V4).len(), 2);
    clock.set(T0 + 8_000_000);
    let ended = f.core.expire_all(UnixMs::from_secs(NOW + 8));
    assert_eq!(ended.closed.len(), 1);
    assert_eq!(elements(&mut f.core, SSH_GRANTS_V4), vec![ip("192.0.2.2")]);
    clock.set(T0 + 10_000_100);
    let ended = f.core.expire_all(UnixMs::from_secs(NOW + 10));
    assert_eq!(
        ended.closed[0].address,
        ip("192.0.2.2"),
        "the v4 element, mapped or not"
    );
    assert!(elements(&mut f.core, SSH_GRANTS_V4).is_empty());
    assert!(elements(&mut f.core, SSH_GRANTS_V6).is_empty());
}

#[test]
fn grants_put_back_by_a_rollback_close_when_their_time_left_is_up() {
    let mut f = fixture();
    let clock = manual_clock(&mut f.core);
    let opened = open_many(&mut f.core, 1);
    let record = f.core.revoke(&opened[0].id).unwrap().unwrap();
    clock.set(T0 + 2_000_000);
    assert_eq!(
        f.core
            .restore_grants(vec![record], UnixMs::from_secs(NOW + 2)),
        1
    );
    clock.set(T0 + 5_000_000 - 1);
    assert!(
        f.core
            .expire_all(UnixMs::from_secs(NOW + 5))
            .closed
            .is_empty()
    );
    clock.set(T0 + 5_000_000);
    assert_eq!(
        f.core.expire_all(UnixMs::from_secs(NOW + 5)).closed.len(),
        1
    );
    assert!(elements(&mut f.core, SSH_GRANTS_V4).is_empty());
}

#[test]
fn a_rolled_back_grant_whose_id_was_taken_gets_the_close_not_the_new_holder() {
    let mut f = fixture();
    let clock = manual_clock(&mut f.core);
    let opened = open_many(&mut f.core, 2);
    // Rolled back while another grant holds its id: booked under a fresh one.
    let mut record = f.core.revoke(&opened[0].id).unwrap().unwrap();
    record.id.clone_from(&opened[1].id);
    clock.set(T0 + 1_000_000);
    assert_eq!(
        f.core
            .restore_grants(vec![record], UnixMs::from_secs(NOW + 1)),
        1
    );
    let mut ids: Vec<String> = f
        .core
        .grants(UnixMs::from_secs(NOW + 1))
        .into_iter()
        .map(|r| r.id)
        .collect();
    ids.retain(|id| *id != opened[1].id);
    assert_eq!(ids.len(), 1, "the restored grant, under a fresh id");
    assert_eq!(
        f.core.book.close_of(&opened[1].id),
        Some(T0 + 5_000_000),
        "unmoved"
    );
    assert_eq!(f.core.book.close_of(&ids[0]), Some(T0 + 5_000_000));
}

#[test]
fn a_refill_counts_a_grants_time_by_the_daemons_clock_and_listings_change_nothing() {
    let mut f = fixture();
    let clock = manual_clock(&mut f.core);
    let opened = open_many(&mut f.core, 1);
    // Two real seconds on, the wall clock an hour on: three seconds left.
    clock.set(T0 + 2_000_000);
    let late = UnixMs::from_secs(NOW + 3600);
    let booked = f.core.booked_elements(late, &[]);
    let element = &booked[SSH_GRANTS_V4][0];
    assert_eq!(element.addr(), Some(opened[0].address));
    let three = crate::clock::kernel_timer().timeout(Duration::from_secs(3));
    assert_eq!(element.expires_in, Some(three));
    // Listed while open, whatever the wall clock says; a listing drops nothing.
    assert_eq!(f.core.grants(late).len(), 1);
    assert_eq!(f.core.book.len(), 1);
}

#[test]
fn grants_booked_by_an_earlier_process_are_left_to_their_kernel_timeouts() {
    let mut f = fixture();
    let opened = open_many(&mut f.core, 1);
    f.core.save_book_and_wait();
    let book = crate::grants::GrantBook::load(&f.core.settings.book_path).unwrap();
    let fw = std::mem::take(&mut f.core.firewall);
    let replay = ReplayLog::open(f.dir.path(), REPLAY_CAPACITY, NOW).unwrap();
    let settings = settings(f.dir.path(), &config());
    let mut again = Core::new(fw, settings, keys(), replay, book);
    let clock = manual_clock(&mut again);
    clock.set(u64::MAX / 2);
    assert!(
        again
            .expire_all(UnixMs::from_secs(NOW + 5))
            .closed
            .is_empty()
    );
    assert_eq!(elements(&mut again, SSH_GRANTS_V4).len(), 1);
    let settled = UnixMs::from_secs(NOW + 5).plus(crate::clock::kernel_timer().settle());
    assert_eq!(again.expire_all(settled).timed_out[0].id, opened[0].id);
}

#[test]
fn the_kernel_gets_the_ttl_and_a_tick_so_a_grant_never_ends_early() {
    let mut f = fixture();
    let at = UnixMs(NOW * 1000 + 417);
    let (record, _, _) = f
        .core
        .open(
            "ssh",
            ip("192.0.2.1"),
            Some(Duration::from_secs(5)),
            "uid 0",
            at,
        )
        .unwrap();
    // The book keeps the TTL to the millisecond…
    assert_eq!(record.expires_at_ms, at.0 + 5000);
    assert_eq!((record.granted_at, record.expires_at), (NOW, NOW + 6));
    // …and the kernel's element lasts the TTL plus one tick (HZ=250 in unit tests).
    let element = f
        .core
        .firewall
        .elements("knockgate", SSH_GRANTS_V4)
        .unwrap()
        .into_iter()
        .next()
        .unwrap();
    assert_eq!(element.expires_in, Some(Duration::from_millis(5004)));
}

#[test]
fn a_knock_after_the_ttl_is_a_new_grant_even_before_the_book_expires_it() {
    let mut f = fixture();
    let first = f.core.knock(
        &knock_bytes("alice", NOW, 2, AddressClaim::PacketSource, 1),
        ip("198.51.100.7"),
        UnixMs::from_secs(NOW),
    );
    let KnockOutcome::Granted { record: first, .. } = first else {
        panic!("{first:?}")
    };
    // 1 ms after the TTL, within the slack: the kernel may already have closed it.
    let later = UnixMs(NOW * 1000 + 2001);
    let again = f.core.knock(
        &knock_bytes("alice", NOW + 2, 60, AddressClaim::PacketSource, 2),
        ip("198.51.100.7"),
        later,
    );
    let KnockOutcome::Granted { record, kind, .. } = again else {
        panic!("{again:?}")
    };
    assert_eq!(kind, Granted::New, "not extended: it had ended");
    assert_ne!(record.id, first.id);
    // Before the TTL, the same knock is an extension.
    let renew = f.core.knock(
        &knock_bytes("alice", NOW + 2, 60, AddressClaim::PacketSource, 3),
        ip("198.51.100.7"),
        UnixMs(later.0 + 10),
    );
    assert!(
        matches!(
            renew,
            KnockOutcome::Granted {
                kind: Granted::Extended,
                ..
            }
        ),
        "{renew:?}"
    );
}

#[test]
fn egress_windows_open_close_and_share_the_host_switch() {
    use crate::ruleset::ElementKey;
    let mut f = fixture();
    let (cg, capped) = f
        .core
        .open_window(
            WindowScope::Cgroup(4242),
            &[],
            Duration::from_secs(3600),
            "uid 0",
            "apt upgrade",
            UnixMs::from_secs(NOW),
        )
        .unwrap();
    assert!(capped, "egress.max_ttl caps windows");
    assert_eq!(cg.expires_at, NOW + 600);
    let keys = |core: &mut Core<MemoryFirewall>, set| -> Vec<ElementKey> {
        core.firewall
            .elements("knockgate", set)
            .unwrap()
            .iter()
            .map(|e| e.key)
            .collect()
    };
    assert_eq!(
        keys(&mut f.core, EGRESS_CGROUPS),
        vec![ElementKey::Cgroup(4242)]
    );
    let (h1, _) = f
        .core
        .open_window(
            WindowScope::Host,
            &[],
            Duration::from_secs(60),
            "uid 0",
            "a",
            UnixMs::from_secs(NOW),
        )
        .unwrap();
    let (h2, _) = f
        .core
        .open_window(
            WindowScope::Host,
            &[],
            Duration::from_secs(60),
            "uid 0",
            "b",
            UnixMs::from_secs(NOW),
        )
        .unwrap();
    assert_eq!(f.core.windows(UnixMs::from_secs(NOW)).len(), 3);
    f.core.close_window(&h1.id, UnixMs::from_secs(NOW)).unwrap();
    assert_eq!(
        keys(&mut f.core, EGRESS_HOST),
        vec![ElementKey::Proto(6)],
        "still on for the other host window"
    );
    f.core.close_window(&h2.id, UnixMs::from_secs(NOW)).unwrap();
    assert!(keys(&mut f.core, EGRESS_HOST).is_empty());
    // Revoke by id reaches windows too.
    assert!(f.core.revoke(&cg.id).unwrap().is_none(), "not a grant");
    assert!(
        f.core
            .close_window(&cg.id, UnixMs::from_secs(NOW))
            .unwrap()
            .is_some()
    );
    assert!(keys(&mut f.core, EGRESS_CGROUPS).is_empty());
    assert!(
        f.core
            .close_window(&cg.id, UnixMs::from_secs(NOW))
            .unwrap()
            .is_none()
    );
}

#[test]
fn an_unrestricted_windows_end_leaves_a_nested_restricted_window_restricted() {
    use crate::ruleset::ElementKey;
    let mut f = fixture();
    let keys = |core: &mut Core<MemoryFirewall>, set| -> Vec<ElementKey> {
        core.firewall
            .elements("knockgate", set)
            .unwrap()
            .iter()
            .map(|e| e.key)
            .collect()
    };
    let open = |core: &mut Core<MemoryFirewall>, to: &[IpAddr], secs| {
        core.open_window(
            WindowScope::Cgroup(7),
            to,
            Duration::from_secs(secs),
            "uid 0",
            "apt",
            UnixMs::from_secs(NOW),
        )
        .unwrap()
        .0
    };
    // An unrestricted window and, in the same cgroup, a longer one restricted to one
    // destination (an egress-window --to inside another's systemd scope).
    let outer = open(&mut f.core, &[], 60);
    let inner = open(&mut f.core, &[ip("192.0.2.80")], 600);
    assert_eq!(
        keys(&mut f.core, EGRESS_CGROUPS),
        vec![ElementKey::Cgroup(7)]
    );
    f.core
        .close_window(&outer.id, UnixMs::from_secs(NOW + 1))
        .unwrap();
    assert!(
        keys(&mut f.core, EGRESS_CGROUPS).is_empty(),
        "the cgroup is no longer open to everywhere"
    );
    assert_eq!(
        keys(&mut f.core, EGRESS_TO_V4),
        vec![ElementKey::CgroupAddr(7, ip("192.0.2.80"))],
        "the restricted window keeps its destination"
    );
    // The other way round: the restricted one's end leaves the unrestricted one.
    let outer = open(&mut f.core, &[], 60);
    f.core
        .close_window(&inner.id, UnixMs::from_secs(NOW + 2))
        .unwrap();
    assert!(keys(&mut f.core, EGRESS_TO_V4).is_empty());
    assert_eq!(
        keys(&mut f.core, EGRESS_CGROUPS),
        vec![ElementKey::Cgroup(7)]
    );
    // Two unrestricted windows of one cgroup: the element stays for the longer.
    let longer = open(&mut f.core, &[], 300);
    f.core
        .close_window(&outer.id, UnixMs::from_secs(NOW + 3))
        .unwrap();
    assert_eq!(
        keys(&mut f.core, EGRESS_CGROUPS),
        vec![ElementKey::Cgroup(7)]
    );
    f.core
        .close_window(&longer.id, UnixMs::from_secs(NOW + 4))
        .unwrap();
    assert!(keys(&mut f.core, EGRESS_CGROUPS).is_empty());
}

#[test]
fn a_window_the_kernel_takes_only_in_part_is_taken_back_whole() {
    let mut f = fixture();
    let to = [ip("192.0.2.80"), ip("192.0.2.81"), ip("192.0.2.82")];
    f.core.firewall.refuse_after = Some(1);
    let opened = f.core.open_window(
        WindowScope::Cgroup(9),
        &to,
        Duration::from_secs(60),
        "uid 0",
        "apt",
        UnixMs::from_secs(NOW),
    );
    assert!(opened.is_err());
    let left = f.core.firewall.elements("knockgate", EGRESS_TO_V4).unwrap();
    assert!(left.is_empty(), "nothing half-open: {left:?}");
    assert!(
        f.core.windows(UnixMs::from_secs(NOW)).is_empty(),
        "and nothing booked"
    );
}

#[test]
fn a_window_restricted_to_destinations_holds_cgroup_address_pairs() {
    use crate::ruleset::ElementKey;
    let mut f = fixture();
    let to = [
        ip("192.0.2.80"),
        ip("2001:db8::80"),
        ip("::ffff:192.0.2.81"),
    ];
    let (w, _) = f
        .core
        .open_window(
            WindowScope::Cgroup(7),
            &to,
            Duration::from_secs(60),
            "uid 0",
            "apt",
            UnixMs::from_secs(NOW),
        )
        .unwrap();
    let keys = |core: &mut Core<MemoryFirewall>, set| -> Vec<ElementKey> {
        core.firewall
            .elements("knockgate", set)
            .unwrap()
            .iter()
            .map(|e| e.key)
            .collect()
    };
    assert_eq!(
        keys(&mut f.core, EGRESS_TO_V4),
        vec![
            ElementKey::CgroupAddr(7, ip("192.0.2.80")),
            ElementKey::CgroupAddr(7, ip("192.0.2.81"))
        ]
    );
    assert_eq!(
        keys(&mut f.core, EGRESS_TO_V6),
        vec![ElementKey::CgroupAddr(7, ip("2001:db8::80"))]
    );
    assert!(
        keys(&mut f.core, EGRESS_CGROUPS).is_empty(),
        "not open to everywhere"
    );
    f.core.close_window(&w.id, UnixMs::from_secs(NOW)).unwrap();
    assert!(
        keys(&mut f.core, EGRESS_TO_V4).is_empty() && keys(&mut f.core, EGRESS_TO_V6).is_empty()
    );
}

#[test]
fn shared_host_switch_lasts_as_long_as_the_longest_window_only() {
    let mut f = fixture();
    let now = NOW;
    let left = |core: &mut Core<MemoryFirewall>| {
        core.firewall.elements("knockgate", EGRESS_HOST).unwrap()[0]
            .expires_in
            .unwrap()
    };
    let (long, _) = f
        .core
        .open_window(
            WindowScope::Host,
            &[],
            Duration::from_secs(300),
            "uid 0",
            "a",
            UnixMs::from_secs(now),
        )
        .unwrap();
    f.core
        .open_window(
            WindowScope::Host,
            &[],
            Duration::from_secs(5),
            "uid 0",
            "b",
            UnixMs::from_secs(now),
        )
        .unwrap();
    assert_eq!(
        left(&mut f.core),
        crate::clock::kernel_timer().timeout(Duration::from_secs(300)),
        "a short window does not cut a long one"
    );
    f.core
        .close_window(&long.id, UnixMs::from_secs(NOW))
        .unwrap();
    assert!(
        left(&mut f.core) <= crate::clock::kernel_timer().timeout(Duration::from_secs(5)),
        "nor does a closed long one extend a short one"
    );
}

#[test]
fn a_key_allowed_nothing_takes_no_room_in_the_replay_guard() {
    let mut f = fixture();
    let source = ip("198.51.100.7");
    for n in 0..200u8 {
        let datagram = knock_bytes("no-ssh", NOW, 60, AddressClaim::PacketSource, n);
        assert!(matches!(
            f.core.knock(&datagram, source, UnixMs::from_secs(NOW)),
            KnockOutcome::Refused { .. }
        ));
    }
    assert_eq!(f.core.replay_guard_len(), 0);
    let datagram = knock_bytes("alice", NOW, 60, AddressClaim::PacketSource, 201);
    assert!(matches!(
        f.core.knock(&datagram, source, UnixMs::from_secs(NOW)),
        KnockOutcome::Granted { .. }
    ));
    assert_eq!(f.core.replay_guard_len(), 1);
}

#[test]
fn the_invalid_knock_counter_stays_bounded_under_spoofed_sources() {
    let mut f = fixture();
    for n in 0..u32::try_from(MAX_COUNTED_SOURCES + 5_000).unwrap() {
        let source = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n));
        let _ = f.core.knock(b"junk", source, UnixMs::from_secs(NOW));
        let counted = f
            .core
            .invalid
            .as_ref()
            .map_or(0, governor::RateLimiter::len);
        assert!(counted <= MAX_COUNTED_SOURCES, "{counted} sources counted");
    }
    // Counting still works after the reset: a fourth junk datagram bans a source.
    let flooder = ip("203.0.113.9");
    let banned = (0..4).any(|_| {
        matches!(
            f.core.knock(b"junk", flooder, UnixMs::from_secs(NOW)),
            KnockOutcome::Refused { banned: true, .. }
        )
    });
    assert!(banned);
}

#[test]
fn a_knock_for_a_service_opens_that_service_only() {
    let mut f = fixture();
    let laptop = ip("198.51.100.7");
    let outcome = f.core.knock(
        &knock_for("wireguard", "multi", NOW, 60, AddressClaim::PacketSource, 1),
        laptop,
        UnixMs::from_secs(NOW),
    );
    let KnockOutcome::Granted { record, .. } = outcome else {
        panic!("{outcome:?}")
    };
    assert_eq!(
        (record.service.as_str(), record.address),
        ("wireguard", laptop)
    );
    assert_eq!(elements(&mut f.core, "wireguard_grants_v4"), vec![laptop]);
    assert!(elements(&mut f.core, SSH_GRANTS_V4).is_empty());
    assert!(elements(&mut f.core, "web_grants_v4").is_empty());
    // The same address may hold ssh too: two grants, one per service.
    let outcome = f.core.knock(
        &knock_for("ssh", "multi", NOW, 60, AddressClaim::PacketSource, 2),
        laptop,
        UnixMs::from_secs(NOW),
    );
    assert!(
        matches!(outcome, KnockOutcome::Granted { .. }),
        "{outcome:?}"
    );
    assert_eq!(f.core.grants(UnixMs::from_secs(NOW)).len(), 2);
    // Revoking one leaves the other.
    let id = f
        .core
        .grants(UnixMs::from_secs(NOW))
        .into_iter()
        .find(|g| g.service == "wireguard")
        .unwrap()
        .id;
    f.core.revoke(&id).unwrap().unwrap();
    assert!(elements(&mut f.core, "wireguard_grants_v4").is_empty());
    assert_eq!(elements(&mut f.core, SSH_GRANTS_V4), vec![laptop]);
}

#[test]
fn a_key_not_allowed_a_service_gets_nothing_and_no_ban() {
    let mut f = fixture();
    let source = ip("198.51.100.7");
    for nonce in 1..=5 {
        let outcome = f.core.knock(
            &knock_for(
                "wireguard",
                "alice",
                NOW,
                60,
                AddressClaim::PacketSource,
                nonce,
            ),
            source,
            UnixMs::from_secs(NOW),
        );
        let KnockOutcome::Refused { reason, banned } = outcome else {
            panic!("{outcome:?}")
        };
        assert!(
            matches!(&reason, KnockRefusal::Policy(_, PolicyRefusal::Service(s)) if s == "wireguard"),
            "{reason}"
        );
        assert!(reason.to_string().contains("`wireguard`"), "{reason}");
        assert!(!banned, "an authentic knock never counts toward a ban");
    }
    assert!(elements(&mut f.core, "wireguard_grants_v4").is_empty());
    assert_eq!(
        f.core.replay_guard_len(),
        0,
        "refused knocks take no nonce room"
    );
}

#[test]
fn a_service_the_server_does_not_define_is_refused_by_id() {
    let mut f = fixture();
    let outcome = f.core.knock(
        &knock_for("postgres", "multi", NOW, 60, AddressClaim::PacketSource, 1),
        ip("198.51.100.7"),
        UnixMs::from_secs(NOW),
    );
    let KnockOutcome::Refused { reason, banned } = outcome else {
        panic!("{outcome:?}")
    };
    assert!(
        matches!(
            reason,
            KnockRefusal::Policy(_, PolicyRefusal::UnknownService(id))
                if id == crate::knock::ServiceId::of("postgres")
        ),
        "{reason}"
    );
    assert!(!banned);
}

#[test]
fn an_egress_knock_opens_one_host_window_per_key_and_renews_it() {
    let mut f = fixture();
    let outcome = f.core.knock(
        &knock_for("egress", "multi", NOW, 3000, AddressClaim::PacketSource, 1),
        ip("198.51.100.7"),
        UnixMs::from_secs(NOW),
    );
    let KnockOutcome::Window {
        window,
        renewed,
        capped,
        ..
    } = outcome
    else {
        panic!("{outcome:?}")
    };
    assert_eq!(window.scope, WindowScope::Host);
    assert_eq!(window.who, "key multi");
    assert!(!renewed);
    assert!(capped, "3000 s is cut to egress.max_ttl (600 s)");
    assert_eq!(window.expires_at, NOW + 600);
    assert_eq!(
        f.core.grants(UnixMs::from_secs(NOW)).len(),
        0,
        "a window is no grant"
    );
    let host = |core: &mut Core<MemoryFirewall>| {
        core.firewall
            .elements("knockgate", EGRESS_HOST)
            .unwrap()
            .len()
    };
    assert_eq!(host(&mut f.core), 1);
    // A second knock replaces the window: still one, with the new time.
    let outcome = f.core.knock(
        &knock_for(
            "egress",
            "multi",
            NOW + 10,
            60,
            AddressClaim::PacketSource,
            2,
        ),
        ip("198.51.100.7"),
        UnixMs::from_secs(NOW + 10),
    );
    let KnockOutcome::Window {
        window, renewed, ..
    } = outcome
    else {
        panic!("{outcome:?}")
    };
    assert!(renewed);
    assert_eq!(window.expires_at, NOW + 70);
    let windows = f.core.windows(UnixMs::from_secs(NOW + 10));
    assert_eq!(windows.len(), 1, "{windows:?}");
    assert_eq!(host(&mut f.core), 1, "the switch stayed on");
    // Revocable like every window; the switch goes with it.
    f.core
        .close_window(&windows[0].id, UnixMs::from_secs(NOW + 11))
        .unwrap()
        .unwrap();
    assert_eq!(host(&mut f.core), 0);
}

#[test]
fn a_key_without_egress_opens_no_window() {
    let mut f = fixture();
    let outcome = f.core.knock(
        &knock_for("egress", "alice", NOW, 60, AddressClaim::PacketSource, 1),
        ip("198.51.100.7"),
        UnixMs::from_secs(NOW),
    );
    assert!(
        matches!(
            &outcome,
            KnockOutcome::Refused { reason: KnockRefusal::Policy(_, PolicyRefusal::Service(s)), .. } if s == "egress"
        ),
        "{outcome:?}"
    );
    assert!(f.core.windows(UnixMs::from_secs(NOW)).is_empty());
}

#[test]
fn a_reload_that_drops_a_service_drops_its_grants_and_keeps_the_rest() {
    let mut f = fixture();
    for (service, nonce) in [("wireguard", 1), ("web", 2), ("ssh", 3)] {
        let outcome = f.core.knock(
            &knock_for(service, "multi", NOW, 60, AddressClaim::PacketSource, nonce),
            ip("198.51.100.7"),
            UnixMs::from_secs(NOW),
        );
        assert!(
            matches!(outcome, KnockOutcome::Granted { .. }),
            "{outcome:?}"
        );
    }
    let mut config = config();
    config.services.retain(|s| s.name != "wireguard");
    let dropped = f.core.reconfigure(settings(f.dir.path(), &config), keys());
    assert_eq!(dropped.len(), 1);
    assert_eq!(dropped[0].service, "wireguard");
    let mut left: Vec<String> = f
        .core
        .grants(UnixMs::from_secs(NOW))
        .into_iter()
        .map(|g| g.service)
        .collect();
    left.sort();
    assert_eq!(left, ["ssh", "web"]);
    let booked = f.core.booked_elements(UnixMs::from_secs(NOW), &[]);
    assert!(!booked.contains_key("wireguard_grants_v4"));
    assert!(booked.contains_key("web_grants_v4"));
    // An admin cannot open a service that is not there.
    let err = f
        .core
        .open(
            "wireguard",
            ip("192.0.2.1"),
            None,
            "uid 0",
            UnixMs::from_secs(NOW),
        )
        .unwrap_err();
    assert!(err.to_string().contains("no service `wireguard`"), "{err}");
}

#[test]
fn a_completed_sequence_is_booked_like_a_knock_and_closed_again_past_the_keys_grants() {
    use crate::daemon::sequencer::Sequencer;
    use crate::ruleset::sequence::completion;
    let mut f = fixture();
    let mut c = config();
    let spec = |id: &str| crate::config::KeySpec {
        max_grants: 2,
        ..crate::config::KeySpec::with_sequence(id, 60)
    };
    c.keys = vec![spec("two")];
    f.core.set_sequencer(Sequencer::new(&c, &keys(), &server()));
    let now = UnixMs::from_secs(NOW);
    let mark = completion(1, 0, NOW / 30);
    // The kernel added the first two itself; the daemon books them.
    for (i, addr) in ["198.51.100.1", "198.51.100.2"].iter().enumerate() {
        f.core
            .firewall_mut()
            .add_element(
                "knockgate",
                SSH_GRANTS_V4,
                ip(addr).into(),
                Duration::from_secs(60),
            )
            .unwrap();
        match f.core.sequence_completed(mark, ip(addr), None, now) {
            SequenceOutcome::Opened {
                completed, record, ..
            } => {
                assert_eq!(completed.key.as_str(), "two");
                assert_eq!(record.who, "key two (sequence)");
                assert_eq!(record.expires_at, NOW + 60, "{i}");
            }
            other => panic!("{other:?}"),
        }
    }
    // A third address: past the key's two grants, closed again at once.
    f.core
        .firewall_mut()
        .add_element(
            "knockgate",
            SSH_GRANTS_V4,
            ip("198.51.100.3").into(),
            Duration::from_secs(60),
        )
        .unwrap();
    match f
        .core
        .sequence_completed(mark, ip("198.51.100.3"), None, now)
    {
        SequenceOutcome::Refused { reason, .. } => {
            assert!(reason.contains("most grants"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    let open = elements(&mut f.core, SSH_GRANTS_V4);
    assert!(!open.contains(&ip("198.51.100.3")), "{open:?}");
    assert_eq!(f.core.grants(now).len(), 2);
    // A renewal from a booked address is fine; a completion of no generation in force is not ours.
    assert!(matches!(
        f.core
            .sequence_completed(mark, ip("198.51.100.1"), None, now),
        SequenceOutcome::Opened { .. }
    ));
    assert!(matches!(
        f.core
            .sequence_completed(completion(1, 9, 0), ip("198.51.100.4"), None, now),
        SequenceOutcome::Unknown
    ));
}

#[test]
fn grant_sets_that_rules_add_to_hold_every_grant_the_daemon_may_book() {
    for most in [
        crate::config::LEAST_GRANTS,
        100_000,
        crate::config::MOST_GRANTS,
    ] {
        let mut config = config();
        config.keys = vec![crate::config::KeySpec::with_sequence("seq", 60)];
        config.knock.max_grants = most;
        let ruleset = baseline(&config, &[]);
        // The most any config may book, whatever this one says: lowered below what a
        // set holds, the set must still take back the elements it is refilled with.
        let sizes: Vec<u32> = ruleset
            .sets
            .iter()
            .filter_map(|s| match s.kind {
                crate::ruleset::SetKind::RuleGrants { size } => Some(size),
                _ => None,
            })
            .collect();
        assert!(
            !sizes.is_empty()
                && sizes
                    .iter()
                    .all(|&s| s == crate::config::MOST_GRANTS && s >= most),
            "{sizes:?}"
        );
    }
}
