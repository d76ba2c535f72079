//! The evaluator without root: rules as text, a host as `ip -j` JSON, packets as values.

use shunt::explain::{
    explain, host_from_json, matches::CtState, Direction, Explanation, Host, Proto, Query, Tables,
    Verdict,
};

fn tables(text: &str) -> Tables {
    Tables::from_saved(&shunt::rules::parse(text).unwrap())
}

/// A pod: lo, eth0 10.0.0.2/24 (default via 10.0.0.1), fd00::2/64.
fn host() -> Host {
    let addrs = serde_json::json!([
        {"ifname": "lo", "addr_info": [
            {"family": "inet", "local": "127.0.0.1", "prefixlen": 8, "scope": "host"},
            {"family": "inet6", "local": "::1", "prefixlen": 128, "scope": "host"}]},
        {"ifname": "eth0", "addr_info": [
            {"family": "inet", "local": "10.0.0.2", "prefixlen": 24, "scope": "global"},
            {"family": "inet6", "local": "fd00::2", "prefixlen": 64, "scope": "global"}]}
    ]);
    let r4 = serde_json::json!([
        {"dst": "default", "gateway": "10.0.0.1", "dev": "eth0"},
        {"dst": "10.0.0.0/24", "dev": "eth0", "prefsrc": "10.0.0.2"},
        {"type": "local", "dst": "127.0.0.0/8", "dev": "lo", "table": "local"},
        {"type": "local", "dst": "10.0.0.2", "dev": "eth0", "table": "local"},
        {"type": "broadcast", "dst": "10.0.0.255", "dev": "eth0", "table": "local"}
    ]);
    let r6 = serde_json::json!([
        {"dst": "fd00::/64", "dev": "eth0"},
        {"dst": "default", "gateway": "fd00::1", "dev": "eth0"},
        {"type": "local", "dst": "::1", "dev": "lo", "table": "local"},
        {"type": "local", "dst": "fd00::2", "dev": "eth0", "table": "local"}
    ]);
    host_from_json(&addrs, &r4, &r6)
}

fn out(dst: &str, uid: u32) -> Query {
    let mut q = Query::new(Direction::Out, Proto::Tcp, dst.parse().unwrap());
    q.uid = Some(uid);
    q.gid = Some(uid);
    q
}

fn run(rules: &str, q: &Query) -> Explanation {
    explain(&tables(rules), &host(), q)
}

/// (verdict, to_port) as a short string for compact assertions.
fn v(e: &Explanation) -> String {
    match (e.verdict, e.to_port, &e.to_addr) {
        (Verdict::Redirect, Some(p), _) => format!("redirect:{p}"),
        (Verdict::Tproxy, Some(p), _) => format!("tproxy:{p}"),
        (Verdict::Dnat, _, Some(a)) => format!("dnat:{a}"),
        (v, _, _) => format!("{v:?}").to_lowercase(),
    }
}

const SHUNT_LIKE: &str = "*nat
:SHUNT_OUTPUT - [0:0]
:SHUNT_REDIRECT - [0:0]
:SHUNT_INBOUND - [0:0]
-A PREROUTING -p tcp -j SHUNT_INBOUND
-A OUTPUT -p tcp -j SHUNT_OUTPUT
-A SHUNT_INBOUND -p tcp -m multiport --dports 15001,15006 -j RETURN
-A SHUNT_INBOUND -p tcp -m tcp ! --dport 9090 -j REDIRECT --to-ports 15006
-A SHUNT_OUTPUT -s 127.0.0.6/32 -o lo -j RETURN
-A SHUNT_OUTPUT ! -d 127.0.0.0/8 -o lo -m owner --uid-owner 1337 -j SHUNT_INBOUND
-A SHUNT_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A SHUNT_OUTPUT -o lo -j RETURN
-A SHUNT_OUTPUT -d 10.96.0.0/12 -p tcp -j RETURN
-A SHUNT_OUTPUT -p tcp -m multiport --dports 22,8000:8100 -j RETURN
-A SHUNT_OUTPUT -p tcp -j SHUNT_REDIRECT
-A SHUNT_REDIRECT -p tcp -j REDIRECT --to-ports 15001
COMMIT
";

