//! One accepted connection: where was it going, is that allowed, connect there, relay, log.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::os::fd::AsRawFd;

use nix::errno::Errno;
use nix::sys::socket::{
    bind, connect as sys_connect, setsockopt, socket, sockopt, AddressFamily, SockFlag,
    SockProtocol, SockType, SockaddrStorage,
};
use tokio::io::Interest;
use tokio::net::TcpStream;

use super::listener::Active;
use super::relay::reset;
use super::stats::{Direction, End};
use super::Shared;
use crate::plan::Family;
use crate::socket::original_dst;

/// What to do with an accepted connection, from its original destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Forward(SocketAddr),
    /// The original destination is one of the proxy's own listeners.
    Loop(SocketAddr),
    /// Netfilter did not redirect it (a direct connection to the proxy port).
    NotRedirected,
}

/// `own_ports`: every port the proxy listens on; `local_ips`: the namespace's addresses;
/// `local`: the accepted socket's own address, asked for only when the original destination
/// carries one of the proxy's ports (a connection that was not redirected has its own address
/// as original destination), so the common case costs no getsockname.
pub fn classify(
    orig: io::Result<SocketAddr>,
    local: impl FnOnce() -> Option<SocketAddr>,
    own_ports: &[u16],
    local_ips: &[IpAddr],
) -> Verdict {
    let Ok(orig) = orig else {
        return Verdict::NotRedirected;
    };
    if !own_ports.contains(&orig.port()) {
        return Verdict::Forward(orig);
    }
    let local = local();
    if local == Some(orig) {
        return Verdict::NotRedirected;
    }
    let ip = orig.ip();
    let local_ip = ip.is_loopback()
        || ip.is_unspecified()
        || local.is_some_and(|l| l.ip() == ip)
        || local_ips.contains(&ip);
    if local_ip {
        return Verdict::Loop(orig);
    }
    Verdict::Forward(orig)
}

/// The access log: one line per connection.
pub fn access_log(
    dir: Direction,
    client: SocketAddr,
    dst: Option<SocketAddr>,
    (tx, rx): (u64, u64),
    started: Option<Instant>,
    end: End,
    error: Option<&io::Error>,
) {
    // Under `-q` the line is filtered out: skip the formatting (a String per connection).
    if !tracing::enabled!(tracing::Level::INFO) {
        return;
    }
    let dst = dst.map_or_else(|| "-".to_string(), |d| d.to_string());
    let ms = started.map_or(0, |s| s.elapsed().as_millis() as u64);
    // An absent error leaves the field out of the line (tracing skips `None` values).
    tracing::info!(
        direction = dir.name(),
        %client,
        %dst,
        tx_bytes = tx,
        rx_bytes = rx,
        duration_ms = ms,
        end = end.name(),
        error = error.map(tracing::field::display),
        "access"
    );
}

/// A connection's socket that is reset when dropped, until the relay has finished with it. A
/// connection whose task is dropped midway (the runtime shutting down with it still open once
/// `--drain-timeout` has run out, or a panic) therefore ends with RST on both sides, never
/// with the FIN of a complete transfer; every refusal resets its client anyway.
struct Armed {
    sock: TcpStream,
    armed: bool,
}

impl Armed {
    fn new(sock: TcpStream) -> Armed {
        Armed { sock, armed: true }
    }

    /// The relay ended (it has already reset both sides if it ended in failure): close as it
    /// ended.
    fn disarm(&mut self) {
        self.armed = false;
    }
}

impl std::ops::Deref for Armed {
    type Target = TcpStream;
    fn deref(&self) -> &TcpStream {
        &self.sock
    }
}

impl Drop for Armed {
    fn drop(&mut self) {
        if self.armed {
            reset(&self.sock);
        }
    }
}

/// Where the connection to the destination comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Whatever the kernel picks (outbound, DNS).
    Any,
    /// 127.0.0.6 / ::6: the inbound source the capture rules let through (redirect mode).
    InboundSix,
    /// tproxy mode: the client's own address (IP_TRANSPARENT), with the tproxy mark so the
    /// app's replies are routed back to the proxy.
    Transparent(IpAddr),
}

