//! `[registry.NAME]`: an ECR registry or an existing one named by URL.

use crate::stack::decode::Fields;
use crate::stack::diag::{Code, Diagnostic};
use crate::stack::model::*;
use crate::stack::source::{Span, Table};

use super::Ctx;

pub(super) fn decode_registry(
    ctx: &mut Ctx<'_>,
    name: &str,
    t: &Table,
    span: Span,
) -> Option<Registry> {
    let f = Fields::new(t, span, format!("registry.{name}"));
    f.allow(ctx.errors, &["scan_on_push", "immutable_tags", "keep_last"]);
    let keep_last = f.u32_opt(ctx.errors, "keep_last");
    if keep_last == Some(0)
        && let Some(e) = f.entry("keep_last")
    {
        ctx.errors.push(
            Diagnostic::new(
                Code::InvalidValue,
                e.value.span,
                "`keep_last` must be at least 1",
            )
            .label("keeps nothing")
            .help("remove keep_last to keep every image, or set it to 1 or more"),
        );
    }
    Some(Registry {
        name: name.to_owned(),
        scan_on_push: f.bool_opt(ctx.errors, "scan_on_push").unwrap_or(true),
        immutable_tags: f.bool_opt(ctx.errors, "immutable_tags").unwrap_or(true),
        keep_last,
    })
}
