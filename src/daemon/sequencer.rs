//! The daemon's side of port sequences (`crate::ruleset::sequence`): which
//! elements the kernel's sequence maps must hold now, what to write at each step,
//! and which key a completion the kernel reports belongs to.
//!
//! The kernel judges every touch; the daemon only writes each key's current and
//! previous step (one step ahead by a short lead, so a client a little ahead of the
//! server's clock, or one that computed its sequence just before the step turned,
//! still opens). Elements end with their step, so if the daemon stops, sequences
//! stop working by themselves: fail closed.

use std::collections::HashMap;
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::clock::UnixMs;
use crate::config::Config;
use crate::knock::auth::ServerId;
use crate::knock::{KeyId, Secret};
use crate::policy::KeyRing;
use crate::ruleset::sequence::{self as seq, completion, completion_parts};
use crate::ruleset::{Element, ElementKey};
use crate::sequence::{SequenceSpec, Touch};

/// A key with a sequence.
#[derive(Clone)]
pub struct SequenceKey {
    /// Its id.
    pub id: KeyId,
    secret: Secret,
    /// Its class (1-based; see `ruleset::sequence::classes`).
    class: u8,
    /// What its sequence opens.
    pub service: String,
    /// For how long.
    pub ttl: Duration,
}

/// A completion the kernel reported, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completed {
    /// The key.
    pub key: KeyId,
    /// What it opened.
    pub service: String,
    /// For how long.
    pub ttl: Duration,
}

/// Sequences in force and what the kernel holds of them.
pub struct Sequencer {
    spec: SequenceSpec,
    server: ServerId,
    keys: Vec<SequenceKey>,
    generation: u8,
    /// The keys of the generation before this one (a completion may arrive just
    /// after a reload).
    previous: Option<(u8, Vec<SequenceKey>)>,
    /// What was written: (set, element key without its data) → (element, end).
    written: HashMap<(&'static str, ElementKey), (ElementKey, UnixMs)>,
}

/// A map element's identity: its key without the data (two elements with the same
/// identity cannot both be in a map).
fn identity(key: ElementKey) -> ElementKey {
    match key {
        ElementKey::SeqStart { proto, port, .. } => ElementKey::SeqStart {
            proto,
            port,
            next: 0,
        },
        ElementKey::SeqStep {
            stage, proto, port, ..
        } => ElementKey::SeqStep {
            stage,
            proto,
            port,
            next: 0,
        },
        other => other,
    }
}

/// The stage a source is at after `touches`: a content hash, so that sequences that
/// begin with the same touches share their stages (a map holds one next stage per
/// stage and touch).
fn stage(touches: &[Touch]) -> u32 {
    let mut h = Sha256::new();
    h.update(b"knockgate sequence stage v1\0");
    for t in touches {
        h.update([t.proto_number()]);
        h.update(t.port.to_be_bytes());
    }
    let d = h.finalize();
    u32::from_be_bytes([d[0], d[1], d[2], d[3]])
}

impl Sequencer {
    /// The sequencer for `config`, whose keys are in `ring`; `None` when no key has a
    /// sequence. `generation` tells its completions from an earlier config's.
    #[must_use]
    pub fn new(config: &Config, ring: &KeyRing, server: &ServerId, generation: u8) -> Option<Self> {
        let spec = config.sequence_spec()?;
        let classes = seq::classes(config);
        let mut keys = Vec::new();
        for k in config.keys.iter().filter(|k| k.sequence) {
            let (Ok(id), service) = (KeyId::new(&k.id), crate::config::sequence_service(k)) else {
                continue;
            };
            let ttl = crate::config::sequence_ttl(config, k);
            let Some(entry) = ring.get(&id) else { continue };
            let position = classes
                .iter()
                .position(|c| c.service == service && c.ttl == ttl)
                .unwrap_or(0);
            keys.push(SequenceKey {
                id,
                secret: entry.secret.clone(),
                class: u8::try_from(position + 1).unwrap_or(u8::MAX),
                service: service.to_owned(),
                ttl,
            });
        }
        Some(Self {
            spec,
            server: server.clone(),
            keys,
            generation,
            previous: None,
            written: HashMap::new(),
        })
    }

    /// This sequencer's generation.
    #[must_use]
    pub fn generation(&self) -> u8 {
        self.generation
    }

    /// Remembers `older`'s keys, to resolve its late completions.
    pub fn follow(&mut self, older: &Sequencer) {
        self.previous = Some((older.generation, older.keys.clone()));
    }

    /// How long before its step a step's sequence is written.
    fn lead_ms(&self) -> u64 {
        (u64::from(self.spec.step_secs) * 1000 / 4).min(2_000)
    }

    /// The steps whose sequences must be in the kernel at `now`: the current one (or
    /// the next, within the lead) and the one before it.
    fn steps_at(&self, now: UnixMs) -> [u64; 2] {
        let ahead = (now.0 + self.lead_ms()) / 1000;
        let current = self.spec.step_at(ahead);
        [current.saturating_sub(1), current]
    }

