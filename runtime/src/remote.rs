//! Enrichment from another mesh service's lookup endpoint, over HTTP/1.1
//! (HTTPS for an `https://` upstream, trusting its lookup's `ca_file`).
//!
//! One pooled keep-alive client serves all remote enrichments. The remote
//! enrichments of a prediction endpoint that read one upstream service (same
//! service address, API key and key field) form an [`Upstream`]: one
//! `lookup-endpoints` call answers all of them, for one key or a batch.
//!
//! Single-key requests (one prediction) are coalesced, then batched:
//! concurrent requests for the same key share one in-flight fetch, and the
//! keys of concurrent predictions travel together. An idle upstream is
//! called at once, so batching adds no wait at low load. A key asked while a
//! call is out waits for it to return, or for [`PATIENCE`] if it is slow
//! (then a further call goes, up to [`MAX_IN_FLIGHT`]), and the next call
//! takes every key waiting (up to [`MAX_BATCH`]). Under load one call
//! answers many predictions, so both sides parse, route and answer one HTTP
//! request instead of many; a slow upstream holds a key back by at most
//! [`PATIENCE`].
//!
//! A failing upstream becomes a 502 (bad answer, unreachable) or 504
//! (timeout) for our caller, never a panic.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::http::{Method, Request, StatusCode, Uri, header};
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use serde_json::{Map, Value};
use tokio::sync::{mpsc, oneshot};

use crate::auth::PresentedKey;
use crate::backend::LiveKey;
use crate::cache::KeyCache;
use crate::dataset::KeyRef;
use crate::error::AppError;

/// Largest upstream answer read (64 MiB).
const MAX_ANSWER_BYTES: usize = 64 << 20;

/// How long keys wait behind a call that is out before a further call goes.
pub const PATIENCE: Duration = Duration::from_millis(1);

/// Most calls to one upstream out at a time for single-key requests.
pub const MAX_IN_FLIGHT: usize = 8;

/// Most keys in one batched call.
pub const MAX_BATCH: usize = 256;

/// The shared HTTP client: plain HTTP, or HTTPS to an `https://` upstream.
#[derive(Clone, Debug)]
pub struct HttpClient {
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl Default for HttpClient {
    fn default() -> Self {
        HttpClient::new()
    }
}

impl HttpClient {
    /// HTTPS trusts the Mozilla roots.
    pub fn new() -> HttpClient {
        HttpClient::trusting::<&std::path::Path>(&[]).expect("the Mozilla roots load")
    }

    /// HTTPS trusts exactly the certificates of `ca_files` (the remote
    /// lookups' `ca_file`s of a service), or the Mozilla roots when none.
    pub fn trusting<P: AsRef<std::path::Path>>(ca_files: &[P]) -> Result<HttpClient, String> {
        let tls = crate::tls::client_config(ca_files)?;
        let mut connector = HttpConnector::new();
        connector.enforce_http(false);
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(2)));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(connector);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(64)
            .build(https);
        Ok(HttpClient { client })
    }
}

/// A row of an upstream lookup endpoint, shared by the coalesced requests
/// and the enrichment caches.
pub type RemoteRow = Option<Arc<Map<String, Value>>>;

/// One upstream service: several of its lookup endpoints, read with one
/// `lookup-endpoints` call per prediction (per batch), by one key field.
pub struct Upstream {
    call: Arc<Call>,
    /// Concurrent single-key fetches of the same endpoints, coalesced.
    flights: KeyCache<(LiveKey, u64), Arc<Vec<RemoteRow>>, AppError>,
    /// Keys waiting for a batched call (the batcher starts on first use).
    queue: OnceLock<mpsc::UnboundedSender<Waiting>>,
}

/// A key waiting for a batched call, and where its rows go.
struct Waiting {
    mask: u64,
    key: LiveKey,
    reply: oneshot::Sender<Result<Vec<RemoteRow>, AppError>>,
}

/// How to call the upstream: shared by [`Upstream`] and its batcher.
struct Call {
    /// The `lookup-endpoints` address.
    uri: Uri,
    /// Plain `http://`: our own keep-alive connections, and the request
    /// head's fixed lines (see [`crate::h1`]); HTTPS goes through hyper.
    plain: Option<(crate::h1::Pool, Vec<u8>)>,
    /// For messages: the service address (`.../public/api/v1/{service}`).
    display: String,
    auth: Option<PresentedKey>,
    timeout: Duration,
    key: String,
    endpoints: Vec<String>,
    requests_ok: AtomicU64,
    requests_error: AtomicU64,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("display", &self.call.display)
            .field("endpoints", &self.call.endpoints)
            .finish_non_exhaustive()
    }
}

