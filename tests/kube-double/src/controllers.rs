//! Simulated controllers: garbage collector, namespace lifecycle, Deployment → ReplicaSet →
//! Pod rollout, LoadBalancer provisioning and the HPA. They run synchronously after writes
//! (and lazily before reads while time-dependent work is pending), so tests observe settled
//! state deterministically.

use crate::Rollout;
use crate::registry::{DEPLOYMENTS, HPAS, NAMESPACES, PODS, REPLICASETS, SERVICES, TYPES};
use crate::store::{Key, Managed, Store, Sub, meta_str};
use crate::util::{canonical_json, fnv32a, get_i64, get_str, obj_path, parse_rfc3339, safe_encode};
use serde_json::{Map, Value, json};
use std::collections::HashSet;

const HASH_LABEL: &str = "pod-template-hash";
const REVISION: &str = "deployment.kubernetes.io/revision";
const MANAGER: &str = "kube-controller-manager";

/// `pod-template-hash` of a pod template.
pub fn template_hash(template: &Value) -> String {
    safe_encode(&fnv32a(canonical_json(template).as_bytes()).to_string())
}

fn uid_of(v: &Value) -> String {
    meta_str(v, "uid").unwrap_or_default().to_string()
}

fn controller_uid(v: &Value) -> Option<String> {
    v.pointer("/metadata/ownerReferences")?
        .as_array()?
        .iter()
        .find(|r| r.get("controller") == Some(&json!(true)))
        .and_then(|r| r.get("uid")?.as_str().map(String::from))
}

/// Kept on a LoadBalancer Service until its cloud load balancer is deleted.
pub const LB_FINALIZER: &str = "service.kubernetes.io/load-balancer-cleanup";

fn deleting(v: &Value) -> bool {
    v.pointer("/metadata/deletionTimestamp").is_some()
}

