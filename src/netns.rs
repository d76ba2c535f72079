//! Acting inside a network namespace: a child process that enters it between fork and exec,
//! or a closure on a short-lived thread that enters it (`setns` moves only the calling
//! thread, so the rest of the process never changes namespace).

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};
use nix::sched::{setns, CloneFlags};

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error(
        "network namespace {path} cannot be opened: {source} (is the path right? \
         named namespaces live in /run/netns, a process's in /proc/PID/ns/net)"
    )]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} is not a network namespace ({what}); pass /run/netns/NAME or /proc/PID/ns/net"
    )]
    NotNetns { path: PathBuf, what: String },
    #[error(
        "cannot enter network namespace {path}: {source} (shunt needs CAP_SYS_ADMIN for setns)"
    )]
    Enter { path: PathBuf, source: nix::Error },
    #[error(
        "another shunt (an init container, a CNI ADD or DEL, a retried apply) is changing the \
         rules of network namespace {path} and did not finish within {waited:?}; try again, or \
         raise --wait (`fuser -v {path}` shows who holds it)"
    )]
    Busy { path: PathBuf, waited: Duration },
    #[error("cannot lock network namespace {path}: {source}")]
    Lock { path: PathBuf, source: nix::Error },
}

/// NS_GET_NSTYPE from <linux/nsfs.h>, `_IO(0xb7, 0x3)` (Linux 4.11).
const NS_GET_NSTYPE: u64 = 0xb703;

/// What kind of file `file` is, when it is not a network namespace.
fn not_netns(file: &File) -> Option<String> {
    // SAFETY: NS_GET_NSTYPE takes no argument; it only reports the namespace type of the
    // descriptor, or fails with ENOTTY for a file that is not a namespace.
    let kind = unsafe { nix::libc::ioctl(file.as_raw_fd(), NS_GET_NSTYPE as _) };
    if kind < 0 {
        return Some("not a namespace file at all".into());
    }
    let name = match kind {
        k if k == nix::libc::CLONE_NEWNET => return None,
        k if k == nix::libc::CLONE_NEWNS => "mnt",
        k if k == nix::libc::CLONE_NEWPID => "pid",
        k if k == nix::libc::CLONE_NEWUTS => "uts",
        k if k == nix::libc::CLONE_NEWIPC => "ipc",
        k if k == nix::libc::CLONE_NEWUSER => "user",
        k if k == nix::libc::CLONE_NEWCGROUP => "cgroup",
        _ => "another kind of",
    };
    Some(format!("it is a {name} namespace"))
}

/// An open handle on a namespace. Holding the file keeps the namespace alive while shunt
/// works in it, even if its bind mount is removed meanwhile.
#[derive(Debug, Clone)]
pub struct Netns {
    path: PathBuf,
    file: Arc<File>,
}

