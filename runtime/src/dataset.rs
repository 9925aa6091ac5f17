//! In-memory datasets: typed columns indexed by a key column.
//!
//! Storage is columnar: integers and floats in flat vectors, booleans as bytes,
//! strings either dictionary-encoded (few distinct values, e.g. `region`) or in
//! one arena per column (many distinct values, e.g. the key). Nulls are kept
//! in a bitmap per column that has any. The key index is a hash table of row
//! numbers whose keys are read back from the key column, so keys are stored
//! once.
//!
//! Column types are inferred from CSV text (bool, int, float, else string) or
//! declared in the bundle. The key column is a string unless declared `int`.

use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasher;
use std::path::Path;

use hashbrown::{DefaultHashBuilder, HashTable};
use serde::ser::{Serialize, SerializeMap, Serializer};

use crate::config::{ColumnType, Duplicates};

/// One value of a row, borrowed from its dataset.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ValueRef<'a> {
    Null,
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(&'a str),
}

impl Serialize for ValueRef<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match *self {
            ValueRef::Null => s.serialize_unit(),
            ValueRef::Int(v) => s.serialize_i64(v),
            ValueRef::Float(v) => s.serialize_f64(v),
            ValueRef::Bool(v) => s.serialize_bool(v),
            ValueRef::Str(v) => s.serialize_str(v),
        }
    }
}

/// One owned value (rows fetched from a live SQL dataset).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
}

impl Value {
    pub fn as_ref(&self) -> ValueRef<'_> {
        match self {
            Value::Null => ValueRef::Null,
            Value::Int(v) => ValueRef::Int(*v),
            Value::Float(v) => ValueRef::Float(*v),
            Value::Bool(v) => ValueRef::Bool(*v),
            Value::Str(v) => ValueRef::Str(v),
        }
    }
}

/// A key taken from a request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KeyRef<'a> {
    Str(&'a str),
    Int(i64),
}

impl std::fmt::Display for KeyRef<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeyRef::Str(s) => write!(f, "{s:?}"),
            KeyRef::Int(i) => write!(f, "{i}"),
        }
    }
}

/// Column names and types of a dataset.
#[derive(Debug, Clone, PartialEq)]
pub struct Schema {
    pub names: Vec<String>,
    pub types: Vec<ColumnType>,
    /// Position of the key column.
    pub key: usize,
}

impl Schema {
    pub fn position(&self, column: &str) -> Option<usize> {
        self.names.iter().position(|n| n == column)
    }
}

/// Errors loading a dataset. Messages name the dataset, the line and the column.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    /// The file could not be opened or read.
    #[error("dataset `{dataset}`: cannot read {path}")]
    Io {
        dataset: String,
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The CSV is malformed (bad quoting, uneven rows, invalid UTF-8).
    #[error("dataset `{dataset}`: malformed CSV: {source}")]
    Csv {
        dataset: String,
        #[source]
        source: csv::Error,
    },
    /// A value does not fit its column's declared type, or a key is bad.
    #[error("dataset `{dataset}` line {line}: {reason}")]
    Value {
        dataset: String,
        line: u64,
        reason: String,
    },
    /// The declaration does not match the data (unknown key column, ...).
    #[error("dataset `{dataset}`: {reason}")]
    Schema { dataset: String, reason: String },
}

/// A dataset held in memory.
pub struct Dataset {
    name: String,
    schema: Schema,
    columns: Vec<ColumnData>,
    rows: usize,
    index: KeyIndex,
}

impl std::fmt::Debug for Dataset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dataset")
            .field("name", &self.name)
            .field("schema", &self.schema)
            .field("rows", &self.rows)
            .finish_non_exhaustive()
    }
}

impl Dataset {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn schema(&self) -> &Schema {
        &self.schema
    }

    /// Number of stored rows (including rows shadowed by `duplicates = "last"`).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of distinct keys.
    pub fn keys(&self) -> usize {
        match &self.index {
            KeyIndex::Str { table, .. } => table.len(),
            KeyIndex::Int(map) => map.len(),
        }
    }

