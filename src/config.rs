//! Capture options: one raw layer shared by flags, `SHUNT_*` variables, TOML files and CNI
//! JSON, validated once into typed values.
//!
//! Every layer fills the same [`RawOptions`] (all fields are optional strings), so the list of
//! options is written exactly once. [`RawOptions::layer`] merges them (flag > env > file >
//! default) and [`RawOptions::resolve`] turns the result into a [`CaptureConfig`] or a
//! [`ConfigError`] naming the option and the bad value.

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize};

/// A bad option value, a bad config file, or options that contradict each other.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("invalid value '{value}' for --{option}: {reason}")]
    Invalid {
        option: &'static str,
        value: String,
        reason: String,
    },
    #[error("conflicting options: {0}")]
    Conflict(String),
    /// A bad environment variable that has no flag (Istio's environment-only settings).
    #[error("invalid value '{value}' for the variable {name}: {reason}")]
    Variable {
        name: &'static str,
        value: String,
        reason: String,
    },
    /// A flag shunt knows and deliberately does not implement.
    #[error("{option} is not supported: {reason}")]
    Unsupported {
        option: &'static str,
        reason: String,
    },
    #[error("cannot read config file {path}: {reason}")]
    File { path: PathBuf, reason: String },
}

/// Longest part of a refused value repeated in an error; a 1 MiB value stays readable.
const SHOWN_VALUE: usize = 200;

fn invalid(option: &'static str, value: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        option,
        value: shorten(value),
        reason: shorten(&reason.into()),
    }
}

/// `value` itself, or its first [`SHOWN_VALUE`] bytes (on a character boundary) and its length.
pub fn shorten(value: &str) -> String {
    if value.len() <= SHOWN_VALUE {
        return value.to_string();
    }
    let mut end = SHOWN_VALUE;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes in all)", &value[..end], value.len())
}

/// Accepts a string, a number, a bool or a list of those, and keeps it as the comma-separated
/// string a flag would carry. TOML and CNI JSON users write `[80, 443]` or `"80,443"` alike.
/// A visitor, not an untagged enum: serde buffers an untagged value whole first, and a list
/// of 10,000 CIDRs was then copied three times.
fn lenient<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    use serde::de::{Error, SeqAccess, Visitor};
    /// One element of a list.
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Scalar {
        S(String),
        I(i64),
        B(bool),
    }
    struct Lenient;
    impl<'de> Visitor<'de> for Lenient {
        type Value = Option<String>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a string, a number, a boolean or a list of those")
        }
        fn visit_none<E: Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E: Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_any(self)
        }
        fn visit_str<E: Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(Some(v.to_owned()))
        }
        fn visit_string<E: Error>(self, v: String) -> Result<Self::Value, E> {
            Ok(Some(v))
        }
        fn visit_i64<E: Error>(self, v: i64) -> Result<Self::Value, E> {
            Ok(Some(v.to_string()))
        }
        fn visit_u64<E: Error>(self, v: u64) -> Result<Self::Value, E> {
            Ok(Some(v.to_string()))
        }
        fn visit_bool<E: Error>(self, v: bool) -> Result<Self::Value, E> {
            Ok(Some(v.to_string()))
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0));
            while let Some(item) = seq.next_element::<Scalar>()? {
                items.push(match item {
                    Scalar::S(s) => s,
                    Scalar::I(i) => i.to_string(),
                    Scalar::B(b) => b.to_string(),
                });
            }
            Ok(Some(items.join(",")))
        }
    }
    d.deserialize_option(Lenient)
}

macro_rules! raw_options {
    ($( $(#[doc = $doc:literal])* $field:ident : $env:literal $(, $flag:ident)? );* $(;)?) => {
        /// The capture options as given, before validation. The same struct is a clap
        /// argument group (flags and `SHUNT_*` variables), a TOML file and a CNI config.
        #[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args, Deserialize, Serialize)]
        #[serde(deny_unknown_fields)]
        pub struct RawOptions {
            $(
                $(#[doc = $doc])*
                #[arg(long, env = $env, value_name = "VALUE", help_heading = "Capture options",
                      allow_negative_numbers = true
                      $(, num_args = 0..=1, default_missing_value = raw_options!(@$flag))?)]
                #[serde(default, deserialize_with = "lenient", skip_serializing_if = "Option::is_none")]
                pub $field: Option<String>,
            )*
        }

        impl RawOptions {
            /// Every option's key, as written in TOML and CNI JSON.
            pub const KEYS: &'static [&'static str] = &[$( stringify!($field) ),*];

            /// Fills every option not set here from `lower` (flag > env > file > default).
            pub fn layer(self, lower: RawOptions) -> RawOptions {
                RawOptions { $( $field: self.$field.or(lower.$field), )* }
            }
        }
    };
    // A boolean option: `--redirect-dns` alone means true.
    (@flag) => { "true" };
}

