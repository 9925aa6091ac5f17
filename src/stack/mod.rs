//! The stack language: TOML files → a resolved, validated [`Stack`].
//!
//! Stages: `source` (files, spans, the spanned TOML tree) → `load` (the
//! environment overlay merged, modules expanded) → `resolve` (typed and
//! checked) → [`Stack`]. Errors from every stage are collected into one
//! [`Report`]. Raw tables never leave this module.

mod decode;
mod diag;
mod load;
mod model;
mod resolve;
mod source;

pub use decode::{duration_text, parse_duration};
pub use diag::{Code, Diagnostic, Report};
pub use model::*;

use std::path::Path;

/// Loads and validates the stack at `path` (a folder holding `stack.toml`,
/// or the file itself) for environment `env`.
pub fn load(path: &Path, env: Option<&str>) -> Result<Stack, Report> {
    let mut sources = source::Sources::default();
    let mut errors = decode::Errors::default();
    let stack = load::load(path, env, &mut sources, &mut errors)
        .and_then(|loaded| resolve::resolve(&loaded, env, &mut errors));
    match stack {
        Some(s) if errors.0.is_empty() => Ok(s),
        _ => {
            if errors.0.is_empty() {
                errors.push(Diagnostic::global(
                    Code::Io,
                    format!("cannot load the stack at {}", path.display()),
                ));
            }
            // In file order (the stack file, then overlays and modules as read),
            // however the checks happened to find them.
            errors.0.sort_by_key(|d| d.span.map(|s| (s.file, s.start)));
            Err(Report {
                diagnostics: errors.0,
                sources,
            })
        }
    }
}

/// The environments a stack declares, in order.
pub fn environments(path: &Path) -> Result<Vec<String>, Report> {
    let mut sources = source::Sources::default();
    let mut errors = decode::Errors::default();
    match load::load(path, None, &mut sources, &mut errors) {
        Some(loaded) => Ok(loaded
            .table
            .get("environment")
            .and_then(|e| match &e.value.kind {
                source::NodeKind::Table(t) => {
                    Some(t.entries.iter().map(|e| e.key.clone()).collect())
                }
                _ => None,
            })
            .unwrap_or_default()),
        None => Err(Report {
            diagnostics: errors.0,
            sources,
        }),
    }
}
