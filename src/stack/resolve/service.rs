//! `[service.NAME]`: datasets, endpoints, enrichments, keys and `allow`, and
//! the check that services do not enrich from each other in a circle.

use std::collections::{BTreeMap, BTreeSet};

use crate::stack::decode::{Fields, wrong_type};
use crate::stack::diag::{Code, Diagnostic, did_you_mean};
use crate::stack::model::*;
use crate::stack::source::{Entry, Node, NodeKind, Span, Table};

use super::dataset::{decode_cache, decode_dataset};
use super::generation::{check_generations, decode_models};
use super::test_query::decode_tests;
use super::{Ctx, check_name, secret_node};

pub(super) fn decode_service(
    ctx: &mut Ctx<'_>,
    name: &str,
    t: &Table,
    span: Span,
) -> Option<Service> {
    let f = Fields::new(t, span, format!("service.{name}"));
    f.allow(
        ctx.errors,
        &[
            "version",
            "replicas",
            "autoscaling",
            "resources",
            "dataset",
            "endpoint",
            "api_keys",
            "request_timeout",
            "access_log",
            "query_log",
        ],
    );
    let base = ctx.base_dir(&format!("service.{name}"));
    let request_timeout_ms = f
        .duration_opt(ctx.errors, "request_timeout")
        .map(|(d, _)| d.as_millis().min(u64::MAX as u128) as u64);
    let access_log = f.bool_opt(ctx.errors, "access_log");
    let query_log = f
        .table_opt(ctx.errors, "query_log")
        .map(|(qt, qspan)| decode_query_log(ctx, name, qt, qspan, &base));
    let version = f
        .str_opt(ctx.errors, "version")
        .map(|v| v.0)
        .unwrap_or_else(|| "0.1.0".into());
    let replicas = f.u32_opt(ctx.errors, "replicas").unwrap_or(1);
    let autoscaling = f.table_opt(ctx.errors, "autoscaling").map(|(at, aspan)| {
        let af = Fields::new(at, aspan, format!("service.{name}.autoscaling"));
        af.allow(ctx.errors, &["min", "max", "cpu_percent"]);
        let min = af.u32_opt(ctx.errors, "min").unwrap_or(1);
        let max = af.u32_opt(ctx.errors, "max").unwrap_or(min);
        let cpu = af.u32_opt(ctx.errors, "cpu_percent").unwrap_or(70);
        if min == 0 || min > max || cpu == 0 || cpu > 100 {
            ctx.errors.push(Diagnostic::new(Code::InvalidValue, aspan, format!("autoscaling needs 1 ≤ min ≤ max and 1 ≤ cpu_percent ≤ 100, found min {min}, max {max}, cpu_percent {cpu}")).label("inconsistent bounds").help("e.g. autoscaling = { min = 2, max = 6, cpu_percent = 70 }"));
        }
        Autoscaling { min, max, cpu_percent: cpu }
    });
    let resources = match f.table_opt(ctx.errors, "resources") {
        Some((rt, rspan)) => {
            let rf = Fields::new(rt, rspan, format!("service.{name}.resources"));
            rf.allow(ctx.errors, &["cpu", "memory"]);
            let cpu = rf.str_opt(ctx.errors, "cpu");
            if let Some((q, span)) = &cpu
                && cpu_millis(q).is_none()
            {
                ctx.errors.push(
                    Diagnostic::new(
                        Code::InvalidValue,
                        *span,
                        format!("`{q}` is not a CPU quantity"),
                    )
                    .label("expected millicores or cores")
                    .help("e.g. cpu = \"250m\" (a quarter core), \"0.5\" or \"2\""),
                );
            }
            Resources {
                cpu: cpu.map(|v| v.0).unwrap_or_else(|| "250m".into()),
                memory: rf
                    .str_opt(ctx.errors, "memory")
                    .map(|v| v.0)
                    .unwrap_or_else(|| "256Mi".into()),
            }
        }
        None => Resources {
            cpu: "250m".into(),
            memory: "256Mi".into(),
        },
    };
    let mut api_keys = Vec::new();
    if let Some(e) = f.entry("api_keys") {
        match &e.value.kind {
            NodeKind::Array(items) => {
                for it in items {
                    if let Some(r) = secret_node(ctx, it, "api_keys", true, &base) {
                        api_keys.push(r);
                    }
                }
            }
            other => ctx
                .errors
                .push(wrong_type(e, "an array of references", other)),
        }
    }

    let mut datasets = BTreeMap::new();
    for (dname, dname_span, dt, dspan) in f.named_tables(ctx.errors, "dataset") {
        check_name(ctx, dname, dname_span, "dataset name");
        if let Some(d) = decode_dataset(ctx, name, dname, dt, dspan, &base) {
            datasets.insert(dname.to_owned(), d);
        }
    }

    let mut endpoints = BTreeMap::new();
    let mut tests = Vec::new();
    let endpoint_tables = f.named_tables(ctx.errors, "endpoint");
    // Endpoints declared with a kind (tests may be added to any of them).
    let declared: Vec<&str> = endpoint_tables
        .iter()
        .filter(|(_, _, et, _)| et.get("kind").is_some())
        .map(|(n, ..)| *n)
        .collect();
    for (ename, ename_span, et, espan) in endpoint_tables {
        check_name(ctx, ename, ename_span, "endpoint name");
        let ef = Fields::new(et, espan, format!("service.{name}.endpoint.{ename}"));
        let from = format!("service.{name}");
        if et.get("kind").is_none() && et.get("test").is_some() {
            // `[[service.S.endpoint.E.test]]` for an endpoint nobody declared.
            let mut d = Diagnostic::new(
                Code::DanglingReference,
                ename_span,
                format!("test queries of service.{name} for undefined endpoint `{ename}`"),
            )
            .label(format!("no endpoint named `{ename}`"));
            d = match did_you_mean(ename, declared.iter().copied()) {
                Some(x) => d.help(format!("did you mean `{x}`?")),
                None if declared.is_empty() => d.help(format!(
                    "service.{name} declares no endpoints: add [service.{name}.endpoint.{ename}] with a `kind`"
                )),
                None => d.help(format!("defined: {}", declared.join(", "))),
            };
            ctx.errors.push(d);
            continue;
        }
        match ef.str_req(ctx.errors, "kind", "\"prediction\"") {
            Some((k, _)) if k == "prediction" => {
                ef.allow(
                    ctx.errors,
                    &["kind", "model", "generation", "dispatch", "enrich", "test"],
                );
                let models = decode_models(ctx, name, ename, &ef, &base);
                let pinnable: Vec<&str> = match models.as_ref().map(|m| &m.models) {
                    Some(Models::Generations { generations, .. }) => {
                        generations.iter().map(|g| g.name.as_str()).collect()
                    }
                    _ => Vec::new(),
                };
                tests.extend(decode_tests(
                    ctx,
                    name,
                    ename,
                    TestAction::Predict,
                    &ef,
                    &pinnable,
                ));
                let enrichments = match ef.entry("enrich") {
                    Some(e) => match decode_enrich(ctx, name, ename, e) {
                        Some(list) => list,
                        None => continue,
                    },
                    None => Vec::new(),
                };
                if let Some(models) = models {
                    check_generations(ctx, name, ename, &models, &enrichments);
                    endpoints.insert(
                        ename.to_owned(),
                        Endpoint::Prediction {
                            models: models.models,
                            enrichments,
                        },
                    );
                }
            }
            Some((k, _)) if k == "lookup" => {
                ef.allow(ctx.errors, &["kind", "datasets", "test"]);
                tests.extend(decode_tests(ctx, name, ename, TestAction::Lookup, &ef, &[]));
                let ds = ef.strs_opt(ctx.errors, "datasets").unwrap_or_default();
                if ds.is_empty() {
                    ctx.errors.push(
                        Diagnostic::new(
                            Code::MissingField,
                            espan,
                            format!("lookup endpoint `{ename}` needs `datasets`"),
                        )
                        .label("no datasets")
                        .help("add datasets = [\"NAME\"]"),
                    );
                }
                for (d, s) in &ds {
                    ctx.refer("dataset", &format!("{name}.{d}"), *s, &from);
                }
                endpoints.insert(
                    ename.to_owned(),
                    Endpoint::Lookup {
                        datasets: ds.into_iter().map(|v| v.0).collect(),
                    },
                );
            }
            Some((k, s)) => {
                let mut d = Diagnostic::new(
                    Code::InvalidValue,
                    s,
                    format!("unknown endpoint kind `{k}`"),
                )
                .label("not an endpoint kind");
                d = match did_you_mean(&k, ["prediction", "lookup"]) {
                    Some(x) => d.help(format!("did you mean `{x}`?")),
                    None => d.help("use \"prediction\" or \"lookup\""),
                };
                ctx.errors.push(d);
            }
            None => {}
        }
    }
    if endpoints.is_empty() && f.entry("endpoint").is_none() {
        ctx.errors.push(
            Diagnostic::new(
                Code::MissingField,
                span,
                format!("service `{name}` has no endpoints"),
            )
            .label("declared here")
            .help(format!(
                "add [service.{name}.endpoint.NAME] with kind = \"prediction\" or \"lookup\""
            )),
        );
    }
    Some(Service {
        name: name.to_owned(),
        version,
        replicas,
        autoscaling,
        resources,
        datasets,
        endpoints,
        api_keys,
        request_timeout_ms,
        access_log,
        query_log,
        tests,
    })
}

