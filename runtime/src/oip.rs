//! Open Inference Protocol (v2) for prediction endpoints: model metadata and
//! `infer` with named tensors. Inputs are the model's graph inputs, sent
//! explicitly (no enrichment); strings are `BYTES`. Outputs are `label` and
//! `probabilities`.

use serde::Deserialize;
use serde_json::{Value, json};

use crate::error::AppError;
use crate::input::Input;
use crate::model::{ClassLabels, InputKind};
use crate::predict::{check, column};
use crate::service::PredictionEndpoint;

/// The v2 datatype of a model input kind.
pub fn datatype(kind: InputKind) -> &'static str {
    match kind {
        InputKind::F32 => "FP32",
        InputKind::F64 => "FP64",
        InputKind::I64 => "INT64",
        InputKind::Str => "BYTES",
    }
}

/// `GET /v2/models/{name}`.
pub fn metadata(ep: &PredictionEndpoint, version: Option<&str>) -> Value {
    let inputs: Vec<Value> = ep
        .inputs
        .iter()
        .map(|i| json!({"name": i.name, "datatype": datatype(i.kind), "shape": [-1, i.width]}))
        .collect();
    json!({
        "name": ep.name,
        "versions": version.map(|v| vec![v]).unwrap_or_default(),
        "platform": "onnx",
        "inputs": inputs,
        "outputs": [
            {"name": "label", "datatype": label_type(ep), "shape": [-1]},
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, ep.class_names.len()]}
        ]
    })
}

fn label_type(ep: &PredictionEndpoint) -> &'static str {
    match ep.model.classes() {
        ClassLabels::Int(_) => "INT64",
        ClassLabels::Str(_) => "BYTES",
    }
}

#[derive(Deserialize)]
struct InferRequest {
    #[serde(default)]
    id: Option<String>,
    inputs: Vec<TensorIn>,
    #[serde(default)]
    outputs: Option<Vec<OutputRequest>>,
}

#[derive(Deserialize)]
struct TensorIn {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    data: Value,
}

#[derive(Deserialize)]
struct OutputRequest {
    name: String,
}

fn bad(message: String) -> AppError {
    AppError::bad_request("invalid_tensor", message)
}

fn flatten<'v>(value: &'v Value, out: &mut Vec<&'v Value>) {
    match value {
        Value::Array(items) => items.iter().for_each(|v| flatten(v, out)),
        other => out.push(other),
    }
}

fn tensor_input(value: &Value) -> Input<'_> {
    match value {
        Value::Null => Input::Absent,
        Value::String(s) => Input::Str(s.as_str().into()),
        other => Input::from_json(other),
    }
}