#[test]
fn shunt_like_rules_and_negations() {
    let e = run(SHUNT_LIKE, &out("10.1.0.5:80", 1000));
    assert_eq!(v(&e), "redirect:15001");
    assert_eq!(e.original_dst, "10.1.0.5:80");
    // The path names table, chain and 1-based position of every rule that matched.
    let path: Vec<(String, usize)> = e
        .trace
        .iter()
        .map(|s| (s.chain.clone(), s.index.unwrap()))
        .collect();
    assert_eq!(
        path,
        [
            ("OUTPUT".into(), 1),
            ("SHUNT_OUTPUT".into(), 7),
            ("SHUNT_REDIRECT".into(), 1)
        ]
    );
    assert!(e.uncertain.is_empty());
    assert_eq!(e.packet.src.as_deref(), Some("10.0.0.2"));
    assert_eq!(e.packet.oif.as_deref(), Some("eth0"));

    // Owner: the proxy uid is not captured; a uid range; negations.
    assert_eq!(v(&run(SHUNT_LIKE, &out("10.1.0.5:80", 1337))), "accept");
    // Loopback and the pod's own address leave through lo: not captured.
    assert_eq!(v(&run(SHUNT_LIKE, &out("127.0.0.1:80", 1000))), "accept");
    let own = run(SHUNT_LIKE, &out("10.0.0.2:80", 1000));
    assert_eq!(v(&own), "accept");
    assert_eq!(own.packet.oif.as_deref(), Some("lo"));
    assert_eq!(own.delivery, "local");
    // The proxy calling the pod's own address takes the inbound path (jump into PREROUTING's
    // chain from OUTPUT), but port 9090 is excluded there by a negated --dport.
    assert_eq!(
        v(&run(SHUNT_LIKE, &out("10.0.0.2:8080", 1337))),
        "redirect:15006"
    );
    assert_eq!(v(&run(SHUNT_LIKE, &out("10.0.0.2:9090", 1337))), "accept");
    // -d CIDR and multiport ranges.
    assert_eq!(v(&run(SHUNT_LIKE, &out("10.100.0.1:443", 1000))), "accept");
    assert_eq!(v(&run(SHUNT_LIKE, &out("10.1.0.5:8050", 1000))), "accept");
    assert_eq!(
        v(&run(SHUNT_LIKE, &out("10.1.0.5:8101", 1000))),
        "redirect:15001"
    );
    // The proxy's inbound leg from 127.0.0.6.
    let mut q = out("10.0.0.2:8080", 1337);
    q.src = Some("127.0.0.6".parse().unwrap());
    assert_eq!(v(&run(SHUNT_LIKE, &q)), "accept");
    // Inbound from another host.
    let mut q = Query::new(Direction::In, Proto::Tcp, "10.0.0.2:8080".parse().unwrap());
    q.src = Some("10.0.0.1".parse().unwrap());
    let e = run(SHUNT_LIKE, &q);
    assert_eq!(v(&e), "redirect:15006");
    assert_eq!(e.packet.iif.as_deref(), Some("eth0"));
    q.dst = "10.0.0.2:9090".parse().unwrap();
    assert_eq!(v(&run(SHUNT_LIKE, &q)), "accept");
    // UDP is untouched by -p tcp rules.
    let mut q = out("10.1.0.5:53", 1000);
    q.proto = Proto::Udp;
    assert_eq!(v(&run(SHUNT_LIKE, &q)), "accept");
}

#[test]
fn nat_sees_only_the_first_packet() {
    let mut q = out("10.1.0.5:80", 1000);
    q.ctstate = CtState::Established;
    let e = run(SHUNT_LIKE, &q);
    assert_eq!(v(&e), "accept");
    assert!(e.trace.is_empty());
    assert!(e.notes.iter().any(|n| n.contains("only the first packet")));
    // CT --notrack in raw: nat never sees the connection.
    let rules = format!("*raw\n-A OUTPUT -p tcp --dport 80 -j CT --notrack\nCOMMIT\n{SHUNT_LIKE}");
    assert_eq!(v(&run(&rules, &out("10.1.0.5:80", 1000))), "accept");
    assert_eq!(v(&run(&rules, &out("10.1.0.5:81", 1000))), "redirect:15001");
}

