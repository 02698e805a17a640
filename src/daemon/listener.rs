//! The knock port: a plain UDP socket on `[::]` (IPv4 and IPv6), no pcap, no
//! promiscuous mode, never an answer. Logs every decision: grants always, refusals
//! one line each up to a rate, then counted and summarised.

use std::collections::BTreeMap;
use std::net::{Ipv6Addr, SocketAddr};
use std::num::NonZeroU32;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tracing::{info, warn};

use super::core::{KnockOutcome, KnockRefusal};
use crate::grants::Granted;
use crate::knock::replay::ReplayError;
use crate::knock::verify::Refusal;
use crate::logging::AUDIT;

/// Receive buffer for the knock socket, so bursts queue rather than drop.
const RECV_BUFFER: usize = 4 << 20;
/// Refusal lines per second logged one by one; the rest are counted.
const REFUSAL_LINES_PER_SECOND: u32 = 20;

/// Binds the knock socket on every address, IPv4 and IPv6, port `port`.
pub(super) fn bind(port: u16) -> std::io::Result<tokio::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_only_v6(false)?;
    socket.set_cloexec(true)?;
    // Best effort: without CAP_NET_ADMIN the kernel caps it, which is fine.
    let _ = socket.set_recv_buffer_size(RECV_BUFFER);
    socket.set_nonblocking(true)?;
    socket.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)).into())?;
    tokio::net::UdpSocket::from_std(socket.into())
}

/// Short, stable names of refusal reasons, for counters and log fields.
fn reason_name(reason: &KnockRefusal) -> &'static str {
    match reason {
        KnockRefusal::Auth(Refusal::Shape(_)) => "malformed",
        KnockRefusal::Auth(Refusal::UnknownKey(_)) => "unknown-key",
        KnockRefusal::Auth(Refusal::BadMac(_)) => "bad-mac",
        KnockRefusal::Auth(Refusal::Clock { .. }) => "clock",
        KnockRefusal::Replay(_, ReplayError::Replayed) => "replay",
        KnockRefusal::Replay(_, ReplayError::Full) => "replay-guard-full",
        KnockRefusal::Policy(..) => "policy",
        KnockRefusal::State(_) => "state",
        KnockRefusal::Firewall(_) => "firewall",
    }
}

/// Logs knock outcomes without letting a flood flood the log.
pub(super) struct KnockLog {
    lines: DefaultDirectRateLimiter,
    refused: BTreeMap<&'static str, u64>,
    unlogged: u64,
}

impl KnockLog {
    pub(super) fn new() -> Self {
        let per_second = NonZeroU32::new(REFUSAL_LINES_PER_SECOND).unwrap_or(NonZeroU32::MIN);
        Self {
            lines: RateLimiter::direct(Quota::per_second(per_second)),
            refused: BTreeMap::new(),
            unlogged: 0,
        }
    }

    /// One line per grant; refusals one line each while under the rate, with the
    /// source and the reason (never the key or the packet).
    pub(super) fn outcome(&mut self, outcome: &KnockOutcome, source: SocketAddr) {
        match outcome {
            KnockOutcome::Granted {
                record,
                kind,
                capped,
            } => info!(
                target: AUDIT,
                event = "grant",
                id = %record.id,
                service = %record.service,
                address = %record.address,
                source = %source.ip(),
                who = %record.who,
                expires_at = record.expires_at,
                ttl_secs = record.expires_at.saturating_sub(record.granted_at),
                extended = *kind == Granted::Extended,
                capped,
                "knock accepted"
            ),
            KnockOutcome::Refused { reason, banned } => {
                let name = reason_name(reason);
                *self.refused.entry(name).or_default() += 1;
                if self.lines.check().is_ok() {
                    warn!(target: AUDIT, event = "refuse", source = %source.ip(), reason = name,
                        detail = %reason, "knock refused");
                } else {
                    self.unlogged += 1;
                }
                if *banned {
                    warn!(target: AUDIT, event = "ban", source = %source.ip(),
                        "source banned from the knock port after repeated invalid knocks");
                }
            }
        }
    }

    /// Whether there is anything to summarise.
    pub(super) fn has_counts(&self) -> bool {
        !self.refused.is_empty()
    }

    /// Logs the refusal counts since the last summary and resets them.
    pub(super) fn summarise(&mut self) {
        if self.refused.is_empty() {
            return;
        }
        let total: u64 = self.refused.values().sum();
        info!(
            target: AUDIT,
            event = "refusals",
            total,
            not_logged_individually = self.unlogged,
            by_reason = ?self.refused,
            "knocks refused since the last summary"
        );
        self.refused.clear();
        self.unlogged = 0;
    }
}
