//! The ELASTICSEARCH table: `INSERT INTO` sends bulk requests through the shared sink machinery.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arrow::array::RecordBatch;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider, TableProviderFactory};
use datafusion::logical_expr::CreateExternalTable;
use serde_json::Value;
use url::Url;

use super::bulk::{
    BulkSpec, IndexPart, ItemOutcome, Op, encode, epoch_millis_columns, parse_index, read_response,
};
use super::mapping::{MappingStyle, derive, to_arrow};
use super::source::{EsReader, ID};
use crate::connector::http::{decode, error_text};
use crate::connector::options::{OptionSpec, TableOptions};
use crate::error::{Error, Result};
use crate::sink::{
    Attempt, Effects, Outcome, SINK_OPTIONS, SinkBackend, SinkOptions, SinkTable, SourceSinkTable, WriteMode,
};

const OPTIONS: &[OptionSpec] = &[
    OptionSpec::new(
        "index",
        "index name (required); may hold {column} or {column:%Y.%m.%d} for time-based indices",
    ),
    OptionSpec::new(
        "id_column",
        "column whose value is the document _id (a column named _id is it by default; '_id' adds one to columns read from the mapping)",
    ),
    OptionSpec::new(
        "op",
        "'index' (default), 'create', 'update', 'upsert' or 'delete'",
    ),
    OptionSpec::new("routing_column", "column whose value routes the document"),
    OptionSpec::new("pipeline", "ingest pipeline for every document"),
    OptionSpec::new(
        "create_index",
        "'if_not_exists' (default: with the mapping) or 'never'",
    ),
    OptionSpec::new(
        "mappings",
        "explicit mapping JSON, instead of one derived from the columns",
    ),
    OptionSpec::new(
        "strings",
        "string mapping: 'keyword' (default), 'text' or 'text_keyword'",
    ),
    OptionSpec::new(
        "decimals",
        "decimal mapping: 'scaled_float' (default, up to 15 digits) or 'keyword'",
    ),
    OptionSpec::new("nested", "'true': structs mapped as nested instead of object"),
    OptionSpec::new("refresh", "bulk refresh: 'false' (default), 'true' or 'wait_for'"),
    OptionSpec::new("user", "basic-auth user (or user:password@ in LOCATION)"),
    OptionSpec::new("password", "basic-auth password; pass it as ${VAR}"),
    OptionSpec::new("api_key", "API key (Authorization: ApiKey); pass it as ${VAR}"),
    OptionSpec::new("bearer", "bearer token; pass it as ${VAR}"),
    OptionSpec::new(
        "ca_cert",
        "PEM file of the CA that signed the server's certificate",
    ),
    OptionSpec::new("insecure", "'true': accept any TLS certificate (off by default)"),
    OptionSpec::new("query", "reads: a query DSL JSON object every search starts from"),
    OptionSpec::new(
        "partitions",
        "reads: parallel scroll slices, or ranges of an integer search_after column; default 1",
    ),
    OptionSpec::new(
        "search_after",
        "reads: page with search_after sorted by this column (a distinct value per document) instead of scroll",
    ),
];

/// Bulk-sized defaults: ~2k rows or 4 MiB of Arrow data per request (about 5-10 MB of JSON).
fn defaults() -> SinkOptions {
    SinkOptions {
        batch_rows: 5_000,
        batch_bytes: 4 << 20,
        ..SinkOptions::default()
    }
}

/// Builds ELASTICSEARCH tables.
#[derive(Debug, Default)]
pub struct ElasticsearchFactory;

