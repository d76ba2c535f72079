//! The capture commands (apply, clean, check) as library calls: config in, report out.
//! The CLI, the CNI plugin and the tests all call these. What is the same for every engine
//! lives here (the namespace lock, choosing the engine, the tproxy policy routing, the ::6
//! address, the reports); writing, reading back and removing rules is the engine's
//! ([`crate::engine::Engine`]).

use std::borrow::Cow;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::Path;

use serde::Serialize;

use crate::config::{BackendChoice, CaptureConfig, Ipv6, Mode};
use crate::engine::{Engine, EngineKind, Part};
use crate::netfilter::{self, Backend, Iptables, NetfilterError};
use crate::netns::{self, Netns};
use crate::nftables::{self, Nftables};
use crate::plan::{self, Family, INBOUND_SOURCE_V6};
use crate::routing;
use crate::rules::Saved;

/// Where the rules go: the namespace (locked), the engine and the IPv6 decision, settled once.
pub struct Target {
    pub netns: Option<Netns>,
    /// Held from the first read to the last write: one shunt at a time per namespace.
    _lock: netns::Lock,
    pub engine: Box<dyn Engine>,
    pub ipv6: bool,
    /// The look at the other engines, confirmed before anything is written.
    probe: Option<Probe>,
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

/// The iptables backends whose tools are installed, nft first.
fn iptables_available() -> Vec<Backend> {
    [Backend::Nft, Backend::Legacy]
        .into_iter()
        .filter(|b| b.available(Family::V4))
        .collect()
}

/// Whether `nft` is installed (the nftables engine needs it; nothing else does).
fn nft_available() -> bool {
    netfilter::find_tool("nft").is_some()
}

/// The look for shunt's rules in the other engines, started early so it runs beside the
/// engine's own read; [`Probe::finish`] refuses to write with one engine while shunt's rules
/// sit in another (two engines would both capture, in an order only hook priorities decide).
struct Probe {
    nft: Option<nftables::Reading>,
    saves: Vec<(EngineKind, netfilter::Running)>,
}

/// What the kernel lists of the namespace's tables, asked in one visit to it: the nf_tables
/// tables (`None`: it would not say), and whether legacy iptables holds no IPv4 table.
struct Look {
    tables: Option<Vec<crate::netlink::Table>>,
    legacy_v4_empty: bool,
}

impl Look {
    fn take(ns: Option<&Netns>) -> Look {
        netns::run_in(ns, || Look {
            tables: crate::netlink::tables_here(),
            legacy_v4_empty: netfilter::legacy_empty_here(Family::V4),
        })
        .unwrap_or(Look {
            tables: None,
            legacy_v4_empty: false,
        })
    }

    /// Whether `backend` certainly holds no IPv4 table.
    fn empty(&self, backend: Backend) -> bool {
        match backend {
            Backend::Nft => netfilter::nft_family_empty(self.tables.as_deref(), Family::V4),
            Backend::Legacy => self.legacy_v4_empty,
        }
    }
}

impl Probe {
    /// For an iptables engine: is shunt's nftables table there?
    fn of_nftables(ns: Option<&Netns>) -> Result<Probe, NetfilterError> {
        Ok(Probe {
            nft: nft_available().then(|| nftables::list(ns)).transpose()?,
            saves: Vec::new(),
        })
    }

    /// For the nftables engine: do the iptables backends hold shunt's chains? A backend
    /// with no table at all (`look`) is not looked for on PATH either.
    fn of_iptables(ns: Option<&Netns>, look: &Look) -> Result<Probe, NetfilterError> {
        let mut saves = Vec::new();
        for b in [Backend::Nft, Backend::Legacy] {
            if look.empty(b) || !b.available(Family::V4) {
                continue;
            }
            let save = netfilter::spawn_tool(&b.tool(Family::V4, "save"), &[], None, ns)?;
            saves.push((b.into(), save));
        }
        Ok(Probe { nft: None, saves })
    }

