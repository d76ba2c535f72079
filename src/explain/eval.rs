//! The evaluator: one packet walked through typed tables, hook by hook, the way netfilter
//! does. Pure: the namespace's addresses and routes come in as a [`Host`] value.
//!
//! A match that cannot be decided (an unknown module, a uid nobody gave) is not guessed: the
//! walk is run once for each way such rules could go, and the verdict is certain only when
//! every way agrees. The first run (every undecidable rule assumed not to match) is the
//! trace shown; the rules are listed as uncertain either way.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::IpNet;
use serde::Serialize;

use super::matches::{parse_rule, AddrType, Cond, ConnmarkOp, CtState, Match, Rule, Target};
use crate::rules::Saved;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Locally generated: OUTPUT, POSTROUTING (and, through `lo`, PREROUTING, INPUT).
    Out,
    /// Arriving from another host: PREROUTING, then INPUT (or FORWARD, POSTROUTING).
    In,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

/// The packet the user asks about: the first packet of a connection unless `ctstate` says
/// otherwise.
#[derive(Debug, Clone)]
pub struct Query {
    pub direction: Direction,
    pub proto: Proto,
    pub dst: SocketAddr,
    pub src: Option<IpAddr>,
    pub sport: Option<u16>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// The output interface (out) or input interface (in), overriding the route.
    pub iface: Option<String>,
    pub mark: u32,
    pub ctmark: u32,
    pub ctstate: CtState,
}

impl Query {
    /// A first packet from `uid:gid` to `dst`, everything else worked out from the host.
    pub fn new(direction: Direction, proto: Proto, dst: SocketAddr) -> Query {
        Query {
            direction,
            proto,
            dst,
            src: None,
            sport: None,
            uid: None,
            gid: None,
            iface: None,
            mark: 0,
            ctmark: 0,
            ctstate: CtState::New,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostAddr {
    pub dev: String,
    pub net: IpNet,
    /// Scope global (IPv6 source selection skips link-local and host addresses).
    pub global: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Route {
    pub dst: IpNet,
    /// `unicast`, `local`, `broadcast`, `anycast`, `multicast`, `blackhole`, ...
    pub kind: String,
    /// From the `local` table (else `main`).
    pub local_table: bool,
    pub dev: Option<String>,
    pub gateway: Option<IpAddr>,
    pub prefsrc: Option<IpAddr>,
}

/// What the evaluator knows about the namespace: its addresses and routes.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Host {
    /// False when nothing was read (then only loopback addresses are known to be local).
    pub known: bool,
    pub addrs: Vec<HostAddr>,
    pub routes: Vec<Route>,
    /// Routes exist in tables other than main and local (policy routing, not modelled).
    pub other_tables: bool,
}

fn is_loopback(ip: IpAddr) -> bool {
    ip.is_loopback()
}

fn loopback_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => Ipv4Addr::LOCALHOST.into(),
        IpAddr::V6(_) => Ipv6Addr::LOCALHOST.into(),
    }
}

impl Host {
    fn lpm(&self, ip: IpAddr, local_table: bool) -> Option<&Route> {
        self.routes
            .iter()
            .filter(|r| r.local_table == local_table && r.dst.contains(&ip))
            .max_by_key(|r| r.dst.prefix_len())
    }

    /// The route type of an address, as the `addrtype` match sees it.
    pub fn addr_type(&self, ip: IpAddr) -> Option<AddrType> {
        if ip.is_multicast() {
            return Some(AddrType::Multicast);
        }
        if ip == IpAddr::V4(Ipv4Addr::BROADCAST) {
            return Some(AddrType::Broadcast);
        }
        if is_loopback(ip) {
            return Some(AddrType::Local);
        }
        if !self.known {
            return None;
        }
        if let Some(r) = self.lpm(ip, true) {
            match r.kind.as_str() {
                "local" => return Some(AddrType::Local),
                "broadcast" => return Some(AddrType::Broadcast),
                "anycast" => return Some(AddrType::Anycast),
                "multicast" => return Some(AddrType::Multicast),
                _ => {}
            }
        }
        if ip.is_ipv4() {
            // IPv4 addrtype consults only the local table.
            return Some(AddrType::Unicast);
        }
        Some(match self.lpm(ip, false).map(|r| r.kind.as_str()) {
            None => AddrType::Unreachable,
            Some("unreachable") => AddrType::Unreachable,
            Some("blackhole") => AddrType::Blackhole,
            Some("prohibit") => AddrType::Prohibit,
            Some("throw") => AddrType::Throw,
            Some(_) => AddrType::Unicast,
        })
    }

    /// Whether the address is one of the namespace's own (`None`: not known).
    pub fn is_local(&self, ip: IpAddr) -> Option<bool> {
        self.addr_type(ip).map(|t| t == AddrType::Local)
    }

    /// The device and source address the kernel would use to send to `dst`.
    pub fn route(&self, dst: IpAddr) -> Option<(String, Option<IpAddr>)> {
        if self.is_local(dst) == Some(true) {
            return Some(("lo".into(), Some(dst)));
        }
        if !self.known {
            return None;
        }
        let r = self.lpm(dst, false)?;
        if matches!(r.kind.as_str(), "unreachable" | "blackhole" | "prohibit") {
            return None;
        }
        let dev = r.dev.clone()?;
        let src = r.prefsrc.or_else(|| self.select_src(&dev, dst, r.gateway));
        Some((dev, src))
    }

