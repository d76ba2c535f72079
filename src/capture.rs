//! The capture commands (apply, clean, check) as library calls: config in, report out.
//! The CLI, the CNI plugin and the tests all call these.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::Path;

use serde::Serialize;

use crate::config::{BackendChoice, CaptureConfig, Ipv6, Mode};
use crate::netfilter::{self, Backend, FamilyState, NetfilterError};
use crate::netns::{self, Netns};
use crate::plan::{self, Family, Plan, TableName, INBOUND_SOURCE_V6};
use crate::render::join_args;
use crate::routing;
use crate::rules::{Saved, ShuntView};

/// Where the rules go: the namespace, the backend and the IPv6 decision, settled once.
pub struct Target {
    pub netns: Option<Netns>,
    /// Held from the first read to the last write: one shunt at a time per namespace.
    _lock: netns::Lock,
    pub backend: Backend,
    pub ipv6: bool,
    /// The IPv4 save read while choosing the backend, reused rather than read twice.
    v4: Option<Saved>,
}

fn backend_available(b: Backend) -> Result<(), NetfilterError> {
    if b.available(Family::V4) {
        Ok(())
    } else {
        Err(NetfilterError::MissingTool {
            tool: b.tool(Family::V4, "restore"),
        })
    }
}

/// Whether a save holds any of shunt's chains or jumps.
pub fn holds_shunt(saved: &Saved) -> bool {
    netfilter::views(saved).iter().any(|(_, v)| !v.is_empty())
}

/// SPEC §2 `--backend auto`: the backend that already holds rules in that namespace (shunt's
/// first, then the one with more rules), else nft, else legacy. Warns when both hold rules.
fn choose_backend(
    choice: BackendChoice,
    ns: Option<&Netns>,
) -> Result<(Backend, Option<Saved>), NetfilterError> {
    match choice {
        BackendChoice::Legacy => {
            backend_available(Backend::Legacy).map(|()| (Backend::Legacy, None))
        }
        BackendChoice::Nft => backend_available(Backend::Nft).map(|()| (Backend::Nft, None)),
        BackendChoice::Auto => {
            let candidates: Vec<(Backend, Family)> = [Backend::Nft, Backend::Legacy]
                .into_iter()
                .filter(|b| b.available(Family::V4))
                .map(|b| (b, Family::V4))
                .collect();
            let seen: Vec<(Backend, Saved)> = candidates
                .iter()
                .map(|(b, _)| *b)
                .zip(netfilter::save_all(&candidates, ns)?)
                .collect();
            if seen.is_empty() {
                return Err(NetfilterError::MissingTool {
                    tool: "iptables-nft-restore or iptables-legacy-restore".into(),
                });
            }
            let holding: Vec<&(Backend, Saved)> =
                seen.iter().filter(|(_, s)| s.has_rules()).collect();
            if holding.len() > 1 {
                tracing::warn!(
                    "both the nft and the legacy iptables backends hold rules in this namespace; \
                     mixing them makes packet paths hard to predict (see `iptables-legacy-save` \
                     and `iptables-nft-save`)"
                );
            }
            let pick = pick_backend(&seen);
            let saved = seen.into_iter().find(|(b, _)| *b == pick).map(|(_, s)| s);
            tracing::debug!(backend = pick.name(), "backend chosen");
            Ok((pick, saved))
        }
    }
}

/// The `auto` rule, on the IPv4 saves of the available backends (nft first): the one that
/// holds shunt's rules, else the one with more rules, else the first. `doctor` inspects
/// what this picks, so both always look at the same backend.
pub fn pick_backend(seen: &[(Backend, Saved)]) -> Backend {
    let rule_count = |s: &Saved| s.tables.iter().map(|t| t.rules.len()).sum::<usize>();
    seen.iter()
        .filter(|(_, s)| s.has_rules())
        .max_by_key(|(_, s)| (holds_shunt(s), rule_count(s)))
        .or(seen.first())
        .map_or(Backend::Nft, |(b, _)| *b)
}

