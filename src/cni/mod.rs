//! The CNI chained plugin (SPEC §5): the same binary, run by a container runtime with
//! `CNI_COMMAND` set, installs the capture plan in the pod's namespace with the same code as
//! `shunt apply`. Results and errors are JSON on stdout; logs go to stderr or a file.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::capture;
use crate::config::{BackendChoice, RawOptions};

pub mod install;
mod splice;

pub const SUPPORTED_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
const ANNOTATIONS_KEY: &str = "io.kubernetes.cri.pod-annotations";
const ANNOTATION_PREFIX: &str = "shunt.dev/";

/// CNI's well-known error codes (spec, "Error") and one of shunt's own (>= 100).
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const INVALID_ENV: u32 = 4;
    pub const IO: u32 = 5;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const NOT_AVAILABLE: u32 = 50;
    /// CHECK: the installed rules are not the plan.
    pub const DRIFT: u32 = 100;
}

/// A CNI error: printed as the spec's error JSON, exit status 1.
#[derive(Debug, thiserror::Error)]
#[error("CNI error {code}: {msg}")]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

fn cni_err(code: u32, msg: impl Into<String>, details: impl Into<String>) -> CniError {
    CniError {
        code,
        msg: msg.into(),
        details: details.into(),
    }
}

/// This plugin's entry of a conflist: CNI's own keys, shunt's, and the capture options.
/// `name` and the log keys are read here so they are not mistaken for capture options.
#[allow(dead_code)]
#[derive(Debug, Deserialize)]
struct NetConf {
    #[serde(rename = "cniVersion", default)]
    cni_version: String,
    #[serde(default)]
    name: String,
    #[serde(rename = "prevResult")]
    prev_result: Option<Value>,
    #[serde(rename = "runtimeConfig", default)]
    runtime_config: Map<String, Value>,
    #[serde(default = "default_skip")]
    skip_namespaces: Vec<String>,
    #[serde(default)]
    log_file: Option<PathBuf>,
    #[serde(default)]
    log_level: Option<String>,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

fn default_skip() -> Vec<String> {
    vec!["kube-system".into()]
}

/// Keys CNI itself or the runtime put in a plugin's config: not capture options.
const CNI_KEYS: [&str; 4] = ["type", "capabilities", "args", "dns"];

impl NetConf {
    fn parse(stdin: &[u8]) -> Result<NetConf, CniError> {
        serde_json::from_slice(stdin).map_err(|e| {
            cni_err(
                code::DECODE,
                "cannot decode the network configuration on stdin",
                e.to_string(),
            )
        })
    }

    /// The capture options in the conflist entry, as the raw layer (keys as in TOML).
    fn options(&self) -> Result<RawOptions, CniError> {
        let mut m = self.rest.clone();
        for k in CNI_KEYS {
            m.remove(k);
        }
        serde_json::from_value(Value::Object(m)).map_err(|e| {
            cni_err(
                code::INVALID_CONFIG,
                "invalid shunt plugin configuration",
                e.to_string(),
            )
        })
    }

    fn annotations(&self) -> BTreeMap<String, String> {
        self.runtime_config
            .get(ANNOTATIONS_KEY)
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string())))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Per-pod overrides: `shunt.dev/<flag-name>` annotations, e.g.
/// `shunt.dev/exclude-outbound-cidrs: "10.0.0.0/8"`. `inject` is the opt-out, not an option.
fn annotation_options(annotations: &BTreeMap<String, String>) -> Result<RawOptions, CniError> {
    let mut m = Map::new();
    for (k, v) in annotations {
        let Some(name) = k.strip_prefix(ANNOTATION_PREFIX) else {
            continue;
        };
        if name == "inject" {
            continue;
        }
        m.insert(name.replace('-', "_"), Value::String(v.clone()));
    }
    serde_json::from_value(Value::Object(m)).map_err(|e| {
        cni_err(
            code::INVALID_CONFIG,
            "invalid shunt.dev/ pod annotation",
            e.to_string(),
        )
    })
}

/// `K8S_POD_NAMESPACE=a;K8S_POD_NAME=b;IgnoreUnknown=1` -> map; unknown keys are kept but
/// never an error.
fn cni_args(s: &str) -> BTreeMap<String, String> {
    s.split(';')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|s| !s.is_empty())
}

/// The variables the CNI spec requires for each command (its "Parameters" for each
/// operation); DEL may come without `CNI_NETNS`, whose namespace may be gone already.
fn required_env(command: &str) -> &'static [&'static str] {
    match command {
        "ADD" | "CHECK" => &["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"],
        "DEL" => &["CNI_CONTAINERID", "CNI_IFNAME"],
        _ => &[],
    }
}

