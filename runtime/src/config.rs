//! The bundle: the contract between the `mesh` CLI and the runtime.
//!
//! A bundle is a folder holding `service.json` (a [`ServiceConfig`]) next to
//! the files it names: ONNX models and CSV datasets. Every relative path in
//! `service.json` is relative to the bundle folder. The CLI generates the file
//! from a stack with these types; the runtime reads it with [`Bundle::open`].
//!
//! ```json
//! {
//!   "service": "customer-scoring",
//!   "version": "1.0.0",
//!   "api_keys": [ {"env": "MESH_API_KEY_SCORING"} ],
//!   "limits": { "max_body_bytes": 1048576, "max_batch": 1000 },
//!   "connections": { "warehouse": { "kind": "postgres", "host": "127.0.0.1", "port": 5432,
//!       "database": "mesh", "user": "mesh", "password": {"env": "MESH_CONN_WAREHOUSE_PASSWORD"} } },
//!   "datasets": {
//!     "customers": { "source": {"csv": "datasets/customers.csv"}, "key": "customer_id" },
//!     "behavior":  { "source": {"sql": {"connection": "warehouse", "query": "select * from behavior"}},
//!                    "key": "customer_id", "mode": "live" }
//!   },
//!   "endpoints": {
//!     "demographics": { "kind": "lookup", "datasets": ["customers"] },
//!     "high-value": { "kind": "prediction", "model": "models/high_value.onnx",
//!       "enrichments": [
//!         { "dataset": "customers", "key": "customer_id", "columns": ["age", "gender"] },
//!         { "lookup": {"url": "http://127.0.0.1:30080/public/api/v1/customer-features/behavior/lookup"},
//!           "key": "customer_id", "columns": ["total_spend_30d"], "on_missing": "null" } ] }
//!   }
//! }
//! ```
//!
//! Secrets (API keys, database passwords) are never written into the bundle:
//! only [`SecretRef`]s are, resolved once at start.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// File name of the service description inside a bundle folder.
pub const SERVICE_FILE: &str = "service.json";

/// `service.json`: one service, its endpoints and what they need.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// Service name: the `{service}` segment of `/public/api/v1/{service}/...`.
    pub service: String,
    /// Free-form version, reported by the v2 model metadata.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Accepted API keys: keys by reference, or callers' verifiers (see
    /// `auth`). Empty, and no `known_callers`: no authentication.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub api_keys: Vec<ApiKey>,
    /// Verifiers of the mesh's identities that may not call this service:
    /// their keys are recognised and refused with 403 (any other key: 401).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub known_callers: Vec<CallerKey>,
    /// Request limits.
    #[serde(default)]
    pub limits: Limits,
    /// Database connections, by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub connections: BTreeMap<String, ConnectionConfig>,
    /// Datasets, by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub datasets: BTreeMap<String, DatasetConfig>,
    /// Endpoints, by name: the `{endpoint}` segment of the API paths.
    pub endpoints: BTreeMap<String, EndpointConfig>,
    /// A path prefix (`/features`) under which every route is served too,
    /// for a proxy that forwards it unchanged (an Ingress path). The routes
    /// stay at the root as well, so probes and in-cluster callers reach them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_path: Option<String>,
    /// Serve HTTPS with this certificate and key instead of plain HTTP (the
    /// local target's `tls = { self_signed = true }`): every connection to
    /// the port is TLS, probes included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsFiles>,
    /// Write one JSON line per request to stderr (see `access_log`). The
    /// local target leaves it off unless the stack asks; clusters turn it on.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub access_log: bool,
    /// The weights of the endpoints' generations ([`SplitFile`]), kept out
    /// of the bundle so a weight change is not a new bundle. Left out: the
    /// `weight`s in `generations`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split_file: Option<PathBuf>,
    /// The query log; left out: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query_log: Option<QueryLogConfig>,
}

/// A certificate chain and its private key, PEM files (relative to the
/// bundle folder, or absolute). The key is a file reference like a secret:
/// never in the bundle's text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// An accepted API key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ApiKey {
    /// `{"env": ...}` / `{"file": ...}`: a key itself, whoever holds it.
    Key(SecretRef),
    /// `{"caller": NAME, "verifier": {"file": ...}}`: a caller's verifier.
    Caller(CallerKey),
}

/// A caller of the mesh and its verifier: lines `hmac-sha256:HEX`, one per
/// key of the caller's (two while keys rotate), see `auth::verifier`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallerKey {
    pub caller: String,
    pub verifier: SecretRef,
}

/// A reference to a secret; the value itself never appears in a bundle.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum SecretRef {
    /// `{"env": "NAME"}`: the value of an environment variable.
    Env(String),
    /// `{"file": "PATH"}`: a file's content, trailing newline removed;
    /// relative to the bundle folder.
    File(PathBuf),
}

impl fmt::Debug for SecretRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretRef::Env(name) => write!(f, "env:{name}"),
            SecretRef::File(path) => write!(f, "file:{}", path.display()),
        }
    }
}

impl fmt::Display for SecretRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Request limits of the service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Largest accepted request body; larger bodies get 413.
    #[serde(default = "Limits::default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// Largest number of items in a `*-multi` request or rows in a v2 infer
    /// request; larger batches get 413.
    #[serde(default = "Limits::default_max_batch")]
    pub max_batch: usize,
    /// Longest a request may take, in milliseconds, from its head read to
    /// its answer; then it is answered 504 (see `http`). Absent: 30 s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_timeout_ms: Option<u64>,
    /// Request copies each shadow generation may have waiting before new
    /// ones are dropped (counted). Absent: 1024.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow_queue: Option<usize>,
    /// The share of one core each shadow generation's scoring thread may
    /// use, in `(0, 1]`: after each batch it sleeps long enough to stay
    /// within it (copies arriving meanwhile wait or are dropped, counted).
    /// Absent: [`Limits::DEFAULT_SHADOW_CPU`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow_cpu: Option<f64>,
    /// Whether a shadow starts a batch only when the machine has had a core
    /// to spare besides its share (`/proc/stat`). Absent: true. False where
    /// the shadow's CPU is reserved for it, as in a pod that requests it: the
    /// node's idle time is then other pods' business, and the budget alone
    /// holds the shadow back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow_idle_gate: Option<bool>,
}

impl Limits {
    /// The request timeout when `request_timeout_ms` is absent.
    pub const DEFAULT_REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

