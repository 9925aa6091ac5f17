//! SQL datasets over PostgreSQL (`tokio-postgres`; TLS with rustls).
//!
//! A dataset's query is used as a subquery: a `preload` streams
//! `SELECT cols FROM (query) AS mesh_src` into an in-memory [`Dataset`] (at
//! start, and again at each refresh); `live` prepares
//! `... WHERE mesh_src."key" = $1` on a small pool of connections and runs it
//! per key. Column types come from the prepared statement; `numeric` is read
//! as `float8`, types the runtime does not know as `text`.
//!
//! Connections: `sslmode` `disable`, `require` (encrypted, certificate not
//! checked) or `verify-full` (chain checked against `ca_file`, else the
//! Mozilla roots, and the host name). Pool connections run with the server's
//! `statement_timeout`; every live query also has a client-side deadline, so a
//! dead network cannot hold a request. A broken pool connection is dropped and
//! opened again by the next query. Loads (preload, refresh) use their own
//! connection, without a statement timeout but with TCP keepalives. Error
//! messages never hold the password.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, NoTls, Row, Statement};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::backend::{LiveError, LiveKey};
use crate::config::{ConnectionConfig, Duplicates, SslMode};
use crate::dataset::{Dataset, DatasetError, KeyRef, RowsBuilder, Schema, Value};
use crate::log;

/// Extra time the client waits past the server's `statement_timeout`, so the
/// server's own cancel normally arrives first.
const CLIENT_GRACE: Duration = Duration::from_millis(500);

/// Errors talking to a database. Messages never hold credentials.
#[derive(Debug, thiserror::Error)]
pub enum SqlError {
    /// Could not connect or authenticate.
    #[error("connection `{connection}`: cannot connect to {target}: {reason}")]
    Connect {
        connection: String,
        target: String,
        reason: String,
    },
    /// The TLS settings cannot be used (unreadable `ca_file`, ...).
    #[error("connection `{connection}`: {reason}")]
    Tls { connection: String, reason: String },
    /// A query failed.
    #[error("dataset `{dataset}`: query failed: {reason}")]
    Query { dataset: String, reason: String },
    /// A query took longer than its limit.
    #[error("dataset `{dataset}`: query timed out")]
    Timeout { dataset: String },
    /// The query's columns do not fit the declaration.
    #[error("dataset `{dataset}`: {reason}")]
    Schema { dataset: String, reason: String },
    /// Loaded rows do not make a dataset.
    #[error(transparent)]
    Dataset(#[from] DatasetError),
}

/// Opens connections for one `[connection]` with its resolved password.
#[derive(Clone)]
pub struct Connector {
    name: String,
    target: String,
    /// Pool connections (live queries): with `statement_timeout`.
    live: tokio_postgres::Config,
    /// Load connections (preload, refresh): no statement timeout.
    load: tokio_postgres::Config,
    tls: Option<MakeRustlsConnect>,
    pool_size: usize,
    connect_timeout: Duration,
    statement_timeout: Duration,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Connector({} -> {})", self.name, self.target)
    }
}

/// What a connection is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    Live,
    Load,
}

