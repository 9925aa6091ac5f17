//! Per-kind behaviour: defaulting, validation and type checking, following the API server's
//! registry strategies for the built-in types.

use crate::selector::LabelSelector;
use crate::status::Errs;
use crate::util::{base64_encode, get, get_str, obj_path};
use serde_json::{Map, Value, json};
use std::collections::BTreeSet;

// ---------------------------------------------------------------- name validation

fn is_label_char(c: u8) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-'
}

pub fn is_dns1123_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter().all(|c| is_label_char(*c))
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

pub fn is_dns1123_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns1123_label)
}

pub fn is_dns1035_label(s: &str) -> bool {
    is_dns1123_label(s) && s.as_bytes()[0].is_ascii_lowercase()
}

const LABEL_MSG: &str = "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')";
const SUBDOMAIN_MSG: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')";
const DNS1035_MSG: &str = "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an alphabetic character, and end with an alphanumeric character (e.g. 'my-name',  or 'abc-123', regex used for validation is '[a-z]([-a-z0-9]*[a-z0-9])?')";

fn is_qualified_name_part(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

/// `prefix/name` label or annotation key.
pub fn is_qualified_name(s: &str) -> bool {
    match s.split_once('/') {
        Some((prefix, name)) => is_dns1123_subdomain(prefix) && is_qualified_name_part(name),
        None => is_qualified_name_part(s),
    }
}

pub fn is_label_value(s: &str) -> bool {
    s.is_empty() || is_qualified_name_part(s)
}

fn is_config_key(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

fn is_iana_svc_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        && s.bytes().any(|c| c.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
}

fn validate_name(kind: &str, name: &str, errs: &mut Errs) {
    let v = json!(name);
    match kind {
        "Namespace" if !is_dns1123_label(name) => errs.invalid("metadata.name", &v, LABEL_MSG),
        "Service" if !is_dns1035_label(name) => errs.invalid("metadata.name", &v, DNS1035_MSG),
        _ if !is_dns1123_subdomain(name) => errs.invalid("metadata.name", &v, SUBDOMAIN_MSG),
        _ => {}
    }
}

fn validate_labels(labels: Option<&Value>, field: &str, errs: &mut Errs) {
    let Some(m) = labels.and_then(Value::as_object) else {
        return;
    };
    for (k, v) in m {
        if !is_qualified_name(k) {
            errs.invalid(field, &json!(k), "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]') with an optional DNS subdomain prefix and '/' (e.g. 'example.com/MyName')");
        }
        match v.as_str() {
            Some(s) if is_label_value(s) => {}
            _ => errs.invalid(field, v, "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')"),
        }
    }
}

fn validate_meta(kind: &str, obj: &Value, errs: &mut Errs) {
    let name = get_str(obj, &["metadata", "name"]).unwrap_or_default();
    if name.is_empty() {
        errs.required("metadata.name");
    } else {
        validate_name(kind, name, errs);
    }
    validate_labels(get(obj, &["metadata", "labels"]), "metadata.labels", errs);
    if let Some(a) = get(obj, &["metadata", "annotations"]).and_then(Value::as_object) {
        for k in a.keys() {
            if !is_qualified_name(k) {
                errs.invalid(
                    "metadata.annotations",
                    &json!(k),
                    "name part must consist of alphanumeric characters, '-', '_' or '.'",
                );
            }
        }
    }
    if let Some(f) = get(obj, &["metadata", "finalizers"]).and_then(Value::as_array) {
        for (i, x) in f.iter().enumerate() {
            if !x.as_str().is_some_and(is_qualified_name) {
                errs.invalid(
                    format!("metadata.finalizers[{i}]"),
                    x,
                    "name part must consist of alphanumeric characters, '-', '_' or '.'",
                );
            }
        }
    }
    if let Some(refs) = get(obj, &["metadata", "ownerReferences"]).and_then(Value::as_array) {
        for (i, r) in refs.iter().enumerate() {
            for f in ["apiVersion", "kind", "name", "uid"] {
                if r.get(f).and_then(Value::as_str).is_none_or(str::is_empty) {
                    errs.required(format!("metadata.ownerReferences[{i}].{f}"));
                }
            }
        }
    }
}

// ---------------------------------------------------------------- defaulting

fn set_default(m: &mut Map<String, Value>, k: &str, v: Value) {
    if m.get(k).is_none_or(Value::is_null) {
        m.insert(k.to_string(), v);
    }
}

fn image_pull_policy(image: &str) -> &'static str {
    if image.contains('@') {
        return "IfNotPresent";
    }
    let last = image.rsplit('/').next().unwrap_or(image);
    match last.split_once(':') {
        Some((_, "latest")) | None => "Always",
        Some(_) => "IfNotPresent",
    }
}

fn default_probe(p: &mut Value) {
    if let Some(m) = p.as_object_mut() {
        set_default(m, "timeoutSeconds", json!(1));
        set_default(m, "periodSeconds", json!(10));
        set_default(m, "successThreshold", json!(1));
        set_default(m, "failureThreshold", json!(3));
        if let Some(h) = m.get_mut("httpGet").and_then(Value::as_object_mut) {
            set_default(h, "scheme", json!("HTTP"));
        }
    }
}

fn default_container(c: &mut Value) {
    let Some(m) = c.as_object_mut() else { return };
    let image = m
        .get("image")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    if !image.is_empty() {
        set_default(m, "imagePullPolicy", json!(image_pull_policy(&image)));
    }
    set_default(m, "terminationMessagePath", json!("/dev/termination-log"));
    set_default(m, "terminationMessagePolicy", json!("File"));
    set_default(m, "resources", json!({}));
    if let Some(ports) = m.get_mut("ports").and_then(Value::as_array_mut) {
        for p in ports.iter_mut().filter_map(Value::as_object_mut) {
            set_default(p, "protocol", json!("TCP"));
        }
    }
    for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
        if let Some(p) = m.get_mut(probe) {
            default_probe(p);
        }
    }
    if let Some(env) = m.get_mut("env").and_then(Value::as_array_mut) {
        for e in env {
            if let Some(fr) = e
                .pointer_mut("/valueFrom/fieldRef")
                .and_then(Value::as_object_mut)
            {
                set_default(fr, "apiVersion", json!("v1"));
            }
        }
    }
}

