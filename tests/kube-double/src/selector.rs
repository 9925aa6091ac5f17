//! Label selectors (string syntax and `LabelSelector` objects) and field selectors.

use serde_json::{Map, Value};

#[derive(Debug, Clone, PartialEq)]
pub enum Req {
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct LabelSelector(pub Vec<Req>);

fn labels_of(obj: &Value) -> Option<&Map<String, Value>> {
    obj.get("metadata")?.get("labels")?.as_object()
}

impl Req {
    fn matches(&self, labels: Option<&Map<String, Value>>) -> bool {
        let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        match self {
            Req::Eq(k, v) => get(k) == Some(v.as_str()),
            Req::NotEq(k, v) => get(k) != Some(v.as_str()),
            Req::In(k, vs) => get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            Req::NotIn(k, vs) => !get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            Req::Exists(k) => get(k).is_some(),
            Req::NotExists(k) => get(k).is_none(),
        }
    }
}

impl LabelSelector {
    pub fn matches(&self, obj: &Value) -> bool {
        self.matches_labels(labels_of(obj))
    }

    pub fn matches_labels(&self, labels: Option<&Map<String, Value>>) -> bool {
        self.0.iter().all(|r| r.matches(labels))
    }

    /// Parses `a=b,c!=d,e in (x,y),f notin (z),g,!h`.
    pub fn parse(s: &str) -> Result<LabelSelector, String> {
        let mut reqs = Vec::new();
        let chars: Vec<char> = s.chars().collect();
        let mut i = 0;
        let skip_ws = |i: &mut usize| {
            while *i < chars.len() && chars[*i].is_whitespace() {
                *i += 1;
            }
        };
        let is_key_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/');
        loop {
            skip_ws(&mut i);
            if i >= chars.len() {
                break;
            }
            let negate = chars[i] == '!';
            if negate {
                i += 1;
                skip_ws(&mut i);
            }
            let start = i;
            while i < chars.len() && is_key_char(chars[i]) {
                i += 1;
            }
            let key: String = chars[start..i].iter().collect();
            if key.is_empty() {
                return Err(format!(
                    "unable to parse requirement: found '{}', expected: identifier",
                    chars.get(i).copied().unwrap_or(' ')
                ));
            }
            skip_ws(&mut i);
            if negate {
                reqs.push(Req::NotExists(key));
            } else if i >= chars.len() || chars[i] == ',' {
                reqs.push(Req::Exists(key));
            } else {
                let rest: String = chars[i..].iter().collect();
                let (op, len) = if rest.starts_with("==") {
                    ("=", 2)
                } else if rest.starts_with("!=") {
                    ("!=", 2)
                } else if rest.starts_with('=') {
                    ("=", 1)
                } else if rest.starts_with("notin") {
                    ("notin", 5)
                } else if rest.starts_with("in") {
                    ("in", 2)
                } else {
                    return Err(format!(
                        "unable to parse requirement: found '{rest}', expected: in, notin, =, ==, !=, !, ','"
                    ));
                };
                i += len;
                skip_ws(&mut i);
                if op == "in" || op == "notin" {
                    if i >= chars.len() || chars[i] != '(' {
                        return Err(
                            "unable to parse requirement: expected '(' after set operator".into(),
                        );
                    }
                    i += 1;
                    let close = chars[i..]
                        .iter()
                        .position(|c| *c == ')')
                        .ok_or("unable to parse requirement: missing ')'")?;
                    let inner: String = chars[i..i + close].iter().collect();
                    i += close + 1;
                    let vals: Vec<String> = inner
                        .split(',')
                        .map(|v| v.trim().to_string())
                        .filter(|v| !v.is_empty())
                        .collect();
                    if vals.is_empty() {
                        return Err("unable to parse requirement: for 'in', 'notin' operators, values set can't be empty".into());
                    }
                    reqs.push(if op == "in" {
                        Req::In(key, vals)
                    } else {
                        Req::NotIn(key, vals)
                    });
                } else {
                    let vs = i;
                    while i < chars.len() && chars[i] != ',' && !chars[i].is_whitespace() {
                        i += 1;
                    }
                    let val: String = chars[vs..i].iter().collect();
                    if !val
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
                    {
                        return Err(format!(
                            "unable to parse requirement: invalid label value: \"{val}\""
                        ));
                    }
                    reqs.push(if op == "=" {
                        Req::Eq(key, val)
                    } else {
                        Req::NotEq(key, val)
                    });
                }
            }
            skip_ws(&mut i);
            if i < chars.len() {
                if chars[i] != ',' {
                    return Err(format!(
                        "unable to parse requirement: found '{}', expected: ','",
                        chars[i]
                    ));
                }
                i += 1;
            }
        }
        Ok(LabelSelector(reqs))
    }

