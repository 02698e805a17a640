//! The knock datagram: layout, encoding and bounded decoding. Version 1 (114 bytes)
//! can only ask for `ssh`; version 2 (118 bytes) names any service by its id.

use std::net::{Ipv4Addr, Ipv6Addr};

use super::auth::KeyId;
pub use crate::service::ServiceId;

/// Exact size of a version-1 knock.
pub const PACKET_LEN: usize = 114;
/// Exact size of a version-2 knock (a version-1 knock and a 4-byte service id).
pub const PACKET_V2_LEN: usize = 118;
/// The longest knock of any version.
pub const MAX_PACKET_LEN: usize = PACKET_V2_LEN;
/// Bytes covered by the MAC of a version-1 knock (everything before it).
pub const SIGNED_LEN: usize = 82;
/// Bytes covered by the MAC of a version-2 knock.
pub const SIGNED_V2_LEN: usize = 86;
/// Length of the MAC at the end.
pub const MAC_LEN: usize = 32;
/// Length of the random nonce.
pub const NONCE_LEN: usize = 16;

const MAGIC: [u8; 2] = *b"KG";
const VERSION_1: u8 = 1;
const VERSION_2: u8 = 2;
/// Byte 3 of a version-1 knock: the only service it can name, `ssh`.
const V1_SSH: u8 = 1;
/// Byte 3 of a version-2 knock: the service is named by the id after the key id.
const V2_BY_ID: u8 = 0;
const KEY_ID_MAX: usize = 32;
/// The first four bytes every version-1 knock starts with (magic, version, service):
/// what the kernel's pre-filter on the knock port checks (with the length).
pub const V1_HEADER: [u8; 4] = [MAGIC[0], MAGIC[1], VERSION_1, V1_SSH];
/// The first four bytes of every version-2 knock.
pub const V2_HEADER: [u8; 4] = [MAGIC[0], MAGIC[1], VERSION_2, V2_BY_ID];

/// The address a knock asks the grant for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AddressClaim {
    /// Whatever address the datagram arrives from (the usual case).
    PacketSource,
    /// This IPv4 address (NAT setups; the key must allow it).
    V4(Ipv4Addr),
    /// This IPv6 address (NAT setups; the key must allow it).
    V6(Ipv6Addr),
}

/// A decoded knock. Decoding checks only the shape; the MAC, the clock, replay and
/// policy are checked by the caller in that order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Knock {
    /// Which key signed it.
    pub key_id: KeyId,
    /// What it asks to open.
    pub service: ServiceId,
    /// Unix seconds on the client's clock.
    pub timestamp: u64,
    /// Random per knock; the replay guard remembers it.
    pub nonce: [u8; NONCE_LEN],
    /// Requested grant length in seconds; 0 asks for the server's default.
    pub ttl_secs: u32,
    /// Which address the grant is for.
    pub address: AddressClaim,
}

/// Why a datagram is not a well-formed knock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ShapeError {
    /// Not exactly [`PACKET_LEN`] or [`PACKET_V2_LEN`] bytes.
    #[error("wrong size {0}")]
    Size(usize),
    /// Not the knockgate magic.
    #[error("bad magic")]
    Magic,
    /// A version this server does not speak.
    #[error("unsupported version {0}")]
    Version(u8),
    /// A service byte that does not fit the version.
    #[error("bad service byte {0}")]
    Service(u8),
    /// Address kind not 0, 4 or 6, or non-zero padding.
    #[error("malformed address")]
    Address,
    /// Key id empty, too long, with bad bytes or non-zero padding.
    #[error("malformed key id")]
    KeyId,
}

/// The parts of a well-shaped datagram the MAC check needs.
pub struct Decoded<'a> {
    /// The knock's fields.
    pub knock: Knock,
    /// The bytes the MAC covers.
    pub signed: &'a [u8],
    /// The MAC the sender attached.
    pub mac: &'a [u8],
}

impl Knock {
    /// The version this knock is sent as: 1 for `ssh` (every knockgate server takes
    /// it), 2 for any other service.
    #[must_use]
    pub fn version(&self) -> u8 {
        if self.service == ServiceId::ssh() {
            VERSION_1
        } else {
            VERSION_2
        }
    }

