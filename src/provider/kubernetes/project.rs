//! Projection of an object (a desired manifest or a live object read back)
//! onto the attributes mesh manages.
//!
//! The same function projects both sides, so a field mesh sets is compared
//! with itself, and fields the API server defaults or allocates
//! (`clusterIP`, `progressDeadlineSeconds`, an unrequested `nodePort`,
//! probe thresholds, ...) never show as differences: they are either not
//! projected at all, or projected only on the live side, where the planner
//! ignores attributes the desired resource does not declare.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value as J;
use sha2::{Digest, Sha256};

use super::kinds::{self, Kind};
use crate::resource::Value;

/// The attributes of `obj` (a full object: apiVersion, kind, metadata, spec...).
pub fn project(kind: Kind, obj: &J) -> BTreeMap<String, Value> {
    let mut a = BTreeMap::new();
    if let Some(name) = str_at(obj, &["metadata", "name"]) {
        a.insert("name".to_owned(), Value::str(name));
    }
    if kind.namespaced()
        && let Some(ns) = str_at(obj, &["metadata", "namespace"])
    {
        a.insert("namespace".to_owned(), Value::str(ns));
    }
    match kind {
        Kind::Namespace => {}
        Kind::ConfigMap => {
            let data = obj.pointer("/data").and_then(J::as_object).map(|m| {
                m.iter()
                    .map(|(k, v)| {
                        (
                            k.clone(),
                            Value::Str(content_digest(v.as_str().unwrap_or_default())),
                        )
                    })
                    .collect()
            });
            a.insert("data".to_owned(), Value::Map(data.unwrap_or_default()));
        }
        Kind::Secret => {
            let mut keys: BTreeSet<String> = BTreeSet::new();
            for field in ["/data", "/stringData"] {
                if let Some(m) = obj.pointer(field).and_then(J::as_object) {
                    keys.extend(m.keys().cloned());
                }
            }
            a.insert("keys".to_owned(), Value::list_of_str(keys));
            put(&mut a, "type", obj.pointer("/type"));
            // The digest of the data itself (what the server holds, not what
            // mesh last wrote), so a value edited by hand shows as a change,
            // is keyed: the observer adds it ([`secret_data_digest`]). A
            // desired manifest carries no values: its `data` is set apart.
        }
        Kind::Deployment => project_deployment(obj, &mut a),
        Kind::HorizontalPodAutoscaler => {
            put(&mut a, "target", obj.pointer("/spec/scaleTargetRef/name"));
            put(&mut a, "min", obj.pointer("/spec/minReplicas"));
            put(&mut a, "max", obj.pointer("/spec/maxReplicas"));
            let cpu = obj
                .pointer("/spec/metrics")
                .and_then(J::as_array)
                .and_then(|ms| {
                    ms.iter()
                        .find(|m| m.pointer("/resource/name").and_then(J::as_str) == Some("cpu"))
                        .and_then(|m| m.pointer("/resource/target/averageUtilization"))
                });
            put(&mut a, "cpu_percent", cpu);
        }
        Kind::Service => {
            put(&mut a, "type", obj.pointer("/spec/type"));
            put(&mut a, "port", obj.pointer("/spec/ports/0/port"));
            put(
                &mut a,
                "target_port",
                obj.pointer("/spec/ports/0/targetPort"),
            );
            put(&mut a, "node_port", obj.pointer("/spec/ports/0/nodePort"));
            put(&mut a, "selector", obj.pointer("/spec/selector"));
            put(
                &mut a,
                "source_ranges",
                obj.pointer("/spec/loadBalancerSourceRanges"),
            );
            put(
                &mut a,
                "external_traffic_policy",
                obj.pointer("/spec/externalTrafficPolicy"),
            );
            a.insert("edge_annotations".to_owned(), edge_annotations(obj));
        }
        Kind::Ingress => {
            put(&mut a, "host", obj.pointer("/spec/rules/0/host"));
            let path = obj.pointer("/spec/rules/0/http/paths/0");
            put(&mut a, "path", path.and_then(|p| p.get("path")));
            put(&mut a, "path_type", path.and_then(|p| p.get("pathType")));
            let backend = path.and_then(|p| p.pointer("/backend/service"));
            let name = backend.and_then(|b| b.get("name")).and_then(J::as_str);
            let port = backend
                .and_then(|b| b.pointer("/port/number"))
                .and_then(J::as_i64);
            if let (Some(name), Some(port)) = (name, port) {
                a.insert("backend".to_owned(), Value::str(format!("{name}:{port}")));
            }
            // `SECRET:host,host` per entry.
            let tls = obj
                .pointer("/spec/tls")
                .and_then(J::as_array)
                .into_iter()
                .flatten()
                .map(|t| {
                    let hosts: Vec<&str> = t
                        .get("hosts")
                        .and_then(J::as_array)
                        .into_iter()
                        .flatten()
                        .filter_map(J::as_str)
                        .collect();
                    let secret = t.get("secretName").and_then(J::as_str).unwrap_or_default();
                    Value::str(format!("{secret}:{}", hosts.join(",")))
                })
                .collect();
            a.insert("tls".to_owned(), Value::List(tls));
            a.insert("edge_annotations".to_owned(), edge_annotations(obj));
        }
        Kind::NetworkPolicy => {
            put(
                &mut a,
                "pod_selector",
                obj.pointer("/spec/podSelector/matchLabels"),
            );
            put(&mut a, "policy_types", obj.pointer("/spec/policyTypes"));
            let mut from = Vec::new();
            let mut ports = BTreeSet::new();
            for rule in obj
                .pointer("/spec/ingress")
                .and_then(J::as_array)
                .into_iter()
                .flatten()
            {
                for peer in rule.get("from").and_then(J::as_array).into_iter().flatten() {
                    from.push(Value::str(peer_string(peer)));
                }
                for p in rule
                    .get("ports")
                    .and_then(J::as_array)
                    .into_iter()
                    .flatten()
                {
                    if let Some(n) = p.get("port").and_then(J::as_i64) {
                        ports.insert(n);
                    }
                }
            }
            a.insert("from".to_owned(), Value::List(from));
            a.insert(
                "ports".to_owned(),
                Value::List(ports.into_iter().map(Value::Int).collect()),
            );
        }
    }
    a
}

