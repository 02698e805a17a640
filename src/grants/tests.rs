//! The grant book: its operations, its indexes after any steps, its file.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use super::book::{Names, Slot, slot_number};
use super::*;
use crate::ruleset::Element;
use crate::state::StateError;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Books an SSH grant for `addr` at `now` for `ttl` seconds.
fn ssh(
    book: &mut GrantBook,
    addr: &str,
    who: &str,
    now: u64,
    ttl: u64,
    id: &mut impl FnMut() -> GrantId,
) -> (GrantRecord, Granted) {
    book.grant(
        "ssh",
        ip(addr),
        who,
        UnixMs::from_secs(now),
        Duration::from_secs(ttl),
        id,
    )
}

fn ids() -> impl FnMut() -> GrantId {
    let mut n = 0;
    move || {
        n += 1;
        n
    }
}

#[test]
fn a_second_grant_for_the_same_address_extends_the_first() {
    let mut book = GrantBook::default();
    let mut id = ids();
    let (first, kind) = ssh(&mut book, "192.0.2.1", "key a", 100, 60, &mut id);
    assert_eq!(kind, Granted::New);
    let (second, kind) = ssh(&mut book, "192.0.2.1", "key b", 130, 60, &mut id);
    assert_eq!(kind, Granted::Extended);
    assert_eq!(second.id, first.id);
    assert_eq!(second.expires_at, 190);
    assert_eq!(book.iter().count(), 1);
}

#[test]
fn expiry_and_revoke_remove_records() {
    let mut book = GrantBook::default();
    let mut id = ids();
    ssh(&mut book, "192.0.2.1", "key a", 100, 10, &mut id);
    let (b, _) = ssh(&mut book, "2001:db8::1", "uid 0", 100, 100, &mut id);
    let gone = book.expire(UnixMs::from_secs(110));
    assert_eq!(gone.len(), 1);
    assert_eq!(
        book.revoke(&b.id).map(|r| r.address),
        Some(ip("2001:db8::1"))
    );
    assert_eq!(book.iter().count(), 0);
}

#[test]
fn grants_are_counted_per_holder_through_every_change() {
    let mut book = GrantBook::default();
    let mut id = ids();
    ssh(&mut book, "192.0.2.1", "key a", 100, 10, &mut id);
    let (b, _) = ssh(&mut book, "192.0.2.2", "key a", 100, 100, &mut id);
    ssh(&mut book, "192.0.2.3", "uid 0", 100, 100, &mut id);
    assert_eq!((book.held_by("key a"), book.held_by("uid 0")), (2, 1));
    // Extending another's grant moves it to the extender; extending one's own does not count twice.
    ssh(&mut book, "192.0.2.3", "key a", 101, 100, &mut id);
    ssh(&mut book, "192.0.2.2", "key a", 101, 100, &mut id);
    assert_eq!((book.held_by("key a"), book.held_by("uid 0")), (3, 0));
    book.expire(UnixMs::from_secs(110));
    assert_eq!(book.held_by("key a"), 2);
    book.revoke(&b.id);
    assert_eq!(book.held_by("key a"), 1);
    // Saved and loaded, the counts are rebuilt.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("grants.json");
    book.save(&path).unwrap();
    let loaded = GrantBook::load(&path).unwrap();
    assert_eq!(loaded.held_by("key a"), 1);
    assert_eq!(loaded.held_by("nobody"), 0);
}

#[test]
fn reconcile_follows_the_kernel() {
    let mut book = GrantBook::default();
    let mut id = ids();
    ssh(&mut book, "192.0.2.1", "key a", 100, 60, &mut id);
    ssh(&mut book, "192.0.2.2", "key a", 100, 60, &mut id);
    let kernel = [
        Element {
            key: ip("192.0.2.1").into(),
            expires_in: Some(Duration::from_secs(40)),
        },
        Element {
            key: ip("192.0.2.9").into(),
            expires_in: Some(Duration::from_secs(5)),
        },
    ];
    book.reconcile("ssh", &kernel, UnixMs::from_secs(120), &mut id);
    let mut seen: Vec<(IpAddr, String, u64)> = book
        .iter()
        .map(|r| (r.address, r.who.clone(), r.expires_at))
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        vec![
            (ip("192.0.2.1"), "key a".into(), 160),
            (ip("192.0.2.9"), "recovered".into(), 125)
        ]
    );
}

