//! The decoder proper; see the module docs for the order of checks.

use std::net::Ipv4Addr;

use aes::Aes256;
use base64::Engine as _;
use base64::alphabet::STANDARD;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use cbc::cipher::{BlockModeDecrypt, KeyIvInit};
use hmac::{Hmac, KeyInit, Mac};
use md5::{Digest as _, Md5};
use sha2::{Sha256, Sha384, Sha512};
use zeroize::Zeroizing;

use crate::service::Protocol;

/// The base64 of `"Salted__"` that fwknop strips from the front of every packet.
const SALTED_PREFIX: &str = "U2FsdGVkX1";
/// Shortest packet fwknopd takes (`MIN_SPA_DATA_SIZE`).
pub const MIN_LEN: usize = 140;
/// Longest Rijndael packet a libfko server can decrypt (400 characters and more are
/// taken for GPG): 399, HMAC included.
pub const MAX_LEN: usize = 399;
/// Longest Rijndael key (raw bytes).
pub const MAX_KEY_LEN: usize = 32;
/// Longest HMAC key (raw bytes; fwknop's `MAX_DIGEST_BLOCK_LEN`).
pub const MAX_HMAC_KEY_LEN: usize = 136;
/// Longest access message fwknop sends (`< 256`).
const MAX_ACCESS_LEN: usize = 255;
/// Most ports one request may name (the packet's length bounds it anyway).
const MAX_PORTS: usize = 32;

/// Base64 as fwknop writes it: the standard alphabet, `=` stripped, so padding may be
/// missing (and the last symbol may carry spare bits).
fn lenient_b64() -> GeneralPurpose {
    GeneralPurpose::new(
        &STANDARD,
        GeneralPurposeConfig::new()
            .with_decode_padding_mode(DecodePaddingMode::Indifferent)
            .with_decode_allow_trailing_bits(true),
    )
}

/// Base64 of the HMAC tag: no padding, and no spare bits in the last symbol. A tag of
/// 43 symbols carries 258 bits for 256: with the spare bits ignored, one MAC would
/// have four spellings, and a captured packet respelt would slip past the replay
/// guard (which remembers the packet's digest) — fwknop compares the text.
fn strict_tag_b64() -> GeneralPurpose {
    GeneralPurpose::new(
        &STANDARD,
        GeneralPurposeConfig::new()
            .with_decode_padding_mode(DecodePaddingMode::RequireNone)
            .with_decode_allow_trailing_bits(false),
    )
}

fn b64_no_pad() -> GeneralPurpose {
    GeneralPurpose::new(
        &STANDARD,
        GeneralPurposeConfig::new().with_encode_padding(false),
    )
}

/// The HMAC a stanza expects (fwknop's `HMAC_DIGEST_TYPE`): the receiver must know
/// it, since it decides how many characters of the packet are the tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HmacDigest {
    /// HMAC-SHA256 (fwknop's default).
    Sha256,
    /// HMAC-SHA384.
    Sha384,
    /// HMAC-SHA512.
    Sha512,
}

impl HmacDigest {
    /// Characters of the base64 tag at the end of a packet.
    #[must_use]
    pub fn tag_len(self) -> usize {
        match self {
            Self::Sha256 => 43,
            Self::Sha384 => 64,
            Self::Sha512 => 86,
        }
    }

    /// The name in access.conf (`sha256`, …).
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Sha256 => "sha256",
            Self::Sha384 => "sha384",
            Self::Sha512 => "sha512",
        }
    }

    /// From an access.conf / config word.
    #[must_use]
    pub fn from_name(name: &str) -> Option<Self> {
        match name.to_ascii_lowercase().as_str() {
            "sha256" => Some(Self::Sha256),
            "sha384" => Some(Self::Sha384),
            "sha512" => Some(Self::Sha512),
            _ => None,
        }
    }

    /// Whether `tag` (raw bytes) is the HMAC of `text` under `key`; constant time.
    fn verify(self, key: &[u8], text: &[&[u8]], tag: &[u8]) -> bool {
        fn check<M: Mac + KeyInit>(key: &[u8], text: &[&[u8]], tag: &[u8]) -> bool {
            let Ok(mut mac) = <M as KeyInit>::new_from_slice(key) else {
                return false;
            };
            for part in text {
                mac.update(part);
            }
            mac.verify_slice(tag).is_ok()
        }
        match self {
            Self::Sha256 => check::<Hmac<Sha256>>(key, text, tag),
            Self::Sha384 => check::<Hmac<Sha384>>(key, text, tag),
            Self::Sha512 => check::<Hmac<Sha512>>(key, text, tag),
        }
    }
}

