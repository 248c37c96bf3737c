//! Writing MySQL/MariaDB tables: `LOAD DATA LOCAL INFILE` fed from memory (flumen's own
//! tab-separated encoding of the Arrow columns, binary as hex through `UNHEX`), in a
//! transaction per request or one for the statement. Where the server refuses local infile,
//! multi-row `INSERT`s instead, with a warning saying so.
//!
//! `LOAD DATA LOCAL` turns bad values into warnings (a truncated string, '' as 0) instead of
//! errors. flumen does not let that pass: a load with warnings is rolled back, and the rows the
//! warnings name go to dead letters with the server's words while the rest are sent again.
//!
//! Exactly once: as with PostgreSQL (`pg.rs`), each request's transaction first inserts its
//! delivery token into the delivery table; a token found there means an earlier attempt
//! committed the request. Every connection waits for locks at most the sink's `timeout`
//! (`lock_wait_timeout`, `innodb_lock_wait_timeout`, read and write timeouts); an attempt that
//! outlives it is killed at the server (`KILL <connection>`) and waited for before the next one.
//!
//! MySQL's DDL commits at once, so `'create' 'replace'` builds the new table beside the target
//! (`<table>__flumen_new`) and swaps it in with one atomic `RENAME TABLE` once its first rows
//! are committed (or, in a job, once the job commits): a statement that fails before leaves the
//! old table as it was. The swap is recorded (the request's token, then the run's journal) and
//! never done again in the run.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use arrow::datatypes::{DataType, Float32Type, Float64Type, SchemaRef};
use arrow::json::writer::{EncoderOptions, make_encoder};
use async_trait::async_trait;
use mysql::prelude::Queryable;

use super::cx::Conn;
use super::dialect::Dialect;
use super::{Create, Mode, WriteSpec};
use crate::error::{Error, Result};
use crate::sink::{Attempt, Effects, Outcome, SinkBackend};

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
    conns: Mutex<Vec<mysql::Conn>>,
    job: Mutex<Option<Job>>,
    /// The table is prepared (`create`); held by the first request while it prepares it.
    prepared: Mutex<bool>,
    /// The delivery table exists (made once per process).
    deliveries_made: AtomicBool,
    /// It cannot be made for lack of privilege: no record is kept (with a warning).
    deliveries_off: AtomicBool,
    /// Set once the server refused local infile: multi-row INSERTs from then on.
    no_infile: AtomicBool,
    seq: AtomicU64,
    /// The sink's timeout (statements outside a request's attempt are bounded by it too).
    timeout: Duration,
}

/// The statement's transaction (`'transaction' 'job'`, `overwrite`).
struct Job {
    conn: mysql::Conn,
    /// An earlier attempt of this run committed the job: nothing is loaded again.
    committed_before: bool,
    /// The job loads into the new table of a replace, swapped in when it commits.
    shadow: bool,
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
    /// A writer of `spec`; every connection waits for locks and answers at most `timeout`.
    pub fn new(conn: Conn, spec: WriteSpec, schema: SchemaRef, timeout: Duration) -> Result<Self> {
        let opts = mysql::Opts::from_url(&conn.url)
            .map_err(|e| Error::Option(conn.scrub(&format!("LOCATION: {e}"))))?;
        let secs = timeout.as_secs().max(1);
        let t = Some(timeout.max(Duration::from_secs(1)));
        let opts: mysql::Opts = mysql::OptsBuilder::from_opts(opts)
            .read_timeout(t)
            .write_timeout(t)
            .tcp_connect_timeout(t)
            .init(vec![format!(
                "SET SESSION lock_wait_timeout = {secs}, innodb_lock_wait_timeout = {secs}"
            )])
            .into();
        Ok(Self {
            opts,
            spec,
            schema,
            conns: Default::default(),
            job: Default::default(),
            prepared: Default::default(),
            deliveries_made: Default::default(),
            deliveries_off: Default::default(),
            no_infile: Default::default(),
            seq: AtomicU64::new(0),
            timeout,
        })
    }

    /// The new table of this run's replace, beside the target.
    fn shadow(&self, fx: &Effects) -> String {
        self.beside(&format!("__flumen_new_{}", fx.run_tag()))
    }

