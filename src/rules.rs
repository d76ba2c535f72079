//! `iptables-save` text -> tables, chains and rules (argument lists).
//!
//! Shared by `check` (compare with the plan), `apply` (what is installed now), `clean`, and
//! later `explain` and `doctor`. It parses any tool's rules, not only shunt's.

use std::collections::BTreeMap;

use crate::plan::CHAIN_PREFIX;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("iptables-save output, line {line}: {reason}")]
pub struct ParseError {
    pub line: usize,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedRule {
    pub chain: String,
    /// Arguments after `-A CHAIN`, unquoted.
    pub args: Vec<String>,
}

impl SavedRule {
    /// The chain this rule jumps or goes to, if any.
    pub fn target_chain(&self) -> Option<&str> {
        self.args
            .windows(2)
            .find(|w| w[0] == "-j" || w[0] == "-g" || w[0] == "--jump" || w[0] == "--goto")
            .map(|w| w[1].as_str())
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SavedTable {
    pub name: String,
    /// Chains in declaration order, with their policy (`-` for user chains).
    pub chains: Vec<(String, String)>,
    pub rules: Vec<SavedRule>,
}

/// Every table of one family's `iptables-save` output.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Saved {
    pub tables: Vec<SavedTable>,
}

impl Saved {
    pub fn table(&self, name: &str) -> Option<&SavedTable> {
        self.tables.iter().find(|t| t.name == name)
    }

    /// True when any table has a user chain or a rule (i.e. some tool installed rules).
    pub fn has_rules(&self) -> bool {
        self.tables
            .iter()
            .any(|t| !t.rules.is_empty() || t.chains.iter().any(|(_, p)| p == "-"))
    }
}

/// Splits a rule line into arguments the way iptables-restore does: double quotes group, and
/// inside them a backslash takes the next character as it is (iptables-save writes a comment
/// `a"b\` as `"a\"b\\"`); outside quotes a backslash is an ordinary character.
pub fn tokenize(line: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut quoted = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            // A backslash that ends the line leaves the quote open: an error below.
            '\\' if quoted => cur.extend(chars.next()),
            '"' => {
                quoted = !quoted;
                in_word = true;
            }
            c if c.is_whitespace() && !quoted => {
                if in_word {
                    out.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if quoted {
        return Err("unterminated quote".into());
    }
    if in_word {
        out.push(cur);
    }
    Ok(out)
}

pub fn parse(text: &str) -> Result<Saved, ParseError> {
    let mut saved = Saved::default();
    let mut current: Option<SavedTable> = None;
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        let err = |reason: &str| ParseError {
            line: i + 1,
            reason: format!("{reason}: {line:?}"),
        };
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(name) = line.strip_prefix('*') {
            if current.is_some() {
                return Err(err("table started before COMMIT"));
            }
            current = Some(SavedTable {
                name: name.trim().to_string(),
                ..Default::default()
            });
            continue;
        }
        if line == "COMMIT" {
            let table = current
                .take()
                .ok_or_else(|| err("COMMIT outside a table"))?;
            saved.tables.push(table);
            continue;
        }
        let table = current
            .as_mut()
            .ok_or_else(|| err("rule outside a table"))?;
        if let Some(decl) = line.strip_prefix(':') {
            let mut parts = decl.split_whitespace();
            let name = parts.next().ok_or_else(|| err("chain without a name"))?;
            let policy = parts.next().unwrap_or("-");
            table.chains.push((name.to_string(), policy.to_string()));
            continue;
        }
        let mut args = tokenize(line).map_err(|e| err(&e))?;
        // Counters (`[pkts:bytes] -A ...`, from `iptables-save -c`) are not part of the rule.
        if args.first().is_some_and(|a| a.starts_with('[')) {
            args.remove(0);
        }
        if args.len() < 2 || (args[0] != "-A" && args[0] != "--append") {
            return Err(err("expected -A CHAIN ..."));
        }
        let chain = args[1].clone();
        table.rules.push(SavedRule {
            chain,
            args: args.split_off(2),
        });
    }
    if current.is_some() {
        return Err(ParseError {
            line: text.lines().count(),
            reason: "missing COMMIT at end of input".into(),
        });
    }
    Ok(saved)
}

pub fn is_shunt_chain(name: &str) -> bool {
    name.starts_with(CHAIN_PREFIX)
}

/// shunt's part of one table: its own chains with their rules, and the jumps into them from
/// built-in chains, each in order. Two equal views mean the same installed behaviour.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShuntView {
    pub chains: BTreeMap<String, Vec<Vec<String>>>,
    pub jumps: BTreeMap<String, Vec<Vec<String>>>,
}

impl ShuntView {
    pub fn is_empty(&self) -> bool {
        self.chains.is_empty() && self.jumps.is_empty()
    }

