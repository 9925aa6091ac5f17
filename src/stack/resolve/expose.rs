//! `[expose.NAME]`: how a service is reached (type, port, `allow`, `tls`), and
//! the checks that need the environment (local ports, which `tls` fits
//! which target).

use std::collections::BTreeMap;

use crate::stack::decode::{Errors, Fields};
use crate::stack::diag::{Code, Diagnostic, did_you_mean};
use crate::stack::model::*;
use crate::stack::source::{Span, Table};

use super::{Ctx, cidr, port};

pub(super) fn decode_expose(
    ctx: &mut Ctx<'_>,
    name: &str,
    t: &Table,
    span: Span,
) -> Option<Expose> {
    let f = Fields::new(t, span, format!("expose.{name}"));
    f.allow(
        ctx.errors,
        &[
            "service",
            "type",
            "port",
            "node_port",
            "host",
            "path",
            "allow",
            "tls",
        ],
    );
    let service = f
        .str_opt(ctx.errors, "service")
        .map(|v| v.0)
        .unwrap_or_else(|| name.to_owned());
    let service_span = f.entry("service").map(|e| e.value.span).unwrap_or(span);
    ctx.refs.push((
        "service",
        service.clone(),
        service_span,
        format!("expose.{name}"),
    ));
    let port_v = port(ctx, &f, "port", 1..=65535, Some(8080));
    let kind = match f.str_req(ctx.errors, "type", "\"NodePort\"") {
        Some((ty, tspan)) => match ty.as_str() {
            "ClusterIP" => port_v.map(|port| ExposeKind::ClusterIP { port }),
            "NodePort" => {
                let node_port = port(ctx, &f, "node_port", 30000..=32767, None);
                port_v.map(|port| ExposeKind::NodePort { port, node_port })
            }
            "LoadBalancer" => port_v.map(|port| ExposeKind::LoadBalancer { port }),
            "Ingress" => {
                let host = f.str_req(ctx.errors, "host", "\"scoring.example.com\"");
                let path = f
                    .str_opt(ctx.errors, "path")
                    .map(|v| v.0)
                    .unwrap_or_else(|| "/".into());
                match (host, port_v) {
                    (Some((host, _)), Some(port)) => Some(ExposeKind::Ingress { port, host, path }),
                    _ => None,
                }
            }
            other => {
                let mut d = Diagnostic::new(
                    Code::InvalidValue,
                    tspan,
                    format!("unknown exposure type `{other}`"),
                )
                .label("not a type");
                d = match did_you_mean(other, ["ClusterIP", "NodePort", "LoadBalancer", "Ingress"])
                {
                    Some(s) => d.help(format!("did you mean `{s}`?")),
                    None => d.help("use ClusterIP, NodePort, LoadBalancer or Ingress"),
                };
                ctx.errors.push(d);
                None
            }
        },
        None => None,
    };
    if let Some((np, s)) = f.int_opt(&mut Errors::default(), "node_port") {
        ctx.spans
            .names
            .insert(format!("expose.{name}.node_port.{np}"), s);
    }
    let mut allow = Vec::new();
    for (a, s) in f.strs_opt(ctx.errors, "allow").unwrap_or_default() {
        if a.contains('/') {
            if let Some(c) = cidr(ctx, &a, s) {
                allow.push(Caller::Cidr(c));
            }
        } else {
            ctx.refs
                .push(("service", a.clone(), s, format!("expose.{name}")));
            allow.push(Caller::Service(a));
        }
    }
    let tls = decode_tls(ctx, name, &f);
    let kind = kind?;
    if let Some((tls, span)) = &tls {
        check_tls_type(ctx, name, &kind, tls, *span);
    }
    Some(Expose {
        name: name.to_owned(),
        service,
        kind,
        allow,
        tls: tls.map(|(t, _)| t),
    })
}

const TLS_KEYS: &[&str] = &["secret", "issuer", "certificate_arn", "self_signed"];

