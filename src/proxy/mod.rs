//! `shunt proxy`: the redirect-aware proxy (SPEC §4).
//!
//! ```text
//! listener (15001 out, 15006 in; v4 + v6) -> forward: original destination, loop check,
//!   connect (inbound from 127.0.0.6 / ::6) -> relay (splice or copy, both ways) -> access log
//! stats <- admin (127.0.0.1:15000); health (/healthz/ready on *:15021) and metrics
//!          (--metrics-port) on the pod's addresses
//! ```
//! Listeners are bound first, then the process drops to `--user`; SIGTERM closes the listeners,
//! turns `/ready` to 503 and lets open connections finish for up to `--drain-timeout`, then
//! resets both sides of each one left.

mod dns;
mod forward;
mod listener;
pub mod relay;
mod stale;
pub mod stats;

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::duration;
pub use relay::RelayMode;
use stats::{Direction, End, Stats};

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("{what} is not implemented in this build{hint}")]
    Unsupported { what: String, hint: String },
    #[error("{0}")]
    Config(String),
    #[error(
        "cannot listen for {what} on {addr}: {source}{}",
        bind_hint(source, addr)
    )]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: io::Error,
    },
    #[error("cannot switch to --user {spec}: {source} (binding needs root or CAP_SETUID/CAP_SETGID to drop)")]
    User { spec: String, source: nix::Error },
    #[error("cannot start the async runtime: {0}")]
    Runtime(io::Error),
    #[error("cannot install the {signal} handler: {source}")]
    Signal {
        signal: &'static str,
        source: io::Error,
    },
}

/// What to look at when a listener cannot be bound.
fn bind_hint(e: &io::Error, addr: &SocketAddr) -> String {
    match e.kind() {
        io::ErrorKind::AddrInUse => format!(
            " (another process listens there: `ss -ltnp 'sport = :{}'` names it; a second \
             proxy in the pod, or an app port that collides with the proxy's)",
            addr.port()
        ),
        io::ErrorKind::PermissionDenied => {
            " (ports below 1024 need root or CAP_NET_BIND_SERVICE)".to_string()
        }
        _ => String::new(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Captured by nat REDIRECT; the original destination comes from SO_ORIGINAL_DST.
    #[default]
    Redirect,
    /// Inbound by TPROXY: a transparent listener, and the app sees the real client address
    /// (needs CAP_NET_ADMIN, which is kept across --user).
    Tproxy,
}

/// `UID[:GID]`, numeric; the gid defaults to the uid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct User {
    pub uid: u32,
    pub gid: u32,
}

impl std::fmt::Display for User {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.uid, self.gid)
    }
}

pub fn parse_user(s: &str) -> Result<User, String> {
    let bad = || format!("'{s}' is not UID or UID:GID (numbers, e.g. 1337 or 1337:1337)");
    let (u, g) = s.split_once(':').unwrap_or((s, s));
    let uid = u.parse::<u32>().map_err(|_| bad())?;
    let gid = g.parse::<u32>().map_err(|_| bad())?;
    Ok(User { uid, gid })
}

fn port(s: &str) -> Result<u16, String> {
    match s.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(format!("'{s}' is not a port (1-65535)")),
    }
}

