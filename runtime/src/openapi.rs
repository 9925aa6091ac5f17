//! The OpenAPI 3.1 document of a service, generated from its endpoints: one
//! path per route, request schemas listing each model's features (those an
//! enrichment can fill are optional) and each lookup's keys.

use serde_json::{Value, json};

use crate::model::InputKind;
use crate::service::{Endpoint, LookupEndpoint, PredictionEndpoint, Service};

/// Builds the document; `keyed`: the service takes keys (the document then
/// declares them, so the `/docs` page's Authorize button can send one).
pub fn document(service: &Service, keyed: bool) -> Value {
    let mut paths = serde_json::Map::new();
    let mut schemas = serde_json::Map::new();
    schemas.insert(
        "Error".into(),
        json!({
            "type": "object",
            "required": ["error"],
            "properties": {"error": {"type": "object", "required": ["code", "message"], "properties": {
                "code": {"type": "string"}, "message": {"type": "string"}}}}
        }),
    );
    let base = format!("/public/api/v1/{}", service.name);
    let mut names: Vec<&String> = service.endpoints.keys().collect();
    names.sort();
    let mut lookups = Vec::new();
    for name in names {
        match &service.endpoints[name] {
            Endpoint::Prediction(ep) => prediction(&base, ep, &mut paths, &mut schemas),
            Endpoint::Lookup(ep) => {
                lookup(&base, ep, &mut paths, &mut schemas);
                lookups.push(name.as_str());
            }
        }
    }
    if !lookups.is_empty() {
        lookup_endpoints(&base, &lookups, &mut paths);
    }
    for (path, what) in [
        ("/healthz", "Liveness: 200 once the process serves HTTP."),
        (
            "/readyz",
            "Readiness: 200 once models and datasets are loaded, 503 before.",
        ),
        ("/v2/health/live", "Open Inference Protocol liveness."),
        (
            "/v2/health/ready",
            "Open Inference Protocol readiness (as /readyz).",
        ),
        ("/metrics", "Prometheus metrics (text exposition)."),
    ] {
        paths.insert(
            path.into(),
            json!({"get": {"summary": what, "security": [], "responses": {"200": {"description": "OK"}}}}),
        );
    }
    let mut doc = json!({
        "openapi": "3.1.0",
        "info": {"title": format!("mesh service {}", service.name), "version": service.version.clone().unwrap_or_else(|| "0".into())},
        "paths": paths,
        "components": {"schemas": schemas}
    });
    if keyed {
        // Either scheme; the `/docs` page authorizes `apiKey` with the key it is given.
        doc["security"] = json!([{"bearer": []}, {"apiKey": []}]);
        doc["components"]["securitySchemes"] = json!({
            "bearer": {"type": "http", "scheme": "bearer", "description": "`Authorization: Bearer KEY`"},
            "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key", "description": "`X-API-Key: KEY`"}
        });
    }
    doc
}

