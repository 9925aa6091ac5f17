//! Each fault of the proxy, proven against the real moto server (`scripts/test` starts it and sets
//! `MESH_TEST_AWS_ENDPOINT`). Requests are raw HTTP/1.1 over a TCP socket, shaped like the AWS SDK's
//! (query protocol for EC2, `X-Amz-Target` JSON for ECR, REST JSON for EKS), so what is tested is
//! the proxy and moto, not an SDK.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use aws_fault_proxy::{FaultProxy, moto_endpoint};

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

fn auth(service: &str) -> String {
    format!(
        "AWS4-HMAC-SHA256 Credential=testing/20260101/us-east-1/{service}/aws4_request, \
         SignedHeaders=host;x-amz-date, Signature=0000000000000000000000000000000000000000000000000000000000000000"
    )
}

/// One raw HTTP/1.1 exchange (`Connection: close`), body read to the end.
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: &str,
) -> Reply {
    let mut stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nX-Amz-Date: 20260101T000000Z\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    stream.write_all(req.as_bytes()).unwrap();

    let mut reader = BufReader::new(stream);
    let mut status_line = String::new();
    reader.read_line(&mut status_line).unwrap();
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let (k, v) = line.split_once(':').unwrap();
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    let mut body = String::new();
    reader.read_to_string(&mut body).unwrap();
    Reply {
        status,
        headers,
        body,
    }
}

fn ec2(addr: SocketAddr, action: &str) -> Reply {
    http(
        addr,
        "POST",
        "/",
        &[
            (
                "Content-Type",
                "application/x-www-form-urlencoded; charset=utf-8".into(),
            ),
            ("Authorization", auth("ec2")),
        ],
        &format!("Action={action}&Version=2016-11-15"),
    )
}

fn ecr(addr: SocketAddr, action: &str, body: &str) -> Reply {
    http(
        addr,
        "POST",
        "/",
        &[
            ("Content-Type", "application/x-amz-json-1.1".into()),
            (
                "X-Amz-Target",
                format!("AmazonEC2ContainerRegistry_V20150921.{action}"),
            ),
            ("Authorization", auth("ecr")),
        ],
        body,
    )
}

fn eks(addr: SocketAddr, method: &str, path: &str, body: &str) -> Reply {
    http(
        addr,
        method,
        path,
        &[
            ("Content-Type", "application/json".into()),
            ("Authorization", auth("eks")),
        ],
        body,
    )
}

/// A name no other test (or concurrent test run against the same moto) uses.
fn unique(prefix: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "{prefix}-{}-{}-{nanos}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn create_cluster(addr: SocketAddr, name: &str) {
    let body = serde_json::json!({
        "name": name,
        "version": "1.31",
        "roleArn": "arn:aws:iam::123456789012:role/mesh-eks",
        "resourcesVpcConfig": {"subnetIds": ["subnet-12345678", "subnet-87654321"]}
    });
    let r = eks(addr, "POST", "/clusters", &body.to_string());
    assert_eq!(r.status, 200, "CreateCluster: {}", r.body);
}

#[test]
fn forwards_every_call_to_moto_and_counts_it() {
    let proxy = FaultProxy::start(&moto_endpoint());
    let r = ec2(proxy.addr(), "DescribeVpcs");
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        r.body.contains("<vpcSet>"),
        "moto's answer passes through: {}",
        r.body
    );
    let r = ecr(proxy.addr(), "DescribeRepositories", "{}");
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.json()["repositories"].is_array());
    let r = eks(proxy.addr(), "GET", "/clusters", "");
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.json()["clusters"].is_array());

    assert_eq!(proxy.count("DescribeVpcs"), 1);
    assert_eq!(proxy.count("ec2:DescribeVpcs"), 1);
    assert_eq!(proxy.count("DescribeRepositories"), 1);
    assert_eq!(proxy.count("eks:ListClusters"), 1);
    assert_eq!(proxy.forwarded("*"), 3);
    assert_eq!(proxy.total_requests(), 3);
    let actions: Vec<_> = proxy
        .calls()
        .into_iter()
        .map(|c| format!("{}:{}", c.service, c.action))
        .collect();
    assert_eq!(
        actions,
        [
            "ec2:DescribeVpcs",
            "ecr:DescribeRepositories",
            "eks:ListClusters"
        ]
    );
}