    /// Row holding `key`, if any.
    pub fn find(&self, key: KeyRef<'_>) -> Option<usize> {
        match (&self.index, key) {
            (KeyIndex::Str { table, hasher }, KeyRef::Str(k)) => self.find_str(table, hasher, k),
            (KeyIndex::Str { table, hasher }, KeyRef::Int(k)) => {
                let text = k.to_string();
                self.find_str(table, hasher, &text)
            }
            (KeyIndex::Int(map), KeyRef::Int(k)) => map.get(&k).map(|&r| r as usize),
            (KeyIndex::Int(map), KeyRef::Str(k)) => k
                .parse::<i64>()
                .ok()
                .and_then(|k| map.get(&k))
                .map(|&r| r as usize),
        }
    }

    fn find_str(
        &self,
        table: &HashTable<u32>,
        hasher: &DefaultHashBuilder,
        k: &str,
    ) -> Option<usize> {
        let ColumnData::Str(col) = &self.columns[self.schema.key] else {
            return None;
        };
        let hash = hasher.hash_one(k);
        table
            .find(hash, |&row| col.get(row as usize) == Some(k))
            .map(|&r| r as usize)
    }

    /// Value of `column` in `row`. Panics if either is out of range (both come
    /// from the dataset itself, never from a request).
    pub fn value(&self, row: usize, column: usize) -> ValueRef<'_> {
        self.columns[column].get(row)
    }

    /// Row `row` as a JSON-serializable map of column name to value.
    pub fn row(&self, row: usize) -> RowView<'_> {
        RowView { dataset: self, row }
    }

    /// Approximate heap bytes held by the columns and the index.
    pub fn heap_bytes(&self) -> usize {
        let cols: usize = self.columns.iter().map(ColumnData::heap_bytes).sum();
        let index = match &self.index {
            KeyIndex::Str { table, .. } => table.capacity() * (std::mem::size_of::<u32>() + 1),
            KeyIndex::Int(map) => map.capacity() * (std::mem::size_of::<(i64, u32)>() + 1),
        };
        cols + index
    }

    /// Loads a CSV file with a header line. `declared` overrides inferred
    /// column types.
    /// The column names of a CSV file's header, parsed as [`Dataset::load_csv`]
    /// parses them (quoted names, commas inside quotes, trimmed).
    pub fn csv_columns(path: &Path) -> std::io::Result<Vec<String>> {
        let file = std::fs::File::open(path)?;
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(true)
            .from_reader(file);
        let header = reader.headers().map_err(std::io::Error::other)?;
        Ok(header.iter().map(|h| h.trim().to_string()).collect())
    }

    pub fn load_csv(
        name: &str,
        path: &Path,
        key: &str,
        duplicates: Duplicates,
        declared: &BTreeMap<String, ColumnType>,
    ) -> Result<Dataset, DatasetError> {
        let io_err = |source: std::io::Error| DatasetError::Io {
            dataset: name.to_string(),
            path: path.display().to_string(),
            source,
        };
        let csv_err = |source: csv::Error| match source.kind() {
            csv::ErrorKind::Io(_) => match source.into_kind() {
                csv::ErrorKind::Io(e) => io_err(e),
                _ => unreachable_io(name),
            },
            _ => DatasetError::Csv {
                dataset: name.to_string(),
                source,
            },
        };
        let open = || -> Result<csv::Reader<std::fs::File>, DatasetError> {
            let file = std::fs::File::open(path).map_err(io_err)?;
            Ok(csv::ReaderBuilder::new()
                .has_headers(true)
                .buffer_capacity(1 << 20)
                .from_reader(file))
        };

        // Pass 1: header and type inference.
        let mut reader = open()?;
        let header: Vec<String> = reader
            .headers()
            .map_err(csv_err)?
            .iter()
            .map(|h| h.trim().to_string())
            .collect();
        let mut infer = vec![Inference::default(); header.len()];
        for (column, ty) in declared {
            let Some(i) = header.iter().position(|h| h == column) else {
                return Err(schema_err(
                    name,
                    format!("declared column `{column}` is not in the file"),
                ));
            };
            infer[i].declared = Some(*ty);
        }
        let key_col = header.iter().position(|h| h == key).ok_or_else(|| {
            schema_err(
                name,
                format!(
                    "key column `{key}` is not in the file (columns: {})",
                    header.join(", ")
                ),
            )
        })?;
        if infer[key_col].declared.is_none() {
            infer[key_col].declared = Some(ColumnType::String);
        }
        let mut record = csv::ByteRecord::new();
        let mut rows = 0usize;
        while reader.read_byte_record(&mut record).map_err(csv_err)? {
            rows += 1;
            for (field, state) in record.iter().zip(infer.iter_mut()) {
                state.observe(field);
            }
        }
        if rows > u32::MAX as usize {
            return Err(schema_err(name, "more than 4294967295 rows".into()));
        }
        let types: Vec<ColumnType> = infer.iter().map(Inference::resolve).collect();
        if !matches!(types[key_col], ColumnType::String | ColumnType::Int) {
            return Err(schema_err(
                name,
                format!("key column `{key}` must be string or int"),
            ));
        }

        // Pass 2: typed columns.
        let mut builders: Vec<ColumnBuilder> = types
            .iter()
            .zip(&infer)
            .map(|(&t, i)| ColumnBuilder::new(t, rows, i.bytes))
            .collect();
        let mut reader = open()?;
        reader.headers().map_err(csv_err)?;
        while reader.read_byte_record(&mut record).map_err(csv_err)? {
            let line = record.position().map(|p| p.line()).unwrap_or(0);
            for ((field, builder), column) in record.iter().zip(builders.iter_mut()).zip(&header) {
                builder
                    .push_text(field)
                    .map_err(|reason| DatasetError::Value {
                        dataset: name.to_string(),
                        line,
                        reason: format!("column `{column}`: {reason}"),
                    })?;
            }
        }
        let schema = Schema {
            names: header,
            types,
            key: key_col,
        };
        Dataset::build(name, schema, builders, duplicates, |row| (row as u64) + 2)
    }

    /// Builds a dataset from typed rows (SQL preload).
    pub fn from_rows(
        name: &str,
        schema: Schema,
        rows: impl IntoIterator<Item = Vec<Value>>,
        duplicates: Duplicates,
    ) -> Result<Dataset, DatasetError> {
        let mut builder = RowsBuilder::new(name, schema);
        for row in rows {
            builder.push(row)?;
        }
        builder.finish(duplicates)
    }

    fn build(
        name: &str,
        schema: Schema,
        builders: Vec<ColumnBuilder>,
        duplicates: Duplicates,
        line_of: impl Fn(usize) -> u64,
    ) -> Result<Dataset, DatasetError> {
        let columns: Vec<ColumnData> = builders.into_iter().map(ColumnBuilder::finish).collect();
        let rows = columns.first().map(ColumnData::len).unwrap_or(0);
        let key_name = &schema.names[schema.key];
        let dup_err = |row: usize, key: String| DatasetError::Value {
            dataset: name.to_string(),
            line: line_of(row),
            reason: format!(
                "duplicate key {key} in column `{key_name}` (declare `\"duplicates\": \"last\"` to keep the last row)"
            ),
        };
        let null_err = |row: usize| DatasetError::Value {
            dataset: name.to_string(),
            line: line_of(row),
            reason: format!("empty key in column `{key_name}`"),
        };
        let index = match &columns[schema.key] {
            ColumnData::Str(col) => {
                let hasher = DefaultHashBuilder::default();
                let mut table: HashTable<u32> = HashTable::with_capacity(rows);
                for row in 0..rows {
                    let Some(k) = col.get(row) else {
                        return Err(null_err(row));
                    };
                    let hash = hasher.hash_one(k);
                    match table.entry(
                        hash,
                        |&r| col.get(r as usize) == Some(k),
                        |&r| hasher.hash_one(col.get(r as usize).unwrap_or("")),
                    ) {
                        hashbrown::hash_table::Entry::Occupied(mut e) => match duplicates {
                            Duplicates::Error => return Err(dup_err(row, format!("{k:?}"))),
                            Duplicates::Last => *e.get_mut() = row as u32,
                        },
                        hashbrown::hash_table::Entry::Vacant(e) => {
                            e.insert(row as u32);
                        }
                    }
                }
                KeyIndex::Str { table, hasher }
            }
            ColumnData::Int { values, nulls } => {
                let mut map = HashMap::with_capacity(rows);
                for row in 0..rows {
                    let k = values.get(row);
                    if nulls.is_null(row) {
                        return Err(null_err(row));
                    }
                    if map.insert(k, row as u32).is_some() && duplicates == Duplicates::Error {
                        return Err(dup_err(row, k.to_string()));
                    }
                }
                KeyIndex::Int(map)
            }
            _ => {
                return Err(schema_err(
                    name,
                    format!("key column `{key_name}` must be string or int"),
                ));
            }
        };
        Ok(Dataset {
            name: name.to_string(),
            schema,
            columns,
            rows,
            index,
        })
    }
}

