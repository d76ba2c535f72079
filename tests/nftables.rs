//! The native nftables engine (`--backend nftables`) in namespaces the tests make: one
//! `inet shunt` table, replaced in one transaction, read back and compared, removed whole.
//! Its traffic behaviour is proven by the engine variants of `tests/capture.rs`.

mod common;

use std::process::Output;
use std::time::Duration;

use common::*;

fn skip_without_nft() -> bool {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join("nft").exists()))
        .unwrap_or(false);
    if !found {
        eprintln!("SKIPPED: nft is not installed (apt-get install nftables)");
    }
    !found
}

macro_rules! require_nft {
    () => {
        require_netns!();
        if skip_without_nft() {
            return;
        }
    };
}

fn ruleset(ns: &Ns) -> String {
    ns.must(&["nft", "list", "ruleset"])
}

fn nft(ns: &Ns, args: &[&str]) -> String {
    let mut full = vec!["nft"];
    full.extend_from_slice(args);
    ns.must(&full)
}

/// The name of the first named set in shunt's table.
fn first_set(ns: &Ns) -> String {
    nft(ns, &["list", "table", "inet", "shunt"])
        .lines()
        .find_map(|l| l.trim().strip_prefix("set ")?.strip_suffix(" {"))
        .expect("a set")
        .to_string()
}

fn apply(ns: &Ns, opts: &[&str]) -> Output {
    ns.shunt(&[&["apply", "--backend", "nftables", "--json"][..], opts].concat())
}

fn changes(out: &Output) -> usize {
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("apply --json");
    v["changes"].as_array().map_or(0, Vec::len)
}

#[test]
fn apply_twice_runs_one_transaction_and_leaves_the_ruleset_byte_identical() {
    require_nft!();
    let ns = Ns::new("nft-idem");
    let opts = [
        "--ipv6",
        "on",
        "--exclude-outbound-cidrs",
        "10.1.0.0/16,10.2.0.0/16,fd00:9::/64",
    ];
    let first = apply(&ns, &opts);
    ok(&first);
    assert_eq!(changes(&first), 1, "one transaction for both families");
    let after_first = ruleset(&ns);
    assert!(after_first.contains("table inet shunt"), "{after_first}");
    let second = apply(&ns, &opts);
    ok(&second);
    assert_eq!(changes(&second), 0, "the second apply must run nothing");
    assert_eq!(ruleset(&ns), after_first);
    ok(&ns.shunt(&[&["check", "--backend", "nftables"][..], &opts].concat()));
}

#[test]
fn changed_options_converge_with_nothing_stale() {
    require_nft!();
    let ns = Ns::new("nft-conv");
    ok(&apply(
        &ns,
        &[
            "--ipv6",
            "on",
            "--mode",
            "tproxy",
            "--redirect-dns",
            "--dns-servers",
            "10.200.0.53",
        ],
    ));
    let t = nft(&ns, &["list", "table", "inet", "shunt"]);
    assert!(
        t.contains("chain mangle_prerouting") && t.contains("chain raw_output"),
        "{t}"
    );
    assert!(ns.must(&["ip", "rule", "show"]).contains("lookup 133"));
    ok(&apply(&ns, &["--ipv6", "on"]));
    let t = nft(&ns, &["list", "table", "inet", "shunt"]);
    assert!(
        !t.contains("mangle") && !t.contains("raw_") && !t.contains("DNS"),
        "{t}"
    );
    assert!(
        !ns.must(&["ip", "rule", "show"]).contains("fwmark"),
        "tproxy routing left behind"
    );
    ok(&ns.shunt(&["check", "--backend", "nftables", "--ipv6", "on"]));
}

