//! Table options: validated once, when `CREATE EXTERNAL TABLE` runs, with errors that name the
//! option, the table and the valid choices.

use std::collections::HashMap;
use std::str::FromStr;

use crate::error::{Error, Result};

/// One option a connector accepts.
#[derive(Debug, Clone, Copy)]
pub struct OptionSpec {
    /// Name as written in `OPTIONS ('name' 'value')`, lower case.
    pub name: &'static str,
    /// One line shown in errors and docs.
    pub doc: &'static str,
}

impl OptionSpec {
    /// A spec entry.
    pub const fn new(name: &'static str, doc: &'static str) -> Self {
        Self { name, doc }
    }
}

/// The validated options of one table.
#[derive(Debug, Clone)]
pub struct TableOptions {
    connector: String,
    table: String,
    values: HashMap<String, String>,
}

/// The namespace flumen moves connector options into before DataFusion plans the statement:
/// DataFusion reads an option without a namespace as a file-format option and checks some of
/// them itself (`compression` must be one of its file codecs), which is wrong for connectors.
pub const CONNECTOR_PREFIX: &str = "flumen.";

impl TableOptions {
    /// Checks `raw` (as DataFusion passes them: lower-cased keys, `format.` prefixed when the user
    /// wrote no namespace) against `specs`; an unknown option is an error listing the valid ones.
    pub fn parse(
        connector: &str,
        table: &str,
        raw: &HashMap<String, String>,
        specs: &[OptionSpec],
    ) -> Result<Self> {
        let mut values = HashMap::new();
        let mut keys: Vec<&String> = raw.keys().collect();
        keys.sort();
        for key in keys {
            let name = key
                .strip_prefix("format.")
                .or_else(|| key.strip_prefix(CONNECTOR_PREFIX))
                .unwrap_or(key)
                .to_ascii_lowercase();
            if !specs.iter().any(|s| s.name == name) {
                let valid: Vec<&str> = specs.iter().map(|s| s.name).collect();
                let hint = closest(&name, &valid)
                    .map(|c| format!(" (did you mean '{c}'?)"))
                    .unwrap_or_default();
                return Err(Error::Option(format!(
                    "table {table}: unknown {connector} option '{name}'{hint}; valid options: {}",
                    valid.join(", ")
                )));
            }
            values.insert(name, raw[key].clone());
        }
        Ok(Self {
            connector: connector.to_string(),
            table: table.to_string(),
            values,
        })
    }

    /// The table these options belong to.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// The connector's name as written after `STORED AS`.
    pub fn connector(&self) -> &str {
        &self.connector
    }

    /// The raw value of an option, if given.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.values.get(name).map(String::as_str)
    }

    /// The value of an option that must be given.
    pub fn required(&self, name: &str) -> Result<&str> {
        self.get(name).ok_or_else(|| {
            Error::Option(format!(
                "table {}: {} option '{name}' is required",
                self.table, self.connector
            ))
        })
    }

    /// Parses an option into `T`, or returns `default` when it is absent.
    pub fn parse_or<T: FromStr>(&self, name: &str, default: T) -> Result<T>
    where
        T::Err: std::fmt::Display,
    {
        match self.get(name) {
            None => Ok(default),
            Some(v) => v
                .trim()
                .parse::<T>()
                .map_err(|e| self.bad_value(name, v, &e.to_string())),
        }
    }

    /// Parses a count that may use `_` separators and k/M/G suffixes (`10M` = 10,000,000).
    pub fn count_or(&self, name: &str, default: u64) -> Result<u64> {
        match self.get(name) {
            None => Ok(default),
            Some(v) => parse_count(v).map_err(|m| self.bad_value(name, v, &m)),
        }
    }

    /// One of a fixed set of words (case-insensitive), or `default` when absent.
    pub fn choice_or<'a>(&self, name: &str, choices: &[&'a str], default: &'a str) -> Result<&'a str> {
        match self.get(name) {
            None => Ok(default),
            Some(v) => choices
                .iter()
                .find(|c| c.eq_ignore_ascii_case(v.trim()))
                .copied()
                .ok_or_else(|| self.bad_value(name, v, &format!("expected one of {}", choices.join(", ")))),
        }
    }

    /// An error naming this table, the option and its bad value.
    pub fn bad_value(&self, name: &str, value: &str, why: &str) -> Error {
        // A secret's value is never echoed, not even a wrong one.
        let value = if crate::engine::is_secret_option(name) {
            crate::engine::MASK
        } else {
            value
        };
        Error::Option(format!(
            "table {}: {} option '{name}' has bad value '{value}': {why}",
            self.table, self.connector
        ))
    }
}

