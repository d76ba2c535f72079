//! Property tests for the parsers that read what others wrote (iptables-save text, the CNI
//! plugin's stdin, TOML config files, `SHUNT_*` variables) and for the render -> parse round
//! trip of every plan the capture options can produce.
//!
//! Nothing here needs root or touches a ruleset: the binary runs with an empty PATH (no
//! iptables to find), and the plugin's `CNI_NETNS` is a plain file (which `Netns::open`
//! refuses before anything else happens), a path that does not exist, or unset.
//!
//! 256 cases per property, a few seconds in all in a debug build; `PROPTEST_CASES=N` asks
//! for more on a longer run. Failures are not persisted to a file: a counter-example found
//! here becomes a plain unit test next to the code it broke (see `rules::tests` and
//! `render::tests`).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

use proptest::collection::{btree_map, vec};
use proptest::prelude::*;
use proptest::sample::{select, Index};
use serde_json::{Map, Value};

use shunt::config::{self, CaptureConfig, ConfigError, RawOptions};
use shunt::netfilter;
use shunt::plan::{self, Plan};
use shunt::render::{join_args, restore_text};
use shunt::rules::{self, Saved};

const SHUNT: &str = env!("CARGO_BIN_EXE_shunt");

fn cases(default: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(default);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// A scratch directory in the target dir: config files, the fake netns, an empty PATH.
fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join("properties");
        std::fs::create_dir_all(d.join("empty-path")).unwrap();
        std::fs::write(d.join("not-a-netns"), "").unwrap();
        d
    })
}

/// A fresh file in [`scratch`] holding `text` (named by process, so two runs can share).
fn scratch_file(text: &[u8]) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let p = scratch().join(format!("{}-{n}.toml", std::process::id()));
    std::fs::write(&p, text).unwrap();
    p
}

/// Arbitrary text as a tool's output reaches shunt: any bytes, read lossily as UTF-8.
fn any_text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        vec(any::<u8>(), 0..512).prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
    ]
}

// === iptables-save text ===

/// A save printed back the way iptables-save and `render::restore_text` spell it.
fn print_saved(saved: &Saved) -> String {
    let mut s = String::new();
    for t in &saved.tables {
        s.push_str(&format!("*{}\n", t.name));
        for (name, policy) in &t.chains {
            s.push_str(&format!(":{name} {policy} [0:0]\n"));
        }
        for r in &t.rules {
            let mut args = vec![r.chain.clone()];
            args.extend(r.args.iter().cloned());
            s.push_str(&format!("-A {}\n", join_args(&args)));
        }
        s.push_str("COMMIT\n");
    }
    s
}

/// Parses `text`; an error must name a line of the input and say what is wrong with it.
fn parse_checked(text: &str) -> Result<Option<Saved>, TestCaseError> {
    match rules::parse(text) {
        Ok(saved) => Ok(Some(saved)),
        Err(e) => {
            let lines = text.lines().count().max(1);
            prop_assert!((1..=lines).contains(&e.line), "{e} (of {lines} lines)");
            prop_assert!(!e.reason.is_empty());
            prop_assert!(e.to_string().starts_with("iptables-save output, line "));
            Ok(None)
        }
    }
}

/// What parsed prints back to text that parses to the same tables, chains and rules.
fn reparses_the_same(saved: &Saved) -> Result<(), TestCaseError> {
    let printed = print_saved(saved);
    let again = rules::parse(&printed)
        .map_err(|e| TestCaseError::fail(format!("{e}; printed:\n{printed}")))?;
    prop_assert_eq!(&again, saved, "printed:\n{}", printed);
    Ok(())
}

/// One argument of a rule line: real ones, names, and quote/escape/space soup.
fn token() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => select(&[
            "-p", "tcp", "udp", "-m", "multiport", "--dports", "80,443", "--dport", "8000:8100",
            "-j", "-g", "--jump", "RETURN", "SHUNT_OUTPUT", "KUBE-SVC", "!", "-s", "-d",
            "10.0.0.0/8", "fd00::/8", "-o", "lo", "--comment", "-A", "[0:0]", "[5:300]",
            "COMMIT", "*nat", ":X", "#", "\"\"", "\"a b\"", "\"\\\"q\\\"\"", "--ctstate",
        ][..])
        .prop_map(String::from),
        2 => "[A-Za-z0-9_-]{1,12}",
        2 => "[ \t\"\\\\a#\\[\\]:*!-]{1,6}",
        1 => "\\PC{0,8}",
    ]
}

fn chain_name() -> impl Strategy<Value = String> {
    prop_oneof![
        select(
            &[
                "PREROUTING",
                "OUTPUT",
                "INPUT",
                "SHUNT_OUTPUT",
                "SHUNT_DNS",
                "KUBE-SVC"
            ][..]
        )
        .prop_map(String::from),
        "SHUNT_[A-Z_]{0,10}",
        "[!-~]{1,12}",
    ]
}

fn table_name() -> impl Strategy<Value = String> {
    prop_oneof![
        select(&["nat", "mangle", "raw", "filter", "security"][..]).prop_map(String::from),
        "[ -~]{0,10}",
    ]
}

/// `-A CHAIN args...` with optional counters; `verbs` are the commands to pick from.
fn rule_line(verbs: &'static [&'static str]) -> impl Strategy<Value = String> {
    (
        prop::option::of("\\[[0-9]{1,4}:[0-9]{1,6}\\]"),
        select(verbs),
        chain_name(),
        vec(token(), 0..10),
    )
        .prop_map(|(counters, verb, chain, args)| {
            let mut parts: Vec<String> = counters.into_iter().collect();
            parts.push(verb.into());
            parts.push(chain);
            parts.extend(args);
            parts.join(" ")
        })
}

