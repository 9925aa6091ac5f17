//! The double through a real `kube::Client` over HTTP.

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret, Service};
use k8s_openapi::api::networking::v1::{Ingress, NetworkPolicy};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::core::Status;
use kube::{Client, Discovery};
use kube_double::{KubeDouble, Rollout};
use serde_json::{Value, json};
use std::time::Duration;

fn api_err(e: kube::Error) -> Box<Status> {
    match e {
        kube::Error::Api(s) => s,
        other => panic!("expected an API error, got {other:?}"),
    }
}

fn rv<K: kube::Resource>(o: &K) -> String {
    o.meta().resource_version.clone().expect("resourceVersion")
}

fn cm(name: &str, data: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": data})
}

fn deployment(name: &str, image: &str, replicas: i32) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/managed-by": "mesh", "app": name}},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "runtime", "image": image,
                    "ports": [{"containerPort": 8080, "name": "http"}],
                    "readinessProbe": {"httpGet": {"path": "/readyz", "port": "http"}}}]}
            }
        }
    })
}

async fn apply<K>(api: &Api<K>, name: &str, manager: &str, obj: &Value) -> kube::Result<K>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    api.patch(name, &PatchParams::apply(manager), &Patch::Apply(obj))
        .await
}

async fn raw(
    client: &Client,
    method: &str,
    path: &str,
    ct: &str,
    body: Value,
) -> Result<Value, Box<Status>> {
    let req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", ct)
        .body(serde_json::to_vec(&body).unwrap())
        .unwrap();
    client.request::<Value>(req).await.map_err(api_err)
}

async fn setup() -> (KubeDouble, Client) {
    let d = KubeDouble::start().await;
    let c = d.client();
    (d, c)
}

#[tokio::test]
async fn discovery_lists_every_kind() {
    let (d, client) = setup().await;
    let v = client.apiserver_version().await.unwrap();
    assert_eq!(v.major, "1");
    let disc = Discovery::new(client.clone()).run().await.unwrap();
    let mut kinds: Vec<String> = disc
        .groups()
        .flat_map(|g| g.recommended_kind_names_or_resources())
        .collect();
    kinds.sort();
    for k in [
        "Deployment",
        "ConfigMap",
        "HorizontalPodAutoscaler",
        "Ingress",
        "NetworkPolicy",
        "Service",
        "Secret",
        "ReplicaSet",
        "Pod",
        "Namespace",
        "ServiceAccount",
    ] {
        assert!(kinds.iter().any(|x| x == k), "{k} missing from {kinds:?}");
    }
    let agg = Discovery::new(client).run_aggregated().await.unwrap();
    assert!(agg.groups().any(|g| g.name() == "apps"));
    assert!(d.request_count() > 5);
}

trait Names {
    fn recommended_kind_names_or_resources(&self) -> Vec<String>;
}
impl Names for kube::discovery::ApiGroup {
    fn recommended_kind_names_or_resources(&self) -> Vec<String> {
        self.recommended_resources()
            .into_iter()
            .map(|(ar, _)| ar.kind)
            .collect()
    }
}

#[tokio::test]
async fn apply_creates_updates_and_is_a_noop_when_unchanged() {
    let (d, client) = setup().await;
    let cms: Api<ConfigMap> = Api::namespaced(client, "default");
    let created = apply(&cms, "cfg", "mesh", &cm("cfg", json!({"a": "1"})))
        .await
        .unwrap();
    let rv1 = rv(&created);
    assert!(created.metadata.uid.is_some() && created.metadata.creation_timestamp.is_some());
    let mf = created.metadata.managed_fields.clone().unwrap();
    assert_eq!(mf.len(), 1);
    assert_eq!(mf[0].manager.as_deref(), Some("mesh"));
    assert_eq!(mf[0].operation.as_deref(), Some("Apply"));
    let fields = serde_json::to_value(&mf[0].fields_v1).unwrap();
    assert_eq!(fields, json!({"f:data": {".": {}, "f:a": {}}}));

    let again = apply(&cms, "cfg", "mesh", &cm("cfg", json!({"a": "1"})))
        .await
        .unwrap();
    assert_eq!(
        rv(&again),
        rv1,
        "identical apply must not bump resourceVersion"
    );
    assert_eq!(
        again.metadata.managed_fields,
        created.metadata.managed_fields
    );

    let updated = apply(&cms, "cfg", "mesh", &cm("cfg", json!({"a": "2"})))
        .await
        .unwrap();
    assert!(rv(&updated).parse::<u64>().unwrap() > rv1.parse::<u64>().unwrap());
    assert_eq!(updated.data.unwrap()["a"], "2");
    assert_eq!(
        d.object("v1", "ConfigMap", "default", "cfg").unwrap()["data"]["a"],
        "2"
    );
}

#[tokio::test]
async fn apply_requires_a_field_manager_and_json() {
    let (_d, client) = setup().await;
    let e = raw(
        &client,
        "PATCH",
        "/api/v1/namespaces/default/configmaps/x",
        "application/apply-patch+yaml",
        cm("x", json!({})),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code, 422);
    assert!(
        e.message.contains("fieldManager: Required value"),
        "{}",
        e.message
    );
    let e = raw(
        &client,
        "PATCH",
        "/api/v1/namespaces/default/configmaps/x",
        "text/plain",
        json!({}),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code, 415);
    let bad = http::Request::builder()
        .method("PATCH")
        .uri("/api/v1/namespaces/default/configmaps/x?fieldManager=m")
        .header("content-type", "application/apply-patch+yaml")
        .body(b"kind: ConfigMap\n".to_vec())
        .unwrap();
    let e = api_err(client.request::<Value>(bad).await.unwrap_err());
    assert_eq!(e.code, 400);
}

