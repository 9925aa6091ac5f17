//! What several integration tests share: a copy of the example mesh to
//! edit, fakesnow, and a registry of its own that requires Basic credentials
//! (for the tests that push with credentials); the mesh applied on the local
//! target (`local`); a stand-in for a cluster's network (`cluster_proxy`); a
//! TCP proxy to cut a database off (`tcp_proxy`).
#![allow(dead_code)]

#[cfg(feature = "aws")]
pub mod aws;
pub mod cluster_proxy;
/// fakesnow: its URL, statements run on it (the runtime's tests' helper).
#[path = "../../runtime/tests/common/fakesnow.rs"]
pub mod fakesnow;
pub mod local;
/// A TCP proxy to cut a database off (the runtime's tests' helper).
#[path = "../../runtime/tests/common/proxy.rs"]
pub mod tcp_proxy;

use std::path::Path;
use std::time::Duration;

/// Copies what the customer mesh needs (its stack, the modules, the example
/// data and model) under `to`, in the repository's layout, leaving out state
/// (`.mesh/`) and caches. Returns `to/stacks/customer-mesh`.
pub fn copy_customer_mesh(to: &Path) -> std::path::PathBuf {
    fn copy_dir(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            let name = e.file_name();
            if name == ".mesh" || name == "__pycache__" {
                continue;
            }
            let p = e.path();
            if p.is_dir() {
                copy_dir(&p, &to.join(&name));
            } else {
                std::fs::copy(&p, to.join(&name)).unwrap();
            }
        }
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    for d in ["stacks/customer-mesh", "modules", "examples/customer-mesh"] {
        copy_dir(&repo.join(d), &to.join(d));
    }
    to.join("stacks/customer-mesh")
}

/// A name of its own (a stack, an instance): moto's state is shared by
/// every test, and tests run in parallel.
pub fn unique(prefix: &str) -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}{}{:x}{}",
        std::process::id() % 1000,
        nanos % 0xffff,
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

/// A command's stdout, as text.
pub fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A command's stderr, as text.
pub fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A command's exit code, stdout and stderr, for assertion messages.
pub fn show(out: &std::process::Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        out.status.code(),
        stdout(out),
        stderr(out)
    )
}

/// The OCI registry on loopback that `scripts/services start` runs (`MESH_TEST_REGISTRY`).
pub fn test_registry() -> String {
    match std::env::var("MESH_TEST_REGISTRY") {
        Ok(r) if !r.is_empty() => r,
        _ => panic!(
            "MESH_TEST_REGISTRY is not set: these tests push images to the OCI registry on loopback; \
             run `scripts/services start` and `eval \"$(scripts/services env)\"` (or `scripts/test`)"
        ),
    }
}

/// A stand-in for the static runtime (`MESH_RUNTIME_STATIC_BIN`) in `dir`:
/// images are digested and pushed, never run.
pub fn stand_in_runtime(dir: &Path) -> std::path::PathBuf {
    let runtime = dir.join("mesh-runtime");
    std::fs::write(&runtime, b"#!/bin/sh\n# stand-in runtime\n").unwrap();
    runtime
}

/// The user of [`auth_registry`] as ECR uses it: `AWS`.
pub const AUTH_USER: &str = "AWS";
/// The password moto's ECR `GetAuthorizationToken` returns for the default
/// account (its `authorizationToken` is `base64("AWS:123456789012-auth-token")`).
pub const AUTH_PASSWORD: &str = "123456789012-auth-token";

/// A registry of its own that requires Basic credentials (htpasswd), as ECR
/// takes `AWS:<token>`: Debian's `docker-registry` (installed by
/// `scripts/services start`) on a free loopback port, plain HTTP, its storage
/// in a temporary folder. Killed, and its storage removed, when dropped.
/// Self-contained: other test files can copy it as it is.
pub struct AuthRegistry {
    /// `127.0.0.1:PORT`.
    pub host: String,
    child: std::process::Child,
    /// `config.yml`, `htpasswd`, `registry.log` and the storage (`data/`).
    dir: Option<tempfile::TempDir>,
}

impl Drop for AuthRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl AuthRegistry {
    /// Stops it and starts it again on the same storage and credentials, on
    /// another port, read-only: it answers reads and refuses every write.
    pub fn restart_read_only(mut self) -> AuthRegistry {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let dir = self.dir.take().expect("the registry's folder");
        start_registry(dir, true)
    }
}

/// Starts a registry that accepts only `user` with `password` (bcrypt, hashed here).
pub fn auth_registry(user: &str, password: &str) -> AuthRegistry {
    let dir = tempfile::tempdir().unwrap();
    let hash = bcrypt::hash(password, 4).expect("bcrypt hashes the test password");
    std::fs::write(dir.path().join("htpasswd"), format!("{user}:{hash}\n")).unwrap();
    start_registry(dir, false)
}

fn start_registry(dir: tempfile::TempDir, read_only: bool) -> AuthRegistry {
    let bin = Path::new("/usr/bin/docker-registry");
    assert!(
        bin.exists(),
        "{} is missing: run `scripts/services start` (it installs Debian's docker-registry)",
        bin.display()
    );
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let host = format!("127.0.0.1:{port}");
    let config = format!(
        "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {data}\n  \
         maintenance:\n    uploadpurging:\n      enabled: false\n    readonly:\n      enabled: {read_only}\n\
         auth:\n  htpasswd:\n    realm: mesh-test\n    path: {htpasswd}\nhttp:\n  addr: {host}\n",
        data = dir.path().join("data").display(),
        htpasswd = dir.path().join("htpasswd").display(),
    );
    std::fs::write(dir.path().join("config.yml"), config).unwrap();
    let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
    let mut cmd = std::process::Command::new(bin);
    cmd.arg("serve").arg(dir.path().join("config.yml"));
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("REGISTRY_")) {
        cmd.env_remove(k);
    }
    let child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
    let mut reg = AuthRegistry {
        host,
        child,
        dir: Some(dir),
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(&reg.host).is_err() {
        let log = || {
            let dir = reg.dir.as_ref().unwrap().path().join("registry.log");
            std::fs::read_to_string(dir).unwrap_or_default()
        };
        if let Ok(Some(status)) = reg.child.try_wait() {
            panic!("the htpasswd registry exited ({status}): {}", log());
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the htpasswd registry did not start on {} within 30 s: {}",
            reg.host,
            log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    reg
}

/// The example's `high-value` endpoint as generations with these weights
/// (`None`: left out), dispatched by customer id; both generations use the
/// example's model, so only the name tells their answers apart.
pub fn generations_toml(text: &str, v1: Option<u32>, v2: u32) -> String {
    let model = "model = \"../../examples/customer-mesh/high_value.onnx\"\n";
    let generation = |name: &str, weight: u32| {
        format!(
            "\n[[service.customer-scoring.endpoint.high-value.generation]]\nname = \"{name}\"\n{model}weight = {weight}\n"
        )
    };
    let mut generations = String::new();
    if let Some(w) = v1 {
        generations.push_str(&generation("v1", w));
    }
    generations.push_str(&generation("v2", v2));
    let (head, tail) = text.split_once(model).expect("the example's model");
    let (enrich, rest) = tail
        .split_once("\n[expose.customer-scoring]")
        .expect("the example's exposure");
    format!(
        "{head}dispatch = {{ key = \"customer_id\" }}\n{enrich}{generations}\n[expose.customer-scoring]{rest}"
    )
}
