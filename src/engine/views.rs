//! Running the materialized-view statements (`crate::cube`) on the engine's session.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::RecordBatch;
use datafusion::common::DFSchema;
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::logical_expr::{DdlStatement, LogicalPlan};
use futures::StreamExt;

use super::run::Mode;
use super::{Flumen, Statement};
use crate::cube::mv::{self, Target, VIEW_OPTIONS, ViewDef, Watermark, quote};
use crate::cube::statement::ViewStatement;
use crate::error::{Error, Result};

/// What a view statement gives back.
pub(super) enum ViewOutput {
    /// A line for the user.
    Message(String),
    /// `SHOW MATERIALIZED VIEWS`.
    Rows(RecordBatch),
}

/// The tables a plan scans, with the columns each has.
fn scanned_tables(plan: &LogicalPlan) -> Result<Vec<(String, Vec<String>)>> {
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    plan.apply(|p| {
        if let LogicalPlan::TableScan(s) = p {
            let name = s.table_name.table().to_string();
            if !out.iter().any(|(n, _)| *n == name) {
                let cols = s
                    .source
                    .schema()
                    .fields()
                    .iter()
                    .map(|f| f.name().clone())
                    .collect();
                out.push((name, cols));
            }
        }
        Ok(TreeNodeRecursion::Continue)
    })?;
    Ok(out)
}

impl Flumen {
    /// Runs (or, in explain mode, only plans) one materialized-view statement. `view` has its
    /// variables substituted; `written` is the same statement as written, which is what the
    /// warehouse keeps.
    pub(super) async fn run_view(
        &self,
        view: &ViewStatement,
        written: &ViewStatement,
        mode: Mode,
        line: usize,
    ) -> Result<ViewOutput> {
        let wh = &self.warehouse;
        match view {
            ViewStatement::CreateCube {
                name,
                if_not_exists,
                def,
                options,
            } => {
                let written_query = match written {
                    ViewStatement::CreateCube { def, .. } => def.query(),
                    _ => def.query(),
                };
                let query = def.query();
                let cube = Some(def.clone());
                self.create_view(
                    name,
                    *if_not_exists,
                    options,
                    &query,
                    written_query,
                    cube,
                    None,
                    mode,
                    line,
                )
                .await
            }
            ViewStatement::Create {
                name,
                if_not_exists,
                options,
                target,
                query,
            } => {
                // What the warehouse keeps is the statement as written: no secret is stored.
                let (written_query, written_target) = match written {
                    ViewStatement::Create { query, target, .. } => (query.clone(), target.clone()),
                    _ => (query.clone(), target.clone()),
                };
                if let Some(t) = &written_target {
                    self.check_target(name, t)?;
                }
                self.create_view(
                    name,
                    *if_not_exists,
                    options,
                    query,
                    written_query,
                    None,
                    written_target,
                    mode,
                    line,
                )
                .await
            }
            ViewStatement::Refresh { name, incremental } => {
                let mut def = wh.load(name)?.ok_or_else(|| {
                    Error::Config(format!(
                        "no materialized view {name} in {} (SHOW MATERIALIZED VIEWS lists them)",
                        wh.dir().display()
                    ))
                })?;
                self.declare_sources(&def).await?;
                let query = self.substitute(&Statement {
                    text: def.query.clone(),
                    line,
                })?;
                if mode == Mode::Explain {
                    let plan = self.ctx.state().create_logical_plan(&query).await?;
                    let text = self.explain(plan).await?;
                    return Ok(ViewOutput::Message(format!(
                        "-- statement at line {line}: refreshes materialized view {name} from:\n{}\n",
                        self.redactor.redact(&text)
                    )));
                }
                let kind = if def.cube.is_some() {
                    "cube"
                } else {
                    "materialized view"
                };
                let r = wh.refresh(&self.ctx, &mut def, &query, *incremental).await?;
                // A view stored with a connector: the target gets the new version whole.
                let published = match &def.target {
                    Some(_) if r.version > 0 => format!(
                        "; {} rows written to {}",
                        self.publish(&def).await?,
                        self.target_shown(&def)
                    ),
                    _ => String::new(),
                };
                let column = def.watermark.as_ref().map_or("", |w| w.column.as_str());
                let range = match &r.watermark {
                    Some((from, to)) if from == to => {
                        format!(
                            ", nothing new past {column} {}",
                            from.as_deref().unwrap_or("(none)")
                        )
                    }
                    Some((from, to)) => format!(
                        ", {column} past {} up to {}",
                        from.as_deref().unwrap_or("the start"),
                        to.as_deref().unwrap_or("the same")
                    ),
                    None => String::new(),
                };
                Ok(ViewOutput::Message(if r.incremental && r.appended > 0 {
                    format!(
                        "{kind} {name} refreshed incrementally{range}: {} rows appended, {} rows (version {}){published}",
                        r.appended, r.rows, r.version
                    )
                } else if r.incremental {
                    format!(
                        "{kind} {name} refreshed incrementally{range}: {} rows (version {}){published}",
                        r.rows, r.version
                    )
                } else {
                    format!(
                        "{kind} {name} refreshed: {} rows (version {}){published}",
                        r.rows, r.version
                    )
                }))
            }
            ViewStatement::Drop { name, if_exists } => {
                if mode == Mode::Explain {
                    return Ok(ViewOutput::Message(format!(
                        "-- statement at line {line}: drops materialized view {name}\n"
                    )));
                }
                let kind = match wh.load(name)? {
                    Some(d) if d.cube.is_some() => "cube",
                    _ => "materialized view",
                };
                match wh.drop_view(&self.ctx, name)? {
                    true => Ok(ViewOutput::Message(format!("{kind} {name} dropped"))),
                    false if *if_exists => Ok(ViewOutput::Message(format!(
                        "no materialized view or cube {name}: nothing dropped"
                    ))),
                    false => Err(Error::Config(format!(
                        "no materialized view or cube {name} to drop"
                    ))),
                }
            }
            ViewStatement::Show => Ok(ViewOutput::Rows(wh.show()?)),
        }
    }

