//! Daemonless OCI images (`mesh::image`) against a real registry: Debian's
//! `docker-registry` on loopback, named by `MESH_TEST_REGISTRY` (started by
//! `scripts/test`, or by hand with `scripts/services start` then
//! `eval "$(scripts/services env)"`).
//!
//! These tests use a synthetic executable as the runtime (digests do not care);
//! `static_runtime_runs_from_scratch` uses the real static runtime
//! (`scripts/build-static-runtime`) and is run by `scripts/bench-image`.
#![cfg(feature = "kubernetes")]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

mod support;

use mesh::bundle::{BundlePlan, bundle_for};
use mesh::image::{self, Image, ImageError, ImageSpec, LayerKind, PushOptions, RegistryAuth};
use serde_json::Value;
use sha2::{Digest, Sha256};

const SERVICE: &str = "customer-features";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn registry() -> String {
    match std::env::var("MESH_TEST_REGISTRY") {
        Ok(r) if !r.is_empty() => r,
        _ => panic!(
            "MESH_TEST_REGISTRY is not set: these tests need the OCI registry on loopback; \
             run `scripts/services start` and `eval \"$(scripts/services env)\"` (scripts/test does both)"
        ),
    }
}

/// A repository name no other test (or earlier run) uses.
fn unique_repo(what: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "{}/mesh-test/{what}-{}-{nanos}",
        registry(),
        std::process::id()
    )
}

/// A stand-in runtime executable: 1 MiB of fixed bytes, mode 0755.
fn fake_runtime(dir: &Path) -> PathBuf {
    let p = dir.join("mesh-runtime");
    let mut data = b"\x7fELF fake mesh-runtime for image tests\n".to_vec();
    data.extend((0..1024 * 1024u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8));
    std::fs::write(&p, data).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    p
}

/// The bundle of `service` in the customer mesh found under `tree` (a checkout, or a copy).
fn bundle(tree: &Path, service: &str) -> BundlePlan {
    let stack = mesh::stack::load(&tree.join("stacks/customer-mesh"), Some("local"))
        .unwrap_or_else(|e| panic!("loading the customer mesh under {}: {e:?}", tree.display()));
    let svc = stack
        .services
        .get(service)
        .unwrap_or_else(|| panic!("no service {service}"));
    bundle_for(&stack, svc, &|name| format!("http://{name}:8080"))
}

fn build(runtime: &Path, bundle: &BundlePlan) -> Image {
    image::build(&ImageSpec {
        runtime_bin: runtime.to_path_buf(),
        bundle,
        service: SERVICE.into(),
        port: 8080,
    })
    .unwrap()
}

/// Copies what the customer mesh needs (stack, modules, example data) into `to`, same layout.
fn copy_tree(to: &Path) {
    support::copy_customer_mesh(to);
}

fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// A plain HTTP/1.0 request to the loopback registry: (status, headers lowercased, body).
fn http(
    method: &str,
    host: &str,
    path: &str,
    accept: Option<&str>,
) -> (u16, BTreeMap<String, String>, Vec<u8>) {
    http_as(method, host, path, accept, None)
}

