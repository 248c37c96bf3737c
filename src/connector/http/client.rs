//! The HTTP source's requests: one pooled reqwest client (keep-alive, gzip/zstd/deflate,
//! timeouts), authentication, a shared rate limit, and retries of network errors, 429 and 5xx
//! with full-jitter backoff that honours `Retry-After`. Every URL and message it shows has the
//! credentials masked.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use datafusion::physical_plan::metrics::Count;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use url::Url;

use super::error_text;
use crate::engine::{MASK, Redactor};
use crate::error::{Error, Result};
use crate::sink::Backoff;

/// Requests per interval, spaced evenly: at most one request every `interval`, whatever the
/// concurrency (no bursts, so a server's per-second window never sees more than the limit).
#[derive(Debug)]
pub struct RateLimit {
    interval: Duration,
    next: Mutex<Option<Instant>>,
}

impl RateLimit {
    /// Parses `20/s`, `600/min`, `1000/h`, `2.5/s`.
    pub fn parse(v: &str) -> std::result::Result<Self, String> {
        let (n, per) = v
            .split_once('/')
            .ok_or_else(|| format!("'{v}' is not a rate such as 20/s or 600/min"))?;
        let n: f64 = n
            .trim()
            .parse()
            .map_err(|_| format!("'{v}' is not a rate such as 20/s or 600/min"))?;
        let per = match per.trim() {
            "s" | "sec" | "second" => 1.0,
            "m" | "min" | "minute" => 60.0,
            "h" | "hour" => 3600.0,
            other => return Err(format!("unknown unit '{other}' (use s, min, h)")),
        };
        if !(n.is_finite() && n > 0.0) {
            return Err(format!("'{v}' must allow at least some requests"));
        }
        Ok(Self {
            interval: Duration::from_secs_f64(per / n),
            next: Mutex::new(None),
        })
    }

    /// Waits for this request's slot.
    pub async fn acquire(&self) {
        let slot = {
            let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            let slot = next.map_or(now, |n| n.max(now));
            *next = Some(slot + self.interval);
            slot
        };
        tokio::time::sleep_until(slot.into()).await;
    }

    /// Requests per second.
    pub fn per_second(&self) -> f64 {
        1.0 / self.interval.as_secs_f64()
    }
}

/// The live counters of one scan (shown as progress and in `explain analyze`).
#[derive(Debug, Clone, Default)]
pub struct Counters {
    pub pages: Count,
    pub retries: Count,
    pub bytes: Count,
    /// Set once the scan needs no more pages: requests still in flight give up quietly.
    pub stop: Arc<AtomicBool>,
}

/// A successful response.
#[derive(Debug)]
pub struct Fetched {
    pub body: Bytes,
    /// The `rel="next"` target of a `Link` header.
    pub link_next: Option<String>,
    /// Where the body came from (after redirects): relative page links are joined onto it.
    pub url: Url,
}

/// Why a body was not read.
enum BodyError {
    TooLarge,
    Read(String),
}

/// How a table's requests are made.
#[derive(Debug)]
pub struct Api {
    pub table: String,
    client: reqwest::Client,
    headers: HeaderMap,
    /// `api_key` sent as a query parameter: (name, value).
    key_param: Option<(String, String)>,
    /// Values masked in every message.
    secrets: Vec<String>,
    limit: Option<RateLimit>,
    max_retries: u32,
    /// Where credentials (and the configured headers) may go: the LOCATION's origin (scheme,
    /// host, port) and the ones option `trusted_origins` lists. Pages and redirects elsewhere
    /// are requested without them.
    trusted: Vec<url::Origin>,
    /// The LOCATION is https: no request or redirect goes to plain http.
    https_only: bool,
    /// The largest body read (option `max_body`).
    max_body: usize,
}

/// Where an `Api`'s requests may go, and how much they may read.
#[derive(Debug, Clone)]
pub struct Reach {
    /// The LOCATION.
    pub home: Url,
    /// More origins that get the credentials (option `trusted_origins`).
    pub trusted: Vec<url::Origin>,
    /// The largest body read, in bytes.
    pub max_body: usize,
}

/// Redirects followed per request.
const MAX_REDIRECTS: usize = 10;

/// Authentication, as the options give it.
#[derive(Debug, Default)]
pub struct Auth {
    pub bearer: Option<String>,
    /// `user:password`.
    pub basic: Option<String>,
    pub api_key: Option<String>,
    pub api_key_header: Option<String>,
    pub api_key_param: Option<String>,
}