/// Whether the kernel has IPv6 on in the namespace (`/proc/sys/net` shows the namespace of
/// the thread that opens it).
pub fn ipv6_kernel_enabled(ns: Option<&Netns>) -> Result<bool, netns::NetnsError> {
    netns::run_in(ns, || {
        std::fs::read_to_string("/proc/sys/net/ipv6/conf/all/disable_ipv6")
            .map(|s| s.trim() == "0")
            .unwrap_or(false)
    })
}

/// IPv6 is usable when the namespace has it enabled and ip6tables is installed.
fn ipv6_enabled(
    choice: Ipv6,
    backend: Backend,
    ns: Option<&Netns>,
) -> Result<bool, NetfilterError> {
    match choice {
        Ipv6::On => Ok(true),
        Ipv6::Off => Ok(false),
        Ipv6::Auto => {
            let kernel = ipv6_kernel_enabled(ns)?;
            let tools = backend.available(Family::V6);
            if kernel && !tools {
                tracing::warn!(
                    "IPv6 is enabled but {} is missing: IPv6 traffic will not be captured",
                    backend.tool(Family::V6, "restore")
                );
            }
            Ok(kernel && tools)
        }
    }
}

impl Target {
    pub fn resolve(cfg: &CaptureConfig) -> Result<Target, crate::Error> {
        let (netns, lock) = open_locked(cfg)?;
        let (backend, v4) = choose_backend(cfg.backend, netns.as_ref())?;
        let ipv6 = ipv6_enabled(cfg.ipv6, backend, netns.as_ref())?;
        Ok(Target {
            netns,
            _lock: lock,
            backend,
            ipv6,
            v4,
        })
    }

    fn ns(&self) -> Option<&Netns> {
        self.netns.as_ref()
    }

    fn families(&self) -> Vec<Family> {
        if self.ipv6 {
            vec![Family::V4, Family::V6]
        } else {
            vec![Family::V4]
        }
    }

    /// Reads what is installed now, for each family in play (in parallel).
    fn read(&mut self, families: &[Family]) -> Result<Vec<FamilyState>, NetfilterError> {
        let mut kept = self.v4.take();
        let to_read: Vec<(Backend, Family)> = families
            .iter()
            .filter(|f| !(**f == Family::V4 && kept.is_some()))
            .map(|f| (self.backend, *f))
            .collect();
        // save_all returns one save per family asked, in order; the kept IPv4 one fills its gap.
        let mut fresh = netfilter::save_all(&to_read, self.ns())?.into_iter();
        families
            .iter()
            .map(|&family| {
                let saved = if family == Family::V4 {
                    kept.take()
                } else {
                    None
                };
                let saved =
                    saved
                        .or_else(|| fresh.next())
                        .ok_or_else(|| NetfilterError::MissingTool {
                            tool: self.backend.tool(family, "save"),
                        })?;
                Ok(FamilyState::of(family, &saved))
            })
            .collect()
    }
}

/// Opens the namespace and takes its lock; every child tool from here on is bounded by the
/// same `--wait`.
fn open_locked(cfg: &CaptureConfig) -> Result<(Option<Netns>, netns::Lock), crate::Error> {
    netfilter::set_tool_timeout(cfg.wait);
    let netns = cfg.netns.as_deref().map(Netns::open).transpose()?;
    let lock = netns::lock(netns.as_ref(), cfg.wait)?;
    Ok((netns, lock))
}

/// The tproxy mark installed in a family's rules (read from the chain that sets it).
fn installed_mark(views: &[(TableName, ShuntView)]) -> Option<u32> {
    let (_, mangle) = views.iter().find(|(t, _)| *t == TableName::Mangle)?;
    mangle
        .chains
        .get(plan::DIVERT)?
        .iter()
        .flat_map(|args| args.windows(2))
        .find(|w| w[0] == "--set-xmark")
        .and_then(|w| {
            let m = w[1].split('/').next()?;
            u32::from_str_radix(m.trim_start_matches("0x"), 16).ok()
        })
}

fn desired(plan: &Plan, families: &[Family]) -> Vec<(Family, Vec<(TableName, ShuntView)>)> {
    families
        .iter()
        .map(|&f| {
            let rs = match f {
                Family::V4 => Some(&plan.v4),
                Family::V6 => plan.v6.as_ref(),
            };
            (f, netfilter::planned_views(rs))
        })
        .collect()
}

