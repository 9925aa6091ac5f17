//! Calling AWS: per-service client-side rate limits, error classification
//! (one line with the AWS code and message), and bounded retry loops for
//! conditions the SDK does not retry (`DependencyViolation`, IAM propagation).
//!
//! Throttling (`RequestLimitExceeded`, `Throttling*`, 429) and 5xx answers are
//! retried by the SDK's standard retry strategy (exponential backoff with
//! jitter), configured in [`super::AwsProvider::with_config`].

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use aws_sdk_ec2::config::http::HttpResponse;
use aws_sdk_ec2::error::{ProvideErrorMetadata, SdkError};

use crate::resource::{Address, ProviderId};

use super::super::ProviderError;

/// An AWS service mesh calls; each has its own rate limit and call counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Service {
    Ec2,
    Eks,
    Ecr,
    Iam,
    Elbv2,
    Sts,
    /// The stacks' lock table.
    DynamoDb,
}

impl Service {
    pub const ALL: [Service; 7] = [
        Service::Ec2,
        Service::Eks,
        Service::Ecr,
        Service::Iam,
        Service::Elbv2,
        Service::Sts,
        Service::DynamoDb,
    ];

    fn index(self) -> usize {
        match self {
            Service::Ec2 => 0,
            Service::Eks => 1,
            Service::Ecr => 2,
            Service::Iam => 3,
            Service::Elbv2 => 4,
            Service::Sts => 5,
            Service::DynamoDb => 6,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Service::Ec2 => "ec2",
            Service::Eks => "eks",
            Service::Ecr => "ecr",
            Service::Iam => "iam",
            Service::Elbv2 => "elbv2",
            Service::Sts => "sts",
            Service::DynamoDb => "dynamodb",
        }
    }
}

/// Requests per second and burst for one service's token bucket.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RateLimit {
    pub per_second: f64,
    pub burst: u32,
}

/// Client-side rate limits per service, kept below the account's API limits
/// so a big apply is not throttled into its retry budget.
#[derive(Clone, Debug, PartialEq)]
pub struct RateLimits {
    pub ec2: RateLimit,
    pub eks: RateLimit,
    pub ecr: RateLimit,
    pub iam: RateLimit,
    pub elbv2: RateLimit,
    pub sts: RateLimit,
    pub dynamodb: RateLimit,
}

impl Default for RateLimits {
    fn default() -> Self {
        // Steady rates below the account's API limits (EC2 describe ~20/s
        // per action, EKS ~10/s, ECR ~20/s per action, IAM ~10/s); the
        // bursts let one plan's reads go out at once (ECR needs two calls
        // per repository).
        RateLimits {
            ec2: RateLimit {
                per_second: 20.0,
                burst: 40,
            },
            eks: RateLimit {
                per_second: 8.0,
                burst: 16,
            },
            ecr: RateLimit {
                per_second: 20.0,
                burst: 60,
            },
            iam: RateLimit {
                per_second: 8.0,
                burst: 16,
            },
            elbv2: RateLimit {
                per_second: 8.0,
                burst: 16,
            },
            sts: RateLimit {
                per_second: 8.0,
                burst: 16,
            },
            dynamodb: RateLimit {
                per_second: 10.0,
                burst: 20,
            },
        }
    }
}

impl RateLimits {
    fn get(&self, s: Service) -> RateLimit {
        match s {
            Service::Ec2 => self.ec2,
            Service::Eks => self.eks,
            Service::Ecr => self.ecr,
            Service::Iam => self.iam,
            Service::Elbv2 => self.elbv2,
            Service::Sts => self.sts,
            Service::DynamoDb => self.dynamodb,
        }
    }
}

/// A token bucket. Waiters queue on the (FIFO) mutex, so they are served in order.
pub struct TokenBucket {
    limit: RateLimit,
    state: tokio::sync::Mutex<(f64, Instant)>,
}

impl TokenBucket {
    pub fn new(limit: RateLimit) -> Self {
        let burst = f64::from(limit.burst.max(1));
        TokenBucket {
            limit,
            state: tokio::sync::Mutex::new((burst, Instant::now())),
        }
    }

