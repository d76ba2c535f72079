//! The system edge for rules: pick the iptables backend, read what is installed
//! (`iptables-save`), and converge it to a plan with one `iptables-restore --noflush` per
//! family, rolling IPv4 back when IPv6 fails.
//!
//! The converging script is computed purely from two [`ShuntView`]s, so "apply", "clean"
//! (converge to nothing) and "roll back" (converge to what was there) are one function.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::io::{Read, Write as _};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::engine::{Cleaned, Engine, EngineKind, Part};
use crate::netns::{self, Netns};
use crate::plan::{Family, Plan, Ruleset, TableName};
use crate::render::{join_args, rule_args};
use crate::rules::{self, ShuntView};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Legacy,
    Nft,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Legacy => "legacy",
            Backend::Nft => "nft",
        }
    }

    /// `iptables-nft-restore`, `ip6tables-legacy-save`, ...
    pub fn tool(self, family: Family, verb: &str) -> String {
        let base = match family {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        };
        format!("{base}-{}-{verb}", self.name())
    }

    /// Whether this backend's tools for `family` are installed.
    pub fn available(self, family: Family) -> bool {
        find_tool(&self.tool(family, "restore")).is_some()
            && find_tool(&self.tool(family, "save")).is_some()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NetfilterError {
    #[error("{tool} not found on PATH: {}", install_hint(tool))]
    MissingTool { tool: String },
    #[error("{tool} could not be started: {source}")]
    Spawn {
        tool: String,
        source: std::io::Error,
    },
    #[error(
        "{tool} did not finish within {after:?} and was killed (raise --wait if this machine \
         is that slow)"
    )]
    Timeout { tool: String, after: Duration },
    #[error("{tool} failed ({status}): {stderr}")]
    ToolFailed {
        tool: String,
        status: String,
        stderr: String,
    },
    #[error(
        "cannot put ::6 on lo, the address the proxy connects to the app from: {reason}; \
         with IPv6 disabled in the namespace, pass --ipv6 off (or auto)"
    )]
    InboundSource { reason: String },
    #[error("cannot parse the output of {tool}: {source}")]
    Parse {
        tool: String,
        source: rules::ParseError,
    },
    #[error(transparent)]
    Netns(#[from] netns::NetnsError),
    #[error(
        "shunt's rules are held by the {held} engine in this namespace; to use {wanted}, \
         run `shunt clean --backend {held}` first, or apply with --migrate (two engines would \
         both capture)"
    )]
    OtherEngine {
        wanted: &'static str,
        held: &'static str,
    },
    #[error(
        "the kernel refused the nftables transaction at {what}: {source}; nothing was changed \
         (SHUNT_NFT_WRITER=nft writes the same table through nft, for comparison)"
    )]
    Refused {
        what: String,
        source: std::io::Error,
    },
    #[error("not everything could be removed: {}", errors.join("; "))]
    Incomplete { errors: Vec<String> },
    #[error(
        "the rules could not be applied ({cause}), and rolling back failed too ({rollback}); \
         run `shunt check` to see what is installed, then `shunt apply` again (or `shunt clean`)"
    )]
    RollbackFailed { cause: String, rollback: String },
}

/// Which Debian package brings a missing tool.
fn install_hint(tool: &str) -> &'static str {
    if tool == "nft" {
        "install nftables (Debian: apt-get install nftables) or pick another --backend"
    } else if tool == "ip" {
        "install iproute2 (Debian: apt-get install iproute2)"
    } else {
        "install iptables (Debian: apt-get install iptables) or pick another --backend"
    }
}

/// A tool's path, when it is installed.
pub fn find_tool(tool: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(tool))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// How long one child tool (iptables-restore, ip, ...) may run before it is killed. One
/// process-wide bound, set once from `--wait` at the edge, so that every caller of
/// [`spawn_tool`] (capture, routing, explain) is bounded without threading it through.
/// Until a command sets it: `--wait`'s documented default.
static TOOL_TIMEOUT_MS: AtomicU64 = AtomicU64::new(30_000);

