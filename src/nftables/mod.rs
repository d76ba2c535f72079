//! The native nftables engine: the same [`Plan`] as the iptables engines, written as one
//! `inet shunt` table and installed in one `nft -f` transaction.
//!
//! Layout. Each iptables table and built-in chain the plan uses becomes one base chain of the
//! `inet` table (`nat_output`, `mangle_prerouting`, ...), which hands each family to that
//! family's copy of the plan: `meta nfproto ipv4 jump v4_nat_OUTPUT`. Every plan chain becomes
//! a regular chain named `{family}_{table}_{chain}` (`v4_nat_SHUNT_OUTPUT`), rule for rule, so
//! both families keep exactly the order and meaning they have on iptables. Consecutive rules
//! that differ in one address, port or owner list become one rule over a set: a per-family
//! named interval set for addresses (aggregated, so what is read back is what was written),
//! an anonymous set for ports and ids. A 1,000-CIDR exclusion list is one set lookup.
//!
//! Priorities. Each base chain runs just before the iptables table it stands for (10 lower:
//! raw -310, mangle -160, nat -110), never tied with it. For NAT the first binding a new
//! connection gets is kept, so shunt's redirect wins over another tool's iptables DNAT in the
//! same namespace; for raw and mangle, shunt's zones and marks are set before iptables sees the
//! packet.
//!
//! Read back. `nft list table inet shunt` prints the table in nft's own canonical text; the
//! renderer writes exactly that text, so "installed == planned" is a comparison of lines and
//! `check` shows a line diff.

use ipnet::IpNet;
use std::fmt::Write as _;

use crate::config::{IdRange, PortRange};
use crate::engine::{Cleaned, Engine, EngineKind, Part};
use crate::netfilter::{spawn_tool, NetfilterError};
use crate::netns::Netns;
use crate::plan::{Family, Match, Owner, Plan, Proto, Rule, Ruleset, TableName, Target};

mod wire;

/// The table shunt owns; nothing outside it is ever touched.
pub const TABLE: &str = "shunt";

/// The oldest nft whose syntax and output this renderer relies on.
const MIN_VERSION: (u32, u32, u32) = (0, 9, 3);

fn fam_name(f: Family) -> &'static str {
    match f {
        Family::V4 => "v4",
        Family::V6 => "v6",
    }
}

fn nfproto(f: Family) -> &'static str {
    match f {
        Family::V4 => "ipv4",
        Family::V6 => "ipv6",
    }
}

fn l3(f: Family) -> &'static str {
    match f {
        Family::V4 => "ip",
        Family::V6 => "ip6",
    }
}

/// The standard priorities nft names for the inet family (nft(8), CHAINS), which are
/// iptables' own tables' priorities: raw -300, mangle -150, nat (dstnat) -100, filter 0.
const NAMED_PRIORITIES: [(&str, i32); 6] = [
    ("raw", -300),
    ("mangle", -150),
    ("dstnat", -100),
    ("filter", 0),
    ("security", 50),
    ("srcnat", 100),
];

/// The base chain standing for one iptables built-in chain: type, hook, and priority:
/// `offset` from the priority of the iptables table it stands for, by name where nft has one
/// (`dstnat - 10`; none for nat at output, so that one is a number). nft lists a name only
/// within 10 of it, so read back compares numbers ([`lines`]).
fn base_chain(table: TableName, builtin: &str, offset: i32) -> Option<Hook> {
    let (hook, number) = match builtin {
        "PREROUTING" => ("prerouting", 0),
        "OUTPUT" => ("output", 3),
        _ => return None,
    };
    let (kind, name) = match (table, hook) {
        (TableName::Raw, _) => ("filter", Some("raw")),
        // mangle OUTPUT reroutes when a mark changes, as iptables' does (tproxy replies).
        (TableName::Mangle, "output") => ("route", Some("mangle")),
        (TableName::Mangle, _) => ("filter", Some("mangle")),
        (TableName::Nat, "prerouting") => ("nat", Some("dstnat")),
        (TableName::Nat, _) => ("nat", None),
        (TableName::Filter, _) => ("filter", Some("filter")),
    };
    let sign = if offset < 0 { '-' } else { '+' };
    let (priority, value) = match name {
        Some(name) => {
            let base = NAMED_PRIORITIES.iter().find(|(n, _)| *n == name)?.1;
            (
                format!("{name} {sign} {}", offset.unsigned_abs()),
                base + offset,
            )
        }
        None => ((-100 + offset).to_string(), -100 + offset),
    };
    Some(Hook {
        kind,
        hook,
        number,
        priority,
        value,
    })
}

/// A priority as nft lists it (`-110`, `dstnat - 10`, `mangle + 20`), as a number. nft spells
/// one value either way depending on its version and the offset, so listings compare by it.
fn priority_value(text: &str) -> Option<i32> {
    if let Ok(n) = text.trim().parse() {
        return Some(n);
    }
    let mut words = text.split_whitespace();
    let base = words.next()?;
    let (_, value) = NAMED_PRIORITIES.iter().find(|(n, _)| *n == base)?;
    match (
        words.next(),
        words.next().map(str::parse::<i32>),
        words.next(),
    ) {
        (None, None, None) => Some(*value),
        (Some("+"), Some(Ok(n)), None) => Some(value + n),
        (Some("-"), Some(Ok(n)), None) => Some(value - n),
        _ => None,
    }
}

