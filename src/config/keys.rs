//! Key files → the key ring. A key file must hold 64 hex digits and be readable by
//! its owner only; anything else is refused, naming the file and the config key.
//! The key itself never appears in an error or a log line.

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::{ConfigError, KeySpec, Loaded};
use crate::knock::{KeyId, Secret, Service};
use crate::policy::{KeyEntry, KeyRing};

/// Longest key file read (64 hex digits plus whitespace); a larger file is not a key.
const MAX_KEY_FILE: u64 = 256;

/// Reads every `[[keys]]` file of `loaded`.
pub fn load_keys(loaded: &Loaded) -> Result<KeyRing, ConfigError> {
    let mut ring = KeyRing::default();
    for (i, spec) in loaded.config.keys.iter().enumerate() {
        let entry = load_key(&loaded.path, &format!("keys[{i}].file"), spec)?;
        // `validate` checked the id.
        if let Ok(id) = KeyId::new(&spec.id) {
            ring.insert(id, entry);
        }
    }
    Ok(ring)
}

fn load_key(config: &Path, key: &str, spec: &KeySpec) -> Result<KeyEntry, ConfigError> {
    let read_error = |source| ConfigError::ReadKeyFile {
        path: config.to_owned(),
        key: key.to_owned(),
        file: spec.file.clone(),
        source,
    };
    let file = std::fs::File::open(&spec.file).map_err(read_error)?;
    let mode = file.metadata().map_err(read_error)?.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(ConfigError::KeyFileMode {
            path: config.to_owned(),
            key: key.to_owned(),
            file: spec.file.clone(),
            mode,
        });
    }
    let mut text = zeroize::Zeroizing::new(String::new());
    file.take(MAX_KEY_FILE)
        .read_to_string(&mut text)
        .map_err(read_error)?;
    let secret = Secret::from_hex(&text).map_err(|_| ConfigError::KeyFileContent {
        path: config.to_owned(),
        key: key.to_owned(),
        file: spec.file.clone(),
    })?;
    Ok(KeyEntry {
        secret,
        services: spec
            .services
            .iter()
            .filter(|s| s.as_str() == "ssh")
            .map(|_| Service::Ssh)
            .collect(),
        sources: spec
            .sources
            .iter()
            .filter_map(|s| {
                s.parse::<ipnet::IpNet>()
                    .ok()
                    .or_else(|| s.parse::<std::net::IpAddr>().ok().map(ipnet::IpNet::from))
            })
            .collect(),
        max_ttl: spec.max_ttl.map(|d| d.0),
        other_source: spec.other_source,
    })
}