    /// When the next step must be written.
    #[must_use]
    pub fn next_write(&self, now: UnixMs) -> UnixMs {
        let [_, current] = self.steps_at(now);
        let start_ms = self.spec.step_start(current + 1).saturating_mul(1000);
        UnixMs(start_ms.saturating_sub(self.lead_ms()))
    }

    /// Every element of `key`'s sequence for `step` (set, element), or nothing if the
    /// derivation gave none.
    fn elements_of(&self, index: usize, step: u64) -> Vec<(&'static str, ElementKey)> {
        let key = &self.keys[index];
        let Some(touches) = self.spec.derive(&key.secret, &self.server, step) else {
            return Vec::new();
        };
        let mut out = Vec::with_capacity(touches.len());
        let Some(first) = touches.first() else {
            return out;
        };
        out.push((
            seq::SEQ_START,
            ElementKey::SeqStart {
                proto: first.proto_number(),
                port: first.port,
                next: stage(&touches[..1]),
            },
        ));
        let last = touches.len() - 1;
        for i in 1..touches.len() {
            let t = touches[i];
            let next = if i == last {
                completion(
                    key.class,
                    self.generation,
                    u16::try_from(index).unwrap_or(u16::MAX),
                )
            } else {
                stage(&touches[..=i])
            };
            out.push((
                if i == last {
                    seq::SEQ_LAST
                } else {
                    seq::SEQ_NEXT
                },
                ElementKey::SeqStep {
                    stage: stage(&touches[..i]),
                    proto: t.proto_number(),
                    port: t.port,
                    next,
                },
            ));
        }
        out
    }

    /// What must be written at `now` that is not in the kernel yet (or ends too soon),
    /// each with its timeout; taken as written. A last step that collides with another
    /// key's (the same touches: one chance in ~2^60) keeps the first and is logged.
    pub fn due(&mut self, now: UnixMs) -> Vec<(&'static str, ElementKey, Duration)> {
        self.written.retain(|_, (_, end)| *end > now);
        let mut out = Vec::new();
        for step in self.steps_at(now) {
            let end = UnixMs(self.spec.accepted_until(step).saturating_mul(1000));
            if end <= now {
                continue;
            }
            for index in 0..self.keys.len() {
                for (set, key) in self.elements_of(index, step) {
                    let slot = (set, identity(key));
                    match self.written.get(&slot) {
                        Some((held, _)) if *held != key => {
                            tracing::warn!(target: crate::logging::AUDIT, event = "sequence",
                                key = %self.keys[index].id, step,
                                "this key's sequence for this step is another key's too; it opens nothing this step");
                            continue;
                        }
                        Some((_, held_end)) if *held_end >= end => continue,
                        _ => {}
                    }
                    self.written.insert(slot, (key, end));
                    out.push((set, key, now.until(end)));
                }
            }
        }
        out
    }

    /// Forgets what was written (a write failed): the next write starts over.
    pub fn forget_written(&mut self) {
        self.written.clear();
    }

    /// Everything the sequence maps should hold at `now`, by set, for a whole-table
    /// replace (which empties them); taken as written.
    pub fn elements(&mut self, now: UnixMs) -> HashMap<String, Vec<Element>> {
        self.written.clear();
        let mut out: HashMap<String, Vec<Element>> = HashMap::new();
        for (set, key, ttl) in self.due(now) {
            out.entry(set.to_owned()).or_default().push(Element {
                key,
                expires_in: Some(ttl),
            });
        }
        out
    }

    /// What the kernel still holds, by set, with the time left (for a replace that
    /// should keep them as they are).
    #[must_use]
    pub fn held(&self, now: UnixMs) -> HashMap<String, Vec<Element>> {
        let mut out: HashMap<String, Vec<Element>> = HashMap::new();
        for ((set, _), (key, end)) in &self.written {
            if *end > now {
                out.entry((*set).to_owned()).or_default().push(Element {
                    key: *key,
                    expires_in: Some(now.until(*end)),
                });
            }
        }
        out
    }

    /// The key a completion (the packet mark the kernel logged) belongs to.
    #[must_use]
    pub fn resolve(&self, mark: u32) -> Option<Completed> {
        let (_, generation, index) = completion_parts(mark);
        let keys = if generation == self.generation {
            &self.keys
        } else {
            match &self.previous {
                Some((g, keys)) if *g == generation => keys,
                _ => return None,
            }
        };
        keys.get(usize::from(index)).map(|k| Completed {
            key: k.id.clone(),
            service: k.service.clone(),
            ttl: k.ttl,
        })
    }

    /// How many keys have a sequence.
    #[must_use]
    pub fn key_count(&self) -> usize {
        self.keys.len()
    }
}
