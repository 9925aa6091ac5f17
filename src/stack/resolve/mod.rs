//! Decoding the merged table into the typed [`Stack`] and checking it:
//! every reference, CIDR, port and secret, reporting all errors at once.
//!
//! One module per kind it decodes; what they share (the context that
//! collects errors and references, names, CIDRs, ports, secrets, tags) is here.

mod cluster;
mod connection;
mod dataset;
mod expose;
mod generation;
mod network;
mod registry;
mod service;
mod test_query;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;

use super::decode::{Errors, Fields, named_tables_of, wrong_type};
use super::diag::{Code, Diagnostic, did_you_mean};
use super::load::{Loaded, TOP_LEVEL};
use super::model::*;
use super::source::{Node, NodeKind, Span, Table, expressions};

use cluster::decode_cluster;
use connection::decode_connection;
use expose::{check_exposes, check_local_ports, check_tls_target, decode_expose};
use network::{check_networks, decode_network};
use registry::decode_registry;
use service::{check_query_log_target, check_services, decode_service};

/// Where things were written, for errors found after decoding.
#[derive(Default)]
struct Spans {
    names: BTreeMap<String, Span>,
}

struct Ctx<'a> {
    errors: &'a mut Errors,
    spans: Spans,
    base_dirs: &'a BTreeMap<String, PathBuf>,
    root: &'a Path,
    /// Every reference to check once everything is decoded: (kind, name, span, from).
    refs: Vec<(&'static str, String, Span, String)>,
}

impl Ctx<'_> {
    fn base_dir(&self, addr: &str) -> PathBuf {
        self.base_dirs
            .get(addr)
            .cloned()
            .unwrap_or_else(|| self.root.to_path_buf())
    }
    fn refer(&mut self, kind: &'static str, name: &str, span: Span, from: &str) {
        self.refs
            .push((kind, name.to_owned(), span, from.to_owned()));
    }
}

/// Decodes and validates. `env` None validates the stack without choosing an
/// environment (the first declared one is used for environment fields).
pub fn resolve(loaded: &Loaded, env: Option<&str>, errors: &mut Errors) -> Option<Stack> {
    let top = Fields::new(
        &loaded.table,
        Span {
            file: loaded.main,
            start: 0,
            end: 0,
        },
        "the stack",
    );
    top.allow(errors, TOP_LEVEL);
    let mut ctx = Ctx {
        errors,
        spans: Spans::default(),
        base_dirs: &loaded.base_dirs,
        root: &loaded.root,
        refs: Vec::new(),
    };

    let mut name = loaded
        .root
        .file_name()
        .and_then(|s| s.to_str())
        .unwrap_or("stack")
        .to_owned();
    if let Some((t, span)) = top.table_opt(ctx.errors, "stack") {
        let f = Fields::new(t, span, "[stack]");
        f.allow(ctx.errors, &["name", "description"]);
        if let Some((n, span)) = f.str_opt(ctx.errors, "name") {
            check_name(&mut ctx, &n, span, "stack name");
            name = n;
        }
        f.str_opt(ctx.errors, "description");
    }

    let environments = decode_environments(&mut ctx, &top);
    let networks = collect(&mut ctx, &top, "network", decode_network);
    let clusters = collect(&mut ctx, &top, "cluster", decode_cluster);
    let registries = collect(&mut ctx, &top, "registry", decode_registry);
    let connections = collect(&mut ctx, &top, "connection", decode_connection);
    let services = collect(&mut ctx, &top, "service", decode_service);
    let exposes = collect(&mut ctx, &top, "expose", decode_expose);

    check_networks(&mut ctx, &networks);
    check_references(
        &mut ctx,
        &networks,
        &clusters,
        &registries,
        &connections,
        &services,
    );
    check_services(&mut ctx, &services);
    check_exposes(&mut ctx, &exposes, &services);

    let env_name = env
        .map(str::to_owned)
        .or_else(|| environments.first().map(|e| e.name.clone()));
    let environment = env_name
        .and_then(|n| environments.into_iter().find(|e| e.name == n))
        .unwrap_or(Environment {
            name: "default".into(),
            target: Target::Local,
            region: None,
            cluster: None,
            registry: None,
            namespace: None,
            instance: None,
        });
    if environment.target == Target::Local {
        check_local_ports(&mut ctx, &exposes);
    }
    check_tls_target(&mut ctx, environment.target, &exposes);
    check_query_log_target(&mut ctx, environment.target, &services);

    if !ctx.errors.0.is_empty() {
        return None;
    }
    Some(Stack {
        name,
        root: loaded.root.clone(),
        env: environment,
        networks,
        clusters,
        registries,
        connections,
        services,
        exposes,
        outputs: loaded.outputs.clone(),
    })
}

