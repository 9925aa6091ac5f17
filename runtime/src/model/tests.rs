//! Unit tests on hand-built graphs: semantics the sklearn fixtures do not
//! reach (NaN routing, regressors, malformed graphs and trees).

use prost::Message;

use super::proto::{
    AttributeProto, Dimension, DimensionValue, GraphProto, ModelProto, NodeProto,
    OperatorSetIdProto, TensorShapeProto, TypeProto, TypeProtoTensor, ValueInfoProto,
    attribute_type, data_type,
};
use super::{Batch, ClassLabels, Column, Label, Model, ModelError};

fn ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: attribute_type::INTS,
        ints: v.to_vec(),
        ..Default::default()
    }
}

fn floats(name: &str, v: &[f32]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: attribute_type::FLOATS,
        floats: v.to_vec(),
        ..Default::default()
    }
}

fn strings(name: &str, v: &[&str]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: attribute_type::STRINGS,
        strings: v.iter().map(|s| s.as_bytes().to_vec()).collect(),
        ..Default::default()
    }
}

fn string(name: &str, v: &str) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: attribute_type::STRING,
        s: v.as_bytes().to_vec(),
        ..Default::default()
    }
}

fn input(name: &str, width: i64) -> ValueInfoProto {
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            tensor_type: Some(TypeProtoTensor {
                elem_type: data_type::FLOAT,
                shape: Some(TensorShapeProto {
                    dim: vec![
                        Dimension {
                            value: None,
                            denotation: String::new(),
                        },
                        Dimension {
                            value: Some(DimensionValue::DimValue(width)),
                            denotation: String::new(),
                        },
                    ],
                }),
            }),
            denotation: String::new(),
        }),
    }
}

fn node(
    op: &str,
    domain: &str,
    inputs: &[&str],
    outputs: &[&str],
    attribute: Vec<AttributeProto>,
) -> NodeProto {
    NodeProto {
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        name: format!("{op}_node"),
        op_type: op.into(),
        domain: domain.into(),
        attribute,
    }
}

fn model(nodes: Vec<NodeProto>, outputs: &[&str]) -> Vec<u8> {
    ModelProto {
        ir_version: 8,
        opset_import: vec![
            OperatorSetIdProto {
                domain: String::new(),
                version: 17,
            },
            OperatorSetIdProto {
                domain: "ai.onnx.ml".into(),
                version: 3,
            },
        ],
        graph: Some(GraphProto {
            node: nodes,
            name: "g".into(),
            input: vec![input("x", 2)],
            output: outputs
                .iter()
                .map(|n| ValueInfoProto {
                    name: n.to_string(),
                    r#type: None,
                })
                .collect(),
            ..Default::default()
        }),
        ..Default::default()
    }
    .encode_to_vec()
}

/// One tree: `x[0] <= 0.5` -> leaf 1 (class 1 weight 1.0) else leaf 2
/// (class 0 weight 1.0); NaN goes to the true side when `track` is set.
fn stump(track: bool, true_child: i64) -> NodeProto {
    node(
        "TreeEnsembleClassifier",
        "ai.onnx.ml",
        &["x"],
        &["label", "probabilities"],
        vec![
            ints("nodes_treeids", &[0, 0, 0]),
            ints("nodes_nodeids", &[0, 1, 2]),
            ints("nodes_featureids", &[0, 0, 0]),
            floats("nodes_values", &[0.5, 0.0, 0.0]),
            strings("nodes_modes", &["BRANCH_LEQ", "LEAF", "LEAF"]),
            ints("nodes_truenodeids", &[true_child, 0, 0]),
            ints("nodes_falsenodeids", &[2, 0, 0]),
            ints("nodes_missing_value_tracks_true", &[i64::from(track), 0, 0]),
            ints("class_treeids", &[0, 0]),
            ints("class_nodeids", &[1, 2]),
            ints("class_ids", &[1, 0]),
            floats("class_weights", &[1.0, 1.0]),
            ints("classlabels_int64s", &[0, 1]),
            string("post_transform", "NONE"),
        ],
    )
}

fn predict(bytes: &[u8], x: Vec<f32>) -> super::Prediction {
    let m = Model::from_bytes(bytes).expect("load");
    let rows = x.len() / 2;
    m.predict(&Batch::with_rows(vec![Column::F32(x)], rows).expect("batch"))
        .expect("predict")
}

#[test]
fn nan_follows_missing_value_tracks_true() {
    let tracked = model(vec![stump(true, 1)], &["label", "probabilities"]);
    let out = predict(&tracked, vec![f32::NAN, 0.0, 1.0, 0.0, 0.0, 0.0]);
    assert_eq!(out.labels, [Label::Int(1), Label::Int(0), Label::Int(1)]);
    assert_eq!(out.probabilities, [0.0, 1.0, 1.0, 0.0, 0.0, 1.0]);

    let untracked = model(vec![stump(false, 1)], &["label", "probabilities"]);
    let out = predict(&untracked, vec![f32::NAN, 0.0]);
    assert_eq!(out.labels, [Label::Int(0)]);
}

#[test]
fn cyclic_tree_is_rejected_at_load() {
    let bytes = model(vec![stump(false, 0)], &["label", "probabilities"]);
    let err = Model::from_bytes(&bytes).expect_err("cycle");
    assert!(matches!(err, ModelError::InvalidAttribute { .. }), "{err}");
}

