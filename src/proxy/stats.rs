//! The proxy's counters: global per direction, per original destination ("clusters"), and the
//! registry of open connections. Everything is atomics behind `Arc`s; the admin server reads
//! them, the relay adds to them. Byte counts are named from the client's side of the proxy:
//! `tx` flows towards the original destination, `rx` comes back from it.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime};

/// Distinct destinations tracked one by one; the rest share one overflow entry so a scan of
/// many addresses cannot grow memory without bound.
pub const MAX_CLUSTERS: usize = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Outbound,
    Inbound,
    /// DNS over TCP, captured to `--dns-port` and forwarded to the DNS upstream.
    Dns,
}

impl Direction {
    pub const ALL: [Direction; 3] = [Direction::Outbound, Direction::Inbound, Direction::Dns];

    pub fn name(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
            Direction::Dns => "dns",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// How a connection ended: the `end` field of the access log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum End {
    /// Both sides closed cleanly (FIN each way).
    Closed,
    /// The client reset (or its socket failed); the upstream was reset in turn.
    ClientReset,
    /// The destination reset (or its socket failed); the client was reset in turn.
    UpstreamReset,
    /// The destination refused or could not be reached; the client was reset.
    ConnectFailed,
    /// No answer from the destination within `--connect-timeout`; the client was reset.
    ConnectTimeout,
    /// The original destination is one of the proxy's own listeners: refused.
    Loop,
    /// The connection was not redirected by netfilter (no original destination): refused.
    NotRedirected,
    /// `--max-connections` reached: refused.
    Overflow,
    /// Accepted while the proxy was draining: refused.
    Draining,
    /// Still open when the drain timeout ran out: both sides reset.
    DrainTimeout,
}

impl End {
    pub fn name(self) -> &'static str {
        match self {
            End::Closed => "closed",
            End::ClientReset => "client_reset",
            End::UpstreamReset => "upstream_reset",
            End::ConnectFailed => "connect_failed",
            End::ConnectTimeout => "connect_timeout",
            End::Loop => "loop",
            End::NotRedirected => "not_redirected",
            End::Overflow => "overflow",
            End::Draining => "draining",
            End::DrainTimeout => "drain_timeout",
        }
    }
}

/// A monotonically increasing counter.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// A value that goes up and down (open connections).
#[derive(Debug, Default)]
pub struct Gauge(AtomicU64);

