//! The flumen statements DataFusion does not know, parsed before it sees the rest of a script:
//!
//! ```sql
//! CREATE MATERIALIZED VIEW [IF NOT EXISTS] name [OPTIONS ('watermark' 'column')] AS query;
//! REFRESH MATERIALIZED VIEW name [INCREMENTAL];
//! DROP MATERIALIZED VIEW [IF EXISTS] name;
//! SHOW MATERIALIZED VIEWS;
//! ```

use crate::error::{Error, Result};

/// A parsed materialized-view statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ViewStatement {
    Create {
        name: String,
        if_not_exists: bool,
        /// The view's own options (`'watermark'`), wherever they were written.
        options: Vec<(String, String)>,
        /// `STORED AS <connector> LOCATION '...' OPTIONS (...)`: where each refresh also goes.
        target: Option<super::mv::Target>,
        query: String,
    },
    Refresh {
        name: String,
        incremental: bool,
    },
    Drop {
        name: String,
        if_exists: bool,
    },
    Show,
    /// `CREATE CUBE name FROM source DIMENSIONS (...) MEASURES (...) [CUBE | ROLLUP | GROUPING
    /// SETS (...)] [OPTIONS ('watermark' 'column')]`; kept and refreshed as a materialized view.
    CreateCube {
        name: String,
        if_not_exists: bool,
        def: super::model::CubeDef,
        /// `OPTIONS (...)` after the sets: `'watermark'` makes it refresh incrementally.
        options: Vec<(String, String)>,
    },
}

/// A cursor over a statement's text.
struct Words<'a> {
    text: &'a str,
    pos: usize,
}

impl<'a> Words<'a> {
    /// Skips blanks and comments.
    fn skip(&mut self) {
        loop {
            let rest = &self.text[self.pos..];
            let trimmed = rest.trim_start();
            self.pos += rest.len() - trimmed.len();
            if trimmed.starts_with("--") {
                self.pos += trimmed.find('\n').unwrap_or(trimmed.len());
            } else if trimmed.starts_with("/*") {
                self.pos += trimmed.find("*/").map_or(trimmed.len(), |p| p + 2);
            } else {
                return;
            }
        }
    }

    /// The next word (letters, digits, `_`), without consuming it.
    fn peek(&mut self) -> &'a str {
        self.skip();
        let rest = &self.text[self.pos..];
        let end = rest
            .find(|c: char| !(c.is_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        &rest[..end]
    }

    /// Consumes `word` (any case) if it comes next.
    fn eat(&mut self, word: &str) -> bool {
        let w = self.peek();
        if w.eq_ignore_ascii_case(word) {
            self.pos += w.len();
            true
        } else {
            false
        }
    }

    fn expect(&mut self, word: &str, what: &str) -> Result<()> {
        if self.eat(word) {
            Ok(())
        } else {
            Err(syntax(format!(
                "{what}: expected {word}, found '{}'",
                self.shown()
            )))
        }
    }

    /// A view name: a plain identifier (folded to lower case, as DataFusion does) or a
    /// `"quoted"` one (kept as written).
    fn name(&mut self, what: &str) -> Result<String> {
        self.skip();
        let rest = &self.text[self.pos..];
        if let Some(q) = rest.strip_prefix('"') {
            let end = q
                .find('"')
                .ok_or_else(|| syntax(format!("{what}: the view name's closing \" is missing")))?;
            self.pos += end + 2;
            return Ok(q[..end].to_string());
        }
        let w = self.peek();
        if w.is_empty() || w.starts_with(|c: char| c.is_ascii_digit()) {
            return Err(syntax(format!(
                "{what}: expected a view name, found '{}'",
                self.shown()
            )));
        }
        self.pos += w.len();
        Ok(w.to_lowercase())
    }

    fn punct(&mut self, c: char) -> bool {
        self.skip();
        if self.text[self.pos..].starts_with(c) {
            self.pos += c.len_utf8();
            true
        } else {
            false
        }
    }

    /// The text inside the `( ... )` that comes next (nested parentheses and strings kept).
    fn group(&mut self, what: &str) -> Result<&'a str> {
        self.skip();
        let rest = &self.text[self.pos..];
        if !rest.starts_with('(') {
            return Err(syntax(format!("{what}: expected (, found '{}'", self.shown())));
        }
        let (mut depth, mut quoted) = (0usize, false);
        for (i, c) in rest.char_indices() {
            match c {
                '\'' => quoted = !quoted,
                '(' if !quoted => depth += 1,
                ')' if !quoted => {
                    depth -= 1;
                    if depth == 0 {
                        self.pos += i + 1;
                        return Ok(&rest[1..i]);
                    }
                }
                _ => {}
            }
        }
        Err(syntax(format!("{what}: the closing ) is missing")))
    }

