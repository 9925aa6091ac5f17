//! Field paths and field sets, as server-side apply tracks them in `managedFields` (`FieldsV1`).
//!
//! A path is a list of elements encoded as in `fieldsV1`: `f:name` for a map/struct field,
//! `k:{"name":"app"}` for an item of an associative list, `v:"x"` for an item of a set.
//! Which lists are associative (and by which keys) and which maps are atomic follows the
//! `x-kubernetes-list-type` / `-map-keys` / `-map-type` markers of the built-in types.

use crate::util::canonical_json;
use serde_json::{Map, Value};
use std::collections::BTreeSet;

pub type Path = Vec<String>;
pub type FieldSet = BTreeSet<Path>;

/// How a list field merges.
#[derive(Debug, Clone, PartialEq)]
pub enum ListKind {
    Keyed(&'static [&'static str]),
    Set,
    Atomic,
}

/// Maps whose entries are owned one by one and which are themselves members (`.`).
const GRANULAR_MAPS: &[&str] = &[
    "labels",
    "annotations",
    "data",
    "stringData",
    "binaryData",
    "nodeSelector",
    "limits",
    "requests",
];
/// Maps/structs that are replaced as a whole (`+mapType=atomic`, `+structType=atomic`).
const ATOMIC_MAPS: &[&str] = &[
    "selector",
    "podSelector",
    "namespaceSelector",
    "labelSelector",
];

pub fn is_atomic_map(field: &str) -> bool {
    ATOMIC_MAPS.contains(&field)
}

pub fn list_kind(field: &str, items: &[Value]) -> ListKind {
    let all_obj_with =
        |k: &str| !items.is_empty() && items.iter().all(|i| i.get(k).is_some_and(|v| !v.is_null()));
    let keys: &'static [&'static str] = match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "env"
        | "volumes"
        | "imagePullSecrets"
        | "resourceClaims" => &["name"],
        "volumeMounts" => &["mountPath"],
        "volumeDevices" => &["devicePath"],
        "ownerReferences" => &["uid"],
        "conditions" => &["type"],
        "hostAliases" => &["ip"],
        "topologySpreadConstraints" => &["topologyKey", "whenUnsatisfiable"],
        "ports" if all_obj_with("containerPort") => &["containerPort", "protocol"],
        "ports" if all_obj_with("port") => &["port", "protocol"],
        "finalizers" if items.iter().all(Value::is_string) => return ListKind::Set,
        _ => return ListKind::Atomic,
    };
    if items.iter().all(|i| item_key(i, keys).is_some()) {
        ListKind::Keyed(keys)
    } else {
        ListKind::Atomic
    }
}

/// `{"name":"app"}` for an associative-list item (`protocol` defaults to TCP).
pub fn item_key(item: &Value, keys: &[&str]) -> Option<String> {
    let obj = item.as_object()?;
    let mut m = Map::new();
    for k in keys {
        match obj.get(*k) {
            Some(v) if !v.is_null() => {
                m.insert((*k).to_string(), v.clone());
            }
            _ if *k == "protocol" => {
                m.insert("protocol".into(), "TCP".into());
            }
            _ => return None,
        }
    }
    Some(canonical_json(&Value::Object(m)))
}

/// Metadata fields never tracked by field managers.
const SYSTEM_META: &[&str] = &[
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "managedFields",
    "selfLink",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
];

/// Which part of an object a write (and its manager) covers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Scope {
    /// The main resource; `status` is excluded when the kind has a status subresource.
    Main { skip_status: bool },
    /// Only `status`.
    Status,
}

/// The set of field paths `obj` sets (leaves, list items, granular maps).
pub fn field_set(obj: &Value, scope: Scope) -> FieldSet {
    let mut out = FieldSet::new();
    let Some(m) = obj.as_object() else {
        return out;
    };
    for (k, v) in m {
        let keep = match scope {
            Scope::Main { skip_status } => {
                !(k == "apiVersion" || k == "kind" || (skip_status && k == "status"))
            }
            Scope::Status => k == "status",
        };
        if !keep {
            continue;
        }
        let path = vec![format!("f:{k}")];
        if k == "metadata" {
            if let Some(meta) = v.as_object() {
                for (mk, mv) in meta {
                    if !SYSTEM_META.contains(&mk.as_str()) {
                        collect(mv, mk, vec![path[0].clone(), format!("f:{mk}")], &mut out);
                    }
                }
            }
        } else {
            collect(v, k, path, &mut out);
        }
    }
    out
}

