//! An [`Explanation`] for people: text (verdict, packet, path, uncertain rules) or a Mermaid
//! flowchart of the path.

use std::fmt::Write as _;

use super::eval::{Direction, Explanation, Outcome, Verdict};

fn verdict_text(v: Verdict, to_port: Option<u16>, to_addr: Option<&str>) -> String {
    match v {
        Verdict::Accept => "accepted".into(),
        Verdict::Drop => "dropped".into(),
        Verdict::Reject => "rejected".into(),
        Verdict::Redirect => format!("redirected to :{}", to_port.unwrap_or_default()),
        Verdict::Tproxy => format!("tproxy to :{}", to_port.unwrap_or_default()),
        Verdict::Dnat => format!("DNAT to {}", to_addr.unwrap_or("?")),
        Verdict::Unknown => "unknown".into(),
    }
}

fn outcome_text(o: &Outcome) -> String {
    let mut s = verdict_text(o.verdict, o.to_port, o.to_addr.as_deref());
    if let Some(r) = &o.reason {
        let _ = write!(s, " ({r})");
    }
    s
}

/// The one-line verdict, e.g. `redirected to :15001 (original destination 10.0.0.1:80)`.
pub fn headline(e: &Explanation) -> String {
    let mut s = verdict_text(e.verdict, e.to_port, e.to_addr.as_deref());
    match e.verdict {
        Verdict::Redirect | Verdict::Tproxy | Verdict::Dnat => {
            let _ = write!(s, " (original destination {})", e.original_dst);
        }
        Verdict::Accept if e.delivery == "unknown" => {
            let _ = write!(s, " (to {}, no route to it is known)", e.final_dst);
        }
        Verdict::Accept => {
            let _ = write!(s, ": {} to {}", e.delivery, e.final_dst);
        }
        Verdict::Unknown => {
            let n = e.uncertain.len();
            if n > 0 {
                let _ = write!(
                    s,
                    ": the outcome depends on {n} rule(s) that cannot be evaluated (below)"
                );
            }
        }
        _ => {}
    }
    s
}

fn packet_line(e: &Explanation) -> String {
    let p = &e.packet;
    let dir = match p.direction {
        Direction::Out => "out",
        Direction::In => "in",
    };
    let proto = match p.proto {
        super::eval::Proto::Tcp => "tcp",
        super::eval::Proto::Udp => "udp",
    };
    let mut s = format!(
        "{dir} {proto} {} -> {}",
        p.src.as_deref().unwrap_or("?"),
        p.dst
    );
    let opt = |v: Option<String>| v.unwrap_or_else(|| "?".into());
    if p.direction == Direction::Out {
        let _ = write!(
            s,
            ", uid {}, gid {}, oif {}",
            opt(p.uid.map(|u| u.to_string())),
            opt(p.gid.map(|g| g.to_string())),
            opt(p.oif.clone())
        );
    } else {
        let _ = write!(s, ", iif {}", opt(p.iif.clone()));
    }
    if p.mark != 0 {
        let _ = write!(s, ", mark {:#x}", p.mark);
    }
    let _ = write!(s, ", ctstate {:?}", p.ctstate);
    s.replace("ctstate New", "ctstate NEW")
}

pub fn text(e: &Explanation) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "verdict: {}", headline(e));
    let _ = writeln!(s, "packet:  {}", packet_line(e));
    if e.trace.is_empty() {
        let _ = writeln!(
            s,
            "path:    no rule matched; every chain's policy let it through"
        );
    } else {
        let _ = writeln!(s, "path:");
        let w = e
            .trace
            .iter()
            .map(|t| t.chain.len() + 5)
            .max()
            .unwrap_or(10);
        let table = |t: &super::eval::Step| match &t.backend {
            Some(b) => format!("{}({b})", t.table),
            None => t.table.clone(),
        };
        let tw = e
            .trace
            .iter()
            .map(|t| table(t).len())
            .max()
            .unwrap_or(6)
            .max(6);
        for t in &e.trace {
            let pos = match t.index {
                Some(i) => format!("{}#{i}", t.chain),
                None => t.chain.clone(),
            };
            let _ = writeln!(
                s,
                "  {:<11} {:<tw$} {:<w$} {}",
                t.hook,
                table(t),
                pos,
                t.rule,
                w = w,
                tw = tw
            );
        }
    }
    if !e.uncertain.is_empty() {
        let _ = writeln!(s, "uncertain (not evaluated, never guessed):");
        for u in &e.uncertain {
            let _ = writeln!(
                s,
                "  {} {} {}#{}: {}\n      because {}",
                u.step.hook,
                u.step.table,
                u.step.chain,
                u.step.index.unwrap_or_default(),
                u.step.rule,
                u.reason
            );
        }
    }
    if !e.possible.is_empty() {
        let all: Vec<String> = e.possible.iter().map(outcome_text).collect();
        let _ = writeln!(s, "possible: {}", all.join(" | "));
    }
    for n in &e.notes {
        let _ = writeln!(s, "note: {n}");
    }
    s
}

fn esc(s: &str) -> String {
    s.replace('"', "#quot;")
        .replace('<', "#lt;")
        .replace('>', "#gt;")
}

/// The path as a Mermaid flowchart: the packet, one box per hook holding the rules that
/// matched there, and the verdict.
pub fn mermaid(e: &Explanation) -> String {
    let mut s = String::from("flowchart TD\n");
    let _ = writeln!(
        s,
        "  pkt[\"{}\"]",
        esc(&packet_line(e).replacen(" -> ", " → ", 1))
    );
    let mut prev = "pkt".to_string();
    let mut i = 0;
    let mut hook_n = 0;
    while i < e.trace.len() {
        let hook = e.trace[i].hook;
        hook_n += 1;
        let _ = writeln!(s, "  subgraph h{hook_n} [\"{hook} hook\"]");
        let mut ids = Vec::new();
        while i < e.trace.len() && e.trace[i].hook == hook {
            let t = &e.trace[i];
            let pos = t.index.map(|n| format!(" #{n}")).unwrap_or_default();
            let id = format!("s{i}");
            let _ = writeln!(
                s,
                "    {id}[\"{} {}{}<br/>{}\"]",
                t.table,
                t.chain,
                pos,
                esc(&t.rule)
            );
            ids.push(id);
            i += 1;
        }
        s.push_str("  end\n");
        for id in ids {
            let _ = writeln!(s, "  {prev} --> {id}");
            prev = id;
        }
    }
    let _ = writeln!(s, "  verdict{{{{\"{}\"}}}}", esc(&headline(e)));
    let _ = writeln!(s, "  {prev} --> verdict");
    for (n, u) in e.uncertain.iter().enumerate() {
        let _ = writeln!(
            s,
            "  u{n}[/\"uncertain: {} {}#{}<br/>{}\"/]",
            u.step.table,
            u.step.chain,
            u.step.index.unwrap_or_default(),
            esc(&u.reason)
        );
        let _ = writeln!(s, "  u{n} -.-> verdict");
    }
    s
}
