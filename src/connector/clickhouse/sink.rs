//! The ClickHouse table: `INSERT INTO` sends Native blocks over HTTP through the shared sink
//! machinery; the table is created on the first write when asked to (so `explain` writes nothing).
//! `SELECT` reads through [`super::source`].
//!
//! Recovery (ClickHouse has no transactions):
//! - Every insert carries a `query_id` derived from its delivery token: the server refuses a
//!   second query with the id of one still running, so two attempts of a request never run
//!   together; an attempt past the `timeout` is killed (`KILL QUERY`) before the next starts.
//!   On 22.2+ the token is also the `insert_deduplication_token`, so a request applied by an
//!   attempt whose answer was lost is not applied again. Older servers (18.16 here) cannot tell:
//!   such a request may be applied twice (at-least-once).
//! - `'create' 'replace'` makes the new table beside the target (`<table>__flumen_new_<run>`),
//!   puts the first request in it and swaps it in with `RENAME TABLE`: a statement that fails
//!   before leaves the old table. The swap is recorded in the run's journal and never repeated.
//! - `overwrite` writes a staging table of its own run (`<table>__flumen_ow_<run>`), switched in
//!   at the end or dropped.
//! - When the server cannot be reached at `CREATE` and the columns are declared, the table is
//!   made from them and the server is asked at the first write: a load during a restart stages
//!   its rows for `flumen resume` instead of failing.

use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::{Field, Schema, SchemaRef};
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider, TableProviderFactory};
use datafusion::logical_expr::CreateExternalTable;
use tokio::sync::{Mutex, OnceCell};

use super::client::{
    BodyCompression, ChError, Client, is_bad_data, is_retriable, parse_settings, quote_ident, quote_str,
};
use super::compress::{Method, compress};
use super::native::encode_block;
use super::source::Reader;
use super::types::ChType;
use crate::connector::options::{OptionSpec, TableOptions};
use crate::error::{Error, Result};
use crate::sink::{
    Attempt, Effects, Outcome, SINK_OPTIONS, SinkBackend, SinkOptions, SinkTable, SourceSinkTable, WriteMode,
};

const OPTIONS: &[OptionSpec] = &[
    OptionSpec::new("table", "the ClickHouse table (required)"),
    OptionSpec::new(
        "create",
        "'never' (default), 'if_not_exists' or 'replace': make the table on the first write",
    ),
    OptionSpec::new("engine", "engine of a table flumen creates; default MergeTree"),
    OptionSpec::new("order_by", "ORDER BY of a table flumen creates; default tuple()"),
    OptionSpec::new("partition_by", "PARTITION BY of a table flumen creates"),
    OptionSpec::new(
        "compression",
        "'none' (default), 'lz4' or 'zstd' (ClickHouse's own frames, for inserts and reads), or 'gzip' (inserts only)",
    ),
    OptionSpec::new(
        "settings",
        "ClickHouse settings for every query and insert: 'name=value,name=value'",
    ),
    OptionSpec::new(
        "partition_on",
        "integer, Date or DateTime column whose range splits a read into 'partitions' parallel queries",
    ),
    OptionSpec::new(
        "partitions",
        "parallel queries of a read with 'partition_on'; default 1",
    ),
    OptionSpec::new(
        "version",
        "upsert: the version column of the ReplacingMergeTree (UInt*, Date or DateTime); the row with the highest wins",
    ),
    OptionSpec::new(
        "final",
        "reads: 'true' adds FINAL (one row per key of a ReplacingMergeTree, merged at read time)",
    ),
    OptionSpec::new(
        "dedup",
        "'auto' (default: insert_deduplication_token on ClickHouse 22.2+) or 'off'",
    ),
];

/// Builds CLICKHOUSE tables.
#[derive(Debug, Default)]
pub struct ClickHouseFactory;