    fn default_max_body_bytes() -> usize {
        1024 * 1024
    }
    fn default_max_batch() -> usize {
        1000
    }

    /// The shadow CPU budget when `shadow_cpu` is absent: a quarter core.
    pub const DEFAULT_SHADOW_CPU: f64 = 0.25;

    /// `shadow_cpu`, or [`Limits::DEFAULT_SHADOW_CPU`].
    pub fn shadow_cpu(&self) -> f64 {
        self.shadow_cpu.unwrap_or(Self::DEFAULT_SHADOW_CPU)
    }

    /// `shadow_idle_gate`, or true.
    pub fn shadow_idle_gate(&self) -> bool {
        self.shadow_idle_gate.unwrap_or(true)
    }

    /// `shadow_queue`, or 1024.
    pub fn shadow_queue(&self) -> usize {
        self.shadow_queue.unwrap_or(1024).max(1)
    }

    /// `request_timeout_ms`, or [`Limits::DEFAULT_REQUEST_TIMEOUT`].
    pub fn request_timeout(&self) -> std::time::Duration {
        self.request_timeout_ms.map_or(
            Self::DEFAULT_REQUEST_TIMEOUT,
            std::time::Duration::from_millis,
        )
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: Self::default_max_body_bytes(),
            max_batch: Self::default_max_batch(),
            request_timeout_ms: None,
            shadow_queue: None,
            shadow_cpu: None,
            shadow_idle_gate: None,
        }
    }
}

/// A database connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum ConnectionConfig {
    /// PostgreSQL over TCP, optionally with TLS.
    Postgres {
        host: String,
        #[serde(default = "default_pg_port")]
        port: u16,
        database: String,
        user: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        password: Option<SecretRef>,
        /// Connections kept open for `live` datasets (default 4).
        #[serde(default = "default_pool_size")]
        pool_size: usize,
        /// TLS: `disable` (the default), `require` or `verify-full`.
        #[serde(default)]
        sslmode: SslMode,
        /// PEM file of the CAs that `verify-full` trusts (relative to the
        /// bundle folder, or absolute); without it, the Mozilla root set.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ca_file: Option<PathBuf>,
        /// Limit of one live query, server-side (`statement_timeout`) and
        /// client-side (default 5000).
        #[serde(default = "default_db_timeout_ms")]
        statement_timeout_ms: u64,
        /// Limit of opening one connection (default 5000).
        #[serde(default = "default_db_timeout_ms")]
        connect_timeout_ms: u64,
    },
    /// Snowflake over HTTPS (see `snowflake`); exactly one of `password`
    /// and `private_key` (PEM, PKCS#8, for key-pair authentication).
    Snowflake {
        /// Account identifier: `myorg-account1` or a locator `xy12345.eu-west-1`.
        account: String,
        user: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        password: Option<SecretRef>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        private_key: Option<SecretRef>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        warehouse: Option<String>,
        database: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        schema: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        role: Option<String>,
        /// Base URL (private link, or a local server in tests); default
        /// `https://<account>.snowflakecomputing.com`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        url: Option<String>,
        /// HTTP connections kept open (default 4).
        #[serde(default = "default_pool_size")]
        pool_size: usize,
        /// Limit of one live query, round trips and polls included (default 5000).
        #[serde(default = "default_db_timeout_ms")]
        statement_timeout_ms: u64,
    },
}

impl ConnectionConfig {
    /// The connection's secret references: a password, a private key.
    pub fn secrets_mut(&mut self) -> impl Iterator<Item = &mut SecretRef> {
        match self {
            ConnectionConfig::Postgres { password, .. } => [password.as_mut(), None],
            ConnectionConfig::Snowflake {
                password,
                private_key,
                ..
            } => [password.as_mut(), private_key.as_mut()],
        }
        .into_iter()
        .flatten()
    }
}

/// TLS to PostgreSQL, named as libpq's `sslmode`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    /// Plain TCP.
    #[default]
    Disable,
    /// TLS, without checking the server's certificate.
    Require,
    /// TLS; the certificate chain must lead to a trusted CA and name the host.
    VerifyFull,
}

fn default_pg_port() -> u16 {
    5432
}
fn default_pool_size() -> usize {
    4
}
fn default_db_timeout_ms() -> u64 {
    5000
}

/// A dataset: rows indexed by a key column.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetConfig {
    pub source: DatasetSource,
    /// Name of the key column.
    pub key: String,
    /// What to do with a key seen twice (in-memory datasets).
    #[serde(default)]
    pub duplicates: Duplicates,
    /// Load everything at start, or query per request (SQL only).
    #[serde(default)]
    pub mode: DatasetMode,
    /// Column types that override inference (CSV), by column name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub columns: BTreeMap<String, ColumnType>,
    /// `preload` of a SQL source only: reload every this many seconds; a new
    /// snapshot replaces the old one only once completely loaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_secs: Option<u64>,
    /// With `refresh_secs`: the snapshot is reported stale (and still served)
    /// once older than this (default 3 × `refresh_secs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_staleness_secs: Option<u64>,
    /// `live` only: keep rows (and misses) fetched by key for a while.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheConfig>,
}

impl DatasetConfig {
    /// Age after which a refreshing snapshot is stale: `max_staleness_secs`,
    /// else 3 × `refresh_secs`; `None` for datasets that do not refresh.
    pub fn max_staleness(&self) -> Option<u64> {
        let refresh = self.refresh_secs?;
        Some(
            self.max_staleness_secs
                .unwrap_or_else(|| refresh.saturating_mul(3)),
        )
    }
}

/// The cache of a `live` dataset or of a remote enrichment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// How long a fetched row (or the absence of one) is reused.
    pub ttl_ms: u64,
    /// Most keys held; the oldest entries go first.
    pub max_entries: usize,
}

/// Where a dataset's rows come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum DatasetSource {
    /// `{"csv": "datasets/customers.csv"}`: a CSV file with a header line,
    /// relative to the bundle folder. An empty field is a null.
    Csv(PathBuf),
    /// `{"sql": {"connection": "warehouse", "query": "select ..."}}`.
    Sql(SqlSource),
}

/// A SQL query over a named connection. For `live` datasets the runtime wraps
/// it as `SELECT ... FROM (query) WHERE key = $1`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqlSource {
    pub connection: String,
    pub query: String,
}

/// Handling of duplicate keys.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Duplicates {
    /// Refuse to load (the default).
    #[default]
    Error,
    /// The last row with the key wins.
    Last,
}

