//! A fault-injecting HTTP proxy in front of moto, for testing mesh's AWS provider.
//!
//! moto answers every call at once and never fails on its own, so waiters, retries on
//! throttling and 5xx handling cannot be tested against it directly. Point the SDK at a
//! [`FaultProxy`] instead: it forwards every request to moto verbatim (method, path, query,
//! headers including `Host` and `Authorization`, body), so SigV4 signatures stay valid, and
//! injects the faults a test programs, matched by AWS action:
//!
//! * `X-Amz-Target` (JSON protocol, e.g. ECR): the part after the last `.`;
//! * the `Action=` form field or query parameter (query protocol: EC2, IAM, STS, ELBv2);
//! * the REST method and path for EKS (`GET /clusters/NAME` is `DescribeCluster`, ...).
//!
//! An action pattern is the bare action (`"DescribeCluster"`), the action qualified with the
//! signing service (`"eks:DescribeCluster"`; the service comes from the `Authorization`
//! credential scope), or `"*"` for every request.
//!
//! ```no_run
//! use aws_fault_proxy::{FaultProxy, moto_endpoint};
//! let proxy = FaultProxy::start(&moto_endpoint());
//! proxy.throttle("DescribeVpcs", 2); // the next two DescribeVpcs calls are throttled
//! proxy.rewrite_status("DescribeCluster", 3, "ACTIVE", "CREATING");
//! // ... point the SDK at proxy.endpoint(), run the code under test ...
//! assert_eq!(proxy.count("DescribeVpcs"), 3);
//! ```
//!
//! The EKS add-on calls (`CreateAddon`, `ListAddons`, `DescribeAddon`, `UpdateAddon`,
//! `DeleteAddon`), which moto does not serve, are SIMULATED by the proxy: see [`addons`].
//! Faults apply to them as to any other call; only what would have been forwarded is
//! answered by the simulation instead (and not counted by [`FaultProxy::forwarded`]).
//!
//! Faults of one action that answer in the proxy's place (throttle, server error, canned
//! response) are used up in the order they were programmed; delays apply before them;
//! status rewrites apply to responses that came back from moto.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{SocketAddr, TcpListener as StdTcpListener, TcpStream};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::oneshot;

pub mod addons;

/// The variable `scripts/services env` sets to moto's address.
pub const ENDPOINT_VAR: &str = "MESH_TEST_AWS_ENDPOINT";

/// moto's endpoint from `MESH_TEST_AWS_ENDPOINT`, checked to accept connections.
///
/// # Panics
/// When the variable is unset or nothing listens there, with a message saying how to start
/// the services. Tests that need moto fail, they never skip.
pub fn moto_endpoint() -> String {
    let endpoint = match std::env::var(ENDPOINT_VAR) {
        Ok(v) if !v.trim().is_empty() => v.trim().trim_end_matches('/').to_string(),
        _ => panic!(
            "{ENDPOINT_VAR} is not set: these tests need the moto server. Run them with \
             `scripts/test` (it starts every service), or start the services with \
             `scripts/services start` and load their addresses with `eval \"$(scripts/services env)\"`"
        ),
    };
    let authority = authority_of(&endpoint).unwrap_or_else(|e| {
        panic!("{ENDPOINT_VAR}={endpoint} is not an http://HOST:PORT address: {e}")
    });
    let reachable = std::net::ToSocketAddrs::to_socket_addrs(&authority)
        .ok()
        .and_then(|mut addrs| addrs.next())
        .is_some_and(|addr| TcpStream::connect_timeout(&addr, Duration::from_secs(3)).is_ok());
    assert!(
        reachable,
        "{ENDPOINT_VAR}={endpoint} but nothing accepts connections there: start moto with \
         `scripts/services start` (or run the tests with `scripts/test`); see `scripts/services status`"
    );
    endpoint
}

