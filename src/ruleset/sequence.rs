//! Port sequences judged by the kernel (`docs/decisions.md` 63): the sets and rules
//! that walk a source through its touches with no daemon in the packet path.
//!
//! The daemon writes every sequence in force (each key's current and previous step)
//! as a trie: `seq_start` maps a first touch to a stage, `seq_next` maps a stage and a
//! touch to the next stage, `seq_last` maps a stage and a last touch to the key it
//! completes. Stages are content hashes of the touches so far, so sequences that
//! begin alike share them and their elements. The packet path keeps where each
//! source is in `seq_progress_v4`/`_v6` (address → stage, a few seconds per touch):
//!
//! 1. a last touch from a stage (`seq_last`) that is not yet in `seq_used` adds the
//!    source to the key's grant set with the key's TTL, marks the step used (one-time),
//!    forgets the source's progress and tells the daemon (`log group`) — one rule per
//!    class of keys that share a service and a TTL (a `dynset` has one set and one
//!    timeout);
//! 2. the same last touch once used (or with its grant set full): progress forgotten,
//!    the daemon told at most 10 times a second;
//! 3. a touch that follows the source's stage (`seq_next`) moves it on;
//! 4. a first touch (`seq_start`) starts it (again);
//! 5. any other touch of the range forgets the source's progress and falls through to
//!    the drop policy like any closed port.
//!
//! nft has no syntax for a map lookup inside a concatenation, so these rules print in
//! an nft-like notation that `nft -f` does not take; everything else in the ruleset
//! text stays nft syntax.

use std::fmt;
use std::time::Duration;

use super::{Expr, IpFamily, Rate, Rule, SetDef, SetKeyType, SetKind, Verdict};
use crate::config::Config;
use crate::service::{Ports, Protocol};

/// The map of sources in the middle of a sequence, per family.
pub const SEQ_PROGRESS_V4: &str = "seq_progress_v4";
/// See [`SEQ_PROGRESS_V4`].
pub const SEQ_PROGRESS_V6: &str = "seq_progress_v6";
/// First touches → stages.
pub const SEQ_START: &str = "seq_start";
/// (stage, touch) → next stage.
pub const SEQ_NEXT: &str = "seq_next";
/// (stage, last touch) → the completion (class, generation, key).
pub const SEQ_LAST: &str = "seq_last";
/// (stage, last touch) already completed: a sequence opens once.
pub const SEQ_USED: &str = "seq_used";
/// Bytes of each logged packet the daemon gets: an IPv6 header and the ports.
pub const LOG_SNAPLEN: u32 = 64;
/// Log prefix of a completed sequence.
pub const OPENED_PREFIX: &str = "knockgate-seq-open";
/// Log prefix of a last touch refused (used, or the grant set full).
pub const REFUSED_PREFIX: &str = "knockgate-seq-refused";
/// Seconds a source has between two touches.
pub const TOUCH_TIMEOUT_SECS: u32 = 5;
/// Refusals logged to the daemon per second at most.
const REFUSED_PER_SECOND: u32 = 10;
/// Most used last steps at once: each is a completed sequence of the last three
/// steps, and a key's sequences complete at most once a step each.
pub const MAX_USED: u32 = 65_536;
/// Most distinct (service, TTL) classes: the class is 8 bits of the completion.
pub const MAX_CLASSES: usize = 255;

/// The set of progress for `family`.
#[must_use]
pub fn progress_set(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => SEQ_PROGRESS_V4,
        IpFamily::V6 => SEQ_PROGRESS_V6,
    }
}

/// One register-level step of a sequence rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SeqStep {
    /// A touch: a new TCP SYN (no other flag) or a new UDP datagram to the range.
    Guard {
        /// TCP or UDP.
        protocol: Protocol,
        /// The range.
        ports: Ports,
    },
    /// Loads the source address (and checks the family).
    LoadSource(IpFamily),
    /// Loads the source's stage from the progress map; no entry: no match.
    LoadStage {
        /// The progress map.
        progress: String,
    },
    /// Loads the touch (protocol, port).
    LoadTouch,
    /// Looks up (stage,) touch in `map`, loading what it leads to; absent: no match.
    Follow {
        /// The map.
        map: String,
        /// Key by the touch alone (`seq_start`), not stage and touch.
        first: bool,
    },
    /// What the lookup led to belongs to class `class`.
    Class(u8),
    /// (stage, touch) is not in `used` yet; then it is, for `timeout_ms`.
    Consume {
        /// The used set.
        used: String,
        /// How long it stays used.
        timeout_ms: u64,
    },
    /// Adds the source to `set` for `timeout_ms` (kept as is if already there).
    Grant {
        /// The grant set.
        set: String,
        /// The element's timeout.
        timeout_ms: u64,
    },
    /// Removes the source from the progress map.
    Forget {
        /// The progress map.
        progress: String,
    },
    /// Puts the source in the progress map at the stage the lookup led to.
    Advance {
        /// The progress map.
        progress: String,
    },
    /// Sets the packet mark to what the lookup led to (the log carries it).
    Mark,
}

