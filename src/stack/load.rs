//! Reading a stack folder: `stack.toml`, the environment's overlay file
//! (`<env>.toml`), and the modules it instantiates, merged into one spanned
//! table before it is decoded.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::decode::{named_tables_of, Errors, Fields};
use super::diag::{did_you_mean, Code, Diagnostic};
use super::source::{parse, Entry, FileId, Node, NodeKind, Sources, Span, Table};

/// Top-level resource tables.
pub const RESOURCE_TABLES: &[&str] = &["network", "cluster", "registry", "connection", "service", "expose"];
/// Every allowed top-level key.
pub const TOP_LEVEL: &[&str] = &["stack", "environment", "module", "network", "cluster", "registry", "connection", "service", "expose"];

/// A stack folder merged for one environment, before decoding.
pub struct Loaded {
    pub root: PathBuf,
    pub main: FileId,
    pub table: Table,
    /// Which file declared each top-level resource (`service.x` → file dir),
    /// so relative paths resolve against the file that wrote them.
    pub base_dirs: BTreeMap<String, PathBuf>,
}

fn read(sources: &mut Sources, path: &Path, errors: &mut Errors) -> Option<(FileId, Table)> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            errors.push(
                Diagnostic::global(Code::Io, format!("cannot read {}: {e}", path.display()))
                    .help("check the path; a stack is a folder holding stack.toml"),
            );
            return None;
        }
    };
    let id = sources.add(path.to_path_buf(), text);
    match parse(id, sources.text(id)) {
        Ok(t) => Some((id, t)),
        Err(e) => {
            errors.push(
                Diagnostic::new(Code::Syntax, e.span, format!("invalid TOML: {}", first_line(&e.message)))
                    .label("here")
                    .help("fix the TOML syntax (quotes, brackets, `key = value`)"),
            );
            None
        }
    }
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s).trim()
}

/// Loads `root/stack.toml`, overlays `root/<env>.toml` when `env` is given,
/// and expands modules.
pub fn load(root: &Path, env: Option<&str>, sources: &mut Sources, errors: &mut Errors) -> Option<Loaded> {
    let stack_file = if root.is_file() { root.to_path_buf() } else { root.join("stack.toml") };
    let root = stack_file.parent().map(Path::to_path_buf).unwrap_or_default();
    let (main, mut table) = read(sources, &stack_file, errors)?;

    // Declared environments, and overlay files that match none of them.
    let declared: Vec<String> = table
        .get("environment")
        .and_then(|e| match &e.value.kind {
            NodeKind::Table(t) => Some(t.entries.iter().map(|e| e.key.clone()).collect()),
            _ => None,
        })
        .unwrap_or_default();
    if let Ok(dir) = std::fs::read_dir(&root) {
        let mut files: Vec<PathBuf> = dir.filter_map(|d| d.ok().map(|d| d.path())).collect();
        files.sort();
        for f in files {
            let Some(stem) = f.file_stem().and_then(|s| s.to_str()) else { continue };
            if f.extension().is_some_and(|x| x == "toml") && stem != "stack" && !declared.iter().any(|d| d == stem) {
                let id = sources.add(f.clone(), std::fs::read_to_string(&f).unwrap_or_default());
                let mut d = Diagnostic::new(Code::UnknownEnvironment, Span { file: id, start: 0, end: 0 }, format!("`{stem}.toml` overrides environment `{stem}`, which is not declared"))
                    .label("overlay for an undeclared environment");
                d = match did_you_mean(stem, declared.iter().map(String::as_str)) {
                    Some(s) => d.help(format!("rename the file to `{s}.toml`, or declare [environment.{stem}] in stack.toml")),
                    None => d.help(format!("declare [environment.{stem}] in stack.toml, or remove the file")),
                };
                errors.push(d);
            }
        }
    }

    let mut base_dirs = BTreeMap::new();
    record_base_dirs(&table, &root, &mut base_dirs);

    expand_modules(&mut table, &root, sources, errors, &mut base_dirs);

    // The overlay applies to the expanded stack, so it can override module resources.
    if let Some(env) = env {
        if !declared.iter().any(|d| d == env) {
            let span = table.get("environment").map(|e| e.key_span).unwrap_or(Span { file: main, start: 0, end: 0 });
            let mut d = Diagnostic::new(Code::UnknownEnvironment, span, format!("unknown environment `{env}`"))
                .label(if declared.is_empty() { "no environments are declared".to_owned() } else { format!("declared here: {}", declared.join(", ")) });
            d = match did_you_mean(env, declared.iter().map(String::as_str)) {
                Some(s) => d.help(format!("did you mean `--env {s}`?")),
                None => d.help(format!("pass one of: {}; or add [environment.{env}] to stack.toml", declared.join(", "))),
            };
            errors.push(d);
        } else {
            let overlay_path = root.join(format!("{env}.toml"));
            if overlay_path.exists() {
                if let Some((_, overlay)) = read(sources, &overlay_path, errors) {
                    merge(&mut table, overlay);
                }
            }
        }
    }

    Some(Loaded { root, main, table, base_dirs })
}

