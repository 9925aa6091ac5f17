//! `[cluster.NAME]`: an EKS cluster (its network, version, node groups) or an
//! existing Kubernetes cluster reached through a kubeconfig.

use std::collections::BTreeMap;

use crate::stack::decode::{Fields, wrong_type};
use crate::stack::diag::{Code, Diagnostic};
use crate::stack::model::*;
use crate::stack::source::{NodeKind, Span, Table};

use super::{Ctx, check_name};

pub(super) fn decode_cluster(
    ctx: &mut Ctx<'_>,
    name: &str,
    t: &Table,
    span: Span,
) -> Option<Cluster> {
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
                ctx.errors.push(wrong_type(
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
                        ctx.errors.push(wrong_type(e, "a string", &e.value.kind));
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
