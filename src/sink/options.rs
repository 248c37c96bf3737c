//! Options every sink accepts, validated in one place.

use std::time::Duration;

use crate::connector::options::{OptionSpec, TableOptions, parse_bytes};
use crate::error::Result;

/// The options shared by every sink; a connector lists them after its own.
pub const SINK_OPTIONS: &[OptionSpec] = &[
    OptionSpec::new("batch_rows", "rows per request; default 100000"),
    OptionSpec::new(
        "batch_bytes",
        "in-memory bytes per request (e.g. 16MiB); default 64MiB",
    ),
    OptionSpec::new(
        "linger",
        "longest wait to fill a request (e.g. 500ms); default 1s",
    ),
    OptionSpec::new("concurrency", "requests in flight; default 4"),
    OptionSpec::new("max_attempts", "tries per request, the first included; default 8"),
    OptionSpec::new(
        "max_elapsed",
        "longest time spent retrying one request; default 2m",
    ),
    OptionSpec::new("retry_initial", "first backoff ceiling; default 200ms"),
    OptionSpec::new("retry_max", "largest backoff ceiling; default 30s"),
    OptionSpec::new("timeout", "longest wait for one request; default 60s"),
    OptionSpec::new(
        "max_rejected",
        "rejected rows allowed: a count (100) or a share (0.5%); default 0",
    ),
    OptionSpec::new(
        "on_failure",
        "when a request cannot be delivered: 'spill' it and the rest of the statement to staging for flumen resume (default), or 'fail' the statement at once",
    ),
    OptionSpec::new(
        "validate",
        "a SQL condition every row must meet (false: dead letters, rule 'validate')",
    ),
    OptionSpec::new("not_null", "columns that must not be NULL, comma-separated"),
    OptionSpec::new(
        "unique",
        "columns whose values may appear once per statement, comma-separated",
    ),
    OptionSpec::new(
        "mode",
        "'append' (default), 'overwrite' (the target ends up holding exactly this statement's rows) or 'upsert' (rows replace those with the same 'keys')",
    ),
    OptionSpec::new("keys", "upsert: the key columns, comma-separated"),
];

/// How a statement's rows land in the target (option `mode`). Each sink says which modes it
/// honours ([`super::SinkBackend::modes`]); any other is refused when the table is declared.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum WriteMode {
    /// Rows are added to what the target holds.
    #[default]
    Append,
    /// The target ends up holding exactly the statement's rows, switched atomically where the
    /// target allows it.
    Overwrite,
    /// A row replaces the target's row with the same key columns (`keys`, which some sinks
    /// derive from their own options when not given).
    Upsert(Vec<String>),
}

impl WriteMode {
    /// The option value that names this mode.
    pub fn name(&self) -> &'static str {
        match self {
            WriteMode::Append => "append",
            WriteMode::Overwrite => "overwrite",
            WriteMode::Upsert(_) => "upsert",
        }
    }
}

/// What to do with a batch that could not be delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnFailure {
    /// Write it to Parquet staging; the job fails and `flumen resume` delivers it later.
    Spill,
    /// Fail the statement at once, staging nothing: `flumen resume` runs it again, skipping
    /// the rows the journal shows were delivered (broker messages are given back to the broker).
    Fail,
}

/// How many rejected rows a job tolerates.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RejectLimit {
    /// At most this many rows.
    Count(u64),
    /// At most this share of the rows seen (0.005 = 0.5%).
    Ratio(f64),
}

impl RejectLimit {
    /// Whether `rejected` of `seen` rows is over the limit.
    pub fn exceeded(&self, rejected: u64, seen: u64) -> bool {
        match *self {
            RejectLimit::Count(n) => rejected > n,
            RejectLimit::Ratio(r) => rejected as f64 > r * seen as f64,
        }
    }

