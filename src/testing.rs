//! Test queries (`mesh test`): which to send, how an answer is checked
//! against its [`Expect`], and the report (table, JSON, JUnit XML).
//!
//! Pure: answers come in, results go out. Sending the requests is
//! [`client`]'s job; applying and destroying the instance is the command's.

pub mod client;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde_json::Value;

use crate::resource::Live;
use crate::stack::{Stack, TestAction, TestQuery};

/// `service/endpoint/test`, the name a test is selected and reported by.
pub fn id(t: &TestQuery) -> String {
    format!("{}/{}/{}", t.service, t.endpoint, t.name)
}

/// Does `id` match `pattern`? `*` matches any run of characters; a pattern
/// without `*` matches any id that contains it.
pub fn matches(pattern: &str, id: &str) -> bool {
    if !pattern.contains('*') {
        return id.contains(pattern);
    }
    let parts: Vec<&str> = pattern.split('*').collect();
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !id.starts_with(first) || id.len() < first.len() + last.len() || !id.ends_with(last) {
        return false;
    }
    let mut rest = &id[first.len()..id.len() - last.len()];
    for p in &parts[1..parts.len() - 1] {
        match rest.find(p) {
            Some(i) => rest = &rest[i + p.len()..],
            None => return false,
        }
    }
    true
}

/// The tests to report (those matching `filter`, or all) and the tests to
/// send: those plus every test a selected one is `same_as`.
pub fn select<'s>(
    stack: &'s Stack,
    filter: Option<&str>,
) -> (Vec<&'s TestQuery>, Vec<&'s TestQuery>) {
    let all: Vec<&TestQuery> = stack.tests().collect();
    let reported: Vec<&TestQuery> = all
        .iter()
        .copied()
        .filter(|t| filter.is_none_or(|f| matches(f, &id(t))))
        .collect();
    let sent = all
        .iter()
        .copied()
        .filter(|t| {
            reported.iter().any(|r| {
                std::ptr::eq(*r, *t)
                    || (r.service == t.service
                        && r.endpoint == t.endpoint
                        && r.expect.same_as.as_deref() == Some(&t.name))
            })
        })
        .collect();
    (reported, sent)
}

/// What a service answered.
#[derive(Clone, Debug, PartialEq)]
pub struct Answer {
    pub status: u16,
    /// The JSON body (a string when the body was not JSON).
    pub body: Value,
    pub latency: Duration,
}

/// One difference between what a test expects and what came back.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Mismatch {
    /// `status`, `prediction`, `probas.1`, `fields.age`, `same_as(by-id).probas.1`.
    pub field: String,
    pub expected: String,
    pub got: String,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Passed,
    Failed(Vec<Mismatch>),
    /// No answer to check: the service could not be reached, the request
    /// timed out, or the run was interrupted first.
    Error(String),
}

/// One test's result.
#[derive(Clone, Debug, PartialEq)]
pub struct TestResult {
    pub service: String,
    pub endpoint: String,
    pub name: String,
    pub outcome: Outcome,
    pub latency: Option<Duration>,
}

impl TestResult {
    pub fn passed(&self) -> bool {
        self.outcome == Outcome::Passed
    }
}

/// The answers of the tests sent, by [`id`].
pub type Answers = BTreeMap<String, Result<Answer, String>>;

