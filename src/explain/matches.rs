//! One `iptables-save` rule (its arguments after `-A CHAIN`) as typed matches and a target.
//!
//! The parser is total: an option it does not know becomes [`Cond::Unsupported`] (which the
//! evaluator reports as uncertain), never an error and never a silent "matches".

use std::net::IpAddr;

use ipnet::IpNet;

/// A port or id range, inclusive.
pub type Range<T> = (T, T);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum CtState {
    New,
    Established,
    Related,
    Invalid,
    Untracked,
    Snat,
    Dnat,
}

impl CtState {
    pub fn parse(s: &str) -> Option<CtState> {
        Some(match s.to_ascii_uppercase().as_str() {
            "NEW" => CtState::New,
            "ESTABLISHED" => CtState::Established,
            "RELATED" => CtState::Related,
            "INVALID" => CtState::Invalid,
            "UNTRACKED" => CtState::Untracked,
            "SNAT" => CtState::Snat,
            "DNAT" => CtState::Dnat,
            _ => return None,
        })
    }
}

/// Route types the `addrtype` match knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AddrType {
    Unspec,
    Unicast,
    Local,
    Broadcast,
    Anycast,
    Multicast,
    Blackhole,
    Unreachable,
    Prohibit,
    Throw,
    Nat,
    Xresolve,
}

