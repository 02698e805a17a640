//! The cheap-first check order of docs/PROTOCOL.md, up to (not including) the replay
//! guard and policy: shape → key id known → MAC → clock. Pure.

use super::auth::{KnockMac, ServerId};
use super::packet::{ShapeError, decode};
use super::{KeyId, Knock, Secret};

/// Why a datagram was refused before the replay guard.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Not a well-formed knock.
    #[error("malformed: {0}")]
    Shape(ShapeError),
    /// No key with this id.
    #[error("unknown key id {0}")]
    UnknownKey(KeyId),
    /// The MAC does not match: wrong key, wrong server id, or a forged or damaged knock.
    #[error("bad MAC for key {0} (wrong key or server id, or forged)")]
    BadMac(KeyId),
    /// Authentic, but the client's clock is off by more than the allowed skew.
    #[error("timestamp off by {skew_secs} s for key {key} (client clock wrong?)")]
    Clock {
        /// The key that signed it.
        key: KeyId,
        /// Client time minus server time, in seconds.
        skew_secs: i64,
    },
}

/// Checks `datagram` against the key ring `secret_for`, the server id, and the
/// clock (`now`, Unix seconds, ± `skew_secs`). Returns the authentic knock.
pub fn authenticate<'k>(
    datagram: &[u8],
    secret_for: impl Fn(&KeyId) -> Option<&'k Secret>,
    server: &ServerId,
    now: u64,
    skew_secs: u64,
) -> Result<Knock, Refusal> {
    authenticate_with(
        datagram,
        |id| secret_for(id).map(|s| KnockMac::new(s, server)),
        now,
        skew_secs,
    )
}

/// [`authenticate`] with each key's MAC state ready (the daemon's: `mac_for` clones
/// it): exactly one HMAC per datagram that decodes and names a known key, none for
/// any other.
pub fn authenticate_with(
    datagram: &[u8],
    mac_for: impl Fn(&KeyId) -> Option<KnockMac>,
    now: u64,
    skew_secs: u64,
) -> Result<Knock, Refusal> {
    let decoded = decode(datagram).map_err(Refusal::Shape)?;
    let knock = decoded.knock;
    let Some(mac) = mac_for(&knock.key_id) else {
        return Err(Refusal::UnknownKey(knock.key_id));
    };
    if !mac.verify(decoded.signed, decoded.mac) {
        return Err(Refusal::BadMac(knock.key_id));
    }
    let skew = i128::from(knock.timestamp) - i128::from(now);
    if skew.unsigned_abs() > u128::from(skew_secs) {
        return Err(Refusal::Clock {
            key: knock.key_id,
            skew_secs: i64::try_from(skew).unwrap_or(i64::MAX),
        });
    }
    Ok(knock)
}
