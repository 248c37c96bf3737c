//! `STORED AS REDIS`: keys matching a pattern read as rows, rows written as keys.
//!
//! ```sql
//! CREATE EXTERNAL TABLE users (_key VARCHAR, id BIGINT, name VARCHAR, score DOUBLE)
//!   STORED AS REDIS LOCATION 'redis://:${REDIS_PASSWORD}@cache:6379/0'
//!   OPTIONS ('type' 'hash', 'key' 'user:{id}', 'ttl' '7d');
//! ```
//!
//! Reads SCAN (never KEYS) with `key_pattern` (default: the `key` template with `*` for each
//! column) and the type, and fetch each page of keys with one pipeline. Writes build each row's
//! key from the `key` template (or the key column) and send a pipeline per request. On a
//! cluster ([`conn`]) reads scan every master in parallel and writes go to each key's master.
//!
//! Each `type` has its own rows:
//!
//! | type     | one row per            | columns                                        | write             |
//! |----------|------------------------|------------------------------------------------|-------------------|
//! | `hash`   | key                    | key column + one per field                     | `HSET` (+`HDEL` of NULL fields) |
//! | `string` | key                    | key column + `value`                           | `SET` (NULL: `DEL`) |
//! | `json`   | key                    | key column + the document's fields (JSON text) | `SET` of the row as JSON |
//! | `list`   | key (`value` a list) or element (`value` a scalar) | key column + `value` | `RPUSH`           |
//! | `set`    | key or member, as for list | key column + `value`                       | `SADD`            |
//! | `zset`   | member                 | key column + `member` + `score`                | `ZADD`            |
//! | `stream` | entry                  | key column + `_id` + one per field             | `XADD` (`_id` or `*`) |
//!
//! Values are strings in Redis: each is parsed as its column's type (a value that does not
//! parse is an error naming the key and field), and written as text (`true`/`false`, ISO-8601
//! dates and times, exact decimals; binary columns as raw bytes).

pub mod conn;
mod sink;
pub mod source;
pub mod stream;

use std::sync::Arc;
use std::time::Duration;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider, TableProviderFactory};
use datafusion::logical_expr::CreateExternalTable;

use self::conn::{ClusterMode, Redis};
use self::sink::RedisBackend;
use self::source::RedisReader;
use crate::connector::options::{OptionSpec, TableOptions, column_names as names};
use crate::error::{Error, Result};
use crate::sink::{SINK_OPTIONS, SinkOptions, SinkTable, SourceSinkTable, WriteMode, parse_duration};

const OPTIONS: &[OptionSpec] = &[
    OptionSpec::new("type", "hash (default), string, json, list, set, zset or stream"),
    OptionSpec::new(
        "key",
        "writes: the key template over columns, e.g. 'user:{id}' ({{ and }} for braces)",
    ),
    OptionSpec::new(
        "key_pattern",
        "reads: the SCAN MATCH pattern; default the key template with * for each column",
    ),
    OptionSpec::new(
        "key_column",
        "the column holding the key (default _key): read from each key, written as the key without a template",
    ),
    OptionSpec::new(
        "value_column",
        "string, list and set: the value column (default value)",
    ),
    OptionSpec::new(
        "ttl",
        "writes: expire each written key after this long (e.g. 3600s, 7d)",
    ),
    OptionSpec::new("cluster", "'auto' (default: asks the server), 'true' or 'false'"),
    OptionSpec::new(
        "sample",
        "keys sampled for the columns when none are declared (default 100)",
    ),
    OptionSpec::new("scan_count", "reads: SCAN's COUNT hint (default 1000)"),
    OptionSpec::new(
        "stream_start",
        "stream reads: first entry id (default -, XRANGE's start; '(' for exclusive)",
    ),
    OptionSpec::new("stream_end", "stream reads: last entry id (default +)"),
    OptionSpec::new(
        "ca_cert",
        "rediss://: a PEM file with the CA that signed the server's certificate (default: the web PKI roots)",
    ),
    OptionSpec::new(
        "dedupe",
        "reads: drop keys SCAN returns twice (it may while the keyspace is resized; default true, 16 bytes per key)",
    ),
];

/// The shape of the keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Hash,
    String,
    Json,
    List,
    Set,
    ZSet,
    Stream,
}

impl Kind {
    /// The TYPE SCAN filters on.
    pub fn redis_type(self) -> &'static str {
        match self {
            Kind::Hash => "hash",
            Kind::String | Kind::Json => "string",
            Kind::List => "list",
            Kind::Set => "set",
            Kind::ZSet => "zset",
            Kind::Stream => "stream",
        }
    }
}

