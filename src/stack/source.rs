//! Source files and spans, and the owned, spanned TOML tree every later
//! stage reads (so each value remembers its file, line and column).

use std::path::{Path, PathBuf};

/// Index of a file in a [`Sources`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FileId(pub u32);

/// A byte range in one file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Span {
    pub file: FileId,
    pub start: usize,
    pub end: usize,
}

/// Every file read for one stack (stack, environment overlays, modules).
#[derive(Debug, Default)]
pub struct Sources {
    files: Vec<(PathBuf, String)>,
}

impl Sources {
    pub fn add(&mut self, path: PathBuf, text: String) -> FileId {
        self.files.push((path, text));
        FileId(u32::try_from(self.files.len() - 1).unwrap_or(u32::MAX))
    }
    pub fn path(&self, id: FileId) -> &Path {
        &self.files[id.0 as usize].0
    }
    pub fn text(&self, id: FileId) -> &str {
        &self.files[id.0 as usize].1
    }
    /// 1-based line and column (in characters) of a byte offset.
    pub fn line_col(&self, id: FileId, offset: usize) -> (usize, usize) {
        let text = self.text(id);
        let offset = offset.min(text.len());
        let before = &text[..floor_char_boundary(text, offset)];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let col = before[line_start..].chars().count() + 1;
        (line, col)
    }
    /// The full text of a 1-based line.
    pub fn line_text(&self, id: FileId, line: usize) -> &str {
        self.text(id)
            .lines()
            .nth(line.saturating_sub(1))
            .unwrap_or("")
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// An owned TOML value with its span.
#[derive(Clone, Debug)]
pub struct Node {
    pub kind: NodeKind,
    pub span: Span,
}

#[derive(Clone, Debug)]
pub enum NodeKind {
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
    Datetime,
    Array(Vec<Node>),
    Table(Table),
}

/// A table, in source order.
#[derive(Clone, Debug, Default)]
pub struct Table {
    pub entries: Vec<Entry>,
}

#[derive(Clone, Debug)]
pub struct Entry {
    pub key: String,
    pub key_span: Span,
    pub value: Node,
}

impl Table {
    pub fn get(&self, key: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.key == key)
    }
    pub fn get_mut(&mut self, key: &str) -> Option<&mut Entry> {
        self.entries.iter_mut().find(|e| e.key == key)
    }
}

impl NodeKind {
    /// The TOML type name, for "expected X, found Y" messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            NodeKind::Str(_) => "a string",
            NodeKind::Int(_) => "an integer",
            NodeKind::Float(_) => "a float",
            NodeKind::Bool(_) => "a boolean",
            NodeKind::Datetime => "a datetime",
            NodeKind::Array(_) => "an array",
            NodeKind::Table(_) => "a table",
        }
    }
}

/// The `expr` of every `${expr}` in `s`.
pub fn expressions(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(i) = rest.find("${") {
        let after = &rest[i + 2..];
        let Some(j) = after.find('}') else { break };
        out.push(&after[..j]);
        rest = &after[j + 1..];
    }
    out
}

impl NodeKind {
    /// A string still holding a `${...}` after loading: its error was
    /// reported by `load`, so decoding treats the value as absent.
    pub fn is_unresolved(&self) -> bool {
        matches!(self, NodeKind::Str(s) if !expressions(s).is_empty())
    }
}

/// A TOML syntax error.
#[derive(Debug)]
pub struct SyntaxError {
    pub message: String,
    pub span: Span,
}

/// Parses one file into a [`Table`].
pub fn parse(file: FileId, text: &str) -> Result<Table, SyntaxError> {
    match toml::de::DeTable::parse(text) {
        Ok(doc) => {
            let span = doc.span();
            Ok(convert_table(
                file,
                doc.get_ref(),
                Span {
                    file,
                    start: span.start,
                    end: span.end,
                },
            ))
        }
        Err(e) => {
            let range = e.span().unwrap_or(0..0);
            let message = e.message().trim().trim_end_matches('.').to_owned();
            Err(SyntaxError {
                message,
                span: Span {
                    file,
                    start: range.start,
                    end: range.end.max(range.start),
                },
            })
        }
    }
}

fn convert_table(file: FileId, t: &toml::de::DeTable<'_>, _span: Span) -> Table {
    let mut entries = Vec::with_capacity(t.len());
    for (k, v) in t.iter() {
        let ks = k.span();
        entries.push(Entry {
            key: k.get_ref().to_string(),
            key_span: Span {
                file,
                start: ks.start,
                end: ks.end,
            },
            value: convert(file, v),
        });
    }
    Table { entries }
}

fn convert(file: FileId, v: &toml::Spanned<toml::de::DeValue<'_>>) -> Node {
    use toml::de::DeValue;
    let r = v.span();
    let span = Span {
        file,
        start: r.start,
        end: r.end,
    };
    let kind = match v.get_ref() {
        DeValue::String(s) => NodeKind::Str(s.to_string()),
        DeValue::Integer(i) => {
            let digits = i.as_str().replace('_', "");
            match i64::from_str_radix(&digits, i.radix()) {
                Ok(n) => NodeKind::Int(n),
                Err(_) => NodeKind::Float(f64::INFINITY),
            }
        }
        DeValue::Float(f) => {
            NodeKind::Float(f.as_str().replace('_', "").parse().unwrap_or(f64::NAN))
        }
        DeValue::Boolean(b) => NodeKind::Bool(*b),
        DeValue::Datetime(_) => NodeKind::Datetime,
        DeValue::Array(a) => NodeKind::Array(a.iter().map(|x| convert(file, x)).collect()),
        DeValue::Table(t) => NodeKind::Table(convert_table(file, t, span)),
    };
    Node { kind, span }
}