#[test]
fn throttles_ec2_query_calls_with_request_limit_exceeded() {
    let proxy = FaultProxy::start(&moto_endpoint());
    proxy.throttle("DescribeVpcs", 2);
    for attempt in 1..=2 {
        let r = ec2(proxy.addr(), "DescribeVpcs");
        assert_eq!(r.status, 503, "attempt {attempt}");
        assert!(
            r.body
                .contains("<Response><Errors><Error><Code>RequestLimitExceeded</Code>"),
            "{}",
            r.body
        );
    }
    let r = ec2(proxy.addr(), "DescribeVpcs");
    assert_eq!(r.status, 200, "the third call reaches moto: {}", r.body);
    // Other actions are untouched.
    assert_eq!(ec2(proxy.addr(), "DescribeSubnets").status, 200);
    assert_eq!(proxy.count("DescribeVpcs"), 3);
    assert_eq!(proxy.forwarded("DescribeVpcs"), 1);
    assert_eq!(proxy.injected("DescribeVpcs"), 2);
}

#[test]
fn throttles_json_protocol_calls_with_throttling_exception() {
    let proxy = FaultProxy::start(&moto_endpoint());
    proxy.throttle("ecr:DescribeRepositories", 1);
    let r = ecr(proxy.addr(), "DescribeRepositories", "{}");
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["__type"], "ThrottlingException");
    assert_eq!(r.header("x-amzn-errortype"), Some("ThrottlingException"));
    assert_eq!(ecr(proxy.addr(), "DescribeRepositories", "{}").status, 200);
    assert_eq!(proxy.count("DescribeRepositories"), 2);
}

#[test]
fn throttles_eks_rest_calls_with_429() {
    let proxy = FaultProxy::start(&moto_endpoint());
    let name = unique("throttled");
    create_cluster(proxy.addr(), &name);
    proxy.throttle("DescribeCluster", 1);
    let r = eks(proxy.addr(), "GET", &format!("/clusters/{name}"), "");
    assert_eq!(r.status, 429);
    assert_eq!(r.header("x-amzn-errortype"), Some("ThrottlingException"));
    assert_eq!(r.json()["__type"], "ThrottlingException");
    let r = eks(proxy.addr(), "GET", &format!("/clusters/{name}"), "");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["cluster"]["name"], name.as_str());
    assert_eq!(proxy.count("DescribeCluster"), 2);
    assert_eq!(proxy.forwarded("DescribeCluster"), 1);
}

#[test]
fn server_errors_answer_500_then_503_in_the_order_programmed() {
    let proxy = FaultProxy::start(&moto_endpoint());
    proxy.server_error("DescribeSubnets", 1);
    proxy.service_unavailable("DescribeSubnets", 1);
    let r = ec2(proxy.addr(), "DescribeSubnets");
    assert_eq!(r.status, 500);
    assert!(r.body.contains("<Code>InternalError</Code>"), "{}", r.body);
    let r = ec2(proxy.addr(), "DescribeSubnets");
    assert_eq!(r.status, 503);
    assert!(r.body.contains("<Code>Unavailable</Code>"), "{}", r.body);
    assert_eq!(ec2(proxy.addr(), "DescribeSubnets").status, 200);

    proxy.server_error("ListClusters", 1);
    let r = eks(proxy.addr(), "GET", "/clusters", "");
    assert_eq!(r.status, 500);
    assert_eq!(r.header("x-amzn-errortype"), Some("ServerException"));
    assert_eq!(eks(proxy.addr(), "GET", "/clusters", "").status, 200);
    assert_eq!(proxy.count("DescribeSubnets"), 3);
    assert_eq!(proxy.forwarded("DescribeSubnets"), 1);
}

#[test]
fn delays_hold_calls_back() {
    let proxy = FaultProxy::start(&moto_endpoint());
    // Warm moto's EC2 backend first: its first call costs more than the delay under test.
    assert_eq!(ec2(proxy.addr(), "DescribeVpcs").status, 200);
    let delay = Duration::from_millis(400);
    proxy.delay_n("DescribeVpcs", 1, delay);
    let t = Instant::now();
    let r = ec2(proxy.addr(), "DescribeVpcs");
    let slow = t.elapsed();
    assert_eq!(
        r.status, 200,
        "a delayed call still reaches moto: {}",
        r.body
    );
    assert!(
        slow >= delay,
        "delayed call took {slow:?}, less than {delay:?}"
    );
    assert_eq!(ec2(proxy.addr(), "DescribeVpcs").status, 200);
    assert_eq!(
        proxy.injected("DescribeVpcs"),
        1,
        "only the first call after delay_n is delayed"
    );

    proxy.delay("DescribeVpcs", Duration::from_millis(150));
    for _ in 0..2 {
        let t = Instant::now();
        assert_eq!(ec2(proxy.addr(), "DescribeVpcs").status, 200);
        assert!(t.elapsed() >= Duration::from_millis(150));
    }
    proxy.clear_faults();
    assert_eq!(ec2(proxy.addr(), "DescribeVpcs").status, 200);
    assert_eq!(proxy.injected("DescribeVpcs"), 3);
    assert_eq!(proxy.count("DescribeVpcs"), 6);
    assert_eq!(proxy.forwarded("DescribeVpcs"), 6);
}

