//! A service's datasets: how one is served (`mode`) and its live `cache`.

use std::path::Path;

use crate::stack::decode::{Errors, Fields};
use crate::stack::diag::{Code, Diagnostic};
use crate::stack::model::*;
use crate::stack::source::{Span, Table};

use super::Ctx;

/// A dataset's `mode` and the keys that only one mode reads: `refresh` and
/// `max_staleness` (preload), `cache` (live). A file is always bundled.
fn dataset_mode(
    ctx: &mut Ctx<'_>,
    df: &Fields<'_>,
    dname: &str,
    from_file: bool,
) -> Option<DatasetMode> {
    let mode = match df.str_opt(ctx.errors, "mode") {
        None if from_file => "bundle".to_owned(),
        None => "preload".to_owned(),
        Some((m, s)) => {
            if !matches!(m.as_str(), "bundle" | "preload" | "live") {
                ctx.errors.push(
                    Diagnostic::new(Code::InvalidValue, s, format!("unknown mode `{m}`"))
                        .label("not a mode")
                        .help("use \"bundle\" (frozen at apply), \"preload\" (loaded at start, `refresh` to reload) or \"live\" (queried per key)"),
                );
                return None;
            }
            if from_file && m != "bundle" {
                ctx.errors.push(
                    Diagnostic::new(
                        Code::InvalidValue,
                        s,
                        format!("a file dataset is bundled; mode `{m}` needs a connection"),
                    )
                    .label("file datasets are always \"bundle\"")
                    .help(format!(
                        "remove `mode`, or read `{dname}` from a connection with a query"
                    )),
                );
                return None;
            }
            m
        }
    };
    // A key that the chosen mode does not read is an error at that key.
    let misplaced = |ctx: &mut Ctx<'_>, key: &str, wants: &str| {
        if let Some(e) = df.entry(key) {
            ctx.errors.push(
                Diagnostic::new(
                    Code::InvalidValue,
                    e.key_span,
                    format!(
                        "`{key}` applies only to {wants} datasets, and `{dname}` is mode \"{mode}\""
                    ),
                )
                .label("not read in this mode")
                .help(format!(
                    "remove `{key}`, or set mode = \"{}\"",
                    if wants == "live" { "live" } else { "preload" }
                )),
            );
            true
        } else {
            false
        }
    };
    match mode.as_str() {
        "bundle" => {
            let a = misplaced(ctx, "refresh", "preload");
            let b = misplaced(ctx, "max_staleness", "preload");
            let c = misplaced(ctx, "cache", "live");
            (!(a || b || c)).then_some(DatasetMode::Bundle)
        }
        "preload" => {
            let c = misplaced(ctx, "cache", "live");
            let refresh = df.duration_opt(ctx.errors, "refresh");
            let max_staleness = df.duration_opt(ctx.errors, "max_staleness");
            if let (Some((_, s)), None) = (&max_staleness, &refresh) {
                ctx.errors.push(
                    Diagnostic::new(Code::InvalidValue, *s, "`max_staleness` needs `refresh`")
                        .label("nothing refreshes")
                        .help("add refresh = \"5m\" (the dataset goes stale when refreshes fail for max_staleness)"),
                );
                return None;
            }
            if let (Some((r, _)), Some((m, s))) = (&refresh, &max_staleness)
                && m < r
            {
                ctx.errors.push(
                    Diagnostic::new(
                        Code::InvalidValue,
                        *s,
                        "`max_staleness` is shorter than `refresh`",
                    )
                    .label("stale before the first refresh is due")
                    .help("make max_staleness a few refresh intervals, e.g. 3 × refresh"),
                );
                return None;
            }
            (!c).then_some(DatasetMode::Preload {
                refresh: refresh.map(|v| v.0),
                max_staleness: max_staleness.map(|v| v.0),
            })
        }
        _ => {
            let a = misplaced(ctx, "refresh", "preload");
            let b = misplaced(ctx, "max_staleness", "preload");
            let cache = decode_cache(ctx.errors, df, &format!("dataset.{dname}.cache"));
            match cache {
                Some(cache) if !(a || b) => Some(DatasetMode::Live { cache }),
                _ => None,
            }
        }
    }
}

