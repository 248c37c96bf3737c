//! A small ClickHouse HTTP client: queries as POST bodies, credentials in headers (never in the
//! URL), ClickHouse's error code read from the response.

use std::time::Duration;

use url::Url;

use crate::connector::http::{decode, error_text};
use crate::error::{Error, Result};

/// What a failed request said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChError {
    /// HTTP status, or 0 when no response came (network).
    pub status: u16,
    /// ClickHouse's exception code (`Code: 60`), when it gave one.
    pub code: Option<u32>,
    /// The message, secrets already absent (they never enter a request URL).
    pub message: String,
}

impl std::fmt::Display for ChError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.status, self.code) {
            (0, _) => write!(f, "{}", self.message),
            (s, Some(c)) => write!(f, "HTTP {s}, ClickHouse code {c}: {}", self.message),
            (s, None) => write!(f, "HTTP {s}: {}", self.message),
        }
    }
}

/// Whether a failure may go away by itself (network, overload, too many parts, memory).
pub fn is_retriable(e: &ChError) -> bool {
    match e.code {
        // TIMEOUT_EXCEEDED, SOCKET_TIMEOUT, NETWORK_ERROR, TOO_MANY_SIMULTANEOUS_QUERIES,
        // MEMORY_LIMIT_EXCEEDED, TOO_MANY_PARTS, ALL_CONNECTION_TRIES_FAILED, TABLE_IS_READ_ONLY,
        // KEEPER/ZooKeeper session errors, NOT_ENOUGH_SPACE, QUERY_WITH_SAME_ID_IS_ALREADY_RUNNING
        // (an earlier attempt of the request is still running).
        Some(159 | 209 | 210 | 202 | 241 | 252 | 279 | 242 | 999 | 425 | 243 | 216) => true,
        Some(_) => false,
        None => e.status == 0 || e.status == 429 || e.status >= 500,
    }
}

/// Whether the server refused the rows themselves (a value it cannot parse, convert or accept,
/// a failed constraint or `throwIf` in a column expression), not the request: such a batch
/// goes to dead letters; the table, the credentials or the SQL being wrong stops the job.
pub fn is_bad_data(e: &ChError) -> bool {
    // CANNOT_PARSE_TEXT, CANNOT_PARSE_INPUT_ASSERTION_FAILED, CANNOT_PARSE_DATE,
    // CANNOT_PARSE_DATETIME, TYPE_MISMATCH, ARGUMENT_OUT_OF_BOUND, CANNOT_CONVERT_TYPE,
    // CANNOT_PARSE_NUMBER, INCORRECT_DATA, FUNCTION_THROW_IF_VALUE_IS_NON_ZERO,
    // VIOLATED_CONSTRAINT, DECIMAL_OVERFLOW, VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE.
    matches!(
        e.code,
        Some(6 | 27 | 38 | 41 | 53 | 69 | 70 | 72 | 117 | 395 | 469 | 407 | 321)
    )
}

/// A connection to one ClickHouse database over HTTP.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: Url,
    user: Option<String>,
    password: Option<String>,
    /// The longest a statement (not a streamed read) may take.
    timeout: Duration,
    /// The database named in the location (default `default`).
    pub database: String,
    /// Settings sent with every request (`OPTIONS ('settings' 'k=v,...')`).
    settings: Vec<(String, String)>,
}

/// How an insert's body is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyCompression {
    /// As it is.
    None,
    /// HTTP `Content-Encoding: gzip`.
    Gzip,
    /// ClickHouse's own frames, with `decompress=1`.
    Frames(super::compress::Method),
}

