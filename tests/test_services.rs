//! The services the test command starts (`scripts/services`) listen on ports outside the kernel's
//! ephemeral range: an outgoing connection that happens to hold such a port makes the service's
//! bind fail at random ("could not bind ... Address already in use").

use std::path::Path;
use std::process::Command;

/// The kernel's ephemeral port range (`net.ipv4.ip_local_port_range`), Linux's default if unreadable.
fn ephemeral_range() -> (u16, u16) {
    let text =
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    let mut parts = text.split_whitespace().filter_map(|p| p.parse().ok());
    match (parts.next(), parts.next()) {
        (Some(lo), Some(hi)) => (lo, hi),
        _ => (32768, 60999),
    }
}

fn services_script() -> Command {
    let mut cmd = Command::new("bash");
    cmd.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/services"));
    // The defaults, not whatever a developer exported.
    for var in [
        "MESH_MOTO_PORT",
        "MESH_PG_PORT",
        "MESH_REGISTRY_PORT",
        "MESH_FAKESNOW_PORT",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

#[test]
fn every_service_port_is_outside_the_ephemeral_range() {
    let out = services_script()
        .arg("ports")
        .output()
        .expect("run scripts/services ports");
    assert!(
        out.status.success(),
        "scripts/services ports failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let ports: Vec<(String, u16)> = text
        .lines()
        .map(|line| {
            let (svc, port) = line.split_once(' ').expect("`SERVICE PORT` lines");
            (svc.to_owned(), port.parse().expect("a port number"))
        })
        .collect();
    assert!(
        ports.len() >= 3,
        "expected moto, postgres and registry at least, got {ports:?}"
    );
    let (lo, hi) = ephemeral_range();
    let inside: Vec<_> = ports
        .iter()
        .filter(|(_, p)| (lo..=hi).contains(p))
        .collect();
    assert!(
        inside.is_empty(),
        "service ports inside the ephemeral range {lo}-{hi}: {inside:?}"
    );
}

#[test]
fn a_port_inside_the_ephemeral_range_is_refused_before_anything_starts() {
    let (lo, hi) = ephemeral_range();
    let port = lo + (hi - lo) / 2;
    let run_dir = tempfile::tempdir().unwrap();
    let out = services_script()
        .arg("start")
        .env("MESH_PG_PORT", port.to_string())
        .env("MESH_SERVICES_DIR", run_dir.path())
        .output()
        .expect("run scripts/services start");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "start with postgres on {port} succeeded: {stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "port {port} is inside the kernel's ephemeral port range"
        )),
        "unexpected error: {stderr}"
    );
    // Refused before anything ran: no lock file, no pid file in the run dir.
    let entries: Vec<_> = std::fs::read_dir(run_dir.path()).unwrap().collect();
    assert!(
        entries.is_empty(),
        "start left {} entries in its run dir",
        entries.len()
    );
}
