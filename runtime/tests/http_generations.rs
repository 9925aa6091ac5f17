//! Generations over the real runtime: the weighted split, key dispatch that
//! is sticky and moves only the keys it must when the split file changes
//! (same process), SIGHUP reloading a change the poll cannot see, the pin
//! header, shadows that never answer and whose drops are counted, a shadow
//! kept within its CPU budget, and the configurations the runtime refuses.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{BundleDir, SERVICE, Server, local_service, metric, metrics, request, wait_until};
use serde_json::{Value, json};

/// The example service whose `high-value` endpoint has `generations`
/// (models `high_value.onnx`, `high_value_gbt.onnx`, `high_value_slow.onnx`
/// are in the bundle's `models/`).
fn bundle(generations: Value, dispatch: Option<&str>, edit: impl FnOnce(&mut Value)) -> BundleDir {
    let mut service = local_service();
    let ep = &mut service["endpoints"]["high-value"];
    ep.as_object_mut().expect("endpoint").remove("model");
    ep["generations"] = generations;
    if let Some(key) = dispatch {
        ep["dispatch"] = json!({"key": key});
    }
    edit(&mut service);
    let b = BundleDir::new(&service);
    for model in ["high_value_gbt.onnx", "high_value_slow.onnx"] {
        std::fs::copy(
            common::example_dir().join(model),
            b.path().join("models").join(model),
        )
        .expect("copy model");
    }
    b
}

/// Generations v1 (logistic) and v2 (gbt) whose weights come from the
/// bundle's `split.json` (not written yet).
fn split_bundle(dispatch: Option<&str>) -> BundleDir {
    bundle(
        json!([
            {"name": "v1", "model": "models/high_value.onnx"},
            {"name": "v2", "model": "models/high_value_gbt.onnx"}
        ]),
        dispatch,
        |s| s["split_file"] = json!("split.json"),
    )
}

fn generation(name: &str, model: &str, weight: Option<u32>) -> Value {
    match weight {
        Some(w) => json!({"name": name, "model": format!("models/{model}"), "weight": w}),
        None => json!({"name": name, "model": format!("models/{model}"), "shadow": true}),
    }
}

fn customer(i: usize) -> String {
    format!("C{:05}", i % 10_000 + 1)
}

fn predict_body(i: usize) -> String {
    format!("{{\"features\": {{\"customer_id\": \"{}\"}}}}", customer(i))
}

/// Sends `bodies` as single predictions to `high-value`, `tasks` at a
/// time over keep-alive connections; each answer's status and `generation`.
fn predict_all(s: &Server, bodies: Vec<String>, tasks: usize) -> Vec<(u16, Option<String>)> {
    let path = format!("/public/api/v1/{SERVICE}/high-value/predict");
    let requests = bodies
        .into_iter()
        .map(|b| (path.clone(), Vec::new(), b))
        .collect();
    common::send_all(s.addr, requests, tasks)
        .into_iter()
        .map(|(status, body)| {
            let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            (
                status,
                v["result"]["generation"].as_str().map(str::to_owned),
            )
        })
        .collect()
}

fn shares(answers: &[(u16, Option<String>)]) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for (status, g) in answers {
        assert_eq!(*status, 200);
        *counts
            .entry(g.clone().expect("every answer names its generation"))
            .or_insert(0) += 1;
    }
    counts
}

