//! The desired objects of a stack (pure, apart from reading the stack's own
//! files and the secrets' references to digest them).
//!
//! Every object is built as the manifest mesh will server-side apply,
//! carried in the internal attribute `_manifest`; its compared attributes
//! are the manifest's [`project`]ion, so desired and live are projected by
//! the same code.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use mesh_runtime::config as rc;
use serde_json::{Value as J, json};
use sha2::{Digest, Sha256};

use super::kinds::{self, Kind};
use super::project::{content_digest, project};
use crate::bundle::{BundlePlan, bundle_for, split_out};
use crate::provider::ProviderError;
use crate::provider::local::access;
use crate::resource::{Address, Attr, Desired, ProviderId, Value};
use crate::stack::{self, Caller, ClusterKind, ExposeKind, Stack};

/// The port the runtime listens on inside its container.
pub const RUNTIME_PORT: u16 = 8080;
/// Name of the runtime container and of its port.
pub const CONTAINER: &str = "runtime";
const PORT_NAME: &str = "http";

/// Internal attributes (never compared nor shown).
pub const ATTR_MANIFEST: &str = "_manifest";
/// A service Deployment's ConfigMap manifest (JSON), applied before it.
pub const ATTR_CONFIGMAP: &str = "_configmap";
/// `{ key: {"env": VAR} | {"file": PATH} }` of a Secret, resolved at apply time.
pub const ATTR_SECRETS: &str = "_secrets";
/// The service's bundle: `service.json` text and files (bundle path → source).
pub const ATTR_BUNDLE: &str = "_bundle";
pub const ATTR_FILES: &str = "_files";
/// Why the image could not be built at plan time (apply fails with it).
pub const ATTR_IMAGE_ERROR: &str = "_image_error";

/// Where images go.
#[derive(Clone, Debug, PartialEq)]
pub enum Registry {
    /// An OCI registry by URL (`127.0.0.1:5001/mesh`): `URL/<stack>-<service>`.
    Url(String),
    /// A `registry.NAME` of the stack (ECR): its URL is known once it exists.
    Stack(String),
    /// The URL of the environment's own `registry.NAME` (ECR), as applied,
    /// which a test instance pushes to: one repository for all services, as
    /// [`Registry::Stack`].
    Reused(String),
}

/// Digests (`sha256:...`) of the images of services (name, bundle), or why not.
pub type ImageDigests<'a> = dyn Fn(&[(&str, &BundlePlan)]) -> Vec<Result<String, String>> + 'a;

/// What the desired objects need besides the stack.
pub struct Inputs<'a> {
    pub registry: Option<Registry>,
    /// Digests (`sha256:...`) of the images of services with these bundles (built, not pushed).
    pub image_digests: &'a ImageDigests<'a>,
    /// The pull secret the cluster needs for a registry that takes credentials.
    pub pull_secret: Option<PullSecret>,
    /// The stack's digest key (Secret [`DIGEST_KEY_SECRET`]) as observed;
    /// `None` before the first apply makes it: digests are known after apply.
    pub digest_key: Option<Vec<u8>>,
}

/// The Secret holding the stack's digest key: HMAC-SHA256 keys the digests
/// of every other Secret's content, so plans, saved plans and annotations
/// hold no plain hash of a secret value. Made at the first apply, kept.
pub const DIGEST_KEY_SECRET: &str = "mesh-digest-key";
/// Its one key in `data`.
pub const DIGEST_KEY: &str = "key";
/// Where a pod reads the caller keys it needs, in the layout of the local
/// target's `access` folder: `keys/<service>` (its own key, Secret
/// [`key_secret_name`]) and `verifiers/<caller>` (Secret [`VERIFIERS_SECRET`]).
pub const KEYS_DIR: &str = "/var/run/mesh/keys";
/// Where a service with generations finds its split: key [`SPLIT_FILE`] of
/// its ConfigMap, mounted as a folder so the kubelet updates the file in
/// place and no pod restarts.
pub const SPLIT_DIR: &str = "/var/run/mesh/split";
pub const SPLIT_FILE: &str = "split.json";
/// The Secret of every identity's verifiers, mounted into the services that
/// accept callers (verifiers only: no key).
pub const VERIFIERS_SECRET: &str = "mesh-verifiers";
/// Internal attribute of a Secret whose values apply makes: the data keys
/// to fill with new random keys (existing values are kept).
pub const ATTR_GENERATE: &str = "_generate";
/// Internal attribute of [`VERIFIERS_SECRET`]: the identities whose
/// verifiers apply derives from their key Secrets.
pub const ATTR_VERIFIERS: &str = "_verifiers";

/// The Secret holding `caller`'s key (a service's, or the operator's),
/// mounted into that service's pods only; the operator's into none.
pub fn key_secret_name(caller: &str) -> String {
    format!("mesh-key-{caller}")
}

/// The address of the digest key's Secret.
pub fn digest_key_address() -> Address {
    Address::of("digest_key", "stack")
}

/// The address of `caller`'s key Secret.
pub fn identity_address(caller: &str) -> Address {
    Address::of("identity", caller)
}

/// The address of the verifiers' Secret.
pub fn verifiers_address() -> Address {
    Address::of("verifiers", "callers")
}

/// A `kubernetes.io/dockerconfigjson` Secret for pulling the images: the
/// registry host and the digest of its content. The content (with the
/// password) is made again at apply time, never carried in the plan.
#[derive(Clone, Debug, PartialEq)]
pub struct PullSecret {
    pub host: String,
    /// `None` before the digest key exists: known after apply.
    pub digest: Option<String>,
}

/// The pull secret's name, in the stack's namespace.
pub const PULL_SECRET: &str = "mesh-registry";
/// Its key in `data`.
pub const DOCKER_CONFIG_KEY: &str = ".dockerconfigjson";
/// Internal attribute: the registry host of the pull secret.
pub const ATTR_PULL_SECRET: &str = "_pull_secret";

/// The pull secret's address.
pub fn pull_secret_address() -> Address {
    Address::of("pull_secret", "registry")
}

/// `.dockerconfigjson` for one registry host and its credentials.
pub fn docker_config(host: &str, user: &str, password: &str) -> String {
    let auth = serde_json::to_value(k8s_openapi::ByteString(
        format!("{user}:{password}").into_bytes(),
    ))
    .unwrap_or_default();
    json!({ "auths": { host: { "username": user, "password": password, "auth": auth } } })
        .to_string()
}

/// The pull secret's `data` digest (as [`secret_digest`] of its one key).
pub fn pull_secret_digest(key: &[u8], config: &str) -> String {
    super::project::secret_digest(key, [(DOCKER_CONFIG_KEY, config.as_bytes())])
}

/// The namespace a stack's objects go to.
pub fn namespace(stack: &Stack) -> String {
    stack
        .env
        .namespace
        .clone()
        .unwrap_or_else(|| stack.name.to_lowercase())
}