/// Flags of `shunt proxy` (SPEC §4). Each one is also an environment variable `SHUNT_PROXY_*`.
#[derive(Debug, Clone, clap::Args)]
#[command(
    after_help = "Examples:\n  shunt proxy --user 1337                      # as a sidecar: bind, then run as uid/gid 1337\n  SHUNT_PROXY_MAX_CONNECTIONS=5000 shunt proxy --drain-timeout 20s --log-format json\n  curl -s 127.0.0.1:15000/clusters             # per original destination counters\n  curl -s POD_IP:15021/healthz/ready           # the kubelet's probe: 200, or 503 while draining\n\nAdmin endpoints (GET): /help /ready /stats /stats/prometheus /clusters[?format=json] /config_dump /connections[?format=json]\nOn the pod's addresses: /healthz/ready (--health-port), /stats/prometheus (--metrics-port)"
)]
pub struct ProxyArgs {
    /// Port that captured outbound TCP is redirected to
    #[arg(long, env = "SHUNT_PROXY_OUTBOUND_PORT", default_value = "15001", value_parser = port)]
    pub outbound_port: u16,
    /// Port that captured inbound TCP is redirected to
    #[arg(long, env = "SHUNT_PROXY_INBOUND_PORT", default_value = "15006", value_parser = port)]
    pub inbound_port: u16,
    /// Address of the admin HTTP server (keep it on loopback)
    #[arg(
        long,
        env = "SHUNT_PROXY_ADMIN_ADDR",
        default_value = "127.0.0.1:15000"
    )]
    pub admin_addr: SocketAddr,
    /// Admin connections open at once; past this a new one closes the oldest idle one
    #[arg(long, env = "SHUNT_PROXY_ADMIN_MAX_CONNECTIONS", default_value_t = crate::admin::DEFAULT_MAX_CONNECTIONS)]
    pub admin_max_connections: usize,
    /// Close an admin connection that sends no complete request head for this long (ms, s
    /// or m; more than 0)
    #[arg(long, env = "SHUNT_PROXY_ADMIN_IDLE_TIMEOUT", default_value = "10s", value_parser = duration::positive)]
    pub admin_idle_timeout: Duration,
    /// Health port on the pod's addresses (0.0.0.0 and [::]) for the kubelet's probes:
    /// GET /healthz/ready, 200 while serving, 503 while draining, nothing else (Istio's
    /// 15021); 0 turns it off
    #[arg(long, env = "SHUNT_PROXY_HEALTH_PORT", default_value_t = 15021)]
    pub health_port: u16,
    /// Prometheus port on the pod's addresses for scrapers outside the pod: GET
    /// /stats/prometheus (or /metrics), nothing else (Istio uses 15020 or 15090); may be the
    /// health port; 0 (the default) turns it off
    #[arg(long, env = "SHUNT_PROXY_METRICS_PORT", default_value_t = 0)]
    pub metrics_port: u16,
    /// DNS forwarder port (UDP and TCP; what --redirect-dns captures to); 0 turns it off
    #[arg(long, env = "SHUNT_PROXY_DNS_PORT", default_value_t = 15053)]
    pub dns_port: u16,
    /// DNS servers to forward to, IP[:PORT] comma separated (default: the resolv.conf servers)
    #[arg(long, env = "SHUNT_PROXY_DNS_UPSTREAM", value_delimiter = ',', value_parser = dns::parse_upstream, value_name = "IP[:PORT],...")]
    pub dns_upstream: Vec<SocketAddr>,
    /// Interception mode the capture rules use
    #[arg(long, value_enum, env = "SHUNT_PROXY_MODE", default_value_t)]
    pub mode: Mode,
    /// tproxy mode: the mark on the proxy's connections to the app (the capture's --tproxy-mark)
    #[arg(long, env = "SHUNT_PROXY_TPROXY_MARK", default_value_t = 1337)]
    pub tproxy_mark: u32,
    /// Bind, then drop to this user: UID[:GID] (default: keep running as started)
    #[arg(long, env = "SHUNT_PROXY_USER", value_parser = parse_user, value_name = "UID[:GID]")]
    pub user: Option<User>,
    /// Give up connecting to the original destination after this long (ms, s or m; more
    /// than 0)
    #[arg(long, env = "SHUNT_PROXY_CONNECT_TIMEOUT", default_value = "5s", value_parser = duration::positive)]
    pub connect_timeout: Duration,
    /// On SIGTERM, wait this long for open connections, then reset what is left and exit (ms,
    /// s or m; 0 resets them at once)
    #[arg(long, env = "SHUNT_PROXY_DRAIN_TIMEOUT", default_value = "30s", value_parser = duration::parse)]
    pub drain_timeout: Duration,
    /// Most connections open at once (both directions); more are reset. Default: what the
    /// descriptor limit allows (two per connection)
    #[arg(long, env = "SHUNT_PROXY_MAX_CONNECTIONS")]
    pub max_connections: Option<u64>,
    /// How bytes are moved: splice (zero-copy through a pooled pipe) or copy (pooled buffer)
    #[arg(long, value_enum, env = "SHUNT_PROXY_RELAY", default_value_t)]
    pub relay: RelayMode,
    /// Size of the pooled relay buffers, in bytes
    #[arg(long, env = "SHUNT_PROXY_RELAY_BUFFER", default_value_t = 16 << 10)]
    pub relay_buffer: usize,
    /// Size of the pooled splice pipes, in bytes (0 = the kernel default, 64 KiB)
    #[arg(long, env = "SHUNT_PROXY_PIPE_SIZE", default_value_t = 0)]
    pub pipe_size: usize,
    /// Worker threads: 1 runs everything on one thread (best for a sidecar on a core or two)
    #[arg(long, env = "SHUNT_PROXY_WORKERS", default_value_t = 1)]
    pub workers: usize,
}

