//! The state directory: what must survive a restart. The replay log (every accepted
//! nonce until it can no longer pass the clock check) and the grant book.
//!
//! The replay log is append-only, fixed 32-byte records with a check (a torn record
//! is recognised and skipped), fsynced before the daemon acts on a knock, and
//! compacted when it grows; each rewrite starts with the guard's floor. Rewrites go through a temporary
//! file and a rename, so a crash leaves either the old or the new file.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::knock::packet::NONCE_LEN;
use crate::knock::replay::ReplayGuard;

/// One record: a nonce (16 bytes), the Unix second until which it is kept (8, big
/// endian), and a check (8): the start of SHA-256 over a domain string and the first
/// 24 bytes. The check tells a whole record from a torn one, and a nonce from the floor.
const RECORD: usize = NONCE_LEN + 8 + CHECK;
const CHECK: usize = 8;
const NONCE_DOMAIN: &[u8] = b"knockgate replay nonce v2";
const FLOOR_DOMAIN: &[u8] = b"knockgate replay floor v2";
const REPLAY_FILE: &str = "replay.v2.log";
/// The log as knockgate 0.1 wrote it (24-byte records, no check): read once, then
/// replaced by [`REPLAY_FILE`].
const OLD_REPLAY_FILE: &str = "replay.log";
const OLD_RECORD: usize = NONCE_LEN + 8;
/// Longest replay log read at start (the guard holds far fewer live records).
const MAX_REPLAY_FILE: u64 = 64 << 20;

/// Failures reading or writing the state directory.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The directory cannot be created or opened.
    #[error("cannot use state directory {path}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A state file cannot be read or written.
    #[error("cannot write state file {path}")]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A state file is there but does not hold what it should (torn, edited, or
    /// written by a knockgate of another format).
    #[error("state file {path} is damaged")]
    Damaged {
        /// The file.
        path: PathBuf,
    },
}

/// The replay log of one state directory.
pub struct ReplayLog {
    path: PathBuf,
    file: File,
    records: usize,
    /// The file's length after the last whole record: anything past it is a torn
    /// append (a full disk), cut off before the next one.
    good_len: u64,
}

/// What a log's bytes hold.
#[derive(Default)]
struct Parsed {
    nonces: Vec<([u8; NONCE_LEN], u64)>,
    floor: u64,
}

/// The records in `bytes`. Bytes that are not a whole record with a good check (a torn
/// write) are skipped one at a time until the records line up again, so nothing after
/// a tear is lost.
fn parse_log(bytes: &[u8]) -> Parsed {
    let mut out = Parsed::default();
    let mut at = 0;
    while let Some(record) = bytes.get(at..at + RECORD) {
        let (body, check) = record.split_at(NONCE_LEN + 8);
        let until = u64::from_be_bytes(body[NONCE_LEN..].try_into().unwrap_or([0; 8]));
        if check == record_check(NONCE_DOMAIN, body) {
            let mut nonce = [0u8; NONCE_LEN];
            nonce.copy_from_slice(&body[..NONCE_LEN]);
            out.nonces.push((nonce, until));
            at += RECORD;
        } else if check == record_check(FLOOR_DOMAIN, body) {
            out.floor = out.floor.max(until);
            at += RECORD;
        } else {
            at += 1;
        }
    }
    out
}

/// The records of a knockgate 0.1 log (fixed 24-byte records, a torn tail ignored).
fn parse_old_log(bytes: &[u8]) -> Parsed {
    let mut out = Parsed::default();
    for record in bytes.chunks_exact(OLD_RECORD) {
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&record[..NONCE_LEN]);
        let until = u64::from_be_bytes(record[NONCE_LEN..].try_into().unwrap_or([0; 8]));
        out.nonces.push((nonce, until));
    }
    out
}

fn record_check(domain: &[u8], body: &[u8]) -> [u8; CHECK] {
    use sha2::Digest;
    let digest = sha2::Sha256::new()
        .chain_update(domain)
        .chain_update(body)
        .finalize();
    let mut check = [0u8; CHECK];
    check.copy_from_slice(&digest[..CHECK]);
    check
}

