//! `shunt doctor`: one line per check of a namespace's capture set-up (ok / warn / fail),
//! each failure with a hint; exit 1 when any check fails.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::Serialize;

use super::{print, CaptureArgs};
use crate::capture;
use crate::config::{CaptureConfig, Ipv6, Set};
use crate::exit;
use crate::netfilter::{self, Backend};
use crate::netns::{self, Netns};
use crate::plan::{self, Family};
use crate::render::join_args;
use crate::rules::{self, Saved};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Warn,
    Fail,
}

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub status: Status,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

fn check(name: &'static str, status: Status, message: impl Into<String>) -> Check {
    Check {
        name,
        status,
        message: message.into(),
        hint: None,
    }
}

impl Check {
    fn hint(mut self, h: impl Into<String>) -> Check {
        self.hint = Some(h.into());
        self
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum DoctorFormat {
    #[default]
    Text,
    Json,
}

/// Flags of `shunt doctor`.
#[derive(Debug, Clone, clap::Args)]
#[command(
    after_help = "Checks: which iptables backend holds rules (and whether both do), \
shunt's chains and jumps, the rules against the plan for the given capture options, packet \
counters, listeners on the capture ports, IPv6.\n\n\
Examples:\n  shunt doctor --netns /run/netns/pod\n  shunt doctor --netns /proc/4242/ns/net \
--proxy-port 16001 --json\n\nExit codes: 0 no check failed (warnings allowed), 1 a check \
failed or the namespace could not be inspected, 2 bad usage."
)]
pub struct DoctorArgs {
    /// Output format
    #[arg(long, value_enum, default_value_t)]
    pub format: DoctorFormat,
    /// Shorthand for --format json
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub capture: CaptureArgs,
}

/// A listening TCP socket in the namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    pub addr: IpAddr,
    pub port: u16,
}

/// Parses `/proc/net/tcp` or `/proc/net/tcp6` text: the sockets in state LISTEN.
pub fn parse_proc_net_tcp(text: &str) -> Vec<Listener> {
    parse_proc_net(text, "0A")
}

/// Sockets of `/proc/net/{tcp,udp}{,6}` text in the given state (hex, as the kernel prints
/// it: `0A` LISTEN, `07` an unconnected UDP socket).
pub fn parse_proc_net(text: &str, state: &str) -> Vec<Listener> {
    let mut out = Vec::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 4 || f[3] != state {
            continue;
        }
        let Some((addr, port)) = f[1].split_once(':') else {
            continue;
        };
        let Ok(port) = u16::from_str_radix(port, 16) else {
            continue;
        };
        // The kernel prints each 32-bit word of the address in host (little-endian) order.
        let words: Option<Vec<[u8; 4]>> = (0..addr.len() / 8)
            .map(|i| {
                u32::from_str_radix(&addr[i * 8..i * 8 + 8], 16)
                    .ok()
                    .map(|w| w.to_le_bytes())
            })
            .collect();
        let Some(words) = words else { continue };
        let ip = match words.len() {
            1 => IpAddr::V4(Ipv4Addr::from(words[0])),
            4 => {
                let mut b = [0u8; 16];
                for (i, w) in words.iter().enumerate() {
                    b[i * 4..i * 4 + 4].copy_from_slice(w);
                }
                IpAddr::V6(Ipv6Addr::from(b))
            }
            _ => continue,
        };
        out.push(Listener { addr: ip, port });
    }
    out
}

/// Listening TCP sockets (`udp`: bound UDP sockets) in the namespace, read from a thread
/// inside it.
pub fn listeners(ns: Option<&Netns>, udp: bool) -> Result<Vec<Listener>, crate::Error> {
    Ok(netns::run_in(ns, move || {
        let (files, state) = if udp {
            (["udp", "udp6"], "07")
        } else {
            (["tcp", "tcp6"], "0A")
        };
        let mut all = Vec::new();
        for f in files {
            // /proc/net is /proc/self/net, the namespace of the main thread: read this
            // thread's own entry instead.
            if let Ok(text) = std::fs::read_to_string(format!("/proc/thread-self/net/{f}")) {
                all.extend(parse_proc_net(&text, state));
            }
        }
        all
    })?)
}

