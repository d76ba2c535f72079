//! What shunt asks of the kernel over netlink instead of through a process, because apply is
//! measured against a bare `nft -f` and each tool started costs 2–5 ms: which nf_tables
//! tables a namespace has (an apply into a fresh namespace then reads nothing), `ip addr
//! replace` of one address (`::6` on lo), and committing one nf_tables batch (the messages
//! are built in `nftables::wire`).
//!
//! Each is one send and its answers on a socket opened inside the namespace (a netlink
//! socket belongs to the namespace of the thread that opens it). A handful of message kinds
//! does not justify a netlink crate family; the layouts are in linux/netlink.h,
//! linux/netfilter/nfnetlink.h, nf_tables.h and linux/if_addr.h.

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
const NLA_F_NESTED: u16 = 0x8000;
const SOL_NETLINK: nix::libc::c_int = 270;
const NETLINK_CAP_ACK: nix::libc::c_int = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 16;
const NFNL_MSG_BATCH_END: u16 = 17;

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

/// Netlink attributes being written: values, and nests whose length is set when they end.
#[derive(Default)]
pub struct Attrs(Vec<u8>);

impl Attrs {
    pub fn bytes(&mut self, kind: u16, value: &[u8]) {
        attribute(&mut self.0, kind, value);
    }

    /// A NUL-terminated string.
    pub fn str(&mut self, kind: u16, value: &str) {
        let len = 5 + value.len();
        self.0.extend_from_slice(&(len as u16).to_ne_bytes());
        self.0.extend_from_slice(&kind.to_ne_bytes());
        self.0.extend_from_slice(value.as_bytes());
        self.0.push(0);
        self.0.resize(align(self.0.len()), 0);
    }

    /// A 32-bit number in network byte order, as nf_tables takes them.
    pub fn u32(&mut self, kind: u16, value: u32) {
        self.bytes(kind, &value.to_be_bytes());
    }

    /// Opens a nested attribute; pass the result to [`Attrs::end`].
    pub fn nest(&mut self, kind: u16) -> usize {
        let at = self.0.len();
        self.0.extend_from_slice(&0u16.to_ne_bytes());
        self.0
            .extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        at
    }

    pub fn end(&mut self, at: usize) {
        debug_assert!(
            self.0.len() - at <= usize::from(u16::MAX),
            "a nest over 64 KiB"
        );
        let len = (self.0.len() - at) as u16;
        self.0[at..at + 2].copy_from_slice(&len.to_ne_bytes());
    }
}

/// One nf_tables transaction: messages between a batch begin and end, and what each one
/// writes, so that a refusal names it.
pub struct Batch {
    attrs: Attrs,
    start: usize,
    what: Vec<String>,
}

/// The kernel's refusal of a batch: what the refused message wrote, and the errno.
#[derive(Debug)]
pub struct Refused {
    pub what: String,
    pub source: io::Error,
}

impl Default for Batch {
    fn default() -> Self {
        Self::new()
    }
}

impl Batch {
    pub fn new() -> Batch {
        let mut b = Batch {
            attrs: Attrs(Vec::with_capacity(4096)),
            start: 0,
            what: Vec::new(),
        };
        b.frame(NFNL_MSG_BATCH_BEGIN);
        b
    }

    /// A batch begin or end: sequence 0, for the nf_tables subsystem.
    fn frame(&mut self, kind: u16) {
        let buf = &mut self.attrs.0;
        push_header(buf, HEADER as u32 + 4, kind, NLM_F_REQUEST, 0);
        // nfgenmsg: AF_UNSPEC, version 0, resource id: the subsystem, big-endian.
        buf.extend_from_slice(&[0, 0]);
        buf.extend_from_slice(&NFNL_SUBSYS_NFTABLES.to_be_bytes());
    }

