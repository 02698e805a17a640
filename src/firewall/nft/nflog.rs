//! The netfilter log group (`nfnetlink_log`) the kernel reports completed port
//! sequences on: the daemon binds the group, asks for the first bytes of each packet,
//! and reads the packet mark (whose sequence), the prefix (opened or refused) and the
//! source address (from the packet's own header).
//!
//! Bounded parsing: every length is checked against the bytes that are there, and
//! nothing here panics on any input. Only messages from the kernel (port 0) count.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, OwnedFd};

use nix::errno::Errno;
use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recvfrom, send,
    setsockopt, socket, sockopt,
};

const NLMSG_HDRLEN: usize = 16;
const NFGENMSG_LEN: usize = 4;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NFNL_SUBSYS_ULOG: u16 = 4;
const NFULNL_MSG_PACKET: u16 = 0;
const NFULNL_MSG_CONFIG: u16 = 1;
const NFULA_CFG_CMD: u16 = 1;
const NFULA_CFG_MODE: u16 = 2;
const NFULA_CFG_QTHRESH: u16 = 4;
const NFULNL_CFG_CMD_BIND: u8 = 1;
const NFULNL_COPY_PACKET: u8 = 2;
const NFULA_MARK: u16 = 2;
const NFULA_PAYLOAD: u16 = 9;
const NFULA_PREFIX: u16 = 10;
const NLA_TYPE_MASK: u16 = 0x3fff;
/// Longest prefix kept (the kernel's is 128 bytes with its NUL).
const MAX_PREFIX: usize = 128;
/// Receive buffer: a burst of completions is small; a flood of refusals is limited
/// by the rule to 10 a second.
const SOCKET_BUFFER: usize = 1 << 20;
/// Most packets one [`SequenceLog::take`] returns; the rest wait for the next call.
const MAX_PER_TAKE: usize = 256;

/// One packet the kernel logged to the group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Logged {
    /// The rule's log prefix.
    pub prefix: String,
    /// The packet mark (0 when unset).
    pub mark: u32,
    /// The packet's source address.
    pub source: IpAddr,
    /// The packet's protocol and destination port (TCP or UDP), when the copy holds
    /// them and the header has no IPv6 extension before them.
    pub touch: Option<(u8, u16)>,
}

/// A bound log group, read without blocking.
pub struct SequenceLog {
    fd: OwnedFd,
    group: u16,
    buf: Vec<u8>,
    /// Packets the kernel could not queue to the socket since the last take.
    pub lost: bool,
}

/// A netlink attribute header and value, padded to 4 bytes.
fn attribute(kind: u16, value: &[u8]) -> Vec<u8> {
    let len = 4 + value.len();
    let mut out = Vec::with_capacity(len.div_ceil(4) * 4);
    out.extend_from_slice(&u16::try_from(len).unwrap_or(u16::MAX).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(value);
    out.resize(len.div_ceil(4) * 4, 0);
    out
}

/// One `NFULNL_MSG_CONFIG` request for `group` carrying `attr`.
fn config_message(group: u16, seq: u32, attr: &[u8]) -> Vec<u8> {
    let len = NLMSG_HDRLEN + NFGENMSG_LEN + attr.len();
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&u32::try_from(len).unwrap_or(0).to_ne_bytes());
    m.extend_from_slice(&(NFNL_SUBSYS_ULOG << 8 | NFULNL_MSG_CONFIG).to_ne_bytes());
    m.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    // nfgenmsg: family AF_UNSPEC, version 0, the group in network order.
    m.extend_from_slice(&[0, 0]);
    m.extend_from_slice(&group.to_be_bytes());
    m.extend_from_slice(attr);
    m
}