impl ProxyArgs {
    /// Refuses what this build cannot do, naming the value.
    pub fn validate(&self) -> Result<(), ProxyError> {
        if self.mode == Mode::Tproxy && self.workers != 1 {
            // Capabilities are per thread: only the thread that switches user keeps CAP_NET_ADMIN.
            return Err(ProxyError::Unsupported {
                what: format!("--mode tproxy with --workers {}", self.workers),
                hint: "; tproxy mode runs with --workers 1".into(),
            });
        }
        let ports = [
            ("--outbound-port", self.outbound_port),
            ("--inbound-port", self.inbound_port),
            ("--dns-port", self.dns_port),
        ];
        for (i, (a, pa)) in ports.iter().enumerate() {
            for (b, pb) in &ports[i + 1..] {
                if pa == pb && *pa != 0 {
                    return Err(ProxyError::Config(format!(
                        "{a} and {b} are both {pa}; they must differ"
                    )));
                }
            }
        }
        if self.admin_addr.port() != 0
            && [self.outbound_port, self.inbound_port, self.dns_port]
                .contains(&self.admin_addr.port())
        {
            return Err(ProxyError::Config(format!(
                "--admin-addr {} uses a proxy listener port",
                self.admin_addr
            )));
        }
        // The health and metrics ports may be one port (one listener serving both), never
        // another listener's.
        for (flag, p) in [
            ("--health-port", self.health_port),
            ("--metrics-port", self.metrics_port),
        ] {
            let taken = [
                ("--outbound-port", self.outbound_port),
                ("--inbound-port", self.inbound_port),
                ("--dns-port", self.dns_port),
                ("--admin-addr", self.admin_addr.port()),
            ];
            if let Some((other, _)) = taken.iter().find(|(_, q)| p != 0 && *q == p) {
                return Err(ProxyError::Config(format!(
                    "{flag} {p} is also {other}'s port; give another port (or 0 to turn it off)"
                )));
            }
        }
        if !(1..=64).contains(&self.workers) {
            return Err(ProxyError::Config(format!(
                "--workers {} is out of range (1-64)",
                self.workers
            )));
        }
        if !(1024..=(16 << 20)).contains(&self.relay_buffer) {
            return Err(ProxyError::Config(format!(
                "--relay-buffer {} is out of range (1024 to 16777216)",
                self.relay_buffer
            )));
        }
        if self.pipe_size != 0 && !(4096..=(16 << 20)).contains(&self.pipe_size) {
            return Err(ProxyError::Config(format!(
                "--pipe-size {} is out of range (0, or 4096 to 16777216)",
                self.pipe_size
            )));
        }
        if let Some(own) = self
            .dns_upstream
            .iter()
            .find(|u| self.dns_port != 0 && forwards_to_itself(u, self.dns_port))
        {
            return Err(ProxyError::Config(format!(
                "--dns-upstream {own} is this proxy's own DNS port: queries would loop; give the \
                 real DNS servers"
            )));
        }
        if self.admin_max_connections == 0 {
            return Err(ProxyError::Config(
                "--admin-max-connections 0 would refuse every admin request; give 1 or more \
                 (default 64)"
                    .into(),
            ));
        }
        if self.max_connections == Some(0) {
            return Err(ProxyError::Config(
                "--max-connections 0 would refuse everything".into(),
            ));
        }
        Ok(())
    }

