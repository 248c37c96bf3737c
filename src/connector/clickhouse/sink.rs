//! The ClickHouse table: `INSERT INTO` sends Native blocks over HTTP through the shared sink
//! machinery; the table is created on the first write when asked to (so `explain` writes nothing).
//! `SELECT` reads through [`super::source`].

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
use crate::sink::{Outcome, SINK_OPTIONS, SinkBackend, SinkOptions, SinkTable, SourceSinkTable, WriteMode};

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
        let at = |e: ChError| Error::Config(format!("table {name}: ClickHouse {full}: {e}"));
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
        let tokens = dedup && version >= (22, 2);
        let existing = client
            .query(&format!(
                // MATERIALIZED and ALIAS columns are computed by the server: not written, and not
                // in `SELECT *` either.
                "SELECT name, type FROM system.columns WHERE database = {} AND table = {} \
                 AND default_kind NOT IN ('MATERIALIZED', 'ALIAS') FORMAT TabSeparated",
                quote_str(&client.database),
                quote_str(&table)
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
        if !existing.is_empty()
            && create != "replace"
            && let Some(u) = &upsert
        {
            check_replacing(&client, &table, &full, u)
                .await
                .map_err(|e| Error::Option(format!("table {name}: {e}")))?;
        }
        let (columns, ddl) = if existing.is_empty() || create == "replace" {
            if create == "never" {
                return Err(Error::Option(format!(
                    "table {name}: ClickHouse table {full} does not exist; create it, or add OPTIONS ('create' 'if_not_exists') and a column list"
                ))
                .into());
            }
            let columns: Vec<(String, ChType)> = if declared.is_empty() {
                existing.clone()
            } else {
                declared
                    .iter()
                    .map(|f| {
                        let t = ChType::from_arrow(f.data_type(), f.is_nullable())?;
                        Ok((f.name().clone(), if legacy { t.for_legacy_server()? } else { t }))
                    })
                    .collect::<Result<_>>()?
            };
            if columns.is_empty() {
                return Err(Error::Option(format!(
                    "table {name}: to create ClickHouse table {full}, declare its columns: CREATE EXTERNAL TABLE {name} (id BIGINT, ...)"
                ))
                .into());
            }
            let defs: Vec<String> = columns
                .iter()
                .map(|(n, t)| format!("{} {t}", quote_ident(n)))
                .collect();
            let mut ddl = Vec::new();
            if create == "replace" {
                ddl.push(format!("DROP TABLE IF EXISTS {full}"));
            }
            let (engine, order_by) = match &upsert {
                Some(u) => {
                    u.check_columns(&columns)
                        .map_err(|e| Error::Option(format!("table {name}: {e}")))?;
                    let engine = match (o.get("engine"), &u.version) {
                        (Some(e), _) => e.to_string(),
                        (None, Some(v)) => format!("ReplacingMergeTree({})", quote_ident(v)),
                        (None, None) => "ReplacingMergeTree".to_string(),
                    };
                    let keys: Vec<String> = u.keys.iter().map(|k| quote_ident(k)).collect();
                    (engine, format!("({})", keys.join(", ")))
                }
                None => (
                    o.get("engine").unwrap_or("MergeTree").to_string(),
                    o.get("order_by").unwrap_or("tuple()").to_string(),
                ),
            };
            let mut stmt = format!(
                "CREATE TABLE IF NOT EXISTS {full} ({}) ENGINE = {engine}",
                defs.join(", "),
            );
            if let Some(p) = o.get("partition_by") {
                stmt.push_str(&format!(" PARTITION BY {p}"));
            }
            stmt.push_str(&format!(" ORDER BY {order_by}"));
            if tokens && engine.ends_with("MergeTree") && !engine.starts_with("Replicated") {
                stmt.push_str(" SETTINGS non_replicated_deduplication_window = 1000");
            }
            ddl.push(stmt);
            (columns, ddl)
        } else {
            (existing, Vec::new())
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
        let overwrite = match sink.mode {
            WriteMode::Overwrite => {
                let atomic = client
                    .query(&format!(
                        "SELECT engine FROM system.databases WHERE name = {} FORMAT TabSeparated",
                        quote_str(&client.database)
                    ))
                    .await
                    .map_err(at)?
                    .trim()
                    == "Atomic";
                let staging = format!("{table}__flumen_overwrite");
                Some(Overwrite {
                    staging_sql: format!("{}.{}", quote_ident(&client.database), quote_ident(&staging)),
                    staging,
                    table: table.clone(),
                    exchange: atomic,
                    switched: Mutex::new(false),
                })
            }
            _ => None,
        };
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
        let backend = ClickHouseBackend {
            client,
            table_sql: full,
            types,
            schema,
            ddl,
            created: OnceCell::new(),
            compression,
            tokens,
            upsert,
            overwrite,
        };
        Ok(Arc::new(SourceSinkTable::new(
            reader,
            SinkTable::new(backend, name, sink)?,
        )))
    }
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
    table_sql: String,
    types: Vec<ChType>,
    schema: SchemaRef,
    /// Statements that make the table, run once before the first insert.
    ddl: Vec<String>,
    created: OnceCell<std::result::Result<(), String>>,
    compression: BodyCompression,
    /// Send each request's delivery token as `insert_deduplication_token`.
    tokens: bool,
    upsert: Option<Upsert>,
    overwrite: Option<Overwrite>,
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

/// `mode` `overwrite`: the statement writes a staging table made like the target; when every
/// row is in, the staging table takes the target's place in one step, so that a reader sees the
/// old rows or the new ones, never an empty or half-written table. On an Atomic database (the
/// default since ClickHouse 20.10) that is `EXCHANGE TABLES`; on an Ordinary one each of the
/// target's partitions is replaced from the staging table (`REPLACE PARTITION`, atomic per
/// partition: a table with no PARTITION BY has one, so the switch is one step) and partitions
/// the new rows do not have are dropped. A failed statement drops the staging table and leaves
/// the target as it was; the rerun starts over.
#[derive(Debug)]
struct Overwrite {
    table: String,
    staging: String,
    staging_sql: String,
    exchange: bool,
    /// Whether the switch is done (finish runs once per statement).
    switched: Mutex<bool>,
}

/// One insert's body and how many rows it carries.
#[derive(Debug)]
struct ChRequest {
    body: bytes::Bytes,
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
    /// Runs the DDL owed before the first insert, once: the target's, then (overwrite) a fresh
    /// staging table made like the target.
    async fn ensure_created(&self) -> std::result::Result<(), String> {
        self.created
            .get_or_init(|| async {
                for stmt in &self.ddl {
                    self.client
                        .query(stmt)
                        .await
                        .map_err(|e| format!("creating {}: {e}", self.table_sql))?;
                }
                if let Some(w) = &self.overwrite {
                    for stmt in [
                        format!("DROP TABLE IF EXISTS {}", w.staging_sql),
                        format!("CREATE TABLE {} AS {}", w.staging_sql, self.table_sql),
                    ] {
                        self.client
                            .query(&stmt)
                            .await
                            .map_err(|e| format!("making the staging table of an overwrite: {stmt}: {e}"))?;
                    }
                }
                Ok(())
            })
            .await
            .clone()
    }
}

#[async_trait]
impl SinkBackend for ClickHouseBackend {
    type Request = ChRequest;

    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn encode(&self, batch: &RecordBatch) -> Result<ChRequest> {
        let block = encode_block(batch, &self.types)?;
        let rows = batch.num_rows();
        let body: bytes::Bytes = match self.compression {
            BodyCompression::None => block.into(),
            BodyCompression::Frames(m) => compress(&block, m)?.into(),
            BodyCompression::Gzip => gzip(&block)?.into(),
        };
        Ok(ChRequest { body, rows })
    }

    fn request_bytes(&self, request: &ChRequest) -> usize {
        request.body.len()
    }

    fn describe(&self) -> String {
        let cols: Vec<String> = self
            .schema
            .fields()
            .iter()
            .zip(&self.types)
            .map(|(f, t)| format!("{} {t}", f.name()))
            .collect();
        let mut s = format!(
            "clickhouse={} ({}), encoded as Native{}",
            self.table_sql,
            cols.join(", "),
            match self.compression {
                BodyCompression::None => "",
                BodyCompression::Gzip => ", gzip",
                BodyCompression::Frames(Method::Lz4) => ", lz4",
                BodyCompression::Frames(Method::Zstd) => ", zstd",
            }
        );
        if !self.ddl.is_empty() {
            s.push_str(&format!(", on the first write runs: {}", self.ddl.join("; ")));
        }
        if let Some(u) = &self.upsert {
            s.push_str(&format!(
                ", upsert on ({}){} into a ReplacingMergeTree: one row per key once parts merge; read with FINAL until then",
                u.keys.join(", "),
                u.version.as_ref().map(|v| format!(" by highest {v}")).unwrap_or_default()
            ));
        }
        if let Some(w) = &self.overwrite {
            s.push_str(&format!(
                ", overwrite: rows go to {}, then {}",
                w.staging_sql,
                if w.exchange {
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
        self.overwrite.is_some()
    }

    /// ... but its requests may go in parallel: they are inserts into the staging table.
    fn serial(&self) -> bool {
        false
    }

    async fn finish(&self, ok: bool) -> Result<()> {
        let Some(w) = &self.overwrite else {
            return Ok(());
        };
        let mut switched = w.switched.lock().await;
        if *switched {
            return Ok(());
        }
        let at = |e: String| Error::Config(format!("ClickHouse {}: overwrite: {e}", self.table_sql));
        if !ok {
            // The target is untouched; the staging table is dropped (best effort).
            let _ = self
                .client
                .query(&format!("DROP TABLE IF EXISTS {}", w.staging_sql))
                .await;
            return Ok(());
        }
        // An empty input still replaces the target's rows (with none).
        self.ensure_created().await.map_err(at)?;
        let q = |sql: String| async move { self.client.query(&sql).await.map_err(|e| format!("{sql}: {e}")) };
        if w.exchange {
            q(format!(
                "EXCHANGE TABLES {} AND {}",
                self.table_sql, w.staging_sql
            ))
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
            let new = q(parts(&w.staging)).await.map_err(at)?;
            let new: Vec<&str> = new.lines().filter(|l| !l.is_empty()).collect();
            let old = q(parts(&w.table)).await.map_err(at)?;
            for p in &new {
                q(format!(
                    "ALTER TABLE {} REPLACE PARTITION ID {} FROM {}",
                    self.table_sql,
                    quote_str(p),
                    w.staging_sql
                ))
                .await
                .map_err(at)?;
            }
            for p in old.lines().filter(|l| !l.is_empty() && !new.contains(l)) {
                q(format!(
                    "ALTER TABLE {} DROP PARTITION ID {}",
                    self.table_sql,
                    quote_str(p)
                ))
                .await
                .map_err(at)?;
            }
        }
        *switched = true;
        q(format!("DROP TABLE IF EXISTS {}", w.staging_sql))
            .await
            .map_err(at)?;
        Ok(())
    }

    async fn send(&self, request: &ChRequest, token: &str) -> Outcome {
        if let Err(reason) = self.ensure_created().await {
            return Outcome::Fatal { reason };
        }
        let into = match &self.overwrite {
            Some(w) => &w.staging_sql,
            None => &self.table_sql,
        };
        match self
            .client
            .insert_native(
                into,
                request.body.clone(),
                self.compression,
                self.tokens.then_some(token),
            )
            .await
        {
            Ok(()) => Outcome::Delivered,
            Err(e) if is_retriable(&e) => Outcome::Retry {
                reason: e.to_string(),
                after: None,
            },
            // The server does not say which row; the whole request's rows go to dead letters
            // with its message (and count against `max_rejected`).
            Err(e) if is_bad_data(&e) => Outcome::Partial {
                rejected: (0..request.rows).map(|i| (i, e.to_string())).collect(),
                retry: Vec::new(),
            },
            Err(e) => Outcome::Fatal {
                reason: e.to_string(),
            },
        }
    }
}