fn record_base_dirs(table: &Table, dir: &Path, out: &mut BTreeMap<String, PathBuf>) {
    for kind in RESOURCE_TABLES {
        if let Some(Entry { value: Node { kind: NodeKind::Table(t), .. }, .. }) = table.get(kind) {
            for e in &t.entries {
                out.entry(format!("{kind}.{}", e.key)).or_insert_with(|| dir.to_path_buf());
            }
        }
    }
}

/// Deep-merges `overlay` into `base`: tables merge, other values replace;
/// a dataset's `source` is replaced whole.
pub fn merge(base: &mut Table, overlay: Table) {
    for e in overlay.entries {
        match base.get_mut(&e.key) {
            Some(existing) => match (&mut existing.value.kind, e.value.kind) {
                (NodeKind::Table(b), NodeKind::Table(o)) if e.key != "source" => merge(b, o),
                (_, kind) => {
                    existing.value = Node { kind, span: e.value.span };
                }
            },
            None => base.entries.push(e),
        }
    }
}

const MODULE_KEYS: &[&str] = &["input", "output", "network", "cluster", "registry", "connection", "service", "expose"];

fn expand_modules(table: &mut Table, root: &Path, sources: &mut Sources, errors: &mut Errors, base_dirs: &mut BTreeMap<String, PathBuf>) {
    let Some(pos) = table.entries.iter().position(|e| e.key == "module") else { return };
    let modules = table.entries[pos].clone();
    let NodeKind::Table(instances) = &modules.value.kind else {
        errors.push(super::decode::wrong_type(&modules, "a table", &modules.value.kind));
        return;
    };
    let mut outputs: BTreeMap<String, (String, Span)> = BTreeMap::new();
    for (name, name_span, inst, inst_span) in named_tables_of(errors, instances, "module") {
        let fields = Fields::new(inst, inst_span, format!("module.{name}"));
        let Some((source, source_span)) = fields.str_req(errors, "source", "\"../../modules/NAME\"") else { continue };
        let dir = root.join(&source);
        let file = dir.join("module.toml");
        if !file.exists() {
            errors.push(
                Diagnostic::new(Code::DanglingReference, source_span, format!("module source `{source}` not found (looked for {})", file.display()))
                    .label("no module.toml here")
                    .help("point `source` at a folder holding module.toml, relative to this stack file"),
            );
            continue;
        }
        let Some((_, body)) = read(sources, &file, errors) else { continue };
        let body_fields = Fields::new(&body, Span { file: name_span.file, start: 0, end: 0 }, format!("module {source}"));
        body_fields.allow(errors, MODULE_KEYS);

        // Inputs: declared in the module, given in the instance.
        let mut values: BTreeMap<String, Node> = BTreeMap::new();
        let declared = body_fields.named_tables(errors, "input");
        let declared_names: Vec<&str> = declared.iter().map(|d| d.0).collect();
        for e in &inst.entries {
            if e.key == "source" {
                continue;
            }
            if !declared_names.contains(&e.key.as_str()) {
                let mut d = Diagnostic::new(Code::UnknownKey, e.key_span, format!("module `{name}` has no input `{}`", e.key)).label("unknown input");
                d = match did_you_mean(&e.key, declared_names.iter().copied()) {
                    Some(s) => d.help(format!("did you mean `{s}`?")),
                    None => d.help(format!("inputs of {source}: {}", declared_names.join(", "))),
                };
                errors.push(d);
            } else {
                values.insert(e.key.clone(), e.value.clone());
            }
        }
        for (input, _, decl, decl_span) in &declared {
            if values.contains_key(*input) {
                continue;
            }
            match decl.get("default") {
                Some(d) => {
                    values.insert((*input).to_owned(), d.value.clone());
                }
                None => errors.push(
                    Diagnostic::new(Code::MissingField, name_span, format!("module `{name}` needs input `{input}`"))
                        .label("instantiated here")
                        .related(*decl_span, "input declared here")
                        .help(format!("add `{input} = ...` under [module.{name}]")),
                ),
            }
        }

        // Substitute inputs and `this`, then move resources into the stack.
        let mut body = body;
        for e in &mut body.entries {
            substitute(&mut e.value, &|expr| {
                if expr == "this" {
                    Some(NodeKind::Str(name.to_owned()))
                } else {
                    expr.strip_prefix("input.").and_then(|i| values.get(i)).map(|n| n.kind.clone())
                }
            });
        }
        for e in body.entries {
            match e.key.as_str() {
                "input" => {}
                "output" => {
                    if let NodeKind::Table(outs) = &e.value.kind {
                        for o in &outs.entries {
                            let v = match &o.value.kind {
                                NodeKind::Table(t) => t.get("value").map(|v| v.value.clone()),
                                _ => Some(o.value.clone()),
                            };
                            if let Some(Node { kind: NodeKind::Str(s), span }) = v {
                                outputs.insert(format!("module.{name}.{}", o.key), (s, span));
                            }
                        }
                    }
                }
                kind => {
                    let NodeKind::Table(resources) = e.value.kind else { continue };
                    let target = match table.get_mut(kind) {
                        Some(t) => t,
                        None => {
                            table.entries.push(Entry {
                                key: kind.to_owned(),
                                key_span: e.key_span,
                                value: Node { kind: NodeKind::Table(Table::default()), span: e.value.span },
                            });
                            table.entries.last_mut().expect("just pushed")
                        }
                    };
                    let NodeKind::Table(target) = &mut target.value.kind else { continue };
                    for mut r in resources.entries {
                        if r.key == "this" {
                            r.key = name.to_owned();
                        }
                        if let Some(existing) = target.get(&r.key) {
                            errors.push(
                                Diagnostic::new(Code::Duplicate, name_span, format!("module `{name}` defines {kind}.{} which is already defined", r.key))
                                    .label("module instantiated here")
                                    .related(existing.key_span, "first defined here")
                                    .help("rename one of them (module resources named `this` take the module's name)"),
                            );
                            continue;
                        }
                        // Paths given to a module come from the stack that instantiates it.
                        base_dirs.insert(format!("{kind}.{}", r.key), root.to_path_buf());
                        target.entries.push(r);
                    }
                }
            }
        }
    }
    // Remove the module table and resolve `${module.M.O}` in the stack.
    table.entries.retain(|e| e.key != "module");
    let mut dangling: Vec<(String, Span)> = Vec::new();
    for e in &mut table.entries {
        substitute_report(&mut e.value, &outputs, &mut dangling);
    }
    for (expr, span) in dangling {
        let known: Vec<&str> = outputs.keys().map(String::as_str).collect();
        let mut d = Diagnostic::new(Code::DanglingReference, span, format!("`${{{expr}}}` refers to nothing defined")).label("unresolved reference");
        d = match did_you_mean(&expr, known.iter().copied()) {
            Some(s) => d.help(format!("did you mean `${{{s}}}`?")),
            None if known.is_empty() => d.help("declare the module under [module.NAME] and its output under [output.NAME] in module.toml"),
            None => d.help(format!("known outputs: {}", known.join(", "))),
        };
        errors.push(d);
    }
}