    fn select_src(&self, dev: &str, dst: IpAddr, gw: Option<IpAddr>) -> Option<IpAddr> {
        let on_dev = self
            .addrs
            .iter()
            .filter(|a| a.dev == dev && a.net.addr().is_ipv4() == dst.is_ipv4());
        let candidates: Vec<&HostAddr> = on_dev.filter(|a| dst.is_ipv4() || a.global).collect();
        let near = gw.unwrap_or(dst);
        candidates
            .iter()
            .find(|a| a.net.contains(&near))
            .or(candidates.first())
            .map(|a| a.net.addr())
    }

    /// The first address of `dev` in the family of `like` (REDIRECT of incoming packets).
    pub fn primary(&self, dev: &str, like: IpAddr) -> Option<IpAddr> {
        self.addrs
            .iter()
            .find(|a| a.dev == dev && a.net.addr().is_ipv4() == like.is_ipv4())
            .map(|a| a.net.addr())
    }
}

/// A family's rules: table -> chain -> (policy, rules with their saved text). Usually one
/// layer; two when both iptables backends hold rules (the kernel runs both at each hook).
#[derive(Debug, Clone, Default)]
pub struct Tables {
    layers: Vec<Layer>,
    /// Native nftables tables: their base chains run at their own priorities, interleaved
    /// with the iptables tables of every layer.
    nft: Vec<NftTable>,
}

/// One native nftables table (see [`super::nft`]).
#[derive(Debug, Clone, Default)]
pub struct NftTable {
    /// `inet shunt`, `ip6 foo`: family and name, as traces show it.
    pub name: String,
    pub chains: HashMap<String, ChainDef>,
    pub bases: Vec<NftBase>,
}

/// A base chain: where it hooks in.
#[derive(Debug, Clone)]
pub struct NftBase {
    pub chain: String,
    /// The iptables name of the hook (`OUTPUT`).
    pub hook: &'static str,
    pub prio: i32,
    /// `type nat`: runs inside netfilter's NAT step, and only until a binding is made.
    pub nat: bool,
}

#[derive(Debug, Clone, Default)]
struct Layer {
    /// The backend, when there is more than one layer.
    label: Option<String>,
    tables: HashMap<String, HashMap<String, ChainDef>>,
}

/// A chain: its policy (built-in and base chains) and its rules with their text.
#[derive(Debug, Clone, Default)]
pub struct ChainDef {
    pub policy: Option<String>,
    pub rules: Vec<(Rule, String)>,
}

impl Tables {
    pub fn from_saved(saved: &Saved) -> Tables {
        let mut tables: HashMap<String, HashMap<String, ChainDef>> = HashMap::new();
        for t in &saved.tables {
            let chains = tables.entry(t.name.clone()).or_default();
            for (name, policy) in &t.chains {
                chains.entry(name.clone()).or_default().policy =
                    (policy != "-").then(|| policy.clone());
            }
            for r in &t.rules {
                chains
                    .entry(r.chain.clone())
                    .or_default()
                    .rules
                    .push((parse_rule(&r.args), crate::render::join_args(&r.args)));
            }
        }
        Tables {
            layers: vec![Layer {
                label: None,
                tables,
            }],
            nft: Vec::new(),
        }
    }

    /// No iptables rules, only these native nftables tables.
    pub fn from_nft(nft: Vec<NftTable>) -> Tables {
        Tables {
            layers: Vec::new(),
            nft,
        }
    }

    /// These iptables layers and the native nftables tables `nft`.
    pub fn with_nft(mut self, nft: Vec<NftTable>) -> Tables {
        self.nft.extend(nft);
        self
    }

    /// Names the layers (e.g. by backend) in traces.
    pub fn labelled(mut self, label: &str) -> Tables {
        for l in &mut self.layers {
            l.label = Some(label.to_string());
        }
        self
    }

    /// Rules of another backend, run after these at every hook. At each nat hook the first
    /// layer that translates the connection settles it; the next is not consulted.
    pub fn then(mut self, other: Tables) -> Tables {
        self.layers.extend(other.layers);
        self.nft.extend(other.nft);
        self
    }

    /// The same layers in the other order.
    pub fn reversed(&self) -> Tables {
        let mut t = self.clone();
        t.layers.reverse();
        t
    }

