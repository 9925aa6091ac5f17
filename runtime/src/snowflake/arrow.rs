//! A minimal reader of the Arrow IPC streaming format, for Snowflake results.
//!
//! Snowflake (and fakesnow) send query results as an Arrow IPC stream in
//! `rowsetBase64`: a schema message, then record batches. This reader knows
//! the flatbuffer layout of those two messages and decodes the column types a
//! dataset can hold: signed and unsigned integers (with Snowflake's `scale`
//! field metadata for `NUMBER(p, s)`), 32/64-bit floats, decimals (128-bit),
//! booleans, UTF-8 strings and `date32`. Other types, dictionary batches and
//! compressed bodies are refused with an error naming the column; the dataset
//! layer casts other Snowflake types to text in SQL so they never arrive here.
//!
//! Every offset read from the stream is bounds-checked: a malformed stream is
//! an error, never a panic.

use crate::dataset::Value;

/// A malformed stream or a type this reader does not decode.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("arrow: {0}")]
pub struct ArrowError(pub String);

fn err<T>(reason: impl Into<String>) -> Result<T, ArrowError> {
    Err(ArrowError(reason.into()))
}

/// Column values of a decoded stream, as rows.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    /// Column names, in order.
    pub names: Vec<String>,
    pub rows: Vec<Vec<Value>>,
}

/// Decodes a whole IPC stream (schema message first).
pub fn read_stream(data: &[u8]) -> Result<Decoded, ArrowError> {
    let mut fields: Option<Vec<Field>> = None;
    let mut rows = Vec::new();
    let mut off = 0usize;
    while off < data.len() {
        let mut len = read_i32(data, off)?;
        off += 4;
        if len == -1 {
            // Continuation marker (format ≥ 0.15), then the length.
            len = read_i32(data, off)?;
            off += 4;
        }
        if len == 0 {
            break; // end of stream
        }
        let len = usize::try_from(len).or_else(|_| err("negative message length"))?;
        let meta = slice(data, off, len)?;
        off += len;
        let message = Table::root(meta)?;
        let header_type = message.u8(1, 0)?;
        let body_len = message.i64(3, 0)?;
        let body_len = usize::try_from(body_len).or_else(|_| err("negative body length"))?;
        let body = slice(data, off, body_len)?;
        off += body_len;
        let header = message.table(2)?;
        match header_type {
            1 => {
                let header =
                    header.ok_or_else(|| ArrowError("schema message without header".into()))?;
                fields = Some(read_schema(header)?);
            }
            3 => {
                let header =
                    header.ok_or_else(|| ArrowError("record batch without header".into()))?;
                let Some(fields) = fields.as_ref() else {
                    return err("record batch before the schema");
                };
                read_batch(header, body, fields, &mut rows)?;
            }
            2 => return err("dictionary batches are not supported"),
            other => return err(format!("unsupported message type {other}")),
        }
    }
    let Some(fields) = fields else {
        return err("stream holds no schema");
    };
    Ok(Decoded {
        names: fields.into_iter().map(|f| f.name).collect(),
        rows,
    })
}

// ---------------------------------------------------------------- schema

