//! Prometheus metrics: request counts by endpoint, route and status, and a
//! latency histogram per endpoint and route. Lock-free counters; the text
//! exposition format is written by hand.

use std::collections::HashMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Histogram bucket upper bounds, in seconds.
const BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// Statuses counted separately; anything else counts as `other`.
const STATUSES: [u16; 16] = [
    200, 400, 401, 403, 404, 405, 408, 413, 415, 422, 429, 500, 502, 503, 504, 0,
];

/// Routes of the operational endpoints: `(path, label)`.
const SYSTEM: [(&str, &str); 8] = [
    ("/healthz", "healthz"),
    ("/docs", "docs"),
    ("/docs/assets", "docs-assets"),
    ("/readyz", "readyz"),
    ("/metrics", "metrics"),
    ("/openapi.json", "openapi"),
    ("/v2/health/live", "v2-live"),
    ("/v2/health/ready", "v2-ready"),
];

/// A latency histogram: lock-free, one atomic add per bucket.
#[derive(Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        if let Some(b) = BUCKETS.iter().position(|&le| secs <= le) {
            self.buckets[b].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
    }

    /// Appends the `_bucket`, `_sum` and `_count` lines of `name` with
    /// `labels` (`a="x",b="y"`); nothing before the first observation.
    pub fn render(&self, out: &mut String, name: &str, labels: &str) {
        let count = self.count.load(Ordering::Relaxed);
        if count == 0 {
            return;
        }
        let mut cumulative = 0;
        for (i, le) in BUCKETS.iter().enumerate() {
            cumulative += self.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{le}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {count}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
        let _ = writeln!(out, "{name}_count{{{labels}}} {count}");
    }
}

struct RouteStats {
    endpoint: String,
    route: &'static str,
    statuses: [AtomicU64; STATUSES.len()],
    latency: Histogram,
}

impl RouteStats {
    fn new(endpoint: &str, route: &'static str) -> RouteStats {
        RouteStats {
            endpoint: endpoint.to_string(),
            route,
            statuses: Default::default(),
            latency: Histogram::default(),
        }
    }
}

