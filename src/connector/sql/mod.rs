//! MySQL, PostgreSQL and SQLite tables: `STORED AS MYSQL | POSTGRES | SQLITE`.
//!
//! Reads go through ConnectorX (`cx.rs`, the only place its arrow 56 appears, and
//! `source.rs`); writes through each database's bulk path: PostgreSQL binary COPY (`pg.rs`,
//! `pgcopy.rs`), MySQL `LOAD DATA LOCAL INFILE` (`mysql.rs`), SQLite prepared inserts
//! (`sqlite.rs`). All writes run through the shared sink machinery (batching, retries, staging,
//! dead letters), with `'transaction' 'job'` making a statement all-or-nothing instead.

pub mod cx;
pub mod dialect;
pub mod mysql;
pub mod pg;
pub mod pgcopy;
pub mod source;
pub mod sqlite;

use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider, TableProviderFactory};
use datafusion::logical_expr::CreateExternalTable;
use url::Url;

use self::cx::Conn;
use self::dialect::Dialect;
use self::source::SqlReader;
use crate::connector::http::decode;
use crate::connector::options::{OptionSpec, TableOptions};
use crate::error::{Error, Result};
use crate::sink::{SINK_OPTIONS, SinkOptions, SinkTable, SourceSinkTable};

const OPTIONS: &[OptionSpec] = &[
    OptionSpec::new(
        "table",
        "the table read and written ('schema.table' or 'db.table' allowed)",
    ),
    OptionSpec::new("query", "reads only: a SELECT whose rows are the table"),
    OptionSpec::new(
        "create",
        "'if_not_exists' (default: created from the columns on the first write), 'never' or 'replace'",
    ),
    OptionSpec::new(
        "transaction",
        "'batch' (default: a transaction per request, failures staged for resume) or 'job' (all or nothing)",
    ),
    OptionSpec::new(
        "delivery_table",
        "writes: the table where each request's delivery token is recorded in the request's own transaction, \
         so a request sent again (a retry after a timeout, a resumed run) is applied once; default \
         flumen_deliveries beside the target, 'none' to keep no record (at-least-once)",
    ),
    OptionSpec::new(
        "partition_on",
        "reads: an integer column whose range is split for parallel reads",
    ),
    OptionSpec::new(
        "partitions",
        "reads: parallel ranges of partition_on; default the number of cores",
    ),
    OptionSpec::new(
        "partition_range",
        "reads: 'min,max' of partition_on instead of asking the database",
    ),
    OptionSpec::new(
        "chunk_keys",
        "reads: key values of partition_on per query (what a partition holds in memory); default 250000",
    ),
];

/// When the target table is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Create {
    Never,
    IfNotExists,
    Replace,
}

/// How rows meet the rows already there: `overwrite` is one transaction, `upsert` needs
/// `keys` (a primary or unique key of the table).
pub type Mode = crate::sink::WriteMode;

/// What every writer needs to know.
#[derive(Debug, Clone)]
pub struct WriteSpec {
    /// The target, quoted for its dialect.
    pub table: String,
    /// The target as the user named it (`table` or `schema.table`).
    pub name: String,
    pub create: Create,
    pub mode: Mode,
    /// One transaction for the whole statement.
    pub job: bool,
    /// The delivery table, quoted (`None`: no record of delivered tokens is kept).
    pub deliveries: Option<String>,
}

impl WriteSpec {
    /// A table in the target's schema named after it, `<table><suffix>`, quoted.
    pub fn beside(&self, d: Dialect, suffix: &str) -> String {
        match self.name.rsplit_once('.') {
            Some((schema, t)) => format!("{}.{}", d.table(schema), d.ident(&format!("{t}{suffix}"))),
            None => d.ident(&format!("{}{suffix}", self.name)),
        }
    }
}

