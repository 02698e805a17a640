//! Protocol tests: round trips, every shape refusal, MAC binding, replay guard, and
//! property tests that decode never panics and that any single-bit change is caught.

use std::net::{Ipv4Addr, Ipv6Addr};

use proptest::prelude::*;

use super::auth::{IdError, ServerId, seal, verify};
use super::packet::{PACKET_LEN, ShapeError, decode};
use super::replay::{ReplayError, ReplayGuard};
use super::*;

fn secret(byte: u8) -> Secret {
    Secret::from_hex(&format!("{byte:02x}").repeat(32)).unwrap()
}

fn server() -> ServerId {
    ServerId::new("web1.example.org").unwrap()
}

fn knock(address: AddressClaim) -> Knock {
    Knock {
        key_id: KeyId::new("alice-laptop").unwrap(),
        service: ServiceId::ssh(),
        timestamp: 1_790_000_000,
        nonce: [7; 16],
        ttl_secs: 1800,
        address,
    }
}

fn accepts(bytes: &[u8], secret: &Secret, server: &ServerId) -> bool {
    decode(bytes).is_ok_and(|d| verify(secret, server, d.signed, d.mac))
}

#[test]
fn round_trip_for_every_address_kind() {
    for address in [
        AddressClaim::PacketSource,
        AddressClaim::V4(Ipv4Addr::new(198, 51, 100, 7)),
        AddressClaim::V6("2001:db8::7".parse::<Ipv6Addr>().unwrap()),
    ] {
        let k = knock(address);
        let bytes = seal(&k, &secret(1), &server());
        assert_eq!(bytes.len(), PACKET_LEN);
        let decoded = decode(&bytes).unwrap();
        assert_eq!(decoded.knock, k);
        assert!(verify(&secret(1), &server(), decoded.signed, decoded.mac));
    }
}

#[test]
fn wrong_key_fails_the_mac() {
    let bytes = seal(&knock(AddressClaim::PacketSource), &secret(1), &server());
    assert!(!accepts(&bytes, &secret(2), &server()));
}

#[test]
fn knock_for_another_server_fails_the_mac() {
    let bytes = seal(&knock(AddressClaim::PacketSource), &secret(1), &server());
    let other = ServerId::new("web2.example.org").unwrap();
    assert!(!accepts(&bytes, &secret(1), &other));
}

#[test]
fn every_shape_error_is_reported() {
    let good = seal(&knock(AddressClaim::PacketSource), &secret(1), &server());
    let with = |i: usize, v: u8| {
        let mut b = good.clone();
        b[i] = v;
        b
    };
    assert_eq!(decode(&[]).err(), Some(ShapeError::Size(0)));
    assert_eq!(decode(&good[..113]).err(), Some(ShapeError::Size(113)));
    assert_eq!(decode(&[0u8; 300]).err(), Some(ShapeError::Size(300)));
    assert_eq!(decode(&with(0, b'X')).err(), Some(ShapeError::Magic));
    assert_eq!(decode(&with(2, 3)).err(), Some(ShapeError::Version(3)));
    assert_eq!(
        decode(&with(2, 2)).err(),
        Some(ShapeError::Size(114)),
        "version 2 is 118 bytes"
    );
    assert_eq!(decode(&with(3, 9)).err(), Some(ShapeError::Service(9)));
    assert_eq!(decode(&with(32, 5)).err(), Some(ShapeError::Address));
    assert_eq!(
        decode(&with(40, 1)).err(),
        Some(ShapeError::Address),
        "padding of kind 0"
    );
    assert_eq!(decode(&with(49, 0)).err(), Some(ShapeError::KeyId));
    assert_eq!(decode(&with(49, 33)).err(), Some(ShapeError::KeyId));
    assert_eq!(decode(&with(50, b' ')).err(), Some(ShapeError::KeyId));
    assert_eq!(
        decode(&with(81, 1)).err(),
        Some(ShapeError::KeyId),
        "key id padding"
    );
}

