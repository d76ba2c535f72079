//! The seam between the plan and a packet-filter engine. One [`Plan`] feeds every engine;
//! each engine only knows how to write it, read it back, compare, and remove it. `capture`
//! (locking, policy routing, the ::6 address, reports) is the same for all of them, so a new
//! engine (an eBPF data path, say) is one more implementation of [`Engine`].

use serde::Serialize;

use crate::netfilter::NetfilterError;
use crate::plan::{Family, Plan};

/// Which engine holds (or gets) shunt's rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// iptables-legacy
    Legacy,
    /// iptables-nft: the iptables dialect over nf_tables
    Nft,
    /// shunt's native nftables table (`inet shunt`)
    Nftables,
}

impl EngineKind {
    pub fn name(self) -> &'static str {
        match self {
            EngineKind::Legacy => "legacy",
            EngineKind::Nft => "nft",
            EngineKind::Nftables => "nftables",
        }
    }
}

impl From<crate::netfilter::Backend> for EngineKind {
    fn from(b: crate::netfilter::Backend) -> EngineKind {
        match b {
            crate::netfilter::Backend::Legacy => EngineKind::Legacy,
            crate::netfilter::Backend::Nft => EngineKind::Nft,
        }
    }
}

/// What one script or diff covers: one IP family (iptables), or both at once (`inet`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Part {
    V4,
    V6,
    Inet,
}

impl Part {
    pub fn name(self) -> &'static str {
        match self {
            Part::V4 => "IPv4",
            Part::V6 => "IPv6",
            Part::Inet => "inet (IPv4 and IPv6)",
        }
    }
}

impl From<Family> for Part {
    fn from(f: Family) -> Part {
        match f {
            Family::V4 => Part::V4,
            Family::V6 => Part::V6,
        }
    }
}

/// What `clean` did: the scripts that ran, the tproxy marks the removed rules used (their
/// policy routing goes too), and every part that could not be removed.
#[derive(Debug, Default)]
pub struct Cleaned {
    pub removed: Vec<(Part, String)>,
    pub marks: Vec<u32>,
    pub errors: Vec<String>,
}

/// One engine, bound to a namespace (its handle is held by the engine).
pub trait Engine {
    fn kind(&self) -> EngineKind;
    /// The tproxy marks the installed rules use (read before converging, so the routing of
    /// a mark the new plan drops can be removed after).
    fn installed_marks(&mut self) -> Result<Vec<u32>, NetfilterError>;
    /// Converges the namespace to `plan`, all or nothing; the scripts that ran (or, with
    /// `dry_run`, would run). Nothing at all when the installed rules already match.
    fn converge(
        &mut self,
        plan: &Plan,
        dry_run: bool,
    ) -> Result<Vec<(Part, String)>, NetfilterError>;
    /// Installed versus planned, as unified-style lines (`-` installed only, `+` planned
    /// only) per part; empty when in sync.
    fn drift(&mut self, plan: &Plan) -> Result<Vec<(Part, Vec<String>)>, NetfilterError>;
    /// Removes everything of shunt's this engine holds, going on past a failing part.
    fn clean(&mut self) -> Cleaned;
}

/// A minimal line diff (longest common subsequence): `-` lines only in `a`, `+` only in `b`.
pub fn diff(a: &[String], b: &[String]) -> Vec<String> {
    if a == b {
        return Vec::new();
    }
    let (n, m) = (a.len(), b.len());
    let mut lcs = vec![vec![0u32; m + 1]; n + 1];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j, mut out) = (0, 0, Vec::new());
    while i < n || j < m {
        if i < n && j < m && a[i] == b[j] {
            i += 1;
            j += 1;
        } else if i < n && (j == m || lcs[i + 1][j] >= lcs[i][j + 1]) {
            out.push(format!("- {}", a[i]));
            i += 1;
        } else {
            out.push(format!("+ {}", b[j]));
            j += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::diff;

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn diff_marks_missing_and_extra_lines() {
        assert!(diff(&v(&["a", "b"]), &v(&["a", "b"])).is_empty());
        assert_eq!(
            diff(&v(&["a", "x", "c"]), &v(&["a", "b", "c"])),
            v(&["- x", "+ b"])
        );
        assert_eq!(diff(&v(&[]), &v(&["a"])), v(&["+ a"]));
    }
}
