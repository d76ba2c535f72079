//! Text surgery on a conflist: find the top-level `plugins` list in the file as it was written
//! and splice one entry in or out, leaving every other byte as it was (key order, spacing,
//! number spelling), so `install` then `uninstall` gives the file back byte for byte.
//!
//! The scanner only finds where values start and end; it never decides what they mean.
//! Callers parse the text with serde_json first (so it is well-formed JSON) and check that the
//! spliced text parses to exactly the structure they intended.

use std::ops::Range;

use serde_json::Value;

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SpliceError {
    #[error("unexpected text at byte {0}: not a JSON object")]
    Malformed(usize),
    #[error("it has no top-level \"plugins\" list: add one, or give shunt a lone plugin config")]
    NoPlugins,
    #[error("\"plugins\" (at byte {0}) is not a list")]
    NotAList(usize),
    #[error("\"plugins\" is there twice (at bytes {0} and {1}): keep one")]
    Twice(usize, usize),
}

/// Where the top-level `plugins` list of a conflist's text is: its `[` and each item's value.
#[derive(Debug, PartialEq, Eq)]
pub struct Plugins {
    key: usize,
    open: usize,
    pub items: Vec<Range<usize>>,
}

/// Finds the `plugins` key of the top-level object (by its decoded name, as serde_json reads
/// it: `"plug\u0069ns"` is `plugins`) and the span of every item of its list.
pub fn find_plugins(text: &str) -> Result<Plugins, SpliceError> {
    let mut s = Scan {
        b: text.as_bytes(),
        i: 0,
    };
    s.ws();
    s.eat(b'{')?;
    s.ws();
    if s.peek() == Some(b'}') {
        return Err(SpliceError::NoPlugins);
    }
    let mut found: Option<Plugins> = None;
    loop {
        s.ws();
        let key = s.string()?;
        s.ws();
        s.eat(b':')?;
        s.ws();
        // A key's span starts and ends at a quote, so it is a whole &str slice.
        let name = serde_json::from_str::<String>(&text[key.clone()])
            .map_err(|_| SpliceError::Malformed(key.start))?;
        if name == "plugins" {
            if let Some(first) = &found {
                return Err(SpliceError::Twice(first.key, key.start));
            }
            found = Some(s.list(key.start)?);
        } else {
            s.value()?;
        }
        s.ws();
        match s.peek() {
            Some(b',') => s.i += 1,
            Some(b'}') => break,
            _ => return Err(SpliceError::Malformed(s.i)),
        }
    }
    found.ok_or(SpliceError::NoPlugins)
}

/// `text` without the items whose `keep` is false, each taken out with the one comma and the
/// whitespace that joined it to its neighbour: what [`append`] added, it takes out exactly.
pub fn remove(text: &str, plugins: &Plugins, keep: &[bool]) -> String {
    let items = &plugins.items;
    let kept = |k: usize| keep.get(k).copied().unwrap_or(true);
    let mut cuts = Vec::new();
    if !(0..items.len()).any(kept) {
        // Every item goes: what was around them (the list's own spacing) stays.
        if let (Some(first), Some(last)) = (items.first(), items.last()) {
            cuts.push(first.start..last.end);
        }
    } else {
        let mut k = 0;
        while k < items.len() {
            if kept(k) {
                k += 1;
                continue;
            }
            let run = k;
            while k < items.len() && !kept(k) {
                k += 1;
            }
            // items[run..k] go. After a kept item: from its end to the run's end (the comma
            // before the run). At the start: up to the next item, kept since some item is.
            cuts.push(match run.checked_sub(1) {
                Some(before) => items[before].end..items[k - 1].end,
                None => items[run].start..items[k].start,
            });
        }
    }
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    for cut in cuts {
        out.push_str(&text[at..cut.start]);
        at = cut.end;
    }
    out.push_str(&text[at..]);
    out
}

/// `text` with `item` after the last item (or alone in an empty list), joined the way the
/// items already are: the same comma and spacing, and indented like them when they are on
/// lines of their own.
pub fn append(text: &str, plugins: &Plugins, item: &Value) -> String {
    let (at, sep) = match plugins.items.as_slice() {
        [] => (plugins.open + 1, String::new()),
        [only] => (
            only.end,
            format!(",{}", &text[plugins.open + 1..only.start]),
        ),
        [.., before, last] => (last.end, text[before.end..last.start].to_string()),
    };
    let rendered = match sep.rsplit_once('\n') {
        Some((_, indent)) => {
            let newline = if sep.contains("\r\n") { "\r\n" } else { "\n" };
            // Pretty JSON has no raw newline inside a string: each one starts a line.
            format!("{item:#}").replace('\n', &format!("{newline}{indent}"))
        }
        None => item.to_string(),
    };
    format!("{}{sep}{rendered}{}", &text[..at], &text[at..])
}