/// A query log's `path` is a file on this machine: on a cluster the log
/// goes to the pods' stdout, where the cluster's log pipeline takes it.
pub(super) fn check_query_log_target(
    ctx: &mut Ctx<'_>,
    target: Target,
    services: &BTreeMap<String, Service>,
) {
    if target == Target::Local {
        return;
    }
    for name in services.keys() {
        let key = format!("service.{name}.query_log.path");
        if let Some(&span) = ctx.spans.names.get(&key) {
            ctx.errors.push(
                Diagnostic::new(
                    Code::InvalidValue,
                    span,
                    format!("service.{name}: a query log `path` is for the local target"),
                )
                .label("a file on this machine")
                .help("on a cluster the query log goes to the pods' stdout (the cluster's log pipeline takes it): set `path` in local.toml only"),
            );
        }
    }
}

/// `query_log = { path = "...", sample = 1.0, redact = ["field", ...] }`.
fn decode_query_log(
    ctx: &mut Ctx<'_>,
    name: &str,
    t: &Table,
    span: Span,
    base: &std::path::Path,
) -> QueryLog {
    let qf = Fields::new(t, span, format!("service.{name}.query_log"));
    qf.allow(ctx.errors, &["path", "sample", "redact"]);
    let path = qf.str_opt(ctx.errors, "path").map(|(p, pspan)| {
        ctx.spans
            .names
            .insert(format!("service.{name}.query_log.path"), pspan);
        base.join(p)
    });
    let sample = match qf.entry("sample") {
        None => 1.0,
        Some(e) => match &e.value.kind {
            NodeKind::Float(v) if (0.0..=1.0).contains(v) => *v,
            NodeKind::Int(v @ 0..=1) => *v as f64,
            NodeKind::Float(_) | NodeKind::Int(_) => {
                ctx.errors.push(
                    Diagnostic::new(
                        Code::InvalidValue,
                        e.value.span,
                        "`sample` is the fraction of queries logged",
                    )
                    .label("not from 0 to 1")
                    .help("e.g. sample = 0.1 logs one query in ten; 1.0 logs every one"),
                );
                1.0
            }
            other => {
                ctx.errors.push(wrong_type(e, "a number", other));
                1.0
            }
        },
    };
    let redact = qf
        .strs_opt(ctx.errors, "redact")
        .unwrap_or_default()
        .into_iter()
        .map(|(r, _)| r)
        .collect();
    QueryLog {
        path,
        sample,
        redact,
    }
}