/// One fwknop stanza's secrets. No `Debug`: nothing may print them.
pub struct SpaKeys {
    /// The Rijndael key (raw bytes, 1 to 32).
    pub encryption: Zeroizing<Vec<u8>>,
    /// The HMAC key (raw bytes, 1 to 136).
    pub hmac: Zeroizing<Vec<u8>>,
    /// Which HMAC.
    pub digest: HmacDigest,
}

/// fwknop message types this server knows of (`fko_message_type_t`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageType {
    /// 0: run a command on the server. Refused: knockgate runs nothing for a packet.
    Command,
    /// 1: open ports.
    Access,
    /// 2, 4, 5, 6: NAT access. Refused: knockgate does no NAT for grants.
    Nat,
    /// 3: open ports for a time the client asks.
    TimeoutAccess,
}

/// A port an fwknop client asks for (`tcp/22`).
pub type PortRequest = (Protocol, u16);

/// An authentic, decoded access request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessRequest {
    /// The username inside (fwknop's `-U`; informational).
    pub user: String,
    /// Unix seconds on the client's clock.
    pub timestamp: u64,
    /// The address to open for; `None` for fwknop's `0.0.0.0` ("the packet's source").
    pub address: Option<Ipv4Addr>,
    /// The ports asked for.
    pub ports: Vec<PortRequest>,
    /// The time asked for (`-f`), if any.
    pub client_timeout: Option<u32>,
}

/// What [`open`] found: which key matched and the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    /// Index of the key (in the slice given) whose HMAC matched.
    pub key: usize,
    /// The request.
    pub request: AccessRequest,
    /// SHA-256 of the whole packet: what the replay guard remembers (fwknop's own rule).
    pub digest: [u8; 32],
}

/// Why a packet opens nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Not base64 text of a plausible length.
    #[error("not an fwknop packet: {0}")]
    Shape(&'static str),
    /// No configured key's HMAC matches: a wrong key, or a forgery.
    #[error("no fwknop key's HMAC matches (wrong HMAC key, or forged)")]
    NoKeyMatched,
    /// The HMAC matched, but the content does not decrypt or decode: the stanza's
    /// encryption key is wrong, or the client sent something malformed.
    #[error("HMAC matched fwknop key #{key}, but {why} (wrong encryption key?)")]
    Content {
        /// Index of the key.
        key: usize,
        /// What was wrong.
        why: &'static str,
    },
    /// An authentic message of a type knockgate does not carry out.
    #[error("fwknop key #{key}: {kind:?} messages are not carried out by knockgate")]
    Type {
        /// Index of the key.
        key: usize,
        /// The type.
        kind: MessageType,
    },
}

/// Longest datagram fwknopd reads (`MAX_SPA_PACKET_LEN`); GPG packets are 400 and up.
pub const MAX_DATAGRAM: usize = 1500;

/// Whether `datagram` could be an fwknop packet: base64 text of 140 to 1,500
/// characters that does not start with the salted prefix (fwknop strips it; a packet
/// carrying it is a replay trick fwknopd drops too). A cheap filter, run before any
/// MAC; [`open`] then refuses GPG-sized packets by length.
#[must_use]
pub fn looks_like_spa(datagram: &[u8]) -> bool {
    (MIN_LEN..=MAX_DATAGRAM).contains(&datagram.len())
        && !datagram.starts_with(SALTED_PREFIX.as_bytes())
        && datagram
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
}

