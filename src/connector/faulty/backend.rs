//! The FAULTY backend and its factory.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arrow::array::{Array, AsArray, BooleanArray, RecordBatch};
use arrow::datatypes::{Int64Type, SchemaRef};
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider, TableProviderFactory};
use datafusion::logical_expr::CreateExternalTable;

use crate::connector::options::{OptionSpec, TableOptions};
use crate::datagen::Rng;
use crate::error::{Error, Result};
use crate::sink::{
    Attempt, Outcome, SINK_OPTIONS, SinkBackend, SinkOptions, SinkTable, parse_duration, safe_name,
    write_parquet,
};

const OPTIONS: &[OptionSpec] = &[
    OptionSpec::new(
        "fail_ratio",
        "share of requests that fail transiently (0.0 - 1.0)",
    ),
    OptionSpec::new("fail_first", "the first N requests fail transiently"),
    OptionSpec::new(
        "too_many_requests",
        "the N requests after fail_first answer 'too many requests'",
    ),
    OptionSpec::new("retry_after", "the Retry-After those answers carry (e.g. 50ms)"),
    OptionSpec::new("down", "'true': every request fails (the sink is unreachable)"),
    OptionSpec::new("down_after", "the sink becomes unreachable after N requests"),
    OptionSpec::new("down_while", "the sink is unreachable while this file exists"),
    OptionSpec::new("reject_every", "rows whose key is a multiple of N are refused"),
    OptionSpec::new(
        "key",
        "the BIGINT column reject_every looks at; default the first",
    ),
    OptionSpec::new("delay", "time each request takes (e.g. 20ms)"),
    OptionSpec::new(
        "hang",
        "each request hangs this long (longer than 'timeout' to test it)",
    ),
    OptionSpec::new("seed", "seed of fail_ratio's choices"),
];

/// Builds FAULTY tables.
#[derive(Debug, Default)]
pub struct FaultyFactory;

#[async_trait]
impl TableProviderFactory for FaultyFactory {
    async fn create(
        &self,
        _state: &dyn Session,
        cmd: &CreateExternalTable,
    ) -> datafusion::error::Result<Arc<dyn TableProvider>> {
        let table = cmd.name.to_string();
        let specs: Vec<OptionSpec> = OPTIONS.iter().chain(SINK_OPTIONS).copied().collect();
        let o = TableOptions::parse("FAULTY", &table, &cmd.options, &specs)?;
        let schema: SchemaRef = Arc::new(cmd.schema.as_arrow().clone());
        if schema.fields().is_empty() {
            return Err(Error::Option(format!("table {table}: FAULTY needs a column list")).into());
        }
        let key = match o.get("key") {
            Some(k) => schema
                .index_of(k)
                .map_err(|_| o.bad_value("key", k, "no such column"))?,
            None => 0,
        };
        let dur = |name: &str| -> Result<Duration> {
            o.get(name)
                .map(|v| parse_duration(v).map_err(|m| o.bad_value(name, v, &m)))
                .unwrap_or(Ok(Duration::ZERO))
        };
        let dir = PathBuf::from(cmd.locations.first().cloned().unwrap_or_default());
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        let backend = FaultyBackend {
            dir,
            schema,
            fail_ratio: o.parse_or("fail_ratio", 0.0)?,
            fail_first: o.count_or("fail_first", 0)?,
            too_many: o.count_or("too_many_requests", 0)?,
            retry_after: dur("retry_after")?,
            down: o.parse_or("down", false)?,
            down_after: o.count_or("down_after", 0)?,
            down_while: o.get("down_while").map(PathBuf::from),
            reject_every: o.count_or("reject_every", 0)?,
            key,
            delay: dur("delay")?,
            hang: dur("hang")?,
            seed: o.parse_or("seed", 1)?,
            requests: AtomicU64::new(0),
        };
        Ok(Arc::new(SinkTable::new(
            backend,
            table,
            SinkOptions::from_options(&o)?,
        )?))
    }
}