    /// A table beside the target: its name, cut to leave room, and `suffix` (MySQL names hold
    /// at most 64 characters).
    fn beside(&self, suffix: &str) -> String {
        let (schema, name) = match self.spec.name.rsplit_once('.') {
            Some((s, n)) => (Some(s), n),
            None => (None, self.spec.name.as_str()),
        };
        let room = 64usize.saturating_sub(suffix.chars().count());
        let cut: String = name.chars().take(room).collect();
        let t = Dialect::MySql.ident(&format!("{cut}{suffix}"));
        match schema {
            Some(s) => format!("{}.{t}", Dialect::MySql.table(s)),
            None => t,
        }
    }

    /// The old table of this run's replace, dropped once the new one is in place.
    fn retired(&self, fx: &Effects) -> String {
        self.beside(&format!("__flumen_old_{}", fx.run_tag()))
    }

    /// The token that records this run's replace of the table in the delivery table.
    fn replace_token(&self, fx: &Effects) -> String {
        format!(
            "{}/replace/{:016x}",
            fx.run_id(),
            xxhash_rust::xxh3::xxh3_64(self.spec.name.as_bytes())
        )
    }

    /// Whether this run replaced the table already: its journal says so, or the delivery
    /// table does (the process died between the swap and the journal).
    fn replaced(&self, c: &mut mysql::Conn, fx: &Effects) -> std::result::Result<bool, Outcome> {
        if fx.done("replace") {
            return Ok(true);
        }
        if self.recorded(c, &self.replace_token(fx))? {
            fx.record("replace").map_err(fatal)?;
            return Ok(true);
        }
        Ok(false)
    }

    /// The DDL of the table flumen creates, under `name`.
    fn create_named(&self, name: &str) -> Result<String> {
        let sql = self.create_sql()?;
        Ok(sql.replacen(&self.spec.table, name, 1))
    }

    /// The delivery table, when one is kept.
    fn deliveries(&self) -> Option<&String> {
        self.spec
            .deliveries
            .as_ref()
            .filter(|_| !self.deliveries_off.load(Ordering::Relaxed))
    }