fn finalizers(v: &Value) -> Vec<String> {
    v.pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

fn set_finalizers(v: &mut Value, f: &[String]) {
    let meta = obj_path(v, &["metadata"]);
    if f.is_empty() {
        meta.remove("finalizers");
    } else {
        meta.insert("finalizers".into(), json!(f));
    }
}

fn owner_ref(kind: &str, name: &str, uid: &str) -> Value {
    json!({"apiVersion": "apps/v1", "kind": kind, "name": name, "uid": uid,
           "controller": true, "blockOwnerDeletion": true})
}

/// Sets a condition, keeping timestamps when nothing changed. `update_time` adds the
/// Deployment-style `lastUpdateTime`.
fn set_condition(
    conds: &mut Vec<Value>,
    ty: &str,
    status: &str,
    reason: &str,
    message: &str,
    now: &str,
    update_time: bool,
) {
    let mut c = json!({"type": ty, "status": status, "reason": reason, "message": message,
                       "lastTransitionTime": now});
    if update_time {
        c["lastUpdateTime"] = json!(now);
    }
    match conds
        .iter_mut()
        .find(|x| x.get("type").and_then(Value::as_str) == Some(ty))
    {
        Some(old) => {
            let same_status = old.get("status") == c.get("status");
            if same_status
                && old.get("reason") == c.get("reason")
                && old.get("message") == c.get("message")
            {
                return;
            }
            if same_status && let Some(t) = old.get("lastTransitionTime") {
                c["lastTransitionTime"] = t.clone();
            }
            *old = c;
        }
        None => conds.push(c),
    }
}

/// Resolves an int-or-percent against `total` (`round_up` for maxSurge).
fn int_or_percent(v: Option<&Value>, total: i64, default_pct: i64, round_up: bool) -> i64 {
    let pct = |p: i64| {
        if round_up {
            (total * p + 99) / 100
        } else {
            total * p / 100
        }
    };
    match v {
        Some(Value::Number(n)) => n.as_i64().unwrap_or(0),
        Some(Value::String(s)) => s.trim_end_matches('%').parse::<i64>().map(pct).unwrap_or(0),
        _ => pct(default_pct),
    }
}

fn put_status(map: &mut Map<String, Value>, k: &str, n: i64) {
    if n != 0 {
        map.insert(k.into(), json!(n));
    }
}

impl Store {
    /// Runs the controllers until nothing changes.
    pub fn reconcile(&mut self) {
        if !self.dirty && !self.timed {
            return;
        }
        self.timed = false;
        for _ in 0..50 {
            self.dirty = false;
            self.gc();
            self.namespace_controller();
            self.deployment_controller();
            self.replicaset_controller();
            self.service_controller();
            self.hpa_controller();
            if !self.dirty {
                break;
            }
        }
        self.dirty = false;
    }

    fn dependents(&self, uid: &str) -> Vec<Key> {
        self.objects
            .iter()
            .filter(|(_, v)| {
                v.pointer("/metadata/ownerReferences")
                    .and_then(Value::as_array)
                    .is_some_and(|refs| {
                        refs.iter()
                            .any(|r| r.get("uid").and_then(Value::as_str) == Some(uid))
                    })
            })
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Garbage collector: foreground/orphan finalizers, and dependents whose owners are gone.
    fn gc(&mut self) {
        let uids: HashSet<String> = self.objects.values().map(uid_of).collect();
        let keys: Vec<Key> = self.objects.keys().cloned().collect();
        for key in keys {
            let Some(obj) = self.objects.get(&key).cloned() else {
                continue;
            };
            if key.0 == NAMESPACES {
                continue;
            }
            if deleting(&obj) {
                let mut fins = finalizers(&obj);
                let uid = uid_of(&obj);
                if fins.iter().any(|f| f == "foregroundDeletion") {
                    let deps = self.dependents(&uid);
                    if deps.is_empty() {
                        fins.retain(|f| f != "foregroundDeletion");
                    } else {
                        for d in deps {
                            if self.objects.get(&d).is_some_and(|v| !deleting(v)) {
                                self.delete_key(&d, "Foreground");
                            }
                        }
                    }
                }
                if fins.iter().any(|f| f == "orphan") {
                    for d in self.dependents(&uid) {
                        if let Some(mut dv) = self.objects.get(&d).cloned() {
                            if let Some(refs) = dv
                                .pointer_mut("/metadata/ownerReferences")
                                .and_then(Value::as_array_mut)
                            {
                                refs.retain(|r| {
                                    r.get("uid").and_then(Value::as_str) != Some(uid.as_str())
                                });
                                if refs.is_empty() {
                                    obj_path(&mut dv, &["metadata"]).remove("ownerReferences");
                                }
                            }
                            self.put(d, dv);
                        }
                    }
                    fins.retain(|f| f != "orphan");
                }
                if fins.is_empty() {
                    self.objects.remove(&key);
                    self.dirty = true;
                } else if fins != finalizers(&obj) {
                    let mut o = obj.clone();
                    set_finalizers(&mut o, &fins);
                    self.put(key, o);
                }
                continue;
            }
            if let Some(refs) = obj
                .pointer("/metadata/ownerReferences")
                .and_then(Value::as_array)
                && !refs.is_empty()
                && refs.iter().all(|r| {
                    !r.get("uid")
                        .and_then(Value::as_str)
                        .is_some_and(|u| uids.contains(u))
                })
            {
                self.delete_key(&key, "Background");
            }
        }
    }

    fn namespace_controller(&mut self) {
        let terminating: Vec<(Key, Value)> = self
            .of_type(NAMESPACES)
            .filter(|(_, v)| deleting(v))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (key, ns) in terminating {
            let name = key.2.clone();
            let content: Vec<Key> = self
                .objects
                .keys()
                .filter(|k| TYPES[k.0].namespaced && k.1 == name)
                .cloned()
                .collect();
            for k in &content {
                if self.objects.get(k).is_some_and(|v| !deleting(v)) {
                    self.delete_key(k, "Background");
                }
            }
            if content.iter().any(|k| self.objects.contains_key(k)) {
                continue;
            }
            if finalizers(&ns).is_empty() {
                self.objects.remove(&key);
                self.dirty = true;
            } else {
                let mut n = ns.clone();
                obj_path(&mut n, &["spec"]).insert("finalizers".into(), json!([]));
                self.put(key, n);
            }
        }
    }

    fn owned_by(&self, ti: usize, ns: &str, uid: &str) -> Vec<(Key, Value)> {
        self.of_type(ti)
            .filter(|(k, v)| k.1 == ns && controller_uid(v).as_deref() == Some(uid))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    fn deployment_controller(&mut self) {
        let deps: Vec<(Key, Value)> = self
            .of_type(DEPLOYMENTS)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let now = self.now_str();
        for (key, d) in deps {
            if deleting(&d) {
                continue;
            }
            let (ns, name) = (key.1.clone(), key.2.clone());
            let uid = uid_of(&d);
            let spec = d.get("spec").cloned().unwrap_or(json!({}));
            let replicas = get_i64(&spec, &["replicas"]).unwrap_or(1);
            let template = spec.get("template").cloned().unwrap_or(json!({}));
            let hash = template_hash(&template);
            let paused = spec.get("paused") == Some(&json!(true));
            let recreate = get_str(&spec, &["strategy", "type"]) == Some("Recreate");
            let max_surge = if recreate {
                0
            } else {
                int_or_percent(
                    spec.pointer("/strategy/rollingUpdate/maxSurge"),
                    replicas,
                    25,
                    true,
                )
            };
            let mut max_unavailable = if recreate {
                0
            } else {
                int_or_percent(
                    spec.pointer("/strategy/rollingUpdate/maxUnavailable"),
                    replicas,
                    25,
                    false,
                )
            };
            if !recreate && max_surge == 0 && max_unavailable == 0 {
                max_unavailable = 1;
            }
            let revision_of = |v: &Value| -> i64 {
                v.pointer("/metadata/annotations")
                    .and_then(|a| a.get(REVISION))
                    .and_then(Value::as_str)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0)
            };
            let owned = self.owned_by(REPLICASETS, &ns, &uid);
            let max_rev = owned.iter().map(|(_, v)| revision_of(v)).max().unwrap_or(0);
            let existing = owned
                .iter()
                .find(|(_, v)| {
                    v.pointer("/metadata/labels")
                        .and_then(|l| l.get(HASH_LABEL))
                        .and_then(Value::as_str)
                        == Some(hash.as_str())
                })
                .cloned();
            let mut created_new = false;
            let new_key: Option<Key> = match existing {
                Some((k, rs)) => {
                    let mut rs2 = rs.clone();
                    if !paused {
                        obj_path(&mut rs2, &["spec"]).insert("replicas".into(), json!(replicas));
                        let ann = obj_path(&mut rs2, &["metadata", "annotations"]);
                        ann.insert(
                            "deployment.kubernetes.io/desired-replicas".into(),
                            json!(replicas.to_string()),
                        );
                        ann.insert(
                            "deployment.kubernetes.io/max-replicas".into(),
                            json!((replicas + max_surge).to_string()),
                        );
                        if revision_of(&rs) < max_rev {
                            ann.insert(REVISION.into(), json!((max_rev + 1).to_string()));
                        }
                        if rs2 != rs {
                            let old = rs.clone();
                            let _ = self.write(
                                REPLICASETS,
                                &ns,
                                &k.2,
                                Some(&old),
                                rs2,
                                Managed::Update(MANAGER.into()),
                                Sub::Main,
                                false,
                            );
                        }
                    }
                    Some(k)
                }
                None if paused => None,
                None => {
                    let rs_name = format!("{name}-{hash}");
                    let mut labels = template
                        .pointer("/metadata/labels")
                        .cloned()
                        .unwrap_or(json!({}));
                    labels[HASH_LABEL] = json!(hash);
                    let mut tmpl = template.clone();
                    obj_path(&mut tmpl, &["metadata", "labels"])
                        .insert(HASH_LABEL.into(), json!(hash));
                    let mut selector = spec.get("selector").cloned().unwrap_or(json!({}));
                    obj_path(&mut selector, &["matchLabels"])
                        .insert(HASH_LABEL.into(), json!(hash));
                    let mut rs_spec =
                        json!({"replicas": replicas, "selector": selector, "template": tmpl});
                    if let Some(m) = spec.get("minReadySeconds") {
                        rs_spec["minReadySeconds"] = m.clone();
                    }
                    let rs = json!({
                        "metadata": {"name": rs_name, "namespace": ns, "labels": labels,
                            "annotations": {"deployment.kubernetes.io/desired-replicas": replicas.to_string(),
                                            "deployment.kubernetes.io/max-replicas": (replicas + max_surge).to_string(),
                                            REVISION: (max_rev + 1).to_string()},
                            "ownerReferences": [owner_ref("Deployment", &name, &uid)]},
                        "spec": rs_spec,
                    });
                    match self.write(
                        REPLICASETS,
                        &ns,
                        &rs_name,
                        None,
                        rs,
                        Managed::Update(MANAGER.into()),
                        Sub::Main,
                        false,
                    ) {
                        Ok(_) => {
                            created_new = true;
                            Some(Store::key(REPLICASETS, &ns, &rs_name))
                        }
                        Err(_) => None,
                    }
                }
            };
            let new_rs = new_key.as_ref().and_then(|k| self.objects.get(k).cloned());
            // Old ReplicaSets go to zero once the new one is fully available (immediately for Recreate).
            let new_available = new_rs
                .as_ref()
                .map(|rs| get_i64(rs, &["status", "availableReplicas"]).unwrap_or(0))
                .unwrap_or(0);
            if !paused && new_rs.is_some() && (recreate || new_available >= replicas) {
                for (k, rs) in self.owned_by(REPLICASETS, &ns, &uid) {
                    if Some(&k) != new_key.as_ref()
                        && get_i64(&rs, &["spec", "replicas"]) != Some(0)
                    {
                        let mut rs2 = rs.clone();
                        obj_path(&mut rs2, &["spec"]).insert("replicas".into(), json!(0));
                        let _ = self.write(
                            REPLICASETS,
                            &ns,
                            &k.2,
                            Some(&rs),
                            rs2,
                            Managed::Update(MANAGER.into()),
                            Sub::Main,
                            false,
                        );
                    }
                }
            }
            // Revision history limit.
            let limit = get_i64(&spec, &["revisionHistoryLimit"])
                .unwrap_or(10)
                .max(0) as usize;
            let mut old_idle: Vec<(i64, Key)> = self
                .owned_by(REPLICASETS, &ns, &uid)
                .into_iter()
                .filter(|(k, rs)| {
                    Some(k) != new_key.as_ref()
                        && get_i64(rs, &["spec", "replicas"]) == Some(0)
                        && get_i64(rs, &["status", "replicas"]).unwrap_or(0) == 0
                        && !deleting(rs)
                })
                .map(|(k, rs)| (revision_of(&rs), k))
                .collect();
            if old_idle.len() > limit {
                old_idle.sort();
                let n = old_idle.len() - limit;
                for (_, k) in old_idle.into_iter().take(n) {
                    self.delete_key(&k, "Background");
                }
            }
            // Status.
            let Some(mut cur) = self.objects.get(&key).cloned() else {
                continue;
            };
            let all = self.owned_by(REPLICASETS, &ns, &uid);
            let sum = |f: &str| {
                all.iter()
                    .map(|(_, rs)| get_i64(rs, &["status", f]).unwrap_or(0))
                    .sum::<i64>()
            };
            let total = sum("replicas");
            let ready = sum("readyReplicas");
            let available = sum("availableReplicas");
            let updated = new_rs
                .as_ref()
                .and(new_key.as_ref())
                .and_then(|k| self.objects.get(k))
                .map(|rs| get_i64(rs, &["status", "replicas"]).unwrap_or(0))
                .unwrap_or(0);
            let new_rs_name = new_key.as_ref().map(|k| k.2.clone()).unwrap_or_default();
            let old_status = cur.get("status").cloned().unwrap_or(json!({}));
            let mut conds: Vec<Value> = old_status
                .get("conditions")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let min_available = replicas - max_unavailable;
            if available >= min_available {
                set_condition(
                    &mut conds,
                    "Available",
                    "True",
                    "MinimumReplicasAvailable",
                    "Deployment has minimum availability.",
                    &now,
                    true,
                );
            } else {
                set_condition(
                    &mut conds,
                    "Available",
                    "False",
                    "MinimumReplicasUnavailable",
                    "Deployment does not have minimum availability.",
                    &now,
                    true,
                );
            }
            let complete = updated == replicas && total == replicas && available >= replicas;
            let progress_made = ["updatedReplicas", "readyReplicas", "availableReplicas"]
                .iter()
                .zip([updated, ready, available])
                .any(|(f, n)| n > get_i64(&old_status, &[f]).unwrap_or(0));
            let prog = conds.iter().find(|c| c["type"] == "Progressing").cloned();
            let prog_msg_rs = |c: &Value| {
                c.get("message")
                    .and_then(Value::as_str)
                    .is_some_and(|m| m.contains(&format!("\"{new_rs_name}\"")))
            };
            if paused {
                set_condition(
                    &mut conds,
                    "Progressing",
                    "Unknown",
                    "DeploymentPaused",
                    "Deployment is paused",
                    &now,
                    true,
                );
            } else if complete {
                set_condition(
                    &mut conds,
                    "Progressing",
                    "True",
                    "NewReplicaSetAvailable",
                    &format!("ReplicaSet \"{new_rs_name}\" has successfully progressed."),
                    &now,
                    true,
                );
            } else if created_new {
                set_condition(
                    &mut conds,
                    "Progressing",
                    "True",
                    "NewReplicaSetCreated",
                    &format!("Created new replica set \"{new_rs_name}\""),
                    &now,
                    true,
                );
                self.timed = true;
            } else if prog
                .as_ref()
                .is_some_and(|c| c["reason"] == "ProgressDeadlineExceeded" && prog_msg_rs(c))
            {
                // Stays failed until a new rollout starts.
            } else {
                let deadline = get_i64(&spec, &["progressDeadlineSeconds"]).unwrap_or(600);
                let last = prog
                    .as_ref()
                    .and_then(|c| c.get("lastUpdateTime"))
                    .and_then(Value::as_str)
                    .and_then(parse_rfc3339)
                    .unwrap_or_else(|| self.now());
                let msg = format!("ReplicaSet \"{new_rs_name}\" is progressing.");
                if progress_made || prog.as_ref().is_none_or(|c| !prog_msg_rs(c)) {
                    if let Some(c) = conds.iter_mut().find(|c| c["type"] == "Progressing")
                        && progress_made
                    {
                        c["lastUpdateTime"] = json!(now);
                    }
                    set_condition(
                        &mut conds,
                        "Progressing",
                        "True",
                        "ReplicaSetUpdated",
                        &msg,
                        &now,
                        true,
                    );
                    self.timed = true;
                } else if self.now() - last > deadline {
                    set_condition(
                        &mut conds,
                        "Progressing",
                        "False",
                        "ProgressDeadlineExceeded",
                        &format!("ReplicaSet \"{new_rs_name}\" has timed out progressing."),
                        &now,
                        true,
                    );
                } else {
                    self.timed = true;
                }
            }
            conds.sort_by_key(|c| if c["type"] == "Available" { 0 } else { 1 });
            let mut st = Map::new();
            st.insert(
                "observedGeneration".into(),
                json!(get_i64(&cur, &["metadata", "generation"]).unwrap_or(1)),
            );
            put_status(&mut st, "replicas", total);
            put_status(&mut st, "updatedReplicas", updated);
            put_status(&mut st, "readyReplicas", ready);
            put_status(&mut st, "availableReplicas", available);
            put_status(
                &mut st,
                "unavailableReplicas",
                (replicas - available).max(0),
            );
            st.insert("conditions".into(), Value::Array(conds));
            cur["status"] = Value::Object(st);
            if let Some(rs) = new_rs
                .as_ref()
                .and(new_key.as_ref())
                .and_then(|k| self.objects.get(k))
            {
                let rev = rs
                    .pointer("/metadata/annotations")
                    .and_then(|a| a.get(REVISION))
                    .cloned();
                if let Some(rev) = rev {
                    obj_path(&mut cur, &["metadata", "annotations"]).insert(REVISION.into(), rev);
                }
            }
            self.put(key, cur);
        }
    }

    /// The failure mode for the pods of a ReplicaSet, and whether it is its Deployment's
    /// current one (only those follow the mode; older ones keep the state they had).
    fn rs_mode(&self, ns: &str, rs: &Value) -> (Rollout, bool) {
        let Some(owner) = rs
            .pointer("/metadata/ownerReferences")
            .and_then(Value::as_array)
            .and_then(|a| a.iter().find(|r| r["kind"] == "Deployment"))
        else {
            return (Rollout::Ready, true);
        };
        let dname = owner
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let Some(d) = self.get_obj(DEPLOYMENTS, ns, dname) else {
            return (Rollout::Ready, false);
        };
        let hash = template_hash(d.pointer("/spec/template").unwrap_or(&json!({})));
        let current = rs
            .pointer("/metadata/labels")
            .and_then(|l| l.get(HASH_LABEL))
            .and_then(Value::as_str)
            == Some(hash.as_str());
        let image_mode = rs
            .pointer("/spec/template/spec/containers")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|c| c.get("image").and_then(Value::as_str))
            .find_map(|img| self.image_rollouts.get(img).copied());
        let mode = image_mode
            .or_else(|| {
                self.rollouts
                    .get(&(ns.to_string(), dname.to_string()))
                    .copied()
            })
            .unwrap_or_default();
        (mode, current)
    }

    fn replicaset_controller(&mut self) {
        let rss: Vec<(Key, Value)> = self
            .of_type(REPLICASETS)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (key, rs) in rss {
            if deleting(&rs) {
                continue;
            }
            let ns = key.1.clone();
            let uid = uid_of(&rs);
            let desired = get_i64(&rs, &["spec", "replicas"]).unwrap_or(1).max(0) as usize;
            let (mode, current) = self.rs_mode(&ns, &rs);
            let mut pods: Vec<(Key, Value)> = self
                .owned_by(PODS, &ns, &uid)
                .into_iter()
                .filter(|(_, p)| !deleting(p))
                .collect();
            pods.sort_by(|a, b| {
                meta_str(&a.1, "creationTimestamp")
                    .cmp(&meta_str(&b.1, "creationTimestamp"))
                    .then(a.0.cmp(&b.0))
            });
            while pods.len() > desired {
                let (k, _) = pods.pop().expect("non-empty");
                self.objects.remove(&k);
                self.dirty = true;
            }
            for _ in pods.len()..desired {
                let pname = format!("{}-{}", key.2, self.rng.suffix());
                let mut pod = json!({
                    "metadata": {"name": pname, "namespace": ns, "generateName": format!("{}-", key.2),
                        "labels": rs.pointer("/spec/template/metadata/labels").cloned().unwrap_or(json!({})),
                        "ownerReferences": [owner_ref("ReplicaSet", &key.2, &uid)]},
                    "spec": rs.pointer("/spec/template/spec").cloned().unwrap_or(json!({})),
                });
                if let Some(a) = rs.pointer("/spec/template/metadata/annotations") {
                    pod["metadata"]["annotations"] = a.clone();
                }
                let spec = obj_path(&mut pod, &["spec"]);
                spec.insert("nodeName".into(), json!("kube-double-node"));
                spec.entry("serviceAccountName").or_insert(json!("default"));
                spec.entry("serviceAccount").or_insert(json!("default"));
                spec.entry("enableServiceLinks").or_insert(json!(true));
                spec.entry("priority").or_insert(json!(0));
                spec.entry("preemptionPolicy")
                    .or_insert(json!("PreemptLowerPriority"));
                if let Ok(mut p) = self.write(
                    PODS,
                    &ns,
                    &pname,
                    None,
                    pod,
                    Managed::Update(MANAGER.into()),
                    Sub::Main,
                    false,
                ) {
                    let pk = Store::key(PODS, &ns, &pname);
                    p["status"] = self.pod_status(mode, &p);
                    self.put(pk.clone(), p.clone());
                    pods.push((pk, p));
                }
            }
            let mut ready = 0;
            for (k, p) in &pods {
                let mut p2 = p.clone();
                if current {
                    p2["status"] = self.pod_status(mode, p);
                    self.put(k.clone(), p2.clone());
                }
                let is_ready = p2
                    .pointer("/status/conditions")
                    .and_then(Value::as_array)
                    .is_some_and(|c| {
                        c.iter()
                            .any(|c| c["type"] == "Ready" && c["status"] == "True")
                    });
                if is_ready {
                    ready += 1;
                }
            }
            let Some(mut cur) = self.objects.get(&key).cloned() else {
                continue;
            };
            let mut st = Map::new();
            st.insert("replicas".into(), json!(pods.len()));
            put_status(&mut st, "fullyLabeledReplicas", pods.len() as i64);
            put_status(&mut st, "readyReplicas", ready);
            put_status(&mut st, "availableReplicas", ready);
            st.insert(
                "observedGeneration".into(),
                json!(get_i64(&cur, &["metadata", "generation"]).unwrap_or(1)),
            );
            cur["status"] = Value::Object(st);
            self.put(key, cur);
        }
    }

    /// Status of a simulated pod in the given mode (timestamps derive from its creation, so
    /// recomputing it is stable).
    pub fn pod_status(&mut self, mode: Rollout, pod: &Value) -> Value {
        let created_s = meta_str(pod, "creationTimestamp")
            .unwrap_or_default()
            .to_string();
        let created = parse_rfc3339(&created_s).unwrap_or_else(|| self.now());
        let starting = mode == Rollout::Ready && self.now() < created + self.rollout_delay;
        if starting {
            self.timed = true;
        }
        let h = fnv32a(meta_str(pod, "uid").unwrap_or_default().as_bytes());
        let pod_ip = format!("10.244.{}.{}", (h >> 8) & 0xff, (h & 0xff).max(2));
        let pod_name = meta_str(pod, "name").unwrap_or_default();
        let ns = meta_str(pod, "namespace").unwrap_or_default();
        let containers: Vec<Value> = pod
            .pointer("/spec/containers")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let names: Vec<&str> = containers
            .iter()
            .filter_map(|c| c.get("name").and_then(Value::as_str))
            .collect();
        let cond = |ty: &str, ok: bool, reason: Option<&str>, msg: Option<String>| {
            let mut c = json!({"type": ty, "status": if ok { "True" } else { "False" }, "lastTransitionTime": created_s});
            if let Some(r) = reason {
                c["reason"] = json!(r);
            }
            if let Some(m) = msg {
                c["message"] = json!(m);
            }
            c
        };
        let unready_msg = Some(format!(
            "containers with unready status: [{}]",
            names.join(" ")
        ));
        if mode == Rollout::Pending {
            return json!({"phase": "Pending", "qosClass": "BestEffort", "conditions": [
                cond("PodScheduled", false, Some("Unschedulable"),
                     Some("0/1 nodes are available: 1 Insufficient cpu. preemption: 0/1 nodes are available: 1 No preemption victims found for incoming pod.".into()))]});
        }
        let statuses: Vec<Value> = containers
            .iter()
            .map(|c| {
                let name = c.get("name").and_then(Value::as_str).unwrap_or_default();
                let image = c.get("image").and_then(Value::as_str).unwrap_or_default();
                let image_id = if image.contains('@') { image.to_string() } else { format!("{image}@sha256:{:064x}", fnv32a(image.as_bytes())) };
                let cid = format!("containerd://{:016x}{:016x}", fnv32a(format!("{pod_name}/{name}").as_bytes()), h);
                let mut s = json!({"name": name, "image": image, "imageID": "", "ready": false, "started": false, "restartCount": 0});
                if starting {
                    s["state"] = json!({"waiting": {"reason": "ContainerCreating"}});
                    return s;
                }
                match mode {
                    Rollout::Ready => {
                        s["ready"] = json!(true);
                        s["started"] = json!(true);
                        s["imageID"] = json!(image_id);
                        s["containerID"] = json!(cid);
                        s["state"] = json!({"running": {"startedAt": created_s}});
                    }
                    Rollout::ImagePullBackOff => {
                        s["state"] = json!({"waiting": {"reason": "ImagePullBackOff",
                            "message": format!("Back-off pulling image \"{image}\": ErrImagePull: failed to pull and unpack image \"{image}\": not found")}});
                    }
                    Rollout::CrashLoop | Rollout::Pending => {
                        s["imageID"] = json!(image_id);
                        s["containerID"] = json!(cid);
                        s["restartCount"] = json!(5);
                        s["state"] = json!({"waiting": {"reason": "CrashLoopBackOff",
                            "message": format!("back-off 2m40s restarting failed container={name} pod={pod_name}_{ns}({})", meta_str(pod, "uid").unwrap_or_default())}});
                        s["lastState"] = json!({"terminated": {"exitCode": 1, "reason": "Error", "startedAt": created_s, "finishedAt": created_s, "containerID": cid}});
                    }
                }
                s
            })
            .collect();
        let ready = mode == Rollout::Ready && !starting;
        let phase = if mode == Rollout::CrashLoop || ready {
            "Running"
        } else {
            "Pending"
        };
        let (r_reason, r_msg) = if ready {
            (None, None)
        } else {
            (Some("ContainersNotReady"), unready_msg)
        };
        json!({
            "phase": phase, "hostIP": "127.0.0.1", "hostIPs": [{"ip": "127.0.0.1"}],
            "podIP": pod_ip, "podIPs": [{"ip": pod_ip}], "startTime": created_s, "qosClass": "BestEffort",
            "conditions": [
                cond("PodReadyToStartContainers", !starting, None, None),
                cond("Initialized", true, None, None),
                cond("Ready", ready, r_reason, r_msg.clone()),
                cond("ContainersReady", ready, r_reason, r_msg),
                cond("PodScheduled", true, None, None),
            ],
            "containerStatuses": statuses,
        })
    }

    /// LoadBalancer Services get an address after `lb_delay` and, like the
    /// real service controller, the finalizer
    /// `service.kubernetes.io/load-balancer-cleanup`: deleting one leaves it
    /// (with a `deletionTimestamp`) until the cloud load balancer is gone,
    /// `lb_delay` later.
    fn service_controller(&mut self) {
        let svcs: Vec<(Key, Value)> = self
            .of_type(SERVICES)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (key, svc) in svcs {
            let is_lb = get_str(&svc, &["spec", "type"]) == Some("LoadBalancer");
            let has_ingress = svc.pointer("/status/loadBalancer/ingress").is_some();
            let mut fins = finalizers(&svc);
            let has_fin = fins.iter().any(|f| f == LB_FINALIZER);
            let mut s2 = svc.clone();
            if deleting(&svc) {
                if has_fin {
                    let since = meta_str(&svc, "deletionTimestamp")
                        .and_then(parse_rfc3339)
                        .unwrap_or(0);
                    if self.now() >= since + self.lb_delay {
                        fins.retain(|f| f != LB_FINALIZER);
                        set_finalizers(&mut s2, &fins);
                    } else {
                        self.timed = true;
                    }
                }
            } else if is_lb {
                if !has_fin {
                    fins.push(LB_FINALIZER.to_string());
                    set_finalizers(&mut s2, &fins);
                }
                if !has_ingress {
                    let created = meta_str(&svc, "creationTimestamp")
                        .and_then(parse_rfc3339)
                        .unwrap_or(0);
                    if self.now() >= created + self.lb_delay {
                        s2["status"] = json!({"loadBalancer": {"ingress": [{"hostname": format!("{}-{}.lb.kube-double.local", key.2, key.1)}]}});
                    } else {
                        self.timed = true;
                    }
                }
            } else {
                if has_ingress {
                    s2["status"] = json!({"loadBalancer": {}});
                }
                if has_fin {
                    fins.retain(|f| f != LB_FINALIZER);
                    set_finalizers(&mut s2, &fins);
                }
            }
            if s2 != svc {
                self.put(key, s2);
            }
        }
    }

    fn hpa_controller(&mut self) {
        let hpas: Vec<(Key, Value)> = self
            .of_type(HPAS)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let now = self.now_str();
        for (key, hpa) in hpas {
            if deleting(&hpa) {
                continue;
            }
            let ns = key.1.clone();
            let kind = get_str(&hpa, &["spec", "scaleTargetRef", "kind"])
                .unwrap_or_default()
                .to_string();
            let tname = get_str(&hpa, &["spec", "scaleTargetRef", "name"])
                .unwrap_or_default()
                .to_string();
            let min = get_i64(&hpa, &["spec", "minReplicas"]).unwrap_or(1);
            let max = get_i64(&hpa, &["spec", "maxReplicas"]).unwrap_or(min);
            let ti = match kind.as_str() {
                "Deployment" => Some(DEPLOYMENTS),
                "ReplicaSet" => Some(REPLICASETS),
                _ => None,
            };
            let target = ti.and_then(|ti| self.get_obj(ti, &ns, &tname).cloned());
            let mut st = hpa.get("status").cloned().unwrap_or(json!({}));
            let mut conds: Vec<Value> = st
                .get("conditions")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            match (ti, target) {
                (Some(ti), Some(t)) => {
                    let current = get_i64(&t, &["spec", "replicas"]).unwrap_or(1);
                    let desired = if current == 0 {
                        0
                    } else {
                        current.clamp(min, max)
                    };
                    if desired != current {
                        let _ = self.set_replicas(ti, &ns, &tname, desired, MANAGER.into(), false);
                        st["lastScaleTime"] = json!(now);
                    }
                    st["currentReplicas"] =
                        json!(get_i64(&t, &["status", "replicas"]).unwrap_or(current));
                    st["desiredReplicas"] = json!(desired);
                    set_condition(
                        &mut conds,
                        "AbleToScale",
                        "True",
                        "ReadyForNewScale",
                        "recommended size matches current size",
                        &now,
                        false,
                    );
                    if current == 0 {
                        set_condition(
                            &mut conds,
                            "ScalingActive",
                            "False",
                            "ScalingDisabled",
                            "scaling is disabled since the replica count of the target is zero",
                            &now,
                            false,
                        );
                    } else {
                        set_condition(
                            &mut conds,
                            "ScalingActive",
                            "False",
                            "FailedGetResourceMetric",
                            "the HPA was unable to compute the replica count: failed to get cpu utilization: unable to get metrics for resource cpu: no metrics returned from resource metrics API",
                            &now,
                            false,
                        );
                    }
                    if current < min {
                        set_condition(
                            &mut conds,
                            "ScalingLimited",
                            "True",
                            "TooFewReplicas",
                            "the desired replica count is less than the minimum replica count",
                            &now,
                            false,
                        );
                    } else if current > max {
                        set_condition(
                            &mut conds,
                            "ScalingLimited",
                            "True",
                            "TooManyReplicas",
                            "the desired replica count is more than the maximum replica count",
                            &now,
                            false,
                        );
                    } else {
                        set_condition(
                            &mut conds,
                            "ScalingLimited",
                            "False",
                            "DesiredWithinRange",
                            "the desired count is within the acceptable range",
                            &now,
                            false,
                        );
                    }
                }
                _ => {
                    st["currentReplicas"] = json!(0);
                    st["desiredReplicas"] = json!(0);
                    let plural = ti
                        .map(|t| crate::status::qualified(TYPES[t].group, TYPES[t].plural))
                        .unwrap_or_else(|| kind.to_lowercase());
                    set_condition(
                        &mut conds,
                        "AbleToScale",
                        "False",
                        "FailedGetScale",
                        &format!(
                            "the HPA controller was unable to get the target's current scale: {plural} \"{tname}\" not found"
                        ),
                        &now,
                        false,
                    );
                }
            }
            st["conditions"] = Value::Array(conds);
            if let Some(g) = hpa.pointer("/metadata/generation") {
                st["observedGeneration"] = g.clone();
            }
            if Some(&st) != hpa.get("status") {
                let mut h2 = hpa.clone();
                h2["status"] = st;
                self.put(key, h2);
            }
        }
    }
}
