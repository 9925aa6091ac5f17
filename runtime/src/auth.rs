//! Caller identity: whose API key a request carries, and whether that
//! caller may call this service.
//!
//! A service accepts keys of two forms ([`ApiKey`]): a key itself (any
//! holder may call: a key a person configured), or a caller's *verifier*:
//! lines `hmac-sha256:HEX`, each [`verifier`] of one key of that caller, so
//! a service never holds another service's key. `known_callers` are the
//! verifiers of the mesh's other identities: recognised, and refused with
//! 403 (a known caller that is not allowed); no key or any other key is 401.
//! Every comparison runs over every entry without stopping early.
//!
//! Keys and verifiers in files are read again when the last reading is older
//! than [`RELOAD`] (on the next request), on the serving side ([`KeyRing`])
//! and on the calling side ([`PresentedKey`]): a rotation changes the files
//! (a Kubernetes Secret volume swaps them atomically) and needs no restart.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use axum::http::HeaderValue;
use ring::hmac;

use crate::config::{ApiKey, Bundle, CallerKey, ConfigError, SecretRef, ServiceConfig, resolve_in};

/// How old a reading of key files may get before the next request reads them again.
pub const RELOAD: Duration = Duration::from_secs(1);

const VERIFIER_PREFIX: &str = "hmac-sha256:";

/// `hmac-sha256:HEX`: HMAC-SHA256 keyed by `key` of `mesh-verifier/1:<caller>`.
/// It tells a key of `caller` apart and gives nothing to guess the key from
/// (no bare hash of it).
pub fn verifier(caller: &str, key: &str) -> String {
    format!("{VERIFIER_PREFIX}{}", hex_encode(&tag(caller, key)))
}

/// The bytes of [`verifier`].
fn tag(caller: &str, key: &str) -> Vec<u8> {
    hmac::sign(
        &hmac::Key::new(hmac::HMAC_SHA256, key.as_bytes()),
        format!("mesh-verifier/1:{caller}").as_bytes(),
    )
    .as_ref()
    .to_vec()
}

fn hex_encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Who a request's key says it comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The service takes no keys: anyone may call.
    Open,
    /// An accepted key: a configured one (`None`) or a caller's.
    Allowed(Option<String>),
    /// A known caller of the mesh that is not allowed here (403).
    Denied(String),
    /// No key, or one nobody holds (401).
    Unknown,
}

/// One caller's verifiers.
#[derive(Debug)]
struct Known {
    caller: String,
    allowed: bool,
    tags: Vec<Vec<u8>>,
}

/// The keys a service accepts and the identities it recognises, as read.
#[derive(Debug, Default)]
pub struct Keys {
    plain: Vec<Vec<u8>>,
    callers: Vec<Known>,
}

impl Keys {
    /// Keys from resolved values: plain keys only (tests, `check`).
    pub fn plain(keys: Vec<String>) -> Keys {
        Keys {
            plain: keys.into_iter().map(String::into_bytes).collect(),
            callers: Vec::new(),
        }
    }

    /// Reads every key and verifier `config` names.
    pub fn load(bundle_dir: &std::path::Path, config: &ServiceConfig) -> Result<Keys, ConfigError> {
        let known = |c: &CallerKey, allowed: bool| -> Result<Known, ConfigError> {
            let text = resolve_in(bundle_dir, &c.verifier)?;
            let mut tags = Vec::new();
            for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
                let tag = line
                    .strip_prefix(VERIFIER_PREFIX)
                    .and_then(hex_decode)
                    .ok_or_else(|| ConfigError::Secret {
                        reference: c.verifier.clone(),
                        reason: format!(
                            "not a verifier of `{}` (lines `{VERIFIER_PREFIX}HEX`)",
                            c.caller
                        ),
                    })?;
                tags.push(tag);
            }
            Ok(Known {
                caller: c.caller.clone(),
                allowed,
                tags,
            })
        };
        let mut keys = Keys::default();
        for k in &config.api_keys {
            match k {
                ApiKey::Key(r) => keys.plain.push(resolve_in(bundle_dir, r)?.into_bytes()),
                ApiKey::Caller(c) => keys.callers.push(known(c, true)?),
            }
        }
        for c in &config.known_callers {
            keys.callers.push(known(c, false)?);
        }
        Ok(keys)
    }

    /// How many keys and verifiers (for the start-up log line).
    pub fn count(&self) -> usize {
        self.plain.len() + self.callers.iter().map(|c| c.tags.len()).sum::<usize>()
    }

    /// No key configured: anyone may call.
    pub fn open(&self) -> bool {
        self.plain.is_empty() && self.callers.is_empty()
    }

    /// Whose key `given` is. Compares with every key and verifier.
    pub fn check(&self, given: Option<&str>) -> Verdict {
        if self.open() {
            return Verdict::Open;
        }
        let Some(given) = given else {
            return Verdict::Unknown;
        };
        let mut plain = false;
        for key in &self.plain {
            plain |= constant_time_eq(key, given.as_bytes());
        }
        let mut found: Option<&Known> = None;
        for known in &self.callers {
            let tag = tag(&known.caller, given);
            let mut hit = false;
            for t in &known.tags {
                hit |= constant_time_eq(t, &tag);
            }
            if hit && found.is_none() {
                found = Some(known);
            }
        }
        match found {
            Some(k) if k.allowed => Verdict::Allowed(Some(k.caller.clone())),
            Some(k) if !plain => Verdict::Denied(k.caller.clone()),
            _ if plain => Verdict::Allowed(None),
            _ => Verdict::Unknown,
        }
    }
}

