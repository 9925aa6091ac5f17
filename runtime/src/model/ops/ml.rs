//! `ai.onnx.ml` operators other than the tree ensembles.

use std::collections::HashMap;

use super::{NodeCtx, Op, PostTransform, arg, argmax, as_matrix};
use crate::model::ModelError;
use crate::model::tensor::{Data, Tensor};

pub fn build(ctx: &NodeCtx<'_>) -> Result<Box<dyn Op>, ModelError> {
    Ok(match ctx.node.op_type.as_str() {
        "OneHotEncoder" => Box::new(OneHotEncoder::new(ctx)?),
        "Scaler" => Box::new(Scaler::new(ctx)?),
        "LinearClassifier" => Box::new(LinearClassifier::new(ctx)?),
        "LinearRegressor" => Box::new(LinearRegressor::new(ctx)?),
        "Normalizer" => Box::new(Normalizer::new(ctx)?),
        // `ZipMap` would build one map per row; the engine keeps the
        // probability tensor instead, which is what the caller reads anyway.
        "ZipMap" => Box::new(super::basic::Identity),
        "Imputer" => Box::new(Imputer::new(ctx)?),
        "LabelEncoder" => Box::new(LabelEncoder::new(ctx)?),
        "CategoryMapper" => Box::new(CategoryMapper::new(ctx)?),
        "Binarizer" => Box::new(Binarizer {
            threshold: ctx.float("threshold", 0.0)?,
        }),
        "ArrayFeatureExtractor" => Box::new(ArrayFeatureExtractor),
        "FeatureVectorizer" => Box::new(FeatureVectorizer {
            dims: ctx
                .ints("inputdimensions")?
                .iter()
                .map(|&d| {
                    usize::try_from(d).map_err(|_| ctx.invalid("inputdimensions", "negative"))
                })
                .collect::<Result<_, _>>()?,
        }),
        _ => return Err(ctx.unsupported()),
    })
}

/// Category lookup: a linear scan for the usual handful, a map beyond.
#[derive(Debug)]
enum Lookup<K> {
    Few(Vec<K>),
    Many(HashMap<K, usize>),
}

impl<K: std::hash::Hash + Eq + Clone> Lookup<K> {
    fn new(keys: Vec<K>) -> Lookup<K> {
        if keys.len() <= 16 {
            Lookup::Few(keys)
        } else {
            let mut map = HashMap::with_capacity(keys.len());
            for (i, k) in keys.into_iter().enumerate() {
                map.entry(k).or_insert(i);
            }
            Lookup::Many(map)
        }
    }

    fn len(&self) -> usize {
        match self {
            Lookup::Few(v) => v.len(),
            Lookup::Many(m) => m.len(),
        }
    }
}

impl Lookup<String> {
    fn find(&self, key: &str) -> Option<usize> {
        match self {
            Lookup::Few(v) => v.iter().position(|k| k == key),
            Lookup::Many(m) => m.get(key).copied(),
        }
    }
}

impl Lookup<i64> {
    fn find(&self, key: i64) -> Option<usize> {
        match self {
            Lookup::Few(v) => v.iter().position(|&k| k == key),
            Lookup::Many(m) => m.get(&key).copied(),
        }
    }
}

// ---------------------------------------------------------------- OneHotEncoder

/// `OneHotEncoder`: output shape is the input shape plus a trailing
/// category axis. Unknown categories give all zeros when `zeros=1`.
#[derive(Debug)]
struct OneHotEncoder {
    strings: Option<Lookup<String>>,
    ints: Option<Lookup<i64>>,
    width: usize,
    zeros: bool,
}

impl OneHotEncoder {
    fn new(ctx: &NodeCtx<'_>) -> Result<Self, ModelError> {
        let strings = ctx.opt_strings("cats_strings")?;
        let ints = ctx.opt_ints("cats_int64s")?.map(<[i64]>::to_vec);
        let width = match (&strings, &ints) {
            (Some(s), None) => s.len(),
            (None, Some(i)) => i.len(),
            _ => {
                return Err(ctx.invalid(
                    "cats_strings",
                    "exactly one of cats_strings and cats_int64s must be set",
                ));
            }
        };
        Ok(OneHotEncoder {
            strings: strings.map(Lookup::new),
            ints: ints.map(Lookup::new),
            width,
            zeros: ctx.int("zeros", 1)? != 0,
        })
    }
}

