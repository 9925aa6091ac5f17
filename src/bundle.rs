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

/// A dataset's or an enrichment's cache, in the runtime's terms.
fn cache_config(c: stack::LiveCache) -> rc::CacheConfig {
    rc::CacheConfig {
        ttl_ms: c.ttl.as_millis().min(u64::MAX as u128) as u64,
        max_entries: c.max_entries as usize,
    }
}

/// Builds the bundle of a service from the stack. `lookup_url` gives the base
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
            Endpoint::Prediction {
                models,
                enrichments,
            } => {
                // Generations take the same inputs (the stack checks it).
                let mut features = BTreeSet::new();
                let mut rels = Vec::new();
                for (generation, model) in models.files() {
                    let rel = match generation {
                        None => format!("models/{name}.onnx"),
                        Some(g) => format!("models/{name}/{g}.onnx"),
                    };
                    files.insert(rel.clone(), model.clone());
                    features.extend(model_inputs(model));
                    rels.push(PathBuf::from(rel));
                }
                let configs = |enrichments: &[stack::Enrichment]| {
                    enrichments
                        .iter()
                        .map(|en| enrichment_config(stack, svc, en, &features, lookup_url))
                        .collect::<Vec<_>>()
                };
                let out = configs(enrichments);
                match models {
                    stack::Models::One(_) => rc::EndpointConfig::Prediction {
                        model: rels.pop(),
                        generations: Vec::new(),
                        dispatch: rc::Dispatch::Random,
                        enrichments: out,
                    },
                    stack::Models::Generations {
                        generations,
                        dispatch,
                    } => rc::EndpointConfig::Prediction {
                        model: None,
                        generations: generations
                            .iter()
                            .zip(rels)
                            .map(|(g, model)| rc::GenerationConfig {
                                name: g.name.clone(),
                                model,
                                weight: g.weight,
                                shadow: g.weight.is_none(),
                                enrichments: g.enrichments.as_deref().map(configs),
                                cpu: g.cpu_millis.map(|m| m as f64 / 1000.0),
                            })
                            .collect(),
                        dispatch: match dispatch {
                            stack::Dispatch::Random => rc::Dispatch::Random,
                            stack::Dispatch::Key(k) => rc::Dispatch::Key(k.clone()),
                        },
                        enrichments: out,
                    },
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
            // Where it goes is the target's (see `local` and `kubernetes::objects`).
            query_log: svc.query_log.as_ref().map(|q| rc::QueryLogConfig {
                path: q.path.clone(),
                sample: q.sample,
                redact: q.redact.clone(),
            }),
        },
        files,
    }
}

/// Moves the generations' weights out of the bundle into the split the
/// runtime reads from `split_file` and re-reads when it changes, so a weight
/// change is not a new bundle (and restarts nothing). The split; `None` when
/// no endpoint has generations (the config is left as it was).
pub fn split_out(config: &mut rc::ServiceConfig, split_file: PathBuf) -> Option<rc::SplitFile> {
    let mut split = rc::SplitFile::new();
    for (name, ep) in &mut config.endpoints {
        if let rc::EndpointConfig::Prediction { generations, .. } = ep {
            for g in generations.iter_mut().filter(|g| !g.shadow) {
                let weight = g.weight.take().unwrap_or_default();
                split
                    .entry(name.clone())
                    .or_default()
                    .insert(g.name.clone(), weight);
            }
        }
    }
    if split.is_empty() {
        return None;
    }
    config.split_file = Some(split_file);
    Some(split)
}

