//! Daemonless OCI images of mesh services, and pushing them to a registry.
//!
//! An image is built from two inputs and nothing else: the statically linked
//! runtime binary (`scripts/build-static-runtime`) and a service's bundle
//! ([`BundlePlan`], from [`crate::bundle::bundle_for`]). It has two
//! layers, so a new model or dataset changes only the second one:
//!
//! | layer | content |
//! | --- | --- |
//! | runtime | `/mesh-runtime` (mode 0755) |
//! | bundle | `/bundle/service.json` and the bundle's files at their bundle paths |
//!
//! and runs `FROM scratch` with
//! `/mesh-runtime serve --bundle /bundle --listen 0.0.0.0:PORT`, as user
//! `65532:65532` when PORT ≥ 1024 (root otherwise, to be allowed to bind it);
//! files are root-owned and world-readable.
//!
//! **Reproducible**: the same inputs give the same manifest digest, byte for
//! byte, on any machine: tar entries are sorted, owned by 0:0 with fixed modes
//! and a fixed mtime (0, or `SOURCE_DATE_EPOCH` when set), gzip headers carry
//! no mtime nor file name, and the config has no `created` time. (The
//! compressed bytes also depend on the gzip implementation, which Cargo.lock
//! pins: flate2's pure-Rust backend at level [`GZIP_LEVEL`].) So the manifest
//! digest can pin a Deployment's image, and a changed model or dataset shows
//! up in `plan`.
//!
//! The flow for the Kubernetes provider:
//!
//! ```text
//! let bundle = mesh::bundle::bundle_for(&stack, service, &lookup_url);
//! let spec = image::ImageSpec { runtime_bin, bundle: &bundle, service: name.clone(), port: 8080 };
//! // CPU-bound (gzip: ~0.9 s for the first image of a process, whose runtime layer is then
//! // reused by every later build with the same binary): keep it off the async executor.
//! let image = tokio::task::block_in_place(|| image::build(&spec))?;
//! let pinned = image::push(&image, "127.0.0.1:5001/mesh/customer-features", image::RegistryAuth::Anonymous).await?;
//! // pinned == "127.0.0.1:5001/mesh/customer-features@sha256:…": the Deployment's `image`.
//! ```
//!
//! Pushing uses the OCI distribution API through `oci-client`: plain HTTP for
//! loopback registries (and those listed in `MESH_INSECURE_REGISTRIES`),
//! HTTPS otherwise. Blobs the registry already has are not sent again, and
//! the runtime layer, the same in every service's image, can be mounted from
//! another repository of the same registry instead of being sent
//! ([`PushOptions::mount_from`]).

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::bundle::BundlePlan;

/// Media type of the image manifest.
pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
/// Media type of the image config.
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";
/// Media type of both layers.
pub const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// Media type of an OCI layout's `index.json`.
pub const INDEX_MEDIA_TYPE: &str = "application/vnd.oci.image.index.v1+json";

/// Where the runtime binary lives in the image.
pub const RUNTIME_PATH: &str = "/mesh-runtime";
/// Where the bundle lives in the image.
pub const BUNDLE_DIR: &str = "/bundle";
/// Image label holding the mesh service name.
pub const SERVICE_LABEL: &str = "mesh.service";
/// Variable listing registries (`host:port`, comma-separated) to reach over
/// plain HTTP although they are not on loopback.
pub const INSECURE_REGISTRIES_ENV: &str = "MESH_INSECURE_REGISTRIES";
/// gzip level of the layers. Part of the digest: changing it changes every image.
pub const GZIP_LEVEL: u32 = 6;

/// The user the runtime runs as when the port needs no privilege
/// (distroless's `nonroot`); the image's files are root-owned and world-readable.
const NONROOT_USER: &str = "65532:65532";
/// The group of [`NONROOT_USER`]: a pod's `fsGroup`, so that it can read
/// the files of its Secret volume.
pub const NONROOT_GROUP: u32 = 65532;

/// What an image is built from.
pub struct ImageSpec<'a> {
    /// The runtime executable to ship as `/mesh-runtime`. It must be
    /// statically linked to run `FROM scratch` (see [`is_static_executable`]).
    pub runtime_bin: PathBuf,
    /// The service's bundle: `service.json` and its files.
    pub bundle: &'a BundlePlan,
    /// The mesh service name (image labels).
    pub service: String,
    /// The port the runtime listens on (`0.0.0.0:PORT`, exposed as `PORT/tcp`).
    pub port: u16,
}

/// Which of the two layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerKind {
    /// `/mesh-runtime`.
    Runtime,
    /// `/bundle/...`.
    Bundle,
}

