//! Rendering: a [`Plan`] formatted for people ([`human`]) and for tools ([`json`]).
//!
//! Renderers only format. Every decision — the action, its reason, which
//! fields changed and which force a replacement — was made by
//! [`crate::plan::diff`]; nothing here inspects live state or re-plans.
//!
//! Human output follows Terraform's shape (a legend of the symbols present,
//! one block per resource, `~ field = old -> new`, a `Plan:` summary) and
//! reads the same without colour: colour only wraps symbols, addresses and
//! notes in ANSI codes, and only when [`Style::color`] is set.
//!
//! Secrets: a [`Value::Sensitive`] is always shown as `(sensitive)` (human)
//! or as `null` with a `*_sensitive` flag (JSON). Its digest is never printed.

use std::ffi::OsString;
use std::fmt::Write as _;

use serde_json::json;

use crate::plan::{Abandoned, Action, Change, FieldChange, Plan, Summary};
use crate::resource::Value;

/// The version of the [`json`] schema. The minor version grows when fields
/// are added; the major version when a field changes meaning or disappears.
pub const FORMAT_VERSION: &str = "1.1";

/// How human output is decorated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Style {
    /// Wrap symbols, addresses and notes in ANSI colour codes.
    pub color: bool,
}

impl Style {
    /// No escape codes at all.
    pub const PLAIN: Style = Style { color: false };
    /// ANSI colour and bold.
    pub const COLOR: Style = Style { color: true };

    /// Decides from the process environment whether output going to a
    /// terminal (`is_tty`) or not is coloured. See [`Style::from_vars`].
    pub fn from_env(is_tty: bool) -> Style {
        Style::from_vars(is_tty, |name| std::env::var_os(name))
    }

    /// Decides with the environment given as a lookup, in this order:
    ///
    /// 1. `NO_COLOR` set to anything non-empty: no colour (<https://no-color.org>);
    /// 2. `CLICOLOR_FORCE` set, non-empty and not `0`: colour, even when piped;
    /// 3. `CLICOLOR=0` or `TERM=dumb`: no colour;
    /// 4. otherwise colour exactly when the output is a terminal.
    pub fn from_vars(is_tty: bool, var: impl Fn(&str) -> Option<OsString>) -> Style {
        let is = |name: &str, value: &str| var(name).is_some_and(|v| v == value);
        let color = if var("NO_COLOR").is_some_and(|v| !v.is_empty()) {
            false
        } else if var("CLICOLOR_FORCE").is_some_and(|v| !v.is_empty() && v != "0") {
            true
        } else if is("CLICOLOR", "0") || is("TERM", "dumb") {
            false
        } else {
            is_tty
        };
        Style { color }
    }

    fn paint(self, paint: Paint, text: &str) -> String {
        if !self.color || text.is_empty() {
            return text.to_owned();
        }
        let code = match paint {
            Paint::Green => "32",
            Paint::Yellow => "33",
            Paint::Red => "31",
            Paint::Magenta => "35",
            Paint::Bold => "1",
            Paint::BoldGreen => "1;32",
        };
        format!("\x1b[{code}m{text}\x1b[0m")
    }
}

/// The plan for people, in Terraform's shape. Ends with a newline.
///
/// No-op changes are not listed; a plan without changes is the single line
/// `No changes. Your infrastructure matches the stack.`
pub fn human(plan: &Plan, style: Style) -> String {
    let shown: Vec<&Change> = plan
        .changes
        .iter()
        .filter(|c| !c.action.is_noop())
        .collect();
    let mut out = String::new();
    if shown.is_empty() {
        let _ = writeln!(
            out,
            "{} Your infrastructure matches the stack.",
            style.paint(Paint::BoldGreen, "No changes.")
        );
        return out;
    }

    let _ = writeln!(
        out,
        "mesh will perform the following actions (stack {}, environment {}):",
        plan.stack, plan.env
    );
    let _ = writeln!(
        out,
        "Resource actions are indicated with the following symbols:"
    );
    for kind in [Kind::Create, Kind::Update, Kind::Replace, Kind::Delete] {
        if shown.iter().any(|c| Kind::of(&c.action) == kind) {
            let _ = writeln!(out, "{} {}", kind.symbol(style), kind.legend());
        }
    }
    out.push('\n');

    for change in shown {
        resource_block(&mut out, change, style);
        out.push('\n');
    }

    let line = summary_line(&plan.summary());
    let rest = line.strip_prefix("Plan:").unwrap_or(&line);
    let _ = writeln!(out, "{}{rest}", style.paint(Paint::Bold, "Plan:"));
    if let Some(a) = &plan.abandoned {
        out.push('\n');
        let _ = writeln!(
            out,
            "{} {}",
            style.paint(Paint::Yellow, "Note:"),
            abandoned_line(a)
        );
        for o in &a.objects {
            let _ = writeln!(out, "  {o}");
        }
    }
    out
}

