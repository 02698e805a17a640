//! Who is at the other end of an admin connection, as the kernel tells it — never as
//! the client says. An egress window is for the requester's own cgroup, and the
//! audit log names the requester's real command line.
//!
//! Identification happens when the connection is accepted, before its request is
//! read:
//!
//! 1. `SO_PEERCRED`: the pid and uid the kernel recorded at `connect()`.
//! 2. `SO_PEERPIDFD` (Linux ≥ 6.5): a pidfd of exactly that process.
//! 3. `/proc/<pid>` is opened as a directory, and `status`, `cgroup` and `cmdline`
//!    are read through it: a `/proc/<pid>` directory stays bound to the process it
//!    was opened for, so the three reads describe one process.
//! 4. With a pidfd, that process must still be alive after the open: a pid is not
//!    reused while its process lives, so the directory was the connecting process's.
//!    Without one (Debian 12's 6.1), the process behind the pid must at least have
//!    the connecting uid: a pid reused between the requester's `connect()` and our
//!    `accept()` by a process of *the same user* would be believed — a process that
//!    user could have run inside a window anyway.

use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use nix::fcntl::{OFlag, open, openat};
use nix::sys::stat::Mode;

/// Longest command line kept (the rest is cut, marked with `…`).
const MAX_COMMAND: usize = 1024;
/// Longest `/proc` file read.
const MAX_PROC_FILE: u64 = 8192;

/// The process behind an admin connection, read from the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Process {
    /// Its process id.
    pub pid: i32,
    /// Its effective user id.
    pub uid: u32,
    /// Its command line, words joined by spaces, non-printable bytes escaped.
    pub command: String,
    /// Its cgroup v2 (path below the root, id, depth), when the daemon sees a cgroup2
    /// file system.
    pub cgroup: Option<Cgroup>,
}

/// A cgroup v2, as the daemon sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroup {
    /// Path below the cgroup2 root, like `/system.slice/x.scope`.
    pub path: String,
    /// Its id (the directory's inode number), what `socket cgroupv2` compares.
    pub id: u64,
    /// Depth below the root.
    pub level: u32,
    /// The uid that owns its directory (a cgroup delegated to a user is theirs).
    pub owner: u32,
}

/// What the kernel recorded about the process that connected: taken at `accept()`.
#[derive(Debug)]
pub struct Connected {
    /// Its pid (at `connect()`).
    pid: i32,
    /// Its effective uid (at `connect()`).
    uid: u32,
    /// A pidfd of exactly that process, where the kernel gives one (Linux ≥ 6.5).
    pidfd: Option<OwnedFd>,
}

/// The credentials (and pidfd) of the peer of `stream`, a connected unix socket.
pub fn connected(stream: &impl AsFd) -> Result<Connected, String> {
    use nix::sys::socket::{getsockopt, sockopt};
    let cred = getsockopt(stream, sockopt::PeerCredentials)
        .map_err(|e| format!("no peer credentials: {e}"))?;
    let (pid, uid) = (cred.pid(), cred.uid());
    if pid <= 0 {
        return Err("the peer has no pid in this pid namespace".to_owned());
    }
    // ENOPROTOOPT before Linux 6.5: then the uid check is what we have. Any other
    // error (the peer is gone already) refuses: the pid may be someone else's now.
    let pidfd = match getsockopt(stream, sockopt::PeerPidfd) {
        Ok(fd) => Some(fd),
        Err(nix::errno::Errno::ENOPROTOOPT) => None,
        Err(e) => return Err(format!("no pidfd for peer pid {pid}: {e} (it exited?)")),
    };
    if let Some(fd) = &pidfd {
        if pid_of_pidfd(fd) != Some(pid) {
            return Err(format!("the peer's pidfd is not pid {pid}"));
        }
    }
    Ok(Connected { pid, uid, pidfd })
}

/// Identifies the connected process. Its `/proc/<pid>` directory is the one the
/// requester passed over the socket (`egress-window` sends its `/proc/self`: the
/// daemon's own /proc hides other users' processes, `ProtectProc=invisible`), checked
/// to be a procfs directory whose `Pid:` is the connecting pid; without one, the
/// daemon opens `/proc/<pid>` itself. `cgroup_root` is the daemon's cgroup2 mount.
pub fn identify(
    peer: &Connected,
    passed: Option<OwnedFd>,
    cgroup_root: Option<&Path>,
) -> Result<Process, String> {
    let Connected { pid, uid, .. } = *peer;
    let dir = match passed {
        Some(fd) => {
            proc_directory(&fd)?;
            fd
        }
        None => open(
            format!("/proc/{pid}").as_str(),
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| {
            format!(
                "cannot open /proc/{pid}: {e} (hidden from knockgated: a requester must pass its /proc/self, as egress-window does)"
            )
        })?,
    };
    let status =
        read_at(&dir, "status").map_err(|e| format!("cannot read /proc/{pid}/status: {e}"))?;
    if status_field(&status, "Pid:", 0) != Some(pid_u32(pid)) {
        return Err(format!(
            "the /proc directory passed is not the connecting process's (pid {pid})"
        ));
    }
    let effective = status_field(&status, "Uid:", 1)
        .ok_or_else(|| format!("/proc/{pid}/status has no Uid line"))?;
    if effective != uid {
        return Err(format!(
            "pid {pid} now belongs to uid {effective}, not the connecting uid {uid} (it exited?)"
        ));
    }
    let cgroup_text =
        read_at(&dir, "cgroup").map_err(|e| format!("cannot read /proc/{pid}/cgroup: {e}"))?;
    let cmdline =
        read_at(&dir, "cmdline").map_err(|e| format!("cannot read /proc/{pid}/cmdline: {e}"))?;
    if let Some(fd) = &peer.pidfd {
        if exited(fd) {
            return Err(format!("pid {pid} exited while it was being identified"));
        }
    }
    let command = command_line(&cmdline);
    if command.is_empty() {
        return Err(format!("pid {pid} has no command line (exited?)"));
    }
    let cgroup = match cgroup_root {
        Some(root) => Some(cgroup_at(root, &cgroup_path(&cgroup_text)?)?),
        None => None,
    };
    Ok(Process {
        pid,
        uid,
        command,
        cgroup,
    })
}

