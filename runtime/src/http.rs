//! The HTTP surface: routes, authentication, metrics and JSON errors.
//!
//! `app(state)` builds the router; `main` serves it, and tests may call it
//! directly. The state answers `/healthz` from the first moment; every other
//! route that needs models or datasets answers 503 until
//! [`AppState::set_ready`] is called.
//!
//! Every request is bounded by the service's request timeout (504 with a
//! JSON reason, counted in `/metrics`), counted, and written to the access
//! log when the service has one (`access_log`).

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::rejection::RawPathParamsRejection;
use axum::extract::{RawPathParams, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{Next, from_fn_with_state};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use serde::Serialize;
use serde::ser::{SerializeMap, SerializeSeq, Serializer};

use crate::access_log::{AccessLog, Entry};
use crate::auth::{KeyRing, Verdict};
use crate::config::{EndpointConfig, Limits, ServiceConfig};
use crate::error::{AppError, json_ok, json_response};
use crate::input::{ParseError, parse_many, parse_one};
use crate::metrics::Metrics;
use crate::predict::{Call, Pick, Scored, Timing, score};
use crate::query_log::{Probabilities, QueryLine, QueryLog, millis};
use crate::service::{Endpoint, LookupEndpoint, PredictionEndpoint, Service};

/// Request header that pins a generation; response header naming the one
/// that answered.
pub const GENERATION_HEADER: &str = "x-mesh-generation";

/// Shared state of the server.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    service: String,
    version: Option<String>,
    limits: Limits,
    base_path: Option<String>,
    keys: KeyRing,
    metrics: Metrics,
    request_timeout: Duration,
    access_log: Option<AccessLog>,
    ready: OnceLock<Ready>,
}

/// The identity a request's key was recognised as (`auth`), for the access log.
#[derive(Clone)]
struct Caller(String);

struct Ready {
    service: Arc<Service>,
    openapi: Vec<u8>,
}

impl AppState {
    /// State for `config`, not ready yet, accepting `keys` (none: no authentication).
    pub fn new(config: &ServiceConfig, keys: KeyRing) -> AppState {
        let endpoints = config.endpoints.iter().map(|(name, ep)| {
            (
                name.as_str(),
                matches!(ep, EndpointConfig::Prediction { .. }),
            )
        });
        AppState {
            inner: Arc::new(Inner {
                service: config.service.clone(),
                version: config.version.clone(),
                limits: config.limits.clone(),
                base_path: config
                    .base_path
                    .clone()
                    .filter(|p| crate::config::valid_base_path(p)),
                keys,
                metrics: Metrics::new(&config.service, endpoints),
                request_timeout: config.limits.request_timeout(),
                access_log: config.access_log.then(access_log).flatten(),
                ready: OnceLock::new(),
            }),
        }
    }

    /// Marks the service loaded: every route answers from now on.
    pub fn set_ready(&self, service: Service) {
        let keyed = !self.inner.keys.current().open();
        let openapi = serde_json::to_vec_pretty(&crate::openapi::document(&service, keyed))
            .unwrap_or_default();
        let _ = self.inner.ready.set(Ready {
            service: Arc::new(service),
            openapi,
        });
    }

    pub fn is_ready(&self) -> bool {
        self.inner.ready.get().is_some()
    }

    /// Writes out what the query log holds (a graceful stop's last step).
    pub fn flush_logs(&self) {
        if let Some(log) = self.service().ok().and_then(|s| s.query_log.clone()) {
            log.flush();
        }
    }

    fn service(&self) -> Result<Arc<Service>, AppError> {
        self.inner
            .ready
            .get()
            .map(|r| r.service.clone())
            .ok_or_else(AppError::not_ready)
    }
}

/// The access log's writer, or none (and a warning) when it cannot start.
fn access_log() -> Option<AccessLog> {
    AccessLog::to_stderr()
        .inspect_err(|e| {
            crate::log::warn(format_args!(
                "cannot start the access log ({e}): requests are not logged"
            ));
        })
        .ok()
}