fn substitute_report(n: &mut Node, outputs: &BTreeMap<String, (String, Span)>, dangling: &mut Vec<(String, Span)>) {
    let span = n.span;
    let mut missing = Vec::new();
    substitute(n, &|expr| {
        if expr.starts_with("module.") {
            outputs.get(expr).map(|(v, _)| NodeKind::Str(v.clone()))
        } else {
            None
        }
    });
    collect_unresolved(n, &mut missing);
    for m in missing {
        dangling.push((m, span));
    }
}

fn collect_unresolved(n: &Node, out: &mut Vec<String>) {
    match &n.kind {
        NodeKind::Str(s) => {
            let mut rest = s.as_str();
            while let Some(i) = rest.find("${") {
                let after = &rest[i + 2..];
                let Some(j) = after.find('}') else { break };
                out.push(after[..j].to_owned());
                rest = &after[j + 1..];
            }
        }
        NodeKind::Array(items) => items.iter().for_each(|i| collect_unresolved(i, out)),
        NodeKind::Table(t) => t.entries.iter().for_each(|e| collect_unresolved(&e.value, out)),
        _ => {}
    }
}

/// Replaces `${expr}` in strings: a string that is exactly one expression
/// takes the value's type; otherwise the value is spliced as text.
fn substitute(n: &mut Node, lookup: &dyn Fn(&str) -> Option<NodeKind>) {
    match &mut n.kind {
        NodeKind::Str(s) => {
            if let Some(expr) = s.strip_prefix("${").and_then(|r| r.strip_suffix('}')) {
                if !expr.contains("${") {
                    if let Some(v) = lookup(expr) {
                        n.kind = v;
                    }
                    return;
                }
            }
            let mut out = String::new();
            let mut rest = s.as_str();
            while let Some(i) = rest.find("${") {
                out.push_str(&rest[..i]);
                let after = &rest[i + 2..];
                let Some(j) = after.find('}') else {
                    out.push_str(&rest[i..]);
                    rest = "";
                    break;
                };
                match lookup(&after[..j]) {
                    Some(NodeKind::Str(v)) => out.push_str(&v),
                    Some(NodeKind::Int(v)) => out.push_str(&v.to_string()),
                    Some(NodeKind::Float(v)) => out.push_str(&v.to_string()),
                    Some(NodeKind::Bool(v)) => out.push_str(&v.to_string()),
                    _ => out.push_str(&rest[i..i + 2 + j + 1]),
                }
                rest = &after[j + 1..];
            }
            out.push_str(rest);
            *s = out;
        }
        NodeKind::Array(items) => items.iter_mut().for_each(|i| substitute(i, lookup)),
        NodeKind::Table(t) => {
            for e in &mut t.entries {
                if e.key.contains("${") {
                    let mut key = Node { kind: NodeKind::Str(e.key.clone()), span: e.key_span };
                    substitute(&mut key, lookup);
                    if let NodeKind::Str(k) = key.kind {
                        e.key = k;
                    }
                }
                substitute(&mut e.value, lookup);
            }
        }
        _ => {}
    }
}