/// A base chain's `type ... priority P; policy ...;` line with P as a number.
fn numeric_priority(line: &str) -> Option<String> {
    let rest = line.strip_prefix("type ")?;
    let (head, tail) = rest.split_once(" priority ")?;
    let (prio, after) = tail.split_once(';')?;
    Some(format!(
        "type {head} priority {};{after}",
        priority_value(prio)?
    ))
}

/// The kind of list a rule's match can be merged into.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Slot {
    Saddr,
    Daddr,
    Dports,
    Uid,
    Gid,
}

fn slot_of(m: &Match) -> Option<Slot> {
    match m {
        Match::Source { negate: false, .. } => Some(Slot::Saddr),
        Match::Destination { negate: false, .. } => Some(Slot::Daddr),
        Match::DestinationPorts { negate: false, .. } => Some(Slot::Dports),
        Match::Owner {
            kind: Owner::Uid,
            negate: false,
            ..
        } => Some(Slot::Uid),
        Match::Owner {
            kind: Owner::Gid,
            negate: false,
            ..
        } => Some(Slot::Gid),
        _ => None,
    }
}

/// The one position where `a` and `b` differ, when that is all that differs and the match
/// there can be a list.
fn merge_slot(a: &Rule, b: &Rule) -> Option<usize> {
    if a.target != b.target || a.matches.len() != b.matches.len() {
        return None;
    }
    let mut diff = a
        .matches
        .iter()
        .zip(&b.matches)
        .enumerate()
        .filter(|(_, (x, y))| x != y);
    let (i, (x, y)) = diff.next()?;
    if diff.next().is_some() {
        return None;
    }
    (slot_of(x).is_some() && slot_of(x) == slot_of(y)).then_some(i)
}

/// A chain's rules grouped: runs that differ in one list match, with that match's position.
fn groups(rules: &[Rule]) -> Vec<(&[Rule], Option<usize>)> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < rules.len() {
        let mut end = start + 1;
        let slot = rules.get(end).and_then(|r| merge_slot(&rules[start], r));
        if let Some(i) = slot {
            while end < rules.len() && merge_slot(&rules[start], &rules[end]) == Some(i) {
                end += 1;
            }
        }
        out.push((&rules[start..end], slot.filter(|_| end - start > 1)));
        start = end;
    }
    out
}

fn proto_of(rule: &Rule) -> Option<Proto> {
    rule.matches.iter().find_map(|m| match m {
        Match::Protocol(p) => Some(*p),
        _ => None,
    })
}

fn ports_text(ports: &[PortRange]) -> String {
    let one = |p: &PortRange| {
        if p.first == p.last {
            p.first.to_string()
        } else {
            format!("{}-{}", p.first, p.last)
        }
    };
    match ports {
        [p] => one(p),
        _ => format!(
            "{{ {} }}",
            ports.iter().map(one).collect::<Vec<_>>().join(", ")
        ),
    }
}

/// Overlapping or touching ranges joined, sorted: nft refuses overlapping intervals and
/// merges an anonymous interval set's elements, so what it lists (and what the kernel takes)
/// is the merged list. `span` gives a range's first and last value; `extend` sets its last.
fn merge<T>(
    mut items: Vec<T>,
    span: impl Fn(&T) -> (u64, u64),
    extend: impl Fn(&mut T, u64),
) -> Vec<T> {
    items.sort_by_key(&span);
    let mut out: Vec<T> = Vec::with_capacity(items.len());
    for item in items {
        let (first, last) = span(&item);
        match out.last_mut() {
            Some(prev) if first <= span(prev).1 + 1 => {
                if last > span(prev).1 {
                    extend(prev, last)
                }
            }
            _ => out.push(item),
        }
    }
    out
}

fn merge_ports(ports: Vec<PortRange>) -> Vec<PortRange> {
    let span = |p: &PortRange| (u64::from(p.first), u64::from(p.last));
    merge(ports, span, |p, last| p.last = last as u16)
}

fn merge_ids(ids: Vec<IdRange>) -> Vec<IdRange> {
    let span = |i: &IdRange| (u64::from(i.first), u64::from(i.last));
    merge(ids, span, |i, last| i.last = last as u32)
}

