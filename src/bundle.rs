//! A service's bundle: the runtime's `service.json` (`mesh_runtime::config`,
//! the contract with the runtime) and the files it names (model, datasets,
//! CA certificates), built from the resolved stack. The local target stages
//! it under `.mesh/`, the Kubernetes provider mounts or bakes it, and
//! `image` makes it an image layer; [`bundle_digest`] is what their plans
//! compare. Reads the stack's own files (CSV headers, model inputs), nothing
//! else; secrets stay references.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use mesh_runtime::config as rc;
use sha2::{Digest, Sha256};

use crate::stack::{self, DatasetSource, Endpoint, EnrichmentSource, SecretRef, Stack};

/// Column names of a CSV file's header.
fn csv_header(path: &Path) -> Vec<String> {
    mesh_runtime::dataset::Dataset::csv_columns(path).unwrap_or_default()
}

/// Input names of an ONNX model (empty if it cannot be read).
fn model_inputs(path: &Path) -> Vec<String> {
    std::fs::read(path)
        .ok()
        .and_then(|b| mesh_runtime::model::Model::from_bytes(&b).ok())
        .map(|m| m.inputs().iter().map(|i| i.name.clone()).collect())
        .unwrap_or_default()
}

/// The bundle for one service: its `service.json` (paths relative to the
/// bundle) and the files to copy into it (bundle path → source path).
pub struct BundlePlan {
    pub config: rc::ServiceConfig,
    pub files: BTreeMap<String, PathBuf>,
}

/// Builds the bundle of a service from the stack. `lookup_url` gives the base
/// A dataset's or an enrichment's cache, in the runtime's terms.
fn cache_config(c: stack::LiveCache) -> rc::CacheConfig {
    rc::CacheConfig {
        ttl_ms: c.ttl.as_millis().min(u64::MAX as u128) as u64,
        max_entries: c.max_entries as usize,
    }
}

