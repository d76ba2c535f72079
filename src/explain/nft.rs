//! Native nftables tables (`nft -j list ruleset`) in the evaluator's rule model.
//!
//! Each rule's expressions are translated into [`Match`]es and a [`Target`] where they mean
//! exactly what an iptables match means (`ip daddr @set`, `tcp dport { 80, 443 }`,
//! `meta skuid`, `ct state`, `redirect to :15001`, ...). Anything else becomes
//! [`Cond::Unsupported`] or [`Target::Unknown`], which the evaluator reports as uncertain:
//! a rule explain cannot read is never guessed to match or not.
//!
//! The tables iptables-nft owns (`ip`/`ip6` tables named filter, nat, mangle, raw, security)
//! are skipped: explain reads those through `iptables-nft-save`, in iptables' own terms.

use std::collections::HashMap;

use ipnet::IpNet;
use serde_json::Value;

use super::eval::{NftBase, NftTable};
use super::matches::{Cond, ConnmarkOp, CtState, MarkOp, Match, Rule, Target};
use crate::plan::Family;

/// Tables that iptables-nft keeps in nf_tables for its own dialect.
const IPTABLES_TABLES: &[&str] = &["filter", "nat", "mangle", "raw", "security"];

/// The iptables hook name of an nft hook.
fn hook_name(h: &str) -> Option<&'static str> {
    Some(match h {
        "prerouting" => "PREROUTING",
        "input" => "INPUT",
        "forward" => "FORWARD",
        "output" => "OUTPUT",
        "postrouting" => "POSTROUTING",
        _ => return None,
    })
}

/// Whether a table of `family` (nft's name) sees packets of `f`.
fn family_applies(family: &str, f: Family) -> bool {
    matches!(
        (family, f),
        ("inet", _) | ("ip", Family::V4) | ("ip6", Family::V6)
    )
}

/// Is this an iptables-nft table (read through iptables-nft-save instead)?
pub fn owned_by_iptables(family: &str, name: &str) -> bool {
    matches!(family, "ip" | "ip6") && IPTABLES_TABLES.contains(&name)
}

/// The native tables of a `nft -j list ruleset` document that see packets of `family`.
pub fn tables_from_json(doc: &Value, family: Family) -> Result<Vec<NftTable>, String> {
    let items = doc["nftables"]
        .as_array()
        .ok_or("not `nft -j` output: no \"nftables\" array")?;
    let key = |o: &Value| {
        (
            o["family"].as_str().unwrap_or_default().to_string(),
            o["table"]
                .as_str()
                .or_else(|| o["name"].as_str())
                .unwrap_or_default()
                .to_string(),
        )
    };
    let keep = |(f, n): &(String, String)| family_applies(f, family) && !owned_by_iptables(f, n);
    let mut tables: Vec<NftTable> = Vec::new();
    let mut sets: HashMap<(String, String), Sets> = HashMap::new();
    for item in items {
        if let Some(t) = item.get("table") {
            let k = key(t);
            if keep(&k) {
                tables.push(NftTable {
                    name: format!("{} {}", k.0, k.1),
                    chains: HashMap::new(),
                    bases: Vec::new(),
                });
            }
        } else if let Some(s) = item.get("set").or_else(|| item.get("map")) {
            let k = key(s);
            let elems = s["elem"].as_array().cloned().unwrap_or_default();
            let name = s["name"].as_str().unwrap_or_default().to_string();
            sets.entry(k).or_default().insert(name, elems);
        }
    }
    let find = |tables: &mut Vec<NftTable>, k: &(String, String)| -> Option<usize> {
        let name = format!("{} {}", k.0, k.1);
        tables.iter().position(|t| t.name == name)
    };
    for item in items {
        if let Some(c) = item.get("chain") {
            let k = key(c);
            let Some(ti) = find(&mut tables, &k) else {
                continue;
            };
            let name = c["name"].as_str().unwrap_or_default().to_string();
            let t = &mut tables[ti];
            let def = t.chains.entry(name.clone()).or_default();
            if let (Some(hook), Some(prio)) = (c["hook"].as_str(), c["prio"].as_i64()) {
                let policy = c["policy"]
                    .as_str()
                    .unwrap_or("accept")
                    .to_ascii_uppercase();
                def.policy = Some(policy);
                match hook_name(hook) {
                    Some(h) => t.bases.push(NftBase {
                        chain: name,
                        hook: h,
                        prio: prio as i32,
                        nat: c["type"].as_str() == Some("nat"),
                    }),
                    // ingress/egress hooks: not on any path explain walks.
                    None => continue,
                }
            }
        } else if let Some(r) = item.get("rule") {
            let k = key(r);
            let Some(ti) = find(&mut tables, &k) else {
                continue;
            };
            let chain = r["chain"].as_str().unwrap_or_default().to_string();
            let none = Sets::new();
            let exprs = r["expr"].as_array().cloned().unwrap_or_default();
            let translated = translate(&exprs, sets.get(&k).unwrap_or(&none));
            tables[ti]
                .chains
                .entry(chain)
                .or_default()
                .rules
                .push(translated);
        }
    }
    Ok(tables)
}