#[test]
fn version_2_names_any_service_by_id_and_keeps_ssh_on_version_1() {
    let mut k = knock(AddressClaim::PacketSource);
    k.service = ServiceId::of("wireguard");
    let v2 = seal(&k, &secret(1), &server());
    assert_eq!((v2.len(), v2[2], v2[3]), (118, 2, 0));
    assert_eq!(v2[82..86], ServiceId::of("wireguard").0.to_be_bytes());
    let decoded = decode(&v2).unwrap();
    assert_eq!(decoded.knock, k);
    assert_eq!(decoded.signed.len(), 86);
    assert!(accepts(&v2, &secret(1), &server()));
    // The service id is signed: another id fails the MAC.
    let mut other = v2.clone();
    other[85] ^= 1;
    assert!(!accepts(&other, &secret(1), &server()));
    // Byte 3 must be 0 in version 2; version 1 at 118 bytes is no knock.
    let mut bad = v2.clone();
    bad[3] = 1;
    assert_eq!(decode(&bad).err(), Some(ShapeError::Service(1)));
    let mut v1_long = v2.clone();
    v1_long[2] = 1;
    assert_eq!(decode(&v1_long).err(), Some(ShapeError::Size(118)));
    // ssh goes out as version 1, which every knockgate server takes.
    k.service = ServiceId::ssh();
    let v1 = seal(&k, &secret(1), &server());
    assert_eq!((v1.len(), v1[2], v1[3]), (114, 1, 1));
}

#[test]
fn ipv4_claim_padding_must_be_zero() {
    let mut b = seal(
        &knock(AddressClaim::V4(Ipv4Addr::LOCALHOST)),
        &secret(1),
        &server(),
    );
    b[40] = 1;
    assert_eq!(decode(&b).err(), Some(ShapeError::Address));
}

#[test]
fn key_ids_follow_their_rules() {
    assert!(KeyId::new("a").is_ok());
    assert!(KeyId::new("alice.laptop_2-x").is_ok());
    assert_eq!(KeyId::new(""), Err(IdError::KeyId));
    assert_eq!(KeyId::new(&"a".repeat(33)), Err(IdError::KeyId));
    assert_eq!(KeyId::new("alice laptop"), Err(IdError::KeyId));
    assert_eq!(KeyId::new("ålice"), Err(IdError::KeyId));
}

#[test]
fn secrets_round_trip_through_hex_and_refuse_junk() {
    let s = Secret::generate().unwrap();
    let again = Secret::from_hex(&format!("  {}\n", s.to_hex().as_str())).unwrap();
    assert_eq!(s.to_hex(), again.to_hex());
    assert!(Secret::from_hex("abcd").is_err());
    assert!(Secret::from_hex(&"g".repeat(64)).is_err());
    assert_ne!(
        Secret::generate().unwrap().to_hex(),
        s.to_hex(),
        "keys are random"
    );
}

#[test]
fn replay_guard_refuses_a_nonce_twice() {
    let mut guard = ReplayGuard::new(10);
    assert_eq!(guard.admit([1; 16], 100, 50), Ok(()));
    assert_eq!(guard.admit([1; 16], 100, 60), Err(ReplayError::Replayed));
    assert_eq!(guard.admit([2; 16], 100, 60), Ok(()));
}

#[test]
fn replay_guard_is_bounded_and_fails_closed() {
    let mut guard = ReplayGuard::new(2);
    guard.admit([1; 16], 100, 0).unwrap();
    guard.admit([2; 16], 200, 0).unwrap();
    assert_eq!(guard.admit([3; 16], 300, 50), Err(ReplayError::Full));
    // Once the first nonce's time has passed, there is room again.
    assert_eq!(guard.admit([3; 16], 300, 101), Ok(()));
    assert_eq!(guard.len(), 2);
}