fn authority_of(endpoint: &str) -> Result<String, String> {
    let uri: Uri = endpoint.parse().map_err(|e| format!("{e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err("only plain http upstreams are supported".into());
    }
    let authority = uri.authority().ok_or("no host:port")?;
    let port = authority.port_u16().unwrap_or(80);
    Ok(format!("{}:{port}", authority.host()))
}

/// Which wire protocol a request used; decides the shape of an injected error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// EC2's query protocol (`Action=` form body, XML `<Response><Errors>` errors).
    Ec2Query,
    /// The query protocol of IAM, STS, ELBv2 (XML `<ErrorResponse>` errors).
    AwsQuery,
    /// `X-Amz-Target` + JSON body (ECR); errors carry `__type`.
    AwsJson,
    /// REST + JSON (EKS); errors carry the `x-amzn-ErrorType` header.
    RestJson,
}

/// What the proxy made of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    /// Signing service from the `Authorization` credential scope (`ec2`, `eks`, `ecr`, ...),
    /// or inferred from the request; empty when unknown.
    pub service: String,
    /// AWS action (`DescribeVpcs`, `DescribeCluster`, ...); for a request that is no known AWS
    /// call, `"METHOD /path"`.
    pub action: String,
    pub protocol: Protocol,
}

impl Call {
    fn matches(&self, pattern: &str) -> bool {
        pattern == "*"
            || pattern == self.action
            || pattern
                .split_once(':')
                .is_some_and(|(svc, act)| svc == self.service && act == self.action)
    }
}

#[derive(Debug, Clone)]
enum Fault {
    Throttle,
    ServerError(StatusCode),
    Respond {
        status: StatusCode,
        content_type: String,
        body: Bytes,
    },
    Delay(Duration),
    RewriteStatus {
        from: String,
        to: String,
    },
}

#[derive(Debug)]
struct Rule {
    pattern: String,
    fault: Fault,
    /// `None`: every matching call.
    remaining: Option<usize>,
}

impl Rule {
    fn live(&self) -> bool {
        self.remaining != Some(0)
    }
    fn use_once(&mut self) {
        if let Some(n) = self.remaining.as_mut() {
            *n = n.saturating_sub(1);
        }
    }
}

#[derive(Debug, Default)]
struct State {
    rules: Vec<Rule>,
    received: Vec<Call>,
    forwarded: Vec<Call>,
    injected: HashMap<String, usize>,
}

