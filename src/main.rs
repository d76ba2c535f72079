//! The `shunt` command line: clap surface and exit codes only; the work is in the library.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use shunt::config::{self, CaptureArgs, ConfigError};
use shunt::{capture, cni, exit, explain, istio, logging, plan, proxy, render, Error};

#[derive(Parser)]
#[command(
    name = "shunt",
    version,
    about = "Capture a pod's TCP traffic with netfilter and hand it to a sidecar proxy",
    after_help = "Examples:\n  shunt render                      # the default rules, as iptables-restore input\n  shunt apply --netns /run/netns/pod --exclude-outbound-cidrs 10.96.0.1/32\n  shunt check --netns /run/netns/pod || echo drifted\n  shunt clean --netns /run/netns/pod\n\nIstio users: `shunt istio-iptables -p 15001 -u 1337 ...` takes istio-iptables' flags (see its --help).\n\nExit codes: 0 ok, 1 runtime failure (nothing applied), 2 usage or config error, 3 drift (check), 4 validation failed."
)]
struct Cli {
    /// More logging (-v debug, -vv trace); RUST_LOG filters take precedence
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Less logging (-q warnings only, -qq errors only)
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    quiet: u8,
    /// Log format on stderr
    #[arg(
        long,
        value_enum,
        default_value_t,
        global = true,
        env = "SHUNT_LOG_FORMAT"
    )]
    log_format: logging::LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
enum Format {
    #[default]
    Text,
    Json,
}

#[derive(clap::Args)]
struct Output {
    /// Output format
    #[arg(long, value_enum, default_value_t)]
    format: Format,
    /// Shorthand for --format json
    #[arg(long)]
    json: bool,
}

impl Output {
    fn json(&self) -> bool {
        self.json || self.format == Format::Json
    }
}

#[derive(Subcommand)]
enum Command {
    /// Print the rules for these options as iptables-restore input (IPv4 then IPv6); no root needed
    #[command(
        after_help = "Examples:\n  shunt render\n  shunt render --inbound-ports 80,443 --exclude-outbound-ports 22 --ipv6 off\n  shunt render --config capture.toml --json"
    )]
    Render {
        #[command(flatten)]
        capture: CaptureArgs,
        #[command(flatten)]
        output: Output,
    },
    /// Install the rules in a namespace, atomically per family and idempotently
    #[command(
        after_help = "Examples:\n  shunt apply                                  # the current namespace (an initContainer)\n  shunt apply --netns /run/netns/pod --dry-run # what would change\n  SHUNT_EXCLUDE_OUTBOUND_PORTS=22 shunt apply --backend legacy"
    )]
    Apply {
        #[command(flatten)]
        capture: CaptureArgs,
        /// Print what would change and change nothing
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        output: Output,
    },
    /// Remove every SHUNT_* chain and the jumps into them (both families, every table)
    #[command(after_help = "Examples:\n  shunt clean\n  shunt clean --netns /proc/4242/ns/net")]
    Clean {
        #[command(flatten)]
        capture: CaptureArgs,
        #[command(flatten)]
        output: Output,
    },
    /// Compare the installed rules with the plan for these options; exit 3 on drift
    #[command(
        after_help = "Examples:\n  shunt check --netns /run/netns/pod\n  shunt check --inbound-ports 80 --json"
    )]
    Check {
        #[command(flatten)]
        capture: CaptureArgs,
        #[command(flatten)]
        output: Output,
    },
    /// Run the redirect-aware proxy
    Proxy(proxy::ProxyArgs),
    /// Walk a packet through the rules and say where it goes, and why
    Explain(explain::ExplainArgs),
    /// Check a namespace's capture set-up: one line per check, non-zero exit on failure
    Doctor(explain::DoctorArgs),
    /// Prove that a new outbound connection really reaches the capture port
    Validate(explain::ValidateArgs),
    /// Install or remove the CNI chained plugin on a node
    #[command(subcommand)]
    Cni(CniCommand),
    /// Print shell completions
    #[command(after_help = "Examples:\n  shunt completions bash > /etc/bash_completion.d/shunt")]
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Subcommand)]
enum CniCommand {
    /// Copy the binary to the CNI bin dir and append shunt to the primary conflist
    #[command(
        after_help = "Examples:\n  shunt cni install --conf-dir /etc/cni/net.d --bin-dir /opt/cni/bin\n  shunt cni install --options '{\"exclude_outbound_cidrs\": \"169.254.169.254/32\"}'"
    )]
    Install {
        #[arg(long, default_value = "/etc/cni/net.d", env = "SHUNT_CNI_CONF_DIR")]
        conf_dir: PathBuf,
        #[arg(long, default_value = "/opt/cni/bin", env = "SHUNT_CNI_BIN_DIR")]
        bin_dir: PathBuf,
        /// Extra keys for shunt's conflist entry (capture options, skip_namespaces), as JSON
        #[arg(long, default_value = "{}", env = "SHUNT_CNI_OPTIONS")]
        options: String,
    },
    /// Remove shunt from the primary conflist and the binary from the CNI bin dir
    Uninstall {
        #[arg(long, default_value = "/etc/cni/net.d", env = "SHUNT_CNI_CONF_DIR")]
        conf_dir: PathBuf,
        #[arg(long, default_value = "/opt/cni/bin", env = "SHUNT_CNI_BIN_DIR")]
        bin_dir: PathBuf,
    },
}