/// The router of a service.
pub fn app(state: AppState) -> Router {
    let protected = Router::new()
        .route(
            "/public/api/v1/{service}/{endpoint}/{action}",
            post(public_api),
        )
        .route(
            "/public/api/v1/{service}/lookup-endpoints",
            post(lookup_endpoints),
        )
        .route("/v2/models/{name}", get(model_metadata))
        .route("/v2/models/{name}/ready", get(model_ready))
        .route("/v2/models/{name}/infer", post(model_infer))
        // Behind the keys too: the description names every endpoint and field.
        .route("/openapi.json", get(openapi))
        .route_layer(from_fn_with_state(state.clone(), authenticate));
    let routes = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/v2", get(server_metadata))
        .route("/v2/health/live", get(v2_live))
        .route("/v2/health/ready", get(v2_ready))
        .route("/metrics", get(metrics))
        .route("/docs", get(crate::docs::page))
        .route("/docs/assets/{file}", get(crate::docs::asset))
        .merge(protected);
    // Under the base path as well as at the root (see `ServiceConfig::base_path`).
    let routes = match state.inner.base_path.as_deref() {
        Some(base) => routes.clone().nest(base, routes),
        None => routes,
    };
    routes
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(from_fn_with_state(state.clone(), track))
        .with_state(state)
}

/// Bounds, counts and logs every request.
async fn track(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let inner = &state.inner;
    let path = request.uri().path();
    let route = inner.metrics.route_id(
        inner
            .base_path
            .as_deref()
            .and_then(|b| path.strip_prefix(b))
            .filter(|rest| rest.starts_with('/'))
            .unwrap_or(path),
    );
    // What the access log needs of the request, only when there is one.
    let logged = inner.access_log.as_ref().map(|_| {
        let request_id = request
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        (request.method().clone(), path.to_owned(), request_id)
    });
    let start = Instant::now();
    let serving = crate::generations::Serving::enter();
    let response = match tokio::time::timeout(inner.request_timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            inner.metrics.record_timeout();
            AppError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "request_timeout",
                format!(
                    "the request took longer than the service's limit of {} ms",
                    inner.request_timeout.as_millis()
                ),
            )
            .into_response()
        }
    };
    drop(serving);
    let latency = start.elapsed();
    let status = response.status().as_u16();
    inner.metrics.record(route, status, latency);
    if let (Some(log), Some((method, path, request_id))) = (&inner.access_log, &logged) {
        log.record(&Entry {
            method: method.as_str(),
            path,
            status,
            latency,
            bytes: axum::body::HttpBody::size_hint(response.body()).exact(),
            caller: response.extensions().get::<Caller>().map(|c| c.0.as_str()),
            request_id: request_id.as_deref(),
        });
    }
    response
}

/// `Authorization: Bearer KEY` or `X-API-Key: KEY` (see `auth`): 401
/// without a key or with one nobody holds, 403 from a known caller that is
/// not allowed. The key is never echoed.
async fn authenticate(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let headers = request.headers();
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        });
    let given = bearer.or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()));
    let verdict = state.inner.keys.current().check(given);
    let had_key = given.is_some();
    let mut request = request;
    let (refused, caller) = match verdict {
        Verdict::Open | Verdict::Allowed(None) => return next.run(request).await,
        Verdict::Allowed(Some(caller)) => {
            request.extensions_mut().insert(Caller(caller.clone()));
            let mut response = next.run(request).await;
            response.extensions_mut().insert(Caller(caller));
            return response;
        }
        Verdict::Denied(caller) => (
            AppError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!(
                    "caller `{caller}` may not call service `{}` (not in its exposure's `allow`)",
                    state.inner.service
                ),
            ),
            Some(caller),
        ),
        Verdict::Unknown => (
            AppError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                if had_key {
                    "unknown API key"
                } else {
                    "missing API key: send `Authorization: Bearer KEY` or `X-API-Key: KEY`"
                },
            ),
            None,
        ),
    };
    let status = refused.status;
    // The reason is the answer's message, which never holds the key.
    if let Some(log) = state.service().ok().and_then(|s| s.query_log.clone()) {
        log.auth_failure(
            request.method().as_str(),
            request.uri().path(),
            status.as_u16(),
            caller.as_deref(),
            &refused.message,
        );
    }
    let mut response = refused.into_response();
    if status == StatusCode::UNAUTHORIZED {
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    response
}