/// One line on the Kubernetes objects a destroy leaves to their cluster.
pub fn abandoned_line(a: &Abandoned) -> String {
    let n = a.objects.len();
    let (objects, are) = if n == 1 {
        ("object", "is")
    } else {
        ("objects", "are")
    };
    if a.cluster_exists {
        format!(
            "{n} Kubernetes {objects} of the stack {are} not deleted one by one: they go with {}, which this plan deletes ({})",
            a.cluster, a.reason
        )
    } else {
        format!(
            "{n} Kubernetes {objects} of the stack {are} not deleted one by one: {} no longer exists, and they went with it",
            a.cluster
        )
    }
}

/// `Plan: 2 to add, 1 to change, 2 to destroy.`
pub fn summary_line(summary: &Summary) -> String {
    format!(
        "Plan: {} to add, {} to change, {} to destroy.",
        summary.add, summary.change, summary.destroy
    )
}

/// The plan for tools, as JSON with a versioned schema (`format_version` is
/// [`FORMAT_VERSION`]; see also `docs/plan-json.md`):
///
/// ```text
/// {
///   "format_version": "1.0",
///   "stack": "customer-mesh",
///   "env": "local",
///   "resource_changes": [          // every resource, in plan order, no-ops included
///     {
///       "address": "network.main",
///       "type": "aws_vpc",           // the provider-specific kind
///       "provider": "aws",           // "local" | "aws" | "kubernetes"
///       "action": "replace",         // "create" | "update" | "replace" | "delete" | "no-op"
///       "forced_by": ["cidr"],       // fields forcing a replace; [] otherwise, and for --replace
///       "reason": "cidr cannot be changed in place",   // for people; do not parse
///       "fields": [                  // changed fields only (creates: all; deletes: all live)
///         {
///           "path": "cidr",
///           "before": "10.0.0.0/16", // null: absent, null, sensitive or unknown
///           "after": "10.1.0.0/16",
///           "before_sensitive": false,  // true: (part of) before is secret, replaced by null
///           "after_sensitive": false,
///           "after_unknown": false,     // true: (part of) after is known only after apply
///           "forces_replacement": true
///         }
///       ]
///     }
///   ],
///   "summary": { "add": 1, "change": 0, "destroy": 1 },
///   "abandoned": {                 // only on a destroy that leaves objects to their cluster
///     "cluster": "cluster.platform",
///     "cluster_exists": true,      // true: this plan deletes it; false: already gone
///     "reason": "the cluster cannot be reached: ...",   // for people; do not parse
///     "objects": ["service.customer-scoring.deployment"]
///   }
/// }
/// ```
///
/// Values are natural JSON: strings, numbers, booleans, arrays, objects.
/// A secret or unknown value inside a list or map is replaced by `null` in
/// place and sets the field's flag. Non-finite floats are `null`.
pub fn json(plan: &Plan) -> serde_json::Value {
    let summary = plan.summary();
    let mut out = json!({
        "format_version": FORMAT_VERSION,
        "stack": plan.stack,
        "env": plan.env,
        "resource_changes": plan.changes.iter().map(json_change).collect::<Vec<_>>(),
        "summary": {
            "add": summary.add,
            "change": summary.change,
            "destroy": summary.destroy,
        },
    });
    if let Some(a) = &plan.abandoned {
        out["abandoned"] = json!({
            "cluster": a.cluster.as_str(),
            "cluster_exists": a.cluster_exists,
            "reason": a.reason,
            "objects": a.objects.iter().map(|o| o.as_str()).collect::<Vec<_>>(),
        });
    }
    out
}