#[tokio::test]
async fn apply_conflicts_between_managers_and_force_transfers_ownership() {
    let (_d, client) = setup().await;
    let deps: Api<Deployment> = Api::namespaced(client, "default");
    apply(&deps, "web", "mesh", &deployment("web", "img:1", 2))
        .await
        .unwrap();
    let other = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"}, "spec": {"replicas": 5}});
    let e = api_err(apply(&deps, "web", "ops", &other).await.unwrap_err());
    assert_eq!((e.code, e.reason.as_str()), (409, "Conflict"));
    assert!(
        e.message.contains("conflict with \"mesh\"") && e.message.contains(".spec.replicas"),
        "{}",
        e.message
    );
    let causes = e.details.as_ref().unwrap().causes.clone();
    assert_eq!(causes[0].field, ".spec.replicas");

    // Same value: shared ownership, no conflict.
    let same = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"}, "spec": {"replicas": 2}});
    apply(&deps, "web", "ops", &same).await.unwrap();

    let forced = deps
        .patch(
            "web",
            &PatchParams::apply("ops").force(),
            &Patch::Apply(&other),
        )
        .await
        .unwrap();
    assert_eq!(forced.spec.replicas, Some(5));
    let mesh_fields = forced
        .metadata
        .managed_fields
        .unwrap()
        .into_iter()
        .find(|m| m.manager.as_deref() == Some("mesh"))
        .unwrap();
    assert!(
        !serde_json::to_string(&mesh_fields.fields_v1)
            .unwrap()
            .contains("f:replicas"),
        "ownership moved to ops"
    );

    // mesh now conflicts with ops, unless it forces too.
    let e = api_err(
        apply(&deps, "web", "mesh", &deployment("web", "img:1", 2))
            .await
            .unwrap_err(),
    );
    assert!(e.message.contains("conflict with \"ops\""), "{}", e.message);
    let back = deps
        .patch(
            "web",
            &PatchParams::apply("mesh").force(),
            &Patch::Apply(&deployment("web", "img:1", 2)),
        )
        .await
        .unwrap();
    assert_eq!(back.spec.replicas, Some(2));
}

#[tokio::test]
async fn non_apply_writers_own_what_they_change() {
    let (_d, client) = setup().await;
    let deps: Api<Deployment> = Api::namespaced(client, "default");
    apply(&deps, "web", "mesh", &deployment("web", "img:1", 2))
        .await
        .unwrap();
    let pp = PatchParams {
        field_manager: Some("kubectl-edit".into()),
        ..Default::default()
    };
    deps.patch("web", &pp, &Patch::Merge(json!({"spec": {"replicas": 4}})))
        .await
        .unwrap();
    let e = api_err(
        apply(&deps, "web", "mesh", &deployment("web", "img:1", 2))
            .await
            .unwrap_err(),
    );
    assert!(
        e.message.contains("conflict with \"kubectl-edit\""),
        "{}",
        e.message
    );
    // Strategic merge patch merges containers by name.
    let sp = Patch::Strategic(
        json!({"spec": {"template": {"spec": {"containers": [{"name": "runtime", "image": "img:2"}]}}}}),
    );
    let d = deps.patch("web", &pp, &sp).await.unwrap();
    let c = &d.spec.template.spec.unwrap().containers[0];
    assert_eq!(c.image.as_deref(), Some("img:2"));
    assert!(c.readiness_probe.is_some(), "other container fields kept");
}

#[tokio::test]
async fn apply_removes_fields_the_manager_stopped_applying() {
    let (_d, client) = setup().await;
    let cms: Api<ConfigMap> = Api::namespaced(client, "default");
    let mut first = cm("cfg", json!({"a": "1", "b": "2"}));
    first["metadata"]["labels"] = json!({"tier": "x"});
    apply(&cms, "cfg", "mesh", &first).await.unwrap();
    apply(&cms, "cfg", "other", &cm("cfg", json!({"c": "3"})))
        .await
        .unwrap();
    let after = apply(&cms, "cfg", "mesh", &cm("cfg", json!({"a": "1"})))
        .await
        .unwrap();
    let data = after.data.unwrap();
    assert_eq!(
        data.keys().collect::<Vec<_>>(),
        vec!["a", "c"],
        "b removed, c (owned by other) kept"
    );
    assert!(after.metadata.labels.unwrap_or_default().is_empty());
}

#[tokio::test]
async fn stale_resource_version_conflicts() {
    let (_d, client) = setup().await;
    let cms: Api<ConfigMap> = Api::namespaced(client, "default");
    let pp = PostParams::default();
    let created = cms
        .create(
            &pp,
            &serde_json::from_value(cm("c", json!({"k": "v"}))).unwrap(),
        )
        .await
        .unwrap();
    let mut fresh = created.clone();
    fresh.data = Some([("k".to_string(), "w".to_string())].into());
    let replaced = cms.replace("c", &pp, &fresh).await.unwrap();
    assert_ne!(rv(&replaced), rv(&created));
    let mut stale = created.clone();
    stale.data = Some([("k".to_string(), "x".to_string())].into());
    let e = api_err(cms.replace("c", &pp, &stale).await.unwrap_err());
    assert_eq!((e.code, e.reason.as_str()), (409, "Conflict"));
    assert!(e.message.contains("the object has been modified"));
    // A merge patch carrying a stale resourceVersion is a precondition too.
    let e = api_err(
        cms.patch(
            "c",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"resourceVersion": rv(&created)}, "data": {"k": "y"}}),
            ),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(e.code, 409);
}