#[derive(Debug, Clone, PartialEq)]
enum Type {
    Null,
    Int {
        bits: i32,
        signed: bool,
    },
    Float {
        bits: u8,
    },
    Binary,
    Utf8,
    LargeUtf8,
    LargeBinary,
    Bool,
    Decimal {
        scale: i32,
        bits: i32,
    },
    Date {
        days: bool,
    },
    Struct,
    /// Fixed-width values the reader skips but cannot decode (time, timestamp, ...).
    Fixed(&'static str),
    Other(u8),
}

#[derive(Debug, Clone)]
struct Field {
    name: String,
    ty: Type,
    /// Snowflake's `scale` field metadata (for `NUMBER(p, s)` sent as integers).
    scale: u32,
    children: Vec<Field>,
}

fn read_schema(schema: Table<'_>) -> Result<Vec<Field>, ArrowError> {
    if schema.i16(0, 0)? != 0 {
        return err("big-endian streams are not supported");
    }
    let mut out = Vec::new();
    for f in schema.tables(1)? {
        out.push(read_field(f)?);
    }
    Ok(out)
}

fn read_field(f: Table<'_>) -> Result<Field, ArrowError> {
    let name = f.str(0)?.unwrap_or_default().to_string();
    if f.table(4)?.is_some() {
        return err(format!(
            "column `{name}`: dictionary-encoded columns are not supported"
        ));
    }
    let type_type = f.u8(2, 0)?;
    let t = f.table(3)?;
    let ty = match (type_type, t) {
        (1, _) => Type::Null,
        (2, Some(t)) => Type::Int {
            bits: t.i32(0, 0)?,
            signed: t.bool(1, false)?,
        },
        (3, Some(t)) => Type::Float {
            bits: match t.i16(0, 0)? {
                0 => 16,
                1 => 32,
                _ => 64,
            },
        },
        (4, _) => Type::Binary,
        (5, _) => Type::Utf8,
        (6, _) => Type::Bool,
        (7, Some(t)) => Type::Decimal {
            scale: t.i32(1, 0)?,
            bits: t.i32(2, 128)?,
        },
        (8, t) => Type::Date {
            days: match t {
                Some(t) => t.i16(0, 1)? == 0,
                None => false,
            },
        },
        (9, _) => Type::Fixed("time"),
        (10, _) => Type::Fixed("timestamp"),
        (11, _) => Type::Fixed("interval"),
        (13, _) => Type::Struct,
        (15, _) => Type::Fixed("fixed-size binary"),
        (18, _) => Type::Fixed("duration"),
        (19, _) => Type::LargeBinary,
        (20, _) => Type::LargeUtf8,
        (other, _) => Type::Other(other),
    };
    let mut scale = 0;
    for kv in f.tables(6)? {
        if kv.str(0)? == Some("scale") {
            scale = kv.str(1)?.and_then(|s| s.parse().ok()).unwrap_or(0);
        }
    }
    let mut children = Vec::new();
    for c in f.tables(5)? {
        children.push(read_field(c)?);
    }
    Ok(Field {
        name,
        ty,
        scale,
        children,
    })
}

// ---------------------------------------------------------------- record batches

struct Cursor<'a> {
    body: &'a [u8],
    nodes: Vec<(i64, i64)>,
    buffers: Vec<(i64, i64)>,
    next_node: usize,
    next_buffer: usize,
}

impl<'a> Cursor<'a> {
    fn node(&mut self) -> Result<(usize, usize), ArrowError> {
        let (len, nulls) = *self
            .nodes
            .get(self.next_node)
            .ok_or_else(|| ArrowError("record batch has too few field nodes".into()))?;
        self.next_node += 1;
        let len = usize::try_from(len).or_else(|_| err("negative field length"))?;
        let nulls = usize::try_from(nulls).or_else(|_| err("negative null count"))?;
        Ok((len, nulls))
    }

    fn buffer(&mut self) -> Result<&'a [u8], ArrowError> {
        let (offset, len) = *self
            .buffers
            .get(self.next_buffer)
            .ok_or_else(|| ArrowError("record batch has too few buffers".into()))?;
        self.next_buffer += 1;
        let offset = usize::try_from(offset).or_else(|_| err("negative buffer offset"))?;
        let len = usize::try_from(len).or_else(|_| err("negative buffer length"))?;
        slice(self.body, offset, len)
    }

    /// Skips a field and its children (a column that is not decoded).
    fn skip(&mut self, field: &Field) -> Result<(), ArrowError> {
        self.node()?;
        let buffers = match field.ty {
            Type::Null => 0,
            Type::Struct => 1,
            Type::Binary | Type::Utf8 | Type::LargeUtf8 | Type::LargeBinary => 3,
            Type::Other(t) => {
                return err(format!(
                    "column `{}`: unsupported arrow type {t}",
                    field.name
                ));
            }
            _ => 2,
        };
        for _ in 0..buffers {
            self.buffer()?;
        }
        for c in &field.children {
            self.skip(c)?;
        }
        Ok(())
    }
}

