//! An endpoint's `[[...test]]` queries (`mesh test`): request, expected
//! answer, tolerance and `same_as`.

use std::collections::BTreeMap;

use crate::stack::decode::{Fields, wrong_type};
use crate::stack::diag::{Code, Diagnostic, did_you_mean};
use crate::stack::model::*;
use crate::stack::source::{Node, NodeKind, Span};

use super::{Ctx, check_name};

/// The test queries of one endpoint (`[[service.S.endpoint.E.test]]`).
/// The tests of an endpoint; `generations` are the names a test may pin
/// (none: the endpoint has no generations).
pub(super) fn decode_tests(
    ctx: &mut Ctx<'_>,
    service: &str,
    endpoint: &str,
    action: TestAction,
    ef: &Fields<'_>,
    generations: &[&str],
) -> Vec<TestQuery> {
    let Some(e) = ef.entry("test") else {
        return Vec::new();
    };
    let NodeKind::Array(items) = &e.value.kind else {
        ctx.errors.push(
            wrong_type(e, "an array of tables", &e.value.kind).help(format!(
                "declare each test as [[service.{service}.endpoint.{endpoint}.test]]"
            )),
        );
        return Vec::new();
    };
    let what = format!("a test of service.{service}.endpoint.{endpoint}");
    let (this_kind, other_kind) = match action {
        TestAction::Predict => ("a prediction", "lookup"),
        TestAction::Lookup => ("a lookup", "prediction"),
    };
    let mut out = Vec::new();
    let mut names: Vec<(String, Span)> = Vec::new();
    let mut same_as: Vec<(String, Span, String)> = Vec::new();
    for it in items {
        let NodeKind::Table(t) = &it.kind else {
            ctx.errors.push(
                Diagnostic::new(Code::WrongType, it.span, format!("{what} must be a table"))
                    .label("expected a table")
                    .help(format!(
                        "declare each test as [[service.{service}.endpoint.{endpoint}.test]]"
                    )),
            );
            continue;
        };
        let tf = Fields::new(t, it.span, what.clone());
        tf.allow(
            ctx.errors,
            &[
                "name",
                "request",
                "status",
                "prediction",
                "probas",
                "tolerance",
                "fields",
                "same_as",
                "generation",
            ],
        );
        let name = tf.str_req(ctx.errors, "name", "\"by-id\"");
        if let Some((n, span)) = &name {
            check_name(ctx, n, *span, "test name");
            if let Some((_, first)) = names.iter().find(|(m, _)| m == n) {
                ctx.errors.push(
                    Diagnostic::new(
                        Code::Duplicate,
                        *span,
                        format!("service.{service}.endpoint.{endpoint} has two tests named `{n}`"),
                    )
                    .label("second test of that name")
                    .related(*first, "first defined here")
                    .help("give each test of an endpoint its own name"),
                );
            } else {
                names.push((n.clone(), *span));
            }
        }
        // Parts that only make sense on the other kind of endpoint.
        let misplaced: &[(&str, &str)] = match action {
            TestAction::Predict => &[(
                "fields",
                "`fields` checks the columns of a lookup; a prediction is checked by `prediction` and `probas`",
            )],
            TestAction::Lookup => &[
                (
                    "prediction",
                    "`prediction` checks a prediction endpoint; a lookup is checked by `fields`",
                ),
                (
                    "probas",
                    "`probas` checks a prediction endpoint; a lookup is checked by `fields`",
                ),
                (
                    "generation",
                    "`generation` pins one of a prediction endpoint's generations; a lookup has none",
                ),
                (
                    "tolerance",
                    "a lookup's fields are compared exactly; `tolerance` applies to the probabilities of a prediction endpoint",
                ),
            ],
        };
        let mut misplaced_found = false;
        for (key, help) in misplaced {
            if let Some(m) = tf.entry(key) {
                misplaced_found = true;
                ctx.errors.push(
                    Diagnostic::new(
                        Code::InvalidValue,
                        m.key_span,
                        format!("`{key}` in {what}, which is {this_kind} endpoint"),
                    )
                    .label(format!("only for {other_kind} endpoints"))
                    .help(*help),
                );
            }
        }
        let request = match tf.entry("request") {
            None => {
                let example = match action {
                    TestAction::Predict => "{ features = { customer_id = \"C00042\" } }",
                    TestAction::Lookup => "{ data = { customer_id = \"C00042\" } }",
                };
                ctx.errors.push(
                    Diagnostic::new(
                        Code::MissingField,
                        it.span,
                        format!("missing field `request` in {what}"),
                    )
                    .label("`request` is required here")
                    .help(format!(
                        "add `request = {example}` (the JSON body the endpoint takes)"
                    )),
                );
                None
            }
            Some(r) => {
                let top = match action {
                    TestAction::Predict => "features",
                    TestAction::Lookup => "data",
                };
                match &r.value.kind {
                    NodeKind::Table(rt) if rt.get(top).is_none() => {
                        ctx.errors.push(
                            Diagnostic::new(
                                Code::InvalidValue,
                                r.value.span,
                                format!("the request of {what} has no `{top}`"),
                            )
                            .label(format!("{this_kind} endpoint reads `{top}`"))
                            .help(format!(
                                "e.g. request = {{ {top} = {{ customer_id = \"C00042\" }} }}"
                            )),
                        );
                        None
                    }
                    NodeKind::Table(_) => json_of(ctx, &r.value),
                    other => {
                        ctx.errors.push(wrong_type(r, "a table", other));
                        None
                    }
                }
            }
        };
        let status = match tf.int_opt(ctx.errors, "status") {
            None => Some(200),
            Some((v, span)) => match u16::try_from(v) {
                Ok(v) if (100..=599).contains(&v) => Some(v),
                _ => {
                    ctx.errors.push(
                        Diagnostic::new(
                            Code::InvalidValue,
                            span,
                            format!("`status` must be an HTTP status, found {v}"),
                        )
                        .label("not from 100 to 599")
                        .help("e.g. status = 200, or 401 for a request without a key"),
                    );
                    None
                }
            },
        };
        let prediction = match action {
            TestAction::Predict => tf.str_opt(ctx.errors, "prediction").map(|v| v.0),
            TestAction::Lookup => None,
        };
        let mut probas = BTreeMap::new();
        if action == TestAction::Predict
            && let Some((pt, _)) = tf.table_opt(ctx.errors, "probas")
        {
            for pe in &pt.entries {
                match number(&pe.value.kind) {
                    Some(p) if (0.0..=1.0).contains(&p) => {
                        probas.insert(pe.key.clone(), p);
                    }
                    Some(p) => ctx.errors.push(
                        Diagnostic::new(
                            Code::InvalidValue,
                            pe.value.span,
                            format!(
                                "the probability of class `{}` must be from 0 to 1, found {p}",
                                pe.key
                            ),
                        )
                        .label("not a probability")
                        .help("e.g. probas = { \"0\" = 0.8, \"1\" = 0.2 }"),
                    ),
                    None => ctx.errors.push(wrong_type(pe, "a number", &pe.value.kind)),
                }
            }
        }
        let mut tolerance = DEFAULT_TOLERANCE;
        if action == TestAction::Predict
            && let Some(te) = tf.entry("tolerance")
        {
            match number(&te.value.kind) {
                Some(t) if t >= 0.0 && t.is_finite() => tolerance = t,
                Some(t) => ctx.errors.push(
                    Diagnostic::new(
                        Code::InvalidValue,
                        te.value.span,
                        format!("`tolerance` must be a non-negative number, found {t}"),
                    )
                    .label("out of range")
                    .help("e.g. tolerance = 0.001"),
                ),
                None => ctx.errors.push(wrong_type(te, "a number", &te.value.kind)),
            }
        }
        let mut fields = BTreeMap::new();
        if action == TestAction::Lookup
            && let Some((ft, _)) = tf.table_opt(ctx.errors, "fields")
        {
            for fe in &ft.entries {
                if let Some(v) = json_of(ctx, &fe.value) {
                    fields.insert(fe.key.clone(), v);
                }
            }
        }
        let generation = match action {
            TestAction::Predict => tf.str_opt(ctx.errors, "generation"),
            TestAction::Lookup => None,
        };
        if let Some((g, span)) = &generation
            && !generations.contains(&g.as_str())
        {
            let d = Diagnostic::new(
                Code::DanglingReference,
                *span,
                format!("{what} pins generation `{g}`, which the endpoint does not have"),
            )
            .label("no such generation");
            ctx.errors.push(if generations.is_empty() {
                d.help(format!(
                    "the endpoint has one model: remove `generation`, or declare [[service.{service}.endpoint.{endpoint}.generation]]"
                ))
            } else {
                d.help(format!("its generations: {}", generations.join(", ")))
            });
        }
        let same = tf.str_opt(ctx.errors, "same_as");
        if let (Some((other, span)), Some((n, _))) = (&same, &name) {
            same_as.push((other.clone(), *span, n.clone()));
        }
        if let (Some((name, _)), Some(request), Some(status), false) =
            (name, request, status, misplaced_found)
        {
            out.push(TestQuery {
                service: service.to_owned(),
                endpoint: endpoint.to_owned(),
                name,
                action,
                request,
                generation: generation.map(|g| g.0),
                expect: Expect {
                    status,
                    prediction,
                    probas,
                    tolerance,
                    fields,
                    same_as: same.map(|v| v.0),
                },
            });
        }
    }
    for (other, span, from) in same_as {
        if other == from {
            ctx.errors.push(
                Diagnostic::new(
                    Code::InvalidValue,
                    span,
                    format!("test `{from}` is `same_as` itself"),
                )
                .label("the test's own name")
                .help("name another test of the same endpoint whose answer this one must equal"),
            );
            continue;
        }
        if names.iter().any(|(n, _)| *n == other) {
            continue;
        }
        let mut d = Diagnostic::new(
            Code::DanglingReference,
            span,
            format!(
                "test `{from}` is `same_as` undefined test `{other}` of service.{service}.endpoint.{endpoint}"
            ),
        )
        .label(format!("no test named `{other}` on this endpoint"));
        let candidates: Vec<&str> = names
            .iter()
            .map(|(n, _)| n.as_str())
            .filter(|n| *n != from)
            .collect();
        d = match did_you_mean(&other, candidates.iter().copied()) {
            Some(x) => d.help(format!("did you mean `{x}`?")),
            None if candidates.is_empty() => d.help(format!(
                "declare it first: another [[service.{service}.endpoint.{endpoint}.test]] with name = \"{other}\""
            )),
            None => d.help(format!("tests of this endpoint: {}", candidates.join(", "))),
        };
        ctx.errors.push(d);
    }
    out
}

