//! The customer mesh applied on the local target through the real `mesh`
//! and `mesh-runtime` binaries, and what tests check about local processes.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, Output};

use serde_json::Value;

pub fn runtime_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("MESH_RUNTIME_BIN") {
        return PathBuf::from(p);
    }
    PathBuf::from(env!("CARGO_BIN_EXE_mesh")).with_file_name("mesh-runtime")
}

/// A copy of the customer mesh on free ports, with its `local` environment
/// applied (destroyed when dropped).
pub struct Env {
    pub dir: tempfile::TempDir,
    pub stack: PathBuf,
    /// The node ports of customer-features and customer-scoring.
    pub ports: [u16; 2],
    /// The pids of their runtimes.
    pub pids: Vec<u32>,
}

pub fn free_port(not: &[u16]) -> u16 {
    // The NodePort range, below the ephemeral ports; tests run in parallel
    // threads, so each call starts somewhere else.
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as usize;
    let start = (std::process::id() as usize * 31 + call * 557 + nanos) % 2768;
    // Free now is not enough: two tests may both see a port free before
    // either starts on it. A port is handed out once per test process.
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    let port = (0..2768)
        .map(|i| 30000 + ((start + i) % 2768) as u16)
        .find(|p| {
            !not.contains(p) && !given.contains(p) && TcpListener::bind(("127.0.0.1", *p)).is_ok()
        })
        .expect("a free port in 30000-32767");
    given.push(port);
    port
}

impl Env {
    /// The stack copied, `edit` applied to its stack.toml, and the
    /// environment itself applied (its services keep running throughout).
    pub fn new(edit: impl Fn(String) -> String) -> Env {
        assert!(
            runtime_bin().is_file(),
            "mesh-runtime is not built at {}: run `cargo build -p mesh-runtime` (scripts/test builds everything)",
            runtime_bin().display()
        );
        let dir = tempfile::tempdir().unwrap();
        let stack = super::copy_customer_mesh(dir.path());
        let a = free_port(&[]);
        let b = free_port(&[a]);
        let toml = std::fs::read_to_string(stack.join("stack.toml"))
            .unwrap()
            .replace("node_port = 30080", &format!("node_port = {a}"))
            .replace("node_port = 30081", &format!("node_port = {b}"));
        std::fs::write(stack.join("stack.toml"), edit(toml)).unwrap();
        let mut env = Env {
            dir,
            stack,
            ports: [a, b],
            pids: Vec::new(),
        };
        let out = env.mesh(&["apply", "--auto-approve"]);
        ok(&out, "applying the environment itself");
        env.pids = ["customer-features", "customer-scoring"]
            .iter()
            .map(|s| {
                let state = std::fs::read_to_string(
                    env.stack
                        .join(format!(".mesh/local/services/{s}/state.json")),
                )
                .unwrap();
                serde_json::from_str::<Value>(&state).unwrap()["pid"]
                    .as_u64()
                    .unwrap() as u32
            })
            .collect();
        env
    }

    /// `mesh VERB STACK --env ENV EXTRA...`.
    pub fn command_in(&self, verb: &str, env: &str, extra: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_mesh"));
        cmd.arg(verb)
            .arg(&self.stack)
            .args(["--env", env])
            .args(extra)
            .env("MESH_RUNTIME_BIN", runtime_bin())
            .env("NO_COLOR", "1");
        cmd
    }

    /// `mesh VERB STACK --env local EXTRA...`.
    pub fn command(&self, verb: &str, extra: &[&str]) -> Command {
        self.command_in(verb, "local", extra)
    }

    pub fn mesh(&self, args: &[&str]) -> Output {
        let (verb, extra) = args.split_first().unwrap();
        self.command(verb, extra).output().unwrap()
    }

    /// The key this machine's operator presents (to `service`, as to every
    /// restricted service) on the local target.
    pub fn operator_key(&self, _service: &str) -> String {
        let file = self.stack.join(".mesh/local/access/keys/operator");
        std::fs::read_to_string(&file)
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()))
            .trim()
            .to_owned()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = self.mesh(&["destroy", "--auto-approve"]);
    }
}

pub fn ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed ({:?}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
    })
}

pub fn processes_mentioning(needle: &str) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(needle) && alive(pid) {
                out.push((pid, cmd));
            }
        }
    }
    out
}

