//! SIMULATED: the EKS add-on API, which moto (5.2) does not serve (its answer is HTTP 404).
//!
//! The proxy answers these five calls itself, following the EKS API reference (REST-JSON),
//! and forwards everything else to moto as before:
//!
//! | call | request | answer |
//! | --- | --- | --- |
//! | `CreateAddon` | `POST /clusters/{name}/addons` | `{"addon": {...}}`, status `CREATING` |
//! | `ListAddons` | `GET /clusters/{name}/addons` | `{"addons": [names], "nextToken": null}` |
//! | `DescribeAddon` | `GET /clusters/{name}/addons/{addonName}` | `{"addon": {...}}` |
//! | `UpdateAddon` | `POST /clusters/{name}/addons/{addonName}/update` | `{"update": {...}}`, the add-on `UPDATING` |
//! | `DeleteAddon` | `DELETE /clusters/{name}/addons/{addonName}` | `{"addon": {...}}`, status `DELETING` |
//!
//! An add-on carries `addonName`, `clusterName`, `status`, `addonVersion`, `addonArn`,
//! `configurationValues`, `createdAt`, `modifiedAt` (epoch seconds), `tags` and `health`.
//! A `CREATING`, `UPDATING` or `DELETING` add-on is read once in that state and settles on the
//! next `DescribeAddon` (`ACTIVE`, or gone), so a waiter polls at least twice.
//!
//! Errors carry the code in the `x-amzn-ErrorType` header and `{"message": ...}`:
//! `ResourceNotFoundException` (404) for a cluster moto does not know or an unknown add-on,
//! `ResourceInUseException` (409) for a second `CreateAddon` of one name or a change of an
//! add-on that is being deleted, `InvalidParameterException` (400) for a missing `addonName`,
//! a body that is not JSON, or `configurationValues` that are not a JSON object.
//!
//! The cluster's existence is asked of moto (`DescribeCluster`, the caller's own headers) on
//! every call, so a cluster deleted in moto takes its add-ons with it, as in EKS; add-ons of
//! a cluster created again under the same name (another `createdAt`) are forgotten. The
//! state is shared by every proxy in the process in front of the same moto. Not simulated:
//! add-on versions (`DescribeAddonVersions`), tagging an add-on after creation
//! (`TagResource` still goes to moto), service-account roles, pod identity associations.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::HeaderMap;
use hyper::{Method, Response, StatusCode, Uri};
use serde_json::{Value, json};

use crate::{Shared, forward, json_error};

/// The add-on calls the proxy answers itself.
pub(crate) const ACTIONS: [&str; 5] = [
    "CreateAddon",
    "ListAddons",
    "DescribeAddon",
    "UpdateAddon",
    "DeleteAddon",
];

/// The version an add-on gets when the request names none.
pub const DEFAULT_VERSION: &str = "v1.19.0-eksbuild.1";

#[derive(Clone, Debug)]
struct Addon {
    status: String,
    version: String,
    arn: String,
    configuration: Option<String>,
    created_at: f64,
    modified_at: f64,
    tags: serde_json::Map<String, Value>,
    /// `createdAt` of the cluster it was made on.
    cluster_created: f64,
}

/// (upstream, cluster, add-on) → add-on.
type Store = BTreeMap<(String, String, String), Addon>;

fn store() -> MutexGuard<'static, Store> {
    static STORE: OnceLock<Mutex<Store>> = OnceLock::new();
    STORE
        .get_or_init(|| Mutex::new(Store::new()))
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| (d.as_millis() as f64) / 1000.0)
        .unwrap_or_default()
}