#[async_trait]
impl TableProviderFactory for ClickHouseFactory {
    async fn create(
        &self,
        _state: &dyn Session,
        cmd: &CreateExternalTable,
    ) -> datafusion::error::Result<Arc<dyn TableProvider>> {
        let name = cmd.name.to_string();
        let specs: Vec<OptionSpec> = OPTIONS.iter().chain(SINK_OPTIONS).copied().collect();
        let o = TableOptions::parse("CLICKHOUSE", &name, &cmd.options, &specs)?;
        let sink = SinkOptions::from_options(&o)?;
        let location = cmd.locations.first().cloned().unwrap_or_default();
        let settings = parse_settings(o.get("settings").unwrap_or_default())
            .map_err(|e| Error::Option(format!("table {name}: option 'settings': {e}")))?;
        let client = Client::from_location(&location, sink.timeout)?.with_settings(settings);
        let table = o.required("table")?.to_string();
        let create = o.choice_or("create", &["never", "if_not_exists", "replace"], "never")?;
        let compression = match o.choice_or(
            "compression",
            &["none", "uncompressed", "lz4", "zstd", "gzip"],
            "none",
        )? {
            "lz4" => BodyCompression::Frames(Method::Lz4),
            "zstd" => BodyCompression::Frames(Method::Zstd),
            "gzip" => BodyCompression::Gzip,
            _ => BodyCompression::None,
        };
        let dedup = o.choice_or("dedup", &["auto", "off"], "auto")? == "auto";
        let final_read = o.choice_or("final", &["true", "false"], "false")? == "true";
        let full = format!("{}.{}", quote_ident(&client.database), quote_ident(&table));
        let declared: Vec<Arc<Field>> = cmd.schema.fields().iter().cloned().collect();
        let mut sink = sink;
        let upsert = match &sink.mode {
            WriteMode::Upsert(keys) => {
                if keys.is_empty() {
                    return Err(Error::Option(format!(
                        "table {name}: 'mode' 'upsert' needs 'keys' (the ORDER BY of the ReplacingMergeTree)"
                    ))
                    .into());
                }
                if o.get("order_by").is_some() {
                    return Err(Error::Option(format!(
                        "table {name}: with 'mode' 'upsert' the table is ordered by its 'keys'; leave 'order_by' out"
                    ))
                    .into());
                }
                if let Some(e) = o.get("engine").filter(|e| !e.contains("ReplacingMergeTree")) {
                    return Err(Error::Option(format!(
                        "table {name}: 'mode' 'upsert' needs a ReplacingMergeTree, not engine '{e}'"
                    ))
                    .into());
                }
                Some(Upsert {
                    keys: keys.clone(),
                    version: o.get("version").map(str::to_string),
                })
            }
            _ if o.get("version").is_some() => {
                return Err(
                    Error::Option(format!("table {name}: option 'version' is for 'mode' 'upsert'")).into(),
                );
            }
            _ => None,
        };
        let spec = Spec {
            name: name.clone(),
            table: table.clone(),
            full: full.clone(),
            create: match create {
                "replace" => Create::Replace,
                "if_not_exists" => Create::IfNotExists,
                _ => Create::Never,
            },
            declared: declared.clone(),
            upsert: upsert.clone(),
            engine: o.get("engine").map(str::to_string),
            order_by: o.get("order_by").map(str::to_string),
            partition_by: o.get("partition_by").map(str::to_string),
            dedup,
            overwrite: sink.mode == WriteMode::Overwrite,
        };
        let resolved = match resolve(&client, &spec).await {
            Ok(r) => Some(r),
            Err(Unresolved::Unreachable(e)) if !declared.is_empty() => {
                tracing::warn!(
                    "table {name}: cannot reach ClickHouse ({e}); the table is made from its declared columns \
                     and checked against the server at the first write"
                );
                None
            }
            Err(Unresolved::Unreachable(e)) if e.status == 0 => {
                return Err(Error::Config(format!(
                    "table {name}: ClickHouse {full}: {e}; declare the table's columns to load while the server is away \
                     (the rows are then staged for `flumen resume`)"
                ))
                .into());
            }
            Err(Unresolved::Unreachable(e)) => {
                return Err(Error::Config(format!("table {name}: ClickHouse {full}: {e}")).into());
            }
            Err(Unresolved::Other(e)) => return Err(e.into()),
        };
        let columns: Vec<(String, ChType)> = match &resolved {
            Some(r) => r.columns.clone(),
            None => declared
                .iter()
                .map(|f| {
                    Ok((
                        f.name().clone(),
                        ChType::from_arrow(f.data_type(), f.is_nullable())?,
                    ))
                })
                .collect::<Result<_>>()?,
        };
        let schema = Arc::new(Schema::new(
            columns
                .iter()
                .map(|(n, t)| {
                    let (dt, nullable) = t.to_arrow();
                    Field::new(n, dt, nullable)
                })
                .collect::<Vec<_>>(),
        ));
        let types: Vec<ChType> = columns.into_iter().map(|(_, t)| t).collect();
        let partition_on = match o.get("partition_on") {
            None => None,
            Some(c) => {
                let i = schema.index_of(c).map_err(|_| {
                    Error::Option(format!(
                        "table {name}: 'partition_on' column '{c}' is not a column of {full}"
                    ))
                })?;
                let base = match &types[i] {
                    ChType::Nullable(t) => t.as_ref(),
                    t => t,
                };
                if !matches!(
                    base,
                    ChType::Int(8..=64)
                        | ChType::UInt(8..=64)
                        | ChType::Date
                        | ChType::Date32
                        | ChType::DateTime(_)
                        | ChType::DateTime64(..)
                ) {
                    return Err(Error::Option(format!(
                        "table {name}: 'partition_on' column '{c}' is {base}; use an integer, Date or DateTime column"
                    ))
                    .into());
                }
                Some(i)
            }
        };
        let partitions: usize = o.parse_or("partitions", 1)?;
        if partitions == 0 {
            return Err(Error::Option(format!("table {name}: 'partitions' must be at least 1")).into());
        }
        if let Some(u) = &upsert {
            // Without a version column the row inserted last wins: requests go one at a time, in
            // input order. With one, the highest version wins whatever the order.
            if u.version.is_none() {
                sink.concurrency = 1;
            }
        }
        let legacy = resolved.as_ref().is_some_and(|r| r.legacy);
        let reader = Reader {
            final_read,
            client: client.clone(),
            table_sql: full.clone(),
            schema: Arc::clone(&schema),
            types: types.clone(),
            partition_on,
            partitions,
            // ClickHouse 18.16 answers `compress=1` with an empty body; later servers send frames.
            compression: match compression {
                BodyCompression::Frames(m) if !legacy => Some(m),
                _ => None,
            },
        };
        let target = OnceCell::new();
        if let Some(r) = resolved {
            let _ = target.set(r);
        }
        let backend = ClickHouseBackend {
            client,
            schema,
            spec,
            target,
            prepared: Mutex::new(false),
            compression,
        };
        Ok(Arc::new(SourceSinkTable::new(
            reader,
            SinkTable::new(backend, name, sink)?,
        )))
    }
}

