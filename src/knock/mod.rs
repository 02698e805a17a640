//! The knock wire protocol (docs/PROTOCOL.md): bytes in, a typed knock or a typed
//! refusal out.
//!
//! Pure: no I/O, no clock (time is passed in), no `unsafe`. Every function here is
//! total over arbitrary input — the property tests and fuzzers hammer it. It never
//! logs, and no type in it prints a secret.

pub mod auth;
pub mod packet;
pub mod replay;
pub mod verify;

pub use auth::{KeyId, Secret};
pub use packet::{AddressClaim, Knock, ServiceId};

#[cfg(test)]
mod tests;