/// An EKS error answer: HTTP status, `x-amzn-ErrorType` code, message.
struct ApiError(StatusCode, &'static str, String);

impl ApiError {
    fn response(self) -> Response<Full<Bytes>> {
        json_error(
            self.0,
            self.1,
            "application/json",
            json!({ "message": self.2 }).to_string(),
            "aws-fault-proxy-addons",
        )
    }
}

fn ok(body: Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(StatusCode::OK)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("valid response")
}

fn not_found(message: String) -> ApiError {
    ApiError(StatusCode::NOT_FOUND, "ResourceNotFoundException", message)
}

fn invalid(message: String) -> ApiError {
    ApiError(
        StatusCode::BAD_REQUEST,
        "InvalidParameterException",
        message,
    )
}

fn in_use(message: String) -> ApiError {
    ApiError(StatusCode::CONFLICT, "ResourceInUseException", message)
}

fn shape(cluster: &str, name: &str, a: &Addon) -> Value {
    let mut v = json!({
        "addonName": name,
        "clusterName": cluster,
        "status": a.status,
        "addonVersion": a.version,
        "addonArn": a.arn,
        "createdAt": a.created_at,
        "modifiedAt": a.modified_at,
        "tags": a.tags,
        "health": { "issues": [] },
    });
    if let Some(c) = &a.configuration {
        v["configurationValues"] = json!(c);
    }
    v
}

/// `configurationValues` of a request: absent, or a JSON object as a string.
fn configuration(body: &Value) -> Result<Option<String>, ApiError> {
    match body.get("configurationValues") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(Some(String::new())),
        Some(Value::String(s)) => match serde_json::from_str::<Value>(s) {
            Ok(Value::Object(_)) => Ok(Some(s.clone())),
            _ => Err(invalid(format!(
                "ConfigurationValue provided in request is not supported: {s} is not a JSON object"
            ))),
        },
        Some(other) => Err(invalid(format!(
            "configurationValues must be a string, not {other}"
        ))),
    }
}

/// The cluster as moto describes it: `(arn, createdAt)`, or `None` when moto does not know it.
async fn cluster(
    shared: &Shared,
    headers: &HeaderMap,
    name: &str,
) -> Result<Option<(String, f64)>, ApiError> {
    let uri: Uri = format!("/clusters/{name}")
        .parse()
        .map_err(|e| invalid(format!("cluster name {name:?}: {e}")))?;
    let mut headers = headers.clone();
    headers.remove(hyper::header::CONTENT_TYPE);
    let resp = forward(shared, Method::GET, &uri, headers, Bytes::new())
        .await
        .map_err(|e| {
            ApiError(
                StatusCode::BAD_GATEWAY,
                "ServerException",
                format!("asking moto for cluster {name}: {e}"),
            )
        })?;
    if resp.status() == StatusCode::NOT_FOUND {
        return Ok(None);
    }
    let bytes = crate::full_bytes(resp.into_body());
    let v: Value = serde_json::from_slice(&bytes).unwrap_or_default();
    let c = &v["cluster"];
    Ok(c["arn"]
        .as_str()
        .map(|arn| (arn.to_owned(), c["createdAt"].as_f64().unwrap_or_default())))
}