/// The annotations of [`kinds::EDGE_ANNOTATIONS`] an object has: those mesh
/// sets are compared, and one it no longer sets shows as a change.
fn edge_annotations(obj: &J) -> Value {
    let annotations = obj.pointer("/metadata/annotations");
    Value::Map(
        kinds::EDGE_ANNOTATIONS
            .iter()
            .filter_map(|k| {
                let v = annotations?.get(*k)?;
                Some(((*k).to_owned(), to_value(v)))
            })
            .collect(),
    )
}

fn project_deployment(obj: &J, a: &mut BTreeMap<String, Value>) {
    put(a, "replicas", obj.pointer("/spec/replicas"));
    put(a, "strategy", obj.pointer("/spec/strategy/type"));
    let tmpl = obj.pointer("/spec/template");
    let annotations = tmpl.and_then(|t| t.pointer("/metadata/annotations"));
    put(
        a,
        "config_hash",
        annotations.and_then(|m| m.get(kinds::ANNOTATION_CONFIG_HASH)),
    );
    if let Some(h) = annotations.and_then(|m| m.get(kinds::ANNOTATION_SECRET_HASH)) {
        a.insert("secret_hash".to_owned(), sensitive(Some(h)));
    }
    // The pod template's labels, containers and pull secrets are wholly
    // mesh's: one added by someone else shows as a change.
    put(
        a,
        "pod_labels",
        tmpl.and_then(|t| t.pointer("/metadata/labels")),
    );
    let names = |list: &str| -> Value {
        Value::List(
            tmpl.and_then(|t| t.pointer(list))
                .and_then(J::as_array)
                .into_iter()
                .flatten()
                .filter_map(|c| c.get("name").and_then(J::as_str).map(Value::str))
                .collect(),
        )
    };
    a.insert("containers".to_owned(), names("/spec/containers"));
    a.insert("pull_secrets".to_owned(), names("/spec/imagePullSecrets"));
    let c = tmpl.and_then(|t| t.pointer("/spec/containers/0"));
    if let Some(image) = c.and_then(|c| c.get("image")).and_then(J::as_str) {
        a.insert("image".to_owned(), Value::str(image));
        if let Some((repo, digest)) = image.split_once('@') {
            a.insert("image_repository".to_owned(), Value::str(repo));
            a.insert("image_digest".to_owned(), Value::str(digest));
        }
    }
    put(
        a,
        "port",
        c.and_then(|c| c.pointer("/ports/0/containerPort")),
    );
    put(
        a,
        "cpu",
        c.and_then(|c| c.pointer("/resources/requests/cpu")),
    );
    put(
        a,
        "memory",
        c.and_then(|c| c.pointer("/resources/requests/memory")),
    );
    put(
        a,
        "memory_limit",
        c.and_then(|c| c.pointer("/resources/limits/memory")),
    );
    // What the pod and its container may do (see `objects::SECURITY`).
    put(
        a,
        "pod_security_context",
        tmpl.and_then(|t| t.pointer("/spec/securityContext")),
    );
    put(
        a,
        "security_context",
        c.and_then(|c| c.get("securityContext")),
    );
    put(
        a,
        "readiness",
        c.and_then(|c| c.pointer("/readinessProbe/httpGet/path")),
    );
    put(
        a,
        "liveness",
        c.and_then(|c| c.pointer("/livenessProbe/httpGet/path")),
    );
    // Secrets reach the runtime as files of a volume, never as environment
    // variables: both are listed, so a Secret in the environment shows.
    let secrets = |list: Option<&J>, name: &str| -> Value {
        Value::List(
            list.and_then(J::as_array)
                .into_iter()
                .flatten()
                .filter_map(|e| e.pointer(name).and_then(J::as_str).map(Value::str))
                .collect(),
        )
    };
    let volumes = tmpl.and_then(|t| t.pointer("/spec/volumes"));
    a.insert(
        "secret_volumes".to_owned(),
        secrets(volumes, "/secret/secretName"),
    );
    a.insert(
        "secret_env".to_owned(),
        secrets(c.and_then(|c| c.get("envFrom")), "/secretRef/name"),
    );
    a.insert("rollout".to_owned(), Value::str(rollout_state(obj)));
}

