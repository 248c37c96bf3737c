//! A scan node for connectors whose partitions are async producers: each partition runs as a
//! task that sends batches into a bounded channel (two batches), so a slow consumer holds the
//! producer back and memory stays at a few batches per partition.
//!
//! The task belongs to the stream (DataFusion's `RecordBatchReceiverStreamBuilder`): a producer
//! that panics is the query's error, never a clean end of the stream, and dropping the stream
//! (a LIMIT reached, the query cancelled) aborts it. No task is detached.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use datafusion::common::DataFusionError;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::error::Result as DfResult;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_expr::{EquivalenceProperties, Partitioning, PhysicalExpr};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::metrics::{BaselineMetrics, ExecutionPlanMetricsSet, MetricsSet};
use datafusion::physical_plan::stream::{RecordBatchReceiverStreamBuilder, RecordBatchStreamAdapter};
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, ExecutionPlan, PlanProperties};
use futures::StreamExt;
use tokio::sync::mpsc::Sender;

use crate::error::Result;

/// Where a partition's producer sends its batches. `send` returns false once the consumer is
/// gone (a LIMIT was reached, the query failed): the producer should stop.
#[derive(Clone)]
pub struct BatchSender(Sender<DfResult<RecordBatch>>);

impl BatchSender {
    pub async fn send(&self, batch: Result<RecordBatch>) -> bool {
        self.0.send(batch.map_err(DataFusionError::from)).await.is_ok()
    }

    /// `send` from a blocking thread (never from an async task).
    pub fn blocking_send(&self, batch: Result<RecordBatch>) -> bool {
        self.0.blocking_send(batch.map_err(DataFusionError::from)).is_ok()
    }

    /// Whether the consumer is gone.
    pub fn is_closed(&self) -> bool {
        self.0.is_closed()
    }
}

/// Runs a scan task; a panic becomes the scan's error (DataFusion would resume the panic in
/// the consumer, taking the process down with it).
pub async fn caught<F: Future<Output = DfResult<()>>>(partition: usize, task: F) -> DfResult<()> {
    use futures::FutureExt;
    std::panic::AssertUnwindSafe(task)
        .catch_unwind()
        .await
        .map_err(|p| panicked(partition, p.as_ref()))?
}

/// [`caught`] for a blocking task.
pub fn caught_blocking(partition: usize, task: impl FnOnce() -> DfResult<()>) -> DfResult<()> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(task))
        .map_err(|p| panicked(partition, p.as_ref()))?
}

/// The error of a scan task that panicked, with the panic's message.
fn panicked(partition: usize, p: &(dyn std::any::Any + Send)) -> DataFusionError {
    let what = p
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".into());
    DataFusionError::Execution(format!("scan partition {partition} failed: {what}"))
}

/// Produces the batches of one partition.
pub type Producer = Arc<dyn Fn(usize, BatchSender) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// A scan of `partitions` producers.
pub struct StreamScanExec {
    name: &'static str,
    /// What `explain` shows after the name.
    label: String,
    schema: SchemaRef,
    producer: Producer,
    metrics: ExecutionPlanMetricsSet,
    properties: Arc<PlanProperties>,
}

impl fmt::Debug for StreamScanExec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.name, self.label)
    }
}

impl StreamScanExec {
    pub fn new(
        name: &'static str,
        label: String,
        schema: SchemaRef,
        partitions: usize,
        producer: Producer,
    ) -> Self {
        let properties = Arc::new(PlanProperties::new(
            EquivalenceProperties::new(Arc::clone(&schema)),
            Partitioning::UnknownPartitioning(partitions.max(1)),
            EmissionType::Incremental,
            Boundedness::Bounded,
        ));
        Self {
            name,
            label,
            schema,
            producer,
            metrics: ExecutionPlanMetricsSet::new(),
            properties,
        }
    }
}

impl StreamScanExec {
    /// Uses `metrics` (where the producers keep counters of their own, such as pages fetched)
    /// instead of a fresh set.
    pub fn with_metrics(mut self, metrics: ExecutionPlanMetricsSet) -> Self {
        self.metrics = metrics;
        self
    }
}

impl DisplayAs for StreamScanExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}: {}", self.name, self.label)
    }
}

impl ExecutionPlan for StreamScanExec {
    fn name(&self) -> &'static str {
        self.name
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> DfResult<TreeNodeRecursion>,
    ) -> DfResult<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn with_new_children(
        self: Arc<Self>,
        _children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        Ok(self)
    }

    fn execute(&self, partition: usize, _ctx: Arc<TaskContext>) -> DfResult<SendableRecordBatchStream> {
        let mut builder = RecordBatchReceiverStreamBuilder::new(Arc::clone(&self.schema), 2);
        let task = (self.producer)(partition, BatchSender(builder.tx()));
        builder.spawn(caught(partition, async move {
            task.await;
            Ok(())
        }));
        let baseline = BaselineMetrics::new(&self.metrics, partition);
        let stream = builder.build().inspect(move |r| {
            if let Ok(b) = r {
                baseline.record_output(b.num_rows());
            }
        });
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            Arc::clone(&self.schema),
            stream,
        )))
    }

    fn metrics(&self) -> Option<MetricsSet> {
        Some(self.metrics.clone_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::Int64Array;
    use arrow::datatypes::{DataType, Field, Schema};
    use futures::TryStreamExt;

    fn scan(fail: bool) -> StreamScanExec {
        let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, false)]));
        let s = Arc::clone(&schema);
        let producer: Producer = Arc::new(move |_, tx: BatchSender| {
            let s = Arc::clone(&s);
            Box::pin(async move {
                let b = RecordBatch::try_new(s, vec![Arc::new(Int64Array::from(vec![1, 2]))]);
                tx.send(b.map_err(Into::into)).await;
                if fail {
                    panic!("the producer broke");
                }
            })
        });
        StreamScanExec::new("TestScanExec", String::new(), schema, 1, producer)
    }

    #[tokio::test]
    async fn a_producer_that_panics_is_the_query_error_not_an_end() {
        let ctx = Arc::new(TaskContext::default());
        let rows: Vec<RecordBatch> = scan(false)
            .execute(0, Arc::clone(&ctx))
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        assert_eq!(rows.iter().map(|b| b.num_rows()).sum::<usize>(), 2);
        let got: DfResult<Vec<RecordBatch>> = scan(true).execute(0, ctx).unwrap().try_collect().await;
        let e = got.unwrap_err().to_string();
        assert!(e.contains("scan partition 0 failed: the producer broke"), "{e}");
    }
}
