//! A small keep-alive HTTP/1.1 client for plain-`http://` upstreams.
//!
//! hyper's pooled client runs every connection as a task of its own, so each
//! upstream call is handed from the calling task to the connection's task and
//! back: two more wake-ups, often on the other worker thread, for a call that
//! is one write and one read on loopback. Here the calling task writes the
//! request and reads the answer itself, on a connection it takes from the
//! pool and puts back when the answer was read whole and the server keeps the
//! connection open. HTTPS upstreams still go through hyper and rustls.
//!
//! Answers are framed as RFC 9112 §6.3 says: no body for 1xx/204/304,
//! `Transfer-Encoding: chunked`, `Content-Length`, or read to the end of the
//! connection. A connection reused from the pool that the server had closed
//! meanwhile (it answers nothing at all) is replaced and the request sent
//! once more: the calls made here are lookups, which change nothing.

use std::io;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Connections kept open per upstream.
const MAX_IDLE: usize = 64;

/// An idle connection older than this is closed rather than reused (servers
/// close idle connections, ours after 60 s by default).
const IDLE_FOR: Duration = Duration::from_secs(30);

/// Largest answer head (status line and headers).
const MAX_HEAD: usize = 64 << 10;

/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Keep-alive connections to one `host:port`.
#[derive(Debug)]
pub struct Pool {
    authority: String,
    idle: Mutex<Vec<(Conn, Instant)>>,
}

#[derive(Debug)]
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    /// The thread that opened it: its runtime's I/O driver wakes its users.
    home: std::thread::ThreadId,
}

/// An answer: its status and whole body.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
}

/// Why an exchange failed.
#[derive(Debug)]
enum Failure {
    /// The connection was closed (or reset) before any byte of an answer:
    /// on a reused connection, the server had closed it while it was idle.
    Closed(io::Error),
    Other(String),
}

impl Pool {
    /// A pool for `authority` (`host:port`).
    pub fn new(authority: &str) -> Pool {
        Pool {
            authority: authority.to_string(),
            idle: Mutex::new(Vec::new()),
        }
    }

    /// Sends `request` (request line, headers, the empty line and the body)
    /// and reads the answer, refusing a body over `max` bytes.
    pub async fn send(&self, request: &[u8], max: usize) -> Result<Answer, String> {
        if let Some(mut conn) = self.checkout() {
            match exchange(&mut conn, request, max).await {
                Ok((answer, keep)) => {
                    if keep {
                        self.checkin(conn);
                    }
                    return Ok(answer);
                }
                // Closed while idle: a fresh connection below.
                Err(Failure::Closed(_)) => {}
                Err(Failure::Other(e)) => return Err(e),
            }
        }
        let mut conn = self.connect().await?;
        match exchange(&mut conn, request, max).await {
            Ok((answer, keep)) => {
                if keep {
                    self.checkin(conn);
                }
                Ok(answer)
            }
            Err(Failure::Closed(e)) => Err(format!("connection closed without an answer: {e}")),
            Err(Failure::Other(e)) => Err(e),
        }
    }

    /// An idle connection, opened on this thread if there is one: a thread
    /// that runs a runtime of its own (`serve` on worker threads) then
    /// reads its answers through its own I/O driver.
    fn checkout(&self) -> Option<Conn> {
        let here = std::thread::current().id();
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let i = idle
                .iter()
                .rposition(|(conn, _)| conn.home == here)
                .or_else(|| idle.len().checked_sub(1))?;
            let (conn, since) = idle.swap_remove(i);
            if since.elapsed() < IDLE_FOR {
                return Some(conn);
            }
        }
    }

    fn checkin(&self, conn: Conn) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push((conn, Instant::now()));
        }
    }

    async fn connect(&self) -> Result<Conn, String> {
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&self.authority))
            .await
            .map_err(|_| {
                format!(
                    "connecting to {} took over {} s",
                    self.authority,
                    CONNECT_TIMEOUT.as_secs()
                )
            })?
            .map_err(|e| format!("cannot connect to {}: {e}", self.authority))?;
        stream
            .set_nodelay(true)
            .map_err(|e| format!("cannot set TCP_NODELAY: {e}"))?;
        Ok(Conn {
            stream,
            buf: Vec::with_capacity(8 << 10),
            home: std::thread::current().id(),
        })
    }
}