/// `complete`, `in progress (1/3 available)` or `failed (ProgressDeadlineExceeded)`,
/// read from a Deployment's status alone.
pub fn rollout_state(obj: &J) -> String {
    let int = |p: &str| obj.pointer(p).and_then(J::as_i64).unwrap_or(0);
    let want = obj
        .pointer("/spec/replicas")
        .and_then(J::as_i64)
        .unwrap_or(1);
    let generation = int("/metadata/generation");
    let observed = int("/status/observedGeneration");
    let (updated, available, total) = (
        int("/status/updatedReplicas"),
        int("/status/availableReplicas"),
        int("/status/replicas"),
    );
    let failed = obj
        .pointer("/status/conditions")
        .and_then(J::as_array)
        .into_iter()
        .flatten()
        .find(|c| {
            c.get("type").and_then(J::as_str) == Some("Progressing")
                && c.get("status").and_then(J::as_str) == Some("False")
        });
    if let Some(c) = failed {
        return format!(
            "failed ({})",
            c.get("reason")
                .and_then(J::as_str)
                .unwrap_or("not progressing")
        );
    }
    if observed >= generation && updated == want && available == want && total == want {
        "complete".to_owned()
    } else {
        format!("in progress ({available}/{want} available)")
    }
}

/// A NetworkPolicy peer as `service:NAME`, `cidr:CIDR` or the raw JSON.
fn peer_string(peer: &J) -> String {
    if let Some(s) = peer
        .pointer("/podSelector/matchLabels")
        .and_then(|m| m.get(kinds::LABEL_SERVICE))
        .and_then(J::as_str)
    {
        return format!("service:{s}");
    }
    if let Some(c) = peer.pointer("/ipBlock/cidr").and_then(J::as_str) {
        return format!("cidr:{c}");
    }
    peer.to_string()
}

fn sensitive(v: Option<&J>) -> Value {
    match v.and_then(J::as_str) {
        Some(d) => Value::Sensitive {
            digest: d.to_owned(),
        },
        None => Value::Null,
    }
}

