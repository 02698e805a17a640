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
    /// The keys of the config before this one (a completion may arrive just after a
    /// reload, numbered as that config numbered its keys).
    previous: Vec<SequenceKey>,
    /// What was written: (set, element key without its data) → (element, end).
    written: HashMap<(&'static str, ElementKey), (ElementKey, UnixMs)>,
    /// The latest step written: a clock stepped back never brings an older step back
    /// (its last steps may no longer be marked used in the kernel).
    highest: Option<u64>,
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
    /// sequence.
    #[must_use]
    pub fn new(config: &Config, ring: &KeyRing, server: &ServerId) -> Option<Self> {
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
            previous: Vec::new(),
            written: HashMap::new(),
            highest: None,
        })
    }

    /// Remembers `older`'s keys, to resolve its late completions.
    pub fn follow(&mut self, older: &Sequencer) {
        self.previous.clone_from(&older.keys);
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

    /// When the next step must be written: the lead before the step after the latest
    /// one written (in the past, so at once, if that step is already due — never
    /// reckoned from the clock alone: a wake-up inside the lead, before the write, would
    /// otherwise skip a whole step).
    #[must_use]
    pub fn next_write(&self, now: UnixMs) -> UnixMs {
        let next = self
            .highest
            .map_or_else(|| self.steps_at(now)[1], |h| h + 1);
        let start_ms = self.spec.step_start(next).saturating_mul(1000);
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
                completion(key.class, index, step)
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
        // One entry per element: two sequences that share a stage (two keys' first
        // touches alike, say) give one element, with the later end — the kernel
        // refuses a batch that adds one element twice.
        let mut fresh: Vec<(&'static str, ElementKey, UnixMs)> = Vec::new();
        let mut at: HashMap<(&'static str, ElementKey), usize> = HashMap::new();
        let floor = self.highest.map_or(0, |h| h.saturating_sub(1));
        for step in self.steps_at(now) {
            if step < floor {
                tracing::warn!(target: crate::logging::AUDIT, event = "sequence", step, latest = floor + 1,
                    "the clock went back: an older step's sequences are not written again (sequences open nothing until the clock catches up)");
                continue;
            }
            self.highest = Some(self.highest.map_or(step, |h| h.max(step)));
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
                    if let Some(&i) = at.get(&slot) {
                        fresh[i].2 = fresh[i].2.max(end);
                    } else {
                        at.insert(slot, fresh.len());
                        fresh.push((set, key, end));
                    }
                }
            }
        }
        fresh
            .into_iter()
            .map(|(set, key, end)| (set, key, now.until(end)))
            .collect()
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

    /// The key a completion (the packet mark the kernel logged) belongs to, checked
    /// against the touch that completed it (the last touch of that key's sequence for
    /// that step), in this config's numbering or, just after a reload, the last one's.
    #[must_use]
    pub fn resolve(&self, mark: u32, touch: Option<Touch>, now: UnixMs) -> Option<Completed> {
        let (class, index, step_bits) = completion_parts(mark);
        let now_step = self.spec.step_at(now.secs());
        let steps = now_step.saturating_sub(3)..=now_step + 1;
        let matches = |key: &SequenceKey| {
            if key.class != class {
                return false;
            }
            let Some(touch) = touch else {
                return true;
            };
            steps
                .clone()
                .filter(|s| s & 0xf == u64::from(step_bits))
                .any(|s| {
                    self.spec
                        .derive(&key.secret, &self.server, s)
                        .is_some_and(|t| t.last() == Some(&touch))
                })
        };
        [&self.keys, &self.previous]
            .into_iter()
            .filter_map(|keys| keys.get(index))
            .find(|k| matches(k))
            .map(|k| Completed {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, KeySpec};
    use crate::policy::KeyEntry;

    fn key_spec(id: &str, ttl_secs: u64) -> KeySpec {
        KeySpec::with_sequence(id, ttl_secs)
    }

    fn ring(keys: &[(&str, &str)]) -> KeyRing {
        let mut ring = KeyRing::default();
        for (id, hex) in keys {
            ring.insert(
                KeyId::new(id).unwrap(),
                KeyEntry {
                    secret: Secret::from_hex(hex).unwrap(),
                    services: vec!["ssh".into()],
                    sources: vec!["0.0.0.0/0".parse().unwrap(), "::/0".parse().unwrap()],
                    max_ttl: None,
                    other_source: false,
                    unbound: false,
                    max_grants: 64,
                },
            );
        }
        ring
    }

    fn config(keys: Vec<KeySpec>) -> Config {
        Config {
            keys,
            ..Config::default()
        }
    }

    fn server() -> ServerId {
        ServerId::new("web1").unwrap()
    }

    /// 12:00:10 on a step boundary's second (30 s steps): well inside a step.
    const NOW: UnixMs = UnixMs(1_790_000_010_000);

    #[test]
    fn writes_the_current_and_previous_step_then_each_next_one_once() {
        let a = "11".repeat(32);
        let b = "22".repeat(32);
        let c = config(vec![key_spec("a", 60), key_spec("b", 120)]);
        let mut s = Sequencer::new(&c, &ring(&[("a", &a), ("b", &b)]), &server()).unwrap();
        let due = s.due(NOW);
        // Two steps × two keys × four touches (first, two next, last).
        assert_eq!(due.len(), 16, "{due:?}");
        let spec = SequenceSpec::default();
        let step = spec.step_at(NOW.secs());
        for (_, _, ttl) in &due {
            let end = NOW.plus(*ttl);
            assert!(
                end == UnixMs(spec.accepted_until(step) * 1000)
                    || end == UnixMs(spec.accepted_until(step - 1) * 1000),
                "each element ends with its step's acceptance: {ttl:?}"
            );
        }
        assert!(s.due(NOW).is_empty(), "nothing twice");
        let next = s.next_write(NOW);
        assert_eq!(
            next.0,
            spec.step_start(step + 1) * 1000 - 2_000,
            "two seconds' lead"
        );
        let later = s.due(next);
        assert_eq!(later.len(), 8, "the next step of both keys");
        // The classes: a and b differ in TTL.
        let last: Vec<u32> = later
            .iter()
            .filter(|(set, ..)| *set == seq::SEQ_LAST)
            .map(|(_, k, _)| match k {
                ElementKey::SeqStep { next, .. } => *next,
                _ => unreachable!(),
            })
            .collect();
        let resolved: Vec<Completed> = last
            .iter()
            .map(|m| s.resolve(*m, None, next).unwrap())
            .collect();
        assert_eq!(resolved[0].key.as_str(), "a");
        assert_eq!(resolved[0].ttl, Duration::from_secs(60));
        assert_eq!(resolved[1].key.as_str(), "b");
        assert_ne!(completion_parts(last[0]).0, completion_parts(last[1]).0);
    }

    #[test]
    fn a_completion_resolves_by_its_last_touch_in_this_or_the_last_configs_numbering() {
        let a = "11".repeat(32);
        let b = "22".repeat(32);
        let r = ring(&[("a", &a), ("b", &b)]);
        let old = Sequencer::new(
            &config(vec![key_spec("a", 60), key_spec("b", 60)]),
            &r,
            &server(),
        )
        .unwrap();
        // The new config lists b first: index 0 is b now, and a is gone.
        let mut new = Sequencer::new(&config(vec![key_spec("b", 60)]), &r, &server()).unwrap();
        new.follow(&old);
        let spec = SequenceSpec::default();
        let step = spec.step_at(NOW.secs());
        let last = |hex: &str| {
            *spec
                .derive(&Secret::from_hex(hex).unwrap(), &server(), step)
                .unwrap()
                .last()
                .unwrap()
        };
        // Old numbering: a was 0. The touch says which key it really was.
        let a_done = new
            .resolve(completion(1, 0, step), Some(last(&a)), NOW)
            .unwrap();
        assert_eq!(a_done.key.as_str(), "a");
        let b_done = new
            .resolve(completion(1, 0, step), Some(last(&b)), NOW)
            .unwrap();
        assert_eq!(b_done.key.as_str(), "b");
        // A touch that is no key's last, or a step long gone: nobody's.
        let stray = Touch {
            protocol: crate::service::Protocol::Tcp,
            port: 1,
        };
        assert!(
            new.resolve(completion(1, 0, step), Some(stray), NOW)
                .is_none()
        );
        assert!(
            new.resolve(completion(1, 7, step), Some(last(&b)), NOW)
                .is_none()
        );
    }

    #[test]
    fn shared_stages_are_written_once_however_many_keys_share_them() {
        // 2,000 keys over 1,024 ports: first touches collide by the hundred.
        let specs: Vec<KeySpec> = (0..2_000).map(|i| key_spec(&format!("k{i}"), 60)).collect();
        let hexes: Vec<(String, String)> = (0..2_000)
            .map(|i| (format!("k{i}"), format!("{:064x}", 0x5eed_0000_u128 + i)))
            .collect();
        let refs: Vec<(&str, &str)> = hexes
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        let mut c = config(specs);
        c.sequence.ports = crate::config::PortValue::Text("40000-41023".into());
        let mut s = Sequencer::new(&c, &ring(&refs), &server()).unwrap();
        for now in [NOW, s.next_write(NOW)] {
            let due = s.due(now);
            let mut seen = std::collections::HashSet::new();
            for (set, key, _) in &due {
                assert!(seen.insert((*set, identity(*key))), "{set} {key} twice");
            }
            let starts = due
                .iter()
                .filter(|(set, ..)| *set == seq::SEQ_START)
                .count();
            assert!(
                starts < 2 * 2_000,
                "shared first touches were merged: {starts}"
            );
        }
    }

    #[test]
    fn a_wake_up_inside_the_lead_before_the_write_does_not_skip_the_step() {
        let a = "11".repeat(32);
        let c = config(vec![key_spec("a", 60)]);
        let mut s = Sequencer::new(&c, &ring(&[("a", &a)]), &server()).unwrap();
        assert_eq!(s.due(NOW).len(), 8);
        let write_at = s.next_write(NOW);
        // Something else wakes the daemon 100 ms into the lead, before the write.
        let early = UnixMs(write_at.0 + 100);
        assert_eq!(
            s.next_write(early),
            write_at,
            "still due, not the step after"
        );
        assert_eq!(s.due(early).len(), 4);
        assert!(s.next_write(early) > early);
    }

    #[test]
    fn a_clock_stepped_back_writes_no_older_step() {
        let a = "11".repeat(32);
        let c = config(vec![key_spec("a", 60)]);
        let mut s = Sequencer::new(&c, &ring(&[("a", &a)]), &server()).unwrap();
        assert_eq!(s.due(NOW).len(), 8);
        let back = UnixMs(NOW.0 - 10 * 60 * 1000);
        assert!(s.due(back).is_empty(), "ten minutes back: nothing");
        // Back at the present, the step before the latest is still fine to write.
        s.forget_written();
        assert_eq!(s.due(NOW).len(), 8);
    }

    #[test]
    fn two_keys_with_one_sequence_share_its_stages_and_the_first_keeps_the_last_step() {
        let same = "33".repeat(32);
        let c = config(vec![key_spec("a", 60), key_spec("b", 60)]);
        let mut s = Sequencer::new(&c, &ring(&[("a", &same), ("b", &same)]), &server()).unwrap();
        let due = s.due(NOW);
        // Shared stages are written once; b's last step collides with a's and is left out.
        assert_eq!(due.len(), 8, "{due:?}");
        let lasts: Vec<&(&str, ElementKey, Duration)> = due
            .iter()
            .filter(|(set, ..)| *set == seq::SEQ_LAST)
            .collect();
        assert_eq!(lasts.len(), 2);
        for (_, k, _) in lasts {
            let ElementKey::SeqStep { next, .. } = k else {
                unreachable!()
            };
            assert_eq!(s.resolve(*next, None, NOW).unwrap().key.as_str(), "a");
        }
    }

    #[test]
    fn a_replace_gets_every_element_with_its_time_left() {
        let a = "11".repeat(32);
        let c = config(vec![key_spec("a", 60)]);
        let mut s = Sequencer::new(&c, &ring(&[("a", &a)]), &server()).unwrap();
        let all = s.elements(NOW);
        let count: usize = all.values().map(Vec::len).sum();
        assert_eq!(count, 8);
        assert_eq!(all[seq::SEQ_START].len(), 2);
        let held: usize = s
            .held(NOW.plus(Duration::from_secs(1)))
            .values()
            .map(Vec::len)
            .sum();
        assert_eq!(held, 8);
        // A failed write forgets: everything is due again.
        s.forget_written();
        assert_eq!(s.due(NOW).len(), 8);
    }
}
