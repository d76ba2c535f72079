//! `shunt istio-iptables` against Istio's own rules, with the kernel as the judge.
//!
//! For each configuration, the rules Istio's istio-iptables writes for it
//! (`tests/fixtures/istio/<case>.v4` / `.v6`, made by `generate.py` there from Istio's rule
//! order) go into one fresh pod namespace, `shunt istio-iptables` with the same flags and
//! environment into another, and the same connections are made in both: outbound from the
//! proxy's and the app's uids and gids to remote, pod-local and loopback addresses on captured,
//! excluded and tunnel ports, inbound on captured and excluded ports, DNS over UDP and TCP to
//! the resolv.conf servers and to another one. Every probe must land in the same place (the same
//! listener, with the same original destination).
//!
//! Engines: shunt writes with iptables-nft, iptables-legacy or its native nftables engine;
//! Istio's rules go in with the iptables flavour of the run (nft for the nftables run).

mod common;

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use common::*;

const INJECTOR: &[&str] = &[
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
    "15090,15021,15020",
];

/// The pod's resolv.conf in every case (generate.py's DNS_V4 and DNS_V6).
const RESOLV_CONF: &str = "nameserver 10.200.0.1\nnameserver 127.0.0.53\nnameserver fd00:5::1\n";

/// One configuration: its name (the fixture's), istio-iptables flags, environment.
type Case = (
    &'static str,
    Vec<&'static str>,
    Vec<(&'static str, &'static str)>,
);

