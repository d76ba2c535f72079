//! Test topology (SPEC §8): network namespaces made and removed by the test itself, a "pod"
//! and a "remote" joined by a veth pair, with addresses from 10.200.0.0/16 and fd00:5::/64.
//! Nothing here touches the host namespace's rules.
#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use shunt::netns::Netns;

pub const POD_V4: &str = "10.200.0.2";
pub const REMOTE_V4: &str = "10.200.0.1";
/// A second address on the remote, in another /24, for CIDR include/exclude tests.
pub const REMOTE2_V4: &str = "10.200.1.1";
pub const POD_V6: &str = "fd00:5::2";
pub const REMOTE_V6: &str = "fd00:5::1";
pub const REMOTE2_V6: &str = "fd00:5:1::1";

pub const SHUNT: &str = env!("CARGO_BIN_EXE_shunt");

/// A reason to skip, or `None` when the machine can run namespace tests (root, ip, iptables).
pub fn skip_reason() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("not root: namespace tests need CAP_NET_ADMIN and CAP_SYS_ADMIN".into());
    }
    for tool in ["ip", "iptables-nft-restore", "iptables-legacy-restore"] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).exists()))
            .unwrap_or(false);
        if !found {
            return Some(format!(
                "{tool} is not installed (apt-get install iproute2 iptables)"
            ));
        }
    }
    None
}

/// Skips the calling test (with the reason printed) when namespaces cannot be used here.
#[macro_export]
macro_rules! require_netns {
    () => {
        if let Some(why) = common::skip_reason() {
            eprintln!("SKIPPED: {why}");
            return;
        }
    };
}

/// `shunt` with none of the caller's `RUST_LOG` or `SHUNT_*` settings, which would change
/// what the tests expect (options, log lines).
pub fn shunt_command() -> Command {
    let mut cmd = Command::new(SHUNT);
    scrub_env(&mut cmd);
    cmd
}

/// Removes `RUST_LOG` and every `SHUNT_*` variable from what `cmd` will inherit.
pub fn scrub_env(cmd: &mut Command) -> &mut Command {
    cmd.env_remove("RUST_LOG");
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("SHUNT_") {
            cmd.env_remove(k);
        }
    }
    cmd
}

/// Runs `cmd` with `input` on its stdin; stdout and stderr are captured.
pub fn output_with_stdin(cmd: &mut Command, input: &[u8]) -> Output {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    // A child that exits without reading everything closes the pipe: its output says why.
    let _ = child.stdin.take().unwrap().write_all(input);
    child.wait_with_output().unwrap()
}

pub fn sh(args: &[&str]) -> Output {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    out
}