#[test]
fn the_book_round_trips_through_its_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("grants.json");
    assert_eq!(GrantBook::load(&path).unwrap(), GrantBook::default());
    let mut book = GrantBook::default();
    book.grant(
        "ssh",
        ip("192.0.2.1"),
        "key a",
        UnixMs::from_secs(100),
        Duration::from_secs(60),
        new_id,
    );
    book.save(&path).unwrap();
    assert_eq!(GrantBook::load(&path).unwrap(), book);
    std::fs::write(&path, "{not json").unwrap();
    assert!(is_damaged(&GrantBook::load(&path)));
}

fn is_damaged(loaded: &Result<GrantBook, StateError>) -> bool {
    matches!(loaded, Err(StateError::Damaged { .. }))
}

#[test]
fn next_expiry_is_exact_after_every_change() {
    let mut book = GrantBook::default();
    let mut id = ids();
    book.grant(
        "ssh",
        ip("192.0.2.1"),
        "k",
        UnixMs::from_secs(100),
        Duration::from_secs(10),
        &mut id,
    );
    book.grant(
        "ssh",
        ip("192.0.2.2"),
        "k",
        UnixMs::from_secs(100),
        Duration::from_secs(50),
        &mut id,
    );
    assert_eq!(book.next_expiry(), Some(UnixMs::from_secs(110)));
    // Extending the first moves the next expiry to the second's end at once.
    book.grant(
        "ssh",
        ip("192.0.2.1"),
        "k",
        UnixMs::from_secs(105),
        Duration::from_secs(100),
        &mut id,
    );
    assert_eq!(book.next_expiry(), Some(UnixMs::from_secs(150)));
    assert!(book.expire(UnixMs::from_secs(110)).is_empty());
    assert_eq!(book.next_expiry(), Some(UnixMs::from_secs(150)));
    let second = book
        .iter()
        .find(|r| r.address == ip("192.0.2.2"))
        .unwrap()
        .id
        .clone();
    book.revoke(&second);
    assert_eq!(book.next_expiry(), Some(UnixMs::from_secs(205)));
    assert_eq!(book.expire(UnixMs::from_secs(205)).len(), 1);
    assert_eq!(book.next_expiry(), None);
}

#[test]
fn ids_are_short_and_differ() {
    let (a, b) = (new_id(), new_id());
    assert_ne!(a, b);
    assert_eq!(id_text(0xa).len(), 8);
    assert_eq!(parse_id(&id_text(a)), Some(a));
    for text in [
        "0000000A",
        "a",
        "0000000a0",
        "-0000001",
        "+0000001",
        "0x000001",
    ] {
        assert_eq!(parse_id(text), None, "{text}");
    }
}

#[test]
fn colliding_ids_never_overwrite_a_grant() {
    let mut book = GrantBook::default();
    let mut same = || 0xcafe_0001;
    let (a, _) = ssh(&mut book, "192.0.2.1", "uid 0", 0, 60, &mut same);
    let (b, _) = ssh(&mut book, "192.0.2.2", "uid 0", 0, 60, &mut same);
    assert_ne!(a.id, b.id);
    assert_eq!(book.len(), 2);
    assert!(book.get(&a.id).is_some() && book.get(&b.id).is_some());
}

/// A book with two services, three holders, both address families, a recovered
/// grant and a window.
fn varied_book() -> GrantBook {
    let mut book = GrantBook::default();
    let mut id = ids();
    let at = UnixMs(1_800_000_000_123);
    for (service, addr, who) in [
        ("ssh", "192.0.2.1", "key alice"),
        ("web", "192.0.2.1", "key alice"),
        ("ssh", "2001:db8::7", "uid 0"),
        ("web", "198.51.100.9", "recovered"),
    ] {
        book.grant(
            service,
            ip(addr),
            who,
            at,
            Duration::from_millis(60_007),
            &mut id,
        );
    }
    let mut window = WindowRecord {
        id: "w1".to_owned(),
        scope: WindowScope::Cgroup(42),
        who: "uid 0".to_owned(),
        command: "apt upgrade".to_owned(),
        to: vec![ip("192.0.2.80")],
        granted_at: 0,
        expires_at: 0,
        granted_at_ms: 0,
        expires_at_ms: 0,
    };
    window.set_times(at, at.plus(Duration::from_secs(600)));
    book.open_window(window);
    book
}

