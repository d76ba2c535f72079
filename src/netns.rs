//! Acting inside a network namespace: a child process that enters it between fork and exec,
//! or a closure on a short-lived thread that enters it (`setns` moves only the calling
//! thread, so the rest of the process never changes namespace).

use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

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
        "cannot enter network namespace {path}: {source} (shunt needs CAP_SYS_ADMIN for setns)"
    )]
    Enter { path: PathBuf, source: nix::Error },
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
        let file = File::open(path).map_err(|source| NetnsError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Netns {
            path: path.to_path_buf(),
            file: Arc::new(file),
        })
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

/// A command that runs in `netns` (or the current namespace for `None`).
pub fn command(program: &str, netns: Option<&Netns>) -> Command {
    let mut cmd = Command::new(program);
    if let Some(ns) = netns {
        let file = ns.file.clone();
        // SAFETY: between fork and exec only async-signal-safe calls are allowed; setns is a
        // plain syscall and the closure allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                setns(file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)
            });
        }
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
