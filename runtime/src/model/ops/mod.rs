//! Operator implementations and the registry that builds them from nodes.
//!
//! Every operator is validated and preprocessed once, at load time, into a
//! value implementing [`Op`]; `run` then does no attribute parsing and no
//! string lookups. Run-time failures are plain reasons; the plan adds the node.

mod basic;
mod ml;
mod tree;

use super::ModelError;
use super::proto::{AttributeProto, NodeProto, TensorProto, attribute_type};
use super::tensor::{Tensor, from_proto};

/// One compiled operator.
pub trait Op: Send + Sync + std::fmt::Debug {
    /// Computes the node's outputs, pushed onto `out` in output order.
    /// `inputs` holds `None` for optional inputs left empty by the model.
    fn run<'a>(
        &self,
        inputs: &[Option<&Tensor<'a>>],
        out: &mut Vec<Tensor<'a>>,
    ) -> Result<(), String>;
}

/// Operator-set versions imported by the model, as needed by ops whose
/// semantics changed between versions.
#[derive(Debug, Clone, Copy)]
pub struct Opsets {
    pub onnx: i64,
    pub ml: i64,
}

/// Where a node comes from, for building and for error messages.
pub struct NodeCtx<'n> {
    pub node: &'n NodeProto,
    /// The node's name, or `#index` when the model left it empty.
    pub name: String,
    pub opsets: Opsets,
}

/// Operator domain `ai.onnx.ml`.
pub const ML: &str = "ai.onnx.ml";

/// Builds the operator for one node.
pub fn build(ctx: &NodeCtx<'_>) -> Result<Box<dyn Op>, ModelError> {
    let node = ctx.node;
    match node.domain.as_str() {
        "" | "ai.onnx" => basic::build(ctx),
        ML => match node.op_type.as_str() {
            "TreeEnsembleClassifier" => Ok(Box::new(tree::TreeEnsemble::classifier(ctx)?)),
            "TreeEnsembleRegressor" => Ok(Box::new(tree::TreeEnsemble::regressor(ctx)?)),
            _ => ml::build(ctx),
        },
        _ => Err(ctx.unsupported()),
    }
}

/// The class labels of a classifier node (`LinearClassifier`,
/// `TreeEnsembleClassifier`), `None` for any other node.
pub fn classifier_labels(ctx: &NodeCtx<'_>) -> Result<Option<super::ClassLabels>, ModelError> {
    let ints_name = match (ctx.node.domain.as_str(), ctx.node.op_type.as_str()) {
        (ML, "LinearClassifier") => "classlabels_ints",
        (ML, "TreeEnsembleClassifier") => "classlabels_int64s",
        _ => return Ok(None),
    };
    Ok(Some(match ml::Labels::parse(ctx, ints_name)? {
        ml::Labels::Int(v) => super::ClassLabels::Int(v),
        ml::Labels::Str(v) => super::ClassLabels::Str(v),
    }))
}