fn require_env(name: &str, command: &str) -> Result<String, CniError> {
    env(name).ok_or_else(|| {
        cni_err(
            code::INVALID_ENV,
            format!("{name} is not set (or empty)"),
            format!(
                "the CNI spec requires it for {command}; container runtimes set it (set it too \
                 when running the plugin by hand); nothing was changed"
            ),
        )
    })
}

/// The previous plugin's result, when there is one: it must be a CNI result, an object.
fn prev_result(conf: &NetConf) -> Result<Option<&Map<String, Value>>, CniError> {
    match &conf.prev_result {
        None => Ok(None),
        Some(Value::Object(m)) => Ok(Some(m)),
        Some(other) => Err(cni_err(
            code::DECODE,
            format!(
                "prevResult must be a CNI result object, not {}",
                describe(other)
            ),
            "the runtime passes the previous plugin's result (an object with cniVersion, \
             interfaces, ips) as prevResult; nothing was changed",
        )),
    }
}

/// What kind of JSON value `v` is, with the value itself when it is short.
fn describe(v: &Value) -> String {
    let kind = match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    };
    let text = v.to_string();
    if text.len() <= 40 {
        format!("{kind} ({text})")
    } else {
        kind.to_string()
    }
}

fn check_version(v: &str) -> Result<(), CniError> {
    if SUPPORTED_VERSIONS.contains(&v) {
        Ok(())
    } else {
        Err(cni_err(
            code::INCOMPATIBLE_VERSION,
            format!("cniVersion {v:?} is not supported"),
            format!("supported: {}", SUPPORTED_VERSIONS.join(", ")),
        ))
    }
}

/// Why this pod is left alone, if it is.
fn skip_reason(conf: &NetConf) -> Option<String> {
    let args = cni_args(&env("CNI_ARGS").unwrap_or_default());
    if let Some(ns) = args.get("K8S_POD_NAMESPACE") {
        if conf.skip_namespaces.iter().any(|s| s == ns) {
            return Some(format!("namespace {ns} is in skip_namespaces"));
        }
    }
    match conf
        .annotations()
        .get("shunt.dev/inject")
        .map(String::as_str)
    {
        Some("false") | Some("disabled") => Some("annotation shunt.dev/inject is false".into()),
        _ => None,
    }
}

/// The capture config for this pod: annotations > conflist entry > defaults, in `CNI_NETNS`.
fn pod_config(conf: &NetConf, netns: &str) -> Result<crate::config::CaptureConfig, CniError> {
    let mut raw = annotation_options(&conf.annotations())?.layer(conf.options()?);
    raw.netns = Some(netns.to_string());
    raw.resolve()
        .map_err(|e| cni_err(code::INVALID_CONFIG, e.to_string(), "nothing was applied"))
}

fn netns_gone(netns: &str) -> bool {
    !Path::new(netns).exists()
}

/// The `cniVersion` the runtime asked for (the newest when it did not say).
fn requested_version(stdin: &[u8]) -> String {
    serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| v.get("cniVersion")?.as_str().map(String::from))
        .unwrap_or_else(|| "1.1.0".into())
}