fn errors() -> Value {
    let e = json!({"description": "error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}});
    json!({"400": e, "401": e, "403": e, "404": e, "413": e, "415": e, "422": e, "502": e, "503": e, "504": e})
}

fn post(summary: String, request: Value, response: Value) -> Value {
    let mut responses = errors();
    responses["200"] =
        json!({"description": "OK", "content": {"application/json": {"schema": response}}});
    json!({"post": {
        "summary": summary,
        "requestBody": {"required": true, "content": {"application/json": {"schema": request}}},
        "responses": responses
    }})
}

fn feature_type(kind: InputKind) -> Value {
    match kind {
        InputKind::F32 | InputKind::F64 => json!({"type": ["number", "boolean"]}),
        InputKind::I64 => json!({"type": ["integer", "boolean"]}),
        InputKind::Str => json!({"type": ["string", "integer"]}),
    }
}

fn prediction(
    base: &str,
    ep: &PredictionEndpoint,
    paths: &mut serde_json::Map<String, Value>,
    schemas: &mut serde_json::Map<String, Value>,
) {
    let mut props = serde_json::Map::new();
    let mut required = Vec::new();
    for (slot, spec) in ep.inputs.iter().enumerate() {
        let fillers: Vec<String> = ep
            .enrichments
            .iter()
            .filter(|en| en.targets.iter().any(|&(s, _)| s == slot))
            .map(|en| format!("{} by `{}`", en.describe, ep.fields.name(en.key_slot)))
            .collect();
        let mut schema = feature_type(spec.kind);
        if fillers.is_empty() {
            required.push(spec.name.clone());
        } else {
            schema["description"] = json!(format!(
                "filled from {} when absent",
                fillers.join(", then ")
            ));
        }
        props.insert(spec.name.clone(), schema);
    }
    let dispatch_key = match ep.generations.as_ref().map(|g| g.dispatch) {
        Some(crate::generations::DispatchBy::Key(slot)) => Some(slot),
        _ => None,
    };
    for slot in ep.inputs.len()..ep.fields.len() {
        let what = if Some(slot) == dispatch_key {
            "picks the generation (a stable hash of its value)"
        } else {
            "enrichment key"
        };
        props.insert(
            ep.fields.name(slot).to_string(),
            json!({"type": ["string", "integer"], "description": what}),
        );
    }
    let features = format!("{}Features", ep.name);
    schemas.insert(
        features.clone(),
        json!({"type": "object", "properties": props, "required": required, "additionalProperties": true}),
    );
    let fref = json!({"$ref": format!("#/components/schemas/{features}")});
    let probas: serde_json::Map<String, Value> = ep
        .class_names
        .iter()
        .map(|c| (c.clone(), json!({"type": "number"})))
        .collect();
    let mut result = json!({"type": "object", "properties": {
        "prediction": {"type": "string", "enum": ep.class_names},
        "probas": {"type": "object", "properties": probas},
        "enriched": {"type": "array", "items": {"type": "string"}}
    }});
    let generations: Option<Vec<&str>> = ep
        .generations
        .as_ref()
        .map(|g| g.list.iter().map(|g| g.name.as_str()).collect());
    if let Some(names) = &generations {
        result["properties"]["generation"] = json!({"type": "string", "enum": names,
            "description": "the generation that answered"});
    }
    paths.insert(
        format!("{base}/{}/predict", ep.name),
        post(
            format!("Predict with `{}`", ep.name),
            json!({"type": "object", "required": ["features"], "properties": {"features": fref}}),
            json!({"type": "object", "properties": {"result": result, "timing": {"type": "object"}}}),
        ),
    );
    paths.insert(
        format!("{base}/{}/predict-multi", ep.name),
        post(
            format!("Predict a batch with `{}`", ep.name),
            json!({"type": "object", "required": ["items"], "properties": {"items": {"type": "array",
                "items": {"type": "object", "required": ["features"], "properties": {"features": fref}}}}}),
            json!({"type": "object", "properties": {"items": {"type": "array", "items": {"type": "object", "properties": {
                "result": result, "error": {"$ref": "#/components/schemas/Error/properties/error"}}}}}}),
        ),
    );
    paths.insert(
        format!("/v2/models/{}", ep.name),
        json!({"get": {"summary": format!("Open Inference Protocol metadata of `{}`", ep.name),
            "responses": {"200": {"description": "OK"}}}}),
    );
    let tensors: Vec<Value> = ep
        .inputs
        .iter()
        .map(|i| json!({"name": i.name, "datatype": crate::oip::datatype(i.kind)}))
        .collect();
    paths.insert(
        format!("/v2/models/{}/infer", ep.name),
        post(
            format!("Open Inference Protocol inference with `{}` (inputs: {})", ep.name,
                serde_json::to_string(&tensors).unwrap_or_default()),
            json!({"type": "object", "required": ["inputs"], "properties": {"inputs": {"type": "array", "items": {
                "type": "object", "required": ["name", "shape", "datatype", "data"]}}}}),
            json!({"type": "object", "properties": {"outputs": {"type": "array"}}}),
        ),
    );
    if let Some(names) = generations {
        for route in [
            format!("{base}/{}/predict", ep.name),
            format!("{base}/{}/predict-multi", ep.name),
            format!("/v2/models/{}/infer", ep.name),
        ] {
            let Some(op) = paths.get_mut(&route).map(|p| &mut p["post"]) else {
                continue;
            };
            op["parameters"] = json!([{"name": "X-Mesh-Generation", "in": "header", "required": false,
                "description": "pins the generation that answers (a shadow too: for testing); an unknown name is a 400",
                "schema": {"type": "string", "enum": names}}]);
            op["responses"]["200"]["headers"] = json!({"X-Mesh-Generation": {
                "description": "the generation that answered (predict-multi: when every item has the same one)",
                "schema": {"type": "string"}}});
        }
    }
}

/// `lookup-endpoints`: the rows of several lookup endpoints per key.
fn lookup_endpoints(base: &str, lookups: &[&str], paths: &mut serde_json::Map<String, Value>) {
    let rows: serde_json::Map<String, Value> = lookups
        .iter()
        .map(|name| {
            (
                name.to_string(),
                json!({"type": ["object", "null"], "description": format!("the row `{name}/lookup` answers, null when it has none")}),
            )
        })
        .collect();
    let mut path = post(
        "Look up several lookup endpoints per key, in one call".into(),
        json!({"type": "object", "required": ["endpoints", "items"], "properties": {
            "endpoints": {"type": "array", "minItems": 1, "items": {"type": "string", "enum": lookups}},
            "items": {"type": "array", "items": {"type": "object", "required": ["data"], "properties": {
                "data": {"type": "object", "description": "the key fields of every endpoint named"}}}}}}),
        json!({"type": "object", "properties": {"items": {"type": "array", "items": {"type": "object",
            "properties": {"data": {"type": "object", "properties": rows,
                "description": "per endpoint asked: its row or null"}}}}}}),
    );
    path["post"]["description"] = json!(
        "One answer per item, in order; per item, per endpoint named in `endpoints`, the row that endpoint's `lookup` answers for the item's keys, or null where it has none. An unknown endpoint is a 404, an item without an endpoint's key a 400 naming the item."
    );
    paths.insert(format!("{base}/lookup-endpoints"), path);
}

fn lookup(
    base: &str,
    ep: &LookupEndpoint,
    paths: &mut serde_json::Map<String, Value>,
    schemas: &mut serde_json::Map<String, Value>,
) {
    let keys: serde_json::Map<String, Value> = (0..ep.fields.len())
        .map(|s| {
            (
                ep.fields.name(s).to_string(),
                json!({"type": ["string", "integer"]}),
            )
        })
        .collect();
    let required: Vec<&str> = (0..ep.fields.len()).map(|s| ep.fields.name(s)).collect();
    let name = format!("{}Keys", ep.name);
    schemas.insert(
        name.clone(),
        json!({"type": "object", "properties": keys, "required": required}),
    );
    let kref = json!({"$ref": format!("#/components/schemas/{name}")});
    paths.insert(
        format!("{base}/{}/lookup", ep.name),
        post(
            format!("Look up rows of `{}` by key", ep.name),
            json!({"type": "object", "required": ["data"], "properties": {"data": kref}}),
            json!({"type": "object", "properties": {"data": {"type": "object"}}}),
        ),
    );
    paths.insert(
        format!("{base}/{}/lookup-multi", ep.name),
        post(
            format!("Look up a batch of keys in `{}`", ep.name),
            json!({"type": "object", "required": ["items"], "properties": {"items": {"type": "array",
                "items": {"type": "object", "required": ["data"], "properties": {"data": kref}}}}}),
            json!({"type": "object", "properties": {"items": {"type": "array"}}}),
        ),
    );
}