struct Shared {
    /// Patterns whose calls wait until released (see [`FaultProxy::hold`]); `send_modify`
    /// wakes the waiters to look again.
    held: tokio::sync::watch::Sender<Vec<String>>,
    upstream_authority: String,
    upstream_display: String,
    state: Mutex<State>,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        // A panicking test thread must not poison the proxy for the other tests.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A fault-injecting proxy listening on `127.0.0.1:<random port>`. Dropping it stops it.
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl FaultProxy {
    /// Start a proxy forwarding to `upstream` (`http://127.0.0.1:5055`, moto). It runs on its own
    /// thread and runtime, so it serves sync tests and `#[tokio::test]`s of any flavour alike.
    ///
    /// # Panics
    /// When `upstream` is not an `http://host:port` address or no loopback port can be bound.
    pub fn start(upstream: &str) -> FaultProxy {
        let upstream = upstream.trim().trim_end_matches('/');
        let upstream_authority = authority_of(upstream)
            .unwrap_or_else(|e| panic!("aws-fault-proxy: bad upstream {upstream:?}: {e}"));
        let listener =
            StdTcpListener::bind("127.0.0.1:0").expect("aws-fault-proxy: bind 127.0.0.1:0");
        listener
            .set_nonblocking(true)
            .expect("aws-fault-proxy: set_nonblocking");
        let addr = listener.local_addr().expect("aws-fault-proxy: local_addr");

        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        let shared = Arc::new(Shared {
            held: tokio::sync::watch::channel(Vec::new()).0,
            upstream_authority,
            upstream_display: upstream.to_string(),
            state: Mutex::new(State::default()),
            client,
        });

        let (tx, rx) = oneshot::channel();
        let serve_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("aws-fault-proxy-{}", addr.port()))
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("aws-fault-proxy: tokio runtime");
                rt.block_on(serve(listener, serve_shared, rx));
                rt.shutdown_timeout(Duration::from_millis(200));
            })
            .expect("aws-fault-proxy: spawn thread");

        FaultProxy {
            addr,
            shared,
            shutdown: Some(tx),
            thread: Some(thread),
        }
    }

    /// The address the proxy listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`: the endpoint URL to give the SDK (`endpoint_url`, `AWS_ENDPOINT_URL`).
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn add(&self, pattern: &str, fault: Fault, remaining: Option<usize>) {
        self.shared.state().rules.push(Rule {
            pattern: pattern.to_string(),
            fault,
            remaining,
        });
    }

    /// The next `n` calls of `action` are answered with the service's throttling error instead
    /// of reaching moto: EC2 `RequestLimitExceeded` (HTTP 503, as EC2 sends it), IAM/STS/ELBv2
    /// `Throttling` (400), ECR `ThrottlingException` (400), EKS `ThrottlingException` (429).
    pub fn throttle(&self, action: &str, n: usize) {
        self.add(action, Fault::Throttle, Some(n));
    }

    /// The next `n` calls of `action` get HTTP 500 with the service's internal-error body
    /// (EC2 `InternalError`, IAM `ServiceFailure`, ECR/EKS `ServerException`).
    pub fn server_error(&self, action: &str, n: usize) {
        self.add(
            action,
            Fault::ServerError(StatusCode::INTERNAL_SERVER_ERROR),
            Some(n),
        );
    }

    /// The next `n` calls of `action` get HTTP 503 (EC2 `Unavailable`, IAM `ServiceUnavailable`,
    /// ECR/EKS `ServiceUnavailableException`).
    pub fn service_unavailable(&self, action: &str, n: usize) {
        self.add(
            action,
            Fault::ServerError(StatusCode::SERVICE_UNAVAILABLE),
            Some(n),
        );
    }

    /// The next `n` calls of `action` get exactly this response (e.g. a `DELETING` cluster).
    pub fn respond(
        &self,
        action: &str,
        n: usize,
        status: u16,
        content_type: &str,
        body: impl Into<Bytes>,
    ) {
        let status =
            StatusCode::from_u16(status).expect("aws-fault-proxy: respond: invalid HTTP status");
        self.add(
            action,
            Fault::Respond {
                status,
                content_type: content_type.to_string(),
                body: body.into(),
            },
            Some(n),
        );
    }

    /// Every call of `action` waits `dur` before it is handled, until [`clear_faults`](Self::clear_faults).
    pub fn delay(&self, action: &str, dur: Duration) {
        self.add(action, Fault::Delay(dur), None);
    }

    /// The next `n` calls of `action` wait `dur` before they are handled.
    pub fn delay_n(&self, action: &str, n: usize, dur: Duration) {
        self.add(action, Fault::Delay(dur), Some(n));
    }

    /// Calls of `action` wait (before any other fault) until [`release`](Self::release): a run
    /// can be stopped at a known point, e.g. while it holds a lock, for as long as a test needs.
    pub fn hold(&self, action: &str) {
        self.shared.held.send_modify(|h| h.push(action.to_string()));
    }

    /// Lets the calls of `action` held by [`hold`](Self::hold) go on, and the next ones through.
    pub fn release(&self, action: &str) {
        self.shared.held.send_modify(|h| h.retain(|p| p != action));
    }

    /// For the next `n` successful JSON responses of `action` (`DescribeCluster`,
    /// `DescribeNodegroup`, ...) whose `status` field is `from`, answer `to` instead: moto's
    /// clusters are `ACTIVE` at once, so `rewrite_status("DescribeCluster", 2, "ACTIVE",
    /// "CREATING")` makes a waiter poll three times. The field is looked up at the top level and
    /// one level down (`{"cluster": {"status": ...}}`).
    pub fn rewrite_status(&self, action: &str, n: usize, from: &str, to: &str) {
        self.add(
            action,
            Fault::RewriteStatus {
                from: from.to_string(),
                to: to.to_string(),
            },
            Some(n),
        );
    }

    /// Calls of `action` that reached the proxy, faulted or not (`"*"`: all of them).
    pub fn count(&self, action: &str) -> usize {
        self.shared
            .state()
            .received
            .iter()
            .filter(|c| c.matches(action))
            .count()
    }

    /// Calls of `action` that were forwarded to moto.
    pub fn forwarded(&self, action: &str) -> usize {
        self.shared
            .state()
            .forwarded
            .iter()
            .filter(|c| c.matches(action))
            .count()
    }

    /// Faults of any kind applied to calls of `action` (delays and rewrites included).
    pub fn injected(&self, action: &str) -> usize {
        self.shared
            .state()
            .injected
            .get(action)
            .copied()
            .unwrap_or(0)
    }

    /// Every request that reached the proxy.
    pub fn total_requests(&self) -> usize {
        self.shared.state().received.len()
    }

    /// Every call that reached the proxy, in order.
    pub fn calls(&self) -> Vec<Call> {
        self.shared.state().received.clone()
    }

    /// Forget the faults not yet used up; counts are kept.
    pub fn clear_faults(&self) {
        self.shared.state().rules.clear();
    }

    /// Forget the faults and the counts.
    pub fn reset(&self) {
        *self.shared.state() = State::default();
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl std::fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultProxy")
            .field("addr", &self.addr)
            .field("upstream", &self.shared.upstream_display)
            .finish()
    }
}

