//! Pure-Rust evaluator for scikit-learn's ONNX exports (the classical-ML op
//! set: `ai.onnx.ml` OneHotEncoder, Scaler, LinearClassifier,
//! TreeEnsembleClassifier/Regressor, Normalizer, ZipMap, plus the few
//! `ai.onnx` ops skl2onnx emits around them: Concat, Reshape, Cast, ...).
//!
//! API contract used by the rest of the runtime (do not change without
//! updating the server):
//!
//! ```text
//! let model = Model::from_bytes(&std::fs::read("model.onnx")?)?;
//! for input in model.inputs() { /* input.name, input.kind, input.width */ }
//! let batch = Batch::new(vec![Column::Str(vec!["F".into()]), Column::F32(vec![42.0])])?;
//! let out = model.predict(&batch)?;          // out.labels.len() == batch.rows()
//! let p = out.probabilities_of(0);            // &[f32] of len model.classes().len()
//! ```

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

mod ops;
mod plan;
mod proto;
mod tensor;
#[cfg(test)]
mod tests;

use tensor::{Data, Tensor};

/// Element type of one model input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputKind {
    F32,
    F64,
    I64,
    Str,
}

impl fmt::Display for InputKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            InputKind::F32 => "float",
            InputKind::F64 => "double",
            InputKind::I64 => "int64",
            InputKind::Str => "string",
        })
    }
}

/// One declared graph input. skl2onnx pipelines built with one initial type
/// per column have one input per feature, each of shape `[N, 1]` (`width == 1`).
#[derive(Debug, Clone, PartialEq)]
pub struct InputSpec {
    pub name: String,
    pub kind: InputKind,
    /// Number of columns per row (the second dimension).
    pub width: usize,
}

/// Class labels of a classifier, in probability-column order.
#[derive(Debug, Clone, PartialEq)]
pub enum ClassLabels {
    Int(Vec<i64>),
    Str(Vec<String>),
}

/// A single predicted label.
#[derive(Debug, Clone, PartialEq)]
pub enum Label {
    Int(i64),
    Str(String),
}

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Label::Int(v) => write!(f, "{v}"),
            Label::Str(v) => f.write_str(v),
        }
    }
}

/// Column-major input values for one input, `rows * width` values long.
#[derive(Debug, Clone, PartialEq)]
pub enum Column {
    F32(Vec<f32>),
    F64(Vec<f64>),
    I64(Vec<i64>),
    Str(Vec<String>),
}

/// One batch: a column per model input, in the order of `Model::inputs()`.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    columns: Vec<Column>,
    rows: usize,
}

/// The output of a classifier over a batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    pub labels: Vec<Label>,
    /// Row-major `rows * classes` probabilities.
    pub probabilities: Vec<f32>,
    pub classes: usize,
}

impl Prediction {
    pub fn probabilities_of(&self, row: usize) -> &[f32] {
        &self.probabilities[row * self.classes..(row + 1) * self.classes]
    }
}