/// Authenticates `datagram` against each of `keys` in turn (one HMAC each, no
/// decryption until one matches), then decrypts and decodes it.
pub fn open(datagram: &[u8], keys: &[SpaKeys]) -> Result<Opened, Refusal> {
    if !looks_like_spa(datagram) {
        return Err(Refusal::Shape("not 140-1500 characters of base64"));
    }
    if datagram.len() > MAX_LEN {
        // libfko takes 400 characters and more for GPG; knockgate does not do GPG.
        return Err(Refusal::Shape(
            "400 characters or more: a GPG-encrypted packet, which knockgate does not take",
        ));
    }
    for (index, key) in keys.iter().enumerate() {
        let tag_len = key.digest.tag_len();
        let Some(body_len) = datagram.len().checked_sub(tag_len).filter(|&n| n >= 16) else {
            continue;
        };
        let (body, tag_text) = datagram.split_at(body_len);
        let Ok(tag) = strict_tag_b64().decode(tag_text) else {
            continue;
        };
        // The MAC covers the base64 text with fwknop's prefix put back.
        if !key
            .digest
            .verify(&key.hmac, &[SALTED_PREFIX.as_bytes(), body], &tag)
        {
            continue;
        }
        let request = decrypt_and_decode(body, key).map_err(|e| match e {
            Inner::Content(why) => Refusal::Content { key: index, why },
            Inner::Type(kind) => Refusal::Type { key: index, kind },
        })?;
        let digest: [u8; 32] = Sha256::digest(datagram).into();
        return Ok(Opened {
            key: index,
            request,
            digest,
        });
    }
    Err(Refusal::NoKeyMatched)
}