/// Parses a list of `name<sep>value` items separated by `;` or newlines (`'Accept: json; X-A: b'`,
/// `'k=v; k2=v2'`); names and values are trimmed, a name may not be empty.
pub fn parse_pairs(v: &str, sep: char) -> std::result::Result<Vec<(String, String)>, String> {
    v.split([';', '\n'])
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.split_once(sep)
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                .filter(|(k, _)| !k.is_empty())
                .ok_or_else(|| {
                    format!("an item is not 'name{sep}value' (items are separated by ; or new lines)")
                })
        })
        .collect()
}

/// Parses `1000`, `1_000`, `10k`, `10M`, `2G` (decimal multipliers).
pub fn parse_count(v: &str) -> std::result::Result<u64, String> {
    let s = v.trim().replace('_', "");
    let (num, mul) = match s.char_indices().last() {
        Some((i, 'k' | 'K')) => (&s[..i], 1_000),
        Some((i, 'm' | 'M')) => (&s[..i], 1_000_000),
        Some((i, 'g' | 'G' | 'b' | 'B')) => (&s[..i], 1_000_000_000),
        _ => (s.as_str(), 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mul))
        .ok_or_else(|| "expected a whole number such as 1000, 10k, 10M".to_string())
}

/// Parses a byte size: `512`, `64KiB`, `64MB`, `1.5GiB`, `1G` (binary multipliers throughout).
pub fn parse_bytes(v: &str) -> std::result::Result<u64, String> {
    let s = v.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let mul: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return Err(format!("unknown unit '{unit}' (use B, KiB, MiB, GiB, TiB)")),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("'{v}' is not a size such as 512MiB or 2GiB"))?;
    if !(n.is_finite() && n >= 0.0) {
        return Err(format!("'{v}' is not a size such as 512MiB or 2GiB"));
    }
    Ok((n * mul as f64) as u64)
}

/// The valid name nearest to `given`, if it is close enough to be a likely typo.
fn closest<'a>(given: &str, valid: &[&'a str]) -> Option<&'a str> {
    valid
        .iter()
        .map(|v| (levenshtein(given, v), *v))
        .filter(|(d, v)| *d <= 2.max(v.len() / 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, v)| v)
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != *cb))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// A schema's column names, comma-separated, for messages that list them.
pub fn column_names(s: &arrow::datatypes::Schema) -> String {
    s.fields()
        .iter()
        .map(|f| f.name().as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPECS: &[OptionSpec] = &[
        OptionSpec::new("dataset", "which data set"),
        OptionSpec::new("rows", "how many rows"),
    ];

    fn raw(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn strips_format_prefix() {
        let o = TableOptions::parse("GENERATE", "t", &raw(&[("format.rows", "10k")]), SPECS).unwrap();
        assert_eq!(o.count_or("rows", 0).unwrap(), 10_000);
    }

    #[test]
    fn unknown_option_lists_valid_ones_and_suggests() {
        let e = TableOptions::parse("GENERATE", "t", &raw(&[("format.rowz", "1")]), SPECS)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown GENERATE option 'rowz'"), "{e}");
        assert!(e.contains("did you mean 'rows'"), "{e}");
        assert!(e.contains("valid options: dataset, rows"), "{e}");
        assert!(e.contains("table t"), "{e}");
    }

    #[test]
    fn bad_values_name_option_and_value() {
        let o = TableOptions::parse("GENERATE", "t", &raw(&[("rows", "lots")]), SPECS).unwrap();
        let e = o.count_or("rows", 0).unwrap_err().to_string();
        assert!(e.contains("'rows'") && e.contains("'lots'"), "{e}");
        let e = o.required("dataset").unwrap_err().to_string();
        assert!(e.contains("'dataset' is required"), "{e}");
    }

    #[test]
    fn choice_is_case_insensitive() {
        let o = TableOptions::parse("X", "t", &raw(&[("dataset", "Orders")]), SPECS).unwrap();
        assert_eq!(
            o.choice_or("dataset", &["users", "orders"], "users").unwrap(),
            "orders"
        );
        assert!(o.choice_or("dataset", &["users"], "users").is_err());
    }

    #[test]
    fn counts_and_sizes() {
        assert_eq!(parse_count("1_000").unwrap(), 1000);
        assert_eq!(parse_count("100M").unwrap(), 100_000_000);
        assert!(parse_count("-1").is_err());
        assert_eq!(parse_bytes("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_bytes("512m").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("1.5G").unwrap(), 3 << 29);
        assert!(parse_bytes("12 parsecs").is_err());
    }
}