/// Namespaces mesh uses but never creates, labels or deletes.
fn system_namespace(ns: &str) -> bool {
    ns == "default" || ns.starts_with("kube-")
}

pub fn configmap_name(service: &str) -> String {
    format!("{service}-config")
}

/// What a service's ConfigMap adds to its Deployment resource, desired or
/// live alike: `config`, a digest per data key but the split, and `split`,
/// the generations' weights as the local target shows them
/// ([`crate::bundle::split_text`]; a split file that does not parse shows
/// as its digest, so it differs).
pub fn configmap_attrs(cm: &J) -> Vec<(String, Value)> {
    let data = cm.pointer("/data").and_then(J::as_object);
    let config = data
        .into_iter()
        .flatten()
        .filter(|(k, _)| k.as_str() != SPLIT_FILE)
        .map(|(k, v)| {
            (
                k.clone(),
                Value::Str(content_digest(v.as_str().unwrap_or_default())),
            )
        })
        .collect();
    let mut out = vec![("config".to_owned(), Value::Map(config))];
    if let Some(text) = data.and_then(|d| d.get(SPLIT_FILE)).and_then(J::as_str) {
        let split = match serde_json::from_str::<rc::SplitFile>(text) {
            Ok(split) => crate::bundle::split_text(&split),
            Err(_) => content_digest(text),
        };
        out.push(("split".to_owned(), Value::str(split)));
    }
    out
}

pub fn secret_name(service: &str) -> String {
    format!("{service}-secrets")
}

