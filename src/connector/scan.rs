//! A scan node for connectors whose partitions are async producers: each partition runs as a
//! task that sends batches into a bounded channel (two batches), so a slow consumer holds the
//! producer back and memory stays at a few batches per partition.

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
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, ExecutionPlan, PlanProperties};
use tokio::sync::mpsc::Sender;

use crate::error::{Error, Result};

/// Where a partition's producer sends its batches. `send` returns false once the consumer is
/// gone (a LIMIT was reached, the query failed): the producer should stop.
#[derive(Clone)]
pub struct BatchSender(Sender<Result<RecordBatch>>);

impl BatchSender {
    pub async fn send(&self, batch: Result<RecordBatch>) -> bool {
        self.0.send(batch).await.is_ok()
    }

    /// `send` from a blocking thread (never from an async task).
    pub fn blocking_send(&self, batch: Result<RecordBatch>) -> bool {
        self.0.blocking_send(batch).is_ok()
    }

    /// Whether the consumer is gone.
    pub fn is_closed(&self) -> bool {
        self.0.is_closed()
    }
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
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<RecordBatch>>(2);
        let task = (self.producer)(partition, BatchSender(tx.clone()));
        let handle = tokio::spawn(task);
        // A producer that panics must not end the stream as if it had finished.
        tokio::spawn(async move {
            if let Err(e) = handle.await {
                let _ = tx
                    .send(Err(Error::Config(format!(
                        "scan partition {partition} failed: {e}"
                    ))))
                    .await;
            }
        });
        let baseline = BaselineMetrics::new(&self.metrics, partition);
        let stream = futures::stream::poll_fn(move |cx| {
            rx.poll_recv(cx).map(|o| {
                o.map(|r| match r {
                    Ok(b) => {
                        baseline.record_output(b.num_rows());
                        Ok(b)
                    }
                    Err(e) => Err(DataFusionError::from(e)),
                })
            })
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
