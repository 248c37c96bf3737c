//! Writing MySQL/MariaDB tables: `LOAD DATA LOCAL INFILE` fed from memory (flumen's own
//! tab-separated encoding of the Arrow columns, binary as hex through `UNHEX`), in a
//! transaction per request or one for the statement. Where the server refuses local infile,
//! multi-row `INSERT`s instead, with a warning saying so.
//!
//! `LOAD DATA LOCAL` turns bad values into warnings (a truncated string, '' as 0) instead of
//! errors. flumen does not let that pass: a load with warnings is rolled back, and the rows the
//! warnings name go to dead letters with the server's words while the rest are sent again.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use arrow::datatypes::{DataType, Float32Type, Float64Type, SchemaRef};
use arrow::json::writer::{EncoderOptions, make_encoder};
use async_trait::async_trait;
use mysql::prelude::Queryable;

use super::cx::Conn;
use super::dialect::Dialect;
use super::{Create, Mode, WriteSpec};
use crate::error::{Error, Result};
use crate::sink::{Outcome, SinkBackend};

/// The MySQL type flumen creates for an Arrow type; `key`: the column is part of a key (strings
/// then need a length).
pub fn type_for(t: &DataType, key: bool) -> Option<String> {
    Some(
        match t {
            DataType::Int8 => "TINYINT",
            DataType::Int16 => "SMALLINT",
            DataType::Int32 => "INT",
            DataType::Int64 => "BIGINT",
            DataType::UInt8 => "TINYINT UNSIGNED",
            DataType::UInt16 => "SMALLINT UNSIGNED",
            DataType::UInt32 => "INT UNSIGNED",
            DataType::UInt64 => "BIGINT UNSIGNED",
            DataType::Float16 | DataType::Float32 => "FLOAT",
            DataType::Float64 => "DOUBLE",
            DataType::Decimal32(p, s)
            | DataType::Decimal64(p, s)
            | DataType::Decimal128(p, s)
            | DataType::Decimal256(p, s) => {
                // MySQL's DECIMAL holds 65 digits, 30 after the point.
                if *p > 65 || *s > 30 || *s < 0 {
                    return None;
                }
                return Some(format!("DECIMAL({p}, {s})"));
            }
            DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View | DataType::Dictionary(..) => {
                if key {
                    "VARCHAR(255)"
                } else {
                    "LONGTEXT"
                }
            }
            DataType::Binary
            | DataType::LargeBinary
            | DataType::BinaryView
            | DataType::FixedSizeBinary(_) => {
                if key {
                    "VARBINARY(255)"
                } else {
                    "LONGBLOB"
                }
            }
            DataType::Boolean => "BOOLEAN",
            DataType::Date32 | DataType::Date64 => "DATE",
            DataType::Time32(_) | DataType::Time64(_) => "TIME(6)",
            DataType::Timestamp(..) => "DATETIME(6)",
            DataType::List(_)
            | DataType::LargeList(_)
            | DataType::FixedSizeList(..)
            | DataType::Struct(_)
            | DataType::Map(..) => "JSON",
            _ => return None,
        }
        .to_string(),
    )
}

/// The MySQL writer.
pub struct MySqlBackend {
    opts: mysql::Opts,
    spec: WriteSpec,
    schema: SchemaRef,
    conns: Arc<Mutex<Vec<mysql::Conn>>>,
    job: Arc<Mutex<Option<mysql::Conn>>>,
    prepared: Arc<Mutex<bool>>,
    /// Set once the server refused local infile: multi-row INSERTs from then on.
    no_infile: Arc<AtomicBool>,
    seq: AtomicU64,
}

impl std::fmt::Debug for MySqlBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MySqlBackend")
            .field("table", &self.spec.table)
            .finish()
    }
}

/// One request: the rows as tab-separated lines (`\N` for NULL), and as the VALUES of a
/// multi-row INSERT is built only if needed (from the same batch).
pub struct MySqlRequest {
    tsv: Arc<Vec<u8>>,
    batch: RecordBatch,
}

/// Values as text, per column.
enum Col {
    Text(ArrayRef),
    Hex(ArrayRef),
    Json(ArrayRef),
    F32(ArrayRef),
    F64(ArrayRef),
}