fn print(text: &str) {
    // A closed pipe (`shunt render | head`) is not an error worth a panic.
    let _ = std::io::stdout().write_all(text.as_bytes());
}

fn print_json(value: &impl serde::Serialize) {
    match serde_json::to_string_pretty(value) {
        Ok(s) => print(&(s + "\n")),
        Err(e) => tracing::error!("cannot encode JSON: {e}"),
    }
}

fn run(cli: Cli) -> Result<i32, Error> {
    match cli.command {
        Command::Render { capture, output } => {
            let resolved = capture.resolve()?;
            let cfg = capture::settle(&resolved);
            // Without a namespace to look at, `auto` renders both families.
            let plan = plan::build(&cfg, cfg.ipv6 != config::Ipv6::Off);
            if output.json() {
                print_json(&serde_json::json!({ "config": *cfg, "plan": plan }));
            } else if cfg.backend == config::BackendChoice::Nftables {
                print(&shunt::nftables::transaction(&plan));
            } else {
                print(&render::plan_text(&plan));
            }
            Ok(exit::OK)
        }
        Command::Apply {
            capture,
            dry_run,
            output,
        } => {
            let cfg = capture.resolve()?;
            let report = capture::apply(&cfg, dry_run)?;
            for (family, script) in &report.changes {
                let verb = if dry_run { "would apply" } else { "applied" };
                tracing::info!(
                    "{verb} {} rules ({} backend):\n{}",
                    family.name(),
                    report.backend.name(),
                    script.trim_end()
                );
            }
            if report.changes.is_empty() {
                tracing::info!(
                    backend = report.backend.name(),
                    "rules already match the plan; nothing changed"
                );
            }
            if output.json() {
                print_json(&report);
            } else if dry_run {
                for (family, script) in &report.changes {
                    print(&format!("# {} changes\n{script}", family.name()));
                }
            }
            Ok(exit::OK)
        }
        Command::Clean { capture, output } => {
            let cfg = capture.resolve()?;
            let report = capture::clean(&cfg)?;
            for (backend, family, script) in &report.removed {
                tracing::info!(
                    "removed {} rules ({} backend):\n{}",
                    family.name(),
                    backend.name(),
                    script.trim_end()
                );
            }
            if report.removed.is_empty() {
                tracing::info!("no shunt rules found; nothing to remove");
            }
            if output.json() {
                print_json(&report);
            }
            Ok(exit::OK)
        }
        Command::Check { capture, output } => {
            let cfg = capture.resolve()?;
            let report = capture::check(&cfg)?;
            if output.json() {
                print_json(&serde_json::json!({
                    "in_sync": report.in_sync(),
                    "backend": report.backend,
                    "ipv6": report.ipv6,
                    "drift": report.drift,
                }));
            } else if report.in_sync() {
                print("in sync: the installed rules match the plan\n");
            } else {
                print(&capture::drift_text(&report));
            }
            Ok(if report.in_sync() {
                exit::OK
            } else {
                exit::DRIFT
            })
        }
        Command::Proxy(args) => proxy::run(args).map(|()| exit::OK).map_err(Error::from),
        Command::Explain(args) => explain::run_explain(args),
        Command::Doctor(args) => explain::run_doctor(args),
        Command::Validate(args) => explain::run_validate(args),
        Command::Cni(CniCommand::Install {
            conf_dir,
            bin_dir,
            options,
        }) => {
            let options = cni::install::parse_options(&options)?;
            let done = cni::install::install(&conf_dir, Some(&bin_dir), &options)?;
            tracing::info!(
                conflist = %done.conflist.display(),
                changed = done.changed,
                "shunt is in the CNI chain"
            );
            Ok(exit::OK)
        }
        Command::Cni(CniCommand::Uninstall { conf_dir, bin_dir }) => {
            let changed = cni::install::uninstall(&conf_dir, Some(&bin_dir))?;
            tracing::info!(changed, "shunt removed from the CNI chain");
            Ok(exit::OK)
        }
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "shunt", &mut std::io::stdout());
            Ok(exit::OK)
        }
    }
}

