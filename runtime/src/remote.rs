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
//! keys of concurrent predictions travel together. There is no batcher task:
//! a request that finds fewer than [`MAX_IN_FLIGHT`] calls out for its
//! upstream sends its call itself (it leads), on its own task, so a key
//! waits for no other call's round trip and a prediction makes no hop
//! between tasks. A key asked while [`MAX_IN_FLIGHT`] calls are out waits in
//! the upstream's line; when a call returns, its leader hands the lead to
//! one waiting request, which sends every key waiting (up to [`MAX_BATCH`])
//! in the next call and answers the others. Under a load beyond
//! [`MAX_IN_FLIGHT`] concurrent predictions, one call answers many, so both
//! sides parse, route and answer one HTTP request instead of many. A leader
//! whose request goes away (its caller hung up) hands its keys and the lead
//! on.
//!
//! A failing upstream becomes a 502 (bad answer, unreachable) or 504
//! (timeout) for our caller, never a panic.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::http::{Method, Request, StatusCode, Uri, header};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use serde_json::{Map, Value};
use tokio::sync::oneshot;

use crate::auth::PresentedKey;
use crate::backend::LiveKey;
use crate::cache::KeyCache;
use crate::dataset::KeyRef;
use crate::error::AppError;

/// Largest upstream answer read (64 MiB).
const MAX_ANSWER_BYTES: usize = 64 << 20;

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
    call: Call,
    /// Concurrent single-key fetches of the same endpoints, coalesced.
    flights: KeyCache<(LiveKey, u64), Arc<Vec<RemoteRow>>, AppError>,
    /// Single-key requests waiting for a call, and the calls out.
    line: Line,
}

/// The single-key requests of an upstream (see the module).
#[derive(Default)]
struct Line {
    state: Mutex<LineState>,
}

#[derive(Default)]
struct LineState {
    /// Calls out, each with its leader. [`MAX_IN_FLIGHT`] while keys wait:
    /// a leader hands the lead on when keys wait.
    out: usize,
    waiting: Vec<Waiting>,
}

/// A key waiting for a call, and where its turn comes.
struct Waiting {
    mask: u64,
    key: LiveKey,
    reply: oneshot::Sender<Turn>,
}

/// What a waiting request gets: its rows, or the lead of the next call
/// (for the other keys given, and its own).
enum Turn {
    Rows(Result<Vec<RemoteRow>, AppError>),
    Lead(Vec<Waiting>),
}