/// One line of a save, from its grammar, or noise.
fn save_line() -> impl Strategy<Value = String> {
    prop_oneof![
        2 => table_name().prop_map(|t| format!("*{t}")),
        2 => (chain_name(), select(&["-", "ACCEPT", "DROP", ""][..]), "(\\[[0-9]{1,3}:[0-9]{1,3}\\])?")
            .prop_map(|(c, p, n)| format!(":{c} {p} {n}")),
        5 => rule_line(&["-A", "-A", "-A", "--append", "-I", "-D", ""]),
        2 => Just("COMMIT".to_string()),
        1 => "#[ -~]{0,20}",
        1 => "[ \t]{0,3}",
        1 => any::<String>(),
    ]
}

/// A well-formed save: tables, each with chain declarations and rules, closed by COMMIT.
fn well_formed_save() -> impl Strategy<Value = String> {
    let table = (
        table_name(),
        vec((chain_name(), select(&["-", "ACCEPT", "DROP"][..])), 0..5),
        vec(rule_line(&["-A", "--append"]), 0..12),
    )
        .prop_map(|(name, chains, rules)| {
            let mut s = format!("*{name}\n");
            for (c, p) in chains {
                s.push_str(&format!(":{c} {p} [0:0]\n"));
            }
            for r in rules {
                s.push_str(&r);
                s.push('\n');
            }
            s.push_str("COMMIT\n");
            s
        });
    vec(table, 0..4).prop_map(|t| format!("# Generated by iptables-save v1.8.9\n{}", t.concat()))
}

/// Real saves and renders: the goldens and the explain fixtures (istio, linkerd, mixed).
const SAVES: &[&str] = &[
    include_str!("fixtures/default.rules"),
    include_str!("fixtures/dns-virt-invalid.rules"),
    include_str!("fixtures/exclusions.rules"),
    include_str!("fixtures/tproxy.rules"),
    include_str!("fixtures/explain/istio-style.v4.rules"),
    include_str!("fixtures/explain/istio-style.v6.rules"),
    include_str!("fixtures/explain/legacy-extra.v4.rules"),
    include_str!("fixtures/explain/linkerd-style.v4.rules"),
    include_str!("fixtures/explain/linkerd-style.v6.rules"),
    include_str!("fixtures/explain/mixed.v4.rules"),
];

/// Near misses to mutate as well: a restore script (`-N`, `-I` with positions), which is not
/// a save and which explain reads with a parser of its own.
const SCRIPTS: &[&str] = &[include_str!("fixtures/explain/istio-script.rules")];

#[derive(Debug, Clone)]
enum Mutation {
    DeleteLine(Index),
    DuplicateLine(Index),
    SwapLines(Index, Index),
    InsertLine(Index, String),
    ReplaceToken(Index, Index, String),
    InsertText(Index, String),
    Truncate(Index),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        any::<Index>().prop_map(Mutation::DeleteLine),
        any::<Index>().prop_map(Mutation::DuplicateLine),
        (any::<Index>(), any::<Index>()).prop_map(|(a, b)| Mutation::SwapLines(a, b)),
        (any::<Index>(), save_line()).prop_map(|(i, l)| Mutation::InsertLine(i, l)),
        (any::<Index>(), any::<Index>(), token())
            .prop_map(|(l, t, s)| Mutation::ReplaceToken(l, t, s)),
        (any::<Index>(), "[ \"\\\\\\[:#*-]{1,3}|\\PC{1,3}")
            .prop_map(|(i, s)| Mutation::InsertText(i, s)),
        any::<Index>().prop_map(Mutation::Truncate),
    ]
}

fn mutate(save: &str, mutations: &[Mutation]) -> String {
    let mut lines: Vec<String> = save.lines().map(String::from).collect();
    for m in mutations {
        if lines.is_empty() {
            lines.push(String::new());
        }
        let n = lines.len();
        match m {
            Mutation::DeleteLine(i) => {
                lines.remove(i.index(n));
            }
            Mutation::DuplicateLine(i) => {
                let l = lines[i.index(n)].clone();
                lines.insert(i.index(n), l);
            }
            Mutation::SwapLines(a, b) => lines.swap(a.index(n), b.index(n)),
            Mutation::InsertLine(i, l) => lines.insert(i.index(n + 1), l.clone()),
            Mutation::ReplaceToken(l, t, s) => {
                let line = &mut lines[l.index(n)];
                let mut words: Vec<&str> = line.split(' ').collect();
                let k = t.index(words.len());
                words[k] = s;
                *line = words.join(" ");
            }
            Mutation::InsertText(i, s) => {
                let text = lines.join("\n");
                let at = char_boundary(&text, i);
                lines = format!("{}{s}{}", &text[..at], &text[at..])
                    .split('\n')
                    .map(String::from)
                    .collect();
            }
            Mutation::Truncate(i) => {
                let text = lines.join("\n");
                let at = char_boundary(&text, i);
                lines = text[..at].split('\n').map(String::from).collect();
            }
        }
    }
    lines.join("\n")
}

fn char_boundary(text: &str, i: &Index) -> usize {
    let bounds: Vec<usize> = text
        .char_indices()
        .map(|(b, _)| b)
        .chain([text.len()])
        .collect();
    bounds[i.index(bounds.len())]
}