/// URL of another service (for lookup enrichments).
pub fn bundle_for(
    stack: &Stack,
    svc: &stack::Service,
    lookup_url: &dyn Fn(&str) -> String,
) -> BundlePlan {
    let mut files = BTreeMap::new();
    let mut datasets = BTreeMap::new();
    let mut connections = BTreeMap::new();
    for (name, d) in &svc.datasets {
        let source = match &d.source {
            DatasetSource::File(p) => {
                let ext = p.extension().and_then(|e| e.to_str()).unwrap_or("csv");
                let rel = format!("datasets/{name}.{ext}");
                files.insert(rel.clone(), p.clone());
                rc::DatasetSource::Csv(PathBuf::from(rel))
            }
            DatasetSource::Sql { connection, query } => {
                if let Some(c) = stack.connections.get(connection) {
                    connections.insert(connection.clone(), connection_config(c, &mut files));
                }
                rc::DatasetSource::Sql(rc::SqlSource {
                    connection: connection.clone(),
                    query: query.clone(),
                })
            }
        };
        let (mode, refresh_secs, max_staleness_secs, cache) = match &d.mode {
            stack::DatasetMode::Live { cache } => {
                (rc::DatasetMode::Live, None, None, cache.map(cache_config))
            }
            stack::DatasetMode::Preload {
                refresh,
                max_staleness,
            } => (
                rc::DatasetMode::Preload,
                refresh.map(|r| r.as_secs().max(1)),
                max_staleness.map(|m| m.as_secs().max(1)),
                None,
            ),
            // A file is in the bundle already; a query is frozen into it at
            // apply (`mesh-runtime freeze`).
            stack::DatasetMode::Bundle => match &d.source {
                DatasetSource::File(_) => (rc::DatasetMode::Preload, None, None, None),
                DatasetSource::Sql { .. } => (rc::DatasetMode::Bundle, None, None, None),
            },
        };
        datasets.insert(
            name.clone(),
            rc::DatasetConfig {
                source,
                key: d.key.clone(),
                duplicates: match d.duplicates {
                    stack::Duplicates::Error => rc::Duplicates::Error,
                    stack::Duplicates::Last => rc::Duplicates::Last,
                },
                mode,
                columns: BTreeMap::new(),
                refresh_secs,
                max_staleness_secs,
                cache,
            },
        );
    }
    let mut endpoints = BTreeMap::new();
    for (name, e) in &svc.endpoints {
        let ep = match e {
            Endpoint::Lookup { datasets } => rc::EndpointConfig::Lookup {
                datasets: datasets.clone(),
            },
            Endpoint::Prediction { model, enrichments } => {
                let rel = format!("models/{name}.onnx");
                files.insert(rel.clone(), model.clone());
                let features: BTreeSet<String> = model_inputs(model).into_iter().collect();
                let mut out = Vec::new();
                for en in enrichments {
                    // Columns available from the source, restricted to model
                    // features; none (the runtime takes every model input the
                    // source has) when a dataset's columns are known only once
                    // it is queried.
                    let available: Option<Vec<String>> = match &en.source {
                        EnrichmentSource::Dataset(d) => {
                            svc.datasets.get(d).and_then(dataset_columns)
                        }
                        EnrichmentSource::Lookup { service, endpoint } => stack
                            .services
                            .get(service)
                            .and_then(|s| match s.endpoints.get(endpoint) {
                                Some(Endpoint::Lookup { datasets }) => datasets
                                    .iter()
                                    .filter_map(|d| s.datasets.get(d))
                                    .map(dataset_columns)
                                    .collect::<Option<Vec<_>>>()
                                    .map(|c| c.concat()),
                                _ => None,
                            }),
                    };
                    let wanted: Vec<String> = if en.columns.is_empty() {
                        available.unwrap_or_default()
                    } else {
                        en.columns.clone()
                    };
                    let columns: Vec<String> = wanted
                        .into_iter()
                        .filter(|c| c != &en.key && (features.is_empty() || features.contains(c)))
                        .collect();
                    let (dataset, lookup) = match &en.source {
                        EnrichmentSource::Dataset(d) => (Some(d.clone()), None),
                        EnrichmentSource::Lookup { service, endpoint } => (
                            None,
                            Some(rc::RemoteLookup {
                                url: format!(
                                    "{}/public/api/v1/{service}/{endpoint}/lookup",
                                    lookup_url(service)
                                ),
                                api_key: stack
                                    .services
                                    .get(service)
                                    .and_then(|s| s.api_keys.first())
                                    .map(secret),
                                timeout_ms: 2000,
                                ca_file: None,
                            }),
                        ),
                    };
                    out.push(rc::EnrichmentConfig {
                        dataset,
                        lookup,
                        key: en.key.clone(),
                        columns,
                        on_missing: match en.on_missing {
                            stack::OnMissing::Error => rc::OnMissing::Error,
                            stack::OnMissing::Null => rc::OnMissing::Null,
                        },
                        cache: en.cache.map(cache_config),
                    });
                }
                rc::EndpointConfig::Prediction {
                    model: Some(PathBuf::from(rel)),
                    generations: Vec::new(),
                    dispatch: rc::Dispatch::Random,
                    enrichments: out,
                }
            }
        };
        endpoints.insert(name.clone(), ep);
    }
    BundlePlan {
        config: rc::ServiceConfig {
            service: svc.name.clone(),
            version: Some(svc.version.clone()),
            api_keys: svc
                .api_keys
                .iter()
                .map(|r| rc::ApiKey::Key(secret(r)))
                .collect(),
            known_callers: Vec::new(),
            limits: rc::Limits {
                request_timeout_ms: svc.request_timeout_ms,
                ..rc::Limits::default()
            },
            connections,
            datasets,
            endpoints,
            base_path: None,
            tls: None,
            // Off on this machine unless asked: the log file would grow with every
            // request (a cluster turns it on: see `kubernetes::objects`).
            access_log: svc.access_log.unwrap_or(false),
            split_file: None,
            query_log: None,
        },
        files,
    }
}

/// The runtime's view of a `[connection]`: options and secrets by reference.
/// A CA file travels in the bundle (`certs/<connection>.pem`).
fn connection_config(
    c: &stack::Connection,
    files: &mut BTreeMap<String, PathBuf>,
) -> rc::ConnectionConfig {
    match &c.kind {
        stack::ConnectionKind::Postgres {
            host,
            port,
            sslmode,
            ca_file,
        } => rc::ConnectionConfig::Postgres {
            host: host.clone(),
            port: *port,
            database: c.database.clone(),
            user: c.user.clone(),
            password: c.password.as_ref().map(secret),
            pool_size: c.pool_size as usize,
            sslmode: match sslmode {
                stack::SslMode::Disable => rc::SslMode::Disable,
                stack::SslMode::Require => rc::SslMode::Require,
                stack::SslMode::VerifyFull => rc::SslMode::VerifyFull,
            },
            ca_file: ca_file.as_ref().map(|path| {
                let rel = format!("certs/{}.pem", c.name);
                files.insert(rel.clone(), path.clone());
                PathBuf::from(rel)
            }),
            statement_timeout_ms: c.statement_timeout_ms,
            connect_timeout_ms: 5000,
        },
        stack::ConnectionKind::Snowflake {
            account,
            warehouse,
            schema,
            role,
            private_key,
            url,
        } => rc::ConnectionConfig::Snowflake {
            account: account.clone(),
            user: c.user.clone(),
            password: c.password.as_ref().map(secret),
            private_key: private_key.as_ref().map(secret),
            warehouse: warehouse.clone(),
            database: c.database.clone(),
            schema: schema.clone(),
            role: role.clone(),
            url: url.clone(),
            pool_size: c.pool_size as usize,
            statement_timeout_ms: c.statement_timeout_ms,
        },
    }
}

