//! Port sequences judged by the kernel (`docs/decisions.md` 63): the sets and rules
//! that walk a source through its touches with no daemon in the packet path.
//!
//! The daemon writes every sequence in force (each key's current and previous step)
//! as a trie: `seq_start` maps a first touch to a stage, `seq_next` maps a stage and a
//! touch to the next stage, `seq_last` maps a stage and a last touch to the completion
//! (class, key, step). Stages are content hashes of the touches so far, so sequences
//! that begin alike share them and their elements. The packet path keeps where each
//! source is in `seq_progress_v4`/`_v6` (address → stage, a few seconds per touch); the
//! packet mark carries the stage from statement to statement (touches are dropped):
//!
//! 1. a last touch from a stage (`seq_last`) not yet in `seq_used` adds the source to
//!    the key's grant set with the key's TTL, marks that last step used (one-time),
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
//! Every statement is one nft writes itself, so `nft list ruleset` reads them back.

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

/// One statement of a sequence rule. The packet mark carries the source's stage
/// from statement to statement (the packets are dropped, so the mark goes nowhere),
/// which keeps every statement something nft itself writes and lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SeqStep {
    /// A touch: a new TCP SYN (no other flag) or a new UDP datagram to the range.
    Guard {
        /// TCP or UDP.
        protocol: Protocol,
        /// The range.
        ports: Ports,
    },
    /// `meta mark set ip saddr map @progress`: the source's stage; no entry: no match.
    Stage {
        /// The source's family.
        family: IpFamily,
        /// The progress map.
        progress: String,
    },
    /// `meta mark set meta l4proto . th dport map @map` (a first touch), or `meta mark
    /// set meta mark . meta l4proto . th dport map @map` (a touch from the stage in the
    /// mark); absent: no match.
    Follow {
        /// The map.
        map: String,
        /// Key by the touch alone (`seq_start`).
        first: bool,
    },
    /// `meta mark & 0xff000000 == CLASS << 24`: the completion is of this class.
    Class(u8),
    /// `meta mark . meta l4proto . th dport != @used`: this last step (the stage in the
    /// mark and the touch) has not completed a sequence yet.
    Unused {
        /// The used set.
        used: String,
    },
    /// `add @used { meta mark . meta l4proto . th dport timeout T }`: now it has.
    Use {
        /// The used set.
        used: String,
        /// How long it stays used.
        timeout_ms: u64,
    },
    /// `add @set { ip saddr timeout T }` (kept as is if already there).
    Grant {
        /// The source's family.
        family: IpFamily,
        /// The grant set.
        set: String,
        /// The element's timeout.
        timeout_ms: u64,
    },
    /// `delete @progress { ip saddr : meta mark }` (the data is not compared).
    Forget {
        /// The source's family.
        family: IpFamily,
        /// The progress map.
        progress: String,
    },
    /// `add @progress { ip saddr : meta mark }`: the source is at the stage in the mark.
    Advance {
        /// The source's family.
        family: IpFamily,
        /// The progress map.
        progress: String,
    },
}

impl fmt::Display for SeqStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Guard {
                protocol: Protocol::Tcp,
                ports,
            } => write!(
                f,
                "tcp flags & (fin | syn | rst | ack) == syn tcp dport {}-{}",
                ports.first, ports.last
            ),
            Self::Guard {
                protocol: Protocol::Udp,
                ports,
            } => write!(f, "udp dport {}-{}", ports.first, ports.last),
            Self::Stage { family, progress } => {
                write!(
                    f,
                    "meta mark set {} saddr map @{progress}",
                    family.keyword()
                )
            }
            Self::Follow { map, first: true } => {
                write!(f, "meta mark set meta l4proto . th dport map @{map}")
            }
            Self::Follow { map, first: false } => write!(
                f,
                "meta mark set meta mark . meta l4proto . th dport map @{map}"
            ),
            Self::Class(c) => write!(
                f,
                "meta mark & {CLASS_MASK:#010x} == {:#010x}",
                u32::from(*c) << 24
            ),
            Self::Unused { used } => {
                write!(f, "meta mark . meta l4proto . th dport != @{used}")
            }
            Self::Use { used, timeout_ms } => write!(
                f,
                "add @{used} {{ meta mark . meta l4proto . th dport timeout {timeout_ms}ms }}"
            ),
            Self::Grant {
                family,
                set,
                timeout_ms,
            } => write!(
                f,
                "add @{set} {{ {} saddr timeout {timeout_ms}ms }}",
                family.keyword()
            ),
            Self::Forget { family, progress } => write!(
                f,
                "delete @{progress} {{ {} saddr : meta mark }}",
                family.keyword()
            ),
            Self::Advance { family, progress } => write!(
                f,
                "add @{progress} {{ {} saddr : meta mark }}",
                family.keyword()
            ),
        }
    }
}