fn ids_text(ids: &[IdRange]) -> String {
    match ids {
        [id] => id.to_string(),
        _ => format!(
            "{{ {} }}",
            ids.iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// How nft prints a prefix: a host address bare, a network as `a/len`.
fn net_text(n: &IpNet) -> String {
    if n.prefix_len() == n.max_prefix_len() {
        n.addr().to_string()
    } else {
        n.trunc().to_string()
    }
}

/// iptables' interface wildcard `eth+` (every name starting with `eth`) is nft's `eth*`.
fn ifname(name: &str) -> String {
    match name.strip_suffix('+') {
        Some(prefix) => format!("{prefix}*"),
        None => name.to_string(),
    }
}

fn mark(m: u32) -> String {
    format!("0x{m:08x}")
}

/// What an address match compares with: one prefix, or a named set of them.
#[derive(Clone, Debug)]
pub(crate) enum Addr {
    Net(IpNet),
    Set(String),
}

/// One statement of a rule, in the order nft lists them. [`render`] prints these and
/// [`wire`] encodes them for the kernel, so the dry-run text and the transaction are one rule
/// set. Lists are kept as nft keeps them: ports and ids merged and sorted.
#[derive(Clone, Debug)]
pub(crate) enum Stmt<'a> {
    /// `ip saddr` / `ip6 daddr` ...: the family is the rule's.
    Addr {
        src: bool,
        negate: bool,
        addr: Addr,
    },
    /// `iifname` / `oifname`, in iptables' spelling (`eth+` is every name starting `eth`).
    Iface {
        out: bool,
        negate: bool,
        name: &'a str,
    },
    Ports {
        proto: Proto,
        src: bool,
        negate: bool,
        ports: Vec<PortRange>,
    },
    L4proto(Proto),
    Owner {
        kind: Owner,
        negate: bool,
        ids: Vec<IdRange>,
    },
    CtInvalid,
    CtEstablished,
    Mark(u32),
    Connmark(u32),
    /// `meta nfproto ipv4`: a base chain handing one family to its chains.
    Nfproto(Family),
    Jump(String),
    Target(&'a Target),
}

/// A rule of the `inet shunt` table: its family (the plan's half it came from) and statements.
#[derive(Clone, Debug)]
pub(crate) struct NftRule<'a> {
    pub family: Family,
    pub stmts: Vec<Stmt<'a>>,
}

/// A base chain's hook: nft's type and hook names, the hook number, and the priority as
/// written and as a number.
#[derive(Clone, Debug)]
pub(crate) struct Hook {
    pub kind: &'static str,
    pub hook: &'static str,
    pub number: u32,
    pub priority: String,
    pub value: i32,
}

#[derive(Clone, Debug)]
pub(crate) struct Chain<'a> {
    pub name: String,
    pub hook: Option<Hook>,
    pub rules: Vec<NftRule<'a>>,
}

/// A named interval set of one family's prefixes, aggregated.
#[derive(Clone, Debug)]
pub(crate) struct Set {
    pub name: String,
    pub family: Family,
    pub nets: Vec<IpNet>,
}

/// The whole `inet shunt` table for a plan, in listing order: sets, the plan's chains, then
/// the base chains in order of first use.
#[derive(Clone, Debug, Default)]
pub(crate) struct Table<'a> {
    pub sets: Vec<Set>,
    pub chains: Vec<Chain<'a>>,
}

/// A plan rule as statements, in nft's listing order; `listed` stands in for the match at its
/// position (the rule's group merged into one list).
fn stmts<'a>(
    rule: &'a Rule,
    mut listed: Option<(usize, Stmt<'a>)>,
    chain_of: &dyn Fn(&str) -> String,
) -> Vec<Stmt<'a>> {
    let mut own = |i: usize, s: Stmt<'a>| match listed.take() {
        Some((at, l)) if at == i => l,
        other => {
            listed = other;
            s
        }
    };
    let proto = proto_of(rule);
    let header_proto = proto.unwrap_or(Proto::Tcp);
    // nft lists addresses, then interfaces, then header fields, then the rest.
    let mut rank: Vec<(u8, Stmt<'a>)> = Vec::with_capacity(rule.matches.len() + 2);
    for (i, m) in rule.matches.iter().enumerate() {
        let (r, s) = match m {
            Match::Source { net, negate } | Match::Destination { net, negate } => {
                let src = matches!(m, Match::Source { .. });
                let addr = Addr::Net(*net);
                let s = Stmt::Addr {
                    src,
                    negate: *negate,
                    addr,
                };
                (if src { 0 } else { 1 }, own(i, s))
            }
            // iptables' lone `+` is every interface; nft refuses an all-wildcard name, and
            // where shunt matches interfaces (prerouting's input, output's route) every
            // packet has one: the match is always true and is left out.
            Match::InInterface {
                name,
                negate: false,
            }
            | Match::OutInterface {
                name,
                negate: false,
            } if name == "+" => continue,
            Match::InInterface { name, negate } | Match::OutInterface { name, negate } => {
                let out = matches!(m, Match::OutInterface { .. });
                (
                    2,
                    Stmt::Iface {
                        out,
                        negate: *negate,
                        name,
                    },
                )
            }
            Match::DestinationPorts { ports, negate } => {
                let s = Stmt::Ports {
                    proto: header_proto,
                    src: false,
                    negate: *negate,
                    ports: merge_ports(ports.clone()),
                };
                (3, own(i, s))
            }
            Match::SourcePort(p) => {
                let ports = vec![PortRange {
                    first: *p,
                    last: *p,
                }];
                (
                    3,
                    Stmt::Ports {
                        proto: header_proto,
                        src: true,
                        negate: false,
                        ports,
                    },
                )
            }
            Match::Owner { kind, id, negate } => {
                let s = Stmt::Owner {
                    kind: *kind,
                    negate: *negate,
                    ids: vec![*id],
                };
                (5, own(i, s))
            }
            Match::CtInvalid => (5, Stmt::CtInvalid),
            Match::CtEstablished => (5, Stmt::CtEstablished),
            Match::Mark(v) => (5, Stmt::Mark(*v)),
            Match::Connmark(v) => (5, Stmt::Connmark(*v)),
            Match::Protocol(_) => continue,
        };
        rank.push((r, s));
    }
    // nft drops an explicit `meta l4proto` that a port match already implies.
    if let Some(p) = proto.filter(|_| !rank.iter().any(|(r, _)| *r == 3)) {
        rank.push((4, Stmt::L4proto(p)));
    }
    rank.sort_by_key(|(r, _)| *r); // stable: each kind keeps the plan's order
    let mut out: Vec<Stmt<'a>> = rank.into_iter().map(|(_, s)| s).collect();
    out.push(match &rule.target {
        Target::Jump { chain } => Stmt::Jump(chain_of(chain)),
        t => Stmt::Target(t),
    });
    out
}

