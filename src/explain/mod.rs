//! Why did traffic stop flowing? `shunt explain`, `shunt doctor` and `shunt validate`
//! (SPEC §6).
//!
//! - [`matches`] turns a saved rule's arguments into typed matches and a target;
//! - [`eval`] walks a packet through them as netfilter does (pure: the namespace's addresses
//!   and routes come in as a [`Host`]);
//! - [`report`] prints the result as text or a Mermaid flowchart;
//! - this module is the system edge: where the rules and the host come from, and the CLI;
//! - [`doctor`] and [`validate`] check a namespace's capture set-up and prove it with a real
//!   connection.

pub mod doctor;
pub mod eval;
pub mod matches;
pub mod nft;
pub mod report;
pub mod validate;

use std::io::Read as _;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

pub use doctor::{run_doctor, DoctorArgs};
pub use eval::{
    explain, Direction, Explanation, Host, HostAddr, Proto, Query, Route, Tables, Verdict,
};
pub use validate::{run_validate, ValidateArgs};

pub use crate::config::CaptureArgs;
use crate::config::{self, BackendChoice, CaptureConfig};
use crate::netfilter::{self, Backend};
use crate::netns::{self, Netns};
use crate::plan::{self, Family};
use crate::rules::{self, Saved};
use crate::{exit, render};

#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    /// A bad argument: the command exits 2 (usage) after saying which value and why.
    #[error("invalid value '{value}' for {option}: {reason}")]
    Usage {
        option: &'static str,
        value: String,
        reason: String,
    },
    #[error("cannot read rules from {path}: {reason}")]
    Rules { path: PathBuf, reason: String },
    #[error("{0}")]
    Failed(String),
}

