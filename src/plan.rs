//! Plans: the pure diff of desired against live resources.
//!
//! A [`Plan`] is data. Rendering formats it and never decides; apply carries
//! it out and never re-plans behind the user's back.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::resource::{Address, Desired, Live, ProviderId, Value};

/// What will happen to one resource.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Action {
    NoOp,
    Create,
    Update,
    /// Delete and create again, because these fields cannot change in place.
    Replace {
        forced_by: Vec<String>,
    },
    Delete,
}

impl Action {
    pub fn is_noop(&self) -> bool {
        matches!(self, Action::NoOp)
    }
    /// The Terraform-style symbol.
    pub fn symbol(&self) -> &'static str {
        match self {
            Action::NoOp => " ",
            Action::Create => "+",
            Action::Update => "~",
            Action::Replace { .. } => "-/+",
            Action::Delete => "-",
        }
    }
}

/// A field-level difference. `None` means the field is absent on that side.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FieldChange {
    pub path: String,
    pub before: Option<Value>,
    pub after: Option<Value>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub forces_replacement: bool,
}

/// One planned change.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Change {
    pub address: Address,
    pub kind: String,
    pub provider: ProviderId,
    pub action: Action,
    /// Changed fields only (for creates: every desired field).
    pub fields: Vec<FieldChange>,
    /// Why, for people. Apply never branches on it.
    pub reason: String,
    /// The desired resource (absent for deletes), with references resolved
    /// as far as live state allows.
    pub desired: Option<Desired>,
    /// The live resource (absent for creates).
    pub live: Option<Live>,
}

/// The plan for one stack and environment.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub stack: String,
    pub env: String,
    /// Every resource, in dependency order (deletes in reverse dependency order, last).
    pub changes: Vec<Change>,
    /// A digest of the live state this plan was computed from; a saved plan
    /// applies only while the live state still has this digest.
    pub live_digest: String,
    /// The live state itself, so a refused saved plan can say what changed.
    pub live: Vec<Live>,
    /// Objects of a destroy that are not deleted one by one (set by the
    /// engine, which knows where they live).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abandoned: Option<Abandoned>,
}

/// Kubernetes objects a destroy leaves to their cluster: it runs in the
/// stack's own EKS cluster, which the same plan deletes (its API cannot be
/// reached, so they cannot be read) or which is already gone.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Abandoned {
    /// The cluster they live in (`cluster.NAME`).
    pub cluster: Address,
    /// Whether the cluster still exists (then this plan deletes it).
    pub cluster_exists: bool,
    /// Why they are not deleted one by one, for people.
    pub reason: String,
    /// The objects as the stack declares them (the cluster was not read).
    pub objects: Vec<Address>,
}

/// How many changes of each kind a plan holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    pub add: usize,
    pub change: usize,
    pub destroy: usize,
}

impl Plan {
    pub fn summary(&self) -> Summary {
        let mut s = Summary::default();
        for c in &self.changes {
            match c.action {
                Action::NoOp => {}
                Action::Create => s.add += 1,
                Action::Update => s.change += 1,
                Action::Replace { .. } => {
                    s.add += 1;
                    s.destroy += 1;
                }
                Action::Delete => s.destroy += 1,
            }
        }
        s
    }
    pub fn has_changes(&self) -> bool {
        self.changes.iter().any(|c| !c.action.is_noop())
    }
}

/// Options that shape a plan.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Only these addresses (and what they depend on) are planned; empty = all.
    /// With `destroy`: only these (and what depends on them) are destroyed.
    pub targets: Vec<Address>,
    /// Force these addresses to be replaced.
    pub replace: Vec<Address>,
    /// Plan the destruction of everything (desired state is empty).
    pub destroy: bool,
}