/// The delivery table of a target named `name`: option `delivery_table`, default
/// `flumen_deliveries` in the target's schema; `None` for 'none'.
fn delivery_table(d: Dialect, name: &str, option: Option<&str>) -> Option<String> {
    match option {
        Some(v) if v.eq_ignore_ascii_case("none") => None,
        Some(v) => Some(d.table(v)),
        None => Some(match name.rsplit_once('.') {
            Some((schema, _)) => format!("{}.{}", d.table(schema), d.ident("flumen_deliveries")),
            None => d.ident("flumen_deliveries"),
        }),
    }
}

/// Builds MYSQL, POSTGRES and SQLITE tables.
#[derive(Debug)]
pub struct SqlFactory(pub Dialect);

/// `LOCATION` as a connection: the URL for ConnectorX and the clients, and its password (kept
/// out of messages).
fn connection(d: Dialect, location: &str) -> Result<(Conn, Url)> {
    let url = Url::parse(location).map_err(|e| {
        Error::Option(format!(
            "LOCATION is not a URL like {}: {e}",
            match d {
                Dialect::MySql => "mysql://user:${PASSWORD}@host:3306/db",
                Dialect::Postgres => "postgres://user:${PASSWORD}@host:5432/db",
                Dialect::Sqlite => "sqlite:///path/to/file.db",
            }
        ))
    })?;
    let ok = match d {
        Dialect::MySql => url.scheme() == "mysql",
        Dialect::Postgres => matches!(url.scheme(), "postgres" | "postgresql"),
        Dialect::Sqlite => url.scheme() == "sqlite",
    };
    if !ok {
        return Err(Error::Option(format!(
            "LOCATION scheme '{}' does not fit STORED AS {}",
            url.scheme(),
            d.name()
        )));
    }
    let secret = url.password().map(decode);
    let mut conn_url = url.clone();
    if d == Dialect::Postgres {
        conn_url.set_scheme("postgresql").ok();
    }
    Ok((
        Conn {
            url: conn_url.to_string(),
            secret,
        },
        url,
    ))
}

/// ConnectorX's types as the table's: 32-bit offsets, every column nullable.
fn table_type(t: &DataType) -> DataType {
    match t {
        DataType::LargeUtf8 => DataType::Utf8,
        DataType::LargeBinary => DataType::Binary,
        DataType::LargeList(f) => {
            DataType::List(Arc::new(Field::new("item", table_type(f.data_type()), true)))
        }
        other => other.clone(),
    }
}