// ------------------------------------------------------------------ serving

async fn serve(listener: StdTcpListener, shared: Arc<Shared>, mut shutdown: oneshot::Receiver<()>) {
    let listener =
        tokio::net::TcpListener::from_std(listener).expect("aws-fault-proxy: tokio listener");
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let _ = stream.set_nodelay(true);
                let shared = shared.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| handle(shared.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .keep_alive(true)
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        }
    }
}

/// What to do with one call, decided under the lock.
enum Plan {
    Answer(Response<Full<Bytes>>),
    /// An add-on call, answered by [`addons`] (moto does not serve them).
    Simulate,
    Forward {
        rewrite: bool,
    },
}

async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return Ok(plain(
                StatusCode::BAD_REQUEST,
                format!("aws-fault-proxy: reading the request body: {e}"),
            ));
        }
    };
    let call = classify(&parts.method, &parts.uri, &parts.headers, &body);

    // Holds first, then delays, then the first live answering fault; the lock is never held
    // across an await.
    shared.state().received.push(call.clone());
    let mut held = shared.held.subscribe();
    if held.borrow().iter().any(|p| call.matches(p)) {
        eprintln!("aws-fault-proxy: {} held", call.action);
        let _ = held.wait_for(|h| !h.iter().any(|p| call.matches(p))).await;
    }
    let delay = {
        let mut st = shared.state();
        let mut delay = Duration::ZERO;
        for rule in st.rules.iter_mut() {
            if let Fault::Delay(d) = rule.fault
                && rule.live()
                && call.matches(&rule.pattern)
            {
                rule.use_once();
                delay += d;
            }
        }
        if !delay.is_zero() {
            *st.injected.entry(call.action.clone()).or_default() += 1;
        }
        delay
    };
    if !delay.is_zero() {
        eprintln!("aws-fault-proxy: {} delayed {:?}", call.action, delay);
        tokio::time::sleep(delay).await;
    }

    let plan = {
        let mut st = shared.state();
        let answer = st.rules.iter_mut().find(|r| {
            r.live()
                && call.matches(&r.pattern)
                && matches!(
                    r.fault,
                    Fault::Throttle | Fault::ServerError(_) | Fault::Respond { .. }
                )
        });
        match answer {
            Some(rule) => {
                rule.use_once();
                let fault = rule.fault.clone();
                *st.injected.entry(call.action.clone()).or_default() += 1;
                let request_id = format!("aws-fault-proxy-{}", st.received.len());
                Plan::Answer(injected_response(&call, &fault, &request_id))
            }
            None if call.service == "eks" && addons::ACTIONS.contains(&call.action.as_str()) => {
                Plan::Simulate
            }
            None => {
                st.forwarded.push(call.clone());
                let rewrite = st.rules.iter().any(|r| {
                    r.live()
                        && call.matches(&r.pattern)
                        && matches!(r.fault, Fault::RewriteStatus { .. })
                });
                Plan::Forward { rewrite }
            }
        }
    };

    let rewrite = match plan {
        Plan::Answer(resp) => {
            eprintln!(
                "aws-fault-proxy: {} answered {} by the proxy",
                call.action,
                resp.status()
            );
            return Ok(resp);
        }
        Plan::Simulate => {
            let resp = addons::answer(
                &shared,
                &call.action,
                parts.uri.path(),
                &parts.headers,
                &body,
            )
            .await;
            eprintln!(
                "aws-fault-proxy: {} answered {} by the add-on simulation",
                call.action,
                resp.status()
            );
            return Ok(resp);
        }
        Plan::Forward { rewrite } => rewrite,
    };

    let resp = match forward(&shared, parts.method, &parts.uri, parts.headers, body).await {
        Ok(r) => r,
        Err(e) => {
            return Ok(plain(
                StatusCode::BAD_GATEWAY,
                format!(
                    "aws-fault-proxy: upstream {} failed: {e}",
                    shared.upstream_display
                ),
            ));
        }
    };
    if rewrite && resp.status().is_success() {
        return Ok(apply_rewrite(&shared, &call, resp));
    }
    Ok(resp)
}