    /// The effective configuration, as `/config_dump` shows it.
    fn dump(&self, max_connections: u64) -> serde_json::Value {
        serde_json::json!({
            "outbound_port": self.outbound_port,
            "inbound_port": self.inbound_port,
            "admin_addr": self.admin_addr.to_string(),
            "admin_max_connections": self.admin_max_connections,
            "admin_idle_timeout_ms": self.admin_idle_timeout.as_millis() as u64,
            "health_port": self.health_port,
            "metrics_port": self.metrics_port,
            "dns_port": self.dns_port,
            "dns_upstream": self.dns_upstream.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            "mode": self.mode,
            "tproxy_mark": (self.mode == Mode::Tproxy).then_some(self.tproxy_mark),
            "user": self.user.map(|u| u.to_string()),
            "connect_timeout_ms": self.connect_timeout.as_millis() as u64,
            "drain_timeout_ms": self.drain_timeout.as_millis() as u64,
            "max_connections": max_connections,
            "relay": self.relay,
            "relay_buffer": self.relay_buffer,
            "pipe_size": self.pipe_size,
            "workers": self.workers,
            "inbound_source": ["127.0.0.6", "::6"],
        })
    }
}

/// State shared by the listeners, the connections and the admin server.
pub struct Shared {
    pub stats: Arc<Stats>,
    relay: relay::Relay,
    own_ports: Vec<u16>,
    local_ips: Vec<IpAddr>,
    connect_timeout: Duration,
    max_connections: u64,
    /// Where DNS over TCP goes.
    dns_upstream: Option<SocketAddr>,
    /// tproxy mode: the mark for transparent connections to the app.
    tproxy_mark: Option<u32>,
    /// App connections this proxy reset, not to be dialled from (see `stale`).
    stale: stale::StaleTuples,
    /// The pod's ephemeral port range, for picking source ports around `stale` ones.
    ephemeral: (u16, u16),
}

/// Raises the soft descriptor limit to the hard one; returns the limit in force.
fn raise_nofile() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) => {
            if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
                hard
            } else {
                soft
            }
        }
        Err(_) => 1024,
    }
}

/// The namespace's own addresses (for the loop check).
fn local_ips() -> Vec<IpAddr> {
    let mut ips = vec![];
    if let Ok(addrs) = nix::ifaddrs::getifaddrs() {
        for a in addrs {
            let Some(addr) = a.address else { continue };
            if let Some(v4) = addr.as_sockaddr_in() {
                ips.push(IpAddr::V4(v4.ip()));
            } else if let Some(v6) = addr.as_sockaddr_in6() {
                ips.push(IpAddr::V6(v6.ip()));
            }
        }
    }
    ips.sort();
    ips.dedup();
    ips
}

/// Switches to `user`. With `keep_net_admin` (tproxy mode) the thread keeps CAP_NET_ADMIN and
/// CAP_NET_RAW, and nothing else, for IP_TRANSPARENT and SO_MARK on its connections to the app.
fn drop_privileges(user: User, keep_net_admin: bool) -> Result<(), ProxyError> {
    use nix::unistd::{setgid, setgroups, setuid, Gid, Uid};
    let err = |source| ProxyError::User {
        spec: user.to_string(),
        source,
    };
    let gid = Gid::from_raw(user.gid);
    setgroups(&[gid]).map_err(err)?;
    setgid(gid).map_err(err)?;
    if keep_net_admin {
        // SAFETY: prctl with integer arguments only.
        let r = unsafe { nix::libc::prctl(nix::libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) };
        nix::errno::Errno::result(r).map_err(err)?;
    }
    // glibc applies setuid to every thread of the process.
    setuid(Uid::from_raw(user.uid)).map_err(err)?;
    if keep_net_admin {
        caps::keep_net_admin().map_err(err)?;
    }
    Ok(())
}

/// capset(2), which neither nix nor libc wraps.
mod caps {
    const VERSION_3: u32 = 0x2008_0522;
    const CAP_NET_ADMIN: u32 = 12;
    const CAP_NET_RAW: u32 = 13;

    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }

    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }

    /// Effective = permitted = {CAP_NET_ADMIN, CAP_NET_RAW} for the calling thread.
    pub fn keep_net_admin() -> nix::Result<()> {
        let bits = (1 << CAP_NET_ADMIN) | (1 << CAP_NET_RAW);
        let header = Header {
            version: VERSION_3,
            pid: 0,
        };
        let data = [
            Data {
                effective: bits,
                permitted: bits,
                inheritable: 0,
            },
            Data::default(),
        ];
        // SAFETY: the header and two data words have the layout capset(2) expects for
        // _LINUX_CAPABILITY_VERSION_3, and both outlive the call.
        let r = unsafe { nix::libc::syscall(nix::libc::SYS_capset, &header, data.as_ptr()) };
        nix::errno::Errno::result(r).map(drop)
    }
}

