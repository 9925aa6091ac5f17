//! The dependency graph of a stack's resources, and orderings over it.

use std::collections::{BTreeMap, BTreeSet};

use crate::resource::{Address, Desired};

/// Orders resources so each comes after what it depends on (stable: ties
/// keep their given order). Dependencies on addresses not in `resources`
/// are ignored. Returns `Err` with a cycle if there is one.
pub fn topo_order(resources: Vec<Desired>) -> Result<Vec<Desired>, Vec<Address>> {
    let index: BTreeMap<Address, usize> = resources
        .iter()
        .enumerate()
        .map(|(i, r)| (r.address.clone(), i))
        .collect();
    let n = resources.len();
    let mut indegree = vec![0usize; n];
    let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (i, r) in resources.iter().enumerate() {
        for d in &r.depends_on {
            if let Some(&j) = index.get(d) {
                indegree[i] += 1;
                dependents[j].push(i);
            }
        }
    }
    let mut ready: BTreeSet<usize> = (0..n).filter(|&i| indegree[i] == 0).collect();
    let mut order = Vec::with_capacity(n);
    while let Some(&i) = ready.iter().next() {
        ready.remove(&i);
        order.push(i);
        for &k in &dependents[i] {
            indegree[k] -= 1;
            if indegree[k] == 0 {
                ready.insert(k);
            }
        }
    }
    if order.len() < n {
        let stuck: Vec<Address> = (0..n)
            .filter(|i| !order.contains(i))
            .map(|i| resources[i].address.clone())
            .collect();
        return Err(stuck);
    }
    let mut slots: Vec<Option<Desired>> = resources.into_iter().map(Some).collect();
    Ok(order.into_iter().filter_map(|i| slots[i].take()).collect())
}

/// One node of the stack-level graph.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Node {
    pub address: Address,
    pub depends_on: Vec<Address>,
}

/// The stack's resources and their dependencies, in dependency order.
pub fn stack_graph(stack: &crate::stack::Stack) -> Vec<Node> {
    use crate::stack::{ClusterKind, DatasetSource, Endpoint, EnrichmentSource, Target};
    let mut nodes: Vec<Desired> = Vec::new();
    let mk = |kind: &str, name: &str| {
        Desired::new(
            Address::of(kind, name),
            kind,
            crate::resource::ProviderId::Local,
        )
    };
    let cloud = stack.env.target != Target::Local;
    if cloud {
        for n in stack.networks.keys() {
            nodes.push(mk("network", n));
        }
        for (name, c) in &stack.clusters {
            let mut d = mk("cluster", name);
            if let ClusterKind::Eks(e) = &c.kind {
                d = d.depends(Address::of("network", &e.network));
            }
            nodes.push(d);
        }
        for r in stack.registries.keys() {
            nodes.push(mk("registry", r));
        }
    }
    for c in stack.connections.keys() {
        nodes.push(mk("connection", c));
    }
    for (name, s) in &stack.services {
        let mut d = mk("service", name);
        for ds in s.datasets.values() {
            if let DatasetSource::Sql { connection, .. } = &ds.source {
                d = d.depends(Address::of("connection", connection));
            }
        }
        for en in s.endpoints.values().flat_map(Endpoint::all_enrichments) {
            if let EnrichmentSource::Lookup { service, .. } = &en.source {
                d = d.depends(Address::of("service", service));
            }
        }
        if cloud {
            if let Some(c) = &stack.env.cluster {
                d = d.depends(Address::of("cluster", c));
            }
            if let Some(r) = &stack.env.registry
                && stack.registries.contains_key(r)
            {
                d = d.depends(Address::of("registry", r));
            }
        }
        nodes.push(d);
    }
    for (name, e) in &stack.exposes {
        nodes.push(mk("expose", name).depends(Address::of("service", &e.service)));
    }
    let ordered = topo_order(nodes).unwrap_or_default();
    ordered
        .into_iter()
        .map(|d| Node {
            address: d.address,
            depends_on: d.depends_on.into_iter().collect(),
        })
        .collect()
}