/// A dataset's columns but its key; `None` until queried (a connection's).
fn dataset_columns(d: &stack::Dataset) -> Option<Vec<String>> {
    match &d.source {
        DatasetSource::File(p) => Some(csv_header(p).into_iter().filter(|c| c != &d.key).collect()),
        DatasetSource::Sql { .. } => None,
    }
}

fn secret(s: &SecretRef) -> rc::SecretRef {
    match s {
        SecretRef::Env(v) => rc::SecretRef::Env(v.clone()),
        SecretRef::File(p) => rc::SecretRef::File(p.clone()),
    }
}

/// sha256 over the service config and every file's content, in a fixed order.
pub fn bundle_digest(b: &BundlePlan) -> Result<String, std::io::Error> {
    let mut h = Sha256::new();
    h.update(serde_json::to_vec(&b.config).unwrap_or_default());
    for (rel, src) in &b.files {
        h.update(rel.as_bytes());
        h.update([0]);
        let mut f = std::fs::File::open(src)?;
        std::io::copy(&mut f, &mut h)?;
        h.update([0]);
    }
    Ok(format!("sha256:{}", hex::encode(h.finalize())))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example stack with `edit` made to its `stack.toml` (which must
    /// change it), loaded from a copy in a temp folder.
    fn edited_example(edit: impl FnOnce(&str) -> String) -> (tempfile::TempDir, Stack) {
        let root = tempfile::tempdir().unwrap();
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("stacks/customer-mesh");
        for f in std::fs::read_dir(&example).unwrap() {
            let f = f.unwrap().path();
            if f.is_file() {
                std::fs::copy(&f, root.path().join(f.file_name().unwrap())).unwrap();
            }
        }
        let toml = root.path().join("stack.toml");
        let text = std::fs::read_to_string(&toml).unwrap();
        let edited = edit(&text);
        assert_ne!(edited, text, "the edit changes nothing");
        // Paths in the example are relative to its folder.
        std::fs::write(
            &toml,
            edited.replace("../../", &format!("{}/", env!("CARGO_MANIFEST_DIR"))),
        )
        .unwrap();
        let stack = crate::stack::load(root.path(), Some("local"))
            .unwrap_or_else(|r| panic!("{}", r.render()));
        (root, stack)
    }

    #[test]
    fn request_timeout_and_access_log_reach_the_bundle() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("stacks/customer-mesh");
        let stack =
            crate::stack::load(&root, Some("local")).unwrap_or_else(|r| panic!("{}", r.render()));
        let url_of = |svc: &str| format!("http://{svc}");
        let b = bundle_for(&stack, &stack.services["customer-scoring"], &url_of);
        assert_eq!(b.config.limits.request_timeout_ms, None);
        assert!(!b.config.access_log, "off by default on the local target");

        let (_root, stack) = edited_example(|text| {
            text.replacen(
                "[service.customer-scoring]\n",
                "[service.customer-scoring]\nrequest_timeout = \"1m30s\"\naccess_log = true\n",
                1,
            )
        });
        let b = bundle_for(&stack, &stack.services["customer-scoring"], &url_of);
        assert_eq!(b.config.limits.request_timeout_ms, Some(90_000));
        assert!(b.config.access_log);
        let other = bundle_for(&stack, &stack.services["customer-features"], &url_of);
        assert!(!other.config.access_log);
        assert_eq!(other.config.limits.request_timeout_ms, None);
    }

    #[test]
    fn an_enrichment_cache_reaches_the_bundle() {
        let (_root, stack) = edited_example(|text| {
            text.replacen(
                r#"key = "customer_id" }"#,
                r#"key = "customer_id", cache = { ttl = "5s", max_entries = 500 } }"#,
                1,
            )
        });
        let url_of = |svc: &str| format!("http://{svc}:8080");
        let b = bundle_for(&stack, &stack.services["customer-scoring"], &url_of);
        let caches: Vec<_> = b
            .config
            .endpoints
            .values()
            .flat_map(|ep| match ep {
                rc::EndpointConfig::Prediction { enrichments, .. } => {
                    enrichments.iter().map(|e| e.cache.clone()).collect()
                }
                _ => Vec::new(),
            })
            .collect();
        assert_eq!(
            caches,
            vec![
                Some(rc::CacheConfig {
                    ttl_ms: 5000,
                    max_entries: 500
                }),
                None
            ]
        );
    }

    #[test]
    fn csv_headers_are_read_as_the_runtime_reads_them() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("d.csv");
        std::fs::write(&p, "customer_id,\"spend, 30d\",\"age\"\nC1,2,3\n").unwrap();
        assert_eq!(csv_header(&p), ["customer_id", "spend, 30d", "age"]);
        assert!(csv_header(&tmp.path().join("missing.csv")).is_empty());
    }
}
