//! The runtime images of a stack's services: their digests at plan time
//! (built, not pushed) and their push at apply time, through [`crate::image`].
//!
//! Building an image gzips the runtime binary (about a second), so digests
//! are remembered in `<stack>/.mesh/<env>/kubernetes-images.json`, keyed by
//! everything the image is made of (the runtime binary's content, the
//! bundle's digest, the service and port, `SOURCE_DATE_EPOCH`): a plan of an
//! unchanged stack builds nothing. Apply always builds again and checks the
//! digest against the plan's before pushing.
//!
//! Every service's image has the same runtime layer. Pushes run concurrently,
//! each service to its own repository, so the first push of that layer to a
//! registry sends it and the others wait for it, then have the registry
//! mount it from the first one's repository (see [`Images::push`]).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use sha2::{Digest, Sha256};

use crate::bundle::{BundlePlan, bundle_digest};
use crate::image::{self, ImageSpec, LayerKind, PushOptions, Pushed, RegistryAuth};

/// Finds the runtime binary images ship: `MESH_RUNTIME_STATIC_BIN`, else the
/// `mesh-runtime` beside the `mesh` executable (which clusters can run only
/// if it is statically linked: build it with `scripts/build-static-runtime`).
pub fn find_runtime() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("MESH_RUNTIME_STATIC_BIN").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    [dir.join("mesh-runtime"), dir.join("../mesh-runtime")]
        .into_iter()
        .find(|c| c.is_file())
}

/// Builds and pushes the images of one stack and environment.
pub struct Images {
    runtime: Option<PathBuf>,
    runtime_digest: OnceLock<Result<String, String>>,
    cache_file: Mutex<Option<PathBuf>>,
    cache: Mutex<BTreeMap<String, String>>,
    /// (registry host, runtime layer digest) → the repository path the
    /// layer was first pushed to, once that push has succeeded.
    seeds: Mutex<HashMap<(String, String), Seed>>,
}

/// The repository path a runtime layer was first pushed to, once that push succeeded.
type Seed = Arc<tokio::sync::OnceCell<String>>;

impl Images {
    pub fn new(runtime: Option<PathBuf>) -> Self {
        Images {
            runtime,
            runtime_digest: OnceLock::new(),
            cache_file: Mutex::new(None),
            cache: Mutex::new(BTreeMap::new()),
            seeds: Mutex::new(HashMap::new()),
        }
    }

    pub fn runtime(&self) -> Option<&Path> {
        self.runtime.as_deref()
    }

    fn runtime_or_err(&self) -> Result<&Path, String> {
        self.runtime.as_deref().ok_or_else(|| {
            "cannot find the runtime binary for the service image: build it with `scripts/build-static-runtime` and set MESH_RUNTIME_STATIC_BIN (clusters need the statically linked one)".to_owned()
        })
    }

    /// Remembers digests in `dir` (created on first write).
    pub fn use_cache_dir(&self, dir: &Path) {
        let file = dir.join("kubernetes-images.json");
        let loaded: BTreeMap<String, String> = std::fs::read_to_string(&file)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
        *self.cache.lock().unwrap_or_else(|e| e.into_inner()) = loaded;
        *self.cache_file.lock().unwrap_or_else(|e| e.into_inner()) = Some(file);
    }

    fn key(&self, service: &str, bundle: &BundlePlan, port: u16) -> Result<String, String> {
        let runtime = self.runtime_or_err()?;
        let rt = self
            .runtime_digest
            .get_or_init(|| {
                let mut h = Sha256::new();
                let mut f = std::fs::File::open(runtime).map_err(|e| {
                    format!("cannot read the runtime binary {}: {e}", runtime.display())
                })?;
                std::io::copy(&mut f, &mut h).map_err(|e| {
                    format!("cannot read the runtime binary {}: {e}", runtime.display())
                })?;
                Ok(hex::encode(h.finalize()))
            })
            .clone()?;
        let bundle =
            bundle_digest(bundle).map_err(|e| format!("reading the bundle's files: {e}"))?;
        let epoch = std::env::var("SOURCE_DATE_EPOCH").unwrap_or_default();
        let mut h = Sha256::new();
        h.update(format!("image/1\0{rt}\0{bundle}\0{service}\0{port}\0{epoch}").as_bytes());
        Ok(hex::encode(h.finalize()))
    }