/// Writes `request` and reads one answer; `true` when the connection may
/// carry another request.
async fn exchange(conn: &mut Conn, request: &[u8], max: usize) -> Result<(Answer, bool), Failure> {
    conn.buf.clear();
    if let Err(e) = conn.stream.write_all(request).await {
        return Err(Failure::Closed(e));
    }
    let (status, head_len, framing, close) = loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut response = httparse::Response::new(&mut headers);
        match response.parse(&conn.buf) {
            Ok(httparse::Status::Complete(len)) => {
                let status = response.code.unwrap_or(0);
                if (100..200).contains(&status) {
                    // An interim answer (100 Continue, 103): the final one follows.
                    conn.buf.drain(..len);
                    continue;
                }
                let (framing, close) = framing(&response, status).map_err(Failure::Other)?;
                break (status, len, framing, close);
            }
            Ok(httparse::Status::Partial) => {
                if conn.buf.len() > MAX_HEAD {
                    return Err(Failure::Other(format!(
                        "answered a head over {} KiB",
                        MAX_HEAD >> 10
                    )));
                }
                let first = conn.buf.is_empty();
                match conn.stream.read_buf(&mut conn.buf).await {
                    Ok(0) if first => {
                        return Err(Failure::Closed(io::ErrorKind::UnexpectedEof.into()));
                    }
                    Ok(0) => return Err(Failure::Other("closed the connection mid-answer".into())),
                    Ok(_) => {}
                    Err(e) if first => return Err(Failure::Closed(e)),
                    Err(e) => {
                        return Err(Failure::Other(format!("reading the answer failed: {e}")));
                    }
                }
            }
            Err(e) => return Err(Failure::Other(format!("answered invalid HTTP: {e}"))),
        }
    };
    let (body, end) = match framing {
        Framing::None => (Vec::new(), head_len),
        Framing::Length(n) => {
            if n > max {
                return Err(too_big(max));
            }
            fill(conn, head_len + n).await?;
            (conn.buf[head_len..head_len + n].to_vec(), head_len + n)
        }
        Framing::Chunked => chunked(conn, head_len, max).await?,
        Framing::UntilClose => {
            loop {
                if conn.buf.len() - head_len > max {
                    return Err(too_big(max));
                }
                match conn.stream.read_buf(&mut conn.buf).await {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) => {
                        return Err(Failure::Other(format!("reading the answer failed: {e}")));
                    }
                }
            }
            (conn.buf[head_len..].to_vec(), conn.buf.len())
        }
    };
    // Bytes after the answer were never asked for: do not reuse the connection.
    let keep = !close && framing != Framing::UntilClose && end == conn.buf.len();
    Ok((Answer { status, body }, keep))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    None,
    Length(usize),
    Chunked,
    UntilClose,
}

/// How the body of an answer is delimited, and whether the server closes
/// the connection after it.
fn framing(response: &httparse::Response<'_, '_>, status: u16) -> Result<(Framing, bool), String> {
    let mut close = response.version != Some(1);
    let mut length: Option<usize> = None;
    let mut chunked = None;
    for h in response.headers.iter() {
        if h.name.eq_ignore_ascii_case("connection") {
            let v = String::from_utf8_lossy(h.value);
            if v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")) {
                close = true;
            } else if v
                .split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("keep-alive"))
            {
                close = false;
            }
        } else if h.name.eq_ignore_ascii_case("content-length") {
            let n = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .ok_or_else(|| "answered an invalid Content-Length".to_string())?;
            if length.is_some_and(|l| l != n) {
                return Err("answered two different Content-Lengths".into());
            }
            length = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            let v = String::from_utf8_lossy(h.value);
            let last = v.rsplit(',').next().unwrap_or_default().trim();
            chunked = Some(last.eq_ignore_ascii_case("chunked"));
        }
    }
    if status == 204 || status == 304 {
        return Ok((Framing::None, close));
    }
    Ok(match (chunked, length) {
        (Some(true), _) => (Framing::Chunked, close),
        // Another coding last: the body ends with the connection.
        (Some(false), _) => (Framing::UntilClose, true),
        (None, Some(n)) => (Framing::Length(n), close),
        (None, None) => (Framing::UntilClose, true),
    })
}

/// Reads until the buffer holds `len` bytes.
async fn fill(conn: &mut Conn, len: usize) -> Result<(), Failure> {
    while conn.buf.len() < len {
        match conn.stream.read_buf(&mut conn.buf).await {
            Ok(0) => return Err(Failure::Other("closed the connection mid-answer".into())),
            Ok(_) => {}
            Err(e) => return Err(Failure::Other(format!("reading the answer failed: {e}"))),
        }
    }
    Ok(())
}

/// The next line from `from` (without its CRLF), and where the one after starts.
async fn line(conn: &mut Conn, from: usize) -> Result<(usize, usize), Failure> {
    let mut scanned = from;
    loop {
        if let Some(i) = conn.buf[scanned..].windows(2).position(|w| w == b"\r\n") {
            return Ok((scanned + i, scanned + i + 2));
        }
        if conn.buf.len() - from > 4096 {
            return Err(Failure::Other("answered a chunk line over 4 KiB".into()));
        }
        scanned = conn.buf.len().saturating_sub(1).max(from);
        let want = conn.buf.len() + 1;
        fill(conn, want).await?;
    }
}

/// A chunked body from `start`: the body, and where the answer ends.
async fn chunked(conn: &mut Conn, start: usize, max: usize) -> Result<(Vec<u8>, usize), Failure> {
    let mut body = Vec::new();
    let mut pos = start;
    loop {
        let (end, next) = line(conn, pos).await?;
        let text = String::from_utf8_lossy(&conn.buf[pos..end]);
        let size = text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size, 16)
            .map_err(|_| Failure::Other(format!("answered an invalid chunk size `{size}`")))?;
        pos = next;
        if size == 0 {
            // Trailers, up to the empty line.
            loop {
                let (end, next) = line(conn, pos).await?;
                let empty = end == pos;
                pos = next;
                if empty {
                    break;
                }
            }
            return Ok((body, pos));
        }
        if body.len() + size > max {
            return Err(too_big(max));
        }
        fill(conn, pos + size + 2).await?;
        body.extend_from_slice(&conn.buf[pos..pos + size]);
        if &conn.buf[pos + size..pos + size + 2] != b"\r\n" {
            return Err(Failure::Other("answered a chunk without its CRLF".into()));
        }
        pos += size + 2;
    }
}

fn too_big(max: usize) -> Failure {
    Failure::Other(format!("answered a body over {max} bytes"))
}