// ---------------------------------------------------------------------------
// Human rendering

/// Lines longer than this show a changed list or map one element a line.
const WIDTH: usize = 100;
const FIELD_INDENT: &str = "      ";
const ELEMENT_INDENT: &str = "          ";
const CLOSE_INDENT: &str = "        ";

#[derive(Clone, Copy)]
enum Paint {
    Green,
    Yellow,
    Red,
    Magenta,
    Bold,
    BoldGreen,
}

/// The action classes shown in the legend, in legend order.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    NoOp,
    Create,
    Update,
    Replace,
    Delete,
}

impl Kind {
    fn of(action: &Action) -> Kind {
        match action {
            Action::NoOp => Kind::NoOp,
            Action::Create => Kind::Create,
            Action::Update => Kind::Update,
            Action::Replace { .. } => Kind::Replace,
            Action::Delete => Kind::Delete,
        }
    }
    fn text(self) -> &'static str {
        match self {
            Kind::NoOp => " ",
            Kind::Create => "+",
            Kind::Update => "~",
            Kind::Replace => "-/+",
            Kind::Delete => "-",
        }
    }
    fn paint(self) -> Paint {
        match self {
            Kind::NoOp => Paint::Bold,
            Kind::Create => Paint::Green,
            Kind::Update => Paint::Yellow,
            Kind::Replace => Paint::Magenta,
            Kind::Delete => Paint::Red,
        }
    }
    /// The symbol right-aligned in the three columns `-/+` needs.
    fn symbol(self, style: Style) -> String {
        let text = self.text();
        format!(
            "{}{}",
            " ".repeat(3 - text.len()),
            style.paint(self.paint(), text)
        )
    }
    /// The symbol alone, for fields and elements.
    fn mark(self, style: Style) -> String {
        style.paint(self.paint(), self.text())
    }
    fn legend(self) -> &'static str {
        match self {
            Kind::NoOp => "no change",
            Kind::Create => "create",
            Kind::Update => "update in place",
            Kind::Replace => "destroy and then create replacement",
            Kind::Delete => "destroy",
        }
    }
}

fn resource_block(out: &mut String, change: &Change, style: Style) {
    let kind = Kind::of(&change.action);
    let what = match &change.action {
        Action::NoOp => "has no changes",
        Action::Create => "will be created",
        Action::Update => "will be updated in place",
        Action::Replace { forced_by } if forced_by.is_empty() => "will be replaced, as requested",
        Action::Replace { .. } => "must be replaced",
        Action::Delete => "will be destroyed",
    };
    let address = change.address.as_str();
    let _ = writeln!(out, "  # {} {what}", style.paint(Paint::Bold, address));
    if !change.reason.is_empty() {
        let _ = writeln!(out, "  # ({})", change.reason);
    }
    let head = format!(
        "{} resource {} {}",
        kind.symbol(style),
        quote(&change.kind),
        quote(address)
    );

    let hidden = change
        .desired
        .as_ref()
        .map(|d| {
            d.attrs
                .keys()
                .filter(|k| !crate::plan::is_internal(k))
                .filter(|k| !change.fields.iter().any(|f| &f.path == *k))
                .count()
        })
        .unwrap_or(0);
    if change.fields.is_empty() && hidden == 0 {
        let _ = writeln!(out, "{head} {{}}");
        return;
    }
    let _ = writeln!(out, "{head} {{");
    let width = change
        .fields
        .iter()
        .map(|f| f.path.chars().count())
        .max()
        .unwrap_or(0);
    for field in &change.fields {
        field_lines(out, field, width, style);
    }
    if hidden > 0 {
        let _ = writeln!(
            out,
            "{CLOSE_INDENT}# ({})",
            count(hidden, "unchanged attribute")
        );
    }
    let _ = writeln!(out, "    }}");
}