proptest! {
    #![proptest_config(cases(256))]

    /// Any text, or any bytes read lossily: a value or an error naming a line; never a panic.
    #[test]
    fn save_parser_takes_arbitrary_text(text in any_text()) {
        if let Some(saved) = parse_checked(&text)? {
            reparses_the_same(&saved)?;
        }
    }

    /// Lines from the grammar in any order (tables left open, rules outside tables, quotes).
    #[test]
    fn save_parser_takes_lines_from_the_grammar(lines in vec(save_line(), 0..30), nl in any::<bool>()) {
        let text = lines.join(if nl { "\n" } else { "\r\n" });
        if let Some(saved) = parse_checked(&text)? {
            reparses_the_same(&saved)?;
        }
    }

    /// Well-formed saves with odd tokens parse (unless a quote is left open), and what parsed
    /// prints back to the same tables, chains and rules.
    #[test]
    fn save_parser_reads_well_formed_saves_back(text in well_formed_save()) {
        if let Some(saved) = parse_checked(&text)? {
            reparses_the_same(&saved)?;
        } else {
            prop_assert!(text.contains('"'), "a well-formed save without quotes was refused:\n{}", text);
        }
    }

    /// Real saves, mutated: lines deleted, doubled, swapped, inserted, tokens replaced, text
    /// inserted or cut short.
    #[test]
    fn save_parser_takes_mutated_real_saves(
        save in select([SAVES, SCRIPTS].concat()),
        mutations in vec(mutation(), 1..6),
    ) {
        let text = mutate(save, &mutations);
        if let Some(saved) = parse_checked(&text)? {
            reparses_the_same(&saved)?;
        }
    }
}

/// The unmutated fixtures parse, and print back to themselves.
#[test]
fn real_saves_parse_and_reprint() {
    for save in SAVES {
        let saved = rules::parse(save).unwrap();
        assert!(!saved.tables.is_empty());
        assert_eq!(rules::parse(&print_saved(&saved)).unwrap(), saved);
    }
}

// === render -> parse -> render ===

fn port() -> impl Strategy<Value = u16> {
    prop_oneof![
        1 => select(&[1u16, 22, 53, 80, 443, 15001, 15006, 15053, 65535][..]),
        3 => 1u16..=65535,
    ]
}

fn port_set() -> impl Strategy<Value = String> {
    let item = prop_oneof![
        2 => port().prop_map(|p| p.to_string()),
        1 => (port(), port(), any::<bool>()).prop_map(|(a, b, colon)| {
            let sep = if colon { ":" } else { "-" };
            format!("{}{sep}{}", a.min(b), a.max(b))
        }),
    ];
    prop_oneof![
        1 => Just("*".to_string()),
        1 => Just(String::new()),
        // Up to 24 items: past multiport's 15-port limit, so rules are split.
        4 => (vec(item, 1..24), select(&[",", ", "][..])).prop_map(|(v, sep)| v.join(sep)),
    ]
}

/// A port list without the proxy's own ports as single items (which resolve refuses).
fn without_own_ports(list: &str, own: [u16; 2]) -> String {
    let single = |item: &str| {
        let (a, b) = item.split_once(['-', ':']).unwrap_or((item, item));
        match (a.trim().parse::<u16>(), b.trim().parse::<u16>()) {
            (Ok(a), Ok(b)) if a == b => Some(a),
            _ => None,
        }
    };
    list.split(',')
        .filter(|item| !single(item).is_some_and(|p| own.contains(&p)))
        .collect::<Vec<_>>()
        .join(",")
}

fn ipv4() -> impl Strategy<Value = Ipv4Addr> {
    any::<[u8; 4]>().prop_map(Ipv4Addr::from)
}

/// IPv6 addresses with runs of zero groups (so `::` appears), and v4-mapped ones.
fn ipv6() -> impl Strategy<Value = Ipv6Addr> {
    prop_oneof![
        3 => vec(prop_oneof![Just(0u16), any::<u16>()], 8).prop_map(|g| {
            Ipv6Addr::new(g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7])
        }),
        1 => ipv4().prop_map(|a| a.to_ipv6_mapped()),
    ]
}

fn ip() -> impl Strategy<Value = IpAddr> {
    prop_oneof![ipv4().prop_map(IpAddr::V4), ipv6().prop_map(IpAddr::V6)]
}

fn cidr_set() -> impl Strategy<Value = String> {
    let item = prop_oneof![
        (ipv4(), 0u8..=32).prop_map(|(a, p)| format!("{a}/{p}")),
        (ipv6(), 0u8..=128).prop_map(|(a, p)| format!("{a}/{p}")),
        ip().prop_map(|a| a.to_string()),
    ];
    prop_oneof![
        1 => Just("*".to_string()),
        1 => Just(String::new()),
        4 => vec(item, 1..6).prop_map(|v| v.join(",")),
    ]
}

fn ids() -> impl Strategy<Value = Vec<String>> {
    let item = prop_oneof![
        select(&[0u32, 1337, u32::MAX][..]).prop_map(|i| i.to_string()),
        any::<u32>().prop_map(|i| i.to_string()),
        (any::<u32>(), any::<u32>()).prop_map(|(a, b)| format!("{}-{}", a.min(b), a.max(b))),
    ];
    vec(item, 0..3)
}

/// What `parse_ifaces` accepts: 1-15 bytes, no '/', ',' (the list separator), '"',
/// whitespace or control characters, not "." or "..". Backslashes, '!', '#', '+' included.
fn iface() -> impl Strategy<Value = String> {
    prop_oneof![
        2 => "(eth|veth|lo|ens)[0-9]{0,2}",
        3 => "[!#-+\\-.0-~]{1,15}",
        1 => "[\\p{L}\\p{N}\\p{S}\\p{P}&&[^/,\"]]{1,5}",
    ]
    .prop_filter("a name parse_ifaces accepts", |n| {
        n.len() <= 15 && n != "." && n != ".."
    })
}