/// `enrich = [...]` of a prediction endpoint or of one of its generations:
/// the enrichments not in error (those are reported); `None` when it is not
/// an array.
pub(super) fn decode_enrich(
    ctx: &mut Ctx<'_>,
    name: &str,
    ename: &str,
    e: &Entry,
) -> Option<Vec<Enrichment>> {
    let NodeKind::Array(items) = &e.value.kind else {
        ctx.errors
            .push(wrong_type(e, "an array of tables", &e.value.kind));
        return None;
    };
    Some(
        items
            .iter()
            .filter_map(|it| decode_enrichment(ctx, name, ename, it))
            .collect(),
    )
}

/// One `enrich = [...]` item of a prediction endpoint: a dataset of the
/// service or another service's lookup. `None` when it is in error (reported).
fn decode_enrichment(ctx: &mut Ctx<'_>, name: &str, ename: &str, it: &Node) -> Option<Enrichment> {
    let from = format!("service.{name}");
    let NodeKind::Table(it_t) = &it.kind else {
        ctx.errors.push(
            Diagnostic::new(Code::WrongType, it.span, "an enrichment must be a table")
                .label("expected { dataset = ..., key = ... }")
                .help("e.g. { lookup = \"features.demographics\", key = \"customer_id\" }"),
        );
        return None;
    };
    let nf = Fields::new(
        it_t,
        it.span,
        format!("an enrichment of service.{name}.endpoint.{ename}"),
    );
    nf.allow(
        ctx.errors,
        &["dataset", "lookup", "key", "columns", "on_missing", "cache"],
    );
    let key = nf.str_req(ctx.errors, "key", "\"customer_id\"");
    let source = match (
        nf.str_opt(ctx.errors, "dataset"),
        nf.str_opt(ctx.errors, "lookup"),
    ) {
        (Some((d, dspan)), None) => {
            ctx.refer("dataset", &format!("{name}.{d}"), dspan, &from);
            Some(EnrichmentSource::Dataset(d))
        }
        (None, Some((l, lspan))) => match l.split_once('.') {
            Some((svc, ep)) => {
                ctx.refer("lookup", &l, lspan, &from);
                ctx.spans
                    .names
                    .entry(format!("enriches.{name}.{svc}"))
                    .or_insert(lspan);
                Some(EnrichmentSource::Lookup {
                    service: svc.to_owned(),
                    endpoint: ep.to_owned(),
                })
            }
            None => {
                ctx.errors.push(
                    Diagnostic::new(
                        Code::InvalidValue,
                        lspan,
                        format!("`{l}` must name SERVICE.ENDPOINT"),
                    )
                    .label("expected SERVICE.ENDPOINT")
                    .help("e.g. lookup = \"customer-features.demographics\""),
                );
                None
            }
        },
        _ => {
            ctx.errors.push(
                Diagnostic::new(
                    Code::MissingField,
                    it.span,
                    "an enrichment names exactly one of `dataset` or `lookup`",
                )
                .label("here")
                .help("dataset = \"NAME\" (this service) or lookup = \"SERVICE.ENDPOINT\""),
            );
            None
        }
    };
    let columns = nf
        .strs_opt(ctx.errors, "columns")
        .unwrap_or_default()
        .into_iter()
        .map(|v| v.0)
        .collect();
    let on_missing = match nf.str_opt(ctx.errors, "on_missing") {
        None => OnMissing::Error,
        Some((v, _)) if v == "error" => OnMissing::Error,
        Some((v, _)) if v == "null" => OnMissing::Null,
        Some((v, s)) => {
            ctx.errors.push(
                Diagnostic::new(Code::InvalidValue, s, format!("unknown on_missing `{v}`"))
                    .label("not a policy")
                    .help("use \"error\" or \"null\""),
            );
            OnMissing::Error
        }
    };
    let cache = decode_cache(
        ctx.errors,
        &nf,
        &format!("the cache of an enrichment of service.{name}.endpoint.{ename}"),
    );
    if let (Some(EnrichmentSource::Dataset(d)), Some(e)) = (&source, nf.entry("cache")) {
        ctx.errors.push(
            Diagnostic::new(
                Code::InvalidValue,
                e.key_span,
                "`cache` applies to a `lookup` enrichment, not to a dataset",
            )
            .label(format!("dataset `{d}` is read in process already"))
            .help("remove `cache` here; a `live` dataset takes `cache` in its own declaration"),
        );
    }
    Some(Enrichment {
        source: source?,
        key: key?.0,
        columns,
        on_missing,
        cache: cache?,
    })
}

