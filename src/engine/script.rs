//! Splitting a SQL script into statements and substituting `${VAR}`s, keeping line numbers.
//!
//! One small lexer knows where strings, quoted identifiers and comments are, so that `;` inside a
//! string does not end a statement and `${VAR}` inside a comment is left alone.

use std::collections::HashMap;

use crate::error::{Error, Result};

/// One statement of a script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement {
    /// The statement text, without the terminating `;`, comments kept.
    pub text: String,
    /// 1-based line of the statement's first non-blank, non-comment character.
    pub line: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Code,
    /// `'...'` (with `''` escapes); substituted values are quote-escaped here.
    Str,
    /// `"..."` or `` `...` ``.
    Ident,
    /// `-- ...` or `/* ... */`.
    Comment,
}

/// A run of the script of one kind: `text[start..end]`.
#[derive(Debug, Clone, Copy)]
struct Segment {
    kind: Kind,
    start: usize,
    end: usize,
}

/// 1-based line numbers of byte offsets, in O(log n) per lookup.
struct LineIndex(Vec<usize>);

impl LineIndex {
    fn new(text: &str) -> Self {
        Self(
            text.bytes()
                .enumerate()
                .filter(|(_, b)| *b == b'\n')
                .map(|(i, _)| i)
                .collect(),
        )
    }

    fn line(&self, pos: usize) -> usize {
        self.0.partition_point(|nl| *nl < pos) + 1
    }
}

/// Cuts `text` into code, string, identifier and comment segments.
fn lex(text: &str) -> Result<Vec<Segment>> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    let mut code_start = 0;
    let lines = LineIndex::new(text);
    let line_at = |pos: usize| lines.line(pos);
    while i < b.len() {
        let (kind, end) = match b[i] {
            b'\'' => {
                let mut j = i + 1;
                loop {
                    match b.get(j) {
                        None => {
                            return Err(Error::Syntax {
                                line: line_at(i),
                                message: "unterminated string literal (missing closing ')".into(),
                            });
                        }
                        Some(b'\'') if b.get(j + 1) == Some(&b'\'') => j += 2,
                        Some(b'\'') => break (Kind::Str, j + 1),
                        Some(_) => j += 1,
                    }
                }
            }
            q @ (b'"' | b'`') => match b[i + 1..].iter().position(|&c| c == q) {
                Some(p) => (Kind::Ident, i + 1 + p + 1),
                None => {
                    return Err(Error::Syntax {
                        line: line_at(i),
                        message: format!("unterminated quoted identifier (missing closing {})", q as char),
                    });
                }
            },
            // A variable in code is one token: `${OFFSET:--1}` holds no comment.
            b'$' if b.get(i + 1) == Some(&b'{') => {
                i = b[i..]
                    .iter()
                    .position(|&c| c == b'}' || c == b'\n')
                    .map_or(b.len(), |p| i + p + 1);
                continue;
            }
            b'-' if b.get(i + 1) == Some(&b'-') => {
                let end = b[i..].iter().position(|&c| c == b'\n').map_or(b.len(), |p| i + p);
                (Kind::Comment, end)
            }
            b'/' if b.get(i + 1) == Some(&b'*') => match text[i + 2..].find("*/") {
                Some(p) => (Kind::Comment, i + 2 + p + 2),
                None => {
                    return Err(Error::Syntax {
                        line: line_at(i),
                        message: "unterminated /* comment".into(),
                    });
                }
            },
            _ => {
                i += 1;
                continue;
            }
        };
        if code_start < i {
            out.push(Segment {
                kind: Kind::Code,
                start: code_start,
                end: i,
            });
        }
        out.push(Segment { kind, start: i, end });
        i = end;
        code_start = end;
    }
    if code_start < b.len() {
        out.push(Segment {
            kind: Kind::Code,
            start: code_start,
            end: b.len(),
        });
    }
    Ok(out)
}