/// Every desired object of the stack, namespace first.
pub fn desired(stack: &Stack, inputs: &Inputs<'_>) -> Result<Vec<Desired>, ProviderError> {
    let ns = namespace(stack);
    let mut out = Vec::new();
    let ns_addr = Address::of("namespace", &ns);
    let owns_namespace = !system_namespace(&ns);
    if owns_namespace {
        let manifest = json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": meta(stack, &ns_addr, &ns, None),
        });
        let mut d = object(&ns_addr, Kind::Namespace, manifest);
        // On an EKS cluster of this stack, the namespace waits for the cluster and its nodes.
        if let Some(cluster) = stack
            .env
            .cluster
            .as_ref()
            .and_then(|c| stack.clusters.get(c))
            && let ClusterKind::Eks(eks) = &cluster.kind
        {
            let caddr = Address::of("cluster", &cluster.name);
            for g in &eks.node_groups {
                d = d.depends(caddr.child("node_group", &g.name));
            }
            d = d.depends(caddr);
        }
        out.push(d);
    }
    let in_ns = |d: Desired| {
        if owns_namespace {
            d.depends(ns_addr.clone())
        } else {
            d
        }
    };

    // The registry's credentials, for the nodes to pull the images with.
    let pull_addr = pull_secret_address();
    if let Some(p) = &inputs.pull_secret {
        let m = meta(stack, &pull_addr, PULL_SECRET, Some(&ns));
        let manifest = json!({
            "apiVersion": "v1", "kind": "Secret", "metadata": m,
            "type": "kubernetes.io/dockerconfigjson", "data": { DOCKER_CONFIG_KEY: "" },
        });
        let mut d = in_ns(object(&pull_addr, Kind::Secret, manifest)).depends(digest_key_address());
        let digest = match &p.digest {
            Some(digest) => Value::Sensitive {
                digest: digest.clone(),
            },
            None => Value::Unknown,
        };
        d.attrs.insert("data".to_owned(), Attr::new(digest));
        d.attrs
            .insert(ATTR_PULL_SECRET.to_owned(), internal(p.host.clone()));
        out.push(d);
    }

    // The digest key, the callers' keys and their verifiers: values made
    // at apply, never planned (see `access`).
    let key_addr = digest_key_address();
    if inputs.pull_secret.is_some() || !stack.services.is_empty() {
        out.push(in_ns(generated_secret(
            stack,
            &ns,
            &key_addr,
            DIGEST_KEY_SECRET,
            &[DIGEST_KEY.to_owned()],
        )));
    }
    let identities = access::identities(stack);
    for caller in &identities {
        out.push(in_ns(generated_secret(
            stack,
            &ns,
            &identity_address(caller),
            &key_secret_name(caller),
            std::slice::from_ref(caller),
        )));
    }
    if !identities.is_empty() {
        let mut d = in_ns(generated_secret(
            stack,
            &ns,
            &verifiers_address(),
            VERIFIERS_SECRET,
            &identities,
        ));
        d.attrs.remove(ATTR_GENERATE);
        d.attrs.insert(
            ATTR_VERIFIERS.to_owned(),
            internal(serde_json::to_string(&identities).unwrap_or_default()),
        );
        for caller in &identities {
            d = d.depends(identity_address(caller));
        }
        out.push(d);
    }

    let lookup_url = |service: &str| service_url(stack, &ns, service);
    let mut bundles = Vec::new();
    for svc in stack.services.values() {
        let mut bundle = bundle_for(stack, svc, &lookup_url);
        if let Some(name) = bundle
            .config
            .datasets
            .iter()
            .find_map(|(n, d)| (d.mode == rc::DatasetMode::Bundle).then_some(n))
        {
            return Err(ProviderError::Invalid {
                address: Address::of("service", &svc.name),
                message: format!(
                    "dataset `{name}`: a query in mode \"bundle\" is frozen at apply on the local target only (images are built at plan time here); use mode = \"preload\", which loads it at start"
                ),
            });
        }
        bundle.config.base_path = base_path(stack, &svc.name);
        // A cluster keeps the pods' stderr in its log pipeline: one line per request,
        // unless the stack says `access_log = false`.
        bundle.config.access_log = svc.access_log.unwrap_or(true);
        // The pods request their shadows' CPU (`cpu_request`): that share is
        // theirs whatever the node's idle time, which is other pods' business.
        if svc.endpoints.values().any(|e| e.shadow_cpu_millis() > 0) {
            bundle.config.limits.shadow_idle_gate = Some(false);
        }
        // The query log goes to stdout, for the cluster's log pipeline.
        if let Some(q) = &mut bundle.config.query_log {
            q.path = None;
        }
        access::configure(stack, Path::new(KEYS_DIR), svc, &mut bundle.config);
        let secrets = cluster_secrets(&mut bundle.config);
        // Weights outside the bundle (and the image): a weight change is a
        // ConfigMap update the runtime picks up, not a rollout.
        let split = split_out(&mut bundle.config, Path::new(SPLIT_DIR).join("split.json"));
        bundles.push((bundle, secrets, split));
    }
    let wanted: Vec<(&str, &BundlePlan)> = stack
        .services
        .keys()
        .zip(&bundles)
        .map(|(n, (b, ..))| (n.as_str(), b))
        .collect();
    let mut digests = (inputs.image_digests)(&wanted).into_iter();
    for ((name, svc), (bundle, secrets, split)) in stack.services.iter().zip(&bundles) {
        let base = Address::of("service", name);
        let config_json = serde_json::to_string_pretty(&bundle.config).unwrap_or_default();

        // ConfigMap: the service's config, and the generations' weights
        // (`split.json`, outside the config's hash: a weight change rolls
        // nothing out, the kubelet updates the file in place). It is part of
        // the service's Deployment resource ([`ATTR_CONFIGMAP`]): applied
        // with it, deleted with it, planned as its `config` and `split`.
        let dep_addr = sub(&base, "deployment");
        let mut data = json!({ rc::SERVICE_FILE: config_json });
        if let Some(split) = split {
            data[SPLIT_FILE] = json!(serde_json::to_string_pretty(split).unwrap_or_default());
        }
        let cm = json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": meta(stack, &dep_addr, &configmap_name(name), Some(&ns)),
            "data": data,
        });

        // Secret: connection passwords, private keys and API keys, by
        // reference; only a digest here. Pods read it as files (`SECRETS_DIR`).
        // A secret that cannot be read now is known after apply (which reads it
        // again and fails if it still cannot), so `destroy` never needs secrets.
        let secret_addr = sub(&base, "secret");
        let secret_hash: Option<Value> = if secrets.is_empty() {
            None
        } else {
            let digest = match (resolve_secrets(secrets), &inputs.digest_key) {
                (Ok(resolved), Some(key)) => Value::str(secret_digest(key, &resolved)),
                (Ok(_), None) => Value::Unknown,
                (Err(message), _) => {
                    warn(
                        &secret_addr,
                        &format!("{message}; its content is known after apply"),
                    );
                    Value::Unknown
                }
            };
            let m = meta(stack, &secret_addr, &secret_name(name), Some(&ns));
            let keys: serde_json::Map<String, J> =
                secrets.keys().map(|k| (k.clone(), json!(""))).collect();
            // `data`, not `stringData`: the server folds `stringData` into `data`,
            // so a key applied as `stringData` would never be removed by apply.
            let manifest = json!({ "apiVersion": "v1", "kind": "Secret", "metadata": m, "type": "Opaque", "data": keys });
            let mut d =
                in_ns(object(&secret_addr, Kind::Secret, manifest)).depends(key_addr.clone());
            d.attrs
                .insert("data".to_owned(), Attr::new(sensitive(&digest)));
            d.attrs.insert(
                ATTR_SECRETS.to_owned(),
                internal(serde_json::to_string(secrets).unwrap_or_default()),
            );
            out.push(d);
            Some(digest)
        };

        // Deployment: the runtime image pinned by digest. An image that cannot
        // be built now (no runtime binary, no registry) is known after apply,
        // where it is an error.
        let digest = digests
            .next()
            .unwrap_or_else(|| Err("no image digest".into()));
        let mut image_error = None;
        let image_attrs: Vec<(&str, Value)> = match (&inputs.registry, digest) {
            (_, Err(message)) => {
                image_error = Some(message);
                vec![("image", Value::Unknown)]
            }
            (Some(Registry::Url(url)), Ok(digest)) => vec![(
                "image",
                Value::str(format!("{}@{digest}", repository(url, &stack.name, name))),
            )],
            (Some(Registry::Stack(reg)), Ok(digest)) => vec![
                (
                    "image_repository",
                    Value::Ref {
                        address: Address::of("registry", reg),
                        output: "url".into(),
                    },
                ),
                ("image_digest", Value::str(digest)),
            ],
            (Some(Registry::Reused(url)), Ok(digest)) => vec![
                ("image_repository", Value::str(url)),
                ("image_digest", Value::str(digest)),
            ],
            (None, Ok(_)) => {
                image_error = Some("no registry for the runtime image: set `registry` in the environment or MESH_REGISTRY (e.g. 127.0.0.1:5001/mesh)".to_owned());
                vec![("image", Value::Unknown)]
            }
        };
        if let Some(message) = &image_error {
            warn(
                &dep_addr,
                &format!("{message}; the image is known after apply"),
            );
        }
        let image = String::new();
        let pods = kinds::pod_labels(&stack.name, &stack.env.name, name);
        let mut template_annotations =
            json!({ kinds::ANNOTATION_CONFIG_HASH: content_digest(&config_json) });
        if let Some(Value::Str(h)) = &secret_hash {
            template_annotations[kinds::ANNOTATION_SECRET_HASH] = json!(h);
        }
        let mut container = json!({
            "name": CONTAINER,
            "image": image,
            "ports": [{ "name": PORT_NAME, "containerPort": RUNTIME_PORT, "protocol": "TCP" }],
            "resources": {
                "requests": { "cpu": cpu_request(svc), "memory": svc.resources.memory },
                "limits": { "memory": svc.resources.memory },
            },
            "securityContext": container_security(),
            "readinessProbe": { "httpGet": { "path": "/readyz", "port": PORT_NAME }, "periodSeconds": 5 },
            "livenessProbe": { "httpGet": { "path": "/healthz", "port": PORT_NAME }, "initialDelaySeconds": 10, "periodSeconds": 10 },
            // The ConfigMap's `service.json` over the image's own (the same text), so the
            // ConfigMap is what the runtime reads.
            "volumeMounts": [{
                "name": "config",
                "mountPath": format!("{}/{}", crate::image::BUNDLE_DIR, rc::SERVICE_FILE),
                "subPath": rc::SERVICE_FILE,
                "readOnly": true,
            }],
        });
        let mut volumes =
            vec![json!({ "name": "config", "configMap": { "name": configmap_name(name) } })];
        if split.is_some() {
            // A folder, never a `subPath` (which the kubelet does not update).
            if let Some(mounts) = container["volumeMounts"].as_array_mut() {
                mounts.push(json!({ "name": "split", "mountPath": SPLIT_DIR, "readOnly": true }));
            }
            volumes.push(json!({ "name": "split", "configMap": {
                "name": configmap_name(name),
                "items": [{ "key": SPLIT_FILE, "path": SPLIT_FILE }],
            } }));
        }
        if secret_hash.is_some() {
            if let Some(mounts) = container["volumeMounts"].as_array_mut() {
                mounts
                    .push(json!({ "name": "secrets", "mountPath": SECRETS_DIR, "readOnly": true }));
            }
            // 0400; the kubelet makes the files group-readable by `fsGroup`,
            // the group the runtime runs in (see `image`).
            volumes.push(json!({
                "name": "secrets",
                "secret": { "secretName": secret_name(name), "defaultMode": 0o400 },
            }));
        }
        // Its own key if it calls a restricted service, the verifiers if it
        // accepts callers: each pod gets exactly the keys it needs.
        let keys_dir = Path::new(KEYS_DIR);
        let presents = refers_to(&bundle.config, &access::key_file(keys_dir, name));
        let verifies = refers_to(&bundle.config, &keys_dir.join("verifiers"));
        for (wanted, volume, dir, secret) in [
            (presents, "key", "keys", key_secret_name(name)),
            (
                verifies,
                "verifiers",
                "verifiers",
                VERIFIERS_SECRET.to_owned(),
            ),
        ] {
            if !wanted {
                continue;
            }
            if let Some(mounts) = container["volumeMounts"].as_array_mut() {
                mounts.push(
                    json!({ "name": volume, "mountPath": keys_dir.join(dir), "readOnly": true }),
                );
            }
            volumes.push(json!({
                "name": volume,
                "secret": { "secretName": secret, "defaultMode": 0o400 },
            }));
        }
        let mut spec = json!({
            "selector": { "matchLabels": pods },
            "strategy": { "type": "RollingUpdate", "rollingUpdate": { "maxUnavailable": 0, "maxSurge": 1 } },
            "template": {
                "metadata": { "labels": pods, "annotations": template_annotations },
                "spec": {
                    "securityContext": pod_security(),
                    "containers": [container],
                    "volumes": volumes,
                },
            },
        });
        if inputs.pull_secret.is_some() {
            spec["template"]["spec"]["imagePullSecrets"] = json!([{ "name": PULL_SECRET }]);
        }
        // With an autoscaler, the replica count is the autoscaler's: mesh does not apply it.
        if svc.autoscaling.is_none() {
            spec["replicas"] = json!(svc.replicas);
        }
        let manifest = json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": meta(stack, &dep_addr, name, Some(&ns)),
            "spec": spec,
        });
        let mut d = in_ns(object(&dep_addr, Kind::Deployment, manifest));
        d.attrs.remove("image");
        d.attrs.remove("image_repository");
        d.attrs.remove("image_digest");
        for (k, v) in image_attrs {
            d.attrs.insert(k.to_owned(), Attr::new(v));
        }
        if let Some(h) = &secret_hash {
            d.attrs
                .insert("secret_hash".to_owned(), Attr::new(sensitive(h)));
        }
        if let Some(message) = image_error {
            d.attrs
                .insert(ATTR_IMAGE_ERROR.to_owned(), internal(message));
        }
        // Apply waits until the rollout completes; a failed or unfinished one shows in the next plan.
        d.attrs.insert("rollout".to_owned(), Attr::new("complete"));
        d.attrs
            .insert(ATTR_BUNDLE.to_owned(), internal(config_json.clone()));
        d.attrs.insert(
            ATTR_FILES.to_owned(),
            internal(serde_json::to_string(&bundle.files).unwrap_or_default()),
        );
        if !secrets.is_empty() {
            d.attrs.insert(
                ATTR_SECRETS.to_owned(),
                internal(serde_json::to_string(secrets).unwrap_or_default()),
            );
        }
        for (k, v) in configmap_attrs(&cm) {
            d.attrs.insert(k, Attr::new(v));
        }
        d.attrs
            .insert(ATTR_CONFIGMAP.to_owned(), internal(cm.to_string()));
        if secret_hash.is_some() {
            d = d.depends(secret_addr.clone()).depends(key_addr.clone());
        }
        if presents {
            d = d.depends(identity_address(name));
        }
        if verifies {
            d = d.depends(verifiers_address());
        }
        for en in svc
            .endpoints
            .values()
            .flat_map(stack::Endpoint::all_enrichments)
        {
            if let stack::EnrichmentSource::Lookup { service, .. } = &en.source {
                d = d.depends(sub(&Address::of("service", service), "deployment"));
            }
        }
        if let Some(Registry::Stack(reg)) = &inputs.registry {
            d = d.depends(Address::of("registry", reg));
        }
        if inputs.pull_secret.is_some() {
            d = d.depends(pull_addr.clone());
        }
        out.push(d);

        // HorizontalPodAutoscaler.
        if let Some(a) = &svc.autoscaling {
            let hpa_addr = sub(&base, "hpa");
            let manifest = json!({
                "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
                "metadata": meta(stack, &hpa_addr, name, Some(&ns)),
                "spec": {
                    "scaleTargetRef": { "apiVersion": "apps/v1", "kind": "Deployment", "name": name },
                    "minReplicas": a.min,
                    "maxReplicas": a.max,
                    "metrics": [{ "type": "Resource", "resource": { "name": "cpu", "target": { "type": "Utilization", "averageUtilization": a.cpu_percent } } }],
                },
            });
            out.push(
                in_ns(object(&hpa_addr, Kind::HorizontalPodAutoscaler, manifest))
                    .depends(dep_addr.clone()),
            );
        }
    }

    for (name, e) in &stack.exposes {
        let base = Address::of("expose", name);
        let after = sub(&Address::of("service", &e.service), "deployment");
        let pods = kinds::pod_labels(&stack.name, &stack.env.name, &e.service);
        let (svc_type, port, node_port) = match &e.kind {
            ExposeKind::ClusterIP { port } => ("ClusterIP", *port, None),
            ExposeKind::NodePort { port, node_port } => ("NodePort", *port, *node_port),
            ExposeKind::LoadBalancer { port } => ("LoadBalancer", *port, None),
            ExposeKind::Ingress { port, .. } => ("ClusterIP", *port, None),
        };
        let mut sp = json!({ "name": PORT_NAME, "port": port, "targetPort": RUNTIME_PORT, "protocol": "TCP" });
        if let Some(np) = node_port {
            sp["nodePort"] = json!(np);
        }
        let svc_addr = sub(&base, "service");
        let cidrs: Vec<String> = e.cidrs().iter().map(ToString::to_string).collect();
        let mut manifest = json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": meta(stack, &svc_addr, name, Some(&ns)),
            "spec": { "type": svc_type, "selector": pods, "ports": [sp] },
        });
        if let ExposeKind::LoadBalancer { .. } = e.kind {
            // Only the allowed source addresses reach the load balancer, and
            // it keeps them (no second hop through another node), so the
            // NetworkPolicy's ipBlocks see the real client.
            if !cidrs.is_empty() {
                manifest["spec"]["loadBalancerSourceRanges"] = json!(cidrs);
                manifest["spec"]["externalTrafficPolicy"] = json!("Local");
            }
            if let Some(stack::Tls::CertificateArn(arn)) = &e.tls {
                let a = &mut manifest["metadata"]["annotations"];
                a[kinds::ANNOTATION_AWS_SSL_CERT] = json!(arn);
                a[kinds::ANNOTATION_AWS_SSL_PORTS] = json!(port.to_string());
            }
        }
        out.push(in_ns(object(&svc_addr, Kind::Service, manifest)).depends(after.clone()));

        if let ExposeKind::Ingress { host, path, .. } = &e.kind {
            let ing_addr = sub(&base, "ingress");
            let mut manifest = json!({
                "apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
                "metadata": meta(stack, &ing_addr, name, Some(&ns)),
                "spec": { "rules": [{ "host": host, "http": { "paths": [{
                    "path": path, "pathType": "Prefix",
                    "backend": { "service": { "name": name, "port": { "number": port } } },
                }] } }] },
            });
            ingress_edge(&mut manifest, stack, e, host, &cidrs);
            out.push(in_ns(object(&ing_addr, Kind::Ingress, manifest)).depends(svc_addr.clone()));
        }

        // Only the declared callers reach the service's pods; everyone else is denied.
        let from: Vec<J> = e
            .allow
            .iter()
            .map(|c| match c {
                Caller::Service(s) => json!({ "podSelector": { "matchLabels": kinds::pod_labels(&stack.name, &stack.env.name, s) } }),
                Caller::Cidr(c) => json!({ "ipBlock": { "cidr": c.to_string() } }),
            })
            .collect();
        let ingress = if from.is_empty() {
            json!([])
        } else {
            json!([{ "from": from, "ports": [{ "port": RUNTIME_PORT, "protocol": "TCP" }] }])
        };
        let np_addr = sub(&base, "network_policy");
        let manifest = json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": meta(stack, &np_addr, name, Some(&ns)),
            "spec": { "podSelector": { "matchLabels": pods }, "policyTypes": ["Ingress"], "ingress": ingress },
        });
        out.push(in_ns(object(&np_addr, Kind::NetworkPolicy, manifest)).depends(after));
    }
    Ok(out)
}

