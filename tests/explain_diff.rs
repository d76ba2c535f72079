//! Differential test: for several rule sets installed in a pod namespace (shunt's own with
//! varied options on the iptables and the nftables engines, Istio-, Linkerd-style and mixed
//! iptables fixtures, Istio-nftables-style tables, and shunt's nft table beside another
//! tool's iptables-nft rules), real connections are made
//! (several uids, local and remote destinations, ports, both families, outbound and from the
//! peer namespace), the listener each lands on and its original destination are recorded, and
//! `shunt explain`'s prediction for the same packet must agree on every probe.

mod common;

use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use shunt::config::RawOptions;
use shunt::explain::{self, Direction, Explanation, Proto, Query, Verdict};
use shunt::plan::Family;
use shunt::socket::unmap;

/// Ports with a listener in both namespaces: every port a probe dials or a rule redirects to.
const PORTS: &[u16] = &[
    15001, 15006, 15008, 15053, 16001, 16006, 4140, 4143, 4191, 8080, 9090, 2222, 53, 443,
];
/// UDP sockets in both namespaces (DNS and its capture port, and one other).
const UDP_PORTS: &[u16] = &[53, 15053, 8080];
/// Ports the probes dial.
const OUT_PORTS: &[u16] = &[8080, 2222, 9090, 15008, 443, 53];
const IN_PORTS: &[u16] = &[8080, 9090, 2222, 15008, 15001, 4191, 443, 53];
/// (uid, gid) of the sending process: apps, the proxy uids of each layout, a uid range.
const IDS: &[(u32, u32)] = &[
    (0, 0),
    (1000, 1000),
    (1337, 1337),
    (1000, 1337),
    (2102, 2102),
    (2005, 2005),
];
const CONNECT_TIMEOUT: Duration = Duration::from_millis(600);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Got {
    /// Accepted by the listener on `port` in namespace `ns`; `orig` is SO_ORIGINAL_DST there
    /// (the local address when the connection was not translated).
    Landed {
        ns: &'static str,
        port: u16,
        orig: SocketAddr,
    },
    Refused,
    TimedOut,
    Other(String),
}

