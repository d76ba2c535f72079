//! The capture plan: the rules shunt installs, as typed values per IP family.
//!
//! A pure function of the [`CaptureConfig`]; render, apply, check and explain all start
//! here, so there is exactly one description of the rules.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::Serialize;

use crate::config::{CaptureConfig, IdRange, IstioLayout, Mode, OwnerGroups, PortRange, Set};

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
    Protocol(Proto),
    /// Destination ports of the rule's protocol; one range uses `-m tcp --dport`, several
    /// `-m multiport --dports`.
    DestinationPorts {
        ports: Vec<PortRange>,
        negate: bool,
    },
    #[serde(serialize_with = "field::<_, u16, 0>")]
    SourcePort(u16),
    /// `-m conntrack --ctstate INVALID`
    CtInvalid,
    /// `-m conntrack --ctstate RELATED,ESTABLISHED`
    CtEstablished,
    /// `-m mark --mark M`: the packet's mark
    #[serde(serialize_with = "field::<_, u32, 1>")]
    Mark(u32),
    /// `-m connmark --mark M`: the connection's mark
    #[serde(serialize_with = "field::<_, u32, 1>")]
    Connmark(u32),
    Owner {
        kind: Owner,
        id: IdRange,
        negate: bool,
    },
}

/// A one-number variant of the internally tagged [`Match`] as `{"match": .., "port": 53}`
/// (`NAME` 0) or `"mark"` (1): serde cannot put a tag beside a bare number.
fn field<S: serde::Serializer, T: Serialize, const NAME: usize>(
    value: &T,
    s: S,
) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeStruct;
    let name = ["port", "mark"][NAME];
    let mut st = s.serialize_struct("Match", 1)?;
    st.serialize_field(name, value)?;
    st.end()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "target")]
pub enum Target {
    /// Chain names are shunt's constants: a plan of 10,000 CIDR rules then holds no
    /// 10,000 copies of one name (allocating and freeing the plan's rules stood out in a
    /// profile of such an apply).
    Jump {
        chain: &'static str,
    },
    Return,
    Redirect {
        to_port: u16,
    },
    Drop,
    Accept,
    /// `-j CT --zone N`: a conntrack zone (raw table), so two flows with the same tuple differ.
    CtZone {
        zone: u16,
    },
    /// `-j MARK --set-xmark M/0xffffffff`
    SetMark {
        mark: u32,
    },
    /// `-j CONNMARK --save-mark`: the packet's mark onto its connection
    SaveMark,
    /// `-j CONNMARK --restore-mark`: the connection's mark onto the packet
    RestoreMark,
    /// `-j TPROXY`: hand the packet to a transparent listener on `to_port`, marking it
    Tproxy {
        to_port: u16,
        mark: u32,
    },
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
    /// tproxy mode: packets carrying `mark` are looked up in `table`, which delivers everything
    /// locally (`ip rule add fwmark M lookup T` + `ip route add local default dev lo table T`).
    pub routing: Option<Routing>,
    /// The nftables engine's base chains sit this far from the priority of the iptables
    /// table each stands for (iptables' own tables have fixed priorities).
    pub nft_priority_offset: i32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Routing {
    pub mark: u32,
    pub table: u32,
}

impl Plan {
    pub fn families(&self) -> impl Iterator<Item = &Ruleset> {
        std::iter::once(&self.v4).chain(self.v6.as_ref())
    }
}

const OUTPUT: &str = "SHUNT_OUTPUT";
const OUTBOUND: &str = "SHUNT_OUTBOUND";
const INBOUND: &str = "SHUNT_INBOUND";
const REDIRECT: &str = "SHUNT_REDIRECT";
const IN_REDIRECT: &str = "SHUNT_IN_REDIRECT";
const DNS: &str = "SHUNT_DNS";
const DNS_REPLY: &str = "SHUNT_DNS_REPLY";
const PREROUTING: &str = "SHUNT_PREROUTING";
/// The tproxy chain that marks packets for the policy route; `clean` reads the mark back
/// from it.
pub const DIVERT: &str = "SHUNT_DIVERT";
const TPROXY: &str = "SHUNT_TPROXY";

/// Conntrack zones for DNS (raw table): the proxy's upstream queries and the servers' replies
/// in one, the app's redirected queries and the proxy's answers in the other, so a query the
/// proxy forwards can never be mistaken for the app's and NATed back to it.
const ZONE_UPSTREAM: u16 = 1;
const ZONE_APP: u16 = 2;

fn rule(matches: Vec<Match>, target: Target) -> Rule {
    Rule { matches, target }
}

fn jump(chain: &'static str) -> Target {
    Target::Jump { chain }
}

const TCP: Match = Match::Protocol(Proto::Tcp);
const UDP: Match = Match::Protocol(Proto::Udp);

fn dports(ports: &[PortRange], negate: bool) -> Match {
    Match::DestinationPorts {
        ports: ports.to_vec(),
        negate,
    }
}

fn port(p: u16) -> PortRange {
    PortRange { first: p, last: p }
}

fn dst(net: IpNet) -> Match {
    Match::Destination { net, negate: false }
}

fn owner(kind: Owner, id: IdRange) -> Match {
    Match::Owner {
        kind,
        id,
        negate: false,
    }
}

fn iface_in(name: &str) -> Match {
    Match::InInterface {
        name: name.into(),
        negate: false,
    }
}

fn iface_out(name: &str) -> Match {
    Match::OutInterface {
        name: name.into(),
        negate: false,
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
        Set::All => vec![rule(vec![TCP], target.clone())],
        Set::List(list) => port_chunks(list)
            .into_iter()
            .map(|c| rule(vec![TCP, dports(c, false)], target.clone()))
            .collect(),
    }
}

/// How many rules [`cidr_rules`] makes.
fn cidr_rule_count(family: Family, nets: &Set<IpNet>) -> usize {
    match nets {
        Set::All => 1,
        Set::List(list) => list.iter().filter(|n| family.contains(n)).count(),
    }
}

/// Appends the rules that send TCP to `target` when the destination is in `nets`. Pushed
/// straight into the chain's vector (reserved by the caller with [`cidr_rule_count`] for all
/// its CIDR rules at once): a 10,000-CIDR list would otherwise be built once and copied once
/// more, or regrow the vector.
fn cidr_rules(out: &mut Vec<Rule>, family: Family, nets: &Set<IpNet>, target: &Target) {
    match nets {
        Set::All => out.push(rule(vec![TCP], target.clone())),
        Set::List(list) => {
            out.extend(
                list.iter()
                    .filter(|n| family.contains(n))
                    .map(|n| rule(vec![dst(*n), TCP], target.clone())),
            );
        }
    }
}

fn owners(cfg: &CaptureConfig) -> impl Iterator<Item = (Owner, IdRange)> + '_ {
    cfg.proxy_uid
        .iter()
        .map(|id| (Owner::Uid, *id))
        .chain(cfg.proxy_gid.iter().map(|id| (Owner::Gid, *id)))
}

