//! The netlink socket to nf_tables: send one batch with one `sendmsg`, then read
//! exactly the acknowledgements it asked for.
//!
//! Facts this relies on (`shared/research/nftnl-notes.md`, G1–G4): the kernel needs
//! BEGIN…END in one skb, so the batch's pages go out as the iovecs of a single
//! `sendmsg`; on a refused batch the END is never acknowledged, so after the first
//! error the rest is drained without blocking; every batch numbers from 1, so each
//! transaction drains completely before the next. No `unsafe` here: nix does the calls.

use std::collections::BTreeSet;
use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

use nftnl::nftnl_sys::libc;
use nix::errno::Errno;
use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, connect,
    getsockname, recv, recvfrom, sendmsg, setsockopt, socket, sockopt,
};
use nix::sys::time::TimeVal;
use nix::{setsockopt_impl, sockopt_impl};

/// Socket buffers big enough for a baseline with many live grants (G3: the defaults
/// fail large batches with EMSGSIZE, and their ACKs with ENOBUFS).
const SOCKET_BUFFER: usize = 4 << 20;
/// Longest wait for the kernel's answer before the daemon gives up on a batch.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);
const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
/// Most messages a dump may return before it is cut off (bounded reads).
const MAX_DUMP_MESSAGES: usize = 1 << 20;

/// A refused message: its sequence number and the kernel's errno.
#[derive(Debug)]
pub(super) struct Refusal {
    pub seq: u32,
    pub errno: i32,
}

/// Why a transaction failed.
#[derive(Debug)]
pub(super) enum TransactError {
    Send(io::Error),
    Receive(io::Error),
    Refused(Refusal),
    BadReply(String),
}

/// A bound `NETLINK_NETFILTER` socket.
pub(super) struct NetlinkSocket {
    fd: OwnedFd,
    /// The send buffer asked for: a batch goes out as one datagram, which must fit.
    send_buffer: std::cell::Cell<usize>,
}

impl NetlinkSocket {
    pub(super) fn open() -> io::Result<Self> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkNetFilter,
        )?;
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0))?;
        from_the_kernel_only(&fd)?;
        // The FORCE variants need CAP_NET_ADMIN, which every caller of this module has.
        setsockopt(&fd, sockopt::SndBufForce, &SOCKET_BUFFER)?;
        setsockopt(&fd, sockopt::RcvBufForce, &SOCKET_BUFFER)?;
        let timeout = TimeVal::new(i64::try_from(ACK_TIMEOUT.as_secs()).unwrap_or(5), 0);
        setsockopt(&fd, sockopt::ReceiveTimeout, &timeout)?;
        Ok(Self {
            fd,
            send_buffer: std::cell::Cell::new(SOCKET_BUFFER),
        })
    }

    /// Grows the send buffer to take a `len`-byte datagram (the kernel refuses one
    /// longer than the buffer with EMSGSIZE). Never shrinks it.
    fn fit_send_buffer(&self, len: usize) -> io::Result<()> {
        let wanted = len + (64 << 10);
        if wanted > self.send_buffer.get() {
            setsockopt(&self.fd, sockopt::SndBufForce, &wanted)?;
            self.send_buffer.set(wanted);
        }
        Ok(())
    }

    /// The netlink port id the kernel gave this socket: the `nlmsg_pid` of the
    /// notifications its own batches cause.
    pub(super) fn netns_cookie(&self) -> io::Result<u64> {
        // `SO_NETNS_COOKIE` (Linux ≥ 5.14): a number no other network namespace of this
        // boot ever has (an inode number can be reused).
        const SO_NETNS_COOKIE: libc::c_int = 71;
        let mut cookie: u64 = 0;
        let mut len = libc::socklen_t::try_from(std::mem::size_of::<u64>()).unwrap_or(8);
        // SAFETY: `cookie` and `len` are valid for writes of the sizes given, and the
        // kernel writes at most `len` bytes; `self.fd` is an open socket.
        let rc = unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                SO_NETNS_COOKIE,
                (&raw mut cookie).cast(),
                &raw mut len,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(cookie)
    }

    pub(super) fn port_id(&self) -> io::Result<u32> {
        let addr: NetlinkAddr = getsockname(self.fd.as_raw_fd())?;
        Ok(addr.pid())
    }

    /// Sends `pages` (one finalized batch) and waits for an ACK for every sequence
    /// number in `expected`; returns the first refusal, after draining the rest.
    pub(super) fn transact(
        &self,
        pages: &[&[u8]],
        expected: std::ops::Range<u32>,
    ) -> Result<(), TransactError> {
        let iov: Vec<IoSlice<'_>> = pages.iter().map(|p| IoSlice::new(p)).collect();
        self.fit_send_buffer(pages.iter().map(|p| p.len()).sum())
            .map_err(TransactError::Send)?;
        let kernel = NetlinkAddr::new(0, 0);
        sendmsg(
            self.fd.as_raw_fd(),
            &iov,
            &[],
            MsgFlags::empty(),
            Some(&kernel),
        )
        .map_err(|e| TransactError::Send(e.into()))?;

        let mut pending: BTreeSet<u32> = expected.collect();
        let mut refusal: Option<Refusal> = None;
        let mut buf = vec![0u8; 256 * 1024];
        while !pending.is_empty() {
            let flags = if refusal.is_some() {
                MsgFlags::MSG_DONTWAIT
            } else {
                MsgFlags::empty()
            };
            let len = match recv(self.fd.as_raw_fd(), &mut buf, flags) {
                Ok(len) => len,
                Err(Errno::EAGAIN) if refusal.is_some() => break,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(TransactError::Receive(e.into())),
            };
            for ack in parse_acks(&buf[..len]).map_err(TransactError::BadReply)? {
                pending.remove(&ack.seq);
                if ack.errno != 0 && refusal.is_none() {
                    refusal = Some(ack);
                }
            }
        }
        match refusal {
            Some(refusal) => Err(TransactError::Refused(refusal)),
            None => Ok(()),
        }
    }
}