/// Services enrich from each other's lookups; that graph must be acyclic.
pub(super) fn check_services(ctx: &mut Ctx<'_>, services: &BTreeMap<String, Service>) {
    let edges: BTreeMap<&str, BTreeSet<&str>> = services
        .values()
        .map(|s| {
            let deps = s
                .endpoints
                .values()
                .flat_map(Endpoint::all_enrichments)
                .filter_map(|en| match &en.source {
                    EnrichmentSource::Lookup { service, .. } => Some(service.as_str()),
                    EnrichmentSource::Dataset(_) => None,
                })
                .collect();
            (s.name.as_str(), deps)
        })
        .collect();
    if let Some(cycle) = find_cycle(&edges) {
        // Point at the `lookup` enrichments that close the cycle, one per edge.
        let next = |i: usize| cycle[(i + 1) % cycle.len()];
        let edge_span = |i: usize| {
            let (from, to) = (cycle[i], next(i));
            ctx.spans
                .names
                .get(&format!("enriches.{from}.{to}"))
                .or_else(|| ctx.spans.names.get(&format!("service.{from}")))
                .copied()
        };
        let (Some(span), rest) = (
            edge_span(0),
            (1..cycle.len())
                .filter_map(|i| edge_span(i).map(|s| (i, s)))
                .collect::<Vec<_>>(),
        ) else {
            return;
        };
        let path = cycle
            .iter()
            .chain(std::iter::once(&cycle[0]))
            .map(|s| format!("service.{s}"))
            .collect::<Vec<_>>()
            .join(" → ");
        let mut d = Diagnostic::new(Code::Cycle, span, format!("dependency cycle: {path}"))
            .label(format!("service.{} enriches from service.{} here", cycle[0], next(0)))
            .help("a service cannot enrich, directly or indirectly, from itself: remove one of these `lookup` enrichments");
        for (i, s) in rest {
            d = d.related(
                s,
                format!(
                    "service.{} enriches from service.{} here",
                    cycle[i],
                    next(i)
                ),
            );
        }
        ctx.errors.push(d);
    }
}