fn read_batch(
    batch: Table<'_>,
    body: &[u8],
    fields: &[Field],
    rows: &mut Vec<Vec<Value>>,
) -> Result<(), ArrowError> {
    if batch.table(3)?.is_some() {
        return err("compressed record batches are not supported");
    }
    let length = usize::try_from(batch.i64(0, 0)?).or_else(|_| err("negative batch length"))?;
    let mut cursor = Cursor {
        body,
        nodes: batch.structs16(1)?,
        buffers: batch.structs16(2)?,
        next_node: 0,
        next_buffer: 0,
    };
    let mut columns = Vec::with_capacity(fields.len());
    for field in fields {
        let values = read_column(&mut cursor, field)?;
        if let Some(values) = &values
            && values.len() != length
        {
            return err(format!(
                "column `{}` holds {} values, the batch {length}",
                field.name,
                values.len()
            ));
        }
        columns.push(values);
    }
    // Only all-null columns: the length is not backed by any buffer; keep it sane.
    if columns.iter().all(Option::is_none) && length > MAX_UNBACKED_ROWS {
        return err(format!("batch of {length} rows holds no values"));
    }
    let first = rows.len();
    rows.extend((0..length).map(|_| Vec::with_capacity(fields.len())));
    let batch_rows = &mut rows[first..];
    for values in columns {
        match values {
            Some(values) => {
                for (row, v) in batch_rows.iter_mut().zip(values) {
                    row.push(v);
                }
            }
            None => batch_rows.iter_mut().for_each(|row| row.push(Value::Null)),
        }
    }
    Ok(())
}

/// Largest batch made only of null-typed columns.
const MAX_UNBACKED_ROWS: usize = 1 << 20;