impl NftRule<'_> {
    /// The rule as nft lists it.
    fn text(&self) -> String {
        let neg = |n: bool| if n { "!= " } else { "" };
        let l3 = l3(self.family);
        let mut parts: Vec<String> = Vec::with_capacity(self.stmts.len());
        for s in &self.stmts {
            parts.push(match s {
                Stmt::Addr { src, negate, addr } => {
                    let dir = if *src { "saddr" } else { "daddr" };
                    let v = match addr {
                        Addr::Net(n) => net_text(n),
                        Addr::Set(name) => format!("@{name}"),
                    };
                    format!("{l3} {dir} {}{v}", neg(*negate))
                }
                Stmt::Iface { out, negate, name } => {
                    let key = if *out { "oifname" } else { "iifname" };
                    format!("{key} {}\"{}\"", neg(*negate), ifname(name))
                }
                Stmt::Ports {
                    proto,
                    src,
                    negate,
                    ports,
                } => {
                    let dir = if *src { "sport" } else { "dport" };
                    format!(
                        "{} {dir} {}{}",
                        proto.as_str(),
                        neg(*negate),
                        ports_text(ports)
                    )
                }
                Stmt::L4proto(p) => format!("meta l4proto {}", p.as_str()),
                Stmt::Owner { kind, negate, ids } => {
                    let key = match kind {
                        Owner::Uid => "skuid",
                        Owner::Gid => "skgid",
                    };
                    format!("meta {key} {}{}", neg(*negate), ids_text(ids))
                }
                Stmt::CtInvalid => "ct state invalid".into(),
                Stmt::CtEstablished => "ct state established,related".into(),
                Stmt::Mark(m) => format!("meta mark {}", mark(*m)),
                Stmt::Connmark(m) => format!("ct mark {}", mark(*m)),
                Stmt::Nfproto(f) => format!("meta nfproto {}", nfproto(*f)),
                Stmt::Jump(chain) => format!("jump {chain}"),
                Stmt::Target(t) => target_text(self.family, t),
            });
        }
        parts.join(" ")
    }
}

fn target_text(family: Family, target: &Target) -> String {
    match target {
        Target::Jump { chain } => format!("jump {chain}"),
        Target::Return => "return".into(),
        Target::Redirect { to_port } => format!("redirect to :{to_port}"),
        Target::Drop => "drop".into(),
        Target::Accept => "accept".into(),
        Target::CtZone { zone } => format!("ct zone set {zone}"),
        Target::SetMark { mark: m } => format!("meta mark set {}", mark(*m)),
        Target::SaveMark => "ct mark set meta mark".into(),
        Target::RestoreMark => "meta mark set ct mark".into(),
        Target::Tproxy { to_port, mark: m } => format!(
            "tproxy {} to :{to_port} meta mark set {} accept",
            l3(family),
            mark(*m)
        ),
    }
}

/// The `inet shunt` table for a plan, as typed values.
pub(crate) fn table(plan: &Plan) -> Table<'_> {
    let mut t = Table::default();
    let mut bases: Vec<Chain> = Vec::new();
    for rs in plan.families() {
        family_chains(rs, plan.nft_priority_offset, &mut t, &mut bases);
    }
    t.chains.append(&mut bases);
    t
}

/// The `inet shunt` table for a plan, exactly as `nft list table inet shunt` prints it.
pub fn render(plan: &Plan) -> String {
    text(&table(plan))
}

fn text(t: &Table) -> String {
    let mut blocks: Vec<String> = Vec::with_capacity(t.sets.len() + t.chains.len());
    for s in &t.sets {
        let kind = match s.family {
            Family::V4 => "ipv4_addr",
            Family::V6 => "ipv6_addr",
        };
        let elems: Vec<String> = s.nets.iter().map(net_text).collect();
        blocks.push(format!(
            "\tset {} {{\n\t\ttype {kind}\n\t\tflags interval\n\t\telements = {{ {} }}\n\t}}\n",
            s.name,
            elems.join(", ")
        ));
    }
    for c in &t.chains {
        let mut b = format!("\tchain {} {{\n", c.name);
        if let Some(h) = &c.hook {
            let _ = writeln!(
                b,
                "\t\ttype {} hook {} priority {}; policy accept;",
                h.kind, h.hook, h.priority
            );
        }
        for r in &c.rules {
            let _ = writeln!(b, "\t\t{}", r.text());
        }
        b.push_str("\t}\n");
        blocks.push(b);
    }
    let mut out = format!("table inet {TABLE} {{\n");
    out.push_str(&blocks.join("\n"));
    out.push_str("}\n");
    out
}