#[tokio::test]
async fn not_found_and_already_exists() {
    let (_d, client) = setup().await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let e = api_err(cms.get("nope").await.unwrap_err());
    assert_eq!((e.code, e.reason.as_str()), (404, "NotFound"));
    assert_eq!(e.message, "configmaps \"nope\" not found");
    assert!(cms.get_opt("nope").await.unwrap().is_none());
    let e = api_err(
        cms.delete("nope", &DeleteParams::default())
            .await
            .unwrap_err(),
    );
    assert_eq!(e.code, 404);
    let deps: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let e = api_err(deps.get("nope").await.unwrap_err());
    assert_eq!(e.message, "deployments.apps \"nope\" not found");

    let ghost: Api<ConfigMap> = Api::namespaced(client.clone(), "ghost");
    let e = api_err(
        apply(&ghost, "c", "mesh", &cm("c", json!({})))
            .await
            .unwrap_err(),
    );
    assert_eq!(e.code, 404);
    assert_eq!(e.message, "namespaces \"ghost\" not found");

    let obj: ConfigMap = serde_json::from_value(cm("dup", json!({}))).unwrap();
    cms.create(&PostParams::default(), &obj).await.unwrap();
    let e = api_err(cms.create(&PostParams::default(), &obj).await.unwrap_err());
    assert_eq!((e.code, e.reason.as_str()), (409, "AlreadyExists"));

    let e = raw(
        &client,
        "GET",
        "/apis/nothing.example.com/v1/things",
        "application/json",
        json!(null),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code, 404);
    let e = raw(
        &client,
        "POST",
        "/api/v1/namespaces/default/pods",
        "application/json",
        json!({"metadata": {"name": "p"}}),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code, 405);
    let e = raw(
        &client,
        "GET",
        "/api/v1/namespaces/default/configmaps?watch=true",
        "application/json",
        json!(null),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code, 405);
}

/// `POST /api/v1/namespaces` is a create (3 path segments, like the
/// discovery document `/apis/G/V`, but a collection); discovery stays read-only.
#[tokio::test]
async fn namespaces_are_created_by_post_and_discovery_refuses_writes() {
    let (_d, client) = setup().await;
    let nss: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace =
        serde_json::from_value(json!({"metadata": {"name": "made-by-post", "labels": {"a": "b"}}}))
            .unwrap();
    let made = nss.create(&PostParams::default(), &ns).await.unwrap();
    assert!(made.metadata.uid.is_some());
    assert!(made.metadata.resource_version.is_some());
    let e = nss.create(&PostParams::default(), &ns).await.unwrap_err();
    assert!(
        matches!(e, kube::Error::Api(ref s) if s.code == 409),
        "{e:?}"
    );
    for path in ["/api/v1", "/apis/apps/v1"] {
        let e = raw(&client, "POST", path, "application/json", json!({}))
            .await
            .unwrap_err();
        assert_eq!(e.code, 405, "{path}");
    }
}

#[tokio::test]
async fn label_and_field_selectors() {
    let (_d, client) = setup().await;
    let nss: Api<Namespace> = Api::all(client.clone());
    apply(
        &nss,
        "team",
        "mesh",
        &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team"}}),
    )
    .await
    .unwrap();
    let mk = |name: &str, labels: Value| {
        let mut c = cm(name, json!({}));
        c["metadata"]["labels"] = labels;
        c
    };
    let def: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let team: Api<ConfigMap> = Api::namespaced(client.clone(), "team");
    apply(
        &def,
        "a",
        "mesh",
        &mk(
            "a",
            json!({"app.kubernetes.io/managed-by": "mesh", "env": "dev"}),
        ),
    )
    .await
    .unwrap();
    apply(
        &def,
        "b",
        "mesh",
        &mk(
            "b",
            json!({"app.kubernetes.io/managed-by": "mesh", "env": "prod"}),
        ),
    )
    .await
    .unwrap();
    apply(
        &team,
        "c",
        "mesh",
        &mk("c", json!({"app.kubernetes.io/managed-by": "mesh"})),
    )
    .await
    .unwrap();
    apply(&def, "d", "mesh", &mk("d", json!({"env": "prod"})))
        .await
        .unwrap();

    let all: Api<ConfigMap> = Api::all(client.clone());
    let names = |l: kube::core::ObjectList<ConfigMap>| {
        let mut v: Vec<String> = l
            .items
            .into_iter()
            .map(|c| c.metadata.name.unwrap())
            .collect();
        v.sort();
        v
    };
    let q = |s: &str| ListParams::default().labels(s);
    assert_eq!(
        names(
            all.list(&q("app.kubernetes.io/managed-by=mesh"))
                .await
                .unwrap()
        ),
        ["a", "b", "c"]
    );
    assert_eq!(
        names(
            def.list(&q("app.kubernetes.io/managed-by=mesh"))
                .await
                .unwrap()
        ),
        ["a", "b"]
    );
    assert_eq!(names(def.list(&q("env!=prod,env")).await.unwrap()), ["a"]);
    assert_eq!(
        names(all.list(&q("env in (prod,qa)")).await.unwrap()),
        ["b", "d"]
    );
    assert_eq!(
        names(all.list(&q("env notin (prod)")).await.unwrap()),
        ["a", "c"]
    );
    assert_eq!(names(all.list(&q("!env")).await.unwrap()), ["c"]);
    assert_eq!(
        names(
            all.list(&ListParams::default().fields("metadata.name=b"))
                .await
                .unwrap()
        ),
        ["b"]
    );
    assert_eq!(
        names(
            all.list(&ListParams::default().fields("metadata.namespace=team"))
                .await
                .unwrap()
        ),
        ["c"]
    );
    let e = api_err(all.list(&q("env in prod")).await.unwrap_err());
    assert_eq!(e.code, 400);
    let e = api_err(
        all.list(&ListParams::default().fields("data.x=1"))
            .await
            .unwrap_err(),
    );
    assert_eq!(e.code, 400);
    // Pagination.
    let page = all
        .list(
            &ListParams::default()
                .labels("app.kubernetes.io/managed-by=mesh")
                .limit(2),
        )
        .await
        .unwrap();
    assert_eq!(page.items.len(), 2);
    let token = page.metadata.continue_.clone().unwrap();
    let rest = all
        .list(
            &ListParams::default()
                .labels("app.kubernetes.io/managed-by=mesh")
                .limit(2)
                .continue_token(&token),
        )
        .await
        .unwrap();
    assert_eq!(rest.items.len(), 1);
}