    /// `CREATE MATERIALIZED VIEW` and `CREATE CUBE`: checks, keeps the definition, materializes.
    #[allow(clippy::too_many_arguments)]
    async fn create_view(
        &self,
        name: &str,
        if_not_exists: bool,
        options: &[(String, String)],
        query: &str,
        written_query: String,
        cube: Option<crate::cube::model::CubeDef>,
        target: Option<Target>,
        mode: Mode,
        line: usize,
    ) -> Result<ViewOutput> {
        let wh = &self.warehouse;
        let kind = if cube.is_some() {
            "cube"
        } else {
            "materialized view"
        };
        if wh.load(name)?.is_some() {
            if if_not_exists {
                return Ok(ViewOutput::Message(format!(
                    "{kind} {name} exists: left as it is"
                )));
            }
            return Err(Error::Config(format!(
                "{kind} {name} already exists (DROP MATERIALIZED VIEW {name} first, or CREATE ... IF NOT EXISTS)"
            )));
        }
        if self.ctx.table_exist(name)? {
            return Err(Error::Config(format!(
                "{kind} {name}: a table of that name exists"
            )));
        }
        let mut opts = BTreeMap::new();
        for (k, v) in options {
            if !VIEW_OPTIONS.contains(&k.as_str()) {
                return Err(Error::Option(format!(
                    "{kind} {name}: unknown option '{k}'; valid options: {}",
                    VIEW_OPTIONS.join(", ")
                )));
            }
            opts.insert(k.clone(), v.clone());
        }
        let plan = self.ctx.state().create_logical_plan(query).await?;
        let tables = scanned_tables(&plan)?;
        let sources = tables
            .iter()
            .filter_map(|(t, _)| self.run.template(t).map(|tpl| (t.clone(), tpl)))
            .collect();
        let watermark = opts
            .get("watermark")
            .map(|w| resolve_watermark(name, w, &tables))
            .transpose()?;
        // A cube merges through its own state (`CubeDef::merge_query`).
        let shape = match (&watermark, &cube) {
            (Some(_), None) => mv::shape(name, query)?,
            _ => None,
        };
        if let Some(t) = &target {
            // Declared before anything is computed: a connector that cannot hold the view
            // stops the statement here.
            let schema = plan.schema().as_arrow().clone();
            self.declare_target(name, t, &schema).await?;
        }
        if mode == Mode::Explain {
            let text = self.explain(plan).await?;
            let stored = match &target {
                Some(t) => format!(
                    " (each refresh also replaces the rows of {})",
                    self.redactor.redact(&t.shown())
                ),
                None => String::new(),
            };
            return Ok(ViewOutput::Message(format!(
                "-- statement at line {line}: creates {kind} {name} in {}{stored} from:\n{}\n",
                wh.dir().display(),
                self.redactor.redact(&text)
            )));
        }
        let mut def = ViewDef {
            name: name.to_string(),
            query: written_query,
            options: opts,
            sources,
            watermark,
            shape,
            cube,
            target,
            version: 0,
            rows: 0,
            refreshed_at: None,
        };
        let r = wh.refresh(&self.ctx, &mut def, query, false).await?;
        let published = match &def.target {
            Some(_) => format!(
                "; {} rows written to {}",
                self.publish(&def).await?,
                self.target_shown(&def)
            ),
            None => String::new(),
        };
        Ok(ViewOutput::Message(format!(
            "{kind} {name} created: {} rows (version {}){published}",
            r.rows, r.version
        )))
    }