#[async_trait]
impl TableProviderFactory for ElasticsearchFactory {
    async fn create(
        &self,
        _state: &dyn Session,
        cmd: &CreateExternalTable,
    ) -> datafusion::error::Result<Arc<dyn TableProvider>> {
        let name = cmd.name.to_string();
        let specs: Vec<OptionSpec> = OPTIONS.iter().chain(SINK_OPTIONS).copied().collect();
        let o = TableOptions::parse("ELASTICSEARCH", &name, &cmd.options, &specs)?;
        let sink = SinkOptions::from_options_with(&o, defaults())?;
        let location = cmd.locations.first().cloned().unwrap_or_default();
        let client = Client::new(&location, &o, sink.timeout)?;
        let index_text = o.required("index")?.to_string();
        // What reads search: the index, or for a template every index it can make.
        let read_index = read_pattern(&index_text);
        let declared: Vec<Arc<Field>> = cmd.schema.fields().iter().cloned().collect();
        // With declared columns the server need not answer yet (a load spills and resumes).
        let mapped = match fetch_properties(&client, &read_index).await {
            Ok(m) => m,
            Err(e) if !declared.is_empty() && e.to_string().starts_with("cannot reach") => {
                tracing::warn!("table {name}: {e}; using the declared columns");
                None
            }
            Err(e) => return Err(Error::Config(format!("table {name}: {e}")).into()),
        };
        let fields: Vec<Arc<Field>> = if !declared.is_empty() {
            declared
        } else if let Some(p) = &mapped {
            // The document id reads as a column when 'id_column' names `_id`.
            let id = (o.get("id_column") == Some(ID)).then(|| Arc::new(Field::new(ID, DataType::Utf8, true)));
            id.into_iter()
                .chain(to_arrow(p).into_iter().map(Arc::new))
                .collect()
        } else {
            return Err(Error::Option(format!(
                "table {name}: index '{read_index}' does not exist; declare the columns: CREATE EXTERNAL TABLE {name} (id BIGINT, ...) STORED AS ELASTICSEARCH"
            ))
            .into());
        };
        let at = |e: Error| Error::Option(format!("table {name}: {e}"));
        let index = parse_index(&index_text, &fields).map_err(at)?;
        let col = |opt: &str| -> Result<Option<usize>> {
            o.get(opt)
                .map(|c| {
                    fields.iter().position(|f| f.name() == c).ok_or_else(|| {
                        Error::Option(format!(
                            "table {name}: option '{opt}': '{c}' is not a column of the table"
                        ))
                    })
                })
                .transpose()
        };
        // 'mode' 'upsert' matches documents on `_id`: its one key column is the id column.
        let keyed = match &sink.mode {
            WriteMode::Upsert(keys) => match keys.as_slice() {
                [] => None,
                [k] => Some(fields.iter().position(|f| f.name() == k).ok_or_else(|| {
                    Error::Option(format!(
                        "table {name}: 'keys': '{k}' is not a column of the table"
                    ))
                })?),
                _ => {
                    return Err(Error::Option(format!(
                        "table {name}: 'mode' 'upsert' matches documents on _id, one column; make one key column (e.g. SELECT concat(a, '-', b) AS id) and name it in 'keys'"
                    ))
                    .into());
                }
            },
            _ => None,
        };
        // A column named `_id` is the document id: read from each hit, never part of `_source`.
        let named_id = match (col("id_column")?, keyed) {
            (Some(a), Some(b)) if a != b => {
                return Err(Error::Option(format!(
                    "table {name}: 'keys' and 'id_column' name different columns; with 'mode' 'upsert' the key is the document id"
                ))
                .into());
            }
            (a, b) => a.or(b),
        };
        let id_column = match (named_id, fields.iter().position(|f| f.name() == ID)) {
            (Some(c), Some(i)) if c != i => {
                return Err(Error::Option(format!(
                    "table {name}: column {ID} is the document id; 'id_column' cannot name another column"
                ))
                .into());
            }
            (c, i) => c.or(i),
        };
        let routing_column = col("routing_column")?;
        let search_after = col("search_after")?;
        if search_after.is_some() && (search_after == id_column || search_after == routing_column) {
            return Err(Error::Option(format!(
                "table {name}: 'search_after' names the id or routing column, which documents do not hold as a field; name a field with a distinct value per document"
            ))
            .into());
        }
        let search_after = search_after.map(|i| fields[i].name().clone());
        let op = Op::parse(o.choice_or("op", &["index", "create", "update", "upsert", "delete"], "index")?)
            .unwrap_or(Op::Index);
        match (&sink.mode, op) {
            (WriteMode::Upsert(_), Op::Index | Op::Upsert) if id_column.is_none() => {
                return Err(Error::Option(format!(
                    "table {name}: 'mode' 'upsert' needs the document id: 'keys' (or 'id_column') naming its column"
                ))
                .into());
            }
            (WriteMode::Upsert(_), Op::Index | Op::Upsert) | (WriteMode::Append, _) => {}
            (WriteMode::Overwrite, Op::Index | Op::Create) => {
                if index.len() != 1 || !matches!(index.first(), Some(IndexPart::Text(_))) {
                    return Err(Error::Option(format!(
                        "table {name}: 'mode' 'overwrite' needs one index name, not the template '{index_text}' (an alias is switched to the new index)"
                    ))
                    .into());
                }
                if o.get("create_index") == Some("never") {
                    return Err(Error::Option(format!(
                        "table {name}: 'mode' 'overwrite' creates a new index each run; 'create_index' 'never' forbids it"
                    ))
                    .into());
                }
            }
            (m, _) => {
                return Err(Error::Option(format!(
                    "table {name}: 'mode' '{}' and 'op' '{}' contradict each other",
                    m.name(),
                    o.get("op").unwrap_or("index")
                ))
                .into());
            }
        }
        if op.needs_id() && id_column.is_none() {
            return Err(Error::Option(format!(
                "table {name}: 'op' '{}' needs 'id_column'",
                o.get("op").unwrap_or("")
            ))
            .into());
        }
        let style = MappingStyle {
            strings: o
                .choice_or("strings", &["keyword", "text", "text_keyword"], "keyword")?
                .to_string(),
            decimals: o
                .choice_or("decimals", &["scaled_float", "keyword"], "scaled_float")?
                .to_string(),
            nested: o.choice_or("nested", &["true", "false"], "false")? == "true",
        };
        let skip = |i: usize| Some(i) == id_column || Some(i) == routing_column;
        let mapping = match o.get("mappings") {
            Some(text) => serde_json::from_str::<Value>(text)
                .map_err(|e| Error::Option(format!("table {name}: option 'mappings' is not JSON: {e}")))?,
            None => derive(
                fields
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| !skip(*i))
                    .map(|(_, f)| f.as_ref()),
                &style,
            )
            .map_err(at)?,
        };
        let create_index =
            o.choice_or("create_index", &["if_not_exists", "never"], "if_not_exists")? == "if_not_exists";
        let refresh = o.choice_or("refresh", &["false", "true", "wait_for"], "false")?;
        let mut params = Vec::new();
        if refresh != "false" {
            params.push(("refresh".to_string(), refresh.to_string()));
        }
        if let Some(p) = o.get("pipeline") {
            params.push(("pipeline".to_string(), p.to_string()));
        }
        let schema = Arc::new(Schema::new(fields.clone()));
        // Exact string matches only on keyword fields: from the index's mapping when it exists,
        // else from the mapping flumen would create.
        let keyword = |m: &Value| m.get("type").and_then(Value::as_str) == Some("keyword");
        let exact_strings = match (&mapped, mapping.get("properties").and_then(Value::as_object)) {
            (Some(p), _) | (None, Some(p)) => p
                .iter()
                .filter(|(_, m)| keyword(m))
                .map(|(k, _)| k.clone())
                .collect(),
            (None, None) => Default::default(),
        };
        let base_query = o
            .get("query")
            .map(|q| {
                serde_json::from_str::<Value>(q)
                    .map_err(|e| Error::Option(format!("table {name}: option 'query' is not JSON: {e}")))
            })
            .transpose()?;
        let reader = EsReader {
            client: client.clone(),
            index: read_index,
            schema: Arc::clone(&schema),
            exact_strings,
            base_query,
            partitions: o.parse_or("partitions", 1usize)?.max(1),
            search_after,
            id_column: id_column.map(|i| fields[i].name().clone()),
            routing_column: routing_column.map(|i| fields[i].name().clone()),
        };
        let overwrite = (sink.mode == WriteMode::Overwrite).then(|| Overwrite {
            alias: index_text.clone(),
            generation: Mutex::new(None),
        });
        let backend = EsBackend {
            client,
            spec: BulkSpec {
                index,
                op,
                id_column,
                routing_column,
                epoch_millis: epoch_millis_columns(&mapping, &fields),
            },
            index_text,
            schema,
            mapping,
            create_index,
            params,
            known: Mutex::new(HashSet::new()),
            overwrite,
        };
        Ok(Arc::new(SourceSinkTable::new(
            reader,
            SinkTable::new(backend, name, sink)?,
        )))
    }
}

