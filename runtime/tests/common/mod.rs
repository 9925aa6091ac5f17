//! Shared helpers for the HTTP tests: bundles in temp folders built from the
//! example data, the real `mesh-runtime` binary on a loopback port, and a
//! small blocking HTTP/1.1 client.
#![allow(dead_code)]

pub mod outage;
pub mod proxy;
pub mod webdriver;

// Shared with the workspace's tests (tests/support), hence a file of its own.
mod fakesnow;
#[allow(unused_imports)] // each test file uses what it needs
pub use fakesnow::{snowflake_exec, snowflake_url};

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

pub const SERVICE: &str = "customer-scoring";

/// The example folder (`examples/customer-mesh`).
pub fn example_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/customer-mesh")
}

/// A bundle folder in a temp dir, holding the example CSVs and model.
pub struct BundleDir {
    pub dir: tempfile::TempDir,
}

impl BundleDir {
    pub fn new(service_json: &Value) -> BundleDir {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir_all(dir.path().join("datasets")).expect("mkdir");
        std::fs::create_dir_all(dir.path().join("models")).expect("mkdir");
        let ex = example_dir();
        for f in ["customers.csv", "behavior.csv"] {
            std::fs::copy(ex.join(f), dir.path().join("datasets").join(f)).expect("copy csv");
        }
        std::fs::copy(
            ex.join("high_value.onnx"),
            dir.path().join("models/high_value.onnx"),
        )
        .expect("copy model");
        let b = BundleDir { dir };
        b.write_service(service_json);
        b
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn write_service(&self, service_json: &Value) {
        std::fs::write(
            self.dir.path().join("service.json"),
            serde_json::to_vec_pretty(service_json).expect("json"),
        )
        .expect("write service.json");
    }
}

pub const CUSTOMER_COLUMNS: [&str; 5] = ["age", "gender", "region", "campaign", "loyalty_member"];
pub const BEHAVIOR_COLUMNS: [&str; 4] = [
    "total_spend_30d",
    "orders_90d",
    "days_since_last_order",
    "avg_basket",
];

/// The example service: both datasets local, a lookup and a prediction endpoint.
pub fn local_service() -> Value {
    json!({
        "service": SERVICE,
        "version": "1.0.0",
        "limits": {"max_body_bytes": 65536, "max_batch": 100},
        "datasets": {
            "customers": {"source": {"csv": "datasets/customers.csv"}, "key": "customer_id"},
            "behavior": {"source": {"csv": "datasets/behavior.csv"}, "key": "customer_id"}
        },
        "endpoints": {
            "customer": {"kind": "lookup", "datasets": ["customers", "behavior"]},
            "high-value": {
                "kind": "prediction", "model": "models/high_value.onnx",
                "enrichments": [
                    {"dataset": "customers", "key": "customer_id", "columns": CUSTOMER_COLUMNS},
                    {"dataset": "behavior", "key": "customer_id", "columns": BEHAVIOR_COLUMNS}
                ]
            },
            "high-value-plain": {"kind": "prediction", "model": "models/high_value.onnx"}
        }
    })
}

/// Rows of an example CSV as (header, rows of raw text fields).
pub fn read_csv(name: &str) -> (Vec<String>, Vec<Vec<String>>) {
    let text = std::fs::read_to_string(example_dir().join(name)).expect("read csv");
    let mut lines = text.lines();
    let header = lines
        .next()
        .expect("header")
        .split(',')
        .map(str::to_string)
        .collect();
    let rows = lines
        .filter(|l| !l.is_empty())
        .map(|l| l.split(',').map(str::to_string).collect())
        .collect();
    (header, rows)
}

/// All nine features of customer `index` (0-based), as a JSON object whose
/// numbers are the CSV text verbatim.
pub fn explicit_features(index: usize) -> String {
    let (ch, crows) = read_csv("customers.csv");
    let (bh, brows) = read_csv("behavior.csv");
    let mut parts = Vec::new();
    for (h, v) in ch
        .iter()
        .zip(&crows[index])
        .chain(bh.iter().zip(&brows[index]))
    {
        if h == "customer_id" {
            continue;
        }
        if v.parse::<f64>().is_ok() {
            parts.push(format!("\"{h}\": {v}"));
        } else {
            parts.push(format!("\"{h}\": \"{v}\""));
        }
    }
    format!("{{{}}}", parts.join(", "))
}

/// A running `mesh-runtime serve`.
pub struct Server {
    pub child: Child,
    pub addr: SocketAddr,
    pub log: Arc<Mutex<String>>,
}

impl Server {
    /// Starts the binary on `127.0.0.1:0` and waits until it listens.
    pub fn start(bundle: &Path, env: &[(&str, &str)]) -> Server {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_mesh-runtime"));
        cmd.args(["serve", "--bundle"])
            .arg(bundle)
            .args(["--listen", "127.0.0.1:0"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start mesh-runtime");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        let log2 = log.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(rest) = line.split("listening on http://").nth(1) {
                    let addr = rest.split_whitespace().next().unwrap_or("").to_string();
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(addr);
                    }
                }
                let mut l = log2.lock().expect("log lock");
                l.push_str(&line);
                l.push('\n');
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(a) => a.parse().expect("listen address"),
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "mesh-runtime did not start listening; its log:\n{}",
                    log.lock().expect("log")
                );
            }
        };
        Server { child, addr, log }
    }

    /// Starts and waits for `/readyz`.
    pub fn start_ready(bundle: &Path, env: &[(&str, &str)]) -> Server {
        let s = Server::start(bundle, env);
        s.wait_ready();
        s
    }

    pub fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(r) = try_request(self.addr, "GET", "/readyz", &[], b"")
                && r.status == 200
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("not ready after 60 s; log:\n{}", self.log());
    }

    pub fn log(&self) -> String {
        self.log.lock().expect("log").clone()
    }

    pub fn get(&self, path: &str) -> Response {
        request(self.addr, "GET", path, &[], b"")
    }

    /// POST a JSON body (as text, to test exact number spellings).
    pub fn post(&self, path: &str, body: &str) -> Response {
        request(
            self.addr,
            "POST",
            path,
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        )
    }

    pub fn api(&self, endpoint: &str, action: &str, body: &str) -> Response {
        self.post(
            &format!("/public/api/v1/{SERVICE}/{endpoint}/{action}"),
            body,
        )
    }

    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// Waits for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            if Instant::now() > deadline {
                panic!("mesh-runtime did not exit; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Fails if the server log shows a panic.
    pub fn assert_no_panic(&self) {
        let log = self.log();
        assert!(!log.contains("panicked"), "server panicked:\n{log}");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTP answer.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "status {} body is not JSON ({e}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Asserts a JSON error with `status` and `code`; returns the message.
    pub fn assert_error(&self, status: u16, code: &str) -> String {
        assert_eq!(self.status, status, "body: {}", self.text());
        assert_eq!(
            self.header("content-type"),
            Some("application/json"),
            "body: {}",
            self.text()
        );
        let v = self.json();
        assert_eq!(v["error"]["code"], code, "body: {v}");
        v["error"]["message"].as_str().expect("message").to_string()
    }
}

pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Response {
    try_request(addr, method, path, headers, body)
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

/// Sends bytes as they are (for malformed requests) and reads the answer.
pub fn raw(addr: SocketAddr, bytes: &[u8]) -> std::io::Result<Response> {
    raw_with_timeout(addr, bytes, Duration::from_secs(30))
}

/// As [`raw`], giving up reading after `timeout`.
pub fn raw_with_timeout(
    addr: SocketAddr,
    bytes: &[u8],
    timeout: Duration,
) -> std::io::Result<Response> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.write_all(bytes)?;
    let mut buf = Vec::new();
    stream.read_to_end(&mut buf)?;
    parse_response(&buf)
}

pub fn try_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<Response> {
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(body);
    raw(addr, &bytes)
}

fn parse_response(buf: &[u8]) -> std::io::Result<Response> {
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
    let end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no header end"))?;
    let head = std::str::from_utf8(&buf[..end]).map_err(|_| bad("header not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().ok_or_else(|| bad("no status line"))?;
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("bad status line"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut body = buf[end + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    if chunked {
        let mut out = Vec::new();
        let mut rest = &body[..];
        while let Some(nl) = rest.windows(2).position(|w| w == b"\r\n") {
            let size =
                usize::from_str_radix(std::str::from_utf8(&rest[..nl]).unwrap_or("0").trim(), 16)
                    .unwrap_or(0);
            if size == 0 {
                break;
            }
            let Some(chunk) = rest.get(nl + 2..nl + 2 + size) else {
                break;
            };
            out.extend_from_slice(chunk);
            rest = rest.get(nl + 2 + size + 2..).unwrap_or(&[]);
        }
        body = out;
    }
    Ok(Response {
        status,
        headers,
        body,
    })
}

/// Probabilities of a predict answer, as f32 bit patterns by class.
pub fn probas_bits(answer: &Value) -> Vec<(String, u32)> {
    answer["result"]["probas"]
        .as_object()
        .unwrap_or_else(|| panic!("no probas in {answer}"))
        .iter()
        .map(|(k, v)| (k.clone(), (v.as_f64().expect("number") as f32).to_bits()))
        .collect()
}

/// A fake upstream on loopback: answers each request after `delay` with
/// `status` and `body` (or never, when `body` is `None`), for at most
/// `lifetime`. Returns its address.
pub fn fake_upstream(
    delay: Duration,
    status: u16,
    body: Option<String>,
    lifetime: Duration,
) -> SocketAddr {
    fake_upstream_counted(delay, status, body, lifetime).0
}

/// As [`fake_upstream`], also counting the requests it has read.
pub fn fake_upstream_counted(
    delay: Duration,
    status: u16,
    body: Option<String>,
    lifetime: Duration,
) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    listener.set_nonblocking(true).expect("nonblocking");
    let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = count.clone();
    std::thread::spawn(move || {
        let deadline = Instant::now() + lifetime;
        let mut held = Vec::new();
        while Instant::now() < deadline {
            match listener.accept() {
                Ok((mut stream, _)) => {
                    let body = body.clone();
                    let _ = stream.set_nonblocking(false);
                    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
                    let mut buf = [0u8; 65536];
                    let _ = stream.read(&mut buf);
                    counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    match body {
                        Some(body) => {
                            std::thread::spawn(move || {
                                std::thread::sleep(delay);
                                let _ = write!(
                                    stream,
                                    "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                                    body.len()
                                );
                            });
                        }
                        None => held.push(stream),
                    }
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    });
    (addr, count)
}

/// A loopback port with nothing listening.
pub fn closed_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

// ------------------------------------------------------------------ datasets: freshness, metrics, answers in time

/// The value of the sample `name{labels}` in a Prometheus text exposition.
pub fn metric(text: &str, sample: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(sample)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

pub fn metrics(s: &Server) -> String {
    s.get("/metrics").text()
}

pub fn readyz(s: &Server) -> Value {
    let r = s.get("/readyz");
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

/// Polls `check` every 50 ms until it holds; fails after `limit`, showing the
/// last state and the server log.
pub fn wait_until(
    s: &Server,
    what: &str,
    limit: Duration,
    mut check: impl FnMut() -> Result<(), String>,
) {
    let deadline = Instant::now() + limit;
    loop {
        match check() {
            Ok(()) => return,
            Err(last) if Instant::now() > deadline => {
                panic!(
                    "{what}: not so after {limit:?}; last: {last}\nserver log:\n{}",
                    s.log()
                )
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// A lookup with a hard read deadline: the server must answer, not hang.
pub fn lookup_within(s: &Server, endpoint: &str, body: &str, limit: Duration) -> Response {
    let path = format!("/public/api/v1/{SERVICE}/{endpoint}/lookup");
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        s.addr,
        body.len()
    );
    raw_with_timeout(s.addr, head.as_bytes(), limit)
        .unwrap_or_else(|e| panic!("{endpoint}: no answer within {limit:?} ({e})"))
}

/// The shared PostgreSQL the tests use (`MESH_TEST_POSTGRES_URL`).
pub struct Pg {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: String,
    pub database: String,
}

/// Reads `MESH_TEST_POSTGRES_URL` (`postgresql://user:password@host:port/db`).
pub fn pg() -> Pg {
    let url = std::env::var("MESH_TEST_POSTGRES_URL").unwrap_or_else(|_| {
        panic!(
            "MESH_TEST_POSTGRES_URL is not set: run the tests with `scripts/test` (it starts PostgreSQL), \
             or `bash scripts/services start; eval \"$(bash scripts/services env)\"`"
        )
    });
    let rest = url
        .strip_prefix("postgresql://")
        .or_else(|| url.strip_prefix("postgres://"))
        .expect("MESH_TEST_POSTGRES_URL must start with postgresql://");
    let (auth, hostpart) = rest
        .split_once('@')
        .expect("user:password@ in MESH_TEST_POSTGRES_URL");
    let (user, password) = auth.split_once(':').unwrap_or((auth, ""));
    let (hostport, database) = hostpart
        .split_once('/')
        .expect("/database in MESH_TEST_POSTGRES_URL");
    let (host, port) = hostport.split_once(':').unwrap_or((hostport, "5432"));
    Pg {
        host: host.to_string(),
        port: port.parse().expect("port"),
        user: user.to_string(),
        password: password.to_string(),
        database: database.split('?').next().unwrap_or(database).to_string(),
    }
}

/// A bundle of `service` whose `secrets/operator` holds the operator's
/// verifier for `key` (name it with `{"verifier": {"file": "secrets/operator"}}`).
pub fn bundle_with_operator_verifier(service: &Value, key: &str) -> BundleDir {
    let bundle = BundleDir::new(service);
    std::fs::create_dir_all(bundle.path().join("secrets")).expect("mkdir");
    std::fs::write(
        bundle.path().join("secrets/operator"),
        mesh_runtime::auth::verifier("operator", key),
    )
    .expect("write verifier");
    bundle
}

/// One request of [`send_all`]: path, extra headers, JSON body.
pub type Req = (String, Vec<(String, String)>, String);

/// Sends `requests` (POSTs of JSON bodies) over keep-alive connections,
/// `tasks` at a time, and returns each one's status and body, in order.
pub fn send_all(addr: SocketAddr, requests: Vec<Req>, tasks: usize) -> Vec<(u16, Vec<u8>)> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let pool = Arc::new(mesh_runtime::h1::Pool::new(&addr.to_string()));
    let requests = Arc::new(requests);
    rt.block_on(async {
        let mut handles = Vec::new();
        for t in 0..tasks {
            let (pool, requests) = (pool.clone(), requests.clone());
            handles.push(tokio::spawn(async move {
                let mut out = Vec::new();
                for i in (t..requests.len()).step_by(tasks) {
                    let (path, headers, body) = &requests[i];
                    let mut head = format!(
                        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
                        body.len()
                    );
                    for (k, v) in headers {
                        head.push_str(&format!("{k}: {v}\r\n"));
                    }
                    head.push_str("\r\n");
                    head.push_str(body);
                    let answer = pool.send(head.as_bytes(), 1 << 20).await.expect("answer");
                    out.push((i, answer.status, answer.body));
                }
                out
            }));
        }
        let mut all = vec![(0, Vec::new()); requests.len()];
        for h in handles {
            for (i, status, body) in h.await.expect("task") {
                all[i] = (status, body);
            }
        }
        all
    })
}
