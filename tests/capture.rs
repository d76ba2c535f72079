//! Capture rules proven with real traffic in namespaces the tests make (SPEC §3, §8).

mod common;

use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use common::*;

#[derive(Debug, PartialEq, Eq)]
enum Landed {
    /// Accepted on the outbound capture port, with this original destination.
    Outbound(SocketAddr),
    /// Accepted on the inbound capture port, with this original destination.
    Inbound(SocketAddr),
    /// Accepted by the named listener, not captured.
    Direct(&'static str),
    Refused(String),
    Nowhere,
}

/// What an engine has installed in the namespace, as text.
fn installed(ns: &Ns, backend: &str) -> String {
    if backend == "nftables" {
        ns.must(&["nft", "list", "table", "inet", "shunt"])
    } else {
        ns.iptables_save(backend, false)
    }
}

fn sa(host: &str, port: u16) -> SocketAddr {
    hp(host, port).parse().unwrap()
}

/// Listeners on both sides: capture ports and apps in the pod, servers on the remote.
struct Probe {
    listeners: Vec<(&'static str, TcpListener)>,
}

impl Probe {
    fn new(t: &Topology) -> Probe {
        let mut listeners = Vec::new();
        for (name, ns, port) in [
            ("outbound", &t.pod, 15001),
            ("inbound", &t.pod, 15006),
            ("pod:8080", &t.pod, 8080),
            ("pod:9090", &t.pod, 9090),
            ("remote:8080", &t.remote, 8080),
            ("remote:2222", &t.remote, 2222),
        ] {
            // Dual-stack: IPv4 clients arrive as ::ffff:a.b.c.d.
            let l = ns.listen(&format!("[::]:{port}"));
            l.set_nonblocking(true).unwrap();
            listeners.push((name, l));
        }
        Probe { listeners }
    }

