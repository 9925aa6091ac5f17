//! The secrets a local service references (`{ env = ... }`, `{ file = ... }`:
//! API keys, connection passwords and private keys; every reference
//! [`rc::ServiceConfig::secrets_mut`] lists), seen without being shown.
//!
//! - **Drift.** A secret's value is not in the bundle, so a changed password
//!   would not change the bundle digest. Each service instead carries a
//!   keyed digest of the values it references: HMAC-SHA256 under a random
//!   key of its own (`services/<name>/secrets.key`, 0600), so plans, saved
//!   plans and state hold no value and no plain hash of one (a bare SHA-256
//!   of a short password can be brute-forced). A changed value is an update
//!   of exactly the services that use it.
//! - **Delivery.** A runtime is started with a clean environment; a secret
//!   referenced by `{ env = ... }` is read from mesh's environment at apply
//!   and handed over in a file (0600, in a 0700 folder beside the bundle),
//!   never in argv or the environment. `{ file = ... }` references stay as
//!   they are.
//!
//! Keys mesh makes itself (`access`, see [`super::access`]) are excluded
//! from the digest: they are made at apply and managed by mesh.

use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use mesh_runtime::config as rc;
use sha2::{Digest, Sha256};

/// The file holding a service's digest key.
pub const KEY_FILE: &str = "secrets.key";

/// The references a person wrote (not keys mesh made under `managed`), in
/// the order [`rc::ServiceConfig::secrets_mut`] lists them.
fn user_refs(config: &rc::ServiceConfig, managed: &Path) -> Vec<rc::SecretRef> {
    let mut config = config.clone();
    config
        .secrets_mut()
        .filter(|r| !matches!(r, rc::SecretRef::File(p) if p.starts_with(managed)))
        .map(|r| r.clone())
        .collect()
}

/// Whether the service references any secret of its user's.
pub fn any(config: &rc::ServiceConfig, managed: &Path) -> bool {
    !user_refs(config, managed).is_empty()
}

/// A secret's value as the runtime reads it (file: trailing newlines off);
/// `None` when unset or unreadable.
fn value(r: &rc::SecretRef) -> Option<String> {
    let mut v = match r {
        rc::SecretRef::Env(name) => std::env::var(name).ok()?,
        rc::SecretRef::File(p) => std::fs::read_to_string(p).ok()?,
    };
    if let rc::SecretRef::File(_) = r {
        while v.ends_with('\n') || v.ends_with('\r') {
            v.pop();
        }
    }
    Some(v)
}

/// `hmac-sha256:HEX` of the values `config` references (in a fixed order,
/// each with its reference; an unset one as such), under `key`.
pub fn digest(key: &[u8], config: &rc::ServiceConfig, managed: &Path) -> String {
    let mut refs = user_refs(config, managed);
    refs.sort_by_key(|r| r.to_string());
    refs.dedup();
    let mut message = Vec::new();
    for r in refs {
        message.extend_from_slice(r.to_string().as_bytes());
        message.push(0);
        match value(&r) {
            Some(v) => {
                message.push(1);
                message.extend_from_slice(&(v.len() as u64).to_be_bytes());
                message.extend_from_slice(v.as_bytes());
            }
            None => message.push(0),
        }
    }
    format!("hmac-sha256:{}", hex::encode(hmac_sha256(key, &message)))
}

/// HMAC-SHA256 (RFC 2104).
pub fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    const BLOCK: usize = 64;
    let mut k = [0u8; BLOCK];
    if key.len() > BLOCK {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let pad = |byte: u8| k.map(|b| b ^ byte);
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(message)
        .finalize();
    Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize()
        .into()
}

/// The digest key in `service_dir`, if it exists.
pub fn read_key(service_dir: &Path) -> Option<Vec<u8>> {
    std::fs::read(service_dir.join(KEY_FILE))
        .ok()
        .filter(|k| k.len() >= 32)
}

/// The digest key in `service_dir`, made (32 random bytes, 0600) if missing.
pub fn ensure_key(service_dir: &Path) -> std::io::Result<Vec<u8>> {
    if let Some(k) = read_key(service_dir) {
        return Ok(k);
    }
    std::fs::create_dir_all(service_dir)?;
    let key = random_key()?;
    replace_private(&service_dir.join(KEY_FILE), &key)?;
    Ok(key.to_vec())
}

/// 32 random bytes.
pub fn random_key() -> std::io::Result<[u8; 32]> {
    let mut key = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut key)?;
    Ok(key)
}