raw_options! {
    /// Port that outbound TCP is redirected to [default: 15001]
    proxy_port: "SHUNT_PROXY_PORT";
    /// Port that inbound TCP is redirected to [default: 15006]
    inbound_port: "SHUNT_INBOUND_PORT";
    /// Uid(s) never captured: the proxy itself; list, ranges allowed [default: 1337]
    proxy_uid: "SHUNT_PROXY_UID";
    /// Gid(s) never captured [default: 1337]
    proxy_gid: "SHUNT_PROXY_GID";
    /// Inbound interception: redirect (nat) or tproxy (mangle; keeps the client address)
    /// [default: redirect]
    mode: "SHUNT_MODE";
    /// tproxy mode: the packet and connection mark that routes to the proxy [default: 1337]
    tproxy_mark: "SHUNT_TPROXY_MARK";
    /// tproxy mode: the routing table that delivers marked packets locally [default: 133]
    tproxy_route_table: "SHUNT_TPROXY_ROUTE_TABLE";
    /// Destinations whose outbound TCP is captured; '*' = all, '' = none [default: *]
    outbound_cidrs: "SHUNT_OUTBOUND_CIDRS";
    /// Destinations never captured (wins over --outbound-cidrs)
    exclude_outbound_cidrs: "SHUNT_EXCLUDE_OUTBOUND_CIDRS";
    /// Destination ports always captured, whatever the CIDR lists say
    outbound_ports: "SHUNT_OUTBOUND_PORTS";
    /// Destination ports never captured
    exclude_outbound_ports: "SHUNT_EXCLUDE_OUTBOUND_PORTS";
    /// Local ports whose inbound TCP is captured; '*' = all, '' = none [default: *]
    inbound_ports: "SHUNT_INBOUND_PORTS";
    /// Local ports never captured inbound (the proxy's ports always are excluded)
    exclude_inbound_ports: "SHUNT_EXCLUDE_INBOUND_PORTS";
    /// Interfaces whose traffic is never captured, in or out
    exclude_interfaces: "SHUNT_EXCLUDE_INTERFACES";
    /// Interfaces whose incoming traffic is treated as outbound (VM pods)
    virt_interfaces: "SHUNT_VIRT_INTERFACES";
    /// Capture DNS (UDP and TCP port 53) to --dns-port [default: false]
    redirect_dns: "SHUNT_REDIRECT_DNS", flag;
    /// With --redirect-dns: capture DNS to every destination, not only the DNS servers
    capture_all_dns: "SHUNT_CAPTURE_ALL_DNS", flag;
    /// Port that DNS is redirected to [default: 15053]
    dns_port: "SHUNT_DNS_PORT";
    /// DNS servers whose traffic --redirect-dns captures [default: the namespace's resolv.conf]
    dns_servers: "SHUNT_DNS_SERVERS";
    /// Drop conntrack-INVALID inbound TCP packets (stops stray resets) [default: false]
    drop_invalid: "SHUNT_DROP_INVALID", flag;
    /// IPv6 rules: on, off, or auto (on when the namespace has IPv6) [default: auto]
    ipv6: "SHUNT_IPV6";
    /// Engine: legacy (iptables-legacy), nft (iptables-nft), nftables (native `inet shunt`
    /// table), or auto (the one holding shunt's rules, else iptables-nft) [default: auto]
    backend: "SHUNT_BACKEND";
    /// Network namespace to act in: /run/netns/NAME or /proc/PID/ns/net [default: current]
    netns: "SHUNT_NETNS";
    /// Longest wait for another shunt changing the same namespace, and for each iptables, ip
    /// or nft child (killed after it); 500ms, 30s, 2m [default: 30s]
    wait: "SHUNT_WAIT";
    /// apply with an explicit --backend: move shunt's rules there from the engine that holds
    /// them (install here first, then remove there) instead of refusing [default: false]
    migrate: "SHUNT_MIGRATE", flag;
    /// nftables engine: where shunt's base chains sit from iptables' own priority at each
    /// hook, -49 to 49 but not 0; below 0 shunt's NAT binds first, above it another tool's
    /// iptables NAT does [default: -10]
    nft_priority_offset: "SHUNT_NFT_PRIORITY_OFFSET";
}

/// `--config FILE` plus the capture options: the argument group every command that takes
/// capture options flattens in.
#[derive(Debug, Clone, clap::Args)]
pub struct CaptureArgs {
    /// TOML file with capture options (keys are the flag names with '_' for '-')
    #[arg(long, env = "SHUNT_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub options: RawOptions,
}

impl CaptureArgs {
    /// flag > env (both from clap) > file > built-in default, then validation.
    pub fn resolve(&self) -> Result<CaptureConfig, ConfigError> {
        let file = match &self.config {
            Some(path) => read_file(path)?,
            None => RawOptions::default(),
        };
        self.options.clone().layer(file).resolve()
    }
}

/// Where a refused capture option's value came from, when it was not the command line: a
/// stray `SHUNT_*` variable or a config file key is otherwise hard to spot at 3 a.m.
/// `args` is the command line, `env` looks a variable up.
pub fn origin_of(
    option: &str,
    args: &[std::ffi::OsString],
    env: impl Fn(&str) -> Option<String>,
) -> Option<String> {
    let key = option.replace('-', "_");
    if !RawOptions::KEYS.contains(&key.as_str()) {
        return None;
    }
    let flag = format!("--{option}");
    let on_command_line = args.iter().any(|a| {
        let a = a.to_string_lossy();
        a == flag || a.starts_with(&format!("{flag}="))
    });
    if on_command_line {
        return None;
    }
    let var = format!("SHUNT_{}", key.to_ascii_uppercase());
    Some(match env(&var) {
        Some(v) => format!("the value comes from the environment: {var}={v}"),
        None => format!("the value comes from the config file's `{key}` key"),
    })
}

