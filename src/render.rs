//! Plan -> the arguments and text that `iptables-restore` reads.
//!
//! Rules are spelled exactly as `iptables-save` prints them (match order, `-m tcp`, `/32`),
//! so a rendered rule and a saved one compare equal token by token: `check` and the
//! idempotence of `apply` rely on it.

use std::fmt::Write as _;

use crate::plan::{Match, Owner, Plan, Proto, Rule, Ruleset, Target};

/// The rule's arguments after `-A CHAIN`, in iptables-save order.
pub fn rule_args(rule: &Rule) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let push_neg = |out: &mut Vec<String>, negate: bool, flag: &str, value: String| {
        if negate {
            out.push("!".into());
        }
        out.push(flag.into());
        out.push(value);
    };
    // iptables-save prints the IP header fields first, in this order, then the matches.
    for m in &rule.matches {
        if let Match::Source { net, negate } = m {
            push_neg(&mut out, *negate, "-s", net.to_string());
        }
    }
    for m in &rule.matches {
        if let Match::Destination { net, negate } = m {
            push_neg(&mut out, *negate, "-d", net.to_string());
        }
    }
    for m in &rule.matches {
        if let Match::InInterface { name, negate } = m {
            push_neg(&mut out, *negate, "-i", name.clone());
        }
    }
    for m in &rule.matches {
        if let Match::OutInterface { name, negate } = m {
            push_neg(&mut out, *negate, "-o", name.clone());
        }
    }
    let proto = rule.matches.iter().find_map(|m| match m {
        Match::Protocol(p) => Some(*p),
        _ => None,
    });
    if let Some(p) = proto {
        out.extend(["-p".into(), p.as_str().into()]);
    }
    // The port matches belong to the protocol's own module (`-m tcp`, `-m udp`).
    let proto_module = proto.unwrap_or(Proto::Tcp).as_str();
    for m in &rule.matches {
        match m {
            Match::DestinationPorts { ports, negate } if ports.len() == 1 => {
                out.extend(["-m".into(), proto_module.into()]);
                push_neg(&mut out, *negate, "--dport", ports[0].to_string());
            }
            Match::SourcePort(port) => {
                out.extend(["-m".into(), proto_module.into()]);
                out.extend(["--sport".into(), port.to_string()]);
            }
            Match::CtInvalid => {
                out.extend(["-m", "conntrack", "--ctstate", "INVALID"].map(String::from));
            }
            Match::CtEstablished => {
                out.extend(
                    ["-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED"].map(String::from),
                );
            }
            Match::Mark(m) => {
                out.extend([
                    "-m".into(),
                    "mark".into(),
                    "--mark".into(),
                    format!("{m:#x}"),
                ]);
            }
            Match::Connmark(m) => {
                out.extend([
                    "-m".into(),
                    "connmark".into(),
                    "--mark".into(),
                    format!("{m:#x}"),
                ]);
            }
            Match::DestinationPorts { ports, negate } => {
                out.extend(["-m".into(), "multiport".into()]);
                let list: Vec<String> = ports.iter().map(|p| p.to_string()).collect();
                push_neg(&mut out, *negate, "--dports", list.join(","));
            }
            Match::Owner { kind, id, negate } => {
                out.extend(["-m".into(), "owner".into()]);
                let flag = match kind {
                    Owner::Uid => "--uid-owner",
                    Owner::Gid => "--gid-owner",
                };
                push_neg(&mut out, *negate, flag, id.to_string());
            }
            _ => {}
        }
    }
    match &rule.target {
        Target::Jump { chain } => out.extend(["-j".into(), chain.to_string()]),
        Target::Return => out.extend(["-j".into(), "RETURN".into()]),
        Target::Redirect { to_port } => out.extend([
            "-j".into(),
            "REDIRECT".into(),
            "--to-ports".into(),
            to_port.to_string(),
        ]),
        Target::Drop => out.extend(["-j".into(), "DROP".into()]),
        Target::Accept => out.extend(["-j".into(), "ACCEPT".into()]),
        Target::SetMark { mark } => out.extend([
            "-j".into(),
            "MARK".into(),
            "--set-xmark".into(),
            format!("{mark:#x}/0xffffffff"),
        ]),
        Target::SaveMark | Target::RestoreMark => {
            let verb = if rule.target == Target::SaveMark {
                "--save-mark"
            } else {
                "--restore-mark"
            };
            out.extend(
                [
                    "-j",
                    "CONNMARK",
                    verb,
                    "--nfmask",
                    "0xffffffff",
                    "--ctmask",
                    "0xffffffff",
                ]
                .map(String::from),
            );
        }
        Target::Tproxy { to_port, mark } => {
            let any = if rule_is_v6(rule) { "::" } else { "0.0.0.0" };
            out.extend([
                "-j".into(),
                "TPROXY".into(),
                "--on-port".into(),
                to_port.to_string(),
                "--on-ip".into(),
                any.into(),
                "--tproxy-mark".into(),
                format!("{mark:#x}/0xffffffff"),
            ]);
        }
        Target::CtZone { zone } => {
            out.extend(["-j".into(), "CT".into(), "--zone".into(), zone.to_string()])
        }
    }
    out
}