/// When a dataset's rows are read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DatasetMode {
    /// Read all rows at start into memory (the default).
    #[default]
    Preload,
    /// Query the source per request by key (SQL only).
    Live,
    /// A query frozen into the bundle at apply: `mesh-runtime freeze`
    /// runs it and rewrites the dataset as a CSV file of the bundle (then
    /// `preload`); `serve` refuses a bundle still holding one.
    Bundle,
}

/// Type of a dataset column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ColumnType {
    /// 64-bit signed integer.
    Int,
    /// 64-bit float.
    Float,
    /// `true`/`false`.
    Bool,
    /// UTF-8 text.
    String,
}

impl fmt::Display for ColumnType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ColumnType::Int => "int",
            ColumnType::Float => "float",
            ColumnType::Bool => "bool",
            ColumnType::String => "string",
        })
    }
}

/// An endpoint of the service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum EndpointConfig {
    /// Keys in, rows out (`lookup`, `lookup-multi`); rows of several datasets
    /// are merged by key.
    Lookup { datasets: Vec<String> },
    /// Features in, prediction out (`predict`, `predict-multi`, v2 `infer`).
    /// Exactly one of `model` (one model, answers name no generation) and
    /// `generations` (several models side by side, see [`GenerationConfig`]).
    Prediction {
        /// ONNX model file, relative to the bundle folder.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        model: Option<PathBuf>,
        /// The endpoint's generations, in declaration order (key dispatch
        /// assigns hash buckets in this order).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        generations: Vec<GenerationConfig>,
        /// How a request picks its serving generation.
        #[serde(default, skip_serializing_if = "Dispatch::is_random")]
        dispatch: Dispatch,
        /// Applied in order; each fills only features still missing.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        enrichments: Vec<EnrichmentConfig>,
    },
}

impl EndpointConfig {
    /// Every enrichment of a prediction endpoint: the endpoint's, then each
    /// generation's own, in declaration order (none for a lookup endpoint).
    pub fn all_enrichments(&self) -> Vec<&EnrichmentConfig> {
        match self {
            EndpointConfig::Prediction {
                enrichments,
                generations,
                ..
            } => enrichments
                .iter()
                .chain(
                    generations
                        .iter()
                        .flat_map(|g| g.enrichments.iter().flatten()),
                )
                .collect(),
            EndpointConfig::Lookup { .. } => Vec::new(),
        }
    }

    /// [`EndpointConfig::all_enrichments`], to rewrite them (in that order).
    pub fn all_enrichments_mut(&mut self) -> Vec<&mut EnrichmentConfig> {
        match self {
            EndpointConfig::Prediction {
                enrichments,
                generations,
                ..
            } => enrichments
                .iter_mut()
                .chain(
                    generations
                        .iter_mut()
                        .flat_map(|g| g.enrichments.iter_mut().flatten()),
                )
                .collect(),
            EndpointConfig::Lookup { .. } => Vec::new(),
        }
    }
}

/// One model of a prediction endpoint with generations: it serves a share
/// of the traffic (`weight`, percent; the serving generations' weights sum
/// to 100) or, with `shadow`, scores a copy of it off the request path and
/// is compared with the generation that served, never answering.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerationConfig {
    /// Named in answers (`"generation"`, header `X-Mesh-Generation`),
    /// metrics and the query log; a request may pin it with that header.
    pub name: String,
    /// ONNX model file, relative to the bundle folder.
    pub model: PathBuf,
    /// Percent of the traffic (0..=100). Left out when `split_file` gives
    /// the weights; never set on a shadow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    /// Receives a copy of the traffic; its answers are recorded and
    /// compared, never returned.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shadow: bool,
    /// This generation's own enrichments, in place of the endpoint's (a
    /// model that reads a feature from another source); `None`: the
    /// endpoint's. Its model still takes the same inputs as the others.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enrichments: Option<Vec<EnrichmentConfig>>,
    /// A shadow's CPU budget, a share of one core in `(0, 1]`, in place of
    /// `limits.shadow_cpu`; never set on a serving generation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<f64>,
}

/// How a prediction endpoint with generations picks the serving one.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum Dispatch {
    /// Each request independently, with the weights as probabilities.
    #[default]
    Random,
    /// `{"key": "customer_id"}`: a stable hash of this request feature picks
    /// the generation, so a key always lands on the same one; buckets are
    /// given to generations in declaration order, so moving weight between
    /// two neighbours moves only keys between them.
    Key(String),
}

impl Dispatch {
    /// The default, left out of `service.json`.
    pub fn is_random(&self) -> bool {
        matches!(self, Dispatch::Random)
    }
}

/// `split_file`: the current weights of the serving generations, which the
/// runtime re-reads when the file changes (so a weight change restarts
/// nothing): `{"ENDPOINT": {"GENERATION": WEIGHT, ...}, ...}`, every
/// endpoint with generations, every serving generation, weights summing to
/// 100. A file that is not valid keeps the previous split.
pub type SplitFile = BTreeMap<String, BTreeMap<String, u32>>;

/// `query_log`: one JSON line per prediction or lookup (and per
/// authentication failure, apart, never with the key presented).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueryLogConfig {
    /// File the lines are appended to; left out: standard output (the
    /// cluster's log pipeline takes it there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// Fraction of queries logged, 0.0..=1.0 (default 1.0).
    #[serde(default = "default_sample")]
    pub sample: f64,
    /// Fields (request features, enriched values, lookup columns) whose
    /// values never appear in the log.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub redact: Vec<String>,
}

fn default_sample() -> f64 {
    1.0
}

/// Fills missing features of a prediction request from a row found by key.
/// Exactly one of `dataset` and `lookup` is set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrichmentConfig {
    /// A dataset of this bundle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset: Option<String>,
    /// Another mesh service's lookup endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lookup: Option<RemoteLookup>,
    /// Request feature holding the key (sent to a remote lookup under the
    /// same name).
    pub key: String,
    /// Columns to fill; each names a model feature. Empty (or left out):
    /// every model input the source has (for a remote lookup, as its rows
    /// come back), so datasets whose columns are known only once queried
    /// can enrich.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub columns: Vec<String>,
    /// What to do when no row has the key.
    #[serde(default)]
    pub on_missing: OnMissing,
    /// Keeps the rows of a remote lookup (or the fact that there is none)
    /// for `ttl_ms`: an enriched value may be up to that old. Off by
    /// default; not for a `dataset` (read in process already).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheConfig>,
}