    /// Many digests at once, built in parallel where not remembered.
    pub fn digests(
        &self,
        wanted: &[(&str, &BundlePlan)],
        port: u16,
    ) -> Vec<Result<String, String>> {
        let keys: Vec<Result<String, String>> =
            wanted.iter().map(|(s, b)| self.key(s, b, port)).collect();
        let mut out: Vec<Option<Result<String, String>>> = {
            let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            keys.iter()
                .map(|k| match k {
                    Err(e) => Some(Err(e.clone())),
                    Ok(k) => cache.get(k).cloned().map(Ok),
                })
                .collect()
        };
        let todo: Vec<usize> = (0..wanted.len()).filter(|i| out[*i].is_none()).collect();
        if todo.is_empty() {
            return out
                .into_iter()
                .map(|o| o.unwrap_or_else(|| Err("no digest".into())))
                .collect();
        }
        let workers = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .min(todo.len())
            .max(1);
        let built: Mutex<Vec<(usize, Result<String, String>)>> = Mutex::new(Vec::new());
        let next = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..workers {
                s.spawn(|| {
                    loop {
                        let n = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        let Some(&i) = todo.get(n) else { break };
                        let (service, bundle) = wanted[i];
                        let r = self
                            .build(service, bundle, port)
                            .map(|img| img.manifest_digest().to_owned());
                        built.lock().unwrap_or_else(|e| e.into_inner()).push((i, r));
                    }
                });
            }
        });
        let built = built.into_inner().unwrap_or_else(|e| e.into_inner());
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        for (i, r) in built {
            if let (Ok(d), Ok(k)) = (&r, &keys[i]) {
                cache.insert(k.clone(), d.clone());
            }
            out[i] = Some(r);
        }
        if let Some(file) = self
            .cache_file
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            write_cache(file, &cache);
        }
        out.into_iter()
            .map(|o| o.unwrap_or_else(|| Err("no digest".into())))
            .collect()
    }

    fn build(&self, service: &str, bundle: &BundlePlan, port: u16) -> Result<image::Image, String> {
        let spec = ImageSpec {
            runtime_bin: self.runtime_or_err()?.to_owned(),
            bundle,
            service: service.to_owned(),
            port,
        };
        image::build(&spec).map_err(|e| format!("building the image: {e}"))
    }

    /// Builds the image again, checks it is the planned one, and pushes it
    /// to `repository` (`host/repo`, or `host/repo:tag` to store the
    /// manifest under that tag). Returns `host/repo@sha256:...`.
    ///
    /// The first push of a runtime layer to a registry sends it; concurrent
    /// and later pushes of the same layer to other repositories of that
    /// registry wait for that one and mount the layer from its repository
    /// (a registry that declines gets it sent). A first push that fails
    /// leaves the next one to be the first.
    pub async fn push(
        &self,
        service: &str,
        bundle: BundlePlan,
        port: u16,
        planned_digest: &str,
        repository: &str,
        auth: RegistryAuth,
    ) -> Result<String, String> {
        self.push_detailed(service, bundle, port, planned_digest, repository, auth)
            .await
            .map(|p| p.pinned)
    }

    /// [`Images::push`], telling what was sent, mounted or already there.
    async fn push_detailed(
        &self,
        service: &str,
        bundle: BundlePlan,
        port: u16,
        planned_digest: &str,
        repository: &str,
        auth: RegistryAuth,
    ) -> Result<Pushed, String> {
        let runtime = self.runtime_or_err()?.to_owned();
        let svc = service.to_owned();
        let img = tokio::task::spawn_blocking(move || {
            let spec = ImageSpec {
                runtime_bin: runtime,
                bundle: &bundle,
                service: svc,
                port,
            };
            image::build(&spec).map_err(|e| format!("building the image: {e}"))
        })
        .await
        .map_err(|e| format!("building the image: {e}"))??;
        if img.manifest_digest() != planned_digest {
            return Err(format!(
                "the image is {} but the plan has {planned_digest}: the runtime or the bundle changed since the plan; plan again",
                img.manifest_digest()
            ));
        }
        let (registry, path) =
            image::registry_and_repository(repository).map_err(|e| e.to_string())?;
        let runtime_layer = img.layer(LayerKind::Runtime).digest.clone();
        let seed = self
            .seeds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((registry, runtime_layer))
            .or_default()
            .clone();
        // The first push (or the next one after a failed first) sends the
        // layer; the others wait here until it is in the registry.
        let mut first = None;
        let seeded = seed
            .get_or_try_init(|| async {
                let pushed =
                    image::push_detailed(&img, repository, auth.clone(), &PushOptions::default())
                        .await?;
                first = Some(pushed);
                Ok::<_, image::ImageError>(path.clone())
            })
            .await
            .map_err(|e| e.to_string())?;
        if let Some(pushed) = first {
            return Ok(pushed);
        }
        let options = PushOptions {
            mount_from: (*seeded != path).then(|| seeded.clone()),
        };
        image::push_detailed(&img, repository, auth, &options)
            .await
            .map_err(|e| e.to_string())
    }
}