fn mark() -> impl Strategy<Value = u32> {
    prop_oneof![Just(1337u32), 1u32..=u32::MAX]
}

/// Valid capture options, as the raw strings a user writes, covering every option that
/// changes the rules; with the IPv6 decision.
fn capture_config() -> impl Strategy<Value = (CaptureConfig, bool)> {
    let ports = (port(), port(), port());
    let sets = (
        port_set(),
        port_set(),
        port_set(),
        port_set(),
        cidr_set(),
        cidr_set(),
    );
    let owners = (ids(), ids());
    let modes = (any::<bool>(), mark(), mark());
    let ifaces = (vec(iface(), 0..3), vec(iface(), 0..3));
    let dns = (
        any::<bool>(),
        any::<bool>(),
        prop::option::of(vec(ip(), 0..4)),
    );
    let flags = (
        any::<bool>(),
        any::<bool>(),
        prop::option::of((-49i32..=49).prop_filter("0 is refused", |n| *n != 0)),
    );
    (ports, sets, owners, modes, ifaces, dns, flags).prop_filter_map(
        "options that resolve",
        |(ports, sets, owners, modes, ifaces, dns, flags)| {
            let (proxy, inbound, dns_port) = ports;
            let (out_ports, ex_out_ports, in_ports, ex_in_ports, out_cidrs, ex_out_cidrs) = sets;
            let (mut uids, gids) = owners;
            let (tproxy, mark, table) = modes;
            let (exclude, mut virt) = ifaces;
            let (redirect_dns, capture_all, servers) = dns;
            let (drop_invalid, ipv6, priority) = flags;
            // Combinations resolve refuses, made valid rather than thrown away.
            if uids.is_empty() && gids.is_empty() {
                uids.push("1337".into());
            }
            virt.retain(|v| !exclude.contains(v));
            let (out_ports, in_ports) = (
                without_own_ports(&out_ports, [proxy, inbound]),
                without_own_ports(&in_ports, [proxy, inbound]),
            );
            if tproxy {
                virt.clear();
            }
            let join = |v: Vec<String>| v.join(",");
            let servers = servers.map(|s| {
                s.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            });
            let raw = RawOptions {
                proxy_port: Some(proxy.to_string()),
                inbound_port: Some(inbound.to_string()),
                proxy_uid: Some(join(uids)),
                proxy_gid: Some(join(gids)),
                mode: Some(if tproxy { "tproxy" } else { "redirect" }.into()),
                tproxy_mark: Some(mark.to_string()),
                tproxy_route_table: Some(table.to_string()),
                outbound_cidrs: Some(out_cidrs),
                exclude_outbound_cidrs: Some(ex_out_cidrs),
                outbound_ports: Some(out_ports),
                exclude_outbound_ports: Some(ex_out_ports),
                inbound_ports: Some(in_ports),
                exclude_inbound_ports: Some(ex_in_ports),
                exclude_interfaces: Some(join(exclude)),
                virt_interfaces: Some(join(virt)),
                redirect_dns: Some(redirect_dns.to_string()),
                capture_all_dns: Some((redirect_dns && capture_all).to_string()),
                dns_port: Some(dns_port.to_string()),
                dns_servers: servers,
                drop_invalid: Some(drop_invalid.to_string()),
                ipv6: Some(if ipv6 { "on" } else { "off" }.into()),
                backend: None,
                netns: None,
                wait: None,
                migrate: None,
                nft_priority_offset: priority.map(|n| n.to_string()),
            };
            // What is still refused (a proxy port listed, two ports equal) is rare.
            raw.resolve().ok().map(|cfg| (cfg, ipv6))
        },
    )
}

/// Each family's restore input parses into the planned view and prints back to itself.
fn plan_reads_back(plan: &Plan) -> Result<(), TestCaseError> {
    for rs in plan.families() {
        let text = restore_text(rs);
        let saved = rules::parse(&text)
            .map_err(|e| TestCaseError::fail(format!("{e}; rendered:\n{text}")))?;
        prop_assert_eq!(
            netfilter::views(&saved),
            netfilter::planned_views(Some(rs)),
            "rendered:\n{}",
            text
        );
        prop_assert_eq!(print_saved(&saved), text);
    }
    Ok(())
}

proptest! {
    #![proptest_config(cases(256))]

    /// For every plan the options can produce, each family's `iptables-restore` input (what
    /// `shunt render` prints, and what `explain` reads back) parses with the iptables-save
    /// parser into exactly the view `apply` and `check` plan for, and prints back to the same
    /// text: so a rendered rule and a read-back one compare equal token by token.
    #[test]
    fn rendered_plans_parse_back_to_the_planned_view((cfg, ipv6) in capture_config()) {
        let plan = plan::build(&cfg, ipv6);
        prop_assert_eq!(plan.v6.is_some(), ipv6);
        plan_reads_back(&plan)?;
    }
}

// === TOML config files and SHUNT_* values ===

/// Values as users write them, near the valid ones: ports, ranges, lists, CIDRs, booleans,
/// modes, numbers out of range, stray separators, other scripts' digits.
fn option_text() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        4 => select(&[
            "80", "443", "0", "65535", "65536", "-1", "+80", "99999999999999999999", "8000-8100",
            "9000-8000", "1:2", "1-", "-", ":", "*", " * ", "", " ", "10.0.0.0/8", "fd00::/8",
            "10.0.0.0/33", "1.2.3.4", "::ffff:1.2.3.4", "fe80::1%eth0", "true", "false", "on",
            "off", "yes", "1", "auto", "redirect", "tproxy", "TPROXY", "nft", "legacy", "eth0",
            "a-very-long-interface0", ".", "..", "a/b", "\u{661}\u{662}", "1337", "4294967295",
            "4294967296", "0x10",
        ][..])
        .prop_map(String::from),
        1 => "\\PC{0,6}",
    ];
    prop_oneof![
        4 => vec(piece, 0..4).prop_map(|p| p.join(",")),
        1 => any::<String>(),
    ]
}

