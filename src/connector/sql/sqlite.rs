//! Writing SQLite databases: prepared, batched `INSERT`s in a transaction per request (or one
//! for the whole statement), through rusqlite on tokio's blocking pool. SQLite has one writer at
//! a time, so requests take turns on one connection. A row the database refuses (a constraint)
//! goes to dead letters with SQLite's message and the rest of the request commits.
//!
//! As with PostgreSQL (see `pg.rs`), each transaction records its delivery token in the delivery
//! table first, so a request sent again is applied once, and the table's DDL runs inside the
//! first transaction, so a failed statement leaves the file as it was. An attempt that outlives
//! the sink's `timeout` is interrupted (`sqlite3_interrupt`) and waited for before the next one;
//! a lock held by another process is waited for at most `timeout` (SQLite's busy timeout).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use arrow::datatypes::{DataType, Float64Type, Int64Type, SchemaRef};
use arrow::json::writer::{EncoderOptions, make_encoder};
use async_trait::async_trait;
use rusqlite::OptionalExtension;
use rusqlite::types::ValueRef;

use super::{Create, Mode, WriteSpec};
use crate::error::{Error, Result};
use crate::sink::{Attempt, Effects, Outcome, SinkBackend};

/// The SQLite type flumen creates for an Arrow type. Decimals, dates and timestamps are TEXT
/// (exact digits; ISO-8601, which sorts and compares correctly), booleans 0/1, lists and
/// structs JSON text.
pub fn type_for(t: &DataType) -> Option<&'static str> {
    Some(match t {
        t if t.is_integer() => "INTEGER",
        DataType::Boolean => "INTEGER",
        t if t.is_floating() => "REAL",
        DataType::Binary | DataType::LargeBinary | DataType::BinaryView | DataType::FixedSizeBinary(_) => {
            "BLOB"
        }
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View | DataType::Dictionary(..) => "TEXT",
        DataType::Decimal32(..)
        | DataType::Decimal64(..)
        | DataType::Decimal128(..)
        | DataType::Decimal256(..) => "TEXT",
        DataType::Date32
        | DataType::Date64
        | DataType::Time32(_)
        | DataType::Time64(_)
        | DataType::Timestamp(..) => "TEXT",
        DataType::List(_)
        | DataType::LargeList(_)
        | DataType::FixedSizeList(..)
        | DataType::Struct(_)
        | DataType::Map(..) => "TEXT",
        _ => return None,
    })
}

/// The SQLite writer.
pub struct SqliteBackend {
    path: String,
    spec: WriteSpec,
    schema: SchemaRef,
    shared: Arc<Shared>,
    /// The sink's timeout (also SQLite's wait for another writer's lock).
    timeout: Duration,
}

impl std::fmt::Debug for SqliteBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteBackend")
            .field("table", &self.spec.table)
            .finish()
    }
}

/// What the blocking tasks share: the one connection and what it has done.
#[derive(Default)]
struct Shared {
    conn: Mutex<Option<rusqlite::Connection>>,
    /// Interrupts the statement running on `conn` (taken without waiting for `conn`).
    interrupt: Mutex<Option<rusqlite::InterruptHandle>>,
    state: Mutex<ConnState>,
}

#[derive(Default)]
struct ConnState {
    /// The table is prepared (`create`).
    prepared: bool,
    /// The job's transaction is open on the connection.
    in_job: bool,
    /// The job's transaction prepares the table.
    job_prepares: bool,
    /// An earlier attempt of this run committed the job.
    committed_before: bool,
}
/// Columns as SQLite binds them.
enum Col {
    Int(ArrayRef),
    Real(ArrayRef),
    Text(ArrayRef),
    Blob(ArrayRef),
}

pub struct SqliteRequest {
    cols: Vec<Col>,
    rows: usize,
    bytes: usize,
}