/// The DNS servers of this family whose traffic is captured; `None` means every destination.
fn dns_targets(cfg: &CaptureConfig, family: Family) -> Option<Vec<IpNet>> {
    if cfg.capture_all_dns {
        return None;
    }
    let servers = cfg.dns_servers.as_deref().unwrap_or(&[]);
    Some(
        servers
            .iter()
            .map(|a| IpNet::from(*a))
            .filter(|n| family.contains(n))
            .collect(),
    )
}

/// Rules that match DNS to the captured servers (or to anyone), for one protocol.
fn dns_rules(targets: &Option<Vec<IpNet>>, proto: Proto, target: &Target) -> Vec<Rule> {
    let base = vec![Match::Protocol(proto), dports(&[port(53)], false)];
    match targets {
        None => vec![rule(base, target.clone())],
        Some(nets) => nets
            .iter()
            .map(|n| {
                let mut m = vec![dst(*n)];
                m.extend(base.clone());
                rule(m, target.clone())
            })
            .collect(),
    }
}

fn ruleset(cfg: &CaptureConfig, family: Family) -> Ruleset {
    if let Some(istio) = &cfg.istio {
        return istio_ruleset(cfg, istio, family);
    }
    let lo = || iface_out("lo");
    let dns = cfg.redirect_dns.then(|| dns_targets(cfg, family));
    let to_dns = Target::Redirect {
        to_port: cfg.dns_port,
    };

    // SHUNT_OUTBOUND: which destinations are captured, for the app's packets and for those
    // arriving on --virt-interfaces. Port exclusions win, then port inclusions, then CIDRs.
    let mut outbound = port_rules(&cfg.exclude_outbound_ports, &Target::Return);
    if !cfg.outbound_ports.is_empty() {
        outbound.extend(port_rules(&cfg.outbound_ports, &jump(REDIRECT)));
    }
    outbound.reserve(
        cidr_rule_count(family, &cfg.exclude_outbound_cidrs)
            + cidr_rule_count(family, &cfg.outbound_cidrs),
    );
    cidr_rules(
        &mut outbound,
        family,
        &cfg.exclude_outbound_cidrs,
        &Target::Return,
    );
    cidr_rules(&mut outbound, family, &cfg.outbound_cidrs, &jump(REDIRECT));

    // nat PREROUTING -> SHUNT_INBOUND: TCP arriving from outside.
    let mut inbound = Vec::new();
    for name in &cfg.exclude_interfaces {
        inbound.push(rule(vec![iface_in(name)], Target::Return));
    }
    // A VM's traffic enters the pod on its interface but is outbound for the mesh.
    for name in &cfg.virt_interfaces {
        inbound.push(rule(vec![iface_in(name)], jump(OUTBOUND)));
        inbound.push(rule(vec![iface_in(name)], Target::Return));
    }
    // The proxy's own ports are never captured inbound, whatever the lists say.
    let mut own = vec![port(cfg.proxy_port), port(cfg.inbound_port)];
    own.sort();
    inbound.extend(port_rules(&Set::List(own), &Target::Return));
    inbound.extend(port_rules(&cfg.exclude_inbound_ports, &Target::Return));
    if !cfg.exclude_inbound_ports.eq(&Set::All) {
        inbound.extend(port_rules(&cfg.inbound_ports, &jump(IN_REDIRECT)));
    }

    let tproxy = cfg.mode == Mode::Tproxy;
    // nat OUTPUT -> SHUNT_OUTPUT: TCP sent from inside the pod.
    let mut output = Vec::new();
    if tproxy {
        // The proxy's transparent inbound leg (it marks its sockets) is never captured.
        output.push(rule(vec![Match::Mark(cfg.tproxy_mark)], Target::Return));
    }
    for name in &cfg.exclude_interfaces {
        output.push(rule(vec![iface_out(name)], Target::Return));
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
                owner(kind, id),
            ],
            jump(INBOUND),
        ));
    }
    // Everything else the proxy sends goes where it was addressed.
    for (kind, id) in owners(cfg) {
        output.push(rule(vec![owner(kind, id)], Target::Return));
    }
    // DNS over TCP is captured before the loopback exception (a stub resolver on 127.0.0.53).
    if dns.is_some() {
        output.push(rule(vec![TCP, dports(&[port(53)], false)], jump(DNS)));
    }
    // Loopback, and an app calling its own pod address, stay local.
    output.push(rule(vec![lo()], Target::Return));
    output.push(rule(vec![], jump(OUTBOUND)));

    let builtin = |name: &str, rules: Vec<Rule>| Chain {
        name: name.into(),
        builtin: true,
        rules,
    };
    let user = |name: &str, rules: Vec<Rule>| Chain {
        name: name.into(),
        builtin: false,
        rules,
    };
    let redirect_to = |p: u16| vec![rule(vec![TCP], Target::Redirect { to_port: p })];

    let mut nat_output = vec![rule(vec![TCP], jump(OUTPUT))];
    let mut nat_chains = vec![
        user(INBOUND, inbound),
        user(IN_REDIRECT, redirect_to(cfg.inbound_port)),
        user(OUTPUT, output),
        user(OUTBOUND, outbound),
        user(REDIRECT, redirect_to(cfg.proxy_port)),
    ];
    let mut tables = Vec::new();

    if let Some(targets) = &dns {
        // nat: the app's DNS (UDP from OUTPUT, TCP via SHUNT_OUTPUT) goes to the DNS port.
        nat_output.push(rule(vec![UDP, dports(&[port(53)], false)], jump(DNS)));
        let mut rules: Vec<Rule> = owners(cfg)
            .map(|(k, id)| rule(vec![owner(k, id)], Target::Return))
            .collect();
        rules.extend(dns_rules(targets, Proto::Udp, &to_dns));
        rules.extend(dns_rules(targets, Proto::Tcp, &to_dns));
        nat_chains.push(user(DNS, rules));

        // raw: conntrack zones for UDP DNS.
        let zone = |z| Target::CtZone { zone: z };
        let mut raw_out = Vec::new();
        for (k, id) in owners(cfg) {
            raw_out.push(rule(
                vec![UDP, dports(&[port(53)], false), owner(k, id)],
                zone(ZONE_UPSTREAM),
            ));
            raw_out.push(rule(
                vec![UDP, Match::SourcePort(cfg.dns_port), owner(k, id)],
                zone(ZONE_APP),
            ));
        }
        raw_out.extend(dns_rules(targets, Proto::Udp, &zone(ZONE_APP)));
        let replies: Vec<Rule> = match targets {
            None => vec![rule(vec![UDP, Match::SourcePort(53)], zone(ZONE_UPSTREAM))],
            Some(nets) => nets
                .iter()
                .map(|n| {
                    rule(
                        vec![
                            Match::Source {
                                net: *n,
                                negate: false,
                            },
                            UDP,
                            Match::SourcePort(53),
                        ],
                        zone(ZONE_UPSTREAM),
                    )
                })
                .collect(),
        };
        tables.push(Table {
            name: TableName::Raw,
            chains: vec![
                builtin("PREROUTING", vec![rule(vec![UDP], jump(DNS_REPLY))]),
                builtin("OUTPUT", vec![rule(vec![UDP], jump(DNS))]),
                user(DNS, raw_out),
                user(DNS_REPLY, replies),
            ],
        });
    }

    let mut mangle_prerouting = Vec::new();
    let mut mangle_chains = Vec::new();
    if cfg.drop_invalid {
        // Before nat: a packet conntrack cannot place would bypass the redirect and reach the
        // app, which answers with a reset that kills the client's real connection.
        mangle_prerouting.push(rule(vec![TCP], jump(PREROUTING)));
        mangle_chains.push(user(
            PREROUTING,
            vec![rule(vec![Match::CtInvalid], Target::Drop)],
        ));
    }
    let mut mangle_output = Vec::new();
    if tproxy {
        let mark = cfg.tproxy_mark;
        // Inbound: new connections to captured ports go to the transparent listener; packets of
        // established ones are marked so the policy route delivers them locally.
        let mut inbound = vec![rule(vec![iface_in("lo")], Target::Return)];
        for name in &cfg.exclude_interfaces {
            inbound.push(rule(vec![iface_in(name)], Target::Return));
        }
        let mut own = vec![port(cfg.proxy_port), port(cfg.inbound_port)];
        own.sort();
        inbound.extend(port_rules(&Set::List(own), &Target::Return));
        inbound.extend(port_rules(&cfg.exclude_inbound_ports, &Target::Return));
        if !cfg.exclude_inbound_ports.eq(&Set::All) {
            for r in port_rules(&cfg.inbound_ports, &jump(DIVERT)) {
                let mut established = r.matches.clone();
                established.push(Match::CtEstablished);
                inbound.push(rule(established, jump(DIVERT)));
                inbound.push(rule(r.matches, jump(TPROXY)));
            }
        }
        mangle_prerouting.push(rule(vec![TCP], jump(INBOUND)));
        mangle_chains.push(user(INBOUND, inbound));
        mangle_chains.push(user(
            DIVERT,
            vec![
                rule(vec![], Target::SetMark { mark }),
                rule(vec![], Target::Accept),
            ],
        ));
        mangle_chains.push(user(
            TPROXY,
            vec![rule(
                vec![
                    Match::Destination {
                        net: family.loopback(),
                        negate: true,
                    },
                    TCP,
                ],
                Target::Tproxy {
                    to_port: cfg.inbound_port,
                    mark,
                },
            )],
        ));
        // The proxy connects to the app from the client's address with its sockets marked; the
        // connection keeps the mark, and the app's replies get it back, so they are routed to
        // the proxy through lo instead of out to the real client.
        mangle_output.push(rule(vec![TCP], jump(OUTPUT)));
        mangle_chains.push(user(
            OUTPUT,
            vec![
                rule(vec![Match::Mark(mark)], Target::SaveMark),
                rule(vec![Match::Connmark(mark)], Target::RestoreMark),
            ],
        ));
    }
    if !mangle_chains.is_empty() {
        let mut chains = Vec::new();
        if !mangle_prerouting.is_empty() {
            chains.push(builtin("PREROUTING", mangle_prerouting));
        }
        if !mangle_output.is_empty() {
            chains.push(builtin("OUTPUT", mangle_output));
        }
        chains.extend(mangle_chains);
        tables.push(Table {
            name: TableName::Mangle,
            chains,
        });
    }

    let mut chains = Vec::new();
    if !tproxy {
        chains.push(builtin("PREROUTING", vec![rule(vec![TCP], jump(INBOUND))]));
    }
    chains.push(builtin("OUTPUT", nat_output));
    chains.append(&mut nat_chains);
    tables.push(Table {
        name: TableName::Nat,
        chains,
    });
    tables.sort_by_key(|t| t.name);
    Ruleset { family, tables }
}

