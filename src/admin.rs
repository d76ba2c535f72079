//! The proxy's admin HTTP server (Envoy-style, on loopback): a thin router over the proxy's
//! counters. Every endpoint is a read (GET or HEAD); anything else gets 405.
//!
//! The same server, with a smaller router, answers on the pod's addresses for those outside
//! the pod (Istio's pilot-agent does this for Envoy): the kubelet's probes
//! (`/healthz/ready` on the health port, 15021) and, when asked for, Prometheus scrapers
//! (`/stats/prometheus` on the metrics port). Nothing else is served there: configuration,
//! rules and connections stay on the loopback admin port.
//!
//! Connections are bounded, so that clients which connect and never ask (or ask slowly)
//! cannot grow the proxy's memory: at most `max_connections` are open, a new one past that
//! closes the oldest one that is between requests (else the oldest), and a connection that
//! sends no complete request head within `idle_timeout` is closed.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

use crate::plan::Family;
use crate::proxy::stats::{Counter, Direction, Gauge, Stats};

/// Admin connections open at once, unless `--admin-max-connections` says otherwise.
pub const DEFAULT_MAX_CONNECTIONS: usize = 64;

pub struct AdminState {
    pub stats: Arc<Stats>,
    /// The effective proxy configuration.
    pub config: serde_json::Value,
    /// The capture rules found in the namespace when the proxy started.
    pub rules: serde_json::Value,
    pub limits: Limits,
}

/// How many admin connections, and for how long.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Open at once; a new connection past this closes an older one.
    pub max_connections: usize,
    /// A connection closes when no complete request head has arrived this long after it
    /// opened or after its last answer (hyper's header read timeout).
    pub idle_timeout: Duration,
}

const HELP: &str = "shunt proxy admin (GET):
  /help                 this list
  /ready                200 LIVE while serving, 503 DRAINING after SIGTERM
  /stats                counters, one `name: value` a line (?format=json)
  /stats/prometheus     the same counters in Prometheus text format
  /clusters             per original destination: cx_active, cx_total, cx_connect_fail, rx_bytes, tx_bytes (?format=json)
  /config_dump          effective proxy configuration and the capture rules in this namespace (JSON)
  /connections          open connections (?format=json)
Directions: outbound (15001), inbound (15006), dns (DNS over TCP on the DNS port).
tx_bytes flow from the client towards the original destination, rx_bytes back.
On the pod's addresses, for the kubelet and scrapers: /healthz/ready on --health-port (15021),
/stats/prometheus on --metrics-port (off unless given); nothing else is served there.
";

/// One descriptor held back for the admin port, so that `/stats` still answers when relayed
/// connections have used up every other one: the moment an operator most wants to look.
#[derive(Default)]
struct Reserve(std::sync::Mutex<Option<std::fs::File>>);

impl Reserve {
    fn fill(&self) {
        if let Ok(mut held) = self.0.lock() {
            if held.is_none() {
                *held = std::fs::File::open("/dev/null").ok();
            }
        }
    }

    /// Frees the held descriptor for the next accept; false when there was none.
    fn release(&self) -> bool {
        self.0
            .lock()
            .map(|mut held| held.take().is_some())
            .unwrap_or(false)
    }
}

fn out_of_descriptors(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(nix::libc::EMFILE | nix::libc::ENFILE)
    )
}

/// What a listener of this server answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Surface {
    /// Every endpoint: the admin port, on loopback.
    Admin,
    /// Only health and/or metrics: a port on the pod's addresses.
    Public { health: bool, metrics: bool },
}

/// One open admin connection.
struct Slot {
    /// Between requests: nothing of a request read since the last answer went out.
    idle: AtomicBool,
    /// Told to close, to make room for a newer connection.
    close: Notify,
}

/// The open admin connections by age (accept order), each with its slot.
struct Open {
    max: usize,
    inner: Mutex<OpenInner>,
    /// Where the count and the evictions are published.
    stats: Arc<Stats>,
    surface: Surface,
}