/// Runs one CNI command; `Ok(Some(json))` is printed on stdout, `Ok(None)` prints nothing.
fn dispatch(command: &str, stdin: &[u8]) -> Result<Option<Value>, CniError> {
    if command == "VERSION" {
        let requested = requested_version(stdin);
        return Ok(Some(json!({
            "cniVersion": requested,
            "supportedVersions": SUPPORTED_VERSIONS,
        })));
    }
    let conf = NetConf::parse(stdin)?;
    check_version(&conf.cni_version)?;
    for name in required_env(command) {
        require_env(name, command)?;
    }
    match command {
        "ADD" => {
            let mut result = prev_result(&conf)?.cloned().ok_or_else(|| {
                cni_err(
                    code::INVALID_CONFIG,
                    "shunt is a chained plugin and got no prevResult",
                    "list it after an interface plugin (bridge, ptp, calico, ...) in the conflist",
                )
            })?;
            if let Some(why) = skip_reason(&conf) {
                tracing::info!("ADD: skipping pod ({why})");
            } else {
                let netns = require_env("CNI_NETNS", command)?;
                let cfg = pod_config(&conf, &netns)?;
                let report = capture::apply(&cfg, false).map_err(|e| {
                    let c = if e.exit_code() == crate::exit::USAGE {
                        code::INVALID_CONFIG
                    } else {
                        code::IO
                    };
                    cni_err(c, e.to_string(), "the pod's rules were left as they were")
                })?;
                for (family, script) in &report.changes {
                    tracing::info!(
                        "ADD: applied {} rules in {netns}:\n{}",
                        family.name(),
                        script.trim_end()
                    );
                }
            }
            // The previous result passes through unchanged, in the version asked for.
            result.insert("cniVersion".into(), Value::String(conf.cni_version.clone()));
            Ok(Some(Value::Object(result)))
        }
        "DEL" => {
            // DEL must succeed when the namespace, or the rules, are already gone.
            let Some(netns) = env("CNI_NETNS").filter(|n| !netns_gone(n)) else {
                tracing::info!("DEL: namespace already gone; nothing to do");
                return Ok(None);
            };
            let mut raw = conf.options().unwrap_or_default();
            raw.netns = Some(netns.clone());
            // An unreadable config must not block pod deletion: clean with the defaults.
            let cfg = raw.resolve().or_else(|_| {
                RawOptions {
                    netns: Some(netns.clone()),
                    ..Default::default()
                }
                .resolve()
            });
            let mut cfg = cfg.map_err(|e| cni_err(code::INVALID_CONFIG, e.to_string(), ""))?;
            cfg.backend = BackendChoice::Auto;
            match capture::clean(&cfg) {
                Ok(report) => {
                    // The runtime shows nothing of a successful DEL: say what went, so that
                    // a log_file tells a DEL that cleaned from one that found nothing.
                    let removed: Vec<String> = report
                        .removed
                        .iter()
                        .map(|(backend, family, _)| {
                            format!("{} ({})", family.name(), backend.name())
                        })
                        .collect();
                    if removed.is_empty() {
                        tracing::info!("DEL: no shunt rules in {netns}; nothing to do");
                    } else {
                        tracing::info!(
                            "DEL: removed shunt's {} rules in {netns}",
                            removed.join(" and ")
                        );
                    }
                    Ok(None)
                }
                Err(_) if netns_gone(&netns) => Ok(None),
                Err(e) => Err(cni_err(code::IO, e.to_string(), "")),
            }
        }
        "CHECK" => {
            if prev_result(&conf)?.is_none() {
                return Err(cni_err(
                    code::INVALID_CONFIG,
                    "CHECK got no prevResult",
                    "the runtime passes the cached ADD result",
                ));
            }
            if let Some(why) = skip_reason(&conf) {
                tracing::info!("CHECK: pod is skipped ({why})");
                return Ok(None);
            }
            let netns = require_env("CNI_NETNS", command)?;
            let cfg = pod_config(&conf, &netns)?;
            let report = capture::check(&cfg).map_err(|e| cni_err(code::IO, e.to_string(), ""))?;
            if report.in_sync() {
                Ok(None)
            } else {
                Err(cni_err(
                    code::DRIFT,
                    format!("shunt's capture rules in {netns} drifted from the plan"),
                    capture::drift_text(&report),
                ))
            }
        }
        "STATUS" => {
            let any = [
                crate::netfilter::Backend::Nft,
                crate::netfilter::Backend::Legacy,
            ]
            .into_iter()
            .any(|b| b.available(crate::plan::Family::V4));
            if any {
                Ok(None)
            } else {
                Err(cni_err(
                    code::NOT_AVAILABLE,
                    "no iptables-restore found on PATH",
                    "install iptables on the node",
                ))
            }
        }
        // Rules live inside pod namespaces and go away with them: nothing to collect.
        "GC" => Ok(None),
        other => Err(cni_err(
            code::INVALID_ENV,
            format!("unknown CNI_COMMAND {other:?}"),
            "expected ADD, DEL, CHECK, VERSION, STATUS or GC",
        )),
    }
}