/// Checks every reported test against its answer (and the answer of the
/// test it is `same_as`).
pub fn evaluate(reported: &[&TestQuery], answers: &Answers) -> Vec<TestResult> {
    reported
        .iter()
        .map(|t| {
            let answer = answers.get(&id(t));
            let (outcome, latency) = match answer {
                None => (Outcome::Error("not sent".into()), None),
                Some(Err(e)) => (Outcome::Error(e.clone()), None),
                Some(Ok(a)) => {
                    let mut diffs = check(t, a);
                    if let Some(other) = &t.expect.same_as {
                        let other_id = format!("{}/{}/{other}", t.service, t.endpoint);
                        match answers.get(&other_id) {
                            Some(Ok(b)) => diffs.extend(same(t, other, a, b)),
                            Some(Err(e)) => diffs.push(Mismatch {
                                field: format!("same_as({other})"),
                                expected: format!("the answer of test `{other}`"),
                                got: format!("no answer to compare with: {e}"),
                            }),
                            None => diffs.push(Mismatch {
                                field: format!("same_as({other})"),
                                expected: format!("the answer of test `{other}`"),
                                got: "it was not sent".into(),
                            }),
                        }
                    }
                    let outcome = if diffs.is_empty() {
                        Outcome::Passed
                    } else {
                        Outcome::Failed(diffs)
                    };
                    (outcome, Some(a.latency))
                }
            };
            TestResult {
                service: t.service.clone(),
                endpoint: t.endpoint.clone(),
                name: t.name.clone(),
                outcome,
                latency,
            }
        })
        .collect()
}

/// JSON in one line, for messages.
fn show(v: &Value) -> String {
    match v {
        Value::Null => "(absent)".into(),
        other => other.to_string(),
    }
}

/// The error a service gave, if its body is a mesh-runtime error.
fn error_of(body: &Value) -> Option<String> {
    let e = body.get("error")?;
    let code = e.get("code").and_then(Value::as_str).unwrap_or("error");
    match e.get("message").and_then(Value::as_str) {
        Some(m) => Some(format!("{code}: {m}")),
        None => Some(code.to_owned()),
    }
}

/// Equal as JSON, numbers by value (28 == 28.0).
fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| json_eq(a, b))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| json_eq(v, w)))
        }
        _ => a == b,
    }
}

fn tolerance_text(t: f64) -> String {
    format!("± {t}")
}

/// The answer against the test's own expectations.
fn check(t: &TestQuery, a: &Answer) -> Vec<Mismatch> {
    let e = &t.expect;
    let mut out = Vec::new();
    if a.status != e.status {
        out.push(Mismatch {
            field: "status".into(),
            expected: e.status.to_string(),
            got: match error_of(&a.body) {
                Some(err) => format!("{} ({err})", a.status),
                None => a.status.to_string(),
            },
        });
        // The body of an unexpected status is not the answer to check.
        return out;
    }
    match t.action {
        TestAction::Predict => {
            let result = &a.body["result"];
            if let Some(g) = &t.generation {
                let got = answered_generation(&a.body);
                if got.as_str() != Some(g.as_str()) {
                    out.push(Mismatch {
                        field: "generation".into(),
                        expected: Value::String(g.clone()).to_string(),
                        got: show(got),
                    });
                }
            }
            if let Some(p) = &e.prediction {
                let got = &result["prediction"];
                if got.as_str() != Some(p.as_str()) {
                    out.push(Mismatch {
                        field: "prediction".into(),
                        expected: Value::String(p.clone()).to_string(),
                        got: show(got),
                    });
                }
            }
            for (class, want) in &e.probas {
                let got = &result["probas"][class];
                let ok = got
                    .as_f64()
                    .is_some_and(|g| (g - want).abs() <= e.tolerance);
                if !ok {
                    out.push(Mismatch {
                        field: format!("probas.{class}"),
                        expected: format!("{want} {}", tolerance_text(e.tolerance)),
                        got: show(got),
                    });
                }
            }
        }
        TestAction::Lookup => {
            let data = &a.body["data"];
            for (column, want) in &e.fields {
                let got = &data[column];
                if !json_eq(got, want) {
                    out.push(Mismatch {
                        field: format!("fields.{column}"),
                        expected: show(want),
                        got: show(got),
                    });
                }
            }
        }
    }
    out
}

/// The generation named in a prediction's answer.
fn answered_generation(body: &Value) -> &Value {
    &body["result"]["generation"]
}

