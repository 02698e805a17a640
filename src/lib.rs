#![deny(unsafe_code)]
//! knockgate: a locked-down nftables baseline for web servers, with short-lived
//! holes for authenticated requests.
//!
//! The shape (see `docs/decisions.md` for why):
//!
//! ```text
//! config file ─▶ config::load ─▶ Loaded (checked) ─▶ ruleset::baseline ─▶ Ruleset (plain data)
//!                                                                           │
//!                                 knockgate ruleset / knockgated --check ◀──┤ Display = nft syntax
//!                                                                           ▼
//!                                         firewall::Firewall ─▶ nft (one netlink batch, the only unsafe)
//!                                                          └──▶ memory (unit tests, no root)
//! ```
//!
//! Pure logic sits in the middle ([`config`], [`ruleset`]); the kernel is behind
//! the one narrow [`firewall::Firewall`] door; [`daemon`] wires them together.
//! The binaries are thin: parse arguments, call this library, map to an exit code.

pub mod admin;
pub mod cgroup;
pub mod cli;
pub mod client;
pub mod clock;
pub mod config;
#[cfg(feature = "daemon")]
pub mod daemon;
pub mod egress;
pub mod exit;
pub mod firewall;
pub mod fwknop;
pub mod grants;
pub mod keyfile;
pub mod knock;
pub mod logging;
pub mod policy;
pub mod ruleset;
pub mod sequence;
pub mod service;
pub mod state;