pub fn run(args: ProxyArgs) -> Result<(), ProxyError> {
    args.validate()?;
    let nofile = raise_nofile();
    // Read the capture rules while still privileged (iptables-save needs CAP_NET_ADMIN).
    let rules = crate::admin::capture_rules();
    let rt = if args.workers == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.workers)
            .enable_all()
            .build()
    }
    .map_err(ProxyError::Runtime)?;
    let served = rt.block_on(serve(args, nofile, rules));
    // Dropping the runtime drops the tasks of the connections still open after the drain
    // timeout; each resets both its sockets as it goes (`forward::Armed`), so their clients
    // see a cut, not a complete transfer.
    drop(rt);
    served
}

async fn serve(args: ProxyArgs, nofile: u64, rules: serde_json::Value) -> Result<(), ProxyError> {
    let mut listeners: Vec<(Direction, TcpListener)> = vec![];
    for (dir, port) in [
        (Direction::Outbound, args.outbound_port),
        (Direction::Inbound, args.inbound_port),
    ] {
        let transparent = dir == Direction::Inbound && args.mode == Mode::Tproxy;
        let bind = |a| listener::bind_with(a, transparent);
        let v4 = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
        let l = bind(v4).map_err(|source| ProxyError::Bind {
            what: dir.name(),
            addr: v4,
            source,
        })?;
        listeners.push((dir, l));
        let v6 = SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
        match bind(v6) {
            Ok(l) => listeners.push((dir, l)),
            // A namespace without IPv6 still gets an IPv4 proxy.
            Err(e) => tracing::warn!(direction = dir.name(), "no IPv6 listener on {v6}: {e}"),
        }
    }
    // DNS: the listeners are bound with the others, before privileges are dropped.
    let mut dns_upstreams = args.dns_upstream.clone();
    if args.dns_port != 0 && dns_upstreams.is_empty() {
        let conf = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        dns_upstreams = dns::resolv_conf_servers(&conf);
        // Never forward to ourselves (a resolv.conf naming the forwarder's own port).
        dns_upstreams.retain(|u| !forwards_to_itself(u, args.dns_port));
    }
    let mut dns_udp = vec![];
    if args.dns_port != 0 && dns_upstreams.is_empty() {
        tracing::warn!(
            "DNS forwarder off: no --dns-upstream and no nameserver in /etc/resolv.conf"
        );
    } else if args.dns_port != 0 {
        let bind_err = |addr, source| ProxyError::Bind {
            what: "dns",
            addr,
            source,
        };
        // Loopback only, like the UDP sockets: where the rules' REDIRECT sends DNS.
        let [v4, v6] = dns::listen_addrs(args.dns_port);
        listeners.push((
            Direction::Dns,
            listener::bind(v4).map_err(|e| bind_err(v4, e))?,
        ));
        match listener::bind(v6) {
            Ok(l) => listeners.push((Direction::Dns, l)),
            Err(e) => tracing::warn!("no IPv6 DNS listener on {v6}: {e}"),
        }
    }
    let admin = listener::bind(args.admin_addr).map_err(|source| ProxyError::Bind {
        what: "admin",
        addr: args.admin_addr,
        source,
    })?;
    let admin_addr = admin.local_addr().unwrap_or(args.admin_addr);
    let public = bind_public(&args)?;
    if let Some(user) = args.user {
        drop_privileges(user, args.mode == Mode::Tproxy)?;
    }
    if listeners.iter().any(|(d, _)| *d == Direction::Dns) {
        // After the switch to --user: the capture rules tell the forwarder's replies by the
        // socket's owner, which is fixed when the socket is made.
        dns_udp = dns::bind_udp(args.dns_port)
            .await
            .map_err(|source| ProxyError::Bind {
                what: "dns",
                addr: dns::listen_addrs(args.dns_port)[0],
                source,
            })?;
    }
    // Each connection holds two descriptors; keep some for listeners, pipes and the admin.
    let max_connections = args
        .max_connections
        .unwrap_or_else(|| nofile.saturating_sub(256).max(64) / 2);
    let shared = Arc::new(Shared {
        stats: Arc::new(Stats::default()),
        relay: relay::Relay::new(args.relay, args.relay_buffer, args.pipe_size),
        own_ports: vec![
            args.outbound_port,
            args.inbound_port,
            admin_addr.port(),
            args.dns_port,
        ],
        local_ips: local_ips(),
        connect_timeout: args.connect_timeout,
        max_connections,
        dns_upstream: dns_upstreams.first().copied(),
        tproxy_mark: (args.mode == Mode::Tproxy).then_some(args.tproxy_mark),
        stale: stale::StaleTuples::new(stale::StaleTuples::window_from_proc()),
        ephemeral: stale::ephemeral_range(),
    });
    let upstreams: Arc<[SocketAddr]> = dns_upstreams.clone().into();
    for sock in dns_udp {
        tokio::spawn(dns::serve_udp(shared.clone(), sock, upstreams.clone()));
    }
    let admin_state = Arc::new(crate::admin::AdminState {
        stats: shared.stats.clone(),
        config: args.dump(max_connections),
        rules,
        limits: crate::admin::Limits {
            max_connections: args.admin_max_connections,
            idle_timeout: args.admin_idle_timeout,
        },
    });
    let mut public_addrs = vec![];
    for (l, surface) in public {
        if let Ok(a) = l.local_addr() {
            public_addrs.push(a.to_string());
        }
        tokio::spawn(crate::admin::serve(l, admin_state.clone(), surface));
    }
    tokio::spawn(crate::admin::serve(
        admin,
        admin_state,
        crate::admin::Surface::Admin,
    ));

    // Keeps the timer wheel's next wake-up under a second away, so arming a connect timeout
    // (5 s) never has to wake the event loop: tokio writes its eventfd whenever a new timer is
    // the earliest one, which cost a syscall and a loop turn per connection.
    let tick = args.connect_timeout.min(Duration::from_secs(2)) / 2;
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(tick.max(Duration::from_millis(10)));
        loop {
            interval.tick().await;
        }
    });
    let signals = Signals::install()?;
    // Start-up (argument parsing, the rules snapshot) leaves freed heap behind; hand it back.
    // SAFETY: malloc_trim only releases free memory of the allocator; it has no preconditions.
    unsafe {
        nix::libc::malloc_trim(0);
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut addrs = vec![];
    for (dir, l) in listeners {
        if let Ok(a) = l.local_addr() {
            addrs.push(format!("{}={a}", dir.name()));
        }
        tokio::spawn(listener::accept_loop(
            shared.clone(),
            l,
            dir,
            stop_rx.clone(),
        ));
    }
    tracing::info!(
        listeners = addrs.join(" "),
        admin = %admin_addr,
        public = public_addrs.join(" "),
        max_connections,
        relay = ?args.relay,
        dns_upstream = ?dns_upstreams,
        "proxy ready"
    );

    signals.wait().await;
    drain(&shared, &stop_tx, args.drain_timeout).await;
    Ok(())
}

