//! `STORED AS HTTP`: records of a paginated REST API read as rows, and what the HTTP-speaking
//! connectors share.
//!
//! ```sql
//! CREATE EXTERNAL TABLE items (id BIGINT, name VARCHAR, price DOUBLE)
//!   STORED AS HTTP LOCATION 'https://api.example.com/v1/items'
//!   OPTIONS ('records' '/data/items', 'pagination' 'page', 'page_size' '100',
//!            'bearer_token' '${API_TOKEN}', 'rate_limit' '20/s', 'concurrency' '8');
//! ```
//!
//! Numbered pages (`page`, `offset`) are fetched `concurrency` at a time, in order, until a page
//! holds fewer than `page_size` records (or none); `cursor`, `link_header` and `next_url` pages
//! follow each other, with decoding overlapping the next request. Requests share one rate limit
//! and are retried on network errors, 429 and 5xx ([`client`]). Columns are declared, or
//! inferred from the records of the first pages (at most `sample`).

pub mod client;
pub mod source;

use std::sync::Arc;
use std::time::Duration;

use arrow::datatypes::{Schema, SchemaRef};
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider, TableProviderFactory};
use datafusion::logical_expr::{CreateExternalTable, Expr, TableType};
use datafusion::physical_plan::ExecutionPlan;

use self::client::{Api, Auth, RateLimit, Reach};
use self::source::{Format, HttpSource, Paging, set_param};
use crate::connector::options::{OptionSpec, TableOptions};
use crate::error::Error;
use crate::sink::parse_duration;

const OPTIONS: &[OptionSpec] = &[
    OptionSpec::new(
        "format",
        "json (default), ndjson or csv: how a page's body holds its records",
    ),
    OptionSpec::new(
        "records",
        "json: JSON pointer to the array of records, e.g. /data/items (default: the body)",
    ),
    OptionSpec::new(
        "pagination",
        "none (default), page, offset, cursor, link_header or next_url",
    ),
    OptionSpec::new(
        "page_param",
        "page/offset: the query parameter of the page number or offset (default page / offset)",
    ),
    OptionSpec::new(
        "page_size",
        "records per page, sent as size_param; a shorter page is the last (required for offset)",
    ),
    OptionSpec::new(
        "size_param",
        "the query parameter of the page size (default per_page; offset and cursor: limit)",
    ),
    OptionSpec::new("start_page", "page: the first page's number (default 1)"),
    OptionSpec::new(
        "cursor_param",
        "cursor: the query parameter of the cursor (default cursor)",
    ),
    OptionSpec::new(
        "cursor_path",
        "cursor: JSON pointer to the next cursor in the body; null or missing ends (required)",
    ),
    OptionSpec::new(
        "next_url_path",
        "next_url: JSON pointer to the next page's URL in the body (default /next)",
    ),
    OptionSpec::new(
        "max_pages",
        "stop after this many pages (default: all, up to 1,000,000 pages, past which the scan fails)",
    ),
    OptionSpec::new(
        "trusted_origins",
        "more origins (scheme://host:port, comma-separated) that get the credentials; pages and redirects elsewhere are requested without them",
    ),
    OptionSpec::new(
        "max_body",
        "the largest page body read, e.g. 64MiB (default 256MiB)",
    ),
    OptionSpec::new(
        "params",
        "query parameters added to every request, e.g. 'status=open&sort=id'",
    ),
    OptionSpec::new(
        "headers",
        "request headers, e.g. 'Accept: application/json; X-Team: data'",
    ),
    OptionSpec::new("bearer_token", "sent as Authorization: Bearer ... (use ${VAR})"),
    OptionSpec::new(
        "basic_auth",
        "user:password for HTTP basic authentication (use ${VAR})",
    ),
    OptionSpec::new(
        "api_key",
        "an API key, sent in api_key_header or as api_key_param (use ${VAR})",
    ),
    OptionSpec::new(
        "api_key_header",
        "the header that carries api_key (default X-API-Key)",
    ),
    OptionSpec::new(
        "api_key_param",
        "send api_key as this query parameter instead of a header",
    ),
    OptionSpec::new(
        "rate_limit",
        "at most this many requests, evenly spaced, e.g. 20/s or 600/min",
    ),
    OptionSpec::new(
        "concurrency",
        "requests in flight for page/offset pagination (default 4)",
    ),
    OptionSpec::new(
        "max_retries",
        "retries of a request after network errors, 429 and 5xx (default 5)",
    ),
    OptionSpec::new("timeout", "per request (default 30s)"),
    OptionSpec::new(
        "sample",
        "records read to infer the columns when none are declared (default 1000)",
    ),
];

