//! `shunt validate`: fails (exit 4, within its time bound) in a namespace without capture
//! rules, passes after `shunt apply`, and says what it did when the proxy already listens.

mod common;

use std::time::{Duration, Instant};

use common::*;

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn fails_without_rules_then_passes_after_apply() {
    require_netns!();
    let t = Topology::new();
    // No rules: the connection to the test address goes out to the remote, which drops it.
    let start = Instant::now();
    let out = t.pod.shunt(&["validate", "--timeout", "1500ms"]);
    let took = start.elapsed();
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    assert!(took < Duration::from_secs(4), "took {took:?}");
    let s = text(&out);
    assert!(s.contains("198.51.100.254:15999"), "{s}");
    assert!(s.contains("not redirected to :15001"), "{s}");
    assert!(s.contains("listened on :15001 itself"), "{s}");

    let apply = t.pod.shunt(&["apply"]);
    assert!(apply.status.success(), "{}", text(&apply));
    let out = t.pod.shunt(&["validate", "--timeout", "3s"]);
    let s = text(&out);
    assert_eq!(out.status.code(), Some(0), "{s}");
    assert!(
        s.contains("reached :15001 with original destination 198.51.100.254:15999"),
        "{s}"
    );
    // --json, another target, a uid chosen by the user.
    let out = t.pod.shunt(&[
        "validate",
        "--json",
        "--target",
        "[fd00:5::1]:8080",
        "--uid",
        "4242",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"], true, "{}", text(&out));
    assert_eq!(v["uid"], 4242);
    assert_eq!(v["listener"], "bound");
}

#[test]
fn proxy_already_listening_and_wrong_port() {
    require_netns!();
    let t = Topology::new();
    let apply = t.pod.shunt(&["apply", "--ipv6", "off"]);
    assert!(apply.status.success(), "{}", text(&apply));
    // The test stands in for the proxy: validate connects through it and says so.
    let _proxy = t.pod.listen("[::]:15001");
    let out = t.pod.shunt(&["validate", "--timeout", "2s"]);
    let s = text(&out);
    assert_eq!(out.status.code(), Some(0), "{s}");
    assert!(s.contains("found a listener already on :15001"), "{s}");
    // Rules capture to 15001, but the validator is told the proxy port is 16001: the
    // connection lands on 15001 (where nothing of validate's listens) and is not seen.
    drop(_proxy);
    let out = t
        .pod
        .shunt(&["validate", "--timeout", "1s", "--proxy-port", "16001"]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
}

#[test]
fn usage_errors_exit_2() {
    require_netns!();
    let ns = Ns::new("val-usage");
    let out = ns.shunt(&["validate", "--uid", "1337"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("proxy uid"), "{}", text(&out));
    let out = ns.shunt(&["validate", "--timeout", "soon"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("soon"));
    let out = ns.shunt(&["validate", "--target", "1.2.3.4"]);
    assert_eq!(out.status.code(), Some(2));
}