impl Connector {
    /// A connector; reads `ca_file` (relative to `bundle_dir`) for `verify-full`.
    pub fn new(
        name: &str,
        config: &ConnectionConfig,
        password: Option<String>,
        bundle_dir: &Path,
    ) -> Result<Connector, SqlError> {
        let ConnectionConfig::Postgres {
            host,
            port,
            database,
            user,
            pool_size,
            sslmode,
            ca_file,
            statement_timeout_ms,
            connect_timeout_ms,
            ..
        } = config
        else {
            return Err(SqlError::Tls {
                connection: name.to_string(),
                reason: "not a postgres connection".into(),
            });
        };
        let connect_timeout = Duration::from_millis(*connect_timeout_ms);
        let statement_timeout = Duration::from_millis(*statement_timeout_ms);
        let mut pg = tokio_postgres::Config::new();
        pg.host(host)
            .port(*port)
            .dbname(database)
            .user(user)
            .application_name("mesh-runtime")
            .connect_timeout(connect_timeout)
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(30))
            .keepalives_interval(Duration::from_secs(10))
            .keepalives_retries(3)
            .ssl_mode(match sslmode {
                SslMode::Disable => tokio_postgres::config::SslMode::Disable,
                _ => tokio_postgres::config::SslMode::Require,
            });
        if let Some(password) = password {
            pg.password(password);
        }
        let mut live = pg.clone();
        live.options(format!("-c statement_timeout={statement_timeout_ms}"));
        pg.options("-c statement_timeout=0");
        let tls = match sslmode {
            SslMode::Disable => None,
            mode => {
                let ca = ca_file.as_ref().map(|p| bundle_dir.join(p));
                Some(
                    tls_config(*mode, ca.as_deref()).map_err(|reason| SqlError::Tls {
                        connection: name.to_string(),
                        reason,
                    })?,
                )
            }
        };
        let scheme = match sslmode {
            SslMode::Disable => "",
            SslMode::Require => "?sslmode=require",
            SslMode::VerifyFull => "?sslmode=verify-full",
        };
        Ok(Connector {
            name: name.to_string(),
            target: format!("postgresql://{user}@{host}:{port}/{database}{scheme}"),
            live,
            load: pg,
            tls,
            pool_size: *pool_size,
            connect_timeout,
            statement_timeout,
        })
    }

    /// Opens one connection; its driver task runs until the client is dropped.
    async fn connect(&self, purpose: Purpose) -> Result<Client, SqlError> {
        let config = match purpose {
            Purpose::Live => &self.live,
            Purpose::Load => &self.load,
        };
        let fail = |reason: String| SqlError::Connect {
            connection: self.name.clone(),
            target: self.target.clone(),
            reason,
        };
        let name = self.name.clone();
        let closed = move |e: tokio_postgres::Error| {
            log::warn(format_args!(
                "connection `{name}` closed: {}",
                pg_reason(&e)
            ))
        };
        let connecting = async {
            match &self.tls {
                None => {
                    let (client, connection) = config.connect(NoTls).await?;
                    tokio::spawn(async move { connection.await.map_err(closed) });
                    Ok(client)
                }
                Some(tls) => {
                    let (client, connection) = config.connect(tls.clone()).await?;
                    tokio::spawn(async move { connection.await.map_err(closed) });
                    Ok(client)
                }
            }
        };
        match tokio::time::timeout(self.connect_timeout, connecting).await {
            Err(_) => Err(fail(format!(
                "no answer within {} ms",
                self.connect_timeout.as_millis()
            ))),
            Ok(Err(e)) => Err(fail(pg_reason(&e))),
            Ok(Ok(client)) => Ok(client),
        }
    }
}

/// The rustls configuration of `require` (no certificate check) or
/// `verify-full` (against `ca_file`, else the Mozilla roots).
fn tls_config(mode: SslMode, ca_file: Option<&Path>) -> Result<MakeRustlsConnect, String> {
    let config = match mode {
        SslMode::Require => {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .map_err(|e| format!("tls: {e}"))?
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
                .with_no_client_auth()
        }
        _ => crate::tls::client_config(ca_file.as_slice()).map_err(|e| format!("ca_file: {e}"))?,
    };
    Ok(MakeRustlsConnect::new(config))
}

/// `sslmode = "require"`: encrypt, but accept any server certificate (the
/// handshake signatures are still checked).
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The message of a driver error, without the connection parameters; TLS
/// failures in words.
fn pg_reason(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{}: {}", db.code().code(), db.message());
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(err) = source {
        let tls = err.downcast_ref::<rustls::Error>().or_else(|| {
            err.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        });
        if let Some(tls) = tls {
            return tls_reason(tls);
        }
        source = err.source();
    }
    let text = e.to_string();
    match std::error::Error::source(e) {
        Some(source) => format!("{text}: {source}"),
        None => text,
    }
}

fn tls_reason(e: &rustls::Error) -> String {
    use rustls::CertificateError as C;
    match e {
        rustls::Error::InvalidCertificate(C::UnknownIssuer | C::BadSignature) => {
            "tls: the server's certificate is not signed by a trusted CA (check `ca_file`)".into()
        }
        rustls::Error::InvalidCertificate(C::NotValidForName)
        | rustls::Error::InvalidCertificate(C::NotValidForNameContext { .. }) => {
            "tls: the server's certificate is not valid for the connection's host name".into()
        }
        rustls::Error::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => {
            "tls: the server's certificate has expired".into()
        }
        other => format!("tls: {other}"),
    }
}