pub fn set_tool_timeout(t: Duration) {
    TOOL_TIMEOUT_MS.store(t.as_millis().max(1) as u64, Ordering::Relaxed);
}

pub fn tool_timeout() -> Duration {
    Duration::from_millis(TOOL_TIMEOUT_MS.load(Ordering::Relaxed))
}

/// A tool started in a namespace; [`Running::wait`] collects it. Starting several before
/// waiting lets independent reads and writes (IPv4 and IPv6) run side by side.
pub struct Running {
    tool: String,
    started: Instant,
    /// The child is started, fed and reaped on a thread of its own (its keeper), so that
    /// `spawn` returns before fork and exec are done: the caller reads its config or plans
    /// meanwhile. The keeper is also the thread PR_SET_PDEATHSIG watches, and it lives exactly
    /// as long as the child. It sends the child's pid and pipes, then its exit status.
    child: std::sync::mpsc::Receiver<std::io::Result<Child>>,
    exited: std::sync::mpsc::Receiver<std::io::Result<std::process::ExitStatus>>,
}

/// A started child, as its keeper hands it over.
struct Child {
    pid: nix::libc::pid_t,
    /// Pipes are drained on their own threads, so a tool that writes more than a pipe holds,
    /// or stops reading its input, cannot block us past the deadline.
    stdin: Option<std::thread::JoinHandle<()>>,
    stdout: Option<std::thread::JoinHandle<Vec<u8>>>,
    stderr: Option<std::thread::JoinHandle<Vec<u8>>>,
}

fn drain(pipe: Option<impl Read + Send + 'static>) -> Option<std::thread::JoinHandle<Vec<u8>>> {
    pipe.map(|mut p| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = p.read_to_end(&mut buf);
            buf
        })
    })
}

/// Starts a tool (looked up on PATH) in the namespace, feeding it `input`.
pub fn spawn_tool(
    tool: &str,
    args: &[&str],
    input: Option<&str>,
    ns: Option<&Netns>,
) -> Result<Running, NetfilterError> {
    let input = input.map(str::to_string);
    let path = find_tool(tool).ok_or_else(|| NetfilterError::MissingTool {
        tool: tool.to_string(),
    })?;
    let mut cmd = netns::command(&path.to_string_lossy(), ns);
    cmd.args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let (give, child) = std::sync::mpsc::channel();
    let (tx, exited) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut child = match cmd.spawn() {
            Ok(child) => child,
            Err(e) => {
                let _ = give.send(Err(e));
                return;
            }
        };
        let stdin = match (input, child.stdin.take()) {
            (Some(text), Some(mut pipe)) => {
                // A write error (the tool died early) shows up as its exit status in `wait`.
                Some(std::thread::spawn(move || {
                    let _ = pipe.write_all(text.as_bytes());
                }))
            }
            _ => None,
        };
        let _ = give.send(Ok(Child {
            pid: child.id() as nix::libc::pid_t,
            stdin,
            stdout: drain(child.stdout.take()),
            stderr: drain(child.stderr.take()),
        }));
        let _ = tx.send(child.wait());
    });
    Ok(Running {
        tool: tool.to_string(),
        started,
        child,
        exited,
    })
}

