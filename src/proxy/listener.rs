//! Listening sockets and the accept loop: limits, back-off on accept errors, and the stop
//! signal that closes the listeners when the proxy drains.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::socket::{setsockopt, sockopt};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::watch;

use super::forward;
use super::relay::reset;
use super::stats::{Direction, End};
use super::Shared;

const BACKLOG: u32 = 4096;
const BACKOFF_MIN: Duration = Duration::from_millis(5);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// A listening socket on `addr`; an IPv6 one is IPv6-only, so IPv4 clients arrive on the IPv4
/// socket with IPv4 addresses (and `SO_ORIGINAL_DST` rather than its IPv6 twin).
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    bind_with(addr, false)
}

/// `transparent`: IP_TRANSPARENT, so TPROXY can hand it connections for any address.
pub fn bind_with(addr: SocketAddr, transparent: bool) -> io::Result<TcpListener> {
    let sock = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => {
            let s = TcpSocket::new_v6()?;
            setsockopt(&s, sockopt::Ipv6V6Only, &true)?;
            s
        }
    };
    sock.set_reuseaddr(true)?;
    // Accepted sockets inherit TCP_NODELAY from the listener: one setsockopt fewer per
    // connection.
    sock.set_nodelay(true)?;
    if transparent {
        setsockopt(&sock, sockopt::IpTransparent, &true)?;
    }
    sock.bind(addr)?;
    sock.listen(BACKLOG)
}

/// Counts a connection as open for as long as its task lives.
pub struct Active {
    shared: Arc<Shared>,
    dir: Direction,
}

impl Active {
    fn new(shared: Arc<Shared>, dir: Direction) -> Active {
        shared.stats.dir(dir).cx_active.inc();
        Active { shared, dir }
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.shared.stats.dir(self.dir).cx_active.dec();
    }
}

/// Errors that concern one connection only; the next accept may succeed at once.
fn per_connection(e: &io::Error) -> bool {
    use nix::libc;
    matches!(
        e.raw_os_error(),
        Some(libc::ECONNABORTED | libc::ECONNRESET | libc::EPROTO | libc::EPERM | libc::EINTR)
    )
}

/// Accepts until `stop` fires, then drops the listener (new connections are refused).
pub async fn accept_loop(
    shared: Arc<Shared>,
    listener: TcpListener,
    dir: Direction,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Duration::ZERO;
    let listen = match listener.local_addr() {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(direction = dir.name(), "listener has no address: {e}");
            return;
        }
    };
    loop {
        let accepted = tokio::select! {
            biased;
            _ = stop.changed() => return,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((sock, peer)) => {
                backoff = Duration::ZERO;
                let stats = shared.stats.dir(dir);
                stats.cx_total.inc();
                if shared.stats.active() >= shared.max_connections {
                    stats.cx_overflow.inc();
                    reset(&sock);
                    forward::access_log(dir, peer, None, (0, 0), None, End::Overflow, None);
                    continue;
                }
                let active = Active::new(shared.clone(), dir);
                tokio::spawn(forward::handle(
                    shared.clone(),
                    sock,
                    peer,
                    listen,
                    dir,
                    active,
                ));
            }
            Err(e) if per_connection(&e) => continue,
            Err(e) => {
                // EMFILE, ENFILE, ENOBUFS, ENOMEM: the pending connection stays queued; wait
                // for descriptors or memory to come back instead of spinning on it.
                shared.stats.accept_errors.inc();
                backoff = (backoff * 2).clamp(BACKOFF_MIN, BACKOFF_MAX);
                tracing::warn!(
                    direction = dir.name(),
                    "accept failed: {e}; retrying in {}ms",
                    backoff.as_millis()
                );
                tokio::select! {
                    _ = stop.changed() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
            }
        }
    }
}
