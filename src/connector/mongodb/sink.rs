//! Writing documents: unordered `insert` or `update` commands (each at most ~8 MiB and 50,000
//! documents), so one refused document does not stop the others. Each refusal comes back with
//! its index: duplicate keys and validation failures go to dead letters with the server's
//! message; lost connections and write-concern failures retry the request.
//!
//! Inserts without an `_id` column get ObjectIds derived from the request's delivery token and
//! the row, so a request sent again (retry, `flumen resume`) cannot insert a document twice: the
//! repeat is a duplicate key, counted as delivered. (Their embedded time is therefore not the
//! insert time.) With `'transaction' 'job'` every request of the statement runs in one
//! transaction, committed at the end or aborted on the first failure.

use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use mongodb::bson::{Bson, Document, doc, oid::ObjectId};
use mongodb::{Client, ClientSession};
use tokio::sync::Mutex;

use super::types::to_bson;
use super::{fatal, text};
use crate::error::{Error, Result};
use crate::sink::{Attempt, Effects, Outcome, SinkBackend};

/// What a write does with each row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Insert,
    Upsert,
    Replace,
}

impl Op {
    pub fn name(self) -> &'static str {
        match self {
            Op::Insert => "insert",
            Op::Upsert => "upsert",
            Op::Replace => "replace",
        }
    }
}

/// Writes a MONGODB table.
pub struct MongoBackend {
    client: Client,
    db: String,
    collection: String,
    table: String,
    host: String,
    schema: SchemaRef,
    op: Op,
    keys: Vec<String>,
    job: bool,
    /// Inserts whose `_id`s flumen makes.
    generated_ids: bool,
    /// The write concern of every write (and of a job's commit).
    concern: Concern,
    session: Mutex<Option<ClientSession>>,
}

/// How far a write must have gone before the server answers (option `write_concern`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Concern {
    /// `{j: true}`: on the server's journal, so a write answered is not lost when the server
    /// dies (the default: a recovery trusts every write answered).
    Journaled,
    /// `{w: "majority", j: true}`: on the journal of a majority of the replica set.
    Majority,
    /// The server's or connection string's default (`{w: 1}` for mongod: a write answered may be
    /// lost if the server dies before its next journal flush).
    Server,
}

impl Concern {
    /// The `writeConcern` document, if any.
    fn document(self) -> Option<Document> {
        match self {
            Concern::Journaled => Some(doc! {"j": true}),
            Concern::Majority => Some(doc! {"w": "majority", "j": true}),
            Concern::Server => None,
        }
    }

    fn driver(self) -> Option<mongodb::options::WriteConcern> {
        use mongodb::options::{Acknowledgment, WriteConcern};
        match self {
            Concern::Journaled => Some(WriteConcern::builder().journal(true).build()),
            Concern::Majority => Some(
                WriteConcern::builder()
                    .w(Acknowledgment::Majority)
                    .journal(true)
                    .build(),
            ),
            Concern::Server => None,
        }
    }
}

impl std::fmt::Debug for MongoBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MongoBackend({}.{})", self.db, self.collection)
    }
}

impl MongoBackend {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        client: Client,
        db: String,
        collection: String,
        table: String,
        host: String,
        schema: SchemaRef,
        op: Op,
        keys: Vec<String>,
        job: bool,
        concern: Concern,
    ) -> Self {
        let generated_ids = op == Op::Insert && schema.field_with_name("_id").is_err();
        Self {
            client,
            db,
            collection,
            table,
            host,
            schema,
            op,
            keys,
            job,
            generated_ids,
            concern,
            session: Mutex::new(None),
        }
    }
}

/// The documents of one request with their BSON sizes (`Err`: a row refused before sending,
/// with the reason).
pub struct MongoRequest {
    items: Vec<std::result::Result<(Document, usize), String>>,
    bytes: usize,
}

/// An ObjectId made from a delivery token and a row: the first 12 bytes of the XXH3-128 of
/// the token, a 0 byte and the row as 4 little-endian bytes. XXH3 is a specified hash, so a
/// request sent again by another flumen version (a resume after an upgrade) gets the same ids.
fn derived_id(token: &str, row: u32) -> ObjectId {
    let mut input = Vec::with_capacity(token.len() + 5);
    input.extend_from_slice(token.as_bytes());
    input.push(0);
    input.extend_from_slice(&row.to_le_bytes());
    let h = xxhash_rust::xxh3::xxh3_128(&input).to_be_bytes();
    let mut bytes = [0u8; 12];
    bytes.copy_from_slice(&h[..12]);
    ObjectId::from_bytes(bytes)
}