#[test]
fn rewrites_cluster_and_nodegroup_status_for_waiters() {
    let proxy = FaultProxy::start(&moto_endpoint());
    let name = unique("waiter");
    create_cluster(proxy.addr(), &name);
    proxy.rewrite_status("DescribeCluster", 2, "ACTIVE", "CREATING");
    let statuses: Vec<String> = (0..3)
        .map(|_| {
            let r = eks(proxy.addr(), "GET", &format!("/clusters/{name}"), "");
            assert_eq!(r.status, 200, "{}", r.body);
            r.json()["cluster"]["status"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(statuses, ["CREATING", "CREATING", "ACTIVE"]);
    assert_eq!(proxy.count("DescribeCluster"), 3);
    assert_eq!(
        proxy.forwarded("DescribeCluster"),
        3,
        "rewrites happen on moto's real answers"
    );

    let body = serde_json::json!({
        "nodegroupName": "workers",
        "nodeRole": "arn:aws:iam::123456789012:role/mesh-node",
        "subnets": ["subnet-12345678"],
        "scalingConfig": {"minSize": 1, "maxSize": 2, "desiredSize": 1}
    });
    let r = eks(
        proxy.addr(),
        "POST",
        &format!("/clusters/{name}/node-groups"),
        &body.to_string(),
    );
    assert_eq!(r.status, 200, "CreateNodegroup: {}", r.body);
    proxy.rewrite_status("DescribeNodegroup", 1, "ACTIVE", "CREATING");
    let path = format!("/clusters/{name}/node-groups/workers");
    let first = eks(proxy.addr(), "GET", &path, "").json();
    let second = eks(proxy.addr(), "GET", &path, "").json();
    assert_eq!(first["nodegroup"]["status"], "CREATING");
    assert_eq!(second["nodegroup"]["status"], "ACTIVE");
    assert_eq!(
        first["nodegroup"]["nodegroupName"], "workers",
        "the rest of the answer is moto's"
    );
}

#[test]
fn canned_responses_stand_in_for_states_moto_never_shows() {
    let proxy = FaultProxy::start(&moto_endpoint());
    let name = unique("deleting");
    create_cluster(proxy.addr(), &name);
    assert_eq!(
        eks(proxy.addr(), "DELETE", &format!("/clusters/{name}"), "").status,
        200
    );
    let deleting = serde_json::json!({"cluster": {"name": name, "status": "DELETING"}}).to_string();
    proxy.respond("DescribeCluster", 1, 200, "application/json", deleting);
    let r = eks(proxy.addr(), "GET", &format!("/clusters/{name}"), "");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["cluster"]["status"], "DELETING");
    let r = eks(proxy.addr(), "GET", &format!("/clusters/{name}"), "");
    assert_eq!(
        r.status, 404,
        "then moto's own answer: the cluster is gone: {}",
        r.body
    );
    let code = r
        .header("x-amzn-errortype")
        .map(str::to_string)
        .unwrap_or_else(|| r.body.clone());
    assert!(code.contains("ResourceNotFoundException"), "{code}");
}

#[test]
fn reset_forgets_faults_and_counts() {
    let proxy = FaultProxy::start(&moto_endpoint());
    proxy.throttle("*", 100);
    assert_eq!(ec2(proxy.addr(), "DescribeVpcs").status, 503);
    assert_eq!(proxy.total_requests(), 1);
    proxy.reset();
    assert_eq!(proxy.total_requests(), 0);
    assert_eq!(ec2(proxy.addr(), "DescribeVpcs").status, 200);
}

/// The proxy changes nothing on the way: method, path, query, signed headers and body arrive as
/// sent (header names are case-insensitive in HTTP/1 and SigV4 signs them lower-cased).
#[test]
fn requests_reach_upstream_verbatim() {
    let upstream = TcpListener::bind("127.0.0.1:0").unwrap();
    let upstream_addr = upstream.local_addr().unwrap();
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        let (mut conn, _) = upstream.accept().unwrap();
        let mut reader = BufReader::new(conn.try_clone().unwrap());
        let mut head = String::new();
        let mut len = 0usize;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().unwrap();
            }
            head.push_str(&line);
            if line == "\r\n" {
                break;
            }
        }
        let mut body = vec![0; len];
        reader.read_exact(&mut body).unwrap();
        head.push_str(&String::from_utf8(body).unwrap());
        conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nx-upstream: yes\r\nConnection: close\r\n\r\nok")
            .unwrap();
        tx.send(head).unwrap();
    });

    let proxy = FaultProxy::start(&format!("http://{upstream_addr}"));
    let body = "Action=RunInstances&Version=2016-11-15&ImageId=ami-1&MinCount=1&MaxCount=1";
    let r = http(
        proxy.addr(),
        "POST",
        "/some/path?x=1&y=%2F",
        &[
            (
                "Content-Type",
                "application/x-www-form-urlencoded; charset=utf-8".into(),
            ),
            ("Authorization", auth("ec2")),
            ("X-Amz-Security-Token", "token".into()),
        ],
        body,
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.body, "ok");
    assert_eq!(
        r.header("x-upstream"),
        Some("yes"),
        "upstream headers come back"
    );
    let seen = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    let lower = seen.to_ascii_lowercase();
    assert!(
        seen.starts_with("POST /some/path?x=1&y=%2F HTTP/1.1\r\n"),
        "{seen}"
    );
    assert!(
        lower.contains(&format!("host: {}\r\n", proxy.addr())),
        "Host is the one signed: {seen}"
    );
    assert!(
        lower.contains(&format!(
            "authorization: {}\r\n",
            auth("ec2").to_ascii_lowercase()
        )),
        "{seen}"
    );
    assert!(lower.contains("x-amz-date: 20260101t000000z\r\n"), "{seen}");
    assert!(lower.contains("x-amz-security-token: token\r\n"), "{seen}");
    assert!(seen.ends_with(&format!("\r\n\r\n{body}")), "{seen}");
    assert_eq!(proxy.count("ec2:RunInstances"), 1);
}