/// The Ingress controller's part of an exposure (mesh names no
/// `ingressClassName`: the cluster's default class serves it): the allowed
/// CIDRs as source ranges (ingress-nginx's annotation everywhere, and on an
/// `aws` environment the AWS Load Balancer Controller's too), and TLS: a
/// Secret named by the stack, or one cert-manager's ClusterIssuer fills
/// (`<expose>-tls`).
fn ingress_edge(manifest: &mut J, stack: &Stack, e: &stack::Expose, host: &str, cidrs: &[String]) {
    let a = &mut manifest["metadata"]["annotations"];
    if !cidrs.is_empty() {
        a[kinds::ANNOTATION_NGINX_SOURCE_RANGE] = json!(cidrs.join(","));
        if stack.env.target == stack::Target::Aws {
            a[kinds::ANNOTATION_ALB_INBOUND_CIDRS] = json!(cidrs.join(","));
        }
    }
    let secret = match &e.tls {
        Some(stack::Tls::Secret(s)) => s.clone(),
        Some(stack::Tls::Issuer(issuer)) => {
            a[kinds::ANNOTATION_CLUSTER_ISSUER] = json!(issuer);
            tls_secret_name(&e.name)
        }
        _ => return,
    };
    manifest["spec"]["tls"] = json!([{ "hosts": [host], "secretName": secret }]);
}