/// Whether `fd` is a directory on procfs (not one the requester made up, with a
/// `status` file of its own writing).
fn proc_directory(fd: &OwnedFd) -> Result<(), String> {
    use nix::sys::stat::{SFlag, fstat};
    use nix::sys::statfs::{PROC_SUPER_MAGIC, fstatfs};
    let on_proc = fstatfs(fd).is_ok_and(|s| s.filesystem_type() == PROC_SUPER_MAGIC);
    let is_dir = fstat(fd)
        .is_ok_and(|st| SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR);
    if on_proc && is_dir {
        Ok(())
    } else {
        Err("what the requester passed is not a /proc directory".to_owned())
    }
}

fn pid_u32(pid: i32) -> u32 {
    u32::try_from(pid).unwrap_or(0)
}

/// The cgroup v2 path in a whole `/proc/<pid>/cgroup` text: the `0::` line, which
/// must be complete (a text cut at the read limit could name an ancestor) and must
/// not climb (`..`: a requester in another cgroup namespace).
fn cgroup_path(text: &[u8]) -> Result<String, String> {
    let limit = usize::try_from(MAX_PROC_FILE).unwrap_or(0);
    if !text.ends_with(b"\n") || text.len() >= limit {
        return Err("its /proc cgroup file is cut short or too long".to_owned());
    }
    let path = crate::cgroup::own_cgroup_path(&String::from_utf8_lossy(text))
        .ok_or_else(|| "it has no cgroup v2 (no 0:: line)".to_owned())?;
    if !path.starts_with('/') || path.split('/').any(|part| part == ".." || part == ".") {
        return Err(format!(
            "its cgroup path {path:?} is outside the daemon's cgroup namespace"
        ));
    }
    Ok(path)
}

/// The id, depth and owner of cgroup `path` below `root`.
fn cgroup_at(root: &Path, path: &str) -> Result<Cgroup, String> {
    let relative = path.trim_start_matches('/');
    let dir = root.join(relative);
    let meta = std::fs::metadata(&dir)
        .map_err(|e| format!("cannot stat cgroup {}: {e}", dir.display()))?;
    let level = u32::try_from(Path::new(relative).components().count()).unwrap_or(u32::MAX);
    Ok(Cgroup {
        path: format!("/{relative}"),
        id: meta.ino(),
        level,
        owner: meta.uid(),
    })
}

/// Reads `name` below the open `/proc/<pid>` directory, at most [`MAX_PROC_FILE`].
fn read_at(dir: &OwnedFd, name: &str) -> std::io::Result<Vec<u8>> {
    let fd = openat(dir, name, OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty())?;
    let mut out = Vec::new();
    std::fs::File::from(fd)
        .take(MAX_PROC_FILE)
        .read_to_end(&mut out)?;
    Ok(out)
}

/// Field `index` (0-based) of line `name` in a `/proc/<pid>/status` text, as a
/// number: `("Uid:", 1)` is the effective uid, `("Pid:", 0)` the pid.
fn status_field(status: &[u8], name: &str, index: usize) -> Option<u32> {
    String::from_utf8_lossy(status)
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|rest| rest.split_whitespace().nth(index))
        .and_then(|value| value.parse().ok())
}

/// The pid a pidfd refers to (`Pid:` in its fdinfo); `None` if it cannot be told.
fn pid_of_pidfd(fd: &OwnedFd) -> Option<i32> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd())).ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("Pid:"))
        .and_then(|p| p.trim().parse().ok())
}

/// Whether the process of a pidfd has exited (the pidfd polls readable).
fn exited(fd: &OwnedFd) -> bool {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
    match poll(&mut fds, PollTimeout::ZERO) {
        Ok(n) => n > 0,
        Err(_) => true,
    }
}