fn family_chains<'a>(
    rs: &'a Ruleset,
    priority_offset: i32,
    t: &mut Table<'a>,
    bases: &mut Vec<Chain<'a>>,
) {
    let f = rs.family;
    for table in &rs.tables {
        let tn = table.name.as_str();
        let chain_of = |c: &str| format!("{}_{tn}_{c}", fam_name(f));
        for chain in &table.chains {
            let name = chain_of(&chain.name);
            let mut rules = Vec::with_capacity(chain.rules.len());
            for (n, (run, slot)) in groups(&chain.rules).into_iter().enumerate() {
                let listed = slot.map(|i| {
                    let s = match &run[0].matches[i] {
                        Match::Source { .. } | Match::Destination { .. } => {
                            let mut nets: Vec<IpNet> = Vec::with_capacity(run.len());
                            nets.extend(run.iter().filter_map(|r| match &r.matches[i] {
                                Match::Source { net, .. } | Match::Destination { net, .. } => {
                                    Some(net.trunc())
                                }
                                _ => None,
                            }));
                            let set = format!("{name}_{n}");
                            t.sets.push(Set {
                                name: set.clone(),
                                family: f,
                                nets: IpNet::aggregate(&nets),
                            });
                            let src = matches!(run[0].matches[i], Match::Source { .. });
                            Stmt::Addr {
                                src,
                                negate: false,
                                addr: Addr::Set(set),
                            }
                        }
                        Match::DestinationPorts { .. } => Stmt::Ports {
                            proto: proto_of(&run[0]).unwrap_or(Proto::Tcp),
                            src: false,
                            negate: false,
                            ports: merge_ports(
                                run.iter()
                                    .flat_map(|r| match &r.matches[i] {
                                        Match::DestinationPorts { ports, .. } => ports.clone(),
                                        _ => vec![],
                                    })
                                    .collect(),
                            ),
                        },
                        m => Stmt::Owner {
                            kind: match m {
                                Match::Owner { kind, .. } => *kind,
                                _ => Owner::Uid,
                            },
                            negate: false,
                            ids: merge_ids(
                                run.iter()
                                    .filter_map(|r| match &r.matches[i] {
                                        Match::Owner { id, .. } => Some(*id),
                                        _ => None,
                                    })
                                    .collect(),
                            ),
                        },
                    };
                    (i, s)
                });
                rules.push(NftRule {
                    family: f,
                    stmts: stmts(&run[0], listed, &chain_of),
                });
            }
            t.chains.push(Chain {
                name: name.clone(),
                hook: None,
                rules,
            });
            if !chain.builtin {
                continue;
            }
            let Some(hook) = base_chain(table.name, &chain.name, priority_offset) else {
                continue;
            };
            let base = format!("{tn}_{}", hook.hook);
            let dispatch = NftRule {
                family: f,
                stmts: vec![Stmt::Nfproto(f), Stmt::Jump(name)],
            };
            match bases.iter_mut().find(|b| b.name == base) {
                Some(b) => b.rules.push(dispatch),
                None => bases.push(Chain {
                    name: base,
                    hook: Some(hook),
                    rules: vec![dispatch],
                }),
            }
        }
    }
}

/// The names of the chains `render` writes for the plan, base chains included.
pub fn chain_names(plan: &Plan) -> Vec<String> {
    table(plan).chains.into_iter().map(|c| c.name).collect()
}

/// The transaction that replaces the whole table: the kernel holds the old table or the new
/// one, never a mix, and nothing of an older plan survives.
pub fn transaction(plan: &Plan) -> String {
    transaction_of(&render(plan))
}

/// The transaction around a rendered table.
fn transaction_of(table: &str) -> String {
    format!("add table inet {TABLE}\ndelete table inet {TABLE}\n{table}")
}

/// A listing as comparable lines: nft wraps long element lists over several lines (after a
/// comma); those are joined, indentation and blank lines dropped, and base chain priorities
/// written as numbers.
pub fn lines(text: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for l in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if let Some(base) = numeric_priority(l) {
            out.push(base);
            continue;
        }
        match out.last_mut() {
            Some(prev) if prev.ends_with(',') => {
                prev.push(' ');
                prev.push_str(l);
            }
            _ => out.push(l.to_string()),
        }
    }
    out
}

/// How the `nft` installed here lists a rendered table, found by installing it in a scratch
/// namespace and listing it back. shunt writes nft 1.0.6's spelling; another version may
/// spell an expression otherwise, and without this every apply would rewrite the table and
/// `check` would report drift that is not there. Asked only when the lines differ; `None`
/// when it cannot be (no CAP_SYS_ADMIN for a namespace: the lines are compared as they are).
fn as_listed(table: &str) -> Option<String> {
    let scratch = Netns::scratch()
        .map_err(|e| tracing::debug!("no scratch namespace to compare spellings in: {e}"))
        .ok()?;
    run(&transaction_of(table), Some(&scratch)).ok()?;
    read(Some(&scratch)).ok().flatten()
}