/// A local-directory sink with injected faults.
#[derive(Debug)]
struct FaultyBackend {
    dir: PathBuf,
    schema: SchemaRef,
    fail_ratio: f64,
    fail_first: u64,
    too_many: u64,
    retry_after: Duration,
    down: bool,
    down_after: u64,
    down_while: Option<PathBuf>,
    reject_every: u64,
    key: usize,
    delay: Duration,
    hang: Duration,
    seed: u64,
    requests: AtomicU64,
}

impl FaultyBackend {
    /// Where the request with this token is stored.
    fn path_of(&self, token: &str) -> PathBuf {
        self.dir.join(format!("{}.parquet", safe_name(token)))
    }

    fn store(&self, batch: &RecordBatch, token: &str) -> Result<()> {
        write_parquet(&self.path_of(token), batch)
    }
}

#[async_trait]
impl SinkBackend for FaultyBackend {
    type Request = RecordBatch;

    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn encode(&self, batch: &RecordBatch) -> Result<RecordBatch> {
        Ok(batch.clone())
    }

    fn request_bytes(&self, request: &RecordBatch) -> usize {
        request.get_array_memory_size()
    }

    async fn was_delivered(&self, token: &str) -> Option<bool> {
        Some(self.path_of(token).exists())
    }

    async fn send(&self, batch: &RecordBatch, attempt: &Attempt<'_>) -> Outcome {
        attempt.bounded(self.apply(batch, attempt.token)).await
    }
}

impl FaultyBackend {
    async fn apply(&self, batch: &RecordBatch, token: &str) -> Outcome {
        let n = self.requests.fetch_add(1, Ordering::Relaxed);
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        if !self.hang.is_zero() {
            tokio::time::sleep(self.hang).await;
        }
        let retry = |reason: &str, after: Option<Duration>| Outcome::Retry {
            reason: reason.into(),
            after,
        };
        if self.down
            || (self.down_after > 0 && n >= self.down_after)
            || self.down_while.as_ref().is_some_and(|p| p.exists())
        {
            return retry("connection refused (injected: sink down)", None);
        }
        if n < self.fail_first {
            return retry("injected transient failure", None);
        }
        if n < self.fail_first + self.too_many {
            return retry("429 too many requests (injected)", Some(self.retry_after));
        }
        if self.fail_ratio > 0.0 {
            let mut r = Rng::new(self.seed ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            if (r.below(1 << 20) as f64) < self.fail_ratio * f64::from(1 << 20) {
                return retry("503 service unavailable (injected)", None);
            }
        }
        let mut rejected = Vec::new();
        if self.reject_every > 0 {
            let Some(keys) = batch.column(self.key).as_primitive_opt::<Int64Type>() else {
                return Outcome::Fatal {
                    reason: "reject_every needs a BIGINT key column".into(),
                };
            };
            for i in 0..keys.len() {
                if keys.is_valid(i) && (keys.value(i) as u64).is_multiple_of(self.reject_every) {
                    rejected.push((i, format!("value {} is not accepted (injected)", keys.value(i))));
                }
            }
        }
        let accepted = if rejected.is_empty() {
            batch.clone()
        } else {
            let keep: BooleanArray = (0..batch.num_rows())
                .map(|i| Some(rejected.binary_search_by_key(&i, |(r, _)| *r).is_err()))
                .collect();
            match arrow::compute::filter_record_batch(batch, &keep) {
                Ok(b) => b,
                Err(e) => {
                    return Outcome::Fatal {
                        reason: e.to_string(),
                    };
                }
            }
        };
        if let Err(e) = self.store(&accepted, token) {
            return retry(&format!("storing failed: {e}"), None);
        }
        if rejected.is_empty() {
            Outcome::Delivered
        } else {
            Outcome::Partial {
                rejected,
                retry: Vec::new(),
            }
        }
    }
}
