//! Where the book's [`KernelStamp`] comes from: this boot, the firewall's network
//! namespace, the ruleset generation the firewall accounts for as its own, and the
//! digest of the book file it speaks for.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

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

/// The digest a stamp names a book file by.
#[must_use]
pub fn digest(book: &[u8]) -> String {
    Sha256::digest(book)
        .iter()
        .fold(String::with_capacity(64), |mut hex, b| {
            let _ = write!(hex, "{b:02x}");
            hex
        })
}

/// This boot's id, or none if it cannot be read (then no stamp is written, and every
/// start reads the kernel back).
fn boot_id() -> Option<String> {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    Some(boot.trim().to_owned())
}

/// The stamp for the book file with digest `book_sha256`, true of the kernel of
/// network namespace `netns` at `generation`.
#[must_use]
pub fn stamp(book_sha256: &str, netns: u64, generation: u32) -> Option<KernelStamp> {
    Some(KernelStamp {
        book_sha256: book_sha256.to_owned(),
        boot_id: boot_id()?,
        netns,
        generation,
    })
}

/// Whether `stamp` was written in this boot, for network namespace `netns`, and for the
/// book file with digest `book_sha256`. The generation is the firewall's to check.
#[must_use]
pub fn is_here(stamp: &KernelStamp, book_sha256: &str, netns: Option<u64>) -> bool {
    stamp.book_sha256 == book_sha256
        && netns == Some(stamp.netns)
        && boot_id().is_some_and(|boot| stamp.boot_id == boot)
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
    fn a_stamp_is_here_only_for_its_own_boot_namespace_and_book() {
        let book = digest(b"{\"grants\": []}");
        let stamp = stamp(&book, 7, 42).expect("/proc is readable");
        assert!(is_here(&stamp, &book, Some(7)));
        assert!(
            !is_here(&stamp, &digest(b"{}"), Some(7)),
            "another book file"
        );
        assert!(!is_here(&stamp, &book, Some(8)), "another namespace");
        assert!(!is_here(&stamp, &book, None), "a kernel that cannot say");
        let other_boot = KernelStamp {
            boot_id: "00000000-0000-0000-0000-000000000000".into(),
            ..stamp
        };
        assert!(!is_here(&other_boot, &book, Some(7)));
    }
}