#[derive(Debug, Serialize)]
pub struct ApplyReport {
    pub backend: Backend,
    pub ipv6: bool,
    pub dry_run: bool,
    /// The restore scripts that ran (or would run), per family; empty when nothing changed.
    pub changes: Vec<(Family, String)>,
}

/// The DNS servers a namespace uses: `ip netns exec` gives a named namespace
/// /etc/netns/NAME/resolv.conf when that exists, everything else sees /etc/resolv.conf.
pub fn resolv_conf_servers(netns: Option<&Path>) -> Vec<IpAddr> {
    let named = netns
        .filter(|p| p.parent() == Some(Path::new("/run/netns")))
        .and_then(|p| p.file_name())
        .map(|name| Path::new("/etc/netns").join(name).join("resolv.conf"))
        .filter(|p| p.exists());
    let path = named.unwrap_or_else(|| "/etc/resolv.conf".into());
    std::fs::read_to_string(path)
        .map(|t| {
            crate::resolv::nameservers(&t)
                .iter()
                .map(|n| n.addr)
                .collect()
        })
        .unwrap_or_default()
}

/// Fills in what the options left to the namespace (the DNS servers), once, at the edge.
pub fn settle(cfg: &CaptureConfig) -> CaptureConfig {
    let mut cfg = cfg.clone();
    if cfg.redirect_dns && !cfg.capture_all_dns && cfg.dns_servers.is_none() {
        let servers = resolv_conf_servers(cfg.netns.as_deref());
        if servers.is_empty() {
            tracing::warn!(
                "--redirect-dns: no nameserver in the namespace's resolv.conf and no \
                 --dns-servers; only --capture-all-dns would capture DNS"
            );
        }
        cfg.dns_servers = Some(servers);
    }
    cfg
}

/// `shunt apply`: converge the namespace to the plan, atomically per family.
pub fn apply(cfg: &CaptureConfig, dry_run: bool) -> Result<ApplyReport, crate::Error> {
    let cfg = &settle(cfg);
    let mut target = Target::resolve(cfg)?;
    let plan = plan::build(cfg, target.ipv6);
    let families = target.families();
    // The ::6 address goes on while the current rules are read.
    let address = (target.ipv6 && !dry_run)
        .then(|| add_inbound_source_v6(target.ns()))
        .transpose()?;
    let current = target.read(&families);
    if let Some(running) = address {
        running.wait().map_err(|e| match e {
            NetfilterError::ToolFailed { stderr, .. } => NetfilterError::InboundSource {
                reason: stderr.trim().trim_end_matches('.').to_string(),
            },
            other => other,
        })?;
    }
    let current = current?;
    let want = desired(&plan, &families);
    let mut report = ApplyReport {
        backend: target.backend,
        ipv6: target.ipv6,
        dry_run,
        changes: Vec::new(),
    };
    if dry_run {
        for (state, (family, views)) in current.iter().zip(&want) {
            if let Some(script) = netfilter::converge(&state.views, views) {
                report.changes.push((*family, script));
            }
        }
        return Ok(report);
    }
    // tproxy: the policy route first, so TPROXY'd packets are delivered from the first one.
    let mut added = Vec::new();
    if let Some(r) = plan.routing {
        for &family in &families {
            if routing::ensure(family, r, target.ns())? {
                tracing::info!(
                    "added {} policy routing: fwmark {:#x} lookup {}, local default dev lo",
                    family.name(),
                    r.mark,
                    r.table
                );
                added.push((family, r));
            }
        }
    }
    match netfilter::apply_families(target.backend, target.ns(), &current, &want) {
        Ok(applied) => report.changes = applied.scripts,
        Err(e) => {
            // Nothing half-applied: take back the routing this run added.
            for (family, r) in added {
                let _ = routing::remove(family, r, target.ns());
            }
            return Err(e.into());
        }
    }
    // The policy routing of a mark the rules no longer use (tproxy -> redirect, or a new
    // --tproxy-mark / --tproxy-route-table) goes with them.
    for state in &current {
        if let Some(old) = installed_mark(&state.views) {
            for r in routing::remove_mark(state.family, old, None, plan.routing, target.ns())? {
                tracing::info!(
                    "removed stale {} policy routing: fwmark {:#x} lookup {}",
                    state.family.name(),
                    r.mark,
                    r.table
                );
            }
        }
    }
    Ok(report)
}