/// A piece of a key template.
#[derive(Debug, Clone, PartialEq)]
pub enum Seg {
    Lit(String),
    Col(usize),
}

/// How a table's rows map to keys, shared by reads and writes.
#[derive(Debug)]
pub struct Layout {
    /// The table's name, for messages.
    pub table: String,
    pub kind: Kind,
    pub schema: SchemaRef,
    pub key_col: Option<usize>,
    pub template: Option<Vec<Seg>>,
    pub pattern: String,
    /// string, list, set: the value; zset: the member.
    pub value_col: Option<usize>,
    pub score_col: Option<usize>,
    /// stream: the entry id.
    pub id_col: Option<usize>,
    /// hash, json, stream: the columns stored as fields.
    pub fields: Vec<usize>,
    pub ttl: Option<Duration>,
    pub stream_range: (String, String),
    pub scan_count: usize,
    pub dedupe: bool,
}

/// Parses `user:{id}:{region}` against the columns.
fn template(t: &str, schema: &Schema) -> Result<Vec<Seg>> {
    let mut out = Vec::new();
    let mut lit = String::new();
    let mut chars = t.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '{' if chars.peek() == Some(&'{') => {
                chars.next();
                lit.push('{');
            }
            '}' if chars.peek() == Some(&'}') => {
                chars.next();
                lit.push('}');
            }
            '{' => {
                let name: String = chars.by_ref().take_while(|&c| c != '}').collect();
                let i = schema.index_of(name.trim()).map_err(|_| {
                    Error::Option(format!(
                        "'key' '{t}': {{{name}}} is not a column (columns: {})",
                        names(schema)
                    ))
                })?;
                if !lit.is_empty() {
                    out.push(Seg::Lit(std::mem::take(&mut lit)));
                }
                out.push(Seg::Col(i));
            }
            '}' => return Err(Error::Option(format!("'key' '{t}': a lone }} (write }} twice)"))),
            c => lit.push(c),
        }
    }
    if !lit.is_empty() {
        out.push(Seg::Lit(lit));
    }
    if !out.iter().any(|s| matches!(s, Seg::Col(_))) {
        return Err(Error::Option(format!(
            "'key' '{t}' names no column: every row would write the same key (write e.g. 'user:{{id}}')"
        )));
    }
    Ok(out)
}

/// The SCAN pattern of a template: each column a `*`, glob characters escaped.
fn pattern_of(t: &[Seg]) -> String {
    t.iter()
        .map(|s| match s {
            Seg::Col(_) => "*".to_string(),
            Seg::Lit(l) => l
                .chars()
                .map(|c| match c {
                    '*' | '?' | '[' | ']' | '\\' => format!("\\{c}"),
                    c => c.to_string(),
                })
                .collect(),
        })
        .collect()
}

/// Whether a column can be a hash or stream field (a string in Redis).
fn scalar(t: &DataType) -> bool {
    !matches!(
        t,
        DataType::List(_)
            | DataType::LargeList(_)
            | DataType::FixedSizeList(..)
            | DataType::ListView(_)
            | DataType::Struct(_)
            | DataType::Map(..)
            | DataType::Union(..)
    )
}

/// Builds REDIS tables.
#[derive(Debug)]
pub struct RedisFactory;

