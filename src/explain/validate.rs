//! `shunt validate`: prove in the namespace that a new outbound connection from an app (a
//! non-proxy uid) really reaches the capture port with the right original destination, as a
//! validation initContainer runs it before the proxy starts. Bounded in time.

use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::{parse_socket_addr, print, usage, CaptureArgs, ExplainError};
use crate::config::{CaptureConfig, IdRange, Set};
use crate::exit;
use crate::netns::{self, Netns};
use crate::socket::unmap;

/// The address validate dials by default: TEST-NET-2 (RFC 5737), never a real destination.
pub const DEFAULT_TARGET_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 254);
pub const DEFAULT_TARGET_PORT: u16 = 15999;

/// Flags of `shunt validate`.
#[derive(Debug, Clone, clap::Args)]
#[command(
    after_help = "It binds the capture port (--proxy-port, 15001) itself when nothing \
listens there, connects as a non-proxy uid to an address that the rules capture (default \
198.51.100.254:15999, a TEST-NET-2 address, or one from --outbound-cidrs), and checks that the \
connection arrives on the capture port with that original destination. When the proxy \
already listens there, it checks that the proxy's listener accepted the connection.\n\n\
Examples:\n  shunt validate                       # in the pod, as a validation initContainer\n  \
shunt validate --netns /run/netns/pod --timeout 2s\n  shunt validate --target 10.96.0.1:443 \
--proxy-port 16001 --json\n\nExit codes: 0 capture works, 4 it does not (the message says what \
was seen), 1 validate could not run, 2 bad usage."
)]
pub struct ValidateArgs {
    /// Address to dial (must be captured by the rules)
    #[arg(long, value_name = "ADDR:PORT")]
    pub target: Option<String>,
    /// Give up after this long (e.g. 5s, 500ms; more than 0)
    #[arg(long, default_value = "5s", value_name = "DURATION", value_parser = crate::duration::positive)]
    pub timeout: Duration,
    /// Uid to connect as [default: the first uid from 1000 that is not a proxy uid]
    #[arg(long, value_name = "UID")]
    pub uid: Option<u32>,
    /// Gid to connect as [default: the first gid from 1000 that is not a proxy gid]
    #[arg(long, value_name = "GID")]
    pub gid: Option<u32>,
    /// Print the result as JSON
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub capture: CaptureArgs,
}

#[derive(Debug, Clone, Serialize)]
pub struct Validation {
    pub ok: bool,
    pub target: String,
    pub uid: u32,
    pub gid: u32,
    pub port: u16,
    /// `bound` (validate listened itself) or `proxy` (something already listened).
    pub listener: &'static str,
    /// What was seen, in words.
    pub message: String,
    pub elapsed_ms: u64,
}

fn in_ranges(ranges: &[IdRange], id: u32) -> bool {
    ranges.iter().any(|r| r.first <= id && id <= r.last)
}

pub fn first_free(ranges: &[IdRange]) -> u32 {
    (1000..u32::MAX)
        .find(|id| !in_ranges(ranges, *id))
        .unwrap_or(1000)
}

fn port_in(set: &Set<crate::config::PortRange>, port: u16) -> bool {
    match set {
        Set::All => true,
        Set::List(l) => l.iter().any(|r| r.contains(port)),
    }
}

fn net_in(set: &Set<ipnet::IpNet>, ip: IpAddr) -> bool {
    match set {
        Set::All => true,
        Set::List(l) => l.iter().any(|n| n.contains(&ip)),
    }
}

/// An address the plan for `cfg` captures: the documented default when every destination
/// is captured, else one from --outbound-cidrs (or any address on an --outbound-ports port).
pub fn default_target(cfg: &CaptureConfig) -> Result<SocketAddr, ExplainError> {
    let ports = [DEFAULT_TARGET_PORT, 15998, 8080, 80, 443];
    let free_port = ports
        .iter()
        .copied()
        .find(|p| !port_in(&cfg.exclude_outbound_ports, *p));
    let default = IpAddr::V4(DEFAULT_TARGET_IP);
    let candidate_ips: Vec<IpAddr> = match &cfg.outbound_cidrs {
        Set::All => vec![default],
        Set::List(nets) => nets
            .iter()
            .flat_map(|n| {
                let mut v: Vec<IpAddr> = n.hosts().take(1).collect();
                v.push(n.addr());
                v
            })
            .collect(),
    };
    let ip = candidate_ips
        .into_iter()
        .find(|ip| !net_in(&cfg.exclude_outbound_cidrs, *ip));
    if let (Some(ip), Some(port)) = (ip, free_port) {
        return Ok(SocketAddr::new(ip, port));
    }
    // No CIDR is captured: a port that always is.
    if let Set::List(l) = &cfg.outbound_ports {
        if let Some(r) = l.first() {
            return Ok(SocketAddr::new(default, r.first));
        }
    }
    Err(usage(
        "--target",
        "",
        "the capture options capture no outbound destination; pass --target ADDR:PORT",
    ))
}