/// Finds one cycle in a graph given as node → dependencies, if any.
/// Returns the nodes of the cycle in order.
pub fn find_cycle<'a>(edges: &BTreeMap<&'a str, BTreeSet<&'a str>>) -> Option<Vec<&'a str>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Visiting,
        Done,
    }
    fn visit<'a>(
        n: &'a str,
        edges: &BTreeMap<&'a str, BTreeSet<&'a str>>,
        marks: &mut BTreeMap<&'a str, Mark>,
        path: &mut Vec<&'a str>,
    ) -> Option<Vec<&'a str>> {
        match marks.get(n) {
            Some(Mark::Done) => return None,
            Some(Mark::Visiting) => {
                let start = path.iter().position(|p| *p == n).unwrap_or(0);
                return Some(path[start..].to_vec());
            }
            None => {}
        }
        marks.insert(n, Mark::Visiting);
        path.push(n);
        if let Some(deps) = edges.get(n) {
            for d in deps {
                if let Some(c) = visit(d, edges, marks, path) {
                    return Some(c);
                }
            }
        }
        path.pop();
        marks.insert(n, Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    for n in edges.keys() {
        let mut path = Vec::new();
        if let Some(c) = visit(n, edges, &mut marks, &mut path) {
            return Some(c);
        }
    }
    None
}