/// generate.py's CASES, in the same order.
fn cases() -> Vec<Case> {
    let inj = |more: &[&'static str]| {
        let mut v = INJECTOR.to_vec();
        v.extend_from_slice(more);
        v
    };
    vec![
        ("injector", inj(&[]), vec![]),
        ("injector-dual-stack", inj(&["--dual-stack"]), vec![]),
        ("empty", vec![], vec![]),
        ("inbound-wildcard", vec!["-b", "*"], vec![]),
        ("inbound-include", vec!["-b", "8080,15008"], vec![]),
        (
            "inbound-include-d-ignored",
            vec!["-b", "8080", "-d", "9090"],
            vec![],
        ),
        ("outbound-ipnets", vec!["-i", "10.200.1.0/24"], vec![]),
        (
            "outbound-exclude",
            vec!["-i", "*", "-x", "10.200.1.0/24", "-b", "*"],
            vec![],
        ),
        ("outbound-ports-include", vec!["-q", "2222,3333"], vec![]),
        (
            "outbound-ports-exclude",
            vec!["-i", "*", "-o", "2222", "-b", "*", "-d", "9090"],
            vec![],
        ),
        (
            "exclude-x-and-q",
            vec!["-i", "*", "-x", "10.200.0.1/32", "-q", "2222"],
            vec![],
        ),
        (
            "uid-gid",
            vec!["-u", "3,4", "-g", "1,2", "-i", "*", "-b", "*"],
            vec![],
        ),
        ("kube-virt-all", vec!["-i", "*", "-k", "eth0"], vec![]),
        (
            "kube-virt-ipnets",
            vec!["-i", "10.200.1.0/24", "-k", "eth0", "-b", "*"],
            vec![],
        ),
        (
            "exclude-nic",
            vec!["-i", "*", "-b", "*", "-c", "eth0"],
            vec![],
        ),
        (
            "loopback-outbound-iprange",
            vec!["-i", "127.1.2.3/32", "-u", "3,4", "-g", "1,2"],
            vec![],
        ),
        (
            "loopback-range-wide",
            vec!["-i", "127.0.0.0/8,10.200.1.0/24", "-b", "*"],
            vec![],
        ),
        (
            "host-loopback-cidr",
            vec!["-i", "*", "-b", "*"],
            vec![("ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR", "127.0.0.1/8")],
        ),
        ("dns", vec!["-i", "*", "-b", "*", "--redirect-dns"], vec![]),
        (
            "dns-capture-all",
            vec!["-i", "*", "-b", "*", "--redirect-dns", "--capture-all-dns"],
            vec![],
        ),
        (
            "dns-uid-gid",
            vec!["--redirect-dns", "-u", "3,4", "-g", "1,2"],
            vec![],
        ),
        (
            "dns-env-alias",
            vec!["-i", "*", "-b", "*"],
            vec![("ISTIO_META_DNS_CAPTURE", "true")],
        ),
        (
            "dns-dual-stack",
            vec!["-i", "*", "-b", "*", "--redirect-dns", "--dual-stack"],
            vec![],
        ),
        (
            "owner-groups",
            vec!["-i", "*", "-b", "*"],
            vec![("ISTIO_OUTBOUND_OWNER_GROUPS", "202,1000")],
        ),
        (
            "owner-groups-exclude",
            vec!["-i", "*", "--redirect-dns"],
            vec![("ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE", "1000")],
        ),
        ("drop-invalid", inj(&["--drop-invalid"]), vec![]),
        // The shapes of Istio's ip-range, ipv6-uid-gid, ipv6-outbound-ports and tproxy
        // cases, on this topology's addresses.
        (
            "ip-range",
            vec![
                "-x",
                "10.200.1.0/24",
                "-i",
                "10.200.0.0/16",
                "--redirect-dns",
                "-g",
                "1,2",
                "-u",
                "3,4",
            ],
            vec![],
        ),
        (
            "ipv6-uid-gid",
            vec![
                "-b",
                "8080,9090",
                "-d",
                "6000,7000",
                "-k",
                "eth0,eth1",
                "-u",
                "3,4",
                "-g",
                "1,2",
                "--dual-stack",
                "-x",
                "fd00:5:1::/64",
                "-i",
                "fd00:5:1::/64",
            ],
            vec![],
        ),
        (
            "ipv6-outbound-ports",
            vec!["-q", "2222,3333", "--dual-stack"],
            vec![],
        ),
        (
            "tproxy-ip-range",
            vec![
                "-m",
                "TPROXY",
                "-b",
                "*",
                "-x",
                "10.200.1.0/24",
                "-i",
                "10.200.0.0/16",
                "--redirect-dns",
                "-c",
                "not-istio-nic",
                "--dual-stack",
            ],
            vec![],
        ),
        (
            "tproxy",
            vec!["-m", "TPROXY", "-i", "*", "-b", "*", "-d", "9090"],
            vec![],
        ),
        (
            "tproxy-include",
            vec!["-m", "TPROXY", "-b", "8080,15008", "-i", "10.200.1.0/24"],
            vec![],
        ),
        (
            "tproxy-dns-exclude-nic",
            vec![
                "-m",
                "TPROXY",
                "-i",
                "*",
                "-b",
                "*",
                "--redirect-dns",
                "-c",
                "eth9",
                "--dual-stack",
            ],
            vec![],
        ),
    ]
}

fn fixture(name: &str) -> Option<String> {
    let path = format!("{}/tests/fixtures/istio/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(path).ok()
}

/// The value after `flag` in `flags`, or `default`.
fn flag<'a>(flags: &[&'a str], name: &str, default: &'a str) -> &'a str {
    flags
        .iter()
        .position(|f| *f == name)
        .and_then(|i| flags.get(i + 1).copied())
        .unwrap_or(default)
}

// === Where a connection lands ===