/// The family of a rule, from its addresses (TPROXY's `--on-ip` is spelled per family).
fn rule_is_v6(rule: &Rule) -> bool {
    rule.matches.iter().any(|m| {
        matches!(
            m,
            Match::Source {
                net: ipnet::IpNet::V6(_),
                ..
            } | Match::Destination {
                net: ipnet::IpNet::V6(_),
                ..
            }
        )
    })
}

/// Joins arguments for a restore file, quoting the ones that need it. Inside quotes
/// iptables-restore takes the character after a backslash as it is, so both `\` and `"` are
/// escaped there (as iptables-save does); outside quotes a backslash is literal.
pub fn join_args(args: &[String]) -> String {
    let mut s = String::new();
    for (i, a) in args.iter().enumerate() {
        if i > 0 {
            s.push(' ');
        }
        if a.is_empty() || a.contains(|c: char| c.is_whitespace() || c == '"') {
            let escaped = a.replace('\\', "\\\\").replace('"', "\\\"");
            let _ = write!(s, "\"{escaped}\"");
        } else {
            s.push_str(a);
        }
    }
    s
}

/// One family as a complete `iptables-restore` input (what `render` prints). Applying uses
/// [`crate::netfilter`]'s converging script instead, which never flushes foreign rules.
pub fn restore_text(rs: &Ruleset) -> String {
    let mut s = String::new();
    for table in &rs.tables {
        let _ = writeln!(s, "*{}", table.name.as_str());
        for c in table.chains.iter().filter(|c| !c.builtin) {
            let _ = writeln!(s, ":{} - [0:0]", c.name);
        }
        for c in &table.chains {
            for r in &c.rules {
                let _ = writeln!(s, "-A {} {}", c.name, join_args(&rule_args(r)));
            }
        }
        s.push_str("COMMIT\n");
    }
    s
}

