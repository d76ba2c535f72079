//! `shunt explain`: walk a packet through iptables rules the way netfilter does (issue 6).
//! Placeholder until it lands.

#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    #[error("explain is not implemented in this build")]
    NotImplemented,
}

/// Flags of `shunt explain`, `shunt doctor` and `shunt validate` (SPEC §6).
#[derive(Debug, Clone, clap::Args)]
pub struct ExplainArgs {}

#[derive(Debug, Clone, clap::Args)]
pub struct DoctorArgs {}

#[derive(Debug, Clone, clap::Args)]
pub struct ValidateArgs {}

/// Runs `shunt explain`; returns the process exit code.
pub fn run_explain(_args: ExplainArgs) -> Result<i32, crate::Error> {
    Err(ExplainError::NotImplemented.into())
}

/// Runs `shunt doctor`; returns the process exit code (non-zero on any failed check).
pub fn run_doctor(_args: DoctorArgs) -> Result<i32, crate::Error> {
    Err(ExplainError::NotImplemented.into())
}

/// Runs `shunt validate`; returns the process exit code (`exit::VALIDATION_FAILED` when
/// capture does not work).
pub fn run_validate(_args: ValidateArgs) -> Result<i32, crate::Error> {
    Err(ExplainError::NotImplemented.into())
}