struct Lab {
    t: Topology,
    listeners: Vec<(&'static str, TcpListener)>,
    udp: Vec<(&'static str, UdpSocket)>,
}

static TOKEN: AtomicU64 = AtomicU64::new(1);

impl Lab {
    fn new() -> Lab {
        let t = Topology::new();
        // The proxy's inbound source for IPv6 (shunt apply adds it; the fixtures need it too).
        t.pod
            .must(&["ip", "-6", "addr", "replace", "::6/128", "dev", "lo"]);
        let mut listeners = Vec::new();
        for (name, ns) in [("pod", &t.pod), ("remote", &t.remote)] {
            for &port in PORTS {
                let l = ns.listen(&format!("[::]:{port}"));
                l.set_nonblocking(true).unwrap();
                listeners.push((name, l));
            }
        }
        let mut udp = Vec::new();
        for (name, ns) in [("pod", &t.pod), ("remote", &t.remote)] {
            for &port in UDP_PORTS {
                let u = ns
                    .handle
                    .run(move || UdpSocket::bind(("::", port)))
                    .unwrap()
                    .unwrap();
                u.set_nonblocking(true).unwrap();
                udp.push((name, u));
            }
        }
        Lab { t, listeners, udp }
    }

    /// Sends one datagram from the pod as uid:gid and reports which socket received it
    /// (`Got::TimedOut` when none did within 500 ms).
    fn udp_probe(&self, uid: u32, gid: u32, dst: SocketAddr) -> Got {
        let mut buf = [0u8; 64];
        for (_, u) in &self.udp {
            while u.recv_from(&mut buf).is_ok() {}
        }
        let token = TOKEN.fetch_add(1, Ordering::SeqCst).to_be_bytes();
        let sent = self
            .t
            .pod
            .handle
            .run(move || -> std::io::Result<usize> {
                nix::unistd::setfsgid(nix::unistd::Gid::from_raw(gid));
                nix::unistd::setfsuid(nix::unistd::Uid::from_raw(uid));
                let any: SocketAddr = if dst.is_ipv4() {
                    "0.0.0.0:0".parse().unwrap()
                } else {
                    "[::]:0".parse().unwrap()
                };
                UdpSocket::bind(any)?.send_to(&token, dst)
            })
            .unwrap();
        if let Err(e) = sent {
            return Got::Other(e.to_string());
        }
        let deadline = Instant::now() + Duration::from_millis(500);
        let mut last = false;
        while !last {
            last = Instant::now() >= deadline;
            for (ns, u) in &self.udp {
                if let Ok((n, _)) = u.recv_from(&mut buf) {
                    if buf[..n] == token {
                        let port = u.local_addr().unwrap().port();
                        // UDP has no SO_ORIGINAL_DST; the landing socket is what is compared.
                        return Got::Landed {
                            ns,
                            port,
                            orig: dst,
                        };
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Got::TimedOut
    }

    /// Connects from `from` as uid:gid (optionally from `src`) and reports where it landed.
    fn probe(&self, from: &Ns, uid: u32, gid: u32, src: Option<IpAddr>, dst: SocketAddr) -> Got {
        for (_, l) in &self.listeners {
            while l.accept().is_ok() {}
        }
        let connected = from
            .handle
            .run(move || -> std::io::Result<TcpStream> {
                use nix::sys::socket::{
                    self as s, AddressFamily, SockFlag, SockType, SockaddrStorage,
                };
                nix::unistd::setfsgid(nix::unistd::Gid::from_raw(gid));
                nix::unistd::setfsuid(nix::unistd::Uid::from_raw(uid));
                let family = if dst.is_ipv4() {
                    AddressFamily::Inet
                } else {
                    AddressFamily::Inet6
                };
                let fd = s::socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
                let tv = nix::sys::time::TimeVal::new(0, CONNECT_TIMEOUT.as_micros() as _);
                s::setsockopt(&fd, s::sockopt::SendTimeout, &tv)?;
                if let Some(src) = src {
                    s::bind(
                        fd.as_raw_fd(),
                        &SockaddrStorage::from(SocketAddr::new(src, 0)),
                    )?;
                }
                s::connect(fd.as_raw_fd(), &SockaddrStorage::from(dst))?;
                Ok(TcpStream::from(fd))
            })
            .unwrap();
        let client = match connected {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return Got::Refused,
            Err(e) if e.raw_os_error() == Some(nix::libc::EINPROGRESS) => return Got::TimedOut,
            Err(e) => return Got::Other(e.to_string()),
        };
        let _client = client;
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut last = false;
        while !last {
            // One more round after the deadline: a descheduled thread still sees an arrival.
            last = Instant::now() >= deadline;
            for (ns, l) in &self.listeners {
                // The first arrival is this probe's (the queues were drained before it); its
                // peer port may differ from ours when NAT had to pick another source port
                // to keep conntrack tuples unique.
                let Ok((s, _peer)) = l.accept() else { continue };
                let local = s.local_addr().unwrap();
                let orig = shunt::socket::original_dst(&s, local).unwrap_or(local);
                return Got::Landed {
                    ns,
                    port: unmap(local).port(),
                    orig: unmap(orig),
                };
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Got::Other("connected, but no listener accepted it".into())
    }
}

fn pod_addr(ip: IpAddr) -> bool {
    ip.is_loopback() || [POD_V4, POD_V6, "::6", "127.0.0.6"].contains(&ip.to_string().as_str())
}

/// Where the kernel should deliver the probe if `e` is right.
fn predict(e: &Explanation, q: &Query) -> Got {
    let landed = |to: SocketAddr| {
        let ns = if pod_addr(to.ip()) { "pod" } else { "remote" };
        // Only the pod tracks connections; elsewhere SO_ORIGINAL_DST is the local address.
        let orig = if ns == "pod" { q.dst } else { to };
        Got::Landed {
            ns,
            port: to.port(),
            orig,
        }
    };
    match e.verdict {
        Verdict::Redirect | Verdict::Tproxy => Got::Landed {
            ns: "pod",
            port: e.to_port.unwrap(),
            orig: q.dst,
        },
        Verdict::Dnat | Verdict::Accept => landed(e.final_dst.parse().unwrap()),
        Verdict::Reject => Got::Refused,
        Verdict::Drop => Got::TimedOut,
        Verdict::Unknown => Got::Other("explain: unknown".into()),
    }
}

/// Every delivery `e` allows: one when the verdict is certain, each possible outcome when
/// it is not (the kernel's must be among them).
fn predict_all(e: &Explanation, q: &Query) -> Vec<Got> {
    if e.verdict != Verdict::Unknown {
        return vec![predict(e, q)];
    }
    e.possible
        .iter()
        .filter(|o| o.verdict != Verdict::Unknown)
        .map(|o| {
            let mut x = e.clone();
            x.verdict = o.verdict;
            x.to_port = o.to_port;
            x.to_addr = o.to_addr.clone();
            x.final_dst = match (&o.to_addr, o.verdict) {
                (Some(a), Verdict::Dnat) => a.clone(),
                _ => q.dst.to_string(),
            };
            predict(&x, q)
        })
        .collect()
}

/// Installs an iptables-restore file in the pod with the given tool.
fn restore(ns: &Ns, tool: &str, text: &str) {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.name, tool]);
    if tool.contains("legacy") {
        // Legacy iptables has one lock for all namespaces: wait for it, do not fail.
        cmd.args(["-w", "10"]);
    }
    let out = output_with_stdin(&mut cmd, text.as_bytes());
    assert!(
        out.status.success(),
        "{tool}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn shunt_ok(ns: &Ns, args: &[&str]) {
    let out = ns.shunt(args);
    assert!(
        out.status.success(),
        "shunt {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

struct Probe {
    from_pod: bool,
    uid: u32,
    gid: u32,
    src: Option<IpAddr>,
    dst: SocketAddr,
}

fn probes() -> Vec<Probe> {
    let mut v = Vec::new();
    let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
    let out_dsts = [
        REMOTE_V4,
        REMOTE2_V4,
        "127.0.0.1",
        POD_V4,
        REMOTE_V6,
        REMOTE2_V6,
        "::1",
        POD_V6,
    ];
    for &(uid, gid) in IDS {
        for d in out_dsts {
            for &port in OUT_PORTS {
                v.push(Probe {
                    from_pod: true,
                    uid,
                    gid,
                    src: None,
                    dst: SocketAddr::new(ip(d), port),
                });
            }
        }
    }
    // The proxy's inbound leg to the app, from 127.0.0.6 / ::6.
    for (src, d) in [("127.0.0.6", POD_V4), ("::6", POD_V6)] {
        for port in [8080, 9090] {
            v.push(Probe {
                from_pod: true,
                uid: 1337,
                gid: 1337,
                src: Some(ip(src)),
                dst: SocketAddr::new(ip(d), port),
            });
        }
    }
    for (src, d) in [
        (REMOTE_V4, POD_V4),
        (REMOTE2_V4, POD_V4),
        (REMOTE_V6, POD_V6),
        (REMOTE2_V6, POD_V6),
    ] {
        for &port in IN_PORTS {
            v.push(Probe {
                from_pod: false,
                uid: 0,
                gid: 0,
                src: Some(ip(src)),
                dst: SocketAddr::new(ip(d), port),
            });
        }
    }
    v
}

/// Runs every probe against the pod's installed rules; returns how many were compared.
fn differential(lab: &Lab, what: &str) -> usize {
    let cfg = RawOptions {
        netns: Some(lab.t.pod.path()),
        ..Default::default()
    }
    .resolve()
    .unwrap();
    let v4 = explain::load(&cfg, None, Family::V4).unwrap();
    let v6 = explain::load(&cfg, None, Family::V6).unwrap();
    assert!(
        v4.host.known,
        "the pod's addresses and routes could not be read"
    );
    let mut mismatches = Vec::new();
    let mut kinds: std::collections::BTreeMap<String, usize> = Default::default();
    let mut ambiguous = 0;
    let all = probes();
    for (n, p) in all.iter().enumerate() {
        let direction = if p.from_pod {
            Direction::Out
        } else {
            Direction::In
        };
        let mut q = Query::new(direction, Proto::Tcp, p.dst);
        q.src = p.src;
        if p.from_pod {
            q.uid = Some(p.uid);
            q.gid = Some(p.gid);
        }
        let loaded = if p.dst.is_ipv4() { &v4 } else { &v6 };
        let e = explain::explain_loaded(loaded, &q);
        let want = predict_all(&e, &q);
        let from = if p.from_pod {
            &lab.t.pod
        } else {
            &lab.t.remote
        };
        let got = lab.probe(from, p.uid, p.gid, p.src, p.dst);
        let kind = match &got {
            Got::Landed { ns, port, .. } => format!("{ns}:{port}"),
            other => format!("{other:?}"),
        };
        *kinds.entry(kind).or_default() += 1;
        if e.verdict == Verdict::Unknown {
            ambiguous += 1;
        }
        if !want.contains(&got) {
            mismatches.push(format!(
                "{what}: {:?} {} as {}:{} from {:?}: kernel {got:?}, explain {want:?}\n{}",
                direction,
                p.dst,
                p.uid,
                p.gid,
                p.src,
                shunt::explain::report::text(&e)
            ));
        }
        // Every 40th probe also through the command line, which must say the same.
        if n % 40 == 0 {
            let mut args = vec![
                "explain".to_string(),
                if p.from_pod { "out" } else { "in" }.into(),
                "tcp".into(),
                p.dst.to_string(),
                "--json".into(),
            ];
            if p.from_pod {
                args.extend(["--uid".into(), p.uid.to_string()]);
                args.extend(["--gid".into(), p.gid.to_string()]);
            }
            if let Some(s) = p.src {
                args.extend(["--src".into(), s.to_string()]);
            }
            let argv: Vec<&str> = args.iter().map(String::as_str).collect();
            let out = lab.t.pod.shunt(&argv);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(
                j["verdict"],
                serde_json::to_value(e.verdict).unwrap(),
                "{what}: CLI and library differ for {}",
                p.dst
            );
            assert_eq!(j["to_port"], serde_json::json!(e.to_port));
            assert!(j["trace"].is_array());
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} of {} probes disagree:\n{}",
        mismatches.len(),
        all.len(),
        mismatches
            .iter()
            .take(8)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    eprintln!(
        "{what}: {} probes, kernel and explain agree on all ({ambiguous} with an order-dependent \
         verdict); landed: {kinds:?}",
        all.len()
    );
    all.len()
}

#[test]
fn shunt_default_rules_nft() {
    require_netns!();
    let lab = Lab::new();
    shunt_ok(&lab.t.pod, &["apply", "--backend", "nft", "--ipv6", "on"]);
    assert!(differential(&lab, "shunt default") >= 300);
}

#[test]
fn shunt_rules_with_exclusions_legacy() {
    require_netns!();
    let lab = Lab::new();
    shunt_ok(
        &lab.t.pod,
        &[
            "apply",
            "--backend",
            "legacy",
            "--ipv6",
            "on",
            "--exclude-outbound-cidrs",
            "10.200.1.0/24,fd00:5:1::/64",
            "--exclude-outbound-ports",
            "2222",
            "--exclude-inbound-ports",
            "9090",
            "--proxy-uid",
            "1337,2000-2010",
        ],
    );
    assert!(differential(&lab, "shunt exclusions") >= 300);
}

#[test]
fn shunt_rules_with_include_lists_and_other_ports() {
    require_netns!();
    let lab = Lab::new();
    shunt_ok(
        &lab.t.pod,
        &[
            "apply",
            "--outbound-cidrs",
            "10.200.1.0/24",
            "--outbound-ports",
            "443",
            "--inbound-ports",
            "8080,2222",
            "--proxy-port",
            "16001",
            "--inbound-port",
            "16006",
            "--proxy-gid",
            "2102",
            "--ipv6",
            "off",
        ],
    );
    assert!(differential(&lab, "shunt include lists") >= 300);
}

#[test]
fn istio_style_rules() {
    require_netns!();
    let lab = Lab::new();
    restore(
        &lab.t.pod,
        "iptables-nft-restore",
        include_str!("fixtures/explain/istio-style.v4.rules"),
    );
    restore(
        &lab.t.pod,
        "ip6tables-nft-restore",
        include_str!("fixtures/explain/istio-style.v6.rules"),
    );
    assert!(differential(&lab, "istio-style") >= 300);
}

#[test]
fn linkerd_style_rules_legacy() {
    require_netns!();
    let lab = Lab::new();
    restore(
        &lab.t.pod,
        "iptables-legacy-restore",
        include_str!("fixtures/explain/linkerd-style.v4.rules"),
    );
    restore(
        &lab.t.pod,
        "ip6tables-legacy-restore",
        include_str!("fixtures/explain/linkerd-style.v6.rules"),
    );
    assert!(differential(&lab, "linkerd-style") >= 300);
}

#[test]
fn mixed_rules_marks_dnat_reject_drop_policies() {
    require_netns!();
    let lab = Lab::new();
    restore(
        &lab.t.pod,
        "iptables-nft-restore",
        include_str!("fixtures/explain/mixed.v4.rules"),
    );
    assert!(differential(&lab, "mixed") >= 300);
}

#[test]
fn rules_in_both_backends() {
    require_netns!();
    let lab = Lab::new();
    shunt_ok(&lab.t.pod, &["apply", "--backend", "nft", "--ipv6", "off"]);
    // Another tool's rules in the legacy backend: the kernel runs both sets at every hook.
    restore(
        &lab.t.pod,
        "iptables-legacy-restore",
        include_str!("fixtures/explain/legacy-extra.v4.rules"),
    );
    let n = differential(&lab, "both backends");
    assert!(n >= 300);
}

/// explain read the namespace's native table `table` (not only iptables).
fn assert_reads_native(lab: &Lab, table: &str) {
    let cfg = RawOptions {
        netns: Some(lab.t.pod.path()),
        ..Default::default()
    }
    .resolve()
    .unwrap();
    let loaded = explain::load(&cfg, None, Family::V4).unwrap();
    assert!(loaded.source.contains(table), "{}", loaded.source);
}

fn nft_present() -> bool {
    if which("nft") {
        return true;
    }
    eprintln!("SKIPPED: nft is not installed (apt-get install nftables)");
    false
}

fn which(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// shunt's native nftables engine: one `inet shunt` table, both families.
#[test]
fn shunt_default_rules_nftables() {
    require_netns!();
    if !nft_present() {
        return;
    }
    let lab = Lab::new();
    shunt_ok(
        &lab.t.pod,
        &["apply", "--backend", "nftables", "--ipv6", "on"],
    );
    assert_reads_native(&lab, "inet shunt");
    assert!(differential(&lab, "shunt default (nftables)") >= 300);
}

/// The nftables engine with its sets: a CIDR list, ports, a uid list and range.
#[test]
fn shunt_rules_with_exclusions_nftables() {
    require_netns!();
    if !nft_present() {
        return;
    }
    let lab = Lab::new();
    shunt_ok(
        &lab.t.pod,
        &[
            "apply",
            "--backend",
            "nftables",
            "--ipv6",
            "on",
            "--exclude-outbound-cidrs",
            "10.200.1.0/24,10.9.0.0/16,fd00:5:1::/64",
            "--exclude-outbound-ports",
            "2222,443",
            "--exclude-inbound-ports",
            "9090",
            "--proxy-uid",
            "1337,2000-2010",
        ],
    );
    assert_reads_native(&lab, "inet shunt");
    assert!(differential(&lab, "shunt exclusions (nftables)") >= 300);
}

/// shunt's nft table (applied with `extra` flags) and another tool's iptables-nft rules in one
/// namespace, probed against explain.
fn nftables_beside_iptables_nft(extra: &[&str], label: &str) {
    require_netns!();
    if !nft_present() {
        return;
    }
    let lab = Lab::new();
    let args = [
        &["apply", "--backend", "nftables", "--ipv6", "on"][..],
        extra,
    ]
    .concat();
    shunt_ok(&lab.t.pod, &args);
    restore(
        &lab.t.pod,
        "iptables-nft-restore",
        include_str!("fixtures/explain/legacy-extra.v4.rules"),
    );
    assert_reads_native(&lab, "inet shunt");
    assert!(differential(&lab, label) >= 300);
}

/// shunt's nat chain (priority -110) binds before iptables' nat (-100), whose redirect applies
/// where shunt lets the connection pass; iptables' filter sees the destination after both.
#[test]
fn shunt_nftables_with_another_tools_iptables_nft_rules() {
    nftables_beside_iptables_nft(&[], "nftables + iptables-nft");
}

/// The same with shunt's table moved after iptables' (`--nft-priority-offset 10`): now the
/// other tool's redirect binds first where it matches, and explain must follow the
/// priorities the kernel uses, not a fixed order.
#[test]
fn shunt_nftables_after_another_tools_iptables_nft_rules() {
    nftables_beside_iptables_nft(
        &["--nft-priority-offset", "10"],
        "iptables-nft + nftables at +10",
    );
}

/// Tables in the shapes Istio's nftables mode writes (`inet istio-proxy-nat`, `-raw`).
#[test]
fn istio_nftables_style_tables() {
    require_netns!();
    if !nft_present() {
        return;
    }
    let lab = Lab::new();
    let out = output_with_stdin(
        Command::new("ip").args(["netns", "exec", &lab.t.pod.name, "nft", "-f", "-"]),
        include_bytes!("fixtures/explain/istio-proxy.nft"),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_reads_native(&lab, "inet istio-proxy-nat");
    assert!(differential(&lab, "istio nftables-style") >= 300);
}

/// UDP (and TCP) DNS capture: datagrams from the app to the DNS servers land on the DNS
/// port, the proxy's and other destinations' do not.
#[test]
fn shunt_dns_capture_udp_and_tcp() {
    require_netns!();
    dns_differential("auto");
}

/// The same through the nftables engine: raw-chain zones and nat redirects as nft rules.
#[test]
fn shunt_dns_capture_udp_and_tcp_nftables() {
    require_netns!();
    if !nft_present() {
        return;
    }
    dns_differential("nftables");
}

fn dns_differential(backend: &str) {
    let lab = Lab::new();
    shunt_ok(
        &lab.t.pod,
        &[
            "apply",
            "--backend",
            backend,
            "--redirect-dns",
            "on",
            "--dns-servers",
            "10.200.0.1,fd00:5::1",
            "--ipv6",
            "on",
        ],
    );
    let tcp = differential(&lab, &format!("shunt dns (tcp, {backend})"));
    let cfg = RawOptions {
        netns: Some(lab.t.pod.path()),
        ..Default::default()
    }
    .resolve()
    .unwrap();
    let v4 = explain::load(&cfg, None, Family::V4).unwrap();
    let v6 = explain::load(&cfg, None, Family::V6).unwrap();
    let dsts = [
        REMOTE_V4,
        REMOTE2_V4,
        "127.0.0.1",
        POD_V4,
        REMOTE_V6,
        REMOTE2_V6,
        "::1",
        POD_V6,
    ];
    let (mut n, mut captured, mut mismatches) = (0, 0, Vec::new());
    for &(uid, gid) in IDS {
        for d in dsts {
            for port in [53, 8080] {
                let dst = SocketAddr::new(d.parse().unwrap(), port);
                let mut q = Query::new(Direction::Out, Proto::Udp, dst);
                q.uid = Some(uid);
                q.gid = Some(gid);
                let loaded = if dst.is_ipv4() { &v4 } else { &v6 };
                let e = explain::explain_loaded(loaded, &q);
                let want = predict_all(&e, &q);
                let got = lab.udp_probe(uid, gid, dst);
                if got
                    == (Got::Landed {
                        ns: "pod",
                        port: 15053,
                        orig: dst,
                    })
                {
                    captured += 1;
                }
                if !want.contains(&got) {
                    mismatches.push(format!(
                        "udp {dst} as {uid}:{gid}: kernel {got:?}, explain {want:?}\n{}",
                        shunt::explain::report::text(&e)
                    ));
                }
                n += 1;
            }
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} of {n} UDP probes disagree:\n{}",
        mismatches.len(),
        mismatches[..mismatches.len().min(6)].join("\n")
    );
    assert!(captured >= 8, "only {captured} UDP probes were captured");
    eprintln!(
        "shunt dns (udp, {backend}): {n} probes agree ({captured} captured to :15053); tcp: {tcp}"
    );
}
