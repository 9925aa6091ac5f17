//! `[connection.NAME]`: a database a service's datasets read (PostgreSQL or
//! Snowflake), with its secrets as references.

use crate::stack::decode::Fields;
use crate::stack::diag::{Code, Diagnostic};
use crate::stack::model::*;
use crate::stack::source::{Span, Table};

use super::{Ctx, port, secret_ref};

pub(super) fn decode_connection(
    ctx: &mut Ctx<'_>,
    name: &str,
    t: &Table,
    span: Span,
) -> Option<Connection> {
    let f = Fields::new(t, span, format!("connection.{name}"));
    let common = [
        "kind",
        "database",
        "user",
        "password",
        "pool_size",
        "statement_timeout",
    ];
    let kind = f.str_req(ctx.errors, "kind", "\"postgres\"");
    let base = ctx.base_dir(&format!("connection.{name}"));
    let kind = match kind {
        Some((k, _)) if k == "postgres" || k == "postgresql" => {
            f.allow(
                ctx.errors,
                &[&common[..], &["host", "port", "sslmode", "ca_file"]].concat(),
            );
            let host = f.str_req(ctx.errors, "host", "\"db.internal\"");
            let port = port(ctx, &f, "port", 1..=65535, Some(5432));
            let sslmode = match f.str_opt(ctx.errors, "sslmode") {
                None => Some(SslMode::Disable),
                Some((m, _)) if m == "disable" => Some(SslMode::Disable),
                Some((m, _)) if m == "require" => Some(SslMode::Require),
                Some((m, _)) if m == "verify-full" => Some(SslMode::VerifyFull),
                Some((m, s)) => {
                    ctx.errors.push(
                        Diagnostic::new(Code::InvalidValue, s, format!("unknown sslmode `{m}`"))
                            .label("not an sslmode")
                            .help("use \"disable\", \"require\" (encrypt) or \"verify-full\" (encrypt, check the certificate and host name)"),
                    );
                    None
                }
            };
            let ca_file = match f.str_opt(ctx.errors, "ca_file") {
                Some((file, fspan)) => {
                    let path = base.join(&file);
                    if !path.is_file() {
                        ctx.errors.push(
                            Diagnostic::new(
                                Code::DanglingReference,
                                fspan,
                                format!("CA file `{file}` not found"),
                            )
                            .label(format!("looked for {}", path.display()))
                            .help("paths are relative to the file that declares the connection"),
                        );
                    }
                    if sslmode != Some(SslMode::VerifyFull) {
                        ctx.errors.push(
                            Diagnostic::new(
                                Code::InvalidValue,
                                fspan,
                                "`ca_file` is only read with sslmode = \"verify-full\"",
                            )
                            .label("not used")
                            .help("add sslmode = \"verify-full\" or remove `ca_file`"),
                        );
                    }
                    Some(path)
                }
                None => None,
            };
            match (host, port, sslmode) {
                (Some(host), Some(port), Some(sslmode)) => Some(ConnectionKind::Postgres {
                    host: host.0,
                    port,
                    sslmode,
                    ca_file,
                }),
                _ => None,
            }
        }
        Some((k, _)) if k == "snowflake" => {
            f.allow(
                ctx.errors,
                &[
                    &common[..],
                    &[
                        "account",
                        "warehouse",
                        "schema",
                        "role",
                        "private_key",
                        "url",
                    ],
                ]
                .concat(),
            );
            let account = f.str_req(ctx.errors, "account", "\"myorg-account1\"");
            let private_key = secret_ref(ctx, &f, "private_key", &base);
            if private_key.is_some() && f.entry("password").is_some() {
                ctx.errors.push(
                    Diagnostic::new(
                        Code::InvalidValue,
                        f.entry("private_key").map_or(span, |e| e.value.span),
                        "a Snowflake connection authenticates with `password` or `private_key`, not both",
                    )
                    .label("second credential")
                    .help("remove `password` or `private_key`"),
                );
            }
            let url = match f.str_opt(ctx.errors, "url") {
                Some((u, us)) if !(u.starts_with("https://") || u.starts_with("http://")) => {
                    ctx.errors.push(
                        Diagnostic::new(Code::InvalidValue, us, format!("`url` must start with https:// or http://, found `{u}`"))
                            .label("not a URL")
                            .help("e.g. url = \"https://myorg-account1.privatelink.snowflakecomputing.com\"; leave it out for the account's public endpoint"),
                    );
                    None
                }
                other => other.map(|v| v.0),
            };
            let (warehouse, schema, role) = (
                f.str_opt(ctx.errors, "warehouse").map(|v| v.0),
                f.str_opt(ctx.errors, "schema").map(|v| v.0),
                f.str_opt(ctx.errors, "role").map(|v| v.0),
            );
            account.map(|account| ConnectionKind::Snowflake {
                account: account.0,
                warehouse,
                schema,
                role,
                private_key,
                url,
            })
        }
        Some((k, s)) => {
            ctx.errors.push(
                Diagnostic::new(
                    Code::InvalidValue,
                    s,
                    format!("unsupported connection kind `{k}`"),
                )
                .label("not supported")
                .help("use \"postgres\" or \"snowflake\""),
            );
            return None;
        }
        None => return None,
    };
    let database = f.str_req(ctx.errors, "database", "\"analytics\"");
    let user = f.str_req(ctx.errors, "user", "\"reader\"");
    let password = secret_ref(ctx, &f, "password", &base);
    if matches!(
        kind,
        Some(ConnectionKind::Snowflake {
            private_key: None,
            ..
        })
    ) && password.is_none()
        && f.entry("password").is_none()
    {
        ctx.errors.push(
            Diagnostic::new(
                Code::MissingField,
                span,
                format!("connection `{name}` has no credential"),
            )
            .label("no `password` or `private_key`")
            .help("add password = { env = \"SNOWFLAKE_PASSWORD\" } or private_key = { file = \"rsa_key.p8\" }"),
        );
    }
    let pool_size = match f.u32_opt(ctx.errors, "pool_size") {
        None => 4,
        Some(n) if (1..=64).contains(&n) => n,
        Some(n) => {
            ctx.errors.push(
                Diagnostic::new(
                    Code::InvalidValue,
                    f.entry("pool_size").map_or(span, |e| e.value.span),
                    format!("`pool_size` must be between 1 and 64, found {n}"),
                )
                .label("out of range")
                .help("connections each service keeps open for live datasets; 4 is the default"),
            );
            4
        }
    };
    let statement_timeout_ms = f
        .duration_opt(ctx.errors, "statement_timeout")
        .map_or(5_000, |(d, _)| d.as_millis().min(u64::MAX as u128) as u64);
    Some(Connection {
        name: name.to_owned(),
        kind: kind?,
        database: database?.0,
        user: user?.0,
        password,
        pool_size,
        statement_timeout_ms,
    })
}