fn usage(option: &'static str, value: &str, reason: impl Into<String>) -> ExplainError {
    ExplainError::Usage {
        option,
        value: value.to_string(),
        reason: reason.into(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ExplainFormat {
    #[default]
    Text,
    Json,
    Mermaid,
}

/// Flags of `shunt explain` (SPEC §6).
#[derive(Debug, Clone, clap::Args)]
#[command(
    after_help = "Where the rules come from: --netns reads the namespace's rules (the \
iptables backend that holds them and, with --backend auto or nftables, every native nftables \
table, walked by hook priority); --rules reads iptables-save text (a file, or - for stdin); \
with neither, the plan that the given capture options would install.\n\n\
Examples:\n  shunt explain --netns /run/netns/pod out tcp 10.96.0.10:443 --uid 1000\n  \
shunt explain --netns /run/netns/pod in tcp 10.200.0.2:8080 --src 10.200.0.1 --json\n  \
iptables-save | shunt explain --rules - out tcp 1.2.3.4:80 --uid 1000 --iface eth0\n  \
shunt explain --exclude-outbound-ports 22 out tcp 10.0.0.1:22 --uid 1000 --format mermaid\n\n\
Exit codes: 0 explained (whatever the verdict), 1 the rules could not be read, 2 bad usage."
)]
pub struct ExplainArgs {
    /// out: sent by a process in the namespace; in: arriving from another host
    #[arg(value_enum)]
    pub direction: Direction,
    /// Protocol of the packet
    #[arg(value_enum)]
    pub protocol: Proto,
    /// Destination, ADDR:PORT ([ADDR]:PORT for IPv6)
    #[arg(value_name = "ADDR:PORT")]
    pub destination: String,
    /// Read iptables-save text from FILE ('-' for stdin) instead of a namespace or the plan
    #[arg(long, value_name = "FILE")]
    pub rules: Option<PathBuf>,
    /// Source address (and port); default: the one the kernel would pick (out), unknown (in)
    #[arg(long, value_name = "ADDR[:PORT]")]
    pub src: Option<String>,
    /// Sending uid (number or name) for owner matches; unknown when not given
    #[arg(long, value_name = "UID")]
    pub uid: Option<String>,
    /// Sending gid (number or name) for owner matches; unknown when not given
    #[arg(long, value_name = "GID")]
    pub gid: Option<String>,
    /// Output interface (out) or input interface (in); default: from the routes
    #[arg(long, visible_aliases = ["oif", "iif"], value_name = "IF")]
    pub iface: Option<String>,
    /// The packet's firewall mark when it starts
    #[arg(long, value_name = "MARK", default_value = "0")]
    pub mark: String,
    /// Conntrack state of the packet: NEW (a first packet), ESTABLISHED, RELATED, INVALID
    #[arg(long, value_name = "STATE", default_value = "NEW")]
    pub ctstate: String,
    /// Output format
    #[arg(long, value_enum, default_value_t)]
    pub format: ExplainFormat,
    /// Shorthand for --format json
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub capture: CaptureArgs,
}

/// Where the rules of an explanation came from, and what is known about the namespace.
pub struct Loaded {
    pub tables: Tables,
    pub host: Host,
    /// e.g. `nft backend in /run/netns/pod`, `file rules.txt`, `plan`.
    pub source: String,
    pub notes: Vec<String>,
}

fn family_of(ip: IpAddr) -> Family {
    if ip.is_ipv4() {
        Family::V4
    } else {
        Family::V6
    }
}

/// Splits iptables-save text that holds both families (IPv4 blocks first, as `render` and
/// Istio's goldens print them): a table name seen twice starts the IPv6 part.
pub fn split_families(saved: Saved) -> (Saved, Option<Saved>) {
    let mut v4 = Saved::default();
    let mut v6 = Saved::default();
    for t in saved.tables {
        if v6.tables.is_empty() && !v4.tables.iter().any(|x| x.name == t.name) {
            v4.tables.push(t);
        } else {
            v6.tables.push(t);
        }
    }
    if v6.tables.is_empty() {
        (v4, None)
    } else {
        (v4, Some(v6))
    }
}

/// Parses rules text leniently: lines outside a table that are not a table header (a tool's
/// banner such as `iptables-save`) are skipped. `iptables-save` output goes through the
/// shared parser; when that refuses the text, it is read as an `iptables-restore` script
/// (`-N`, `-I CHAIN [N]`, `-P`, `-D`, `-F`, `-X`, as Istio's goldens are written) and
/// replayed in order.
pub fn parse_rules_text(text: &str) -> Result<Saved, rules::ParseError> {
    let mut kept = String::new();
    let mut inside = false;
    for line in text.lines() {
        let l = line.trim();
        if l.starts_with('*') {
            inside = true;
        }
        if inside || l.starts_with('#') {
            kept.push_str(line);
        }
        kept.push('\n');
        if l == "COMMIT" {
            inside = false;
        }
    }
    rules::parse(&kept).or_else(|strict| parse_restore_script(&kept).map_err(|_| strict))
}

/// Replays an `iptables-restore` script into the tables it would leave behind.
pub fn parse_restore_script(text: &str) -> Result<Saved, rules::ParseError> {
    use crate::rules::{SavedRule, SavedTable};
    let mut saved = Saved::default();
    let mut cur: Option<SavedTable> = None;
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        let err = |reason: &str| rules::ParseError {
            line: i + 1,
            reason: format!("{reason}: {line:?}"),
        };
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(name) = line.strip_prefix('*') {
            cur = Some(SavedTable {
                name: name.trim().to_string(),
                ..Default::default()
            });
            continue;
        }
        if line == "COMMIT" {
            saved
                .tables
                .push(cur.take().ok_or_else(|| err("COMMIT outside a table"))?);
            continue;
        }
        let t = cur.as_mut().ok_or_else(|| err("rule outside a table"))?;
        let declare = |t: &mut SavedTable, name: &str, policy: &str| match t
            .chains
            .iter_mut()
            .find(|(n, _)| n == name)
        {
            Some(c) => c.1 = policy.to_string(),
            None => t.chains.push((name.to_string(), policy.to_string())),
        };
        if let Some(decl) = line.strip_prefix(':') {
            let mut p = decl.split_whitespace();
            let name = p.next().ok_or_else(|| err("chain without a name"))?;
            declare(t, name, p.next().unwrap_or("-"));
            continue;
        }
        let mut args = rules::tokenize(line).map_err(|e| err(&e))?;
        if args.first().is_some_and(|a| a.starts_with('[')) {
            args.remove(0);
        }
        if args.len() < 2 {
            return Err(err("expected a command and a chain"));
        }
        let chain = args[1].clone();
        let rest = args.split_off(2);
        // Rule positions within `chain`, in table order.
        let positions: Vec<usize> = (0..t.rules.len())
            .filter(|&k| t.rules[k].chain == chain)
            .collect();
        match args[0].as_str() {
            "-A" | "--append" => t.rules.push(SavedRule { chain, args: rest }),
            "-I" | "--insert" => {
                let (n, rule) = match rest.first().and_then(|a| a.parse::<usize>().ok()) {
                    Some(n) => (n.max(1), rest[1..].to_vec()),
                    None => (1, rest),
                };
                let at = positions
                    .get(n - 1)
                    .copied()
                    .unwrap_or_else(|| positions.last().map_or(t.rules.len(), |p| p + 1));
                t.rules.insert(at, SavedRule { chain, args: rule });
            }
            "-D" | "--delete" => {
                let k = match rest.first().and_then(|a| a.parse::<usize>().ok()) {
                    Some(n) if rest.len() == 1 => positions.get(n.wrapping_sub(1)).copied(),
                    _ => positions.into_iter().find(|&k| t.rules[k].args == rest),
                };
                if let Some(k) = k {
                    t.rules.remove(k);
                }
            }
            "-N" | "--new-chain" => declare(t, &chain, "-"),
            "-P" | "--policy" => declare(t, &chain, rest.first().map_or("ACCEPT", |p| p)),
            "-F" | "--flush" => t.rules.retain(|r| r.chain != chain),
            "-X" | "--delete-chain" => t.chains.retain(|(n, _)| *n != chain),
            _ => return Err(err("expected -A, -I, -D, -N, -P, -F or -X")),
        }
    }
    if cur.is_some() {
        return Err(rules::ParseError {
            line: text.lines().count(),
            reason: "missing COMMIT at end of input".into(),
        });
    }
    Ok(saved)
}