pub fn default_pod_spec(spec: &mut Value) {
    let Some(m) = spec.as_object_mut() else {
        return;
    };
    set_default(m, "restartPolicy", json!("Always"));
    set_default(m, "terminationGracePeriodSeconds", json!(30));
    set_default(m, "dnsPolicy", json!("ClusterFirst"));
    set_default(m, "securityContext", json!({}));
    set_default(m, "schedulerName", json!("default-scheduler"));
    for list in ["containers", "initContainers"] {
        if let Some(cs) = m.get_mut(list).and_then(Value::as_array_mut) {
            cs.iter_mut().for_each(default_container);
        }
    }
    if let Some(vols) = m.get_mut("volumes").and_then(Value::as_array_mut) {
        for v in vols.iter_mut() {
            for src in ["configMap", "secret"] {
                if let Some(s) = v.get_mut(src).and_then(Value::as_object_mut) {
                    set_default(s, "defaultMode", json!(420));
                }
            }
        }
    }
}

fn default_template(spec: &mut Map<String, Value>) {
    if let Some(ps) = spec.get_mut("template").and_then(|t| t.get_mut("spec")) {
        default_pod_spec(ps);
    }
}

/// Fills the fields the API server defaults for `kind`. Allocation (Service IPs and node
/// ports) happens separately, see [`crate::store`].
pub fn default_object(kind: &str, obj: &mut Value) {
    match kind {
        "Deployment" => {
            let spec = obj_path(obj, &["spec"]);
            set_default(spec, "replicas", json!(1));
            set_default(spec, "revisionHistoryLimit", json!(10));
            set_default(spec, "progressDeadlineSeconds", json!(600));
            set_default(spec, "strategy", json!({"type": "RollingUpdate"}));
            if let Some(st) = spec.get_mut("strategy").and_then(Value::as_object_mut)
                && st
                    .get("type")
                    .and_then(Value::as_str)
                    .unwrap_or("RollingUpdate")
                    == "RollingUpdate"
            {
                set_default(st, "type", json!("RollingUpdate"));
                set_default(st, "rollingUpdate", json!({}));
                if let Some(ru) = st.get_mut("rollingUpdate").and_then(Value::as_object_mut) {
                    set_default(ru, "maxUnavailable", json!("25%"));
                    set_default(ru, "maxSurge", json!("25%"));
                }
            }
            default_template(spec);
        }
        "ReplicaSet" => {
            let spec = obj_path(obj, &["spec"]);
            set_default(spec, "replicas", json!(1));
            default_template(spec);
        }
        "Pod" => {
            if let Some(s) = obj.get_mut("spec") {
                default_pod_spec(s);
            }
        }
        "Secret" => {
            let m = obj.as_object_mut().expect("object checked by caller");
            set_default(m, "type", json!("Opaque"));
            if let Some(Value::Object(sd)) = m.remove("stringData") {
                let data = m.entry("data").or_insert_with(|| json!({}));
                if let Some(d) = data.as_object_mut() {
                    for (k, v) in sd {
                        let s = v
                            .as_str()
                            .map(String::from)
                            .unwrap_or_else(|| v.to_string());
                        d.insert(k, json!(base64_encode(s.as_bytes())));
                    }
                }
            }
        }
        "Namespace" => {
            let name = get_str(obj, &["metadata", "name"])
                .unwrap_or_default()
                .to_string();
            obj_path(obj, &["metadata", "labels"])
                .insert("kubernetes.io/metadata.name".into(), json!(name));
            set_default(
                obj_path(obj, &["spec"]),
                "finalizers",
                json!(["kubernetes"]),
            );
        }
        "Service" => {
            let spec = obj_path(obj, &["spec"]);
            set_default(spec, "type", json!("ClusterIP"));
            let ty = spec
                .get("type")
                .and_then(Value::as_str)
                .unwrap_or("ClusterIP")
                .to_string();
            if ty == "ExternalName" {
                return;
            }
            set_default(spec, "sessionAffinity", json!("None"));
            set_default(spec, "internalTrafficPolicy", json!("Cluster"));
            if ty == "NodePort" || ty == "LoadBalancer" {
                set_default(spec, "externalTrafficPolicy", json!("Cluster"));
            }
            if ty == "LoadBalancer" {
                set_default(spec, "allocateLoadBalancerNodePorts", json!(true));
            }
            if let Some(ports) = spec.get_mut("ports").and_then(Value::as_array_mut) {
                for p in ports.iter_mut().filter_map(Value::as_object_mut) {
                    set_default(p, "protocol", json!("TCP"));
                    if let Some(port) = p.get("port").cloned() {
                        set_default(p, "targetPort", port);
                    }
                }
            }
        }
        "HorizontalPodAutoscaler" => {
            let spec = obj_path(obj, &["spec"]);
            set_default(spec, "minReplicas", json!(1));
            if spec
                .get("metrics")
                .and_then(Value::as_array)
                .is_none_or(Vec::is_empty)
            {
                spec.insert(
                    "metrics".into(),
                    json!([{"type": "Resource", "resource": {"name": "cpu",
                        "target": {"type": "Utilization", "averageUtilization": 80}}}]),
                );
            }
        }
        "NetworkPolicy" => {
            let spec = obj_path(obj, &["spec"]);
            set_default(spec, "podSelector", json!({}));
            if !spec.contains_key("policyTypes") {
                let mut types = vec![json!("Ingress")];
                if spec.get("egress").is_some() {
                    types.push(json!("Egress"));
                }
                spec.insert("policyTypes".into(), Value::Array(types));
            }
            for dir in ["ingress", "egress"] {
                if let Some(rules) = spec.get_mut(dir).and_then(Value::as_array_mut) {
                    for r in rules.iter_mut() {
                        if let Some(ports) = r.get_mut("ports").and_then(Value::as_array_mut) {
                            for p in ports.iter_mut().filter_map(Value::as_object_mut) {
                                set_default(p, "protocol", json!("TCP"));
                            }
                        }
                    }
                }
            }
        }
        _ => {}
    }
}