/// The health and metrics listeners, on the wildcard addresses of both families (the pod's
/// addresses, where the kubelet and scrapers connect), one per distinct port.
///
/// Their ports are not among the loop check's own ports: a probe that the capture rules did
/// not exclude reaches the inbound listener, which relays it to the health port from
/// 127.0.0.6 (the proxy's own connection, never captured again), so the probe still works,
/// just one hop longer. The manifests exclude 15020 and 15021 from inbound capture, as Istio
/// does, to spare that hop.
fn bind_public(args: &ProxyArgs) -> Result<Vec<(TcpListener, crate::admin::Surface)>, ProxyError> {
    let mut ports = vec![args.health_port, args.metrics_port];
    ports.retain(|&p| p != 0);
    ports.dedup();
    let mut out = vec![];
    for port in ports {
        let surface = crate::admin::Surface::Public {
            health: port == args.health_port,
            metrics: port == args.metrics_port,
        };
        let what = if port == args.health_port {
            "health"
        } else {
            "metrics"
        };
        let v4 = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
        let l = listener::bind(v4).map_err(|source| ProxyError::Bind {
            what,
            addr: v4,
            source,
        })?;
        out.push((l, surface));
        let v6 = SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
        match listener::bind(v6) {
            Ok(l) => out.push((l, surface)),
            Err(e) => tracing::warn!("no IPv6 {what} listener on {v6}: {e}"),
        }
    }
    Ok(out)
}