#[async_trait]
impl TableProviderFactory for RedisFactory {
    async fn create(
        &self,
        _state: &dyn Session,
        cmd: &CreateExternalTable,
    ) -> datafusion::error::Result<Arc<dyn TableProvider>> {
        let name = cmd.name.to_string();
        let at = |e: Error| Error::Option(format!("table {name}: {e}"));
        let specs: Vec<OptionSpec> = OPTIONS.iter().chain(SINK_OPTIONS).copied().collect();
        let o = TableOptions::parse("REDIS", &name, &cmd.options, &specs)?;
        // Pipelines of 10k commands, four in flight: past that Redis itself is the limit.
        let sink = SinkOptions::from_options_with(
            &o,
            SinkOptions {
                batch_rows: 10_000,
                ..SinkOptions::default()
            },
        )?;
        let kind = match o.choice_or(
            "type",
            &["hash", "string", "json", "list", "set", "zset", "stream"],
            "hash",
        )? {
            "string" => Kind::String,
            "json" => Kind::Json,
            "list" => Kind::List,
            "set" => Kind::Set,
            "zset" => Kind::ZSet,
            "stream" => Kind::Stream,
            _ => Kind::Hash,
        };
        let cluster = match o.choice_or("cluster", &["auto", "true", "false"], "auto")? {
            "true" => ClusterMode::Yes,
            "false" => ClusterMode::No,
            _ => ClusterMode::Auto,
        };
        let location = cmd.locations.first().cloned().unwrap_or_default();
        let ca = o
            .get("ca_cert")
            .map(|p| std::fs::read(p).map_err(|e| o.bad_value("ca_cert", p, &format!("cannot read it: {e}"))))
            .transpose()?;
        let redis = Redis::new(&location, cluster, sink.concurrency, sink.timeout, ca).map_err(at)?;
        let key_name = o.get("key_column").unwrap_or("_key").to_string();
        let value_name = o.get("value_column").unwrap_or("value").to_string();
        let ttl = o
            .get("ttl")
            .map(|v| parse_duration(v).map_err(|e| o.bad_value("ttl", v, &e)))
            .transpose()?;
        if ttl.is_some_and(|t| t.as_secs() == 0) {
            return Err(at(Error::Option("'ttl' must be at least one second".into())).into());
        }
        let scan_count = o.count_or("scan_count", 1000)?.max(1) as usize;
        let sample = o.count_or("sample", 100)?.max(1) as usize;
        let dedupe = o.parse_or("dedupe", true)?;
        let stream_range = (
            o.get("stream_start").unwrap_or("-").to_string(),
            o.get("stream_end").unwrap_or("+").to_string(),
        );

        // Reach the server now: a wrong password or host is reported at CREATE. Declared
        // columns let a table that is only written be created while the server is down.
        let declared: Vec<Arc<Field>> = cmd.schema.fields().iter().cloned().collect();
        let reachable = match redis.topology().await {
            Ok(_) => true,
            Err(e) if !declared.is_empty() && !matches!(e, Error::Option(_)) && !auth_error(&e) => {
                tracing::warn!("table {name}: {e}; reads will fail until it answers");
                false
            }
            Err(e) => return Err(at(e).into()),
        };
        let template_text = o.get("key").map(str::to_string);
        let given_pattern = o.get("key_pattern").map(str::to_string);
        let schema: SchemaRef = if !declared.is_empty() {
            Arc::new(Schema::new(declared))
        } else {
            if !reachable {
                return Err(at(Error::Config("cannot sample keys: the server is down".into())).into());
            }
            let pattern = match (&given_pattern, &template_text) {
                (Some(p), _) => p.clone(),
                // The template's columns are not known yet: stars for each.
                (None, Some(t)) => pattern_of(&raw_template(t)),
                (None, None) => "*".to_string(),
            };
            source::sample(&redis, kind, &pattern, sample, &key_name, &value_name, &stream_range)
                .await
                .map_err(|e| {
                    at(Error::Config(format!(
                        "{e}; declare the columns instead: CREATE EXTERNAL TABLE {name} (_key VARCHAR, ...) STORED AS REDIS"
                    )))
                })?
        };
        let index = |c: &str| schema.index_of(c).ok();
        let key_col = index(&key_name);
        let template = template_text
            .as_deref()
            .map(|t| template(t, &schema))
            .transpose()
            .map_err(at)?;
        let pattern = given_pattern
            .or_else(|| template.as_deref().map(pattern_of))
            .unwrap_or_else(|| "*".into());
        let need = |c: Option<usize>, what: &str| -> Result<usize> {
            c.ok_or_else(|| {
                at(Error::Option(format!(
                    "type {} needs a column {what} (columns: {})",
                    kind.redis_type(),
                    names(&schema)
                )))
            })
        };
        let (mut value_col, mut score_col, mut id_col) = (None, None, None);
        match kind {
            Kind::String | Kind::List | Kind::Set => {
                value_col = Some(need(
                    index(&value_name),
                    &format!("'{value_name}' (value_column)"),
                )?)
            }
            Kind::ZSet => {
                value_col = Some(need(index("member"), "'member'")?);
                let s = need(index("score"), "'score'")?;
                if !schema.field(s).data_type().is_numeric() {
                    return Err(at(Error::Option("zset column 'score' must be numeric".into())).into());
                }
                score_col = Some(s);
            }
            Kind::Stream => id_col = index("_id"),
            Kind::Hash | Kind::Json => {}
        }
        let fields: Vec<usize> = match kind {
            Kind::Hash | Kind::Json | Kind::Stream => (0..schema.fields().len())
                .filter(|&i| Some(i) != key_col && Some(i) != id_col)
                .collect(),
            _ => Vec::new(),
        };
        for (i, f) in schema.fields().iter().enumerate() {
            let ok = match (kind, f.data_type()) {
                // JSON documents may nest; the key is a string.
                (Kind::Json, t) => Some(i) != key_col || scalar(t),
                // A list or set column holds the whole collection; its items are strings.
                (Kind::List | Kind::Set, DataType::List(item)) if Some(i) == value_col => {
                    scalar(item.data_type())
                }
                (_, t) => scalar(t),
            };
            if !ok {
                return Err(at(Error::Option(format!(
                    "column {} is {}, but a {} holds strings here: use 'type' 'json', or a VARCHAR column with JSON text",
                    f.name(),
                    f.data_type(),
                    kind.redis_type()
                )))
                .into());
            }
        }
        if matches!(kind, Kind::String | Kind::List | Kind::Set | Kind::ZSet) {
            let extra: Vec<&str> = (0..schema.fields().len())
                .filter(|&i| Some(i) != key_col && Some(i) != value_col && Some(i) != score_col)
                .filter(|&i| !template.as_ref().is_some_and(|t| t.contains(&Seg::Col(i))))
                .map(|i| schema.field(i).name().as_str())
                .collect();
            if !extra.is_empty() {
                return Err(at(Error::Option(format!(
                    "type {} stores only the key and {}; columns {} would be lost (use 'type' 'hash' or 'json')",
                    kind.redis_type(),
                    if kind == Kind::ZSet {
                        "member, score".to_string()
                    } else {
                        value_name.clone()
                    },
                    extra.join(", ")
                )))
                .into());
            }
        }
        // Upserts match on the Redis key: 'keys', when given, names the columns the key is made of.
        if let WriteMode::Upsert(keys) = &sink.mode {
            let mut made_of: Vec<&str> = (0..schema.fields().len())
                .filter(|&i| {
                    Some(i) == key_col || template.as_ref().is_some_and(|t| t.contains(&Seg::Col(i)))
                })
                .map(|i| schema.field(i).name().as_str())
                .collect();
            let mut given: Vec<&str> = keys.iter().map(String::as_str).collect();
            made_of.sort_unstable();
            given.sort_unstable();
            if !keys.is_empty() && given != made_of {
                return Err(at(Error::Option(format!(
                    "'mode' 'upsert' matches on the Redis key, made of {}; 'keys' '{}' differs (leave 'keys' out)",
                    if made_of.is_empty() { "no column".to_string() } else { made_of.join(", ") },
                    keys.join(",")
                )))
                .into());
            }
        }
        let layout = Arc::new(Layout {
            table: name.clone(),
            kind,
            schema: Arc::clone(&schema),
            key_col,
            template,
            pattern,
            value_col,
            score_col,
            id_col,
            fields,
            ttl,
            stream_range,
            scan_count,
            dedupe,
        });
        let reader = RedisReader {
            redis: redis.clone(),
            layout: Arc::clone(&layout),
        };
        let backend = RedisBackend { redis, layout };
        Ok(Arc::new(SourceSinkTable::new(
            reader,
            SinkTable::new(backend, name, sink)?,
        )))
    }
}

