//! The bridge to ConnectorX: one query in, Arrow 59 batches out.
//!
//! ConnectorX is built on arrow 56; its batches cross to the arrow 59 DataFusion uses through
//! the Arrow C Data Interface — the buffers are handed over, not copied. Everything of
//! ConnectorX and arrow 56 stays in this file.
//!
//! ConnectorX's batch iterator turns an error of its worker threads into a panic on the thread
//! that reads (`cx writer failed: ...`) and its channel is unbounded. So each query is read on a
//! thread of its own, named [`THREAD`], whose panics are caught and returned as errors (and not
//! printed: [`quiet_panics`]), and callers bound memory by the size of each query (flumen splits
//! reads into chunks of the partition column), not by the channel.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Once};

use arrow::array::{RecordBatch, StructArray};
use arrow::datatypes::SchemaRef;
use connectorx::prelude::{CXQuery, SourceConn, new_record_batch_iter};

use crate::error::{Error, Result};

/// The name of the threads reading through ConnectorX.
pub const THREAD: &str = "flumen-sql-read";

/// Keeps the default panic message off stderr for ConnectorX's reading threads: their panics
/// are errors flumen reports itself (with secrets removed).
pub fn quiet_panics() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if std::thread::current().name() != Some(THREAD) {
                default(info);
            }
        }));
    });
}

/// A connection string for ConnectorX and the secret to keep out of messages.
#[derive(Clone)]
pub struct Conn {
    pub url: String,
    pub secret: Option<String>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.scrub(&self.url))
    }
}

impl Conn {
    /// A message with the secret (and any password in a URL) replaced.
    pub fn scrub(&self, text: &str) -> String {
        match &self.secret {
            Some(s) if !s.is_empty() => text.replace(s.as_str(), "***"),
            _ => text.to_string(),
        }
    }
}

fn panic_text(p: Box<dyn std::any::Any + Send>) -> String {
    match p.downcast::<String>() {
        Ok(s) => *s,
        Err(p) => match p.downcast::<&'static str>() {
            Ok(s) => s.to_string(),
            Err(_) => "the reader failed".to_string(),
        },
    }
}

/// The columns a query answers, as ConnectorX types them (no rows are read).
pub fn schema(conn: &Conn, query: &str) -> Result<SchemaRef> {
    let query = query.to_string();
    run_on_thread(conn, move |conn| {
        let source = SourceConn::try_from(conn.url.as_str()).map_err(|e| Error::Config(e.to_string()))?;
        let it = new_record_batch_iter(&source, None, &[CXQuery::naked(query)], 1024, None)
            .map_err(|e| Error::Config(e.to_string()))?;
        let (empty, _) = it.get_schema();
        Ok(to_arrow(empty)?.schema())
    })
}

/// Reads one query, handing each batch to `sink` (which returns `false` to stop).
pub fn read(
    conn: &Conn,
    query: String,
    batch_rows: usize,
    mut sink: impl FnMut(RecordBatch) -> bool + Send + 'static,
) -> Result<()> {
    run_on_thread(conn, move |conn| {
        let source = SourceConn::try_from(conn.url.as_str()).map_err(|e| Error::Config(e.to_string()))?;
        let mut it = new_record_batch_iter(&source, None, &[CXQuery::naked(query)], batch_rows, None)
            .map_err(|e| Error::Config(e.to_string()))?;
        it.prepare();
        while let Some(b) = it.next_batch() {
            if !sink(to_arrow(b)?) {
                break;
            }
        }
        Ok(())
    })
}

/// Runs `f` on a thread named [`THREAD`]; a panic there is an error; messages are scrubbed.
fn run_on_thread<T: Send + 'static>(
    conn: &Conn,
    f: impl FnOnce(&Conn) -> Result<T> + Send + 'static,
) -> Result<T> {
    quiet_panics();
    let c = conn.clone();
    let handle = std::thread::Builder::new()
        .name(THREAD.into())
        .spawn(move || catch_unwind(AssertUnwindSafe(|| f(&c))))
        .map_err(|e| Error::io("starting a reader thread".to_string(), e))?;
    let out = match handle.join() {
        Ok(Ok(r)) => r,
        Ok(Err(p)) | Err(p) => Err(Error::Config(panic_text(p))),
    };
    out.map_err(|e| Error::Config(conn.scrub(&e.to_string())))
}

/// An arrow 56 batch as an arrow 59 batch, through the C Data Interface (no copy).
fn to_arrow(b: arrow56::record_batch::RecordBatch) -> Result<RecordBatch> {
    let rows = b.num_rows();
    let data = arrow56::array::StructArray::from(b).into();
    let (array, schema) =
        arrow56::ffi::to_ffi(&data).map_err(|e| Error::Config(format!("handing over a batch: {e}")))?;
    // SAFETY: both are the C Data Interface's `ArrowArray`/`ArrowSchema` (#[repr(C)], same
    // fields); ownership moves: arrow 59 releases them through their release callbacks.
    let (array, schema) = unsafe {
        (
            std::mem::transmute::<arrow56::ffi::FFI_ArrowArray, arrow::ffi::FFI_ArrowArray>(array),
            std::mem::transmute::<arrow56::ffi::FFI_ArrowSchema, arrow::ffi::FFI_ArrowSchema>(schema),
        )
    };
    // SAFETY: the structs were produced by arrow's own exporter just above.
    let data = unsafe { arrow::ffi::from_ffi(array, &schema) }?;
    let s = StructArray::from(data);
    let batch = RecordBatch::from(s);
    debug_assert_eq!(batch.num_rows(), rows);
    Ok(batch)
}

/// The batch with `schema`'s columns: cast from ConnectorX's types (LargeUtf8, Decimal(38, 10),
/// ...) to the table's.
pub fn conform(batch: &RecordBatch, schema: &SchemaRef, table: &str) -> Result<RecordBatch> {
    let mut cols = Vec::with_capacity(schema.fields().len());
    for (f, c) in schema.fields().iter().zip(batch.columns()) {
        let c = if c.data_type() == f.data_type() {
            Arc::clone(c)
        } else {
            arrow::compute::cast(c, f.data_type()).map_err(|e| {
                Error::Config(format!(
                    "table {table} column {}: {} cannot be read as {}: {e}",
                    f.name(),
                    c.data_type(),
                    f.data_type()
                ))
            })?
        };
        cols.push(c);
    }
    let opts = arrow::array::RecordBatchOptions::new().with_row_count(Some(batch.num_rows()));
    Ok(RecordBatch::try_new_with_options(
        Arc::clone(schema),
        cols,
        &opts,
    )?)
}