#[test]
fn a_transaction_that_fails_half_way_leaves_the_previous_table_exactly() {
    require_nft!();
    let ns = Ns::new("nft-fail");
    ok(&apply(&ns, &["--ipv6", "on", "--inbound-ports", "80"]));
    let before = ruleset(&ns);
    let change = [
        "apply",
        "--backend",
        "nftables",
        "--ipv6",
        "on",
        "--exclude-outbound-ports",
        "22",
    ];
    // Over netlink: the batch reaches the kernel with one bad element at its very end (a
    // hook of debug builds).
    let out = shunt_command()
        .args(change)
        .args(["--netns", &ns.path()])
        .env("SHUNT_TEST_NFT_BAD_ELEMENT", "1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("refused the nftables transaction at elements of set no_such_set"),
        "{}",
        stderr(&out)
    );
    assert_eq!(ruleset(&ns), before, "a refused batch changed the ruleset");
    // Through `nft -f -`: the same, with the bad element added to nft's input.
    let dir = tempdir::Dir::new("nftfail");
    dir.write_exec(
        "nft",
        "#!/bin/sh\nif [ \"$1\" = -f ]; then\n  { cat; echo 'add element inet shunt no_such_set { 10.9.9.9 }'; } | \
         /usr/sbin/nft \"$@\"\n  exit $?\nfi\nexec /usr/sbin/nft \"$@\"\n",
    );
    let out = shunt_command()
        .args(change)
        .args(["--netns", &ns.path()])
        .env("PATH", dir.path_with_system())
        .env("SHUNT_NFT_WRITER", "nft")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("nft failed"), "{}", stderr(&out));
    assert_eq!(
        ruleset(&ns),
        before,
        "a failed transaction changed the ruleset"
    );
    // Nothing was left half-way: the change applies cleanly now.
    ok(&ns.shunt(&change));
    assert!(nft(&ns, &["list", "table", "inet", "shunt"]).contains("tcp dport 22 return"));
}

#[test]
fn check_names_an_element_added_and_a_rule_deleted_by_hand() {
    require_nft!();
    let ns = Ns::new("nft-drift");
    let opts = [
        "--ipv6",
        "on",
        "--exclude-outbound-cidrs",
        "10.1.0.0/16,10.2.0.0/16",
    ];
    ok(&apply(&ns, &opts));
    let check = || ns.shunt(&[&["check", "--backend", "nftables"][..], &opts].concat());
    ok(&check());
    let set = first_set(&ns);
    nft(
        &ns,
        &["add", "element", "inet", "shunt", &set, "{ 10.3.0.0/16 }"],
    );
    let out = check();
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let diff = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        diff.contains("- elements = {") && diff.contains("10.3.0.0/16"),
        "{diff}"
    );
    // Repaired by the next apply; then a rule goes missing.
    ok(&apply(&ns, &opts));
    ok(&check());
    let listed = nft(
        &ns,
        &[
            "-a",
            "list",
            "chain",
            "inet",
            "shunt",
            "v4_nat_SHUNT_OUTPUT",
        ],
    );
    let handle = listed
        .lines()
        .find(|l| l.contains("oifname \"lo\" return") && !l.contains("saddr"))
        .and_then(|l| l.rsplit("# handle ").next())
        .expect("the lo rule")
        .trim()
        .to_string();
    nft(
        &ns,
        &[
            "delete",
            "rule",
            "inet",
            "shunt",
            "v4_nat_SHUNT_OUTPUT",
            "handle",
            &handle,
        ],
    );
    let out = check();
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let diff = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(diff.contains("+ oifname \"lo\" return"), "{diff}");
}

#[test]
fn clean_gives_the_ruleset_back_and_leaves_other_tables_alone() {
    require_nft!();
    let ns = Ns::new("nft-clean");
    nft(&ns, &["add", "table", "inet", "other"]);
    nft(
        &ns,
        &[
            "add",
            "chain",
            "inet",
            "other",
            "keep",
            "{ type filter hook input priority 0; }",
        ],
    );
    nft(
        &ns,
        &[
            "add", "rule", "inet", "other", "keep", "tcp", "dport", "22", "accept",
        ],
    );
    let before = ruleset(&ns);
    ok(&apply(
        &ns,
        &[
            "--ipv6",
            "on",
            "--mode",
            "tproxy",
            "--tproxy-mark",
            "7",
            "--tproxy-route-table",
            "77",
        ],
    ));
    assert_ne!(ruleset(&ns), before);
    ok(&ns.shunt(&["clean", "--backend", "nftables"]));
    assert_eq!(ruleset(&ns), before);
    for fam in ["-4", "-6"] {
        assert!(
            !ns.must(&["ip", fam, "rule", "show"]).contains("fwmark"),
            "{fam} routing left"
        );
    }
    ok(&ns.shunt(&["clean", "--backend", "nftables"]));
    assert_eq!(ruleset(&ns), before);
}

