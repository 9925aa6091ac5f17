//! HTTP front: URL routing, request decoding and responses.

use crate::registry::{self, PODS, TYPES};
use crate::selector::{FieldSelector, LabelSelector};
use crate::status::{ApiError, ApiResult, Errs};
use crate::store::{DeleteOpts, Key, Store, Sub};
use crate::util::{get_str, parse_query};
use crate::{Rollout, Shared};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::Response;
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::Ordering;

pub enum Out {
    Json(u16, Value),
    Typed(u16, &'static str, Value),
    Text(u16, String),
}

fn ok(v: Value) -> ApiResult<Out> {
    Ok(Out::Json(200, v))
}

pub fn router(shared: Arc<Shared>) -> axum::Router {
    axum::Router::new().fallback(handle).with_state(shared)
}

async fn handle(State(sh): State<Arc<Shared>>, req: Request) -> Response {
    sh.requests.fetch_add(1, Ordering::SeqCst);
    let (parts, body) = req.into_parts();
    let out = match axum::body::to_bytes(body, 64 << 20).await {
        Err(e) => Err(ApiError::bad_request(format!(
            "reading the request body: {e}"
        ))),
        Ok(bytes) => {
            let path = parts.uri.path().to_string();
            let query = parse_query(parts.uri.query().unwrap_or_default());
            sh.log
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(format!("{} {}", parts.method, parts.uri));
            let mut store = sh.lock();
            store.reconcile();
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                route(
                    &mut store,
                    &parts.method,
                    &path,
                    &query,
                    &parts.headers,
                    &bytes,
                )
            }))
            .unwrap_or_else(|_| {
                Err(ApiError::new(
                    500,
                    "InternalError",
                    "Internal error occurred: kube-double panicked handling this request",
                ))
            });
            store.reconcile();
            r
        }
    };
    let out = out.unwrap_or_else(|e| Out::Json(e.code, e.body()));
    let (code, ct, body) = match out {
        Out::Json(c, v) => (c, "application/json", v.to_string()),
        Out::Typed(c, ct, v) => (c, ct, v.to_string()),
        Out::Text(c, t) => (c, "text/plain; charset=utf-8", t),
    };
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header(header::CONTENT_TYPE, ct)
        .body(Body::from(body))
        .unwrap_or_default()
}

fn param<'a>(q: &'a [(String, String)], k: &str) -> Option<&'a str> {
    q.iter().find(|(a, _)| a == k).map(|(_, v)| v.as_str())
}

fn parse_body(body: &[u8]) -> ApiResult<Value> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request("the request body is empty"));
    }
    serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!("couldn't get version/kind; json parse error: {e}"))
    })
}

fn route(
    st: &mut Store,
    m: &Method,
    path: &str,
    q: &[(String, String)],
    h: &HeaderMap,
    body: &[u8],
) -> ApiResult<Out> {
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let accept = h
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let aggregated =
        accept.contains("g=apidiscovery.k8s.io") && accept.contains("as=APIGroupDiscoveryList");
    // Discovery documents (read-only): `/api`, `/api/v1`, `/apis`, `/apis/G`,
    // `/apis/G/V`; `/api/v1/namespaces` is already a collection.
    let discovery = match segs.first() {
        None => true,
        Some(&"version" | &"healthz" | &"readyz" | &"livez") => true,
        Some(&"api") => segs.len() <= 2,
        Some(&"apis") => segs.len() <= 3,
        _ => false,
    };
    if discovery && *m != Method::GET {
        return Err(ApiError::method_not_allowed());
    }
    const AGG_CT: &str = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList";
    match segs.as_slice() {
        [] => ok(
            json!({"paths": ["/api", "/api/v1", "/apis", "/apis/apps/v1", "/apis/autoscaling/v2", "/apis/coordination.k8s.io/v1", "/apis/networking.k8s.io/v1", "/healthz", "/livez", "/readyz", "/version"]}),
        ),
        ["version"] => ok(registry::version()),
        ["healthz" | "readyz" | "livez"] => Ok(Out::Text(200, "ok".into())),
        ["api"] if aggregated => Ok(Out::Typed(200, AGG_CT, registry::aggregated(true))),
        ["apis"] if aggregated => Ok(Out::Typed(200, AGG_CT, registry::aggregated(false))),
        ["api"] => ok(registry::api_versions(
            st.server_url.trim_start_matches("http://"),
        )),
        ["apis"] => ok(registry::group_list()),
        ["api", v] => registry::resource_list("", v)
            .map(ok)
            .unwrap_or_else(|| Err(ApiError::path_not_found())),
        ["apis", g] => registry::group(g)
            .map(ok)
            .unwrap_or_else(|| Err(ApiError::path_not_found())),
        ["apis", g, v] => registry::resource_list(g, v)
            .map(ok)
            .unwrap_or_else(|| Err(ApiError::path_not_found())),
        ["api", v, rest @ ..] => resource(st, m, "", v, rest, q, h, body),
        ["apis", g, v, rest @ ..] => resource(st, m, g, v, rest, q, h, body),
        ["kube-double", rest @ ..] => control(st, m, rest, q),
        _ => Err(ApiError::path_not_found()),
    }
}