/// Builds a dataset row by row (SQL rows as they stream in), straight into
/// columnar storage.
pub struct RowsBuilder {
    name: String,
    schema: Schema,
    builders: Vec<ColumnBuilder>,
    rows: u64,
}

impl RowsBuilder {
    pub fn new(name: &str, schema: Schema) -> RowsBuilder {
        let builders = schema
            .types
            .iter()
            .map(|&t| ColumnBuilder::new(t, 0, 0))
            .collect();
        RowsBuilder {
            name: name.to_string(),
            schema,
            builders,
            rows: 0,
        }
    }

    /// Appends a row whose values follow the schema's columns.
    pub fn push(&mut self, row: impl IntoIterator<Item = Value>) -> Result<(), DatasetError> {
        self.rows += 1;
        for ((value, builder), column) in row
            .into_iter()
            .zip(self.builders.iter_mut())
            .zip(&self.schema.names)
        {
            builder
                .push_value(value)
                .map_err(|reason| DatasetError::Value {
                    dataset: self.name.clone(),
                    line: self.rows,
                    reason: format!("column `{column}`: {reason}"),
                })?;
        }
        Ok(())
    }

    /// The dataset, its key index built.
    pub fn finish(self, duplicates: Duplicates) -> Result<Dataset, DatasetError> {
        Dataset::build(&self.name, self.schema, self.builders, duplicates, |row| {
            row as u64 + 1
        })
    }
}

