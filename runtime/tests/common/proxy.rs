//! A TCP proxy a test can cut and restore, in front of a database.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub const PASS: u8 = 0;
pub const REFUSE: u8 = 1;
pub const HANG: u8 = 2;

/// Counts protocol messages in the bytes one client sends (one per connection).
pub type Counter = Box<dyn FnMut(&[u8]) -> usize + Send>;

/// A TCP proxy. `REFUSE` closes every open connection and closes new ones at
/// once (the database is down); `HANG` forwards nothing (a network black
/// hole); `PASS` forwards. Optionally counts messages clients send.
pub struct Proxy {
    pub addr: SocketAddr,
    mode: Arc<AtomicU8>,
    count: Arc<AtomicUsize>,
    open: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    /// A proxy in front of `upstream`, counting nothing.
    pub fn start(upstream: SocketAddr) -> Proxy {
        Proxy::counting(upstream, || Box::new(|_: &[u8]| 0))
    }

    /// A proxy in front of `upstream`; `counter` makes, per connection, what
    /// counts the messages in the client-to-server bytes.
    pub fn counting(upstream: SocketAddr, counter: impl Fn() -> Counter + Send + 'static) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let addr = listener.local_addr().expect("addr");
        let mode = Arc::new(AtomicU8::new(PASS));
        let count = Arc::new(AtomicUsize::new(0));
        let open: Arc<Mutex<Vec<TcpStream>>> = Arc::new(Mutex::new(Vec::new()));
        let (m, n, o) = (mode.clone(), count.clone(), open.clone());
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
                        let (m1, m2, n1) = (m.clone(), m.clone(), n.clone());
                        let up = counter();
                        std::thread::spawn(move || pump(c_read, s_write, &m1, Some((up, &n1))));
                        std::thread::spawn(move || pump(server, client, &m2, None));
                    }
                }
            }
        });
        Proxy {
            addr,
            mode,
            count,
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

    /// Messages counted so far.
    pub fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }
}

/// Copies `from` to `to`, holding data while the proxy hangs; counts
/// messages when `counter` is given (the client-to-server direction).
fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    mode: &AtomicU8,
    mut counter: Option<(Counter, &AtomicUsize)>,
) {
    let mut buf = [0u8; 16384];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some((count, total)) = counter.as_mut() {
            total.fetch_add(count(&buf[..n]), Ordering::SeqCst);
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
