//! The ClickHouse table: `INSERT INTO` sends Native blocks over HTTP through the shared sink
//! machinery; the table is created on the first write when asked to (so `explain` writes nothing).
//! `SELECT` reads through [`super::source`].

use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::{Field, Schema, SchemaRef};
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider, TableProviderFactory};
use datafusion::logical_expr::CreateExternalTable;
use tokio::sync::OnceCell;

use super::client::{
    BodyCompression, ChError, Client, is_bad_data, is_retriable, parse_settings, quote_ident, quote_str,
};
use super::compress::{Method, compress};
use super::native::encode_block;
use super::source::Reader;
use super::types::ChType;
use crate::connector::options::{OptionSpec, TableOptions};
use crate::error::{Error, Result};
use crate::sink::{Outcome, SINK_OPTIONS, SinkBackend, SinkOptions, SinkTable, SourceSinkTable};

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
            let engine = o.get("engine").unwrap_or("MergeTree");
            let mut stmt = format!(
                "CREATE TABLE IF NOT EXISTS {full} ({}) ENGINE = {engine}",
                defs.join(", "),
            );
            if let Some(p) = o.get("partition_by") {
                stmt.push_str(&format!(" PARTITION BY {p}"));
            }
            stmt.push_str(&format!(" ORDER BY {}", o.get("order_by").unwrap_or("tuple()")));
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
        let reader = Reader {
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
        };
        Ok(Arc::new(SourceSinkTable::new(
            reader,
            SinkTable::new(backend, name, sink),
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
        s
    }

    async fn send(&self, request: &ChRequest, token: &str) -> Outcome {
        let created = self
            .created
            .get_or_init(|| async {
                for stmt in &self.ddl {
                    self.client
                        .query(stmt)
                        .await
                        .map_err(|e| format!("creating {}: {e}", self.table_sql))?;
                }
                Ok(())
            })
            .await;
        if let Err(reason) = created {
            return Outcome::Fatal {
                reason: reason.clone(),
            };
        }
        match self
            .client
            .insert_native(
                &self.table_sql,
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