fn service(name: &str, ty: &str, node_port: Option<i64>) -> Value {
    let mut port = json!({"name": "http", "port": 80, "targetPort": 8080});
    if let Some(n) = node_port {
        port["nodePort"] = json!(n);
    }
    json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
           "spec": {"type": ty, "selector": {"app": name}, "ports": [port]}})
}

#[tokio::test]
async fn node_ports_are_allocated_conflicts_rejected_and_released() {
    let (_d, client) = setup().await;
    let svcs: Api<Service> = Api::namespaced(client, "default");
    let a = apply(&svcs, "a", "mesh", &service("a", "NodePort", None))
        .await
        .unwrap();
    let spec = a.spec.clone().unwrap();
    let np = spec.ports.as_ref().unwrap()[0].node_port.unwrap();
    assert!((30000..=32767).contains(&np));
    assert!(spec.cluster_ip.as_deref().unwrap().starts_with("10."));
    assert_eq!(spec.cluster_ips.unwrap().len(), 1);
    assert_eq!(spec.session_affinity.as_deref(), Some("None"));
    assert_eq!(spec.external_traffic_policy.as_deref(), Some("Cluster"));
    assert_eq!(
        spec.ports.as_ref().unwrap()[0].protocol.as_deref(),
        Some("TCP")
    );
    // Re-applying without nodePort keeps the allocation and is a no-op.
    let again = apply(&svcs, "a", "mesh", &service("a", "NodePort", None))
        .await
        .unwrap();
    assert_eq!(rv(&again), rv(&a));

    let e = api_err(
        apply(
            &svcs,
            "b",
            "mesh",
            &service("b", "NodePort", Some(np as i64)),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!((e.code, e.reason.as_str()), (422, "Invalid"));
    let cause = &e.details.as_ref().unwrap().causes[0];
    assert_eq!(cause.field, "spec.ports[0].nodePort");
    assert!(
        cause.message.contains("provided port is already allocated"),
        "{}",
        cause.message
    );
    let e = api_err(
        apply(&svcs, "b", "mesh", &service("b", "NodePort", Some(80)))
            .await
            .unwrap_err(),
    );
    assert!(e.message.contains("30000-32767"), "{}", e.message);
    assert!(
        svcs.get_opt("b").await.unwrap().is_none(),
        "rejected create stores nothing"
    );

    // Changing type back to ClusterIP releases the port.
    let c = apply(&svcs, "a", "mesh", &service("a", "ClusterIP", None))
        .await
        .unwrap();
    assert!(c.spec.unwrap().ports.unwrap()[0].node_port.is_none());
    apply(
        &svcs,
        "b",
        "mesh",
        &service("b", "NodePort", Some(np as i64)),
    )
    .await
    .unwrap();
    // Deleting releases it too.
    svcs.delete("b", &DeleteParams::default()).await.unwrap();
    let d = apply(
        &svcs,
        "d",
        "mesh",
        &service("d", "NodePort", Some(np as i64)),
    )
    .await
    .unwrap();
    assert_eq!(d.spec.unwrap().ports.unwrap()[0].node_port, Some(np));
}

#[tokio::test]
async fn load_balancer_gets_an_ingress_hostname() {
    let (d, client) = setup().await;
    d.set_load_balancer_delay(Duration::from_secs(30));
    let svcs: Api<Service> = Api::namespaced(client, "default");
    let lb = apply(&svcs, "lb", "mesh", &service("lb", "LoadBalancer", None))
        .await
        .unwrap();
    assert!(lb.spec.unwrap().ports.unwrap()[0].node_port.is_some());
    let pending = svcs.get("lb").await.unwrap();
    assert!(
        pending
            .status
            .unwrap()
            .load_balancer
            .unwrap()
            .ingress
            .is_none()
    );
    d.advance_clock(Duration::from_secs(31));
    let ready = svcs.get("lb").await.unwrap();
    let ing = ready
        .status
        .unwrap()
        .load_balancer
        .unwrap()
        .ingress
        .unwrap();
    assert!(ing[0].hostname.as_deref().unwrap().contains("lb"));

    // The service controller's finalizer holds a deleted LoadBalancer Service
    // until its cloud load balancer is gone.
    let fins = svcs
        .get("lb")
        .await
        .unwrap()
        .metadata
        .finalizers
        .unwrap_or_default();
    assert_eq!(fins, ["service.kubernetes.io/load-balancer-cleanup"]);
    svcs.delete("lb", &DeleteParams::default()).await.unwrap();
    let going = svcs.get("lb").await.unwrap();
    assert!(going.metadata.deletion_timestamp.is_some());
    d.advance_clock(Duration::from_secs(31));
    assert!(svcs.get_opt("lb").await.unwrap().is_none());
}

#[tokio::test]
async fn a_service_that_stops_being_a_load_balancer_drops_the_finalizer() {
    let (_d, client) = setup().await;
    let svcs: Api<Service> = Api::namespaced(client, "default");
    apply(&svcs, "lb", "mesh", &service("lb", "LoadBalancer", None))
        .await
        .unwrap();
    assert!(svcs.get("lb").await.unwrap().metadata.finalizers.is_some());
    apply(&svcs, "lb", "mesh", &service("lb", "ClusterIP", None))
        .await
        .unwrap();
    let s = svcs.get("lb").await.unwrap();
    assert!(
        s.metadata.finalizers.is_none(),
        "{:?}",
        s.metadata.finalizers
    );
    svcs.delete("lb", &DeleteParams::default()).await.unwrap();
    assert!(
        svcs.get_opt("lb").await.unwrap().is_none(),
        "deleted at once"
    );
}

#[tokio::test]
async fn secret_string_data_is_folded_into_data() {
    let (_d, client) = setup().await;
    let secrets: Api<Secret> = Api::namespaced(client, "default");
    let s = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "db"}, "stringData": {"password": "hunter2"}});
    let created = apply(&secrets, "db", "mesh", &s).await.unwrap();
    assert_eq!(created.type_.as_deref(), Some("Opaque"));
    assert!(created.string_data.is_none());
    assert_eq!(created.data.unwrap()["password"].0, b"hunter2");
    let again = apply(&secrets, "db", "mesh", &s).await.unwrap();
    assert_eq!(rv(&again), rv(&secrets.get("db").await.unwrap()));
    let bad = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "bad"}, "data": {"x": "not base64!"}});
    let e = api_err(apply(&secrets, "bad", "mesh", &bad).await.unwrap_err());
    assert_eq!(e.code, 400);
}