    /// Waits until a request may be sent.
    pub async fn acquire(&self) {
        if self.limit.per_second <= 0.0 {
            return;
        }
        let burst = f64::from(self.limit.burst.max(1));
        let mut state = self.state.lock().await;
        let now = Instant::now();
        let refill = now.duration_since(state.1).as_secs_f64() * self.limit.per_second;
        state.0 = (state.0 + refill).min(burst);
        state.1 = now;
        if state.0 < 1.0 {
            let wait = (1.0 - state.0) / self.limit.per_second;
            tokio::time::sleep(Duration::from_secs_f64(wait)).await;
            state.0 = 1.0;
            state.1 = Instant::now();
        }
        state.0 -= 1.0;
    }
}

/// Rate limiters and call counters for every service.
pub struct Limiter {
    buckets: Vec<TokenBucket>,
    calls: Vec<AtomicU64>,
}

impl Limiter {
    pub fn new(limits: &RateLimits) -> Self {
        Limiter {
            buckets: Service::ALL
                .iter()
                .map(|s| TokenBucket::new(limits.get(*s)))
                .collect(),
            calls: Service::ALL.iter().map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Waits for the service's rate limit, counts the call, then runs it and
    /// classifies a failure.
    pub async fn call<T, E, F>(
        &self,
        service: Service,
        op: &'static str,
        fut: F,
    ) -> Result<T, AwsError>
    where
        F: Future<Output = Result<T, SdkError<E, HttpResponse>>>,
        E: ProvideErrorMetadata + StdError + Send + Sync + 'static,
    {
        self.buckets[service.index()].acquire().await;
        self.calls[service.index()].fetch_add(1, Ordering::Relaxed);
        fut.await.map_err(|e| classify(op, e))
    }

    /// Every page of a listing, each request through [`Limiter::call`]:
    /// `request` sends the request for one page given the previous page's
    /// continuation token (or marker; `None` first), `split` parts an answer
    /// into its items and the next token (see [`paginate`]).
    pub async fn pages<T, O, E, F, Fut>(
        &self,
        service: Service,
        op: &'static str,
        request: F,
        split: impl Fn(O) -> (Vec<T>, Option<String>),
    ) -> Result<Vec<T>, AwsError>
    where
        F: Fn(Option<String>) -> Fut,
        Fut: Future<Output = Result<O, SdkError<E, HttpResponse>>>,
        E: ProvideErrorMetadata + StdError + Send + Sync + 'static,
    {
        // The request is sent from inside the page's future, so that future
        // holds the (large) SDK future once, not twice.
        let (request, split) = (&request, &split);
        paginate(|token| async move { self.call(service, op, request(token)).await.map(split) })
            .await
    }

    /// API calls made so far (logical calls, SDK retries not included), per service.
    pub fn counts(&self) -> Vec<(Service, u64)> {
        Service::ALL
            .iter()
            .map(|s| (*s, self.calls[s.index()].load(Ordering::Relaxed)))
            .collect()
    }
}

/// What kind of failure an AWS call ended in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The service answered with an error.
    Service,
    /// No credentials could be found or loaded.
    Credentials,
    /// The endpoint could not be reached (DNS, refused, TLS, timeout).
    Unreachable,
    /// Anything else (a malformed request or response).
    Other,
}

/// A failed AWS call, already reduced to one line for people.
#[derive(Clone, Debug)]
pub struct AwsError {
    pub kind: ErrorKind,
    /// The AWS error code (`InvalidVpcID.NotFound`, `ThrottlingException`...).
    pub code: Option<String>,
    /// HTTP status, when a response came back.
    pub status: Option<u16>,
    /// One line: operation, code and the AWS message, plus a hint where useful.
    pub message: String,
}

impl AwsError {
    pub fn is(&self, code: &str) -> bool {
        self.code.as_deref() == Some(code)
    }

    /// A `*NotFound*` answer (the resource is already gone).
    pub fn is_not_found(&self) -> bool {
        self.code
            .as_deref()
            .is_some_and(|c| c.contains("NotFound") || c == "NoSuchEntity")
    }