impl ClassLabels {
    /// Number of classes.
    pub fn len(&self) -> usize {
        match self {
            ClassLabels::Int(v) => v.len(),
            ClassLabels::Str(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Column {
    /// Number of values (rows times the input's width).
    pub fn len(&self) -> usize {
        match self {
            Column::F32(v) => v.len(),
            Column::F64(v) => v.len(),
            Column::I64(v) => v.len(),
            Column::Str(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The element type, named like [`InputKind`]'s display.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Column::F32(_) => "float",
            Column::F64(_) => "double",
            Column::I64(_) => "int64",
            Column::Str(_) => "string",
        }
    }
}

/// Everything that can go wrong loading a model or running it.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The bytes are not an ONNX protobuf.
    #[error("model is not a valid onnx protobuf")]
    Decode(#[source] prost::DecodeError),
    /// The model holds no graph.
    #[error("model has no graph")]
    MissingGraph,
    /// An initializer (or constant) cannot be decoded.
    #[error("tensor {name:?}: {reason}")]
    InvalidTensor { name: String, reason: String },
    /// A graph input has a type the engine does not take.
    #[error("graph input {name:?}: {reason}")]
    UnsupportedInput { name: String, reason: String },
    /// A node uses an operator the engine does not implement.
    #[error("unsupported operator {domain}.{op} in node {node:?}")]
    UnsupportedOp {
        domain: String,
        op: String,
        node: String,
    },
    /// A node lacks an attribute its operator requires.
    #[error("node {node:?}: missing attribute {attribute:?}")]
    MissingAttribute { node: String, attribute: String },
    /// A node's attribute has a wrong type, length or value.
    #[error("node {node:?}: attribute {attribute:?}: {reason}")]
    InvalidAttribute {
        node: String,
        attribute: String,
        reason: String,
    },
    /// A node reads a value no input, initializer or node defines.
    #[error("node {node:?} reads {value:?}, which nothing defines")]
    UndefinedValue { node: String, value: String },
    /// Two initializers, inputs or node outputs share a name.
    #[error("value {value:?} is defined more than once")]
    DuplicateValue { value: String },
    /// The nodes cannot be ordered.
    #[error("graph has a cycle through node {node:?}")]
    Cycle { node: String },
    /// The graph has no classifier, or not the label and probability outputs.
    #[error("model is not a classifier: {reason}")]
    NotAClassifier { reason: String },
    /// `Batch::new` got columns of different lengths.
    #[error("column {column} has {got} values, column 0 has {expected}")]
    RaggedBatch {
        column: usize,
        expected: usize,
        got: usize,
    },
    /// `Batch::with_rows` got a column whose length is not a multiple of the rows.
    #[error("column {column} has {got} values, not a multiple of {rows} rows")]
    UnevenColumn {
        column: usize,
        rows: usize,
        got: usize,
    },
    /// The batch does not have one column per model input.
    #[error("batch has {got} columns, the model has {expected} inputs")]
    ColumnCount { expected: usize, got: usize },
    /// A column's element type does not fit its input.
    #[error("input {input:?} takes {expected} values, got {got}")]
    ColumnKind {
        input: String,
        expected: InputKind,
        got: &'static str,
    },
    /// A column's length is not rows times the input's width.
    #[error("input {input:?} needs {expected} values ({rows} rows of {width}), got {got}")]
    ColumnLength {
        input: String,
        rows: usize,
        width: usize,
        expected: usize,
        got: usize,
    },
    /// A node failed while running (shapes or types the model did not expect).
    #[error("node {node:?} ({op}) failed: {reason}")]
    Eval {
        node: String,
        op: String,
        reason: String,
    },
    /// The graph's outputs do not have the shape or type of a prediction.
    #[error("unusable model output: {reason}")]
    Output { reason: String },
}

impl Batch {
    /// A batch of one-value-per-row columns (every skl2onnx export with one
    /// input per feature): all columns must have the same length.
    pub fn new(columns: Vec<Column>) -> Result<Batch, ModelError> {
        let rows = columns.first().map_or(0, Column::len);
        for (i, c) in columns.iter().enumerate() {
            if c.len() != rows {
                return Err(ModelError::RaggedBatch {
                    column: i,
                    expected: rows,
                    got: c.len(),
                });
            }
        }
        Ok(Batch { columns, rows })
    }

    /// A batch for inputs wider than one value per row: each column holds
    /// `rows * width` values, checked against the model by `predict`.
    pub fn with_rows(columns: Vec<Column>, rows: usize) -> Result<Batch, ModelError> {
        for (i, c) in columns.iter().enumerate() {
            let ok = if rows == 0 {
                c.is_empty()
            } else {
                c.len() % rows == 0
            };
            if !ok {
                return Err(ModelError::UnevenColumn {
                    column: i,
                    rows,
                    got: c.len(),
                });
            }
        }
        Ok(Batch { columns, rows })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn columns(&self) -> &[Column] {
        &self.columns
    }
}

/// A loaded model: the graph compiled into a flat plan. Immutable, `Send +
/// Sync`; clone it (an `Arc` bump) to share between threads.
#[derive(Clone)]
pub struct Model {
    inner: Arc<Inner>,
}

struct Inner {
    plan: plan::Plan,
    inputs: Vec<InputSpec>,
    classes: ClassLabels,
}

impl fmt::Debug for Model {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Model")
            .field("inputs", &self.inner.inputs)
            .field("classes", &self.inner.classes)
            .finish_non_exhaustive()
    }
}

impl Model {
    /// Decodes and compiles an ONNX model. Every operator is checked here:
    /// an unsupported one fails the load, naming the op and the node.
    pub fn from_bytes(bytes: &[u8]) -> Result<Model, ModelError> {
        let proto =
            <proto::ModelProto as prost::Message>::decode(bytes).map_err(ModelError::Decode)?;
        let compiled = plan::compile(&proto)?;
        Ok(Model {
            inner: Arc::new(Inner {
                plan: compiled.plan,
                inputs: compiled.specs,
                classes: compiled.classes,
            }),
        })
    }

    /// The graph inputs, in the order `Batch` columns must follow.
    pub fn inputs(&self) -> &[InputSpec] {
        &self.inner.inputs
    }

    /// The class labels, in probability-column order.
    pub fn classes(&self) -> &ClassLabels {
        &self.inner.classes
    }

    /// Scores a batch. The batch is checked against [`Model::inputs`] first
    /// (column count, kinds, lengths); float inputs also take `F64` and `I64`
    /// columns, converted to `f32`. NaN is passed to the model as is.
    pub fn predict(&self, batch: &Batch) -> Result<Prediction, ModelError> {
        let inner = &*self.inner;
        if batch.columns.len() != inner.inputs.len() {
            return Err(ModelError::ColumnCount {
                expected: inner.inputs.len(),
                got: batch.columns.len(),
            });
        }
        let rows = batch.rows;
        let mut feeds = Vec::with_capacity(inner.inputs.len());
        for ((spec, input), column) in inner
            .inputs
            .iter()
            .zip(&inner.plan.inputs)
            .zip(&batch.columns)
        {
            let expected = rows * spec.width;
            if column.len() != expected {
                return Err(ModelError::ColumnLength {
                    input: spec.name.clone(),
                    rows,
                    width: spec.width,
                    expected,
                    got: column.len(),
                });
            }
            let data = feed(spec, column)?;
            let mut shape = Vec::with_capacity(input.tail.len() + 1);
            shape.push(rows);
            shape.extend_from_slice(&input.tail);
            feeds.push(Tensor { shape, data });
        }
        let classes = inner.classes.len();
        if rows == 0 {
            return Ok(Prediction {
                labels: Vec::new(),
                probabilities: Vec::new(),
                classes,
            });
        }
        let (label, proba) = inner.plan.run(feeds)?;
        let labels: Vec<Label> = match &label.data {
            Data::I64(v) => v.iter().map(|&x| Label::Int(x)).collect(),
            Data::Str(v) => v.iter().map(|x| Label::Str(x.clone())).collect(),
            other => {
                return Err(ModelError::Output {
                    reason: format!("label output has type {}", other.dtype().name()),
                });
            }
        };
        if labels.len() != rows {
            return Err(ModelError::Output {
                reason: format!("{} labels for {rows} rows", labels.len()),
            });
        }
        let probabilities = match proba.to_f32() {
            Some(p) if p.len() == rows * classes => p.into_owned(),
            Some(p) => {
                return Err(ModelError::Output {
                    reason: format!(
                        "{} probabilities for {rows} rows of {classes} classes",
                        p.len()
                    ),
                });
            }
            None => {
                return Err(ModelError::Output {
                    reason: "probability output holds strings".into(),
                });
            }
        };
        Ok(Prediction {
            labels,
            probabilities,
            classes,
        })
    }
}

/// Borrows (or converts) a column as the data of its input tensor.
fn feed<'a>(spec: &InputSpec, column: &'a Column) -> Result<Data<'a>, ModelError> {
    let mismatch = || ModelError::ColumnKind {
        input: spec.name.clone(),
        expected: spec.kind,
        got: column.kind_name(),
    };
    Ok(match (spec.kind, column) {
        (InputKind::F32, Column::F32(v)) => Data::F32(Cow::Borrowed(v)),
        (InputKind::F32, Column::F64(v)) => {
            Data::F32(Cow::Owned(v.iter().map(|&x| x as f32).collect()))
        }
        (InputKind::F32, Column::I64(v)) => {
            Data::F32(Cow::Owned(v.iter().map(|&x| x as f32).collect()))
        }
        (InputKind::F64, Column::F64(v)) => Data::F64(Cow::Borrowed(v)),
        (InputKind::F64, Column::F32(v)) => {
            Data::F64(Cow::Owned(v.iter().map(|&x| f64::from(x)).collect()))
        }
        (InputKind::F64, Column::I64(v)) => {
            Data::F64(Cow::Owned(v.iter().map(|&x| x as f64).collect()))
        }
        (InputKind::I64, Column::I64(v)) => Data::I64(Cow::Borrowed(v)),
        (InputKind::Str, Column::Str(v)) => Data::Str(Cow::Borrowed(v)),
        _ => return Err(mismatch()),
    })
}