    /// Starts an nf_tables message (`NFT_MSG_*` `kind`) for `family`; write its attributes
    /// into the result, then call [`Batch::finish`].
    pub fn message(&mut self, kind: u8, family: u8, flags: u16, what: String) -> &mut Attrs {
        self.what.push(what);
        let seq = self.what.len() as u32;
        let buf = &mut self.attrs.0;
        self.start = buf.len();
        let kind = NFNL_SUBSYS_NFTABLES << 8 | u16::from(kind);
        // The length is set in `finish`; then nfgenmsg: the family, version 0, resource 0.
        push_header(buf, 0, kind, NLM_F_REQUEST | flags, seq);
        buf.extend_from_slice(&[family, 0, 0, 0]);
        &mut self.attrs
    }

    /// Ends the message [`Batch::message`] started.
    pub fn finish(&mut self) {
        let len = (self.attrs.0.len() - self.start) as u32;
        self.attrs.0[self.start..self.start + 4].copy_from_slice(&len.to_ne_bytes());
    }

    /// How many messages, and bytes, the batch holds.
    pub fn size(&self) -> (usize, usize) {
        (self.what.len(), self.attrs.0.len())
    }

    /// The batch's bytes, end included.
    pub(crate) fn seal(mut self) -> (Vec<u8>, Vec<String>) {
        self.frame(NFNL_MSG_BATCH_END);
        (self.attrs.0, self.what)
    }
}

/// Commits one batch in the namespace: the kernel applies all of it or none. The outer error
/// is entering the namespace, the inner one the kernel's answer.
pub fn commit(ns: Option<&Netns>, batch: Batch) -> Result<Result<(), Refused>, netns::NetnsError> {
    let (bytes, what) = batch.seal();
    netns::run_in(ns, move || commit_here(&bytes, &what))
}

fn commit_here(bytes: &[u8], what: &[String]) -> Result<(), Refused> {
    use std::os::fd::AsRawFd;
    let refused = |what: &str, source: io::Error| Refused {
        what: what.to_string(),
        source,
    };
    let socket_error = |e: nix::Error| refused("the netlink socket", io::Error::from(e));
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkNetFilter,
    )
    .map_err(socket_error)?;
    // An error echoes only the refused message's header, not a 64 KiB element list. Where
    // the kernel will not (before 4.3), the receive buffer below holds a whole echo.
    let one: nix::libc::c_int = 1;
    // SAFETY: a valid socket and a pointer to a c_int that outlives the call.
    let capped = unsafe {
        nix::libc::setsockopt(
            fd.as_raw_fd(),
            SOL_NETLINK,
            NETLINK_CAP_ACK,
            (&one as *const nix::libc::c_int).cast(),
            std::mem::size_of::<nix::libc::c_int>() as nix::libc::socklen_t,
        )
    } == 0;
    // The kernel refuses a message larger than the send buffer (10,000 scattered /24s: 0.4 MB).
    if bytes.len() > 128 * 1024 {
        use nix::sys::socket::{setsockopt, sockopt};
        setsockopt(&fd, sockopt::SndBufForce, &(bytes.len() + 4096)).map_err(socket_error)?;
    }
    sendto(
        fd.as_raw_fd(),
        bytes,
        &NetlinkAddr::new(0, 0),
        MsgFlags::empty(),
    )
    .map_err(|e| refused("the transaction", io::Error::from(e)))?;
    // The batch is applied, or refused, inside sendto: any refusal is already queued. Nothing
    // queued means it was applied (no message asks for an acknowledgement).
    let mut buf = vec![0u8; if capped { 8192 } else { 128 * 1024 }];
    loop {
        let n = match recv(fd.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT) {
            Ok(n) => n,
            Err(nix::errno::Errno::EAGAIN) => return Ok(()),
            Err(e) => return Err(refused("the transaction", io::Error::from(e))),
        };
        if let Some((seq, code)) = first_error(&buf[..n]) {
            let what = match seq.checked_sub(1).and_then(|i| what.get(i as usize)) {
                Some(w) => w.as_str(),
                None => "the batch",
            };
            return Err(refused(what, code));
        }
    }
}