fn check_name(ctx: &mut Ctx<'_>, name: &str, span: Span, what: &str) {
    if !expressions(name).is_empty() {
        return; // an unresolved `${...}`, reported while loading
    }
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && !name.ends_with('-');
    if !ok {
        ctx.errors.push(
            Diagnostic::new(Code::InvalidValue, span, format!("invalid {what} `{name}`"))
                .label("not a valid name")
                .help("use lowercase letters, digits and `-`, starting with a letter, at most 63 characters (it becomes a DNS name)"),
        );
    }
}

fn collect<T>(
    ctx: &mut Ctx<'_>,
    top: &Fields<'_>,
    kind: &str,
    decode: fn(&mut Ctx<'_>, &str, &Table, Span) -> Option<T>,
) -> BTreeMap<String, T> {
    let mut out = BTreeMap::new();
    let Some((t, _)) = top.table_opt(ctx.errors, kind) else {
        return out;
    };
    for (name, name_span, table, span) in named_tables_of(ctx.errors, t, kind) {
        check_name(ctx, name, name_span, &format!("{kind} name"));
        ctx.spans.names.insert(format!("{kind}.{name}"), name_span);
        if let Some(v) = decode(ctx, name, table, span) {
            out.insert(name.to_owned(), v);
        }
    }
    out
}

fn decode_environments(ctx: &mut Ctx<'_>, top: &Fields<'_>) -> Vec<Environment> {
    let mut out = Vec::new();
    let Some((t, _)) = top.table_opt(ctx.errors, "environment") else {
        return out;
    };
    for (name, name_span, table, span) in named_tables_of(ctx.errors, t, "environment") {
        check_name(ctx, name, name_span, "environment name");
        let f = Fields::new(table, span, format!("environment.{name}"));
        f.allow(
            ctx.errors,
            &[
                "target",
                "region",
                "cluster",
                "registry",
                "namespace",
                "description",
            ],
        );
        f.str_opt(ctx.errors, "description");
        let target = match f.str_req(ctx.errors, "target", "\"local\"") {
            Some((t, span)) => match t.as_str() {
                "local" => Target::Local,
                "aws" => Target::Aws,
                "kubernetes" => Target::Kubernetes,
                other => {
                    let mut d = Diagnostic::new(
                        Code::InvalidValue,
                        span,
                        format!("unknown target `{other}`"),
                    )
                    .label("not a target");
                    d = match did_you_mean(other, ["local", "aws", "kubernetes"]) {
                        Some(s) => d.help(format!("did you mean `{s}`?")),
                        None => d.help("use \"local\", \"aws\" or \"kubernetes\""),
                    };
                    ctx.errors.push(d);
                    continue;
                }
            },
            None => continue,
        };
        let cluster = f.str_opt(ctx.errors, "cluster");
        if let Some((c, span)) = &cluster {
            ctx.refer("cluster", c, *span, &format!("environment.{name}"));
        }
        let registry = f.str_opt(ctx.errors, "registry");
        if let Some((r, span)) = &registry
            && !r.contains('/')
            && !r.contains(':')
        {
            ctx.refer("registry", r, *span, &format!("environment.{name}"));
        }
        if target == Target::Aws && cluster.is_none() && f.entry("cluster").is_none() {
            // Services need a cluster to run on; networks and registries alone are fine.
        }
        out.push(Environment {
            name: name.to_owned(),
            target,
            region: f.str_opt(ctx.errors, "region").map(|v| v.0),
            cluster: cluster.map(|v| v.0),
            registry: registry.map(|v| v.0),
            namespace: f.str_opt(ctx.errors, "namespace").map(|v| v.0),
            instance: None,
        });
    }
    out
}

fn cidr(ctx: &mut Ctx<'_>, value: &str, span: Span) -> Option<Ipv4Net> {
    match value.parse::<Ipv4Net>() {
        Ok(net) if net.network() == net.addr() => Some(net),
        Ok(net) => {
            ctx.errors.push(
                Diagnostic::new(
                    Code::InvalidCidr,
                    span,
                    format!("`{value}` has host bits set"),
                )
                .label("not a network address")
                .help(format!("did you mean \"{}\"?", net.trunc())),
            );
            None
        }
        Err(_) => {
            ctx.errors.push(
                Diagnostic::new(
                    Code::InvalidCidr,
                    span,
                    format!("`{value}` is not an IPv4 CIDR block"),
                )
                .label("invalid CIDR")
                .help("write it as ADDRESS/PREFIX, e.g. \"10.0.0.0/16\""),
            );
            None
        }
    }
}

fn tags(ctx: &mut Ctx<'_>, f: &Fields<'_>) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    if let Some((t, _)) = f.table_opt(ctx.errors, "tags") {
        for e in &t.entries {
            match &e.value.kind {
                NodeKind::Str(s) => {
                    out.insert(e.key.clone(), s.clone());
                }
                other => ctx.errors.push(wrong_type(e, "a string", other)),
            }
        }
    }
    out
}

