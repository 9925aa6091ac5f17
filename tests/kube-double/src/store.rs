//! The object store and the write pipeline every request goes through.

use crate::Rollout;
use crate::fields::{self, FieldSet, Scope};
use crate::kinds;
use crate::patch;
use crate::registry::{NAMESPACES, NODES, SERVICES, TYPES};
use crate::selector::{FieldSelector, LabelSelector};
use crate::status::{ApiError, ApiResult, Errs};
use crate::util::{self, Rng, get_str, obj_path, rfc3339, strip_nulls};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::SystemTime;

/// (resource type index, namespace or "" for cluster-scoped, name)
pub type Key = (usize, String, String);

/// Which endpoint of the object a write came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sub {
    Main,
    Status,
    Scale,
}

impl Sub {
    fn name(self) -> Option<&'static str> {
        match self {
            Sub::Main => None,
            Sub::Status => Some("status"),
            Sub::Scale => Some("scale"),
        }
    }
    fn scope(self, ti: usize) -> Scope {
        match self {
            Sub::Status => Scope::Status,
            _ => Scope::Main {
                skip_status: TYPES[ti].status_sub,
            },
        }
    }
}

/// One `metadata.managedFields` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub manager: String,
    pub operation: String,
    pub api_version: String,
    pub time: String,
    pub subresource: Option<String>,
    pub set: FieldSet,
}

pub fn parse_entries(obj: &Value) -> Vec<Entry> {
    let Some(list) = obj
        .pointer("/metadata/managedFields")
        .and_then(Value::as_array)
    else {
        return vec![];
    };
    list.iter()
        .map(|e| Entry {
            manager: get_str(e, &["manager"]).unwrap_or_default().to_string(),
            operation: get_str(e, &["operation"]).unwrap_or_default().to_string(),
            api_version: get_str(e, &["apiVersion"]).unwrap_or_default().to_string(),
            time: get_str(e, &["time"]).unwrap_or_default().to_string(),
            subresource: get_str(e, &["subresource"]).map(String::from),
            set: e
                .get("fieldsV1")
                .map(fields::from_fields_v1)
                .unwrap_or_default(),
        })
        .collect()
}

fn entries_json(entries: &[Entry]) -> Value {
    Value::Array(
        entries
            .iter()
            .map(|e| {
                let mut v = json!({
                    "manager": e.manager, "operation": e.operation, "apiVersion": e.api_version,
                    "time": e.time, "fieldsType": "FieldsV1", "fieldsV1": fields::to_fields_v1(&e.set),
                });
                if let Some(s) = &e.subresource {
                    v["subresource"] = json!(s);
                }
                v
            })
            .collect(),
    )
}

/// How a write updates `managedFields`.
pub enum Managed {
    /// A non-apply write by this manager: it takes over the fields it changed.
    Update(String),
    /// Server-side apply: the complete new list, computed by [`Store::apply`].
    Apply(Vec<Entry>),
}

#[derive(Debug, Default, Clone)]
pub struct DeleteOpts {
    pub propagation: Option<String>,
    pub uid: Option<String>,
    pub resource_version: Option<String>,
    pub dry_run: bool,
}

/// The whole state of the simulated cluster.
pub struct Store {
    pub objects: BTreeMap<Key, Value>,
    pub rv: u64,
    pub rng: Rng,
    pub clock_offset: i64,
    pub rollouts: HashMap<(String, String), Rollout>,
    pub image_rollouts: HashMap<String, Rollout>,
    pub rollout_delay: i64,
    pub lb_delay: i64,
    /// Set by writes; the controllers run when it is set or time-dependent work is pending.
    pub dirty: bool,
    pub timed: bool,
    pub server_url: String,
}

pub fn meta_str<'a>(obj: &'a Value, field: &str) -> Option<&'a str> {
    obj.get("metadata")?.get(field)?.as_str()
}