/// Status a newly created object starts with.
pub fn initial_status(kind: &str) -> Option<Value> {
    match kind {
        "Namespace" => Some(json!({"phase": "Active"})),
        "Service" | "Ingress" => Some(json!({"loadBalancer": {}})),
        "Deployment" | "ReplicaSet" | "HorizontalPodAutoscaler" => Some(json!({})),
        _ => None,
    }
}

// ---------------------------------------------------------------- validation

fn int_or_string_ok(v: &Value) -> bool {
    match v {
        Value::Number(n) => n.as_i64().is_some_and(|p| (1..=65535).contains(&p)),
        Value::String(s) => is_iana_svc_name(s),
        _ => false,
    }
}

fn validate_pod_spec(
    spec: Option<&Value>,
    f: &str,
    template_restart_always: bool,
    errs: &mut Errs,
) {
    let Some(spec) = spec else {
        errs.required(format!("{f}.containers"));
        return;
    };
    let volumes: BTreeSet<&str> = spec
        .get("volumes")
        .and_then(Value::as_array)
        .map(|v| {
            v.iter()
                .filter_map(|x| x.get("name").and_then(Value::as_str))
                .collect()
        })
        .unwrap_or_default();
    if let Some(vols) = spec.get("volumes").and_then(Value::as_array) {
        let mut seen = BTreeSet::new();
        for (i, v) in vols.iter().enumerate() {
            match v.get("name").and_then(Value::as_str) {
                None | Some("") => errs.required(format!("{f}.volumes[{i}].name")),
                Some(n) if !seen.insert(n) => {
                    errs.duplicate(format!("{f}.volumes[{i}].name"), &json!(n))
                }
                Some(n) if !is_dns1123_label(n) => {
                    errs.invalid(format!("{f}.volumes[{i}].name"), &json!(n), LABEL_MSG)
                }
                _ => {}
            }
        }
    }
    let containers = spec.get("containers").and_then(Value::as_array);
    if containers.is_none_or(Vec::is_empty) {
        errs.required(format!("{f}.containers"));
    }
    let mut names = BTreeSet::new();
    for list in ["initContainers", "containers"] {
        let Some(cs) = spec.get(list).and_then(Value::as_array) else {
            continue;
        };
        for (i, c) in cs.iter().enumerate() {
            let cf = format!("{f}.{list}[{i}]");
            match c.get("name").and_then(Value::as_str) {
                None | Some("") => errs.required(format!("{cf}.name")),
                Some(n) if !is_dns1123_label(n) => {
                    errs.invalid(format!("{cf}.name"), &json!(n), LABEL_MSG)
                }
                Some(n) if !names.insert(n.to_string()) => {
                    errs.duplicate(format!("{cf}.name"), &json!(n))
                }
                _ => {}
            }
            if c.get("image")
                .and_then(Value::as_str)
                .is_none_or(|s| s.trim().is_empty())
            {
                errs.required(format!("{cf}.image"));
            }
            if let Some(p) = c.get("imagePullPolicy")
                && !matches!(p.as_str(), Some("Always" | "IfNotPresent" | "Never"))
            {
                errs.not_supported(
                    format!("{cf}.imagePullPolicy"),
                    p,
                    &["Always", "IfNotPresent", "Never"],
                );
            }
            if let Some(ports) = c.get("ports").and_then(Value::as_array) {
                for (j, p) in ports.iter().enumerate() {
                    let pf = format!("{cf}.ports[{j}]");
                    match p.get("containerPort") {
                        None => errs.required(format!("{pf}.containerPort")),
                        Some(v) if !v.as_i64().is_some_and(|n| (1..=65535).contains(&n)) => errs
                            .invalid(
                                format!("{pf}.containerPort"),
                                v,
                                "must be between 1 and 65535, inclusive",
                            ),
                        _ => {}
                    }
                    if let Some(n) = p.get("name").and_then(Value::as_str)
                        && !is_iana_svc_name(n)
                    {
                        errs.invalid(format!("{pf}.name"), &json!(n), "must be no more than 15 characters, contain only lowercase alphanumeric characters or '-' and at least one letter");
                    }
                    if let Some(proto) = p.get("protocol")
                        && !matches!(proto.as_str(), Some("TCP" | "UDP" | "SCTP"))
                    {
                        errs.not_supported(
                            format!("{pf}.protocol"),
                            proto,
                            &["SCTP", "TCP", "UDP"],
                        );
                    }
                }
            }
            if let Some(env) = c.get("env").and_then(Value::as_array) {
                for (j, e) in env.iter().enumerate() {
                    if e.get("name")
                        .and_then(Value::as_str)
                        .is_none_or(str::is_empty)
                    {
                        errs.required(format!("{cf}.env[{j}].name"));
                    }
                }
            }
            if let Some(mounts) = c.get("volumeMounts").and_then(Value::as_array) {
                for (j, m) in mounts.iter().enumerate() {
                    let n = m.get("name").and_then(Value::as_str).unwrap_or_default();
                    if !volumes.contains(n) {
                        errs.not_found(format!("{cf}.volumeMounts[{j}].name"), &json!(n));
                    }
                    if m.get("mountPath")
                        .and_then(Value::as_str)
                        .is_none_or(str::is_empty)
                    {
                        errs.required(format!("{cf}.volumeMounts[{j}].mountPath"));
                    }
                }
            }
            for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
                if let Some(p) = c.get(probe) {
                    let handlers = ["httpGet", "tcpSocket", "exec", "grpc"];
                    if !handlers.iter().any(|h| p.get(*h).is_some()) {
                        errs.required(format!("{cf}.{probe}"));
                    }
                    if let Some(port) = p.pointer("/httpGet/port")
                        && !int_or_string_ok(port)
                    {
                        errs.invalid(
                            format!("{cf}.{probe}.httpGet.port"),
                            port,
                            "must contain at least one letter or number (a-z, 0-9)",
                        );
                    }
                }
            }
        }
    }
    if let Some(rp) = spec.get("restartPolicy") {
        let ok = if template_restart_always {
            rp == "Always"
        } else {
            matches!(rp.as_str(), Some("Always" | "OnFailure" | "Never"))
        };
        if !ok {
            let supported: &[&str] = if template_restart_always {
                &["Always"]
            } else {
                &["Always", "OnFailure", "Never"]
            };
            errs.not_supported(format!("{f}.restartPolicy"), rp, supported);
        }
    }
    if let Some(dp) = spec.get("dnsPolicy")
        && !matches!(
            dp.as_str(),
            Some("ClusterFirst" | "ClusterFirstWithHostNet" | "Default" | "None")
        )
    {
        errs.not_supported(
            format!("{f}.dnsPolicy"),
            dp,
            &["ClusterFirst", "ClusterFirstWithHostNet", "Default", "None"],
        );
    }
}

