//! fwknop's single-packet authorization (SPA), as Debian's fwknop 2.6.10 client
//! sends it (the format as docs/PROTOCOL.md, "fwknop packets", describes it): bytes and keys
//! in, an authentic access request or a typed refusal out. Written from the format,
//! not from fwknop's (GPL) code.
//!
//! Order, cheapest and safest first: shape (base64 text of a plausible length, not a
//! native knock) → HMAC, key by key (no decryption before a MAC matches; fwknop
//! packets carry no key id) → AES-256-CBC with OpenSSL's salted MD5 key derivation,
//! strict PKCS#7 → printable plaintext → inner digest → fields. Pure, total over any
//! input: every length is bounded before it is used.

mod decode;
pub mod import;

pub use decode::{
    AccessRequest, HmacDigest, MAX_HMAC_KEY_LEN, MAX_KEY_LEN, MAX_LEN, MIN_LEN, MessageType,
    Opened, PortRequest, Refusal, SpaKeys, looks_like_spa, open,
};
