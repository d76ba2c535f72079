//! The `nameserver` lines of a resolv.conf, read once for the two things that use them: the
//! DNS capture rules (which servers' traffic is redirected) and the proxy's DNS forwarder
//! (where it forwards). One reader, so both always agree on the list.

use std::net::{IpAddr, SocketAddr, SocketAddrV6};

/// One `nameserver` entry: its address and, for a scoped IPv6 one (`fe80::1%eth0`), the
/// interface it is reached through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nameserver {
    pub addr: IpAddr,
    pub scope: Option<String>,
}

impl Nameserver {
    /// Its port-53 socket address; a scope is resolved to the interface index in the calling
    /// thread's namespace (0, "any", when that interface does not exist there).
    pub fn socket_addr(&self) -> SocketAddr {
        match (self.addr, &self.scope) {
            (IpAddr::V6(a), Some(ifname)) => {
                let index = nix::net::if_::if_nametoindex(ifname.as_str()).unwrap_or(0);
                SocketAddr::V6(SocketAddrV6::new(a, 53, 0, index))
            }
            (a, _) => SocketAddr::new(a, 53),
        }
    }
}

/// Every well-formed `nameserver` line, in order; anything else is ignored, as the libc
/// resolver does.
pub fn nameservers(text: &str) -> Vec<Nameserver> {
    text.lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            (words.next()? == "nameserver").then_some(())?;
            let word = words.next()?;
            let (addr, scope) = match word.split_once('%') {
                Some((a, s)) if !s.is_empty() => (a, Some(s.to_string())),
                Some(_) => return None,
                None => (word, None),
            };
            let addr: IpAddr = addr.parse().ok()?;
            // Only an IPv6 address has a scope.
            (scope.is_none() || addr.is_ipv6()).then_some(Nameserver { addr, scope })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_plain_and_scoped_servers_and_skips_the_rest() {
        let t = "# comment\nsearch svc.cluster.local\nnameserver 10.96.0.10\nnameserver fe80::1%lo\n\
                 nameserver\toptions\nnameserver fd00::a\nnameserver 10.0.0.1%eth0\nnameserver fe80::2%\n\
                 options ndots:5\nnameserver bogus\n  nameserver 1.1.1.1\n";
        let got = nameservers(t);
        let addrs: Vec<String> = got.iter().map(|n| n.addr.to_string()).collect();
        assert_eq!(addrs, ["10.96.0.10", "fe80::1", "fd00::a", "1.1.1.1"]);
        assert_eq!(got[1].scope.as_deref(), Some("lo"));
        // `lo` exists in every namespace: the scope becomes its index.
        match got[1].socket_addr() {
            SocketAddr::V6(a) => assert!(a.scope_id() > 0 && a.port() == 53),
            other => panic!("{other}"),
        }
        assert_eq!(got[0].socket_addr(), "10.96.0.10:53".parse().unwrap());
    }
}
