//! nf_tables notifications, read as plain bytes: which messages touched knockgate's
//! table, and who sent them.
//!
//! Facts this relies on (`shared/research/nftnl-notes.md` §5): every committed change
//! is multicast to `NFNLGRP_NFTABLES` as `NEW*`/`DEL*` messages whose first attribute
//! is the table name, and each message's `nlmsg_pid` is the netlink port id of the
//! socket that asked for it; a transaction ends with one `NEWGEN` carrying the
//! committing process's pid and name. Element expiry sends nothing. Bounded parsing:
//! every length is checked against the bytes that are there, nothing panics.

use std::collections::BTreeMap;

pub(super) const NLMSG_HDRLEN: usize = 16;
pub(super) const NFGENMSG_LEN: usize = 4;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFPROTO_INET: u8 = 1;
const NLA_TYPE_MASK: u16 = 0x3fff;
const NFT_MSG_NEWGEN: u16 = 15;
const NFTA_GEN_PROC_PID: u16 = 2;
const NFTA_GEN_PROC_NAME: u16 = 3;
/// Attribute 1 is the table name in table, chain, rule, set, element, object and
/// flowtable messages alike.
const NFTA_TABLE_ATTR: u16 = 1;
/// Longest process name kept from a `NEWGEN` (the kernel's TASK_COMM_LEN is 16).
const MAX_NAME: usize = 64;

/// The nf_tables message types that change something, with their nft words.
fn change_name(kind: u16) -> Option<&'static str> {
    Some(match kind {
        0 => "add table",
        2 => "delete table",
        3 => "add chain",
        5 => "delete chain",
        6 => "add rule",
        8 => "delete rule",
        9 => "add set",
        11 => "delete set",
        12 => "add element",
        14 => "delete element",
        18 => "add object",
        20 => "delete object",
        22 => "add flowtable",
        24 => "delete flowtable",
        _ => return None,
    })
}

/// Changes made to one table by sockets other than the daemon's, as read from one or
/// more notification datagrams.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Tampering {
    /// How many messages of each kind (`delete rule` → 5).
    pub changes: BTreeMap<&'static str, usize>,
    /// The processes that committed generations containing foreign changes
    /// (`nft (pid 1234)`), as far as the `NEWGEN` messages say.
    pub by: Vec<String>,
    /// The kernel dropped notifications (the socket overflowed): anything may have
    /// happened, so the table must be treated as changed.
    pub lost_events: bool,
    /// Generations whose notifications, as far as they were heard, did not name the
    /// table from another socket (another process's commit to other tables, or the
    /// daemon's own), in the order heard. The firewall's account vouches for those
    /// it heard whole (`NftFirewall::hear`). Not a change: [`Tampering::is_empty`]
    /// ignores them.
    pub untouched: Vec<u32>,
}

impl Tampering {
    /// Whether anything was seen that calls for a repair.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty() && !self.lost_events
    }

    /// `delete rule ×5, delete table ×1`, for the log.
    #[must_use]
    pub fn summary(&self) -> String {
        let mut parts: Vec<String> = self
            .changes
            .iter()
            .map(|(what, n)| format!("{what} ×{n}"))
            .collect();
        if self.lost_events {
            parts.push("notifications lost".to_owned());
        }
        parts.join(", ")
    }
}

/// Reads the notification datagrams for inet table `table`, ignoring everything sent
/// by port `own_port` (the daemon's own netlink socket).
pub struct EventFilter {
    table: Vec<u8>,
    own_port: u32,
    /// Whether the current generation (since the last `NEWGEN`) had a foreign change.
    pending: bool,
}

impl EventFilter {
    /// A filter for `table`, trusting only `own_port`.
    #[must_use]
    pub fn new(table: &str, own_port: u32) -> Self {
        Self {
            table: table.as_bytes().to_vec(),
            own_port,
            pending: false,
        }
    }

    /// Forgets a foreign change seen in a generation whose end was not heard (its
    /// `NEWGEN` lost): it is not the next one's.
    pub fn forget_pending(&mut self) {
        self.pending = false;
    }