/// Endpoints for driving a standalone double from outside (CLI tests, manual use).
fn control(st: &mut Store, m: &Method, rest: &[&str], q: &[(String, String)]) -> ApiResult<Out> {
    match (m, rest) {
        (&Method::POST, ["rollout"]) => {
            let ns = param(q, "namespace").unwrap_or("default").to_string();
            let mode: Rollout = param(q, "mode")
                .unwrap_or("Ready")
                .parse()
                .map_err(ApiError::bad_request)?;
            match (param(q, "deployment"), param(q, "image")) {
                (Some(d), _) => {
                    st.rollouts.insert((ns, d.to_string()), mode);
                }
                (None, Some(i)) => {
                    st.image_rollouts.insert(i.to_string(), mode);
                }
                _ => return Err(ApiError::bad_request("deployment or image is required")),
            }
            st.dirty = true;
            ok(json!({"ok": true}))
        }
        (&Method::POST, ["advance"]) => {
            let secs: i64 = param(q, "seconds")
                .unwrap_or("0")
                .parse()
                .map_err(|_| ApiError::bad_request("seconds must be an integer"))?;
            st.clock_offset += secs;
            st.timed = true;
            ok(json!({"ok": true}))
        }
        (&Method::GET, ["objects"]) => {
            let sel = LabelSelector::parse(param(q, "labelSelector").unwrap_or_default())
                .map_err(ApiError::bad_request)?;
            ok(Value::Array(st.with_label(&sel)))
        }
        _ => Err(ApiError::path_not_found()),
    }
}