    /// Connects and reports which listener got the connection (bounded: 3 s).
    fn probe(&self, from: &Ns, uid: u32, gid: u32, src: Option<&str>, dst: &str) -> Landed {
        let _client = match from.connect_from(uid, gid, src, dst) {
            Ok(s) => s,
            Err(e) => return Landed::Refused(e.to_string()),
        };
        let deadline = Instant::now() + Duration::from_secs(3);
        // Every listener is polled at least once after the deadline too, so a descheduled
        // thread cannot miss a connection that has arrived.
        let mut last = false;
        while !last {
            last = Instant::now() >= deadline;
            for (name, l) in &self.listeners {
                if let Ok((s, _)) = l.accept() {
                    if !matches!(*name, "outbound" | "inbound") {
                        return Landed::Direct(name);
                    }
                    let orig = original_dst(&s);
                    return match *name {
                        "outbound" => Landed::Outbound(orig),
                        _ => Landed::Inbound(orig),
                    };
                }
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Landed::Nowhere
    }
}

/// What a probe is, who sends it (uid, gid, source address), where to, and where it must land.
type Case<'a> = (&'a str, &'a Ns, u32, u32, Option<&'a str>, String, Landed);

/// SPEC §3 items 1-6, for both families, with one backend.
fn capture_semantics(backend: &str) {
    let t = Topology::new();
    ok(&t.pod.shunt(&[
        "apply",
        "--backend",
        backend,
        "--ipv6",
        "on",
        "--exclude-outbound-cidrs",
        "10.200.1.0/24,fd00:5:1::/64",
        "--exclude-outbound-ports",
        "2222",
        "--exclude-inbound-ports",
        "9090",
    ]));
    let save = installed(&t.pod, backend);
    assert!(
        save.contains("SHUNT_OUTPUT"),
        "rules not in {backend}:\n{save}"
    );
    let p = Probe::new(&t);
    let (pod, remote) = (&t.pod, &t.remote);
    for (pod_ip, remote_ip, remote2_ip, loopback, inbound_src) in [
        (POD_V4, REMOTE_V4, REMOTE2_V4, "127.0.0.1", "127.0.0.6"),
        (POD_V6, REMOTE_V6, REMOTE2_V6, "::1", "::6"),
    ] {
        let cases: Vec<Case> = vec![
            (
                "app to remote is captured",
                pod,
                1000,
                1000,
                None,
                hp(remote_ip, 8080),
                Landed::Outbound(sa(remote_ip, 8080)),
            ),
            (
                "any port is captured",
                pod,
                1000,
                1000,
                None,
                hp(remote_ip, 443),
                Landed::Outbound(sa(remote_ip, 443)),
            ),
            (
                "proxy uid is not captured",
                pod,
                1337,
                1000,
                None,
                hp(remote_ip, 8080),
                Landed::Direct("remote:8080"),
            ),
            (
                "proxy gid is not captured",
                pod,
                1000,
                1337,
                None,
                hp(remote_ip, 8080),
                Landed::Direct("remote:8080"),
            ),
            (
                "loopback is not captured",
                pod,
                1000,
                1000,
                None,
                hp(loopback, 8080),
                Landed::Direct("pod:8080"),
            ),
            (
                "own pod address is not captured",
                pod,
                1000,
                1000,
                None,
                hp(pod_ip, 8080),
                Landed::Direct("pod:8080"),
            ),
            (
                "excluded CIDR is not captured",
                pod,
                1000,
                1000,
                None,
                hp(remote2_ip, 8080),
                Landed::Direct("remote:8080"),
            ),
            (
                "excluded port is not captured",
                pod,
                1000,
                1000,
                None,
                hp(remote_ip, 2222),
                Landed::Direct("remote:2222"),
            ),
            (
                "proxy to own pod address takes the inbound path",
                pod,
                1337,
                1337,
                None,
                hp(pod_ip, 8080),
                Landed::Inbound(sa(pod_ip, 8080)),
            ),
            (
                "proxy's inbound leg reaches the app",
                pod,
                1337,
                1337,
                Some(inbound_src),
                hp(pod_ip, 8080),
                Landed::Direct("pod:8080"),
            ),
            (
                "inbound is captured",
                remote,
                0,
                0,
                None,
                hp(pod_ip, 8080),
                Landed::Inbound(sa(pod_ip, 8080)),
            ),
            (
                "excluded inbound port reaches the app",
                remote,
                0,
                0,
                None,
                hp(pod_ip, 9090),
                Landed::Direct("pod:9090"),
            ),
        ];
        for (what, from, uid, gid, src, dst, want) in cases {
            let got = p.probe(from, uid, gid, src, &dst);
            assert_eq!(got, want, "{backend}: {what} ({dst} as {uid}:{gid})");
        }
    }
}

#[test]
fn capture_semantics_nft() {
    require_netns!();
    capture_semantics("nft");
}

#[test]
fn capture_semantics_nftables() {
    require_netns!();
    capture_semantics("nftables");
}

#[test]
fn capture_semantics_legacy() {
    require_netns!();
    capture_semantics("legacy");
}

fn include_lists_capture_only_what_they_name_on(backend: &str) {
    require_netns!();
    let t = Topology::new();
    ok(&t.pod.shunt(&[
        "apply",
        "--backend",
        backend,
        "--outbound-cidrs",
        "10.200.1.0/24",
        "--outbound-ports",
        "2222",
        "--inbound-ports",
        "9090",
        "--ipv6",
        "off",
    ]));
    let p = Probe::new(&t);
    let cases = [
        (
            &t.pod,
            hp(REMOTE2_V4, 8080),
            Landed::Outbound(sa(REMOTE2_V4, 8080)),
        ),
        (&t.pod, hp(REMOTE_V4, 8080), Landed::Direct("remote:8080")),
        // --outbound-ports captures whatever the CIDR lists say.
        (
            &t.pod,
            hp(REMOTE_V4, 2222),
            Landed::Outbound(sa(REMOTE_V4, 2222)),
        ),
        (
            &t.remote,
            hp(POD_V4, 9090),
            Landed::Inbound(sa(POD_V4, 9090)),
        ),
        (&t.remote, hp(POD_V4, 8080), Landed::Direct("pod:8080")),
        // IPv6 is off: nothing is captured.
        (&t.pod, hp(REMOTE_V6, 8080), Landed::Direct("remote:8080")),
    ];
    for (from, dst, want) in cases {
        assert_eq!(p.probe(from, 1000, 1000, None, &dst), want, "{dst}");
    }
}

#[test]
fn include_lists_capture_only_what_they_name() {
    include_lists_capture_only_what_they_name_on("nft");
}

#[test]
fn include_lists_capture_only_what_they_name_nftables() {
    include_lists_capture_only_what_they_name_on("nftables");
}

#[test]
fn apply_is_idempotent_and_converges() {
    require_netns!();
    let ns = Ns::new("idem");
    ok(&ns.shunt(&["apply", "--backend", "nft"]));
    let first = saves(&ns, "nft");
    let again = ns.shunt(&["apply", "--backend", "nft"]);
    ok(&again);
    assert!(
        stderr(&again).contains("nothing changed"),
        "{}",
        stderr(&again)
    );
    assert_eq!(saves(&ns, "nft"), first, "a second apply changed the rules");

    // A loopback connection counts on SHUNT_OUTPUT's `-o lo` rule...
    let l = ns.listen("127.0.0.1:9000");
    let _c = ns.connect_as(1000, 1000, "127.0.0.1:9000").unwrap();
    drop(l);
    let lo_rule = |ns: &Ns| {
        ns.must(&["iptables-nft-save", "-c", "-t", "nat"])
            .lines()
            .find(|l| l.ends_with("-A SHUNT_OUTPUT -o lo -j RETURN"))
            .map(String::from)
            .unwrap()
    };
    let counted = lo_rule(&ns);
    assert!(!counted.starts_with("[0:"), "{counted}");
    // Other options: converge to the new plan, with one jump per built-in chain.
    ok(&ns.shunt(&[
        "apply",
        "--inbound-ports",
        "80",
        "--exclude-outbound-ports",
        "22",
    ]));
    ok(&ns.shunt(&[
        "check",
        "--inbound-ports",
        "80",
        "--exclude-outbound-ports",
        "22",
    ]));
    // ...and SHUNT_OUTPUT did not change (SHUNT_OUTBOUND and SHUNT_INBOUND did), so it was not
    // rewritten: its counters survive.
    assert_eq!(lo_rule(&ns), counted);
    let (v4, v6) = saves(&ns, "nft");
    for s in [&v4, &v6] {
        assert_eq!(
            s.matches("-A OUTPUT -p tcp -j SHUNT_OUTPUT").count(),
            1,
            "{s}"
        );
        assert_eq!(
            s.matches("-A PREROUTING -p tcp -j SHUNT_INBOUND").count(),
            1,
            "{s}"
        );
        assert!(s.contains("--dport 80 -j SHUNT_IN_REDIRECT"), "{s}");
        assert!(
            !s.contains("-A SHUNT_INBOUND -p tcp -j SHUNT_IN_REDIRECT"),
            "{s}"
        );
    }
    // Back to the defaults: the same rules as the first time.
    ok(&ns.shunt(&["apply"]));
    assert_eq!(saves(&ns, "nft"), first);

    // A duplicated jump (someone ran a non-idempotent script) is repaired, not kept.
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
    assert_eq!(ns.shunt(&["check"]).status.code(), Some(3));
    ok(&ns.shunt(&["apply"]));
    assert_eq!(saves(&ns, "nft"), first);
}

#[test]
fn check_reports_drift_with_a_diff() {
    require_netns!();
    let ns = Ns::new("check");
    let empty = ns.shunt(&["check", "--ipv6", "off"]);
    assert_eq!(empty.status.code(), Some(3), "{}", stderr(&empty));
    ok(&ns.shunt(&["apply", "--ipv6", "off"]));
    ok(&ns.shunt(&["check", "--ipv6", "off"]));
    ns.must(&[
        "iptables-nft",
        "-t",
        "nat",
        "-D",
        "SHUNT_OUTPUT",
        "-o",
        "lo",
        "-j",
        "RETURN",
    ]);
    let drift = ns.shunt(&["check", "--ipv6", "off"]);
    assert_eq!(drift.status.code(), Some(3));
    let text = String::from_utf8_lossy(&drift.stdout);
    assert!(text.contains("+ -A SHUNT_OUTPUT -o lo -j RETURN"), "{text}");
    let json = ns.shunt(&["check", "--ipv6", "off", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["in_sync"], false);
}

fn clean_leaves_foreign_rules(backend: &'static str) {
    let ns = Ns::new("clean");
    add_foreign_rules(&ns, backend);
    let before = saves(&ns, backend);
    ok(&ns.shunt(&["apply", "--backend", backend, "--ipv6", "on"]));
    assert_ne!(saves(&ns, backend), before);
    ok(&ns.shunt(&["clean", "--backend", backend]));
    let after = saves(&ns, backend);
    assert_eq!(after, before, "clean changed rules it does not own");
    assert!(!after.0.contains("SHUNT") && !after.1.contains("SHUNT"));
    // A second clean finds nothing and succeeds.
    let again = ns.shunt(&["clean", "--backend", backend]);
    ok(&again);
    assert!(
        stderr(&again).contains("nothing to remove"),
        "{}",
        stderr(&again)
    );
}

#[test]
fn clean_removes_only_shunt_rules_nft() {
    require_netns!();
    clean_leaves_foreign_rules("nft");
}

#[test]
fn clean_removes_only_shunt_rules_legacy() {
    require_netns!();
    clean_leaves_foreign_rules("legacy");
}

/// A directory with a wrapper that makes the real ip6tables-nft-restore fail half way: it
/// appends an invalid rule to the input, so the real tool parses part of it and then aborts.
fn failing_v6_restore() -> tempdir::Dir {
    let dir = tempdir::Dir::new("v6fail");
    let script = "#!/bin/sh\nsed 's/^COMMIT$/-A SHUNT_OUTPUT -j NO_SUCH_TARGET_X\\nCOMMIT/' | \
                  /usr/sbin/ip6tables-nft-restore \"$@\"\n";
    dir.write_exec("ip6tables-nft-restore", script);
    dir
}

#[test]
fn ipv6_failure_rolls_back_ipv4() {
    require_netns!();
    let ns = Ns::new("rollback");
    add_foreign_rules(&ns, "nft");
    // An older plan is installed: the rollback must restore it, not just remove things.
    ok(&ns.shunt(&[
        "apply",
        "--backend",
        "nft",
        "--ipv6",
        "on",
        "--inbound-ports",
        "80",
    ]));
    let before = saves(&ns, "nft");
    let stub = failing_v6_restore();
    let out = stub.shunt(
        &ns,
        &[
            "apply",
            "--backend",
            "nft",
            "--ipv6",
            "on",
            "--exclude-outbound-ports",
            "22",
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("ip6tables-nft-restore") && err.contains("rolling back"),
        "{err}"
    );
    assert_eq!(
        saves(&ns, "nft"),
        before,
        "a failed apply left changes behind"
    );
    // Without the fault the same command converges.
    ok(&ns.shunt(&[
        "apply",
        "--backend",
        "nft",
        "--ipv6",
        "on",
        "--exclude-outbound-ports",
        "22",
    ]));
    ok(&ns.shunt(&[
        "check",
        "--backend",
        "nft",
        "--ipv6",
        "on",
        "--exclude-outbound-ports",
        "22",
    ]));
}

#[test]
fn bad_values_exit_2_and_apply_nothing() {
    require_netns!();
    let ns = Ns::new("bad");
    let cases: &[(&[&str], &str)] = &[
        (&["--proxy-port", "0"], "'0'"),
        (&["--proxy-port", "70000"], "70000"),
        (&["--exclude-outbound-cidrs", "10.0.0.0/33"], "10.0.0.0/33"),
        (&["--proxy-uid", "abc"], "abc"),
        (&["--proxy-uid", "-1"], "-1"),
        (&["--backend", "iptables-ebpf"], "iptables-ebpf"),
        (&["--inbound-port", "15001"], "15001"),
        (&["--mode", "sideways"], "sideways"),
        (&["--ipv6", "maybe"], "maybe"),
        (&["--mode", "tproxy", "--tproxy-mark", "0"], "--tproxy-mark"),
        (&["--capture-all-dns"], "--redirect-dns"),
        (
            &["--exclude-interfaces", "sixteen-bytes-xx"],
            "sixteen-bytes-xx",
        ),
        (
            &["--redirect-dns", "--dns-servers", "8.8.8.8,dns.example"],
            "dns.example",
        ),
    ];
    for (args, needle) in cases {
        let mut full = vec!["apply"];
        full.extend_from_slice(args);
        let out = ns.shunt(&full);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(
            err.contains(needle),
            "{args:?}: message does not name the value: {err}"
        );
    }
    // A bad value in a config file and a typo'd key are refused the same way.
    let dir = tempdir::Dir::new("badcfg");
    let cfg = dir.0.join("capture.toml");
    std::fs::write(&cfg, "proxy_port = 99999\n").unwrap();
    let out = ns.shunt(&["apply", "--config", cfg.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("99999"), "{}", stderr(&out));
    std::fs::write(&cfg, "exclude_outbound_cidr = \"10.0.0.0/8\"\n").unwrap();
    let out = ns.shunt(&["apply", "--config", cfg.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("exclude_outbound_cidr"),
        "{}",
        stderr(&out)
    );
    for backend in ["nft", "legacy"] {
        let (v4, v6) = saves(&ns, backend);
        assert!(
            !v4.contains("SHUNT") && !v6.contains("SHUNT"),
            "{backend}: {v4}{v6}"
        );
    }
}

#[test]
fn runtime_faults_exit_1_with_the_cause() {
    require_netns!();
    // A namespace that does not exist (or vanished).
    let out = common::shunt_command()
        .args(["apply", "--netns", "/run/netns/shunt-no-such-ns"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("/run/netns/shunt-no-such-ns"),
        "{}",
        stderr(&out)
    );

    // A path that is not a network namespace: named as such, not as a failed iptables-save.
    for (path, what) in [
        ("/etc/hostname", "not a namespace file"),
        ("/proc/self/ns/mnt", "mnt namespace"),
    ] {
        let out = common::shunt_command()
            .args(["check", "--netns", path])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        let err = stderr(&out);
        assert!(
            err.contains(&format!("{path} is not a network namespace")) && err.contains(what),
            "{err}"
        );
    }

    // --ipv6 on where IPv6 is disabled: ::6 cannot go on lo; told so, nothing applied.
    let off = Ns::new("nov6");
    off.must(&[
        "sysctl",
        "-qw",
        "net.ipv6.conf.all.disable_ipv6=1",
        "net.ipv6.conf.lo.disable_ipv6=1",
    ]);
    let out = off.shunt(&["apply", "--ipv6", "on", "--backend", "nft"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("cannot put ::6 on lo") && stderr(&out).contains("--ipv6 off"),
        "{}",
        stderr(&out)
    );
    let (v4, v6) = saves(&off, "nft");
    assert!(!v4.contains("SHUNT") && !v6.contains("SHUNT"), "{v4}{v6}");

    // iptables missing from PATH.
    let ns = Ns::new("nobin");
    let out = common::shunt_command()
        .args(["apply", "--backend", "legacy", "--netns", &ns.path()])
        .env("PATH", "/shunt-empty-path")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("iptables-legacy-restore not found"),
        "{}",
        stderr(&out)
    );

    // The IPv4 restore fails half way: nothing is applied.
    let dir = tempdir::Dir::new("v4fail");
    dir.write_exec(
        "iptables-nft-restore",
        "#!/bin/sh\nsed 's/^COMMIT$/-A SHUNT_OUTPUT -j NO_SUCH_TARGET_X\\nCOMMIT/' | \
         /usr/sbin/iptables-nft-restore \"$@\"\n",
    );
    let out = dir.shunt(&ns, &["apply", "--backend", "nft"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let (v4, v6) = saves(&ns, "nft");
    assert!(!v4.contains("SHUNT") && !v6.contains("SHUNT"), "{v4}{v6}");
}

#[test]
fn auto_backend_follows_existing_rules() {
    require_netns!();
    let ns = Ns::new("auto");
    // Only legacy holds rules: auto must pick it.
    ns.must(&[
        "iptables-legacy",
        "-w",
        "-t",
        "filter",
        "-A",
        "INPUT",
        "-p",
        "tcp",
        "--dport",
        "22",
        "-j",
        "ACCEPT",
    ]);
    ok(&ns.shunt(&["apply", "--ipv6", "off"]));
    assert!(ns.iptables_save("legacy", false).contains("SHUNT_OUTPUT"));
    assert!(!ns.iptables_save("nft", false).contains("SHUNT_OUTPUT"));
    // Both hold rules: a warning, and shunt stays with the backend holding its own rules.
    ns.must(&[
        "iptables-nft",
        "-t",
        "filter",
        "-A",
        "INPUT",
        "-p",
        "tcp",
        "--dport",
        "23",
        "-j",
        "ACCEPT",
    ]);
    let out = ns.shunt(&["apply", "--ipv6", "off"]);
    ok(&out);
    assert!(
        stderr(&out).contains("both the nft and the legacy"),
        "{}",
        stderr(&out)
    );
    assert!(!ns.iptables_save("nft", false).contains("SHUNT_OUTPUT"));
    ok(&ns.shunt(&["check", "--ipv6", "off"]));
    // A fresh namespace with no rules at all gets nft.
    let fresh = Ns::new("auto2");
    ok(&fresh.shunt(&["apply", "--ipv6", "off"]));
    assert!(fresh.iptables_save("nft", false).contains("SHUNT_OUTPUT"));
}

#[test]
fn dry_run_prints_and_changes_nothing() {
    require_netns!();
    let ns = Ns::new("dry");
    let out = ns.shunt(&["apply", "--dry-run", "--ipv6", "on"]);
    let text = ok(&out);
    assert!(
        text.contains("# IPv4 changes") && text.contains("# IPv6 changes"),
        "{text}"
    );
    assert!(
        text.contains("-A SHUNT_REDIRECT -p tcp -j REDIRECT --to-ports 15001"),
        "{text}"
    );
    for backend in ["nft", "legacy"] {
        let (v4, v6) = saves(&ns, backend);
        assert!(!v4.contains("SHUNT") && !v6.contains("SHUNT"));
    }
    // apply logs the rules it installed (what `kubectl logs` shows for the init container).
    let out = ns.shunt(&["apply", "--ipv6", "on"]);
    ok(&out);
    assert!(
        stderr(&out).contains("-A SHUNT_OUTPUT -o lo -j RETURN"),
        "{}",
        stderr(&out)
    );
    assert!(ns
        .must(&["ip", "-6", "addr", "show", "dev", "lo"])
        .contains("::6/128"));
}

fn virt_interfaces_traffic_is_outbound_on(backend: &str) {
    require_netns!();
    let t = Topology::new();
    ok(&t.pod.shunt(&[
        "apply",
        "--backend",
        backend,
        "--virt-interfaces",
        "eth0",
        "--ipv6",
        "on",
    ]));
    let p = Probe::new(&t);
    for pod_ip in [POD_V4, POD_V6] {
        // A VM behind eth0 dialling anything: the outbound port, with the address it dialled.
        assert_eq!(
            p.probe(&t.remote, 0, 0, None, &hp(pod_ip, 8080)),
            Landed::Outbound(sa(pod_ip, 8080)),
            "{pod_ip}"
        );
    }
}

#[test]
fn virt_interfaces_traffic_is_outbound() {
    virt_interfaces_traffic_is_outbound_on("nft");
}

#[test]
fn virt_interfaces_traffic_is_outbound_nftables() {
    virt_interfaces_traffic_is_outbound_on("nftables");
}

/// A UDP socket made inside `ns` with the given fsuid/fsgid (what the owner match sees).
fn udp_as(ns: &Ns, uid: u32, gid: u32, bind: &str) -> std::net::UdpSocket {
    let bind: SocketAddr = bind.parse().unwrap();
    let s = ns
        .handle
        .run(move || {
            nix::unistd::setfsgid(nix::unistd::Gid::from_raw(gid));
            nix::unistd::setfsuid(nix::unistd::Uid::from_raw(uid));
            std::net::UdpSocket::bind(bind)
        })
        .unwrap()
        .unwrap();
    s.set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    s
}

fn recv(s: &std::net::UdpSocket) -> Option<(String, SocketAddr)> {
    let mut buf = [0u8; 512];
    let (n, from) = s.recv_from(&mut buf).ok()?;
    Some((
        String::from_utf8_lossy(&buf[..n]).into_owned(),
        shunt::socket::unmap(from),
    ))
}

fn dns_capture_redirects_queries_to_the_dns_port_on(backend: &str) {
    require_netns!();
    let t = Topology::new();
    let servers = format!("{REMOTE_V4},{REMOTE_V6}");
    ok(&t.pod.shunt(&[
        "apply",
        "--backend",
        backend,
        "--redirect-dns",
        "--dns-servers",
        &servers,
        "--ipv6",
        "on",
    ]));
    // The proxy's DNS port in the pod (as uid 1337, as the proxy runs), and real servers.
    // REDIRECT of a locally sent packet goes to 127.0.0.1 / ::1, and the answer must leave from
    // that address for conntrack to map it back, so a DNS proxy listens on loopback.
    let dns_v4 = udp_as(&t.pod, 1337, 1337, "127.0.0.1:15053");
    let dns_v6 = udp_as(&t.pod, 1337, 1337, "[::1]:15053");
    let dns_tcp = t.pod.listen("[::]:15053");
    dns_tcp.set_nonblocking(true).unwrap();
    let remote = udp_as(&t.remote, 0, 0, "[::]:53");
    for (server, other) in [(REMOTE_V4, REMOTE2_V4), (REMOTE_V6, REMOTE2_V6)] {
        let v6 = server.contains(':');
        let dns_port = if v6 { &dns_v6 } else { &dns_v4 };
        let app = udp_as(&t.pod, 1000, 1000, if v6 { "[::]:0" } else { "0.0.0.0:0" });
        // The app's query lands on the DNS port; the answer comes back from the server's address.
        app.send_to(b"query", hp(server, 53)).unwrap();
        let (q, client) = recv(dns_port).expect("query not captured");
        assert_eq!(q, "query");
        dns_port.send_to(b"answer", client).unwrap();
        let (a, from) = recv(&app).expect("answer lost");
        assert_eq!((a.as_str(), from), ("answer", sa(server, 53)), "{server}");
        // Another destination is not a DNS server: not captured.
        app.send_to(b"other", hp(other, 53)).unwrap();
        assert_eq!(
            recv(&remote).map(|(m, _)| m).as_deref(),
            Some("other"),
            "{other}"
        );
        // The proxy's own query goes out.
        let proxy = udp_as(&t.pod, 1337, 1337, if v6 { "[::]:0" } else { "0.0.0.0:0" });
        proxy.send_to(b"upstream", hp(server, 53)).unwrap();
        assert_eq!(
            recv(&remote).map(|(m, _)| m).as_deref(),
            Some("upstream"),
            "{server}"
        );
        // DNS over TCP from the app: the DNS port too.
        let _c = t.pod.connect_as(1000, 1000, &hp(server, 53)).unwrap();
        assert!(
            accept_within(&dns_tcp, Duration::from_secs(2)).is_some(),
            "TCP DNS to {server}"
        );
    }
    // --capture-all-dns: every destination's DNS is captured.
    ok(&t.pod.shunt(&[
        "apply",
        "--backend",
        backend,
        "--redirect-dns",
        "--capture-all-dns",
        "--ipv6",
        "on",
    ]));
    let app = udp_as(&t.pod, 1000, 1000, "0.0.0.0:0");
    app.send_to(b"anyone", hp(REMOTE2_V4, 53)).unwrap();
    assert_eq!(recv(&dns_v4).map(|(m, _)| m).as_deref(), Some("anyone"));
    assert!(
        recv(&remote).is_none(),
        "a captured query also reached the server"
    );
}

#[test]
fn dns_capture_redirects_queries_to_the_dns_port() {
    dns_capture_redirects_queries_to_the_dns_port_on("nft");
}

#[test]
fn dns_capture_redirects_queries_to_the_dns_port_nftables() {
    dns_capture_redirects_queries_to_the_dns_port_on("nftables");
}

/// `shunt istio-iptables` with Istio's flag sets: probes land where Istio's documented
/// behaviour says (no `-i`: no outbound capture; no `-b`: no inbound; `-d` only with `-b '*'`).
#[test]
fn istio_iptables_flag_sets() {
    require_netns!();
    type Expect<'a> = (&'a str, bool, u32, u32, String, Landed);
    let out = |d: &str, p: u16| Landed::Outbound(sa(d, p));
    let inb = |d: &str, p: u16| Landed::Inbound(sa(d, p));
    let sets: Vec<(Vec<&str>, Vec<Expect>)> = vec![
        (
            // The injector's defaults (9090 standing in for Istio's own excluded ports).
            vec![
                "-p",
                "15001",
                "-z",
                "15006",
                "-u",
                "1337",
                "-m",
                "REDIRECT",
                "-i",
                "*",
                "-x",
                "",
                "-b",
                "*",
                "-d",
                "15090,15021,9090",
                "--run-validation",
                "--dual-stack",
            ],
            vec![
                (
                    "app out",
                    false,
                    1000,
                    1000,
                    hp(REMOTE_V4, 8080),
                    out(REMOTE_V4, 8080),
                ),
                (
                    "proxy out",
                    false,
                    1337,
                    1337,
                    hp(REMOTE_V4, 8080),
                    Landed::Direct("remote:8080"),
                ),
                (
                    "gid defaults to -u",
                    false,
                    1000,
                    1337,
                    hp(REMOTE_V4, 8080),
                    Landed::Direct("remote:8080"),
                ),
                ("inbound", true, 0, 0, hp(POD_V4, 8080), inb(POD_V4, 8080)),
                (
                    "-d excluded",
                    true,
                    0,
                    0,
                    hp(POD_V4, 9090),
                    Landed::Direct("pod:9090"),
                ),
                (
                    "v6 out",
                    false,
                    1000,
                    1000,
                    hp(REMOTE_V6, 8080),
                    out(REMOTE_V6, 8080),
                ),
            ],
        ),
        (
            // No -i and no -b: Istio captures nothing.
            vec!["-p", "15001", "-u", "1337"],
            vec![
                (
                    "no -i",
                    false,
                    1000,
                    1000,
                    hp(REMOTE_V4, 8080),
                    Landed::Direct("remote:8080"),
                ),
                (
                    "no -b",
                    true,
                    0,
                    0,
                    hp(POD_V4, 8080),
                    Landed::Direct("pod:8080"),
                ),
            ],
        ),
        (
            // Include lists; -d without -b '*' is ignored; -x and -o exclude; -q includes.
            vec![
                "-u",
                "1337",
                "-i",
                "10.200.1.0/24",
                "-b",
                "8080,9090",
                "-d",
                "9090",
                "-q",
                "2222",
            ],
            vec![
                (
                    "-i include",
                    false,
                    1000,
                    1000,
                    hp(REMOTE2_V4, 8080),
                    out(REMOTE2_V4, 8080),
                ),
                (
                    "outside -i",
                    false,
                    1000,
                    1000,
                    hp(REMOTE_V4, 8080),
                    Landed::Direct("remote:8080"),
                ),
                (
                    "-q port",
                    false,
                    1000,
                    1000,
                    hp(REMOTE_V4, 2222),
                    out(REMOTE_V4, 2222),
                ),
                ("-b port", true, 0, 0, hp(POD_V4, 9090), inb(POD_V4, 9090)),
            ],
        ),
        (
            vec![
                "-u",
                "1337",
                "-g",
                "1500",
                "-i",
                "*",
                "-x",
                "10.200.1.0/24",
                "-o",
                "2222",
                "-b",
                "*",
            ],
            vec![
                (
                    "-x",
                    false,
                    1000,
                    1000,
                    hp(REMOTE2_V4, 8080),
                    Landed::Direct("remote:8080"),
                ),
                (
                    "-o",
                    false,
                    1000,
                    1000,
                    hp(REMOTE_V4, 2222),
                    Landed::Direct("remote:2222"),
                ),
                (
                    "-g",
                    false,
                    1000,
                    1500,
                    hp(REMOTE_V4, 8080),
                    Landed::Direct("remote:8080"),
                ),
                (
                    "-g replaces the -u default",
                    false,
                    1000,
                    1337,
                    hp(REMOTE_V4, 8080),
                    out(REMOTE_V4, 8080),
                ),
            ],
        ),
        (
            // -k: traffic from a VM interface is outbound.
            vec!["-u", "1337", "-i", "*", "-b", "*", "-k", "eth0"],
            vec![("-k", true, 0, 0, hp(POD_V4, 8080), out(POD_V4, 8080))],
        ),
    ];
    for (flags, expects) in sets {
        let t = Topology::new();
        let mut args = vec!["istio-iptables"];
        args.extend(flags.iter().copied());
        ok(&t.pod.shunt(&args));
        let p = Probe::new(&t);
        for (what, from_remote, uid, gid, dst, want) in expects {
            let from = if from_remote { &t.remote } else { &t.pod };
            assert_eq!(
                p.probe(from, uid, gid, None, &dst),
                want,
                "{flags:?}: {what}"
            );
        }
    }
    // Refused before anything changes.
    let ns = Ns::new("istiobad");
    for bad in [
        &["-m", "TPROXY", "-t", "0"][..],
        &["--capture-all-dns"],
        &["-k", "way-too-long-iface0"],
        &["-p", "0"],
        &["--iptables-trace-logging"],
        &["--cni-mode"],
        &["-x", "*"],
        &["-m", "TPROXY", "-k", "eth1"],
    ] {
        let mut args = vec!["istio-iptables"];
        args.extend_from_slice(bad);
        assert_eq!(ns.shunt(&args).status.code(), Some(2), "{bad:?}");
    }
    assert!(!ns.iptables_save("nft", false).contains("SHUNT"));
    // --skip-rule-apply changes nothing; --cleanup-only removes what is there.
    ok(&ns.shunt(&["istio-iptables", "-i", "*", "--skip-rule-apply"]));
    assert!(!ns.iptables_save("nft", false).contains("SHUNT"));
    ok(&ns.shunt(&["istio-iptables", "-i", "*", "-b", "*"]));
    assert!(ns.iptables_save("nft", false).contains("SHUNT_OUTPUT"));
    // --check: in sync with the same flags, drift (3) with others.
    ok(&ns.shunt(&["istio-iptables", "-i", "*", "-b", "*", "--check"]));
    let drift = ns.shunt(&["istio-iptables", "-i", "*", "-b", "8080", "--check"]);
    assert_eq!(drift.status.code(), Some(3), "{}", stderr(&drift));
    ok(&ns.shunt(&["istio-iptables", "--cleanup-only"]));
    assert!(!ns.iptables_save("nft", false).contains("SHUNT"));
}

/// A socket made inside `ns` with IP_TRANSPARENT (and a mark), as a tproxy-mode proxy makes
/// them: `bind` may then name an address that is not local.
fn transparent(ns: &Ns, uid: u32, mark: Option<u32>, v6: bool) -> std::os::fd::OwnedFd {
    use nix::sys::socket::{self as s, AddressFamily, SockFlag, SockType};
    ns.handle
        .run(move || {
            // The owner match sees the socket's creator: create it as `uid`.
            nix::unistd::setfsgid(nix::unistd::Gid::from_raw(uid));
            nix::unistd::setfsuid(nix::unistd::Uid::from_raw(uid));
            let family = if v6 {
                AddressFamily::Inet6
            } else {
                AddressFamily::Inet
            };
            let fd = s::socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).unwrap();
            s::setsockopt(&fd, s::sockopt::IpTransparent, &true).unwrap();
            s::setsockopt(&fd, s::sockopt::ReuseAddr, &true).unwrap();
            if v6 {
                // An IPv6 listener on [::]:15006 must not also claim IPv4's port: the IPv4
                // listener's accepted connections still hold 0.0.0.0:15006.
                s::setsockopt(&fd, s::sockopt::Ipv6V6Only, &true).unwrap();
            }
            if let Some(m) = mark {
                s::setsockopt(&fd, s::sockopt::Mark, &m).unwrap();
            }
            fd
        })
        .unwrap()
}

/// A transparent listener, as a tproxy-mode proxy has on its inbound port.
fn transparent_listener(ns: &Ns, addr: SocketAddr) -> TcpListener {
    use nix::sys::socket::{self as s, SockaddrStorage};
    use std::os::fd::AsRawFd;
    let l = transparent(ns, 1337, None, addr.is_ipv6());
    s::bind(l.as_raw_fd(), &SockaddrStorage::from(addr)).unwrap();
    s::listen(&l, s::Backlog::new(16).unwrap()).unwrap();
    TcpListener::from(l)
}

/// tproxy mode without the proxy: a transparent listener on 15006 gets the peer's connection
/// with the peer's own address and the app's address as its local address; a transparent,
/// marked connection from the client's address reaches the app, whose replies come back.
fn tproxy_delivers_inbound_with_the_client_address_on(backend: &str) {
    use nix::sys::socket::{self as s, SockaddrStorage};
    use std::os::fd::AsRawFd;
    require_netns!();
    let t = Topology::new();
    ok(&t.pod.shunt(&[
        "apply",
        "--backend",
        backend,
        "--mode",
        "tproxy",
        "--inbound-ports",
        "8080",
        "--ipv6",
        "on",
    ]));
    for (pod_ip, remote_ip, any) in [(POD_V4, REMOTE_V4, "0.0.0.0"), (POD_V6, REMOTE_V6, "::")] {
        let v6 = pod_ip.contains(':');
        let listener = transparent_listener(&t.pod, sa(any, 15006));
        let app = t.pod.listen(&hp(pod_ip, 8080));
        // The peer dials the app's port: TPROXY hands it to 15006, addresses untouched.
        let _client = t.remote.connect_as(0, 0, &hp(pod_ip, 8080)).unwrap();
        let (conn, peer) = accept_within(&listener, Duration::from_secs(3)).expect("not tproxied");
        assert_eq!(peer.ip(), sa(remote_ip, 0).ip(), "the client's own address");
        assert_eq!(
            conn.local_addr().unwrap(),
            sa(pod_ip, 8080),
            "the address it dialled"
        );
        // A port not in --inbound-ports is not captured (nothing listens: refused).
        assert!(t.remote.connect_as(0, 0, &hp(pod_ip, 9999)).is_err());
        // The proxy's leg: from the client's address, marked, as uid 1337.
        let leg = transparent(&t.pod, 1337, Some(1337), v6);
        s::bind(leg.as_raw_fd(), &SockaddrStorage::from(sa(remote_ip, 0))).unwrap();
        let leg_fd = leg.as_raw_fd();
        let target = SockaddrStorage::from(sa(pod_ip, 8080));
        s::connect(leg_fd, &target).expect("the app's reply did not come back to the proxy");
        let (_a, seen) = accept_within(&app, Duration::from_secs(3)).expect("app got nothing");
        assert_eq!(
            seen.ip(),
            sa(remote_ip, 0).ip(),
            "the app sees the real client"
        );
    }
    // clean removes the marks' rules, the policy rule and the route.
    ok(&t.pod.shunt(&["clean"]));
    for fam in ["-4", "-6"] {
        let rules = t.pod.must(&["ip", fam, "rule"]);
        assert!(!rules.contains("lookup 133"), "{rules}");
        let routes = t.pod.exec(&["ip", fam, "route", "show", "table", "133"]);
        assert!(String::from_utf8_lossy(&routes.stdout).trim().is_empty());
    }
    assert!(!t.pod.iptables_save("nft", false).contains("SHUNT"));
}

#[test]
fn tproxy_delivers_inbound_with_the_client_address() {
    tproxy_delivers_inbound_with_the_client_address_on("nft");
}

#[test]
fn tproxy_delivers_inbound_with_the_client_address_nftables() {
    tproxy_delivers_inbound_with_the_client_address_on("nftables");
}

/// The pod kernel's count of TCP resets sent (`Tcp: ... OutRsts` in /proc/net/snmp).
fn out_rsts(ns: &Ns) -> u64 {
    let snmp = ns.must(&["cat", "/proc/net/snmp"]);
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (tcp.next().unwrap(), tcp.next().unwrap());
    let i = names
        .split_whitespace()
        .position(|n| n == "OutRsts")
        .unwrap();
    values.split_whitespace().nth(i).unwrap().parse().unwrap()
}

/// --drop-invalid: a stray ACK that conntrack cannot place (strict tracking) makes the app's
/// kernel answer with a reset; with --drop-invalid it is dropped before it gets there.
fn drop_invalid_stops_stray_resets_on(backend: &str) {
    require_netns!();
    if !std::path::Path::new("/usr/sbin/hping3").exists() {
        eprintln!("SKIPPED: /usr/sbin/hping3 missing (apt-get install hping3)");
        return;
    }
    let t = Topology::new();
    let _app = t.pod.listen("[::]:8080");
    let stray = |t: &Topology| {
        let before = out_rsts(&t.pod);
        // hping3 exits 1 when nothing answers; the pod's counter is what matters.
        t.remote.exec(&[
            "/usr/sbin/hping3",
            "-q",
            "-A",
            "-c",
            "1",
            "-p",
            "8080",
            POD_V4,
        ]);
        std::thread::sleep(Duration::from_millis(300));
        out_rsts(&t.pod) - before
    };
    for (flags, want) in [
        (&["--ipv6", "off"][..], 1),
        (&["--ipv6", "off", "--drop-invalid"], 0),
    ] {
        let mut args = vec!["apply", "--backend", backend];
        args.extend_from_slice(flags);
        ok(&t.pod.shunt(&args));
        // Strict tracking: a packet without SYN cannot start a connection, so it is INVALID.
        t.pod
            .must(&["sysctl", "-qw", "net.netfilter.nf_conntrack_tcp_loose=0"]);
        assert_eq!(stray(&t), want, "{flags:?}");
    }
}

#[test]
fn drop_invalid_stops_stray_resets() {
    drop_invalid_stops_stray_resets_on("nft");
}

#[test]
fn drop_invalid_stops_stray_resets_nftables() {
    drop_invalid_stops_stray_resets_on("nftables");
}

/// istio-iptables with TPROXY (-m TPROXY -t -r) and with DNS capture (servers from the pod's
/// resolv.conf, as Istio reads them).
#[test]
fn istio_iptables_native_nftables_writes_the_nftables_engine() {
    require_netns!();
    let ns = Ns::new("istio-nft");
    let out = shunt_command()
        .args([
            "istio-iptables",
            "-p",
            "15001",
            "-z",
            "15006",
            "-u",
            "1337",
            "-m",
            "REDIRECT",
        ])
        .args([
            "-i",
            "*",
            "-b",
            "*",
            "--native-nftables",
            "--netns",
            &ns.path(),
        ])
        .output()
        .unwrap();
    ok(&out);
    let table = ns.must(&["nft", "list", "table", "inet", "shunt"]);
    assert!(table.contains("redirect to :15001"), "{table}");
    assert!(!ns.iptables_save("nft", false).contains("SHUNT_"));
}

#[test]
fn istio_iptables_tproxy_and_dns() {
    require_netns!();
    let t = Topology::new();
    ok(&t.pod.shunt(&[
        "istio-iptables",
        "-u",
        "1337",
        "-m",
        "TPROXY",
        "-t",
        "77",
        "-r",
        "177",
        "-b",
        "*",
        "-i",
        "*",
    ]));
    assert!(t
        .pod
        .must(&["ip", "rule"])
        .contains("fwmark 0x4d lookup 177"));
    let listener = transparent_listener(&t.pod, sa("0.0.0.0", 15006));
    let _c = t.remote.connect_as(0, 0, &hp(POD_V4, 8080)).unwrap();
    let (conn, peer) = accept_within(&listener, Duration::from_secs(3)).expect("not tproxied");
    assert_eq!(
        (conn.local_addr().unwrap(), peer.ip()),
        (sa(POD_V4, 8080), sa(REMOTE_V4, 0).ip())
    );
    // A second copy of the rule (added by hand, or by an older apply): clean removes both.
    t.pod
        .must(&["ip", "rule", "add", "fwmark", "77", "lookup", "177"]);
    ok(&t.pod.shunt(&[
        "clean",
        "--tproxy-mark",
        "77",
        "--tproxy-route-table",
        "177",
    ]));
    assert!(!t.pod.must(&["ip", "rule"]).contains("lookup 177"));

    // DNS: `ip netns exec` and shunt read /etc/netns/NAME/resolv.conf for a named namespace.
    struct Resolv(std::path::PathBuf);
    impl Drop for Resolv {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let dir = Resolv(std::path::Path::new("/etc/netns").join(&t.pod.name));
    std::fs::create_dir_all(&dir.0).unwrap();
    std::fs::write(
        dir.0.join("resolv.conf"),
        format!("nameserver {REMOTE_V4}\n"),
    )
    .unwrap();
    ok(&t
        .pod
        .shunt(&["istio-iptables", "-u", "1337", "--redirect-dns"]));
    let dns = udp_as(&t.pod, 1337, 1337, "127.0.0.1:15053");
    let app = udp_as(&t.pod, 1000, 1000, "0.0.0.0:0");
    app.send_to(b"lookup", hp(REMOTE_V4, 53)).unwrap();
    assert_eq!(recv(&dns).map(|(m, _)| m).as_deref(), Some("lookup"));
}

/// --proxy-port / --inbound-port move the capture ports; --exclude-interfaces lets an
/// interface's traffic through untouched, both ways.
fn ports_and_excluded_interfaces_change_real_traffic_on(backend: &str) {
    require_netns!();
    let t = Topology::new();
    ok(&t.pod.shunt(&[
        "apply",
        "--backend",
        backend,
        "--proxy-port",
        "16001",
        "--inbound-port",
        "16006",
        "--ipv6",
        "off",
    ]));
    let out = t.pod.listen("0.0.0.0:16001");
    let inb = t.pod.listen("0.0.0.0:16006");
    let _c = t.pod.connect_as(1000, 1000, &hp(REMOTE_V4, 8080)).unwrap();
    let (s, _) = accept_within(&out, Duration::from_secs(3)).expect("not on 16001");
    assert_eq!(original_dst(&s), sa(REMOTE_V4, 8080));
    let _c = t.remote.connect_as(0, 0, &hp(POD_V4, 8080)).unwrap();
    let (s, _) = accept_within(&inb, Duration::from_secs(3)).expect("not on 16006");
    assert_eq!(original_dst(&s), sa(POD_V4, 8080));
    drop((out, inb));

    ok(&t.pod.shunt(&[
        "apply",
        "--backend",
        backend,
        "--exclude-interfaces",
        "eth0",
        "--ipv6",
        "on",
    ]));
    let p = Probe::new(&t);
    for (pod_ip, remote_ip) in [(POD_V4, REMOTE_V4), (POD_V6, REMOTE_V6)] {
        assert_eq!(
            p.probe(&t.pod, 1000, 1000, None, &hp(remote_ip, 8080)),
            Landed::Direct("remote:8080")
        );
        assert_eq!(
            p.probe(&t.remote, 0, 0, None, &hp(pod_ip, 8080)),
            Landed::Direct("pod:8080")
        );
    }
}

#[test]
fn ports_and_excluded_interfaces_change_real_traffic() {
    ports_and_excluded_interfaces_change_real_traffic_on("nft");
}

#[test]
fn ports_and_excluded_interfaces_change_real_traffic_nftables() {
    ports_and_excluded_interfaces_change_real_traffic_on("nftables");
}