#[test]
fn the_file_names_each_service_and_holder_once_and_reads_back_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("grants.json");
    let book = varied_book();
    book.save(&path).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text.matches("key alice").count(), 1, "{text}");
    assert!(text.starts_with(r#"{"version":2,"#), "{text}");
    let loaded = GrantBook::load(&path).unwrap();
    assert_eq!(loaded, book);
    assert_eq!(loaded.held_by("key alice"), 2);
    assert_eq!(loaded.next_expiry(), book.next_expiry());
    let record = loaded
        .iter()
        .find(|r| r.address == ip("2001:db8::7"))
        .unwrap();
    assert_eq!(
        (record.granted_at, record.expires_at),
        (1_800_000_000, 1_800_000_061)
    );
}

#[test]
fn a_book_of_format_one_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("grants.json");
    // What knockgate wrote before format 2 (pretty, every field spelled out).
    std::fs::write(
        &path,
        r#"{
  "grants": [
{"id": "000000a1", "service": "ssh", "address": "192.0.2.1", "who": "key alice",
 "granted_at": 100, "expires_at": 161, "granted_at_ms": 100250, "expires_at_ms": 160500}
  ],
  "windows": []
}"#,
    )
    .unwrap();
    let book = GrantBook::load(&path).unwrap();
    let record = book.get("000000a1").unwrap();
    assert_eq!(
        (record.granted_at_ms, record.expires_at_ms),
        (100_250, 160_500)
    );
    assert_eq!(record.who, "key alice");
    assert_eq!(book.next_expiry(), Some(UnixMs(160_500)));
}

#[test]
fn a_row_naming_a_service_or_holder_the_file_lacks_makes_it_damaged() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("grants.json");
    for row in [
        r#"["000000a1",1,"192.0.2.1",0,100000,160000]"#,
        r#"["000000a1",0,"192.0.2.1",9,100000,160000]"#,
        r#"["000000a1",18446744073709551615,"192.0.2.1",0,100000,160000]"#,
    ] {
        std::fs::write(
            &path,
            format!(r#"{{"version":2,"services":["ssh"],"holders":["uid 0"],"grants":[{row}],"windows":[]}}"#),
        )
        .unwrap();
        // Damaged: the start books nothing from it and reads the kernel's sets back.
        assert!(is_damaged(&GrantBook::load(&path)), "{row}");
    }
    std::fs::write(
        &path,
        r#"{"version":3,"services":["ssh"],"holders":["uid 0"],"grants":[["000000a1",0,"192.0.2.1",0,1,2]],"windows":[]}"#,
    )
    .unwrap();
    assert!(is_damaged(&GrantBook::load(&path)), "a later format");
}

#[test]
fn a_book_naming_an_id_or_a_hole_twice_is_damaged() {
    let window = r#"{"id":"000000f1","scope":{"cgroup":7},"who":"uid 0","command":"","to":[],"granted_at":0,"expires_at":1,"granted_at_ms":0,"expires_at_ms":1000}"#;
    for (what, grants, windows) in [
        (
            "one id twice",
            r#"["000000a1",0,"192.0.2.1",0,1,2000],["000000a1",0,"192.0.2.2",0,1,2000]"#,
            "",
        ),
        (
            "one hole twice",
            r#"["000000a1",0,"192.0.2.1",0,1,2000],["000000a2",0,"192.0.2.1",0,1,3000]"#,
            "",
        ),
        (
            "a grant's id on a window",
            r#"["000000f1",0,"192.0.2.1",0,1,2000]"#,
            window,
        ),
    ] {
        let text = format!(
            r#"{{"version":2,"services":["ssh"],"holders":["uid 0"],"grants":[{grants}],"windows":[{windows}]}}"#
        );
        assert_eq!(GrantBook::from_text(text.as_bytes()), None, "{what}");
    }
    // The same, well formed, is read.
    let text = format!(
        r#"{{"version":2,"services":["ssh"],"holders":["uid 0"],"grants":[["000000a1",0,"192.0.2.1",0,1,2000],["000000a2",0,"192.0.2.2",0,1,3000]],"windows":[{window}]}}"#
    );
    let book = GrantBook::from_text(text.as_bytes()).unwrap();
    assert_eq!((book.len(), book.windows().count()), (2, 1));
}

