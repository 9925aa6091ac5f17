//! Typed access to a spanned table that collects every error it finds:
//! unknown keys (with "did you mean"), wrong types, missing fields.

use super::diag::{Code, Diagnostic, did_you_mean};
use super::source::{Entry, NodeKind, Span, Table};

use std::time::Duration;

/// Collected diagnostics.
#[derive(Default, Debug)]
pub struct Errors(pub Vec<Diagnostic>);

impl Errors {
    pub fn push(&mut self, d: Diagnostic) {
        self.0.push(d);
    }
}

/// A table being decoded: `what` names it in messages (e.g. `service.customer-features`).
pub struct Fields<'t> {
    pub table: &'t Table,
    pub span: Span,
    pub what: String,
}

impl<'t> Fields<'t> {
    pub fn new(table: &'t Table, span: Span, what: impl Into<String>) -> Self {
        Fields {
            table,
            span,
            what: what.into(),
        }
    }

    /// Reports every key not in `allowed`.
    pub fn allow(&self, errors: &mut Errors, allowed: &[&str]) {
        for e in &self.table.entries {
            if !allowed.contains(&e.key.as_str()) {
                let mut d = Diagnostic::new(
                    Code::UnknownKey,
                    e.key_span,
                    format!("unknown key `{}` in {}", e.key, self.what),
                )
                .label("unknown key");
                d = match did_you_mean(&e.key, allowed.iter().copied()) {
                    Some(s) => d.help(format!("did you mean `{s}`?")),
                    None => d.help(format!("expected one of: {}", allowed.join(", "))),
                };
                errors.push(d);
            }
        }
    }

    pub fn entry(&self, key: &str) -> Option<&'t Entry> {
        self.table.get(key)
    }

    pub fn missing(&self, errors: &mut Errors, key: &str, ty: &str, example: &str) {
        errors.push(
            Diagnostic::new(
                Code::MissingField,
                self.span,
                format!("missing field `{key}` in {}", self.what),
            )
            .label(format!("`{key}` is required here"))
            .help(format!("add `{key} = {example}` ({ty})")),
        );
    }

    pub fn str_opt(&self, errors: &mut Errors, key: &str) -> Option<(String, Span)> {
        let e = self.entry(key)?;
        match &e.value.kind {
            k if k.is_unresolved() => None,
            NodeKind::Str(s) => Some((s.clone(), e.value.span)),
            other => {
                errors.push(wrong_type(e, "a string", other));
                None
            }
        }
    }

    pub fn str_req(&self, errors: &mut Errors, key: &str, example: &str) -> Option<(String, Span)> {
        if self.entry(key).is_none() {
            self.missing(errors, key, "a string", example);
            return None;
        }
        self.str_opt(errors, key)
    }

    pub fn bool_opt(&self, errors: &mut Errors, key: &str) -> Option<bool> {
        let e = self.entry(key)?;
        match &e.value.kind {
            k if k.is_unresolved() => None,
            NodeKind::Bool(b) => Some(*b),
            other => {
                errors.push(wrong_type(e, "a boolean (`true` or `false`)", other));
                None
            }
        }
    }

    pub fn int_opt(&self, errors: &mut Errors, key: &str) -> Option<(i64, Span)> {
        let e = self.entry(key)?;
        match &e.value.kind {
            k if k.is_unresolved() => None,
            NodeKind::Int(i) => Some((*i, e.value.span)),
            other => {
                errors.push(wrong_type(e, "an integer", other));
                None
            }
        }
    }

    /// A non-negative integer that fits `u32`.
    pub fn u32_opt(&self, errors: &mut Errors, key: &str) -> Option<u32> {
        let (v, span) = self.int_opt(errors, key)?;
        match u32::try_from(v) {
            Ok(v) => Some(v),
            Err(_) => {
                errors.push(
                    Diagnostic::new(
                        Code::InvalidValue,
                        span,
                        format!("`{key}` must be a non-negative integer, found {v}"),
                    )
                    .label("out of range")
                    .help(format!("use a value from 0 to {}", u32::MAX)),
                );
                None
            }
        }
    }

    /// A duration written as a string of `<number><unit>` parts, units `ms`,
    /// `s`, `m`, `h`, `d` (`"30s"`, `"5m"`, `"1h30m"`), more than zero.
    pub fn duration_opt(&self, errors: &mut Errors, key: &str) -> Option<(Duration, Span)> {
        let (text, span) = self.str_opt(errors, key)?;
        match parse_duration(&text) {
            Some(d) if !d.is_zero() => Some((d, span)),
            _ => {
                errors.push(
                    Diagnostic::new(
                        Code::InvalidValue,
                        span,
                        format!("`{key}` is not a duration: \"{text}\""),
                    )
                    .label("expected a duration")
                    .help("write a number and a unit (ms, s, m, h, d), e.g. \"30s\", \"5m\" or \"1h30m\""),
                );
                None
            }
        }
    }

    pub fn strs_opt(&self, errors: &mut Errors, key: &str) -> Option<Vec<(String, Span)>> {
        let e = self.entry(key)?;
        if e.value.kind.is_unresolved() {
            return None;
        }
        let NodeKind::Array(items) = &e.value.kind else {
            errors.push(wrong_type(e, "an array of strings", &e.value.kind));
            return None;
        };
        let mut out = Vec::new();
        for it in items {
            match &it.kind {
                k if k.is_unresolved() => {}
                NodeKind::Str(s) => out.push((s.clone(), it.span)),
                other => errors.push(
                    Diagnostic::new(
                        Code::WrongType,
                        it.span,
                        format!("expected a string in `{key}`, found {}", other.type_name()),
                    )
                    .label("not a string")
                    .help("quote the value, e.g. \"name\""),
                ),
            }
        }
        Some(out)
    }

    pub fn table_opt(&self, errors: &mut Errors, key: &str) -> Option<(&'t Table, Span)> {
        let e = self.entry(key)?;
        match &e.value.kind {
            k if k.is_unresolved() => None,
            NodeKind::Table(t) => Some((t, e.value.span)),
            other => {
                errors.push(wrong_type(e, "a table", other));
                None
            }
        }
    }

    /// A table of named tables (`[service.x.endpoint.NAME]`), each with its span.
    pub fn named_tables(
        &self,
        errors: &mut Errors,
        key: &str,
    ) -> Vec<(&'t str, Span, &'t Table, Span)> {
        let Some((t, _)) = self.table_opt(errors, key) else {
            return Vec::new();
        };
        named_tables_of(errors, t, &format!("{}.{key}", self.what))
    }
}