/// `nft --version` at least [`MIN_VERSION`], else a clear refusal.
pub fn preflight(ns: Option<&Netns>) -> Result<(), NetfilterError> {
    let out = spawn_tool("nft", &["--version"], None, ns)?.wait()?;
    let version = out
        .split_whitespace()
        .find_map(|w| w.strip_prefix('v'))
        .and_then(|v| {
            let mut it = v.split('.').map(|n| n.parse::<u32>().ok());
            Some((it.next()??, it.next()??, it.next().flatten().unwrap_or(0)))
        });
    match version {
        Some(v) if v >= MIN_VERSION => Ok(()),
        _ => Err(NetfilterError::ToolFailed {
            tool: "nft".into(),
            status: format!("version {}", out.trim()),
            stderr: format!(
                "--backend nftables needs nft {}.{}.{} or newer (Debian: apt-get install nftables)",
                MIN_VERSION.0, MIN_VERSION.1, MIN_VERSION.2
            ),
        }),
    }
}

/// A read of shunt's table under way, or one the kernel already answered: a namespace whose
/// nf_tables has no `inet shunt` (a fresh one, say) starts no `nft` at all.
pub struct Reading(Option<crate::netfilter::Running>);

/// Whether the kernel says the namespace has no `inet shunt` (false when it would not say).
fn absent(ns: Option<&Netns>) -> bool {
    absent_from(crate::netlink::tables(ns).as_deref())
}

/// Whether the tables listed (`None`: unknown) hold no `inet shunt`.
pub fn absent_from(tables: Option<&[crate::netlink::Table]>) -> bool {
    tables.is_some_and(|tables| {
        !tables
            .iter()
            .any(|t| t.family == crate::netlink::INET && t.name == TABLE)
    })
}

/// Starts reading shunt's table (`nft list table inet shunt`).
pub fn list(ns: Option<&Netns>) -> Result<Reading, NetfilterError> {
    if absent(ns) {
        return Ok(Reading(None));
    }
    spawn_tool("nft", &["list", "table", "inet", TABLE], None, ns).map(|run| Reading(Some(run)))
}

