//! ctnetlink, as plain bytes: mark every connection conntrack tracks now with
//! knockgate's conntrack mark, so that connections which existed before knockgate
//! first took over the host (an admin's SSH session) pass its established rules.
//!
//! Facts this relies on (`linux/netfilter/nfnetlink_conntrack.h`, ctnetlink in 6.1):
//! a `IPCTNL_MSG_CT_GET` dump returns one message per connection whose nested
//! `CTA_TUPLE_ORIG` (and `CTA_ZONE`, if any) identify it; an `IPCTNL_MSG_CT_NEW`
//! without `NLM_F_CREATE` updates an existing entry only, and its mark becomes
//! `(mark & !CTA_MARK_MASK) ^ CTA_MARK` — with both equal to our bits, `mark | bits`,
//! leaving every other bit as it was. Bounded parsing, no panics, no `unsafe`.

const NLMSG_HDRLEN: usize = 16;
const NFGENMSG_LEN: usize = 4;
const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_NEW: u16 = 0;
const IPCTNL_MSG_CT_GET: u16 = 1;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLA_TYPE_MASK: u16 = 0x3fff;
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_MARK: u16 = 8;
const CTA_ZONE: u16 = 18;
const CTA_MARK_MASK: u16 = 21;

/// The dump request for every connection of every family (`AF_UNSPEC`).
#[must_use]
pub fn dump_request(seq: u32) -> Vec<u8> {
    message(IPCTNL_MSG_CT_GET, NLM_F_REQUEST | NLM_F_DUMP, seq, 0, &[])
}

/// What identifies one connection of a dump, ready to be sent back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connection {
    family: u8,
    /// The attributes that find it again: `CTA_TUPLE_ORIG` and `CTA_ZONE`, whole.
    key: Vec<u8>,
    /// Its mark now (0 when the kernel sent none).
    mark: u32,
}

impl Connection {
    /// Whether every bit of `bits` is already in its mark.
    #[must_use]
    pub fn has(&self, bits: u32) -> bool {
        self.mark & bits == bits
    }
}