/// The Secret cert-manager writes an Ingress's certificate to (`issuer`).
pub fn tls_secret_name(expose: &str) -> String {
    format!("{expose}-tls")
}

/// The pod's security context: not root (the image's user, 65532, whose
/// group reads the secrets volume through `fsGroup`), the runtime's default
/// seccomp profile.
fn pod_security() -> J {
    let id = crate::image::NONROOT_GROUP;
    json!({
        "runAsNonRoot": true, "runAsUser": id, "runAsGroup": id, "fsGroup": id,
        "seccompProfile": { "type": "RuntimeDefault" },
    })
}

/// The CPU a service's pods request: `resources.cpu`, plus the budget of
/// each shadow generation (its scoring thread runs in the same container,
/// beside the serving ones), so the scheduler leaves the node room for it.
/// Without shadows, `resources.cpu` as written.
fn cpu_request(svc: &stack::Service) -> String {
    let shadows: u64 = svc
        .endpoints
        .values()
        .map(stack::Endpoint::shadow_cpu_millis)
        .sum();
    match stack::cpu_millis(&svc.resources.cpu) {
        Some(serving) if shadows > 0 => format!("{}m", serving + shadows),
        _ => svc.resources.cpu.clone(),
    }
}

/// The runtime container's: it writes nothing (logs go to stderr, the
/// bundle and secrets are read-only mounts), needs no capability and never
/// gains a privilege.
fn container_security() -> J {
    json!({
        "runAsNonRoot": true, "readOnlyRootFilesystem": true,
        "allowPrivilegeEscalation": false, "capabilities": { "drop": ["ALL"] },
    })
}

/// A Secret whose values apply makes ([`ATTR_GENERATE`]): `keys` are its
/// data keys; its content is never planned nor compared.
fn generated_secret(
    stack: &Stack,
    ns: &str,
    address: &Address,
    name: &str,
    keys: &[String],
) -> Desired {
    let mut m = meta(stack, address, name, Some(ns));
    m["annotations"][kinds::ANNOTATION_GENERATED] = json!("true");
    let data: serde_json::Map<String, J> = keys.iter().map(|k| (k.clone(), json!(""))).collect();
    let manifest = json!({ "apiVersion": "v1", "kind": "Secret", "metadata": m, "type": "Opaque", "data": data });
    let mut d = object(address, Kind::Secret, manifest);
    d.attrs.insert(
        ATTR_GENERATE.to_owned(),
        internal(serde_json::to_string(keys).unwrap_or_default()),
    );
    d
}

/// Whether a secret reference of `config` is `path` or under it.
fn refers_to(config: &rc::ServiceConfig, path: &Path) -> bool {
    config
        .clone()
        .secrets_mut()
        .any(|r| matches!(r, rc::SecretRef::File(p) if p.starts_with(path)))
}

/// A digest as a sensitive value (`Unknown` stays unknown).
fn sensitive(v: &Value) -> Value {
    match v {
        Value::Str(d) => Value::Sensitive { digest: d.clone() },
        other => other.clone(),
    }
}

/// A plan-time problem that does not stop the plan (stderr, like progress).
fn warn(address: &Address, message: &str) {
    eprintln!("warning: {address}: {message}");
}

/// `URL/<stack>-<service>` (lowercase: OCI repository names are).
pub fn repository(registry_url: &str, stack: &str, service: &str) -> String {
    format!(
        "{}/{}-{}",
        registry_url.trim_end_matches('/'),
        stack.to_lowercase(),
        service.to_lowercase()
    )
}

/// `REPO:<service>.<digest hex>`: an image in a repository that several
/// services share (a stack's ECR registry). Tags are at most 128
/// characters: 63 (a service name) + 1 + 64.
pub fn shared_repository_tag(repository: &str, service: &str, digest: &str) -> String {
    format!(
        "{repository}:{}.{}",
        service.to_lowercase(),
        digest.trim_start_matches("sha256:")
    )
}