fn write_cache(file: &Path, cache: &BTreeMap<String, String>) {
    let Some(dir) = file.parent() else { return };
    if std::fs::create_dir_all(dir).is_err() {
        return;
    }
    // Write then rename, so a concurrent reader never sees half a file.
    let tmp = dir.join(format!(".kubernetes-images.{}.tmp", std::process::id()));
    if std::fs::write(&tmp, serde_json::to_vec_pretty(cache).unwrap_or_default()).is_ok() {
        let _ = std::fs::rename(&tmp, file);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The registry of `scripts/services` (`MESH_TEST_REGISTRY`).
    fn registry() -> String {
        match std::env::var("MESH_TEST_REGISTRY") {
            Ok(r) if !r.is_empty() => r,
            _ => panic!(
                "MESH_TEST_REGISTRY is not set: this test needs the OCI registry on loopback; \
                 run `scripts/services start` and `eval \"$(scripts/services env)\"` (scripts/test does both)"
            ),
        }
    }

    fn bundle(service: &str) -> BundlePlan {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let stack = crate::stack::load(&root.join("stacks/customer-mesh"), Some("local"))
            .unwrap_or_else(|e| panic!("loading stacks/customer-mesh: {e:?}"));
        let svc = stack
            .services
            .get(service)
            .unwrap_or_else(|| panic!("no service {service}"));
        crate::bundle::bundle_for(&stack, svc, &|n| format!("http://{n}:8080"))
    }

    /// Concurrent pushes of two services to two repositories of one registry
    /// send the runtime layer once; the other mounts it, and so does a later
    /// push to a third repository; a push to the first one's repository finds it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_runtime_layer_is_sent_once_per_registry() {
        let tmp = tempfile::tempdir().unwrap();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        // A runtime of its own (512 KiB that gzip cannot shrink, xorshift),
        // so its layer is new to the registry and larger than a bundle's.
        let runtime = tmp.path().join("mesh-runtime");
        let mut data = format!("\x7fELF runtime of the seeding test {nanos}\n").into_bytes();
        let mut x = 0x9e37_79b9_7f4a_7c15_u64 ^ nanos as u64;
        data.extend((0..512 * 1024).map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        }));
        std::fs::write(&runtime, data).unwrap();
        let images = Images::new(Some(runtime));

        let services = ["customer-features", "customer-scoring"];
        let (b0, b1) = (bundle(services[0]), bundle(services[1]));
        let digests: Vec<String> = images
            .digests(&[(services[0], &b0), (services[1], &b1)], 8080)
            .into_iter()
            .map(Result::unwrap)
            .collect();
        let base = format!(
            "{}/mesh-test/seeding-{}-{nanos}",
            registry(),
            std::process::id()
        );
        let repo = |s: &str| format!("{base}-{s}");
        let rt = images
            .build(services[0], &b0, 8080)
            .unwrap()
            .layer(LayerKind::Runtime)
            .clone();

        let auth = RegistryAuth::Anonymous;
        let (r0, r1) = (repo(services[0]), repo(services[1]));
        let (a, b) = tokio::join!(
            images.push_detailed(services[0], b0, 8080, &digests[0], &r0, auth.clone()),
            images.push_detailed(
                services[1],
                bundle(services[1]),
                8080,
                &digests[1],
                &r1,
                auth.clone()
            ),
        );
        let (a, b) = (a.unwrap(), b.unwrap());
        let sent: Vec<&Pushed> = [&a, &b]
            .into_iter()
            .filter(|p| p.uploaded.contains(&rt.digest))
            .collect();
        assert_eq!(sent.len(), 1, "sent once: {a:?} {b:?}");
        let (seed, other) = if sent[0] == &a { (&a, &b) } else { (&b, &a) };
        assert_eq!(other.mounted, vec![rt.digest.clone()], "{other:?}");
        assert!(other.uploaded_bytes < rt.size, "{other:?}");
        assert!(seed.mounted.is_empty(), "{seed:?}");

        // Later: a third repository mounts it too; the seed's repository has it.
        let third = images
            .push_detailed(
                services[1],
                bundle(services[1]),
                8080,
                &digests[1],
                &repo("third"),
                auth.clone(),
            )
            .await
            .unwrap();
        assert_eq!(third.mounted, vec![rt.digest.clone()], "{third:?}");
        let seed_repo = seed.pinned.split('@').next().unwrap();
        let seed_service = if seed == &a { services[0] } else { services[1] };
        let seed_bundle = bundle(seed_service);
        let seed_digest = if seed == &a { &digests[0] } else { &digests[1] };
        let again = images
            .push_detailed(
                seed_service,
                seed_bundle,
                8080,
                seed_digest,
                &format!("{seed_repo}:again"),
                auth,
            )
            .await
            .unwrap();
        assert!(
            again.mounted.is_empty() && again.uploaded.is_empty(),
            "{again:?}"
        );
        assert_eq!(again.tag.as_deref(), Some("again"));
        assert!(again.manifest_written);
    }
}