// === Istio's layout ===

/// The mark Istio's TPROXY mode puts on the proxy's own dials through lo (its `OutboundMark`),
/// so that they, and only they, take the inbound path in mangle.
pub const ISTIO_OUTBOUND_MARK: u32 = 1338;

const INBOUND_PORTS: &str = "SHUNT_INBOUND_PORTS";

fn not(m: Match) -> Match {
    match m {
        Match::Destination { net, .. } => Match::Destination { net, negate: true },
        Match::Owner { kind, id, .. } => Match::Owner {
            kind,
            id,
            negate: true,
        },
        Match::DestinationPorts { ports, .. } => Match::DestinationPorts {
            ports,
            negate: true,
        },
        other => other,
    }
}

/// `istio-iptables`' rules, rule for rule in Istio's order (tools/istio-iptables
/// `capture/run.go`), in shunt's chains: `ISTIO_OUTPUT` is `SHUNT_OUTPUT`, `ISTIO_INBOUND`
/// `SHUNT_INBOUND`, and so on. The only changes are ones the kernel cannot tell apart: Istio's
/// RETURNs in built-in chains live in `SHUNT_PREROUTING` / `SHUNT_OUTPUT` (SPEC §3 item 7), and
/// `-i lo -m mark ! --mark 1338 -j RETURN` is spelled with a positive mark and a jump.
fn istio_ruleset(cfg: &CaptureConfig, istio: &IstioLayout, family: Family) -> Ruleset {
    let servers = dns_targets(cfg, family);
    // Istio turns DNS capture off when it has nothing to capture.
    let any_server = cfg.capture_all_dns || !cfg.dns_servers.as_deref().unwrap_or(&[]).is_empty();
    let dns = cfg.redirect_dns && any_server;
    let x = IstioFamily {
        cfg,
        istio,
        family,
        loopback: match family {
            Family::V4 => istio.loopback_v4,
            Family::V6 => family.loopback(),
        },
        tproxy: cfg.mode == Mode::Tproxy,
        tunnel: port(istio.tunnel_port),
        dns,
        family_dns: dns && servers.as_ref().map_or(true, |s| !s.is_empty()),
        servers,
    };
    let mut tables = vec![istio_nat(&x)];
    tables.extend(istio_raw(&x));
    tables.extend(istio_mangle(&x));
    tables.sort_by_key(|t| t.name);
    Ruleset { family, tables }
}