/// A value that `resolve` takes for this option, most of the time (combinations may still
/// conflict).
fn valid_value(key: &str) -> BoxedStrategy<String> {
    let of = |v: &'static [&'static str]| select(v).prop_map(String::from).boxed();
    match key {
        "proxy_port" | "inbound_port" | "dns_port" => port().prop_map(|p| p.to_string()).boxed(),
        "outbound_ports" | "exclude_outbound_ports" | "inbound_ports" | "exclude_inbound_ports" => {
            port_set().boxed()
        }
        "outbound_cidrs" | "exclude_outbound_cidrs" => cidr_set().boxed(),
        "proxy_uid" | "proxy_gid" => ids().prop_map(|v| v.join(",")).boxed(),
        "tproxy_mark" | "tproxy_route_table" => mark().prop_map(|m| m.to_string()).boxed(),
        "exclude_interfaces" | "virt_interfaces" => {
            vec(iface(), 0..3).prop_map(|v| v.join(",")).boxed()
        }
        "dns_servers" => vec(ip(), 0..3)
            .prop_map(|v| {
                let v: Vec<String> = v.iter().map(ToString::to_string).collect();
                v.join(",")
            })
            .boxed(),
        "mode" => of(&["redirect", "tproxy", "TProxy"]),
        "redirect_dns" | "capture_all_dns" | "drop_invalid" => of(&[
            "true", "false", "on", "off", "1", "0", "yes", "no", " True ",
        ]),
        "ipv6" => of(&["on", "off", "auto", "true", "false"]),
        "backend" => of(&["legacy", "nft", "auto"]),
        // Named, never opened: render and resolve only keep the path.
        "netns" => of(&["/run/netns/props-none", "", " "]),
        _ => option_text().boxed(),
    }
}

/// A value for this option: mostly one it takes, else a near miss or anything.
fn option_value(key: &str) -> impl Strategy<Value = String> {
    prop_oneof![3 => valid_value(key), 1 => option_text()]
}

/// Options and values as a layer gives them, keys known or (with `unknown_keys`, now and
/// then) not.
fn layer_entries(unknown_keys: bool) -> impl Strategy<Value = BTreeMap<String, String>> {
    let known = select(RawOptions::KEYS).prop_flat_map(|k| (Just(k.to_string()), option_value(k)));
    let unknown = (
        prop_oneof![
            select(&["proxy_prot", "proxy-port", "name", "type", "log_file_x", ""][..])
                .prop_map(String::from),
            "[a-z_]{1,10}",
        ],
        option_text(),
    );
    let weight = u32::from(unknown_keys);
    vec(prop_oneof![20 => known, weight => unknown], 0..6).prop_map(|kv| kv.into_iter().collect())
}

/// A TOML value as text: strings (escaped as TOML writes them), numbers, booleans, arrays,
/// tables, dates, and bare words that are not TOML at all.
fn toml_value() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        3 => option_text().prop_map(|s| toml::Value::String(s).to_string()),
        1 => any::<i64>().prop_map(|i| i.to_string()),
        1 => any::<f64>().prop_map(|f| toml::Value::Float(f).to_string()),
        1 => any::<bool>().prop_map(|b| b.to_string()),
        1 => Just("1979-05-27T07:32:00Z".to_string()),
        1 => "[a-z0-9.:*-]{0,6}",
    ];
    leaf.prop_recursive(2, 12, 4, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..4).prop_map(|v| format!("[{}]", v.join(", "))),
            vec(("[a-z_]{1,6}", inner), 0..3).prop_map(|kv| {
                let kv: Vec<String> = kv.into_iter().map(|(k, v)| format!("{k} = {v}")).collect();
                format!("{{{}}}", kv.join(", "))
            }),
        ]
    })
}

/// An option's value as a config file writes it: a string, the list as a TOML array
/// (numbers as numbers), or another TOML value.
fn toml_option(value: String) -> impl Strategy<Value = String> {
    let string = toml::Value::String(value.clone()).to_string();
    let items: Vec<toml::Value> = value
        .split(',')
        .map(|i| match i.parse::<i64>() {
            Ok(n) => toml::Value::Integer(n),
            Err(_) => toml::Value::String(i.to_string()),
        })
        .collect();
    let array = toml::Value::Array(items).to_string();
    prop_oneof![6 => Just(string), 2 => Just(array), 1 => toml_value()]
}

/// A config file: mostly options with values, sometimes with a stray table, comment,
/// repeated key or junk line, sometimes not TOML at all.
fn toml_doc() -> impl Strategy<Value = String> {
    let lines = || {
        layer_entries(true).prop_flat_map(|kv| {
            kv.into_iter()
                .map(|(k, v)| toml_option(v).prop_map(move |v| format!("{k} = {v}")))
                .collect::<Vec<_>>()
        })
    };
    let stray = prop_oneof![
        "\\[[a-z_]{0,6}\\]",
        "#[ -~]{0,10}",
        "\\PC{0,10}",
        Just("proxy_port = 1\nproxy_port = 2".to_string()),
    ];
    prop_oneof![
        8 => lines().prop_map(|l| l.join("\n")),
        2 => (lines(), stray, any::<Index>()).prop_map(|(mut l, s, at)| {
            l.insert(at.index(l.len() + 1), s);
            l.join("\n")
        }),
        1 => any_text(),
    ]
}