impl AddrType {
    pub fn parse(s: &str) -> Option<AddrType> {
        Some(match s.to_ascii_uppercase().as_str() {
            "UNSPEC" => AddrType::Unspec,
            "UNICAST" => AddrType::Unicast,
            "LOCAL" => AddrType::Local,
            "BROADCAST" => AddrType::Broadcast,
            "ANYCAST" => AddrType::Anycast,
            "MULTICAST" => AddrType::Multicast,
            "BLACKHOLE" => AddrType::Blackhole,
            "UNREACHABLE" => AddrType::Unreachable,
            "PROHIBIT" => AddrType::Prohibit,
            "THROW" => AddrType::Throw,
            "NAT" => AddrType::Nat,
            "XRESOLVE" => AddrType::Xresolve,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cond {
    /// `-p`: a protocol name or number (`all` is the same as no `-p`).
    Proto(String),
    /// `-s`: any of these networks.
    Src(Vec<IpNet>),
    Dst(Vec<IpNet>),
    /// `-m iprange --src-range` / `--dst-range`.
    SrcRange(IpAddr, IpAddr),
    DstRange(IpAddr, IpAddr),
    /// `-i`, with iptables' `+` wildcard suffix.
    InIface(String),
    OutIface(String),
    /// `-f`: a non-first fragment.
    Fragment,
    Dport(Vec<Range<u16>>),
    Sport(Vec<Range<u16>>),
    /// `-m multiport --ports`: source or destination port.
    AnyPort(Vec<Range<u16>>),
    /// `--tcp-flags MASK COMP` (`--syn` is `SYN,RST,ACK,FIN SYN`).
    TcpFlags {
        mask: u8,
        comp: u8,
    },
    Uid(Range<u32>),
    /// `--gid-owner`; `suppl` with `--suppl-groups`.
    Gid {
        ids: Range<u32>,
        suppl: bool,
    },
    SocketExists,
    Mark {
        value: u32,
        mask: u32,
    },
    ConnMark {
        value: u32,
        mask: u32,
    },
    /// `-m conntrack --ctstate` or `-m state --state`.
    CtState(Vec<CtState>),
    SrcType {
        types: Vec<AddrType>,
        limit_in: bool,
        limit_out: bool,
    },
    DstType {
        types: Vec<AddrType>,
        limit_in: bool,
        limit_out: bool,
    },
    Comment(String),
    /// nft's `meta nfproto ipv4|ipv6` (and the family an `ip`/`ip6` payload match implies):
    /// true for IPv4.
    Ipv4(bool),
    /// nft's `meta skuid` / `meta skgid` over a set of ranges. Unlike xt_owner, a packet
    /// without a socket matches neither form, negated or not (the expression breaks).
    SkUid(Vec<Range<u32>>),
    SkGid(Vec<Range<u32>>),
    /// A match the evaluator cannot decide, with what it was.
    Unsupported(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Match {
    pub cond: Cond,
    pub negate: bool,
}

/// How MARK and CONNMARK change a mark: `new = (old & !clear) ^ xor`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MarkOp {
    pub clear: u32,
    pub xor: u32,
}

impl MarkOp {
    pub fn apply(self, old: u32) -> u32 {
        (old & !self.clear) ^ self.xor
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnmarkOp {
    /// ctmark = (ctmark & !clear) ^ xor.
    Set(MarkOp),
    /// ctmark = (ctmark & !ctmask) ^ (mark & nfmask).
    Save { nfmask: u32, ctmask: u32 },
    /// mark = (mark & !nfmask) ^ (ctmark & ctmask).
    Restore { nfmask: u32, ctmask: u32 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// No `-j`: a counting rule.
    None,
    Accept,
    Drop,
    Reject(String),
    Return,
    /// `-j NAME` that is not a known target: a user chain (or an unknown extension).
    Jump(String),
    Goto(String),
    Redirect {
        port: Option<u16>,
    },
    Dnat {
        addr: Option<IpAddr>,
        port: Option<u16>,
        spec: String,
    },
    Snat {
        spec: String,
    },
    Masquerade,
    Tproxy {
        port: Option<u16>,
        addr: Option<IpAddr>,
        mark: Option<MarkOp>,
    },
    Mark(MarkOp),
    Connmark(ConnmarkOp),
    /// `-j CT --notrack` or `-j NOTRACK`: the packet is not tracked, so nat never sees it.
    Notrack,
    /// Non-terminating targets that change nothing the evaluator looks at (LOG, NFLOG, CT ...).
    Continue(String),
    /// Targets whose effect cannot be evaluated (QUEUE, NFQUEUE, a malformed option ...).
    Unknown(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub matches: Vec<Match>,
    pub target: Target,
}

/// Targets that never end the walk and never change what a later match sees.
const PASSIVE_TARGETS: &[&str] = &[
    "LOG",
    "NFLOG",
    "ULOG",
    "TRACE",
    "AUDIT",
    "CLASSIFY",
    "DSCP",
    "TOS",
    "TTL",
    "HL",
    "TCPMSS",
    "CHECKSUM",
    "SECMARK",
    "CONNSECMARK",
    "IDLETIMER",
    "LED",
    "TEE",
    "RATEEST",
    "SET",
    "TCPOPTSTRIP",
    "ECN",
];

/// Targets that end the walk with an effect shunt does not model.
const OPAQUE_TARGETS: &[&str] = &[
    "QUEUE",
    "NFQUEUE",
    "NETMAP",
    "SYNPROXY",
    "HMARK",
    "CLUSTERIP",
    "NPT",
    "SNPT",
    "DNPT",
];

pub fn parse_u32(s: &str) -> Option<u32> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

/// `VALUE[/MASK]` (mask defaults to all ones).
fn value_mask(s: &str) -> Option<(u32, u32)> {
    match s.split_once('/') {
        Some((v, m)) => Some((parse_u32(v)?, parse_u32(m)?)),
        None => Some((parse_u32(s)?, u32::MAX)),
    }
}

fn port(s: &str) -> Option<u16> {
    s.parse().ok().or_else(|| well_known_port(s))
}

fn well_known_port(s: &str) -> Option<u16> {
    Some(match s {
        "ssh" => 22,
        "domain" => 53,
        "http" => 80,
        "https" => 443,
        _ => return None,
    })
}

/// `80`, `8000:8100` (also `8000-8100` as written for REDIRECT), `:1024`, `1024:`.
pub fn port_range(s: &str) -> Option<Range<u16>> {
    let sep = s.find([':', '-']);
    match sep {
        None => port(s).map(|p| (p, p)),
        Some(i) => {
            let (a, b) = (&s[..i], &s[i + 1..]);
            let a = if a.is_empty() { 0 } else { port(a)? };
            let b = if b.is_empty() { u16::MAX } else { port(b)? };
            (a <= b).then_some((a, b))
        }
    }
}

fn port_list(s: &str) -> Option<Vec<Range<u16>>> {
    s.split(',').map(port_range).collect()
}

/// A uid or gid: a number, a range `A-B`, or a name looked up in the user/group database.
fn id_range(s: &str, group: bool) -> Result<Range<u32>, String> {
    if let Some((a, b)) = s.split_once('-') {
        if let (Ok(a), Ok(b)) = (a.parse(), b.parse()) {
            return Ok((a, b));
        }
    }
    if let Ok(n) = s.parse::<u32>() {
        return Ok((n, n));
    }
    let found = if group {
        nix::unistd::Group::from_name(s)
            .ok()
            .flatten()
            .map(|g| g.gid.as_raw())
    } else {
        nix::unistd::User::from_name(s)
            .ok()
            .flatten()
            .map(|u| u.uid.as_raw())
    };
    found
        .map(|n| (n, n))
        .ok_or_else(|| format!("unknown {} {s:?}", if group { "group" } else { "user" }))
}

/// `-s`/`-d` value: a comma-separated list of addresses or networks.
fn nets(s: &str) -> Option<Vec<IpNet>> {
    s.split(',')
        .map(|part| {
            part.parse::<IpNet>().ok().or_else(|| {
                if let Some((a, m)) = part.split_once('/') {
                    // A dotted mask, as older tools print it.
                    let a: std::net::Ipv4Addr = a.parse().ok()?;
                    let m: std::net::Ipv4Addr = m.parse().ok()?;
                    let len = u32::from(m).leading_ones() as u8;
                    return ipnet::Ipv4Net::new(a, len).ok().map(IpNet::V4);
                }
                part.parse::<IpAddr>().ok().map(IpNet::from)
            })
        })
        .collect()
}

fn tcp_flags(s: &str) -> Option<u8> {
    let mut v = 0u8;
    for f in s.split(',') {
        v |= match f.to_ascii_uppercase().as_str() {
            "FIN" => 0x01,
            "SYN" => 0x02,
            "RST" => 0x04,
            "PSH" => 0x08,
            "ACK" => 0x10,
            "URG" => 0x20,
            "ECE" => 0x40,
            "CWR" => 0x80,
            "ALL" => 0xff,
            "NONE" => 0,
            _ => return None,
        };
    }
    Some(v)
}

/// `ADDR`, `ADDR:PORT`, `[V6]:PORT`, `:PORT`, ranges `ADDR-ADDR` or `:P1-P2` (first taken).
fn nat_spec(s: &str) -> (Option<IpAddr>, Option<u16>, bool) {
    let (host, port_part) = if let Some(rest) = s.strip_prefix('[') {
        match rest.split_once(']') {
            Some((h, p)) => (h, p.strip_prefix(':')),
            None => (rest, None),
        }
    } else if s.matches(':').count() > 1 {
        (s, None)
    } else {
        match s.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        }
    };
    let mut ok = true;
    let addr = if host.is_empty() {
        None
    } else {
        let first = host.split('-').next().unwrap_or(host);
        let a = first.parse().ok();
        ok &= a.is_some();
        a
    };
    let port = port_part.and_then(|p| {
        let r = port_range(p);
        ok &= r.is_some();
        r.map(|r| r.0)
    });
    (addr, port, ok)
}

struct Tokens<'a> {
    args: &'a [String],
    i: usize,
}

impl<'a> Tokens<'a> {
    fn next(&mut self) -> Option<&'a str> {
        let t = self.args.get(self.i).map(String::as_str);
        self.i += 1;
        t
    }
    fn peek(&self) -> Option<&'a str> {
        self.args.get(self.i).map(String::as_str)
    }
    /// The option's value; a `!` in front of it (the old `--dport ! 53` spelling) negates.
    fn value(&mut self, negate: &mut bool) -> Option<&'a str> {
        if self.peek() == Some("!") {
            *negate = !*negate;
            self.i += 1;
        }
        self.next()
    }
    /// Values up to the next option, for options the parser does not model.
    fn rest_of_option(&mut self) -> Vec<&'a str> {
        let mut v = Vec::new();
        while let Some(t) = self.peek() {
            if t.starts_with('-') && t.len() > 1 || t == "!" {
                break;
            }
            v.push(t);
            self.i += 1;
        }
        v
    }
}

const SUPPORTED_MODULES: &[&str] = &[
    "tcp",
    "udp",
    "multiport",
    "owner",
    "mark",
    "connmark",
    "conntrack",
    "state",
    "addrtype",
    "comment",
    "iprange",
];

/// Parses one rule's arguments. Never fails: what it cannot model is kept as unsupported.
pub fn parse_rule(args: &[String]) -> Rule {
    let mut t = Tokens { args, i: 0 };
    let mut matches = Vec::new();
    let mut target = Target::None;
    let mut module = String::new();
    let mut negate = false;
    let push = |matches: &mut Vec<Match>, cond: Cond, negate: &mut bool| {
        matches.push(Match {
            cond,
            negate: *negate,
        });
        *negate = false;
    };
    // Address-type options collected until the module ends, as the kernel sees them together.
    while let Some(tok) = t.next() {
        let bad = |what: &str, v: Option<&str>| {
            Cond::Unsupported(format!("{what} {}", v.unwrap_or("(missing value)")))
        };
        match tok {
            "!" => negate = !negate,
            "-p" | "--protocol" => {
                let v = t.value(&mut negate);
                let cond = match v {
                    Some(p) => Cond::Proto(p.to_ascii_lowercase()),
                    None => bad(tok, v),
                };
                push(&mut matches, cond, &mut negate);
            }
            "-s" | "--source" | "--src" | "-d" | "--destination" | "--dst" => {
                let v = t.value(&mut negate);
                let cond = match v.and_then(nets) {
                    Some(n) if tok.starts_with("-s") || tok == "--source" || tok == "--src" => {
                        Cond::Src(n)
                    }
                    Some(n) => Cond::Dst(n),
                    None => bad(tok, v),
                };
                push(&mut matches, cond, &mut negate);
            }
            "-i" | "--in-interface" | "-o" | "--out-interface" => {
                let v = t.value(&mut negate);
                let cond = match v {
                    Some(name) if tok == "-i" || tok == "--in-interface" => {
                        Cond::InIface(name.into())
                    }
                    Some(name) => Cond::OutIface(name.into()),
                    None => bad(tok, v),
                };
                push(&mut matches, cond, &mut negate);
            }
            "-f" | "--fragment" => push(&mut matches, Cond::Fragment, &mut negate),
            "-m" | "--match" => {
                module = t.next().unwrap_or_default().to_string();
                negate = false;
                if !SUPPORTED_MODULES.contains(&module.as_str()) {
                    // Collect every option of the module into one unsupported match.
                    let mut desc = format!("-m {module}");
                    while let Some(p) = t.peek() {
                        if matches!(p, "-m" | "--match" | "-j" | "--jump" | "-g" | "--goto") {
                            break;
                        }
                        desc.push(' ');
                        desc.push_str(p);
                        t.i += 1;
                    }
                    push(&mut matches, Cond::Unsupported(desc), &mut negate);
                }
            }
            "-j" | "--jump" => {
                target = parse_target(t.next().unwrap_or_default(), &mut t);
                break;
            }
            "-g" | "--goto" => {
                target = Target::Goto(t.next().unwrap_or_default().to_string());
                break;
            }
            "-c" | "--set-counters" => {
                t.next();
                t.next();
            }
            "--dport" | "--destination-port" | "--sport" | "--source-port" => {
                let v = t.value(&mut negate);
                let cond = match v.and_then(port_range) {
                    Some(r) if tok.contains('d') => Cond::Dport(vec![r]),
                    Some(r) => Cond::Sport(vec![r]),
                    None => bad(tok, v),
                };
                push(&mut matches, cond, &mut negate);
            }
            "--dports" | "--destination-ports" | "--sports" | "--source-ports" | "--ports"
                if module == "multiport" =>
            {
                let v = t.value(&mut negate);
                let cond = match v.and_then(port_list) {
                    Some(l) if tok == "--ports" => Cond::AnyPort(l),
                    Some(l) if tok.contains('d') => Cond::Dport(l),
                    Some(l) => Cond::Sport(l),
                    None => bad(tok, v),
                };
                push(&mut matches, cond, &mut negate);
            }
            "--syn" => push(
                &mut matches,
                Cond::TcpFlags {
                    mask: 0x17,
                    comp: 0x02,
                },
                &mut negate,
            ),
            "--tcp-flags" => {
                let m = t.value(&mut negate);
                let c = t.next();
                let cond = match (m.and_then(tcp_flags), c.and_then(tcp_flags)) {
                    (Some(mask), Some(comp)) => Cond::TcpFlags { mask, comp },
                    _ => bad(tok, m),
                };
                push(&mut matches, cond, &mut negate);
            }
            "--uid-owner" | "--gid-owner" => {
                let v = t.value(&mut negate);
                let group = tok == "--gid-owner";
                let cond = match v.map(|v| id_range(v, group)) {
                    Some(Ok(ids)) if group => Cond::Gid { ids, suppl: false },
                    Some(Ok(ids)) => Cond::Uid(ids),
                    Some(Err(e)) => Cond::Unsupported(format!("{tok}: {e}")),
                    None => bad(tok, v),
                };
                push(&mut matches, cond, &mut negate);
            }
            "--suppl-groups" => {
                if let Some(Match {
                    cond: Cond::Gid { suppl, .. },
                    ..
                }) = matches.last_mut()
                {
                    *suppl = true;
                }
            }
            "--socket-exists" => push(&mut matches, Cond::SocketExists, &mut negate),
            "--mark" if module == "mark" || module == "connmark" => {
                let v = t.value(&mut negate);
                let cond = match v.and_then(value_mask) {
                    Some((value, mask)) if module == "mark" => Cond::Mark { value, mask },
                    Some((value, mask)) => Cond::ConnMark { value, mask },
                    None => bad(tok, v),
                };
                push(&mut matches, cond, &mut negate);
            }
            "--ctstate" | "--state" => {
                let v = t.value(&mut negate);
                let states: Option<Vec<CtState>> =
                    v.and_then(|v| v.split(',').map(CtState::parse).collect());
                let cond = match states {
                    Some(s) => Cond::CtState(s),
                    None => bad(tok, v),
                };
                push(&mut matches, cond, &mut negate);
            }
            "--src-type" | "--dst-type" => {
                let v = t.value(&mut negate);
                let types: Option<Vec<AddrType>> =
                    v.and_then(|v| v.split(',').map(AddrType::parse).collect());
                let cond = match types {
                    Some(types) if tok == "--src-type" => Cond::SrcType {
                        types,
                        limit_in: false,
                        limit_out: false,
                    },
                    Some(types) => Cond::DstType {
                        types,
                        limit_in: false,
                        limit_out: false,
                    },
                    None => bad(tok, v),
                };
                push(&mut matches, cond, &mut negate);
            }
            "--limit-iface-in" | "--limit-iface-out" => {
                // Applies to the addrtype options of the same module, written before it.
                for m in matches.iter_mut().rev() {
                    match &mut m.cond {
                        Cond::SrcType {
                            limit_in,
                            limit_out,
                            ..
                        }
                        | Cond::DstType {
                            limit_in,
                            limit_out,
                            ..
                        } => {
                            if tok.ends_with("in") {
                                *limit_in = true;
                            } else {
                                *limit_out = true;
                            }
                        }
                        _ => break,
                    }
                }
            }
            "--comment" => {
                let v = t.next().unwrap_or_default();
                push(&mut matches, Cond::Comment(v.into()), &mut negate);
            }
            "--src-range" | "--dst-range" => {
                let v = t.value(&mut negate);
                let range = v.and_then(|v| {
                    let (a, b) = v.split_once('-')?;
                    Some((a.parse().ok()?, b.parse().ok()?))
                });
                let cond = match range {
                    Some((a, b)) if tok == "--src-range" => Cond::SrcRange(a, b),
                    Some((a, b)) => Cond::DstRange(a, b),
                    None => bad(tok, v),
                };
                push(&mut matches, cond, &mut negate);
            }
            other => {
                let vals = t.rest_of_option();
                let desc = if module.is_empty() {
                    format!("{other} {}", vals.join(" "))
                } else {
                    format!("-m {module} {other} {}", vals.join(" "))
                };
                push(
                    &mut matches,
                    Cond::Unsupported(desc.trim().to_string()),
                    &mut negate,
                );
            }
        }
    }
    Rule { matches, target }
}

fn parse_target(name: &str, t: &mut Tokens) -> Target {
    // Target options as (option, value) pairs; flags have no value.
    let mut opts: Vec<(&str, Option<&str>)> = Vec::new();
    while let Some(o) = t.next() {
        let v = match t.peek() {
            Some(v) if !v.starts_with("--") => {
                t.i += 1;
                Some(v)
            }
            _ => None,
        };
        opts.push((o, v));
    }
    let get = |k: &[&str]| opts.iter().find(|(o, _)| k.contains(o)).map(|(_, v)| *v);
    let has = |k: &str| opts.iter().any(|(o, _)| *o == k);
    let unknown = || Target::Unknown(format!("{name} {opts:?}"));
    match name {
        "ACCEPT" => Target::Accept,
        "DROP" => Target::Drop,
        "RETURN" => Target::Return,
        "REJECT" => Target::Reject(
            get(&["--reject-with"])
                .flatten()
                .unwrap_or("icmp-port-unreachable")
                .to_string(),
        ),
        "REDIRECT" => match get(&["--to-ports", "--to-port"]) {
            None => Target::Redirect { port: None },
            Some(v) => match v.and_then(port_range) {
                Some((p, _)) => Target::Redirect { port: Some(p) },
                None => unknown(),
            },
        },
        "DNAT" => match get(&["--to-destination", "--to"]).flatten() {
            Some(spec) => match nat_spec(spec) {
                (addr, port, true) => Target::Dnat {
                    addr,
                    port,
                    spec: spec.to_string(),
                },
                _ => unknown(),
            },
            None => unknown(),
        },
        "SNAT" => Target::Snat {
            spec: get(&["--to-source", "--to"])
                .flatten()
                .unwrap_or_default()
                .to_string(),
        },
        "MASQUERADE" => Target::Masquerade,
        "TPROXY" => {
            let port = get(&["--on-port"]).flatten().and_then(port);
            let addr = get(&["--on-ip"]).flatten().and_then(|a| a.parse().ok());
            let mark = match get(&["--tproxy-mark"]) {
                None => None,
                Some(v) => match v.and_then(value_mask) {
                    Some((v, m)) => Some(MarkOp { clear: m, xor: v }),
                    None => return unknown(),
                },
            };
            Target::Tproxy { port, addr, mark }
        }
        "MARK" => {
            let op = if let Some(v) = get(&["--set-xmark"]) {
                v.and_then(value_mask)
                    .map(|(v, m)| MarkOp { clear: m, xor: v })
            } else if let Some(v) = get(&["--set-mark"]) {
                // --set-mark V/M: zero the mask bits, then OR in V (V within M).
                v.and_then(value_mask).map(|(v, m)| MarkOp {
                    clear: m | v,
                    xor: v,
                })
            } else if let Some(v) = get(&["--and-mark"]) {
                v.and_then(parse_u32).map(|v| MarkOp { clear: !v, xor: 0 })
            } else if let Some(v) = get(&["--or-mark"]) {
                v.and_then(parse_u32).map(|v| MarkOp { clear: v, xor: v })
            } else if let Some(v) = get(&["--xor-mark"]) {
                v.and_then(parse_u32).map(|v| MarkOp { clear: 0, xor: v })
            } else {
                None
            };
            op.map(Target::Mark).unwrap_or_else(unknown)
        }
        "CONNMARK" => {
            let mask = |k: &[&str]| -> Option<u32> {
                match get(k) {
                    None => Some(u32::MAX),
                    Some(v) => v.and_then(parse_u32),
                }
            };
            let op = if has("--save-mark") || has("--restore-mark") {
                let generic = mask(&["--mask"]);
                let nfmask = if has("--nfmask") {
                    mask(&["--nfmask"])
                } else {
                    generic
                };
                let ctmask = if has("--ctmask") {
                    mask(&["--ctmask"])
                } else {
                    generic
                };
                match (nfmask, ctmask) {
                    (Some(nfmask), Some(ctmask)) if has("--save-mark") => {
                        Some(ConnmarkOp::Save { nfmask, ctmask })
                    }
                    (Some(nfmask), Some(ctmask)) => Some(ConnmarkOp::Restore { nfmask, ctmask }),
                    _ => None,
                }
            } else if let Some(v) = get(&["--set-xmark"]) {
                v.and_then(value_mask)
                    .map(|(v, m)| ConnmarkOp::Set(MarkOp { clear: m, xor: v }))
            } else if let Some(v) = get(&["--set-mark"]) {
                v.and_then(value_mask).map(|(v, m)| {
                    ConnmarkOp::Set(MarkOp {
                        clear: m | v,
                        xor: v,
                    })
                })
            } else {
                None
            };
            op.map(Target::Connmark).unwrap_or_else(unknown)
        }
        "CT" if has("--notrack") => Target::Notrack,
        "NOTRACK" => Target::Notrack,
        "CT" => Target::Continue(name.into()),
        n if PASSIVE_TARGETS.contains(&n) => Target::Continue(n.into()),
        n if OPAQUE_TARGETS.contains(&n) => unknown(),
        "" => unknown(),
        n if opts.is_empty() => Target::Jump(n.into()),
        _ => unknown(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(s: &str) -> Rule {
        parse_rule(&crate::rules::tokenize(s).unwrap())
    }

    #[test]
    fn parses_istio_style_owner_rule() {
        let r = rule("-o lo ! -d 127.0.0.1/32 -p tcp -m multiport ! --dports 53,15008 -m owner --uid-owner 3 -j ISTIO_IN_REDIRECT");
        assert_eq!(r.matches.len(), 5);
        assert_eq!(
            r.matches[1].cond,
            Cond::Dst(vec!["127.0.0.1/32".parse().unwrap()])
        );
        assert!(r.matches[1].negate);
        assert_eq!(
            r.matches[3].cond,
            Cond::Dport(vec![(53, 53), (15008, 15008)])
        );
        assert!(r.matches[3].negate);
        assert_eq!(r.matches[4].cond, Cond::Uid((3, 3)));
        assert!(!r.matches[4].negate);
        assert_eq!(r.target, Target::Jump("ISTIO_IN_REDIRECT".into()));
    }

    #[test]
    fn parses_targets() {
        assert_eq!(
            rule("-p tcp -j REDIRECT --to-ports 15001").target,
            Target::Redirect { port: Some(15001) }
        );
        assert_eq!(
            rule("-j DNAT --to-destination 10.0.0.1:80").target,
            Target::Dnat {
                addr: Some("10.0.0.1".parse().unwrap()),
                port: Some(80),
                spec: "10.0.0.1:80".into()
            }
        );
        assert_eq!(
            rule("-j MARK --set-xmark 0x7/0xffffffff").target,
            Target::Mark(MarkOp {
                clear: u32::MAX,
                xor: 7
            })
        );
        assert_eq!(rule("-j CT --notrack").target, Target::Notrack);
        assert_eq!(rule("-j CT --zone 1").target, Target::Continue("CT".into()));
        assert!(matches!(
            rule("-j NFQUEUE --queue-num 1").target,
            Target::Unknown(_)
        ));
        assert_eq!(
            rule("-p tcp -m tcp --dport ! 53 -j RETURN").matches[1],
            Match {
                cond: Cond::Dport(vec![(53, 53)]),
                negate: true
            }
        );
    }

    #[test]
    fn unknown_modules_are_kept_as_unsupported() {
        let r = rule("-m set --match-set foo dst -m comment --comment \"x y\" -j ACCEPT");
        assert_eq!(
            r.matches[0].cond,
            Cond::Unsupported("-m set --match-set foo dst".into())
        );
        assert_eq!(r.matches[1].cond, Cond::Comment("x y".into()));
        assert_eq!(r.target, Target::Accept);
    }

    #[test]
    fn owner_names_and_ranges() {
        assert_eq!(
            rule("-m owner --uid-owner root").matches[0].cond,
            Cond::Uid((0, 0))
        );
        assert_eq!(
            rule("-m owner --uid-owner 1000-2000").matches[0].cond,
            Cond::Uid((1000, 2000))
        );
        assert!(matches!(
            rule("-m owner --uid-owner no-such-user-xyz").matches[0].cond,
            Cond::Unsupported(_)
        ));
    }
}
