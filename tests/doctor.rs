//! `shunt doctor` in namespaces the tests make: each fault in its own namespace is flagged,
//! and a healthy pod (rules applied, the test standing in for the proxy on 15001 and 15006)
//! is all ok.

mod common;

use std::net::TcpListener;
use std::process::Output;

use common::*;

fn apply(ns: &Ns, args: &[&str]) {
    let mut all = vec!["apply"];
    all.extend_from_slice(args);
    let out = ns.shunt(&all);
    assert!(
        out.status.success(),
        "apply: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn doctor(ns: &Ns, args: &[&str]) -> (Output, String) {
    let mut all = vec!["doctor"];
    all.extend_from_slice(args);
    let out = ns.shunt(&all);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    (out, text)
}

/// The line of one check, e.g. `FAIL listen-outbound nothing listens ...`.
fn line<'a>(text: &'a str, name: &str) -> &'a str {
    text.lines()
        .find(|l| l.get(5..).is_some_and(|rest| rest.starts_with(name)))
        .unwrap_or_else(|| panic!("no {name} line in:\n{text}"))
}

/// Listeners standing in for the proxy.
fn proxy_ports(ns: &Ns, ports: &[u16]) -> Vec<TcpListener> {
    ports
        .iter()
        .map(|p| ns.listen(&format!("[::]:{p}")))
        .collect()
}

#[test]
fn healthy_pod_is_all_ok() {
    require_netns!();
    let t = Topology::new();
    apply(&t.pod, &[]);
    let _proxy = proxy_ports(&t.pod, &[15001, 15006]);
    let (out, text) = doctor(&t.pod, &[]);
    assert_eq!(out.status.code(), Some(0), "{text}");
    for l in text.lines().filter(|l| !l.starts_with("     ")) {
        assert!(l.starts_with("ok "), "not ok: {l}\n{text}");
    }
    for name in [
        "backend",
        "chains-v4",
        "chains-v6",
        "plan",
        "counters",
        "explain",
        "listen-outbound",
        "listen-inbound",
        "ipv6",
    ] {
        line(&text, name);
    }
    let (out, _) = doctor(&t.pod, &["--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"], true);
    assert!(v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .all(|c| c["status"] == "ok"));
}

#[test]
fn nothing_listening_on_the_capture_port_fails() {
    require_netns!();
    let ns = Ns::new("doc-listen");
    apply(&ns, &[]);
    let _inbound_only = proxy_ports(&ns, &[15006]);
    let (out, text) = doctor(&ns, &[]);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let l = line(&text, "listen-outbound");
    assert!(l.starts_with("FAIL"), "{text}");
    assert!(l.contains("nothing listens on port 15001"), "{text}");
    assert!(text.contains("fix: start the proxy"), "{text}");
    assert!(line(&text, "listen-inbound").starts_with("ok"), "{text}");
}

