//! `STORED AS MONGODB`: a collection (or an aggregation pipeline) read as rows, rows written as
//! documents.
//!
//! ```sql
//! CREATE EXTERNAL TABLE orders STORED AS MONGODB
//!   LOCATION 'mongodb://etl:${MONGO_PASSWORD}@db:27017/shop?authSource=admin'
//!   OPTIONS ('collection' 'orders', 'read_preference' 'secondary_preferred');
//! ```
//!
//! Columns are declared, or inferred from `sample` documents ([`types`] has the type map).
//! Reads push the columns (a projection), simple filters (a find filter) and LIMIT to the
//! server and split the collection on `_id` ranges ([`source`]). Writes are unordered batches
//! of `insert` or `update` commands; refused documents go to dead letters ([`sink`]).

mod sink;
pub mod source;
pub mod types;

use std::sync::Arc;
use std::time::Duration;

use arrow::datatypes::{Field, Schema, SchemaRef};
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider, TableProviderFactory};
use datafusion::logical_expr::CreateExternalTable;
use mongodb::bson::{Document, doc};
use mongodb::options::{ClientOptions, ReadPreference, SelectionCriteria};
use mongodb::{Client, error::ErrorKind};

use self::sink::{Concern, MongoBackend, Op};
use self::source::MongoReader;
use crate::connector::options::{OptionSpec, TableOptions};
use crate::error::{Error, Result};
use crate::sink::{SINK_OPTIONS, SinkOptions, SinkTable, SourceSinkTable, WriteMode};

const OPTIONS: &[OptionSpec] = &[
    OptionSpec::new("collection", "the collection read and written"),
    OptionSpec::new(
        "database",
        "the database; default the one LOCATION names (mongodb://host:27017/DB)",
    ),
    OptionSpec::new(
        "read_preference",
        "primary (default), primary_preferred, secondary, secondary_preferred or nearest",
    ),
    OptionSpec::new(
        "pipeline",
        "reads: an aggregation pipeline (JSON array) whose output documents are the rows",
    ),
    OptionSpec::new(
        "sample",
        "documents sampled for the columns when none are declared (default 1000)",
    ),
    OptionSpec::new(
        "partitions",
        "reads: parallel _id ranges (integer or ObjectId _ids); default the number of cores",
    ),
    OptionSpec::new(
        "op",
        "writes: insert (default), upsert ($set on the keys' match) or replace (whole document); 'mode' 'upsert' is op replace",
    ),
    OptionSpec::new(
        "transaction",
        "'batch' (default) or 'job': the whole INSERT in one transaction (servers that have them)",
    ),
    OptionSpec::new(
        "write_concern",
        "writes: 'journaled' (default, {j: true}: a write the server answered survives its crash), 'majority' ({w: 'majority', j: true}) or 'server' (the server's default)",
    ),
];

/// A client error as one line, with the server's code where there is one.
pub fn text(e: &mongodb::error::Error) -> String {
    match &*e.kind {
        ErrorKind::Command(c) => format!("{} ({}): {}", c.code_name, c.code, c.message),
        ErrorKind::ServerSelection { message, .. } => {
            let first = message.split(". Topology:").next().unwrap_or(message);
            format!("cannot reach the server: {first} (is it running?)")
        }
        ErrorKind::Authentication { message, .. } => format!("authentication failed: {message}"),
        _ => e.to_string(),
    }
}

/// Whether retrying cannot help (credentials, permissions).
pub fn fatal(e: &mongodb::error::Error) -> bool {
    match &*e.kind {
        ErrorKind::Authentication { .. } | ErrorKind::InvalidArgument { .. } => true,
        ErrorKind::Command(c) => matches!(c.code, 13 | 18 | 26 | 8000),
        _ => false,
    }
}

/// Builds MONGODB tables.
#[derive(Debug)]
pub struct MongoFactory;