impl fmt::Display for SeqStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Guard {
                protocol: Protocol::Tcp,
                ports,
            } => write!(
                f,
                "tcp flags & (fin|syn|rst|ack) == syn tcp dport {}-{}",
                ports.first, ports.last
            ),
            Self::Guard {
                protocol: Protocol::Udp,
                ports,
            } => write!(f, "udp dport {}-{}", ports.first, ports.last),
            Self::LoadSource(family) => write!(f, "{} saddr", family.keyword()),
            Self::LoadStage { progress } => write!(f, "map @{progress} as stage"),
            Self::LoadTouch => f.write_str("meta l4proto . th dport as touch"),
            Self::Follow { map, first: true } => write!(f, "touch map @{map} as next"),
            Self::Follow { map, first: false } => write!(f, "stage . touch map @{map} as next"),
            Self::Class(c) => write!(f, "next & 0xff000000 == {:#010x}", u32::from(*c) << 24),
            Self::Consume { used, timeout_ms } => write!(
                f,
                "stage . touch != @{used} add @{used} {{ stage . touch timeout {timeout_ms}ms }}"
            ),
            Self::Grant { set, timeout_ms } => {
                write!(f, "add @{set} {{ saddr timeout {timeout_ms}ms }}")
            }
            Self::Forget { progress } => write!(f, "delete @{progress} {{ saddr }}"),
            Self::Advance { progress } => write!(f, "add @{progress} {{ saddr : next }}"),
            Self::Mark => f.write_str("meta mark set next"),
        }
    }
}

/// A completed sequence as the kernel hands it to the daemon (the packet mark):
/// the class (8 bits, from 1), the daemon's generation of sequences (8 bits) and the
/// key's index among the sequence keys (16 bits).
#[must_use]
pub fn completion(class: u8, generation: u8, key_index: u16) -> u32 {
    u32::from(class) << 24 | u32::from(generation) << 16 | u32::from(key_index)
}

/// The parts of a [`completion`]: (class, generation, key index).
#[must_use]
pub fn completion_parts(value: u32) -> (u8, u8, u16) {
    let [class, generation, hi, lo] = value.to_be_bytes();
    (class, generation, u16::from_be_bytes([hi, lo]))
}

/// A class of sequence keys: what their sequences open, and for how long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Class {
    /// The service.
    pub service: String,
    /// The grant's TTL.
    pub ttl: Duration,
}

/// The classes of the config's sequence keys, in the order they first appear; a
/// key's class is its position here plus one.
#[must_use]
pub fn classes(config: &Config) -> Vec<Class> {
    let mut out: Vec<Class> = Vec::new();
    for key in config.keys.iter().filter(|k| k.sequence) {
        let class = Class {
            service: crate::config::sequence_service(key).to_owned(),
            ttl: crate::config::sequence_ttl(config, key),
        };
        if !out.contains(&class) {
            out.push(class);
        }
    }
    out
}

/// How long a step's last touch stays used: its sequence is accepted for at most two
/// steps and may be written one step early.
#[must_use]
pub fn used_timeout(step_secs: u32) -> Duration {
    Duration::from_secs(u64::from(step_secs) * 3)
}

/// The sets sequences need (none when no key has one).
#[must_use]
pub fn sets(config: &Config) -> Vec<SetDef> {
    if config.sequence_spec().is_none() {
        return Vec::new();
    }
    let progress = SetKind::SeqProgress {
        size: config.sequence.max_sources,
        timeout_secs: TOUCH_TIMEOUT_SECS,
    };
    let def = |name: &str, key, kind| SetDef {
        name: name.to_owned(),
        key,
        kind,
        elements: Vec::new(),
    };
    vec![
        def(SEQ_PROGRESS_V4, SetKeyType::Addr(IpFamily::V4), progress),
        def(SEQ_PROGRESS_V6, SetKeyType::Addr(IpFamily::V6), progress),
        def(SEQ_START, SetKeyType::Touch, SetKind::SeqMap),
        def(SEQ_NEXT, SetKeyType::StageTouch, SetKind::SeqMap),
        def(SEQ_LAST, SetKeyType::StageTouch, SetKind::SeqMap),
        def(
            SEQ_USED,
            SetKeyType::StageTouch,
            SetKind::SeqUsed { size: MAX_USED },
        ),
    ]
}