fn collect(v: &Value, field: &str, path: Path, out: &mut FieldSet) {
    match v {
        Value::Object(m) if !m.is_empty() && !is_atomic_map(field) => {
            if GRANULAR_MAPS.contains(&field) {
                out.insert(path.clone());
            }
            for (k, c) in m {
                let mut p = path.clone();
                p.push(format!("f:{k}"));
                collect(c, k, p, out);
            }
        }
        Value::Array(items) if !items.is_empty() => match list_kind(field, items) {
            ListKind::Keyed(keys) => {
                for it in items {
                    let mut p = path.clone();
                    p.push(format!("k:{}", item_key(it, keys).unwrap_or_default()));
                    out.insert(p.clone());
                    if let Some(o) = it.as_object() {
                        for (k, c) in o {
                            let mut q = p.clone();
                            q.push(format!("f:{k}"));
                            collect(c, k, q, out);
                        }
                    }
                }
            }
            ListKind::Set => {
                for it in items {
                    let mut p = path.clone();
                    p.push(format!("v:{}", canonical_json(it)));
                    out.insert(p);
                }
            }
            ListKind::Atomic => {
                out.insert(path);
            }
        },
        _ => {
            out.insert(path);
        }
    }
}

/// True when the path names a leaf value (compared for conflicts), not a container.
pub fn is_leaf(p: &Path, v: &Value) -> bool {
    let last = p.last().map(String::as_str).unwrap_or_default();
    if last.starts_with("k:") || last.starts_with("v:") {
        return false;
    }
    let name = last.strip_prefix("f:").unwrap_or(last);
    !(v.is_object() && GRANULAR_MAPS.contains(&name) && !v.as_object().is_some_and(Map::is_empty))
}

fn key_matches(item: &Value, key_json: &str) -> bool {
    let Ok(Value::Object(key)) = serde_json::from_str::<Value>(key_json) else {
        return false;
    };
    let keys: Vec<&str> = key.keys().map(String::as_str).collect();
    item_key(item, &keys).is_some_and(|k| k == canonical_json(&Value::Object(key.clone())))
}

/// The value at `p`, if present.
pub fn value_at<'a>(v: &'a Value, p: &[String]) -> Option<&'a Value> {
    let mut cur = v;
    for e in p {
        cur = if let Some(f) = e.strip_prefix("f:") {
            cur.as_object()?.get(f)?
        } else if let Some(k) = e.strip_prefix("k:") {
            cur.as_array()?.iter().find(|i| key_matches(i, k))?
        } else if let Some(x) = e.strip_prefix("v:") {
            let want: Value = serde_json::from_str(x).ok()?;
            cur.as_array()?.iter().find(|i| **i == want)?
        } else {
            return None;
        };
    }
    Some(cur)
}

/// Removes the value at `p` (a map entry, a list item or a set member).
pub fn remove_at(v: &mut Value, p: &[String]) {
    let Some((last, parent)) = p.split_last() else {
        return;
    };
    let mut cur = v;
    for e in parent {
        let next = if let Some(f) = e.strip_prefix("f:") {
            cur.as_object_mut().and_then(|o| o.get_mut(f))
        } else if let Some(k) = e.strip_prefix("k:") {
            cur.as_array_mut()
                .and_then(|a| a.iter_mut().find(|i| key_matches(i, k)))
        } else if let Some(x) = e.strip_prefix("v:") {
            let want: Value = serde_json::from_str(x).unwrap_or(Value::Null);
            cur.as_array_mut()
                .and_then(|a| a.iter_mut().find(|i| **i == want))
        } else {
            None
        };
        match next {
            Some(n) => cur = n,
            None => return,
        }
    }
    if let Some(f) = last.strip_prefix("f:") {
        if let Some(o) = cur.as_object_mut() {
            o.remove(f);
        }
    } else if let Some(k) = last.strip_prefix("k:") {
        if let Some(a) = cur.as_array_mut() {
            a.retain(|i| !key_matches(i, k));
        }
    } else if let Some(x) = last.strip_prefix("v:") {
        let want: Value = serde_json::from_str(x).unwrap_or(Value::Null);
        if let Some(a) = cur.as_array_mut() {
            a.retain(|i| *i != want);
        }
    }
}

