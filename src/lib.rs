//! shunt: the traffic-interception layer of a service-mesh sidecar.
//!
//! `config` -> `plan` (pure) -> `render` / `netfilter` (apply, clean, check) over `netns`.
//! See README.md for the commands and ARCHITECTURE notes in each module.

pub mod admin;
pub mod capture;
pub mod cni;
pub mod config;
pub mod duration;
pub mod engine;
pub mod explain;
pub mod istio;
pub mod logging;
pub mod netfilter;
pub mod netlink;
pub mod netns;
pub mod nftables;
pub mod plan;
pub mod proxy;
pub mod render;
pub mod resolv;
pub mod routing;
pub mod rules;
pub mod socket;

/// Exit codes, stable and documented in README.md.
pub mod exit {
    pub const OK: i32 = 0;
    /// A runtime failure; nothing was applied (or everything was rolled back).
    pub const FAILURE: i32 = 1;
    /// Bad usage or configuration; refused before anything changed.
    pub const USAGE: i32 = 2;
    /// `check`: the installed rules differ from the plan.
    pub const DRIFT: i32 = 3;
    /// `validate`: capture does not work in the namespace.
    pub const VALIDATION_FAILED: i32 = 4;
}

/// Every failure the commands report, with the exit code it maps to.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Netfilter(#[from] netfilter::NetfilterError),
    #[error(transparent)]
    Netns(#[from] netns::NetnsError),
    #[error(transparent)]
    CniInstall(#[from] cni::install::InstallError),
    #[error(transparent)]
    Proxy(#[from] proxy::ProxyError),
    #[error(transparent)]
    Explain(#[from] explain::ExplainError),
}

impl Error {
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Config(_)
            | Error::Explain(explain::ExplainError::Usage { .. })
            | Error::Proxy(proxy::ProxyError::Config(_) | proxy::ProxyError::Unsupported { .. }) => {
                exit::USAGE
            }
            _ => exit::FAILURE,
        }
    }
}