#[test]
fn replay_guard_keeps_nonces_until_their_time() {
    let mut guard = ReplayGuard::new(10);
    guard.admit([1; 16], 100, 0).unwrap();
    guard.expire(100);
    assert_eq!(guard.admit([1; 16], 200, 100), Err(ReplayError::Replayed));
    guard.expire(101);
    assert!(guard.is_empty());
}

#[test]
fn one_key_cannot_fill_the_replay_guard_for_everyone() {
    let mut guard = ReplayGuard::new(32); // quota: 2 per key
    guard.admit_for("junk", [1; 16], 100, 0).unwrap();
    guard.admit_for("junk", [2; 16], 100, 0).unwrap();
    assert_eq!(
        guard.admit_for("junk", [3; 16], 100, 0),
        Err(ReplayError::KeyQuota)
    );
    assert_eq!(guard.admit_for("laptop", [4; 16], 100, 0), Ok(()));
    // The quota frees up as the key's nonces expire.
    assert_eq!(guard.admit_for("junk", [3; 16], 200, 101), Ok(()));
}

#[test]
fn a_clock_stepped_back_cannot_revive_a_forgotten_nonce() {
    // The injected clock: the server's `now`, which runs ahead and is stepped back.
    let mut guard = ReplayGuard::new(10);
    let captured = [9; 16];
    guard.admit_for("laptop", captured, 1030, 1000).unwrap(); // knock at t=1000, skew 30
    guard.expire(1000 + 3600); // the clock ran an hour ahead: the nonce is forgotten
    assert!(guard.is_empty());
    assert_eq!(guard.floor(), 1030);
    // Stepped back to t=1010: the captured knock would pass the clock check again,
    // but not the guard.
    assert_eq!(
        guard.admit_for("laptop", captured, 1030, 1010),
        Err(ReplayError::BeforeFloor)
    );
    // A fresh knock from the corrected clock (t=1010 → forget after 1040) is taken.
    assert_eq!(guard.admit_for("laptop", [10; 16], 1040, 1010), Ok(()));
}

fn any_knock() -> impl Strategy<Value = Knock> {
    let address = prop_oneof![
        Just(AddressClaim::PacketSource),
        any::<[u8; 4]>().prop_map(|b| AddressClaim::V4(Ipv4Addr::from(b))),
        any::<[u8; 16]>().prop_map(|b| AddressClaim::V6(Ipv6Addr::from(b))),
    ];
    (
        "[A-Za-z0-9._-]{1,32}",
        any::<u64>(),
        any::<[u8; 16]>(),
        any::<u32>(),
        address,
    )
        .prop_map(|(id, timestamp, nonce, ttl_secs, address)| Knock {
            key_id: KeyId::new(&id).unwrap(),
            service: ServiceId::ssh(),
            timestamp,
            nonce,
            ttl_secs,
            address,
        })
}

proptest! {
    #[test]
    fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = decode(&bytes);
    }

    #[test]
    fn decode_never_panics_on_right_sized_junk(bytes in proptest::array::uniform32(any::<u8>()), tail in proptest::collection::vec(any::<u8>(), 82..=82)) {
        let mut datagram = tail;
        datagram.extend_from_slice(&bytes);
        let _ = decode(&datagram);
    }

    #[test]
    fn encode_decode_round_trips(k in any_knock(), key in any::<u8>()) {
        let bytes = seal(&k, &secret(key), &server());
        let decoded = decode(&bytes).unwrap();
        prop_assert_eq!(&decoded.knock, &k);
        prop_assert!(verify(&secret(key), &server(), decoded.signed, decoded.mac));
    }

    #[test]
    fn any_single_bit_flip_is_refused(k in any_knock(), bit in 0usize..PACKET_LEN * 8) {
        let mut bytes = seal(&k, &secret(3), &server());
        bytes[bit / 8] ^= 1 << (bit % 8);
        prop_assert!(!accepts(&bytes, &secret(3), &server()));
    }
}