#[test]
fn a_restored_grant_whose_id_went_to_a_window_gets_a_fresh_one() {
    let mut book = GrantBook::default();
    let mut same = || 0xcafe_0001;
    let (grant, _) = ssh(&mut book, "192.0.2.1", "key a", 0, 60, &mut same);
    let revoked = book.revoke(&grant.id).unwrap();
    let mut window = WindowRecord {
        id: id_text(book.fresh_id(&mut same)),
        scope: WindowScope::Host,
        who: "uid 0".to_owned(),
        command: String::new(),
        to: Vec::new(),
        granted_at: 0,
        expires_at: 0,
        granted_at_ms: 0,
        expires_at_ms: 0,
    };
    window.set_times(UnixMs(0), UnixMs(60_000));
    book.open_window(window);
    assert_eq!(book.windows().next().unwrap().id, "cafe0001");
    book.restore(&revoked);
    let restored = book.iter().next().unwrap();
    assert_ne!(restored.id, "cafe0001");
    assert!(book.holds("ssh", ip("192.0.2.1")));
    let text = String::from_utf8(book.to_json()).unwrap();
    assert_eq!(
        GrantBook::from_text(text.as_bytes()),
        Some(book),
        "still one id each after a save"
    );
}

#[test]
fn a_torn_book_file_is_damaged_never_read_in_part() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("grants.json");
    let book = varied_book();
    let whole = book.to_json();
    for cut in 0..whole.len() {
        std::fs::write(&path, &whole[..cut]).unwrap();
        let loaded = GrantBook::load(&path);
        assert!(is_damaged(&loaded), "cut at {cut} read as {loaded:?}");
    }
    std::fs::write(&path, &whole).unwrap();
    assert_eq!(GrantBook::load(&path).unwrap(), book);
}

#[test]
fn a_book_in_whole_seconds_is_read_in_milliseconds() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("grants.json");
    // What knockgate 0.1 wrote: seconds only.
    std::fs::write(
        &path,
        r#"{"grants":[{"id":"000000a1","service":"ssh","address":"192.0.2.1","who":"uid 0","granted_at":100,"expires_at":160}],"windows":[]}"#,
    )
    .unwrap();
    let book = GrantBook::load(&path).unwrap();
    let record = book.get("000000a1").unwrap();
    assert_eq!(
        (record.granted_at_ms, record.expires_at_ms),
        (100_000, 160_000)
    );
    assert_eq!(book.next_expiry(), Some(UnixMs::from_secs(160)));
}

/// One step of [`the_indexes_agree_with_the_records_after_any_steps`].
#[derive(Debug, Clone)]
enum Step {
    Grant {
        service: u8,
        host: u8,
        who: u8,
        at: u16,
        ttl: u16,
    },
    Revoke(u8),
    Restore(u8),
    Expire(u16),
    Open {
        scope: u8,
        at: u16,
        ttl: u16,
    },
    Close(u8),
    ExpireWindows(u16),
    DropServices(u8),
    /// The kernel's set for a service holds the hosts in the mask, each `left`.
    Reconcile {
        service: u8,
        hosts: u8,
        now: u16,
        left: u16,
    },
    /// Saved and read back.
    Reload,
    /// The daemon is to close a grant at a time of its clock (0: leaves it to the
    /// kernel's timeout).
    CloseAt(u8, u16),
}

fn step() -> impl proptest::strategy::Strategy<Value = Step> {
    use proptest::prelude::*;
    prop_oneof![
        4 => (0..2u8, 0..6u8, 0..3u8, 0..500u16, 0..200u16)
            .prop_map(|(service, host, who, at, ttl)| Step::Grant { service, host, who, at, ttl }),
        1 => any::<u8>().prop_map(Step::Revoke),
        1 => any::<u8>().prop_map(Step::Restore),
        2 => (0..700u16).prop_map(Step::Expire),
        1 => (0..3u8, 0..500u16, 0..200u16).prop_map(|(scope, at, ttl)| Step::Open { scope, at, ttl }),
        1 => any::<u8>().prop_map(Step::Close),
        1 => (0..700u16).prop_map(Step::ExpireWindows),
        1 => (0..3u8).prop_map(Step::DropServices),
        1 => (0..2u8, any::<u8>(), 0..500u16, 0..300u16)
            .prop_map(|(service, hosts, now, left)| Step::Reconcile { service, hosts, now, left }),
        1 => Just(Step::Reload),
        2 => (any::<u8>(), 0..600u16).prop_map(|(n, at)| Step::CloseAt(n, at)),
    ]
}

