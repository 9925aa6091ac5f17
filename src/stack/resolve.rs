//! Decoding the merged table into the typed [`Stack`] and checking it:
//! every reference, CIDR, port and secret, reporting all errors at once.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;

use super::decode::{Errors, Fields, named_tables_of};
use super::diag::{Code, Diagnostic, did_you_mean};
use super::load::{Loaded, TOP_LEVEL};
use super::model::*;
use super::source::{NodeKind, Span, Table, expressions};

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
                other => ctx
                    .errors
                    .push(super::decode::wrong_type(e, "a string", other)),
            }
        }
    }
    out
}

fn decode_network(ctx: &mut Ctx<'_>, name: &str, t: &Table, span: Span) -> Option<Network> {
    let f = Fields::new(t, span, format!("network.{name}"));
    f.allow(ctx.errors, &["cidr", "subnet", "tags", "nat_gateway"]);
    let cidr_v = f
        .str_req(ctx.errors, "cidr", "\"10.0.0.0/16\"")
        .and_then(|(v, s)| cidr(ctx, &v, s));
    let nat = nat_mode(ctx, &f);
    // Every subnet whose zone is known (even one with a bad CIDR), for the NAT checks.
    let mut layout: Vec<(String, Span, String, bool)> = Vec::new();
    let mut subnets = Vec::new();
    for (sname, sname_span, st, sspan) in f.named_tables(ctx.errors, "subnet") {
        check_name(ctx, sname, sname_span, "subnet name");
        ctx.spans
            .names
            .insert(format!("network.{name}.subnet.{sname}"), sname_span);
        let sf = Fields::new(st, sspan, format!("network.{name}.subnet.{sname}"));
        sf.allow(ctx.errors, &["zone", "cidr", "public"]);
        let zone = sf.str_req(ctx.errors, "zone", "\"us-east-1a\"");
        let c = sf
            .str_req(ctx.errors, "cidr", "\"10.0.1.0/24\"")
            .and_then(|(v, s)| cidr(ctx, &v, s).map(|c| (c, s)));
        let public = sf.bool_opt(ctx.errors, "public").unwrap_or(false);
        if let Some((zone, _)) = &zone {
            layout.push((sname.to_owned(), sname_span, zone.clone(), public));
        }
        if let (Some((zone, _)), Some((c, cspan))) = (zone, c) {
            ctx.spans
                .names
                .insert(format!("network.{name}.subnet.{sname}.cidr"), cspan);
            subnets.push(Subnet {
                name: sname.to_owned(),
                zone,
                cidr: c,
                public,
            });
        }
    }
    if let Some((_, s)) = f.str_opt(&mut Errors::default(), "cidr") {
        ctx.spans.names.insert(format!("network.{name}.cidr"), s);
    }
    let tags = tags(ctx, &f);
    let nat_gateway = check_nat(ctx, name, nat, &layout);
    Some(Network {
        name: name.to_owned(),
        cidr: cidr_v?,
        subnets,
        tags,
        nat_gateway,
    })
}

const NAT_MODES: [&str; 3] = ["single", "per_zone", "none"];

/// The `nat_gateway` a network declares, if any (and valid).
fn nat_mode(ctx: &mut Ctx<'_>, f: &Fields<'_>) -> Option<(NatGateways, Span)> {
    let (v, span) = f.str_opt(ctx.errors, "nat_gateway")?;
    let mode = match v.as_str() {
        "single" => NatGateways::Single,
        "per_zone" => NatGateways::PerZone,
        "none" => NatGateways::None,
        _ if !expressions(&v).is_empty() => return None, // reported while loading
        other => {
            let mut d = Diagnostic::new(
                Code::InvalidValue,
                span,
                format!("unknown nat_gateway `{other}`"),
            )
            .label("not a NAT gateway layout");
            d = match did_you_mean(other, NAT_MODES) {
                Some(s) => d.help(format!("did you mean `{s}`?")),
                None => d.help("use \"single\", \"per_zone\" or \"none\""),
            };
            ctx.errors.push(d);
            return None;
        }
    };
    Some((mode, span))
}

