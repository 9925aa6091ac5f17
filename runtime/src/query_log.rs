//! The query log (`query_log` in `service.json`): one JSON line per
//! prediction (per item of a `predict-multi`) and per lookup key (per key
//! per endpoint of a `lookup-endpoints` call, in the same shape), a line per
//! shadow answer, and a line per authentication failure.
//!
//! ```text
//! {"time":"2026-12-03T16:00:00.123Z","event":"query","endpoint":"high-value","kind":"predict",
//!  "generation":"v2","key":"C00042","features":{"customer_id":"C00042","age":41,"region":"[redacted]"},
//!  "prediction":"1","probabilities":{"0":0.2,"1":0.8},"status":200,"latency_ms":0.41,
//!  "request_id":"abc","caller":"web"}
//! {"time":"…","event":"shadow","endpoint":"high-value","generation":"gbt","key":"C00042",
//!  "prediction":"1","probabilities":{…},"agrees":true,"served_by":"v2","request_id":"abc"}
//! {"time":"…","event":"auth_failure","method":"POST","path":"/public/api/v1/…","status":403,
//!  "caller":"batch","reason":"caller `batch` may not call service `scoring` …"}
//! ```
//!
//! The values of `redact` fields (features, enriched values, lookup
//! columns) are written as `"[redacted]"`; a presented API key is never
//! written. `sample` draws which queries are logged (authentication
//! failures always are). Lines go through a [`LineWriter`]: a full queue
//! drops the line and counts it, never the request.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use serde::ser::{SerializeMap, Serializer};

use crate::config::QueryLogConfig;
use crate::input::{FieldMap, Input};
use crate::lines::LineWriter;

/// Lines that may wait for the writer before new ones are dropped.
const QUEUE: usize = 8192;

/// What a redacted value is written as.
pub const REDACTED: &str = "[redacted]";

/// The query log; cheap to clone.
#[derive(Clone)]
pub struct QueryLog {
    lines: LineWriter,
    sample: f64,
    redact: Arc<HashSet<String>>,
}

impl QueryLog {
    /// Starts the writer: appending to `path` (relative to `base`), or
    /// standard output when the config names no path.
    pub fn open(config: &QueryLogConfig, base: &Path) -> std::io::Result<QueryLog> {
        let lines = match &config.path {
            Some(path) => {
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(base.join(path))?;
                LineWriter::start("query-log", QUEUE, file)?
            }
            None => LineWriter::start("query-log", QUEUE, std::io::stdout())?,
        };
        Ok(QueryLog {
            lines,
            sample: config.sample,
            redact: Arc::new(config.redact.iter().cloned().collect()),
        })
    }

    /// Whether a query is logged (a draw against `sample`).
    pub fn sampled(&self) -> bool {
        self.sample >= 1.0 || crate::generations::random_unit() < self.sample
    }

    pub fn redacted(&self, field: &str) -> bool {
        self.redact.contains(field)
    }

    pub fn send(&self, line: &impl Serialize) {
        self.lines.send_json(line);
    }

    /// Lines queued for writing.
    pub fn lines(&self) -> u64 {
        self.lines.queued()
    }

    /// Lines dropped because the writer fell behind.
    pub fn dropped(&self) -> u64 {
        self.lines.dropped()
    }

    /// Writes and flushes what is queued (graceful stop).
    pub fn flush(&self) -> bool {
        self.lines.flush(Duration::from_secs(5))
    }

    /// The features of one item as a JSON object, redacted.
    pub fn features(&self, fields: &FieldMap, row: &[Input<'_>]) -> serde_json::Value {
        let mut map = serde_json::Map::new();
        for (slot, value) in row.iter().enumerate() {
            let name = fields.name(slot);
            let value = match value {
                Input::Absent => continue,
                _ if self.redacted(name) => serde_json::Value::from(REDACTED),
                other => input_json(other),
            };
            map.insert(name.to_string(), value);
        }
        serde_json::Value::Object(map)
    }

    /// `value` (a JSON object) with the redacted fields' values replaced.
    pub fn redact_object(&self, mut value: serde_json::Value) -> serde_json::Value {
        if let serde_json::Value::Object(map) = &mut value {
            for (name, v) in map.iter_mut() {
                if self.redacted(name) {
                    *v = serde_json::Value::from(REDACTED);
                }
            }
        }
        value
    }

    /// The line of an authentication failure (always written).
    pub fn auth_failure(
        &self,
        method: &str,
        path: &str,
        status: u16,
        caller: Option<&str>,
        reason: &str,
    ) {
        self.send(&AuthFailure {
            time: crate::log::rfc3339(SystemTime::now()),
            event: "auth_failure",
            method,
            path,
            status,
            caller,
            reason,
        });
    }
}

/// An input value as JSON.
pub fn input_json(value: &Input<'_>) -> serde_json::Value {
    match value {
        Input::Absent | Input::Null | Input::Other(_) => serde_json::Value::Null,
        Input::Int(i) => (*i).into(),
        Input::Num(f) => {
            serde_json::Number::from_f64(*f).map_or(serde_json::Value::Null, Into::into)
        }
        Input::Bool(b) => (*b).into(),
        Input::Str(s) => serde_json::Value::from(&**s),
    }
}

#[derive(Serialize)]
struct AuthFailure<'a> {
    time: String,
    event: &'static str,
    method: &'a str,
    path: &'a str,
    status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    caller: Option<&'a str>,
    reason: &'a str,
}

/// `{"0": 0.2, "1": 0.8}`.
pub struct Probabilities<'a> {
    pub names: &'a [String],
    pub values: &'a [f32],
}

impl Serialize for Probabilities<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.names.len()))?;
        for (name, value) in self.names.iter().zip(self.values) {
            map.serialize_entry(name, value)?;
        }
        map.end()
    }
}

/// One prediction or lookup, as logged.
#[derive(Serialize)]
pub struct QueryLine<'a> {
    pub time: String,
    pub event: &'static str,
    pub endpoint: &'a str,
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generation: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub features: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub row: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prediction: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probabilities: Option<Probabilities<'a>>,
    pub status: u16,
    pub latency_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub caller: Option<&'a str>,
}

/// Milliseconds, rounded to microseconds.
pub fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}
