//! The resolved, validated stack for one environment: modules expanded,
//! environment overrides merged, every reference checked. Providers read
//! only these types; the raw spanned schema never leaves `stack`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::Ipv4Net;
use serde::Serialize;

/// One stack, resolved for one environment.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Stack {
    pub name: String,
    /// The stack folder.
    pub root: PathBuf,
    pub env: Environment,
    pub networks: BTreeMap<String, Network>,
    pub clusters: BTreeMap<String, Cluster>,
    pub registries: BTreeMap<String, Registry>,
    pub connections: BTreeMap<String, Connection>,
    pub services: BTreeMap<String, Service>,
    pub exposes: BTreeMap<String, Expose>,
    /// The modules' outputs (`${module.M.O}`): `module.M.O` → value.
    pub outputs: BTreeMap<String, String>,
}

impl Stack {
    /// This stack as instance `name` of its environment, isolated from the
    /// environment's own resources (`mesh test`):
    ///
    /// - the environment is renamed `<env>-<name>`, so every ownership mark
    ///   and name derived from it is the instance's own: the local state
    ///   folder and lock, Kubernetes labels and Lease, AWS tags and names;
    /// - Kubernetes objects go to the namespace `<namespace>-<name>`;
    /// - explicit NodePorts are dropped, so the instance's ports are
    ///   allocated (by the caller on the local target, by the API server on
    ///   a cluster) and never collide with the environment's.
    ///
    /// On `kubernetes` a stack with services deploys them onto the
    /// environment's own cluster and registry ([`Stack::reuses_platform`]).
    /// On `aws` the instance builds its own network, cluster and registry,
    /// named and tagged for the instance (reusing the environment's is not
    /// wired into the engine yet).
    pub fn instance(&self, name: &str) -> Stack {
        let mut s = self.clone();
        let of = self.env.name.clone();
        let namespace = self
            .env
            .namespace
            .clone()
            .unwrap_or_else(|| self.name.to_lowercase());
        let mut ns = format!("{namespace}-{name}");
        ns.truncate(63);
        s.env.namespace = Some(ns.trim_end_matches('-').to_owned());
        s.env.name = format!("{of}-{name}");
        s.env.instance = Some(Instance {
            name: name.to_owned(),
            of,
        });
        for e in s.exposes.values_mut() {
            if let ExposeKind::NodePort { node_port, .. } = &mut e.kind {
                *node_port = None;
            }
        }
        s
    }

    /// On a test instance of a stack with services on a `kubernetes` or
    /// `aws` environment: the services go to the environment's cluster and
    /// registry (as applied), and the instance creates no network, cluster
    /// or registry of its own. A stack without services (a platform stack)
    /// gets its own instance of them.
    pub fn reuses_platform(&self) -> bool {
        self.env.instance.is_some()
            && matches!(self.env.target, Target::Kubernetes | Target::Aws)
            && !self.services.is_empty()
    }

    /// The environment whose cluster and registry the services use: the
    /// environment itself, or the one a test instance reuses.
    pub fn platform_env(&self) -> &str {
        match &self.env.instance {
            Some(i) if self.reuses_platform() => &i.of,
            _ => &self.env.name,
        }
    }

    /// Every test query of every service, in service order.
    pub fn tests(&self) -> impl Iterator<Item = &TestQuery> {
        self.services.values().flat_map(|s| &s.tests)
    }
}

/// Where an environment runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// Services as local processes on loopback; no cloud account.
    Local,
    /// Networks, EKS clusters and ECR registries in AWS; services on the EKS cluster.
    Aws,
    /// Services on an existing Kubernetes cluster (kubeconfig context).
    Kubernetes,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Environment {
    pub name: String,
    pub target: Target,
    /// AWS region (target `aws`).
    pub region: Option<String>,
    /// The cluster services run on (targets `aws`, `kubernetes`).
    pub cluster: Option<String>,
    /// The registry images are pushed to (a `registry.NAME` or an OCI URL).
    pub registry: Option<String>,
    /// Kubernetes namespace for the stack's objects (default: the stack name).
    pub namespace: Option<String>,
    /// Set on a test instance (see [`Stack::instance`]).
    pub instance: Option<Instance>,
}

