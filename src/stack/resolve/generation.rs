//! A prediction endpoint's models: one (`model = "..."`), or generations side
//! by side (`[[service.S.endpoint.E.generation]]`, with `dispatch`), checked
//! against each other and against the endpoint's enrichments.

use std::collections::BTreeSet;
use std::path::Path;

use crate::stack::decode::{Fields, wrong_type};
use crate::stack::diag::{Code, Diagnostic};
use crate::stack::model::{Dispatch, Enrichment, Generation, Models, cpu_millis};
use crate::stack::source::{NodeKind, Span};

use super::service::decode_enrich;
use super::{Ctx, check_name};

/// The decoded models with the spans their checks point at.
pub(super) struct Decoded {
    pub models: Models,
    /// Each model's `model = "..."`, in `Models::files` order.
    model_spans: Vec<Span>,
    dispatch_span: Option<Span>,
}

pub(super) fn decode_models(
    ctx: &mut Ctx<'_>,
    service: &str,
    ename: &str,
    ef: &Fields<'_>,
    base: &Path,
) -> Option<Decoded> {
    let what = format!("service.{service}.endpoint.{ename}");
    let dispatch = decode_dispatch(ctx, ef);
    match (ef.entry("model"), ef.entry("generation")) {
        (Some(m), Some(g)) => {
            ctx.errors.push(
                Diagnostic::new(
                    Code::InvalidValue,
                    g.key_span,
                    format!("{what} has both a `model` and generations"),
                )
                .label("generations here")
                .related(m.key_span, "and one model here")
                .help(format!(
                    "move the model into a generation ([[{what}.generation]] with `name`, `model` and `weight = 100`), or remove the generations"
                )),
            );
            None
        }
        (_, None) => {
            let (m, mspan) = ef.str_req(ctx.errors, "model", "\"model.onnx\"")?;
            if let Some((_, span)) = dispatch {
                ctx.errors.push(
                    Diagnostic::new(
                        Code::InvalidValue,
                        span,
                        format!("{what} has one model: `dispatch` picks between generations"),
                    )
                    .label("nothing to pick from")
                    .help(format!(
                        "remove `dispatch`, or declare the models as [[{what}.generation]]"
                    )),
                );
            }
            Some(Decoded {
                models: Models::One(model_file(ctx, &m, mspan, base)),
                model_spans: vec![mspan],
                dispatch_span: None,
            })
        }
        (None, Some(g)) => {
            let NodeKind::Array(items) = &g.value.kind else {
                ctx.errors.push(
                    wrong_type(g, "an array of tables", &g.value.kind)
                        .help(format!("declare each generation as [[{what}.generation]]")),
                );
                return None;
            };
            let mut generations = Vec::new();
            let mut model_spans = Vec::new();
            let mut names: Vec<(String, Span)> = Vec::new();
            let mut weights: Vec<(u32, Span)> = Vec::new();
            let mut ok = true;
            for it in items {
                let NodeKind::Table(t) = &it.kind else {
                    ctx.errors.push(
                        Diagnostic::new(
                            Code::WrongType,
                            it.span,
                            format!("a generation of {what} must be a table"),
                        )
                        .label("expected a table")
                        .help(format!("declare each generation as [[{what}.generation]]")),
                    );
                    ok = false;
                    continue;
                };
                let gf = Fields::new(t, it.span, format!("a generation of {what}"));
                gf.allow(
                    ctx.errors,
                    &["name", "model", "weight", "shadow", "enrich", "cpu"],
                );
                let name = gf.str_req(ctx.errors, "name", "\"v2\"");
                if let Some((n, span)) = &name {
                    check_name(ctx, n, *span, "generation name");
                    if let Some((_, first)) = names.iter().find(|(m, _)| m == n) {
                        ctx.errors.push(
                            Diagnostic::new(
                                Code::Duplicate,
                                *span,
                                format!("{what} has two generations named `{n}`"),
                            )
                            .label("second generation of that name")
                            .related(*first, "first defined here")
                            .help("give each generation (shadows included) its own name"),
                        );
                        ok = false;
                    } else {
                        names.push((n.clone(), *span));
                    }
                }
                let model = gf
                    .str_req(ctx.errors, "model", "\"model_v2.onnx\"")
                    .map(|(m, span)| (model_file(ctx, &m, span, base), span));
                let shadow = gf.bool_opt(ctx.errors, "shadow").unwrap_or(false);
                let weight = match (gf.int_opt(ctx.errors, "weight"), shadow) {
                    (Some((_, span)), true) => {
                        ctx.errors.push(
                            Diagnostic::new(
                                Code::InvalidValue,
                                span,
                                "a shadow generation takes no `weight`",
                            )
                            .label("a shadow serves no traffic")
                            .help("remove `weight` (a shadow scores a copy of every request), or `shadow = true` to serve a share"),
                        );
                        ok = false;
                        None
                    }
                    (Some((w, span)), false) => {
                        match u32::try_from(w) {
                            Ok(w) if w <= 100 => {
                                weights.push((w, span));
                                Some(w)
                            }
                            _ => {
                                ctx.errors.push(
                                Diagnostic::new(
                                    Code::InvalidValue,
                                    span,
                                    format!("weight {w} is not a percent"),
                                )
                                .label("expected 0 to 100")
                                .help("a weight is the percent of the traffic this generation serves"),
                            );
                                ok = false;
                                None
                            }
                        }
                    }
                    (None, true) => None,
                    (None, false) => {
                        gf.missing(ctx.errors, "weight", "an integer (percent)", "10");
                        ok = false;
                        None
                    }
                };
                let enrichments = match gf.entry("enrich") {
                    Some(e) if shadow => {
                        ctx.errors.push(
                            Diagnostic::new(
                                Code::InvalidValue,
                                e.key_span,
                                "a shadow generation takes no `enrich` of its own",
                            )
                            .label("a shadow scores the features its serving generation was given")
                            .help("remove `enrich` here; to try other sources, serve this generation a small `weight` instead of `shadow = true`"),
                        );
                        None
                    }
                    Some(e) => match decode_enrich(ctx, service, ename, e) {
                        Some(list) => Some(list),
                        None => {
                            ok = false;
                            None
                        }
                    },
                    None => None,
                };
                let cpu_millis = match gf.str_opt(ctx.errors, "cpu") {
                    Some((_, span)) if !shadow => {
                        ctx.errors.push(
                            Diagnostic::new(
                                Code::InvalidValue,
                                span,
                                "only a shadow generation takes a `cpu` of its own",
                            )
                            .label("a serving generation runs on the service's CPU")
                            .help("remove `cpu` here; the service's `resources = { cpu = \"...\" }` is the serving generations' CPU"),
                        );
                        ok = false;
                        None
                    }
                    Some((q, span)) => match cpu_millis(&q) {
                        Some(m) if (1..=1000).contains(&m) => Some(m),
                        parsed => {
                            ctx.errors.push(
                                Diagnostic::new(
                                    Code::InvalidValue,
                                    span,
                                    match parsed {
                                        Some(m) => format!("a shadow's `cpu` must be more than 0 and at most one core: found {m}m"),
                                        None => format!("`{q}` is not a CPU quantity"),
                                    },
                                )
                                .label("expected 1m to 1000m (one core)")
                                .help("the share of one core the shadow's scoring may use, e.g. cpu = \"250m\" or \"0.5\""),
                            );
                            ok = false;
                            None
                        }
                    },
                    None => None,
                };
                if let (Some((name, _)), Some((model, span))) = (name, model) {
                    generations.push(Generation {
                        name,
                        model,
                        weight,
                        enrichments,
                        cpu_millis,
                    });
                    model_spans.push(span);
                } else {
                    ok = false;
                }
            }
            if items.iter().all(|it| {
                matches!(&it.kind, NodeKind::Table(t)
                    if matches!(t.get("shadow").map(|e| &e.value.kind), Some(NodeKind::Bool(true))))
            }) {
                ctx.errors.push(
                    Diagnostic::new(
                        Code::InvalidValue,
                        g.key_span,
                        format!("every generation of {what} is a shadow"),
                    )
                    .label("none serves")
                    .help("give one generation a `weight` (and no `shadow`): shadows only score copies"),
                );
                return None;
            }
            let total: u32 = weights.iter().map(|(w, _)| w).sum();
            if ok && total != 100 {
                let ((_, last), others) = weights.split_last()?;
                let mut d = Diagnostic::new(
                    Code::InvalidValue,
                    *last,
                    format!("the weights of {what}'s generations sum to {total}, not 100"),
                )
                .label(format!("total {total}"));
                for (w, span) in others {
                    d = d.related(*span, format!("weight {w}"));
                }
                ctx.errors.push(d.help(
                    "weights are percents of the traffic: make the serving generations' weights add up to 100 (shadows take none)",
                ));
                return None;
            }
            ok.then(|| Decoded {
                models: Models::Generations {
                    generations,
                    dispatch: dispatch
                        .as_ref()
                        .map(|(d, _)| d.clone())
                        .unwrap_or_default(),
                },
                model_spans,
                dispatch_span: dispatch.map(|(_, s)| s),
            })
        }
    }
}