/// `logs-{ts:%Y.%m}` → `logs-*`.
fn read_pattern(template: &str) -> String {
    let mut out = String::new();
    let mut depth = 0;
    for c in template.chars() {
        match c {
            '{' => {
                if depth == 0 {
                    out.push('*');
                }
                depth += 1;
            }
            '}' => depth -= 1,
            _ if depth == 0 => out.push(c),
            _ => {}
        }
    }
    out
}

/// The merged top-level properties of the indices `index` names; `None` if there is none.
async fn fetch_properties(client: &Client, index: &str) -> Result<Option<serde_json::Map<String, Value>>> {
    let url = client.url(&format!("{index}/_mapping"))?;
    let resp = client
        .request(reqwest::Method::GET, url)
        .send()
        .await
        .map_err(|e| Error::Config(format!("cannot reach {}: {}", client.base(), error_text(&e))))?;
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    match status {
        200 => {}
        404 => return Ok(None),
        401 | 403 => return Err(Error::Config(auth_failed(status, &text))),
        _ => {
            return Err(Error::Config(format!(
                "reading the mapping of {index}: HTTP {status}: {}",
                first_line(&text)
            )));
        }
    }
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| Error::Config(format!("the mapping of {index} is not JSON: {e}")))?;
    let mut merged = serde_json::Map::new();
    for (_, idx) in v.as_object().into_iter().flatten() {
        if let Some(p) = idx.pointer("/mappings/properties").and_then(Value::as_object) {
            for (k, m) in p {
                merged.entry(k.clone()).or_insert_with(|| m.clone());
            }
        }
    }
    Ok((!merged.is_empty() || v.as_object().is_some_and(|o| !o.is_empty())).then_some(merged))
}

