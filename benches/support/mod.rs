//! What the plan benchmarks share: the real `mesh` binary run as a user
//! runs it (a fresh process per command, timed from spawn to exit), the
//! real runtime binary (never a stand-in), and the summary of a series of
//! timings beside a floor measured in the same run.

#![allow(dead_code)] // each bench uses its part

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// `mesh ARGS` (the binary of this build), with `NO_COLOR` and stdin closed.
pub fn mesh(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mesh"));
    cmd.args(args)
        .env("NO_COLOR", "1")
        .stdin(std::process::Stdio::null());
    cmd
}

/// Runs `cmd` to its exit: its output and the wall time from spawn to exit.
pub fn timed(cmd: &mut Command) -> (Output, Duration) {
    let started = Instant::now();
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    (out, started.elapsed())
}

/// Panics with the command's output unless it exited with `code`.
pub fn expect_code(out: &Output, code: i32, what: &str) {
    assert_eq!(
        out.status.code(),
        Some(code),
        "{what}: exit {:?}\n--- stdout\n{}--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The runtime binary the images ship: `MESH_RUNTIME_STATIC_BIN`, else the
/// release `mesh-runtime` beside this bench. Refuses (panics) when neither
/// is an executable ELF file: figures taken with a shell-script stand-in
/// would measure a few bytes of layer instead of the real runtime.
pub fn real_runtime() -> PathBuf {
    let beside = std::env::current_exe().ok().and_then(|exe| {
        // target/release/deps/BENCH-HASH → target/release/mesh-runtime
        Some(exe.parent()?.parent()?.join("mesh-runtime"))
    });
    let path = std::env::var_os("MESH_RUNTIME_STATIC_BIN")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .or(beside)
        .unwrap_or_default();
    let head = std::fs::read(&path)
        .map(|b| b.get(..4).map(<[u8]>::to_vec).unwrap_or_default())
        .unwrap_or_default();
    assert!(
        head == b"\x7fELF",
        "no real runtime binary at `{}` (set MESH_RUNTIME_STATIC_BIN, or build it: \
         `cargo build --release -p mesh-runtime`, `scripts/build-static-runtime`); \
         this bench does not run on a stand-in",
        path.display()
    );
    path
}

/// A file's size in MB.
pub fn megabytes(path: &Path) -> f64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0) as f64 / 1e6
}

/// Median, min and max of a series of timings.
pub struct Series {
    pub median: Duration,
    pub min: Duration,
    pub max: Duration,
    pub runs: usize,
}

impl Series {
    pub fn of(mut times: Vec<Duration>) -> Series {
        assert!(!times.is_empty(), "no timings");
        times.sort();
        Series {
            median: times[times.len() / 2],
            min: times[0],
            max: times[times.len() - 1],
            runs: times.len(),
        }
    }

    /// `median M ms (min, max over N runs)`.
    pub fn text(&self) -> String {
        format!(
            "median {:.0} ms (min {:.0}, max {:.0} over {} runs)",
            ms(self.median),
            ms(self.min),
            ms(self.max),
            self.runs
        )
    }

    /// This series' median over `floor`'s: comparable across machines and loads.
    pub fn ratio(&self, floor: &Series) -> f64 {
        self.median.as_secs_f64() / floor.median.as_secs_f64()
    }
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The floor of a `mesh` command: `mesh validate` of the same stack and
/// environment (process start, reading and checking the stack; no
/// provider), `runs` times.
pub fn validate_floor(stack: &Path, env: &str, runs: usize, envs: &[(&str, &str)]) -> Series {
    let stack = stack.to_str().expect("utf-8 path");
    Series::of(
        (0..runs)
            .map(|_| {
                let (out, t) =
                    timed(mesh(&["validate", stack, "--env", env]).envs(envs.iter().copied()));
                expect_code(&out, 0, "mesh validate");
                t
            })
            .collect(),
    )
}

/// The machine's load averages (`/proc/loadavg`): the figures are only as
/// quiet as the machine was.
pub fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}