/// SIGTERM and SIGINT, installed before the proxy reports ready.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Result<Signals, ProxyError> {
        use tokio::signal::unix::{signal, SignalKind};
        let term = signal(SignalKind::terminate()).map_err(|source| ProxyError::Signal {
            signal: "SIGTERM",
            source,
        })?;
        let int = signal(SignalKind::interrupt()).map_err(|source| ProxyError::Signal {
            signal: "SIGINT",
            source,
        })?;
        Ok(Signals { term, int })
    }

    async fn wait(mut self) {
        let name = tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        };
        tracing::info!("{name}: draining");
    }
}

/// `/ready` turns 503, listeners close, open connections get up to `timeout` to finish. The
/// ones left are logged here and reset when `run` drops the runtime.
async fn drain(shared: &Shared, stop: &watch::Sender<bool>, timeout: Duration) {
    shared.stats.draining.store(true, Ordering::Relaxed);
    let _ = stop.send(true);
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + timeout;
    while shared.stats.active() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let left = shared.stats.connections();
    for c in &left {
        forward::access_log(
            c.direction,
            c.client,
            Some(c.dst),
            (c.tx_bytes.get(), c.rx_bytes.get()),
            Some(c.started),
            End::DrainTimeout,
            None,
        );
    }
    tracing::info!(
        cut = left.len(),
        waited_ms = started.elapsed().as_millis() as u64,
        "drained; exiting"
    );
}

/// An upstream that is this forwarder: its port on a loopback or unspecified address.
fn forwards_to_itself(upstream: &SocketAddr, dns_port: u16) -> bool {
    upstream.port() == dns_port && (upstream.ip().is_loopback() || upstream.ip().is_unspecified())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_users_and_ports() {
        assert_eq!(
            parse_user("1337"),
            Ok(User {
                uid: 1337,
                gid: 1337
            })
        );
        assert_eq!(parse_user("1337:42"), Ok(User { uid: 1337, gid: 42 }));
        assert!(parse_user("-1").unwrap_err().contains("'-1'"));
        assert!(parse_user("root").is_err());
        assert!(port("70000").unwrap_err().contains("70000"));
        assert!(port("0").is_err());
    }

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        proxy: ProxyArgs,
    }

    fn parse(args: &[&str]) -> Result<ProxyArgs, String> {
        use clap::Parser;
        Cli::try_parse_from(std::iter::once("proxy").chain(args.iter().copied()))
            .map(|c| c.proxy)
            .map_err(|e| e.to_string())
    }

    /// Every duration flag reads `duration::parse`; which ones can be 0 is the flag's own
    /// rule: a drain timeout of 0 resets at once, a connect or idle timeout of 0 is refused.
    #[test]
    fn duration_flags_share_one_parser_and_say_whether_zero_means_something() {
        let args = parse(&["--drain-timeout", "0"]).unwrap();
        assert_eq!(args.drain_timeout, Duration::ZERO);
        let args = parse(&["--connect-timeout", "1.5s", "--admin-idle-timeout", "250ms"]).unwrap();
        assert_eq!(args.connect_timeout, Duration::from_millis(1500));
        assert_eq!(args.admin_idle_timeout, Duration::from_millis(250));
        for flag in ["--connect-timeout", "--admin-idle-timeout"] {
            let err = parse(&[flag, "0ms"]).unwrap_err();
            assert!(err.contains(flag) && err.contains("'0ms' is zero"), "{err}");
        }
        for flag in [
            "--connect-timeout",
            "--drain-timeout",
            "--admin-idle-timeout",
        ] {
            for bad in ["-1s", "5x", "NaN", "", "86401s", "99999999999999999999999m"] {
                // `=`: clap would take `-1s` after a space for a flag.
                let err = parse(&[&format!("{flag}={bad}")]).unwrap_err();
                assert!(
                    err.contains(flag) && err.contains(&format!("'{bad}'")),
                    "{err}"
                );
            }
        }
    }
}