/// Parses `'k=v,k2=v2'` into ClickHouse settings; names must be identifiers.
pub fn parse_settings(text: &str) -> Result<Vec<(String, String)>> {
    text.split(',')
        .map(str::trim)
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').ok_or_else(|| {
                Error::Option(format!(
                    "setting '{kv}' is not name=value (e.g. 'max_insert_threads=4')"
                ))
            })?;
            let k = k.trim();
            if k.is_empty() || !k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(Error::Option(format!("'{k}' is not a ClickHouse setting name")));
            }
            Ok((k.to_string(), v.trim().to_string()))
        })
        .collect()
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("base", &self.base.as_str())
            .field("user", &self.user)
            .field("database", &self.database)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// From `http(s)://[user[:password]@]host:port[/database]`. Statements and inserts may take
    /// `timeout` in all; a streamed read may take as long as it streams, but waits at most
    /// `timeout` to connect and between two chunks of its answer.
    pub fn from_location(location: &str, timeout: Duration) -> Result<Self> {
        let mut url = Url::parse(location)
            .map_err(|e| Error::Option(format!("LOCATION is not a URL like http://host:8123/db: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(Error::Option(format!(
                "LOCATION scheme '{}' is not http or https (ClickHouse's HTTP interface)",
                url.scheme()
            )));
        }
        let user = (!url.username().is_empty()).then(|| decode(url.username()));
        let password = url.password().map(decode);
        let database = url.path().trim_matches('/').to_string();
        let database = if database.is_empty() {
            "default".to_string()
        } else {
            decode(&database)
        };
        let _ = url.set_username("");
        let _ = url.set_password(None);
        url.set_path("/");
        url.set_query(None);
        let http = reqwest::Client::builder()
            .connect_timeout(timeout)
            .read_timeout(timeout)
            .build()
            .map_err(|e| Error::Config(format!("cannot build the HTTP client: {e}")))?;
        Ok(Self {
            http,
            base: url,
            user,
            password,
            timeout,
            database,
            settings: Vec::new(),
        })
    }

    /// Sends `settings` with every request.
    pub fn with_settings(mut self, settings: Vec<(String, String)>) -> Self {
        self.settings = settings;
        self
    }

    fn request(&self, query: Option<&str>, params: &[(&str, &str)]) -> reqwest::RequestBuilder {
        let mut url = self.base.clone();
        {
            let mut pairs = url.query_pairs_mut();
            pairs.append_pair("database", &self.database);
            if let Some(q) = query {
                pairs.append_pair("query", q);
            }
            for (k, v) in &self.settings {
                pairs.append_pair(k, v);
            }
            for (k, v) in params {
                pairs.append_pair(k, v);
            }
        }
        let mut r = self.http.post(url);
        if let Some(u) = &self.user {
            r = r.header("X-ClickHouse-User", u);
        }
        if let Some(p) = &self.password {
            r = r.header("X-ClickHouse-Key", p);
        }
        r
    }

    async fn send(&self, r: reqwest::RequestBuilder) -> std::result::Result<String, ChError> {
        let resp = r.send().await.map_err(|e| ChError {
            status: 0,
            code: None,
            message: format!("cannot reach ClickHouse at {}: {}", self.base, error_text(&e)),
        })?;
        let status = resp.status().as_u16();
        Self::text(resp, status).await
    }

    async fn text(resp: reqwest::Response, status: u16) -> std::result::Result<String, ChError> {
        // A connection that breaks while the answer is read is a network failure (retriable),
        // whatever status line came first; the request may or may not have been applied.
        let text = resp.text().await.map_err(|e| ChError {
            status: 0,
            code: None,
            message: format!(
                "the connection broke while reading the answer (HTTP {status}): {}",
                error_text(&e)
            ),
        })?;
        if (200..300).contains(&status) {
            return Ok(text);
        }
        Err(ChError {
            status,
            code: parse_code(&text),
            message: text.trim().to_string(),
        })
    }

    /// Runs a statement (sent as the body) and returns the response text.
    pub async fn query(&self, sql: &str) -> std::result::Result<String, ChError> {
        self.send(
            self.request(None, &[])
                .timeout(self.timeout)
                .body(sql.to_string()),
        )
        .await
    }

    /// Runs a query (sent as the body) and returns the response to be read as it arrives;
    /// a refusal (any status but 2xx) is read whole and returned as the error.
    pub async fn stream(
        &self,
        sql: &str,
        params: &[(&str, &str)],
    ) -> std::result::Result<reqwest::Response, ChError> {
        let resp = self
            .request(None, params)
            .body(sql.to_string())
            .send()
            .await
            .map_err(|e| ChError {
                status: 0,
                code: None,
                message: format!("cannot reach ClickHouse at {}: {}", self.base, error_text(&e)),
            })?;
        let status = resp.status().as_u16();
        if (200..300).contains(&status) {
            return Ok(resp);
        }
        Err(Self::text(resp, status).await.err().unwrap_or(ChError {
            status,
            code: None,
            message: "refused".into(),
        }))
    }

    /// Sends `INSERT INTO <table> FORMAT Native` with a Native body, compressed as said; with a
    /// `token`, the server drops the insert if it already committed one with the same token
    /// (`insert_deduplication_token`, ClickHouse 22.2+).
    ///
    /// The insert runs as `query_id`: the server refuses a second query with the id of one
    /// still running (code 216, retriable), so attempts of one request never run side by side.
    pub async fn insert_native(
        &self,
        table_sql: &str,
        body: bytes::Bytes,
        compression: BodyCompression,
        token: Option<&str>,
        query_id: &str,
        timeout: Duration,
    ) -> std::result::Result<(), ChError> {
        self.send(
            self.insert_request(table_sql, body, compression, token, query_id)
                .timeout(timeout),
        )
        .await
        .map(|_| ())
    }

    fn insert_request(
        &self,
        table_sql: &str,
        body: bytes::Bytes,
        compression: BodyCompression,
        token: Option<&str>,
        query_id: &str,
    ) -> reqwest::RequestBuilder {
        let q = format!("INSERT INTO {table_sql} FORMAT Native");
        let mut params = vec![("query_id", query_id)];
        if let BodyCompression::Frames(_) = compression {
            params.push(("decompress", "1"));
        }
        if let Some(t) = token {
            params.push(("insert_deduplication_token", t));
        }
        let mut r = self.request(Some(&q), &params).body(body);
        if compression == BodyCompression::Gzip {
            r = r.header("Content-Encoding", "gzip");
        }
        r
    }
}