async fn healthz() -> Response {
    json_response(StatusCode::OK, br#"{"status":"ok"}"#.to_vec())
}

/// 200 once loaded, with the freshness of each dataset (a stale dataset is
/// reported, still served: readiness does not change).
async fn readyz(State(state): State<AppState>) -> Response {
    match state.service() {
        Ok(service) => json_ok(&serde_json::json!({
            "status": "ready",
            "datasets": service.dataset_statuses(),
        })),
        Err(e) => e.into_response(),
    }
}

async fn v2_live() -> Response {
    json_response(StatusCode::OK, br#"{"live":true}"#.to_vec())
}

async fn v2_ready(State(state): State<AppState>) -> Response {
    if state.is_ready() {
        json_response(StatusCode::OK, br#"{"ready":true}"#.to_vec())
    } else {
        json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            br#"{"ready":false}"#.to_vec(),
        )
    }
}

async fn server_metadata() -> Response {
    json_ok(&serde_json::json!({
        "name": "mesh-runtime",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": []
    }))
}

async fn metrics(State(state): State<AppState>) -> Response {
    let mut text = state.inner.metrics.render(state.is_ready());
    if let Some(log) = &state.inner.access_log {
        crate::metrics::render_access_log(&mut text, log.dropped());
    }
    if let Ok(service) = state.service() {
        crate::metrics::render_datasets(&mut text, service.dataset_statuses());
        crate::metrics::render_remotes(&mut text, &service.remote_statuses());
        crate::generations::render_metrics(&mut text, &service.generations, &service.split_reloads);
        if let Some(log) = &service.query_log {
            crate::metrics::render_query_log(&mut text, log.lines(), log.dropped());
        }
    }
    let mut response = (StatusCode::OK, text).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

async fn openapi(State(state): State<AppState>) -> Response {
    match state.inner.ready.get() {
        Some(ready) => json_response(StatusCode::OK, ready.openapi.clone()),
        None => AppError::not_ready().into_response(),
    }
}

async fn not_found() -> AppError {
    AppError::not_found("unknown_route", "no such route")
}

async fn method_not_allowed() -> AppError {
    AppError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed on this route",
    )
}

/// The body of a JSON request, with JSON errors for every problem: a
/// non-JSON content type (415), a body over `limit` (413, refused from the
/// announced length before reading when there is one), a broken stream (400).
async fn json_body(request: Request, limit: usize) -> Result<Bytes, AppError> {
    let headers = request.headers();
    if let Some(ct) = headers.get(header::CONTENT_TYPE) {
        let ct = ct.to_str().unwrap_or("").to_ascii_lowercase();
        let essence = ct.split(';').next().unwrap_or("").trim();
        if essence != "application/json" && !essence.ends_with("+json") {
            return Err(AppError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send the body as `Content-Type: application/json`",
            ));
        }
    }
    let too_large = || {
        AppError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("request body is larger than the service's limit of {limit} bytes"),
        )
    };
    let announced = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    axum::body::to_bytes(request.into_body(), limit)
        .await
        .map_err(|e| {
            let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
            while let Some(err) = source {
                if err.is::<http_body_util::LengthLimitError>() {
                    return too_large();
                }
                source = err.source();
            }
            AppError::bad_request(
                "unreadable_body",
                format!("cannot read the request body: {e}"),
            )
        })
}

fn parse_error(e: ParseError) -> AppError {
    match e {
        ParseError::Malformed(m) => AppError::bad_request("malformed_json", m),
        ParseError::Invalid(m) => AppError::bad_request("invalid_request", m),
        ParseError::TooMany(n) => AppError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "batch_too_large",
            format!("more than {n} items in one request"),
        ),
    }
}

/// Path parameters, or a JSON 400 (e.g. bad percent-encoding).
fn path_params(
    params: Result<RawPathParams, RawPathParamsRejection>,
) -> Result<RawPathParams, AppError> {
    params.map_err(|r| AppError::bad_request("invalid_path", r.body_text()))
}

