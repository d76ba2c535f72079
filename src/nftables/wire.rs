//! The `inet shunt` table as one nf_tables transaction in netlink bytes, so that an apply
//! writes it without starting `nft` (eleven shared libraries and a parser: about 4 ms of an
//! 18 ms apply, measured by `scripts/bench-apply.sh`).
//!
//! The encoding is the one nft 1.0.6 sends for the text [`super::render`] prints, expression
//! for expression (`nft --debug=netlink` shows them): the kernel then holds what nft would
//! have written, `nft list table inet shunt` prints the rendered text, and read back stays a
//! comparison of lines. `tests/nftables.rs` installs every plan shape both ways and compares
//! the two namespaces' `nft --debug=netlink list` output. Layouts: linux/netfilter/nf_tables.h;
//! the set "userdata" (how nft prints a set's keys) follows libnftnl's udata.h.

use std::net::IpAddr;

use ipnet::IpNet;

use super::{Addr, NftRule, Stmt, Table, TABLE};
use crate::config::{IdRange, PortRange};
use crate::netlink::{Attrs, Batch};
use crate::plan::{Family, Owner, Proto, Target};

// Message types (NFT_MSG_*), flags.
const NEWTABLE: u8 = 0;
const DELTABLE: u8 = 2;
const NEWCHAIN: u8 = 3;
const NEWRULE: u8 = 6;
const NEWSET: u8 = 9;
const NEWSETELEM: u8 = 12;
const NLM_F_APPEND: u16 = 0x800;
const NLM_F_CREATE: u16 = 0x400;

const NFPROTO_INET: u8 = 1;
const REG_VERDICT: u32 = 0;
const REG_1: u32 = 1;

// Expression constants.
const CMP_EQ: u32 = 0;
const CMP_NEQ: u32 = 1;
const CMP_LTE: u32 = 3;
const CMP_GTE: u32 = 5;
const RANGE_NEQ: u32 = 1;
const BASE_NETWORK: u32 = 1;
const BASE_TRANSPORT: u32 = 2;
const META_MARK: u32 = 3;
const META_IIFNAME: u32 = 6;
const META_OIFNAME: u32 = 7;
const META_SKUID: u32 = 10;
const META_SKGID: u32 = 11;
const META_NFPROTO: u32 = 15;
const META_L4PROTO: u32 = 16;
const CT_STATE: u32 = 0;
const CT_MARK: u32 = 3;
const CT_ZONE: u32 = 17;
const CT_STATE_INVALID: u32 = 1;
const CT_STATE_ESTABLISHED_RELATED: u32 = 2 | 4;
const VERDICT_DROP: i32 = 0;
const VERDICT_ACCEPT: i32 = 1;
const VERDICT_JUMP: i32 = -3;
const VERDICT_RETURN: i32 = -5;
const NAT_RANGE_PROTO_SPECIFIED: u32 = 2;
const LOOKUP_INVERT: u32 = 1;

// Sets.
const SET_ANONYMOUS: u32 = 1;
const SET_CONSTANT: u32 = 2;
const SET_INTERVAL: u32 = 4;
const ELEM_INTERVAL_END: u32 = 1;
/// nft's datatypes (TYPE_*), as a set's key type.
const TYPE_IPADDR: u32 = 7;
const TYPE_IP6ADDR: u32 = 8;
const TYPE_INET_SERVICE: u32 = 13;
const TYPE_UID: u32 = 24;
const TYPE_GID: u32 = 25;
// libnftnl's userdata records (udata.h): how nft prints a set's keys.
const UDATA_KEY_BYTEORDER: u8 = 0;
const UDATA_MERGE_ELEMENTS: u8 = 2;
const UDATA_KEY_TYPEOF: u8 = 3;
const UDATA_ELEM_FLAGS: u8 = 1;
const UDATA_ELEM_INTERVAL_OPEN: u32 = 1;
const BYTEORDER_HOST: u32 = 1;
const BYTEORDER_BIG_ENDIAN: u32 = 2;
/// nft's expression kinds, as a set's `typeof`.
const EXPR_PAYLOAD: u32 = 7;
const EXPR_META: u32 = 9;
/// nft's protocol descriptions, as a payload `typeof`.
const PROTO_DESC_UDP: u32 = 6;
const PROTO_DESC_TCP: u32 = 8;
/// The destination port field of tcp and udp.
const PORT_DPORT: u32 = 2;
/// A set's NFTA_SET_ELEM_LIST_ELEMENTS is one attribute, at most 64 KiB: larger sets are sent
/// in several messages of this many elements.
const ELEMS_PER_MESSAGE: usize = 1024;