impl Op for OneHotEncoder {
    fn run<'a>(
        &self,
        inputs: &[Option<&Tensor<'a>>],
        out: &mut Vec<Tensor<'a>>,
    ) -> Result<(), String> {
        let x = arg(inputs, 0)?;
        let n = x.len();
        let mut y = vec![0f32; n * self.width];
        let mut set = |i: usize, hit: Option<usize>| -> Result<(), String> {
            match hit {
                Some(c) => {
                    y[i * self.width + c] = 1.0;
                    Ok(())
                }
                None if self.zeros => Ok(()),
                None => Err("unknown category and zeros=0".into()),
            }
        };
        match (&x.data, &self.strings, &self.ints) {
            (Data::Str(v), Some(cats), _) => {
                for (i, s) in v.iter().enumerate() {
                    set(i, cats.find(s))?;
                }
            }
            (Data::Str(_), None, _) => return Err("string input but integer categories".into()),
            (_, _, Some(cats)) => {
                let v = x.to_i64().ok_or("unsupported input type")?;
                for (i, &k) in v.iter().enumerate() {
                    set(i, cats.find(k))?;
                }
            }
            _ => return Err(format!("{} input but string categories", x.dtype().name())),
        }
        let mut shape = x.shape.clone();
        shape.push(self.width);
        out.push(Tensor::f32(shape, y));
        Ok(())
    }
}

// ---------------------------------------------------------------- Scaler

/// `Scaler`: `(x - offset) * scale`, per column or broadcast from one value.
#[derive(Debug)]
struct Scaler {
    offset: Vec<f32>,
    scale: Vec<f32>,
}

impl Scaler {
    fn new(ctx: &NodeCtx<'_>) -> Result<Self, ModelError> {
        let offset = ctx.floats("offset")?.to_vec();
        let scale = ctx.floats("scale")?.to_vec();
        Ok(Scaler {
            offset: if offset.is_empty() { vec![0.0] } else { offset },
            scale: if scale.is_empty() { vec![1.0] } else { scale },
        })
    }
}

fn per_column(v: &[f32], cols: usize, what: &str) -> Result<(), String> {
    if v.len() == 1 || v.len() == cols {
        Ok(())
    } else {
        Err(format!("{what} has {} values for {cols} columns", v.len()))
    }
}

impl Op for Scaler {
    fn run<'a>(
        &self,
        inputs: &[Option<&Tensor<'a>>],
        out: &mut Vec<Tensor<'a>>,
    ) -> Result<(), String> {
        let x = arg(inputs, 0)?;
        let (_, cols) = as_matrix(x);
        per_column(&self.offset, cols, "offset")?;
        per_column(&self.scale, cols, "scale")?;
        let v = x.to_f32().ok_or("string input")?;
        let y = v
            .iter()
            .enumerate()
            .map(|(i, &x)| {
                let c = if cols == 0 { 0 } else { i % cols };
                let o = self.offset[if self.offset.len() == 1 { 0 } else { c }];
                let s = self.scale[if self.scale.len() == 1 { 0 } else { c }];
                (x - o) * s
            })
            .collect();
        out.push(Tensor::f32(x.shape.clone(), y));
        Ok(())
    }
}

// ---------------------------------------------------------------- linear models

/// Dense `rows x cols` coefficients plus intercepts: scores = x W^T + b.
#[derive(Debug)]
struct Linear {
    coefficients: Vec<f32>,
    intercepts: Vec<f32>,
    targets: usize,
}