/// The network's NAT gateway layout: the declared one if it can be built,
/// else `single` when there are private subnets and a public one to put the
/// NAT gateway in, else `none`. `layout` is (name, name span, zone, public)
/// of every subnet.
fn check_nat(
    ctx: &mut Ctx<'_>,
    network: &str,
    declared: Option<(NatGateways, Span)>,
    layout: &[(String, Span, String, bool)],
) -> NatGateways {
    let any_public = layout.iter().any(|s| s.3);
    let any_private = layout.iter().any(|s| !s.3);
    let Some((mode, span)) = declared else {
        return if any_public && any_private {
            NatGateways::Single
        } else {
            NatGateways::None
        };
    };
    if mode == NatGateways::None {
        return mode;
    }
    if !any_public {
        ctx.errors.push(
            Diagnostic::new(
                Code::NatGatewayPlacement,
                span,
                format!(
                    "network {network} has no public subnet to put a NAT gateway in"
                ),
            )
            .label("needs a public subnet")
            .help("a NAT gateway lives in a public subnet: add a subnet with `public = true`, or set `nat_gateway = \"none\"`"),
        );
        return mode;
    }
    if mode == NatGateways::PerZone {
        let mut zones: Vec<&str> = Vec::new();
        for s in layout.iter().filter(|s| !s.3) {
            if !zones.contains(&s.2.as_str()) {
                zones.push(&s.2);
            }
        }
        for zone in zones {
            if layout.iter().any(|s| s.3 && s.2 == zone) {
                continue;
            }
            let mut d = Diagnostic::new(
                Code::NatGatewayPlacement,
                span,
                format!(
                    "zone {zone} of network {network} has private subnets but no public subnet for its NAT gateway"
                ),
            )
            .label("one NAT gateway per zone");
            for s in layout.iter().filter(|s| !s.3 && s.2 == zone) {
                d = d.related(s.1, format!("private subnet in {zone}"));
            }
            ctx.errors.push(d.help(format!(
                "add a public subnet in {zone}, or use `nat_gateway = \"single\"` to route every zone through one NAT gateway"
            )));
        }
    }
    mode
}

fn check_networks(ctx: &mut Ctx<'_>, networks: &BTreeMap<String, Network>) {
    for n in networks.values() {
        for (i, s) in n.subnets.iter().enumerate() {
            let span = ctx.spans.names[&format!("network.{}.subnet.{}.cidr", n.name, s.name)];
            if !n.cidr.contains(&s.cidr) {
                ctx.errors.push(
                    Diagnostic::new(
                        Code::SubnetOutsideNetwork,
                        span,
                        format!(
                            "subnet {} ({}) is outside network {} ({})",
                            s.name, s.cidr, n.name, n.cidr
                        ),
                    )
                    .label("not inside the network's CIDR")
                    .help(format!("choose a block inside {}", n.cidr)),
                );
            }
            for other in &n.subnets[..i] {
                if other.cidr.contains(&s.cidr.network()) || s.cidr.contains(&other.cidr.network())
                {
                    let other_span =
                        ctx.spans.names[&format!("network.{}.subnet.{}.cidr", n.name, other.name)];
                    ctx.errors.push(
                        Diagnostic::new(
                            Code::OverlappingCidr,
                            span,
                            format!(
                                "subnet {} ({}) overlaps subnet {} ({})",
                                s.name, s.cidr, other.name, other.cidr
                            ),
                        )
                        .label("overlaps")
                        .related(other_span, "the other subnet")
                        .help("give each subnet its own block, e.g. split the network into /24s"),
                    );
                }
            }
        }
    }
    // Report each overlap at the network written later, pointing back at the earlier one.
    let mut list: Vec<&Network> = networks.values().collect();
    list.sort_by_key(|n| {
        ctx.spans
            .names
            .get(&format!("network.{}.cidr", n.name))
            .map(|s| (s.file, s.start))
    });
    for (i, a) in list.iter().enumerate() {
        for b in &list[..i] {
            if a.cidr.contains(&b.cidr.network()) || b.cidr.contains(&a.cidr.network()) {
                let span = ctx.spans.names[&format!("network.{}.cidr", a.name)];
                let other = ctx.spans.names[&format!("network.{}.cidr", b.name)];
                ctx.errors.push(
                    Diagnostic::new(
                        Code::OverlappingCidr,
                        span,
                        format!(
                            "network {} ({}) overlaps network {} ({})",
                            a.name, a.cidr, b.name, b.cidr
                        ),
                    )
                    .label("overlaps")
                    .related(other, "the other network")
                    .help("networks in one stack must not overlap, so they can be peered"),
                );
            }
        }
    }
}