impl MongoBackend {
    /// One statement of an `update` command: the keys' match, and the row as `$set` (its
    /// NULL columns `$unset`, `_id` only on insert) or as the whole replacement document.
    fn update(&self, d: &Document) -> Bson {
        let q: Document = self
            .keys
            .iter()
            .filter_map(|k| d.get(k).map(|v| (k.clone(), v.clone())))
            .collect();
        let u = if self.op == Op::Replace {
            d.clone()
        } else {
            let mut set = Document::new();
            let mut on_insert = Document::new();
            for (k, v) in d {
                if k == "_id" {
                    on_insert.insert(k, v.clone());
                } else {
                    set.insert(k, v.clone());
                }
            }
            let unset: Document = self
                .schema
                .fields()
                .iter()
                .filter(|f| !d.contains_key(f.name()) && f.name() != "_id")
                .map(|f| (f.name().clone(), Bson::String(String::new())))
                .collect();
            let mut u = doc! {"$set": set};
            if !on_insert.is_empty() {
                u.insert("$setOnInsert", on_insert);
            }
            if !unset.is_empty() {
                u.insert("$unset", unset);
            }
            u
        };
        Bson::Document(doc! {"q": q, "u": u, "upsert": true})
    }
}

#[async_trait]
impl SinkBackend for MongoBackend {
    type Request = MongoRequest;

    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn encode(&self, batch: &RecordBatch) -> Result<MongoRequest> {
        self.encode_rows(batch, "", None)
    }

    fn encode_rows(&self, batch: &RecordBatch, token: &str, rows: Option<&[u32]>) -> Result<MongoRequest> {
        let names: Vec<&String> = self.schema.fields().iter().map(|f| f.name()).collect();
        let mut items = Vec::with_capacity(batch.num_rows());
        let mut bytes = 0;
        for r in 0..batch.num_rows() {
            let mut d = Document::new();
            if self.generated_ids {
                let row = rows.and_then(|v| v.get(r).copied()).unwrap_or(r as u32);
                d.insert("_id", derived_id(token, row));
            }
            let mut refused = None;
            for (c, name) in batch.columns().iter().zip(&names) {
                if let Some(why) = super::types::out_of_range(c, r) {
                    refused = Some(format!("column {name}: {why}"));
                    break;
                }
                if let Some(v) = to_bson(c, r, name.as_str() == "_id") {
                    d.insert(name.as_str(), v);
                }
            }
            if let Some(why) = refused {
                items.push(Err(why));
                continue;
            }
            if let Some(k) = self.keys.iter().find(|k| !d.contains_key(k.as_str())) {
                items.push(Err(format!("key column {k} is NULL")));
                continue;
            }
            let size = mongodb::bson::to_vec(&d).map(|v| v.len()).unwrap_or(0);
            bytes += size;
            items.push(Ok((d, size)));
        }
        Ok(MongoRequest { items, bytes })
    }

    fn request_bytes(&self, request: &MongoRequest) -> usize {
        request.bytes
    }

    fn describe(&self) -> String {
        format!(
            "mongodb {} {}.{} op={}{}{}",
            self.host,
            self.db,
            self.collection,
            self.op.name(),
            if self.keys.is_empty() {
                String::new()
            } else {
                format!(" keys={}", self.keys.join(","))
            },
            if self.job { " transaction=job" } else { "" }
        )
    }

    fn all_or_nothing(&self) -> bool {
        self.job
    }

    /// `upsert` is a replace-one upsert on the keys (default `_id`). No `overwrite`: MongoDB
    /// has no atomic switch of a collection's contents that every server offers.
    fn modes(&self) -> &'static [&'static str] {
        &["append", "upsert"]
    }

    async fn send(&self, req: &MongoRequest, attempt: &Attempt<'_>) -> Outcome {
        match attempt.bounded(self.apply(req)).await {
            // In a transaction, a command that got no answer may still apply: never again.
            Outcome::Retry { reason, .. } if self.job => Outcome::Fatal {
                reason: format!("{reason}; the transaction is rolled back"),
            },
            o => o,
        }
    }

    async fn finish(&self, ok: bool, _effects: &Effects) -> Result<()> {
        let Some(mut s) = self.session.lock().await.take() else {
            return Ok(());
        };
        let r = if ok {
            s.commit_transaction().await
        } else {
            s.abort_transaction().await
        };
        r.map_err(|e| {
            Error::Config(format!(
                "table {}: mongodb {}: {} the transaction: {}",
                self.table,
                self.host,
                if ok { "committing" } else { "aborting" },
                text(&e)
            ))
        })
    }
}