/// Diffs `desired` (already in dependency order) against `live`.
///
/// Pure: no I/O. References (`Value::Ref`) are resolved against the live
/// outputs; a reference to a resource that will be created or replaced is
/// unknown until apply.
pub fn diff(stack: &str, env: &str, desired: &[Desired], live: &[Live], options: &Options) -> Plan {
    let live_by_addr: BTreeMap<&Address, &Live> = live.iter().map(|l| (&l.address, l)).collect();
    let wanted: Vec<&Desired> = if options.destroy {
        Vec::new()
    } else if options.targets.is_empty() {
        desired.iter().collect()
    } else {
        let selected = with_dependencies(desired, &options.targets);
        desired
            .iter()
            .filter(|d| selected.contains(&d.address))
            .collect()
    };

    let mut changes = Vec::new();
    // Addresses whose outputs are not known until apply (created or replaced).
    let mut pending: BTreeSet<Address> = BTreeSet::new();
    for d in &wanted {
        let resolved = resolve_refs(d, &live_by_addr, &pending);
        let mut change = match live_by_addr.get(&d.address) {
            None => create(&resolved),
            Some(l) => compare(&resolved, l, options.replace.contains(&d.address)),
        };
        // Apply resolves references again against what it has just created,
        // so the change keeps them; its field list shows the resolved values.
        change.desired = Some((*d).clone());
        if matches!(change.action, Action::Create | Action::Replace { .. }) {
            pending.insert(d.address.clone());
        }
        changes.push(change);
    }

    // Live resources the stack no longer declares, deleted in reverse order.
    let declared: BTreeSet<&Address> = desired.iter().map(|d| &d.address).collect();
    // A destroy of targets takes what depends on them too: nothing is left
    // pointing at a deleted resource.
    let doomed: Vec<Address> = if options.destroy {
        with_dependents(desired, &options.targets)
            .into_iter()
            .chain(options.targets.iter().cloned())
            .collect()
    } else {
        options.targets.clone()
    };
    let targeted = |a: &Address| {
        options.targets.is_empty()
            || doomed
                .iter()
                .any(|t| t == a || a.as_str().starts_with(&format!("{t}.")))
    };
    let mut deletes: Vec<&Live> = live
        .iter()
        .filter(|l| (options.destroy || !declared.contains(&l.address)) && targeted(&l.address))
        .collect();
    // Reverse dependency order: the order desired resources were declared in, reversed;
    // undeclared ones by address, children (longer addresses) first.
    let order: BTreeMap<&Address, usize> = desired
        .iter()
        .enumerate()
        .map(|(i, d)| (&d.address, i))
        .collect();
    deletes.sort_by(|a, b| {
        let ka = order.get(&a.address).copied();
        let kb = order.get(&b.address).copied();
        kb.cmp(&ka)
            .then_with(|| b.address.as_str().len().cmp(&a.address.as_str().len()))
            .then_with(|| a.address.cmp(&b.address))
    });
    for l in deletes {
        changes.push(Change {
            address: l.address.clone(),
            kind: l.kind.clone(),
            provider: l.provider,
            action: Action::Delete,
            fields: l
                .attrs
                .iter()
                .map(|(k, v)| FieldChange {
                    path: k.clone(),
                    before: Some(v.clone()),
                    after: None,
                    forces_replacement: false,
                })
                .collect(),
            reason: if options.destroy {
                "destroy was requested".to_owned()
            } else {
                "no longer in the stack".to_owned()
            },
            desired: None,
            live: Some(l.clone()),
        });
    }

    Plan {
        stack: stack.to_owned(),
        env: env.to_owned(),
        changes,
        live_digest: live_digest(live),
        live: live.to_vec(),
        abandoned: None,
    }
}

/// A stable digest of live state (order-independent).
pub fn live_digest(live: &[Live]) -> String {
    use sha2::{Digest, Sha256};
    let mut sorted: Vec<&Live> = live.iter().collect();
    sorted.sort_by(|a, b| a.address.cmp(&b.address));
    let mut h = Sha256::new();
    for l in sorted {
        // serde_json of BTreeMaps is deterministic.
        h.update(serde_json::to_vec(l).unwrap_or_default());
        h.update([0u8]);
    }
    hex::encode(h.finalize())
}

/// What differs between two observations of live state, for people.
pub fn live_differences(before: &[Live], after: &[Live]) -> Vec<String> {
    let a: BTreeMap<&Address, &Live> = before.iter().map(|l| (&l.address, l)).collect();
    let b: BTreeMap<&Address, &Live> = after.iter().map(|l| (&l.address, l)).collect();
    let mut out = Vec::new();
    for (addr, l) in &a {
        match b.get(addr) {
            None => out.push(format!("{addr} is gone")),
            Some(n) => {
                let keys: BTreeSet<&String> = l.attrs.keys().chain(n.attrs.keys()).collect();
                for k in keys {
                    if l.attrs.get(k) != n.attrs.get(k) {
                        out.push(format!("{addr}: {k} changed"));
                    }
                }
                if l.id != n.id {
                    out.push(format!("{addr}: was recreated (id changed)"));
                }
            }
        }
    }
    for addr in b.keys() {
        if !a.contains_key(addr) {
            out.push(format!("{addr} appeared"));
        }
    }
    out
}

