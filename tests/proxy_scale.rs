//! 9,000 idle proxied connections at once (two descriptors each in the proxy; a process here
//! may hold 20,000). In its own test binary so its descriptors do not crowd other tests.

mod common;
mod proxy_support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Topology, REMOTE_V4};
use proxy_support::{Proxy, APP};

const CONNS: usize = 9_000;

/// Accepts every connection, echoes what arrives, exits when stdin closes (or after 180 s).
const HOLDER: &str = r#"
import os, selectors, socket, sys, time
ls = socket.socket()
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(("0.0.0.0", int(sys.argv[1])))
ls.listen(4096)
ls.setblocking(False)
sel = selectors.DefaultSelector()
sel.register(ls, selectors.EVENT_READ, "listen")
sel.register(0, selectors.EVENT_READ, "stdin")
print("ready", flush=True)
deadline = time.time() + 180
while time.time() < deadline:
    for key, _ in sel.select(1):
        if key.data == "listen":
            while True:
                try:
                    c, _ = ls.accept()
                except BlockingIOError:
                    break
                c.setblocking(False)
                sel.register(c, selectors.EVENT_READ, "conn")
        elif key.data == "stdin":
            if not os.read(0, 64):
                sys.exit(0)
        else:
            try:
                d = key.fileobj.recv(256)
            except OSError:
                d = b""
            if d:
                key.fileobj.send(d)
            else:
                sel.unregister(key.fileobj)
                key.fileobj.close()
"#;

fn fd_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Raises this process's soft descriptor limit to the hard one (the holder and the proxy
/// inherit it); the reason to skip when even the hard one cannot hold the test.
fn descriptors_for(conns: usize) -> Option<String> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let need = 2 * conns as u64 + 256;
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
    if hard < need {
        return Some(format!(
            "the descriptor limit is {soft}:{hard}; {conns} proxied connections need {need}"
        ));
    }
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).ok()?;
    }
    None
}

#[test]
fn nine_thousand_idle_connections_stay_up_and_cost_little() {
    require_netns!();
    if let Some(why) = descriptors_for(CONNS) {
        eprintln!("SKIPPED: {why}");
        return;
    }
    let t = Topology::new();
    let proxy = Proxy::start(&t, &["--max-connections", "9500"]);
    let mut holder = Command::new("ip")
        .args([
            "netns",
            "exec",
            &t.remote.name,
            "/usr/bin/python3",
            "-c",
            HOLDER,
            "7000",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 holder");
    let mut ready = [0u8; 6];
    holder
        .stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut ready)
        .unwrap();
    assert_eq!(&ready, b"ready\n");

    let idle_rss = proxy.rss_kib();
    let started = Instant::now();
    let addr: SocketAddr = format!("{REMOTE_V4}:7000").parse().unwrap();
    let conns: Vec<TcpStream> = t
        .pod
        .handle
        .run(move || {
            nix::unistd::setfsgid(nix::unistd::Gid::from_raw(APP));
            nix::unistd::setfsuid(nix::unistd::Uid::from_raw(APP));
            (0..CONNS)
                .map(|i| {
                    TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                        .unwrap_or_else(|e| panic!("connection {i}: {e}"))
                })
                .collect()
        })
        .unwrap();
    let connected = started.elapsed();

    // Every one is relayed: the proxy holds an upstream connection for each.
    let cluster =
        proxy.wait_cluster_within("outbound|10.200.0.1:7000", Duration::from_secs(30), |c| {
            c["cx_active"].as_u64() == Some(CONNS as u64)
        });
    assert_eq!(cluster["cx_connect_fail"], 0);
    assert_eq!(proxy.stat("outbound.downstream_cx_active"), CONNS as u64);
    let rss = proxy.rss_kib();
    let fds = fd_count(proxy.pid());
    // Two sockets per connection and nothing else: idle connections hold no pipes.
    assert!(fds <= 2 * CONNS + 32, "proxy holds {fds} descriptors");

    // They stay usable: a sample echoes through the proxy.
    for c in conns.iter().step_by(90) {
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        (&*c).write_all(b"ping").unwrap();
        let mut buf = [0u8; 4];
        (&*c).read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
    }
    let per_conn = (rss.saturating_sub(idle_rss)) * 1024 / CONNS as u64;
    println!(
        "proxy RSS: idle {idle_rss} KiB; with {CONNS} idle connections {rss} KiB \
         ({per_conn} bytes per connection); {fds} descriptors; connected in {connected:?}"
    );
    eprintln!(
        "proxy RSS: idle {idle_rss} KiB; with {CONNS} idle connections {rss} KiB \
         ({per_conn} bytes per connection); {fds} descriptors; connected in {connected:?}"
    );

    drop(conns);
    let deadline = Instant::now() + Duration::from_secs(30);
    while proxy.stat("outbound.downstream_cx_active") > 0 {
        assert!(Instant::now() < deadline, "connections did not close");
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(holder.stdin.take());
    let _ = holder.wait();
}