fn column(a: &ArrayRef, name: &str) -> Result<Col> {
    let cast = |to: DataType| -> Result<ArrayRef> {
        let out = arrow::compute::cast(a, &to)
            .map_err(|e| Error::Config(format!("column {name}: {} cannot be written: {e}", a.data_type())))?;
        if out.null_count() != a.null_count() {
            let row = (0..a.len())
                .find(|r| a.is_valid(*r) && out.is_null(*r))
                .unwrap_or(0);
            return Err(Error::Config(format!(
                "column {name} row {}: the value does not fit a 64-bit SQLite integer",
                row + 1
            )));
        }
        Ok(out)
    };
    Ok(match a.data_type() {
        t if t.is_integer() || *t == DataType::Boolean => Col::Int(cast(DataType::Int64)?),
        t if t.is_floating() => Col::Real(cast(DataType::Float64)?),
        DataType::Binary | DataType::LargeBinary | DataType::BinaryView | DataType::FixedSizeBinary(_) => {
            Col::Blob(cast(DataType::Binary)?)
        }
        DataType::List(_)
        | DataType::LargeList(_)
        | DataType::FixedSizeList(..)
        | DataType::Struct(_)
        | DataType::Map(..) => {
            let f = Arc::new(arrow::datatypes::Field::new(name, a.data_type().clone(), true));
            let opts = EncoderOptions::default();
            let mut enc = make_encoder(&f, a.as_ref(), &opts)?;
            let mut b = arrow::array::StringBuilder::new();
            let mut buf = Vec::new();
            for r in 0..a.len() {
                if a.is_null(r) {
                    b.append_null();
                } else {
                    buf.clear();
                    enc.encode(r, &mut buf);
                    b.append_value(String::from_utf8_lossy(&buf));
                }
            }
            Col::Text(Arc::new(b.finish()))
        }
        DataType::Timestamp(..) => {
            // ISO-8601 with a space, as SQLite's date functions read it.
            let t = cast(DataType::Utf8)?;
            let t = t.as_string::<i32>();
            Col::Text(Arc::new(
                t.iter()
                    .map(|v| v.map(|s| s.replacen('T', " ", 1)))
                    .collect::<arrow::array::StringArray>(),
            ))
        }
        _ => Col::Text(cast(DataType::Utf8)?),
    })
}

fn value(c: &Col, row: usize) -> ValueRef<'_> {
    let (a, v) = match c {
        Col::Int(a) | Col::Real(a) | Col::Text(a) | Col::Blob(a) => (a, c),
    };
    if a.is_null(row) {
        return ValueRef::Null;
    }
    match v {
        Col::Int(a) => ValueRef::Integer(a.as_primitive::<Int64Type>().value(row)),
        Col::Real(a) => ValueRef::Real(a.as_primitive::<Float64Type>().value(row)),
        Col::Text(a) => ValueRef::Text(a.as_string::<i32>().value(row).as_bytes()),
        Col::Blob(a) => ValueRef::Blob(a.as_binary::<i32>().value(row)),
    }
}

/// Opens the database file (created if missing); a lock held by another connection is waited
/// for at most `busy`.
pub fn open(path: &str, busy: Duration) -> std::result::Result<rusqlite::Connection, rusqlite::Error> {
    let c = rusqlite::Connection::open(path)?;
    c.busy_timeout(busy)?;
    Ok(c)
}