#[test]
fn jumps_gotos_returns_and_policies() {
    let rules = "*filter
:INPUT ACCEPT [0:0]
:OUTPUT DROP [0:0]
:A - [0:0]
:B - [0:0]
:C - [0:0]
-A OUTPUT -p tcp --dport 1 -j A
-A OUTPUT -p tcp --dport 2 -j ACCEPT
-A OUTPUT -p tcp --dport 3 -g B
-A OUTPUT -p tcp --dport 3 -j ACCEPT
-A OUTPUT -p tcp --dport 4 -j A
-A OUTPUT -p tcp --dport 4 -j REJECT --reject-with tcp-reset
-A A -p tcp --dport 1 -j RETURN
-A A -j C
-A A -j DROP
-A C -p tcp --dport 4 -j RETURN
-A C -j ACCEPT
-A B -j RETURN
-A B -j ACCEPT
COMMIT
";
    // RETURN from A back to OUTPUT, which ends: the policy (DROP) decides.
    let e = run(rules, &out("10.1.0.5:1", 0));
    assert_eq!(v(&e), "drop");
    assert_eq!(e.trace.last().unwrap().rule, "policy DROP");
    assert_eq!(e.trace.last().unwrap().index, None);
    assert_eq!(v(&run(rules, &out("10.1.0.5:2", 0))), "accept");
    // -g B then RETURN in B returns past OUTPUT's rule 4 to the end of OUTPUT: the policy.
    assert_eq!(v(&run(rules, &out("10.1.0.5:3", 0))), "drop");
    // Nested jumps: OUTPUT -> A -> C (RETURN) -> A's DROP.
    assert_eq!(v(&run(rules, &out("10.1.0.5:4", 0))), "drop");
    // Loopback delivery passes filter INPUT (policy ACCEPT) after OUTPUT.
    let reject_in = "*filter\n-A INPUT -i lo -p tcp --dport 7 -j REJECT\nCOMMIT\n";
    assert_eq!(v(&run(reject_in, &out("127.0.0.1:7", 0))), "reject");
    assert_eq!(v(&run(reject_in, &out("10.1.0.5:7", 0))), "accept");
}

#[test]
fn filter_sees_the_translated_destination() {
    let rules = format!(
        "{SHUNT_LIKE}*filter\n-A OUTPUT -d 127.0.0.1/32 -p tcp --dport 15001 -m conntrack --ctstate DNAT -j REJECT\nCOMMIT\n"
    );
    assert_eq!(v(&run(&rules, &out("10.1.0.5:80", 1000))), "reject");
    let dnat = "*nat\n-A OUTPUT -d 10.1.0.5/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 10.0.0.2:8080\nCOMMIT\n";
    let e = run(dnat, &out("10.1.0.5:80", 1000));
    assert_eq!(v(&e), "dnat:10.0.0.2:8080");
    assert_eq!(e.delivery, "local");
}

#[test]
fn marks_connmarks_states_and_address_types() {
    let rules = "*mangle
-A OUTPUT -p tcp --dport 9000 -j MARK --set-xmark 0x7/0xffffffff
-A OUTPUT -j CONNMARK --save-mark --nfmask 0xffffffff --ctmask 0xffffffff
COMMIT
*nat
-A OUTPUT -m mark --mark 0x7 -p tcp --dport 9000 -j RETURN
-A OUTPUT -m connmark --mark 0x7/0xff -j RETURN
-A OUTPUT -m addrtype --dst-type LOCAL -j RETURN
-A OUTPUT -m addrtype ! --dst-type UNICAST -j RETURN
-A OUTPUT -m conntrack ! --ctstate NEW -j RETURN
-A OUTPUT -p tcp -m comment --comment \"send it on\" -j REDIRECT --to-ports 15001
COMMIT
";
    let e = run(rules, &out("10.1.0.5:9000", 1000));
    assert_eq!(v(&e), "accept");
    assert_eq!(e.trace.last().unwrap().chain, "OUTPUT");
    assert_eq!(e.trace.last().unwrap().index, Some(1));
    assert_eq!(v(&run(rules, &out("10.0.0.2:80", 1000))), "accept");
    assert_eq!(v(&run(rules, &out("10.0.0.255:80", 1000))), "accept");
    assert_eq!(v(&run(rules, &out("10.1.0.5:80", 1000))), "redirect:15001");
    // A mark given on the command line.
    let mut q = out("10.1.0.5:80", 1000);
    q.mark = 7;
    assert_eq!(v(&run(rules, &q)), "accept");
    // In raw, conntrack has not run yet: every packet is INVALID there.
    let raw = "*raw\n-A OUTPUT -m conntrack --ctstate INVALID -j DROP\nCOMMIT\n";
    assert_eq!(v(&run(raw, &out("10.1.0.5:80", 1000))), "drop");
}

