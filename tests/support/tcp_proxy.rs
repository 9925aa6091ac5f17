//! A TCP proxy that tests put in front of a database and cut, hang or
//! restore: the database "goes away" without touching the shared server.
//! Shared by the workspace's tests (`mod tcp_proxy;` from tests/support) and
//! the runtime's (`#[path = "../../tests/support/tcp_proxy.rs"]`).

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub const PASS: u8 = 0;
pub const REFUSE: u8 = 1;
pub const HANG: u8 = 2;

/// A TCP proxy in front of PostgreSQL. `REFUSE` closes every open connection
/// and closes new ones at once (the database is down); `HANG` forwards
/// nothing (a network black hole); `PASS` forwards. It counts the `Bind`
/// messages clients send: one per execution of a prepared query.
pub struct Proxy {
    pub addr: SocketAddr,
    mode: Arc<AtomicU8>,
    binds: Arc<AtomicUsize>,
    open: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    pub fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let addr = listener.local_addr().expect("addr");
        let mode = Arc::new(AtomicU8::new(PASS));
        let binds = Arc::new(AtomicUsize::new(0));
        let open: Arc<Mutex<Vec<TcpStream>>> = Arc::new(Mutex::new(Vec::new()));
        let (m, b, o) = (mode.clone(), binds.clone(), open.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                match m.load(Ordering::SeqCst) {
                    REFUSE => drop(client),
                    _ => {
                        let Ok(server) = TcpStream::connect(upstream) else {
                            continue;
                        };
                        if let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) {
                            o.lock().expect("lock").extend([c2, s2]);
                        }
                        let (c_read, s_write) = (
                            client.try_clone().expect("clone"),
                            server.try_clone().expect("clone"),
                        );
                        let (m1, m2, b1) = (m.clone(), m.clone(), b.clone());
                        std::thread::spawn(move || pump(c_read, s_write, &m1, Some(&b1)));
                        std::thread::spawn(move || pump(server, client, &m2, None));
                    }
                }
            }
        });
        Proxy {
            addr,
            mode,
            binds,
            open,
        }
    }

    pub fn set(&self, mode: u8) {
        self.mode.store(mode, Ordering::SeqCst);
        if mode == REFUSE {
            for s in self.open.lock().expect("lock").drain(..) {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
    }

    pub fn binds(&self) -> usize {
        self.binds.load(Ordering::SeqCst)
    }
}

/// Copies `from` to `to`, holding data while the proxy hangs; counts `Bind`
/// messages when `binds` is given (the client-to-server direction).
fn pump(mut from: TcpStream, mut to: TcpStream, mode: &AtomicU8, binds: Option<&AtomicUsize>) {
    let mut buf = [0u8; 16384];
    let mut parser = Frontend::default();
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some(binds) = binds {
            binds.fetch_add(parser.feed(&buf[..n]), Ordering::SeqCst);
        }
        while mode.load(Ordering::SeqCst) == HANG {
            std::thread::sleep(Duration::from_millis(10));
        }
        if mode.load(Ordering::SeqCst) == REFUSE || to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

/// Splits the frontend (client) side of the PostgreSQL protocol into messages.
#[derive(Default)]
struct Frontend {
    started: bool,
    pending: Vec<u8>,
}

impl Frontend {
    /// Feeds bytes; returns the number of complete `Bind` messages.
    fn feed(&mut self, bytes: &[u8]) -> usize {
        self.pending.extend_from_slice(bytes);
        let mut binds = 0;
        loop {
            if !self.started {
                // Untyped: length, then a code (startup, SSLRequest, GSSENCRequest).
                if self.pending.len() < 8 {
                    return binds;
                }
                let len = u32::from_be_bytes(self.pending[0..4].try_into().expect("4")) as usize;
                let code = u32::from_be_bytes(self.pending[4..8].try_into().expect("4"));
                if self.pending.len() < len {
                    return binds;
                }
                self.pending.drain(..len);
                self.started = !matches!(code, 80877103 | 80877104);
            } else {
                if self.pending.len() < 5 {
                    return binds;
                }
                let len = u32::from_be_bytes(self.pending[1..5].try_into().expect("4")) as usize;
                if self.pending.len() < 1 + len {
                    return binds;
                }
                if self.pending[0] == b'B' {
                    binds += 1;
                }
                self.pending.drain(..1 + len);
            }
        }
    }
}

