//! SQL datasets over PostgreSQL (`tokio-postgres`, no TLS).
//!
//! A dataset's query is used as a subquery: `preload` runs
//! `SELECT cols FROM (query) AS mesh_src` once at start into an in-memory
//! [`Dataset`]; `live` prepares `... WHERE mesh_src."key" = $1` on a small pool
//! of connections and runs it per request. Column types come from the
//! prepared statement; `numeric` is read as `float8`, types the runtime does
//! not know as `text`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, NoTls, Row, Statement};

use crate::config::{ColumnType, ConnectionConfig, Duplicates};
use crate::dataset::{Dataset, DatasetError, KeyRef, Schema, Value};
use crate::log;

/// Per-query time limit for live lookups.
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

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
    /// A query failed.
    #[error("dataset `{dataset}`: query failed: {reason}")]
    Query { dataset: String, reason: String },
    /// A live query took longer than the limit.
    #[error("dataset `{dataset}`: query timed out")]
    Timeout { dataset: String },
    /// The query's columns do not fit the declaration.
    #[error("dataset `{dataset}`: {reason}")]
    Schema { dataset: String, reason: String },
    /// Preloaded rows do not make a dataset.
    #[error(transparent)]
    Dataset(#[from] DatasetError),
}

/// Opens connections for one `[connection]` with its resolved password.
#[derive(Clone)]
pub struct Connector {
    name: String,
    target: String,
    config: tokio_postgres::Config,
    pool_size: usize,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Connector({} -> {})", self.name, self.target)
    }
}

impl Connector {
    pub fn new(name: &str, config: &ConnectionConfig, password: Option<String>) -> Connector {
        let ConnectionConfig::Postgres {
            host,
            port,
            database,
            user,
            pool_size,
            ..
        } = config;
        let mut pg = tokio_postgres::Config::new();
        pg.host(host)
            .port(*port)
            .dbname(database)
            .user(user)
            .application_name("mesh-runtime")
            .connect_timeout(Duration::from_secs(5));
        if let Some(password) = password {
            pg.password(password);
        }
        Connector {
            name: name.to_string(),
            target: format!("postgresql://{user}@{host}:{port}/{database}"),
            config: pg,
            pool_size: *pool_size,
        }
    }

    /// Opens one connection; its driver task runs until the client is dropped.
    pub async fn connect(&self) -> Result<Client, SqlError> {
        let (client, connection) =
            self.config
                .connect(NoTls)
                .await
                .map_err(|e| SqlError::Connect {
                    connection: self.name.clone(),
                    target: self.target.clone(),
                    reason: pg_reason(&e),
                })?;
        let name = self.name.clone();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                log::warn(format_args!(
                    "connection `{name}` closed: {}",
                    pg_reason(&e)
                ));
            }
        });
        Ok(client)
    }
}

