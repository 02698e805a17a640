//! Key files → the key ring. A key file must hold 64 hex digits and be readable by
//! its owner only; anything else is refused, naming the file and the config key.
//! The key itself never appears in an error or a log line.

use std::path::Path;

use super::{ConfigError, KeySpec, Loaded};
use crate::keyfile::{self, KeyFileError};
use crate::knock::KeyId;
use crate::policy::{KeyEntry, KeyRing};

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
    let secret = keyfile::read(&spec.file).map_err(|e| {
        let (path, key, file) = (config.to_owned(), key.to_owned(), spec.file.clone());
        match e {
            KeyFileError::Mode { mode, .. } => ConfigError::KeyFileMode {
                path,
                key,
                file,
                mode,
            },
            KeyFileError::Content { .. } => ConfigError::KeyFileContent { path, key, file },
            KeyFileError::Read { source, .. } | KeyFileError::Create { source, .. } => {
                ConfigError::ReadKeyFile {
                    path,
                    key,
                    file,
                    source,
                }
            }
        }
    })?;
    Ok(KeyEntry {
        secret,
        services: spec.services.clone(),
        sources: spec
            .sources
            .iter()
            .filter_map(|s| super::parse_network(s))
            .collect(),
        max_ttl: spec.max_ttl.map(|d| d.0),
        other_source: spec.other_source,
        unbound: spec.allow_unbound,
        max_grants: usize::try_from(spec.max_grants).unwrap_or(usize::MAX),
    })
}