impl fmt::Display for LayerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LayerKind::Runtime => "runtime",
            LayerKind::Bundle => "bundle",
        })
    }
}

/// One gzip-compressed tar layer.
#[derive(Clone)]
pub struct Layer {
    pub kind: LayerKind,
    /// `sha256:…` of the compressed blob (the manifest's layer digest).
    pub digest: String,
    /// `sha256:…` of the uncompressed tar (the config's `rootfs.diff_ids`).
    pub diff_id: String,
    /// Compressed size in bytes (what is pushed and pulled).
    pub size: u64,
    /// Uncompressed tar size in bytes.
    pub uncompressed_size: u64,
    data: Vec<u8>,
}

impl Layer {
    /// The compressed blob.
    pub fn data(&self) -> &[u8] {
        &self.data
    }
}

impl fmt::Debug for Layer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Layer")
            .field("kind", &self.kind)
            .field("digest", &self.digest)
            .field("diff_id", &self.diff_id)
            .field("size", &self.size)
            .field("uncompressed_size", &self.uncompressed_size)
            .finish()
    }
}

/// A built image: manifest, config and layers, all in memory.
#[derive(Clone)]
pub struct Image {
    manifest: Vec<u8>,
    manifest_digest: String,
    config: Vec<u8>,
    config_digest: String,
    layers: Vec<Layer>,
}

impl fmt::Debug for Image {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Image")
            .field("manifest_digest", &self.manifest_digest)
            .field("config_digest", &self.config_digest)
            .field("layers", &self.layers)
            .finish()
    }
}

impl Image {
    /// `sha256:…` of the manifest: the image's identity, to pin by.
    pub fn manifest_digest(&self) -> &str {
        &self.manifest_digest
    }

    /// The manifest, exactly the bytes that are pushed.
    pub fn manifest(&self) -> &[u8] {
        &self.manifest
    }

    /// `sha256:…` of the config blob.
    pub fn config_digest(&self) -> &str {
        &self.config_digest
    }

    /// The config blob (JSON).
    pub fn config(&self) -> &[u8] {
        &self.config
    }

    /// The layers: runtime, then bundle.
    pub fn layers(&self) -> &[Layer] {
        &self.layers
    }

    /// The layer of the given kind.
    pub fn layer(&self, kind: LayerKind) -> &Layer {
        self.layers
            .iter()
            .find(|l| l.kind == kind)
            .expect("an image has both layers")
    }

    /// The blobs a push sends: each layer (with its kind), then the config
    /// (`None`): digest and bytes.
    fn blobs(&self) -> impl Iterator<Item = (Option<LayerKind>, &str, &[u8])> {
        self.layers
            .iter()
            .map(|l| (Some(l.kind), l.digest.as_str(), l.data.as_slice()))
            .chain([(None, self.config_digest.as_str(), self.config.as_slice())])
    }

    /// Bytes a registry stores for this image: manifest, config and compressed layers.
    pub fn total_size(&self) -> u64 {
        self.manifest.len() as u64
            + self.config.len() as u64
            + self.layers.iter().map(|l| l.size).sum::<u64>()
    }

    /// `repository@sha256:…` for a repository such as `127.0.0.1:5001/mesh/customer-features`.
    pub fn pinned(&self, repository: &str) -> String {
        format!("{repository}@{}", self.manifest_digest)
    }