/// All counters of a service.
pub struct Metrics {
    service: String,
    routes: Vec<RouteStats>,
    /// endpoint → (route label, index into `routes`).
    by_endpoint: HashMap<String, Vec<(&'static str, usize)>>,
    /// Requests answered 504 by the request timeout.
    timeouts: AtomicU64,
}

/// Route labels of a prediction endpoint.
pub const PREDICTION_ROUTES: [&str; 5] = ["predict", "predict-multi", "infer", "metadata", "ready"];
/// Route label of the service-wide multi-endpoint lookup.
pub const SERVICE_ROUTE: &str = "lookup-endpoints";
/// Route labels of a lookup endpoint.
pub const LOOKUP_ROUTES: [&str; 2] = ["lookup", "lookup-multi"];

impl Metrics {
    /// `endpoints`: name and whether it is a prediction endpoint.
    pub fn new<'a>(service: &str, endpoints: impl IntoIterator<Item = (&'a str, bool)>) -> Metrics {
        let mut routes = Vec::new();
        for (_, label) in SYSTEM {
            routes.push(RouteStats::new("_system", label));
        }
        routes.push(RouteStats::new("_unmatched", "unmatched"));
        let mut by_endpoint = HashMap::new();
        // `/public/api/v1/{service}/lookup-endpoints`, under no endpoint.
        by_endpoint.insert(String::new(), vec![(SERVICE_ROUTE, routes.len())]);
        routes.push(RouteStats::new("_service", SERVICE_ROUTE));
        for (name, prediction) in endpoints {
            let labels: &[&'static str] = if prediction {
                &PREDICTION_ROUTES
            } else {
                &LOOKUP_ROUTES
            };
            let mut ids = Vec::new();
            for &label in labels {
                ids.push((label, routes.len()));
                routes.push(RouteStats::new(name, label));
            }
            by_endpoint.insert(name.to_string(), ids);
        }
        Metrics {
            service: service.to_string(),
            routes,
            by_endpoint,
            timeouts: AtomicU64::new(0),
        }
    }

    /// The counters a request path belongs to.
    pub fn route_id(&self, path: &str) -> usize {
        if let Some(i) = SYSTEM.iter().position(|(p, _)| *p == path) {
            return i;
        }
        if path.starts_with("/docs/assets/") {
            return SYSTEM
                .iter()
                .position(|(p, _)| *p == "/docs/assets")
                .unwrap_or(0);
        }
        let unmatched = SYSTEM.len();
        let mut parts = path.trim_start_matches('/').split('/');
        let (endpoint, action) = match (parts.next(), parts.next()) {
            (Some("public"), Some("api")) => {
                let (v, service, endpoint, action, rest) = (
                    parts.next(),
                    parts.next(),
                    parts.next(),
                    parts.next(),
                    parts.next(),
                );
                if v != Some("v1") || service != Some(self.service.as_str()) || rest.is_some() {
                    return unmatched;
                }
                match (endpoint, action) {
                    (Some(SERVICE_ROUTE), None) => ("", SERVICE_ROUTE),
                    (Some(e), Some(a)) => (e, a),
                    _ => return unmatched,
                }
            }
            (Some("v2"), Some("models")) => match (parts.next(), parts.next(), parts.next()) {
                (Some(name), None, None) => (name, "metadata"),
                (Some(name), Some("infer"), None) => (name, "infer"),
                (Some(name), Some("ready"), None) => (name, "ready"),
                _ => return unmatched,
            },
            _ => return unmatched,
        };
        self.by_endpoint
            .get(endpoint)
            .and_then(|ids| ids.iter().find(|(label, _)| *label == action))
            .map_or(unmatched, |&(_, id)| id)
    }

    /// A request answered 504 by the request timeout (`http::track`).
    pub fn record_timeout(&self) {
        self.timeouts.fetch_add(1, Ordering::Relaxed);
    }

    pub fn record(&self, route: usize, status: u16, elapsed: Duration) {
        let Some(stats) = self.routes.get(route) else {
            return;
        };
        let slot = STATUSES
            .iter()
            .position(|&s| s == status)
            .unwrap_or(STATUSES.len() - 1);
        stats.statuses[slot].fetch_add(1, Ordering::Relaxed);
        stats.latency.observe(elapsed);
    }

    /// The Prometheus text exposition.
    pub fn render(&self, ready: bool) -> String {
        let mut out = String::with_capacity(8192);
        let _ = writeln!(
            out,
            "# HELP mesh_ready Whether models and datasets are loaded."
        );
        let _ = writeln!(out, "# TYPE mesh_ready gauge");
        let _ = writeln!(
            out,
            "mesh_ready{{service=\"{}\"}} {}",
            esc(&self.service),
            u8::from(ready)
        );
        let _ = writeln!(
            out,
            "# HELP mesh_requests_total HTTP requests by endpoint, route and status."
        );
        let _ = writeln!(out, "# TYPE mesh_requests_total counter");
        for r in &self.routes {
            for (i, &status) in STATUSES.iter().enumerate() {
                let n = r.statuses[i].load(Ordering::Relaxed);
                if n == 0 {
                    continue;
                }
                let code = if status == 0 {
                    "other".to_string()
                } else {
                    status.to_string()
                };
                let _ = writeln!(
                    out,
                    "mesh_requests_total{{endpoint=\"{}\",route=\"{}\",code=\"{code}\"}} {n}",
                    esc(&r.endpoint),
                    r.route
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP mesh_request_duration_seconds Request latency by endpoint and route."
        );
        let _ = writeln!(out, "# TYPE mesh_request_duration_seconds histogram");
        for r in &self.routes {
            let labels = format!("endpoint=\"{}\",route=\"{}\"", esc(&r.endpoint), r.route);
            r.latency
                .render(&mut out, "mesh_request_duration_seconds", &labels);
        }
        let _ = writeln!(
            out,
            "# HELP mesh_request_timeouts_total Requests answered 504 because they took longer than the request timeout."
        );
        let _ = writeln!(out, "# TYPE mesh_request_timeouts_total counter");
        let _ = writeln!(
            out,
            "mesh_request_timeouts_total {}",
            self.timeouts.load(Ordering::Relaxed)
        );
        out
    }
}

/// Appends the access log's dropped lines (the writer fell behind).
pub fn render_access_log(out: &mut String, dropped: u64) {
    let _ = writeln!(
        out,
        "# HELP mesh_access_log_dropped_total Access log lines dropped because stderr could not keep up."
    );
    let _ = writeln!(out, "# TYPE mesh_access_log_dropped_total counter");
    let _ = writeln!(out, "mesh_access_log_dropped_total {dropped}");
}

/// Appends the query log's written and dropped lines.
pub fn render_query_log(out: &mut String, lines: u64, dropped: u64) {
    let _ = writeln!(
        out,
        "# HELP mesh_query_log_lines_total Query log lines queued for writing."
    );
    let _ = writeln!(out, "# TYPE mesh_query_log_lines_total counter");
    let _ = writeln!(out, "mesh_query_log_lines_total {lines}");
    let _ = writeln!(
        out,
        "# HELP mesh_query_log_dropped_total Query log lines dropped because the writer could not keep up."
    );
    let _ = writeln!(out, "# TYPE mesh_query_log_dropped_total counter");
    let _ = writeln!(out, "mesh_query_log_dropped_total {dropped}");
}

/// Appends the freshness of each dataset: rows, age, refreshes, staleness,
/// live cache hits and misses.
pub fn render_datasets<'a>(
    out: &mut String,
    datasets: impl IntoIterator<Item = (&'a str, crate::freshness::DatasetStatus)>,
) {
    let datasets: Vec<_> = datasets.into_iter().collect();
    let family = |out: &mut String, name: &str, kind: &str, help: &str| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
    };
    family(
        out,
        "mesh_dataset_rows",
        "gauge",
        "Rows held in memory by a dataset.",
    );
    for (name, s) in &datasets {
        if let Some(rows) = s.rows {
            let _ = writeln!(out, "mesh_dataset_rows{{dataset=\"{}\"}} {rows}", esc(name));
        }
    }
    family(
        out,
        "mesh_dataset_age_seconds",
        "gauge",
        "Seconds since the rows a dataset serves were loaded.",
    );
    for (name, s) in &datasets {
        if let Some(age) = s.age_seconds {
            let _ = writeln!(
                out,
                "mesh_dataset_age_seconds{{dataset=\"{}\"}} {age}",
                esc(name)
            );
        }
    }
    family(
        out,
        "mesh_dataset_refresh_total",
        "counter",
        "Refreshes of a preloaded dataset by result.",
    );
    for (name, s) in &datasets {
        if let Some(t) = s.refresh_total {
            for (result, n) in [("ok", t.ok), ("error", t.error)] {
                let _ = writeln!(
                    out,
                    "mesh_dataset_refresh_total{{dataset=\"{}\",result=\"{result}\"}} {n}",
                    esc(name)
                );
            }
        }
    }
    family(
        out,
        "mesh_dataset_stale",
        "gauge",
        "1 when a refreshing dataset is older than its max_staleness (still served).",
    );
    for (name, s) in &datasets {
        if s.refresh_secs.is_some() {
            let _ = writeln!(
                out,
                "mesh_dataset_stale{{dataset=\"{}\"}} {}",
                esc(name),
                u8::from(s.stale)
            );
        }
    }
    family(
        out,
        "mesh_dataset_cache_total",
        "counter",
        "Lookups of a live dataset's cache by result (hit, miss).",
    );
    for (name, s) in &datasets {
        if let Some(c) = s.cache {
            for (result, n) in [("hit", c.hits), ("miss", c.misses)] {
                let _ = writeln!(
                    out,
                    "mesh_dataset_cache_total{{dataset=\"{}\",result=\"{result}\"}} {n}",
                    esc(name)
                );
            }
        }
    }
    family(
        out,
        "mesh_dataset_queries_total",
        "counter",
        "Queries a live dataset sent to its database by result (ok, error).",
    );
    for (name, s) in &datasets {
        if let Some(q) = s.queries_total {
            for (result, n) in [("ok", q.ok), ("error", q.error)] {
                let _ = writeln!(
                    out,
                    "mesh_dataset_queries_total{{dataset=\"{}\",result=\"{result}\"}} {n}",
                    esc(name)
                );
            }
        }
    }
    family(
        out,
        "mesh_dataset_cache_entries",
        "gauge",
        "Keys held by a live dataset's cache.",
    );
    for (name, s) in &datasets {
        if let Some(c) = s.cache {
            let _ = writeln!(
                out,
                "mesh_dataset_cache_entries{{dataset=\"{}\"}} {}",
                esc(name),
                c.entries
            );
        }
    }
}