/// A TOML integer or float as `f64`.
fn number(k: &NodeKind) -> Option<f64> {
    match k {
        NodeKind::Int(i) => Some(*i as f64),
        NodeKind::Float(f) => Some(*f),
        _ => None,
    }
}

/// The JSON form of a TOML value (a test's request or expected fields).
fn json_of(ctx: &mut Ctx<'_>, n: &Node) -> Option<serde_json::Value> {
    use serde_json::Value as J;
    Some(match &n.kind {
        k if k.is_unresolved() => return None,
        NodeKind::Str(s) => J::String(s.clone()),
        NodeKind::Int(i) => J::from(*i),
        NodeKind::Bool(b) => J::Bool(*b),
        NodeKind::Float(f) => match serde_json::Number::from_f64(*f) {
            Some(x) => J::Number(x),
            None => {
                ctx.errors.push(
                    Diagnostic::new(Code::InvalidValue, n.span, format!("{f} has no JSON form"))
                        .label("not a finite number")
                        .help("JSON numbers are finite: use a number, or a string"),
                );
                return None;
            }
        },
        NodeKind::Datetime => {
            ctx.errors.push(
                Diagnostic::new(Code::InvalidValue, n.span, "a TOML date has no JSON form")
                    .label("a date")
                    .help("quote it to send it as a string"),
            );
            return None;
        }
        NodeKind::Array(items) => {
            let mut out = Vec::new();
            for it in items {
                out.push(json_of(ctx, it)?);
            }
            J::Array(out)
        }
        NodeKind::Table(t) => {
            let mut out = serde_json::Map::new();
            for e in &t.entries {
                out.insert(e.key.clone(), json_of(ctx, &e.value)?);
            }
            J::Object(out)
        }
    })
}
