//! The resource types the double serves, and discovery documents for them.

use serde_json::{Value, json};

#[derive(Debug)]
pub struct ResourceType {
    pub group: &'static str,
    pub version: &'static str,
    pub plural: &'static str,
    pub singular: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
    pub short_names: &'static [&'static str],
    /// Has a `/status` subresource: writes to the main resource keep status, and vice versa.
    pub status_sub: bool,
    /// Has a `/scale` subresource.
    pub scale_sub: bool,
    /// Maintains `metadata.generation` (bumped on spec changes).
    pub generation: bool,
    /// Clients may create/update it (false: only the simulated controllers write it).
    pub writable: bool,
}

impl ResourceType {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }
    pub fn verbs(&self) -> Vec<&'static str> {
        if self.writable {
            vec![
                "create",
                "delete",
                "deletecollection",
                "get",
                "list",
                "patch",
                "update",
            ]
        } else {
            vec!["delete", "deletecollection", "get", "list"]
        }
    }
}

#[allow(clippy::too_many_arguments)]
const fn rt(
    group: &'static str,
    version: &'static str,
    plural: &'static str,
    singular: &'static str,
    kind: &'static str,
    namespaced: bool,
    short_names: &'static [&'static str],
    flags: (bool, bool, bool, bool),
) -> ResourceType {
    ResourceType {
        group,
        version,
        plural,
        singular,
        kind,
        namespaced,
        short_names,
        status_sub: flags.0,
        scale_sub: flags.1,
        generation: flags.2,
        writable: flags.3,
    }
}

/// Indices into [`TYPES`] used by the controllers.
pub const NAMESPACES: usize = 0;
pub const SERVICES: usize = 3;
pub const PODS: usize = 5;
pub const NODES: usize = 6;
pub const DEPLOYMENTS: usize = 7;
pub const REPLICASETS: usize = 8;
pub const HPAS: usize = 9;

pub static TYPES: [ResourceType; 13] = [
    rt(
        "",
        "v1",
        "namespaces",
        "namespace",
        "Namespace",
        false,
        &["ns"],
        (true, false, false, true),
    ),
    rt(
        "",
        "v1",
        "configmaps",
        "configmap",
        "ConfigMap",
        true,
        &["cm"],
        (false, false, false, true),
    ),
    rt(
        "",
        "v1",
        "secrets",
        "secret",
        "Secret",
        true,
        &[],
        (false, false, false, true),
    ),
    rt(
        "",
        "v1",
        "services",
        "service",
        "Service",
        true,
        &["svc"],
        (true, false, false, true),
    ),
    rt(
        "",
        "v1",
        "serviceaccounts",
        "serviceaccount",
        "ServiceAccount",
        true,
        &["sa"],
        (false, false, false, true),
    ),
    rt(
        "",
        "v1",
        "pods",
        "pod",
        "Pod",
        true,
        &["po"],
        (true, false, false, false),
    ),
    rt(
        "",
        "v1",
        "nodes",
        "node",
        "Node",
        false,
        &["no"],
        (true, false, false, false),
    ),
    rt(
        "apps",
        "v1",
        "deployments",
        "deployment",
        "Deployment",
        true,
        &["deploy"],
        (true, true, true, true),
    ),
    rt(
        "apps",
        "v1",
        "replicasets",
        "replicaset",
        "ReplicaSet",
        true,
        &["rs"],
        (true, true, true, true),
    ),
    rt(
        "autoscaling",
        "v2",
        "horizontalpodautoscalers",
        "horizontalpodautoscaler",
        "HorizontalPodAutoscaler",
        true,
        &["hpa"],
        (true, false, true, true),
    ),
    rt(
        "networking.k8s.io",
        "v1",
        "ingresses",
        "ingress",
        "Ingress",
        true,
        &["ing"],
        (true, false, true, true),
    ),
    rt(
        "networking.k8s.io",
        "v1",
        "networkpolicies",
        "networkpolicy",
        "NetworkPolicy",
        true,
        &["netpol"],
        (false, false, true, true),
    ),
    rt(
        "coordination.k8s.io",
        "v1",
        "leases",
        "lease",
        "Lease",
        true,
        &[],
        (false, false, false, true),
    ),
];

pub fn find(group: &str, version: &str, plural: &str) -> Option<usize> {
    TYPES
        .iter()
        .position(|t| t.group == group && t.version == version && t.plural == plural)
}

/// Groups under `/apis`, with their single served version.
pub fn groups() -> Vec<(&'static str, &'static str)> {
    let mut out: Vec<(&str, &str)> = Vec::new();
    for t in TYPES.iter().filter(|t| !t.group.is_empty()) {
        if !out.iter().any(|(g, _)| *g == t.group) {
            out.push((t.group, t.version));
        }
    }
    out
}

