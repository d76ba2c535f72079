//! `shunt proxy`: the redirect-aware proxy (issue 3). Placeholder until it lands.

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("the proxy is not implemented in this build")]
    NotImplemented,
}

/// Flags of `shunt proxy` (SPEC §4).
#[derive(Debug, Clone, clap::Args)]
pub struct ProxyArgs {}

pub fn run(_args: ProxyArgs) -> Result<(), ProxyError> {
    Err(ProxyError::NotImplemented)
}
