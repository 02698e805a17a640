//! Where the book's [`KernelStamp`] comes from: this boot, this network namespace, and
//! the ruleset generation the firewall accounts for as its own.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::grants::KernelStamp;

/// The stamp file beside the book at `book_path` (`grants.json` → `grants-stamp.json`;
/// its own name before the extension, as both are written through a `.tmp` beside them).
#[must_use]
pub fn path_beside(book_path: &Path) -> PathBuf {
    let stem = book_path
        .file_stem()
        .map_or_else(|| "grants".into(), |s| s.to_string_lossy());
    book_path.with_file_name(format!("{stem}-stamp.json"))
}

/// This boot's id and this process's network namespace, or none if either cannot be
/// read (then no stamp is written, and every start reads the kernel back).
fn here() -> Option<(String, u64)> {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let netns = std::fs::metadata("/proc/self/ns/net").ok()?.ino();
    Some((boot.trim().to_owned(), netns))
}

/// The stamp for the book saved as `book_serial`, true of the kernel at `generation`.
#[must_use]
pub fn stamp(book_serial: u64, generation: u32) -> Option<KernelStamp> {
    let (boot_id, netns) = here()?;
    Some(KernelStamp {
        book_serial,
        boot_id,
        netns,
        generation,
    })
}

/// Whether `stamp` was written in this boot and network namespace, for a book saved
/// as `book_serial`. The generation is the firewall's to check.
#[must_use]
pub fn is_here(stamp: &KernelStamp, book_serial: u64) -> bool {
    stamp.book_serial == book_serial
        && here().is_some_and(|(boot, netns)| stamp.boot_id == boot && stamp.netns == netns)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stamp_file_does_not_share_the_books_temporary_file() {
        let book = Path::new("/var/lib/knockgate/grants.json");
        let stamp = path_beside(book);
        assert_eq!(stamp, Path::new("/var/lib/knockgate/grants-stamp.json"));
        assert_ne!(stamp.with_extension("tmp"), book.with_extension("tmp"));
    }

    #[test]
    fn a_stamp_of_this_boot_and_namespace_is_here_for_its_own_book_only() {
        let stamp = stamp(7, 42).expect("/proc is readable");
        assert!(is_here(&stamp, 7));
        assert!(!is_here(&stamp, 8), "another save of the book");
        let other_boot = KernelStamp {
            boot_id: "00000000-0000-0000-0000-000000000000".into(),
            ..stamp.clone()
        };
        assert!(!is_here(&other_boot, 7));
        let other_netns = KernelStamp {
            netns: stamp.netns.wrapping_add(1),
            ..stamp
        };
        assert!(!is_here(&other_netns, 7));
    }
}