    pub fn of(table: &SavedTable) -> ShuntView {
        let mut v = ShuntView::default();
        for (name, _) in &table.chains {
            if is_shunt_chain(name) {
                v.chains.entry(name.clone()).or_default();
            }
        }
        for r in &table.rules {
            if is_shunt_chain(&r.chain) {
                v.chains
                    .entry(r.chain.clone())
                    .or_default()
                    .push(r.args.clone());
            } else if r.target_chain().is_some_and(is_shunt_chain) {
                v.jumps
                    .entry(r.chain.clone())
                    .or_default()
                    .push(r.args.clone());
            }
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAVE: &str = r#"# Generated by iptables-save v1.8.9
*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [3:180]
:KUBE-SVC - [0:0]
:SHUNT_OUTPUT - [0:0]
:SHUNT_EMPTY - [0:0]
[5:300] -A OUTPUT -p tcp -j SHUNT_OUTPUT
-A OUTPUT -j KUBE-SVC
-A SHUNT_OUTPUT -o lo -m comment --comment "the \"lo\" rule" -j RETURN
-A KUBE-SVC -d 10.96.0.1/32 -j DNAT --to-destination 10.0.0.1:443
COMMIT
*filter
:INPUT ACCEPT [0:0]
COMMIT
"#;

    #[test]
    fn parses_tables_chains_rules_and_quotes() {
        let s = parse(SAVE).unwrap();
        assert_eq!(s.tables.len(), 2);
        let nat = s.table("nat").unwrap();
        assert_eq!(nat.chains.len(), 5);
        assert_eq!(nat.rules.len(), 4);
        assert_eq!(nat.rules[0].args, ["-p", "tcp", "-j", "SHUNT_OUTPUT"]);
        assert_eq!(nat.rules[2].args[5], "the \"lo\" rule");
        assert!(s.has_rules());
        assert!(!parse("*filter\n:INPUT ACCEPT [0:0]\nCOMMIT\n")
            .unwrap()
            .has_rules());
    }

    #[test]
    fn shunt_view_takes_only_shunt_chains_and_jumps() {
        let s = parse(SAVE).unwrap();
        let v = ShuntView::of(s.table("nat").unwrap());
        assert_eq!(
            v.chains.keys().collect::<Vec<_>>(),
            ["SHUNT_EMPTY", "SHUNT_OUTPUT"]
        );
        assert_eq!(v.jumps["OUTPUT"].len(), 1);
        assert!(!v.jumps.contains_key("KUBE-SVC"));
    }

    #[test]
    fn errors_name_the_line() {
        let e = parse("*nat\n-A\nCOMMIT\n").unwrap_err();
        assert_eq!(e.line, 2);
        assert!(parse("*nat\n-A X -j Y\n").is_err());
        assert!(parse("-A X -j Y\n").is_err());
        assert!(tokenize("a \"b").is_err());
    }

    /// iptables-save escapes `\` and `"` inside quotes (a comment `end\` is saved as
    /// `"end\\"`). Read with only `\"` as an escape, `\\` stayed two backslashes and the `\"`
    /// before the closing quote was taken for a quote, so the whole save was refused.
    #[test]
    fn a_backslash_in_quotes_takes_the_next_character() {
        let s = parse(concat!(
            "*filter\n",
            r#"-A INPUT -m comment --comment "end\\" -j ACCEPT"#,
            "\n",
            r#"-A INPUT -m comment --comment "a\\b \"c\" \z" -j ACCEPT"#,
            "\nCOMMIT\n",
        ))
        .unwrap();
        let rules = &s.table("filter").unwrap().rules;
        assert_eq!(rules[0].args[3], r"end\");
        assert_eq!(rules[1].args[3], r#"a\b "c" z"#);
        // Outside quotes, as iptables-restore reads `-i q\w`.
        assert_eq!(tokenize(r"-i q\w").unwrap(), ["-i", r"q\w"]);
        // Shrunk by tests/properties.rs: the token ` \` (from `" "\`) printed back as `" \"`.
        assert_eq!(tokenize(r#"" "\"#).unwrap(), [r" \"]);
        assert!(tokenize(r#""a\"#).is_err());
    }
}