/// `shunt istio-iptables ...`: Istio's own flag space (its `-q` is not shunt's `--quiet`), so it
/// has a command line of its own.
#[derive(Parser)]
#[command(
    name = "shunt istio-iptables",
    about = "Istio's istio-iptables, flag for flag: run shunt's image as an unchanged istio-init",
    after_help = "Examples:\n  shunt istio-iptables -p 15001 -z 15006 -u 1337 -m REDIRECT -i '*' -x '' -b '*' -d 15090,15021,15020\n  shunt istio-iptables -p 15001 -u 1337 -i '*' --redirect-dns -n      # print the rules\n  shunt istio-iptables -i '*' -b '*' --check     # do the installed rules match?\n  shunt istio-iptables --cleanup-only\n\nThe rules are Istio's, in Istio's order, in SHUNT_* chains; see the README's \"Coming from Istio\"."
)]
struct IstioCli {
    #[command(flatten)]
    istio: istio::IstioArgs,
    /// Network namespace to act in [default: current]
    #[arg(long, env = "SHUNT_NETNS")]
    netns: Option<String>,
    /// Log format on stderr
    #[arg(long, value_enum, default_value_t, env = "SHUNT_LOG_FORMAT")]
    log_format: logging::LogFormat,
}

fn spawn_error(e: std::io::Error) -> Error {
    Error::Netfilter(shunt::netfilter::NetfilterError::Spawn {
        tool: "shunt validate".into(),
        source: e,
    })
}

/// The addresses of the namespace `netns` names (the current one without it).
fn namespace_addrs(netns: Option<&str>) -> Result<Vec<std::net::IpAddr>, Error> {
    let read = || -> Vec<std::net::IpAddr> {
        nix::ifaddrs::getifaddrs()
            .map(|all| {
                all.filter_map(|i| {
                    let a = i.address?;
                    a.as_sockaddr_in()
                        .map(|s| std::net::IpAddr::V4(s.ip()))
                        .or_else(|| a.as_sockaddr_in6().map(|s| std::net::IpAddr::V6(s.ip())))
                })
                .collect()
            })
            .unwrap_or_default()
    };
    Ok(match netns {
        Some(path) => shunt::netns::Netns::open(std::path::Path::new(path))?.run(read)?,
        None => read(),
    })
}