fn encode(domain: &[u8], nonce: &[u8; NONCE_LEN], until: u64) -> [u8; RECORD] {
    let mut record = [0u8; RECORD];
    record[..NONCE_LEN].copy_from_slice(nonce);
    record[NONCE_LEN..NONCE_LEN + 8].copy_from_slice(&until.to_be_bytes());
    let check = record_check(domain, &record[..NONCE_LEN + 8]);
    record[NONCE_LEN + 8..].copy_from_slice(&check);
    record
}

/// Reads the log at `path` (at most [`MAX_REPLAY_FILE`] bytes); `None` if absent.
fn read_log(path: &Path) -> Result<Option<Vec<u8>>, StateError> {
    match File::open(path) {
        Ok(file) => {
            let mut bytes = Vec::new();
            file.take(MAX_REPLAY_FILE)
                .read_to_end(&mut bytes)
                .map_err(|source| file_error(path, source))?;
            Ok(Some(bytes))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(file_error(path, source)),
    }
}

impl ReplayLog {
    /// Opens (creating, mode 0700/0600) the replay log in `dir`, and returns it with a
    /// guard holding every nonce still live at `now`.
    pub fn open(dir: &Path, capacity: usize, now: u64) -> Result<(Self, ReplayGuard), StateError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| StateError::Dir {
                path: dir.to_owned(),
                source,
            })?;
        let path = dir.join(REPLAY_FILE);
        let old_path = dir.join(OLD_REPLAY_FILE);
        let mut guard = ReplayGuard::new(capacity);
        let mut parsed = read_log(&path)?.map(|b| parse_log(&b)).unwrap_or_default();
        let old = read_log(&old_path)?;
        if let Some(old) = &old {
            parsed.nonces.extend(parse_old_log(old).nonces);
        }
        // Nonces whose time is over are forgotten here: the floor rises past them.
        let forgotten = parsed
            .nonces
            .iter()
            .map(|&(_, until)| until)
            .filter(|&u| u < now);
        guard.raise_floor(forgotten.fold(parsed.floor, u64::max));
        for (nonce, until) in parsed.nonces {
            if until >= now {
                // A full guard here means more live nonces than capacity; the newest
                // win, which is what a full guard refuses anyway.
                let _ = guard.admit(nonce, until, now);
            }
        }
        let file = rewrite(&path, &guard)?;
        if old.is_some() {
            std::fs::remove_file(&old_path).map_err(|source| file_error(&old_path, source))?;
        }
        let records = guard.len();
        let good_len = record_bytes(records + 1);
        Ok((
            Self {
                path,
                file,
                records,
                good_len,
            },
            guard,
        ))
    }

    /// Appends one accepted nonce to the file. Once this returns the record is in the
    /// kernel's page cache: a crash or restart of the daemon cannot lose it. Call
    /// [`ReplayLog::sync`] to have it on the disk (which a crash of the host needs).
    /// A torn earlier append (the disk was full) is cut off first, so records stay
    /// aligned; reading resynchronises anyway.
    pub fn append(&mut self, nonce: &[u8; NONCE_LEN], until: u64) -> Result<(), StateError> {
        let fail = |source| file_error(&self.path, source);
        let len = self.file.metadata().map_err(fail)?.len();
        if len != self.good_len {
            self.file.set_len(self.good_len).map_err(fail)?;
        }
        self.file
            .write_all(&encode(NONCE_DOMAIN, nonce, until))
            .map_err(fail)?;
        self.records += 1;
        self.good_len += record_bytes(1);
        Ok(())
    }

    /// Waits until everything appended is on the disk (fdatasync).
    pub fn sync(&mut self) -> Result<(), StateError> {
        self.file
            .sync_data()
            .map_err(|source| file_error(&self.path, source))
    }

    /// Rewrites the log with only `guard`'s live nonces when it has grown well past them.
    pub fn compact(&mut self, guard: &ReplayGuard) -> Result<(), StateError> {
        if self.records > 2 * guard.len() + 1024 {
            self.file = rewrite(&self.path, guard)?;
            self.records = guard.len();
            self.good_len = record_bytes(self.records + 1);
        }
        Ok(())
    }
}

fn record_bytes(records: usize) -> u64 {
    u64::try_from(records * RECORD).unwrap_or(u64::MAX)
}

