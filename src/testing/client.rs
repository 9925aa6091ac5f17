//! Sends test queries: a small HTTP/1.1 client over tokio's TCP (`http://`,
//! or `https://` with rustls: a local exposure's own certificate, else the
//! Mozilla roots), run with bounded parallelism and given up on Ctrl-C.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::Answer;

/// Why a request got no answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("`{0}` is not an http:// or https:// URL")]
    Url(String),
    #[error("cannot trust {url}: {reason}")]
    Tls { url: String, reason: String },
    #[error("cannot reach {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no answer from {url} within {within} (--timeout)")]
    Timeout { url: String, within: String },
    #[error("{url} answered something that is not HTTP: {reason}")]
    Malformed { url: String, reason: String },
    #[error("interrupted before {url} answered")]
    Interrupted { url: String },
}

/// One request to send.
pub struct Request {
    /// Reported under this id.
    pub id: String,
    pub url: String,
    pub body: Value,
    /// Sent as `X-API-Key`.
    pub api_key: Option<String>,
    /// Sent as `X-Mesh-Generation`: the generation that must answer.
    pub generation: Option<String>,
    /// For an `https://` URL: the certificate trusted (a local exposure's,
    /// see `mesh output`); none: the Mozilla roots.
    pub ca_file: Option<std::path::PathBuf>,
}

/// POSTs `body` as JSON to `url`; the status and (JSON) body of the answer.
pub async fn post_json(
    url: &str,
    body: &Value,
    api_key: Option<&str>,
    generation: Option<&str>,
    ca_file: Option<&std::path::Path>,
    timeout: Duration,
) -> Result<Answer, ClientError> {
    let (rest, tls) = match (url.strip_prefix("http://"), url.strip_prefix("https://")) {
        (Some(rest), _) => (rest, None),
        (_, Some(rest)) => {
            let trusted: Vec<&std::path::Path> = ca_file.into_iter().collect();
            let config =
                mesh_runtime::tls::client_config(&trusted).map_err(|reason| ClientError::Tls {
                    url: url.to_owned(),
                    reason,
                })?;
            (rest, Some(Arc::new(config)))
        }
        _ => return Err(ClientError::Url(url.to_owned())),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let host_port = if authority.contains(':') {
        authority.to_owned()
    } else if tls.is_some() {
        format!("{authority}:443")
    } else {
        format!("{authority}:80")
    };
    // Through a proxy the request names the whole URL (plain HTTP only).
    let (connect_to, target) = match proxy_for(&host_port).filter(|_| tls.is_none()) {
        Some(proxy) => (proxy, url.to_owned()),
        None => (host_port, path.to_owned()),
    };
    let started = Instant::now();
    let exchange = async {
        let tcp = tokio::net::TcpStream::connect(&connect_to)
            .await
            .map_err(|source| ClientError::Connect {
                url: url.to_owned(),
                source,
            })?;
        let payload = body.to_string();
        let mut key = api_key
            .map(|k| format!("X-API-Key: {k}\r\n"))
            .unwrap_or_default();
        if let Some(g) = generation {
            key.push_str(&format!("X-Mesh-Generation: {g}\r\n"));
        }
        let head = format!(
            "POST {target} HTTP/1.1\r\nHost: {authority}\r\nContent-Type: application/json\r\nAccept: application/json\r\n{key}Content-Length: {}\r\nConnection: close\r\n\r\n",
            payload.len()
        );
        let io = |source| ClientError::Connect {
            url: url.to_owned(),
            source,
        };
        let request = format!("{head}{payload}");
        let buf = match tls {
            None => round_trip(tcp, &request).await,
            Some(config) => {
                let host = authority.rsplit_once(':').map_or(authority, |(h, _)| h);
                let s = mesh_runtime::tls::connect(config, host, tcp)
                    .await
                    .map_err(io)?;
                round_trip(s, &request).await
            }
        }
        .map_err(io)?;
        parse_response(&buf).map_err(|reason| ClientError::Malformed {
            url: url.to_owned(),
            reason,
        })
    };
    let (status, body) = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| ClientError::Timeout {
            url: url.to_owned(),
            within: crate::stack::duration_text(timeout),
        })??;
    Ok(Answer {
        status,
        body,
        latency: started.elapsed(),
    })
}