    /// Writes the image as an OCI image layout folder (`oci-layout`,
    /// `index.json`, `blobs/sha256/…`), e.g. for `skopeo inspect oci:DIR`.
    /// `index.json` names the image `ref_name`
    /// (`org.opencontainers.image.ref.name`).
    pub fn write_oci_layout(&self, dir: &Path, ref_name: &str) -> Result<(), ImageError> {
        let werr = |path: &Path| {
            let path = path.to_path_buf();
            move |source| ImageError::WriteLayout { path, source }
        };
        let blobs = dir.join("blobs").join("sha256");
        std::fs::create_dir_all(&blobs).map_err(werr(&blobs))?;
        let put = |digest: &str, data: &[u8]| -> Result<(), ImageError> {
            let p = blobs.join(digest.trim_start_matches("sha256:"));
            std::fs::write(&p, data).map_err(werr(&p))
        };
        put(&self.manifest_digest, &self.manifest)?;
        put(&self.config_digest, &self.config)?;
        for l in &self.layers {
            put(&l.digest, &l.data)?;
        }
        let layout = dir.join("oci-layout");
        std::fs::write(&layout, br#"{"imageLayoutVersion":"1.0.0"}"#).map_err(werr(&layout))?;
        let index = Index {
            schema_version: 2,
            media_type: INDEX_MEDIA_TYPE,
            manifests: vec![IndexEntry {
                media_type: MANIFEST_MEDIA_TYPE,
                digest: self.manifest_digest.clone(),
                size: self.manifest.len() as u64,
                annotations: BTreeMap::from([(
                    "org.opencontainers.image.ref.name".to_owned(),
                    ref_name.to_owned(),
                )]),
            }],
        };
        let path = dir.join("index.json");
        std::fs::write(&path, json(&index)).map_err(werr(&path))
    }
}

/// Why an image could not be built or pushed.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(
        "cannot read the runtime binary {}: {source} (build it with scripts/build-static-runtime)",
        path.display()
    )]
    ReadRuntime {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read {} for bundle file {bundle_path}: {source}", path.display())]
    ReadBundleFile {
        bundle_path: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("bundle path {bundle_path:?} is not a plain relative path inside the bundle")]
    InvalidBundlePath { bundle_path: String },
    #[error("cannot write the {layer} layer: {source}")]
    Archive {
        layer: LayerKind,
        source: std::io::Error,
    },
    #[error("cannot write the OCI layout at {}: {source}", path.display())]
    WriteLayout {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid image reference {reference:?}: {message}")]
    InvalidReference { reference: String, message: String },
    #[error(
        "cannot reach the registry {registry} ({url}): {message}; is it running and reachable from here?"
    )]
    Unreachable {
        registry: String,
        url: String,
        message: String,
    },
    /// 401 or 403: no credentials given, or refused. Never shows the password.
    #[error("authentication to the registry {registry} failed for {reference}: {why} ({message})")]
    Unauthorized {
        registry: String,
        reference: String,
        /// "it requires credentials and none were given", or "it refused the
        /// credentials of user NAME".
        why: String,
        message: String,
    },
    #[error("the registry {registry} failed to {operation} for {reference}: {message}")]
    Registry {
        registry: String,
        reference: String,
        operation: String,
        message: String,
    },
}

/// Builds the image of a service. Deterministic: the same runtime binary and
/// bundle (config and file contents) give the same digests. CPU-bound (gzip);
/// the runtime layer is compressed once per process and binary, then reused.
pub fn build(spec: &ImageSpec<'_>) -> Result<Image, ImageError> {
    let mtime = source_date_epoch();

    // Layer 1: the runtime binary.
    let runtime = std::fs::read(&spec.runtime_bin).map_err(|source| ImageError::ReadRuntime {
        path: spec.runtime_bin.clone(),
        source,
    })?;
    let runtime_layer = runtime_layer(runtime, mtime)?;

    // Layer 2: the bundle.
    let root = BUNDLE_DIR.trim_start_matches('/');
    let mut entries = BTreeMap::new();
    entries.insert(format!("{root}/"), Entry::Dir);
    let mut service_json =
        serde_json::to_vec_pretty(&spec.bundle.config).expect("a service config serializes");
    service_json.push(b'\n');
    entries.insert(
        format!("{root}/{}", mesh_runtime::config::SERVICE_FILE),
        Entry::File {
            data: service_json,
            mode: 0o644,
        },
    );
    for (rel, src) in &spec.bundle.files {
        if !plain_relative(rel) || rel == mesh_runtime::config::SERVICE_FILE {
            return Err(ImageError::InvalidBundlePath {
                bundle_path: rel.clone(),
            });
        }
        // Its parent folders (each once: a map).
        for (i, _) in rel.match_indices('/') {
            entries.insert(format!("{root}/{}/", &rel[..i]), Entry::Dir);
        }
        let data = std::fs::read(src).map_err(|source| ImageError::ReadBundleFile {
            bundle_path: rel.clone(),
            path: src.clone(),
            source,
        })?;
        entries.insert(format!("{root}/{rel}"), Entry::File { data, mode: 0o644 });
    }
    let bundle_layer = layer(LayerKind::Bundle, &entries, mtime)?;
    drop(entries);

    // Config.
    let port = format!("{}/tcp", spec.port);
    let mut labels = BTreeMap::from([
        (
            "org.opencontainers.image.title".to_owned(),
            spec.service.clone(),
        ),
        (SERVICE_LABEL.to_owned(), spec.service.clone()),
    ]);
    if let Some(v) = &spec.bundle.config.version {
        labels.insert("org.opencontainers.image.version".to_owned(), v.clone());
    }
    let config = ImageConfig {
        architecture: "amd64",
        os: "linux",
        config: RunConfig {
            user: (spec.port >= 1024).then_some(NONROOT_USER),
            exposed_ports: BTreeMap::from([(port, Empty {})]),
            entrypoint: vec![
                RUNTIME_PATH.to_owned(),
                "serve".to_owned(),
                "--bundle".to_owned(),
                BUNDLE_DIR.to_owned(),
                "--listen".to_owned(),
                format!("0.0.0.0:{}", spec.port),
            ],
            working_dir: "/",
            labels,
        },
        rootfs: RootFs {
            kind: "layers",
            diff_ids: vec![runtime_layer.diff_id.clone(), bundle_layer.diff_id.clone()],
        },
        history: vec![
            History {
                created_by: "mesh: runtime binary /mesh-runtime".to_owned(),
            },
            History {
                created_by: format!("mesh: bundle of service {} at /bundle", spec.service),
            },
        ],
    };
    let config = json(&config);
    let config_digest = sha256(&config);

    let manifest = Manifest {
        schema_version: 2,
        media_type: MANIFEST_MEDIA_TYPE,
        config: Descriptor {
            media_type: CONFIG_MEDIA_TYPE,
            digest: config_digest.clone(),
            size: config.len() as u64,
        },
        layers: [&runtime_layer, &bundle_layer]
            .iter()
            .map(|l| Descriptor {
                media_type: LAYER_MEDIA_TYPE,
                digest: l.digest.clone(),
                size: l.size,
            })
            .collect(),
    };
    let manifest = json(&manifest);
    let manifest_digest = sha256(&manifest);
    Ok(Image {
        manifest,
        manifest_digest,
        config,
        config_digest,
        layers: vec![runtime_layer, bundle_layer],
    })
}