fn resources_of(group: &str, version: &str) -> Vec<&'static ResourceType> {
    TYPES
        .iter()
        .filter(|t| t.group == group && t.version == version)
        .collect()
}

/// `APIResourceList` for `/api/v1` or `/apis/{group}/{version}`; `None` if not served.
pub fn resource_list(group: &str, version: &str) -> Option<Value> {
    let rts = resources_of(group, version);
    if rts.is_empty() {
        return None;
    }
    let mut resources = Vec::new();
    for t in rts {
        let mut r = json!({
            "name": t.plural,
            "singularName": t.singular,
            "namespaced": t.namespaced,
            "kind": t.kind,
            "verbs": t.verbs(),
        });
        if !t.short_names.is_empty() {
            r["shortNames"] = json!(t.short_names);
        }
        resources.push(r);
        if t.status_sub {
            resources.push(json!({
                "name": format!("{}/status", t.plural), "singularName": "",
                "namespaced": t.namespaced, "kind": t.kind, "verbs": ["get", "patch", "update"],
            }));
        }
        if t.scale_sub {
            resources.push(json!({
                "name": format!("{}/scale", t.plural), "singularName": "",
                "namespaced": t.namespaced, "group": "autoscaling", "version": "v1",
                "kind": "Scale", "verbs": ["get", "patch", "update"],
            }));
        }
        if t.plural == "pods" {
            resources.push(json!({
                "name": "pods/log", "singularName": "", "namespaced": true,
                "kind": "Pod", "verbs": ["get"],
            }));
        }
    }
    let gv = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    Some(
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}),
    )
}

pub fn api_versions(server: &str) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server}],
    })
}

fn group_doc(group: &str, version: &str) -> Value {
    let gv = json!({"groupVersion": format!("{group}/{version}"), "version": version});
    json!({"name": group, "versions": [gv.clone()], "preferredVersion": gv})
}

pub fn group_list() -> Value {
    let groups: Vec<Value> = groups().iter().map(|(g, v)| group_doc(g, v)).collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

pub fn group(name: &str) -> Option<Value> {
    let (g, v) = groups().into_iter().find(|(g, _)| *g == name)?;
    let mut doc = group_doc(g, v);
    doc["kind"] = "APIGroup".into();
    doc["apiVersion"] = "v1".into();
    Some(doc)
}

/// Aggregated discovery (`apidiscovery.k8s.io/v2` `APIGroupDiscoveryList`).
pub fn aggregated(core: bool) -> Value {
    let gvs: Vec<(&str, &str)> = if core { vec![("", "v1")] } else { groups() };
    let items: Vec<Value> = gvs
        .iter()
        .map(|(g, v)| {
            let resources: Vec<Value> = resources_of(g, v)
                .iter()
                .map(|t| {
                    let mut subs = Vec::new();
                    if t.status_sub {
                        subs.push(json!({"subresource": "status",
                            "responseKind": {"group": t.group, "version": t.version, "kind": t.kind},
                            "verbs": ["get", "patch", "update"]}));
                    }
                    if t.scale_sub {
                        subs.push(json!({"subresource": "scale",
                            "responseKind": {"group": "autoscaling", "version": "v1", "kind": "Scale"},
                            "verbs": ["get", "patch", "update"]}));
                    }
                    json!({
                        "resource": t.plural,
                        "responseKind": {"group": t.group, "version": t.version, "kind": t.kind},
                        "scope": if t.namespaced { "Namespaced" } else { "Cluster" },
                        "singularResource": t.singular,
                        "verbs": t.verbs(),
                        "shortNames": t.short_names,
                        "subresources": subs,
                    })
                })
                .collect();
            let mut meta = json!({});
            if !g.is_empty() {
                meta["name"] = (*g).into();
            }
            json!({"metadata": meta,
                   "versions": [{"version": v, "resources": resources, "freshness": "Current"}]})
        })
        .collect();
    json!({"kind": "APIGroupDiscoveryList", "apiVersion": "apidiscovery.k8s.io/v2",
           "metadata": {}, "items": items})
}

pub fn version() -> Value {
    json!({
        "major": "1", "minor": "34", "gitVersion": "v1.34.0-kube-double",
        "gitCommit": "0000000000000000000000000000000000000000", "gitTreeState": "clean",
        "buildDate": "2025-01-01T00:00:00Z", "goVersion": "go1.24.0", "compiler": "gc",
        "platform": "linux/amd64",
    })
}
