//! What `mesh output` shows: named values by kind and resource name
//! (`expose.scoring.url`, `cluster.main.endpoint`, `registry.models.url`,
//! `network.main.vpc_id`, `module.net.vpc`). Each provider reports them for
//! what it owns, from live state ([`crate::provider::Provider::outputs`]);
//! the stack adds its modules' outputs. Pure: merging, lookup by dotted
//! name, and the human and JSON renderings.

use std::collections::BTreeMap;

use serde_json::{Map, Value as J};

use crate::resource::{Live, Value};
use crate::stack::{Endpoint, Expose, Stack};

/// Named values: `kind.name.field`, where a field may hold an object whose
/// members are named on (`expose.scoring.endpoints.high-value`).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Outputs {
    groups: BTreeMap<String, BTreeMap<String, Map<String, J>>>,
}

impl Outputs {
    /// The fields of `kind.name`, empty if new.
    pub fn of(&mut self, kind: &str, name: &str) -> &mut Map<String, J> {
        self.groups
            .entry(kind.to_owned())
            .or_default()
            .entry(name.to_owned())
            .or_default()
    }

    /// Sets `kind.name.field`.
    pub fn set(&mut self, kind: &str, name: &str, field: &str, value: impl Into<J>) {
        self.of(kind, name).insert(field.to_owned(), value.into());
    }

    /// Adds `other`'s values; the fields of one `kind.name` join.
    pub fn merge(&mut self, other: Outputs) {
        for (kind, names) in other.groups {
            for (name, fields) in names {
                self.of(&kind, &name).extend(fields);
            }
        }
    }

    /// Sets `kind.name.FIELD` to `live`'s output `OUTPUT` for each
    /// `(OUTPUT, FIELD)` of `outputs` that `live` holds as a plain value.
    pub fn copy(&mut self, kind: &str, name: &str, live: &Live, outputs: &[(&str, &str)]) {
        for (output, field) in outputs {
            if let Some(v) = live.outputs.get(*output).and_then(plain) {
                self.set(kind, name, field, v);
            }
        }
    }

    /// Sets what every target shows of exposure `expose` (see [`exposure`])
    /// at the URL its live resource `live` reports; `false` when it reports none.
    pub fn exposure(&mut self, stack: &Stack, expose: &Expose, live: &Live) -> bool {
        let Some(url) = live.outputs.get("url").and_then(Value::as_str) else {
            return false;
        };
        self.of("expose", &expose.name)
            .extend(exposure(stack, expose, url));
        true
    }

    pub fn is_empty(&self) -> bool {
        self.groups.values().all(BTreeMap::is_empty)
    }

    /// The value at a dotted name: `kind.name.field[.member...]`, or the
    /// whole `kind.name` as an object.
    pub fn get(&self, dotted: &str) -> Option<J> {
        let mut parts = dotted.split('.');
        let (kind, name) = (parts.next()?, parts.next()?);
        let fields = self.groups.get(kind)?.get(name)?;
        let Some(field) = parts.next() else {
            return Some(J::Object(fields.clone()));
        };
        let mut at = fields.get(field)?;
        for member in parts {
            at = at.get(member)?;
        }
        Some(at.clone())
    }

    /// Every name [`Outputs::get`] answers with a plain value, in order.
    pub fn names(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (kind, names) in &self.groups {
            for (name, fields) in names {
                for (field, v) in fields {
                    leaves(format!("{kind}.{name}.{field}"), v, &mut out);
                }
            }
        }
        out.into_iter().map(|(n, _)| n).collect()
    }

    /// `{"stack", "env", "exposes": {NAME: {...}}, "clusters": ..., "registries": ...,
    /// "networks": ..., "modules": ...}`: one key per kind, in the plural;
    /// `exposes` always present.
    pub fn to_json(&self, stack: &str, env: &str) -> J {
        let mut root = Map::new();
        root.insert("stack".into(), stack.into());
        root.insert("env".into(), env.into());
        root.insert("exposes".into(), J::Object(Map::new()));
        for (kind, names) in &self.groups {
            let group: Map<String, J> = names
                .iter()
                .map(|(n, f)| (n.clone(), J::Object(f.clone())))
                .collect();
            root.insert(plural(kind), J::Object(group));
        }
        J::Object(root)
    }

    /// For people: each `kind.name` and its fields, one per line, with how
    /// to use an exposure's key or certificate.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for (kind, names) in &self.groups {
            for (name, fields) in names {
                out.push_str(&format!("{kind}.{name}\n"));
                let mut lines = Vec::new();
                for (field, v) in fields {
                    leaves(field.clone(), v, &mut lines);
                }
                for (line, v) in lines {
                    out.push_str(&format!("  {line}: {}\n", text(v)));
                }
                for hint in hints(fields) {
                    out.push_str(&format!("  ({hint})\n"));
                }
            }
        }
        out
    }
}

/// A value as a script reads it: a string bare, anything else as JSON.
pub fn text(v: &J) -> String {
    match v {
        J::String(s) => s.clone(),
        J::Object(_) | J::Array(_) => serde_json::to_string_pretty(v).unwrap_or_default(),
        other => other.to_string(),
    }
}

/// A live value as JSON; `None` for what is not a plain value (a secret's
/// digest, a reference, an unknown).
pub fn plain(v: &Value) -> Option<J> {
    Some(match v {
        Value::Bool(b) => J::from(*b),
        Value::Int(i) => J::from(*i),
        Value::Float(f) => J::from(*f),
        Value::Str(s) => J::from(s.as_str()),
        Value::List(l) => J::Array(l.iter().filter_map(plain).collect()),
        Value::Map(m) => J::Object(
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), plain(v)?)))
                .collect(),
        ),
        Value::Null | Value::Sensitive { .. } | Value::Ref { .. } | Value::Unknown => {
            return None;
        }
    })
}