fn columns(batch: &RecordBatch) -> Result<Vec<Col>> {
    batch
        .columns()
        .iter()
        .zip(batch.schema().fields())
        .map(|(a, f)| {
            Ok(match a.data_type() {
                DataType::Binary
                | DataType::LargeBinary
                | DataType::BinaryView
                | DataType::FixedSizeBinary(_) => Col::Hex(arrow::compute::cast(a, &DataType::Binary)?),
                DataType::List(_)
                | DataType::LargeList(_)
                | DataType::FixedSizeList(..)
                | DataType::Struct(_)
                | DataType::Map(..) => Col::Json(Arc::clone(a)),
                DataType::Float32 => Col::F32(Arc::clone(a)),
                DataType::Float64 | DataType::Float16 => {
                    Col::F64(arrow::compute::cast(a, &DataType::Float64)?)
                }
                DataType::Boolean => Col::Text(arrow::compute::cast(
                    &arrow::compute::cast(a, &DataType::Int8)?,
                    &DataType::Utf8,
                )?),
                DataType::Timestamp(..) => {
                    // DATETIME text: UTC, a space between date and time.
                    let t = arrow::compute::cast(
                        a,
                        &DataType::Timestamp(arrow::datatypes::TimeUnit::Microsecond, None),
                    )?;
                    let t = arrow::compute::cast(&t, &DataType::Utf8)?;
                    let s = t.as_string::<i32>();
                    Col::Text(Arc::new(
                        s.iter()
                            .map(|v| v.map(|v| v.replacen('T', " ", 1)))
                            .collect::<arrow::array::StringArray>(),
                    ))
                }
                _ => Col::Text(arrow::compute::cast(a, &DataType::Utf8).map_err(|e| {
                    Error::Config(format!(
                        "column {}: {} cannot be written: {e}",
                        f.name(),
                        a.data_type()
                    ))
                })?),
            })
        })
        .collect()
}

/// Writes value `row` of a column as text into `out`: `Err` names what cannot be stored.
fn text(c: &Col, row: usize, out: &mut String, json: &mut Vec<u8>, name: &str) -> Result<()> {
    match c {
        Col::Text(a) => out.push_str(a.as_string::<i32>().value(row)),
        Col::Hex(a) => {
            for b in a.as_binary::<i32>().value(row) {
                let _ = write!(out, "{b:02x}");
            }
        }
        Col::F32(a) | Col::F64(a) => {
            let v = match c {
                Col::F32(_) => f64::from(a.as_primitive::<Float32Type>().value(row)),
                _ => a.as_primitive::<Float64Type>().value(row),
            };
            if !v.is_finite() {
                return Err(Error::Config(format!(
                    "column {name} row {}: {v} cannot be stored in MySQL",
                    row + 1
                )));
            }
            let _ = write!(out, "{v:?}");
        }
        Col::Json(a) => {
            json.clear();
            let f = Arc::new(arrow::datatypes::Field::new(name, a.data_type().clone(), true));
            let opts = EncoderOptions::default();
            let mut enc = make_encoder(&f, a.as_ref(), &opts)?;
            enc.encode(row, json);
            out.push_str(&String::from_utf8_lossy(json));
        }
    }
    Ok(())
}

fn col_array(c: &Col) -> &ArrayRef {
    match c {
        Col::Text(a) | Col::Hex(a) | Col::Json(a) | Col::F32(a) | Col::F64(a) => a,
    }
}

/// The batch as LOAD DATA lines.
fn tsv(batch: &RecordBatch) -> Result<Vec<u8>> {
    let cols = columns(batch)?;
    let schema = batch.schema();
    let mut out = Vec::with_capacity(batch.get_array_memory_size() + batch.num_rows() * 4);
    let (mut v, mut json) = (String::new(), Vec::new());
    for row in 0..batch.num_rows() {
        for (i, c) in cols.iter().enumerate() {
            if i > 0 {
                out.push(b'\t');
            }
            if col_array(c).is_null(row) {
                out.extend_from_slice(b"\\N");
                continue;
            }
            v.clear();
            text(c, row, &mut v, &mut json, schema.field(i).name())?;
            for b in v.bytes() {
                match b {
                    b'\\' => out.extend_from_slice(b"\\\\"),
                    b'\t' => out.extend_from_slice(b"\\t"),
                    b'\n' => out.extend_from_slice(b"\\n"),
                    b'\r' => out.extend_from_slice(b"\\r"),
                    0 => out.extend_from_slice(b"\\0"),
                    b => out.push(b),
                }
            }
        }
        out.push(b'\n');
    }
    Ok(out)
}