    /// A `'...'` literal with `''` escapes.
    fn string(&mut self, what: &str) -> Result<String> {
        self.skip();
        let rest = &self.text[self.pos..];
        let Some(body) = rest.strip_prefix('\'') else {
            return Err(syntax(format!(
                "{what}: expected a '...' string, found '{}'",
                self.shown()
            )));
        };
        let mut out = String::new();
        let mut chars = body.char_indices().peekable();
        while let Some((i, c)) = chars.next() {
            if c == '\'' {
                if chars.peek().is_some_and(|(_, n)| *n == '\'') {
                    chars.next();
                    out.push('\'');
                } else {
                    self.pos += 1 + i + 1;
                    return Ok(out);
                }
            } else {
                out.push(c);
            }
        }
        Err(syntax(format!("{what}: unterminated string")))
    }

    fn at_end(&mut self) -> bool {
        self.skip();
        self.pos >= self.text.len()
    }

    fn shown(&self) -> String {
        self.text[self.pos..].trim().chars().take(30).collect()
    }
}

fn syntax(message: String) -> Error {
    Error::Config(message)
}

/// `text` cut at its top-level commas (not inside parentheses or strings), items trimmed.
fn split_top(text: &str) -> Vec<String> {
    let (mut out, mut depth, mut quoted, mut start) = (Vec::new(), 0i32, false, 0);
    for (i, c) in text.char_indices() {
        match c {
            '\'' => quoted = !quoted,
            '(' if !quoted => depth += 1,
            ')' if !quoted => depth -= 1,
            ',' if !quoted && depth == 0 => {
                out.push(text[start..i].trim().to_string());
                start = i + 1;
            }
            _ => {}
        }
    }
    let last = text[start..].trim();
    if !last.is_empty() {
        out.push(last.to_string());
    }
    out
}

/// `name => expression` items (a plain column may stand alone: its name is the column's).
fn named_items(cube: &str, list: &str, kind: &str, bare: bool) -> Result<Vec<(String, String)>> {
    split_top(list)
        .into_iter()
        .map(|item| match item.split_once("=>") {
            Some((n, e)) if !n.trim().is_empty() && !e.trim().is_empty() => {
                Ok((n.trim().trim_matches('"').to_string(), e.trim().to_string()))
            }
            None if bare && item.chars().all(|c| c.is_alphanumeric() || c == '_') => {
                Ok((item.to_lowercase(), item.clone()))
            }
            _ => Err(syntax(format!(
                "CREATE CUBE {cube}: {kind} '{item}' must be written name => expression"
            ))),
        })
        .collect()
}

/// `OPTIONS ('key' 'value', ...)` if it comes next.
fn parse_options(w: &mut Words<'_>, what: &str, name: &str) -> Result<Vec<(String, String)>> {
    let mut options = Vec::new();
    if w.eat("OPTIONS") {
        if !w.punct('(') {
            return Err(syntax(format!(
                "{what} {name}: OPTIONS needs ('key' 'value', ...)"
            )));
        }
        while !w.punct(')') {
            let k = w.string(what)?;
            let v = w.string(what)?;
            if !w.punct(',') && !w.text[w.pos..].trim_start().starts_with(')') {
                return Err(syntax(format!(
                    "{what} {name}: OPTIONS: expected , or ) after '{k}' '{v}'"
                )));
            }
            options.push((k, v));
        }
    }
    Ok(options)
}