/// Largest config file read (bytes).
pub const MAX_CONFIG_FILE: u64 = 1 << 20;

/// Reads a TOML config file into the raw layer; unknown keys are errors (typos must not be
/// silently ignored in a tool that decides where traffic goes).
pub fn read_file(path: &Path) -> Result<RawOptions, ConfigError> {
    use std::io::Read as _;
    let fail = |reason: String| ConfigError::File {
        path: path.to_path_buf(),
        reason,
    };
    // A capture config is a few hundred bytes; a cap keeps /dev/zero or a log file given by
    // mistake from filling memory.
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| {
            // Sized once: a 150 KB file read into a growing string is copied a dozen times.
            let size = f.metadata().map_or(0, |m| m.len().min(MAX_CONFIG_FILE + 1));
            text.reserve(size as usize);
            f.take(MAX_CONFIG_FILE + 1).read_to_string(&mut text)
        })
        .map_err(|e| fail(e.to_string()))?;
    if text.len() as u64 > MAX_CONFIG_FILE {
        return Err(fail(format!(
            "larger than {} KiB; a capture config is a few lines of TOML",
            MAX_CONFIG_FILE / 1024
        )));
    }
    toml::from_str(&text).map_err(|e| ConfigError::File {
        path: path.to_path_buf(),
        reason: e.to_string().trim().to_string(),
    })
}

/// An inclusive port range; a single port has `first == last`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl fmt::Display for PortRange {
    /// iptables-save's spelling: `80` or `8000:8100`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}:{}", self.first, self.last)
        }
    }
}

impl PortRange {
    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }
}

/// `*` (everything) or an explicit list, possibly empty.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Set<T> {
    All,
    List(Vec<T>),
}

impl<T> Set<T> {
    pub fn is_empty(&self) -> bool {
        matches!(self, Set::List(v) if v.is_empty())
    }
    pub fn none() -> Self {
        Set::List(Vec::new())
    }
}

/// A uid or gid range for the owner match (`1337` or `1000-2000`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct IdRange {
    pub first: u32,
    pub last: u32,
}

impl fmt::Display for IdRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    Redirect,
    Tproxy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Ipv6 {
    On,
    Off,
    Auto,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendChoice {
    /// iptables-legacy
    Legacy,
    /// iptables-nft (the iptables dialect over nf_tables)
    Nft,
    /// shunt's native nftables engine: one `inet shunt` table
    Nftables,
    Auto,
}

/// Validated capture options: everything the plan needs, and nothing unchecked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CaptureConfig {
    pub proxy_port: u16,
    pub inbound_port: u16,
    pub proxy_uid: Vec<IdRange>,
    pub proxy_gid: Vec<IdRange>,
    pub mode: Mode,
    pub tproxy_mark: u32,
    pub tproxy_route_table: u32,
    pub outbound_cidrs: Set<IpNet>,
    pub exclude_outbound_cidrs: Set<IpNet>,
    pub outbound_ports: Set<PortRange>,
    pub exclude_outbound_ports: Set<PortRange>,
    pub inbound_ports: Set<PortRange>,
    pub exclude_inbound_ports: Set<PortRange>,
    pub exclude_interfaces: Vec<String>,
    pub virt_interfaces: Vec<String>,
    pub redirect_dns: bool,
    pub capture_all_dns: bool,
    pub dns_port: u16,
    /// `None`: the resolv.conf servers of the target namespace, read where it is known.
    pub dns_servers: Option<Vec<IpAddr>>,
    pub drop_invalid: bool,
    pub ipv6: Ipv6,
    pub backend: BackendChoice,
    pub netns: Option<PathBuf>,
    /// Bound on waiting for the namespace's lock and on each child tool.
    #[serde(skip)]
    pub wait: std::time::Duration,
    /// apply: move shunt's rules from another engine instead of refusing.
    pub migrate: bool,
    /// The nftables engine's base chain priorities, from iptables' own (see `Plan`).
    pub nft_priority_offset: i32,
    /// Istio's rule order and quirks instead of shunt's; only `shunt istio-iptables` sets it
    /// (no flag, variable or key), so `shunt apply`'s plan never changes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub istio: Option<IstioLayout>,
}

/// What `istio-iptables` does differently from shunt, as typed values: the plan lays its
/// rules out in Istio's order (`plan::istio_ruleset`) when a config carries one of these.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IstioLayout {
    /// `-e`: never captured inbound, never sent to the inbound port by the proxy's own dials.
    pub tunnel_port: u16,
    /// `ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR` (127.0.0.1/32): the only IPv4 loopback destination
    /// the proxy's dials through lo are spared for, and the one never captured outbound.
    /// shunt spares all of 127.0.0.0/8.
    pub loopback_v4: IpNet,
    /// Whether the app's traffic through lo is let through (`-o lo ! --uid-owner P -j RETURN`).
    /// Istio drops those rules when `-i` holds a loopback range, so that range is captured.
    pub lo_return: bool,
    /// `ISTIO_OUTBOUND_OWNER_GROUPS` / `..._EXCLUDE`: whose outbound traffic is captured.
    pub owner_groups: OwnerGroups,
}