/// When the target table is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Create {
    Never,
    IfNotExists,
    Replace,
}

/// What a CLICKHOUSE table was declared with: enough to ask the server about the target now or
/// at the first write.
#[derive(Debug, Clone)]
struct Spec {
    /// The flumen table.
    name: String,
    /// The ClickHouse table, unquoted.
    table: String,
    /// `db`.`table`, quoted.
    full: String,
    create: Create,
    declared: Vec<Arc<Field>>,
    upsert: Option<Upsert>,
    engine: Option<String>,
    order_by: Option<String>,
    partition_by: Option<String>,
    dedup: bool,
    overwrite: bool,
}

impl Spec {
    fn quoted(&self, client: &Client, suffix: &str) -> String {
        format!(
            "{}.{}",
            quote_ident(&client.database),
            quote_ident(&format!("{}{suffix}", self.table))
        )
    }
}

/// The target as the server describes it.
#[derive(Debug, Clone)]
struct Resolved {
    columns: Vec<(String, ChType)>,
    /// `CREATE TABLE IF NOT EXISTS <full> ...` of a table flumen makes.
    create: Option<String>,
    /// A server before 20: the oldest Native layout and types.
    legacy: bool,
    /// Send each request's delivery token as `insert_deduplication_token`.
    tokens: bool,
    /// The database swaps tables with `EXCHANGE TABLES` (Atomic).
    exchange: bool,
}

/// Why the target could not be resolved.
enum Unresolved {
    /// No answer, or a retriable one: the server is down, restarting or overloaded.
    Unreachable(ChError),
    Other(Error),
}