/// Writes `request`, reads the answer until the peer closes.
async fn round_trip<S>(mut s: S, request: &str) -> std::io::Result<Vec<u8>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    s.write_all(request.as_bytes()).await?;
    let mut buf = Vec::new();
    match s.read_to_end(&mut buf).await {
        Ok(_) => Ok(buf),
        // A TLS peer closing without `close_notify` after a whole answer.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !buf.is_empty() => Ok(buf),
        Err(e) => Err(e),
    }
}

/// The HTTP proxy (`host:port`) a request to `host_port` goes through:
/// `http_proxy` (or `HTTP_PROXY`), unless `no_proxy` (or `NO_PROXY`) names
/// the host (a suffix, or `*`) or the host is loopback. This is how a CI
/// job outside a cluster reaches a test instance's in-cluster URLs
/// (`http://SERVICE.NAMESPACE.svc.cluster.local:PORT`): through a proxy
/// that runs in the cluster.
pub fn proxy_for(host_port: &str) -> Option<String> {
    let var = |a: &str, b: &str| {
        std::env::var(a)
            .or_else(|_| std::env::var(b))
            .ok()
            .filter(|v| !v.trim().is_empty())
    };
    proxy_from(
        host_port,
        var("http_proxy", "HTTP_PROXY").as_deref(),
        var("no_proxy", "NO_PROXY").as_deref(),
    )
}

/// [`proxy_for`] with the variables given.
fn proxy_from(host_port: &str, proxy: Option<&str>, no_proxy: Option<&str>) -> Option<String> {
    let proxy = proxy?;
    let host = match host_port.rsplit_once(':') {
        Some((h, _)) => h.trim_start_matches('[').trim_end_matches(']'),
        None => host_port,
    };
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    let excluded = no_proxy.is_some_and(|list| {
        list.split(',').map(str::trim).any(|e| {
            let e = e
                .split(':')
                .next()
                .unwrap_or_default()
                .trim_start_matches('.');
            e == "*" || (!e.is_empty() && (host == e || host.ends_with(&format!(".{e}"))))
        })
    });
    if loopback || excluded {
        return None;
    }
    let rest = proxy.trim().trim_start_matches("http://");
    let authority = rest.split('/').next().unwrap_or_default();
    Some(if authority.contains(':') {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    })
}

/// The status and body of a complete HTTP/1.1 response (`Content-Length`,
/// chunked, or to the end of the connection).
pub fn parse_response(raw: &[u8]) -> Result<(u16, Value), String> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no end of headers")?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let mut rest = &raw[split + 4..];
    let mut lines = head.lines();
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line `{status_line}`"))?;
    let header = |name: &str| {
        head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    };
    let body: Vec<u8> = if header("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        let mut out = Vec::new();
        loop {
            let eol = rest
                .windows(2)
                .position(|w| w == b"\r\n")
                .ok_or("truncated chunk")?;
            let size_text = String::from_utf8_lossy(&rest[..eol]);
            let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| format!("bad chunk size `{size_text}`"))?;
            rest = &rest[eol + 2..];
            if size == 0 {
                break;
            }
            if rest.len() < size {
                return Err("truncated chunk".into());
            }
            out.extend_from_slice(&rest[..size]);
            rest = rest.get(size + 2..).unwrap_or_default();
        }
        out
    } else if let Some(n) = header("content-length").and_then(|v| v.parse::<usize>().ok()) {
        rest.get(..n)
            .ok_or("body shorter than its Content-Length")?
            .to_vec()
    } else {
        rest.to_vec()
    };
    let value = serde_json::from_slice(&body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
    Ok((status, value))
}

