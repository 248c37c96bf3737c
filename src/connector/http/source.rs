//! Reading an API: pages fetched (numbered pages concurrently, linked pages in order), records
//! located in each body and decoded by arrow-json's (or arrow-csv's) decoder into batches that
//! stream out page by page. At most `concurrency` pages are held at a time.

use std::collections::{HashMap, VecDeque};
use std::io::Cursor;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use arrow::array::RecordBatch;
use arrow::datatypes::{Schema, SchemaRef};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::metrics::{ExecutionPlanMetricsSet, MetricBuilder};
use serde_json::value::RawValue;
use tokio::task::JoinHandle;
use url::Url;

use super::client::{Api, Counters};
use crate::connector::scan::{BatchSender, Producer, StreamScanExec};
use crate::error::{Error, Result};

/// Pages read without `max_pages` before the scan fails rather than read on: an API that
/// never ends (a cycle of pages it keeps renaming, a bug) stops here. A million pages of 100
/// records is 100M rows; `max_pages` raises it.
pub const DEFAULT_MAX_PAGES: u64 = 1_000_000;

/// How the body of a page holds its records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Ndjson,
    Csv,
}

/// How the next page is found.
#[derive(Debug, Clone)]
pub enum Paging {
    /// One request.
    None,
    /// `param = first + k * step` for page `k` (pages: step 1; offsets: step = page size).
    /// Fetched `concurrency` at a time; ends at a page with fewer than `size` records (or none).
    Numbered {
        param: String,
        first: u64,
        step: u64,
        size: Option<u64>,
    },
    /// The next request sends `param` = the value at JSON pointer `path` of this body.
    Cursor { param: String, path: String },
    /// The `Link: <...>; rel="next"` header.
    Link,
    /// The URL at JSON pointer `path` of this body.
    NextUrl { path: String },
}

impl Paging {
    pub fn name(&self) -> &'static str {
        match self {
            Paging::None => "none",
            Paging::Numbered { step: 1, .. } => "page",
            Paging::Numbered { .. } => "offset",
            Paging::Cursor { .. } => "cursor",
            Paging::Link => "link_header",
            Paging::NextUrl { .. } => "next_url",
        }
    }
}

/// Everything a scan of one HTTP table needs.
#[derive(Debug)]
pub struct HttpSource {
    pub api: Api,
    /// LOCATION with `params` and the page size applied.
    pub base: Url,
    pub paging: Paging,
    pub format: Format,
    /// JSON pointer to the records (JSON bodies).
    pub records: String,
    pub schema: SchemaRef,
    pub concurrency: usize,
    pub max_pages: Option<u64>,
}

/// A page's records, decoded.
struct Page {
    batches: Vec<RecordBatch>,
    records: usize,
    /// XXH3 of the body (numbered pages: a page repeated is caught).
    hash: u64,
}

/// Pages being fetched or decoded, in order; dropped (the scan ended or was aborted), they are
/// aborted and requests still retrying give up.
struct Tasks(
    VecDeque<JoinHandle<Result<Page>>>,
    Arc<std::sync::atomic::AtomicBool>,
);