impl Netns {
    pub fn open(path: &Path) -> Result<Netns, NetnsError> {
        // O_NONBLOCK: opening a FIFO planted at the path must not hang; it then fails the
        // namespace check below like any other file.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NONBLOCK)
            .open(path)
            .map_err(|source| NetnsError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        // Caught here, the mistake is named; caught by setns in a child, it reads as
        // "iptables-save could not be started: Invalid argument".
        if let Some(what) = not_netns(&file) {
            return Err(NetnsError::NotNetns {
                path: path.to_path_buf(),
                what,
            });
        }
        Ok(Netns {
            path: path.to_path_buf(),
            file: Arc::new(file),
        })
    }

    /// A new, empty network namespace that lives as long as the handle (nothing names it):
    /// a place to ask a tool what it would make of something without touching a real one.
    /// Needs CAP_SYS_ADMIN, as entering one does.
    pub fn scratch() -> std::io::Result<Netns> {
        std::thread::spawn(|| {
            nix::sched::unshare(CloneFlags::CLONE_NEWNET)?;
            let file = File::open("/proc/thread-self/ns/net")?;
            Ok(Netns {
                path: PathBuf::from("(a scratch namespace)"),
                file: Arc::new(file),
            })
        })
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Enters the namespace on the calling thread only.
    fn enter(&self) -> Result<(), NetnsError> {
        setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|source| NetnsError::Enter {
            path: self.path.clone(),
            source,
        })
    }

    /// Runs `f` on a fresh thread inside the namespace and returns its result.
    pub fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, NetnsError> {
        let ns = self.clone();
        std::thread::spawn(move || ns.enter().map(|()| f()))
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    }
}

/// An exclusive hold on a namespace's capture rules, released when dropped (or when the
/// process dies, even by SIGKILL). Every command that reads and then rewrites the rules
/// (apply, clean, check, the CNI plugin) holds it from its first read to its last write, so
/// two of them in one namespace run one after the other, never interleaved.
///
/// The lock is `flock` on the namespace's own nsfs inode: every path to one namespace
/// (`/run/netns/NAME`, `/proc/PID/ns/net`, from any mount namespace: an init container's or
/// the CNI plugin's on the host) is the same inode, so they all meet on it.
#[derive(Debug)]
pub struct Lock {
    _held: Flock<File>,
}

/// Takes the namespace's [`Lock`], waiting at most `timeout` for another holder.
pub fn lock(netns: Option<&Netns>, timeout: Duration) -> Result<Lock, NetnsError> {
    let path = match netns {
        Some(ns) => PathBuf::from(format!("/proc/self/fd/{}", ns.file.as_raw_fd())),
        // Every thread but a `run` one is in the process's namespace.
        None => PathBuf::from("/proc/self/ns/net"),
    };
    let shown = netns.map_or_else(
        || PathBuf::from(format!("/proc/{}/ns/net", std::process::id())),
        |ns| ns.path.clone(),
    );
    // A description of its own: flock belongs to the open file description, and the Netns
    // handle's may be shared with children.
    let mut file = File::open(&path).map_err(|source| NetnsError::Open {
        path: shown.clone(),
        source,
    })?;
    let start = Instant::now();
    let mut pause = Duration::from_millis(1);
    loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(held) => {
                if start.elapsed() > Duration::from_millis(50) {
                    tracing::info!(waited = ?start.elapsed(), "waited for another shunt in the namespace");
                }
                return Ok(Lock { _held: held });
            }
            Err((f, nix::errno::Errno::EWOULDBLOCK)) => file = f,
            Err((_, source)) => {
                return Err(NetnsError::Lock {
                    path: shown,
                    source,
                })
            }
        }
        if start.elapsed() >= timeout {
            return Err(NetnsError::Busy {
                path: shown,
                waited: timeout,
            });
        }
        std::thread::sleep(pause.min(timeout.saturating_sub(start.elapsed())));
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// A command that runs in `netns` (or the current namespace for `None`), and that dies with
/// shunt: a restore or `nft -f` left running by a killed apply would otherwise go on to
/// change the rules after the namespace's lock is gone, under the next shunt's feet.
/// (`PR_SET_PDEATHSIG` follows the thread that starts the child; shunt starts its tools from
/// a thread that outlives them: the keeper in `netfilter::spawn`, or one that waits.)
pub fn command(program: &str, netns: Option<&Netns>) -> Command {
    let mut cmd = Command::new(program);
    let file = netns.map(|ns| ns.file.clone());
    let parent = std::process::id() as nix::libc::pid_t;
    // SAFETY: between fork and exec only async-signal-safe calls are allowed; prctl, getppid
    // and setns are plain syscalls and the closure allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if nix::libc::prctl(nix::libc::PR_SET_PDEATHSIG, nix::libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // shunt died between fork and prctl: the signal will never come.
            if nix::libc::getppid() != parent {
                return Err(std::io::Error::from_raw_os_error(nix::libc::ESRCH));
            }
            match &file {
                Some(f) => setns(f.as_fd(), CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from),
                None => Ok(()),
            }
        });
    }
    cmd
}

/// Runs `f` in `netns`, or right here when there is none.
pub fn run_in<T: Send + 'static>(
    netns: Option<&Netns>,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, NetnsError> {
    match netns {
        Some(ns) => ns.run(f),
        None => Ok(f()),
    }
}