impl Linear {
    fn new(ctx: &NodeCtx<'_>, targets: Option<usize>) -> Result<Self, ModelError> {
        let coefficients = ctx
            .opt_floats("coefficients")?
            .ok_or_else(|| ctx.missing("coefficients"))?
            .to_vec();
        let intercepts = ctx.floats("intercepts")?.to_vec();
        let targets = match targets {
            Some(t) => t,
            None if !intercepts.is_empty() => intercepts.len(),
            None => 1,
        };
        if targets == 0 || coefficients.len() % targets != 0 {
            return Err(ctx.invalid(
                "coefficients",
                format!("{} coefficients for {targets} targets", coefficients.len()),
            ));
        }
        if !intercepts.is_empty() && intercepts.len() != targets {
            return Err(ctx.invalid(
                "intercepts",
                format!("{} intercepts for {targets} targets", intercepts.len()),
            ));
        }
        Ok(Linear {
            coefficients,
            intercepts,
            targets,
        })
    }

    fn features(&self) -> usize {
        self.coefficients.len() / self.targets
    }

    /// Raw scores, row-major `[rows, targets]`.
    fn scores(&self, x: &Tensor<'_>) -> Result<(usize, Vec<f32>), String> {
        let (rows, cols) = as_matrix(x);
        if cols != self.features() {
            return Err(format!(
                "input has {cols} features, coefficients expect {}",
                self.features()
            ));
        }
        let v = x.to_f32().ok_or("string input")?;
        let mut out = Vec::with_capacity(rows * self.targets);
        for r in 0..rows {
            let row = &v[r * cols..(r + 1) * cols];
            for t in 0..self.targets {
                let w = &self.coefficients[t * cols..(t + 1) * cols];
                let dot: f64 = row
                    .iter()
                    .zip(w)
                    .map(|(&a, &b)| f64::from(a) * f64::from(b))
                    .sum();
                let b = self.intercepts.get(t).copied().unwrap_or(0.0);
                out.push((dot + f64::from(b)) as f32);
            }
        }
        Ok((rows, out))
    }
}

/// Class labels of a classifier op, ready to emit.
#[derive(Debug, Clone)]
pub enum Labels {
    Int(Vec<i64>),
    Str(Vec<String>),
}

impl Labels {
    pub fn parse(ctx: &NodeCtx<'_>, ints_name: &str) -> Result<Labels, ModelError> {
        if let Some(v) = ctx.opt_ints(ints_name)?.filter(|v| !v.is_empty()) {
            return Ok(Labels::Int(v.to_vec()));
        }
        match ctx.opt_strings("classlabels_strings")? {
            Some(v) if !v.is_empty() => Ok(Labels::Str(v)),
            _ => Err(ctx.missing(ints_name)),
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Labels::Int(v) => v.len(),
            Labels::Str(v) => v.len(),
        }
    }

    /// A label tensor of shape `[rows]` from class indices.
    pub fn tensor<'a>(&self, picks: &[usize]) -> Tensor<'a> {
        let shape = vec![picks.len()];
        match self {
            Labels::Int(v) => Tensor::i64(shape, picks.iter().map(|&i| v[i]).collect()),
            Labels::Str(v) => Tensor::str(shape, picks.iter().map(|&i| v[i].clone()).collect()),
        }
    }
}

/// `LinearClassifier`. With one coefficient row and two classes (the binary
/// convention), the row scores the second class: scores are `[-s, s]`, or
/// `[1 - sigmoid(s), sigmoid(s)]` under LOGISTIC.
#[derive(Debug)]
struct LinearClassifier {
    linear: Linear,
    labels: Labels,
    post: PostTransform,
}

impl LinearClassifier {
    fn new(ctx: &NodeCtx<'_>) -> Result<Self, ModelError> {
        let labels = Labels::parse(ctx, "classlabels_ints")?;
        let linear = Linear::new(ctx, None)?;
        let classes = labels.len();
        if linear.targets != classes && !(linear.targets == 1 && classes == 2) {
            return Err(ctx.invalid(
                "coefficients",
                format!("{} coefficient rows for {classes} classes", linear.targets),
            ));
        }
        Ok(LinearClassifier {
            linear,
            labels,
            post: PostTransform::parse(ctx)?,
        })
    }
}