/// The message of a driver error, without the connection parameters.
fn pg_reason(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => {
            let text = e.to_string();
            match std::error::Error::source(e) {
                Some(source) => format!("{text}: {source}"),
                None => text,
            }
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
            Type::INT2 => (col, ColumnType::Int, Kind::I16),
            Type::INT4 => (col, ColumnType::Int, Kind::I32),
            Type::INT8 => (col, ColumnType::Int, Kind::I64),
            Type::FLOAT4 => (col, ColumnType::Float, Kind::F32),
            Type::FLOAT8 => (col, ColumnType::Float, Kind::F64),
            Type::NUMERIC => (format!("{col}::float8"), ColumnType::Float, Kind::F64),
            Type::BOOL => (col, ColumnType::Bool, Kind::Bool),
            Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME => {
                (col, ColumnType::String, Kind::Text)
            }
            _ => (format!("{col}::text"), ColumnType::String, Kind::Text),
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
    if !matches!(types[key_pos], ColumnType::Int | ColumnType::String) {
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

/// Runs a `preload` dataset's query and builds the in-memory dataset.
pub async fn preload(
    connector: &Connector,
    dataset: &str,
    query: &str,
    key: &str,
    duplicates: Duplicates,
) -> Result<Dataset, SqlError> {
    let client = connector.connect().await?;
    let shape = shape(&client, dataset, query, key).await?;
    let query_err = |e: tokio_postgres::Error| SqlError::Query {
        dataset: dataset.to_string(),
        reason: pg_reason(&e),
    };
    let rows = client.query(&shape.select, &[]).await.map_err(query_err)?;
    let mut values = Vec::with_capacity(rows.len());
    for row in &rows {
        values.push(decode(row, &shape.kinds).map_err(query_err)?);
    }
    drop(rows);
    Ok(Dataset::from_rows(
        dataset,
        shape.schema,
        values,
        duplicates,
    )?)
}

/// A pooled connection with the live query prepared on it.
type PooledConn = Arc<(Client, Statement)>;

/// A `live` dataset: one prepared query per pooled connection.
pub struct LiveTable {
    name: String,
    connector: Connector,
    sql: String,
    schema: Schema,
    kinds: Vec<Kind>,
    key_type: Type,
    duplicates: Duplicates,
    slots: Vec<Mutex<Option<PooledConn>>>,
    next: AtomicUsize,
}

impl std::fmt::Debug for LiveTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveTable")
            .field("name", &self.name)
            .field("schema", &self.schema)
            .finish_non_exhaustive()
    }
}

impl LiveTable {
    /// Connects the pool and prepares the by-key query.
    pub async fn open(
        connector: &Connector,
        dataset: &str,
        query: &str,
        key: &str,
        duplicates: Duplicates,
    ) -> Result<LiveTable, SqlError> {
        let client = connector.connect().await?;
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
        Ok(LiveTable {
            name: dataset.to_string(),
            connector: connector.clone(),
            sql,
            schema: shape.schema,
            kinds: shape.kinds,
            key_type,
            duplicates,
            slots,
            next: AtomicUsize::new(0),
        })
    }

    pub fn schema(&self) -> &Schema {
        &self.schema
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    async fn conn(&self) -> Result<PooledConn, SqlError> {
        let slot = &self.slots[self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len()];
        let current = slot.lock().map(|g| g.clone()).unwrap_or(None);
        if let Some(conn) = current.filter(|c| !c.0.is_closed()) {
            return Ok(conn);
        }
        let client = self.connector.connect().await?;
        let stmt = client
            .prepare(&self.sql)
            .await
            .map_err(|e| SqlError::Query {
                dataset: self.name.clone(),
                reason: pg_reason(&e),
            })?;
        let conn = Arc::new((client, stmt));
        if let Ok(mut guard) = slot.lock() {
            *guard = Some(conn.clone());
        }
        Ok(conn)
    }

    /// The row with `key`, if any.
    pub async fn fetch(&self, key: KeyRef<'_>) -> Result<Option<Vec<Value>>, SqlError> {
        let text;
        let (i16v, i32v, i64v);
        let param: &(dyn ToSql + Sync) = match self.key_type {
            Type::INT2 | Type::INT4 | Type::INT8 => {
                let k = match key {
                    KeyRef::Int(i) => i,
                    KeyRef::Str(s) => match s.parse::<i64>() {
                        Ok(i) => i,
                        Err(_) => return Ok(None),
                    },
                };
                match self.key_type {
                    Type::INT2 => match i16::try_from(k) {
                        Ok(v) => {
                            i16v = v;
                            &i16v
                        }
                        Err(_) => return Ok(None),
                    },
                    Type::INT4 => match i32::try_from(k) {
                        Ok(v) => {
                            i32v = v;
                            &i32v
                        }
                        Err(_) => return Ok(None),
                    },
                    _ => {
                        i64v = k;
                        &i64v
                    }
                }
            }
            _ => {
                text = match key {
                    KeyRef::Str(s) => s.to_string(),
                    KeyRef::Int(i) => i.to_string(),
                };
                &text
            }
        };
        let conn = self.conn().await?;
        let params = [param];
        let query = conn.0.query(&conn.1, &params);
        let rows = match tokio::time::timeout(QUERY_TIMEOUT, query).await {
            Err(_) => {
                return Err(SqlError::Timeout {
                    dataset: self.name.clone(),
                });
            }
            Ok(Err(e)) => {
                return Err(SqlError::Query {
                    dataset: self.name.clone(),
                    reason: pg_reason(&e),
                });
            }
            Ok(Ok(rows)) => rows,
        };
        if rows.len() > 1 && self.duplicates == Duplicates::Error {
            return Err(SqlError::Query {
                dataset: self.name.clone(),
                reason: format!("duplicate key {key}"),
            });
        }
        match rows.last() {
            None => Ok(None),
            Some(row) => decode(row, &self.kinds)
                .map(Some)
                .map_err(|e| SqlError::Query {
                    dataset: self.name.clone(),
                    reason: pg_reason(&e),
                }),
        }
    }
}