#[test]
fn a_removed_jump_fails() {
    require_netns!();
    let ns = Ns::new("doc-jump");
    apply(&ns, &["--ipv6", "off"]);
    let _proxy = proxy_ports(&ns, &[15001, 15006]);
    ns.must(&[
        "iptables-nft",
        "-t",
        "nat",
        "-D",
        "OUTPUT",
        "-p",
        "tcp",
        "-j",
        "SHUNT_OUTPUT",
    ]);
    let (out, text) = doctor(&ns, &["--ipv6", "off"]);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let l = line(&text, "chains-v4");
    assert!(l.starts_with("FAIL"), "{text}");
    assert!(l.contains("jump OUTPUT -> SHUNT_OUTPUT"), "{text}");
    assert!(line(&text, "plan").starts_with("FAIL"), "{text}");
    assert!(text.contains("fix: run `shunt apply`"), "{text}");
    // No rule sends an app's connection to the proxy any more.
    let l = line(&text, "explain");
    assert!(l.starts_with("FAIL"), "{text}");
    assert!(l.contains("accepted"), "{text}");
    let (out, _) = doctor(&ns, &["--ipv6", "off", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"], false);
}

#[test]
fn rules_in_both_backends_warn() {
    require_netns!();
    let ns = Ns::new("doc-mix");
    apply(&ns, &["--backend", "nft"]);
    let _proxy = proxy_ports(&ns, &[15001, 15006]);
    ns.must(&[
        "iptables-legacy",
        "-w",
        "-A",
        "INPUT",
        "-p",
        "tcp",
        "--dport",
        "22",
        "-j",
        "ACCEPT",
    ]);
    let (out, text) = doctor(&ns, &[]);
    let l = line(&text, "backend");
    assert!(l.starts_with("warn"), "{text}");
    assert!(l.contains("both the nft and the legacy"), "{text}");
    assert!(l.contains("shunt's are in nft"), "{text}");
    // A warning alone does not fail the doctor.
    assert_eq!(out.status.code(), Some(0), "{text}");
}

#[test]
fn with_shunt_in_both_backends_doctor_inspects_the_one_apply_writes() {
    require_netns!();
    let ns = Ns::new("doc-both");
    // Legacy holds more rules (a long exclusion list), nft a few: apply's auto rule picks
    // legacy, and doctor must look at the same backend (it used to prefer nft).
    apply(&ns, &["--backend", "nft", "--ipv6", "off"]);
    let cidrs: Vec<String> = (0..40).map(|i| format!("10.{i}.0.0/16")).collect();
    apply(
        &ns,
        &[
            "--backend",
            "legacy",
            "--ipv6",
            "off",
            "--exclude-outbound-cidrs",
            &cidrs.join(","),
        ],
    );
    let out = ns.shunt(&["apply", "--dry-run", "--json", "--ipv6", "off"]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["backend"], "legacy", "{report}");
    let (_, text) = doctor(&ns, &["--ipv6", "off"]);
    let l = line(&text, "chains-v4");
    assert!(l.contains("legacy backend"), "{text}");
}

#[test]
fn a_healthy_pod_on_the_nftables_engine_is_all_ok_and_a_missing_chain_fails() {
    require_netns!();
    let t = Topology::new();
    apply(&t.pod, &["--backend", "nftables"]);
    let _proxy = proxy_ports(&t.pod, &[15001, 15006]);
    let (out, text) = doctor(&t.pod, &[]);
    assert_eq!(out.status.code(), Some(0), "{text}");
    for l in text.lines().filter(|l| !l.starts_with("     ")) {
        assert!(l.starts_with("ok "), "not ok: {l}\n{text}");
    }
    assert!(line(&text, "engine").contains("nftables engine"), "{text}");
    assert!(
        line(&text, "chains-v6").contains("table inet shunt"),
        "{text}"
    );
    assert!(
        line(&text, "explain").contains("redirected to :15001"),
        "{text}"
    );
    // A chain removed by hand: named, and the exit code says so.
    for cmd in [
        "flush chain inet shunt v6_nat_SHUNT_OUTBOUND",
        "delete chain inet shunt v6_nat_SHUNT_REDIRECT",
    ] {
        let mut args = vec!["nft"];
        args.extend(cmd.split(' '));
        t.pod.must(&args);
    }
    let (out, text) = doctor(&t.pod, &[]);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let l = line(&text, "chains-v6");
    assert!(
        l.starts_with("FAIL") && l.contains("v6_nat_SHUNT_REDIRECT"),
        "{text}"
    );
    assert!(line(&text, "chains-v4").starts_with("ok"), "{text}");
}

#[test]
fn doctor_names_the_nftables_engine_and_warns_when_two_engines_hold_rules() {
    require_netns!();
    let ns = Ns::new("doc-engines");
    apply(&ns, &["--backend", "nftables", "--ipv6", "off"]);
    let (_, text) = doctor(&ns, &["--ipv6", "off"]);
    let l = line(&text, "engine");
    assert!(
        l.starts_with("ok") && l.contains("nftables engine"),
        "{text}"
    );
    // The explain check walks the nftables table.
    let l = line(&text, "explain");
    assert!(!l.starts_with("FAIL"), "{text}");
    // A second engine by hand (apply itself refuses to mix them).
    ns.must(&["iptables-nft", "-t", "nat", "-N", "SHUNT_OUTPUT"]);
    ns.must(&[
        "iptables-nft",
        "-t",
        "nat",
        "-A",
        "OUTPUT",
        "-p",
        "tcp",
        "-j",
        "SHUNT_OUTPUT",
    ]);
    let (_, text) = doctor(&ns, &["--ipv6", "off"]);
    let l = line(&text, "engine");
    assert!(l.contains("two engines"), "{text}");
}

#[test]
fn ipv6_on_without_ipv6_rules_fails() {
    require_netns!();
    let t = Topology::new();
    apply(&t.pod, &["--ipv6", "off"]);
    let _proxy = proxy_ports(&t.pod, &[15001, 15006]);
    let (out, text) = doctor(&t.pod, &[]);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let l = line(&text, "ipv6");
    assert!(l.starts_with("FAIL"), "{text}");
    assert!(l.contains("fd00:5::2"), "{text}");
    assert!(l.contains("bypasses the proxy"), "{text}");
    // Told that IPv6 capture is off on purpose, it only warns.
    let (_, text) = doctor(&t.pod, &["--ipv6", "off"]);
    assert!(line(&text, "ipv6").starts_with("warn"), "{text}");
}

#[test]
fn no_rules_at_all_fails() {
    require_netns!();
    let ns = Ns::new("doc-empty");
    let (out, text) = doctor(&ns, &["--ipv6", "off"]);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(line(&text, "backend").starts_with("FAIL"), "{text}");
    assert!(line(&text, "chains-v4").contains("missing"), "{text}");
}

#[test]
fn a_foreign_rule_that_pre_empts_shunt_fails_explain() {
    require_netns!();
    let t = Topology::new();
    apply(&t.pod, &["--ipv6", "off"]);
    let _proxy = proxy_ports(&t.pod, &[15001, 15006]);
    // Another tool inserts an ACCEPT before shunt's jump: shunt's own rules are intact
    // (check and the plan comparison are happy), but nothing is captured any more.
    t.pod.must(&[
        "iptables-nft",
        "-t",
        "nat",
        "-I",
        "OUTPUT",
        "1",
        "-p",
        "tcp",
        "-j",
        "ACCEPT",
    ]);
    let (out, text) = doctor(&t.pod, &["--ipv6", "off"]);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(line(&text, "plan").starts_with("ok"), "{text}");
    let l = line(&text, "explain");
    assert!(l.starts_with("FAIL"), "{text}");
    assert!(l.contains("accepted"), "{text}");
    assert!(l.contains("nat OUTPUT#1"), "{text}");
}

#[test]
fn dns_capture_needs_a_dns_listener() {
    require_netns!();
    let ns = Ns::new("doc-dns");
    apply(
        &ns,
        &[
            "--redirect-dns",
            "on",
            "--dns-servers",
            "10.96.0.10",
            "--ipv6",
            "off",
        ],
    );
    let _proxy = proxy_ports(&ns, &[15001, 15006]);
    let opts = [
        "--redirect-dns",
        "on",
        "--dns-servers",
        "10.96.0.10",
        "--ipv6",
        "off",
    ];
    let (out, text) = doctor(&ns, &opts);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let l = line(&text, "listen-dns");
    assert!(l.starts_with("FAIL") && l.contains("UDP and TCP"), "{text}");
    let _tcp = ns.listen("[::]:15053");
    let _udp = ns
        .handle
        .run(|| std::net::UdpSocket::bind("[::]:15053"))
        .unwrap()
        .unwrap();
    let (_, text) = doctor(&ns, &opts);
    assert!(line(&text, "listen-dns").starts_with("ok"), "{text}");
}

#[test]
fn tproxy_route_is_checked() {
    require_netns!();
    let t = Topology::new();
    apply(&t.pod, &["--mode", "tproxy"]);
    let _proxy = proxy_ports(&t.pod, &[15001, 15006]);
    let (_, text) = doctor(&t.pod, &["--mode", "tproxy"]);
    assert!(line(&text, "tproxy-route-v4").starts_with("ok"), "{text}");
    assert!(line(&text, "tproxy-route-v6").starts_with("ok"), "{text}");
    // Someone flushes the policy rule: doctor says which piece is gone and how to fix it.
    t.pod
        .must(&["ip", "-4", "rule", "del", "fwmark", "1337", "lookup", "133"]);
    let (out, text) = doctor(&t.pod, &["--mode", "tproxy"]);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let l = line(&text, "tproxy-route-v4");
    assert!(l.starts_with("FAIL") && l.contains("`ip rule`"), "{text}");
    assert!(line(&text, "tproxy-route-v6").starts_with("ok"), "{text}");
}
