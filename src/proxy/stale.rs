//! Tuples the proxy must not dial from: app connections it reset, which conntrack still holds
//! NATed to the proxy's own listener.
//!
//! An app's connection `pod:P -> D` is NATed to 15001. When the proxy ends it with a reset
//! (the destination refused, or reset the relay), conntrack keeps the entry in CLOSE for
//! `nf_conntrack_tcp_timeout_close` (10 s) and, because the last reset came from the reply
//! direction, a new SYN for the same tuple *reopens* it, NAT binding included, instead of
//! starting afresh. Were the proxy's own upstream socket to pick port P towards D in that
//! window, its SYN would take the old binding and land on the proxy's own listener (the owner
//! `RETURN` in nat OUTPUT only ever sees NEW packets). Connections that ended with a FIN, or
//! with the app's own reset, are killed on reopen, so only the proxy's resets are recorded.
//!
//! The ledger is what makes the loop impossible: while a destination has recorded ports, the
//! proxy picks its source port itself, never one of them (see `forward::connect`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Tuples kept past this many are the oldest dropped first; far more than a pod's ephemeral
/// range (28,232 ports by default) times the destinations that reset at once in practice.
const CAP: usize = 1 << 16;

pub struct StaleTuples {
    /// How long conntrack may keep a reset entry reopenable.
    window: Duration,
    by_dst: Mutex<HashMap<SocketAddr, Vec<(u16, Instant)>>>,
}

impl StaleTuples {
    pub fn new(window: Duration) -> StaleTuples {
        StaleTuples {
            window,
            by_dst: Mutex::new(HashMap::new()),
        }
    }

    /// The namespace's conntrack CLOSE timeout plus a margin (the proxy runs in the pod's
    /// namespace, so /proc shows the pod's value); 10 s, the kernel default, when unreadable.
    pub fn window_from_proc() -> Duration {
        let secs =
            std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_close")
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .unwrap_or(10);
        Duration::from_secs(secs + 2)
    }

    /// The proxy reset the app connection from `client_port` to `dst`.
    pub fn record(&self, client_port: u16, dst: SocketAddr) {
        let now = Instant::now();
        let mut map = lock(&self.by_dst);
        if map.values().map(Vec::len).sum::<usize>() >= CAP {
            Self::prune(&mut map, now, self.window);
        }
        map.entry(dst).or_default().push((client_port, now));
    }

    /// The ports not to dial `dst` from now, or `None` when any port is safe (the common case,
    /// which then costs no syscall at all).
    pub fn to_avoid(&self, dst: SocketAddr) -> Option<Vec<u16>> {
        let now = Instant::now();
        let mut map = lock(&self.by_dst);
        let ports = map.get_mut(&dst)?;
        ports.retain(|(_, at)| now.duration_since(*at) < self.window);
        if ports.is_empty() {
            map.remove(&dst);
            return None;
        }
        let mut out: Vec<u16> = ports.iter().map(|(p, _)| *p).collect();
        out.sort_unstable();
        out.dedup();
        Some(out)
    }

    fn prune(map: &mut HashMap<SocketAddr, Vec<(u16, Instant)>>, now: Instant, window: Duration) {
        map.retain(|_, ports| {
            ports.retain(|(_, at)| now.duration_since(*at) < window);
            !ports.is_empty()
        });
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The pod's ephemeral port range (`ip_local_port_range`), where the app's own source ports
/// come from; the proxy picks its ports in it too, so it never takes a port an app server may
/// want to listen on outside it.
pub fn ephemeral_range() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|w| w.parse::<u16>().ok());
            Some((it.next()??, it.next()??))
        })
        .filter(|(lo, hi)| lo <= hi)
        .unwrap_or((32768, 60999))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_ports_are_avoided_until_the_window_passes() {
        let t = StaleTuples::new(Duration::from_millis(50));
        let d: SocketAddr = "10.0.0.1:9".parse().unwrap();
        let other: SocketAddr = "10.0.0.1:10".parse().unwrap();
        assert_eq!(t.to_avoid(d), None);
        t.record(40001, d);
        t.record(40003, d);
        t.record(40001, d);
        assert_eq!(t.to_avoid(d), Some(vec![40001, 40003]));
        assert_eq!(t.to_avoid(other), None, "per destination");
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(t.to_avoid(d), None);
    }
}