/// The rules that judge touches (none when no key has a sequence), for the input
/// chain after the knock rules.
#[must_use]
pub fn rules(config: &Config) -> Vec<Rule> {
    let Some(spec) = config.sequence_spec() else {
        return Vec::new();
    };
    let classes = classes(config);
    let used_ms = ms(used_timeout(spec.step_secs));
    let group = config.sequence.log_group;
    let mut rules = Vec::new();
    for &protocol in spec.protocols.protocols() {
        for family in [IpFamily::V4, IpFamily::V6] {
            let judge = Judge {
                protocol,
                ports: spec.ports,
                family,
                progress: progress_set(family).to_owned(),
            };
            for (i, class) in classes.iter().enumerate() {
                let Ok(number) = u8::try_from(i + 1) else {
                    break;
                };
                rules.push(judge.complete(number, class, used_ms, group));
            }
            rules.push(judge.refuse_last(group));
            rules.push(judge.advance());
            rules.push(judge.start());
            rules.push(judge.reset());
        }
    }
    rules
}

/// The rules of one protocol and family.
struct Judge {
    protocol: Protocol,
    ports: Ports,
    family: IpFamily,
    progress: String,
}

impl Judge {
    /// A new touch of the range.
    fn guard(&self) -> Vec<Expr> {
        vec![
            Expr::CtState(vec![super::CtState::New]),
            Expr::Seq(SeqStep::Guard {
                protocol: self.protocol,
                ports: self.ports,
            }),
        ]
    }

    /// A touch from the source's stage, looked up in `map`.
    fn at_stage(&self, map: &str) -> Vec<Expr> {
        let mut e = self.guard();
        e.extend([
            Expr::Seq(SeqStep::LoadSource(self.family)),
            Expr::Seq(SeqStep::LoadStage {
                progress: self.progress.clone(),
            }),
            Expr::Seq(SeqStep::LoadTouch),
            Expr::Seq(SeqStep::Follow {
                map: map.to_owned(),
                first: false,
            }),
        ]);
        e
    }

    fn forget(&self) -> Expr {
        Expr::Seq(SeqStep::Forget {
            progress: self.progress.clone(),
        })
    }

    /// 1: a last touch of class `number`, not used yet: grant, use, tell.
    fn complete(&self, number: u8, class: &Class, used_ms: u64, group: u16) -> Rule {
        let grants = crate::service::grant_set(&class.service, self.family);
        let mut e = self.at_stage(SEQ_LAST);
        e.extend([
            Expr::Seq(SeqStep::Class(number)),
            Expr::Seq(SeqStep::Consume {
                used: SEQ_USED.to_owned(),
                timeout_ms: used_ms,
            }),
            Expr::Seq(SeqStep::Grant {
                set: grants,
                timeout_ms: ms(class.ttl + crate::clock::KERNEL_TIMER_SLACK),
            }),
            self.forget(),
            Expr::Seq(SeqStep::Mark),
            Expr::LogGroup {
                group,
                prefix: OPENED_PREFIX.to_owned(),
            },
            Expr::Verdict(Verdict::Drop),
        ]);
        Rule(e)
    }

    /// 2: a last touch already used (or its grant set full).
    fn refuse_last(&self, group: u16) -> Rule {
        let mut e = self.at_stage(SEQ_LAST);
        e.extend([
            self.forget(),
            Expr::Limit(Rate {
                packets: REFUSED_PER_SECOND,
                per: super::Per::Second,
                burst: REFUSED_PER_SECOND,
            }),
            Expr::Seq(SeqStep::Mark),
            Expr::LogGroup {
                group,
                prefix: REFUSED_PREFIX.to_owned(),
            },
            Expr::Verdict(Verdict::Drop),
        ]);
        Rule(e)
    }

    /// 3: the next touch moves the source on.
    fn advance(&self) -> Rule {
        let mut e = self.at_stage(SEQ_NEXT);
        e.extend([
            self.forget(),
            Expr::Seq(SeqStep::Advance {
                progress: self.progress.clone(),
            }),
            Expr::Verdict(Verdict::Drop),
        ]);
        Rule(e)
    }

    /// 4: a first touch starts (or restarts) the source.
    fn start(&self) -> Rule {
        let mut e = self.guard();
        e.extend([
            Expr::Seq(SeqStep::LoadTouch),
            Expr::Seq(SeqStep::Follow {
                map: SEQ_START.to_owned(),
                first: true,
            }),
            Expr::Seq(SeqStep::LoadSource(self.family)),
            self.forget(),
            Expr::Seq(SeqStep::Advance {
                progress: self.progress.clone(),
            }),
            Expr::Verdict(Verdict::Drop),
        ]);
        Rule(e)
    }

    /// 5: any other touch forgets the source and falls through to the drop policy.
    fn reset(&self) -> Rule {
        let mut e = self.guard();
        e.extend([Expr::Seq(SeqStep::LoadSource(self.family)), self.forget()]);
        Rule(e)
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
