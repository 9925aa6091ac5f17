//! What `mesh output` shows of the AWS resources (pure, from live state):
//! each EKS cluster's name, endpoint, ARN and version, each registry's URL,
//! each network's VPC, subnet, internet and NAT gateway ids.

use serde_json::{Map, Value as J};

use crate::output::{Outputs, plain};
use crate::resource::{Address, Live};
use crate::stack::{ClusterKind, Stack};

pub fn outputs(stack: &Stack, live: &[Live]) -> Outputs {
    let find = |a: &Address| live.iter().find(|l| &l.address == a);
    let mut out = Outputs::default();
    for (name, c) in &stack.clusters {
        if let (ClusterKind::Eks(_), Some(l)) = (&c.kind, find(&Address::of("cluster", name))) {
            let fields = [
                ("name", "name"),
                ("endpoint", "endpoint"),
                ("arn", "arn"),
                ("version", "version"),
            ];
            out.copy("cluster", name, l, &fields);
        }
    }
    for name in stack.registries.keys() {
        if let Some(l) = find(&Address::of("registry", name)) {
            out.copy(
                "registry",
                name,
                l,
                &[("url", "url"), ("name", "name"), ("arn", "arn")],
            );
        }
    }
    for (name, n) in &stack.networks {
        let vpc = Address::of("network", name);
        let Some(l) = find(&vpc) else {
            continue;
        };
        out.copy("network", name, l, &[("id", "vpc_id"), ("cidr", "cidr")]);
        if let Some(igw) = find(&Address::new(format!("{vpc}.internet_gateway"))) {
            out.copy("network", name, igw, &[("id", "internet_gateway_id")]);
        }
        let output = |l: &Live, o: &str| l.outputs.get(o).and_then(plain);
        let subnets: Map<String, J> = n
            .subnets
            .iter()
            .filter_map(|s| {
                Some((
                    s.name.clone(),
                    output(find(&vpc.child("subnet", &s.name))?, "id")?,
                ))
            })
            .collect();
        // One NAT gateway per zone (`.nat_gateway.ZONE`).
        let prefix = format!("{vpc}.nat_gateway.");
        let nat = |o: &str| -> Map<String, J> {
            live.iter()
                .filter_map(|l| {
                    Some((
                        l.address.as_str().strip_prefix(&prefix)?.to_owned(),
                        output(l, o)?,
                    ))
                })
                .collect()
        };
        for (field, values) in [
            ("subnet_ids", subnets),
            ("nat_gateway_ids", nat("id")),
            ("nat_public_ips", nat("public_ip")),
        ] {
            if !values.is_empty() {
                out.set("network", name, field, J::Object(values));
            }
        }
    }
    out
}