/// HTTP to one cluster; credentials in headers only.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: Url,
    auth: Option<String>,
}

impl Client {
    fn new(location: &str, o: &TableOptions, timeout: Duration) -> Result<Self> {
        let mut url = Url::parse(location)
            .map_err(|e| Error::Option(format!("LOCATION is not a URL like http://host:9200: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(Error::Option(format!(
                "LOCATION scheme '{}' is not http or https",
                url.scheme()
            )));
        }
        let user = o
            .get("user")
            .map(str::to_string)
            .or_else(|| (!url.username().is_empty()).then(|| decode(url.username())));
        let password = o
            .get("password")
            .map(str::to_string)
            .or_else(|| url.password().map(decode));
        let _ = url.set_username("");
        let _ = url.set_password(None);
        url.set_query(None);
        if !url.path().ends_with('/') {
            let p = format!("{}/", url.path());
            url.set_path(&p);
        }
        use base64::Engine as _;
        let auth = if let Some(k) = o.get("api_key") {
            Some(format!("ApiKey {k}"))
        } else if let Some(t) = o.get("bearer") {
            Some(format!("Bearer {t}"))
        } else {
            user.map(|u| {
                let pair = format!("{u}:{}", password.unwrap_or_default());
                format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(pair))
            })
        };
        let mut b = reqwest::Client::builder().timeout(timeout);
        if let Some(path) = o.get("ca_cert") {
            let pem = std::fs::read(path).map_err(|e| Error::io(format!("reading ca_cert {path}"), e))?;
            let cert = reqwest::Certificate::from_pem(&pem)
                .map_err(|e| Error::Option(format!("ca_cert {path} is not a PEM certificate: {e}")))?;
            b = b.add_root_certificate(cert);
        }
        if o.choice_or("insecure", &["true", "false"], "false")? == "true" {
            b = b.danger_accept_invalid_certs(true);
        }
        let http = b
            .build()
            .map_err(|e| Error::Config(format!("cannot build the HTTP client: {e}")))?;
        Ok(Self {
            http,
            base: url,
            auth,
        })
    }

    pub fn url(&self, path: &str) -> Result<Url> {
        self.base
            .join(path)
            .map_err(|e| Error::Config(format!("bad path {path}: {e}")))
    }

    pub fn request(&self, method: reqwest::Method, url: Url) -> reqwest::RequestBuilder {
        let mut r = self.http.request(method, url);
        if let Some(a) = &self.auth {
            r = r.header(reqwest::header::AUTHORIZATION, a);
        }
        r
    }

    /// The cluster's address, without credentials (for messages).
    pub fn base(&self) -> &Url {
        &self.base
    }
}

