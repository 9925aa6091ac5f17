//! The local target: each service is a `mesh-runtime` process on a loopback
//! port, detached so it outlives the `mesh` command; its bundle (service
//! config, model, datasets) is staged under `<stack>/.mesh/<env>/`.
//!
//! Live state is read from what actually runs: the recorded process must be
//! alive, be a `mesh-runtime`, and answer `/readyz` on its port; the bundle
//! digest it was started with is recorded beside it, and a keyed digest of
//! the secrets it was given ([`secrets`]). So a killed process, an edited
//! dataset or a changed password shows up in `plan`.
//!
//! Ports: see [`ports`]; the ports services run on are read back from their
//! state, so desired state reads local state too (and probes which ports
//! are free).
//!
//! An update starts the new runtime beside the old one — on the same port,
//! shared with SO_REUSEPORT (`mesh-runtime serve --handover`), accepting only
//! once ready — and stops the old one after, which finishes its in-flight
//! requests: no connection is refused. Runtimes start with a clean
//! environment (see [`RUNTIME_ENV`]); secrets reach them in files.

pub mod ports;
pub mod secrets;
mod tls;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use mesh_runtime::config as rc;
use serde::{Deserialize, Serialize};

use super::wait::{Every, Polled, Report, Wait, poll_until};
use super::{ApplyContext, Provider, ProviderError};
use crate::bundle::{bundle_digest, bundle_for, split_out, split_text};
use crate::output::Outputs;
use crate::plan::{Action, Change};
use crate::resource::{Address, Desired, Live, ProviderId, Scope, Value};
use crate::stack::{self, Caller, Endpoint, EnrichmentSource, Stack};

/// Kinds this provider manages.
pub const SERVICE_KIND: &str = "local_service";
pub const EXPOSE_KIND: &str = "local_expose";

/// How long a service may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// After a new runtime took a port over, how long the old one keeps
/// accepting what the kernel queued for it before the switch.
const HANDOVER_GRACE: Duration = Duration::from_millis(250);
/// A service's generation weights (`services/<name>/split.json`), outside
/// its bundle: the runtime re-reads it (see `bundle::split_out`).
const SPLIT_FILE: &str = "split.json";
/// A service's query log when the stack names no file
/// (`services/<name>/queries.jsonl`).
const QUERY_LOG_FILE: &str = "queries.jsonl";
/// How long an apply waits for a runtime to take up a new split.
const SPLIT_TIMEOUT: Duration = Duration::from_secs(15);

/// The only variables of mesh's environment a runtime gets (when set): none
/// carries a secret. Cloud credentials and the like stay with mesh.
pub const RUNTIME_ENV: &[&str] = &["RUST_LOG", "RUST_BACKTRACE", "TZ"];

/// The local provider.
pub struct LocalProvider {
    runtime_bin: PathBuf,
}

/// What is recorded for a running service (`services/<name>/state.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ServiceState {
    address: Address,
    pid: u32,
    port: u16,
    version: String,
    bundle_digest: String,
    /// Keyed digest of the secrets it was given (see [`secrets`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    secrets_digest: Option<String>,
    started_at: u64,
    /// Its folder under `services/<name>/` (bundle, secrets, log).
    #[serde(default)]
    generation: String,
    /// The certificate it serves HTTPS with (see [`tls`]); none: plain HTTP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tls_cert: Option<PathBuf>,
    /// The runtime it is taking over from, until that one has stopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    previous: Option<Previous>,
}

/// A runtime being replaced.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Previous {
    pid: u32,
    #[serde(default)]
    generation: String,
}

/// What is recorded for an exposure (`exposes/<name>.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ExposeState {
    address: Address,
    service: String,
    port: u16,
    allow: Vec<String>,
    /// The operator's key when callers must present one (see [`access`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key_file: Option<PathBuf>,
    /// The certificate its service serves HTTPS with (see [`tls`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tls_cert: Option<PathBuf>,
}

impl LocalProvider {
    /// Finds the runtime binary: `MESH_RUNTIME_BIN`, then `mesh-runtime`
    /// beside the running executable, then on `PATH`.
    pub fn new() -> Result<Self, ProviderError> {
        Ok(LocalProvider {
            runtime_bin: find_runtime()?,
        })
    }
}

fn find_runtime() -> Result<PathBuf, ProviderError> {
    if let Some(p) = std::env::var_os("MESH_RUNTIME_BIN") {
        return Ok(PathBuf::from(p));
    }
    if let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe.parent()
    {
        for candidate in [dir.join("mesh-runtime"), dir.join("../mesh-runtime")] {
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let c = dir.join("mesh-runtime");
            if c.is_file() {
                return Ok(c);
            }
        }
    }
    Err(ProviderError::Invalid {
        address: Address::new("provider.local"),
        message: "cannot find the mesh-runtime binary; build it with `cargo build --release -p mesh-runtime`, or set MESH_RUNTIME_BIN".into(),
    })
}

/// The state folder of a stack and environment.
pub fn state_dir(root: &Path, env: &str) -> PathBuf {
    root.join(".mesh").join(env)
}

/// The state a service was recorded with (`services/<name>/state.json`), by service.
fn recorded_states(root: &Path, env: &str) -> BTreeMap<String, ServiceState> {
    let mut out = BTreeMap::new();
    if let Ok(entries) = std::fs::read_dir(state_dir(root, env).join("services")) {
        for e in entries.flatten() {
            if let Some(st) = read_state(&e.path()) {
                out.insert(e.file_name().to_string_lossy().into_owned(), st);
            }
        }
    }
    out
}

fn read_state(service_dir: &Path) -> Option<ServiceState> {
    let text = std::fs::read_to_string(service_dir.join("state.json")).ok()?;
    serde_json::from_str(&text).ok()
}

fn write_state(service_dir: &Path, st: &ServiceState) -> Result<(), ProviderError> {
    let tmp = service_dir.join("state.json.new");
    std::fs::write(&tmp, serde_json::to_vec_pretty(st).unwrap_or_default())
        .and_then(|()| std::fs::rename(&tmp, service_dir.join("state.json")))
        .map_err(io("writing state.json"))
}

/// The loopback port of every service (see [`ports`]): an explicit
/// `node_port`, else the port it runs on, else a new free one. A recorded
/// port is given up only when its service is down and another program took it.
pub fn service_ports(stack: &Stack) -> BTreeMap<String, u16> {
    let recorded: BTreeMap<String, u16> = recorded_states(&stack.root, &stack.env.name)
        .into_iter()
        .filter(|(_, st)| runtime_alive(st.pid) || port_free_now(st.port))
        .map(|(name, st)| (name, st.port))
        .collect();
    ports::allocate(stack, &recorded, &port_free_now)
}

/// Access between services on loopback, where every caller has the same
/// address: an exposure whose `allow` admits no loopback address (only
/// services, or CIDRs without 127.0.0.1) makes its service demand a key. mesh
/// makes one key per allowed caller service, handed to that caller's
/// enrichments, and one for the operator on this machine
/// (`mesh output` shows where it is). Keys are random, made at apply time,
/// kept under `<stack>/.mesh/<env>/access/<service>/<caller>` (mode 0600) and
/// referenced by path, so plans and bundle digests never contain them.
pub mod access {
    use super::*;