/// What must hold after any change: the next expiry is the first end of what is
/// booked, each index is exactly what indexing the records anew gives, and there
/// is one record per service and address.
fn assert_indexes_agree(book: &GrantBook) {
    // The ends of what the kernel's timeouts close; the daemon's closes apart.
    let first = book
        .slots
        .iter()
        .filter(|s| s.close_us == 0)
        .map(Slot::ends)
        .chain(book.windows().map(WindowRecord::ends))
        .min();
    assert_eq!(book.next_expiry(), first);
    let first_close = book
        .slots
        .iter()
        .map(|s| s.close_us)
        .filter(|at| *at != 0)
        .min();
    assert_eq!(book.first_close(), first_close);
    let mut fresh = book.clone();
    fresh.rebuild_grant_ends();
    fresh.rebuild_window_ends();
    assert_eq!(book.grant_ends, fresh.grant_ends);
    assert_eq!(book.closes, fresh.closes);
    assert_eq!(book.window_ends, fresh.window_ends);
    let numbered = book.slots.iter().enumerate();
    let by_id: BTreeMap<GrantId, u32> = numbered
        .clone()
        .map(|(n, s)| (s.id, slot_number(n)))
        .collect();
    assert_eq!(book.by_id, by_id);
    let by_address: BTreeMap<(u32, IpAddr), u32> = numbered
        .map(|(n, s)| ((s.service, s.address), slot_number(n)))
        .collect();
    assert_eq!(book.by_address, by_address);
    assert_eq!(book.by_address.len(), book.len(), "one grant per hole");
    assert_names_counted(&book.services, book.slots.iter().map(|s| s.service));
    assert_names_counted(&book.holders, book.slots.iter().map(|s| s.who));
}

/// That `names` counts exactly `uses`, and knows exactly the names in use.
fn assert_names_counted(names: &Names, uses: impl Iterator<Item = u32>) {
    let mut counts = vec![0usize; names.by_number.len()];
    for n in uses {
        counts[n as usize] += 1;
    }
    assert_eq!(names.counts, counts);
    for (n, name) in names.by_number.iter().enumerate() {
        if counts[n] == 0 {
            assert!(name.is_empty(), "an unused number keeps no name");
        } else {
            assert_eq!(names.numbers.get(name), Some(&slot_number(n)));
        }
    }
    assert_eq!(
        names.numbers.len(),
        counts.iter().filter(|c| **c > 0).count()
    );
}

/// Ids from a pool of five, so that ids are drawn again, fall back to a suffix,
/// and come back to a revoked record's id.
fn pooled_ids() -> impl FnMut() -> GrantId {
    let mut n = 0;
    move || {
        n += 1;
        n % 5
    }
}

/// Expires grants at `now` and checks that exactly the due ones left to their kernel
/// timeouts went, earliest first (the daemon closes the others itself).
fn expire_and_check(book: &mut GrantBook, now: UnixMs) {
    let kernel_timed: Vec<String> = book
        .slots
        .iter()
        .filter(|s| s.close_us == 0)
        .map(|s| id_text(s.id))
        .collect();
    let before: Vec<GrantRecord> = book
        .iter()
        .filter(|r| kernel_timed.contains(&r.id))
        .collect();
    let gone = book.expire(now);
    assert_took_due(&before, &gone, now, GrantRecord::ends, |r| &r.id);
}

/// The same for windows.
fn expire_windows_and_check(book: &mut GrantBook, now: UnixMs) {
    let before: Vec<WindowRecord> = book.windows().cloned().collect();
    let gone = book.expire_windows(now);
    assert_took_due(&before, &gone, now, WindowRecord::ends, |w| &w.id);
}

/// That `gone` is exactly those of `before` due by `now`, earliest first.
fn assert_took_due<T>(
    before: &[T],
    gone: &[T],
    now: UnixMs,
    ends: impl Fn(&T) -> UnixMs,
    id: impl Fn(&T) -> &String,
) {
    assert!(
        gone.windows(2).all(|w| ends(&w[0]) <= ends(&w[1])),
        "earliest first"
    );
    let mut due: Vec<&String> = before.iter().filter(|b| ends(b) <= now).map(&id).collect();
    let mut gone: Vec<&String> = gone.iter().map(&id).collect();
    gone.sort();
    due.sort();
    assert_eq!(gone, due);
}