/// Values for `SHUNT_*` variables.
fn env_layer() -> impl Strategy<Value = BTreeMap<String, String>> {
    layer_entries(false)
}

fn raw_from(values: &BTreeMap<String, String>) -> RawOptions {
    let m: Map<String, Value> = values
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    serde_json::from_value(Value::Object(m)).expect("every key is an option")
}

fn as_map(raw: &RawOptions) -> Map<String, Value> {
    match serde_json::to_value(raw).unwrap() {
        Value::Object(m) => m,
        other => panic!("RawOptions serialized as {other}"),
    }
}

/// A refused configuration names the option, quotes the value as given, and says why; a
/// conflict says which options.
fn config_error_is_clear(e: &ConfigError) -> Result<(), TestCaseError> {
    let text = e.to_string();
    match e {
        ConfigError::Invalid {
            option,
            value: _,
            reason,
        } => {
            prop_assert!(
                RawOptions::KEYS.contains(&option.replace('-', "_").as_str()),
                "{text}"
            );
            prop_assert!(!reason.is_empty(), "{text}");
            prop_assert!(text.contains(&format!("--{option}")), "{text}");
        }
        ConfigError::Conflict(why) => prop_assert!(why.contains("--"), "{text}"),
        ConfigError::File { path, reason } => {
            prop_assert!(!reason.is_empty(), "{text}");
            prop_assert!(text.contains(&path.display().to_string()), "{text}");
        }
        // Only `shunt istio-iptables` raises these (its environment-only settings and the
        // flags it refuses); shunt's own options never do.
        ConfigError::Variable { .. } | ConfigError::Unsupported { .. } => {
            prop_assert!(false, "not an error of shunt's own options: {text}")
        }
    }
    Ok(())
}

/// Resolves the layers `env` over `file`; checks what `layer` kept and, for a refused value,
/// that it is the one given and that `origin_of` names the layer it came from.
fn resolve_layers(env: &RawOptions, file: &RawOptions) -> Result<(), TestCaseError> {
    let merged = env.clone().layer(file.clone());
    let (env_m, file_m, merged_m) = (as_map(env), as_map(file), as_map(&merged));
    for key in RawOptions::KEYS {
        let want = env_m.get(*key).or(file_m.get(*key));
        prop_assert_eq!(
            merged_m.get(*key),
            want,
            "layer chose the wrong value for {}",
            key
        );
    }
    match merged.resolve() {
        // Every plan the layers produce reads back too.
        Ok(cfg) => plan_reads_back(&plan::build(&cfg, true))?,
        Err(e) => {
            config_error_is_clear(&e)?;
            if let ConfigError::Invalid { option, value, .. } = &e {
                let key = option.replace('-', "_");
                let given = merged_m.get(&key).and_then(Value::as_str);
                prop_assert_eq!(given, Some(value.as_str()), "{}", e);
                let var = format!("SHUNT_{}", key.to_ascii_uppercase());
                let env_value = env_m.get(&key).and_then(Value::as_str).map(String::from);
                let lookup = |k: &str| (k == var).then(|| env_value.clone()).flatten();
                let args = [OsString::from("shunt"), OsString::from("render")];
                let origin = config::origin_of(option, &args, lookup).unwrap_or_default();
                let from = if env_m.contains_key(&key) {
                    format!("environment: {var}=")
                } else {
                    format!("config file's `{key}` key")
                };
                prop_assert!(origin.contains(&from), "{} / {}", e, origin);
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(cases(256))]

    /// Any config file, structured or not: `read_file` gives options or an error naming the
    /// file; the options resolve or are refused clearly, never a panic.
    #[test]
    fn config_files_read_or_are_refused(doc in toml_doc()) {
        let path = scratch_file(doc.as_bytes());
        let read = config::read_file(&path);
        let _ = std::fs::remove_file(&path);
        match read {
            Ok(file) => resolve_layers(&RawOptions::default(), &file)?,
            Err(e) => {
                prop_assert!(matches!(&e, ConfigError::File { path: p, .. } if *p == path), "{e}");
                config_error_is_clear(&e)?;
            }
        }
    }

    /// `SHUNT_*` values over a file's values: the higher layer wins key by key, and a refused
    /// value is the one given, attributed to the variable or the file key it came from.
    #[test]
    fn env_values_layer_over_the_file(env in env_layer(), file in env_layer()) {
        resolve_layers(&raw_from(&env), &raw_from(&file))?;
    }
}

/// `shunt render --config FILE` with `env` set and nothing else.
fn render_with(file: &str, env: &[(String, Vec<u8>)]) -> Output {
    let path = scratch_file(file.as_bytes());
    let mut cmd = Command::new(SHUNT);
    cmd.env_clear()
        .env("PATH", scratch().join("empty-path"))
        .current_dir(scratch())
        .args(["render", "--config"])
        .arg(&path)
        .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, OsString::from_vec(v.clone()));
    }
    let out = cmd.output().unwrap();
    let _ = std::fs::remove_file(&path);
    out
}