/// Istio's owner-group filter on outbound capture.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OwnerGroups {
    /// Every group except these (Istio's default: `*` with no exclusions).
    AllExcept(Vec<IdRange>),
    /// Only these groups.
    Only(Vec<IdRange>),
}

impl Default for CaptureConfig {
    fn default() -> Self {
        // The defaults are defined once, as text, and go through the same validation.
        RawOptions::default()
            .resolve()
            .expect("built-in defaults are valid")
    }
}

/// The comma-separated items of a list option; an empty value is the empty list, an empty
/// item (`80,,81`, a trailing comma) is refused: it is usually a variable that expanded to
/// nothing.
fn items<'a>(option: &'static str, value: &'a str) -> Result<Vec<&'a str>, ConfigError> {
    if value.trim().is_empty() {
        return Ok(Vec::new());
    }
    // memchr finds the commas several bytes at a time: `str::split(',')` took more
    // instructions for a 10,000-CIDR list than parsing the addresses (callgrind).
    let commas = memchr::memchr_iter(b',', value.as_bytes());
    let mut out = Vec::with_capacity(commas.clone().count() + 1);
    let mut start = 0;
    for comma in commas {
        out.push(value[start..comma].trim());
        start = comma + 1;
    }
    out.push(value[start..].trim());
    if out.iter().any(|s| s.is_empty()) {
        return Err(invalid(
            option,
            value,
            "the list has an empty item (two commas in a row, or a comma at an end)",
        ));
    }
    Ok(out)
}

fn parse_port(option: &'static str, value: &str, s: &str) -> Result<u16, ConfigError> {
    match s.parse::<u32>() {
        Ok(p @ 1..=65535) => Ok(p as u16),
        Ok(_) => Err(invalid(
            option,
            value,
            format!("port {s} is outside 1-65535"),
        )),
        Err(_) => Err(invalid(
            option,
            value,
            format!("'{s}' is not a port number"),
        )),
    }
}

fn parse_port_set(option: &'static str, value: &str) -> Result<Set<PortRange>, ConfigError> {
    if value.trim() == "*" {
        return Ok(Set::All);
    }
    let mut out = Vec::new();
    for item in items(option, value)? {
        let (a, b) = item
            .split_once('-')
            .or_else(|| item.split_once(':'))
            .unwrap_or((item, item));
        let (first, last) = (
            parse_port(option, value, a.trim())?,
            parse_port(option, value, b.trim())?,
        );
        if first > last {
            return Err(invalid(option, value, format!("range {item} is reversed")));
        }
        out.push(PortRange { first, last });
    }
    out.sort();
    out.dedup();
    Ok(Set::List(out))
}

/// `ADDR/LEN`, or a bare address as a host route (as in Istio's and Kuma's flags). Split by
/// hand for std's address parser: ipnet's `FromStr` was the largest single cost of reading
/// 10,000 CIDRs in a profile of `apply`.
fn parse_net(s: &str) -> Option<IpNet> {
    match s.bytes().position(|b| b == b'/') {
        Some(slash) => {
            let (addr, len) = (&s[..slash], &s[slash + 1..]);
            if len.is_empty() || len.len() > 3 || !len.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            IpNet::new(addr.parse().ok()?, len.parse().ok()?).ok()
        }
        None => s.parse::<IpAddr>().ok().map(IpNet::from),
    }
}

/// The nftables priority offset: within 49 of iptables' own, so that every base chain stays
/// between the same neighbours (raw before conntrack at -200, mangle after it, nat before
/// filter), and never 0, which would tie with iptables and leave the order to chance.
fn parse_priority_offset(value: &str) -> Result<i32, ConfigError> {
    match value.trim().parse::<i32>() {
        Ok(n @ -49..=49) if n != 0 => Ok(n),
        Ok(0) => Err(invalid(
            "nft-priority-offset",
            value,
            "0 would tie with iptables' own chains, whose order against shunt's is then \
             undefined; use -10 (before them) or 10 (after them)",
        )),
        _ => Err(invalid(
            "nft-priority-offset",
            value,
            "expected a whole number from -49 to 49 (not 0)",
        )),
    }
}

fn parse_cidr_set(option: &'static str, value: &str) -> Result<Set<IpNet>, ConfigError> {
    if value.trim() == "*" {
        return Ok(Set::All);
    }
    let items = items(option, value)?;
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let Some(net) = parse_net(item) else {
            return Err(invalid(
                option,
                value,
                format!("'{item}' is not an IPv4/IPv6 address or CIDR (e.g. 10.0.0.0/8)"),
            ));
        };
        // iptables stores the network address; keeping it so makes `check` compare equal.
        out.push(net.trunc());
    }
    out.dedup();
    Ok(Set::List(out))
}

pub(crate) fn parse_ids(option: &'static str, value: &str) -> Result<Vec<IdRange>, ConfigError> {
    let id = |s: &str| {
        s.trim().parse::<u32>().map_err(|_| {
            invalid(
                option,
                value,
                format!("'{}' is not a numeric id (0-4294967295)", s.trim()),
            )
        })
    };
    let mut out = Vec::new();
    for item in items(option, value)? {
        let (a, b) = item.split_once('-').unwrap_or((item, item));
        let (first, last) = (id(a)?, id(b)?);
        if first > last {
            return Err(invalid(option, value, format!("range {item} is reversed")));
        }
        out.push(IdRange { first, last });
    }
    Ok(out)
}