fn unreachable_io(name: &str) -> DatasetError {
    schema_err(name, "unexpected reader state".into())
}

fn schema_err(dataset: &str, reason: String) -> DatasetError {
    DatasetError::Schema {
        dataset: dataset.to_string(),
        reason,
    }
}

/// A row of a dataset, serialized as a JSON object.
pub struct RowView<'a> {
    dataset: &'a Dataset,
    row: usize,
}

impl Serialize for RowView<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let names = &self.dataset.schema.names;
        let mut map = s.serialize_map(Some(names.len()))?;
        for (i, name) in names.iter().enumerate() {
            map.serialize_entry(name, &self.dataset.value(self.row, i))?;
        }
        map.end()
    }
}

enum KeyIndex {
    Str {
        table: HashTable<u32>,
        hasher: DefaultHashBuilder,
    },
    Int(HashMap<i64, u32>),
}

/// Null bitmap; `None` when the column has no null.
#[derive(Default)]
struct Nulls(Option<Vec<u64>>);

impl Nulls {
    fn is_null(&self, row: usize) -> bool {
        match &self.0 {
            None => false,
            Some(bits) => bits.get(row / 64).is_some_and(|w| w >> (row % 64) & 1 == 1),
        }
    }
    fn set(&mut self, row: usize) {
        let bits = self.0.get_or_insert_with(Vec::new);
        if bits.len() <= row / 64 {
            bits.resize(row / 64 + 1, 0);
        }
        bits[row / 64] |= 1 << (row % 64);
    }
    fn heap_bytes(&self) -> usize {
        self.0.as_ref().map_or(0, |b| b.capacity() * 8)
    }
}