/// The digest of a Secret's content, key by key (what the
/// `mesh.dev/secret-hash` annotation holds): HMAC-SHA256 under the stack's
/// digest key (the Secret `mesh-digest-key` of its namespace), so neither
/// the values nor a plain hash to guess them from ever leave the Secret.
pub fn secret_digest<'a>(
    key: &[u8],
    items: impl IntoIterator<Item = (&'a str, &'a [u8])>,
) -> String {
    let mut sorted: Vec<(&str, &[u8])> = items.into_iter().collect();
    sorted.sort();
    let mut message = b"mesh-secret/1\0".to_vec();
    for (k, v) in sorted {
        message.extend_from_slice(k.as_bytes());
        message.push(0);
        message.extend_from_slice(&(v.len() as u64).to_be_bytes());
        message.extend_from_slice(v);
    }
    format!(
        "hmac-sha256:{}",
        hex::encode(crate::provider::local::secrets::hmac_sha256(key, &message))
    )
}

/// Whether mesh makes a Secret's values itself at apply (caller keys,
/// verifiers, the digest key): they are never planned, nor compared.
pub fn generated(obj: &J) -> bool {
    obj.pointer("/metadata/annotations")
        .and_then(|a| a.get(kinds::ANNOTATION_GENERATED))
        .is_some()
}

/// A live Secret's `data` attribute: the keyed digest of its content
/// (`Unknown` without the key), nothing for a generated Secret.
pub fn secret_data_digest(obj: &J, key: Option<&[u8]>) -> Option<Value> {
    if generated(obj) {
        return None;
    }
    let Some(key) = key else {
        return Some(Value::Unknown);
    };
    let data: BTreeMap<String, Vec<u8>> = obj
        .pointer("/data")
        .and_then(J::as_object)
        .into_iter()
        .flatten()
        .map(|(k, v)| {
            let bytes = serde_json::from_value::<k8s_openapi::ByteString>(v.clone())
                .map(|b| b.0)
                .unwrap_or_default();
            (k.clone(), bytes)
        })
        .collect();
    Some(Value::Sensitive {
        digest: secret_digest(key, data.iter().map(|(k, v)| (k.as_str(), v.as_slice()))),
    })
}

/// `sha256:HEX` of a text.
pub fn content_digest(s: &str) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(s.as_bytes())))
}

fn str_at<'a>(obj: &'a J, path: &[&str]) -> Option<&'a str> {
    let mut cur = obj;
    for p in path {
        cur = cur.get(p)?;
    }
    cur.as_str()
}

fn put(a: &mut BTreeMap<String, Value>, name: &str, v: Option<&J>) {
    if let Some(v) = v {
        a.insert(name.to_owned(), to_value(v));
    }
}

/// JSON → attribute value (objects become maps, numbers ints when they are).
pub fn to_value(v: &J) -> Value {
    match v {
        J::Null => Value::Null,
        J::Bool(b) => Value::Bool(*b),
        J::Number(n) => n
            .as_i64()
            .map(Value::Int)
            .unwrap_or_else(|| Value::Float(n.as_f64().unwrap_or(0.0))),
        J::String(s) => Value::Str(s.clone()),
        J::Array(items) => Value::List(items.iter().map(to_value).collect()),
        J::Object(m) => Value::Map(m.iter().map(|(k, v)| (k.clone(), to_value(v))).collect()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn defaulted_and_allocated_fields_are_not_projected_from_desired() {
        let desired = json!({"metadata": {"name": "web", "namespace": "ns"}, "spec": {"type": "NodePort", "selector": {"a": "b"}, "ports": [{"port": 8080, "targetPort": 8080}]}});
        let live = json!({"metadata": {"name": "web", "namespace": "ns"}, "spec": {"type": "NodePort", "clusterIP": "10.96.0.9", "selector": {"a": "b"}, "ports": [{"port": 8080, "targetPort": 8080, "nodePort": 31234, "protocol": "TCP"}]}});
        let d = project(Kind::Service, &desired);
        let l = project(Kind::Service, &live);
        assert!(!d.contains_key("node_port"));
        for (k, v) in &d {
            assert_eq!(Some(v), l.get(k), "{k}");
        }
    }

    #[test]
    fn rollout_state_reads_status() {
        let mut d = json!({"metadata": {"generation": 2}, "spec": {"replicas": 2}, "status": {"observedGeneration": 2, "replicas": 2, "updatedReplicas": 2, "availableReplicas": 2}});
        assert_eq!(rollout_state(&d), "complete");
        d["status"]["availableReplicas"] = json!(1);
        assert_eq!(rollout_state(&d), "in progress (1/2 available)");
        d["status"]["conditions"] = json!([{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}]);
        assert_eq!(rollout_state(&d), "failed (ProgressDeadlineExceeded)");
    }
}