fn field_lines(out: &mut String, field: &FieldChange, width: usize, style: Style) {
    let (kind, before, after) = match (&field.before, &field.after) {
        (None, Some(after)) => (Kind::Create, None, Some(after)),
        (Some(before), None) => (Kind::Delete, Some(before), None),
        (before, after) => (Kind::Update, before.as_ref(), after.as_ref()),
    };
    let null = Value::Null;
    let head = format!(
        "{FIELD_INDENT}{} {} = ",
        kind.mark(style),
        pad(&field.path, width)
    );
    let head_len = FIELD_INDENT.len() + 2 + width + 3;
    let note = if field.forces_replacement {
        format!(" {}", style.paint(Paint::Red, "# forces replacement"))
    } else {
        String::new()
    };

    let single = match (before, after) {
        (None, Some(a)) => compact(a),
        (Some(b), None) => format!("{} -> null", compact(b)),
        (Some(Value::Sensitive { .. }), Some(Value::Sensitive { .. })) => SENSITIVE.to_owned(),
        (b, a) => format!(
            "{} -> {}",
            compact(b.unwrap_or(&null)),
            compact(a.unwrap_or(&null))
        ),
    };
    if head_len + single.chars().count() <= WIDTH {
        let _ = writeln!(out, "{head}{single}{note}");
        return;
    }
    let elements = match (before, after) {
        (None, Some(a)) => one_sided(a, Kind::Create),
        (Some(b), None) => one_sided(b, Kind::Delete),
        (Some(Value::List(b)), Some(Value::List(a))) => Some((list_diff(b, a), '[', ']')),
        (Some(Value::Map(b)), Some(Value::Map(a))) => Some((map_diff(b, a), '{', '}')),
        _ => None,
    };
    let Some((elements, open, close)) = elements else {
        let _ = writeln!(out, "{head}{single}{note}");
        return;
    };
    let _ = writeln!(out, "{head}{open}{note}");
    let key_width = elements
        .iter()
        .map(|e| e.key.as_ref().map_or(0, |k| k.chars().count()))
        .max()
        .unwrap_or(0);
    let comma = if open == '[' { "," } else { "" };
    for element in &elements {
        if let Kind::NoOp = element.kind {
            let _ = writeln!(
                out,
                "{ELEMENT_INDENT}  # ({})",
                count(element.hidden, "unchanged element")
            );
            continue;
        }
        let key = element
            .key
            .as_ref()
            .map(|k| format!("{} = ", pad(k, key_width)))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "{ELEMENT_INDENT}{} {key}{}{comma}",
            element.kind.mark(style),
            element.text
        );
    }
    let tail = if kind == Kind::Delete { " -> null" } else { "" };
    let _ = writeln!(out, "{CLOSE_INDENT}{close}{tail}");
}

/// One line inside a multi-line list or map.
struct Element {
    /// `Create`, `Update` or `Delete` a shown element; `NoOp` for a run of hidden ones.
    kind: Kind,
    /// The map key, already quoted if it needs to be.
    key: Option<String>,
    text: String,
    hidden: usize,
}

impl Element {
    fn shown(kind: Kind, key: Option<&str>, text: String) -> Element {
        Element {
            kind,
            key: key.map(map_key),
            text,
            hidden: 0,
        }
    }
}

/// Every element of a collection that is created or deleted as a whole.
/// (A deleted one ends `] -> null` once, not on every element.)
fn one_sided(v: &Value, kind: Kind) -> Option<(Vec<Element>, char, char)> {
    match v {
        Value::List(items) if !items.is_empty() => Some((
            items
                .iter()
                .map(|i| Element::shown(kind, None, compact(i)))
                .collect(),
            '[',
            ']',
        )),
        Value::Map(m) if !m.is_empty() => Some((
            m.iter()
                .map(|(k, i)| Element::shown(kind, Some(k), compact(i)))
                .collect(),
            '{',
            '}',
        )),
        _ => None,
    }
}

