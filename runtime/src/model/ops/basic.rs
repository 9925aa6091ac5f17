//! `ai.onnx` operators that classical-ML exports put around the ML ops.

use std::borrow::Cow;

use super::{NodeCtx, Op, arg, softmax};
use crate::model::ModelError;
use crate::model::proto::data_type;
use crate::model::tensor::{DType, Data, Tensor, numel};

pub fn build(ctx: &NodeCtx<'_>) -> Result<Box<dyn Op>, ModelError> {
    let op: Box<dyn Op> = match ctx.node.op_type.as_str() {
        "Identity" => Box::new(Identity),
        "Constant" => Box::new(Constant::new(ctx)?),
        "Concat" => Box::new(Concat {
            axis: ctx.opt_int("axis")?.ok_or_else(|| ctx.missing("axis"))?,
        }),
        "Reshape" => Box::new(Reshape {
            allow_zero: ctx.int("allowzero", 0)? != 0,
        }),
        "Flatten" => Box::new(Flatten {
            axis: ctx.int("axis", 1)?,
        }),
        "Squeeze" | "Unsqueeze" => Box::new(Squeeze {
            unsqueeze: ctx.node.op_type == "Unsqueeze",
            axes: ctx.opt_ints("axes")?.map(<[i64]>::to_vec),
        }),
        "Cast" => {
            let to = ctx.opt_int("to")?.ok_or_else(|| ctx.missing("to"))?;
            let to = match i32::try_from(to).ok() {
                Some(data_type::FLOAT) => DType::F32,
                Some(data_type::DOUBLE) => DType::F64,
                Some(data_type::INT64 | data_type::INT32) => DType::I64,
                Some(data_type::STRING) => DType::Str,
                _ => {
                    return Err(
                        ctx.invalid("to", format!("casting to data type {to} is not supported"))
                    );
                }
            };
            Box::new(Cast { to })
        }
        "ArgMax" | "ArgMin" => Box::new(ArgMax {
            min: ctx.node.op_type == "ArgMin",
            axis: ctx.int("axis", 0)?,
            keepdims: ctx.int("keepdims", 1)? != 0,
            last: ctx.int("select_last_index", 0)? != 0,
        }),
        "Softmax" => {
            let legacy = ctx.opsets.onnx < 13;
            Box::new(Softmax {
                axis: ctx.int("axis", if legacy { 1 } else { -1 })?,
                legacy,
            })
        }
        "Sigmoid" => Box::new(Unary(UnaryKind::Sigmoid)),
        "Exp" => Box::new(Unary(UnaryKind::Exp)),
        "Log" => Box::new(Unary(UnaryKind::Log)),
        "Abs" => Box::new(Unary(UnaryKind::Abs)),
        "Neg" => Box::new(Unary(UnaryKind::Neg)),
        "Sqrt" => Box::new(Unary(UnaryKind::Sqrt)),
        "Relu" => Box::new(Unary(UnaryKind::Relu)),
        "Tanh" => Box::new(Unary(UnaryKind::Tanh)),
        "Add" => Box::new(Binary(BinaryKind::Add)),
        "Sub" => Box::new(Binary(BinaryKind::Sub)),
        "Mul" => Box::new(Binary(BinaryKind::Mul)),
        "Div" => Box::new(Binary(BinaryKind::Div)),
        "MatMul" => Box::new(MatMul),
        "Gemm" => Box::new(Gemm {
            alpha: ctx.float("alpha", 1.0)?,
            beta: ctx.float("beta", 1.0)?,
            trans_a: ctx.int("transA", 0)? != 0,
            trans_b: ctx.int("transB", 0)? != 0,
        }),
        _ => return Err(ctx.unsupported()),
    };
    Ok(op)
}