impl Running {
    /// Waits for the tool, at most [`tool_timeout`] from its start (then kills it); its
    /// stdout, or an error carrying its stderr.
    pub fn wait(self) -> Result<String, NetfilterError> {
        let limit = tool_timeout();
        let deadline = self.started + limit;
        let left = || deadline.saturating_duration_since(Instant::now());
        let spawn_error = |tool: String, source| NetfilterError::Spawn { tool, source };
        let child = match self.child.recv_timeout(left()) {
            Ok(Ok(child)) => child,
            Ok(Err(source)) => return Err(spawn_error(self.tool, source)),
            // fork and exec did not return in time: there is no pid to kill.
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                return Err(NetfilterError::Timeout {
                    tool: self.tool,
                    after: limit,
                })
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                let gone = std::io::Error::other("the thread starting it ended");
                return Err(spawn_error(self.tool, gone));
            }
        };
        let status = match self.exited.recv_timeout(left()) {
            Ok(Ok(status)) => status,
            Ok(Err(source)) => return Err(spawn_error(self.tool, source)),
            Err(_) => {
                // SIGKILL: a hung iptables-restore has committed nothing yet, or it has
                // committed some tables; the caller converges back either way. Its keeper had
                // not reaped it a moment ago, so the pid is, but for that moment, still its own.
                // SAFETY: kill(2) on our own unreaped child's pid; no memory is involved.
                unsafe { nix::libc::kill(child.pid, nix::libc::SIGKILL) };
                let _ = self.exited.recv();
                return Err(NetfilterError::Timeout {
                    tool: self.tool,
                    after: limit,
                });
            }
        };
        let join = |h: Option<std::thread::JoinHandle<Vec<u8>>>| {
            h.and_then(|h| h.join().ok()).unwrap_or_default()
        };
        if let Some(h) = child.stdin {
            let _ = h.join();
        }
        let stdout = join(child.stdout);
        let stderr = join(child.stderr);
        if !status.success() {
            let stderr = String::from_utf8_lossy(&stderr).trim().to_string();
            return Err(NetfilterError::ToolFailed {
                tool: self.tool,
                status: status.to_string(),
                stderr,
            });
        }
        Ok(String::from_utf8_lossy(&stdout).into_owned())
    }
}

/// What one backend holds for one family in a namespace.
pub fn save(
    backend: Backend,
    family: Family,
    ns: Option<&Netns>,
) -> Result<rules::Saved, NetfilterError> {
    save_all(&[(backend, family)], ns).map(|mut v| v.remove(0))
}

/// Several saves at once (e.g. IPv4 and IPv6), in the order asked.
pub fn save_all(
    which: &[(Backend, Family)],
    ns: Option<&Netns>,
) -> Result<Vec<rules::Saved>, NetfilterError> {
    let mut running = Vec::new();
    // One netlink dump answers for every nft part asked.
    let tables = which
        .iter()
        .any(|(b, _)| *b == Backend::Nft)
        .then(|| crate::netlink::tables(ns))
        .flatten();
    for (backend, family) in which {
        let empty = match backend {
            Backend::Nft => nft_family_empty(tables.as_deref(), *family),
            Backend::Legacy => legacy_empty(*family, ns),
        };
        running.push(match empty {
            true => None,
            false => Some(spawn_tool(&backend.tool(*family, "save"), &[], None, ns)?),
        });
    }
    running
        .into_iter()
        .map(|r| r.map(Running::wait))
        .zip(which)
        .map(|(out, (backend, family))| {
            let Some(out) = out else {
                return Ok(rules::Saved::default());
            };
            rules::parse(&out?).map_err(|source| NetfilterError::Parse {
                tool: backend.tool(*family, "save"),
                source,
            })
        })
        .collect()
}

/// Whether a save of `backend`'s `family` would print nothing, known without starting it
/// (most namespaces have no table of one backend, and a fresh one has none at all).
///
/// Legacy: the kernel lists the legacy tables a namespace has in
/// /proc/net/ip{,6}_tables_names ([`legacy_empty_here`]). nft: iptables-nft's tables are
/// nf_tables tables of family `ip` or `ip6`, and netlink lists those ([`nft_family_empty`]);
/// any table of the family, whoever made it, means the save is run.
fn legacy_empty(family: Family, ns: Option<&Netns>) -> bool {
    netns::run_in(ns, move || legacy_empty_here(family)).unwrap_or(false)
}