/// Asks the server about the target: its version, the table's columns (or the columns and DDL
/// of the table flumen makes), the database's engine for an overwrite.
async fn resolve(client: &Client, s: &Spec) -> std::result::Result<Resolved, Unresolved> {
    let name = &s.name;
    let full = &s.full;
    let at = |e: ChError| {
        // No answer, or one that says to try again (a restart, an overloaded server).
        if is_retriable(&e) {
            Unresolved::Unreachable(e)
        } else {
            Unresolved::Other(Error::Config(format!("table {name}: ClickHouse {full}: {e}")))
        }
    };
    let opt = |e: String| Unresolved::Other(Error::Option(format!("table {name}: {e}")));
    let version: Vec<u32> = client
        .query("SELECT version()")
        .await
        .map_err(at)?
        .trim()
        .split('.')
        .map_while(|p| p.parse().ok())
        .collect();
    let version = (
        version.first().copied().unwrap_or(0),
        version.get(1).copied().unwrap_or(0),
    );
    let legacy = version.0 < 20;
    // insert_deduplication_token came in 22.2; non-replicated MergeTree honours it only with
    // a deduplication window, which tables flumen creates get.
    let tokens = s.dedup && version >= (22, 2);
    let existing = client
        .query(&format!(
            // MATERIALIZED and ALIAS columns are computed by the server: not written, and not
            // in `SELECT *` either.
            "SELECT name, type FROM system.columns WHERE database = {} AND table = {} \
             AND default_kind NOT IN ('MATERIALIZED', 'ALIAS') FORMAT TabSeparated",
            quote_str(&client.database),
            quote_str(&s.table)
        ))
        .await
        .map_err(at)?;
    // A column of a type flumen does not map (IPv4, Nested, AggregateFunction, ...) is left
    // out with a warning: reads do not see it, inserts leave it to its default.
    let existing: Vec<(String, ChType)> = existing
        .lines()
        .filter(|l| !l.is_empty())
        .filter_map(|l| {
            let (n, t) = l.split_once('\t').unwrap_or((l, ""));
            let (n, t) = (unescape_tsv(n), unescape_tsv(t));
            match ChType::parse(&t) {
                Ok(ty) => Some((n, ty)),
                Err(e) => {
                    tracing::warn!("table {name}: column {n} of {full} is left out: {e}");
                    None
                }
            }
        })
        .collect();
    if !existing.is_empty()
        && s.create != Create::Replace
        && let Some(u) = &s.upsert
    {
        check_replacing(client, &s.table, full, u).await.map_err(opt)?;
    }
    let exchange = if s.overwrite {
        client
            .query(&format!(
                "SELECT engine FROM system.databases WHERE name = {} FORMAT TabSeparated",
                quote_str(&client.database)
            ))
            .await
            .map_err(at)?
            .trim()
            == "Atomic"
    } else {
        false
    };
    if !existing.is_empty() && s.create != Create::Replace {
        return Ok(Resolved {
            columns: existing,
            create: None,
            legacy,
            tokens,
            exchange,
        });
    }
    if s.create == Create::Never {
        return Err(opt(format!(
            "ClickHouse table {full} does not exist; create it, or add OPTIONS ('create' 'if_not_exists') and a column list"
        )));
    }
    let columns: Vec<(String, ChType)> = if s.declared.is_empty() {
        existing.clone()
    } else {
        s.declared
            .iter()
            .map(|f| {
                let t = ChType::from_arrow(f.data_type(), f.is_nullable())?;
                Ok((f.name().clone(), if legacy { t.for_legacy_server()? } else { t }))
            })
            .collect::<Result<_>>()
            .map_err(Unresolved::Other)?
    };
    if columns.is_empty() {
        return Err(opt(format!(
            "to create ClickHouse table {full}, declare its columns: CREATE EXTERNAL TABLE {name} (id BIGINT, ...)"
        )));
    }
    let defs: Vec<String> = columns
        .iter()
        .map(|(n, t)| format!("{} {t}", quote_ident(n)))
        .collect();
    let (engine, order_by) = match &s.upsert {
        Some(u) => {
            u.check_columns(&columns).map_err(opt)?;
            let engine = match (&s.engine, &u.version) {
                (Some(e), _) => e.clone(),
                (None, Some(v)) => format!("ReplacingMergeTree({})", quote_ident(v)),
                (None, None) => "ReplacingMergeTree".to_string(),
            };
            let keys: Vec<String> = u.keys.iter().map(|k| quote_ident(k)).collect();
            (engine, format!("({})", keys.join(", ")))
        }
        None => (
            s.engine.clone().unwrap_or_else(|| "MergeTree".to_string()),
            s.order_by.clone().unwrap_or_else(|| "tuple()".to_string()),
        ),
    };
    let mut stmt = format!(
        "CREATE TABLE IF NOT EXISTS {full} ({}) ENGINE = {engine}",
        defs.join(", "),
    );
    if let Some(p) = &s.partition_by {
        stmt.push_str(&format!(" PARTITION BY {p}"));
    }
    stmt.push_str(&format!(" ORDER BY {order_by}"));
    if tokens && engine.ends_with("MergeTree") && !engine.starts_with("Replicated") {
        stmt.push_str(" SETTINGS non_replicated_deduplication_window = 1000");
    }
    Ok(Resolved {
        columns,
        create: Some(stmt),
        legacy,
        tokens,
        exchange,
    })
}

/// TabSeparated escapes `\t`, `\n`, `\\` and quotes in names and types.
fn unescape_tsv(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('t') => out.push('\t'),
            Some('n') => out.push('\n'),
            Some(other) => out.push(other),
            None => out.push('\\'),
        }
    }
    out
}

/// Sends Native blocks to one ClickHouse table.
#[derive(Debug)]
struct ClickHouseBackend {
    client: Client,
    /// The table's columns as flumen sees them.
    schema: SchemaRef,
    spec: Spec,
    /// The target as the server describes it: at CREATE, or at the first write.
    target: OnceCell<Resolved>,
    /// The target is prepared (made, swapped in, or the overwrite's staging table made);
    /// held by the first request while it prepares it.
    prepared: Mutex<bool>,
    compression: BodyCompression,
}

/// `mode` `upsert`: rows go to a ReplacingMergeTree ordered by the keys, which keeps one row
/// per key (the highest `version`, or the last inserted) once its parts merge. Until then a
/// plain `SELECT` may see several rows of one key: read with `FINAL` (option `final` of a
/// ClickHouse source table) or `argMax(col, version) ... GROUP BY keys`.
#[derive(Debug, Clone)]
struct Upsert {
    keys: Vec<String>,
    version: Option<String>,
}