const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

async fn forward(
    shared: &Shared,
    method: Method,
    uri: &Uri,
    mut headers: HeaderMap,
    body: Bytes,
) -> Result<Response<Full<Bytes>>, String> {
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let target: Uri = format!("http://{}{}", shared.upstream_authority, path)
        .parse()
        .map_err(|e| format!("bad upstream URI: {e}"))?;
    strip_hop_by_hop(&mut headers);
    // The body is forwarded whole, so its length is exact (a chunked request arrives unchunked).
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    let mut req = Request::builder().method(method).uri(target);
    // `Host` and `Authorization` pass unchanged: the signature still verifies.
    *req.headers_mut().expect("builder has no error yet") = headers;
    let req = req.body(Full::new(body)).map_err(|e| e.to_string())?;
    let resp = shared
        .client
        .request(req)
        .await
        .map_err(|e| format!("{e:?}"))?;
    let (mut parts, body) = resp.into_parts();
    let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    strip_hop_by_hop(&mut parts.headers);
    parts
        .headers
        .insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    Ok(Response::from_parts(parts, Full::new(body)))
}

fn apply_rewrite(
    shared: &Shared,
    call: &Call,
    resp: Response<Full<Bytes>>,
) -> Response<Full<Bytes>> {
    let (mut parts, body) = resp.into_parts();
    // Full<Bytes> resolves at once; take its bytes without a runtime round trip.
    let bytes = full_bytes(body);
    let Ok(mut json) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
        return Response::from_parts(parts, Full::new(bytes));
    };
    let mut st = shared.state();
    let mut applied = None;
    for rule in st.rules.iter_mut() {
        if !(rule.live() && call.matches(&rule.pattern)) {
            continue;
        }
        if let Fault::RewriteStatus { from, to } = &rule.fault {
            let (from, to) = (from.clone(), to.clone());
            if replace_status(&mut json, &from, &to) {
                rule.use_once();
                applied = Some((from, to));
                break;
            }
        }
    }
    let Some((from, to)) = applied else {
        return Response::from_parts(parts, Full::new(bytes));
    };
    *st.injected.entry(call.action.clone()).or_default() += 1;
    drop(st);
    eprintln!(
        "aws-fault-proxy: {} status {from} rewritten to {to}",
        call.action
    );
    let new_body = Bytes::from(serde_json::to_vec(&json).expect("JSON value serializes"));
    parts
        .headers
        .insert(header::CONTENT_LENGTH, HeaderValue::from(new_body.len()));
    Response::from_parts(parts, Full::new(new_body))
}

fn full_bytes(body: Full<Bytes>) -> Bytes {
    use std::future::Future;
    use std::pin::pin;
    use std::task::{Context, Poll, Waker};
    let mut fut = pin!(body.collect());
    match fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(Ok(collected)) => collected.to_bytes(),
        Poll::Ready(Err(never)) => match never {},
        Poll::Pending => unreachable!("Full<Bytes> is always ready"),
    }
}

/// Replace `"status": from` with `to` at the top level or one level down. True when replaced.
fn replace_status(json: &mut serde_json::Value, from: &str, to: &str) -> bool {
    fn here(obj: &mut serde_json::Map<String, serde_json::Value>, from: &str, to: &str) -> bool {
        match obj.get_mut("status") {
            Some(v) if v.as_str() == Some(from) => {
                *v = serde_json::Value::String(to.to_string());
                true
            }
            _ => false,
        }
    }
    let Some(top) = json.as_object_mut() else {
        return false;
    };
    let mut done = here(top, from, to);
    for value in top.values_mut() {
        if let Some(inner) = value.as_object_mut() {
            done |= here(inner, from, to);
        }
    }
    done
}

