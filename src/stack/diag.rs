//! Stack errors a person can fix: file, line and column, the offending line
//! with the span underlined, and a `help:` hint. Every error found in one run
//! is reported, not just the first.

use std::fmt::Write as _;

use super::source::{Sources, Span};

/// What kind of mistake, so tests and tools can match on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Code {
    Syntax,
    UnknownKey,
    WrongType,
    MissingField,
    DanglingReference,
    Cycle,
    InvalidCidr,
    OverlappingCidr,
    SubnetOutsideNetwork,
    /// A NAT gateway with no public subnet to live in.
    NatGatewayPlacement,
    /// A service enriches from another whose exposures do not let it call.
    CallerNotAllowed,
    Duplicate,
    PortOutOfRange,
    /// A service asks for more ports than the target can give it.
    PortConflict,
    InlineSecret,
    UnknownEnvironment,
    InvalidValue,
    Io,
}

impl Code {
    pub fn as_str(self) -> &'static str {
        match self {
            Code::Syntax => "syntax",
            Code::UnknownKey => "unknown-key",
            Code::WrongType => "wrong-type",
            Code::MissingField => "missing-field",
            Code::DanglingReference => "dangling-reference",
            Code::Cycle => "cycle",
            Code::InvalidCidr => "invalid-cidr",
            Code::OverlappingCidr => "overlapping-cidr",
            Code::SubnetOutsideNetwork => "subnet-outside-network",
            Code::NatGatewayPlacement => "nat-gateway-placement",
            Code::CallerNotAllowed => "caller-not-allowed",
            Code::Duplicate => "duplicate",
            Code::PortOutOfRange => "port-out-of-range",
            Code::PortConflict => "port-conflict",
            Code::InlineSecret => "inline-secret",
            Code::UnknownEnvironment => "unknown-environment",
            Code::InvalidValue => "invalid-value",
            Code::Io => "io",
        }
    }
}

/// A secondary location ("first defined here").
#[derive(Clone, Debug)]
pub struct Related {
    pub span: Span,
    pub label: String,
}

/// One stack error.
#[derive(Clone, Debug)]
pub struct Diagnostic {
    pub code: Code,
    pub message: String,
    pub span: Option<Span>,
    pub label: String,
    pub help: Option<String>,
    pub related: Vec<Related>,
    /// The primary span holds a secret: mask it when showing the line.
    pub redact: bool,
}

impl Diagnostic {
    pub fn new(code: Code, span: Span, message: impl Into<String>) -> Self {
        Diagnostic {
            code,
            message: message.into(),
            span: Some(span),
            label: String::new(),
            help: None,
            related: Vec::new(),
            redact: false,
        }
    }
    /// An error with no place in a file (e.g. a folder that does not exist).
    pub fn global(code: Code, message: impl Into<String>) -> Self {
        Diagnostic {
            code,
            message: message.into(),
            span: None,
            label: String::new(),
            help: None,
            related: Vec::new(),
            redact: false,
        }
    }
    pub fn label(mut self, label: impl Into<String>) -> Self {
        self.label = label.into();
        self
    }
    pub fn help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }
    /// Masks the primary span in the rendered snippet (a secret written inline).
    pub fn redact(mut self) -> Self {
        self.redact = true;
        self
    }
    pub fn related(mut self, span: Span, label: impl Into<String>) -> Self {
        self.related.push(Related {
            span,
            label: label.into(),
        });
        self
    }
}

/// The diagnostics of one run, with the sources they point into.
#[derive(Debug)]
pub struct Report {
    pub diagnostics: Vec<Diagnostic>,
    pub sources: Sources,
}

impl Report {
    /// Renders every diagnostic, cargo-style, without colour.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for d in &self.diagnostics {
            render_one(&mut out, d, &self.sources);
            out.push('\n');
        }
        let n = self.diagnostics.len();
        let _ = writeln!(
            out,
            "error: stack has {n} error{}",
            if n == 1 { "" } else { "s" }
        );
        out
    }

    /// Machine-readable diagnostics (for `--json` and tests).
    pub fn to_json(&self) -> serde_json::Value {
        let items: Vec<serde_json::Value> = self
            .diagnostics
            .iter()
            .map(|d| {
                let loc = d.span.map(|s| {
                    let (line, column) = self.sources.line_col(s.file, s.start);
                    serde_json::json!({"file": self.sources.path(s.file).display().to_string(), "line": line, "column": column})
                });
                serde_json::json!({"code": d.code.as_str(), "message": d.message, "location": loc, "help": d.help})
            })
            .collect();
        serde_json::json!({ "errors": items })
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.render())
    }
}

