//! The resolved, validated stack for one environment: modules expanded,
//! environment overrides merged, every reference checked. Providers read
//! only these types; the raw spanned schema never leaves `stack`.

use std::collections::BTreeMap;
use std::path::PathBuf;

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
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Network {
    pub name: String,
    pub cidr: Ipv4Net,
    pub subnets: Vec<Subnet>,
    pub tags: BTreeMap<String, String>,
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

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ConnectionKind {
    Postgres,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Connection {
    pub name: String,
    pub kind: ConnectionKind,
    pub host: String,
    pub port: u16,
    pub database: String,
    pub user: String,
    pub password: Option<SecretRef>,
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
}

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

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SqlMode {
    Preload,
    Live,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DatasetSource {
    /// A file bundled with the service (absolute path, resolved from the stack file).
    File(PathBuf),
    Sql {
        connection: String,
        query: String,
        mode: SqlMode,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Dataset {
    pub name: String,
    pub source: DatasetSource,
    pub key: String,
    pub duplicates: Duplicates,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Endpoint {
    Prediction {
        /// Absolute path of the ONNX model.
        model: PathBuf,
        enrichments: Vec<Enrichment>,
    },
    Lookup {
        datasets: Vec<String>,
    },
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
}