fn with_dependencies(desired: &[Desired], targets: &[Address]) -> BTreeSet<Address> {
    let by_addr: BTreeMap<&Address, &Desired> = desired.iter().map(|d| (&d.address, d)).collect();
    let mut out = BTreeSet::new();
    let mut stack: Vec<Address> = Vec::new();
    for t in targets {
        // A target may name a resource or a prefix of child resources.
        for d in desired {
            if &d.address == t || d.address.as_str().starts_with(&format!("{t}.")) {
                stack.push(d.address.clone());
            }
        }
    }
    while let Some(a) = stack.pop() {
        if out.insert(a.clone())
            && let Some(d) = by_addr.get(&a)
        {
            stack.extend(d.depends_on.iter().cloned());
        }
    }
    out
}

/// The addresses of `desired` under `targets` (a target may be a prefix of
/// child resources) and every one that depends on them, transitively.
fn with_dependents(desired: &[Desired], targets: &[Address]) -> BTreeSet<Address> {
    let under = |a: &Address, t: &Address| a == t || a.as_str().starts_with(&format!("{t}."));
    let mut out: BTreeSet<Address> = desired
        .iter()
        .filter(|d| targets.iter().any(|t| under(&d.address, t)))
        .map(|d| d.address.clone())
        .collect();
    loop {
        let more: Vec<Address> = desired
            .iter()
            .filter(|d| !out.contains(&d.address) && d.depends_on.iter().any(|a| out.contains(a)))
            .map(|d| d.address.clone())
            .collect();
        if more.is_empty() {
            return out;
        }
        out.extend(more);
    }
}

fn resolve_refs(
    d: &Desired,
    live: &BTreeMap<&Address, &Live>,
    pending: &BTreeSet<Address>,
) -> Desired {
    let mut out = d.clone();
    for attr in out.attrs.values_mut() {
        attr.value = resolve_value(&attr.value, live, pending);
    }
    out
}

/// Replaces references by the referenced live output, or `Unknown` when the
/// referenced resource is about to be created or replaced.
fn resolve_value(
    v: &Value,
    live: &BTreeMap<&Address, &Live>,
    pending: &BTreeSet<Address>,
) -> Value {
    v.resolve_refs(&|address, output| {
        if pending.contains(address) {
            return None;
        }
        live.get(address)
            .and_then(|l| l.outputs.get(output))
            .cloned()
    })
}

fn create(d: &Desired) -> Change {
    Change {
        address: d.address.clone(),
        kind: d.kind.clone(),
        provider: d.provider,
        action: Action::Create,
        fields: d
            .attrs
            .iter()
            .filter(|(k, _)| !is_internal(k))
            .map(|(k, a)| FieldChange {
                path: k.clone(),
                before: None,
                after: Some(a.value.clone()),
                forces_replacement: false,
            })
            .collect(),
        reason: "not found in live state".to_owned(),
        desired: Some(d.clone()),
        live: None,
    }
}

fn compare(d: &Desired, l: &Live, forced: bool) -> Change {
    let mut fields = Vec::new();
    let mut forced_by = Vec::new();
    for (k, a) in d.attrs.iter().filter(|(k, _)| !is_internal(k)) {
        let before = l.attrs.get(k);
        let differs = match (&a.value, before) {
            // An unknown desired value differs unless proven equal later; treat as a change.
            (Value::Unknown, _) => true,
            (after, Some(before)) => !same(after, before),
            (Value::Null, None) => false,
            (_, None) => true,
        };
        if differs {
            if a.force_new {
                forced_by.push(k.clone());
            }
            fields.push(FieldChange {
                path: k.clone(),
                before: before.cloned(),
                after: Some(a.value.clone()),
                forces_replacement: a.force_new,
            });
        }
    }
    let (action, reason) = if forced {
        (
            Action::Replace {
                forced_by: Vec::new(),
            },
            "replacement was requested with --replace".to_owned(),
        )
    } else if !forced_by.is_empty() {
        let reason = format!("{} cannot be changed in place", forced_by.join(", "));
        (Action::Replace { forced_by }, reason)
    } else if !fields.is_empty() {
        let names: Vec<&str> = fields.iter().map(|f| f.path.as_str()).collect();
        (
            Action::Update,
            format!(
                "{} {} from the stack",
                names.join(", "),
                if names.len() == 1 {
                    "differs"
                } else {
                    "differ"
                }
            ),
        )
    } else {
        (Action::NoOp, "matches the stack".to_owned())
    };
    Change {
        address: d.address.clone(),
        kind: d.kind.clone(),
        provider: d.provider,
        action,
        fields,
        reason,
        desired: Some(d.clone()),
        live: Some(l.clone()),
    }
}