async fn public_api(
    State(state): State<AppState>,
    params: Result<RawPathParams, RawPathParamsRejection>,
    request: Request,
) -> Response {
    let params = match path_params(params) {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    match public_api_inner(&state, &params, request).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

/// The service when `name` is this one's.
fn service_named(state: &AppState, name: &str) -> Result<Arc<Service>, AppError> {
    if name != state.inner.service {
        return Err(AppError::not_found(
            "unknown_service",
            format!(
                "no service `{name}` here (this is `{}`)",
                state.inner.service
            ),
        ));
    }
    state.service()
}

async fn lookup_endpoints(
    State(state): State<AppState>,
    params: Result<RawPathParams, RawPathParamsRejection>,
    request: Request,
) -> Response {
    let answer = async {
        let params = path_params(params)?;
        let name = params.iter().next().map_or("", |(_, v)| v);
        let service = service_named(&state, name)?;
        let ctx = Ctx::of(&request, service.query_log.is_some());
        let body = json_body(request, state.inner.limits.max_body_bytes).await?;
        lookup_endpoints_answer(&service, &body, &ctx).await
    };
    match answer.await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

/// `{"endpoints": [...], "items": [{"data": {...}}, ...]}`: the rows of
/// several lookup endpoints per item, in one call.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct EndpointsRequest {
    endpoints: Vec<String>,
    items: Vec<EndpointsItem>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct EndpointsItem {
    data: serde_json::Map<String, serde_json::Value>,
}

/// `{"<endpoint>": row or null, ...}` for one item.
struct EndpointRows<'a> {
    names: &'a [String],
    rows: Vec<Option<crate::lookup::Merged<'a>>>,
}

impl Serialize for EndpointRows<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.names.len()))?;
        for (name, row) in self.names.iter().zip(&self.rows) {
            map.serialize_entry(name, row)?;
        }
        map.end()
    }
}

/// Query-logged like single lookups: a line per key per endpoint (once the
/// request names its endpoints), in the lookup lines' shape.
async fn lookup_endpoints_answer(
    service: &Service,
    body: &[u8],
    ctx: &Ctx,
) -> Result<Response, AppError> {
    let request: EndpointsRequest = serde_json::from_slice(body).map_err(|e| {
        if e.is_syntax() || e.is_eof() {
            AppError::bad_request("malformed_json", e.to_string())
        } else {
            AppError::bad_request("invalid_request", e.to_string())
        }
    })?;
    if request.endpoints.is_empty() {
        return Err(AppError::bad_request(
            "invalid_request",
            "`endpoints` must name at least one lookup endpoint",
        ));
    }
    if request.items.len() > service.limits.max_batch {
        return Err(parse_error(ParseError::TooMany(service.limits.max_batch)));
    }
    let mut endpoints = Vec::with_capacity(request.endpoints.len());
    for name in &request.endpoints {
        match service.endpoints.get(name) {
            Some(Endpoint::Lookup(ep)) => endpoints.push(ep.as_ref()),
            Some(Endpoint::Prediction(_)) => {
                return Err(AppError::bad_request(
                    "not_a_lookup_endpoint",
                    format!("`{name}` is a prediction endpoint, not a lookup endpoint"),
                ));
            }
            None => {
                return Err(AppError::not_found(
                    "unknown_endpoint",
                    format!("service has no lookup endpoint `{name}`"),
                ));
            }
        }
    }
    // The key fields of every (item, endpoint), read from the item's data.
    let keys: Vec<Vec<crate::input::Input<'static>>> = request
        .items
        .iter()
        .flat_map(|item| {
            endpoints.iter().map(|ep| {
                (0..ep.fields.len())
                    .map(|slot| {
                        item.data
                            .get(ep.fields.name(slot))
                            .map_or(crate::input::Input::Absent, crate::input::Input::from_json)
                    })
                    .collect()
            })
        })
        .collect();
    let log = ctx.logged(service);
    let mut items = Vec::with_capacity(request.items.len());
    for (item, keys) in keys.chunks(endpoints.len()).enumerate() {
        let mut rows = Vec::with_capacity(endpoints.len());
        for (ep, keys) in endpoints.iter().zip(keys) {
            let row = crate::lookup::lookup(ep, keys).await;
            if let Some(log) = log {
                ctx.log_lookup(log, ep, Some(keys), row.as_ref());
            }
            match row {
                Ok(row) => rows.push(Some(row)),
                Err(e) if e.status == StatusCode::NOT_FOUND => rows.push(None),
                Err(mut e) => {
                    if e.status.is_client_error() {
                        e.message = format!("item {item}: endpoint `{}`: {}", ep.name, e.message);
                    }
                    return Err(e);
                }
            }
        }
        items.push(LookupOne {
            data: EndpointRows {
                names: &request.endpoints,
                rows,
            },
        });
    }
    Ok(json_ok(&EndpointsAnswer { items }))
}

#[derive(Serialize)]
struct EndpointsAnswer<T> {
    items: Vec<T>,
}