#[tokio::test]
async fn validation_errors_are_422_with_causes() {
    let (_d, client) = setup().await;
    let deps: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let e = api_err(
        apply(&deps, "Bad_Name", "mesh", &deployment("Bad_Name", "i:1", 1))
            .await
            .unwrap_err(),
    );
    assert_eq!((e.code, e.reason.as_str()), (422, "Invalid"));
    assert!(
        e.message
            .starts_with("Deployment.apps \"Bad_Name\" is invalid"),
        "{}",
        e.message
    );

    let mut mismatch = deployment("web", "i:1", 1);
    mismatch["spec"]["selector"]["matchLabels"]["app"] = json!("other");
    let e = api_err(apply(&deps, "web", "mesh", &mismatch).await.unwrap_err());
    assert!(
        e.message
            .contains("`selector` does not match template `labels`"),
        "{}",
        e.message
    );

    let mut no_image = deployment("web", "i:1", 1);
    no_image["spec"]["template"]["spec"]["containers"][0]
        .as_object_mut()
        .unwrap()
        .remove("image");
    let e = api_err(apply(&deps, "web", "mesh", &no_image).await.unwrap_err());
    assert_eq!(
        e.details.as_ref().unwrap().causes[0].field,
        "spec.template.spec.containers[0].image"
    );

    let mut wrong_type = deployment("web", "i:1", 1);
    wrong_type["spec"]["replicas"] = json!("three");
    assert_eq!(
        api_err(apply(&deps, "web", "mesh", &wrong_type).await.unwrap_err()).code,
        400
    );

    apply(&deps, "web", "mesh", &deployment("web", "i:1", 1))
        .await
        .unwrap();
    let mut moved = deployment("web", "i:1", 1);
    moved["spec"]["selector"]["matchLabels"]["tier"] = json!("x");
    moved["spec"]["template"]["metadata"]["labels"]["tier"] = json!("x");
    let e = api_err(apply(&deps, "web", "mesh", &moved).await.unwrap_err());
    assert!(e.message.contains("field is immutable"), "{}", e.message);

    let ings: Api<Ingress> = Api::namespaced(client, "default");
    let ing = json!({"apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "metadata": {"name": "i"},
        "spec": {"rules": [{"host": "x.example.com", "http": {"paths": [{"path": "/", "backend": {"service": {"name": "s", "port": {"number": 80}}}}]}}]}});
    let e = api_err(apply(&ings, "i", "mesh", &ing).await.unwrap_err());
    assert!(
        e.message.contains("pathType: Required value"),
        "{}",
        e.message
    );
}

#[tokio::test]
async fn deployment_defaults_and_ready_rollout() {
    let (d, client) = setup().await;
    let deps: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let created = apply(
        &deps,
        "web",
        "mesh",
        &deployment("web", "registry.local/web@sha256:abcd", 3),
    )
    .await
    .unwrap();
    let spec = created.spec.clone();
    assert_eq!(spec.progress_deadline_seconds, Some(600));
    assert_eq!(spec.revision_history_limit, Some(10));
    let strategy = spec.strategy.unwrap();
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    let pod = spec.template.spec.unwrap();
    assert_eq!(pod.restart_policy.as_deref(), Some("Always"));
    assert_eq!(pod.dns_policy.as_deref(), Some("ClusterFirst"));
    assert_eq!(pod.termination_grace_period_seconds, Some(30));
    assert_eq!(pod.scheduler_name.as_deref(), Some("default-scheduler"));
    let c = &pod.containers[0];
    assert_eq!(c.image_pull_policy.as_deref(), Some("IfNotPresent"));
    assert_eq!(
        c.termination_message_path.as_deref(),
        Some("/dev/termination-log")
    );
    assert_eq!(c.readiness_probe.as_ref().unwrap().period_seconds, Some(10));
    assert_eq!(created.metadata.generation, Some(1));

    let live = deps.get("web").await.unwrap();
    let st = live.status.clone().unwrap();
    assert_eq!(st.observed_generation, Some(1));
    assert_eq!(
        (
            st.replicas,
            st.updated_replicas,
            st.ready_replicas,
            st.available_replicas
        ),
        (Some(3), Some(3), Some(3), Some(3))
    );
    let conds = st.conditions.unwrap();
    let prog = conds
        .iter()
        .find(|c| c.type_.as_deref() == Some("Progressing"))
        .unwrap();
    assert_eq!(
        (prog.status.as_deref(), prog.reason.as_deref()),
        (Some("True"), Some("NewReplicaSetAvailable"))
    );
    assert!(
        conds
            .iter()
            .any(|c| c.type_.as_deref() == Some("Available") && c.status.as_deref() == Some("True"))
    );

    let rss: Api<ReplicaSet> = Api::namespaced(client.clone(), "default");
    let rs = rss
        .list(&ListParams::default().labels("app=web"))
        .await
        .unwrap()
        .items;
    assert_eq!(rs.len(), 1);
    let hash = rs[0].metadata.labels.as_ref().unwrap()["pod-template-hash"].clone();
    assert_eq!(
        rs[0].metadata.name.as_deref().unwrap(),
        format!("web-{hash}")
    );
    assert_eq!(
        rs[0].metadata.owner_references.as_ref().unwrap()[0].uid,
        live.metadata.uid.clone().unwrap()
    );
    let pods: Api<Pod> = Api::namespaced(client, "default");
    let ps = pods
        .list(&ListParams::default().labels(&format!("app=web,pod-template-hash={hash}")))
        .await
        .unwrap()
        .items;
    assert_eq!(ps.len(), 3);
    assert!(ps.iter().all(|p| {
        p.status
            .as_ref()
            .unwrap()
            .container_statuses
            .as_ref()
            .unwrap()[0]
            .ready
    }));

    // Re-applying the same Deployment is a no-op even though the controllers wrote status.
    let again = apply(
        &deps,
        "web",
        "mesh",
        &deployment("web", "registry.local/web@sha256:abcd", 3),
    )
    .await
    .unwrap();
    assert_eq!(rv(&again), rv(&live));
    assert!(
        d.objects_with_label("app.kubernetes.io/managed-by=mesh")
            .iter()
            .any(|o| o["kind"] == "Deployment")
    );
}