#[test]
fn owner_matches_without_a_socket_and_names() {
    // Inbound packets have no local socket: only fully negated owner matches match.
    let rules = "*nat
-A POSTROUTING -m owner ! --uid-owner 5 -j SNAT --to-source 10.0.0.2
COMMIT
*mangle
-A PREROUTING -p tcp -m owner --uid-owner root -j DROP
COMMIT
";
    let mut q = Query::new(Direction::In, Proto::Tcp, "10.0.0.2:80".parse().unwrap());
    q.src = Some("10.0.0.1".parse().unwrap());
    assert_eq!(v(&run(rules, &q)), "accept");
    let ranges = "*nat\n-A OUTPUT -m owner --uid-owner 1000-1999 ! --gid-owner 5 -p tcp -j REDIRECT --to-ports 1\nCOMMIT\n";
    assert_eq!(v(&run(ranges, &out("10.1.0.5:80", 1500))), "redirect:1");
    assert_eq!(v(&run(ranges, &out("10.1.0.5:80", 2000))), "accept");
    let mut q = out("10.1.0.5:80", 1500);
    q.gid = Some(5);
    assert_eq!(v(&run(ranges, &q)), "accept");
}

#[test]
fn uncertain_matches_are_reported_never_guessed() {
    let rules = "*nat
-A OUTPUT -m set --match-set blocked dst -j RETURN
-A OUTPUT -p tcp -j REDIRECT --to-ports 15001
COMMIT
";
    let e = run(rules, &out("10.1.0.5:80", 1000));
    assert_eq!(e.verdict, Verdict::Unknown);
    assert_eq!(e.to_port, None);
    assert_eq!(e.uncertain.len(), 1);
    assert_eq!(e.uncertain[0].step.index, Some(1));
    assert!(e.uncertain[0]
        .reason
        .contains("-m set --match-set blocked dst"));
    assert_eq!(e.possible.len(), 2);
    // An uncertain rule that cannot change the outcome (a LOG) leaves the verdict certain,
    // and is still reported.
    let log = "*nat
-A OUTPUT -m statistic --mode random --probability 0.5 -j LOG
-A OUTPUT -p tcp -j REDIRECT --to-ports 15001
COMMIT
";
    let e = run(log, &out("10.1.0.5:80", 1000));
    assert_eq!(v(&e), "redirect:15001");
    assert_eq!(e.uncertain.len(), 1);
    // An unknown uid makes owner matches uncertain.
    let mut q = out("10.1.0.5:80", 0);
    q.uid = None;
    q.gid = None;
    let e = run(SHUNT_LIKE, &q);
    assert_eq!(e.verdict, Verdict::Unknown);
    assert!(e.uncertain.iter().any(|u| u.reason.contains("--uid")));
    // A target it cannot model, and a jump to a chain that does not exist.
    let q = out("10.1.0.5:80", 1000);
    let e = run("*mangle\n-A OUTPUT -j NFQUEUE --queue-num 3\nCOMMIT\n", &q);
    assert_eq!(e.verdict, Verdict::Unknown);
    let e = run("*filter\n-A OUTPUT -j NO_SUCH_CHAIN\nCOMMIT\n", &q);
    assert_eq!(e.verdict, Verdict::Unknown);
    assert!(e.notes.iter().any(|n| n.contains("NO_SUCH_CHAIN")));
    // Without any knowledge of the namespace, -o lo on a non-loopback address is uncertain.
    let e = explain(
        &tables(SHUNT_LIKE),
        &Host::default(),
        &out("10.1.0.5:80", 1000),
    );
    assert_eq!(e.verdict, Verdict::Unknown);
    assert!(e.uncertain.iter().any(|u| u.reason.contains("interface")));
}

