//! A loaded service: datasets, models and the per-endpoint plans built from
//! the bundle at start.
//!
//! Everything a request needs is resolved here once: the slot of each field,
//! which dataset column fills which model input, the remote lookup clients.
//! Loading reports each phase with its timing on stderr.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::auth::PresentedKey;
use crate::backend::{Connection, LiveError, LiveKey, LiveTable};
use crate::cache::KeyCache;
use crate::config::{
    Bundle, ColumnType, ConfigError, DatasetConfig, DatasetMode, DatasetSource, Dispatch,
    EndpointConfig, GenerationConfig, Limits, OnMissing, SecretRef,
};
use crate::dataset::{Dataset, KeyRef, Schema, Value, ValueRef};
use crate::error::AppError;
use crate::freshness::{DatasetStatus, QueryTotal, Snapshot};
use crate::generations::{Declared, DispatchBy, Generations, ShadowLimits, SplitReloads};
use crate::input::FieldMap;
use crate::log;
use crate::model::{InputKind, InputSpec, Model};
use crate::query_log::QueryLog;
use crate::remote::{HttpClient, RemoteRow, Upstream, split_lookup_url};
use crate::scoring::{class_names, load_model};
use crate::snowflake::SnowflakeError;
use crate::sql::SqlError;

/// Errors loading a service; each names what failed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Dataset(#[from] crate::dataset::DatasetError),
    #[error(transparent)]
    Sql(#[from] SqlError),
    /// A dataset's connection cannot be used (the error names the connection).
    #[error("dataset `{dataset}`: {source}")]
    Connection {
        dataset: String,
        #[source]
        source: SqlError,
    },
    #[error(transparent)]
    Snowflake(#[from] SnowflakeError),
    /// A query dataset in mode `bundle` that was not frozen.
    #[error(
        "dataset `{dataset}`: a query in mode `bundle` must be frozen into the bundle first (`mesh-runtime freeze --bundle DIR`, which `mesh apply` runs)"
    )]
    NotFrozen { dataset: String },
    /// A model could not be read or is not supported.
    #[error("endpoint `{endpoint}`: model {reason}")]
    Model { endpoint: String, reason: String },
    /// The split file cannot be read or does not fit the endpoints.
    #[error("split file: {reason}")]
    Split { reason: String },
    /// An endpoint declaration does not fit its model or datasets.
    #[error("endpoint `{endpoint}`: {reason}")]
    Endpoint { endpoint: String, reason: String },
}

/// What to load.
#[derive(Debug, Clone, Copy)]
pub struct LoadOptions {
    /// Connect to databases and resolve connection secrets (`false` for an
    /// offline `check`: SQL datasets and secrets are then not validated).
    pub connect: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions { connect: true }
    }
}

/// A service ready to answer requests.
pub struct Service {
    pub name: String,
    pub version: Option<String>,
    pub limits: Limits,
    pub endpoints: HashMap<String, Endpoint>,
    pub datasets: HashMap<String, Table>,
    pub http: HttpClient,
    pub query_log: Option<QueryLog>,
    /// The generations of every endpoint that has them.
    pub generations: Vec<Arc<Generations>>,
    pub split_reloads: Arc<SplitReloads>,
}

/// One endpoint.
pub enum Endpoint {
    Prediction(Arc<PredictionEndpoint>),
    Lookup(Arc<LookupEndpoint>),
}

/// A dataset, in memory or queried per request.
#[derive(Clone)]
pub enum Table {
    /// A bundled CSV file, loaded at the given instant.
    Memory(Arc<Dataset>, Instant),
    /// A preloaded SQL dataset: a snapshot, replaced whole by each refresh.
    Snapshot(Arc<Snapshot>),
    /// A SQL dataset queried per key.
    Live(Arc<LiveTable>),
}

/// A row fetched from a [`Table`].
pub enum RowData<'a> {
    Memory(&'a Dataset, usize),
    /// A row of the snapshot current at the lookup (kept alive by the `Arc`
    /// even if a refresh swaps it out meanwhile).
    Snapshot(Arc<Dataset>, usize),
    Owned(Arc<Vec<Value>>),
}

impl RowData<'_> {
    pub fn value(&self, column: usize) -> ValueRef<'_> {
        match self {
            RowData::Memory(ds, row) => ds.value(*row, column),
            RowData::Snapshot(ds, row) => ds.value(*row, column),
            RowData::Owned(values) => values.get(column).map_or(ValueRef::Null, Value::as_ref),
        }
    }
}