/// The batch as the VALUES of one multi-row INSERT.
fn values(batch: &RecordBatch) -> Result<String> {
    let cols = columns(batch)?;
    let schema = batch.schema();
    let d = Dialect::MySql;
    let mut out = String::new();
    let (mut v, mut json) = (String::new(), Vec::new());
    for row in 0..batch.num_rows() {
        out.push_str(if row == 0 { "(" } else { ",(" });
        for (i, c) in cols.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            if col_array(c).is_null(row) {
                out.push_str("NULL");
                continue;
            }
            v.clear();
            text(c, row, &mut v, &mut json, schema.field(i).name())?;
            match c {
                Col::Hex(_) => {
                    let _ = write!(out, "X'{v}'");
                }
                _ => out.push_str(&d.string(&v)),
            }
        }
        out.push(')');
    }
    Ok(out)
}

impl MySqlBackend {
    pub fn new(conn: Conn, spec: WriteSpec, schema: SchemaRef) -> Result<Self> {
        let opts = mysql::Opts::from_url(&conn.url)
            .map_err(|e| Error::Option(conn.scrub(&format!("LOCATION: {e}"))))?;
        Ok(Self {
            opts,
            spec,
            schema,
            conns: Default::default(),
            job: Default::default(),
            prepared: Default::default(),
            no_infile: Default::default(),
            seq: AtomicU64::new(0),
        })
    }

    pub fn create_sql(&self) -> Result<String> {
        let d = Dialect::MySql;
        let keys: &[String] = match &self.spec.mode {
            Mode::Upsert(k) => k,
            _ => &[],
        };
        let mut cols = Vec::new();
        for f in self.schema.fields() {
            let ty = type_for(f.data_type(), keys.contains(f.name())).ok_or_else(|| {
                Error::Config(format!(
                    "column {}: Arrow type {} has no MySQL type (DECIMAL holds at most 65 digits, 30 after the point); cast it in the query",
                    f.name(),
                    f.data_type()
                ))
            })?;
            let null = if f.is_nullable() && !keys.contains(f.name()) {
                ""
            } else {
                " NOT NULL"
            };
            cols.push(format!("{} {ty}{null}", d.ident(f.name())));
        }
        if !keys.is_empty() {
            cols.push(format!(
                "PRIMARY KEY ({})",
                keys.iter().map(|k| d.ident(k)).collect::<Vec<_>>().join(", ")
            ));
        }
        Ok(format!(
            "CREATE TABLE IF NOT EXISTS {} ({}) CHARACTER SET utf8mb4",
            self.spec.table,
            cols.join(", ")
        ))
    }

    /// `LOAD DATA` into `target`: binary columns through `UNHEX` of a variable.
    fn load_sql(&self, target: &str) -> String {
        let d = Dialect::MySql;
        let mut cols = Vec::new();
        let mut sets = Vec::new();
        for (i, f) in self.schema.fields().iter().enumerate() {
            if matches!(
                f.data_type(),
                DataType::Binary
                    | DataType::LargeBinary
                    | DataType::BinaryView
                    | DataType::FixedSizeBinary(_)
            ) {
                cols.push(format!("@b{i}"));
                sets.push(format!("{} = UNHEX(@b{i})", d.ident(f.name())));
            } else {
                cols.push(d.ident(f.name()));
            }
        }
        let mut sql = format!(
            "LOAD DATA LOCAL INFILE 'flumen' INTO TABLE {target} CHARACTER SET utf8mb4 \
             FIELDS TERMINATED BY '\\t' ESCAPED BY '\\\\' LINES TERMINATED BY '\\n' ({})",
            cols.join(", ")
        );
        if !sets.is_empty() {
            sql.push_str(" SET ");
            sql.push_str(&sets.join(", "));
        }
        sql
    }