impl SequenceLog {
    /// Binds log group `group`, asking for `snaplen` bytes of each packet. Fails with
    /// the kernel's errno (EBUSY: another program, ulogd say, holds the group).
    pub fn open(group: u16, snaplen: u32) -> io::Result<Self> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkNetFilter,
        )?;
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0))?;
        setsockopt(&fd, sockopt::RcvBufForce, &SOCKET_BUFFER)
            .or_else(|_| setsockopt(&fd, sockopt::RcvBuf, &SOCKET_BUFFER))?;
        setsockopt(
            &fd,
            sockopt::ReceiveTimeout,
            &nix::sys::time::TimeVal::new(2, 0),
        )?;
        let mut me = Self {
            fd,
            group,
            buf: vec![0u8; 64 * 1024],
            lost: false,
        };
        me.request(1, &attribute(NFULA_CFG_CMD, &[NFULNL_CFG_CMD_BIND]))?;
        let mut mode = snaplen.to_be_bytes().to_vec();
        mode.extend_from_slice(&[NFULNL_COPY_PACKET, 0]);
        me.request(2, &attribute(NFULA_CFG_MODE, &mode))?;
        // Each packet at once: the kernel's default batches up to 100 for a second.
        me.request(3, &attribute(NFULA_CFG_QTHRESH, &1u32.to_be_bytes()))?;
        let flags = nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(&me.fd, nix::fcntl::FcntlArg::F_SETFL(flags))?;
        Ok(me)
    }

    /// The group it listens on.
    #[must_use]
    pub fn group(&self) -> u16 {
        self.group
    }

    /// Sends one config request and waits for the kernel's acknowledgement.
    fn request(&mut self, seq: u32, attr: &[u8]) -> io::Result<()> {
        send(
            self.fd.as_raw_fd(),
            &config_message(self.group, seq, attr),
            MsgFlags::empty(),
        )?;
        loop {
            let (len, from) = recvfrom::<NetlinkAddr>(self.fd.as_raw_fd(), &mut self.buf)?;
            if from.is_some_and(|a| a.pid() != 0) {
                continue;
            }
            match ack_of(&self.buf[..len.min(self.buf.len())], seq) {
                Some(0) => return Ok(()),
                Some(errno) => return Err(io::Error::from_raw_os_error(errno)),
                None => {}
            }
        }
    }

    /// Hands the log to the async runtime, which wakes the caller when packets arrive.
    pub fn register(self) -> io::Result<tokio::io::unix::AsyncFd<Self>> {
        // SAFETY: `self.fd` is an open socket owned by `self`; it is neither closed nor
        // replaced while the `AsyncFd` holds `self` (it closes only when the `AsyncFd`
        // drops `self`, after deregistering).
        let registered = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(self, tokio::io::Interest::READABLE)
        };
        registered.map_err(io::Error::from)
    }

    /// [`SequenceLog::take`], and whether reports were lost since the last call.
    pub fn take_all(&mut self) -> (io::Result<(Vec<Logged>, bool)>, bool) {
        let taken = self.take();
        (taken, std::mem::take(&mut self.lost))
    }

    /// The packets logged since the last call (at most [`MAX_PER_TAKE`]), and whether
    /// the socket is drained (if not, the caller comes back without waiting).
    pub fn take(&mut self) -> io::Result<(Vec<Logged>, bool)> {
        let mut out = Vec::new();
        while out.len() < MAX_PER_TAKE {
            match recvfrom::<NetlinkAddr>(self.fd.as_raw_fd(), &mut self.buf) {
                Ok((len, from)) => {
                    // Only the kernel speaks for the log group.
                    if from.is_some_and(|a| a.pid() != 0) {
                        continue;
                    }
                    out.extend(parse(&self.buf[..len.min(self.buf.len())]));
                }
                Err(Errno::EAGAIN) => return Ok((out, true)),
                Err(Errno::ENOBUFS) => self.lost = true,
                Err(Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok((out, false))
    }
}

impl AsRawFd for SequenceLog {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes([
        *b.get(at)?,
        *b.get(at + 1)?,
        *b.get(at + 2)?,
        *b.get(at + 3)?,
    ]))
}

/// The messages of one datagram: (type, payload after the netlink header).
fn messages(datagram: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    let mut at = 0;
    while let (Some(len), Some(kind)) = (u32_at(datagram, at), u16_at(datagram, at + 4)) {
        let len = usize::try_from(len).unwrap_or(0);
        if len < NLMSG_HDRLEN || at + len > datagram.len() {
            break;
        }
        out.push((kind, &datagram[at + NLMSG_HDRLEN..at + len]));
        at += len.div_ceil(4) * 4;
    }
    out
}

/// The error code of the acknowledgement of `seq` in `datagram` (0: success).
fn ack_of(datagram: &[u8], seq: u32) -> Option<i32> {
    let mut at = 0;
    while let (Some(len), Some(kind)) = (u32_at(datagram, at), u16_at(datagram, at + 4)) {
        let len = usize::try_from(len).unwrap_or(0);
        if len < NLMSG_HDRLEN || at + len > datagram.len() {
            return None;
        }
        if kind == NLMSG_ERROR && u32_at(datagram, at + 8) == Some(seq) {
            let code = u32_at(datagram, at + NLMSG_HDRLEN)?;
            return Some(i32::from_ne_bytes(code.to_ne_bytes()).saturating_neg());
        }
        at += len.div_ceil(4) * 4;
    }
    None
}

/// The logged packets in one datagram.
#[must_use]
pub fn parse(datagram: &[u8]) -> Vec<Logged> {
    messages(datagram)
        .into_iter()
        .filter(|(kind, _)| *kind == NFNL_SUBSYS_ULOG << 8 | NFULNL_MSG_PACKET)
        .filter_map(|(_, body)| packet(body.get(NFGENMSG_LEN..)?))
        .collect()
}

/// One `NFULNL_MSG_PACKET`'s attributes → a logged packet (needs a payload whose
/// header gives the source).
fn packet(mut attrs: &[u8]) -> Option<Logged> {
    let (mut prefix, mut mark, mut source, mut touch) = (String::new(), 0u32, None, None);
    while let (Some(len), Some(kind)) = (u16_at(attrs, 0), u16_at(attrs, 2)) {
        let len = usize::from(len);
        if len < 4 || len > attrs.len() {
            break;
        }
        let value = &attrs[4..len];
        match kind & NLA_TYPE_MASK {
            NFULA_MARK => {
                if let Ok(b) = <[u8; 4]>::try_from(value) {
                    mark = u32::from_be_bytes(b);
                }
            }
            NFULA_PREFIX => {
                let text = value.split(|b| *b == 0).next().unwrap_or_default();
                let text = &text[..text.len().min(MAX_PREFIX)];
                prefix = String::from_utf8_lossy(text).into_owned();
            }
            NFULA_PAYLOAD => {
                source = source_of(value);
                touch = touch_of(value);
            }
            _ => {}
        }
        attrs = attrs.get(len.div_ceil(4) * 4..).unwrap_or_default();
    }
    Some(Logged {
        prefix,
        mark,
        source: source?,
        touch,
    })
}

/// The protocol and destination port of a TCP or UDP packet.
fn touch_of(packet: &[u8]) -> Option<(u8, u16)> {
    let (proto, l4) = match packet.first()? >> 4 {
        4 => (*packet.get(9)?, usize::from(packet.first()? & 0xf) * 4),
        6 => (*packet.get(6)?, 40),
        _ => return None,
    };
    if proto != 6 && proto != 17 {
        return None;
    }
    let port = u16::from_be_bytes([*packet.get(l4 + 2)?, *packet.get(l4 + 3)?]);
    Some((proto, port))
}

/// The source address in an IP header.
fn source_of(packet: &[u8]) -> Option<IpAddr> {
    match packet.first()? >> 4 {
        4 => Some(IpAddr::V4(Ipv4Addr::from(
            <[u8; 4]>::try_from(packet.get(12..16)?).ok()?,
        ))),
        6 => Some(IpAddr::V6(Ipv6Addr::from(
            <[u8; 16]>::try_from(packet.get(8..24)?).ok()?,
        ))),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet_message(attrs: &[Vec<u8>]) -> Vec<u8> {
        let body: Vec<u8> = attrs.concat();
        let len = NLMSG_HDRLEN + NFGENMSG_LEN + body.len();
        let mut m = Vec::new();
        m.extend_from_slice(&u32::try_from(len).unwrap().to_ne_bytes());
        m.extend_from_slice(&(NFNL_SUBSYS_ULOG << 8).to_ne_bytes());
        m.extend_from_slice(&[0; 10]);
        m.extend_from_slice(&[2, 0, 0, 7]);
        m.extend_from_slice(&body);
        m
    }

    fn ipv4_header(source: [u8; 4]) -> Vec<u8> {
        let mut h = vec![0x45, 0, 0, 40, 0, 0, 0, 0, 64, 6, 0, 0];
        h.extend_from_slice(&source);
        h.extend_from_slice(&[10, 0, 0, 1]);
        // TCP: source port 50000, destination 41234.
        h.extend_from_slice(&50_000u16.to_be_bytes());
        h.extend_from_slice(&41_234u16.to_be_bytes());
        h
    }

    #[test]
    fn reads_prefix_mark_and_source() {
        let mut prefix = b"knockgate-seq-open".to_vec();
        prefix.push(0);
        let d = packet_message(&[
            attribute(NFULA_MARK, &0x0100_0003u32.to_be_bytes()),
            attribute(NFULA_PREFIX, &prefix),
            attribute(NFULA_PAYLOAD, &ipv4_header([198, 51, 100, 7])),
        ]);
        assert_eq!(
            parse(&d),
            vec![Logged {
                prefix: "knockgate-seq-open".into(),
                mark: 0x0100_0003,
                source: "198.51.100.7".parse().unwrap(),
                touch: Some((6, 41_234)),
            }]
        );
        let mut v6 = vec![0x60; 8];
        v6.extend_from_slice(&"2001:db8::9".parse::<Ipv6Addr>().unwrap().octets());
        v6.extend_from_slice(&[0; 16]);
        let d = packet_message(&[attribute(NFULA_PAYLOAD, &v6)]);
        assert_eq!(
            parse(&d)[0].source,
            "2001:db8::9".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn never_panics_and_needs_a_source() {
        let d = packet_message(&[
            attribute(NFULA_MARK, &7u32.to_be_bytes()),
            attribute(NFULA_PAYLOAD, &ipv4_header([1, 2, 3, 4])),
        ]);
        for cut in 0..d.len() {
            let _ = parse(&d[..cut]);
        }
        let mut bad = d.clone();
        bad[0] = 0xff;
        assert!(parse(&bad).is_empty());
        let d = packet_message(&[attribute(NFULA_PAYLOAD, &[0x45, 0, 0])]);
        assert!(parse(&d).is_empty());
        for seed in 0u32..2_000 {
            let junk: Vec<u8> = (0..64u32)
                .map(|i| {
                    u8::try_from(
                        (seed.wrapping_mul(2_654_435_761) ^ i.wrapping_mul(40_503)) >> 7 & 0xff,
                    )
                    .unwrap_or(0)
                })
                .collect();
            let _ = parse(&junk);
            let _ = ack_of(&junk, seed);
        }
    }

    #[test]
    fn acknowledgements() {
        let mut m = Vec::new();
        m.extend_from_slice(&36u32.to_ne_bytes());
        m.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(&5u32.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&(-16i32).to_ne_bytes());
        m.extend_from_slice(&[0; 16]);
        assert_eq!(ack_of(&m, 5), Some(16));
        assert_eq!(ack_of(&m, 6), None);
    }
}