/// What an exposure of `expose` at `url` offers on every target: its
/// service, URL, health and OpenAPI addresses, and each endpoint's address.
pub fn exposure(stack: &Stack, expose: &Expose, url: &str) -> Map<String, J> {
    let mut endpoints = Map::new();
    if let Some(svc) = stack.services.get(&expose.service) {
        for (ep, kind) in &svc.endpoints {
            let verb = match kind {
                Endpoint::Prediction { .. } => "predict",
                Endpoint::Lookup { .. } => "lookup",
            };
            endpoints.insert(
                ep.clone(),
                format!("{url}/public/api/v1/{}/{ep}/{verb}", expose.service).into(),
            );
        }
    }
    let mut fields = Map::new();
    fields.insert("service".into(), expose.service.clone().into());
    fields.insert("url".into(), url.into());
    fields.insert("health".into(), format!("{url}/readyz").into());
    fields.insert("openapi".into(), format!("{url}/openapi.json").into());
    fields.insert("docs".into(), format!("{url}/docs").into());
    fields.insert("endpoints".into(), J::Object(endpoints));
    fields
}

/// The stack's module outputs (`${module.M.O}`): `module.M.O`.
pub fn modules(stack: &Stack) -> Outputs {
    let mut out = Outputs::default();
    for (dotted, value) in &stack.outputs {
        let mut parts = dotted.splitn(3, '.');
        if let (Some("module"), Some(m), Some(o)) = (parts.next(), parts.next(), parts.next()) {
            out.set("module", m, o, value.clone());
        }
    }
    out
}

fn plural(kind: &str) -> String {
    match kind.strip_suffix('y') {
        Some(stem) => format!("{stem}ies"),
        None => format!("{kind}s"),
    }
}

/// The dotted names under `prefix` of `v`'s plain values (an empty object
/// or a list counts as one value), with the values.
fn leaves<'a>(prefix: String, v: &'a J, out: &mut Vec<(String, &'a J)>) {
    match v {
        J::Object(m) if !m.is_empty() => {
            for (k, inner) in m {
                leaves(format!("{prefix}.{k}"), inner, out);
            }
        }
        _ => out.push((prefix, v)),
    }
}

/// How to use an exposure's key or certificate.
fn hints(fields: &Map<String, J>) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(key) = fields.get("api_key_file").and_then(J::as_str) {
        out.push(format!(
            "callers need a key: from this machine send `X-API-Key: $(cat {key})`"
        ));
    }
    if let Some(cert) = fields.get("certificate").and_then(J::as_str) {
        out.push(format!(
            "HTTPS with a certificate mesh made: trust it with `curl --cacert {cert}`"
        ));
    }
    if let Some(command) = fields.get("api_key_command").and_then(J::as_str) {
        out.push(format!(
            "callers need a key: the operator's is `$({command})`"
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example() -> Outputs {
        let mut o = Outputs::default();
        o.set("expose", "scoring", "url", "http://127.0.0.1:8081");
        o.set("expose", "scoring", "node_port", 30081);
        o.set(
            "expose",
            "scoring",
            "endpoints",
            serde_json::json!({ "high-value": "http://127.0.0.1:8081/p" }),
        );
        o.set("registry", "models", "url", "1.dkr.ecr/models");
        o
    }

    #[test]
    fn a_dotted_name_finds_a_field_a_member_or_a_whole_resource() {
        let o = example();
        assert_eq!(
            o.get("expose.scoring.url"),
            Some(J::from("http://127.0.0.1:8081"))
        );
        assert_eq!(o.get("expose.scoring.node_port"), Some(J::from(30081)));
        assert_eq!(
            o.get("expose.scoring.endpoints.high-value"),
            Some(J::from("http://127.0.0.1:8081/p"))
        );
        assert_eq!(
            o.get("registry.models"),
            Some(serde_json::json!({ "url": "1.dkr.ecr/models" }))
        );
        assert_eq!(o.get("expose.scoring.nope"), None);
        assert_eq!(o.get("expose.other.url"), None);
        assert_eq!(o.get("expose"), None);
        assert_eq!(
            o.names(),
            [
                "expose.scoring.endpoints.high-value",
                "expose.scoring.node_port",
                "expose.scoring.url",
                "registry.models.url"
            ]
        );
    }

    #[test]
    fn json_groups_by_kind_in_the_plural_and_merging_joins_fields() {
        let mut o = example();
        let mut more = Outputs::default();
        more.set("expose", "scoring", "api_key_file", "/k");
        o.merge(more);
        let j = o.to_json("s", "e");
        assert_eq!(j["exposes"]["scoring"]["api_key_file"], "/k");
        assert_eq!(j["exposes"]["scoring"]["node_port"], 30081);
        assert_eq!(j["registries"]["models"]["url"], "1.dkr.ecr/models");
        assert_eq!(j["stack"], "s");
        let text = o.render();
        assert!(
            text.contains("expose.scoring\n  api_key_file: /k\n"),
            "{text}"
        );
        assert!(
            text.contains("  endpoints.high-value: http://127.0.0.1:8081/p\n"),
            "{text}"
        );
        assert!(
            text.contains("(callers need a key: from this machine send `X-API-Key: $(cat /k)`)"),
            "{text}"
        );
    }
}
