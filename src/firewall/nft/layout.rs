//! What a table holds now, by name: its chains, its named sets with their shape, and
//! its counter objects — read by dumps, as plain bytes (no libnftnl objects, so no
//! `unsafe`). A replace that keeps some sets in place must delete everything else by
//! name, and may keep a set only while it still has the shape the new ruleset wants
//! (same key, flags, data, timeout and size).
//!
//! Bounded parsing: every length is checked against the bytes that are there; a
//! message that does not parse is skipped, never a panic.

use nftnl::nftnl_sys::libc;
use nftnl::set::SetKey;

use super::events::{NFGENMSG_LEN, NLMSG_HDRLEN, attribute, dump_request, trim_nul};
use super::{CgroupId, CgroupV4, CgroupV6, InetProto, MARK_TYPE, StageTouchKey, TouchKey};
use crate::ruleset::{IpFamily, SetDef, SetKeyType, SetKind};

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFPROTO_INET: u8 = 1;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_GETCHAIN: u16 = 4;
const NFT_MSG_NEWSET: u16 = 9;
const NFT_MSG_GETSET: u16 = 10;
const NFT_MSG_NEWOBJ: u16 = 18;
const NFT_MSG_GETOBJ: u16 = 19;
const NFT_MSG_NEWFLOWTABLE: u16 = 22;
const NFT_MSG_GETFLOWTABLE: u16 = 23;
/// Name and type attributes of object and flowtable messages.
const NFTA_NAME: u16 = 2;
const NFTA_OBJ_TYPE: u16 = 3;
/// `NFT_OBJECT_COUNTER`.
const COUNTER: u32 = 1;
/// `NFT_SET_ANONYMOUS`: a set made for one rule (`{ 22, 80 }`), gone with it.
const ANONYMOUS: u32 = 0x1;

/// Attribute 1 is the table in chain, set, object and flowtable messages alike.
const TABLE_ATTR: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_SET_NAME: u16 = 2;
const NFTA_SET_FLAGS: u16 = 3;
const NFTA_SET_KEY_TYPE: u16 = 4;
const NFTA_SET_KEY_LEN: u16 = 5;
const NFTA_SET_DATA_TYPE: u16 = 6;
const NFTA_SET_DATA_LEN: u16 = 7;
const NFTA_SET_DESC: u16 = 9;
const NFTA_SET_DESC_SIZE: u16 = 1;
const NFTA_SET_TIMEOUT: u16 = 11;

/// What decides whether a set can stay in place across a replace: everything the
/// kernel fixes when the set is made. Elements are not part of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct SetShape {
    /// nft's key type id and length in bytes.
    pub key: (u32, u32),
    /// `NFT_SET_*` flags.
    pub flags: u32,
    /// A map's data type and length.
    pub data: Option<(u32, u32)>,
    /// The default timeout of its elements, in milliseconds.
    pub timeout_ms: Option<u64>,
    /// Most elements.
    pub size: Option<u32>,
}

/// The shape knockgate gives `def`. [`super::add_set`] builds every set from it, so
/// what is compared is what is sent.
pub(super) fn shape_of(def: &SetDef) -> SetShape {
    let key = match def.key {
        SetKeyType::Addr(IpFamily::V4) => key_of::<std::net::Ipv4Addr>(),
        SetKeyType::Addr(IpFamily::V6) => key_of::<std::net::Ipv6Addr>(),
        SetKeyType::Cgroup => key_of::<CgroupId>(),
        SetKeyType::Proto => key_of::<InetProto>(),
        SetKeyType::CgroupAddr(IpFamily::V4) => key_of::<CgroupV4>(),
        SetKeyType::CgroupAddr(IpFamily::V6) => key_of::<CgroupV6>(),
        SetKeyType::Touch => key_of::<TouchKey>(),
        SetKeyType::StageTouch => key_of::<StageTouchKey>(),
    };
    let timeout = libc::NFT_SET_TIMEOUT;
    let (flags, data, timeout_ms, size) = match def.kind {
        SetKind::Grants => (timeout, None, None, None),
        SetKind::Bans { size } | SetKind::RuleGrants { size } => (timeout, None, None, Some(size)),
        SetKind::Meter { size, timeout_secs } => (
            timeout | libc::NFT_SET_EVAL,
            None,
            Some(u64::from(timeout_secs) * 1000),
            Some(size),
        ),
        SetKind::SeqProgress { size, timeout_secs } => (
            libc::NFT_SET_MAP | timeout | libc::NFT_SET_EVAL,
            Some((MARK_TYPE, 4)),
            Some(u64::from(timeout_secs) * 1000),
            Some(size),
        ),
        SetKind::SeqMap => (
            libc::NFT_SET_MAP | timeout,
            Some((MARK_TYPE, 4)),
            None,
            None,
        ),
        SetKind::SeqUsed { size } => (timeout | libc::NFT_SET_EVAL, None, None, Some(size)),
    };
    SetShape {
        key,
        flags: u32::try_from(flags).unwrap_or(0),
        data,
        timeout_ms,
        size,
    }
}