impl Gauge {
    pub fn inc(&self) {
        self.0.fetch_add(1, Relaxed);
    }
    pub fn dec(&self) {
        self.0.fetch_sub(1, Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
    pub fn set(&self, v: u64) {
        self.0.store(v, Relaxed);
    }
}

/// Counters of one listener direction.
#[derive(Debug, Default)]
pub struct DirStats {
    /// Connections accepted (including the refused ones below).
    pub cx_total: Counter,
    /// Connections being relayed or connecting now.
    pub cx_active: Gauge,
    /// Refused: the original destination is one of the proxy's listeners.
    pub cx_loop: Counter,
    /// Refused: not redirected by netfilter.
    pub cx_not_redirected: Counter,
    /// Refused: `--max-connections` reached.
    pub cx_overflow: Counter,
    /// Refused while draining (accepted before the listener closed).
    pub cx_draining: Counter,
    pub connect_fail: Counter,
    pub connect_timeout: Counter,
    pub client_reset: Counter,
    pub upstream_reset: Counter,
    pub tx_bytes: Counter,
    pub rx_bytes: Counter,
}

/// The UDP DNS forwarder.
#[derive(Debug, Default)]
pub struct DnsStats {
    pub udp_queries: Counter,
    pub udp_answers: Counter,
    /// No answer from any upstream in time, or an upstream error.
    pub udp_failures: Counter,
    /// Dropped: too many queries in flight.
    pub udp_overflow: Counter,
}

/// One original destination, per direction (Envoy calls these clusters).
#[derive(Debug)]
pub struct Cluster {
    pub direction: Direction,
    /// `None` for the shared overflow entry.
    pub dst: Option<SocketAddr>,
    pub cx_active: Gauge,
    pub cx_total: Counter,
    pub cx_connect_fail: Counter,
    pub tx_bytes: Counter,
    pub rx_bytes: Counter,
}

impl Cluster {
    fn new(direction: Direction, dst: Option<SocketAddr>) -> Cluster {
        Cluster {
            direction,
            dst,
            cx_active: Gauge::default(),
            cx_total: Counter::default(),
            cx_connect_fail: Counter::default(),
            tx_bytes: Counter::default(),
            rx_bytes: Counter::default(),
        }
    }

    /// `outbound|10.0.0.1:80`, `inbound|[fd00::2]:8080`, `outbound|overflow`.
    pub fn name(&self) -> String {
        match self.dst {
            Some(dst) => format!("{}|{dst}", self.direction.name()),
            None => format!("{}|overflow", self.direction.name()),
        }
    }
}

/// One open connection, as `/connections` shows it.
#[derive(Debug)]
pub struct ConnInfo {
    pub id: u64,
    pub direction: Direction,
    pub client: SocketAddr,
    pub dst: SocketAddr,
    pub started: Instant,
    pub started_at: SystemTime,
    pub tx_bytes: Counter,
    pub rx_bytes: Counter,
    /// Set once the upstream connection is up.
    pub established: AtomicBool,
    cluster: Arc<Cluster>,
    dir: Arc<Stats>,
}

impl ConnInfo {
    pub fn add_tx(&self, n: u64) {
        self.tx_bytes.add(n);
        self.cluster.tx_bytes.add(n);
        self.dir.dir(self.direction).tx_bytes.add(n);
    }
    pub fn add_rx(&self, n: u64) {
        self.rx_bytes.add(n);
        self.cluster.rx_bytes.add(n);
        self.dir.dir(self.direction).rx_bytes.add(n);
    }
    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }
    /// The upstream connection is up: counts it active in its cluster until the guard drops.
    pub fn set_established(&self) {
        if !self.established.swap(true, Relaxed) {
            self.cluster.cx_active.inc();
        }
    }
}

/// A cluster's key: `None` is the shared overflow entry.
type ClusterKey = (Direction, Option<SocketAddr>);

/// Everything the admin server reports.
#[derive(Debug)]
pub struct Stats {
    pub started: Instant,
    pub draining: AtomicBool,
    dirs: [DirStats; 3],
    /// accept(2) failures (EMFILE and the like), each followed by a back-off.
    pub accept_errors: Counter,
    /// Relay buffers or pipes created (the pool reuses them).
    pub relay_buffers_created: Counter,
    pub dns: DnsStats,
    /// Admin connections open now.
    pub admin_cx_active: Gauge,
    /// Admin connections closed to make room for a newer one.
    pub admin_cx_evicted: Counter,
    /// The same for the health and metrics ports.
    pub public_cx_active: Gauge,
    pub public_cx_evicted: Counter,
    clusters: Mutex<HashMap<ClusterKey, Arc<Cluster>>>,
    conns: Mutex<BTreeMap<u64, Arc<ConnInfo>>>,
    next_id: AtomicU64,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            started: Instant::now(),
            draining: AtomicBool::new(false),
            dirs: Default::default(),
            accept_errors: Counter::default(),
            relay_buffers_created: Counter::default(),
            dns: DnsStats::default(),
            admin_cx_active: Gauge::default(),
            admin_cx_evicted: Counter::default(),
            public_cx_active: Gauge::default(),
            public_cx_evicted: Counter::default(),
            clusters: Mutex::new(HashMap::new()),
            conns: Mutex::new(BTreeMap::new()),
            next_id: AtomicU64::new(1),
        }
    }
}