/// The whole plan as text: IPv4 then IPv6, each under a comment header.
pub fn plan_text(plan: &Plan) -> String {
    let mut s = String::new();
    for rs in plan.families() {
        let tool = match rs.family {
            crate::plan::Family::V4 => "iptables-restore",
            crate::plan::Family::V6 => "ip6tables-restore",
        };
        let _ = writeln!(
            s,
            "# {} rules (input for {tool} --noflush)",
            rs.family.name()
        );
        s.push_str(&restore_text(rs));
    }
    if plan.v6.is_none() {
        s.push_str("# IPv6: off\n");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{CaptureConfig, RawOptions};
    use crate::plan;

    /// Compares with a golden file; `SHUNT_BLESS=1 cargo test --lib render` rewrites them
    /// instead (then review the diff).
    fn golden(want: &str, name: &str, text: &str) {
        if std::env::var_os("SHUNT_BLESS").is_some() {
            let path = format!("{}/tests/fixtures/{name}.rules", env!("CARGO_MANIFEST_DIR"));
            std::fs::write(&path, text).expect("write golden");
            return;
        }
        assert_eq!(text, want, "rendered:\n{text}");
    }

    /// The default plan, IPv4 then IPv6, as a golden text: reviewing a change to the rules
    /// means reviewing a diff of this.
    #[test]
    fn default_plan_golden() {
        let text = plan_text(&plan::build(&CaptureConfig::default(), true));
        golden(
            include_str!("../tests/fixtures/default.rules"),
            "default",
            &text,
        );
    }

    #[test]
    fn exclusions_golden() {
        let cfg = RawOptions {
            outbound_cidrs: Some("10.0.0.0/8,fd00::/8".into()),
            exclude_outbound_cidrs: Some("10.96.0.1/32".into()),
            outbound_ports: Some("3306".into()),
            exclude_outbound_ports: Some("22,8000-8100".into()),
            inbound_ports: Some("80,443".into()),
            exclude_inbound_ports: Some("9090".into()),
            exclude_interfaces: Some("eth9".into()),
            proxy_uid: Some("1337,2000-2002".into()),
            proxy_gid: Some("".into()),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        let text = plan_text(&plan::build(&cfg, true));
        golden(
            include_str!("../tests/fixtures/exclusions.rules"),
            "exclusions",
            &text,
        );
    }

    #[test]
    fn dns_virt_interfaces_and_drop_invalid_golden() {
        let cfg = RawOptions {
            redirect_dns: Some("true".into()),
            dns_servers: Some("10.96.0.10,fd00::a".into()),
            virt_interfaces: Some("eth1".into()),
            drop_invalid: Some("true".into()),
            proxy_gid: Some("".into()),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        let text = plan_text(&plan::build(&cfg, true));
        golden(
            include_str!("../tests/fixtures/dns-virt-invalid.rules"),
            "dns-virt-invalid",
            &text,
        );
    }

    #[test]
    fn tproxy_golden() {
        let cfg = RawOptions {
            mode: Some("tproxy".into()),
            inbound_ports: Some("80,443".into()),
            exclude_interfaces: Some("eth9".into()),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        let text = plan_text(&plan::build(&cfg, true));
        golden(
            include_str!("../tests/fixtures/tproxy.rules"),
            "tproxy",
            &text,
        );
    }

    /// `shunt istio-iptables` with the injector's flags, and TPROXY with DNS capture and dual
    /// stack: Istio's layout in shunt's chains (what tests/istio_differential.rs proves equal).
    #[test]
    fn istio_layout_goldens() {
        let layout = crate::config::IstioLayout {
            tunnel_port: 15008,
            loopback_v4: "127.0.0.1/32".parse().unwrap(),
            lo_return: true,
            owner_groups: crate::config::OwnerGroups::AllExcept(vec![]),
        };
        let mut injector = RawOptions {
            outbound_cidrs: Some("*".into()),
            inbound_ports: Some("*".into()),
            exclude_inbound_ports: Some("15090,15021,15020".into()),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        injector.istio = Some(layout.clone());
        let text = plan_text(&plan::build(&injector, false));
        golden(
            include_str!("../tests/fixtures/istio-injector.rules"),
            "istio-injector",
            &text,
        );
        let mut tproxy = RawOptions {
            mode: Some("tproxy".into()),
            outbound_cidrs: Some("*".into()),
            inbound_ports: Some("*".into()),
            redirect_dns: Some("true".into()),
            dns_servers: Some("10.96.0.10,fd00::a".into()),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        tproxy.istio = Some(layout);
        let text = plan_text(&plan::build(&tproxy, true));
        golden(
            include_str!("../tests/fixtures/istio-tproxy-dns.rules"),
            "istio-tproxy-dns",
            &text,
        );
    }

    #[test]
    fn quoting() {
        let args = vec!["--comment".to_string(), "a b".to_string(), "x".to_string()];
        assert_eq!(join_args(&args), "--comment \"a b\" x");
    }

    /// Shrunk by tests/properties.rs: `--exclude-interfaces '"\'` rendered `-i "\"\"`, whose
    /// closing quote is escaped, so neither iptables-restore nor `rules::parse` could read it.
    #[test]
    fn quoted_arguments_read_back_as_written() {
        assert_eq!(join_args(&[r#""\"#.to_string()]), r#""\"\\""#);
        for arg in [r#""\"#, r" \", r#"a\"b"#, r"a\b", "", "a b", "x"] {
            let line = join_args(&[arg.to_string(), "y".to_string()]);
            assert_eq!(crate::rules::tokenize(&line).unwrap(), [arg, "y"], "{line}");
        }
    }
}