#[derive(Default)]
struct OpenInner {
    next_id: u64,
    conns: BTreeMap<u64, Arc<Slot>>,
    /// The most open at once since memory was last handed back.
    peak: usize,
}

/// After this many admin connections at once (a flood, not an operator and a scraper), the
/// memory they held is handed back to the system once most of them have closed: glibc keeps
/// freed memory for reuse, so RSS would otherwise stay at the flood's level.
const TRIM_AFTER: usize = 16;

impl Open {
    fn new(max: usize, stats: Arc<Stats>, surface: Surface) -> Open {
        Open {
            max: max.max(1),
            inner: Mutex::new(OpenInner::default()),
            stats,
            surface,
        }
    }

    /// The gauge of open connections and the counter of evictions for this surface.
    fn counters(&self) -> (&Gauge, &Counter) {
        match self.surface {
            Surface::Admin => (&self.stats.admin_cx_active, &self.stats.admin_cx_evicted),
            Surface::Public { .. } => (&self.stats.public_cx_active, &self.stats.public_cx_evicted),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, OpenInner> {
        // Every change under the lock is a single map operation, so a panic elsewhere cannot
        // leave it half done: go on.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a new connection. At the cap, the oldest idle connection is told to close
    /// (the oldest of all when every one is mid-request), so a new client, the operator's
    /// `curl` among them, always gets in and the count stays bounded.
    fn admit(self: &Arc<Self>) -> Admitted {
        let mut inner = self.lock();
        while inner.conns.len() >= self.max {
            let victim = inner
                .conns
                .iter()
                .find(|(_, s)| s.idle.load(Relaxed))
                .or_else(|| inner.conns.iter().next())
                .map(|(id, _)| *id);
            let Some(slot) = victim.and_then(|id| inner.conns.remove(&id)) else {
                break;
            };
            // Stores a permit: the connection closes even if its task has not polled yet.
            slot.close.notify_one();
            self.counters().1.inc();
        }
        let id = inner.next_id;
        inner.next_id += 1;
        let slot = Arc::new(Slot {
            idle: AtomicBool::new(true),
            close: Notify::new(),
        });
        inner.conns.insert(id, slot.clone());
        inner.peak = inner.peak.max(inner.conns.len());
        self.counters().0.set(inner.conns.len() as u64);
        Admitted {
            open: self.clone(),
            id,
            slot,
        }
    }

    /// Gives up connection `id`'s place (an evicted one has given it up already).
    fn leave(&self, id: u64) {
        let mut inner = self.lock();
        inner.conns.remove(&id);
        let left = inner.conns.len();
        self.counters().0.set(left as u64);
        let trim = inner.peak >= TRIM_AFTER && left <= inner.peak / 4;
        if trim {
            inner.peak = left;
        }
        drop(inner);
        if trim {
            // SAFETY: malloc_trim only releases free memory of the allocator; it has no
            // preconditions.
            unsafe {
                nix::libc::malloc_trim(0);
            }
        }
    }
}

/// A connection's place among the open ones, given up when its task ends.
struct Admitted {
    open: Arc<Open>,
    id: u64,
    slot: Arc<Slot>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.open.leave(self.id);
    }
}

/// The socket, marking its slot busy when request bytes arrive and idle again once an
/// answer has been written and flushed.
struct Watched {
    sock: TcpStream,
    slot: Arc<Slot>,
    wrote: bool,
}

impl AsyncRead for Watched {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.sock).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.slot.idle.store(false, Relaxed);
        }
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.sock).poll_write(cx, buf);
        this.wrote |= matches!(r, Poll::Ready(Ok(n)) if n > 0);
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.sock).poll_write_vectored(cx, bufs);
        this.wrote |= matches!(r, Poll::Ready(Ok(n)) if n > 0);
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.sock.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.sock).poll_flush(cx);
        // hyper flushes once its whole buffer is written: the answer is out.
        if this.wrote && matches!(r, Poll::Ready(Ok(()))) {
            this.wrote = false;
            this.slot.idle.store(true, Relaxed);
        }
        r
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().sock).poll_shutdown(cx)
    }
}

