//! Writing PostgreSQL tables: `COPY ... FROM STDIN (FORMAT binary)` fed from Arrow arrays
//! (`pgcopy.rs`), in a transaction per request, or one for the whole statement
//! (`'transaction' 'job'`, and always for `overwrite`). `upsert` copies into a temporary table
//! and merges with `INSERT ... ON CONFLICT (keys) DO UPDATE`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use arrow::array::RecordBatch;
use arrow::datatypes::{DataType, SchemaRef};
use async_trait::async_trait;
use tokio_postgres::{Client, NoTls};

use super::pgcopy::{self, PgColumn};
use super::{Create, Mode, WriteSpec};
use crate::error::{Error, Result};
use crate::sink::{Outcome, SinkBackend};

/// The PostgreSQL type flumen creates for an Arrow type: (DDL, catalog type name).
pub fn type_for(t: &DataType) -> Option<(String, String)> {
    let s = |d: &str, n: &str| Some((d.to_string(), n.to_string()));
    match t {
        DataType::Int8 | DataType::Int16 | DataType::UInt8 => s("SMALLINT", "int2"),
        DataType::Int32 | DataType::UInt16 => s("INTEGER", "int4"),
        DataType::Int64 | DataType::UInt32 => s("BIGINT", "int8"),
        DataType::UInt64 => s("NUMERIC(20, 0)", "numeric"),
        DataType::Float16 | DataType::Float32 => s("REAL", "float4"),
        DataType::Float64 => s("DOUBLE PRECISION", "float8"),
        DataType::Decimal32(p, sc)
        | DataType::Decimal64(p, sc)
        | DataType::Decimal128(p, sc)
        | DataType::Decimal256(p, sc)
            if *sc >= 0 =>
        {
            Some((format!("NUMERIC({p}, {sc})"), "numeric".into()))
        }
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View | DataType::Dictionary(..) => {
            s("TEXT", "text")
        }
        DataType::Binary | DataType::LargeBinary | DataType::BinaryView | DataType::FixedSizeBinary(_) => {
            s("BYTEA", "bytea")
        }
        DataType::Boolean => s("BOOLEAN", "bool"),
        DataType::Date32 | DataType::Date64 => s("DATE", "date"),
        DataType::Time32(_) | DataType::Time64(_) => s("TIME", "time"),
        DataType::Timestamp(_, None) => s("TIMESTAMP", "timestamp"),
        DataType::Timestamp(_, Some(_)) => s("TIMESTAMPTZ", "timestamptz"),
        DataType::List(f) | DataType::LargeList(f) | DataType::FixedSizeList(f, _) => {
            let (d, n) = type_for(f.data_type())?;
            match n.as_str() {
                "int2" | "int4" | "int8" | "float4" | "float8" | "text" | "bool" => {
                    Some((format!("{d}[]"), format!("_{n}")))
                }
                _ => s("JSONB", "jsonb"),
            }
        }
        DataType::Struct(_) | DataType::Map(..) => s("JSONB", "jsonb"),
        _ => None,
    }
}

/// The PostgreSQL writer.
pub struct PgBackend {
    pub url: String,
    pub spec: WriteSpec,
    pub schema: SchemaRef,
    /// The target's columns and types, as written (the catalog's, or the type map's for a
    /// table flumen creates).
    pub targets: Vec<PgColumn>,
    pub pool: tokio::sync::Mutex<Vec<Client>>,
    pub job: tokio::sync::Mutex<Option<Client>>,
    pub prepared: tokio::sync::OnceCell<()>,
    pub sent: AtomicBool,
    pub seq: AtomicU64,
}

impl std::fmt::Debug for PgBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgBackend")
            .field("table", &self.spec.table)
            .finish()
    }
}

/// An encoded request: a whole COPY body.
pub struct PgRequest {
    body: Vec<u8>,
    rows: usize,
}