fn decode_cluster(ctx: &mut Ctx<'_>, name: &str, t: &Table, span: Span) -> Option<Cluster> {
    let f = Fields::new(t, span, format!("cluster.{name}"));
    let kind = f
        .str_opt(ctx.errors, "kind")
        .map(|v| v.0)
        .unwrap_or_else(|| "eks".into());
    if kind == "existing" {
        f.allow(ctx.errors, &["kind", "context"]);
        let context = f.str_opt(ctx.errors, "context").map(|v| v.0);
        return Some(Cluster {
            name: name.to_owned(),
            kind: ClusterKind::Existing { context },
        });
    }
    if kind != "eks" {
        if let Some(e) = f.entry("kind") {
            ctx.errors.push(
                Diagnostic::new(
                    Code::InvalidValue,
                    e.value.span,
                    format!("unknown cluster kind `{kind}`"),
                )
                .label("not a cluster kind")
                .help(
                    "use \"eks\" (created by mesh) or \"existing\" (reached by kubeconfig context)",
                ),
            );
        }
        return None;
    }
    f.allow(
        ctx.errors,
        &[
            "kind",
            "version",
            "network",
            "subnets",
            "endpoint_public",
            "endpoint_private",
            "role_arn",
            "node_group",
        ],
    );
    let version = f.str_req(ctx.errors, "version", "\"1.30\"");
    if let Some((v, s)) = &version {
        let ok = v.split_once('.').is_some_and(|(a, b)| {
            a == "1" && !b.is_empty() && b.chars().all(|c| c.is_ascii_digit())
        });
        if !ok {
            ctx.errors.push(
                Diagnostic::new(
                    Code::InvalidValue,
                    *s,
                    format!("`{v}` is not a Kubernetes version"),
                )
                .label("expected MAJOR.MINOR")
                .help("e.g. version = \"1.30\""),
            );
        }
    }
    let network = f.str_req(ctx.errors, "network", "\"main\"");
    if let Some((n, s)) = &network {
        ctx.refer("network", n, *s, &format!("cluster.{name}"));
    }
    let subnets = f.strs_opt(ctx.errors, "subnets").unwrap_or_default();
    if let Some((n, _)) = &network {
        for (sub, s) in &subnets {
            ctx.refer(
                "subnet",
                &format!("{n}.{sub}"),
                *s,
                &format!("cluster.{name}"),
            );
        }
    }
    let mut node_groups = Vec::new();
    if let Some(e) = f.entry("node_group") {
        let items: Vec<(&Table, Span)> = match &e.value.kind {
            NodeKind::Array(items) => items
                .iter()
                .filter_map(|i| match &i.kind {
                    NodeKind::Table(t) => Some((t, i.span)),
                    _ => None,
                })
                .collect(),
            other => {
                ctx.errors.push(super::decode::wrong_type(
                    e,
                    "an array of tables ([[cluster.NAME.node_group]])",
                    other,
                ));
                Vec::new()
            }
        };
        let mut seen: BTreeMap<String, Span> = BTreeMap::new();
        for (nt, nspan) in items {
            let nf = Fields::new(nt, nspan, format!("a node group of cluster.{name}"));
            nf.allow(
                ctx.errors,
                &[
                    "name",
                    "instance_types",
                    "min",
                    "max",
                    "desired",
                    "subnets",
                    "disk_size",
                    "labels",
                    "role_arn",
                ],
            );
            let Some((ng_name, ng_span)) = nf.str_req(ctx.errors, "name", "\"general\"") else {
                continue;
            };
            check_name(ctx, &ng_name, ng_span, "node group name");
            if let Some(first) = seen.get(&ng_name) {
                ctx.errors.push(
                    Diagnostic::new(
                        Code::Duplicate,
                        ng_span,
                        format!("node group `{ng_name}` is defined twice in cluster.{name}"),
                    )
                    .label("duplicate name")
                    .related(*first, "first defined here")
                    .help("give each node group a unique name"),
                );
                continue;
            }
            seen.insert(ng_name.clone(), ng_span);
            let instance_types: Vec<String> = nf
                .strs_opt(ctx.errors, "instance_types")
                .unwrap_or_default()
                .into_iter()
                .map(|v| v.0)
                .collect();
            if instance_types.is_empty() {
                ctx.errors.push(
                    Diagnostic::new(
                        Code::MissingField,
                        nspan,
                        format!("node group `{ng_name}` needs `instance_types`"),
                    )
                    .label("here")
                    .help("add instance_types = [\"m6i.large\"]"),
                );
            }
            let min = nf.u32_opt(ctx.errors, "min").unwrap_or(1);
            let max = nf.u32_opt(ctx.errors, "max").unwrap_or(min.max(1));
            let desired = nf.u32_opt(ctx.errors, "desired").unwrap_or(min);
            if !(min <= desired && desired <= max) || max == 0 {
                ctx.errors.push(
                    Diagnostic::new(Code::InvalidValue, ng_span, format!("node group `{ng_name}`: need 0 ≤ min ≤ desired ≤ max and max ≥ 1, found min {min}, desired {desired}, max {max}"))
                        .label("inconsistent sizes")
                        .help("adjust min, desired and max"),
                );
            }
            let ng_subnets = nf.strs_opt(ctx.errors, "subnets").unwrap_or_default();
            if let Some((n, _)) = &network {
                for (sub, s) in &ng_subnets {
                    ctx.refer(
                        "subnet",
                        &format!("{n}.{sub}"),
                        *s,
                        &format!("cluster.{name}"),
                    );
                }
            }
            let mut labels = BTreeMap::new();
            if let Some((lt, _)) = nf.table_opt(ctx.errors, "labels") {
                for e in &lt.entries {
                    if let NodeKind::Str(s) = &e.value.kind {
                        labels.insert(e.key.clone(), s.clone());
                    } else {
                        ctx.errors
                            .push(super::decode::wrong_type(e, "a string", &e.value.kind));
                    }
                }
            }
            node_groups.push(NodeGroup {
                name: ng_name,
                instance_types,
                min,
                max,
                desired,
                subnets: if ng_subnets.is_empty() {
                    subnets.iter().map(|s| s.0.clone()).collect()
                } else {
                    ng_subnets.into_iter().map(|v| v.0).collect()
                },
                disk_size: nf.u32_opt(ctx.errors, "disk_size").unwrap_or(20),
                labels,
                role_arn: nf.str_opt(ctx.errors, "role_arn").map(|v| v.0),
            });
        }
    }
    Some(Cluster {
        name: name.to_owned(),
        kind: ClusterKind::Eks(EksCluster {
            version: version?.0,
            network: network?.0,
            subnets: subnets.into_iter().map(|v| v.0).collect(),
            endpoint_public: f.bool_opt(ctx.errors, "endpoint_public").unwrap_or(true),
            endpoint_private: f.bool_opt(ctx.errors, "endpoint_private").unwrap_or(true),
            role_arn: f.str_opt(ctx.errors, "role_arn").map(|v| v.0),
            node_groups,
        }),
    })
}