/// Serves until the process exits; one task per connection. Each listener has its own cap
/// and reserve descriptor, so a flood of the pod-facing health port cannot lock the operator
/// out of the admin port.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>, surface: Surface) {
    let reserve = Arc::new(Reserve::default());
    let open = Arc::new(Open::new(
        state.limits.max_connections,
        state.stats.clone(),
        surface,
    ));
    let idle_timeout = state.limits.idle_timeout;
    loop {
        // Cheap when held; refills a reserve that an earlier refill could not reopen.
        reserve.fill();
        let mut borrowed = false;
        let mut accepted = listener.accept().await;
        if matches!(&accepted, Err(e) if out_of_descriptors(e)) && reserve.release() {
            // The pending connection is still queued and the listener still readable, so this
            // accept runs at once and takes the descriptor just freed.
            borrowed = true;
            accepted = listener.accept().await;
        }
        let sock = match accepted {
            Ok((sock, _)) => sock,
            Err(e) => {
                tracing::warn!("admin accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let admitted = open.admit();
        let state = state.clone();
        let reserve = reserve.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let state = state.clone();
                async move {
                    Ok::<_, Infallible>(match surface {
                        Surface::Admin => route(&state, &req),
                        Surface::Public { health, metrics } => {
                            route_public(&state.stats, &req, health, metrics)
                        }
                    })
                }
            });
            let io = Watched {
                sock,
                slot: admitted.slot.clone(),
                wrote: false,
            };
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(idle_timeout)
                .serve_connection(TokioIo::new(io), svc);
            tokio::select! {
                r = conn => if let Err(e) = r {
                    tracing::debug!("admin connection: {e}");
                },
                // Dropping the connection closes its socket.
                _ = admitted.slot.close.notified() => {
                    tracing::debug!("admin connection closed to make room for a newer one");
                }
            }
            drop(admitted);
            // The connection (and its socket) is gone: take its descriptor back into reserve.
            if borrowed {
                reserve.fill();
            }
        });
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn text(body: String) -> Response<Full<Bytes>> {
    reply(StatusCode::OK, "text/plain; charset=utf-8", body)
}

fn json(value: &serde_json::Value) -> Response<Full<Bytes>> {
    let body = serde_json::to_string_pretty(value).unwrap_or_default() + "\n";
    reply(StatusCode::OK, "application/json", body)
}

fn read_only() -> Response<Full<Bytes>> {
    let mut r = reply(
        StatusCode::METHOD_NOT_ALLOWED,
        "text/plain; charset=utf-8",
        "every admin endpoint is read-only: use GET\n".into(),
    );
    r.headers_mut()
        .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
    r
}

/// 200 `LIVE` while serving, 503 `DRAINING` after SIGTERM: `/ready` on the admin port,
/// `/healthz/ready` on the health port.
fn ready(stats: &Stats) -> Response<Full<Bytes>> {
    if stats.is_draining() {
        reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain; charset=utf-8",
            "DRAINING\n".into(),
        )
    } else {
        text("LIVE\n".into())
    }
}

fn metrics(stats: &Stats) -> Response<Full<Bytes>> {
    reply(
        StatusCode::OK,
        "text/plain; version=0.0.4; charset=utf-8",
        prometheus(stats),
    )
}

/// The pod-facing ports: `/healthz/ready` where `health`, `/stats/prometheus` (and
/// `/metrics`, Prometheus's default path) where `metrics`; everything else is 404, without
/// the admin port's list of endpoints.
pub fn route_public<B>(
    stats: &Stats,
    req: &Request<B>,
    health: bool,
    metrics_on: bool,
) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return read_only();
    }
    match req.uri().path() {
        "/healthz/ready" if health => ready(stats),
        "/stats/prometheus" | "/metrics" if metrics_on => metrics(stats),
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found\n".into(),
        ),
    }
}