/// The runtime layer, compressed once per process for a given binary: every
/// service of a stack shares it, and gzip is most of a build's time.
fn runtime_layer(runtime: Vec<u8>, mtime: u64) -> Result<Layer, ImageError> {
    static LAST: std::sync::Mutex<Option<(String, Layer)>> = std::sync::Mutex::new(None);
    let key = format!("{}/{mtime}/{GZIP_LEVEL}", sha256(&runtime));
    if let Some((k, l)) = &*LAST.lock().unwrap_or_else(|p| p.into_inner())
        && *k == key
    {
        return Ok(l.clone());
    }
    let mut entries = BTreeMap::new();
    entries.insert(
        RUNTIME_PATH.trim_start_matches('/').to_owned(),
        Entry::File {
            data: runtime,
            mode: 0o755,
        },
    );
    let l = layer(LayerKind::Runtime, &entries, mtime)?;
    *LAST.lock().unwrap_or_else(|p| p.into_inner()) = Some((key, l.clone()));
    Ok(l)
}

/// Whether `path` is an ELF executable without a program interpreter, i.e.
/// one that can start in an empty (`FROM scratch`) file system.
pub fn is_static_executable(path: &Path) -> std::io::Result<bool> {
    let b = std::fs::read(path)?;
    if b.len() < 64 || &b[..4] != b"\x7fELF" || b[4] != 2 || b[5] != 1 {
        return Ok(false); // not a little-endian ELF64
    }
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(b[0x20..0x28].try_into().expect("8 bytes")) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    const PT_INTERP: u32 = 3;
    for i in 0..phnum {
        let o = phoff + i * phentsize;
        let Some(p) = b.get(o..o + 4) else {
            return Ok(false);
        };
        if u32::from_le_bytes(p.try_into().expect("4 bytes")) == PT_INTERP {
            return Ok(false);
        }
    }
    Ok(true)
}

// ---------------------------------------------------------------- layers

enum Entry {
    Dir,
    File { data: Vec<u8>, mode: u32 },
}

/// A writer that hashes and counts what passes through it.
struct Hashing<W> {
    inner: W,
    hash: Sha256,
    len: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// A tar+gzip layer of `entries` (tar path → entry, already in order).
fn layer(
    kind: LayerKind,
    entries: &BTreeMap<String, Entry>,
    mtime: u64,
) -> Result<Layer, ImageError> {
    let err = |source| ImageError::Archive {
        layer: kind,
        source,
    };
    // No mtime nor file name in the gzip header; OS "unknown".
    let gz = flate2::GzBuilder::new()
        .operating_system(255)
        .write(Vec::new(), flate2::Compression::new(GZIP_LEVEL));
    let mut tar = tar::Builder::new(Hashing {
        inner: gz,
        hash: Sha256::new(),
        len: 0,
    });
    for (path, entry) in entries {
        let mut h = tar::Header::new_gnu(); // GNU: long names allowed
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(mtime);
        h.set_username("").map_err(err)?;
        h.set_groupname("").map_err(err)?;
        match entry {
            Entry::Dir => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                h.set_size(0);
                tar.append_data(&mut h, path, std::io::empty())
                    .map_err(err)?;
            }
            Entry::File { data, mode } => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                h.set_size(data.len() as u64);
                tar.append_data(&mut h, path, data.as_slice())
                    .map_err(err)?;
            }
        }
    }
    let hashing = tar.into_inner().map_err(err)?;
    let diff_id = format!("sha256:{}", hex::encode(hashing.hash.finalize()));
    let uncompressed_size = hashing.len;
    let data = hashing.inner.finish().map_err(err)?;
    Ok(Layer {
        kind,
        digest: sha256(&data),
        diff_id,
        size: data.len() as u64,
        uncompressed_size,
        data,
    })
}