/// Splits `http://host/public/api/v1/{service}/{endpoint}/lookup` into the
/// service address and the endpoint name.
pub fn split_lookup_url(url: &str) -> Result<(&str, &str), String> {
    url.strip_suffix("/lookup")
        .and_then(|rest| rest.rsplit_once('/'))
        .filter(|(base, endpoint)| !endpoint.is_empty() && base.contains("://"))
        .ok_or_else(|| {
            format!("lookup url `{url}` must be http://host[:port]/.../{{endpoint}}/lookup")
        })
}

#[derive(Serialize)]
struct EndpointsRequest<'a> {
    endpoints: Vec<&'a str>,
    items: Vec<Item<'a>>,
}

#[derive(Serialize)]
struct Item<'a> {
    data: Single<'a>,
}

/// `{"<key>": value}`.
struct Single<'a> {
    key: &'a str,
    value: KeyRef<'a>,
}

impl Serialize for Single<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(Some(1))?;
        match self.value {
            KeyRef::Str(v) => map.serialize_entry(self.key, v)?,
            KeyRef::Int(v) => map.serialize_entry(self.key, &v)?,
        }
        map.end()
    }
}

/// `key` owned, as sent (an integer and the text spelling it differ).
pub fn owned_key(key: KeyRef<'_>) -> LiveKey {
    match key {
        KeyRef::Int(i) => LiveKey::Int(i),
        KeyRef::Str(s) => LiveKey::Text(s.into()),
    }
}

/// Requests an upstream answered, by result (for `/metrics`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpstreamStats {
    pub ok: u64,
    pub error: u64,
}

impl Upstream {
    /// `base` is the service address (`http://host:port/public/api/v1/{service}`);
    /// `api_key` is sent as a bearer token; `key` is the key field.
    pub fn new(
        base: &str,
        endpoints: Vec<String>,
        api_key: Option<PresentedKey>,
        timeout: Duration,
        key: &str,
    ) -> Result<Upstream, String> {
        let uri: Uri = format!("{base}/lookup-endpoints")
            .parse()
            .map_err(|e| format!("invalid lookup url `{base}`: {e}"))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
            return Err(format!(
                "lookup url `{base}` must be http[s]://host[:port]/..."
            ));
        }
        if endpoints.is_empty() || endpoints.len() > 64 {
            return Err(format!(
                "{} lookup endpoints of {base} for one prediction endpoint (1 to 64)",
                endpoints.len()
            ));
        }
        let auth = api_key;
        let plain = match (uri.scheme_str(), uri.authority()) {
            (Some("http"), Some(authority)) => {
                let port = authority.port_u16().unwrap_or(80);
                let head = format!(
                    "POST {} HTTP/1.1\r\nHost: {authority}\r\nContent-Type: application/json\r\nAccept: application/json\r\n",
                    uri.path()
                );
                Some((
                    crate::h1::Pool::new(&format!("{}:{port}", authority.host())),
                    head.into_bytes(),
                ))
            }
            _ => None,
        };
        Ok(Upstream {
            call: Arc::new(Call {
                uri,
                plain,
                display: base.to_string(),
                auth,
                timeout,
                key: key.to_string(),
                endpoints,
                requests_ok: AtomicU64::new(0),
                requests_error: AtomicU64::new(0),
            }),
            flights: KeyCache::new(None),
            queue: OnceLock::new(),
        })
    }

    pub fn url(&self) -> &str {
        &self.call.display
    }

    /// The name of lookup endpoint `i`.
    pub fn endpoint_name(&self, i: usize) -> &str {
        &self.call.endpoints[i]
    }

    pub fn stats(&self) -> UpstreamStats {
        UpstreamStats {
            ok: self.call.requests_ok.load(Ordering::Relaxed),
            error: self.call.requests_error.load(Ordering::Relaxed),
        }
    }

    /// Rows of the endpoints in `mask` (bit `i`: `endpoints[i]`) for one
    /// key, in endpoint order; concurrent callers asking the same share one
    /// fetch, and concurrent fetches share batched calls (see the module).
    pub async fn fetch_one(
        &self,
        client: &HttpClient,
        mask: u64,
        key: KeyRef<'_>,
    ) -> Result<Arc<Vec<RemoteRow>>, AppError> {
        let key = owned_key(key);
        self.flights
            .get((key.clone(), mask), || async move {
                let (reply, answer) = oneshot::channel();
                let waiting = Waiting { mask, key, reply };
                self.queue
                    .get_or_init(|| batcher(self.call.clone(), client.clone()))
                    .send(waiting)
                    .map_err(|_| AppError::internal("the lookup batcher stopped"))?;
                // Waiting for a call and the call itself, within the timeout.
                let rows = tokio::time::timeout(self.call.timeout, answer)
                    .await
                    .map_err(|_| self.call.timed_out())?
                    .map_err(|_| AppError::internal("the lookup batcher dropped a key"))??;
                Ok(Arc::new(rows))
            })
            .await
    }

    /// Rows of the endpoints in `mask` for `keys` in one call: per key, per
    /// endpoint in the mask (in endpoint order), `None` where the upstream
    /// has no row.
    pub async fn fetch_many(
        &self,
        client: &HttpClient,
        mask: u64,
        keys: &[KeyRef<'_>],
    ) -> Result<Vec<Vec<RemoteRow>>, AppError> {
        self.call.fetch(client, mask, keys).await
    }
}