/// One request on a new connection (`Connection: close`), with `X-API-Key`
/// when `key` is given; any failure (refused, reset, cut short) as text.
/// The body is the JSON object of the answer (`Null` when there is none).
pub fn try_request(
    method: &str,
    url: &str,
    body: Option<&Value>,
    key: Option<&str>,
) -> Result<(u16, Value), String> {
    use std::io::{Read, Write};
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("not an http:// URL: {url}"))?;
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let mut s = std::net::TcpStream::connect(host).map_err(|e| format!("connect: {e}"))?;
    let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(30)));
    s.write_all(request_text(method, host, path, body, key).as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)
        .map_err(|e| format!("read: {e}"))?;
    parse_answer(&buf)
}

/// [`try_request`] to an `https://` URL, with a TLS client (rustls) that
/// trusts only the certificate in `ca_file`.
pub fn try_request_tls(
    method: &str,
    url: &str,
    body: Option<&Value>,
    key: Option<&str>,
    ca_file: &std::path::Path,
) -> Result<(u16, Value), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url
        .strip_prefix("https://")
        .ok_or_else(|| format!("not an https:// URL: {url}"))?;
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let name = host.rsplit_once(':').map_or(host, |(h, _)| h);
    let config = mesh_runtime::tls::client_config(&[ca_file])?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let exchange = async {
            let tcp = tokio::net::TcpStream::connect(host)
                .await
                .map_err(|e| format!("connect: {e}"))?;
            let mut s = mesh_runtime::tls::connect(config.into(), name, tcp)
                .await
                .map_err(|e| format!("tls handshake: {e}"))?;
            s.write_all(request_text(method, host, path, body, key).as_bytes())
                .await
                .map_err(|e| format!("write: {e}"))?;
            let mut buf = Vec::new();
            s.read_to_end(&mut buf)
                .await
                .map_err(|e| format!("read: {e}"))?;
            parse_answer(&String::from_utf8_lossy(&buf))
        };
        tokio::time::timeout(std::time::Duration::from_secs(30), exchange)
            .await
            .map_err(|_| "no answer within 30 s".to_string())?
    })
}

fn request_text(
    method: &str,
    host: &str,
    path: &str,
    body: Option<&Value>,
    key: Option<&str>,
) -> String {
    let body = body.map(Value::to_string).unwrap_or_default();
    let key = key
        .map(|k| format!("X-API-Key: {k}\r\n"))
        .unwrap_or_default();
    format!(
        "{method} /{path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n{key}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// The status and JSON object of a whole HTTP/1.1 answer.
fn parse_answer(buf: &str) -> Result<(u16, Value), String> {
    let status: u16 = buf
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no status line in {buf:?}"))?;
    let (_, payload) = buf.split_once("\r\n\r\n").ok_or("no body")?;
    // Chunked or not, the JSON object is between the first `{` and the last `}`.
    let start = payload.find('{').unwrap_or(0);
    let end = payload.rfind('}').map_or(payload.len(), |i| i + 1);
    Ok((
        status,
        serde_json::from_str(&payload[start..end]).unwrap_or(Value::Null),
    ))
}

/// POST `body` (with `X-API-Key` when `key` is given); panics when no answer.
pub fn post(url: &str, body: &Value, key: Option<&str>) -> (u16, Value) {
    try_request("POST", url, Some(body), key).unwrap_or_else(|e| panic!("POST {url}: {e}"))
}

/// GET, as text (for `/metrics`).
pub fn get_text(url: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").expect("http:// URL");
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let mut s = std::net::TcpStream::connect(host).unwrap_or_else(|e| panic!("GET {url}: {e}"));
    write!(
        s,
        "GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
    let mut buf = String::new();
    s.read_to_string(&mut buf).expect("read");
    let status = buf
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = buf.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, body.to_owned())
}

/// Polls `check` every 100 ms until it gives `Some`, or panics with `what`
/// and the last observation after `limit`.
pub fn wait_for<T>(
    what: &str,
    limit: std::time::Duration,
    mut check: impl FnMut() -> Result<T, String>,
) -> (T, std::time::Duration) {
    let start = std::time::Instant::now();
    loop {
        match check() {
            Ok(v) => return (v, start.elapsed()),
            Err(last) if start.elapsed() > limit => {
                panic!("{what}: not within {limit:?}; last seen: {last}")
            }
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(100)),
        }
    }
}

/// Every file below `dir` (none when it does not exist).
pub fn files_under(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(files_under(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// `(address, action)` of every change of a `plan --json` that is not a no-op.
pub fn changed_addresses(plan: &Value) -> Vec<(String, String)> {
    plan["resource_changes"]
        .as_array()
        .unwrap_or_else(|| panic!("no resource_changes in {plan}"))
        .iter()
        .filter(|c| c["action"] != "no-op")
        .map(|c| {
            (
                c["address"].as_str().unwrap_or_default().to_owned(),
                c["action"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}