/// Resolves a possibly negative axis against a rank (`rank + 1` allowed
/// with `extra`).
fn axis_of(axis: i64, rank: usize, extra: bool) -> Result<usize, String> {
    let r = rank as i64 + i64::from(extra);
    let a = if axis < 0 { axis + r } else { axis };
    if (0..r.max(1)).contains(&a) {
        Ok(a as usize)
    } else {
        Err(format!("axis {axis} out of range for rank {rank}"))
    }
}

/// Passes its input through; also serves `ZipMap` (see `ml::build`).
#[derive(Debug)]
pub(super) struct Identity;

impl Op for Identity {
    fn run<'a>(
        &self,
        inputs: &[Option<&Tensor<'a>>],
        out: &mut Vec<Tensor<'a>>,
    ) -> Result<(), String> {
        out.push(arg(inputs, 0)?.clone());
        Ok(())
    }
}

#[derive(Debug)]
struct Constant {
    value: Tensor<'static>,
}

impl Constant {
    fn new(ctx: &NodeCtx<'_>) -> Result<Self, ModelError> {
        let value = if let Some(t) = ctx.opt_tensor("value")? {
            t
        } else if let Some(f) = ctx.opt_float("value_float")? {
            Tensor::f32(vec![], vec![f])
        } else if let Some(v) = ctx.opt_floats("value_floats")? {
            Tensor::f32(vec![v.len()], v.to_vec())
        } else if let Some(i) = ctx.opt_int("value_int")? {
            Tensor::i64(vec![], vec![i])
        } else if let Some(v) = ctx.opt_ints("value_ints")? {
            Tensor::i64(vec![v.len()], v.to_vec())
        } else if let Some(s) = ctx.opt_string("value_string")? {
            Tensor::str(vec![], vec![s])
        } else if let Some(v) = ctx.opt_strings("value_strings")? {
            Tensor::str(vec![v.len()], v)
        } else {
            return Err(ctx.missing("value"));
        };
        Ok(Constant { value })
    }
}

impl Op for Constant {
    fn run<'a>(&self, _: &[Option<&Tensor<'a>>], out: &mut Vec<Tensor<'a>>) -> Result<(), String> {
        out.push(self.value.clone());
        Ok(())
    }
}

#[derive(Debug)]
struct Concat {
    axis: i64,
}

fn concat_into<T: Clone>(parts: &[(&[T], usize)], outer: usize, out: &mut Vec<T>) {
    for o in 0..outer {
        for (data, chunk) in parts {
            out.extend_from_slice(&data[o * chunk..(o + 1) * chunk]);
        }
    }
}

impl Op for Concat {
    fn run<'a>(
        &self,
        inputs: &[Option<&Tensor<'a>>],
        out: &mut Vec<Tensor<'a>>,
    ) -> Result<(), String> {
        let first = arg(inputs, 0)?;
        let rank = first.shape.len();
        let axis = axis_of(self.axis, rank, false)?;
        let mut shape = first.shape.clone();
        shape[axis] = 0;
        let outer = numel(&first.shape[..axis]);
        let mut chunks = Vec::with_capacity(inputs.len());
        for i in 0..inputs.len() {
            let t = arg(inputs, i)?;
            if t.dtype() != first.dtype() {
                return Err(format!(
                    "input {i} is {}, input 0 is {}",
                    t.dtype().name(),
                    first.dtype().name()
                ));
            }
            let same = t.shape.len() == rank
                && t.shape
                    .iter()
                    .zip(&first.shape)
                    .enumerate()
                    .all(|(d, (a, b))| d == axis || a == b);
            if !same {
                return Err(format!(
                    "input {i} has shape {:?}, input 0 has {:?}",
                    t.shape, first.shape
                ));
            }
            shape[axis] += t.shape[axis];
            chunks.push(numel(&t.shape[axis..]));
        }
        let total = numel(&shape);
        macro_rules! cat {
            ($variant:ident, $ctor:ident) => {{
                let mut parts = Vec::with_capacity(inputs.len());
                for (i, &chunk) in chunks.iter().enumerate() {
                    if let Data::$variant(v) = &arg(inputs, i)?.data {
                        parts.push((v.as_ref(), chunk));
                    }
                }
                let mut v = Vec::with_capacity(total);
                concat_into(&parts, outer, &mut v);
                Tensor::$ctor(shape, v)
            }};
        }
        out.push(match first.dtype() {
            DType::F32 => cat!(F32, f32),
            DType::F64 => cat!(F64, f64),
            DType::I64 => cat!(I64, i64),
            DType::Str => cat!(Str, str),
        });
        Ok(())
    }
}