    fn cols_sql(&self) -> String {
        self.schema
            .fields()
            .iter()
            .map(|f| Dialect::MySql.ident(f.name()))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Loads one request on `c` (inside a transaction): `Ok(rows the server warned about)`.
    fn load(
        &self,
        c: &mut mysql::Conn,
        req: &MySqlRequest,
    ) -> std::result::Result<Vec<(usize, String)>, LoadError> {
        let upsert = matches!(self.spec.mode, Mode::Upsert(_));
        let target = if upsert {
            let tmp = format!("flumen_stage_{}", self.seq.fetch_add(1, Ordering::Relaxed));
            c.query_drop(format!("CREATE TEMPORARY TABLE {tmp} LIKE {}", self.spec.table))?;
            tmp
        } else {
            self.spec.table.clone()
        };
        let mut warned = Vec::new();
        if !self.no_infile.load(Ordering::Relaxed) {
            let data = Arc::clone(&req.tsv);
            c.set_local_infile_handler(Some(mysql::LocalInfileHandler::new(move |_, w| {
                use std::io::Write;
                w.write_all(&data)?;
                Ok(())
            })));
            match c.query_drop(self.load_sql(&target)) {
                Ok(()) => {}
                Err(mysql::Error::MySqlError(e)) if matches!(e.code, 1148 | 3948 | 4166) => {
                    tracing::warn!(
                        table = %self.spec.table,
                        "the server refuses LOAD DATA LOCAL INFILE ({}); writing with multi-row INSERTs instead (slower)",
                        e.message
                    );
                    self.no_infile.store(true, Ordering::Relaxed);
                }
                Err(mysql::Error::DriverError(e)) if e.to_string().contains("LOCAL INFILE") => {
                    tracing::warn!(table = %self.spec.table, "LOAD DATA LOCAL INFILE is not allowed ({e}); writing with multi-row INSERTs instead (slower)");
                    self.no_infile.store(true, Ordering::Relaxed);
                }
                Err(e) => return Err(e.into()),
            }
            if !self.no_infile.load(Ordering::Relaxed) && c.affected_rows() != req.batch.num_rows() as u64
                || c.warnings() > 0
            {
                let rows: Vec<(String, u32, String)> = c.query("SHOW WARNINGS")?;
                for (_, code, msg) in rows {
                    let row = msg
                        .rsplit("at row ")
                        .next()
                        .filter(|_| msg.contains("at row "))
                        .and_then(|n| n.trim().parse::<usize>().ok())
                        .and_then(|n| n.checked_sub(1))
                        .unwrap_or(usize::MAX);
                    warned.push((row, format!("{msg} ({code})")));
                }
                if warned.is_empty() {
                    warned.push((usize::MAX, "the server loaded fewer rows than sent".into()));
                }
                return Ok(warned);
            }
        }
        if self.no_infile.load(Ordering::Relaxed) {
            let v = values(&req.batch).map_err(LoadError::Data)?;
            c.query_drop(format!("INSERT INTO {target} ({}) VALUES {v}", self.cols_sql()))?;
        }
        if let Mode::Upsert(keys) = &self.spec.mode {
            let d = Dialect::MySql;
            let set: Vec<String> = self
                .schema
                .fields()
                .iter()
                .map(|f| d.ident(f.name()))
                .filter(|n| !keys.iter().any(|k| d.ident(k) == *n))
                .map(|n| format!("{n} = VALUES({n})"))
                .collect();
            let cols = self.cols_sql();
            let action = if set.is_empty() {
                format!("{0} = {0}", d.ident(&keys[0]))
            } else {
                set.join(", ")
            };
            c.query_drop(format!(
                "INSERT INTO {} ({cols}) SELECT {cols} FROM {target} ON DUPLICATE KEY UPDATE {action}",
                self.spec.table
            ))?;
            c.query_drop(format!("DROP TEMPORARY TABLE {target}"))?;
        }
        Ok(warned)
    }

    /// Runs `f` on a connection on the blocking pool, after creating the table if asked.
    async fn with_conn<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&MySqlBackend, &mut mysql::Conn) -> std::result::Result<T, Outcome> + Send + 'static,
    ) -> std::result::Result<T, Outcome> {
        let me = Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            fn state<E>(_: E) -> Outcome {
                Outcome::Fatal {
                    reason: "writer state".into(),
                }
            }
            let mut conn = match me.conns.lock().map_err(state)?.pop() {
                Some(c) => c,
                None => mysql::Conn::new(me.opts.clone()).map_err(classify)?,
            };
            {
                let mut prepared = me.prepared.lock().map_err(state)?;
                if !*prepared && !me.spec.table.is_empty() {
                    let mut sql = Vec::new();
                    match me.spec.create {
                        Create::Never => {}
                        Create::IfNotExists => sql.push(me.create_sql().map_err(fatal)?),
                        Create::Replace => {
                            sql.push(format!("DROP TABLE IF EXISTS {}", me.spec.table));
                            sql.push(me.create_sql().map_err(fatal)?);
                        }
                    }
                    for s in sql {
                        conn.query_drop(&s).map_err(|e| Outcome::Fatal {
                            reason: format!("creating {}: {}", me.spec.table, my_text(&e)),
                        })?;
                    }
                    *prepared = true;
                }
            }
            let r = f(&me, &mut conn);
            if let Ok(mut v) = me.conns.lock() {
                v.push(conn);
            }
            r
        })
        .await
        .map_err(|e| Outcome::Fatal {
            reason: format!("the writer task failed: {e}"),
        })?
    }
}