/// Keys in order; unchanged ones counted in one note at the end.
fn map_diff(
    before: &std::collections::BTreeMap<String, Value>,
    after: &std::collections::BTreeMap<String, Value>,
) -> Vec<Element> {
    let mut keys: Vec<&String> = before.keys().chain(after.keys()).collect();
    keys.sort();
    keys.dedup();
    let mut out = Vec::new();
    let mut hidden = 0;
    for k in keys {
        match (before.get(k), after.get(k)) {
            (Some(b), Some(a)) if b == a => hidden += 1,
            (Some(b), Some(a)) => out.push(Element::shown(Kind::Update, Some(k), changed(b, a))),
            (None, Some(a)) => out.push(Element::shown(Kind::Create, Some(k), compact(a))),
            (Some(b), None) => out.push(Element::shown(
                Kind::Delete,
                Some(k),
                format!("{} -> null", compact(b)),
            )),
            (None, None) => {}
        }
    }
    if hidden > 0 {
        out.push(Element {
            kind: Kind::NoOp,
            key: None,
            text: String::new(),
            hidden,
        });
    }
    out
}

/// A longest-common-subsequence diff; each run of unchanged elements becomes one note.
fn list_diff(before: &[Value], after: &[Value]) -> Vec<Element> {
    // Trim the common prefix and suffix, then diff the middle.
    let prefix = before.iter().zip(after).take_while(|(b, a)| b == a).count();
    let suffix = before[prefix..]
        .iter()
        .rev()
        .zip(after[prefix..].iter().rev())
        .take_while(|(b, a)| b == a)
        .count();
    let b = &before[prefix..before.len() - suffix];
    let a = &after[prefix..after.len() - suffix];

    let mut ops: Vec<(Kind, &Value)> = Vec::new();
    ops.extend(before[..prefix].iter().map(|v| (Kind::NoOp, v)));
    if b.len().saturating_mul(a.len()) > 1_000_000 {
        // Too large to diff element by element: show the middle as replaced.
        ops.extend(b.iter().map(|v| (Kind::Delete, v)));
        ops.extend(a.iter().map(|v| (Kind::Create, v)));
    } else {
        // lcs[i][j]: length of the LCS of b[i..] and a[j..].
        let mut lcs = vec![vec![0usize; a.len() + 1]; b.len() + 1];
        for i in (0..b.len()).rev() {
            for j in (0..a.len()).rev() {
                lcs[i][j] = if b[i] == a[j] {
                    lcs[i + 1][j + 1] + 1
                } else {
                    lcs[i + 1][j].max(lcs[i][j + 1])
                };
            }
        }
        let (mut i, mut j) = (0, 0);
        while i < b.len() || j < a.len() {
            if i < b.len() && j < a.len() && b[i] == a[j] {
                ops.push((Kind::NoOp, &b[i]));
                i += 1;
                j += 1;
            } else if j < a.len() && (i == b.len() || lcs[i][j + 1] >= lcs[i + 1][j]) {
                ops.push((Kind::Create, &a[j]));
                j += 1;
            } else {
                ops.push((Kind::Delete, &b[i]));
                i += 1;
            }
        }
    }
    ops.extend(
        before[before.len() - suffix..]
            .iter()
            .map(|v| (Kind::NoOp, v)),
    );

    let mut out: Vec<Element> = Vec::new();
    for (kind, v) in ops {
        match (kind, out.last_mut()) {
            (Kind::NoOp, Some(last)) if last.kind == Kind::NoOp => last.hidden += 1,
            (Kind::NoOp, _) => out.push(Element {
                kind,
                key: None,
                text: String::new(),
                hidden: 1,
            }),
            _ => out.push(Element::shown(kind, None, compact(v))),
        }
    }
    out
}

const SENSITIVE: &str = "(sensitive)";
const UNKNOWN: &str = "(known after apply)";

fn changed(before: &Value, after: &Value) -> String {
    match (before, after) {
        (Value::Sensitive { .. }, Value::Sensitive { .. }) => SENSITIVE.to_owned(),
        _ => format!("{} -> {}", compact(before), compact(after)),
    }
}

