//! Snowflake: a small client of the protocol Snowflake's own connectors speak,
//! and SQL datasets on it.
//!
//! The protocol is JSON over HTTPS: `POST /session/v1/login-request` trades
//! the user's password (or a JWT signed with the user's RSA key, see
//! [`keypair`]) for a session token; `POST /queries/v1/query-request` runs one
//! statement with `Authorization: Snowflake Token="..."` and answers the
//! column metadata (`rowtype`) and the rows, inline as a JSON `rowset` of
//! strings or as an Arrow IPC stream in `rowsetBase64` (see [`arrow`]), plus,
//! for large results, `chunks` fetched from cloud storage. A statement still
//! running after the server's wait answers code `333334` and a `getResultUrl`
//! that is polled. A session that expired (`390112`) or that the server
//! forgot is renewed by logging in again, once per request.
//!
//! The base URL is `https://<account>.snowflakecomputing.com` unless the
//! connection sets `url` (private link, or a local server in tests such as
//! fakesnow's). HTTPS uses rustls with the Mozilla root set compiled in: the
//! runtime image has no CA store.
//!
//! Datasets use the query as a subquery, like PostgreSQL's: `preload` runs
//! `SELECT cols FROM (query) AS mesh_src`, `live` adds
//! `WHERE mesh_src."KEY" = ? LIMIT 2` with the key bound. Column types come
//! from a `describeOnly` request: `NUMBER(p, 0)` is `int`, `NUMBER(p, s)`
//! (read as `FLOAT`), `FLOAT` are `float`, `BOOLEAN` is `bool`, `TEXT` is
//! `string`, every other type is read as text (`::VARCHAR`). Snowflake stores
//! unquoted identifiers in upper case; a column whose name has no lower-case
//! letter is reported in lower case (`select customer_id` gives
//! `customer_id`), quoted mixed-case names are kept as they are.

pub mod arrow;
pub mod keypair;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::http::{HeaderValue, Method, Request, StatusCode, Uri, header};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;
use serde_json::{Value as Json, json};

use crate::backend::{LiveError, LiveKey};
use crate::config::{ColumnType, Duplicates};
use crate::dataset::{Dataset, KeyRef, Schema, Value};
use crate::sql::SqlError;

pub use keypair::KeyPair;

/// Largest answer read from Snowflake or a result chunk (1 GiB).
const MAX_ANSWER_BYTES: usize = 1 << 30;
/// Limit of a login request.
const LOGIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Limit of a `preload` query, all chunks included.
const PRELOAD_TIMEOUT: Duration = Duration::from_secs(600);
/// Pause between polls of a statement that is still running.
const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// Session codes that mean "log in again": expired (390112), unknown
/// token (390104, fakesnow and Snowflake), master token expired (390114).
const SESSION_GONE: &[&str] = &["390104", "390112", "390114"];
/// Statement still running: poll `getResultUrl`.
const IN_PROGRESS: &[&str] = &["333333", "333334"];

/// Errors talking to Snowflake. Never hold a password, key or token.
#[derive(Debug, thiserror::Error)]
pub enum SnowflakeError {
    /// The connection's settings cannot make a client.
    #[error("connection `{connection}`: {reason}")]
    Config { connection: String, reason: String },
    /// The server could not be reached or the exchange broke off.
    #[error("connection `{connection}`: cannot reach {target}: {reason}")]
    Http {
        connection: String,
        target: String,
        reason: String,
    },
    /// A request took longer than its limit.
    #[error("connection `{connection}`: {target} did not answer within {ms} ms")]
    Timeout {
        connection: String,
        target: String,
        ms: u128,
    },
    /// The login was refused (wrong password, unknown user, ...).
    #[error("connection `{connection}`: login to {target} refused: {message} (code {code})")]
    Login {
        connection: String,
        target: String,
        code: String,
        message: String,
    },
    /// The server ran the statement and reported an error.
    #[error("snowflake error {code}: {message}")]
    Query { code: String, message: String },
    /// The session expired and logging in again did not help.
    #[error("connection `{connection}`: session expired ({code})")]
    SessionGone { connection: String, code: String },
    /// The answer is not what the protocol says.
    #[error("connection `{connection}`: unexpected answer from {target}: {reason}")]
    Protocol {
        connection: String,
        target: String,
        reason: String,
    },
}

/// How the user proves who they are.
pub enum Credential {
    Password(String),
    KeyPair(Box<KeyPair>),
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credential::Password(_) => f.write_str("Password(..)"),
            Credential::KeyPair(k) => write!(f, "{k:?}"),
        }
    }
}