/// `dispatch = "random"` or `dispatch = { key = "FEATURE" }`.
fn decode_dispatch(ctx: &mut Ctx<'_>, ef: &Fields<'_>) -> Option<(Dispatch, Span)> {
    let e = ef.entry("dispatch")?;
    let span = e.value.span;
    let bad = |ctx: &mut Ctx<'_>, label: &str| {
        ctx.errors.push(
            Diagnostic::new(
                Code::InvalidValue,
                span,
                "`dispatch` is \"random\" or { key = \"FEATURE\" }",
            )
            .label(label.to_owned())
            .help("\"random\": each request by the weights; { key = \"customer_id\" }: a key always gets the same generation"),
        );
    };
    match &e.value.kind {
        NodeKind::Str(s) if s == "random" => Some((Dispatch::Random, span)),
        NodeKind::Table(t) => {
            let key = t.get("key").map(|k| &k.value.kind);
            match key {
                Some(NodeKind::Str(k)) if t.entries.len() == 1 && !k.is_empty() => {
                    Some((Dispatch::Key(k.clone()), span))
                }
                _ => {
                    bad(ctx, "expected { key = \"FEATURE\" }");
                    None
                }
            }
        }
        k if k.is_unresolved() => None,
        _ => {
            bad(ctx, "not a dispatch");
            None
        }
    }
}

