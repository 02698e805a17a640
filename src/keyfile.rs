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
    /// Not an fwknop key pair.
    #[error(
        "key file {path} does not hold an fwknop key pair (expected a KEY_BASE64 line with 1-32 bytes and an HMAC_KEY_BASE64 line with 1-136 bytes, different keys)"
    )]
    FwknopContent {
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
    let text = read_private(path, MAX_KEY_FILE)?;
    Secret::from_hex(&text).map_err(|_| KeyFileError::Content {
        path: path.to_owned(),
    })
}

/// At most `max` bytes of `path`, refusing a file that group or others can read.
fn read_private(path: &Path, max: u64) -> Result<zeroize::Zeroizing<String>, KeyFileError> {
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
    file.take(max)
        .read_to_string(&mut text)
        .map_err(read_error)?;
    Ok(text)
}

/// Longest fwknop key file read (two base64 keys and their names).
const MAX_FWKNOP_FILE: u64 = 1024;

/// An fwknop stanza's two keys, raw (base64-decoded).
pub struct FwknopKeys {
    /// The Rijndael key: 1 to 32 bytes.
    pub encryption: zeroize::Zeroizing<Vec<u8>>,
    /// The HMAC key: 1 to 136 bytes.
    pub hmac: zeroize::Zeroizing<Vec<u8>>,
}

/// Reads an fwknop key file: a `KEY_BASE64` and an `HMAC_KEY_BASE64` line, as in
/// access.conf (and as `fwknop --key-gen` prints them, with or without the colon).
/// Refused: group/world-readable files, missing or repeated lines, keys of the wrong
/// size, and the two keys equal (fwknopd refuses that too).
pub fn read_fwknop(path: &Path) -> Result<FwknopKeys, KeyFileError> {
    use base64::Engine as _;
    let text = read_private(path, MAX_FWKNOP_FILE + 1)?;
    let content = || KeyFileError::FwknopContent {
        path: path.to_owned(),
    };
    if text.len() as u64 > MAX_FWKNOP_FILE {
        // Not silently cut: a shorter key that still decodes would never match.
        return Err(content());
    }
    let (mut encryption, mut hmac) = (None, None);
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, value) = line
            .split_once(|c: char| c == ':' || c.is_whitespace())
            .ok_or_else(content)?;
        let value = base64::engine::general_purpose::STANDARD
            .decode(value.trim())
            .map_err(|_| content())?;
        let slot = match name {
            "KEY_BASE64" => &mut encryption,
            "HMAC_KEY_BASE64" => &mut hmac,
            _ => return Err(content()),
        };
        if slot.replace(zeroize::Zeroizing::new(value)).is_some() {
            return Err(content());
        }
    }
    let (Some(encryption), Some(hmac)) = (encryption, hmac) else {
        return Err(content());
    };
    let sizes_ok = (1..=crate::fwknop::MAX_KEY_LEN).contains(&encryption.len())
        && (1..=crate::fwknop::MAX_HMAC_KEY_LEN).contains(&hmac.len());
    if !sizes_ok || encryption.as_slice() == hmac.as_slice() {
        return Err(content());
    }
    Ok(FwknopKeys { encryption, hmac })
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

    #[test]
    fn fwknop_key_files_hold_two_different_keys_and_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str, mode: u32| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            path
        };
        let good =
            "KEY_BASE64 AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA=\nHMAC_KEY_BASE64: ZGVmZ2hp\n";
        let keys = read_fwknop(&write("ok", good, 0o600)).unwrap();
        assert_eq!((keys.encryption.len(), keys.hmac.len()), (32, 6));
        assert!(matches!(
            read_fwknop(&write("open", good, 0o644)),
            Err(KeyFileError::Mode { .. })
        ));
        for bad in [
            "KEY_BASE64 AQID\n",
            "KEY_BASE64 AQID\nHMAC_KEY_BASE64 AQID\n",
            "KEY_BASE64 AQID\nKEY_BASE64 AQID\nHMAC_KEY_BASE64 ZGVm\n",
            "KEY_BASE64 !!!\nHMAC_KEY_BASE64 ZGVm\n",
            "GPG_DECRYPT_ID ABCD\n",
            &format!("KEY_BASE64 {}\nHMAC_KEY_BASE64 ZGVm\n", "QUFB".repeat(11)),
        ] {
            assert!(
                matches!(
                    read_fwknop(&write("bad", bad, 0o600)),
                    Err(KeyFileError::FwknopContent { .. })
                ),
                "{bad}"
            );
        }
    }
}