/// Starts the task that sends waiting keys in batches (see the module). The
/// task drives its calls itself (at most [`MAX_IN_FLIGHT`]), so a call that
/// returns and the keys that queued meanwhile are seen in one wake-up. It
/// stops when its [`Upstream`] is dropped and its calls are answered.
fn batcher(call: Arc<Call>, client: HttpClient) -> mpsc::UnboundedSender<Waiting> {
    let (tx, mut rx) = mpsc::unbounded_channel::<Waiting>();
    tokio::spawn(async move {
        let mut calls = FuturesUnordered::new();
        let mut waiting: Vec<Waiting> = Vec::new();
        let mut open = true;
        // When the oldest waiting key has been patient enough.
        let patience = tokio::time::sleep(PATIENCE);
        tokio::pin!(patience);
        loop {
            while waiting.len() < MAX_BATCH
                && let Ok(w) = rx.try_recv()
            {
                if waiting.is_empty() {
                    patience
                        .as_mut()
                        .reset(tokio::time::Instant::now() + PATIENCE);
                }
                waiting.push(w);
            }
            let send = !waiting.is_empty()
                && (calls.is_empty() || (calls.len() < MAX_IN_FLIGHT && patience.is_elapsed()));
            if send {
                let batch = std::mem::take(&mut waiting);
                calls.push(answer(call.clone(), client.clone(), batch));
                continue;
            }
            if !open && waiting.is_empty() && calls.is_empty() {
                break;
            }
            tokio::select! {
                w = rx.recv(), if open && waiting.len() < MAX_BATCH => match w {
                    Some(w) => {
                        if waiting.is_empty() {
                            patience.as_mut().reset(tokio::time::Instant::now() + PATIENCE);
                        }
                        waiting.push(w);
                    }
                    None => open = false,
                },
                Some(()) = calls.next(), if !calls.is_empty() => {}
                () = &mut patience, if !waiting.is_empty() && calls.len() < MAX_IN_FLIGHT => {}
            }
        }
    });
    tx
}

/// [`Call::answer`] as an owned future, for the batcher's set of calls.
async fn answer(call: Arc<Call>, client: HttpClient, batch: Vec<Waiting>) {
    call.answer(&client, batch).await;
}

impl Call {
    /// One call per endpoint mask for the keys of `batch`; each waiting key
    /// gets its rows or the call's error.
    async fn answer(&self, client: &HttpClient, mut batch: Vec<Waiting>) {
        batch.sort_by_key(|w| w.mask);
        while !batch.is_empty() {
            let mask = batch[0].mask;
            let n = batch.iter().take_while(|w| w.mask == mask).count();
            let group: Vec<Waiting> = batch.drain(..n).collect();
            let keys: Vec<KeyRef<'_>> = group.iter().map(|w| w.key.key_ref()).collect();
            match self.fetch(client, mask, &keys).await {
                Ok(rows) => {
                    for (w, rows) in group.into_iter().zip(rows) {
                        let _ = w.reply.send(Ok(rows));
                    }
                }
                Err(e) => {
                    for w in group {
                        let _ = w.reply.send(Err(e.clone()));
                    }
                }
            }
        }
    }