/// Builds HTTP tables.
#[derive(Debug)]
pub struct HttpFactory;

#[async_trait]
impl TableProviderFactory for HttpFactory {
    async fn create(
        &self,
        _state: &dyn Session,
        cmd: &CreateExternalTable,
    ) -> datafusion::error::Result<Arc<dyn TableProvider>> {
        let name = cmd.name.to_string();
        let o = TableOptions::parse("HTTP", &name, &cmd.options, OPTIONS)?;
        let location = cmd.locations.first().cloned().unwrap_or_default();
        let mut base = url::Url::parse(&location)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https"))
            .ok_or_else(|| {
                Error::Option(format!(
                    "table {name}: LOCATION must be an http:// or https:// URL, e.g. 'https://api.example.com/v1/items'"
                ))
            })?;
        let format = match o.choice_or("format", &["json", "ndjson", "csv"], "json")? {
            "ndjson" => Format::Ndjson,
            "csv" => Format::Csv,
            _ => Format::Json,
        };
        let style = o.choice_or(
            "pagination",
            &["none", "page", "offset", "cursor", "link_header", "next_url"],
            "none",
        )?;
        let page_size = o
            .get("page_size")
            .map(|_| o.count_or("page_size", 0))
            .transpose()?;
        if page_size == Some(0) {
            return Err(o
                .bad_value("page_size", "0", "a page holds at least one record")
                .into());
        }
        let size_param = o
            .get("size_param")
            .unwrap_or(if matches!(style, "offset" | "cursor") {
                "limit"
            } else {
                "per_page"
            });
        if let Some(q) = o.get("params") {
            let pairs: Vec<(String, String)> = url::form_urlencoded::parse(q.trim().as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect();
            for (k, v) in pairs {
                set_param(&mut base, &k, &v);
            }
        }
        if let Some(n) = page_size {
            set_param(&mut base, size_param, &n.to_string());
        }
        let paging = match style {
            "page" => Paging::Numbered {
                param: o.get("page_param").unwrap_or("page").to_string(),
                first: o.count_or("start_page", 1)?,
                step: 1,
                size: page_size,
            },
            "offset" => {
                let size = page_size.ok_or_else(|| {
                    Error::Option(format!(
                        "table {name}: pagination 'offset' needs 'page_size' (offsets advance by it)"
                    ))
                })?;
                Paging::Numbered {
                    param: o.get("page_param").unwrap_or("offset").to_string(),
                    first: 0,
                    step: size,
                    size: Some(size),
                }
            }
            "cursor" => Paging::Cursor {
                param: o.get("cursor_param").unwrap_or("cursor").to_string(),
                path: o.required("cursor_path")?.to_string(),
            },
            "link_header" => Paging::Link,
            "next_url" => Paging::NextUrl {
                path: o.get("next_url_path").unwrap_or("/next").to_string(),
            },
            _ => Paging::None,
        };
        if format != Format::Json && matches!(paging, Paging::Cursor { .. } | Paging::NextUrl { .. }) {
            return Err(Error::Option(format!(
                "table {name}: pagination '{style}' reads the next page from a JSON body; with format {format:?} use page, offset or link_header"
            ))
            .into());
        }
        let headers = o
            .get("headers")
            .map(|h| parse_headers(h).map_err(|e| o.bad_value("headers", h, &e)))
            .transpose()?
            .unwrap_or_default();
        let rate = o
            .get("rate_limit")
            .map(|v| RateLimit::parse(v).map_err(|e| o.bad_value("rate_limit", v, &e)))
            .transpose()?;
        let concurrency = o.count_or("concurrency", 4)?.clamp(1, 256) as usize;
        let timeout = o
            .get("timeout")
            .map(|v| parse_duration(v).map_err(|e| o.bad_value("timeout", v, &e)))
            .transpose()?
            .unwrap_or(Duration::from_secs(30));
        let max_retries = o.count_or("max_retries", 5)?.min(100) as u32;
        let auth = Auth {
            bearer: o.get("bearer_token").map(str::to_string),
            basic: o.get("basic_auth").map(str::to_string),
            api_key: o.get("api_key").map(str::to_string),
            api_key_header: o.get("api_key_header").map(str::to_string),
            api_key_param: o.get("api_key_param").map(str::to_string),
        };
        if auth.bearer.is_some() && auth.basic.is_some() {
            return Err(Error::Option(format!(
                "table {name}: give 'bearer_token' or 'basic_auth', not both (both are the Authorization header)"
            ))
            .into());
        }
        let mut trusted = Vec::new();
        for t in o
            .get("trusted_origins")
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
        {
            let u = url::Url::parse(t)
                .ok()
                .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
                .ok_or_else(|| {
                    o.bad_value(
                        "trusted_origins",
                        t,
                        "each must be an http:// or https:// URL such as https://cdn.example.com",
                    )
                })?;
            trusted.push(u.origin());
        }
        let max_body = match o.get("max_body") {
            Some(v) => crate::connector::options::parse_bytes(v)
                .map_err(|e| o.bad_value("max_body", v, &e))?
                .max(1),
            None => 256 << 20,
        };
        let reach = Reach {
            home: base.clone(),
            trusted,
            max_body: usize::try_from(max_body).unwrap_or(usize::MAX),
        };
        let api = Api::new(
            &name,
            &headers,
            auth,
            rate,
            concurrency,
            timeout,
            max_retries,
            reach,
        )?;
        let mut source = HttpSource {
            api,
            base,
            paging,
            format,
            records: o.get("records").unwrap_or("").trim().to_string(),
            schema: Arc::new(Schema::empty()),
            concurrency,
            max_pages: o
                .get("max_pages")
                .map(|_| o.count_or("max_pages", 0))
                .transpose()?,
        };
        source.schema = if cmd.schema.fields().is_empty() {
            let sample = o.count_or("sample", 1000)?.max(1) as usize;
            Arc::new(source.infer(sample).await?)
        } else {
            Arc::new(cmd.schema.as_arrow().clone())
        };
        Ok(Arc::new(HttpTable(Arc::new(source))))
    }
}

/// `K: V; K2: V2` (or one per line).
fn parse_headers(h: &str) -> std::result::Result<Vec<(String, String)>, String> {
    crate::connector::options::parse_pairs(h, ':')
}

/// A read-only table over an API.
#[derive(Debug)]
pub struct HttpTable(Arc<HttpSource>);

#[async_trait]
impl TableProvider for HttpTable {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.0.schema)
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        limit: Option<usize>,
    ) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
        Ok(self.0.scan(projection, limit, state.config().batch_size())?)
    }
}

/// A percent-encoded part of a URL (user, password, path segment), decoded.
/// `+` stays `+`: it is a literal in these parts of a URL, not a space as in a form.
pub fn decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// A reqwest error with its causes, without the URL it prints (connectors keep credentials out
/// of URLs, but messages name the server themselves and stay short).
pub fn error_text(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    if let Some(u) = e.url() {
        s = s.replace(u.as_str(), "");
    }
    let mut src = std::error::Error::source(e);
    while let Some(inner) = src {
        s.push_str(&format!(": {inner}"));
        src = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_parts_are_percent_decoded_with_plus_kept() {
        assert_eq!(decode("p%40ss%3Aw+rd"), "p@ss:w+rd");
        assert_eq!(decode("plain"), "plain");
    }

    #[test]
    fn headers() {
        assert_eq!(
            parse_headers("Accept: application/json; X-Team: data").unwrap(),
            vec![
                ("Accept".to_string(), "application/json".to_string()),
                ("X-Team".to_string(), "data".to_string())
            ]
        );
        assert!(parse_headers("no colon").is_err());
    }
}