fn parse_cube(w: &mut Words<'_>) -> Result<ViewStatement> {
    use super::model::{CubeDef, Sets};
    let what = "CREATE CUBE";
    let if_not_exists = w.eat("IF");
    if if_not_exists {
        w.expect("NOT", what)?;
        w.expect("EXISTS", what)?;
    }
    let name = w.name(what)?;
    let at = format!("{what} {name}");
    w.expect("FROM", &at)?;
    let source = w.name(&at)?;
    w.expect("DIMENSIONS", &at)?;
    let dimensions = named_items(&name, w.group(&at)?, "dimension", true)?;
    w.expect("MEASURES", &at)?;
    let measures = named_items(&name, w.group(&at)?, "measure", false)?;
    let sets = if w.eat("ROLLUP") {
        Sets::Rollup
    } else if w.eat("GROUPING") {
        w.expect("SETS", &at)?;
        let list = w.group(&at)?;
        let sets = split_top(list)
            .into_iter()
            .map(|s| {
                let inner = s
                    .trim()
                    .strip_prefix('(')
                    .and_then(|x| x.strip_suffix(')'))
                    .ok_or_else(|| {
                        syntax(format!("{at}: GROUPING SETS takes ((a, b), (a), ()), not '{s}'"))
                    })?;
                Ok(split_top(inner).into_iter().map(|d| d.to_lowercase()).collect())
            })
            .collect::<Result<Vec<Vec<String>>>>()?;
        Sets::Explicit(sets)
    } else {
        w.eat("CUBE");
        Sets::Cube
    };
    let options = parse_options(w, what, &name)?;
    if !w.at_end() {
        return Err(syntax(format!("{at}: unexpected '{}'", w.shown())));
    }
    let mut def = CubeDef::new(&name, source, dimensions, measures, sets)?;
    if options.iter().any(|(k, _)| k == "watermark") {
        def.make_mergeable(&name)?;
    }
    Ok(ViewStatement::CreateCube {
        def,
        name,
        if_not_exists,
        options,
    })
}