#[async_trait]
impl TableProviderFactory for SqlFactory {
    async fn create(
        &self,
        _state: &dyn Session,
        cmd: &CreateExternalTable,
    ) -> datafusion::error::Result<Arc<dyn TableProvider>> {
        let d = self.0;
        let name = cmd.name.to_string();
        let specs: Vec<OptionSpec> = OPTIONS.iter().chain(SINK_OPTIONS).copied().collect();
        let o = TableOptions::parse(d.name(), &name, &cmd.options, &specs)?;
        let sink = SinkOptions::from_options(&o)?;
        let location = cmd.locations.first().cloned().unwrap_or_default();
        let (conn, url) =
            connection(d, &location).map_err(|e| Error::Option(format!("table {name}: {e}")))?;
        let at = |e: Error| Error::Option(format!("table {name}: {e}"));
        let (from, table) = match (o.get("table"), o.get("query")) {
            (Some(t), None) => (d.table(t), Some(d.table(t))),
            (None, Some(q)) => (format!("({q}) AS flumen_q"), None),
            (Some(_), Some(_)) => {
                return Err(at(Error::Option("give 'table' or 'query', not both".into())).into());
            }
            (None, None) => return Err(at(Error::Option("'table' or 'query' is required".into())).into()),
        };
        // One connection first, with the database's own client: a clear error (wrong password,
        // unknown database) at once, instead of ConnectorX's pool timing out on "db error".
        let declared: Vec<Arc<Field>> = cmd.schema.fields().iter().cloned().collect();
        check_connection(d, &conn, &location, !declared.is_empty(), sink.timeout)
            .await
            .map_err(at)?;
        let schema: SchemaRef = if !declared.is_empty() {
            Arc::new(Schema::new(declared))
        } else {
            let c = conn.clone();
            let q = format!("SELECT * FROM {from}");
            let s = tokio::task::spawn_blocking(move || cx::schema(&c, &q))
                .await
                .map_err(|e| at(Error::Config(e.to_string())))?
                .map_err(|e| {
                    at(Error::Config(format!(
                        "cannot read the columns of {from} ({e}); if the table does not exist yet, declare its columns: CREATE EXTERNAL TABLE {name} (id BIGINT, ...) STORED AS {}",
                        d.name()
                    )))
                })?;
            let decimals = match o.get("table") {
                Some(t) => declared_decimals(d, &conn, t).await,
                None => Default::default(),
            };
            Arc::new(Schema::new(
                s.fields()
                    .iter()
                    .map(|f| {
                        let t = match (f.data_type(), decimals.get(f.name())) {
                            (DataType::Decimal128(..), Some((p, s))) => DataType::Decimal128(*p, *s),
                            (t, _) => table_type(t),
                        };
                        Field::new(f.name(), t, true)
                    })
                    .collect::<Vec<_>>(),
            ))
        };
        let col = |c: &str| -> Result<String> {
            schema
                .field_with_name(c)
                .map(|f| f.name().clone())
                .map_err(|_| at(Error::Option(format!("'{c}' is not a column of the table"))))
        };
        let partition_on = o.get("partition_on").map(col).transpose()?;
        if let Some(p) = &partition_on {
            let t = schema.field_with_name(p).map(|f| f.data_type().clone())?;
            if !t.is_integer() && !matches!(t, DataType::Decimal128(_, 0)) {
                return Err(at(Error::Option(format!(
                    "'partition_on' {p} is {t}; it must be an integer column"
                )))
                .into());
            }
        }
        let partition_range = o
            .get("partition_range")
            .map(|r| {
                let bad = || {
                    at(Error::Option(format!(
                        "'partition_range' '{r}' is not 'min,max' (integers)"
                    )))
                };
                let (a, b) = r.split_once(',').ok_or_else(bad)?;
                let a: i64 = a.trim().parse().map_err(|_| bad())?;
                let b: i64 = b.trim().parse().map_err(|_| bad())?;
                if a > b { Err(bad()) } else { Ok((a, b)) }
            })
            .transpose()?;
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let reader = SqlReader {
            dialect: d,
            conn: conn.clone(),
            name: name.clone(),
            from,
            schema: Arc::clone(&schema),
            partition_on,
            partitions: o.parse_or("partitions", cores)?.max(1),
            partition_range,
            chunk_keys: o.count_or("chunk_keys", 250_000)?.max(1),
        };
        let mode = match &sink.mode {
            Mode::Upsert(keys) if keys.is_empty() => {
                return Err(at(Error::Option("'mode' 'upsert' needs 'keys'".into())).into());
            }
            Mode::Upsert(keys) => Mode::Upsert(keys.iter().map(|k| col(k)).collect::<Result<Vec<_>>>()?),
            m => m.clone(),
        };
        let job = o.choice_or("transaction", &["batch", "job"], "batch")? == "job" || mode == Mode::Overwrite;
        // Upserts apply requests one at a time, in input order: with a key repeated across
        // requests, the last row wins.
        let mut sink = sink;
        if matches!(mode, Mode::Upsert(_)) {
            sink.concurrency = 1;
        }
        let create = match o.choice_or("create", &["never", "if_not_exists", "replace"], "if_not_exists")? {
            "never" => Create::Never,
            "replace" => Create::Replace,
            _ => Create::IfNotExists,
        };
        // A query is read-only: writes need a table.
        let raw = o.get("table").unwrap_or_default().to_string();
        let spec = WriteSpec {
            table: table.unwrap_or_default(),
            deliveries: delivery_table(d, &raw, o.get("delivery_table")),
            name: raw,
            create,
            mode,
            job,
        };
        Ok(match d {
            Dialect::Postgres => {
                let backend = pg_backend(conn, spec, Arc::clone(&schema), &name, sink.timeout).await?;
                Arc::new(SourceSinkTable::new(reader, SinkTable::new(backend, name, sink)?))
            }
            Dialect::Sqlite => {
                let path = location.strip_prefix("sqlite://").map(decode).unwrap_or_default();
                let _ = url;
                let backend = sqlite::SqliteBackend::new(path, spec, Arc::clone(&schema), sink.timeout);
                Arc::new(SourceSinkTable::new(reader, SinkTable::new(backend, name, sink)?))
            }
            Dialect::MySql => {
                let backend =
                    mysql::MySqlBackend::new(conn, spec, Arc::clone(&schema), sink.timeout)?.shared();
                Arc::new(SourceSinkTable::new(reader, SinkTable::new(backend, name, sink)?))
            }
        })
    }
}