enum Inner {
    Content(&'static str),
    Type(MessageType),
}

fn decrypt_and_decode(body: &[u8], key: &SpaKeys) -> Result<AccessRequest, Inner> {
    let mut text = Vec::with_capacity(SALTED_PREFIX.len() + body.len());
    text.extend_from_slice(SALTED_PREFIX.as_bytes());
    text.extend_from_slice(body);
    let raw = lenient_b64()
        .decode(&text)
        .map_err(|_| Inner::Content("the ciphertext is not base64"))?;
    // "Salted__" ‖ salt (8) ‖ ciphertext (a whole number of 16-byte blocks).
    if raw.len() < 32 || !raw.starts_with(b"Salted__") || (raw.len() - 16) % 16 != 0 {
        return Err(Inner::Content("the ciphertext has the wrong shape"));
    }
    let salt = &raw[8..16];
    let (aes_key, iv) = bytes_to_key(&key.encryption, salt);
    let mut buf = Zeroizing::new(raw[16..].to_vec());
    let decryptor = cbc::Decryptor::<Aes256>::new_from_slices(&aes_key[..], &iv[..])
        .map_err(|_| Inner::Content("the key cannot be used"))?;
    let plain = decryptor
        .decrypt_padded::<cbc::cipher::block_padding::Pkcs7>(&mut buf)
        .map_err(|_| Inner::Content("it does not decrypt (bad padding)"))?;
    decode_plaintext(plain)
}

/// OpenSSL's `EVP_BytesToKey` with MD5 and one round: D1 = MD5(pw ‖ salt),
/// Di = MD5(Di-1 ‖ pw ‖ salt); the key is the first 32 bytes, the IV the next 16.
fn bytes_to_key(password: &[u8], salt: &[u8]) -> (Zeroizing<[u8; 32]>, Zeroizing<[u8; 16]>) {
    let mut out = Zeroizing::new([0u8; 48]);
    let mut previous: Option<[u8; 16]> = None;
    for chunk in out.chunks_mut(16) {
        let mut md5 = Md5::new();
        if let Some(d) = previous {
            md5.update(d);
        }
        md5.update(password);
        md5.update(salt);
        let d: [u8; 16] = md5.finalize().into();
        chunk.copy_from_slice(&d);
        previous = Some(d);
    }
    let mut key = Zeroizing::new([0u8; 32]);
    let mut iv = Zeroizing::new([0u8; 16]);
    key.copy_from_slice(&out[..32]);
    iv.copy_from_slice(&out[32..]);
    (key, iv)
}

fn decode_plaintext(plain: &[u8]) -> Result<AccessRequest, Inner> {
    let bad = Inner::Content;
    if !plain.iter().all(|b| (0x20..0x7f).contains(b)) {
        return Err(bad("the plaintext is not printable"));
    }
    let plain = std::str::from_utf8(plain).map_err(|_| bad("the plaintext is not text"))?;
    let (body, digest) = plain
        .rsplit_once(':')
        .ok_or(bad("the plaintext has no digest"))?;
    let computed = match digest.len() {
        43 => b64_no_pad().encode(Sha256::digest(body.as_bytes())),
        64 => b64_no_pad().encode(Sha384::digest(body.as_bytes())),
        86 => b64_no_pad().encode(Sha512::digest(body.as_bytes())),
        _ => return Err(bad("its digest is not SHA-256, SHA-384 or SHA-512")),
    };
    if computed != digest {
        return Err(bad("its inner digest does not match"));
    }
    let fields: Vec<&str> = body.split(':').collect();
    if fields.len() < 6 {
        return Err(bad("the plaintext has too few fields"));
    }
    let (random, user, timestamp, version, kind) =
        (fields[0], fields[1], fields[2], fields[3], fields[4]);
    if random.len() != 16 || !random.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad("the random field is not 16 digits"));
    }
    if version.is_empty() || version.len() > 8 {
        return Err(bad("the version field is malformed"));
    }
    let kind = match kind {
        "0" => MessageType::Command,
        "1" => MessageType::Access,
        "3" => MessageType::TimeoutAccess,
        "2" | "4" | "5" | "6" => MessageType::Nat,
        _ => return Err(bad("the message type is unknown")),
    };
    let expected_fields = match kind {
        MessageType::Access => 6,
        MessageType::TimeoutAccess => 7,
        other => return Err(Inner::Type(other)),
    };
    if fields.len() != expected_fields {
        return Err(bad("the plaintext has the wrong number of fields"));
    }
    let user = decode_text(user, 64).ok_or(bad("the username is malformed"))?;
    if timestamp.is_empty() || timestamp.len() > 12 {
        return Err(bad("the timestamp is malformed"));
    }
    let timestamp: u64 = timestamp
        .parse()
        .map_err(|_| bad("the timestamp is malformed"))?;
    let access =
        decode_text(fields[5], MAX_ACCESS_LEN).ok_or(bad("the access message is malformed"))?;
    let (address, ports) = parse_access(&access).ok_or(bad("the access message is malformed"))?;
    let client_timeout = match kind {
        MessageType::TimeoutAccess => Some(
            fields[6]
                .parse::<u32>()
                .map_err(|_| bad("the client timeout is malformed"))?,
        ),
        _ => None,
    };
    Ok(AccessRequest {
        user,
        timestamp,
        address,
        ports,
        client_timeout,
    })
}

/// A base64 field (padding stripped) holding printable text of at most `max` bytes.
fn decode_text(field: &str, max: usize) -> Option<String> {
    if field.len() > max.div_ceil(3) * 4 {
        return None;
    }
    let bytes = lenient_b64().decode(field).ok()?;
    if bytes.len() > max || !bytes.iter().all(|b| (0x20..0x7f).contains(b)) {
        return None;
    }
    String::from_utf8(bytes).ok()
}

/// `IP,proto/port[,proto/port…]`: an IPv4 address (`0.0.0.0` = the packet's
/// source) and TCP/UDP ports.
fn parse_access(access: &str) -> Option<(Option<Ipv4Addr>, Vec<PortRequest>)> {
    let mut parts = access.split(',');
    let ip: Ipv4Addr = parts.next()?.parse().ok()?;
    let address = (!ip.is_unspecified()).then_some(ip);
    let mut requested = Vec::new();
    for part in parts {
        let (proto, number) = part.split_once('/')?;
        let proto = match proto {
            "tcp" => Protocol::Tcp,
            "udp" => Protocol::Udp,
            _ => return None,
        };
        let number: u16 = number.parse().ok().filter(|&p| p != 0)?;
        if requested.len() == MAX_PORTS {
            return None;
        }
        requested.push((proto, number));
    }
    if requested.is_empty() {
        return None;
    }
    Some((address, requested))
}

#[cfg(test)]
mod tests;