/// A split as one plan value: `high-value: v1 90, v2 10`.
pub fn split_text(split: &rc::SplitFile) -> String {
    split
        .iter()
        .map(|(endpoint, weights)| {
            let w: Vec<String> = weights.iter().map(|(g, w)| format!("{g} {w}")).collect();
            format!("{endpoint}: {}", w.join(", "))
        })
        .collect::<Vec<_>>()
        .join("; ")
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

/// One enrichment in the runtime's terms: the columns it fills (restricted
/// to the model's `features`) and, for a lookup, the upstream's URL and key.
fn enrichment_config(
    stack: &Stack,
    svc: &stack::Service,
    en: &stack::Enrichment,
    features: &BTreeSet<String>,
    lookup_url: &dyn Fn(&str) -> String,
) -> rc::EnrichmentConfig {
    // Columns available from the source, restricted to model
    // features; none (the runtime takes every model input the
    // source has) when a dataset's columns are known only once
    // it is queried.
    let available: Option<Vec<String>> = match &en.source {
        EnrichmentSource::Dataset(d) => svc.datasets.get(d).and_then(dataset_columns),
        EnrichmentSource::Lookup { service, endpoint } => {
            stack
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
                })
        }
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
    rc::EnrichmentConfig {
        dataset,
        lookup,
        key: en.key.clone(),
        columns,
        on_missing: match en.on_missing {
            stack::OnMissing::Error => rc::OnMissing::Error,
            stack::OnMissing::Null => rc::OnMissing::Null,
        },
        cache: en.cache.map(cache_config),
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
pub(crate) mod tests {
    use super::*;

    /// The example stack with `edit` made to its `stack.toml` (which must
    /// change it), loaded for `local` from a copy in a temp folder.
    fn edited_example(edit: impl FnOnce(&str) -> String) -> (tempfile::TempDir, Stack) {
        edited_example_for("local", edit)
    }

    /// [`edited_example`] for environment `env`.
    pub(crate) fn edited_example_for(
        env: &str,
        edit: impl FnOnce(&str) -> String,
    ) -> (tempfile::TempDir, Stack) {
        let root = tempfile::tempdir().unwrap();
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("stacks/customer-mesh");
        // Paths in the example are relative to its folder.
        let absolute =
            |text: &str| text.replace("../../", &format!("{}/", env!("CARGO_MANIFEST_DIR")));
        for f in std::fs::read_dir(&example).unwrap() {
            let f = f.unwrap().path();
            if f.is_file() {
                let text = std::fs::read_to_string(&f).unwrap();
                std::fs::write(root.path().join(f.file_name().unwrap()), absolute(&text)).unwrap();
            }
        }
        let toml = root.path().join("stack.toml");
        let text = std::fs::read_to_string(&toml).unwrap();
        let edited = edit(&text);
        assert_ne!(edited, text, "the edit changes nothing");
        std::fs::write(&toml, edited).unwrap();
        let stack =
            crate::stack::load(root.path(), Some(env)).unwrap_or_else(|r| panic!("{}", r.render()));
        (root, stack)
    }

    /// The example's `high-value` endpoint as generations `v1` (its model)
    /// and `v2` (the same model) with these weights, and a shadow `v3`.
    pub(crate) fn with_generations(text: &str, v1: u32, v2: u32) -> String {
        let model = format!(
            "model = \"{}/examples/customer-mesh/high_value.onnx\"",
            env!("CARGO_MANIFEST_DIR")
        );
        let generation = |name: &str, role: &str| {
            format!(
                "\n[[service.customer-scoring.endpoint.high-value.generation]]\nname = \"{name}\"\n{model}\n{role}\n"
            )
        };
        let (head, tail) = text
            .split_once(model.as_str())
            .expect("the example's model line");
        let tail = tail
            .split_once("\n[expose.customer-scoring]")
            .map(|(enrich, rest)| {
                format!(
                    "{enrich}{}{}{}\n[expose.customer-scoring]{rest}",
                    generation("v1", &format!("weight = {v1}")),
                    generation("v2", &format!("weight = {v2}")),
                    generation("v3", "shadow = true"),
                )
            })
            .expect("the example's exposure");
        format!("{head}dispatch = {{ key = \"customer_id\" }}{tail}")
    }

    #[test]
    fn generations_weights_live_outside_the_bundle() {
        let bundle = |v1, v2| {
            let (_root, stack) = edited_example(|text| with_generations(text, v1, v2));
            let url_of = |svc: &str| format!("http://{svc}");
            let mut b = bundle_for(&stack, &stack.services["customer-scoring"], &url_of);
            let split = split_out(&mut b.config, PathBuf::from("/state/split.json"));
            (b, split.expect("a split"))
        };
        let (b, split) = bundle(90, 10);
        let rc::EndpointConfig::Prediction {
            model,
            generations,
            dispatch,
            ..
        } = &b.config.endpoints["high-value"]
        else {
            panic!("a prediction endpoint");
        };
        assert_eq!(model, &None);
        assert_eq!(dispatch, &rc::Dispatch::Key("customer_id".into()));
        let names: Vec<(&str, &Path, Option<u32>, bool)> = generations
            .iter()
            .map(|g| (g.name.as_str(), g.model.as_path(), g.weight, g.shadow))
            .collect();
        assert_eq!(
            names,
            [
                ("v1", Path::new("models/high-value/v1.onnx"), None, false),
                ("v2", Path::new("models/high-value/v2.onnx"), None, false),
                ("v3", Path::new("models/high-value/v3.onnx"), None, true),
            ]
        );
        for g in ["v1", "v2", "v3"] {
            assert!(
                b.files.contains_key(&format!("models/high-value/{g}.onnx")),
                "{g}"
            );
        }
        assert_eq!(
            b.config.split_file,
            Some(PathBuf::from("/state/split.json"))
        );
        assert_eq!(split_text(&split), "high-value: v1 90, v2 10");
        assert!(b.config.problems().is_empty(), "{:?}", b.config.problems());
        // Another split, the same bundle: a weight change restarts nothing.
        let (other, split2) = bundle(80, 20);
        assert_eq!(split_text(&split2), "high-value: v1 80, v2 20");
        assert_eq!(other.config, b.config);
        assert_eq!(bundle_digest(&other).unwrap(), bundle_digest(&b).unwrap());
    }

    /// A generation's own `enrich` reaches the runtime beside the endpoint's,
    /// its lookup URL resolved and, where the upstream admits only listed
    /// callers, given the caller's key like the endpoint's own lookups.
    #[test]
    fn a_generations_own_enrichments_are_wired_like_the_endpoints() {
        let (root, stack) = edited_example(|text| {
            with_generations(text, 90, 10).replace(
                "name = \"v2\"\n",
                "name = \"v2\"\nenrich = [{ lookup = \"customer-features.behavior\", key = \"customer_id\", on_missing = \"null\" }, { lookup = \"customer-features.demographics\", key = \"customer_id\", columns = [\"age\"] }]\n",
            )
        });
        let url_of = |svc: &str| format!("http://{svc}:9");
        let mut b = bundle_for(&stack, &stack.services["customer-scoring"], &url_of);
        let rc::EndpointConfig::Prediction {
            generations,
            enrichments,
            ..
        } = &b.config.endpoints["high-value"]
        else {
            panic!("a prediction endpoint");
        };
        assert_eq!(enrichments.len(), 2);
        assert_eq!(generations[0].enrichments, None);
        let own = generations[1].enrichments.as_ref().expect("v2's own");
        let urls: Vec<&str> = own
            .iter()
            .map(|e| e.lookup.as_ref().unwrap().url.as_str())
            .collect();
        assert_eq!(
            urls,
            [
                "http://customer-features:9/public/api/v1/customer-features/behavior/lookup",
                "http://customer-features:9/public/api/v1/customer-features/demographics/lookup",
            ]
        );
        assert_eq!(own[0].on_missing, rc::OnMissing::Null);
        assert_eq!(own[1].columns, ["age"]);
        assert!(b.config.problems().is_empty(), "{:?}", b.config.problems());
        // customer-features admits customer-scoring alone: every lookup, the
        // generation's too, presents customer-scoring's key.
        let dir = root.path().join("keys");
        crate::provider::local::access::configure(
            &stack,
            &dir,
            &stack.services["customer-scoring"],
            &mut b.config,
        );
        let keys: Vec<_> = b.config.endpoints["high-value"]
            .all_enrichments()
            .iter()
            .map(|e| e.lookup.as_ref().and_then(|l| l.api_key.clone()))
            .collect();
        assert_eq!(keys.len(), 4);
        let want = rc::SecretRef::File(crate::provider::local::access::key_file(
            &dir,
            "customer-scoring",
        ));
        assert!(keys.iter().all(|k| k.as_ref() == Some(&want)), "{keys:?}");
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