    /// The engine that holds shunt's rules besides the wanted one, if any.
    fn finish(self) -> Result<Option<EngineKind>, NetfilterError> {
        let mut held = None;
        if let Some(reading) = self.nft {
            // A failing read is no table either: the probe only refuses on rules it saw.
            if let Ok(Some(_)) = reading.finish() {
                held = Some(EngineKind::Nftables);
            }
        }
        for (kind, run) in self.saves {
            let text = run.wait()?;
            let saved = crate::rules::parse(&text).map_err(|source| NetfilterError::Parse {
                tool: format!("iptables-{}-save", kind.name()),
                source,
            })?;
            if holds_shunt(&saved) {
                held.get_or_insert(kind);
            }
        }
        Ok(held)
    }
}

fn other_engine(wanted: EngineKind, held: EngineKind) -> NetfilterError {
    NetfilterError::OtherEngine {
        wanted: wanted.name(),
        held: held.name(),
    }
}

/// SPEC §2 `--backend`: the engine to use in that namespace. `auto` picks shunt's native
/// nftables table when it is already there, or when no iptables is installed at all; else
/// the iptables backend that already holds rules (shunt's first, then the one with more
/// rules), else nft, else legacy, warning when both hold rules. Returns the IPv4 save read
/// on the way, so it is not read twice, and, for an explicit engine, the probe of the others.
fn choose_engine(
    choice: BackendChoice,
    ns: Option<&Netns>,
) -> Result<(EngineKind, Kept, Option<Probe>), NetfilterError> {
    let kind = match choice {
        BackendChoice::Legacy => backend_available(Backend::Legacy).map(|()| EngineKind::Legacy)?,
        BackendChoice::Nft => backend_available(Backend::Nft).map(|()| EngineKind::Nft)?,
        BackendChoice::Nftables => EngineKind::Nftables,
        BackendChoice::Auto => {
            let iptables = iptables_available();
            // shunt's nftables table is looked for beside the iptables reads, and what is
            // found is handed to the engine, not read again.
            let nft = nft_available().then(|| nftables::list(ns)).transpose()?;
            let which: Vec<(Backend, Family)> = iptables.iter().map(|b| (*b, Family::V4)).collect();
            let saves = netfilter::save_all(&which, ns);
            if let Some(reading) = nft {
                let listing = reading.finish()?;
                if iptables.is_empty() || listing.is_some() {
                    return Ok((EngineKind::Nftables, Kept::Listing(listing), None));
                }
            }
            if iptables.is_empty() {
                return Err(NetfilterError::MissingTool {
                    tool: "iptables-nft-restore, iptables-legacy-restore or nft".into(),
                });
            }
            let seen: Vec<(Backend, Saved)> = iptables.into_iter().zip(saves?).collect();
            if seen.iter().filter(|(_, s)| s.has_rules()).count() > 1 {
                tracing::warn!(
                    "both the nft and the legacy iptables backends hold rules in this namespace; \
                     mixing them makes packet paths hard to predict (see `iptables-legacy-save` \
                     and `iptables-nft-save`)"
                );
            }
            let pick = pick_backend(&seen);
            let saved = seen.into_iter().find(|(b, _)| *b == pick).map(|(_, s)| s);
            tracing::debug!(backend = pick.name(), "backend chosen");
            return Ok((pick.into(), saved.map_or(Kept::Nothing, Kept::Save), None));
        }
    };
    if kind != EngineKind::Nftables {
        return Ok((kind, Kept::Nothing, Some(Probe::of_nftables(ns)?)));
    }
    // One visit answers for the probe and for the engine: when the kernel has just said
    // there is no `inet shunt`, the engine does not ask again.
    let look = Look::take(ns);
    let kept = match nftables::absent_from(look.tables.as_deref()) {
        true => Kept::Listing(None),
        false => Kept::Nothing,
    };
    Ok((kind, kept, Some(Probe::of_iptables(ns, &look)?)))
}

/// What choosing the engine already read, handed to the engine so it is not read twice.
enum Kept {
    Nothing,
    /// The chosen iptables backend's IPv4 save.
    Save(Saved),
    /// shunt's nftables table as listed (`None`: there is none).
    Listing(Option<String>),
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

/// IPv6 is usable when the namespace has it enabled and the engine's IPv6 tools exist.
fn ipv6_enabled(
    choice: Ipv6,
    kind: EngineKind,
    ns: Option<&Netns>,
) -> Result<bool, NetfilterError> {
    match choice {
        Ipv6::On => Ok(true),
        Ipv6::Off => Ok(false),
        Ipv6::Auto => {
            let kernel = ipv6_kernel_enabled(ns)?;
            let tools = match kind {
                EngineKind::Nftables => true,
                EngineKind::Legacy => Backend::Legacy.available(Family::V6),
                EngineKind::Nft => Backend::Nft.available(Family::V6),
            };
            if kernel && !tools {
                tracing::warn!(
                    "IPv6 is enabled but ip6tables-{}-restore is missing: IPv6 traffic will not \
                     be captured",
                    kind.name()
                );
            }
            Ok(kernel && tools)
        }
    }
}

/// Builds the engine of `kind` for the namespace.
fn engine(
    kind: EngineKind,
    ns: Option<&Netns>,
    ipv6: bool,
    strict: bool,
    kept: Kept,
) -> Result<Box<dyn Engine>, NetfilterError> {
    let (kept, listing) = match kept {
        Kept::Nothing => (None, None),
        Kept::Save(s) => (Some(s), None),
        Kept::Listing(l) => (None, Some(l)),
    };
    Ok(match kind {
        EngineKind::Nftables => Box::new(Nftables::new(ns.cloned(), listing)?),
        EngineKind::Legacy => Box::new(Iptables::new(
            Backend::Legacy,
            ns.cloned(),
            ipv6,
            strict,
            kept,
        )),
        EngineKind::Nft => Box::new(Iptables::new(Backend::Nft, ns.cloned(), ipv6, strict, kept)),
    })
}

impl Target {
    pub fn resolve(cfg: &CaptureConfig) -> Result<Target, crate::Error> {
        let (netns, lock) = open_locked(cfg)?;
        let (kind, kept, probe) = choose_engine(cfg.backend, netns.as_ref())?;
        let ipv6 = ipv6_enabled(cfg.ipv6, kind, netns.as_ref())?;
        let engine = engine(kind, netns.as_ref(), ipv6, true, kept)?;
        Ok(Target {
            netns,
            _lock: lock,
            engine,
            ipv6,
            probe,
        })
    }