/// Has the daemon close grant `target` at `at` (0: leaves it to the kernel), and
/// checks it is due then, and only if it has a time.
fn close_and_check(book: &mut GrantBook, target: &str, at: u16) {
    let at = (at != 0).then_some(u64::from(at));
    book.close_at(parse_id(target).unwrap(), at);
    let slot = book.slots.iter().find(|s| id_text(s.id) == target).unwrap();
    assert_eq!(slot.close_us, at.unwrap_or(0));
    let due = book.closing_by(at.unwrap_or(0), usize::MAX);
    assert_eq!(due.iter().any(|r| r.id == target), at.is_some());
}

fn apply(
    book: &mut GrantBook,
    step: &Step,
    revoked: &mut Vec<GrantRecord>,
    id: &mut impl FnMut() -> GrantId,
) {
    let nth = |n: u8, ids: Vec<String>| {
        (!ids.is_empty()).then(|| ids[usize::from(n) % ids.len()].clone())
    };
    match *step {
        Step::Grant {
            service,
            host,
            who,
            at,
            ttl,
        } => {
            book.grant(
                ["ssh", "web"][usize::from(service)],
                IpAddr::from([192, 0, 2, host]),
                &format!("key k{who}"),
                UnixMs(u64::from(at)),
                Duration::from_millis(u64::from(ttl)),
                id,
            );
        }
        Step::Revoke(n) => {
            if let Some(target) = nth(n, book.iter().map(|r| r.id).collect()) {
                revoked.extend(book.revoke(&target));
            }
        }
        Step::Restore(n) => {
            if !revoked.is_empty() {
                let record = revoked.remove(usize::from(n) % revoked.len());
                book.restore(&record);
            }
        }
        Step::Expire(now) => expire_and_check(book, UnixMs(u64::from(now))),
        Step::Open { scope, at, ttl } => {
            let mut window = WindowRecord {
                id: id_text(book.fresh_id(id)),
                scope: WindowScope::Cgroup(u64::from(scope)),
                who: "uid 0".to_owned(),
                command: String::new(),
                to: Vec::new(),
                granted_at: 0,
                expires_at: 0,
                granted_at_ms: 0,
                expires_at_ms: 0,
            };
            window.set_times(
                UnixMs(u64::from(at)),
                UnixMs(u64::from(at) + u64::from(ttl)),
            );
            book.open_window(window);
        }
        Step::Close(n) => {
            if let Some(target) = nth(n, book.windows().map(|w| w.id.clone()).collect()) {
                book.close_window(&target);
            }
        }
        Step::ExpireWindows(now) => expire_windows_and_check(book, UnixMs(u64::from(now))),
        Step::DropServices(keep) => {
            let keep: &[&str] = match keep {
                0 => &["ssh"],
                1 => &["web"],
                _ => &["ssh", "web"],
            };
            revoked.extend(book.drop_services_except(keep));
        }
        Step::Reconcile {
            service,
            hosts,
            now,
            left,
        } => {
            let kernel: Vec<Element> = (0..6u8)
                .filter(|h| hosts & (1 << h) != 0)
                .map(|h| Element {
                    key: crate::ruleset::ElementKey::Addr(IpAddr::from([192, 0, 2, h])),
                    expires_in: Some(Duration::from_millis(u64::from(left))),
                })
                .collect();
            book.reconcile(
                ["ssh", "web"][usize::from(service)],
                &kernel,
                UnixMs(u64::from(now)),
                id,
            );
        }
        Step::Reload => {
            let text = String::from_utf8(book.to_json()).unwrap();
            let loaded = GrantBook::from_text(text.as_bytes()).expect("a saved book reads back");
            assert_eq!(&loaded, book);
            // The daemon's closes are its own process's: a load leaves every grant
            // to its kernel timeout.
            assert!(loaded.closes.is_empty());
            *book = loaded;
        }
        Step::CloseAt(n, at) => {
            if let Some(target) = nth(n, book.iter().map(|r| r.id).collect()) {
                close_and_check(book, &target, at);
            }
        }
    }
}

proptest::proptest! {
    /// Whatever is granted, extended, revoked, restored, opened, closed or expired,
    /// in any order, the indexes (ends, addresses, holders) agree with the records.
    #[test]
    fn the_indexes_agree_with_the_records_after_any_steps(steps in proptest::collection::vec(step(), 1..60)) {
        let mut book = GrantBook::default();
        let mut revoked = Vec::new();
        let mut id = pooled_ids();
        for step in &steps {
            apply(&mut book, step, &mut revoked, &mut id);
            assert_indexes_agree(&book);
        }
    }
}