/// tproxy mode, inbound listener: a TPROXY'd connection keeps its destination as the socket's
/// own address; one that came by REDIRECT (the proxy calling its own pod through `lo`) has an
/// original destination of its own and is handled as in redirect mode.
fn classify_tproxy(
    shared: &Shared,
    client: &TcpStream,
    listen: SocketAddr,
    peer: SocketAddr,
) -> (Verdict, Source) {
    let Ok(local) = client.local_addr() else {
        return (Verdict::NotRedirected, Source::Any);
    };
    match original_dst(client, listen) {
        Ok(orig) if orig != local => (
            classify(
                Ok(orig),
                || Some(local),
                &shared.own_ports,
                &shared.local_ips,
            ),
            Source::InboundSix,
        ),
        _ if shared.own_ports.contains(&local.port()) => (Verdict::NotRedirected, Source::Any),
        _ => (Verdict::Forward(local), Source::Transparent(peer.ip())),
    }
}

/// `listen`: the listener's address, which gives the family to ask the original destination in.
fn classify_client(shared: &Shared, client: &TcpStream, listen: SocketAddr) -> Verdict {
    classify(
        original_dst(client, listen),
        || client.local_addr().ok(),
        &shared.own_ports,
        &shared.local_ips,
    )
}

pub async fn handle(
    shared: Arc<Shared>,
    client: TcpStream,
    peer: SocketAddr,
    listen: SocketAddr,
    dir: Direction,
    _active: Active,
) {
    let mut client = Armed::new(client);
    let started = Instant::now();
    let stats = shared.stats.dir(dir);
    let (verdict, source) = match (dir, shared.dns_upstream) {
        // DNS over TCP goes to the DNS upstream, whatever server the app asked.
        (Direction::Dns, Some(up)) => (Verdict::Forward(up), Source::Any),
        (Direction::Inbound, _) if shared.tproxy_mark.is_some() => {
            classify_tproxy(&shared, &client, listen, peer)
        }
        (Direction::Inbound, _) => (
            classify_client(&shared, &client, listen),
            Source::InboundSix,
        ),
        _ => (classify_client(&shared, &client, listen), Source::Any),
    };
    let dst = match verdict {
        Verdict::Forward(dst) => dst,
        Verdict::Loop(dst) => {
            stats.cx_loop.inc();
            reset(&client);
            tracing::warn!(direction = dir.name(), %peer, %dst, "refused a connection whose original destination is this proxy (a loop)");
            access_log(dir, peer, Some(dst), (0, 0), Some(started), End::Loop, None);
            return;
        }
        Verdict::NotRedirected => {
            stats.cx_not_redirected.inc();
            reset(&client);
            tracing::warn!(direction = dir.name(), %peer, "refused a connection that was not redirected by netfilter (no original destination)");
            access_log(
                dir,
                peer,
                None,
                (0, 0),
                Some(started),
                End::NotRedirected,
                None,
            );
            return;
        }
    };
    if shared.stats.is_draining() {
        stats.cx_draining.inc();
        reset(&client);
        access_log(
            dir,
            peer,
            Some(dst),
            (0, 0),
            Some(started),
            End::Draining,
            None,
        );
        return;
    }
    // TCP_NODELAY is inherited from the listening socket (see `listener::bind_with`).
    let guard = shared.stats.open(dir, peer, dst);
    // An app connection the proxy resets leaves a reopenable NATed conntrack entry behind.
    let reopenable = matches!(dir, Direction::Outbound | Direction::Dns);
    let avoid = match source {
        Source::Any => shared.stale.to_avoid(dst),
        _ => None,
    };
    let how = Dial {
        source,
        mark: shared.tproxy_mark,
        timeout: shared.connect_timeout,
        avoid: avoid.map(|ports| (ports, shared.ephemeral)),
    };
    let mut upstream = match connect(dst, how).await {
        Ok(s) => Armed::new(s),
        Err((end, e)) => {
            guard.info.cluster().cx_connect_fail.inc();
            if end == End::ConnectTimeout {
                stats.connect_timeout.inc();
            } else {
                stats.connect_fail.inc();
            }
            reset(&client);
            if reopenable {
                shared.stale.record(peer.port(), dst);
            }
            access_log(dir, peer, Some(dst), (0, 0), Some(started), end, e.as_ref());
            return;
        }
    };
    guard.info.set_established();
    let (end, err) = shared
        .relay
        .run(&shared.stats, &client, &upstream, &guard.info)
        .await;
    client.disarm();
    upstream.disarm();
    // Every end but a clean close (FIN both ways) or the client's own reset reset the client.
    if reopenable && !matches!(end, End::Closed | End::ClientReset) {
        shared.stale.record(peer.port(), dst);
    }
    match end {
        End::ClientReset => stats.client_reset.inc(),
        End::UpstreamReset => stats.upstream_reset.inc(),
        _ => {}
    }
    let bytes = (guard.info.tx_bytes.get(), guard.info.rx_bytes.get());
    access_log(
        dir,
        peer,
        Some(dst),
        bytes,
        Some(started),
        end,
        err.as_ref(),
    );
}