/// Merges an applied configuration into the live object, the server-side-apply way.
pub fn merge_apply(live: &mut Value, cfg: &Value, field: &str) {
    match (live, cfg) {
        (Value::Object(l), Value::Object(c)) if !is_atomic_map(field) => {
            for (k, cv) in c {
                match l.get_mut(k) {
                    Some(lv) => merge_apply(lv, cv, k),
                    None => {
                        l.insert(k.clone(), cv.clone());
                    }
                }
            }
        }
        (Value::Array(l), Value::Array(c)) => match list_kind(field, c) {
            ListKind::Keyed(keys) if l.iter().all(|i| item_key(i, keys).is_some()) => {
                for ci in c {
                    let ck = item_key(ci, keys);
                    match l.iter_mut().find(|li| item_key(li, keys) == ck) {
                        Some(li) => merge_apply(li, ci, ""),
                        None => l.push(ci.clone()),
                    }
                }
            }
            ListKind::Set => {
                for ci in c {
                    if !l.contains(ci) {
                        l.push(ci.clone());
                    }
                }
            }
            _ => *l = c.clone(),
        },
        (l, c) => *l = c.clone(),
    }
}

/// Dotted rendering used in conflict messages: `.spec.template.spec.containers[name="app"].image`.
pub fn render_path(p: &[String]) -> String {
    let mut s = String::new();
    for e in p {
        if let Some(f) = e.strip_prefix("f:") {
            s.push('.');
            s.push_str(f);
        } else if let Some(k) = e.strip_prefix("k:") {
            let parts: Vec<String> = match serde_json::from_str::<Value>(k) {
                Ok(Value::Object(m)) => m.iter().map(|(k, v)| format!("{k}={v}")).collect(),
                _ => vec![k.to_string()],
            };
            s.push_str(&format!("[{}]", parts.join(",")));
        } else if let Some(v) = e.strip_prefix("v:") {
            s.push_str(&format!("[={v}]"));
        }
    }
    s
}

#[derive(Default)]
struct Node {
    member: bool,
    children: std::collections::BTreeMap<String, Node>,
}

/// The `fieldsV1` document of a field set.
pub fn to_fields_v1(set: &FieldSet) -> Value {
    let mut root = Node::default();
    for p in set {
        let mut n = &mut root;
        for e in p {
            n = n.children.entry(e.clone()).or_default();
        }
        n.member = true;
    }
    fn render(n: &Node) -> Value {
        let mut m = Map::new();
        if n.member && !n.children.is_empty() {
            m.insert(".".into(), Value::Object(Map::new()));
        }
        for (k, c) in &n.children {
            m.insert(k.clone(), render(c));
        }
        Value::Object(m)
    }
    render(&root)
}

/// Parses a `fieldsV1` document back into a field set.
pub fn from_fields_v1(v: &Value) -> FieldSet {
    fn walk(v: &Value, path: &mut Path, out: &mut FieldSet) {
        let Some(m) = v.as_object() else {
            return;
        };
        if m.is_empty() && !path.is_empty() {
            out.insert(path.clone());
            return;
        }
        for (k, c) in m {
            if k == "." {
                out.insert(path.clone());
            } else {
                path.push(k.clone());
                walk(c, path, out);
                path.pop();
            }
        }
    }
    let mut out = FieldSet::new();
    walk(v, &mut Vec::new(), &mut out);
    out
}

/// Leaf and member paths whose value differs between `a` and `b` (added, removed or changed).
pub fn changed_paths(old: &Value, new: &Value, scope: Scope) -> (FieldSet, FieldSet) {
    let fo = field_set(old, scope);
    let fnew = field_set(new, scope);
    let mut changed = FieldSet::new();
    for p in &fnew {
        if !fo.contains(p) {
            changed.insert(p.clone());
        } else if let (Some(a), Some(b)) = (value_at(old, p), value_at(new, p))
            && is_leaf(p, b)
            && a != b
        {
            changed.insert(p.clone());
        }
    }
    let removed = fo.difference(&fnew).cloned().collect();
    (changed, removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn field_set_roundtrip() {
        let d = json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "x", "labels": {"app": "x"}},
            "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "x"}},
                "template": {"spec": {"containers": [{"name": "app", "image": "i",
                    "ports": [{"containerPort": 80}]}]}}}
        });
        let s = field_set(&d, Scope::Main { skip_status: true });
        assert!(s.contains(&vec!["f:spec".to_string(), "f:replicas".to_string()]));
        assert!(s.contains(&vec!["f:spec".to_string(), "f:selector".to_string()]));
        let port = vec![
            "f:spec",
            "f:template",
            "f:spec",
            "f:containers",
            "k:{\"name\":\"app\"}",
            "f:ports",
            "k:{\"containerPort\":80,\"protocol\":\"TCP\"}",
        ]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
        assert!(s.contains(&port));
        assert_eq!(value_at(&d, &port), Some(&json!({"containerPort": 80})));
        let v1 = to_fields_v1(&s);
        assert_eq!(from_fields_v1(&v1), s);
        assert_eq!(
            render_path(&port[..6]),
            ".spec.template.spec.containers[name=\"app\"].ports"
        );
    }
}