impl Op for LinearClassifier {
    fn run<'a>(
        &self,
        inputs: &[Option<&Tensor<'a>>],
        out: &mut Vec<Tensor<'a>>,
    ) -> Result<(), String> {
        let x = arg(inputs, 0)?;
        let (rows, raw) = self.linear.scores(x)?;
        let classes = self.labels.len();
        let mut picks = Vec::with_capacity(rows);
        let scores = if self.linear.targets == 1 && classes == 2 {
            let mut scores = Vec::with_capacity(rows * 2);
            for &s in &raw {
                picks.push(usize::from(s > 0.0));
                match self.post {
                    PostTransform::Logistic => {
                        let p = super::sigmoid(s);
                        scores.extend([1.0 - p, p]);
                    }
                    PostTransform::None => scores.extend([-s, s]),
                    other => {
                        let mut row = [-s, s];
                        other.apply(&mut row);
                        scores.extend(row);
                    }
                }
            }
            scores
        } else {
            let mut scores = raw;
            for row in scores.chunks_mut(classes) {
                picks.push(argmax(row));
                self.post.apply(row);
            }
            scores
        };
        out.push(self.labels.tensor(&picks));
        out.push(Tensor::f32(vec![rows, classes], scores));
        Ok(())
    }
}

/// `LinearRegressor`: `[rows, targets]` scores.
#[derive(Debug)]
struct LinearRegressor {
    linear: Linear,
    post: PostTransform,
}

impl LinearRegressor {
    fn new(ctx: &NodeCtx<'_>) -> Result<Self, ModelError> {
        let targets = usize::try_from(ctx.int("targets", 1)?)
            .ok()
            .filter(|&t| t > 0)
            .ok_or_else(|| ctx.invalid("targets", "must be positive"))?;
        Ok(LinearRegressor {
            linear: Linear::new(ctx, Some(targets))?,
            post: PostTransform::parse(ctx)?,
        })
    }
}

impl Op for LinearRegressor {
    fn run<'a>(
        &self,
        inputs: &[Option<&Tensor<'a>>],
        out: &mut Vec<Tensor<'a>>,
    ) -> Result<(), String> {
        let (rows, mut scores) = self.linear.scores(arg(inputs, 0)?)?;
        for row in scores.chunks_mut(self.linear.targets) {
            self.post.apply(row);
        }
        out.push(Tensor::f32(vec![rows, self.linear.targets], scores));
        Ok(())
    }
}

// ---------------------------------------------------------------- Normalizer

#[derive(Debug, Clone, Copy)]
enum Norm {
    Max,
    L1,
    L2,
}

#[derive(Debug)]
struct Normalizer {
    norm: Norm,
}

impl Normalizer {
    fn new(ctx: &NodeCtx<'_>) -> Result<Self, ModelError> {
        let norm = match ctx.string("norm", "MAX")?.as_str() {
            "MAX" => Norm::Max,
            "L1" => Norm::L1,
            "L2" => Norm::L2,
            other => return Err(ctx.invalid("norm", format!("unknown norm {other:?}"))),
        };
        Ok(Normalizer { norm })
    }
}

impl Op for Normalizer {
    fn run<'a>(
        &self,
        inputs: &[Option<&Tensor<'a>>],
        out: &mut Vec<Tensor<'a>>,
    ) -> Result<(), String> {
        let x = arg(inputs, 0)?;
        let (_, cols) = as_matrix(x);
        let mut y = x.to_f32().ok_or("string input")?.into_owned();
        if cols > 0 {
            for row in y.chunks_mut(cols) {
                let d = match self.norm {
                    Norm::Max => row.iter().copied().fold(f32::NEG_INFINITY, f32::max),
                    Norm::L1 => row.iter().map(|v| v.abs()).sum(),
                    Norm::L2 => row.iter().map(|v| v * v).sum::<f32>().sqrt(),
                };
                if d != 0.0 {
                    row.iter_mut().for_each(|v| *v /= d);
                }
            }
        }
        out.push(Tensor::f32(x.shape.clone(), y));
        Ok(())
    }
}

// ---------------------------------------------------------------- Imputer

#[derive(Debug)]
enum Imputer {
    Float { values: Vec<f32>, replaced: f32 },
    Int { values: Vec<i64>, replaced: i64 },
}