    /// Who may call `service` from this machine: `None` when anyone may
    /// (no exposure, or one that admits a loopback address), else the
    /// allowed caller services.
    pub fn restricted_to(stack: &Stack, service: &str) -> Option<BTreeSet<String>> {
        let exposes: Vec<&stack::Expose> = stack
            .exposes
            .values()
            .filter(|e| e.service == service)
            .collect();
        let loopback = std::net::Ipv4Addr::LOCALHOST;
        let open = exposes.is_empty()
            || exposes.iter().any(|e| {
                e.allow
                    .iter()
                    .any(|c| matches!(c, Caller::Cidr(n) if n.contains(&loopback)))
            });
        (!open).then(|| {
            exposes
                .iter()
                .flat_map(|e| &e.allow)
                .filter_map(|c| match c {
                    Caller::Service(s) => Some(s.clone()),
                    Caller::Cidr(_) => None,
                })
                .collect()
        })
    }

    /// `<stack>/.mesh/<env>/access` (absolute, so a service's config is the
    /// same whatever folder mesh runs from).
    pub fn dir(stack: &Stack) -> PathBuf {
        dir_at(&stack.root, &stack.env.name)
    }

    /// [`dir`] for a stack root and environment.
    pub fn dir_at(root: &Path, env: &str) -> PathBuf {
        let root = std::fs::canonicalize(root).unwrap_or_else(|_| root.to_path_buf());
        state_dir(&root, env).join("access")
    }

    /// The operator's identity: the person at this machine (`mesh output`).
    pub const OPERATOR: &str = "operator";

    /// The key `caller` (a service, or [`OPERATOR`]) presents: `keys/<caller>`.
    pub fn key_file(dir: &Path, caller: &str) -> PathBuf {
        dir.join("keys").join(caller)
    }

    /// What a service verifies `caller`'s key with: `verifiers/<caller>`,
    /// one `hmac-sha256:` line per key of the caller's (see
    /// `mesh_runtime::auth`), never the key itself.
    pub fn verifier_file(dir: &Path, caller: &str) -> PathBuf {
        dir.join("verifiers").join(caller)
    }

    /// Every identity of the mesh when a service is restricted: the
    /// operator and each service (none otherwise).
    pub fn identities(stack: &Stack) -> Vec<String> {
        let any = stack
            .services
            .keys()
            .any(|s| restricted_to(stack, s).is_some());
        if !any {
            return Vec::new();
        }
        std::iter::once(OPERATOR.to_owned())
            .chain(stack.services.keys().cloned())
            .collect()
    }

    /// Adds the callers `service` accepts (the operator and the allowed
    /// services), the identities it recognises and refuses (every other
    /// one, so their calls are 403, not 401), and the key its enrichments
    /// present (its own). `dir` is [`dir`]`(stack)`, worked out once per plan.
    pub fn configure(
        stack: &Stack,
        dir: &Path,
        svc: &stack::Service,
        config: &mut rc::ServiceConfig,
    ) {
        if let Some(callers) = restricted_to(stack, &svc.name) {
            for caller in identities(stack) {
                let key = rc::CallerKey {
                    verifier: rc::SecretRef::File(verifier_file(dir, &caller)),
                    caller,
                };
                if key.caller == OPERATOR || callers.contains(&key.caller) {
                    config.api_keys.push(rc::ApiKey::Caller(key));
                } else {
                    config.known_callers.push(key);
                }
            }
        }
        for (name, ep) in &svc.endpoints {
            let Some(configured) = config.endpoints.get_mut(name) else {
                continue;
            };
            for (en, cfg) in ep
                .all_enrichments()
                .into_iter()
                .zip(configured.all_enrichments_mut())
            {
                if let (EnrichmentSource::Lookup { service, .. }, Some(lookup)) =
                    (&en.source, cfg.lookup.as_mut())
                    && let Some(callers) = restricted_to(stack, service)
                {
                    if !callers.contains(&svc.name) {
                        eprintln!(
                            "warning: service.{}: it enriches from {service}, whose exposure does not allow it: its lookups will be refused (add \"{}\" to the exposure's `allow`)",
                            svc.name, svc.name
                        );
                    }
                    lookup.api_key = Some(rc::SecretRef::File(key_file(dir, &svc.name)));
                }
            }
        }
    }

    /// The identity whose key or verifier `r` is, if it is one of `dir`'s.
    fn identity_of(dir: &Path, r: &rc::SecretRef) -> Option<String> {
        let rc::SecretRef::File(path) = r else {
            return None;
        };
        let rest = path
            .strip_prefix(dir.join("keys"))
            .or_else(|_| path.strip_prefix(dir.join("verifiers")))
            .ok()?;
        Some(rest.to_str()?.to_owned()).filter(|c| !c.contains('/'))
    }

    /// Makes the key and verifier of every identity under `dir` that
    /// `config` names and that does not have them yet. One at a time: the
    /// services of an apply start side by side, and each key must be made
    /// once, its verifier from it.
    pub fn ensure_keys(dir: &Path, config: &rc::ServiceConfig) -> std::io::Result<()> {
        static MAKING: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _one = MAKING.lock().unwrap_or_else(|e| e.into_inner());
        let mut config = config.clone();
        let callers: BTreeSet<String> = config
            .secrets_mut()
            .filter_map(|r| identity_of(dir, r))
            .collect();
        for caller in callers {
            let key = key_file(dir, &caller);
            if !key.exists() {
                std::fs::create_dir_all(dir.join("keys"))?;
                secrets::replace_private(&key, hex::encode(secrets::random_key()?).as_bytes())?;
            }
            let verifier = verifier_file(dir, &caller);
            if !verifier.exists() {
                std::fs::create_dir_all(dir.join("verifiers"))?;
                let key = std::fs::read_to_string(&key)?;
                let line = mesh_runtime::auth::verifier(&caller, key.trim_end());
                secrets::replace_private(&verifier, line.as_bytes())?;
            }
        }
        Ok(())
    }

    /// How long after a key file changes every runtime has read it again
    /// (they read them at most `mesh_runtime::auth::RELOAD` old).
    const SETTLE: Duration = Duration::from_millis(2 * 1000 + 500);