/// [`http`], with Basic credentials `(user, password)` when given.
fn http_as(
    method: &str,
    host: &str,
    path: &str,
    accept: Option<&str>,
    basic: Option<(&str, &str)>,
) -> (u16, BTreeMap<String, String>, Vec<u8>) {
    let mut s =
        std::net::TcpStream::connect(host).unwrap_or_else(|e| panic!("connecting to {host}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let accept = accept
        .map(|a| format!("Accept: {a}\r\n"))
        .unwrap_or_default();
    let authorization = basic
        .map(|(u, p)| {
            format!(
                "Authorization: Basic {}\r\n",
                base64(format!("{u}:{p}").as_bytes())
            )
        })
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: {host}\r\n{accept}{authorization}\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("an HTTP response");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    (status, headers, raw[split + 4..].to_vec())
}

/// Standard base64, padded (for `Authorization: Basic`).
fn base64(data: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = u32::from_be_bytes([0, b[0], b[1], b[2]]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ABC[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// `host:port` and repository path of a `host:port/repo` reference.
fn split(reference: &str) -> (&str, &str) {
    reference.split_once('/').unwrap()
}

/// Files of a tar.gz layer: path → (mode, uid, gid, mtime, content).
fn layer_files(data: &[u8]) -> BTreeMap<String, (u32, u64, u64, u64, Vec<u8>)> {
    let mut out = BTreeMap::new();
    let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(data));
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let h = e.header().clone();
        let path = e.path().unwrap().to_string_lossy().into_owned();
        let mut content = Vec::new();
        e.read_to_end(&mut content).unwrap();
        out.insert(
            path,
            (
                h.mode().unwrap(),
                h.uid().unwrap(),
                h.gid().unwrap(),
                h.mtime().unwrap(),
                content,
            ),
        );
    }
    out
}

#[tokio::test]
async fn push_then_pull_back_the_manifest() {
    let tmp = tempfile::tempdir().unwrap();
    let runtime = fake_runtime(tmp.path());
    let bundle = bundle(&root(), SERVICE);
    let img = build(&runtime, &bundle);
    let repo = unique_repo("customer-features");

    let pushed = image::push_detailed(
        &img,
        &repo,
        RegistryAuth::Anonymous,
        &PushOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!(pushed.pinned, format!("{repo}@{}", img.manifest_digest()));
    assert_eq!(
        pushed.uploaded.len(),
        3,
        "both layers and the config are new: {pushed:?}"
    );
    assert!(pushed.mounted.is_empty() && pushed.manifest_written);
    assert_eq!(
        pushed.tag.as_deref(),
        Some(&*format!(
            "mesh-{}",
            img.manifest_digest().trim_start_matches("sha256:")
        ))
    );

    // Pull the manifest back by digest.
    let (host, name) = split(&repo);
    let (status, headers, body) = http(
        "GET",
        host,
        &format!("/v2/{name}/manifests/{}", img.manifest_digest()),
        Some(image::MANIFEST_MEDIA_TYPE),
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(sha256(&body), img.manifest_digest());
    assert_eq!(
        body,
        img.manifest(),
        "the registry keeps the exact manifest bytes"
    );
    assert_eq!(
        headers.get("docker-content-digest").map(String::as_str),
        Some(img.manifest_digest())
    );
    assert_eq!(
        headers.get("content-type").map(String::as_str),
        Some(image::MANIFEST_MEDIA_TYPE)
    );
    let m: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(m["schemaVersion"], 2);
    assert_eq!(m["mediaType"], image::MANIFEST_MEDIA_TYPE);
    assert_eq!(m["config"]["mediaType"], image::CONFIG_MEDIA_TYPE);
    assert_eq!(m["config"]["digest"], img.config_digest());
    let layers = m["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 2);
    for (l, built) in layers.iter().zip(img.layers()) {
        assert_eq!(l["mediaType"], image::LAYER_MEDIA_TYPE);
        assert_eq!(l["digest"], built.digest.as_str());
        assert_eq!(l["size"], built.size);
        // The blob is there, with that size.
        let (st, h, _) = http(
            "HEAD",
            host,
            &format!("/v2/{name}/blobs/{}", built.digest),
            None,
        );
        assert_eq!(st, 200);
        assert_eq!(
            h.get("content-length").map(String::as_str),
            Some(&*built.size.to_string())
        );
    }

    // The config blob: entrypoint, port, labels, diff_ids.
    let (st, _, cfg) = http(
        "GET",
        host,
        &format!("/v2/{name}/blobs/{}", img.config_digest()),
        None,
    );
    assert_eq!(st, 200);
    assert_eq!(sha256(&cfg), img.config_digest());
    let c: Value = serde_json::from_slice(&cfg).unwrap();
    assert_eq!(c["architecture"], "amd64");
    assert_eq!(c["os"], "linux");
    assert!(c.get("created").is_none(), "no build time in the config");
    assert_eq!(
        c["config"]["Entrypoint"],
        serde_json::json!([
            "/mesh-runtime",
            "serve",
            "--bundle",
            "/bundle",
            "--listen",
            "0.0.0.0:8080"
        ])
    );
    assert_eq!(
        c["config"]["ExposedPorts"],
        serde_json::json!({"8080/tcp": {}})
    );
    assert_eq!(
        c["config"]["Labels"]["org.opencontainers.image.title"],
        SERVICE
    );
    assert_eq!(c["config"]["Labels"][image::SERVICE_LABEL], SERVICE);
    assert_eq!(c["rootfs"]["type"], "layers");
    let diff_ids: Vec<&str> = img.layers().iter().map(|l| l.diff_id.as_str()).collect();
    assert_eq!(c["rootfs"]["diff_ids"], serde_json::json!(diff_ids));

    // The content-derived tag names the same manifest.
    let (st, h, _) = http(
        "HEAD",
        host,
        &format!("/v2/{name}/manifests/{}", pushed.tag.unwrap()),
        Some(image::MANIFEST_MEDIA_TYPE),
    );
    assert_eq!(st, 200);
    assert_eq!(
        h.get("docker-content-digest").map(String::as_str),
        Some(img.manifest_digest())
    );

    // A second push sends nothing.
    let again = image::push_detailed(
        &img,
        &repo,
        RegistryAuth::Anonymous,
        &PushOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!(again.pinned, pushed.pinned);
    assert!(again.uploaded.is_empty(), "{again:?}");
    assert_eq!(again.existing.len(), 3);
    assert_eq!(again.tag, None, "the manifest was already there");
    assert!(!again.manifest_written);

    // An explicit tag is honoured (and `push` returns the pinned reference).
    let tagged = format!("{repo}:v1");
    assert_eq!(
        image::push(&img, &tagged, RegistryAuth::Anonymous)
            .await
            .unwrap(),
        pushed.pinned
    );
    let (st, h, _) = http(
        "HEAD",
        host,
        &format!("/v2/{name}/manifests/v1"),
        Some(image::MANIFEST_MEDIA_TYPE),
    );
    assert_eq!(st, 200);
    assert_eq!(
        h.get("docker-content-digest").map(String::as_str),
        Some(img.manifest_digest())
    );
}

#[test]
fn layers_hold_the_runtime_and_the_bundle_reproducibly() {
    let tmp = tempfile::tempdir().unwrap();
    let runtime = fake_runtime(tmp.path());
    let bundle = bundle(&root(), SERVICE);
    let img = build(&runtime, &bundle);
    assert_eq!(img.layers().len(), 2);

    let rt = layer_files(img.layer(LayerKind::Runtime).data());
    assert_eq!(rt.keys().collect::<Vec<_>>(), ["mesh-runtime"]);
    let (mode, uid, gid, mtime, content) = &rt["mesh-runtime"];
    assert_eq!((*mode, *uid, *gid, *mtime), (0o755, 0, 0, 0));
    assert_eq!(content, &std::fs::read(&runtime).unwrap());

    let b = layer_files(img.layer(LayerKind::Bundle).data());
    let mut want: Vec<String> = vec![
        "bundle/".into(),
        "bundle/datasets/".into(),
        "bundle/service.json".into(),
    ];
    want.extend(bundle.files.keys().map(|k| format!("bundle/{k}")));
    want.sort();
    assert_eq!(b.keys().cloned().collect::<Vec<_>>(), want);
    for (path, (mode, uid, gid, mtime, content)) in &b {
        assert_eq!((*uid, *gid, *mtime), (0, 0, 0), "{path}");
        assert_eq!(
            *mode,
            if path.ends_with('/') { 0o755 } else { 0o644 },
            "{path}"
        );
        if let Some(rel) = path
            .strip_prefix("bundle/")
            .filter(|r| bundle.files.contains_key(*r))
        {
            assert_eq!(
                content,
                &std::fs::read(&bundle.files[rel]).unwrap(),
                "{path}"
            );
        }
    }
    let cfg: mesh_runtime::config::ServiceConfig =
        serde_json::from_slice(&b["bundle/service.json"].4).unwrap();
    assert_eq!(cfg, bundle.config);

    // Sizes and digests add up.
    for l in img.layers() {
        assert_eq!(l.size, l.data().len() as u64);
        assert_eq!(l.digest, sha256(l.data()));
        let mut tar = Vec::new();
        flate2::read::GzDecoder::new(l.data())
            .read_to_end(&mut tar)
            .unwrap();
        assert_eq!(l.diff_id, sha256(&tar));
        assert_eq!(l.uncompressed_size, tar.len() as u64);
        // gzip header: no mtime (bytes 4..8), no file name (FLG bit 3).
        assert_eq!(&l.data()[4..8], &[0, 0, 0, 0]);
        assert_eq!(l.data()[3] & 0x08, 0);
    }
    assert_eq!(img.manifest_digest(), sha256(img.manifest()));
    assert_eq!(img.config_digest(), sha256(img.config()));
    assert_eq!(
        img.total_size(),
        (img.manifest().len() + img.config().len()) as u64
            + img.layers().iter().map(|l| l.size).sum::<u64>()
    );

    // Same inputs, same digest: twice here, and from two copies of the tree made at other times.
    assert_eq!(build(&runtime, &bundle).manifest(), img.manifest());
    for _ in 0..2 {
        let copy = tempfile::tempdir().unwrap();
        copy_tree(copy.path());
        let other = build(&runtime, &self::bundle(copy.path(), SERVICE));
        assert_eq!(
            other.manifest_digest(),
            img.manifest_digest(),
            "a copy of the tree gives another digest"
        );
    }
}

#[tokio::test]
async fn a_changed_dataset_changes_only_the_bundle_layer() {
    let tmp = tempfile::tempdir().unwrap();
    let runtime = fake_runtime(tmp.path());
    let tree = tmp.path().join("tree");
    copy_tree(&tree);
    let before = build(&runtime, &bundle(&tree, SERVICE));

    let csv = tree.join("examples/customer-mesh/customers.csv");
    let mut text = std::fs::read_to_string(&csv).unwrap();
    let first_row = text.lines().nth(1).unwrap().to_owned();
    text.push_str(&first_row.replacen(first_row.split(',').next().unwrap(), "C99999", 1));
    text.push('\n');
    std::fs::write(&csv, text).unwrap();
    let after = build(&runtime, &bundle(&tree, SERVICE));

    assert_ne!(after.manifest_digest(), before.manifest_digest());
    assert_ne!(after.config_digest(), before.config_digest());
    assert_eq!(
        after.layer(LayerKind::Runtime).digest,
        before.layer(LayerKind::Runtime).digest
    );
    assert_ne!(
        after.layer(LayerKind::Bundle).digest,
        before.layer(LayerKind::Bundle).digest
    );

    // Pushing the new image after the old one sends the bundle layer and the config only.
    let repo = unique_repo("changed-dataset");
    image::push(&before, &repo, RegistryAuth::Anonymous)
        .await
        .unwrap();
    let pushed = image::push_detailed(
        &after,
        &repo,
        RegistryAuth::Anonymous,
        &PushOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!(
        pushed.existing,
        vec![after.layer(LayerKind::Runtime).digest.clone()]
    );
    assert_eq!(
        pushed.uploaded,
        vec![
            after.layer(LayerKind::Bundle).digest.clone(),
            after.config_digest().to_owned()
        ]
    );
    assert_eq!(pushed.pinned, format!("{repo}@{}", after.manifest_digest()));
}

#[tokio::test]
async fn a_registry_that_is_not_listening_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let img = build(&fake_runtime(tmp.path()), &bundle(&root(), SERVICE));
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let reference = format!("127.0.0.1:{port}/mesh/customer-features");
    let err = image::push(&img, &reference, RegistryAuth::Anonymous)
        .await
        .unwrap_err();
    assert!(matches!(err, ImageError::Unreachable { .. }), "{err:?}");
    let msg = err.to_string();
    eprintln!("not listening: {msg}");
    assert!(msg.contains(&format!("127.0.0.1:{port}")), "{msg}");
    assert!(msg.contains("cannot reach the registry"), "{msg}");
    assert!(msg.to_lowercase().contains("refused"), "{msg}");
}

#[tokio::test]
async fn credentials_are_never_in_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let img = build(&fake_runtime(tmp.path()), &bundle(&root(), SERVICE));
    let bad = format!("{}/mesh-test/UPPER-case-is-invalid", registry());
    let err = image::push(
        &img,
        &bad,
        RegistryAuth::Basic {
            user: "AWS".into(),
            password: "hunter2-secret".into(),
        },
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, ImageError::InvalidReference { .. }),
        "{err:?}"
    );
    assert!(!format!("{err} {err:?}").contains("hunter2"));

    // Basic credentials against a registry without auth: pushed as usual, never echoed.
    let repo = unique_repo("basic");
    let auth = RegistryAuth::Basic {
        user: "AWS".into(),
        password: "hunter2-secret".into(),
    };
    assert!(!format!("{auth:?}").contains("hunter2"));
    image::push(&img, &repo, auth).await.unwrap();
}

// ------------------------------------------- a registry that requires credentials

use support::{AUTH_PASSWORD, AUTH_USER, auth_registry};

fn good_auth() -> RegistryAuth {
    RegistryAuth::Basic {
        user: AUTH_USER.into(),
        password: AUTH_PASSWORD.into(),
    }
}

const AS_USER: Option<(&str, &str)> = Some((AUTH_USER, AUTH_PASSWORD));

#[tokio::test]
async fn a_registry_that_requires_credentials_takes_the_right_ones_only() {
    let reg = auth_registry(AUTH_USER, AUTH_PASSWORD);
    // It does demand them, over plain HTTP on loopback.
    let (status, headers, _) = http("GET", &reg.host, "/v2/", None);
    assert_eq!(status, 401);
    assert_eq!(
        headers.get("www-authenticate").map(String::as_str),
        Some(r#"Basic realm="mesh-test""#),
        "{headers:?}"
    );
    assert_eq!(http_as("GET", &reg.host, "/v2/", None, AS_USER).0, 200);
    let wrong_password = "not-the-auth-token";
    let wrong = Some((AUTH_USER, wrong_password));
    assert_eq!(http_as("GET", &reg.host, "/v2/", None, wrong).0, 401);

    let tmp = tempfile::tempdir().unwrap();
    let img = build(&fake_runtime(tmp.path()), &bundle(&root(), SERVICE));
    let repo = format!("{}/mesh/customer-mesh-customer-features", reg.host);

    // Without credentials, and with a wrong password: refused, in one line that
    // names the registry and says why, and never shows a password.
    let cases = [
        (
            "anonymous",
            RegistryAuth::Anonymous,
            "it requires credentials and none were given",
        ),
        (
            "wrong password",
            RegistryAuth::Basic {
                user: AUTH_USER.into(),
                password: wrong_password.into(),
            },
            "it refused the credentials of user AWS",
        ),
    ];
    for (what, auth, why) in cases {
        let err = image::push(&img, &repo, auth).await.unwrap_err();
        assert!(matches!(err, ImageError::Unauthorized { .. }), "{err:?}");
        let msg = err.to_string();
        eprintln!("{what}: {msg}");
        assert!(!msg.contains('\n'), "{what}: one line: {msg:?}");
        assert!(
            msg.starts_with(&format!(
                "authentication to the registry {} failed for {repo}: {why} (",
                reg.host
            )),
            "{what}: {msg}"
        );
        assert!(msg.contains("401 Unauthorized"), "{what}: {msg}");
        let all = format!("{msg} {err:?}");
        assert!(
            !all.contains(wrong_password) && !all.contains(AUTH_PASSWORD),
            "{what}: {all}"
        );
    }
    // Nothing was stored.
    let (_, name) = split(&repo);
    let (status, _, _) = http_as(
        "HEAD",
        &reg.host,
        &format!("/v2/{name}/manifests/{}", img.manifest_digest()),
        Some(image::MANIFEST_MEDIA_TYPE),
        AS_USER,
    );
    assert_eq!(status, 404);

    // The right ones: pushed, and the registry serves it back (with them only).
    let pushed = image::push_detailed(&img, &repo, good_auth(), &PushOptions::default())
        .await
        .unwrap();
    assert_eq!(pushed.pinned, format!("{repo}@{}", img.manifest_digest()));
    assert_eq!(pushed.uploaded.len(), 3, "{pushed:?}");
    assert!(pushed.manifest_written);
    let path = format!("/v2/{name}/manifests/{}", img.manifest_digest());
    let (status, headers, body) = http_as(
        "GET",
        &reg.host,
        &path,
        Some(image::MANIFEST_MEDIA_TYPE),
        AS_USER,
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(sha256(&body), img.manifest_digest());
    assert_eq!(
        headers.get("docker-content-digest").map(String::as_str),
        Some(img.manifest_digest())
    );
    let tag_path = format!("/v2/{name}/manifests/{}", pushed.tag.unwrap());
    let (status, _, by_tag) = http_as(
        "GET",
        &reg.host,
        &tag_path,
        Some(image::MANIFEST_MEDIA_TYPE),
        AS_USER,
    );
    assert_eq!((status, by_tag.as_slice()), (200, img.manifest()));
    assert_eq!(
        http("GET", &reg.host, &path, Some(image::MANIFEST_MEDIA_TYPE)).0,
        401
    );
}

#[tokio::test]
async fn the_runtime_layer_is_mounted_from_another_repository() {
    let reg = auth_registry(AUTH_USER, AUTH_PASSWORD);
    let tmp = tempfile::tempdir().unwrap();
    let runtime = fake_runtime(tmp.path());
    let features = build(&runtime, &bundle(&root(), SERVICE));
    let scoring = image::build(&ImageSpec {
        runtime_bin: runtime.clone(),
        bundle: &bundle(&root(), "customer-scoring"),
        service: "customer-scoring".into(),
        port: 8080,
    })
    .unwrap();
    let rt = scoring.layer(LayerKind::Runtime).clone();
    assert_eq!(rt.digest, features.layer(LayerKind::Runtime).digest);
    let (seed_path, other_path) = (
        "mesh/customer-mesh-customer-features",
        "mesh/customer-mesh-customer-scoring",
    );
    let seed = format!("{}/{seed_path}", reg.host);
    let other = format!("{}/{other_path}", reg.host);
    let mount = PushOptions {
        mount_from: Some(seed_path.into()),
    };

    let first = image::push_detailed(&features, &seed, good_auth(), &PushOptions::default())
        .await
        .unwrap();
    assert!(first.uploaded.contains(&rt.digest), "{first:?}");
    let second = image::push_detailed(&scoring, &other, good_auth(), &mount)
        .await
        .unwrap();
    eprintln!(
        "first push: {} bytes sent; second, mounting the runtime layer ({} bytes): {} bytes sent",
        first.uploaded_bytes, rt.size, second.uploaded_bytes
    );
    assert_eq!(second.mounted, vec![rt.digest.clone()], "{second:?}");
    assert!(!second.uploaded.contains(&rt.digest), "{second:?}");
    assert!(second.uploaded_bytes < rt.size, "{second:?}");
    assert_eq!(
        second.uploaded_bytes,
        scoring.layer(LayerKind::Bundle).size + scoring.config().len() as u64
    );
    assert!(second.manifest_written);
    // The other repository has the layer now, and the image is whole there.
    let (status, h, _) = http_as(
        "HEAD",
        &reg.host,
        &format!("/v2/{other_path}/blobs/{}", rt.digest),
        None,
        AS_USER,
    );
    assert_eq!(status, 200);
    assert_eq!(
        h.get("content-length").map(String::as_str),
        Some(&*rt.size.to_string())
    );
    let (status, _, body) = http_as(
        "GET",
        &reg.host,
        &format!("/v2/{other_path}/manifests/{}", scoring.manifest_digest()),
        Some(image::MANIFEST_MEDIA_TYPE),
        AS_USER,
    );
    assert_eq!(
        (status, sha256(&body)),
        (200, scoring.manifest_digest().into())
    );

    // Mounting from the repository itself: nothing to mount, all there.
    let own = PushOptions {
        mount_from: Some(other_path.into()),
    };
    let again = image::push_detailed(&scoring, &other, good_auth(), &own)
        .await
        .unwrap();
    assert!(
        again.mounted.is_empty() && again.uploaded.is_empty(),
        "{again:?}"
    );
    assert_eq!(again.existing.len(), 3);

    // A source without the layer: the registry declines (202), and it is sent instead.
    let third = format!("{}/mesh/customer-mesh-third", reg.host);
    let nowhere = PushOptions {
        mount_from: Some("mesh/no-such-repository".into()),
    };
    let fallback = image::push_detailed(&scoring, &third, good_auth(), &nowhere)
        .await
        .unwrap();
    assert!(fallback.mounted.is_empty(), "{fallback:?}");
    assert!(fallback.uploaded.contains(&rt.digest), "{fallback:?}");
    assert!(fallback.uploaded_bytes > rt.size);

    // Not a repository path of this registry: refused before anything is sent.
    for bad in [
        format!("{}/{seed_path}", reg.host),
        format!("{seed_path}:v1"),
        format!("{seed_path}@{}", rt.digest),
        "UPPER/case".to_owned(),
    ] {
        let opts = PushOptions {
            mount_from: Some(bad.clone()),
        };
        let err = image::push_detailed(&scoring, &other, good_auth(), &opts)
            .await
            .unwrap_err();
        assert!(
            matches!(err, ImageError::InvalidReference { .. }),
            "{bad}: {err:?}"
        );
        assert!(err.to_string().contains(&bad), "{err}");
    }
}

#[tokio::test]
async fn an_explicit_tag_is_written_once_and_moved_only_where_allowed() {
    let reg = auth_registry(AUTH_USER, AUTH_PASSWORD);
    let tmp = tempfile::tempdir().unwrap();
    let runtime = fake_runtime(tmp.path());
    let features = build(&runtime, &bundle(&root(), SERVICE));
    let scoring = image::build(&ImageSpec {
        runtime_bin: runtime.clone(),
        bundle: &bundle(&root(), "customer-scoring"),
        service: "customer-scoring".into(),
        port: 8080,
    })
    .unwrap();
    // One repository for the stack, one tag per service and image (as for ECR).
    let name = "mesh/customer-mesh";
    let tag = format!(
        "{SERVICE}.{}",
        features.manifest_digest().trim_start_matches("sha256:")
    );
    let tagged = format!("{}/{name}:{tag}", reg.host);

    let first = image::push_detailed(&features, &tagged, good_auth(), &PushOptions::default())
        .await
        .unwrap();
    assert_eq!(first.tag.as_deref(), Some(tag.as_str()));
    assert!(first.manifest_written, "{first:?}");
    assert_eq!(
        first.pinned,
        format!("{}/{name}@{}", reg.host, features.manifest_digest())
    );
    let second = image::push_detailed(&features, &tagged, good_auth(), &PushOptions::default())
        .await
        .unwrap();
    assert_eq!(second.tag.as_deref(), Some(tag.as_str()));
    assert!(
        !second.manifest_written,
        "the tag holds it already: {second:?}"
    );
    assert!(second.uploaded.is_empty(), "{second:?}");
    assert_eq!(second.pinned, first.pinned);

    // A tag that holds another image moves (this registry's tags are mutable).
    let moving = format!("{}/{name}:moving", reg.host);
    image::push(&scoring, &moving, good_auth()).await.unwrap();
    let moved = image::push_detailed(&features, &moving, good_auth(), &PushOptions::default())
        .await
        .unwrap();
    assert!(moved.manifest_written, "{moved:?}");
    let (status, h, _) = http_as(
        "HEAD",
        &reg.host,
        &format!("/v2/{name}/manifests/moving"),
        Some(image::MANIFEST_MEDIA_TYPE),
        AS_USER,
    );
    assert_eq!(status, 200);
    assert_eq!(
        h.get("docker-content-digest").map(String::as_str),
        Some(features.manifest_digest())
    );
    // The registry has those two tags, and no content-derived one.
    let (status, _, body) = http_as(
        "GET",
        &reg.host,
        &format!("/v2/{name}/tags/list"),
        None,
        AS_USER,
    );
    assert_eq!(status, 200);
    let list: Value = serde_json::from_slice(&body).unwrap();
    let mut tags: Vec<&str> = list["tags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    tags.sort();
    let mut want = vec!["moving", tag.as_str()];
    want.sort();
    assert_eq!(tags, want);

    // Read-only, the registry refuses every write (as ECR refuses to store a
    // manifest again under a tag that holds it, or to move an immutable tag).
    let reg = reg.restart_read_only();
    let tagged = format!("{}/{name}:{tag}", reg.host);
    let third = image::push_detailed(&features, &tagged, good_auth(), &PushOptions::default())
        .await
        .unwrap();
    assert!(
        !third.manifest_written && third.uploaded.is_empty(),
        "{third:?}"
    );
    assert_eq!(third.tag.as_deref(), Some(tag.as_str()));
    let untagged = format!("{}/{name}", reg.host);
    let fourth = image::push_detailed(&features, &untagged, good_auth(), &PushOptions::default())
        .await
        .unwrap();
    assert_eq!((fourth.tag, fourth.manifest_written), (None, false));
    // Moving the tag to another image: refused, and the error names the tag.
    let err = image::push(&scoring, &tagged, good_auth())
        .await
        .unwrap_err();
    let msg = err.to_string();
    eprintln!("moving a tag in a read-only registry: {msg}");
    assert!(matches!(err, ImageError::Registry { .. }), "{err:?}");
    assert!(msg.contains(&format!("under the tag {tag}")), "{msg}");
    assert!(!msg.contains('\n') && !msg.contains(AUTH_PASSWORD), "{msg}");
}

#[test]
fn bad_inputs_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let mut b = bundle(&root(), SERVICE);
    let missing = tmp.path().join("no-such-runtime");
    let err = image::build(&ImageSpec {
        runtime_bin: missing.clone(),
        bundle: &b,
        service: SERVICE.into(),
        port: 8080,
    })
    .unwrap_err();
    assert!(matches!(err, ImageError::ReadRuntime { .. }), "{err:?}");
    assert!(err.to_string().contains(&missing.display().to_string()));

    let runtime = fake_runtime(tmp.path());
    b.files.insert("../escape.csv".into(), runtime.clone());
    let err = image::build(&ImageSpec {
        runtime_bin: runtime,
        bundle: &b,
        service: SERVICE.into(),
        port: 8080,
    })
    .unwrap_err();
    assert!(matches!(err, ImageError::InvalidBundlePath { .. }), "{err}");
}

#[test]
fn oci_layout_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let img = build(&fake_runtime(tmp.path()), &bundle(&root(), SERVICE));
    let dir = tmp.path().join("layout");
    img.write_oci_layout(&dir, SERVICE).unwrap();
    let layout: Value =
        serde_json::from_slice(&std::fs::read(dir.join("oci-layout")).unwrap()).unwrap();
    assert_eq!(layout["imageLayoutVersion"], "1.0.0");
    let index: Value =
        serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap();
    assert_eq!(index["schemaVersion"], 2);
    assert_eq!(index["manifests"][0]["digest"], img.manifest_digest());
    assert_eq!(
        index["manifests"][0]["mediaType"],
        image::MANIFEST_MEDIA_TYPE
    );
    assert_eq!(
        index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"],
        SERVICE
    );
    let blobs: Vec<_> = std::fs::read_dir(dir.join("blobs/sha256"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(blobs.len(), 4, "manifest, config and two layers");
    for b in blobs {
        let name = b.file_name().unwrap().to_string_lossy().into_owned();
        assert_eq!(
            sha256(&std::fs::read(&b).unwrap()),
            format!("sha256:{name}")
        );
    }
}

/// The real static runtime, unpacked from the image into an otherwise empty
/// root and started there with the image's entrypoint (`chroot`, root only):
/// what a container runtime does with a `FROM scratch` image.
/// `scripts/test` builds the static runtime and sets `MESH_STATIC_RUNTIME`; by hand:
/// `MESH_STATIC_RUNTIME=$(scripts/build-static-runtime) cargo test --features kubernetes --test image`.
#[test]
fn static_runtime_runs_from_scratch() {
    let runtime = PathBuf::from(std::env::var("MESH_STATIC_RUNTIME").expect(
        "MESH_STATIC_RUNTIME must name the static runtime: run scripts/test, or MESH_STATIC_RUNTIME=$(scripts/build-static-runtime)",
    ));
    assert!(
        image::is_static_executable(&runtime).unwrap(),
        "{} is not statically linked",
        runtime.display()
    );
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let bundle = bundle(&root(), SERVICE);
    let img = image::build(&ImageSpec {
        runtime_bin: runtime,
        bundle: &bundle,
        service: SERVICE.into(),
        port,
    })
    .unwrap();

    // Unpack both layers, in order, into an empty root.
    let tmp = tempfile::tempdir().unwrap();
    let rootfs = tmp.path().join("rootfs");
    std::fs::create_dir_all(&rootfs).unwrap();
    for l in img.layers() {
        let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(l.data()));
        ar.set_preserve_permissions(true);
        ar.unpack(&rootfs).unwrap();
    }
    let c: Value = serde_json::from_slice(img.config()).unwrap();
    let entrypoint: Vec<String> =
        serde_json::from_value(c["config"]["Entrypoint"].clone()).unwrap();
    assert_eq!(entrypoint.last().unwrap(), &format!("0.0.0.0:{port}"));

    // The child's environment is empty (as in a scratch image): name chroot by its path.
    let chroot = ["/usr/sbin/chroot", "/usr/bin/chroot", "/sbin/chroot"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("chroot (coreutils) is needed");
    let mut child = std::process::Command::new(chroot)
        .arg(&rootfs)
        .args(&entrypoint)
        .env_clear()
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("chroot (needs root)");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let host = format!("127.0.0.1:{port}");
    let ready = loop {
        if let Ok(Some(status)) = child.try_wait() {
            let mut err = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            panic!("the runtime exited ({status}) in the scratch root: {err}");
        }
        if std::net::TcpStream::connect(&host).is_ok()
            && http("GET", &host, "/readyz", None).0 == 200
        {
            break true;
        }
        if std::time::Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let lookup = ready.then(|| {
        let mut s = std::net::TcpStream::connect(&host).unwrap();
        let body = r#"{"data": {"customer_id": "C00042"}}"#;
        write!(
            s,
            "POST /public/api/v1/{SERVICE}/demographics/lookup HTTP/1.0\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    });
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        ready,
        "the runtime did not become ready within 60 s in the scratch root"
    );
    let lookup = lookup.unwrap();
    assert!(
        lookup.starts_with("HTTP/1.0 200") || lookup.starts_with("HTTP/1.1 200"),
        "{lookup}"
    );
    assert!(lookup.contains("C00042"), "{lookup}");
}

/// Pushes of the same image to the same repository at the same time (two
/// pipelines releasing one service) all succeed: the registry may briefly
/// not know a blob another push is linking, and the push sends it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_pushes_of_one_image_to_one_repository_all_succeed() {
    let tmp = tempfile::tempdir().unwrap();
    let img = std::sync::Arc::new(build(&fake_runtime(tmp.path()), &bundle(&root(), SERVICE)));
    for round in 0..3 {
        let repo = unique_repo(&format!("race{round}"));
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..6 {
            let img = img.clone();
            let repo = repo.clone();
            set.spawn(async move {
                image::push_detailed(
                    &img,
                    &repo,
                    RegistryAuth::Anonymous,
                    &PushOptions::default(),
                )
                .await
            });
        }
        while let Some(r) = set.join_next().await {
            let pushed = r.unwrap().unwrap_or_else(|e| panic!("round {round}: {e}"));
            assert_eq!(pushed.pinned, format!("{repo}@{}", img.manifest_digest()));
        }
    }
}