#[derive(Debug)]
struct Reshape {
    allow_zero: bool,
}

impl Op for Reshape {
    fn run<'a>(
        &self,
        inputs: &[Option<&Tensor<'a>>],
        out: &mut Vec<Tensor<'a>>,
    ) -> Result<(), String> {
        let x = arg(inputs, 0)?;
        let spec = arg(inputs, 1)?;
        let Data::I64(spec) = &spec.data else {
            return Err("shape must be int64".into());
        };
        let mut shape = Vec::with_capacity(spec.len());
        let mut infer = None;
        for (i, &d) in spec.iter().enumerate() {
            match d {
                -1 if infer.is_none() => {
                    infer = Some(i);
                    shape.push(1);
                }
                0 if !self.allow_zero => {
                    shape.push(*x.shape.get(i).ok_or("0 in shape beyond the input rank")?);
                }
                d if d >= 0 => shape.push(d as usize),
                _ => return Err(format!("invalid shape {spec:?}")),
            }
        }
        let known = numel(&shape);
        if let Some(i) = infer {
            if known == 0 || x.len() % known != 0 {
                return Err(format!("cannot reshape {:?} to {spec:?}", x.shape));
            }
            shape[i] = x.len() / known;
        }
        if numel(&shape) != x.len() {
            return Err(format!("cannot reshape {:?} to {spec:?}", x.shape));
        }
        out.push(x.reshaped(shape));
        Ok(())
    }
}

#[derive(Debug)]
struct Flatten {
    axis: i64,
}

impl Op for Flatten {
    fn run<'a>(
        &self,
        inputs: &[Option<&Tensor<'a>>],
        out: &mut Vec<Tensor<'a>>,
    ) -> Result<(), String> {
        let x = arg(inputs, 0)?;
        let axis = axis_of(self.axis, x.shape.len(), true)?;
        let shape = vec![numel(&x.shape[..axis]), numel(&x.shape[axis..])];
        out.push(x.reshaped(shape));
        Ok(())
    }
}

#[derive(Debug)]
struct Squeeze {
    unsqueeze: bool,
    axes: Option<Vec<i64>>,
}

impl Op for Squeeze {
    fn run<'a>(
        &self,
        inputs: &[Option<&Tensor<'a>>],
        out: &mut Vec<Tensor<'a>>,
    ) -> Result<(), String> {
        let x = arg(inputs, 0)?;
        let axes: Vec<i64> = match (&self.axes, inputs.get(1).copied().flatten()) {
            (Some(a), _) => a.clone(),
            (None, Some(t)) => t.to_i64().ok_or("axes must be integers")?.into_owned(),
            (None, None) => Vec::new(),
        };
        let shape = if self.unsqueeze {
            let rank = x.shape.len() + axes.len();
            let mut pos = axes
                .iter()
                .map(|&a| axis_of(a, rank, false))
                .collect::<Result<Vec<_>, _>>()?;
            pos.sort_unstable();
            let mut shape = x.shape.clone();
            for p in pos {
                shape.insert(p.min(shape.len()), 1);
            }
            shape
        } else if axes.is_empty() {
            x.shape.iter().copied().filter(|&d| d != 1).collect()
        } else {
            let pos = axes
                .iter()
                .map(|&a| axis_of(a, x.shape.len(), false))
                .collect::<Result<Vec<_>, _>>()?;
            let mut shape = Vec::with_capacity(x.shape.len());
            for (i, &d) in x.shape.iter().enumerate() {
                if pos.contains(&i) {
                    if d != 1 {
                        return Err(format!("cannot squeeze axis {i} of size {d}"));
                    }
                } else {
                    shape.push(d);
                }
            }
            shape
        };
        out.push(x.reshaped(shape));
        Ok(())
    }
}