/// Linux interface names: 1-15 bytes, no '/', no whitespace, not "." or "..". Linux allows
/// '"', but iptables-save prints interface names unquoted, so a rule naming one could not be
/// read back: after `apply`, `check` and `clean` would fail on the save.
fn parse_ifaces(option: &'static str, value: &str) -> Result<Vec<String>, ConfigError> {
    let mut out = Vec::new();
    for item in items(option, value)? {
        if item.contains('"') {
            return Err(invalid(
                option,
                value,
                format!(
                    "'{item}' contains '\"', which iptables-save prints unquoted: shunt could \
                     not read its own rules back"
                ),
            ));
        }
        let ok = item.len() <= 15
            && item != "."
            && item != ".."
            && !item.contains('/')
            && !item.chars().any(|c| c.is_whitespace() || c.is_control());
        if !ok {
            return Err(invalid(
                option,
                value,
                format!("'{item}' is not a valid interface name (1-15 bytes, no '/' or spaces)"),
            ));
        }
        out.push(item.to_string());
    }
    Ok(out)
}

fn parse_bool(option: &'static str, value: &str) -> Result<bool, ConfigError> {
    parse_enum(
        option,
        value,
        &[
            ("true", true),
            ("on", true),
            ("1", true),
            ("yes", true),
            ("false", false),
            ("off", false),
            ("0", false),
            ("no", false),
        ],
    )
}

fn parse_addrs(option: &'static str, value: &str) -> Result<Vec<IpAddr>, ConfigError> {
    items(option, value)?
        .into_iter()
        .map(|item| {
            item.parse::<IpAddr>().map_err(|_| {
                invalid(
                    option,
                    value,
                    format!("'{item}' is not an IPv4 or IPv6 address"),
                )
            })
        })
        .collect()
}

/// The kernel's own routing tables (unspec, default, main, local): a tproxy route there
/// would change how every packet of the namespace is routed, and `clean` could not tell it
/// from the namespace's own routes.
const RESERVED_TABLES: [u32; 4] = [0, 253, 254, 255];

fn route_table(table: u32) -> Result<u32, ConfigError> {
    if RESERVED_TABLES.contains(&table) {
        return Err(invalid(
            "tproxy-route-table",
            &table.to_string(),
            "tables 0, 253 (default), 254 (main) and 255 (local) are the kernel's own; pick \
             another, e.g. 133",
        ));
    }
    Ok(table)
}

/// An empty `--netns` (often `--netns "$UNSET"`) would mean the current namespace: the
/// host's rules. Refuse it; leaving the option out is how to ask for the current one.
fn parse_netns(value: &str) -> Result<PathBuf, ConfigError> {
    if value.trim().is_empty() {
        return Err(invalid(
            "netns",
            value,
            "an empty path; leave --netns (and SHUNT_NETNS) out to act in the current \
             namespace",
        ));
    }
    Ok(PathBuf::from(value.trim()))
}

const BACKENDS: &[(&str, BackendChoice)] = &[
    ("legacy", BackendChoice::Legacy),
    ("nft", BackendChoice::Nft),
    ("nftables", BackendChoice::Nftables),
    ("auto", BackendChoice::Auto),
];

fn parse_enum<T: Copy>(
    option: &'static str,
    value: &str,
    choices: &[(&str, T)],
) -> Result<T, ConfigError> {
    let v = value.trim().to_ascii_lowercase();
    choices
        .iter()
        .find(|(name, _)| *name == v)
        .map(|(_, t)| *t)
        .ok_or_else(|| {
            let names: Vec<_> = choices.iter().map(|(n, _)| *n).collect();
            invalid(
                option,
                value,
                format!("expected one of: {}", names.join(", ")),
            )
        })
}