async fn public_api_inner(
    state: &AppState,
    params: &RawPathParams,
    request: Request,
) -> Result<Response, AppError> {
    let limit = state.inner.limits.max_body_bytes;
    let mut service_name = "";
    let mut endpoint_name = "";
    let mut action = "";
    for (key, value) in params {
        match key {
            "service" => service_name = value,
            "endpoint" => endpoint_name = value,
            _ => action = value,
        }
    }
    let service = service_named(state, service_name)?;
    let ctx = Ctx::of(&request, service.query_log.is_some());
    let Some(endpoint) = service.endpoints.get(endpoint_name) else {
        return Err(AppError::not_found(
            "unknown_endpoint",
            format!("service `{service_name}` has no endpoint `{endpoint_name}`"),
        ));
    };
    match (endpoint, action) {
        (Endpoint::Prediction(ep), "predict") => {
            let body = json_body(request, limit).await?;
            predict_one(&service, ep, &body, &ctx).await
        }
        (Endpoint::Prediction(ep), "predict-multi") => {
            let body = json_body(request, limit).await?;
            predict_many(&service, ep, &body, &ctx).await
        }
        (Endpoint::Lookup(ep), "lookup") => {
            let body = json_body(request, limit).await?;
            lookup_one(&service, ep, &body, &ctx).await
        }
        (Endpoint::Lookup(ep), "lookup-multi") => {
            let body = json_body(request, limit).await?;
            lookup_many(&service, ep, &body, &ctx).await
        }
        (Endpoint::Prediction(_), _) => Err(AppError::not_found(
            "unknown_route",
            format!("`{endpoint_name}` is a prediction endpoint: use `predict` or `predict-multi`"),
        )),
        (Endpoint::Lookup(_), _) => Err(AppError::not_found(
            "unknown_route",
            format!("`{endpoint_name}` is a lookup endpoint: use `lookup` or `lookup-multi`"),
        )),
    }
}

/// What a public API request brings besides its body.
struct Ctx {
    started: Instant,
    request_id: Option<String>,
    caller: Option<String>,
    /// `X-Mesh-Generation`.
    pin: Option<String>,
}

impl Ctx {
    /// `logged`: whether the service has a query log, the only reader of
    /// the request id and caller (so a request without one copies neither).
    fn of(request: &Request, logged: bool) -> Ctx {
        let header = |name: &str| {
            request
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        Ctx {
            started: Instant::now(),
            request_id: logged.then(|| header("x-request-id")).flatten(),
            caller: logged
                .then(|| request.extensions().get::<Caller>().map(|c| c.0.clone()))
                .flatten(),
            pin: header(GENERATION_HEADER),
        }
    }

    /// The generation pinned by the header: 400 naming the known ones when
    /// there is no such generation.
    fn pick(&self, ep: &PredictionEndpoint) -> Result<Pick, AppError> {
        let Some(name) = self.pin.as_deref() else {
            return Ok(Pick::Dispatch);
        };
        let Some(gens) = &ep.generations else {
            return Err(AppError::bad_request(
                "unknown_generation",
                format!(
                    "endpoint `{}` has no generations: leave out the `X-Mesh-Generation` header",
                    ep.name
                ),
            ));
        };
        gens.position(name).map(Pick::Pin).ok_or_else(|| {
            AppError::bad_request(
                "unknown_generation",
                format!(
                    "endpoint `{}` has no generation `{name}` (generations: {})",
                    ep.name,
                    gens.names()
                ),
            )
        })
    }

    /// Whether this query goes to the query log (drawn once per request).
    fn logged<'s>(&self, service: &'s Service) -> Option<&'s QueryLog> {
        service.query_log.as_ref().filter(|log| log.sampled())
    }

    fn call(&self, pick: Pick, logged: bool) -> Call<'_> {
        Call {
            pick,
            logged,
            request_id: self.request_id.as_deref(),
        }
    }

    /// A query line of `endpoint` with what every line carries.
    fn line<'a>(&'a self, endpoint: &'a str, kind: &'static str, status: u16) -> QueryLine<'a> {
        QueryLine {
            time: crate::log::rfc3339(std::time::SystemTime::now() - self.started.elapsed()),
            event: "query",
            endpoint,
            kind,
            generation: None,
            key: None,
            features: None,
            row: None,
            prediction: None,
            probabilities: None,
            status,
            latency_ms: millis(self.started.elapsed()),
            request_id: self.request_id.as_deref(),
            caller: self.caller.as_deref(),
        }
    }

    /// The query line of one prediction item (`row`: its fields after
    /// enrichment, when parsed).
    fn log_prediction(
        &self,
        log: &QueryLog,
        ep: &PredictionEndpoint,
        row: Option<&[crate::input::Input<'_>]>,
        outcome: Result<&Scored, &AppError>,
    ) {
        let status = match outcome {
            Ok(_) => 200,
            Err(e) => e.status.as_u16(),
        };
        let mut line = self.line(&ep.name, "predict", status);
        if let Some(row) = row {
            line.key = ep
                .log_key_slot
                .map(|k| crate::query_log::input_json(&row[k]));
            line.features = Some(log.features(&ep.fields, row));
        }
        if let Ok(scored) = outcome {
            line.generation = generation_name(ep, scored);
            line.prediction = Some(&scored.label);
            line.probabilities = Some(Probabilities {
                names: &ep.class_names,
                values: &scored.probabilities,
            });
        }
        log.send(&line);
    }

    /// The query line of one lookup key.
    fn log_lookup(
        &self,
        log: &QueryLog,
        ep: &LookupEndpoint,
        keys: Option<&[crate::input::Input<'_>]>,
        outcome: Result<&crate::lookup::Merged<'_>, &AppError>,
    ) {
        let status = match outcome {
            Ok(_) => 200,
            Err(e) => e.status.as_u16(),
        };
        let mut line = self.line(&ep.name, "lookup", status);
        line.key = keys
            .and_then(|k| k.first())
            .map(crate::query_log::input_json);
        if let Ok(merged) = outcome {
            line.row = serde_json::to_value(merged)
                .ok()
                .map(|row| log.redact_object(row));
        }
        log.send(&line);
    }
}

/// The name of the generation that answered, if the endpoint has them.
fn generation_name<'a>(ep: &'a PredictionEndpoint, scored: &Scored) -> Option<&'a str> {
    let gens = ep.generations.as_ref()?;
    Some(gens.list[scored.generation?].name.as_str())
}

