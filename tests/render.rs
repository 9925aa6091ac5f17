//! Plan rendering, driven by data.
//!
//! Each `tests/data/render/<case>.json` is a saved [`Plan`]. [`check`] renders
//! it without colour, with colour (the escape character shown as `␛` so the
//! snapshot can be read) and as JSON, and snapshots all three under
//! `tests/snapshots/render__<case>_{plain,color,json}.snap`.
//!
//! To add a case: write the plan file, add its name to `cases!` below, run
//! `INSTA_UPDATE=always cargo test --test render` and read the new snapshots.

use std::path::{Path, PathBuf};

use mesh::plan::Plan;
use mesh::render::{self, Style};

macro_rules! cases {
    ($($case:ident),* $(,)?) => {
        const CASES: &[&str] = &[$(stringify!($case)),*];
        $(
            #[test]
            fn $case() {
                check(stringify!($case));
            }
        )*
    };
}

cases!(
    create, update, replace, delete, no_op, empty, sensitive, unknown, mixed
);

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/render")
}

fn load(case: &str) -> Plan {
    let path = data_dir().join(format!("{case}.json"));
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not a plan: {e}", path.display()))
}

fn check(case: &str) {
    let plan = load(case);
    let plain = render::human(&plan, Style::PLAIN);
    let color = render::human(&plan, Style::COLOR);
    let json = render::json(&plan);

    assert!(
        !plain.contains('\x1b'),
        "plain output has escape codes:\n{plain}"
    );
    assert_eq!(
        strip_ansi(&color),
        plain,
        "colour must only add escape codes"
    );
    assert_eq!(json["format_version"], render::FORMAT_VERSION);
    assert_eq!(
        json["resource_changes"].as_array().map(Vec::len),
        Some(plan.changes.len())
    );
    assert_no_secret(&plan, &[&plain, &color, &json.to_string()]);

    insta::with_settings!({
        description => format!("tests/data/render/{case}.json"),
        omit_expression => true,
        sort_maps => true,
    }, {
        insta::assert_snapshot!(format!("{case}_plain"), plain);
        insta::assert_snapshot!(format!("{case}_color"), color.replace('\x1b', "␛"));
        insta::assert_json_snapshot!(format!("{case}_json"), json);
    });
}

#[test]
fn every_case_file_is_checked() {
    let mut found: Vec<String> = std::fs::read_dir(data_dir())
        .expect("tests/data/render exists")
        .map(|e| e.expect("readable entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .map(|p| {
            p.file_stem()
                .expect("a file name")
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    found.sort();
    let mut listed: Vec<String> = CASES.iter().map(|c| c.to_string()).collect();
    listed.sort();
    assert_eq!(
        found, listed,
        "every tests/data/render/*.json needs an entry in cases!"
    );
}

#[test]
fn sensitive_digests_never_appear() {
    // The sensitive case holds secrets in creates, updates, deletes and inside maps.
    let plan = load("sensitive");
    let digests = sensitive_digests(&plan);
    assert_eq!(digests.len(), 7, "the fixture's secrets: {digests:?}");
    let plain = render::human(&plan, Style::PLAIN);
    assert!(plain.contains("(sensitive)"));
    let json = render::json(&plan);
    let changes = json["resource_changes"]
        .as_array()
        .expect("resource_changes is an array");
    let flagged = changes
        .iter()
        .flat_map(|c| c["fields"].as_array().expect("fields is an array"))
        .filter(|f| f["before_sensitive"] == true || f["after_sensitive"] == true)
        .count();
    assert_eq!(
        flagged, 5,
        "password, api_key, dsn, env and token are flagged"
    );
    assert_no_secret(
        &plan,
        &[
            &plain,
            &render::human(&plan, Style::COLOR),
            &json.to_string(),
        ],
    );
}

#[test]
fn summary_lines() {
    let plan = load("mixed");
    let summary = plan.summary();
    assert_eq!(
        render::summary_line(&summary),
        "Plan: 2 to add, 1 to change, 2 to destroy."
    );
    assert!(
        render::human(&plan, Style::PLAIN)
            .ends_with("Plan: 2 to add, 1 to change, 2 to destroy.\n")
    );
}

/// Fails if any sensitive digest of `plan` (or its hex part) is in an output.
fn assert_no_secret(plan: &Plan, outputs: &[&str]) {
    for digest in sensitive_digests(plan) {
        let hex = digest.rsplit(':').next().unwrap_or(&digest).to_owned();
        for out in outputs {
            assert!(
                !out.contains(&hex),
                "sensitive digest {digest} printed in:\n{out}"
            );
        }
    }
}

/// Every `Value::Sensitive` digest anywhere in the plan, found in its serialised form.
fn sensitive_digests(plan: &Plan) -> Vec<String> {
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                let digest = m
                    .get("v")
                    .and_then(|v| v.get("digest"))
                    .and_then(|d| d.as_str());
                if let (Some("sensitive"), Some(d)) = (m.get("t").and_then(|t| t.as_str()), digest)
                {
                    out.push(d.to_owned());
                }
                m.values().for_each(|v| walk(v, out));
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(
        &serde_json::to_value(plan).expect("a plan serialises"),
        &mut out,
    );
    out.sort();
    out.dedup();
    out
}

/// Removes ANSI SGR sequences (`ESC [ ... m`).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