    /// The error for a change of `address`.
    pub fn at(self, address: &Address) -> ProviderError {
        ProviderError::Api {
            address: address.clone(),
            message: self.message,
        }
    }

    /// The error while reading live state.
    pub fn observing(self) -> ProviderError {
        ProviderError::Observe {
            provider: ProviderId::Aws,
            message: self.message,
        }
    }
}

impl fmt::Display for AwsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// Codes that mean the credentials are wrong, expired or lack permission.
const AUTH_CODES: &[&str] = &[
    "AuthFailure",
    "UnrecognizedClientException",
    "InvalidClientTokenId",
    "SignatureDoesNotMatch",
    "InvalidAccessKeyId",
    "InvalidSignatureException",
    "ExpiredToken",
    "ExpiredTokenException",
    "IncompleteSignature",
    "MissingAuthenticationToken",
];
const PERMISSION_CODES: &[&str] = &[
    "AccessDenied",
    "AccessDeniedException",
    "UnauthorizedOperation",
];

/// Reduces an SDK error to one line: `Op: Code: message (hint)`.
pub fn classify<E>(op: &str, err: SdkError<E, HttpResponse>) -> AwsError
where
    E: ProvideErrorMetadata + StdError + Send + Sync + 'static,
{
    let status = err.raw_response().map(|r| r.status().as_u16());
    match &err {
        SdkError::ServiceError(_) => {
            let code = err.code().map(str::to_owned);
            let msg = one_line(err.message().unwrap_or(""));
            let message = match code.as_deref() {
                Some(c) if AUTH_CODES.contains(&c) => format!(
                    "{op}: {c}: {msg} (the AWS credentials were rejected: check AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)"
                ),
                Some(c) if PERMISSION_CODES.contains(&c) => {
                    format!("{op}: {c}: {msg} (the AWS identity lacks this permission)")
                }
                Some(c) if msg.is_empty() => format!("{op}: {c}"),
                Some(c) => format!("{op}: {c}: {msg}"),
                None => match status {
                    Some(404) => {
                        format!("{op}: HTTP 404: the endpoint does not implement this operation")
                    }
                    Some(s) => format!("{op}: HTTP {s} without an AWS error code"),
                    None => format!("{op}: the service answered with an error"),
                },
            };
            AwsError {
                kind: ErrorKind::Service,
                code,
                status,
                message,
            }
        }
        SdkError::TimeoutError(_) => AwsError {
            kind: ErrorKind::Unreachable,
            code: None,
            status,
            message: format!("{op}: timed out waiting for the AWS endpoint"),
        },
        _ => {
            let chain = error_chain(&err);
            let lower = chain.to_lowercase();
            let credentials = lower.contains("credential") || lower.contains("identity");
            let dispatch = matches!(err, SdkError::DispatchFailure(_));
            if credentials {
                AwsError {
                    kind: ErrorKind::Credentials,
                    code: None,
                    status,
                    message: format!(
                        "{op}: no usable AWS credentials ({}): set AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or log in with `aws sso login`",
                        short_cause(&root_cause(&err))
                    ),
                }
            } else if dispatch {
                AwsError {
                    kind: ErrorKind::Unreachable,
                    code: None,
                    status,
                    message: format!("{op}: cannot reach the AWS endpoint: {}", root_cause(&err)),
                }
            } else {
                AwsError {
                    kind: ErrorKind::Other,
                    code: None,
                    status,
                    message: format!("{op}: {}", one_line(&chain)),
                }
            }
        }
    }
}

fn error_chain(err: &(dyn StdError + 'static)) -> String {
    let mut parts = vec![err.to_string()];
    let mut cur = err.source();
    while let Some(e) = cur {
        let s = e.to_string();
        if parts.last() != Some(&s) {
            parts.push(s);
        }
        cur = e.source();
    }
    parts.join(": ")
}

fn root_cause(err: &(dyn StdError + 'static)) -> String {
    let mut cur: &(dyn StdError + 'static) = err;
    while let Some(next) = cur.source() {
        cur = next;
    }
    one_line(&cur.to_string())
}

/// The credential chain lists every provider it tried; keep the verdict.
fn short_cause(cause: &str) -> &str {
    cause
        .split_once(". Attempted")
        .map(|(head, _)| head)
        .unwrap_or(cause)
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Collects every page of a paginated call. `page` sends one request (through
/// the limiter) for the given continuation token and returns that page's
/// items and the next token; an absent or empty token ends the listing.
pub async fn paginate<T, F, Fut>(mut page: F) -> Result<Vec<T>, AwsError>
where
    F: FnMut(Option<String>) -> Fut,
    Fut: Future<Output = Result<(Vec<T>, Option<String>), AwsError>>,
{
    let mut out = Vec::new();
    let mut token = None;
    loop {
        let (items, next) = page(token.take()).await?;
        out.extend(items);
        match next {
            Some(t) if !t.is_empty() => token = Some(t),
            _ => return Ok(out),
        }
    }
}

/// Exponential backoff with full jitter: `base * 2^attempt`, capped, times a
/// random factor in [0.5, 1.0].
pub fn backoff(attempt: u32, base: Duration, cap: Duration) -> Duration {
    let exp = base.saturating_mul(1u32 << attempt.min(16));
    let capped = exp.min(cap);
    capped.mul_f64(0.5 + fastrand::f64() * 0.5)
}

/// Retries `f` while `retryable` says so, with backoff, for at most `budget`.
/// `on_retry` runs before each retry (e.g. to clean up what blocks a delete).
pub async fn retry_for<T, F, Fut, P, R, RFut>(
    budget: Duration,
    base: Duration,
    retryable: P,
    mut on_retry: R,
    mut f: F,
) -> Result<T, AwsError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, AwsError>>,
    P: Fn(&AwsError) -> bool,
    R: FnMut(u32) -> RFut,
    RFut: Future<Output = ()>,
{
    let started = Instant::now();
    let mut attempt = 0u32;
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if retryable(&e) && started.elapsed() < budget => {
                on_retry(attempt).await;
                let wait = backoff(attempt, base, Duration::from_secs(15));
                tokio::time::sleep(wait).await;
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

/// A delete that found the resource already gone succeeded.
pub(super) fn gone_ok<T>(res: Result<T, AwsError>, a: &Address) -> Result<(), ProviderError> {
    match res {
        Ok(_) => Ok(()),
        Err(e) if e.is_not_found() => Ok(()),
        Err(e) => Err(e.at(a)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let base = Duration::from_millis(100);
        let cap = Duration::from_secs(2);
        for attempt in 0..20 {
            let d = backoff(attempt, base, cap);
            assert!(d <= cap, "{d:?}");
            let full = base.saturating_mul(1u32 << attempt.min(16)).min(cap);
            assert!(d >= full.mul_f64(0.5), "{d:?} < half of {full:?}");
        }
    }

    #[tokio::test]
    async fn paginate_follows_tokens_until_absent_or_empty() {
        for last in [None, Some(String::new())] {
            let mut seen = Vec::new();
            let items = paginate(|token: Option<String>| {
                seen.push(token.clone());
                let last = last.clone();
                async move {
                    Ok(match token.as_deref() {
                        None => (vec![1, 2], Some("a".to_owned())),
                        Some("a") => (vec![], Some("b".to_owned())),
                        _ => (vec![3], last),
                    })
                }
            })
            .await
            .unwrap();
            assert_eq!(items, [1, 2, 3]);
            assert_eq!(seen, [None, Some("a".to_owned()), Some("b".to_owned())]);
        }
    }

    #[tokio::test]
    async fn token_bucket_limits_the_rate() {
        let bucket = TokenBucket::new(RateLimit {
            per_second: 50.0,
            burst: 5,
        });
        let started = Instant::now();
        for _ in 0..15 {
            bucket.acquire().await;
        }
        // 5 from the burst, 10 more at 50/s take at least ~200 ms.
        assert!(
            started.elapsed() >= Duration::from_millis(180),
            "{:?}",
            started.elapsed()
        );
    }
}