/// `POST /v2/models/{name}/infer`.
///
/// `generation`: the generation that scores the request (an endpoint with
/// generations), named in the answer's `parameters`.
pub async fn infer(
    ep: &PredictionEndpoint,
    generation: Option<usize>,
    version: Option<&str>,
    body: &[u8],
    max_batch: usize,
) -> Result<Value, AppError> {
    let request: InferRequest = serde_json::from_slice(body).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => {
            AppError::bad_request("invalid_request", e.to_string())
        }
        _ => AppError::bad_request("malformed_json", e.to_string()),
    })?;
    let mut tensors: Vec<Option<Vec<&Value>>> = vec![None; ep.inputs.len()];
    let mut rows: Option<usize> = None;
    for t in &request.inputs {
        let Some(slot) = ep.inputs.iter().position(|i| i.name == t.name) else {
            let names: Vec<&str> = ep.inputs.iter().map(|i| i.name.as_str()).collect();
            return Err(bad(format!(
                "unknown input `{}` (model inputs: {})",
                t.name,
                names.join(", ")
            )));
        };
        let spec = &ep.inputs[slot];
        let expected = datatype(spec.kind);
        let numeric = matches!(
            t.datatype.as_str(),
            "FP16"
                | "FP32"
                | "FP64"
                | "INT8"
                | "INT16"
                | "INT32"
                | "INT64"
                | "UINT8"
                | "UINT16"
                | "UINT32"
                | "UINT64"
                | "BOOL"
        );
        let accepted = match spec.kind {
            InputKind::Str => t.datatype == "BYTES",
            _ => numeric,
        };
        if !accepted {
            return Err(bad(format!(
                "input `{}` has datatype {}, expected {expected}",
                t.name, t.datatype
            )));
        }
        if tensors[slot].is_some() {
            return Err(bad(format!("input `{}` is sent twice", t.name)));
        }
        let n = match t.shape.as_slice() {
            [n] | [n, 1] if *n >= 0 => *n as usize,
            _ => {
                return Err(bad(format!(
                    "input `{}` has shape {:?}, expected [N] or [N, 1]",
                    t.name, t.shape
                )));
            }
        };
        let mut values = Vec::with_capacity(n);
        flatten(&t.data, &mut values);
        if values.len() != n {
            return Err(bad(format!(
                "input `{}` has {} values for shape {:?}",
                t.name,
                values.len(),
                t.shape
            )));
        }
        match rows {
            None => rows = Some(n),
            Some(r) if r != n => {
                return Err(bad(format!(
                    "input `{}` has {n} rows, other inputs have {r}",
                    t.name
                )));
            }
            _ => {}
        }
        tensors[slot] = Some(values);
    }
    let rows = rows.unwrap_or(0);
    if rows > max_batch {
        return Err(AppError::new(
            axum::http::StatusCode::PAYLOAD_TOO_LARGE,
            "batch_too_large",
            format!("{rows} rows is more than the limit of {max_batch}"),
        ));
    }
    let mut columns = Vec::with_capacity(ep.inputs.len());
    for (slot, spec) in ep.inputs.iter().enumerate() {
        let Some(values) = &tensors[slot] else {
            return Err(AppError::bad_request(
                "missing_feature",
                format!("missing input `{}`", spec.name),
            ));
        };
        let inputs: Vec<Input<'_>> = values.iter().map(|v| tensor_input(v)).collect();
        for (row, input) in inputs.iter().enumerate() {
            check(input, spec.kind, &spec.name).map_err(|mut e| {
                e.message = format!("row {row}: {}", e.message);
                e
            })?;
        }
        columns.push(column(spec.kind, inputs.iter()));
    }
    let wanted: Vec<String> = match request.outputs {
        None => vec!["label".into(), "probabilities".into()],
        Some(list) => list.into_iter().map(|o| o.name).collect(),
    };
    for name in &wanted {
        if name != "label" && name != "probabilities" {
            return Err(bad(format!(
                "unknown output `{name}` (outputs: label, probabilities)"
            )));
        }
    }
    let generation = generation.and_then(|g| Some(&ep.generations.as_ref()?.list[g]));
    let model = generation.map_or(&ep.model, |g| &g.model);
    let prediction = if rows == 0 {
        None
    } else {
        Some(
            crate::scoring::predict_rows(model, columns, rows)
                .await
                .map_err(|e| {
                    AppError::internal(format_args!("endpoint `{}`: model failed: {e}", ep.name))
                })?,
        )
    };
    let classes = ep.class_names.len();
    let mut outputs = Vec::new();
    for name in &wanted {
        if name == "label" {
            let data: Vec<Value> = prediction
                .iter()
                .flat_map(|p| p.labels.iter())
                .map(|l| match l {
                    crate::model::Label::Int(i) => json!(i),
                    crate::model::Label::Str(s) => json!(s),
                })
                .collect();
            outputs.push(
                json!({"name": "label", "datatype": label_type(ep), "shape": [rows], "data": data}),
            );
        } else {
            let data: Vec<f32> = prediction
                .iter()
                .flat_map(|p| p.probabilities.iter().copied())
                .collect();
            if data.iter().any(|p| !p.is_finite()) {
                return Err(AppError::new(
                    axum::http::StatusCode::UNPROCESSABLE_ENTITY,
                    "undefined_prediction",
                    "the model gave non-finite probabilities",
                ));
            }
            // Print each value as its shortest f32 spelling (`0.8`, not `0.800000011920929`).
            let data: Vec<f64> = data
                .iter()
                .map(|p| p.to_string().parse::<f64>().unwrap_or(f64::from(*p)))
                .collect();
            outputs.push(json!({"name": "probabilities", "datatype": "FP32", "shape": [rows, classes], "data": data}));
        }
    }
    let mut answer = json!({"model_name": ep.name, "outputs": outputs});
    if let Some(v) = version {
        answer["model_version"] = json!(v);
    }
    if let Some(id) = request.id {
        answer["id"] = json!(id);
    }
    if let Some(g) = generation {
        answer["parameters"] = json!({"generation": g.name});
    }
    Ok(answer)
}