/// The transaction that replaces the whole table: `add table`, `delete table`, then the table.
pub fn transaction(t: &Table) -> Batch {
    let mut b = Batch::new();
    table_msg(&mut b, NEWTABLE, NLM_F_CREATE, "add table");
    table_msg(&mut b, DELTABLE, 0, "delete table");
    table_msg(&mut b, NEWTABLE, NLM_F_CREATE, "table");
    let mut w = Writer { b, set_id: 0 };
    for c in &t.chains {
        let a = w.msg(NEWCHAIN, NLM_F_CREATE, format!("chain {}", c.name));
        a.str(1, TABLE); // NFTA_CHAIN_TABLE
        a.str(3, &c.name); // NFTA_CHAIN_NAME
        if let Some(h) = &c.hook {
            a.str(7, h.kind); // NFTA_CHAIN_TYPE
            a.u32(5, 1); // NFTA_CHAIN_POLICY: accept
            let hook = a.nest(4); // NFTA_CHAIN_HOOK
            a.u32(1, h.number);
            a.u32(2, h.value as u32);
            a.end(hook);
        }
        w.b.finish();
    }
    let mut named = Vec::with_capacity(t.sets.len());
    for s in &t.sets {
        let (kind, len) = match s.family {
            Family::V4 => (TYPE_IPADDR, 4),
            Family::V6 => (TYPE_IP6ADDR, 16),
        };
        let udata = Udata::default().u32(UDATA_KEY_BYTEORDER, BYTEORDER_BIG_ENDIAN);
        let elems = s.nets.iter().map(net_interval).collect::<Vec<_>>();
        let id = w.set(&s.name, SET_INTERVAL, kind, len, None, &udata.0, &elems);
        named.push((s.name.as_str(), id));
    }
    for c in &t.chains {
        for r in &c.rules {
            w.rule(&c.name, r, &named);
        }
    }
    w.b
}

/// `delete table inet shunt`, alone.
pub fn delete() -> Batch {
    let mut b = Batch::new();
    table_msg(&mut b, DELTABLE, 0, "delete table");
    b
}

/// An element for a set that does not exist, after everything else: the kernel refuses the
/// batch at its last message. For tests of a refused transaction.
#[cfg(debug_assertions)]
pub fn bad_element(b: &mut Batch) {
    let a = b.message(
        NEWSETELEM,
        NFPROTO_INET,
        NLM_F_CREATE,
        "elements of set no_such_set".into(),
    );
    a.str(1, TABLE);
    a.str(2, "no_such_set");
    let list = a.nest(3);
    let e = a.nest(1);
    data(a, 1, &[10, 9, 9, 9]); // NFTA_SET_ELEM_KEY
    a.end(e);
    a.end(list);
    b.finish();
}

fn table_msg(b: &mut Batch, kind: u8, flags: u16, what: &str) {
    let a = b.message(kind, NFPROTO_INET, flags, format!("{what} inet {TABLE}"));
    a.str(1, TABLE); // NFTA_TABLE_NAME
    if kind == NEWTABLE {
        a.u32(2, 0); // NFTA_TABLE_FLAGS
    }
    b.finish();
}

/// A key interval `[start, end)`, with no end when it runs to the last key.
type Interval = (Vec<u8>, Option<Vec<u8>>);

/// `first..=last` (big-endian keys) as an interval.
fn interval(first: Vec<u8>, last: Vec<u8>) -> Interval {
    (first, successor(last))
}