/// Whether legacy iptables has no table of `family` in the calling thread's namespace.
pub fn legacy_empty_here(family: Family) -> bool {
    let file = match family {
        Family::V4 => "/proc/thread-self/net/ip_tables_names",
        Family::V6 => "/proc/thread-self/net/ip6_tables_names",
    };
    // /proc/net is /proc/self/net, the main thread's namespace; thread-self is this one's.
    match std::fs::read_to_string(file) {
        Ok(text) => text.trim().is_empty(),
        // No file: the legacy modules are not loaded, so there are no legacy tables.
        Err(e) => e.kind() == std::io::ErrorKind::NotFound,
    }
}

/// Whether the nf_tables tables listed (`None`: unknown) hold none of `family`'s.
pub fn nft_family_empty(tables: Option<&[crate::netlink::Table]>, family: Family) -> bool {
    let want = match family {
        Family::V4 => crate::netlink::IPV4,
        Family::V6 => crate::netlink::IPV6,
    };
    tables.is_some_and(|t| !t.iter().any(|t| t.family == want))
}

/// shunt's part of every table, from a save.
pub fn views(saved: &rules::Saved) -> Vec<(TableName, ShuntView)> {
    TableName::ALL
        .into_iter()
        .map(|t| {
            let v = saved
                .table(t.as_str())
                .map(ShuntView::of)
                .unwrap_or_default();
            (t, v)
        })
        .collect()
}

/// The plan's part of every table, in the same shape as [`views`] of an installed ruleset.
pub fn planned_views(rs: Option<&Ruleset>) -> Vec<(TableName, ShuntView)> {
    TableName::ALL
        .into_iter()
        .map(|t| {
            let mut v = ShuntView::default();
            for table in rs.iter().flat_map(|rs| &rs.tables).filter(|x| x.name == t) {
                for c in &table.chains {
                    let rules = c.rules.iter().map(rule_args).collect();
                    if c.builtin {
                        v.jumps.insert(c.name.clone(), rules);
                    } else {
                        v.chains.insert(c.name.clone(), rules);
                    }
                }
            }
            (t, v)
        })
        .collect()
}

fn view_for(views: &[(TableName, ShuntView)], t: TableName) -> &ShuntView {
    static EMPTY: std::sync::OnceLock<ShuntView> = std::sync::OnceLock::new();
    views
        .iter()
        .find(|(n, _)| *n == t)
        .map(|(_, v)| v)
        .unwrap_or_else(|| EMPTY.get_or_init(ShuntView::default))
}

/// The `iptables-restore --noflush` input that turns `from` into `to` for one table, touching
/// only shunt's chains and the jumps into them; `None` when they are already equal.
pub fn converge_table(table: TableName, from: &ShuntView, to: &ShuntView) -> Option<String> {
    if from == to {
        return None;
    }
    let mut s = String::new();
    let _ = writeln!(s, "*{}", table.as_str());
    // Chains to (re)write: new or changed ones, and obsolete ones (declared to flush them).
    let changed: Vec<&String> = to
        .chains
        .iter()
        .filter(|(name, rules)| from.chains.get(*name) != Some(rules))
        .map(|(name, _)| name)
        .collect();
    let obsolete: Vec<&String> = from
        .chains
        .keys()
        .filter(|name| !to.chains.contains_key(*name))
        .collect();
    // Declaring an existing chain under --noflush flushes it.
    for name in changed.iter().chain(&obsolete) {
        let _ = writeln!(s, ":{name} - [0:0]");
    }
    // Jumps from built-in chains: rewritten as a block when they differ in any way, so a
    // jump can never be duplicated and their order is the plan's.
    let builtins: BTreeSet<&String> = from.jumps.keys().chain(to.jumps.keys()).collect();
    let mut add_jumps = Vec::new();
    for chain in builtins {
        let (old, new) = (from.jumps.get(chain), to.jumps.get(chain));
        if old == new {
            continue;
        }
        for args in old.into_iter().flatten() {
            let _ = writeln!(s, "-D {chain} {}", join_args(args));
        }
        for args in new.into_iter().flatten() {
            add_jumps.push(format!("-A {chain} {}", join_args(args)));
        }
    }
    for name in &obsolete {
        let _ = writeln!(s, "-X {name}");
    }
    for name in &changed {
        for args in &to.chains[*name] {
            let _ = writeln!(s, "-A {name} {}", join_args(args));
        }
    }
    for line in add_jumps {
        s.push_str(&line);
        s.push('\n');
    }
    s.push_str("COMMIT\n");
    Some(s)
}