async fn rollout_state(client: &Client, name: &str) -> (Deployment, Vec<Pod>) {
    let deps: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let d = deps.get(name).await.unwrap();
    let ps = pods
        .list(&ListParams::default().labels(&format!("app={name}")))
        .await
        .unwrap()
        .items;
    (d, ps)
}

fn condition(d: &Deployment, ty: &str) -> (String, String) {
    let c = d
        .status
        .as_ref()
        .unwrap()
        .conditions
        .as_ref()
        .unwrap()
        .iter()
        .find(|c| c.type_.as_deref() == Some(ty))
        .unwrap()
        .clone();
    (c.status.unwrap_or_default(), c.reason.unwrap_or_default())
}

#[tokio::test]
async fn failed_rollouts_report_pod_reasons_and_deadline() {
    let (d, client) = setup().await;
    let deps: Api<Deployment> = Api::namespaced(client.clone(), "default");
    for (name, mode, reason) in [
        ("pull", Rollout::ImagePullBackOff, "ImagePullBackOff"),
        ("crash", Rollout::CrashLoop, "CrashLoopBackOff"),
    ] {
        d.set_rollout("default", name, mode);
        apply(&deps, name, "mesh", &deployment(name, "img:1", 2))
            .await
            .unwrap();
        let (dep, pods) = rollout_state(&client, name).await;
        assert_eq!(pods.len(), 2);
        for p in &pods {
            let cs = &p
                .status
                .as_ref()
                .unwrap()
                .container_statuses
                .as_ref()
                .unwrap()[0];
            assert!(!cs.ready);
            assert_eq!(
                cs.state
                    .as_ref()
                    .unwrap()
                    .waiting
                    .as_ref()
                    .unwrap()
                    .reason
                    .as_deref(),
                Some(reason)
            );
        }
        let st = dep.status.clone().unwrap();
        assert_eq!(
            (
                st.updated_replicas,
                st.ready_replicas,
                st.available_replicas,
                st.unavailable_replicas
            ),
            (Some(2), None, None, Some(2))
        );
        assert_eq!(
            condition(&dep, "Available"),
            ("False".into(), "MinimumReplicasUnavailable".into())
        );
        assert_eq!(condition(&dep, "Progressing").0, "True");
    }
    d.set_rollout("default", "pending", Rollout::Pending);
    apply(&deps, "pending", "mesh", &deployment("pending", "img:1", 1))
        .await
        .unwrap();
    let (_, pods) = rollout_state(&client, "pending").await;
    let ps = pods[0].status.clone().unwrap();
    assert_eq!(ps.phase.as_deref(), Some("Pending"));
    assert_eq!(
        ps.conditions.unwrap()[0].reason.as_deref(),
        Some("Unschedulable")
    );

    d.advance_clock(Duration::from_secs(601));
    let (dep, _) = rollout_state(&client, "pull").await;
    assert_eq!(
        condition(&dep, "Progressing"),
        ("False".into(), "ProgressDeadlineExceeded".into())
    );

    // The fix: the image becomes pullable; the same ReplicaSet's pods turn ready.
    d.set_rollout("default", "pull", Rollout::Ready);
    let (dep, _) = rollout_state(&client, "pull").await;
    assert_eq!(
        condition(&dep, "Progressing"),
        ("True".into(), "NewReplicaSetAvailable".into())
    );
}

