//! Helpers for the proxy tests: a running `shunt proxy` in a pod namespace, an admin client,
//! and a byte pattern that makes "arrived byte-exact" cheap to check at any offset.
#![allow(dead_code)]

use std::fs::File;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::common::{self, Ns, Topology};

/// The app's uid/gid: captured by the rules.
pub const APP: u32 = 1000;

/// A `shunt proxy` running as uid 1337 inside the pod namespace, killed on drop.
pub struct Proxy {
    pub child: Child,
    pub log: PathBuf,
    ns: String,
    handle: shunt::netns::Netns,
}

impl Proxy {
    /// Installs the capture rules in the pod and starts the proxy; waits for `/ready`.
    pub fn start(t: &Topology, extra: &[&str]) -> Proxy {
        Proxy::start_on(t, "auto", extra)
    }

    /// Like [`Proxy::start`], with the rules installed by one engine (`--backend`).
    pub fn start_on(t: &Topology, engine: &str, extra: &[&str]) -> Proxy {
        let out = t.pod.shunt(&["apply", "--backend", engine]);
        assert!(
            out.status.success(),
            "shunt apply: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Proxy::start_in(&t.pod, extra)
    }

    pub fn start_in(pod: &Ns, extra: &[&str]) -> Proxy {
        Proxy::start_wrapped(pod, &[], extra)
    }

    /// Starts the proxy under a wrapper command (e.g. `prlimit --nofile=64:64`).
    pub fn start_wrapped(pod: &Ns, wrapper: &[&str], extra: &[&str]) -> Proxy {
        let log = std::env::temp_dir().join(format!("{}.proxy.log", pod.name));
        let file = File::create(&log).unwrap();
        let mut cmd = Command::new("ip");
        let child = crate::common::scrub_env(&mut cmd)
            .args(["netns", "exec", &pod.name])
            .args(wrapper)
            .args([common::SHUNT, "proxy", "--user", "1337"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("spawn shunt proxy");
        let mut p = Proxy {
            child,
            log,
            ns: pod.name.clone(),
            handle: pod.handle.clone(),
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(Some(status)) = p.child.try_wait() {
                panic!("shunt proxy exited early ({status}):\n{}", p.log_text());
            }
            if let Some((200, _)) = p.try_get("/ready") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "proxy not ready after 15s:\n{}",
                p.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        p
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// GET on the admin port: (status, body), or None when it does not answer.
    pub fn try_get(&self, path: &str) -> Option<(u16, String)> {
        self.request("GET", path)
    }

    pub fn request(&self, method: &str, path: &str) -> Option<(u16, String)> {
        let req = format!("{method} {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n");
        let raw = self
            .handle
            .run(move || -> std::io::Result<Vec<u8>> {
                let mut s = TcpStream::connect_timeout(
                    &"127.0.0.1:15000".parse().unwrap(),
                    Duration::from_secs(2),
                )?;
                s.set_read_timeout(Some(Duration::from_secs(5)))?;
                s.write_all(req.as_bytes())?;
                let mut buf = vec![];
                s.read_to_end(&mut buf)?;
                Ok(buf)
            })
            .ok()?
            .ok()?;
        let text = String::from_utf8_lossy(&raw).into_owned();
        let status = text.split_whitespace().nth(1)?.parse().ok()?;
        let body = text.split_once("\r\n\r\n").map(|x| x.1.to_string())?;
        Some((status, body))
    }

    /// GET that must answer 200.
    pub fn get(&self, path: &str) -> String {
        match self.try_get(path) {
            Some((200, body)) => body,
            other => panic!("GET {path}: {other:?}"),
        }
    }

    pub fn json(&self, path: &str) -> serde_json::Value {
        serde_json::from_str(&self.get(path)).unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    /// A cluster from `/clusters?format=json` by name (`outbound|10.200.0.1:80`).
    pub fn cluster(&self, name: &str) -> Option<serde_json::Value> {
        let all = self.json("/clusters?format=json");
        all["clusters"]
            .as_array()?
            .iter()
            .find(|c| c["name"] == name)
            .cloned()
    }

    /// Waits (bounded, 3 s) until the cluster exists and `ok` holds; returns it.
    pub fn wait_cluster(
        &self,
        name: &str,
        ok: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        self.wait_cluster_within(name, Duration::from_secs(3), ok)
    }

    pub fn wait_cluster_within(
        &self,
        name: &str,
        within: Duration,
        ok: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + within;
        loop {
            let c = self.cluster(name);
            match c {
                Some(c) if ok(&c) => return c,
                _ if Instant::now() > deadline => panic!("cluster {name}: {c:?}"),
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// A counter from `/stats` (`outbound.downstream_cx_loop`).
    pub fn stat(&self, name: &str) -> u64 {
        let body = self.get("/stats");
        body.lines()
            .find_map(|l| {
                l.strip_prefix(name)?
                    .strip_prefix(": ")?
                    .trim()
                    .parse()
                    .ok()
            })
            .unwrap_or_else(|| panic!("no stat {name} in:\n{body}"))
    }

    /// Waits (bounded) for a stat to reach `want`.
    pub fn wait_stat(&self, name: &str, want: u64, within: Duration) -> u64 {
        let deadline = Instant::now() + within;
        loop {
            let v = self.stat(name);
            if v >= want || Instant::now() > deadline {
                return v;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// User + system CPU time of the proxy, in clock ticks.
    pub fn cpu_ticks(&self) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap();
        let after = stat.rsplit_once(')').unwrap().1;
        let f: Vec<&str> = after.split_whitespace().collect();
        // Fields 14 and 15 (utime, stime) are 12 and 13 after the closing parenthesis.
        f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
    }

    /// VmRSS in KiB.
    pub fn rss_kib(&self) -> u64 {
        self.status_kib("VmRSS:")
    }

    /// VmHWM, the peak resident set size so far, in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        self.status_kib("VmHWM:")
    }

    fn status_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("no {field} in /proc/{}/status", self.pid()))
    }

    pub fn terminate(&self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill -TERM {}", self.pid());
    }

    /// Waits (bounded) for the process to exit.
    pub fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !std::thread::panicking() {
            let _ = std::fs::remove_file(&self.log);
        } else {
            eprintln!("proxy log ({}):\n{}", self.ns, self.log_text());
            let _ = std::fs::remove_file(&self.log);
        }
    }
}

/// A socket waiting for peers in the proxy's namespace: a TCP listener, or a UDP socket bound
/// and not connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listening {
    pub tcp: bool,
    pub addr: std::net::SocketAddr,
}

/// Every listening socket in the namespace of process `pid`, from `/proc/PID/net/{tcp,udp}{,6}`
/// (the files show the sockets of that process's network namespace, whoever owns them).
pub fn listening_sockets(pid: i32) -> Vec<Listening> {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
    // The kernel prints each 32-bit word of the address as a native-endian hex number.
    fn word(hex: &str) -> [u8; 4] {
        u32::from_str_radix(hex, 16).unwrap().to_ne_bytes()
    }
    let mut found = vec![];
    // TCP_LISTEN is 0A; an unconnected UDP socket shows TCP_CLOSE, 07.
    for (file, tcp, state) in [
        ("tcp", true, "0A"),
        ("tcp6", true, "0A"),
        ("udp", false, "07"),
        ("udp6", false, "07"),
    ] {
        let path = format!("/proc/{pid}/net/{file}");
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 4 || f[3] != state {
                continue;
            }
            let (ip, port) = f[1].split_once(':').unwrap();
            let port = u16::from_str_radix(port, 16).unwrap();
            let ip = match ip.len() {
                8 => IpAddr::V4(Ipv4Addr::from(word(ip))),
                32 => {
                    let mut b = [0u8; 16];
                    for i in 0..4 {
                        b[i * 4..i * 4 + 4].copy_from_slice(&word(&ip[i * 8..i * 8 + 8]));
                    }
                    IpAddr::V6(Ipv6Addr::from(b))
                }
                _ => panic!("{path}: unexpected address {ip}"),
            };
            found.push(Listening {
                tcp,
                addr: SocketAddr::new(ip, port),
            });
        }
    }
    found
}

/// A deterministic byte stream: `fill(offset, buf)` writes the bytes at `offset..`. The period
/// (a prime) lines up with no buffer or pipe size, and the block number is mixed in, so a lost,
/// repeated or reordered chunk shows as a mismatch.
pub struct Pattern {
    block: Vec<u8>,
}

const PERIOD: usize = 1_000_003;

impl Pattern {
    pub fn new(seed: u64) -> Pattern {
        let mut x = seed | 1;
        let block = (0..PERIOD)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        Pattern { block }
    }

    pub fn fill(&self, mut offset: u64, buf: &mut [u8]) {
        let mut done = 0;
        while done < buf.len() {
            let i = (offset % PERIOD as u64) as usize;
            let salt = (offset / PERIOD as u64) as u8;
            let n = (PERIOD - i).min(buf.len() - done);
            for (d, s) in buf[done..done + n].iter_mut().zip(&self.block[i..i + n]) {
                *d = s ^ salt;
            }
            done += n;
            offset += n as u64;
        }
    }

    /// Writes `len` bytes of the pattern.
    pub fn send(&self, w: &mut impl Write, len: u64) -> std::io::Result<()> {
        let mut buf = vec![0u8; 256 << 10];
        let mut off = 0;
        while off < len {
            let n = (len - off).min(buf.len() as u64) as usize;
            self.fill(off, &mut buf[..n]);
            w.write_all(&buf[..n])?;
            off += n as u64;
        }
        Ok(())
    }

    /// Reads to end of stream; Ok(total) when every byte matched, Err naming the first mismatch.
    pub fn verify(&self, r: &mut impl Read) -> Result<u64, String> {
        let mut buf = vec![0u8; 256 << 10];
        let mut want = vec![0u8; 256 << 10];
        let mut off = 0u64;
        loop {
            let n = match r.read(&mut buf) {
                Ok(0) => return Ok(off),
                Ok(n) => n,
                Err(e) => return Err(format!("read error at offset {off}: {e}")),
            };
            self.fill(off, &mut want[..n]);
            if buf[..n] != want[..n] {
                let i = buf[..n]
                    .iter()
                    .zip(&want[..n])
                    .position(|(a, b)| a != b)
                    .unwrap_or(0);
                return Err(format!("mismatch at offset {}", off + i as u64));
            }
            off += n as u64;
        }
    }
}

/// Echoes every connection on `l` (a thread each) until `lifetime` ends; bounded in time.
pub fn echo_server(l: std::net::TcpListener, lifetime: Duration) -> std::thread::JoinHandle<usize> {
    std::thread::spawn(move || {
        let deadline = Instant::now() + lifetime;
        let mut n = 0;
        while Instant::now() < deadline {
            let Some((mut s, _)) = crate::common::accept_within(&l, Duration::from_millis(100))
            else {
                continue;
            };
            n += 1;
            std::thread::spawn(move || {
                let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
                let mut buf = [0u8; 4096];
                while let Ok(k) = s.read(&mut buf) {
                    if k == 0 || s.write_all(&buf[..k]).is_err() {
                        break;
                    }
                }
            });
        }
        n
    })
}

/// Sends `msg` and expects it echoed back (within the socket's read timeout, 10 s if unset).
pub fn echo(s: &TcpStream, msg: &[u8]) -> std::io::Result<()> {
    if s.read_timeout()?.is_none() {
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
    }
    (&*s).write_all(msg)?;
    let mut back = vec![0u8; msg.len()];
    (&*s).read_exact(&mut back)?;
    assert_eq!(back, msg);
    Ok(())
}

/// Makes the socket send RST on close.
pub fn set_reset_on_close(s: &TcpStream) {
    let l = nix::libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    nix::sys::socket::setsockopt(s, nix::sys::socket::sockopt::Linger, &l).unwrap();
}

/// A real HTTP server (Python's http.server) in `ns`, serving `dir`, killed on drop.
pub struct HttpServer {
    child: Child,
    pub dir: PathBuf,
}

impl HttpServer {
    pub fn start(ns: &Ns, port: u16, body: &str) -> HttpServer {
        let dir = std::env::temp_dir().join(format!("{}-www", ns.name));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("index.html"), body).unwrap();
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns.name,
                "/usr/bin/python3",
                "-m",
                "http.server",
            ])
            .args([&port.to_string(), "--bind", "::", "--directory"])
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 http.server");
        let s = HttpServer { child, dir };
        // Ready when it accepts (bounded).
        let deadline = Instant::now() + Duration::from_secs(10);
        let addr = format!("127.0.0.1:{port}");
        while ns.connect_as(0, 0, &addr).is_err() {
            assert!(Instant::now() < deadline, "http.server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        s
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