    /// From a `metav1.LabelSelector` object (`matchLabels`, `matchExpressions`).
    pub fn from_object(sel: &Value) -> Result<LabelSelector, String> {
        let mut reqs = Vec::new();
        if let Some(ml) = sel.get("matchLabels").and_then(Value::as_object) {
            for (k, v) in ml {
                reqs.push(Req::Eq(
                    k.clone(),
                    v.as_str().unwrap_or_default().to_string(),
                ));
            }
        }
        if let Some(exprs) = sel.get("matchExpressions").and_then(Value::as_array) {
            for e in exprs {
                let key = e
                    .get("key")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string();
                let values: Vec<String> = e
                    .get("values")
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .filter_map(|v| v.as_str().map(String::from))
                            .collect()
                    })
                    .unwrap_or_default();
                match e
                    .get("operator")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                {
                    "In" => reqs.push(Req::In(key, values)),
                    "NotIn" => reqs.push(Req::NotIn(key, values)),
                    "Exists" => reqs.push(Req::Exists(key)),
                    "DoesNotExist" => reqs.push(Req::NotExists(key)),
                    other => {
                        return Err(format!("{other:?} is not a valid label selector operator"));
                    }
                }
            }
        }
        Ok(LabelSelector(reqs))
    }
}

/// A field selector: conjunction of `path=value` / `path!=value`.
#[derive(Debug, Clone, Default)]
pub struct FieldSelector(pub Vec<(String, bool, String)>);

/// Field paths each kind supports in field selectors.
fn supported_fields(kind: &str) -> &'static [&'static str] {
    match kind {
        "Pod" => &[
            "spec.nodeName",
            "spec.restartPolicy",
            "spec.schedulerName",
            "spec.serviceAccountName",
            "status.phase",
            "status.podIP",
        ],
        "Secret" => &["type"],
        "Namespace" => &["status.phase"],
        "ReplicaSet" => &["status.replicas"],
        _ => &[],
    }
}

impl FieldSelector {
    pub fn parse(s: &str, kind: &str) -> Result<FieldSelector, String> {
        let mut out = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, neg, v) = if let Some((k, v)) = part.split_once("!=") {
                (k, true, v)
            } else if let Some((k, v)) = part.split_once("==") {
                (k, false, v)
            } else if let Some((k, v)) = part.split_once('=') {
                (k, false, v)
            } else {
                return Err(format!(
                    "invalid selector: '{s}'; can't understand '{part}'"
                ));
            };
            let k = k.trim();
            if k != "metadata.name"
                && k != "metadata.namespace"
                && !supported_fields(kind).contains(&k)
            {
                return Err(format!("field label not supported: {k}"));
            }
            out.push((k.to_string(), neg, v.trim().to_string()));
        }
        Ok(FieldSelector(out))
    }

    pub fn matches(&self, obj: &Value) -> bool {
        self.0.iter().all(|(path, neg, want)| {
            let mut cur = Some(obj);
            for seg in path.split('.') {
                cur = cur.and_then(|c| c.get(seg));
            }
            let have = match cur {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Null) | None => String::new(),
                Some(other) => other.to_string(),
            };
            (have == *want) != *neg
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parse_and_match() {
        let o = json!({"metadata": {"labels": {"app": "a", "env": "prod"}}});
        let ok = |s: &str| LabelSelector::parse(s).unwrap().matches(&o);
        assert!(ok("app=a"));
        assert!(ok("app==a,env in (prod, dev)"));
        assert!(!ok("app!=a"));
        assert!(ok("env notin (dev),app"));
        assert!(ok("!missing"));
        assert!(!ok("!app"));
        assert!(ok(""));
        assert!(LabelSelector::parse("app in prod").is_err());
        assert!(LabelSelector::parse("a=b c").is_err());
    }
}