/// Why a load failed: the server, or a value flumen could not encode.
#[derive(Debug)]
enum LoadError {
    Server(mysql::Error),
    Data(Error),
}

impl From<mysql::Error> for LoadError {
    fn from(e: mysql::Error) -> Self {
        LoadError::Server(e)
    }
}

impl LoadError {
    fn text(&self) -> String {
        match self {
            LoadError::Server(e) => my_text(e),
            LoadError::Data(e) => e.to_string(),
        }
    }
}

fn fatal(e: Error) -> Outcome {
    Outcome::Fatal {
        reason: e.to_string(),
    }
}

/// A server error's words, never the connection string.
pub fn my_text(e: &mysql::Error) -> String {
    match e {
        mysql::Error::MySqlError(s) => format!("{} ({})", s.message, s.code),
        other => other.to_string(),
    }
}

fn classify(e: mysql::Error) -> Outcome {
    let reason = my_text(&e);
    match &e {
        mysql::Error::MySqlError(s) => match s.code {
            1205 | 1213 | 1040 | 1203 | 2006 | 2013 => Outcome::Retry { reason, after: None },
            _ => Outcome::Fatal { reason },
        },
        mysql::Error::IoError(_) | mysql::Error::DriverError(_) | mysql::Error::CodecError(_) => {
            Outcome::Retry { reason, after: None }
        }
        _ => Outcome::Fatal { reason },
    }
}

/// Server errors about one value (strict mode): the row is at fault, not the request.
fn bad_data(e: &mysql::Error) -> bool {
    matches!(e, mysql::Error::MySqlError(s) if matches!(s.code, 1048 | 1062 | 1264 | 1265 | 1292 | 1366 | 1406 | 3140 | 4025))
}

/// The `at row N` of a server message, as a row index.
fn row_of(msg: &str) -> Option<usize> {
    msg.split("at row ")
        .nth(1)?
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse::<usize>()
        .ok()?
        .checked_sub(1)
}

/// Shared so that blocking tasks can hold it.
#[derive(Debug, Clone)]
pub struct MySql(pub Arc<MySqlBackend>);

impl MySqlBackend {
    pub fn shared(self) -> MySql {
        MySql(Arc::new(self))
    }
}

#[async_trait]
impl SinkBackend for MySql {
    type Request = MySqlRequest;

    fn schema(&self) -> SchemaRef {
        SchemaRef::clone(&self.0.schema)
    }

    fn encode(&self, batch: &RecordBatch) -> Result<MySqlRequest> {
        if self.0.spec.table.is_empty() {
            return Err(Error::Config(
                "a table defined by 'query' is read-only; name a 'table' to write".into(),
            ));
        }
        Ok(MySqlRequest {
            tsv: Arc::new(tsv(batch)?),
            batch: batch.clone(),
        })
    }

    fn request_bytes(&self, r: &MySqlRequest) -> usize {
        r.tsv.len()
    }

    fn describe(&self) -> String {
        let b = &self.0;
        format!(
            "MYSQL {} mode={} transaction={}; {}",
            b.spec.table,
            b.spec.mode.name(),
            if b.spec.job { "job" } else { "batch" },
            b.load_sql(&b.spec.table)
        )
    }

    fn all_or_nothing(&self) -> bool {
        self.0.spec.job
    }