    /// Adds what `datagram` says to `out`; returns whether it was read whole. Malformed
    /// messages end the datagram (they are counted as lost events: the table must then
    /// be checked).
    pub fn read(&mut self, datagram: &[u8], out: &mut Tampering) -> bool {
        let mut rest = datagram;
        while rest.len() >= NLMSG_HDRLEN {
            let len = usize::try_from(u32_at(rest, 0)).unwrap_or(usize::MAX);
            if len < NLMSG_HDRLEN || len > rest.len() {
                out.lost_events = true;
                return false;
            }
            self.message(&rest[..len], out);
            rest = rest.get(len.div_ceil(4) * 4..).unwrap_or(&[]);
        }
        true
    }

    fn message(&mut self, message: &[u8], out: &mut Tampering) {
        let kind = u16::from_ne_bytes([message[4], message[5]]);
        let port = u32_at(message, 12);
        if kind >> 8 != NFNL_SUBSYS_NFTABLES || message.len() < NLMSG_HDRLEN + NFGENMSG_LEN {
            return;
        }
        let family = message[NLMSG_HDRLEN];
        let attrs = &message[NLMSG_HDRLEN + NFGENMSG_LEN..];
        let kind = kind & 0xff;
        if kind == NFT_MSG_NEWGEN {
            if std::mem::take(&mut self.pending) {
                out.by.push(committer(attrs));
            } else if let Some(generation) = generation(message) {
                out.untouched.push(generation);
            }
            return;
        }
        if port == self.own_port || family != NFPROTO_INET {
            return;
        }
        if attribute(attrs, NFTA_TABLE_ATTR).map(trim_nul) == Some(self.table.as_slice()) {
            // Any message of another socket's naming the table keeps its generation
            // from being vouched for; the kinds nft has words for are changes.
            self.pending = true;
            if let Some(what) = change_name(kind) {
                *out.changes.entry(what).or_default() += 1;
            }
        }
    }
}

/// A dump request for every inet table, numbered `seq`.
#[must_use]
pub fn table_dump_request(seq: u32) -> Vec<u8> {
    const NFT_MSG_GETTABLE: u16 = 1;
    dump_request(NFT_MSG_GETTABLE, seq)
}

/// A dump request of nf_tables message type `kind` (`GETTABLE`, `GETCHAIN`, …) for
/// every inet object of that kind, numbered `seq`. No table is named: answers are
/// filtered by table, which works the same on every kernel whoever owns the table.
pub(super) fn dump_request(kind: u16, seq: u32) -> Vec<u8> {
    const NLM_F_REQUEST: u16 = 1;
    const NLM_F_DUMP: u16 = 0x300;
    let len = u32::try_from(NLMSG_HDRLEN + NFGENMSG_LEN).unwrap_or(20);
    let mut m = len.to_ne_bytes().to_vec();
    m.extend_from_slice(&((NFNL_SUBSYS_NFTABLES << 8) | kind).to_ne_bytes());
    m.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&[NFPROTO_INET, 0, 0, 0]);
    m
}