impl Table {
    pub fn schema(&self) -> &Schema {
        match self {
            Table::Memory(ds, _) => ds.schema(),
            Table::Snapshot(s) => s.schema(),
            Table::Live(t) => t.schema(),
        }
    }

    pub fn name(&self) -> &str {
        match self {
            Table::Memory(ds, _) => ds.name(),
            Table::Snapshot(s) => s.name(),
            Table::Live(t) => t.name(),
        }
    }

    /// The row with `key`. A database that cannot be reached or does not
    /// answer in time is a 503 for this request; a failing query a 502.
    pub async fn fetch(&self, key: KeyRef<'_>) -> Result<Option<RowData<'_>>, AppError> {
        match self {
            Table::Memory(ds, _) => Ok(ds.find(key).map(|row| RowData::Memory(ds, row))),
            Table::Snapshot(s) => {
                let ds = s.current();
                Ok(ds.find(key).map(|row| RowData::Snapshot(ds, row)))
            }
            Table::Live(t) => match t.fetch(key).await {
                Ok(row) => Ok(row.map(RowData::Owned)),
                Err(e @ (LiveError::Unavailable { .. } | LiveError::Timeout { .. })) => {
                    let message = match e {
                        LiveError::Timeout { dataset, ms } => format!(
                            "dataset `{dataset}`: the database did not answer within {ms} ms; try again later"
                        ),
                        _ => format!(
                            "dataset `{}`: the database is unavailable; try again later",
                            t.name()
                        ),
                    };
                    Err(AppError::new(
                        axum::http::StatusCode::SERVICE_UNAVAILABLE,
                        "dataset_unavailable",
                        message,
                    ))
                }
                Err(LiveError::Query { .. }) => Err(AppError::new(
                    axum::http::StatusCode::BAD_GATEWAY,
                    "upstream_error",
                    format!("dataset `{}`: the database query failed", t.name()),
                )),
            },
        }
    }

    /// Freshness for `/readyz` and `/metrics`.
    pub fn status(&self) -> DatasetStatus {
        match self {
            Table::Memory(ds, loaded) => DatasetStatus {
                source: "csv",
                mode: "preload",
                rows: Some(ds.rows() as u64),
                age_seconds: Some((loaded.elapsed().as_secs_f64() * 1e3).round() / 1e3),
                refresh_secs: None,
                max_staleness_secs: None,
                last_refresh: None,
                refresh_total: None,
                stale: false,
                cache: None,
                queries_total: None,
            },
            Table::Snapshot(s) => s.status(),
            Table::Live(t) => DatasetStatus {
                source: "sql",
                mode: "live",
                rows: None,
                age_seconds: None,
                refresh_secs: None,
                max_staleness_secs: None,
                last_refresh: None,
                refresh_total: None,
                stale: false,
                cache: t.cache_stats().map(Into::into),
                queries_total: Some({
                    let (ok, error) = t.query_counts();
                    QueryTotal { ok, error }
                }),
            },
        }
    }
}

/// A prediction endpoint, planned.
pub struct PredictionEndpoint {
    pub name: String,
    pub model: Arc<Model>,
    /// Request fields: slots `0..inputs.len()` are the model inputs in order,
    /// then the enrichment keys that are not model inputs.
    pub fields: FieldMap,
    pub inputs: Vec<InputSpec>,
    pub class_names: Vec<String>,
    pub enrichments: Vec<Enrichment>,
    /// Several models side by side (`None`: `model` answers alone).
    pub generations: Option<Arc<Generations>>,
    /// The field whose value is a query log line's `key`: the dispatch key,
    /// else the first enrichment's key.
    pub log_key_slot: Option<usize>,
    /// Per generation: whether it has enrichments of its own (which
    /// `enrichments` holds after the endpoint's, see [`Enrichment::generation`]).
    pub own_enrichments: Vec<bool>,
}

/// An enrichment, planned.
pub struct Enrichment {
    pub source: EnrichmentSource,
    /// For messages: ``dataset `customers` `` or `lookup service URL`.
    pub describe: String,
    pub key_slot: usize,
    /// `(model input slot, source column)`: the column index in the table
    /// schema, or in `columns` for a remote lookup.
    pub targets: Vec<(usize, usize)>,
    pub columns: Vec<String>,
    /// Remote lookup without declared `columns`: a column the upstream row
    /// does not have is left to later enrichments (not an error).
    pub optional_columns: bool,
    pub on_missing: OnMissing,
    /// `Some(g)`: generation `g`'s own, for its items alone; `None`: the
    /// endpoint's, for the items of every generation without its own.
    pub generation: Option<usize>,
}

impl Enrichment {
    /// Whether it fills the features of an item that generation `g` (of
    /// `own`: which generations have enrichments of their own) answers.
    pub fn applies(&self, g: Option<usize>, own: &[bool]) -> bool {
        match self.generation {
            None => !g.is_some_and(|g| own.get(g).copied().unwrap_or(false)),
            Some(mine) => g == Some(mine),
        }
    }
}

/// Where an enrichment reads.
pub enum EnrichmentSource {
    Table(Table),
    Remote(RemoteEnrichment),
}

/// A remote enrichment: one lookup endpoint of an upstream service.
pub struct RemoteEnrichment {
    /// Shared by the remote enrichments of the endpoint that read the same
    /// upstream service with the same key and API key.
    pub upstream: Arc<Upstream>,
    /// Position in the upstream's endpoints.
    pub endpoint: usize,
    /// The opt-in cache of rows by key (`None`: no cache).
    pub cache: Option<KeyCache<LiveKey, RemoteRow, AppError>>,
}

/// A lookup endpoint, planned.
pub struct LookupEndpoint {
    pub name: String,
    /// Key fields of the request (one per distinct key name).
    pub fields: FieldMap,
    pub parts: Vec<LookupPart>,
}

/// One dataset of a lookup endpoint.
pub struct LookupPart {
    pub table: Table,
    pub key_slot: usize,
    /// Columns returned (all but the key), by schema index.
    pub columns: Vec<usize>,
}

impl Service {
    /// Loads datasets, connections and models of a bundle and plans its
    /// endpoints. `secrets` resolves references (see [`Bundle::resolve`]).
    pub async fn load(bundle: &Bundle, options: LoadOptions) -> Result<Service, LoadError> {
        let cfg = &bundle.config;
        let started = Instant::now();

        // Connections (not for an offline check).
        let mut connectors = HashMap::new();
        for (name, conn) in &cfg.connections {
            if !options.connect {
                break;
            }
            connectors.insert(name.clone(), Connection::open(bundle, name, conn)?);
        }

        // Datasets.
        let mut datasets = HashMap::new();
        for (name, ds) in &cfg.datasets {
            let t = Instant::now();
            let table = match load_table(bundle, name, ds, &connectors, options).await? {
                Some(table) => table,
                None => {
                    log::info(format_args!("dataset `{name}`: skipped (offline check)"));
                    continue;
                }
            };
            let memory = match &table {
                Table::Memory(d, _) => Ok(d.clone()),
                Table::Snapshot(s) => Ok(s.current()),
                Table::Live(l) => Err(l),
            };
            match memory {
                Ok(d) => log::info(format_args!(
                    "dataset `{name}`: {} rows, {} keys, {} columns, {:.1} MiB in {}{}",
                    d.rows(),
                    d.keys(),
                    d.schema().names.len(),
                    d.heap_bytes() as f64 / (1 << 20) as f64,
                    ms(t.elapsed()),
                    match ds.refresh_secs {
                        Some(every) => format!(", refreshed every {every} s"),
                        None => String::new(),
                    }
                )),
                Err(l) => log::info(format_args!(
                    "dataset `{name}`: live, {} columns{}, pool ready in {}",
                    l.schema().names.len(),
                    match &ds.cache {
                        Some(c) => format!(", cache of {} keys for {} ms", c.max_entries, c.ttl_ms),
                        None => String::new(),
                    },
                    ms(t.elapsed())
                )),
            }
            datasets.insert(name.clone(), table);
        }

        // Endpoints.
        // One client for every remote lookup; HTTPS trusts their `ca_file`s.
        let ca_files: Vec<PathBuf> = cfg
            .endpoints
            .values()
            .flat_map(|ep| match ep {
                EndpointConfig::Prediction { enrichments, .. } => enrichments.as_slice(),
                EndpointConfig::Lookup { .. } => &[],
            })
            .filter_map(|en| en.lookup.as_ref()?.ca_file.as_deref())
            .map(|p| bundle.path(p))
            .collect();
        let http = HttpClient::trusting(&ca_files).map_err(|reason| LoadError::Endpoint {
            endpoint: "(remote lookups)".into(),
            reason,
        })?;
        // The query log (not for an offline check: it would open its file).
        let query_log = match (&cfg.query_log, options.connect) {
            (Some(config), true) => {
                Some(
                    QueryLog::open(config, &bundle.dir).map_err(|e| LoadError::Endpoint {
                        endpoint: "(query log)".into(),
                        reason: format!("cannot open the query log: {e}"),
                    })?,
                )
            }
            _ => None,
        };
        let mut all_generations = Vec::new();
        let mut endpoints = HashMap::new();
        for (name, ep) in &cfg.endpoints {
            let t = Instant::now();
            let endpoint = match ep {
                EndpointConfig::Lookup { datasets: names } => {
                    match plan_lookup(name, names, &datasets)? {
                        Some(ep) => Endpoint::Lookup(Arc::new(ep)),
                        None => continue,
                    }
                }
                EndpointConfig::Prediction {
                    model,
                    generations,
                    dispatch,
                    enrichments,
                } => {
                    // The plain model, or every generation's (shadows too).
                    let paths: Vec<&PathBuf> = match model {
                        Some(model) => vec![model],
                        None => generations.iter().map(|g| &g.model).collect(),
                    };
                    let mut models = Vec::with_capacity(paths.len());
                    for (i, path) in paths.into_iter().enumerate() {
                        let path = bundle.path(path);
                        let at = match generations.get(i) {
                            Some(g) if model.is_none() => {
                                format!("{name}` generation `{}", g.name)
                            }
                            _ => name.clone(),
                        };
                        let loaded = tokio::task::spawn_blocking(move || load_model(&path))
                            .await
                            .map_err(|e| e.to_string())
                            .and_then(|r| r)
                            .map_err(|reason| LoadError::Model {
                                endpoint: at,
                                reason,
                            })?;
                        models.push(loaded);
                    }
                    // The first serving generation's model plans the
                    // endpoint: the others must take the same inputs.
                    let primary = match model {
                        Some(_) => 0,
                        None => generations.iter().position(|g| !g.shadow).unwrap_or(0),
                    };
                    // A generation's own enrichments are planned with the
                    // endpoint's (one field layout, shared upstreams), after
                    // them, each marked with its generation.
                    let mut all = enrichments.clone();
                    let mut scopes = vec![None; enrichments.len()];
                    for (g, generation) in generations.iter().enumerate() {
                        // Never a shadow's (`generation_problems`).
                        let Some(own) = &generation.enrichments else {
                            continue;
                        };
                        all.extend(own.iter().cloned());
                        scopes.extend(std::iter::repeat_n(Some(g), own.len()));
                    }
                    let Some(mut planned) = plan_prediction(
                        bundle,
                        name,
                        models[primary].clone(),
                        &all,
                        &datasets,
                        options,
                    )?
                    else {
                        log::info(format_args!(
                            "endpoint `{name}`: skipped (uses a SQL dataset; offline check)"
                        ));
                        continue;
                    };
                    for (en, scope) in planned.enrichments.iter_mut().zip(scopes) {
                        en.generation = scope;
                    }
                    if model.is_none() {
                        planned.own_enrichments = generations
                            .iter()
                            .map(|g| g.enrichments.is_some())
                            .collect();
                        let gens = plan_generations(
                            name,
                            &mut planned,
                            generations,
                            models,
                            dispatch,
                            &cfg.limits,
                            query_log.clone(),
                        )?;
                        all_generations.push(gens.clone());
                        planned.generations = Some(gens);
                    }
                    planned.log_key_slot = match planned.generations.as_ref().map(|g| g.dispatch) {
                        Some(DispatchBy::Key(slot)) => Some(slot),
                        _ => planned.enrichments.first().map(|en| en.key_slot),
                    };
                    log::info(format_args!(
                        "endpoint `{name}`: model with {} inputs, {} classes, {} enrichments{}, loaded in {}",
                        planned.inputs.len(),
                        planned.class_names.len(),
                        planned.enrichments.len(),
                        match &planned.generations {
                            Some(g) => format!(", generations {}", g.names()),
                            None => String::new(),
                        },
                        ms(t.elapsed())
                    ));
                    Endpoint::Prediction(Arc::new(planned))
                }
            };
            endpoints.insert(name.clone(), endpoint);
        }
        // Weights from the split file, then whenever it changes.
        let split_reloads = Arc::new(SplitReloads::default());
        // An offline check of a staged bundle validates the split file
        // only when it is there already.
        if let Some(path) = cfg
            .split_file
            .as_ref()
            .map(|p| bundle.path(p))
            .filter(|p| options.connect || p.exists())
        {
            crate::generations::read_split_file(&path)
                .and_then(|file| crate::generations::apply_split_file(&all_generations, &file))
                .map_err(|reason| LoadError::Split { reason })?;
            if options.connect {
                crate::generations::watch_split_file(
                    path,
                    all_generations.clone(),
                    split_reloads.clone(),
                );
            }
        }
        log::info(format_args!(
            "service `{}`: {} endpoints, {} datasets loaded in {}",
            cfg.service,
            endpoints.len(),
            datasets.len(),
            ms(started.elapsed())
        ));
        Ok(Service {
            name: cfg.service.clone(),
            version: cfg.version.clone(),
            limits: cfg.limits.clone(),
            endpoints,
            datasets,
            http,
            query_log,
            generations: all_generations,
            split_reloads,
        })
    }
}

impl Service {
    /// Freshness of each dataset, by name.
    pub fn dataset_statuses(&self) -> std::collections::BTreeMap<&str, DatasetStatus> {
        self.datasets
            .iter()
            .map(|(name, table)| (name.as_str(), table.status()))
            .collect()
    }