    /// Gives every identity under `dir` a new key without refusing a call:
    /// each verifier first accepts the new key beside the old one, then
    /// each caller presents the new key, then the verifiers drop the old
    /// one, waiting [`SETTLE`] after each step for the runtimes to read it.
    /// Returns the identities rotated.
    pub async fn rotate(dir: &Path, progress: impl Fn(&str)) -> std::io::Result<Vec<String>> {
        let mut callers = Vec::new();
        match std::fs::read_dir(dir.join("keys")) {
            Ok(listed) => {
                for entry in listed {
                    callers.push(entry?.file_name().to_string_lossy().into_owned());
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let mut fresh = Vec::new();
        for caller in callers.into_iter().filter(|c| !c.starts_with('.')) {
            let old = std::fs::read_to_string(key_file(dir, &caller))?;
            let new = hex::encode(secrets::random_key()?);
            let both = [old.trim_end(), new.as_str()]
                .map(|k| mesh_runtime::auth::verifier(&caller, k))
                .join("\n");
            secrets::replace_private(&verifier_file(dir, &caller), both.as_bytes())?;
            fresh.push((caller, new));
        }
        fresh.sort();
        progress("new keys accepted beside the old ones");
        tokio::time::sleep(SETTLE).await;
        for (caller, new) in &fresh {
            secrets::replace_private(&key_file(dir, caller), new.as_bytes())?;
        }
        progress("callers present the new keys");
        tokio::time::sleep(SETTLE).await;
        for (caller, new) in &fresh {
            let line = mesh_runtime::auth::verifier(caller, new);
            secrets::replace_private(&verifier_file(dir, caller), line.as_bytes())?;
        }
        tokio::time::sleep(SETTLE).await;
        progress("old keys refused");
        Ok(fresh.into_iter().map(|(c, _)| c).collect())
    }
}

/// A planned service's runtime config and the files of its bundle (bundle
/// path → source), as `desired()` recorded them.
fn bundle_of(d: &Desired) -> Result<(rc::ServiceConfig, BTreeMap<String, PathBuf>), ProviderError> {
    let invalid = |message: String| ProviderError::Invalid {
        address: d.address.clone(),
        message,
    };
    let json = d
        .attrs
        .get("_bundle")
        .and_then(|a| a.value.as_str())
        .ok_or_else(|| invalid("no bundle".into()))?;
    let config = serde_json::from_str(json).map_err(|e| invalid(format!("bundle: {e}")))?;
    let files = serde_json::from_str(
        d.attrs
            .get("_files")
            .and_then(|a| a.value.as_str())
            .unwrap_or("{}"),
    )
    .unwrap_or_default();
    Ok((config, files))
}

/// Copies a bundle's files (bundle path → source) under `bundle`.
fn copy_files(files: &BTreeMap<String, PathBuf>, bundle: &Path) -> Result<(), ProviderError> {
    for (rel, src) in files {
        let dst = bundle.join(rel);
        if let Some(parent) = dst.parent() {
            std::fs::create_dir_all(parent)
                .map_err(io(format!("creating {}", parent.display())))?;
        }
        std::fs::copy(src, &dst)
            .map_err(io(format!("copying {} into the bundle", src.display())))?;
    }
    Ok(())
}

/// How long `mesh-runtime check` or `freeze` may take to connect, query and
/// load a service's datasets.
const PREFLIGHT_TIMEOUT: Duration = Duration::from_secs(120);

/// A folder removed when dropped.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Loads `config`'s datasets that read a connection, with `mesh-runtime
/// check`, in a private temporary folder (secrets staged there, 0600, and
/// removed after): the connection must answer, the query run, the key
/// column be there. Endpoints, models and keys are left out (the stack
/// loader checked those): one lookup endpoint per dataset stands in. The
/// runtime's own message on failure.
async fn check_datasets(
    runtime_bin: &Path,
    config: &rc::ServiceConfig,
    files: &BTreeMap<String, PathBuf>,
) -> Result<(), String> {
    let mut check = rc::ServiceConfig {
        api_keys: Vec::new(),
        known_callers: Vec::new(),
        split_file: None,
        query_log: None,
        ..config.clone()
    };
    check
        .datasets
        .retain(|_, ds| matches!(ds.source, rc::DatasetSource::Sql(_)));
    for ds in check.datasets.values_mut() {
        if ds.mode == rc::DatasetMode::Bundle {
            ds.mode = rc::DatasetMode::Preload;
        }
    }
    if check.datasets.is_empty() {
        return Ok(());
    }
    // One lookup endpoint per dataset, so that the bundle is a service.
    check.endpoints = check
        .datasets
        .keys()
        .map(|name| {
            (
                format!("check-{name}"),
                rc::EndpointConfig::Lookup {
                    datasets: vec![name.clone()],
                },
            )
        })
        .collect();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|t| t.as_nanos())
        .unwrap_or_default();
    let tmp = TempDir(
        std::env::temp_dir().join(format!("mesh-preflight-{}-{nanos}", std::process::id())),
    );
    let bundle = tmp.0.join("bundle");
    let failed = |what: &str, e: &dyn std::fmt::Display| format!("{what}: {e}");
    std::fs::create_dir_all(&bundle).map_err(|e| failed("making a folder for the check", &e))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp.0, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| failed("making the check's folder private", &e))?;
    }
    let needed: BTreeMap<String, PathBuf> = files
        .iter()
        .filter(|(rel, _)| rel.starts_with("certs/"))
        .map(|(r, p)| (r.clone(), p.clone()))
        .collect();
    copy_files(&needed, &bundle).map_err(|e| e.to_string())?;
    secrets::stage(&mut check, &tmp.0.join("secrets")).map_err(|e| e.to_string())?;
    std::fs::write(
        bundle.join(rc::SERVICE_FILE),
        serde_json::to_vec_pretty(&check).unwrap_or_default(),
    )
    .map_err(|e| failed("writing the check's service.json", &e))?;
    let mut cmd = tokio::process::Command::new(runtime_bin);
    cmd.arg("check").arg("--bundle").arg(&bundle);
    run_runtime(cmd, "loading its datasets").await
}