fn validate_workload(kind: &str, obj: &Value, old: Option<&Value>, errs: &mut Errs) {
    let spec = obj.get("spec").cloned().unwrap_or(json!({}));
    if let Some(r) = spec.get("replicas")
        && r.as_i64().is_some_and(|n| n < 0)
    {
        errs.invalid("spec.replicas", r, "must be greater than or equal to 0");
    }
    match spec.get("selector") {
        None => errs.required("spec.selector"),
        Some(sel) => {
            let empty = sel
                .get("matchLabels")
                .and_then(Value::as_object)
                .is_none_or(Map::is_empty)
                && sel
                    .get("matchExpressions")
                    .and_then(Value::as_array)
                    .is_none_or(Vec::is_empty);
            if empty {
                errs.invalid(
                    "spec.selector",
                    sel,
                    &format!("empty selector is invalid for {}", kind.to_lowercase()),
                );
            } else {
                match LabelSelector::from_object(sel) {
                    Err(e) => errs.invalid("spec.selector", sel, &e),
                    Ok(s) => {
                        let labels = spec.pointer("/template/metadata/labels");
                        if !s.matches_labels(labels.and_then(Value::as_object)) {
                            errs.invalid(
                                "spec.template.metadata.labels",
                                labels.unwrap_or(&json!({})),
                                "`selector` does not match template `labels`",
                            );
                        }
                    }
                }
            }
            if let Some(old_sel) = old.and_then(|o| o.pointer("/spec/selector"))
                && old_sel != sel
            {
                errs.invalid("spec.selector", sel, "field is immutable");
            }
        }
    }
    validate_labels(
        spec.pointer("/template/metadata/labels"),
        "spec.template.metadata.labels",
        errs,
    );
    validate_pod_spec(
        spec.pointer("/template/spec"),
        "spec.template.spec",
        true,
        errs,
    );
    if kind == "Deployment" {
        if let Some(st) = spec.get("strategy") {
            match st.get("type").and_then(Value::as_str) {
                Some("RollingUpdate") | None => {}
                Some("Recreate") => {
                    if st.get("rollingUpdate").is_some() {
                        errs.forbidden(
                            "spec.strategy.rollingUpdate",
                            "may not be specified when strategy `type` is 'Recreate'",
                        );
                    }
                }
                Some(_) => errs.not_supported(
                    "spec.strategy.type",
                    &st["type"],
                    &["Recreate", "RollingUpdate"],
                ),
            }
        }
        if let (Some(pd), Some(mr)) = (
            spec.get("progressDeadlineSeconds").and_then(Value::as_i64),
            spec.get("minReadySeconds").and_then(Value::as_i64),
        ) && pd <= mr
        {
            errs.invalid(
                "spec.progressDeadlineSeconds",
                &json!(pd),
                "must be greater than minReadySeconds",
            );
        }
    }
}