/// Every listener a probe can reach, in the pod and on the remote.
struct Landing {
    tcp: Vec<(&'static str, TcpListener)>,
    udp: Vec<(&'static str, UdpSocket)>,
}

/// A transparent TCP listener (a tproxy-mode proxy's inbound port): one per family, as the
/// IPv4 one's connections keep 0.0.0.0:15006.
fn transparent_listener(ns: &Ns, addr: SocketAddr) -> TcpListener {
    use nix::sys::socket::{self as s, AddressFamily, SockFlag, SockType, SockaddrStorage};
    ns.handle
        .run(move || {
            let family = if addr.is_ipv6() {
                AddressFamily::Inet6
            } else {
                AddressFamily::Inet
            };
            let fd = s::socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).unwrap();
            s::setsockopt(&fd, s::sockopt::IpTransparent, &true).unwrap();
            s::setsockopt(&fd, s::sockopt::ReuseAddr, &true).unwrap();
            if addr.is_ipv6() {
                s::setsockopt(&fd, s::sockopt::Ipv6V6Only, &true).unwrap();
            }
            s::bind(fd.as_raw_fd(), &SockaddrStorage::from(addr)).unwrap();
            s::listen(&fd, s::Backlog::new(64).unwrap()).unwrap();
            TcpListener::from(fd)
        })
        .unwrap()
}

impl Landing {
    fn new(t: &Topology) -> Landing {
        let mut tcp = Vec::new();
        for (name, ns, port) in [
            ("outbound", &t.pod, 15001),
            ("dns", &t.pod, 15053),
            ("pod:8080", &t.pod, 8080),
            ("pod:9090", &t.pod, 9090),
            ("pod:15008", &t.pod, 15008),
            ("pod:53", &t.pod, 53),
            ("remote:8080", &t.remote, 8080),
            ("remote:2222", &t.remote, 2222),
            ("remote:3333", &t.remote, 3333),
            ("remote:53", &t.remote, 53),
        ] {
            tcp.push((name, ns.listen(&format!("[::]:{port}"))));
        }
        for addr in ["0.0.0.0:15006", "[::]:15006"] {
            tcp.push((
                "inbound",
                transparent_listener(&t.pod, addr.parse().unwrap()),
            ));
        }
        for (_, l) in &tcp {
            l.set_nonblocking(true).unwrap();
        }
        let mut udp = Vec::new();
        for (name, ns, port) in [
            ("dns-udp", &t.pod, 15053),
            ("pod-udp:53", &t.pod, 53),
            ("remote-udp:53", &t.remote, 53),
        ] {
            let addr: SocketAddr = format!("[::]:{port}").parse().unwrap();
            let s = ns
                .handle
                .run(move || UdpSocket::bind(addr))
                .unwrap()
                .unwrap();
            s.set_nonblocking(true).unwrap();
            udp.push((name, s));
        }
        Landing { tcp, udp }
    }