/// How to call the upstream.
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
            call: Call {
                uri,
                plain,
                display: base.to_string(),
                auth,
                timeout,
                key: key.to_string(),
                endpoints,
                requests_ok: AtomicU64::new(0),
                requests_error: AtomicU64::new(0),
            },
            flights: KeyCache::new(None),
            line: Line::default(),
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
                self.fetch_key(client, mask, &key).await.map(Arc::new)
            })
            .await
    }

    /// One key's rows: sent at once while fewer than [`MAX_IN_FLIGHT`]
    /// calls are out, else with the keys waiting beside it (see the module).
    async fn fetch_key(
        &self,
        client: &HttpClient,
        mask: u64,
        key: &LiveKey,
    ) -> Result<Vec<RemoteRow>, AppError> {
        let Some(turn) = self.line.join(mask, key) else {
            return self.lead(client, mask, key, Vec::new()).await;
        };
        let mut ticket = Ticket {
            line: &self.line,
            turn,
        };
        let turn = tokio::time::timeout(self.call.timeout, &mut ticket.turn)
            .await
            .map_err(|_| self.call.timed_out())?;
        match turn.map_err(|_| AppError::internal("a lookup call dropped a waiting key"))? {
            Turn::Rows(rows) => rows,
            Turn::Lead(others) => self.lead(client, mask, key, others).await,
        }
    }

    /// Leads a call for `key` and the `others` waiting (one call per
    /// endpoint mask), answers the others, hands the lead on, and returns
    /// this key's rows.
    async fn lead(
        &self,
        client: &HttpClient,
        mask: u64,
        key: &LiveKey,
        others: Vec<Waiting>,
    ) -> Result<Vec<RemoteRow>, AppError> {
        let mut lead = Leading {
            line: &self.line,
            pending: others,
        };
        lead.pending.sort_by_key(|w| w.mask);
        let start = lead.pending.partition_point(|w| w.mask < mask);
        let end = lead.pending.partition_point(|w| w.mask <= mask);
        let keys: Vec<KeyRef<'_>> = std::iter::once(key.key_ref())
            .chain(lead.pending[start..end].iter().map(|w| w.key.key_ref()))
            .collect();
        let result = self.call.fetch(client, mask, &keys).await;
        drop(keys);
        let group: Vec<Waiting> = lead.pending.drain(start..end).collect();
        let mut rows = result.map(Vec::into_iter);
        let mine = match &mut rows {
            Ok(rows) => Ok(rows.next().unwrap_or_default()),
            Err(e) => Err(e.clone()),
        };
        answer(group, rows);
        self.call_for_rest(client, &mut lead).await;
        mine
    }

    /// One call per endpoint mask for the keys a lead still holds (sorted
    /// by mask), answering each.
    async fn call_for_rest(&self, client: &HttpClient, lead: &mut Leading<'_>) {
        while let Some(mask) = lead.pending.last().map(|w| w.mask) {
            let start = lead.pending.partition_point(|w| w.mask < mask);
            let keys: Vec<KeyRef<'_>> = lead.pending[start..]
                .iter()
                .map(|w| w.key.key_ref())
                .collect();
            let result = self.call.fetch(client, mask, &keys).await;
            drop(keys);
            let group = lead.pending.split_off(start);
            answer(group, result.map(Vec::into_iter));
        }
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

/// Gives each waiting key its rows, or the call's error.
fn answer(group: Vec<Waiting>, rows: Result<impl Iterator<Item = Vec<RemoteRow>>, AppError>) {
    match rows {
        Ok(rows) => {
            for (w, rows) in group.into_iter().zip(rows) {
                let _ = w.reply.send(Turn::Rows(Ok(rows)));
            }
        }
        Err(e) => {
            for w in group {
                let _ = w.reply.send(Turn::Rows(Err(e.clone())));
            }
        }
    }
}

impl Line {
    fn lock(&self) -> MutexGuard<'_, LineState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Where `key`'s turn comes while [`MAX_IN_FLIGHT`] calls are out;
    /// `None` when fewer are: the caller leads one now.
    fn join(&self, mask: u64, key: &LiveKey) -> Option<oneshot::Receiver<Turn>> {
        let mut line = self.lock();
        if line.out < MAX_IN_FLIGHT {
            line.out += 1;
            return None;
        }
        let (reply, turn) = oneshot::channel();
        line.waiting.push(Waiting {
            mask,
            key: key.clone(),
            reply,
        });
        Some(turn)
    }

    /// A call ended: its lead goes to a waiting request with the keys
    /// waiting (`unanswered` ones first: keys of a leader that went away),
    /// or the calls out go down by one when no key waits.
    fn hand_on(&self, unanswered: Vec<Waiting>) {
        let mut front = unanswered;
        loop {
            let mut keys = {
                let mut line = self.lock();
                if !front.is_empty() {
                    front.append(&mut line.waiting);
                    line.waiting = std::mem::take(&mut front);
                }
                if line.waiting.is_empty() {
                    line.out -= 1;
                    return;
                }
                line.take_batch()
            };
            while let Some(w) = keys.pop() {
                let Err(turn) = w.reply.send(Turn::Lead(keys)) else {
                    return;
                };
                // That request went away: the next one.
                keys = match turn {
                    Turn::Lead(keys) => keys,
                    Turn::Rows(_) => Vec::new(),
                };
            }
        }
    }
}

impl LineState {
    fn take_batch(&mut self) -> Vec<Waiting> {
        if self.waiting.len() <= MAX_BATCH {
            std::mem::take(&mut self.waiting)
        } else {
            self.waiting.drain(..MAX_BATCH).collect()
        }
    }
}

/// The lead of a call: the keys it has yet to answer. Dropped, it hands the
/// lead on (see [`Line::hand_on`]), also when its request went away.
struct Leading<'a> {
    line: &'a Line,
    pending: Vec<Waiting>,
}

impl Drop for Leading<'_> {
    fn drop(&mut self) {
        self.line.hand_on(std::mem::take(&mut self.pending));
    }
}

/// A waiting request's place in the line. Dropped with a lead it did not
/// take (its request went away), it hands the lead on.
struct Ticket<'a> {
    line: &'a Line,
    turn: oneshot::Receiver<Turn>,
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        self.turn.close();
        if let Ok(Turn::Lead(keys)) = self.turn.try_recv() {
            self.line.hand_on(keys);
        }
    }
}

impl Call {
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