pub fn route<B>(state: &AdminState, req: &Request<B>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return read_only();
    }
    let want_json = req
        .uri()
        .query()
        .is_some_and(|q| q.split('&').any(|kv| kv == "format=json"));
    let stats = &state.stats;
    match req.uri().path() {
        "/" | "/help" => text(HELP.into()),
        "/ready" => ready(stats),
        "/stats" if want_json => json(&stats_json(stats)),
        "/stats" => text(stats_text(stats)),
        "/stats/prometheus" => metrics(stats),
        "/clusters" if want_json => json(&clusters_json(stats)),
        "/clusters" => text(clusters_text(stats)),
        "/config_dump" => json(&serde_json::json!({
            "proxy": state.config,
            "capture_rules": state.rules,
        })),
        "/connections" if want_json => json(&connections_json(stats)),
        "/connections" => text(connections_text(stats)),
        other => reply(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            format!("no admin endpoint {other}; see /help\n"),
        ),
    }
}

/// Every global counter: (name, help, is_counter, per-direction value).
type Metric = (
    &'static str,
    &'static str,
    bool,
    fn(&Stats, Direction) -> u64,
);

const METRICS: &[Metric] = &[
    (
        "downstream_cx_total",
        "Connections accepted.",
        true,
        |s, d| s.dir(d).cx_total.get(),
    ),
    (
        "downstream_cx_active",
        "Connections open now.",
        false,
        |s, d| s.dir(d).cx_active.get(),
    ),
    (
        "downstream_cx_loop",
        "Refused: the original destination is the proxy itself.",
        true,
        |s, d| s.dir(d).cx_loop.get(),
    ),
    (
        "downstream_cx_not_redirected",
        "Refused: not redirected by netfilter.",
        true,
        |s, d| s.dir(d).cx_not_redirected.get(),
    ),
    (
        "downstream_cx_overflow",
        "Refused: --max-connections reached.",
        true,
        |s, d| s.dir(d).cx_overflow.get(),
    ),
    (
        "downstream_cx_draining",
        "Refused while draining.",
        true,
        |s, d| s.dir(d).cx_draining.get(),
    ),
    (
        "upstream_cx_connect_fail",
        "Connections to the original destination refused or unreachable.",
        true,
        |s, d| s.dir(d).connect_fail.get(),
    ),
    (
        "upstream_cx_connect_timeout",
        "Connections to the original destination timed out.",
        true,
        |s, d| s.dir(d).connect_timeout.get(),
    ),
    (
        "downstream_cx_reset",
        "Relays ended by a client reset.",
        true,
        |s, d| s.dir(d).client_reset.get(),
    ),
    (
        "upstream_cx_reset",
        "Relays ended by a destination reset.",
        true,
        |s, d| s.dir(d).upstream_reset.get(),
    ),
    (
        "tx_bytes",
        "Bytes relayed from clients to original destinations.",
        true,
        |s, d| s.dir(d).tx_bytes.get(),
    ),
    (
        "rx_bytes",
        "Bytes relayed from original destinations to clients.",
        true,
        |s, d| s.dir(d).rx_bytes.get(),
    ),
];

fn rss_bytes() -> u64 {
    // statm: size resident shared ... in pages.
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}