/// This test's answer `a` against the answer `b` of test `other`.
fn same(t: &TestQuery, other: &str, a: &Answer, b: &Answer) -> Vec<Mismatch> {
    let field = |f: &str| format!("same_as({other}).{f}");
    let mut out = Vec::new();
    if a.status != b.status {
        out.push(Mismatch {
            field: field("status"),
            expected: b.status.to_string(),
            got: a.status.to_string(),
        });
        return out;
    }
    match t.action {
        TestAction::Predict => {
            let (ra, rb) = (&a.body["result"], &b.body["result"]);
            if ra["prediction"] != rb["prediction"] {
                out.push(Mismatch {
                    field: field("prediction"),
                    expected: show(&rb["prediction"]),
                    got: show(&ra["prediction"]),
                });
            }
            let empty = serde_json::Map::new();
            let pa = ra["probas"].as_object().unwrap_or(&empty);
            let pb = rb["probas"].as_object().unwrap_or(&empty);
            let mut classes: Vec<&String> = pa.keys().chain(pb.keys()).collect();
            classes.sort();
            classes.dedup();
            for c in classes {
                let (x, y) = (&pa.get(c), &pb.get(c));
                let ok = match (x.and_then(Value::as_f64), y.and_then(Value::as_f64)) {
                    (Some(x), Some(y)) => (x - y).abs() <= t.expect.tolerance,
                    _ => false,
                };
                if !ok {
                    out.push(Mismatch {
                        field: field(&format!("probas.{c}")),
                        expected: format!(
                            "{} {}",
                            y.map_or("(absent)".into(), |v| v.to_string()),
                            tolerance_text(t.expect.tolerance)
                        ),
                        got: x.map_or("(absent)".into(), |v| v.to_string()),
                    });
                }
            }
        }
        TestAction::Lookup => {
            let empty = serde_json::Map::new();
            let da = a.body["data"].as_object().unwrap_or(&empty);
            let db = b.body["data"].as_object().unwrap_or(&empty);
            let mut columns: Vec<&String> = da.keys().chain(db.keys()).collect();
            columns.sort();
            columns.dedup();
            for c in columns {
                let (x, y) = (
                    da.get(c).unwrap_or(&Value::Null),
                    db.get(c).unwrap_or(&Value::Null),
                );
                if !json_eq(x, y) {
                    out.push(Mismatch {
                        field: field(&format!("fields.{c}")),
                        expected: show(y),
                        got: show(x),
                    });
                }
            }
        }
    }
    out
}

/// Where each service is reached, from the live state: an exposure's URL
/// (the ingress first on a cluster), else the service's own (local target).
pub fn service_urls(stack: &Stack, live: &[Live]) -> BTreeMap<String, String> {
    let url_of = |address: &str| {
        live.iter()
            .find(|l| l.address.as_str() == address)
            .and_then(|l| l.outputs.get("url"))
            .and_then(|v| v.as_str())
            .map(str::to_owned)
    };
    let mut out = BTreeMap::new();
    for name in stack.services.keys() {
        let from_expose = stack
            .exposes
            .iter()
            .filter(|(_, e)| &e.service == name)
            .find_map(|(x, _)| {
                url_of(&format!("expose.{x}"))
                    .or_else(|| url_of(&format!("expose.{x}.ingress")))
                    .or_else(|| url_of(&format!("expose.{x}.service")))
            });
        if let Some(url) = from_expose.or_else(|| url_of(&format!("service.{name}"))) {
            out.insert(name.clone(), url);
        }
    }
    out
}

/// The URL a test is sent to.
pub fn url(base: &str, t: &TestQuery) -> String {
    format!(
        "{}/public/api/v1/{}/{}/{}",
        base.trim_end_matches('/'),
        t.service,
        t.endpoint,
        t.action.as_str()
    )
}

fn latency_text(l: Option<Duration>) -> String {
    match l {
        Some(d) => format!("{:.1} ms", d.as_secs_f64() * 1000.0),
        None => "-".into(),
    }
}