/// What every part of Istio's layout for one family needs to know.
struct IstioFamily<'a> {
    cfg: &'a CaptureConfig,
    istio: &'a IstioLayout,
    family: Family,
    /// The loopback destination that is never captured (v4: the layout's; v6: ::1).
    loopback: IpNet,
    tproxy: bool,
    tunnel: PortRange,
    /// DNS capture is on (Istio switches it off with no server and no --capture-all-dns).
    dns: bool,
    /// ...and this family has something to capture.
    family_dns: bool,
    /// This family's DNS servers; `None`: every destination.
    servers: Option<Vec<IpNet>>,
}

fn user(name: &str, rules: Vec<Rule>) -> Chain {
    Chain {
        name: name.into(),
        builtin: false,
        rules,
    }
}

fn builtin(name: &str, rules: Vec<Rule>) -> Chain {
    Chain {
        name: name.into(),
        builtin: true,
        rules,
    }
}

/// nat PREROUTING's rules (in `SHUNT_PREROUTING`): VM interfaces first (Istio inserts them at
/// the top), then exclusions, then inbound capture.
fn istio_prerouting(x: &IstioFamily) -> Vec<Rule> {
    let cfg = x.cfg;
    let mut rules = Vec::new();
    for name in cfg.virt_interfaces.iter().rev() {
        match &cfg.outbound_cidrs {
            Set::All => rules.push(rule(vec![iface_in(name)], jump(REDIRECT))),
            Set::List(nets) => {
                for n in nets.iter().filter(|n| x.family.contains(n)) {
                    rules.push(rule(vec![iface_in(name), dst(*n)], jump(REDIRECT)));
                }
            }
        }
    }
    for name in cfg.virt_interfaces.iter().rev() {
        rules.push(rule(vec![iface_in(name)], Target::Return));
    }
    for name in &cfg.exclude_interfaces {
        rules.push(rule(vec![iface_in(name)], Target::Return));
    }
    if !cfg.inbound_ports.is_empty() && !x.tproxy {
        rules.push(rule(vec![TCP], jump(INBOUND)));
    }
    rules
}