fn process_metrics(stats: &Stats) -> [(&'static str, &'static str, bool, u64); 13] {
    let dns = &stats.dns;
    [
        (
            "accept_errors",
            "accept(2) failures, each followed by a back-off.",
            true,
            stats.accept_errors.get(),
        ),
        (
            "relay_buffers_created",
            "Relay pipes or buffers created (pooled and reused).",
            true,
            stats.relay_buffers_created.get(),
        ),
        (
            "dns_udp_queries",
            "DNS queries received over UDP.",
            true,
            dns.udp_queries.get(),
        ),
        (
            "dns_udp_answers",
            "DNS answers relayed back over UDP.",
            true,
            dns.udp_answers.get(),
        ),
        (
            "dns_udp_failures",
            "DNS queries with no answer from any upstream.",
            true,
            dns.udp_failures.get(),
        ),
        (
            "dns_udp_overflow",
            "DNS queries dropped: too many in flight.",
            true,
            dns.udp_overflow.get(),
        ),
        (
            "admin_cx_active",
            "Admin connections open now.",
            false,
            stats.admin_cx_active.get(),
        ),
        (
            "admin_cx_evicted",
            "Admin connections closed to make room for a newer one (--admin-max-connections).",
            true,
            stats.admin_cx_evicted.get(),
        ),
        (
            "public_cx_active",
            "Connections open now to the health and metrics ports.",
            false,
            stats.public_cx_active.get(),
        ),
        (
            "public_cx_evicted",
            "Health and metrics connections closed to make room for a newer one.",
            true,
            stats.public_cx_evicted.get(),
        ),
        (
            "draining",
            "1 after SIGTERM.",
            false,
            stats.is_draining() as u64,
        ),
        (
            "uptime_seconds",
            "Seconds since start.",
            false,
            stats.started.elapsed().as_secs(),
        ),
        (
            "resident_memory_bytes",
            "Resident set size of the proxy.",
            false,
            rss_bytes(),
        ),
    ]
}

fn stats_text(stats: &Stats) -> String {
    let mut out = String::new();
    for (name, _, _, f) in METRICS {
        for d in Direction::ALL {
            let _ = writeln!(out, "{}.{name}: {}", d.name(), f(stats, d));
        }
    }
    for (name, _, _, v) in process_metrics(stats) {
        let _ = writeln!(out, "server.{name}: {v}");
    }
    for c in stats.clusters() {
        let n = c.name();
        let _ = writeln!(out, "cluster.{n}.upstream_cx_active: {}", c.cx_active.get());
        let _ = writeln!(out, "cluster.{n}.upstream_cx_total: {}", c.cx_total.get());
        let _ = writeln!(
            out,
            "cluster.{n}.upstream_cx_connect_fail: {}",
            c.cx_connect_fail.get()
        );
        let _ = writeln!(
            out,
            "cluster.{n}.upstream_cx_tx_bytes_total: {}",
            c.tx_bytes.get()
        );
        let _ = writeln!(
            out,
            "cluster.{n}.upstream_cx_rx_bytes_total: {}",
            c.rx_bytes.get()
        );
    }
    out
}

fn stats_json(stats: &Stats) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    for (name, _, _, f) in METRICS {
        for d in Direction::ALL {
            m.insert(format!("{}.{name}", d.name()), f(stats, d).into());
        }
    }
    for (name, _, _, v) in process_metrics(stats) {
        m.insert(format!("server.{name}"), v.into());
    }
    serde_json::json!({ "stats": m, "clusters": clusters_json(stats)["clusters"] })
}

fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Prometheus text exposition format 0.0.4; counters end in `_total`.
pub fn prometheus(stats: &Stats) -> String {
    let mut out = String::new();
    let family = |out: &mut String, name: &str, help: &str, counter: bool| {
        let full = if counter {
            format!("shunt_{}_total", name.trim_end_matches("_total"))
        } else {
            format!("shunt_{name}")
        };
        let kind = if counter { "counter" } else { "gauge" };
        let _ = writeln!(out, "# HELP {full} {help}\n# TYPE {full} {kind}");
        full
    };
    for (name, help, counter, f) in METRICS {
        let full = family(&mut out, name, help, *counter);
        for d in Direction::ALL {
            let _ = writeln!(out, "{full}{{direction=\"{}\"}} {}", d.name(), f(stats, d));
        }
    }
    for (name, help, counter, v) in process_metrics(stats) {
        let full = family(&mut out, name, help, counter);
        let _ = writeln!(out, "{full} {v}");
    }
    let clusters = stats.clusters();
    type ClusterMetric = (
        &'static str,
        &'static str,
        bool,
        fn(&crate::proxy::stats::Cluster) -> u64,
    );
    let per_cluster: [ClusterMetric; 5] = [
        (
            "cluster_cx_active",
            "Open connections to this original destination.",
            false,
            |c| c.cx_active.get(),
        ),
        (
            "cluster_cx",
            "Connections attempted to this original destination.",
            true,
            |c| c.cx_total.get(),
        ),
        (
            "cluster_cx_connect_fail",
            "Failed or timed-out connects to this original destination.",
            true,
            |c| c.cx_connect_fail.get(),
        ),
        (
            "cluster_tx_bytes",
            "Bytes sent to this original destination.",
            true,
            |c| c.tx_bytes.get(),
        ),
        (
            "cluster_rx_bytes",
            "Bytes received from this original destination.",
            true,
            |c| c.rx_bytes.get(),
        ),
    ];
    for (name, help, counter, f) in per_cluster {
        if clusters.is_empty() {
            break;
        }
        let full = family(&mut out, name, help, counter);
        for c in &clusters {
            let dst = c
                .dst
                .map_or_else(|| "overflow".to_string(), |d| d.to_string());
            let _ = writeln!(
                out,
                "{full}{{direction=\"{}\",dst=\"{}\"}} {}",
                c.direction.name(),
                label(&dst),
                f(c)
            );
        }
    }
    out
}

fn clusters_text(stats: &Stats) -> String {
    let mut out = String::new();
    for c in stats.clusters() {
        let n = c.name();
        let _ = writeln!(out, "{n}::cx_active::{}", c.cx_active.get());
        let _ = writeln!(out, "{n}::cx_total::{}", c.cx_total.get());
        let _ = writeln!(out, "{n}::cx_connect_fail::{}", c.cx_connect_fail.get());
        let _ = writeln!(out, "{n}::rx_bytes::{}", c.rx_bytes.get());
        let _ = writeln!(out, "{n}::tx_bytes::{}", c.tx_bytes.get());
    }
    out
}

fn clusters_json(stats: &Stats) -> serde_json::Value {
    let list: Vec<_> = stats
        .clusters()
        .iter()
        .map(|c| {
            serde_json::json!({
                "name": c.name(),
                "direction": c.direction,
                "dst": c.dst.map(|d| d.to_string()),
                "cx_active": c.cx_active.get(),
                "cx_total": c.cx_total.get(),
                "cx_connect_fail": c.cx_connect_fail.get(),
                "rx_bytes": c.rx_bytes.get(),
                "tx_bytes": c.tx_bytes.get(),
            })
        })
        .collect();
    serde_json::json!({ "clusters": list })
}

fn connections_json(stats: &Stats) -> serde_json::Value {
    let list: Vec<_> = stats
        .connections()
        .iter()
        .map(|c| {
            serde_json::json!({
                "id": c.id,
                "direction": c.direction,
                "client": c.client.to_string(),
                "dst": c.dst.to_string(),
                "established": c.established.load(std::sync::atomic::Ordering::Relaxed),
                "started_unix_ms": c.started_at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
                "age_ms": c.started.elapsed().as_millis() as u64,
                "tx_bytes": c.tx_bytes.get(),
                "rx_bytes": c.rx_bytes.get(),
            })
        })
        .collect();
    serde_json::json!({ "connections": list })
}

fn connections_text(stats: &Stats) -> String {
    let mut out = String::from("id direction client dst age_ms tx_bytes rx_bytes\n");
    for c in stats.connections() {
        let _ = writeln!(
            out,
            "{} {} {} {} {} {} {}",
            c.id,
            c.direction.name(),
            c.client,
            c.dst,
            c.started.elapsed().as_millis(),
            c.tx_bytes.get(),
            c.rx_bytes.get()
        );
    }
    out
}