fn result_text(o: &Outcome) -> &'static str {
    match o {
        Outcome::Passed => "passed",
        Outcome::Failed(_) => "FAILED",
        Outcome::Error(_) => "ERROR",
    }
}

/// The results as a table, each failure followed by its field-level diff.
pub fn table(results: &[TestResult]) -> String {
    let head = ["SERVICE", "ENDPOINT", "TEST", "RESULT", "LATENCY"];
    let rows: Vec<[String; 5]> = results
        .iter()
        .map(|r| {
            [
                r.service.clone(),
                r.endpoint.clone(),
                r.name.clone(),
                result_text(&r.outcome).to_owned(),
                latency_text(r.latency),
            ]
        })
        .collect();
    let mut widths = head.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, cells: [&str; 5]| {
        let mut s = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i == 4 {
                let _ = write!(s, "{cell:>w$}");
            } else {
                let _ = write!(s, "{cell:<w$}  ");
            }
        }
        out.push_str(s.trim_end());
        out.push('\n');
    };
    line(&mut out, head);
    for (row, r) in rows.iter().zip(results) {
        line(&mut out, [&row[0], &row[1], &row[2], &row[3], &row[4]]);
        match &r.outcome {
            Outcome::Passed => {}
            Outcome::Failed(diffs) => {
                for d in diffs {
                    let _ = writeln!(
                        out,
                        "    {}: expected {}, got {}",
                        d.field, d.expected, d.got
                    );
                }
            }
            Outcome::Error(e) => {
                let _ = writeln!(out, "    {e}");
            }
        }
    }
    let passed = results.iter().filter(|r| r.passed()).count();
    let _ = writeln!(out, "{passed} passed, {} failed", results.len() - passed);
    out
}

/// How the instance's teardown went, for the reports.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Teardown {
    /// `destroyed`, `kept` (`--keep`) or `failed`.
    pub status: String,
    /// What the sweep by ownership marks still found (empty: nothing).
    pub left: Vec<String>,
    /// The command that removes what is left (or what was kept).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destroy_command: Option<String>,
}

impl Teardown {
    pub fn clean(&self) -> bool {
        self.status == "destroyed" && self.left.is_empty()
    }
}

/// What `mesh test` ran, for `--json` and `--junit`.
pub struct Report<'a> {
    pub stack: &'a str,
    pub env: &'a str,
    /// The test instance (None: `--live`).
    pub instance: Option<&'a str>,
    pub results: &'a [TestResult],
    pub teardown: Option<&'a Teardown>,
    /// Wall time of the whole run.
    pub elapsed: Duration,
    /// Why no result could be had, when the run stopped before the queries.
    pub aborted: Option<&'a str>,
}

impl Report<'_> {
    pub fn passed(&self) -> bool {
        self.aborted.is_none()
            && self.results.iter().all(TestResult::passed)
            && self
                .teardown
                .is_none_or(|t| t.clean() || t.status == "kept")
    }
}

/// The versioned JSON document of a run.
pub fn json(r: &Report<'_>) -> Value {
    let tests: Vec<Value> = r
        .results
        .iter()
        .map(|t| {
            let mut v = serde_json::json!({
                "service": t.service,
                "endpoint": t.endpoint,
                "test": t.name,
                "result": result_text(&t.outcome).to_lowercase(),
                "latency_ms": t.latency.map(|l| l.as_secs_f64() * 1000.0),
            });
            match &t.outcome {
                Outcome::Passed => {}
                Outcome::Failed(d) => v["mismatches"] = serde_json::json!(d),
                Outcome::Error(e) => v["error"] = Value::String(e.clone()),
            }
            v
        })
        .collect();
    let passed = r.results.iter().filter(|t| t.passed()).count();
    serde_json::json!({
        "format_version": "mesh-test/1",
        "stack": r.stack,
        "env": r.env,
        "instance": r.instance,
        "passed": passed,
        "failed": r.results.len() - passed,
        "ok": r.passed(),
        "aborted": r.aborted,
        "tests": tests,
        "teardown": r.teardown,
        "elapsed_ms": r.elapsed.as_secs_f64() * 1000.0,
    })
}