#[test]
fn tree_feature_beyond_the_input_is_an_error() {
    let bytes = model(vec![stump(false, 1)], &["label", "probabilities"]);
    let m = Model::from_bytes(&bytes).expect("load");
    // Width 2 is declared; a width-1 batch is refused before the trees run.
    let err = m
        .predict(&Batch::new(vec![Column::F32(vec![1.0])]).expect("batch"))
        .expect_err("width");
    assert!(matches!(err, ModelError::ColumnLength { .. }), "{err}");
}

#[test]
fn linear_classifier_single_row_binary_and_string_labels() {
    let bytes = model(
        vec![node(
            "LinearClassifier",
            "ai.onnx.ml",
            &["x"],
            &["label", "probabilities"],
            vec![
                floats("coefficients", &[1.0, -1.0]),
                floats("intercepts", &[0.5]),
                strings("classlabels_strings", &["no", "yes"]),
                string("post_transform", "LOGISTIC"),
            ],
        )],
        &["label", "probabilities"],
    );
    let m = Model::from_bytes(&bytes).expect("load");
    assert_eq!(
        m.classes(),
        &ClassLabels::Str(vec!["no".into(), "yes".into()])
    );
    let out = predict(&bytes, vec![2.0, 0.0, 0.0, 2.0]);
    assert_eq!(
        out.labels,
        [Label::Str("yes".into()), Label::Str("no".into())]
    );
    let p = 1.0 / (1.0 + (-2.5f32).exp());
    assert!((out.probabilities[1] - p).abs() < 1e-6);
    assert!((out.probabilities[0] + out.probabilities[1] - 1.0).abs() < 1e-6);
}

#[test]
fn graph_without_classifier_node_is_refused() {
    // A hand-written "classifier" head from ai.onnx ops only is still not a
    // classifier (no classifier node): refused with a reason.
    let bytes = model(
        vec![
            node("Softmax", "", &["x"], &["p"], vec![]),
            node("ArgMax", "", &["p"], &["label"], vec![]),
        ],
        &["label", "p"],
    );
    let err = Model::from_bytes(&bytes).expect_err("not a classifier");
    assert!(matches!(err, ModelError::NotAClassifier { .. }), "{err}");
}

#[test]
fn malformed_graphs_are_named() {
    let undefined = model(
        vec![
            node("Identity", "", &["nowhere"], &["y"], vec![]),
            stump(false, 1),
        ],
        &["label", "probabilities"],
    );
    assert!(matches!(
        Model::from_bytes(&undefined),
        Err(ModelError::UndefinedValue { ref value, .. }) if value == "nowhere"
    ));

    let cycle = model(
        vec![
            node("Identity", "", &["b"], &["a"], vec![]),
            node("Identity", "", &["a"], &["b"], vec![]),
            stump(false, 1),
        ],
        &["label", "probabilities"],
    );
    assert!(matches!(
        Model::from_bytes(&cycle),
        Err(ModelError::Cycle { .. })
    ));

    let custom = model(
        vec![
            node("Frobnicate", "com.example", &["x"], &["y"], vec![]),
            stump(false, 1),
        ],
        &["label", "probabilities"],
    );
    let err = Model::from_bytes(&custom).expect_err("unknown op");
    assert_eq!(
        err.to_string(),
        "unsupported operator com.example.Frobnicate in node \"Frobnicate_node\""
    );
}

#[test]
fn regressor_aggregates_and_feeds_a_classifier() {
    // TreeEnsembleRegressor (AVERAGE of two stumps) -> Concat with x ->
    // the classifier stump reads feature 0 of the concatenation.
    let regressor = node(
        "TreeEnsembleRegressor",
        "ai.onnx.ml",
        &["x"],
        &["r"],
        vec![
            ints("nodes_treeids", &[0, 0, 0, 1]),
            ints("nodes_nodeids", &[0, 1, 2, 0]),
            ints("nodes_featureids", &[1, 0, 0, 0]),
            floats("nodes_values", &[10.0, 0.0, 0.0, 0.0]),
            strings("nodes_modes", &["BRANCH_LT", "LEAF", "LEAF", "LEAF"]),
            ints("nodes_truenodeids", &[1, 0, 0, 0]),
            ints("nodes_falsenodeids", &[2, 0, 0, 0]),
            ints("target_treeids", &[0, 0, 1]),
            ints("target_nodeids", &[1, 2, 0]),
            ints("target_ids", &[0, 0, 0]),
            floats("target_weights", &[0.0, 2.0, 1.0]),
            string("aggregate_function", "AVERAGE"),
            floats("base_values", &[-0.25]),
        ],
    );
    let mut classifier = stump(false, 1);
    classifier.input = vec!["rx".into()];
    let bytes = model(
        vec![
            regressor,
            node(
                "Concat",
                "",
                &["r", "x"],
                &["rx"],
                vec![AttributeProto {
                    name: "axis".into(),
                    r#type: attribute_type::INT,
                    i: 1,
                    ..Default::default()
                }],
            ),
            classifier,
        ],
        &["label", "probabilities"],
    );
    // Row 1: x[1] = 5 < 10 -> (0 + 1) / 2 - 0.25 = 0.25 <= 0.5 -> class 1.
    // Row 2: x[1] = 50 -> (2 + 1) / 2 - 0.25 = 1.25 > 0.5 -> class 0.
    let out = predict(&bytes, vec![0.0, 5.0, 0.0, 50.0]);
    assert_eq!(out.labels, [Label::Int(1), Label::Int(0)]);
}