/// nat `SHUNT_OUTPUT` (Istio's `ISTIO_OUTPUT`), in Istio's order.
fn istio_output(x: &IstioFamily) -> Vec<Rule> {
    let (cfg, istio) = (x.cfg, x.istio);
    let lo = || iface_out("lo");
    let mut output = Vec::new();
    for name in &cfg.exclude_interfaces {
        output.push(rule(vec![iface_out(name)], Target::Return));
    }
    // -o comes first: for every uid, TCP and UDP.
    if let Set::List(ports) = &cfg.exclude_outbound_ports {
        for c in port_chunks(ports) {
            output.push(rule(vec![TCP, dports(c, false)], Target::Return));
            output.push(rule(vec![UDP, dports(c, false)], Target::Return));
        }
    }
    let source = Match::Source {
        net: x.family.inbound_source(),
        negate: false,
    };
    output.push(rule(vec![lo(), source], Target::Return));
    for (kind, id) in owners(cfg) {
        // The proxy dialling anything through lo but the loopback exception is inbound traffic,
        // whatever -b says; under DNS capture the uid rule spares port 53 (the gid rule does not).
        let spared = if x.dns && kind == Owner::Uid {
            vec![port(53), x.tunnel]
        } else {
            vec![x.tunnel]
        };
        output.push(rule(
            vec![
                lo(),
                not(dst(x.loopback)),
                TCP,
                dports(&spared, true),
                owner(kind, id),
            ],
            jump(IN_REDIRECT),
        ));
        if istio.lo_return {
            let mut m = vec![lo()];
            if x.dns {
                m.extend([TCP, dports(&[port(53)], true)]);
            }
            m.push(not(owner(kind, id)));
            output.push(rule(m, Target::Return));
        }
        output.push(rule(vec![owner(kind, id)], Target::Return));
    }
    match &istio.owner_groups {
        OwnerGroups::AllExcept(groups) => {
            for g in groups {
                output.push(rule(vec![owner(Owner::Gid, *g)], Target::Return));
            }
        }
        OwnerGroups::Only(groups) => {
            let none_of = groups.iter().map(|g| not(owner(Owner::Gid, *g))).collect();
            output.push(rule(none_of, Target::Return));
        }
    }
    if x.family_dns {
        output.push(rule(vec![], jump(DNS)));
    }
    output.push(rule(vec![dst(x.loopback)], Target::Return));
    // -x before -q: an excluded CIDR wins over an included port.
    if let Set::List(nets) = &cfg.exclude_outbound_cidrs {
        for n in nets.iter().filter(|n| x.family.contains(n)) {
            output.push(rule(vec![dst(*n)], Target::Return));
        }
    }
    if let Set::List(ports) = &cfg.outbound_ports {
        for c in port_chunks(ports) {
            output.push(rule(vec![TCP, dports(c, false)], jump(REDIRECT)));
        }
    }
    match &cfg.outbound_cidrs {
        Set::All => output.push(rule(vec![], jump(REDIRECT))),
        Set::List(nets) => {
            for n in nets.iter().filter(|n| x.family.contains(n)) {
                output.push(rule(vec![dst(*n)], jump(REDIRECT)));
            }
        }
    }
    output
}

