//! Authenticated port sequences (`docs/PROTOCOL.md`, "Knock sequences"): the ports a
//! key's holder touches during one time step, derived from the key, the server id and
//! the step by HMAC-SHA256, so that only key holders know them, each step's are new,
//! and two keys' sequences are independent.
//!
//! Pure: no I/O, no clock (time is passed in). The daemon writes the sequences into
//! the kernel, which judges the touches; the `knock` client sends or prints them.

use crate::knock::Secret;
use crate::knock::auth::ServerId;
use crate::service::{Ports, Protocol};

/// Shortest and longest sequence.
pub const LENGTHS: std::ops::RangeInclusive<u8> = 3..=8;
/// Fewest ports a sequence range may have (entropy: 4 touches of 1,024 ports ≈ 40 bits).
pub const MIN_RANGE: u32 = 1024;
/// Shortest and longest time step, in seconds.
pub const STEP_SECS: std::ops::RangeInclusive<u32> = 2..=3600;

const DOMAIN: &[u8] = b"knockgate sequence v1";
/// Most HMAC blocks one sequence may take (rejection sampling); reaching it would take
/// hundreds of rejected words in a row, which no range of [`MIN_RANGE`] ports allows.
const MAX_BLOCKS: u32 = 64;

/// Which transport the touches use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TouchProtocols {
    /// Every touch is a TCP SYN.
    Tcp,
    /// Every touch is a UDP datagram.
    Udp,
    /// Each touch is TCP or UDP, as the derivation says.
    Mixed,
}

impl TouchProtocols {
    /// `tcp`, `udp` or `mixed`, as in the config.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::Mixed => "mixed",
        }
    }

    /// Parses a config word.
    #[must_use]
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "tcp" => Some(Self::Tcp),
            "udp" => Some(Self::Udp),
            "mixed" => Some(Self::Mixed),
            _ => None,
        }
    }

    fn code(self) -> u8 {
        match self {
            Self::Tcp => 1,
            Self::Udp => 2,
            Self::Mixed => 3,
        }
    }

    /// The protocols in use.
    #[must_use]
    pub fn protocols(self) -> &'static [Protocol] {
        match self {
            Self::Tcp => &[Protocol::Tcp],
            Self::Udp => &[Protocol::Udp],
            Self::Mixed => &[Protocol::Tcp, Protocol::Udp],
        }
    }
}

/// The shape every sequence of a server has (`[sequence]` in the config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SequenceSpec {
    /// The ports touches go to.
    pub ports: Ports,
    /// Touches per sequence.
    pub length: u8,
    /// TCP, UDP or both.
    pub protocols: TouchProtocols,
    /// Seconds per time step.
    pub step_secs: u32,
}

impl Default for SequenceSpec {
    fn default() -> Self {
        Self {
            ports: Ports {
                first: 30_000,
                last: 60_999,
            },
            length: 4,
            protocols: TouchProtocols::Tcp,
            step_secs: 30,
        }
    }
}

/// One touch: a TCP SYN or a UDP datagram to a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Touch {
    /// TCP or UDP.
    pub protocol: Protocol,
    /// The port.
    pub port: u16,
}

impl Touch {
    /// The IP protocol number (`meta l4proto`).
    #[must_use]
    pub fn proto_number(self) -> u8 {
        match self.protocol {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
        }
    }
}

impl SequenceSpec {
    /// The step `unix_secs` falls in.
    #[must_use]
    pub fn step_at(&self, unix_secs: u64) -> u64 {
        unix_secs / u64::from(self.step_secs.max(1))
    }

    /// When `step` starts, in Unix seconds.
    #[must_use]
    pub fn step_start(&self, step: u64) -> u64 {
        step.saturating_mul(u64::from(self.step_secs))
    }

    /// When a sequence of `step` stops being accepted: the end of the next step (the
    /// server takes the current and the previous step's sequence).
    #[must_use]
    pub fn accepted_until(&self, step: u64) -> u64 {
        self.step_start(step.saturating_add(2))
    }

    fn slots(&self) -> u32 {
        let range = u32::from(self.ports.last) - u32::from(self.ports.first) + 1;
        match self.protocols {
            TouchProtocols::Mixed => range * 2,
            TouchProtocols::Tcp | TouchProtocols::Udp => range,
        }
    }

    fn touch_of(&self, slot: u32) -> Touch {
        let range = u32::from(self.ports.last) - u32::from(self.ports.first) + 1;
        let (protocol, offset) = match self.protocols {
            TouchProtocols::Tcp => (Protocol::Tcp, slot),
            TouchProtocols::Udp => (Protocol::Udp, slot),
            TouchProtocols::Mixed if slot < range => (Protocol::Tcp, slot),
            TouchProtocols::Mixed => (Protocol::Udp, slot - range),
        };
        let port = u32::from(self.ports.first) + offset;
        Touch {
            protocol,
            port: u16::try_from(port).unwrap_or(self.ports.last),
        }
    }

    /// The message of HMAC block `block` for `step` (`docs/PROTOCOL.md`).
    fn block_message(&self, server: &ServerId, step: u64, block: u32) -> Vec<u8> {
        let id = server.as_str().as_bytes();
        let mut m = Vec::with_capacity(DOMAIN.len() + id.len() + 32);
        m.extend_from_slice(DOMAIN);
        m.push(0);
        m.push(u8::try_from(id.len()).unwrap_or(u8::MAX));
        m.extend_from_slice(id);
        m.extend_from_slice(&self.ports.first.to_be_bytes());
        m.extend_from_slice(&self.ports.last.to_be_bytes());
        m.push(self.length);
        m.push(self.protocols.code());
        m.extend_from_slice(&self.step_secs.to_be_bytes());
        m.extend_from_slice(&step.to_be_bytes());
        m.extend_from_slice(&block.to_be_bytes());
        m
    }