impl RawOptions {
    /// Validates every option, then the combinations. Nothing touches the system here.
    pub fn resolve<'a>(&'a self) -> Result<CaptureConfig, ConfigError> {
        // Borrowed: a list of 10,000 CIDRs is not copied to be read.
        let get = |v: &'a Option<String>, default: &'static str| -> &'a str {
            v.as_deref().unwrap_or(default)
        };
        let proxy_port = parse_port(
            "proxy-port",
            get(&self.proxy_port, "15001"),
            get(&self.proxy_port, "15001").trim(),
        )?;
        let inbound_port = parse_port(
            "inbound-port",
            get(&self.inbound_port, "15006"),
            get(&self.inbound_port, "15006").trim(),
        )?;
        let mode_text = get(&self.mode, "redirect");
        let number = |option: &'static str, v: &'a Option<String>, default: &'static str| {
            let text = get(v, default);
            match text.trim().parse::<u32>() {
                Ok(n) if n > 0 => Ok(n),
                _ => Err(invalid(
                    option,
                    text,
                    "expected a number from 1 to 4294967295",
                )),
            }
        };
        let cfg = CaptureConfig {
            proxy_port,
            inbound_port,
            proxy_uid: parse_ids("proxy-uid", get(&self.proxy_uid, "1337"))?,
            proxy_gid: parse_ids("proxy-gid", get(&self.proxy_gid, "1337"))?,
            mode: parse_enum(
                "mode",
                mode_text,
                &[("redirect", Mode::Redirect), ("tproxy", Mode::Tproxy)],
            )?,
            tproxy_mark: number("tproxy-mark", &self.tproxy_mark, "1337")?,
            tproxy_route_table: route_table(number(
                "tproxy-route-table",
                &self.tproxy_route_table,
                "133",
            )?)?,
            outbound_cidrs: parse_cidr_set("outbound-cidrs", get(&self.outbound_cidrs, "*"))?,
            exclude_outbound_cidrs: parse_cidr_set(
                "exclude-outbound-cidrs",
                get(&self.exclude_outbound_cidrs, ""),
            )?,
            outbound_ports: parse_port_set("outbound-ports", get(&self.outbound_ports, ""))?,
            exclude_outbound_ports: parse_port_set(
                "exclude-outbound-ports",
                get(&self.exclude_outbound_ports, ""),
            )?,
            inbound_ports: parse_port_set("inbound-ports", get(&self.inbound_ports, "*"))?,
            exclude_inbound_ports: parse_port_set(
                "exclude-inbound-ports",
                get(&self.exclude_inbound_ports, ""),
            )?,
            exclude_interfaces: parse_ifaces(
                "exclude-interfaces",
                get(&self.exclude_interfaces, ""),
            )?,
            virt_interfaces: parse_ifaces("virt-interfaces", get(&self.virt_interfaces, ""))?,
            redirect_dns: parse_bool("redirect-dns", get(&self.redirect_dns, "false"))?,
            capture_all_dns: parse_bool("capture-all-dns", get(&self.capture_all_dns, "false"))?,
            dns_port: {
                let v = get(&self.dns_port, "15053");
                parse_port("dns-port", v, v.trim())?
            },
            dns_servers: self
                .dns_servers
                .as_deref()
                .map(|v| parse_addrs("dns-servers", v))
                .transpose()?,
            drop_invalid: parse_bool("drop-invalid", get(&self.drop_invalid, "false"))?,
            ipv6: parse_enum(
                "ipv6",
                get(&self.ipv6, "auto"),
                &[
                    ("on", Ipv6::On),
                    ("true", Ipv6::On),
                    ("off", Ipv6::Off),
                    ("false", Ipv6::Off),
                    ("auto", Ipv6::Auto),
                ],
            )?,
            backend: parse_enum("backend", get(&self.backend, "auto"), BACKENDS)?,
            netns: self.netns.as_deref().map(parse_netns).transpose()?,
            wait: {
                let v = get(&self.wait, "30s");
                crate::duration::positive(v).map_err(|e| invalid("wait", v, e.to_string()))?
            },
            migrate: parse_bool("migrate", get(&self.migrate, "false"))?,
            nft_priority_offset: parse_priority_offset(get(&self.nft_priority_offset, "-10"))?,
            istio: None,
        };
        if self.nft_priority_offset.is_some()
            && matches!(cfg.backend, BackendChoice::Legacy | BackendChoice::Nft)
        {
            return Err(ConfigError::Conflict(format!(
                "--nft-priority-offset is for --backend nftables; the iptables {} backend's \
                 tables have fixed priorities",
                get(&self.backend, "auto").trim()
            )));
        }
        cfg.check_combinations()?;
        Ok(cfg)
    }
}