/// A column's values; `None` for a null-typed column (all null).
fn read_column(c: &mut Cursor<'_>, field: &Field) -> Result<Option<Vec<Value>>, ArrowError> {
    let name = &field.name;
    match &field.ty {
        Type::Null => {
            c.node()?;
            return Ok(None);
        }
        Type::Struct | Type::Fixed(_) | Type::Binary | Type::LargeBinary | Type::Other(_) => {
            let what = match &field.ty {
                Type::Struct => "struct (a Snowflake timestamp?)".to_string(),
                Type::Fixed(what) => what.to_string(),
                Type::Binary | Type::LargeBinary => "binary".to_string(),
                Type::Other(t) => format!("type {t}"),
                _ => unreachable!("matched above"),
            };
            // Decode nothing: refuse, naming the column (after checking the layout).
            c.skip(field)?;
            return err(format!("column `{name}`: cannot read arrow {what} values"));
        }
        _ => {}
    }
    let (len, nulls) = c.node()?;
    let validity = c.buffer()?;
    let valid = |i: usize| -> bool {
        nulls == 0
            || validity.is_empty()
            || validity.get(i / 8).is_some_and(|b| b >> (i % 8) & 1 == 1)
    };
    let data = c.buffer()?;
    let need = |width: usize| -> Result<(), ArrowError> {
        if data.len() < len.saturating_mul(width) {
            return err(format!("column `{name}`: value buffer too short"));
        }
        Ok(())
    };
    // Filled only after each arm checked that the buffers hold `len` values.
    let mut out = Vec::new();
    match field.ty {
        Type::Int { bits, signed } => {
            let width = match bits {
                8 | 16 | 32 | 64 => (bits / 8) as usize,
                _ => return err(format!("column `{name}`: {bits}-bit integers")),
            };
            need(width)?;
            out.reserve(len);
            let divisor = 10f64.powi(field.scale.min(38) as i32);
            for i in 0..len {
                if !valid(i) {
                    out.push(Value::Null);
                    continue;
                }
                let b = &data[i * width..(i + 1) * width];
                let v: i128 = match (width, signed) {
                    (1, true) => i8::from_le_bytes([b[0]]).into(),
                    (1, false) => b[0].into(),
                    (2, true) => i16::from_le_bytes([b[0], b[1]]).into(),
                    (2, false) => u16::from_le_bytes([b[0], b[1]]).into(),
                    (4, true) => i32::from_le_bytes(b.try_into().expect("4 bytes")).into(),
                    (4, false) => u32::from_le_bytes(b.try_into().expect("4 bytes")).into(),
                    (_, true) => i64::from_le_bytes(b.try_into().expect("8 bytes")).into(),
                    (_, false) => u64::from_le_bytes(b.try_into().expect("8 bytes")).into(),
                };
                out.push(number(v, field.scale, divisor, name)?);
            }
        }
        Type::Decimal { scale, bits } => {
            if bits != 128 {
                return err(format!("column `{name}`: {bits}-bit decimals"));
            }
            need(16)?;
            out.reserve(len);
            let scale = u32::try_from(scale)
                .or_else(|_| err(format!("column `{name}`: negative decimal scale")))?;
            let divisor = 10f64.powi(scale.min(38) as i32);
            for i in 0..len {
                if !valid(i) {
                    out.push(Value::Null);
                    continue;
                }
                let v =
                    i128::from_le_bytes(data[i * 16..(i + 1) * 16].try_into().expect("16 bytes"));
                out.push(number(v, scale, divisor, name)?);
            }
        }
        Type::Float { bits } => {
            let width = match bits {
                32 => 4,
                64 => 8,
                _ => return err(format!("column `{name}`: {bits}-bit floats")),
            };
            need(width)?;
            out.reserve(len);
            for i in 0..len {
                if !valid(i) {
                    out.push(Value::Null);
                    continue;
                }
                let b = &data[i * width..(i + 1) * width];
                let v = if width == 4 {
                    f32::from_le_bytes(b.try_into().expect("4 bytes")).into()
                } else {
                    f64::from_le_bytes(b.try_into().expect("8 bytes"))
                };
                // The runtime holds no NaN or infinities (as for PostgreSQL): null.
                out.push(if v.is_finite() {
                    Value::Float(v)
                } else {
                    Value::Null
                });
            }
        }
        Type::Bool => {
            if data.len() < len.div_ceil(8) {
                return err(format!("column `{name}`: value buffer too short"));
            }
            out.reserve(len);
            for i in 0..len {
                out.push(if valid(i) {
                    Value::Bool(data[i / 8] >> (i % 8) & 1 == 1)
                } else {
                    Value::Null
                });
            }
        }
        Type::Date { days } => {
            let width = if days { 4 } else { 8 };
            need(width)?;
            for i in 0..len {
                if !valid(i) {
                    out.push(Value::Null);
                    continue;
                }
                let b = &data[i * width..(i + 1) * width];
                let day = if days {
                    i64::from(i32::from_le_bytes(b.try_into().expect("4 bytes")))
                } else {
                    i64::from_le_bytes(b.try_into().expect("8 bytes")).div_euclid(86_400_000)
                };
                out.push(Value::Str(iso_date(day)));
            }
        }
        Type::Utf8 | Type::LargeUtf8 => {
            let large = field.ty == Type::LargeUtf8;
            let chars = c.buffer()?;
            let width = if large { 8 } else { 4 };
            if data.len() < (len + 1).saturating_mul(width) {
                return err(format!("column `{name}`: offset buffer too short"));
            }
            out.reserve(len);
            let offset = |i: usize| -> Result<usize, ArrowError> {
                let b = &data[i * width..(i + 1) * width];
                let v = if large {
                    i64::from_le_bytes(b.try_into().expect("8 bytes"))
                } else {
                    i32::from_le_bytes(b.try_into().expect("4 bytes")).into()
                };
                usize::try_from(v).or_else(|_| err(format!("column `{name}`: negative offset")))
            };
            for i in 0..len {
                if !valid(i) {
                    out.push(Value::Null);
                    continue;
                }
                let (start, end) = (offset(i)?, offset(i + 1)?);
                let bytes = chars
                    .get(start..end)
                    .ok_or_else(|| ArrowError(format!("column `{name}`: string out of bounds")))?;
                let s = std::str::from_utf8(bytes)
                    .or_else(|_| err(format!("column `{name}`: invalid UTF-8")))?;
                out.push(Value::Str(s.to_string()));
            }
        }
        _ => unreachable!("non-decodable types return above"),
    }
    Ok(Some(out))
}

/// An integer column value: `Int` without scale, else the scaled float.
fn number(v: i128, scale: u32, divisor: f64, name: &str) -> Result<Value, ArrowError> {
    if scale == 0 {
        match i64::try_from(v) {
            Ok(v) => Ok(Value::Int(v)),
            Err(_) => err(format!(
                "column `{name}`: value {v} does not fit a 64-bit integer"
            )),
        }
    } else {
        Ok(Value::Float(v as f64 / divisor))
    }
}