#[test]
fn random_dispatch_follows_the_weights() {
    let b = bundle(
        json!([
            generation("v1", "high_value.onnx", Some(70)),
            generation("v2", "high_value_gbt.onnx", Some(30))
        ]),
        None,
        |_| {},
    );
    let s = Server::start_ready(b.path(), &[]);
    let n = 20_000;
    let answers = predict_all(&s, (0..n).map(predict_body).collect(), 8);
    let counts = shares(&answers);
    let v1 = counts.get("v1").copied().unwrap_or(0) as f64 / n as f64 * 100.0;
    let v2 = counts.get("v2").copied().unwrap_or(0) as f64 / n as f64 * 100.0;
    assert!((v1 - 70.0).abs() <= 1.5, "v1 {v1:.2}% of {n}: {counts:?}");
    assert!((v2 - 30.0).abs() <= 1.5, "v2 {v2:.2}% of {n}: {counts:?}");
    // The counters per generation agree with the answers.
    let text = metrics(&s);
    for (g, c) in &counts {
        let sample =
            format!("mesh_generation_requests_total{{endpoint=\"high-value\",generation=\"{g}\"}}");
        assert_eq!(metric(&text, &sample), Some(*c as f64), "{text}");
    }
    assert!(text.contains(
        "mesh_generation_latency_seconds_count{endpoint=\"high-value\",generation=\"v1\"}"
    ));
    // The response header names the body's generation.
    let r = s.api("high-value", "predict", &predict_body(7));
    assert_eq!(r.status, 200);
    let g = r.json()["result"]["generation"]
        .as_str()
        .expect("generation")
        .to_string();
    assert_eq!(r.header("x-mesh-generation"), Some(g.as_str()));
}

fn write_split(dir: &Path, v1: u32, v2: u32) {
    let text = json!({"high-value": {"v1": v1, "v2": v2}}).to_string();
    // Atomically, as a ConfigMap update would.
    std::fs::write(dir.join("split.json.tmp"), text).expect("write split");
    std::fs::rename(dir.join("split.json.tmp"), dir.join("split.json")).expect("rename split");
}

fn weight(s: &Server, g: &str) -> Option<f64> {
    metric(
        &metrics(s),
        &format!("mesh_generation_weight{{endpoint=\"high-value\",generation=\"{g}\"}}"),
    )
}

