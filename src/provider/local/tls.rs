//! HTTPS on the local target (`tls = { self_signed = true }`): the runtime
//! serves TLS itself, with a certificate mesh generates at the service's
//! first apply and keeps while the service exists:
//! `<stack>/.mesh/<env>/services/<name>/tls/cert.pem` (subject alternative
//! names `127.0.0.1` and `localhost`) and `key.pem` (0600, in a 0700
//! folder). Plans and bundle digests hold their paths only, never the key.
//!
//! A service enriching from a TLS service calls it at `https://` and trusts
//! exactly that certificate (its lookup's `ca_file`); `mesh output` shows
//! the certificate's path, for `curl --cacert`.

use std::path::{Path, PathBuf};

use mesh_runtime::config as rc;

use super::state_dir;
use crate::stack::{Stack, Tls};

/// Does `service` serve HTTPS here (one of its exposures asks for it; the
/// stack loader made sure all of them do then)?
pub fn served(stack: &Stack, service: &str) -> bool {
    stack
        .exposes
        .values()
        .any(|e| e.service == service && e.tls == Some(Tls::SelfSigned))
}

/// `http` or `https`, as `service` is served.
pub fn scheme(stack: &Stack, service: &str) -> &'static str {
    if served(stack, service) {
        "https"
    } else {
        "http"
    }
}

/// The folder of a service's certificate and key (absolute, as the access
/// keys' folder: a config is the same whatever folder mesh runs from).
pub fn dir_at(root: &Path, env: &str, service: &str) -> PathBuf {
    let root = std::fs::canonicalize(root).unwrap_or_else(|_| root.to_path_buf());
    state_dir(&root, env)
        .join("services")
        .join(service)
        .join("tls")
}

/// The certificate of a service served over TLS (what its callers trust).
pub fn cert_file(dir: &Path) -> PathBuf {
    dir.join("cert.pem")
}

fn key_file(dir: &Path) -> PathBuf {
    dir.join("key.pem")
}

/// Sets what `config` serves with and, for its lookups of TLS services,
/// which certificate each trusts (their urls are `https://` already).
pub fn configure(stack: &Stack, service: &str, config: &mut rc::ServiceConfig) {
    if served(stack, service) {
        let dir = dir_at(&stack.root, &stack.env.name, service);
        config.tls = Some(rc::TlsFiles {
            cert: cert_file(&dir),
            key: key_file(&dir),
        });
    }
    let svc = stack.services.get(service);
    for (name, ep) in config.endpoints.iter_mut() {
        let Some(declared) = svc.and_then(|s| s.endpoints.get(name)) else {
            continue;
        };
        for (cfg, en) in ep
            .all_enrichments_mut()
            .into_iter()
            .zip(declared.all_enrichments())
        {
            if let (Some(lookup), crate::stack::EnrichmentSource::Lookup { service: up, .. }) =
                (cfg.lookup.as_mut(), &en.source)
                && served(stack, up)
            {
                lookup.ca_file = Some(cert_file(&dir_at(&stack.root, &stack.env.name, up)));
            }
        }
    }
}

/// Makes the certificate and key `config` serves with, and those its
/// lookups trust, when they do not exist yet (a certificate is kept: the
/// callers trust it).
pub fn ensure(config: &rc::ServiceConfig) -> Result<(), String> {
    let trusted = config
        .endpoints
        .values()
        .flat_map(rc::EndpointConfig::all_enrichments)
        .filter_map(|en| en.lookup.as_ref()?.ca_file.as_deref());
    for cert in config.tls.iter().map(|t| t.cert.as_path()).chain(trusted) {
        if let Some(dir) = cert.parent().filter(|_| !cert.exists()) {
            generate(dir)?;
        }
    }
    Ok(())
}

/// A self-signed certificate for `127.0.0.1` and `localhost`, and its key,
/// written into a private folder made beside `dir` and renamed to it, so
/// two applies never see half a pair (the second one keeps the first's).
fn generate(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let failed = |what: &str, e: &dyn std::fmt::Display| {
        format!(
            "making the TLS certificate in {}: {what}: {e}",
            dir.display()
        )
    };
    let names = vec!["127.0.0.1".to_owned(), "localhost".to_owned()];
    let certified =
        rcgen::generate_simple_self_signed(names).map_err(|e| failed("generating", &e))?;
    let parent = dir.parent().ok_or_else(|| failed("no parent", &"/"))?;
    std::fs::create_dir_all(parent).map_err(|e| failed("creating", &e))?;
    let tmp = parent.join(format!(".tls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&tmp)
        .map_err(|e| failed("creating", &e))?;
    let write = |path: PathBuf, mode: u32, text: String| {
        use std::io::Write;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&path)
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .map_err(|e| failed("writing", &e))
    };
    write(key_file(&tmp), 0o600, certified.signing_key.serialize_pem())?;
    write(cert_file(&tmp), 0o644, certified.cert.pem())?;
    match std::fs::rename(&tmp, dir) {
        Ok(()) => Ok(()),
        // Another apply made it first: keep that one.
        Err(_) if cert_file(dir).exists() => {
            let _ = std::fs::remove_dir_all(&tmp);
            Ok(())
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(failed("renaming", &e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_certificate_is_made_once_with_a_private_key() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("services/s/tls");
        let config = |dir: &Path| -> rc::ServiceConfig {
            serde_json::from_value(serde_json::json!({
                "service": "s", "endpoints": {},
                "tls": { "cert": cert_file(dir), "key": key_file(dir) },
            }))
            .expect("config")
        };
        ensure(&config(&dir)).expect("made");
        let cert = std::fs::read_to_string(cert_file(&dir)).expect("cert");
        assert!(cert.starts_with("-----BEGIN CERTIFICATE-----"), "{cert}");
        let mode = |p: PathBuf| std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode(key_file(&dir)), 0o600);
        assert_eq!(mode(dir.clone()), 0o700);
        // Kept on the next apply: callers trust it.
        ensure(&config(&dir)).expect("kept");
        assert_eq!(
            std::fs::read_to_string(cert_file(&dir)).expect("cert"),
            cert
        );
        // And it serves: the runtime's own TLS configuration takes the pair.
        mesh_runtime::tls::server_config(&cert_file(&dir), &key_file(&dir)).expect("serves");
    }
}
