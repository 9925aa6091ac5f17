//! Freshness of datasets: preloaded snapshots that refresh on a schedule, and
//! the status of every dataset that `/readyz` and `/metrics` report.
//!
//! A [`Snapshot`] holds a complete dataset behind an atomic pointer. A
//! refresh loads a whole new dataset next to it and swaps it in only once
//! complete, so a reader sees the old table or the new one, never a part. A
//! failed refresh keeps the last good snapshot, which is served on and turns
//! *stale* (reported, still served) once older than its `max_staleness`.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use serde::Serialize;

use crate::cache::CacheStats;
use crate::dataset::{Dataset, Schema};
use crate::log;

/// A preloaded dataset, replaced whole by each successful refresh.
pub struct Snapshot {
    name: String,
    current: ArcSwap<Dataset>,
    /// The first load's columns: endpoints were planned with them.
    schema: Schema,
    refresh: Option<Duration>,
    max_staleness: Option<Duration>,
    state: Mutex<State>,
    refresh_ok: AtomicU64,
    refresh_error: AtomicU64,
}

struct State {
    loaded: Instant,
    last: Option<Attempt>,
}

struct Attempt {
    at: Instant,
    error: Option<String>,
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot")
            .field("name", &self.name)
            .field("refresh", &self.refresh)
            .finish_non_exhaustive()
    }
}

impl Snapshot {
    /// A snapshot of `first`, refreshed every `refresh` (if set) and stale
    /// when older than `max_staleness`.
    pub fn new(
        first: Dataset,
        refresh: Option<Duration>,
        max_staleness: Option<Duration>,
    ) -> Snapshot {
        Snapshot {
            name: first.name().to_string(),
            schema: first.schema().clone(),
            current: ArcSwap::from_pointee(first),
            refresh,
            max_staleness,
            state: Mutex::new(State {
                loaded: Instant::now(),
                last: None,
            }),
            refresh_ok: AtomicU64::new(0),
            refresh_error: AtomicU64::new(0),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Columns of every snapshot (a reload with other columns is refused).
    pub fn schema(&self) -> &Schema {
        &self.schema
    }

    /// The current snapshot.
    pub fn current(&self) -> Arc<Dataset> {
        self.current.load_full()
    }

    /// Swaps in a complete new snapshot, unless its columns changed.
    pub fn replace(&self, next: Dataset) -> Result<(), String> {
        if next.schema() != &self.schema {
            let describe = |s: &Schema| {
                s.names
                    .iter()
                    .zip(&s.types)
                    .map(|(n, t)| format!("{n} {t}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            return Err(format!(
                "the query's columns changed from ({}) to ({}); keeping the last snapshot (restart the service to take new columns)",
                describe(&self.schema),
                describe(next.schema())
            ));
        }
        self.current.store(Arc::new(next));
        self.refresh_ok.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut s) = self.state.lock() {
            let now = Instant::now();
            s.loaded = now;
            s.last = Some(Attempt {
                at: now,
                error: None,
            });
        }
        Ok(())
    }

    /// Records a failed refresh; the last good snapshot stays.
    pub fn failed(&self, reason: String) {
        self.refresh_error.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut s) = self.state.lock() {
            s.last = Some(Attempt {
                at: Instant::now(),
                error: Some(reason),
            });
        }
    }

    /// What `/readyz` and `/metrics` report.
    pub fn status(&self) -> DatasetStatus {
        let (age, last) = match self.state.lock() {
            Ok(s) => (
                s.loaded.elapsed(),
                s.last.as_ref().map(|a| LastRefresh {
                    result: if a.error.is_none() { "ok" } else { "error" },
                    seconds_ago: round3(a.at.elapsed().as_secs_f64()),
                    error: a.error.clone(),
                }),
            ),
            Err(_) => (Duration::ZERO, None),
        };
        DatasetStatus {
            source: "sql",
            mode: "preload",
            rows: Some(self.current.load().rows() as u64),
            age_seconds: Some(round3(age.as_secs_f64())),
            refresh_secs: self.refresh.map(|d| d.as_secs()),
            max_staleness_secs: self.max_staleness.map(|d| d.as_secs()),
            last_refresh: last,
            refresh_total: self.refresh.map(|_| RefreshTotal {
                ok: self.refresh_ok.load(Ordering::Relaxed),
                error: self.refresh_error.load(Ordering::Relaxed),
            }),
            stale: self.max_staleness.is_some_and(|max| age > max),
            cache: None,
            queries_total: None,
        }
    }
}

/// Reloads `snapshot` every refresh interval with `load`, forever: a
/// complete load is swapped in, a failure is recorded and logged. One load at
/// a time; the next starts an interval after the previous one ended.
pub async fn refresh_loop<F, Fut>(snapshot: Arc<Snapshot>, load: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<Dataset, String>>,
{
    let Some(every) = snapshot.refresh else {
        return;
    };
    loop {
        tokio::time::sleep(every).await;
        let started = Instant::now();
        let result = load().await.and_then(|next| {
            let rows = next.rows();
            snapshot.replace(next).map(|()| rows)
        });
        match result {
            Ok(rows) => log::info(format_args!(
                "dataset `{}`: refreshed, {rows} rows in {:.1} ms",
                snapshot.name,
                started.elapsed().as_secs_f64() * 1e3
            )),
            Err(reason) => {
                log::warn(format_args!(
                    "dataset `{}`: refresh failed, serving the last snapshot: {reason}",
                    snapshot.name
                ));
                snapshot.failed(reason);
            }
        }
    }
}

/// The freshness of one dataset, as `/readyz` shows it (and `/metrics`
/// exports it).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DatasetStatus {
    /// `csv` or `sql`.
    pub source: &'static str,
    /// `preload` or `live`.
    pub mode: &'static str,
    /// Rows held (in-memory datasets).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rows: Option<u64>,
    /// Seconds since the rows served were loaded (in-memory datasets).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub age_seconds: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refresh_secs: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_staleness_secs: Option<u64>,
    /// The last refresh attempt (`null` before the first).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_refresh: Option<LastRefresh>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refresh_total: Option<RefreshTotal>,
    /// Older than `max_staleness_secs`: still served, but refreshes fail.
    pub stale: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheReport>,
    /// Queries a live dataset sent to its database, by result (cache hits
    /// and coalesced lookups send none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queries_total: Option<QueryTotal>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LastRefresh {
    /// `ok` or `error`.
    pub result: &'static str,
    pub seconds_ago: f64,
    /// Why it failed (never holds credentials).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RefreshTotal {
    pub ok: u64,
    pub error: u64,
}

/// Queries of a live dataset: answered, failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct QueryTotal {
    pub ok: u64,
    pub error: u64,
}

/// The cache of a live dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct CacheReport {
    pub entries: usize,
    pub max_entries: usize,
    pub ttl_ms: u64,
    pub hits: u64,
    pub misses: u64,
}

impl From<CacheStats> for CacheReport {
    fn from(s: CacheStats) -> CacheReport {
        CacheReport {
            entries: s.entries,
            max_entries: s.max_entries,
            ttl_ms: s.ttl_ms,
            hits: s.hits,
            misses: s.misses,
        }
    }
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}
