//! `shunt explain` on the command line, without root: rules files (Istio- and Linkerd-style
//! fixtures, stdin), the plan of given capture options, output formats and usage errors.

mod common;

use std::process::Output;

const ISTIO: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/explain/istio-style.v4.rules"
);
const SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/explain/istio-script.rules"
);
const LINKERD: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/explain/linkerd-style.v4.rules"
);

fn shunt(args: &[&str]) -> Output {
    common::shunt_command().args(args).output().unwrap()
}

fn json(args: &[&str]) -> serde_json::Value {
    let mut all = args.to_vec();
    all.push("--json");
    let out = shunt(&all);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// An app (uid 1000) in a pod whose eth0 has 10.0.0.2.
const APP: &[&str] = &[
    "--uid", "1000", "--gid", "1000", "--iface", "eth0", "--src", "10.0.0.2",
];

#[test]
fn istio_style_rules_file() {
    let mut args = vec!["explain", "--rules", ISTIO, "out", "tcp", "10.1.2.3:80"];
    args.extend_from_slice(APP);
    let v = json(&args);
    assert_eq!(v["verdict"], "redirect");
    assert_eq!(v["to_port"], 15001);
    assert_eq!(v["to_addr"], serde_json::Value::Null);
    let trace = v["trace"].as_array().unwrap();
    // After the redirect the packet loops back through lo (raw PREROUTING jumps too).
    let last = trace
        .iter()
        .find(|s| s["chain"] == "ISTIO_REDIRECT")
        .unwrap();
    assert_eq!(last["table"], "nat");
    assert_eq!(last["chain"], "ISTIO_REDIRECT");
    assert_eq!(last["index"], 1);
    assert_eq!(last["rule"], "-p tcp -j REDIRECT --to-ports 15001");
    // The excluded CIDR and the proxy's own uid go straight out.
    args[5] = "10.200.1.7:80";
    assert_eq!(json(&args)["verdict"], "accept");
    let proxy = [
        "explain",
        "--rules",
        ISTIO,
        "out",
        "tcp",
        "10.1.2.3:80",
        "--uid",
        "1337",
        "--gid",
        "1337",
        "--iface",
        "eth0",
    ];
    assert_eq!(json(&proxy)["verdict"], "accept");
    // The text report names the verdict, and the rules with table, chain and position.
    let out = shunt(&[
        "explain",
        "--rules",
        ISTIO,
        "out",
        "tcp",
        "10.1.2.3:80",
        "--uid",
        "1000",
        "--gid",
        "1000",
        "--iface",
        "eth0",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("verdict: redirected to :15001 (original destination 10.1.2.3:80)"),
        "{text}"
    );
    assert!(text.contains("nat    ISTIO_OUTPUT#"), "{text}");
}

#[test]
fn linkerd_style_inbound_from_stdin() {
    let text = std::fs::read_to_string(LINKERD).unwrap();
    let run = |port: &str| {
        let out = common::output_with_stdin(
            common::shunt_command().args([
                "explain",
                "--rules",
                "-",
                "in",
                "tcp",
                &format!("10.0.0.2:{port}"),
                "--src",
                "10.0.0.1",
                "--iface",
                "eth0",
                "--json",
            ]),
            text.as_bytes(),
        );
        assert!(out.status.success());
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let v = run("8080");
    assert_eq!(v["verdict"], "redirect");
    assert_eq!(v["to_port"], 4143);
    assert_eq!(
        v["trace"][0]["rule"],
        "-m comment --comment proxy-init/install-proxy-init-prerouting -j PROXY_INIT_REDIRECT"
    );
    assert_eq!(run("4191")["verdict"], "accept");
}

#[test]
fn the_plan_of_capture_options() {
    let base = ["explain", "--exclude-outbound-ports", "22", "out", "tcp"];
    let mut a = base.to_vec();
    a.push("10.9.9.9:22");
    a.extend_from_slice(APP);
    assert_eq!(json(&a)["verdict"], "accept");
    let mut a = base.to_vec();
    a.push("10.9.9.9:23");
    a.extend_from_slice(APP);
    let v = json(&a);
    assert_eq!(v["verdict"], "redirect");
    assert_eq!(v["to_port"], 15001);
    // Without a uid, the owner rules cannot be decided: unknown, with the rules listed.
    let v = json(&[
        "explain",
        "out",
        "tcp",
        "10.9.9.9:23",
        "--iface",
        "eth0",
        "--src",
        "10.0.0.2",
    ]);
    assert_eq!(v["verdict"], "unknown");
    assert!(!v["uncertain"].as_array().unwrap().is_empty());
    // Mermaid.
    let mut a = base.to_vec();
    a.extend(["10.9.9.9:23", "--format", "mermaid"]);
    a.extend_from_slice(APP);
    let out = shunt(&a);
    let m = String::from_utf8_lossy(&out.stdout);
    assert!(m.starts_with("flowchart TD\n"), "{m}");
    assert!(m.contains("REDIRECT --to-ports 15001"), "{m}");
}

#[test]
fn ipv6_packet_and_ipv4_only_file() {
    let v = json(&[
        "explain",
        "--rules",
        ISTIO,
        "out",
        "tcp",
        "[fd00::9]:80",
        "--uid",
        "1000",
        "--iface",
        "eth0",
    ]);
    assert_eq!(v["verdict"], "accept");
    assert!(v["notes"].to_string().contains("IPv4 rules only"), "{v}");
}

#[test]
fn usage_errors_name_the_value_and_exit_2() {
    for (args, needle) in [
        (vec!["explain", "out", "tcp", "10.0.0.1"], "10.0.0.1"),
        (
            vec!["explain", "out", "tcp", "10.0.0.1:99999"],
            "10.0.0.1:99999",
        ),
        (
            vec!["explain", "out", "tcp", "10.0.0.1:80", "--src", "fd00::1"],
            "fd00::1",
        ),
        (
            vec![
                "explain",
                "out",
                "tcp",
                "10.0.0.1:80",
                "--uid",
                "no-such-user-x",
            ],
            "no-such-user-x",
        ),
        (
            vec!["explain", "out", "tcp", "10.0.0.1:80", "--ctstate", "OLD"],
            "OLD",
        ),
        (
            vec![
                "explain",
                "--proxy-port",
                "70000",
                "out",
                "tcp",
                "10.0.0.1:80",
            ],
            "70000",
        ),
    ] {
        let out = shunt(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    let out = shunt(&[
        "explain",
        "--rules",
        "/nonexistent/rules",
        "out",
        "tcp",
        "10.0.0.1:80",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/rules"));
}

#[test]
fn restore_scripts_with_inserts_are_replayed_in_order() {
    // PREROUTING ends up as: eth1 -> MESH_REDIRECT, eth2 RETURN, eth2 -> MESH_REDIRECT,
    // eth1 RETURN, -p tcp -> MESH_INBOUND.
    let run = |iface: &str, port: &str| {
        json(&[
            "explain",
            "--rules",
            SCRIPT,
            "in",
            "tcp",
            &format!("10.0.0.2:{port}"),
            "--src",
            "10.0.0.9",
            "--iface",
            iface,
        ])
    };
    let v = run("eth1", "80");
    assert_eq!(v["verdict"], "redirect");
    assert_eq!(v["to_port"], 15001);
    assert_eq!(v["trace"][0]["index"], 1);
    let v = run("eth2", "80");
    assert_eq!(v["verdict"], "accept");
    assert_eq!(v["trace"][0]["index"], 2);
    assert_eq!(v["trace"][0]["rule"], "-i eth2 -j RETURN");
    let v = run("eth0", "80");
    assert_eq!(v["to_port"], 15006);
    assert_eq!(v["trace"][0]["index"], 5);
    assert_eq!(run("eth0", "15008")["verdict"], "accept");
}