enum ColumnData {
    Int {
        values: Ints,
        nulls: Nulls,
    },
    Float {
        values: Vec<f64>,
        nulls: Nulls,
    },
    /// 0 false, 1 true, 2 null.
    Bool(Vec<u8>),
    Str(StrColumn),
}

impl ColumnData {
    fn len(&self) -> usize {
        match self {
            ColumnData::Int { values, .. } => values.len(),
            ColumnData::Float { values, .. } => values.len(),
            ColumnData::Bool(values) => values.len(),
            ColumnData::Str(col) => col.len(),
        }
    }

    fn get(&self, row: usize) -> ValueRef<'_> {
        match self {
            ColumnData::Int { values, nulls } => {
                if nulls.is_null(row) {
                    ValueRef::Null
                } else {
                    ValueRef::Int(values.get(row))
                }
            }
            ColumnData::Float { values, nulls } => {
                if nulls.is_null(row) {
                    ValueRef::Null
                } else {
                    ValueRef::Float(values[row])
                }
            }
            ColumnData::Bool(values) => match values[row] {
                0 => ValueRef::Bool(false),
                1 => ValueRef::Bool(true),
                _ => ValueRef::Null,
            },
            ColumnData::Str(col) => col.get(row).map_or(ValueRef::Null, ValueRef::Str),
        }
    }

    fn heap_bytes(&self) -> usize {
        match self {
            ColumnData::Int { values, nulls } => values.heap_bytes() + nulls.heap_bytes(),
            ColumnData::Float { values, nulls } => values.capacity() * 8 + nulls.heap_bytes(),
            ColumnData::Bool(values) => values.capacity(),
            ColumnData::Str(col) => col.heap_bytes(),
        }
    }
}

/// Integers of one column, 32-bit when they all fit.
enum Ints {
    I32(Vec<i32>),
    I64(Vec<i64>),
}

impl Ints {
    fn narrow(values: Vec<i64>) -> Ints {
        if values.iter().all(|&v| i32::try_from(v).is_ok()) {
            Ints::I32(values.into_iter().map(|v| v as i32).collect())
        } else {
            Ints::I64(values)
        }
    }

    fn get(&self, row: usize) -> i64 {
        match self {
            Ints::I32(v) => i64::from(v[row]),
            Ints::I64(v) => v[row],
        }
    }

    fn len(&self) -> usize {
        match self {
            Ints::I32(v) => v.len(),
            Ints::I64(v) => v.len(),
        }
    }

    fn heap_bytes(&self) -> usize {
        match self {
            Ints::I32(v) => v.capacity() * 4,
            Ints::I64(v) => v.capacity() * 8,
        }
    }
}

/// Strings of one column.
enum StrColumn {
    /// Few distinct values: a code per row (`u32::MAX` is null).
    Dict {
        values: Vec<Box<str>>,
        codes: Vec<u32>,
    },
    /// Many distinct values: one arena; row `i` is `bytes[ends[i-1]..ends[i]]`.
    Arena {
        bytes: String,
        ends: Vec<u32>,
        nulls: Nulls,
    },
}

impl StrColumn {
    fn len(&self) -> usize {
        match self {
            StrColumn::Dict { codes, .. } => codes.len(),
            StrColumn::Arena { ends, .. } => ends.len(),
        }
    }

    fn get(&self, row: usize) -> Option<&str> {
        match self {
            StrColumn::Dict { values, codes } => {
                values.get(*codes.get(row)? as usize).map(|s| &**s)
            }
            StrColumn::Arena { bytes, ends, nulls } => {
                if nulls.is_null(row) {
                    return None;
                }
                let end = *ends.get(row)? as usize;
                let start = if row == 0 { 0 } else { ends[row - 1] as usize };
                bytes.get(start..end)
            }
        }
    }