fn validate_service(obj: &Value, errs: &mut Errs) {
    let spec = obj.get("spec").cloned().unwrap_or(json!({}));
    let ty = spec
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("ClusterIP");
    if !matches!(
        ty,
        "ClusterIP" | "NodePort" | "LoadBalancer" | "ExternalName"
    ) {
        errs.not_supported(
            "spec.type",
            &json!(ty),
            &["ClusterIP", "ExternalName", "LoadBalancer", "NodePort"],
        );
        return;
    }
    let ports = spec
        .get("ports")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let headless = spec.get("clusterIP").and_then(Value::as_str) == Some("None");
    if ty == "ExternalName" {
        if spec
            .get("externalName")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
        {
            errs.required("spec.externalName");
        }
    } else if ports.is_empty() && !headless {
        errs.required("spec.ports");
    }
    let mut names = BTreeSet::new();
    let mut port_keys = BTreeSet::new();
    for (i, p) in ports.iter().enumerate() {
        let f = format!("spec.ports[{i}]");
        match p.get("name").and_then(Value::as_str) {
            None | Some("") if ports.len() > 1 => errs.required(format!("{f}.name")),
            Some(n) if !n.is_empty() && !is_dns1123_label(n) => {
                errs.invalid(format!("{f}.name"), &json!(n), LABEL_MSG)
            }
            Some(n) if !n.is_empty() && !names.insert(n.to_string()) => {
                errs.duplicate(format!("{f}.name"), &json!(n))
            }
            _ => {}
        }
        match p.get("port") {
            None => errs.required(format!("{f}.port")),
            Some(v) if !v.as_i64().is_some_and(|n| (1..=65535).contains(&n)) => errs.invalid(
                format!("{f}.port"),
                v,
                "must be between 1 and 65535, inclusive",
            ),
            Some(v) => {
                let proto = p.get("protocol").and_then(Value::as_str).unwrap_or("TCP");
                if !port_keys.insert((v.as_i64(), proto.to_string())) {
                    errs.duplicate(f.clone(), &json!({"port": v, "protocol": proto}));
                }
            }
        }
        if let Some(proto) = p.get("protocol")
            && !matches!(proto.as_str(), Some("TCP" | "UDP" | "SCTP"))
        {
            errs.not_supported(format!("{f}.protocol"), proto, &["SCTP", "TCP", "UDP"]);
        }
        if let Some(tp) = p.get("targetPort")
            && !int_or_string_ok(tp)
        {
            errs.invalid(
                format!("{f}.targetPort"),
                tp,
                "must be between 1 and 65535, inclusive, or an IANA service name",
            );
        }
        if p.get("nodePort").is_some() && (ty == "ClusterIP" || ty == "ExternalName") {
            errs.forbidden(
                format!("{f}.nodePort"),
                &format!("may not be used when `type` is '{ty}'"),
            );
        }
    }
    validate_labels(spec.get("selector"), "spec.selector", errs);
    if let Some(sa) = spec.get("sessionAffinity")
        && !matches!(sa.as_str(), Some("None" | "ClientIP"))
    {
        errs.not_supported("spec.sessionAffinity", sa, &["ClientIP", "None"]);
    }
}