fn busy(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

/// A failed statement: a lock or an interrupt may go away, anything else will not.
fn fail(e: rusqlite::Error) -> Outcome {
    if busy(&e) || e.sqlite_error_code() == Some(rusqlite::ErrorCode::OperationInterrupted) {
        Outcome::Retry {
            reason: e.to_string(),
            after: None,
        }
    } else {
        Outcome::Fatal {
            reason: e.to_string(),
        }
    }
}

impl SqliteBackend {
    /// A writer of `spec` into the database file at `path`.
    pub fn new(path: String, spec: WriteSpec, schema: SchemaRef, timeout: Duration) -> Self {
        Self {
            path,
            spec,
            schema,
            shared: Arc::default(),
            timeout,
        }
    }

    fn d(&self) -> super::dialect::Dialect {
        super::dialect::Dialect::Sqlite
    }

    pub fn create_sql(&self) -> Result<String> {
        let mut cols = Vec::new();
        for f in self.schema.fields() {
            let ty = type_for(f.data_type()).ok_or_else(|| {
                Error::Config(format!(
                    "column {}: Arrow type {} has no SQLite type; cast it in the query",
                    f.name(),
                    f.data_type()
                ))
            })?;
            let null = if f.is_nullable() { "" } else { " NOT NULL" };
            cols.push(format!("{} {ty}{null}", self.d().ident(f.name())));
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

    fn insert_sql(&self) -> String {
        let d = self.d();
        let cols: Vec<String> = self.schema.fields().iter().map(|f| d.ident(f.name())).collect();
        let marks = vec!["?"; cols.len()].join(", ");
        let mut sql = format!(
            "INSERT INTO {} ({}) VALUES ({marks})",
            self.spec.table,
            cols.join(", ")
        );
        if let Mode::Upsert(keys) = &self.spec.mode {
            let k = keys.iter().map(|k| d.ident(k)).collect::<Vec<_>>().join(", ");
            let set: Vec<String> = self
                .schema
                .fields()
                .iter()
                .filter(|f| !keys.contains(f.name()))
                .map(|f| format!("{0} = excluded.{0}", d.ident(f.name())))
                .collect();
            if set.is_empty() {
                sql.push_str(&format!(" ON CONFLICT ({k}) DO NOTHING"));
            } else {
                sql.push_str(&format!(" ON CONFLICT ({k}) DO UPDATE SET {}", set.join(", ")));
            }
        }
        sql
    }

    /// The token that records this run's replace of the table in the delivery table.
    fn replace_token(&self, fx: &Effects) -> String {
        format!(
            "{}/replace/{:016x}",
            fx.run_id(),
            xxhash_rust::xxh3::xxh3_64(self.spec.name.as_bytes())
        )
    }

    /// Runs `f` with the connection on the blocking pool, within `timeout`: past it, the
    /// statement running is interrupted and waited for, so no attempt outlives its turn.
    async fn with_conn<T: Send + 'static>(
        &self,
        timeout: Duration,
        f: impl FnOnce(&mut rusqlite::Connection, &mut ConnState) -> std::result::Result<T, Outcome>
        + Send
        + 'static,
    ) -> std::result::Result<T, Outcome> {
        let shared = Arc::clone(&self.shared);
        let path = self.path.clone();
        fn poisoned<E>(_: E) -> Outcome {
            Outcome::Fatal {
                reason: "writer state".into(),
            }
        }
        let mut task = tokio::task::spawn_blocking(move || {
            let mut guard = shared.conn.lock().map_err(poisoned)?;
            if guard.is_none() {
                let c = open(&path, timeout).map_err(|e| Outcome::Fatal {
                    reason: format!("cannot open {path}: {e}"),
                })?;
                *shared.interrupt.lock().map_err(poisoned)? = Some(c.get_interrupt_handle());
                *guard = Some(c);
            }
            let c = guard.as_mut().ok_or_else(|| Outcome::Fatal {
                reason: "no connection".into(),
            })?;
            let mut st = shared.state.lock().map_err(poisoned)?;
            f(c, &mut st)
        });
        let joined = match tokio::time::timeout(timeout, &mut task).await {
            Ok(j) => j,
            Err(_) => {
                if let Ok(Some(h)) = self.shared.interrupt.lock().as_deref() {
                    h.interrupt();
                }
                // Settled: the interrupted statement has returned and its transaction is
                // rolled back before anything else runs on the connection.
                let _ = task.await;
                return Err(Outcome::Retry {
                    reason: format!("no answer within {timeout:?} (the statement was interrupted)"),
                    after: None,
                });
            }
        };
        joined.map_err(|e| Outcome::Fatal {
            reason: format!("the writer task failed: {e}"),
        })?
    }

    /// What a transaction runs before its rows: the delivery table and the token (`false`:
    /// an earlier attempt committed it), then the table's DDL when it is not prepared yet.
    fn begin(
        c: &rusqlite::Connection,
        st: &ConnState,
        plan: &Plan,
        token: &str,
    ) -> std::result::Result<bool, Outcome> {
        if let Some(t) = &plan.deliveries {
            c.execute_batch(&format!(
                "CREATE TABLE IF NOT EXISTS {t} (token TEXT PRIMARY KEY, target TEXT NOT NULL, \
                 delivered_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP)"
            ))
            .map_err(fail)?;
            let n = c
                .execute(
                    &format!("INSERT OR IGNORE INTO {t} (token, target) VALUES (?1, ?2)"),
                    (token, &plan.table),
                )
                .map_err(fail)?;
            if n == 0 {
                return Ok(false);
            }
        }
        if !st.prepared {
            Self::ddl(c, plan)?;
        }
        Ok(true)
    }

    /// The table's DDL: created if missing, or (replace) dropped and created unless this run
    /// did so already.
    fn ddl(c: &rusqlite::Connection, plan: &Plan) -> std::result::Result<(), Outcome> {
        let fatal = |e: rusqlite::Error| Outcome::Fatal {
            reason: format!("creating {}: {e}", plan.table),
        };
        let Some(create) = &plan.create else {
            return Ok(());
        };
        let mut replace = plan.replace && !plan.replaced;
        if replace && let Some(t) = &plan.deliveries {
            let before: Option<i64> = c
                .query_row(
                    &format!("SELECT 1 FROM {t} WHERE token = ?1"),
                    [&plan.replace_token],
                    |r| r.get(0),
                )
                .optional()
                .map_err(fail)?;
            replace = before.is_none();
        }
        if replace {
            c.execute_batch(&format!("DROP TABLE IF EXISTS {}", plan.table))
                .map_err(fatal)?;
            if let Some(t) = &plan.deliveries {
                c.execute(
                    &format!("INSERT OR IGNORE INTO {t} (token, target) VALUES (?1, ?2)"),
                    (&plan.replace_token, &plan.table),
                )
                .map_err(fail)?;
            }
        }
        c.execute_batch(create).map_err(fatal)
    }

    /// What the blocking side needs to know of the target.
    fn plan(&self, fx: &Effects) -> std::result::Result<Plan, Outcome> {
        let create = match self.spec.create {
            Create::Never => None,
            _ => Some(self.create_sql().map_err(|e| Outcome::Fatal {
                reason: e.to_string(),
            })?),
        };
        Ok(Plan {
            table: self.spec.table.clone(),
            create,
            replace: self.spec.create == Create::Replace,
            replaced: fx.done("replace"),
            replace_token: self.replace_token(fx),
            deliveries: self.spec.deliveries.clone(),
            insert: self.insert_sql(),
            job: self.spec.job,
            overwrite: self.spec.mode == Mode::Overwrite,
            job_token: fx.statement_token(),
            repeatable: fx.input_repeatable(),
            effects: fx.clone(),
        })
    }
}

/// The target as the blocking side writes it.
struct Plan {
    table: String,
    create: Option<String>,
    replace: bool,
    /// The run's journal says the replace is done.
    replaced: bool,
    replace_token: String,
    deliveries: Option<String>,
    insert: String,
    job: bool,
    overwrite: bool,
    job_token: String,
    /// The statement reads the same rows in a replay (see `Effects::input_repeatable`).
    repeatable: bool,
    effects: Effects,
}

impl Plan {
    /// Records the replace in the run's journal once the transaction that did it committed,
    /// before the connection is given to the next request.
    fn replaced(&self) -> std::result::Result<(), Outcome> {
        // After the COMMIT: the rows are in, whatever the journal says; the delivery table
        // keeps the replace too.
        if self.replace
            && !self.effects.done("replace")
            && let Err(e) = self.effects.record("replace")
        {
            tracing::error!(table = %self.table, "recording the replace in the journal: {e}");
        }
        Ok(())
    }
}

impl Plan {
    /// Opens the job's transaction if it is not open: its token recorded (or found), the table
    /// prepared, emptied for `overwrite`.
    fn open_job(&self, c: &rusqlite::Connection, st: &mut ConnState) -> std::result::Result<(), Outcome> {
        if st.in_job || st.committed_before {
            return Ok(());
        }
        c.execute_batch("BEGIN IMMEDIATE").map_err(fail)?;
        let prepares = !st.prepared;
        match SqliteBackend::begin(c, st, self, &self.job_token) {
            Ok(true) => {}
            Ok(false) if self.repeatable => {
                let _ = c.execute_batch("ROLLBACK");
                st.committed_before = true;
                return Ok(());
            }
            Ok(false) => {
                // Committed by an earlier attempt, but its input (incremental, a broker) may
                // hold more now: loaded again, at least once.
                tracing::warn!(
                    table = %self.table,
                    "an earlier attempt of this run committed this write, but its input may have changed since: it is loaded again"
                );
                if !st.prepared
                    && let Err(o) = SqliteBackend::ddl(c, self)
                {
                    let _ = c.execute_batch("ROLLBACK");
                    return Err(o);
                }
            }
            Err(o) => {
                let _ = c.execute_batch("ROLLBACK");
                return Err(o);
            }
        }
        if self.overwrite
            && let Err(e) = c.execute_batch(&format!("DELETE FROM {}", self.table))
        {
            let _ = c.execute_batch("ROLLBACK");
            return Err(fail(e));
        }
        st.in_job = true;
        st.job_prepares = prepares;
        st.prepared = true;
        Ok(())
    }
}

#[async_trait]
impl SinkBackend for SqliteBackend {
    type Request = SqliteRequest;

    fn schema(&self) -> SchemaRef {
        SchemaRef::clone(&self.schema)
    }

    fn encode(&self, batch: &RecordBatch) -> Result<SqliteRequest> {
        if self.spec.table.is_empty() {
            return Err(Error::Config(
                "a table defined by 'query' is read-only; name a 'table' to write".into(),
            ));
        }
        let cols = batch
            .columns()
            .iter()
            .zip(self.schema.fields())
            .map(|(a, f)| column(a, f.name()))
            .collect::<Result<Vec<_>>>()?;
        Ok(SqliteRequest {
            cols,
            rows: batch.num_rows(),
            bytes: batch.get_array_memory_size(),
        })
    }

    fn request_bytes(&self, r: &SqliteRequest) -> usize {
        r.bytes
    }

    fn describe(&self) -> String {
        format!(
            "SQLITE {} mode={} transaction={}; {}",
            self.spec.table,
            self.spec.mode.name(),
            if self.spec.job { "job" } else { "batch" },
            self.insert_sql()
        )
    }

    /// One writer at a time: SQLite has one, and an attempt's timeout must not run while it
    /// waits for another request's turn.
    fn serial(&self) -> bool {
        true
    }

    fn all_or_nothing(&self) -> bool {
        self.spec.job
    }

    fn modes(&self) -> &'static [&'static str] {
        &["append", "overwrite", "upsert"]
    }

    async fn send(&self, req: &SqliteRequest, a: &Attempt<'_>) -> Outcome {
        let plan = match self.plan(a.effects) {
            Ok(p) => p,
            Err(o) => return o,
        };
        // The request is moved into the blocking task as shared columns (cheap clones).
        let cols: Vec<Col> = req
            .cols
            .iter()
            .map(|c| match c {
                Col::Int(a) => Col::Int(Arc::clone(a)),
                Col::Real(a) => Col::Real(Arc::clone(a)),
                Col::Text(a) => Col::Text(Arc::clone(a)),
                Col::Blob(a) => Col::Blob(Arc::clone(a)),
            })
            .collect();
        let rows = req.rows;
        let token = a.token.to_string();
        let job = plan.job;
        let r = self
            .with_conn(a.timeout, move |c, st| {
                if job {
                    plan.open_job(c, st)?;
                    if st.committed_before {
                        return Ok(Vec::new());
                    }
                } else {
                    c.execute_batch("BEGIN IMMEDIATE").map_err(fail)?;
                    match SqliteBackend::begin(c, st, &plan, &token) {
                        Ok(true) => {}
                        Ok(false) => {
                            let _ = c.execute_batch("ROLLBACK");
                            return Ok(Vec::new());
                        }
                        Err(o) => {
                            let _ = c.execute_batch("ROLLBACK");
                            return Err(o);
                        }
                    }
                }
                let mut rejected = Vec::new();
                let result = (|| {
                    let mut stmt = c.prepare_cached(&plan.insert).map_err(fail)?;
                    for row in 0..rows {
                        for (i, col) in cols.iter().enumerate() {
                            stmt.raw_bind_parameter(
                                i + 1,
                                rusqlite::types::ToSqlOutput::Borrowed(value(col, row)),
                            )
                            .map_err(fail)?;
                        }
                        if let Err(e) = stmt.raw_execute() {
                            if job
                                || busy(&e)
                                || e.sqlite_error_code() != Some(rusqlite::ErrorCode::ConstraintViolation)
                            {
                                return Err(fail(e));
                            }
                            rejected.push((row, format!("row {}: {e}", row + 1)));
                        }
                    }
                    Ok(())
                })();
                match result {
                    Ok(()) if job => Ok(rejected),
                    Ok(()) => {
                        c.execute_batch("COMMIT").map_err(fail)?;
                        if !st.prepared {
                            plan.replaced()?;
                        }
                        st.prepared = true;
                        Ok(rejected)
                    }
                    Err(o) if job => Err(match o {
                        Outcome::Fatal { reason } | Outcome::Retry { reason, .. } => Outcome::Fatal {
                            reason: format!("{reason} (the transaction is rolled back)"),
                        },
                        other => other,
                    }),
                    Err(o) => {
                        let _ = c.execute_batch("ROLLBACK");
                        Err(o)
                    }
                }
            })
            .await;
        let r = match r {
            // In a job, an interrupted statement leaves the transaction to be rolled back.
            Err(Outcome::Retry { reason, .. }) if job => {
                return Outcome::Fatal {
                    reason: format!("{reason} (the transaction is rolled back)"),
                };
            }
            r => r,
        };
        match r {
            Ok(rejected) => {
                if rejected.is_empty() {
                    Outcome::Delivered
                } else {
                    Outcome::Partial {
                        rejected,
                        retry: vec![],
                    }
                }
            }
            Err(o) => o,
        }
    }

    async fn finish(&self, ok: bool, fx: &Effects) -> Result<()> {
        let plan = self.plan(fx).map_err(outcome_error)?;
        let job = plan.job;
        self.with_conn(self.timeout, move |c, st| {
            if !ok {
                // Nothing runs but the rollback of an open job: no DDL on a failure.
                if st.in_job {
                    let _ = c.execute_batch("ROLLBACK");
                    st.in_job = false;
                    if st.job_prepares {
                        st.prepared = false;
                    }
                }
                st.committed_before = false;
                return Ok(());
            }
            if job {
                plan.open_job(c, st)?;
                let open = std::mem::replace(&mut st.in_job, false);
                st.committed_before = false;
                if open {
                    if let Err(e) = c.execute_batch("COMMIT") {
                        let _ = c.execute_batch("ROLLBACK");
                        if st.job_prepares {
                            st.prepared = false;
                        }
                        return Err(Outcome::Fatal {
                            reason: format!("COMMIT failed: {e}"),
                        });
                    }
                    if st.job_prepares {
                        plan.replaced()?;
                    }
                }
                return Ok(());
            }
            if st.prepared {
                return Ok(());
            }
            // No request was sent: the table is still owed its DDL.
            c.execute_batch("BEGIN IMMEDIATE").map_err(fail)?;
            let done = SqliteBackend::ddl(c, &plan).and_then(|()| c.execute_batch("COMMIT").map_err(fail));
            if let Err(o) = done {
                let _ = c.execute_batch("ROLLBACK");
                return Err(o);
            }
            plan.replaced()?;
            st.prepared = true;
            Ok(())
        })
        .await
        .map_err(outcome_error)
    }
}

fn outcome_error(o: Outcome) -> Error {
    match o {
        Outcome::Fatal { reason } | Outcome::Retry { reason, .. } => Error::Config(reason),
        _ => Error::Config("finishing the write failed".into()),
    }
}