fn octets(a: IpAddr) -> Vec<u8> {
    match a {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

fn net_interval(n: &IpNet) -> Interval {
    interval(octets(n.network()), octets(n.broadcast()))
}

/// The big-endian number one past `key`, or `None` past the last one.
fn successor(mut key: Vec<u8>) -> Option<Vec<u8>> {
    for b in key.iter_mut().rev() {
        if *b == 0xff {
            *b = 0;
        } else {
            *b += 1;
            return Some(key);
        }
    }
    None
}

fn port_interval(p: &PortRange) -> Interval {
    interval(
        p.first.to_be_bytes().to_vec(),
        p.last.to_be_bytes().to_vec(),
    )
}

fn id_interval(i: &IdRange) -> Interval {
    interval(
        i.first.to_be_bytes().to_vec(),
        i.last.to_be_bytes().to_vec(),
    )
}

/// Whether an id list holds a range: it is then an interval set in network byte order, which
/// the rule converts the socket's id to first.
fn has_range(ids: &[IdRange]) -> bool {
    ids.iter().any(|i| i.first != i.last)
}

struct Writer {
    b: Batch,
    set_id: u32,
}

impl Writer {
    fn msg(&mut self, kind: u8, flags: u16, what: String) -> &mut Attrs {
        self.b.message(kind, NFPROTO_INET, flags, what)
    }

    /// A set and its elements: intervals when `SET_INTERVAL` is in `flags` (then `elems` are
    /// sorted and do not overlap), else each element's start alone. Returns the set's id.
    #[allow(clippy::too_many_arguments)]
    fn set(
        &mut self,
        name: &str,
        flags: u32,
        key_type: u32,
        key_len: u32,
        size: Option<u32>,
        udata: &[u8],
        elems: &[Interval],
    ) -> u32 {
        self.set_id += 1;
        let id = self.set_id;
        let a = self.msg(NEWSET, NLM_F_CREATE, format!("set {name}"));
        a.str(1, TABLE); // NFTA_SET_TABLE
        a.str(2, name); // NFTA_SET_NAME
        a.u32(3, flags);
        a.u32(4, key_type);
        a.u32(5, key_len);
        a.u32(10, id); // NFTA_SET_ID
        if let Some(size) = size {
            let desc = a.nest(9); // NFTA_SET_DESC
            a.u32(1, size);
            a.end(desc);
        }
        a.bytes(13, udata); // NFTA_SET_USERDATA
        self.b.finish();

        // Interval sets hold each interval as its start and, flagged, the key past its end;
        // nft also ends an interval at zero when the first one starts later.
        let interval = flags & SET_INTERVAL != 0;
        let mut keys: Vec<(&[u8], bool, bool)> = Vec::with_capacity(elems.len() * 2 + 1);
        let zero = vec![0u8; key_len as usize];
        if interval
            && elems
                .first()
                .is_some_and(|(s, _)| s.iter().any(|b| *b != 0))
        {
            keys.push((&zero, true, false));
        }
        for (start, end) in elems {
            keys.push((start, false, interval && end.is_none()));
            if let (true, Some(end)) = (interval, end) {
                keys.push((end, true, false));
            }
        }
        for chunk in keys.chunks(ELEMS_PER_MESSAGE) {
            let a = self.msg(NEWSETELEM, NLM_F_CREATE, format!("elements of set {name}"));
            a.str(1, TABLE); // NFTA_SET_ELEM_LIST_TABLE
            a.str(2, name); // NFTA_SET_ELEM_LIST_SET
            a.u32(4, id); // NFTA_SET_ELEM_LIST_SET_ID
            let list = a.nest(3); // NFTA_SET_ELEM_LIST_ELEMENTS
            for (key, end, open) in chunk {
                let e = a.nest(1); // NFTA_LIST_ELEM
                if *end {
                    a.u32(3, ELEM_INTERVAL_END); // NFTA_SET_ELEM_FLAGS
                }
                let k = a.nest(1); // NFTA_SET_ELEM_KEY
                a.bytes(1, key); // NFTA_DATA_VALUE
                a.end(k);
                if *open {
                    let u = Udata::default().u32(UDATA_ELEM_FLAGS, UDATA_ELEM_INTERVAL_OPEN);
                    a.bytes(6, &u.0); // NFTA_SET_ELEM_USERDATA
                }
                a.end(e);
            }
            a.end(list);
            self.b.finish();
        }
        id
    }

    /// An anonymous set for a rule's list, named by the kernel.
    /// `order`: the keys' byte order as nft records it; `typeof`: the expression they are
    /// keys of, as nft records it.
    fn anonymous(
        &mut self,
        key_type: u32,
        key_len: u32,
        order: u32,
        typeof_: Udata,
        elems: &[Interval],
        interval: bool,
    ) -> u32 {
        let mut flags = SET_ANONYMOUS | SET_CONSTANT;
        let mut udata = Udata::default().u32(UDATA_KEY_BYTEORDER, order);
        let size = if interval {
            flags |= SET_INTERVAL;
            // nft merges an anonymous interval set's elements, and says so.
            udata = udata.u32(UDATA_MERGE_ELEMENTS, 1);
            2 * elems.len() as u32 + 1
        } else {
            elems.len() as u32
        };
        let udata = udata.nest(UDATA_KEY_TYPEOF, typeof_);
        self.set(
            "__set%d",
            flags,
            key_type,
            key_len,
            Some(size),
            &udata.0,
            elems,
        )
    }

    fn rule(&mut self, chain: &str, rule: &NftRule, named: &[(&str, u32)]) {
        // Anonymous sets go before the rule that uses them.
        let mut anon = Vec::new();
        for s in &rule.stmts {
            if let Some(id) = self.list_set(s) {
                anon.push(id);
            }
        }
        let what = format!("rule `{}` in chain {chain}", rule.text());
        let a = self.msg(NEWRULE, NLM_F_CREATE | NLM_F_APPEND, what);
        a.str(1, TABLE); // NFTA_RULE_TABLE
        a.str(2, chain); // NFTA_RULE_CHAIN
        let exprs = a.nest(4); // NFTA_RULE_EXPRESSIONS
        let mut e = Exprs {
            a,
            l3: false,
            l4: None,
        };
        let mut anon = anon.into_iter();
        for s in &rule.stmts {
            e.stmt(rule.family, s, named, &mut anon);
        }
        e.a.end(exprs);
        self.b.finish();
    }

    /// The anonymous set a statement's list needs, written now; its id.
    fn list_set(&mut self, s: &Stmt) -> Option<u32> {
        match s {
            // Not one port (a single port or range is a comparison): a set. The statement
            // takes the set under the same condition, so sets and lookups pair up.
            Stmt::Ports { proto, ports, .. } if ports.len() != 1 => {
                let desc = match proto {
                    Proto::Tcp => PROTO_DESC_TCP,
                    Proto::Udp => PROTO_DESC_UDP,
                };
                // typeof `tcp dport`: a payload expression, its protocol and field.
                let field = Udata::default().u32(0, desc).u32(1, PORT_DPORT);
                let typeof_ = Udata::default().u32(0, EXPR_PAYLOAD).nest(1, field);
                let elems: Vec<Interval> = ports.iter().map(port_interval).collect();
                let interval = ports.iter().any(|p| p.first != p.last);
                let order = BYTEORDER_BIG_ENDIAN;
                Some(self.anonymous(TYPE_INET_SERVICE, 2, order, typeof_, &elems, interval))
            }
            Stmt::Owner { kind, ids, .. } if ids.len() != 1 => {
                let (key_type, key) = match kind {
                    Owner::Uid => (TYPE_UID, META_SKUID),
                    Owner::Gid => (TYPE_GID, META_SKGID),
                };
                // typeof `meta skuid`: a meta expression and its key.
                let typeof_ = Udata::default()
                    .u32(0, EXPR_META)
                    .nest(1, Udata::default().u32(0, key));
                // A set of single ids holds them in host order.
                let interval = has_range(ids);
                let elems: Vec<Interval> = if interval {
                    ids.iter().map(id_interval).collect()
                } else {
                    ids.iter()
                        .map(|i| (i.first.to_ne_bytes().to_vec(), None))
                        .collect()
                };
                Some(self.anonymous(key_type, 4, BYTEORDER_HOST, typeof_, &elems, interval))
            }
            _ => None,
        }
    }
}

/// libnftnl userdata: (type, length, value) records, numbers in host byte order.
#[derive(Default)]
struct Udata(Vec<u8>);

impl Udata {
    fn u32(mut self, kind: u8, value: u32) -> Udata {
        self.0.extend_from_slice(&[kind, 4]);
        self.0.extend_from_slice(&value.to_ne_bytes());
        self
    }

    fn nest(mut self, kind: u8, inner: Udata) -> Udata {
        debug_assert!(inner.0.len() <= usize::from(u8::MAX));
        self.0.extend_from_slice(&[kind, inner.0.len() as u8]);
        self.0.extend_from_slice(&inner.0);
        self
    }
}

/// A rule's expressions, with the protocol checks nft puts before the first header field.
struct Exprs<'a> {
    a: &'a mut Attrs,
    l3: bool,
    l4: Option<Proto>,
}

impl Exprs<'_> {
    fn expr(&mut self, name: &str, body: impl FnOnce(&mut Attrs)) {
        let e = self.a.nest(1); // NFTA_LIST_ELEM
        self.a.str(1, name); // NFTA_EXPR_NAME
        let data = self.a.nest(2); // NFTA_EXPR_DATA
        body(self.a);
        self.a.end(data);
        self.a.end(e);
    }

    fn meta_load(&mut self, key: u32) {
        self.expr("meta", |a| {
            a.u32(2, key); // NFTA_META_KEY
            a.u32(1, REG_1); // NFTA_META_DREG
        });
    }

    fn meta_set(&mut self, key: u32) {
        self.expr("meta", |a| {
            a.u32(2, key);
            a.u32(3, REG_1); // NFTA_META_SREG
        });
    }

    fn ct_load(&mut self, key: u32) {
        self.expr("ct", |a| {
            a.u32(2, key); // NFTA_CT_KEY
            a.u32(1, REG_1); // NFTA_CT_DREG
        });
    }

    fn ct_set(&mut self, key: u32) {
        self.expr("ct", |a| {
            a.u32(2, key);
            a.u32(4, REG_1); // NFTA_CT_SREG
        });
    }

    fn cmp(&mut self, op: u32, value: &[u8]) {
        self.expr("cmp", |a| {
            a.u32(1, REG_1); // NFTA_CMP_SREG
            a.u32(2, op); // NFTA_CMP_OP
            data(a, 3, value); // NFTA_CMP_DATA
        });
    }

    fn payload(&mut self, base: u32, offset: u32, len: u32) {
        self.expr("payload", |a| {
            a.u32(1, REG_1); // NFTA_PAYLOAD_DREG
            a.u32(2, base);
            a.u32(3, offset);
            a.u32(4, len);
        });
    }

    fn bitwise(&mut self, mask: &[u8]) {
        self.expr("bitwise", |a| {
            a.u32(1, REG_1); // NFTA_BITWISE_SREG
            a.u32(2, REG_1); // NFTA_BITWISE_DREG
            a.u32(3, mask.len() as u32);
            data(a, 4, mask); // NFTA_BITWISE_MASK
            data(a, 5, &vec![0; mask.len()]); // NFTA_BITWISE_XOR
        });
    }

    fn hton32(&mut self) {
        self.expr("byteorder", |a| {
            a.u32(1, REG_1); // NFTA_BYTEORDER_SREG
            a.u32(2, REG_1); // NFTA_BYTEORDER_DREG
            a.u32(3, 1); // NFTA_BYTEORDER_OP: hton
            a.u32(4, 4); // NFTA_BYTEORDER_LEN
            a.u32(5, 4); // NFTA_BYTEORDER_SIZE
        });
    }

    fn lookup(&mut self, set: &str, id: u32, negate: bool) {
        self.expr("lookup", |a| {
            a.u32(2, REG_1); // NFTA_LOOKUP_SREG
            a.str(1, set); // NFTA_LOOKUP_SET
            a.u32(4, id); // NFTA_LOOKUP_SET_ID
            if negate {
                a.u32(5, LOOKUP_INVERT); // NFTA_LOOKUP_FLAGS
            }
        });
    }

    /// `first-last` on the loaded (big-endian) value: two comparisons, or a range when negated.
    fn between(&mut self, first: &[u8], last: &[u8], negate: bool) {
        if negate {
            self.expr("range", |a| {
                a.u32(1, REG_1); // NFTA_RANGE_SREG
                a.u32(2, RANGE_NEQ); // NFTA_RANGE_OP
                data(a, 3, first); // NFTA_RANGE_FROM_DATA
                data(a, 4, last); // NFTA_RANGE_TO_DATA
            });
        } else {
            self.cmp(CMP_GTE, first);
            self.cmp(CMP_LTE, last);
        }
    }

    fn immediate(&mut self, value: &[u8]) {
        self.expr("immediate", |a| {
            a.u32(1, REG_1); // NFTA_IMMEDIATE_DREG
            data(a, 2, value); // NFTA_IMMEDIATE_DATA
        });
    }

    fn verdict(&mut self, code: i32, chain: Option<&str>) {
        self.expr("immediate", |a| {
            a.u32(1, REG_VERDICT);
            let d = a.nest(2); // NFTA_IMMEDIATE_DATA
            let v = a.nest(2); // NFTA_DATA_VERDICT
            a.u32(1, code as u32); // NFTA_VERDICT_CODE
            if let Some(chain) = chain {
                a.str(2, chain); // NFTA_VERDICT_CHAIN
            }
            a.end(v);
            a.end(d);
        });
    }

    /// `meta nfproto` before the first address of the rule: the inet table sees both families.
    fn need_l3(&mut self, family: Family) {
        if !self.l3 {
            self.l3 = true;
            self.meta_load(META_NFPROTO);
            self.cmp(CMP_EQ, &[nfproto_number(family)]);
        }
    }

    /// `meta l4proto` before the first port of the rule.
    fn need_l4(&mut self, proto: Proto) {
        if self.l4 != Some(proto) {
            self.l4 = Some(proto);
            self.meta_load(META_L4PROTO);
            self.cmp(CMP_EQ, &[proto_number(proto)]);
        }
    }

    fn stmt(
        &mut self,
        family: Family,
        s: &Stmt,
        named: &[(&str, u32)],
        anon: &mut impl Iterator<Item = u32>,
    ) {
        let op = |negate: bool| if negate { CMP_NEQ } else { CMP_EQ };
        match s {
            Stmt::Addr { src, negate, addr } => {
                self.need_l3(family);
                let (offset, len) = match (family, src) {
                    (Family::V4, true) => (12, 4),
                    (Family::V4, false) => (16, 4),
                    (Family::V6, true) => (8, 16),
                    (Family::V6, false) => (24, 16),
                };
                match addr {
                    Addr::Set(name) => {
                        self.payload(BASE_NETWORK, offset, len);
                        let id = named
                            .iter()
                            .find(|(n, _)| n == name)
                            .map_or(0, |(_, id)| *id);
                        self.lookup(name, id, *negate);
                    }
                    Addr::Net(net) => {
                        let bytes = octets(net.trunc().addr());
                        let prefix = u32::from(net.prefix_len());
                        // nft loads only the bytes a whole-byte prefix covers, else masks.
                        if prefix == len * 8 || (prefix > 0 && prefix % 8 == 0) {
                            let n = prefix / 8;
                            self.payload(BASE_NETWORK, offset, n);
                            self.cmp(op(*negate), &bytes[..n as usize]);
                        } else {
                            self.payload(BASE_NETWORK, offset, len);
                            self.bitwise(&octets(net.netmask()));
                            self.cmp(op(*negate), &bytes);
                        }
                    }
                }
            }
            Stmt::Iface { out, negate, name } => {
                self.meta_load(if *out { META_OIFNAME } else { META_IIFNAME });
                match name.strip_suffix('+') {
                    // A wildcard compares the prefix only.
                    Some(prefix) => self.cmp(op(*negate), prefix.as_bytes()),
                    None => {
                        let mut padded = [0u8; 16]; // IFNAMSIZ
                        let n = name.len().min(15);
                        padded[..n].copy_from_slice(&name.as_bytes()[..n]);
                        self.cmp(op(*negate), &padded);
                    }
                }
            }
            Stmt::Ports {
                proto,
                src,
                negate,
                ports,
            } => {
                self.need_l4(*proto);
                self.payload(BASE_TRANSPORT, if *src { 0 } else { 2 }, 2);
                match ports.as_slice() {
                    [p] if p.first == p.last => self.cmp(op(*negate), &p.first.to_be_bytes()),
                    [p] => self.between(&p.first.to_be_bytes(), &p.last.to_be_bytes(), *negate),
                    _ => {
                        let id = anon.next().unwrap_or(0);
                        self.lookup("__set%d", id, *negate);
                    }
                }
            }
            Stmt::L4proto(p) => self.need_l4(*p),
            Stmt::Owner { kind, negate, ids } => {
                self.meta_load(match kind {
                    Owner::Uid => META_SKUID,
                    Owner::Gid => META_SKGID,
                });
                match ids.as_slice() {
                    [i] if i.first == i.last => self.cmp(op(*negate), &i.first.to_ne_bytes()),
                    [i] => {
                        self.hton32();
                        self.between(&i.first.to_be_bytes(), &i.last.to_be_bytes(), *negate);
                    }
                    _ => {
                        if has_range(ids) {
                            self.hton32();
                        }
                        let id = anon.next().unwrap_or(0);
                        self.lookup("__set%d", id, *negate);
                    }
                }
            }
            Stmt::CtInvalid | Stmt::CtEstablished => {
                let bits = match s {
                    Stmt::CtInvalid => CT_STATE_INVALID,
                    _ => CT_STATE_ESTABLISHED_RELATED,
                };
                self.ct_load(CT_STATE);
                self.bitwise(&bits.to_ne_bytes());
                self.cmp(CMP_NEQ, &[0; 4]);
            }
            Stmt::Mark(m) => {
                self.meta_load(META_MARK);
                self.cmp(CMP_EQ, &m.to_ne_bytes());
            }
            Stmt::Connmark(m) => {
                self.ct_load(CT_MARK);
                self.cmp(CMP_EQ, &m.to_ne_bytes());
            }
            Stmt::Nfproto(f) => {
                self.meta_load(META_NFPROTO);
                self.cmp(CMP_EQ, &[nfproto_number(*f)]);
            }
            Stmt::Jump(chain) => self.verdict(VERDICT_JUMP, Some(chain)),
            Stmt::Target(t) => self.target(family, t),
        }
    }

    fn target(&mut self, family: Family, t: &Target) {
        match t {
            // Jumps are resolved to the family's chain name in `Stmt::Jump`.
            Target::Jump { chain } => self.verdict(VERDICT_JUMP, Some(chain)),
            Target::Return => self.verdict(VERDICT_RETURN, None),
            Target::Drop => self.verdict(VERDICT_DROP, None),
            Target::Accept => self.verdict(VERDICT_ACCEPT, None),
            Target::Redirect { to_port } => {
                self.immediate(&to_port.to_be_bytes());
                self.expr("redir", |a| {
                    a.u32(1, REG_1); // NFTA_REDIR_REG_PROTO_MIN
                    a.u32(3, NAT_RANGE_PROTO_SPECIFIED); // NFTA_REDIR_FLAGS
                });
            }
            Target::CtZone { zone } => {
                self.immediate(&zone.to_ne_bytes());
                self.ct_set(CT_ZONE);
            }
            Target::SetMark { mark } => {
                self.immediate(&mark.to_ne_bytes());
                self.meta_set(META_MARK);
            }
            Target::SaveMark => {
                self.meta_load(META_MARK);
                self.ct_set(CT_MARK);
            }
            Target::RestoreMark => {
                self.ct_load(CT_MARK);
                self.meta_set(META_MARK);
            }
            Target::Tproxy { to_port, mark } => {
                self.immediate(&to_port.to_be_bytes());
                self.expr("tproxy", |a| {
                    a.u32(1, u32::from(nfproto_number(family))); // NFTA_TPROXY_FAMILY
                    a.u32(3, REG_1); // NFTA_TPROXY_REG_PORT
                });
                self.immediate(&mark.to_ne_bytes());
                self.meta_set(META_MARK);
                self.verdict(VERDICT_ACCEPT, None);
            }
        }
    }
}