impl std::ops::Deref for Tasks {
    type Target = VecDeque<JoinHandle<Result<Page>>>;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Tasks {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for Tasks {
    fn drop(&mut self) {
        self.1.store(true, Ordering::Relaxed);
        self.0.iter().for_each(JoinHandle::abort);
    }
}

/// Removes query parameter `name`.
pub fn remove_param(url: &mut Url, name: &str) {
    if !url.query_pairs().any(|(k, _)| k == name) {
        return;
    }
    let kept: Vec<(String, String)> = url
        .query_pairs()
        .filter(|(k, _)| k != name)
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    if kept.is_empty() {
        url.set_query(None);
    } else {
        url.query_pairs_mut().clear().extend_pairs(kept);
    }
}

/// Sets query parameter `name` to `value`, replacing any earlier value.
pub fn set_param(url: &mut Url, name: &str, value: &str) {
    let kept: Vec<(String, String)> = url
        .query_pairs()
        .filter(|(k, _)| k != name)
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    url.query_pairs_mut()
        .clear()
        .extend_pairs(kept)
        .append_pair(name, value);
}

/// The JSON value at `pointer` (RFC 6901) in `body`, without parsing what lies beside it;
/// `None` when a step is missing.
fn locate<'a>(body: &'a str, pointer: &str) -> std::result::Result<Option<&'a RawValue>, String> {
    let mut cur: &'a RawValue =
        serde_json::from_str(body).map_err(|e| format!("the body is not JSON: {e}"))?;
    if pointer.is_empty() || pointer == "/" {
        return Ok(Some(cur));
    }
    for seg in pointer.trim_start_matches('/').split('/') {
        let seg = seg.replace("~1", "/").replace("~0", "~");
        let text: &'a str = cur.get();
        match text.trim_start().as_bytes().first() {
            Some(b'{') => {
                let map: HashMap<String, &'a RawValue> =
                    serde_json::from_str(text).map_err(|e| e.to_string())?;
                match map.get(&seg) {
                    Some(v) => cur = v,
                    None => return Ok(None),
                }
            }
            Some(b'[') => {
                let items: Vec<&'a RawValue> = serde_json::from_str(text).map_err(|e| e.to_string())?;
                match seg.parse::<usize>().ok().and_then(|i| items.get(i)) {
                    Some(v) => cur = v,
                    None => return Ok(None),
                }
            }
            _ => return Ok(None),
        }
    }
    Ok(Some(cur))
}

/// A scalar at `pointer` as text (`None` for null, missing or empty).
fn scalar_at(body: &str, pointer: &str) -> std::result::Result<Option<String>, String> {
    let Some(v) = locate(body, pointer)? else {
        return Ok(None);
    };
    let t = v.get().trim();
    let s = if t.starts_with('"') {
        serde_json::from_str::<String>(t).map_err(|e| e.to_string())?
    } else if t == "null" {
        String::new()
    } else if t.starts_with(['{', '[']) {
        return Err(format!("{pointer} is not a string or number but {}", short(t)));
    } else {
        t.to_string()
    };
    Ok((!s.is_empty()).then_some(s))
}

fn short(s: &str) -> String {
    let mut out: String = s.chars().take(200).collect();
    if out.len() < s.len() {
        out.push_str("...");
    }
    out
}

/// The records of a JSON body at `pointer`, each followed by a newline (what arrow-json's
/// decoder reads), and how many there are.
fn json_records(body: &str, pointer: &str) -> std::result::Result<(Vec<u8>, usize), String> {
    let Some(v) = locate(body, pointer)? else {
        return Ok((Vec::new(), 0));
    };
    let t = v.get().trim_start();
    let items: Vec<&RawValue> = match t.as_bytes().first() {
        Some(b'[') => serde_json::from_str(t).map_err(|e| e.to_string())?,
        Some(b'{') => vec![v],
        _ if t.trim() == "null" => Vec::new(),
        _ => {
            return Err(format!(
                "'records' {} points at {}, not an array of objects",
                if pointer.is_empty() { "(the body)" } else { pointer },
                short(t)
            ));
        }
    };
    let mut out = Vec::with_capacity(t.len() + items.len());
    for r in &items {
        out.extend_from_slice(r.get().as_bytes());
        out.push(b'\n');
    }
    Ok((out, items.len()))
}

