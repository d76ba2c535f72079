//! Moving bytes between the client and the destination, both ways, until both sides closed or
//! one reset.
//!
//! Nothing is allocated for an idle connection: a direction waits for readiness first, then
//! borrows a pipe (splice mode, zero-copy through the kernel) or a buffer (copy mode) from a
//! small pool, moves what is there, and gives it back when the socket would block. A pipe
//! that still holds bytes (the writer is slow) stays with its connection until it is drained.
//! 9,000 idle connections therefore cost no pipe descriptors and no buffers.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Mutex;

use nix::fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags};
use nix::sys::socket::{recv, shutdown, MsgFlags, Shutdown};
use tokio::io::Interest;
use tokio::net::TcpStream;

use super::stats::{ConnInfo, End, Stats};

/// At most this many idle pipes or buffers are kept for reuse.
const POOL_MAX: usize = 64;
/// A direction moves at most this many chunks before it waits for readiness again, so one
/// busy connection cannot starve the others on the same thread.
const ROUNDS: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RelayMode {
    /// Bulk streams through splice(2) and a pooled pipe (the bytes never enter user space);
    /// small messages through a pooled buffer.
    #[default]
    Splice,
    /// Everything through a pooled user-space buffer.
    Copy,
}

struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
}

/// Which socket failed, to decide whom the failure is blamed on.
enum PumpError {
    Read(io::Error),
    Write(io::Error),
}

pub struct Relay {
    mode: RelayMode,
    /// User-space buffer size.
    buf_size: usize,
    /// Pipe size (0 = the kernel default, 64 KiB).
    pipe_size: usize,
    pipes: Mutex<Vec<Pipe>>,
    bufs: Mutex<Vec<Box<[u8]>>>,
}

impl Relay {
    pub fn new(mode: RelayMode, buf_size: usize, pipe_size: usize) -> Relay {
        Relay {
            mode,
            buf_size,
            pipe_size,
            pipes: Mutex::new(Vec::new()),
            bufs: Mutex::new(Vec::new()),
        }
    }

    /// Relays until both directions saw end of stream (half-close is passed on as it comes)
    /// or one side failed. On failure both sockets are set to reset on close, so a reset on one
    /// side reaches the other as a reset.
    pub async fn run(
        &self,
        stats: &Stats,
        client: &TcpStream,
        upstream: &TcpStream,
        conn: &ConnInfo,
    ) -> (End, Option<io::Error>) {
        let eof = [AtomicBool::new(false), AtomicBool::new(false)];
        let up = self.pump(
            stats,
            client,
            upstream,
            |n| conn.add_tx(n),
            [&eof[0], &eof[1]],
        );
        let down = self.pump(
            stats,
            upstream,
            client,
            |n| conn.add_rx(n),
            [&eof[1], &eof[0]],
        );
        tokio::pin!(up, down);
        // A read error on a side means that side reset; a write error means the peer we wrote
        // to is gone. `up` reads the client, `down` reads the upstream.
        let blame = |r: Result<(), PumpError>, reading_client: bool| match r {
            Ok(()) => (End::Closed, None),
            Err(PumpError::Read(e)) if reading_client => (End::ClientReset, Some(e)),
            Err(PumpError::Read(e)) => (End::UpstreamReset, Some(e)),
            Err(PumpError::Write(e)) if reading_client => (End::UpstreamReset, Some(e)),
            Err(PumpError::Write(e)) => (End::ClientReset, Some(e)),
        };
        let (first, rest_is_up) = tokio::select! {
            r = &mut up => (blame(r, true), false),
            r = &mut down => (blame(r, false), true),
        };
        let (end, err) = match first {
            (End::Closed, _) if rest_is_up => blame(up.await, true),
            (End::Closed, _) => blame(down.await, false),
            failed => failed,
        };
        if end != End::Closed {
            reset(client);
            reset(upstream);
        }
        (end, err)
    }

    async fn pump(
        &self,
        stats: &Stats,
        src: &TcpStream,
        dst: &TcpStream,
        count: impl Fn(u64),
        [my_eof, other_eof]: [&AtomicBool; 2],
    ) -> Result<(), PumpError> {
        // Small messages go through a buffer (read + write, no wasted EAGAIN read); once a read
        // fills the buffer the stream is bulk and, in splice mode, moves through a pipe.
        let mut bulk = false;
        loop {
            let ready = src
                .ready(Interest::READABLE | Interest::ERROR)
                .await
                .map_err(PumpError::Read)?;
            // The FIN is already in (and no error): a read that drains the socket is the last
            // one, which saves the recv that would only return 0.
            let fin = ready.is_read_closed() && !ready.is_error();
            let (eof, still_bulk) = match (bulk, self.mode) {
                (true, RelayMode::Splice) => match self.take_pipe(stats) {
                    Ok(pipe) => self.splice_round(src, dst, pipe, &count).await?,
                    // No descriptors left for a pipe (EMFILE): copy this round instead.
                    Err(_) => self.copy_round(stats, src, dst, fin, &count).await?,
                },
                _ => self.copy_round(stats, src, dst, fin, &count).await?,
            };
            bulk = still_bulk;
            if eof {
                // End of stream from src: pass the half-close on, unless the other way ends
                // too, in which case the close that follows sends the FIN. One deferred yield
                // (after the runtime has polled for I/O) lets a FIN that arrived with this one
                // be seen first: a request-response connection then closes without shutdown.
                my_eof.store(true, Relaxed);
                if !other_eof.load(Relaxed) {
                    tokio::task::yield_now().await;
                }
                if !other_eof.load(Relaxed) {
                    let _ = shutdown(dst.as_raw_fd(), Shutdown::Write);
                }
                return Ok(());
            }
        }
    }