#[allow(clippy::too_many_arguments)]
fn resource(
    st: &mut Store,
    m: &Method,
    group: &str,
    version: &str,
    rest: &[&str],
    q: &[(String, String)],
    h: &HeaderMap,
    body: &[u8],
) -> ApiResult<Out> {
    // /namespaces/{ns}/{plural}[/{name}[/{sub}]] or /{plural}[/{name}[/{sub}]]
    let namespaced_path = rest.len() >= 3
        && rest[0] == "namespaces"
        && registry::find(group, version, rest[2]).is_some_and(|i| TYPES[i].namespaced);
    let (ns, plural, name, sub) = if namespaced_path {
        if rest.len() > 5 {
            return Err(ApiError::path_not_found());
        }
        (
            Some(rest[1]),
            rest[2],
            rest.get(3).copied(),
            rest.get(4).copied(),
        )
    } else {
        if rest.len() > 3 {
            return Err(ApiError::path_not_found());
        }
        (None, rest[0], rest.get(1).copied(), rest.get(2).copied())
    };
    let ti = registry::find(group, version, plural).ok_or_else(ApiError::path_not_found)?;
    let rt = &TYPES[ti];
    if rt.namespaced && ns.is_none() && name.is_some() {
        return Err(ApiError::path_not_found());
    }
    let nsv = ns.unwrap_or_default();
    let dry_run = match param(q, "dryRun") {
        None | Some("") => false,
        Some("All") => true,
        Some(other) => {
            let mut e = Errs::default();
            e.not_supported("dryRun", &json!(other), &["All"]);
            return Err(ApiError::invalid("meta.k8s.io", "Options", "", &e.0));
        }
    };
    let field_manager = param(q, "fieldManager").filter(|s| !s.is_empty());
    if field_manager.is_some_and(|f| f.len() > 128) {
        let mut e = Errs::default();
        e.invalid(
            "fieldManager",
            &json!(field_manager),
            "must be no more than 128 characters",
        );
        return Err(ApiError::invalid("meta.k8s.io", "Options", "", &e.0));
    }
    let manager = field_manager.map(String::from).unwrap_or_else(|| {
        let ua = h
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("unknown");
        ua.split('/').next().unwrap_or("unknown").to_string()
    });
    let sub_kind = match sub {
        None => Sub::Main,
        Some("status") if rt.status_sub => Sub::Status,
        Some("scale") if rt.scale_sub => Sub::Scale,
        Some("log") if ti == PODS => {
            if *m != Method::GET {
                return Err(ApiError::method_not_allowed());
            }
            let name = name.unwrap_or_default();
            let pod = st.get(ti, nsv, name)?;
            let waiting = pod
                .pointer("/status/containerStatuses/0/state/waiting/reason")
                .and_then(Value::as_str);
            let text = match waiting {
                Some("CrashLoopBackOff") => {
                    "kube-double: simulated crash\nError: the process exited with status 1\n"
                        .to_string()
                }
                Some(r) => {
                    return Err(ApiError::bad_request(format!(
                        "container in pod \"{name}\" is waiting to start: {r}"
                    )));
                }
                None => format!("kube-double: simulated log of pod {name}\n"),
            };
            return Ok(Out::Text(200, text));
        }
        Some(_) => return Err(ApiError::path_not_found()),
    };
    let Some(name) = name else {
        return collection(st, m, ti, ns, q, body, manager, dry_run);
    };
    if sub_kind == Sub::Scale {
        return scale(st, m, ti, nsv, name, h, body, manager, dry_run);
    }
    match *m {
        Method::GET => ok(st.get(ti, nsv, name)?),
        Method::PUT => {
            let obj = parse_body(body)?;
            ok(st.replace(ti, nsv, name, obj, manager, sub_kind, dry_run)?)
        }
        Method::PATCH => {
            let ct = h
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            let ct = ct.split(';').next().unwrap_or_default().trim().to_string();
            let force = match param(q, "force") {
                None => None,
                Some("true" | "1") => Some(true),
                Some("false" | "0" | "") => Some(false),
                Some(other) => {
                    return Err(ApiError::bad_request(format!(
                        "invalid force value {other:?}"
                    )));
                }
            };
            if ct == "application/apply-patch+yaml" || ct == "application/apply-patch+json" {
                if field_manager.is_none() {
                    let mut e = Errs::default();
                    e.0.push(crate::status::Cause {
                        reason: "FieldValueRequired",
                        field: "fieldManager".into(),
                        message: "Required value: is required for apply patch".into(),
                    });
                    return Err(ApiError::invalid("meta.k8s.io", "PatchOptions", "", &e.0));
                }
                let cfg: Value = serde_json::from_slice(body).map_err(|e| {
                    ApiError::bad_request(format!("error decoding apply configuration: kube-double reads apply bodies as JSON (YAML is not supported): {e}"))
                })?;
                let (obj, created) = st.apply(
                    ti,
                    nsv,
                    name,
                    cfg,
                    &manager,
                    force == Some(true),
                    sub_kind,
                    dry_run,
                )?;
                return Ok(Out::Json(if created { 201 } else { 200 }, obj));
            }
            if force.is_some() {
                let mut e = Errs::default();
                e.forbidden("force", "may not be specified for non-apply patch");
                return Err(ApiError::invalid("meta.k8s.io", "PatchOptions", "", &e.0));
            }
            let kind = match ct.as_str() {
                "application/merge-patch+json" => "merge",
                "application/strategic-merge-patch+json" => "strategic",
                "application/json-patch+json" => "json",
                other => return Err(ApiError::unsupported_media_type(other)),
            };
            let patch = parse_body(body)?;
            ok(st.patch(ti, nsv, name, kind, &patch, manager, sub_kind, dry_run)?)
        }
        Method::DELETE if sub_kind == Sub::Main => {
            let opts = delete_opts(q, body, dry_run)?;
            let (code, obj) = st.delete(ti, nsv, name, &opts)?;
            Ok(Out::Json(code, obj))
        }
        _ => Err(ApiError::method_not_allowed()),
    }
}

fn delete_opts(q: &[(String, String)], body: &[u8], dry_run: bool) -> ApiResult<DeleteOpts> {
    let mut o = DeleteOpts {
        dry_run,
        ..Default::default()
    };
    if !body.iter().all(u8::is_ascii_whitespace) {
        let b: Value = serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("invalid DeleteOptions: {e}")))?;
        o.propagation = get_str(&b, &["propagationPolicy"]).map(String::from);
        if o.propagation.is_none() {
            match b.get("orphanDependents").and_then(Value::as_bool) {
                Some(true) => o.propagation = Some("Orphan".into()),
                Some(false) => o.propagation = Some("Background".into()),
                None => {}
            }
        }
        o.uid = get_str(&b, &["preconditions", "uid"]).map(String::from);
        o.resource_version = get_str(&b, &["preconditions", "resourceVersion"]).map(String::from);
        if b.get("dryRun")
            .and_then(Value::as_array)
            .is_some_and(|a| a.iter().any(|x| x == "All"))
        {
            o.dry_run = true;
        }
    }
    if let Some(p) = param(q, "propagationPolicy") {
        o.propagation = Some(p.to_string());
    }
    if o.propagation.is_none() && param(q, "orphanDependents") == Some("true") {
        o.propagation = Some("Orphan".into());
    }
    Ok(o)
}