    /// The signed bytes of this knock (everything but the MAC): 82 for version 1,
    /// 86 for version 2. The returned buffer is [`SIGNED_V2_LEN`] long; use the
    /// length returned with it.
    #[must_use]
    pub fn signed_bytes(&self) -> ([u8; SIGNED_V2_LEN], usize) {
        let mut b = [0u8; SIGNED_V2_LEN];
        b[0..2].copy_from_slice(&MAGIC);
        let version = self.version();
        b[2] = version;
        b[3] = if version == VERSION_1 {
            V1_SSH
        } else {
            V2_BY_ID
        };
        b[4..12].copy_from_slice(&self.timestamp.to_be_bytes());
        b[12..28].copy_from_slice(&self.nonce);
        b[28..32].copy_from_slice(&self.ttl_secs.to_be_bytes());
        match self.address {
            AddressClaim::PacketSource => b[32] = 0,
            AddressClaim::V4(a) => {
                b[32] = 4;
                b[33..37].copy_from_slice(&a.octets());
            }
            AddressClaim::V6(a) => {
                b[32] = 6;
                b[33..49].copy_from_slice(&a.octets());
            }
        }
        let id = self.key_id.as_bytes();
        b[49] = u8::try_from(id.len()).unwrap_or(0);
        b[50..50 + id.len()].copy_from_slice(id);
        if version == VERSION_1 {
            (b, SIGNED_LEN)
        } else {
            b[SIGNED_LEN..SIGNED_V2_LEN].copy_from_slice(&self.service.0.to_be_bytes());
            (b, SIGNED_V2_LEN)
        }
    }
}

/// Checks the shape of `datagram` and splits it; never panics, on any input.
pub fn decode(datagram: &[u8]) -> Result<Decoded<'_>, ShapeError> {
    let signed_len = match datagram.len() {
        PACKET_LEN => SIGNED_LEN,
        PACKET_V2_LEN => SIGNED_V2_LEN,
        n => return Err(ShapeError::Size(n)),
    };
    let bytes = datagram;
    if bytes[0..2] != MAGIC {
        return Err(ShapeError::Magic);
    }
    let service = match (bytes[2], signed_len) {
        (VERSION_1, SIGNED_LEN) if bytes[3] == V1_SSH => ServiceId::ssh(),
        (VERSION_2, SIGNED_V2_LEN) if bytes[3] == V2_BY_ID => {
            ServiceId(u32::from_be_bytes(array(&bytes[SIGNED_LEN..SIGNED_V2_LEN])))
        }
        (VERSION_1, SIGNED_LEN) | (VERSION_2, SIGNED_V2_LEN) => {
            return Err(ShapeError::Service(bytes[3]));
        }
        // A known version at the other version's length.
        (VERSION_1 | VERSION_2, _) => return Err(ShapeError::Size(datagram.len())),
        (version, _) => return Err(ShapeError::Version(version)),
    };
    let timestamp = u64::from_be_bytes(array(&bytes[4..12]));
    let nonce: [u8; NONCE_LEN] = array(&bytes[12..28]);
    let ttl_secs = u32::from_be_bytes(array(&bytes[28..32]));
    let address = decode_address(bytes[32], &bytes[33..49])?;
    let key_id = decode_key_id(bytes[49], &bytes[50..82])?;
    Ok(Decoded {
        knock: Knock {
            key_id,
            service,
            timestamp,
            nonce,
            ttl_secs,
            address,
        },
        signed: &bytes[..signed_len],
        mac: &bytes[signed_len..],
    })
}

fn decode_address(kind: u8, field: &[u8]) -> Result<AddressClaim, ShapeError> {
    let all_zero = |b: &[u8]| b.iter().all(|&x| x == 0);
    match kind {
        0 if all_zero(field) => Ok(AddressClaim::PacketSource),
        4 if all_zero(&field[4..]) => Ok(AddressClaim::V4(Ipv4Addr::from(array::<4>(&field[..4])))),
        6 => Ok(AddressClaim::V6(Ipv6Addr::from(array::<16>(field)))),
        _ => Err(ShapeError::Address),
    }
}

fn decode_key_id(len: u8, field: &[u8]) -> Result<KeyId, ShapeError> {
    let len = usize::from(len);
    if len == 0 || len > KEY_ID_MAX || field[len..].iter().any(|&b| b != 0) {
        return Err(ShapeError::KeyId);
    }
    let text = std::str::from_utf8(&field[..len]).map_err(|_| ShapeError::KeyId)?;
    KeyId::new(text).map_err(|_| ShapeError::KeyId)
}

/// A fixed-size copy of `slice`; callers pass slices of exactly `N` bytes cut from a
/// fixed-size array, so the zero fill never shows.
fn array<const N: usize>(slice: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    let n = slice.len().min(N);
    out[..n].copy_from_slice(&slice[..n]);
    out
}