/// The connection one dump reply message describes; `None` for anything else.
#[must_use]
pub fn parse_dump_message(message: &[u8]) -> Option<Connection> {
    if message.len() < NLMSG_HDRLEN + NFGENMSG_LEN {
        return None;
    }
    let kind = u16::from_ne_bytes([message[4], message[5]]);
    if kind != (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW {
        return None;
    }
    let len = usize::try_from(u32::from_ne_bytes([
        message[0], message[1], message[2], message[3],
    ]))
    .ok()?
    .min(message.len());
    let family = message[NLMSG_HDRLEN];
    let mut key = Vec::new();
    let mut mark = 0;
    for (kind, whole, payload) in attributes(message.get(NLMSG_HDRLEN + NFGENMSG_LEN..len)?) {
        match kind {
            CTA_TUPLE_ORIG | CTA_ZONE => {
                key.extend_from_slice(whole);
                key.resize(key.len().div_ceil(4) * 4, 0);
            }
            CTA_MARK if payload.len() == 4 => {
                mark = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
            }
            _ => {}
        }
    }
    let has_tuple = attributes(&key).any(|(kind, _, _)| kind == CTA_TUPLE_ORIG);
    has_tuple.then_some(Connection { family, key, mark })
}

/// The update that sets `bits` in `connection`'s mark and changes nothing else (no
/// `NLM_F_CREATE`: a connection that ended meanwhile is not made again).
#[must_use]
pub fn mark_request(connection: &Connection, bits: u32, seq: u32) -> Vec<u8> {
    let mut attrs = connection.key.clone();
    attrs.extend_from_slice(&attribute(CTA_MARK, &bits.to_be_bytes()));
    attrs.extend_from_slice(&attribute(CTA_MARK_MASK, &bits.to_be_bytes()));
    message(
        IPCTNL_MSG_CT_NEW,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        connection.family,
        &attrs,
    )
}

fn message(kind: u16, flags: u16, seq: u32, family: u8, attrs: &[u8]) -> Vec<u8> {
    let len = u32::try_from(NLMSG_HDRLEN + NFGENMSG_LEN + attrs.len()).unwrap_or(u32::MAX);
    let mut m = len.to_ne_bytes().to_vec();
    m.extend_from_slice(&((NFNL_SUBSYS_CTNETLINK << 8) | kind).to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    // nfgenmsg: family, version 0 (NFNETLINK_V0), resource id 0.
    m.extend_from_slice(&[family, 0, 0, 0]);
    m.extend_from_slice(attrs);
    m
}

fn attribute(kind: u16, payload: &[u8]) -> Vec<u8> {
    let len = u16::try_from(4 + payload.len()).unwrap_or(u16::MAX);
    let mut a = len.to_ne_bytes().to_vec();
    a.extend_from_slice(&kind.to_ne_bytes());
    a.extend_from_slice(payload);
    a.resize(a.len().div_ceil(4) * 4, 0);
    a
}

/// The top-level attributes in `bytes`: (type without flags, whole attribute, payload).
/// Stops at the first length that does not fit.
fn attributes(mut bytes: &[u8]) -> impl Iterator<Item = (u16, &[u8], &[u8])> {
    std::iter::from_fn(move || {
        if bytes.len() < 4 {
            return None;
        }
        let len = usize::from(u16::from_ne_bytes([bytes[0], bytes[1]]));
        let kind = u16::from_ne_bytes([bytes[2], bytes[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > bytes.len() {
            return None;
        }
        let item = (kind, &bytes[..len], &bytes[4..len]);
        bytes = bytes.get(len.div_ceil(4) * 4..).unwrap_or(&[]);
        Some(item)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel sets it on tuples; copied attributes keep it as they came.
    const NLA_F_NESTED: u16 = 0x8000;

    fn reply(family: u8, attrs: &[u8]) -> Vec<u8> {
        message(IPCTNL_MSG_CT_NEW, 0, 7, family, attrs)
    }

    fn tuple() -> Vec<u8> {
        // CTA_TUPLE_ORIG { CTA_TUPLE_IP { v4 src, v4 dst }, CTA_TUPLE_PROTO { num } }
        let ip = [attribute(1, &[10, 77, 1, 2]), attribute(2, &[10, 77, 1, 1])].concat();
        let proto = attribute(1, &[6]);
        let inner = [
            attribute(1 | NLA_F_NESTED, &ip),
            attribute(2 | NLA_F_NESTED, &proto),
        ]
        .concat();
        attribute(CTA_TUPLE_ORIG | NLA_F_NESTED, &inner)
    }

    #[test]
    fn a_dumped_connection_is_sent_back_with_its_tuple_and_the_mark() {
        let zone = attribute(CTA_ZONE, &3u16.to_be_bytes());
        let attrs = [
            tuple(),
            attribute(CTA_MARK, &0x5u32.to_be_bytes()),
            zone.clone(),
        ]
        .concat();
        let c = parse_dump_message(&reply(2, &attrs)).unwrap();
        assert_eq!(c.family, 2);
        assert_eq!(c.mark, 5);
        assert!(c.has(0x4) && !c.has(0x1000_0000));
        assert_eq!(c.key, [tuple(), zone].concat());
        let request = mark_request(&c, 0x1000_0000, 9);
        assert_eq!(
            u16::from_ne_bytes([request[4], request[5]]),
            (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW
        );
        assert_eq!(u16::from_ne_bytes([request[6], request[7]]), 0x5);
        let attrs: Vec<_> = attributes(&request[NLMSG_HDRLEN + NFGENMSG_LEN..])
            .map(|(k, _, p)| (k, p.to_vec()))
            .collect();
        assert_eq!(attrs[0].0, CTA_TUPLE_ORIG);
        assert_eq!(attrs[1].0, CTA_ZONE);
        assert_eq!(attrs[2], (CTA_MARK, 0x1000_0000u32.to_be_bytes().to_vec()));
        assert_eq!(
            attrs[3],
            (CTA_MARK_MASK, 0x1000_0000u32.to_be_bytes().to_vec())
        );
        let len = u32::from_ne_bytes([request[0], request[1], request[2], request[3]]);
        assert_eq!(usize::try_from(len).unwrap(), request.len());
    }

    #[test]
    fn messages_without_a_tuple_or_of_another_kind_are_skipped() {
        assert_eq!(parse_dump_message(&reply(2, &[])), None);
        let mut other = reply(2, &tuple());
        other[4] = 3; // NLMSG_DONE-like type
        other[5] = 0;
        assert_eq!(parse_dump_message(&other), None);
    }

    #[test]
    fn never_panics_on_truncated_or_garbled_input() {
        let good = reply(10, &[tuple(), attribute(CTA_MARK, &[0, 0, 0, 1])].concat());
        for cut in 0..good.len() {
            let _ = parse_dump_message(&good[..cut]);
        }
        let mut bad = good.clone();
        for i in NLMSG_HDRLEN + NFGENMSG_LEN..bad.len() {
            bad[i] ^= 0xff;
            let _ = parse_dump_message(&bad);
            bad[i] ^= 0xff;
        }
        let mut huge = good;
        huge[0..4].copy_from_slice(&u32::MAX.to_ne_bytes());
        let _ = parse_dump_message(&huge);
    }
}
