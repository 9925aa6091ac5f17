//! Loopback ports of local services.
//!
//! A service exposed with an explicit `node_port` listens on it. Every other
//! service gets a port from [`RANGE`], which lies below both the Kubernetes
//! NodePort range (30000–32767, where explicit ports and other stacks live)
//! and the kernel's ephemeral range (32768–60999, where outgoing connections
//! take their source port). A port once given is recorded in the service's
//! local state and kept: adding or removing other services never moves it.
//! A new port is the service's preferred slot (a hash of stack, environment
//! and service, so it does not depend on the other services), or the next
//! slot that no other service of the stack holds and no program on this
//! machine listens on.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::RangeInclusive;

use sha2::{Digest, Sha256};

use crate::stack::{ExposeKind, Stack};

/// Where allocated ports come from.
pub const RANGE: RangeInclusive<u16> = 20000..=29999;

/// The explicit `node_port` of `service`, if an exposure gives it one (the
/// stack check makes sure there is at most one on the local target).
pub fn explicit(stack: &Stack, service: &str) -> Option<u16> {
    stack.exposes.values().find_map(|e| match e.kind {
        ExposeKind::NodePort {
            node_port: Some(p), ..
        } if e.service == service => Some(p),
        _ => None,
    })
}

/// The port of every service of `stack`. `recorded` holds the ports services
/// were started on (live state), `free` tells whether no program listens on
/// a port. A recorded port from [`RANGE`] is kept; a service without one
/// gets a new port (see the module doc).
pub fn allocate(
    stack: &Stack,
    recorded: &BTreeMap<String, u16>,
    free: &dyn Fn(u16) -> bool,
) -> BTreeMap<String, u16> {
    let mut out = BTreeMap::new();
    let mut taken: BTreeSet<u16> = BTreeSet::new();
    let mut pending = Vec::new();
    for name in stack.services.keys() {
        if let Some(p) = explicit(stack, name) {
            out.insert(name.clone(), p);
            taken.insert(p);
        }
    }
    for name in stack.services.keys() {
        if out.contains_key(name) {
            continue;
        }
        match recorded.get(name) {
            Some(&p) if RANGE.contains(&p) && !taken.contains(&p) => {
                out.insert(name.clone(), p);
                taken.insert(p);
            }
            _ => pending.push(name),
        }
    }
    let size = u32::from(RANGE.end() - RANGE.start()) + 1;
    for name in pending {
        let preferred = preferred_slot(stack, name, size);
        let port = (0..size)
            .map(|i| RANGE.start() + ((preferred + i) % size) as u16)
            .find(|p| !taken.contains(p) && free(*p));
        // Every slot taken: fall back on the preferred one, and let apply
        // say that it is in use.
        let port = port.unwrap_or(RANGE.start() + preferred as u16);
        out.insert(name.clone(), port);
        taken.insert(port);
    }
    out
}

/// The slot a service asks for first: stable for a stack, environment and
/// service, whatever else the stack holds.
fn preferred_slot(stack: &Stack, service: &str, size: u32) -> u32 {
    let h = Sha256::digest(format!("{}/{}/{service}", stack.name, stack.env.name).as_bytes());
    u32::from_be_bytes([h[0], h[1], h[2], h[3]]) % size
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stack of lookup services `names`; `extra` is appended to stack.toml.
    fn stack(names: &[String], extra: &str) -> (tempfile::TempDir, Stack) {
        let dir = tempfile::tempdir().unwrap();
        let mut toml =
            String::from("[stack]\nname = \"p\"\n[environment.local]\ntarget = \"local\"\n");
        for n in names {
            toml.push_str(&format!(
                "[service.{n}.dataset.rows]\nfile = \"rows.csv\"\nkey = \"id\"\n\
                 [service.{n}.endpoint.rows]\nkind = \"lookup\"\ndatasets = [\"rows\"]\n"
            ));
        }
        toml.push_str(extra);
        std::fs::write(dir.path().join("stack.toml"), toml).unwrap();
        std::fs::write(dir.path().join("rows.csv"), "id,v\nK,1\n").unwrap();
        let s = crate::stack::load(dir.path(), Some("local"))
            .unwrap_or_else(|r| panic!("{}", r.render()));
        (dir, s)
    }

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("svc-{i}")).collect()
    }

    #[test]
    fn every_service_gets_its_own_port_outside_the_reserved_ranges() {
        let (_d, s) = stack(&names(200), "");
        let ports = allocate(&s, &BTreeMap::new(), &|_| true);
        let distinct: BTreeSet<u16> = ports.values().copied().collect();
        assert_eq!(distinct.len(), 200);
        assert!(ports.values().all(|p| RANGE.contains(p)), "{ports:?}");
        assert!(!RANGE.contains(&30000) && !RANGE.contains(&32768));
        // The same answer every time.
        assert_eq!(ports, allocate(&s, &BTreeMap::new(), &|_| true));
    }

    #[test]
    fn recorded_ports_stay_and_new_services_go_around_them() {
        let (_d, small) = stack(&names(5), "");
        let first = allocate(&small, &BTreeMap::new(), &|_| true);
        let (_d, big) = stack(&names(40), "");
        let second = allocate(&big, &first, &|_| true);
        for (n, p) in &first {
            assert_eq!(second[n], *p, "{n} moved");
        }
        let distinct: BTreeSet<u16> = second.values().copied().collect();
        assert_eq!(distinct.len(), 40);
        // A service that held another's preferred port keeps it; the other
        // takes the next free slot.
        let squatted = first["svc-1"];
        let mut recorded = BTreeMap::new();
        recorded.insert("svc-0".to_owned(), squatted);
        let third = allocate(&small, &recorded, &|_| true);
        assert_eq!(third["svc-0"], squatted);
        assert_ne!(third["svc-1"], squatted);
    }

    #[test]
    fn ports_in_use_are_skipped_and_explicit_node_ports_kept() {
        let (_d, s) = stack(
            &names(3),
            "[expose.svc-2]\ntype = \"NodePort\"\nnode_port = 30080\n",
        );
        let open = allocate(&s, &BTreeMap::new(), &|_| true);
        assert_eq!(open["svc-2"], 30080);
        let busy = open["svc-0"];
        let around = allocate(&s, &BTreeMap::new(), &|p| p != busy);
        assert_ne!(around["svc-0"], busy);
        assert!(RANGE.contains(&around["svc-0"]));
        assert_eq!(around["svc-1"], open["svc-1"]);
        // A recorded port outside the range (an old derived one, or a
        // node_port since removed) is given up.
        let mut recorded = BTreeMap::new();
        recorded.insert("svc-1".to_owned(), 32123);
        assert_eq!(allocate(&s, &recorded, &|_| true)["svc-1"], open["svc-1"]);
    }
}
