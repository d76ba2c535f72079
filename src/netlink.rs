//! Two questions for the kernel asked over netlink instead of through a process, because
//! apply is measured against a bare `nft -f` and each tool started costs 2–5 ms:
//! which nf_tables tables a namespace has (an apply into a fresh namespace then reads
//! nothing), and `ip addr replace` of one address (`::6` on lo).
//!
//! Each is one request and its answer on a socket opened inside the namespace (a netlink
//! socket belongs to the namespace of the thread that opens it). Two fixed messages do not
//! justify a netlink crate family; the layouts are in linux/netlink.h, linux/netfilter/
//! nfnetlink.h, nf_tables.h and linux/if_addr.h.

use std::io;
use std::net::Ipv6Addr;

use nix::sys::socket::{
    recv, sendto, socket, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType,
};

use crate::netns::{self, Netns};

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP_INTR: u16 = 0x10;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_CREATE: u16 = 0x400;
const HEADER: usize = 16;

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_GETTABLE: u16 = 1;
const NFTA_TABLE_NAME: u16 = 1;

const RTM_NEWADDR: u16 = 20;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;

/// An nf_tables table: its family (`NFPROTO_*`: 1 inet, 2 ip, 10 ip6, ...) and name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    pub family: u8,
    pub name: String,
}

pub const INET: u8 = 1;
pub const IPV4: u8 = 2;
pub const IPV6: u8 = 10;

/// The nf_tables tables of the namespace, or `None` when the kernel would not say (no
/// nf_tables, a dump interrupted by a change): callers then ask the tools as before.
pub fn tables(ns: Option<&Netns>) -> Option<Vec<Table>> {
    netns::run_in(ns, tables_here).unwrap_or_else(|e| {
        tracing::debug!("netlink table dump: {e}");
        None
    })
}

/// [`tables`] of the namespace the calling thread is in.
pub fn tables_here() -> Option<Vec<Table>> {
    let mut msg = header(
        NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_GETTABLE,
        NLM_F_REQUEST | NLM_F_DUMP,
    );
    // nfgenmsg: every family, version 0, resource id 0.
    msg.extend_from_slice(&[0, 0, 0, 0]);
    let mut out = Vec::new();
    let listed = exchange(SockProtocol::NetlinkNetFilter, msg, |kind, body| {
        if kind == NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_NEWTABLE && body.len() >= 4 {
            let name = attributes(&body[4..])
                .find(|(t, _)| *t == NFTA_TABLE_NAME)
                .map(|(_, v)| {
                    String::from_utf8_lossy(v.split(|b| *b == 0).next().unwrap_or(v)).into_owned()
                });
            if let Some(name) = name {
                out.push(Table {
                    family: body[0],
                    name,
                });
            }
        }
    });
    match listed {
        Ok(()) => Some(out),
        Err(e) => {
            tracing::debug!("netlink table dump: {e}; asking the tools instead");
            None
        }
    }
}

/// `ip -6 addr replace ADDR/PREFIX dev IFNAME` in the namespace: the outer error is entering
/// it, the inner one the kernel's answer.
pub fn replace_address_v6(
    ns: Option<&Netns>,
    ifname: &'static str,
    addr: Ipv6Addr,
    prefix: u8,
) -> Result<io::Result<()>, netns::NetnsError> {
    netns::run_in(ns, move || {
        let index = nix::net::if_::if_nametoindex(ifname).map_err(io::Error::from)?;
        let mut msg = header(
            RTM_NEWADDR,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
        );
        // ifaddrmsg: family, prefix length, flags, scope (global), interface index.
        msg.extend_from_slice(&[nix::libc::AF_INET6 as u8, prefix, 0, 0]);
        msg.extend_from_slice(&index.to_ne_bytes());
        for kind in [IFA_LOCAL, IFA_ADDRESS] {
            attribute(&mut msg, kind, &addr.octets());
        }
        exchange(SockProtocol::NetlinkRoute, msg, |_, _| {})
    })
}

fn header(kind: u16, flags: u16) -> Vec<u8> {
    let mut msg = Vec::with_capacity(64);
    msg.extend_from_slice(&0u32.to_ne_bytes()); // length, set in `exchange`
    msg.extend_from_slice(&kind.to_ne_bytes());
    msg.extend_from_slice(&flags.to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    msg.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
    msg
}

fn attribute(msg: &mut Vec<u8>, kind: u16, value: &[u8]) {
    let len = 4 + value.len();
    msg.extend_from_slice(&(len as u16).to_ne_bytes());
    msg.extend_from_slice(&kind.to_ne_bytes());
    msg.extend_from_slice(value);
    msg.resize(align(msg.len()), 0);
}

fn align(n: usize) -> usize {
    (n + 3) & !3
}

/// The (type, value) attributes of a message body.
fn attributes(mut data: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if data.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([data[0], data[1]]) as usize;
        let kind = u16::from_ne_bytes([data[2], data[3]]) & 0x3fff;
        if len < 4 || len > data.len() {
            return None;
        }
        let value = &data[4..len];
        data = &data[align(len).min(data.len())..];
        Some((kind, value))
    })
}

/// Sends one request and hands every answer's (type, body) to `each`, until the kernel says
/// done (a dump) or acknowledges (a request with an ack); an error answer is the errno.
fn exchange(
    protocol: SockProtocol,
    mut msg: Vec<u8>,
    mut each: impl FnMut(u16, &[u8]),
) -> io::Result<()> {
    let len = msg.len() as u32;
    msg[..4].copy_from_slice(&len.to_ne_bytes());
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        protocol,
    )?;
    use std::os::fd::AsRawFd;
    sendto(
        fd.as_raw_fd(),
        &msg,
        &NetlinkAddr::new(0, 0),
        MsgFlags::empty(),
    )?;
    // A dump message is at most 32 KiB; a larger one would be cut, and read as an error.
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty())?;
        let mut data = &buf[..n];
        while data.len() >= HEADER {
            let len = u32::from_ne_bytes([data[0], data[1], data[2], data[3]]) as usize;
            let kind = u16::from_ne_bytes([data[4], data[5]]);
            let flags = u16::from_ne_bytes([data[6], data[7]]);
            if len < HEADER || len > data.len() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "short netlink message",
                ));
            }
            let body = &data[HEADER..len];
            match kind {
                NLMSG_DONE => return Ok(()),
                NLMSG_ERROR => {
                    let code = body
                        .get(..4)
                        .map_or(0, |b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
                    return match code {
                        0 => Ok(()),
                        e => Err(io::Error::from_raw_os_error(-e)),
                    };
                }
                _ if flags & NLM_F_DUMP_INTR != 0 => {
                    return Err(io::Error::new(
                        io::ErrorKind::Interrupted,
                        "the tables changed during the dump",
                    ))
                }
                _ => each(kind, body),
            }
            data = &data[align(len).min(data.len())..];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_are_read_back_as_written() {
        let mut msg = Vec::new();
        attribute(&mut msg, NFTA_TABLE_NAME, b"shunt\0");
        attribute(&mut msg, 7, &[1, 2, 3, 4, 5]);
        let got: Vec<_> = attributes(&msg).collect();
        assert_eq!(got, vec![(1, &b"shunt\0"[..]), (7, &[1, 2, 3, 4, 5][..])]);
        // A length past the end stops the walk instead of reading beyond it.
        let mut bad = msg.clone();
        bad[0] = 200;
        assert_eq!(attributes(&bad).count(), 0);
    }
}
