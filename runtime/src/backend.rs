//! Dataset backends: the databases a `sql` dataset reads, PostgreSQL
//! ([`crate::sql`]) or Snowflake ([`crate::snowflake`]), behind one
//! interface.
//!
//! A [`Connection`] is one `[connection]` with its secrets resolved. It loads
//! a `preload` dataset whole (at start and at each refresh, which
//! [`crate::freshness`] swaps in) and opens a `live` dataset as a
//! [`LiveTable`]: the backend's by-key query under one roof that coalesces
//! concurrent lookups of a key, caches rows (and misses) when asked, counts
//! the queries that reach the database, enforces `duplicates`, and logs when
//! the database goes away and comes back. What a backend adds is only how to
//! run the by-key query and how its errors read: a [`LiveError`] says
//! unreachable or too slow (503 for the request) or failed (502), the same
//! for every backend.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crate::cache::{CacheStats, KeyCache};
use crate::config::{Bundle, CacheConfig, ConnectionConfig, Duplicates};
use crate::dataset::{Dataset, KeyRef, Schema, Value};
use crate::log;
use crate::service::LoadError;
use crate::snowflake::{self, SnowflakeError};
use crate::sql::{self, SqlError};

/// Why a live lookup got no answer from the database. Cloned to every
/// request that waited for the same key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LiveError {
    /// The database cannot be reached (connection refused, lost, shut down,
    /// login refused).
    #[error("dataset `{dataset}`: the database is unavailable: {reason}")]
    Unavailable { dataset: String, reason: String },
    /// No answer within the limit (connecting or querying).
    #[error("dataset `{dataset}`: the database did not answer within {ms} ms")]
    Timeout { dataset: String, ms: u64 },
    /// The database answered with an error (SQL, permissions, duplicates).
    #[error("dataset `{dataset}`: query failed: {reason}")]
    Query { dataset: String, reason: String },
}

/// A key as a live query binds it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum LiveKey {
    Int(i64),
    Text(Box<str>),
}

impl LiveKey {
    /// `key` for an integer key column (`int`; `None` for text that spells
    /// no integer: no row can have it) or a text one.
    pub fn of(key: KeyRef<'_>, int: bool) -> Option<LiveKey> {
        if int {
            return match key {
                KeyRef::Int(i) => Some(LiveKey::Int(i)),
                KeyRef::Str(s) => s.parse::<i64>().ok().map(LiveKey::Int),
            };
        }
        Some(LiveKey::Text(match key {
            KeyRef::Str(s) => s.into(),
            KeyRef::Int(i) => i.to_string().into(),
        }))
    }

    /// The key borrowed, as a request spells it.
    pub fn key_ref(&self) -> KeyRef<'_> {
        match self {
            LiveKey::Int(i) => KeyRef::Int(*i),
            LiveKey::Text(s) => KeyRef::Str(s),
        }
    }
}

/// A row of a live dataset, shared by the cache and the requests.
pub type LiveRow = Option<Arc<Vec<Value>>>;

/// One `[connection]`, ready to load datasets.
#[derive(Debug, Clone)]
pub enum Connection {
    Postgres(Box<sql::Connector>),
    Snowflake(Arc<snowflake::Client>),
}

impl Connection {
    /// The connection `name` of `bundle`, its secrets read (see
    /// [`Bundle::resolve`]). Does not connect yet.
    pub fn open(
        bundle: &Bundle,
        name: &str,
        config: &ConnectionConfig,
    ) -> Result<Connection, LoadError> {
        let resolve = |secret: &Option<_>| secret.as_ref().map(|s| bundle.resolve(s)).transpose();
        match config {
            ConnectionConfig::Postgres { password, .. } => Ok(Connection::Postgres(Box::new(
                sql::Connector::new(name, config, resolve(password)?, &bundle.dir)?,
            ))),
            ConnectionConfig::Snowflake {
                account,
                user,
                password,
                private_key,
                warehouse,
                database,
                schema,
                role,
                url,
                pool_size,
                statement_timeout_ms,
            } => {
                let credential = match (resolve(password)?, resolve(private_key)?) {
                    (Some(password), _) => snowflake::Credential::Password(password),
                    (None, Some(pem)) => snowflake::Credential::KeyPair(Box::new(
                        snowflake::KeyPair::from_pem(&pem).map_err(|reason| {
                            SnowflakeError::Config {
                                connection: name.to_string(),
                                reason: format!("private_key: {reason}"),
                            }
                        })?,
                    )),
                    (None, None) => {
                        return Err(SnowflakeError::Config {
                            connection: name.to_string(),
                            reason: "no password or private_key".into(),
                        }
                        .into());
                    }
                };
                let settings = snowflake::Settings {
                    account: account.clone(),
                    user: user.clone(),
                    credential,
                    warehouse: warehouse.clone(),
                    database: database.clone(),
                    schema: schema.clone(),
                    role: role.clone(),
                    url: url.clone(),
                    statement_timeout: Duration::from_millis(*statement_timeout_ms),
                    pool_size: *pool_size,
                };
                Ok(Connection::Snowflake(Arc::new(snowflake::Client::new(
                    name, settings,
                )?)))
            }
        }
    }