/// The rules installed in the current namespace, per backend and family, for `/config_dump`.
/// Errors (no iptables, no permission) are reported in place, not fatal.
pub fn capture_rules() -> serde_json::Value {
    use crate::netfilter::{save, Backend};
    let mut found = vec![];
    let mut errors = vec![];
    for backend in [Backend::Nft, Backend::Legacy] {
        for family in [Family::V4, Family::V6] {
            if !backend.available(family) {
                continue;
            }
            match save(backend, family, None) {
                Ok(saved) if saved.has_rules() => {
                    let tables: Vec<_> = saved
                        .tables
                        .iter()
                        .filter(|t| !t.rules.is_empty())
                        .map(|t| {
                            let rules: Vec<String> = t
                                .rules
                                .iter()
                                .map(|r| format!("-A {} {}", r.chain, r.args.join(" ")))
                                .collect();
                            serde_json::json!({ "table": t.name, "rules": rules })
                        })
                        .collect();
                    found.push(serde_json::json!({
                        "backend": backend.name(),
                        "family": family,
                        "tables": tables,
                    }));
                }
                Ok(_) => {}
                Err(e) => errors.push(format!("{} {}: {e}", backend.name(), family.name())),
            }
        }
    }
    serde_json::json!({ "read_at": "proxy start", "rulesets": found, "errors": errors })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open_ids(open: &Open) -> Vec<u64> {
        open.lock().conns.keys().copied().collect()
    }

    /// Waits (bounded) for the slot's close signal.
    fn told_to_close(slot: &Slot) -> bool {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            tokio::time::timeout(Duration::from_millis(100), slot.close.notified()).await
        })
        .is_ok()
    }

    fn get(path: &str) -> Request<()> {
        Request::get(path).body(()).unwrap()
    }

    /// The pod-facing ports answer health and metrics as configured, and nothing of the
    /// admin port: no configuration, rules or connections, not even the list of endpoints.
    #[test]
    fn the_public_router_serves_only_health_and_metrics() {
        let stats = Stats::default();
        let status = |req: &Request<()>, health, metrics| {
            route_public(&stats, req, health, metrics).status().as_u16()
        };
        assert_eq!(status(&get("/healthz/ready"), true, false), 200);
        assert_eq!(status(&get("/healthz/ready"), false, true), 404);
        assert_eq!(status(&get("/stats/prometheus"), true, false), 404);
        assert_eq!(status(&get("/stats/prometheus"), false, true), 200);
        assert_eq!(status(&get("/metrics"), true, true), 200);
        for path in [
            "/",
            "/help",
            "/ready",
            "/stats",
            "/clusters",
            "/config_dump",
            "/connections",
        ] {
            assert_eq!(status(&get(path), true, true), 404, "{path}");
        }
        let post = Request::post("/healthz/ready").body(()).unwrap();
        assert_eq!(status(&post, true, true), 405);
        stats.draining.store(true, Relaxed);
        assert_eq!(status(&get("/healthz/ready"), true, true), 503);
    }

    #[test]
    fn the_cap_closes_the_oldest_idle_connection_first() {
        let stats = Arc::new(Stats::default());
        let open = Arc::new(Open::new(2, stats.clone(), Surface::Admin));
        let a = open.admit();
        let b = open.admit();
        // a is mid-request: b, younger but idle, makes room for c.
        a.slot.idle.store(false, Relaxed);
        let c = open.admit();
        assert_eq!(open_ids(&open), [a.id, c.id]);
        assert!(told_to_close(&b.slot));
        assert!(!told_to_close(&a.slot));
        // Every one mid-request: the oldest goes.
        c.slot.idle.store(false, Relaxed);
        let d = open.admit();
        assert_eq!(open_ids(&open), [c.id, d.id]);
        assert!(told_to_close(&a.slot));
        assert_eq!(stats.admin_cx_evicted.get(), 2);
        assert_eq!(stats.admin_cx_active.get(), 2);
        // The evicted ones' tasks end without touching the others' places.
        drop((a, b));
        assert_eq!(stats.admin_cx_active.get(), 2);
        drop((c, d));
        assert_eq!(stats.admin_cx_active.get(), 0);
        assert!(open_ids(&open).is_empty());
    }
}
