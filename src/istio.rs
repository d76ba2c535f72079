//! `shunt istio-iptables`: Istio's `istio-iptables` flags and environment variables, with
//! Istio's meanings and defaults, translated into shunt's options. An `istio-init` container
//! can run shunt's image with its arguments unchanged (`istio-iptables -p 15001 ...`).
//!
//! Where Istio's defaults differ from shunt's, Istio's win here: no `-i` means no outbound
//! capture, no `-b` means no inbound capture, and `-d` counts only with `-b '*'`.

use crate::config::{ConfigError, RawOptions};

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
    /// Drop conntrack-INVALID inbound packets
    #[arg(long = "drop-invalid", env = "INVALID_DROP")]
    pub drop_invalid: bool,
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

impl IstioArgs {
    /// The equivalent shunt options; errors name Istio's flag.
    pub fn to_options(&self) -> Result<RawOptions, ConfigError> {
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
        // Istio excludes local ports (and its tunnel port) only when every port is captured.
        let all_inbound = self.inbound_ports.trim() == "*";
        let exclude_inbound = if all_inbound {
            [
                self.local_exclude_ports.trim(),
                self.inbound_tunnel_port.trim(),
            ]
            .into_iter()
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>()
            .join(",")
        } else {
            String::new()
        };
        let flag = |b: bool| some(if b { "true" } else { "false" });
        Ok(RawOptions {
            proxy_port: some(&self.envoy_port),
            inbound_port: some(&self.inbound_capture_port),
            proxy_uid: some(&self.proxy_uid),
            proxy_gid: some(self.proxy_gid.as_deref().unwrap_or(&self.proxy_uid)),
            mode: some(mode),
            tproxy_mark: some(&self.tproxy_mark),
            tproxy_route_table: some(&self.tproxy_route_table),
            outbound_cidrs: some(&self.service_cidr),
            exclude_outbound_cidrs: some(&self.service_exclude_cidr),
            outbound_ports: some(&self.outbound_ports),
            exclude_outbound_ports: some(&self.outbound_ports_exclude),
            inbound_ports: some(&self.inbound_ports),
            exclude_inbound_ports: some(&exclude_inbound),
            exclude_interfaces: some(&self.exclude_interfaces),
            virt_interfaces: some(&self.kube_virt_interfaces),
            redirect_dns: flag(self.redirect_dns),
            capture_all_dns: flag(self.capture_all_dns),
            drop_invalid: flag(self.drop_invalid),
            backend: self.native_nftables.then(|| "nftables".to_string()),
            ..Default::default()
        })
    }
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
        assert_eq!(ex, [15008, 15020, 15021, 15090]);
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