    fn parse(v: &str) -> std::result::Result<Self, String> {
        let v = v.trim();
        if let Some(p) = v.strip_suffix('%') {
            let r: f64 = p
                .trim()
                .parse()
                .map_err(|_| format!("'{v}' is not a percentage"))?;
            return (0.0..=100.0)
                .contains(&r)
                .then_some(RejectLimit::Ratio(r / 100.0))
                .ok_or_else(|| "a percentage is between 0% and 100%".into());
        }
        if v.contains('.') {
            let r: f64 = v.parse().map_err(|_| format!("'{v}' is not a share"))?;
            return (0.0..=1.0)
                .contains(&r)
                .then_some(RejectLimit::Ratio(r))
                .ok_or_else(|| "a share is between 0.0 and 1.0".into());
        }
        v.parse()
            .map(RejectLimit::Count)
            .map_err(|_| format!("'{v}' is not a count or a share"))
    }
}

impl std::fmt::Display for RejectLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RejectLimit::Count(n) => write!(f, "{n} rows"),
            RejectLimit::Ratio(r) => write!(f, "{}% of the rows", r * 100.0),
        }
    }
}

/// The validated shared options of one sink table.
#[derive(Debug, Clone)]
pub struct SinkOptions {
    /// Rows per request.
    pub batch_rows: usize,
    /// In-memory bytes per request.
    pub batch_bytes: usize,
    /// Longest wait to fill a request before sending what is there.
    pub linger: Duration,
    /// Requests in flight.
    pub concurrency: usize,
    /// Tries per request (the first one included).
    pub max_attempts: u32,
    /// Longest time spent on one request's retries.
    pub max_elapsed: Duration,
    /// First backoff ceiling.
    pub retry_initial: Duration,
    /// Largest backoff ceiling.
    pub retry_max: Duration,
    /// Longest wait for one request; a request that takes longer is retried.
    pub timeout: Duration,
    /// Rejected rows tolerated before the job fails.
    pub max_rejected: RejectLimit,
    /// What happens to a batch that cannot be delivered.
    pub on_failure: OnFailure,
    /// Validation rules checked before the backend sees a row (`super::validate`).
    pub rules: super::validate::RuleOptions,
    /// How rows land in the target.
    pub mode: WriteMode,
    /// The connector (`STORED AS` name), for messages.
    pub connector: String,
}

impl Default for SinkOptions {
    fn default() -> Self {
        Self {
            batch_rows: 100_000,
            batch_bytes: 64 << 20,
            linger: Duration::from_secs(1),
            concurrency: 4,
            max_attempts: 8,
            max_elapsed: Duration::from_secs(120),
            retry_initial: Duration::from_millis(200),
            retry_max: Duration::from_secs(30),
            timeout: Duration::from_secs(60),
            max_rejected: RejectLimit::Count(0),
            on_failure: OnFailure::Spill,
            rules: Default::default(),
            mode: WriteMode::Append,
            connector: String::new(),
        }
    }
}

impl SinkOptions {
    /// Reads the shared options from a table's validated options.
    pub fn from_options(o: &TableOptions) -> Result<Self> {
        Self::from_options_with(o, Self::default())
    }

    /// Like [`SinkOptions::from_options`], with a connector's own defaults for what is not set.
    pub fn from_options_with(o: &TableOptions, d: SinkOptions) -> Result<Self> {
        let duration = |name: &str, default: Duration| -> Result<Duration> {
            match o.get(name) {
                None => Ok(default),
                Some(v) => parse_duration(v).map_err(|m| o.bad_value(name, v, &m)),
            }
        };
        let opts = Self {
            batch_rows: o.count_or("batch_rows", d.batch_rows as u64)?.max(1) as usize,
            batch_bytes: match o.get("batch_bytes") {
                None => d.batch_bytes,
                Some(v) => parse_bytes(v)
                    .map_err(|m| o.bad_value("batch_bytes", v, &m))?
                    .max(1) as usize,
            },
            linger: duration("linger", d.linger)?,
            concurrency: o.count_or("concurrency", d.concurrency as u64)?.clamp(1, 1024) as usize,
            max_attempts: o
                .count_or("max_attempts", u64::from(d.max_attempts))?
                .clamp(1, 1000) as u32,
            max_elapsed: duration("max_elapsed", d.max_elapsed)?,
            retry_initial: duration("retry_initial", d.retry_initial)?,
            retry_max: duration("retry_max", d.retry_max)?,
            timeout: duration("timeout", d.timeout)?,
            max_rejected: match o.get("max_rejected") {
                None => d.max_rejected,
                Some(v) => RejectLimit::parse(v).map_err(|m| o.bad_value("max_rejected", v, &m))?,
            },
            on_failure: match o.choice_or("on_failure", &["spill", "fail"], "spill")? {
                "fail" => OnFailure::Fail,
                _ => OnFailure::Spill,
            },
            rules: super::validate::RuleOptions {
                validate: o.get("validate").map(str::to_string),
                not_null: list(o.get("not_null")),
                unique: list(o.get("unique")),
            },
            mode: match o.choice_or("mode", &["append", "overwrite", "upsert"], "append")? {
                "overwrite" => WriteMode::Overwrite,
                "upsert" => WriteMode::Upsert(list(o.get("keys"))),
                _ => WriteMode::Append,
            },
            connector: o.connector().to_string(),
        };
        // (A sink with its own 'op' option, MongoDB's, also matches on 'keys'.)
        if o.get("keys").is_some() && !matches!(opts.mode, WriteMode::Upsert(_)) && o.get("op").is_none() {
            return Err(crate::error::Error::Option(format!(
                "table {}: option 'keys' is for 'mode' 'upsert' (the mode is '{}')",
                o.table(),
                opts.mode.name()
            )));
        }
        Ok(opts)
    }
}