/// Where a service's Ingress forwards it (the path unchanged, so the runtime
/// serves under it too): its first Ingress exposure's path, unless `/`.
fn base_path(stack: &Stack, service: &str) -> Option<String> {
    stack.exposes.values().find_map(|e| match &e.kind {
        ExposeKind::Ingress { path, .. } if e.service == service => {
            let p = path.trim_end_matches('/');
            if p.is_empty() {
                return None;
            }
            if !rc::valid_base_path(p) {
                warn(
                    &Address::of("expose", &e.name),
                    &format!("the runtime cannot serve under the ingress path {path} (plain segments only, not /v2, /public, /healthz, ...); its URLs will not answer"),
                );
                return None;
            }
            Some(p.to_owned())
        }
        _ => None,
    })
}

/// The in-cluster URL of a service: its first exposure's Service.
fn service_url(stack: &Stack, ns: &str, service: &str) -> String {
    let exposed = stack
        .exposes
        .values()
        .find(|e| e.service == service)
        .map(|e| {
            let port = match &e.kind {
                ExposeKind::ClusterIP { port }
                | ExposeKind::NodePort { port, .. }
                | ExposeKind::LoadBalancer { port }
                | ExposeKind::Ingress { port, .. } => *port,
            };
            (e.name.clone(), port)
        });
    let (host, port) = exposed.unwrap_or_else(|| (service.to_owned(), RUNTIME_PORT));
    format!("http://{host}.{ns}.svc.cluster.local:{port}")
}

/// A desired resource from a manifest: its projection plus the manifest.
fn object(address: &Address, kind: Kind, manifest: J) -> Desired {
    let mut d = Desired::new(
        address.clone(),
        kind.resource_kind(),
        ProviderId::Kubernetes,
    );
    for (k, v) in project(kind, &manifest) {
        let attr = if k == "name" || k == "namespace" {
            Attr::force_new(v)
        } else {
            Attr::new(v)
        };
        d.attrs.insert(k, attr);
    }
    d.attrs
        .insert(ATTR_MANIFEST.to_owned(), internal(manifest.to_string()));
    d
}

fn internal(s: String) -> Attr {
    Attr::new(Value::Str(s))
}

fn meta(stack: &Stack, address: &Address, name: &str, namespace: Option<&str>) -> J {
    let mut m = json!({
        "name": name,
        "labels": kinds::ownership_labels(&stack.name, &stack.env.name),
        "annotations": { kinds::ANNOTATION_ADDRESS: address.as_str() },
    });
    if let Some(ns) = namespace {
        m["namespace"] = json!(ns);
    }
    m
}

/// A secret reference as carried to apply.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SecretSource {
    Env(String),
    File(PathBuf),
}

/// Where a pod reads its secrets: the service's Secret as a read-only volume
/// (files 0400), so no secret is in the runtime's environment.
pub const SECRETS_DIR: &str = "/var/run/mesh/secrets";

/// Rewrites a bundle's secret references for a cluster (every reference
/// [`rc::ServiceConfig::secrets_mut`] lists): each becomes a file of the
/// service's Secret, mounted at [`SECRETS_DIR`]. Returns the Secret's keys
/// and where their values come from.
fn cluster_secrets(config: &mut rc::ServiceConfig) -> BTreeMap<String, SecretSource> {
    let mut out = BTreeMap::new();
    for r in config.secrets_mut() {
        // Caller keys and verifiers come from Secrets of their own.
        if matches!(r, rc::SecretRef::File(p) if p.starts_with(KEYS_DIR)) {
            continue;
        }
        let hashed = |kind: &str, what: &str| {
            let h = hex::encode(Sha256::digest(what.as_bytes()));
            format!("MESH_SECRET_{kind}_{}", h[..12].to_uppercase())
        };
        let (key, source) = match r {
            // A Secret key holds only `-._a-zA-Z0-9`; a file name starting
            // with `.` would be hidden (and `..` is the volume's own).
            rc::SecretRef::Env(var) => (
                if !var.is_empty()
                    && !var.starts_with('.')
                    && var
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
                {
                    var.clone()
                } else {
                    hashed("ENV", var)
                },
                SecretSource::Env(var.clone()),
            ),
            rc::SecretRef::File(path) => (
                hashed("FILE", &path.to_string_lossy()),
                SecretSource::File(path.clone()),
            ),
        };
        *r = rc::SecretRef::File(Path::new(SECRETS_DIR).join(&key));
        out.insert(key, source);
    }
    out
}

/// Reads each secret now. Errors name the reference, never a value.
pub fn resolve_secrets(
    secrets: &BTreeMap<String, SecretSource>,
) -> Result<BTreeMap<String, String>, String> {
    secrets
        .iter()
        .map(|(k, s)| {
            let v = match s {
                SecretSource::Env(var) => std::env::var(var)
                    .map_err(|_| format!("the secret in environment variable {var} is not set"))?,
                SecretSource::File(p) => std::fs::read_to_string(p)
                    .map(|t| {
                        t.strip_suffix('\n')
                            .map(|s| s.strip_suffix('\r').unwrap_or(s))
                            .unwrap_or(&t)
                            .to_owned()
                    })
                    .map_err(|e| format!("cannot read the secret file {}: {e}", p.display()))?,
            };
            Ok((k.clone(), v))
        })
        .collect()
}

/// The digest of a Secret's content (what the `mesh.dev/secret-hash` annotation holds).
pub fn secret_digest(key: &[u8], values: &BTreeMap<String, String>) -> String {
    super::project::secret_digest(key, values.iter().map(|(k, v)| (k.as_str(), v.as_bytes())))
}

/// A Secret's `data`: each value base64-encoded, as the API stores it.
pub fn secret_data(values: &BTreeMap<String, String>) -> J {
    J::Object(
        values
            .iter()
            .map(|(k, v)| {
                let encoded = serde_json::to_value(k8s_openapi::ByteString(v.as_bytes().to_vec()))
                    .unwrap_or_default();
                (k.clone(), encoded)
            })
            .collect(),
    )
}

/// The registry an environment pushes to: `registry` if it is a URL (or
/// names a `registry.NAME` of the stack), else `MESH_REGISTRY`.
pub fn registry(stack: &Stack, from_env: Option<&str>) -> Option<Registry> {
    match stack.env.registry.as_deref() {
        Some(r) if stack.registries.contains_key(r) => Some(Registry::Stack(r.to_owned())),
        Some(r) if !r.is_empty() => Some(Registry::Url(r.trim_start_matches("oci://").to_owned())),
        _ => from_env
            .filter(|s| !s.is_empty())
            .map(|s| Registry::Url(s.trim_start_matches("oci://").to_owned())),
    }
}

/// `service.x` + `deployment` → `service.x.deployment`.
pub fn sub(base: &Address, part: &str) -> Address {
    Address::new(format!("{base}.{part}"))
}