/// Answers one add-on call (`call` is one of [`ACTIONS`]).
pub(crate) async fn answer(
    shared: &Shared,
    action: &str,
    path: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Response<Full<Bytes>> {
    answer_inner(shared, action, path, headers, body)
        .await
        .unwrap_or_else(ApiError::response)
}

async fn answer_inner(
    shared: &Shared,
    action: &str,
    path: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response<Full<Bytes>>, ApiError> {
    let segs: Vec<String> = path
        .trim_matches('/')
        .split('/')
        .map(|s| {
            form_urlencoded::parse(format!("x={s}").as_bytes())
                .next()
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default()
        })
        .collect();
    let cluster_name = segs.get(1).cloned().unwrap_or_default();
    let body: Value = if body.is_empty() {
        json!({})
    } else {
        serde_json::from_slice(body)
            .map_err(|e| invalid(format!("the request body is not JSON: {e}")))?
    };
    let Some((cluster_arn, cluster_created)) = cluster(shared, headers, &cluster_name).await?
    else {
        store().retain(|(u, c, _), _| !(u == &shared.upstream_display && c == &cluster_name));
        return Err(not_found(format!(
            "No cluster found for name: {cluster_name}."
        )));
    };
    let upstream = shared.upstream_display.clone();
    let mut st = store();
    // A cluster of the same name made again starts without add-ons.
    st.retain(|(u, c, _), a| {
        !(u == &upstream && c == &cluster_name && a.cluster_created != cluster_created)
    });
    let key = |name: &str| (upstream.clone(), cluster_name.clone(), name.to_owned());

    if action == "ListAddons" {
        let names: Vec<&str> = st
            .keys()
            .filter(|(u, c, _)| u == &upstream && c == &cluster_name)
            .map(|(_, _, n)| n.as_str())
            .collect();
        return Ok(ok(json!({ "addons": names, "nextToken": null })));
    }
    if action == "CreateAddon" {
        let name = body["addonName"].as_str().unwrap_or_default().to_owned();
        if name.is_empty() {
            return Err(invalid("addonName is required".into()));
        }
        let configuration = configuration(&body)?;
        if st.contains_key(&key(&name)) {
            return Err(in_use(format!(
                "Addon already exists: {name} on cluster {cluster_name}"
            )));
        }
        let t = now();
        let arn = match cluster_arn.split_once(":cluster/") {
            Some((head, _)) => format!("{head}:addon/{cluster_name}/{name}/{}", t as u64),
            None => format!("arn:aws:eks:us-east-1:123456789012:addon/{cluster_name}/{name}"),
        };
        let addon = Addon {
            status: "CREATING".into(),
            version: body["addonVersion"]
                .as_str()
                .unwrap_or(DEFAULT_VERSION)
                .to_owned(),
            arn,
            configuration,
            created_at: t,
            modified_at: t,
            tags: body["tags"].as_object().cloned().unwrap_or_default(),
            cluster_created,
        };
        let out = shape(&cluster_name, &name, &addon);
        st.insert(key(&name), addon);
        return Ok(ok(json!({ "addon": out })));
    }

    let name = segs.get(3).cloned().unwrap_or_default();
    let Some(addon) = st.get_mut(&key(&name)) else {
        return Err(not_found(format!(
            "No addon: {name} found in cluster: {cluster_name}"
        )));
    };
    match action {
        "DescribeAddon" => {
            let out = shape(&cluster_name, &name, addon);
            // Settles after one read in a transitional state.
            match addon.status.as_str() {
                "DELETING" => {
                    st.remove(&key(&name));
                }
                "CREATING" | "UPDATING" => addon.status = "ACTIVE".into(),
                _ => {}
            }
            Ok(ok(json!({ "addon": out })))
        }
        "UpdateAddon" => {
            if addon.status == "DELETING" {
                return Err(in_use(format!("Addon {name} is being deleted")));
            }
            let configuration = configuration(&body)?;
            let t = now();
            let mut params = Vec::new();
            if let Some(c) = configuration {
                params.push(json!({ "type": "ConfigurationValues", "value": c }));
                addon.configuration = (!c.is_empty()).then_some(c);
            }
            if let Some(v) = body["addonVersion"].as_str() {
                params.push(json!({ "type": "AddonVersion", "value": v }));
                addon.version = v.to_owned();
            }
            addon.status = "UPDATING".into();
            addon.modified_at = t;
            Ok(ok(json!({ "update": {
                "id": format!("{:032x}", (t * 1000.0) as u128),
                "status": "InProgress",
                "type": "AddonUpdate",
                "params": params,
                "createdAt": t,
                "errors": [],
            } })))
        }
        "DeleteAddon" => {
            addon.status = "DELETING".into();
            addon.modified_at = now();
            Ok(ok(json!({ "addon": shape(&cluster_name, &name, addon) })))
        }
        other => Err(invalid(format!("{other} is not an add-on call"))),
    }
}