/// Whether a failed query means the database cannot be reached (rather than
/// a problem with the query): connection errors, shutdowns, no resources,
/// a server-side cancel.
fn unreachable(e: &tokio_postgres::Error) -> bool {
    match e.as_db_error() {
        None => true,
        Some(db) => {
            let code = db.code().code();
            code.starts_with("08") || code.starts_with("57") || code.starts_with("53")
        }
    }
}

/// The select list and schema of a query, from its prepared statement.
struct Shape {
    select: String,
    schema: Schema,
    kinds: Vec<Kind>,
}

#[derive(Clone, Copy)]
enum Kind {
    I16,
    I32,
    I64,
    F32,
    F64,
    Bool,
    Text,
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

async fn shape(client: &Client, dataset: &str, query: &str, key: &str) -> Result<Shape, SqlError> {
    let stmt = client.prepare(query).await.map_err(|e| SqlError::Query {
        dataset: dataset.to_string(),
        reason: pg_reason(&e),
    })?;
    let mut select = Vec::new();
    let mut names = Vec::new();
    let mut types = Vec::new();
    let mut kinds = Vec::new();
    for column in stmt.columns() {
        let col = format!("mesh_src.{}", quote_ident(column.name()));
        let (expr, ty, kind) = match *column.type_() {
            Type::INT2 => (col, crate::config::ColumnType::Int, Kind::I16),
            Type::INT4 => (col, crate::config::ColumnType::Int, Kind::I32),
            Type::INT8 => (col, crate::config::ColumnType::Int, Kind::I64),
            Type::FLOAT4 => (col, crate::config::ColumnType::Float, Kind::F32),
            Type::FLOAT8 => (col, crate::config::ColumnType::Float, Kind::F64),
            Type::NUMERIC => (
                format!("{col}::float8"),
                crate::config::ColumnType::Float,
                Kind::F64,
            ),
            Type::BOOL => (col, crate::config::ColumnType::Bool, Kind::Bool),
            Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME => {
                (col, crate::config::ColumnType::String, Kind::Text)
            }
            _ => (
                format!("{col}::text"),
                crate::config::ColumnType::String,
                Kind::Text,
            ),
        };
        select.push(expr);
        names.push(column.name().to_string());
        types.push(ty);
        kinds.push(kind);
    }
    let key_pos = names
        .iter()
        .position(|n| n == key)
        .ok_or_else(|| SqlError::Schema {
            dataset: dataset.to_string(),
            reason: format!(
                "key column `{key}` is not in the query's columns ({})",
                names.join(", ")
            ),
        })?;
    if !matches!(
        types[key_pos],
        crate::config::ColumnType::Int | crate::config::ColumnType::String
    ) {
        return Err(SqlError::Schema {
            dataset: dataset.to_string(),
            reason: format!("key column `{key}` must be an integer or text column"),
        });
    }
    Ok(Shape {
        select: format!("SELECT {} FROM ({query}) AS mesh_src", select.join(", ")),
        schema: Schema {
            names,
            types,
            key: key_pos,
        },
        kinds,
    })
}

fn decode(row: &Row, kinds: &[Kind]) -> Result<Vec<Value>, tokio_postgres::Error> {
    let mut out = Vec::with_capacity(kinds.len());
    for (i, kind) in kinds.iter().enumerate() {
        let v = match kind {
            Kind::I16 => row
                .try_get::<_, Option<i16>>(i)?
                .map(|v| Value::Int(v.into())),
            Kind::I32 => row
                .try_get::<_, Option<i32>>(i)?
                .map(|v| Value::Int(v.into())),
            Kind::I64 => row.try_get::<_, Option<i64>>(i)?.map(Value::Int),
            Kind::F32 => row
                .try_get::<_, Option<f32>>(i)?
                .filter(|v| v.is_finite())
                .map(|v| Value::Float(v.into())),
            Kind::F64 => row
                .try_get::<_, Option<f64>>(i)?
                .filter(|v| v.is_finite())
                .map(Value::Float),
            Kind::Bool => row.try_get::<_, Option<bool>>(i)?.map(Value::Bool),
            Kind::Text => row.try_get::<_, Option<String>>(i)?.map(Value::Str),
        };
        out.push(v.unwrap_or(Value::Null));
    }
    Ok(out)
}

/// Runs a `preload` dataset's query on a connection of its own, streaming
/// the rows into a new in-memory dataset (the key index is built off the
/// async threads).
pub async fn load(
    connector: &Connector,
    dataset: &str,
    query: &str,
    key: &str,
    duplicates: Duplicates,
) -> Result<Dataset, SqlError> {
    let client = connector.connect(Purpose::Load).await?;
    let shape = shape(&client, dataset, query, key).await?;
    let query_err = |e: tokio_postgres::Error| SqlError::Query {
        dataset: dataset.to_string(),
        reason: pg_reason(&e),
    };
    let stream = client
        .query_raw(&shape.select, Vec::<i32>::new())
        .await
        .map_err(query_err)?;
    let mut stream = std::pin::pin!(stream);
    let mut builder = RowsBuilder::new(dataset, shape.schema);
    while let Some(row) = stream.next().await {
        let row = row.map_err(query_err)?;
        builder.push(decode(&row, &shape.kinds).map_err(query_err)?)?;
    }
    drop(client);
    tokio::task::spawn_blocking(move || builder.finish(duplicates))
        .await
        .map_err(|e| SqlError::Query {
            dataset: dataset.to_string(),
            reason: format!("building the index: {e}"),
        })?
        .map_err(SqlError::from)
}

/// A pooled connection with the live query prepared on it.
type PooledConn = Arc<(Client, Statement)>;

/// The by-key query of a `live` dataset on PostgreSQL (see
/// [`crate::backend::LiveTable`], which coalesces, caches and counts): one
/// prepared statement per connection of a small pool.
pub struct LiveQuery {
    name: String,
    connector: Connector,
    sql: String,
    kinds: Vec<Kind>,
    key_type: Type,
    slots: Vec<Mutex<Option<PooledConn>>>,
    next: AtomicUsize,
}

impl LiveQuery {
    /// Connects the first pool connection and prepares the by-key query.
    pub async fn open(
        connector: &Connector,
        dataset: &str,
        query: &str,
        key: &str,
    ) -> Result<(LiveQuery, Schema), SqlError> {
        let client = connector.connect(Purpose::Live).await?;
        let shape = shape(&client, dataset, query, key).await?;
        let sql = format!(
            "{} WHERE mesh_src.{} = $1 LIMIT 2",
            shape.select,
            quote_ident(key)
        );
        let stmt = client.prepare(&sql).await.map_err(|e| SqlError::Query {
            dataset: dataset.to_string(),
            reason: pg_reason(&e),
        })?;
        let key_type = stmt.params().first().cloned().unwrap_or(Type::TEXT);
        let mut slots: Vec<Mutex<Option<PooledConn>>> =
            (0..connector.pool_size).map(|_| Mutex::new(None)).collect();
        slots[0] = Mutex::new(Some(Arc::new((client, stmt))));
        let query = LiveQuery {
            name: dataset.to_string(),
            connector: connector.clone(),
            sql,
            kinds: shape.kinds,
            key_type,
            slots,
            next: AtomicUsize::new(0),
        };
        Ok((query, shape.schema))
    }