fn decode_registry(ctx: &mut Ctx<'_>, name: &str, t: &Table, span: Span) -> Option<Registry> {
    let f = Fields::new(t, span, format!("registry.{name}"));
    f.allow(ctx.errors, &["scan_on_push", "immutable_tags", "keep_last"]);
    let keep_last = f.u32_opt(ctx.errors, "keep_last");
    if keep_last == Some(0)
        && let Some(e) = f.entry("keep_last")
    {
        ctx.errors.push(
            Diagnostic::new(
                Code::InvalidValue,
                e.value.span,
                "`keep_last` must be at least 1",
            )
            .label("keeps nothing")
            .help("remove keep_last to keep every image, or set it to 1 or more"),
        );
    }
    Some(Registry {
        name: name.to_owned(),
        scan_on_push: f.bool_opt(ctx.errors, "scan_on_push").unwrap_or(true),
        immutable_tags: f.bool_opt(ctx.errors, "immutable_tags").unwrap_or(true),
        keep_last,
    })
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
    n: &super::source::Node,
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

fn decode_connection(ctx: &mut Ctx<'_>, name: &str, t: &Table, span: Span) -> Option<Connection> {
    let f = Fields::new(t, span, format!("connection.{name}"));
    let common = [
        "kind",
        "database",
        "user",
        "password",
        "pool_size",
        "statement_timeout",
    ];
    let kind = f.str_req(ctx.errors, "kind", "\"postgres\"");
    let base = ctx.base_dir(&format!("connection.{name}"));
    let kind = match kind {
        Some((k, _)) if k == "postgres" || k == "postgresql" => {
            f.allow(
                ctx.errors,
                &[&common[..], &["host", "port", "sslmode", "ca_file"]].concat(),
            );
            let host = f.str_req(ctx.errors, "host", "\"db.internal\"");
            let port = port(ctx, &f, "port", 1..=65535, Some(5432));
            let sslmode = match f.str_opt(ctx.errors, "sslmode") {
                None => Some(SslMode::Disable),
                Some((m, _)) if m == "disable" => Some(SslMode::Disable),
                Some((m, _)) if m == "require" => Some(SslMode::Require),
                Some((m, _)) if m == "verify-full" => Some(SslMode::VerifyFull),
                Some((m, s)) => {
                    ctx.errors.push(
                        Diagnostic::new(Code::InvalidValue, s, format!("unknown sslmode `{m}`"))
                            .label("not an sslmode")
                            .help("use \"disable\", \"require\" (encrypt) or \"verify-full\" (encrypt, check the certificate and host name)"),
                    );
                    None
                }
            };
            let ca_file = match f.str_opt(ctx.errors, "ca_file") {
                Some((file, fspan)) => {
                    let path = base.join(&file);
                    if !path.is_file() {
                        ctx.errors.push(
                            Diagnostic::new(
                                Code::DanglingReference,
                                fspan,
                                format!("CA file `{file}` not found"),
                            )
                            .label(format!("looked for {}", path.display()))
                            .help("paths are relative to the file that declares the connection"),
                        );
                    }
                    if sslmode != Some(SslMode::VerifyFull) {
                        ctx.errors.push(
                            Diagnostic::new(
                                Code::InvalidValue,
                                fspan,
                                "`ca_file` is only read with sslmode = \"verify-full\"",
                            )
                            .label("not used")
                            .help("add sslmode = \"verify-full\" or remove `ca_file`"),
                        );
                    }
                    Some(path)
                }
                None => None,
            };
            match (host, port, sslmode) {
                (Some(host), Some(port), Some(sslmode)) => Some(ConnectionKind::Postgres {
                    host: host.0,
                    port,
                    sslmode,
                    ca_file,
                }),
                _ => None,
            }
        }
        Some((k, _)) if k == "snowflake" => {
            f.allow(
                ctx.errors,
                &[
                    &common[..],
                    &[
                        "account",
                        "warehouse",
                        "schema",
                        "role",
                        "private_key",
                        "url",
                    ],
                ]
                .concat(),
            );
            let account = f.str_req(ctx.errors, "account", "\"myorg-account1\"");
            let private_key = secret_ref(ctx, &f, "private_key", &base);
            if private_key.is_some() && f.entry("password").is_some() {
                ctx.errors.push(
                    Diagnostic::new(
                        Code::InvalidValue,
                        f.entry("private_key").map_or(span, |e| e.value.span),
                        "a Snowflake connection authenticates with `password` or `private_key`, not both",
                    )
                    .label("second credential")
                    .help("remove `password` or `private_key`"),
                );
            }
            let url = match f.str_opt(ctx.errors, "url") {
                Some((u, us)) if !(u.starts_with("https://") || u.starts_with("http://")) => {
                    ctx.errors.push(
                        Diagnostic::new(Code::InvalidValue, us, format!("`url` must start with https:// or http://, found `{u}`"))
                            .label("not a URL")
                            .help("e.g. url = \"https://myorg-account1.privatelink.snowflakecomputing.com\"; leave it out for the account's public endpoint"),
                    );
                    None
                }
                other => other.map(|v| v.0),
            };
            let (warehouse, schema, role) = (
                f.str_opt(ctx.errors, "warehouse").map(|v| v.0),
                f.str_opt(ctx.errors, "schema").map(|v| v.0),
                f.str_opt(ctx.errors, "role").map(|v| v.0),
            );
            account.map(|account| ConnectionKind::Snowflake {
                account: account.0,
                warehouse,
                schema,
                role,
                private_key,
                url,
            })
        }
        Some((k, s)) => {
            ctx.errors.push(
                Diagnostic::new(
                    Code::InvalidValue,
                    s,
                    format!("unsupported connection kind `{k}`"),
                )
                .label("not supported")
                .help("use \"postgres\" or \"snowflake\""),
            );
            return None;
        }
        None => return None,
    };
    let database = f.str_req(ctx.errors, "database", "\"analytics\"");
    let user = f.str_req(ctx.errors, "user", "\"reader\"");
    let password = secret_ref(ctx, &f, "password", &base);
    if matches!(
        kind,
        Some(ConnectionKind::Snowflake {
            private_key: None,
            ..
        })
    ) && password.is_none()
        && f.entry("password").is_none()
    {
        ctx.errors.push(
            Diagnostic::new(
                Code::MissingField,
                span,
                format!("connection `{name}` has no credential"),
            )
            .label("no `password` or `private_key`")
            .help("add password = { env = \"SNOWFLAKE_PASSWORD\" } or private_key = { file = \"rsa_key.p8\" }"),
        );
    }
    let pool_size = match f.u32_opt(ctx.errors, "pool_size") {
        None => 4,
        Some(n) if (1..=64).contains(&n) => n,
        Some(n) => {
            ctx.errors.push(
                Diagnostic::new(
                    Code::InvalidValue,
                    f.entry("pool_size").map_or(span, |e| e.value.span),
                    format!("`pool_size` must be between 1 and 64, found {n}"),
                )
                .label("out of range")
                .help("connections each service keeps open for live datasets; 4 is the default"),
            );
            4
        }
    };
    let statement_timeout_ms = f
        .duration_opt(ctx.errors, "statement_timeout")
        .map_or(5_000, |(d, _)| d.as_millis().min(u64::MAX as u128) as u64);
    Some(Connection {
        name: name.to_owned(),
        kind: kind?,
        database: database?.0,
        user: user?.0,
        password,
        pool_size,
        statement_timeout_ms,
    })
}

/// A dataset's `mode` and the keys that only one mode reads: `refresh` and
/// `max_staleness` (preload), `cache` (live). A file is always bundled.
fn dataset_mode(
    ctx: &mut Ctx<'_>,
    df: &Fields<'_>,
    dname: &str,
    from_file: bool,
) -> Option<DatasetMode> {
    let mode = match df.str_opt(ctx.errors, "mode") {
        None if from_file => "bundle".to_owned(),
        None => "preload".to_owned(),
        Some((m, s)) => {
            if !matches!(m.as_str(), "bundle" | "preload" | "live") {
                ctx.errors.push(
                    Diagnostic::new(Code::InvalidValue, s, format!("unknown mode `{m}`"))
                        .label("not a mode")
                        .help("use \"bundle\" (frozen at apply), \"preload\" (loaded at start, `refresh` to reload) or \"live\" (queried per key)"),
                );
                return None;
            }
            if from_file && m != "bundle" {
                ctx.errors.push(
                    Diagnostic::new(
                        Code::InvalidValue,
                        s,
                        format!("a file dataset is bundled; mode `{m}` needs a connection"),
                    )
                    .label("file datasets are always \"bundle\"")
                    .help(format!(
                        "remove `mode`, or read `{dname}` from a connection with a query"
                    )),
                );
                return None;
            }
            m
        }
    };
    // A key that the chosen mode does not read is an error at that key.
    let misplaced = |ctx: &mut Ctx<'_>, key: &str, wants: &str| {
        if let Some(e) = df.entry(key) {
            ctx.errors.push(
                Diagnostic::new(
                    Code::InvalidValue,
                    e.key_span,
                    format!(
                        "`{key}` applies only to {wants} datasets, and `{dname}` is mode \"{mode}\""
                    ),
                )
                .label("not read in this mode")
                .help(format!(
                    "remove `{key}`, or set mode = \"{}\"",
                    if wants == "live" { "live" } else { "preload" }
                )),
            );
            true
        } else {
            false
        }
    };
    match mode.as_str() {
        "bundle" => {
            let a = misplaced(ctx, "refresh", "preload");
            let b = misplaced(ctx, "max_staleness", "preload");
            let c = misplaced(ctx, "cache", "live");
            (!(a || b || c)).then_some(DatasetMode::Bundle)
        }
        "preload" => {
            let c = misplaced(ctx, "cache", "live");
            let refresh = df.duration_opt(ctx.errors, "refresh");
            let max_staleness = df.duration_opt(ctx.errors, "max_staleness");
            if let (Some((_, s)), None) = (&max_staleness, &refresh) {
                ctx.errors.push(
                    Diagnostic::new(Code::InvalidValue, *s, "`max_staleness` needs `refresh`")
                        .label("nothing refreshes")
                        .help("add refresh = \"5m\" (the dataset goes stale when refreshes fail for max_staleness)"),
                );
                return None;
            }
            if let (Some((r, _)), Some((m, s))) = (&refresh, &max_staleness)
                && m < r
            {
                ctx.errors.push(
                    Diagnostic::new(
                        Code::InvalidValue,
                        *s,
                        "`max_staleness` is shorter than `refresh`",
                    )
                    .label("stale before the first refresh is due")
                    .help("make max_staleness a few refresh intervals, e.g. 3 × refresh"),
                );
                return None;
            }
            (!c).then_some(DatasetMode::Preload {
                refresh: refresh.map(|v| v.0),
                max_staleness: max_staleness.map(|v| v.0),
            })
        }
        _ => {
            let a = misplaced(ctx, "refresh", "preload");
            let b = misplaced(ctx, "max_staleness", "preload");
            let cache = decode_cache(ctx.errors, df, &format!("dataset.{dname}.cache"));
            match cache {
                Some(cache) if !(a || b) => Some(DatasetMode::Live { cache }),
                _ => None,
            }
        }
    }
}

