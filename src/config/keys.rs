//! Key files → the key ring. A key file must hold 64 hex digits and be readable by
//! its owner only; anything else is refused, naming the file and the config key.
//! The key itself never appears in an error or a log line.

use std::path::Path;

use super::{ConfigError, KeySpec, Loaded};
use crate::keyfile::{self, KeyFileError};
use crate::knock::KeyId;
use crate::policy::{FwknopEntry, KeyEntry, KeyRing};

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
    ring.set_fwknop(load_fwknop(loaded)?);
    Ok(ring)
}

/// A key file error as a config error naming the config file and key.
fn key_file_error(config: &Path, key: &str, file: &Path, e: KeyFileError) -> ConfigError {
    let (path, key, file) = (config.to_owned(), key.to_owned(), file.to_owned());
    match e {
        KeyFileError::Mode { mode, .. } => ConfigError::KeyFileMode {
            path,
            key,
            file,
            mode,
        },
        KeyFileError::Content { .. } => ConfigError::KeyFileContent { path, key, file },
        KeyFileError::FwknopContent { .. } => ConfigError::FwknopKeyFileContent { path, key, file },
        KeyFileError::Read { source, .. } | KeyFileError::Create { source, .. } => {
            ConfigError::ReadKeyFile {
                path,
                key,
                file,
                source,
            }
        }
    }
}

/// A stanza's longest grant when it sets none (fwknop's `MAX_FW_TIMEOUT` default).
const FWKNOP_DEFAULT_MAX_TTL: std::time::Duration = std::time::Duration::from_secs(300);

/// Reads every `[[fwknop_keys]]` file of `loaded`, in config order (the order the
/// daemon tries them in). Two stanzas with the same HMAC key are refused: the first
/// would always match, and the second (its sources, ports) never be reached.
fn load_fwknop(loaded: &Loaded) -> Result<Vec<FwknopEntry>, ConfigError> {
    let mut out: Vec<FwknopEntry> = Vec::new();
    for (i, spec) in loaded.config.fwknop_keys.iter().enumerate() {
        let key = format!("fwknop_keys[{i}].file");
        let keys = keyfile::read_fwknop(&spec.file)
            .map_err(|e| key_file_error(&loaded.path, &key, &spec.file, e))?;
        let digest = crate::fwknop::HmacDigest::from_name(&spec.hmac_digest)
            .unwrap_or(crate::fwknop::HmacDigest::Sha256);
        if let Some(first) = out
            .iter()
            .find(|e| e.keys.hmac.as_slice() == keys.hmac.as_slice())
        {
            return Err(ConfigError::Invalid {
                path: loaded.path.clone(),
                key: key.clone(),
                expected: format!(
                    "this stanza's HMAC key is also stanza `{}`'s: packets are matched by HMAC key, so this one would never be used; merge them (sources, services) or give each its own keys",
                    first.name
                ),
            });
        }
        out.push(FwknopEntry {
            name: spec.name.clone(),
            keys: crate::fwknop::SpaKeys {
                encryption: keys.encryption,
                hmac: keys.hmac,
                digest,
            },
            services: spec.services.clone(),
            sources: networks(&spec.sources),
            ttl: spec.ttl.0,
            // fwknop's MAX_FW_TIMEOUT default: a client's -f gets at most 5 minutes
            // unless the stanza says otherwise.
            max_ttl: Some(spec.max_ttl.map_or(FWKNOP_DEFAULT_MAX_TTL, |d| d.0)),
            unbound: !spec.require_source_address,
            other_source: spec.other_source,
            max_grants: usize::try_from(spec.max_grants).unwrap_or(usize::MAX),
        });
    }
    Ok(out)
}

fn load_key(config: &Path, key: &str, spec: &KeySpec) -> Result<KeyEntry, ConfigError> {
    let secret =
        keyfile::read(&spec.file).map_err(|e| key_file_error(config, key, &spec.file, e))?;
    Ok(KeyEntry {
        secret,
        services: spec.services.clone(),
        sources: networks(&spec.sources),
        max_ttl: spec.max_ttl.map(|d| d.0),
        other_source: spec.other_source,
        unbound: spec.allow_unbound,
        max_grants: usize::try_from(spec.max_grants).unwrap_or(usize::MAX),
    })
}

/// The `sources` of a key or stanza as networks (`validate` checked each).
fn networks(sources: &[String]) -> Vec<ipnet::IpNet> {
    sources
        .iter()
        .filter_map(|s| super::parse_network(s))
        .collect()
}