/// The whole family's converging script (all tables), or `None` when nothing differs.
pub fn converge(from: &[(TableName, ShuntView)], to: &[(TableName, ShuntView)]) -> Option<String> {
    let parts: Vec<String> = TableName::ALL
        .into_iter()
        .filter_map(|t| converge_table(t, view_for(from, t), view_for(to, t)))
        .collect();
    (!parts.is_empty()).then(|| parts.concat())
}

/// Starts `iptables-restore --noflush` on a script: all or nothing per table.
fn spawn_restore(
    backend: Backend,
    family: Family,
    script: &str,
    ns: Option<&Netns>,
) -> Result<Running, NetfilterError> {
    // -w: legacy iptables shares one lock across namespaces; wait for it instead of failing.
    spawn_tool(
        &backend.tool(family, "restore"),
        &["--noflush", "-w", "10"],
        Some(script),
        ns,
    )
}

/// Per-family state read before a change: what to converge from, and what to roll back to.
#[derive(Debug, Clone)]
pub struct FamilyState {
    pub family: Family,
    pub views: Vec<(TableName, ShuntView)>,
    /// Tables the save did not list: restoring into one creates it, so a rollback removes it
    /// again where the backend allows (nft).
    pub absent: Vec<TableName>,
}

impl FamilyState {
    pub fn of(family: Family, saved: &rules::Saved) -> FamilyState {
        FamilyState {
            family,
            views: views(saved),
            absent: TableName::ALL
                .into_iter()
                .filter(|t| saved.table(t.as_str()).is_none())
                .collect(),
        }
    }
}

/// Whether a table holds nothing but shunt's chains and jumps and its built-in chains accept:
/// once shunt's part is gone, it is the empty table a restore created.
fn only_shunt(table: &rules::SavedTable) -> bool {
    table
        .chains
        .iter()
        .all(|(name, policy)| rules::is_shunt_chain(name) || policy == "ACCEPT")
        && table.rules.iter().all(|r| {
            rules::is_shunt_chain(&r.chain) || r.target_chain().is_some_and(rules::is_shunt_chain)
        })
}

/// Deletes the nft tables that a failed apply created and its rollback emptied, so the
/// namespace is as found, not one empty `*nat` richer. Needs `nft`; without it the empty
/// tables stay (harmless: no rules, policy ACCEPT).
fn drop_created_tables(
    family: Family,
    before: &FamilyState,
    now: &rules::Saved,
    ns: Option<&Netns>,
) {
    let created: Vec<TableName> = before
        .absent
        .iter()
        .copied()
        .filter(|t| now.table(t.as_str()).is_some_and(only_shunt))
        .collect();
    if created.is_empty() {
        return;
    }
    if find_tool("nft").is_none() {
        tracing::debug!("nft not installed: leaving the empty tables the rollback emptied");
        return;
    }
    let fam = match family {
        Family::V4 => "ip",
        Family::V6 => "ip6",
    };
    for t in created {
        let r = spawn_tool("nft", &["delete", "table", fam, t.as_str()], None, ns)
            .and_then(Running::wait);
        if let Err(e) = r {
            tracing::warn!("could not remove the empty {fam} {} table: {e}", t.as_str());
        }
    }
}

/// The result of [`apply_families`]: the scripts that ran, per family.
#[derive(Debug, Default)]
pub struct Applied {
    pub scripts: Vec<(Family, String)>,
}