#[derive(Debug)]
struct Cast {
    to: DType,
}

impl Op for Cast {
    fn run<'a>(
        &self,
        inputs: &[Option<&Tensor<'a>>],
        out: &mut Vec<Tensor<'a>>,
    ) -> Result<(), String> {
        let x = arg(inputs, 0)?;
        let shape = x.shape.clone();
        if x.dtype() == self.to {
            out.push(x.clone());
            return Ok(());
        }
        let t = match (self.to, &x.data) {
            (DType::Str, Data::F32(v)) => {
                Tensor::str(shape, v.iter().map(|x| x.to_string()).collect())
            }
            (DType::Str, Data::F64(v)) => {
                Tensor::str(shape, v.iter().map(|x| x.to_string()).collect())
            }
            (DType::Str, Data::I64(v)) => {
                Tensor::str(shape, v.iter().map(|x| x.to_string()).collect())
            }
            (_, Data::Str(v)) => {
                let parsed: Result<Vec<f64>, _> =
                    v.iter().map(|s| s.trim().parse::<f64>()).collect();
                let parsed = parsed.map_err(|_| "cannot cast a non-numeric string".to_string())?;
                match self.to {
                    DType::F32 => Tensor::f32(shape, parsed.iter().map(|&x| x as f32).collect()),
                    DType::F64 => Tensor::f64(shape, parsed),
                    _ => Tensor::i64(shape, parsed.iter().map(|&x| x as i64).collect()),
                }
            }
            (DType::F32, _) => Tensor::f32(shape, x.to_f32().ok_or("bad cast")?.into_owned()),
            (DType::I64, _) => Tensor::i64(shape, x.to_i64().ok_or("bad cast")?.into_owned()),
            (DType::F64, Data::F32(v)) => {
                Tensor::f64(shape, v.iter().map(|&x| f64::from(x)).collect())
            }
            (DType::F64, Data::I64(v)) => Tensor::f64(shape, v.iter().map(|&x| x as f64).collect()),
            (DType::F64, Data::F64(_)) => x.clone(),
        };
        out.push(t);
        Ok(())
    }
}

/// Splits a shape around `axis`: (outer, axis length, inner).
fn around(shape: &[usize], axis: usize) -> (usize, usize, usize) {
    (
        numel(&shape[..axis]),
        shape[axis],
        numel(&shape[axis + 1..]),
    )
}

#[derive(Debug)]
struct ArgMax {
    min: bool,
    axis: i64,
    keepdims: bool,
    last: bool,
}

impl Op for ArgMax {
    fn run<'a>(
        &self,
        inputs: &[Option<&Tensor<'a>>],
        out: &mut Vec<Tensor<'a>>,
    ) -> Result<(), String> {
        let x = arg(inputs, 0)?;
        let axis = axis_of(self.axis, x.shape.len(), false)?;
        if x.shape.is_empty() {
            return Err("argmax of a scalar".into());
        }
        let (outer, n, inner) = around(&x.shape, axis);
        if n == 0 {
            return Err("argmax over an empty axis".into());
        }
        let v: Cow<'_, [f64]> = match &x.data {
            Data::F64(v) => Cow::Borrowed(v.as_ref()),
            Data::F32(v) => Cow::Owned(v.iter().map(|&x| f64::from(x)).collect()),
            Data::I64(v) => Cow::Owned(v.iter().map(|&x| x as f64).collect()),
            Data::Str(_) => return Err("argmax of strings".into()),
        };
        let mut y = Vec::with_capacity(outer * inner);
        for o in 0..outer {
            for i in 0..inner {
                let at = |k: usize| v[(o * n + k) * inner + i];
                let mut best = 0;
                for k in 1..n {
                    let (a, b) = (at(k), at(best));
                    let better = if self.min { a < b } else { a > b };
                    if better || (self.last && a == b) {
                        best = k;
                    }
                }
                y.push(best as i64);
            }
        }
        let mut shape = x.shape.clone();
        if self.keepdims {
            shape[axis] = 1;
        } else {
            shape.remove(axis);
        }
        out.push(Tensor::i64(shape, y));
        Ok(())
    }
}

