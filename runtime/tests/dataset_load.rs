//! Loading 1,000,000 CSV rows: seconds, not minutes, and at most twice the
//! file's size in memory. (`scripts/bench-runtime` reports the release-build
//! figures; this test holds the line in any build.)

use std::collections::BTreeMap;
use std::io::Write;
use std::time::{Duration, Instant};

use mesh_runtime::config::Duplicates;
use mesh_runtime::dataset::{Dataset, KeyRef, ValueRef};

const ROWS: usize = 1_000_000;

fn write_rows(path: &std::path::Path, kind: &str) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).expect("create"));
    match kind {
        // Like behavior.csv: a key, two money columns, two counts.
        "behavior" => {
            writeln!(
                f,
                "customer_id,total_spend_30d,orders_90d,days_since_last_order,avg_basket"
            )
            .expect("w");
            for i in 0..ROWS {
                writeln!(
                    f,
                    "C{i:07},{}.{:02},{},{},{}.{:02}",
                    (i * 7919) % 2000,
                    i % 100,
                    i % 13,
                    i % 120,
                    (i * 31) % 300,
                    (i * 3) % 100
                )
                .expect("w");
            }
        }
        // Like customers.csv: a key, an int, three categoricals, a flag.
        _ => {
            writeln!(f, "customer_id,age,gender,region,campaign,loyalty_member").expect("w");
            let regions = ["north", "south", "east", "west", "central"];
            let campaigns = ["none", "spring_sale", "loyalty_push", "winback", "referral"];
            for i in 0..ROWS {
                writeln!(
                    f,
                    "C{i:07},{},{},{},{},{}",
                    18 + i % 63,
                    ["F", "M", "X"][i % 3],
                    regions[i % 5],
                    campaigns[(i / 5) % 5],
                    i % 2
                )
                .expect("w");
            }
        }
    }
    f.flush().expect("flush");
}

fn load_and_measure(kind: &str) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join(format!("{kind}.csv"));
    write_rows(&path, kind);
    let raw = std::fs::metadata(&path).expect("stat").len() as usize;
    let started = Instant::now();
    let ds = Dataset::load_csv(
        kind,
        &path,
        "customer_id",
        Duplicates::Error,
        &BTreeMap::new(),
    )
    .expect("loads");
    let took = started.elapsed();
    let heap = ds.heap_bytes();
    eprintln!(
        "{kind}: {ROWS} rows, {:.1} MiB CSV loaded in {:.2} s; {:.1} MiB in memory ({:.2}x)",
        raw as f64 / 1048576.0,
        took.as_secs_f64(),
        heap as f64 / 1048576.0,
        heap as f64 / raw as f64
    );
    assert_eq!(ds.rows(), ROWS);
    assert_eq!(ds.keys(), ROWS);
    let r = ds.find(KeyRef::Str("C0999999")).expect("last key");
    assert_eq!(r, ROWS - 1);
    assert!(matches!(
        ds.value(r, 1),
        ValueRef::Float(_) | ValueRef::Int(_)
    ));
    assert!(
        heap <= 2 * raw,
        "{heap} bytes in memory for {raw} bytes of CSV"
    );
    // Unoptimised test builds are ~10x slower than release; still seconds.
    assert!(took < Duration::from_secs(60), "took {took:?}");
}

#[test]
fn million_behavior_rows() {
    load_and_measure("behavior");
}

#[test]
fn million_customer_rows() {
    load_and_measure("customers");
}