impl Imputer {
    fn new(ctx: &NodeCtx<'_>) -> Result<Self, ModelError> {
        if let Some(v) = ctx
            .opt_floats("imputed_value_floats")?
            .filter(|v| !v.is_empty())
        {
            return Ok(Imputer::Float {
                values: v.to_vec(),
                replaced: ctx.float("replaced_value_float", 0.0)?,
            });
        }
        if let Some(v) = ctx
            .opt_ints("imputed_value_int64s")?
            .filter(|v| !v.is_empty())
        {
            return Ok(Imputer::Int {
                values: v.to_vec(),
                replaced: ctx.int("replaced_value_int64", 0)?,
            });
        }
        Err(ctx.missing("imputed_value_floats"))
    }
}

impl Op for Imputer {
    fn run<'a>(
        &self,
        inputs: &[Option<&Tensor<'a>>],
        out: &mut Vec<Tensor<'a>>,
    ) -> Result<(), String> {
        let x = arg(inputs, 0)?;
        let (_, cols) = as_matrix(x);
        match self {
            Imputer::Float { values, replaced } => {
                per_column(values, cols, "imputed_value_floats")?;
                let mut y = x.to_f32().ok_or("string input")?.into_owned();
                for (i, v) in y.iter_mut().enumerate() {
                    let hit = if replaced.is_nan() {
                        v.is_nan()
                    } else {
                        *v == *replaced
                    };
                    if hit {
                        *v = values[if values.len() == 1 { 0 } else { i % cols }];
                    }
                }
                out.push(Tensor::f32(x.shape.clone(), y));
            }
            Imputer::Int { values, replaced } => {
                if values.len() != 1 && values.len() != cols {
                    return Err(format!(
                        "{} imputed values for {cols} columns",
                        values.len()
                    ));
                }
                let mut y = x.to_i64().ok_or("string input")?.into_owned();
                for (i, v) in y.iter_mut().enumerate() {
                    if *v == *replaced {
                        *v = values[if values.len() == 1 { 0 } else { i % cols }];
                    }
                }
                out.push(Tensor::i64(x.shape.clone(), y));
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------- LabelEncoder

#[derive(Debug)]
enum Keys {
    Str(Lookup<String>),
    Int(Lookup<i64>),
    Float(Vec<f32>),
}

#[derive(Debug)]
enum Values {
    Str(Vec<String>, String),
    Int(Vec<i64>, i64),
    Float(Vec<f32>, f32),
}

/// `LabelEncoder` (opset 2+ keys/values form, and opset 1's `classes_strings`).
#[derive(Debug)]
struct LabelEncoder {
    keys: Keys,
    values: Values,
}

impl LabelEncoder {
    fn new(ctx: &NodeCtx<'_>) -> Result<Self, ModelError> {
        if let Some(classes) = ctx.opt_strings("classes_strings")? {
            // Opset 1: string <-> index, direction given by which default is set.
            let n = classes.len();
            if ctx.opt_string("default_string")?.is_some()
                && ctx.opt_int("default_int64")?.is_none()
            {
                return Ok(LabelEncoder {
                    keys: Keys::Int(Lookup::new((0..n as i64).collect())),
                    values: Values::Str(classes, ctx.string("default_string", "_Unused")?),
                });
            }
            return Ok(LabelEncoder {
                keys: Keys::Str(Lookup::new(classes)),
                values: Values::Int((0..n as i64).collect(), ctx.int("default_int64", -1)?),
            });
        }
        let keys = if let Some(k) = ctx.opt_strings("keys_strings")? {
            Keys::Str(Lookup::new(k))
        } else if let Some(k) = ctx.opt_ints("keys_int64s")? {
            Keys::Int(Lookup::new(k.to_vec()))
        } else if let Some(k) = ctx.opt_floats("keys_floats")? {
            Keys::Float(k.to_vec())
        } else {
            return Err(ctx.missing("keys_strings"));
        };
        let values = if let Some(v) = ctx.opt_strings("values_strings")? {
            Values::Str(v, ctx.string("default_string", "_Unused")?)
        } else if let Some(v) = ctx.opt_ints("values_int64s")? {
            Values::Int(v.to_vec(), ctx.int("default_int64", -1)?)
        } else if let Some(v) = ctx.opt_floats("values_floats")? {
            Values::Float(v.to_vec(), ctx.float("default_float", -0.0)?)
        } else {
            return Err(ctx.missing("values_strings"));
        };
        let (nk, nv) = (
            match &keys {
                Keys::Str(l) => l.len(),
                Keys::Int(l) => l.len(),
                Keys::Float(v) => v.len(),
            },
            match &values {
                Values::Str(v, _) => v.len(),
                Values::Int(v, _) => v.len(),
                Values::Float(v, _) => v.len(),
            },
        );
        if nk > nv {
            return Err(ctx.invalid("values", format!("{nk} keys but {nv} values")));
        }
        Ok(LabelEncoder { keys, values })
    }

    fn emit<'a>(&self, shape: Vec<usize>, hits: impl Iterator<Item = Option<usize>>) -> Tensor<'a> {
        match &self.values {
            Values::Str(v, d) => Tensor::str(
                shape,
                hits.map(|h| h.map_or(d, |i| &v[i]).clone()).collect(),
            ),
            Values::Int(v, d) => Tensor::i64(shape, hits.map(|h| h.map_or(*d, |i| v[i])).collect()),
            Values::Float(v, d) => {
                Tensor::f32(shape, hits.map(|h| h.map_or(*d, |i| v[i])).collect())
            }
        }
    }
}

impl Op for LabelEncoder {
    fn run<'a>(
        &self,
        inputs: &[Option<&Tensor<'a>>],
        out: &mut Vec<Tensor<'a>>,
    ) -> Result<(), String> {
        let x = arg(inputs, 0)?;
        let shape = x.shape.clone();
        let t = match (&self.keys, &x.data) {
            (Keys::Str(k), Data::Str(v)) => self.emit(shape, v.iter().map(|s| k.find(s))),
            (Keys::Int(k), Data::I64(v)) => self.emit(shape, v.iter().map(|&s| k.find(s))),
            (Keys::Float(k), _) => {
                let v = x.to_f32().ok_or("string input for float keys")?;
                self.emit(shape, v.iter().map(|&s| k.iter().position(|&q| q == s)))
            }
            _ => {
                return Err(format!(
                    "{} input does not match the keys",
                    x.dtype().name()
                ));
            }
        };
        out.push(t);
        Ok(())
    }
}

// ---------------------------------------------------------------- CategoryMapper

/// `CategoryMapper`: strings to integers or back, by position in the
/// `cats_strings` / `cats_int64s` pair.
#[derive(Debug)]
struct CategoryMapper {
    strings: Vec<String>,
    ints: Vec<i64>,
    to_int: Lookup<String>,
    to_str: Lookup<i64>,
    default_int: i64,
    default_string: String,
}

impl CategoryMapper {
    fn new(ctx: &NodeCtx<'_>) -> Result<Self, ModelError> {
        let strings = ctx.opt_strings("cats_strings")?.unwrap_or_default();
        let ints = ctx.ints("cats_int64s")?.to_vec();
        if strings.len() != ints.len() {
            return Err(ctx.invalid(
                "cats_int64s",
                format!("{} strings but {} integers", strings.len(), ints.len()),
            ));
        }
        Ok(CategoryMapper {
            to_int: Lookup::new(strings.clone()),
            to_str: Lookup::new(ints.clone()),
            strings,
            ints,
            default_int: ctx.int("default_int64", -1)?,
            default_string: ctx.string("default_string", "_Unused")?,
        })
    }
}

impl Op for CategoryMapper {
    fn run<'a>(
        &self,
        inputs: &[Option<&Tensor<'a>>],
        out: &mut Vec<Tensor<'a>>,
    ) -> Result<(), String> {
        let x = arg(inputs, 0)?;
        let shape = x.shape.clone();
        out.push(match &x.data {
            Data::Str(v) => Tensor::i64(
                shape,
                v.iter()
                    .map(|s| {
                        self.to_int
                            .find(s)
                            .map_or(self.default_int, |i| self.ints[i])
                    })
                    .collect(),
            ),
            Data::I64(v) => Tensor::str(
                shape,
                v.iter()
                    .map(|&k| {
                        self.to_str
                            .find(k)
                            .map_or(&self.default_string, |i| &self.strings[i])
                            .clone()
                    })
                    .collect(),
            ),
            _ => return Err(format!("unsupported input type {}", x.dtype().name())),
        });
        Ok(())
    }
}

// ---------------------------------------------------------------- small ones

#[derive(Debug)]
struct Binarizer {
    threshold: f32,
}

impl Op for Binarizer {
    fn run<'a>(
        &self,
        inputs: &[Option<&Tensor<'a>>],
        out: &mut Vec<Tensor<'a>>,
    ) -> Result<(), String> {
        let x = arg(inputs, 0)?;
        let v = x.to_f32().ok_or("string input")?;
        let y = v
            .iter()
            .map(|&a| if a > self.threshold { 1.0 } else { 0.0 })
            .collect();
        out.push(Tensor::f32(x.shape.clone(), y));
        Ok(())
    }
}

/// `ArrayFeatureExtractor`: picks columns of the last axis by index.
#[derive(Debug)]
struct ArrayFeatureExtractor;

impl Op for ArrayFeatureExtractor {
    fn run<'a>(
        &self,
        inputs: &[Option<&Tensor<'a>>],
        out: &mut Vec<Tensor<'a>>,
    ) -> Result<(), String> {
        let x = arg(inputs, 0)?;
        let idx = arg(inputs, 1)?.to_i64().ok_or("string indices")?;
        let cols = x.shape.last().copied().unwrap_or(1);
        let rows = x.len().checked_div(cols).unwrap_or(0);
        let mut pick = Vec::with_capacity(idx.len());
        for &i in idx.iter() {
            match usize::try_from(i) {
                Ok(u) if u < cols => pick.push(u),
                _ => return Err(format!("index {i} out of range for {cols} columns")),
            }
        }
        let mut shape = if x.shape.len() <= 1 {
            vec![1]
        } else {
            x.shape[..x.shape.len() - 1].to_vec()
        };
        shape.push(pick.len());
        let gather = |r: usize| pick.iter().map(move |&c| r * cols + c);
        out.push(match &x.data {
            Data::F32(v) => Tensor::f32(shape, (0..rows).flat_map(gather).map(|i| v[i]).collect()),
            Data::F64(v) => Tensor::f64(shape, (0..rows).flat_map(gather).map(|i| v[i]).collect()),
            Data::I64(v) => Tensor::i64(shape, (0..rows).flat_map(gather).map(|i| v[i]).collect()),
            Data::Str(v) => Tensor::str(
                shape,
                (0..rows).flat_map(gather).map(|i| v[i].clone()).collect(),
            ),
        });
        Ok(())
    }
}

/// `FeatureVectorizer`: concatenates `[rows, d_i]` inputs into floats.
#[derive(Debug)]
struct FeatureVectorizer {
    dims: Vec<usize>,
}

impl Op for FeatureVectorizer {
    fn run<'a>(
        &self,
        inputs: &[Option<&Tensor<'a>>],
        out: &mut Vec<Tensor<'a>>,
    ) -> Result<(), String> {
        let first = arg(inputs, 0)?;
        let rows = as_matrix(first).0;
        let total: usize = self.dims.iter().sum();
        let mut y = vec![0f32; rows * total];
        let mut offset = 0;
        for (i, &d) in self.dims.iter().enumerate() {
            let x = arg(inputs, i)?;
            let (r, c) = as_matrix(x);
            if r != rows {
                return Err(format!("input {i} has {r} rows, expected {rows}"));
            }
            let v = x.to_f32().ok_or("string input")?;
            for row in 0..rows {
                for j in 0..d.min(c) {
                    y[row * total + offset + j] = v[row * c + j];
                }
            }
            offset += d;
        }
        out.push(Tensor::f32(vec![rows, total], y));
        Ok(())
    }
}
