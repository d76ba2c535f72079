//! DNS capture end to end (SPEC §2 `--redirect-dns`): the app's lookup is redirected to the
//! proxy's DNS port and answered by a real DNS server (dnsmasq) in the remote namespace
//! through the proxy's forwarder; while nothing listens on the DNS port, the lookup fails.

mod common;
mod proxy_support;

use std::io::{Read, Write};
use std::net::UdpSocket;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use proxy_support::Proxy;

const DNSMASQ: &str = "/usr/sbin/dnsmasq";

/// dnsmasq answering `*.shunt.test` with 10.200.9.9 on the remote's address, for the test's life.
struct Dnsmasq(Child);

impl Dnsmasq {
    fn start(ns: &Ns) -> Dnsmasq {
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns.name,
                DNSMASQ,
                "--keep-in-foreground",
                "--no-resolv",
            ])
            .args([
                "--no-hosts",
                "--conf-file=/dev/null",
                "--bind-interfaces",
                "--port=53",
            ])
            .args([
                "--listen-address",
                REMOTE_V4,
                "--address=/shunt.test/10.200.9.9",
            ])
            .args(["--pid-file=", "--user=root", "--log-facility=-"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("dnsmasq");
        Dnsmasq(child)
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A query for `name`, type A, recursion desired.
fn query(id: u16, name: &str) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend([0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend(label.as_bytes());
    }
    q.extend([0, 0, 1, 0, 1]);
    q
}

/// The IPv4 address of the first A record of an answer to query `id`, if any.
fn answer_addr(id: u16, resp: &[u8]) -> Option<[u8; 4]> {
    if resp.len() < 12 || resp[..2] != id.to_be_bytes() || resp[3] & 0x0f != 0 {
        return None;
    }
    let ancount = u16::from_be_bytes([resp[6], resp[7]]);
    (ancount > 0 && resp.len() >= 4).then(|| {
        let n = resp.len();
        [resp[n - 4], resp[n - 3], resp[n - 2], resp[n - 1]]
    })
}

/// A UDP lookup from the app (uid 1000) to the remote's DNS server, bounded by `wait`.
fn udp_lookup(pod: &Ns, id: u16, wait: Duration) -> Option<[u8; 4]> {
    let s = pod
        .handle
        .run(|| {
            nix::unistd::setfsgid(nix::unistd::Gid::from_raw(1000));
            nix::unistd::setfsuid(nix::unistd::Uid::from_raw(1000));
            UdpSocket::bind("0.0.0.0:0")
        })
        .unwrap()
        .unwrap();
    s.set_read_timeout(Some(wait)).unwrap();
    s.send_to(&query(id, "web.shunt.test"), hp(REMOTE_V4, 53))
        .unwrap();
    let mut buf = [0u8; 512];
    let (n, from) = s.recv_from(&mut buf).ok()?;
    assert_eq!(
        from.to_string(),
        hp(REMOTE_V4, 53),
        "the answer must come from the server"
    );
    answer_addr(id, &buf[..n])
}

fn app_lookups_resolve_through_the_proxy_and_fail_without_it_on(engine: &str) {
    require_netns!();
    if !std::path::Path::new(DNSMASQ).exists() {
        eprintln!("SKIPPED: {DNSMASQ} missing (apt-get install dnsmasq-base)");
        return;
    }
    let t = Topology::new();
    let _dns = Dnsmasq::start(&t.remote);
    // The server answers directly (before any capture), so a failure below is capture's.
    let mut direct = None;
    for i in 0..50 {
        direct = udp_lookup(&t.pod, 100 + i, Duration::from_millis(100));
        if direct.is_some() {
            break;
        }
    }
    assert_eq!(direct, Some([10, 200, 9, 9]), "dnsmasq did not answer");

    let servers = [
        "--redirect-dns",
        "--dns-servers",
        REMOTE_V4,
        "--ipv6",
        "off",
    ];
    let mut apply = vec!["apply", "--backend", engine];
    apply.extend(servers);
    let out = t.pod.shunt(&apply);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Captured, and nothing listens on the DNS port yet: the lookup fails.
    assert_eq!(udp_lookup(&t.pod, 7, Duration::from_millis(800)), None);

    // With the proxy (uid 1337, its forwarder sending upstream to the same server): answered.
    let proxy = Proxy::start_in(&t.pod, &["--dns-upstream", REMOTE_V4]);
    assert_eq!(
        udp_lookup(&t.pod, 8, Duration::from_secs(3)),
        Some([10, 200, 9, 9])
    );
    // DNS over TCP too (two-byte length prefix).
    let mut c = t.pod.connect_as(1000, 1000, &hp(REMOTE_V4, 53)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let q = query(9, "api.shunt.test");
    c.write_all(&(q.len() as u16).to_be_bytes()).unwrap();
    c.write_all(&q).unwrap();
    let mut len = [0u8; 2];
    c.read_exact(&mut len).unwrap();
    let mut resp = vec![0u8; u16::from_be_bytes(len) as usize];
    c.read_exact(&mut resp).unwrap();
    assert_eq!(answer_addr(9, &resp), Some([10, 200, 9, 9]));
    // The proxy answered them (its own upstream queries were not captured, or they would loop).
    assert!(
        proxy.stat("server.dns_udp_answers") >= 1,
        "{}",
        proxy.get("/stats")
    );
}

#[test]
fn app_lookups_resolve_through_the_proxy_and_fail_without_it() {
    app_lookups_resolve_through_the_proxy_and_fail_without_it_on("auto");
}

#[test]
fn app_lookups_resolve_through_the_proxy_and_fail_without_it_nftables() {
    app_lookups_resolve_through_the_proxy_and_fail_without_it_on("nftables");
}