    /// Moves what src has through a pipe: (end of stream, still bulk).
    async fn splice_round(
        &self,
        src: &TcpStream,
        dst: &TcpStream,
        pipe: Pipe,
        count: &impl Fn(u64),
    ) -> Result<(bool, bool), PumpError> {
        let chunk = if self.pipe_size == 0 {
            1 << 16
        } else {
            self.pipe_size
        };
        let flags = SpliceFFlags::SPLICE_F_NONBLOCK | SpliceFFlags::SPLICE_F_MOVE;
        let mut moved = 0;
        for _ in 0..ROUNDS {
            // The pipe is empty here, so EAGAIN can only mean "src has nothing now". A short
            // splice does not prove the socket drained (the pipe may run out of slots first),
            // so a round always ends on EAGAIN.
            let n = match src.try_io(Interest::READABLE, || {
                splice(src.as_fd(), None, &pipe.w, None, chunk, flags).map_err(io::Error::from)
            }) {
                Ok(0) => {
                    self.put_pipe(pipe);
                    return Ok((true, false));
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(PumpError::Read(e)),
            };
            let mut left = n;
            while left > 0 {
                match dst.try_io(Interest::WRITABLE, || {
                    splice(&pipe.r, None, dst.as_fd(), None, left, flags).map_err(io::Error::from)
                }) {
                    Ok(m) => left -= m,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        dst.writable().await.map_err(PumpError::Write)?
                    }
                    // The pipe still holds bytes: it is dropped, not pooled.
                    Err(e) => return Err(PumpError::Write(e)),
                }
            }
            count(n as u64);
            moved += n;
        }
        self.put_pipe(pipe);
        Ok((false, moved >= self.buf_size))
    }

    /// Moves what src has through a pooled buffer: (end of stream, a read filled the buffer).
    async fn copy_round(
        &self,
        stats: &Stats,
        src: &TcpStream,
        dst: &TcpStream,
        fin: bool,
        count: &impl Fn(u64),
    ) -> Result<(bool, bool), PumpError> {
        let mut buf = self.take_buf(stats);
        let mut full = false;
        for _ in 0..ROUNDS {
            let (n, drained) = match read_once(src, &mut buf) {
                Ok((0, _)) => {
                    self.put_buf(buf);
                    return Ok((true, false));
                }
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(PumpError::Read(e)),
            };
            full |= n == buf.len();
            let mut off = 0;
            while off < n {
                match dst.try_write(&buf[off..n]) {
                    Ok(m) => off += m,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        dst.writable().await.map_err(PumpError::Write)?
                    }
                    Err(e) => return Err(PumpError::Write(e)),
                }
            }
            count(n as u64);
            if drained && fin {
                self.put_buf(buf);
                return Ok((true, false));
            }
            // Drained: wait for more. Full in splice mode: the rest goes through a pipe.
            if drained || (full && self.mode == RelayMode::Splice) {
                break;
            }
        }
        self.put_buf(buf);
        Ok((false, full))
    }

    fn take_pipe(&self, stats: &Stats) -> io::Result<Pipe> {
        if let Some(p) = lock(&self.pipes).pop() {
            return Ok(p);
        }
        let (r, w) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        if self.pipe_size > 0 {
            // Best effort: the kernel may cap it (/proc/sys/fs/pipe-max-size).
            let _ = fcntl(&w, FcntlArg::F_SETPIPE_SZ(self.pipe_size as i32));
        }
        stats.relay_buffers_created.inc();
        Ok(Pipe { r, w })
    }

    fn put_pipe(&self, p: Pipe) {
        let mut pool = lock(&self.pipes);
        if pool.len() < POOL_MAX {
            pool.push(p);
        }
    }

    fn take_buf(&self, stats: &Stats) -> Box<[u8]> {
        if let Some(b) = lock(&self.bufs).pop() {
            return b;
        }
        stats.relay_buffers_created.inc();
        vec![0u8; self.buf_size].into_boxed_slice()
    }

    fn put_buf(&self, b: Box<[u8]>) {
        let mut pool = lock(&self.bufs);
        if pool.len() < POOL_MAX {
            pool.push(b);
        }
    }
}

/// One recv(2). A short read means the socket is drained for now, so its readiness is cleared
/// (the same rule tokio's own `AsyncRead` applies), which saves the EAGAIN read that would
/// otherwise end every round: (bytes, drained).
fn read_once(src: &TcpStream, buf: &mut [u8]) -> io::Result<(usize, bool)> {
    let mut short = None;
    let r = src.try_io(Interest::READABLE, || {
        let n = recv(src.as_raw_fd(), buf, MsgFlags::empty()).map_err(io::Error::from)?;
        if n > 0 && n < buf.len() {
            short = Some(n);
            // Makes tokio clear the readiness; a wakeup that arrived meanwhile is kept.
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match (r, short) {
        (Err(_), Some(n)) => Ok((n, true)),
        (Ok(n), _) => Ok((n, false)),
        (Err(e), None) => Err(e),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Makes the coming close send RST instead of FIN.
pub fn reset(s: &TcpStream) {
    let _ = s.set_zero_linger();
}
