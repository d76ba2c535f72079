//! `shunt istio-iptables`: Istio's `istio-iptables` flags and environment variables, with
//! Istio's meanings and defaults, translated into shunt's options. An `istio-init` container
//! can run shunt's image with its arguments unchanged (`istio-iptables -p 15001 ...`).
//!
//! Where Istio's defaults differ from shunt's, Istio's win here: no `-i` means no outbound
//! capture, no `-b` means no inbound capture, and `-d` counts only with `-b '*'`.

use ipnet::IpNet;

use crate::config::{
    CaptureConfig, ConfigError, IdRange, IstioLayout, OwnerGroups, RawOptions, Set,
};

#[derive(Debug, Clone, clap::Args)]
pub struct IstioArgs {
    /// Port outbound TCP is redirected to
    #[arg(
        short = 'p',
        long = "envoy-port",
        env = "ENVOY_PORT",
        default_value = "15001"
    )]
    pub envoy_port: String,
    /// Port inbound TCP is redirected to
    #[arg(
        short = 'z',
        long = "inbound-capture-port",
        env = "INBOUND_CAPTURE_PORT",
        default_value = "15006"
    )]
    pub inbound_capture_port: String,
    /// Inbound tunnel (HBONE) port, never captured inbound
    #[arg(
        short = 'e',
        long = "inbound-tunnel-port",
        env = "INBOUND_TUNNEL_PORT",
        default_value = "15008"
    )]
    pub inbound_tunnel_port: String,
    /// Uid(s) whose traffic is not captured
    #[arg(
        short = 'u',
        long = "proxy-uid",
        env = "PROXY_UID",
        default_value = "1337"
    )]
    pub proxy_uid: String,
    /// Gid(s) whose traffic is not captured [default: the -u value]
    #[arg(short = 'g', long = "proxy-gid", env = "PROXY_GID")]
    pub proxy_gid: Option<String>,
    /// Inbound interception mode: REDIRECT or TPROXY
    #[arg(
        short = 'm',
        long = "istio-inbound-interception-mode",
        env = "ISTIO_INBOUND_INTERCEPTION_MODE",
        default_value = "REDIRECT"
    )]
    pub mode: String,
    /// TPROXY mark (TPROXY mode only)
    #[arg(
        short = 't',
        long = "istio-inbound-tproxy-mark",
        env = "ISTIO_INBOUND_TPROXY_MARK",
        default_value = "1337"
    )]
    pub tproxy_mark: String,
    /// TPROXY route table (TPROXY mode only)
    #[arg(
        short = 'r',
        long = "istio-inbound-tproxy-route-table",
        env = "ISTIO_INBOUND_TPROXY_ROUTE_TABLE",
        default_value = "133"
    )]
    pub tproxy_route_table: String,
    /// Inbound ports captured; '*' for all, empty for none
    #[arg(
        short = 'b',
        long = "istio-inbound-ports",
        env = "ISTIO_INBOUND_PORTS",
        default_value = ""
    )]
    pub inbound_ports: String,
    /// Inbound ports not captured; only with -b '*'
    #[arg(
        short = 'd',
        long = "istio-local-exclude-ports",
        env = "ISTIO_LOCAL_EXCLUDE_PORTS",
        default_value = ""
    )]
    pub local_exclude_ports: String,
    /// Outbound ports not captured
    #[arg(
        short = 'o',
        long = "istio-local-outbound-ports-exclude",
        env = "ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE",
        default_value = ""
    )]
    pub outbound_ports_exclude: String,
    /// Outbound ports always captured
    #[arg(
        short = 'q',
        long = "istio-outbound-ports",
        env = "ISTIO_OUTBOUND_PORTS",
        default_value = ""
    )]
    pub outbound_ports: String,
    /// Outbound CIDRs captured; '*' for all, empty for none
    #[arg(
        short = 'i',
        long = "istio-service-cidr",
        env = "ISTIO_SERVICE_CIDR",
        default_value = ""
    )]
    pub service_cidr: String,
    /// Outbound CIDRs not captured
    #[arg(
        short = 'x',
        long = "istio-service-exclude-cidr",
        env = "ISTIO_SERVICE_EXCLUDE_CIDR",
        default_value = ""
    )]
    pub service_exclude_cidr: String,
    /// Interfaces whose incoming traffic (from VMs) is treated as outbound
    #[arg(
        short = 'k',
        long = "kube-virt-interfaces",
        env = "KUBE_VIRT_INTERFACES",
        default_value = ""
    )]
    pub kube_virt_interfaces: String,
    /// Interfaces never captured
    #[arg(
        short = 'c',
        long = "istio-exclude-interfaces",
        env = "ISTIO_EXCLUDE_INTERFACES",
        default_value = ""
    )]
    pub exclude_interfaces: String,
    /// Capture DNS to the proxy's DNS port (15053)
    #[arg(long = "redirect-dns", env = "REDIRECT_DNS")]
    pub redirect_dns: bool,
    /// With --redirect-dns: every destination's DNS, not only the resolv.conf servers
    #[arg(long = "capture-all-dns", env = "CAPTURE_ALL_DNS")]
    pub capture_all_dns: bool,
    /// Drop conntrack-INVALID inbound packets (also INVALID_DROP)
    #[arg(long = "drop-invalid", env = "DROP_INVALID")]
    pub drop_invalid: bool,
    /// IPv6 rules too (also ISTIO_DUAL_STACK); without it, IPv6 rules only in an IPv6-only pod
    #[arg(long = "dual-stack", env = "DUAL_STACK")]
    pub dual_stack: bool,
    /// Change nothing (Istio: leave the rules to the CNI plugin); --run-validation still runs
    #[arg(long = "skip-rule-apply", env = "SKIP_RULE_APPLY")]
    pub skip_rule_apply: bool,
    /// Remove the rules (shunt's, in every engine) and install none
    #[arg(long = "cleanup-only", env = "CLEANUP_ONLY")]
    pub cleanup_only: bool,
    /// Accepted: shunt always converges the namespace to the plan, drift or not
    #[arg(long = "reconcile", env = "RECONCILE", num_args = 0..=1, default_missing_value = "true")]
    pub reconcile: Option<String>,
    /// Accepted: shunt only writes when the rules differ, and then always converges
    #[arg(long = "force-apply", env = "FORCE_APPLY")]
    pub force_apply: bool,
    /// iptables-legacy or iptables-nft: the iptables engine to write with
    #[arg(long = "force-iptables-binary", env = "FORCE_IPTABLES_BINARY")]
    pub force_iptables_binary: Option<String>,
    /// --run-validation: port of the probe listener (shunt validate binds the outbound port)
    #[arg(long = "iptables-probe-port", env = "IPTABLES_PROBE_PORT")]
    pub iptables_probe_port: Option<String>,
    /// --run-validation: how long to wait for the probe, e.g. 5s
    #[arg(long = "probe-timeout", env = "PROBE_TIMEOUT")]
    pub probe_timeout: Option<String>,
    /// Refused: shunt writes no LOG/TRACE rules
    #[arg(
        long = "iptables-trace-logging",
        env = "IPTABLES_TRACE_LOGGING",
        hide = true
    )]
    pub trace_logging: bool,
    /// Refused: shunt's CNI mode is the CNI plugin itself (`shunt cni install`)
    #[arg(long = "cni-mode", env = "CNI_MODE", hide = true)]
    pub cni_mode: bool,
    /// shunt only: compare the installed rules with these flags' rules, change nothing (exit 0
    /// in sync, 3 drift), as `shunt check` does for `shunt apply`'s options
    #[arg(long = "check")]
    pub check: bool,
    /// Istio's log levels (`default:info`); shunt's verbosity is RUST_LOG
    #[arg(long = "log_output_level", alias = "log-output-level", hide = true)]
    pub log_output_level: Option<String>,
    /// The namespace to act in (the same as --netns)
    #[arg(long = "network-namespace", env = "NETWORK_NAMESPACE")]
    pub network_namespace: Option<String>,
    /// Print the rules that would change and change nothing
    #[arg(short = 'n', long = "dry-run", env = "DRY_RUN")]
    pub dry_run: bool,
    /// After applying, prove capture works (`shunt validate`)
    #[arg(long = "run-validation", env = "RUN_VALIDATION")]
    pub run_validation: bool,
    /// Write native nftables (shunt's `inet shunt` table) instead of iptables rules
    #[arg(long = "native-nftables", env = "NATIVE_NFTABLES")]
    pub native_nftables: bool,
}

