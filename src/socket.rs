//! Socket tricks in one place: the original destination of a redirected connection.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsFd;

use nix::sys::socket::{getsockopt, sockopt};

/// An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`, what a dual-stack socket reports for an
/// IPv4 peer) as the IPv4 address it stands for; any other address as it is.
pub fn unmap(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => a,
        },
        v4 => v4,
    }
}

/// The address the client dialled before netfilter redirected it (`SO_ORIGINAL_DST`, or
/// `IP6T_SO_ORIGINAL_DST` on an IPv6 socket). For a connection that was not redirected this
/// is the socket's own local address.
pub fn original_dst<S: AsFd>(sock: &S, local: SocketAddr) -> io::Result<SocketAddr> {
    // A dual-stack listener sees IPv4 clients as ::ffff:a.b.c.d; their NAT state is IPv4.
    let v4 = match local {
        SocketAddr::V4(_) => true,
        SocketAddr::V6(a) => a.ip().to_ipv4_mapped().is_some(),
    };
    match v4 {
        true => {
            let sa = getsockopt(sock, sockopt::OriginalDst)?;
            Ok(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr)),
                u16::from_be(sa.sin_port),
            )))
        }
        false => {
            let sa = getsockopt(sock, sockopt::Ip6tOriginalDst)?;
            Ok(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sa.sin6_addr.s6_addr),
                u16::from_be(sa.sin6_port),
                sa.sin6_flowinfo,
                sa.sin6_scope_id,
            )))
        }
    }
}