impl NetlinkSocket {
    /// Sends one datagram to the kernel.
    fn send_one(&self, datagram: &[u8]) -> Result<(), TransactError> {
        let kernel = NetlinkAddr::new(0, 0);
        sendmsg(
            self.fd.as_raw_fd(),
            &[IoSlice::new(datagram)],
            &[],
            MsgFlags::empty(),
            Some(&kernel),
        )
        .map(drop)
        .map_err(|e| TransactError::Send(e.into()))
    }

    /// Sends `datagram` (plain requests, each with `NLM_F_ACK`) and waits for the
    /// acknowledgement of every sequence number in `expected`; returns the refusals.
    pub(super) fn requests(
        &self,
        datagram: &[u8],
        expected: std::ops::Range<u32>,
    ) -> Result<Vec<Refusal>, TransactError> {
        self.send_one(datagram)?;
        let mut pending: BTreeSet<u32> = expected.collect();
        let mut refusals = Vec::new();
        let mut buf = vec![0u8; 256 * 1024];
        while !pending.is_empty() {
            let len = match recv(self.fd.as_raw_fd(), &mut buf, MsgFlags::empty()) {
                Ok(len) => len,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(TransactError::Receive(e.into())),
            };
            for ack in parse_acks(&buf[..len]).map_err(TransactError::BadReply)? {
                if pending.remove(&ack.seq) && ack.errno != 0 {
                    refusals.push(ack);
                }
            }
        }
        Ok(refusals)
    }