/// One bulk request.
#[derive(Debug)]
pub struct EsRequest {
    body: bytes::Bytes,
    items: usize,
    /// The distinct indices the items write.
    indices: Vec<String>,
}

#[derive(Debug)]
struct EsBackend {
    client: Client,
    spec: BulkSpec,
    index_text: String,
    schema: SchemaRef,
    mapping: Value,
    create_index: bool,
    params: Vec<(String, String)>,
    /// Indices known to exist (created or found).
    known: Mutex<HashSet<String>>,
    overwrite: Option<Overwrite>,
}

/// `mode` `overwrite`: each statement writes a new index `<index>-flumen-<ms>`; when every
/// document is in, it is refreshed and one `_aliases` request makes `<index>` name it (removing
/// the alias from the earlier generation, or the index `<index>` itself if it was a concrete
/// index), so that searches on `<index>` see the old documents or the new ones, never a
/// half-written index. Earlier generations flumen made are then deleted; other indices the
/// alias named are only unaliased. A failed statement deletes its new index.
#[derive(Debug)]
struct Overwrite {
    alias: String,
    /// The index this statement writes, chosen at its first request.
    generation: Mutex<Option<String>>,
}

impl Overwrite {
    fn generation(&self) -> String {
        let mut g = self.generation.lock().unwrap_or_else(|e| e.into_inner());
        g.get_or_insert_with(|| {
            let ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis());
            format!("{}-flumen-{ms}", self.alias)
        })
        .clone()
    }
}

/// A document id from a request's token and a row: the same row of the same request gets the
/// same id on every attempt and on `flumen resume`.
fn row_id(token: &str, row: u32) -> String {
    let h = token.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{h:016x}-{row}")
}

impl EsBackend {
    /// One JSON request; the answer's status and text.
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> std::result::Result<(u16, String), String> {
        let url = self.client.url(path).map_err(|e| e.to_string())?;
        let mut r = self.client.request(method, url);
        if let Some(b) = body {
            r = r
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(b.to_string());
        }
        let resp = r
            .send()
            .await
            .map_err(|e| format!("cannot reach {}: {}", self.client.base(), error_text(&e)))?;
        let status = resp.status().as_u16();
        Ok((status, resp.text().await.unwrap_or_default()))
    }