/// A poisoned lock only means another task panicked mid-update of plain counters: keep going.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Stats {
    pub fn dir(&self, d: Direction) -> &DirStats {
        &self.dirs[d.index()]
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Relaxed)
    }

    /// Open connections, both directions.
    pub fn active(&self) -> u64 {
        Direction::ALL
            .iter()
            .map(|d| self.dir(*d).cx_active.get())
            .sum()
    }

    fn cluster(&self, direction: Direction, dst: SocketAddr) -> Arc<Cluster> {
        let mut map = lock(&self.clusters);
        if let Some(c) = map.get(&(direction, Some(dst))) {
            return c.clone();
        }
        let key = if map.len() < MAX_CLUSTERS {
            (direction, Some(dst))
        } else {
            (direction, None)
        };
        map.entry(key)
            .or_insert_with(|| Arc::new(Cluster::new(key.0, key.1)))
            .clone()
    }

    /// The clusters, sorted by name.
    pub fn clusters(&self) -> Vec<Arc<Cluster>> {
        let mut v: Vec<_> = lock(&self.clusters).values().cloned().collect();
        v.sort_by_key(|c| (c.direction, c.dst.is_none(), c.dst));
        v
    }

    /// The open connections, oldest first.
    pub fn connections(&self) -> Vec<Arc<ConnInfo>> {
        lock(&self.conns).values().cloned().collect()
    }

    /// Registers a connection to `dst`; it is counted active until the guard drops.
    pub fn open(
        self: &Arc<Self>,
        direction: Direction,
        client: SocketAddr,
        dst: SocketAddr,
    ) -> ConnGuard {
        let cluster = self.cluster(direction, dst);
        cluster.cx_total.inc();
        let info = Arc::new(ConnInfo {
            id: self.next_id.fetch_add(1, Relaxed),
            direction,
            client,
            dst,
            started: Instant::now(),
            started_at: SystemTime::now(),
            tx_bytes: Counter::default(),
            rx_bytes: Counter::default(),
            established: AtomicBool::new(false),
            cluster,
            dir: self.clone(),
        });
        lock(&self.conns).insert(info.id, info.clone());
        ConnGuard { info }
    }
}

/// Keeps a connection in the registry and its cluster's active count for as long as it lives.
#[derive(Debug)]
pub struct ConnGuard {
    pub info: Arc<ConnInfo>,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        if self.info.established.load(Relaxed) {
            self.info.cluster.cx_active.dec();
        }
        lock(&self.info.dir.conns).remove(&self.info.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guard_counts_and_unregisters() {
        let stats = Arc::new(Stats::default());
        let dst: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let g = stats.open(Direction::Outbound, "10.0.0.2:5000".parse().unwrap(), dst);
        g.info.set_established();
        g.info.add_tx(10);
        g.info.add_rx(7);
        assert_eq!(stats.connections().len(), 1);
        let c = &stats.clusters()[0];
        assert_eq!((c.cx_active.get(), c.cx_total.get()), (1, 1));
        assert_eq!((c.tx_bytes.get(), c.rx_bytes.get()), (10, 7));
        assert_eq!(stats.dir(Direction::Outbound).tx_bytes.get(), 10);
        drop(g);
        assert!(stats.connections().is_empty());
        assert_eq!(stats.clusters()[0].cx_active.get(), 0);
        assert_eq!(stats.clusters()[0].name(), "outbound|10.0.0.1:80");
    }

    #[test]
    fn clusters_are_bounded() {
        let stats = Arc::new(Stats::default());
        for i in 0..(MAX_CLUSTERS as u32 + 5) {
            let dst = SocketAddr::from((std::net::Ipv4Addr::from(0x0a00_0000 + i), 80));
            drop(stats.open(Direction::Outbound, dst, dst));
        }
        let all = stats.clusters();
        assert_eq!(all.len(), MAX_CLUSTERS + 1);
        let overflow = all.iter().find(|c| c.dst.is_none()).unwrap();
        assert_eq!(overflow.cx_total.get(), 5);
    }
}