impl HttpSource {
    fn body<'a>(&self, url: &Url, body: &'a [u8]) -> Result<&'a str> {
        std::str::from_utf8(body).map_err(|e| self.at(url, &format!("the body is not UTF-8: {e}")))
    }

    fn endless(&self, url: &Url) -> Error {
        self.at(
            url,
            &format!(
                "read {DEFAULT_MAX_PAGES} pages and the API names more: give 'max_pages' to read that many (it stops there), if the API is that large"
            ),
        )
    }

    fn at(&self, url: &Url, why: &str) -> Error {
        Error::Config(format!(
            "table {}: GET {}: {}",
            self.api.table,
            self.api.shown(url),
            self.api.scrub(why)
        ))
    }

    /// Decodes one page into batches of `schema` (a projection of the table's columns).
    fn decode(&self, url: &Url, body: &[u8], schema: &SchemaRef, batch_rows: usize) -> Result<Page> {
        match self.format {
            Format::Csv => {
                let full = Arc::clone(&self.schema);
                let proj: Vec<usize> = schema
                    .fields()
                    .iter()
                    .filter_map(|f| full.index_of(f.name()).ok())
                    .collect();
                let reader = arrow::csv::ReaderBuilder::new(full)
                    .with_header(true)
                    .with_batch_size(batch_rows)
                    .with_projection(proj)
                    .build(Cursor::new(body))
                    .map_err(|e| self.at(url, &e.to_string()))?;
                let mut batches = Vec::new();
                let mut records = 0;
                for b in reader {
                    let b =
                        b.map_err(|e| self.at(url, &format!("after {records} records of the page: {e}")))?;
                    records += b.num_rows();
                    batches.push(b);
                }
                Ok(Page {
                    batches,
                    records,
                    hash: 0,
                })
            }
            Format::Json | Format::Ndjson => {
                let owned;
                let (bytes, count): (&[u8], Option<usize>) = if self.format == Format::Json {
                    let text = self.body(url, body)?;
                    let (b, n) = json_records(text, &self.records).map_err(|e| self.at(url, &e))?;
                    owned = b;
                    (&owned, Some(n))
                } else {
                    (body, None)
                };
                let batches = decode_json(bytes, schema, batch_rows).map_err(|e| {
                    let which = first_bad_record(bytes, schema);
                    self.at(url, &format!("{which}{e}"))
                })?;
                let records = count.unwrap_or_else(|| batches.iter().map(RecordBatch::num_rows).sum());
                Ok(Page {
                    batches,
                    records,
                    hash: 0,
                })
            }
        }
    }

    /// The URL of page `k` (numbered paging).
    fn numbered_url(&self, k: u64) -> Url {
        let mut u = self.base.clone();
        if let Paging::Numbered {
            param, first, step, ..
        } = &self.paging
        {
            set_param(&mut u, param, &(first + k * step).to_string());
        }
        u
    }

    /// Where the page after the one at `url` (with `body` and `link`) is, if anywhere.
    fn next_url(&self, url: &Url, body: &[u8], link: Option<&str>) -> Result<Option<Url>> {
        let next = match &self.paging {
            Paging::None | Paging::Numbered { .. } => None,
            Paging::Link => link.map(str::to_string),
            Paging::NextUrl { path } => scalar_at(self.body(url, body)?, path)
                .map_err(|e| self.at(url, &format!("'next_url_path': {e}")))?,
            Paging::Cursor { param, path } => {
                let c = scalar_at(self.body(url, body)?, path)
                    .map_err(|e| self.at(url, &format!("'cursor_path': {e}")))?;
                return Ok(c.map(|c| {
                    let mut u = self.base.clone();
                    set_param(&mut u, param, &c);
                    u
                }));
            }
        };
        next.map(|n| {
            url.join(&n)
                .map_err(|e| self.at(url, &format!("the next page's URL '{n}': {e}")))
        })
        .transpose()
    }

    /// Streams every page's batches of the `want`ed columns into `tx`, stopping after `limit` rows.
    async fn produce(
        self: Arc<Self>,
        schema: SchemaRef,
        project_out: bool,
        limit: Option<usize>,
        batch_rows: usize,
        counters: Counters,
        tx: &BatchSender,
    ) -> Result<()> {
        let mut sent = 0usize;
        // Sends a page's batches; false once the consumer is gone or the limit is reached.
        let emit = |page: Page, sent: &mut usize| {
            let tx = tx.clone();
            let mut out = Vec::new();
            for b in page.batches {
                // An empty projection keeps only the row count of the one decoded column.
                let b = match project_out {
                    true => b.project(&[]).unwrap_or(b),
                    false => b,
                };
                let b = match limit {
                    Some(l) if *sent + b.num_rows() > l => b.slice(0, l - *sent),
                    _ => b,
                };
                *sent += b.num_rows();
                out.push(b);
            }
            let done = limit.is_some_and(|l| *sent >= l);
            async move {
                for b in out {
                    if b.num_rows() > 0 && !tx.send(Ok(b)).await {
                        return false;
                    }
                }
                !done
            }
        };
        let decode_task = |me: &Arc<Self>, url: Url, body: bytes::Bytes| -> JoinHandle<Result<Page>> {
            let me = Arc::clone(me);
            let schema = Arc::clone(&schema);
            tokio::task::spawn_blocking(move || me.decode(&url, &body, &schema, batch_rows))
        };
        let join = |e: tokio::task::JoinError| Error::Config(format!("an HTTP page task failed: {e}"));
        // Aborted with the scan (a LIMIT reached, the query dropped): no request outlives it.
        let mut inflight = Tasks(VecDeque::new(), Arc::clone(&counters.stop));
        match &self.paging {
            Paging::Numbered { size, .. } => {
                let size = *size;
                let mut next = 0u64;
                let mut read = 0u64;
                let mut previous_hash: Option<u64> = None;
                let mut ended = false;
                loop {
                    while !ended
                        && inflight.len() < self.concurrency
                        && self.max_pages.is_none_or(|m| next < m)
                    {
                        if self.max_pages.is_none() && next >= DEFAULT_MAX_PAGES {
                            return Err(self.endless(&self.numbered_url(next)));
                        }
                        let me = Arc::clone(&self);
                        let url = self.numbered_url(next);
                        let counters = counters.clone();
                        let schema = Arc::clone(&schema);
                        inflight.push_back(tokio::spawn(async move {
                            let f = me.api.get(&url, &counters).await?;
                            let me2 = Arc::clone(&me);
                            let hash = xxhash_rust::xxh3::xxh3_64(&f.body);
                            tokio::task::spawn_blocking(move || {
                                me2.decode(&url, &f.body, &schema, batch_rows).map(|mut p| {
                                    p.hash = hash;
                                    p
                                })
                            })
                            .await
                            .map_err(join)?
                        }));
                        next += 1;
                    }
                    let Some(h) = inflight.pop_front() else {
                        break;
                    };
                    // (What is still in flight is aborted with `inflight` on every return.)
                    let page = h.await.map_err(join)??;
                    // An API that answers every page past its end with its last one never
                    // gives a short page: the same records twice in a row end the scan.
                    // ('max_pages' bounds the read instead, for an API whose pages may repeat.)
                    if page.records > 0 && previous_hash == Some(page.hash) && self.max_pages.is_none() {
                        return Err(Error::Config(format!(
                            "table {}: page {} ({}) has the same body as the page before it: the API repeats a page \
                             instead of ending (give 'page_size', so that a short page ends the read, or 'max_pages' to read that many pages)",
                            self.api.table,
                            read + 1,
                            self.api.shown(&self.numbered_url(read))
                        )));
                    }
                    previous_hash = (page.records > 0).then_some(page.hash);
                    read += 1;
                    // A short or empty page is the last: what is in flight past it is not read.
                    if page.records == 0 || size.is_some_and(|s| (page.records as u64) < s) {
                        ended = true;
                        counters.stop.store(true, Ordering::Relaxed);
                        inflight.iter().for_each(JoinHandle::abort);
                        inflight.clear();
                    }
                    if !emit(page, &mut sent).await {
                        return Ok(());
                    }
                }
            }
            _ => {
                let mut url = Some(self.base.clone());
                let mut pages = 0u64;
                // Every page URL read (as XXH3 of the URL): a next page already read is a cycle.
                let mut seen: std::collections::HashSet<u64> = std::collections::HashSet::new();
                while let Some(u) = url.take() {
                    if !seen.insert(xxhash_rust::xxh3::xxh3_64(u.as_str().as_bytes())) {
                        return Err(self.at(
                            &u,
                            "the API gave a page already read as the next one (its pages form a cycle)",
                        ));
                    }
                    if self.max_pages.is_none() && pages >= DEFAULT_MAX_PAGES {
                        return Err(self.endless(&u));
                    }
                    let f = self.api.get(&u, &counters).await?;
                    pages += 1;
                    if self.max_pages.is_none_or(|m| pages < m) {
                        url = self.next_url(&f.url, &f.body, f.link_next.as_deref())?;
                    }
                    inflight.push_back(decode_task(&self, u.clone(), f.body));
                    // Decoding overlaps the next request; at most `concurrency` pages are held.
                    if inflight.len() >= self.concurrency.max(1) || url.is_none() {
                        while let Some(h) = inflight.pop_front() {
                            let page = h.await.map_err(join)??;
                            if page.records == 0 && !matches!(self.paging, Paging::None) {
                                url = None;
                            }
                            if !emit(page, &mut sent).await {
                                return Ok(());
                            }
                            if inflight.len() < self.concurrency.max(1) && url.is_some() {
                                break;
                            }
                        }
                    }
                }
                while let Some(h) = inflight.pop_front() {
                    let page = h.await.map_err(join)??;
                    if !emit(page, &mut sent).await {
                        return Ok(());
                    }
                }
            }
        }
        Ok(())
    }

    /// The scan of the `projection`ed columns: one partition (requests run concurrently inside it).
    pub fn scan(
        self: &Arc<Self>,
        projection: Option<&Vec<usize>>,
        limit: Option<usize>,
        batch_rows: usize,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let out = match projection {
            Some(p) => Arc::new(self.schema.project(p)?),
            None => Arc::clone(&self.schema),
        };
        // An empty projection (count(*)) still decodes one column to count the records.
        let decode_schema = if out.fields().is_empty() && !self.schema.fields().is_empty() {
            Arc::new(self.schema.project(&[0])?)
        } else {
            Arc::clone(&out)
        };
        let metrics = ExecutionPlanMetricsSet::new();
        let counters = Counters {
            pages: MetricBuilder::new(&metrics).global_counter("pages"),
            retries: MetricBuilder::new(&metrics).global_counter("retries"),
            bytes: MetricBuilder::new(&metrics).global_counter("bytes_scanned"),
            stop: Default::default(),
        };
        let mut label = format!(
            "table={}, url={}, format={:?}, pagination={}, concurrency={}",
            self.api.table,
            self.api.shown(&self.base),
            self.format,
            self.paging.name(),
            self.concurrency
        )
        .to_lowercase();
        if let Some(r) = self.api.rate() {
            label.push_str(&format!(", rate_limit={r:.1}/s"));
        }
        if let Some(l) = limit {
            label.push_str(&format!(", limit={l}"));
        }
        let me = Arc::clone(self);
        let project_out = out.fields().is_empty();
        let producer: Producer = Arc::new(move |_p, tx: BatchSender| {
            let me = Arc::clone(&me);
            let decode_schema = Arc::clone(&decode_schema);
            let mut counters = counters.clone();
            counters.stop = Default::default();
            Box::pin(async move {
                let run = me.produce(decode_schema, project_out, limit, batch_rows, counters, &tx);
                if let Err(e) = run.await {
                    tx.send(Err(e)).await;
                }
            })
        });
        Ok(Arc::new(
            StreamScanExec::new("HttpScanExec", label, out, 1, producer).with_metrics(metrics),
        ))
    }

    /// Columns inferred from the records of the first pages (at most `sample` records).
    pub async fn infer(&self, sample: usize) -> Result<Schema> {
        let counters = Counters::default();
        let mut url = Some(match self.paging {
            Paging::Numbered { .. } => self.numbered_url(0),
            _ => self.base.clone(),
        });
        let mut seen = 0usize;
        let mut pages = 0u64;
        let mut json_values: Vec<serde_json::Value> = Vec::new();
        let mut text_sample: Vec<u8> = Vec::new();
        while let Some(u) = url.take() {
            let f = self.api.get(&u, &counters).await?;
            pages += 1;
            match self.format {
                Format::Json => {
                    let (recs, n) =
                        json_records(self.body(&u, &f.body)?, &self.records).map_err(|e| self.at(&u, &e))?;
                    for line in recs.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                        json_values
                            .push(serde_json::from_slice(line).map_err(|e| self.at(&u, &e.to_string()))?);
                    }
                    seen += n;
                    if n == 0 {
                        break;
                    }
                }
                Format::Ndjson => {
                    let n = f.body.split(|b| *b == b'\n').filter(|l| !l.is_empty()).count();
                    text_sample.extend_from_slice(&f.body);
                    text_sample.push(b'\n');
                    seen += n;
                    if n == 0 {
                        break;
                    }
                }
                Format::Csv => {
                    // The first page's header and rows are enough for CSV.
                    text_sample = f.body.to_vec();
                    seen = sample;
                }
            }
            if seen >= sample || pages >= 5 {
                break;
            }
            url = match &self.paging {
                Paging::Numbered { .. } => Some(self.numbered_url(pages)),
                _ => self.next_url(&f.url, &f.body, f.link_next.as_deref())?,
            };
        }
        let schema = match self.format {
            Format::Json => {
                arrow::json::reader::infer_json_schema_from_iterator(json_values.into_iter().map(Ok))?
            }
            Format::Ndjson => {
                arrow::json::reader::infer_json_schema(Cursor::new(&text_sample), Some(sample))?.0
            }
            Format::Csv => {
                arrow::csv::reader::Format::default()
                    .with_header(true)
                    .infer_schema(Cursor::new(&text_sample), Some(sample))?
                    .0
            }
        };
        if schema.fields().is_empty() {
            return Err(Error::Config(format!(
                "table {}: the first page of {} has no records to infer columns from; declare them: CREATE EXTERNAL TABLE {} (id BIGINT, ...) STORED AS HTTP",
                self.api.table,
                self.api.shown(&self.base),
                self.api.table
            )));
        }
        Ok(schema)
    }
}