fn key_of<K: SetKey>() -> (u32, u32) {
    (K::TYPE, K::LEN)
}

/// The request for every inet chain.
pub(super) fn chain_dump_request(seq: u32) -> Vec<u8> {
    dump_request(NFT_MSG_GETCHAIN, seq)
}

/// The request for every inet set.
pub(super) fn set_dump_request(seq: u32) -> Vec<u8> {
    dump_request(NFT_MSG_GETSET, seq)
}

/// The request for every inet stateful object (counters, quotas, limits, …).
pub(super) fn object_dump_request(seq: u32) -> Vec<u8> {
    dump_request(NFT_MSG_GETOBJ, seq)
}

/// The request for every inet flowtable.
pub(super) fn flowtable_dump_request(seq: u32) -> Vec<u8> {
    dump_request(NFT_MSG_GETFLOWTABLE, seq)
}

/// One of `table`'s objects: a counter's name, or what anything else is (knockgate
/// makes only counters).
pub(super) enum Object {
    /// A named counter.
    Counter(String),
    /// Some other kind of object, described for a log line.
    Other(String),
}

/// The object `message` (one object dump reply) describes, if it is one of `table`'s.
pub(super) fn object(message: &[u8], table: &str) -> Option<Object> {
    let attrs = attributes_of(message, NFT_MSG_NEWOBJ, table)?;
    let name = text(attrs, NFTA_NAME)?;
    Some(match be32(attrs, NFTA_OBJ_TYPE) {
        Some(COUNTER) => Object::Counter(name),
        kind => Object::Other(format!("object {name} (type {})", kind.unwrap_or(0))),
    })
}

/// The flowtable `message` (one flowtable dump reply) describes, if it is one of
/// `table`'s.
pub(super) fn flowtable(message: &[u8], table: &str) -> Option<String> {
    let attrs = attributes_of(message, NFT_MSG_NEWFLOWTABLE, table)?;
    text(attrs, NFTA_NAME).map(|name| format!("flowtable {name}"))
}

/// Whether a dumped set is an anonymous one (bound to a rule).
pub(super) fn is_anonymous(shape: &SetShape) -> bool {
    shape.flags & ANONYMOUS != 0
}

/// The attributes of `message` if it is an inet `kind` message about table `table`.
fn attributes_of<'m>(message: &'m [u8], kind: u16, table: &str) -> Option<&'m [u8]> {
    if message.len() < NLMSG_HDRLEN + NFGENMSG_LEN
        || u16::from_ne_bytes([message[4], message[5]]) != (NFNL_SUBSYS_NFTABLES << 8) | kind
        || message[NLMSG_HDRLEN] != NFPROTO_INET
    {
        return None;
    }
    let attrs = &message[NLMSG_HDRLEN + NFGENMSG_LEN..];
    (attribute(attrs, TABLE_ATTR).map(trim_nul) == Some(table.as_bytes())).then_some(attrs)
}

fn text(attrs: &[u8], kind: u16) -> Option<String> {
    attribute(attrs, kind).map(|v| String::from_utf8_lossy(trim_nul(v)).into_owned())
}

fn be32(attrs: &[u8], kind: u16) -> Option<u32> {
    attribute(attrs, kind)
        .filter(|v| v.len() == 4)
        .map(|v| u32::from_be_bytes([v[0], v[1], v[2], v[3]]))
}

fn be64(attrs: &[u8], kind: u16) -> Option<u64> {
    attribute(attrs, kind)
        .and_then(|v| <[u8; 8]>::try_from(v).ok())
        .map(u64::from_be_bytes)
}

/// The name of the chain `message` (one chain dump reply) describes, if it is one of
/// `table`'s.
pub(super) fn chain_name(message: &[u8], table: &str) -> Option<String> {
    text(
        attributes_of(message, NFT_MSG_NEWCHAIN, table)?,
        NFTA_CHAIN_NAME,
    )
}

/// The name and shape of the set `message` (one set dump reply) describes, if it is
/// one of `table`'s.
pub(super) fn set_shape(message: &[u8], table: &str) -> Option<(String, SetShape)> {
    let attrs = attributes_of(message, NFT_MSG_NEWSET, table)?;
    let name = text(attrs, NFTA_SET_NAME)?;
    let data = be32(attrs, NFTA_SET_DATA_TYPE).zip(be32(attrs, NFTA_SET_DATA_LEN));
    let size = attribute(attrs, NFTA_SET_DESC).and_then(|desc| be32(desc, NFTA_SET_DESC_SIZE));
    let shape = SetShape {
        key: (
            be32(attrs, NFTA_SET_KEY_TYPE)?,
            be32(attrs, NFTA_SET_KEY_LEN)?,
        ),
        flags: be32(attrs, NFTA_SET_FLAGS).unwrap_or(0),
        data,
        timeout_ms: be64(attrs, NFTA_SET_TIMEOUT),
        size,
    };
    Some((name, shape))
}