/// Does any address in the rules belong to `family`? (`None` when no rule names one.)
fn rules_family(saved: &Saved) -> Option<Family> {
    for t in &saved.tables {
        for r in &t.rules {
            for w in r.args.windows(2) {
                if matches!(w[0].as_str(), "-s" | "-d" | "--source" | "--destination") {
                    if let Ok(n) = w[1].parse::<ipnet::IpNet>() {
                        return Some(match n {
                            ipnet::IpNet::V4(_) => Family::V4,
                            ipnet::IpNet::V6(_) => Family::V6,
                        });
                    }
                }
            }
        }
    }
    None
}

fn read_rules_file(path: &Path) -> Result<String, ExplainError> {
    let err = |e: std::io::Error| ExplainError::Rules {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    if path == Path::new("-") {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s).map_err(err)?;
        Ok(s)
    } else {
        std::fs::read_to_string(path).map_err(err)
    }
}

/// The saved rules for one family from a rules file.
pub fn rules_from_text(
    text: &str,
    family: Family,
    path: &Path,
) -> Result<(Saved, Vec<String>), ExplainError> {
    let saved = parse_rules_text(text).map_err(|e| ExplainError::Rules {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let mut notes = Vec::new();
    let (v4, v6) = split_families(saved);
    let chosen = match (family, v6) {
        (Family::V4, _) => v4,
        (Family::V6, Some(v6)) => v6,
        (Family::V6, None) => {
            if rules_family(&v4) == Some(Family::V4) {
                notes.push(format!(
                    "{} holds IPv4 rules only: no ip6tables rules apply to this IPv6 packet",
                    path.display()
                ));
                Saved::default()
            } else {
                v4
            }
        }
    };
    Ok((chosen, notes))
}

/// The native nftables tables of the namespace that see `family` (`nft -j list ruleset`),
/// iptables-nft's own tables left out.
pub fn native_tables(
    family: Family,
    ns: Option<&Netns>,
) -> Result<Vec<eval::NftTable>, crate::Error> {
    let text = netfilter::spawn_tool("nft", &["-j", "list", "ruleset"], None, ns)?.wait()?;
    let doc: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| ExplainError::Failed(format!("cannot read `nft -j list ruleset`: {e}")))?;
    nft::tables_from_json(&doc, family)
        .map_err(|e| ExplainError::Failed(format!("cannot read `nft -j list ruleset`: {e}")).into())
}

/// The rules the namespace holds for `family`: from the iptables backend that holds rules
/// (as `--backend auto` picks it), or from both, layered, when both do (the kernel runs
/// both); with `auto` and `nftables`, also every native nftables table, whose base chains
/// run at their priorities between iptables' tables.
pub fn rules_from_namespace(
    backend: BackendChoice,
    family: Family,
    ns: Option<&Netns>,
) -> Result<(Tables, String, Vec<String>), crate::Error> {
    let mut notes = Vec::new();
    let all = || -> Vec<Backend> {
        [Backend::Nft, Backend::Legacy]
            .into_iter()
            .filter(|b| b.available(family))
            .collect()
    };
    let candidates: Vec<Backend> = match backend {
        BackendChoice::Legacy => vec![Backend::Legacy],
        BackendChoice::Nft => vec![Backend::Nft],
        BackendChoice::Nftables | BackendChoice::Auto => all(),
    };
    let native: Vec<eval::NftTable> = match backend {
        BackendChoice::Nftables => native_tables(family, ns)?,
        BackendChoice::Auto if netfilter::find_tool("nft").is_some() => {
            match native_tables(family, ns) {
                Ok(t) => t,
                Err(e) => {
                    notes.push(format!("native nftables tables not read: {e}"));
                    Vec::new()
                }
            }
        }
        _ => Vec::new(),
    };
    let native_names: Vec<String> = native.iter().map(|t| t.name.clone()).collect();
    let native_label =
        (!native_names.is_empty()).then(|| format!("nftables ({})", native_names.join(", ")));
    let with_native = |t: Tables, label: String| -> (Tables, String) {
        match &native_label {
            Some(n) if label.is_empty() => (t.with_nft(native.clone()), n.clone()),
            Some(n) => (
                t.with_nft(native.clone()),
                format!("{label} backend and {n}"),
            ),
            None => (t, label),
        }
    };
    let mut seen = Vec::new();
    for b in candidates {
        seen.push((b, netfilter::save(b, family, ns)?));
    }
    if seen.is_empty() {
        if native_label.is_some() {
            let (t, l) = with_native(Tables::default(), String::new());
            return Ok((t, l, notes));
        }
        return Err(ExplainError::Failed(
            "no iptables tools found (iptables-nft-save or iptables-legacy-save)".into(),
        )
        .into());
    }
    let holding: Vec<&(Backend, Saved)> = seen.iter().filter(|(_, s)| s.has_rules()).collect();
    let (tables, label) = match holding.as_slice() {
        [] => {
            if native_label.is_none() {
                notes.push(format!(
                    "the namespace holds no {} rules: every chain's policy decides",
                    family.name()
                ));
            }
            let (b, saved) = &seen[0];
            (Tables::from_saved(saved), b.name().to_string())
        }
        [(b, saved)] => (Tables::from_saved(saved), b.name().to_string()),
        [(a, sa), (b, sb), ..] => {
            notes.push(
                "both the nft and the legacy backends hold rules: the kernel runs both at every \
                 hook (see `shunt doctor`)"
                    .into(),
            );
            let tables = Tables::from_saved(sa)
                .labelled(a.name())
                .then(Tables::from_saved(sb).labelled(b.name()));
            (tables, format!("{} and {}", a.name(), b.name()))
        }
    };
    let label = if holding.is_empty() && native_label.is_some() {
        String::new()
    } else {
        label
    };
    let (tables, label) = with_native(tables, label);
    Ok((tables, label, notes))
}

fn ip_json(args: &[&str], ns: Option<&Netns>) -> Option<serde_json::Value> {
    let out = netns::command("ip", ns)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// Builds a [`Host`] from `ip -j addr` and `ip -j route show table all` output (both
/// families' route lists, IPv4 first).
pub fn host_from_json(
    addrs: &serde_json::Value,
    routes_v4: &serde_json::Value,
    routes_v6: &serde_json::Value,
) -> Host {
    let mut host = Host {
        known: true,
        ..Default::default()
    };
    for link in addrs.as_array().into_iter().flatten() {
        let dev = link["ifname"].as_str().unwrap_or_default().to_string();
        for a in link["addr_info"].as_array().into_iter().flatten() {
            let (Some(local), Some(len)) = (a["local"].as_str(), a["prefixlen"].as_u64()) else {
                continue;
            };
            let Ok(ip) = local.parse::<IpAddr>() else {
                continue;
            };
            if let Ok(net) = ipnet::IpNet::new(ip, len as u8) {
                host.addrs.push(HostAddr {
                    dev: dev.clone(),
                    net,
                    global: a["scope"].as_str() == Some("global"),
                });
            }
        }
    }
    for (routes, v4) in [(routes_v4, true), (routes_v6, false)] {
        for r in routes.as_array().into_iter().flatten() {
            let table = r["table"].as_str().unwrap_or("main");
            if table != "main" && table != "local" {
                host.other_tables = true;
                continue;
            }
            let dst = match r["dst"].as_str() {
                Some("default") | None => {
                    if v4 {
                        "0.0.0.0/0".parse().ok()
                    } else {
                        "::/0".parse().ok()
                    }
                }
                Some(d) => d
                    .parse::<ipnet::IpNet>()
                    .ok()
                    .or_else(|| d.parse::<IpAddr>().ok().map(ipnet::IpNet::from)),
            };
            let Some(dst) = dst else { continue };
            host.routes.push(Route {
                dst,
                kind: r["type"].as_str().unwrap_or("unicast").to_string(),
                local_table: table == "local",
                dev: r["dev"].as_str().map(String::from),
                gateway: r["gateway"].as_str().and_then(|g| g.parse().ok()),
                prefsrc: r["prefsrc"].as_str().and_then(|g| g.parse().ok()),
            });
        }
    }
    host
}

/// The namespace's addresses and routes (`ip -j`), or an unknown host when `ip` fails.
pub fn host_of(ns: Option<&Netns>) -> Host {
    let addrs = ip_json(&["-j", "addr", "show"], ns);
    let r4 = ip_json(&["-j", "-4", "route", "show", "table", "all"], ns);
    let r6 = ip_json(&["-j", "-6", "route", "show", "table", "all"], ns)
        .unwrap_or(serde_json::Value::Array(vec![]));
    match (addrs, r4) {
        (Some(a), Some(r4)) => host_from_json(&a, &r4, &r6),
        _ => Host::default(),
    }
}

/// Loads the rules (namespace, file or plan) and the host for a packet of `family`.
pub fn load(
    cfg: &CaptureConfig,
    rules_file: Option<&Path>,
    family: Family,
) -> Result<Loaded, crate::Error> {
    let ns = cfg.netns.as_deref().map(Netns::open).transpose()?;
    let mut notes = Vec::new();
    let (tables, source) = if let Some(path) = rules_file {
        let text = read_rules_file(path)?;
        let (saved, n) = rules_from_text(&text, family, path)?;
        notes.extend(n);
        (
            Tables::from_saved(&saved),
            format!("rules file {}", path.display()),
        )
    } else if let Some(ns) = &ns {
        let (tables, b, n) = rules_from_namespace(cfg.backend, family, Some(ns))?;
        notes.extend(n);
        let what = if b.contains("nftables (") {
            b
        } else {
            format!("{b} backend")
        };
        (tables, format!("{what} in {}", ns.path().display()))
    } else {
        let plan = plan::build(cfg, cfg.ipv6 != config::Ipv6::Off);
        let rs = match family {
            Family::V4 => Some(&plan.v4),
            Family::V6 => plan.v6.as_ref(),
        };
        let text = rs.map(render::restore_text).unwrap_or_default();
        let saved = rules::parse(&text).map_err(|e| ExplainError::Failed(e.to_string()))?;
        if rs.is_none() {
            notes.push("the plan has no IPv6 rules (--ipv6 off)".into());
        }
        (
            Tables::from_saved(&saved),
            "the plan for these capture options".to_string(),
        )
    };
    // The namespace's own addresses and routes: the one named, or (for the plan, which
    // would be installed here) the current one. A rules file alone comes from elsewhere.
    let host = if ns.is_some() || rules_file.is_none() {
        host_of(ns.as_ref())
    } else {
        Host::default()
    };
    if !host.known {
        notes.push(
            "the namespace's addresses and routes are not known: only loopback is known to be \
             local (pass --netns, or --iface and --src)"
                .into(),
        );
    }
    Ok(Loaded {
        tables,
        host,
        source,
        notes,
    })
}

fn parse_id(option: &'static str, v: &str, group: bool) -> Result<u32, ExplainError> {
    if let Ok(n) = v.parse() {
        return Ok(n);
    }
    let found = if group {
        nix::unistd::Group::from_name(v)
            .ok()
            .flatten()
            .map(|g| g.gid.as_raw())
    } else {
        nix::unistd::User::from_name(v)
            .ok()
            .flatten()
            .map(|u| u.uid.as_raw())
    };
    found.ok_or_else(|| usage(option, v, "not a number nor a known name"))
}

/// `ADDR:PORT` / `[V6]:PORT`.
pub fn parse_socket_addr(option: &'static str, v: &str) -> Result<SocketAddr, ExplainError> {
    v.parse().map_err(|_| {
        usage(
            option,
            v,
            "expected ADDR:PORT, e.g. 10.0.0.1:80 or [fd00::1]:80",
        )
    })
}

/// Builds the query from the command line (pure but for uid/gid names).
pub fn query_from_args(args: &ExplainArgs) -> Result<Query, ExplainError> {
    let dst = parse_socket_addr("ADDR:PORT", &args.destination)?;
    let mut q = Query::new(args.direction, args.protocol, dst);
    if let Some(src) = &args.src {
        if let Ok(sa) = src.parse::<SocketAddr>() {
            q.src = Some(sa.ip());
            q.sport = Some(sa.port());
        } else {
            q.src = Some(src.parse().map_err(|_| {
                usage(
                    "--src",
                    src,
                    "expected ADDR or ADDR:PORT ([ADDR]:PORT for IPv6)",
                )
            })?);
        }
        if q.src.map(|s| s.is_ipv4()) != Some(dst.is_ipv4()) {
            return Err(usage(
                "--src",
                src,
                format!("not the same IP family as the destination {dst}"),
            ));
        }
    }
    q.uid = args
        .uid
        .as_deref()
        .map(|u| parse_id("--uid", u, false))
        .transpose()?;
    q.gid = args
        .gid
        .as_deref()
        .map(|g| parse_id("--gid", g, true))
        .transpose()?;
    q.iface = args.iface.clone();
    q.mark = matches::parse_u32(&args.mark)
        .ok_or_else(|| usage("--mark", &args.mark, "expected a number (0x.. for hex)"))?;
    q.ctstate = matches::CtState::parse(&args.ctstate).ok_or_else(|| {
        usage(
            "--ctstate",
            &args.ctstate,
            "expected NEW, ESTABLISHED, RELATED, INVALID or UNTRACKED",
        )
    })?;
    Ok(q)
}

/// Explains a packet against loaded rules. With two backends' rules the kernel runs both
/// at each hook in an order userspace cannot see: both orders are walked, and the verdict
/// is certain only when they agree.
pub fn explain_loaded(loaded: &Loaded, q: &Query) -> Explanation {
    let mut e = explain(&loaded.tables, &loaded.host, q);
    let mut notes = loaded.notes.clone();
    if loaded.tables.layers() > 1 {
        let other = explain(&loaded.tables.reversed(), &loaded.host, q);
        let key = |e: &Explanation| (e.verdict, e.to_port, e.to_addr.clone());
        if key(&e) == key(&other) {
            notes.push("either order of the two backends gives this result".into());
        } else {
            notes.push(format!(
                "the result depends on the order the kernel runs the two backends in: {} \
                 (shown), or {} (the other order)",
                report::headline(&e),
                report::headline(&other)
            ));
            let mut possible = e.possible.clone();
            for x in [&e, &other] {
                let o = eval::Outcome {
                    verdict: x.verdict,
                    to_port: x.to_port,
                    to_addr: x.to_addr.clone(),
                    reason: None,
                };
                if x.verdict != Verdict::Unknown && !possible.contains(&o) {
                    possible.push(o);
                }
            }
            possible.extend(
                other
                    .possible
                    .iter()
                    .filter(|o| !e.possible.contains(o))
                    .cloned(),
            );
            e.verdict = Verdict::Unknown;
            e.to_port = None;
            e.to_addr = None;
            e.possible = possible;
        }
    }
    notes.append(&mut e.notes);
    e.notes = notes;
    e.source = loaded.source.clone();
    e
}

/// The library entry point the CLI shares: load, then evaluate.
pub fn explain_packet(
    cfg: &CaptureConfig,
    rules_file: Option<&Path>,
    q: &Query,
) -> Result<(Explanation, String), crate::Error> {
    let loaded = load(cfg, rules_file, family_of(q.dst.ip()))?;
    let e = explain_loaded(&loaded, q);
    Ok((e, loaded.source))
}

/// Runs `shunt explain`; returns the process exit code.
pub fn run_explain(args: ExplainArgs) -> Result<i32, crate::Error> {
    let cfg = args.capture.resolve()?;
    let q = query_from_args(&args)?;
    let (e, source) = explain_packet(&cfg, args.rules.as_deref(), &q)?;
    let format = if args.json {
        ExplainFormat::Json
    } else {
        args.format
    };
    let out = match format {
        ExplainFormat::Json => serde_json::to_string_pretty(&e).unwrap_or_default() + "\n",
        ExplainFormat::Mermaid => report::mermaid(&e),
        ExplainFormat::Text => format!("rules:   {source}\n{}", report::text(&e)),
    };
    print(&out);
    Ok(exit::OK)
}

fn print(s: &str) {
    use std::io::Write as _;
    let _ = std::io::stdout().write_all(s.as_bytes());
}