/// A Snowflake connection's settings, secrets resolved.
#[derive(Debug)]
pub struct Settings {
    /// Account identifier: `xy12345.eu-west-1` or `myorg-myaccount`.
    pub account: String,
    pub user: String,
    pub credential: Credential,
    pub warehouse: Option<String>,
    pub database: String,
    pub schema: Option<String>,
    pub role: Option<String>,
    /// Base URL override; default `https://<account>.snowflakecomputing.com`.
    pub url: Option<String>,
    /// Limit of one `live` query (HTTP round trips and polls included).
    pub statement_timeout: Duration,
    /// HTTP connections kept open.
    pub pool_size: usize,
}

/// A bind parameter (`?` in the statement, in order).
#[derive(Debug, Clone, PartialEq)]
pub enum Bind {
    Int(i64),
    Float(f64),
    Bool(bool),
    Text(String),
}

impl Bind {
    fn wire(&self) -> Json {
        match self {
            Bind::Int(v) => json!({"type": "FIXED", "value": v.to_string()}),
            Bind::Float(v) => json!({"type": "REAL", "value": v.to_string()}),
            Bind::Bool(v) => json!({"type": "BOOLEAN", "value": v.to_string()}),
            Bind::Text(v) => json!({"type": "TEXT", "value": v}),
        }
    }
}

/// A result column.
#[derive(Debug, Clone, PartialEq)]
pub struct Column {
    /// The name as Snowflake reports it.
    pub name: String,
    /// Snowflake's type name in `rowtype` (`fixed`, `real`, `text`, ...).
    pub snowflake_type: String,
    /// Digits after the point of a `fixed` column.
    pub scale: i64,
    /// The runtime's type, for the types it holds; `None` for others (dates,
    /// timestamps, variants, binaries), which arrive as text if at all.
    pub ty: Option<ColumnType>,
}

/// Columns and rows of a statement.
#[derive(Debug, Clone, PartialEq)]
pub struct QueryResult {
    pub columns: Vec<Column>,
    pub rows: Vec<Vec<Value>>,
}

type Https = hyper_rustls::HttpsConnector<HttpConnector>;

struct Session {
    token: String,
    generation: u64,
}

/// A logged-in client; one session shared by all statements (Snowflake runs
/// statements of one session concurrently).
pub struct Client {
    name: String,
    base: String,
    http: HyperClient<Https, Full<Bytes>>,
    settings: Settings,
    session: tokio::sync::RwLock<Option<Session>>,
    login_lock: tokio::sync::Mutex<u64>,
    sequence: AtomicU64,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "snowflake::Client({} -> {} as {})",
            self.name, self.base, self.settings.user
        )
    }
}

impl Client {
    /// A client for connection `name`; does not connect yet.
    pub fn new(name: &str, settings: Settings) -> Result<Client, SnowflakeError> {
        let fail = |reason: String| SnowflakeError::Config {
            connection: name.to_string(),
            reason,
        };
        let base = match &settings.url {
            Some(url) => url.trim_end_matches('/').to_string(),
            None => {
                if settings.account.is_empty()
                    || !settings
                        .account
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
                {
                    return Err(fail(format!(
                        "account `{}` must use only letters, digits, `-`, `_` and `.`",
                        settings.account
                    )));
                }
                // Underscores are not valid in host names; Snowflake answers on dashes.
                format!(
                    "https://{}.snowflakecomputing.com",
                    settings.account.replace('_', "-")
                )
            }
        };
        let uri: Uri = base
            .parse()
            .map_err(|e| fail(format!("invalid url `{base}`: {e}")))?;
        if !matches!(uri.scheme_str(), Some("http" | "https"))
            || uri.host().is_none()
            || uri.path() != "/"
        {
            return Err(fail(format!(
                "url `{base}` must be http(s)://host[:port], without a path"
            )));
        }
        Ok(Client {
            name: name.to_string(),
            base,
            http: http_client(settings.pool_size),
            settings,
            session: tokio::sync::RwLock::new(None),
            login_lock: tokio::sync::Mutex::new(0),
            sequence: AtomicU64::new(1),
        })
    }

    /// The connection's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `https://...`: where the client connects (for messages).
    pub fn target(&self) -> &str {
        &self.base
    }

    /// The limit of one `live` query.
    pub fn statement_timeout(&self) -> Duration {
        self.settings.statement_timeout
    }

    /// Logs in now (a fresh session), instead of at the first statement.
    pub async fn connect(&self) -> Result<(), SnowflakeError> {
        self.relogin(None).await.map(|_| ())
    }

    /// Runs one statement with positional binds and reads all its rows.
    pub async fn query(
        &self,
        sql: &str,
        binds: &[Bind],
        timeout: Duration,
    ) -> Result<QueryResult, SnowflakeError> {
        self.statement(sql, binds, false, timeout).await
    }

    /// The columns a statement would answer, without running it.
    pub async fn describe(
        &self,
        sql: &str,
        timeout: Duration,
    ) -> Result<Vec<Column>, SnowflakeError> {
        Ok(self.statement(sql, &[], true, timeout).await?.columns)
    }

