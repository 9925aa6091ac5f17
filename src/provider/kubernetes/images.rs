//! The runtime images of a stack's services: their digests at plan time
//! (built, not pushed) and their push at apply time, through [`crate::image`].
//!
//! Building an image gzips the runtime binary (about a second), so digests
//! are remembered in `<stack>/.mesh/<env>/kubernetes-images.json`, keyed by
//! everything the image is made of (the runtime binary's content, the
//! bundle's digest, the service and port, `SOURCE_DATE_EPOCH`): a plan of an
//! unchanged stack builds nothing. Apply always builds again and checks the
//! digest against the plan's before pushing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use sha2::{Digest, Sha256};

use crate::image::{self, ImageSpec, RegistryAuth};
use crate::provider::local::{BundlePlan, bundle_digest};

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
}

impl Images {
    pub fn new(runtime: Option<PathBuf>) -> Self {
        Images {
            runtime,
            runtime_digest: OnceLock::new(),
            cache_file: Mutex::new(None),
            cache: Mutex::new(BTreeMap::new()),
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
    /// to `repository`. Returns `repository@sha256:...`.
    pub async fn push(
        &self,
        service: &str,
        bundle: BundlePlan,
        port: u16,
        planned_digest: &str,
        repository: &str,
        auth: RegistryAuth,
    ) -> Result<String, String> {
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
        image::push(&img, repository, auth)
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
