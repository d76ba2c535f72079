//! The capture plan: the rules shunt installs, as typed values per IP family.
//!
//! A pure function of the [`CaptureConfig`]; render, apply, check and explain all start
//! here, so there is exactly one description of the rules.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::Serialize;

use crate::config::{CaptureConfig, IdRange, PortRange, Set};

/// Every chain shunt owns starts with this; `clean` and `check` recognise shunt's rules by it.
pub const CHAIN_PREFIX: &str = "SHUNT_";

/// The source address the proxy uses to reach the app on the inbound leg (SPEC §3 item 5).
pub const INBOUND_SOURCE_V4: &str = "127.0.0.6";
pub const INBOUND_SOURCE_V6: &str = "::6";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }
    fn contains(self, net: &IpNet) -> bool {
        matches!(
            (self, net),
            (Family::V4, IpNet::V4(_)) | (Family::V6, IpNet::V6(_))
        )
    }
    fn loopback(self) -> IpNet {
        match self {
            Family::V4 => "127.0.0.0/8".parse().expect("literal"),
            Family::V6 => "::1/128".parse().expect("literal"),
        }
    }
    pub fn inbound_source(self) -> IpNet {
        let a: IpAddr = match self {
            Family::V4 => INBOUND_SOURCE_V4.parse().expect("literal"),
            Family::V6 => INBOUND_SOURCE_V6.parse().expect("literal"),
        };
        IpNet::from(a)
    }
}

/// The tables shunt may write, in the order netfilter consults them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TableName {
    Raw,
    Mangle,
    Nat,
    Filter,
}