/// A template before the columns are known: every `{...}` a column.
fn raw_template(t: &str) -> Vec<Seg> {
    let mut out = Vec::new();
    let mut rest = t;
    while let Some(s) = rest.find('{') {
        out.push(Seg::Lit(rest[..s].to_string()));
        match rest[s..].find('}') {
            Some(e) => {
                out.push(Seg::Col(0));
                rest = &rest[s + e + 1..];
            }
            None => {
                rest = "";
            }
        }
    }
    out.push(Seg::Lit(rest.to_string()));
    out
}

/// Whether a connection error is the server refusing credentials.
fn auth_error(e: &Error) -> bool {
    let s = e.to_string();
    s.contains("WRONGPASS") || s.contains("NOAUTH") || s.contains("invalid password") || s.contains("AUTH")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_and_patterns() {
        let s = Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("region", DataType::Utf8, false),
        ]);
        let t = template("user:{id}:{region}", &s).unwrap();
        assert_eq!(
            t,
            vec![
                Seg::Lit("user:".into()),
                Seg::Col(0),
                Seg::Lit(":".into()),
                Seg::Col(1)
            ]
        );
        assert_eq!(pattern_of(&t), "user:*:*");
        let t = template("a*[{{x}}]:{id}", &s).unwrap();
        assert_eq!(pattern_of(&t), "a\\*\\[{x}\\]:*");
        assert!(
            template("user:{nope}", &s)
                .unwrap_err()
                .to_string()
                .contains("nope")
        );
        assert!(template("constant", &s).is_err());
        assert_eq!(pattern_of(&raw_template("u:{id}:x")), "u:*:x");
    }
}