impl std::error::Error for Report {}

fn render_one(out: &mut String, d: &Diagnostic, sources: &Sources) {
    let _ = writeln!(out, "error[{}]: {}", d.code.as_str(), d.message);
    // One gutter for the whole diagnostic, wide enough for every line number shown.
    let gutter = d
        .span
        .iter()
        .chain(d.related.iter().map(|r| &r.span))
        .map(|s| sources.line_col(s.file, s.start).0.to_string().len())
        .max()
        .unwrap_or(1);
    let pad = " ".repeat(gutter);
    if let Some(span) = d.span {
        snippet(out, sources, span, &d.label, '^', gutter, d.redact);
    }
    for r in &d.related {
        snippet(out, sources, r.span, &r.label, '-', gutter, false);
    }
    if let Some(help) = &d.help {
        let _ = writeln!(out, "{pad} = help: {help}");
    }
}

fn snippet(
    out: &mut String,
    sources: &Sources,
    span: Span,
    label: &str,
    mark: char,
    gutter: usize,
    redact: bool,
) {
    let (line, col) = sources.line_col(span.file, span.start);
    let path = sources.path(span.file).display();
    let pad = " ".repeat(gutter);
    let _ = writeln!(out, "{pad}--> {path}:{line}:{col}");
    let text = sources.line_text(span.file, line);
    // Underline to the end of the span or of the line, whichever comes first.
    let (end_line, end_col) = sources.line_col(span.file, span.end.max(span.start + 1));
    let line_len = text.chars().count();
    let width = if end_line == line {
        end_col.saturating_sub(col).max(1)
    } else {
        (line_len + 1).saturating_sub(col).max(1)
    };
    let shown: String = if redact {
        // A secret written inline is not repeated into terminals and CI logs:
        // mask the underlined value but keep its quotes and the column layout.
        let inside = col + 1..(col + width).saturating_sub(1);
        text.chars()
            .zip(1..)
            .map(|(ch, c)| if inside.contains(&c) { '*' } else { ch })
            .collect()
    } else {
        text.to_owned()
    };
    let _ = writeln!(out, "{pad} |");
    let _ = writeln!(out, "{line:>gutter$} | {shown}");
    let marks: String = std::iter::repeat_n(mark, width).collect();
    let indent = " ".repeat(col.saturating_sub(1));
    if label.is_empty() {
        let _ = writeln!(out, "{pad} | {indent}{marks}");
    } else {
        let _ = writeln!(out, "{pad} | {indent}{marks} {label}");
    }
}

/// The closest candidate within a small edit distance, for "did you mean".
/// A swap of two neighbouring letters counts as one edit; a word that merely
/// replaces every letter (`c` for `a`) is not "close"; failing an edit match,
/// a candidate the word starts with, or that starts with the word, is taken
/// (`maximum` → `max`).
pub fn did_you_mean<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let mut best: Option<(usize, &str)> = None;
    let mut prefix: Option<&str> = None;
    let len = word.chars().count();
    for c in candidates {
        let d = edit_distance(word, c);
        let limit = (len.max(c.chars().count()) / 3).max(1);
        if d <= limit && d < len && best.is_none_or(|(bd, _)| d < bd) {
            best = Some((d, c));
        }
        let (short, long) = if c.len() < word.len() {
            (c, word)
        } else {
            (word, c)
        };
        if prefix.is_none() && short.chars().count() >= 3 && long.starts_with(short) {
            prefix = Some(c);
        }
    }
    best.map(|(_, c)| c).or(prefix)
}

/// Optimal string alignment distance: insertions, deletions, substitutions
/// and transpositions of neighbours each cost one.
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            d[i][j] = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                d[i][j] = d[i][j].min(d[i - 2][j - 2] + 1);
            }
        }
    }
    d[a.len()][b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_close_names_only() {
        assert_eq!(
            did_you_mean("replica", ["replicas", "version"]),
            Some("replicas")
        );
        assert_eq!(did_you_mean("zzz", ["replicas", "version"]), None);
        assert_eq!(did_you_mean("mian", ["main", "batch"]), Some("main"));
        assert_eq!(
            did_you_mean("maximum", ["min", "max", "cpu_percent"]),
            Some("max")
        );
        assert_eq!(did_you_mean("c", ["a", "b"]), None);
    }
}
