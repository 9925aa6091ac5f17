//! The access log: one JSON line per request on stderr.
//!
//! `{"time":"2026-11-26T04:59:01.123Z","method":"POST","path":"/public/api/v1/s/e/predict",
//! "status":200,"latency_ms":0.412,"bytes":187,"caller":"operator","request_id":"abc"}`:
//! the caller is the identity a key was recognised as (`auth`), never the
//! key; the path has no query string; headers are never written.
//!
//! A request never waits for stderr: lines go through a bounded queue to a
//! thread of their own ([`LineWriter`]). When the queue is full the line is
//! dropped and counted ([`AccessLog::dropped`], in `/metrics`).

use std::io::Write;
use std::time::{Duration, SystemTime};

use crate::lines::LineWriter;

use serde::Serialize;

/// Lines that may wait for the writer before new ones are dropped.
const QUEUE: usize = 16 * 1024;

/// One request, as logged.
pub struct Entry<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub status: u16,
    pub latency: Duration,
    /// Body size when known (every answer of the runtime has one).
    pub bytes: Option<u64>,
    pub caller: Option<&'a str>,
    pub request_id: Option<&'a str>,
}

#[derive(Serialize)]
struct Line<'a> {
    time: String,
    method: &'a str,
    path: &'a str,
    status: u16,
    latency_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    caller: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    request_id: Option<&'a str>,
}

/// The sending side; cheap to clone.
#[derive(Clone)]
pub struct AccessLog {
    lines: LineWriter,
}

impl AccessLog {
    /// Starts the writer thread, writing to stderr.
    pub fn to_stderr() -> std::io::Result<AccessLog> {
        AccessLog::start(std::io::stderr())
    }

    /// Starts the writer thread, writing to `out`.
    pub fn start(out: impl Write + Send + 'static) -> std::io::Result<AccessLog> {
        Ok(AccessLog {
            lines: LineWriter::start("access-log", QUEUE, out)?,
        })
    }

    /// Queues the line of `entry`; never blocks.
    pub fn record(&self, entry: &Entry<'_>) {
        let line = Line {
            time: crate::log::rfc3339(SystemTime::now() - entry.latency),
            method: entry.method,
            path: entry.path,
            status: entry.status,
            latency_ms: crate::query_log::millis(entry.latency),
            bytes: entry.bytes,
            caller: entry.caller,
            request_id: entry.request_id,
        };
        self.lines.send_json(&line);
    }

    /// Lines dropped because the writer fell behind (or is gone).
    pub fn dropped(&self) -> u64 {
        self.lines.dropped()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_are_json_with_optional_fields_left_out() {
        let out = Shared::default();
        let log = AccessLog::start(out.clone()).expect("start");
        log.record(&Entry {
            method: "POST",
            path: "/p",
            status: 200,
            latency: Duration::from_micros(1500),
            bytes: Some(12),
            caller: Some("operator"),
            request_id: Some("r-1"),
        });
        log.record(&Entry {
            method: "GET",
            path: "/q",
            status: 401,
            latency: Duration::from_micros(10),
            bytes: None,
            caller: None,
            request_id: None,
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let text = loop {
            let text = String::from_utf8(out.0.lock().expect("lock").clone()).expect("utf-8");
            if text.lines().count() == 2 || std::time::Instant::now() > deadline {
                break text;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("json"))
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert_eq!(lines[0]["latency_ms"], 1.5);
        assert_eq!(lines[0]["caller"], "operator");
        assert_eq!(lines[0]["request_id"], "r-1");
        assert_eq!(lines[0]["bytes"], 12);
        assert!(lines[0]["time"].as_str().expect("time").ends_with('Z'));
        assert_eq!(lines[1]["status"], 401);
        assert!(lines[1].get("caller").is_none() && lines[1].get("bytes").is_none());
        assert_eq!(log.dropped(), 0);
    }
}