    fn heap_bytes(&self) -> usize {
        match self {
            StrColumn::Dict { values, codes } => {
                codes.capacity() * 4
                    + values.capacity() * 16
                    + values.iter().map(|v| v.len()).sum::<usize>()
            }
            StrColumn::Arena { bytes, ends, nulls } => {
                bytes.capacity() + ends.capacity() * 4 + nulls.heap_bytes()
            }
        }
    }
}

/// Distinct values a dictionary column may hold before it turns into an arena.
const DICT_LIMIT: usize = 4096;

enum StrBuilder {
    Dict {
        values: Vec<Box<str>>,
        lookup: HashMap<Box<str>, u32>,
        codes: Vec<u32>,
        /// Expected total text bytes, to size an arena once.
        bytes_hint: usize,
    },
    Arena {
        bytes: String,
        ends: Vec<u32>,
        nulls: Nulls,
    },
}

impl StrBuilder {
    fn push(&mut self, value: Option<&str>) -> Result<(), String> {
        if let StrBuilder::Dict {
            values,
            lookup,
            codes,
            bytes_hint,
        } = self
        {
            match value {
                None => {
                    codes.push(u32::MAX);
                    return Ok(());
                }
                Some(v) => {
                    if let Some(&code) = lookup.get(v) {
                        codes.push(code);
                        return Ok(());
                    }
                    if values.len() < DICT_LIMIT {
                        let code = values.len() as u32;
                        values.push(v.into());
                        lookup.insert(v.into(), code);
                        codes.push(code);
                        return Ok(());
                    }
                }
            }
            // Too many distinct values: move to an arena.
            let mut bytes = String::with_capacity(*bytes_hint);
            let mut ends = Vec::with_capacity(codes.capacity());
            let mut nulls = Nulls::default();
            for (row, &code) in codes.iter().enumerate() {
                match values.get(code as usize) {
                    Some(v) => bytes.push_str(v),
                    None => nulls.set(row),
                }
                ends.push(
                    u32::try_from(bytes.len())
                        .map_err(|_| "column holds more than 4 GiB of text")?,
                );
            }
            *self = StrBuilder::Arena { bytes, ends, nulls };
        }
        if let StrBuilder::Arena { bytes, ends, nulls } = self {
            match value {
                Some(v) => bytes.push_str(v),
                None => nulls.set(ends.len()),
            }
            ends.push(
                u32::try_from(bytes.len()).map_err(|_| "column holds more than 4 GiB of text")?,
            );
        }
        Ok(())
    }

    fn finish(self) -> StrColumn {
        match self {
            StrBuilder::Dict { values, codes, .. } => StrColumn::Dict { values, codes },
            StrBuilder::Arena {
                mut bytes,
                mut ends,
                nulls,
            } => {
                bytes.shrink_to_fit();
                ends.shrink_to_fit();
                StrColumn::Arena { bytes, ends, nulls }
            }
        }
    }
}

enum ColumnBuilder {
    Int(Vec<i64>, Nulls),
    Float(Vec<f64>, Nulls),
    Bool(Vec<u8>),
    Str(StrBuilder),
}

impl ColumnBuilder {
    fn new(ty: ColumnType, rows: usize, bytes_hint: usize) -> ColumnBuilder {
        match ty {
            ColumnType::Int => ColumnBuilder::Int(Vec::with_capacity(rows), Nulls::default()),
            ColumnType::Float => ColumnBuilder::Float(Vec::with_capacity(rows), Nulls::default()),
            ColumnType::Bool => ColumnBuilder::Bool(Vec::with_capacity(rows)),
            ColumnType::String => ColumnBuilder::Str(StrBuilder::Dict {
                values: Vec::new(),
                lookup: HashMap::new(),
                codes: Vec::with_capacity(rows),
                bytes_hint,
            }),
        }
    }