    pub fn layers(&self) -> usize {
        self.layers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.layers.iter().all(|l| {
            l.tables
                .values()
                .all(|c| c.values().all(|d| d.rules.is_empty()))
        }) && self
            .nft
            .iter()
            .all(|t| t.chains.values().all(|d| d.rules.is_empty()))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Accept,
    Drop,
    Reject,
    Redirect,
    Tproxy,
    Dnat,
    Unknown,
}

/// One rule on the path (or a chain policy, with no index).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Step {
    pub hook: &'static str,
    pub table: String,
    pub chain: String,
    /// 1-based position in the chain, as `iptables -L --line-numbers` counts; `None` for a
    /// chain's policy.
    pub index: Option<usize>,
    pub rule: String,
    /// The iptables backend, when both hold rules.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Uncertain {
    #[serde(flatten)]
    pub step: Step,
    pub reason: String,
}

/// One way the walk can end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Outcome {
    pub verdict: Verdict,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to_port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to_addr: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The packet as the walk started.
#[derive(Debug, Clone, Serialize)]
pub struct PacketInfo {
    pub direction: Direction,
    pub proto: Proto,
    pub src: Option<String>,
    pub dst: String,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub iif: Option<String>,
    pub oif: Option<String>,
    pub mark: u32,
    pub ctstate: CtState,
}

#[derive(Debug, Clone, Serialize)]
pub struct Explanation {
    pub verdict: Verdict,
    pub to_port: Option<u16>,
    pub to_addr: Option<String>,
    /// Where the packet was addressed before any NAT.
    pub original_dst: String,
    /// Where it is finally delivered or sent (after NAT).
    pub final_dst: String,
    /// `local` (delivered in this namespace), `sent via DEV`, `forwarded via DEV`, or
    /// `unknown`.
    pub delivery: String,
    pub packet: PacketInfo,
    pub trace: Vec<Step>,
    pub uncertain: Vec<Uncertain>,
    /// Every distinct way the walk can end when some rules are uncertain.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub possible: Vec<Outcome>,
    pub notes: Vec<String>,
    /// Where the rules came from (set by the caller that loaded them).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub source: String,
}

#[derive(Debug, Clone)]
struct Pkt {
    proto: Proto,
    src: Option<IpAddr>,
    sport: Option<u16>,
    dst: IpAddr,
    dport: u16,
    /// `Some("")` where the hook has no such device (no input device in OUTPUT).
    iif: Option<String>,
    oif: Option<String>,
    uid: Option<u32>,
    gid: Option<u32>,
    mark: u32,
    ctmark: u32,
    ctstate: CtState,
    /// Conntrack has seen the packet (false in the raw table of the first hook).
    ct_attached: bool,
    untracked: bool,
    dnat: bool,
    snat: bool,
    /// The packet has a local socket (OUTPUT, POSTROUTING of a locally generated packet).
    has_socket: bool,
}

enum Tri {
    Yes,
    No,
    Unknown(String),
}

fn tri(b: bool) -> Tri {
    if b {
        Tri::Yes
    } else {
        Tri::No
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Flow {
    Accept,
    Drop,
    Reject(String),
    Unknown(String),
}

fn iface_match(pattern: &str, dev: &str) -> bool {
    match pattern.strip_suffix('+') {
        Some(prefix) => dev.starts_with(prefix),
        None => pattern == dev,
    }
}

fn in_range<T: PartialOrd>(r: &(T, T), v: T) -> bool {
    r.0 <= v && v <= r.1
}

fn addr_str(ip: IpAddr, port: u16) -> String {
    SocketAddr::new(ip, port).to_string()
}

const MAX_DEPTH: usize = 64;

/// What runs at one place of a hook.
enum Entry {
    /// An iptables table (in every layer).
    Iptables(&'static str),
    /// A native base chain: table index, chain name.
    Nft(usize, String),
    /// Netfilter's NAT step, which runs the nat chains.
    Nat,
}

struct Walk<'a> {
    tables: &'a Tables,
    host: &'a Host,
    pkt: Pkt,
    hook: &'static str,
    choices: &'a [bool],
    taken: Vec<bool>,
    trace: Vec<Step>,
    uncertain: Vec<Uncertain>,
    notes: Vec<String>,
    redirect: Option<u16>,
    tproxy: Option<u16>,
    dnat: Option<String>,
    delivery: String,
    label: Option<String>,
}

impl<'a> Walk<'a> {
    fn decide(&mut self) -> bool {
        let d = self.choices.get(self.taken.len()).copied().unwrap_or(false);
        self.taken.push(d);
        d
    }

    fn cond(&self, m: &Match) -> Tri {
        let p = &self.pkt;
        let neg = m.negate;
        let yes = |b: bool| tri(b != neg);
        match &m.cond {
            Cond::Proto(name) => yes(match name.as_str() {
                "all" | "0" => true,
                "tcp" | "6" => p.proto == Proto::Tcp,
                "udp" | "17" => p.proto == Proto::Udp,
                _ => false,
            }),
            Cond::Src(nets) | Cond::Dst(nets) => {
                let ip = match &m.cond {
                    Cond::Src(_) => p.src,
                    _ => Some(p.dst),
                };
                match ip {
                    Some(ip) => yes(nets.iter().any(|n| n.contains(&ip))),
                    None if nets.iter().any(|n| n.prefix_len() == 0) => yes(true),
                    None => Tri::Unknown("the source address is not known (pass --src)".into()),
                }
            }
            Cond::SrcRange(a, b) | Cond::DstRange(a, b) => {
                let ip = match &m.cond {
                    Cond::SrcRange(..) => p.src,
                    _ => Some(p.dst),
                };
                match ip {
                    Some(ip) => yes(*a <= ip && ip <= *b),
                    None => Tri::Unknown("the source address is not known (pass --src)".into()),
                }
            }
            Cond::InIface(pat) | Cond::OutIface(pat) => {
                let (dev, what) = match &m.cond {
                    Cond::InIface(_) => (&p.iif, "input"),
                    _ => (&p.oif, "output"),
                };
                match dev {
                    Some(d) => yes(iface_match(pat, d)),
                    None => Tri::Unknown(format!(
                        "the {what} interface is not known (pass --iface, or --netns to read routes)"
                    )),
                }
            }
            Cond::Fragment => yes(false),
            Cond::Dport(list) => yes(list.iter().any(|r| in_range(r, p.dport))),
            Cond::Sport(list) => match p.sport {
                Some(s) => yes(list.iter().any(|r| in_range(r, s))),
                None if list.contains(&(0, u16::MAX)) => yes(true),
                None => Tri::Unknown("the source port is not known (pass --src ADDR:PORT)".into()),
            },
            Cond::AnyPort(list) => {
                if list.iter().any(|r| in_range(r, p.dport)) {
                    yes(true)
                } else {
                    match p.sport {
                        Some(s) => yes(list.iter().any(|r| in_range(r, s))),
                        None => Tri::Unknown(
                            "the source port is not known (pass --src ADDR:PORT)".into(),
                        ),
                    }
                }
            }
            Cond::TcpFlags { mask, comp } => {
                if p.proto != Proto::Tcp {
                    yes(false)
                } else if p.ctstate == CtState::New {
                    // The first packet of a TCP connection is a bare SYN.
                    yes(0x02 & mask == *comp)
                } else {
                    Tri::Unknown("the TCP flags of a non-first packet are not known".into())
                }
            }
            Cond::Uid(_) | Cond::Gid { .. } | Cond::SocketExists if !p.has_socket => {
                // xt_owner without a socket: matches only when every owner option is negated.
                tri(neg)
            }
            Cond::SocketExists => yes(true),
            Cond::Uid(r) => match p.uid {
                Some(u) => yes(in_range(r, u)),
                None => Tri::Unknown("the sending uid is not known (pass --uid)".into()),
            },
            Cond::Gid { ids, suppl } => match p.gid {
                Some(g) if in_range(ids, g) => yes(true),
                Some(_) if *suppl => {
                    Tri::Unknown("the sender's supplementary groups are not known".into())
                }
                Some(_) => yes(false),
                None => Tri::Unknown("the sending gid is not known (pass --gid)".into()),
            },
            Cond::Mark { value, mask } => yes(p.mark & mask == *value),
            Cond::ConnMark { value, mask } => {
                if !p.ct_attached || p.untracked {
                    // No conntrack entry: connmark never matches, negated or not.
                    Tri::No
                } else {
                    yes(p.ctmark & mask == *value)
                }
            }
            Cond::CtState(states) => {
                let state = if p.untracked {
                    CtState::Untracked
                } else if !p.ct_attached {
                    CtState::Invalid
                } else {
                    p.ctstate
                };
                let hit = states.contains(&state)
                    || (p.dnat && states.contains(&CtState::Dnat))
                    || (p.snat && states.contains(&CtState::Snat));
                yes(hit)
            }
            Cond::SrcType {
                types,
                limit_in,
                limit_out,
            }
            | Cond::DstType {
                types,
                limit_in,
                limit_out,
            } => {
                if *limit_in || *limit_out {
                    return Tri::Unknown("addrtype --limit-iface-in/out is not modelled".into());
                }
                let ip = match &m.cond {
                    Cond::SrcType { .. } => p.src,
                    _ => Some(p.dst),
                };
                let Some(ip) = ip else {
                    return Tri::Unknown("the source address is not known (pass --src)".into());
                };
                match self.host.addr_type(ip) {
                    Some(t) => yes(types.contains(&t)),
                    None => Tri::Unknown(format!(
                        "the address type of {ip} is not known without the namespace (--netns)"
                    )),
                }
            }
            Cond::Comment(_) => Tri::Yes,
            Cond::Ipv4(v4) => yes(p.dst.is_ipv4() == *v4),
            Cond::SkUid(_) | Cond::SkGid(_) if !p.has_socket => Tri::No,
            Cond::SkUid(list) => match p.uid {
                Some(u) => yes(list.iter().any(|r| in_range(r, u))),
                None => Tri::Unknown("the sending uid is not known (pass --uid)".into()),
            },
            Cond::SkGid(list) => match p.gid {
                Some(g) => yes(list.iter().any(|r| in_range(r, g))),
                None => Tri::Unknown("the sending gid is not known (pass --gid)".into()),
            },
            Cond::Unsupported(what) => Tri::Unknown(format!("cannot evaluate `{what}`")),
        }
    }

    fn rule_matches(&self, rule: &Rule) -> Tri {
        let mut unknown: Vec<String> = Vec::new();
        for m in &rule.matches {
            match self.cond(m) {
                Tri::No => return Tri::No,
                Tri::Unknown(why) => unknown.push(why),
                Tri::Yes => {}
            }
        }
        if unknown.is_empty() {
            Tri::Yes
        } else {
            Tri::Unknown(unknown.join("; "))
        }
    }

    fn step(&self, table: &str, chain: &str, index: Option<usize>, rule: String) -> Step {
        Step {
            hook: self.hook,
            table: table.into(),
            chain: chain.into(),
            index,
            rule,
            backend: self.label.clone(),
        }
    }

    /// Runs one table's built-in chain for the current hook, in one layer.
    fn table(&mut self, layer: usize, table: &str) -> Flow {
        let tables = self.tables;
        let Some(chains) = tables.layers[layer].tables.get(table) else {
            return Flow::Accept;
        };
        self.label = tables.layers[layer].label.clone();
        self.chains(table, chains, self.hook)
    }

    /// Runs one base chain of a native nftables table.
    fn nft_chain(&mut self, t: usize, chain: &str) -> Flow {
        let table = &self.tables.nft[t];
        self.label = Some("nftables".into());
        self.chains(&table.name, &table.chains, chain)
    }

    /// Walks from the chain `builtin` of `chains` until a verdict or its policy.
    fn chains(&mut self, table: &str, chains: &HashMap<String, ChainDef>, builtin: &str) -> Flow {
        let mut stack: Vec<(String, usize)> = Vec::new();
        let (mut cur, mut i) = (builtin.to_string(), 0usize);
        loop {
            let rules = chains.get(&cur).map(|c| &c.rules[..]).unwrap_or(&[]);
            if i >= rules.len() {
                match stack.pop() {
                    Some((c, next)) => {
                        cur = c;
                        i = next;
                        continue;
                    }
                    None => return self.policy(table, chains, builtin),
                }
            }
            let (rule, text) = &rules[i];
            i += 1;
            let matched = match self.rule_matches(rule) {
                Tri::Yes => true,
                Tri::No => false,
                Tri::Unknown(reason) => {
                    let step = self.step(table, &cur, Some(i), text.clone());
                    self.uncertain.push(Uncertain { step, reason });
                    self.decide()
                }
            };
            if !matched {
                continue;
            }
            let step = self.step(table, &cur, Some(i), text.clone());
            self.trace.push(step);
            match &rule.target {
                Target::None | Target::Continue(_) => {}
                Target::Accept => return Flow::Accept,
                Target::Drop => return Flow::Drop,
                Target::Reject(with) => return Flow::Reject(with.clone()),
                Target::Return => match stack.pop() {
                    Some((c, next)) => {
                        cur = c;
                        i = next;
                    }
                    None => return self.policy(table, chains, builtin),
                },
                Target::Jump(c) | Target::Goto(c) => {
                    if !chains.contains_key(c) {
                        return Flow::Unknown(format!(
                            "target {c} is neither a chain of table {table} nor a target shunt knows"
                        ));
                    }
                    if stack.len() >= MAX_DEPTH {
                        return Flow::Unknown("jumps nest deeper than 64 chains (a loop?)".into());
                    }
                    if matches!(rule.target, Target::Jump(_)) {
                        stack.push((cur.clone(), i));
                    }
                    cur = c.clone();
                    i = 0;
                }
                Target::Mark(op) => self.pkt.mark = op.apply(self.pkt.mark),
                Target::Connmark(op) => {
                    if self.pkt.ct_attached && !self.pkt.untracked {
                        match op {
                            ConnmarkOp::Set(op) => self.pkt.ctmark = op.apply(self.pkt.ctmark),
                            ConnmarkOp::Save { nfmask, ctmask } => {
                                self.pkt.ctmark =
                                    (self.pkt.ctmark & !ctmask) ^ (self.pkt.mark & nfmask)
                            }
                            ConnmarkOp::Restore { nfmask, ctmask } => {
                                self.pkt.mark =
                                    (self.pkt.mark & !nfmask) ^ (self.pkt.ctmark & ctmask)
                            }
                        }
                    }
                }
                Target::Notrack => self.pkt.untracked = true,
                Target::Redirect { port } => {
                    let port = port.unwrap_or(self.pkt.dport);
                    self.pkt.dst = match (self.pkt.has_socket, &self.pkt.iif) {
                        (true, _) => loopback_of(self.pkt.dst),
                        (false, Some(dev)) => {
                            self.host.primary(dev, self.pkt.dst).unwrap_or(self.pkt.dst)
                        }
                        (false, None) => self.pkt.dst,
                    };
                    self.pkt.dport = port;
                    self.pkt.dnat = true;
                    self.redirect = Some(port);
                    return Flow::Accept;
                }
                Target::Dnat { addr, port, .. } => {
                    self.pkt.dst = addr.unwrap_or(self.pkt.dst);
                    self.pkt.dport = port.unwrap_or(self.pkt.dport);
                    self.pkt.dnat = true;
                    self.dnat = Some(addr_str(self.pkt.dst, self.pkt.dport));
                    return Flow::Accept;
                }
                Target::Snat { spec } => {
                    self.pkt.snat = true;
                    self.notes.push(format!("source NAT to {spec}"));
                    return Flow::Accept;
                }
                Target::Masquerade => {
                    self.pkt.snat = true;
                    self.notes
                        .push("source NAT to the output interface's address".into());
                    return Flow::Accept;
                }
                Target::Tproxy { port, mark, .. } => {
                    if let Some(op) = mark {
                        self.pkt.mark = op.apply(self.pkt.mark);
                    }
                    self.tproxy = Some(port.unwrap_or(self.pkt.dport));
                    return Flow::Accept;
                }
                Target::Unknown(what) => {
                    return Flow::Unknown(format!("cannot evaluate the target of `{what}`"))
                }
            }
        }
    }

    fn policy(&mut self, table: &str, chains: &HashMap<String, ChainDef>, chain: &str) -> Flow {
        let policy = chains
            .get(chain)
            .and_then(|c| c.policy.clone())
            .unwrap_or_else(|| "ACCEPT".into());
        if policy != "ACCEPT" {
            let step = self.step(table, chain, None, format!("policy {policy}"));
            self.trace.push(step);
        }
        match policy.as_str() {
            "ACCEPT" => Flow::Accept,
            "DROP" => Flow::Drop,
            other => Flow::Unknown(format!("unknown policy {other}")),
        }
    }

    /// Runs the iptables tables `tables` of one hook and the native base chains on it, in
    /// priority order; stops at the first non-accept. NAT chains (iptables' nat table and
    /// nft `type nat` chains alike) run inside netfilter's one NAT step (priority -100 for
    /// destination NAT, 100 for source NAT), among themselves in priority order, and only
    /// until one binds the connection: the first binding wins. `tables` leaves out nat
    /// where the connection's NAT is already settled, and then no nat chain runs.
    fn hook(&mut self, hook: &'static str, tables: &[&'static str]) -> Flow {
        self.hook = hook;
        let dst_hook = matches!(hook, "PREROUTING" | "OUTPUT");
        let nat_prio = if dst_hook { -100 } else { 100 };
        let mut plain: Vec<(i32, Entry)> = Vec::new();
        let mut nat: Vec<(i32, Entry)> = Vec::new();
        for &t in tables {
            let prio = match t {
                "raw" => -300,
                "mangle" => -150,
                "nat" => nat_prio,
                _ => 0,
            };
            let list = if t == "nat" { &mut nat } else { &mut plain };
            list.push((prio, Entry::Iptables(t)));
        }
        for (i, table) in self.tables.nft.iter().enumerate() {
            for b in table.bases.iter().filter(|b| b.hook == hook) {
                let e = (b.prio, Entry::Nft(i, b.chain.clone()));
                match b.nat {
                    true if tables.contains(&"nat") => nat.push(e),
                    true => {}
                    false => plain.push(e),
                }
            }
        }
        // Equal priorities keep the order of registration, which userspace cannot see:
        // iptables' tables first here, and said so.
        nat.sort_by_key(|e| e.0);
        for list in [&plain, &nat] {
            self.note_ties(list);
        }
        if !nat.is_empty() {
            plain.push((nat_prio, Entry::Nat));
        }
        plain.sort_by_key(|e| e.0);
        for (prio, entry) in plain {
            // Conntrack attaches at -200 on the first hook (after raw).
            if dst_hook && prio > -200 {
                self.pkt.ct_attached = true;
            }
            let flow = match entry {
                Entry::Iptables(t) => self.iptables_table(t),
                Entry::Nft(i, chain) => self.nft_chain(i, &chain),
                Entry::Nat => self.nat(&nat),
            };
            if flow != Flow::Accept {
                return flow;
            }
        }
        if dst_hook {
            self.pkt.ct_attached = true;
        }
        Flow::Accept
    }

    /// Notes entries of one hook that share a priority and both have rules there.
    fn note_ties(&mut self, list: &[(i32, Entry)]) {
        let name = |e: &Entry| -> Option<String> {
            match e {
                Entry::Iptables(t) => self
                    .tables
                    .layers
                    .iter()
                    .any(|l| {
                        l.tables
                            .get(*t)
                            .and_then(|c| c.get(self.hook))
                            .is_some_and(|c| {
                                !c.rules.is_empty()
                                    || c.policy.as_deref().is_some_and(|p| p != "ACCEPT")
                            })
                    })
                    .then(|| format!("iptables {t}")),
                Entry::Nft(i, chain) => Some(format!("{} {chain}", self.tables.nft[*i].name)),
                Entry::Nat => None,
            }
        };
        for (i, (p, a)) in list.iter().enumerate() {
            for (q, b) in &list[i + 1..] {
                if p != q || matches!((a, b), (Entry::Iptables(_), Entry::Iptables(_))) {
                    continue;
                }
                if let (Some(x), Some(y)) = (name(a), name(b)) {
                    let note = format!(
                        "{}: {x} and {y} share priority {p}; the kernel runs them in the order \
                         they were registered, which cannot be read back (shown: {x} first)",
                        self.hook
                    );
                    if !self.notes.contains(&note) {
                        self.notes.push(note);
                    }
                }
            }
        }
    }

    /// One iptables table in every layer (both backends, when both hold rules).
    fn iptables_table(&mut self, t: &str) -> Flow {
        for layer in 0..self.tables.layers.len() {
            let flow = self.table(layer, t);
            if flow != Flow::Accept {
                return flow;
            }
        }
        Flow::Accept
    }

    /// Netfilter's NAT step: the nat chains in order until one binds the connection.
    fn nat(&mut self, chains: &[(i32, Entry)]) -> Flow {
        let hook = self.hook;
        if self.pkt.untracked {
            self.notes
                .push(format!("{hook}: nat skipped, the packet is not tracked"));
            return Flow::Accept;
        }
        if self.pkt.ctstate != CtState::New {
            self.notes.push(format!(
                "{hook}: nat skipped, only the first packet of a connection (NEW) sees it"
            ));
            return Flow::Accept;
        }
        let before = (self.pkt.dst, self.pkt.dport);
        let bound = |w: &Walk| (w.redirect, w.dnat.clone(), w.pkt.snat);
        let nat_before = bound(self);
        'chains: for (_, entry) in chains {
            let layers = match entry {
                Entry::Iptables(_) => self.tables.layers.len(),
                _ => 1,
            };
            for layer in 0..layers {
                let flow = match entry {
                    Entry::Iptables(t) => self.table(layer, t),
                    Entry::Nft(i, chain) => self.nft_chain(*i, chain),
                    Entry::Nat => Flow::Accept,
                };
                if flow != Flow::Accept {
                    return flow;
                }
                if bound(self) != nat_before {
                    break 'chains; // the connection is translated: later nat chains are not consulted
                }
            }
        }
        if (self.pkt.dst, self.pkt.dport) != before && hook == "OUTPUT" {
            self.reroute();
        }
        Flow::Accept
    }

    /// After OUTPUT nat changed the destination the kernel routes the packet again.
    fn reroute(&mut self) {
        self.pkt.oif = if is_loopback(self.pkt.dst) {
            Some("lo".into())
        } else {
            self.host.route(self.pkt.dst).map(|(dev, _)| dev)
        };
    }

    fn run(&mut self, direction: Direction) -> Flow {
        match direction {
            Direction::Out => {
                let f = self.hook("OUTPUT", &["raw", "mangle", "nat", "filter"]);
                if f != Flow::Accept {
                    return f;
                }
                let f = self.hook("POSTROUTING", &["mangle", "nat"]);
                if f != Flow::Accept {
                    return f;
                }
                self.delivery = match self.pkt.oif.as_deref() {
                    Some("lo") => "local".into(),
                    Some(dev) => format!("sent via {dev}"),
                    None => "unknown".into(),
                };
                if self.pkt.oif.as_deref() == Some("lo") {
                    // Looped back: the same packet comes in on lo. nat was settled for this
                    // connection on the way out, so PREROUTING/INPUT nat do not see it.
                    self.pkt.iif = Some("lo".into());
                    self.pkt.oif = Some(String::new());
                    self.pkt.has_socket = false;
                    let f = self.hook("PREROUTING", &["raw", "mangle"]);
                    if f != Flow::Accept {
                        return f;
                    }
                    return self.hook("INPUT", &["mangle", "filter"]);
                }
                Flow::Accept
            }
            Direction::In => {
                self.pkt.ct_attached = false;
                let f = self.hook("PREROUTING", &["raw", "mangle", "nat"]);
                if f != Flow::Accept {
                    return f;
                }
                let local = self.tproxy.is_some()
                    || self.redirect.is_some()
                    || self.host.is_local(self.pkt.dst) != Some(false);
                if local {
                    self.delivery = "local".into();
                    self.pkt.oif = Some(String::new());
                    return self.hook("INPUT", &["mangle", "filter", "nat"]);
                }
                self.pkt.oif = self.host.route(self.pkt.dst).map(|(d, _)| d);
                self.delivery = match &self.pkt.oif {
                    Some(dev) => format!("forwarded via {dev}"),
                    None => "forwarded".into(),
                };
                let f = self.hook("FORWARD", &["mangle", "filter"]);
                if f != Flow::Accept {
                    return f;
                }
                self.hook("POSTROUTING", &["mangle", "nat"])
            }
        }
    }

    fn outcome(&self, flow: &Flow) -> Outcome {
        let (verdict, reason) = match flow {
            Flow::Drop => (Verdict::Drop, None),
            Flow::Reject(with) => (Verdict::Reject, Some(with.clone())),
            Flow::Unknown(why) => (Verdict::Unknown, Some(why.clone())),
            Flow::Accept if self.tproxy.is_some() => (Verdict::Tproxy, None),
            Flow::Accept if self.redirect.is_some() => (Verdict::Redirect, None),
            Flow::Accept if self.dnat.is_some() => (Verdict::Dnat, None),
            Flow::Accept => (Verdict::Accept, None),
        };
        Outcome {
            verdict,
            to_port: match verdict {
                Verdict::Redirect => self.redirect,
                Verdict::Tproxy => self.tproxy,
                _ => None,
            },
            to_addr: (verdict == Verdict::Dnat)
                .then(|| self.dnat.clone())
                .flatten(),
            reason,
        }
    }
}

/// At most this many walks per packet (each undecidable rule may double them).
const MAX_WALKS: usize = 64;

/// The starting packet: interfaces and source worked out as the kernel would.
fn prepare(host: &Host, q: &Query) -> (Pkt, Vec<String>) {
    let mut notes = Vec::new();
    let dst = q.dst.ip();
    let (iif, oif, src, has_socket) = match q.direction {
        Direction::Out => {
            let route = if is_loopback(dst) {
                Some(("lo".to_string(), Some(dst)))
            } else {
                host.route(dst)
            };
            if route.is_none() && q.iface.is_none() {
                notes.push(if host.known {
                    format!(
                        "the namespace has no route to {dst}: a connect() fails (network \
                         unreachable) before any rule sees a packet"
                    )
                } else {
                    format!(
                        "no route to {dst} is known: the output interface is unknown (pass \
                         --iface or --netns)"
                    )
                });
            }
            let oif = q
                .iface
                .clone()
                .or_else(|| route.as_ref().map(|r| r.0.clone()));
            let src = q.src.or_else(|| route.and_then(|r| r.1));
            (Some(String::new()), oif, src, true)
        }
        Direction::In => {
            let iif = q.iface.clone().or_else(|| {
                q.src
                    .and_then(|s| host.route(s))
                    .map(|(dev, _)| if dev == "lo" { "lo".into() } else { dev })
            });
            (iif, Some(String::new()), q.src, false)
        }
    };
    let pkt = Pkt {
        proto: q.proto,
        src,
        sport: q.sport,
        dst,
        dport: q.dst.port(),
        iif,
        oif,
        uid: q.uid,
        gid: q.gid,
        mark: q.mark,
        ctmark: q.ctmark,
        ctstate: q.ctstate,
        ct_attached: q.direction == Direction::In,
        untracked: false,
        dnat: false,
        snat: false,
        has_socket,
    };
    (pkt, notes)
}

struct Run {
    outcome: Outcome,
    taken: Vec<bool>,
    trace: Vec<Step>,
    uncertain: Vec<Uncertain>,
    notes: Vec<String>,
    pkt: Pkt,
    delivery: String,
}

fn walk(tables: &Tables, host: &Host, q: &Query, start: &Pkt, choices: &[bool]) -> Run {
    let mut w = Walk {
        tables,
        host,
        pkt: start.clone(),
        hook: "OUTPUT",
        choices,
        taken: Vec::new(),
        trace: Vec::new(),
        uncertain: Vec::new(),
        notes: Vec::new(),
        redirect: None,
        tproxy: None,
        dnat: None,
        delivery: "unknown".into(),
        label: None,
    };
    // Conntrack runs after raw: the out path's first hook starts without it.
    w.pkt.ct_attached = false;
    let flow = w.run(q.direction);
    Run {
        outcome: w.outcome(&flow),
        taken: w.taken,
        trace: w.trace,
        uncertain: w.uncertain,
        notes: w.notes,
        pkt: w.pkt,
        delivery: w.delivery,
    }
}

/// Walks the packet through `tables` and explains where it goes.
pub fn explain(tables: &Tables, host: &Host, q: &Query) -> Explanation {
    let (start, mut notes) = prepare(host, q);
    if host.other_tables {
        notes.push(
            "the namespace has routes in other tables (policy routing): interfaces come from \
             the main table only"
                .into(),
        );
    }
    let first = walk(tables, host, q, &start, &[]);
    let mut outcomes = vec![first.outcome.clone()];
    let mut queue: Vec<Vec<bool>> = (0..first.taken.len())
        .map(|i| [&first.taken[..i], &[true]].concat())
        .collect();
    let mut walks = 1;
    let mut exhausted = false;
    let mut uncertain = first.uncertain.clone();
    while let Some(prefix) = queue.pop() {
        if walks >= MAX_WALKS {
            exhausted = true;
            break;
        }
        walks += 1;
        let r = walk(tables, host, q, &start, &prefix);
        for i in prefix.len()..r.taken.len() {
            queue.push([&r.taken[..i], &[true]].concat());
        }
        for u in r.uncertain {
            if !uncertain.contains(&u) {
                uncertain.push(u);
            }
        }
        if !outcomes.contains(&r.outcome) {
            outcomes.push(r.outcome);
        }
    }
    let certain = outcomes.len() == 1 && !exhausted;
    let (verdict, to_port, to_addr) = if certain {
        (
            first.outcome.verdict,
            first.outcome.to_port,
            first.outcome.to_addr.clone(),
        )
    } else {
        (Verdict::Unknown, None, None)
    };
    if exhausted {
        notes.push(format!(
            "more than {MAX_WALKS} combinations of uncertain rules; not all were explored"
        ));
    }
    if let Some(reason) = first.outcome.reason.as_ref().filter(|_| certain) {
        if verdict == Verdict::Unknown {
            notes.push(reason.clone());
        }
    }
    notes.extend(first.notes);
    uncertain.dedup();
    Explanation {
        verdict,
        to_port,
        to_addr,
        original_dst: q.dst.to_string(),
        final_dst: addr_str(first.pkt.dst, first.pkt.dport),
        delivery: first.delivery.clone(),
        packet: PacketInfo {
            direction: q.direction,
            proto: q.proto,
            src: start.src.map(|s| match start.sport {
                Some(p) => addr_str(s, p),
                None => s.to_string(),
            }),
            dst: q.dst.to_string(),
            uid: q.uid,
            gid: q.gid,
            iif: start.iif.clone().filter(|s| !s.is_empty()),
            oif: start.oif.clone().filter(|s| !s.is_empty()),
            mark: q.mark,
            ctstate: q.ctstate,
        },
        trace: first.trace,
        uncertain,
        possible: if certain { Vec::new() } else { outcomes },
        notes,
        source: String::new(),
    }
}