#[test]
fn tproxy_and_ipv6() {
    let rules = "*mangle
:SHUNT_TPROXY - [0:0]
-A PREROUTING -p tcp -j SHUNT_TPROXY
-A SHUNT_TPROXY -p tcp -m tcp --dport 22 -j RETURN
-A SHUNT_TPROXY -p tcp -j TPROXY --on-port 15006 --on-ip 0.0.0.0 --tproxy-mark 0x1/0x1
COMMIT
";
    let mut q = Query::new(Direction::In, Proto::Tcp, "10.0.0.2:80".parse().unwrap());
    q.src = Some("10.0.0.1".parse().unwrap());
    assert_eq!(v(&run(rules, &q)), "tproxy:15006");
    q.dst = "10.0.0.2:22".parse().unwrap();
    assert_eq!(v(&run(rules, &q)), "accept");
    let v6 = SHUNT_LIKE
        .replace("127.0.0.6/32", "::6/128")
        .replace("127.0.0.0/8", "::1/128")
        .replace("10.96.0.0/12", "fd00:96::/64");
    let e = run(&v6, &out("[fd00:1::5]:80", 1000));
    assert_eq!(v(&e), "redirect:15001");
    assert_eq!(e.packet.src.as_deref(), Some("fd00::2"));
    assert_eq!(v(&run(&v6, &out("[fd00::2]:80", 1000))), "accept");
    assert_eq!(v(&run(&v6, &out("[fd00:96::1]:80", 1000))), "accept");
}

#[test]
fn reports_render() {
    let e = run(SHUNT_LIKE, &out("10.1.0.5:80", 1000));
    let text = shunt::explain::report::text(&e);
    assert!(
        text.starts_with("verdict: redirected to :15001 (original destination 10.1.0.5:80)"),
        "{text}"
    );
    assert!(text.contains("SHUNT_OUTPUT#7"), "{text}");
    let m = shunt::explain::report::mermaid(&e);
    assert!(m.starts_with("flowchart TD\n"), "{m}");
    assert!(m.contains("subgraph h1 [\"OUTPUT hook\"]"), "{m}");
    assert!(m.contains("--> verdict"), "{m}");
    let json = serde_json::to_value(&e).unwrap();
    assert_eq!(json["verdict"], "redirect");
    assert_eq!(json["to_port"], 15001);
    assert_eq!(json["trace"][1]["table"], "nat");
    assert_eq!(json["trace"][1]["chain"], "SHUNT_OUTPUT");
    assert_eq!(json["trace"][1]["index"], 7);
}

#[test]
fn two_backends_are_both_run_and_their_order_is_not_guessed() {
    use shunt::explain::{explain_loaded, Loaded};
    let nft = "*nat\n-A OUTPUT -p tcp -j REDIRECT --to-ports 15001\nCOMMIT\n";
    let legacy_filter = "*filter\n-A OUTPUT -p tcp --dport 22 -j REJECT\nCOMMIT\n";
    let legacy_nat = "*nat\n-A OUTPUT -p tcp --dport 9090 -j REDIRECT --to-ports 16001\nCOMMIT\n";
    let loaded = |a: &str, b: &str| Loaded {
        tables: tables(a).labelled("nft").then(tables(b).labelled("legacy")),
        host: host(),
        source: "test".into(),
        notes: vec![],
    };
    // The legacy filter sees the destination after nft's nat: 22 became 15001.
    let l = loaded(nft, legacy_filter);
    let e = explain_loaded(&l, &out("10.1.0.5:22", 1000));
    assert_eq!(v(&e), "redirect:15001");
    assert!(e.notes.iter().any(|n| n.contains("either order")));
    assert_eq!(e.trace[0].backend.as_deref(), Some("nft"));
    // Two nat tables translating the same connection: the first to run wins, and which one
    // runs first is not visible, so the verdict is unknown with both outcomes listed.
    let l = loaded(nft, legacy_nat);
    let e = explain_loaded(&l, &out("10.1.0.5:9090", 1000));
    assert_eq!(e.verdict, Verdict::Unknown);
    let ports: Vec<Option<u16>> = e.possible.iter().map(|o| o.to_port).collect();
    assert!(
        ports.contains(&Some(15001)) && ports.contains(&Some(16001)),
        "{ports:?}"
    );
    assert_eq!(
        v(&explain_loaded(&l, &out("10.1.0.5:80", 1000))),
        "redirect:15001"
    );
}