// ------------------------------------------------------------------ classification

/// Work out service, action and protocol of a request.
pub fn classify(method: &Method, uri: &Uri, headers: &HeaderMap, body: &[u8]) -> Call {
    let scope_service = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(service_from_authorization);

    if let Some(target) = headers.get("x-amz-target").and_then(|v| v.to_str().ok()) {
        let (prefix, action) = target.rsplit_once('.').unwrap_or(("", target));
        let service =
            scope_service.unwrap_or_else(|| service_from_target_prefix(prefix).to_string());
        return Call {
            service,
            action: action.to_string(),
            protocol: Protocol::AwsJson,
        };
    }

    let is_form = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.contains("x-www-form-urlencoded"));
    let mut action = None;
    let mut version = None;
    let query_pairs = uri
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()))
        .into_iter()
        .flatten();
    let body_pairs = is_form
        .then(|| form_urlencoded::parse(body))
        .into_iter()
        .flatten();
    for (k, v) in query_pairs.chain(body_pairs) {
        match &*k {
            "Action" => action = Some(v.into_owned()),
            "Version" => version = Some(v.into_owned()),
            _ => {}
        }
    }
    if let Some(action) = action {
        let service = scope_service.unwrap_or_else(|| {
            match version.as_deref() {
                Some("2016-11-15") => "ec2",
                Some("2010-05-08") => "iam",
                Some("2011-06-15") => "sts",
                Some("2015-12-01") => "elasticloadbalancing",
                _ => "",
            }
            .to_string()
        });
        let protocol = if service == "ec2" || version.as_deref() == Some("2016-11-15") {
            Protocol::Ec2Query
        } else {
            Protocol::AwsQuery
        };
        return Call {
            service,
            action,
            protocol,
        };
    }

    let path = uri.path();
    let service = scope_service.unwrap_or_else(|| {
        if path == "/clusters" || path.starts_with("/clusters/") || path.starts_with("/addons/") {
            "eks".to_string()
        } else {
            String::new()
        }
    });
    let action = if service == "eks" {
        eks_action(method, path)
    } else {
        None
    }
    .map(str::to_string)
    .unwrap_or_else(|| format!("{method} {path}"));
    Call {
        service,
        action,
        protocol: Protocol::RestJson,
    }
}

/// `AWS4-HMAC-SHA256 Credential=AKID/20240101/us-east-1/eks/aws4_request, ...` → `eks`
fn service_from_authorization(auth: &str) -> Option<String> {
    let cred = auth.split("Credential=").nth(1)?;
    let cred = cred.split([',', ' ']).next()?;
    let mut parts = cred.split('/');
    let (_akid, _date, _region, service) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    Some(service.to_string())
}

fn service_from_target_prefix(prefix: &str) -> &'static str {
    if prefix.starts_with("AmazonEC2ContainerRegistry") {
        "ecr"
    } else {
        ""
    }
}

