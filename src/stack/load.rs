//! Reading a stack folder: `stack.toml`, the environment's overlay file
//! (`<env>.toml`), and the modules it instantiates, merged into one spanned
//! table before it is decoded.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use super::decode::{Errors, Fields, named_tables_of};
use super::diag::{Code, Diagnostic, did_you_mean};
use super::source::{Entry, FileId, Node, NodeKind, Sources, Span, Table, expressions, parse};

/// Top-level resource tables.
pub const RESOURCE_TABLES: &[&str] = &[
    "network",
    "cluster",
    "registry",
    "connection",
    "service",
    "expose",
];
/// Every allowed top-level key.
pub const TOP_LEVEL: &[&str] = &[
    "stack",
    "environment",
    "module",
    "network",
    "cluster",
    "registry",
    "connection",
    "service",
    "expose",
];

/// A stack folder merged for one environment, before decoding.
pub struct Loaded {
    pub root: PathBuf,
    pub main: FileId,
    pub table: Table,
    /// Which file declared each top-level resource (`service.x` → file dir),
    /// so relative paths resolve against the file that wrote them.
    pub base_dirs: BTreeMap<String, PathBuf>,
    /// The modules' outputs: `module.M.O` → value.
    pub outputs: BTreeMap<String, String>,
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
            let mut message = first_line(&e.message).to_owned();
            let (label, help) = if message == "duplicate key" {
                let key = sources
                    .text(id)
                    .get(e.span.start..e.span.end)
                    .unwrap_or_default()
                    .trim();
                if !key.is_empty() {
                    message = format!("duplicate key `{key}`");
                }
                (
                    "written a second time",
                    "a key or table can be written only once per file: merge the two or remove one",
                )
            } else if message.contains("string") {
                (
                    "the string is not closed",
                    "close the string on the same line (use \"\"\"...\"\"\" for text over several lines)",
                )
            } else if message.contains("expected `=`") {
                ("expected `=`", "write each setting as `key = value`")
            } else if message.contains("expected `]`") {
                (
                    "expected `]`",
                    "close the table header with `]`, e.g. [service.NAME]",
                )
            } else {
                (
                    "here",
                    "fix the TOML syntax (quotes, brackets, `key = value`)",
                )
            };
            errors.push(
                Diagnostic::new(Code::Syntax, e.span, format!("invalid TOML: {message}"))
                    .label(label)
                    .help(help),
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
pub fn load(
    root: &Path,
    env: Option<&str>,
    sources: &mut Sources,
    errors: &mut Errors,
) -> Option<Loaded> {
    let stack_file = if root.is_file() {
        root.to_path_buf()
    } else {
        root.join("stack.toml")
    };
    let root = stack_file
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
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
            let Some(stem) = f.file_stem().and_then(|s| s.to_str()) else {
                continue;
            };
            if f.extension().is_some_and(|x| x == "toml")
                && stem != "stack"
                && !declared.iter().any(|d| d == stem)
            {
                let id = sources.add(f.clone(), std::fs::read_to_string(&f).unwrap_or_default());
                let mut d = Diagnostic::new(
                    Code::UnknownEnvironment,
                    Span {
                        file: id,
                        start: 0,
                        end: 0,
                    },
                    format!("`{stem}.toml` overrides environment `{stem}`, which is not declared"),
                )
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

    let modules = expand_modules(&mut table, &root, sources, errors, &mut base_dirs);

    // The overlay applies to the expanded stack, so it can override module resources.
    if let Some(env) = env {
        if !declared.iter().any(|d| d == env) {
            let span = table
                .get("environment")
                .map(|e| e.key_span)
                .unwrap_or(Span {
                    file: main,
                    start: 0,
                    end: 0,
                });
            let mut d = Diagnostic::new(
                Code::UnknownEnvironment,
                span,
                format!("unknown environment `{env}`"),
            )
            .label(if declared.is_empty() {
                "no environments are declared".to_owned()
            } else {
                format!("declared here: {}", declared.join(", "))
            });
            d = match did_you_mean(env, declared.iter().map(String::as_str)) {
                Some(s) => d.help(format!("did you mean `--env {s}`?")),
                None if declared.is_empty() => d.help(format!("declare it in stack.toml: [environment.{env}] with target = \"local\", \"aws\" or \"kubernetes\"")),
                None => d.help(format!("pass one of: {}; or add [environment.{env}] to stack.toml", declared.join(", "))),
            };
            errors.push(d);
        } else {
            let overlay_path = root.join(format!("{env}.toml"));
            if overlay_path.exists()
                && let Some((_, overlay)) = read(sources, &overlay_path, errors)
            {
                merge(&mut table, overlay);
            }
        }
    }

    // `${module.M.O}` after the overlay, so overlays may use module outputs too.
    resolve_outputs(&mut table, &modules, errors);

    Some(Loaded {
        root,
        main,
        table,
        base_dirs,
        outputs: modules.outputs,
    })
}

fn record_base_dirs(table: &Table, dir: &Path, out: &mut BTreeMap<String, PathBuf>) {
    for kind in RESOURCE_TABLES {
        if let Some(Entry {
            value: Node {
                kind: NodeKind::Table(t),
                ..
            },
            ..
        }) = table.get(kind)
        {
            for e in &t.entries {
                out.entry(format!("{kind}.{}", e.key))
                    .or_insert_with(|| dir.to_path_buf());
            }
        }
    }
}

/// Deep-merges `overlay` into `base`: tables merge, other values replace.
/// A dataset (`service.S.dataset.D`) whose overlay names a source (`file` or
/// `connection`) switches to it: the base's other source keys are dropped, so
/// an environment can read from the warehouse what another reads from a file.
/// A prediction endpoint has one `model` or `generation`s: an overlay that
/// names one drops the base's other (and an array of generations replaces
/// the base's whole, as every array does).
/// An exposure's `tls` is one choice of certificate source: an overlay's
/// replaces the base's whole (`{ self_signed = true }` locally over a
/// cluster's `{ issuer = ... }`).
pub fn merge(base: &mut Table, overlay: Table) {
    merge_at(base, overlay, &mut Vec::new());
}

/// Keys that belong to one dataset source and not to the other (a file is
/// always bundled, so the modes go with the connection).
const FILE_SOURCE_KEYS: &[&str] = &["file"];
const SQL_SOURCE_KEYS: &[&str] = &[
    "connection",
    "query",
    "mode",
    "refresh",
    "max_staleness",
    "cache",
];

fn merge_at(base: &mut Table, overlay: Table, path: &mut Vec<String>) {
    let is_dataset = path.len() == 4 && path[0] == "service" && path[2] == "dataset";
    if is_dataset {
        let names = |keys: &[&str]| {
            overlay
                .entries
                .iter()
                .any(|e| keys.contains(&e.key.as_str()))
        };
        let drop: &[&str] = if names(&["connection"]) && !names(FILE_SOURCE_KEYS) {
            FILE_SOURCE_KEYS
        } else if names(FILE_SOURCE_KEYS) && !names(&["connection"]) {
            SQL_SOURCE_KEYS
        } else {
            &[]
        };
        let overlaid: Vec<&str> = overlay.entries.iter().map(|e| e.key.as_str()).collect();
        base.entries
            .retain(|e| !drop.contains(&e.key.as_str()) || overlaid.contains(&e.key.as_str()));
    }
    let is_endpoint = path.len() == 4 && path[0] == "service" && path[2] == "endpoint";
    if is_endpoint {
        // One model or generations: an overlay naming one drops the other.
        let names = |key: &str| overlay.entries.iter().any(|e| e.key == key);
        let drop: &[&str] = match (names("model"), names("generation")) {
            (true, false) => &["generation", "dispatch"],
            (false, true) => &["model"],
            _ => &[],
        };
        base.entries.retain(|e| !drop.contains(&e.key.as_str()));
    }
    let is_expose = path.len() == 2 && path[0] == "expose";
    for e in overlay.entries {
        let whole = is_expose && e.key == "tls";
        match base.get_mut(&e.key) {
            Some(existing) => match (&mut existing.value.kind, e.value.kind) {
                (NodeKind::Table(b), NodeKind::Table(o)) if !whole => {
                    path.push(e.key.clone());
                    merge_at(b, o, path);
                    path.pop();
                }
                (_, kind) => {
                    existing.value = Node {
                        kind,
                        span: e.value.span,
                    };
                }
            },
            None => base.entries.push(e),
        }
    }
}

const MODULE_KEYS: &[&str] = &[
    "input",
    "output",
    "network",
    "cluster",
    "registry",
    "connection",
    "service",
    "expose",
];

/// The modules of a stack, for resolving `${module.M.O}`.
#[derive(Default)]
struct Modules {
    /// `module.M.O` → the output's value.
    outputs: BTreeMap<String, String>,
    /// Every instantiated module, and those that could not be read (their
    /// outputs are unknown; the reason is already reported).
    names: BTreeSet<String>,
    failed: BTreeSet<String>,
    /// Module files: their unresolved expressions are reported when expanded.
    files: BTreeSet<FileId>,
}

fn expand_modules(
    table: &mut Table,
    root: &Path,
    sources: &mut Sources,
    errors: &mut Errors,
    base_dirs: &mut BTreeMap<String, PathBuf>,
) -> Modules {
    let mut modules = Modules::default();
    let Some(pos) = table.entries.iter().position(|e| e.key == "module") else {
        return modules;
    };
    let module_table = table.entries.remove(pos);
    let NodeKind::Table(instances) = &module_table.value.kind else {
        errors.push(super::decode::wrong_type(
            &module_table,
            "a table",
            &module_table.value.kind,
        ));
        return modules;
    };
    for (name, name_span, inst, inst_span) in named_tables_of(errors, instances, "module") {
        modules.names.insert(name.to_owned());
        modules.failed.insert(name.to_owned());
        let fields = Fields::new(inst, inst_span, format!("module.{name}"));
        let Some((source, source_span)) =
            fields.str_req(errors, "source", "\"../../modules/NAME\"")
        else {
            continue;
        };
        let dir = root.join(&source);
        let file = dir.join("module.toml");
        if !file.exists() {
            errors.push(
                Diagnostic::new(
                    Code::DanglingReference,
                    source_span,
                    format!(
                        "module source `{source}` not found (looked for {})",
                        file.display()
                    ),
                )
                .label("no module.toml here")
                .help(
                    "point `source` at a folder holding module.toml, relative to this stack file",
                ),
            );
            continue;
        }
        let Some((body_file, body)) = read(sources, &file, errors) else {
            continue;
        };
        modules.failed.remove(name);
        modules.files.insert(body_file);
        let body_fields = Fields::new(
            &body,
            Span {
                file: name_span.file,
                start: 0,
                end: 0,
            },
            format!("module {source}"),
        );
        body_fields.allow(errors, MODULE_KEYS);

        // Inputs: declared in the module, given in the instance.
        let mut values: BTreeMap<String, Node> = BTreeMap::new();
        let declared = body_fields.named_tables(errors, "input");
        let declared_names: Vec<String> = declared.iter().map(|d| d.0.to_owned()).collect();
        for e in &inst.entries {
            if e.key == "source" {
                continue;
            }
            if !declared_names.contains(&e.key) {
                let mut d = Diagnostic::new(
                    Code::UnknownKey,
                    e.key_span,
                    format!("module `{name}` has no input `{}`", e.key),
                )
                .label("unknown input");
                d = match did_you_mean(&e.key, declared_names.iter().map(String::as_str)) {
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
                    Diagnostic::new(
                        Code::MissingField,
                        name_span,
                        format!("module `{name}` needs input `{input}`"),
                    )
                    .label("instantiated here")
                    .related(*decl_span, "input declared here")
                    .help(format!("add `{input} = ...` under [module.{name}]")),
                ),
            }
        }

        // Substitute inputs and `this`, then move resources into the stack.
        // An input keeps the span of the value given for it, so errors in
        // that value point at the stack that wrote it.
        let mut body = body;
        let mut unresolved = Vec::new();
        for e in &mut body.entries {
            substitute(&mut e.value, &|expr| {
                if expr == "this" {
                    Some((NodeKind::Str(name.to_owned()), None))
                } else {
                    expr.strip_prefix("input.")
                        .and_then(|i| values.get(i))
                        .map(|n| (n.kind.clone(), Some(n.span)))
                }
            });
            collect_unresolved(&e.value, &mut unresolved);
        }
        for (expr, span) in unresolved {
            if span.file != body_file {
                continue; // written in the stack (an input's value): reported with the stack
            }
            match expr.strip_prefix("input.") {
                // A declared input without a value is reported at the instance.
                Some(i) if declared_names.iter().any(|d| d == i) => {}
                Some(i) => {
                    let mut d = Diagnostic::new(
                        Code::DanglingReference,
                        span,
                        format!("module `{source}` declares no input `{i}`"),
                    )
                    .label("undeclared input");
                    d = match did_you_mean(i, declared_names.iter().map(String::as_str)) {
                        Some(s) => d.help(format!("did you mean `${{input.{s}}}`?")),
                        None => d.help(format!("declare it in this module.toml: [input.{i}]")),
                    };
                    errors.push(d);
                }
                None if expr.starts_with("module.") => {}
                None => errors.push(unknown_expression(&expr, span, true)),
            }
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
                            if let Some(Node {
                                kind: NodeKind::Str(s),
                                ..
                            }) = v
                            {
                                modules
                                    .outputs
                                    .insert(format!("module.{name}.{}", o.key), s);
                            }
                        }
                    }
                }
                kind => {
                    let NodeKind::Table(resources) = e.value.kind else {
                        continue;
                    };
                    let target = match table.get_mut(kind) {
                        Some(t) => t,
                        None => {
                            table.entries.push(Entry {
                                key: kind.to_owned(),
                                key_span: e.key_span,
                                value: Node {
                                    kind: NodeKind::Table(Table::default()),
                                    span: e.value.span,
                                },
                            });
                            table.entries.last_mut().expect("just pushed")
                        }
                    };
                    let NodeKind::Table(target) = &mut target.value.kind else {
                        continue;
                    };
                    for mut r in resources.entries {
                        if r.key == "this" {
                            r.key = name.to_owned();
                        }
                        // The stack may add test queries to a module's service:
                        // `[[service.M.endpoint.E.test]]` and nothing else.
                        if kind == "service"
                            && let Some(at) = target
                                .entries
                                .iter()
                                .position(|e| e.key == r.key && only_tests(&e.value))
                        {
                            let tests = target.entries.remove(at);
                            if let (NodeKind::Table(into), NodeKind::Table(tests)) =
                                (&mut r.value.kind, tests.value.kind)
                            {
                                merge(into, tests);
                            }
                            base_dirs.insert(format!("{kind}.{}", r.key), root.to_path_buf());
                            target.entries.push(r);
                            continue;
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
    modules
}

/// A service table that holds only `endpoint.E.test` arrays (test queries
/// a stack adds to a module's service).
fn only_tests(n: &Node) -> bool {
    let NodeKind::Table(t) = &n.kind else {
        return false;
    };
    !t.entries.is_empty()
        && t.entries.iter().all(|e| {
            e.key == "endpoint"
                && matches!(&e.value.kind, NodeKind::Table(eps) if eps.entries.iter().all(|ep| {
                    matches!(&ep.value.kind, NodeKind::Table(et) if !et.entries.is_empty() && et.entries.iter().all(|x| x.key == "test"))
                }))
        })
}

/// Replaces `${module.M.O}` everywhere and reports every expression left
/// unresolved, at the string that holds it. Values still holding `${...}`
/// after this are treated as absent by decoding (the error is reported here).
fn resolve_outputs(table: &mut Table, modules: &Modules, errors: &mut Errors) {
    let mut unresolved = Vec::new();
    for e in &mut table.entries {
        substitute(&mut e.value, &|expr| {
            modules
                .outputs
                .get(expr)
                .map(|v| (NodeKind::Str(v.clone()), None))
        });
        collect_unresolved(&e.value, &mut unresolved);
    }
    for (expr, span) in unresolved {
        let Some(path) = expr.strip_prefix("module.") else {
            // Inside module files these were reported when the module was expanded.
            if !modules.files.contains(&span.file) {
                errors.push(unknown_expression(&expr, span, false));
            }
            continue;
        };
        let Some((module, output)) = path.split_once('.') else {
            errors.push(
                Diagnostic::new(
                    Code::DanglingReference,
                    span,
                    format!("`${{{expr}}}` names a module but not its output"),
                )
                .label("expected ${module.MODULE.OUTPUT}")
                .help(format!(
                    "name one of its outputs, e.g. `${{module.{path}.cluster}}`"
                )),
            );
            continue;
        };
        if modules.failed.contains(module) {
            continue;
        }
        let d = if modules.names.contains(module) {
            let prefix = format!("module.{module}.");
            let known: Vec<&str> = modules
                .outputs
                .keys()
                .filter_map(|k| k.strip_prefix(&prefix))
                .collect();
            let d = Diagnostic::new(
                Code::DanglingReference,
                span,
                format!("module `{module}` has no output `{output}`"),
            )
            .label("unknown output");
            match did_you_mean(output, known.iter().copied()) {
                Some(s) => d.help(format!("did you mean `${{module.{module}.{s}}}`?")),
                None if known.is_empty() => d.help(format!("module `{module}` declares no outputs; add [output.{output}] with value = \"...\" to its module.toml")),
                None => d.help(format!("outputs of module `{module}`: {}", known.join(", "))),
            }
        } else {
            let d = Diagnostic::new(
                Code::DanglingReference,
                span,
                format!("`${{{expr}}}` refers to undefined module `{module}`"),
            )
            .label(format!("no module named `{module}`"));
            match did_you_mean(module, modules.names.iter().map(String::as_str)) {
                Some(s) => d.help(format!("did you mean `${{module.{s}.{output}}}`?")),
                None => d.help(format!(
                    "instantiate it first: [module.{module}] with source = \"../../modules/NAME\""
                )),
            }
        };
        errors.push(d);
    }
}

fn unknown_expression(expr: &str, span: Span, in_module: bool) -> Diagnostic {
    Diagnostic::new(Code::DanglingReference, span, format!("unknown expression `${{{expr}}}`")).label("not a known reference").help(if in_module {
        "a module file can use ${input.NAME}, ${this} and ${module.NAME.OUTPUT}"
    } else {
        "a stack file can use ${module.NAME.OUTPUT}; ${input.NAME} and ${this} work only inside module files"
    })
}

/// Every `${expr}` left in `n` (values and table keys), with the span of the
/// string that holds it.
fn collect_unresolved(n: &Node, out: &mut Vec<(String, Span)>) {
    match &n.kind {
        NodeKind::Str(s) => out.extend(expressions(s).into_iter().map(|e| (e.to_owned(), n.span))),
        NodeKind::Array(items) => items.iter().for_each(|i| collect_unresolved(i, out)),
        NodeKind::Table(t) => t.entries.iter().for_each(|e| {
            out.extend(
                expressions(&e.key)
                    .into_iter()
                    .map(|x| (x.to_owned(), e.key_span)),
            );
            collect_unresolved(&e.value, out);
        }),
        _ => {}
    }
}

/// What an expression stands for: its value and, if known, where that was written.
type Lookup<'a> = dyn Fn(&str) -> Option<(NodeKind, Option<Span>)> + 'a;

/// Replaces `${expr}` in strings: a string that is exactly one expression
/// takes the value's type; otherwise the value is spliced as text.
/// `lookup` gives the value and, when it has one, the span it was written at.
fn substitute(n: &mut Node, lookup: &Lookup<'_>) {
    match &mut n.kind {
        NodeKind::Str(s) => {
            if let Some(expr) = s.strip_prefix("${").and_then(|r| r.strip_suffix('}'))
                && !expr.contains("${")
            {
                if let Some((v, span)) = lookup(expr) {
                    n.kind = v;
                    n.span = span.unwrap_or(n.span);
                }
                return;
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
                match lookup(&after[..j]).map(|v| v.0) {
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
                    let mut key = Node {
                        kind: NodeKind::Str(e.key.clone()),
                        span: e.key_span,
                    };
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