/// Per-rule packet counters of one table from `iptables-save -c` text:
/// (table, chain, rule arguments, packets).
pub fn parse_counters(text: &str) -> Vec<(String, String, Vec<String>, u64)> {
    let mut out = Vec::new();
    let mut table = String::new();
    for line in text.lines() {
        let l = line.trim();
        if let Some(t) = l.strip_prefix('*') {
            table = t.trim().to_string();
            continue;
        }
        if !l.starts_with('[') {
            continue;
        }
        let Ok(mut args) = rules::tokenize(l) else {
            continue;
        };
        if args.len() < 3 || args[1] != "-A" {
            continue;
        }
        let packets = args[0]
            .trim_matches(|c| c == '[' || c == ']')
            .split(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        let chain = args[2].clone();
        let rest = args.split_off(3);
        out.push((table.clone(), chain, rest, packets));
    }
    out
}

fn save_with_counters(b: Backend, family: Family, ns: Option<&Netns>) -> Option<String> {
    let out = netns::command(&b.tool(family, "save"), ns)
        .arg("-c")
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

use crate::capture::holds_shunt;

/// Runs every check against the namespace in `cfg.netns` (or the current one).
pub fn doctor(cfg: &CaptureConfig) -> Result<Vec<Check>, crate::Error> {
    let ns = cfg.netns.as_deref().map(Netns::open).transpose()?;
    let ns = ns.as_ref();
    let mut checks = Vec::new();

    // 1. Backends: which hold rules (either family), and shunt's.
    let mut saves: Vec<(Backend, Family, Saved)> = Vec::new();
    for b in [Backend::Nft, Backend::Legacy] {
        for f in [Family::V4, Family::V6] {
            if b.available(f) {
                saves.push((b, f, netfilter::save(b, f, ns)?));
            }
        }
    }
    let holding: BTreeSet<&'static str> = saves
        .iter()
        .filter(|(_, _, s)| s.has_rules())
        .map(|(b, _, _)| b.name())
        .collect();
    let with_shunt: BTreeSet<&'static str> = saves
        .iter()
        .filter(|(_, _, s)| holds_shunt(s))
        .map(|(b, _, _)| b.name())
        .collect();
    let backend = match cfg.backend {
        crate::config::BackendChoice::Legacy => Backend::Legacy,
        crate::config::BackendChoice::Nft => Backend::Nft,
        // shunt's table is read natively below; the iptables checks look at the nft backend,
        // where another tool's iptables-nft rules would be.
        crate::config::BackendChoice::Nftables => Backend::Nft,
        // The same rule as apply's, on the same saves.
        crate::config::BackendChoice::Auto => capture::pick_backend(
            &saves
                .iter()
                .filter(|(_, f, _)| *f == Family::V4)
                .map(|(b, _, s)| (*b, s.clone()))
                .collect::<Vec<_>>(),
        ),
    };
    // The native nftables engine: doctor reports it. The chain and counter checks read
    // iptables only; the explain check walks native tables too.
    // One `nft -j list ruleset`: whether shunt's table is there, and the tables explain walks.
    let native = match netfilter::find_tool("nft") {
        Some(_) => super::native_tables(Family::V4, ns).unwrap_or_default(),
        None => Vec::new(),
    };
    let shunt_table = format!("inet {}", crate::nftables::TABLE);
    let nft_chains: BTreeSet<String> = native
        .iter()
        .filter(|t| t.name == shunt_table)
        .flat_map(|t| t.chains.keys().cloned())
        .collect();
    let nft_table = native.iter().any(|t| t.name == shunt_table);
    // shunt's rules are the nftables engine's (or are asked for there): the chain, counter
    // and IPv6 checks below read its table instead of the iptables saves.
    let nft_engine = with_shunt.is_empty()
        && (nft_table || cfg.backend == crate::config::BackendChoice::Nftables);
    if nft_table {
        checks.push(if with_shunt.is_empty() {
            check(
                "engine",
                Status::Ok,
                "shunt's rules are in the nftables engine (table inet shunt)",
            )
        } else {
            check(
                "engine",
                Status::Warn,
                format!(
                    "shunt's rules are in two engines: nftables (table inet shunt) and iptables \
                     ({}); both capture, in hook-priority order",
                    with_shunt.iter().copied().collect::<Vec<_>>().join(" and ")
                ),
            )
            .hint("remove one: `shunt clean --backend nftables` or `shunt clean --backend legacy|nft`")
        });
    }
    checks.push(match holding.len() {
        _ if nft_engine => check(
            "backend",
            Status::Ok,
            if holding.is_empty() {
                "no iptables rules in either backend: only shunt's nftables table captures"
                    .to_string()
            } else {
                format!(
                    "iptables ({}) holds another tool's rules; they run beside shunt's table, in \
                     hook-priority order (the explain check walks both)",
                    holding.iter().copied().collect::<Vec<_>>().join(" and ")
                )
            },
        ),
        0 => check(
            "backend",
            Status::Fail,
            "no iptables rules in either backend (nft, legacy)",
        )
        .hint("run `shunt apply` in the namespace (the init container or CNI plugin should have)"),
        1 => check(
            "backend",
            Status::Ok,
            format!("the {} backend holds the rules", backend.name()),
        ),
        _ => check(
            "backend",
            Status::Warn,
            format!(
                "both the nft and the legacy backends hold rules (shunt's are in {}): the kernel \
                 runs both, which makes packet paths hard to predict",
                if with_shunt.is_empty() {
                    "neither".to_string()
                } else {
                    with_shunt.iter().copied().collect::<Vec<_>>().join(" and ")
                }
            ),
        )
        .hint(
            "find the other tool's rules with `iptables-legacy-save` / `iptables-nft-save` and \
             remove the set you do not use (`shunt clean --backend legacy|nft` for shunt's)",
        ),
    });

    // 2. The plan versus what is installed (capture::check settles the IPv6 decision).
    let report = capture::check(cfg)?;
    let plan = plan::build(cfg, report.ipv6);
    let installed = |f: Family| {
        saves
            .iter()
            .find(|(b, fam, _)| *b == backend && *fam == f)
            .map(|(_, _, s)| netfilter::views(s))
            .unwrap_or_else(|| netfilter::planned_views(None))
    };
    if nft_engine {
        checks.extend(nft_chain_checks(&plan, &nft_chains));
    }
    for rs in plan.families().filter(|_| !nft_engine) {
        let have = installed(rs.family);
        let want = netfilter::planned_views(Some(rs));
        let mut missing = Vec::new();
        let (mut chains, mut jumps) = (0, 0);
        for ((t, w), (_, h)) in want.iter().zip(&have) {
            for name in w.chains.keys() {
                chains += 1;
                if !h.chains.contains_key(name) {
                    missing.push(format!("chain {name} ({} table)", t.as_str()));
                }
            }
            for (chain, rules) in &w.jumps {
                for r in rules {
                    jumps += 1;
                    let there = h.jumps.get(chain).is_some_and(|have| have.contains(r));
                    if !there {
                        let to = rules::SavedRule {
                            chain: chain.clone(),
                            args: r.clone(),
                        };
                        missing.push(format!(
                            "jump {chain} -> {} ({} table: -A {chain} {})",
                            to.target_chain().unwrap_or("?"),
                            t.as_str(),
                            join_args(r)
                        ));
                    }
                }
            }
        }
        let name = match rs.family {
            Family::V4 => "chains-v4",
            Family::V6 => "chains-v6",
        };
        checks.push(if missing.is_empty() {
            check(
                name,
                Status::Ok,
                format!(
                    "{}: shunt's {chains} chains and {jumps} jumps are present ({} backend)",
                    rs.family.name(),
                    backend.name()
                ),
            )
        } else {
            check(
                name,
                Status::Fail,
                format!("{}: missing {}", rs.family.name(), missing.join(", ")),
            )
            .hint("run `shunt apply` with the pod's capture options to restore them")
        });
    }
    checks.push(if report.in_sync() {
        check(
            "plan",
            Status::Ok,
            "the installed rules equal the plan for these options",
        )
    } else {
        let mut msg = String::from("the installed rules differ from the plan:");
        for (family, lines) in &report.drift {
            for l in lines.iter().take(6) {
                let _ = write!(msg, "\n      {} {l}", family.name());
            }
            if lines.len() > 6 {
                let _ = write!(msg, "\n      ... {} more", lines.len() - 6);
            }
        }
        check("plan", Status::Fail, msg).hint(
            "`shunt check` shows the whole diff; `shunt apply` with the same options repairs it \
             (or pass the options the pod was set up with)",
        )
    });

    // 3. Packet counters of shunt's jumps and NAT rules (nat counts a connection's first
    // packet only, so these are connection counts).
    let mut counts = Vec::new();
    for f in plan.families().map(|r| r.family).filter(|_| !nft_engine) {
        let Some(text) = save_with_counters(backend, f, ns) else {
            continue;
        };
        let mut items = Vec::new();
        let mut position: std::collections::HashMap<String, usize> = Default::default();
        for (_, chain, args, packets) in parse_counters(&text) {
            let index = position.entry(chain.clone()).or_default();
            *index += 1;
            let index = *index;
            let rule = rules::SavedRule {
                chain: chain.clone(),
                args: args.clone(),
            };
            let target = rule.target_chain().unwrap_or_default();
            if rules::is_shunt_chain(target) && !rules::is_shunt_chain(&chain) {
                items.push(format!("{chain} -> {target} {packets}"));
            } else if rules::is_shunt_chain(&chain) && (target == "REDIRECT" || target == "TPROXY")
            {
                let port = args.last().cloned().unwrap_or_default();
                items.push(format!("{target} :{port} {packets}"));
            } else if rules::is_shunt_chain(&chain) && packets > 0 {
                items.push(format!("{chain}#{index} ({}) {packets}", join_args(&args)));
            }
        }
        if !items.is_empty() {
            counts.push(format!("{}: {}", f.name(), items.join(", ")));
        }
    }
    checks.push(if nft_engine {
        check(
            "counters",
            Status::Ok,
            "not counted: shunt's nftables table has no counter statements (each costs a \
             write per packet); `nft monitor trace` follows a packet instead",
        )
    } else if counts.is_empty() {
        check(
            "counters",
            Status::Warn,
            "no counters for shunt's rules (none installed?)",
        )
    } else {
        check(
            "counters",
            Status::Ok,
            format!(
                "connections seen by shunt's rules:\n      {}",
                counts.join("\n      ")
            ),
        )
    });

    // 4. What the installed rules do with an app's new connection (explain), which catches
    // another tool's rules that pre-empt shunt's.
    let host = super::host_of(ns);
    let outbound_on = !cfg.outbound_cidrs.is_empty() || !cfg.outbound_ports.is_empty();
    if outbound_on {
        if let Ok(target) = super::validate::default_target(cfg) {
            let uid = super::validate::first_free(&cfg.proxy_uid);
            let gid = super::validate::first_free(&cfg.proxy_gid);
            let saved = saves
                .iter()
                .find(|(b, f, _)| *b == backend && *f == Family::V4)
                .map(|(_, _, s)| s.clone())
                .unwrap_or_default();
            let mut q = super::Query::new(super::Direction::Out, super::Proto::Tcp, target);
            q.uid = Some(uid);
            q.gid = Some(gid);
            let mut tables = super::Tables::from_saved(&saved);
            if nft_table {
                // Native base chains run between iptables' tables: walk them too.
                tables = tables.with_nft(native.clone());
            }
            let e = super::explain(&tables, &host, &q);
            let what = format!("a new connection from uid {uid} to {target}");
            let netns_flag = cfg
                .netns
                .as_ref()
                .map(|p| format!(" --netns {}", p.display()))
                .unwrap_or_default();
            let path: Vec<String> = e
                .trace
                .iter()
                .map(|t| {
                    format!(
                        "{} {}#{}",
                        t.table,
                        t.chain,
                        t.index.map(|i| i.to_string()).unwrap_or("policy".into())
                    )
                })
                .collect();
            checks.push(match (e.verdict, e.to_port) {
                (super::Verdict::Redirect, Some(p)) if p == cfg.proxy_port => check(
                    "explain",
                    Status::Ok,
                    format!("{what} is redirected to :{p}"),
                ),
                (super::Verdict::Unknown, _) => {
                    let why = e
                        .notes
                        .iter()
                        .chain(e.uncertain.iter().map(|u| &u.reason))
                        .next()
                        .cloned()
                        .unwrap_or_default();
                    check(
                        "explain",
                        Status::Warn,
                        format!("cannot tell what happens to {what}: {why}"),
                    )
                    .hint(format!(
                        "shunt explain{netns_flag} out tcp {target} --uid {uid} --gid {gid}"
                    ))
                }
                _ => check(
                    "explain",
                    Status::Fail,
                    format!(
                        "{what} is {} instead of redirected to :{} (path: {})",
                        super::report::headline(&e),
                        cfg.proxy_port,
                        if path.is_empty() {
                            "no rule matched".to_string()
                        } else {
                            path.join(" -> ")
                        }
                    ),
                )
                .hint(format!(
                    "see `shunt explain{netns_flag} out tcp {target} --uid {uid} --gid {gid}`; \
                     another tool's rules may come before shunt's"
                )),
            });
        }
    }

    // 5. Something listens on the capture ports.
    let ls = listeners(ns, false)?;
    let inbound_on = !cfg.inbound_ports.is_empty() && cfg.exclude_inbound_ports != Set::All;
    for (port, what, flag, on) in [
        (cfg.proxy_port, "outbound", "--proxy-port", outbound_on),
        (cfg.inbound_port, "inbound", "--inbound-port", inbound_on),
    ] {
        if !on {
            continue;
        }
        let on_port: Vec<&Listener> = ls.iter().filter(|l| l.port == port).collect();
        let name = if what == "outbound" {
            "listen-outbound"
        } else {
            "listen-inbound"
        };
        checks.push(if on_port.iter().any(|l| l.addr.is_unspecified()) {
            check(
                name,
                Status::Ok,
                format!("something listens on port {port} ({what} capture)"),
            )
        } else if !on_port.is_empty() {
            let addrs: Vec<String> = on_port.iter().map(|l| l.addr.to_string()).collect();
            check(
                name,
                Status::Warn,
                format!(
                    "port {port} ({what} capture) listens only on {}: redirected connections \
                     to other addresses are refused",
                    addrs.join(", ")
                ),
            )
            .hint("make the proxy listen on 0.0.0.0 and ::")
        } else {
            check(
                name,
                Status::Fail,
                format!(
                    "nothing listens on port {port} ({what} capture): captured connections are \
                     refused"
                ),
            )
            .hint(format!(
                "start the proxy (`shunt proxy`), or pass the port it listens on as {flag}"
            ))
        });
    }

    // DNS capture: the proxy's DNS port, UDP and TCP.
    if cfg.redirect_dns {
        let port = cfg.dns_port;
        let udp = listeners(ns, true)?;
        let mut missing = Vec::new();
        if !udp.iter().any(|l| l.port == port) {
            missing.push("UDP");
        }
        if !ls.iter().any(|l| l.port == port) {
            missing.push("TCP");
        }
        checks.push(if missing.is_empty() {
            check(
                "listen-dns",
                Status::Ok,
                format!("something listens on port {port} (DNS capture), UDP and TCP"),
            )
        } else {
            check(
                "listen-dns",
                Status::Fail,
                format!(
                    "nothing listens on port {port} ({}) although DNS is captured: name \
                     lookups fail",
                    missing.join(" and ")
                ),
            )
            .hint("start the proxy with its DNS forwarder (`shunt proxy --dns-port`), or pass --dns-port")
        });
    }

    // 6. IPv6 enabled without IPv6 rules lets IPv6 traffic bypass the proxy.
    let v6_on = capture::ipv6_kernel_enabled(ns)?;
    let v6_rules = if nft_engine {
        nft_chains.iter().any(|c| c.starts_with("v6_"))
    } else {
        saves
            .iter()
            .any(|(b, f, s)| *b == backend && *f == Family::V6 && holds_shunt(s))
    };
    let v6_addrs: Vec<String> = host
        .addrs
        .iter()
        .filter(|a| a.global && a.net.addr().is_ipv6())
        .map(|a| a.net.addr().to_string())
        .collect();
    checks.push(if !v6_on {
        check("ipv6", Status::Ok, "IPv6 is disabled in the namespace")
    } else if v6_rules {
        check("ipv6", Status::Ok, "IPv6 is enabled and IPv6 capture rules are installed")
    } else if cfg.ipv6 == Ipv6::Off {
        check(
            "ipv6",
            Status::Warn,
            "IPv6 is enabled but capture runs with --ipv6 off: IPv6 traffic bypasses the proxy",
        )
        .hint("`shunt apply --ipv6 on`, or disable IPv6 in the pod (sysctl net.ipv6.conf.all.disable_ipv6=1)")
    } else {
        let addrs = if v6_addrs.is_empty() {
            "no global IPv6 address yet".to_string()
        } else {
            format!("addresses {}", v6_addrs.join(", "))
        };
        check(
            "ipv6",
            Status::Fail,
            format!(
                "IPv6 is enabled ({addrs}) but there are no IPv6 capture rules: IPv6 traffic \
                 bypasses the proxy"
            ),
        )
        .hint("`shunt apply --ipv6 on` (is ip6tables installed?), or disable IPv6 in the pod")
    });

    // 7. tproxy mode: the policy route that delivers marked packets to the proxy.
    if cfg.mode == crate::config::Mode::Tproxy {
        let r = crate::plan::Routing {
            mark: cfg.tproxy_mark,
            table: cfg.tproxy_route_table,
        };
        let families: &[Family] = if v6_on && cfg.ipv6 != Ipv6::Off {
            &[Family::V4, Family::V6]
        } else {
            &[Family::V4]
        };
        for &family in families {
            let (rule, route) = crate::routing::present(family, r, ns)?;
            let name = match family {
                Family::V4 => "tproxy-route-v4",
                Family::V6 => "tproxy-route-v6",
            };
            checks.push(if rule && route {
                check(
                    name,
                    Status::Ok,
                    format!(
                        "{}: fwmark {:#x} lookup {} and its local default route are present",
                        family.name(),
                        r.mark,
                        r.table
                    ),
                )
            } else {
                let missing = match (rule, route) {
                    (false, false) => "the rule and the route are",
                    (false, true) => "the `ip rule` is",
                    _ => "the local default route is",
                };
                check(
                    name,
                    Status::Fail,
                    format!(
                        "{}: {missing} missing: TPROXY'd packets and the app's replies to the \
                         proxy are not delivered locally",
                        family.name()
                    ),
                )
                .hint("run `shunt apply --mode tproxy` again (it adds them)")
            });
        }
    }
    Ok(checks)
}

/// The chain checks on the nftables engine: every chain the plan renders is in the table.
fn nft_chain_checks(plan: &crate::plan::Plan, installed: &BTreeSet<String>) -> Vec<Check> {
    let planned = crate::nftables::chain_names(plan);
    plan.families()
        .map(|rs| {
            let (name, prefix) = match rs.family {
                Family::V4 => ("chains-v4", "v4_"),
                Family::V6 => ("chains-v6", "v6_"),
            };
            // The base chains serve both families; they are counted with IPv4.
            let mine: Vec<&String> = planned
                .iter()
                .filter(|c| {
                    c.starts_with(prefix)
                        || (rs.family == Family::V4
                            && !c.starts_with("v4_")
                            && !c.starts_with("v6_"))
                })
                .collect();
            let missing: Vec<&str> = mine
                .iter()
                .filter(|c| !installed.contains(c.as_str()))
                .map(|c| c.as_str())
                .collect();
            if missing.is_empty() {
                check(
                    name,
                    Status::Ok,
                    format!(
                        "{}: shunt's {} chains are present (nftables engine, table inet shunt)",
                        rs.family.name(),
                        mine.len()
                    ),
                )
            } else {
                check(
                    name,
                    Status::Fail,
                    format!(
                        "{}: table inet shunt lacks chain {}",
                        rs.family.name(),
                        missing.join(", chain ")
                    ),
                )
                .hint("run `shunt apply --backend nftables` with the pod's capture options")
            }
        })
        .collect()
}

pub fn text(checks: &[Check]) -> String {
    let mut s = String::new();
    for c in checks {
        let tag = match c.status {
            Status::Ok => "ok  ",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
        };
        let _ = writeln!(s, "{tag} {:<15} {}", c.name, c.message);
        if let Some(h) = &c.hint {
            let _ = writeln!(s, "     {:<15} fix: {h}", "");
        }
    }
    s
}

/// Runs `shunt doctor`; returns the process exit code (non-zero on any failed check).
pub fn run_doctor(args: DoctorArgs) -> Result<i32, crate::Error> {
    let cfg = args.capture.resolve()?;
    let checks = doctor(&cfg)?;
    let failed = checks.iter().any(|c| c.status == Status::Fail);
    if args.json || args.format == DoctorFormat::Json {
        let v = serde_json::json!({ "ok": !failed, "checks": checks });
        print(&(serde_json::to_string_pretty(&v).unwrap_or_default() + "\n"));
    } else {
        print(&text(&checks));
    }
    Ok(if failed { exit::FAILURE } else { exit::OK })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_net_tcp_listeners() {
        let v4 = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 00000000:3A99 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0000000000000000 100 0 0 10 0\n   1: 0100007F:3A98 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1 0000000000000000 100 0 0 10 0\n   2: 0100007F:3A98 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 3 1 0000000000000000 100 0 0 10 0\n";
        let l = parse_proc_net_tcp(v4);
        assert_eq!(
            l,
            vec![
                Listener {
                    addr: "0.0.0.0".parse().unwrap(),
                    port: 15001
                },
                Listener {
                    addr: "127.0.0.1".parse().unwrap(),
                    port: 15000
                }
            ]
        );
        let v6 = "  sl  local_address                         remote_address                        st\n   0: 00000000000000000000000001000000:3A9E 00000000000000000000000000000000:0000 0A 0\n";
        assert_eq!(
            parse_proc_net_tcp(v6),
            vec![Listener {
                addr: "::1".parse().unwrap(),
                port: 15006
            }]
        );
    }

    #[test]
    fn counters_from_save_c() {
        let text = "*nat\n:OUTPUT ACCEPT [3:180]\n[5:300] -A OUTPUT -p tcp -j SHUNT_OUTPUT\n[2:120] -A SHUNT_REDIRECT -p tcp -j REDIRECT --to-ports 15001\nCOMMIT\n";
        let c = parse_counters(text);
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].0, "nat");
        assert_eq!(c[0].1, "OUTPUT");
        assert_eq!(c[0].3, 5);
        assert_eq!(c[1].3, 2);
    }
}