fn plain_relative(rel: &str) -> bool {
    !rel.is_empty()
        && !rel.contains('\\')
        && !rel.ends_with('/')
        && Path::new(rel)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
        && !rel.split('/').any(str::is_empty)
}

fn source_date_epoch() -> u64 {
    std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// Compact JSON; key order is the structs' field order (maps are BTreeMaps),
/// so the bytes are stable.
fn json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("image JSON serializes")
}

// ---------------------------------------------------------------- OCI JSON

#[derive(Serialize)]
struct Empty {}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    media_type: &'static str,
    digest: String,
    size: u64,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Manifest {
    schema_version: u32,
    media_type: &'static str,
    config: Descriptor,
    layers: Vec<Descriptor>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct IndexEntry {
    media_type: &'static str,
    digest: String,
    size: u64,
    annotations: BTreeMap<String, String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Index {
    schema_version: u32,
    media_type: &'static str,
    manifests: Vec<IndexEntry>,
}

#[derive(Serialize)]
struct ImageConfig {
    architecture: &'static str,
    os: &'static str,
    config: RunConfig,
    rootfs: RootFs,
    history: Vec<History>,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct RunConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<&'static str>,
    exposed_ports: BTreeMap<String, Empty>,
    entrypoint: Vec<String>,
    working_dir: &'static str,
    labels: BTreeMap<String, String>,
}

#[derive(Serialize)]
struct RootFs {
    #[serde(rename = "type")]
    kind: &'static str,
    diff_ids: Vec<String>,
}

#[derive(Serialize)]
struct History {
    created_by: String,
}

// ---------------------------------------------------------------- push

/// Credentials for a registry. Never printed: `Debug` hides the password.
///
/// ECR: `GetAuthorizationToken` returns `authorizationToken`, the base64 of
/// `AWS:<password>`; decode it and split at the first `:` into
/// `Basic { user: "AWS", password }` (valid 12 hours). The registry host is
/// the `proxyEndpoint` without `https://`.
#[derive(Clone, Default)]
pub enum RegistryAuth {
    #[default]
    Anonymous,
    Basic {
        user: String,
        password: String,
    },
}

impl fmt::Debug for RegistryAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RegistryAuth::Anonymous => f.write_str("Anonymous"),
            RegistryAuth::Basic { user, .. } => f
                .debug_struct("Basic")
                .field("user", user)
                .field("password", &"<hidden>")
                .finish(),
        }
    }
}

/// How to push, beyond where and with which credentials.
#[derive(Clone, Debug, Default)]
pub struct PushOptions {
    /// A repository of the same registry, as a path without the host (e.g.
    /// `mesh/customer-mesh-customer-features`), that already holds the
    /// runtime layer: when the target repository lacks it, the registry is
    /// asked to mount it from there (`POST …/blobs/uploads/?mount=…&from=…`)
    /// instead of it being sent. A registry that declines (or a source
    /// without the layer) means a normal upload. Only the runtime layer is
    /// tried: the bundle layer and the config differ per service.
    pub mount_from: Option<String>,
}

/// What a push did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pushed {
    /// `registry/repository@sha256:…`, to put in a Deployment.
    pub pinned: String,
    /// The tag that names the manifest: the reference's (whether this push
    /// wrote it or found it there, see `manifest_written`), else
    /// `mesh-<manifest sha256 hex>` (see [`push_detailed`]); `None` when the
    /// reference named no tag and the registry already had the manifest.
    pub tag: Option<String>,
    /// Whether this push stored the manifest. `false` when the reference
    /// named no tag and the registry had the manifest, or when the named tag
    /// already held exactly this manifest (registries with immutable tags,
    /// such as ECR, refuse to store it again).
    pub manifest_written: bool,
    /// Digests of the blobs (layers, config) sent.
    pub uploaded: Vec<String>,
    /// Digests of the blobs mounted from [`PushOptions::mount_from`] (not sent).
    pub mounted: Vec<String>,
    /// Digests of the blobs the repository already had.
    pub existing: Vec<String>,
    /// Bytes of blobs sent (mounted and existing blobs count nothing).
    pub uploaded_bytes: u64,
}