/// The nat table: PREROUTING, OUTPUT, the redirect chains and DNS's.
fn istio_nat(x: &IstioFamily) -> Table {
    let cfg = x.cfg;
    let prerouting = istio_prerouting(x);
    // nat SHUNT_INBOUND: the tunnel port, then -d (only with -b '*'), then the captured ports.
    let mut inbound = vec![rule(vec![TCP, dports(&[x.tunnel], false)], Target::Return)];
    if !x.tproxy {
        inbound.extend(istio_inbound_ports(cfg, &jump(IN_REDIRECT), None));
    }
    let redirect_to = |p: u16| vec![rule(vec![TCP], Target::Redirect { to_port: p })];
    let mut chains = Vec::new();
    // TPROXY mode with no interface rules leaves nat PREROUTING empty, as Istio does.
    if !prerouting.is_empty() {
        chains.push(builtin("PREROUTING", vec![rule(vec![], jump(PREROUTING))]));
    }
    chains.push(builtin("OUTPUT", vec![rule(vec![], jump(OUTPUT))]));
    if !prerouting.is_empty() {
        chains.push(user(PREROUTING, prerouting));
    }
    chains.extend([
        user(INBOUND, inbound),
        user(IN_REDIRECT, redirect_to(cfg.inbound_port)),
        user(OUTPUT, istio_output(x)),
        user(REDIRECT, redirect_to(cfg.proxy_port)),
    ]);
    if x.family_dns {
        let to_dns = Target::Redirect {
            to_port: cfg.dns_port,
        };
        let mut rules = dns_rules(&x.servers, Proto::Tcp, &to_dns);
        rules.extend(dns_rules(&x.servers, Proto::Udp, &to_dns));
        chains.push(user(DNS, rules));
    }
    Table {
        name: TableName::Nat,
        chains,
    }
}