/// A `GETGEN` request (with `NLM_F_ACK`), numbered `seq`: the kernel answers with one
/// `NEWGEN` carrying the ruleset's generation, which every commit by anyone advances.
#[must_use]
pub fn generation_request(seq: u32) -> Vec<u8> {
    const NFT_MSG_GETGEN: u16 = 16;
    const NLM_F_REQUEST_ACK: u16 = 1 | 4;
    let len = u32::try_from(NLMSG_HDRLEN + NFGENMSG_LEN).unwrap_or(20);
    let mut m = len.to_ne_bytes().to_vec();
    m.extend_from_slice(&((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN).to_ne_bytes());
    m.extend_from_slice(&NLM_F_REQUEST_ACK.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&[0, 0, 0, 0]);
    m
}

/// The BEGIN message at the start of `page` (one batch page) with an
/// `NFNL_BATCH_GENID` attribute of `generation` added, and the length of the BEGIN it
/// replaces; `None` if `page` does not start with a whole BEGIN. With it the kernel
/// refuses the whole batch (ERESTART) unless the ruleset is still at `generation`.
#[must_use]
pub fn with_generation(page: &[u8], generation: u32) -> Option<(Vec<u8>, usize)> {
    const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
    const NFNL_BATCH_GENID: u16 = 1;
    if page.len() < NLMSG_HDRLEN + NFGENMSG_LEN
        || u16::from_ne_bytes([page[4], page[5]]) != NFNL_MSG_BATCH_BEGIN
    {
        return None;
    }
    let len = usize::try_from(u32_at(page, 0)).ok()?;
    if len < NLMSG_HDRLEN + NFGENMSG_LEN || len > page.len() || len % 4 != 0 {
        return None;
    }
    let mut begin = page[..len].to_vec();
    begin[..4].copy_from_slice(&u32::try_from(len + 8).ok()?.to_ne_bytes());
    begin.extend_from_slice(&8u16.to_ne_bytes());
    begin.extend_from_slice(&NFNL_BATCH_GENID.to_ne_bytes());
    begin.extend_from_slice(&generation.to_be_bytes());
    Some((begin, len))
}

/// The generation in a `NEWGEN` message, if `message` is one.
#[must_use]
pub fn generation(message: &[u8]) -> Option<u32> {
    const NFTA_GEN_ID: u16 = 1;
    if message.len() < NLMSG_HDRLEN + NFGENMSG_LEN
        || u16::from_ne_bytes([message[4], message[5]])
            != (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN
    {
        return None;
    }
    attribute(&message[NLMSG_HDRLEN + NFGENMSG_LEN..], NFTA_GEN_ID)
        .filter(|v| v.len() == 4)
        .map(|v| u32::from_be_bytes([v[0], v[1], v[2], v[3]]))
}

/// The flags of inet table `table`, if `message` (one table dump reply) describes it.
#[must_use]
pub fn table_flags(message: &[u8], table: &str) -> Option<u32> {
    const NFTA_TABLE_FLAGS: u16 = 2;
    if message.len() < NLMSG_HDRLEN + NFGENMSG_LEN || message[NLMSG_HDRLEN] != NFPROTO_INET {
        return None;
    }
    let attrs = &message[NLMSG_HDRLEN + NFGENMSG_LEN..];
    if attribute(attrs, NFTA_TABLE_ATTR).map(trim_nul) != Some(table.as_bytes()) {
        return None;
    }
    Some(
        attribute(attrs, NFTA_TABLE_FLAGS)
            .filter(|v| v.len() == 4)
            .map_or(0, |v| u32::from_be_bytes([v[0], v[1], v[2], v[3]])),
    )
}

/// `nft (pid 1234)` from a `NEWGEN` message's attributes.
fn committer(attrs: &[u8]) -> String {
    let pid = attribute(attrs, NFTA_GEN_PROC_PID)
        .filter(|v| v.len() == 4)
        .map(|v| u32::from_be_bytes([v[0], v[1], v[2], v[3]]));
    let name = attribute(attrs, NFTA_GEN_PROC_NAME)
        .map(trim_nul)
        .map(|n| String::from_utf8_lossy(&n[..n.len().min(MAX_NAME)]).into_owned());
    match (name, pid) {
        (Some(name), Some(pid)) => format!("{name} (pid {pid})"),
        (None, Some(pid)) => format!("pid {pid}"),
        (Some(name), None) => name,
        (None, None) => "unknown process".to_owned(),
    }
}

/// The payload of the first attribute of type `wanted`, if the attributes are well formed
/// up to it.
pub(super) fn attribute(mut attrs: &[u8], wanted: u16) -> Option<&[u8]> {
    while attrs.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([attrs[0], attrs[1]]));
        let kind = u16::from_ne_bytes([attrs[2], attrs[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > attrs.len() {
            return None;
        }
        if kind == wanted {
            return Some(&attrs[4..len]);
        }
        attrs = attrs.get(len.div_ceil(4) * 4..).unwrap_or(&[]);
    }
    None
}

pub(super) fn trim_nul(bytes: &[u8]) -> &[u8] {
    bytes.split(|&b| b == 0).next().unwrap_or(bytes)
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

/// One netlink attribute, padded: for tests that build messages by hand.
#[cfg(test)]
pub(super) fn attr(kind: u16, payload: &[u8]) -> Vec<u8> {
    let len = u16::try_from(4 + payload.len()).unwrap();
    let mut a = len.to_ne_bytes().to_vec();
    a.extend_from_slice(&kind.to_ne_bytes());
    a.extend_from_slice(payload);
    while a.len() % 4 != 0 {
        a.push(0);
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_begin_message_gets_the_generation_guard_and_nothing_else_changes() {
        let mut page = 20u32.to_ne_bytes().to_vec();
        page.extend_from_slice(&0x10u16.to_ne_bytes());
        page.extend_from_slice(&1u16.to_ne_bytes());
        page.extend_from_slice(&77u32.to_ne_bytes()); // seq
        page.extend_from_slice(&0u32.to_ne_bytes());
        page.extend_from_slice(&[0, 0, 0, 10]); // nfgenmsg, res_id NFNL_SUBSYS_NFTABLES
        page.extend_from_slice(b"next message");
        let (begin, replaced) = with_generation(&page, 0x0102_0304).unwrap();
        assert_eq!(replaced, 20);
        assert_eq!(u32_at(&begin, 0), 28);
        assert_eq!(
            &begin[4..20],
            &page[4..20],
            "type, flags, seq, pid, nfgenmsg"
        );
        assert_eq!(
            attribute(&begin[20..], 1),
            Some(&[1, 2, 3, 4][..]),
            "NFNL_BATCH_GENID, big-endian"
        );
        assert_eq!(with_generation(&page[..19], 1), None, "cut short");
        let mut not_begin = page.clone();
        not_begin[4] = 0x11;
        assert_eq!(
            with_generation(&not_begin, 1),
            None,
            "an END is not a BEGIN"
        );
    }

    fn message(kind: u16, port: u32, family: u8, attrs: &[u8]) -> Vec<u8> {
        let len = u32::try_from(NLMSG_HDRLEN + NFGENMSG_LEN + attrs.len()).unwrap();
        let mut m = len.to_ne_bytes().to_vec();
        m.extend_from_slice(&((NFNL_SUBSYS_NFTABLES << 8) | kind).to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(&7u32.to_ne_bytes());
        m.extend_from_slice(&port.to_ne_bytes());
        m.extend_from_slice(&[family, 0, 0, 0]);
        m.extend_from_slice(attrs);
        m
    }

    fn on_table(kind: u16, port: u32, table: &str) -> Vec<u8> {
        message(
            kind,
            port,
            NFPROTO_INET,
            &attr(1, format!("{table}\0").as_bytes()),
        )
    }

    fn newgen(port: u32, pid: u32, name: &str) -> Vec<u8> {
        numbered_newgen(port, pid, name, 9)
    }

    fn numbered_newgen(port: u32, pid: u32, name: &str, generation: u32) -> Vec<u8> {
        let mut attrs = attr(1, &generation.to_be_bytes());
        attrs.extend(attr(2, &pid.to_be_bytes()));
        attrs.extend(attr(3, format!("{name}\0").as_bytes()));
        message(NFT_MSG_NEWGEN, port, 0, &attrs)
    }

    #[test]
    fn a_flush_by_another_process_is_tampering_and_names_it() {
        let mut d = on_table(8, 99, "knockgate");
        d.extend(on_table(8, 99, "knockgate"));
        d.extend(on_table(2, 99, "knockgate"));
        d.extend(newgen(99, 4242, "nft"));
        let mut out = Tampering::default();
        EventFilter::new("knockgate", 5).read(&d, &mut out);
        assert_eq!(out.changes.get("delete rule"), Some(&2));
        assert_eq!(out.changes.get("delete table"), Some(&1));
        assert_eq!(out.by, vec!["nft (pid 4242)".to_owned()]);
        assert_eq!(out.summary(), "delete rule ×2, delete table ×1");
    }

    #[test]
    fn own_changes_other_tables_and_other_families_are_ignored() {
        let mut d = on_table(2, 5, "knockgate");
        d.extend(on_table(0, 5, "knockgate"));
        d.extend(on_table(12, 5, "knockgate"));
        d.extend(newgen(5, 1, "knockgated"));
        d.extend(on_table(8, 99, "other"));
        d.extend(on_table(8, 99, "knockgate2"));
        d.extend(message(8, 99, 2, &attr(1, b"knockgate\0")));
        d.extend(newgen(99, 4242, "nft"));
        let mut out = Tampering::default();
        EventFilter::new("knockgate", 5).read(&d, &mut out);
        assert!(out.is_empty(), "{out:?}");
        assert!(out.by.is_empty());
    }

    #[test]
    fn generations_that_leave_the_table_alone_are_untouched_the_others_are_not() {
        // 20: another process's commit to another table; 21: the daemon's own;
        // 22: another process's commit to another table *and* to the table (one
        // transaction, as `nft -f` makes); 23: a message kind nft has no word for,
        // naming the table; 24: another family's table of the same name.
        let mut d = on_table(0, 99, "someone-else");
        d.extend(on_table(3, 99, "someone-else"));
        d.extend(numbered_newgen(99, 4242, "nft", 20));
        d.extend(on_table(12, 5, "knockgate"));
        d.extend(numbered_newgen(5, 1, "knockgated", 21));
        d.extend(on_table(0, 99, "someone-else"));
        d.extend(on_table(12, 99, "knockgate"));
        d.extend(numbered_newgen(99, 4243, "nft", 22));
        d.extend(on_table(30, 99, "knockgate"));
        d.extend(numbered_newgen(99, 4244, "nft", 23));
        d.extend(message(12, 99, 2, &attr(1, b"knockgate\0")));
        d.extend(numbered_newgen(99, 4245, "nft", 24));
        let mut out = Tampering::default();
        assert!(EventFilter::new("knockgate", 5).read(&d, &mut out));
        assert_eq!(out.untouched, vec![20, 21, 24]);
        assert_eq!(
            out.summary(),
            "add element ×1",
            "the unknown kind is no change"
        );
        assert_eq!(out.by, vec!["nft (pid 4243)", "nft (pid 4244)"]);
        assert!(!out.is_empty(), "untouched generations alone are no change");
        let mut only_untouched = Tampering::default();
        EventFilter::new("knockgate", 5)
            .read(&numbered_newgen(99, 1, "nft", 7), &mut only_untouched);
        assert_eq!(only_untouched.untouched, vec![7]);
        assert!(only_untouched.is_empty());
    }

    #[test]
    fn a_foreign_change_split_over_datagrams_keeps_its_generation_from_being_untouched() {
        let mut filter = EventFilter::new("knockgate", 5);
        let mut out = Tampering::default();
        assert!(filter.read(&on_table(14, 99, "knockgate"), &mut out));
        assert!(filter.read(&numbered_newgen(99, 4242, "nft", 30), &mut out));
        assert!(filter.read(&numbered_newgen(99, 4242, "nft", 31), &mut out));
        assert_eq!(out.untouched, vec![31]);
        assert_eq!(out.summary(), "delete element ×1");
    }

    #[test]
    fn table_flags_are_read_from_a_dump_reply() {
        let mut attrs = attr(1, b"knockgate\0");
        attrs.extend(attr(2, &6u32.to_be_bytes()));
        let reply = message(0, 0, NFPROTO_INET, &attrs);
        assert_eq!(table_flags(&reply, "knockgate"), Some(6));
        assert_eq!(table_flags(&reply, "other"), None);
        let bare = on_table(0, 0, "knockgate");
        assert_eq!(table_flags(&bare, "knockgate"), Some(0));
        assert_eq!(table_flags(&reply[..10], "knockgate"), None);
        assert_eq!(table_dump_request(3).len(), 20);
    }

    #[test]
    fn a_foreign_element_is_tampering() {
        let d = on_table(12, 99, "knockgate");
        let mut out = Tampering::default();
        EventFilter::new("knockgate", 5).read(&d, &mut out);
        assert_eq!(out.summary(), "add element ×1");
    }

    #[test]
    fn malformed_datagrams_count_as_lost_events_and_never_panic() {
        let good = on_table(2, 99, "knockgate");
        for cut in 0..good.len() {
            let mut out = Tampering::default();
            EventFilter::new("knockgate", 5).read(&good[..cut], &mut out);
        }
        let mut bad = good.clone();
        bad[0] = 200;
        let mut out = Tampering::default();
        assert!(!EventFilter::new("knockgate", 5).read(&bad, &mut out));
        assert!(out.lost_events && !out.is_empty());
        // An attribute longer than its message is ignored, not read past.
        let mut m = on_table(2, 99, "knockgate");
        m[NLMSG_HDRLEN + NFGENMSG_LEN] = 255;
        let mut out = Tampering::default();
        EventFilter::new("knockgate", 5).read(&m, &mut out);
        assert!(out.is_empty());
    }
}