    /// The sequence of the key `secret` for `step`: `length` distinct touches, drawn
    /// without bias from the HMAC blocks. `None` only if the blocks run out, which no
    /// valid spec allows in practice.
    #[must_use]
    pub fn derive(&self, secret: &Secret, server: &ServerId, step: u64) -> Option<Vec<Touch>> {
        let slots = self.slots();
        if slots == 0 {
            return None;
        }
        // Words at or above `limit` are rejected, so every slot is equally likely.
        let limit = (u64::from(u32::MAX) + 1) / u64::from(slots) * u64::from(slots);
        let mut touches: Vec<Touch> = Vec::with_capacity(usize::from(self.length));
        for block in 0..MAX_BLOCKS {
            let bytes = secret.sequence_block(&self.block_message(server, step, block));
            for word in bytes.chunks_exact(4) {
                let w = u64::from(u32::from_be_bytes([word[0], word[1], word[2], word[3]]));
                if w >= limit {
                    continue;
                }
                let slot = u32::try_from(w % u64::from(slots)).unwrap_or(0);
                let touch = self.touch_of(slot);
                if touches.contains(&touch) {
                    continue;
                }
                touches.push(touch);
                if touches.len() == usize::from(self.length) {
                    return Some(touches);
                }
            }
        }
        None
    }
}

/// `touches` as knockd's `knock` client takes them: `HOST 41234 52001:udp …` (a port
/// with no suffix is TCP, which is what that client does with one).
#[must_use]
pub fn knockd_arguments(host: &str, touches: &[Touch]) -> String {
    let mut out = host.to_owned();
    for t in touches {
        out.push(' ');
        out.push_str(&t.port.to_string());
        if t.protocol == Protocol::Udp {
            out.push_str(":udp");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> Secret {
        Secret::from_hex(&format!("{byte:02x}").repeat(32)).unwrap()
    }

    fn server() -> ServerId {
        ServerId::new("web1").unwrap()
    }

    #[test]
    fn a_sequence_has_distinct_touches_in_the_range() {
        for protocols in [
            TouchProtocols::Tcp,
            TouchProtocols::Udp,
            TouchProtocols::Mixed,
        ] {
            for length in LENGTHS {
                let spec = SequenceSpec {
                    length,
                    protocols,
                    ..SequenceSpec::default()
                };
                for step in 0..50 {
                    let seq = spec.derive(&key(1), &server(), step).unwrap();
                    assert_eq!(seq.len(), usize::from(length));
                    let mut sorted = seq.clone();
                    sorted.sort();
                    sorted.dedup();
                    assert_eq!(sorted.len(), seq.len(), "{seq:?}");
                    assert!(seq.iter().all(|t| spec.ports.contains(t.port)));
                    match protocols {
                        TouchProtocols::Tcp => {
                            assert!(seq.iter().all(|t| t.protocol == Protocol::Tcp));
                        }
                        TouchProtocols::Udp => {
                            assert!(seq.iter().all(|t| t.protocol == Protocol::Udp));
                        }
                        TouchProtocols::Mixed => {}
                    }
                }
            }
        }
    }

    #[test]
    fn keys_steps_servers_and_shapes_give_independent_sequences() {
        let spec = SequenceSpec::default();
        let base = spec.derive(&key(1), &server(), 100).unwrap();
        assert_ne!(base, spec.derive(&key(2), &server(), 100).unwrap());
        assert_ne!(base, spec.derive(&key(1), &server(), 101).unwrap());
        assert_ne!(
            base,
            spec.derive(&key(1), &ServerId::new("web2").unwrap(), 100)
                .unwrap()
        );
        let longer_step = SequenceSpec {
            step_secs: 60,
            ..spec
        };
        assert_ne!(base, longer_step.derive(&key(1), &server(), 100).unwrap());
        // Deterministic: the client and the server agree.
        assert_eq!(base, spec.derive(&key(1), &server(), 100).unwrap());
    }

    #[test]
    fn the_derivation_is_pinned() {
        // A client in another language checks itself against this vector
        // (docs/PROTOCOL.md): key 32 × 0x01, server id "web1", the default shape, step 1.
        let seq = SequenceSpec::default()
            .derive(&key(1), &server(), 1)
            .unwrap();
        let ports: Vec<u16> = seq.iter().map(|t| t.port).collect();
        // Computed by the Python reference in docs/PROTOCOL.md, not by this code.
        assert_eq!(ports, [36_247, 51_257, 56_784, 49_129]);
        let mixed = SequenceSpec {
            protocols: TouchProtocols::Mixed,
            ..SequenceSpec::default()
        }
        .derive(&key(1), &server(), 2)
        .unwrap();
        let t = |protocol, port| Touch { protocol, port };
        assert_eq!(
            mixed,
            [
                t(Protocol::Tcp, 50_597),
                t(Protocol::Udp, 51_521),
                t(Protocol::Tcp, 33_081),
                t(Protocol::Udp, 47_954)
            ]
        );
    }

    #[test]
    fn steps_and_their_acceptance() {
        let spec = SequenceSpec::default();
        assert_eq!(spec.step_at(59), 1);
        assert_eq!(spec.step_at(60), 2);
        assert_eq!(spec.step_start(2), 60);
        assert_eq!(spec.accepted_until(2), 120);
    }

    #[test]
    fn knockd_form() {
        let touches = [
            Touch {
                protocol: Protocol::Tcp,
                port: 41_000,
            },
            Touch {
                protocol: Protocol::Udp,
                port: 52_001,
            },
        ];
        assert_eq!(knockd_arguments("web1", &touches), "web1 41000 52001:udp");
    }
}
