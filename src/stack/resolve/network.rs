//! `[network.NAME]`: a VPC's CIDR, subnets and NAT gateways, and the
//! checks across networks (overlaps, zones, NAT placement).

use std::collections::BTreeMap;

use crate::stack::decode::{Errors, Fields};
use crate::stack::diag::{Code, Diagnostic, did_you_mean};
use crate::stack::model::*;
use crate::stack::source::{Span, Table, expressions};

use super::{Ctx, check_name, cidr, tags};

pub(super) fn decode_network(
    ctx: &mut Ctx<'_>,
    name: &str,
    t: &Table,
    span: Span,
) -> Option<Network> {
    let f = Fields::new(t, span, format!("network.{name}"));
    f.allow(ctx.errors, &["cidr", "subnet", "tags", "nat_gateway"]);
    let cidr_v = f
        .str_req(ctx.errors, "cidr", "\"10.0.0.0/16\"")
        .and_then(|(v, s)| cidr(ctx, &v, s));
    let nat = nat_mode(ctx, &f);
    // Every subnet whose zone is known (even one with a bad CIDR), for the NAT checks.
    let mut layout: Vec<(String, Span, String, bool)> = Vec::new();
    let mut subnets = Vec::new();
    for (sname, sname_span, st, sspan) in f.named_tables(ctx.errors, "subnet") {
        check_name(ctx, sname, sname_span, "subnet name");
        ctx.spans
            .names
            .insert(format!("network.{name}.subnet.{sname}"), sname_span);
        let sf = Fields::new(st, sspan, format!("network.{name}.subnet.{sname}"));
        sf.allow(ctx.errors, &["zone", "cidr", "public"]);
        let zone = sf.str_req(ctx.errors, "zone", "\"us-east-1a\"");
        let c = sf
            .str_req(ctx.errors, "cidr", "\"10.0.1.0/24\"")
            .and_then(|(v, s)| cidr(ctx, &v, s).map(|c| (c, s)));
        let public = sf.bool_opt(ctx.errors, "public").unwrap_or(false);
        if let Some((zone, _)) = &zone {
            layout.push((sname.to_owned(), sname_span, zone.clone(), public));
        }
        if let (Some((zone, _)), Some((c, cspan))) = (zone, c) {
            ctx.spans
                .names
                .insert(format!("network.{name}.subnet.{sname}.cidr"), cspan);
            subnets.push(Subnet {
                name: sname.to_owned(),
                zone,
                cidr: c,
                public,
            });
        }
    }
    if let Some((_, s)) = f.str_opt(&mut Errors::default(), "cidr") {
        ctx.spans.names.insert(format!("network.{name}.cidr"), s);
    }
    let tags = tags(ctx, &f);
    let nat_gateway = check_nat(ctx, name, nat, &layout);
    Some(Network {
        name: name.to_owned(),
        cidr: cidr_v?,
        subnets,
        tags,
        nat_gateway,
    })
}

const NAT_MODES: [&str; 3] = ["single", "per_zone", "none"];

/// The `nat_gateway` a network declares, if any (and valid).
fn nat_mode(ctx: &mut Ctx<'_>, f: &Fields<'_>) -> Option<(NatGateways, Span)> {
    let (v, span) = f.str_opt(ctx.errors, "nat_gateway")?;
    let mode = match v.as_str() {
        "single" => NatGateways::Single,
        "per_zone" => NatGateways::PerZone,
        "none" => NatGateways::None,
        _ if !expressions(&v).is_empty() => return None, // reported while loading
        other => {
            let mut d = Diagnostic::new(
                Code::InvalidValue,
                span,
                format!("unknown nat_gateway `{other}`"),
            )
            .label("not a NAT gateway layout");
            d = match did_you_mean(other, NAT_MODES) {
                Some(s) => d.help(format!("did you mean `{s}`?")),
                None => d.help("use \"single\", \"per_zone\" or \"none\""),
            };
            ctx.errors.push(d);
            return None;
        }
    };
    Some((mode, span))
}