fn validate_data_keys(obj: &Value, errs: &mut Errs) {
    for field in ["data", "binaryData", "stringData"] {
        if let Some(m) = obj.get(field).and_then(Value::as_object) {
            for k in m.keys() {
                if !is_config_key(k) {
                    errs.invalid(format!("{field}[{k}]"), &json!(k), "a valid config key must consist of alphanumeric characters, '-', '_' or '.' (e.g. 'key.name',  or 'KEY_NAME',  or 'key-name', regex used for validation is '[-._a-zA-Z0-9]+')");
                }
            }
        }
    }
}

fn validate_immutable_data(obj: &Value, old: Option<&Value>, errs: &mut Errs) {
    let Some(old) = old else { return };
    if old.get("immutable") == Some(&json!(true)) {
        if obj.get("data") != old.get("data") || obj.get("binaryData") != old.get("binaryData") {
            errs.forbidden("data", "field is immutable when `immutable` is set");
        }
        if obj.get("immutable") != Some(&json!(true)) {
            errs.forbidden("immutable", "field is immutable when `immutable` is set");
        }
    }
}

fn validate_hpa(obj: &Value, errs: &mut Errs) {
    let spec = obj.get("spec").cloned().unwrap_or(json!({}));
    for f in ["kind", "name"] {
        if spec
            .pointer(&format!("/scaleTargetRef/{f}"))
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
        {
            errs.required(format!("spec.scaleTargetRef.{f}"));
        }
    }
    let min = spec.get("minReplicas").and_then(Value::as_i64).unwrap_or(1);
    if min < 1 {
        errs.invalid(
            "spec.minReplicas",
            &json!(min),
            "must be greater than or equal to 1",
        );
    }
    match spec.get("maxReplicas").and_then(Value::as_i64) {
        None => errs.required("spec.maxReplicas"),
        Some(max) if max < 1 => {
            errs.invalid("spec.maxReplicas", &json!(max), "must be greater than 0")
        }
        Some(max) if max < min => errs.invalid(
            "spec.maxReplicas",
            &json!(max),
            "must be greater than or equal to `minReplicas`",
        ),
        _ => {}
    }
    if let Some(metrics) = spec.get("metrics").and_then(Value::as_array) {
        for (i, m) in metrics.iter().enumerate() {
            let f = format!("spec.metrics[{i}]");
            match m.get("type").and_then(Value::as_str) {
                Some("Resource") => {
                    if m.pointer("/resource/name").is_none() {
                        errs.required(format!("{f}.resource.name"));
                    }
                    match m.pointer("/resource/target/type").and_then(Value::as_str) {
                        Some("Utilization") => {
                            if m.pointer("/resource/target/averageUtilization")
                                .and_then(Value::as_i64)
                                .is_none_or(|u| u <= 0)
                            {
                                errs.required(format!("{f}.resource.target.averageUtilization"));
                            }
                        }
                        Some("AverageValue" | "Value") => {}
                        _ => errs.required(format!("{f}.resource.target.type")),
                    }
                }
                Some("Pods" | "Object" | "External" | "ContainerResource") => {}
                other => errs.not_supported(
                    format!("{f}.type"),
                    &json!(other),
                    &[
                        "ContainerResource",
                        "External",
                        "Object",
                        "Pods",
                        "Resource",
                    ],
                ),
            }
        }
    }
}