/// Writes `guard`'s floor and entries to `path` via a temporary file and a rename; returns the
/// new file opened for appending.
fn rewrite(path: &Path, guard: &ReplayGuard) -> Result<File, StateError> {
    let tmp = path.with_extension("tmp");
    let mut bytes = Vec::with_capacity((guard.len() + 1) * RECORD);
    bytes.extend_from_slice(&encode(FLOOR_DOMAIN, &[0; NONCE_LEN], guard.floor()));
    for (nonce, until) in guard.entries() {
        bytes.extend_from_slice(&encode(NONCE_DOMAIN, nonce, until));
    }
    write_atomically(&tmp, path, &bytes)?;
    OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(|source| file_error(path, source))
}

/// Writes snapshots of a file (the grant book) on a thread of its own, so that a slow
/// disk flush (15 ms at p99 on a shared VM) never holds up the daemon's loop and the
/// knock waiting in it. Only the newest snapshot waiting is written. The thread is
/// started by a write and ends after [`WRITER_IDLE`] without one, so an idle daemon
/// keeps no second thread (its stack and malloc arena) around.
pub struct SnapshotWriter {
    path: PathBuf,
    /// How long the thread waits for another snapshot before it ends.
    idle: std::time::Duration,
    shared: std::sync::Arc<(std::sync::Mutex<Pending>, std::sync::Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// How long the writer thread waits for another snapshot before it ends.
const WRITER_IDLE: std::time::Duration = std::time::Duration::from_secs(10);

/// What the writer thread is to do; changed only under the lock.
#[derive(Default)]
struct Pending {
    /// The newest snapshot not yet written.
    bytes: Option<Vec<u8>>,
    /// Whether a writer thread is running (it clears this, under the lock, as it ends).
    running: bool,
}

impl SnapshotWriter {
    /// A writer for `path` (atomic replace, as [`write_atomically`]).
    #[must_use]
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            idle: WRITER_IDLE,
            shared: std::sync::Arc::default(),
            thread: None,
        }
    }

    /// Queues `bytes` to be written (replacing any snapshot still waiting).
    pub fn write(&mut self, bytes: Vec<u8>) {
        let (lock, wake) = &*self.shared;
        let mut pending = lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        pending.bytes = Some(bytes);
        // A thread that died without clearing the flag (a panic, where panics unwind),
        // or none at all, is not running: start another rather than leave snapshots
        // unwritten.
        if pending.running
            && self
                .thread
                .as_ref()
                .is_none_or(std::thread::JoinHandle::is_finished)
        {
            pending.running = false;
        }
        if pending.running {
            wake.notify_one();
            return;
        }
        pending.running = true;
        drop(pending);
        if let Some(done) = self.thread.take() {
            let _ = done.join();
        }
        let (shared, path) = (std::sync::Arc::clone(&self.shared), self.path.clone());
        let idle = self.idle;
        let spawned = std::thread::Builder::new()
            .name("book-writer".to_owned())
            .spawn(move || write_until_idle(&shared, &path, idle));
        if let Ok(thread) = spawned {
            self.thread = Some(thread);
        } else {
            // No thread: write here, late rather than never.
            let mut pending = lock
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            pending.running = false;
            if let Some(bytes) = pending.bytes.take() {
                drop(pending);
                save_snapshot(&self.path, &bytes);
            }
        }
    }