/// `tls = { secret | issuer | certificate_arn | self_signed }`: exactly one
/// of them; the span of the key written, for later checks (also recorded
/// as `expose.NAME.tls`).
fn decode_tls(ctx: &mut Ctx<'_>, name: &str, f: &Fields<'_>) -> Option<(Tls, Span)> {
    let (t, span) = f.table_opt(ctx.errors, "tls")?;
    let what = format!("expose.{name}.tls");
    let tf = Fields::new(t, span, what.clone());
    tf.allow(ctx.errors, TLS_KEYS);
    let known: Vec<_> = t
        .entries
        .iter()
        .filter(|e| TLS_KEYS.contains(&e.key.as_str()))
        .collect();
    let first = match known.as_slice() {
        [] => {
            if t.entries.is_empty() {
                ctx.errors.push(
                    Diagnostic::new(Code::MissingField, span, format!("{what} is empty"))
                        .label("no certificate source")
                        .help("write one of: tls = { secret = \"NAME\" }, { issuer = \"NAME\" }, { certificate_arn = \"arn:...\" }, { self_signed = true }"),
                );
            }
            return None;
        }
        [first] => first,
        [first, second, ..] => {
            ctx.errors.push(
                Diagnostic::new(
                    Code::InvalidValue,
                    second.key_span,
                    format!("{what} has both `{}` and `{}`", first.key, second.key),
                )
                .label("a second certificate source")
                .related(first.key_span, "the first one")
                .help("keep one of them: an exposure's certificate comes from one place"),
            );
            return None;
        }
    };
    let key = first.key.as_str();
    let tls = match key {
        "self_signed" => {
            match tf.bool_opt(ctx.errors, key)? {
                true => Tls::SelfSigned,
                false => {
                    ctx.errors.push(
                    Diagnostic::new(
                        Code::InvalidValue,
                        first.value.span,
                        format!("`self_signed = false` in {what} asks for no certificate"),
                    )
                    .label("no certificate source")
                    .help("write tls = { self_signed = true }, or remove `tls` to serve plain HTTP"),
                );
                    return None;
                }
            }
        }
        _ => {
            let (v, vspan) = tf.str_opt(ctx.errors, key)?;
            if v.trim().is_empty() {
                ctx.errors.push(
                    Diagnostic::new(
                        Code::InvalidValue,
                        vspan,
                        format!("`{key}` in {what} is empty"),
                    )
                    .label("empty")
                    .help(format!("name the {}", key.replace('_', " "))),
                );
                return None;
            }
            match key {
                "secret" => Tls::Secret(v),
                "issuer" => Tls::Issuer(v),
                _ => Tls::CertificateArn(v),
            }
        }
    };
    ctx.spans.names.insert(what, first.key_span);
    Some((tls, first.key_span))
}

/// The exposure types each certificate source fits (the target is checked
/// once the environment is known: [`check_tls_target`]).
fn check_tls_type(ctx: &mut Ctx<'_>, name: &str, kind: &ExposeKind, tls: &Tls, span: Span) {
    let type_name = match kind {
        ExposeKind::ClusterIP { .. } => "ClusterIP",
        ExposeKind::NodePort { .. } => "NodePort",
        ExposeKind::LoadBalancer { .. } => "LoadBalancer",
        ExposeKind::Ingress { .. } => "Ingress",
    };
    let (fits, key, help) = match tls {
        Tls::Secret(_) | Tls::Issuer(_) => (
            matches!(kind, ExposeKind::Ingress { .. }),
            if matches!(tls, Tls::Secret(_)) {
                "secret"
            } else {
                "issuer"
            },
            "a TLS Secret or a cert-manager issuer is an Ingress's: use type = \"Ingress\", or tls = { certificate_arn = \"...\" } on a LoadBalancer of an aws environment",
        ),
        Tls::CertificateArn(_) => (
            matches!(kind, ExposeKind::LoadBalancer { .. }),
            "certificate_arn",
            "an ACM certificate goes on an AWS load balancer: use type = \"LoadBalancer\", or on an Ingress tls = { secret = \"NAME\" } or { issuer = \"NAME\" }",
        ),
        Tls::SelfSigned => return,
    };
    if !fits {
        ctx.errors.push(
            Diagnostic::new(
                Code::InvalidValue,
                span,
                format!("tls `{key}` does not fit expose.{name} of type {type_name}"),
            )
            .label(format!("not for type {type_name}"))
            .help(help),
        );
    }
}