#[test]
fn a_grant_whose_id_knockgate_would_not_write_gets_a_fresh_one() {
    // Format 1 from an old fallback (`{id}-{n}`), and a format 2 row alike.
    let v1 = r#"{"grants":[{"id":"cafe0001-1","service":"ssh","address":"192.0.2.1","who":"uid 0","granted_at":1,"expires_at":2,"granted_at_ms":1000,"expires_at_ms":2000}],"windows":[]}"#;
    let v2 = r#"{"version":2,"services":["ssh"],"holders":["uid 0"],"grants":[["G1",0,"192.0.2.1",0,1000,2000],["0000000b",0,"192.0.2.2",0,1000,2000]],"windows":[]}"#;
    for text in [v1, v2] {
        let book = GrantBook::from_text(text.as_bytes()).unwrap();
        let record = book.iter().find(|r| r.address == ip("192.0.2.1")).unwrap();
        assert_eq!(parse_id(&record.id).map(id_text), Some(record.id.clone()));
        assert_eq!(book.get(&record.id).unwrap().ends(), UnixMs(2000));
        assert_indexes_agree(&book);
    }
    // Named twice, such a hole is still damaged.
    let twice = r#"{"version":2,"services":["ssh"],"holders":["uid 0"],"grants":[["G1",0,"192.0.2.1",0,1000,2000],["0000000b",0,"192.0.2.1",0,1000,2000]],"windows":[]}"#;
    assert_eq!(GrantBook::from_text(twice.as_bytes()), None);
}

#[test]
fn rows_before_their_tables_are_damaged() {
    // knockgate writes the tables first, and reads each row into the book as it
    // comes: a row cannot wait for tables that may never come.
    let text = r#"{"grants":[["0000000a",0,"192.0.2.1",0,1000,2000]],"version":2,"services":["ssh"],"holders":["uid 0"],"windows":[]}"#;
    assert_eq!(GrantBook::from_text(text.as_bytes()), None);
    let text = r#"{"version":2,"services":["ssh"],"holders":["uid 0"],"grants":[["0000000a",0,"192.0.2.1",0,1000,2000]],"windows":[]}"#;
    assert_eq!(
        GrantBook::from_text(text.as_bytes()).map(|b| b.len()),
        Some(1)
    );
}

#[test]
fn a_name_no_grant_uses_is_forgotten_and_its_number_used_again() {
    let mut book = GrantBook::default();
    let mut id = ids();
    let at = UnixMs(1_000);
    let (a, _) = book.grant(
        "ssh",
        ip("192.0.2.1"),
        "key a",
        at,
        Duration::from_secs(9),
        &mut id,
    );
    book.grant(
        "web",
        ip("192.0.2.1"),
        "key b",
        at,
        Duration::from_secs(9),
        &mut id,
    );
    book.revoke(&a.id);
    assert_eq!(
        (book.held_by("key a"), book.holds("ssh", ip("192.0.2.1"))),
        (0, false)
    );
    let (c, _) = book.grant(
        "mail",
        ip("192.0.2.3"),
        "key c",
        at,
        Duration::from_secs(9),
        &mut id,
    );
    assert_eq!((c.service.as_str(), c.who.as_str()), ("mail", "key c"));
    assert_eq!(
        book.services.by_number.len(),
        2,
        "ssh's number went to mail"
    );
    assert_eq!(
        book.holders.by_number.len(),
        2,
        "key a's number went to key c"
    );
    assert!(!book.holds("ssh", ip("192.0.2.3")));
    assert_indexes_agree(&book);
    let text = String::from_utf8(book.to_json()).unwrap();
    assert_eq!(GrantBook::from_text(text.as_bytes()), Some(book));
}