/// `response` with the `X-Mesh-Generation` header when `name` is set.
fn with_generation(mut response: Response, name: Option<&str>) -> Response {
    if let Some(value) = name.and_then(|n| HeaderValue::from_str(n).ok()) {
        response.headers_mut().insert(GENERATION_HEADER, value);
    }
    response
}

/// `["age", "gender"]`.
struct Enriched<'a> {
    ep: &'a PredictionEndpoint,
    slots: &'a [usize],
}

impl Serialize for Enriched<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.slots.len()))?;
        for &slot in self.slots {
            seq.serialize_element(self.ep.fields.name(slot))?;
        }
        seq.end()
    }
}

#[derive(Serialize)]
struct PredictResult<'a> {
    prediction: &'a str,
    probas: Probabilities<'a>,
    enriched: Enriched<'a>,
    /// Endpoints with generations only: plain ones answer as before.
    #[serde(skip_serializing_if = "Option::is_none")]
    generation: Option<&'a str>,
}

impl<'a> PredictResult<'a> {
    fn new(ep: &'a PredictionEndpoint, scored: &'a Scored) -> PredictResult<'a> {
        PredictResult {
            prediction: &scored.label,
            probas: Probabilities {
                names: &ep.class_names,
                values: &scored.probabilities,
            },
            enriched: Enriched {
                ep,
                slots: &scored.enriched,
            },
            generation: generation_name(ep, scored),
        }
    }
}

/// Microseconds per phase.
#[derive(Serialize)]
struct TimingBody {
    enrich: u64,
    predict: u64,
    total: u64,
}

impl TimingBody {
    fn new(t: Timing, start: Instant) -> TimingBody {
        TimingBody {
            enrich: t.enrich_us,
            predict: t.predict_us,
            total: start.elapsed().as_micros() as u64,
        }
    }
}

#[derive(Serialize)]
struct PredictOne<'a> {
    result: PredictResult<'a>,
    timing: TimingBody,
}

