//! The knock port: a plain UDP socket on `[::]` (IPv4 and IPv6), no pcap, no
//! promiscuous mode, never an answer. Logs every decision: grants always, refusals
//! one line each up to a rate, then counted and summarised.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::num::NonZeroU32;

use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
use tracing::{info, warn};

use super::core::{KnockOutcome, KnockRefusal};
use crate::grants::Granted;
use crate::knock::replay::ReplayError;
use crate::knock::verify::Refusal;
use crate::logging::AUDIT;
use crate::policy::PolicyRefusal;

/// Receive buffer for the knock socket, so bursts queue rather than drop.
const RECV_BUFFER: usize = 4 << 20;
/// Refusal lines one source may cause in a burst, then one per `PER_SOURCE_PERIOD`;
/// the rest are counted. So every misbehaving address shows up in the log for
/// fail2ban, and no single one can fill it.
const PER_SOURCE_BURST: u32 = 10;
const PER_SOURCE_PERIOD: std::time::Duration = std::time::Duration::from_secs(6);
/// Refusal lines per second over all sources (spoofed floods have many sources).
const ALL_SOURCES_PER_SECOND: u32 = 50;

/// Datagrams one `recvmmsg` reads at most.
pub(super) const BATCH: usize = 32;
/// Largest datagram read: the longest the kernel's shape filter lets through is an
/// fwknop packet of 399 bytes; a longer one is cut here and refused as malformed.
const RECV_LEN: usize = 512;

/// Reads the knock socket in batches: one `recvmmsg` system call for up to [`BATCH`]
/// datagrams, into buffers allocated once.
pub(super) struct BatchReader {
    headers: nix::sys::socket::MultiHeaders<nix::sys::socket::SockaddrStorage>,
    buffers: Vec<[u8; RECV_LEN]>,
    /// Buffer, length and sender of each datagram of the last batch.
    got: Vec<(usize, usize, SocketAddr)>,
}

impl BatchReader {
    pub(super) fn new() -> Self {
        Self {
            headers: nix::sys::socket::MultiHeaders::preallocate(BATCH, None),
            buffers: vec![[0; RECV_LEN]; BATCH],
            got: Vec::with_capacity(BATCH),
        }
    }

    /// Reads what is queued on `socket`, up to [`BATCH`] datagrams, without waiting;
    /// `WouldBlock` when nothing is. Returns how many were read.
    pub(super) fn read(&mut self, socket: &impl std::os::fd::AsRawFd) -> std::io::Result<usize> {
        use nix::sys::socket::{MsgFlags, SockaddrLike, recvmmsg};
        use std::io::IoSliceMut;
        self.got.clear();
        let mut slices: Vec<[IoSliceMut<'_>; 1]> = self
            .buffers
            .iter_mut()
            .map(|b| [IoSliceMut::new(b)])
            .collect();
        let received = recvmmsg(
            socket.as_raw_fd(),
            &mut self.headers,
            slices.iter_mut(),
            MsgFlags::MSG_DONTWAIT,
            None,
        )
        .map_err(std::io::Error::from)?;
        let mut count = 0;
        for (index, message) in received.enumerate() {
            count += 1;
            let from = message.address.and_then(|a| {
                a.as_sockaddr_in6()
                    .map(|a6| SocketAddr::V6((*a6).into()))
                    .or_else(|| a.as_sockaddr_in().map(|a4| SocketAddr::V4((*a4).into())))
                    .filter(|_| a.len() > 0)
            });
            // A datagram without a sender address cannot be told apart: skipped.
            if let Some(from) = from {
                self.got.push((index, message.bytes.min(RECV_LEN), from));
            }
        }
        Ok(count)
    }

    /// The datagrams of the last batch, with their senders.
    pub(super) fn datagrams(&self) -> impl Iterator<Item = (&[u8], SocketAddr)> {
        self.got
            .iter()
            .map(|&(index, len, from)| (&self.buffers[index][..len], from))
    }
}

/// Binds the knock socket on every address, IPv4 and IPv6, port `port`.
pub(super) fn bind(port: u16) -> std::io::Result<tokio::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_only_v6(false)?;
    socket.set_cloexec(true)?;
    // The daemon has CAP_NET_ADMIN, which lets it pass `net.core.rmem_max` (212,992
    // bytes by default: a few hundred datagrams, dropped in a burst while the daemon
    // is not on a CPU). Without it, the capped size is what the kernel allows.
    if nix::sys::socket::setsockopt(
        &socket,
        nix::sys::socket::sockopt::RcvBufForce,
        &RECV_BUFFER,
    )
    .is_err()
    {
        let _ = socket.set_recv_buffer_size(RECV_BUFFER);
    }
    socket.set_nonblocking(true)?;
    socket.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)).into())?;
    tokio::net::UdpSocket::from_std(socket.into())
}