#[derive(Debug)]
struct Softmax {
    axis: i64,
    /// Opset < 13: the input is coerced to 2-D at `axis`.
    legacy: bool,
}

impl Op for Softmax {
    fn run<'a>(
        &self,
        inputs: &[Option<&Tensor<'a>>],
        out: &mut Vec<Tensor<'a>>,
    ) -> Result<(), String> {
        let x = arg(inputs, 0)?;
        let axis = axis_of(self.axis, x.shape.len(), false)?;
        let mut y = x.to_f32().ok_or("softmax of strings")?.into_owned();
        if x.shape.is_empty() {
            softmax(&mut y);
        } else if self.legacy {
            let n = numel(&x.shape[axis..]);
            if n > 0 {
                y.chunks_mut(n).for_each(softmax);
            }
        } else {
            let (outer, n, inner) = around(&x.shape, axis);
            let mut buf = vec![0f32; n];
            for o in 0..outer {
                for i in 0..inner {
                    for k in 0..n {
                        buf[k] = y[(o * n + k) * inner + i];
                    }
                    softmax(&mut buf);
                    for k in 0..n {
                        y[(o * n + k) * inner + i] = buf[k];
                    }
                }
            }
        }
        out.push(Tensor::f32(x.shape.clone(), y));
        Ok(())
    }
}

#[derive(Debug, Clone, Copy)]
enum UnaryKind {
    Sigmoid,
    Exp,
    Log,
    Abs,
    Neg,
    Sqrt,
    Relu,
    Tanh,
}

#[derive(Debug)]
struct Unary(UnaryKind);

impl Unary {
    fn f64(&self, x: f64) -> f64 {
        match self.0 {
            UnaryKind::Sigmoid => 1.0 / (1.0 + (-x).exp()),
            UnaryKind::Exp => x.exp(),
            UnaryKind::Log => x.ln(),
            UnaryKind::Abs => x.abs(),
            UnaryKind::Neg => -x,
            UnaryKind::Sqrt => x.sqrt(),
            UnaryKind::Relu => x.max(0.0),
            UnaryKind::Tanh => x.tanh(),
        }
    }

    fn f32(&self, x: f32) -> f32 {
        match self.0 {
            UnaryKind::Sigmoid => super::sigmoid(x),
            UnaryKind::Exp => x.exp(),
            UnaryKind::Log => x.ln(),
            UnaryKind::Abs => x.abs(),
            UnaryKind::Neg => -x,
            UnaryKind::Sqrt => x.sqrt(),
            UnaryKind::Relu => x.max(0.0),
            UnaryKind::Tanh => x.tanh(),
        }
    }
}