#[test]
fn rules_files_with_both_families() {
    use shunt::explain::rules_from_text;
    use shunt::plan::Family;
    let text = "iptables-save\n*nat\n-A OUTPUT -d 10.0.0.0/8 -j RETURN\nCOMMIT\n*nat\n-A OUTPUT -d fd00::/8 -j RETURN\nCOMMIT\n";
    let path = std::path::Path::new("x.rules");
    let (v4, _) = rules_from_text(text, Family::V4, path).unwrap();
    assert_eq!(v4.tables[0].rules[0].args[1], "10.0.0.0/8");
    let (v6, _) = rules_from_text(text, Family::V6, path).unwrap();
    assert_eq!(v6.tables[0].rules[0].args[1], "fd00::/8");
    // A file with only IPv4 rules has nothing for an IPv6 packet.
    let only4 = "*nat\n-A OUTPUT -d 10.0.0.0/8 -j RETURN\nCOMMIT\n";
    let (none, notes) = rules_from_text(only4, Family::V6, path).unwrap();
    assert!(none.tables.is_empty());
    assert!(!notes.is_empty());
    // Addresses and routes from `ip -j`: own addresses are local, others route via eth0.
    let h = host();
    assert_eq!(h.is_local("10.0.0.2".parse().unwrap()), Some(true));
    assert_eq!(h.is_local("10.0.0.3".parse().unwrap()), Some(false));
    assert_eq!(
        h.route("8.8.8.8".parse().unwrap()),
        Some(("eth0".into(), Some("10.0.0.2".parse().unwrap())))
    );
    assert_eq!(
        h.route("fd00:9::1".parse().unwrap()),
        Some(("eth0".into(), Some("fd00::2".parse().unwrap())))
    );
    assert_eq!(Host::default().is_local("10.0.0.2".parse().unwrap()), None);
}

// === Native nftables tables (`nft -j list ruleset`) ===

/// shunt's `inet shunt` table (redirect mode, CIDR and port exclusions), as `nft -j` lists it.
const SHUNT_NFT: &str = include_str!("fixtures/explain/shunt-redirect.nft.json");
/// shunt's table in tproxy mode with DNS capture (raw, mangle and nat base chains).
const SHUNT_TPROXY_NFT: &str = include_str!("fixtures/explain/shunt-tproxy-dns.nft.json");
/// Tables in the shapes Istio's nftables mode writes (`inet istio-proxy-nat`, `-raw`).
const ISTIO_NFT: &str = include_str!("fixtures/explain/istio-proxy.nft.json");

fn nft(json: &str, family: shunt::plan::Family) -> Vec<shunt::explain::eval::NftTable> {
    let doc: serde_json::Value = serde_json::from_str(json).unwrap();
    shunt::explain::nft::tables_from_json(&doc, family).unwrap()
}

fn nft_tables(json: &str, dst: &str) -> Tables {
    let family = if dst.starts_with('[') {
        shunt::plan::Family::V6
    } else {
        shunt::plan::Family::V4
    };
    Tables::from_nft(nft(json, family))
}