impl Upsert {
    /// The keys and version are columns, and the version has a type ReplacingMergeTree takes.
    fn check_columns(&self, columns: &[(String, ChType)]) -> std::result::Result<(), String> {
        let find = |c: &str| columns.iter().find(|(n, _)| n == c).map(|(_, t)| t);
        let names = || {
            columns
                .iter()
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        for k in &self.keys {
            if find(k).is_none() {
                return Err(format!(
                    "'keys' names {k}, which is not a column (columns: {})",
                    names()
                ));
            }
        }
        if let Some(v) = &self.version {
            match find(v) {
                None => {
                    return Err(format!(
                        "'version' names {v}, which is not a column (columns: {})",
                        names()
                    ));
                }
                Some(ChType::UInt(_) | ChType::Date | ChType::DateTime(_)) => {}
                Some(ChType::Int(_) | ChType::DateTime64(..)) => {}
                Some(t) => {
                    return Err(format!(
                        "'version' column {v} is {t}; a ReplacingMergeTree version is an integer, Date or DateTime"
                    ));
                }
            }
        }
        Ok(())
    }
}

/// An existing table written with `mode` `upsert` must be a ReplacingMergeTree, else the
/// "upsert" would append duplicates.
async fn check_replacing(
    client: &Client,
    table: &str,
    full: &str,
    u: &Upsert,
) -> std::result::Result<(), String> {
    let engine = client
        .query(&format!(
            "SELECT engine FROM system.tables WHERE database = {} AND name = {} FORMAT TabSeparated",
            quote_str(&client.database),
            quote_str(table)
        ))
        .await
        .map_err(|e| format!("ClickHouse {full}: {e}"))?;
    let engine = engine.trim();
    if !engine.ends_with("ReplacingMergeTree") {
        return Err(format!(
            "'mode' 'upsert' needs a ReplacingMergeTree, and ClickHouse {full} is a {engine}; \
             recreate it with OPTIONS ('create' 'replace', 'keys' '{}') or use 'mode' 'append'",
            u.keys.join(",")
        ));
    }
    Ok(())
}

/// `mode` `overwrite`: the statement writes a staging table of its run made like the target;
/// when every row is in, the staging table takes the target's place in one step, so that a
/// reader sees the old rows or the new ones, never an empty or half-written table. On an Atomic
/// database (the default since ClickHouse 20.10) that is `EXCHANGE TABLES`; on an Ordinary one
/// each of the target's partitions is replaced from the staging table (`REPLACE PARTITION`,
/// atomic per partition: a table with no PARTITION BY has one, so the switch is one step) and
/// partitions the new rows do not have are dropped. With `'create' 'replace'` the staging table
/// is made from the declared columns and renamed into place. A failed statement drops the
/// staging table and leaves the target as it was; the rerun starts over.
const OVERWRITE_SUFFIX: &str = "__flumen_ow_";

/// `'create' 'replace'`: the new table, swapped in with the first rows.
const REPLACE_SUFFIX: &str = "__flumen_new_";

/// One insert's body and how many rows it carries (the rows themselves while the target's
/// types are not known yet).
#[derive(Debug)]
struct ChRequest {
    body: Option<bytes::Bytes>,
    batch: RecordBatch,
    rows: usize,
}

fn gzip(block: &[u8]) -> Result<Vec<u8>> {
    use std::io::Write;
    let mut z =
        flate2::write::GzEncoder::new(Vec::with_capacity(block.len() / 4), flate2::Compression::fast());
    z.write_all(block)
        .map_err(|e| Error::io("compressing a Native block", e))?;
    z.finish().map_err(|e| Error::io("compressing a Native block", e))
}

impl ClickHouseBackend {
    /// The target: known, or asked now (a failure to reach the server is retried).
    async fn target(&self) -> std::result::Result<&Resolved, Outcome> {
        self.target
            .get_or_try_init(|| async {
                match resolve(&self.client, &self.spec).await {
                    Ok(r) => {
                        let types: Vec<(String, ChType)> = r.columns.clone();
                        if types.len() != self.schema.fields().len()
                            || types
                                .iter()
                                .zip(self.schema.fields())
                                .any(|((n, _), f)| n != f.name())
                        {
                            return Err(Outcome::Fatal {
                                reason: format!(
                                    "ClickHouse {} has columns ({}), not the declared ({})",
                                    self.spec.full,
                                    types
                                        .iter()
                                        .map(|(n, t)| format!("{n} {t}"))
                                        .collect::<Vec<_>>()
                                        .join(", "),
                                    self.schema
                                        .fields()
                                        .iter()
                                        .map(|f| f.name().as_str())
                                        .collect::<Vec<_>>()
                                        .join(", ")
                                ),
                            });
                        }
                        Ok(r)
                    }
                    Err(Unresolved::Unreachable(e)) => Err(Outcome::Retry {
                        reason: e.to_string(),
                        after: None,
                    }),
                    Err(Unresolved::Other(e)) => Err(Outcome::Fatal {
                        reason: e.to_string(),
                    }),
                }
            })
            .await
    }