/// Runs a command and panics with its stderr when it fails.
pub fn must(args: &[&str]) -> String {
    let out = sh(args);
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A network namespace that exists for the life of this value.
pub struct Ns {
    pub name: String,
    pub handle: Netns,
}

impl Ns {
    pub fn new(role: &str) -> Ns {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("shunt-{role}-{}-{n}", std::process::id());
        must(&["ip", "netns", "add", &name]);
        must(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        let handle = Netns::open(&PathBuf::from(format!("/run/netns/{name}"))).unwrap();
        Ns { name, handle }
    }

    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// Runs a command inside the namespace.
    pub fn exec(&self, args: &[&str]) -> Output {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(args);
        sh(&full)
    }

    pub fn must(&self, args: &[&str]) -> String {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(args);
        must(&full)
    }

    /// A TCP listener created inside this namespace (a socket stays in the namespace it was
    /// made in, whichever thread uses it later).
    pub fn listen(&self, addr: &str) -> TcpListener {
        let addr: SocketAddr = addr.parse().unwrap();
        let l = self.handle.run(move || TcpListener::bind(addr)).unwrap();
        l.unwrap_or_else(|e| panic!("bind {addr} in {}: {e}", self.name))
    }

    /// Connects from inside this namespace with the given fsuid/fsgid (what the owner match
    /// sees), as an app or the proxy would.
    pub fn connect_as(&self, uid: u32, gid: u32, addr: &str) -> std::io::Result<TcpStream> {
        self.connect_from(uid, gid, None, addr)
    }

    /// Like [`Ns::connect_as`], binding the source address first when `src` is given.
    pub fn connect_from(
        &self,
        uid: u32,
        gid: u32,
        src: Option<&str>,
        addr: &str,
    ) -> std::io::Result<TcpStream> {
        use nix::sys::socket::{self as s, AddressFamily, SockFlag, SockType, SockaddrStorage};
        let addr: SocketAddr = addr.parse().unwrap();
        let src: Option<SocketAddr> = src.map(|a| SocketAddr::new(a.parse().unwrap(), 0));
        self.handle
            .run(move || {
                // setfsuid/setfsgid change only this thread's credentials.
                nix::unistd::setfsgid(nix::unistd::Gid::from_raw(gid));
                nix::unistd::setfsuid(nix::unistd::Uid::from_raw(uid));
                let family = if addr.is_ipv4() {
                    AddressFamily::Inet
                } else {
                    AddressFamily::Inet6
                };
                let fd = s::socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
                // Linux bounds a blocking connect by the send timeout.
                let tv = nix::sys::time::TimeVal::new(3, 0);
                s::setsockopt(&fd, s::sockopt::SendTimeout, &tv)?;
                if let Some(src) = src {
                    s::bind(fd.as_raw_fd(), &SockaddrStorage::from(src))?;
                }
                s::connect(fd.as_raw_fd(), &SockaddrStorage::from(addr))?;
                Ok(TcpStream::from(fd))
            })
            .unwrap()
    }

    /// Runs `shunt` with the given arguments inside nothing: `--netns` picks the namespace.
    pub fn shunt(&self, args: &[&str]) -> Output {
        let mut cmd = shunt_command();
        cmd.args(args).args(["--netns", &self.path()]);
        cmd.output().unwrap()
    }

    pub fn iptables_save(&self, backend: &str, v6: bool) -> String {
        let tool = format!("ip{}tables-{backend}-save", if v6 { "6" } else { "" });
        let text = self.must(&[&tool]);
        // Drop the timestamped comment lines and counters so two saves compare equal.
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| {
                if l.starts_with(':') {
                    l.split(" [").next().unwrap_or(l).to_string()
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = sh(&["ip", "netns", "del", &self.name]);
    }
}

/// A pod and a remote joined by a veth pair; both families routed both ways.
pub struct Topology {
    pub pod: Ns,
    pub remote: Ns,
}

impl Topology {
    pub fn new() -> Topology {
        let pod = Ns::new("pod");
        let remote = Ns::new("remote");
        // Made straight inside the namespaces: nothing appears in the host's, even briefly, and
        // no name can collide with another run's.
        must(&[
            "ip",
            "link",
            "add",
            "eth0",
            "netns",
            &pod.name,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &remote.name,
        ]);
        for ns in [&pod, &remote] {
            must(&["ip", "-n", &ns.name, "link", "set", "eth0", "up"]);
            // New namespaces inherit IPv4 forwarding from the host (on with Docker or
            // Kubernetes): off, the remote drops what it cannot deliver, wherever this runs.
            ns.must(&["sysctl", "-qw", "net.ipv4.ip_forward=0"]);
        }
        // `nodad`: IPv6 addresses usable at once, not after duplicate address detection.
        for (ns, addr) in [
            (&pod, format!("{POD_V4}/24")),
            (&pod, format!("{POD_V6}/64")),
            (&remote, format!("{REMOTE_V4}/24")),
            (&remote, format!("{REMOTE2_V4}/24")),
            (&remote, format!("{REMOTE_V6}/64")),
            (&remote, format!("{REMOTE2_V6}/64")),
        ] {
            let mut cmd = vec!["ip", "-n", &ns.name, "addr", "add", &addr, "dev", "eth0"];
            if addr.contains(':') {
                cmd.push("nodad");
            }
            must(&cmd);
        }
        let p = &pod.name;
        must(&["ip", "-n", p, "route", "add", "default", "via", REMOTE_V4]);
        must(&[
            "ip", "-n", p, "-6", "route", "add", "default", "via", REMOTE_V6,
        ]);
        Topology { pod, remote }
    }
}

/// `host:port` with brackets for IPv6.
pub fn hp(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Accepts one connection within a bounded time, or `None`.
pub fn accept_within(l: &TcpListener, timeout: Duration) -> Option<(TcpStream, SocketAddr)> {
    l.set_nonblocking(true).unwrap();
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match l.accept() {
            Ok((s, a)) => {
                s.set_nonblocking(false).unwrap();
                return Some((s, a));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if std::time::Instant::now() > deadline {
                    return None;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

/// The original destination of an accepted, redirected connection.
/// The original destination of an accepted, redirected connection, IPv4 as IPv4 even on a
/// dual-stack listener.
pub fn original_dst(s: &TcpStream) -> SocketAddr {
    shunt::socket::unmap(shunt::socket::original_dst(s, s.local_addr().unwrap()).unwrap())
}

pub fn fd_of(s: &TcpStream) -> i32 {
    s.as_raw_fd()
}

/// The stdout of a command that must have succeeded (else its output is the panic).
pub fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "shunt failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Both families' saves of one backend, without counters or timestamps.
pub fn saves(ns: &Ns, backend: &str) -> (String, String) {
    (
        ns.iptables_save(backend, false),
        ns.iptables_save(backend, true),
    )
}

/// Rules another tool owns, in several tables and both families, through the `iptables`
/// crate (run inside the namespace: its commands inherit the thread's namespace).
pub fn add_foreign_rules(ns: &Ns, backend: &'static str) {
    ns.handle
        .run(move || {
            for v6 in [false, true] {
                let cmd: &'static str = match (backend, v6) {
                    ("nft", false) => "iptables-nft",
                    ("nft", true) => "ip6tables-nft",
                    (_, false) => "iptables-legacy",
                    (_, true) => "ip6tables-legacy",
                };
                let ipt = iptables::IPTables {
                    cmd,
                    has_check: true,
                    has_wait: true,
                    is_numeric: false,
                };
                ipt.append("filter", "INPUT", "-p tcp --dport 22 -j ACCEPT")
                    .unwrap();
                ipt.new_chain("nat", "FOREIGN_OUT").unwrap();
                ipt.append("nat", "FOREIGN_OUT", "-p tcp --dport 5000 -j RETURN")
                    .unwrap();
                ipt.append("nat", "OUTPUT", "-j FOREIGN_OUT").unwrap();
                ipt.append("mangle", "PREROUTING", "-p udp -j MARK --set-mark 7")
                    .unwrap();
                ipt.append("raw", "OUTPUT", "-p udp --dport 53 -j CT --zone 3")
                    .unwrap();
                assert!(ipt.exists("nat", "OUTPUT", "-j FOREIGN_OUT").unwrap());
            }
        })
        .unwrap();
}

/// A temporary directory for stub tools, removed on drop.
pub mod tempdir {
    use std::os::unix::fs::PermissionsExt;
    use std::path::PathBuf;

    pub struct Dir(pub PathBuf);

    impl Dir {
        pub fn new(tag: &str) -> Dir {
            let p = std::env::temp_dir().join(format!("shunt-{tag}-{}", std::process::id()));
            std::fs::create_dir_all(&p).unwrap();
            Dir(p)
        }
        pub fn write_exec(&self, name: &str, text: &str) {
            let f = self.0.join(name);
            std::fs::write(&f, text).unwrap();
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        /// `shunt ARGS --netns NS` with this directory's stubs first on PATH.
        pub fn shunt(&self, ns: &super::Ns, args: &[&str]) -> std::process::Output {
            super::shunt_command()
                .args(args)
                .args(["--netns", &ns.path()])
                .env("PATH", self.path_with_system())
                .output()
                .unwrap()
        }

        pub fn path_with_system(&self) -> String {
            format!(
                "{}:{}",
                self.0.display(),
                std::env::var("PATH").unwrap_or_default()
            )
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