/// Splits a script into statements at `;` outside strings, identifiers and comments.
/// Statements that hold only comments and blanks are dropped.
pub fn split(text: &str) -> Result<Vec<Statement>> {
    let mut stmts = Vec::new();
    let mut start = 0;
    let mut first_code: Option<usize> = None;
    let lines = LineIndex::new(text);
    let push = |start: usize, end: usize, first: Option<usize>, stmts: &mut Vec<Statement>| {
        if let Some(first) = first {
            stmts.push(Statement {
                text: text[start..end].trim().to_string(),
                line: lines.line(first),
            });
        }
    };
    for seg in lex(text)? {
        if seg.kind == Kind::Comment {
            continue;
        }
        if seg.kind != Kind::Code {
            first_code.get_or_insert(seg.start);
            continue;
        }
        let s = &text[seg.start..seg.end];
        let mut offset = 0;
        for piece in s.split_inclusive(';') {
            let piece_start = seg.start + offset;
            offset += piece.len();
            let body = piece.strip_suffix(';');
            let content = body.unwrap_or(piece);
            if let Some(p) = content.find(|c: char| !c.is_whitespace()) {
                first_code.get_or_insert(piece_start + p);
            }
            if body.is_some() {
                push(start, piece_start + content.len(), first_code.take(), &mut stmts);
                start = piece_start + piece.len();
            }
        }
    }
    push(start, text.len(), first_code, &mut stmts);
    Ok(stmts)
}

/// Where variable values come from: `--set` first, then the environment.
#[derive(Debug, Clone, Default)]
pub struct Variables {
    set: HashMap<String, String>,
    use_env: bool,
}

impl Variables {
    /// Variables from `--set` pairs, falling back to the process environment.
    pub fn new(set: HashMap<String, String>) -> Self {
        Self { set, use_env: true }
    }

    /// Variables from the given pairs only (tests, embedding).
    pub fn isolated(set: HashMap<String, String>) -> Self {
        Self { set, use_env: false }
    }

    /// Sets one variable, replacing an earlier value.
    pub fn insert(&mut self, name: impl Into<String>, value: impl Into<String>) {
        self.set.insert(name.into(), value.into());
    }

    /// The value of `name`, if set.
    pub fn get(&self, name: &str) -> Option<String> {
        self.set.get(name).cloned().or_else(|| {
            if self.use_env {
                std::env::var(name).ok()
            } else {
                None
            }
        })
    }