/// Short, stable names of refusal reasons, for counters and log fields.
fn reason_name(reason: &KnockRefusal) -> &'static str {
    match reason {
        KnockRefusal::Auth(Refusal::Shape(_))
        | KnockRefusal::Fwknop(crate::fwknop::Refusal::Shape(_)) => "malformed",
        KnockRefusal::Auth(Refusal::UnknownKey(_)) => "unknown-key",
        KnockRefusal::Auth(Refusal::BadMac(_))
        | KnockRefusal::Fwknop(crate::fwknop::Refusal::NoKeyMatched) => "bad-mac",
        KnockRefusal::Auth(Refusal::Clock { .. }) | KnockRefusal::FwknopClock { .. } => "clock",
        KnockRefusal::Replay(_, ReplayError::Replayed) => "replay",
        KnockRefusal::Replay(_, ReplayError::Full) => "replay-guard-full",
        KnockRefusal::Replay(_, ReplayError::KeyQuota) => "replay-key-quota",
        KnockRefusal::Replay(_, ReplayError::BeforeFloor) => "replay-before-floor",
        KnockRefusal::Policy(_, PolicyRefusal::Unbound) => "unbound",
        KnockRefusal::Policy(_, PolicyRefusal::OtherSource { .. }) => "other-address",
        KnockRefusal::Policy(_, PolicyRefusal::KeyGrants { .. }) => "key-grants",
        KnockRefusal::Policy(_, PolicyRefusal::Service(_)) => "service-not-allowed",
        KnockRefusal::Policy(_, PolicyRefusal::UnknownService(_)) => "unknown-service",
        KnockRefusal::Full(_) => "grants-full",
        KnockRefusal::Policy(..) => "policy",
        KnockRefusal::State(_) => "state",
        KnockRefusal::Firewall(_) => "firewall",
        KnockRefusal::Fwknop(crate::fwknop::Refusal::Content { .. })
        | KnockRefusal::FwknopStanza {
            refusal: crate::fwknop::Refusal::Content { .. },
            ..
        } => "fwknop-content",
        KnockRefusal::Fwknop(crate::fwknop::Refusal::Type { .. })
        | KnockRefusal::FwknopStanza { .. } => "fwknop-type",
    }
}

/// Logs knock outcomes without letting a flood flood the log.
pub(super) struct KnockLog {
    lines: DefaultDirectRateLimiter,
    per_source: Option<DefaultKeyedRateLimiter<IpAddr>>,
    refused: BTreeMap<&'static str, u64>,
    unlogged: u64,
}

impl KnockLog {
    pub(super) fn new() -> Self {
        let all = NonZeroU32::new(ALL_SOURCES_PER_SECOND).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(PER_SOURCE_BURST).unwrap_or(NonZeroU32::MIN);
        let per_source =
            Quota::with_period(PER_SOURCE_PERIOD).map(|q| RateLimiter::keyed(q.allow_burst(burst)));
        Self {
            lines: RateLimiter::direct(Quota::per_second(all)),
            per_source,
            refused: BTreeMap::new(),
            unlogged: 0,
        }
    }

    /// One line per grant; refusals one line each while under the rate, with the
    /// source and the reason (never the key or the packet).
    pub(super) fn outcome(&mut self, outcome: &KnockOutcome, source: IpAddr) {
        match outcome {
            KnockOutcome::Granted {
                record,
                kind,
                capped,
                bound,
                more,
            } => {
                for (record, extended) in std::iter::once((record, *kind == Granted::Extended))
                    .chain(more.iter().map(|r| (r, false)))
                {
                    info!(
                        target: AUDIT,
                        event = "grant",
                        id = %record.id,
                        service = %record.service,
                        address = %record.address,
                        source = %source,
                        who = %record.who,
                        expires_at = record.expires_at,
                        ttl_secs = record.expires_at_ms.saturating_sub(record.granted_at_ms) / 1000,
                        extended,
                        capped,
                        bound,
                        "knock accepted"
                    );
                }
            }
            KnockOutcome::Window {
                window,
                renewed,
                capped,
                bound,
            } => info!(
                target: AUDIT,
                event = "egress-open",
                id = %window.id,
                service = crate::service::EGRESS,
                scope = %window.scope,
                source = %source,
                who = %window.who,
                command = ?window.command,
                expires_at = window.expires_at,
                ttl_secs = window.expires_at_ms.saturating_sub(window.granted_at_ms) / 1000,
                renewed = *renewed,
                capped,
                bound,
                "knock accepted: host-wide egress window"
            ),
            KnockOutcome::Refused { reason, banned } => {
                let name = reason_name(reason);
                *self.refused.entry(name).or_default() += 1;
                let source_ok = self
                    .per_source
                    .as_ref()
                    .is_none_or(|l| l.check_key(&source).is_ok());
                if source_ok && self.lines.check().is_ok() {
                    warn!(target: AUDIT, event = "refuse", source = %source, reason = name,
                        detail = %reason, "knock refused");
                } else {
                    self.unlogged += 1;
                }
                if *banned {
                    warn!(target: AUDIT, event = "ban", source = %source,
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
        if let Some(limiter) = &self.per_source {
            limiter.retain_recent();
        }
    }
}
