//! Writing PostgreSQL tables: `COPY ... FROM STDIN (FORMAT binary)` fed from Arrow arrays
//! (`pgcopy.rs`), in a transaction per request, or one for the whole statement
//! (`'transaction' 'job'`, and always for `overwrite`). `upsert` copies into a temporary table
//! and merges with `INSERT ... ON CONFLICT (keys) DO UPDATE`.
//!
//! Exactly once: each request's transaction first inserts its delivery token into the delivery
//! table (`flumen_deliveries` beside the target, option `delivery_table`). A token that is there
//! already means an earlier attempt committed the request: it is rolled back and counts as
//! delivered. An earlier attempt still running holds the token's row lock, so the next one waits
//! for it to end: two attempts of a request never both commit. A job records one token for the
//! statement, so a replay of a job that committed does not load it again.
//!
//! DDL is transactional here: the table is created (or, with `'create' 'replace'`, dropped and
//! created) in the transaction of the first request or of the job, so a statement that fails
//! before that commits leaves the target as it was. The replace is recorded in the delivery
//! table in that transaction and in the run's journal after it, and never runs again in the run.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arrow::array::RecordBatch;
use arrow::datatypes::{DataType, SchemaRef};
use async_trait::async_trait;
use tokio_postgres::{Client, NoTls};

use super::pgcopy::{self, PgColumn};
use super::{Create, Mode, WriteSpec};
use crate::error::{Error, Result};
use crate::sink::{Attempt, Effects, Outcome, SinkBackend};

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
    url: String,
    spec: WriteSpec,
    schema: SchemaRef,
    /// The table as the user named it, for messages.
    name: String,
    /// The target's columns and types, as written (the catalog's, or the type map's for a
    /// table flumen creates); read at the first write when the server was down at CREATE.
    targets: tokio::sync::OnceCell<Vec<PgColumn>>,
    pool: tokio::sync::Mutex<Vec<Client>>,
    job: tokio::sync::Mutex<Option<Job>>,
    /// The delivery table is there (`true`), or cannot be made for lack of privilege
    /// (`false`: no record is kept, with a warning); known once per process.
    deliveries: tokio::sync::OnceCell<bool>,
    /// The sink's timeout, for what runs outside a request's attempt (DDL, commit).
    timeout: Duration,
    /// The table is prepared (`create`): held by the first request while it prepares it.
    prepared: tokio::sync::Mutex<bool>,
    seq: AtomicU64,
}

/// The statement's transaction (`'transaction' 'job'`, `overwrite`).
struct Job {
    client: Client,
    /// An earlier attempt of the run committed this job: nothing is loaded again.
    committed_before: bool,
    /// The transaction prepares the table (its DDL commits with it).
    prepares: bool,
}

impl std::fmt::Debug for PgBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgBackend")
            .field("table", &self.spec.table)
            .finish()
    }
}

/// An encoded request: a whole COPY body, or the rows until the target's types are known.
pub struct PgRequest {
    body: Option<Vec<u8>>,
    batch: RecordBatch,
    rows: usize,
}

/// Connects (within `timeout`, when given); the connection runs on a task that ends with it.
pub async fn connect(url: &str) -> std::result::Result<Client, tokio_postgres::Error> {
    connect_within(url, None).await
}