async fn predict_one(
    service: &Service,
    ep: &PredictionEndpoint,
    body: &[u8],
    ctx: &Ctx,
) -> Result<Response, AppError> {
    let start = Instant::now();
    let log = ctx.logged(service);
    let parsed = ctx.pick(ep).and_then(|pick| {
        let slots = parse_one(body, "features", &ep.fields).map_err(parse_error)?;
        Ok((pick, slots))
    });
    let (pick, mut slots) = match parsed {
        Ok(parsed) => parsed,
        Err(e) => {
            if let Some(log) = log {
                ctx.log_prediction(log, ep, None, Err(&e));
            }
            return Err(e);
        }
    };
    let mut timing = Timing::default();
    let call = ctx.call(pick, log.is_some());
    let scored = score(service, ep, &mut slots, 1, &mut timing, &call)
        .await
        .and_then(|mut results| {
            results
                .pop()
                .unwrap_or_else(|| Err(AppError::internal("no result")))
        });
    if let Some(log) = log {
        ctx.log_prediction(log, ep, Some(&slots), scored.as_ref());
    }
    let scored = scored?;
    let response = json_ok(&PredictOne {
        result: PredictResult::new(ep, &scored),
        timing: TimingBody::new(timing, start),
    });
    Ok(with_generation(response, generation_name(ep, &scored)))
}

/// One item of a `*-multi` answer.
enum ItemBody<'a, T> {
    Ok(&'static str, T),
    Err(&'a AppError),
}

impl<T: Serialize> Serialize for ItemBody<'_, T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(1))?;
        match self {
            ItemBody::Ok(key, value) => map.serialize_entry(key, value)?,
            ItemBody::Err(e) => map.serialize_entry("error", &e.body().error)?,
        }
        map.end()
    }
}

#[derive(Serialize)]
struct PredictMany<'a> {
    items: Vec<ItemBody<'a, PredictResult<'a>>>,
    timing: TimingBody,
}

async fn predict_many(
    service: &Service,
    ep: &PredictionEndpoint,
    body: &[u8],
    ctx: &Ctx,
) -> Result<Response, AppError> {
    let start = Instant::now();
    let log = ctx.logged(service);
    let parsed = ctx.pick(ep).and_then(|pick| {
        let (slots, n) = parse_many(body, "features", &ep.fields, service.limits.max_batch)
            .map_err(parse_error)?;
        Ok((pick, slots, n))
    });
    let (pick, mut slots, n) = match parsed {
        Ok(parsed) => parsed,
        Err(e) => {
            if let Some(log) = log {
                ctx.log_prediction(log, ep, None, Err(&e));
            }
            return Err(e);
        }
    };
    let mut timing = Timing::default();
    let call = ctx.call(pick, log.is_some());
    let results = score(service, ep, &mut slots, n, &mut timing, &call).await;
    let width = ep.fields.len();
    if let Some(log) = log {
        for item in 0..n {
            let row = Some(&slots[item * width..(item + 1) * width]);
            match &results {
                Ok(results) => ctx.log_prediction(log, ep, row, results[item].as_ref()),
                Err(e) => ctx.log_prediction(log, ep, row, Err(e)),
            }
        }
    }
    let results = results?;
    // The header names the generation when every answer has the same one.
    let mut names = results
        .iter()
        .filter_map(|r| r.as_ref().ok().and_then(|s| generation_name(ep, s)));
    let first = names.next();
    let header = first.filter(|f| names.all(|n| n == *f));
    let items = results
        .iter()
        .map(|r| match r {
            Ok(scored) => ItemBody::Ok("result", PredictResult::new(ep, scored)),
            Err(e) => ItemBody::Err(e),
        })
        .collect();
    let response = json_ok(&PredictMany {
        items,
        timing: TimingBody::new(timing, start),
    });
    Ok(with_generation(response, header))
}

#[derive(Serialize)]
struct LookupOne<T> {
    data: T,
}

async fn lookup_one(
    service: &Service,
    ep: &LookupEndpoint,
    body: &[u8],
    ctx: &Ctx,
) -> Result<Response, AppError> {
    let log = ctx.logged(service);
    let keys = match parse_one(body, "data", &ep.fields).map_err(parse_error) {
        Ok(keys) => keys,
        Err(e) => {
            if let Some(log) = log {
                ctx.log_lookup(log, ep, None, Err(&e));
            }
            return Err(e);
        }
    };
    let merged = crate::lookup::lookup(ep, &keys).await;
    if let Some(log) = log {
        ctx.log_lookup(log, ep, Some(&keys), merged.as_ref());
    }
    Ok(json_ok(&LookupOne { data: merged? }))
}

#[derive(Serialize)]
struct LookupMany<'a, T> {
    items: Vec<ItemBody<'a, T>>,
}