    async fn statement(
        &self,
        sql: &str,
        binds: &[Bind],
        describe_only: bool,
        timeout: Duration,
    ) -> Result<QueryResult, SnowflakeError> {
        let work = async {
            let (token, generation) = self.token().await?;
            match self.statement_once(&token, sql, binds, describe_only).await {
                Err(SnowflakeError::SessionGone { .. }) => {
                    let (token, _) = self.relogin(Some(generation)).await?;
                    self.statement_once(&token, sql, binds, describe_only).await
                }
                other => other,
            }
        };
        tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| SnowflakeError::Timeout {
                connection: self.name.clone(),
                target: self.base.clone(),
                ms: timeout.as_millis(),
            })?
    }

    async fn statement_once(
        &self,
        token: &str,
        sql: &str,
        binds: &[Bind],
        describe_only: bool,
    ) -> Result<QueryResult, SnowflakeError> {
        let mut body = json!({
            "sqlText": sql,
            "asyncExec": false,
            "sequenceId": self.sequence.fetch_add(1, Ordering::Relaxed),
            "querySubmissionTime": now_millis(),
        });
        if describe_only {
            body["describeOnly"] = json!(true);
        }
        if !binds.is_empty() {
            body["bindings"] = binds
                .iter()
                .enumerate()
                .map(|(i, b)| ((i + 1).to_string(), b.wire()))
                .collect::<serde_json::Map<_, _>>()
                .into();
        }
        let path = format!("/queries/v1/query-request?requestId={}", uuid4());
        let mut answer = self
            .call(Method::POST, &path, Some(token), Some(body.to_string()))
            .await?;
        while let Some(code) = answer.code.as_deref().filter(|c| IN_PROGRESS.contains(c)) {
            let url = answer
                .data
                .as_ref()
                .and_then(|d| d.get("getResultUrl"))
                .and_then(Json::as_str)
                .ok_or_else(|| self.protocol(format!("code {code} without getResultUrl")))?
                .to_string();
            tokio::time::sleep(POLL_INTERVAL).await;
            answer = self.call(Method::GET, &url, Some(token), None).await?;
        }
        if !answer.success {
            return Err(self.failure(answer));
        }
        let data: QueryData = serde_json::from_value(answer.data.unwrap_or(Json::Null))
            .map_err(|e| self.protocol(format!("query answer: {e}")))?;
        self.read_result(data).await
    }

    /// The current session token, logging in if there is none.
    async fn token(&self) -> Result<(String, u64), SnowflakeError> {
        if let Some(s) = self.session.read().await.as_ref() {
            return Ok((s.token.clone(), s.generation));
        }
        self.relogin(None).await
    }

    /// Logs in, unless another task already replaced session `stale`.
    async fn relogin(&self, stale: Option<u64>) -> Result<(String, u64), SnowflakeError> {
        let mut generation = self.login_lock.lock().await;
        // Another task logged in meanwhile (or the stale session was already replaced).
        if let Some(s) = self.session.read().await.as_ref()
            && stale.is_none_or(|g| g != s.generation)
        {
            return Ok((s.token.clone(), s.generation));
        }
        let token = tokio::time::timeout(LOGIN_TIMEOUT, self.login())
            .await
            .map_err(|_| SnowflakeError::Timeout {
                connection: self.name.clone(),
                target: self.base.clone(),
                ms: LOGIN_TIMEOUT.as_millis(),
            })??;
        *generation += 1;
        *self.session.write().await = Some(Session {
            token: token.clone(),
            generation: *generation,
        });
        Ok((token, *generation))
    }

    async fn login(&self) -> Result<String, SnowflakeError> {
        let s = &self.settings;
        let mut query = vec![("requestId", uuid4()), ("databaseName", s.database.clone())];
        for (name, value) in [
            ("schemaName", &s.schema),
            ("warehouse", &s.warehouse),
            ("roleName", &s.role),
        ] {
            if let Some(v) = value {
                query.push((name, v.clone()));
            }
        }
        let query: Vec<String> = query
            .iter()
            .map(|(k, v)| format!("{k}={}", percent_encode(v)))
            .collect();
        let mut data = json!({
            "ACCOUNT_NAME": s.account.split('.').next().unwrap_or(&s.account).to_uppercase(),
            "LOGIN_NAME": s.user,
            "CLIENT_APP_ID": "mesh-runtime",
            "CLIENT_APP_VERSION": env!("CARGO_PKG_VERSION"),
            "SESSION_PARAMETERS": {},
        });
        match &s.credential {
            Credential::Password(p) => data["PASSWORD"] = json!(p),
            Credential::KeyPair(key) => {
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                let jwt =
                    key.jwt(&s.account, &s.user, now)
                        .map_err(|reason| SnowflakeError::Config {
                            connection: self.name.clone(),
                            reason,
                        })?;
                data["AUTHENTICATOR"] = json!("SNOWFLAKE_JWT");
                data["TOKEN"] = json!(jwt);
            }
        }
        let path = format!("/session/v1/login-request?{}", query.join("&"));
        let answer = self
            .call(
                Method::POST,
                &path,
                None,
                Some(json!({ "data": data }).to_string()),
            )
            .await?;
        if !answer.success {
            return Err(SnowflakeError::Login {
                connection: self.name.clone(),
                target: self.base.clone(),
                code: answer.code.unwrap_or_default(),
                message: answer.message.unwrap_or_default(),
            });
        }
        answer
            .data
            .as_ref()
            .and_then(|d| d.get("token"))
            .and_then(Json::as_str)
            .map(str::to_string)
            .ok_or_else(|| self.protocol("login answer without data.token".into()))
    }

    /// Ends the session on the server (best effort) and forgets it.
    pub async fn close(&self) {
        let session = self.session.write().await.take();
        if let Some(s) = session {
            let _ = self
                .call(Method::POST, "/session?delete=true", Some(&s.token), None)
                .await;
        }
    }

    /// One request to the server; `path` starts with `/` (or is a full URL
    /// on the same server, as `getResultUrl` may be).
    async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<String>,
    ) -> Result<Answer, SnowflakeError> {
        let url = if path.starts_with('/') {
            format!("{}{path}", self.base)
        } else {
            path.to_string()
        };
        let mut req = Request::builder()
            .method(method)
            .uri(&url)
            .header(header::ACCEPT, "application/snowflake")
            .header(
                header::USER_AGENT,
                concat!("mesh-runtime/", env!("CARGO_PKG_VERSION")),
            );
        if let Some(token) = token {
            let mut v = HeaderValue::from_str(&format!("Snowflake Token=\"{token}\""))
                .map_err(|_| self.protocol("session token is not a valid header".into()))?;
            v.set_sensitive(true);
            req = req.header(header::AUTHORIZATION, v);
        }
        let req = match body {
            Some(b) => req
                .header(header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(b))),
            None => req.body(Full::new(Bytes::new())),
        }
        .map_err(|e| self.protocol(format!("cannot build request: {e}")))?;
        let (status, bytes) = self.send(req).await?;
        let answer: Answer = serde_json::from_slice(&bytes).map_err(|_| {
            self.protocol(format!(
                "HTTP {status} with a body that is not a Snowflake answer ({} bytes)",
                bytes.len()
            ))
        })?;
        if status == StatusCode::UNAUTHORIZED && token.is_some() {
            return Err(SnowflakeError::SessionGone {
                connection: self.name.clone(),
                code: answer.code.unwrap_or_else(|| "401".into()),
            });
        }
        if !status.is_success() && answer.success {
            return Err(self.protocol(format!("HTTP {status}")));
        }
        Ok(answer)
    }

    async fn send(&self, req: Request<Full<Bytes>>) -> Result<(StatusCode, Bytes), SnowflakeError> {
        let http_err = |reason: String| SnowflakeError::Http {
            connection: self.name.clone(),
            target: self.base.clone(),
            reason,
        };
        let resp = self
            .http
            .request(req)
            .await
            .map_err(|e| http_err(error_chain(&e)))?;
        let status = resp.status();
        let gzip = resp
            .headers()
            .get(header::CONTENT_ENCODING)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"gzip"));
        let body = Limited::new(resp.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await
            .map_err(|e| http_err(format!("reading the answer: {e}")))?
            .to_bytes();
        let body = if gzip || body.starts_with(&[0x1f, 0x8b]) {
            gunzip(&body).map_err(|e| http_err(format!("bad gzip answer: {e}")))?
        } else {
            body
        };
        Ok((status, body))
    }

    fn protocol(&self, reason: String) -> SnowflakeError {
        SnowflakeError::Protocol {
            connection: self.name.clone(),
            target: self.base.clone(),
            reason,
        }
    }

    fn failure(&self, answer: Answer) -> SnowflakeError {
        let code = answer.code.unwrap_or_default();
        if SESSION_GONE.contains(&code.as_str()) {
            return SnowflakeError::SessionGone {
                connection: self.name.clone(),
                code,
            };
        }
        SnowflakeError::Query {
            code,
            message: answer
                .message
                .unwrap_or_else(|| "no message".into())
                .trim()
                .to_string(),
        }
    }

    /// Columns and all rows: inline (JSON or Arrow), then the chunks.
    async fn read_result(&self, data: QueryData) -> Result<QueryResult, SnowflakeError> {
        let columns: Vec<Column> = data
            .rowtype
            .unwrap_or_default()
            .into_iter()
            .map(|r| {
                let scale = r.scale.unwrap_or(0);
                let ty = column_type(&r.r#type, scale);
                Column {
                    name: r.name,
                    snowflake_type: r.r#type,
                    scale,
                    ty,
                }
            })
            .collect();
        let arrow = data.query_result_format.as_deref() == Some("arrow");
        let mut rows = Vec::new();
        if let Some(b64) = data.rowset_base64.as_deref().filter(|s| !s.is_empty()) {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|_| self.protocol("rowsetBase64 is not base64".into()))?;
            rows.extend(self.arrow_rows(&bytes, &columns)?);
        } else if let Some(rowset) = data.rowset {
            rows.extend(self.json_rows(rowset, &columns)?);
        }
        let chunks = data.chunks.unwrap_or_default();
        if !chunks.is_empty() {
            let headers: Vec<(String, String)> = match (data.chunk_headers, data.qrmk) {
                (Some(h), _) => h.into_iter().collect(),
                (None, Some(qrmk)) => vec![
                    (
                        "x-amz-server-side-encryption-customer-algorithm".into(),
                        "AES256".into(),
                    ),
                    ("x-amz-server-side-encryption-customer-key".into(), qrmk),
                ],
                (None, None) => Vec::new(),
            };
            for chunk in chunks {
                let body = self.chunk(&chunk.url, &headers).await?;
                if arrow {
                    rows.extend(self.arrow_rows(&body, &columns)?);
                } else {
                    // A JSON chunk is the rows without the enclosing brackets.
                    let mut text = Vec::with_capacity(body.len() + 2);
                    text.push(b'[');
                    text.extend_from_slice(&body);
                    text.push(b']');
                    let rowset: Vec<Vec<Option<String>>> = serde_json::from_slice(&text)
                        .map_err(|e| self.protocol(format!("result chunk: {e}")))?;
                    rows.extend(self.json_rows(rowset, &columns)?);
                }
            }
        }
        Ok(QueryResult { columns, rows })
    }

    async fn chunk(
        &self,
        url: &str,
        headers: &[(String, String)],
    ) -> Result<Bytes, SnowflakeError> {
        let mut req = Request::builder().method(Method::GET).uri(url);
        for (k, v) in headers {
            req = req.header(k.as_str(), v.as_str());
        }
        let req = req
            .body(Full::new(Bytes::new()))
            .map_err(|_| self.protocol("result chunk url or headers are invalid".into()))?;
        let (status, body) = self.send(req).await?;
        if !status.is_success() {
            return Err(self.protocol(format!("result chunk download answered HTTP {status}")));
        }
        Ok(body)
    }

    fn arrow_rows(
        &self,
        bytes: &[u8],
        columns: &[Column],
    ) -> Result<Vec<Vec<Value>>, SnowflakeError> {
        let decoded = arrow::read_stream(bytes).map_err(|e| self.protocol(e.to_string()))?;
        if decoded.names.len() != columns.len() {
            return Err(self.protocol(format!(
                "arrow result has {} columns, rowtype {}",
                decoded.names.len(),
                columns.len()
            )));
        }
        let mut rows = decoded.rows;
        for row in &mut rows {
            for (v, c) in row.iter_mut().zip(columns) {
                if let (Some(ColumnType::Float), Value::Int(i)) = (c.ty, &*v) {
                    *v = Value::Float(*i as f64);
                }
            }
        }
        Ok(rows)
    }

    fn json_rows(
        &self,
        rowset: Vec<Vec<Option<String>>>,
        columns: &[Column],
    ) -> Result<Vec<Vec<Value>>, SnowflakeError> {
        rowset
            .into_iter()
            .map(|row| {
                if row.len() != columns.len() {
                    return Err(self.protocol(format!(
                        "a row has {} values, rowtype {} columns",
                        row.len(),
                        columns.len()
                    )));
                }
                row.into_iter()
                    .zip(columns)
                    .map(|(cell, c)| {
                        json_value(cell, c.ty).map_err(|reason| {
                            self.protocol(format!("column `{}`: {reason}", c.name))
                        })
                    })
                    .collect()
            })
            .collect()
    }
}