fn hex_decode(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Equality whose time depends only on the length of `secret`.
pub fn constant_time_eq(secret: &[u8], given: &[u8]) -> bool {
    let mut diff = (secret.len() ^ given.len()) as u64;
    for (i, &s) in secret.iter().enumerate() {
        let g = given.get(i).copied().unwrap_or(!s);
        diff |= u64::from(s ^ g);
    }
    std::hint::black_box(diff) == 0
}

/// What a reading depends on: the bundle folder and the references.
#[derive(Debug, Clone)]
struct Source {
    dir: PathBuf,
    config: ServiceConfig,
}

/// The service's [`Keys`], read again from their files when older than [`RELOAD`].
pub struct KeyRing {
    source: Option<Source>,
    current: ArcSwap<Keys>,
    read_at: Mutex<Instant>,
}

impl KeyRing {
    /// Keys that never change.
    pub fn fixed(keys: Keys) -> KeyRing {
        KeyRing {
            source: None,
            current: ArcSwap::from_pointee(keys),
            read_at: Mutex::new(Instant::now()),
        }
    }

    /// The keys of a bundle, read now (an error: the service cannot start).
    pub fn open(bundle: &Bundle) -> Result<KeyRing, ConfigError> {
        let keys = Keys::load(&bundle.dir, &bundle.config)?;
        Ok(KeyRing {
            source: Some(Source {
                dir: bundle.dir.clone(),
                config: bundle.config.clone(),
            }),
            current: ArcSwap::from_pointee(keys),
            read_at: Mutex::new(Instant::now()),
        })
    }

    /// The keys, read again first if the last reading is older than
    /// [`RELOAD`]. A reading that fails keeps the previous keys.
    pub fn current(&self) -> Arc<Keys> {
        if let Some(source) = &self.source
            && let Ok(mut read_at) = self.read_at.try_lock()
            && read_at.elapsed() >= RELOAD
        {
            *read_at = Instant::now();
            match Keys::load(&source.dir, &source.config) {
                Ok(keys) => self.current.store(Arc::new(keys)),
                Err(e) => crate::log::warn(format_args!("keeping the API keys read before: {e}")),
            }
        }
        self.current.load_full()
    }
}

/// The key a service presents to another (`Authorization: Bearer`), read
/// again from its file when older than [`RELOAD`].
pub struct PresentedKey {
    reference: SecretRef,
    dir: PathBuf,
    header: ArcSwap<HeaderValue>,
    read_at: Mutex<Instant>,
}

impl std::fmt::Debug for PresentedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PresentedKey({})", self.reference)
    }
}

impl PresentedKey {
    /// Reads the key now.
    pub fn open(bundle: &Bundle, reference: &SecretRef) -> Result<PresentedKey, String> {
        let header = Self::read(&bundle.dir, reference)?;
        Ok(PresentedKey {
            reference: reference.clone(),
            dir: bundle.dir.clone(),
            header: ArcSwap::from_pointee(header),
            read_at: Mutex::new(Instant::now()),
        })
    }

    fn read(dir: &std::path::Path, reference: &SecretRef) -> Result<HeaderValue, String> {
        let key = resolve_in(dir, reference).map_err(|e| e.to_string())?;
        HeaderValue::from_str(&format!("Bearer {key}"))
            .map_err(|_| "lookup api key holds characters not allowed in a header".to_string())
    }

    /// `Bearer KEY`, read again first if older than [`RELOAD`].
    pub fn header(&self) -> Arc<HeaderValue> {
        if let Ok(mut read_at) = self.read_at.try_lock()
            && read_at.elapsed() >= RELOAD
        {
            *read_at = Instant::now();
            match Self::read(&self.dir, &self.reference) {
                Ok(h) => self.header.store(Arc::new(h)),
                Err(e) => crate::log::warn(format_args!(
                    "keeping the lookup key read before ({}): {e}",
                    self.reference
                )),
            }
        }
        self.header.load_full()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_compare() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"secret", b"secre"));
        assert!(!constant_time_eq(b"secret", b""));
    }

    fn known(caller: &str, allowed: bool, keys: &[&str]) -> Known {
        Known {
            caller: caller.into(),
            allowed,
            tags: keys.iter().map(|k| tag(caller, k)).collect(),
        }
    }

    #[test]
    fn verifiers_tell_allowed_denied_and_unknown_keys_apart() {
        let keys = Keys {
            plain: vec![b"configured".to_vec()],
            callers: vec![
                known("a", true, &["key-a-old", "key-a-new"]),
                known("b", false, &["key-b"]),
            ],
        };
        assert_eq!(keys.check(None), Verdict::Unknown);
        assert_eq!(keys.check(Some("nobody's")), Verdict::Unknown);
        assert_eq!(keys.check(Some("configured")), Verdict::Allowed(None));
        assert_eq!(
            keys.check(Some("key-a-old")),
            Verdict::Allowed(Some("a".into()))
        );
        assert_eq!(
            keys.check(Some("key-a-new")),
            Verdict::Allowed(Some("a".into()))
        );
        assert_eq!(keys.check(Some("key-b")), Verdict::Denied("b".into()));
        // A verifier is bound to its caller: b's key is not a's.
        assert_ne!(verifier("a", "k"), verifier("b", "k"));
        assert_eq!(Keys::default().check(None), Verdict::Open);
    }
}