/// The declared precision and scale of a table's DECIMAL columns (ConnectorX reads every
/// decimal as Decimal(38, 10)); empty when the catalog cannot tell. Only those that fit
/// Decimal128 with at most ConnectorX's 10 fraction digits.
async fn declared_decimals(
    d: Dialect,
    conn: &Conn,
    table: &str,
) -> std::collections::HashMap<String, (u8, i8)> {
    let lit = |s: &str| d.string(s);
    let (schema, name) = match table.rsplit_once('.') {
        Some((s, n)) => (Some(s), n),
        None => (None, table),
    };
    let q = match d {
        Dialect::Postgres => format!(
            "SELECT column_name::text, numeric_precision::int, numeric_scale::int FROM information_schema.columns \
             WHERE table_name = {} AND table_schema = {} AND data_type = 'numeric' AND numeric_precision IS NOT NULL",
            lit(name),
            schema.map_or("current_schema()".to_string(), lit)
        ),
        Dialect::MySql => format!(
            "SELECT COLUMN_NAME, CAST(NUMERIC_PRECISION AS SIGNED), CAST(NUMERIC_SCALE AS SIGNED) FROM information_schema.COLUMNS \
             WHERE TABLE_NAME = {} AND TABLE_SCHEMA = {} AND DATA_TYPE = 'decimal'",
            lit(name),
            schema.map_or("DATABASE()".to_string(), lit)
        ),
        Dialect::Sqlite => return Default::default(),
    };
    let c = conn.clone();
    let rows = tokio::task::spawn_blocking(move || {
        let out = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = Arc::clone(&out);
        cx::read(&c, q, 1024, move |b| sink.lock().map(|mut v| v.push(b)).is_ok())?;
        let v = std::mem::take(&mut *out.lock().map_err(|_| Error::Config("reader state".into()))?);
        Ok::<_, Error>(v)
    })
    .await;
    let mut out = std::collections::HashMap::new();
    let Ok(Ok(batches)) = rows else {
        return out;
    };
    for b in batches {
        let (Ok(n), Ok(p), Ok(s)) = (
            arrow::compute::cast(b.column(0), &DataType::Utf8),
            arrow::compute::cast(b.column(1), &DataType::Int64),
            arrow::compute::cast(b.column(2), &DataType::Int64),
        ) else {
            continue;
        };
        use arrow::array::AsArray;
        let (n, p, s) = (
            n.as_string::<i32>(),
            p.as_primitive::<arrow::datatypes::Int64Type>(),
            s.as_primitive::<arrow::datatypes::Int64Type>(),
        );
        for i in 0..b.num_rows() {
            let (pi, si) = (p.value(i), s.value(i));
            if (1..=38).contains(&pi) && (0..=10).contains(&si) && si <= pi {
                out.insert(n.value(i).to_string(), (pi as u8, si as i8));
            }
        }
    }
    out
}