mod authenticate {
    use super::*;
    use crate::knock::verify::{Refusal, authenticate};

    const NOW: u64 = 1_790_000_000;

    fn ring(id: &KeyId) -> Option<&'static Secret> {
        static KEY: std::sync::OnceLock<Secret> = std::sync::OnceLock::new();
        (id.as_str() == "alice-laptop").then(|| KEY.get_or_init(|| secret(1)))
    }

    fn sealed(timestamp: u64, key: u8, id: &str) -> Vec<u8> {
        let mut k = knock(AddressClaim::PacketSource);
        k.timestamp = timestamp;
        k.key_id = KeyId::new(id).unwrap();
        seal(&k, &secret(key), &server())
    }

    #[test]
    fn an_authentic_timely_knock_passes() {
        let k = authenticate(
            &sealed(NOW + 5, 1, "alice-laptop"),
            ring,
            &server(),
            NOW,
            30,
        )
        .unwrap();
        assert_eq!(k.timestamp, NOW + 5);
    }

    #[test]
    fn refusals_in_check_order() {
        let r = |bytes: &[u8]| authenticate(bytes, ring, &server(), NOW, 30).unwrap_err();
        assert_eq!(r(&[0u8; 10]), Refusal::Shape(ShapeError::Size(10)));
        let unknown = KeyId::new("mallory").unwrap();
        assert_eq!(r(&sealed(NOW, 1, "mallory")), Refusal::UnknownKey(unknown));
        let alice = KeyId::new("alice-laptop").unwrap();
        assert_eq!(
            r(&sealed(NOW, 2, "alice-laptop")),
            Refusal::BadMac(alice.clone())
        );
        // A forged knock with a bad clock is reported as forged, not as a clock problem.
        assert_eq!(
            r(&sealed(NOW - 500, 2, "alice-laptop")),
            Refusal::BadMac(alice.clone())
        );
        assert_eq!(
            r(&sealed(NOW - 31, 1, "alice-laptop")),
            Refusal::Clock {
                key: alice.clone(),
                skew_secs: -31
            }
        );
        assert_eq!(
            r(&sealed(NOW + 31, 1, "alice-laptop")),
            Refusal::Clock {
                key: alice,
                skew_secs: 31
            }
        );
    }

    /// The daemon's path: the key's MAC state is asked for only once the datagram
    /// decodes, and at most once; so each datagram costs at most one HMAC, and junk
    /// or an unknown key id none.
    #[test]
    fn at_most_one_hmac_per_datagram_and_none_for_junk() {
        use super::super::auth::KnockMac;
        let alice = KeyId::new("alice-laptop").unwrap();
        let ready = KnockMac::new(&secret(1), &server());
        let asked = std::cell::Cell::new(0);
        let mac_for = |id: &KeyId| {
            asked.set(asked.get() + 1);
            (id == &alice).then(|| ready.clone())
        };
        let run = |bytes: &[u8]| {
            asked.set(0);
            let result = super::super::verify::authenticate_with(bytes, mac_for, NOW, 30);
            (result.is_ok(), asked.get())
        };
        assert_eq!(run(&[0u8; 114]), (false, 0), "junk: no HMAC");
        assert_eq!(run(&sealed(NOW, 1, "alice-laptop")), (true, 1));
        assert_eq!(
            run(&sealed(NOW, 2, "alice-laptop")),
            (false, 1),
            "bad MAC: one"
        );
        assert_eq!(
            run(&sealed(NOW, 1, "mallory")),
            (false, 1),
            "unknown: no state, no HMAC"
        );
    }

    #[test]
    fn the_skew_window_is_inclusive() {
        for ts in [NOW - 30, NOW + 30] {
            assert!(authenticate(&sealed(ts, 1, "alice-laptop"), ring, &server(), NOW, 30).is_ok());
        }
    }
}
