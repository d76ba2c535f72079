//! Faults a flaky cluster produces: appliers racing in one namespace, a restore failing in
//! the last table, a hung or killed restore, a family whose tools fail during clean, odd
//! `--netns` values and tproxy routing with non-default marks. Every test makes its own
//! namespaces and stub tools; every wait is bounded.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// The options of applier `i` in a race: each a different plan, several of them spanning
/// more than one table (raw, mangle, nat) and tproxy adding policy routing.
fn racer_options(i: usize) -> Vec<String> {
    let mut o = vec![
        "--ipv6".to_string(),
        "on".into(),
        "--exclude-outbound-ports".into(),
        (1000 + i).to_string(),
    ];
    match i % 4 {
        1 => o.extend(
            ["--redirect-dns", "--dns-servers", "10.200.0.53,fd00:5::53"].map(String::from),
        ),
        2 => o.push("--drop-invalid".into()),
        3 => o.extend(["--mode", "tproxy"].map(String::from)),
        _ => {}
    }
    o
}

fn spawn_shunt(ns: &Ns, verb: &str, backend: &str, opts: &[String]) -> Child {
    shunt_command()
        .args([verb, "--backend", backend, "--netns", &ns.path()])
        .args(opts)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn shunt")
}

fn finish(child: Child) -> (Option<i32>, String) {
    let out = child.wait_with_output().expect("wait shunt");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// 8 appliers with 8 different plans start together, 20 rounds: the namespace must end in
/// exactly one of the plans, and every applier either waited its turn (exit 0) or said why
/// it gave up; none reports success having left a state that is not its plan.
fn concurrent_applies_end_in_one_plan(backend: &str) {
    let ns = Ns::new("race");
    const RACERS: usize = 8;
    for round in 0..20 {
        let children: Vec<Child> = (0..RACERS)
            .map(|i| spawn_shunt(&ns, "apply", backend, &racer_options(i)))
            .collect();
        let results: Vec<(Option<i32>, String)> = children.into_iter().map(finish).collect();
        for (i, (code, err)) in results.iter().enumerate() {
            assert!(
                *code == Some(0) || (*code == Some(1) && err.contains("another shunt")),
                "round {round}, applier {i} exited {code:?}: {err}"
            );
        }
        let in_sync: Vec<usize> = (0..RACERS)
            .filter(|&i| {
                let out = ns.shunt(
                    &[
                        &["check", "--backend", backend][..],
                        &racer_options(i)
                            .iter()
                            .map(String::as_str)
                            .collect::<Vec<_>>(),
                    ]
                    .concat(),
                );
                match out.status.code() {
                    Some(0) => true,
                    Some(3) => false,
                    other => panic!("check exited {other:?}: {}", stderr(&out)),
                }
            })
            .collect();
        assert_eq!(
            in_sync.len(),
            1,
            "round {round}: the namespace matches plans {in_sync:?}, not exactly one\n{}",
            if backend == "nftables" {
                ns.exec(&["nft", "list", "ruleset"])
                    .stdout
                    .iter()
                    .map(|b| *b as char)
                    .collect()
            } else {
                ns.iptables_save(backend, false)
            }
        );
        // The plan that holds must be one whose applier succeeded.
        assert_eq!(results[in_sync[0]].0, Some(0), "round {round}");
    }
}

#[test]
fn concurrent_applies_end_in_one_plan_nft() {
    require_netns!();
    concurrent_applies_end_in_one_plan("nft");
}

#[test]
fn concurrent_applies_end_in_one_plan_nftables() {
    require_netns!();
    concurrent_applies_end_in_one_plan("nftables");
}

#[test]
fn concurrent_applies_end_in_one_plan_legacy() {
    require_netns!();
    concurrent_applies_end_in_one_plan("legacy");
}

#[test]
fn a_lock_held_past_the_wait_fails_with_a_clear_message_and_changes_nothing() {
    require_netns!();
    let ns = Ns::new("busy");
    let before = saves(&ns, "nft");
    // Another applier holds the namespace (flock on its nsfs inode, as shunt takes it).
    let mut holder = Command::new("flock")
        .args(["-x", &ns.path(), "sleep", "20"])
        .spawn()
        .expect("flock");
    let deadline = Instant::now() + Duration::from_secs(5);
    while Command::new("flock")
        .args(["-xn", &ns.path(), "true"])
        .status()
        .expect("flock -n")
        .success()
    {
        assert!(Instant::now() < deadline, "the holder never took the lock");
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = ns.shunt(&["apply", "--backend", "nft", "--wait", "500ms"]);
    let _ = holder.kill();
    let _ = holder.wait();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("another shunt") && err.contains("500ms") && err.contains("--wait"),
        "{err}"
    );
    assert_eq!(saves(&ns, "nft"), before);
    // Released: the same apply goes through.
    ok(&ns.shunt(&["apply", "--backend", "nft"]));
}

/// A restore stub that breaks the forward script of a DNS plan in its last table (nat, after
/// raw and mangle), and passes everything else (the rollback) to the real tool.
fn failing_last_table(backend: &str) -> tempdir::Dir {
    let dir = tempdir::Dir::new(&format!("lastfail-{backend}"));
    for tool in ["iptables", "ip6tables"] {
        let name = format!("{tool}-{backend}-restore");
        let script = format!(
            "#!/bin/sh\nin=$(mktemp)\ncat > \"$in\"\nif grep -q '^-A SHUNT_DNS ' \"$in\"; then\n  \
             sed -i '$ s/^COMMIT$/-A SHUNT_OUTPUT -j NO_SUCH_TARGET_X\\nCOMMIT/' \"$in\"\nfi\n\
             /usr/sbin/{name} \"$@\" < \"$in\"; rc=$?\nrm -f \"$in\"\nexit $rc\n"
        );
        dir.write_exec(&name, &script);
    }
    dir
}

fn failure_in_the_last_table_leaves_both_families_as_they_were(backend: &'static str) {
    let ns = Ns::new("lasttable");
    add_foreign_rules(&ns, backend);
    ok(&ns.shunt(&[
        "apply",
        "--backend",
        backend,
        "--ipv6",
        "on",
        "--inbound-ports",
        "80",
    ]));
    let before = saves(&ns, backend);
    let stub = failing_last_table(backend);
    let out = stub.shunt(
        &ns,
        &[
            "apply",
            "--backend",
            backend,
            "--ipv6",
            "on",
            "--redirect-dns",
            "--dns-servers",
            "10.200.0.53, fd00:5::53",
            "--drop-invalid",
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("rolling back"), "{}", stderr(&out));
    assert_eq!(
        saves(&ns, backend),
        before,
        "{backend}: a restore that failed in its last table left earlier tables behind"
    );
}

#[test]
fn failure_in_the_last_table_leaves_both_families_as_they_were_legacy() {
    require_netns!();
    failure_in_the_last_table_leaves_both_families_as_they_were("legacy");
}

#[test]
fn failure_in_the_last_table_leaves_both_families_as_they_were_nft() {
    require_netns!();
    failure_in_the_last_table_leaves_both_families_as_they_were("nft");
}

#[test]
fn a_hung_restore_is_killed_at_the_wait_and_the_other_family_rolled_back() {
    require_netns!();
    let ns = Ns::new("hung");
    ok(&ns.shunt(&["apply", "--backend", "nft", "--ipv6", "on"]));
    let before = saves(&ns, "nft");
    // IPv4's forward restore hangs; its rollback (and IPv6) go to the real tool.
    let dir = tempdir::Dir::new("hung");
    dir.write_exec(
        "iptables-nft-restore",
        "#!/bin/sh\nin=$(mktemp)\ncat > \"$in\"\nif grep -q 'dport 2222' \"$in\"; then \
         rm -f \"$in\"; exec sleep 60; fi\n/usr/sbin/iptables-nft-restore \"$@\" < \"$in\"; \
         rc=$?\nrm -f \"$in\"\nexit $rc\n",
    );
    let started = Instant::now();
    let out = dir.shunt(
        &ns,
        &[
            "apply",
            "--backend",
            "nft",
            "--ipv6",
            "on",
            "--exclude-outbound-ports",
            "2222",
            "--wait",
            "2s",
        ],
    );
    let took = started.elapsed();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("iptables-nft-restore did not finish within 2s"),
        "{err}"
    );
    assert!(took < Duration::from_secs(20), "apply took {took:?}");
    assert_eq!(saves(&ns, "nft"), before, "IPv6 was left applied");
}

#[test]
fn a_killed_apply_is_named_by_check_and_repaired_by_the_next_apply() {
    require_netns!();
    let ns = Ns::new("killed");
    let opts = [
        "--backend",
        "legacy",
        "--ipv6",
        "on",
        "--redirect-dns",
        "--drop-invalid",
    ];
    let opts_dns = ["--dns-servers", "10.200.0.53,fd00:5::53"];
    // IPv6's restore stalls after reading its input, so apply is killed with IPv4 committed
    // and IPv6 not: the worst a SIGKILL can leave (README: faults).
    let dir = tempdir::Dir::new("killed");
    let pidfile = dir.0.join("stub.pid");
    dir.write_exec(
        "ip6tables-legacy-restore",
        &format!(
            "#!/bin/sh\necho $$ > {}\ncat > /dev/null\nexec sleep 30\n",
            pidfile.display()
        ),
    );
    let mut apply = shunt_command()
        .args(["apply", "--netns", &ns.path()])
        .args(opts)
        .args(opts_dns)
        .env("PATH", dir.path_with_system())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    // IPv4's restore has finished when its last table (nat) is in: the kill must not cut it.
    let v4_done = || {
        let save = ns.iptables_save("legacy", false);
        save.contains("SHUNT_DNS") && save.contains("-A OUTPUT -p tcp -j SHUNT_OUTPUT")
    };
    while !(v4_done() && pidfile.exists()) {
        assert!(Instant::now() < deadline, "IPv4 never got applied");
        std::thread::sleep(Duration::from_millis(10));
    }
    apply.kill().unwrap();
    let _ = apply.wait();
    // The stalled restore dies with shunt: left running, it could commit after the lock is
    // gone, under the next shunt's feet.
    let pid = std::fs::read_to_string(&pidfile).unwrap();
    let gone = || {
        std::fs::read_to_string(format!("/proc/{}/stat", pid.trim())).map_or(true, |s| {
            s.rsplit(')')
                .next()
                .is_some_and(|r| r.trim_start().starts_with('Z'))
        })
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while !gone() {
        if Instant::now() > deadline {
            let _ = Command::new("kill").args(["-9", pid.trim()]).status();
            panic!("the restore outlived the killed apply");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let check = |want: i32| {
        let out = ns.shunt(&[&["check"][..], &opts[..], &opts_dns[..]].concat());
        assert_eq!(out.status.code(), Some(want), "{}", stderr(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let drift = check(3);
    assert!(drift.contains("IPv6") && drift.contains("+ "), "{drift}");
    assert!(!drift.contains("IPv4"), "IPv4 was committed whole: {drift}");
    ok(&ns.shunt(&[&["apply"][..], &opts[..], &opts_dns[..]].concat()));
    check(0);
}

#[test]
fn clean_goes_on_past_a_failing_family_and_reports_it() {
    require_netns!();
    let ns = Ns::new("cleanfail");
    ok(&ns.shunt(&[
        "apply",
        "--backend",
        "nft",
        "--ipv6",
        "on",
        "--mode",
        "tproxy",
    ]));
    let dir = tempdir::Dir::new("cleanfail");
    dir.write_exec(
        "ip6tables-nft-save",
        "#!/bin/sh\necho 'ip6tables-nft-save: simulated failure' >&2\nexit 4\n",
    );
    let out = dir.shunt(&ns, &["clean", "--backend", "nft"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("simulated failure"),
        "{}",
        stderr(&out)
    );
    // IPv4's rules and both families' routing went anyway.
    assert!(!ns.iptables_save("nft", false).contains("SHUNT_"));
    for fam in ["-4", "-6"] {
        let rules = ns.must(&["ip", fam, "rule", "show"]);
        assert!(!rules.contains("fwmark"), "{fam}: {rules}");
    }
    assert!(ns.iptables_save("nft", true).contains("SHUNT_"));
    // The namespace is not stuck: a clean with working tools finishes the job, twice.
    ok(&ns.shunt(&["clean", "--backend", "nft"]));
    ok(&ns.shunt(&["clean", "--backend", "nft"]));
    assert!(!ns.iptables_save("nft", true).contains("SHUNT_"));
}

fn routing_state(ns: &Ns) -> String {
    let mut s = String::new();
    for fam in ["-4", "-6"] {
        s += &ns.must(&["ip", fam, "rule", "show"]);
        for table in ["77", "133"] {
            s += &ns
                .exec(&["ip", fam, "route", "show", "table", table])
                .stdout
                .iter()
                .map(|b| *b as char)
                .collect::<String>();
        }
    }
    s
}

#[test]
fn clean_and_reapply_remove_exactly_the_routing_apply_added_whatever_the_mark() {
    require_netns!();
    let ns = Ns::new("marks");
    let before = routing_state(&ns);
    let custom = [
        "--mode",
        "tproxy",
        "--tproxy-mark",
        "7",
        "--tproxy-route-table",
        "77",
    ];
    ok(&ns.shunt(
        &[
            &["apply", "--backend", "nft", "--ipv6", "on"][..],
            &custom[..],
        ]
        .concat(),
    ));
    assert!(routing_state(&ns).contains("lookup 77"));
    // clean with no tproxy options reads the mark from the rules it removes.
    ok(&ns.shunt(&["clean", "--backend", "nft"]));
    assert_eq!(
        routing_state(&ns),
        before,
        "clean left tproxy routing behind"
    );

    // tproxy -> redirect: the policy routing goes with the mangle rules.
    ok(&ns.shunt(
        &[
            &["apply", "--backend", "nft", "--ipv6", "on"][..],
            &custom[..],
        ]
        .concat(),
    ));
    ok(&ns.shunt(&["apply", "--backend", "nft", "--ipv6", "on"]));
    assert_eq!(routing_state(&ns), before, "redirect kept tproxy's routing");
    // A new mark and table replace the old ones.
    ok(&ns.shunt(
        &[
            &["apply", "--backend", "nft", "--ipv6", "on"][..],
            &custom[..],
        ]
        .concat(),
    ));
    ok(&ns.shunt(&[
        "apply",
        "--backend",
        "nft",
        "--ipv6",
        "on",
        "--mode",
        "tproxy",
    ]));
    let now = routing_state(&ns);
    assert!(
        now.contains("lookup 133") && !now.contains("lookup 77"),
        "{now}"
    );
    ok(&ns.shunt(&[
        "check",
        "--backend",
        "nft",
        "--ipv6",
        "on",
        "--mode",
        "tproxy",
    ]));
}

#[test]
fn the_kernels_route_tables_are_refused() {
    for table in ["0", "253", "254", "255"] {
        let out = shunt_command()
            .args(["render", "--mode", "tproxy", "--tproxy-route-table", table])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "table {table}");
        let err = stderr(&out);
        assert!(err.contains("--tproxy-route-table"), "{err}");
        assert!(table == "0" || err.contains("kernel's own"), "{err}");
    }
}

#[test]
fn an_empty_or_non_namespace_netns_is_refused_without_touching_anything() {
    require_netns!();
    // Run inside a namespace of our own, so a regression would only touch that one.
    let ns = Ns::new("emptyns");
    let shunt = common::SHUNT;
    for (env, args) in [
        (None, vec!["apply", "--netns", ""]),
        (Some(("SHUNT_NETNS", "")), vec!["apply"]),
        (Some(("SHUNT_NETNS", " ")), vec!["clean"]),
    ] {
        let mut cmd = Command::new("ip");
        scrub_env(&mut cmd)
            .args(["netns", "exec", &ns.name, shunt])
            .args(&args);
        if let Some((k, v)) = env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?} {env:?}: {}",
            stderr(&out)
        );
        assert!(stderr(&out).contains("--netns"), "{}", stderr(&out));
    }
    assert!(!ns.iptables_save("nft", false).contains("SHUNT_"));

    // A FIFO is refused at once (opening one for reading would block for a writer).
    let dir = tempdir::Dir::new("fifo");
    let fifo = dir.0.join("netns");
    must(&["mkfifo", &fifo.to_string_lossy()]);
    let started = Instant::now();
    let out = shunt_command()
        .args(["check", "--netns", &fifo.to_string_lossy(), "--wait", "60s"])
        .output()
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("not a network namespace"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_rollback_in_a_fresh_namespace_leaves_no_empty_tables_behind() {
    require_netns!();
    let ns = Ns::new("freshroll");
    let before = saves(&ns, "nft");
    // IPv4 succeeds and creates its tables; IPv6 fails, so IPv4 is rolled back.
    let stub = failing_last_table("nft");
    std::fs::remove_file(stub.0.join("iptables-nft-restore")).unwrap();
    let out = stub.shunt(
        &ns,
        &[
            "apply",
            "--backend",
            "nft",
            "--ipv6",
            "on",
            "--redirect-dns",
            "--dns-servers",
            "10.200.0.53",
            "--drop-invalid",
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(saves(&ns, "nft"), before, "the rollback left tables behind");
}