#[cfg(test)]
mod tests {
    use super::super::events::attr;
    use super::*;

    fn message(kind: u16, attrs: &[Vec<u8>]) -> Vec<u8> {
        let body: Vec<u8> = attrs.concat();
        let len = u32::try_from(NLMSG_HDRLEN + NFGENMSG_LEN + body.len()).unwrap();
        let mut m = len.to_ne_bytes().to_vec();
        m.extend_from_slice(&((NFNL_SUBSYS_NFTABLES << 8) | kind).to_ne_bytes());
        m.extend_from_slice(&[0; 10]);
        m.extend_from_slice(&[NFPROTO_INET, 0, 0, 0]);
        m.extend_from_slice(&body);
        m
    }

    fn grant_set() -> SetDef {
        SetDef {
            name: "ssh_grants_v4".into(),
            key: SetKeyType::Addr(IpFamily::V4),
            kind: SetKind::Grants,
            elements: Vec::new(),
        }
    }

    fn as_dumped(name: &str, table: &str, shape: SetShape) -> Vec<u8> {
        let mut attrs = vec![
            attr(TABLE_ATTR, format!("{table}\0").as_bytes()),
            attr(NFTA_SET_NAME, format!("{name}\0").as_bytes()),
            attr(NFTA_SET_FLAGS, &shape.flags.to_be_bytes()),
            attr(NFTA_SET_KEY_TYPE, &shape.key.0.to_be_bytes()),
            attr(NFTA_SET_KEY_LEN, &shape.key.1.to_be_bytes()),
        ];
        if let Some((t, l)) = shape.data {
            attrs.push(attr(NFTA_SET_DATA_TYPE, &t.to_be_bytes()));
            attrs.push(attr(NFTA_SET_DATA_LEN, &l.to_be_bytes()));
        }
        if let Some(ms) = shape.timeout_ms {
            attrs.push(attr(NFTA_SET_TIMEOUT, &ms.to_be_bytes()));
        }
        if let Some(size) = shape.size {
            attrs.push(attr(
                NFTA_SET_DESC,
                &attr(NFTA_SET_DESC_SIZE, &size.to_be_bytes()),
            ));
        }
        message(NFT_MSG_NEWSET, &attrs)
    }

    #[test]
    fn a_dumped_set_reads_back_with_the_shape_it_was_made_with() {
        let kinds = [
            SetKind::Grants,
            SetKind::Bans { size: 65_536 },
            SetKind::Meter {
                size: 1024,
                timeout_secs: 60,
            },
            SetKind::SeqProgress {
                size: 10,
                timeout_secs: 30,
            },
            SetKind::SeqMap,
        ];
        for kind in kinds {
            let def = SetDef {
                kind,
                ..grant_set()
            };
            let dumped = as_dumped(&def.name, "knockgate", shape_of(&def));
            assert_eq!(
                set_shape(&dumped, "knockgate"),
                Some((def.name.clone(), shape_of(&def))),
                "{kind:?}"
            );
            assert_eq!(set_shape(&dumped, "other"), None, "another table's set");
        }
    }

    #[test]
    fn a_set_of_another_shape_does_not_match() {
        let grants = shape_of(&grant_set());
        let bans = shape_of(&SetDef {
            kind: SetKind::Bans { size: 10 },
            ..grant_set()
        });
        let v6 = shape_of(&SetDef {
            key: SetKeyType::Addr(IpFamily::V6),
            ..grant_set()
        });
        assert_ne!(grants, bans);
        assert_ne!(grants, v6);
        assert_eq!(grants.key, (7, 4), "ipv4_addr");
    }

    #[test]
    fn truncated_or_foreign_messages_parse_to_nothing() {
        let dumped = as_dumped("s", "knockgate", shape_of(&grant_set()));
        for cut in 0..dumped.len() {
            // Never a panic; a cut inside the attributes may still name the set.
            let _ = set_shape(&dumped[..cut], "knockgate");
            let _ = chain_name(&dumped[..cut], "knockgate");
        }
        assert_eq!(
            chain_name(&dumped, "knockgate"),
            None,
            "a set is not a chain"
        );
        let chain = message(
            NFT_MSG_NEWCHAIN,
            &[
                attr(TABLE_ATTR, b"knockgate\0"),
                attr(NFTA_CHAIN_NAME, b"input\0"),
            ],
        );
        assert_eq!(chain_name(&chain, "knockgate").as_deref(), Some("input"));
        assert_eq!(chain_name(&chain, "knock"), None);
    }
}