/// A remote lookup endpoint (`.../{endpoint}/lookup` of another service).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteLookup {
    /// `http://host:port/public/api/v1/{service}/{endpoint}/lookup`. The
    /// runtime calls the service's `lookup-endpoints` route, once for all
    /// the endpoint's enrichments that read that service with one key.
    pub url: String,
    /// API key sent as `Authorization: Bearer`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<SecretRef>,
    /// Per-call timeout (default 2000 ms); exceeding it gives 504.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// For an `https://` url: the certificates (PEM) trusted for it, e.g.
    /// the upstream's self-signed one; without it, the Mozilla roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
}

fn default_timeout_ms() -> u64 {
    2000
}

/// Behaviour of an enrichment whose key has no row.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnMissing {
    /// 404 naming the key and the source (the default).
    #[default]
    Error,
    /// Fill the columns with nulls: missing values for the model (NaN for
    /// numeric inputs, the empty string for string inputs).
    Null,
}

/// Errors reading or validating a bundle.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// `service.json` could not be read.
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `service.json` is not a valid service description.
    #[error("invalid {path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// The description is well-formed but inconsistent.
    #[error("invalid {path}:\n  - {}", problems.join("\n  - "))]
    Invalid {
        path: PathBuf,
        problems: Vec<String>,
    },
    /// A secret reference could not be resolved.
    #[error("cannot resolve secret {reference}: {reason}")]
    Secret {
        reference: SecretRef,
        reason: String,
    },
}

/// A bundle on disk: its folder and parsed, validated `service.json`.
#[derive(Debug, Clone)]
pub struct Bundle {
    pub dir: PathBuf,
    pub config: ServiceConfig,
}

impl Bundle {
    /// Reads and validates `DIR/service.json`. Reports every problem found.
    pub fn open(dir: &Path) -> Result<Bundle, ConfigError> {
        let path = dir.join(SERVICE_FILE);
        let text = std::fs::read(&path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        let config: ServiceConfig =
            serde_json::from_slice(&text).map_err(|source| ConfigError::Parse {
                path: path.clone(),
                source,
            })?;
        let problems = config.problems();
        if !problems.is_empty() {
            return Err(ConfigError::Invalid { path, problems });
        }
        Ok(Bundle {
            dir: dir.to_path_buf(),
            config,
        })
    }

    /// A path of the bundle, resolved against the bundle folder.
    pub fn path(&self, relative: &Path) -> PathBuf {
        self.dir.join(relative)
    }

    /// Resolves a secret reference (file references relative to the bundle).
    pub fn resolve(&self, secret: &SecretRef) -> Result<String, ConfigError> {
        resolve_in(&self.dir, secret)
    }
}

/// Resolves a secret reference, file references relative to `dir`.
pub fn resolve_in(dir: &Path, secret: &SecretRef) -> Result<String, ConfigError> {
    let fail = |reason: String| ConfigError::Secret {
        reference: secret.clone(),
        reason,
    };
    let value = match secret {
        SecretRef::Env(name) => std::env::var(name).map_err(|e| match e {
            std::env::VarError::NotPresent => fail("variable not set".into()),
            std::env::VarError::NotUnicode(_) => fail("variable is not UTF-8".into()),
        })?,
        SecretRef::File(path) => {
            let mut text = std::fs::read_to_string(dir.join(path))
                .map_err(|e| fail(format!("cannot read file: {}", e.kind())))?;
            while text.ends_with('\n') || text.ends_with('\r') {
                text.pop();
            }
            text
        }
    };
    if value.is_empty() {
        return Err(fail("value is empty".into()));
    }
    Ok(value)
}

/// `/a`, `/a/b-c`: a rooted path, not `/`, without a trailing `/`, empty
/// segments or characters a route cannot hold, and not starting where a
/// route of the root does (`/v2`, `/public`, `/healthz`, ...).
pub fn valid_base_path(p: &str) -> bool {
    const ROOT: &[&str] = &[
        "healthz",
        "readyz",
        "v2",
        "metrics",
        "openapi.json",
        "public",
    ];
    p.len() > 1
        && p.starts_with('/')
        && !ROOT.contains(&p[1..].split('/').next().unwrap_or_default())
        && p[1..].split('/').all(|seg| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && seg
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-._~".contains(c))
        })
}

impl ServiceConfig {
    /// Every secret reference of the service: API keys, connection
    /// passwords and private keys, remote lookups' API keys. What delivers
    /// secrets (the CLI's providers) rewrites them through this one list, so
    /// a secret field added here cannot be forgotten there.
    pub fn secrets_mut(&mut self) -> impl Iterator<Item = &mut SecretRef> {
        let connections = self
            .connections
            .values_mut()
            .flat_map(ConnectionConfig::secrets_mut);
        let lookups = self
            .endpoints
            .values_mut()
            .flat_map(EndpointConfig::all_enrichments_mut)
            .filter_map(|en| en.lookup.as_mut()?.api_key.as_mut());
        let keys = self.api_keys.iter_mut().map(|k| match k {
            ApiKey::Key(r) => r,
            ApiKey::Caller(c) => &mut c.verifier,
        });
        let known = self.known_callers.iter_mut().map(|c| &mut c.verifier);
        keys.chain(known).chain(connections).chain(lookups)
    }