/// The path of a model file relative to its declaring file; an error there
/// when it does not exist.
fn model_file(ctx: &mut Ctx<'_>, m: &str, span: Span, base: &Path) -> std::path::PathBuf {
    let path = base.join(m);
    if !path.is_file() {
        ctx.errors.push(
            Diagnostic::new(
                Code::DanglingReference,
                span,
                format!("model file `{m}` not found"),
            )
            .label(format!("looked for {}", path.display()))
            .help("paths are relative to the file that declares the endpoint"),
        );
    }
    path
}

/// Generations answer the same requests: their models take the same inputs
/// (names and types), every column an enrichment names (the endpoint's, or
/// the generation's own `enrich` in their place) is one of them, and a
/// dispatch key is a feature the request carries (an enrichment's key or a
/// model input).
pub(super) fn check_generations(
    ctx: &mut Ctx<'_>,
    service: &str,
    ename: &str,
    d: &Decoded,
    enrichments: &[Enrichment],
) {
    let Models::Generations {
        generations,
        dispatch,
    } = &d.models
    else {
        return;
    };
    let what = format!("service.{service}.endpoint.{ename}");
    let mut inputs = Vec::new();
    let mut classes = Vec::new();
    for (g, span) in generations.iter().zip(&d.model_spans) {
        if !g.model.is_file() {
            return; // reported already
        }
        match std::fs::read(&g.model)
            .map_err(|e| e.to_string())
            .and_then(|b| mesh_runtime::model::Model::from_bytes(&b).map_err(|e| e.to_string()))
        {
            Ok(m) => {
                inputs.push(
                    m.inputs()
                        .iter()
                        .map(|i| (i.name.clone(), i.kind.to_string()))
                        .collect::<BTreeSet<_>>(),
                );
                classes.push(mesh_runtime::scoring::class_names(m.classes()));
            }
            Err(e) => {
                ctx.errors.push(
                    Diagnostic::new(
                        Code::InvalidValue,
                        *span,
                        format!(
                            "generation `{}` of {what}: not a model the runtime can run",
                            g.name
                        ),
                    )
                    .label(e)
                    .help("export a scikit-learn model with skl2onnx (see examples/customer-mesh/generate.py)"),
                );
                return;
            }
        }
    }
    let Some(first) = generations.iter().position(|g| g.weight.is_some()) else {
        return;
    };
    let list = |set: &BTreeSet<&(String, String)>| {
        set.iter()
            .map(|(n, k)| format!("{n} ({k})"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    for (i, g) in generations.iter().enumerate() {
        let own = g.enrichments.is_some();
        let named: Vec<&String> = g
            .enrichments
            .as_deref()
            .unwrap_or(enrichments)
            .iter()
            .flat_map(|en| en.columns.iter().filter(move |c| **c != en.key))
            .filter(|c| !inputs[i].iter().any(|(n, _)| n == *c))
            .collect();
        if let Some(c) = named.first() {
            ctx.errors.push(
                Diagnostic::new(
                    Code::InvalidValue,
                    d.model_spans[i],
                    format!(
                        "generation `{}` of {what}: its model has no input `{c}`, which an enrichment of {} fills",
                        g.name,
                        if own { "the generation" } else { "the endpoint" }
                    ),
                )
                .label(format!("no input `{c}`"))
                .help(if own {
                    format!("give this generation a model that takes `{c}`, or fill only features its model takes")
                } else {
                    format!("give this generation a model that takes `{c}`, or fill only features every generation's model takes")
                }),
            );
            continue;
        }
        if i != first && classes[i] != classes[first] {
            ctx.errors.push(
                Diagnostic::new(
                    Code::InvalidValue,
                    d.model_spans[i],
                    format!(
                        "generation `{}` of {what}: its model predicts other classes than generation `{}`'s",
                        g.name, generations[first].name
                    ),
                )
                .label(format!("classes {}", classes[i].join(", ")))
                .related(
                    d.model_spans[first],
                    format!("classes {}", classes[first].join(", ")),
                )
                .help("generations answer the same question: train them on the same labels"),
            );
            continue;
        }
        if i == first || inputs[i] == inputs[first] {
            continue;
        }
        let extra: BTreeSet<_> = inputs[i].difference(&inputs[first]).collect();
        let lacks: BTreeSet<_> = inputs[first].difference(&inputs[i]).collect();
        let mut label = Vec::new();
        if !extra.is_empty() {
            label.push(format!("takes {}", list(&extra)));
        }
        if !lacks.is_empty() {
            label.push(format!("lacks {}", list(&lacks)));
        }
        ctx.errors.push(
            Diagnostic::new(
                Code::InvalidValue,
                d.model_spans[i],
                format!(
                    "generation `{}` of {what}: its model's inputs differ from generation `{}`'s",
                    g.name, generations[first].name
                ),
            )
            .label(label.join("; "))
            .related(
                d.model_spans[first],
                format!("`{}`'s model", generations[first].name),
            )
            .help("every generation answers the same requests with the same enrichments: export its model with the same input names and types"),
        );
    }
    let keys = enrichments.iter().chain(
        generations
            .iter()
            .flat_map(|g| g.enrichments.iter().flatten()),
    );
    if let (Dispatch::Key(k), Some(span)) = (dispatch, d.dispatch_span)
        && !keys.map(|en| &en.key).any(|key| key == k)
        && !inputs[first].iter().any(|(n, _)| n == k)
    {
        ctx.errors.push(
            Diagnostic::new(
                Code::InvalidValue,
                span,
                format!("dispatch key `{k}` is neither an enrichment's key nor a model input"),
            )
            .label("requests may not carry it")
            .help(
                "dispatch on a feature every request carries, e.g. the key the enrichments look up",
            ),
        );
    }
}