/// A secret reference: `{ env = "NAME" }` or `{ file = "PATH" }`; a plain
/// string is refused so secrets never live in stack files.
fn secret_ref(ctx: &mut Ctx<'_>, f: &Fields<'_>, key: &str, base: &Path) -> Option<SecretRef> {
    let e = f.entry(key)?;
    secret_node(ctx, &e.value, key, false, base)
}

/// `item`: the secret is one entry of the array `key`.
fn secret_node(
    ctx: &mut Ctx<'_>,
    n: &Node,
    key: &str,
    item: bool,
    base: &Path,
) -> Option<SecretRef> {
    match &n.kind {
        k if k.is_unresolved() => None,
        NodeKind::Str(_) => {
            let (message, help) = if item {
                (
                    format!("an entry of `{key}` is a secret written inline"),
                    format!(
                        "give each entry by reference, e.g. {key} = [{{ env = \"VAR_NAME\" }}, {{ file = \"/path/to/secret\" }}], and remove the value from version control"
                    ),
                )
            } else {
                (
                    format!("`{key}` is a secret written inline"),
                    format!(
                        "give it by reference: {key} = {{ env = \"VAR_NAME\" }} or {key} = {{ file = \"/path/to/secret\" }}, and remove the value from version control"
                    ),
                )
            };
            ctx.errors.push(
                Diagnostic::new(Code::InlineSecret, n.span, message)
                    .label("secret value in a stack file (not shown)")
                    .redact()
                    .help(help),
            );
            None
        }
        NodeKind::Table(t) => {
            let sf = Fields::new(t, n.span, format!("`{key}`"));
            sf.allow(ctx.errors, &["env", "file"]);
            match (
                sf.str_opt(ctx.errors, "env"),
                sf.str_opt(ctx.errors, "file"),
            ) {
                (Some((v, _)), None) => Some(SecretRef::Env(v)),
                (None, Some((p, _))) => Some(SecretRef::File(base.join(p))),
                _ => {
                    ctx.errors.push(
                        Diagnostic::new(
                            Code::InvalidValue,
                            n.span,
                            format!("`{key}` must name exactly one of `env` or `file`"),
                        )
                        .label("ambiguous reference")
                        .help(format!("{key} = {{ env = \"VAR_NAME\" }}")),
                    );
                    None
                }
            }
        }
        other => {
            ctx.errors.push(
                Diagnostic::new(
                    Code::WrongType,
                    n.span,
                    format!("`{key}` must be a reference, found {}", other.type_name()),
                )
                .label("expected { env = ... } or { file = ... }")
                .help(format!("{key} = {{ env = \"VAR_NAME\" }}")),
            );
            None
        }
    }
}

fn port(
    ctx: &mut Ctx<'_>,
    f: &Fields<'_>,
    key: &str,
    range: std::ops::RangeInclusive<i64>,
    default: Option<u16>,
) -> Option<u16> {
    let Some((v, span)) = f.int_opt(ctx.errors, key) else {
        return default;
    };
    if !range.contains(&v) {
        ctx.errors.push(
            Diagnostic::new(
                Code::PortOutOfRange,
                span,
                format!("`{key}` = {v} is out of range"),
            )
            .label(format!("must be {}–{}", range.start(), range.end()))
            .help(format!(
                "choose a port from {} to {}",
                range.start(),
                range.end()
            )),
        );
        return None;
    }
    u16::try_from(v).ok()
}