    /// Consistency problems: dangling references, bad names, empty lists.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !valid_name(&self.service) {
            out.push(format!(
                "service name `{}` must be non-empty and use only letters, digits, `-`, `_` and `.`",
                self.service
            ));
        }
        if let Some(p) = &self.base_path
            && !valid_base_path(p)
        {
            out.push(format!(
                "base_path `{p}` must start with `/`, not end with `/`, hold only path characters and not start like a route of the root (`/v2`, `/public`, `/healthz`, ...), e.g. `/features`"
            ));
        }
        if self.limits.max_body_bytes == 0
            || self.limits.max_batch == 0
            || self.limits.request_timeout_ms == Some(0)
        {
            out.push("limits must be positive".into());
        }
        if let Some(cpu) = self.limits.shadow_cpu
            && !(cpu > 0.0 && cpu <= 1.0)
        {
            out.push(format!(
                "limits.shadow_cpu {cpu} must be a share of one core in (0, 1], e.g. 0.25"
            ));
        }
        for (name, conn) in &self.connections {
            let pool_size = match conn {
                ConnectionConfig::Postgres {
                    pool_size,
                    sslmode,
                    ca_file,
                    statement_timeout_ms,
                    connect_timeout_ms,
                    ..
                } => {
                    if ca_file.is_some() && *sslmode != SslMode::VerifyFull {
                        out.push(format!(
                            "connection `{name}`: ca_file is used only with sslmode `verify-full`"
                        ));
                    }
                    if *statement_timeout_ms == 0 || *connect_timeout_ms == 0 {
                        out.push(format!(
                            "connection `{name}`: statement_timeout_ms and connect_timeout_ms must be positive"
                        ));
                    }
                    pool_size
                }
                ConnectionConfig::Snowflake {
                    password,
                    private_key,
                    statement_timeout_ms,
                    pool_size,
                    ..
                } => {
                    if password.is_some() == private_key.is_some() {
                        out.push(format!(
                            "connection `{name}`: set exactly one of password and private_key"
                        ));
                    }
                    if *statement_timeout_ms == 0 {
                        out.push(format!(
                            "connection `{name}`: statement_timeout_ms must be positive"
                        ));
                    }
                    pool_size
                }
            };
            if *pool_size == 0 || *pool_size > 64 {
                out.push(format!(
                    "connection `{name}`: pool_size must be between 1 and 64"
                ));
            }
        }
        for (name, ds) in &self.datasets {
            if ds.key.is_empty() {
                out.push(format!("dataset `{name}`: key must not be empty"));
            }
            let csv = matches!(ds.source, DatasetSource::Csv(_));
            match (ds.mode, ds.refresh_secs) {
                (DatasetMode::Bundle, Some(_)) => out.push(format!(
                    "dataset `{name}`: refresh_secs applies to mode `preload`, not `bundle` (frozen at apply)"
                )),
                (DatasetMode::Live, Some(_)) => out.push(format!(
                    "dataset `{name}`: refresh_secs applies to mode `preload`, not `live` (a live dataset is queried per request)"
                )),
                (_, Some(_)) if csv => out.push(format!(
                    "dataset `{name}`: refresh_secs needs a `sql` source (a csv file in the bundle does not change)"
                )),
                (_, Some(0)) => out.push(format!(
                    "dataset `{name}`: refresh_secs must be positive"
                )),
                _ => {}
            }
            if ds.max_staleness_secs.is_some() && ds.refresh_secs.is_none() {
                out.push(format!(
                    "dataset `{name}`: max_staleness_secs needs refresh_secs (only a refreshing dataset gets stale)"
                ));
            }
            if let Some(cache) = &ds.cache {
                if csv {
                    out.push(format!(
                        "dataset `{name}`: cache applies to mode `live` with a `sql` source, not to a csv file (held in memory already)"
                    ));
                } else if ds.mode != DatasetMode::Live {
                    out.push(format!(
                        "dataset `{name}`: cache applies to mode `live`, not `preload` (held in memory already)"
                    ));
                }
                if cache.ttl_ms == 0 || cache.max_entries == 0 {
                    out.push(format!(
                        "dataset `{name}`: cache ttl_ms and max_entries must be positive"
                    ));
                }
            }
            match &ds.source {
                DatasetSource::Csv(_) => {
                    if ds.mode == DatasetMode::Live {
                        out.push(format!(
                            "dataset `{name}`: mode `live` needs a `sql` source"
                        ));
                    }
                }
                DatasetSource::Sql(sql) => {
                    if !self.connections.contains_key(&sql.connection) {
                        out.push(format!(
                            "dataset `{name}`: unknown connection `{}`",
                            sql.connection
                        ));
                    }
                    if sql.query.trim().is_empty() {
                        out.push(format!("dataset `{name}`: query must not be empty"));
                    }
                }
            }
        }
        if self.endpoints.is_empty() {
            out.push("no endpoints declared".into());
        }
        for (name, ep) in &self.endpoints {
            if !valid_name(name) {
                out.push(format!(
                    "endpoint name `{name}` must use only letters, digits, `-`, `_` and `.`"
                ));
            }
            match ep {
                EndpointConfig::Lookup { datasets } => {
                    if datasets.is_empty() {
                        out.push(format!("endpoint `{name}`: no datasets"));
                    }
                    for ds in datasets {
                        if !self.datasets.contains_key(ds) {
                            out.push(format!("endpoint `{name}`: unknown dataset `{ds}`"));
                        }
                    }
                }
                EndpointConfig::Prediction {
                    model,
                    generations,
                    dispatch,
                    enrichments,
                } => {
                    generation_problems(
                        name,
                        model.is_some(),
                        generations,
                        dispatch,
                        self.split_file.is_some(),
                        &mut out,
                    );
                    let own = generations.iter().flat_map(|g| {
                        g.enrichments.iter().flatten().enumerate().map(|(i, en)| {
                            let at = format!(
                                "endpoint `{name}` generation `{}` enrichment {}",
                                g.name,
                                i + 1
                            );
                            (at, en)
                        })
                    });
                    let endpoint = enrichments
                        .iter()
                        .enumerate()
                        .map(|(i, en)| (format!("endpoint `{name}` enrichment {}", i + 1), en));
                    for (at, en) in endpoint.chain(own) {
                        match (&en.dataset, &en.lookup) {
                            (Some(ds), None) => {
                                if !self.datasets.contains_key(ds) {
                                    out.push(format!("{at}: unknown dataset `{ds}`"));
                                }
                            }
                            (None, Some(remote)) => {
                                let https = remote.url.starts_with("https://");
                                if !https && !remote.url.starts_with("http://") {
                                    out.push(format!(
                                        "{at}: lookup url must start with `http://` or `https://`"
                                    ));
                                } else if !remote.url.ends_with("/lookup") {
                                    out.push(format!("{at}: lookup url must end with `/lookup`"));
                                }
                                if remote.timeout_ms == 0 {
                                    out.push(format!("{at}: timeout_ms must be positive"));
                                }
                                if remote.ca_file.is_some() && !https {
                                    out.push(format!(
                                        "{at}: ca_file is used only with an `https://` lookup url"
                                    ));
                                }
                            }
                            _ => {
                                out.push(format!("{at}: set exactly one of `dataset` and `lookup`"))
                            }
                        }
                        if let Some(cache) = &en.cache {
                            if en.lookup.is_none() {
                                out.push(format!(
                                    "{at}: cache applies to a remote `lookup`, not to a dataset (read in process already)"
                                ));
                            }
                            if cache.ttl_ms == 0 || cache.max_entries == 0 {
                                out.push(format!(
                                    "{at}: cache ttl_ms and max_entries must be positive"
                                ));
                            }
                        }
                        if en.key.is_empty() {
                            out.push(format!("{at}: key must not be empty"));
                        }
                    }
                }
            }
        }
        out
    }
}