    fn encode_with(&self, batch: &RecordBatch, target: &Resolved) -> Result<bytes::Bytes> {
        let types: Vec<ChType> = target.columns.iter().map(|(_, t)| t.clone()).collect();
        // Declared columns checked against the server later may need a cast to its types.
        let cols = batch
            .columns()
            .iter()
            .zip(&types)
            .map(|(c, t)| {
                let (dt, _) = t.to_arrow();
                if c.data_type() == &dt {
                    Ok(Arc::clone(c))
                } else {
                    arrow::compute::cast(c, &dt)
                }
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let fields: Vec<Field> = batch
            .schema()
            .fields()
            .iter()
            .zip(&cols)
            .map(|(f, c)| Field::new(f.name(), c.data_type().clone(), true))
            .collect();
        let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), cols)?;
        let block = encode_block(&batch, &types)?;
        Ok(match self.compression {
            BodyCompression::None => block.into(),
            BodyCompression::Frames(m) => compress(&block, m)?.into(),
            BodyCompression::Gzip => gzip(&block)?.into(),
        })
    }

    /// Runs one statement; a failure as the outcome it means for the request.
    async fn run(&self, sql: &str, what: &str) -> std::result::Result<(), Outcome> {
        self.client.query(sql).await.map(|_| ()).map_err(|e| {
            let reason = format!("{what}: {sql}: {e}");
            if is_retriable(&e) {
                Outcome::Retry { reason, after: None }
            } else {
                Outcome::Fatal { reason }
            }
        })
    }

    /// The statement that makes a table like the target's new one under `name`.
    fn create_as(&self, target: &Resolved, name: &str) -> std::result::Result<String, Outcome> {
        match &target.create {
            Some(c) => Ok(c.replacen(&self.spec.full, name, 1)),
            None => Ok(format!("CREATE TABLE {name} AS {}", self.spec.full)),
        }
    }

    /// The overwrite's staging table of this run.
    fn staging(&self, fx: &Effects) -> String {
        self.spec
            .quoted(&self.client, &format!("{OVERWRITE_SUFFIX}{}", fx.run_tag()))
    }

    /// The replace's new table of this run.
    fn shadow(&self, fx: &Effects) -> String {
        self.spec
            .quoted(&self.client, &format!("{REPLACE_SUFFIX}{}", fx.run_tag()))
    }

    /// A fresh, empty table under `name` (dropped first if an earlier attempt left one).
    async fn fresh(&self, target: &Resolved, name: &str) -> std::result::Result<(), Outcome> {
        self.run(&format!("DROP TABLE IF EXISTS {name}"), "making a new table")
            .await?;
        let sql = self.create_as(target, name)?;
        self.run(&sql, "making a new table").await
    }

    /// Puts `new` in the target's place: one `RENAME TABLE` of both (the old one dropped after).
    async fn swap_in(&self, new: &str, fx: &Effects) -> std::result::Result<(), Outcome> {
        let old = self
            .spec
            .quoted(&self.client, &format!("__flumen_old_{}", fx.run_tag()));
        let exists = self
            .client
            .query(&format!("EXISTS TABLE {} FORMAT TabSeparated", self.spec.full))
            .await
            .map_err(|e| Outcome::Retry {
                reason: e.to_string(),
                after: None,
            })?;
        self.run(&format!("DROP TABLE IF EXISTS {old}"), "replacing the table")
            .await?;
        if exists.trim() == "1" {
            self.run(
                &format!(
                    "RENAME TABLE {} TO {old}, {new} TO {}",
                    self.spec.full, self.spec.full
                ),
                "replacing the table",
            )
            .await?;
        } else {
            self.run(
                &format!("RENAME TABLE {new} TO {}", self.spec.full),
                "replacing the table",
            )
            .await?;
        }
        self.run(&format!("DROP TABLE IF EXISTS {old}"), "replacing the table")
            .await
    }

    /// Whether this write still owes the replace.
    fn replace_owed(&self, fx: &Effects) -> bool {
        self.spec.create == Create::Replace && !fx.done("replace")
    }