/// A table's named sets: name -> elements.
type Sets = HashMap<String, Vec<Value>>;

fn m(cond: Cond, negate: bool) -> Match {
    Match { cond, negate }
}

fn unsupported(what: String) -> Match {
    m(Cond::Unsupported(what), false)
}

/// An expression as JSON (for what explain cannot name).
fn show(v: &Value) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

/// A value or selector about as `nft list` prints it, for traces.
fn text_of(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Array(a) => a.iter().map(text_of).collect::<Vec<_>>().join(","),
        Value::Object(o) => {
            if let Some(p) = o.get("payload") {
                format!("{} {}", text_of(&p["protocol"]), text_of(&p["field"]))
            } else if let Some(k) = o.get("meta") {
                match k["key"].as_str() {
                    Some(n @ ("iifname" | "oifname")) => n.to_string(),
                    _ => format!("meta {}", text_of(&k["key"])),
                }
            } else if let Some(k) = o.get("ct") {
                format!("ct {}", text_of(&k["key"]))
            } else if let Some(p) = o.get("prefix") {
                format!("{}/{}", text_of(&p["addr"]), text_of(&p["len"]))
            } else if let Some(r) = o.get("range").and_then(Value::as_array) {
                r.iter().map(text_of).collect::<Vec<_>>().join("-")
            } else if let Some(s) = o.get("set").and_then(Value::as_array) {
                format!(
                    "{{ {} }}",
                    s.iter().map(text_of).collect::<Vec<_>>().join(", ")
                )
            } else {
                show(v)
            }
        }
        _ => show(v),
    }
}

/// A match expression as nft prints it: `ip daddr != 127.0.0.0/8`.
fn match_text(mt: &Value) -> String {
    let op = match mt["op"].as_str().unwrap_or("==") {
        "==" | "in" => String::new(),
        other => format!("{other} "),
    };
    format!("{} {op}{}", text_of(&mt["left"]), text_of(&mt["right"]))
}

/// A statement as nft prints it: `redirect to :15001`, `meta mark set 1337`.
fn statement_text(s: &Value) -> String {
    let Some((k, v)) = s.as_object().and_then(|o| o.iter().next()) else {
        return show(s);
    };
    match k.as_str() {
        "accept" | "drop" | "return" | "notrack" | "masquerade" | "counter" | "log" => k.clone(),
        "jump" | "goto" => format!("{k} {}", text_of(&v["target"])),
        "redirect" if v.get("port").is_some() => format!("redirect to :{}", text_of(&v["port"])),
        "tproxy" if v.get("port").is_some() => {
            let fam = v
                .get("family")
                .map(|f| format!("{} ", text_of(f)))
                .unwrap_or_default();
            format!("tproxy {fam}to :{}", text_of(&v["port"]))
        }
        "mangle" => format!("{} set {}", text_of(&v["key"]), text_of(&v["value"])),
        _ => show(s),
    }
}

/// One rule: its matches, its statements folded into one target, and its text.
fn translate(exprs: &[Value], sets: &Sets) -> (Rule, String) {
    let mut matches = Vec::new();
    let mut words = Vec::new();
    let mut stmts: Vec<&Value> = Vec::new();
    for e in exprs {
        if let Some(mt) = e.get("match") {
            if !stmts.is_empty() {
                // A match after a statement sees the statement's effect: not modelled.
                matches.push(unsupported(format!(
                    "a match after a statement: {}",
                    match_text(mt)
                )));
            }
            matches.extend(match_expr(mt, sets));
            words.push(match_text(mt));
        } else if e.get("counter").is_some() || e.get("log").is_some() {
            words.push(statement_text(e));
        } else {
            stmts.push(e);
        }
    }
    let (target, text) = statements(&stmts);
    if !text.is_empty() {
        words.push(text);
    }
    (Rule { matches, target }, words.join(" "))
}

