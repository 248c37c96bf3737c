//! Runs the `.slt` files under `tests/slt/` against a fresh flumen engine each.
//!
//! Each file gets its own scratch directory, passed as `${SCRATCH}`; the bundled fixtures are
//! `${DATA}`. Statements go through flumen's own script handling, so `${VAR}` substitution,
//! statement checks and flumen's error messages are what the files see.
//!
//! `cargo test --test sqllogictests -- FILTER` runs the files whose name contains FILTER;
//! `-- --complete` rewrites the expected results from the actual ones.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::DataType;
use arrow::util::display::{ArrayFormatter, FormatOptions};
use async_trait::async_trait;
use flumen::engine::StatementKind;
use flumen::{Config, Flumen};
use sqllogictest::{DBOutput, DefaultColumnType};

struct FlumenDb {
    engine: Arc<Flumen>,
}

#[derive(Debug)]
struct DbError(String);

impl std::fmt::Display for DbError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for DbError {}

fn column_type(t: &DataType) -> DefaultColumnType {
    if t.is_integer() {
        DefaultColumnType::Integer
    } else if t.is_floating() || matches!(t, DataType::Decimal128(..) | DataType::Decimal256(..)) {
        DefaultColumnType::FloatingPoint
    } else {
        DefaultColumnType::Text
    }
}

fn rows_of(batches: &[RecordBatch]) -> Result<Vec<Vec<String>>, DbError> {
    let opts = FormatOptions::default().with_null("NULL");
    let mut rows = Vec::new();
    for b in batches {
        let fmts = b
            .columns()
            .iter()
            .map(|c| ArrayFormatter::try_new(c.as_ref(), &opts))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| DbError(e.to_string()))?;
        for r in 0..b.num_rows() {
            rows.push(
                fmts.iter()
                    .map(|f| {
                        let v = f.value(r).to_string();
                        if v.is_empty() { "(empty)".to_string() } else { v }
                    })
                    .collect(),
            );
        }
    }
    Ok(rows)
}

#[async_trait]
impl sqllogictest::AsyncDB for FlumenDb {
    type Error = DbError;
    type ColumnType = DefaultColumnType;

    async fn run(&mut self, sql: &str) -> Result<DBOutput<Self::ColumnType>, Self::Error> {
        let out = self
            .engine
            .sql(sql)
            .await
            .map_err(|e| DbError(self.engine.redactor().redact(&e.to_string())))?;
        if out.kind == StatementKind::Ddl {
            return Ok(DBOutput::StatementComplete(0));
        }
        let types = out
            .schema
            .fields()
            .iter()
            .map(|f| column_type(f.data_type()))
            .collect();
        Ok(DBOutput::Rows {
            types,
            rows: rows_of(&out.batches)?,
        })
    }

    async fn shutdown(&mut self) {}

    fn engine_name(&self) -> &str {
        "flumen"
    }

    async fn sleep(dur: std::time::Duration) {
        tokio::time::sleep(dur).await;
    }
}

fn slt_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "slt"))
        .collect();
    files.sort();
    files
}

async fn run_file(path: &Path, complete: bool) -> Result<(), String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let scratch = tempfile::tempdir().map_err(|e| e.to_string())?;
    let mut config = Config {
        // Small and fixed, so that spilling is exercised and results do not depend on the machine.
        memory_limit: Some(512 << 20),
        target_partitions: Some(4),
        ..Config::default()
    };
    config
        .vars
        .insert("DATA".into(), root.join("data").display().to_string());
    config
        .vars
        .insert("SCRATCH".into(), scratch.path().display().to_string());
    config
        .vars
        .insert("SQL".into(), root.join("sql").display().to_string());
    config.vars.insert("QUOTED".into(), "it's".into());
    config
        .vars
        .insert("DB_PASSWORD".into(), "hunter2-very-secret".into());
    let engine = Arc::new(Flumen::new(config).map_err(|e| e.to_string())?);
    let mut runner = sqllogictest::Runner::new(move || {
        let engine = Arc::clone(&engine);
        async move { Ok(FlumenDb { engine }) }
    });
    if complete {
        runner
            .update_test_file(
                path,
                " ",
                sqllogictest::default_validator,
                sqllogictest::default_normalizer,
                sqllogictest::default_column_validator,
            )
            .await
            .map_err(|e| e.to_string())
    } else {
        runner
            .run_file_async(path)
            .await
            .map_err(|e| e.display(true).to_string())
    }
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let complete = args.iter().any(|a| a == "--complete");
    let filters: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/slt");
    let (mut passed, mut failed) = (0, 0);
    for path in slt_files(&dir) {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !filters.is_empty() && !filters.iter().any(|f| name.contains(f.as_str())) {
            continue;
        }
        match run_file(&path, complete).await {
            Ok(()) => {
                println!("ok      {name}");
                passed += 1;
            }
            Err(e) => {
                println!("FAILED  {name}\n{e}");
                failed += 1;
            }
        }
    }
    println!("sqllogictests: {passed} passed, {failed} failed");
    if failed > 0 || passed == 0 {
        std::process::exit(1);
    }
}