    /// The remote enrichments of each prediction endpoint and their
    /// upstreams, sorted by endpoint name.
    pub fn remote_statuses(&self) -> Vec<crate::metrics::RemoteStatus<'_>> {
        let mut out = Vec::new();
        let mut names: Vec<&String> = self.endpoints.keys().collect();
        names.sort();
        for name in names {
            let Some(Endpoint::Prediction(ep)) = self.endpoints.get(name) else {
                continue;
            };
            let mut upstreams: Vec<&Arc<Upstream>> = Vec::new();
            for en in &ep.enrichments {
                let EnrichmentSource::Remote(remote) = &en.source else {
                    continue;
                };
                if let Some(stats) = remote.cache.as_ref().and_then(KeyCache::stats) {
                    out.push(crate::metrics::RemoteStatus::Cache {
                        endpoint: name,
                        enrichment: remote.upstream.endpoint_name(remote.endpoint),
                        stats,
                    });
                }
                if !upstreams.iter().any(|u| Arc::ptr_eq(u, &remote.upstream)) {
                    upstreams.push(&remote.upstream);
                }
            }
            for upstream in upstreams {
                out.push(crate::metrics::RemoteStatus::Upstream {
                    endpoint: name,
                    upstream: upstream.url(),
                    stats: upstream.stats(),
                });
            }
        }
        out
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

async fn load_table(
    bundle: &Bundle,
    name: &str,
    ds: &DatasetConfig,
    connectors: &HashMap<String, Connection>,
    options: LoadOptions,
) -> Result<Option<Table>, LoadError> {
    match &ds.source {
        DatasetSource::Csv(path) => {
            let path = bundle.path(path);
            let (name, key, duplicates, columns) = (
                name.to_string(),
                ds.key.clone(),
                ds.duplicates,
                ds.columns.clone(),
            );
            let loaded = tokio::task::spawn_blocking(move || {
                Dataset::load_csv(&name, &path, &key, duplicates, &columns)
            })
            .await
            .map_err(|e| LoadError::Endpoint {
                endpoint: String::new(),
                reason: e.to_string(),
            })??;
            Ok(Some(Table::Memory(Arc::new(loaded), Instant::now())))
        }
        DatasetSource::Sql(sql) => {
            if !options.connect {
                return Ok(None);
            }
            let Some(connector) = connectors.get(&sql.connection) else {
                return Err(LoadError::Endpoint {
                    endpoint: String::new(),
                    reason: format!("dataset `{name}`: unknown connection `{}`", sql.connection),
                });
            };
            match ds.mode {
                DatasetMode::Bundle => Err(LoadError::NotFrozen {
                    dataset: name.to_string(),
                }),
                DatasetMode::Preload => {
                    let first = connector
                        .load(name, &sql.query, &ds.key, ds.duplicates)
                        .await
                        .map_err(|e| in_dataset(name, e))?;
                    let snapshot = Arc::new(Snapshot::new(
                        first,
                        ds.refresh_secs.map(Duration::from_secs),
                        ds.max_staleness().map(Duration::from_secs),
                    ));
                    if ds.refresh_secs.is_some() {
                        let (connector, name, query, key, duplicates) = (
                            connector.clone(),
                            name.to_string(),
                            sql.query.clone(),
                            ds.key.clone(),
                            ds.duplicates,
                        );
                        tokio::spawn(crate::freshness::refresh_loop(
                            snapshot.clone(),
                            move || {
                                let (connector, name, query, key) =
                                    (connector.clone(), name.clone(), query.clone(), key.clone());
                                async move {
                                    connector
                                        .load(&name, &query, &key, duplicates)
                                        .await
                                        .map_err(|e| e.to_string())
                                }
                            },
                        ));
                    }
                    Ok(Some(Table::Snapshot(snapshot)))
                }
                DatasetMode::Live => Ok(Some(Table::Live(Arc::new(
                    connector
                        .live(name, &sql.query, &ds.key, ds.duplicates, ds.cache.as_ref())
                        .await
                        .map_err(|e| in_dataset(name, e))?,
                )))),
            }
        }
    }
}

/// A dataset's SQL error, naming the dataset where the error does not.
fn in_dataset(dataset: &str, e: SqlError) -> LoadError {
    match e {
        SqlError::Connect { .. } | SqlError::Tls { .. } => LoadError::Connection {
            dataset: dataset.to_string(),
            source: e,
        },
        other => LoadError::Sql(other),
    }
}

fn plan_lookup(
    name: &str,
    names: &[String],
    datasets: &HashMap<String, Table>,
) -> Result<Option<LookupEndpoint>, LoadError> {
    let err = |reason: String| LoadError::Endpoint {
        endpoint: name.to_string(),
        reason,
    };
    let mut fields = FieldMap::default();
    let mut parts = Vec::new();
    let mut seen: HashMap<&str, &str> = HashMap::new();
    for ds in names {
        let Some(table) = datasets.get(ds) else {
            // Skipped in an offline check.
            return Ok(None);
        };
        let schema = table.schema();
        let key_name = &schema.names[schema.key];
        let key_slot = fields.add(key_name);
        let mut columns = Vec::new();
        for (i, col) in schema.names.iter().enumerate() {
            if i == schema.key {
                continue;
            }
            if let Some(other) = seen.insert(col, ds) {
                return Err(err(format!(
                    "column `{col}` is in both datasets `{other}` and `{ds}`; a lookup merges rows by key, so column names must be distinct"
                )));
            }
            columns.push(i);
        }
        parts.push(LookupPart {
            table: table.clone(),
            key_slot,
            columns,
        });
    }
    for slot in 0..fields.len() {
        if seen.contains_key(fields.name(slot)) {
            return Err(err(format!(
                "`{}` is a key of one dataset and a column of another",
                fields.name(slot)
            )));
        }
    }
    Ok(Some(LookupEndpoint {
        name: name.to_string(),
        fields,
        parts,
    }))
}

fn plan_prediction(
    bundle: &Bundle,
    name: &str,
    model: Arc<Model>,
    enrichments: &[crate::config::EnrichmentConfig],
    datasets: &HashMap<String, Table>,
    options: LoadOptions,
) -> Result<Option<PredictionEndpoint>, LoadError> {
    let err = |reason: String| LoadError::Endpoint {
        endpoint: name.to_string(),
        reason,
    };
    let inputs = model.inputs().to_vec();
    let mut fields = FieldMap::default();
    for input in &inputs {
        if input.width != 1 {
            return Err(err(format!(
                "model input `{}` has {} columns; prediction endpoints need one graph input per feature (width 1)",
                input.name, input.width
            )));
        }
        let slot = fields.add(&input.name);
        if slot + 1 != fields.len() {
            return Err(err(format!(
                "model input `{}` is declared twice",
                input.name
            )));
        }
    }
    let class_names = class_names(model.classes());
    if class_names.is_empty() {
        return Err(err("the model declares no classes".into()));
    }
    let remotes = plan_upstreams(bundle, enrichments, options, |n, reason| {
        err(format!("enrichment {}: {reason}", n + 1))
    })?;
    let mut planned = Vec::new();
    for (n, en) in enrichments.iter().enumerate() {
        let at = |reason: String| err(format!("enrichment {}: {reason}", n + 1));
        let key_slot = fields.add(&en.key);
        let mut targets = Vec::new();
        let (source, describe) = match (&en.dataset, &en.lookup) {
            (Some(ds), _) => {
                let Some(table) = datasets.get(ds) else {
                    if !options.connect {
                        return Ok(None);
                    }
                    return Err(at(format!("dataset `{ds}` is not loaded")));
                };
                let schema = table.schema();
                let columns: Vec<String> = if en.columns.is_empty() {
                    // Every model input the dataset has.
                    schema
                        .names
                        .iter()
                        .filter(|c| **c != en.key && input_slot(&fields, &inputs, c).is_ok())
                        .cloned()
                        .collect()
                } else {
                    en.columns.clone()
                };
                for col in &columns {
                    let slot = input_slot(&fields, &inputs, col).map_err(&at)?;
                    let Some(ci) = schema.position(col) else {
                        return Err(at(format!(
                            "column `{col}` is not in dataset `{ds}` (columns: {})",
                            schema.names.join(", ")
                        )));
                    };
                    check_compatible(inputs[slot].kind, schema.types[ci])
                        .map_err(|r| at(format!("column `{col}` of dataset `{ds}`: {r}")))?;
                    targets.push((slot, ci));
                }
                (
                    EnrichmentSource::Table(table.clone()),
                    format!("dataset `{ds}`"),
                )
            }
            (None, Some(remote)) => {
                for (ci, col) in remote_columns(en, &inputs).iter().enumerate() {
                    let slot = input_slot(&fields, &inputs, col).map_err(&at)?;
                    targets.push((slot, ci));
                }
                let Some((upstream, endpoint)) = remotes[n].clone() else {
                    return Err(at("no upstream".into()));
                };
                let describe = format!("lookup service {}", remote.url);
                (
                    EnrichmentSource::Remote(RemoteEnrichment {
                        upstream,
                        endpoint,
                        cache: en.cache.as_ref().map(|c| KeyCache::new(Some(c))),
                    }),
                    describe,
                )
            }
            (None, None) => return Err(at("no source".into())),
        };
        planned.push(Enrichment {
            source,
            describe,
            key_slot,
            targets,
            columns: match &en.lookup {
                Some(_) => remote_columns(en, &inputs),
                None => Vec::new(),
            },
            optional_columns: en.lookup.is_some() && en.columns.is_empty(),
            on_missing: en.on_missing,
            generation: None,
        });
    }
    Ok(Some(PredictionEndpoint {
        name: name.to_string(),
        model,
        fields,
        inputs,
        class_names,
        enrichments: planned,
        generations: None,
        log_key_slot: None,
        own_enrichments: Vec::new(),
    }))
}

/// The generations of `planned` (planned with the first serving one's
/// model): every generation's model must take the same inputs and give the
/// same classes, so what the enrichments fill fits each of them.
fn plan_generations(
    name: &str,
    planned: &mut PredictionEndpoint,
    generations: &[GenerationConfig],
    models: Vec<Arc<Model>>,
    dispatch: &Dispatch,
    limits: &Limits,
    query_log: Option<QueryLog>,
) -> Result<Arc<Generations>, LoadError> {
    let err = |g: &str, reason: String| LoadError::Endpoint {
        endpoint: format!("{name}` generation `{g}"),
        reason,
    };
    let describe = |inputs: &[InputSpec]| {
        inputs
            .iter()
            .map(|i| format!("{} ({})", i.name, kind_name(i.kind)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut declared = Vec::with_capacity(generations.len());
    for (g, model) in generations.iter().zip(models) {
        let same = model.inputs().len() == planned.inputs.len()
            && model
                .inputs()
                .iter()
                .zip(&planned.inputs)
                .all(|(a, b)| a.name == b.name && a.kind == b.kind && a.width == b.width);
        if !same {
            return Err(err(
                &g.name,
                format!(
                    "its model's inputs ({}) are not the endpoint's ({}): every generation takes the inputs the enrichments fill, in the same order",
                    describe(model.inputs()),
                    describe(&planned.inputs)
                ),
            ));
        }
        let classes = class_names(model.classes());
        if classes != planned.class_names {
            return Err(err(
                &g.name,
                format!(
                    "its model's classes ({}) are not the other generations' ({})",
                    classes.join(", "),
                    planned.class_names.join(", ")
                ),
            ));
        }
        declared.push(Declared {
            name: g.name.clone(),
            model,
            shadow: g.shadow,
            weight: g.weight,
            cpu_share: g.cpu,
        });
    }
    let dispatch = match dispatch {
        Dispatch::Random => DispatchBy::Random,
        // The key is read from the request as sent.
        Dispatch::Key(key) => DispatchBy::Key(planned.fields.add(key)),
    };
    let gens = Generations::new(
        name,
        declared,
        dispatch,
        &planned.class_names,
        ShadowLimits {
            queue: limits.shadow_queue(),
            cpu_share: limits.shadow_cpu(),
            idle_gate: limits.shadow_idle_gate(),
        },
        query_log,
    )
    .map_err(|e| LoadError::Endpoint {
        endpoint: name.to_string(),
        reason: format!("cannot start a shadow thread: {e}"),
    })?;
    Ok(Arc::new(gens))
}

/// The upstream of each remote enrichment (`None` for a dataset) and its
/// endpoint's position there: enrichments reading the same service address
/// with the same API key and key field share one [`Upstream`]. `at` names
/// the enrichment (0-based) in an error.
type Remotes = Vec<Option<(Arc<Upstream>, usize)>>;

fn plan_upstreams(
    bundle: &Bundle,
    enrichments: &[crate::config::EnrichmentConfig],
    options: LoadOptions,
    at: impl Fn(usize, String) -> LoadError,
) -> Result<Remotes, LoadError> {
    struct Plan<'e> {
        base: &'e str,
        api_key: Option<&'e SecretRef>,
        key: &'e str,
        timeout_ms: u64,
        endpoints: Vec<String>,
        first: usize,
    }
    let mut plans: Vec<Plan<'_>> = Vec::new();
    let mut places = Vec::with_capacity(enrichments.len());
    for (n, en) in enrichments.iter().enumerate() {
        let Some(remote) = &en.lookup else {
            places.push(None);
            continue;
        };
        let api_key = remote.api_key.as_ref().filter(|_| options.connect);
        let (base, endpoint) = split_lookup_url(&remote.url).map_err(|r| at(n, r))?;
        let group = match plans
            .iter()
            .position(|p| p.base == base && p.api_key == api_key && p.key == en.key)
        {
            Some(g) => g,
            None => {
                plans.push(Plan {
                    base,
                    api_key,
                    key: &en.key,
                    timeout_ms: 0,
                    endpoints: Vec::new(),
                    first: n,
                });
                plans.len() - 1
            }
        };
        let plan = &mut plans[group];
        plan.timeout_ms = plan.timeout_ms.max(remote.timeout_ms);
        let position = match plan.endpoints.iter().position(|e| e == endpoint) {
            Some(p) => p,
            None => {
                plan.endpoints.push(endpoint.to_string());
                plan.endpoints.len() - 1
            }
        };
        places.push(Some((group, position)));
    }
    let mut upstreams = Vec::with_capacity(plans.len());
    for plan in plans {
        let api_key = match plan.api_key {
            Some(r) => Some(PresentedKey::open(bundle, r).map_err(|m| at(plan.first, m))?),
            None => None,
        };
        let upstream = Upstream::new(
            plan.base,
            plan.endpoints,
            api_key,
            Duration::from_millis(plan.timeout_ms),
            plan.key,
        )
        .map_err(|r| at(plan.first, r))?;
        upstreams.push(Arc::new(upstream));
    }
    Ok(places
        .into_iter()
        .map(|p| p.map(|(g, e)| (upstreams[g].clone(), e)))
        .collect())
}

/// The columns a remote enrichment reads: those declared, else every model
/// input but its key (the upstream row has some of them; the rest are left
/// to later enrichments).
fn remote_columns(en: &crate::config::EnrichmentConfig, inputs: &[InputSpec]) -> Vec<String> {
    if en.columns.is_empty() {
        inputs
            .iter()
            .map(|i| i.name.clone())
            .filter(|n| *n != en.key)
            .collect()
    } else {
        en.columns.clone()
    }
}

fn input_slot(fields: &FieldMap, inputs: &[InputSpec], column: &str) -> Result<usize, String> {
    match fields.get(column) {
        Some(slot) if slot < inputs.len() => Ok(slot),
        _ => Err(format!(
            "column `{column}` is not a model input (inputs: {})",
            inputs
                .iter()
                .map(|i| i.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

fn check_compatible(kind: InputKind, column: ColumnType) -> Result<(), String> {
    use ColumnType as C;
    use InputKind as K;
    match (kind, column) {
        (K::F32 | K::F64, C::Int | C::Float | C::Bool) => Ok(()),
        (K::I64, C::Int | C::Bool) => Ok(()),
        (K::Str, C::String | C::Int) => Ok(()),
        _ => Err(format!(
            "a {column} column cannot feed a {} model input",
            kind_name(kind)
        )),
    }
}

pub fn kind_name(kind: InputKind) -> &'static str {
    match kind {
        InputKind::F32 => "float32",
        InputKind::F64 => "float64",
        InputKind::I64 => "int64",
        InputKind::Str => "string",
    }
}