    async fn fetch(
        &self,
        client: &HttpClient,
        mask: u64,
        keys: &[KeyRef<'_>],
    ) -> Result<Vec<Vec<RemoteRow>>, AppError> {
        let result = self.request(client, mask, keys).await;
        let counter = match &result {
            Ok(_) => &self.requests_ok,
            Err(_) => &self.requests_error,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        result
    }

    async fn request(
        &self,
        client: &HttpClient,
        mask: u64,
        keys: &[KeyRef<'_>],
    ) -> Result<Vec<Vec<RemoteRow>>, AppError> {
        let endpoints: Vec<&str> = self
            .endpoints
            .iter()
            .enumerate()
            .filter(|(i, _)| mask & (1 << i) != 0)
            .map(|(_, e)| e.as_str())
            .collect();
        let body = EndpointsRequest {
            endpoints: endpoints.clone(),
            items: keys
                .iter()
                .map(|&value| Item {
                    data: Single {
                        key: &self.key,
                        value,
                    },
                })
                .collect(),
        };
        let body = serde_json::to_vec(&body).map_err(AppError::internal)?;
        let (status, bytes) =
            match tokio::time::timeout(self.timeout, self.send(client, body)).await {
                Ok(result) => result?,
                Err(_) => return Err(self.timed_out()),
            };
        if status != StatusCode::OK {
            let code = serde_json::from_slice::<Value>(&bytes)
                .ok()
                .and_then(|v| {
                    v.pointer("/error/code")
                        .and_then(Value::as_str)
                        .map(str::to_string)
                })
                .unwrap_or_else(|| "unknown".into());
            return Err(self.bad_gateway(format!("answered {} ({code})", status.as_u16())));
        }
        let mut answer: Value = serde_json::from_slice(&bytes)
            .map_err(|e| self.bad_gateway(format!("answered invalid JSON: {e}")))?;
        let Some(Value::Array(items)) = answer.get_mut("items").map(Value::take) else {
            return Err(self.bad_gateway("answer has no `items` list".into()));
        };
        if items.len() != keys.len() {
            return Err(self.bad_gateway(format!(
                "answered {} items for {} keys",
                items.len(),
                keys.len()
            )));
        }
        let mut out = Vec::with_capacity(items.len());
        for (mut item, key) in items.into_iter().zip(keys) {
            let Some(Value::Object(mut data)) = item.get_mut("data").map(Value::take) else {
                return Err(self.bad_gateway(format!("answered no `data` for key {key}")));
            };
            let mut rows = Vec::with_capacity(endpoints.len());
            for endpoint in &endpoints {
                // Taken, not cloned: the answer is ours.
                match data.get_mut(*endpoint).map(Value::take) {
                    Some(Value::Object(row)) => rows.push(Some(Arc::new(row))),
                    Some(Value::Null) => rows.push(None),
                    _ => {
                        return Err(self.bad_gateway(format!(
                            "answered no row or null for endpoint `{endpoint}`, key {key}"
                        )));
                    }
                }
            }
            out.push(rows);
        }
        Ok(out)
    }

    /// POSTs `body` to the upstream: the answer's status and body.
    async fn send(
        &self,
        client: &HttpClient,
        body: Vec<u8>,
    ) -> Result<(StatusCode, Bytes), AppError> {
        if let Some((pool, fixed)) = &self.plain {
            // The whole request in one buffer: one write.
            let mut request = Vec::with_capacity(fixed.len() + 160 + body.len());
            request.extend_from_slice(fixed);
            // Writing to a Vec cannot fail.
            use std::io::Write as _;
            let _ = write!(request, "Content-Length: {}\r\n", body.len());
            if let Some(auth) = &self.auth {
                request.extend_from_slice(b"Authorization: ");
                request.extend_from_slice(auth.header().as_bytes());
                request.extend_from_slice(b"\r\n");
            }
            request.extend_from_slice(b"\r\n");
            request.extend_from_slice(&body);
            let answer = pool
                .send(&request, MAX_ANSWER_BYTES)
                .await
                .map_err(|e| self.bad_gateway(format!("unreachable: {e}")))?;
            let status = StatusCode::from_u16(answer.status)
                .map_err(|_| self.bad_gateway(format!("answered status {}", answer.status)))?;
            return Ok((status, Bytes::from(answer.body)));
        }
        let mut request = Request::builder()
            .method(Method::POST)
            .uri(self.uri.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::ACCEPT, "application/json");
        if let Some(auth) = &self.auth {
            request = request.header(header::AUTHORIZATION, (*auth.header()).clone());
        }
        let request = request
            .body(Full::new(Bytes::from(body)))
            .map_err(AppError::internal)?;
        let response = self.client_call(client, request).await?;
        let status = response.status();
        let bytes = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await
            .map_err(|e| self.bad_gateway(format!("reading the answer failed: {e}")))?
            .to_bytes();
        Ok((status, bytes))
    }

    async fn client_call(
        &self,
        client: &HttpClient,
        request: Request<Full<Bytes>>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, AppError> {
        client.client.request(request).await.map_err(|e| {
            let detail = match std::error::Error::source(&e) {
                Some(source) => format!("{e}: {source}"),
                None => e.to_string(),
            };
            self.bad_gateway(format!("unreachable: {detail}"))
        })
    }

    fn timed_out(&self) -> AppError {
        AppError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "upstream_timeout",
            format!(
                "lookup service {} did not answer within {} ms",
                self.display,
                self.timeout.as_millis()
            ),
        )
    }

    fn bad_gateway(&self, what: String) -> AppError {
        AppError::new(
            StatusCode::BAD_GATEWAY,
            "upstream_error",
            format!("lookup service {} {what}", self.display),
        )
    }
}