/// The certificate sources each target serves: `self_signed` only on the
/// local target (the runtime serves HTTPS itself), a Secret or issuer only
/// on a cluster (the Ingress controller does), an ACM certificate only on
/// `aws` (the AWS load balancer does). On the local target a service is
/// one port: all its exposures are TLS or none.
pub(super) fn check_tls_target(
    ctx: &mut Ctx<'_>,
    target: Target,
    exposes: &BTreeMap<String, Expose>,
) {
    for e in exposes.values() {
        let Some(tls) = &e.tls else { continue };
        let Some(&span) = ctx.spans.names.get(&format!("expose.{}.tls", e.name)) else {
            continue;
        };
        let problem = match (tls, target) {
            (Tls::SelfSigned, Target::Local) => None,
            (Tls::SelfSigned, _) => Some((
                "`self_signed` is for the local target only",
                "on a cluster, terminate TLS at the edge: tls = { secret = \"NAME\" } or { issuer = \"NAME\" } on an Ingress, { certificate_arn = \"...\" } on a LoadBalancer (aws); set `tls` per environment in <env>.toml",
            )),
            (Tls::Secret(_) | Tls::Issuer(_), Target::Kubernetes | Target::Aws) => None,
            (Tls::CertificateArn(_), Target::Aws) => None,
            (Tls::CertificateArn(_), Target::Kubernetes) => Some((
                "`certificate_arn` needs an aws environment",
                "an ACM certificate is read by the AWS load balancer of an EKS cluster mesh builds (target = \"aws\"); on another cluster use an Ingress with tls = { secret = \"NAME\" } or { issuer = \"NAME\" }",
            )),
            (_, Target::Local) => Some((
                "the local target has no ingress controller nor load balancer to hold this certificate",
                "in local.toml write tls = { self_signed = true } for this exposure (an overlay's `tls` replaces the stack's): the runtime then serves HTTPS with a certificate mesh generates",
            )),
        };
        if let Some((message, help)) = problem {
            ctx.errors.push(
                Diagnostic::new(
                    Code::InvalidValue,
                    span,
                    format!("expose.{}: {message}", e.name),
                )
                .label(format!("not on a {} environment", target_name(target)))
                .help(help),
            );
        }
    }
    if target != Target::Local {
        return;
    }
    let self_signed = |e: &Expose| e.tls == Some(Tls::SelfSigned);
    let mut first: BTreeMap<&str, &Expose> = BTreeMap::new();
    for e in exposes.values() {
        match first.get(e.service.as_str()) {
            None => {
                first.insert(&e.service, e);
            }
            Some(other) if self_signed(other) != self_signed(e) => {
                let (with, without) = if self_signed(e) {
                    (e, *other)
                } else {
                    (*other, e)
                };
                let Some(&span) = ctx.spans.names.get(&format!("expose.{}.tls", with.name)) else {
                    continue;
                };
                let mut d = Diagnostic::new(
                    Code::PortConflict,
                    span,
                    format!(
                        "service {} is exposed with TLS by expose.{} and without by expose.{}, but on the local target it listens on one port",
                        e.service, with.name, without.name
                    ),
                )
                .label("TLS on the service's one port")
                .help(format!(
                    "give expose.{} the same `tls`, or neither of them",
                    without.name
                ));
                if let Some(&other) = ctx.spans.names.get(&format!("expose.{}", without.name)) {
                    d = d.related(other, "served on the same port, without TLS");
                }
                ctx.errors.push(d);
            }
            Some(_) => {}
        }
    }
}

fn target_name(t: Target) -> &'static str {
    match t {
        Target::Local => "local",
        Target::Aws => "aws",
        Target::Kubernetes => "kubernetes",
    }
}

