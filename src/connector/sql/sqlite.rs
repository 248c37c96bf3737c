//! Writing SQLite databases: prepared, batched `INSERT`s in a transaction per request (or one
//! for the whole statement), through rusqlite on tokio's blocking pool. SQLite has one writer at
//! a time, so requests take turns on one connection. A row the database refuses (a constraint)
//! goes to dead letters with SQLite's message and the rest of the request commits.

use std::sync::{Arc, Mutex};

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use arrow::datatypes::{DataType, Float64Type, Int64Type, SchemaRef};
use arrow::json::writer::{EncoderOptions, make_encoder};
use async_trait::async_trait;
use rusqlite::types::ValueRef;

use super::{Create, Mode, WriteSpec};
use crate::error::{Error, Result};
use crate::sink::{Outcome, SinkBackend};

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
    pub path: String,
    pub spec: WriteSpec,
    pub schema: SchemaRef,
    pub conn: Arc<Mutex<Option<rusqlite::Connection>>>,
    /// Whether the job's transaction is open on `conn`.
    pub in_job: Arc<Mutex<bool>>,
    pub prepared: Arc<Mutex<bool>>,
}

impl std::fmt::Debug for SqliteBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteBackend")
            .field("table", &self.spec.table)
            .finish()
    }
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

/// Opens the database file (created if missing).
pub fn open(path: &str) -> std::result::Result<rusqlite::Connection, rusqlite::Error> {
    let c = rusqlite::Connection::open(path)?;
    c.busy_timeout(std::time::Duration::from_secs(30))?;
    Ok(c)
}

impl SqliteBackend {
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

    /// Runs `f` with the connection (opened, table prepared) on the blocking pool.
    async fn with_conn<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut rusqlite::Connection, &mut bool) -> std::result::Result<T, Outcome> + Send + 'static,
    ) -> std::result::Result<T, Outcome> {
        let conn = Arc::clone(&self.conn);
        let in_job = Arc::clone(&self.in_job);
        let prepared = Arc::clone(&self.prepared);
        let path = self.path.clone();
        let create = match self.spec.create {
            Create::Never => None,
            Create::IfNotExists => Some(self.create_sql().map_err(|e| Outcome::Fatal {
                reason: e.to_string(),
            })?),
            Create::Replace => Some(format!(
                "DROP TABLE IF EXISTS {};\n{}",
                self.spec.table,
                self.create_sql().map_err(|e| Outcome::Fatal {
                    reason: e.to_string()
                })?
            )),
        };
        let job = self.spec.job;
        let overwrite = self.spec.mode == Mode::Overwrite;
        let table = self.spec.table.clone();
        tokio::task::spawn_blocking(move || {
            let state = |_| Outcome::Fatal {
                reason: "writer state".into(),
            };
            let mut guard = conn.lock().map_err(state)?;
            let mut in_job = in_job.lock().map_err(|_| Outcome::Fatal {
                reason: "writer state".into(),
            })?;
            if guard.is_none() {
                *guard = Some(open(&path).map_err(|e| Outcome::Fatal {
                    reason: format!("cannot open {path}: {e}"),
                })?);
            }
            let c = guard.as_mut().ok_or_else(|| Outcome::Fatal {
                reason: "no connection".into(),
            })?;
            let mut prepared = prepared.lock().map_err(|_| Outcome::Fatal {
                reason: "writer state".into(),
            })?;
            if !*prepared {
                if let Some(sql) = &create {
                    c.execute_batch(sql).map_err(|e| Outcome::Fatal {
                        reason: format!("creating {table}: {e}"),
                    })?;
                }
                *prepared = true;
            }
            if job && !*in_job {
                c.execute_batch("BEGIN IMMEDIATE").map_err(|e| Outcome::Fatal {
                    reason: e.to_string(),
                })?;
                if overwrite {
                    c.execute_batch(&format!("DELETE FROM {table}"))
                        .map_err(|e| Outcome::Fatal {
                            reason: e.to_string(),
                        })?;
                }
                *in_job = true;
            }
            f(c, &mut in_job)
        })
        .await
        .map_err(|e| Outcome::Fatal {
            reason: format!("the writer task failed: {e}"),
        })?
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

    fn all_or_nothing(&self) -> bool {
        self.spec.job
    }

    fn modes(&self) -> &'static [&'static str] {
        &["append", "overwrite", "upsert"]
    }

    async fn send(&self, req: &SqliteRequest, _token: &str) -> Outcome {
        let sql = self.insert_sql();
        let job = self.spec.job;
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
        let r = self
            .with_conn(move |c, _| {
                let busy = |e: &rusqlite::Error| {
                    matches!(
                        e.sqlite_error_code(),
                        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
                    )
                };
                let fail = |e: rusqlite::Error| {
                    if busy(&e) {
                        Outcome::Retry {
                            reason: e.to_string(),
                            after: None,
                        }
                    } else {
                        Outcome::Fatal {
                            reason: e.to_string(),
                        }
                    }
                };
                if !job {
                    c.execute_batch("BEGIN IMMEDIATE").map_err(fail)?;
                }
                let mut rejected = Vec::new();
                let result = (|| {
                    let mut st = c.prepare_cached(&sql).map_err(fail)?;
                    for row in 0..rows {
                        for (i, col) in cols.iter().enumerate() {
                            st.raw_bind_parameter(
                                i + 1,
                                rusqlite::types::ToSqlOutput::Borrowed(value(col, row)),
                            )
                            .map_err(fail)?;
                        }
                        if let Err(e) = st.raw_execute() {
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
                    Ok(()) => {
                        if !job {
                            c.execute_batch("COMMIT").map_err(fail)?;
                        }
                        Ok(rejected)
                    }
                    Err(o) => {
                        if !job {
                            let _ = c.execute_batch("ROLLBACK");
                        }
                        Err(o)
                    }
                }
            })
            .await;
        match r {
            Ok(rejected) if rejected.is_empty() => Outcome::Delivered,
            Ok(rejected) => Outcome::Partial {
                rejected,
                retry: vec![],
            },
            Err(o) => o,
        }
    }

    async fn finish(&self, ok: bool) -> Result<()> {
        if !ok && !self.spec.job {
            return Ok(());
        }
        let job = self.spec.job;
        self.with_conn(move |c, in_job| {
            if job && *in_job {
                let sql = if ok { "COMMIT" } else { "ROLLBACK" };
                c.execute_batch(sql).map_err(|e| Outcome::Fatal {
                    reason: format!("{sql} failed: {e}"),
                })?;
                *in_job = false;
            }
            Ok(())
        })
        .await
        .map_err(|o| match o {
            Outcome::Fatal { reason } | Outcome::Retry { reason, .. } => Error::Config(reason),
            _ => Error::Config("finishing the write failed".into()),
        })
    }
}
