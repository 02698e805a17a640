//! The state directory: what must survive a restart. The replay log (every accepted
//! nonce until it can no longer pass the clock check) and the grant book.
//!
//! The replay log is append-only, fixed 24-byte records, fsynced before the daemon
//! acts on a knock, and compacted when it grows. Rewrites go through a temporary
//! file and a rename, so a crash leaves either the old or the new file.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::knock::packet::NONCE_LEN;
use crate::knock::replay::ReplayGuard;

const RECORD: usize = NONCE_LEN + 8;
const REPLAY_FILE: &str = "replay.log";
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
}

/// The replay log of one state directory.
pub struct ReplayLog {
    path: PathBuf,
    file: File,
    records: usize,
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
        let mut guard = ReplayGuard::new(capacity);
        match File::open(&path) {
            Ok(file) => {
                let mut bytes = Vec::new();
                file.take(MAX_REPLAY_FILE)
                    .read_to_end(&mut bytes)
                    .map_err(|source| file_error(&path, source))?;
                for record in bytes.chunks_exact(RECORD) {
                    let (nonce, until) = decode_record(record);
                    if until >= now {
                        // A full guard here means more live nonces than capacity;
                        // the newest win, which is what a full guard refuses anyway.
                        let _ = guard.admit(nonce, until, now);
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(file_error(&path, source)),
        }
        let file = rewrite(&path, &guard)?;
        let records = guard.len();
        Ok((
            Self {
                path,
                file,
                records,
            },
            guard,
        ))
    }

    /// Appends one accepted nonce to the file. Once this returns the record is in the
    /// kernel's page cache: a crash or restart of the daemon cannot lose it. Call
    /// [`ReplayLog::sync`] to have it on the disk (which a crash of the host needs).
    pub fn append(&mut self, nonce: &[u8; NONCE_LEN], until: u64) -> Result<(), StateError> {
        let mut record = [0u8; RECORD];
        record[..NONCE_LEN].copy_from_slice(nonce);
        record[NONCE_LEN..].copy_from_slice(&until.to_be_bytes());
        self.file
            .write_all(&record)
            .map_err(|source| file_error(&self.path, source))?;
        self.records += 1;
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
        }
        Ok(())
    }
}

fn decode_record(record: &[u8]) -> ([u8; NONCE_LEN], u64) {
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&record[..NONCE_LEN]);
    let mut until = [0u8; 8];
    until.copy_from_slice(&record[NONCE_LEN..RECORD]);
    (nonce, u64::from_be_bytes(until))
}

/// Writes `guard`'s entries to `path` via a temporary file and a rename; returns the
/// new file opened for appending.
fn rewrite(path: &Path, guard: &ReplayGuard) -> Result<File, StateError> {
    let tmp = path.with_extension("tmp");
    let mut bytes = Vec::with_capacity(guard.len() * RECORD);
    for (nonce, until) in guard.entries() {
        bytes.extend_from_slice(nonce);
        bytes.extend_from_slice(&until.to_be_bytes());
    }
    write_atomically(&tmp, path, &bytes)?;
    OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(|source| file_error(path, source))
}

/// Writes snapshots of a file (the grant book) on a thread of its own, so that a slow
/// disk flush (15 ms at p99 on a shared VM) never holds up the daemon's loop and the
/// knock waiting in it. Only the newest snapshot waiting is written.
pub struct SnapshotWriter {
    tx: Option<std::sync::mpsc::Sender<Vec<u8>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SnapshotWriter {
    /// A writer for `path` (atomic replace, as [`write_atomically`]).
    #[must_use]
    pub fn new(path: PathBuf) -> Self {
        let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
        let thread = std::thread::Builder::new()
            .name("book-writer".to_owned())
            .spawn(move || {
                while let Ok(mut bytes) = rx.recv() {
                    while let Ok(newer) = rx.try_recv() {
                        bytes = newer;
                    }
                    if let Err(e) = write_atomically(&path.with_extension("tmp"), &path, &bytes) {
                        tracing::warn!(error = %format!("{e:#}"), "cannot save the grant book; grants stay in force");
                    }
                }
            })
            .ok();
        Self {
            tx: Some(tx),
            thread,
        }
    }

    /// Queues `bytes` to be written.
    pub fn write(&self, bytes: Vec<u8>) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(bytes);
        }
    }

    /// Waits until everything queued is written.
    pub fn finish(&mut self) {
        self.tx = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
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
        writer.write(b"after finish".to_vec()); // ignored, never panics
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "snapshot 49");
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
    fn a_torn_last_record_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(REPLAY_FILE), [7u8; RECORD + 5]).unwrap();
        let (_log, guard) = ReplayLog::open(dir.path(), 10, 0).unwrap();
        assert_eq!(guard.len(), 1);
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
        assert_eq!(len, u64::try_from(10 * RECORD).unwrap());
        let (_log, guard) = ReplayLog::open(dir.path(), 5000, 50).unwrap();
        assert_eq!(guard.len(), 10);
    }
}