impl NodeCtx<'_> {
    pub fn unsupported(&self) -> ModelError {
        ModelError::UnsupportedOp {
            domain: if self.node.domain.is_empty() {
                "ai.onnx".into()
            } else {
                self.node.domain.clone()
            },
            op: self.node.op_type.clone(),
            node: self.name.clone(),
        }
    }

    pub fn invalid(&self, attribute: &str, reason: impl Into<String>) -> ModelError {
        ModelError::InvalidAttribute {
            node: self.name.clone(),
            attribute: attribute.into(),
            reason: reason.into(),
        }
    }

    pub fn missing(&self, attribute: &str) -> ModelError {
        ModelError::MissingAttribute {
            node: self.name.clone(),
            attribute: attribute.into(),
        }
    }

    fn attr(&self, name: &str, kind: i32) -> Result<Option<&AttributeProto>, ModelError> {
        match self.node.attribute.iter().find(|a| a.name == name) {
            None => Ok(None),
            Some(a) if !a.ref_attr_name.is_empty() => {
                Err(self.invalid(name, "attribute references are not supported"))
            }
            Some(a) if a.r#type == kind || a.r#type == 0 => Ok(Some(a)),
            Some(a) => Err(self.invalid(
                name,
                format!("expected attribute type {kind}, found {}", a.r#type),
            )),
        }
    }

    pub fn opt_int(&self, name: &str) -> Result<Option<i64>, ModelError> {
        Ok(self.attr(name, attribute_type::INT)?.map(|a| a.i))
    }

    pub fn int(&self, name: &str, default: i64) -> Result<i64, ModelError> {
        Ok(self.opt_int(name)?.unwrap_or(default))
    }

    pub fn opt_float(&self, name: &str) -> Result<Option<f32>, ModelError> {
        Ok(self.attr(name, attribute_type::FLOAT)?.map(|a| a.f))
    }

    pub fn float(&self, name: &str, default: f32) -> Result<f32, ModelError> {
        Ok(self.opt_float(name)?.unwrap_or(default))
    }

    pub fn opt_string(&self, name: &str) -> Result<Option<String>, ModelError> {
        Ok(self
            .attr(name, attribute_type::STRING)?
            .map(|a| String::from_utf8_lossy(&a.s).into_owned()))
    }

    pub fn string(&self, name: &str, default: &str) -> Result<String, ModelError> {
        Ok(self.opt_string(name)?.unwrap_or_else(|| default.to_owned()))
    }

    pub fn opt_ints(&self, name: &str) -> Result<Option<&[i64]>, ModelError> {
        Ok(self
            .attr(name, attribute_type::INTS)?
            .map(|a| a.ints.as_slice()))
    }

    pub fn ints(&self, name: &str) -> Result<&[i64], ModelError> {
        Ok(self.opt_ints(name)?.unwrap_or(&[]))
    }

    pub fn opt_floats(&self, name: &str) -> Result<Option<&[f32]>, ModelError> {
        Ok(self
            .attr(name, attribute_type::FLOATS)?
            .map(|a| a.floats.as_slice()))
    }

    pub fn floats(&self, name: &str) -> Result<&[f32], ModelError> {
        Ok(self.opt_floats(name)?.unwrap_or(&[]))
    }

    pub fn opt_strings(&self, name: &str) -> Result<Option<Vec<String>>, ModelError> {
        Ok(self.attr(name, attribute_type::STRINGS)?.map(|a| {
            a.strings
                .iter()
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect()
        }))
    }

    pub fn opt_tensor(&self, name: &str) -> Result<Option<Tensor<'static>>, ModelError> {
        match self.attr(name, attribute_type::TENSOR)? {
            None => Ok(None),
            Some(a) => {
                let default = TensorProto::default();
                let t = a.t.as_ref().unwrap_or(&default);
                from_proto(t)
                    .map(Some)
                    .map_err(|reason| self.invalid(name, reason))
            }
        }
    }

    /// A float list given either as `NAME` (floats) or `NAME_as_tensor`.
    pub fn floats_or_tensor(&self, name: &str) -> Result<Option<Vec<f32>>, ModelError> {
        if let Some(v) = self.opt_floats(name)? {
            return Ok(Some(v.to_vec()));
        }
        let tname = format!("{name}_as_tensor");
        match self.opt_tensor(&tname)? {
            None => Ok(None),
            Some(t) => t
                .to_f32()
                .map(|v| Some(v.into_owned()))
                .ok_or_else(|| self.invalid(&tname, "expected a numeric tensor")),
        }
    }
}

/// The `index`-th input, which the op requires.
pub fn arg<'t, 'a>(
    inputs: &'t [Option<&'t Tensor<'a>>],
    index: usize,
) -> Result<&'t Tensor<'a>, String> {
    inputs
        .get(index)
        .copied()
        .flatten()
        .ok_or_else(|| format!("missing input {index}"))
}

/// `post_transform` of the classical-ML ops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PostTransform {
    None,
    Softmax,
    Logistic,
    SoftmaxZero,
}

impl PostTransform {
    pub fn parse(ctx: &NodeCtx<'_>) -> Result<PostTransform, ModelError> {
        match ctx.string("post_transform", "NONE")?.as_str() {
            "NONE" => Ok(PostTransform::None),
            "SOFTMAX" => Ok(PostTransform::Softmax),
            "LOGISTIC" => Ok(PostTransform::Logistic),
            "SOFTMAX_ZERO" => Ok(PostTransform::SoftmaxZero),
            other => Err(ctx.invalid(
                "post_transform",
                format!(
                    "unsupported value {other:?} (expected NONE, SOFTMAX, LOGISTIC or SOFTMAX_ZERO)"
                ),
            )),
        }
    }

    /// Applies the transform to one row of scores, in place.
    pub fn apply(self, row: &mut [f32]) {
        match self {
            PostTransform::None => {}
            PostTransform::Logistic => row.iter_mut().for_each(|v| *v = sigmoid(*v)),
            PostTransform::Softmax => softmax(row),
            PostTransform::SoftmaxZero => {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0.0;
                for v in row.iter_mut() {
                    *v = if *v == 0.0 { 0.0 } else { (*v - max).exp() };
                    sum += *v;
                }
                if sum > 0.0 {
                    row.iter_mut().for_each(|v| *v /= sum);
                }
            }
        }
    }
}

pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// Softmax over a slice, in place.
pub fn softmax(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f32;
    for v in row.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    row.iter_mut().for_each(|v| *v /= sum);
}

/// Index of the first maximum (NaN never wins).
pub fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate().skip(1) {
        if v > row[best] || row[best].is_nan() {
            best = i;
        }
    }
    best
}

/// Interprets a tensor as `[rows, cols]`: rank 1 is one row of features,
/// higher ranks flatten the trailing dimensions.
pub fn as_matrix(t: &Tensor<'_>) -> (usize, usize) {
    match t.shape.len() {
        0 => (1, 1),
        1 => (1, t.shape[0]),
        _ => {
            let rows = t.shape[0];
            let cols = t.shape[1..].iter().product();
            (rows, cols)
        }
    }
}