/// Every entry of `t` must be a table.
pub fn named_tables_of<'t>(
    errors: &mut Errors,
    t: &'t Table,
    what: &str,
) -> Vec<(&'t str, Span, &'t Table, Span)> {
    let mut out = Vec::new();
    for e in &t.entries {
        match &e.value.kind {
            NodeKind::Table(inner) => out.push((e.key.as_str(), e.key_span, inner, e.value.span)),
            k if k.is_unresolved() => {}
            other => errors.push(
                Diagnostic::new(
                    Code::WrongType,
                    e.value.span,
                    format!(
                        "`{what}.{}` must be a table, found {}",
                        e.key,
                        other.type_name()
                    ),
                )
                .label("expected a table")
                .help(format!("write it as a section: [{what}.{}]", e.key)),
            ),
        }
    }
    out
}

pub fn wrong_type(e: &Entry, expected: &str, found: &NodeKind) -> Diagnostic {
    let key = &e.key;
    // Show the fix with the value the person wrote, when there is an obvious one.
    let help = match (expected, found) {
        ("a string", NodeKind::Int(v)) => format!("quote the value: {key} = \"{v}\""),
        ("a string", NodeKind::Float(v)) => format!("quote the value: {key} = \"{v}\""),
        ("a string", NodeKind::Bool(v)) => format!("quote the value: {key} = \"{v}\""),
        ("a string", _) => format!("quote the value: {key} = \"...\""),
        ("an integer", NodeKind::Str(v)) if v.trim().parse::<i64>().is_ok() => {
            format!("remove the quotes: {key} = {}", v.trim())
        }
        (e, NodeKind::Str(v)) if e.starts_with("a boolean") => {
            match v.trim().to_ascii_lowercase().as_str() {
                "true" | "yes" | "on" | "1" => format!("write it without quotes: {key} = true"),
                "false" | "no" | "off" | "0" => format!("write it without quotes: {key} = false"),
                _ => format!("write {key} = true or {key} = false, without quotes"),
            }
        }
        (e, NodeKind::Int(_)) if e.starts_with("a boolean") => {
            format!("write {key} = true or {key} = false")
        }
        _ => format!("change `{key}` to {expected}"),
    };
    Diagnostic::new(
        Code::WrongType,
        e.value.span,
        format!("`{key}` must be {expected}, found {}", found.type_name()),
    )
    .label(format!("expected {expected}"))
    .help(help)
}

/// `"1h30m"` → 90 minutes; `None` when it is not a sequence of `<number><unit>`.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let mut rest = text.trim();
    if rest.is_empty() {
        return None;
    }
    let mut total = Duration::ZERO;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return None;
        }
        let n: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let part = match &rest[..unit] {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.checked_mul(60)?),
            "h" => Duration::from_secs(n.checked_mul(3600)?),
            "d" => Duration::from_secs(n.checked_mul(86_400)?),
            _ => return None,
        };
        total = total.checked_add(part)?;
        rest = &rest[unit..];
    }
    Some(total)
}

/// The inverse of [`parse_duration`]: `90 s` → `"1m30s"`, `250 ms` → `"250ms"`.
pub fn duration_text(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        return "0s".into();
    }
    let mut out = String::new();
    let mut rest = ms;
    for (unit, size) in [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1000),
        ("ms", 1),
    ] {
        if rest >= size {
            out.push_str(&format!("{}{unit}", rest / size));
            rest %= size;
        }
    }
    out
}

#[cfg(test)]
mod duration_tests {
    use super::{duration_text, parse_duration};
    use std::time::Duration;

    #[test]
    fn durations_print_as_they_parse() {
        for text in ["30s", "250ms", "1m30s", "2d", "1h5s", "0s"] {
            assert_eq!(duration_text(parse_duration(text).unwrap()), text);
        }
    }

    #[test]
    fn durations_parse_by_unit_and_refuse_the_rest() {
        assert_eq!(parse_duration("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Some(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("2d"), Some(Duration::from_secs(172_800)));
        for bad in [
            "",
            "5",
            "m",
            "5 m",
            "5min",
            "-5s",
            "1.5s",
            "99999999999999999999d",
        ] {
            assert_eq!(parse_duration(bad), None, "{bad:?}");
        }
    }
}
