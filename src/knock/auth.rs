//! Keys, key ids, server ids and the HMAC-SHA256 that binds a knock to all three.
//!
//! Secrets live in [`Secret`], which wipes itself on drop and has no `Debug` or
//! `Display`, so no log line or panic message can carry one.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

use super::packet::{Knock, MAC_LEN, MAX_PACKET_LEN};

/// Length of a key in bytes (256 bits).
pub const SECRET_LEN: usize = 32;
const DOMAIN: &[u8] = b"knockgate knock v1";

/// The name of a key: 1 to 32 bytes of `[A-Za-z0-9._-]`, sent in clear in every knock.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(String);

/// A key id, key or server id that does not follow its rules.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// Key ids are 1 to 32 characters of letters, digits, `.`, `_` and `-`.
    #[error("a key id is 1 to 32 characters of letters, digits, `.`, `_` or `-`")]
    KeyId,
    /// Server ids are 1 to 255 bytes of printable characters.
    #[error("a server id is 1 to 255 bytes with no control characters")]
    ServerId,
    /// Keys are 64 hexadecimal digits.
    #[error("a key is 64 hexadecimal digits (256 bits)")]
    Secret,
}

impl KeyId {
    /// Checks `text` against the key id rules.
    pub fn new(text: &str) -> Result<Self, IdError> {
        let ok = (1..=32).contains(&text.len())
            && text
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if ok {
            Ok(Self(text.to_owned()))
        } else {
            Err(IdError::KeyId)
        }
    }

    /// The id's bytes as they go on the wire.
    #[must_use]
    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }

    /// The id as text.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for KeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a knock is bound to on the server side: knocks signed for another server id
/// fail the MAC here even with the same key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerId(String);

impl ServerId {
    /// Checks `text` against the server id rules.
    pub fn new(text: &str) -> Result<Self, IdError> {
        if (1..=255).contains(&text.len()) && !text.chars().any(char::is_control) {
            Ok(Self(text.to_owned()))
        } else {
            Err(IdError::ServerId)
        }
    }

    /// The id as text.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A 256-bit knock key. Wiped on drop; never printed.
#[derive(Clone)]
pub struct Secret(Zeroizing<[u8; SECRET_LEN]>);

impl Secret {
    /// A new random key from the operating system's CSPRNG.
    pub fn generate() -> Result<Self, getrandom::Error> {
        let mut bytes = Zeroizing::new([0u8; SECRET_LEN]);
        getrandom::fill(bytes.as_mut())?;
        Ok(Self(bytes))
    }

    /// Parses a key written as 64 hex digits (surrounding whitespace ignored).
    pub fn from_hex(text: &str) -> Result<Self, IdError> {
        let text = text.trim();
        if text.len() != SECRET_LEN * 2 {
            return Err(IdError::Secret);
        }
        let mut bytes = Zeroizing::new([0u8; SECRET_LEN]);
        for (i, pair) in text.as_bytes().chunks_exact(2).enumerate() {
            let hi = hex_digit(pair[0]).ok_or(IdError::Secret)?;
            let lo = hex_digit(pair[1]).ok_or(IdError::Secret)?;
            bytes[i] = hi << 4 | lo;
        }
        Ok(Self(bytes))
    }

    /// The key as 64 lowercase hex digits, for writing a key file.
    #[must_use]
    pub fn to_hex(&self) -> Zeroizing<String> {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut out = Zeroizing::new(String::with_capacity(SECRET_LEN * 2));
        for b in self.0.iter() {
            out.push(char::from(DIGITS[usize::from(b >> 4)]));
            out.push(char::from(DIGITS[usize::from(b & 0xf)]));
        }
        out
    }

    /// HMAC-SHA256 under this key of `message`, which the caller frames with its own
    /// domain (a port sequence block: `docs/PROTOCOL.md`, "Knock sequences").
    #[must_use]
    pub fn sequence_block(&self, message: &[u8]) -> [u8; 32] {
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(self.0.as_ref())
            .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
        mac.update(message);
        mac.finalize().into_bytes().into()
    }

    fn hmac(&self, server: &ServerId, signed: &[u8]) -> Hmac<Sha256> {
        let mut mac = KnockMac::new(self, server).0;
        mac.update(signed);
        mac
    }
}

/// The HMAC of one key for one server, keyed and with the domain and the server id
/// already absorbed. The daemon keeps one per key and clones it for each datagram,
/// so a knock costs only the compressions of its own bytes — not the key's inner and
/// outer pads again (the most a flood of well-shaped junk can make it spend).
#[derive(Clone)]
pub struct KnockMac(Hmac<Sha256>);

impl KnockMac {
    /// The state for `secret` and `server`.
    #[must_use]
    pub fn new(secret: &Secret, server: &ServerId) -> Self {
        // HMAC takes keys of any length, so this cannot fail for 32 bytes.
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret.0.as_ref())
            .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
        let id = server.as_str().as_bytes();
        mac.update(DOMAIN);
        mac.update(&[u8::try_from(id.len()).unwrap_or(u8::MAX)]);
        mac.update(id);
        Self(mac)
    }

    /// Whether `mac` is the MAC of `signed`, compared in constant time (uses up this
    /// state: clone a kept one).
    #[must_use]
    pub fn verify(self, signed: &[u8], mac: &[u8]) -> bool {
        let mut state = self.0;
        state.update(signed);
        state.verify_slice(mac).is_ok()
    }
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// The full datagram for `knock`, signed with `secret` for `server`.
#[must_use]
pub fn seal(knock: &Knock, secret: &Secret, server: &ServerId) -> Vec<u8> {
    let (signed, len) = knock.signed_bytes();
    let tag = secret.hmac(server, &signed[..len]).finalize().into_bytes();
    let mut out = Vec::with_capacity(MAX_PACKET_LEN);
    out.extend_from_slice(&signed[..len]);
    out.extend_from_slice(&tag[..MAC_LEN]);
    out
}

/// Whether `mac` is the MAC of `signed` under `secret` for `server`, compared in
/// constant time.
#[must_use]
pub fn verify(secret: &Secret, server: &ServerId, signed: &[u8], mac: &[u8]) -> bool {
    KnockMac::new(secret, server).verify(signed, mac)
}