/// The runtime's type of a `rowtype` entry.
fn column_type(snowflake_type: &str, scale: i64) -> Option<ColumnType> {
    match snowflake_type.to_ascii_lowercase().as_str() {
        "fixed" if scale == 0 => Some(ColumnType::Int),
        "fixed" | "real" => Some(ColumnType::Float),
        "boolean" => Some(ColumnType::Bool),
        "text" => Some(ColumnType::String),
        _ => None,
    }
}

/// A JSON rowset cell (a string or null) as a value of its column's type.
fn json_value(cell: Option<String>, ty: Option<ColumnType>) -> Result<Value, String> {
    let Some(s) = cell else {
        return Ok(Value::Null);
    };
    Ok(match ty {
        Some(ColumnType::Int) => Value::Int(
            s.parse()
                .map_err(|_| format!("`{s}` is not a 64-bit integer"))?,
        ),
        Some(ColumnType::Float) => {
            let v: f64 = s.parse().map_err(|_| format!("`{s}` is not a number"))?;
            if v.is_finite() {
                Value::Float(v)
            } else {
                Value::Null
            }
        }
        Some(ColumnType::Bool) => match s.to_ascii_lowercase().as_str() {
            "1" | "true" => Value::Bool(true),
            "0" | "false" => Value::Bool(false),
            _ => return Err(format!("`{s}` is not a boolean")),
        },
        Some(ColumnType::String) | None => Value::Str(s),
    })
}

