//! The Kubernetes kinds mesh manages, their API coordinates, and the
//! ownership marks every object carries.

use std::collections::BTreeMap;

use kube::api::ApiResource;
use kube::core::GroupVersionKind;

/// Label every object mesh manages carries.
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// Its value.
pub const MANAGER: &str = "mesh";
/// The stack and environment an object belongs to.
pub const LABEL_STACK: &str = "mesh.dev/stack";
pub const LABEL_ENV: &str = "mesh.dev/env";
/// The mesh service a pod (and its selectors) belongs to.
pub const LABEL_SERVICE: &str = "mesh.dev/service";
/// The stack address of an object (an annotation: addresses are not valid label values).
pub const ANNOTATION_ADDRESS: &str = "mesh.dev/address";
/// Digest of a Secret's content (on the Secret and on the pod template that uses it).
pub const ANNOTATION_SECRET_HASH: &str = "mesh.dev/secret-hash";
/// On a Secret whose values mesh makes at apply (caller keys, verifiers,
/// the digest key): its content is neither planned nor compared.
pub const ANNOTATION_GENERATED: &str = "mesh.dev/generated";
/// Digest of the service config (on the pod template, so a config change rolls the pods).
pub const ANNOTATION_CONFIG_HASH: &str = "mesh.dev/config-hash";
/// On a namespace that existed before mesh applied the stack: destroy gives
/// it back (removes mesh's labels and annotations) instead of deleting it.
pub const ANNOTATION_ADOPTED: &str = "mesh.dev/adopted";

/// The edge annotations mesh sets from an exposure's `allow` CIDRs and
/// `tls` (read by the controllers named, ignored by others):
/// ingress-nginx's source ranges of an Ingress,
pub const ANNOTATION_NGINX_SOURCE_RANGE: &str =
    "nginx.ingress.kubernetes.io/whitelist-source-range";
/// the AWS Load Balancer Controller's (an Ingress on an `aws` environment),
pub const ANNOTATION_ALB_INBOUND_CIDRS: &str = "alb.ingress.kubernetes.io/inbound-cidrs";
/// cert-manager's issuer of an Ingress's certificate,
pub const ANNOTATION_CLUSTER_ISSUER: &str = "cert-manager.io/cluster-issuer";
/// and the AWS cloud provider's TLS listener of a LoadBalancer Service.
pub const ANNOTATION_AWS_SSL_CERT: &str = "service.beta.kubernetes.io/aws-load-balancer-ssl-cert";
pub const ANNOTATION_AWS_SSL_PORTS: &str = "service.beta.kubernetes.io/aws-load-balancer-ssl-ports";
/// Every one of them: what an object's `edge_annotations` attribute holds.
pub const EDGE_ANNOTATIONS: &[&str] = &[
    ANNOTATION_NGINX_SOURCE_RANGE,
    ANNOTATION_ALB_INBOUND_CIDRS,
    ANNOTATION_CLUSTER_ISSUER,
    ANNOTATION_AWS_SSL_CERT,
    ANNOTATION_AWS_SSL_PORTS,
];

/// One kind of object mesh manages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Namespace,
    ConfigMap,
    Secret,
    Deployment,
    HorizontalPodAutoscaler,
    Service,
    Ingress,
    NetworkPolicy,
}

impl Kind {
    /// Every kind, in the order objects are observed.
    pub const ALL: [Kind; 8] = [
        Kind::Namespace,
        Kind::ConfigMap,
        Kind::Secret,
        Kind::Deployment,
        Kind::HorizontalPodAutoscaler,
        Kind::Service,
        Kind::Ingress,
        Kind::NetworkPolicy,
    ];

    /// The resource kind shown in plans (`Desired::kind`).
    pub fn resource_kind(self) -> &'static str {
        match self {
            Kind::Namespace => "k8s_namespace",
            Kind::ConfigMap => "k8s_configmap",
            Kind::Secret => "k8s_secret",
            Kind::Deployment => "k8s_deployment",
            Kind::HorizontalPodAutoscaler => "k8s_hpa",
            Kind::Service => "k8s_service",
            Kind::Ingress => "k8s_ingress",
            Kind::NetworkPolicy => "k8s_network_policy",
        }
    }

    pub fn from_resource_kind(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.resource_kind() == s)
    }

    /// (group, version, kind, plural)
    fn coordinates(self) -> (&'static str, &'static str, &'static str, &'static str) {
        match self {
            Kind::Namespace => ("", "v1", "Namespace", "namespaces"),
            Kind::ConfigMap => ("", "v1", "ConfigMap", "configmaps"),
            Kind::Secret => ("", "v1", "Secret", "secrets"),
            Kind::Deployment => ("apps", "v1", "Deployment", "deployments"),
            Kind::HorizontalPodAutoscaler => (
                "autoscaling",
                "v2",
                "HorizontalPodAutoscaler",
                "horizontalpodautoscalers",
            ),
            Kind::Service => ("", "v1", "Service", "services"),
            Kind::Ingress => ("networking.k8s.io", "v1", "Ingress", "ingresses"),
            Kind::NetworkPolicy => (
                "networking.k8s.io",
                "v1",
                "NetworkPolicy",
                "networkpolicies",
            ),
        }
    }

    /// `apps/v1`, `v1`, ...
    pub fn api_version(self) -> String {
        let (g, v, _, _) = self.coordinates();
        if g.is_empty() {
            v.to_owned()
        } else {
            format!("{g}/{v}")
        }
    }

    /// `Deployment`, ...
    pub fn kind(self) -> &'static str {
        self.coordinates().2
    }

    pub fn plural(self) -> &'static str {
        self.coordinates().3
    }

    pub fn namespaced(self) -> bool {
        self != Kind::Namespace
    }

    pub fn api_resource(self) -> ApiResource {
        let (g, v, k, p) = self.coordinates();
        ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(g, v, k), p)
    }
}

/// The pod resource (read to explain a failed rollout).
pub fn pod_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("", "v1", "Pod"), "pods")
}

/// The labels every object of a stack and environment carries.
pub fn ownership_labels(stack: &str, env: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (MANAGED_BY.to_owned(), MANAGER.to_owned()),
        (LABEL_STACK.to_owned(), stack.to_owned()),
        (LABEL_ENV.to_owned(), env.to_owned()),
    ])
}

/// The label selector that finds them.
pub fn ownership_selector(stack: &str, env: &str) -> String {
    format!("{MANAGED_BY}={MANAGER},{LABEL_STACK}={stack},{LABEL_ENV}={env}")
}

/// The labels of a service's pods (also its Deployment's selector, which is immutable).
pub fn pod_labels(stack: &str, env: &str, service: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_STACK.to_owned(), stack.to_owned()),
        (LABEL_ENV.to_owned(), env.to_owned()),
        (LABEL_SERVICE.to_owned(), service.to_owned()),
    ])
}