/// The connection's local and remote addresses in `/proc/net/tcp*` of the current thread's
/// namespace, in state ESTABLISHED (or SYN_RECV), with local port `port`.
fn accepted_by_other(port: u16, client: SocketAddr) -> bool {
    for f in ["tcp", "tcp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/thread-self/net/{f}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 4 || !(f[3] == "01" || f[3] == "03") {
                continue;
            }
            let lport = f[1]
                .rsplit_once(':')
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            let rport = f[2]
                .rsplit_once(':')
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            if lport == Some(port) && rport == Some(client.port()) {
                return true;
            }
        }
    }
    false
}

fn bind_capture_port(port: u16) -> std::io::Result<TcpListener> {
    // Dual-stack first (IPv4 clients arrive as ::ffff:a.b.c.d); IPv4 only when IPv6 is off.
    match TcpListener::bind(("::", port)) {
        Err(e) if e.kind() != ErrorKind::AddrInUse => TcpListener::bind(("0.0.0.0", port)),
        other => other,
    }
}

fn connect_as(
    uid: u32,
    gid: u32,
    target: SocketAddr,
    timeout: Duration,
) -> std::io::Result<TcpStream> {
    use nix::sys::socket::{self as s, AddressFamily, SockFlag, SockType, SockaddrStorage};
    // setfsuid/setfsgid change this thread's credentials only; the owner match reads them
    // from the socket, which takes them when it is created.
    nix::unistd::setfsgid(nix::unistd::Gid::from_raw(gid));
    nix::unistd::setfsuid(nix::unistd::Uid::from_raw(uid));
    let now_uid = nix::unistd::setfsuid(nix::unistd::Uid::from_raw(uid));
    if now_uid.as_raw() != uid {
        return Err(std::io::Error::new(
            ErrorKind::PermissionDenied,
            format!("cannot act as uid {uid} (setfsuid needs CAP_SETUID; run validate as root)"),
        ));
    }
    let family = if target.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = s::socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    // Linux bounds a blocking connect by the send timeout.
    let tv = nix::sys::time::TimeVal::new(timeout.as_secs() as i64, timeout.subsec_micros() as _);
    s::setsockopt(&fd, s::sockopt::SendTimeout, &tv)?;
    match s::connect(fd.as_raw_fd(), &SockaddrStorage::from(target)) {
        Ok(()) => Ok(TcpStream::from(fd)),
        Err(nix::errno::Errno::EINPROGRESS) | Err(nix::errno::Errno::EAGAIN) => Err(
            std::io::Error::new(ErrorKind::TimedOut, "no answer (timed out)"),
        ),
        Err(e) => Err(e.into()),
    }
}

/// Runs the validation in the namespace (on a thread inside it).
pub fn validate(
    ns: Option<&Netns>,
    port: u16,
    target: SocketAddr,
    uid: u32,
    gid: u32,
    timeout: Duration,
) -> Result<Validation, crate::Error> {
    let start = Instant::now();
    let run = move || -> Validation {
        let deadline = start + timeout;
        let mut v = Validation {
            ok: false,
            target: target.to_string(),
            uid,
            gid,
            port,
            listener: "bound",
            message: String::new(),
            elapsed_ms: 0,
        };
        let listener = match bind_capture_port(port) {
            Ok(l) => Some(l),
            Err(e) if e.kind() == ErrorKind::AddrInUse => {
                v.listener = "proxy";
                None
            }
            Err(e) => {
                v.message = format!("cannot listen on the capture port {port}: {e}");
                return v;
            }
        };
        let left = deadline.saturating_duration_since(Instant::now());
        let client = match connect_as(uid, gid, target, left.max(Duration::from_millis(1))) {
            Ok(c) => c,
            Err(e) => {
                v.message = match e.kind() {
                    ErrorKind::TimedOut => format!(
                        "the connection to {target} got no answer within {timeout:?}: it was not \
                         redirected to :{port} (no capture rule matched, so it went out to the \
                         network)"
                    ),
                    ErrorKind::ConnectionRefused => format!(
                        "the connection to {target} was refused: nothing accepted it on :{port} \
                         (not captured, or captured to another port)"
                    ),
                    _ if matches!(
                        e.raw_os_error(),
                        Some(nix::libc::ENETUNREACH | nix::libc::EHOSTUNREACH)
                    ) =>
                    {
                        format!(
                            "no route to {target} ({e}): it was not redirected to :{port}. The \
                             kernel routes a connection before netfilter sees it: give the \
                             namespace a route for it (a default route) or pick --target. If \
                             it has one, a router on the way answered that it has none"
                        )
                    }
                    _ => format!("connecting to {target} as uid {uid} failed: {e}"),
                };
                return v;
            }
        };
        let local = client.local_addr().map(unmap).ok();
        let Some(listener) = listener else {
            // The proxy owns the port: the kernel's socket table says whether the connection
            // ended up on it.
            if local.is_some_and(|l| accepted_by_other(port, l)) {
                v.ok = true;
                v.message = format!(
                    "the connection to {target} reached the listener already on :{port} (the \
                     proxy's, presumably); its original destination was not checked because \
                     validate does not own that socket"
                );
            } else {
                v.message = format!(
                    "the connection to {target} was accepted, but not on :{port}: it was not \
                     captured"
                );
            }
            return v;
        };
        let _ = listener.set_nonblocking(true);
        loop {
            match listener.accept() {
                Ok((s, peer)) => {
                    if Some(unmap(peer)) != local {
                        continue; // someone else's connection
                    }
                    let orig = s
                        .local_addr()
                        .and_then(|l| crate::socket::original_dst(&s, l))
                        .map(unmap);
                    match orig {
                        Ok(o) if o == target => {
                            v.ok = true;
                            v.message = format!(
                                "the connection to {target} as uid {uid} reached :{port} with \
                                 original destination {o}"
                            );
                        }
                        Ok(o) => {
                            v.message = format!(
                                "the connection reached :{port}, but its original destination \
                                 is {o}, not {target}"
                            )
                        }
                        Err(e) => {
                            v.message = format!(
                                "the connection reached :{port}, but its original destination \
                                 cannot be read: {e}"
                            )
                        }
                    }
                    return v;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        v.message = format!(
                            "the connection to {target} was established, but never arrived on \
                             :{port} within {timeout:?}: it was not captured (something else \
                             accepted it)"
                        );
                        return v;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => {
                    v.message = format!("accepting on :{port} failed: {e}");
                    return v;
                }
            }
        }
    };
    // Always a fresh thread: setfsuid must not change the caller's credentials.
    let ns = ns.cloned();
    let mut v = std::thread::spawn(move || netns::run_in(ns.as_ref(), run))
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))?;
    v.elapsed_ms = start.elapsed().as_millis() as u64;
    Ok(v)
}