/// The `cache = { ttl, max_entries }` table of `fields`: `Some(None)` when
/// there is none, `None` when it is invalid (reported).
fn decode_cache(errors: &mut Errors, fields: &Fields<'_>, what: &str) -> Option<Option<LiveCache>> {
    match fields.table_opt(errors, "cache") {
        Some((ct, cspan)) => {
            let cf = Fields::new(ct, cspan, what.to_string());
            cf.allow(errors, &["ttl", "max_entries"]);
            let ttl = cf.duration_opt(errors, "ttl");
            if cf.entry("ttl").is_none() {
                cf.missing(errors, "ttl", "a duration", "\"30s\"");
            }
            let max_entries = cf.u32_opt(errors, "max_entries").unwrap_or(10_000);
            match ttl {
                Some((ttl, _)) if max_entries > 0 => Some(Some(LiveCache { ttl, max_entries })),
                Some(_) => {
                    errors.push(
                        Diagnostic::new(
                            Code::InvalidValue,
                            cspan,
                            "`max_entries` must be at least 1",
                        )
                        .label("a cache that holds nothing")
                        .help("remove `cache` to query every time"),
                    );
                    None
                }
                None => None,
            }
        }
        None if fields.entry("cache").is_some() => None,
        None => Some(None),
    }
}