/// The raw table: conntrack zones that keep the proxy's upstream DNS apart from the app's.
fn istio_raw(x: &IstioFamily) -> Option<Table> {
    if !x.dns {
        return None;
    }
    let zone = |z| Target::CtZone { zone: z };
    let mut out = Vec::new();
    for (k, id) in owners(x.cfg) {
        out.push(rule(
            vec![UDP, dports(&[port(53)], false), owner(k, id)],
            zone(ZONE_UPSTREAM),
        ));
        out.push(rule(
            vec![UDP, Match::SourcePort(x.cfg.dns_port), owner(k, id)],
            zone(ZONE_APP),
        ));
    }
    out.extend(dns_rules(&x.servers, Proto::Udp, &zone(ZONE_APP)));
    let replies: Vec<Rule> = match &x.servers {
        None => vec![rule(vec![UDP, Match::SourcePort(53)], zone(ZONE_UPSTREAM))],
        Some(nets) => nets
            .iter()
            .map(|n| {
                let src = Match::Source {
                    net: *n,
                    negate: false,
                };
                rule(vec![UDP, Match::SourcePort(53), src], zone(ZONE_UPSTREAM))
            })
            .collect(),
    };
    let mut chains = Vec::new();
    if x.family_dns {
        chains.push(builtin("PREROUTING", vec![rule(vec![], jump(DNS_REPLY))]));
    }
    chains.push(builtin("OUTPUT", vec![rule(vec![], jump(DNS))]));
    chains.push(user(DNS, out));
    if x.family_dns {
        chains.push(user(DNS_REPLY, replies));
    }
    Some(Table {
        name: TableName::Raw,
        chains,
    })
}

/// The mangle table: --drop-invalid, and TPROXY's inbound capture and marks.
fn istio_mangle(x: &IstioFamily) -> Option<Table> {
    let cfg = x.cfg;
    let mut pre = Vec::new();
    let mut out = Vec::new();
    let mut chains = Vec::new();
    if x.tproxy {
        for name in &cfg.exclude_interfaces {
            pre.push(rule(vec![iface_in(name)], Target::Return));
            out.push(rule(vec![iface_out(name)], Target::Return));
        }
    }
    if cfg.drop_invalid {
        pre.push(rule(vec![Match::CtInvalid], Target::Drop));
    }
    if x.tproxy {
        let mark = cfg.tproxy_mark;
        if !cfg.inbound_ports.is_empty() {
            pre.push(rule(vec![TCP], jump(INBOUND)));
            chains.extend(istio_tproxy_inbound(x));
        }
        pre.push(rule(vec![TCP, Match::Mark(mark)], Target::SaveMark));
        out.push(rule(
            vec![TCP, iface_out("lo"), Match::Mark(mark)],
            Target::Return,
        ));
        for (kind, id) in owners(cfg) {
            out.push(rule(
                vec![not(dst(x.loopback)), TCP, iface_out("lo"), owner(kind, id)],
                Target::SetMark {
                    mark: ISTIO_OUTBOUND_MARK,
                },
            ));
        }
        out.push(rule(vec![TCP, Match::Connmark(mark)], Target::RestoreMark));
    }
    let mut base = Vec::new();
    if !pre.is_empty() {
        base.push(builtin("PREROUTING", vec![rule(vec![], jump(PREROUTING))]));
        chains.insert(0, user(PREROUTING, pre));
    }
    if !out.is_empty() {
        base.push(builtin("OUTPUT", vec![rule(vec![], jump(OUTPUT))]));
        chains.insert(0, user(OUTPUT, out));
    }
    if base.is_empty() {
        return None;
    }
    base.extend(chains);
    Some(Table {
        name: TableName::Mangle,
        chains: base,
    })
}