impl Api {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        table: &str,
        headers: &[(String, String)],
        auth: Auth,
        limit: Option<RateLimit>,
        concurrency: usize,
        timeout: Duration,
        max_retries: u32,
        reach: Reach,
    ) -> Result<Self> {
        let bad = |what: &str, why: String| Error::Option(format!("table {table}: {what}: {why}"));
        let mut map = HeaderMap::new();
        let mut secrets = Vec::new();
        for (k, v) in headers {
            let name = HeaderName::from_bytes(k.as_bytes())
                .map_err(|e| bad("'headers'", format!("'{k}' is not a header name: {e}")))?;
            let mut value = HeaderValue::from_str(v).map_err(|e| {
                bad(
                    "'headers'",
                    format!("the value of {k} is not a header value: {e}"),
                )
            })?;
            if Redactor::is_secret_name(k) || name == reqwest::header::AUTHORIZATION {
                value.set_sensitive(true);
                secrets.push(v.clone());
            }
            map.insert(name, value);
        }
        let mut auth_value = |v: String| -> Result<()> {
            let mut value = HeaderValue::from_str(&v)
                .map_err(|e| bad("authentication", format!("not a header value: {e}")))?;
            value.set_sensitive(true);
            map.insert(reqwest::header::AUTHORIZATION, value);
            Ok(())
        };
        if let Some(t) = &auth.bearer {
            secrets.push(t.clone());
            auth_value(format!("Bearer {t}"))?;
        }
        if let Some(b) = &auth.basic {
            let (user, password) = b
                .split_once(':')
                .ok_or_else(|| bad("'basic_auth'", "expected user:password".to_string()))?;
            if password.len() >= 3 {
                secrets.push(password.to_string());
            }
            use base64::Engine;
            let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
            secrets.push(encoded.clone());
            auth_value(format!("Basic {encoded}"))?;
        }
        let mut key_param = None;
        if let Some(key) = &auth.api_key {
            secrets.push(key.clone());
            match (&auth.api_key_param, &auth.api_key_header) {
                (Some(p), _) => key_param = Some((p.clone(), key.clone())),
                (None, h) => {
                    let h = h.as_deref().unwrap_or("X-API-Key");
                    let name = HeaderName::from_bytes(h.as_bytes())
                        .map_err(|e| bad("'api_key_header'", e.to_string()))?;
                    let mut value = HeaderValue::from_str(key)
                        .map_err(|e| bad("'api_key'", format!("not a header value: {e}")))?;
                    value.set_sensitive(true);
                    map.insert(name, value);
                }
            }
        }
        secrets.retain(|s| !s.is_empty());
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        let client = reqwest::Client::builder()
            .user_agent(concat!("flumen/", env!("CARGO_PKG_VERSION")))
            .pool_max_idle_per_host(concurrency.max(1))
            .tcp_nodelay(true)
            .connect_timeout(timeout.min(Duration::from_secs(30)))
            .timeout(timeout)
            // Redirects are followed by `get`, which decides per hop what goes along.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| bad("client", error_text(&e)))?;
        Ok(Self {
            table: table.to_string(),
            client,
            headers: map,
            key_param,
            secrets,
            limit,
            max_retries,
            https_only: reach.home.scheme() == "https",
            trusted: std::iter::once(reach.home.origin())
                .chain(reach.trusted)
                .collect(),
            max_body: reach.max_body,
        })
    }

    /// Whether `url` may get the credentials.
    fn trusts(&self, url: &Url) -> bool {
        let o = url.origin();
        o.is_tuple() && self.trusted.contains(&o)
    }

    /// The URL to request for `url`, which the server's answer named (a page link or a
    /// redirect): refused when not http(s), or plain http from an https LOCATION. Decision: an
    /// `http://` URL on a trusted host (an API behind a TLS proxy that names its own pages
    /// http) is requested as https instead.
    fn secure(&self, url: &Url, via: &str) -> Result<Url> {
        let why = match url.scheme() {
            "https" => return Ok(url.clone()),
            "http" if !self.https_only => return Ok(url.clone()),
            "http" => {
                let mut up = url.clone();
                if url.port().is_none_or(|p| p == 80)
                    && up.set_scheme("https").is_ok()
                    && up.set_port(None).is_ok()
                    && self.trusts(&up)
                {
                    tracing::debug!(
                        "table {}: {via} names {} over http: requested over https",
                        self.table,
                        self.shown(url)
                    );
                    return Ok(up);
                }
                "plain http from an https LOCATION would send the request unencrypted"
            }
            _ => "only http and https URLs are requested",
        };
        Err(Error::Config(format!(
            "table {}: {via} leads to {}, which flumen does not request: {why}",
            self.table,
            self.shown(url)
        )))
    }

    /// Reads a body of at most `max` bytes: a longer one is `TooLarge`, or with `head` cut to
    /// its first `max` bytes.
    async fn read_body(
        &self,
        url: &Url,
        mut resp: reqwest::Response,
        max: usize,
        head: bool,
    ) -> std::result::Result<Bytes, BodyError> {
        if !head && resp.content_length().is_some_and(|n| n > max as u64) {
            return Err(BodyError::TooLarge);
        }
        let mut body = bytes::BytesMut::new();
        loop {
            match resp.chunk().await {
                Ok(Some(c)) if body.len() + c.len() > max => {
                    if !head {
                        return Err(BodyError::TooLarge);
                    }
                    body.extend_from_slice(&c[..max - body.len()]);
                    return Ok(body.freeze());
                }
                Ok(Some(c)) => body.extend_from_slice(&c),
                Ok(None) => return Ok(body.freeze()),
                Err(e) => {
                    return Err(BodyError::Read(format!(
                        "reading the body of {}: {}",
                        self.shown(url),
                        error_text(&e)
                    )));
                }
            }
        }
    }

    fn too_large(&self, url: &Url) -> Error {
        Error::Config(format!(
            "table {}: GET {}: the body is larger than {} bytes ('max_body'; raise it if the API's pages are that large)",
            self.table,
            self.shown(url),
            self.max_body
        ))
    }

    /// `text` with every credential masked.
    pub fn scrub(&self, text: &str) -> String {
        let mut out = text.to_string();
        for s in &self.secrets {
            if out.contains(s.as_str()) {
                out = out.replace(s.as_str(), MASK);
            }
        }
        out
    }

    /// A URL as messages show it: password and secret-looking query values masked.
    pub fn shown(&self, url: &Url) -> String {
        let mut u = url.clone();
        if u.password().is_some() {
            let _ = u.set_password(Some(MASK));
        }
        if u.query().is_some() {
            let pairs: Vec<(String, String)> = u
                .query_pairs()
                .map(|(k, v)| {
                    let secret =
                        Redactor::is_secret_name(&k) || self.key_param.as_ref().is_some_and(|(p, _)| *p == k);
                    (
                        k.into_owned(),
                        if secret { MASK.to_string() } else { v.into_owned() },
                    )
                })
                .collect();
            u.query_pairs_mut().clear().extend_pairs(pairs);
        }
        self.scrub(u.as_str())
    }

    /// The request rate allowed, if limited.
    pub fn rate(&self) -> Option<f64> {
        self.limit.as_ref().map(RateLimit::per_second)
    }

    /// GETs `url`, retrying what may succeed later. A 4xx other than 429 (or 408) ends the scan
    /// with the status and the first lines of the body.
    pub async fn get(&self, url: &Url, counters: &Counters) -> Result<Fetched> {
        let target = url.clone();
        let started = Instant::now();
        let seed = url
            .as_str()
            .bytes()
            .fold(17u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64));
        let mut backoff = Backoff::new(
            Duration::from_millis(250),
            Duration::from_secs(30),
            self.max_retries + 1,
            Duration::from_secs(15 * 60),
            seed,
        );
        let url = &self.secure(url, "the page's URL")?;
        let mut attempt = 0u32;
        loop {
            if let Some(l) = &self.limit {
                l.acquire().await;
            }
            attempt += 1;
            // Redirects, one hop at a time: credentials only to trusted origins, never to http
            // from https.
            let mut at = url.clone();
            let mut hops = 0;
            let sent = loop {
                let trusted = self.trusts(&at);
                if !trusted {
                    // Nothing of the credentials elsewhere: not the key a URL carries along
                    // (an apex-to-www redirect copies the query), not a user and password.
                    if let Some((p, _)) = &self.key_param {
                        super::source::remove_param(&mut at, p);
                    }
                    let _ = at.set_username("");
                    let _ = at.set_password(None);
                }
                let mut request = at.clone();
                if trusted && let Some((p, v)) = &self.key_param {
                    super::source::set_param(&mut request, p, v);
                }
                // Any configured header may be a credential in disguise: none goes elsewhere.
                let headers = if trusted {
                    self.headers.clone()
                } else {
                    HeaderMap::new()
                };
                let sent = self.client.get(request).headers(headers).send().await;
                match sent {
                    Ok(resp) if resp.status().is_redirection() => {
                        let Some(next) = resp
                            .headers()
                            .get(reqwest::header::LOCATION)
                            .and_then(|v| v.to_str().ok())
                            .and_then(|l| at.join(l).ok())
                        else {
                            break Ok(resp);
                        };
                        hops += 1;
                        if hops > MAX_REDIRECTS {
                            return Err(Error::Config(format!(
                                "table {}: GET {}: more than {MAX_REDIRECTS} redirects",
                                self.table,
                                self.shown(url)
                            )));
                        }
                        at = self.secure(&next, &format!("a redirect from {}", self.shown(&at)))?;
                    }
                    other => break other,
                }
            };
            let (why, retry_after) = match sent {
                Ok(resp) => {
                    let status = resp.status();
                    if status.is_success() {
                        let link_next = resp
                            .headers()
                            .get_all(reqwest::header::LINK)
                            .iter()
                            .filter_map(|v| v.to_str().ok())
                            .find_map(next_link);
                        match self.read_body(&at, resp, self.max_body, false).await {
                            Ok(body) => {
                                counters.pages.add(1);
                                counters.bytes.add(body.len());
                                return Ok(Fetched {
                                    body,
                                    link_next,
                                    url: at,
                                });
                            }
                            Err(BodyError::TooLarge) => return Err(self.too_large(&at)),
                            Err(BodyError::Read(why)) => (why, None),
                        }
                    } else if status.as_u16() == 429 || status.as_u16() == 408 || status.is_server_error() {
                        (format!("HTTP {status}"), retry_after(resp.headers()))
                    } else {
                        // The first lines are shown: 64 KiB of the body at most are read.
                        let head = self.read_body(&at, resp, 64 << 10, true).await;
                        let body = String::from_utf8_lossy(&head.unwrap_or_default()).into_owned();
                        return Err(self.refused(&at, status, &body));
                    }
                }
                Err(e) => (error_text(&e), None),
            };
            if counters.stop.load(Ordering::Relaxed) {
                return Err(Error::Config(format!("table {}: the scan ended", self.table)));
            }
            match backoff.next_delay(attempt, started.elapsed(), retry_after) {
                Some(delay) => {
                    counters.retries.add(1);
                    tracing::warn!(
                        "table {}: GET {}: {} (attempt {attempt} of {}); retrying in {:.1}s",
                        self.table,
                        self.shown(&target),
                        self.scrub(&why),
                        self.max_retries + 1,
                        delay.as_secs_f64()
                    );
                    tokio::time::sleep(delay).await;
                }
                None => {
                    return Err(Error::Config(format!(
                        "table {}: GET {} failed after {attempt} attempts: {}",
                        self.table,
                        self.shown(&target),
                        self.scrub(&why)
                    )));
                }
            }
        }
    }

    fn refused(&self, url: &Url, status: reqwest::StatusCode, body: &str) -> Error {
        let lines: Vec<&str> = body.lines().filter(|l| !l.trim().is_empty()).take(5).collect();
        let mut shown: String = lines.join("\n  ").chars().take(600).collect();
        if shown.is_empty() {
            shown = "(empty body)".into();
        }
        let hint = match status.as_u16() {
            401 | 403 => " (check the credentials: 'bearer_token', 'basic_auth' or 'api_key')",
            404 => " (check the LOCATION and 'params')",
            _ => "",
        };
        Error::Config(format!(
            "table {}: GET {} returned HTTP {status}{hint}; the body begins:\n  {}",
            self.table,
            self.shown(url),
            self.scrub(&shown)
        ))
    }
}