async fn lookup_many(
    service: &Service,
    ep: &LookupEndpoint,
    body: &[u8],
    ctx: &Ctx,
) -> Result<Response, AppError> {
    let log = ctx.logged(service);
    let (keys, n) =
        match parse_many(body, "data", &ep.fields, service.limits.max_batch).map_err(parse_error) {
            Ok(parsed) => parsed,
            Err(e) => {
                if let Some(log) = log {
                    ctx.log_lookup(log, ep, None, Err(&e));
                }
                return Err(e);
            }
        };
    let width = ep.fields.len();
    let mut results = Vec::with_capacity(n);
    for item in 0..n {
        let item_keys = &keys[item * width..(item + 1) * width];
        let merged = crate::lookup::lookup(ep, item_keys).await;
        if let Some(log) = log {
            ctx.log_lookup(log, ep, Some(item_keys), merged.as_ref());
        }
        if let Err(e) = &merged
            && e.status.is_server_error()
        {
            return Err(e.clone());
        }
        results.push(merged);
    }
    let items = results
        .iter()
        .map(|r| match r {
            Ok(m) => ItemBody::Ok("data", m),
            Err(e) => ItemBody::Err(e),
        })
        .collect();
    Ok(json_ok(&LookupMany { items }))
}

async fn model_endpoint(
    state: &AppState,
    params: Result<RawPathParams, RawPathParamsRejection>,
) -> Result<(Arc<Service>, Arc<PredictionEndpoint>), AppError> {
    let params = path_params(params)?;
    let name = params
        .iter()
        .find(|(k, _)| *k == "name")
        .map_or("", |(_, v)| v);
    let service = state.service()?;
    match service.endpoints.get(name) {
        Some(Endpoint::Prediction(ep)) => {
            let ep = ep.clone();
            Ok((service, ep))
        }
        _ => Err(AppError::not_found(
            "unknown_model",
            format!("no model `{name}` (models are the prediction endpoints)"),
        )),
    }
}

async fn model_metadata(
    State(state): State<AppState>,
    params: Result<RawPathParams, RawPathParamsRejection>,
) -> Response {
    match model_endpoint(&state, params).await {
        Ok((_, ep)) => json_ok(&crate::oip::metadata(&ep, state.inner.version.as_deref())),
        Err(e) => e.into_response(),
    }
}

async fn model_ready(
    State(state): State<AppState>,
    params: Result<RawPathParams, RawPathParamsRejection>,
) -> Response {
    match model_endpoint(&state, params).await {
        Ok((_, ep)) => json_ok(&serde_json::json!({"name": ep.name, "ready": true})),
        Err(e) => e.into_response(),
    }
}

/// v2 `infer`: the whole request is scored by one generation (the pinned
/// one, else drawn by the weights: the tensors are model inputs, so a
/// dispatch key that is not one cannot be read), named in the answer's
/// `parameters` and the `X-Mesh-Generation` header.
async fn model_infer(
    State(state): State<AppState>,
    params: Result<RawPathParams, RawPathParamsRejection>,
    request: Request,
) -> Response {
    // v2 `infer` writes no query line.
    let ctx = Ctx::of(&request, false);
    let result = async {
        let (service, ep) = model_endpoint(&state, params).await?;
        let generation = match (ctx.pick(&ep)?, &ep.generations) {
            (Pick::Pin(g), _) => Some(g),
            (Pick::Dispatch, Some(gens)) => Some(gens.pick(crate::generations::random_bucket())),
            (Pick::Dispatch, None) => None,
        };
        let body = json_body(request, state.inner.limits.max_body_bytes).await?;
        let answer = crate::oip::infer(
            &ep,
            generation,
            service.version.as_deref(),
            &body,
            service.limits.max_batch,
        )
        .await;
        if let (Some(g), Some(gens)) = (generation, &ep.generations) {
            let stats = &gens.list[g].stats;
            stats
                .requests
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            stats.latency.observe(ctx.started.elapsed());
            if answer.is_err() {
                stats
                    .errors
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
        let name = generation.and_then(|g| Some(ep.generations.as_ref()?.list[g].name.clone()));
        Ok::<_, AppError>(with_generation(json_ok(&answer?), name.as_deref()))
    }
    .await;
    match result {
        Ok(answer) => answer,
        Err(e) => e.into_response(),
    }
}