    /// Replaces every `${NAME}` and `${NAME:-default}` outside comments.
    ///
    /// Inside a `'...'` literal a value's `'` is doubled, so a value can never end the literal.
    /// `line` is the script line where `text` starts, for error messages. Calls `seen` with each
    /// variable name and the value used, so the caller can redact secrets.
    pub fn substitute(&self, text: &str, line: usize, mut seen: impl FnMut(&str, &str)) -> Result<String> {
        let mut out = String::with_capacity(text.len());
        let lines = LineIndex::new(text);
        for seg in lex(text)? {
            let s = &text[seg.start..seg.end];
            if !matches!(seg.kind, Kind::Code | Kind::Str) || !s.contains("${") {
                out.push_str(s);
                continue;
            }
            let mut rest = s;
            let mut pos = seg.start;
            while let Some(open) = rest.find("${") {
                out.push_str(&rest[..open]);
                let at_line = line + lines.line(pos + open) - 1;
                let Some(close) = rest[open..].find('}') else {
                    return Err(Error::Syntax {
                        line: at_line,
                        message: "'${' without a closing '}'".into(),
                    });
                };
                let inner = &rest[open + 2..open + close];
                let (name, default) = match inner.split_once(":-") {
                    Some((n, d)) => (n, Some(d)),
                    None => (inner, None),
                };
                if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    return Err(Error::Syntax {
                        line: at_line,
                        message: format!("'${{{inner}}}' is not a variable: names use letters, digits and _"),
                    });
                }
                let value = match (self.get(name), default) {
                    (Some(v), _) => v,
                    (None, Some(d)) => d.to_string(),
                    (None, None) => {
                        return Err(Error::UnsetVariable {
                            name: name.to_string(),
                            line: at_line,
                        });
                    }
                };
                seen(name, &value);
                if seg.kind == Kind::Str {
                    out.push_str(&value.replace('\'', "''"));
                } else {
                    out.push_str(&value);
                }
                pos += open + close + 1;
                rest = &rest[open + close + 1..];
            }
            out.push_str(rest);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Variables {
        Variables::isolated(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn splits_on_semicolons_outside_strings_and_comments() {
        let s = "-- header; not a split\nSELECT 'a;b' AS \"x;y\";\n\n/* c; */ SELECT 2 -- tail;\n;  \n-- only a comment;\n";
        let got = split(s).unwrap();
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got[0].text, "-- header; not a split\nSELECT 'a;b' AS \"x;y\"");
        assert_eq!(got[0].line, 2);
        assert_eq!(got[1].line, 4);
        assert!(got[1].text.starts_with("/* c; */ SELECT 2"));
    }

    #[test]
    fn a_default_that_starts_with_a_minus_is_not_a_comment() {
        let v = vars(&[]);
        let got = split("SELECT ${N:--1} AS n;\nSELECT 2").unwrap();
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(
            v.substitute(&got[0].text, 1, |_, _| {}).unwrap(),
            "SELECT -1 AS n"
        );
    }

    #[test]
    fn last_statement_without_semicolon_is_kept() {
        let got = split("SELECT 1;\nSELECT 2").unwrap();
        assert_eq!(got.iter().map(|s| s.line).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(got[1].text, "SELECT 2");
    }

    #[test]
    fn escaped_quotes_stay_in_the_string() {
        let got = split("SELECT 'it''s; fine';").unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].text, "SELECT 'it''s; fine'");
    }

    #[test]
    fn unterminated_string_names_its_line() {
        let e = split("SELECT 1;\nSELECT 'oops;\n").unwrap_err();
        assert!(matches!(e, Error::Syntax { line: 2, .. }), "{e:?}");
    }

    #[test]
    fn substitutes_set_values_and_defaults() {
        let v = vars(&[("HOST", "db1"), ("N", "3")]);
        let got = v
            .substitute("SELECT '${HOST}', ${N}, '${PORT:-5432}'", 1, |_, _| {})
            .unwrap();
        assert_eq!(got, "SELECT 'db1', 3, '5432'");
    }

    #[test]
    fn empty_default_is_allowed() {
        let got = vars(&[]).substitute("'${X:-}'", 1, |_, _| {}).unwrap();
        assert_eq!(got, "''");
    }

    #[test]
    fn unset_variable_error_names_line() {
        let e = vars(&[])
            .substitute("SELECT 1,\n  ${MISSING}", 10, |_, _| {})
            .unwrap_err();
        assert!(
            matches!(e, Error::UnsetVariable { ref name, line: 11 } if name == "MISSING"),
            "{e:?}"
        );
    }

    #[test]
    fn comments_are_not_substituted() {
        let got = vars(&[])
            .substitute("-- uses ${UNSET}\nSELECT 1 /* ${ALSO} */", 1, |_, _| {})
            .unwrap();
        assert_eq!(got, "-- uses ${UNSET}\nSELECT 1 /* ${ALSO} */");
    }

    #[test]
    fn quotes_in_values_cannot_escape_a_literal() {
        let v = vars(&[("P", "x'; DROP TABLE t; --")]);
        let got = v.substitute("SELECT '${P}'", 1, |_, _| {}).unwrap();
        assert_eq!(got, "SELECT 'x''; DROP TABLE t; --'");
        assert_eq!(split(&got).unwrap().len(), 1);
    }

    #[test]
    fn reports_each_value_used() {
        let mut seen = Vec::new();
        vars(&[("A", "1")])
            .substitute("${A} ${B:-2}", 1, |n, v| seen.push(format!("{n}={v}")))
            .unwrap();
        assert_eq!(seen, vec!["A=1", "B=2"]);
    }

    #[test]
    fn bad_variable_syntax_is_an_error() {
        assert!(vars(&[]).substitute("SELECT ${A B}", 1, |_, _| {}).is_err());
        assert!(vars(&[]).substitute("SELECT ${A", 1, |_, _| {}).is_err());
    }
}
