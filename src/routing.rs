//! Policy routing for tproxy mode: `ip rule add fwmark M lookup T` and
//! `ip route add local default dev lo table T`, per family, so that marked packets (TPROXY'd
//! inbound ones, and the app's replies to the proxy's transparent connections) are delivered
//! locally. Read and written with iproute2 inside the target namespace.

use serde_json::Value;

use crate::netfilter::{spawn_tool, NetfilterError, Running};
use crate::netns::Netns;
use crate::plan::{Family, Routing};

fn fam(family: Family) -> &'static str {
    match family {
        Family::V4 => "-4",
        Family::V6 => "-6",
    }
}

fn ip(args: &[&str], ns: Option<&Netns>) -> Result<Running, NetfilterError> {
    spawn_tool("ip", args, None, ns)
}

/// `ip route replace|del local default dev lo table T`
fn local_default(
    family: Family,
    verb: &str,
    table: &str,
    ns: Option<&Netns>,
) -> Result<(), NetfilterError> {
    let args = [
        fam(family),
        "route",
        verb,
        "local",
        "default",
        "dev",
        "lo",
        "table",
        table,
    ];
    ip(&args, ns)?.wait().map(drop)
}

/// `ip rule add|del fwmark M lookup T`
fn fwmark_rule(
    family: Family,
    verb: &str,
    r: Routing,
    ns: Option<&Netns>,
) -> Result<(), NetfilterError> {
    let (mark, table) = (r.mark.to_string(), r.table.to_string());
    let args = [fam(family), "rule", verb, "fwmark", &mark, "lookup", &table];
    ip(&args, ns)?.wait().map(drop)
}

fn json(text: &str) -> Vec<Value> {
    serde_json::from_str::<Value>(text)
        .ok()
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
}

/// How many times `ip -j rule show` lists `fwmark M lookup T` (iproute2 prints the mark in
/// hex).
fn rule_copies(rules: &[Value], r: Routing) -> usize {
    rules
        .iter()
        .filter(|x| {
            let mark = x.get("fwmark").and_then(Value::as_str).and_then(|m| {
                let m = m.split('/').next()?;
                u32::from_str_radix(m.trim_start_matches("0x"), 16).ok()
            });
            let table = x.get("table").and_then(Value::as_str);
            mark == Some(r.mark) && table == Some(r.table.to_string().as_str())
        })
        .count()
}

fn has_route(routes: &[Value]) -> bool {
    routes.iter().any(|x| {
        x.get("type").and_then(Value::as_str) == Some("local")
            && x.get("dst").and_then(Value::as_str) == Some("default")
            && x.get("dev").and_then(Value::as_str) == Some("lo")
    })
}

/// What is installed for one family: (the rule, the local default route).
pub fn present(
    family: Family,
    r: Routing,
    ns: Option<&Netns>,
) -> Result<(bool, bool), NetfilterError> {
    let (rules, route) = installed(family, r, ns)?;
    Ok((rules > 0, route))
}

/// (copies of the rule, whether the local default route is there).
fn installed(
    family: Family,
    r: Routing,
    ns: Option<&Netns>,
) -> Result<(usize, bool), NetfilterError> {
    let table = r.table.to_string();
    let rules = ip(&[fam(family), "-j", "rule", "show"], ns)?;
    let routes = ip(&[fam(family), "-j", "route", "show", "table", &table], ns)?;
    let rules = json(&rules.wait()?);
    // An empty table is an error for some iproute2 versions: that just means "no route".
    let routes = routes.wait().map(|t| json(&t)).unwrap_or_default();
    Ok((rule_copies(&rules, r), has_route(&routes)))
}

/// Adds what is missing; returns whether the rule was added (so a failed apply can undo it).
pub fn ensure(family: Family, r: Routing, ns: Option<&Netns>) -> Result<bool, NetfilterError> {
    let (rule, route) = present(family, r, ns)?;
    if !route {
        local_default(family, "replace", &r.table.to_string(), ns)?;
    }
    if !rule {
        fwmark_rule(family, "add", r, ns)?;
    }
    Ok(!rule)
}

/// Removes the rule (every copy) and the table's local default route, if there.
pub fn remove(family: Family, r: Routing, ns: Option<&Netns>) -> Result<bool, NetfilterError> {
    let (copies, route) = installed(family, r, ns)?;
    // One `del` removes one copy; every copy goes.
    for _ in 0..copies {
        fwmark_rule(family, "del", r, ns)?;
    }
    if route {
        local_default(family, "del", &r.table.to_string(), ns)?;
    }
    Ok(copies > 0 || route)
}

/// The numeric tables that `fwmark M` rules point at (named ones are the kernel's own, which
/// shunt never uses).
fn tables_for_mark(rules: &[Value], mark: u32) -> Vec<u32> {
    let mut out: Vec<u32> = rules
        .iter()
        .filter(|x| {
            x.get("fwmark").and_then(Value::as_str).and_then(|m| {
                let m = m.split('/').next()?;
                u32::from_str_radix(m.trim_start_matches("0x"), 16).ok()
            }) == Some(mark)
        })
        .filter_map(|x| x.get("table")?.as_str()?.parse().ok())
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// Removes the policy routing of `mark`, whichever tables its rules point at (plus `also`,
/// for a route left without its rule by an interrupted apply), except `keep`. Returns what
/// was removed.
pub fn remove_mark(
    family: Family,
    mark: u32,
    also: Option<u32>,
    keep: Option<Routing>,
    ns: Option<&Netns>,
) -> Result<Vec<Routing>, NetfilterError> {
    let rules = json(&ip(&[fam(family), "-j", "rule", "show"], ns)?.wait()?);
    let mut tables = tables_for_mark(&rules, mark);
    tables.extend(also);
    tables.sort_unstable();
    tables.dedup();
    let mut removed = Vec::new();
    for table in tables {
        let r = Routing { mark, table };
        if Some(r) != keep && remove(family, r, ns)? {
            removed.push(r);
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_iproute2_json() {
        let r = Routing {
            mark: 1337,
            table: 133,
        };
        let rules = json(
            r#"[{"priority":0,"src":"all","table":"local"},{"priority":32765,"src":"all","fwmark":"0x539","table":"133"}]"#,
        );
        assert_eq!(rule_copies(&rules, r), 1);
        assert_eq!(
            rule_copies(
                &rules,
                Routing {
                    mark: 1,
                    table: 133
                }
            ),
            0
        );
        // A rule added twice is two copies: `remove` deletes both.
        let twice = json(
            r#"[{"fwmark":"0x539","table":"133"},{"fwmark":"0x539/0xffffffff","table":"133"}]"#,
        );
        assert_eq!(rule_copies(&twice, r), 2);
        let routes =
            json(r#"[{"type":"local","dst":"default","dev":"lo","scope":"host","flags":[]}]"#);
        assert!(has_route(&routes));
        assert!(!has_route(&json("[]")));
        let mixed = json(
            r#"[{"fwmark":"0x539","table":"133"},{"fwmark":"0x539","table":"77"},{"fwmark":"0x7","table":"9"},{"fwmark":"0x539","table":"main"}]"#,
        );
        assert_eq!(tables_for_mark(&mixed, 1337), [77, 133]);
        assert_eq!(tables_for_mark(&mixed, 8), Vec::<u32>::new());
    }
}