fn nets_of(v: &Value, sets: &Sets) -> Option<Vec<IpNet>> {
    match v {
        Value::String(s) => {
            if let Some(name) = s.strip_prefix('@') {
                return sets.get(name)?.iter().map(one_net).collect();
            }
            one_net(v).map(|n| vec![n])
        }
        Value::Object(o) if o.contains_key("prefix") || o.contains_key("range") => {
            one_net(v).map(|n| vec![n])
        }
        Value::Object(o) => o.get("set")?.as_array()?.iter().map(one_net).collect(),
        _ => None,
    }
}

fn one_net(v: &Value) -> Option<IpNet> {
    match v {
        Value::String(s) => s
            .parse::<IpNet>()
            .ok()
            .or_else(|| s.parse::<std::net::IpAddr>().ok().map(IpNet::from)),
        Value::Object(o) => {
            if let Some(p) = o.get("prefix") {
                let addr: std::net::IpAddr = p["addr"].as_str()?.parse().ok()?;
                IpNet::new(addr, p["len"].as_u64()? as u8).ok()
            } else if let Some(e) = o.get("elem") {
                one_net(&e["val"])
            } else {
                // An address range that is not a prefix: not one network.
                None
            }
        }
        _ => None,
    }
}

/// Numbers, `{ set }`, `{ "range": [a, b] }`, `@named set` as inclusive ranges.
fn ranges_of(v: &Value, sets: &Sets) -> Option<Vec<(u64, u64)>> {
    let one = |v: &Value| -> Option<(u64, u64)> {
        if let Some(n) = v.as_u64() {
            return Some((n, n));
        }
        let r = v.get("range")?.as_array()?;
        Some((r.first()?.as_u64()?, r.get(1)?.as_u64()?))
    };
    match v {
        Value::String(s) => sets.get(s.strip_prefix('@')?)?.iter().map(one).collect(),
        Value::Object(o) if o.contains_key("set") => o["set"].as_array()?.iter().map(one).collect(),
        _ => one(v).map(|r| vec![r]),
    }
}

fn strings_of(v: &Value) -> Option<Vec<String>> {
    match v {
        Value::String(s) => Some(vec![s.clone()]),
        Value::Array(a) => a.iter().map(|x| x.as_str().map(String::from)).collect(),
        Value::Object(o) => o
            .get("set")?
            .as_array()?
            .iter()
            .map(|x| x.as_str().map(String::from))
            .collect(),
        _ => None,
    }
}

/// The matches one `match` expression stands for (several: `tcp dport` also says
/// `meta l4proto tcp`, `ip daddr` also says IPv4), and its text.
fn match_expr(mt: &Value, sets: &Sets) -> Vec<Match> {
    let text = match_text(mt);
    let op = mt["op"].as_str().unwrap_or("==");
    let left = &mt["left"];
    let right = &mt["right"];
    let negate = match op {
        "==" | "in" => false,
        "!=" => true,
        _ => return vec![unsupported(format!("operator {op} in `{text}`"))],
    };
    let u16s = |r: Vec<(u64, u64)>| -> Vec<(u16, u16)> {
        r.into_iter()
            .map(|(a, b)| (a.min(65535) as u16, b.min(65535) as u16))
            .collect()
    };
    let out: Option<Vec<Match>> = (|| {
        if let Some(p) = left.get("payload") {
            let proto = p["protocol"].as_str()?;
            let field = p["field"].as_str()?;
            match (proto, field) {
                ("ip" | "ip6", "saddr" | "daddr") => {
                    let nets = nets_of(right, sets)?;
                    let cond = if field == "saddr" {
                        Cond::Src(nets)
                    } else {
                        Cond::Dst(nets)
                    };
                    Some(vec![m(Cond::Ipv4(proto == "ip"), false), m(cond, negate)])
                }
                ("tcp" | "udp", "dport" | "sport") => {
                    let r = u16s(ranges_of(right, sets)?);
                    let cond = if field == "dport" {
                        Cond::Dport(r)
                    } else {
                        Cond::Sport(r)
                    };
                    Some(vec![m(Cond::Proto(proto.into()), false), m(cond, negate)])
                }
                _ => None,
            }
        } else if let Some(k) = left.get("meta").and_then(|x| x["key"].as_str()) {
            match k {
                "l4proto" => {
                    let names = strings_of(right)?;
                    match names.as_slice() {
                        [one] => Some(vec![m(Cond::Proto(one.clone()), negate)]),
                        _ => None,
                    }
                }
                "nfproto" => {
                    let names = strings_of(right)?;
                    match names.as_slice() {
                        [one] if one == "ipv4" || one == "ipv6" => {
                            Some(vec![m(Cond::Ipv4(one == "ipv4"), negate)])
                        }
                        _ => None,
                    }
                }
                "iifname" | "oifname" => {
                    let names = strings_of(right)?;
                    let [name] = names.as_slice() else {
                        return None;
                    };
                    // nft's `eth*` wildcard is iptables' `eth+`; a literal `+` is not a
                    // wildcard in nft.
                    if name.contains('+') || name.contains('\\') {
                        return None;
                    }
                    let pat = match name.strip_suffix('*') {
                        Some(prefix) => format!("{prefix}+"),
                        None => name.clone(),
                    };
                    let cond = if k == "iifname" {
                        Cond::InIface(pat)
                    } else {
                        Cond::OutIface(pat)
                    };
                    Some(vec![m(cond, negate)])
                }
                "skuid" | "skgid" => {
                    let r: Vec<(u32, u32)> = ranges_of(right, sets)?
                        .into_iter()
                        .map(|(a, b)| (a as u32, b as u32))
                        .collect();
                    let cond = if k == "skuid" {
                        Cond::SkUid(r)
                    } else {
                        Cond::SkGid(r)
                    };
                    Some(vec![m(cond, negate)])
                }
                "mark" => {
                    let value = right.as_u64()? as u32;
                    Some(vec![m(
                        Cond::Mark {
                            value,
                            mask: u32::MAX,
                        },
                        negate,
                    )])
                }
                _ => None,
            }
        } else if let Some(k) = left.get("ct").and_then(|x| x["key"].as_str()) {
            match k {
                "state" => {
                    let states: Option<Vec<CtState>> = strings_of(right)?
                        .iter()
                        .map(|s| CtState::parse(s))
                        .collect();
                    Some(vec![m(Cond::CtState(states?), negate)])
                }
                "mark" => {
                    let value = right.as_u64()? as u32;
                    Some(vec![m(
                        Cond::ConnMark {
                            value,
                            mask: u32::MAX,
                        },
                        negate,
                    )])
                }
                _ => None,
            }
        } else {
            None
        }
    })();
    out.unwrap_or_else(|| vec![unsupported(text)])
}