/// A bundle back from a Deployment's internal attributes (at apply time).
pub fn bundle_from_attrs(config_json: &str, files_json: &str) -> Result<BundlePlan, String> {
    let config: rc::ServiceConfig = serde_json::from_str(config_json)
        .map_err(|e| format!("the planned service config does not parse: {e}"))?;
    let files: BTreeMap<String, PathBuf> = serde_json::from_str(files_json)
        .map_err(|e| format!("the planned bundle files do not parse: {e}"))?;
    Ok(BundlePlan { config, files })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deployments(stack: &Stack, registry: Registry) -> Vec<Desired> {
        desired_with(stack, registry)
            .into_iter()
            .filter(|d| d.address.as_str().ends_with(".deployment"))
            .collect()
    }

    /// Every desired object of `stack` pushing to `registry` (images built by a stand-in).
    fn desired_with(stack: &Stack, registry: Registry) -> Vec<Desired> {
        let digests = |wanted: &[(&str, &BundlePlan)]| -> Vec<Result<String, String>> {
            wanted
                .iter()
                .map(|_| Ok(format!("sha256:{}", "ab".repeat(32))))
                .collect()
        };
        let inputs = Inputs {
            registry: Some(registry),
            image_digests: &digests,
            pull_secret: None,
            digest_key: None,
        };
        desired(stack, &inputs).expect("desired")
    }

    #[test]
    fn a_test_instance_pushes_to_the_environments_registry_as_applied() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("stacks/customer-mesh");
        let stack =
            crate::stack::load(&root, Some("dev")).unwrap_or_else(|r| panic!("{}", r.render()));
        let registry = Address::of("registry", "platform");
        // The environment: its own registry, known once created.
        for d in deployments(&stack, Registry::Stack("platform".into())) {
            assert!(d.depends_on.contains(&registry), "{}", d.address);
        }
        // An instance: the environment's registry by URL, on nothing of its own.
        let url = "123456789012.dkr.ecr.us-east-1.amazonaws.com/customer-mesh/dev/platform";
        let inst = stack.instance("t1");
        let deps = deployments(&inst, Registry::Reused(url.into()));
        assert_eq!(deps.len(), 2);
        for d in deps {
            assert_eq!(d.attrs["image_repository"].value, Value::str(url));
            assert!(!d.depends_on.contains(&registry), "{}", d.address);
        }
    }

    #[test]
    fn a_weight_change_is_the_split_alone() {
        use crate::bundle::tests::{edited_example_for, with_generations};
        let objects = |v1, v2| {
            // Not `dev`, whose overlay has generations of its own.
            let (_root, stack) = edited_example_for("existing", |t| with_generations(t, v1, v2));
            all(&stack)
        };
        let (before, after) = (objects(90, 10), objects(80, 20));
        assert_eq!(before.len(), after.len());
        let scoring = "service.customer-scoring.deployment";
        for (b, a) in before.iter().zip(&after) {
            assert_eq!(b.address, a.address);
            let mut b = b.attrs.clone();
            let mut a = a.attrs.clone();
            if a.remove("split").is_some() {
                assert_eq!(
                    b.remove("split").map(|s| s.value),
                    Some(Value::str("high-value: v1 90, v2 10"))
                );
                b.remove(ATTR_CONFIGMAP);
                a.remove(ATTR_CONFIGMAP);
            }
            assert_eq!(b, a, "{scoring} changes with the weights beyond its split");
        }
        let split = &after
            .iter()
            .find(|d| d.address.as_str() == scoring)
            .unwrap()
            .attrs;
        assert_eq!(split["split"].value, Value::str("high-value: v1 80, v2 20"));
        // The ConfigMap, applied with the Deployment: the config unchanged, the split new.
        let configmap = |objects: &[Desired]| -> J {
            let d = objects
                .iter()
                .find(|d| d.address.as_str() == scoring)
                .unwrap();
            serde_json::from_str(d.attrs[ATTR_CONFIGMAP].value.as_str().unwrap()).unwrap()
        };
        let (old, new) = (configmap(&before), configmap(&after));
        assert_eq!(old["data"][rc::SERVICE_FILE], new["data"][rc::SERVICE_FILE]);
        let weights: rc::SplitFile =
            serde_json::from_str(new["data"][SPLIT_FILE].as_str().expect("split.json")).unwrap();
        assert_eq!(weights["high-value"]["v2"], 20);
        assert!(
            !after
                .iter()
                .any(|d| d.kind == Kind::ConfigMap.resource_kind()),
            "a ConfigMap is part of its Deployment, not a resource of its own"
        );
        // The pods read it from a folder the kubelet keeps current.
        let dep = manifest(&after, scoring);
        let pod = &dep["spec"]["template"]["spec"];
        let volume = pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == "split")
            .expect("the split volume");
        assert_eq!(volume["configMap"]["name"], "customer-scoring-config");
        let mount = pod["containers"][0]["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == "split")
            .expect("the split mounted");
        assert_eq!(mount["mountPath"], SPLIT_DIR);
        assert!(mount.get("subPath").is_none(), "a subPath is never updated");
    }

    #[test]
    fn clusters_log_every_request_unless_the_stack_says_not_to() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("stacks/customer-mesh");
        let mut stack =
            crate::stack::load(&root, Some("dev")).unwrap_or_else(|r| panic!("{}", r.render()));
        let configs = |stack: &Stack| -> Vec<rc::ServiceConfig> {
            deployments(stack, Registry::Url("127.0.0.1:5000/mesh".into()))
                .iter()
                .map(|d| {
                    let json = d.attrs[ATTR_BUNDLE].value.as_str().expect("bundle");
                    serde_json::from_str(json).expect("service.json")
                })
                .collect()
        };
        let on = configs(&stack);
        assert_eq!(on.len(), 2);
        for config in &on {
            assert!(config.access_log, "{}", config.service);
            assert_eq!(config.limits.request_timeout_ms, None, "{}", config.service);
        }
        for svc in stack.services.values_mut() {
            svc.access_log = Some(false);
            svc.request_timeout_ms = Some(2500);
        }
        for config in configs(&stack) {
            assert!(!config.access_log, "{}", config.service);
            assert_eq!(config.limits.request_timeout_ms, Some(2500));
        }
    }

    #[test]
    fn a_pod_requests_its_shadows_cpu_besides_the_services() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("stacks/customer-mesh");
        let mut stack =
            crate::stack::load(&root, Some("prod")).unwrap_or_else(|r| panic!("{}", r.render()));
        let request = |stack: &Stack, service: &str| -> (J, rc::ServiceConfig) {
            let objects = all(stack);
            let address = format!("service.{service}.deployment");
            let m = manifest(&objects, &address);
            let d = objects.iter().find(|d| d.address.as_str() == address);
            let json = d.expect("deployment").attrs[ATTR_BUNDLE].value.as_str();
            (
                m["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"]
                    .clone(),
                serde_json::from_str(json.expect("bundle")).expect("service.json"),
            )
        };
        // prod: customer-scoring's 500m, and 200m for its `gbt` shadow.
        let (cpu, config) = request(&stack, "customer-scoring");
        assert_eq!(cpu, json!("700m"));
        let Some(rc::EndpointConfig::Prediction { generations, .. }) =
            config.endpoints.get("high-value")
        else {
            panic!("no high-value endpoint")
        };
        let cpus: Vec<_> = generations.iter().map(|g| (&g.name[..], g.cpu)).collect();
        assert_eq!(cpus, [("logistic", None), ("gbt", Some(0.2))]);
        // Its share is reserved: it need not wait for the node's idle time.
        assert_eq!(config.limits.shadow_idle_gate, Some(false));
        // A service without shadows requests its CPU as written.
        let (cpu, config) = request(&stack, "customer-features");
        assert_eq!(cpu, json!("250m"));
        assert_eq!(config.limits.shadow_idle_gate, None);
        // A shadow without `cpu`: the runtime's default budget, a quarter core.
        let scoring = stack.services.get_mut("customer-scoring").expect("svc");
        scoring.resources.cpu = "1.5".into();
        for e in scoring.endpoints.values_mut() {
            if let stack::Endpoint::Prediction {
                models: stack::Models::Generations { generations, .. },
                ..
            } = e
            {
                generations.iter_mut().for_each(|g| g.cpu_millis = None);
            }
        }
        assert_eq!(request(&stack, "customer-scoring").0, json!("1750m"));
        assert_eq!(
            rc::Limits::DEFAULT_SHADOW_CPU,
            stack::DEFAULT_SHADOW_CPU_MILLIS as f64 / 1000.0
        );
    }

    /// Every desired object of `stack`, pushing to a registry by URL.
    fn all(stack: &Stack) -> Vec<Desired> {
        desired_with(stack, Registry::Url("127.0.0.1:5000/mesh".into()))
    }

    fn manifest(objects: &[Desired], address: &str) -> J {
        let d = objects
            .iter()
            .find(|d| d.address.as_str() == address)
            .unwrap_or_else(|| panic!("no {address}"));
        serde_json::from_str(d.attrs[ATTR_MANIFEST].value.as_str().expect("text")).expect("json")
    }

    #[test]
    fn on_aws_a_load_balancer_gets_the_acm_certificate_and_an_ingress_the_alb_source_ranges() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("stacks/customer-mesh");
        let mut stack =
            crate::stack::load(&root, Some("dev")).unwrap_or_else(|r| panic!("{}", r.render()));
        let arn = "arn:aws:acm:us-east-1:123456789012:certificate/0a1b2c3d";
        let cidr: ipnet::Ipv4Net = "10.40.0.0/16".parse().expect("cidr");
        let scoring = stack.exposes.get_mut("customer-scoring").expect("expose");
        scoring.kind = ExposeKind::LoadBalancer { port: 443 };
        scoring.allow = vec![Caller::Cidr(cidr)];
        scoring.tls = Some(stack::Tls::CertificateArn(arn.into()));
        let features = stack.exposes.get_mut("customer-features").expect("expose");
        features.kind = ExposeKind::Ingress {
            port: 8080,
            host: "features.example.com".into(),
            path: "/".into(),
        };
        features.allow.push(Caller::Cidr(cidr));
        let objects = all(&stack);

        let svc = manifest(&objects, "expose.customer-scoring.service");
        let a = &svc["metadata"]["annotations"];
        assert_eq!(a[kinds::ANNOTATION_AWS_SSL_CERT], arn, "{svc:#}");
        assert_eq!(a[kinds::ANNOTATION_AWS_SSL_PORTS], "443", "{svc:#}");
        assert_eq!(
            svc["spec"]["loadBalancerSourceRanges"],
            json!(["10.40.0.0/16"])
        );
        assert_eq!(svc["spec"]["externalTrafficPolicy"], "Local");
        let ing = manifest(&objects, "expose.customer-features.ingress");
        let a = &ing["metadata"]["annotations"];
        assert_eq!(
            a[kinds::ANNOTATION_ALB_INBOUND_CIDRS],
            "10.40.0.0/16",
            "{ing:#}"
        );
        assert_eq!(
            a[kinds::ANNOTATION_NGINX_SOURCE_RANGE],
            "10.40.0.0/16",
            "{ing:#}"
        );
        assert!(ing["spec"].get("tls").is_none(), "{ing:#}");
        // The compared attributes carry the edge, so a change shows in plan.
        let d = objects
            .iter()
            .find(|d| d.address.as_str() == "expose.customer-scoring.service")
            .expect("service");
        assert_eq!(
            d.attrs["source_ranges"].value,
            Value::List(vec![Value::str("10.40.0.0/16")])
        );
        match &d.attrs["edge_annotations"].value {
            Value::Map(m) => assert_eq!(m[kinds::ANNOTATION_AWS_SSL_CERT], Value::str(arn)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn every_secret_of_every_connection_kind_becomes_a_file_of_the_volume() {
        let mut config: rc::ServiceConfig = serde_json::from_value(json!({
            "service": "s",
            "api_keys": [{ "env": "API_KEY" }],
            "connections": {
                "pg": { "kind": "postgres", "host": "h", "database": "d", "user": "u",
                        "password": { "file": "/etc/pg/password" } },
                "sf": { "kind": "snowflake", "account": "a", "user": "u", "database": "D",
                        "private_key": { "env": "SF_KEY" } }
            },
            "endpoints": { "p": { "kind": "prediction", "model": "m.onnx", "enrichments": [
                { "lookup": { "url": "http://x/lookup", "api_key": { "env": "not a key" } },
                  "key": "k", "columns": ["c"] },
                { "lookup": { "url": "http://y/lookup", "api_key": { "env": "..data" } },
                  "key": "k", "columns": ["c"] } ] } }
        }))
        .unwrap();
        let secrets = cluster_secrets(&mut config);
        assert_eq!(secrets.len(), 5, "{secrets:?}");
        assert_eq!(secrets["API_KEY"], SecretSource::Env("API_KEY".into()));
        assert_eq!(secrets["SF_KEY"], SecretSource::Env("SF_KEY".into()));
        assert!(
            secrets
                .values()
                .any(|s| *s == SecretSource::File("/etc/pg/password".into()))
        );
        let files: Vec<PathBuf> = config
            .secrets_mut()
            .map(|r| match r {
                rc::SecretRef::File(p) => p.clone(),
                other => panic!("not a file: {other}"),
            })
            .collect();
        assert_eq!(files.len(), 5);
        for f in files {
            let key = f.strip_prefix(SECRETS_DIR).unwrap().to_str().unwrap();
            assert!(secrets.contains_key(key), "{key}: {secrets:?}");
            // Secret keys: `-._a-zA-Z0-9` only, no hidden files.
            assert!(
                !key.starts_with('.')
                    && key
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b)),
                "{key}"
            );
        }
    }
}