    /// The key as the query's parameter type takes it; `None` when no row can
    /// have it (text for an integer key, out of range).
    pub fn key(&self, key: KeyRef<'_>) -> Option<LiveKey> {
        let int = matches!(self.key_type, Type::INT2 | Type::INT4 | Type::INT8);
        let key = LiveKey::of(key, int)?;
        let fits = match (&key, &self.key_type) {
            (LiveKey::Int(k), &Type::INT2) => i16::try_from(*k).is_ok(),
            (LiveKey::Int(k), &Type::INT4) => i32::try_from(*k).is_ok(),
            _ => true,
        };
        fits.then_some(key)
    }

    /// The rows with `key` (at most two); a stale pooled connection (closed
    /// since its last use, e.g. the database restarted) is replaced and the
    /// query retried once.
    pub async fn rows(&self, key: &LiveKey) -> Result<Vec<Vec<Value>>, LiveError> {
        match self.rows_once(key).await {
            Err((LiveError::Unavailable { .. }, false)) => self.rows_once(key).await,
            other => other,
        }
        .map_err(|(e, _)| e)
    }

    /// A pool connection: the slot's, or a new one (`true`) if it has none or
    /// it is closed.
    async fn conn(&self, slot: usize) -> Result<(PooledConn, bool), LiveError> {
        let current = self.slots[slot].lock().map(|g| g.clone()).unwrap_or(None);
        if let Some(conn) = current.filter(|c| !c.0.is_closed()) {
            return Ok((conn, false));
        }
        let client = self
            .connector
            .connect(Purpose::Live)
            .await
            .map_err(|e| match e {
                SqlError::Connect { reason, .. } if reason.starts_with("no answer within") => {
                    LiveError::Timeout {
                        dataset: self.name.clone(),
                        ms: self.connector.connect_timeout.as_millis() as u64,
                    }
                }
                SqlError::Connect { reason, .. } => LiveError::Unavailable {
                    dataset: self.name.clone(),
                    reason: format!("cannot connect: {reason}"),
                },
                other => LiveError::Unavailable {
                    dataset: self.name.clone(),
                    reason: other.to_string(),
                },
            })?;
        let limit = self.connector.statement_timeout + CLIENT_GRACE;
        let stmt = match tokio::time::timeout(limit, client.prepare(&self.sql)).await {
            Err(_) => return Err(self.timeout()),
            Ok(Err(e)) => return Err(self.query_error(&e)),
            Ok(Ok(stmt)) => stmt,
        };
        let conn = Arc::new((client, stmt));
        if let Ok(mut guard) = self.slots[slot].lock() {
            *guard = Some(conn.clone());
        }
        Ok((conn, true))
    }