/// Every rule of the fixtures translates: none is left uncertain for want of a mapping.
#[test]
fn nft_fixtures_translate_without_unsupported_expressions() {
    use shunt::explain::matches::{Cond, Target};
    for (name, json) in [
        ("shunt", SHUNT_NFT),
        ("shunt tproxy", SHUNT_TPROXY_NFT),
        ("istio", ISTIO_NFT),
    ] {
        for family in [shunt::plan::Family::V4, shunt::plan::Family::V6] {
            let tables = nft(json, family);
            assert!(!tables.is_empty(), "{name}");
            for t in &tables {
                assert!(!t.bases.is_empty(), "{name}: {} has no base chain", t.name);
                for (chain, def) in &t.chains {
                    for (rule, text) in &def.rules {
                        assert!(
                            !rule
                                .matches
                                .iter()
                                .any(|m| matches!(m.cond, Cond::Unsupported(_))),
                            "{name} {chain}: {text}"
                        );
                        assert!(
                            !matches!(rule.target, Target::Unknown(_)),
                            "{name} {chain}: {text}"
                        );
                    }
                }
            }
        }
    }
    let shunt = nft(SHUNT_NFT, shunt::plan::Family::V4);
    let nat_output = shunt[0]
        .bases
        .iter()
        .find(|b| b.chain == "nat_output")
        .unwrap();
    assert_eq!(
        (nat_output.hook, nat_output.prio, nat_output.nat),
        ("OUTPUT", -110, true)
    );
}

#[test]
fn shunt_nft_table_redirects_and_excludes() {
    let cases = [
        ("10.9.9.9:80", 1000, "redirect:15001"),
        ("10.9.9.9:2222", 1000, "accept"),
        ("10.200.1.7:80", 1000, "accept"),
        ("10.3.4.5:80", 1000, "accept"),
        ("10.9.9.9:80", 1337, "accept"),
        ("[fd00:9::1]:80", 1000, "redirect:15001"),
        ("[fd00:5:1::9]:80", 1000, "accept"),
        ("[fd00:9::1]:80", 1337, "accept"),
    ];
    for (dst, uid, want) in cases {
        let e = explain(&nft_tables(SHUNT_NFT, dst), &host(), &out(dst, uid));
        assert_eq!(v(&e), want, "{dst} as {uid}: {e:#?}");
        assert!(e.uncertain.is_empty(), "{dst}: {:?}", e.uncertain);
    }
    // Inbound from another host: the inbound redirect.
    let mut q = Query::new(Direction::In, Proto::Tcp, "10.0.0.2:8080".parse().unwrap());
    q.src = Some("10.0.0.9".parse().unwrap());
    let e = explain(&nft_tables(SHUNT_NFT, "10.0.0.2"), &host(), &q);
    assert_eq!(v(&e), "redirect:15006", "{e:#?}");
    assert_eq!(e.trace[0].table, "inet shunt");
    assert_eq!(e.trace[0].chain, "nat_prerouting");
    assert_eq!(e.trace[0].rule, "meta nfproto ipv4 jump v4_nat_PREROUTING");
}

#[test]
fn shunt_nft_tproxy_table_diverts_inbound() {
    let mut q = Query::new(Direction::In, Proto::Tcp, "10.0.0.2:8080".parse().unwrap());
    q.src = Some("10.0.0.9".parse().unwrap());
    let e = explain(&nft_tables(SHUNT_TPROXY_NFT, "10.0.0.2"), &host(), &q);
    assert_eq!(v(&e), "tproxy:15006", "{e:#?}");
    q.dst = "10.0.0.2:9090".parse().unwrap();
    let e = explain(&nft_tables(SHUNT_TPROXY_NFT, "10.0.0.2"), &host(), &q);
    assert_eq!(v(&e), "accept", "{e:#?}");
    // DNS from the app to the DNS server: the DNS port.
    let mut q = out("10.200.0.1:53", 1000);
    q.proto = Proto::Udp;
    let e = explain(&nft_tables(SHUNT_TPROXY_NFT, "10.200.0.1"), &host(), &q);
    assert_eq!(v(&e), "redirect:15053", "{e:#?}");
}

#[test]
fn istio_nft_tables_capture_as_istio_does() {
    for (dst, uid, want) in [
        ("10.9.9.9:80", 1000, "redirect:15001"),
        ("10.9.9.9:80", 1337, "accept"),
        ("10.200.1.3:80", 1000, "accept"),
        ("127.0.0.1:80", 1000, "accept"),
        ("[fd00:9::1]:443", 1000, "redirect:15001"),
    ] {
        let e = explain(&nft_tables(ISTIO_NFT, dst), &host(), &out(dst, uid));
        assert_eq!(v(&e), want, "{dst} as {uid}: {e:#?}");
    }
    let mut q = Query::new(Direction::In, Proto::Tcp, "10.0.0.2:8080".parse().unwrap());
    q.src = Some("10.0.0.9".parse().unwrap());
    let e = explain(&nft_tables(ISTIO_NFT, "10.0.0.2"), &host(), &q);
    assert_eq!(v(&e), "redirect:15006", "{e:#?}");
    q.dst = "10.0.0.2:15008".parse().unwrap();
    let e = explain(&nft_tables(ISTIO_NFT, "10.0.0.2"), &host(), &q);
    assert_eq!(v(&e), "accept", "{e:#?}");
}