pub async fn connect(url: &str) -> std::result::Result<Client, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// The columns of an existing table (`None`: no such table), generated columns left out.
pub async fn catalog(client: &Client, table: &str) -> Result<Option<Vec<PgColumn>>> {
    let rows = client
        .query(
            // Enums travel as their labels' text in binary COPY.
            "SELECT a.attname::text, CASE WHEN t.typtype = 'e' THEN 'text' ELSE t.typname::text END \
             FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid \
             WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = '' \
             ORDER BY a.attnum",
            &[&table],
        )
        .await
        .map_err(|e| Error::Config(format!("reading the columns of {table}: {}", pg_text(&e))))?;
    if rows.is_empty() {
        return Ok(None);
    }
    Ok(Some(
        rows.iter()
            .map(|r| PgColumn {
                name: r.get(0),
                ty: r.get(1),
            })
            .collect(),
    ))
}

/// An error's text: the server's message (and detail), never the connection string.
pub fn pg_text(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut s = format!("{} ({})", db.message(), db.code().code());
            if let Some(d) = db.detail() {
                s.push_str(": ");
                s.push_str(d);
            }
            if let Some(w) = db.where_() {
                s.push_str(" [");
                s.push_str(w);
                s.push(']');
            }
            s
        }
        None => {
            let s = e.to_string();
            match std::error::Error::source(e) {
                Some(src) => format!("{s}: {src}"),
                None => s,
            }
        }
    }
}

impl PgBackend {
    fn d(&self) -> super::dialect::Dialect {
        super::dialect::Dialect::Postgres
    }

