//! Per-row latency of the model engine on the parity fixtures.
//!
//! Run with: `cargo bench -p mesh-runtime --bench model`
//!
//! Each model is measured at batch 1 (a real-time request) and batch 256;
//! criterion's throughput is in rows, so "elem/s" reads as rows per second
//! and time / 256 is the per-row cost of the large batch.

use std::hint::black_box;
use std::path::PathBuf;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use mesh_runtime::model::{Batch, Column, Model};
use serde_json::Value;

fn fixture(name: &str) -> (Model, Vec<Column>) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/models");
    let model =
        Model::from_bytes(&std::fs::read(dir.join(format!("{name}.onnx"))).expect("read model"))
            .expect("load");
    let expected: Value = serde_json::from_slice(
        &std::fs::read(dir.join(format!("{name}.expected.json"))).expect("read fixture"),
    )
    .expect("json");
    let columns = expected["inputs"]
        .as_array()
        .expect("inputs")
        .iter()
        .map(|input| {
            let values = input["values"].as_array().expect("values");
            match input["kind"].as_str() {
                Some("str") => Column::Str(
                    values
                        .iter()
                        .map(|v| v.as_str().unwrap_or("").to_owned())
                        .collect(),
                ),
                _ => Column::F32(
                    values
                        .iter()
                        .map(|v| v.as_f64().unwrap_or(0.0) as f32)
                        .collect(),
                ),
            }
        })
        .collect();
    (model, columns)
}

/// `n` rows taken cyclically from the fixture rows.
fn batch(columns: &[Column], n: usize) -> Batch {
    let cols = columns
        .iter()
        .map(|c| match c {
            Column::F32(v) => Column::F32((0..n).map(|i| v[i % v.len()]).collect()),
            Column::Str(v) => Column::Str((0..n).map(|i| v[i % v.len()].clone()).collect()),
            other => other.clone(),
        })
        .collect();
    Batch::new(cols).expect("batch")
}

fn bench(c: &mut Criterion) {
    for name in ["logistic", "forest", "gbt"] {
        let (model, columns) = fixture(name);
        let mut group = c.benchmark_group(name);
        for size in [1usize, 256] {
            group.throughput(Throughput::Elements(size as u64));
            if size == 1 {
                // Cycle through distinct rows so tree paths vary between calls.
                let rows: Vec<Batch> = (0..64)
                    .map(|r| {
                        let one: Vec<Column> = columns
                            .iter()
                            .map(|c| match c {
                                Column::F32(v) => Column::F32(vec![v[r]]),
                                Column::Str(v) => Column::Str(vec![v[r].clone()]),
                                other => other.clone(),
                            })
                            .collect();
                        Batch::new(one).expect("batch")
                    })
                    .collect();
                let mut i = 0;
                group.bench_function(BenchmarkId::new("batch", size), |b| {
                    b.iter(|| {
                        i = (i + 1) % rows.len();
                        black_box(model.predict(black_box(&rows[i])).expect("predict"))
                    })
                });
            } else {
                let big = batch(&columns, size);
                group.bench_function(BenchmarkId::new("batch", size), |b| {
                    b.iter(|| black_box(model.predict(black_box(&big)).expect("predict")))
                });
            }
        }
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