proptest! {
    #![proptest_config(cases(256))]

    /// `shunt render` with a config file and `SHUNT_*` variables (clap reads them, then the
    /// layers resolve): the rules, or exit 2 and a message naming the problem and, for a
    /// refused value, the variable or file key it came from; never a panic.
    #[test]
    fn render_takes_any_env_and_file(
        doc in toml_doc(),
        env in env_layer(),
        raw_bytes in prop::option::weighted(0.05, (select(RawOptions::KEYS), vec(1u8..=255, 0..12))),
    ) {
        let mut env: BTreeMap<String, Vec<u8>> = env
            .into_iter()
            .map(|(k, v)| (k, v.into_bytes()))
            .collect();
        // Now and then a value that is not UTF-8 at all, which clap refuses.
        if let Some((k, v)) = raw_bytes {
            env.insert(k.to_string(), v);
        }
        let env: Vec<(String, Vec<u8>)> = env
            .into_iter()
            // The environment cannot carry NUL.
            .map(|(k, v)| (format!("SHUNT_{}", k.to_ascii_uppercase()), v.into_iter().filter(|b| *b != 0).collect()))
            .collect();
        let out = render_with(&doc, &env);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        prop_assert!(!stderr.contains("panicked"), "{}", stderr);
        match out.status.code() {
            Some(0) => prop_assert!(stdout.starts_with("# IPv4 rules"), "{}", stdout),
            Some(2) => {
                prop_assert!(stdout.is_empty(), "{}", stdout);
                prop_assert!(
                    ["invalid value", "conflicting options", "cannot read config file", "error:"]
                        .iter()
                        .any(|n| stderr.contains(n)),
                    "{}",
                    stderr
                );
                // `invalid value '..' for --OPTION: ..`, then where the value came from.
                let refused = stderr
                    .split_once("' for --")
                    .and_then(|(_, rest)| rest.split_once(':'))
                    .map(|(option, _)| option.replace('-', "_"));
                if let Some(key) = refused {
                    let var = format!("SHUNT_{}", key.to_ascii_uppercase());
                    let from = if env.iter().any(|(k, _)| *k == var) {
                        format!("the value comes from the environment: {var}=")
                    } else {
                        format!("the value comes from the config file's `{key}` key")
                    };
                    prop_assert!(stderr.contains(&from), "{} should say {}", stderr, from);
                }
            }
            other => prop_assert!(false, "exit {:?}: {}", other, stderr),
        }
    }
}

// === CNI plugin stdin ===

/// Runs the plugin as a runtime would, but where it can change nothing: no iptables on PATH,
/// and `CNI_NETNS` a plain file, a path that does not exist, or unset.
fn plugin(command: &str, stdin: &[u8], cni_args: &str, netns: NetnsVar) -> Output {
    let mut cmd = Command::new(SHUNT);
    cmd.env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", "props");
    match netns {
        NetnsVar::PlainFile => cmd.env("CNI_NETNS", scratch().join("not-a-netns")),
        NetnsVar::Gone => cmd.env("CNI_NETNS", scratch().join("gone")),
        NetnsVar::Unset => &mut cmd,
    };
    cmd.env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", scratch().join("empty-path"))
        .env("CNI_ARGS", cni_args)
        .env("PATH", scratch().join("empty-path"))
        .current_dir(scratch());
    shunt_output(&mut cmd, stdin)
}

fn shunt_output(cmd: &mut Command, input: &[u8]) -> Output {
    use std::io::Write;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A plugin that exits without reading everything closes the pipe; its output says why.
    let _ = child.stdin.take().unwrap().write_all(input);
    child.wait_with_output().unwrap()
}

/// Success prints nothing or one JSON value; failure is exit 1 with CNI's error JSON.
fn plugin_answered(out: &Output) -> Result<(), TestCaseError> {
    let stderr = String::from_utf8_lossy(&out.stderr);
    prop_assert!(!stderr.contains("panicked"), "{}", stderr);
    match out.status.code() {
        Some(0) => {
            if !out.stdout.is_empty() {
                let v = serde_json::from_slice::<Value>(&out.stdout);
                prop_assert!(v.is_ok(), "{}", String::from_utf8_lossy(&out.stdout));
            }
        }
        Some(1) => {
            let v: Value = serde_json::from_slice(&out.stdout).map_err(|e| {
                TestCaseError::fail(format!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
            })?;
            prop_assert!(v["code"].as_u64().is_some(), "{}", v);
            prop_assert!(v["msg"].as_str().is_some_and(|m| !m.is_empty()), "{}", v);
            prop_assert!(v["cniVersion"].is_string(), "{}", v);
        }
        other => prop_assert!(false, "exit {:?}: {}", other, stderr),
    }
    Ok(())
}

#[derive(Debug, Clone, Copy)]
enum NetnsVar {
    PlainFile,
    Gone,
    Unset,
}

fn netns_var() -> impl Strategy<Value = NetnsVar> {
    prop_oneof![
        6 => Just(NetnsVar::PlainFile),
        1 => Just(NetnsVar::Gone),
        1 => Just(NetnsVar::Unset),
    ]
}

fn cni_command() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => select(&["ADD", "ADD", "CHECK", "DEL", "VERSION", "STATUS", "GC"][..])
            .prop_map(String::from),
        1 => "[A-Za-z]{0,6}",
    ]
}

fn cni_args() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        "(IgnoreUnknown=1;)?K8S_POD_NAMESPACE=[a-z-]{0,10};K8S_POD_NAME=[a-z0-9-]{0,8}",
        select(
            &[
                "K8S_POD_NAMESPACE=kube-system",
                "=;=;",
                ";;",
                "K8S_POD_NAMESPACE"
            ][..]
        )
        .prop_map(String::from),
        "[ -~]{0,20}",
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        option_text().prop_map(Value::from),
    ];
    leaf.prop_recursive(2, 12, 4, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..4).prop_map(Value::Array),
            btree_map("[a-zA-Z_.-]{0,8}", inner, 0..3)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A capture option's value as CNI JSON carries it: a string, the list as an array (numbers