impl Op for Unary {
    fn run<'a>(
        &self,
        inputs: &[Option<&Tensor<'a>>],
        out: &mut Vec<Tensor<'a>>,
    ) -> Result<(), String> {
        let x = arg(inputs, 0)?;
        let shape = x.shape.clone();
        out.push(match &x.data {
            Data::F32(v) => Tensor::f32(shape, v.iter().map(|&a| self.f32(a)).collect()),
            Data::F64(v) => Tensor::f64(shape, v.iter().map(|&a| self.f64(a)).collect()),
            Data::I64(v) => match self.0 {
                UnaryKind::Abs => Tensor::i64(shape, v.iter().map(|a| a.wrapping_abs()).collect()),
                UnaryKind::Neg => Tensor::i64(shape, v.iter().map(|a| a.wrapping_neg()).collect()),
                UnaryKind::Relu => Tensor::i64(shape, v.iter().map(|&a| a.max(0)).collect()),
                _ => return Err("integer input for a float operator".into()),
            },
            Data::Str(_) => return Err("string input".into()),
        });
        Ok(())
    }
}

#[derive(Debug, Clone, Copy)]
enum BinaryKind {
    Add,
    Sub,
    Mul,
    Div,
}

impl BinaryKind {
    /// The operation on floats (IEEE: division by zero is infinite or NaN).
    fn float<T>(self, p: T, q: T) -> T
    where
        T: std::ops::Add<Output = T>
            + std::ops::Sub<Output = T>
            + std::ops::Mul<Output = T>
            + std::ops::Div<Output = T>,
    {
        match self {
            BinaryKind::Add => p + q,
            BinaryKind::Sub => p - q,
            BinaryKind::Mul => p * q,
            BinaryKind::Div => p / q,
        }
    }
}

#[derive(Debug)]
struct Binary(BinaryKind);

/// Numpy-style broadcast of two shapes.
fn broadcast_shape(a: &[usize], b: &[usize]) -> Result<Vec<usize>, String> {
    let rank = a.len().max(b.len());
    let mut out = vec![0; rank];
    for i in 0..rank {
        let da = if i + a.len() >= rank {
            a[i + a.len() - rank]
        } else {
            1
        };
        let db = if i + b.len() >= rank {
            b[i + b.len() - rank]
        } else {
            1
        };
        out[i] = match (da, db) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            _ => return Err(format!("shapes {a:?} and {b:?} do not broadcast")),
        };
    }
    Ok(out)
}

/// Element strides of `shape` aligned to `out` (0 where broadcast).
fn strides_for(shape: &[usize], out: &[usize]) -> Vec<usize> {
    let mut strides = vec![0; out.len()];
    let offset = out.len() - shape.len();
    let mut s = 1;
    for i in (0..shape.len()).rev() {
        strides[offset + i] = if shape[i] == 1 { 0 } else { s };
        s *= shape[i];
    }
    strides
}

