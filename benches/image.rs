//! Run with: scripts/bench-image (builds the static runtime first), or
//! `MESH_STATIC_RUNTIME=$(scripts/build-static-runtime) cargo bench --features kubernetes --bench image`.
//!
//! Builds the image of every service of `stacks/customer-mesh` with the real
//! static runtime and prints, per service: build time (the first build of the
//! process compresses the runtime layer; later ones, and other services, reuse
//! it), compressed and uncompressed size of each layer, the total, and —
//! when `MESH_TEST_REGISTRY` is set — the time of a first push and of a re-push
//! (nothing to send) to that registry. Then, with a registry, the time and the
//! bytes sent to push [`SERVICES`] images (one per service, each to its own
//! repository) with and without mounting the runtime layer from the first
//! one's repository (`PushOptions::mount_from`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mesh::bundle::bundle_for;
use mesh::image::{self, ImageSpec, LayerKind, RegistryAuth};

const RUNS: usize = 5;
/// Services (repositories) of the mount comparison.
const SERVICES: usize = 10;
/// The goal for the runtime layer, compressed.
const RUNTIME_LAYER_GOAL: u64 = 25 * 1024 * 1024;

fn mb(bytes: u64) -> String {
    format!("{:.2} MB", bytes as f64 / 1_048_576.0)
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

fn main() {
    let runtime = PathBuf::from(std::env::var("MESH_STATIC_RUNTIME").unwrap_or_else(|_| {
        eprintln!("MESH_STATIC_RUNTIME is not set: run scripts/bench-image, or set it to $(scripts/build-static-runtime)");
        std::process::exit(2)
    }));
    let is_static = image::is_static_executable(&runtime)
        .unwrap_or_else(|e| panic!("cannot read the runtime {}: {e}", runtime.display()));
    let registry = std::env::var("MESH_TEST_REGISTRY")
        .ok()
        .filter(|r| !r.is_empty());
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let stack = mesh::stack::load(&root.join("stacks/customer-mesh"), Some("local"))
        .unwrap_or_else(|e| panic!("loading stacks/customer-mesh: {e:?}"));
    let rt = tokio::runtime::Runtime::new().unwrap();

    println!(
        "runtime {} ({}, {})",
        runtime.display(),
        mb(std::fs::metadata(&runtime).unwrap().len()),
        if is_static { "static" } else { "NOT static" }
    );
    println!();
    println!(
        "| service | build #1 | builds #2-{RUNS} (median) | runtime layer gz / tar | bundle layer gz / tar | image total | first push | re-push |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    let mut over_goal = false;
    for (name, svc) in &stack.services {
        let bundle = bundle_for(&stack, svc, &|s| format!("http://{s}:8080"));
        let spec = ImageSpec {
            runtime_bin: runtime.clone(),
            bundle: &bundle,
            service: name.clone(),
            port: 8080,
        };
        let mut times = Vec::new();
        let mut img = None;
        for _ in 0..RUNS {
            let t = Instant::now();
            let built = image::build(&spec).unwrap();
            times.push(t.elapsed());
            if let Some(prev) = &img {
                let prev: &image::Image = prev;
                assert_eq!(
                    prev.manifest_digest(),
                    built.manifest_digest(),
                    "not reproducible"
                );
            }
            img = Some(built);
        }
        let first = times[0];
        let mut later = times[1..].to_vec();
        later.sort();
        let img = img.unwrap();
        let (r, b) = (img.layer(LayerKind::Runtime), img.layer(LayerKind::Bundle));
        over_goal |= r.size >= RUNTIME_LAYER_GOAL;
        let (pushed, again) = match &registry {
            Some(reg) => {
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos();
                let repo = format!("{reg}/mesh-bench/{name}-{nanos}");
                let t = Instant::now();
                rt.block_on(image::push(&img, &repo, RegistryAuth::Anonymous))
                    .unwrap();
                let push_time = t.elapsed();
                let t = Instant::now();
                let p = rt
                    .block_on(image::push_detailed(
                        &img,
                        &repo,
                        RegistryAuth::Anonymous,
                        &image::PushOptions::default(),
                    ))
                    .unwrap();
                assert!(p.uploaded.is_empty());
                (ms(push_time), ms(t.elapsed()))
            }
            None => ("(no MESH_TEST_REGISTRY)".into(), "-".into()),
        };
        println!(
            "| {name} | {} | {} | {} / {} | {} / {} | {} | {pushed} | {again} |",
            ms(first),
            ms(later[later.len() / 2]),
            mb(r.size),
            mb(r.uncompressed_size),
            mb(b.size),
            mb(b.uncompressed_size),
            mb(img.total_size()),
        );
    }
    if let Some(reg) = &registry {
        mount_figures(&rt, &runtime, &stack, reg);
    }
    println!();
    println!(
        "goal: runtime layer under {} compressed: {}",
        mb(RUNTIME_LAYER_GOAL),
        if over_goal { "MISSED" } else { "met" }
    );
    if over_goal {
        std::process::exit(1);
    }
}

/// Pushes [`SERVICES`] images (the first service's bundle under SERVICES
/// names: same runtime layer, a config of their own) to as many new
/// repositories, each way, and prints time and bytes sent.
fn mount_figures(
    rt: &tokio::runtime::Runtime,
    runtime: &Path,
    stack: &mesh::stack::Stack,
    registry: &str,
) {
    let (name, svc) = stack.services.iter().next().expect("a service");
    let bundle = bundle_for(stack, svc, &|s| format!("http://{s}:8080"));
    let images: Vec<image::Image> = (0..SERVICES)
        .map(|i| {
            image::build(&ImageSpec {
                runtime_bin: runtime.to_path_buf(),
                bundle: &bundle,
                service: format!("{name}-{i}"),
                port: 8080,
            })
            .unwrap()
        })
        .collect();
    let runtime_layer = images[0].layer(LayerKind::Runtime).size;
    println!();
    println!(
        "{SERVICES} service images (runtime layer {}), each pushed to its own new repository, one after the other:",
        mb(runtime_layer)
    );
    println!();
    println!("| runtime layer | time | sent | runtime layers sent / mounted |");
    println!("| --- | --- | --- | --- |");
    for mount in [false, true] {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let base = format!("mesh-bench/mount-{mount}-{nanos}");
        let (mut sent, mut sent_layers, mut mounted) = (0, 0, 0);
        let t = Instant::now();
        for (i, img) in images.iter().enumerate() {
            let options = image::PushOptions {
                mount_from: (mount && i > 0).then(|| format!("{base}-0")),
            };
            let p = rt
                .block_on(image::push_detailed(
                    img,
                    &format!("{registry}/{base}-{i}"),
                    RegistryAuth::Anonymous,
                    &options,
                ))
                .unwrap();
            let digest = &img.layer(LayerKind::Runtime).digest;
            sent += p.uploaded_bytes;
            sent_layers += usize::from(p.uploaded.contains(digest));
            mounted += usize::from(p.mounted.contains(digest));
        }
        println!(
            "| {} | {} | {} | {sent_layers} / {mounted} |",
            if mount {
                "mounted from the first repository"
            } else {
                "sent to every repository"
            },
            ms(t.elapsed()),
            mb(sent),
        );
    }
}