/// A `/proc/<pid>/cmdline` (NUL-separated words) as one line: words joined by
/// spaces, control characters escaped (no terminal escapes or fake log lines reach
/// `knockgate grants` or the journal; the log quotes the whole), invalid UTF-8
/// replaced, at most [`MAX_COMMAND`] characters.
#[must_use]
pub fn command_line(cmdline: &[u8]) -> String {
    let words: Vec<String> = cmdline
        .split(|&b| b == 0)
        .filter(|w| !w.is_empty())
        .map(|w| {
            String::from_utf8_lossy(w)
                .chars()
                .map(|c| {
                    if c.is_control() {
                        c.escape_default().to_string()
                    } else {
                        c.to_string()
                    }
                })
                .collect()
        })
        .collect();
    let mut line = words.join(" ");
    if line.chars().count() > MAX_COMMAND {
        line = line.chars().take(MAX_COMMAND).collect::<String>() + "…";
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_lines_are_joined_escaped_and_bounded() {
        assert_eq!(
            command_line(b"egress-window\x0010m\x00--\x00apt\x00upgrade\x00"),
            "egress-window 10m -- apt upgrade"
        );
        assert_eq!(command_line(b"a\nb\x00c\x1b[31m"), "a\\nb c\\u{1b}[31m");
        assert_eq!(command_line(b"say \"hi\"\x00\xff"), "say \"hi\" \u{fffd}");
        assert_eq!(command_line(b""), "");
        let long = vec![b'x'; 5000];
        assert_eq!(command_line(&long).chars().count(), MAX_COMMAND + 1);
    }

    #[test]
    fn cgroup_paths_must_be_whole_and_must_not_climb() {
        assert_eq!(
            cgroup_path(b"1:name=systemd:/x\n0::/user.slice/run-1.scope\n").unwrap(),
            "/user.slice/run-1.scope"
        );
        assert_eq!(cgroup_path(b"0::/\n").unwrap(), "/");
        for bad in [
            &b"0::/user.slice/run-1.sc"[..],
            b"1:cpu:/x\n",
            b"0::/../../system.slice/cron.service\n",
            b"0::relative\n",
        ] {
            assert!(cgroup_path(bad).is_err(), "{bad:?}");
        }
        let mut long = b"0::/".to_vec();
        long.resize(usize::try_from(MAX_PROC_FILE).unwrap(), b'a');
        long.push(b'\n');
        assert!(cgroup_path(&long).is_err());
    }

    #[test]
    fn status_fields_are_read_by_name_and_position() {
        let status = b"Name:\tx\nPid:\t42\nPPid:\t1\nUid:\t1000\t0\t0\t0\nGid:\t1\t1\t1\t1\n";
        assert_eq!(status_field(status, "Uid:", 1), Some(0));
        assert_eq!(status_field(status, "Pid:", 0), Some(42));
        assert_eq!(status_field(b"Name:\tx\n", "Uid:", 1), None);
        assert_eq!(status_field(b"Uid:\tjunk", "Uid:", 1), None);
    }

    fn proc_self() -> OwnedFd {
        open(
            "/proc/self",
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .unwrap()
    }

    #[test]
    fn a_passed_directory_must_be_the_peers_own_on_proc() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let peer = connected(&a).unwrap();
        assert!(identify(&peer, Some(proc_self()), None).is_ok());
        // A made-up directory with a status file of the requester's writing.
        let fake = tempfile::tempdir().unwrap();
        std::fs::write(
            fake.path().join("status"),
            format!("Pid:\t{}\nUid:\t0\t0\t0\t0\n", std::process::id()),
        )
        .unwrap();
        let fd = open(
            fake.path(),
            OFlag::O_RDONLY | OFlag::O_DIRECTORY,
            Mode::empty(),
        )
        .unwrap();
        let why = identify(&peer, Some(fd), None).unwrap_err();
        assert!(why.contains("not a /proc directory"), "{why}");
        // Another process's /proc directory (pid 1's).
        let init = open(
            "/proc/1",
            OFlag::O_RDONLY | OFlag::O_DIRECTORY,
            Mode::empty(),
        )
        .unwrap();
        let why = identify(&peer, Some(init), None).unwrap_err();
        assert!(why.contains("not the connecting process's"), "{why}");
    }

    #[test]
    fn the_other_end_of_a_socket_pair_is_this_process() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let root = crate::cgroup::cgroup2_root().ok();
        let me = identify(&connected(&a).unwrap(), None, root.as_deref()).unwrap();
        assert_eq!(me.pid, i32::try_from(std::process::id()).unwrap());
        assert_eq!(me.uid, nix::unistd::geteuid().as_raw());
        let own = std::fs::read(format!("/proc/{}/cmdline", std::process::id())).unwrap();
        assert_eq!(me.command, command_line(&own));
        if let (Some(cg), Some(root)) = (me.cgroup, root) {
            let path = crate::cgroup::own_cgroup_path(
                &std::fs::read_to_string("/proc/self/cgroup").unwrap(),
            )
            .unwrap();
            assert_eq!(cg.path, path);
            let dir = root.join(path.trim_start_matches('/'));
            assert_eq!(cg.id, std::fs::metadata(dir).unwrap().ino());
        }
    }
}
