//! The model engine against scikit-learn: each fixture under
//! `tests/data/models/` is a standard skl2onnx export, loaded unmodified, with
//! scikit-learn's `predict_proba` / `predict` for 200 fixed rows
//! (regenerate with `make_fixtures.py` there). Plus the engine's answers to
//! bad models and bad batches: errors, never panics.

use std::path::PathBuf;

use mesh_runtime::model::{Batch, ClassLabels, Column, InputKind, Label, Model, ModelError};
use serde_json::Value;

const TOLERANCE: f64 = 1e-5;

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/models")
        .join(name)
}

fn read(name: &str) -> Vec<u8> {
    let path = data(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn load(name: &str) -> Model {
    Model::from_bytes(&read(name)).unwrap_or_else(|e| panic!("load {name}: {e}"))
}

struct Fixture {
    model: Model,
    columns: Vec<Column>,
    rows: usize,
    probabilities: Vec<Vec<f64>>,
    labels: Vec<i64>,
}

fn fixture(name: &str) -> Fixture {
    let model = load(&format!("{name}.onnx"));
    let expected: Value =
        serde_json::from_slice(&read(&format!("{name}.expected.json"))).expect("expected json");
    let rows = expected["rows"].as_u64().expect("rows") as usize;
    let inputs = expected["inputs"].as_array().expect("inputs");
    assert_eq!(model.inputs().len(), inputs.len(), "{name}: input count");
    let mut columns = Vec::new();
    for (spec, input) in model.inputs().iter().zip(inputs) {
        assert_eq!(
            spec.name,
            input["name"].as_str().expect("name"),
            "{name}: input order"
        );
        assert_eq!(spec.width, 1);
        let values = input["values"].as_array().expect("values");
        let column = match input["kind"].as_str() {
            Some("str") => {
                assert_eq!(spec.kind, InputKind::Str, "{name}: {}", spec.name);
                Column::Str(
                    values
                        .iter()
                        .map(|v| v.as_str().expect("string").to_owned())
                        .collect(),
                )
            }
            _ => {
                assert_eq!(spec.kind, InputKind::F32, "{name}: {}", spec.name);
                Column::F32(
                    values
                        .iter()
                        .map(|v| v.as_f64().expect("number") as f32)
                        .collect(),
                )
            }
        };
        assert_eq!(column.len(), rows);
        columns.push(column);
    }
    let probabilities = expected["probabilities"]
        .as_array()
        .expect("probabilities")
        .iter()
        .map(|r| {
            r.as_array()
                .expect("row")
                .iter()
                .map(|p| p.as_f64().expect("p"))
                .collect()
        })
        .collect();
    let labels = expected["labels"]
        .as_array()
        .expect("labels")
        .iter()
        .map(|l| l.as_i64().expect("label"))
        .collect();
    assert_eq!(model.classes(), &ClassLabels::Int(vec![0, 1]));
    Fixture {
        model,
        columns,
        rows,
        probabilities,
        labels,
    }
}

/// Row `r` of every column, as a one-row batch.
fn row(columns: &[Column], r: usize) -> Batch {
    let cols = columns
        .iter()
        .map(|c| match c {
            Column::F32(v) => Column::F32(vec![v[r]]),
            Column::F64(v) => Column::F64(vec![v[r]]),
            Column::I64(v) => Column::I64(vec![v[r]]),
            Column::Str(v) => Column::Str(vec![v[r].clone()]),
        })
        .collect();
    Batch::new(cols).expect("one-row batch")
}

/// Predicts the fixture as one batch and row by row; returns the max abs diff.
fn check(name: &str) -> f64 {
    let f = fixture(name);
    let batch = Batch::new(f.columns.clone()).expect("batch");
    assert_eq!(batch.rows(), f.rows);
    let out = f.model.predict(&batch).expect("predict");
    assert_eq!(out.classes, 2);
    assert_eq!(out.labels.len(), f.rows);
    let mut max = 0f64;
    for r in 0..f.rows {
        let single = f
            .model
            .predict(&row(&f.columns, r))
            .expect("predict one row");
        assert_eq!(
            single.labels,
            vec![out.labels[r].clone()],
            "{name} row {r}: batch vs single label"
        );
        assert_eq!(
            single.probabilities_of(0),
            out.probabilities_of(r),
            "{name} row {r}: batch vs single"
        );
        assert_eq!(
            out.labels[r],
            Label::Int(f.labels[r]),
            "{name} row {r}: label"
        );
        for (got, want) in out.probabilities_of(r).iter().zip(&f.probabilities[r]) {
            let d = (f64::from(*got) - want).abs();
            assert!(
                d <= TOLERANCE,
                "{name} row {r}: probability {got} vs scikit-learn {want}"
            );
            max = max.max(d);
        }
    }
    eprintln!("{name}: {} rows, max abs diff {max:.2e}", f.rows);
    max
}

#[test]
fn logistic_pipeline_matches_scikit_learn() {
    check("logistic");
}

#[test]
fn random_forest_matches_scikit_learn() {
    check("forest");
}

#[test]
fn gradient_boosting_matches_scikit_learn() {
    check("gbt");
}

#[test]
fn example_models_load_with_one_input_per_csv_column() {
    // The logistic model and the generations made beside it (gradient
    // boosting, the deliberately big forest): the same inputs, in order.
    for file in [
        "high_value.onnx",
        "high_value_gbt.onnx",
        "high_value_slow.onnx",
    ] {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../examples/customer-mesh")
            .join(file);
        let model = Model::from_bytes(&std::fs::read(path).expect("read model")).expect("load");
        let names: Vec<&str> = model.inputs().iter().map(|i| i.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "age",
                "gender",
                "region",
                "campaign",
                "loyalty_member",
                "total_spend_30d",
                "orders_90d",
                "days_since_last_order",
                "avg_basket"
            ],
            "{file}"
        );
    }
}

#[test]
fn zipmap_export_gives_the_same_probabilities() {
    let f = fixture("logistic");
    let zipmap = load("logistic_zipmap.onnx");
    let batch = Batch::new(f.columns.clone()).expect("batch");
    let a = f.model.predict(&batch).expect("predict");
    let b = zipmap.predict(&batch).expect("predict zipmap");
    assert_eq!(a, b);
}

#[test]
fn float_inputs_accept_f64_and_i64_columns() {
    let f = fixture("gbt");
    let f32_out = f
        .model
        .predict(&Batch::new(f.columns.clone()).expect("batch"))
        .expect("predict");
    let as_f64: Vec<Column> = f
        .columns
        .iter()
        .map(|c| match c {
            Column::F32(v) => Column::F64(v.iter().map(|&x| f64::from(x)).collect()),
            other => other.clone(),
        })
        .collect();
    let f64_out = f
        .model
        .predict(&Batch::new(as_f64).expect("batch"))
        .expect("predict f64");
    assert_eq!(f32_out, f64_out);
    // `age` holds integers: the same values as I64 give the same result.
    let mut as_i64 = f.columns.clone();
    if let Column::F32(v) = &as_i64[0] {
        as_i64[0] = Column::I64(v.iter().map(|&x| x as i64).collect());
    }
    let i64_out = f
        .model
        .predict(&Batch::new(as_i64).expect("batch"))
        .expect("predict i64");
    assert_eq!(f32_out, i64_out);
}

#[test]
fn nan_inputs_do_not_panic() {
    for name in ["logistic", "forest", "gbt"] {
        let f = fixture(name);
        let mut columns = f.columns.clone();
        for c in &mut columns {
            if let Column::F32(v) = c {
                v.iter_mut().step_by(3).for_each(|x| *x = f32::NAN);
            }
        }
        let out = f
            .model
            .predict(&Batch::new(columns).expect("batch"))
            .expect("predict with NaN");
        assert_eq!(out.labels.len(), f.rows);
        if name != "logistic" {
            // Trees send NaN down the false branch: probabilities stay finite.
            assert!(out.probabilities.iter().all(|p| p.is_finite()), "{name}");
        }
    }
}

#[test]
fn empty_batch_gives_empty_prediction() {
    let f = fixture("logistic");
    let empty: Vec<Column> = f
        .columns
        .iter()
        .map(|c| match c {
            Column::Str(_) => Column::Str(vec![]),
            _ => Column::F32(vec![]),
        })
        .collect();
    let out = f
        .model
        .predict(&Batch::new(empty).expect("batch"))
        .expect("predict");
    assert!(out.labels.is_empty() && out.probabilities.is_empty());
}

#[test]
fn garbage_bytes_are_an_error() {
    for bytes in [
        &b"definitely not an onnx model"[..],
        &[0xff; 64][..],
        &[0x0a, 0x80, 0x80, 0x80, 0x80, 0x10][..],
    ] {
        let err = Model::from_bytes(bytes).expect_err("garbage must not load");
        assert!(matches!(err, ModelError::Decode(_)), "{err}");
    }
    assert!(matches!(
        Model::from_bytes(&[]),
        Err(ModelError::MissingGraph)
    ));
    let logistic = read("logistic.onnx");
    assert!(Model::from_bytes(&logistic[..logistic.len() / 2]).is_err());
}

#[test]
fn corrupted_models_never_panic() {
    // Deterministic byte flips: loading may fail or succeed, and a model
    // that loads must predict or fail, but never panic or hang.
    for name in ["logistic", "gbt"] {
        let f = fixture(name);
        let bytes = read(&format!("{name}.onnx"));
        let batch = Batch::new(
            f.columns
                .iter()
                .map(|c| match c {
                    Column::F32(v) => Column::F32(v[..8].to_vec()),
                    Column::Str(v) => Column::Str(v[..8].to_vec()),
                    other => other.clone(),
                })
                .collect(),
        )
        .expect("batch");
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..400 {
            let mut b = bytes.clone();
            for _ in 0..3 {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let at = (state % b.len() as u64) as usize;
                b[at] ^= (state >> 32) as u8 | 1;
            }
            if let Ok(model) = Model::from_bytes(&b)
                && model.inputs().len() == batch.columns().len()
            {
                let _ = model.predict(&batch);
            }
        }
    }
}

#[test]
fn unsupported_operator_is_named_at_load() {
    let err = Model::from_bytes(&read("svm.onnx")).expect_err("SVMClassifier is not implemented");
    match &err {
        ModelError::UnsupportedOp { domain, op, .. } => {
            assert_eq!(
                (domain.as_str(), op.as_str()),
                ("ai.onnx.ml", "SVMClassifier")
            );
        }
        other => panic!("unexpected error {other}"),
    }
    let message = err.to_string();
    assert!(
        message.contains("SVMClassifier") && message.contains("node"),
        "{message}"
    );
}

#[test]
fn wrong_batches_are_errors() {
    let f = fixture("logistic");
    let m = &f.model;

    // Too few columns.
    let short = Batch::new(f.columns[..3].to_vec()).expect("batch");
    assert!(matches!(
        m.predict(&short),
        Err(ModelError::ColumnCount {
            expected: 9,
            got: 3
        })
    ));

    // A string column where a float is expected, and the reverse.
    let mut kinds = f.columns.clone();
    kinds.swap(0, 1);
    let err = m
        .predict(&Batch::new(kinds).expect("batch"))
        .expect_err("kinds");
    assert!(
        matches!(err, ModelError::ColumnKind { ref input, .. } if input == "age"),
        "{err}"
    );
    let mut ints_for_strings = f.columns.clone();
    ints_for_strings[1] = Column::I64(vec![1; f.rows]);
    let err = m
        .predict(&Batch::new(ints_for_strings).expect("batch"))
        .expect_err("kinds");
    assert!(
        matches!(err, ModelError::ColumnKind { ref input, .. } if input == "gender"),
        "{err}"
    );

    // Columns of different lengths.
    let mut ragged = f.columns.clone();
    ragged[4] = Column::F32(vec![1.0; f.rows - 1]);
    assert!(matches!(
        Batch::new(ragged),
        Err(ModelError::RaggedBatch { column: 4, .. })
    ));

    // Lengths that do not match the rows declared with `with_rows`.
    let doubled = Batch::with_rows(f.columns.clone(), f.rows / 2).expect("batch");
    let err = m.predict(&doubled).expect_err("lengths");
    assert!(matches!(err, ModelError::ColumnLength { .. }), "{err}");
    assert!(Batch::with_rows(f.columns.clone(), 7).is_err());
}

#[test]
fn model_is_send_sync_and_shared_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Model>();
    let f = fixture("forest");
    let batch = Batch::new(f.columns.clone()).expect("batch");
    let expected = f.model.predict(&batch).expect("predict");
    std::thread::scope(|s| {
        for _ in 0..2 {
            let model = f.model.clone();
            let (batch, expected) = (&batch, &expected);
            s.spawn(move || assert_eq!(&model.predict(batch).expect("predict"), expected));
        }
    });
}