fn broadcast<T: Copy>(
    a: &[T],
    sa: &[usize],
    b: &[T],
    sb: &[usize],
    f: impl Fn(T, T) -> Result<T, String>,
) -> Result<(Vec<usize>, Vec<T>), String> {
    if sa == sb {
        let v = a
            .iter()
            .zip(b)
            .map(|(&x, &y)| f(x, y))
            .collect::<Result<_, _>>()?;
        return Ok((sa.to_vec(), v));
    }
    let shape = broadcast_shape(sa, sb)?;
    if b.len() == 1 && shape == sa {
        return Ok((
            shape,
            a.iter().map(|&x| f(x, b[0])).collect::<Result<_, _>>()?,
        ));
    }
    let (ta, tb) = (strides_for(sa, &shape), strides_for(sb, &shape));
    let n = numel(&shape);
    let mut idx = vec![0usize; shape.len()];
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let ia: usize = idx.iter().zip(&ta).map(|(i, s)| i * s).sum();
        let ib: usize = idx.iter().zip(&tb).map(|(i, s)| i * s).sum();
        v.push(f(a[ia], b[ib])?);
        for d in (0..shape.len()).rev() {
            idx[d] += 1;
            if idx[d] < shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    Ok((shape, v))
}

impl Op for Binary {
    fn run<'a>(
        &self,
        inputs: &[Option<&Tensor<'a>>],
        out: &mut Vec<Tensor<'a>>,
    ) -> Result<(), String> {
        let (a, b) = (arg(inputs, 0)?, arg(inputs, 1)?);
        let k = self.0;
        out.push(match (&a.data, &b.data) {
            (Data::F32(x), Data::F32(y)) => {
                let (s, v) = broadcast(x, &a.shape, y, &b.shape, |p, q| Ok(k.float(p, q)))?;
                Tensor::f32(s, v)
            }
            (Data::F64(x), Data::F64(y)) => {
                let (s, v) = broadcast(x, &a.shape, y, &b.shape, |p, q| Ok(k.float(p, q)))?;
                Tensor::f64(s, v)
            }
            (Data::I64(x), Data::I64(y)) => {
                let (s, v) = broadcast(x, &a.shape, y, &b.shape, |p: i64, q: i64| match k {
                    BinaryKind::Add => Ok(p.wrapping_add(q)),
                    BinaryKind::Sub => Ok(p.wrapping_sub(q)),
                    BinaryKind::Mul => Ok(p.wrapping_mul(q)),
                    BinaryKind::Div => p
                        .checked_div(q)
                        .ok_or_else(|| "integer division by zero".to_string()),
                })?;
                Tensor::i64(s, v)
            }
            _ => {
                return Err(format!(
                    "operand types {} and {} differ or are not numeric",
                    a.dtype().name(),
                    b.dtype().name()
                ));
            }
        });
        Ok(())
    }
}

/// `[m, k]` view of a rank-1 or rank-2 float tensor as f64.
fn matrix(t: &Tensor<'_>, what: &str) -> Result<(usize, usize, Vec<f64>), String> {
    let v: Vec<f64> = match &t.data {
        Data::F32(v) => v.iter().map(|&x| f64::from(x)).collect(),
        Data::F64(v) => v.to_vec(),
        _ => return Err(format!("{what} must be float or double")),
    };
    match t.shape.as_slice() {
        [k] => Ok((1, *k, v)),
        [m, k] => Ok((*m, *k, v)),
        s => Err(format!(
            "{what} has rank {}, only 1 and 2 are supported",
            s.len()
        )),
    }
}

fn emit_like<'a>(like: &Tensor<'_>, shape: Vec<usize>, v: Vec<f64>) -> Tensor<'a> {
    match like.dtype() {
        DType::F64 => Tensor::f64(shape, v),
        _ => Tensor::f32(shape, v.into_iter().map(|x| x as f32).collect()),
    }
}

#[derive(Debug)]
struct MatMul;

impl Op for MatMul {
    fn run<'a>(
        &self,
        inputs: &[Option<&Tensor<'a>>],
        out: &mut Vec<Tensor<'a>>,
    ) -> Result<(), String> {
        let (a, b) = (arg(inputs, 0)?, arg(inputs, 1)?);
        let (m, k, va) = matrix(a, "A")?;
        let b_vector = b.shape.len() == 1;
        let (k2, n, vb) = match matrix(b, "B")? {
            (1, k, v) if b_vector => (k, 1, v),
            other => other,
        };
        if k != k2 {
            return Err(format!("cannot multiply {:?} by {:?}", a.shape, b.shape));
        }
        let mut y = vec![0f64; m * n];
        for i in 0..m {
            for p in 0..k {
                let x = va[i * k + p];
                for j in 0..n {
                    y[i * n + j] += x * vb[p * n + j];
                }
            }
        }
        let shape = match (a.shape.len(), b_vector) {
            (1, true) => vec![],
            (1, false) => vec![n],
            (_, true) => vec![m],
            _ => vec![m, n],
        };
        out.push(emit_like(a, shape, y));
        Ok(())
    }
}

#[derive(Debug)]
struct Gemm {
    alpha: f32,
    beta: f32,
    trans_a: bool,
    trans_b: bool,
}