/// The envelope of every answer.
#[derive(Deserialize)]
struct Answer {
    #[serde(default)]
    data: Option<Json>,
    #[serde(default, deserialize_with = "code_string")]
    code: Option<String>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    success: bool,
}

/// `code` is a string (`"390112"`) or, from some servers, a number.
fn code_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(match Option::<Json>::deserialize(d)? {
        Some(Json::String(s)) => Some(s),
        Some(Json::Number(n)) => Some(format!("{:06}", n.as_u64().unwrap_or(0))),
        _ => None,
    })
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct QueryData {
    rowtype: Option<Vec<RowType>>,
    rowset: Option<Vec<Vec<Option<String>>>>,
    rowset_base64: Option<String>,
    query_result_format: Option<String>,
    chunks: Option<Vec<Chunk>>,
    chunk_headers: Option<HashMap<String, String>>,
    qrmk: Option<String>,
}

#[derive(Deserialize)]
struct RowType {
    name: String,
    r#type: String,
    scale: Option<i64>,
}

#[derive(Deserialize)]
struct Chunk {
    url: String,
}

fn http_client(pool_size: usize) -> HyperClient<Https, Full<Bytes>> {
    let roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    // The ring provider named explicitly: the workspace also links aws-lc-rs,
    // so rustls could not pick a process default on its own.
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("ring supports the default protocol versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(Duration::from_secs(10)));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    HyperClient::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(pool_size.max(1))
        .build(https)
}

/// An error and its causes, one line (hyper's own message is terse).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

fn gunzip(data: &[u8]) -> std::io::Result<Bytes> {
    use std::io::Read as _;
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(data)
        .take(MAX_ANSWER_BYTES as u64)
        .read_to_end(&mut out)?;
    Ok(out.into())
}

fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A random (version 4) UUID, as Snowflake wants for `requestId`.
fn uuid4() -> String {
    let mut b = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
        .expect("the system random source works");
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

// ---------------------------------------------------------------- datasets

/// The name a column is reported under: upper-case names (Snowflake's form
/// of unquoted identifiers) in lower case, others as they are.
pub fn reported_name(name: &str) -> String {
    if name.chars().any(char::is_lowercase) {
        name.to_string()
    } else {
        name.to_lowercase()
    }
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The select list and schema of a dataset's query.
#[derive(Debug)]
struct Shape {
    select: String,
    schema: Schema,
    /// The key column as Snowflake names it, quoted.
    key_ident: String,
}

async fn shape(client: &Client, dataset: &str, query: &str, key: &str) -> Result<Shape, SqlError> {
    let columns = client
        .describe(
            query,
            client.statement_timeout().max(Duration::from_secs(30)),
        )
        .await
        .map_err(|e| query_error(dataset, e))?;
    let mut select = Vec::new();
    let mut names = Vec::new();
    let mut types = Vec::new();
    for c in &columns {
        let ident = quote_ident(&c.name);
        let col = format!("mesh_src.{ident}");
        let (expr, ty) = match c.ty {
            Some(ColumnType::Float) if c.snowflake_type.eq_ignore_ascii_case("fixed") => {
                (format!("{col}::FLOAT AS {ident}"), ColumnType::Float)
            }
            Some(ty) => (col, ty),
            None => (format!("{col}::VARCHAR AS {ident}"), ColumnType::String),
        };
        select.push(expr);
        names.push(reported_name(&c.name));
        types.push(ty);
    }
    let key_pos = names
        .iter()
        .position(|n| n == key)
        .or_else(|| columns.iter().position(|c| c.name == key))
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
        select: format!(
            "SELECT {} FROM ({}) AS mesh_src",
            select.join(", "),
            query.trim().trim_end_matches(';')
        ),
        key_ident: quote_ident(&columns[key_pos].name),
        schema: Schema {
            names,
            types,
            key: key_pos,
        },
    })
}

fn query_error(dataset: &str, e: SnowflakeError) -> SqlError {
    match e {
        SnowflakeError::Http {
            connection,
            target,
            reason,
        } => SqlError::Connect {
            connection,
            target,
            reason,
        },
        SnowflakeError::Login {
            connection,
            target,
            code,
            message,
        } => SqlError::Connect {
            connection,
            target,
            reason: format!("login refused: {message} (code {code})"),
        },
        other => SqlError::Query {
            dataset: dataset.to_string(),
            reason: other.to_string(),
        },
    }
}

/// Runs a `preload` dataset's query and builds the in-memory dataset.
pub async fn preload(
    client: &Client,
    dataset: &str,
    query: &str,
    key: &str,
    duplicates: Duplicates,
) -> Result<Dataset, SqlError> {
    let shape = shape(client, dataset, query, key).await?;
    let result = client
        .query(&shape.select, &[], PRELOAD_TIMEOUT)
        .await
        .map_err(|e| query_error(dataset, e))?;
    Ok(Dataset::from_rows(
        dataset,
        shape.schema,
        result.rows,
        duplicates,
    )?)
}

/// The by-key query of a `live` dataset on Snowflake (see
/// [`crate::backend::LiveTable`], which coalesces, caches and counts): one
/// statement per key, the key bound (never spliced into the text).
pub struct LiveQuery {
    name: String,
    client: Arc<Client>,
    sql: String,
    int_key: bool,
}

impl LiveQuery {
    /// Logs in (if needed) and works out the by-key query.
    pub async fn open(
        client: Arc<Client>,
        dataset: &str,
        query: &str,
        key: &str,
    ) -> Result<(LiveQuery, Schema), SqlError> {
        let shape = shape(&client, dataset, query, key).await?;
        let query = LiveQuery {
            name: dataset.to_string(),
            sql: format!(
                "{} WHERE mesh_src.{} = ? LIMIT 2",
                shape.select, shape.key_ident
            ),
            int_key: shape.schema.types[shape.schema.key] == ColumnType::Int,
            client,
        };
        Ok((query, shape.schema))
    }

    /// The key as it is bound; `None` when no row can have it (text for an
    /// integer key).
    pub fn key(&self, key: KeyRef<'_>) -> Option<LiveKey> {
        LiveKey::of(key, self.int_key)
    }

    /// The rows with `key` (at most two). A timeout (the connection's
    /// `statement_timeout_ms`, round trips, polls and a new login included)
    /// is [`LiveError::Timeout`]; a server that cannot be reached or that
    /// refuses the login is [`LiveError::Unavailable`]; others are
    /// [`LiveError::Query`].
    pub async fn rows(&self, key: &LiveKey) -> Result<Vec<Vec<Value>>, LiveError> {
        let bind = match key {
            LiveKey::Int(i) => Bind::Int(*i),
            LiveKey::Text(s) => Bind::Text(s.to_string()),
        };
        let timeout = self.client.statement_timeout();
        match self.client.query(&self.sql, &[bind], timeout).await {
            Ok(result) => Ok(result.rows),
            Err(SnowflakeError::Timeout { .. }) => Err(LiveError::Timeout {
                dataset: self.name.clone(),
                ms: timeout.as_millis() as u64,
            }),
            Err(
                e @ (SnowflakeError::Http { .. }
                | SnowflakeError::Login { .. }
                | SnowflakeError::SessionGone { .. }),
            ) => Err(LiveError::Unavailable {
                dataset: self.name.clone(),
                reason: e.to_string(),
            }),
            Err(e) => Err(LiveError::Query {
                dataset: self.name.clone(),
                reason: e.to_string(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_cells_take_their_column_type() {
        use ColumnType::*;
        assert_eq!(json_value(None, Some(Int)), Ok(Value::Null));
        assert_eq!(json_value(Some("42".into()), Some(Int)), Ok(Value::Int(42)));
        assert!(json_value(Some("4.5".into()), Some(Int)).is_err());
        assert_eq!(
            json_value(Some("12.34".into()), Some(Float)),
            Ok(Value::Float(12.34))
        );
        assert_eq!(json_value(Some("NaN".into()), Some(Float)), Ok(Value::Null));
        assert_eq!(
            json_value(Some("1".into()), Some(Bool)),
            Ok(Value::Bool(true))
        );
        assert_eq!(
            json_value(Some("FALSE".into()), Some(Bool)),
            Ok(Value::Bool(false))
        );
        assert_eq!(
            json_value(Some("19724".into()), None),
            Ok(Value::Str("19724".into()))
        );
    }

    #[test]
    fn rowtypes_map_to_runtime_types() {
        assert_eq!(column_type("fixed", 0), Some(ColumnType::Int));
        assert_eq!(column_type("fixed", 2), Some(ColumnType::Float));
        assert_eq!(column_type("real", 0), Some(ColumnType::Float));
        assert_eq!(column_type("boolean", 0), Some(ColumnType::Bool));
        assert_eq!(column_type("text", 0), Some(ColumnType::String));
        assert_eq!(column_type("timestamp_ntz", 9), None);
        assert_eq!(column_type("date", 0), None);
    }

    #[test]
    fn answers_with_numeric_codes_and_errors_parse() {
        let a: Answer = serde_json::from_str(
            r#"{"data":null,"code":"390112","message":"Your session has expired. Please login again.","success":false,"headers":null}"#,
        )
        .unwrap();
        assert_eq!(a.code.as_deref(), Some("390112"));
        let a: Answer =
            serde_json::from_str(r#"{"code":2003,"message":"x","success":false}"#).unwrap();
        assert_eq!(a.code.as_deref(), Some("002003"));
    }

    #[test]
    fn names_ids_and_encoding() {
        assert_eq!(reported_name("CUSTOMER_ID"), "customer_id");
        assert_eq!(reported_name("MixedCase"), "MixedCase");
        assert_eq!(reported_name("X1"), "x1");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(percent_encode("my db/é"), "my%20db%2F%C3%A9");
        let u = uuid4();
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
        assert_ne!(uuid4(), u);
    }

    fn settings(url: Option<&str>, account: &str) -> Settings {
        Settings {
            account: account.into(),
            user: "mesh".into(),
            credential: Credential::Password("hunter2-secret".into()),
            warehouse: None,
            database: "MESH".into(),
            schema: None,
            role: None,
            url: url.map(str::to_string),
            statement_timeout: Duration::from_secs(5),
            pool_size: 2,
        }
    }

    #[test]
    fn base_urls() {
        let c = Client::new("wh", settings(None, "xy12345.eu-west-1")).unwrap();
        assert_eq!(
            c.target(),
            "https://xy12345.eu-west-1.snowflakecomputing.com"
        );
        let c = Client::new("wh", settings(None, "my_org-acct")).unwrap();
        assert_eq!(c.target(), "https://my-org-acct.snowflakecomputing.com");
        let c = Client::new("wh", settings(Some("http://127.0.0.1:15055/"), "x")).unwrap();
        assert_eq!(c.target(), "http://127.0.0.1:15055");
        for bad in ["ftp://x", "http://x/path", "not a url"] {
            let e = Client::new("wh", settings(Some(bad), "x")).unwrap_err();
            assert!(e.to_string().starts_with("connection `wh`: "), "{e}");
        }
        let e = Client::new("wh", settings(None, "a/b")).unwrap_err();
        assert!(e.to_string().contains("account `a/b`"), "{e}");
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    /// Against fakesnow (`MESH_TEST_SNOWFLAKE_URL`, see tests/snowflake_client.rs):
    /// the server forgets the session, as when it expires; the next statement
    /// logs in again and runs.
    #[tokio::test]
    async fn a_forgotten_session_is_renewed_by_logging_in_again() {
        let url = std::env::var("MESH_TEST_SNOWFLAKE_URL").unwrap_or_else(|_| {
            panic!(
                "MESH_TEST_SNOWFLAKE_URL is not set: run the tests with `scripts/test` (it starts fakesnow), \
                 or run `scripts/services start` and `eval \"$(scripts/services env)\"`"
            )
        });
        let c = Client::new("wh", settings(Some(&url), "x")).unwrap();
        let one = c
            .query("SELECT 1 AS one", &[], Duration::from_secs(30))
            .await
            .expect("query");
        assert_eq!(one.rows, [vec![Value::Int(1)]]);
        let (token, generation) = c.token().await.unwrap();
        let ended = c
            .call(Method::POST, "/session?delete=true", Some(&token), None)
            .await
            .expect("session ended");
        assert!(ended.success);
        // The old token is now refused...
        let e = c
            .call(
                Method::POST,
                "/queries/v1/query-request",
                Some(&token),
                Some("{}".into()),
            )
            .await;
        assert!(
            matches!(e, Err(SnowflakeError::SessionGone { .. })),
            "{:?}",
            e.err()
        );
        // ...and the client logs in again by itself.
        let two = c
            .query("SELECT 2 AS two", &[], Duration::from_secs(30))
            .await
            .expect("query");
        assert_eq!(two.rows, [vec![Value::Int(2)]]);
        let (renewed, next) = c.token().await.unwrap();
        assert_ne!(renewed, token);
        assert_eq!(next, generation + 1);
    }

    #[tokio::test]
    async fn unreachable_server_error_names_no_secret() {
        // A port nobody listens on: bind one, then drop it.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let c = Client::new(
            "wh",
            settings(Some(&format!("http://127.0.0.1:{port}")), "x"),
        )
        .unwrap();
        let e = c
            .query("select 1", &[], Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(e, SnowflakeError::Http { .. }), "{e:?}");
        let text = format!("{e} {e:?}");
        assert!(text.contains(&format!("127.0.0.1:{port}")), "{text}");
        assert!(!text.contains("hunter2"), "{text}");
    }
}