    fn modes(&self) -> &'static [&'static str] {
        &["append", "overwrite", "upsert"]
    }

    async fn send(&self, req: &MySqlRequest, _token: &str) -> Outcome {
        let tsv = Arc::clone(&req.tsv);
        let batch = req.batch.clone();
        let rows = batch.num_rows();
        let job = self.0.spec.job;
        let r = self
            .0
            .with_conn(move |me, c| {
                let req = MySqlRequest { tsv, batch };
                if job {
                    let mut guard = me.job.lock().map_err(|_| Outcome::Fatal {
                        reason: "writer state".into(),
                    })?;
                    if guard.is_none() {
                        let mut jc = mysql::Conn::new(me.opts.clone()).map_err(classify)?;
                        jc.query_drop("START TRANSACTION").map_err(classify)?;
                        if me.spec.mode == Mode::Overwrite {
                            jc.query_drop(format!("DELETE FROM {}", me.spec.table))
                                .map_err(classify)?;
                        }
                        *guard = Some(jc);
                    }
                    let jc = guard.as_mut().ok_or_else(|| Outcome::Fatal {
                        reason: "no connection".into(),
                    })?;
                    return match me.load(jc, &req) {
                        Ok(w) if w.is_empty() => Ok(vec![]),
                        Ok(w) => Err(Outcome::Fatal {
                            reason: format!(
                                "{} (the transaction is rolled back)",
                                w.iter().map(|(_, m)| m.as_str()).collect::<Vec<_>>().join("; ")
                            ),
                        }),
                        Err(e) => Err(Outcome::Fatal {
                            reason: format!("{} (the transaction is rolled back)", e.text()),
                        }),
                    };
                }
                c.query_drop("START TRANSACTION").map_err(classify)?;
                match me.load(c, &req) {
                    Ok(w) if w.is_empty() => {
                        c.query_drop("COMMIT").map_err(classify)?;
                        Ok(vec![])
                    }
                    Ok(w) => {
                        let _ = c.query_drop("ROLLBACK");
                        Ok(w)
                    }
                    Err(LoadError::Server(e)) => {
                        let _ = c.query_drop("ROLLBACK");
                        if bad_data(&e) {
                            let msg = my_text(&e);
                            Ok(vec![(row_of(&msg).unwrap_or(usize::MAX), msg)])
                        } else {
                            Err(classify(e))
                        }
                    }
                    Err(LoadError::Data(e)) => {
                        let _ = c.query_drop("ROLLBACK");
                        Err(Outcome::Fatal {
                            reason: e.to_string(),
                        })
                    }
                }
            })
            .await;
        match r {
            Ok(w) if w.is_empty() => Outcome::Delivered,
            Ok(w) => {
                let named: Vec<(usize, String)> = w.iter().filter(|(r, _)| *r < rows).cloned().collect();
                if named.is_empty() {
                    // Nothing says which rows: all of them, with the server's words.
                    let why = w.iter().map(|(_, m)| m.as_str()).collect::<Vec<_>>().join("; ");
                    return Outcome::Partial {
                        rejected: (0..rows).map(|r| (r, why.clone())).collect(),
                        retry: vec![],
                    };
                }
                let bad: std::collections::BTreeMap<usize, String> = named.into_iter().collect();
                Outcome::Partial {
                    retry: (0..rows).filter(|r| !bad.contains_key(r)).collect(),
                    rejected: bad.into_iter().collect(),
                }
            }
            Err(o) => o,
        }
    }

    async fn finish(&self, ok: bool) -> Result<()> {
        let job = self.0.spec.job;
        let table = self.0.spec.table.clone();
        if table.is_empty() {
            return Ok(());
        }
        self.0
            .with_conn(move |me, _| {
                if !job {
                    return Ok(());
                }
                let mut guard = me.job.lock().map_err(|_| Outcome::Fatal {
                    reason: "writer state".into(),
                })?;
                if ok && guard.is_none() {
                    let mut jc = mysql::Conn::new(me.opts.clone()).map_err(classify)?;
                    jc.query_drop("START TRANSACTION").map_err(classify)?;
                    if me.spec.mode == Mode::Overwrite {
                        jc.query_drop(format!("DELETE FROM {table}")).map_err(classify)?;
                    }
                    *guard = Some(jc);
                }
                if let Some(mut jc) = guard.take() {
                    let sql = if ok { "COMMIT" } else { "ROLLBACK" };
                    jc.query_drop(sql).map_err(|e| Outcome::Fatal {
                        reason: format!("{sql} failed: {}", my_text(&e)),
                    })?;
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