/// Sends every request, at most `parallelism` at once; stops waiting when
/// `cancel` turns true (the unanswered ones are reported interrupted).
pub async fn send_all(
    requests: Vec<Request>,
    parallelism: usize,
    timeout: Duration,
    mut cancel: tokio::sync::watch::Receiver<bool>,
) -> BTreeMap<String, Result<Answer, String>> {
    let permits = Arc::new(tokio::sync::Semaphore::new(parallelism.max(1)));
    let mut set = tokio::task::JoinSet::new();
    let mut pending: BTreeMap<String, String> = BTreeMap::new();
    for r in requests {
        pending.insert(r.id.clone(), r.url.clone());
        let permits = permits.clone();
        set.spawn(async move {
            let _permit = permits.acquire_owned().await;
            let answer = post_json(
                &r.url,
                &r.body,
                r.api_key.as_deref(),
                r.generation.as_deref(),
                r.ca_file.as_deref(),
                timeout,
            )
            .await
            .map_err(|e| e.to_string());
            (r.id, answer)
        });
    }
    let mut out = BTreeMap::new();
    loop {
        if *cancel.borrow() {
            set.abort_all();
            break;
        }
        tokio::select! {
            joined = set.join_next() => match joined {
                Some(Ok((id, answer))) => {
                    pending.remove(&id);
                    out.insert(id, answer);
                }
                Some(Err(_)) => {}
                None => break,
            },
            changed = cancel.changed() => {
                if changed.is_err() {
                    // Nobody can cancel any more: wait for the rest.
                    while let Some(joined) = set.join_next().await {
                        if let Ok((id, answer)) = joined {
                            pending.remove(&id);
                            out.insert(id, answer);
                        }
                    }
                    break;
                }
            }
        }
    }
    for (id, url) in pending {
        out.insert(id, Err(ClientError::Interrupted { url }.to_string()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_proxy_is_used_except_for_loopback_and_no_proxy_hosts() {
        let p = Some("http://proxy.internal:3128/");
        let svc = "scoring.ns.svc.cluster.local:8080";
        assert_eq!(
            proxy_from(svc, p, None).as_deref(),
            Some("proxy.internal:3128")
        );
        assert_eq!(
            proxy_from(svc, Some("10.0.0.1"), None).as_deref(),
            Some("10.0.0.1:80")
        );
        assert_eq!(proxy_from(svc, None, None), None);
        for direct in ["127.0.0.1:20001", "localhost:80", "[::1]:8080"] {
            assert_eq!(proxy_from(direct, p, None), None, "{direct}");
        }
        assert_eq!(
            proxy_from(svc, p, Some("example.com, .cluster.local")),
            None
        );
        assert_eq!(proxy_from(svc, p, Some("*")), None);
        assert!(proxy_from(svc, p, Some("example.com,local.svc")).is_some());
    }

    #[test]
    fn responses_are_read_by_length_by_chunks_or_to_the_end() {
        let (s, v) =
            parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\n{\"a\":1}\ntrailing")
                .unwrap();
        assert_eq!((s, v), (200, serde_json::json!({"a": 1})));
        let (s, v) = parse_response(
            b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n{\"a\"\r\n3\r\n:2}\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!((s, v), (404, serde_json::json!({"a": 2})));
        let (s, v) = parse_response(b"HTTP/1.0 503 x\r\n\r\nnot json").unwrap();
        assert_eq!((s, v), (503, Value::String("not json".into())));
        assert!(parse_response(b"garbage").is_err());
    }

    #[tokio::test]
    async fn a_query_is_posted_with_its_key_over_a_real_socket() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let mut got = Vec::new();
            // Headers and the 13-byte body.
            while !String::from_utf8_lossy(&got).contains("{\"data\":\"x\"}") {
                let n = s.read(&mut buf).await.unwrap();
                got.extend_from_slice(&buf[..n]);
            }
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
                .await
                .unwrap();
            String::from_utf8_lossy(&got).into_owned()
        });
        let a = post_json(
            &format!("http://127.0.0.1:{port}/public/api/v1/s/e/lookup"),
            &serde_json::json!({"data": "x"}),
            Some("k3y"),
            Some("v2"),
            None,
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        assert_eq!(a.status, 200);
        let request = server.await.unwrap();
        assert!(
            request.starts_with("POST /public/api/v1/s/e/lookup HTTP/1.1\r\n"),
            "{request}"
        );
        assert!(request.contains("X-API-Key: k3y\r\n"), "{request}");
        assert!(request.contains("X-Mesh-Generation: v2\r\n"), "{request}");
    }

    #[tokio::test]
    async fn cancelling_reports_the_unanswered_as_interrupted() {
        // A server that accepts and never answers.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let _hold = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                held.push(s);
            }
        });
        let (tx, rx) = tokio::sync::watch::channel(false);
        let requests = (0..3)
            .map(|i| Request {
                id: format!("t{i}"),
                url: format!("http://127.0.0.1:{port}/x"),
                body: Value::Null,
                api_key: None,
                generation: None,
                ca_file: None,
            })
            .collect();
        let run = tokio::spawn(send_all(requests, 2, Duration::from_secs(600), rx));
        tokio::time::sleep(Duration::from_millis(50)).await;
        tx.send(true).unwrap();
        let out = run.await.unwrap();
        assert_eq!(out.len(), 3);
        for a in out.values() {
            assert!(a.as_ref().unwrap_err().starts_with("interrupted"), "{a:?}");
        }
    }
}