/// The statement if `sql` is one of flumen's own; `None` for everything else.
pub fn parse(sql: &str) -> Result<Option<ViewStatement>> {
    let mut w = Words { text: sql, pos: 0 };
    let first = w.peek().to_ascii_uppercase();
    let stmt = match first.as_str() {
        "CREATE" | "REFRESH" | "DROP" => {
            w.eat(&first);
            if first == "CREATE" && w.eat("CUBE") {
                return parse_cube(&mut w).map(Some);
            }
            // REFRESH CUBE and DROP CUBE: a cube is kept as a materialized view.
            let cube = first != "CREATE" && w.eat("CUBE");
            if !(cube || (w.eat("MATERIALIZED") && w.eat("VIEW"))) {
                return Ok(None);
            }
            match first.as_str() {
                "CREATE" => {
                    let what = "CREATE MATERIALIZED VIEW";
                    let if_not_exists = w.eat("IF");
                    if if_not_exists {
                        w.expect("NOT", what)?;
                        w.expect("EXISTS", what)?;
                    }
                    let name = w.name(what)?;
                    let mut options = parse_options(&mut w, what, &name)?;
                    let mut target = None;
                    if w.eat("STORED") {
                        w.expect("AS", &format!("{what} {name} STORED"))?;
                        let connector = w.name(&format!("{what} {name} STORED AS"))?.to_ascii_uppercase();
                        w.expect("LOCATION", &format!("{what} {name} STORED AS {connector}"))?;
                        let location = w.string(&format!("{what} {name} LOCATION"))?;
                        // The view's own options go to the view, the rest to the connector.
                        let (own, theirs): (Vec<_>, Vec<_>) = parse_options(&mut w, what, &name)?
                            .into_iter()
                            .partition(|(k, _)| super::mv::VIEW_OPTIONS.contains(&k.as_str()));
                        options.extend(own);
                        target = Some(super::mv::Target {
                            stored_as: connector,
                            location,
                            options: theirs,
                        });
                    }
                    w.expect("AS", &format!("{what} {name}"))?;
                    w.skip();
                    let query = w.text[w.pos..].trim().to_string();
                    if query.is_empty() {
                        return Err(syntax(format!("{what} {name}: the query after AS is missing")));
                    }
                    ViewStatement::Create {
                        name,
                        if_not_exists,
                        options,
                        target,
                        query,
                    }
                }
                "REFRESH" => {
                    let name = w.name("REFRESH MATERIALIZED VIEW")?;
                    let incremental = w.eat("INCREMENTAL");
                    ViewStatement::Refresh { name, incremental }
                }
                _ => {
                    let what = "DROP MATERIALIZED VIEW";
                    let if_exists = w.eat("IF");
                    if if_exists {
                        w.expect("EXISTS", what)?;
                    }
                    ViewStatement::Drop {
                        name: w.name(what)?,
                        if_exists,
                    }
                }
            }
        }
        "SHOW" => {
            w.eat("SHOW");
            if !(w.eat("MATERIALIZED") && w.eat("VIEWS")) {
                return Ok(None);
            }
            ViewStatement::Show
        }
        _ => return Ok(None),
    };
    if !matches!(stmt, ViewStatement::Create { .. }) && !w.at_end() {
        return Err(syntax(format!(
            "unexpected '{}' at the end of the statement",
            w.shown()
        )));
    }
    Ok(Some(stmt))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements() {
        assert_eq!(
            parse("-- daily\nCREATE MATERIALIZED VIEW IF NOT EXISTS Daily OPTIONS ('watermark' 'ts', 'x' 'it''s') AS\n SELECT 1")
                .unwrap(),
            Some(ViewStatement::Create {
                name: "daily".into(),
                if_not_exists: true,
                options: vec![("watermark".into(), "ts".into()), ("x".into(), "it's".into())],
                target: None,
                query: "SELECT 1".into(),
            })
        );
        assert_eq!(
            parse("CREATE MATERIALIZED VIEW v STORED AS postgres LOCATION 'postgres://h/db' OPTIONS ('table' 'v', 'watermark' 'id') AS SELECT 3").unwrap(),
            Some(ViewStatement::Create {
                name: "v".into(),
                if_not_exists: false,
                options: vec![("watermark".into(), "id".into())],
                target: Some(crate::cube::mv::Target {
                    stored_as: "POSTGRES".into(),
                    location: "postgres://h/db".into(),
                    options: vec![("table".into(), "v".into())],
                }),
                query: "SELECT 3".into(),
            })
        );
        assert_eq!(
            parse("create materialized view \"Mixed\" as select 2").unwrap(),
            Some(ViewStatement::Create {
                name: "Mixed".into(),
                if_not_exists: false,
                options: vec![],
                target: None,
                query: "select 2".into(),
            })
        );
        assert_eq!(
            parse("REFRESH MATERIALIZED VIEW daily INCREMENTAL").unwrap(),
            Some(ViewStatement::Refresh {
                name: "daily".into(),
                incremental: true
            })
        );
        assert_eq!(
            parse("DROP MATERIALIZED VIEW IF EXISTS daily").unwrap(),
            Some(ViewStatement::Drop {
                name: "daily".into(),
                if_exists: true
            })
        );
        assert_eq!(
            parse("SHOW MATERIALIZED VIEWS").unwrap(),
            Some(ViewStatement::Show)
        );
        for other in [
            "CREATE VIEW v AS SELECT 1",
            "SELECT 1",
            "DROP TABLE t",
            "SHOW TABLES",
            "refresh",
        ] {
            assert_eq!(parse(other).unwrap(), None, "{other}");
        }
    }

    #[test]
    fn mistakes_are_named() {
        let e = |s: &str| parse(s).unwrap_err().to_string();
        assert!(e("CREATE MATERIALIZED VIEW v SELECT 1").contains("expected AS"));
        assert!(e("CREATE MATERIALIZED VIEW v AS").contains("query after AS is missing"));
        assert!(
            e("CREATE MATERIALIZED VIEW v STORED AS CLICKHOUSE AS SELECT 1").contains("expected LOCATION")
        );
        assert!(e("REFRESH MATERIALIZED VIEW v FULLY").contains("unexpected 'FULLY'"));
        assert!(
            e("CREATE MATERIALIZED VIEW v OPTIONS ('a') AS SELECT 1").contains("expected a '...' string")
        );
    }
}