/// The wait a `Retry-After` header asks for (seconds, or an HTTP date), capped at 5 minutes.
fn retry_after(h: &HeaderMap) -> Option<Duration> {
    let v = h.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?.trim();
    let d = match v.parse::<f64>() {
        Ok(s) if s.is_finite() && s >= 0.0 => Duration::from_secs_f64(s.min(300.0)),
        _ => {
            let at = chrono::DateTime::parse_from_rfc2822(v).ok()?;
            let ms = at.timestamp_millis() - chrono::Utc::now().timestamp_millis();
            Duration::from_millis(ms.max(0) as u64)
        }
    };
    Some(d.min(Duration::from_secs(300)))
}

/// The target of `rel="next"` in one `Link` header value (`<url>; rel="next", <url>; rel="last"`).
fn next_link(v: &str) -> Option<String> {
    let mut rest = v;
    while let Some(open) = rest.find('<') {
        let close = open + rest[open..].find('>')?;
        let target = &rest[open + 1..close];
        let params_end = rest[close..].find('<').map_or(rest.len(), |i| close + i);
        let params = &rest[close + 1..params_end];
        let is_next = params.split(';').any(|p| {
            let p = p.trim().trim_end_matches(',');
            p.strip_prefix("rel=")
                .map(|r| {
                    r.trim_matches('"')
                        .split_whitespace()
                        .any(|r| r.eq_ignore_ascii_case("next"))
                })
                .unwrap_or(false)
        });
        if is_next {
            return Some(target.to_string());
        }
        rest = &rest[params_end..];
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_headers() {
        assert_eq!(
            next_link(r#"<https://a/x?page=3>; rel="next", <https://a/x?page=9>; rel="last""#).as_deref(),
            Some("https://a/x?page=3")
        );
        assert_eq!(
            next_link(r#"<https://a/x?page=1>; rel="first", <https://a/x?page=2>; rel=next"#).as_deref(),
            Some("https://a/x?page=2")
        );
        assert_eq!(next_link(r#"<https://a/x?page=1>; rel="prev""#), None);
    }

    #[test]
    fn rates() {
        assert_eq!(
            RateLimit::parse("20/s").unwrap().interval,
            Duration::from_millis(50)
        );
        assert_eq!(
            RateLimit::parse("600/min").unwrap().interval,
            Duration::from_millis(100)
        );
        assert!(RateLimit::parse("20").is_err());
        assert!(RateLimit::parse("0/s").is_err());
        assert!(RateLimit::parse("5/fortnight").is_err());
    }

    #[test]
    fn retry_after_forms() {
        let mut h = HeaderMap::new();
        h.insert(reqwest::header::RETRY_AFTER, HeaderValue::from_static("2"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(2)));
        h.insert(
            reqwest::header::RETRY_AFTER,
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(retry_after(&h), Some(Duration::ZERO));
        // A huge number is capped, not a panic.
        h.insert(reqwest::header::RETRY_AFTER, HeaderValue::from_static("1e300"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(300)));
    }

    #[test]
    fn urls_and_messages_hide_credentials() {
        let api = Api::new(
            "t",
            &[("X-Trace".into(), "abc".into())],
            Auth {
                bearer: Some("tok-123456".into()),
                api_key: Some("key-987".into()),
                api_key_param: Some("apikey".into()),
                ..Auth::default()
            },
            None,
            1,
            Duration::from_secs(5),
            0,
            Reach {
                home: Url::parse("https://h/x").unwrap(),
                trusted: vec![Url::parse("https://cdn.h:8443").unwrap().origin()],
                max_body: 1 << 20,
            },
        )
        .unwrap();
        // Credentials go to the LOCATION's origin and the trusted ones only; never to http.
        assert!(api.trusts(&Url::parse("https://h/y?page=3").unwrap()));
        assert!(api.trusts(&Url::parse("https://cdn.h:8443/z").unwrap()));
        assert!(!api.trusts(&Url::parse("https://cdn.h/z").unwrap()));
        assert!(!api.trusts(&Url::parse("http://h/x").unwrap()));
        assert!(!api.trusts(&Url::parse("https://evil.example/x").unwrap()));
        // An http link on the LOCATION's host is requested over https; elsewhere it is refused.
        assert_eq!(
            api.secure(&Url::parse("http://h/x?page=2").unwrap(), "a link")
                .unwrap()
                .as_str(),
            "https://h/x?page=2"
        );
        assert!(
            api.secure(&Url::parse("http://evil.example/x").unwrap(), "a link")
                .is_err()
        );
        assert!(
            api.secure(&Url::parse("file:///etc/passwd").unwrap(), "a link")
                .is_err()
        );
        let u = Url::parse("https://u:pw@h/x?apikey=key-987&access_token=zzz&page=2").unwrap();
        let s = api.shown(&u);
        assert!(
            !s.contains("key-987") && !s.contains("zzz") && !s.contains("pw@"),
            "{s}"
        );
        assert!(s.contains("page=2"), "{s}");
        assert_eq!(api.scrub("bad token tok-123456"), "bad token ***");
    }
}