fn validate_backend(b: &Value, f: &str, errs: &mut Errs) {
    match (b.get("service"), b.get("resource")) {
        (Some(s), None) => {
            if s.get("name")
                .and_then(Value::as_str)
                .is_none_or(str::is_empty)
            {
                errs.required(format!("{f}.service.name"));
            }
            let num = s.pointer("/port/number");
            let name = s.pointer("/port/name");
            match (num, name) {
                (Some(n), None) if !n.as_i64().is_some_and(|p| (1..=65535).contains(&p)) => errs
                    .invalid(
                        format!("{f}.service.port.number"),
                        n,
                        "must be between 1 and 65535, inclusive",
                    ),
                (Some(_), Some(_)) => errs.invalid(
                    format!("{f}.service.port"),
                    &s["port"],
                    "cannot set both port name & port number",
                ),
                (None, None) => errs.required(format!("{f}.service.port")),
                _ => {}
            }
        }
        (None, Some(_)) => {}
        (Some(_), Some(_)) => {
            errs.invalid(f.to_string(), b, "cannot set both service and resource")
        }
        (None, None) => errs.required(format!("{f}.service")),
    }
}

fn validate_ingress(obj: &Value, errs: &mut Errs) {
    let spec = obj.get("spec").cloned().unwrap_or(json!({}));
    let rules = spec
        .get("rules")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if rules.is_empty() && spec.get("defaultBackend").is_none() {
        errs.invalid(
            "spec.rules",
            &json!([]),
            "either `defaultBackend` or `rules` must be specified",
        );
    }
    if let Some(b) = spec.get("defaultBackend") {
        validate_backend(b, "spec.defaultBackend", errs);
    }
    for (i, r) in rules.iter().enumerate() {
        let f = format!("spec.rules[{i}]");
        if let Some(h) = r.get("host").and_then(Value::as_str) {
            let bare = h.strip_prefix("*.").unwrap_or(h);
            if !is_dns1123_subdomain(bare) {
                errs.invalid(format!("{f}.host"), &json!(h), SUBDOMAIN_MSG);
            }
        }
        let Some(http) = r.get("http") else { continue };
        let paths = http
            .get("paths")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        if paths.is_empty() {
            errs.required(format!("{f}.http.paths"));
        }
        for (j, p) in paths.iter().enumerate() {
            let pf = format!("{f}.http.paths[{j}]");
            match p.get("pathType").and_then(Value::as_str) {
                None => errs.required(format!("{pf}.pathType")),
                Some("Exact" | "Prefix") => {
                    if !p
                        .get("path")
                        .and_then(Value::as_str)
                        .is_some_and(|s| s.starts_with('/'))
                    {
                        errs.invalid(
                            format!("{pf}.path"),
                            p.get("path").unwrap_or(&Value::Null),
                            "must be an absolute path",
                        );
                    }
                }
                Some("ImplementationSpecific") => {}
                Some(other) => errs.not_supported(
                    format!("{pf}.pathType"),
                    &json!(other),
                    &["Exact", "ImplementationSpecific", "Prefix"],
                ),
            }
            match p.get("backend") {
                Some(b) => validate_backend(b, &format!("{pf}.backend"), errs),
                None => errs.required(format!("{pf}.backend")),
            }
        }
    }
}

fn validate_netpol(obj: &Value, errs: &mut Errs) {
    let spec = obj.get("spec").cloned().unwrap_or(json!({}));
    if let Some(sel) = spec.get("podSelector")
        && let Err(e) = LabelSelector::from_object(sel)
    {
        errs.invalid("spec.podSelector", sel, &e);
    }
    if let Some(types) = spec.get("policyTypes").and_then(Value::as_array) {
        for (i, t) in types.iter().enumerate() {
            if !matches!(t.as_str(), Some("Ingress" | "Egress")) {
                errs.not_supported(format!("spec.policyTypes[{i}]"), t, &["Egress", "Ingress"]);
            }
        }
    }
    for (dir, peers) in [("ingress", "from"), ("egress", "to")] {
        let Some(rules) = spec.get(dir).and_then(Value::as_array) else {
            continue;
        };
        for (i, r) in rules.iter().enumerate() {
            if let Some(ports) = r.get("ports").and_then(Value::as_array) {
                for (j, p) in ports.iter().enumerate() {
                    let f = format!("spec.{dir}[{i}].ports[{j}]");
                    if let Some(proto) = p.get("protocol")
                        && !matches!(proto.as_str(), Some("TCP" | "UDP" | "SCTP"))
                    {
                        errs.not_supported(format!("{f}.protocol"), proto, &["SCTP", "TCP", "UDP"]);
                    }
                    if let Some(port) = p.get("port")
                        && !int_or_string_ok(port)
                    {
                        errs.invalid(
                            format!("{f}.port"),
                            port,
                            "must be between 1 and 65535, inclusive",
                        );
                    }
                }
            }
            if let Some(ps) = r.get(peers).and_then(Value::as_array) {
                for (j, peer) in ps.iter().enumerate() {
                    let f = format!("spec.{dir}[{i}].{peers}[{j}]");
                    let n = ["podSelector", "namespaceSelector", "ipBlock"]
                        .iter()
                        .filter(|k| peer.get(**k).is_some())
                        .count();
                    if n == 0 {
                        errs.required(f.clone());
                    }
                    if let Some(ib) = peer.get("ipBlock")
                        && !ib.get("cidr").and_then(Value::as_str).is_some_and(is_cidr)
                    {
                        errs.invalid(
                            format!("{f}.ipBlock.cidr"),
                            ib.get("cidr").unwrap_or(&Value::Null),
                            "must be a valid CIDR value, (e.g. 10.9.8.0/24 or 2001:db8::/64)",
                        );
                    }
                }
            }
        }
    }
}