/// Converges each family from `current` to `desired`. The families' restores run side by
/// side; if any fails, the ones that succeeded are converged back to what they were, so the
/// namespace is left as found (SPEC §3 item 8).
pub fn apply_families(
    backend: Backend,
    ns: Option<&Netns>,
    current: &[FamilyState],
    desired: &[(Family, Vec<(TableName, ShuntView)>)],
) -> Result<Applied, NetfilterError> {
    let mut work = Vec::new();
    for (family, want) in desired {
        let Some(state) = current.iter().find(|s| s.family == *family) else {
            continue;
        };
        if let Some(script) = converge(&state.views, want) {
            work.push((state, script));
        }
    }
    let mut running = Vec::new();
    let mut first_error = None;
    for (state, script) in &work {
        match spawn_restore(backend, state.family, script, ns) {
            Ok(r) => running.push(Some(r)),
            Err(e) => {
                first_error.get_or_insert(e);
                running.push(None);
            }
        }
    }
    let mut done = Vec::new();
    for ((state, script), run) in work.iter().zip(running) {
        match run.map(Running::wait) {
            Some(Ok(_)) => done.push((state.family, script.clone())),
            Some(Err(e)) => {
                first_error.get_or_insert(e);
            }
            None => {}
        }
    }
    let Some(cause) = first_error else {
        return Ok(Applied { scripts: done });
    };
    // Every family this run touched goes back to what it was, the failed one included:
    // iptables-restore commits table by table (legacy), so a failure in a later table can
    // leave the earlier ones of the same family committed. Read what is there now rather
    // than guess.
    let touched: Vec<&FamilyState> = work.iter().map(|(state, _)| *state).collect();
    if let Err(rollback) = converge_back(backend, ns, &touched, &cause) {
        return Err(NetfilterError::RollbackFailed {
            cause: cause.to_string(),
            rollback: rollback.to_string(),
        });
    }
    Err(cause)
}

/// Converges each family back to the state read before the change (see [`apply_families`]).
fn converge_back(
    backend: Backend,
    ns: Option<&Netns>,
    before: &[&FamilyState],
    cause: &NetfilterError,
) -> Result<(), NetfilterError> {
    let which: Vec<(Backend, Family)> = before.iter().map(|s| (backend, s.family)).collect();
    let now = save_all(&which, ns)?;
    for (prev, saved) in before.iter().zip(&now) {
        if let Some(back) = converge(&views(saved), &prev.views) {
            tracing::warn!(
                "{} failed: rolling back the {} rules",
                cause_tool(cause),
                prev.family.name()
            );
            spawn_restore(backend, prev.family, &back, ns)?.wait()?;
        }
        if backend == Backend::Nft {
            drop_created_tables(prev.family, prev, saved, ns);
        }
    }
    Ok(())
}

fn cause_tool(e: &NetfilterError) -> &str {
    match e {
        NetfilterError::ToolFailed { tool, .. }
        | NetfilterError::Spawn { tool, .. }
        | NetfilterError::Timeout { tool, .. }
        | NetfilterError::MissingTool { tool } => tool,
        _ => "restore",
    }
}

// === The iptables engines (legacy and nft) behind the engine seam ===

/// The tproxy mark installed in a family's rules (read from the chain that sets it).
fn installed_mark(views: &[(TableName, ShuntView)]) -> Option<u32> {
    let (_, mangle) = views.iter().find(|(t, _)| *t == TableName::Mangle)?;
    mangle
        .chains
        .get(crate::plan::DIVERT)?
        .iter()
        .flat_map(|args| args.windows(2))
        .find(|w| w[0] == "--set-xmark")
        .and_then(|w| {
            let m = w[1].split('/').next()?;
            u32::from_str_radix(m.trim_start_matches("0x"), 16).ok()
        })
}