    /// Makes the delivery table, once per process.
    fn ensure_deliveries(&self, c: &mut mysql::Conn) -> std::result::Result<(), Outcome> {
        let Some(t) = &self.spec.deliveries else {
            return Ok(());
        };
        if self.deliveries_made.load(Ordering::Relaxed) {
            return Ok(());
        }
        let made = c.query_drop(format!(
            "CREATE TABLE IF NOT EXISTS {t} (token VARCHAR(255) CHARACTER SET ascii NOT NULL PRIMARY KEY, \
             target VARCHAR(1024) NOT NULL, delivered_at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6)) ENGINE=InnoDB"
        ));
        match made {
            Ok(()) => {}
            // No privilege to make it: the write goes on without it, at least once, and says so.
            // Made by someone else, with the rights to use it: fine.
            Err(mysql::Error::MySqlError(e))
                if matches!(e.code, 1044 | 1142 | 1227)
                    && c.query_drop(format!("SELECT token FROM {t} LIMIT 0")).is_ok() => {}
            Err(mysql::Error::MySqlError(e)) if matches!(e.code, 1044 | 1142 | 1227) => {
                tracing::warn!(
                    table = %self.spec.table,
                    "cannot make the delivery table {t} ({} ({})): requests are recorded nowhere, so one sent again \
                     after a timeout or a crash may be applied twice; name a table flumen may create with \
                     OPTIONS ('delivery_table' 'db.table')",
                    e.message,
                    e.code
                );
                self.deliveries_off.store(true, Ordering::Relaxed);
            }
            Err(e) => {
                return Err(match classify(e) {
                    Outcome::Fatal { reason } => Outcome::Fatal {
                        reason: format!(
                            "making the delivery table {t}: {reason}; name one flumen may create with OPTIONS ('delivery_table' 'db.table'), or 'none'"
                        ),
                    },
                    o => o,
                });
            }
        }
        self.deliveries_made.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Inserts `token` into the delivery table: `false` when it was there already.
    fn record(&self, c: &mut mysql::Conn, token: &str) -> std::result::Result<bool, Outcome> {
        let Some(t) = self.deliveries() else {
            return Ok(true);
        };
        c.exec_drop(
            format!("INSERT IGNORE INTO {t} (token, target) VALUES (?, ?)"),
            (token, &self.spec.table),
        )
        .map_err(classify)?;
        Ok(c.affected_rows() == 1)
    }

    /// Whether `token` is in the delivery table.
    fn recorded(&self, c: &mut mysql::Conn, token: &str) -> std::result::Result<bool, Outcome> {
        let Some(t) = self.deliveries() else {
            return Ok(false);
        };
        let found: Option<u8> = c
            .exec_first(format!("SELECT 1 FROM {t} WHERE token = ?"), (token,))
            .map_err(classify)?;
        Ok(found.is_some())
    }

    /// Makes a fresh, empty new table for a replace.
    fn make_shadow(&self, c: &mut mysql::Conn, fx: &Effects) -> std::result::Result<(), Outcome> {
        let shadow = self.shadow(fx);
        for sql in [
            format!("DROP TABLE IF EXISTS {shadow}"),
            self.create_named(&shadow).map_err(fatal)?,
        ] {
            c.query_drop(&sql).map_err(|e| Outcome::Fatal {
                reason: format!("creating {shadow}: {}", my_text(&e)),
            })?;
        }
        Ok(())
    }

    /// Puts the new table of a replace in the target's place (one atomic RENAME), drops the
    /// old one, and records it: the run's replace token and the request's (when given) in the
    /// delivery table, then the journal. A death before the replace token is recorded makes the
    /// replay build the new table again (with the same first rows); one after it, never.
    fn swap_in(
        &self,
        c: &mut mysql::Conn,
        token: Option<&str>,
        fx: &Effects,
    ) -> std::result::Result<(), Outcome> {
        let (t, shadow, old) = (&self.spec.table, self.shadow(fx), self.retired(fx));
        let exists: Option<u8> = c
            .exec_first(
                "SELECT 1 FROM information_schema.TABLES WHERE TABLE_SCHEMA = COALESCE(?, DATABASE()) AND TABLE_NAME = ?",
                match self.spec.name.rsplit_once('.') {
                    Some((db, name)) => (Some(db.to_string()), name.to_string()),
                    None => (None, self.spec.name.clone()),
                },
            )
            .map_err(classify)?;
        let swap = |e: mysql::Error| Outcome::Fatal {
            reason: format!("putting {shadow} in place of {t}: {}", my_text(&e)),
        };
        c.query_drop(format!("DROP TABLE IF EXISTS {old}"))
            .map_err(swap)?;
        match exists {
            Some(_) => c.query_drop(format!("RENAME TABLE {t} TO {old}, {shadow} TO {t}")),
            None => c.query_drop(format!("RENAME TABLE {shadow} TO {t}")),
        }
        .map_err(swap)?;
        c.query_drop(format!("DROP TABLE IF EXISTS {old}"))
            .map_err(swap)?;
        // Both tokens at once: the replace and the rows it went in with are one fact.
        c.query_drop("START TRANSACTION").map_err(classify)?;
        let recorded = (|| {
            self.record(c, &self.replace_token(fx))?;
            if let Some(token) = token {
                self.record(c, token)?;
            }
            c.query_drop("COMMIT").map_err(classify)
        })();
        if recorded.is_err() {
            let _ = c.query_drop("ROLLBACK");
        }
        recorded?;
        fx.record("replace").map_err(fatal)
    }

    /// The table's DDL outside a replace: created if missing.
    fn create_if_missing(&self, c: &mut mysql::Conn) -> std::result::Result<(), Outcome> {
        if self.spec.create == Create::Never {
            return Ok(());
        }
        let sql = self.create_sql().map_err(fatal)?;
        c.query_drop(&sql).map_err(|e| Outcome::Fatal {
            reason: format!("creating {}: {}", self.spec.table, my_text(&e)),
        })
    }

    /// Whether this write still owes the replace (`'create' 'replace'`, not done in the run).
    fn replace_owed(&self, c: &mut mysql::Conn, fx: &Effects) -> std::result::Result<bool, Outcome> {
        Ok(self.spec.create == Create::Replace && !self.replaced(c, fx)?)
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

    /// Loads one request into `into` on `c` (inside a transaction): `Ok(rows the server warned
    /// about)`.
    fn load(
        &self,
        c: &mut mysql::Conn,
        req: &MySqlRequest,
        into: &str,
    ) -> std::result::Result<Vec<(usize, String)>, LoadError> {
        let upsert = matches!(self.spec.mode, Mode::Upsert(_));
        let target = if upsert {
            let tmp = format!("flumen_stage_{}", self.seq.fetch_add(1, Ordering::Relaxed));
            c.query_drop(format!("CREATE TEMPORARY TABLE {tmp} LIKE {into}"))?;
            tmp
        } else {
            into.to_string()
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
                "INSERT INTO {into} ({cols}) SELECT {cols} FROM {target} ON DUPLICATE KEY UPDATE {action}"
            ))?;
            c.query_drop(format!("DROP TEMPORARY TABLE {target}"))?;
        }
        Ok(warned)
    }