/// A cursor over JSON text known to be well-formed; it never indexes past the end (a
/// truncated text is `Malformed`, not a panic).
struct Scan<'a> {
    b: &'a [u8],
    i: usize,
}

impl Scan<'_> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    fn eat(&mut self, c: u8) -> Result<(), SpliceError> {
        if self.peek() == Some(c) {
            self.i += 1;
            Ok(())
        } else {
            Err(SpliceError::Malformed(self.i))
        }
    }

    /// A string from its opening quote to just past its closing one: a backslash takes the
    /// next byte with it, so `\"` and `\\` are read as the escapes they are.
    fn string(&mut self) -> Result<Range<usize>, SpliceError> {
        let start = self.i;
        self.eat(b'"')?;
        loop {
            match self.peek() {
                None => return Err(SpliceError::Malformed(start)),
                Some(b'\\') => self.i += 2,
                Some(b'"') => {
                    self.i += 1;
                    return Ok(start..self.i);
                }
                Some(_) => self.i += 1,
            }
        }
    }

    /// Any value: a string, a literal or number, or an object or list with everything nested
    /// in it (brackets inside strings do not count).
    fn value(&mut self) -> Result<Range<usize>, SpliceError> {
        let start = self.i;
        match self.peek() {
            None => Err(SpliceError::Malformed(start)),
            Some(b'"') => self.string(),
            Some(b'[' | b'{') => {
                let mut depth = 0usize;
                loop {
                    match self.peek() {
                        None => return Err(SpliceError::Malformed(start)),
                        Some(b'"') => {
                            self.string()?;
                        }
                        Some(b'[' | b'{') => {
                            depth += 1;
                            self.i += 1;
                        }
                        Some(b']' | b'}') => {
                            depth -= 1;
                            self.i += 1;
                            if depth == 0 {
                                return Ok(start..self.i);
                            }
                        }
                        Some(_) => self.i += 1,
                    }
                }
            }
            Some(_) => {
                while matches!(self.peek(), Some(c) if !b",]} \t\n\r".contains(&c)) {
                    self.i += 1;
                }
                if self.i == start {
                    Err(SpliceError::Malformed(start))
                } else {
                    Ok(start..self.i)
                }
            }
        }
    }

    /// The list that is the value of the key at `key`: its `[` and its items.
    fn list(&mut self, key: usize) -> Result<Plugins, SpliceError> {
        let open = self.i;
        if self.peek() != Some(b'[') {
            return Err(SpliceError::NotAList(key));
        }
        self.i += 1;
        let mut items = Vec::new();
        self.ws();
        if self.peek() == Some(b']') {
            self.i += 1;
            return Ok(Plugins { key, open, items });
        }
        loop {
            self.ws();
            items.push(self.value()?);
            self.ws();
            match self.peek() {
                Some(b',') => self.i += 1,
                Some(b']') => {
                    self.i += 1;
                    return Ok(Plugins { key, open, items });
                }
                _ => return Err(SpliceError::Malformed(self.i)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn items(text: &str) -> Vec<&str> {
        let p = find_plugins(text).unwrap();
        p.items.iter().map(|r| &text[r.clone()]).collect()
    }

    /// `append` then `remove` of the appended item gives `text` back byte for byte, and the
    /// appended text means the list with `item` at its end.
    fn round_trip(text: &str) -> String {
        let item = json!({"type": "shunt", "capabilities": {"x": true}});
        let p = find_plugins(text).unwrap();
        let added = append(text, &p, &item);
        let mut want: Value = serde_json::from_str(text).unwrap();
        want["plugins"].as_array_mut().unwrap().push(item);
        let got: Value = serde_json::from_str(&added)
            .unwrap_or_else(|e| panic!("{e}: appended text is not JSON:\n{added}"));
        assert_eq!(got, want, "{added}");
        let p2 = find_plugins(&added).unwrap();
        let keep: Vec<bool> = (0..p2.items.len()).map(|k| k != p.items.len()).collect();
        assert_eq!(remove(&added, &p2, &keep), text, "from\n{added}");
        added
    }

    #[test]
    fn strings_with_escaped_quotes_and_brackets_do_not_end_values() {
        let text = r#"{"a\"plugins\"": "\"plugins\": [1, 2] \\", "x": {"plugins": [9]},
            "plugins": ["]\"[", {"k": "}\\"}, [[1], [2, [3]]], -1.5e3, true, null]}"#;
        assert_eq!(
            items(text),
            [
                r#""]\"[""#,
                r#"{"k": "}\\"}"#,
                "[[1], [2, [3]]]",
                "-1.5e3",
                "true",
                "null"
            ]
        );
        round_trip(text);
    }

    #[test]
    fn a_key_is_compared_as_serde_reads_it() {
        assert_eq!(items(r#"{"plug\u0069ns": [1]}"#), ["1"]);
        assert_eq!(items(r#"{"plugins\u0000": [1], "plugins": [2]}"#), ["2"]);
    }

    #[test]
    fn empty_lists_and_trailing_whitespace() {
        assert_eq!(items(r#"{"plugins": []}"#), Vec::<&str>::new());
        assert_eq!(
            round_trip(r#"{"plugins":[]}"#),
            r#"{"plugins":[{"capabilities":{"x":true},"type":"shunt"}]}"#
        );
        round_trip("{\"plugins\": [ \n ]}");
        round_trip("\n {\"plugins\": [{\"type\": \"a\"}]} \n\t\n");
    }

    #[test]
    fn appended_items_follow_the_lists_layout() {
        let compact = round_trip(r#"{"plugins":[{"type":"a"},{"type":"b"}]}"#);
        assert!(!compact.contains('\n'), "{compact}");
        let spaced = round_trip(r#"{"plugins": [ {"type":"a"} ]}"#);
        assert!(spaced.contains(r#"{"type":"a"}, {"#), "{spaced}");
        let lines = round_trip("{\n  \"plugins\": [\n    {\"type\": \"a\"}\n  ]\n}\n");
        assert!(
            lines.contains("{\"type\": \"a\"},\n    {\n      \"capabilities\": {\n        \"x\""),
            "{lines}"
        );
        let crlf =
            round_trip("{\r\n\t\"plugins\": [\r\n\t\t{\"type\": \"a\"},\r\n\t\t{}\r\n\t]\r\n}");
        assert!(!crlf.replace("\r\n", "").contains('\n'), "{crlf:?}");
        assert!(
            crlf.contains("{},\r\n\t\t{\r\n\t\t  \"capabilities\""),
            "{crlf:?}"
        );
    }

    #[test]
    fn remove_takes_out_any_items_with_their_commas() {
        let text = r#"{ "plugins": [ 1 ,2,  3 , 4 ] , "z": 0 }"#;
        let p = find_plugins(text).unwrap();
        let left = |keep: [bool; 4]| remove(text, &p, &keep);
        assert_eq!(
            left([false, true, true, true]),
            r#"{ "plugins": [ 2,  3 , 4 ] , "z": 0 }"#
        );
        assert_eq!(
            left([false, false, true, true]),
            r#"{ "plugins": [ 3 , 4 ] , "z": 0 }"#
        );
        assert_eq!(
            left([true, false, true, false]),
            r#"{ "plugins": [ 1,  3 ] , "z": 0 }"#
        );
        assert_eq!(
            left([true, true, true, false]),
            r#"{ "plugins": [ 1 ,2,  3 ] , "z": 0 }"#
        );
        assert_eq!(
            left([false, true, false, true]),
            r#"{ "plugins": [ 2 , 4 ] , "z": 0 }"#
        );
        assert_eq!(left([false; 4]), r#"{ "plugins": [  ] , "z": 0 }"#);
        assert_eq!(left([true; 4]), text);
        for keep in 0..16u8 {
            let keep: Vec<bool> = (0..4).map(|k| keep & (1 << k) != 0).collect();
            let got: Value = serde_json::from_str(&remove(text, &p, &keep)).unwrap();
            let want: Vec<u8> = (1..=4).filter(|n| keep[*n as usize - 1]).collect();
            assert_eq!(got["plugins"], json!(want), "{keep:?}");
        }
    }

    #[test]
    fn what_is_not_one_plugins_list_is_refused() {
        assert_eq!(find_plugins("{}"), Err(SpliceError::NoPlugins));
        assert_eq!(
            find_plugins(r#"{"a": {"plugins": []}}"#),
            Err(SpliceError::NoPlugins)
        );
        assert_eq!(
            find_plugins(r#"{"plugins": {}}"#),
            Err(SpliceError::NotAList(1))
        );
        assert_eq!(
            find_plugins(r#"{"plugins": [], "plugins": [1]}"#),
            Err(SpliceError::Twice(1, 16))
        );
        // Truncated or broken text is an error, never a panic.
        for bad in [
            "",
            "[]",
            "{",
            r#"{"plugins""#,
            r#"{"plugins": ["#,
            r#"{"plugins": ["\"#,
            r#"{"plugins": [1,"#,
            r#"{"plugins": [{"a": "]"#,
            r#"{"a" 1}"#,
            r#"{"plugins": [,]}"#,
        ] {
            assert!(find_plugins(bad).is_err(), "{bad:?}");
        }
    }
}