    /// Sends `request` (one message, sequence number `seq`) and hands every answer to
    /// it — kind and whole message, stale replies to earlier requests skipped — to `on`
    /// until `on` says the answer is complete (`Ok(true)`). Bounded parsing: a message
    /// whose length does not fit the datagram is an error.
    fn replies(
        &self,
        request: &[u8],
        seq: u32,
        mut on: impl FnMut(u16, &[u8]) -> Result<bool, TransactError>,
    ) -> Result<(), TransactError> {
        self.send_one(request)?;
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let len = match recv(self.fd.as_raw_fd(), &mut buf, MsgFlags::empty()) {
                Ok(len) => len,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(TransactError::Receive(e.into())),
            };
            let mut rest = &buf[..len];
            while rest.len() >= NLMSG_HDRLEN {
                let msg_len = usize::try_from(u32_at(rest, 0)).unwrap_or(usize::MAX);
                if msg_len < NLMSG_HDRLEN || msg_len > rest.len() {
                    return Err(TransactError::BadReply(format!(
                        "message length {msg_len} in a {}-byte datagram",
                        rest.len()
                    )));
                }
                let kind = u16::from_ne_bytes([rest[4], rest[5]]);
                let msg_seq = u32_at(rest, 8);
                let message = &rest[..msg_len];
                rest = rest.get(msg_len.div_ceil(4) * 4..).unwrap_or(&[]);
                if msg_seq == seq && on(kind, message)? {
                    return Ok(());
                }
            }
        }
    }

    /// Sends one request with `NLM_F_ACK` (sequence number `seq`) and returns the
    /// messages answering it (at most 16), read until its acknowledgement.
    pub(super) fn query(&self, request: &[u8], seq: u32) -> Result<Vec<Vec<u8>>, TransactError> {
        const MAX_REPLIES: usize = 16;
        let mut out = Vec::new();
        self.replies(request, seq, |kind, message| {
            if kind == NLMSG_ERROR {
                refused(message)?;
                return Ok(true);
            }
            if out.len() < MAX_REPLIES {
                out.push(message.to_vec());
            }
            Ok(false)
        })?;
        Ok(out)
    }

    /// Sends one dump request (a single message with sequence number `seq`) and returns
    /// every reply message, each copied into 4-byte-aligned storage for libnftnl.
    pub(super) fn dump(&self, request: &[u8], seq: u32) -> Result<Vec<Vec<u32>>, TransactError> {
        let (messages, complete) = self.dump_bounded(request, seq, MAX_DUMP_MESSAGES)?;
        if complete {
            Ok(messages)
        } else {
            Err(TransactError::BadReply("dump too long".to_owned()))
        }
    }

    /// Like [`NetlinkSocket::dump`], keeping at most `max` messages; the rest are read
    /// and dropped (so no stale reply is left behind). The flag says whether every
    /// message was kept.
    pub(super) fn dump_bounded(
        &self,
        request: &[u8],
        seq: u32,
        max: usize,
    ) -> Result<(Vec<Vec<u32>>, bool), TransactError> {
        let mut complete = true;
        let mut out = Vec::new();
        self.replies(request, seq, |kind, message| {
            match kind {
                NLMSG_DONE => return Ok(true),
                NLMSG_ERROR => refused(message)?,
                _ if out.len() >= max => complete = false,
                _ => out.push(aligned(message)),
            }
            Ok(false)
        })?;
        Ok((out, complete))
    }
}

/// The refusal in an acknowledgement message, as an error (none for a plain ACK).
fn refused(message: &[u8]) -> Result<(), TransactError> {
    let acks = parse_acks(message).map_err(TransactError::BadReply)?;
    match acks.into_iter().find(|a| a.errno != 0) {
        Some(refusal) => Err(TransactError::Refused(refusal)),
        None => Ok(()),
    }
}

/// `bytes` copied into `u32` storage, so a `nlmsghdr` can be read from its start.
fn aligned(bytes: &[u8]) -> Vec<u32> {
    bytes
        .chunks(4)
        .map(|c| {
            let mut word = [0u8; 4];
            word[..c.len()].copy_from_slice(c);
            u32::from_ne_bytes(word)
        })
        .collect()
}

/// The acknowledgements (`NLMSG_ERROR` messages; errno 0 means success) in one datagram.
/// Other message types are skipped. Bounded: never reads past `datagram`.
fn parse_acks(datagram: &[u8]) -> Result<Vec<Refusal>, String> {
    let mut acks = Vec::new();
    let mut rest = datagram;
    while rest.len() >= NLMSG_HDRLEN {
        let len = u32_at(rest, 0);
        let len = usize::try_from(len).map_err(|_| "message length overflows".to_owned())?;
        if len < NLMSG_HDRLEN || len > rest.len() {
            return Err(format!(
                "message length {len} in a {}-byte datagram",
                rest.len()
            ));
        }
        let kind = u16::from_ne_bytes([rest[4], rest[5]]);
        let seq = u32_at(rest, 8);
        if kind == NLMSG_ERROR {
            if len < NLMSG_HDRLEN + 4 {
                return Err("acknowledgement without an error code".to_owned());
            }
            let code = i32::from_ne_bytes([rest[16], rest[17], rest[18], rest[19]]);
            acks.push(Refusal {
                seq,
                errno: code.saturating_neg(),
            });
        }
        // Messages are padded to 4 bytes.
        let advance = len.div_ceil(4) * 4;
        rest = rest.get(advance..).unwrap_or(&[]);
    }
    Ok(acks)
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

/// Bit of `NFNLGRP_NFTABLES` (group 7) in the legacy bind mask.
const NFTABLES_GROUP_MASK: u32 = 1 << (7 - 1);

/// A non-blocking `NETLINK_NETFILTER` socket subscribed to nf_tables notifications.
pub(super) fn open_events() -> io::Result<OwnedFd> {
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        SockProtocol::NetlinkNetFilter,
    )?;
    bind(fd.as_raw_fd(), &NetlinkAddr::new(0, NFTABLES_GROUP_MASK))?;
    from_the_kernel_only(&fd)?;
    setsockopt(&fd, sockopt::RcvBufForce, &SOCKET_BUFFER)?;
    Ok(fd)
}