/// How to dial: from where, with which mark, within how long, and around which source ports.
struct Dial {
    source: Source,
    mark: Option<u32>,
    timeout: Duration,
    /// Ports (and the ephemeral range to pick others from) that must not be the source port.
    avoid: Option<(Vec<u16>, (u16, u16))>,
}

/// Source ports tried around the stale ones before giving up; each try is a fresh socket.
const PORT_TRIES: usize = 64;

/// Connects to the original destination from `how.source`. A plain non-blocking connect
/// whose outcome is read from the readiness itself: success costs no SO_ERROR query, only a
/// failure asks for the reason.
async fn connect(dst: SocketAddr, how: Dial) -> Result<TcpStream, (End, Option<io::Error>)> {
    let failed = |e: io::Error| (End::ConnectFailed, Some(e));
    let Some((avoid, range)) = &how.avoid else {
        let fd = start_connect(dst, &how, None).map_err(failed)?;
        return finish_connect(fd, how.timeout).await;
    };
    // Ports taken by a live socket (bind) or a TIME_WAIT one (connect) fail at once: next.
    let mut pick = PortPicker::new(*range, dst);
    let mut last = io::Error::from(io::ErrorKind::AddrNotAvailable);
    for _ in 0..PORT_TRIES {
        let Some(port) = pick.next(avoid) else { break };
        match start_connect(dst, &how, Some(port)) {
            Ok(fd) => return finish_connect(fd, how.timeout).await,
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(nix::libc::EADDRINUSE | nix::libc::EADDRNOTAVAIL)
                ) =>
            {
                last = e
            }
            Err(e) => return Err(failed(e)),
        }
    }
    Err(failed(last))
}

/// A cheap pseudo-random walk over the ephemeral range (xorshift, seeded per call): the
/// source port only has to differ from the stale ones, not be unguessable (the kernel's own
/// choice is no secret either).
struct PortPicker {
    range: (u16, u16),
    state: u64,
}

impl PortPicker {
    fn new(range: (u16, u16), dst: SocketAddr) -> PortPicker {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        PortPicker {
            range,
            state: nanos ^ (u64::from(dst.port()) << 32) | 1,
        }
    }

    fn next(&mut self, avoid: &[u16]) -> Option<u16> {
        let span = u64::from(self.range.1 - self.range.0) + 1;
        if span as usize <= avoid.len() {
            return None;
        }
        loop {
            self.state ^= self.state << 13;
            self.state ^= self.state >> 7;
            self.state ^= self.state << 17;
            let port = self.range.0 + (self.state % span) as u16;
            if avoid.binary_search(&port).is_err() {
                return Some(port);
            }
        }
    }
}