/// The first refusal in the kernel's answers to a batch: the refused message's sequence
/// number (0 when it cannot be read) and the error. Anything that is not a well-formed
/// acknowledgement counts as a refusal: a batch is applied only when nothing says otherwise.
fn first_error(mut data: &[u8]) -> Option<(u32, io::Error)> {
    let unreadable = || io::Error::new(io::ErrorKind::InvalidData, "an unreadable netlink answer");
    while !data.is_empty() {
        if data.len() < HEADER {
            return Some((0, unreadable()));
        }
        let len = u32::from_ne_bytes([data[0], data[1], data[2], data[3]]) as usize;
        let kind = u16::from_ne_bytes([data[4], data[5]]);
        // A truncated echo still starts with the errno and the refused header.
        let body = &data[HEADER.min(data.len())..len.clamp(HEADER, data.len())];
        let code = body
            .get(..4)
            .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
        let seq = body
            .get(12..16)
            .map_or(0, |b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
        match (kind, code) {
            (NLMSG_ERROR, Some(0)) if len >= HEADER && len <= data.len() => {}
            (NLMSG_ERROR, Some(code)) if code != 0 => {
                return Some((seq, io::Error::from_raw_os_error(-code)))
            }
            _ => return Some((seq, unreadable())),
        }
        data = &data[align(len).min(data.len())..];
    }
    None
}

fn header(kind: u16, flags: u16) -> Vec<u8> {
    let mut msg = Vec::with_capacity(64);
    push_header(&mut msg, 0, kind, flags, 1); // the length is set in `exchange`
    msg
}

/// A netlink message header (`struct nlmsghdr`); the port id is the kernel's to fill in.
fn push_header(buf: &mut Vec<u8>, len: u32, kind: u16, flags: u16, seq: u32) {
    buf.extend_from_slice(&len.to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(&flags.to_ne_bytes());
    buf.extend_from_slice(&seq.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes());
}

fn attribute(msg: &mut Vec<u8>, kind: u16, value: &[u8]) {
    let len = 4 + value.len();
    debug_assert!(len <= usize::from(u16::MAX), "an attribute over 64 KiB");
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

    fn answer(kind: u16, code: i32, seq: u32, len: Option<u32>) -> Vec<u8> {
        let mut m = header(kind, 0);
        m.extend_from_slice(&code.to_ne_bytes());
        let mut echoed = header(10 << 8 | 6, 0);
        echoed[8..12].copy_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&echoed);
        let n = len.unwrap_or(m.len() as u32);
        m[..4].copy_from_slice(&n.to_ne_bytes());
        m
    }

    #[test]
    fn a_refusal_is_found_even_truncated_and_an_ack_is_not_one() {
        assert!(first_error(&answer(NLMSG_ERROR, 0, 3, None)).is_none());
        let (seq, e) = first_error(&answer(NLMSG_ERROR, -2, 7, None)).expect("a refusal");
        assert_eq!((seq, e.raw_os_error()), (7, Some(2)));
        // An echo longer than the buffer: cut, but the errno and the sequence are there.
        let (seq, e) = first_error(&answer(NLMSG_ERROR, -22, 9, Some(70_000))).expect("cut");
        assert_eq!((seq, e.raw_os_error()), (9, Some(22)));
        // Anything else, or a message too short to read, is not taken for success.
        assert!(first_error(&answer(NLMSG_DONE, 0, 1, None)).is_some());
        assert!(first_error(&[1, 2, 3]).is_some());
        let mut two = answer(NLMSG_ERROR, 0, 1, None);
        two.extend(answer(NLMSG_ERROR, -1, 2, None));
        assert_eq!(first_error(&two).map(|(s, _)| s), Some(2));
    }

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