/// `Code: 60, e.displayText() = DB::Exception: ...` → 60.
pub fn parse_code(text: &str) -> Option<u32> {
    let rest = text.split("Code: ").nth(1)?;
    rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

/// A ClickHouse identifier in backquotes, escaped.
pub fn quote_ident(name: &str) -> String {
    format!("`{}`", name.replace('\\', "\\\\").replace('`', "\\`"))
}

/// A ClickHouse string literal, escaped.
pub fn quote_str(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn location_credentials_leave_the_url() {
        let c =
            Client::from_location("http://etl:p%40ss@127.0.0.1:8123/shop", Duration::from_secs(1)).unwrap();
        assert_eq!(c.user.as_deref(), Some("etl"));
        assert_eq!(c.password.as_deref(), Some("p@ss"));
        assert_eq!(c.database, "shop");
        assert_eq!(c.base.as_str(), "http://127.0.0.1:8123/");
        assert!(Client::from_location("clickhouse://h/db", Duration::from_secs(1)).is_err());
    }

    #[test]
    fn codes_and_classification() {
        let msg = "Code: 60, e.displayText() = DB::Exception: Table default.x doesn't exist., e.what() = DB::Exception";
        assert_eq!(parse_code(msg), Some(60));
        let e = |status, code| ChError {
            status,
            code,
            message: String::new(),
        };
        assert!(!is_retriable(&e(404, Some(60))), "unknown table");
        assert!(!is_retriable(&e(500, Some(62))), "syntax");
        assert!(!is_retriable(&e(500, Some(53))), "type mismatch");
        assert!(!is_retriable(&e(403, Some(193))), "wrong password");
        assert!(is_retriable(&e(500, Some(252))), "too many parts");
        assert!(is_retriable(&e(500, Some(241))), "memory limit");
        assert!(is_retriable(&e(0, None)), "network");
        assert!(is_retriable(&e(503, None)));
        assert!(!is_retriable(&e(400, None)));
        assert!(is_bad_data(&e(500, Some(395))), "throwIf in a column expression");
        assert!(!is_bad_data(&e(404, Some(60))), "unknown table stops the job");
    }

    #[test]
    fn settings_and_tokens_travel_as_url_parameters() {
        let c = Client::from_location("http://u:secret@127.0.0.1:8123/db", Duration::from_secs(1))
            .unwrap()
            .with_settings(parse_settings("max_insert_threads=4, async_insert = 0").unwrap());
        let r = c
            .insert_request(
                "`db`.`t`",
                bytes::Bytes::new(),
                BodyCompression::Frames(super::super::compress::Method::Lz4),
                Some("tok-1"),
                "flumen-q1",
            )
            .build()
            .unwrap();
        let url = r.url().as_str();
        for part in [
            "max_insert_threads=4",
            "async_insert=0",
            "decompress=1",
            "insert_deduplication_token=tok-1",
            "query_id=flumen-q1",
        ] {
            assert!(url.contains(part), "{url} lacks {part}");
        }
        assert!(!url.contains("secret"));
        assert!(parse_settings("a=1,b").is_err());
        assert!(parse_settings("x;drop=1").is_err());
    }

    #[test]
    fn quoting_cannot_be_escaped() {
        assert_eq!(quote_ident("a`b\\"), "`a\\`b\\\\`");
        assert_eq!(quote_str("it's\\"), "'it\\'s\\\\'");
    }
}
