//! Streaming a generated data set into a CSV, NDJSON or Parquet file.

use std::io::Write;
use std::path::Path;

use arrow::array::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use rayon::prelude::*;

use super::GenSpec;
use crate::error::{Error, Result};

/// File formats `flumen gen` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileFormat {
    /// CSV with a header row; nested values as JSON text.
    Csv,
    /// Newline-delimited JSON.
    Json,
    /// Parquet, zstd-compressed.
    Parquet,
}

impl FileFormat {
    /// Parses `csv`, `json`/`ndjson` or `parquet`.
    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "csv" => Ok(Self::Csv),
            "json" | "ndjson" => Ok(Self::Json),
            "parquet" => Ok(Self::Parquet),
            other => Err(Error::Config(format!(
                "unknown format '{other}'; choose csv, json or parquet"
            ))),
        }
    }
}

enum Sink<W: Write + Send> {
    Csv(Box<arrow::csv::Writer<W>>),
    Json(Box<arrow::json::LineDelimitedWriter<W>>),
    Parquet(Box<ArrowWriter<W>>),
}

impl<W: Write + Send> Sink<W> {
    fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        match self {
            Sink::Csv(w) => w.write(batch)?,
            Sink::Json(w) => w.write(batch)?,
            Sink::Parquet(w) => w.write(batch)?,
        }
        Ok(())
    }

    fn finish(self) -> Result<()> {
        match self {
            Sink::Csv(w) => drop(w.into_inner()),
            Sink::Json(mut w) => w.finish()?,
            Sink::Parquet(w) => drop(w.close()?),
        }
        Ok(())
    }
}

/// Writes `spec` as `format` to `out`, generating batches on all cores while writing in order.
/// Memory stays at a few batches per core whatever the row count. Returns rows written.
pub fn write_to<W: Write + Send>(spec: &GenSpec, format: FileFormat, out: W) -> Result<u64> {
    let schema = spec.schema();
    let mut sink = match format {
        FileFormat::Csv => Sink::Csv(Box::new(
            arrow::csv::WriterBuilder::new().with_header(true).build(out),
        )),
        FileFormat::Json => Sink::Json(Box::new(arrow::json::LineDelimitedWriter::new(out))),
        FileFormat::Parquet => {
            let props = WriterProperties::builder()
                .set_compression(Compression::ZSTD(ZstdLevel::try_new(1)?))
                .build();
            Sink::Parquet(Box::new(ArrowWriter::try_new(out, schema, Some(props))?))
        }
    };
    let batch_rows = spec.batch_rows.max(1) as u64;
    let group = (rayon::current_num_threads() * 4) as u64;
    let mut start = 0;
    while start < spec.rows {
        let starts: Vec<u64> = (0..group)
            .map(|i| start + i * batch_rows)
            .take_while(|s| *s < spec.rows)
            .collect();
        let batches: Vec<RecordBatch> = starts
            .par_iter()
            .map(|s| spec.batch(*s, batch_rows as usize))
            .collect::<Result<_>>()?;
        for b in &batches {
            sink.write(b)?;
        }
        start += group * batch_rows;
    }
    sink.finish()?;
    Ok(spec.rows)
}

/// Writes `spec` to a file at `path` (`-` for standard output).
pub fn write_path(spec: &GenSpec, format: FileFormat, path: &Path) -> Result<u64> {
    if path.as_os_str() == "-" {
        if format == FileFormat::Parquet {
            return Err(Error::Config("parquet needs a file: pass --output PATH".into()));
        }
        return write_to(
            spec,
            format,
            std::io::BufWriter::with_capacity(1 << 20, std::io::stdout()),
        );
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .map_err(|e| Error::io(format!("creating {}", parent.display()), e))?;
    }
    let file =
        std::fs::File::create(path).map_err(|e| Error::io(format!("creating {}", path.display()), e))?;
    let out = std::io::BufWriter::with_capacity(1 << 20, file);
    write_to(spec, format, out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datagen::{Dataset, Nested};

    #[test]
    fn csv_is_identical_for_the_same_seed() {
        let mut spec = GenSpec::new(Dataset::Events, 20_000);
        spec.nested = Nested::JsonText;
        spec.batch_rows = 1000;
        let mut a = Vec::new();
        let mut b = Vec::new();
        assert_eq!(write_to(&spec, FileFormat::Csv, &mut a).unwrap(), 20_000);
        spec.batch_rows = 777;
        write_to(&spec, FileFormat::Csv, &mut b).unwrap();
        assert_eq!(a, b, "batch size must not change the output");
        let text = String::from_utf8(a).unwrap();
        assert_eq!(text.lines().count(), 20_001, "header + rows");
        assert!(text.starts_with("event_id,user_id,ts,kind,payload\n"));
    }

    #[test]
    fn parquet_round_trips_row_count() {
        let spec = GenSpec::new(Dataset::Orders, 3000);
        let mut buf = Vec::new();
        write_to(&spec, FileFormat::Parquet, &mut buf).unwrap();
        let reader =
            parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::from(buf))
                .unwrap()
                .build()
                .unwrap();
        let rows: usize = reader.map(|b| b.unwrap().num_rows()).sum();
        assert_eq!(rows, 3000);
    }

    #[test]
    fn csv_rejects_struct_columns_clearly() {
        let spec = GenSpec::new(Dataset::Events, 10);
        let err = write_to(&spec, FileFormat::Csv, Vec::new())
            .unwrap_err()
            .to_string();
        assert!(err.to_lowercase().contains("struct"), "{err}");
    }
}