/// as numbers), a number, or junk.
fn option_json(key: &'static str) -> impl Strategy<Value = Value> {
    let as_array = |v: String| {
        Value::Array(
            v.split(',')
                .map(|i| match i.parse::<i64>() {
                    Ok(n) => Value::from(n),
                    Err(_) => Value::from(i),
                })
                .collect(),
        )
    };
    prop_oneof![
        5 => option_value(key).prop_map(Value::from),
        2 => option_value(key).prop_map(as_array),
        1 => any::<i64>().prop_map(Value::from),
        1 => any::<bool>().prop_map(Value::from),
        1 => json_value(),
    ]
}

/// Mostly `good`, one time in ten `odd`: a near-valid input is wrong in few places at once,
/// so most cases get past decoding to the checks behind it.
fn mostly<T: std::fmt::Debug>(
    good: impl Strategy<Value = T>,
    odd: impl Strategy<Value = T>,
) -> impl Strategy<Value = T> {
    prop_oneof![9 => good, 1 => odd]
}

/// A near-valid network configuration: CNI's keys (now and then missing or of the wrong
/// type), capture options, pod annotations, skip lists, log level. Never `log_file`: the
/// plugin would create that file.
fn net_conf() -> impl Strategy<Value = Value> {
    let version = mostly(
        select(&["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"][..]).prop_map(Value::from),
        prop_oneof![
            select(&["0.2.0", "", "2.0.0", "1.0"][..]).prop_map(Value::from),
            json_value(),
        ],
    );
    let prev = mostly(
        Just(serde_json::json!({
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/x"}],
            "ips": [{"address": "10.1.0.5/24", "interface": 0}],
        })),
        json_value(),
    );
    let option_annotation = select(RawOptions::KEYS).prop_flat_map(|k| {
        (
            Just(format!("shunt.dev/{}", k.replace('_', "-"))),
            mostly(option_value(k).prop_map(Value::from), json_value()),
        )
    });
    let other_annotation = (
        select(
            &[
                "shunt.dev/inject",
                "shunt.dev/",
                "shunt.dev/proxy_port",
                "other",
            ][..],
        )
        .prop_map(String::from),
        prop_oneof![
            select(&["false", "disabled", "true"][..]).prop_map(Value::from),
            option_text().prop_map(Value::from),
        ],
    );
    let annotation = mostly(option_annotation, other_annotation);
    let runtime = mostly(
        vec(annotation, 0..4).prop_map(|a| {
            let a: Map<String, Value> = a.into_iter().collect();
            serde_json::json!({ "io.kubernetes.cri.pod-annotations": a })
        }),
        json_value(),
    );
    let skip = mostly(
        vec("[a-z-]{0,10}", 0..3).prop_map(|v| serde_json::json!(v)),
        json_value(),
    );
    let log_level = mostly(
        prop_oneof![
            select(&["info", "debug", "warn,shunt=trace", ""][..]).prop_map(Value::from),
            option_text().prop_map(Value::from),
        ],
        json_value(),
    );
    let entry = prop_oneof![
        12 => select(RawOptions::KEYS).prop_flat_map(|k| (Just(k.to_string()), option_json(k))),
        1 => ("[a-z_]{1,10}", option_json("")),
        1 => (
            select(&["type", "capabilities", "args", "dns", "name"][..]).prop_map(String::from),
            json_value(),
        ),
    ];
    (
        prop::option::weighted(0.95, version),
        prop::option::weighted(0.9, prev),
        prop::option::of(runtime),
        prop::option::weighted(0.3, skip),
        prop::option::weighted(0.3, log_level),
        vec(entry, 0..6),
    )
        .prop_map(|(version, prev, runtime, skip, log_level, entries)| {
            let mut m = Map::new();
            m.insert("name".into(), "props".into());
            m.insert("type".into(), "shunt".into());
            for (k, v) in entries {
                m.insert(k, v);
            }
            let optional = [
                ("cniVersion", version),
                ("prevResult", prev),
                ("runtimeConfig", runtime),
                ("skip_namespaces", skip),
                ("log_level", log_level),
            ];
            for (k, v) in optional {
                if let Some(v) = v {
                    m.insert(k.into(), v);
                }
            }
            m.remove("log_file");
            Value::Object(m)
        })
}

/// Bytes on stdin: anything, or a near-valid configuration cut short or with a byte changed.
fn cni_stdin_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        1 => vec(any::<u8>(), 0..256),
        2 => (net_conf(), any::<Index>(), any::<Option<u8>>()).prop_map(|(conf, at, byte)| {
            let mut b = serde_json::to_vec(&conf).unwrap();
            let i = at.index(b.len() + 1);
            match byte {
                Some(x) if i < b.len() => b[i] = x,
                _ => b.truncate(i),
            }
            b
        }),
    ]
}

proptest! {
    #![proptest_config(cases(256))]

    /// The plugin's stdin as bytes: a decode error (CNI code 6) or an answer; never a panic.
    #[test]
    fn cni_plugin_takes_arbitrary_stdin(
        command in cni_command(),
        stdin in cni_stdin_bytes(),
        args in cni_args(),
        netns in netns_var(),
    ) {
        plugin_answered(&plugin(&command, &stdin, &args, netns))?;
    }

    /// Near-valid network configurations through every command: an answer, or CNI's error
    /// JSON with a code and a message; never a panic.
    #[test]
    fn cni_plugin_takes_near_valid_configs(
        command in cni_command(),
        conf in net_conf(),
        args in cni_args(),
        netns in netns_var(),
    ) {
        let stdin = serde_json::to_vec(&conf).unwrap();
        plugin_answered(&plugin(&command, &stdin, &args, netns))?;
    }
}
