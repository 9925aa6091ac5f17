//! Enrichment from another mesh service's lookup endpoint, over HTTP/1.1.
//!
//! One pooled keep-alive client serves all remote enrichments. A batch of keys
//! is sent as one `lookup-multi` call. A failing upstream becomes a 502 (bad
//! answer, unreachable) or 504 (timeout) for our caller, never a panic.

use std::time::Duration;

use axum::http::{HeaderValue, Method, Request, StatusCode, Uri, header};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::dataset::KeyRef;
use crate::error::AppError;

/// Largest upstream answer read (64 MiB).
const MAX_ANSWER_BYTES: usize = 64 << 20;

/// The shared HTTP client.
#[derive(Clone, Debug)]
pub struct HttpClient {
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Default for HttpClient {
    fn default() -> Self {
        HttpClient::new()
    }
}

impl HttpClient {
    pub fn new() -> HttpClient {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(2)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(64)
            .build(connector);
        HttpClient { client }
    }
}

/// One remote lookup endpoint.
#[derive(Debug)]
pub struct RemoteLookup {
    /// The `lookup-multi` address.
    uri: Uri,
    /// For messages: the `lookup` address as declared.
    display: String,
    auth: Option<HeaderValue>,
    timeout: Duration,
    key: String,
}

#[derive(Serialize)]
struct MultiRequest<'a> {
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

impl RemoteLookup {
    /// `url` ends with `/lookup`; `api_key` is sent as a bearer token.
    pub fn new(
        url: &str,
        api_key: Option<String>,
        timeout: Duration,
        key: &str,
    ) -> Result<RemoteLookup, String> {
        let uri: Uri = format!("{url}-multi")
            .parse()
            .map_err(|e| format!("invalid lookup url `{url}`: {e}"))?;
        if uri.scheme_str() != Some("http") || uri.host().is_none() {
            return Err(format!("lookup url `{url}` must be http://host[:port]/..."));
        }
        let auth = match api_key {
            None => None,
            Some(k) => Some(HeaderValue::from_str(&format!("Bearer {k}")).map_err(|_| {
                "lookup api key holds characters not allowed in a header".to_string()
            })?),
        };
        Ok(RemoteLookup {
            uri,
            display: url.to_string(),
            auth,
            timeout,
            key: key.to_string(),
        })
    }

    pub fn url(&self) -> &str {
        &self.display
    }

    /// Rows for `keys`, in order; `None` where the upstream has no row.
    pub async fn fetch_many(
        &self,
        client: &HttpClient,
        keys: &[KeyRef<'_>],
    ) -> Result<Vec<Option<Map<String, Value>>>, AppError> {
        let body = MultiRequest {
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
        let mut request = Request::builder()
            .method(Method::POST)
            .uri(self.uri.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::ACCEPT, "application/json");
        if let Some(auth) = &self.auth {
            request = request.header(header::AUTHORIZATION, auth.clone());
        }
        let request = request
            .body(Full::new(Bytes::from(body)))
            .map_err(AppError::internal)?;
        let call = async {
            let response = self.client_call(client, request).await?;
            let status = response.status();
            let bytes = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
                .collect()
                .await
                .map_err(|e| self.bad_gateway(format!("reading the answer failed: {e}")))?
                .to_bytes();
            Ok::<_, AppError>((status, bytes))
        };
        let (status, bytes) = match tokio::time::timeout(self.timeout, call).await {
            Ok(result) => result?,
            Err(_) => {
                return Err(AppError::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "upstream_timeout",
                    format!(
                        "lookup service {} did not answer within {} ms",
                        self.display,
                        self.timeout.as_millis()
                    ),
                ));
            }
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
            // Taken, not cloned: the answer is ours.
            if let Some(Value::Object(data)) = item.get_mut("data").map(Value::take) {
                out.push(Some(data));
            } else {
                let code = item.pointer("/error/code").and_then(Value::as_str);
                match code {
                    Some("not_found") => out.push(None),
                    other => {
                        return Err(self.bad_gateway(format!(
                            "answered error `{}` for key {key}",
                            other.unwrap_or("unknown")
                        )));
                    }
                }
            }
        }
        Ok(out)
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

    fn bad_gateway(&self, what: String) -> AppError {
        AppError::new(
            StatusCode::BAD_GATEWAY,
            "upstream_error",
            format!("lookup service {} {what}", self.display),
        )
    }
}