/// The proxy reaches the app from ::6 (SPEC §3 item 5); the kernel only lets it bind an
/// address that is configured, so put it on `lo`. `replace` makes this idempotent.
fn add_inbound_source_v6(ns: Option<&Netns>) -> Result<netfilter::Running, NetfilterError> {
    let addr = format!("{INBOUND_SOURCE_V6}/128");
    netfilter::spawn_tool(
        "ip",
        &["-6", "addr", "replace", &addr, "dev", "lo"],
        None,
        ns,
    )
}

#[derive(Debug, Serialize)]
pub struct CleanReport {
    pub removed: Vec<(Backend, Family, String)>,
}

/// `shunt clean`: remove shunt's chains and jumps, every table, both families; with
/// `--backend auto` from every backend that has them, and the tproxy policy routing of
/// whatever mark the rules used. Nothing else is touched. One part failing (a family whose
/// tools are missing, say) does not stop the others: every error is reported at the end.
pub fn clean(cfg: &CaptureConfig) -> Result<CleanReport, crate::Error> {
    let (netns, _lock) = open_locked(cfg)?;
    let ns = netns.as_ref();
    let backends: Vec<Backend> = match cfg.backend {
        BackendChoice::Legacy => vec![Backend::Legacy],
        BackendChoice::Nft => vec![Backend::Nft],
        BackendChoice::Auto => [Backend::Nft, Backend::Legacy]
            .into_iter()
            .filter(|b| b.available(Family::V4))
            .collect(),
    };
    if backends.is_empty() {
        return Err(NetfilterError::MissingTool {
            tool: "iptables-nft-restore or iptables-legacy-restore".into(),
        }
        .into());
    }
    let mut report = CleanReport { removed: vec![] };
    let mut errors: Vec<String> = Vec::new();
    // The marks whose policy routing goes once the rules are gone. One plan uses one mark
    // for both families, so a mark read from either is removed from both: a family whose
    // rules could not be read still loses its routing.
    let mut marks: Vec<u32> = Vec::new();
    if cfg.mode == Mode::Tproxy {
        marks.push(cfg.tproxy_mark);
    }
    for backend in backends {
        for family in [Family::V4, Family::V6] {
            if cfg.backend == BackendChoice::Auto && !backend.available(family) {
                continue;
            }
            match clean_family(backend, family, ns) {
                Ok((script, mark)) => {
                    marks.extend(mark);
                    report.removed.extend(script.map(|s| (backend, family, s)));
                }
                Err(e) => errors.push(format!("{} {}: {e}", backend.name(), family.name())),
            }
        }
    }
    marks.sort_unstable();
    marks.dedup();
    for (family, mark) in [Family::V4, Family::V6]
        .into_iter()
        .flat_map(|f| marks.iter().map(move |m| (f, *m)))
    {
        let also =
            (cfg.mode == Mode::Tproxy && mark == cfg.tproxy_mark).then_some(cfg.tproxy_route_table);
        match routing::remove_mark(family, mark, also, None, ns) {
            Ok(removed) => {
                for r in removed {
                    tracing::info!(
                        "removed {} policy routing: fwmark {:#x} lookup {}",
                        family.name(),
                        r.mark,
                        r.table
                    );
                }
            }
            // A kernel without IPv6 has no IPv6 routing to remove.
            Err(NetfilterError::ToolFailed { stderr, .. })
                if family == Family::V6 && stderr.contains("not supported") => {}
            Err(e) => errors.push(format!("{} policy routing: {e}", family.name())),
        }
    }
    if errors.is_empty() {
        Ok(report)
    } else {
        Err(NetfilterError::Incomplete { errors }.into())
    }
}