    /// Runs a `preload` dataset's query and builds the in-memory dataset.
    pub async fn load(
        &self,
        dataset: &str,
        query: &str,
        key: &str,
        duplicates: Duplicates,
    ) -> Result<Dataset, SqlError> {
        match self {
            Connection::Postgres(c) => sql::load(c, dataset, query, key, duplicates).await,
            Connection::Snowflake(c) => {
                snowflake::preload(c, dataset, query, key, duplicates).await
            }
        }
    }

    /// Opens a `live` dataset: works out its columns and by-key query.
    pub async fn live(
        &self,
        dataset: &str,
        query: &str,
        key: &str,
        duplicates: Duplicates,
        cache: Option<&CacheConfig>,
    ) -> Result<LiveTable, SqlError> {
        let (query, schema) = match self {
            Connection::Postgres(c) => {
                let (q, schema) = sql::LiveQuery::open(c, dataset, query, key).await?;
                (LiveQuery::Postgres(Box::new(q)), schema)
            }
            Connection::Snowflake(c) => {
                let (q, schema) =
                    snowflake::LiveQuery::open(c.clone(), dataset, query, key).await?;
                (LiveQuery::Snowflake(q), schema)
            }
        };
        Ok(LiveTable {
            name: dataset.to_string(),
            schema,
            duplicates,
            query,
            cache: KeyCache::new(cache),
            queries_ok: AtomicU64::new(0),
            queries_error: AtomicU64::new(0),
            reachable: AtomicBool::new(true),
        })
    }
}

/// A backend's by-key query.
enum LiveQuery {
    Postgres(Box<sql::LiveQuery>),
    Snowflake(snowflake::LiveQuery),
}

/// A `live` dataset: the backend queried per key, concurrent lookups of one
/// key coalesced into one query, an optional cache.
pub struct LiveTable {
    name: String,
    schema: Schema,
    duplicates: Duplicates,
    query: LiveQuery,
    cache: KeyCache<LiveKey, LiveRow, LiveError>,
    queries_ok: AtomicU64,
    queries_error: AtomicU64,
    /// Whether the last query reached the database (to log changes only).
    reachable: AtomicBool,
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
    pub fn schema(&self) -> &Schema {
        &self.schema
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Cache counters (`None` without a cache).
    pub fn cache_stats(&self) -> Option<CacheStats> {
        self.cache.stats()
    }

    /// Queries run against the database: (answered, failed).
    pub fn query_counts(&self) -> (u64, u64) {
        (
            self.queries_ok.load(Ordering::Relaxed),
            self.queries_error.load(Ordering::Relaxed),
        )
    }

    /// The row with `key`, if any: from the cache, or from one query shared
    /// by every concurrent request for the key.
    pub async fn fetch(&self, key: KeyRef<'_>) -> Result<LiveRow, LiveError> {
        let key = match &self.query {
            LiveQuery::Postgres(q) => q.key(key),
            LiveQuery::Snowflake(q) => q.key(key),
        };
        let Some(key) = key else {
            return Ok(None);
        };
        let param = key.clone();
        self.cache.get(key, || self.query(param)).await
    }

    /// One query for `key`, counted; logs when the database goes away and
    /// when it answers again.
    async fn query(&self, key: LiveKey) -> Result<LiveRow, LiveError> {
        let rows = match &self.query {
            LiveQuery::Postgres(q) => q.rows(&key).await,
            LiveQuery::Snowflake(q) => q.rows(&key).await,
        };
        let result = rows.and_then(|mut rows| {
            if rows.len() > 1 && self.duplicates == Duplicates::Error {
                let shown = match &key {
                    LiveKey::Int(i) => i.to_string(),
                    LiveKey::Text(s) => format!("{s:?}"),
                };
                return Err(LiveError::Query {
                    dataset: self.name.clone(),
                    reason: format!("duplicate key {shown}"),
                });
            }
            Ok(rows.pop().map(Arc::new))
        });
        match &result {
            Ok(_) => {
                self.queries_ok.fetch_add(1, Ordering::Relaxed);
                if !self.reachable.swap(true, Ordering::Relaxed) {
                    log::info(format_args!(
                        "dataset `{}`: the database answers again",
                        self.name
                    ));
                }
            }
            Err(e) => {
                self.queries_error.fetch_add(1, Ordering::Relaxed);
                let query_failed = matches!(e, LiveError::Query { .. });
                let was = self.reachable.swap(query_failed, Ordering::Relaxed);
                if was || query_failed {
                    log::warn(format_args!("{e}"));
                }
            }
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_take_the_key_column_type() {
        assert_eq!(LiveKey::of(KeyRef::Int(7), true), Some(LiveKey::Int(7)));
        assert_eq!(LiveKey::of(KeyRef::Str("7"), true), Some(LiveKey::Int(7)));
        assert_eq!(LiveKey::of(KeyRef::Str("x' OR 1=1"), true), None);
        assert_eq!(
            LiveKey::of(KeyRef::Int(7), false),
            Some(LiveKey::Text("7".into()))
        );
        assert_eq!(
            LiveKey::of(KeyRef::Str("a"), false),
            Some(LiveKey::Text("a".into()))
        );
    }
}