/// On the local target a service is one process on one loopback port, so
/// its exposures cannot ask for two different `node_port`s (on a cluster
/// each exposure is a Service of its own, and they can).
pub(super) fn check_local_ports(ctx: &mut Ctx<'_>, exposes: &BTreeMap<String, Expose>) {
    let mut first: BTreeMap<&str, (u16, &str)> = BTreeMap::new();
    for e in exposes.values() {
        let ExposeKind::NodePort {
            node_port: Some(np),
            ..
        } = e.kind
        else {
            continue;
        };
        match first.get(e.service.as_str()) {
            None => {
                first.insert(&e.service, (np, &e.name));
            }
            Some(&(other_np, other)) if other_np != np => {
                let (Some(&span), Some(&other_span)) = (
                    ctx.spans
                        .names
                        .get(&format!("expose.{}.node_port.{np}", e.name)),
                    ctx.spans
                        .names
                        .get(&format!("expose.{other}.node_port.{other_np}")),
                ) else {
                    continue;
                };
                ctx.errors.push(
                    Diagnostic::new(
                        Code::PortConflict,
                        span,
                        format!(
                            "service {} gets node_port {other_np} from expose.{other} and {np} from expose.{}, but on the local target it listens on one port",
                            e.service, e.name
                        ),
                    )
                    .label("a second port for the same service")
                    .related(other_span, "its port on this machine")
                    .help(format!(
                        "set node_port on one exposure of service {} only: on this machine its other exposures share that port",
                        e.service
                    )),
                );
            }
            Some(_) => {}
        }
    }
}

pub(super) fn check_exposes(
    ctx: &mut Ctx<'_>,
    exposes: &BTreeMap<String, Expose>,
    services: &BTreeMap<String, Service>,
) {
    // A service whose exposures admit no CIDR lets only the services they
    // list call it (a NetworkPolicy on Kubernetes, keys on loopback): a
    // service left out cannot enrich from it.
    for caller in services.values() {
        let mut callees: Vec<&str> = caller
            .endpoints
            .values()
            .flat_map(|ep| {
                ep.all_enrichments()
                    .into_iter()
                    .filter_map(|en| match &en.source {
                        EnrichmentSource::Lookup { service, .. } => Some(service.as_str()),
                        EnrichmentSource::Dataset(_) => None,
                    })
            })
            .collect();
        callees.sort_unstable();
        callees.dedup();
        for callee in callees {
            let guarding: Vec<&Expose> = exposes.values().filter(|e| e.service == callee).collect();
            let open = guarding.is_empty()
                || guarding.iter().any(|e| {
                    e.allow.iter().any(|c| match c {
                        Caller::Cidr(_) => true,
                        Caller::Service(s) => *s == caller.name,
                    })
                });
            if open {
                continue;
            }
            let Some(&span) = ctx
                .spans
                .names
                .get(&format!("enriches.{}.{callee}", caller.name))
            else {
                continue;
            };
            let first = guarding[0];
            let mut d = Diagnostic::new(
                Code::CallerNotAllowed,
                span,
                format!(
                    "service {} enriches from {callee}, but expose.{} does not allow it",
                    caller.name, first.name
                ),
            )
            .label("this lookup would be refused")
            .help(format!(
                "add \"{}\" to `allow` in expose.{}",
                caller.name, first.name
            ));
            if let Some(&other) = ctx.spans.names.get(&format!("expose.{}", first.name)) {
                d = d.related(other, "this exposure lists the callers allowed");
            }
            ctx.errors.push(d);
        }
    }
    let mut by_port: BTreeMap<u16, &str> = BTreeMap::new();
    for e in exposes.values() {
        if let ExposeKind::NodePort {
            node_port: Some(np),
            ..
        } = e.kind
        {
            if let Some(first) = by_port.get(&np) {
                let span = ctx.spans.names[&format!("expose.{}.node_port.{np}", e.name)];
                let other = ctx.spans.names[&format!("expose.{first}.node_port.{np}")];
                ctx.errors.push(
                    Diagnostic::new(
                        Code::Duplicate,
                        span,
                        format!(
                            "node_port {np} is used by expose.{first} and expose.{}",
                            e.name
                        ),
                    )
                    .label("already taken")
                    .related(other, "first used here")
                    .help("give each exposure its own node_port, or omit it to have one allocated"),
                );
            } else {
                by_port.insert(np, &e.name);
            }
        }
    }
}