/// The class bits of a completion.
pub const CLASS_MASK: u32 = 0xff00_0000;
/// Most keys a completion can name (20 bits).
pub const MAX_KEY_INDEX: usize = (1 << 20) - 1;

/// A completed sequence as the kernel hands it to the daemon (the packet mark):
/// the class (8 bits, from 1), the key's index among the sequence keys (20 bits) and
/// the step it belongs to (its low 4 bits: a step's sequence is accepted for at most
/// three steps, so that tells steps apart).
#[must_use]
pub fn completion(class: u8, key_index: usize, step: u64) -> u32 {
    let index = u32::try_from(key_index.min(MAX_KEY_INDEX)).unwrap_or(0);
    let step = u32::try_from(step & 0xf).unwrap_or(0);
    u32::from(class) << 24 | index << 4 | step
}

/// The parts of a [`completion`]: (class, key index, step mod 16).
#[must_use]
pub fn completion_parts(value: u32) -> (u8, usize, u8) {
    let class = u8::try_from(value >> 24).unwrap_or(0);
    let index = usize::try_from(value >> 4 & 0xf_ffff).unwrap_or(0);
    let step = u8::try_from(value & 0xf).unwrap_or(0);
    (class, index, step)
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
            rules.push(judge.next());
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

    /// A touch from the source's stage, looked up in `map`: the mark holds what it
    /// leads to.
    fn at_stage(&self, map: &str) -> Vec<Expr> {
        let mut e = self.guard();
        e.extend([
            Expr::Seq(SeqStep::Stage {
                family: self.family,
                progress: self.progress.clone(),
            }),
            Expr::Seq(SeqStep::Follow {
                map: map.to_owned(),
                first: false,
            }),
        ]);
        e
    }

    fn forget(&self) -> Expr {
        Expr::Seq(SeqStep::Forget {
            family: self.family,
            progress: self.progress.clone(),
        })
    }

    fn advance(&self) -> Expr {
        Expr::Seq(SeqStep::Advance {
            family: self.family,
            progress: self.progress.clone(),
        })
    }

    /// 1: a last touch of class `number` that has not completed a sequence yet: grant,
    /// mark it used (in that order: a full grant set uses nothing up), tell the daemon.
    /// The used set is keyed by the stage and the touch — the sequence's own content,
    /// which no reload or restart renumbers.
    fn complete(&self, number: u8, class: &Class, used_ms: u64, group: u16) -> Rule {
        let grants = crate::service::grant_set(&class.service, self.family);
        let stage = Expr::Seq(SeqStep::Stage {
            family: self.family,
            progress: self.progress.clone(),
        });
        let last = Expr::Seq(SeqStep::Follow {
            map: SEQ_LAST.to_owned(),
            first: false,
        });
        let mut e = self.at_stage(SEQ_LAST);
        e.extend([
            Expr::Seq(SeqStep::Class(number)),
            stage,
            Expr::Seq(SeqStep::Unused {
                used: SEQ_USED.to_owned(),
            }),
            Expr::Seq(SeqStep::Grant {
                family: self.family,
                set: grants,
                timeout_ms: ms(crate::clock::kernel_timer().timeout(class.ttl)),
            }),
            Expr::Seq(SeqStep::Use {
                used: SEQ_USED.to_owned(),
                timeout_ms: used_ms,
            }),
            last,
            self.forget(),
            Expr::LogGroup {
                group,
                prefix: OPENED_PREFIX.to_owned(),
            },
            Expr::Verdict(Verdict::Drop),
        ]);
        Rule(e)
    }

    /// 2: a last touch whose step is used (or whose grant set is full).
    fn refuse_last(&self, group: u16) -> Rule {
        let mut e = self.at_stage(SEQ_LAST);
        e.extend([
            self.forget(),
            Expr::Limit(Rate {
                packets: REFUSED_PER_SECOND,
                per: super::Per::Second,
                burst: REFUSED_PER_SECOND,
            }),
            Expr::LogGroup {
                group,
                prefix: REFUSED_PREFIX.to_owned(),
            },
            Expr::Verdict(Verdict::Drop),
        ]);
        Rule(e)
    }

    /// 3: the next touch moves the source on.
    fn next(&self) -> Rule {
        let mut e = self.at_stage(SEQ_NEXT);
        e.extend([self.forget(), self.advance(), Expr::Verdict(Verdict::Drop)]);
        Rule(e)
    }

    /// 4: a first touch starts (or restarts) the source.
    fn start(&self) -> Rule {
        let mut e = self.guard();
        e.extend([
            Expr::Seq(SeqStep::Follow {
                map: SEQ_START.to_owned(),
                first: true,
            }),
            self.forget(),
            self.advance(),
            Expr::Verdict(Verdict::Drop),
        ]);
        Rule(e)
    }

    /// 5: any other touch forgets the source and falls through to the drop policy.
    fn reset(&self) -> Rule {
        let mut e = self.guard();
        e.push(self.forget());
        Rule(e)
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