/// Newline-separated JSON records decoded as `schema`.
fn decode_json(bytes: &[u8], schema: &SchemaRef, batch_rows: usize) -> Result<Vec<RecordBatch>> {
    let mut d = arrow::json::ReaderBuilder::new(Arc::clone(schema))
        .with_batch_size(batch_rows)
        .with_coerce_primitive(true)
        .build_decoder()?;
    let mut out = Vec::new();
    let mut buf = bytes;
    while !buf.is_empty() {
        let n = d.decode(buf)?;
        buf = &buf[n..];
        if !buf.is_empty()
            && let Some(b) = d.flush()?
        {
            out.push(b);
        }
    }
    if let Some(b) = d.flush()? {
        out.push(b);
    }
    Ok(out)
}

/// "record N of the page (...): " for the first record that does not decode alone.
fn first_bad_record(bytes: &[u8], schema: &SchemaRef) -> String {
    for (i, line) in bytes.split(|b| *b == b'\n').filter(|l| !l.is_empty()).enumerate() {
        if decode_json(line, schema, 1).is_err() {
            return format!(
                "record {} of the page ({}) does not fit the columns: ",
                i + 1,
                short(&String::from_utf8_lossy(line))
            );
        }
    }
    String::new()
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::datatypes::{DataType, Field};

    #[test]
    fn pointers() {
        let body =
            r#"{"data":{"items":[{"a":1},{"a":2}]},"meta":{"next":"c~2","n":7,"z":null},"list":[{"x":"y"}]}"#;
        let (recs, n) = json_records(body, "/data/items").unwrap();
        assert_eq!(n, 2);
        assert_eq!(recs, b"{\"a\":1}\n{\"a\":2}\n");
        assert_eq!(scalar_at(body, "/meta/next").unwrap().as_deref(), Some("c~2"));
        assert_eq!(scalar_at(body, "/meta/n").unwrap().as_deref(), Some("7"));
        assert_eq!(scalar_at(body, "/meta/z").unwrap(), None);
        assert_eq!(scalar_at(body, "/meta/missing").unwrap(), None);
        assert_eq!(scalar_at(body, "/list/0/x").unwrap().as_deref(), Some("y"));
        assert!(scalar_at(body, "/data").is_err());
        assert_eq!(json_records(body, "/nothing").unwrap().1, 0);
        assert!(json_records(body, "/meta/n").is_err());
        assert_eq!(json_records("[{\"a\":1}]", "").unwrap().1, 1);
        assert!(json_records("{not json", "").is_err());
    }

    #[test]
    fn decodes_and_names_the_bad_record() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("a", DataType::Int64, true),
            Field::new("b", DataType::Utf8, true),
        ]));
        let bytes = b"{\"a\":1,\"b\":\"x\"}\n{\"a\":2,\"b\":7}\n{\"a\":3}\n";
        let batches = decode_json(bytes, &schema, 2).unwrap();
        assert_eq!(batches.iter().map(RecordBatch::num_rows).sum::<usize>(), 3);
        assert_eq!(batches.len(), 2);
        let bad = b"{\"a\":1}\n{\"a\":\"many\"}\n";
        assert!(decode_json(bad, &schema, 8).is_err());
        let which = first_bad_record(bad, &schema);
        assert!(
            which.starts_with("record 2 of the page ({\"a\":\"many\"})"),
            "{which}"
        );
    }

    #[test]
    fn params_are_replaced() {
        let mut u = Url::parse("http://h/x?page=1&a=b").unwrap();
        set_param(&mut u, "page", "3");
        assert_eq!(u.as_str(), "http://h/x?a=b&page=3");
    }
}