    /// Inserts a request's body into `into`, with a query id of the request's own: the server
    /// refuses it while an earlier attempt still runs; past the timeout the query is killed.
    async fn insert(
        &self,
        into: &str,
        body: &bytes::Bytes,
        a: &Attempt<'_>,
        tokens: bool,
        rows: usize,
    ) -> Outcome {
        let query_id = format!("flumen-{:032x}", xxhash_rust::xxh3::xxh3_128(a.token.as_bytes()));
        let sent = self.client.insert_native(
            into,
            body.clone(),
            self.compression,
            tokens.then_some(a.token),
            &query_id,
            a.timeout,
        );
        let r = match tokio::time::timeout(a.timeout, sent).await {
            Ok(r) => r,
            Err(_) => {
                let kill = format!("KILL QUERY WHERE query_id = {} SYNC", quote_str(&query_id));
                let _ = tokio::time::timeout(a.timeout, self.client.query(&kill)).await;
                return a.timed_out();
            }
        };
        match r {
            Ok(()) => Outcome::Delivered,
            Err(e) if is_retriable(&e) => Outcome::Retry {
                reason: e.to_string(),
                after: None,
            },
            // The server does not say which row; the whole request's rows go to dead letters
            // with its message (and count against `max_rejected`).
            Err(e) if is_bad_data(&e) => Outcome::Partial {
                rejected: (0..rows).map(|i| (i, e.to_string())).collect(),
                retry: Vec::new(),
            },
            Err(e) => Outcome::Fatal {
                reason: e.to_string(),
            },
        }
    }
}

#[async_trait]
impl SinkBackend for ClickHouseBackend {
    type Request = ChRequest;

    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn encode(&self, batch: &RecordBatch) -> Result<ChRequest> {
        let body = match self.target.get() {
            Some(t) => Some(self.encode_with(batch, t)?),
            None => None,
        };
        Ok(ChRequest {
            body,
            batch: batch.clone(),
            rows: batch.num_rows(),
        })
    }

    fn request_bytes(&self, request: &ChRequest) -> usize {
        request
            .body
            .as_ref()
            .map_or(request.batch.get_array_memory_size(), bytes::Bytes::len)
    }

    fn describe(&self) -> String {
        let Some(target) = self.target.get() else {
            return format!(
                "clickhouse={} (not reached at CREATE: its columns are checked at the first write), encoded as Native",
                self.spec.full
            );
        };
        let cols: Vec<String> = target.columns.iter().map(|(n, t)| format!("{n} {t}")).collect();
        let mut s = format!(
            "clickhouse={} ({}), encoded as Native{}",
            self.spec.full,
            cols.join(", "),
            match self.compression {
                BodyCompression::None => "",
                BodyCompression::Gzip => ", gzip",
                BodyCompression::Frames(Method::Lz4) => ", lz4",
                BodyCompression::Frames(Method::Zstd) => ", zstd",
            }
        );
        match (&target.create, self.spec.create) {
            (Some(c), Create::Replace) => s.push_str(&format!(
                ", on the first write makes a new table ({c}) and swaps it in with RENAME TABLE"
            )),
            (Some(c), _) => s.push_str(&format!(", on the first write runs: {c}")),
            (None, _) => {}
        }
        if let Some(u) = &self.spec.upsert {
            s.push_str(&format!(
                ", upsert on ({}){} into a ReplacingMergeTree: one row per key once parts merge; read with FINAL until then",
                u.keys.join(", "),
                u.version.as_ref().map(|v| format!(" by highest {v}")).unwrap_or_default()
            ));
        }
        if self.spec.overwrite {
            s.push_str(&format!(
                ", overwrite: rows go to a staging table of the run ({}{}<run>), then {}",
                self.spec.table,
                OVERWRITE_SUFFIX,
                if self.spec.create == Create::Replace {
                    "it is renamed into place"
                } else if target.exchange {
                    "EXCHANGE TABLES with the target"
                } else {
                    "each partition of the target is replaced from it (REPLACE PARTITION)"
                }
            ));
        }
        s
    }

    fn modes(&self) -> &'static [&'static str] {
        &["append", "overwrite", "upsert"]
    }

    /// An overwrite is all or nothing: its rows go to a staging table that is switched in
    /// at the end, or dropped.
    fn all_or_nothing(&self) -> bool {
        self.spec.overwrite
    }

    /// ... but its requests may go in parallel: they are inserts into the staging table.
    fn serial(&self) -> bool {
        false
    }

