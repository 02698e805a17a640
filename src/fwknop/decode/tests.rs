//! The real packets of `../shared/research/fwknop-interop.md` §2 (Debian's fwknop
//! 2.6.10 client, throwaway keys), and the decoder against any input.

use base64::Engine as _;
use proptest::prelude::*;

use super::*;

const K: &str = "Bk5nxiS1D+gqVlc1ZrQGC82GR6ILjYxhiQqe7nMo3tg=";
const H: &str =
    "wYq5pkqWGWbhxpQsqvffKaPUB8Ovqm5roFg7SzWdEVNZUcBKwnlL4hxbEsrUpyAATa5JnNVjDGHVyg/4ft/LsA==";
const PKT1: &str = "/xpzPIO+y45Emb2nc/x/QTK3GVdTTMm3EDpc2jMtA+PFK7amMVcigpfjmD6yIdhr/DDla6bLUr3xMfK+rHkrOBg6syDta5aE+9d+C7TPmrk2eVc/dGSRewE8YwznOg0JbbggyE4XIEBU7e2HgK94qplskAG3jn3N85Uldu7j9/HpCQbPm+Xby3iZgDfnms/WQL3/80Sapw1U";
const PKT2: &str = "+7awz7KpLz5aVT5N5mE6cd8o4wqZ91j+xSDofbm8Q2iG+K/ZxHIXnsf7yyTw/Klq5DGCcEZH+a0quDRmBw1KMP3RdxORf/nDS2W8M1PedGp44pZkXHlGiCilpJSqM4eJbAeIfs7o46hbh3XJsI4ZpIkBQSa9VZi5Focr6ykGJ9OaCnMWVd2+txcckm9B8h2N1E5Gl7q5x53uiBFUAW3D7FQ1QxPHZ9OR8";
const PKT3: &str = "8CIJQ3gYcK+/yVAPS3scaFskHnXQwYbV8A5NYfft08amUm/F+HJ1rKI5M50wAQJ4CpMDoXxqsWN0HGrTSpIobUAmHdRBxBdo/uRrCkJd736VrJbux0DiTGYXnCH2WUprlQIPOK4skTOeD94cH1ubqiiVwscbI5Lqt8exKszlTYkI8Uwxtcp29YnIGEkAg0aNnwQtdA0w8FmTLyHgnQbtr2BGBKVHndFb8";
const PKT4: &str = "8c9/XDljip8xfGdRpIr0F0kzQAK9BKwOFL69bZOhdOwYRG+SDbHqaZmunSD9kHWcwLH15Vzqsc2DVqTXfIJvWYfsHHNLtd/cbrvgLbbscBy4CoxO6eNQXU9rULwTFbigH4phKGsJUsih/Y61NlNt/miyCaoouVhnqsr/Nz0aBkt2XWE7EfxQI40TNFR0+Gw+725DrkgKGVM5QtcXWDW2JKkQhVQCEzpT8SlP6mxvqoxb5OgWckWJDdPI0+FdrbbBWatYU/BY2uTUHDm5AeN1PibPZw06lO6Fvu6Kp3xAXt/lP6YaV00WBYg";
const PKT5: &str = "96NyqGnOQrQKjdqYArARI/JrETws7qkK5jLXa+7eYTw472VbeO586DN0oFMDCyOzXPeqEfC3Uka1o27FFlX6iAnCCuaa2CUYhLh735TOqqO6oqH8UpSZvEI/68Y9GoCgb2vJ0mtMElKQ1/qOy6IUT7Z3z7k+/39bkdi+L733EKSUW/xzvoeX7BT0WjrL53Y5+lRj9NBlqblY";

fn keys(digest: HmacDigest) -> SpaKeys {
    let std = base64::engine::general_purpose::STANDARD;
    SpaKeys {
        encryption: Zeroizing::new(std.decode(K).unwrap()),
        hmac: Zeroizing::new(std.decode(H).unwrap()),
        digest,
    }
}

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

#[test]
fn the_real_clients_access_packet_decodes() {
    let opened = open(PKT1.as_bytes(), &[keys(HmacDigest::Sha256)]).unwrap();
    assert_eq!(opened.key, 0);
    let r = opened.request;
    assert_eq!(
        (r.user.as_str(), r.timestamp, r.address, r.client_timeout),
        ("root", 1_796_227_223, Some(ip("192.0.2.10")), None)
    );
    assert_eq!(r.ports, vec![(Protocol::Tcp, 22)]);
    assert_eq!(
        opened.digest,
        <[u8; 32]>::from(Sha256::digest(PKT1.as_bytes()))
    );
}

#[test]
fn a_timeout_request_with_two_ports_and_a_chosen_user_decodes() {
    let r = open(PKT2.as_bytes(), &[keys(HmacDigest::Sha256)])
        .unwrap()
        .request;
    assert_eq!(r.user, "alice");
    assert_eq!(r.client_timeout, Some(60));
    assert_eq!(r.ports, vec![(Protocol::Tcp, 22), (Protocol::Udp, 51820)]);
    let sent = open(PKT5.as_bytes(), &[keys(HmacDigest::Sha256)])
        .unwrap()
        .request;
    assert_eq!(sent.address, Some(ip("10.77.0.2")));
}

#[test]
fn nat_messages_are_refused_after_the_mac() {
    assert_eq!(
        open(PKT3.as_bytes(), &[keys(HmacDigest::Sha256)]),
        Err(Refusal::Type {
            key: 0,
            kind: MessageType::Nat
        })
    );
}