fn eks_action(method: &Method, path: &str) -> Option<&'static str> {
    let segs: Vec<&str> = path
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    let m = method.as_str();
    Some(match (segs.as_slice(), m) {
        (["clusters"], "POST") => "CreateCluster",
        (["clusters"], "GET") => "ListClusters",
        (["clusters", _], "GET") => "DescribeCluster",
        (["clusters", _], "DELETE") => "DeleteCluster",
        (["clusters", _, "update-config"], "POST") => "UpdateClusterConfig",
        (["clusters", _, "updates"], "POST") => "UpdateClusterVersion",
        (["clusters", _, "updates"], "GET") => "ListUpdates",
        (["clusters", _, "updates", _], "GET") => "DescribeUpdate",
        (["clusters", _, "node-groups"], "POST") => "CreateNodegroup",
        (["clusters", _, "node-groups"], "GET") => "ListNodegroups",
        (["clusters", _, "node-groups", _], "GET") => "DescribeNodegroup",
        (["clusters", _, "node-groups", _], "DELETE") => "DeleteNodegroup",
        (["clusters", _, "node-groups", _, "update-config"], "POST") => "UpdateNodegroupConfig",
        (["clusters", _, "node-groups", _, "update-version"], "POST") => "UpdateNodegroupVersion",
        (["clusters", _, "addons"], "POST") => "CreateAddon",
        (["clusters", _, "addons"], "GET") => "ListAddons",
        (["clusters", _, "addons", _], "GET") => "DescribeAddon",
        (["clusters", _, "addons", _], "DELETE") => "DeleteAddon",
        (["clusters", _, "addons", _, "update"], "POST") => "UpdateAddon",
        (["clusters", _, "fargate-profiles"], "POST") => "CreateFargateProfile",
        (["clusters", _, "fargate-profiles"], "GET") => "ListFargateProfiles",
        (["clusters", _, "fargate-profiles", _], "GET") => "DescribeFargateProfile",
        (["clusters", _, "fargate-profiles", _], "DELETE") => "DeleteFargateProfile",
        (["clusters", _, "access-entries"], "POST") => "CreateAccessEntry",
        (["clusters", _, "access-entries"], "GET") => "ListAccessEntries",
        (["clusters", _, "access-entries", _], "GET") => "DescribeAccessEntry",
        (["clusters", _, "access-entries", _], "POST") => "UpdateAccessEntry",
        (["clusters", _, "access-entries", _], "DELETE") => "DeleteAccessEntry",
        (["addons", "supported-versions"], "GET") => "DescribeAddonVersions",
        (["tags", ..], "GET") => "ListTagsForResource",
        (["tags", ..], "POST") => "TagResource",
        (["tags", ..], "DELETE") => "UntagResource",
        _ => return None,
    })
}

// ------------------------------------------------------------------ injected responses

fn injected_response(call: &Call, fault: &Fault, request_id: &str) -> Response<Full<Bytes>> {
    match fault {
        Fault::Respond {
            status,
            content_type,
            body,
        } => Response::builder()
            .status(*status)
            .header(header::CONTENT_TYPE, content_type.as_str())
            .header("x-amzn-requestid", request_id)
            .body(Full::new(body.clone()))
            .expect("valid response"),
        Fault::Throttle => aws_error(call, ErrorKind::Throttle, request_id),
        Fault::ServerError(s) if *s == StatusCode::SERVICE_UNAVAILABLE => {
            aws_error(call, ErrorKind::Unavailable, request_id)
        }
        Fault::ServerError(_) => aws_error(call, ErrorKind::Internal, request_id),
        Fault::Delay(_) | Fault::RewriteStatus { .. } => unreachable!("not an answering fault"),
    }
}

#[derive(Clone, Copy)]
enum ErrorKind {
    Throttle,
    Internal,
    Unavailable,
}

fn aws_error(call: &Call, kind: ErrorKind, request_id: &str) -> Response<Full<Bytes>> {
    use ErrorKind::*;
    let (status, code, message, content_type, body) = match call.protocol {
        Protocol::Ec2Query => {
            let (status, code, message) = match kind {
                Throttle => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "RequestLimitExceeded",
                    "Request limit exceeded.",
                ),
                Internal => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "InternalError",
                    "An internal error has occurred.",
                ),
                Unavailable => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "Unavailable",
                    "The server is overloaded and can't handle the request.",
                ),
            };
            let body = format!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>{code}</Code>\
                 <Message>{message}</Message></Error></Errors><RequestID>{request_id}</RequestID></Response>"
            );
            (status, code, message, "text/xml;charset=UTF-8", body)
        }
        Protocol::AwsQuery => {
            let (status, kind_type, code, message) = match kind {
                Throttle => (
                    StatusCode::BAD_REQUEST,
                    "Sender",
                    "Throttling",
                    "Rate exceeded",
                ),
                Internal => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "Receiver",
                    "ServiceFailure",
                    "Internal failure.",
                ),
                Unavailable => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "Receiver",
                    "ServiceUnavailable",
                    "Service is unavailable.",
                ),
            };
            let body = format!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<ErrorResponse><Error><Type>{kind_type}</Type>\
                 <Code>{code}</Code><Message>{message}</Message></Error><RequestId>{request_id}</RequestId></ErrorResponse>"
            );
            (status, code, message, "text/xml", body)
        }
        Protocol::AwsJson | Protocol::RestJson => {
            let (status, code, message) = match (call.protocol, kind) {
                (Protocol::RestJson, Throttle) => (
                    StatusCode::TOO_MANY_REQUESTS,
                    "ThrottlingException",
                    "Rate exceeded",
                ),
                (_, Throttle) => (
                    StatusCode::BAD_REQUEST,
                    "ThrottlingException",
                    "Rate exceeded",
                ),
                (_, Internal) => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "ServerException",
                    "Internal server error.",
                ),
                (_, Unavailable) => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "ServiceUnavailableException",
                    "Service unavailable.",
                ),
            };
            let body = serde_json::json!({ "__type": code, "message": message }).to_string();
            let ct = if call.protocol == Protocol::AwsJson {
                "application/x-amz-json-1.1"
            } else {
                "application/json"
            };
            (status, code, message, ct, body)
        }
    };
    let _ = message;
    json_error(status, code, content_type, body, request_id)
}

