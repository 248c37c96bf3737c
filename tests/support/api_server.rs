//! `flumen-test-api`: a paginated JSON/NDJSON/CSV API for the HTTP source's tests and benchmark.
//!
//! ```text
//! flumen-test-api [PORT]      prints "listening on 127.0.0.1:PORT" once it accepts connections
//! ```
//!
//! `GET /items?style=S&total=N&per_page=M[&format=json|ndjson|csv]` serves records `0..N`
//! (`id`, `name`, `price`, `category`, `active`, `created_at`), `M` per page, paginated as `S`:
//!
//! | style    | request                     | where the next page is                     |
//! |----------|-----------------------------|--------------------------------------------|
//! | `page`   | `page=K` (from 1)           | the client counts pages                    |
//! | `offset` | `offset=X&limit=M`          | the client counts records                  |
//! | `cursor` | `cursor=C&limit=M`          | `next_cursor` in the body (null at the end)|
//! | `link`   | `page=K`                    | `Link: <url>; rel="next"`                  |
//! | `next`   | `page=K`                    | `next` in the body (a URL; null at the end)|
//!
//! JSON bodies are `{"data": {"items": [...]}, "next_cursor": ..., "next": ...}`.
//!
//! Faults, by 0-based page index (comma-separated lists): `throttle=` answers the first request
//! for the page 429 with `Retry-After: 1`; `fail=` answers the first request 500; `slow=` waits
//! 1.5 s every time; `token=T` answers 401 to requests without `Authorization: Bearer T`;
//! `gzip=1` compresses bodies for clients that accept it. Every request is logged under its
//! `run=` tag; `GET /_log?run=TAG` returns `[[ms_since_start, page_index, status], ...]`.
//!
//! Hostile answers: `next_port=P` makes `next` and `link` URLs point at 127.0.0.1:P (another
//! server); `redirect_port=P` answers 302 to the same request on 127.0.0.1:P; `cycle=1` makes
//! page 2's next page page 1 (`next`, `link`); `repeat=1` answers every page past the end with
//! the last full page (`page`, `offset`). `GET /_creds?run=TAG` returns the credentials the
//! server was sent under the tag (`Authorization`, `X-API-Key` values, `apikey` parameters).

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