/// Runs `shunt validate`; returns the process exit code (`exit::VALIDATION_FAILED` when
/// capture does not work).
pub fn run_validate(args: ValidateArgs) -> Result<i32, crate::Error> {
    let cfg = args.capture.resolve()?;
    let timeout = args.timeout;
    let target = match &args.target {
        Some(t) => parse_socket_addr("--target", t)?,
        None => default_target(&cfg)?,
    };
    let uid = args.uid.unwrap_or_else(|| first_free(&cfg.proxy_uid));
    let gid = args.gid.unwrap_or_else(|| first_free(&cfg.proxy_gid));
    if in_ranges(&cfg.proxy_uid, uid) {
        return Err(usage(
            "--uid",
            &uid.to_string(),
            "is a proxy uid, whose traffic is never captured",
        )
        .into());
    }
    if in_ranges(&cfg.proxy_gid, gid) {
        return Err(usage(
            "--gid",
            &gid.to_string(),
            "is a proxy gid, whose traffic is never captured",
        )
        .into());
    }
    let ns = cfg.netns.as_deref().map(Netns::open).transpose()?;
    let v = validate(ns.as_ref(), cfg.proxy_port, target, uid, gid, timeout)?;
    if args.json {
        print(&(serde_json::to_string_pretty(&v).unwrap_or_default() + "\n"));
    } else {
        let how = match v.listener {
            "bound" => format!("listened on :{} itself (nothing listened there)", v.port),
            _ => format!(
                "found a listener already on :{} (the proxy?) and connected through it",
                v.port
            ),
        };
        print(&format!(
            "validate: {how}; dialled {} as uid {} gid {}\n{}: {} ({} ms)\n",
            v.target,
            v.uid,
            v.gid,
            if v.ok { "ok" } else { "FAILED" },
            v.message,
            v.elapsed_ms
        ));
    }
    Ok(if v.ok {
        exit::OK
    } else {
        exit::VALIDATION_FAILED
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RawOptions;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        validate: ValidateArgs,
    }

    /// `--timeout` reads `duration::positive`, as `shunt proxy --connect-timeout` does.
    #[test]
    fn timeout_uses_the_shared_duration_parser() {
        use clap::Parser;
        let parse = |v: &str| {
            Cli::try_parse_from(["validate".to_string(), format!("--timeout={v}")])
                .map(|c| c.validate.timeout)
                .map_err(|e| e.to_string())
        };
        assert_eq!(parse("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse("2"), Ok(Duration::from_secs(2)));
        for bad in ["0s", "0", "x", "-1s", "86401s"] {
            let err = parse(bad).unwrap_err();
            assert!(
                err.contains("--timeout") && err.contains(&format!("'{bad}'")),
                "{err}"
            );
        }
    }

    #[test]
    fn default_targets_are_captured() {
        let cfg = CaptureConfig::default();
        assert_eq!(
            default_target(&cfg).unwrap(),
            "198.51.100.254:15999".parse().unwrap()
        );
        let cfg = RawOptions {
            outbound_cidrs: Some("10.96.0.0/12".into()),
            exclude_outbound_ports: Some("15999".into()),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(
            default_target(&cfg).unwrap(),
            "10.96.0.1:15998".parse().unwrap()
        );
        let cfg = RawOptions {
            outbound_cidrs: Some("".into()),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        assert!(default_target(&cfg).is_err());
        assert_eq!(
            first_free(&[IdRange {
                first: 1000,
                last: 1001
            }]),
            1002
        );
    }
}