/// Pushes `image` to `reference` (`registry/repository[:tag]`, e.g.
/// `127.0.0.1:5001/mesh/customer-features`) with default options and returns
/// `registry/repository@sha256:…`. See [`push_detailed`].
pub async fn push(
    image: &Image,
    reference: &str,
    auth: RegistryAuth,
) -> Result<String, ImageError> {
    Ok(
        push_detailed(image, reference, auth, &PushOptions::default())
            .await?
            .pinned,
    )
}

/// The registry (`host[:port]`) and the repository path (without the host)
/// of an image reference such as `127.0.0.1:5001/mesh/customer-features:v1`.
pub fn registry_and_repository(reference: &str) -> Result<(String, String), ImageError> {
    let parsed = parse_reference(reference)?;
    Ok((parsed.registry().to_owned(), parsed.repository().to_owned()))
}

fn parse_reference(reference: &str) -> Result<oci_client::Reference, ImageError> {
    reference
        .parse()
        .map_err(|e: oci_client::ParseError| ImageError::InvalidReference {
            reference: reference.to_owned(),
            message: e.to_string(),
        })
}

/// Pushes `image` with the OCI distribution API: each blob the repository
/// lacks (checked with `HEAD`; the runtime layer mounted from
/// [`PushOptions::mount_from`] when given and possible, else sent), then the
/// manifest, byte for byte as built (so the registry's digest is
/// [`Image::manifest_digest`]).
///
/// The manifest is stored under the reference's tag, or, without one, under
/// the content-derived tag `mesh-<hex of the manifest digest>` (registries
/// such as ECR answer a push by digest without a `Location`, and a tag that
/// never moves suits immutable-tag repositories); with no tag given and the
/// manifest already present, nothing is written at all. With a tag given,
/// the registry is first asked what the tag holds: when it is this manifest,
/// nothing is written (ECR refuses to store a manifest again under a tag
/// that holds it); when it is another one, the manifest is pushed, which
/// moves the tag in a mutable repository and fails, with the registry's
/// message, in an immutable one.
///
/// Plain HTTP is used for loopback registries (`127.0.0.0/8`, `localhost`,
/// `[::1]`) and those listed in `MESH_INSECURE_REGISTRIES`; HTTPS otherwise.
pub async fn push_detailed(
    image: &Image,
    reference: &str,
    auth: RegistryAuth,
    options: &PushOptions,
) -> Result<Pushed, ImageError> {
    use oci_client::client::{ClientConfig, ClientProtocol};
    use oci_client::{Reference, RegistryOperation};

    let parsed = parse_reference(reference)?;
    if let Some(d) = parsed.digest()
        && d != image.manifest_digest()
    {
        return Err(ImageError::InvalidReference {
            reference: reference.to_owned(),
            message: format!(
                "it names digest {d}, but the image is {}",
                image.manifest_digest()
            ),
        });
    }
    let registry = parsed.registry().to_owned();
    let repository = format!("{registry}/{}", parsed.repository());
    let pinned = image.pinned(&repository);
    let insecure = plain_http(parsed.resolve_registry());
    let scheme = if insecure { "http" } else { "https" };
    let at = |tag: &str| {
        Reference::with_tag(
            registry.clone(),
            parsed.repository().to_owned(),
            tag.to_owned(),
        )
    };
    let by_digest = Reference::with_digest(
        registry.clone(),
        parsed.repository().to_owned(),
        image.manifest_digest().to_owned(),
    );
    // The repository to mount the runtime layer from: another one, valid, same registry.
    let mount_source = match options.mount_from.as_deref() {
        Some(from) if from != parsed.repository() => {
            let invalid = || ImageError::InvalidReference {
                reference: reference.to_owned(),
                message: format!(
                    "the repository to mount from, {from:?}, is not a repository path of {registry} (no host, tag nor digest)"
                ),
            };
            if from.contains([':', '@']) {
                return Err(invalid());
            }
            let source = parse_reference(&format!("{registry}/{from}")).map_err(|_| invalid())?;
            if source.registry() != registry {
                return Err(invalid());
            }
            Some(source)
        }
        _ => None,
    };

    // reqwest is built without a TLS provider of its own: use ring, as kube does.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = oci_client::Client::new(ClientConfig {
        protocol: if insecure {
            ClientProtocol::HttpsExcept(vec![parsed.resolve_registry().to_owned()])
        } else {
            ClientProtocol::Https
        },
        connect_timeout: Some(Duration::from_secs(10)),
        read_timeout: Some(Duration::from_secs(120)),
        ..ClientConfig::default()
    });
    let oci_auth = match &auth {
        RegistryAuth::Anonymous => oci_client::secrets::RegistryAuth::Anonymous,
        RegistryAuth::Basic { user, password } => {
            oci_client::secrets::RegistryAuth::Basic(user.clone(), password.clone())
        }
    };
    let fail = |operation: &str, e: oci_client::errors::OciDistributionError| {
        registry_error(
            &registry,
            reference,
            &format!("{scheme}://{}/v2/", parsed.resolve_registry()),
            &auth,
            operation,
            e,
        )
    };

    // GET /v2/ (reachability, and the auth challenge).
    client
        .auth(&parsed, &oci_auth, RegistryOperation::Push)
        .await
        .map_err(|e| fail("authenticate", e))?;

    let mut pushed = Pushed {
        pinned,
        tag: None,
        manifest_written: false,
        uploaded: Vec::new(),
        mounted: Vec::new(),
        existing: Vec::new(),
        uploaded_bytes: 0,
    };
    for (kind, digest, data) in image.blobs() {
        let have = transient_retry(|| client.blob_exists(&parsed, digest))
            .await
            .map_err(|e| fail(&format!("check blob {digest}"), e))?;
        if have {
            pushed.existing.push(digest.to_owned());
            continue;
        }
        if let Some(source) = &mount_source
            && kind == Some(LayerKind::Runtime)
        {
            // 201: mounted. Anything else (202: declined, an upload session
            // was opened instead; 404; denied) means sending it after all.
            if client.mount_blob(&parsed, source, digest).await.is_ok() {
                pushed.mounted.push(digest.to_owned());
                continue;
            }
        }
        transient_retry(|| client.push_blob(&parsed, data.to_vec(), digest))
            .await
            .map_err(|e| fail(&format!("upload blob {digest}"), e))?;
        pushed.uploaded.push(digest.to_owned());
        pushed.uploaded_bytes += data.len() as u64;
    }

    // The parser defaults the tag to `latest`: only a tag written in the reference counts.
    let named_tag = reference
        .split('@')
        .next()
        .and_then(|n| n.rsplit('/').next())
        .is_some_and(|last| last.contains(':'));
    let holds_this = |r: Reference| {
        let client = &client;
        let oci_auth = &oci_auth;
        async move {
            client
                .fetch_manifest_digest(&r, oci_auth)
                .await
                .is_ok_and(|d| d == image.manifest_digest())
        }
    };
    // (tag, whether to write the manifest under it)
    let (tag, write) = match parsed.tag().filter(|_| named_tag) {
        Some(t) => (Some(t.to_owned()), !holds_this(at(t)).await),
        None => {
            let present = holds_this(by_digest).await;
            let tag = format!(
                "mesh-{}",
                image.manifest_digest().trim_start_matches("sha256:")
            );
            ((!present).then_some(tag), !present)
        }
    };
    if let Some(tag) = tag.as_deref().filter(|_| write) {
        let mut resent = false;
        loop {
            let target = at(tag);
            match transient_retry(|| {
                client.push_manifest_raw(
                    &target,
                    image.manifest.clone(),
                    MANIFEST_MEDIA_TYPE.parse().expect("a valid header value"),
                )
            })
            .await
            {
                Ok(_) => pushed.manifest_written = true,
                // Refused, but the tag holds this manifest now (another push of
                // the same image won the race, or the registry refuses to store a
                // manifest again under a tag that already holds it): done.
                Err(_) if holds_this(at(tag)).await => {}
                // A blob the registry said it had (or had just taken) is unknown
                // to it now: concurrent pushes of the same blob, or a registry
                // whose storage is only eventually consistent. Send those blobs
                // again, once, and store the manifest again.
                Err(e) if !resent && e.to_string().contains("MANIFEST_BLOB_UNKNOWN") => {
                    resent = true;
                    let named = e.to_string();
                    let lost = image.blobs().filter(|(_, d, _)| named.contains(d));
                    for (_, digest, data) in lost {
                        transient_retry(|| client.push_blob(&parsed, data.to_vec(), digest))
                            .await
                            .map_err(|e| fail(&format!("upload blob {digest}"), e))?;
                        if !pushed.uploaded.iter().any(|u| u == digest) {
                            pushed.uploaded.push(digest.to_owned());
                            pushed.uploaded_bytes += data.len() as u64;
                        }
                    }
                    continue;
                }
                Err(e) => {
                    return Err(fail(
                        &format!(
                            "store the manifest {} under the tag {tag}",
                            image.manifest_digest()
                        ),
                        e,
                    ));
                }
            }
            break;
        }
    }
    pushed.tag = tag;
    Ok(pushed)
}