/// The statements of a rule as one target: a verdict, one effect, or tproxy with its mark.
fn statements(stmts: &[&Value]) -> (Target, String) {
    let text = stmts
        .iter()
        .map(|s| statement_text(s))
        .collect::<Vec<_>>()
        .join(" ");
    let verdict = |s: &Value| -> Option<Target> {
        let (k, v) = s.as_object()?.iter().next()?;
        Some(match k.as_str() {
            "accept" => Target::Accept,
            "drop" => Target::Drop,
            "return" => Target::Return,
            "jump" => Target::Jump(v["target"].as_str()?.to_string()),
            "goto" => Target::Goto(v["target"].as_str()?.to_string()),
            "reject" => Target::Reject(show(v)),
            _ => return None,
        })
    };
    let effect = |s: &Value| -> Option<Target> {
        let (k, v) = s.as_object()?.iter().next()?;
        Some(match k.as_str() {
            "redirect" => {
                if v.get("flags").is_some() {
                    return None;
                }
                Target::Redirect {
                    port: match v.get("port") {
                        None => None,
                        Some(p) => Some(p.as_u64()? as u16),
                    },
                }
            }
            "dnat" => {
                let addr = match v.get("addr") {
                    None => None,
                    Some(a) => Some(a.as_str()?.parse().ok()?),
                };
                let port = match v.get("port") {
                    None => None,
                    Some(p) => Some(p.as_u64()? as u16),
                };
                Target::Dnat {
                    addr,
                    port,
                    spec: show(v),
                }
            }
            "snat" => Target::Snat { spec: show(v) },
            "masquerade" => Target::Masquerade,
            "notrack" => Target::Notrack,
            "mangle" => {
                let key = &v["key"];
                let meta = key.get("meta").and_then(|x| x["key"].as_str());
                let ct = key.get("ct").and_then(|x| x["key"].as_str());
                let value = &v["value"];
                let from_ct = value.get("ct").and_then(|x| x["key"].as_str()) == Some("mark");
                let from_meta = value.get("meta").and_then(|x| x["key"].as_str()) == Some("mark");
                let all = MarkOp {
                    clear: u32::MAX,
                    xor: 0,
                };
                match (meta, ct) {
                    (Some("mark"), _) if from_ct => Target::Connmark(ConnmarkOp::Restore {
                        nfmask: u32::MAX,
                        ctmask: u32::MAX,
                    }),
                    (Some("mark"), _) => Target::Mark(MarkOp {
                        xor: value.as_u64()? as u32,
                        ..all
                    }),
                    (_, Some("mark")) if from_meta => Target::Connmark(ConnmarkOp::Save {
                        nfmask: u32::MAX,
                        ctmask: u32::MAX,
                    }),
                    (_, Some("mark")) => Target::Connmark(ConnmarkOp::Set(MarkOp {
                        xor: value.as_u64()? as u32,
                        ..all
                    })),
                    // A conntrack zone: separates DNS flows, changes nothing explain reads.
                    (_, Some("zone")) if value.is_u64() => Target::Continue("ct zone".into()),
                    _ => return None,
                }
            }
            _ => return None,
        })
    };
    let target = match stmts {
        [] => Some(Target::None),
        [one] => verdict(one).or_else(|| effect(one)),
        // `tproxy ip to :15006 meta mark set 0x539 accept`, as shunt and Istio write it.
        [tp, rest @ ..] if tp.get("tproxy").is_some() => (|| {
            let v = &tp["tproxy"];
            if v.get("addr").is_some() {
                return None;
            }
            let port = Some(v.get("port")?.as_u64()? as u16);
            // Without a verdict after it, nft's tproxy does not end the rule set as
            // iptables' TPROXY does: only the accepting form maps.
            let (last, marks) = rest.split_last()?;
            if verdict(last) != Some(Target::Accept) {
                return None;
            }
            let mut mark = None;
            for s in marks {
                match effect(s) {
                    Some(Target::Mark(op)) if mark.is_none() => mark = Some(op),
                    _ => return None,
                }
            }
            Some(Target::Tproxy {
                port,
                addr: None,
                mark,
            })
        })(),
        _ => None,
    };
    match target {
        Some(t) => (t, text),
        None => (Target::Unknown(format!("nft statements `{text}`")), text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rule(exprs: Value) -> (Rule, String) {
        translate(exprs.as_array().unwrap(), &Sets::new())
    }

    #[test]
    fn wildcards_ranges_and_negations_map_to_iptables_matches() {
        let (r, text) = rule(json!([
            {"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "veth*"}},
            {"match": {"op": "!=", "left": {"payload": {"protocol": "tcp", "field": "dport"}},
                       "right": {"set": [22, {"range": [8000, 8100]}]}}},
            {"match": {"op": "in", "left": {"ct": {"key": "state"}},
                       "right": ["established", "related"]}},
            {"counter": {"packets": 0, "bytes": 0}},
            {"return": null}
        ]));
        assert_eq!(
            text,
            "iifname veth* tcp dport != { 22, 8000-8100 } ct state established,related counter return"
        );
        assert_eq!(
            r.matches,
            vec![
                m(Cond::InIface("veth+".into()), false),
                m(Cond::Proto("tcp".into()), false),
                m(Cond::Dport(vec![(22, 22), (8000, 8100)]), true),
                m(
                    Cond::CtState(vec![CtState::Established, CtState::Related]),
                    false
                ),
            ]
        );
        assert_eq!(r.target, Target::Return);
    }

    #[test]
    fn what_has_no_exact_meaning_is_unsupported() {
        // A literal `+` is no wildcard in nft; bit operations on the mark are not modelled.
        for e in [
            json!({"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "eth+"}}),
            json!({"match": {"op": "==", "left": {"&": [{"meta": {"key": "mark"}}, 255]}, "right": 1}}),
            json!({"match": {"op": ">", "left": {"meta": {"key": "skuid"}}, "right": 1000}}),
        ] {
            let (r, _) = rule(json!([e, {"accept": null}]));
            assert!(
                matches!(r.matches[0].cond, Cond::Unsupported(_)),
                "{:?}",
                r.matches
            );
        }
        // nft's tproxy without a verdict does not end the walk as TPROXY does.
        let (r, _) = rule(json!([{"tproxy": {"family": "ip", "port": 15006}}]));
        assert!(matches!(r.target, Target::Unknown(_)), "{:?}", r.target);
        let (r, text) = rule(json!([
            {"tproxy": {"family": "ip", "port": 15006}},
            {"mangle": {"key": {"meta": {"key": "mark"}}, "value": 1337}},
            {"accept": null}
        ]));
        assert_eq!(text, "tproxy ip to :15006 meta mark set 1337 accept");
        assert_eq!(
            r.target,
            Target::Tproxy {
                port: Some(15006),
                addr: None,
                mark: Some(MarkOp {
                    clear: u32::MAX,
                    xor: 1337
                })
            }
        );
    }

    #[test]
    fn iptables_nft_tables_are_left_to_iptables_save() {
        assert!(owned_by_iptables("ip", "nat"));
        assert!(owned_by_iptables("ip6", "mangle"));
        assert!(!owned_by_iptables("inet", "nat"));
        assert!(!owned_by_iptables("ip", "shunt"));
    }
}