/// A remote enrichment's cache, or an upstream of a prediction endpoint.
pub enum RemoteStatus<'a> {
    Cache {
        endpoint: &'a str,
        /// The upstream lookup endpoint it reads.
        enrichment: &'a str,
        stats: crate::cache::CacheStats,
    },
    Upstream {
        endpoint: &'a str,
        /// The upstream service address.
        upstream: &'a str,
        stats: crate::remote::UpstreamStats,
    },
}

/// Appends the enrichment caches' hits and misses and the requests sent to
/// upstream services.
pub fn render_remotes(out: &mut String, remotes: &[RemoteStatus<'_>]) {
    let _ = writeln!(
        out,
        "# HELP mesh_enrichment_cache_total Lookups of a remote enrichment's cache by result (hit, miss).\n# TYPE mesh_enrichment_cache_total counter"
    );
    for r in remotes {
        if let RemoteStatus::Cache {
            endpoint,
            enrichment,
            stats,
        } = r
        {
            for (result, n) in [("hit", stats.hits), ("miss", stats.misses)] {
                let _ = writeln!(
                    out,
                    "mesh_enrichment_cache_total{{endpoint=\"{}\",enrichment=\"{}\",result=\"{result}\"}} {n}",
                    esc(endpoint),
                    esc(enrichment)
                );
            }
        }
    }
    let _ = writeln!(
        out,
        "# HELP mesh_upstream_requests_total Requests sent to an upstream service for enrichments by result (ok, error).\n# TYPE mesh_upstream_requests_total counter"
    );
    for r in remotes {
        if let RemoteStatus::Upstream {
            endpoint,
            upstream,
            stats,
        } = r
        {
            for (result, n) in [("ok", stats.ok), ("error", stats.error)] {
                let _ = writeln!(
                    out,
                    "mesh_upstream_requests_total{{endpoint=\"{}\",upstream=\"{}\",result=\"{result}\"}} {n}",
                    esc(endpoint),
                    esc(upstream)
                );
            }
        }
    }
}

pub(crate) fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_and_exposition() {
        let m = Metrics::new("svc", [("hv", true), ("demo", false)]);
        let id = m.route_id("/public/api/v1/svc/hv/predict");
        assert_ne!(id, m.route_id("/nope"));
        assert_eq!(
            m.route_id("/public/api/v1/other/hv/predict"),
            m.route_id("/nope")
        );
        assert_eq!(
            m.route_id("/public/api/v1/svc/demo/predict"),
            m.route_id("/nope")
        );
        m.record(id, 200, Duration::from_micros(300));
        m.record(id, 400, Duration::from_millis(3));
        m.record(
            m.route_id("/v2/models/hv/infer"),
            200,
            Duration::from_micros(50),
        );
        let text = m.render(true);
        assert!(
            text.contains("mesh_requests_total{endpoint=\"hv\",route=\"predict\",code=\"200\"} 1"),
            "{text}"
        );
        assert!(text.contains("mesh_request_duration_seconds_bucket{endpoint=\"hv\",route=\"predict\",le=\"0.0005\"} 1"));
        assert!(
            text.contains(
                "mesh_request_duration_seconds_count{endpoint=\"hv\",route=\"predict\"} 2"
            )
        );
        assert!(text.contains("route=\"infer\",code=\"200\"} 1"));
    }
}