/// Connects a netlink socket to the kernel (port 0): the kernel then refuses unicasts
/// to it from any other socket (ECONNREFUSED), so another process with
/// CAP_NET_ADMIN cannot queue forged answers or notifications on it. Multicasts to
/// the notification group are not stopped by this: [`read_event`] checks the sender.
fn from_the_kernel_only(fd: &OwnedFd) -> io::Result<()> {
    connect(fd.as_raw_fd(), &NetlinkAddr::new(0, 0))?;
    Ok(())
}

/// `NFNLGRP_NFTABLES`, the nf_tables notification group.
const NFTABLES_GROUP: libc::c_int = 7;

sockopt_impl!(
    /// Joins a netlink multicast group.
    AddMembership,
    SetOnly,
    libc::SOL_NETLINK,
    libc::NETLINK_ADD_MEMBERSHIP,
    libc::c_int
);
sockopt_impl!(
    /// Leaves a netlink multicast group.
    DropMembership,
    SetOnly,
    libc::SOL_NETLINK,
    libc::NETLINK_DROP_MEMBERSHIP,
    libc::c_int
);

/// Puts event socket `fd` in the nf_tables notification group (`true`) or takes it
/// out: out of it, the kernel builds no notifications for it to skip.
pub(super) fn hear_events(fd: &OwnedFd, hear: bool) -> io::Result<()> {
    if hear {
        setsockopt(fd, AddMembership, &NFTABLES_GROUP)?;
    } else {
        setsockopt(fd, DropMembership, &NFTABLES_GROUP)?;
    }
    Ok(())
}

/// What one non-blocking read of the event socket gave.
pub(super) enum EventRead {
    /// A datagram of this many bytes.
    Datagram(usize),
    /// Nothing more to read now.
    Empty,
    /// The kernel dropped notifications because the socket was full.
    Overrun,
    /// A datagram another socket sent to the group (a process with CAP_NET_ADMIN
    /// may): not a notification, never read as one.
    Forged,
}

/// Reads one datagram from the event socket without blocking.
pub(super) fn read_event(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<EventRead> {
    loop {
        return match recvfrom::<NetlinkAddr>(fd.as_raw_fd(), buf) {
            // Only the kernel sends from port 0.
            Ok((len, Some(from))) if from.pid() == 0 => Ok(EventRead::Datagram(len)),
            Ok(_) => Ok(EventRead::Forged),
            Err(Errno::EAGAIN) => Ok(EventRead::Empty),
            Err(Errno::ENOBUFS) => Ok(EventRead::Overrun),
            Err(Errno::EINTR) => continue,
            Err(e) => Err(e.into()),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ack(seq: u32, code: i32) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&36u32.to_ne_bytes());
        m.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&code.to_ne_bytes());
        m.extend_from_slice(&[0u8; 16]);
        m
    }

    #[test]
    fn parses_success_and_refusal() {
        let mut d = ack(3, 0);
        d.extend(ack(4, -2));
        let acks = parse_acks(&d).unwrap();
        assert_eq!(acks.len(), 2);
        assert_eq!((acks[0].seq, acks[0].errno), (3, 0));
        assert_eq!((acks[1].seq, acks[1].errno), (4, 2));
    }

    #[test]
    fn refuses_lengths_past_the_datagram() {
        let mut d = ack(1, 0);
        d[0] = 200;
        assert!(parse_acks(&d).is_err());
        d[0] = 3;
        assert!(parse_acks(&d).is_err());
    }

    #[test]
    fn never_panics_on_truncated_input() {
        let d = ack(1, 0);
        for cut in 0..d.len() {
            let _ = parse_acks(&d[..cut]);
        }
    }
}