/// Creates the socket, binds it as `how` says (with `port` as the source port, if given) and
/// starts the connect.
fn start_connect(
    dst: SocketAddr,
    how: &Dial,
    port: Option<u16>,
) -> io::Result<std::os::fd::OwnedFd> {
    let (af, family) = match dst {
        SocketAddr::V4(_) => (AddressFamily::Inet, Family::V4),
        SocketAddr::V6(_) => (AddressFamily::Inet6, Family::V6),
    };
    let flags = SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC;
    let fd = socket(af, SockType::Stream, flags, SockProtocol::Tcp)?;
    setsockopt(&fd, sockopt::TcpNoDelay, &true)?;
    let src = match how.source {
        Source::Any => port.map(|_| match family {
            Family::V4 => IpAddr::from(std::net::Ipv4Addr::UNSPECIFIED),
            Family::V6 => IpAddr::from(std::net::Ipv6Addr::UNSPECIFIED),
        }),
        Source::InboundSix => Some(family.inbound_source().addr()),
        Source::Transparent(ip) => {
            // Needs CAP_NET_ADMIN, kept across --user in tproxy mode.
            setsockopt(&fd, sockopt::IpTransparent, &true)?;
            if let Some(m) = how.mark {
                setsockopt(&fd, sockopt::Mark, &m)?;
            }
            Some(ip)
        }
    };
    if let Some(ip) = src {
        match port {
            // Shared with the proxy's other upstream sockets to other destinations; the
            // 4-tuple is checked at connect.
            Some(_) => setsockopt(&fd, sockopt::ReuseAddr, &true)?,
            // The port is picked at connect time, for the full 4-tuple: binding does not use
            // up one of the source address's ports per connection.
            None => {
                let _ = setsockopt(&fd, sockopt::IpBindAddressNoPort, &true);
            }
        }
        bind(
            fd.as_raw_fd(),
            &SockaddrStorage::from(SocketAddr::new(ip, port.unwrap_or(0))),
        )?;
    }
    match sys_connect(fd.as_raw_fd(), &SockaddrStorage::from(dst)) {
        Ok(()) | Err(Errno::EINPROGRESS) => Ok(fd),
        Err(e) => Err(e.into()),
    }
}

/// Waits for a started connect, at most `timeout`.
async fn finish_connect(
    fd: std::os::fd::OwnedFd,
    timeout: Duration,
) -> Result<TcpStream, (End, Option<io::Error>)> {
    let failed = |e: io::Error| (End::ConnectFailed, Some(e));
    let stream = TcpStream::from_std(std::net::TcpStream::from(fd)).map_err(failed)?;
    let ready =
        match tokio::time::timeout(timeout, stream.ready(Interest::WRITABLE | Interest::ERROR))
            .await
        {
            Err(_) => return Err((End::ConnectTimeout, None)),
            Ok(Err(e)) => return Err(failed(e)),
            Ok(Ok(r)) => r,
        };
    if ready.is_error() || ready.is_write_closed() {
        let e = match stream.take_error() {
            Ok(Some(e)) | Err(e) => e,
            Ok(None) => io::ErrorKind::ConnectionRefused.into(),
        };
        return Err(failed(e));
    }
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn classifies_original_destinations() {
        let own = [15001, 15006, 15000];
        let ips: [IpAddr; 1] = ["10.200.0.2".parse().unwrap()];
        let local = || Some(sa("10.200.0.2:15001"));
        let c = |orig: &str| classify(Ok(sa(orig)), local, &own, &ips);
        assert_eq!(c("10.200.0.1:80"), Verdict::Forward(sa("10.200.0.1:80")));
        // A remote's port 15001 is not ours.
        assert_eq!(
            c("10.200.0.1:15001"),
            Verdict::Forward(sa("10.200.0.1:15001"))
        );
        assert_eq!(c("10.200.0.2:15001"), Verdict::NotRedirected);
        assert_eq!(c("127.0.0.1:15006"), Verdict::Loop(sa("127.0.0.1:15006")));
        assert_eq!(c("10.200.0.2:15000"), Verdict::Loop(sa("10.200.0.2:15000")));
        // Ours by address even when the namespace's address list is stale.
        let fresh = || Some(sa("10.200.0.9:15001"));
        assert_eq!(
            classify(Ok(sa("10.200.0.9:15001")), fresh, &own, &ips),
            Verdict::NotRedirected
        );
        let err = classify(Err(io::Error::from_raw_os_error(2)), local, &own, &ips);
        assert_eq!(err, Verdict::NotRedirected);
        let l6 = || Some(sa("[fd00:5::2]:15006"));
        assert_eq!(
            classify(Ok(sa("[::1]:15001")), l6, &own, &[]),
            Verdict::Loop(sa("[::1]:15001"))
        );
    }
}