/// A prediction endpoint's `model` / `generations` / `dispatch`: one of
/// the first two; generation names valid and unique; weights on every
/// serving generation (unless `split_file` gives them) summing to 100,
/// never on a shadow; at least one serving generation.
fn generation_problems(
    name: &str,
    has_model: bool,
    generations: &[GenerationConfig],
    dispatch: &Dispatch,
    split_file: bool,
    out: &mut Vec<String>,
) {
    let at = format!("endpoint `{name}`");
    match (has_model, generations.is_empty()) {
        (true, false) => out.push(format!(
            "{at}: give either `model` or `generations`, not both"
        )),
        (false, true) => out.push(format!("{at}: needs a `model` or `generations`")),
        (true, true) => {
            if !dispatch.is_random() {
                out.push(format!("{at}: `dispatch` applies to `generations` only"));
            }
            return;
        }
        (false, false) => {}
    }
    let mut seen = std::collections::BTreeSet::new();
    let mut total = 0u32;
    for g in generations {
        if g.shadow && g.enrichments.is_some() {
            out.push(format!(
                "{at}: generation `{}` is a shadow: it scores the features its serving generation was given and takes no enrichments of its own",
                g.name
            ));
        }
        match (g.shadow, g.cpu) {
            (false, Some(_)) => out.push(format!(
                "{at}: generation `{}` serves: only a shadow takes a `cpu` budget of its own",
                g.name
            )),
            (true, Some(cpu)) if !(cpu > 0.0 && cpu <= 1.0) => out.push(format!(
                "{at}: generation `{}`: cpu {cpu} must be a share of one core in (0, 1], e.g. 0.25",
                g.name
            )),
            _ => {}
        }
        if !valid_name(&g.name) {
            out.push(format!(
                "{at}: generation name `{}` must use only letters, digits, `-`, `_` and `.`",
                g.name
            ));
        }
        if !seen.insert(g.name.as_str()) {
            out.push(format!("{at}: two generations named `{}`", g.name));
        }
        match (g.shadow, g.weight) {
            (true, Some(_)) => out.push(format!(
                "{at}: generation `{}` is a shadow: it takes no `weight`",
                g.name
            )),
            (false, Some(w)) if w > 100 => out.push(format!(
                "{at}: generation `{}`: weight {w} is more than 100",
                g.name
            )),
            (false, Some(w)) => total += w,
            (false, None) if !split_file => out.push(format!(
                "{at}: generation `{}` needs a `weight` (percent) or `shadow = true`",
                g.name
            )),
            _ => {}
        }
    }
    let serving: Vec<_> = generations.iter().filter(|g| !g.shadow).collect();
    if serving.is_empty() {
        out.push(format!(
            "{at}: every generation is a shadow: one must serve"
        ));
    } else if serving.iter().all(|g| g.weight.is_some()) && total != 100 {
        out.push(format!(
            "{at}: the serving generations' weights sum to {total}, not 100"
        ));
    }
    if let Dispatch::Key(k) = dispatch
        && k.is_empty()
    {
        out.push(format!("{at}: dispatch key must not be empty"));
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generations_need_one_serving_and_weights_summing_to_100() {
        let problems = |endpoint: serde_json::Value, split: bool| {
            let mut cfg: ServiceConfig = serde_json::from_value(serde_json::json!({
                "service": "s", "endpoints": { "p": endpoint }
            }))
            .unwrap();
            cfg.split_file = split.then(|| PathBuf::from("split.json"));
            cfg.problems().join("\n")
        };
        let ok = serde_json::json!({ "kind": "prediction", "dispatch": {"key": "id"},
            "generations": [ {"name": "v1", "model": "a.onnx", "weight": 90},
                             {"name": "v2", "model": "b.onnx", "weight": 10},
                             {"name": "v3", "model": "c.onnx", "shadow": true} ] });
        assert_eq!(problems(ok, false), "");
        let unweighted = serde_json::json!({ "kind": "prediction",
            "generations": [ {"name": "v1", "model": "a.onnx"} ] });
        assert_eq!(
            problems(unweighted.clone(), true),
            "",
            "split_file gives them"
        );
        assert!(problems(unweighted, false).contains("needs a `weight`"));
        for (bad, says) in [
            (
                serde_json::json!({ "kind": "prediction", "model": "m.onnx",
                "generations": [ {"name": "v1", "model": "a.onnx", "weight": 100} ] }),
                "not both",
            ),
            (
                serde_json::json!({ "kind": "prediction" }),
                "needs a `model`",
            ),
            (
                serde_json::json!({ "kind": "prediction",
                "generations": [ {"name": "v1", "model": "a.onnx", "weight": 60},
                                 {"name": "v2", "model": "b.onnx", "weight": 30} ] }),
                "sum to 90, not 100",
            ),
            (
                serde_json::json!({ "kind": "prediction",
                "generations": [ {"name": "v1", "model": "a.onnx", "weight": 100},
                                 {"name": "v1", "model": "b.onnx", "shadow": true} ] }),
                "two generations named `v1`",
            ),
            (
                serde_json::json!({ "kind": "prediction",
                "generations": [ {"name": "v1", "model": "a.onnx", "shadow": true, "weight": 5} ] }),
                "takes no `weight`",
            ),
            (
                serde_json::json!({ "kind": "prediction",
                "generations": [ {"name": "v1", "model": "a.onnx", "shadow": true} ] }),
                "one must serve",
            ),
            (
                serde_json::json!({ "kind": "prediction", "model": "m.onnx", "dispatch": {"key": "id"} }),
                "generations` only",
            ),
        ] {
            let got = problems(bad.clone(), false);
            assert!(got.contains(says), "{bad}: {got}");
        }
    }

    #[test]
    fn base_paths_are_rooted_plain_and_clear_of_the_root_routes() {
        for ok in ["/features", "/a/b-c", "/v1.2/x_y~z"] {
            assert!(valid_base_path(ok), "{ok}");
        }
        for bad in [
            "",
            "/",
            "features",
            "/a/",
            "/a//b",
            "/a/../b",
            "/a b",
            "/v2",
            "/public/x",
            "/healthz",
        ] {
            assert!(!valid_base_path(bad), "{bad}");
        }
    }

    const SKETCH: &str = r#"{
      "service": "customer-scoring",
      "version": "1.0.0",
      "api_keys": [ {"env": "MESH_API_KEY_SCORING"} ],
      "limits": { "max_body_bytes": 1048576, "max_batch": 1000 },
      "connections": { "warehouse": { "kind": "postgres", "host": "127.0.0.1", "port": 5432, "database": "mesh", "user": "mesh", "password": {"env": "MESH_CONN_WAREHOUSE_PASSWORD"} } },
      "datasets": {
        "customers": { "source": {"csv": "datasets/customers.csv"}, "key": "customer_id", "duplicates": "error" },
        "behavior":  { "source": {"sql": {"connection": "warehouse", "query": "select * from behavior"}}, "key": "customer_id", "mode": "preload" }
      },
      "endpoints": {
        "demographics": { "kind": "lookup", "datasets": ["customers"] },
        "high-value": {
          "kind": "prediction", "model": "models/high_value.onnx",
          "enrichments": [
            { "dataset": "customers", "key": "customer_id", "columns": ["age","gender"], "on_missing": "error" },
            { "lookup": {"url": "http://127.0.0.1:30080/public/api/v1/customer-features/behavior/lookup", "api_key": {"env": "X"}}, "key": "customer_id", "columns": ["total_spend_30d"], "on_missing": "null" }
          ]
        }
      }
    }"#;

    #[test]
    fn sketch_parses_and_validates() {
        let cfg: ServiceConfig = serde_json::from_str(SKETCH).expect("parses");
        assert_eq!(cfg.problems(), Vec::<String>::new());
        assert_eq!(
            cfg.api_keys,
            vec![ApiKey::Key(SecretRef::Env("MESH_API_KEY_SCORING".into()))]
        );
        // Round trip through the CLI's side.
        let text = serde_json::to_string(&cfg).expect("serializes");
        let back: ServiceConfig = serde_json::from_str(&text).expect("parses again");
        assert_eq!(back, cfg);
    }

    #[test]
    fn unknown_fields_are_refused() {
        let bad = SKETCH.replace("\"duplicates\": \"error\"", "\"duplicate\": \"error\"");
        let err = serde_json::from_str::<ServiceConfig>(&bad).unwrap_err();
        // Not just "duplicate": the list of expected fields names `duplicates`.
        assert!(
            err.to_string().contains("unknown field `duplicate`"),
            "{err}"
        );
        let bad = SKETCH.replace("\"port\": 5432,", "\"port\": 5432, \"pasword\": \"x\",");
        assert!(serde_json::from_str::<ServiceConfig>(&bad).is_err());
    }

    #[test]
    fn dangling_references_are_all_reported() {
        let bad = SKETCH
            .replace("[\"customers\"]", "[\"nope\"]")
            .replace("\"connection\": \"warehouse\"", "\"connection\": \"lake\"");
        let cfg: ServiceConfig = serde_json::from_str(&bad).expect("parses");
        let problems = cfg.problems();
        assert_eq!(problems.len(), 2, "{problems:?}");
    }

    #[test]
    fn data_product_fields_parse_with_defaults() {
        let cfg: ServiceConfig = serde_json::from_str(SKETCH).expect("parses");
        let ConnectionConfig::Postgres {
            sslmode,
            ca_file,
            statement_timeout_ms,
            connect_timeout_ms,
            ..
        } = &cfg.connections["warehouse"]
        else {
            panic!("a postgres connection")
        };
        assert_eq!(
            (
                *sslmode,
                ca_file,
                *statement_timeout_ms,
                *connect_timeout_ms
            ),
            (SslMode::Disable, &None, 5000, 5000)
        );
        let ds = &cfg.datasets["behavior"];
        assert_eq!(
            (ds.refresh_secs, ds.max_staleness(), &ds.cache),
            (None, None, &None)
        );

        let new = SKETCH
            .replace(
                "\"port\": 5432,",
                "\"port\": 5432, \"sslmode\": \"verify-full\", \"ca_file\": \"ca.pem\", \"statement_timeout_ms\": 250, \"connect_timeout_ms\": 900,",
            )
            .replace("\"mode\": \"preload\"", "\"mode\": \"preload\", \"refresh_secs\": 60");
        let cfg: ServiceConfig = serde_json::from_str(&new).expect("parses");
        assert_eq!(cfg.problems(), Vec::<String>::new());
        let ConnectionConfig::Postgres {
            sslmode,
            ca_file,
            statement_timeout_ms,
            connect_timeout_ms,
            ..
        } = &cfg.connections["warehouse"]
        else {
            panic!("a postgres connection")
        };
        assert_eq!(
            (
                *sslmode,
                ca_file.as_deref(),
                *statement_timeout_ms,
                *connect_timeout_ms
            ),
            (SslMode::VerifyFull, Some(Path::new("ca.pem")), 250, 900)
        );
        assert_eq!(cfg.datasets["behavior"].max_staleness(), Some(180));
        let back: ServiceConfig =
            serde_json::from_str(&serde_json::to_string(&cfg).expect("serializes"))
                .expect("parses");
        assert_eq!(back, cfg);
        let live = new.replace(
            "\"mode\": \"preload\", \"refresh_secs\": 60",
            "\"mode\": \"live\", \"cache\": {\"ttl_ms\": 1000, \"max_entries\": 10}",
        );
        let cfg: ServiceConfig = serde_json::from_str(&live).expect("parses");
        assert_eq!(cfg.problems(), Vec::<String>::new());
        assert!(
            serde_json::from_str::<ServiceConfig>(&new.replace("verify-full", "verify-ca"))
                .is_err()
        );
    }

    #[test]
    fn an_enrichment_cache_belongs_to_a_remote_lookup() {
        let cache = ", \"cache\": {\"ttl_ms\": 5000, \"max_entries\": 100}";
        let remote = SKETCH.replace(
            "\"on_missing\": \"null\"",
            &format!("\"on_missing\": \"null\"{cache}"),
        );
        let cfg: ServiceConfig = serde_json::from_str(&remote).expect("parses");
        assert_eq!(cfg.problems(), Vec::<String>::new());
        let local = SKETCH.replace(
            "\"on_missing\": \"error\"",
            &format!("\"on_missing\": \"error\"{cache}"),
        );
        let problems = serde_json::from_str::<ServiceConfig>(&local)
            .expect("parses")
            .problems();
        assert!(
            problems
                .iter()
                .any(|p| p.contains("enrichment 1: cache applies to a remote `lookup`")),
            "{problems:?}"
        );
        let zero = remote.replace("\"ttl_ms\": 5000", "\"ttl_ms\": 0");
        let problems = serde_json::from_str::<ServiceConfig>(&zero)
            .expect("parses")
            .problems();
        assert!(
            problems
                .iter()
                .any(|p| p.contains("cache ttl_ms and max_entries must be positive")),
            "{problems:?}"
        );
    }

    #[test]
    fn data_product_fields_in_the_wrong_place_are_named() {
        let cases = [
            (
                "\"mode\": \"live\", \"refresh_secs\": 60",
                "dataset `behavior`: refresh_secs applies to mode `preload`, not `live`",
            ),
            (
                "\"mode\": \"preload\", \"cache\": {\"ttl_ms\": 1000, \"max_entries\": 10}",
                "dataset `behavior`: cache applies to mode `live`, not `preload`",
            ),
            (
                "\"mode\": \"preload\", \"max_staleness_secs\": 60",
                "dataset `behavior`: max_staleness_secs needs refresh_secs",
            ),
            (
                "\"mode\": \"live\", \"cache\": {\"ttl_ms\": 0, \"max_entries\": 10}",
                "dataset `behavior`: cache ttl_ms and max_entries must be positive",
            ),
        ];
        for (replacement, expected) in cases {
            let text = SKETCH.replace("\"mode\": \"preload\"", replacement);
            let cfg: ServiceConfig = serde_json::from_str(&text).expect("parses");
            let problems = cfg.problems();
            assert!(
                problems.iter().any(|p| p.starts_with(expected)),
                "{expected}: {problems:?}"
            );
        }
        let csv = SKETCH.replace(
            "\"duplicates\": \"error\"",
            "\"cache\": {\"ttl_ms\": 1000, \"max_entries\": 10}, \"refresh_secs\": 5",
        );
        let problems = serde_json::from_str::<ServiceConfig>(&csv)
            .expect("parses")
            .problems();
        assert!(
            problems.iter().any(|p| p.starts_with("dataset `customers`: cache applies to mode `live` with a `sql` source, not to a csv file")),
            "{problems:?}"
        );
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with("dataset `customers`: refresh_secs needs a `sql` source")),
            "{problems:?}"
        );
        let ca = SKETCH.replace(
            "\"port\": 5432,",
            "\"port\": 5432, \"sslmode\": \"require\", \"ca_file\": \"ca.pem\",",
        );
        let problems = serde_json::from_str::<ServiceConfig>(&ca)
            .expect("parses")
            .problems();
        assert_eq!(
            problems,
            vec!["connection `warehouse`: ca_file is used only with sslmode `verify-full`"]
        );
    }

    #[test]
    fn snowflake_connections_take_exactly_one_credential() {
        let with = |credentials: &str| {
            SKETCH.replace(
                "\"warehouse\": { \"kind\": \"postgres\", \"host\": \"127.0.0.1\", \"port\": 5432, \"database\": \"mesh\", \"user\": \"mesh\", \"password\": {\"env\": \"MESH_CONN_WAREHOUSE_PASSWORD\"} }",
                &format!(
                    "\"warehouse\": {{ \"kind\": \"snowflake\", \"account\": \"myorg-acct\", \"user\": \"MESH\", \"database\": \"ANALYTICS\", \"url\": \"http://127.0.0.1:15055\" {credentials} }}"
                ),
            )
        };
        let cfg: ServiceConfig =
            serde_json::from_str(&with(", \"password\": {\"env\": \"SF_PW\"}")).expect("parses");
        assert_eq!(cfg.problems(), Vec::<String>::new());
        let ConnectionConfig::Snowflake {
            pool_size,
            statement_timeout_ms,
            ..
        } = &cfg.connections["warehouse"]
        else {
            panic!("a snowflake connection: {cfg:?}")
        };
        assert_eq!((*pool_size, *statement_timeout_ms), (4, 5000));
        let back: ServiceConfig =
            serde_json::from_str(&serde_json::to_string(&cfg).expect("serializes"))
                .expect("parses");
        assert_eq!(back, cfg);
        let expected = "connection `warehouse`: set exactly one of password and private_key";
        for credentials in [
            "",
            ", \"password\": {\"env\": \"SF_PW\"}, \"private_key\": {\"file\": \"k.p8\"}",
        ] {
            let cfg: ServiceConfig = serde_json::from_str(&with(credentials)).expect("parses");
            assert_eq!(cfg.problems(), vec![expected], "{credentials}");
        }
        assert!(
            serde_json::from_str::<ServiceConfig>(&with(", \"host\": \"x\"")).is_err(),
            "unknown fields are refused"
        );
    }

    #[test]
    fn secrets_mut_lists_every_reference() {
        let mut cfg: ServiceConfig = serde_json::from_str(SKETCH).expect("parses");
        cfg.connections.insert(
            "lake".into(),
            ConnectionConfig::Snowflake {
                account: "a".into(),
                user: "u".into(),
                password: None,
                private_key: Some(SecretRef::File("k.p8".into())),
                warehouse: None,
                database: "D".into(),
                schema: None,
                role: None,
                url: None,
                pool_size: 4,
                statement_timeout_ms: 5000,
            },
        );
        // Callers' verifiers, allowed or only known, in the form the CLI writes.
        let callers: ServiceConfig = serde_json::from_value(serde_json::json!({
            "service": "s", "endpoints": {},
            "api_keys": [{ "caller": "a", "verifier": { "file": "va" } }],
            "known_callers": [{ "caller": "b", "verifier": { "file": "vb" } }],
        }))
        .expect("parses");
        cfg.api_keys.extend(callers.api_keys);
        cfg.known_callers.extend(callers.known_callers);
        let mut seen: Vec<String> = cfg.secrets_mut().map(|r| r.to_string()).collect();
        seen.sort();
        assert_eq!(
            seen,
            [
                "env:MESH_API_KEY_SCORING",
                "env:MESH_CONN_WAREHOUSE_PASSWORD",
                "env:X",
                "file:k.p8",
                "file:va",
                "file:vb"
            ]
        );
        for r in cfg.secrets_mut() {
            *r = SecretRef::File("/run/s".into());
        }
        assert!(
            cfg.secrets_mut()
                .all(|r| *r == SecretRef::File("/run/s".into()))
        );
    }

    #[test]
    fn secret_refs_do_not_print_values() {
        let s = SecretRef::Env("MESH_X".into());
        assert_eq!(format!("{s}"), "env:MESH_X");
    }
}