/// Another tool's iptables DNAT and shunt's nft table in one namespace: shunt's nat chain
/// (priority -110) binds first; where it lets the packet pass, iptables' nat (-100) runs.
#[test]
fn nft_chains_interleave_with_iptables_first_nat_binding_wins() {
    let other = "*nat\n:OUTPUT ACCEPT [0:0]\n-A OUTPUT -p tcp --dport 80 -j DNAT --to-destination 10.0.0.77:8080\nCOMMIT\n";
    let both = |_: &str| tables(other).with_nft(nft(SHUNT_NFT, shunt::plan::Family::V4));
    let e = explain(&both("10.9.9.9"), &host(), &out("10.9.9.9:80", 1000));
    assert_eq!(v(&e), "redirect:15001", "{e:#?}");
    assert!(e.trace.iter().all(|s| s.table == "inet shunt"), "{e:#?}");
    let e = explain(&both("10.9.9.9"), &host(), &out("10.9.9.9:80", 1337));
    assert_eq!(v(&e), "dnat:10.0.0.77:8080", "{e:#?}");
    assert_eq!(e.trace.last().unwrap().table, "nat");
}

/// An expression explain has no model for is uncertain, never guessed.
#[test]
fn an_unknown_nft_expression_is_uncertain() {
    let doc = serde_json::json!({"nftables": [
        {"table": {"family": "inet", "name": "other"}},
        {"chain": {"family": "inet", "table": "other", "name": "out", "type": "filter",
                   "hook": "output", "prio": 0, "policy": "accept"}},
        {"rule": {"family": "inet", "table": "other", "chain": "out", "expr": [
            {"match": {"op": "==", "left": {"meta": {"key": "cpu"}}, "right": 1}},
            {"drop": null}]}},
        // iptables-nft's own table: read through iptables-nft-save, not here.
        {"table": {"family": "ip", "name": "nat"}},
        {"chain": {"family": "ip", "table": "nat", "name": "OUTPUT", "type": "nat",
                   "hook": "output", "prio": -100, "policy": "accept"}}
    ]});
    let t = shunt::explain::nft::tables_from_json(&doc, shunt::plan::Family::V4).unwrap();
    assert_eq!(t.len(), 1);
    let e = explain(&Tables::from_nft(t), &host(), &out("10.9.9.9:80", 1000));
    assert_eq!(e.verdict, Verdict::Unknown, "{e:#?}");
    assert_eq!(e.uncertain.len(), 1, "{e:#?}");
    assert!(e.uncertain[0].reason.contains("meta cpu"), "{e:#?}");
}

/// Istio's nat chains sit at -100, iptables' nat priority: the kernel's order between them is
/// the order they were registered in, which explain says it cannot see.
#[test]
fn a_priority_shared_with_iptables_is_noted() {
    let other = "*nat\n:OUTPUT ACCEPT [0:0]\n-A OUTPUT -p tcp --dport 80 -j DNAT --to-destination 10.0.0.77:8080\nCOMMIT\n";
    let t = tables(other).with_nft(nft(ISTIO_NFT, shunt::plan::Family::V4));
    let e = explain(&t, &host(), &out("10.9.9.9:80", 1000));
    assert!(
        e.notes
            .iter()
            .any(|n| n.contains("iptables nat and inet istio-proxy-nat output share priority -100")),
        "{e:#?}"
    );
    // Without iptables rules at that hook there is nothing to order.
    let e = explain(
        &nft_tables(ISTIO_NFT, "10.9.9.9"),
        &host(),
        &out("10.9.9.9:80", 1000),
    );
    assert!(
        !e.notes.iter().any(|n| n.contains("share priority")),
        "{e:#?}"
    );
}