    /// Fails when another engine holds shunt's rules (see [`Probe`]); with `migrate`, returns
    /// that engine instead, for the caller to empty once its own rules are in.
    fn alone(&mut self, migrate: bool) -> Result<Option<EngineKind>, NetfilterError> {
        let held = self.probe.take().map(Probe::finish).transpose()?.flatten();
        match held {
            Some(held) if !migrate => Err(other_engine(self.engine.kind(), held)),
            other => Ok(other),
        }
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
}

/// Opens the namespace and takes its lock; every child tool from here on is bounded by the
/// same `--wait`.
fn open_locked(cfg: &CaptureConfig) -> Result<(Option<Netns>, netns::Lock), crate::Error> {
    netfilter::set_tool_timeout(cfg.wait);
    let netns = cfg.netns.as_deref().map(Netns::open).transpose()?;
    let lock = netns::lock(netns.as_ref(), cfg.wait)?;
    Ok((netns, lock))
}

#[derive(Debug, Serialize)]
pub struct ApplyReport {
    /// The engine (`legacy`, `nft`, `nftables`).
    pub backend: EngineKind,
    pub ipv6: bool,
    pub dry_run: bool,
    /// The scripts that ran (or would run), per part; empty when nothing changed.
    pub changes: Vec<(Part, String)>,
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
/// Borrowed when there is nothing to fill in: 10,000 CIDRs are not copied for nothing.
pub fn settle(cfg: &CaptureConfig) -> Cow<'_, CaptureConfig> {
    if !cfg.redirect_dns || cfg.capture_all_dns || cfg.dns_servers.is_some() {
        return Cow::Borrowed(cfg);
    }
    let servers = resolv_conf_servers(cfg.netns.as_deref());
    if servers.is_empty() {
        tracing::warn!(
            "--redirect-dns: no nameserver in the namespace's resolv.conf and no \
             --dns-servers; only --capture-all-dns would capture DNS"
        );
    }
    let mut cfg = cfg.clone();
    cfg.dns_servers = Some(servers);
    Cow::Owned(cfg)
}

/// `shunt apply`: converge the namespace to the plan, all or nothing.
pub fn apply(cfg: &CaptureConfig, dry_run: bool) -> Result<ApplyReport, crate::Error> {
    let cfg = &settle(cfg);
    let mut target = Target::resolve(cfg)?;
    let plan = plan::build(cfg, target.ipv6);
    if target.ipv6 && !dry_run {
        add_inbound_source_v6(target.ns())?;
    }
    let families = target.families();
    let mut old_marks = target.engine.installed_marks()?;
    let migrate_from = target.alone(cfg.migrate)?;
    let mut report = ApplyReport {
        backend: target.engine.kind(),
        ipv6: target.ipv6,
        dry_run,
        changes: Vec::new(),
    };
    if dry_run {
        report.changes = target.engine.converge(&plan, true)?;
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
    match target.engine.converge(&plan, false) {
        Ok(changes) => report.changes = changes,
        Err(e) => {
            // Nothing half-applied: take back the routing this run added.
            for (family, r) in added {
                let _ = routing::remove(family, r, target.ns());
            }
            return Err(e.into());
        }
    }
    // --migrate: the new engine captures now (its NAT runs first, and the first binding a
    // connection gets is kept), so the old engine's rules can go without a gap.
    if let Some(from) = migrate_from {
        let done = engine(from, target.ns(), true, false, Kept::Nothing)?.clean();
        old_marks.extend(done.marks);
        if !done.errors.is_empty() {
            return Err(NetfilterError::Incomplete {
                errors: done.errors,
            }
            .into());
        }
        tracing::info!(
            "migrated: shunt's rules moved from the {} engine to {}",
            from.name(),
            target.engine.kind().name()
        );
    }
    // The policy routing of a mark the rules no longer use (tproxy -> redirect, or a new
    // --tproxy-mark / --tproxy-route-table) goes with them.
    for &family in &families {
        for &old in &old_marks {
            for r in routing::remove_mark(family, old, None, plan.routing, target.ns())? {
                tracing::info!(
                    "removed stale {} policy routing: fwmark {:#x} lookup {}",
                    family.name(),
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
fn add_inbound_source_v6(ns: Option<&Netns>) -> Result<(), NetfilterError> {
    let addr = INBOUND_SOURCE_V6.parse().expect("a literal address");
    crate::netlink::replace_address_v6(ns, "lo", addr, 128)?.map_err(|e| {
        NetfilterError::InboundSource {
            reason: e.to_string(),
        }
    })
}

#[derive(Debug, Serialize)]
pub struct CleanReport {
    pub removed: Vec<(EngineKind, Part, String)>,
}

/// `shunt clean`: remove shunt's rules, every table, both families; with `--backend auto`
/// from every engine that has them, and the tproxy policy routing of whatever mark the rules
/// used. Nothing else is touched. One part failing (a family whose tools are missing, say)
/// does not stop the others: every error is reported at the end.
pub fn clean(cfg: &CaptureConfig) -> Result<CleanReport, crate::Error> {
    let (netns, _lock) = open_locked(cfg)?;
    let ns = netns.as_ref();
    let mut kinds: Vec<EngineKind> = match cfg.backend {
        BackendChoice::Legacy => vec![EngineKind::Legacy],
        BackendChoice::Nft => vec![EngineKind::Nft],
        BackendChoice::Nftables => vec![EngineKind::Nftables],
        BackendChoice::Auto => iptables_available()
            .into_iter()
            .map(EngineKind::from)
            .collect(),
    };
    if cfg.backend == BackendChoice::Auto && nft_available() {
        kinds.push(EngineKind::Nftables);
    }
    if kinds.is_empty() {
        return Err(NetfilterError::MissingTool {
            tool: "iptables-nft-restore, iptables-legacy-restore or nft".into(),
        }
        .into());
    }
    let strict = cfg.backend != BackendChoice::Auto;
    let mut report = CleanReport { removed: vec![] };
    let mut errors: Vec<String> = Vec::new();
    // The marks whose policy routing goes once the rules are gone. One plan uses one mark
    // for both families, so a mark read from either is removed from both: a family whose
    // rules could not be read still loses its routing.
    let mut marks: Vec<u32> = Vec::new();
    if cfg.mode == Mode::Tproxy {
        marks.push(cfg.tproxy_mark);
    }
    for kind in kinds {
        match engine(kind, ns, true, strict, Kept::Nothing) {
            Ok(mut e) => {
                let done = e.clean();
                marks.extend(done.marks);
                errors.extend(done.errors);
                report
                    .removed
                    .extend(done.removed.into_iter().map(|(p, s)| (kind, p, s)));
            }
            Err(e) => errors.push(format!("{}: {e}", kind.name())),
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

#[derive(Debug, Serialize)]
pub struct CheckReport {
    pub backend: EngineKind,
    pub ipv6: bool,
    /// A unified-style diff per part (`-` installed only, `+` planned only); empty = in sync.
    pub drift: Vec<(Part, Vec<String>)>,
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
    let mut drift = target.engine.drift(&plan)?;
    target.alone(false)?;
    if let Some(r) = plan.routing {
        for family in target.families() {
            let (rule, route) = routing::present(family, r, target.ns())?;
            let mut lines = Vec::new();
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
            if lines.is_empty() {
                continue;
            }
            match drift.iter_mut().find(|(p, _)| *p == family.into()) {
                Some((_, l)) => l.extend(lines),
                None => drift.push((family.into(), lines)),
            }
        }
    }
    Ok(CheckReport {
        backend: target.engine.kind(),
        ipv6: target.ipv6,
        drift,
    })
}

/// The drift report as text: one block per part.
pub fn drift_text(report: &CheckReport) -> String {
    let mut s = String::new();
    for (part, lines) in &report.drift {
        let _ = writeln!(
            s,
            "{} ({} engine): installed (-) vs plan (+)",
            part.name(),
            report.backend.name()
        );
        for l in lines {
            let _ = writeln!(s, "  {l}");
        }
    }
    s
}