#[test]
fn key_dispatch_is_sticky_and_a_weight_change_moves_only_the_border_keys() {
    let b = split_bundle(Some("customer_id"));
    write_split(b.path(), 90, 10);
    let s = Server::start_ready(b.path(), &[]);
    let pid = s.child.id();
    let keys = 2_000;
    let bodies: Vec<String> = (0..keys).chain(0..keys).map(predict_body).collect();
    let first = predict_all(&s, bodies, 8);
    shares(&first);
    for k in 0..keys {
        assert_eq!(first[k].1, first[keys + k].1, "key {} moved", customer(k));
    }
    assert_eq!(weight(&s, "v2"), Some(10.0));

    write_split(b.path(), 80, 20);
    wait_until(
        &s,
        "the new weight in /metrics",
        Duration::from_secs(10),
        || match weight(&s, "v2") {
            Some(20.0) => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    let again = predict_all(&s, (0..keys).map(predict_body).collect(), 8);
    let (mut to_v2, mut to_v1) = (0, 0);
    for k in 0..keys {
        match (first[k].1.as_deref(), again[k].1.as_deref()) {
            (Some("v1"), Some("v2")) => to_v2 += 1,
            (Some("v2"), Some("v1")) => to_v1 += 1,
            _ => {}
        }
    }
    assert_eq!(to_v1, 0, "keys moved from v2 back to v1");
    let moved = to_v2 as f64 / keys as f64 * 100.0;
    assert!(
        (moved - 10.0).abs() <= 1.5,
        "{moved:.2}% of keys moved v1 → v2"
    );

    // A later invalid file keeps the split in force and counts an error.
    std::fs::write(
        b.path().join("split.json"),
        r#"{"high-value": {"v1": 50, "v2": 20}}"#,
    )
    .expect("write");
    wait_until(
        &s,
        "a reload error counted",
        Duration::from_secs(10),
        || match metric(&metrics(&s), "mesh_split_reload_errors_total") {
            Some(n) if n >= 1.0 => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    assert_eq!(weight(&s, "v2"), Some(20.0));
    let still = predict_all(&s, (0..200).map(predict_body).collect(), 4);
    for k in 0..200 {
        assert_eq!(still[k].1, again[k].1, "key {} moved", customer(k));
    }
    assert!(s.log().contains("sum to 70, not 100"), "{}", s.log());
    assert_eq!(s.child.id(), pid, "same process");
    // A request without the dispatch key: a 400 naming it.
    let r = s.api(
        "high-value",
        "predict",
        &format!("{{\"features\": {}}}", common::explicit_features(3)),
    );
    let message = r.assert_error(400, "missing_dispatch_key");
    assert!(message.contains("customer_id"), "{message}");
}

#[test]
fn sighup_reloads_a_split_change_polling_cannot_see() {
    let b = split_bundle(None);
    write_split(b.path(), 90, 10);
    let mut s = Server::start_ready(b.path(), &[]);
    assert_eq!(weight(&s, "v2"), Some(10.0));
    // 90/10 → 80/20 in place: the same inode, the same size, and the
    // modification time put back, so the once-a-second poll sees no change.
    let path = b.path().join("split.json");
    let before = std::fs::metadata(&path).expect("split file");
    let text = json!({"high-value": {"v1": 80, "v2": 20}}).to_string();
    assert_eq!(text.len() as u64, before.len());
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open split");
    std::io::Write::write_all(&mut &file, text.as_bytes()).expect("write split");
    file.set_modified(before.modified().expect("mtime"))
        .expect("put the mtime back");
    drop(file);
    let after = std::fs::metadata(&path).expect("split file");
    assert_eq!(after.modified().ok(), before.modified().ok());
    // Three polls later: still the old weights.
    std::thread::sleep(Duration::from_millis(3_000));
    assert_eq!(weight(&s, "v2"), Some(10.0), "a poll saw the change");

    s.signal("HUP");
    wait_until(
        &s,
        "the new weight in /metrics after SIGHUP",
        Duration::from_secs(10),
        || match weight(&s, "v2") {
            Some(20.0) => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    assert!(
        s.child.try_wait().expect("try_wait").is_none(),
        "the same process serves on"
    );
    let answers = predict_all(&s, (0..200).map(predict_body).collect(), 4);
    assert!(shares(&answers).contains_key("v2"));
}

#[test]
fn a_missing_split_file_at_start_is_refused_with_the_reason() {
    let b = split_bundle(None);
    let mut s = Server::start(b.path(), &[]);
    let status = s.wait_exit(Duration::from_secs(30));
    assert!(!status.success());
    let log = s.log();
    assert!(
        log.contains("split file: cannot read") && log.contains("split.json"),
        "{log}"
    );
}

#[test]
fn the_pin_header_picks_a_serving_or_shadow_generation() {
    let b = bundle(
        json!([
            generation("v1", "high_value.onnx", Some(100)),
            generation("v2", "high_value_gbt.onnx", Some(0)),
            generation("shadow", "high_value_gbt.onnx", None)
        ]),
        None,
        |_| {},
    );
    let s = Server::start_ready(b.path(), &[]);
    let path = format!("/public/api/v1/{SERVICE}/high-value/predict");
    let pinned = |g: &str| {
        request(
            s.addr,
            "POST",
            &path,
            &[
                ("Content-Type", "application/json"),
                ("X-Mesh-Generation", g),
            ],
            predict_body(1).as_bytes(),
        )
    };
    for g in ["v2", "shadow", "v1"] {
        let r = pinned(g);
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["result"]["generation"], g);
        assert_eq!(r.header("x-mesh-generation"), Some(g));
    }
    let message = pinned("v3").assert_error(400, "unknown_generation");
    assert!(
        message.contains("`v3`") && message.contains("`v1`, `v2`, `shadow`"),
        "{message}"
    );
    // Unpinned: always the serving generation with all the weight.
    for i in 0..50 {
        let r = s.api("high-value", "predict", &predict_body(i));
        assert_eq!(r.json()["result"]["generation"], "v1");
    }
    // predict-multi: each item names its generation.
    let r = s.api(
        "high-value",
        "predict-multi",
        r#"{"items": [{"features": {"customer_id": "C00001"}}, {"features": {"customer_id": "C00002"}}]}"#,
    );
    for item in r.json()["items"].as_array().expect("items") {
        assert_eq!(item["result"]["generation"], "v1");
    }
    // v2 infer names the generation in `parameters` and the header.
    let features: Value = serde_json::from_str(&common::explicit_features(1)).expect("features");
    let inputs: Vec<Value> = features
        .as_object()
        .expect("object")
        .iter()
        .map(|(name, v)| {
            let datatype = if v.is_string() { "BYTES" } else { "FP32" };
            json!({"name": name, "shape": [1], "datatype": datatype, "data": [v]})
        })
        .collect();
    let body = json!({"inputs": inputs}).to_string();
    let r = request(
        s.addr,
        "POST",
        "/v2/models/high-value/infer",
        &[
            ("Content-Type", "application/json"),
            ("X-Mesh-Generation", "v2"),
        ],
        body.as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["parameters"]["generation"], "v2");
    assert_eq!(r.header("x-mesh-generation"), Some("v2"));
    // The OpenAPI document names the header and the field.
    let doc = s.get("/openapi.json").json();
    let predict = &doc["paths"][format!("/public/api/v1/{SERVICE}/high-value/predict")]["post"];
    assert_eq!(
        predict["parameters"][0]["name"], "X-Mesh-Generation",
        "{predict}"
    );
    assert!(predict["responses"]["200"]["headers"]["X-Mesh-Generation"].is_object());
    let result = &predict["responses"]["200"]["content"]["application/json"]["schema"]["properties"]
        ["result"];
    assert_eq!(
        result["properties"]["generation"]["enum"],
        json!(["v1", "v2", "shadow"])
    );
    // A plain-model endpoint's answers carry no generation.
    let r = s.api(
        "high-value-plain",
        "predict",
        &format!("{{\"features\": {}}}", common::explicit_features(1)),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.json()["result"].get("generation").is_none());
    assert!(r.header("x-mesh-generation").is_none());
}

#[test]
fn shadows_never_answer_and_are_compared() {
    let b = bundle(
        json!([
            generation("v1", "high_value.onnx", Some(100)),
            generation("gbt", "high_value_gbt.onnx", None)
        ]),
        None,
        |_| {},
    );
    let s = Server::start_ready(b.path(), &[]);
    let n = 300;
    let answers = predict_all(&s, (0..n).map(predict_body).collect(), 4);
    let counts = shares(&answers);
    assert_eq!(counts.get("v1"), Some(&n), "{counts:?}");
    let sample = |name: &str| format!("{name}{{endpoint=\"high-value\",generation=\"gbt\"}}");
    wait_compared_or_dropped(&s, "gbt", n, Duration::from_secs(20));
    let text = metrics(&s);
    let compared = metric(&text, &sample("mesh_shadow_compared_total")).expect("compared");
    assert!(compared > 0.0, "the gbt shadow compared nothing:\n{text}");
    let agreed = metric(&text, &sample("mesh_shadow_agreed_total")).expect("agreed");
    let diff = metric(&text, &sample("mesh_shadow_probability_abs_diff_sum")).expect("diff");
    // Two different models of the same data: mostly, not always, agreeing.
    assert!(
        agreed > compared * 0.5 && agreed <= compared,
        "{agreed} of {compared}"
    );
    assert!(
        diff > 0.0 && diff / compared < 0.5,
        "mean diff {}",
        diff / compared
    );
    assert!(
        s.log().contains("shadow generation `gbt` scores at"),
        "{}",
        s.log()
    );
}

#[test]
fn a_slow_shadow_with_a_full_queue_drops_copies_and_never_the_requests() {
    let b = bundle(
        json!([
            generation("v1", "high_value.onnx", Some(100)),
            generation("slow", "high_value_slow.onnx", None)
        ]),
        None,
        |s| s["limits"]["shadow_queue"] = json!(2),
    );
    let s = Server::start_ready(b.path(), &[]);
    let n = 3_000;
    let answers = predict_all(&s, (0..n).map(predict_body).collect(), 8);
    let counts = shares(&answers);
    assert_eq!(counts.get("v1"), Some(&n), "{counts:?}");
    let sample = |name: &str| format!("{name}{{endpoint=\"high-value\",generation=\"slow\"}}");
    wait_compared_or_dropped(&s, "slow", n, Duration::from_secs(60));
    let text = metrics(&s);
    let dropped = metric(&text, &sample("mesh_shadow_dropped_total")).expect("dropped");
    assert!(
        dropped > 0.0,
        "a queue of 2 behind a slow forest drops copies:\n{text}"
    );
    // Every copy taken: nothing waits in the queue any more.
    assert_eq!(
        metric(&text, &sample("mesh_shadow_queued")),
        Some(0.0),
        "{text}"
    );
}

#[test]
fn a_shadow_scores_between_requests() {
    use std::io::Write;
    let b = bundle(
        json!([
            generation("v1", "high_value.onnx", Some(100)),
            generation("slow", "high_value_slow.onnx", None)
        ]),
        None,
        // Only the wait for a moment between requests holds the shadow back.
        |s| s["limits"]["shadow_idle_gate"] = json!(false),
    );
    let s = Server::start_ready(b.path(), &[]);
    let sample = |name: &str| format!("{name}{{endpoint=\"high-value\",generation=\"slow\"}}");
    let compared = || metric(&metrics(&s), &sample("mesh_shadow_compared_total")).unwrap_or(0.0);
    // A request being answered: its body is still to come.
    let mut held = std::net::TcpStream::connect(s.addr).expect("connect");
    let path = format!("/public/api/v1/{SERVICE}/high-value/predict");
    write!(
        held,
        "POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: 39\r\n\r\n{{"
    )
    .expect("head");
    held.flush().expect("flush");
    std::thread::sleep(Duration::from_millis(100));
    let n = 200;
    let answers = predict_all(&s, (0..n).map(predict_body).collect(), 4);
    assert_eq!(shares(&answers).get("v1"), Some(&n));
    // Queued, not scored while the held request is answered (but for a
    // chunk of 4 rows a second, which waits no longer).
    std::thread::sleep(Duration::from_millis(700));
    let during = compared();
    assert!(
        during <= 8.0,
        "{during} copies scored while a request was being answered"
    );
    // Once it is answered, the shadow catches up.
    write!(held, "\"features\": {{\"customer_id\": \"C00042\"}}}}").expect("body");
    held.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut held, &mut answer).expect("answer");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    wait_until(&s, "every copy compared", Duration::from_secs(30), || {
        let c = compared();
        if c == (n + 1) as f64 {
            Ok(())
        } else {
            Err(format!("compared {c}"))
        }
    });
}

/// CPU seconds (user + system, from `/proc`) of the thread named `name` in
/// process `pid`, if it runs.
#[cfg(target_os = "linux")]
fn thread_cpu_seconds(pid: u32, name: &str) -> Option<f64> {
    // SAFETY: sysconf has no preconditions.
    let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    // A thread that ends meanwhile is an entry that fails: skipped.
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
    {
        let task = task.path();
        let comm = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
        if comm.trim_end() != name {
            continue;
        }
        let stat = std::fs::read_to_string(task.join("stat")).ok()?;
        // The fields after `(comm)` start at the 3rd; utime and stime are the 14th and 15th.
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        let ticks: f64 = fields[11].parse::<f64>().ok()? + fields[12].parse::<f64>().ok()?;
        return Some(ticks / ticks_per_second);
    }
    None
}

#[cfg(target_os = "linux")]
#[test]
fn a_shadow_keeps_within_its_cpu_budget_and_drops_what_it_cannot_score() {
    // The generation's own `cpu` is in force, not the service's default
    // (a whole core here, at which this test fails on a machine with a core
    // to spare), and it alone holds the shadow back: no idle gate.
    let budget = 0.1;
    let mut slow = generation("slow", "high_value_slow.onnx", None);
    slow["cpu"] = json!(budget);
    let b = bundle(
        json!([generation("v1", "high_value.onnx", Some(100)), slow]),
        None,
        |s| {
            s["limits"]["shadow_cpu"] = json!(1.0);
            s["limits"]["shadow_queue"] = json!(4);
            s["limits"]["shadow_idle_gate"] = json!(false);
        },
    );
    let s = Server::start_ready(b.path(), &[]);
    let pid = s.child.id();
    // Each request is one copy of 100 rows of the slow forest: far more
    // work than a tenth of a core scores, while serving it is cheap.
    let items: Vec<Value> = (0..100)
        .map(|i| json!({"features": {"customer_id": customer(i)}}))
        .collect();
    let body = json!({ "items": items }).to_string();
    let path = format!("/public/api/v1/{SERVICE}/high-value/predict-multi");
    let sent = std::cell::Cell::new(0);
    let load = |n: usize| {
        sent.set(sent.get() + n);
        let requests = (0..n).map(|_| (path.clone(), Vec::new(), body.clone()));
        for (status, answer) in common::send_all(s.addr, requests.collect(), 2) {
            assert_eq!(status, 200, "{}", String::from_utf8_lossy(&answer));
        }
    };
    load(4);
    let shadow = "shadow-slow";
    // Named once it first runs, which a busy machine may delay.
    let named = std::time::Instant::now();
    let before = loop {
        match thread_cpu_seconds(pid, shadow) {
            Some(seconds) => break seconds,
            None if named.elapsed() < Duration::from_secs(10) => {
                std::thread::sleep(Duration::from_millis(50))
            }
            None => panic!("no thread named {shadow} in process {pid}"),
        }
    };
    let started = std::time::Instant::now();
    // Requests with pauses between them, when the shadow scores.
    while started.elapsed() < Duration::from_secs(4) {
        load(2);
        std::thread::sleep(Duration::from_millis(20));
    }
    let wall = started.elapsed().as_secs_f64();
    let used = thread_cpu_seconds(pid, shadow).expect("the shadow's thread runs") - before;
    // Slack: the batch a rest follows (256 rows), and /proc's clock ticks.
    let slack = 0.3;
    assert!(
        used <= budget * wall + slack,
        "the shadow used {used:.2} s of CPU in {wall:.2} s, over {budget} of a core (+{slack} s)"
    );
    let sample = |name: &str| format!("{name}{{endpoint=\"high-value\",generation=\"slow\"}}");
    // It scores once the machine has idle time (at the latest, now).
    wait_until(
        &s,
        "a copy compared",
        Duration::from_secs(30),
        || match metric(&metrics(&s), &sample("mesh_shadow_compared_total")) {
            Some(n) if n > 0.0 => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    // Every prediction is compared or dropped, counted as predictions
    // (100 per request), once the queue has drained.
    wait_compared_or_dropped(&s, "slow", 100 * sent.get(), Duration::from_secs(60));
    let text = metrics(&s);
    let dropped = metric(&text, &sample("mesh_shadow_dropped_total")).expect("dropped");
    assert!(dropped > 0.0, "copies past the budget are dropped:\n{text}");
    // The metric is the thread's own clock, read after each batch.
    let reported = metric(&text, &sample("mesh_shadow_cpu_seconds_total")).expect("cpu metric");
    let total = thread_cpu_seconds(pid, shadow).expect("the shadow's thread runs");
    assert!(
        reported > 0.0 && reported <= total + 0.05,
        "mesh_shadow_cpu_seconds_total {reported} against {total} s in /proc"
    );
}

/// Waits until shadow `generation` of `high-value` has compared or dropped
/// all of `predictions` (its queue drained).
fn wait_compared_or_dropped(s: &Server, generation: &str, predictions: usize, within: Duration) {
    let sample =
        |name: &str| format!("{name}{{endpoint=\"high-value\",generation=\"{generation}\"}}");
    wait_until(s, "every prediction compared or dropped", within, || {
        let text = metrics(s);
        let compared = metric(&text, &sample("mesh_shadow_compared_total")).unwrap_or(0.0);
        let dropped = metric(&text, &sample("mesh_shadow_dropped_total")).unwrap_or(0.0);
        if compared + dropped == predictions as f64 {
            Ok(())
        } else {
            Err(format!(
                "compared {compared} + dropped {dropped} of {predictions}"
            ))
        }
    });
}

/// `mesh-runtime check` of `service`: its stderr, having failed.
fn refused(service: &Value) -> String {
    let b = BundleDir::new(service);
    std::fs::copy(
        common::example_dir().join("high_value_gbt.onnx"),
        b.path().join("models/high_value_gbt.onnx"),
    )
    .expect("copy");
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/models/svm.onnx"),
        b.path().join("models/other.onnx"),
    )
    .expect("copy");
    let out = Command::new(env!("CARGO_BIN_EXE_mesh-runtime"))
        .args(["check", "--bundle"])
        .arg(b.path())
        .output()
        .expect("run check");
    assert!(!out.status.success(), "accepted: {service}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn the_runtime_refuses_bad_generations_and_names_them() {
    let with = |generations: Value, edit: &dyn Fn(&mut Value)| {
        let mut service = local_service();
        let ep = &mut service["endpoints"]["high-value"];
        ep.as_object_mut().expect("endpoint").remove("model");
        ep["generations"] = generations;
        edit(&mut service);
        service
    };
    let cases: Vec<(Value, &str)> = vec![
        (
            with(
                json!([
                    generation("v1", "high_value.onnx", Some(60)),
                    generation("v2", "high_value_gbt.onnx", Some(30))
                ]),
                &|_| {},
            ),
            "weights sum to 90, not 100",
        ),
        (
            with(
                json!([
                    generation("v1", "high_value.onnx", Some(100)),
                    generation("v1", "high_value_gbt.onnx", None)
                ]),
                &|_| {},
            ),
            "two generations named `v1`",
        ),
        (
            with(json!([generation("s", "high_value.onnx", None)]), &|_| {}),
            "every generation is a shadow",
        ),
        (
            with(
                json!([{"name": "s", "model": "models/high_value.onnx", "shadow": true, "weight": 5},
                        generation("v1", "high_value.onnx", Some(100))]),
                &|_| {},
            ),
            "generation `s` is a shadow: it takes no `weight`",
        ),
        (
            with(
                json!([generation("v1", "high_value.onnx", Some(100))]),
                &|s| s["endpoints"]["high-value"]["model"] = json!("models/high_value.onnx"),
            ),
            "give either `model` or `generations`",
        ),
        (
            with(
                json!([{"name": "v1", "model": "models/high_value.onnx", "weight": 100, "cpu": 0.5}]),
                &|_| {},
            ),
            "generation `v1` serves: only a shadow takes a `cpu` budget of its own",
        ),
        (
            with(
                json!([generation("v1", "high_value.onnx", Some(100)),
                       {"name": "s", "model": "models/high_value.onnx", "shadow": true, "cpu": 1.5}]),
                &|_| {},
            ),
            "generation `s`: cpu 1.5 must be a share of one core in (0, 1]",
        ),
        (
            with(
                json!([
                    generation("v1", "high_value.onnx", Some(90)),
                    generation("v2", "other.onnx", Some(10))
                ]),
                &|_| {},
            ),
            "endpoint `high-value` generation `v2`: model",
        ),
        (
            with(
                json!([
                    generation("v1", "high_value.onnx", Some(100)),
                    {"name": "s", "model": "models/high_value.onnx", "shadow": true,
                     "enrichments": [{"dataset": "behavior", "key": "customer_id"}]}
                ]),
                &|_| {},
            ),
            "generation `s` is a shadow: it scores the features its serving generation was given and takes no enrichments of its own",
        ),
        (
            with(
                json!([
                    generation("v1", "high_value.onnx", Some(100)),
                    generation("slow", "high_value_slow.onnx", None)
                ]),
                &|s| s["limits"]["shadow_cpu"] = json!(1.5),
            ),
            "limits.shadow_cpu 1.5 must be a share of one core in (0, 1]",
        ),
    ];
    for (service, expected) in cases {
        let err = refused(&service);
        assert!(err.contains(expected), "expected `{expected}` in:\n{err}");
    }
}

/// A generation with enrichments of its own reads its features from them,
/// the others from the endpoint's: by id alone, each generation answers
/// bit for bit what it answers with every feature sent from its sources.
#[test]
fn a_generation_enriches_from_its_own_sources() {
    // `behavior_v2`: the example's behaviour with more orders for everyone.
    let (header, rows) = common::read_csv("behavior.csv");
    let orders = header
        .iter()
        .position(|h| h == "orders_90d")
        .expect("orders_90d");
    let mut v2_rows = rows.clone();
    for r in &mut v2_rows {
        r[orders] = (r[orders].parse::<i64>().expect("orders") + 7).to_string();
    }
    let csv: String = std::iter::once(header.join(","))
        .chain(v2_rows.iter().map(|r| r.join(",")))
        .map(|l| l + "\n")
        .collect();
    let b = bundle(
        json!([
            generation("v1", "high_value.onnx", Some(50)),
            {"name": "v2", "model": "models/high_value.onnx", "weight": 50, "enrichments": [
                {"dataset": "customers", "key": "customer_id", "columns": common::CUSTOMER_COLUMNS},
                {"dataset": "behavior_v2", "key": "customer_id", "columns": common::BEHAVIOR_COLUMNS}
            ]}
        ]),
        Some("customer_id"),
        |s| {
            s["datasets"]["behavior_v2"] =
                json!({"source": {"csv": "datasets/behavior_v2.csv"}, "key": "customer_id"})
        },
    );
    std::fs::write(b.path().join("datasets/behavior_v2.csv"), csv).expect("write");
    let s = Server::start_ready(b.path(), &[]);
    let path = format!("/public/api/v1/{SERVICE}/high-value/predict");
    let ask = |g: Option<&str>, body: &str| -> Value {
        let mut headers = vec![("Content-Type", "application/json")];
        if let Some(g) = g {
            headers.push(("X-Mesh-Generation", g));
        }
        let r = request(s.addr, "POST", &path, &headers, body.as_bytes());
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()["result"].clone()
    };
    let mut differ = 0;
    let mut served = HashMap::new();
    for (i, v2_row) in v2_rows.iter().enumerate().take(60) {
        let by_id = predict_body(i);
        let sent = common::explicit_features(i);
        // The same features with v2's orders.
        let mut sent_v2: Value = serde_json::from_str(&sent).expect("features");
        sent_v2["orders_90d"] = json!(v2_row[orders].parse::<i64>().expect("orders"));
        let v1 = ask(Some("v1"), &by_id);
        let v2 = ask(Some("v2"), &by_id);
        assert_eq!(
            v1["probas"],
            ask(Some("v1"), &format!("{{\"features\": {sent}}}"))["probas"],
            "v1 by id = v1 with the endpoint's features, customer {i}"
        );
        assert_eq!(
            v2["probas"],
            ask(Some("v2"), &json!({ "features": sent_v2 }).to_string())["probas"],
            "v2 by id = v2 with its own sources' features, customer {i}"
        );
        assert!(v1["probas"].is_object(), "{v1}");
        if v1["probas"] != v2["probas"] {
            differ += 1;
        }
        // Unpinned, the key's generation answers with its own sources.
        let any = ask(None, &by_id);
        let g = any["generation"].as_str().expect("generation").to_owned();
        let pinned = if g == "v1" { &v1 } else { &v2 };
        assert_eq!(any["probas"], pinned["probas"], "customer {i}, {g}");
        *served.entry(g).or_insert(0) += 1;
    }
    assert!(
        differ >= 30,
        "only {differ} of 60 customers differ between the sources"
    );
    assert_eq!(served.len(), 2, "{served:?}");
}