    /// Refuses target options the view decides itself.
    fn check_target(&self, view: &str, t: &Target) -> Result<()> {
        if let Some((k, _)) = t.options.iter().find(|(k, _)| k.eq_ignore_ascii_case("mode")) {
            return Err(Error::Option(format!(
                "materialized view {view}: option '{k}': the view decides how its target is written (each refresh replaces the target's rows); leave '{k}' out"
            )));
        }
        Ok(())
    }

    /// The name the view's target table is registered under in this run.
    fn target_table(view: &str) -> String {
        format!("__mv_target_{view}")
    }

    /// `STORED AS X LOCATION '...'` of a view, secrets removed.
    fn target_shown(&self, def: &ViewDef) -> String {
        let shown = def.target.as_ref().map(|t| t.shown()).unwrap_or_default();
        let sql = self
            .substitute(&Statement { text: shown, line: 0 })
            .unwrap_or_default();
        self.redactor.redact(&sql)
    }

    /// Declares the view's target (in overwrite mode) with the view's columns.
    async fn declare_target(&self, view: &str, t: &Target, schema: &arrow::datatypes::Schema) -> Result<()> {
        let table = Self::target_table(view);
        self.ctx
            .deregister_table(datafusion::common::TableReference::bare(table.as_str()))?;
        let declared = async {
            for c in self.check_script(&t.declaration(&table))? {
                let plan = match self.plan_checked(&c).await? {
                    LogicalPlan::Ddl(DdlStatement::CreateExternalTable(mut cmd)) => {
                        cmd.schema = Arc::new(DFSchema::try_from(schema.clone())?);
                        LogicalPlan::Ddl(DdlStatement::CreateExternalTable(cmd))
                    }
                    other => other,
                };
                self.execute(plan).await?;
            }
            Ok::<_, Error>(())
        }
        .await;
        declared.map_err(|e| {
            let shown = self.redactor.redact(&t.shown());
            Error::Config(self.redactor.redact(&format!(
                "materialized view {view}: {shown} cannot hold the view: each refresh replaces the target's rows, which needs the connector's 'mode' 'overwrite': {e}"
            )))
        })
    }

    /// Replaces the rows of the view's target with the view's current version; the rows
    /// written.
    async fn publish(&self, def: &ViewDef) -> Result<u64> {
        let Some(t) = &def.target else {
            return Ok(0);
        };
        let table = Self::target_table(&def.name);
        if !self
            .ctx
            .table_exist(datafusion::common::TableReference::bare(table.as_str()))?
        {
            let schema = self.ctx.table_provider(quote(&def.name)).await?.schema();
            self.declare_target(&def.name, t, &schema).await?;
        }
        let plan = self
            .ctx
            .state()
            .create_logical_plan(&format!(
                "INSERT INTO {} SELECT * FROM {}",
                quote(&table),
                quote(&def.name)
            ))
            .await?;
        let plan = self.prepare(plan).await?;
        let mut running = self.execute(plan).await?;
        let mut written = 0;
        if let Some(mut stream) = running.stream.take() {
            while let Some(batch) = stream.next().await {
                written += super::run::count_of(&batch?);
            }
        }
        running.commit()?;
        Ok(written)
    }