#[tokio::test]
async fn new_template_rolls_a_new_replica_set_and_failed_update_keeps_old_pods() {
    let (d, client) = setup().await;
    let deps: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let rss: Api<ReplicaSet> = Api::namespaced(client.clone(), "default");
    apply(&deps, "web", "mesh", &deployment("web", "img:1", 2))
        .await
        .unwrap();
    apply(&deps, "web", "mesh", &deployment("web", "img:2", 2))
        .await
        .unwrap();
    let (dep, pods) = rollout_state(&client, "web").await;
    assert_eq!(dep.metadata.generation, Some(2));
    assert_eq!(dep.status.as_ref().unwrap().observed_generation, Some(2));
    assert_eq!(
        dep.metadata.annotations.as_ref().unwrap()["deployment.kubernetes.io/revision"],
        "2"
    );
    assert_eq!(pods.len(), 2);
    assert!(
        pods.iter()
            .all(|p| p.spec.as_ref().unwrap().containers[0].image.as_deref() == Some("img:2"))
    );
    let sets = rss
        .list(&ListParams::default().labels("app=web"))
        .await
        .unwrap()
        .items;
    assert_eq!(sets.len(), 2);
    assert_eq!(
        sets.iter().map(|r| r.spec.replicas.unwrap()).sum::<i32>(),
        2
    );

    d.set_image_rollout("img:3", Rollout::ImagePullBackOff);
    apply(&deps, "web", "mesh", &deployment("web", "img:3", 2))
        .await
        .unwrap();
    let (dep, pods) = rollout_state(&client, "web").await;
    assert_eq!(pods.len(), 4, "old pods stay while the new ones fail");
    let st = dep.status.clone().unwrap();
    assert_eq!(
        (st.replicas, st.updated_replicas, st.available_replicas),
        (Some(4), Some(2), Some(2))
    );
    assert_eq!(condition(&dep, "Available").0, "True");
    // Rolling back to img:2 reuses its ReplicaSet.
    apply(&deps, "web", "mesh", &deployment("web", "img:2", 2))
        .await
        .unwrap();
    let (dep, pods) = rollout_state(&client, "web").await;
    assert_eq!(pods.len(), 2);
    assert_eq!(condition(&dep, "Progressing").1, "NewReplicaSetAvailable");
    assert_eq!(
        dep.metadata.annotations.as_ref().unwrap()["deployment.kubernetes.io/revision"],
        "4"
    );
}

#[tokio::test]
async fn cascading_delete_follows_propagation_policy() {
    let (_d, client) = setup().await;
    let deps: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let rss: Api<ReplicaSet> = Api::namespaced(client.clone(), "default");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let count = |l: Vec<Pod>| l.len();

    apply(&deps, "bg", "mesh", &deployment("bg", "i:1", 2))
        .await
        .unwrap();
    deps.delete("bg", &DeleteParams::background())
        .await
        .unwrap();
    assert!(deps.get_opt("bg").await.unwrap().is_none());
    assert!(
        rss.list(&ListParams::default().labels("app=bg"))
            .await
            .unwrap()
            .items
            .is_empty()
    );
    assert_eq!(
        count(
            pods.list(&ListParams::default().labels("app=bg"))
                .await
                .unwrap()
                .items
        ),
        0
    );

    apply(&deps, "fg", "mesh", &deployment("fg", "i:1", 2))
        .await
        .unwrap();
    let r = deps
        .delete("fg", &DeleteParams::foreground())
        .await
        .unwrap();
    let marked = r.left().expect("object returned");
    assert!(marked.metadata.deletion_timestamp.is_some());
    assert!(
        marked
            .metadata
            .finalizers
            .unwrap()
            .contains(&"foregroundDeletion".to_string())
    );
    assert!(deps.get_opt("fg").await.unwrap().is_none());
    assert!(
        rss.list(&ListParams::default().labels("app=fg"))
            .await
            .unwrap()
            .items
            .is_empty()
    );

    apply(&deps, "or", "mesh", &deployment("or", "i:1", 2))
        .await
        .unwrap();
    deps.delete("or", &DeleteParams::orphan()).await.unwrap();
    assert!(deps.get_opt("or").await.unwrap().is_none());
    let left = rss
        .list(&ListParams::default().labels("app=or"))
        .await
        .unwrap()
        .items;
    assert_eq!(left.len(), 1);
    assert!(left[0].metadata.owner_references.is_none());
    assert_eq!(
        count(
            pods.list(&ListParams::default().labels("app=or"))
                .await
                .unwrap()
                .items
        ),
        2
    );
}

#[tokio::test]
async fn finalizers_hold_deletion_until_removed() {
    let (_d, client) = setup().await;
    let cms: Api<ConfigMap> = Api::namespaced(client, "default");
    let mut c = cm("held", json!({}));
    c["metadata"]["finalizers"] = json!(["example.com/hold"]);
    apply(&cms, "held", "mesh", &c).await.unwrap();
    cms.delete("held", &DeleteParams::default()).await.unwrap();
    let still = cms.get("held").await.unwrap();
    assert!(still.metadata.deletion_timestamp.is_some());
    cms.patch(
        "held",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .unwrap();
    assert!(cms.get_opt("held").await.unwrap().is_none());
}

#[tokio::test]
async fn deleting_a_namespace_deletes_its_contents() {
    let (_d, client) = setup().await;
    let nss: Api<Namespace> = Api::all(client.clone());
    apply(
        &nss,
        "tmp",
        "mesh",
        &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "tmp"}}),
    )
    .await
    .unwrap();
    let deps: Api<Deployment> = Api::namespaced(client.clone(), "tmp");
    apply(&deps, "web", "mesh", &deployment("web", "i:1", 1))
        .await
        .unwrap();
    nss.delete("tmp", &DeleteParams::default()).await.unwrap();
    assert!(nss.get_opt("tmp").await.unwrap().is_none());
    let pods: Api<Pod> = Api::all(client);
    assert!(
        pods.list(&ListParams::default().labels("app=web"))
            .await
            .unwrap()
            .items
            .is_empty()
    );
}

#[tokio::test]
async fn dry_run_apply_does_not_persist() {
    let (_d, client) = setup().await;
    let cms: Api<ConfigMap> = Api::namespaced(client, "default");
    let pp = PatchParams::apply("mesh").dry_run();
    let out = cms
        .patch("dry", &pp, &Patch::Apply(cm("dry", json!({"a": "1"}))))
        .await
        .unwrap();
    assert_eq!(out.data.unwrap()["a"], "1");
    assert!(cms.get_opt("dry").await.unwrap().is_none());
}