impl MongoBackend {
    /// Sends a request's documents as `insert` or `update` commands of at most ~8 MiB.
    async fn apply(&self, req: &MongoRequest) -> Outcome {
        let mut rejected: Vec<(usize, String)> = Vec::new();
        let mut retry: Vec<usize> = Vec::new();
        let db = self.client.database(&self.db);
        let mut session = self.session.lock().await;
        if self.job && session.is_none() {
            let started = async {
                let mut s = self.client.start_session().await?;
                match self.concern.driver() {
                    Some(c) => s.start_transaction().write_concern(c).await?,
                    None => s.start_transaction().await?,
                }
                Ok::<_, mongodb::error::Error>(s)
            }
            .await;
            match started {
                Ok(s) => *session = Some(s),
                Err(e) => {
                    return Outcome::Fatal {
                        reason: format!(
                            "table {}: mongodb {}: cannot start a transaction ({}); servers without transactions (standalone mongod) need 'transaction' 'batch'",
                            self.table,
                            self.host,
                            text(&e)
                        ),
                    };
                }
            }
        }
        // Commands of at most ~8 MiB and 50,000 documents.
        let mut chunk: Vec<(usize, &Document)> = Vec::new();
        let mut size = 0;
        let mut pending: Vec<Vec<(usize, &Document)>> = Vec::new();
        for (i, item) in req.items.iter().enumerate() {
            match item {
                Err(why) => rejected.push((i, why.clone())),
                Ok((d, s)) => {
                    if !chunk.is_empty() && (size + s > 8 << 20 || chunk.len() >= 50_000) {
                        pending.push(std::mem::take(&mut chunk));
                        size = 0;
                    }
                    size += s;
                    chunk.push((i, d));
                }
            }
        }
        if !chunk.is_empty() {
            pending.push(chunk);
        }
        let mut reason = String::new();
        // Inside a transaction the commit carries the write concern, not the commands.
        let concern = if session.is_some() {
            None
        } else {
            self.concern.document()
        };
        for chunk in pending {
            let mut cmd = match self.op {
                Op::Insert => doc! {
                    "insert": &self.collection,
                    "documents": chunk.iter().map(|(_, d)| Bson::Document((*d).clone())).collect::<Vec<_>>(),
                    "ordered": false,
                },
                Op::Upsert | Op::Replace => {
                    let updates: Vec<Bson> = chunk.iter().map(|(_, d)| self.update(d)).collect();
                    doc! {"update": &self.collection, "updates": updates, "ordered": false}
                }
            };
            if let Some(c) = &concern {
                cmd.insert("writeConcern", c.clone());
            }
            let answer = match session.as_mut() {
                Some(s) => db.run_command(cmd).session(s).await,
                None => db.run_command(cmd).await,
            };
            match answer {
                Err(e) => {
                    let msg = format!("table {}: mongodb {}: {}", self.table, self.host, text(&e));
                    if fatal(&e) || self.job {
                        return Outcome::Fatal { reason: msg };
                    }
                    retry.extend(chunk.iter().map(|(i, _)| *i));
                    reason = msg;
                }
                Ok(reply) => {
                    if let Ok(wce) = reply.get_document("writeConcernError") {
                        let msg = format!(
                            "table {}: mongodb {}: write concern: {}",
                            self.table,
                            self.host,
                            wce.get_str("errmsg").unwrap_or_default()
                        );
                        if self.job {
                            return Outcome::Fatal { reason: msg };
                        }
                        retry.extend(chunk.iter().map(|(i, _)| *i));
                        reason = msg;
                        continue;
                    }
                    if let Ok(errors) = reply.get_array("writeErrors") {
                        for e in errors {
                            let Bson::Document(e) = e else { continue };
                            let index = match e.get("index") {
                                Some(Bson::Int32(i)) => *i as usize,
                                Some(Bson::Int64(i)) => *i as usize,
                                _ => continue,
                            };
                            let code = match e.get("code") {
                                Some(Bson::Int32(c)) => *c as i64,
                                Some(Bson::Int64(c)) => *c,
                                _ => 0,
                            };
                            let Some((row, _)) = chunk.get(index) else {
                                continue;
                            };
                            let msg = e.get_str("errmsg").unwrap_or_default();
                            if self.job {
                                return Outcome::Fatal {
                                    reason: format!(
                                        "table {}: mongodb {}: row {row}: {msg} (code {code}); the transaction is rolled back",
                                        self.table, self.host
                                    ),
                                };
                            }
                            // A derived _id already there: this row was delivered by an earlier try.
                            if code == 11000 && self.generated_ids {
                                continue;
                            }
                            rejected.push((*row, format!("mongodb code {code}: {msg}")));
                        }
                    }
                }
            }
        }
        if retry.is_empty() && rejected.is_empty() {
            Outcome::Delivered
        } else if rejected.is_empty() && retry.len() == req.items.len() {
            Outcome::Retry { reason, after: None }
        } else {
            Outcome::Partial { rejected, retry }
        }
    }
}