/// Converges one family of one backend to nothing: the script that ran (if any) and the
/// tproxy mark its rules used (if any).
fn clean_family(
    backend: Backend,
    family: Family,
    ns: Option<&Netns>,
) -> Result<(Option<String>, Option<u32>), NetfilterError> {
    let saved = netfilter::save(backend, family, ns)?;
    let state = FamilyState::of(family, &saved);
    let mark = installed_mark(&state.views);
    let empty = [(family, netfilter::planned_views(None))];
    let applied = netfilter::apply_families(backend, ns, std::slice::from_ref(&state), &empty)?;
    Ok((applied.scripts.into_iter().next().map(|(_, s)| s), mark))
}

#[derive(Debug, Serialize)]
pub struct CheckReport {
    pub backend: Backend,
    pub ipv6: bool,
    /// A unified-style diff per family (`-` installed only, `+` planned only); empty = in sync.
    pub drift: Vec<(Family, Vec<String>)>,
}

impl CheckReport {
    pub fn in_sync(&self) -> bool {
        self.drift.is_empty()
    }
}

/// `shunt check`: the installed rules versus the plan for these options.
pub fn check(cfg: &CaptureConfig) -> Result<CheckReport, crate::Error> {
    let cfg = &settle(cfg);
    let mut target = Target::resolve(cfg)?;
    let plan = plan::build(cfg, target.ipv6);
    // Read both families: IPv6 rules left behind while IPv6 is off are drift too.
    let all = [Family::V4, Family::V6];
    let families: Vec<Family> = all
        .into_iter()
        .filter(|f| *f == Family::V4 || target.ipv6 || target.backend.available(*f))
        .collect();
    let current = target.read(&families)?;
    let want = desired(&plan, &families);
    let mut drift = Vec::new();
    for (state, (family, views)) in current.iter().zip(&want) {
        let mut lines = diff(&view_lines(&state.views), &view_lines(views));
        if let (Some(r), true) = (plan.routing, *family == Family::V4 || target.ipv6) {
            let (rule, route) = routing::present(*family, r, target.ns())?;
            if !rule {
                lines.push(format!(
                    "+ ip rule: fwmark {:#x} lookup {}",
                    r.mark, r.table
                ));
            }
            if !route {
                lines.push(format!(
                    "+ ip route: local default dev lo table {}",
                    r.table
                ));
            }
        }
        if !lines.is_empty() {
            drift.push((*family, lines));
        }
    }
    Ok(CheckReport {
        backend: target.backend,
        ipv6: target.ipv6,
        drift,
    })
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

/// A minimal line diff (longest common subsequence): `-` lines only in `a`, `+` only in `b`.
fn diff(a: &[String], b: &[String]) -> Vec<String> {
    if a == b {
        return Vec::new();
    }
    let (n, m) = (a.len(), b.len());
    let mut lcs = vec![vec![0u32; m + 1]; n + 1];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j, mut out) = (0, 0, Vec::new());
    while i < n || j < m {
        if i < n && j < m && a[i] == b[j] {
            i += 1;
            j += 1;
        } else if i < n && (j == m || lcs[i + 1][j] >= lcs[i][j + 1]) {
            out.push(format!("- {}", a[i]));
            i += 1;
        } else {
            out.push(format!("+ {}", b[j]));
            j += 1;
        }
    }
    out
}

/// The drift report as text: one block per family.
pub fn drift_text(report: &CheckReport) -> String {
    let mut s = String::new();
    for (family, lines) in &report.drift {
        let _ = writeln!(
            s,
            "{} ({} backend): installed (-) vs plan (+)",
            family.name(),
            report.backend.name()
        );
        for l in lines {
            let _ = writeln!(s, "  {l}");
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::diff;

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn diff_marks_missing_and_extra_lines() {
        assert!(diff(&v(&["a", "b"]), &v(&["a", "b"])).is_empty());
        assert_eq!(
            diff(&v(&["a", "x", "c"]), &v(&["a", "b", "c"])),
            v(&["- x", "+ b"])
        );
        assert_eq!(diff(&v(&[]), &v(&["a"])), v(&["+ a"]));
    }
}