#[test]
fn pages_list_every_grant_once_by_id_whatever_their_size() {
    let mut book = GrantBook::default();
    let mut id = pooled_ids();
    for host in 0..=200u8 {
        let service = if host % 3 == 0 { "web" } else { "ssh" };
        book.grant(
            service,
            IpAddr::from([192, 0, 2, host]),
            "k",
            UnixMs(0),
            Duration::from_secs(9),
            &mut id,
        );
    }
    let all: Vec<String> = book.sorted().into_iter().map(|r| r.id).collect();
    assert_eq!(all.len(), 201);
    for limit in [1, 7, 200, 201, 500] {
        let (mut seen, mut after) = (Vec::new(), None);
        loop {
            let (page, next) = book.page(after, limit);
            assert!(page.len() <= limit);
            seen.extend(page.into_iter().map(|r| r.id));
            match next {
                Some(last) => {
                    assert_eq!(id_text(last), *seen.last().unwrap());
                    after = Some(last);
                }
                None => break,
            }
        }
        assert_eq!(seen, all, "limit {limit}");
    }
    // After a grant that is gone: from the next id on.
    let third = all[2].clone();
    book.revoke(&third);
    let (page, _) = book.page(parse_id(&third), 1);
    assert_eq!(page[0].id, all[3]);
}

#[test]
fn an_ipv4_address_is_one_hole_however_it_is_written() {
    let mapped = ip("::ffff:192.0.2.1");
    let mut book = GrantBook::default();
    let mut id = ids();
    let (first, _) = ssh(&mut book, "192.0.2.1", "key a", 100, 60, &mut id);
    let (again, kind) = book.grant(
        "ssh",
        mapped,
        "key a",
        UnixMs::from_secs(110),
        Duration::from_secs(60),
        &mut id,
    );
    assert_eq!(
        (kind, again.id, again.address),
        (Granted::Extended, first.id, ip("192.0.2.1"))
    );
    assert!(book.holds("ssh", mapped));
    // The kernel holding it both ways (someone added the mapped form to the v6 set):
    // one record, not two elements for one address in the v4 set.
    let kernel = [
        Element {
            key: ip("192.0.2.1").into(),
            expires_in: Some(Duration::from_secs(40)),
        },
        Element {
            key: mapped.into(),
            expires_in: Some(Duration::from_secs(50)),
        },
    ];
    book.reconcile("ssh", &kernel, UnixMs::from_secs(120), &mut id);
    assert_eq!(book.len(), 1);
    assert_indexes_agree(&book);
    // A file naming it both ways names one hole twice: damaged.
    let text = r#"{"version":2,"services":["ssh"],"holders":["uid 0"],"grants":[["0000000a",0,"192.0.2.1",0,1,2000],["0000000b",0,"::ffff:192.0.2.1",0,1,2000]],"windows":[]}"#;
    assert_eq!(GrantBook::from_text(text.as_bytes()), None);
}

#[test]
fn a_field_twice_or_a_version_on_the_old_format_is_damaged() {
    let row = r#"["0000000a",0,"192.0.2.1",0,1,2000]"#;
    let other = r#"["0000000b",0,"192.0.2.2",0,1,2000]"#;
    for text in [
        format!(
            r#"{{"version":2,"services":["ssh"],"holders":["a"],"grants":[{row}],"grants":[{other}],"windows":[]}}"#
        ),
        format!(
            r#"{{"version":2,"services":["ssh"],"holders":["a"],"grants":[{row}],"windows":[],"windows":[]}}"#
        ),
        format!(
            r#"{{"version":2,"services":["ssh"],"holders":["a"],"grants":[{row}],"services":["web"],"windows":[]}}"#
        ),
        r#"{"version":3,"grants":[],"windows":[]}"#.to_owned(),
    ] {
        assert_eq!(GrantBook::from_text(text.as_bytes()), None, "{text}");
    }
}

#[test]
fn a_read_back_end_keeps_the_booked_one_only_if_the_kernel_keeps_it() {
    let element = |ms| Element {
        key: ip("192.0.2.1").into(),
        expires_in: Some(Duration::from_millis(ms)),
    };
    for (left, want) in [
        // What knockgate asks for (the TTL and a tick or two): the book's end stands.
        (10_008, 10_000),
        (10_004, 10_000),
        // Someone shortened it: the port closes before the booked end, so the
        // kernel's (less the tick every timeout has) is the end.
        (9_992, 9_988),
        // Far longer (someone lengthened it): the kernel's.
        (60_000, 59_996),
    ] {
        let mut book = GrantBook::default();
        let mut id = ids();
        ssh(&mut book, "192.0.2.1", "key a", 0, 10, &mut id);
        book.reconcile("ssh", &[element(left)], UnixMs(0), &mut id);
        assert_eq!(
            book.iter().next().unwrap().expires_at_ms,
            want,
            "{left} ms left"
        );
    }
}