/// `YYYY-MM-DD` of a day count since 1970-01-01 (proleptic Gregorian).
pub(crate) fn iso_date(days: i64) -> String {
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

// ---------------------------------------------------------------- flatbuffers

fn slice(data: &[u8], off: usize, len: usize) -> Result<&[u8], ArrowError> {
    off.checked_add(len)
        .and_then(|end| data.get(off..end))
        .ok_or_else(|| ArrowError("truncated stream".into()))
}

fn read_i32(data: &[u8], off: usize) -> Result<i32, ArrowError> {
    Ok(i32::from_le_bytes(
        slice(data, off, 4)?.try_into().expect("4 bytes"),
    ))
}

fn read_u32(data: &[u8], off: usize) -> Result<usize, ArrowError> {
    Ok(u32::from_le_bytes(slice(data, off, 4)?.try_into().expect("4 bytes")) as usize)
}

/// A flatbuffer table: its buffer and position.
#[derive(Clone, Copy)]
struct Table<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Table<'a> {
    fn root(buf: &'a [u8]) -> Result<Table<'a>, ArrowError> {
        Ok(Table {
            buf,
            pos: read_u32(buf, 0)?,
        })
    }

    /// Absolute position of field `idx`, if present.
    fn field(&self, idx: usize) -> Result<Option<usize>, ArrowError> {
        let soffset = i64::from(read_i32(self.buf, self.pos)?);
        let vtable =
            usize::try_from(self.pos as i64 - soffset).or_else(|_| err("bad vtable offset"))?;
        let vt_len =
            u16::from_le_bytes(slice(self.buf, vtable, 2)?.try_into().expect("2 bytes")) as usize;
        let entry = 4 + 2 * idx;
        if entry + 2 > vt_len {
            return Ok(None);
        }
        let off = u16::from_le_bytes(
            slice(self.buf, vtable + entry, 2)?
                .try_into()
                .expect("2 bytes"),
        );
        Ok((off != 0).then_some(self.pos + off as usize))
    }

    fn scalar<const N: usize>(&self, idx: usize) -> Result<Option<[u8; N]>, ArrowError> {
        match self.field(idx)? {
            None => Ok(None),
            Some(p) => Ok(Some(slice(self.buf, p, N)?.try_into().expect("N bytes"))),
        }
    }

    fn u8(&self, idx: usize, default: u8) -> Result<u8, ArrowError> {
        Ok(self.scalar::<1>(idx)?.map_or(default, |b| b[0]))
    }

    fn bool(&self, idx: usize, default: bool) -> Result<bool, ArrowError> {
        Ok(self.scalar::<1>(idx)?.map_or(default, |b| b[0] != 0))
    }

    fn i16(&self, idx: usize, default: i16) -> Result<i16, ArrowError> {
        Ok(self.scalar::<2>(idx)?.map_or(default, i16::from_le_bytes))
    }

    fn i32(&self, idx: usize, default: i32) -> Result<i32, ArrowError> {
        Ok(self.scalar::<4>(idx)?.map_or(default, i32::from_le_bytes))
    }

    fn i64(&self, idx: usize, default: i64) -> Result<i64, ArrowError> {
        Ok(self.scalar::<8>(idx)?.map_or(default, i64::from_le_bytes))
    }

    /// Follows a uoffset stored at `p`.
    fn follow(&self, p: usize) -> Result<usize, ArrowError> {
        p.checked_add(read_u32(self.buf, p)?)
            .ok_or_else(|| ArrowError("bad offset".into()))
    }

    fn table(&self, idx: usize) -> Result<Option<Table<'a>>, ArrowError> {
        match self.field(idx)? {
            None => Ok(None),
            Some(p) => Ok(Some(Table {
                buf: self.buf,
                pos: self.follow(p)?,
            })),
        }
    }

    fn str(&self, idx: usize) -> Result<Option<&'a str>, ArrowError> {
        match self.field(idx)? {
            None => Ok(None),
            Some(p) => {
                let at = self.follow(p)?;
                let len = read_u32(self.buf, at)?;
                let bytes = slice(self.buf, at + 4, len)?;
                Ok(Some(
                    std::str::from_utf8(bytes).or_else(|_| err("invalid UTF-8 in a name"))?,
                ))
            }
        }
    }

    /// A vector field: position of the first element and the length.
    fn vector(&self, idx: usize) -> Result<Option<(usize, usize)>, ArrowError> {
        match self.field(idx)? {
            None => Ok(None),
            Some(p) => {
                let at = self.follow(p)?;
                Ok(Some((at + 4, read_u32(self.buf, at)?)))
            }
        }
    }

    /// A vector of tables.
    fn tables(&self, idx: usize) -> Result<Vec<Table<'a>>, ArrowError> {
        let Some((start, len)) = self.vector(idx)? else {
            return Ok(Vec::new());
        };
        slice(self.buf, start, len.saturating_mul(4))?;
        (0..len)
            .map(|i| {
                Ok(Table {
                    buf: self.buf,
                    pos: self.follow(start + 4 * i)?,
                })
            })
            .collect()
    }

    /// A vector of 16-byte structs of two i64 (field nodes, buffers).
    fn structs16(&self, idx: usize) -> Result<Vec<(i64, i64)>, ArrowError> {
        let Some((start, len)) = self.vector(idx)? else {
            return Ok(Vec::new());
        };
        let bytes = slice(self.buf, start, len.saturating_mul(16))?;
        Ok(bytes
            .chunks_exact(16)
            .map(|c| {
                (
                    i64::from_le_bytes(c[..8].try_into().expect("8 bytes")),
                    i64::from_le_bytes(c[8..].try_into().expect("8 bytes")),
                )
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_iso() {
        assert_eq!(iso_date(0), "1970-01-01");
        assert_eq!(iso_date(19_724), "2024-01-02");
        assert_eq!(iso_date(-1), "1969-12-31");
        assert_eq!(iso_date(11_016), "2000-02-29");
    }

    /// Written by `runtime/tests/data/snowflake/make_arrow.py` (pyarrow), two batches.
    const TYPES: &[u8] = include_bytes!("../../tests/data/snowflake/types.arrows");
    const TIMESTAMP: &[u8] = include_bytes!("../../tests/data/snowflake/timestamp.arrows");

    #[test]
    fn reads_the_column_types_snowflake_sends() {
        let d = read_stream(TYPES).expect("decodes");
        assert_eq!(
            d.names,
            [
                "I8", "I16", "I32", "I64", "U32", "SCALED", "DEC0", "DEC2", "F64", "F32", "B", "S",
                "LS", "D", "N"
            ]
        );
        use Value::*;
        let s = |v: &str| Str(v.to_string());
        assert_eq!(
            d.rows[0],
            [
                Int(-8),
                Int(-16),
                Int(-32),
                Int(-(1 << 40)),
                Int(4_000_000_000),
                Float(12.34),
                Int(1_000_000_000_000_000),
                Float(12.34),
                Float(1.5),
                Float(0.25),
                Bool(true),
                s("ann"),
                s("x"),
                s("2024-01-02"),
                Null
            ]
        );
        assert_eq!(d.rows[1], vec![Null; 15]);
        assert_eq!(
            d.rows[2],
            [
                Int(127),
                Int(32767),
                Int(i32::MAX.into()),
                Int(i64::MAX),
                Int(0),
                Float(-0.05),
                Int(-1_000_000_000_000_000),
                Float(-0.01),
                Null, // NaN
                Float(-2.0),
                Bool(false),
                s(""),
                s("ünï"),
                s("1969-12-31"),
                Null
            ]
        );
    }

    #[test]
    fn timestamps_are_refused_naming_the_column() {
        let e = read_stream(TIMESTAMP).unwrap_err();
        assert!(e.0.contains("column `TS`"), "{e}");
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        for cut in 0..TYPES.len() {
            // A cut at a message boundary is a valid shorter stream; anything else must fail.
            let _ = read_stream(&TYPES[..cut]);
        }
        for i in 0..TYPES.len() {
            let mut bad = TYPES.to_vec();
            bad[i] ^= 0xa5;
            let _ = read_stream(&bad);
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for data in [
            &b""[..],
            &b"\xff\xff\xff\xff\x10\x00\x00\x00abc"[..],
            &b"\x08\x00\x00\x00\xff\xff\xff\x7f\x00\x00\x00\x00"[..],
            &[0xffu8; 64][..],
        ] {
            assert!(read_stream(data).is_err(), "{data:?}");
        }
    }
}
