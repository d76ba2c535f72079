//! The DNS forwarder on `--dns-port`: the capture rules (`--redirect-dns`) send the app's DNS
//! here, and it asks the upstream servers (`--dns-upstream`, else the namespace's
//! resolv.conf). Both its UDP and its TCP sockets are bound to loopback only ([`listen_addrs`]):
//! that is where REDIRECT delivers them, and an address the network can reach would make the
//! pod an open resolver. UDP queries are answered from the socket they arrived on, so conntrack
//! turns the reply's source back into the server the app asked. DNS over TCP is relayed to the
//! first upstream like any other connection (direction `dns` in the stats).

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UdpSocket;

use super::Shared;

/// Queries in flight at once per listener; more are dropped (the client retries).
const MAX_INFLIGHT: usize = 1024;
/// How long one upstream gets before the next is asked.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
const MAX_MESSAGE: usize = 65_535;

/// The resolv.conf servers to forward to: the same list the capture rules redirect
/// ([`crate::resolv`]), scoped link-local ones included.
pub fn resolv_conf_servers(text: &str) -> Vec<SocketAddr> {
    crate::resolv::nameservers(text)
        .iter()
        .map(crate::resolv::Nameserver::socket_addr)
        .collect()
}

/// `IP` or `IP:PORT` (IPv6 with a port in brackets); the port defaults to 53.
pub fn parse_upstream(s: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    s.parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, 53))
        .map_err(|_| format!("'{s}' is not an IP or IP:PORT (e.g. 10.96.0.10 or [fd00::a]:53)"))
}

/// Where the forwarder listens, UDP and TCP: IPv4 first, then IPv6. The capture rules
/// redirect DNS only in nat OUTPUT (`plan::ruleset`: the app's own packets), and REDIRECT sends
/// a locally generated packet to 127.0.0.1 or ::1, so nothing arrives anywhere else.
pub fn listen_addrs(port: u16) -> [SocketAddr; 2] {
    [
        SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        SocketAddr::from((Ipv6Addr::LOCALHOST, port)),
    ]
}

/// The UDP listeners, on [`listen_addrs`]; a namespace without IPv6 gets the IPv4 one only.
pub async fn bind_udp(port: u16) -> io::Result<Vec<UdpSocket>> {
    let [v4, v6] = listen_addrs(port);
    let mut socks = vec![UdpSocket::bind(v4).await?];
    match UdpSocket::bind(v6).await {
        Ok(s) => socks.push(s),
        Err(e) => tracing::warn!("no IPv6 DNS listener on {v6}: {e}"),
    }
    Ok(socks)
}

pub async fn serve_udp(shared: Arc<Shared>, sock: UdpSocket, upstreams: Arc<[SocketAddr]>) {
    let sock = Arc::new(sock);
    let inflight = Arc::new(AtomicUsize::new(0));
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        let (n, client) = match sock.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                // ICMP errors from earlier replies surface here; nothing to do but go on.
                tracing::debug!("dns recv: {e}");
                continue;
            }
        };
        let stats = &shared.stats.dns;
        stats.udp_queries.inc();
        if n < 12 {
            stats.udp_failures.inc();
            continue;
        }
        if inflight.load(Relaxed) >= MAX_INFLIGHT {
            stats.udp_overflow.inc();
            continue;
        }
        inflight.fetch_add(1, Relaxed);
        let query = buf[..n].to_vec();
        let (shared, sock, upstreams, inflight) = (
            shared.clone(),
            sock.clone(),
            upstreams.clone(),
            inflight.clone(),
        );
        tokio::spawn(async move {
            let stats = &shared.stats.dns;
            match ask(&query, &upstreams).await {
                Some(answer) => match sock.send_to(&answer, client).await {
                    Ok(_) => stats.udp_answers.inc(),
                    Err(_) => stats.udp_failures.inc(),
                },
                None => stats.udp_failures.inc(),
            }
            inflight.fetch_sub(1, Relaxed);
        });
    }
}

/// Asks each upstream in turn; the first answer with the query's id wins.
async fn ask(query: &[u8], upstreams: &[SocketAddr]) -> Option<Vec<u8>> {
    for &up in upstreams {
        let local: SocketAddr = match up {
            SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let attempt = async {
            let s = UdpSocket::bind(local).await?;
            s.connect(up).await?;
            s.send(query).await?;
            let mut answer = vec![0u8; MAX_MESSAGE];
            loop {
                let m = s.recv(&mut answer).await?;
                // A stray datagram with another id is ignored, not passed on.
                if m >= 12 && answer[..2] == query[..2] {
                    answer.truncate(m);
                    return Ok::<_, io::Error>(answer);
                }
            }
        };
        match tokio::time::timeout(UPSTREAM_TIMEOUT, attempt).await {
            Ok(Ok(answer)) => return Some(answer),
            Ok(Err(e)) => tracing::debug!(upstream = %up, "dns query failed: {e}"),
            Err(_) => tracing::debug!(upstream = %up, "dns query timed out"),
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_forwarder_and_the_capture_rules_read_the_same_servers() {
        let conf = "nameserver 10.96.0.10\nnameserver fe80::1%lo\nnameserver fd00::a\n";
        let forwarded: Vec<IpAddr> = resolv_conf_servers(conf).iter().map(|s| s.ip()).collect();
        let captured: Vec<IpAddr> = crate::resolv::nameservers(conf)
            .iter()
            .map(|n| n.addr)
            .collect();
        assert_eq!(forwarded, captured);
        assert_eq!(forwarded.len(), 3);
    }

    #[test]
    fn reads_nameservers_and_upstreams() {
        let conf =
            "# comment\nsearch svc\nnameserver 10.96.0.10\nnameserver fd00::a\noptions ndots:5\n";
        assert_eq!(
            resolv_conf_servers(conf),
            vec![
                "10.96.0.10:53".parse().unwrap(),
                "[fd00::a]:53".parse().unwrap()
            ]
        );
        assert_eq!(parse_upstream("1.2.3.4"), Ok("1.2.3.4:53".parse().unwrap()));
        assert_eq!(
            parse_upstream("[::1]:5353"),
            Ok("[::1]:5353".parse().unwrap())
        );
        assert!(parse_upstream("dns.local")
            .unwrap_err()
            .contains("dns.local"));
    }
}