/// The network's NAT gateway layout: the declared one if it can be built,
/// else `single` when there are private subnets and a public one to put the
/// NAT gateway in, else `none`. `layout` is (name, name span, zone, public)
/// of every subnet.
fn check_nat(
    ctx: &mut Ctx<'_>,
    network: &str,
    declared: Option<(NatGateways, Span)>,
    layout: &[(String, Span, String, bool)],
) -> NatGateways {
    let any_public = layout.iter().any(|s| s.3);
    let any_private = layout.iter().any(|s| !s.3);
    let Some((mode, span)) = declared else {
        return if any_public && any_private {
            NatGateways::Single
        } else {
            NatGateways::None
        };
    };
    if mode == NatGateways::None {
        return mode;
    }
    if !any_public {
        ctx.errors.push(
            Diagnostic::new(
                Code::NatGatewayPlacement,
                span,
                format!(
                    "network {network} has no public subnet to put a NAT gateway in"
                ),
            )
            .label("needs a public subnet")
            .help("a NAT gateway lives in a public subnet: add a subnet with `public = true`, or set `nat_gateway = \"none\"`"),
        );
        return mode;
    }
    if mode == NatGateways::PerZone {
        let mut zones: Vec<&str> = Vec::new();
        for s in layout.iter().filter(|s| !s.3) {
            if !zones.contains(&s.2.as_str()) {
                zones.push(&s.2);
            }
        }
        for zone in zones {
            if layout.iter().any(|s| s.3 && s.2 == zone) {
                continue;
            }
            let mut d = Diagnostic::new(
                Code::NatGatewayPlacement,
                span,
                format!(
                    "zone {zone} of network {network} has private subnets but no public subnet for its NAT gateway"
                ),
            )
            .label("one NAT gateway per zone");
            for s in layout.iter().filter(|s| !s.3 && s.2 == zone) {
                d = d.related(s.1, format!("private subnet in {zone}"));
            }
            ctx.errors.push(d.help(format!(
                "add a public subnet in {zone}, or use `nat_gateway = \"single\"` to route every zone through one NAT gateway"
            )));
        }
    }
    mode
}

pub(super) fn check_networks(ctx: &mut Ctx<'_>, networks: &BTreeMap<String, Network>) {
    for n in networks.values() {
        for (i, s) in n.subnets.iter().enumerate() {
            let span = ctx.spans.names[&format!("network.{}.subnet.{}.cidr", n.name, s.name)];
            if !n.cidr.contains(&s.cidr) {
                ctx.errors.push(
                    Diagnostic::new(
                        Code::SubnetOutsideNetwork,
                        span,
                        format!(
                            "subnet {} ({}) is outside network {} ({})",
                            s.name, s.cidr, n.name, n.cidr
                        ),
                    )
                    .label("not inside the network's CIDR")
                    .help(format!("choose a block inside {}", n.cidr)),
                );
            }
            for other in &n.subnets[..i] {
                if other.cidr.contains(&s.cidr.network()) || s.cidr.contains(&other.cidr.network())
                {
                    let other_span =
                        ctx.spans.names[&format!("network.{}.subnet.{}.cidr", n.name, other.name)];
                    ctx.errors.push(
                        Diagnostic::new(
                            Code::OverlappingCidr,
                            span,
                            format!(
                                "subnet {} ({}) overlaps subnet {} ({})",
                                s.name, s.cidr, other.name, other.cidr
                            ),
                        )
                        .label("overlaps")
                        .related(other_span, "the other subnet")
                        .help("give each subnet its own block, e.g. split the network into /24s"),
                    );
                }
            }
        }
    }
    // Report each overlap at the network written later, pointing back at the earlier one.
    let mut list: Vec<&Network> = networks.values().collect();
    list.sort_by_key(|n| {
        ctx.spans
            .names
            .get(&format!("network.{}.cidr", n.name))
            .map(|s| (s.file, s.start))
    });
    for (i, a) in list.iter().enumerate() {
        for b in &list[..i] {
            if a.cidr.contains(&b.cidr.network()) || b.cidr.contains(&a.cidr.network()) {
                let span = ctx.spans.names[&format!("network.{}.cidr", a.name)];
                let other = ctx.spans.names[&format!("network.{}.cidr", b.name)];
                ctx.errors.push(
                    Diagnostic::new(
                        Code::OverlappingCidr,
                        span,
                        format!(
                            "network {} ({}) overlaps network {} ({})",
                            a.name, a.cidr, b.name, b.cidr
                        ),
                    )
                    .label("overlaps")
                    .related(other, "the other network")
                    .help("networks in one stack must not overlap, so they can be peered"),
                );
            }
        }
    }
}