/// The plan's views for each family asked (none for a family the plan leaves out).
fn desired(plan: &Plan, families: &[Family]) -> Vec<(Family, Vec<(TableName, ShuntView)>)> {
    families
        .iter()
        .map(|&f| {
            let rs = match f {
                Family::V4 => Some(&plan.v4),
                Family::V6 => plan.v6.as_ref(),
            };
            (f, planned_views(rs))
        })
        .collect()
}

/// A view as restore-style lines, in a stable order, for diffing.
fn view_lines(views: &[(TableName, ShuntView)]) -> Vec<String> {
    let mut out = Vec::new();
    for (t, v) in views {
        if v.is_empty() {
            continue;
        }
        out.push(format!("*{}", t.as_str()));
        for (chain, rules) in &v.jumps {
            for r in rules {
                out.push(format!("-A {chain} {}", join_args(r)));
            }
        }
        for (chain, rules) in &v.chains {
            out.push(format!(":{chain}"));
            for r in rules {
                out.push(format!("-A {chain} {}", join_args(r)));
            }
        }
    }
    out
}

/// One iptables backend in one namespace: shunt's chains in the tables of each family,
/// converged with one `iptables-restore --noflush` per family.
pub struct Iptables {
    backend: Backend,
    ns: Option<Netns>,
    ipv6: bool,
    /// An explicit `--backend`: a family whose tools are missing is an error, not skipped.
    strict: bool,
    /// What was read, per family, reused by the steps of one command.
    read: Vec<(Family, FamilyState)>,
}

impl Iptables {
    /// `kept`: an IPv4 save already read (while choosing the backend), reused.
    pub fn new(
        backend: Backend,
        ns: Option<Netns>,
        ipv6: bool,
        strict: bool,
        kept: Option<rules::Saved>,
    ) -> Iptables {
        Iptables {
            backend,
            ns,
            ipv6,
            strict,
            read: kept
                .map(|s| vec![(Family::V4, FamilyState::of(Family::V4, &s))])
                .unwrap_or_default(),
        }
    }

    fn families(&self) -> Vec<Family> {
        if self.ipv6 {
            vec![Family::V4, Family::V6]
        } else {
            vec![Family::V4]
        }
    }

    /// What is installed for each family asked (the missing ones read side by side).
    fn states(&mut self, families: &[Family]) -> Result<Vec<FamilyState>, NetfilterError> {
        let missing: Vec<(Backend, Family)> = families
            .iter()
            .filter(|f| !self.read.iter().any(|(g, _)| g == *f))
            .map(|f| (self.backend, *f))
            .collect();
        for ((_, f), saved) in missing.iter().zip(save_all(&missing, self.ns.as_ref())?) {
            self.read.push((*f, FamilyState::of(*f, &saved)));
        }
        Ok(families
            .iter()
            .filter_map(|f| {
                self.read
                    .iter()
                    .find(|(g, _)| g == f)
                    .map(|(_, s)| s.clone())
            })
            .collect())
    }
}

impl Engine for Iptables {
    fn kind(&self) -> EngineKind {
        self.backend.into()
    }

    fn installed_marks(&mut self) -> Result<Vec<u32>, NetfilterError> {
        let families = self.families();
        let mut marks: Vec<u32> = self
            .states(&families)?
            .iter()
            .filter_map(|s| installed_mark(&s.views))
            .collect();
        marks.dedup();
        Ok(marks)
    }

    fn converge(
        &mut self,
        plan: &Plan,
        dry_run: bool,
    ) -> Result<Vec<(Part, String)>, NetfilterError> {
        let families = self.families();
        let current = self.states(&families)?;
        let want = desired(plan, &families);
        let scripts = if dry_run {
            current
                .iter()
                .zip(&want)
                .filter_map(|(state, (f, views))| converge(&state.views, views).map(|s| (*f, s)))
                .collect()
        } else {
            apply_families(self.backend, self.ns.as_ref(), &current, &want)?.scripts
        };
        Ok(scripts.into_iter().map(|(f, s)| (f.into(), s)).collect())
    }