impl Op for Gemm {
    fn run<'a>(
        &self,
        inputs: &[Option<&Tensor<'a>>],
        out: &mut Vec<Tensor<'a>>,
    ) -> Result<(), String> {
        let (a, b) = (arg(inputs, 0)?, arg(inputs, 1)?);
        let (ra, ca, va) = matrix(a, "A")?;
        let (rb, cb, vb) = matrix(b, "B")?;
        let (m, k) = if self.trans_a { (ca, ra) } else { (ra, ca) };
        let (k2, n) = if self.trans_b { (cb, rb) } else { (rb, cb) };
        if k != k2 {
            return Err(format!("cannot multiply {:?} by {:?}", a.shape, b.shape));
        }
        let at = |i: usize, p: usize| {
            if self.trans_a {
                va[p * ca + i]
            } else {
                va[i * ca + p]
            }
        };
        let bt = |p: usize, j: usize| {
            if self.trans_b {
                vb[j * cb + p]
            } else {
                vb[p * cb + j]
            }
        };
        let (alpha, beta) = (f64::from(self.alpha), f64::from(self.beta));
        let mut y = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0.0;
                for p in 0..k {
                    s += at(i, p) * bt(p, j);
                }
                y[i * n + j] = alpha * s;
            }
        }
        if let Some(c) = inputs.get(2).copied().flatten() {
            let vc: Vec<f64> = match &c.data {
                Data::F32(v) => v.iter().map(|&x| f64::from(x)).collect(),
                Data::F64(v) => v.to_vec(),
                _ => return Err("C must be float or double".into()),
            };
            let target = [m, n];
            let shape = broadcast_shape(&c.shape, &target)?;
            if shape != target {
                return Err(format!(
                    "C of shape {:?} does not broadcast to {target:?}",
                    c.shape
                ));
            }
            let sc = strides_for(&c.shape, &target);
            for i in 0..m {
                for j in 0..n {
                    y[i * n + j] += beta * vc[i * sc[0] + j * sc[1]];
                }
            }
        }
        out.push(emit_like(a, vec![m, n], y));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binary<'a>(kind: BinaryKind, a: &Tensor<'a>, b: &Tensor<'a>) -> Result<Tensor<'a>, String> {
        let mut out = Vec::new();
        Binary(kind).run(&[Some(a), Some(b)], &mut out)?;
        Ok(out.pop().expect("one output"))
    }

    #[test]
    fn binary_broadcasts_each_numeric_type() {
        let m32 = Tensor::f32(vec![2, 2], vec![1.0, 2.0, 3.0, 4.0]);
        let r32 = Tensor::f32(vec![2], vec![10.0, 20.0]);
        assert_eq!(
            binary(BinaryKind::Sub, &m32, &r32),
            Ok(Tensor::f32(vec![2, 2], vec![-9.0, -18.0, -7.0, -16.0]))
        );
        let m64 = Tensor::f64(vec![2, 1], vec![1.0, 2.0]);
        let r64 = Tensor::f64(vec![1, 2], vec![4.0, 0.0]);
        assert_eq!(
            binary(BinaryKind::Div, &m64, &r64),
            Ok(Tensor::f64(
                vec![2, 2],
                vec![0.25, f64::INFINITY, 0.5, f64::INFINITY]
            ))
        );
        assert_eq!(
            binary(BinaryKind::Mul, &m64, &r64),
            Ok(Tensor::f64(vec![2, 2], vec![4.0, 0.0, 8.0, 0.0]))
        );
        let i = Tensor::i64(vec![2], vec![7, 9]);
        assert_eq!(
            binary(BinaryKind::Add, &i, &Tensor::i64(vec![], vec![1])),
            Ok(Tensor::i64(vec![2], vec![8, 10]))
        );
        assert!(binary(BinaryKind::Div, &i, &Tensor::i64(vec![1], vec![0])).is_err());
        assert!(binary(BinaryKind::Add, &m32, &r64).is_err());
    }
}