    /// Makes `alias` name `generation` (created empty if no document was written) in one
    /// `_aliases` request, then deletes the generations flumen made before.
    async fn switch_alias(&self, alias: &str, generation: &str) -> std::result::Result<(), String> {
        self.ensure_indices(&[generation.to_string()])
            .await
            .map_err(|o| match o {
                Outcome::Retry { reason, .. } | Outcome::Fatal { reason } => reason,
                _ => format!("creating {generation} failed"),
            })?;
        let ok = |(status, text): (u16, String), what: &str| {
            if (200..300).contains(&status) {
                Ok(text)
            } else {
                Err(format!("{what}: HTTP {status}: {}", first_line(&text)))
            }
        };
        ok(
            self.call(reqwest::Method::POST, &format!("{generation}/_refresh"), None)
                .await?,
            "refresh",
        )?;
        let (status, text) = self
            .call(reqwest::Method::GET, &format!("_alias/{alias}"), None)
            .await?;
        let aliased: Vec<String> = match status {
            200 => serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v.as_object().map(|o| o.keys().cloned().collect()))
                .unwrap_or_default(),
            _ => Vec::new(),
        };
        let mut actions: Vec<Value> = Vec::new();
        if aliased.is_empty() {
            // `alias` may be a concrete index: it goes in the same atomic request.
            let (status, _) = self.call(reqwest::Method::HEAD, alias, None).await?;
            if status == 200 {
                actions.push(serde_json::json!({ "remove_index": { "index": alias } }));
            }
        }
        for old in aliased.iter().filter(|i| i.as_str() != generation) {
            actions.push(serde_json::json!({ "remove": { "index": old, "alias": alias } }));
        }
        actions.push(serde_json::json!({ "add": { "index": generation, "alias": alias } }));
        ok(
            self.call(
                reqwest::Method::POST,
                "_aliases",
                Some(serde_json::json!({ "actions": actions })),
            )
            .await?,
            "switching the alias",
        )?;
        let ours = format!("{alias}-flumen-");
        for old in aliased
            .iter()
            .filter(|i| i.starts_with(&ours) && i.as_str() != generation)
        {
            if let Err(e) = ok(self.call(reqwest::Method::DELETE, old, None).await?, "deleting") {
                tracing::warn!("elasticsearch: the earlier generation {old} stays: {e}");
            }
            self.known.lock().unwrap_or_else(|e| e.into_inner()).remove(old);
        }
        Ok(())
    }

    /// Creates the indices of a request that are not known yet (with the mapping).
    async fn ensure_indices(&self, indices: &[String]) -> std::result::Result<(), Outcome> {
        if !self.create_index {
            return Ok(());
        }
        let missing: Vec<String> = {
            let known = self.known.lock().unwrap_or_else(|e| e.into_inner());
            indices.iter().filter(|i| !known.contains(*i)).cloned().collect()
        };
        for index in missing {
            let url = self.client.url(&index).map_err(|e| Outcome::Fatal {
                reason: e.to_string(),
            })?;
            let body = serde_json::json!({ "mappings": self.mapping });
            let resp = self
                .client
                .request(reqwest::Method::PUT, url)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.to_string())
                .send()
                .await;
            let resp = match resp {
                Ok(r) => r,
                Err(e) => {
                    return Err(Outcome::Retry {
                        reason: format!("cannot reach {}: {}", self.client.base(), error_text(&e)),
                        after: None,
                    });
                }
            };
            let status = resp.status().as_u16();
            let text = resp.text().await.unwrap_or_default();
            let exists =
                text.contains("resource_already_exists_exception") || text.contains("already exists");
            match status {
                200..=299 => {}
                400 if exists => {}
                401 | 403 => {
                    return Err(Outcome::Fatal {
                        reason: auth_failed(status, &text),
                    });
                }
                429 | 500..=599 => {
                    return Err(Outcome::Retry {
                        reason: format!("creating index {index}: HTTP {status}: {}", first_line(&text)),
                        after: None,
                    });
                }
                _ => {
                    return Err(Outcome::Fatal {
                        reason: format!("creating index {index}: HTTP {status}: {}", first_line(&text)),
                    });
                }
            }
            self.known.lock().unwrap_or_else(|e| e.into_inner()).insert(index);
        }
        Ok(())
    }
}

fn auth_failed(status: u16, text: &str) -> String {
    format!(
        "HTTP {status}: the server refused the credentials (check user/password, api_key or bearer): {}",
        first_line(text)
    )
}

fn first_line(text: &str) -> String {
    text.lines().next().unwrap_or("").chars().take(400).collect()
}

#[async_trait]
impl SinkBackend for EsBackend {
    type Request = EsRequest;

    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn encode(&self, batch: &RecordBatch) -> Result<EsRequest> {
        self.encode_rows(batch, "", None)
    }

    fn encode_rows(&self, batch: &RecordBatch, token: &str, rows: Option<&[u32]>) -> Result<EsRequest> {
        let id = |r: usize| row_id(token, rows.map_or(r as u32, |m| m[r]));
        let b = match &self.overwrite {
            Some(w) => {
                let mut spec = self.spec.clone();
                spec.index = vec![IndexPart::Text(w.generation())];
                encode(batch, &spec, &id)?
            }
            None => encode(batch, &self.spec, &id)?,
        };
        Ok(EsRequest {
            body: b.body.into(),
            items: b.items,
            indices: b.indices,
        })
    }

    fn request_bytes(&self, request: &EsRequest) -> usize {
        request.body.len()
    }

    fn describe(&self) -> String {
        let mut s = format!(
            "elasticsearch={} index={} op={:?}",
            self.client.base(),
            self.index_text,
            self.spec.op
        );
        if self.create_index {
            s.push_str(&format!(
                ", creates missing indices with mappings {}",
                self.mapping
            ));
        }
        s
    }