#[async_trait]
impl TableProviderFactory for MongoFactory {
    async fn create(
        &self,
        _state: &dyn Session,
        cmd: &CreateExternalTable,
    ) -> datafusion::error::Result<Arc<dyn TableProvider>> {
        let name = cmd.name.to_string();
        let at = |e: Error| Error::Option(format!("table {name}: {e}"));
        let specs: Vec<OptionSpec> = OPTIONS.iter().chain(SINK_OPTIONS).copied().collect();
        let o = TableOptions::parse("MONGODB", &name, &cmd.options, &specs)?;
        let sink = SinkOptions::from_options_with(
            &o,
            SinkOptions {
                batch_rows: 10_000,
                ..SinkOptions::default()
            },
        )?;
        let location = cmd.locations.first().cloned().unwrap_or_default();
        if !location.starts_with("mongodb://") && !location.starts_with("mongodb+srv://") {
            return Err(at(Error::Option(
                "LOCATION is not a URL like mongodb://user:${PASSWORD}@host:27017/db".into(),
            ))
            .into());
        }
        let mut opts = ClientOptions::parse(&location)
            .await
            .map_err(|e| at(Error::Option(format!("LOCATION: {}", text(&e)))))?;
        opts.server_selection_timeout
            .get_or_insert(Duration::from_secs(10));
        opts.connect_timeout.get_or_insert(Duration::from_secs(10));
        opts.app_name.get_or_insert("flumen".into());
        let host = opts.hosts.first().map(|h| h.to_string()).unwrap_or_default();
        let db = match o
            .get("database")
            .map(str::to_string)
            .or_else(|| opts.default_database.clone())
        {
            Some(d) => d,
            None => {
                return Err(at(Error::Option(
                    "no database: name it in LOCATION (mongodb://host:27017/DB) or OPTIONS ('database' 'DB')"
                        .into(),
                ))
                .into());
            }
        };
        let collection = o.required("collection").map_err(at)?.to_string();
        let read_pref = match o.choice_or(
            "read_preference",
            &[
                "primary",
                "primary_preferred",
                "secondary",
                "secondary_preferred",
                "nearest",
            ],
            "primary",
        )? {
            "primary_preferred" => Some(ReadPreference::PrimaryPreferred { options: None }),
            "secondary" => Some(ReadPreference::Secondary { options: None }),
            "secondary_preferred" => Some(ReadPreference::SecondaryPreferred { options: None }),
            "nearest" => Some(ReadPreference::Nearest { options: None }),
            _ => None,
        }
        .map(SelectionCriteria::ReadPreference);
        let pipeline: Option<Vec<Document>> = o
            .get("pipeline")
            .map(|p| {
                let v: serde_json::Value = serde_json::from_str(p)
                    .map_err(|e| o.bad_value("pipeline", p, &format!("not JSON: {e}")))?;
                let serde_json::Value::Array(stages) = v else {
                    return Err(o.bad_value("pipeline", p, "must be a JSON array of stages"));
                };
                stages
                    .into_iter()
                    .map(|s| match mongodb::bson::Bson::try_from(s) {
                        Ok(mongodb::bson::Bson::Document(d)) => Ok(d),
                        _ => Err(o.bad_value("pipeline", p, "every stage must be a JSON object")),
                    })
                    .collect()
            })
            .transpose()?;
        let client = Client::with_options(opts).map_err(|e| at(Error::Config(text(&e))))?;
        let declared: Vec<Arc<Field>> = cmd.schema.fields().iter().cloned().collect();
        // Reach the server now: a wrong password or host is reported at CREATE, naming it.
        // Declared columns let a table that is only written be created while it is down.
        if let Err(e) = client.database(&db).run_command(doc! {"ping": 1}).await {
            let msg = format!("mongodb {host}: {}", text(&e));
            if declared.is_empty() || fatal(&e) {
                return Err(at(Error::Config(msg)).into());
            }
            tracing::warn!("table {name}: {msg}; reads will fail until it answers");
        }
        let schema: SchemaRef = if !declared.is_empty() {
            Arc::new(Schema::new(declared))
        } else {
            let n = o.count_or("sample", 1000)?.max(1);
            source::infer(&client, &db, &collection, pipeline.as_deref(), n, &name)
                .await
                .map_err(|e| {
                    at(Error::Config(format!(
                        "{e}; declare the columns instead: CREATE EXTERNAL TABLE {name} (_id VARCHAR, ...) STORED AS MONGODB"
                    )))
                })?
        };
        let col = |c: &str| -> Result<String> {
            schema
                .field_with_name(c)
                .map(|f| f.name().clone())
                .map_err(|_| at(Error::Option(format!("'{c}' is not a column of the table"))))
        };
        // 'mode' 'upsert' is a replace-one upsert on the keys; 'op' says the same more finely
        // ('upsert' sets the given fields only), and may not contradict the mode.
        let op = match o.choice_or("op", &["insert", "upsert", "replace"], "insert")? {
            "upsert" => Op::Upsert,
            "replace" => Op::Replace,
            _ if matches!(sink.mode, WriteMode::Upsert(_)) => Op::Replace,
            _ => Op::Insert,
        };
        match (&sink.mode, o.get("op")) {
            (WriteMode::Upsert(_), Some(_)) if op == Op::Insert => {
                return Err(at(Error::Option(
                    "'mode' 'upsert' and 'op' 'insert' contradict each other".into(),
                ))
                .into());
            }
            (WriteMode::Append, Some(_)) if o.get("mode").is_some() && op != Op::Insert => {
                return Err(at(Error::Option(format!(
                    "'mode' 'append' and 'op' '{}' contradict each other",
                    op.name()
                )))
                .into());
            }
            _ => {}
        }
        let keys: Vec<String> = match o.get("keys") {
            Some(k) => k.split(',').map(|c| col(c.trim())).collect::<Result<_>>()?,
            None if op != Op::Insert => vec![col("_id").map_err(|_| {
                at(Error::Option(format!(
                    "'op' '{}' matches documents on 'keys' (default _id, which is not a column)",
                    op.name()
                )))
            })?],
            None => Vec::new(),
        };
        let job = o.choice_or("transaction", &["batch", "job"], "batch")? == "job";
        let concern = match o.choice_or("write_concern", &["journaled", "majority", "server"], "journaled")? {
            "majority" => Concern::Majority,
            "server" => Concern::Server,
            _ => Concern::Journaled,
        };
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let reader = MongoReader {
            client: client.clone(),
            db: db.clone(),
            collection: collection.clone(),
            table: name.clone(),
            host: host.clone(),
            schema: Arc::clone(&schema),
            pipeline,
            read_pref,
            partitions: o.parse_or("partitions", cores)?.max(1),
        };
        let backend = MongoBackend::new(
            client,
            db,
            collection,
            name.clone(),
            host,
            Arc::clone(&schema),
            op,
            keys,
            job,
            concern,
        );
        let mut sink = sink;
        if op != Op::Insert {
            // Updates apply in input order: with a key repeated across requests, the last row wins.
            sink.concurrency = 1;
        }
        Ok(Arc::new(SourceSinkTable::new(
            reader,
            SinkTable::new(backend, name, sink)?,
        )))
    }
}