/// Attributes named `_...` carry what a provider needs to apply (e.g. a
/// generated config) and are neither compared nor shown.
pub fn is_internal(name: &str) -> bool {
    name.starts_with('_')
}

/// Equality with numeric tolerance between ints and floats.
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Int(x), Value::Float(y)) | (Value::Float(y), Value::Int(x)) => (*x as f64) == *y,
        (Value::List(x), Value::List(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same(a, b))
        }
        (Value::Map(x), Value::Map(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resource::Desired;

    fn vpc(cidr: &str) -> Desired {
        Desired::new(Address::new("network.main"), "aws_vpc", ProviderId::Aws)
            .attr_force_new("cidr", cidr)
    }

    #[test]
    fn missing_live_is_create_and_matching_is_noop() {
        let d = vec![vpc("10.0.0.0/16")];
        let p = diff("s", "dev", &d, &[], &Options::default());
        assert_eq!(p.changes[0].action, Action::Create);
        let live = vec![
            Live::new(
                Address::new("network.main"),
                "aws_vpc",
                ProviderId::Aws,
                "vpc-1",
            )
            .attr("cidr", "10.0.0.0/16"),
        ];
        let p = diff("s", "dev", &d, &live, &Options::default());
        assert_eq!(p.changes[0].action, Action::NoOp);
        assert!(!p.has_changes());
    }

    #[test]
    fn force_new_field_replaces_and_others_update() {
        let live = vec![
            Live::new(
                Address::new("network.main"),
                "aws_vpc",
                ProviderId::Aws,
                "vpc-1",
            )
            .attr("cidr", "10.1.0.0/16"),
        ];
        let p = diff(
            "s",
            "dev",
            &[vpc("10.0.0.0/16")],
            &live,
            &Options::default(),
        );
        assert_eq!(
            p.changes[0].action,
            Action::Replace {
                forced_by: vec!["cidr".into()]
            }
        );
        let d = vec![
            Desired::new(Address::new("registry.r"), "aws_ecr", ProviderId::Aws)
                .attr("scan_on_push", true),
        ];
        let live = vec![
            Live::new(Address::new("registry.r"), "aws_ecr", ProviderId::Aws, "r")
                .attr("scan_on_push", false),
        ];
        let p = diff("s", "dev", &d, &live, &Options::default());
        assert_eq!(p.changes[0].action, Action::Update);
        assert_eq!(
            p.summary(),
            Summary {
                add: 0,
                change: 1,
                destroy: 0
            }
        );
    }

    #[test]
    fn undeclared_live_is_deleted_and_refs_to_pending_are_unknown() {
        let live = vec![Live::new(
            Address::new("registry.old"),
            "aws_ecr",
            ProviderId::Aws,
            "old",
        )];
        let subnet = Desired::new(
            Address::new("network.main.subnet.a"),
            "aws_subnet",
            ProviderId::Aws,
        )
        .attr_force_new(
            "vpc_id",
            Value::Ref {
                address: Address::new("network.main"),
                output: "id".into(),
            },
        );
        let p = diff(
            "s",
            "dev",
            &[vpc("10.0.0.0/16"), subnet],
            &live,
            &Options::default(),
        );
        assert_eq!(p.changes.len(), 3);
        assert_eq!(p.changes[1].fields[0].after, Some(Value::Unknown));
        assert_eq!(p.changes[2].action, Action::Delete);
        assert_eq!(
            p.summary(),
            Summary {
                add: 2,
                change: 0,
                destroy: 1
            }
        );
    }

    #[test]
    fn destroy_deletes_everything_in_reverse_order() {
        let d = vec![
            vpc("10.0.0.0/16"),
            Desired::new(
                Address::new("network.main.subnet.a"),
                "aws_subnet",
                ProviderId::Aws,
            ),
        ];
        let live = vec![
            Live::new(
                Address::new("network.main"),
                "aws_vpc",
                ProviderId::Aws,
                "vpc-1",
            ),
            Live::new(
                Address::new("network.main.subnet.a"),
                "aws_subnet",
                ProviderId::Aws,
                "subnet-1",
            ),
        ];
        let p = diff(
            "s",
            "dev",
            &d,
            &live,
            &Options {
                destroy: true,
                ..Default::default()
            },
        );
        let order: Vec<&str> = p.changes.iter().map(|c| c.address.as_str()).collect();
        assert_eq!(order, ["network.main.subnet.a", "network.main"]);
    }
}
