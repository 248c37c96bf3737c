//! The physical plan node of a GENERATE scan: one partition per slice of the row range.

use std::fmt;
use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use datafusion::common::Statistics;
use datafusion::common::stats::Precision;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::error::Result;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_expr::{EquivalenceProperties, Partitioning, PhysicalExpr};
use datafusion::physical_plan::coop::make_cooperative;
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType, SchedulingType};
use datafusion::physical_plan::metrics::{BaselineMetrics, ExecutionPlanMetricsSet, MetricsSet};
use datafusion::physical_plan::statistics::StatisticsArgs;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, ExecutionPlan, PlanProperties};
use futures::StreamExt;

use crate::datagen::GenSpec;

/// Generates rows `[p * per, (p + 1) * per)` in partition `p`, projected to the asked columns.
/// Counts its output rows, so progress sees them, and states its exact row count.
#[derive(Debug)]
pub struct GenerateExec {
    spec: Arc<GenSpec>,
    projection: Option<Vec<usize>>,
    schema: SchemaRef,
    partitions: usize,
    limit: Option<usize>,
    /// Rows per second over all partitions, when paced.
    rate: Option<f64>,
    metrics: ExecutionPlanMetricsSet,
    properties: Arc<PlanProperties>,
}

impl GenerateExec {
    /// Paces the scan at `rate` rows per second (over all partitions).
    pub fn with_rate(mut self, rate: Option<f64>) -> Self {
        self.rate = rate.filter(|r| *r > 0.0);
        self
    }

    /// A scan of `spec` in `partitions` slices.
    pub fn try_new(
        spec: Arc<GenSpec>,
        projection: Option<Vec<usize>>,
        partitions: usize,
        limit: Option<usize>,
    ) -> Result<Self> {
        let full = spec.schema();
        let schema = match &projection {
            Some(p) => Arc::new(full.project(p)?),
            None => full,
        };
        let properties = Arc::new(
            PlanProperties::new(
                EquivalenceProperties::new(Arc::clone(&schema)),
                Partitioning::UnknownPartitioning(partitions),
                EmissionType::Incremental,
                Boundedness::Bounded,
            )
            // Generation never waits on IO; the stream gives the thread back to tokio regularly
            // so that other tasks (progress, other partitions) keep running.
            .with_scheduling_type(SchedulingType::Cooperative),
        );
        Ok(Self {
            spec,
            projection,
            schema,
            partitions,
            limit,
            rate: None,
            metrics: ExecutionPlanMetricsSet::new(),
            properties,
        })
    }

    fn rows(&self) -> u64 {
        self.limit
            .map_or(self.spec.rows, |l| self.spec.rows.min(l as u64))
    }

    fn slice(&self, partition: usize) -> (u64, u64) {
        let rows = self.rows();
        let per = rows.div_ceil(self.partitions as u64);
        let start = (partition as u64 * per).min(rows);
        (start, (start + per).min(rows))
    }
}

impl DisplayAs for GenerateExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "GenerateExec: dataset={:?}, rows={}, seed={}, partitions={}",
            self.spec.dataset,
            self.rows(),
            self.spec.seed,
            self.partitions
        )?;
        if let Some(r) = self.rate {
            write!(f, ", rate={r} rows/s")?;
        }
        Ok(())
    }
}

impl ExecutionPlan for GenerateExec {
    fn name(&self) -> &'static str {
        "GenerateExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn with_new_children(
        self: Arc<Self>,
        _children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        Ok(self)
    }

    fn execute(&self, partition: usize, _ctx: Arc<TaskContext>) -> Result<SendableRecordBatchStream> {
        let (start, end) = self.slice(partition);
        let spec = Arc::clone(&self.spec);
        let projection = self.projection.clone();
        let step = spec.batch_rows.max(1);
        let baseline = BaselineMetrics::new(&self.metrics, partition);
        // Pacing: batch k of this partition is not made before its rows are due.
        let pace = self
            .rate
            .map(|r| (tokio::time::Instant::now(), r / self.partitions as f64));
        let batches = futures::stream::iter((start..end).step_by(step)).then(move |s| async move {
            if let Some((began, per_partition)) = pace {
                let due = std::time::Duration::from_secs_f64((s - start) as f64 / per_partition);
                tokio::time::sleep_until(began + due).await;
            }
            s
        });
        let batches = batches.map(move |s| {
            let timer = baseline.elapsed_compute().timer();
            let len = (step as u64).min(end - s) as usize;
            let batch = spec.batch(s, len)?;
            let batch = match &projection {
                Some(p) => batch.project(p)?,
                None => batch,
            };
            timer.done();
            baseline.record_output(batch.num_rows());
            Ok(batch)
        });
        Ok(make_cooperative(Box::pin(RecordBatchStreamAdapter::new(
            Arc::clone(&self.schema),
            batches,
        ))))
    }

    fn metrics(&self) -> Option<MetricsSet> {
        Some(self.metrics.clone_inner())
    }

    fn statistics_from_inputs(
        &self,
        _inputs: &[Arc<Statistics>],
        args: &StatisticsArgs,
    ) -> Result<Arc<Statistics>> {
        let rows = match args.partition() {
            Some(p) => {
                let (s, e) = self.slice(p);
                e - s
            }
            None => self.rows(),
        };
        Ok(Arc::new(
            Statistics::new_unknown(&self.schema).with_num_rows(Precision::Exact(rows as usize)),
        ))
    }
}