#[test]
fn one_engine_at_a_time_and_auto_follows_the_table() {
    require_nft!();
    let ns = Ns::new("nft-coexist");
    ok(&ns.shunt(&["apply", "--backend", "nft", "--ipv6", "off"]));
    let out = apply(&ns, &["--ipv6", "off"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("shunt clean --backend nft"),
        "{}",
        stderr(&out)
    );
    ok(&ns.shunt(&["clean", "--backend", "nft"]));
    ok(&apply(&ns, &["--ipv6", "off"]));
    let out = ns.shunt(&["apply", "--backend", "legacy", "--ipv6", "off"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("shunt clean --backend nftables"),
        "{}",
        stderr(&out)
    );
    // auto stays with the engine that holds shunt's rules.
    let out = ns.shunt(&["apply", "--json", "--ipv6", "off"]);
    ok(&out);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["backend"], "nftables", "{v}");
    assert!(!ns.iptables_save("nft", false).contains("SHUNT_"));
    // clean with auto removes it too.
    ok(&ns.shunt(&["clean"]));
    let out = ns.exec(&["nft", "list", "table", "inet", "shunt"]);
    assert!(!out.status.success(), "the table is still there");
}

#[test]
fn render_prints_the_transaction_and_explain_reads_the_table() {
    let out = shunt_command()
        .args(["render", "--backend", "nftables", "--ipv6", "off"])
        .output()
        .unwrap();
    let text = ok(&out);
    assert!(
        text.starts_with("add table inet shunt\ndelete table inet shunt\ntable inet shunt {"),
        "{text}"
    );
    assert!(
        text.contains("meta nfproto ipv4 jump v4_nat_OUTPUT"),
        "{text}"
    );
    assert!(!text.contains("ipv6"), "{text}");
    // explain walks the installed table's base chains.
    require_nft!();
    let ns = Ns::new("nft-explain");
    ok(&apply(&ns, &["--ipv6", "off"]));
    let explain = |uid: &str| {
        let out = ns.shunt(&[
            "explain",
            "out",
            "tcp",
            "10.0.0.1:80",
            "--uid",
            uid,
            "--gid",
            uid,
            "--iface",
            "eth0",
            "--src",
            "10.0.0.2",
            "--backend",
            "nftables",
            "--json",
        ]);
        serde_json::from_str::<serde_json::Value>(&ok(&out)).unwrap()
    };
    let v = explain("1000");
    assert_eq!(v["verdict"], "redirect", "{v}");
    assert_eq!(v["to_port"], 15001, "{v}");
    assert_eq!(v["trace"][0]["table"], "inet shunt", "{v}");
    assert_eq!(v["trace"][0]["chain"], "nat_output", "{v}");
    assert_eq!(explain("1337")["verdict"], "accept");
}

#[test]
fn a_too_old_nft_is_refused_with_the_version_needed() {
    require_nft!();
    let ns = Ns::new("nft-old");
    let dir = tempdir::Dir::new("nftold");
    dir.write_exec(
        "nft",
        "#!/bin/sh\nif [ \"$1\" = --version ]; then echo 'nftables v0.9.0 (Fearless Fosdick)'; exit 0; fi\n\
         echo 'Error: syntax error, unexpected tproxy' >&2\nexit 1\n",
    );
    let run = |writer: &str| {
        let out = shunt_command()
            .args(["apply", "--backend", "nftables", "--netns", &ns.path()])
            .env("PATH", dir.path_with_system())
            .env("SHUNT_NFT_WRITER", writer)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
        let err = stderr(&out);
        assert!(
            err.contains("nft 0.9.3 or newer") && err.contains("v0.9.0"),
            "{err}"
        );
    };
    // Writing through nft, the first apply fails, and writes nothing.
    run("nft");
    assert!(ns.exec(&["nft", "list", "ruleset"]).stdout.is_empty());
    // Over netlink a fresh namespace needs no nft; reading the table back does.
    let out = shunt_command()
        .args(["apply", "--backend", "nftables", "--netns", &ns.path()])
        .env("PATH", dir.path_with_system())
        .output()
        .unwrap();
    ok(&out);
    run("netlink");
}

#[test]
fn without_nft_the_engine_names_the_package() {
    require_netns!();
    let ns = Ns::new("nft-missing");
    let dir = tempdir::Dir::new("nftmissing");
    // A PATH with iptables and ip but no nft.
    for tool in [
        "ip",
        "iptables-nft-save",
        "iptables-legacy-save",
        "ip6tables-nft-save",
    ] {
        let real = common::must(&["sh", "-c", &format!("command -v {tool}")]);
        std::os::unix::fs::symlink(real.trim(), dir.0.join(tool)).unwrap();
    }
    let out = shunt_command()
        .args(["apply", "--backend", "nftables", "--netns", &ns.path()])
        .env("PATH", &dir.0)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("apt-get install nftables"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn an_interface_wildcard_excludes_every_matching_interface() {
    require_nft!();
    let t = Topology::new();
    let remote = t.remote.listen(&hp(REMOTE_V4, 8080));
    ok(&t.pod.shunt(&[
        "apply",
        "--backend",
        "nftables",
        "--ipv6",
        "off",
        "--exclude-interfaces",
        "eth+",
    ]));
    // Through eth0, which `eth+` names: not captured, so the remote itself accepts.
    let _c = t.pod.connect_as(1000, 1000, &hp(REMOTE_V4, 8080)).unwrap();
    assert!(
        accept_within(&remote, std::time::Duration::from_secs(3)).is_some(),
        "eth+ did not exclude eth0"
    );
    // Without the wildcard the same connection is captured (nothing listens on 15001).
    ok(&t
        .pod
        .shunt(&["apply", "--backend", "nftables", "--ipv6", "off"]));
    assert!(t.pod.connect_as(1000, 1000, &hp(REMOTE_V4, 8080)).is_err());
}

#[test]
fn migrate_moves_the_rules_between_engines_both_ways() {
    require_nft!();
    let ns = Ns::new("nft-migrate");
    ok(&ns.shunt(&[
        "apply",
        "--backend",
        "nft",
        "--ipv6",
        "on",
        "--mode",
        "tproxy",
    ]));
    let out = apply(&ns, &["--ipv6", "on", "--migrate"]);
    ok(&out);
    assert!(!ns.iptables_save("nft", false).contains("SHUNT_"));
    assert!(!ns.iptables_save("nft", true).contains("SHUNT_"));
    assert!(
        !ns.must(&["ip", "rule", "show"]).contains("fwmark"),
        "tproxy routing stayed"
    );
    ok(&ns.shunt(&["check", "--backend", "nftables", "--ipv6", "on"]));
    // And back, to legacy.
    ok(&ns.shunt(&["apply", "--backend", "legacy", "--ipv6", "on", "--migrate"]));
    assert!(!ns
        .exec(&["nft", "list", "table", "inet", "shunt"])
        .status
        .success());
    ok(&ns.shunt(&["check", "--backend", "legacy", "--ipv6", "on"]));
    // Without --migrate the move is refused and says how.
    let out = apply(&ns, &["--ipv6", "on"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("--migrate"), "{}", stderr(&out));
}

#[test]
fn auto_picks_nftables_on_a_node_without_iptables() {
    require_nft!();
    let ns = Ns::new("nft-noipt");
    let dir = tempdir::Dir::new("noiptables");
    for tool in ["ip", "nft"] {
        let real = common::must(&["sh", "-c", &format!("command -v {tool}")]);
        std::os::unix::fs::symlink(real.trim(), dir.0.join(tool)).unwrap();
    }
    let out = shunt_command()
        .args(["apply", "--json", "--ipv6", "off", "--netns", &ns.path()])
        .env("PATH", &dir.0)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&ok(&out).into_bytes()).unwrap();
    assert_eq!(v["backend"], "nftables", "{v}");
    assert!(ns
        .must(&["nft", "list", "table", "inet", "shunt"])
        .contains("v4_nat_OUTPUT"));
}

/// A PATH directory whose `nft`, `ip` and iptables tools log their arguments to `log` and
/// then run the real ones.
fn logging_tools(tag: &str) -> (tempdir::Dir, std::path::PathBuf) {
    let dir = tempdir::Dir::new(tag);
    let log = std::env::temp_dir().join(format!("shunt-{tag}-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&log);
    for tool in [
        "nft",
        "ip",
        "iptables-nft-save",
        "ip6tables-nft-save",
        "iptables-nft-restore",
        "ip6tables-nft-restore",
        "iptables-legacy-save",
    ] {
        dir.write_exec(
            tool,
            &format!(
                "#!/bin/sh\necho \"{tool} $*\" >> {}\nexec /usr/sbin/{tool} \"$@\"\n",
                log.display()
            ),
        );
    }
    (dir, log)
}

fn take_log(log: &std::path::Path) -> Vec<String> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let _ = std::fs::remove_file(log);
    text.lines().map(str::to_string).collect()
}

#[test]
fn a_fresh_namespace_is_read_through_netlink_and_a_second_apply_still_reads_the_tools() {
    require_nft!();
    // nftables engine: the kernel says there is no table, and the transaction goes over
    // netlink, so no tool runs at all; ::6 goes on lo without `ip`.
    let ns = Ns::new("nft-fresh");
    let (dir, log) = logging_tools("nftfresh");
    let args = ["apply", "--backend", "nftables", "--ipv6", "on"];
    ok(&dir.shunt(&ns, &args));
    assert_eq!(take_log(&log), Vec::<String>::new());
    assert!(ns
        .must(&["ip", "-6", "addr", "show", "dev", "lo"])
        .contains("::6/128"));
    // With the table there, it is listed, found equal, and nothing is written.
    ok(&dir.shunt(&ns, &args));
    assert_eq!(take_log(&log), vec!["nft list table inet shunt"]);
    // Another tool's iptables-nft table is seen, so the look for shunt's rules there runs.
    ns.must(&[
        "iptables-nft",
        "-t",
        "filter",
        "-A",
        "INPUT",
        "-p",
        "udp",
        "-j",
        "ACCEPT",
    ]);
    ok(&dir.shunt(&ns, &args));
    let mut started = take_log(&log);
    started.sort();
    assert_eq!(
        started,
        vec!["iptables-nft-save ", "nft list table inet shunt"]
    );

    // iptables-nft: a fresh namespace starts the two restores and nothing else.
    let ns = Ns::new("ipt-fresh");
    let args = ["apply", "--backend", "nft", "--ipv6", "on"];
    ok(&dir.shunt(&ns, &args));
    let mut started = take_log(&log);
    started.sort();
    assert_eq!(
        started,
        vec![
            "ip6tables-nft-restore --noflush -w 10",
            "iptables-nft-restore --noflush -w 10"
        ]
    );
    // Its rules are there now: the second apply reads both families and writes nothing.
    ok(&dir.shunt(&ns, &args));
    let mut started = take_log(&log);
    started.sort();
    assert!(
        started.iter().any(|l| l.starts_with("iptables-nft-save"))
            && started.iter().any(|l| l.starts_with("ip6tables-nft-save"))
            && !started.iter().any(|l| l.contains("restore")),
        "{started:?}"
    );
}

#[test]
fn the_priority_offset_decides_whose_nat_binds_first_against_another_tools_iptables_rule() {
    require_nft!();
    // Another tool's iptables-nft nat OUTPUT rule sends port 9999 to 7777; shunt's table
    // sends it to the proxy (15001). The kernel keeps the first NAT binding a connection gets,
    // so the base chain priority decides: -10 (the default) before iptables' nat, 10 after.
    for (offset, shunt_first) in [(None, true), (Some("10"), false), (Some("-10"), true)] {
        let t = Topology::new();
        t.pod.must(&[
            "iptables-nft",
            "-w",
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "--dport",
            "9999",
            "-j",
            "REDIRECT",
            "--to-ports",
            "7777",
        ]);
        let mut args = vec!["apply", "--backend", "nftables", "--ipv6", "off"];
        if let Some(o) = offset {
            args.extend(["--nft-priority-offset", o]);
        }
        ok(&t.pod.shunt(&args));
        let proxy = t.pod.listen("0.0.0.0:15001");
        let other = t.pod.listen("0.0.0.0:7777");
        let _app = t.pod.connect_as(1000, 1000, &hp(REMOTE_V4, 9999)).unwrap();
        let (first, second) = if shunt_first {
            (&proxy, &other)
        } else {
            (&other, &proxy)
        };
        let (s, _) = accept_within(first, Duration::from_secs(5))
            .unwrap_or_else(|| panic!("offset {offset:?}: the expected listener got nothing"));
        assert_eq!(original_dst(&s), hp(REMOTE_V4, 9999).parse().unwrap());
        assert!(
            accept_within(second, Duration::from_millis(200)).is_none(),
            "offset {offset:?}: both listeners got a connection"
        );
        // check compares the priorities too: the other offset is drift.
        let other_offset = if shunt_first { "10" } else { "-10" };
        let out = t.pod.shunt(&[
            "check",
            "--backend",
            "nftables",
            "--ipv6",
            "off",
            "--nft-priority-offset",
            other_offset,
        ]);
        assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
        assert!(String::from_utf8_lossy(&out.stdout).contains("priority"));
    }
}

#[test]
fn an_nft_that_spells_the_table_otherwise_still_reads_back_in_sync() {
    require_nft!();
    // A stand-in for another nft version: it lists `meta l4proto tcp` as `meta l4proto 6`,
    // so its listing never equals shunt's rendering line for line.
    let dir = tempdir::Dir::new("nftspell");
    dir.write_exec(
        "nft",
        "#!/bin/sh\nif [ \"$1\" = list ]; then\n  out=$(/usr/sbin/nft \"$@\") || exit $?\n  \
         printf '%s\\n' \"$out\" | sed 's/meta l4proto tcp/meta l4proto 6/g'\n  exit 0\nfi\n\
         exec /usr/sbin/nft \"$@\"\n",
    );
    let ns = Ns::new("nft-spell");
    let args = [
        "apply",
        "--backend",
        "nftables",
        "--ipv6",
        "on",
        "--json",
        "--exclude-outbound-cidrs",
        "10.1.0.0/16,10.2.0.0/16",
    ];
    let first = dir.shunt(&ns, &args);
    ok(&first);
    assert_eq!(changes(&first), 1);
    let installed = ruleset(&ns);
    // The second apply finds the table as this nft spells it and writes nothing.
    let second = dir.shunt(&ns, &args);
    ok(&second);
    assert_eq!(changes(&second), 0, "{}", stderr(&second));
    assert_eq!(ruleset(&ns), installed);
    let check = [
        "check",
        "--backend",
        "nftables",
        "--ipv6",
        "on",
        "--exclude-outbound-cidrs",
        "10.1.0.0/16,10.2.0.0/16",
    ];
    ok(&dir.shunt(&ns, &check));
    // Real drift is still drift, and shown in this nft's spelling.
    let set = first_set(&ns);
    nft(
        &ns,
        &["add", "element", "inet", "shunt", &set, "{ 10.9.0.0/16 }"],
    );
    let out = dir.shunt(&ns, &check);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("10.9.0.0/16"));
}

#[test]
fn the_netlink_writer_installs_what_nft_installs_for_every_plan_shape() {
    require_nft!();
    // Each option set written both ways into a namespace of its own: the kernel must hold the
    // same expressions, sets and elements (`nft --debug=netlink` prints them), and nft must
    // list the same text.
    let shapes: [&[&str]; 6] = [
        &[],
        &[
            "--redirect-dns",
            "--dns-servers",
            "10.0.0.10,fd00::10",
            "--drop-invalid",
            "--exclude-interfaces",
            "veth+,eth9",
            "--exclude-outbound-cidrs",
            "10.0.0.0/8,192.168.1.1,172.16.0.0/12,fd00::/8,fd01::/16",
            "--outbound-ports",
            "80,8000-8080",
            "--exclude-outbound-ports",
            "22,2000-2100",
            "--inbound-ports",
            "80,443",
            "--exclude-inbound-ports",
            "9000",
            "--proxy-uid",
            "1337,2000-2002",
            "--outbound-cidrs",
            "10.0.0.0/8,10.1.0.0/16,fd00::/7",
            "--virt-interfaces",
            "tap0",
        ],
        &[
            "--mode",
            "tproxy",
            "--tproxy-mark",
            "7",
            "--proxy-gid",
            "5,7,9-12",
            // Overlapping and touching ranges: one merged interval set.
            "--proxy-uid",
            "1000-2000,1500,3000-3999,4000-4999",
            "--exclude-outbound-ports",
            "65535,1-5",
            "--drop-invalid",
        ],
        // Intervals at both ends of the key space, touching ones, and a /0.
        &[
            "--proxy-uid",
            "0-10,65000",
            "--exclude-outbound-cidrs",
            "0.0.0.0/8,11.0.0.0/8,10.0.0.0/8,255.255.255.255,::/8,ffff::/16,fe80::/10",
            "--outbound-ports",
            "65535",
        ],
        &[
            "--exclude-outbound-cidrs",
            "0.0.0.0/0",
            "--outbound-cidrs",
            "::/0",
        ],
        &[
            "--outbound-cidrs",
            "10.0.0.0/12,192.168.0.0/24,fd00::/8",
            "--inbound-ports",
            "8000-8080",
            "--exclude-inbound-ports",
            "8001",
            "--proxy-gid",
            "1,2,3",
            // Every interface: iptables' `+`, which nft cannot spell.
            "--exclude-interfaces",
            "+",
        ],
    ];
    let listing = |ns: &Ns| {
        let kernel = nft(ns, &["--debug=netlink", "list", "ruleset"]);
        // Anonymous sets are numbered by the kernel in the order they were made.
        let kernel: String = kernel
            .split("__set")
            .enumerate()
            .map(|(i, part)| {
                if i == 0 {
                    part.to_string()
                } else {
                    part.trim_start_matches(|c: char| c.is_ascii_digit())
                        .to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("__set");
        // A hash set dumps its elements in hash order, which differs between two sets.
        let mut lines: Vec<String> = Vec::new();
        let mut elements: Vec<&str> = Vec::new();
        for line in kernel.lines() {
            if line.starts_with("\telement ") {
                elements.push(line);
                continue;
            }
            elements.sort_unstable();
            lines.extend(elements.drain(..).map(str::to_string));
            lines.push(line.to_string());
        }
        elements.sort_unstable();
        lines.extend(elements.drain(..).map(str::to_string));
        (lines.join("\n"), ruleset(ns))
    };
    // 1,500 prefixes that do not aggregate: 3,001 elements, sent in several messages.
    let many = (0..1500)
        .map(|i| format!("10.{}.{}.0/24", i / 128, (i % 128) * 2))
        .collect::<Vec<_>>()
        .join(",");
    let many: &[&str] = &["--exclude-outbound-cidrs", &many];
    for shape in shapes.into_iter().chain([many]) {
        let args = [
            &["apply", "--backend", "nftables", "--ipv6", "on"][..],
            shape,
        ]
        .concat();
        let native = Ns::new("nft-wire-a");
        let by_nft = Ns::new("nft-wire-b");
        ok(&native.shunt(&args));
        let out = shunt_command()
            .args(&args)
            .args(["--netns", &by_nft.path()])
            .env("SHUNT_NFT_WRITER", "nft")
            .output()
            .unwrap();
        ok(&out);
        let (kernel_a, text_a) = listing(&native);
        let (kernel_b, text_b) = listing(&by_nft);
        assert!(text_a.contains("table inet shunt"), "{text_a}");
        let named = &shape[..shape.len().min(24)];
        assert_eq!(text_a, text_b, "nft lists another table for {named:?}");
        assert_eq!(
            kernel_a, kernel_b,
            "the kernel holds other rules for {named:?}"
        );
        let check = [
            &["check", "--backend", "nftables", "--ipv6", "on"][..],
            shape,
        ]
        .concat();
        ok(&native.shunt(&check));
    }
}