/// Replaces `path` with a new file only its owner can read, at once: a
/// reader sees the old content or the new, never none.
pub fn replace_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.{}", std::process::id()));
    write_private(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

/// Why the secrets could not be handed to a runtime. Names the reference,
/// never a value.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// `{ env = NAME }` and mesh's environment has no NAME.
    #[error(
        "secret {reference} is not set in mesh's environment (the runtime gets it from mesh, in a file)"
    )]
    Unset { reference: String },
    #[error("writing the secret files under {}: {source}", dir.display())]
    Io {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Rewrites every `{ env = NAME }` reference of `config` into a file under
/// `dir` (made 0700) holding the value from mesh's environment (0600), and
/// makes `{ file = ... }` references absolute (the runtime reads relative
/// ones from its bundle folder).
pub fn stage(config: &mut rc::ServiceConfig, dir: &Path) -> Result<(), StageError> {
    let io = |source| StageError::Io {
        dir: dir.to_path_buf(),
        source,
    };
    let mut made = false;
    for r in config.secrets_mut() {
        let name = match r {
            rc::SecretRef::Env(name) => name.clone(),
            rc::SecretRef::File(p) => {
                if p.is_relative() {
                    *p = std::path::absolute(&*p).map_err(io)?;
                }
                continue;
            }
        };
        let value = std::env::var(&name).map_err(|_| StageError::Unset {
            reference: format!("env:{name}"),
        })?;
        if !made {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io)?;
            made = true;
        }
        let file: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '_' {
                    c
                } else {
                    '-'
                }
            })
            .collect();
        // Absolute: the runtime does not run where mesh was started.
        let path = std::path::absolute(dir.join(format!("env-{file}"))).map_err(io)?;
        write_private(&path, value.as_bytes()).map_err(io)?;
        *r = rc::SecretRef::File(path);
    }
    Ok(())
}

/// Writes a new file only its owner can read.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_rfc_4231() {
        // Test case 2.
        assert_eq!(
            hex::encode(hmac_sha256(b"Jefe", b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // Test case 6: a key longer than a block.
        assert_eq!(
            hex::encode(hmac_sha256(
                &[0xaa; 131],
                b"Test Using Larger Than Block-Size Key - Hash Key First"
            )),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    fn config(json: serde_json::Value) -> rc::ServiceConfig {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn the_digest_follows_every_referenced_value_and_hides_it() {
        let tmp = tempfile::tempdir().unwrap();
        let pw = tmp.path().join("pw");
        std::fs::write(&pw, "hunter2\n").unwrap();
        let managed = tmp.path().join("access");
        let c = config(serde_json::json!({
            "service": "s",
            "api_keys": [{ "file": managed.join("s/operator") }],
            "connections": { "db": { "kind": "postgres", "host": "h", "database": "d", "user": "u",
                                     "password": { "file": pw } } },
            "endpoints": {}
        }));
        let key = [7u8; 32];
        let first = digest(&key, &c, &managed);
        assert!(first.starts_with("hmac-sha256:"));
        assert!(any(&c, &managed));
        assert!(!first.contains(&hex::encode(Sha256::digest(b"hunter2"))));
        assert_eq!(first, digest(&key, &c, &managed), "stable");
        assert_ne!(first, digest(&[8u8; 32], &c, &managed), "keyed");
        std::fs::write(&pw, "hunter3").unwrap();
        assert_ne!(
            first,
            digest(&key, &c, &managed),
            "a changed password shows"
        );
        // mesh's own access keys do not count.
        let own = config(serde_json::json!({
            "service": "s", "api_keys": [{ "file": managed.join("s/operator") }], "endpoints": {}
        }));
        assert!(!any(&own, &managed));
    }

    #[test]
    fn env_secrets_are_staged_as_private_files() {
        let tmp = tempfile::tempdir().unwrap();
        // A variable every process has (tests must not set any: they share the environment).
        let name = "PATH";
        let path_value = std::env::var(name).unwrap();
        let mut c = config(serde_json::json!({
            "service": "s", "api_keys": [{ "env": name }, { "file": "/keep/me" }, { "file": "rel/key" }],
            "endpoints": {}
        }));
        let dir = tmp.path().join("secrets");
        stage(&mut c, &dir).unwrap();
        let rc::ApiKey::Key(rc::SecretRef::File(p)) = &c.api_keys[0] else {
            panic!("{:?}", c.api_keys)
        };
        assert_eq!(std::fs::read_to_string(p).unwrap(), path_value);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        assert_eq!(
            c.api_keys[1],
            rc::ApiKey::Key(rc::SecretRef::File("/keep/me".into()))
        );
        assert_eq!(
            c.api_keys[2],
            rc::ApiKey::Key(rc::SecretRef::File(
                std::env::current_dir().unwrap().join("rel/key")
            ))
        );
        let mut missing = config(serde_json::json!({
            "service": "s", "api_keys": [{ "env": "MESH_UNIT_TEST_NOT_SET_ANYWHERE" }], "endpoints": {}
        }));
        let e = stage(&mut missing, &dir).unwrap_err().to_string();
        assert!(e.contains("env:MESH_UNIT_TEST_NOT_SET_ANYWHERE"), "{e}");
    }
}