impl Store {
    pub fn new(server_url: String) -> Store {
        let mut s = Store {
            objects: BTreeMap::new(),
            rv: 100,
            rng: Rng::seeded(),
            clock_offset: 0,
            rollouts: HashMap::new(),
            image_rollouts: HashMap::new(),
            rollout_delay: 0,
            lb_delay: 0,
            dirty: true,
            timed: false,
            server_url,
        };
        for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
            let _ = s.write(
                NAMESPACES,
                "",
                ns,
                None,
                json!({"metadata": {"name": ns}}),
                Managed::Update("kube-apiserver".into()),
                Sub::Main,
                false,
            );
        }
        let svc = json!({"metadata": {"name": "kubernetes", "labels": {"component": "apiserver", "provider": "kubernetes"}},
            "spec": {"clusterIP": "10.96.0.1", "ports": [{"name": "https", "port": 443, "targetPort": 6443}]}});
        let _ = s.write(
            SERVICES,
            "default",
            "kubernetes",
            None,
            svc,
            Managed::Update("kube-apiserver".into()),
            Sub::Main,
            false,
        );
        let node = json!({"metadata": {"name": "kube-double-node", "labels": {"kubernetes.io/hostname": "kube-double-node", "kubernetes.io/os": "linux"}},
            "spec": {}, "status": {"addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": "kube-double-node"}],
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "kubelet is posting ready status"}],
            "capacity": {"cpu": "2", "memory": "8Gi", "pods": "110"}, "allocatable": {"cpu": "2", "memory": "8Gi", "pods": "110"}}});
        let _ = s.write(
            NODES,
            "",
            "kube-double-node",
            None,
            node,
            Managed::Update("kubelet".into()),
            Sub::Main,
            false,
        );
        s
    }

    pub fn now(&self) -> i64 {
        util::epoch_secs(SystemTime::now()) + self.clock_offset
    }

    pub fn now_str(&self) -> String {
        rfc3339(self.now())
    }

    fn next_rv(&mut self) -> String {
        self.rv += 1;
        self.rv.to_string()
    }

    pub fn key(ti: usize, ns: &str, name: &str) -> Key {
        let ns = if TYPES[ti].namespaced { ns } else { "" };
        (ti, ns.to_string(), name.to_string())
    }

    pub fn get_obj(&self, ti: usize, ns: &str, name: &str) -> Option<&Value> {
        self.objects.get(&Store::key(ti, ns, name))
    }

    pub fn of_type(&self, ti: usize) -> impl Iterator<Item = (&Key, &Value)> {
        self.objects
            .range((ti, String::new(), String::new())..(ti + 1, String::new(), String::new()))
    }

    /// Stores an object as a controller does (bumps resourceVersion if it changed).
    pub fn put(&mut self, key: Key, mut obj: Value) -> bool {
        if let Some(old) = self.objects.get(&key) {
            let mut cmp = obj.clone();
            if let Some(rv) = meta_str(old, "resourceVersion") {
                obj_path(&mut cmp, &["metadata"]).insert("resourceVersion".into(), json!(rv));
            }
            if cmp == *old {
                return false;
            }
        }
        let rv = self.next_rv();
        obj_path(&mut obj, &["metadata"]).insert("resourceVersion".into(), json!(rv));
        self.objects.insert(key, obj);
        self.dirty = true;
        true
    }

    fn not_found(ti: usize, name: &str) -> ApiError {
        ApiError::not_found(TYPES[ti].group, TYPES[ti].plural, name)
    }

    pub fn get(&self, ti: usize, ns: &str, name: &str) -> ApiResult<Value> {
        self.get_obj(ti, ns, name)
            .cloned()
            .ok_or_else(|| Store::not_found(ti, name))
    }

    /// Namespace must exist and not be terminating for creates in it.
    fn check_namespace(&self, ti: usize, ns: &str, name: &str) -> ApiResult<()> {
        if !TYPES[ti].namespaced {
            return Ok(());
        }
        match self.get_obj(NAMESPACES, "", ns) {
            None => Err(ApiError::not_found("", "namespaces", ns)),
            Some(n) if n.pointer("/metadata/deletionTimestamp").is_some() => {
                Err(ApiError::forbidden(
                    TYPES[ti].group,
                    TYPES[ti].plural,
                    name,
                    &format!(
                        "unable to create new content in namespace {ns} because it is being terminated"
                    ),
                ))
            }
            Some(_) => Ok(()),
        }
    }

    pub fn list(
        &self,
        ti: usize,
        ns: Option<&str>,
        ls: &LabelSelector,
        fs: &FieldSelector,
        limit: Option<usize>,
        cont: Option<&str>,
    ) -> ApiResult<Value> {
        let rt = &TYPES[ti];
        let start: Option<(String, String)> = match cont {
            Some(c) if !c.is_empty() => {
                let raw = util::base64_decode(c)
                    .and_then(|b| String::from_utf8(b).ok())
                    .ok_or_else(|| ApiError::bad_request("invalid continue token"))?;
                let (a, b) = raw
                    .split_once('/')
                    .ok_or_else(|| ApiError::bad_request("invalid continue token"))?;
                Some((a.to_string(), b.to_string()))
            }
            _ => None,
        };
        let matching: Vec<(&Key, &Value)> = self
            .of_type(ti)
            .filter(|(k, _)| ns.is_none_or(|n| k.1 == n))
            .filter(|(k, _)| {
                start
                    .as_ref()
                    .is_none_or(|(sn, sname)| (&k.1, &k.2) > (sn, sname))
            })
            .filter(|(_, v)| ls.matches(v) && fs.matches(v))
            .collect();
        let total = matching.len();
        let take = limit.filter(|l| *l > 0).unwrap_or(usize::MAX).min(total);
        let items: Vec<Value> = matching[..take].iter().map(|(_, v)| (*v).clone()).collect();
        let mut meta = json!({"resourceVersion": self.rv.to_string()});
        if take < total {
            let (k, _) = matching[take - 1];
            meta["continue"] = json!(util::base64_encode(format!("{}/{}", k.1, k.2).as_bytes()));
            meta["remainingItemCount"] = json!(total - take);
        }
        Ok(
            json!({"kind": format!("{}List", rt.kind), "apiVersion": rt.api_version(), "metadata": meta, "items": items}),
        )
    }

    // ------------------------------------------------------------------ writes

    #[allow(clippy::too_many_arguments)]
    pub fn write(
        &mut self,
        ti: usize,
        ns: &str,
        name: &str,
        old: Option<&Value>,
        mut obj: Value,
        managed: Managed,
        sub: Sub,
        dry_run: bool,
    ) -> ApiResult<Value> {
        let rt = &TYPES[ti];
        strip_nulls(&mut obj);
        if !obj.is_object() {
            return Err(ApiError::bad_request(
                "the request body must be a JSON object",
            ));
        }
        if sub == Sub::Status {
            let Some(old) = old else {
                return Err(Store::not_found(ti, name));
            };
            let status = obj.get("status").cloned();
            obj = old.clone();
            match status {
                Some(s) => obj["status"] = s,
                None => {
                    obj.as_object_mut().map(|m| m.remove("status"));
                }
            }
        }
        obj["apiVersion"] = json!(rt.api_version());
        obj["kind"] = json!(rt.kind);
        let now = self.now_str();
        {
            let meta = obj_path(&mut obj, &["metadata"]);
            meta.insert("name".into(), json!(name));
            if rt.namespaced {
                meta.insert("namespace".into(), json!(ns));
            } else {
                meta.remove("namespace");
            }
            meta.remove("selfLink");
            meta.remove("managedFields");
            meta.remove("resourceVersion");
            let system = [
                "uid",
                "creationTimestamp",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "generation",
            ];
            match old {
                Some(o) => {
                    for f in system {
                        match o.pointer(&format!("/metadata/{f}")) {
                            Some(v) => meta.insert(f.into(), v.clone()),
                            None => meta.remove(f),
                        };
                    }
                }
                None => {
                    for f in system {
                        meta.remove(f);
                    }
                    meta.insert("uid".into(), json!(self.rng.uid()));
                    meta.insert("creationTimestamp".into(), json!(now));
                    if rt.generation {
                        meta.insert("generation".into(), json!(1));
                    }
                }
            }
        }
        if sub != Sub::Status && rt.status_sub {
            let status = match old {
                Some(o) => o.get("status").cloned(),
                None => {
                    if rt.writable {
                        kinds::initial_status(rt.kind)
                    } else {
                        obj.get("status").cloned()
                    }
                }
            };
            let m = obj.as_object_mut().expect("object");
            match status {
                Some(s) => m.insert("status".into(), s),
                None => m.remove("status"),
            };
        }
        if sub != Sub::Status {
            kinds::default_object(rt.kind, &mut obj);
            if ti == SERVICES {
                self.allocate_service(&mut obj, old, ns, name)?;
            }
        }
        let errs = kinds::validate(rt.kind, &obj, old);
        if !errs.is_empty() {
            return Err(ApiError::invalid(rt.group, rt.kind, name, &errs.0));
        }
        kinds::typecheck(rt.kind, &obj).map_err(|e| {
            ApiError::bad_request(format!(
                "{} in version \"{}\" cannot be handled as a {}: {e}",
                rt.kind, rt.version, rt.kind
            ))
        })?;
        if rt.generation
            && let Some(o) = old
            && kinds::spec_changed(o, &obj)
        {
            let g = o
                .pointer("/metadata/generation")
                .and_then(Value::as_i64)
                .unwrap_or(0);
            obj_path(&mut obj, &["metadata"]).insert("generation".into(), json!(g + 1));
        }
        let old_entries = old.map(parse_entries).unwrap_or_default();
        let mut entries = match managed {
            Managed::Apply(e) => e,
            Managed::Update(manager) => {
                let empty = json!({});
                let (changed, removed) =
                    fields::changed_paths(old.unwrap_or(&empty), &obj, sub.scope(ti));
                let mut entries = old_entries.clone();
                for e in entries.iter_mut() {
                    e.set
                        .retain(|p| !changed.contains(p) && !removed.contains(p));
                }
                let subres = sub.name().map(String::from);
                let idx = match entries.iter().position(|e| {
                    e.manager == manager && e.operation == "Update" && e.subresource == subres
                }) {
                    Some(i) => i,
                    None => {
                        entries.push(Entry {
                            manager,
                            operation: "Update".into(),
                            api_version: rt.api_version(),
                            time: String::new(),
                            subresource: subres,
                            set: FieldSet::new(),
                        });
                        entries.len() - 1
                    }
                };
                entries[idx].set.extend(changed);
                entries
            }
        };
        entries.retain(|e| !e.set.is_empty());
        for e in entries.iter_mut() {
            match old_entries.iter().find(|o| {
                o.manager == e.manager
                    && o.operation == e.operation
                    && o.subresource == e.subresource
            }) {
                Some(o) if o.set == e.set && !o.time.is_empty() => e.time = o.time.clone(),
                _ => e.time = now.clone(),
            }
        }
        if !entries.is_empty() {
            obj_path(&mut obj, &["metadata"])
                .insert("managedFields".into(), entries_json(&entries));
        }
        if let Some(o) = old {
            let mut cmp = obj.clone();
            if let Some(rv) = meta_str(o, "resourceVersion") {
                obj_path(&mut cmp, &["metadata"]).insert("resourceVersion".into(), json!(rv));
            }
            if cmp == *o {
                return Ok(o.clone());
            }
        }
        let key = Store::key(ti, ns, name);
        let terminating = obj.pointer("/metadata/deletionTimestamp").is_some();
        let no_finalizers = obj
            .pointer("/metadata/finalizers")
            .and_then(Value::as_array)
            .is_none_or(Vec::is_empty);
        if terminating && no_finalizers && ti != NAMESPACES {
            if !dry_run {
                self.objects.remove(&key);
                self.dirty = true;
            }
            return Ok(obj);
        }
        if !dry_run {
            let rv = self.next_rv();
            obj_path(&mut obj, &["metadata"]).insert("resourceVersion".into(), json!(rv));
            self.objects.insert(key, obj.clone());
            self.dirty = true;
        }
        Ok(obj)
    }

    fn check_body_identity(ti: usize, ns: &str, name: Option<&str>, body: &Value) -> ApiResult<()> {
        let rt = &TYPES[ti];
        if !body.is_object() {
            return Err(ApiError::bad_request(
                "the request body must be a JSON object",
            ));
        }
        if let Some(av) = body.get("apiVersion").and_then(Value::as_str)
            && av != rt.api_version()
        {
            return Err(ApiError::bad_request(format!(
                "the API version in the data ({av}) does not match the expected API version ({})",
                rt.api_version()
            )));
        }
        if let Some(k) = body.get("kind").and_then(Value::as_str)
            && k != rt.kind
        {
            return Err(ApiError::bad_request(format!(
                "the kind in the data ({k}) does not match the expected kind ({})",
                rt.kind
            )));
        }
        if let (Some(url), Some(b)) = (name, meta_str(body, "name"))
            && url != b
        {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({b}) does not match the name on the URL ({url})"
            )));
        }
        if rt.namespaced
            && let Some(b) = meta_str(body, "namespace")
            && !b.is_empty()
            && b != ns
        {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
        Ok(())
    }

    pub fn create(
        &mut self,
        ti: usize,
        ns: &str,
        body: Value,
        manager: String,
        dry_run: bool,
    ) -> ApiResult<Value> {
        let rt = &TYPES[ti];
        if !rt.writable {
            return Err(ApiError::method_not_allowed());
        }
        Store::check_body_identity(ti, ns, None, &body)?;
        if meta_str(&body, "resourceVersion").is_some_and(|s| !s.is_empty()) {
            return Err(ApiError::bad_request(
                "resourceVersion should not be set on objects to be created",
            ));
        }
        let name = match meta_str(&body, "name").filter(|s| !s.is_empty()) {
            Some(n) => n.to_string(),
            None => match meta_str(&body, "generateName").filter(|s| !s.is_empty()) {
                Some(g) => format!("{g}{}", self.rng.suffix()),
                None => {
                    let mut e = Errs::default();
                    e.required("metadata.name");
                    return Err(ApiError::invalid(rt.group, rt.kind, "", &e.0));
                }
            },
        };
        self.check_namespace(ti, ns, &name)?;
        if self.get_obj(ti, ns, &name).is_some() {
            return Err(ApiError::already_exists(rt.group, rt.plural, &name));
        }
        self.write(
            ti,
            ns,
            &name,
            None,
            body,
            Managed::Update(manager),
            Sub::Main,
            dry_run,
        )
    }

    #[allow(clippy::too_many_arguments)]
    pub fn replace(
        &mut self,
        ti: usize,
        ns: &str,
        name: &str,
        body: Value,
        manager: String,
        sub: Sub,
        dry_run: bool,
    ) -> ApiResult<Value> {
        let rt = &TYPES[ti];
        Store::check_body_identity(ti, ns, Some(name), &body)?;
        let old = self.get(ti, ns, name)?;
        if sub == Sub::Main && !rt.writable {
            return Err(ApiError::method_not_allowed());
        }
        if let Some(rv) = meta_str(&body, "resourceVersion").filter(|s| !s.is_empty())
            && Some(rv) != meta_str(&old, "resourceVersion")
        {
            return Err(ApiError::stale(rt.group, rt.plural, name));
        }
        if let Some(uid) = meta_str(&body, "uid").filter(|s| !s.is_empty())
            && Some(uid) != meta_str(&old, "uid")
        {
            return Err(ApiError::conflict(
                rt.group,
                rt.plural,
                name,
                &format!(
                    "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                    meta_str(&old, "uid").unwrap_or_default()
                ),
            ));
        }
        self.write(
            ti,
            ns,
            name,
            Some(&old),
            body,
            Managed::Update(manager),
            sub,
            dry_run,
        )
    }

    /// JSON merge / strategic merge / JSON patch.
    #[allow(clippy::too_many_arguments)]
    pub fn patch(
        &mut self,
        ti: usize,
        ns: &str,
        name: &str,
        kind: &str,
        body: &Value,
        manager: String,
        sub: Sub,
        dry_run: bool,
    ) -> ApiResult<Value> {
        let rt = &TYPES[ti];
        let old = self.get(ti, ns, name)?;
        if sub == Sub::Main && !rt.writable {
            return Err(ApiError::method_not_allowed());
        }
        let mut new = old.clone();
        match kind {
            "merge" => patch::merge_patch(&mut new, body),
            "strategic" => patch::strategic_merge_patch(&mut new, body, ""),
            _ => patch::json_patch(&mut new, body).map_err(|e| {
                ApiError::new(
                    422,
                    "Invalid",
                    format!("the server rejected our request due to an error in our request: {e}"),
                )
            })?,
        }
        if kind != "json"
            && let Some(rv) = body
                .pointer("/metadata/resourceVersion")
                .and_then(Value::as_str)
            && Some(rv) != meta_str(&old, "resourceVersion")
        {
            return Err(ApiError::stale(rt.group, rt.plural, name));
        }
        Store::check_body_identity(ti, ns, Some(name), &new)?;
        self.write(
            ti,
            ns,
            name,
            Some(&old),
            new,
            Managed::Update(manager),
            sub,
            dry_run,
        )
    }

    /// Server-side apply. Returns the object and whether it was created.
    #[allow(clippy::too_many_arguments)]
    pub fn apply(
        &mut self,
        ti: usize,
        ns: &str,
        name: &str,
        mut cfg: Value,
        manager: &str,
        force: bool,
        sub: Sub,
        dry_run: bool,
    ) -> ApiResult<(Value, bool)> {
        let rt = &TYPES[ti];
        if !cfg.is_object() {
            return Err(ApiError::bad_request(
                "the apply configuration must be a JSON object",
            ));
        }
        strip_nulls(&mut cfg);
        if cfg
            .get("apiVersion")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
        {
            return Err(ApiError::bad_request(
                "apiVersion must be set in the apply configuration",
            ));
        }
        if cfg
            .get("kind")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
        {
            return Err(ApiError::bad_request(
                "kind must be set in the apply configuration",
            ));
        }
        Store::check_body_identity(ti, ns, Some(name), &cfg)?;
        let old = self.get_obj(ti, ns, name).cloned();
        if let Some(rv) = meta_str(&cfg, "resourceVersion").filter(|s| !s.is_empty()) {
            match &old {
                Some(o) if meta_str(o, "resourceVersion") == Some(rv) => {}
                _ => return Err(ApiError::stale(rt.group, rt.plural, name)),
            }
        }
        if let Some(m) = cfg.get_mut("metadata").and_then(Value::as_object_mut) {
            for f in [
                "resourceVersion",
                "uid",
                "creationTimestamp",
                "managedFields",
                "generation",
                "selfLink",
                "deletionTimestamp",
            ] {
                m.remove(f);
            }
        }
        match &old {
            None => {
                if sub != Sub::Main {
                    return Err(Store::not_found(ti, name));
                }
                if !rt.writable {
                    return Err(ApiError::method_not_allowed());
                }
                self.check_namespace(ti, ns, name)?;
            }
            Some(_) if sub == Sub::Main && !rt.writable => {
                return Err(ApiError::method_not_allowed());
            }
            _ => {}
        }
        let scope = sub.scope(ti);
        // What the manager applies: only the part of the config its endpoint covers.
        let mut applied_cfg = cfg.clone();
        if let Some(m) = applied_cfg.as_object_mut() {
            match scope {
                Scope::Status => m.retain(|k, _| {
                    k == "status" || k == "apiVersion" || k == "kind" || k == "metadata"
                }),
                Scope::Main { skip_status: true } => {
                    m.remove("status");
                }
                _ => {}
            }
        }
        let applied = fields::field_set(&applied_cfg, scope);
        let live = old.clone().unwrap_or_else(|| json!({}));
        let mut entries = old.as_ref().map(parse_entries).unwrap_or_default();
        let subres = sub.name().map(String::from);
        let is_self =
            |e: &Entry| e.manager == manager && e.operation == "Apply" && e.subresource == subres;
        let mut conflicts: Vec<(usize, fields::Path)> = Vec::new();
        for (i, e) in entries.iter().enumerate() {
            if is_self(e) {
                continue;
            }
            for p in applied.intersection(&e.set) {
                let Some(cv) = fields::value_at(&applied_cfg, p) else {
                    continue;
                };
                // An empty map merges into the live one without changing it.
                if !fields::is_leaf(p, cv) || cv.as_object().is_some_and(|m| m.is_empty()) {
                    continue;
                }
                if let Some(lv) = fields::value_at(&live, p)
                    && lv != cv
                {
                    conflicts.push((i, p.clone()));
                }
            }
        }
        if !conflicts.is_empty() {
            if !force {
                let list: Vec<(String, String, String)> = conflicts
                    .iter()
                    .map(|(i, p)| {
                        (
                            entries[*i].manager.clone(),
                            entries[*i].api_version.clone(),
                            fields::render_path(p),
                        )
                    })
                    .collect();
                return Err(ApiError::apply_conflicts(rt.group, rt.plural, name, &list));
            }
            for (i, p) in &conflicts {
                entries[*i].set.remove(p);
            }
        }
        let old_self: FieldSet = entries
            .iter()
            .find(|e| is_self(e))
            .map(|e| e.set.clone())
            .unwrap_or_default();
        let others: FieldSet = entries
            .iter()
            .filter(|e| !is_self(e))
            .flat_map(|e| e.set.iter().cloned())
            .collect();
        let mut to_remove: Vec<&fields::Path> = old_self
            .difference(&applied)
            .filter(|p| !others.iter().any(|q| q.starts_with(p)))
            .filter(|p| !applied.iter().any(|q| q.starts_with(p)))
            .collect();
        to_remove.sort_by_key(|p| std::cmp::Reverse(p.len()));
        let mut obj = live;
        for p in to_remove {
            fields::remove_at(&mut obj, p);
        }
        if let Some(m) = applied_cfg.as_object_mut() {
            m.remove("apiVersion");
            m.remove("kind");
        }
        fields::merge_apply(&mut obj, &applied_cfg, "");
        match entries.iter_mut().find(|e| is_self(e)) {
            Some(e) => e.set = applied,
            None => entries.push(Entry {
                manager: manager.to_string(),
                operation: "Apply".into(),
                api_version: cfg
                    .get("apiVersion")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
                time: String::new(),
                subresource: subres,
                set: applied,
            }),
        }
        let created = old.is_none();
        let out = self.write(
            ti,
            ns,
            name,
            old.as_ref(),
            obj,
            Managed::Apply(entries),
            sub,
            dry_run,
        )?;
        Ok((out, created))
    }

    /// `/scale`: sets `spec.replicas` through the scale subresource.
    pub fn set_replicas(
        &mut self,
        ti: usize,
        ns: &str,
        name: &str,
        replicas: i64,
        manager: String,
        dry_run: bool,
    ) -> ApiResult<Value> {
        let old = self.get(ti, ns, name)?;
        let mut new = old.clone();
        obj_path(&mut new, &["spec"]).insert("replicas".into(), json!(replicas));
        self.write(
            ti,
            ns,
            name,
            Some(&old),
            new,
            Managed::Update(manager),
            Sub::Scale,
            dry_run,
        )
    }

    pub fn scale_of(&self, ti: usize, ns: &str, name: &str) -> ApiResult<Value> {
        let o = self.get(ti, ns, name)?;
        let selector = o
            .pointer("/spec/selector")
            .and_then(|s| s.get("matchLabels"))
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default();
        Ok(json!({
            "kind": "Scale", "apiVersion": "autoscaling/v1",
            "metadata": {"name": name, "namespace": ns, "uid": o.pointer("/metadata/uid"),
                         "resourceVersion": o.pointer("/metadata/resourceVersion"),
                         "creationTimestamp": o.pointer("/metadata/creationTimestamp")},
            "spec": {"replicas": o.pointer("/spec/replicas").cloned().unwrap_or(json!(0))},
            "status": {"replicas": o.pointer("/status/replicas").cloned().unwrap_or(json!(0)), "selector": selector},
        }))
    }

    // ------------------------------------------------------------------ delete

    /// Marks or removes one object. Returns (removed now, object).
    pub fn delete_key(&mut self, key: &Key, policy: &str) -> Option<(bool, Value)> {
        let mut obj = self.objects.get(key)?.clone();
        let ti = key.0;
        let now = self.now_str();
        if ti == NAMESPACES {
            if obj.pointer("/metadata/deletionTimestamp").is_none() {
                obj_path(&mut obj, &["metadata"]).insert("deletionTimestamp".into(), json!(now));
                obj_path(&mut obj, &["status"]).insert("phase".into(), json!("Terminating"));
                self.put(key.clone(), obj.clone());
            }
            return Some((false, self.objects.get(key).cloned().unwrap_or(obj)));
        }
        let mut fins: Vec<Value> = obj
            .pointer("/metadata/finalizers")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let extra = match policy {
            "Foreground" => Some("foregroundDeletion"),
            "Orphan" => Some("orphan"),
            _ => None,
        };
        if let Some(f) = extra
            && !fins.iter().any(|x| x == f)
        {
            fins.push(json!(f));
        }
        if fins.is_empty() {
            self.objects.remove(key);
            self.dirty = true;
            return Some((true, obj));
        }
        let first = obj.pointer("/metadata/deletionTimestamp").is_none();
        let meta = obj_path(&mut obj, &["metadata"]);
        meta.insert("finalizers".into(), Value::Array(fins));
        if first {
            meta.insert("deletionTimestamp".into(), json!(now));
            meta.insert("deletionGracePeriodSeconds".into(), json!(0));
            if TYPES[ti].generation {
                let g = meta.get("generation").and_then(Value::as_i64).unwrap_or(0);
                meta.insert("generation".into(), json!(g + 1));
            }
        }
        self.put(key.clone(), obj);
        Some((false, self.objects.get(key).cloned().unwrap_or_default()))
    }

    /// DELETE on one object. Returns (HTTP code, body).
    pub fn delete(
        &mut self,
        ti: usize,
        ns: &str,
        name: &str,
        opts: &DeleteOpts,
    ) -> ApiResult<(u16, Value)> {
        let rt = &TYPES[ti];
        let old = self.get(ti, ns, name)?;
        if let Some(uid) = &opts.uid
            && Some(uid.as_str()) != meta_str(&old, "uid")
        {
            return Err(ApiError::conflict(
                rt.group,
                rt.plural,
                name,
                &format!(
                    "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                    meta_str(&old, "uid").unwrap_or_default()
                ),
            ));
        }
        if let Some(rv) = &opts.resource_version
            && Some(rv.as_str()) != meta_str(&old, "resourceVersion")
        {
            return Err(ApiError::conflict(
                rt.group,
                rt.plural,
                name,
                &format!(
                    "Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {}",
                    meta_str(&old, "resourceVersion").unwrap_or_default()
                ),
            ));
        }
        let policy = opts
            .propagation
            .clone()
            .unwrap_or_else(|| "Background".into());
        if !matches!(policy.as_str(), "Background" | "Foreground" | "Orphan") {
            let mut e = Errs::default();
            e.not_supported(
                "propagationPolicy",
                &json!(policy),
                &["Foreground", "Background", "Orphan", "nil"],
            );
            return Err(ApiError::invalid("meta.k8s.io", "DeleteOptions", "", &e.0));
        }
        if opts.dry_run {
            return Ok((200, old));
        }
        let key = Store::key(ti, ns, name);
        let (gone, obj) = self
            .delete_key(&key, &policy)
            .ok_or_else(|| Store::not_found(ti, name))?;
        Ok((if gone { 200 } else { 202 }, obj))
    }

    // ------------------------------------------------------------------ services

    fn used_node_ports(&self, ns: &str, name: &str) -> BTreeSet<i64> {
        self.of_type(SERVICES)
            .filter(|(k, _)| !(k.1 == ns && k.2 == name))
            .flat_map(|(_, v)| {
                v.pointer("/spec/ports")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(|p| p.get("nodePort").and_then(Value::as_i64))
            })
            .collect()
    }

    fn used_cluster_ips(&self, ns: &str, name: &str) -> BTreeSet<String> {
        self.of_type(SERVICES)
            .filter(|(k, _)| !(k.1 == ns && k.2 == name))
            .filter_map(|(_, v)| {
                v.pointer("/spec/clusterIP")
                    .and_then(Value::as_str)
                    .map(String::from)
            })
            .collect()
    }

    /// ClusterIP and NodePort allocation, as the Service REST storage does it.
    fn allocate_service(
        &mut self,
        obj: &mut Value,
        old: Option<&Value>,
        ns: &str,
        name: &str,
    ) -> ApiResult<()> {
        let used_ports = self.used_node_ports(ns, name);
        let used_ips = self.used_cluster_ips(ns, name);
        let spec = obj_path(obj, &["spec"]);
        let ty = spec
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("ClusterIP")
            .to_string();
        let needs_np = |t: &str| t == "NodePort" || t == "LoadBalancer";
        let old_spec = old
            .and_then(|o| o.get("spec"))
            .cloned()
            .unwrap_or(json!({}));
        let old_ty = old_spec
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("ClusterIP")
            .to_string();
        let old_ports = old_spec
            .get("ports")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let old_node_ports: BTreeSet<i64> = old_ports
            .iter()
            .filter_map(|p| p.get("nodePort").and_then(Value::as_i64))
            .collect();
        let port_key = |p: &Value| {
            (
                p.get("port").and_then(Value::as_i64),
                p.get("protocol")
                    .and_then(Value::as_str)
                    .unwrap_or("TCP")
                    .to_string(),
            )
        };
        let mut errs = Errs::default();
        if old.is_some() {
            // dropTypeDependentFields: a type change clears what the old type allocated.
            if needs_np(&old_ty)
                && !needs_np(&ty)
                && let Some(ports) = spec.get_mut("ports").and_then(Value::as_array_mut)
            {
                for p in ports.iter_mut().filter_map(Value::as_object_mut) {
                    if p.get("nodePort")
                        .and_then(Value::as_i64)
                        .is_some_and(|n| old_node_ports.contains(&n))
                    {
                        p.remove("nodePort");
                    }
                }
            }
            if old_ty == "LoadBalancer"
                && ty != "LoadBalancer"
                && spec.get("allocateLoadBalancerNodePorts")
                    == old_spec.get("allocateLoadBalancerNodePorts")
            {
                spec.remove("allocateLoadBalancerNodePorts");
            }
            if needs_np(&old_ty)
                && !needs_np(&ty)
                && spec.get("externalTrafficPolicy") == old_spec.get("externalTrafficPolicy")
            {
                spec.remove("externalTrafficPolicy");
            }
            // patchAllocatedValues: unspecified allocations carry over.
            if spec
                .get("clusterIP")
                .and_then(Value::as_str)
                .is_none_or(str::is_empty)
                && let Some(ip) = old_spec.get("clusterIP")
                && ty != "ExternalName"
            {
                spec.insert("clusterIP".into(), ip.clone());
                if let Some(ips) = old_spec.get("clusterIPs") {
                    spec.insert("clusterIPs".into(), ips.clone());
                }
            }
            if needs_np(&ty)
                && needs_np(&old_ty)
                && let Some(ports) = spec.get_mut("ports").and_then(Value::as_array_mut)
            {
                for p in ports.iter_mut() {
                    if p.get("nodePort").is_none()
                        && let Some(op) = old_ports.iter().find(|o| port_key(o) == port_key(p))
                        && let Some(n) = op.get("nodePort")
                    {
                        p["nodePort"] = n.clone();
                    }
                }
            }
        }
        if ty != "ExternalName" {
            let requested = spec
                .get("clusterIP")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            let old_ip = old_spec
                .get("clusterIP")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let ip = if requested.is_empty() {
                let mut n: u32 = 10;
                loop {
                    let cand = format!("10.{}.{}.{}", 96 + (n >> 16), (n >> 8) & 0xff, n & 0xff);
                    if !used_ips.contains(&cand) {
                        break cand;
                    }
                    n += 1;
                    if n >= (16 << 16) {
                        return Err(ApiError::new(
                            500,
                            "InternalError",
                            "Internal error occurred: failed to allocate a serviceIP: range is full",
                        ));
                    }
                }
            } else {
                if requested != "None" && requested != old_ip {
                    let f = "spec.clusterIPs";
                    if !old_ip.is_empty() {
                        errs.invalid(f, &json!([requested]), "may not change once set");
                    } else {
                        match requested.parse::<std::net::Ipv4Addr>() {
                            Err(_) => errs.invalid(
                                f,
                                &json!([requested]),
                                "must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)",
                            ),
                            Ok(a) => {
                                let o = a.octets();
                                if o[0] != 10 || !(96..=111).contains(&o[1]) {
                                    errs.invalid(f, &json!([requested]), &format!("failed to allocate IP {requested}: the provided IP ({requested}) is not in the valid range. The range of valid IPs is 10.96.0.0/12"));
                                } else if used_ips.contains(&requested) {
                                    errs.invalid(f, &json!([requested]), &format!("failed to allocate IP {requested}: provided IP is already allocated"));
                                }
                            }
                        }
                    }
                }
                requested
            };
            spec.insert("clusterIP".into(), json!(ip));
            spec.insert("clusterIPs".into(), json!([ip]));
            if ip != "None" {
                spec.entry("ipFamilies").or_insert(json!(["IPv4"]));
            }
            spec.entry("ipFamilyPolicy").or_insert(json!("SingleStack"));
        }
        let allocate = needs_np(&ty)
            && !(ty == "LoadBalancer"
                && spec.get("allocateLoadBalancerNodePorts") == Some(&json!(false)));
        if needs_np(&ty) {
            let mut mine: BTreeSet<(i64, String)> = BTreeSet::new();
            let mut taken: BTreeSet<i64> = used_ports.clone();
            let ports = spec.get_mut("ports").and_then(Value::as_array_mut);
            if let Some(ports) = ports {
                for (i, p) in ports.iter().enumerate() {
                    let Some(np) = p.get("nodePort") else {
                        continue;
                    };
                    let f = format!("spec.ports[{i}].nodePort");
                    let proto = p
                        .get("protocol")
                        .and_then(Value::as_str)
                        .unwrap_or("TCP")
                        .to_string();
                    match np.as_i64() {
                        Some(n) if !(30000..=32767).contains(&n) => errs.invalid(f, np, "provided port is not in the valid range. The range of valid ports is 30000-32767"),
                        Some(n) if used_ports.contains(&n) => errs.invalid(f, np, "provided port is already allocated"),
                        Some(n) => {
                            if !mine.insert((n, proto)) {
                                errs.duplicate(f, np);
                            }
                            taken.insert(n);
                        }
                        None => errs.invalid(f, np, "must be an integer"),
                    }
                }
                if allocate && errs.is_empty() {
                    for p in ports.iter_mut() {
                        if p.get("nodePort").is_some() {
                            continue;
                        }
                        if taken.len() >= 2768 {
                            return Err(ApiError::new(
                                500,
                                "InternalError",
                                "Internal error occurred: failed to allocate a nodePort: range is full",
                            ));
                        }
                        let mut n = 30000 + self.rng.below(2768) as i64;
                        while taken.contains(&n) {
                            n = if n == 32767 { 30000 } else { n + 1 };
                        }
                        taken.insert(n);
                        p["nodePort"] = json!(n);
                    }
                }
            }
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(ApiError::invalid("", "Service", name, &errs.0))
        }
    }

    // ------------------------------------------------------------------ snapshots

    pub fn with_label(&self, sel: &LabelSelector) -> Vec<Value> {
        self.objects
            .values()
            .filter(|v| sel.matches(v))
            .cloned()
            .collect()
    }
}