/// A copy of an environment's stack under another name (`mesh test`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Instance {
    /// The instance name (`test-1a2b3c`).
    pub name: String,
    /// The environment it is an instance of (`Environment::name` is then
    /// `<environment>-<instance>`).
    pub of: String,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Network {
    pub name: String,
    pub cidr: Ipv4Net,
    /// In declaration order.
    pub subnets: Vec<Subnet>,
    pub tags: BTreeMap<String, String>,
    /// How private subnets reach the internet (the default is already applied).
    pub nat_gateway: NatGateways,
}

/// The NAT gateways that give a network's private subnets a route out
/// (`nat_gateway = "single" | "per_zone" | "none"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NatGateways {
    /// None: private subnets reach nothing outside the VPC.
    None,
    /// One NAT gateway, in the first public subnet, for every private subnet.
    Single,
    /// One NAT gateway per zone that has private subnets, in that zone's
    /// first public subnet; a zone's outage does not cut the others off.
    PerZone,
}

impl NatGateways {
    pub fn as_str(self) -> &'static str {
        match self {
            NatGateways::None => "none",
            NatGateways::Single => "single",
            NatGateways::PerZone => "per_zone",
        }
    }
}

/// One NAT gateway of a network: the zone it is in, the public subnet it
/// lives in, and the private subnets routed through it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NatPlacement {
    pub zone: String,
    pub subnet: String,
    pub private: Vec<String>,
}