#[allow(clippy::too_many_arguments)]
fn collection(
    st: &mut Store,
    m: &Method,
    ti: usize,
    ns: Option<&str>,
    q: &[(String, String)],
    body: &[u8],
    manager: String,
    dry_run: bool,
) -> ApiResult<Out> {
    let rt = &TYPES[ti];
    let ls = LabelSelector::parse(param(q, "labelSelector").unwrap_or_default())
        .map_err(ApiError::bad_request)?;
    let fs = FieldSelector::parse(param(q, "fieldSelector").unwrap_or_default(), rt.kind)
        .map_err(ApiError::bad_request)?;
    match *m {
        Method::GET => {
            if matches!(param(q, "watch"), Some("true" | "1")) {
                return Err(ApiError::new(
                    405,
                    "MethodNotAllowed",
                    "kube-double does not support watch; poll with list/get instead",
                ));
            }
            let limit =
                match param(q, "limit") {
                    None | Some("") => None,
                    Some(l) => Some(l.parse::<usize>().map_err(|_| {
                        ApiError::bad_request("limit must be a non-negative integer")
                    })?),
                };
            ok(st.list(
                ti,
                if rt.namespaced { ns } else { None },
                &ls,
                &fs,
                limit,
                param(q, "continue"),
            )?)
        }
        Method::POST => {
            if rt.namespaced && ns.is_none() {
                return Err(ApiError::method_not_allowed());
            }
            let obj = parse_body(body)?;
            let created = st.create(ti, ns.unwrap_or_default(), obj, manager, dry_run)?;
            Ok(Out::Json(201, created))
        }
        Method::DELETE => {
            let opts = delete_opts(q, body, dry_run)?;
            let list = st.list(
                ti,
                if rt.namespaced { ns } else { None },
                &ls,
                &fs,
                None,
                None,
            )?;
            let keys: Vec<Key> = list["items"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|o| {
                    Store::key(
                        ti,
                        o.pointer("/metadata/namespace")
                            .and_then(Value::as_str)
                            .unwrap_or_default(),
                        o.pointer("/metadata/name")
                            .and_then(Value::as_str)
                            .unwrap_or_default(),
                    )
                })
                .collect();
            let mut items = Vec::new();
            for k in keys {
                if let Ok((_, o)) = st.delete(ti, &k.1, &k.2, &opts) {
                    items.push(o);
                }
            }
            ok(
                json!({"kind": format!("{}List", rt.kind), "apiVersion": rt.api_version(), "metadata": {"resourceVersion": st.rv.to_string()}, "items": items}),
            )
        }
        _ => Err(ApiError::method_not_allowed()),
    }
}

#[allow(clippy::too_many_arguments)]
fn scale(
    st: &mut Store,
    m: &Method,
    ti: usize,
    ns: &str,
    name: &str,
    h: &HeaderMap,
    body: &[u8],
    manager: String,
    dry_run: bool,
) -> ApiResult<Out> {
    let replicas = match *m {
        Method::GET => return ok(st.scale_of(ti, ns, name)?),
        Method::PUT => parse_body(body)?
            .pointer("/spec/replicas")
            .and_then(Value::as_i64),
        Method::PATCH => {
            let ct = h
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            let mut s = st.scale_of(ti, ns, name)?;
            let p = parse_body(body)?;
            if ct.starts_with("application/json-patch+json") {
                crate::patch::json_patch(&mut s, &p).map_err(ApiError::bad_request)?;
            } else {
                crate::patch::merge_patch(&mut s, &p);
            }
            s.pointer("/spec/replicas").and_then(Value::as_i64)
        }
        _ => return Err(ApiError::method_not_allowed()),
    };
    let Some(r) = replicas.filter(|r| *r >= 0) else {
        let mut e = Errs::default();
        e.invalid(
            "spec.replicas",
            &json!(replicas),
            "must be greater than or equal to 0",
        );
        return Err(ApiError::invalid("autoscaling", "Scale", name, &e.0));
    };
    st.set_replicas(ti, ns, name, r, manager, dry_run)?;
    ok(st.scale_of(ti, ns, name)?)
}