/// A value on one line: `"a"`, `30080`, `["a", "b"]`, `{ k = "v" }`.
fn compact(v: &Value) -> String {
    match v {
        Value::Null => "null".to_owned(),
        Value::Bool(b) => b.to_string(),
        Value::Int(i) => i.to_string(),
        Value::Float(f) => format!("{f:?}"),
        Value::Str(s) => quote(s),
        Value::List(items) if items.is_empty() => "[]".to_owned(),
        Value::List(items) => format!(
            "[{}]",
            items.iter().map(compact).collect::<Vec<_>>().join(", ")
        ),
        Value::Map(m) if m.is_empty() => "{}".to_owned(),
        Value::Map(m) => format!(
            "{{ {} }}",
            m.iter()
                .map(|(k, v)| format!("{} = {}", map_key(k), compact(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Value::Sensitive { .. } => SENSITIVE.to_owned(),
        Value::Ref { .. } | Value::Unknown => UNKNOWN.to_owned(),
    }
}

/// A double-quoted string with `"`, `\` and control characters escaped.
fn quote(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

/// Map keys bare when they look like identifiers, quoted otherwise.
fn map_key(k: &str) -> String {
    let mut chars = k.chars();
    let bare = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if bare { k.to_owned() } else { quote(k) }
}

fn pad(s: &str, width: usize) -> String {
    format!("{s:<width$}")
}

fn count(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun} hidden")
    } else {
        format!("{n} {noun}s hidden")
    }
}

// ---------------------------------------------------------------------------
// JSON rendering

fn json_change(change: &Change) -> serde_json::Value {
    let (action, forced_by): (&str, &[String]) = match &change.action {
        Action::NoOp => ("no-op", &[]),
        Action::Create => ("create", &[]),
        Action::Update => ("update", &[]),
        Action::Replace { forced_by } => ("replace", forced_by),
        Action::Delete => ("delete", &[]),
    };
    json!({
        "address": change.address.as_str(),
        "type": change.kind,
        "provider": change.provider,
        "action": action,
        "forced_by": forced_by,
        "reason": change.reason,
        "fields": change.fields.iter().map(json_field).collect::<Vec<_>>(),
    })
}

fn json_field(field: &FieldChange) -> serde_json::Value {
    let before = field.before.as_ref().map(JsonValue::of).unwrap_or_default();
    let after = field.after.as_ref().map(JsonValue::of).unwrap_or_default();
    json!({
        "path": field.path,
        "before": before.value,
        "after": after.value,
        "before_sensitive": before.sensitive,
        "after_sensitive": after.sensitive,
        "after_unknown": after.unknown,
        "forces_replacement": field.forces_replacement,
    })
}

/// A value as natural JSON, secrets and unknowns replaced by `null` and flagged.
#[derive(Default)]
struct JsonValue {
    value: serde_json::Value,
    sensitive: bool,
    unknown: bool,
}

impl JsonValue {
    fn of(v: &Value) -> JsonValue {
        let mut out = JsonValue::default();
        out.value = out.convert(v);
        out
    }

    fn convert(&mut self, v: &Value) -> serde_json::Value {
        use serde_json::Value as J;
        match v {
            Value::Null => J::Null,
            Value::Bool(b) => J::Bool(*b),
            Value::Int(i) => J::from(*i),
            Value::Float(f) => serde_json::Number::from_f64(*f).map_or(J::Null, J::Number),
            Value::Str(s) => J::String(s.clone()),
            Value::List(items) => J::Array(items.iter().map(|i| self.convert(i)).collect()),
            Value::Map(m) => J::Object(
                m.iter()
                    .map(|(k, i)| (k.clone(), self.convert(i)))
                    .collect(),
            ),
            Value::Sensitive { .. } => {
                self.sensitive = true;
                J::Null
            }
            Value::Ref { .. } | Value::Unknown => {
                self.unknown = true;
                J::Null
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn style(is_tty: bool, vars: &[(&str, &str)]) -> bool {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Style::from_vars(is_tty, |name| {
            vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.into())
        })
        .color
    }

    #[test]
    fn objects_left_to_their_cluster_are_named_in_both_renderings() {
        use crate::resource::{Address, Live, ProviderId};
        let live = Live {
            address: Address::new("cluster.platform"),
            kind: "aws_eks_cluster".into(),
            provider: ProviderId::Aws,
            id: "c".into(),
            attrs: Default::default(),
            outputs: Default::default(),
        };
        let options = crate::plan::Options {
            destroy: true,
            ..Default::default()
        };
        let mut plan = crate::plan::diff("s", "dev", &[], &[live], &options);
        plan.abandoned = Some(Abandoned {
            cluster: Address::new("cluster.platform"),
            cluster_exists: true,
            reason: "the cluster cannot be reached: timed out".into(),
            objects: vec![Address::new("service.a.deployment")],
        });
        let human = human(&plan, Style::PLAIN);
        assert!(
            human.contains("Note: 1 Kubernetes object of the stack is not deleted one by one: they go with cluster.platform, which this plan deletes (the cluster cannot be reached: timed out)\n  service.a.deployment\n"),
            "{human}"
        );
        let j = json(&plan);
        assert_eq!(j["abandoned"]["objects"], json!(["service.a.deployment"]));
        assert_eq!(j["abandoned"]["cluster_exists"], true);
        plan.abandoned = None;
        assert!(json(&plan).get("abandoned").is_none());
    }

    #[test]
    fn colour_follows_the_terminal_unless_told_otherwise() {
        assert!(style(true, &[]));
        assert!(!style(false, &[]));
        assert!(!style(true, &[("NO_COLOR", "1")]));
        assert!(
            style(true, &[("NO_COLOR", "")]),
            "an empty NO_COLOR is ignored"
        );
        assert!(style(false, &[("CLICOLOR_FORCE", "1")]));
        assert!(!style(false, &[("CLICOLOR_FORCE", "0")]));
        assert!(
            !style(true, &[("NO_COLOR", "1"), ("CLICOLOR_FORCE", "1")]),
            "NO_COLOR wins"
        );
        assert!(!style(true, &[("CLICOLOR", "0")]));
        assert!(!style(true, &[("TERM", "dumb")]));
    }

    #[test]
    fn values_render_compactly() {
        let mut m = std::collections::BTreeMap::new();
        m.insert("k".to_owned(), Value::str("v"));
        m.insert("needs quotes".to_owned(), Value::Int(1));
        assert_eq!(
            compact(&Value::Map(m)),
            r#"{ k = "v", "needs quotes" = 1 }"#
        );
        assert_eq!(compact(&Value::list_of_str(["a", "b"])), r#"["a", "b"]"#);
        assert_eq!(compact(&Value::str("say \"hi\"\n")), r#""say \"hi\"\n""#);
        assert_eq!(compact(&Value::Float(1.0)), "1.0");
        assert_eq!(
            compact(&Value::Sensitive {
                digest: "abc".into()
            }),
            "(sensitive)"
        );
        assert_eq!(compact(&Value::Unknown), "(known after apply)");
    }

    #[test]
    fn list_diff_hides_unchanged_runs() {
        let b: Vec<Value> = ["a", "b", "c", "d"].into_iter().map(Value::str).collect();
        let a: Vec<Value> = ["a", "c", "d", "e"].into_iter().map(Value::str).collect();
        let shown: Vec<(&str, String)> = list_diff(&b, &a)
            .iter()
            .map(|e| {
                (
                    e.kind.text(),
                    if e.kind == Kind::NoOp {
                        e.hidden.to_string()
                    } else {
                        e.text.clone()
                    },
                )
            })
            .collect();
        assert_eq!(
            shown,
            [
                (" ", "1".to_owned()),
                ("-", "\"b\"".to_owned()),
                (" ", "2".to_owned()),
                ("+", "\"e\"".to_owned())
            ]
        );
    }

    #[test]
    fn summaries() {
        let s = Summary {
            add: 2,
            change: 1,
            destroy: 0,
        };
        assert_eq!(
            summary_line(&s),
            "Plan: 2 to add, 1 to change, 0 to destroy."
        );
    }
}