    /// Waits until everything queued is written.
    pub fn finish(&mut self) {
        let (lock, wake) = &*self.shared;
        loop {
            let pending = lock
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if !pending.running {
                break;
            }
            // Wake the thread so that it ends now rather than after its idle wait.
            wake.notify_one();
            drop(pending);
            std::thread::sleep(std::time::Duration::from_millis(1));
            // No thread, or one that ended without clearing the flag: nothing left
            // to wait for.
            if self
                .thread
                .as_ref()
                .is_none_or(std::thread::JoinHandle::is_finished)
            {
                break;
            }
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The writer thread: writes the newest snapshot while there is one; ends once none
/// came for `idle` (or none is waiting when woken by `finish`).
fn write_until_idle(
    shared: &(std::sync::Mutex<Pending>, std::sync::Condvar),
    path: &Path,
    idle: std::time::Duration,
) {
    let (lock, wake) = shared;
    loop {
        let mut pending = lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if pending.bytes.is_none() {
            pending = wake
                .wait_timeout(pending, idle)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
        let Some(bytes) = pending.bytes.take() else {
            pending.running = false;
            return;
        };
        drop(pending);
        save_snapshot(path, &bytes);
    }
}

fn save_snapshot(path: &Path, bytes: &[u8]) {
    if let Err(e) = write_atomically(&path.with_extension("tmp"), path, bytes) {
        tracing::warn!(error = %format!("{e:#}"), "cannot save the grant book; grants stay in force");
    }
}

impl Drop for SnapshotWriter {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Writes `bytes` to `tmp`, fsyncs, renames it over `path`, and fsyncs the directory.
pub fn write_atomically(tmp: &Path, path: &Path, bytes: &[u8]) -> Result<(), StateError> {
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(tmp)
        .map_err(|source| file_error(tmp, source))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|source| file_error(tmp, source))?;
    std::fs::rename(tmp, path).map_err(|source| file_error(path, source))?;
    if let Some(dir) = path.parent() {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|source| file_error(dir, source))?;
    }
    Ok(())
}

fn file_error(path: &Path, source: std::io::Error) -> StateError {
    StateError::File {
        path: path.to_owned(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::knock::replay::ReplayError;

    #[test]
    fn the_snapshot_writer_leaves_the_newest_snapshot_and_finish_waits_for_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grants.json");
        let mut writer = SnapshotWriter::new(path.clone());
        for i in 0..50 {
            writer.write(format!("snapshot {i}").into_bytes());
        }
        writer.finish();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "snapshot 49");
        assert!(writer.thread.is_none(), "no thread left after finish");
        // A later write starts a thread again.
        writer.write(b"after finish".to_vec());
        writer.finish();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "after finish");
    }

    /// Writes racing the thread's idle end: each write either reaches the running
    /// thread or starts a new one; none is lost, and an idle writer keeps no thread.
    #[test]
    fn the_snapshot_writer_thread_ends_when_idle_and_no_write_is_lost() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grants.json");
        let mut writer = SnapshotWriter::new(path.clone());
        writer.idle = std::time::Duration::from_millis(2);
        for i in 0..200u32 {
            writer.write(format!("snapshot {i}").into_bytes());
            // Around the idle end: sometimes before it, sometimes after.
            std::thread::sleep(std::time::Duration::from_micros(u64::from(i % 7) * 700));
        }
        writer.finish();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "snapshot 199");
        writer.write(b"later".to_vec());
        // Bounded: the thread ends 2 ms after its last write.
        let ended = (0..2000).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(1));
            writer
                .thread
                .as_ref()
                .is_some_and(std::thread::JoinHandle::is_finished)
        });
        assert!(ended, "an idle writer keeps no thread");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "later");
    }

    #[test]
    fn nonces_survive_a_restart_until_they_expire() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, mut guard) = ReplayLog::open(dir.path(), 100, 1000).unwrap();
        guard.admit([1; 16], 1030, 1000).unwrap();
        log.append(&[1; 16], 1030).unwrap();
        guard.admit([2; 16], 1010, 1000).unwrap();
        log.append(&[2; 16], 1010).unwrap();
        drop((log, guard));

        let (_log, mut guard) = ReplayLog::open(dir.path(), 100, 1020).unwrap();
        assert_eq!(guard.admit([1; 16], 1050, 1020), Err(ReplayError::Replayed));
        assert_eq!(
            guard.admit([2; 16], 1050, 1020),
            Ok(()),
            "expired nonces are dropped"
        );
    }

    #[test]
    fn the_directory_and_file_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let _ = ReplayLog::open(&state, 10, 0).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&state), 0o700);
        assert_eq!(mode(&state.join(REPLAY_FILE)), 0o600);
    }

    #[test]
    fn a_torn_record_hides_nothing_written_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = encode(NONCE_DOMAIN, &[1; 16], 1030).to_vec();
        bytes.extend_from_slice(&encode(NONCE_DOMAIN, &[2; 16], 1030)[..13]); // torn
        bytes.extend_from_slice(&encode(NONCE_DOMAIN, &[3; 16], 1030));
        bytes.extend_from_slice(&[0xa5; 7]); // torn tail
        std::fs::write(dir.path().join(REPLAY_FILE), &bytes).unwrap();
        let (_log, mut guard) = ReplayLog::open(dir.path(), 10, 1000).unwrap();
        assert_eq!(guard.len(), 2);
        assert_eq!(guard.admit([3; 16], 1050, 1000), Err(ReplayError::Replayed));
        assert_eq!(guard.admit([1; 16], 1050, 1000), Err(ReplayError::Replayed));
    }

    #[test]
    fn an_append_after_a_torn_one_cuts_the_tear_off_first() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(REPLAY_FILE);
        let (mut log, mut guard) = ReplayLog::open(dir.path(), 10, 1000).unwrap();
        guard.admit([1; 16], 1030, 1000).unwrap();
        log.append(&[1; 16], 1030).unwrap();
        // A write that stopped part-way (the disk was full).
        let mut other = OpenOptions::new().append(true).open(&path).unwrap();
        other.write_all(&[0xee; 11]).unwrap();
        log.append(&[2; 16], 1030).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), record_bytes(3));
        drop((log, guard));

        let (_log, mut guard) = ReplayLog::open(dir.path(), 10, 1000).unwrap();
        assert_eq!(guard.admit([2; 16], 1050, 1000), Err(ReplayError::Replayed));
    }

    #[test]
    fn the_floor_survives_a_restart_and_a_clock_stepped_back() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, mut guard) = ReplayLog::open(dir.path(), 10, 1000).unwrap();
        guard.admit([1; 16], 1030, 1000).unwrap();
        log.append(&[1; 16], 1030).unwrap();
        drop((log, guard));
        // Restarted while the clock ran an hour ahead: the nonce is forgotten.
        let (log, guard) = ReplayLog::open(dir.path(), 10, 4600).unwrap();
        assert!(guard.is_empty());
        drop((log, guard));
        // Restarted again after the clock was stepped back.
        let (_log, mut guard) = ReplayLog::open(dir.path(), 10, 1005).unwrap();
        assert_eq!(
            guard.admit([1; 16], 1030, 1005),
            Err(ReplayError::BeforeFloor)
        );
        assert_eq!(guard.admit([2; 16], 1035, 1005), Ok(()));
    }

    #[test]
    fn a_log_written_by_knockgate_0_1_is_read_once_and_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let mut old = [4u8; 16].to_vec();
        old.extend_from_slice(&1030u64.to_be_bytes());
        std::fs::write(dir.path().join(OLD_REPLAY_FILE), &old).unwrap();
        let (_log, mut guard) = ReplayLog::open(dir.path(), 10, 1000).unwrap();
        assert_eq!(guard.admit([4; 16], 1050, 1000), Err(ReplayError::Replayed));
        assert!(!dir.path().join(OLD_REPLAY_FILE).exists());
    }

    #[test]
    fn compaction_keeps_live_nonces() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, mut guard) = ReplayLog::open(dir.path(), 5000, 0).unwrap();
        for i in 0..2000u32 {
            let mut nonce = [0u8; 16];
            nonce[..4].copy_from_slice(&i.to_be_bytes());
            let until = if i < 1990 { 10 } else { 100 };
            guard.admit(nonce, until, 0).unwrap();
            log.append(&nonce, until).unwrap();
        }
        guard.expire(50);
        log.compact(&guard).unwrap();
        let len = std::fs::metadata(dir.path().join(REPLAY_FILE))
            .unwrap()
            .len();
        assert_eq!(len, record_bytes(11), "the floor and 10 nonces");
        let (_log, guard) = ReplayLog::open(dir.path(), 5000, 50).unwrap();
        assert_eq!(guard.len(), 10);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

        /// Any file contents: the log opens (records that check out are kept, the rest
        /// skipped), never panics, and a record appended after the junk survives.
        #[test]
        fn any_replay_log_opens_and_keeps_what_follows_junk(junk in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400)) {
            let dir = tempfile::tempdir().unwrap();
            let mut bytes = junk;
            bytes.extend_from_slice(&encode(NONCE_DOMAIN, &[0xab; 16], 2000));
            std::fs::write(dir.path().join(REPLAY_FILE), &bytes).unwrap();
            let (_log, mut guard) = ReplayLog::open(dir.path(), 1000, 1000).unwrap();
            proptest::prop_assert_eq!(guard.admit([0xab; 16], 2000, 1000), Err(ReplayError::Replayed));
        }
    }
}