/// The `cache = { ttl, max_entries }` table of `fields`: `Some(None)` when
/// there is none, `None` when it is invalid (reported).
pub(super) fn decode_cache(
    errors: &mut Errors,
    fields: &Fields<'_>,
    what: &str,
) -> Option<Option<LiveCache>> {
    match fields.table_opt(errors, "cache") {
        Some((ct, cspan)) => {
            let cf = Fields::new(ct, cspan, what.to_string());
            cf.allow(errors, &["ttl", "max_entries"]);
            let ttl = cf.duration_opt(errors, "ttl");
            if cf.entry("ttl").is_none() {
                cf.missing(errors, "ttl", "a duration", "\"30s\"");
            }
            let max_entries = cf.u32_opt(errors, "max_entries").unwrap_or(10_000);
            match ttl {
                Some((ttl, _)) if max_entries > 0 => Some(Some(LiveCache { ttl, max_entries })),
                Some(_) => {
                    errors.push(
                        Diagnostic::new(
                            Code::InvalidValue,
                            cspan,
                            "`max_entries` must be at least 1",
                        )
                        .label("a cache that holds nothing")
                        .help("remove `cache` to query every time"),
                    );
                    None
                }
                None => None,
            }
        }
        None if fields.entry("cache").is_some() => None,
        None => Some(None),
    }
}

/// `[service.SERVICE.dataset.NAME]`: where its rows come from (a file, or a
/// connection's query), its key, duplicates policy and mode. `None` when it
/// is in error (reported).
pub(super) fn decode_dataset(
    ctx: &mut Ctx<'_>,
    service: &str,
    dname: &str,
    dt: &Table,
    dspan: Span,
    base: &Path,
) -> Option<Dataset> {
    let df = Fields::new(dt, dspan, format!("service.{service}.dataset.{dname}"));
    df.allow(
        ctx.errors,
        &[
            "file",
            "connection",
            "query",
            "mode",
            "refresh",
            "max_staleness",
            "cache",
            "key",
            "duplicates",
        ],
    );
    let key = df.str_req(ctx.errors, "key", "\"customer_id\"");
    let duplicates = match df.str_opt(ctx.errors, "duplicates") {
        None => Duplicates::Error,
        Some((d, _)) if d == "error" => Duplicates::Error,
        Some((d, _)) if d == "last" => Duplicates::Last,
        Some((d, s)) => {
            ctx.errors.push(
                Diagnostic::new(
                    Code::InvalidValue,
                    s,
                    format!("unknown duplicates policy `{d}`"),
                )
                .label("not a policy")
                .help("use \"error\" or \"last\""),
            );
            Duplicates::Error
        }
    };
    let source = match (
        df.str_opt(ctx.errors, "file"),
        df.str_opt(ctx.errors, "connection"),
    ) {
        (Some((file, fspan)), None) => {
            let path = base.join(&file);
            if !path.is_file() {
                ctx.errors.push(
                    Diagnostic::new(
                        Code::DanglingReference,
                        fspan,
                        format!("dataset file `{file}` not found"),
                    )
                    .label(format!("looked for {}", path.display()))
                    .help("paths are relative to the file that declares the dataset"),
                );
            }
            if let Some(q) = df.entry("query") {
                ctx.errors.push(
                    Diagnostic::new(
                        Code::InvalidValue,
                        q.key_span,
                        "a file dataset has no `query`",
                    )
                    .label("only read with `connection`")
                    .help(
                        "remove `query`, or read the dataset from a connection instead of `file`",
                    ),
                );
            }
            Some(DatasetSource::File(path))
        }
        (None, Some((conn, cspan))) => {
            ctx.refer(
                "connection",
                &conn,
                cspan,
                &format!("service.{service}.dataset.{dname}"),
            );
            let query = df.str_req(ctx.errors, "query", "\"select * from table\"");
            query.map(|(q, _)| DatasetSource::Sql {
                connection: conn,
                query: q,
            })
        }
        (Some(_), Some((_, s))) => {
            ctx.errors.push(
                Diagnostic::new(
                    Code::InvalidValue,
                    s,
                    "a dataset reads either a `file` or a `connection`, not both",
                )
                .label("second source")
                .help("remove `file` or `connection`"),
            );
            None
        }
        (None, None) => {
            ctx.errors.push(
                Diagnostic::new(
                    Code::MissingField,
                    dspan,
                    format!("dataset `{dname}` needs a source"),
                )
                .label("no `file` or `connection`")
                .help("add file = \"data.csv\" or connection = \"warehouse\" with query = \"...\""),
            );
            None
        }
    };
    let from_file = df.entry("file").is_some();
    let mode = dataset_mode(ctx, &df, dname, from_file);
    // A mode in error is reported; the dataset still exists for the
    // references to it (no follow-on "undefined dataset" errors).
    let mode = mode.unwrap_or(if from_file {
        DatasetMode::Bundle
    } else {
        DatasetMode::Preload {
            refresh: None,
            max_staleness: None,
        }
    });
    Some(Dataset {
        name: dname.to_owned(),
        source: source?,
        mode,
        key: key?.0,
        duplicates,
    })
}
