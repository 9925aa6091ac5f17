//! JSON merge patch (RFC 7386), strategic merge patch and JSON patch (RFC 6902).

use crate::fields::{ListKind, item_key, list_kind};
use serde_json::Value;

/// RFC 7386.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = Value::Object(Default::default());
            }
            let t = target.as_object_mut().expect("object");
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

/// Strategic merge patch: like a merge patch, but lists with a patch merge key (containers,
/// env, ports, volumes, ...) merge item by item, `$patch: delete|replace` directives are
/// honoured and other `$` directives are dropped.
pub fn strategic_merge_patch(target: &mut Value, patch: &Value, field: &str) {
    match patch {
        Value::Object(p) => {
            if p.get("$patch").and_then(Value::as_str) == Some("replace") {
                let mut clean = patch.clone();
                strip_directives(&mut clean);
                *target = clean;
                return;
            }
            if !target.is_object() {
                *target = Value::Object(Default::default());
            }
            let t = target.as_object_mut().expect("object");
            for (k, v) in p {
                if k.starts_with('$') {
                    continue;
                }
                if v.is_null() {
                    t.remove(k);
                } else {
                    let entry = t.entry(k.clone()).or_insert(Value::Null);
                    strategic_merge_patch(entry, v, k);
                }
            }
        }
        Value::Array(items) => {
            let kind = list_kind(field, items);
            let live = target.as_array().cloned().unwrap_or_default();
            match kind {
                ListKind::Keyed(keys) if live.iter().all(|i| item_key(i, keys).is_some()) => {
                    let mut out = live;
                    for it in items {
                        let k = item_key(it, keys);
                        let del = it.get("$patch").and_then(Value::as_str) == Some("delete");
                        let pos = out.iter().position(|l| item_key(l, keys) == k);
                        match (pos, del) {
                            (Some(i), true) => {
                                out.remove(i);
                            }
                            (None, true) => {}
                            (Some(i), false) => strategic_merge_patch(&mut out[i], it, ""),
                            (None, false) => {
                                let mut clean = it.clone();
                                strip_directives(&mut clean);
                                out.push(clean);
                            }
                        }
                    }
                    *target = Value::Array(out);
                }
                ListKind::Set => {
                    let mut out = live;
                    for it in items {
                        if !out.contains(it) {
                            out.push(it.clone());
                        }
                    }
                    *target = Value::Array(out);
                }
                _ => {
                    let mut clean = patch.clone();
                    strip_directives(&mut clean);
                    *target = clean;
                }
            }
        }
        other => *target = other.clone(),
    }
}

fn strip_directives(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.retain(|k, _| !k.starts_with('$'));
            m.values_mut().for_each(strip_directives);
        }
        Value::Array(a) => a.iter_mut().for_each(strip_directives),
        _ => {}
    }
}

fn unescape(tok: &str) -> String {
    tok.replace("~1", "/").replace("~0", "~")
}

fn split_pointer(ptr: &str) -> Result<Vec<String>, String> {
    if ptr.is_empty() {
        return Ok(vec![]);
    }
    let rest = ptr
        .strip_prefix('/')
        .ok_or_else(|| format!("invalid JSON pointer {ptr:?}"))?;
    Ok(rest.split('/').map(unescape).collect())
}

fn parent_mut<'a>(doc: &'a mut Value, toks: &[String]) -> Result<&'a mut Value, String> {
    let mut cur = doc;
    for t in toks {
        cur = match cur {
            Value::Object(m) => m
                .get_mut(t)
                .ok_or_else(|| format!("path element {t:?} not found"))?,
            Value::Array(a) => {
                let i: usize = t.parse().map_err(|_| format!("invalid index {t:?}"))?;
                a.get_mut(i)
                    .ok_or_else(|| format!("index {i} out of range"))?
            }
            _ => return Err(format!("cannot traverse into {t:?}")),
        };
    }
    Ok(cur)
}

fn remove(doc: &mut Value, toks: &[String]) -> Result<Value, String> {
    let (last, parent) = toks
        .split_last()
        .ok_or("cannot remove the whole document")?;
    match parent_mut(doc, parent)? {
        Value::Object(m) => m.remove(last).ok_or_else(|| format!("{last:?} not found")),
        Value::Array(a) => {
            let i: usize = last
                .parse()
                .map_err(|_| format!("invalid index {last:?}"))?;
            if i < a.len() {
                Ok(a.remove(i))
            } else {
                Err(format!("index {i} out of range"))
            }
        }
        _ => Err("cannot remove from a scalar".into()),
    }
}

fn add(doc: &mut Value, toks: &[String], value: Value) -> Result<(), String> {
    let Some((last, parent)) = toks.split_last() else {
        *doc = value;
        return Ok(());
    };
    match parent_mut(doc, parent)? {
        Value::Object(m) => {
            m.insert(last.clone(), value);
            Ok(())
        }
        Value::Array(a) => {
            if last == "-" {
                a.push(value);
                return Ok(());
            }
            let i: usize = last
                .parse()
                .map_err(|_| format!("invalid index {last:?}"))?;
            if i > a.len() {
                return Err(format!("index {i} out of range"));
            }
            a.insert(i, value);
            Ok(())
        }
        _ => Err("cannot add to a scalar".into()),
    }
}

/// RFC 6902.
pub fn json_patch(doc: &mut Value, ops: &Value) -> Result<(), String> {
    let ops = ops.as_array().ok_or("a JSON patch must be an array")?;
    for op in ops {
        let kind = op.get("op").and_then(Value::as_str).ok_or("missing op")?;
        let path = split_pointer(
            op.get("path")
                .and_then(Value::as_str)
                .ok_or("missing path")?,
        )?;
        let from = || -> Result<Vec<String>, String> {
            split_pointer(
                op.get("from")
                    .and_then(Value::as_str)
                    .ok_or("missing from")?,
            )
        };
        let value = || {
            op.get("value")
                .cloned()
                .ok_or_else(|| "missing value".to_string())
        };
        match kind {
            "add" => add(doc, &path, value()?)?,
            "remove" => {
                remove(doc, &path)?;
            }
            "replace" => {
                remove(doc, &path)?;
                add(doc, &path, value()?)?;
            }
            "move" => {
                let v = remove(doc, &from()?)?;
                add(doc, &path, v)?;
            }
            "copy" => {
                let f = from()?;
                let v = parent_mut(doc, &f)?.clone();
                add(doc, &path, v)?;
            }
            "test" => {
                if *parent_mut(doc, &path)? != value()? {
                    return Err(format!("test failed at {:?}", op.get("path")));
                }
            }
            other => return Err(format!("unknown JSON patch op {other:?}")),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn strategic_merges_containers_by_name() {
        let mut t =
            json!({"containers": [{"name": "a", "image": "1"}, {"name": "b", "image": "2"}]});
        strategic_merge_patch(
            &mut t,
            &json!({"containers": [{"name": "b", "image": "3"}, {"name": "a", "$patch": "delete"}]}),
            "",
        );
        assert_eq!(t, json!({"containers": [{"name": "b", "image": "3"}]}));
    }

    #[test]
    fn json_patch_ops() {
        let mut d = json!({"a": [1, 2], "b": {"c": 1}});
        json_patch(
            &mut d,
            &json!([{"op": "add", "path": "/a/-", "value": 3}, {"op": "replace", "path": "/b/c", "value": 2},
                    {"op": "remove", "path": "/a/0"}, {"op": "test", "path": "/b/c", "value": 2}]),
        )
        .unwrap();
        assert_eq!(d, json!({"a": [2, 3], "b": {"c": 2}}));
    }
}