impl Network {
    /// Where the network's NAT gateways go, in a stable order. Private
    /// subnets that cannot be routed (a `per_zone` zone without a public
    /// subnet, which validation rejects) are left out; no private subnet,
    /// no NAT gateway.
    pub fn nat_placements(&self) -> Vec<NatPlacement> {
        let private = || self.subnets.iter().filter(|s| !s.public);
        let first_public_in = |zone: Option<&str>| {
            self.subnets
                .iter()
                .find(|s| s.public && zone.is_none_or(|z| s.zone == z))
        };
        match self.nat_gateway {
            NatGateways::None => Vec::new(),
            NatGateways::Single => {
                let routed: Vec<String> = private().map(|s| s.name.clone()).collect();
                match first_public_in(None) {
                    Some(p) if !routed.is_empty() => vec![NatPlacement {
                        zone: p.zone.clone(),
                        subnet: p.name.clone(),
                        private: routed,
                    }],
                    _ => Vec::new(),
                }
            }
            NatGateways::PerZone => {
                let mut out: Vec<NatPlacement> = Vec::new();
                for s in private() {
                    if let Some(p) = out.iter_mut().find(|p| p.zone == s.zone) {
                        p.private.push(s.name.clone());
                    } else if let Some(host) = first_public_in(Some(&s.zone)) {
                        out.push(NatPlacement {
                            zone: s.zone.clone(),
                            subnet: host.name.clone(),
                            private: vec![s.name.clone()],
                        });
                    }
                }
                out
            }
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Subnet {
    pub name: String,
    pub zone: String,
    pub cidr: Ipv4Net,
    pub public: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Cluster {
    pub name: String,
    pub kind: ClusterKind,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum ClusterKind {
    Eks(EksCluster),
    /// Any cluster reachable by a kubeconfig context (None: the current one,
    /// or `MESH_KUBE_CONTEXT`).
    Existing {
        context: Option<String>,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EksCluster {
    pub version: String,
    pub network: String,
    /// Subnet names within `network`.
    pub subnets: Vec<String>,
    pub endpoint_public: bool,
    pub endpoint_private: bool,
    /// Use this IAM role instead of creating one.
    pub role_arn: Option<String>,
    pub node_groups: Vec<NodeGroup>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct NodeGroup {
    pub name: String,
    pub instance_types: Vec<String>,
    pub min: u32,
    pub max: u32,
    pub desired: u32,
    /// Subnet names within the cluster's network (default: the cluster's subnets).
    pub subnets: Vec<String>,
    pub disk_size: u32,
    pub labels: BTreeMap<String, String>,
    pub role_arn: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Registry {
    pub name: String,
    pub scan_on_push: bool,
    pub immutable_tags: bool,
    /// Lifecycle: keep only the last N images.
    pub keep_last: Option<u32>,
}

/// A secret given by reference, never by value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SecretRef {
    Env(String),
    File(PathBuf),
}

/// What a connection talks to, with the options only that kind has.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum ConnectionKind {
    Postgres {
        host: String,
        port: u16,
        sslmode: SslMode,
        /// CA certificates (PEM) that `verify-full` trusts; absolute.
        ca_file: Option<PathBuf>,
    },
    Snowflake {
        /// Account identifier (`orgname-account` or a locator).
        account: String,
        warehouse: Option<String>,
        schema: Option<String>,
        role: Option<String>,
        /// RSA private key (PEM, PKCS#8) for key-pair authentication.
        private_key: Option<SecretRef>,
        /// Endpoint override (private link, or a local server in tests);
        /// default `https://<account>.snowflakecomputing.com`.
        url: Option<String>,
    },
}

/// TLS towards PostgreSQL.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    #[default]
    Disable,
    Require,
    VerifyFull,
}

/// A database the services read datasets from (`[connection.NAME]`). An
/// environment overlay rebinds it (host, database, credentials) without the
/// services that use it changing.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Connection {
    pub name: String,
    pub kind: ConnectionKind,
    pub database: String,
    pub user: String,
    pub password: Option<SecretRef>,
    /// Connections each runtime keeps open for `live` datasets.
    pub pool_size: u32,
    /// Longest a query may run, in milliseconds.
    pub statement_timeout_ms: u64,
}

impl Connection {
    /// Where it points, for messages: no credentials.
    pub fn target(&self) -> String {
        match &self.kind {
            ConnectionKind::Postgres { host, port, .. } => {
                format!("postgresql://{}@{host}:{port}/{}", self.user, self.database)
            }
            ConnectionKind::Snowflake { account, url, .. } => match url {
                Some(url) => format!("snowflake {account} at {url}/{}", self.database),
                None => format!("snowflake {account}/{}", self.database),
            },
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Service {
    pub name: String,
    pub version: String,
    pub replicas: u32,
    pub autoscaling: Option<Autoscaling>,
    pub resources: Resources,
    pub datasets: BTreeMap<String, Dataset>,
    pub endpoints: BTreeMap<String, Endpoint>,
    pub api_keys: Vec<SecretRef>,
    /// `request_timeout`: how long a request may take before the runtime
    /// answers 504; `None`: the runtime's default (30 s).
    pub request_timeout_ms: Option<u64>,
    /// `access_log`: one JSON line per request on the runtime's stderr;
    /// `None`: the target's default (off locally, on in clusters).
    pub access_log: Option<bool>,
    /// `query_log`: one JSON line per prediction or lookup.
    pub query_log: Option<QueryLog>,
    /// Test queries of its endpoints (`[[service.S.endpoint.E.test]]`), in
    /// declaration order; `mesh test` sends them.
    pub tests: Vec<TestQuery>,
}

/// A service's query log: what was asked and answered.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct QueryLog {
    /// The file, on the local target (absolute); `None`: the target's
    /// default (a file in the service's state folder locally, the pods'
    /// stdout on a cluster).
    pub path: Option<PathBuf>,
    /// Fraction of the queries logged, 0 to 1.
    pub sample: f64,
    /// Fields whose values never appear in the log.
    pub redact: Vec<String>,
}

/// One test query: a request to an endpoint and what its answer must be.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TestQuery {
    pub service: String,
    pub endpoint: String,
    /// Unique within its endpoint.
    pub name: String,
    /// Whether the endpoint predicts (`predict`) or looks up (`lookup`).
    pub action: TestAction,
    /// The JSON body sent to the endpoint.
    pub request: serde_json::Value,
    /// The generation pinned (`X-Mesh-Generation`); the answer must name it.
    pub generation: Option<String>,
    pub expect: Expect,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TestAction {
    Predict,
    Lookup,
}

impl TestAction {
    pub fn as_str(self) -> &'static str {
        match self {
            TestAction::Predict => "predict",
            TestAction::Lookup => "lookup",
        }
    }
}

/// What a test query's answer must be. Every part set is checked.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Expect {
    /// The HTTP status (default 200).
    pub status: u16,
    /// The predicted class (prediction endpoints).
    pub prediction: Option<String>,
    /// Class → probability, each within `tolerance` (prediction endpoints).
    pub probas: BTreeMap<String, f64>,
    /// How far a probability may be from the expected one (prediction endpoints).
    pub tolerance: f64,
    /// Column → value of the looked-up row, compared exactly (lookup endpoints).
    pub fields: BTreeMap<String, serde_json::Value>,
    /// Another test of the same endpoint whose answer this one must equal:
    /// prediction and probabilities (within `tolerance`), or the row.
    pub same_as: Option<String>,
}

/// The tolerance of a probability when the test gives none.
pub const DEFAULT_TOLERANCE: f64 = 1e-6;

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Autoscaling {
    pub min: u32,
    pub max: u32,
    pub cpu_percent: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Resources {
    pub cpu: String,
    pub memory: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Duplicates {
    Error,
    Last,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DatasetSource {
    /// A file bundled with the service (absolute path, resolved from the stack file).
    File(PathBuf),
    /// A query on a `[connection]`.
    Sql { connection: String, query: String },
}

/// When a dataset's rows are read (`mode` in the stack).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "mode", rename_all = "lowercase")]
pub enum DatasetMode {
    /// Frozen into the bundle at apply: a file as it is, a query's result as
    /// a CSV file. Changes only with the next apply that rebuilds it.
    Bundle,
    /// Loaded into memory when the service starts; with `refresh`, reloaded
    /// on that schedule, a complete snapshot replacing the old one at once.
    Preload {
        refresh: Option<Duration>,
        /// Refreshes failing for this long make the dataset stale (still served).
        max_staleness: Option<Duration>,
    },
    /// Queried per key, optionally cached.
    Live { cache: Option<LiveCache> },
}

/// The cache of a `live` dataset or of a `lookup` enrichment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct LiveCache {
    pub ttl: Duration,
    pub max_entries: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Dataset {
    pub name: String,
    pub source: DatasetSource,
    pub mode: DatasetMode,
    pub key: String,
    pub duplicates: Duplicates,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Endpoint {
    Prediction {
        /// The model, or the generations side by side.
        models: Models,
        enrichments: Vec<Enrichment>,
    },
    Lookup {
        datasets: Vec<String>,
    },
}

impl Endpoint {
    /// Millicores the shadow generations of this endpoint may use for
    /// scoring (each its `cpu`, else [`DEFAULT_SHADOW_CPU_MILLIS`]); 0
    /// without shadows.
    pub fn shadow_cpu_millis(&self) -> u64 {
        match self {
            Endpoint::Prediction {
                models: Models::Generations { generations, .. },
                ..
            } => generations
                .iter()
                .filter(|g| g.weight.is_none())
                .map(|g| g.cpu_millis.unwrap_or(DEFAULT_SHADOW_CPU_MILLIS))
                .sum(),
            _ => 0,
        }
    }

    /// Every enrichment of a prediction endpoint: the endpoint's, then each
    /// generation's own, in declaration order (the order of
    /// `EndpointConfig::all_enrichments` in the runtime's config).
    pub fn all_enrichments(&self) -> Vec<&Enrichment> {
        match self {
            Endpoint::Prediction {
                models,
                enrichments,
            } => {
                let own = match models {
                    Models::One(_) => Vec::new(),
                    Models::Generations { generations, .. } => generations
                        .iter()
                        .flat_map(|g| g.enrichments.iter().flatten())
                        .collect(),
                };
                enrichments.iter().chain(own).collect()
            }
            Endpoint::Lookup { .. } => Vec::new(),
        }
    }
}

/// The models of a prediction endpoint.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Models {
    /// `model = "..."`: absolute path of the one ONNX model; answers name
    /// no generation.
    One(PathBuf),
    /// `[[service.S.endpoint.E.generation]]`: several models, traffic split
    /// between the serving ones, copies to the shadows.
    Generations {
        generations: Vec<Generation>,
        dispatch: Dispatch,
    },
}

impl Models {
    /// Every model file, with its generation's name (none for `One`).
    pub fn files(&self) -> Vec<(Option<&str>, &PathBuf)> {
        match self {
            Models::One(p) => vec![(None, p)],
            Models::Generations { generations, .. } => generations
                .iter()
                .map(|g| (Some(g.name.as_str()), &g.model))
                .collect(),
        }
    }
}

/// One model of an endpoint with generations.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Generation {
    pub name: String,
    /// Absolute path of its ONNX model.
    pub model: PathBuf,
    /// Percent of the traffic it serves; `None`: a shadow (scores a copy of
    /// the traffic, never answers).
    pub weight: Option<u32>,
    /// Its own `enrich`, in place of the endpoint's; `None`: the endpoint's.
    pub enrichments: Option<Vec<Enrichment>>,
    /// A shadow's `cpu`: the millicores its scoring may use (its thread's
    /// budget, and what a pod requests for it); `None`: the runtime's
    /// default, [`DEFAULT_SHADOW_CPU_MILLIS`].
    pub cpu_millis: Option<u64>,
}

/// A shadow's CPU when its generation gives none: the runtime's default
/// budget (`limits.shadow_cpu`, a quarter core).
pub const DEFAULT_SHADOW_CPU_MILLIS: u64 = 250;

/// Millicores of a Kubernetes CPU quantity: `"250m"`, `"0.5"`, `"2"`;
/// `None` when it is not one (or not a whole number of millicores).
pub fn cpu_millis(quantity: &str) -> Option<u64> {
    if let Some(m) = quantity.strip_suffix('m') {
        return if !m.is_empty() && m.bytes().all(|b| b.is_ascii_digit()) {
            m.parse().ok()
        } else {
            None
        };
    }
    let (whole, fraction) = quantity.split_once('.').unwrap_or((quantity, ""));
    let digits = |t: &str| t.bytes().all(|b| b.is_ascii_digit());
    if (whole.is_empty() && fraction.is_empty()) || !digits(whole) || !digits(fraction) {
        return None;
    }
    if fraction.len() > 3 && fraction[3..].bytes().any(|b| b != b'0') {
        return None;
    }
    let whole: u64 = if whole.is_empty() {
        0
    } else {
        whole.parse().ok()?
    };
    let fraction: u64 = format!("{:0<3}", &fraction[..fraction.len().min(3)])
        .parse()
        .ok()?;
    whole.checked_mul(1000)?.checked_add(fraction)
}

/// How a request picks its serving generation.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Dispatch {
    /// The weights as probabilities, request by request.
    #[default]
    Random,
    /// A stable hash of this request feature: a key always gets the same
    /// generation.
    Key(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnMissing {
    Error,
    Null,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EnrichmentSource {
    /// A dataset of the same service.
    Dataset(String),
    /// Another service's lookup endpoint.
    Lookup { service: String, endpoint: String },
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Enrichment {
    pub source: EnrichmentSource,
    pub key: String,
    /// Empty: every column of the looked-up row.
    pub columns: Vec<String>,
    pub on_missing: OnMissing,
    /// Opt-in cache of a `lookup` enrichment's rows (never on a dataset).
    pub cache: Option<LiveCache>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "type")]
pub enum ExposeKind {
    ClusterIP {
        port: u16,
    },
    NodePort {
        port: u16,
        node_port: Option<u16>,
    },
    LoadBalancer {
        port: u16,
    },
    Ingress {
        port: u16,
        host: String,
        path: String,
    },
}

/// Who may call an exposed service.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Caller {
    Service(String),
    Cidr(Ipv4Net),
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Expose {
    pub name: String,
    pub service: String,
    pub kind: ExposeKind,
    /// Empty: nobody but the cluster's own ingress path (deny by default).
    pub allow: Vec<Caller>,
    /// TLS at the edge (`tls = { ... }`); checked against the type and the
    /// environment's target.
    pub tls: Option<Tls>,
}

impl Expose {
    /// The CIDRs of `allow`: the source addresses admitted at the edge.
    pub fn cidrs(&self) -> Vec<Ipv4Net> {
        self.allow
            .iter()
            .filter_map(|c| match c {
                Caller::Cidr(n) => Some(*n),
                Caller::Service(_) => None,
            })
            .collect()
    }
}

/// Where an exposure's TLS comes from.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Tls {
    /// `{ secret = "NAME" }`: a `kubernetes.io/tls` Secret of the namespace
    /// (an Ingress on a cluster).
    Secret(String),
    /// `{ issuer = "NAME" }`: a cert-manager ClusterIssuer issues the
    /// certificate into a Secret mesh names (an Ingress on a cluster).
    Issuer(String),
    /// `{ certificate_arn = "..." }`: an ACM certificate on the AWS load
    /// balancer (a LoadBalancer on an `aws` environment).
    CertificateArn(String),
    /// `{ self_signed = true }`: a certificate mesh generates at apply, the
    /// runtime serving HTTPS itself (the local target).
    SelfSigned,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_quantities_are_millicores() {
        for (q, m) in [
            ("250m", Some(250)),
            ("0.5", Some(500)),
            (".25", Some(250)),
            ("2", Some(2000)),
            ("1.5", Some(1500)),
            ("0.1250", Some(125)),
            ("0m", Some(0)),
            ("0.0005", None),
            ("m", None),
            ("", None),
            (".", None),
            ("-1", None),
            ("1e3", None),
            ("250 m", None),
            ("a quarter", None),
        ] {
            assert_eq!(cpu_millis(q), m, "{q:?}");
        }
    }

    fn network(nat: NatGateways, subnets: &[(&str, &str, bool)]) -> Network {
        Network {
            name: "main".into(),
            cidr: "10.0.0.0/16".parse().expect("cidr"),
            subnets: subnets
                .iter()
                .enumerate()
                .map(|(i, (name, zone, public))| Subnet {
                    name: (*name).into(),
                    zone: (*zone).into(),
                    cidr: format!("10.0.{i}.0/24").parse().expect("cidr"),
                    public: *public,
                })
                .collect(),
            tags: BTreeMap::new(),
            nat_gateway: nat,
        }
    }

    fn placement(zone: &str, subnet: &str, private: &[&str]) -> NatPlacement {
        NatPlacement {
            zone: zone.into(),
            subnet: subnet.into(),
            private: private.iter().map(|s| (*s).into()).collect(),
        }
    }

    const THREE_ZONES: &[(&str, &str, bool)] = &[
        ("private-b", "b", false),
        ("public-b", "b", true),
        ("public-a", "a", true),
        ("public-a2", "a", true),
        ("private-a", "a", false),
        ("private-a2", "a", false),
        ("public-c", "c", true),
    ];

    #[test]
    fn single_puts_one_nat_gateway_in_the_first_public_subnet_for_every_private_one() {
        let n = network(NatGateways::Single, THREE_ZONES);
        assert_eq!(
            n.nat_placements(),
            [placement(
                "b",
                "public-b",
                &["private-b", "private-a", "private-a2"]
            )]
        );
    }

    #[test]
    fn per_zone_routes_each_private_subnet_through_its_zone() {
        let n = network(NatGateways::PerZone, THREE_ZONES);
        // Zone c has no private subnet: no NAT gateway there.
        assert_eq!(
            n.nat_placements(),
            [
                placement("b", "public-b", &["private-b"]),
                placement("a", "public-a", &["private-a", "private-a2"]),
            ]
        );
        // A zone without a public subnet (rejected by validation) is left out.
        let n = network(
            NatGateways::PerZone,
            &[
                ("public-a", "a", true),
                ("private-a", "a", false),
                ("private-b", "b", false),
            ],
        );
        assert_eq!(
            n.nat_placements(),
            [placement("a", "public-a", &["private-a"])]
        );
    }

    #[test]
    fn no_nat_gateway_without_private_subnets_or_when_none() {
        let public_only = [("public-a", "a", true), ("public-b", "b", true)];
        for nat in [NatGateways::Single, NatGateways::PerZone, NatGateways::None] {
            assert!(network(nat, &public_only).nat_placements().is_empty());
        }
        assert!(
            network(NatGateways::None, THREE_ZONES)
                .nat_placements()
                .is_empty()
        );
    }
}