    /// Forgets `conn` if `slot` still holds it (it is broken or busy with an
    /// abandoned query); the next query there opens a new connection.
    fn discard(&self, slot: usize, conn: &PooledConn) {
        if let Ok(mut guard) = self.slots[slot].lock()
            && guard.as_ref().is_some_and(|c| Arc::ptr_eq(c, conn))
        {
            *guard = None;
        }
    }

    fn timeout(&self) -> LiveError {
        LiveError::Timeout {
            dataset: self.name.clone(),
            ms: self.connector.statement_timeout.as_millis() as u64,
        }
    }

    fn query_error(&self, e: &tokio_postgres::Error) -> LiveError {
        let cancelled = e
            .as_db_error()
            .is_some_and(|db| db.code().code() == "57014");
        if cancelled {
            self.timeout()
        } else if unreachable(e) {
            LiveError::Unavailable {
                dataset: self.name.clone(),
                reason: pg_reason(e),
            }
        } else {
            LiveError::Query {
                dataset: self.name.clone(),
                reason: pg_reason(e),
            }
        }
    }

    /// One attempt; the error says whether the connection was new.
    async fn rows_once(&self, key: &LiveKey) -> Result<Vec<Vec<Value>>, (LiveError, bool)> {
        let slot = self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len();
        let (conn, fresh) = self.conn(slot).await.map_err(|e| (e, true))?;
        let (i16v, i32v, i64v, text);
        let param: &(dyn ToSql + Sync) = match (key, &self.key_type) {
            (LiveKey::Int(k), &Type::INT2) => {
                i16v = *k as i16;
                &i16v
            }
            (LiveKey::Int(k), &Type::INT4) => {
                i32v = *k as i32;
                &i32v
            }
            (LiveKey::Int(k), _) => {
                i64v = *k;
                &i64v
            }
            (LiveKey::Text(s), _) => {
                text = &**s;
                &text
            }
        };
        let params = [param];
        let limit = self.connector.statement_timeout + CLIENT_GRACE;
        let rows = match tokio::time::timeout(limit, conn.0.query(&conn.1, &params)).await {
            Err(_) => {
                self.discard(slot, &conn);
                return Err((self.timeout(), true));
            }
            Ok(Err(e)) => {
                let err = self.query_error(&e);
                if !matches!(err, LiveError::Query { .. }) {
                    self.discard(slot, &conn);
                }
                return Err((err, fresh));
            }
            Ok(Ok(rows)) => rows,
        };
        rows.iter()
            .map(|row| decode(row, &self.kinds))
            .collect::<Result<_, _>>()
            .map_err(|e| {
                (
                    LiveError::Query {
                        dataset: self.name.clone(),
                        reason: pg_reason(&e),
                    },
                    fresh,
                )
            })
    }
}