async fn connect_within(
    url: &str,
    timeout: Option<Duration>,
) -> std::result::Result<Client, tokio_postgres::Error> {
    let mut config: tokio_postgres::Config = url.parse()?;
    if let Some(t) = timeout {
        config.connect_timeout(t);
    }
    let (client, conn) = config.connect(NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// Connects within `timeout`, handshake and login included; a failure as the outcome it means
/// for a request.
async fn connect_bounded(url: &str, timeout: Duration) -> std::result::Result<Client, Outcome> {
    match tokio::time::timeout(timeout, connect_within(url, Some(timeout))).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(classify_connect(e)),
        Err(_) => Err(Outcome::Retry {
            reason: format!("cannot connect: no answer within {timeout:?}"),
            after: None,
        }),
    }
}

/// Runs `work` within `timeout`; past it, its statement is cancelled at the server (best
/// effort, bounded too) and the outcome is a retriable failure.
async fn bounded<T>(
    client: &Client,
    timeout: Duration,
    work: impl std::future::Future<Output = std::result::Result<T, Outcome>>,
) -> std::result::Result<T, Outcome> {
    match tokio::time::timeout(timeout, work).await {
        Ok(r) => r,
        Err(_) => {
            let cancel = client.cancel_token();
            let _ = tokio::time::timeout(timeout, cancel.cancel_query(NoTls)).await;
            Err(Outcome::Retry {
                reason: format!("no answer within {timeout:?} (the statement was cancelled)"),
                after: None,
            })
        }
    }
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

/// The columns a table flumen creates will have.
pub fn planned_targets(schema: &SchemaRef) -> Vec<PgColumn> {
    schema
        .fields()
        .iter()
        .map(|f| PgColumn {
            name: f.name().clone(),
            ty: type_for(f.data_type())
                .map(|(_, t)| t)
                .unwrap_or_else(|| "text".into()),
        })
        .collect()
}

/// The target's column for each of `schema`'s, from the catalog (or planned when the table is
/// not there yet).
pub async fn targets(
    client: &Client,
    spec: &WriteSpec,
    schema: &SchemaRef,
    name: &str,
) -> Result<Vec<PgColumn>> {
    let Some(cols) = catalog(client, &spec.table).await? else {
        return Ok(planned_targets(schema));
    };
    schema
        .fields()
        .iter()
        .map(|f| {
            cols.iter().find(|c| c.name == *f.name()).cloned().ok_or_else(|| {
                Error::Option(format!(
                    "table {name}: column {} is not in {} (it has {})",
                    f.name(),
                    spec.table,
                    cols.iter()
                        .map(|c| c.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })
        })
        .collect()
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

/// How a transaction went.
enum Tx {
    /// Committed.
    Done,
    /// The token was there: an earlier attempt committed the request.
    Before,
}

impl PgBackend {
    /// A writer of `spec` (`targets`: the target's columns when known now).
    pub fn new(
        url: String,
        spec: WriteSpec,
        schema: SchemaRef,
        name: &str,
        targets: Option<Vec<PgColumn>>,
        timeout: Duration,
    ) -> Self {
        let cell = tokio::sync::OnceCell::new();
        if let Some(t) = targets {
            let _ = cell.set(t);
        }
        Self {
            url,
            spec,
            schema,
            name: name.to_string(),
            targets: cell,
            pool: Default::default(),
            job: Default::default(),
            deliveries: Default::default(),
            prepared: Default::default(),
            seq: AtomicU64::new(0),
            timeout,
        }
    }

    /// The delivery table, when one is kept.
    fn deliveries(&self) -> Option<&String> {
        self.spec
            .deliveries
            .as_ref()
            .filter(|_| self.deliveries.get() != Some(&false))
    }

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

    /// The token that records this run's replace of the table in the delivery table.
    fn replace_token(&self, fx: &Effects) -> String {
        format!(
            "{}/replace/{:016x}",
            fx.run_id(),
            xxhash_rust::xxh3::xxh3_64(self.spec.name.as_bytes())
        )
    }

    /// The DDL the table is owed (run inside the transaction that prepares it).
    async fn ddl(&self, client: &Client, fx: &Effects) -> std::result::Result<(), Outcome> {
        let fatal = |e: tokio_postgres::Error| Outcome::Fatal {
            reason: format!("creating {}: {}", self.spec.table, pg_text(&e)),
        };
        match self.spec.create {
            Create::Never => Ok(()),
            Create::IfNotExists => {
                let sql = self.create_sql().map_err(|e| Outcome::Fatal {
                    reason: e.to_string(),
                })?;
                client.batch_execute(&sql).await.map_err(fatal)
            }
            Create::Replace => {
                // The run's replace token is inserted first: an attempt that made it and has
                // not ended yet holds its row, so this waits for it, and finds it if it committed.
                let owed = !fx.done("replace") && self.record(client, &self.replace_token(fx)).await?;
                if !owed {
                    // Done by an earlier attempt of this run: its rows stay.
                    let sql = self.create_sql().map_err(|e| Outcome::Fatal {
                        reason: e.to_string(),
                    })?;
                    return client.batch_execute(&sql).await.map_err(fatal);
                }
                let sql = format!(
                    "DROP TABLE IF EXISTS {};\n{}",
                    self.spec.table,
                    self.create_sql().map_err(|e| Outcome::Fatal {
                        reason: e.to_string()
                    })?
                );
                client.batch_execute(&sql).await.map_err(fatal)
            }
        }
    }

    /// Inserts `token` into the delivery table: `false` when it was there already.
    async fn record(&self, client: &Client, token: &str) -> std::result::Result<bool, Outcome> {
        let Some(t) = self.deliveries() else {
            return Ok(true);
        };
        let target = &self.spec.table;
        client
            .execute(
                &format!("INSERT INTO {t} (token, target) VALUES ($1, $2) ON CONFLICT (token) DO NOTHING"),
                &[&token, &target],
            )
            .await
            .map(|n| n == 1)
            .map_err(|e| classify(&e, 0).unwrap_or_else(|o| o))
    }

    /// Makes the delivery table, once per process (within the timeout). Without the privilege
    /// to make it the write goes on without it, at least once, and says so.
    async fn ensure_deliveries(&self, client: &Client) -> std::result::Result<(), Outcome> {
        let Some(t) = &self.spec.deliveries else {
            return Ok(());
        };
        let make = self.deliveries.get_or_try_init(|| async {
            let sql = format!(
                "CREATE TABLE IF NOT EXISTS {t} (token TEXT PRIMARY KEY, target TEXT NOT NULL, \
                 delivered_at TIMESTAMPTZ NOT NULL DEFAULT now())"
            );
            match client.batch_execute(&sql).await {
                Ok(()) => Ok(true),
                // Made at the same moment by another writer.
                Err(e) if matches!(e.code().map(|c| c.code()), Some("23505" | "42P07")) => Ok(true),
                Err(e)
                    if e.code().map(|c| c.code()) == Some("42501")
                        && client
                            .batch_execute(&format!("SELECT token FROM {t} LIMIT 0"))
                            .await
                            .is_ok() =>
                {
                    // Made by someone else, with the rights to use it: fine.
                    Ok(true)
                }
                Err(e) if e.code().map(|c| c.code()) == Some("42501") => {
                    tracing::warn!(
                        table = %self.name,
                        "cannot make the delivery table {t} ({}): requests are recorded nowhere, so one sent again \
                         after a timeout or a crash may be applied twice; name a table flumen may create with \
                         OPTIONS ('delivery_table' 'schema.table')",
                        pg_text(&e)
                    );
                    Ok(false)
                }
                    Err(e) if e.as_db_error().is_none() => Err(Outcome::Retry {
                        reason: pg_text(&e),
                        after: None,
                    }),
                Err(e) => Err(Outcome::Fatal {
                    reason: format!(
                        "making the delivery table {t}: {}; name one flumen may create with OPTIONS ('delivery_table' 'schema.table'), or 'none'",
                        pg_text(&e)
                    ),
                }),
            }
        });
        bounded(client, self.timeout, make).await.map(|_| ())
    }

    /// The target's columns: known at CREATE, or read now.
    async fn targets(&self, timeout: Duration) -> std::result::Result<&Vec<PgColumn>, Outcome> {
        self.targets
            .get_or_try_init(|| async {
                let client = connect_bounded(&self.url, timeout).await?;
                let read = async {
                    targets(&client, &self.spec, &self.schema, &self.name)
                        .await
                        .map_err(|e| Outcome::Fatal {
                            reason: e.to_string(),
                        })
                };
                bounded(&client, timeout, read).await
            })
            .await
    }

    fn encode_body(&self, batch: &RecordBatch, targets: &[PgColumn]) -> Result<Vec<u8>> {
        let mut body = Vec::with_capacity(batch.get_array_memory_size() + 64);
        pgcopy::header(&mut body);
        pgcopy::encode_rows(batch, targets, &mut body)?;
        pgcopy::trailer(&mut body);
        Ok(body)
    }

    /// The statements that load one request on `client` (inside a transaction).
    async fn load(&self, client: &Client, body: &[u8]) -> std::result::Result<(), tokio_postgres::Error> {
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
        sink.send(bytes::Bytes::copy_from_slice(body)).await?;
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

    /// One request in a transaction of its own: the token first, the table's DDL when
    /// `prepare`, then the rows.
    async fn transaction(
        &self,
        client: &Client,
        body: &[u8],
        rows: usize,
        token: &str,
        prepare: bool,
        fx: &Effects,
    ) -> std::result::Result<Tx, Outcome> {
        let err = |e: tokio_postgres::Error| classify(&e, rows);
        client
            .batch_execute("BEGIN")
            .await
            .map_err(|e| err(e).unwrap_or_else(|o| o))?;
        let r = async {
            if !self.record(client, token).await? {
                return Ok(Tx::Before);
            }
            if prepare {
                self.ddl(client, fx).await?;
            }
            self.load(client, body).await.map_err(|e| match err(e) {
                Ok(partial) => partial,
                Err(o) => o,
            })?;
            client
                .batch_execute("COMMIT")
                .await
                .map_err(|e| err(e).unwrap_or_else(|o| o))?;
            Ok(Tx::Done)
        }
        .await;
        if !matches!(r, Ok(Tx::Done)) {
            let _ = client.batch_execute("ROLLBACK").await;
        }
        r
    }

    /// Sends one request in its own transaction (`'transaction' 'batch'`).
    async fn send_batch(&self, body: &[u8], rows: usize, a: &Attempt<'_>) -> Outcome {
        let client = match self.pool.lock().await.pop() {
            Some(c) if !c.is_closed() => c,
            _ => match connect_bounded(&self.url, a.timeout).await {
                Ok(c) => c,
                Err(o) => return o,
            },
        };
        if let Err(o) = self.ensure_deliveries(&client).await {
            return o;
        }
        // The first request prepares the table; the others wait until it has.
        let guard = self.prepared.lock().await;
        let mut preparing = if *guard { None } else { Some(guard) };
        let prepare = preparing.is_some();
        let work = self.transaction(&client, body, rows, a.token, prepare, a.effects);
        let r = match tokio::time::timeout(a.timeout, work).await {
            Ok(r) => r,
            Err(_) => {
                // Cancel the statement at the server; the connection is not used again, so a
                // transaction still open there ends with it. A later attempt waits on the
                // token's row lock until then.
                let cancel = client.cancel_token();
                let _ = tokio::time::timeout(a.timeout, cancel.cancel_query(NoTls)).await;
                return a.timed_out();
            }
        };
        match r {
            Ok(_) => {
                if let Some(g) = preparing.as_mut() {
                    **g = true;
                    if self.spec.create == Create::Replace
                        && !a.effects.done("replace")
                        && let Err(e) = a.effects.record("replace")
                    {
                        return Outcome::Fatal {
                            reason: e.to_string(),
                        };
                    }
                }
                drop(preparing);
                self.pool.lock().await.push(client);
                Outcome::Delivered
            }
            Err(o) => {
                drop(preparing);
                if !client.is_closed() {
                    self.pool.lock().await.push(client);
                }
                o
            }
        }
    }

    /// The job's transaction, begun on first use: its token recorded (or found: an earlier
    /// attempt committed the job), the table prepared, emptied for `overwrite`.
    async fn job_begin(
        &self,
        guard: &mut Option<Job>,
        fx: &Effects,
        timeout: Duration,
    ) -> std::result::Result<(), Outcome> {
        if guard.is_some() {
            return Ok(());
        }
        let client = connect_bounded(&self.url, timeout).await?;
        self.ensure_deliveries(&client).await?;
        let begun = bounded(&client, timeout, self.begin_job(&client, fx)).await?;
        let Some(prepares) = begun else {
            *guard = Some(Job {
                client,
                committed_before: true,
                prepares: false,
            });
            return Ok(());
        };
        *guard = Some(Job {
            client,
            committed_before: false,
            prepares,
        });
        Ok(())
    }

    /// The first statements of the job's transaction: `None` when an earlier attempt of the run
    /// committed this job (nothing is loaded again), else whether it prepares the table.
    async fn begin_job(&self, client: &Client, fx: &Effects) -> std::result::Result<Option<bool>, Outcome> {
        let rolled = |e: tokio_postgres::Error| Outcome::Fatal {
            reason: format!("{} (the transaction is rolled back)", pg_text(&e)),
        };
        client.batch_execute("BEGIN").await.map_err(rolled)?;
        if !self.record(client, &fx.statement_token()).await? {
            if fx.input_repeatable() {
                let _ = client.batch_execute("ROLLBACK").await;
                tracing::info!(table = %self.name, "an earlier attempt of this run committed this write: it is not loaded again");
                return Ok(None);
            }
            // Its input (incremental, a broker) may hold more now: loaded again, at least once.
            tracing::warn!(
                table = %self.name,
                "an earlier attempt of this run committed this write, but its input may have changed since: it is loaded again"
            );
        }
        let mut prepared = self.prepared.lock().await;
        let prepares = !*prepared;
        if prepares {
            self.ddl(client, fx).await?;
        }
        if self.spec.mode == Mode::Overwrite {
            client
                .batch_execute(&format!("DELETE FROM {}", self.spec.table))
                .await
                .map_err(rolled)?;
        }
        // Prepared as far as this process goes; a rollback of the job undoes it (see finish).
        *prepared = true;
        Ok(Some(prepares))
    }

    async fn send_job(&self, body: &[u8], a: &Attempt<'_>) -> Outcome {
        let mut guard = self.job.lock().await;
        if let Err(o) = self.job_begin(&mut guard, a.effects, a.timeout).await {
            return match o {
                Outcome::Retry { .. } if guard.is_none() => o,
                Outcome::Fatal { reason } | Outcome::Retry { reason, .. } => Outcome::Fatal { reason },
                other => other,
            };
        }
        let Some(job) = guard.as_ref() else {
            return Outcome::Fatal {
                reason: "no transaction".into(),
            };
        };
        if job.committed_before {
            return Outcome::Delivered;
        }
        match tokio::time::timeout(a.timeout, self.load(&job.client, body)).await {
            Ok(Ok(())) => Outcome::Delivered,
            Ok(Err(e)) => Outcome::Fatal {
                reason: format!("{} (the transaction is rolled back)", pg_text(&e)),
            },
            Err(_) => {
                let cancel = job.client.cancel_token();
                let _ = tokio::time::timeout(a.timeout, cancel.cancel_query(NoTls)).await;
                Outcome::Fatal {
                    reason: format!(
                        "no answer within {:?} (the statement is cancelled and the transaction rolled back)",
                        a.timeout
                    ),
                }
            }
        }
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

/// A failed statement of a request of `rows` rows: `Ok(Partial)` when the rows are at fault
/// (a bad value, a constraint), else how to go on.
fn classify(e: &tokio_postgres::Error, rows: usize) -> std::result::Result<Outcome, Outcome> {
    let reason = pg_text(e);
    let code = e.as_db_error().map(|d| d.code().code().to_string());
    match code.as_deref() {
        None => Err(Outcome::Retry { reason, after: None }),
        Some(c) if rows > 0 && (c.starts_with("22") || c.starts_with("23")) => Ok(match copy_line(e) {
            Some(row) if row < rows => Outcome::Partial {
                rejected: vec![(row, reason)],
                retry: (0..rows).filter(|r| *r != row).collect(),
            },
            _ => Outcome::Partial {
                rejected: (0..rows).map(|r| (r, reason.clone())).collect(),
                retry: vec![],
            },
        }),
        Some(c) if c.starts_with("40") || c.starts_with("53") || c.starts_with("57") || c == "55P03" => {
            Err(Outcome::Retry { reason, after: None })
        }
        Some(_) => Err(Outcome::Fatal { reason }),
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
        let body = match self.targets.get() {
            Some(t) => Some(self.encode_body(batch, t)?),
            None => None,
        };
        Ok(PgRequest {
            body,
            batch: batch.clone(),
            rows: batch.num_rows(),
        })
    }

    fn request_bytes(&self, r: &PgRequest) -> usize {
        r.body.as_ref().map_or(r.batch.get_array_memory_size(), Vec::len)
    }

    fn describe(&self) -> String {
        let create = match self.create_sql() {
            Ok(s) if self.spec.create != Create::Never => format!("; on first write: {s}"),
            _ => String::new(),
        };
        let columns = match self.targets.get() {
            Some(t) => t
                .iter()
                .map(|c| format!("{} {}", c.name, c.ty))
                .collect::<Vec<_>>()
                .join(", "),
            None => "read at the first write".into(),
        };
        format!(
            "POSTGRES {} mode={} transaction={} columns=[{columns}]{create}; delivery tokens in {}",
            self.spec.table,
            self.spec.mode.name(),
            if self.spec.job { "job" } else { "batch" },
            self.spec.deliveries.as_deref().unwrap_or("none (at-least-once)")
        )
    }

    fn all_or_nothing(&self) -> bool {
        self.spec.job
    }

    fn modes(&self) -> &'static [&'static str] {
        &["append", "overwrite", "upsert"]
    }

    async fn send(&self, req: &PgRequest, a: &Attempt<'_>) -> Outcome {
        let targets = match self.targets(a.timeout).await {
            Ok(t) => t,
            Err(o) => return o,
        };
        let encoded;
        let body = match &req.body {
            Some(b) => b,
            None => match self.encode_body(&req.batch, targets) {
                Ok(b) => {
                    encoded = b;
                    &encoded
                }
                Err(e) => {
                    return Outcome::Fatal {
                        reason: e.to_string(),
                    };
                }
            },
        };
        if self.spec.job {
            self.send_job(body, a).await
        } else {
            self.send_batch(body, req.rows, a).await
        }
    }

    async fn finish(&self, ok: bool, fx: &Effects) -> Result<()> {
        let at = |reason: String| Error::Config(format!("table {}: {reason}", self.spec.table));
        let t = self.timeout;
        if !self.spec.job {
            let mut prepared = self.prepared.lock().await;
            if ok && !*prepared {
                // No request was sent: the table is still owed its DDL.
                let client = connect_bounded(&self.url, t)
                    .await
                    .map_err(|o| at(outcome_text(o)))?;
                self.ensure_deliveries(&client)
                    .await
                    .map_err(|o| at(outcome_text(o)))?;
                let ddl = async {
                    client
                        .batch_execute("BEGIN")
                        .await
                        .map_err(|e| Outcome::Fatal { reason: pg_text(&e) })?;
                    self.ddl(&client, fx).await?;
                    client
                        .batch_execute("COMMIT")
                        .await
                        .map_err(|e| Outcome::Fatal { reason: pg_text(&e) })
                };
                bounded(&client, t, ddl).await.map_err(|o| at(outcome_text(o)))?;
                if self.spec.create == Create::Replace && !fx.done("replace") {
                    fx.record("replace")?;
                }
                *prepared = true;
            }
            return Ok(());
        }
        let mut guard = self.job.lock().await;
        if ok {
            self.job_begin(&mut guard, fx, t)
                .await
                .map_err(|o| at(outcome_text(o)))?;
            // The job ends here whatever the COMMIT answers.
            let job = guard.take();
            if let Some(job) = job.as_ref().filter(|j| !j.committed_before) {
                let commit = async {
                    job.client
                        .batch_execute("COMMIT")
                        .await
                        .map_err(|e| Outcome::Fatal {
                            reason: format!("commit failed: {}", pg_text(&e)),
                        })
                };
                // A COMMIT without an answer may have committed: a resume finds out from the
                // job's token in the delivery table.
                if let Err(o) = bounded(&job.client, t, commit).await {
                    if job.prepares {
                        // The DDL went with the job: the next statement prepares again.
                        *self.prepared.lock().await = false;
                    }
                    return Err(at(outcome_text(o)));
                }
                if job.prepares && self.spec.create == Create::Replace && !fx.done("replace") {
                    fx.record("replace")?;
                }
            }
        } else if let Some(job) = guard.as_ref() {
            // Unanswered, the connection closes with the job and the server rolls it back.
            let _ = tokio::time::timeout(t, job.client.batch_execute("ROLLBACK")).await;
            if job.prepares {
                // The DDL rolled back with the job: the next statement prepares again.
                *self.prepared.lock().await = false;
            }
        }
        *guard = None;
        Ok(())
    }
}

fn outcome_text(o: Outcome) -> String {
    match o {
        Outcome::Fatal { reason } | Outcome::Retry { reason, .. } => reason,
        _ => "the table could not be prepared".into(),
    }
}