    fn push_text(&mut self, field: &[u8]) -> Result<(), String> {
        let text = std::str::from_utf8(field).map_err(|_| "invalid UTF-8".to_string())?;
        if text.is_empty() {
            return self.push_value(Value::Null);
        }
        match self {
            ColumnBuilder::Int(values, _) => {
                let v = parse_int(text).ok_or_else(|| format!("`{text}` is not an int"))?;
                values.push(v);
                Ok(())
            }
            ColumnBuilder::Float(values, _) => {
                let v =
                    parse_float(text).ok_or_else(|| format!("`{text}` is not a finite float"))?;
                values.push(v);
                Ok(())
            }
            ColumnBuilder::Bool(values) => {
                let v = parse_bool(text).ok_or_else(|| format!("`{text}` is not a bool"))?;
                values.push(v as u8);
                Ok(())
            }
            ColumnBuilder::Str(b) => b.push(Some(text)),
        }
    }

    fn push_value(&mut self, value: Value) -> Result<(), String> {
        match (self, value) {
            (ColumnBuilder::Int(values, nulls), Value::Null) => {
                nulls.set(values.len());
                values.push(0);
            }
            (ColumnBuilder::Float(values, nulls), Value::Null) => {
                nulls.set(values.len());
                values.push(0.0);
            }
            (ColumnBuilder::Bool(values), Value::Null) => values.push(2),
            (ColumnBuilder::Str(b), Value::Null) => b.push(None)?,
            (ColumnBuilder::Int(values, _), Value::Int(v)) => values.push(v),
            (ColumnBuilder::Float(values, _), Value::Float(v)) if v.is_finite() => values.push(v),
            (ColumnBuilder::Float(values, _), Value::Int(v)) => values.push(v as f64),
            (ColumnBuilder::Bool(values), Value::Bool(v)) => values.push(v as u8),
            (ColumnBuilder::Str(b), Value::Str(v)) => b.push(Some(&v))?,
            (_, other) => return Err(format!("unexpected value {other:?}")),
        }
        Ok(())
    }

    fn finish(self) -> ColumnData {
        match self {
            ColumnBuilder::Int(values, nulls) => ColumnData::Int {
                values: Ints::narrow(values),
                nulls,
            },
            ColumnBuilder::Float(values, nulls) => ColumnData::Float { values, nulls },
            ColumnBuilder::Bool(values) => ColumnData::Bool(values),
            ColumnBuilder::Str(b) => ColumnData::Str(b.finish()),
        }
    }
}

#[derive(Clone)]
struct Inference {
    declared: Option<ColumnType>,
    /// Total bytes of the column's text.
    bytes: usize,
    any: bool,
    bool_ok: bool,
    int_ok: bool,
    float_ok: bool,
}

impl Default for Inference {
    fn default() -> Self {
        Inference {
            declared: None,
            bytes: 0,
            any: false,
            bool_ok: true,
            int_ok: true,
            float_ok: true,
        }
    }
}

impl Inference {
    fn observe(&mut self, field: &[u8]) {
        self.bytes += field.len();
        if self.declared.is_some() || field.is_empty() {
            return;
        }
        if !(self.bool_ok || self.int_ok || self.float_ok) {
            return;
        }
        self.any = true;
        let Ok(text) = std::str::from_utf8(field) else {
            self.bool_ok = false;
            self.int_ok = false;
            self.float_ok = false;
            return;
        };
        if self.bool_ok && parse_bool(text).is_none() {
            self.bool_ok = false;
        }
        if self.int_ok && parse_int(text).is_none() {
            self.int_ok = false;
        }
        if self.float_ok && !self.int_ok && parse_float(text).is_none() {
            self.float_ok = false;
        }
    }

    fn resolve(&self) -> ColumnType {
        if let Some(t) = self.declared {
            return t;
        }
        if !self.any {
            ColumnType::String
        } else if self.bool_ok {
            ColumnType::Bool
        } else if self.int_ok {
            ColumnType::Int
        } else if self.float_ok {
            ColumnType::Float
        } else {
            ColumnType::String
        }
    }
}

fn parse_bool(text: &str) -> Option<bool> {
    if text.eq_ignore_ascii_case("true") {
        Some(true)
    } else if text.eq_ignore_ascii_case("false") {
        Some(false)
    } else {
        None
    }
}

fn parse_int(text: &str) -> Option<i64> {
    text.parse::<i64>().ok()
}