/// Runs a registry call again (twice at most, after 100 then 400 ms) when
/// it failed in a way that may pass: a 5xx, or the connection. Registries
/// answer 500 while another push links the same blob (Debian's
/// docker-registry reads a half-written link file), and ECR throttles.
async fn transient_retry<T, F, Fut>(
    mut call: F,
) -> Result<T, oci_client::errors::OciDistributionError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, oci_client::errors::OciDistributionError>>,
{
    let mut delay = Duration::from_millis(100);
    let mut attempt = 1;
    loop {
        match call().await {
            Err(e) if attempt < 3 && is_transient(&e) => {
                tokio::time::sleep(delay).await;
                delay *= 4;
                attempt += 1;
            }
            other => return other,
        }
    }
}

fn is_transient(e: &oci_client::errors::OciDistributionError) -> bool {
    use oci_client::errors::OciDistributionError as E;
    match e {
        E::ServerError { code, .. } => *code >= 500 || *code == 429,
        E::RequestError(r) => {
            r.is_connect()
                || r.is_timeout()
                || r.status()
                    .is_some_and(|s| s.is_server_error() || s.as_u16() == 429)
        }
        _ => false,
    }
}

fn plain_http(registry: &str) -> bool {
    let host = match registry.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && p.chars().all(|c| c.is_ascii_digit()) => h,
        _ => registry,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    loopback
        || std::env::var(INSECURE_REGISTRIES_ENV)
            .unwrap_or_default()
            .split(',')
            .any(|r| !r.trim().is_empty() && r.trim() == registry)
}

