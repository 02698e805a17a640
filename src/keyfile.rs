//! Reading and writing key files, for the daemon, `knockgate keygen` and `knock`
//! alike: 64 hex digits, mode 0600. A file others can read is refused, like ssh
//! refuses a private key others can read. The key never appears in an error.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::knock::Secret;

/// Longest key file read (64 hex digits plus whitespace); a larger file is not a key.
const MAX_KEY_FILE: u64 = 256;

/// Why a key file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// Missing or unreadable.
    #[error("cannot read key file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Readable by group or others.
    #[error(
        "key file {path} is readable by group or others (mode {mode:04o}); run: chmod 600 {path}"
    )]
    Mode {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// Not 64 hex digits.
    #[error("key file {path} does not hold a key (expected 64 hex digits)")]
    Content {
        /// The file.
        path: PathBuf,
    },
    /// Cannot be created (it exists, or the directory is missing).
    #[error("cannot create key file {path}")]
    Create {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Reads the key in `path`, refusing files that group or others can read.
pub fn read(path: &Path) -> Result<Secret, KeyFileError> {
    let read_error = |source| KeyFileError::Read {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_error)?;
    let mode = file.metadata().map_err(read_error)?.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(KeyFileError::Mode {
            path: path.to_owned(),
            mode,
        });
    }
    let mut text = zeroize::Zeroizing::new(String::new());
    file.take(MAX_KEY_FILE)
        .read_to_string(&mut text)
        .map_err(read_error)?;
    Secret::from_hex(&text).map_err(|_| KeyFileError::Content {
        path: path.to_owned(),
    })
}

/// Writes `secret` to a new file `path` with mode 0600; never overwrites.
pub fn create(path: &Path, secret: &Secret) -> Result<(), KeyFileError> {
    let create_error = |source| KeyFileError::Create {
        path: path.to_owned(),
        source,
    };
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(create_error)?;
    let mut text = secret.to_hex();
    text.push('\n');
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(create_error)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn created_keys_are_private_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.key");
        let secret = Secret::generate().unwrap();
        create(&path, &secret).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(read(&path).unwrap().to_hex(), secret.to_hex());
        assert!(
            matches!(create(&path, &secret), Err(KeyFileError::Create { .. })),
            "never overwrites"
        );
    }

    #[test]
    fn group_readable_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.key");
        create(&path, &Secret::generate().unwrap()).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o604)).unwrap();
        let err = read(&path).err().unwrap();
        assert!(err.to_string().contains("chmod 600"), "{err}");
    }
}