/// TPROXY's inbound chains: what is spared, then the captured ports, the divert of packets of
/// established connections, and the TPROXY rule itself.
fn istio_tproxy_inbound(x: &IstioFamily) -> Vec<Chain> {
    let mark = x.cfg.tproxy_mark;
    let source = Match::Source {
        net: x.family.inbound_source(),
        negate: false,
    };
    let lo = || iface_in("lo");
    vec![
        // Istio: -i lo -m mark ! --mark 1338 -j RETURN; here the marked packets jump past the
        // RETURN that takes every other packet from lo.
        user(
            INBOUND,
            vec![
                rule(vec![TCP, Match::Mark(mark)], Target::Return),
                rule(vec![TCP, source, lo()], Target::Return),
                rule(
                    vec![TCP, lo(), Match::Mark(ISTIO_OUTBOUND_MARK)],
                    jump(INBOUND_PORTS),
                ),
                rule(vec![TCP, lo()], Target::Return),
                rule(vec![], jump(INBOUND_PORTS)),
            ],
        ),
        user(
            INBOUND_PORTS,
            istio_inbound_ports(x.cfg, &jump(TPROXY), Some(&jump(DIVERT))),
        ),
        user(
            DIVERT,
            vec![
                rule(vec![], Target::SetMark { mark }),
                rule(vec![], Target::Accept),
            ],
        ),
        user(
            TPROXY,
            vec![rule(
                vec![not(dst(x.loopback)), TCP],
                Target::Tproxy {
                    to_port: x.cfg.inbound_port,
                    mark,
                },
            )],
        ),
    ]
}

/// Istio's inbound port rules: with `-b '*'` the `-d` ports return and the rest go to
/// `target`; with a list, each listed port goes there. In tproxy mode `established` (the
/// divert chain) comes first for packets of connections already made.
fn istio_inbound_ports(
    cfg: &CaptureConfig,
    target: &Target,
    established: Option<&Target>,
) -> Vec<Rule> {
    let mut rules = Vec::new();
    let captured: Vec<Vec<Match>> = match &cfg.inbound_ports {
        Set::All => {
            if let Set::List(ex) = &cfg.exclude_inbound_ports {
                for c in port_chunks(ex) {
                    rules.push(rule(vec![TCP, dports(c, false)], Target::Return));
                }
            }
            vec![vec![TCP]]
        }
        Set::List(ports) => port_chunks(ports)
            .into_iter()
            .map(|c| vec![TCP, dports(c, false)])
            .collect(),
    };
    for m in captured {
        if let Some(e) = established {
            let mut est = m.clone();
            est.push(Match::CtEstablished);
            rules.push(rule(est, e.clone()));
        }
        rules.push(rule(m, target.clone()));
    }
    rules
}

/// Builds the plan. `ipv6` is the resolved IPv6 decision (`auto` is settled by the caller,
/// which can look at the target namespace).
pub fn build(cfg: &CaptureConfig, ipv6: bool) -> Plan {
    Plan {
        v4: ruleset(cfg, Family::V4),
        v6: ipv6.then(|| ruleset(cfg, Family::V6)),
        routing: (cfg.mode == Mode::Tproxy).then_some(Routing {
            mark: cfg.tproxy_mark,
            table: cfg.tproxy_route_table,
        }),
        nft_priority_offset: cfg.nft_priority_offset,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_match_serializes_to_json() {
        // `render --json` once panicked on a DNS plan: a tag beside a bare number.
        let cfg = crate::config::RawOptions {
            mode: Some("tproxy".into()),
            redirect_dns: Some("true".into()),
            dns_servers: Some("10.0.0.10".into()),
            drop_invalid: Some("true".into()),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        let json = serde_json::to_string(&build(&cfg, true)).expect("a plan serializes");
        assert!(
            json.contains(r#"{"match":"source_port","port":53}"#),
            "{json}"
        );
        assert!(json.contains(r#"{"match":"mark","mark":1337}"#), "{json}");
        assert!(
            json.contains(r#"{"match":"connmark","mark":1337}"#),
            "{json}"
        );
    }

    #[test]
    fn default_plan_has_nat_chains_and_two_jumps_per_family() {
        let plan = build(&CaptureConfig::default(), true);
        for rs in plan.families() {
            assert_eq!(rs.tables.len(), 1);
            assert_eq!(rs.tables[0].name, TableName::Nat);
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