/// A comma-separated list of names (empty when not given).
fn list(v: Option<&str>) -> Vec<String> {
    v.map(|v| {
        v.split(',')
            .map(|x| x.trim().to_string())
            .filter(|x| !x.is_empty())
            .collect()
    })
    .unwrap_or_default()
}

/// Parses `250ms`, `5s`, `2m`, `1h` (a bare number is seconds).
pub fn parse_duration(v: &str) -> std::result::Result<Duration, String> {
    let s = v.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("'{v}' is not a duration such as 500ms or 30s"))?;
    let secs = match unit.trim() {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        other => return Err(format!("unknown unit '{other}' (use ms, s, m, h)")),
    };
    Duration::try_from_secs_f64(secs).map_err(|_| format!("'{v}' is not a duration such as 500ms or 30s"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn opts(pairs: &[(&str, &str)]) -> Result<SinkOptions> {
        let raw: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        SinkOptions::from_options(&TableOptions::parse("TEST", "t", &raw, SINK_OPTIONS)?)
    }

    #[test]
    fn defaults_and_overrides() {
        let o = opts(&[]).unwrap();
        assert_eq!(
            (o.batch_rows, o.concurrency, o.on_failure),
            (100_000, 4, OnFailure::Spill)
        );
        let o = opts(&[
            ("batch_rows", "10k"),
            ("linger", "50ms"),
            ("on_failure", "fail"),
            ("batch_bytes", "1MiB"),
        ])
        .unwrap();
        assert_eq!(o.batch_rows, 10_000);
        assert_eq!(o.linger, Duration::from_millis(50));
        assert_eq!(o.on_failure, OnFailure::Fail);
        assert_eq!(o.batch_bytes, 1 << 20);
    }

    #[test]
    fn reject_limits() {
        assert_eq!(
            opts(&[("max_rejected", "0.5%")]).unwrap().max_rejected,
            RejectLimit::Ratio(0.005)
        );
        assert_eq!(
            opts(&[("max_rejected", "0.02")]).unwrap().max_rejected,
            RejectLimit::Ratio(0.02)
        );
        assert_eq!(
            opts(&[("max_rejected", "100")]).unwrap().max_rejected,
            RejectLimit::Count(100)
        );
        assert!(opts(&[("max_rejected", "lots")]).is_err());
        assert!(RejectLimit::Ratio(0.005).exceeded(6, 1000));
        assert!(!RejectLimit::Ratio(0.005).exceeded(5, 1000));
        assert!(RejectLimit::Count(0).exceeded(1, 10));
    }

    #[test]
    fn bad_values_name_the_option() {
        let e = opts(&[("linger", "soon")]).unwrap_err().to_string();
        assert!(e.contains("'linger'") && e.contains("'soon'"), "{e}");
        let e = opts(&[("on_failure", "retry")]).unwrap_err().to_string();
        assert!(e.contains("spill, fail"), "{e}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert!(parse_duration("-1s").is_err());
    }
}