/// XML text and attribute escaping.
fn xml(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // Characters XML 1.0 cannot carry.
            c if (c as u32) < 0x20 && !matches!(c, '\t' | '\n' | '\r') => out.push('?'),
            c => out.push(c),
        }
    }
    out
}

fn secs(d: Option<Duration>) -> String {
    format!("{:.3}", d.map_or(0.0, |d| d.as_secs_f64()))
}

/// JUnit XML (the format CI systems read): one `<testsuite>` per service,
/// one `<testcase>` per test (classname `service.endpoint`), and a
/// `mesh.teardown` case when an instance was torn down.
pub fn junit(r: &Report<'_>) -> String {
    struct Case {
        classname: String,
        name: String,
        time: Option<Duration>,
        /// (element, message, text)
        problem: Option<(&'static str, String, String)>,
    }
    let mut suites: BTreeMap<String, Vec<Case>> = BTreeMap::new();
    for t in r.results {
        let problem = match &t.outcome {
            Outcome::Passed => None,
            Outcome::Failed(d) => Some((
                "failure",
                format!(
                    "{} mismatch{}",
                    d.len(),
                    if d.len() == 1 { "" } else { "es" }
                ),
                d.iter()
                    .map(|m| format!("{}: expected {}, got {}", m.field, m.expected, m.got))
                    .collect::<Vec<_>>()
                    .join("\n"),
            )),
            Outcome::Error(e) => Some(("error", e.clone(), e.clone())),
        };
        suites.entry(t.service.clone()).or_default().push(Case {
            classname: format!("{}.{}", t.service, t.endpoint),
            name: t.name.clone(),
            time: t.latency,
            problem,
        });
    }
    let mut mesh_cases = Vec::new();
    if let Some(reason) = r.aborted {
        mesh_cases.push(Case {
            classname: "mesh.instance".into(),
            name: "apply".into(),
            time: None,
            problem: Some(("error", reason.to_owned(), reason.to_owned())),
        });
    }
    if let Some(t) = r.teardown {
        let problem = (!t.clean() && t.status != "kept").then(|| {
            let mut text = format!("teardown {}", t.status);
            for l in &t.left {
                let _ = write!(text, "\nleft behind: {l}");
            }
            if let Some(c) = &t.destroy_command {
                let _ = write!(text, "\nremove it with: {c}");
            }
            ("failure", format!("teardown {}", t.status), text)
        });
        mesh_cases.push(Case {
            classname: "mesh.instance".into(),
            name: "teardown".into(),
            time: None,
            problem,
        });
    }
    if !mesh_cases.is_empty() {
        suites.insert("mesh".into(), mesh_cases);
    }
    let count = |cases: &[Case], el: &str| {
        cases
            .iter()
            .filter(|c| c.problem.as_ref().is_some_and(|p| p.0 == el))
            .count()
    };
    let all: Vec<&Case> = suites.values().flatten().collect();
    let failures = all
        .iter()
        .filter(|c| c.problem.as_ref().is_some_and(|p| p.0 == "failure"))
        .count();
    let errors = all
        .iter()
        .filter(|c| c.problem.as_ref().is_some_and(|p| p.0 == "error"))
        .count();
    let what = match r.instance {
        Some(i) => format!("{} ({}, instance {i})", r.stack, r.env),
        None => format!("{} ({}, live)", r.stack, r.env),
    };
    let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let _ = writeln!(
        out,
        "<testsuites name=\"mesh test {}\" tests=\"{}\" failures=\"{failures}\" errors=\"{errors}\" time=\"{}\">",
        xml(&what),
        all.len(),
        secs(Some(r.elapsed))
    );
    for (suite, cases) in &suites {
        let time: Duration = cases.iter().filter_map(|c| c.time).sum();
        let _ = writeln!(
            out,
            "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{}\" errors=\"{}\" skipped=\"0\" time=\"{}\">",
            xml(suite),
            cases.len(),
            count(cases, "failure"),
            count(cases, "error"),
            secs(Some(time))
        );
        for c in cases {
            let head = format!(
                "    <testcase classname=\"{}\" name=\"{}\" time=\"{}\"",
                xml(&c.classname),
                xml(&c.name),
                secs(c.time)
            );
            match &c.problem {
                None => {
                    let _ = writeln!(out, "{head}/>");
                }
                Some((el, message, text)) => {
                    let _ = writeln!(
                        out,
                        "{head}>\n      <{el} message=\"{}\" type=\"{}\">{}</{el}>\n    </testcase>",
                        xml(message),
                        if *el == "failure" {
                            "mismatch"
                        } else {
                            "error"
                        },
                        xml(text)
                    );
                }
            }
        }
        out.push_str("  </testsuite>\n");
    }
    out.push_str("</testsuites>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stack::{DEFAULT_TOLERANCE, Expect};

    fn query(endpoint: &str, name: &str, action: TestAction, expect: Expect) -> TestQuery {
        TestQuery {
            service: "svc".into(),
            endpoint: endpoint.into(),
            name: name.into(),
            action,
            request: serde_json::json!({}),
            generation: None,
            expect,
        }
    }

    fn expect() -> Expect {
        Expect {
            status: 200,
            prediction: None,
            probas: BTreeMap::new(),
            tolerance: DEFAULT_TOLERANCE,
            fields: BTreeMap::new(),
            same_as: None,
        }
    }

    fn answer(status: u16, body: Value) -> Result<Answer, String> {
        Ok(Answer {
            status,
            body,
            latency: Duration::from_millis(3),
        })
    }

    fn predicted(label: &str, p1: f64) -> Value {
        serde_json::json!({"result": {"prediction": label, "probas": {"0": 1.0 - p1, "1": p1}, "enriched": []}})
    }

    #[test]
    fn patterns_match_substrings_or_globs() {
        assert!(matches("scoring", "customer-scoring/high-value/by-id"));
        assert!(!matches("features", "customer-scoring/high-value/by-id"));
        assert!(matches("*/by-id", "customer-scoring/high-value/by-id"));
        assert!(matches(
            "customer-*/high-*/by*",
            "customer-scoring/high-value/by-id"
        ));
        assert!(!matches("*/by-id", "customer-scoring/high-value/by-idx"));
        assert!(matches("*", "a/b/c"));
    }

    #[test]
    fn a_pinned_generation_must_be_the_one_that_answered() {
        let mut t = query("p", "t", TestAction::Predict, expect());
        t.generation = Some("v2".into());
        let named = |g: &str| {
            let mut body = predicted("1", 0.8);
            body["result"]["generation"] = Value::from(g);
            Answers::from([("svc/p/t".into(), answer(200, body))])
        };
        assert_eq!(evaluate(&[&t], &named("v2"))[0].outcome, Outcome::Passed);
        let Outcome::Failed(d) = &evaluate(&[&t], &named("v1"))[0].outcome else {
            panic!("must fail")
        };
        assert_eq!(
            (d[0].field.as_str(), d[0].got.as_str()),
            ("generation", "\"v1\"")
        );
    }

    #[test]
    fn probabilities_within_the_tolerance_pass_outside_fail_field_by_field() {
        let mut e = expect();
        e.prediction = Some("1".into());
        e.probas = BTreeMap::from([("0".into(), 0.2), ("1".into(), 0.8)]);
        e.tolerance = 0.01;
        let t = query("p", "t", TestAction::Predict, e);
        let ok = Answers::from([("svc/p/t".into(), answer(200, predicted("1", 0.805)))]);
        assert_eq!(evaluate(&[&t], &ok)[0].outcome, Outcome::Passed);

        let off = Answers::from([("svc/p/t".into(), answer(200, predicted("0", 0.4)))]);
        let Outcome::Failed(d) = &evaluate(&[&t], &off)[0].outcome else {
            panic!("must fail")
        };
        let fields: Vec<&str> = d.iter().map(|m| m.field.as_str()).collect();
        assert_eq!(fields, ["prediction", "probas.0", "probas.1"]);
        assert_eq!(d[2].expected, "0.8 ± 0.01");
        assert_eq!(d[2].got, "0.4");
    }

    #[test]
    fn an_unexpected_status_is_reported_with_the_services_error_not_the_body() {
        let mut e = expect();
        e.fields = BTreeMap::from([("age".into(), serde_json::json!(28))]);
        let t = query("l", "t", TestAction::Lookup, e);
        let body = serde_json::json!({"error": {"code": "unauthorized", "message": "no key"}});
        let a = Answers::from([("svc/l/t".into(), answer(401, body))]);
        assert_eq!(
            evaluate(&[&t], &a)[0].outcome,
            Outcome::Failed(vec![Mismatch {
                field: "status".into(),
                expected: "200".into(),
                got: "401 (unauthorized: no key)".into()
            }])
        );
    }

    #[test]
    fn lookup_fields_compare_numbers_by_value_and_report_absent_columns() {
        let mut e = expect();
        e.fields = BTreeMap::from([
            ("age".into(), serde_json::json!(28)),
            ("region".into(), serde_json::json!("west")),
            ("tier".into(), serde_json::json!("gold")),
        ]);
        let t = query("l", "t", TestAction::Lookup, e);
        let body = serde_json::json!({"data": {"age": 28.0, "region": "east"}});
        let Outcome::Failed(d) = &evaluate(
            &[&t],
            &Answers::from([("svc/l/t".into(), answer(200, body))]),
        )[0]
        .outcome
        else {
            panic!("must fail")
        };
        assert_eq!(
            d.iter()
                .map(|m| (m.field.as_str(), m.expected.as_str(), m.got.as_str()))
                .collect::<Vec<_>>(),
            [
                ("fields.region", "\"west\"", "\"east\""),
                ("fields.tier", "\"gold\"", "(absent)")
            ]
        );
    }

    #[test]
    fn same_as_compares_two_answers_and_needs_the_other_one() {
        let mut e = expect();
        e.same_as = Some("full".into());
        let by_id = query("p", "by-id", TestAction::Predict, e);
        let full = query("p", "full", TestAction::Predict, expect());
        let equal = Answers::from([
            ("svc/p/by-id".into(), answer(200, predicted("1", 0.7))),
            ("svc/p/full".into(), answer(200, predicted("1", 0.7))),
        ]);
        let r = evaluate(&[&by_id, &full], &equal);
        assert!(r.iter().all(TestResult::passed), "{r:?}");

        let differ = Answers::from([
            ("svc/p/by-id".into(), answer(200, predicted("0", 0.3))),
            ("svc/p/full".into(), answer(200, predicted("1", 0.7))),
        ]);
        let Outcome::Failed(d) = &evaluate(&[&by_id], &differ)[0].outcome else {
            panic!("must fail")
        };
        assert_eq!(d[0].field, "same_as(full).prediction");
        assert_eq!(d[1].field, "same_as(full).probas.0");

        let missing = Answers::from([
            ("svc/p/by-id".into(), answer(200, predicted("1", 0.7))),
            ("svc/p/full".into(), Err("connection refused".into())),
        ]);
        let Outcome::Failed(d) = &evaluate(&[&by_id], &missing)[0].outcome else {
            panic!("must fail")
        };
        assert!(d[0].got.contains("connection refused"), "{d:?}");
    }

    #[test]
    fn a_filter_still_sends_the_tests_a_selected_one_is_same_as() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("stacks/customer-mesh");
        let stack =
            crate::stack::load(&root, Some("local")).unwrap_or_else(|r| panic!("{}", r.render()));
        let (reported, sent) = select(&stack, Some("by-id"));
        assert_eq!(
            reported.iter().map(|t| id(t)).collect::<Vec<_>>(),
            ["customer-scoring/high-value/by-id"]
        );
        assert_eq!(
            sent.iter().map(|t| id(t)).collect::<Vec<_>>(),
            [
                "customer-scoring/high-value/by-id",
                "customer-scoring/high-value/all-features"
            ]
        );
        let (all, _) = select(&stack, None);
        assert!(all.len() >= 4);
    }

    #[test]
    fn an_instance_has_its_own_marks_namespace_and_ports() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("stacks/customer-mesh");
        let load =
            |env| crate::stack::load(&root, Some(env)).unwrap_or_else(|r| panic!("{}", r.render()));
        let local = load("local").instance("test-1a2b3c");
        assert_eq!(local.env.name, "local-test-1a2b3c");
        assert_eq!(local.env.instance.as_ref().unwrap().of, "local");
        assert_eq!(
            local.env.namespace.as_deref(),
            Some("customer-mesh-test-1a2b3c")
        );
        for e in local.exposes.values() {
            if let crate::stack::ExposeKind::NodePort { node_port, .. } = e.kind {
                assert_eq!(node_port, None, "{}", e.name);
            }
        }
        assert!(!local.reuses_platform());
        assert_eq!(local.tests().count(), load("local").tests().count());
        let existing = load("existing").instance("t");
        assert!(existing.reuses_platform());
        assert_eq!(existing.platform_env(), "existing");
        assert_eq!(existing.env.name, "existing-t");
    }

    fn results() -> Vec<TestResult> {
        vec![
            TestResult {
                service: "svc".into(),
                endpoint: "p".into(),
                name: "ok".into(),
                outcome: Outcome::Passed,
                latency: Some(Duration::from_micros(2500)),
            },
            TestResult {
                service: "svc".into(),
                endpoint: "p".into(),
                name: "bad<&>".into(),
                outcome: Outcome::Failed(vec![Mismatch {
                    field: "probas.1".into(),
                    expected: "0.8 ± 0.01".into(),
                    got: "0.4".into(),
                }]),
                latency: Some(Duration::from_millis(4)),
            },
            TestResult {
                service: "other".into(),
                endpoint: "l".into(),
                name: "down".into(),
                outcome: Outcome::Error("connection refused".into()),
                latency: None,
            },
        ]
    }

    #[test]
    fn the_table_shows_each_failure_field_by_field() {
        let t = table(&results());
        assert_eq!(
            t,
            "SERVICE  ENDPOINT  TEST    RESULT  LATENCY\n\
             svc      p         ok      passed   2.5 ms\n\
             svc      p         bad<&>  FAILED   4.0 ms\n    \
             probas.1: expected 0.8 ± 0.01, got 0.4\n\
             other    l         down    ERROR         -\n    \
             connection refused\n\
             1 passed, 2 failed\n"
        );
    }

    #[test]
    fn json_and_junit_carry_results_and_teardown() {
        let results = results();
        let teardown = Teardown {
            status: "destroyed".into(),
            left: vec!["service.x".into()],
            destroy_command: Some("mesh destroy s --env local --instance test-1".into()),
        };
        let r = Report {
            stack: "s",
            env: "local",
            instance: Some("test-1"),
            results: &results,
            teardown: Some(&teardown),
            elapsed: Duration::from_secs(2),
            aborted: None,
        };
        assert!(!r.passed());
        let j = json(&r);
        assert_eq!(j["passed"], 1);
        assert_eq!(j["failed"], 2);
        assert_eq!(j["tests"][1]["mismatches"][0]["field"], "probas.1");
        assert_eq!(j["teardown"]["left"][0], "service.x");
        let x = junit(&r);
        assert!(x.contains("name=\"bad&lt;&amp;&gt;\""), "{x}");
        assert!(x.contains("tests=\"4\" failures=\"2\" errors=\"1\""), "{x}");
    }
}