fn some(s: &str) -> Option<String> {
    Some(s.trim().to_string())
}

/// A list flag as Istio reads it (`config.Split`): empty items are dropped, so `6000,7000,`
/// is two ports, where shunt's own options refuse the empty item.
fn list(s: &str) -> Option<String> {
    let items: Vec<&str> = s
        .split(',')
        .map(str::trim)
        .filter(|i| !i.is_empty())
        .collect();
    Some(items.join(","))
}

/// Go's `strconv.ParseBool`, which Istio's variables go through; anything else is refused.
fn go_bool(name: &'static str, value: &str) -> Result<bool, ConfigError> {
    match value.trim() {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Ok(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" | "" => Ok(false),
        _ => Err(ConfigError::Variable {
            name,
            value: value.to_string(),
            reason: "expected true or false".into(),
        }),
    }
}

fn refused(option: &'static str, reason: &str) -> ConfigError {
    ConfigError::Unsupported {
        option,
        reason: reason.to_string(),
    }
}

/// An environment-only setting's error, naming the variable rather than a flag.
fn variable(name: &'static str, e: ConfigError) -> ConfigError {
    match e {
        ConfigError::Invalid { value, reason, .. } => ConfigError::Variable {
            name,
            value,
            reason,
        },
        other => other,
    }
}
/// What `shunt istio-iptables` does, beside the options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Apply,
    /// --skip-rule-apply
    Nothing,
    /// --cleanup-only
    Clean,
    /// --check (shunt only)
    Check,
}