/// Finite decimal floats only: `NaN`, `inf` and friends stay text.
fn parse_float(text: &str) -> Option<f64> {
    let first = text.as_bytes().first()?;
    if !(first.is_ascii_digit() || matches!(first, b'-' | b'+' | b'.')) {
        return None;
    }
    text.parse::<f64>().ok().filter(|v| v.is_finite())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn load(text: &str, duplicates: Duplicates) -> Result<Dataset, DatasetError> {
        let mut file = tempfile::NamedTempFile::new().expect("temp file");
        file.write_all(text.as_bytes()).expect("write");
        Dataset::load_csv("t", file.path(), "id", duplicates, &BTreeMap::new())
    }

    #[test]
    fn infers_types_and_finds_rows() {
        let ds = load(
            "id,age,score,flag,name,nan\nA1,34,1.5,true,x,NaN\nA2,,2,false,,inf\n",
            Duplicates::Error,
        )
        .expect("loads");
        use ColumnType::*;
        assert_eq!(
            ds.schema().types,
            vec![String, Int, Float, Bool, String, String]
        );
        let r = ds.find(KeyRef::Str("A2")).expect("found");
        assert_eq!(ds.value(r, 1), ValueRef::Null);
        assert_eq!(ds.value(r, 2), ValueRef::Float(2.0));
        assert_eq!(ds.value(r, 4), ValueRef::Null);
        assert_eq!(ds.find(KeyRef::Str("A3")), None);
        let json = serde_json::to_string(&ds.row(0)).expect("json");
        assert_eq!(
            json,
            r#"{"id":"A1","age":34,"score":1.5,"flag":true,"name":"x","nan":"NaN"}"#
        );
    }

    #[test]
    fn duplicates_error_or_last() {
        let text = "id,v\na,1\nb,2\na,3\n";
        let err = load(text, Duplicates::Error).unwrap_err().to_string();
        assert!(
            err.contains("line 4") && err.contains("duplicate key \"a\""),
            "{err}"
        );
        let ds = load(text, Duplicates::Last).expect("loads");
        let r = ds.find(KeyRef::Str("a")).expect("found");
        assert_eq!(ds.value(r, 1), ValueRef::Int(3));
        assert_eq!(ds.keys(), 2);
    }

    #[test]
    fn int_keys_match_numbers_and_text() {
        let mut file = tempfile::NamedTempFile::new().expect("temp file");
        file.write_all(b"id,v\n7,x\n42,y\n").expect("write");
        let declared = BTreeMap::from([("id".to_string(), ColumnType::Int)]);
        let ds =
            Dataset::load_csv("t", file.path(), "id", Duplicates::Error, &declared).expect("loads");
        assert_eq!(ds.find(KeyRef::Int(42)), Some(1));
        assert_eq!(ds.find(KeyRef::Str("42")), Some(1));
        assert_eq!(ds.find(KeyRef::Str("x")), None);
    }

    #[test]
    fn bad_files_are_errors() {
        let err = load("id,v\na,1,2\n", Duplicates::Error)
            .unwrap_err()
            .to_string();
        assert!(err.contains("malformed CSV"), "{err}");
        let err = load("key,v\na,1\n", Duplicates::Error)
            .unwrap_err()
            .to_string();
        assert!(err.contains("key column `id`"), "{err}");
        let err = load("id,v\n,1\n", Duplicates::Error)
            .unwrap_err()
            .to_string();
        assert!(err.contains("empty key"), "{err}");
    }

    #[test]
    fn many_distinct_strings_move_to_an_arena() {
        let mut text = String::from("id,tag\n");
        for i in 0..(DICT_LIMIT + 10) {
            text.push_str(&format!("k{i},t{i}\n"));
        }
        let ds = load(&text, Duplicates::Error).expect("loads");
        let r = ds.find(KeyRef::Str("k4100")).expect("found");
        assert_eq!(ds.value(r, 1), ValueRef::Str("t4100"));
        assert_eq!(ds.value(3, 1), ValueRef::Str("t3"));
    }
}