    /// Where a TCP connection from `from` as uid/gid (bound to `src` when given) to `dst`
    /// lands: a listener's name, with the original destination for the proxy's ports.
    fn tcp(&self, from: &Ns, uid: u32, gid: u32, src: Option<&str>, dst: &str) -> String {
        let _client = match from.connect_from(uid, gid, src, dst) {
            Ok(s) => s,
            Err(e) => return format!("refused ({})", e.kind()),
        };
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut last = false;
        while !last {
            last = Instant::now() >= deadline;
            for (name, l) in &self.tcp {
                if let Ok((s, _)) = l.accept() {
                    if !matches!(*name, "outbound" | "inbound" | "dns") {
                        return name.to_string();
                    }
                    // REDIRECT: the address before NAT; TPROXY: the local address is it.
                    let local = s.local_addr().unwrap();
                    let orig = shunt::socket::original_dst(&s, local)
                        .map(shunt::socket::unmap)
                        .unwrap_or_else(|_| shunt::socket::unmap(local));
                    return format!("{name} {orig}");
                }
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        "nowhere".into()
    }

    /// Where a UDP datagram lands.
    fn udp(&self, from: &Ns, uid: u32, gid: u32, dst: &str) -> String {
        let dst: SocketAddr = dst.parse().unwrap();
        let sent = from
            .handle
            .run(move || {
                nix::unistd::setfsgid(nix::unistd::Gid::from_raw(gid));
                nix::unistd::setfsuid(nix::unistd::Uid::from_raw(uid));
                let any: SocketAddr = if dst.is_ipv4() {
                    "0.0.0.0:0".parse().unwrap()
                } else {
                    "[::]:0".parse().unwrap()
                };
                let s = UdpSocket::bind(any)?;
                s.send_to(b"probe", dst).map(|_| ())
            })
            .unwrap();
        if let Err(e) = sent {
            return format!("send failed ({})", e.kind());
        }
        let deadline = Instant::now() + Duration::from_millis(500);
        let mut buf = [0u8; 16];
        let mut last = false;
        while !last {
            last = Instant::now() >= deadline;
            for (name, s) in &self.udp {
                if s.recv_from(&mut buf).is_ok() {
                    return name.to_string();
                }
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        "nowhere".into()
    }
}

// === The probes ===

enum Probe {
    Tcp {
        out: bool,
        uid: u32,
        gid: u32,
        src: Option<&'static str>,
        dst: String,
    },
    Udp {
        uid: u32,
        gid: u32,
        dst: String,
    },
}

impl Probe {
    fn describe(&self) -> String {
        match self {
            Probe::Tcp {
                out: true,
                uid,
                gid,
                src,
                dst,
            } => format!(
                "tcp out uid {uid} gid {gid}{} -> {dst}",
                src.map(|s| format!(" from {s}")).unwrap_or_default()
            ),
            Probe::Tcp { dst, .. } => format!("tcp in -> {dst}"),
            Probe::Udp { uid, gid, dst } => format!("udp out uid {uid} gid {gid} -> {dst}"),
        }
    }

    fn run(&self, t: &Topology, l: &Landing) -> String {
        match self {
            Probe::Tcp {
                out,
                uid,
                gid,
                src,
                dst,
            } => {
                let from = if *out { &t.pod } else { &t.remote };
                l.tcp(from, *uid, *gid, *src, dst)
            }
            Probe::Udp { uid, gid, dst } => l.udp(&t.pod, *uid, *gid, dst),
        }
    }
}

/// The probes for one configuration: who sends (the app, each proxy uid and gid alone, both,
/// an app in group 202), where to, in each family Istio writes rules for.
fn probes(flags: &[&str]) -> Vec<Probe> {
    let uids: Vec<u32> = flag(flags, "-u", "1337")
        .split(',')
        .map(|u| u.parse().unwrap())
        .collect();
    let gids: Vec<u32> = flag(flags, "-g", flag(flags, "-u", "1337"))
        .split(',')
        .map(|g| g.parse().unwrap())
        .collect();
    let mut senders = vec![(1000, 1000), (2000, 202), (uids[0], gids[0])];
    senders.extend(uids.iter().map(|u| (*u, 1000)));
    senders.extend(gids.iter().map(|g| (1000, *g)));
    let dual = flags.contains(&"--dual-stack");
    let mut families = vec![(POD_V4, REMOTE_V4, REMOTE2_V4, "127.0.0.1")];
    if dual {
        families.push((POD_V6, REMOTE_V6, REMOTE2_V6, "::1"));
    }
    let mut out = Vec::new();
    for (pod, remote, remote2, lo) in families {
        let mut dsts = vec![
            hp(remote, 8080),
            hp(remote, 2222),
            hp(remote, 3333),
            hp(remote, 53),
            hp(remote2, 8080),
            hp(remote2, 53),
            hp(pod, 8080),
            hp(pod, 9090),
            hp(pod, 15008),
            hp(pod, 53),
            hp(lo, 8080),
            hp(lo, 53),
        ];
        if pod == POD_V4 {
            dsts.extend(["127.0.0.53:8080", "127.0.0.53:53", "127.1.2.3:8080"].map(String::from));
        }
        for &(uid, gid) in &senders {
            for dst in &dsts {
                out.push(Probe::Tcp {
                    out: true,
                    uid,
                    gid,
                    src: None,
                    dst: dst.clone(),
                });
            }
            let mut udp = vec![hp(remote, 53), hp(remote2, 53), hp(pod, 53)];
            if pod == POD_V4 {
                udp.push("127.0.0.53:53".into());
            }
            for dst in udp {
                out.push(Probe::Udp { uid, gid, dst });
            }
        }
        if pod == POD_V4 {
            // The proxy's inbound leg to the app.
            out.push(Probe::Tcp {
                out: true,
                uid: uids[0],
                gid: gids[0],
                src: Some("127.0.0.6"),
                dst: hp(pod, 8080),
            });
        }
        for port in [8080, 9090, 15008, 15020, 53] {
            out.push(Probe::Tcp {
                out: false,
                uid: 0,
                gid: 0,
                src: None,
                dst: hp(pod, port),
            });
        }
    }
    out
}

// === Installing each side ===

/// Istio's TPROXY routes (`ip rule add fwmark M lookup T` + a local default route).
fn tproxy_routes(ns: &Ns, v6: bool) {
    for fam in if v6 { &["-4", "-6"][..] } else { &["-4"][..] } {
        ns.must(&["ip", fam, "rule", "add", "fwmark", "1337", "lookup", "133"]);
        ns.must(&[
            "ip", fam, "route", "add", "local", "default", "dev", "lo", "table", "133",
        ]);
    }
}

/// Istio's rules, as its istio-iptables would leave them.
fn install_istio(t: &Topology, case: &str, flags: &[&str], flavour: &str) {
    let v4 = fixture(&format!("{case}.v4")).unwrap_or_else(|| panic!("no fixture {case}.v4"));
    let v6 = fixture(&format!("{case}.v6"));
    for (tool, text) in [("iptables", Some(v4)), ("ip6tables", v6.clone())] {
        if let Some(text) = text {
            let restore = format!("{tool}-{flavour}-restore");
            let mut cmd = std::process::Command::new("ip");
            cmd.args(["netns", "exec", &t.pod.name, &restore]);
            let out = output_with_stdin(&mut cmd, text.as_bytes());
            assert!(out.status.success(), "{case}: {restore}: {}", stderr(&out));
        }
    }
    if flag(flags, "-m", "REDIRECT") == "TPROXY" {
        tproxy_routes(&t.pod, v6.is_some());
    }
}

/// The pod's resolv.conf for `ip netns exec` and for shunt (/etc/netns/NAME/resolv.conf),
/// removed on drop.
struct Resolv(std::path::PathBuf);

impl Resolv {
    fn new(ns: &Ns) -> Resolv {
        let dir = std::path::PathBuf::from("/etc/netns").join(&ns.name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("resolv.conf"), RESOLV_CONF).unwrap();
        Resolv(dir)
    }
}

impl Drop for Resolv {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn install_shunt(
    t: &Topology,
    case: &str,
    flags: &[&str],
    env: &[(&str, &str)],
    engine: &str,
) -> Resolv {
    let resolv = Resolv::new(&t.pod);
    let mut cmd = shunt_command();
    cmd.arg("istio-iptables").args(flags);
    match engine {
        "nftables" => cmd.arg("--native-nftables"),
        flavour => cmd.args(["--force-iptables-binary", &format!("iptables-{flavour}")]),
    };
    cmd.args(["--netns", &t.pod.path()]);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{case}: shunt istio-iptables {flags:?}: {}",
        stderr(&out)
    );
    resolv
}

// === The comparison ===

/// Runs every case with shunt on `engine` and asserts that every probe landed in the same
/// place on both sides; prints the count per case.
fn differential(engine: &str) {
    require_netns!();
    if engine == "nftables" && which("nft").is_none() {
        eprintln!("SKIPPED: nft is not installed (apt-get install nftables)");
        return;
    }
    let flavour = if engine == "legacy" { "legacy" } else { "nft" };
    // ISTIO_DIFF_CASE=name runs one case; ISTIO_DIFF_DUMP=1 prints every outcome.
    let only = std::env::var("ISTIO_DIFF_CASE").ok();
    let dump = std::env::var_os("ISTIO_DIFF_DUMP").is_some();
    let mut seen = std::collections::BTreeSet::new();
    let mut failures = Vec::new();
    let (mut configs, mut total) = (0, 0);
    let mut per_case = BTreeMap::new();
    for (case, flags, env) in cases() {
        if only.as_deref().is_some_and(|o| o != case) {
            continue;
        }
        let istio = Topology::new();
        install_istio(&istio, case, &flags, flavour);
        let shunt = Topology::new();
        let _resolv = install_shunt(&shunt, case, &flags, &env, engine);
        let (li, ls) = (Landing::new(&istio), Landing::new(&shunt));
        let probes = probes(&flags);
        let mut differ = 0;
        for p in &probes {
            let (want, got) = (p.run(&istio, &li), p.run(&shunt, &ls));
            if dump {
                eprintln!("{case}: {}: {want}", p.describe());
            }
            seen.insert(want.split(' ').next().unwrap_or_default().to_string());
            if want != got {
                differ += 1;
                failures.push(format!(
                    "{case}: {}: Istio {want}, shunt {got}",
                    p.describe()
                ));
            }
        }
        configs += 1;
        total += probes.len();
        per_case.insert(case, (probes.len() - differ, probes.len()));
    }
    let same: usize = per_case.values().map(|(s, _)| s).sum();
    eprintln!(
        "istio differential ({engine}): {configs} configurations, {same} of {total} probes land \
         where Istio's rules send them"
    );
    for (case, (s, n)) in &per_case {
        eprintln!("  {case}: {s}/{n}");
    }
    // The probes must tell the outcomes apart: a run where everything is refused (say) would
    // prove nothing.
    if only.is_none() {
        for kind in [
            "outbound",
            "inbound",
            "dns",
            "dns-udp",
            "pod:8080",
            "remote:8080",
            "pod-udp:53",
            "remote-udp:53",
        ] {
            assert!(seen.contains(kind), "no probe landed on {kind}: {seen:?}");
        }
    }
    assert!(
        failures.is_empty(),
        "{} differences:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

fn which(tool: &str) -> Option<std::path::PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(tool))
        .find(|p| p.exists())
}

/// The fixtures are generate.py's output for exactly these cases: one `.v4` per case, and a
/// fresh run of the generator (when python3 is here) writes the same bytes.
#[test]
fn fixtures_are_the_generators_output_for_these_cases() {
    let dir = format!("{}/tests/fixtures/istio", env!("CARGO_MANIFEST_DIR"));
    let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            Some(name.strip_suffix(".v4")?.to_string())
        })
        .collect();
    on_disk.sort();
    let mut names: Vec<String> = cases().iter().map(|c| c.0.to_string()).collect();
    names.sort();
    assert_eq!(on_disk, names, "fixtures/istio/*.v4 and cases() disagree");
    let Some(python) = which("python3") else {
        eprintln!("SKIPPED (generator check): python3 is not installed");
        return;
    };
    let out = std::env::temp_dir().join(format!("shunt-istio-gen-{}", std::process::id()));
    std::fs::create_dir_all(&out).unwrap();
    let run = std::process::Command::new(python)
        .arg(format!("{dir}/generate.py"))
        .arg(&out)
        .output()
        .unwrap();
    assert!(run.status.success(), "generate.py: {}", stderr(&run));
    let mut stale = Vec::new();
    for entry in std::fs::read_dir(&out).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        let fresh = std::fs::read_to_string(out.join(&name)).unwrap();
        if fixture(&name).as_deref() != Some(fresh.as_str()) {
            stale.push(name);
        }
    }
    let _ = std::fs::remove_dir_all(&out);
    assert!(
        stale.is_empty(),
        "stale fixtures (re-run python3 tests/fixtures/istio/generate.py): {stale:?}"
    );
}

#[test]
fn same_outcomes_as_istio_iptables_nft() {
    differential("nft");
}

#[test]
fn same_outcomes_as_istio_iptables_legacy() {
    differential("legacy");
}

#[test]
fn same_outcomes_as_istio_iptables_nftables_engine() {
    differential("nftables");
}