    fn drift(&mut self, plan: &Plan) -> Result<Vec<(Part, Vec<String>)>, NetfilterError> {
        // Both families: IPv6 rules left behind while IPv6 is off are drift too.
        let families: Vec<Family> = [Family::V4, Family::V6]
            .into_iter()
            .filter(|f| *f == Family::V4 || self.ipv6 || self.backend.available(*f))
            .collect();
        let current = self.states(&families)?;
        Ok(current
            .iter()
            .zip(desired(plan, &families))
            .filter_map(|(state, (f, views))| {
                let lines = crate::engine::diff(&view_lines(&state.views), &view_lines(&views));
                (!lines.is_empty()).then(|| (f.into(), lines))
            })
            .collect())
    }

    fn clean(&mut self) -> Cleaned {
        let mut out = Cleaned::default();
        for family in [Family::V4, Family::V6] {
            if !self.strict && !self.backend.available(family) {
                continue;
            }
            let result = self.states(&[family]).and_then(|states| {
                let state =
                    states
                        .into_iter()
                        .next()
                        .ok_or_else(|| NetfilterError::MissingTool {
                            tool: self.backend.tool(family, "save"),
                        })?;
                out.marks.extend(installed_mark(&state.views));
                let empty = [(family, planned_views(None))];
                apply_families(
                    self.backend,
                    self.ns.as_ref(),
                    std::slice::from_ref(&state),
                    &empty,
                )
            });
            match result {
                Ok(applied) => out
                    .removed
                    .extend(applied.scripts.into_iter().map(|(f, s)| (f.into(), s))),
                Err(e) => {
                    out.errors
                        .push(format!("{} {}: {e}", self.backend.name(), family.name()))
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CaptureConfig;
    use crate::plan;

    fn planned(ipv6: bool) -> Vec<(TableName, ShuntView)> {
        planned_views(Some(&plan::build(&CaptureConfig::default(), ipv6).v4))
    }

    #[test]
    fn converging_equal_views_is_a_no_op() {
        assert!(converge(&planned(true), &planned(true)).is_none());
        assert!(converge(&planned_views(None), &planned_views(None)).is_none());
    }

    #[test]
    fn fresh_install_declares_chains_then_rules_then_jumps() {
        let s = converge(&planned_views(None), &planned(true)).unwrap();
        let decl = s.find(":SHUNT_OUTPUT").unwrap();
        let rule = s.find("-A SHUNT_OUTPUT").unwrap();
        let jump = s.find("-A OUTPUT -p tcp -j SHUNT_OUTPUT").unwrap();
        assert!(decl < rule && rule < jump, "{s}");
        assert!(!s.contains("-D ") && !s.contains("-X "), "{s}");
    }

    #[test]
    fn clean_deletes_jumps_and_chains() {
        let s = converge(&planned(true), &planned_views(None)).unwrap();
        assert!(s.contains("-D OUTPUT -p tcp -j SHUNT_OUTPUT"), "{s}");
        assert!(s.contains("-X SHUNT_REDIRECT"), "{s}");
        assert!(!s.contains("-A "), "{s}");
    }

    #[test]
    fn duplicated_jump_is_repaired() {
        let mut installed = planned(true);
        let nat = installed
            .iter_mut()
            .find(|(t, _)| *t == TableName::Nat)
            .unwrap();
        let dup = nat.1.jumps["OUTPUT"][0].clone();
        nat.1.jumps.get_mut("OUTPUT").unwrap().push(dup);
        let s = converge(&installed, &planned(true)).unwrap();
        assert_eq!(s.matches("-D OUTPUT").count(), 2, "{s}");
        assert_eq!(s.matches("-A OUTPUT").count(), 1, "{s}");
        // Chains that did not change are left alone (their counters too).
        assert!(!s.contains(":SHUNT_OUTPUT"), "{s}");
    }
}
