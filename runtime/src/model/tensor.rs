//! Tensors flowing between the steps of a plan.
//!
//! Data is a `Cow` so graph inputs and initializers are borrowed, not copied,
//! for the duration of one `predict` call.

use std::borrow::Cow;

use super::proto::{TensorProto, data_type};

/// Element type of a tensor inside the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F32,
    F64,
    I64,
    Str,
}

impl DType {
    /// Maps an ONNX `TensorProto.DataType` to an engine type, if supported.
    pub fn from_onnx(code: i32) -> Option<DType> {
        match code {
            data_type::FLOAT => Some(DType::F32),
            data_type::DOUBLE => Some(DType::F64),
            data_type::INT64 => Some(DType::I64),
            data_type::STRING => Some(DType::Str),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "float",
            DType::F64 => "double",
            DType::I64 => "int64",
            DType::Str => "string",
        }
    }
}

/// The elements of a tensor, row-major.
#[derive(Debug, Clone, PartialEq)]
pub enum Data<'a> {
    F32(Cow<'a, [f32]>),
    F64(Cow<'a, [f64]>),
    I64(Cow<'a, [i64]>),
    Str(Cow<'a, [String]>),
}

impl Data<'_> {
    pub fn len(&self) -> usize {
        match self {
            Data::F32(v) => v.len(),
            Data::F64(v) => v.len(),
            Data::I64(v) => v.len(),
            Data::Str(v) => v.len(),
        }
    }

    pub fn dtype(&self) -> DType {
        match self {
            Data::F32(_) => DType::F32,
            Data::F64(_) => DType::F64,
            Data::I64(_) => DType::I64,
            Data::Str(_) => DType::Str,
        }
    }
}

/// A shaped tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor<'a> {
    pub shape: Vec<usize>,
    pub data: Data<'a>,
}

impl<'a> Tensor<'a> {
    pub fn f32(shape: Vec<usize>, v: Vec<f32>) -> Tensor<'a> {
        Tensor {
            shape,
            data: Data::F32(Cow::Owned(v)),
        }
    }

    pub fn f64(shape: Vec<usize>, v: Vec<f64>) -> Tensor<'a> {
        Tensor {
            shape,
            data: Data::F64(Cow::Owned(v)),
        }
    }

    pub fn i64(shape: Vec<usize>, v: Vec<i64>) -> Tensor<'a> {
        Tensor {
            shape,
            data: Data::I64(Cow::Owned(v)),
        }
    }

    pub fn str(shape: Vec<usize>, v: Vec<String>) -> Tensor<'a> {
        Tensor {
            shape,
            data: Data::Str(Cow::Owned(v)),
        }
    }

    pub fn dtype(&self) -> DType {
        self.data.dtype()
    }

    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// The same data under another shape (the caller checked the element count).
    pub fn reshaped(&self, shape: Vec<usize>) -> Tensor<'a> {
        Tensor {
            shape,
            data: self.data.clone(),
        }
    }

    /// Numeric elements as `f32` (borrowed when already `f32`).
    pub fn to_f32(&self) -> Option<Cow<'_, [f32]>> {
        match &self.data {
            Data::F32(v) => Some(Cow::Borrowed(v.as_ref())),
            Data::F64(v) => Some(Cow::Owned(v.iter().map(|&x| x as f32).collect())),
            Data::I64(v) => Some(Cow::Owned(v.iter().map(|&x| x as f32).collect())),
            Data::Str(_) => None,
        }
    }

    /// Integer elements as `i64` (numbers are truncated toward zero).
    pub fn to_i64(&self) -> Option<Cow<'_, [i64]>> {
        match &self.data {
            Data::I64(v) => Some(Cow::Borrowed(v.as_ref())),
            Data::F32(v) => Some(Cow::Owned(v.iter().map(|&x| x as i64).collect())),
            Data::F64(v) => Some(Cow::Owned(v.iter().map(|&x| x as i64).collect())),
            Data::Str(_) => None,
        }
    }
}

/// Decodes an initializer or constant. Errors are plain reasons; the caller
/// names the tensor.
pub fn from_proto(t: &TensorProto) -> Result<Tensor<'static>, String> {
    if t.data_location == 1 || !t.external_data.is_empty() {
        return Err("external tensor data is not supported".into());
    }
    let mut shape = Vec::with_capacity(t.dims.len());
    for &d in &t.dims {
        shape.push(usize::try_from(d).map_err(|_| format!("negative dimension {d}"))?);
    }
    let count = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or("dimensions overflow")?;
    let raw = &t.raw_data;
    let data = match t.data_type {
        data_type::FLOAT => Data::F32(Cow::Owned(if raw.is_empty() {
            t.float_data.clone()
        } else {
            le_chunks::<4>(raw, count)?
                .map(f32::from_le_bytes)
                .collect()
        })),
        data_type::DOUBLE => Data::F64(Cow::Owned(if raw.is_empty() {
            t.double_data.clone()
        } else {
            le_chunks::<8>(raw, count)?
                .map(f64::from_le_bytes)
                .collect()
        })),
        data_type::INT64 => Data::I64(Cow::Owned(if raw.is_empty() {
            t.int64_data.clone()
        } else {
            le_chunks::<8>(raw, count)?
                .map(i64::from_le_bytes)
                .collect()
        })),
        // Small integer types widen to int64 (the engine's only integer type).
        data_type::INT32
        | data_type::INT16
        | data_type::INT8
        | data_type::UINT16
        | data_type::UINT8
        | data_type::BOOL => {
            let v: Vec<i64> = if raw.is_empty() {
                t.int32_data.iter().map(|&x| i64::from(x)).collect()
            } else {
                match t.data_type {
                    data_type::INT32 => le_chunks::<4>(raw, count)?
                        .map(|b| i64::from(i32::from_le_bytes(b)))
                        .collect(),
                    data_type::INT16 => le_chunks::<2>(raw, count)?
                        .map(|b| i64::from(i16::from_le_bytes(b)))
                        .collect(),
                    data_type::UINT16 => le_chunks::<2>(raw, count)?
                        .map(|b| i64::from(u16::from_le_bytes(b)))
                        .collect(),
                    data_type::INT8 => le_chunks::<1>(raw, count)?
                        .map(|b| i64::from(i8::from_le_bytes(b)))
                        .collect(),
                    _ => le_chunks::<1>(raw, count)?
                        .map(|b| i64::from(b[0]))
                        .collect(),
                }
            };
            Data::I64(Cow::Owned(v))
        }
        data_type::STRING => Data::Str(Cow::Owned(
            t.string_data
                .iter()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .collect(),
        )),
        other => return Err(format!("unsupported tensor data type {other}")),
    };
    if data.len() != count {
        return Err(format!(
            "shape {shape:?} needs {count} elements, the tensor holds {}",
            data.len()
        ));
    }
    Ok(Tensor { shape, data })
}

fn le_chunks<const N: usize>(
    raw: &[u8],
    count: usize,
) -> Result<impl Iterator<Item = [u8; N]> + '_, String> {
    if raw.len() != count.saturating_mul(N) {
        return Err(format!(
            "raw data holds {} bytes, expected {count} elements of {N} bytes",
            raw.len()
        ));
    }
    Ok(raw.chunks_exact(N).map(|c| {
        let mut b = [0u8; N];
        b.copy_from_slice(c);
        b
    }))
}

/// Number of elements of a shape.
pub fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}