#[test]
fn an_unreachable_upstream_is_a_502_not_a_hang() {
    // Bind and drop to get a port nothing listens on.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let proxy = FaultProxy::start(&format!("http://127.0.0.1:{port}"));
    let r = ec2(proxy.addr(), "DescribeVpcs");
    assert_eq!(r.status, 502);
    assert!(r.body.contains("aws-fault-proxy"), "{}", r.body);
}

// ------------------------------------------------------------------ the simulated add-on API

fn error_code(r: &Reply) -> &str {
    r.header("x-amzn-ErrorType").unwrap_or_default()
}

#[test]
fn addons_answer_the_eks_error_codes() {
    let proxy = FaultProxy::start(&moto_endpoint());
    let addr = proxy.addr();
    let vpc_cni =
        r#"{"addonName":"vpc-cni","configurationValues":"{\"enableNetworkPolicy\":\"true\"}"}"#;

    // A cluster moto does not know: 404 for every call.
    let ghost = unique("ghost");
    let r = eks(addr, "POST", &format!("/clusters/{ghost}/addons"), vpc_cni);
    assert_eq!(
        (r.status, error_code(&r)),
        (404, "ResourceNotFoundException"),
        "{}",
        r.body
    );
    assert!(
        r.json()["message"].as_str().unwrap().contains(&ghost),
        "{}",
        r.body
    );
    let r = eks(
        addr,
        "GET",
        &format!("/clusters/{ghost}/addons/vpc-cni"),
        "",
    );
    assert_eq!(
        (r.status, error_code(&r)),
        (404, "ResourceNotFoundException")
    );
    let r = eks(addr, "GET", &format!("/clusters/{ghost}/addons"), "");
    assert_eq!(r.status, 404);

    let name = unique("addons");
    create_cluster(addr, &name);
    // An add-on the cluster does not have: 404; delete and update too.
    let one = format!("/clusters/{name}/addons/vpc-cni");
    for (method, path) in [
        ("GET", one.clone()),
        ("DELETE", one.clone()),
        ("POST", format!("{one}/update")),
    ] {
        let r = eks(addr, method, &path, "{}");
        assert_eq!(
            (r.status, error_code(&r)),
            (404, "ResourceNotFoundException"),
            "{method} {path}: {}",
            r.body
        );
    }
    // Bad parameters: 400.
    let r = eks(
        addr,
        "POST",
        &format!("/clusters/{name}/addons"),
        r#"{"configurationValues":"{}"}"#,
    );
    assert_eq!(
        (r.status, error_code(&r)),
        (400, "InvalidParameterException"),
        "{}",
        r.body
    );
    let r = eks(
        addr,
        "POST",
        &format!("/clusters/{name}/addons"),
        r#"{"addonName":"vpc-cni","configurationValues":"enableNetworkPolicy"}"#,
    );
    assert_eq!(
        (r.status, error_code(&r)),
        (400, "InvalidParameterException"),
        "{}",
        r.body
    );
    let r = eks(
        addr,
        "POST",
        &format!("/clusters/{name}/addons"),
        "not json",
    );
    assert_eq!(
        (r.status, error_code(&r)),
        (400, "InvalidParameterException"),
        "{}",
        r.body
    );

    // Created CREATING, then ACTIVE on the next read; a second create is 409.
    let r = eks(addr, "POST", &format!("/clusters/{name}/addons"), vpc_cni);
    assert_eq!(r.status, 200, "{}", r.body);
    let created = r.json();
    assert_eq!(created["addon"]["status"], "CREATING");
    assert_eq!(created["addon"]["clusterName"], name.as_str());
    assert!(
        created["addon"]["addonArn"]
            .as_str()
            .unwrap()
            .contains(":addon/"),
        "{created}"
    );
    let r = eks(addr, "POST", &format!("/clusters/{name}/addons"), vpc_cni);
    assert_eq!(
        (r.status, error_code(&r)),
        (409, "ResourceInUseException"),
        "{}",
        r.body
    );
    let r = eks(addr, "GET", &one, "");
    assert_eq!(r.json()["addon"]["status"], "CREATING");
    let r = eks(addr, "GET", &one, "");
    let active = r.json();
    assert_eq!(active["addon"]["status"], "ACTIVE");
    assert_eq!(
        active["addon"]["configurationValues"],
        r#"{"enableNetworkPolicy":"true"}"#
    );
    let r = eks(addr, "GET", &format!("/clusters/{name}/addons"), "");
    assert_eq!(r.json()["addons"], serde_json::json!(["vpc-cni"]));

    // Update: UPDATING, then the new configuration.
    let r = eks(
        addr,
        "POST",
        &format!("{one}/update"),
        r#"{"configurationValues":"{\"enableNetworkPolicy\":\"false\"}"}"#,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["update"]["type"], "AddonUpdate");
    assert_eq!(
        eks(addr, "GET", &one, "").json()["addon"]["status"],
        "UPDATING"
    );
    let after = eks(addr, "GET", &one, "").json();
    assert_eq!(
        after["addon"]["configurationValues"],
        r#"{"enableNetworkPolicy":"false"}"#
    );

    // Delete: DELETING once, then gone; a change while deleting is 409.
    let r = eks(addr, "DELETE", &one, "");
    assert_eq!(r.json()["addon"]["status"], "DELETING");
    let r = eks(addr, "POST", &format!("{one}/update"), "{}");
    assert_eq!(
        (r.status, error_code(&r)),
        (409, "ResourceInUseException"),
        "{}",
        r.body
    );
    assert_eq!(
        eks(addr, "GET", &one, "").json()["addon"]["status"],
        "DELETING"
    );
    let r = eks(addr, "GET", &one, "");
    assert_eq!(
        (r.status, error_code(&r)),
        (404, "ResourceNotFoundException")
    );

    // The add-on calls never reached moto; faults still apply to them.
    assert_eq!(proxy.forwarded("CreateAddon"), 0);
    proxy.throttle("DescribeAddon", 1);
    assert_eq!(eks(addr, "GET", &one, "").status, 429);

    // Add-ons go with their cluster.
    let r = eks(addr, "POST", &format!("/clusters/{name}/addons"), vpc_cni);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        eks(addr, "DELETE", &format!("/clusters/{name}"), "").status,
        200
    );
    let r = eks(addr, "GET", &one, "");
    assert_eq!(
        (r.status, error_code(&r)),
        (404, "ResourceNotFoundException"),
        "{}",
        r.body
    );
}