fn check_references(
    ctx: &mut Ctx<'_>,
    networks: &BTreeMap<String, Network>,
    clusters: &BTreeMap<String, Cluster>,
    registries: &BTreeMap<String, Registry>,
    connections: &BTreeMap<String, Connection>,
    services: &BTreeMap<String, Service>,
) {
    let refs = std::mem::take(&mut ctx.refs);
    for (kind, name, span, from) in refs {
        let (found, candidates): (bool, Vec<String>) = match kind {
            "network" => (
                networks.contains_key(&name),
                networks.keys().cloned().collect(),
            ),
            "cluster" => (
                clusters.contains_key(&name),
                clusters.keys().cloned().collect(),
            ),
            "registry" => (
                registries.contains_key(&name),
                registries.keys().cloned().collect(),
            ),
            "connection" => (
                connections.contains_key(&name),
                connections.keys().cloned().collect(),
            ),
            "service" => (
                services.contains_key(&name),
                services.keys().cloned().collect(),
            ),
            "subnet" => {
                let (net, sub) = name.split_once('.').unwrap_or((&name, ""));
                match networks.get(net) {
                    // The network itself is reported missing separately.
                    None => (true, Vec::new()),
                    Some(n) => (
                        n.subnets.iter().any(|s| s.name == sub),
                        n.subnets
                            .iter()
                            .map(|s| format!("{net}.{}", s.name))
                            .collect(),
                    ),
                }
            }
            "dataset" => {
                let (svc, ds) = name.split_once('.').unwrap_or((&name, ""));
                match services.get(svc) {
                    None => (true, Vec::new()),
                    Some(s) => (
                        s.datasets.contains_key(ds),
                        s.datasets.keys().map(|d| format!("{svc}.{d}")).collect(),
                    ),
                }
            }
            "lookup" => {
                let (svc, ep) = name.split_once('.').unwrap_or((&name, ""));
                let found = services
                    .get(svc)
                    .is_some_and(|s| matches!(s.endpoints.get(ep), Some(Endpoint::Lookup { .. })));
                let candidates = services
                    .values()
                    .flat_map(|s| {
                        s.endpoints
                            .iter()
                            .filter(|(_, e)| matches!(e, Endpoint::Lookup { .. }))
                            .map(move |(e, _)| format!("{}.{e}", s.name))
                    })
                    .collect();
                (found, candidates)
            }
            _ => (true, Vec::new()),
        };
        if found {
            continue;
        }
        let shown = match kind {
            "subnet" | "dataset" => name
                .split_once('.')
                .map(|x| x.1.to_owned())
                .unwrap_or(name.clone()),
            _ => name.clone(),
        };
        let what = if kind == "lookup" {
            "lookup endpoint"
        } else {
            kind
        };
        let owner = name.split_once('.').map(|x| x.0).unwrap_or_default();
        let message = match kind {
            "subnet" => {
                format!("{from} refers to subnet `{shown}`, which network {owner} does not have")
            }
            _ => format!("{from} refers to undefined {what} `{shown}`"),
        };
        let mut d = Diagnostic::new(Code::DanglingReference, span, message)
            .label(format!("no {what} named `{shown}`"));
        let cand_short: Vec<String> = candidates
            .iter()
            .map(|c| {
                if matches!(kind, "subnet" | "dataset") {
                    c.split_once('.')
                        .map(|x| x.1.to_owned())
                        .unwrap_or(c.clone())
                } else {
                    c.clone()
                }
            })
            .collect();
        d = match did_you_mean(&shown, cand_short.iter().map(String::as_str)) {
            Some(s) => d.help(format!("did you mean `{s}`?")),
            None if cand_short.is_empty() => d.help(match kind {
                "lookup" => match shown.split_once('.') {
                    Some((svc, ep)) => format!(
                        "define it first: [service.{svc}.endpoint.{ep}] with kind = \"lookup\""
                    ),
                    None => "name it as SERVICE.ENDPOINT".to_owned(),
                },
                "subnet" => format!("define it first: [network.{owner}.subnet.{shown}]"),
                "dataset" => format!("define it first: [service.{owner}.dataset.{shown}]"),
                _ => format!("define it first: [{kind}.{shown}]"),
            }),
            None => d.help(format!("defined: {}", cand_short.join(", "))),
        };
        ctx.errors.push(d);
    }
}