impl TableName {
    pub const ALL: [TableName; 4] = [
        TableName::Raw,
        TableName::Mangle,
        TableName::Nat,
        TableName::Filter,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            TableName::Raw => "raw",
            TableName::Mangle => "mangle",
            TableName::Nat => "nat",
            TableName::Filter => "filter",
        }
    }
    pub fn parse(s: &str) -> Option<TableName> {
        TableName::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Owner {
    Uid,
    Gid,
}

/// One match of a rule. The variants are the ones shunt writes; `explain` has its own, wider
/// model of what other tools write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "match")]
pub enum Match {
    Source {
        net: IpNet,
        negate: bool,
    },
    Destination {
        net: IpNet,
        negate: bool,
    },
    InInterface {
        name: String,
        negate: bool,
    },
    OutInterface {
        name: String,
        negate: bool,
    },
    Tcp,
    /// Destination ports; one range uses `-m tcp --dport`, several `-m multiport --dports`.
    DestinationPorts {
        ports: Vec<PortRange>,
        negate: bool,
    },
    Owner {
        kind: Owner,
        id: IdRange,
        negate: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "target")]
pub enum Target {
    Jump { chain: String },
    Return,
    Redirect { to_port: u16 },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rule {
    pub matches: Vec<Match>,
    pub target: Target,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Chain {
    pub name: String,
    /// Built-in chains (OUTPUT, PREROUTING, ...) only ever hold jumps into shunt's chains.
    pub builtin: bool,
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Table {
    pub name: TableName,
    pub chains: Vec<Chain>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Ruleset {
    pub family: Family,
    pub tables: Vec<Table>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Plan {
    pub v4: Ruleset,
    /// `None` when IPv6 capture is off.
    pub v6: Option<Ruleset>,
}

impl Plan {
    pub fn families(&self) -> impl Iterator<Item = &Ruleset> {
        std::iter::once(&self.v4).chain(self.v6.as_ref())
    }
}

const OUTPUT: &str = "SHUNT_OUTPUT";
const INBOUND: &str = "SHUNT_INBOUND";
const REDIRECT: &str = "SHUNT_REDIRECT";
const IN_REDIRECT: &str = "SHUNT_IN_REDIRECT";

fn rule(matches: Vec<Match>, target: Target) -> Rule {
    Rule { matches, target }
}

fn jump(chain: &str) -> Target {
    Target::Jump {
        chain: chain.to_string(),
    }
}

fn dports(ports: &[PortRange], negate: bool) -> Match {
    Match::DestinationPorts {
        ports: ports.to_vec(),
        negate,
    }
}

/// multiport takes at most 15 ports (a range counts as two), so long lists are split.
fn port_chunks(ports: &[PortRange]) -> Vec<&[PortRange]> {
    let mut chunks = Vec::new();
    let (mut start, mut weight) = (0, 0);
    for (i, p) in ports.iter().enumerate() {
        let w = if p.first == p.last { 1 } else { 2 };
        if weight + w > 15 {
            chunks.push(&ports[start..i]);
            start = i;
            weight = 0;
        }
        weight += w;
    }
    if start < ports.len() {
        chunks.push(&ports[start..]);
    }
    chunks
}

/// Rules that send TCP to `target` when the destination port is in `ports`
/// (`*`: every TCP packet).
fn port_rules(ports: &Set<PortRange>, target: &Target) -> Vec<Rule> {
    match ports {
        Set::All => vec![rule(vec![Match::Tcp], target.clone())],
        Set::List(list) => port_chunks(list)
            .into_iter()
            .map(|c| rule(vec![Match::Tcp, dports(c, false)], target.clone()))
            .collect(),
    }
}

fn cidr_rules(family: Family, nets: &Set<IpNet>, target: &Target) -> Vec<Rule> {
    match nets {
        Set::All => vec![rule(vec![Match::Tcp], target.clone())],
        Set::List(list) => list
            .iter()
            .filter(|n| family.contains(n))
            .map(|n| {
                rule(
                    vec![
                        Match::Destination {
                            net: *n,
                            negate: false,
                        },
                        Match::Tcp,
                    ],
                    target.clone(),
                )
            })
            .collect(),
    }
}

fn owners(cfg: &CaptureConfig) -> impl Iterator<Item = (Owner, IdRange)> + '_ {
    cfg.proxy_uid
        .iter()
        .map(|id| (Owner::Uid, *id))
        .chain(cfg.proxy_gid.iter().map(|id| (Owner::Gid, *id)))
}

fn ruleset(cfg: &CaptureConfig, family: Family) -> Ruleset {
    let lo = || Match::OutInterface {
        name: "lo".into(),
        negate: false,
    };

    // nat PREROUTING -> SHUNT_INBOUND: inbound TCP to captured local ports.
    let mut inbound = Vec::new();
    for name in &cfg.exclude_interfaces {
        inbound.push(rule(
            vec![Match::InInterface {
                name: name.clone(),
                negate: false,
            }],
            Target::Return,
        ));
    }
    // The proxy's own ports are never captured inbound, whatever the lists say.
    let mut own = vec![
        PortRange {
            first: cfg.proxy_port,
            last: cfg.proxy_port,
        },
        PortRange {
            first: cfg.inbound_port,
            last: cfg.inbound_port,
        },
    ];
    own.sort();
    inbound.extend(port_rules(&Set::List(own), &Target::Return));
    inbound.extend(port_rules(&cfg.exclude_inbound_ports, &Target::Return));
    if !cfg.exclude_inbound_ports.eq(&Set::All) {
        inbound.extend(port_rules(&cfg.inbound_ports, &jump(IN_REDIRECT)));
    }

    // nat OUTPUT -> SHUNT_OUTPUT: locally generated TCP.
    let mut output = Vec::new();
    for name in &cfg.exclude_interfaces {
        output.push(rule(
            vec![Match::OutInterface {
                name: name.clone(),
                negate: false,
            }],
            Target::Return,
        ));
    }
    // The proxy's inbound leg to the app (from 127.0.0.6 / ::6) is never captured.
    output.push(rule(
        vec![
            Match::Source {
                net: family.inbound_source(),
                negate: false,
            },
            lo(),
        ],
        Target::Return,
    ));
    // The proxy dialling the pod's own (non-loopback) address goes through lo: that is inbound
    // traffic for the app, so it takes the inbound path (and its exclusions).
    for (kind, id) in owners(cfg) {
        output.push(rule(
            vec![
                Match::Destination {
                    net: family.loopback(),
                    negate: true,
                },
                lo(),
                Match::Owner {
                    kind,
                    id,
                    negate: false,
                },
            ],
            jump(INBOUND),
        ));
    }
    // Everything else the proxy sends goes where it was addressed.
    for (kind, id) in owners(cfg) {
        output.push(rule(
            vec![Match::Owner {
                kind,
                id,
                negate: false,
            }],
            Target::Return,
        ));
    }
    // Loopback, and an app calling its own pod address, stay local.
    output.push(rule(vec![lo()], Target::Return));
    // Port exclusions win over everything; port inclusions win over CIDR lists.
    output.extend(port_rules(&cfg.exclude_outbound_ports, &Target::Return));
    if !cfg.outbound_ports.is_empty() {
        output.extend(port_rules(&cfg.outbound_ports, &jump(REDIRECT)));
    }
    output.extend(cidr_rules(
        family,
        &cfg.exclude_outbound_cidrs,
        &Target::Return,
    ));
    output.extend(cidr_rules(family, &cfg.outbound_cidrs, &jump(REDIRECT)));

    let builtin = |name: &str, to: &str| Chain {
        name: name.into(),
        builtin: true,
        rules: vec![rule(vec![Match::Tcp], jump(to))],
    };
    let user = |name: &str, rules: Vec<Rule>| Chain {
        name: name.into(),
        builtin: false,
        rules,
    };
    let nat = Table {
        name: TableName::Nat,
        chains: vec![
            builtin("PREROUTING", INBOUND),
            builtin("OUTPUT", OUTPUT),
            user(INBOUND, inbound),
            user(
                IN_REDIRECT,
                vec![rule(
                    vec![Match::Tcp],
                    Target::Redirect {
                        to_port: cfg.inbound_port,
                    },
                )],
            ),
            user(OUTPUT, output),
            user(
                REDIRECT,
                vec![rule(
                    vec![Match::Tcp],
                    Target::Redirect {
                        to_port: cfg.proxy_port,
                    },
                )],
            ),
        ],
    };
    Ruleset {
        family,
        tables: vec![nat],
    }
}

/// Builds the plan. `ipv6` is the resolved IPv6 decision (`auto` is settled by the caller,
/// which can look at the target namespace).
pub fn build(cfg: &CaptureConfig, ipv6: bool) -> Plan {
    Plan {
        v4: ruleset(cfg, Family::V4),
        v6: ipv6.then(|| ruleset(cfg, Family::V6)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_plan_has_nat_chains_and_two_jumps_per_family() {
        let plan = build(&CaptureConfig::default(), true);
        for rs in plan.families() {
            assert_eq!(rs.tables.len(), 1);
            let nat = &rs.tables[0];
            let builtin: Vec<_> = nat.chains.iter().filter(|c| c.builtin).collect();
            assert_eq!(builtin.len(), 2);
            for c in nat.chains.iter().filter(|c| !c.builtin) {
                assert!(c.name.starts_with(CHAIN_PREFIX), "{}", c.name);
            }
        }
    }

    #[test]
    fn cidrs_split_by_family() {
        let cfg = crate::config::RawOptions {
            outbound_cidrs: Some("10.0.0.0/8,fd00::/8".into()),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        let plan = build(&cfg, true);
        let count = |rs: &Ruleset| {
            rs.tables[0]
                .chains
                .iter()
                .flat_map(|c| &c.rules)
                .filter(|r| {
                    r.matches
                        .iter()
                        .any(|m| matches!(m, Match::Destination { negate: false, .. }))
                })
                .count()
        };
        assert_eq!(count(&plan.v4), 1);
        assert_eq!(count(plan.v6.as_ref().unwrap()), 1);
        assert!(build(&cfg, false).v6.is_none());
    }

    #[test]
    fn multiport_chunks_respect_the_kernel_limit() {
        let ports: Vec<PortRange> = (1..=20)
            .map(|p| PortRange {
                first: p * 10,
                last: p * 10 + u16::from(p % 2 == 0),
            })
            .collect();
        let chunks = port_chunks(&ports);
        assert!(chunks.len() > 1);
        for c in &chunks {
            let w: usize = c
                .iter()
                .map(|p| if p.first == p.last { 1 } else { 2 })
                .sum();
            assert!(w <= 15);
        }
        assert_eq!(chunks.iter().map(|c| c.len()).sum::<usize>(), 20);
    }
}
