//! A stand-in for a cluster's network, for `mesh test` on a cluster target
//! whose pods never run (the Kubernetes API double): an HTTP forward proxy
//! on loopback (`http_proxy` for `mesh`) that sends requests for in-cluster
//! URLs (`http://SERVICE.NAMESPACE.svc.cluster.local:PORT`) to real
//! `mesh-runtime` processes serving the same services on this machine.
//! A host without a route gets a 502; every host asked for is recorded.
//! With `hold`, requests are accepted and never answered (until dropped).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Where requests for one in-cluster `host:port` go.
#[derive(Clone)]
pub struct Route {
    /// `127.0.0.1:PORT` of the runtime that answers.
    pub backend: String,
    /// Sent as `X-API-Key` instead of the key the request carries (the
    /// local target's operator key for the cluster's: each runtime checks
    /// the keys of its own target).
    pub api_key: Option<String>,
}

pub struct ClusterProxy {
    /// `http://127.0.0.1:PORT`, for `http_proxy`.
    pub url: String,
    routes: Arc<BTreeMap<String, Route>>,
    asked: Arc<Mutex<Vec<String>>>,
    hold: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    addr: std::net::SocketAddr,
}

impl ClusterProxy {
    /// Serves `routes` (by `host:port`) on a free loopback port.
    pub fn start(routes: BTreeMap<String, Route>) -> ClusterProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let proxy = ClusterProxy {
            url: format!("http://{addr}"),
            routes: Arc::new(routes),
            asked: Arc::default(),
            hold: Arc::default(),
            stop: Arc::default(),
            addr,
        };
        let (routes, asked, hold, stop) = (
            proxy.routes.clone(),
            proxy.asked.clone(),
            proxy.hold.clone(),
            proxy.stop.clone(),
        );
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (routes, asked, hold, stop) =
                    (routes.clone(), asked.clone(), hold.clone(), stop.clone());
                std::thread::spawn(move || serve(conn, &routes, &asked, &hold, &stop));
            }
        });
        proxy
    }

    /// From now on, requests are accepted and left unanswered.
    pub fn hold(&self) {
        self.hold.store(true, Ordering::SeqCst);
    }

    /// Every `host:port` asked for, in order.
    pub fn asked(&self) -> Vec<String> {
        self.asked.lock().unwrap().clone()
    }
}

impl Drop for ClusterProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
    }
}

/// One request: `POST http://HOST:PORT/PATH HTTP/1.1` and its body.
fn serve(
    mut conn: TcpStream,
    routes: &BTreeMap<String, Route>,
    asked: &Mutex<Vec<String>>,
    hold: &AtomicBool,
    stop: &AtomicBool,
) {
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
        }
    };
    let head = String::from_utf8_lossy(&raw[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default().to_owned();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let length: usize = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    while raw.len() < head_end + length {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
        }
    }
    let body = &raw[head_end..head_end + length];
    let mut parts = request_line.split_whitespace();
    let (method, target) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    let Some(rest) = target.strip_prefix("http://") else {
        return answer(
            &mut conn,
            400,
            "not a proxy request (absolute http:// URL expected)",
        );
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    asked.lock().unwrap().push(authority.to_owned());
    if hold.load(Ordering::SeqCst) {
        while !stop.load(Ordering::SeqCst) {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        return;
    }
    let Some(route) = routes.get(authority) else {
        return answer(
            &mut conn,
            502,
            &format!("no route to {authority} in this cluster"),
        );
    };
    let Ok(mut up) = TcpStream::connect(&route.backend) else {
        return answer(
            &mut conn,
            502,
            &format!("{} does not answer", route.backend),
        );
    };
    let mut out = format!("{method} {path} HTTP/1.1\r\nHost: {}\r\n", route.backend);
    // The route's key stands for the cluster's: a key the request carries
    // (the cluster's operator key) is replaced by it.
    let replaced = |k: &str| {
        route.api_key.is_some()
            && (k.eq_ignore_ascii_case("x-api-key") || k.eq_ignore_ascii_case("authorization"))
    };
    for (k, v) in &headers {
        if !k.eq_ignore_ascii_case("host") && !k.eq_ignore_ascii_case("connection") && !replaced(k)
        {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
    }
    if let Some(key) = &route.api_key {
        out.push_str(&format!("X-API-Key: {key}\r\n"));
    }
    out.push_str("Connection: close\r\n\r\n");
    let mut response = Vec::new();
    let relayed = up.write_all(out.as_bytes()).is_ok()
        && up.write_all(body).is_ok()
        && up.read_to_end(&mut response).is_ok();
    if relayed {
        let _ = conn.write_all(&response);
    } else {
        answer(&mut conn, 502, &format!("{} broke off", route.backend));
    }
}

fn answer(conn: &mut TcpStream, status: u16, message: &str) {
    let body = serde_json::json!({"error": {"code": "proxy", "message": message}}).to_string();
    let _ = write!(
        conn,
        "HTTP/1.1 {status} Proxy\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}