fn decode_service(ctx: &mut Ctx<'_>, name: &str, t: &Table, span: Span) -> Option<Service> {
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
        ],
    );
    let base = ctx.base_dir(&format!("service.{name}"));
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
            Resources {
                cpu: rf
                    .str_opt(ctx.errors, "cpu")
                    .map(|v| v.0)
                    .unwrap_or_else(|| "250m".into()),
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
            other => ctx.errors.push(super::decode::wrong_type(
                e,
                "an array of references",
                other,
            )),
        }
    }

    let mut datasets = BTreeMap::new();
    for (dname, dname_span, dt, dspan) in f.named_tables(ctx.errors, "dataset") {
        check_name(ctx, dname, dname_span, "dataset name");
        let df = Fields::new(dt, dspan, format!("service.{name}.dataset.{dname}"));
        df.allow(
            ctx.errors,
            &[
                "file",
                "connection",
                "query",
                "mode",
                "refresh",
                "max_staleness",
                "cache",
                "key",
                "duplicates",
            ],
        );
        let key = df.str_req(ctx.errors, "key", "\"customer_id\"");
        let duplicates = match df.str_opt(ctx.errors, "duplicates") {
            None => Duplicates::Error,
            Some((d, _)) if d == "error" => Duplicates::Error,
            Some((d, _)) if d == "last" => Duplicates::Last,
            Some((d, s)) => {
                ctx.errors.push(
                    Diagnostic::new(
                        Code::InvalidValue,
                        s,
                        format!("unknown duplicates policy `{d}`"),
                    )
                    .label("not a policy")
                    .help("use \"error\" or \"last\""),
                );
                Duplicates::Error
            }
        };
        let source = match (
            df.str_opt(ctx.errors, "file"),
            df.str_opt(ctx.errors, "connection"),
        ) {
            (Some((file, fspan)), None) => {
                let path = base.join(&file);
                if !path.is_file() {
                    ctx.errors.push(
                        Diagnostic::new(
                            Code::DanglingReference,
                            fspan,
                            format!("dataset file `{file}` not found"),
                        )
                        .label(format!("looked for {}", path.display()))
                        .help("paths are relative to the file that declares the dataset"),
                    );
                }
                if let Some(q) = df.entry("query") {
                    ctx.errors.push(
                        Diagnostic::new(Code::InvalidValue, q.key_span, "a file dataset has no `query`")
                            .label("only read with `connection`")
                            .help("remove `query`, or read the dataset from a connection instead of `file`"),
                    );
                }
                Some(DatasetSource::File(path))
            }
            (None, Some((conn, cspan))) => {
                ctx.refer(
                    "connection",
                    &conn,
                    cspan,
                    &format!("service.{name}.dataset.{dname}"),
                );
                let query = df.str_req(ctx.errors, "query", "\"select * from table\"");
                query.map(|(q, _)| DatasetSource::Sql {
                    connection: conn,
                    query: q,
                })
            }
            (Some(_), Some((_, s))) => {
                ctx.errors.push(
                    Diagnostic::new(
                        Code::InvalidValue,
                        s,
                        "a dataset reads either a `file` or a `connection`, not both",
                    )
                    .label("second source")
                    .help("remove `file` or `connection`"),
                );
                None
            }
            (None, None) => {
                ctx.errors.push(Diagnostic::new(Code::MissingField, dspan, format!("dataset `{dname}` needs a source")).label("no `file` or `connection`").help("add file = \"data.csv\" or connection = \"warehouse\" with query = \"...\""));
                None
            }
        };
        let from_file = df.entry("file").is_some();
        let mode = dataset_mode(ctx, &df, dname, from_file);
        // A mode in error is reported; the dataset still exists for the
        // references to it (no follow-on "undefined dataset" errors).
        let mode = mode.unwrap_or(if from_file {
            DatasetMode::Bundle
        } else {
            DatasetMode::Preload {
                refresh: None,
                max_staleness: None,
            }
        });
        if let (Some(source), Some((key, _))) = (source, key) {
            datasets.insert(
                dname.to_owned(),
                Dataset {
                    name: dname.to_owned(),
                    source,
                    mode,
                    key,
                    duplicates,
                },
            );
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
                ef.allow(ctx.errors, &["kind", "model", "enrich", "test"]);
                tests.extend(decode_tests(ctx, name, ename, TestAction::Predict, &ef));
                let model = ef
                    .str_req(ctx.errors, "model", "\"model.onnx\"")
                    .map(|(m, mspan)| {
                        let path = base.join(&m);
                        if !path.is_file() {
                            ctx.errors.push(
                                Diagnostic::new(
                                    Code::DanglingReference,
                                    mspan,
                                    format!("model file `{m}` not found"),
                                )
                                .label(format!("looked for {}", path.display()))
                                .help("paths are relative to the file that declares the endpoint"),
                            );
                        }
                        path
                    });
                let mut enrichments = Vec::new();
                if let Some(e) = ef.entry("enrich") {
                    let NodeKind::Array(items) = &e.value.kind else {
                        ctx.errors.push(super::decode::wrong_type(
                            e,
                            "an array of tables",
                            &e.value.kind,
                        ));
                        continue;
                    };
                    for it in items {
                        let NodeKind::Table(it_t) = &it.kind else {
                            ctx.errors.push(Diagnostic::new(Code::WrongType, it.span, "an enrichment must be a table").label("expected { dataset = ..., key = ... }").help("e.g. { lookup = \"features.demographics\", key = \"customer_id\" }"));
                            continue;
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
                                ctx.errors.push(Diagnostic::new(Code::MissingField, it.span, "an enrichment names exactly one of `dataset` or `lookup`").label("here").help("dataset = \"NAME\" (this service) or lookup = \"SERVICE.ENDPOINT\""));
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
                                    Diagnostic::new(
                                        Code::InvalidValue,
                                        s,
                                        format!("unknown on_missing `{v}`"),
                                    )
                                    .label("not a policy")
                                    .help("use \"error\" or \"null\""),
                                );
                                OnMissing::Error
                            }
                        };
                        let cache = decode_cache(
                            ctx.errors,
                            &nf,
                            &format!(
                                "the cache of an enrichment of service.{name}.endpoint.{ename}"
                            ),
                        );
                        if let (Some(EnrichmentSource::Dataset(d)), Some(e)) =
                            (&source, nf.entry("cache"))
                        {
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
                        if let (Some(source), Some((key, _)), Some(cache)) = (source, key, cache) {
                            enrichments.push(Enrichment {
                                source,
                                key,
                                columns,
                                on_missing,
                                cache,
                            });
                        }
                    }
                }
                if let Some(model) = model {
                    endpoints.insert(
                        ename.to_owned(),
                        Endpoint::Prediction { model, enrichments },
                    );
                }
            }
            Some((k, _)) if k == "lookup" => {
                ef.allow(ctx.errors, &["kind", "datasets", "test"]);
                tests.extend(decode_tests(ctx, name, ename, TestAction::Lookup, &ef));
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
        tests,
    })
}