fn run_istio(cli: IstioCli) -> Result<i32, Error> {
    let IstioCli { istio, netns, .. } = cli;
    let env = |k: &str| std::env::var(k).ok();
    let mut raw = istio.to_options_with(env)?;
    if netns.is_some() {
        raw.netns = netns;
    }
    let dual_stack = istio.dual_stack(&env)?;
    if istio.iptables_probe_port.is_some() {
        tracing::warn!(
            "--iptables-probe-port is not used: shunt validate listens on the outbound port itself"
        );
    }
    if let Some(level) = &istio.log_output_level {
        tracing::debug!("--log_output_level={level}: shunt's log level comes from RUST_LOG");
    }
    let mut cfg = raw.resolve()?;
    cfg.istio = Some(istio.layout(&cfg, env)?);
    let ipv6 = istio::wants_ipv6(dual_stack, &namespace_addrs(raw.netns.as_deref())?);
    cfg.ipv6 = if ipv6 {
        shunt::config::Ipv6::On
    } else {
        shunt::config::Ipv6::Off
    };
    raw.ipv6 = Some(if ipv6 { "on" } else { "off" }.to_string());
    match istio.action() {
        istio::Action::Clean => {
            let report = capture::clean(&cfg)?;
            for (engine, part, _) in &report.removed {
                tracing::info!("removed shunt's rules: {engine:?} {part:?}");
            }
            return Ok(exit::OK);
        }
        istio::Action::Check => {
            let report = capture::check(&cfg)?;
            if report.in_sync() {
                print("in sync: the installed rules match these istio-iptables flags\n");
                return Ok(exit::OK);
            }
            print(&capture::drift_text(&report));
            return Ok(exit::DRIFT);
        }
        istio::Action::Nothing => tracing::info!("--skip-rule-apply: rules left as they are"),
        istio::Action::Apply => {
            let report = capture::apply(&cfg, istio.dry_run)?;
            for (family, script) in &report.changes {
                let verb = if istio.dry_run {
                    "would apply"
                } else {
                    "applied"
                };
                tracing::info!("{verb} {} rules:\n{}", family.name(), script.trim_end());
                if istio.dry_run {
                    print(&format!("# {} changes\n{script}", family.name()));
                }
            }
        }
    }
    if istio.run_validation && !istio.dry_run {
        // The same check as `shunt validate`, with the options translated above.
        let exe = std::env::current_exe().map_err(spawn_error)?;
        let mut cmd = std::process::Command::new(exe);
        cmd.arg("validate").envs(istio::as_env(&raw));
        if let Some(t) = &istio.probe_timeout {
            cmd.args(["--timeout", t.trim()]);
        }
        let status = cmd.status().map_err(spawn_error)?;
        return Ok(status.code().unwrap_or(exit::FAILURE));
    }
    Ok(exit::OK)
}

fn main() -> ExitCode {
    // A container runtime runs CNI plugins with CNI_COMMAND set and the config on stdin.
    if let Ok(command) = std::env::var("CNI_COMMAND") {
        return ExitCode::from(cni::run_plugin(&command) as u8);
    }
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == "istio-iptables") {
        args.remove(0);
        let cli = IstioCli::parse_from(args);
        logging::init(0, cli.log_format);
        return finish(run_istio(cli));
    }
    let cli = Cli::parse_from(args.clone());
    logging::init(cli.verbose as i8 - cli.quiet as i8, cli.log_format);
    let result = run(cli);
    if let Err(e @ Error::Config(ConfigError::Invalid { option, .. })) = &result {
        if let Some(origin) = config::origin_of(option, &args, |k| std::env::var(k).ok()) {
            tracing::error!("{e} ({origin})");
            return ExitCode::from(e.exit_code() as u8);
        }
    }
    finish(result)
}

fn finish(result: Result<i32, Error>) -> ExitCode {
    let code = match result {
        Ok(code) => code,
        Err(e) => {
            tracing::error!("{e}");
            e.exit_code()
        }
    };
    ExitCode::from(code as u8)
}