/// Runs a `mesh-runtime` command to completion with a clean environment,
/// within [`PREFLIGHT_TIMEOUT`]; on failure, the message it logged.
async fn run_runtime(mut cmd: tokio::process::Command, what: &str) -> Result<(), String> {
    cmd.env_clear();
    for var in RUNTIME_ENV {
        if let Some(v) = std::env::var_os(var) {
            cmd.env(var, v);
        }
    }
    cmd.stdin(std::process::Stdio::null()).kill_on_drop(true);
    let out = tokio::time::timeout(PREFLIGHT_TIMEOUT, cmd.output())
        .await
        .map_err(|_| format!("{what}: not done within {}s", PREFLIGHT_TIMEOUT.as_secs()))?
        .map_err(|e| format!("{what}: cannot run mesh-runtime: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    // The runtime logs `<time> ERROR <message>` (the message may go on
    // over further lines).
    let stderr = String::from_utf8_lossy(&out.stderr);
    let message = stderr
        .split_once(" ERROR ")
        .map(|(_, m)| m.trim().to_owned())
        .unwrap_or_default();
    Err(if message.is_empty() {
        format!(
            "mesh-runtime check failed ({}): {}",
            out.status,
            stderr.trim()
        )
    } else {
        message
    })
}

fn allow_strings(e: &stack::Expose) -> Vec<String> {
    e.allow
        .iter()
        .map(|c| match c {
            Caller::Service(s) => format!("service.{s}"),
            Caller::Cidr(c) => c.to_string(),
        })
        .collect()
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> ProviderError {
    let context = context.into();
    move |source| ProviderError::Io { context, source }
}

/// Is `pid` alive and a mesh-runtime?
fn runtime_alive(pid: u32) -> bool {
    match std::fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(cmd) => {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // A zombie (state Z) is not alive.
            let zombie = stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
            !zombie && String::from_utf8_lossy(&cmd).contains("mesh-runtime")
        }
        Err(_) => false,
    }
}

/// `GET path` on a loopback port, over HTTPS trusting only `tls_cert` when
/// given; the status code, if it answered.
pub async fn http_status(port: u16, path: &str, tls_cert: Option<&Path>) -> Option<u16> {
    http_get(port, path, tls_cert)
        .await
        .map(|(status, _)| status)
}

/// `GET path` on a loopback port (see [`http_status`]); status and body.
async fn http_get(port: u16, path: &str, tls_cert: Option<&Path>) -> Option<(u16, String)> {
    let fut = async {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        match tls_cert {
            None => get(tcp, path).await,
            Some(cert) => {
                let config = mesh_runtime::tls::client_config(&[cert]).ok()?;
                let s = mesh_runtime::tls::connect(config.into(), "127.0.0.1", tcp)
                    .await
                    .ok()?;
                get(s, path).await
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(2), fut)
        .await
        .ok()
        .flatten()
}

/// `GET path` on a connection (closed after); the status code and the body.
async fn get<S>(mut s: S, path: &str) -> Option<(u16, String)>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .ok()?;
    let mut buf = Vec::new();
    // A TLS peer may close without `close_notify`: what was read counts.
    let _ = s.read_to_end(&mut buf).await;
    let text = String::from_utf8_lossy(&buf);
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Some((status, body))
}

/// Whether a runtime's `/metrics` shows every weight of `split` in force
/// (`mesh_generation_weight{endpoint="E",generation="G"} W`).
fn split_in_force(metrics: &str, split: &rc::SplitFile) -> bool {
    split.iter().all(|(endpoint, weights)| {
        weights.iter().all(|(generation, weight)| {
            let series = format!(
                "mesh_generation_weight{{endpoint=\"{endpoint}\",generation=\"{generation}\"}}"
            );
            metrics.lines().any(|l| {
                l.strip_prefix(&series)
                    .and_then(|v| v.trim().parse::<f64>().ok())
                    .is_some_and(|v| v == f64::from(*weight))
            })
        })
    })
}

fn signal(pid: u32, sig: &str) {
    let _ = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stderr(std::process::Stdio::null())
        .status();
}

/// Stops a runtime: TERM, then KILL if it still runs after 10 s.
async fn stop_process(pid: u32) {
    if !runtime_alive(pid) {
        return;
    }
    signal(pid, "TERM");
    if !exited(pid, Duration::from_millis(50), Duration::from_secs(10)).await {
        signal(pid, "KILL");
        exited(pid, Duration::from_millis(20), Duration::MAX).await;
    }
}

/// Whether the runtime `pid` is gone within `timeout`, looking `every` so often.
async fn exited(pid: u32, every: Duration, timeout: Duration) -> bool {
    let wait = Wait {
        what: "the runtime to exit",
        timeout,
        every: Every::fixed(every),
        report: Report::Nothing,
    };
    poll_until(&wait, None, || async {
        Ok::<_, std::convert::Infallible>(if runtime_alive(pid) {
            Polled::Pending("running")
        } else {
            Polled::Done(())
        })
    })
    .await
    .is_ok()
}

async fn port_free(port: u16) -> bool {
    tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .is_ok()
}

/// [`port_free`], for plan time.
fn port_free_now(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// Can a runtime started with `--handover` join whoever listens on `port`
/// (they bound it with SO_REUSEPORT, as the same user)? A runtime started
/// before handovers existed cannot be joined; it must stop first.
fn port_joinable(port: u16) -> bool {
    tokio::net::TcpSocket::new_v4()
        .and_then(|s| {
            s.set_reuseaddr(true)?;
            s.set_reuseport(true)?;
            s.bind(std::net::SocketAddr::from(([127, 0, 0, 1], port)))
        })
        .is_ok()
}

/// Removes `dir`, if it exists.
fn remove_dir(dir: &Path) -> Result<(), ProviderError> {
    std::fs::remove_dir_all(dir)
        .or_else(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Ok(())
            } else {
                Err(e)
            }
        })
        .map_err(io(format!("removing {}", dir.display())))
}

impl LocalProvider {
    fn service_dir(scope: &Scope, name: &str) -> PathBuf {
        state_dir(&scope.root, &scope.env)
            .join("services")
            .join(name)
    }

    /// Starts the service's runtime and waits until it is ready; a runtime
    /// already running is replaced without refusing a connection (see the
    /// module doc) and keeps serving if the new one fails.
    async fn apply_service(
        &self,
        d: &Desired,
        live: Option<&Live>,
        ctx: &ApplyContext,
    ) -> Result<Live, ProviderError> {
        let name = d.address.as_str().trim_start_matches("service.").to_owned();
        let dir = Self::service_dir(&ctx.scope, &name);
        let invalid = |message: &str| ProviderError::Invalid {
            address: d.address.clone(),
            message: message.into(),
        };
        let port = d
            .attrs
            .get("port")
            .and_then(|a| a.value.as_int())
            .and_then(|p| u16::try_from(p).ok())
            .ok_or_else(|| invalid("no port"))?;
        let (desired_config, files) = bundle_of(d)?;
        let split = d.attrs.get("_split").and_then(|a| a.value.as_str());
        if let (Some(split), Some(live)) = (split, live)
            && only_split_changed(d, live)
            && let Some(st) =
                read_state(&dir).filter(|st| st.previous.is_none() && runtime_alive(st.pid))
        {
            // The runtime re-reads its split file: nothing restarts.
            ctx.progress(
                &d.address,
                &format!("new split, pid {} keeps serving", st.pid),
            );
            write_split(&dir, split)?;
            self.wait_split(d, ctx, &st, split).await?;
            return Ok(live_service(&st, true).attr("split", d.attrs["split"].value.clone()));
        }
        if let Some(split) = split {
            write_split(&dir, split)?;
        }

        // What runs now (recorded by us). A runtime left over from an
        // interrupted handover goes first.
        let mut old = read_state(&dir);
        if let Some(prev) = old.as_mut().and_then(|st| st.previous.take()) {
            ctx.progress(&d.address, &format!("stopping pid {}", prev.pid));
            stop_process(prev.pid).await;
        }
        if old.is_none()
            && let Some(pid) = live.and_then(|l| l.id.parse::<u32>().ok())
        {
            stop_process(pid).await;
        }
        let mut handover = old.filter(|st| runtime_alive(st.pid));
        if let Some(o) = &handover
            && o.port == port
            && !port_joinable(port)
        {
            // Started before handovers existed: it cannot share its port.
            ctx.progress(
                &d.address,
                &format!("stopping pid {} (it cannot hand its port over)", o.pid),
            );
            stop_process(o.pid).await;
            handover = None;
        }
        if handover.as_ref().is_none_or(|o| o.port != port) && !port_free(port).await {
            return Err(ProviderError::Api {
                address: d.address.clone(),
                message: format!(
                    "port 127.0.0.1:{port} is taken by another program; stop it or choose another node_port"
                ),
            });
        }

        // Stage the bundle in a folder of its own: the old runtime keeps its own.
        let generation = format!(
            "gen-{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|t| t.as_nanos())
                .unwrap_or_default()
        );
        let gen_dir = dir.join(&generation);
        let bundle = gen_dir.join("bundle");
        std::fs::create_dir_all(&bundle).map_err(io(format!("creating {}", bundle.display())))?;
        copy_files(&files, &bundle)?;
        // The keys it accepts or presents (see `access`), made on first use.
        let access_dir = access::dir_at(&ctx.scope.root, &ctx.scope.env);
        access::ensure_keys(&access_dir, &desired_config).map_err(io(format!(
            "making access keys under {}",
            access_dir.display()
        )))?;
        // The certificate it serves with and those it trusts (see `tls`).
        tls::ensure(&desired_config).map_err(|message| ProviderError::Api {
            address: d.address.clone(),
            message,
        })?;
        let tls_cert = desired_config.tls.as_ref().map(|t| t.cert.clone());
        // Its secrets: digested as the plan does, handed over in files.
        let secrets_digest = if secrets::any(&desired_config, &access_dir) {
            let key = secrets::ensure_key(&dir)
                .map_err(io(format!("making the secrets key in {}", dir.display())))?;
            Some(secrets::digest(&key, &desired_config, &access_dir))
        } else {
            None
        };
        let mut config = desired_config;
        secrets::stage(&mut config, &gen_dir.join("secrets")).map_err(|e| {
            ProviderError::Invalid {
                address: d.address.clone(),
                message: e.to_string(),
            }
        })?;
        std::fs::write(
            bundle.join(rc::SERVICE_FILE),
            serde_json::to_vec_pretty(&config).unwrap_or_default(),
        )
        .map_err(io("writing service.json"))?;
        if config
            .datasets
            .values()
            .any(|ds| ds.mode == rc::DatasetMode::Bundle)
        {
            ctx.progress(&d.address, "freezing query results into the bundle");
            self.freeze(&bundle)
                .await
                .map_err(|message| ProviderError::Api {
                    address: d.address.clone(),
                    message,
                })?;
        }

        // Start detached: its own process group, output to a log file, an
        // environment of its own.
        let log_path = gen_dir.join("runtime.log");
        let ready_path = gen_dir.join("ready");
        let log = std::fs::File::create(&log_path)
            .map_err(io(format!("creating {}", log_path.display())))?;
        let log2 = log.try_clone().map_err(io("log file"))?;
        let mut cmd = std::process::Command::new(&self.runtime_bin);
        cmd.arg("serve")
            .arg("--bundle")
            .arg(&bundle)
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--handover")
            .arg("--ready-file")
            .arg(&ready_path);
        cmd.env_clear();
        for var in RUNTIME_ENV {
            if let Some(v) = std::env::var_os(var) {
                cmd.env(var, v);
            }
        }
        cmd.stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(log2);
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
        match &handover {
            Some(o) if o.port == port => ctx.progress(
                &d.address,
                &format!("starting on 127.0.0.1:{port} beside pid {}", o.pid),
            ),
            _ => ctx.progress(&d.address, &format!("starting on 127.0.0.1:{port}")),
        }
        let mut child = cmd
            .spawn()
            .map_err(io(format!("starting {}", self.runtime_bin.display())))?;

        let mut state = ServiceState {
            address: d.address.clone(),
            pid: child.id(),
            port,
            version: d
                .attrs
                .get("version")
                .and_then(|a| a.value.as_str())
                .unwrap_or_default()
                .to_owned(),
            bundle_digest: d
                .attrs
                .get("bundle_digest")
                .and_then(|a| a.value.as_str())
                .unwrap_or_default()
                .to_owned(),
            secrets_digest,
            started_at: crate::lock::now(),
            generation,
            tls_cert: tls_cert.clone(),
            previous: handover.as_ref().map(|o| Previous {
                pid: o.pid,
                generation: o.generation.clone(),
            }),
        };
        write_state(&dir, &state)?;

        if let Err(e) = self
            .wait_ready(
                d,
                ctx,
                &mut child,
                (port, tls_cert.as_deref()),
                &ready_path,
                &log_path,
            )
            .await
        {
            // The old runtime, if any, keeps serving and stays recorded.
            let _ = child.kill();
            let _ = child.wait();
            if let Some(o) = &handover {
                let mut o = o.clone();
                o.previous = None;
                write_state(&dir, &o)?;
            }
            return Err(e);
        }
        // The process outlives us (init reaps it once we exit).
        drop(child);

        if let Some(o) = handover {
            ctx.progress(&d.address, &format!("stopping pid {} (drains)", o.pid));
            tokio::time::sleep(HANDOVER_GRACE).await;
            stop_process(o.pid).await;
            state.previous = None;
            write_state(&dir, &state)?;
        }
        // Folders of runtimes gone (and the layout before generations).
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                let n = e.file_name();
                let n = n.to_string_lossy();
                if (n.starts_with("gen-") && n != state.generation) || n == "bundle" {
                    remove_dir(&e.path())?;
                } else if n == "runtime.log" {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        Ok(live_service(&state, true))
    }

    /// Waits until the runtime of `st` has taken up `split` (its
    /// `/metrics`), which it does within about a second of the file's change.
    async fn wait_split(
        &self,
        d: &Desired,
        ctx: &ApplyContext,
        st: &ServiceState,
        split: &str,
    ) -> Result<(), ProviderError> {
        let invalid = |message: String| ProviderError::Invalid {
            address: d.address.clone(),
            message,
        };
        let want: rc::SplitFile =
            serde_json::from_str(split).map_err(|e| invalid(format!("split: {e}")))?;
        let wait = Wait {
            what: "the runtime to take up the new split",
            timeout: SPLIT_TIMEOUT,
            every: Every::fixed(Duration::from_millis(100)),
            report: Report::Nothing,
        };
        poll_until(&wait, Some((ctx, &d.address)), || async {
            Ok(
                match http_get(st.port, "/metrics", st.tls_cert.as_deref()).await {
                    Some((200, metrics)) if split_in_force(&metrics, &want) => Polled::Done(()),
                    Some((200, _)) => Polled::Pending("the old split in force"),
                    _ => Polled::Pending("no answer on /metrics"),
                },
            )
        })
        .await
        .map_err(|w| {
            w.into_error(&d.address, SPLIT_TIMEOUT, |last| {
                let log = Self::service_dir(
                    &ctx.scope,
                    d.address.as_str().trim_start_matches("service."),
                )
                .join(&st.generation)
                .join("runtime.log");
                format!("pid {}: {last} (its log: {})", st.pid, log.display())
            })
        })
    }

    /// Runs `mesh-runtime freeze` on a staged bundle (clean environment,
    /// bounded); its message on failure.
    async fn freeze(&self, bundle: &Path) -> Result<(), String> {
        let mut cmd = tokio::process::Command::new(&self.runtime_bin);
        cmd.arg("freeze").arg("--bundle").arg(bundle);
        run_runtime(cmd, "freezing its query datasets").await
    }

    /// Waits until the runtime just started is ready: alive, its ready file
    /// written (it accepts on its port), and `/readyz` answering there.
    async fn wait_ready(
        &self,
        d: &Desired,
        ctx: &ApplyContext,
        child: &mut std::process::Child,
        (port, tls_cert): (u16, Option<&Path>),
        ready_path: &Path,
        log_path: &Path,
    ) -> Result<(), ProviderError> {
        let wait = Wait {
            what: "the runtime to be ready",
            timeout: READY_TIMEOUT,
            every: Every::fixed(Duration::from_millis(25)),
            report: Report::Note("still loading"),
        };
        poll_until(&wait, Some((ctx, &d.address)), || {
            let exited = !matches!(child.try_wait(), Ok(None));
            async move {
                if exited {
                    let tail = std::fs::read_to_string(log_path).unwrap_or_default();
                    let tail: Vec<&str> = tail.lines().rev().take(5).collect();
                    return Err(ProviderError::Api {
                        address: d.address.clone(),
                        message: format!(
                            "mesh-runtime exited during start; last log lines ({}):\n    {}",
                            log_path.display(),
                            tail.into_iter().rev().collect::<Vec<_>>().join("\n    ")
                        ),
                    });
                }
                let ready = ready_path.exists()
                    && http_status(port, "/readyz", tls_cert).await == Some(200);
                Ok(if ready {
                    Polled::Done(())
                } else {
                    Polled::Pending("starting")
                })
            }
        })
        .await
        .map_err(|w| {
            w.into_error(&d.address, READY_TIMEOUT, |_| {
                format!("see {}", log_path.display())
            })
        })
    }
}

/// Whether a running service differs from its desired state in its split
/// only (or not at all).
fn only_split_changed(d: &Desired, live: &Live) -> bool {
    live.attrs.get("running") == Some(&Value::Bool(true))
        && ["version", "port", "bundle_digest", "secrets"]
            .iter()
            .all(|k| d.attrs.get(*k).map(|a| &a.value) == live.attrs.get(*k))
}

/// The split in force of a service with generations (its `split.json`).
fn read_split(service_dir: &Path) -> Option<rc::SplitFile> {
    let text = std::fs::read_to_string(service_dir.join(SPLIT_FILE)).ok()?;
    serde_json::from_str(&text).ok()
}

/// Writes a service's split whole (a new file renamed over the old one), so
/// the runtime never reads half of it.
fn write_split(service_dir: &Path, split: &str) -> Result<(), ProviderError> {
    let tmp = service_dir.join(format!("{SPLIT_FILE}.tmp"));
    std::fs::create_dir_all(service_dir)
        .and_then(|()| std::fs::write(&tmp, split))
        .and_then(|()| std::fs::rename(&tmp, service_dir.join(SPLIT_FILE)))
        .map_err(io(format!(
            "writing {}",
            service_dir.join(SPLIT_FILE).display()
        )))
}

fn live_service(st: &ServiceState, running: bool) -> Live {
    let scheme = if st.tls_cert.is_some() {
        "https"
    } else {
        "http"
    };
    let url = format!("{scheme}://127.0.0.1:{}", st.port);
    let live = Live::new(
        st.address.clone(),
        SERVICE_KIND,
        ProviderId::Local,
        st.pid.to_string(),
    )
    .attr("version", st.version.clone())
    .attr("port", st.port)
    .attr("bundle_digest", st.bundle_digest.clone())
    .attr("running", running)
    .output("url", url)
    .output("port", st.port);
    match &st.secrets_digest {
        Some(d) => live.attr("secrets", Value::Sensitive { digest: d.clone() }),
        None => live,
    }
}

#[async_trait]
impl Provider for LocalProvider {
    fn id(&self) -> ProviderId {
        ProviderId::Local
    }

    /// Each exposure (`expose.NAME`): its loopback URL and port, and where
    /// this machine's key and the certificate to trust are.
    fn outputs(&self, stack: &Stack, live: &[Live]) -> Outputs {
        let mut out = Outputs::default();
        for (name, e) in &stack.exposes {
            let address = Address::of("expose", name);
            let Some(l) = live.iter().find(|l| l.address == address) else {
                continue;
            };
            if out.exposure(stack, e, l) {
                out.copy(
                    "expose",
                    name,
                    l,
                    &[
                        ("api_key_file", "api_key_file"),
                        ("certificate", "certificate"),
                    ],
                );
                if let Some(port) = l.attrs.get("port").and_then(crate::output::plain) {
                    out.set("expose", name, "port", port);
                }
            }
        }
        out
    }

    async fn rotate_keys(
        &self,
        _stack: &Stack,
        ctx: &ApplyContext,
    ) -> Result<Vec<String>, ProviderError> {
        let dir = access::dir_at(&ctx.scope.root, &ctx.scope.env);
        let at = Address::of("access", "keys");
        access::rotate(&dir, |step| ctx.progress(&at, step))
            .await
            .map_err(io(format!("rotating the keys under {}", dir.display())))
    }

    fn desired(&self, stack: &Stack) -> Result<Vec<Desired>, ProviderError> {
        let mut out = Vec::new();
        let access_dir = access::dir(stack);
        let ports = service_ports(stack);
        let port_of = |svc: &str| ports.get(svc).copied().unwrap_or_default();
        let url_of =
            |svc: &str| format!("{}://127.0.0.1:{}", tls::scheme(stack, svc), port_of(svc));
        let services_dir = state_dir(&stack.root, &stack.env.name).join("services");
        // Files the runtime opens itself (split, query log): absolute, as it
        // runs in a folder of its own.
        let runtime_dir =
            std::path::absolute(&services_dir).map_err(|e| ProviderError::Invalid {
                address: Address::of("stack", &stack.name),
                message: format!("locating {}: {e}", services_dir.display()),
            })?;
        for (name, svc) in &stack.services {
            let address = Address::of("service", name);
            let mut b = bundle_for(stack, svc, &url_of);
            access::configure(stack, &access_dir, svc, &mut b.config);
            tls::configure(stack, name, &mut b.config);
            let split = split_out(&mut b.config, runtime_dir.join(name).join(SPLIT_FILE));
            if let Some(q) = &mut b.config.query_log {
                // The stack's file, else beside the runtime's own log (kept
                // across updates).
                q.path = Some(match &q.path {
                    Some(p) => std::path::absolute(p).unwrap_or_else(|_| p.clone()),
                    None => runtime_dir.join(name).join(QUERY_LOG_FILE),
                });
            }
            let digest = bundle_digest(&b).map_err(|e| ProviderError::Invalid {
                address: address.clone(),
                message: format!("reading the bundle's files: {e}"),
            })?;
            let mut d = Desired::new(address, SERVICE_KIND, ProviderId::Local)
                .attr("version", svc.version.clone())
                .attr("port", port_of(name))
                .attr("bundle_digest", digest)
                .attr("running", true);
            if secrets::any(&b.config, &access_dir) {
                // Keyed by the service's own key, made at its first apply.
                let digest = match secrets::read_key(&services_dir.join(name)) {
                    Some(key) => Value::Sensitive {
                        digest: secrets::digest(&key, &b.config, &access_dir),
                    },
                    None => Value::Unknown,
                };
                d = d.attr("secrets", digest);
            }
            if let Some(split) = &split {
                // Not in the bundle: a weight change only rewrites the file.
                d = d.attr("split", split_text(split));
                d.attrs.insert(
                    "_split".into(),
                    crate::resource::Attr {
                        value: Value::Str(serde_json::to_string(split).unwrap_or_default()),
                        force_new: false,
                    },
                );
            }
            // Carried for apply only: `_` attributes are neither compared nor shown.
            d.attrs.insert(
                "_bundle".into(),
                crate::resource::Attr {
                    value: Value::Str(serde_json::to_string_pretty(&b.config).unwrap_or_default()),
                    force_new: false,
                },
            );
            d.attrs.insert(
                "_files".into(),
                crate::resource::Attr {
                    value: Value::Str(serde_json::to_string(&b.files).unwrap_or_default()),
                    force_new: false,
                },
            );
            for en in svc.endpoints.values().flat_map(Endpoint::all_enrichments) {
                if let EnrichmentSource::Lookup { service, .. } = &en.source {
                    d = d.depends(Address::of("service", service));
                }
            }
            out.push(d);
        }
        for (name, e) in &stack.exposes {
            let mut d = Desired::new(Address::of("expose", name), EXPOSE_KIND, ProviderId::Local)
                .attr("service", e.service.clone())
                .attr("port", port_of(&e.service))
                .attr("allow", Value::list_of_str(allow_strings(e)))
                .depends(Address::of("service", &e.service));
            if access::restricted_to(stack, &e.service).is_some() {
                let key = access::key_file(&access_dir, access::OPERATOR);
                d.attrs.insert(
                    "_key_file".into(),
                    crate::resource::Attr {
                        value: Value::Str(key.to_string_lossy().into_owned()),
                        force_new: false,
                    },
                );
            }
            if e.tls.is_some() {
                let dir = tls::dir_at(&stack.root, &stack.env.name, &e.service);
                d = d.attr("tls", "self_signed");
                d.attrs.insert(
                    "_tls_cert".into(),
                    crate::resource::Attr {
                        value: Value::Str(tls::cert_file(&dir).to_string_lossy().into_owned()),
                        force_new: false,
                    },
                );
            }
            out.push(d);
        }
        Ok(out)
    }

    async fn observe(&self, scope: &Scope) -> Result<Vec<Live>, ProviderError> {
        let dir = state_dir(&scope.root, &scope.env);
        let mut out = Vec::new();
        let mut checks = Vec::new();
        if let Ok(entries) = std::fs::read_dir(dir.join("services")) {
            for e in entries.flatten() {
                let Some(st) = read_state(&e.path()) else {
                    continue;
                };
                let split = read_split(&e.path());
                checks.push(tokio::spawn(async move {
                    let running = runtime_alive(st.pid)
                        && http_status(st.port, "/readyz", st.tls_cert.as_deref()).await
                            == Some(200);
                    let live = live_service(&st, running);
                    match split {
                        Some(split) => live.attr("split", split_text(&split)),
                        None => live,
                    }
                }));
            }
        }
        for c in checks {
            if let Ok(l) = c.await {
                out.push(l);
            }
        }
        if let Ok(entries) = std::fs::read_dir(dir.join("exposes")) {
            for e in entries.flatten() {
                let Ok(text) = std::fs::read_to_string(e.path()) else {
                    continue;
                };
                let Ok(st) = serde_json::from_str::<ExposeState>(&text) else {
                    continue;
                };
                out.push(live_expose(&st));
            }
        }
        out.sort_by(|a, b| a.address.cmp(&b.address));
        Ok(out)
    }

    async fn preflight(&self, change: &Change, _ctx: &ApplyContext) -> Result<(), ProviderError> {
        let (Some(d), SERVICE_KIND) = (&change.desired, change.kind.as_str()) else {
            return Ok(());
        };
        if change.action == Action::Delete {
            return Ok(());
        }
        let (config, files) = bundle_of(d)?;
        check_datasets(&self.runtime_bin, &config, &files)
            .await
            .map_err(|message| ProviderError::Invalid {
                address: d.address.clone(),
                message,
            })
    }

    async fn apply(
        &self,
        change: &Change,
        ctx: &ApplyContext,
    ) -> Result<Option<Live>, ProviderError> {
        let kind = change.kind.as_str();
        match (&change.action, kind) {
            (Action::NoOp, _) => Ok(change.live.clone()),
            (Action::Delete, SERVICE_KIND) => {
                let name = change.address.as_str().trim_start_matches("service.");
                let dir = Self::service_dir(&ctx.scope, name);
                if let Some(pid) = change.live.as_ref().and_then(|l| l.id.parse::<u32>().ok()) {
                    ctx.progress(&change.address, &format!("stopping pid {pid}"));
                    stop_process(pid).await;
                }
                // One left from an interrupted handover.
                if let Some(prev) = read_state(&dir).and_then(|st| st.previous) {
                    stop_process(prev.pid).await;
                }
                // Its bundle, and its identity (see `access`).
                let access_dir = access::dir_at(&ctx.scope.root, &ctx.scope.env);
                let gone = |r: std::io::Result<()>| match r {
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                    r => r,
                };
                gone(std::fs::remove_dir_all(&dir))
                    .map_err(io(format!("removing {}", dir.display())))?;
                for file in [
                    access::key_file(&access_dir, name),
                    access::verifier_file(&access_dir, name),
                ] {
                    gone(std::fs::remove_file(&file))
                        .map_err(io(format!("removing {}", file.display())))?;
                }
                Ok(None)
            }
            (_, SERVICE_KIND) => {
                let d = change
                    .desired
                    .as_ref()
                    .ok_or_else(|| ProviderError::Invalid {
                        address: change.address.clone(),
                        message: "no desired state".into(),
                    })?;
                self.apply_service(d, change.live.as_ref(), ctx)
                    .await
                    .map(Some)
            }
            (Action::Delete, EXPOSE_KIND) => {
                let name = change.address.as_str().trim_start_matches("expose.");
                let path = state_dir(&ctx.scope.root, &ctx.scope.env)
                    .join("exposes")
                    .join(format!("{name}.json"));
                std::fs::remove_file(&path)
                    .or_else(|e| {
                        if e.kind() == std::io::ErrorKind::NotFound {
                            Ok(())
                        } else {
                            Err(e)
                        }
                    })
                    .map_err(io(format!("removing {}", path.display())))?;
                Ok(None)
            }
            (_, EXPOSE_KIND) => {
                let d = change
                    .desired
                    .as_ref()
                    .ok_or_else(|| ProviderError::Invalid {
                        address: change.address.clone(),
                        message: "no desired state".into(),
                    })?;
                let attrs = ctx.resolved_attrs(d);
                let st = ExposeState {
                    address: d.address.clone(),
                    service: attrs
                        .get("service")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_owned(),
                    port: attrs
                        .get("port")
                        .and_then(Value::as_int)
                        .and_then(|p| u16::try_from(p).ok())
                        .unwrap_or(0),
                    allow: match attrs.get("allow") {
                        Some(Value::List(items)) => items
                            .iter()
                            .filter_map(|v| v.as_str().map(str::to_owned))
                            .collect(),
                        _ => Vec::new(),
                    },
                    key_file: d
                        .attrs
                        .get("_key_file")
                        .and_then(|a| a.value.as_str())
                        .map(PathBuf::from),
                    tls_cert: d
                        .attrs
                        .get("_tls_cert")
                        .and_then(|a| a.value.as_str())
                        .map(PathBuf::from),
                };
                let dir = state_dir(&ctx.scope.root, &ctx.scope.env).join("exposes");
                std::fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
                let name = d.address.as_str().trim_start_matches("expose.");
                std::fs::write(
                    dir.join(format!("{name}.json")),
                    serde_json::to_vec_pretty(&st).unwrap_or_default(),
                )
                .map_err(io("writing expose state"))?;
                Ok(Some(live_expose(&st)))
            }
            _ => Err(ProviderError::Invalid {
                address: change.address.clone(),
                message: format!("the local provider does not manage {kind}"),
            }),
        }
    }
}

fn live_expose(st: &ExposeState) -> Live {
    let live = Live::new(
        st.address.clone(),
        EXPOSE_KIND,
        ProviderId::Local,
        st.address.to_string(),
    )
    .attr("service", st.service.clone())
    .attr("port", st.port)
    .attr("allow", Value::list_of_str(st.allow.clone()))
    .output("service", st.service.clone());
    let live = match &st.tls_cert {
        Some(cert) => live
            .attr("tls", "self_signed")
            .output("url", format!("https://127.0.0.1:{}", st.port))
            .output("certificate", cert.to_string_lossy().into_owned()),
        None => live.output("url", format!("http://127.0.0.1:{}", st.port)),
    };
    match &st.key_file {
        Some(k) => live.output("api_key_file", k.to_string_lossy().into_owned()),
        None => live,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example() -> Stack {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("stacks/customer-mesh");
        crate::stack::load(&root, Some("local")).unwrap_or_else(|r| panic!("{}", r.render()))
    }

    /// Services applied side by side make the keys they need at once: each
    /// key is made once, and every verifier matches its key.
    #[test]
    fn keys_made_by_services_applied_at_once_agree_with_their_verifiers() {
        let stack = example();
        let ports = service_ports(&stack);
        let url_of = |svc: &str| format!("http://127.0.0.1:{}", ports[svc]);
        let features = &stack.services["customer-features"];
        for _ in 0..20 {
            let tmp = tempfile::tempdir().expect("temp dir");
            let dir = tmp.path().join("access");
            let mut b = bundle_for(&stack, features, &url_of);
            access::configure(&stack, &dir, features, &mut b.config);
            let config = &b.config;
            let start = std::sync::Barrier::new(16);
            let made: Vec<std::io::Result<()>> = std::thread::scope(|s| {
                let all: Vec<_> = (0..16)
                    .map(|_| {
                        s.spawn(|| {
                            start.wait();
                            access::ensure_keys(&dir, config)
                        })
                    })
                    .collect();
                all.into_iter().map(|t| t.join().expect("thread")).collect()
            });
            for r in made {
                r.expect("ensure_keys");
            }
            for caller in ["operator", "customer-scoring"] {
                let key = std::fs::read_to_string(access::key_file(&dir, caller)).expect("key");
                let verifier =
                    std::fs::read_to_string(access::verifier_file(&dir, caller)).expect("verifier");
                assert_eq!(
                    verifier,
                    mesh_runtime::auth::verifier(caller, key.trim_end())
                );
            }
        }
    }

    #[test]
    fn only_allowed_callers_get_keys_to_a_restricted_service() {
        let stack = example();
        assert_eq!(
            access::restricted_to(&stack, "customer-features"),
            Some(BTreeSet::from(["customer-scoring".to_owned()]))
        );
        assert_eq!(
            access::restricted_to(&stack, "customer-scoring"),
            None,
            "0.0.0.0/0"
        );

        let ports = service_ports(&stack);
        let url_of = |svc: &str| format!("http://127.0.0.1:{}", ports[svc]);
        let features = &stack.services["customer-features"];
        let mut b = bundle_for(&stack, features, &url_of);
        let dir = access::dir(&stack);
        access::configure(&stack, &dir, features, &mut b.config);
        assert!(dir.is_absolute());
        let caller = |c: &str| rc::CallerKey {
            caller: c.into(),
            verifier: rc::SecretRef::File(dir.join("verifiers").join(c)),
        };
        assert_eq!(
            b.config.api_keys,
            vec![
                rc::ApiKey::Caller(caller("operator")),
                rc::ApiKey::Caller(caller("customer-scoring")),
            ]
        );
        // Every other identity of the mesh is known, so refused with 403.
        assert_eq!(b.config.known_callers, vec![caller("customer-features")]);

        let scoring = &stack.services["customer-scoring"];
        let mut b = bundle_for(&stack, scoring, &url_of);
        access::configure(&stack, &dir, scoring, &mut b.config);
        assert!(b.config.api_keys.is_empty());
        let keys: Vec<_> = b
            .config
            .endpoints
            .values()
            .flat_map(|ep| match ep {
                rc::EndpointConfig::Prediction { enrichments, .. } => enrichments
                    .iter()
                    .map(|e| e.lookup.as_ref().and_then(|l| l.api_key.clone()))
                    .collect(),
                _ => Vec::new(),
            })
            .collect();
        assert_eq!(keys.len(), 2);
        for k in keys {
            assert_eq!(
                k,
                Some(rc::SecretRef::File(dir.join("keys/customer-scoring")))
            );
        }
    }

    #[test]
    fn a_loopback_cidr_opens_a_service_to_this_machine() {
        let mut stack = example();
        let e = stack.exposes.get_mut("customer-features").unwrap();
        e.allow.push(Caller::Cidr("127.0.0.0/8".parse().unwrap()));
        assert_eq!(access::restricted_to(&stack, "customer-features"), None);
        let e = stack.exposes.get_mut("customer-features").unwrap();
        e.allow = vec![Caller::Cidr("10.0.0.0/8".parse().unwrap())];
        assert_eq!(
            access::restricted_to(&stack, "customer-features"),
            Some(BTreeSet::new()),
            "no caller on this machine"
        );
    }

    #[test]
    fn keys_are_made_once_and_private_and_verifiers_hold_no_key() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("access");
        let config: rc::ServiceConfig = serde_json::from_value(serde_json::json!({
            "service": "svc",
            "api_keys": [
                { "caller": "operator", "verifier": { "file": access::verifier_file(&dir, "operator") } },
                { "file": "/elsewhere/not-ours" }
            ],
            "endpoints": {}
        }))
        .unwrap();
        access::ensure_keys(&dir, &config).unwrap();
        let key = access::key_file(&dir, "operator");
        let first = std::fs::read_to_string(&key).unwrap();
        assert_eq!(first.len(), 64);
        for f in [&key, &access::verifier_file(&dir, "operator")] {
            let mode = std::os::unix::fs::PermissionsExt::mode(
                &std::fs::metadata(f).unwrap().permissions(),
            );
            assert_eq!(mode & 0o777, 0o600, "{}", f.display());
        }
        let verifier = std::fs::read_to_string(access::verifier_file(&dir, "operator")).unwrap();
        assert_eq!(verifier, mesh_runtime::auth::verifier("operator", &first));
        assert!(!verifier.contains(&first));
        access::ensure_keys(&dir, &config).unwrap();
        assert_eq!(std::fs::read_to_string(&key).unwrap(), first, "kept");
        assert!(!Path::new("/elsewhere/not-ours").exists());
    }
}