    /// Runs `f` on a pooled connection on the blocking pool, within `timeout`: past it, the
    /// connection is killed at the server and the attempt waited for, so no attempt outlives
    /// its turn. A connection goes back to the pool only after a success.
    async fn with_conn<T: Send + 'static>(
        self: &Arc<Self>,
        timeout: Duration,
        f: impl FnOnce(&MySqlBackend, &mut mysql::Conn) -> std::result::Result<T, Outcome> + Send + 'static,
    ) -> std::result::Result<T, Outcome> {
        let me = Arc::clone(self);
        let id = Arc::new(AtomicU32::new(0));
        let seen = Arc::clone(&id);
        let task = tokio::task::spawn_blocking(move || {
            let pooled = me.conns.lock().ok().and_then(|mut v| v.pop());
            let mut conn = match pooled {
                Some(c) => c,
                None => mysql::Conn::new(me.opts.clone()).map_err(classify)?,
            };
            seen.store(conn.connection_id(), Ordering::Relaxed);
            let r = f(&me, &mut conn);
            if r.is_ok()
                && let Ok(mut v) = me.conns.lock()
            {
                v.push(conn);
            }
            r
        });
        self.settle(task, &id, timeout).await
    }

    /// Waits for a blocking attempt; past `timeout` (and the connection's own timeouts), kills
    /// its connection at the server, then waits for it to return.
    async fn settle<T>(
        self: &Arc<Self>,
        mut task: tokio::task::JoinHandle<std::result::Result<T, Outcome>>,
        id: &AtomicU32,
        timeout: Duration,
    ) -> std::result::Result<T, Outcome> {
        let joined = match tokio::time::timeout(timeout + Duration::from_secs(5), &mut task).await {
            Ok(j) => j,
            Err(_) => {
                let (opts, conn_id) = (self.opts.clone(), id.load(Ordering::Relaxed));
                if conn_id != 0 {
                    let killer = tokio::task::spawn_blocking(move || {
                        mysql::Conn::new(opts).and_then(|mut c| c.query_drop(format!("KILL {conn_id}")))
                    });
                    let _ = tokio::time::timeout(timeout, killer).await;
                }
                let _ = task.await;
                return Err(Outcome::Retry {
                    reason: format!("no answer within {timeout:?} (the attempt was killed at the server)"),
                    after: None,
                });
            }
        };
        joined.map_err(|e| Outcome::Fatal {
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

    async fn send(&self, req: &MySqlRequest, a: &Attempt<'_>) -> Outcome {
        let tsv = Arc::clone(&req.tsv);
        let batch = req.batch.clone();
        let rows = batch.num_rows();
        let req = MySqlRequest { tsv, batch };
        let (token, fx, timeout) = (a.token.to_string(), a.effects.clone(), a.timeout);
        let r = if self.0.spec.job {
            self.send_job(req, fx, timeout).await
        } else {
            self.0
                .with_conn(timeout, move |me, c| me.send_batch(c, &req, &token, &fx))
                .await
        };
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

    async fn finish(&self, ok: bool, fx: &Effects) -> Result<()> {
        if self.0.spec.table.is_empty() {
            return Ok(());
        }
        let fx = fx.clone();
        let at = |o: Outcome| match o {
            Outcome::Fatal { reason } | Outcome::Retry { reason, .. } => Error::Config(reason),
            _ => Error::Config("finishing the write failed".into()),
        };
        if self.0.spec.job {
            let me = Arc::clone(&self.0);
            let task = tokio::task::spawn_blocking(move || me.finish_job(ok, &fx));
            return task
                .await
                .map_err(|e| Error::Config(format!("the writer task failed: {e}")))?
                .map_err(at);
        }
        // A failed write owes nothing, but a replace's new table that never went in (dropped
        // if the server answers; the target is untouched either way).
        if !ok && (self.0.spec.create != Create::Replace || fx.done("replace")) {
            return Ok(());
        }
        let timeout = self.0.timeout;
        let ended = self
            .0
            .with_conn(timeout, move |me, c| {
                let mut prepared = me.prepared.lock().map_err(|_| Outcome::Fatal {
                    reason: "writer state".into(),
                })?;
                if *prepared {
                    return Ok(());
                }
                if !ok {
                    let _ = c.query_drop(format!("DROP TABLE IF EXISTS {}", me.shadow(&fx)));
                    return Ok(());
                }
                // No request was sent (an empty input): the table is still owed its DDL.
                me.ensure_deliveries(c)?;
                if me.replace_owed(c, &fx)? {
                    me.make_shadow(c, &fx)?;
                    me.swap_in(c, None, &fx)?;
                } else {
                    me.create_if_missing(c)?;
                }
                *prepared = true;
                Ok(())
            })
            .await;
        match ended {
            Err(o) if ok => Err(at(o)),
            _ => Ok(()),
        }
    }
}

impl MySql {
    /// Sends one request within the statement's transaction.
    async fn send_job(
        &self,
        req: MySqlRequest,
        fx: Effects,
        timeout: Duration,
    ) -> std::result::Result<Vec<(usize, String)>, Outcome> {
        let me = Arc::clone(&self.0);
        let id = Arc::new(AtomicU32::new(0));
        let seen = Arc::clone(&id);
        let task = tokio::task::spawn_blocking(move || {
            let mut guard = me.job.lock().map_err(|_| Outcome::Fatal {
                reason: "writer state".into(),
            })?;
            me.open_job(&mut guard, &fx)?;
            let job = guard.as_mut().ok_or_else(|| Outcome::Fatal {
                reason: "no transaction".into(),
            })?;
            if job.committed_before {
                return Ok(vec![]);
            }
            seen.store(job.conn.connection_id(), Ordering::Relaxed);
            let into = if job.shadow {
                me.shadow(&fx)
            } else {
                me.spec.table.clone()
            };
            match me.load(&mut job.conn, &req, &into) {
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
            }
        });
        match self.0.settle(task, &id, timeout).await {
            // A job's statement that got no answer may still apply: never again.
            Err(Outcome::Retry { reason, .. }) => Err(Outcome::Fatal {
                reason: format!("{reason} (the transaction is rolled back)"),
            }),
            r => r,
        }
    }
}

impl MySqlBackend {
    /// One request in a transaction of its own: the token first, then the rows. The first
    /// request prepares the table; a replace's first rows go to the new table, swapped in once
    /// they are committed.
    fn send_batch(
        &self,
        c: &mut mysql::Conn,
        req: &MySqlRequest,
        token: &str,
        fx: &Effects,
    ) -> std::result::Result<Vec<(usize, String)>, Outcome> {
        self.ensure_deliveries(c)?;
        let mut prepared = self.prepared.lock().map_err(|_| Outcome::Fatal {
            reason: "writer state".into(),
        })?;
        let mut into = self.spec.table.clone();
        let mut swap = false;
        if !*prepared {
            if self.replace_owed(c, fx)? {
                self.make_shadow(c, fx)?;
                into = self.shadow(fx);
                swap = true;
            } else {
                self.create_if_missing(c)?;
                *prepared = true;
            }
        }
        if !swap {
            drop(prepared);
            return self.transaction(c, req, token, &into, true);
        }
        // The new table's first rows: no token yet (the table is made again if the run dies
        // before the swap); the token is recorded right after the swap.
        let w = self.transaction(c, req, token, &into, false)?;
        if w.is_empty() {
            self.swap_in(c, Some(token), fx)?;
            *prepared = true;
        }
        Ok(w)
    }

    /// `START TRANSACTION`, the token (with `token_first`), the load into `into`, `COMMIT`; a
    /// load with warnings or refused values is rolled back and its rows named.
    fn transaction(
        &self,
        c: &mut mysql::Conn,
        req: &MySqlRequest,
        token: &str,
        into: &str,
        token_first: bool,
    ) -> std::result::Result<Vec<(usize, String)>, Outcome> {
        c.query_drop("START TRANSACTION").map_err(classify)?;
        if token_first {
            match self.record(c, token) {
                Ok(true) => {}
                Ok(false) => {
                    let _ = c.query_drop("ROLLBACK");
                    return Ok(vec![]);
                }
                Err(o) => {
                    let _ = c.query_drop("ROLLBACK");
                    return Err(o);
                }
            }
        }
        match self.load(c, req, into) {
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
    }

    /// Opens the job's transaction if it is not open: its token recorded (or found: an earlier
    /// attempt committed the job, and with it any replace), the table prepared (a replace loads
    /// a new table), emptied for `overwrite`.
    fn open_job(&self, guard: &mut Option<Job>, fx: &Effects) -> std::result::Result<(), Outcome> {
        if guard.is_some() {
            return Ok(());
        }
        let mut conn = mysql::Conn::new(self.opts.clone()).map_err(classify)?;
        self.ensure_deliveries(&mut conn)?;
        let job_token = fx.statement_token();
        let committed = self.recorded(&mut conn, &job_token)?;
        if committed && fx.input_repeatable() {
            tracing::info!(table = %self.spec.table, "an earlier attempt of this run committed this write: it is not loaded again");
            *guard = Some(Job {
                conn,
                committed_before: true,
                shadow: false,
            });
            return Ok(());
        }
        if committed {
            // Its input (incremental, a broker) may hold more now: loaded again, at least once.
            tracing::warn!(
                table = %self.spec.table,
                "an earlier attempt of this run committed this write, but its input may have changed since: it is loaded again"
            );
        }
        let shadow = self.replace_owed(&mut conn, fx)?;
        let prepared = self.prepared.lock().map(|p| *p).unwrap_or(false);
        if shadow {
            self.make_shadow(&mut conn, fx)?;
        } else if !prepared {
            self.create_if_missing(&mut conn)?;
            if let Ok(mut p) = self.prepared.lock() {
                *p = true;
            }
        }
        let rolled = |e: mysql::Error| Outcome::Fatal {
            reason: format!("{} (the transaction is rolled back)", my_text(&e)),
        };
        conn.query_drop("START TRANSACTION").map_err(rolled)?;
        if !shadow {
            // A replace's job records its token after the swap instead.
            self.record(&mut conn, &job_token)?;
            if self.spec.mode == Mode::Overwrite {
                conn.query_drop(format!("DELETE FROM {}", self.spec.table))
                    .map_err(rolled)?;
            }
        }
        *guard = Some(Job {
            conn,
            committed_before: false,
            shadow,
        });
        Ok(())
    }

    /// Ends the job: COMMIT (and a replace's swap) or ROLLBACK (and a replace's new table
    /// dropped: the target stays as it was).
    fn finish_job(&self, ok: bool, fx: &Effects) -> std::result::Result<(), Outcome> {
        let mut guard = self.job.lock().map_err(|_| Outcome::Fatal {
            reason: "writer state".into(),
        })?;
        if ok {
            self.open_job(&mut guard, fx)?;
        }
        let Some(mut job) = guard.take() else {
            return Ok(());
        };
        if job.committed_before {
            return Ok(());
        }
        if !ok {
            let _ = job.conn.query_drop("ROLLBACK");
            if job.shadow {
                let _ = job
                    .conn
                    .query_drop(format!("DROP TABLE IF EXISTS {}", self.shadow(fx)));
            }
            return Ok(());
        }
        job.conn.query_drop("COMMIT").map_err(|e| Outcome::Fatal {
            reason: format!("COMMIT failed: {}", my_text(&e)),
        })?;
        if job.shadow {
            self.swap_in(&mut job.conn, Some(&fx.statement_token()), fx)?;
            if let Ok(mut p) = self.prepared.lock() {
                *p = true;
            }
        }
        Ok(())
    }
}