fn is_cidr(s: &str) -> bool {
    let Some((ip, bits)) = s.split_once('/') else {
        return false;
    };
    let Ok(bits) = bits.parse::<u8>() else {
        return false;
    };
    if let Ok(ip) = ip.parse::<std::net::Ipv4Addr>() {
        let _ = ip;
        bits <= 32
    } else {
        ip.parse::<std::net::Ipv6Addr>().is_ok() && bits <= 128
    }
}

/// Validation of the whole (defaulted) object; `old` is the stored object on updates.
pub fn validate(kind: &str, obj: &Value, old: Option<&Value>) -> Errs {
    let mut errs = Errs::default();
    validate_meta(kind, obj, &mut errs);
    match kind {
        "Deployment" | "ReplicaSet" => validate_workload(kind, obj, old, &mut errs),
        "Service" => validate_service(obj, &mut errs),
        "ConfigMap" => {
            validate_data_keys(obj, &mut errs);
            validate_immutable_data(obj, old, &mut errs);
            if let (Some(d), Some(b)) = (
                obj.get("data").and_then(Value::as_object),
                obj.get("binaryData").and_then(Value::as_object),
            ) {
                for k in d.keys().filter(|k| b.contains_key(*k)) {
                    errs.invalid(
                        format!("data[{k}]"),
                        &json!(k),
                        "duplicate of key present in binaryData",
                    );
                }
            }
        }
        "Secret" => {
            validate_data_keys(obj, &mut errs);
            validate_immutable_data(obj, old, &mut errs);
            if let Some(old) = old
                && old.get("type") != obj.get("type")
            {
                errs.invalid(
                    "type",
                    obj.get("type").unwrap_or(&Value::Null),
                    "field is immutable",
                );
            }
        }
        "HorizontalPodAutoscaler" => validate_hpa(obj, &mut errs),
        "Ingress" => validate_ingress(obj, &mut errs),
        "NetworkPolicy" => validate_netpol(obj, &mut errs),
        "Pod" => validate_pod_spec(obj.get("spec"), "spec", false, &mut errs),
        _ => {}
    }
    errs
}

/// Checks that `obj` decodes as the typed object (wrong JSON types give 400, as the real
/// server's decoder does).
pub fn typecheck(kind: &str, obj: &Value) -> Result<(), String> {
    use k8s_openapi::api::{apps, autoscaling, core, networking};
    fn check<T: serde::de::DeserializeOwned>(v: &Value) -> Result<(), String> {
        T::deserialize(v).map(|_| ()).map_err(|e| e.to_string())
    }
    match kind {
        "Namespace" => check::<core::v1::Namespace>(obj),
        "ConfigMap" => check::<core::v1::ConfigMap>(obj),
        "Secret" => check::<core::v1::Secret>(obj),
        "Service" => check::<core::v1::Service>(obj),
        "ServiceAccount" => check::<core::v1::ServiceAccount>(obj),
        "Pod" => check::<core::v1::Pod>(obj),
        "Node" => check::<core::v1::Node>(obj),
        "Deployment" => check::<apps::v1::Deployment>(obj),
        "ReplicaSet" => check::<apps::v1::ReplicaSet>(obj),
        "HorizontalPodAutoscaler" => check::<autoscaling::v2::HorizontalPodAutoscaler>(obj),
        "Ingress" => check::<networking::v1::Ingress>(obj),
        "NetworkPolicy" => check::<networking::v1::NetworkPolicy>(obj),
        _ => Ok(()),
    }
}

/// `spec` (everything but metadata and status) differs: the generation moves.
pub fn spec_changed(old: &Value, new: &Value) -> bool {
    let strip = |v: &Value| {
        let mut v = v.clone();
        if let Some(m) = v.as_object_mut() {
            m.remove("metadata");
            m.remove("status");
        }
        v
    };
    strip(old) != strip(new)
}