/// The test queries of one endpoint (`[[service.S.endpoint.E.test]]`).
fn decode_tests(
    ctx: &mut Ctx<'_>,
    service: &str,
    endpoint: &str,
    action: TestAction,
    ef: &Fields<'_>,
) -> Vec<TestQuery> {
    let Some(e) = ef.entry("test") else {
        return Vec::new();
    };
    let NodeKind::Array(items) = &e.value.kind else {
        ctx.errors.push(
            super::decode::wrong_type(e, "an array of tables", &e.value.kind).help(format!(
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
                        ctx.errors
                            .push(super::decode::wrong_type(r, "a table", other));
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
                    None => {
                        ctx.errors
                            .push(super::decode::wrong_type(pe, "a number", &pe.value.kind))
                    }
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
                None => ctx
                    .errors
                    .push(super::decode::wrong_type(te, "a number", &te.value.kind)),
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
fn json_of(ctx: &mut Ctx<'_>, n: &super::source::Node) -> Option<serde_json::Value> {
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

/// Services enrich from each other's lookups; that graph must be acyclic.
fn check_services(ctx: &mut Ctx<'_>, services: &BTreeMap<String, Service>) {
    let edges: BTreeMap<&str, BTreeSet<&str>> = services
        .values()
        .map(|s| {
            let deps = s
                .endpoints
                .values()
                .flat_map(|e| match e {
                    Endpoint::Prediction { enrichments, .. } => {
                        enrichments.iter().collect::<Vec<_>>()
                    }
                    Endpoint::Lookup { .. } => Vec::new(),
                })
                .filter_map(|en| match &en.source {
                    EnrichmentSource::Lookup { service, .. } => Some(service.as_str()),
                    EnrichmentSource::Dataset(_) => None,
                })
                .collect();
            (s.name.as_str(), deps)
        })
        .collect();
    if let Some(cycle) = crate::graph::find_cycle(&edges) {
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

fn decode_expose(ctx: &mut Ctx<'_>, name: &str, t: &Table, span: Span) -> Option<Expose> {
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
fn check_tls_target(ctx: &mut Ctx<'_>, target: Target, exposes: &BTreeMap<String, Expose>) {
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
fn check_local_ports(ctx: &mut Ctx<'_>, exposes: &BTreeMap<String, Expose>) {
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

fn check_exposes(
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
            .flat_map(|ep| match ep {
                Endpoint::Prediction { enrichments, .. } => enrichments
                    .iter()
                    .filter_map(|en| match &en.source {
                        EnrichmentSource::Lookup { service, .. } => Some(service.as_str()),
                        EnrichmentSource::Dataset(_) => None,
                    })
                    .collect(),
                Endpoint::Lookup { .. } => Vec::new(),
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