/// The error and its causes, `: `-joined (reqwest hides "connection refused" in a source).
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

fn registry_error(
    registry: &str,
    reference: &str,
    url: &str,
    auth: &RegistryAuth,
    operation: &str,
    e: oci_client::errors::OciDistributionError,
) -> ImageError {
    use oci_client::errors::OciDistributionError as E;
    // One line: registries answer with (multi-line) JSON bodies.
    let message = chain(&e).split_whitespace().collect::<Vec<_>>().join(" ");
    let denied = |code: u16| code == 401 || code == 403;
    let unauthorized = |message: String| ImageError::Unauthorized {
        registry: registry.to_owned(),
        reference: reference.to_owned(),
        why: match auth {
            RegistryAuth::Anonymous => "it requires credentials and none were given".to_owned(),
            RegistryAuth::Basic { user, .. } => {
                format!("it refused the credentials of user {user}")
            }
        },
        message,
    };
    match &e {
        E::RequestError(r) if r.is_connect() || r.is_timeout() => ImageError::Unreachable {
            registry: registry.to_owned(),
            url: url.to_owned(),
            message,
        },
        E::AuthenticationFailure(_) | E::UnauthorizedError { .. } => unauthorized(message),
        E::ServerError { code, .. } if denied(*code) => unauthorized(message),
        E::RequestError(r) if r.status().is_some_and(|s| denied(s.as_u16())) => {
            unauthorized(message)
        }
        _ => ImageError::Registry {
            registry: registry.to_owned(),
            reference: reference.to_owned(),
            operation: operation.to_owned(),
            message,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_only_for_loopback_or_listed() {
        assert!(plain_http("127.0.0.1:5001"));
        assert!(plain_http("localhost:5000"));
        assert!(plain_http("[::1]:5000"));
        assert!(!plain_http("123456789012.dkr.ecr.us-east-1.amazonaws.com"));
        assert!(!plain_http("registry.example.com:5000"));
    }

    #[test]
    fn bundle_paths_must_stay_inside() {
        for ok in ["datasets/a.csv", "models/m.onnx", "x"] {
            assert!(plain_relative(ok), "{ok}");
        }
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../b",
            "a//b",
            "a/",
            "./a",
            "a\\b",
        ] {
            assert!(!plain_relative(bad), "{bad}");
        }
    }

    #[test]
    fn auth_debug_hides_the_password() {
        let a = RegistryAuth::Basic {
            user: "AWS".into(),
            password: "s3cret".into(),
        };
        assert!(!format!("{a:?}").contains("s3cret"));
    }
}
