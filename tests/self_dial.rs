//! The proxy must never connect to itself. An app that churns connections to a port that
//! refuses them leaves conntrack entries NATed to the outbound port (the proxy reset them);
//! a later upstream socket of the proxy that picked the same source port would take that old
//! binding and land on the proxy's own listener. The proxy avoids those ports
//! (`src/proxy/stale.rs`); this proves it with the kernel, on both iptables backends.

mod common;
mod proxy_support;

use std::io::Read;
use std::time::{Duration, Instant};

use common::{Topology, REMOTE_V4};
use proxy_support::{Proxy, APP};

/// App connections in the churn: with 32 ephemeral ports, enough for hundreds of reuses.
const CHURN: usize = 1500;

fn churn(t: &Topology, backend: &str) {
    // A narrow ephemeral range makes the app and the proxy reuse each other's ports at once.
    t.pod
        .must(&["sysctl", "-qw", "net.ipv4.ip_local_port_range=40000 40031"]);
    let out = t.pod.shunt(&["apply", "--backend", backend]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Counts the SYNs that reach the refusing port: one per upstream attempt that left the pod.
    t.remote.must(&[
        "iptables-nft",
        "-A",
        "INPUT",
        "-p",
        "tcp",
        "--dport",
        "9",
        "--syn",
    ]);
    let proxy = Proxy::start_in(&t.pod, &["--connect-timeout", "2s"]);
    let dst: std::net::SocketAddr = format!("{REMOTE_V4}:9").parse().unwrap();
    let made = t
        .pod
        .handle
        .run(move || {
            nix::unistd::setfsgid(nix::unistd::Gid::from_raw(APP));
            nix::unistd::setfsuid(nix::unistd::Uid::from_raw(APP));
            let deadline = Instant::now() + Duration::from_secs(120);
            let mut made = 0;
            while made < CHURN && Instant::now() < deadline {
                // EADDRNOTAVAIL while the proxy holds every port: try again.
                let Ok(mut s) = std::net::TcpStream::connect_timeout(&dst, Duration::from_secs(3))
                else {
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                };
                made += 1;
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let _ = s.read(&mut [0u8; 64]);
            }
            made
        })
        .unwrap();
    assert_eq!(
        made, CHURN,
        "the app could not make its connections in time"
    );
    // The app may count a connection the proxy accepted and reset at once as failed and try
    // again, so the proxy can accept a few more than `made`; the invariant is about them.
    let accepted = proxy.stat("outbound.downstream_cx_total");
    let total = proxy.wait_stat(
        "outbound.upstream_cx_connect_fail",
        accepted,
        Duration::from_secs(20),
    );
    let accepted_after = proxy.stat("outbound.downstream_cx_total");
    let syns = remote_syns(t);
    let resets = proxy.stat("outbound.upstream_cx_reset");
    let log = proxy.log_text();
    let failed_lines = log.matches("end=\"connect_failed\"").count();
    assert!(accepted >= CHURN as u64, "{accepted} accepted");
    assert_eq!(
        (accepted_after, total, syns, resets, failed_lines as u64),
        (accepted, accepted, accepted, 0, accepted),
        "{backend}: (connections the proxy accepted, its connect failures, SYNs that reached \
         the remote, upstream resets, connect_failed log lines); fewer SYNs than accepted \
         connections means the proxy dialled its own listener"
    );
}

/// Packets counted by the remote's SYN rule.
fn remote_syns(t: &Topology) -> u64 {
    let out = t
        .remote
        .must(&["iptables-nft", "-L", "INPUT", "-v", "-n", "-x"]);
    out.lines()
        .find(|l| l.contains("dpt:9"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no SYN counter in:\n{out}"))
}

#[test]
fn churn_to_a_refusing_port_never_loops_back_nft() {
    require_netns!();
    churn(&Topology::new(), "nft");
}

#[test]
fn churn_to_a_refusing_port_never_loops_back_nftables() {
    require_netns!();
    churn(&Topology::new(), "nftables");
}

#[test]
fn churn_to_a_refusing_port_never_loops_back_legacy() {
    require_netns!();
    churn(&Topology::new(), "legacy");
}