    /// Creates the source tables a view reads that this run has not declared, from the
    /// statements kept with the view (their `${VAR}`s substituted now).
    async fn declare_sources(&self, def: &ViewDef) -> Result<()> {
        for (table, template) in &def.sources {
            if self.ctx.table_exist(table.as_str())? {
                continue;
            }
            for c in self.check_script(template)? {
                let plan = self.plan_checked(&c).await?;
                self.execute(plan).await?;
            }
        }
        Ok(())
    }
}

/// The table and column a `'watermark'` option names (`column` or `table.column`).
fn resolve_watermark(view: &str, w: &str, tables: &[(String, Vec<String>)]) -> Result<Watermark> {
    let (table, column) = match w.split_once('.') {
        Some((t, c)) => (Some(t), c),
        None => (None, w),
    };
    let holders: Vec<&String> = tables
        .iter()
        .filter(|(t, cols)| {
            table.is_none_or(|x| x.eq_ignore_ascii_case(t)) && cols.iter().any(|c| c == column)
        })
        .map(|(t, _)| t)
        .collect();
    match holders.as_slice() {
        [one] => Ok(Watermark {
            table: (*one).clone(),
            column: column.to_string(),
            value: None,
        }),
        [] => Err(Error::Option(format!(
            "materialized view {view}: option 'watermark': no table the query reads has a column '{w}' (it reads {})",
            tables
                .iter()
                .map(|(t, _)| t.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
        many => Err(Error::Option(format!(
            "materialized view {view}: option 'watermark': tables {} all have column '{column}': write table.column",
            many.iter().map(|t| t.as_str()).collect::<Vec<_>>().join(", ")
        ))),
    }
}

impl Flumen {
    /// The ClickHouse deployment of cube `name`: its source's columns give the types.
    pub async fn cube_deployment(
        &self,
        name: &str,
        raw_table: Option<&str>,
        legacy: bool,
    ) -> Result<crate::cube::clickhouse::Deployment> {
        self.register_views().await?;
        let def = self
            .warehouse
            .load(name)?
            .ok_or_else(|| Error::Config(format!("no cube {name} in {}", self.warehouse.dir().display())))?;
        let cube = def.cube.clone().ok_or_else(|| {
            Error::Config(format!(
                "{name} is a materialized view, not a cube (CREATE CUBE makes one)"
            ))
        })?;
        self.declare_sources(&def).await?;
        let schema = self.ctx.table_provider(cube.source.as_str()).await?.schema();
        let target = crate::cube::clickhouse::Target {
            raw_table: raw_table.unwrap_or(&cube.source).to_string(),
            legacy,
        };
        crate::cube::clickhouse::deployment(name, &cube, &schema, &target)
    }

    /// Creates cube `name`'s table and materialized view on the ClickHouse server at
    /// `location`, then backfills from the raw table; returns the deployment and the server's
    /// version.
    pub async fn deploy_cube(
        &self,
        name: &str,
        location: &str,
        raw_table: Option<&str>,
    ) -> Result<(crate::cube::clickhouse::Deployment, String)> {
        let client = crate::connector::clickhouse::client::Client::from_location(
            location,
            std::time::Duration::from_secs(600),
        )?;
        let shown = self.redactor.redact(location);
        let fail = |what: &str, e: &dyn std::fmt::Display| {
            Error::Config(format!("cube {name}: clickhouse {shown}: {what}: {e}"))
        };
        let version = client
            .query("SELECT version()")
            .await
            .map_err(|e| fail("asking its version", &e))?
            .trim()
            .to_string();
        let major: u32 = version
            .split('.')
            .next()
            .and_then(|m| m.parse().ok())
            .unwrap_or(0);
        let d = self.cube_deployment(name, raw_table, major < 20).await?;
        for sql in &d.create {
            client.query(sql).await.map_err(|e| fail(sql, &e))?;
        }
        client
            .query(&d.backfill)
            .await
            .map_err(|e| fail("backfilling", &e))?;
        Ok((d, version))
    }
}