    async fn send(&self, request: &ChRequest, a: &Attempt<'_>) -> Outcome {
        let target = match self.target().await {
            Ok(t) => t,
            Err(o) => return o,
        };
        let encoded;
        let body = match &request.body {
            Some(b) => b,
            None => {
                let (me, batch) = (self, request.batch.clone());
                match me.encode_with(&batch, target) {
                    Ok(b) => {
                        encoded = b;
                        &encoded
                    }
                    Err(e) => {
                        return Outcome::Fatal {
                            reason: e.to_string(),
                        };
                    }
                }
            }
        };
        let fx = a.effects;
        let rows = request.rows;
        let mut prepared = self.prepared.lock().await;
        if *prepared {
            drop(prepared);
            let into = if self.spec.overwrite {
                self.staging(fx)
            } else {
                self.spec.full.clone()
            };
            return self.insert(&into, body, a, target.tokens, rows).await;
        }
        // The first request prepares the target; the others wait until it has.
        if self.spec.overwrite {
            let staging = self.staging(fx);
            if let Err(o) = self.fresh(target, &staging).await {
                return o;
            }
            *prepared = true;
            drop(prepared);
            return self.insert(&staging, body, a, target.tokens, rows).await;
        }
        if self.replace_owed(fx) {
            // The first rows go to a new table, swapped in once they are there.
            let shadow = self.shadow(fx);
            if let Err(o) = self.fresh(target, &shadow).await {
                return o;
            }
            // With its token: on 22.2+ its dedup log moves with the table, so a resend of this
            // request after the swap is recognised.
            let outcome = self.insert(&shadow, body, a, target.tokens, rows).await;
            if outcome == Outcome::Delivered {
                if let Err(o) = self.swap_in(&shadow, fx).await {
                    return o;
                }
                if let Err(e) = fx.record("replace") {
                    return Outcome::Fatal {
                        reason: e.to_string(),
                    };
                }
                *prepared = true;
            }
            return outcome;
        }
        if let Some(create) = &target.create
            && let Err(o) = self.run(create, &format!("creating {}", self.spec.full)).await
        {
            return o;
        }
        *prepared = true;
        drop(prepared);
        self.insert(&self.spec.full, body, a, target.tokens, rows).await
    }

    async fn finish(&self, ok: bool, fx: &Effects) -> Result<()> {
        let at = |o: Outcome| {
            let reason = match o {
                Outcome::Fatal { reason } | Outcome::Retry { reason, .. } => reason,
                _ => "failed".into(),
            };
            Error::Config(format!("ClickHouse {}: {reason}", self.spec.full))
        };
        let mut prepared = self.prepared.lock().await;
        if !ok {
            // The target is untouched; what this statement made beside it is dropped.
            let leftover = if self.spec.overwrite {
                Some(self.staging(fx))
            } else if !*prepared && self.replace_owed(fx) {
                Some(self.shadow(fx))
            } else {
                None
            };
            if let Some(t) = leftover {
                let _ = self.client.query(&format!("DROP TABLE IF EXISTS {t}")).await;
            }
            if self.spec.overwrite {
                *prepared = false;
            }
            return Ok(());
        }
        if !self.spec.overwrite && *prepared {
            return Ok(());
        }
        let target = self.target().await.map_err(at)?;
        if !self.spec.overwrite {
            // No request was sent: the table is still owed its DDL (an empty new table).
            if self.replace_owed(fx) {
                let shadow = self.shadow(fx);
                self.fresh(target, &shadow).await.map_err(at)?;
                self.swap_in(&shadow, fx).await.map_err(at)?;
                fx.record("replace")?;
            } else if let Some(create) = &target.create {
                self.run(create, "creating the table").await.map_err(at)?;
            }
            *prepared = true;
            return Ok(());
        }
        // An overwrite: an empty input still replaces the target's rows (with none).
        let staging = self.staging(fx);
        if !*prepared {
            self.fresh(target, &staging).await.map_err(at)?;
        }
        *prepared = false;
        if target.create.is_some() {
            // A replace, or a target that did not exist: the staging table is renamed into place.
            self.swap_in(&staging, fx).await.map_err(at)?;
            return Ok(());
        }
        let q = |sql: String| async move { self.run(&sql, "overwrite").await };
        if target.exchange {
            q(format!("EXCHANGE TABLES {} AND {staging}", self.spec.full))
                .await
                .map_err(at)?;
        } else {
            let parts = |table: &str| {
                format!(
                    "SELECT DISTINCT partition_id FROM system.parts WHERE database = {} AND table = {} AND active FORMAT TabSeparated",
                    quote_str(&self.client.database),
                    quote_str(table)
                )
            };
            let staging_name = format!("{}{OVERWRITE_SUFFIX}{}", self.spec.table, fx.run_tag());
            let text = |sql: String| async move {
                self.client.query(&sql).await.map_err(|e| Outcome::Fatal {
                    reason: format!("{sql}: {e}"),
                })
            };
            let new = text(parts(&staging_name)).await.map_err(at)?;
            let new: Vec<&str> = new.lines().filter(|l| !l.is_empty()).collect();
            let old = text(parts(&self.spec.table)).await.map_err(at)?;
            for p in &new {
                q(format!(
                    "ALTER TABLE {} REPLACE PARTITION ID {} FROM {staging}",
                    self.spec.full,
                    quote_str(p)
                ))
                .await
                .map_err(at)?;
            }
            for p in old.lines().filter(|l| !l.is_empty() && !new.contains(l)) {
                q(format!(
                    "ALTER TABLE {} DROP PARTITION ID {}",
                    self.spec.full,
                    quote_str(p)
                ))
                .await
                .map_err(at)?;
            }
        }
        q(format!("DROP TABLE IF EXISTS {staging}")).await.map_err(at)?;
        Ok(())
    }
}
