//! What the tests that drive the `mesh` binary on the local target share:
//! the runtime binary, free loopback ports, HTTP over a plain socket, process
//! checks.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Output;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::Value;

/// The `mesh-runtime` that `mesh` starts: `MESH_RUNTIME_BIN`, else the one
/// built beside `mesh`.
pub fn runtime_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("MESH_RUNTIME_BIN") {
        return PathBuf::from(p);
    }
    PathBuf::from(env!("CARGO_BIN_EXE_mesh")).with_file_name("mesh-runtime")
}

/// A free loopback port in the NodePort range (30000–32767, below the
/// kernel's ephemeral ports), none of `not`. Tests run as parallel threads of
/// one process, so each call starts its search somewhere else.
pub fn free_port(not: &[u16]) -> u16 {
    static CALLS: AtomicUsize = AtomicUsize::new(0);
    let call = CALLS.fetch_add(1, Ordering::SeqCst);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as usize)
        .unwrap_or_default();
    let start = (std::process::id() as usize * 31 + call * 557 + nanos) % 2768;
    (0..2768)
        .map(|i| 30000 + ((start + i) % 2768) as u16)
        .find(|p| !not.contains(p) && TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .unwrap_or_else(|| panic!("no free port in 30000-32767"))
}

/// Asserts that a command succeeded, showing its output when not.
pub fn ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed ({:?}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Is `pid` a live (not zombie) process?
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
    })
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
    let body = body.map(Value::to_string).unwrap_or_default();
    let key = key
        .map(|k| format!("X-API-Key: {k}\r\n"))
        .unwrap_or_default();
    write!(s, "{method} /{path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n{key}Content-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())
        .map_err(|e| format!("write: {e}"))?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)
        .map_err(|e| format!("read: {e}"))?;
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
