//! cgroup v2 for egress windows: where the cgroup2 hierarchy is mounted, and a
//! cgroup made for one window, whose id (its directory's inode number) and depth
//! the firewall rule `socket cgroupv2 level L @egress_cgroups` matches.
//!
//! Finding the mount is pure (a mountinfo parser); the rest is plain file I/O on
//! the cgroup tree, which only `egress-window` does — never the daemon.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Why a cgroup cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// This host has no cgroup v2 hierarchy mounted.
    #[error("no cgroup2 file system is mounted (see /proc/self/mountinfo); use --host-wide")]
    NoCgroup2,
    /// A cgroup file or directory cannot be used.
    #[error("cannot use cgroup {path}")]
    Io {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The mount point of the cgroup2 file system in a `/proc/self/mountinfo` text: on
/// most hosts `/sys/fs/cgroup`, on hybrid ones `/sys/fs/cgroup/unified`.
#[must_use]
pub fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (before, after) = line.split_once(" - ")?;
        if after.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        // Fields before " - ": id, parent, major:minor, root, mount point, …
        let mount = before.split_whitespace().nth(4)?;
        Some(PathBuf::from(unescape(mount)))
    })
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            let text = std::str::from_utf8(d).ok()?;
            u8::from_str_radix(text, 8).ok()
        });
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cgroup2 mount of this process's mount namespace.
pub fn cgroup2_root() -> Result<PathBuf, CgroupError> {
    let mountinfo =
        std::fs::read_to_string("/proc/self/mountinfo").map_err(|source| CgroupError::Io {
            path: PathBuf::from("/proc/self/mountinfo"),
            source,
        })?;
    cgroup2_mount(&mountinfo).ok_or(CgroupError::NoCgroup2)
}

/// A cgroup for one egress window: one egress-window made (removed on drop, once
/// its processes are gone), or the systemd scope it runs in (left to systemd).
#[derive(Debug)]
pub struct WindowCgroup {
    path: PathBuf,
    id: u64,
    level: u32,
    owned: bool,
}

/// This process's cgroup v2 path in a `/proc/self/cgroup` text (the `0::` line).
#[must_use]
pub fn own_cgroup_path(proc_self_cgroup: &str) -> Option<String> {
    proc_self_cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(ToOwned::to_owned)
}

impl WindowCgroup {
    /// Creates `root/name`.
    pub fn create(root: &Path, name: &str) -> Result<Self, CgroupError> {
        let path = root.join(name);
        let io = |source| CgroupError::Io {
            path: path.clone(),
            source,
        };
        std::fs::create_dir(&path).map_err(io)?;
        let id = std::fs::metadata(&path).map_err(io)?.ino();
        let level = u32::try_from(Path::new(name).components().count()).unwrap_or(u32::MAX);
        Ok(Self {
            path,
            id,
            level,
            owned: true,
        })
    }

    /// The existing cgroup `relative` (like `/system.slice/x.scope`) below `root`,
    /// which someone else (systemd) made and removes.
    pub fn existing(root: &Path, relative: &str) -> Result<Self, CgroupError> {
        let relative = relative.trim_start_matches('/');
        let path = root.join(relative);
        let id = std::fs::metadata(&path)
            .map_err(|source| CgroupError::Io {
                path: path.clone(),
                source,
            })?
            .ino();
        let level = u32::try_from(Path::new(relative).components().count()).unwrap_or(u32::MAX);
        Ok(Self {
            path,
            id,
            level,
            owned: false,
        })
    }

    /// The cgroup id the kernel's `socket cgroupv2` compares.
    #[must_use]
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Depth below the cgroup2 root.
    #[must_use]
    pub fn level(&self) -> u32 {
        self.level
    }

    /// The cgroup's directory.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Moves process `pid` (and so its future children) into the cgroup.
    pub fn add_process(&self, pid: u32) -> Result<(), CgroupError> {
        let procs = self.path.join("cgroup.procs");
        std::fs::write(&procs, pid.to_string()).map_err(|source| CgroupError::Io {
            path: procs,
            source,
        })
    }
}

impl Drop for WindowCgroup {
    fn drop(&mut self) {
        // Fails while processes remain; the kernel then keeps the cgroup, empty of rules.
        if self.owned {
            let _ = std::fs::remove_dir(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_unified_and_the_hybrid_mount() {
        let unified =
            "24 30 0:22 / /sys/fs/cgroup rw,nosuid shared:9 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            cgroup2_mount(unified),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        let hybrid = concat!(
            "25 24 0:23 / /sys/fs/cgroup ro shared:9 - tmpfs tmpfs ro,mode=755\n",
            "26 25 0:24 / /sys/fs/cgroup/unified rw shared:10 - cgroup2 cgroup2 rw,nsdelegate\n",
            "27 25 0:25 / /sys/fs/cgroup/memory rw shared:11 - cgroup cgroup rw,memory\n",
        );
        assert_eq!(
            cgroup2_mount(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn no_cgroup2_is_none_and_junk_does_not_panic() {
        assert_eq!(
            cgroup2_mount("27 25 0:25 / /sys/fs/cgroup/memory rw - cgroup cgroup rw\n"),
            None
        );
        assert_eq!(cgroup2_mount("garbage\n - cgroup2\n\n"), None);
    }

    #[test]
    fn escaped_mount_points_are_decoded() {
        let line = "1 2 0:3 / /mnt/my\\040cgroup rw - cgroup2 cgroup2 rw\n";
        assert_eq!(cgroup2_mount(line), Some(PathBuf::from("/mnt/my cgroup")));
    }

    #[test]
    fn own_cgroup_is_the_unified_line() {
        let text = "9:name=systemd:/\n4:memory:/x\n0::/system.slice/knockgate-egress-7.scope\n";
        assert_eq!(
            own_cgroup_path(text).as_deref(),
            Some("/system.slice/knockgate-egress-7.scope")
        );
        assert_eq!(own_cgroup_path("4:memory:/x\n"), None);
    }

    #[test]
    fn an_existing_scope_is_used_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("system.slice/x.scope")).unwrap();
        let cg = WindowCgroup::existing(dir.path(), "/system.slice/x.scope").unwrap();
        assert_eq!(cg.level(), 2);
        assert_eq!(
            cg.id(),
            std::fs::metadata(dir.path().join("system.slice/x.scope"))
                .unwrap()
                .ino()
        );
        drop(cg);
        assert!(
            dir.path().join("system.slice/x.scope").exists(),
            "systemd removes its scope, not us"
        );
    }

    #[test]
    fn a_window_cgroup_has_the_directory_inode_as_id() {
        let dir = tempfile::tempdir().unwrap();
        let cg = WindowCgroup::create(dir.path(), "w1").unwrap();
        assert_eq!(
            cg.id(),
            std::fs::metadata(dir.path().join("w1")).unwrap().ino()
        );
        assert_eq!(cg.level(), 1);
        let path = cg.path().to_owned();
        drop(cg);
        assert!(!path.exists(), "removed on drop");
    }
}
