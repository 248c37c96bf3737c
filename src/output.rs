//! Where query results go: a table on the terminal, CSV or NDJSON on stdout, or a file.

use std::io::Write;
use std::path::{Path, PathBuf};

use arrow::array::RecordBatch;
use datafusion::physical_plan::SendableRecordBatchStream;
use futures::StreamExt;
use parquet::arrow::ArrowWriter;

use crate::error::{Error, Result};

/// How query results are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ResultFormat {
    /// An aligned text table of the first rows, then the row count.
    #[default]
    Table,
    /// CSV with a header.
    Csv,
    /// Newline-delimited JSON, one object per row.
    Json,
    /// Parquet (needs an output file).
    Parquet,
}

impl ResultFormat {
    /// Parses `table`, `csv`, `json`/`ndjson`, `parquet`.
    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "table" => Ok(Self::Table),
            "csv" => Ok(Self::Csv),
            "json" | "ndjson" => Ok(Self::Json),
            "parquet" => Ok(Self::Parquet),
            other => Err(Error::Config(format!(
                "unknown --format '{other}'; choose table, csv, json or parquet"
            ))),
        }
    }
}

/// Where and how query results go.
#[derive(Debug, Clone)]
pub struct ResultTarget {
    /// The format.
    pub format: ResultFormat,
    /// A file to write to instead of standard output.
    pub output: Option<PathBuf>,
    /// For [`ResultFormat::Table`]: how many rows to show (all rows are still counted).
    pub max_rows: usize,
}

impl Default for ResultTarget {
    fn default() -> Self {
        Self {
            format: ResultFormat::Table,
            output: None,
            max_rows: 40,
        }
    }
}

impl ResultTarget {
    /// Checks the combination before anything runs.
    pub fn validate(&self) -> Result<()> {
        if self.format == ResultFormat::Parquet && self.output.is_none() {
            return Err(Error::Config("--format parquet needs --output PATH".into()));
        }
        Ok(())
    }
}

/// A writer for one result: rows are streamed through, never collected (except the first
/// `max_rows` of a table).
enum Writer<'a> {
    Table {
        shown: Vec<RecordBatch>,
        kept: usize,
        max: usize,
    },
    Csv(Box<arrow::csv::Writer<Box<dyn Write + Send + 'a>>>),
    Json(Box<arrow::json::LineDelimitedWriter<Box<dyn Write + Send + 'a>>>),
    Parquet(Box<ArrowWriter<std::io::BufWriter<std::fs::File>>>),
}

fn create(path: &Path) -> Result<std::io::BufWriter<std::fs::File>> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .map_err(|e| Error::io(format!("creating {}", parent.display()), e))?;
    }
    let f = std::fs::File::create(path).map_err(|e| Error::io(format!("creating {}", path.display()), e))?;
    Ok(std::io::BufWriter::with_capacity(1 << 20, f))
}

/// Streams a query's rows to `target` (or `out`), returning how many rows there were and, for
/// [`ResultFormat::Table`], the rendered table, which the caller prints once its progress
/// display is gone.
pub async fn write_result(
    mut stream: SendableRecordBatchStream,
    target: &ResultTarget,
    out: &mut (dyn Write + Send),
) -> Result<(u64, Option<String>)> {
    let schema = stream.schema();
    let mut writer = match (target.format, &target.output) {
        (ResultFormat::Table, _) => Writer::Table {
            shown: Vec::new(),
            kept: 0,
            max: target.max_rows,
        },
        (ResultFormat::Parquet, Some(path)) => Writer::Parquet(Box::new(ArrowWriter::try_new(
            create(path)?,
            schema.clone(),
            None,
        )?)),
        (ResultFormat::Parquet, None) => {
            return Err(Error::Config("--format parquet needs --output PATH".into()));
        }
        (format, output) => {
            let sink: Box<dyn Write + Send + '_> = match output {
                Some(path) => Box::new(create(path)?),
                None => Box::new(out),
            };
            if format == ResultFormat::Csv {
                Writer::Csv(Box::new(
                    arrow::csv::WriterBuilder::new().with_header(true).build(sink),
                ))
            } else {
                Writer::Json(Box::new(arrow::json::LineDelimitedWriter::new(sink)))
            }
        }
    };
    let mut rows = 0u64;
    while let Some(batch) = stream.next().await {
        let batch = batch?;
        rows += batch.num_rows() as u64;
        match &mut writer {
            Writer::Table { shown, kept, max, .. } => {
                if *kept < *max {
                    let take = (*max - *kept).min(batch.num_rows());
                    shown.push(batch.slice(0, take));
                    *kept += take;
                }
            }
            Writer::Csv(w) => w.write(&batch)?,
            Writer::Json(w) => w.write(&batch)?,
            Writer::Parquet(w) => w.write(&batch)?,
        }
    }
    match writer {
        Writer::Table { shown, kept, .. } => {
            let table = arrow::util::pretty::pretty_format_batches_with_schema(schema, &shown)?;
            let footer = if (kept as u64) < rows {
                format!("({rows} rows, first {kept} shown; use --max-rows N or --format csv)")
            } else {
                format!("({rows} row{})", if rows == 1 { "" } else { "s" })
            };
            return Ok((rows, Some(format!("{table}\n{footer}"))));
        }
        Writer::Csv(w) => {
            w.into_inner()
                .flush()
                .map_err(|e| Error::io("writing CSV results", e))?;
        }
        Writer::Json(mut w) => {
            w.finish()?;
            w.into_inner()
                .flush()
                .map_err(|e| Error::io("writing JSON results", e))?;
        }
        Writer::Parquet(w) => {
            w.close()?;
        }
    }
    Ok((rows, None))
}