/// A value attribute: `kind { NFTA_DATA_VALUE bytes }`.
fn data(a: &mut Attrs, kind: u16, value: &[u8]) {
    let n = a.nest(kind);
    a.bytes(1, value);
    a.end(n);
}

fn nfproto_number(f: Family) -> u8 {
    match f {
        Family::V4 => 2,
        Family::V6 => 10,
    }
}

fn proto_number(p: Proto) -> u8 {
    match p {
        Proto::Tcp => 6,
        Proto::Udp => 17,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan;

    #[test]
    fn an_interval_ends_one_past_its_last_key_or_runs_open() {
        assert_eq!(successor(vec![10, 0xff]), Some(vec![11, 0]));
        assert_eq!(successor(vec![0xff, 0xff]), None);
        let net: IpNet = "10.1.0.0/16".parse().unwrap();
        assert_eq!(
            net_interval(&net),
            (vec![10, 1, 0, 0], Some(vec![10, 2, 0, 0]))
        );
        let top: IpNet = "255.0.0.0/8".parse().unwrap();
        assert_eq!(net_interval(&top).1, None);
        let p = PortRange {
            first: 80,
            last: 65535,
        };
        assert_eq!(port_interval(&p), (80u16.to_be_bytes().to_vec(), None));
    }

    /// The (type, flags, seq) of every message in a sealed batch, checking each length.
    fn messages(bytes: &[u8]) -> Vec<(u16, u16, u32)> {
        let mut out = Vec::new();
        let mut data = bytes;
        while !data.is_empty() {
            let len = u32::from_ne_bytes(data[..4].try_into().unwrap()) as usize;
            assert!(
                len >= 20 && len <= data.len() && len % 4 == 0,
                "length {len}"
            );
            let kind = u16::from_ne_bytes([data[4], data[5]]);
            let flags = u16::from_ne_bytes([data[6], data[7]]);
            let seq = u32::from_ne_bytes(data[8..12].try_into().unwrap());
            out.push((kind, flags, seq));
            data = &data[len..];
        }
        out
    }

    #[test]
    fn the_transaction_frames_one_message_per_table_chain_set_and_rule() {
        let plan = plan::build(&Default::default(), true);
        let t = super::super::table(&plan);
        let rules: usize = t.chains.iter().map(|c| c.rules.len()).sum();
        let (bytes, what) = transaction(&t).seal();
        let msgs = messages(&bytes);
        assert_eq!(msgs.first().map(|m| m.0), Some(16), "batch begin");
        assert_eq!(msgs.last().map(|m| m.0), Some(17), "batch end");
        let count = |kind: u8| {
            msgs.iter()
                .filter(|m| m.0 == 10 << 8 | u16::from(kind))
                .count()
        };
        assert_eq!(count(NEWTABLE), 2);
        assert_eq!(count(DELTABLE), 1);
        assert_eq!(count(NEWCHAIN), t.chains.len());
        assert_eq!(count(NEWRULE), rules);
        // The default plan's one port list, once per family: an anonymous set each.
        assert_eq!(count(NEWSET), 2);
        // Rules are appended, in order; sequence numbers name the message a refusal is for.
        for (i, m) in msgs[1..msgs.len() - 1].iter().enumerate() {
            assert_eq!(m.2 as usize, i + 1);
            if m.0 == 10 << 8 | u16::from(NEWRULE) {
                assert_eq!(
                    m.1 & (NLM_F_APPEND | NLM_F_CREATE),
                    NLM_F_APPEND | NLM_F_CREATE
                );
            }
        }
        assert_eq!(what.len(), msgs.len() - 2);
        assert!(what
            .iter()
            .any(|w| w.starts_with("rule `meta l4proto tcp redirect to :15001`")));
    }
}
