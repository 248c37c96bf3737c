//! The ClickHouse table: `INSERT INTO` sends Native blocks over HTTP through the shared sink
//! machinery; the table is created on the first write when asked to (so `explain` writes nothing).

use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::{Field, Schema, SchemaRef};
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider, TableProviderFactory};
use datafusion::logical_expr::CreateExternalTable;
use tokio::sync::OnceCell;

use super::client::{ChError, Client, is_retriable, quote_ident, quote_str};
use super::native::encode_block;
use super::types::ChType;
use crate::connector::options::{OptionSpec, TableOptions};
use crate::error::{Error, Result};
use crate::sink::{Outcome, SINK_OPTIONS, SinkBackend, SinkOptions, SinkTable};

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
        "request body compression: 'uncompressed' (default) or 'gzip' (the name and values of DataFusion's own option, which it checks first)",
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
        let client = Client::from_location(&location, sink.timeout)?;
        let table = o.required("table")?.to_string();
        let create = o.choice_or("create", &["never", "if_not_exists", "replace"], "never")?;
        let gzip = o.choice_or("compression", &["uncompressed", "gzip"], "uncompressed")? == "gzip";
        let full = format!("{}.{}", quote_ident(&client.database), quote_ident(&table));
        let at = |e: ChError| Error::Config(format!("table {name}: ClickHouse {full}: {e}"));
        let legacy = client
            .query("SELECT version()")
            .await
            .map_err(at)?
            .trim()
            .split('.')
            .next()
            .and_then(|m| m.parse::<u32>().ok())
            .is_some_and(|major| major < 20);
        let existing = client
            .query(&format!(
                "SELECT name, type FROM system.columns WHERE database = {} AND table = {} FORMAT TabSeparated",
                quote_str(&client.database),
                quote_str(&table)
            ))
            .await
            .map_err(at)?;
        let existing: Vec<(String, ChType)> = existing
            .lines()
            .filter(|l| !l.is_empty())
            .map(|l| {
                let (n, t) = l.split_once('\t').unwrap_or((l, ""));
                Ok((unescape_tsv(n), ChType::parse(&unescape_tsv(t))?))
            })
            .collect::<Result<_>>()?;
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
            let mut stmt = format!(
                "CREATE TABLE IF NOT EXISTS {full} ({}) ENGINE = {}",
                defs.join(", "),
                o.get("engine").unwrap_or("MergeTree")
            );
            if let Some(p) = o.get("partition_by") {
                stmt.push_str(&format!(" PARTITION BY {p}"));
            }
            stmt.push_str(&format!(" ORDER BY {}", o.get("order_by").unwrap_or("tuple()")));
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
        let backend = ClickHouseBackend {
            client,
            table_sql: full,
            types: columns.into_iter().map(|(_, t)| t).collect(),
            schema,
            ddl,
            created: OnceCell::new(),
            gzip,
        };
        Ok(Arc::new(SinkTable::new(backend, name, sink)))
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
    /// Send bodies gzip-compressed (`Content-Encoding: gzip`).
    gzip: bool,
}

#[async_trait]
impl SinkBackend for ClickHouseBackend {
    type Request = bytes::Bytes;

    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn encode(&self, batch: &RecordBatch) -> Result<bytes::Bytes> {
        let block = encode_block(batch, &self.types)?;
        if !self.gzip {
            return Ok(block.into());
        }
        use std::io::Write;
        let mut z =
            flate2::write::GzEncoder::new(Vec::with_capacity(block.len() / 4), flate2::Compression::fast());
        z.write_all(&block)
            .map_err(|e| Error::io("compressing a Native block", e))?;
        Ok(z.finish()
            .map_err(|e| Error::io("compressing a Native block", e))?
            .into())
    }

    fn request_bytes(&self, request: &bytes::Bytes) -> usize {
        request.len()
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
            if self.gzip { ", gzip" } else { "" }
        );
        if !self.ddl.is_empty() {
            s.push_str(&format!(", on the first write runs: {}", self.ddl.join("; ")));
        }
        s
    }

    async fn send(&self, request: &bytes::Bytes, _token: &str) -> Outcome {
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
            .insert_native(&self.table_sql, request.clone(), self.gzip)
            .await
        {
            Ok(()) => Outcome::Delivered,
            Err(e) if is_retriable(&e) => Outcome::Retry {
                reason: e.to_string(),
                after: None,
            },
            Err(e) => Outcome::Fatal {
                reason: e.to_string(),
            },
        }
    }
}