    fn columns_sql(&self) -> String {
        self.schema
            .fields()
            .iter()
            .map(|f| self.d().ident(f.name()))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The DDL of the table flumen creates.
    pub fn create_sql(&self) -> Result<String> {
        let mut cols = Vec::new();
        for f in self.schema.fields() {
            let (ddl, _) = type_for(f.data_type()).ok_or_else(|| {
                Error::Config(format!(
                    "column {}: Arrow type {} has no PostgreSQL type; cast it in the query",
                    f.name(),
                    f.data_type()
                ))
            })?;
            let null = if f.is_nullable() { "" } else { " NOT NULL" };
            cols.push(format!("{} {ddl}{null}", self.d().ident(f.name())));
        }
        if let Mode::Upsert(keys) = &self.spec.mode {
            cols.push(format!(
                "PRIMARY KEY ({})",
                keys.iter()
                    .map(|k| self.d().ident(k))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        Ok(format!(
            "CREATE TABLE IF NOT EXISTS {} ({})",
            self.spec.table,
            cols.join(", ")
        ))
    }

    /// Creates the table on the first write, as `create` says.
    async fn prepare(&self) -> std::result::Result<(), Outcome> {
        self.prepared
            .get_or_try_init(|| async {
                if self.spec.create == Create::Never {
                    return Ok(());
                }
                let client = connect(&self.url).await.map_err(classify_connect)?;
                let mut sql = String::new();
                if self.spec.create == Create::Replace {
                    sql.push_str(&format!("DROP TABLE IF EXISTS {};\n", self.spec.table));
                }
                sql.push_str(&self.create_sql().map_err(|e| Outcome::Fatal {
                    reason: e.to_string(),
                })?);
                client.batch_execute(&sql).await.map_err(|e| Outcome::Fatal {
                    reason: format!("creating {}: {}", self.spec.table, pg_text(&e)),
                })?;
                Ok(())
            })
            .await
            .map(|_| ())
    }

    /// The statements that load one request on `client` (inside a transaction).
    async fn load(&self, client: &Client, req: &PgRequest) -> std::result::Result<(), tokio_postgres::Error> {
        use futures::SinkExt;
        let cols = self.columns_sql();
        let target = match &self.spec.mode {
            Mode::Upsert(_) => {
                let n = self.seq.fetch_add(1, Ordering::Relaxed);
                let tmp = format!("flumen_stage_{n}");
                client
                    .batch_execute(&format!(
                        "CREATE TEMP TABLE {tmp} (LIKE {} INCLUDING DEFAULTS) ON COMMIT DROP",
                        self.spec.table
                    ))
                    .await?;
                tmp
            }
            _ => self.spec.table.clone(),
        };
        let sink = client
            .copy_in::<_, bytes::Bytes>(&format!("COPY {target} ({cols}) FROM STDIN (FORMAT binary)"))
            .await?;
        futures::pin_mut!(sink);
        sink.send(bytes::Bytes::copy_from_slice(&req.body)).await?;
        sink.finish().await?;
        if let Mode::Upsert(keys) = &self.spec.mode {
            let d = self.d();
            let k = keys.iter().map(|k| d.ident(k)).collect::<Vec<_>>().join(", ");
            let set: Vec<String> = self
                .schema
                .fields()
                .iter()
                .filter(|f| !keys.contains(f.name()))
                .map(|f| format!("{0} = EXCLUDED.{0}", d.ident(f.name())))
                .collect();
            let action = if set.is_empty() {
                "NOTHING".to_string()
            } else {
                format!("UPDATE SET {}", set.join(", "))
            };
            // The last row of a key within the request wins.
            client
                .batch_execute(&format!(
                    "INSERT INTO {} ({cols}) SELECT DISTINCT ON ({k}) {cols} FROM {target} ORDER BY {k}, ctid DESC \
                     ON CONFLICT ({k}) DO {action}",
                    self.spec.table
                ))
                .await?;
        }
        Ok(())
    }

    /// The job's connection, in its transaction (begun, and the table emptied for `overwrite`,
    /// on first use).
    async fn job_client<'a>(
        &self,
        guard: &'a mut Option<Client>,
    ) -> std::result::Result<&'a Client, tokio_postgres::Error> {
        if guard.is_none() {
            let c = connect(&self.url).await?;
            c.batch_execute("BEGIN").await?;
            if self.spec.mode == Mode::Overwrite {
                c.batch_execute(&format!("DELETE FROM {}", self.spec.table))
                    .await?;
            }
            *guard = Some(c);
        }
        Ok(guard.as_ref().expect("set just above"))
    }
}

fn classify_connect(e: tokio_postgres::Error) -> Outcome {
    match e.as_db_error() {
        Some(_) => Outcome::Fatal {
            reason: format!("cannot log in: {}", pg_text(&e)),
        },
        None => Outcome::Retry {
            reason: format!("cannot connect: {}", pg_text(&e)),
            after: None,
        },
    }
}

/// The row a COPY error names (`COPY t, line 3, column x: ...` → row index 2).
fn copy_line(e: &tokio_postgres::Error) -> Option<usize> {
    let w = e.as_db_error()?.where_()?;
    let rest = w.split("line ").nth(1)?;
    let n: usize = rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()?;
    n.checked_sub(1)
}

#[async_trait]
impl SinkBackend for PgBackend {
    type Request = PgRequest;

    fn schema(&self) -> SchemaRef {
        SchemaRef::clone(&self.schema)
    }

    fn encode(&self, batch: &RecordBatch) -> Result<PgRequest> {
        if self.spec.table.is_empty() {
            return Err(Error::Config(
                "a table defined by 'query' is read-only; name a 'table' to write".into(),
            ));
        }
        let mut body = Vec::with_capacity(batch.get_array_memory_size() + 64);
        pgcopy::header(&mut body);
        pgcopy::encode_rows(batch, &self.targets, &mut body)?;
        pgcopy::trailer(&mut body);
        Ok(PgRequest {
            body,
            rows: batch.num_rows(),
        })
    }

    fn request_bytes(&self, r: &PgRequest) -> usize {
        r.body.len()
    }

    fn describe(&self) -> String {
        let create = match self.create_sql() {
            Ok(s) if self.spec.create != Create::Never => format!("; on first write: {s}"),
            _ => String::new(),
        };
        format!(
            "POSTGRES {} mode={} transaction={} columns=[{}]{create}",
            self.spec.table,
            self.spec.mode.name(),
            if self.spec.job { "job" } else { "batch" },
            self.targets
                .iter()
                .map(|c| format!("{} {}", c.name, c.ty))
                .collect::<Vec<_>>()
                .join(", ")
        )
    }

    fn all_or_nothing(&self) -> bool {
        self.spec.job
    }

    fn modes(&self) -> &'static [&'static str] {
        &["append", "overwrite", "upsert"]
    }

    async fn send(&self, req: &PgRequest, _token: &str) -> Outcome {
        if let Err(o) = self.prepare().await {
            return o;
        }
        self.sent.store(true, Ordering::Relaxed);
        if self.spec.job {
            let mut guard = self.job.lock().await;
            let r = match self.job_client(&mut guard).await {
                Ok(c) => self.load(c, req).await,
                Err(e) => Err(e),
            };
            return match r {
                Ok(()) => Outcome::Delivered,
                Err(e) => Outcome::Fatal {
                    reason: format!("{} (the transaction is rolled back)", pg_text(&e)),
                },
            };
        }
        let client = match self.pool.lock().await.pop() {
            Some(c) if !c.is_closed() => c,
            _ => match connect(&self.url).await {
                Ok(c) => c,
                Err(e) => return classify_connect(e),
            },
        };
        let r = async {
            client.batch_execute("BEGIN").await?;
            self.load(&client, req).await?;
            client.batch_execute("COMMIT").await
        }
        .await;
        match r {
            Ok(()) => {
                self.pool.lock().await.push(client);
                Outcome::Delivered
            }
            Err(e) => {
                let _ = client.batch_execute("ROLLBACK").await;
                if !client.is_closed() {
                    self.pool.lock().await.push(client);
                }
                let reason = pg_text(&e);
                let code = e.as_db_error().map(|d| d.code().code().to_string());
                match code.as_deref() {
                    None => Outcome::Retry { reason, after: None },
                    Some(c) if c.starts_with("22") || c.starts_with("23") => match copy_line(&e) {
                        Some(row) if row < req.rows => Outcome::Partial {
                            rejected: vec![(row, reason)],
                            retry: (0..req.rows).filter(|r| *r != row).collect(),
                        },
                        _ => Outcome::Partial {
                            rejected: (0..req.rows).map(|r| (r, reason.clone())).collect(),
                            retry: vec![],
                        },
                    },
                    Some(c) if c.starts_with("40") || c.starts_with("53") || c.starts_with("57") => {
                        Outcome::Retry { reason, after: None }
                    }
                    Some(_) => Outcome::Fatal { reason },
                }
            }
        }
    }

    async fn finish(&self, ok: bool) -> Result<()> {
        if !self.spec.job {
            if ok {
                self.prepare().await.map_err(outcome_error)?;
            }
            return Ok(());
        }
        let mut guard = self.job.lock().await;
        if ok {
            self.prepare().await.map_err(outcome_error)?;
            let c = self
                .job_client(&mut guard)
                .await
                .map_err(|e| Error::Config(format!("table {}: {}", self.spec.table, pg_text(&e))))?;
            c.batch_execute("COMMIT").await.map_err(|e| {
                Error::Config(format!(
                    "table {}: commit failed: {}",
                    self.spec.table,
                    pg_text(&e)
                ))
            })?;
        } else if let Some(c) = guard.as_ref() {
            let _ = c.batch_execute("ROLLBACK").await;
        }
        *guard = None;
        Ok(())
    }
}

fn outcome_error(o: Outcome) -> Error {
    match o {
        Outcome::Fatal { reason } | Outcome::Retry { reason, .. } => Error::Config(reason),
        _ => Error::Config("the table could not be prepared".into()),
    }
}