impl IstioArgs {
    /// The equivalent shunt options, reading the process environment for Istio's
    /// environment-only settings.
    pub fn to_options(&self) -> Result<RawOptions, ConfigError> {
        self.to_options_with(|k| std::env::var(k).ok())
    }

    pub fn action(&self) -> Action {
        if self.cleanup_only {
            Action::Clean
        } else if self.check {
            Action::Check
        } else if self.skip_rule_apply {
            Action::Nothing
        } else {
            Action::Apply
        }
    }

    /// Whether IPv6 rules are asked for (--dual-stack or ISTIO_DUAL_STACK).
    pub fn dual_stack(&self, env: &dyn Fn(&str) -> Option<String>) -> Result<bool, ConfigError> {
        let alias = env("ISTIO_DUAL_STACK")
            .map(|v| go_bool("ISTIO_DUAL_STACK", &v))
            .transpose()?;
        Ok(self.dual_stack || alias == Some(true))
    }

    /// The equivalent shunt options; errors name Istio's flag. `env` looks up Istio's
    /// environment-only settings (`ISTIO_OUTBOUND_OWNER_GROUPS`, `..._EXCLUDE`,
    /// `ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR`) and second names (`INVALID_DROP`,
    /// `ISTIO_META_DNS_CAPTURE`, `ISTIO_DUAL_STACK`).
    pub fn to_options_with(
        &self,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<RawOptions, ConfigError> {
        if self.trace_logging {
            return Err(refused(
                "--iptables-trace-logging",
                "shunt writes no TRACE rules; use `shunt explain` to follow a packet",
            ));
        }
        if self.cni_mode {
            return Err(refused(
                "--cni-mode",
                "run shunt as the CNI plugin itself (`shunt cni install`)",
            ));
        }
        let mode = match self.mode.trim().to_ascii_uppercase().as_str() {
            "REDIRECT" => "redirect",
            "TPROXY" => "tproxy",
            _ => {
                return Err(ConfigError::Invalid {
                    option: "istio-inbound-interception-mode (-m)",
                    value: self.mode.clone(),
                    reason: "expected REDIRECT or TPROXY".into(),
                })
            }
        };
        // Istio's names for the two TPROXY numbers, so errors point at the flag used.
        for (option, value) in [
            ("istio-inbound-tproxy-mark (-t)", &self.tproxy_mark),
            (
                "istio-inbound-tproxy-route-table (-r)",
                &self.tproxy_route_table,
            ),
        ] {
            if value.trim().parse::<u32>().map_or(true, |n| n == 0) {
                return Err(ConfigError::Invalid {
                    option,
                    value: value.clone(),
                    reason: "expected a number from 1 to 4294967295".into(),
                });
            }
        }
        if mode == "tproxy" && !self.kube_virt_interfaces.trim().is_empty() {
            return Err(refused(
                "-k (--kube-virt-interfaces) with -m TPROXY",
                "shunt captures VM interfaces in REDIRECT mode only; use -m REDIRECT, or leave \
                 -k out",
            ));
        }
        if self.service_exclude_cidr.trim() == "*" {
            return Err(ConfigError::Invalid {
                option: "istio-service-exclude-cidr (-x)",
                value: "*".into(),
                reason: "Istio refuses '*' here too; to capture nothing outbound, give no -i"
                    .into(),
            });
        }
        let backend = match self.force_iptables_binary.as_deref().map(str::trim) {
            None | Some("") => None,
            Some("iptables-legacy") => Some("legacy"),
            Some("iptables-nft") => Some("nft"),
            Some(other) => {
                return Err(ConfigError::Invalid {
                    option: "force-iptables-binary",
                    value: other.to_string(),
                    reason: "expected iptables-legacy or iptables-nft".into(),
                })
            }
        };
        let backend = match (backend, self.native_nftables) {
            (Some(b), true) => {
                return Err(ConfigError::Conflict(format!(
                    "--native-nftables and --force-iptables-binary (iptables-{b}) name two \
                     engines; give one"
                )))
            }
            (_, true) => Some("nftables"),
            (b, false) => b,
        };
        let redirect_dns = self.redirect_dns
            || env("ISTIO_META_DNS_CAPTURE")
                .map(|v| go_bool("ISTIO_META_DNS_CAPTURE", &v))
                .transpose()?
                == Some(true);
        let drop_invalid = self.drop_invalid
            || env("INVALID_DROP")
                .map(|v| go_bool("INVALID_DROP", &v))
                .transpose()?
                == Some(true);
        // Istio excludes local ports only when every port is captured (its tunnel port is a
        // rule of its own in the Istio layout).
        let all_inbound = self.inbound_ports.trim() == "*";
        let exclude_inbound = if all_inbound {
            self.local_exclude_ports.trim()
        } else {
            ""
        };
        let flag = |b: bool| some(if b { "true" } else { "false" });
        Ok(RawOptions {
            proxy_port: some(&self.envoy_port),
            inbound_port: some(&self.inbound_capture_port),
            proxy_uid: list(&self.proxy_uid),
            proxy_gid: list(self.proxy_gid.as_deref().unwrap_or(&self.proxy_uid)),
            mode: some(mode),
            tproxy_mark: some(&self.tproxy_mark),
            tproxy_route_table: some(&self.tproxy_route_table),
            outbound_cidrs: list(&self.service_cidr),
            exclude_outbound_cidrs: list(&self.service_exclude_cidr),
            outbound_ports: list(&self.outbound_ports),
            exclude_outbound_ports: list(&self.outbound_ports_exclude),
            inbound_ports: list(&self.inbound_ports),
            exclude_inbound_ports: list(exclude_inbound),
            exclude_interfaces: list(&self.exclude_interfaces),
            virt_interfaces: list(&self.kube_virt_interfaces),
            redirect_dns: flag(redirect_dns),
            capture_all_dns: flag(self.capture_all_dns),
            drop_invalid: flag(drop_invalid),
            backend: backend.map(str::to_string),
            netns: self.network_namespace.clone(),
            ..Default::default()
        })
    }

    /// Istio's layout for a resolved config: the tunnel port, the loopback exception, the
    /// lo RETURN rules and the owner-group filter.
    pub fn layout(
        &self,
        cfg: &CaptureConfig,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<IstioLayout, ConfigError> {
        let tunnel = self.inbound_tunnel_port.trim();
        let tunnel_port = match tunnel.parse::<u16>() {
            Ok(p) if p > 0 => p,
            _ => {
                return Err(ConfigError::Invalid {
                    option: "inbound-tunnel-port (-e)",
                    value: tunnel.to_string(),
                    reason: "expected a port from 1 to 65535".into(),
                })
            }
        };
        let loopback_v4 = match env("ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR") {
            None => "127.0.0.1/32".parse().expect("literal"),
            Some(v) => match v.trim().parse::<IpNet>() {
                Ok(IpNet::V4(n)) if n.addr().is_loopback() => IpNet::V4(n.trunc()),
                _ => {
                    return Err(ConfigError::Variable {
                        name: "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR",
                        value: v,
                        reason: "expected an IPv4 CIDR inside 127.0.0.0/8, e.g. 127.0.0.1/32"
                            .into(),
                    })
                }
            },
        };
        // Istio: a -i range whose address is a loopback one drops the lo RETURN rules.
        let lo_return = match &cfg.outbound_cidrs {
            Set::All => true,
            Set::List(nets) => !nets.iter().any(|n| n.addr().is_loopback()),
        };
        let include = env("ISTIO_OUTBOUND_OWNER_GROUPS");
        let exclude = env("ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE");
        let groups = |name: &'static str, v: &str| -> Result<Vec<IdRange>, ConfigError> {
            let mut out = Vec::new();
            for item in v.split(',').map(str::trim).filter(|i| !i.is_empty()) {
                if item.chars().all(|c| c.is_ascii_digit() || c == '-') {
                    out.extend(
                        crate::config::parse_ids(name, item).map_err(|e| variable(name, e))?,
                    );
                    continue;
                }
                // A name, as iptables' owner match resolves it: in this container's groups.
                match nix::unistd::Group::from_name(item) {
                    Ok(Some(g)) => out.push(IdRange {
                        first: g.gid.as_raw(),
                        last: g.gid.as_raw(),
                    }),
                    _ => {
                        return Err(ConfigError::Variable {
                            name,
                            value: v.to_string(),
                            reason: format!(
                                "no group named '{item}' in this container's group database; \
                                 give its numeric gid"
                            ),
                        })
                    }
                }
            }
            Ok(out)
        };
        let owner_groups = match include.as_deref().map(str::trim) {
            None | Some("*") => OwnerGroups::AllExcept(match &exclude {
                Some(v) => groups("ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE", v)?,
                None => Vec::new(),
            }),
            Some(v) => {
                if exclude.as_deref().is_some_and(|e| !e.trim().is_empty()) {
                    return Err(ConfigError::Conflict(
                        "ISTIO_OUTBOUND_OWNER_GROUPS and ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE are \
                         both set: Istio ignores the exclusions then; set the exclusions with \
                         ISTIO_OUTBOUND_OWNER_GROUPS='*'"
                            .into(),
                    ));
                }
                OwnerGroups::Only(groups("ISTIO_OUTBOUND_OWNER_GROUPS", v)?)
            }
        };
        Ok(IstioLayout {
            tunnel_port,
            loopback_v4,
            lo_return,
            owner_groups,
        })
    }
}

/// Istio's IPv6 rule: IPv6 rules with --dual-stack, else only in an IPv6-only pod (one with
/// a global IPv6 address and no global IPv4 one). `addrs` are the namespace's addresses.
pub fn wants_ipv6(dual_stack: bool, addrs: &[std::net::IpAddr]) -> bool {
    use std::net::IpAddr;
    let global = |a: &&IpAddr| match a {
        IpAddr::V4(v4) => !v4.is_loopback() && !v4.is_link_local(),
        IpAddr::V6(v6) => !v6.is_loopback() && (v6.segments()[0] & 0xffc0) != 0xfe80,
    };
    let mut global = addrs.iter().filter(global);
    dual_stack || (global.clone().any(|a| a.is_ipv6()) && !global.any(|a| a.is_ipv4()))
}

/// `SHUNT_*` variables that carry `opts` to a child `shunt` process.
pub fn as_env(opts: &RawOptions) -> Vec<(String, String)> {
    let value = serde_json::to_value(opts).unwrap_or_default();
    RawOptions::KEYS
        .iter()
        .filter_map(|k| {
            let v = value.get(*k)?.as_str()?;
            Some((format!("SHUNT_{}", k.to_ascii_uppercase()), v.to_string()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        a: IstioArgs,
    }

    fn opts(args: &[&str]) -> Result<crate::config::CaptureConfig, ConfigError> {
        let mut full = vec!["t"];
        full.extend_from_slice(args);
        T::try_parse_from(full).unwrap().a.to_options()?.resolve()
    }

    #[test]
    fn injector_defaults() {
        let c = opts(&[
            "-p",
            "15001",
            "-z",
            "15006",
            "-u",
            "1337",
            "-m",
            "REDIRECT",
            "-i",
            "*",
            "-x",
            "",
            "-b",
            "*",
            "-d",
            "15090,15021,15020",
        ])
        .unwrap();
        assert_eq!(c.outbound_cidrs, crate::config::Set::All);
        assert_eq!(c.inbound_ports, crate::config::Set::All);
        let ex: Vec<u16> = match &c.exclude_inbound_ports {
            crate::config::Set::List(v) => v.iter().map(|r| r.first).collect(),
            _ => vec![],
        };
        assert_eq!(ex, [15020, 15021, 15090]);
        assert_eq!(c.proxy_gid, c.proxy_uid);
    }

    #[test]
    fn istio_defaults_capture_nothing_and_d_needs_b_star() {
        let c = opts(&["-b", "8080", "-d", "9090"]).unwrap();
        assert!(c.outbound_cidrs.is_empty());
        assert!(c.exclude_inbound_ports.is_empty());
        let c = opts(&[]).unwrap();
        assert!(c.inbound_ports.is_empty() && c.outbound_cidrs.is_empty());
    }

    #[test]
    fn bad_values_name_istio_flags() {
        let e = opts(&["-m", "TPROXY", "-t", "0"]).unwrap_err().to_string();
        assert!(e.contains("-t") && e.contains("'0'"), "{e}");
        let c = opts(&["-m", "TPROXY", "-t", "7", "-r", "77", "-b", "*"]).unwrap();
        assert_eq!(c.mode, crate::config::Mode::Tproxy);
        assert_eq!((c.tproxy_mark, c.tproxy_route_table), (7, 77));
        let e = opts(&["-m", "MAGIC"]).unwrap_err().to_string();
        assert!(e.contains("MAGIC"), "{e}");
        let e = opts(&["--capture-all-dns"]).unwrap_err().to_string();
        assert!(e.contains("--redirect-dns"), "{e}");
        let e = opts(&["-k", "an-interface-name-too-long"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("an-interface-name-too-long"), "{e}");
    }

    fn with_env(
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<crate::config::CaptureConfig, ConfigError> {
        let mut full = vec!["t"];
        full.extend_from_slice(args);
        let a = T::try_parse_from(full).unwrap().a;
        let lookup = |k: &str| {
            env.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        };
        let mut cfg = a.to_options_with(lookup)?.resolve()?;
        cfg.istio = Some(a.layout(&cfg, lookup)?);
        Ok(cfg)
    }

    #[test]
    fn layout_follows_istio() {
        let c = with_env(&["-i", "*", "-b", "*"], &[]).unwrap();
        let l = c.istio.unwrap();
        assert_eq!(l.loopback_v4.to_string(), "127.0.0.1/32");
        assert!(l.lo_return);
        assert_eq!(l.tunnel_port, 15008);
        assert_eq!(l.owner_groups, OwnerGroups::AllExcept(vec![]));
        // A loopback range in -i drops the lo RETURN rules.
        let c = with_env(&["-i", "127.1.2.3/32,10.0.0.0/8"], &[]).unwrap();
        assert!(!c.istio.unwrap().lo_return);
        let env = [
            ("ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR", "127.0.0.1/8"),
            ("ISTIO_OUTBOUND_OWNER_GROUPS", "202,1000"),
        ];
        let l = with_env(&[], &env).unwrap().istio.unwrap();
        assert_eq!(l.loopback_v4.to_string(), "127.0.0.0/8");
        assert!(matches!(l.owner_groups, OwnerGroups::Only(g) if g.len() == 2));
        let e = with_env(&[], &[("ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR", "10.0.0.0/8")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("10.0.0.0/8") && e.contains("127.0.0.0/8"), "{e}");
        let e = with_env(
            &[],
            &[("ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE", "no-such-group")],
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("no-such-group") && e.contains("numeric gid"),
            "{e}"
        );
        // Names resolve as iptables resolves them; root is gid 0 everywhere.
        let l = with_env(&[], &[("ISTIO_OUTBOUND_OWNER_GROUPS", "root,202")])
            .unwrap()
            .istio
            .unwrap();
        assert_eq!(
            l.owner_groups,
            OwnerGroups::Only(vec![
                IdRange { first: 0, last: 0 },
                IdRange {
                    first: 202,
                    last: 202
                }
            ])
        );
    }

    #[test]
    fn aliases_lists_and_refusals() {
        let c = with_env(&["-i", "*"], &[("ISTIO_META_DNS_CAPTURE", "true")]).unwrap();
        assert!(c.redirect_dns);
        let c = with_env(&[], &[("INVALID_DROP", "1")]).unwrap();
        assert!(c.drop_invalid);
        let e = with_env(&[], &[("INVALID_DROP", "maybe")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("maybe") && e.contains("INVALID_DROP"), "{e}");
        // Istio drops empty list items.
        let c = with_env(&["-b", "*", "-d", "6000,7000,"], &[]).unwrap();
        assert!(matches!(&c.exclude_inbound_ports, crate::config::Set::List(v) if v.len() == 2));
        for refused in [&["--iptables-trace-logging"][..], &["--cni-mode"]] {
            let e = with_env(refused, &[]).unwrap_err().to_string();
            assert!(e.contains(refused[0]) && e.contains("not supported"), "{e}");
        }
        let e = with_env(&["-x", "*"], &[]).unwrap_err().to_string();
        assert!(e.contains("-x"), "{e}");
        let e = with_env(
            &[
                "--native-nftables",
                "--force-iptables-binary",
                "iptables-nft",
            ],
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("--native-nftables"), "{e}");
        let c = with_env(&["--force-iptables-binary", "iptables-legacy"], &[]).unwrap();
        assert_eq!(c.backend, crate::config::BackendChoice::Legacy);
    }

    #[test]
    fn ipv6_only_where_istio_writes_it() {
        let a = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        let dual = [
            a("127.0.0.1"),
            a("::1"),
            a("10.0.0.2"),
            a("fd00::2"),
            a("fe80::1"),
        ];
        assert!(!wants_ipv6(false, &dual));
        assert!(wants_ipv6(true, &dual));
        assert!(wants_ipv6(false, &[a("::1"), a("fd00::2"), a("fe80::1")]));
        assert!(!wants_ipv6(false, &[a("127.0.0.1"), a("::1")]));
    }

    #[test]
    fn env_round_trip() {
        let o = RawOptions {
            proxy_port: Some("16001".into()),
            ..Default::default()
        };
        assert_eq!(
            as_env(&o),
            [("SHUNT_PROXY_PORT".to_string(), "16001".to_string())]
        );
    }
}