impl CaptureConfig {
    fn check_combinations(&self) -> Result<(), ConfigError> {
        if self.proxy_port == self.inbound_port {
            return Err(ConfigError::Conflict(format!(
                "--inbound-port {} equals --proxy-port {}: inbound and outbound traffic need \
                 separate proxy ports",
                self.inbound_port, self.proxy_port
            )));
        }
        if self.capture_all_dns && !self.redirect_dns {
            return Err(ConfigError::Conflict(
                "--capture-all-dns needs --redirect-dns (it widens DNS capture, it does not turn \
                 it on)"
                    .into(),
            ));
        }
        if self.redirect_dns && [self.proxy_port, self.inbound_port].contains(&self.dns_port) {
            return Err(ConfigError::Conflict(format!(
                "--dns-port {} is also a TCP capture port; give DNS its own port",
                self.dns_port
            )));
        }
        if self.mode == Mode::Tproxy && !self.virt_interfaces.is_empty() {
            return Err(ConfigError::Conflict(
                "--virt-interfaces needs --mode redirect (a VM's traffic is NATed to the outbound \
                 port, which tproxy mode reserves for inbound)"
                    .into(),
            ));
        }
        if let Some(name) = self
            .virt_interfaces
            .iter()
            .find(|n| self.exclude_interfaces.contains(n))
        {
            return Err(ConfigError::Conflict(format!(
                "interface {name} is in both --virt-interfaces and --exclude-interfaces"
            )));
        }
        if self.proxy_uid.is_empty() && self.proxy_gid.is_empty() {
            return Err(ConfigError::Conflict(
                "--proxy-uid and --proxy-gid are both empty: the proxy's own traffic would be \
                 captured again (a loop); give at least one"
                    .into(),
            ));
        }
        for (option, set) in [
            ("outbound-ports", &self.outbound_ports),
            ("inbound-ports", &self.inbound_ports),
        ] {
            if let Set::List(list) = set {
                for p in [self.proxy_port, self.inbound_port] {
                    if list.iter().any(|r| r.first == p && r.last == p) {
                        return Err(ConfigError::Conflict(format!(
                            "--{option} lists {p}, one of the proxy's own ports; traffic to it \
                             would loop"
                        )));
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(pairs: &[(&str, &str)]) -> RawOptions {
        let mut t = toml::Table::new();
        for (k, v) in pairs {
            t.insert(k.to_string(), toml::Value::String(v.to_string()));
        }
        toml::from_str(&t.to_string()).unwrap()
    }

    fn err(pairs: &[(&str, &str)]) -> String {
        raw(pairs).resolve().unwrap_err().to_string()
    }

    #[test]
    fn defaults_match_the_spec() {
        let c = CaptureConfig::default();
        assert_eq!((c.proxy_port, c.inbound_port), (15001, 15006));
        assert_eq!(
            c.proxy_uid,
            vec![IdRange {
                first: 1337,
                last: 1337
            }]
        );
        assert_eq!(c.outbound_cidrs, Set::All);
        assert_eq!(c.inbound_ports, Set::All);
        assert!(c.exclude_outbound_cidrs.is_empty());
        assert_eq!((c.ipv6, c.backend), (Ipv6::Auto, BackendChoice::Auto));
    }

    #[test]
    fn bad_values_name_option_and_value() {
        for (pairs, needles) in [
            (vec![("proxy_port", "0")], vec!["--proxy-port", "'0'"]),
            (vec![("proxy_port", "70000")], vec!["--proxy-port", "70000"]),
            (
                vec![("inbound_port", "http")],
                vec!["--inbound-port", "http"],
            ),
            (
                vec![("exclude_outbound_cidrs", "10.0.0.0/33")],
                vec!["--exclude-outbound-cidrs", "10.0.0.0/33"],
            ),
            (vec![("proxy_uid", "abc")], vec!["--proxy-uid", "abc"]),
            (vec![("proxy_uid", "-1")], vec!["--proxy-uid", "-1"]),
            (
                vec![("backend", "ebpf")],
                vec!["--backend", "ebpf", "legacy, nft, nftables, auto"],
            ),
            (vec![("mode", "magic")], vec!["--mode", "magic"]),
            (
                vec![("inbound_ports", "80,9000-8000")],
                vec!["9000-8000", "reversed"],
            ),
            (
                vec![("exclude_interfaces", "a-very-long-interface0")],
                vec!["interface"],
            ),
            (
                vec![("inbound_port", "15001")],
                vec!["15001", "--proxy-port"],
            ),
            (
                vec![("inbound_ports", "80,15006")],
                vec!["15006", "--inbound-ports"],
            ),
            (
                vec![("inbound_ports", "80,,81")],
                vec!["80,,81", "empty item"],
            ),
            (
                vec![("exclude_outbound_cidrs", "10.0.0.0/8,")],
                vec!["--exclude-outbound-cidrs", "empty item"],
            ),
            (
                vec![("proxy_uid", ",1337")],
                vec!["--proxy-uid", "empty item"],
            ),
            (vec![("netns", "")], vec!["--netns", "current namespace"]),
            (vec![("netns", "  ")], vec!["--netns"]),
            (
                vec![("mode", "tproxy"), ("tproxy_route_table", "254")],
                vec!["--tproxy-route-table", "254", "kernel's own"],
            ),
            (vec![("wait", "0")], vec!["--wait", "zero"]),
            (vec![("wait", "soon")], vec!["--wait", "soon"]),
            (
                vec![("nft_priority_offset", "0")],
                vec!["--nft-priority-offset", "tie"],
            ),
            (
                vec![("nft_priority_offset", "50")],
                vec!["--nft-priority-offset", "'50'", "-49 to 49"],
            ),
            (
                vec![("backend", "nft"), ("nft_priority_offset", "10")],
                vec!["--nft-priority-offset", "--backend nftables", "nft backend"],
            ),
        ] {
            let msg = err(&pairs);
            for n in needles {
                assert!(msg.contains(n), "{msg:?} should mention {n:?}");
            }
        }
    }

    /// `--exclude-interfaces 'a"b'` rendered `-i "a\"b"`, which iptables-restore installs as
    /// `a"b`; iptables-save prints `-i a"b`, an open quote to any reader, so `check` and
    /// `clean` failed with "unterminated quote" and the rules could not be removed.
    #[test]
    fn interface_names_with_a_quote_are_refused() {
        for key in ["exclude_interfaces", "virt_interfaces"] {
            let msg = err(&[(key, "eth0,a\"b")]);
            assert!(
                msg.contains("'a\"b'") && msg.contains("iptables-save"),
                "{msg}"
            );
        }
        let c = raw(&[("exclude_interfaces", r"a\b,eth+,!x")])
            .resolve()
            .unwrap();
        assert_eq!(c.exclude_interfaces, [r"a\b", "eth+", "!x"]);
    }

    #[test]
    fn a_huge_refused_value_is_cut_in_the_message() {
        let huge = "x".repeat(1 << 20);
        let msg = err(&[("exclude_outbound_cidrs", &huge)]);
        assert!(msg.len() < 1000, "{} bytes", msg.len());
        assert!(msg.contains("1048576 bytes in all"), "{msg}");
        // Cut on a character boundary.
        let wide = "é".repeat(300);
        assert!(shorten(&wide).starts_with(&"é".repeat(100)));
        // An empty list is still the empty list.
        assert!(raw(&[("inbound_ports", " ")])
            .resolve()
            .unwrap()
            .inbound_ports
            .is_empty());
    }

    #[test]
    fn a_config_file_over_the_cap_is_refused() {
        let path = std::env::temp_dir().join(format!("shunt-big-{}.toml", std::process::id()));
        let line = "# padding\n".repeat((MAX_CONFIG_FILE as usize) / 10 + 1);
        std::fs::write(&path, format!("proxy_port = 15001\n{line}")).unwrap();
        let e = read_file(&path).unwrap_err().to_string();
        std::fs::remove_file(&path).unwrap();
        assert!(e.contains("larger than 1024 KiB"), "{e}");
    }

    #[test]
    fn lists_ranges_and_wildcards() {
        let c = raw(&[
            ("inbound_ports", "8080, 80,8000-8100,80"),
            (
                "exclude_outbound_cidrs",
                "10.1.2.3/8,192.168.0.1,fd00::1/64",
            ),
            ("outbound_cidrs", ""),
            ("proxy_uid", "1337,2000-2010"),
        ])
        .resolve()
        .unwrap();
        assert_eq!(
            c.inbound_ports,
            Set::List(vec![
                PortRange {
                    first: 80,
                    last: 80
                },
                PortRange {
                    first: 8000,
                    last: 8100
                },
                PortRange {
                    first: 8080,
                    last: 8080
                },
            ])
        );
        let nets: Vec<String> = match &c.exclude_outbound_cidrs {
            Set::List(v) => v.iter().map(|n| n.to_string()).collect(),
            Set::All => panic!("expected a list"),
        };
        assert_eq!(nets, ["10.0.0.0/8", "192.168.0.1/32", "fd00::/64"]);
        assert!(c.outbound_cidrs.is_empty());
        assert_eq!(
            c.proxy_uid[1],
            IdRange {
                first: 2000,
                last: 2010
            }
        );
    }

    #[test]
    fn toml_accepts_numbers_and_arrays_and_rejects_unknown_keys() {
        let r: RawOptions =
            toml::from_str("proxy_port = 16001\ninbound_ports = [80, \"443\"]\nipv6 = false")
                .unwrap();
        assert_eq!(r.proxy_port.as_deref(), Some("16001"));
        assert_eq!(r.inbound_ports.as_deref(), Some("80,443"));
        assert_eq!(r.resolve().unwrap().ipv6, Ipv6::Off);
        let e = toml::from_str::<RawOptions>("proxy_prot = 1").unwrap_err();
        assert!(e.to_string().contains("proxy_prot"), "{e}");
        // A value of no accepted kind names the key and what it takes.
        let e = toml::from_str::<RawOptions>("proxy_port = 1.5").unwrap_err();
        assert!(e.to_string().contains("proxy_port"), "{e}");
        assert!(e.to_string().contains("a string, a number"), "{e}");
        // CNI JSON: the same kinds, and null for an option left out.
        let r: RawOptions = serde_json::from_str(
            r#"{"proxy_port": 16001, "inbound_ports": [80, "443"], "redirect_dns": true, "ipv6": null}"#,
        )
        .unwrap();
        assert_eq!(r.proxy_port.as_deref(), Some("16001"));
        assert_eq!(r.inbound_ports.as_deref(), Some("80,443"));
        assert_eq!(r.redirect_dns.as_deref(), Some("true"));
        assert_eq!(r.ipv6, None);
    }

    #[test]
    fn layering_prefers_the_higher_layer() {
        let flags = raw(&[("proxy_port", "1")]);
        let file = raw(&[("proxy_port", "2"), ("inbound_port", "3")]);
        let merged = flags.layer(file);
        assert_eq!(merged.proxy_port.as_deref(), Some("1"));
        assert_eq!(merged.inbound_port.as_deref(), Some("3"));
    }

    #[test]
    fn a_refused_value_says_where_it_came_from_unless_it_was_a_flag() {
        let args = |a: &[&str]| a.iter().map(std::ffi::OsString::from).collect::<Vec<_>>();
        let env = |k: &str| (k == "SHUNT_PROXY_PORT").then(|| "x".to_string());
        assert_eq!(
            origin_of("proxy-port", &args(&["shunt", "render"]), env).as_deref(),
            Some("the value comes from the environment: SHUNT_PROXY_PORT=x")
        );
        assert_eq!(
            origin_of(
                "proxy-port",
                &args(&["shunt", "render", "--proxy-port=x"]),
                env
            ),
            None
        );
        assert_eq!(
            origin_of(
                "proxy-port",
                &args(&["shunt", "render", "--proxy-port", "x"]),
                env
            ),
            None
        );
        assert_eq!(
            origin_of("dns-port", &args(&["shunt", "render"]), env).as_deref(),
            Some("the value comes from the config file's `dns_port` key")
        );
        // Not a capture option: nothing to say.
        assert_eq!(origin_of("uid", &args(&["shunt"]), env), None);
    }
}