/// Connects once (reads need the server at planning time; a table with declared columns may be
/// written later, so an unreachable or unanswering server is then only a warning). Waits at most
/// `timeout`.
async fn check_connection(
    d: Dialect,
    conn: &Conn,
    location: &str,
    declared: bool,
    timeout: std::time::Duration,
) -> Result<()> {
    let silent = || (false, format!("no answer within {timeout:?}"));
    let r: std::result::Result<(), (bool, String)> = match d {
        Dialect::Postgres => match tokio::time::timeout(timeout, pg::connect(&conn.url)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err((e.as_db_error().is_some(), pg::pg_text(&e))),
            Err(_) => Err(silent()),
        },
        Dialect::MySql => {
            let url = conn.url.clone();
            let t = Some(timeout.max(std::time::Duration::from_secs(1)));
            tokio::task::spawn_blocking(move || match ::mysql::Opts::from_url(&url) {
                Ok(o) => {
                    let o = ::mysql::OptsBuilder::from_opts(o)
                        .tcp_connect_timeout(t)
                        .read_timeout(t)
                        .write_timeout(t);
                    ::mysql::Conn::new(o).map(|_| ()).map_err(|e| {
                        (
                            matches!(e, ::mysql::Error::MySqlError(_)),
                            self::mysql::my_text(&e),
                        )
                    })
                }
                Err(e) => Err((true, e.to_string())),
            })
            .await
            .map_err(|e| Error::Config(e.to_string()))?
        }
        Dialect::Sqlite => {
            let path = location.strip_prefix("sqlite://").map(decode).unwrap_or_default();
            match std::path::Path::new(&path).parent() {
                Some(p) if !p.as_os_str().is_empty() && !p.exists() => {
                    Err((true, format!("the folder of {path} does not exist")))
                }
                _ => Ok(()),
            }
        }
    };
    match r {
        Ok(()) => Ok(()),
        Err((false, why)) if declared => {
            tracing::warn!(
                "{}",
                conn.scrub(&format!(
                    "cannot reach {} ({why}); using the declared columns",
                    d.name()
                ))
            );
            Ok(())
        }
        Err((_, why)) => Err(Error::Config(
            conn.scrub(&format!("cannot connect to {}: {why}", d.name())),
        )),
    }
}

/// The PostgreSQL writer, with the target's column types from the catalog (or, for a table
/// not there yet, from the type map it will be created with). A server that cannot be reached
/// now leaves them to be read at the first write.
async fn pg_backend(
    conn: Conn,
    spec: WriteSpec,
    schema: SchemaRef,
    name: &str,
    timeout: std::time::Duration,
) -> Result<pg::PgBackend> {
    let targets = if spec.table.is_empty() || spec.create == Create::Replace {
        Some(pg::planned_targets(&schema))
    } else {
        let connected = tokio::time::timeout(timeout, async {
            let client = pg::connect(&conn.url).await?;
            Ok::<_, tokio_postgres::Error>(pg::targets(&client, &spec, &schema, name).await)
        })
        .await;
        match connected {
            Ok(Ok(targets)) => Some(targets?),
            Err(_) => {
                tracing::warn!(
                    "table {name}: the database did not answer within {timeout:?}; its column types are read at the first write"
                );
                None
            }
            Ok(Err(e)) => {
                if e.as_db_error().is_some() {
                    return Err(Error::Config(format!(
                        "table {name}: cannot log in: {}",
                        pg::pg_text(&e)
                    )));
                }
                tracing::warn!(
                    "table {name}: cannot reach the database ({}); its column types are read at the first write",
                    pg::pg_text(&e)
                );
                None
            }
        }
    };
    Ok(pg::PgBackend::new(conn.url, spec, schema, name, targets, timeout))
}