    fn modes(&self) -> &'static [&'static str] {
        &["append", "overwrite", "upsert"]
    }

    /// An overwrite's documents go to a new index that is switched in at the end, or deleted.
    fn all_or_nothing(&self) -> bool {
        self.overwrite.is_some()
    }

    fn serial(&self) -> bool {
        false
    }

    async fn finish(&self, ok: bool, _effects: &Effects) -> Result<()> {
        let Some(w) = &self.overwrite else {
            return Ok(());
        };
        let generation = w.generation();
        let result = if ok {
            self.switch_alias(&w.alias, &generation).await
        } else {
            let _ = self.call(reqwest::Method::DELETE, &generation, None).await;
            Ok(())
        };
        *w.generation.lock().unwrap_or_else(|e| e.into_inner()) = None;
        result.map_err(|e| Error::Config(format!("elasticsearch index {}: overwrite: {e}", w.alias)))
    }

    /// Bulk items carry ids derived from the token (or the `id_column`), so a bulk request that
    /// timed out and applied anyway is applied again to the same documents.
    async fn send(&self, request: &EsRequest, attempt: &Attempt<'_>) -> Outcome {
        attempt.bounded(self.bulk(request)).await
    }
}

impl EsBackend {
    /// One `_bulk` request, its answer read item by item.
    async fn bulk(&self, request: &EsRequest) -> Outcome {
        if let Err(o) = self.ensure_indices(&request.indices).await {
            return o;
        }
        let mut url = match self.client.url("_bulk") {
            Ok(u) => u,
            Err(e) => {
                return Outcome::Fatal {
                    reason: e.to_string(),
                };
            }
        };
        for (k, v) in &self.params {
            url.query_pairs_mut().append_pair(k, v);
        }
        let resp = self
            .client
            .request(reqwest::Method::POST, url)
            .header(reqwest::header::CONTENT_TYPE, "application/x-ndjson")
            .body(request.body.clone())
            .send()
            .await;
        let resp = match resp {
            Ok(r) => r,
            Err(e) => {
                return Outcome::Retry {
                    reason: format!("cannot reach {}: {}", self.client.base(), error_text(&e)),
                    after: None,
                };
            }
        };
        let status = resp.status().as_u16();
        let after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            // A server's wish, bounded: at most five minutes.
            .map(|s| Duration::from_secs(s.min(300)));
        let body = match resp.bytes().await {
            Ok(b) => b,
            Err(e) => {
                return Outcome::Retry {
                    reason: format!(
                        "the connection broke while reading the answer: {}",
                        error_text(&e)
                    ),
                    after: None,
                };
            }
        };
        let text = || String::from_utf8_lossy(&body[..body.len().min(2000)]).into_owned();
        match status {
            200..=299 => {}
            401 | 403 => {
                return Outcome::Fatal {
                    reason: auth_failed(status, &text()),
                };
            }
            413 => {
                return Outcome::Fatal {
                    reason: "HTTP 413: the bulk request is too large for the server; lower 'batch_bytes' or 'batch_rows'".into(),
                };
            }
            429 | 500..=599 => {
                return Outcome::Retry {
                    reason: format!("HTTP {status}: {}", first_line(&text())),
                    after,
                };
            }
            _ => {
                return Outcome::Fatal {
                    reason: format!("HTTP {status}: {}", first_line(&text())),
                };
            }
        }
        // A 409 on `create` with ids flumen made means an earlier attempt created the document.
        let items = match read_response(&body, request.items, self.spec.op, self.spec.id_column.is_none()) {
            Ok(i) => i,
            Err(e) => {
                return Outcome::Fatal {
                    reason: e.to_string(),
                };
            }
        };
        let mut rejected = Vec::new();
        let mut retry = Vec::new();
        for (i, item) in items.into_iter().enumerate() {
            match item {
                ItemOutcome::Done => {}
                ItemOutcome::Retry(_) => retry.push(i),
                ItemOutcome::Rejected(reason) => rejected.push((i, reason)),
            }
        }
        if rejected.is_empty() && retry.is_empty() {
            Outcome::Delivered
        } else {
            Outcome::Partial { rejected, retry }
        }
    }
}