/// An error response with its code in `x-amzn-ErrorType` (how the SDKs read REST-JSON errors).
fn json_error(
    status: StatusCode,
    code: &str,
    content_type: &str,
    body: String,
    request_id: &str,
) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .header(HeaderName::from_static("x-amzn-errortype"), code)
        .header(HeaderName::from_static("x-amzn-requestid"), request_id)
        .body(Full::new(Bytes::from(body)))
        .expect("valid response")
}

fn plain(status: StatusCode, text: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from(text)))
        .expect("valid response")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: &str, uri: &str, headers: &[(&str, &str)], body: &str) -> Call {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.insert(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        classify(
            &method.parse().unwrap(),
            &uri.parse().unwrap(),
            &map,
            body.as_bytes(),
        )
    }

    const EKS_AUTH: &str = "AWS4-HMAC-SHA256 Credential=testing/20260101/us-east-1/eks/aws4_request, SignedHeaders=host, Signature=00";

    #[test]
    fn classifies_the_three_protocols() {
        let ec2 = req(
            "POST",
            "/",
            &[(
                "content-type",
                "application/x-www-form-urlencoded; charset=utf-8",
            )],
            "Action=DescribeVpcs&Version=2016-11-15",
        );
        assert_eq!(
            (ec2.service.as_str(), ec2.action.as_str(), ec2.protocol),
            ("ec2", "DescribeVpcs", Protocol::Ec2Query)
        );

        let iam = req(
            "POST",
            "/",
            &[("content-type", "application/x-www-form-urlencoded")],
            "Action=GetRole&Version=2010-05-08",
        );
        assert_eq!(
            (iam.service.as_str(), iam.protocol),
            ("iam", Protocol::AwsQuery)
        );

        let ecr = req(
            "POST",
            "/",
            &[(
                "x-amz-target",
                "AmazonEC2ContainerRegistry_V20150921.CreateRepository",
            )],
            "{}",
        );
        assert_eq!(
            (ecr.service.as_str(), ecr.action.as_str(), ecr.protocol),
            ("ecr", "CreateRepository", Protocol::AwsJson)
        );

        let eks = req(
            "GET",
            "/clusters/demo/node-groups/ng-1",
            &[("authorization", EKS_AUTH)],
            "",
        );
        assert_eq!(
            (eks.service.as_str(), eks.action.as_str(), eks.protocol),
            ("eks", "DescribeNodegroup", Protocol::RestJson)
        );

        let other = req("GET", "/moto-api/", &[], "");
        assert_eq!(other.action, "GET /moto-api/");
    }

    #[test]
    fn patterns_match_bare_qualified_and_wildcard() {
        let c = req("GET", "/clusters/demo", &[("authorization", EKS_AUTH)], "");
        assert!(c.matches("DescribeCluster"));
        assert!(c.matches("eks:DescribeCluster"));
        assert!(c.matches("*"));
        assert!(!c.matches("ecr:DescribeCluster"));
        assert!(!c.matches("DescribeNodegroup"));
    }

    #[test]
    fn status_is_replaced_one_level_down_only_when_it_matches() {
        let mut v = serde_json::json!({"cluster": {"name": "a", "status": "ACTIVE"}});
        assert!(replace_status(&mut v, "ACTIVE", "CREATING"));
        assert_eq!(v["cluster"]["status"], "CREATING");
        assert!(!replace_status(&mut v, "ACTIVE", "CREATING"));
    }
}