#[test]
fn sha512_hmac_and_digest_decode_with_a_sha512_stanza_only() {
    assert_eq!(
        open(PKT4.as_bytes(), &[keys(HmacDigest::Sha256)]),
        Err(Refusal::NoKeyMatched)
    );
    let opened = open(
        PKT4.as_bytes(),
        &[keys(HmacDigest::Sha256), keys(HmacDigest::Sha512)],
    )
    .unwrap();
    assert_eq!(opened.key, 1, "the second stanza's key matched");
    assert_eq!(opened.request.ports, vec![(Protocol::Tcp, 22)]);
}

#[test]
fn a_wrong_hmac_key_or_a_wrong_encryption_key_opens_nothing() {
    let mut wrong_hmac = keys(HmacDigest::Sha256);
    wrong_hmac.hmac[0] ^= 1;
    assert_eq!(
        open(PKT1.as_bytes(), &[wrong_hmac]),
        Err(Refusal::NoKeyMatched)
    );
    let mut wrong_key = keys(HmacDigest::Sha256);
    wrong_key.encryption[0] ^= 1;
    assert!(
        matches!(
            open(PKT1.as_bytes(), &[wrong_key]),
            Err(Refusal::Content { key: 0, .. })
        ),
        "the MAC matches; the content does not decrypt"
    );
    // Any change to the packet fails the MAC.
    let mut flipped = PKT1.as_bytes().to_vec();
    flipped[50] = if flipped[50] == b'A' { b'B' } else { b'A' };
    assert_eq!(
        open(&flipped, &[keys(HmacDigest::Sha256)]),
        Err(Refusal::NoKeyMatched)
    );
}

#[test]
fn a_tag_respelt_in_its_spare_bits_is_refused() {
    // 'U' and 'V' differ only in the last symbol's two spare bits: the same MAC bytes,
    // another packet (and another replay digest) — refused, as fwknop compares text.
    let mut respelt = PKT1.as_bytes().to_vec();
    assert_eq!(respelt[203], b'U');
    respelt[203] = b'V';
    assert_eq!(
        open(&respelt, &[keys(HmacDigest::Sha256)]),
        Err(Refusal::NoKeyMatched)
    );
}

#[test]
fn the_key_derivation_matches_openssls() {
    // pkt1's intermediate values (research file): salt → AES key and IV.
    let salt = [0xf1, 0xa7, 0x33, 0xc8, 0x3b, 0xec, 0xb8, 0xe4];
    let raw = base64::engine::general_purpose::STANDARD.decode(K).unwrap();
    let (key, iv) = bytes_to_key(&raw, &salt);
    let hex = |b: &[u8]| {
        use std::fmt::Write as _;
        b.iter().fold(String::new(), |mut out, x| {
            let _ = write!(out, "{x:02x}");
            out
        })
    };
    assert_eq!(
        hex(&key[..]),
        "0eb1aee62249e4f0e27bb08187e49a95d859ef2aaf119b7cc0f2d2007c413de6"
    );
    assert_eq!(hex(&iv[..]), "d64d5000415b1523fd771b4b355ccb94");
}

#[test]
fn shapes_that_cannot_be_spa_are_told_apart_before_any_mac() {
    assert!(looks_like_spa(PKT1.as_bytes()));
    assert!(!looks_like_spa(&[b'A'; 139]), "too short");
    assert!(
        looks_like_spa(&[b'A'; 400]),
        "GPG length: routed to fwknop…"
    );
    assert!(
        matches!(open(&[b'A'; 400], &[keys(HmacDigest::Sha256)]), Err(Refusal::Shape(why)) if why.contains("GPG")),
        "…and refused there, saying why"
    );
    assert!(!looks_like_spa(&[b'A'; 1501]));
    let mut native = vec![b'K', b'G', 1, 1];
    native.resize(114, 0);
    assert!(!looks_like_spa(&native), "a native knock is not base64");
    let prefixed = format!("{SALTED_PREFIX}{PKT1}");
    assert!(!looks_like_spa(prefixed.as_bytes()), "the prefix re-added");
    let mut spaced = PKT1.as_bytes().to_vec();
    spaced[10] = b' ';
    assert!(!looks_like_spa(&spaced));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn any_bytes_are_refused_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        prop_assert!(open(&bytes, &[keys(HmacDigest::Sha256)]).is_err());
    }

    #[test]
    fn any_base64_of_a_packets_length_is_refused_without_panic(
        text in "[A-Za-z0-9+/]{140,399}"
    ) {
        prop_assert!(open(text.as_bytes(), &[keys(HmacDigest::Sha256), keys(HmacDigest::Sha512)]).is_err());
    }

    #[test]
    fn a_real_packet_with_any_byte_changed_is_refused(pos in 0usize..204, byte in any::<u8>()) {
        let mut p = PKT1.as_bytes().to_vec();
        prop_assume!(p[pos] != byte);
        p[pos] = byte;
        prop_assert!(open(&p, &[keys(HmacDigest::Sha256)]).is_err());
    }

    /// Past the MAC: plaintexts of every shape (as a key holder could send) decode or
    /// are refused, never panic.
    #[test]
    fn any_plaintext_is_decoded_or_refused_without_panic(text in "[ -~]{0,300}") {
        let _ = decode_plaintext(text.as_bytes());
    }
}