/// Sets up logging for plugin mode: stderr, or the `log_file` of the config; never stdout.
fn init_logging(stdin: &[u8]) {
    let conf: Value = serde_json::from_slice(stdin).unwrap_or(Value::Null);
    let level = conf
        .get("log_level")
        .and_then(Value::as_str)
        .unwrap_or("info")
        .to_string();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let path = conf
        .get("log_file")
        .and_then(Value::as_str)
        .map(PathBuf::from);
    let (file, refused) = match path.as_deref().map(open_log) {
        Some(Ok(f)) => (Some(f), None),
        Some(Err(e)) => (None, Some(e)),
        None => (None, None),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_target(false);
    let _ = match file {
        Some(f) => builder.with_writer(std::sync::Mutex::new(f)).try_init(),
        None => builder.with_writer(std::io::stderr).try_init(),
    };
    if let (Some(p), Some(e)) = (path, refused) {
        tracing::warn!(
            "log_file {}: {e}; logging to stderr instead (log_file must be a regular file or a \
             new name in an existing directory, not a symlink)",
            p.display()
        );
    }
}

/// The plugin runs as root in the node's namespace: its log file is opened for appending only,
/// created private (0600), and never through a symlink, which someone able to write the log
/// directory could point at any file on the node. O_NONBLOCK: a FIFO planted there fails the
/// open (no reader) instead of hanging every pod's network setup; regular files ignore it.
fn open_log(path: &Path) -> std::io::Result<std::fs::File> {
    use nix::fcntl::OFlag;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags((OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK).bits())
        .open(path)
}

/// Plugin mode: read the config from stdin, run `CNI_COMMAND`, print the result or the error
/// JSON, and return the exit status.
pub fn run_plugin(command: &str) -> i32 {
    let mut stdin = Vec::new();
    let read = std::io::stdin().read_to_end(&mut stdin);
    init_logging(&stdin);
    let version = requested_version(&stdin);
    let result = match read {
        Ok(_) => dispatch(command, &stdin),
        Err(e) => Err(cni_err(code::IO, "cannot read stdin", e.to_string())),
    };
    match result {
        Ok(Some(v)) => {
            println!("{v}");
            0
        }
        Ok(None) => 0,
        Err(e) => {
            tracing::error!(command, "{}: {}", e.msg, e.details);
            println!(
                "{}",
                json!({"cniVersion": version, "code": e.code, "msg": e.msg, "details": e.details})
            );
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_come_from_conflist_keys_and_annotations_win() {
        let conf = NetConf::parse(
            br#"{"cniVersion":"1.0.0","name":"n","type":"shunt","capabilities":{"io.kubernetes.cri.pod-annotations":true},
                "exclude_outbound_cidrs":["10.0.0.0/8","192.168.0.0/16"],"inbound_ports":"80",
                "runtimeConfig":{"io.kubernetes.cri.pod-annotations":{"shunt.dev/inbound-ports":"8080","other":"x"}}}"#,
        )
        .unwrap();
        let raw = annotation_options(&conf.annotations())
            .unwrap()
            .layer(conf.options().unwrap());
        assert_eq!(raw.inbound_ports.as_deref(), Some("8080"));
        assert_eq!(
            raw.exclude_outbound_cidrs.as_deref(),
            Some("10.0.0.0/8,192.168.0.0/16")
        );
    }

    #[test]
    fn unknown_keys_and_bad_versions_are_refused() {
        let conf =
            NetConf::parse(br#"{"cniVersion":"1.0.0","name":"n","type":"shunt","proxy_prot":1}"#)
                .unwrap();
        let e = conf.options().unwrap_err();
        assert_eq!(e.code, code::INVALID_CONFIG);
        assert!(e.details.contains("proxy_prot"), "{}", e.details);
        assert_eq!(
            check_version("0.2.0").unwrap_err().code,
            code::INCOMPATIBLE_VERSION
        );
        assert_eq!(NetConf::parse(b"{").unwrap_err().code, code::DECODE);
    }

    #[test]
    fn a_prev_result_must_be_an_object() {
        let conf = |prev: &str| {
            NetConf::parse(
                format!(
                    r#"{{"cniVersion":"1.0.0","name":"n","type":"shunt","prevResult":{prev}}}"#
                )
                .as_bytes(),
            )
            .unwrap()
        };
        let e = prev_result(&conf(r#""x""#)).unwrap_err();
        assert_eq!(e.code, code::DECODE);
        assert_eq!(
            e.msg,
            r#"prevResult must be a CNI result object, not a string ("x")"#
        );
        let long = format!("[{}]", ["1"; 40].join(","));
        assert!(prev_result(&conf(&long))
            .unwrap_err()
            .msg
            .ends_with("not a list"));
        assert!(prev_result(&conf(r#"{"ips":[]}"#)).unwrap().is_some());
        assert!(prev_result(&conf("null")).unwrap().is_none());
        assert_eq!(required_env("DEL"), ["CNI_CONTAINERID", "CNI_IFNAME"]);
    }

    #[test]
    fn cni_args_ignore_unknown_keys() {
        let a = cni_args("IgnoreUnknown=1;K8S_POD_NAMESPACE=prod;K8S_POD_NAME=web-0;FOO");
        assert_eq!(a["K8S_POD_NAMESPACE"], "prod");
        assert_eq!(a["K8S_POD_NAME"], "web-0");
    }
}