#[derive(Default)]
struct State {
    /// (run, fault kind, page) already answered with the fault once.
    faulted: HashSet<(String, &'static str, u64)>,
    /// run -> [(ms, page, status)].
    log: HashMap<String, Vec<(u128, u64, u16)>>,
    /// run -> credentials received.
    creds: HashMap<String, Vec<String>>,
}

struct Server {
    started: Instant,
    port: u16,
    state: Mutex<State>,
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let port: u16 = std::env::args().nth(1).and_then(|p| p.parse().ok()).unwrap_or(0);
    let listener = TcpListener::bind(("127.0.0.1", port)).await?;
    let port = listener.local_addr()?.port();
    println!("listening on 127.0.0.1:{port}");
    std::io::stdout().flush()?;
    let server = Arc::new(Server {
        started: Instant::now(),
        port,
        state: Mutex::new(State::default()),
    });
    loop {
        let (sock, _) = listener.accept().await?;
        let server = Arc::clone(&server);
        tokio::spawn(async move {
            let _ = serve(server, sock).await;
        });
    }
}

struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

async fn serve(server: Arc<Server>, sock: TcpStream) -> std::io::Result<()> {
    let _ = sock.set_nodelay(true);
    let (rd, mut wr) = sock.into_split();
    let mut rd = BufReader::new(rd);
    loop {
        let mut line = String::new();
        if rd.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let target = line.split_whitespace().nth(1).unwrap_or("/").to_string();
        let mut headers = HashMap::new();
        loop {
            let mut h = String::new();
            if rd.read_line(&mut h).await? == 0 {
                return Ok(());
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
        }
        let close = headers
            .get("connection")
            .is_some_and(|c| c.eq_ignore_ascii_case("close"));
        let resp = handle(&server, &target, &headers).await;
        let reason = match resp.status {
            200 => "OK",
            302 => "Found",
            401 => "Unauthorized",
            404 => "Not Found",
            429 => "Too Many Requests",
            500 => "Internal Server Error",
            _ => "Status",
        };
        let mut head = format!(
            "HTTP/1.1 {} {reason}\r\ncontent-length: {}\r\n",
            resp.status,
            resp.body.len()
        );
        for (k, v) in &resp.headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        wr.write_all(head.as_bytes()).await?;
        wr.write_all(&resp.body).await?;
        if close {
            return Ok(());
        }
    }
}

fn query(target: &str) -> (String, HashMap<String, String>) {
    let (path, q) = target.split_once('?').unwrap_or((target, ""));
    let params = url::form_urlencoded::parse(q.as_bytes()).into_owned().collect();
    (path.to_string(), params)
}

fn list(p: &HashMap<String, String>, name: &str) -> HashSet<u64> {
    p.get(name)
        .map(|v| v.split(',').filter_map(|s| s.trim().parse().ok()).collect())
        .unwrap_or_default()
}

fn num(p: &HashMap<String, String>, name: &str, default: u64) -> u64 {
    p.get(name).and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn text(status: u16, body: &str) -> Response {
    Response {
        status,
        headers: vec![("content-type".into(), "application/json".into())],
        body: body.as_bytes().to_vec(),
    }
}

async fn handle(server: &Server, target: &str, headers: &HashMap<String, String>) -> Response {
    let (path, p) = query(target);
    let run = p.get("run").cloned().unwrap_or_default();
    if path == "/_creds" {
        let st = server.state.lock().unwrap();
        let seen = st.creds.get(&run).cloned().unwrap_or_default();
        let items: Vec<String> = seen.iter().map(|c| format!("{c:?}")).collect();
        return text(200, &format!("[{}]", items.join(",")));
    }
    {
        let mut got: Vec<String> = ["authorization", "x-api-key"]
            .iter()
            .filter_map(|h| headers.get(*h).cloned())
            .collect();
        got.extend(p.get("apikey").cloned());
        if !got.is_empty() {
            server
                .state
                .lock()
                .unwrap()
                .creds
                .entry(run.clone())
                .or_default()
                .extend(got);
        }
    }
    if let Some(port) = p.get("redirect_port") {
        let rest: Vec<(String, String)> = p
            .iter()
            .filter(|(k, _)| *k != "redirect_port")
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let q = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(rest)
            .finish();
        return Response {
            status: 302,
            headers: vec![("location".into(), format!("http://127.0.0.1:{port}{path}?{q}"))],
            body: Vec::new(),
        };
    }
    if path == "/_log" {
        let st = server.state.lock().unwrap();
        let entries = st.log.get(&run).cloned().unwrap_or_default();
        let items: Vec<String> = entries
            .iter()
            .map(|(t, pg, s)| format!("[{t},{pg},{s}]"))
            .collect();
        return text(200, &format!("[{}]", items.join(",")));
    }
    if path != "/items" {
        return text(404, r#"{"error":"no such path"}"#);
    }
    let style = p.get("style").map(String::as_str).unwrap_or("page");
    let total = num(&p, "total", 1000);
    let per_page = num(&p, "per_page", num(&p, "limit", 100)).max(1);
    let start = match style {
        "offset" => num(&p, "offset", 0),
        "cursor" => p
            .get("cursor")
            .and_then(|c| c.strip_prefix('c'))
            .and_then(|c| u64::from_str_radix(c, 16).ok())
            .unwrap_or(0),
        _ => (num(&p, "page", 1).max(1) - 1) * per_page,
    };
    // An API that answers past its end with its last full page.
    let start = if p.get("repeat").is_some_and(|r| r == "1") && start + per_page > total {
        (total / per_page).saturating_sub(1) * per_page
    } else {
        start
    };
    let page = start / per_page;
    let status = fault(server, &run, &p, page, headers).await;
    server.state.lock().unwrap().log.entry(run).or_default().push((
        server.started.elapsed().as_millis(),
        page,
        status,
    ));
    match status {
        401 => return text(401, "{\"error\":\"invalid token\"}\nsee the API docs"),
        429 => {
            let mut r = text(429, r#"{"error":"slow down"}"#);
            r.headers.push(("retry-after".into(), "1".into()));
            return r;
        }
        500 => return text(500, r#"{"error":"internal"}"#),
        _ => {}
    }
    let end = (start + per_page).min(total);
    let ids = start.min(total)..end;
    let more = end < total;
    let next_port = p
        .get("next_port")
        .and_then(|n| n.parse::<u16>().ok())
        .unwrap_or(server.port);
    let cycle = p.get("cycle").is_some_and(|c| c == "1");
    let next_target = |next_page: u64| {
        let next_page = if cycle && next_page == 3 { 1 } else { next_page };
        let mut q = url::form_urlencoded::Serializer::new(String::new());
        for (k, v) in &p {
            if k != "page" {
                q.append_pair(k, v);
            }
        }
        q.append_pair("page", &next_page.to_string());
        format!("/items?{}", q.finish())
    };
    let format = p.get("format").map(String::as_str).unwrap_or("json");
    let mut body = Vec::with_capacity(end.saturating_sub(start) as usize * 120);
    let mut headers_out = Vec::new();
    match format {
        "ndjson" => {
            for i in ids {
                record(&mut body, i);
                body.push(b'\n');
            }
        }
        "csv" => {
            body.extend_from_slice(b"id,name,price,category,active,created_at\n");
            for i in ids {
                let (name, price, cat, active, ts) = fields(i);
                writeln!(body, "{i},{name},{price},{cat},{active},{ts}").unwrap();
            }
        }
        _ => {
            body.extend_from_slice(b"{\"data\":{\"items\":[");
            for (n, i) in ids.enumerate() {
                if n > 0 {
                    body.push(b',');
                }
                record(&mut body, i);
            }
            body.extend_from_slice(b"]}");
            let cursor = if more && style == "cursor" {
                format!("\"c{end:x}\"")
            } else {
                "null".into()
            };
            let next = if more && style == "next" {
                format!("\"http://127.0.0.1:{next_port}{}\"", next_target(page + 2))
            } else {
                "null".into()
            };
            write!(body, ",\"next_cursor\":{cursor},\"next\":{next}}}").unwrap();
        }
    }
    if more && style == "link" {
        headers_out.push((
            "link".into(),
            format!(
                "<http://127.0.0.1:{next_port}{}>; rel=\"next\", <http://127.0.0.1:{}/items>; rel=\"first\"",
                next_target(page + 2),
                server.port
            ),
        ));
    }
    let ctype = match format {
        "ndjson" => "application/x-ndjson",
        "csv" => "text/csv",
        _ => "application/json",
    };
    headers_out.push(("content-type".into(), ctype.into()));
    let gzip = p.get("gzip").is_some_and(|g| g == "1")
        && headers.get("accept-encoding").is_some_and(|a| a.contains("gzip"));
    if gzip {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(&body).unwrap();
        body = enc.finish().unwrap();
        headers_out.push(("content-encoding".into(), "gzip".into()));
    }
    Response {
        status: 200,
        headers: headers_out,
        body,
    }
}

/// The status a request gets before any data: a fault, or 200.
async fn fault(
    server: &Server,
    run: &str,
    p: &HashMap<String, String>,
    page: u64,
    headers: &HashMap<String, String>,
) -> u16 {
    if let Some(t) = p.get("token") {
        let expected = format!("Bearer {t}");
        if headers.get("authorization") != Some(&expected) {
            return 401;
        }
    }
    if list(p, "slow").contains(&page) {
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    for (kind, status) in [("throttle", 429), ("fail", 500)] {
        if list(p, kind).contains(&page) {
            let mut st = server.state.lock().unwrap();
            if st.faulted.insert((run.to_string(), kind, page)) {
                return status;
            }
        }
    }
    200
}

fn fields(i: u64) -> (String, f64, &'static str, bool, String) {
    let cat = ["books", "games", "tools"][(i % 3) as usize];
    let secs = 1_767_225_600 + i;
    let ts = chrono::DateTime::from_timestamp(secs as i64, 0)
        .map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_default();
    (
        format!("item-{i}"),
        (i % 1000) as f64 / 4.0,
        cat,
        i.is_multiple_of(2),
        ts,
    )
}

fn record(out: &mut Vec<u8>, i: u64) {
    let (name, price, cat, active, ts) = fields(i);
    write!(
        out,
        "{{\"id\":{i},\"name\":\"{name}\",\"price\":{price},\"category\":\"{cat}\",\"active\":{active},\"created_at\":\"{ts}\"}}"
    )
    .unwrap();
}