#[tokio::test]
async fn hpa_and_network_policy_round_trip() {
    let (_d, client) = setup().await;
    let deps: Api<Deployment> = Api::namespaced(client.clone(), "default");
    apply(&deps, "web", "mesh", &deployment("web", "i:1", 1))
        .await
        .unwrap();
    let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(client.clone(), "default");
    let h = json!({"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": "web"},
        "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web"}, "minReplicas": 2, "maxReplicas": 5,
                 "metrics": [{"type": "Resource", "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}}}]}});
    apply(&hpas, "web", "mesh", &h).await.unwrap();
    let live = hpas.get("web").await.unwrap();
    let st = live.status.unwrap();
    assert_eq!(st.desired_replicas, 2);
    assert_eq!(st.current_replicas, Some(2));
    assert_eq!(
        deps.get("web").await.unwrap().spec.replicas,
        Some(2),
        "HPA enforces minReplicas"
    );

    let nps: Api<NetworkPolicy> = Api::namespaced(client, "default");
    let np = json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "web"},
        "spec": {"podSelector": {"matchLabels": {"app": "web"}},
                 "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "caller"}}}], "ports": [{"port": 8080}]}]}});
    let created = apply(&nps, "web", "mesh", &np).await.unwrap();
    let spec = created.spec.unwrap();
    assert_eq!(spec.policy_types.unwrap(), vec!["Ingress".to_string()]);
    assert_eq!(
        spec.ingress.unwrap()[0].ports.as_ref().unwrap()[0]
            .protocol
            .as_deref(),
        Some("TCP")
    );
    let again = apply(&nps, "web", "mesh", &np).await.unwrap();
    assert_eq!(
        again.metadata.resource_version,
        created.metadata.resource_version
    );
}

/// What a real API server does with fields of several managers: a merge
/// patch by another manager takes ownership of what it adds (an `Update`
/// entry); an apply that omits a field owned only by another manager keeps
/// it; an apply that omits a field it shares with another manager drops only
/// its own ownership; a field only the applier owned goes.
#[tokio::test]
async fn fields_of_other_managers_survive_an_apply_that_omits_them() {
    let (_d, client) = setup().await;
    let cms: Api<ConfigMap> = Api::namespaced(client, "default");
    apply(
        &cms,
        "cfg",
        "mesh",
        &cm("cfg", json!({"mine": "1", "shared": "s"})),
    )
    .await
    .unwrap();
    // `kubectl patch --type merge`: an Update by kubectl-patch.
    let pp = PatchParams {
        field_manager: Some("kubectl-patch".into()),
        ..Default::default()
    };
    cms.patch("cfg", &pp, &Patch::Merge(json!({"data": {"x": "y"}})))
        .await
        .unwrap();
    // Another applier shares `shared` (same value: no conflict).
    apply(&cms, "cfg", "other", &cm("cfg", json!({"shared": "s"})))
        .await
        .unwrap();
    let mf = cms
        .get("cfg")
        .await
        .unwrap()
        .metadata
        .managed_fields
        .unwrap();
    let patcher = mf
        .iter()
        .find(|e| e.manager.as_deref() == Some("kubectl-patch"))
        .expect("an entry for the patcher");
    assert_eq!(patcher.operation.as_deref(), Some("Update"));
    assert_eq!(
        patcher.fields_v1.as_ref().unwrap().0,
        json!({"f:data": {"f:x": {}}})
    );

    // mesh applies without x, shared and mine: x and shared stay, mine goes.
    let after = apply(&cms, "cfg", "mesh", &cm("cfg", json!({"new": "2"})))
        .await
        .unwrap();
    let data = after.data.clone().unwrap();
    assert_eq!(
        data.keys().map(String::as_str).collect::<Vec<_>>(),
        ["new", "shared", "x"],
        "{data:?}"
    );
    let mf = after.metadata.managed_fields.clone().unwrap();
    let mesh = mf
        .iter()
        .find(|e| e.manager.as_deref() == Some("mesh"))
        .unwrap();
    assert_eq!(
        mesh.fields_v1.as_ref().unwrap().0,
        json!({"f:data": {".": {}, "f:new": {}}}),
        "mesh no longer owns shared"
    );
    // The other applier lets go of shared, which it alone owned now: it goes
    // (an empty map changes nothing, so it conflicts with nobody); x stays.
    apply(&cms, "cfg", "other", &cm("cfg", json!({})))
        .await
        .unwrap();
    let data = cms.get("cfg").await.unwrap().data.unwrap();
    assert_eq!(
        data.keys().map(String::as_str).collect::<Vec<_>>(),
        ["new", "x"],
        "{data:?}"
    );

    // A JSON merge patch that sets x to null removes it, whoever owns it,
    // and with a stale resourceVersion it is refused.
    let stale = rv(&after);
    let e = api_err(
        cms.patch(
            "cfg",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"resourceVersion": stale}, "data": {"x": null}})),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(e.code, 409);
    let now = rv(&cms.get("cfg").await.unwrap());
    let pp = PatchParams {
        field_manager: Some("mesh".into()),
        ..Default::default()
    };
    let repaired = cms
        .patch(
            "cfg",
            &pp,
            &Patch::Merge(json!({"metadata": {"resourceVersion": now}, "data": {"x": null}})),
        )
        .await
        .unwrap();
    assert!(!repaired.data.unwrap().contains_key("x"));
    assert!(
        repaired
            .metadata
            .managed_fields
            .unwrap()
            .iter()
            .all(|e| e.manager.as_deref() != Some("kubectl-patch")),
        "the patcher owns nothing any more"
    );
}