impl Reading {
    /// The table as listed, or `None` when there is none.
    pub fn finish(self) -> Result<Option<String>, NetfilterError> {
        let Some(run) = self.0 else {
            return Ok(None);
        };
        match run.wait() {
            Ok(text) => Ok(Some(text)),
            Err(NetfilterError::ToolFailed { stderr, .. })
                if stderr.contains("No such file or directory") =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }
}

/// shunt's table as installed, or `None` when there is none.
pub fn read(ns: Option<&Netns>) -> Result<Option<String>, NetfilterError> {
    list(ns)?.finish()
}

/// Whether transactions are written over netlink (the default) or through `nft -f -`
/// (`SHUNT_NFT_WRITER=nft`: the same table, for comparing or working around a kernel that
/// takes nft's encoding and not shunt's).
pub fn native_writer() -> bool {
    std::env::var_os("SHUNT_NFT_WRITER").map_or(true, |v| v != "nft")
}

/// Commits a batch in the namespace.
fn commit(batch: crate::netlink::Batch, ns: Option<&Netns>) -> Result<(), NetfilterError> {
    let (messages, bytes) = batch.size();
    tracing::debug!(messages, bytes, "nf_tables transaction over netlink");
    crate::netlink::commit(ns, batch)?.map_err(|r| NetfilterError::Refused {
        what: r.what,
        source: r.source,
    })
}

/// Runs an `nft -f -` transaction.
pub fn run(script: &str, ns: Option<&Netns>) -> Result<(), NetfilterError> {
    spawn_tool("nft", &["-f", "-"], Some(script), ns)?
        .wait()
        .map(drop)
}

/// The tproxy marks a listing sets (for `clean` to remove their policy routing).
pub fn marks(listing: &str) -> Vec<u32> {
    let mut out: Vec<u32> = listing
        .split("meta mark set ")
        .skip(1)
        .filter_map(|rest| {
            let word = rest.split_whitespace().next()?;
            u32::from_str_radix(word.strip_prefix("0x")?, 16).ok()
        })
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

// === The engine ===

/// shunt's `inet shunt` table in one namespace.
pub struct Nftables {
    ns: Option<Netns>,
    /// The read, started at once so it runs beside the caller's other work.
    reading: Option<Reading>,
    /// The listing read once per command: `Some(None)` when there is no table.
    listing: Option<Option<String>>,
    /// Transactions go over netlink, not through `nft -f -` ([`native_writer`]).
    native: bool,
}

impl Nftables {
    /// Starts reading shunt's table, unless the caller has just listed it (`known`). `nft`'s
    /// version is only asked when something fails (see [`preflight`]), so a working apply
    /// costs one process less.
    pub fn new(
        ns: Option<Netns>,
        known: Option<Option<String>>,
    ) -> Result<Nftables, NetfilterError> {
        // Read back, check and clean list the table with nft: refuse at once without it, not
        // on the second apply.
        if crate::netfilter::find_tool("nft").is_none() {
            return Err(NetfilterError::MissingTool { tool: "nft".into() });
        }
        let reading = match known {
            Some(_) => None,
            None => Some(list(ns.as_ref())?),
        };
        Ok(Nftables {
            ns,
            reading,
            listing: known,
            native: native_writer(),
        })
    }

    fn installed(&mut self) -> Result<Option<String>, NetfilterError> {
        if let Some(reading) = self.reading.take() {
            let read = reading.finish();
            self.listing = Some(read.map_err(|e| self.explain(e))?);
        }
        if self.listing.is_none() {
            self.listing = Some(read(self.ns.as_ref())?);
        }
        Ok(self.listing.clone().flatten())
    }

    /// A failure of `nft`, or, when `nft` is too old for shunt, that instead.
    fn explain(&self, e: NetfilterError) -> NetfilterError {
        match preflight(self.ns.as_ref()) {
            Err(old) => old,
            Ok(()) => e,
        }
    }
}

impl Engine for Nftables {
    fn kind(&self) -> EngineKind {
        EngineKind::Nftables
    }

    fn installed_marks(&mut self) -> Result<Vec<u32>, NetfilterError> {
        Ok(self.installed()?.map(|t| marks(&t)).unwrap_or_default())
    }

    fn converge(
        &mut self,
        plan: &Plan,
        dry_run: bool,
    ) -> Result<Vec<(Part, String)>, NetfilterError> {
        let table = table(plan);
        let want = text(&table);
        if let Some(now) = self.installed()? {
            let now = lines(&now);
            if now == lines(&want) || as_listed(&want).is_some_and(|l| lines(&l) == now) {
                return Ok(Vec::new());
            }
        }
        let script = transaction_of(&want);
        if !dry_run {
            if self.native {
                #[allow(unused_mut)]
                let mut batch = wire::transaction(&table);
                // Tests make the kernel refuse the batch at its very end (debug builds only).
                #[cfg(debug_assertions)]
                if std::env::var_os("SHUNT_TEST_NFT_BAD_ELEMENT").is_some() {
                    wire::bad_element(&mut batch);
                }
                commit(batch, self.ns.as_ref())?;
            } else {
                run(&script, self.ns.as_ref()).map_err(|e| self.explain(e))?;
            }
            self.listing = None;
        }
        Ok(vec![(Part::Inet, script)])
    }

    fn drift(&mut self, plan: &Plan) -> Result<Vec<(Part, Vec<String>)>, NetfilterError> {
        let want = render(plan);
        let installed = self.installed()?;
        let now = installed.as_deref().map(lines).unwrap_or_default();
        let mut d = crate::engine::diff(&now, &lines(&want));
        if !d.is_empty() && installed.is_some() {
            // Another nft may spell the same table otherwise: compare with its own spelling.
            if let Some(spelled) = as_listed(&want) {
                d = crate::engine::diff(&now, &lines(&spelled));
            }
        }
        Ok(if d.is_empty() {
            vec![]
        } else {
            vec![(Part::Inet, d)]
        })
    }

    fn clean(&mut self) -> Cleaned {
        let mut out = Cleaned::default();
        match self.installed() {
            Ok(None) => {}
            Ok(Some(text)) => {
                out.marks = marks(&text);
                let script = format!("delete table inet {TABLE}\n");
                let done = if self.native {
                    commit(wire::delete(), self.ns.as_ref())
                } else {
                    run(&script, self.ns.as_ref())
                };
                match done {
                    Ok(()) => out.removed.push((Part::Inet, script)),
                    Err(e) => out.errors.push(format!("nftables: {e}")),
                }
            }
            Err(e) => out.errors.push(format!("nftables: {e}")),
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RawOptions;
    use crate::plan;

    fn plan_of(pairs: RawOptions) -> Plan {
        plan::build(&pairs.resolve().unwrap(), true)
    }

    #[test]
    fn every_priority_offset_is_spelled_so_that_it_reads_back_as_its_number() {
        let bases = [
            (TableName::Raw, "OUTPUT", -300),
            (TableName::Mangle, "PREROUTING", -150),
            (TableName::Mangle, "OUTPUT", -150),
            (TableName::Nat, "PREROUTING", -100),
            (TableName::Nat, "OUTPUT", -100),
            (TableName::Filter, "OUTPUT", 0),
        ];
        for offset in (-49..=49).filter(|o| *o != 0) {
            for (table, builtin, base) in bases {
                let hook = base_chain(table, builtin, offset).expect("a base chain");
                assert_eq!(
                    priority_value(&hook.priority),
                    Some(base + offset),
                    "{hook:?}"
                );
                assert_eq!(hook.value, base + offset, "{hook:?}");
            }
        }
        // nft lists one priority either way; both compare as the same line.
        assert_eq!(
            lines("type filter hook output priority mangle + 20; policy accept;"),
            lines("type filter hook output priority -130; policy accept;")
        );
        assert_eq!(
            lines("\t\ttype nat hook prerouting priority dstnat - 10; policy accept;"),
            vec!["type nat hook prerouting priority -110; policy accept;"]
        );
        // Anything else in a priority is left as written, so it shows as drift.
        assert_eq!(priority_value("dstnat * 2"), None);
        assert_eq!(priority_value("nosuch + 1"), None);
    }

    #[test]
    fn the_default_plan_is_two_families_behind_two_base_chains() {
        let text = render(&plan::build(&Default::default(), true));
        assert!(text.starts_with("table inet shunt {\n"), "{text}");
        assert!(text.contains("\tchain nat_output {\n\t\ttype nat hook output priority -110; policy accept;\n\t\tmeta nfproto ipv4 jump v4_nat_OUTPUT\n\t\tmeta nfproto ipv6 jump v6_nat_OUTPUT\n"), "{text}");
        assert!(
            text.contains("type nat hook prerouting priority dstnat - 10;"),
            "{text}"
        );
        assert!(
            text.contains("\t\tip saddr 127.0.0.6 oifname \"lo\" return\n"),
            "{text}"
        );
        assert!(
            text.contains("\t\tip6 saddr ::6 oifname \"lo\" return\n"),
            "{text}"
        );
        assert!(text.contains("\t\tip daddr != 127.0.0.0/8 oifname \"lo\" meta skuid 1337 jump v4_nat_SHUNT_INBOUND\n"), "{text}");
        assert!(
            text.contains("\t\ttcp dport { 15001, 15006 } return\n"),
            "{text}"
        );
        assert!(
            text.contains("\t\tmeta l4proto tcp redirect to :15001\n"),
            "{text}"
        );
    }

    #[test]
    fn cidr_lists_become_aggregated_sets_and_port_lists_one_rule() {
        let p = plan_of(RawOptions {
            exclude_outbound_cidrs: Some(
                "10.0.0.0/9,10.128.0.0/9,10.1.0.0/16,192.168.1.1,fd00::/8".into(),
            ),
            exclude_outbound_ports: Some(
                (1..=40)
                    .map(|i| (i * 100).to_string())
                    .collect::<Vec<_>>()
                    .join(","),
            ),
            proxy_uid: Some("1337,2000-2002".into()),
            ..Default::default()
        });
        let text = render(&p);
        // 10.0.0.0/9 + 10.128.0.0/9 = 10.0.0.0/8, which holds 10.1.0.0/16.
        assert!(
            text.contains("elements = { 10.0.0.0/8, 192.168.1.1 }"),
            "{text}"
        );
        // One IPv6 prefix needs no set.
        assert!(
            text.contains("\t\tip6 daddr fd00::/8 meta l4proto tcp return\n"),
            "{text}"
        );
        assert!(!text.contains("ipv6_addr"), "{text}");
        assert!(text.contains("ip daddr @v4_nat_SHUNT_OUTBOUND_"), "{text}");
        // 40 ports were three multiport rules on iptables: one set here.
        assert_eq!(text.matches("tcp dport { 100, 200,").count(), 2, "{text}");
        assert!(
            text.contains("meta skuid { 1337, 2000-2002 } return"),
            "{text}"
        );
    }

    #[test]
    fn overlapping_and_touching_ranges_are_merged_as_nft_merges_them() {
        let ids = |v: &[(u32, u32)]| {
            v.iter()
                .map(|&(first, last)| IdRange { first, last })
                .collect::<Vec<_>>()
        };
        let merged = merge_ids(ids(&[
            (3000, 3999),
            (1000, 2000),
            (1500, 1500),
            (4000, 4999),
        ]));
        assert_eq!(merged, ids(&[(1000, 2000), (3000, 4999)]));
        let ports = merge_ports(vec![
            PortRange {
                first: 80,
                last: 80,
            },
            PortRange {
                first: 65000,
                last: 65535,
            },
            PortRange {
                first: 81,
                last: 90,
            },
            PortRange {
                first: 65535,
                last: 65535,
            },
        ]);
        assert_eq!(ports_text(&ports), "{ 80-90, 65000-65535 }");
    }

    #[test]
    fn interface_wildcards_keep_their_meaning() {
        let p = plan_of(RawOptions {
            exclude_interfaces: Some("veth+,eth9".into()),
            ..Default::default()
        });
        let text = render(&p);
        assert!(text.contains("iifname \"veth*\" return"), "{text}");
        assert!(text.contains("iifname \"eth9\" return"), "{text}");
    }

    #[test]
    fn listings_join_wrapped_element_lines() {
        let listed = "table inet shunt {\n\tset s {\n\t\telements = { 10.0.0.0/8,\n\t\t\t     192.168.0.0/16 }\n\t}\n\n\tchain c {\n\t}\n}\n";
        assert_eq!(
            lines(listed),
            [
                "table inet shunt {",
                "set s {",
                "elements = { 10.0.0.0/8, 192.168.0.0/16 }",
                "}",
                "chain c {",
                "}",
                "}"
            ]
        );
    }

    #[test]
    fn marks_are_read_from_a_listing() {
        let p = plan_of(RawOptions {
            mode: Some("tproxy".into()),
            tproxy_mark: Some("7".into()),
            ..Default::default()
        });
        assert_eq!(marks(&render(&p)), [7]);
        assert!(marks(&render(&plan::build(&Default::default(), true))).is_empty());
    }
}
