//! HTTP tables against `flumen-test-api` (tests/support/api_server.rs), started by each test on
//! an ephemeral port: every pagination style over 500 pages with a 429, a 500 and a slow page
//! injected, the rate limit measured from the server's request log, formats, inference, LIMIT,
//! and a 401 whose message does not show the token.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};

use common::{fails, ok};

/// The API server; killed when dropped.
struct Api {
    child: Child,
    base: String,
}

impl Drop for Api {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn api() -> Api {
    let mut child = Command::new(env!("CARGO_BIN_EXE_flumen-test-api"))
        .stdout(Stdio::piped())
        .spawn()
        .expect("flumen-test-api starts");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .expect("prints its address")
        .to_string();
    Api {
        child,
        base: format!("http://{addr}"),
    }
}

impl Api {
    /// The server's log of `run`: (ms since it started, page index, status) per request.
    fn log(&self, run: &str) -> Vec<(u64, u64, u16)> {
        let out = Command::new("curl")
            .args(["-sf", &format!("{}/_log?run={run}", self.base)])
            .output()
            .expect("curl runs");
        let v: Vec<(u64, u64, u16)> = serde_json::from_slice(&out.stdout).expect("the log is JSON");
        v
    }
}

fn run(dir: &Path, script: &str, extra: &[&str]) -> Output {
    let mut args = vec!["--format", "csv"];
    args.extend_from_slice(extra);
    common::flumen(dir, script, &args)
}

const COLS: &str =
    "id BIGINT, name VARCHAR, price DOUBLE, category VARCHAR, active BOOLEAN, created_at TIMESTAMP";

/// What every complete read of `total` records must show.
fn expected(total: u64) -> String {
    let ids = total * (total - 1) / 2;
    let price: f64 = (0..total).map(|i| (i % 1000) as f64 / 4.0).sum();
    format!(
        "n,ids,id_sum,price_sum,books\n{total},{total},{ids},{price:?},{}\n",
        total.div_ceil(3)
    )
}

const CHECK: &str = "SELECT count(*) AS n, count(DISTINCT id) AS ids, sum(id) AS id_sum, sum(price) AS price_sum, \
                     sum(CASE WHEN category = 'books' THEN 1 ELSE 0 END) AS books FROM items;";

#[test]
fn every_pagination_style_loads_each_record_once_through_faults() {
    let api = api();
    let dir = tempfile::tempdir().unwrap();
    let total = 10_000u64;
    let styles = [
        ("page", "'pagination' 'page', 'page_size' '20'"),
        ("offset", "'pagination' 'offset', 'page_size' '20'"),
        (
            "cursor",
            "'pagination' 'cursor', 'page_size' '20', 'cursor_path' '/next_cursor'",
        ),
        // These two learn the next page from the server: the size is a plain parameter.
        ("link", "'pagination' 'link_header'"),
        ("next", "'pagination' 'next_url'"),
    ];
    for (style, opts) in styles {
        let tag = format!("styles-{style}");
        let script = format!(
            "CREATE EXTERNAL TABLE items ({COLS}) STORED AS HTTP LOCATION '{}/items' \
             OPTIONS ('records' '/data/items', {opts}, 'concurrency' '8', \
                      'params' 'style={style}&per_page=20&total={total}&run={tag}&throttle=7&fail=13,400&slow=21');\n{CHECK}",
            api.base
        );
        let out = run(dir.path(), &script, &[]);
        assert_eq!(ok(&out), expected(total), "style {style}");
        let log = api.log(&tag);
        let statuses = |page: u64| -> Vec<u16> { log.iter().filter(|l| l.1 == page).map(|l| l.2).collect() };
        assert_eq!(statuses(7), vec![429, 200], "style {style}: the 429 was retried");
        assert_eq!(statuses(13), vec![500, 200], "style {style}: the 500 was retried");
        assert_eq!(statuses(400), vec![500, 200], "style {style}");
        assert_eq!(
            statuses(21),
            vec![200],
            "style {style}: the slow page was waited for"
        );
        let served: std::collections::BTreeSet<u64> =
            log.iter().filter(|l| l.2 == 200).map(|l| l.1).collect();
        assert_eq!(served.range(..500).count(), 500, "style {style}: 500 pages");
        // Numbered pages learn of the end from an empty page; up to 7 more were in flight.
        assert!(
            served.len() <= 508,
            "style {style}: {} pages requested",
            served.len()
        );
        // The 429 asked for a second: the retry waited for it.
        let t = |page: u64, status: u16| log.iter().find(|l| l.1 == page && l.2 == status).unwrap().0;
        assert!(
            t(7, 200) >= t(7, 429) + 1000,
            "style {style}: Retry-After honoured"
        );
    }
}

#[test]
fn the_rate_limit_spaces_requests() {
    let api = api();
    let dir = tempfile::tempdir().unwrap();
    let script = format!(
        "CREATE EXTERNAL TABLE items ({COLS}) STORED AS HTTP LOCATION '{}/items' \
         OPTIONS ('records' '/data/items', 'pagination' 'page', 'page_size' '10', 'concurrency' '8', \
                  'rate_limit' '20/s', 'params' 'total=600&run=rate');\n{CHECK}",
        api.base
    );
    assert_eq!(ok(&run(dir.path(), &script, &[])), expected(600));
    let times: Vec<u64> = api.log("rate").iter().map(|l| l.0).collect();
    // 60 pages plus the empty 61st, and up to 7 requests in flight past it.
    assert!(times.len() >= 61, "{} requests", times.len());
    // No second holds more than 20 requests (one more at the window's edge, for clock rounding).
    for (i, t0) in times.iter().enumerate() {
        let within = times[i..].iter().take_while(|t| **t < t0 + 1000).count();
        assert!(within <= 21, "{within} requests within a second from {t0} ms");
    }
    let span = times.last().unwrap() - times.first().unwrap();
    assert!(
        span >= (times.len() as u64 - 1) * 50 - 20,
        "{} requests in {span} ms",
        times.len()
    );
}

#[test]
fn formats_compression_inference_and_limit() {
    let api = api();
    let dir = tempfile::tempdir().unwrap();
    let b = &api.base;
    for format in ["ndjson", "csv"] {
        let script = format!(
            "CREATE EXTERNAL TABLE items ({COLS}) STORED AS HTTP LOCATION '{b}/items' \
             OPTIONS ('format' '{format}', 'pagination' 'page', 'page_size' '100', \
                      'params' 'format={format}&total=2345&gzip=1');\n{CHECK}\
             SELECT id, name, created_at FROM items WHERE id = 1234;"
        );
        assert_eq!(
            ok(&run(dir.path(), &script, &[])),
            format!(
                "{}id,name,created_at\n1234,item-1234,2026-01-01T00:20:34\n",
                expected(2345)
            ),
            "format {format}"
        );
    }
    // Columns inferred from the first page; a link-paginated read cut short by LIMIT.
    let script = format!(
        "CREATE EXTERNAL TABLE items STORED AS HTTP LOCATION '{b}/items' \
         OPTIONS ('records' '/data/items', 'pagination' 'link_header', 'sample' '50', \
                  'params' 'style=link&per_page=50&total=100000&run=limit');\n\
         SELECT column_name, data_type FROM information_schema.columns WHERE table_name = 'items' ORDER BY ordinal_position;\n\
         SELECT count(*) AS n FROM (SELECT * FROM items LIMIT 120);"
    );
    assert_eq!(
        ok(&run(dir.path(), &script, &[])),
        "column_name,data_type\nid,Int64\nname,Utf8\nprice,Float64\ncategory,Utf8\nactive,Boolean\ncreated_at,Utf8\n\
         n\n120\n"
    );
    // Inference read one page, the LIMIT three, and the look-ahead (concurrency 4) at most 4 more.
    let pages = api.log("limit").len();
    assert!(
        (4..=8).contains(&pages),
        "{pages} requests for 120 records of 50 per page"
    );
    // The whole read lands in Parquet with the declared types.
    let out = dir.path().join("items.parquet");
    let script = format!(
        "CREATE EXTERNAL TABLE items ({COLS}) STORED AS HTTP LOCATION '{b}/items' \
         OPTIONS ('records' '/data/items', 'pagination' 'offset', 'page_size' '500', \
                  'params' 'style=offset&total=20000');\n\
         COPY items TO '{}';\n\
         SELECT count(*) AS n, max(created_at) AS last FROM '{}';",
        out.display(),
        out.display()
    );
    assert_eq!(
        ok(&run(dir.path(), &script, &[])),
        "n,last\n20000,2026-01-01T05:33:19\n"
    );
}

#[test]
fn a_refused_token_is_a_clear_error_without_the_token() {
    let api = api();
    let dir = tempfile::tempdir().unwrap();
    let b = &api.base;
    let script = format!(
        "CREATE EXTERNAL TABLE items ({COLS}) STORED AS HTTP LOCATION '{b}/items' \
         OPTIONS ('records' '/data/items', 'pagination' 'page', 'page_size' '10', \
                  'bearer_token' '${{API_TOKEN}}', 'params' 'token=right-token-0042&total=100');\n{CHECK}"
    );
    let e = fails(&run(
        dir.path(),
        &script,
        &["--set", "API_TOKEN=wrong-token-0042"],
    ));
    assert!(e.contains("HTTP 401 Unauthorized"), "{e}");
    assert!(e.contains("check the credentials"), "{e}");
    assert!(e.contains("invalid token"), "the body's first lines: {e}");
    assert!(e.contains(&format!("{b}/items?")), "names the URL: {e}");
    assert!(!e.contains("wrong-token-0042"), "{e}");
    // The right token reads; the explain output does not show it either.
    let good = ["--set", "API_TOKEN=right-token-0042"];
    assert_eq!(ok(&run(dir.path(), &script, &good)), expected(100));
    let path = dir.path().join("explain.sql");
    std::fs::write(&path, &script).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_flumen"))
        .arg("explain")
        .arg(&path)
        .args(good)
        .output()
        .unwrap();
    let shown = ok(&out);
    assert!(
        shown.contains("HttpScanExec") && shown.contains("pagination=page"),
        "{shown}"
    );
    assert!(!shown.contains("right-token-0042"), "{shown}");
    // An API key in the query string is masked in messages too.
    let script = format!(
        "CREATE EXTERNAL TABLE items ({COLS}) STORED AS HTTP LOCATION '{b}/nowhere' \
         OPTIONS ('api_key' 'k3y-value-77', 'api_key_param' 'apikey');\nSELECT * FROM items;"
    );
    let e = fails(&run(dir.path(), &script, &[]));
    // (Messages name the page's URL; the key is added only to the request itself.)
    assert!(e.contains("HTTP 404") && e.contains("/nowhere"), "{e}");
    assert!(!e.contains("k3y-value-77"), "{e}");
}

#[test]
fn bad_options_and_records_are_named() {
    let api = api();
    let dir = tempfile::tempdir().unwrap();
    let b = &api.base;
    let e = fails(&run(
        dir.path(),
        &format!(
            "CREATE EXTERNAL TABLE items ({COLS}) STORED AS HTTP LOCATION '{b}/items' OPTIONS ('pagination' 'offset');"
        ),
        &[],
    ));
    assert!(e.contains("needs 'page_size'"), "{e}");
    let e = fails(&run(
        dir.path(),
        &format!(
            "CREATE EXTERNAL TABLE items ({COLS}) STORED AS HTTP LOCATION '{b}/items' OPTIONS ('rate_limit' 'fast');"
        ),
        &[],
    ));
    assert!(e.contains("'rate_limit' has bad value 'fast'"), "{e}");
    // A column declared BOOLEAN receives names: the record and the page are named.
    let e = fails(&run(
        dir.path(),
        &format!(
            "CREATE EXTERNAL TABLE items (id BIGINT, name BOOLEAN) STORED AS HTTP LOCATION '{b}/items' \
             OPTIONS ('records' '/data/items', 'params' 'total=5');\nSELECT * FROM items;"
        ),
        &[],
    ));
    assert!(
        e.contains("table items") && e.contains("record 1 of the page"),
        "{e}"
    );
    assert!(e.contains("item-0"), "{e}");
}

/// The credentials server `api` was sent under `run`.
fn creds(api: &Api, run: &str) -> Vec<String> {
    let out = Command::new("curl")
        .args(["-sf", &format!("{}/_creds?run={run}", api.base)])
        .output()
        .expect("curl runs");
    serde_json::from_slice(&out.stdout).expect("the list is JSON")
}

#[test]
fn credentials_stay_with_their_origin_and_hostile_paging_ends() {
    let home = api();
    let other = api();
    let dir = tempfile::tempdir().unwrap();
    let b = &home.base;
    let port = other.base.rsplit(':').next().unwrap();
    let auth = "'bearer_token' 'tok-secret-5150', 'api_key' 'key-secret-6160'";
    // Pages 2.. are on another server, named by the first page's `next`: read, without credentials.
    let script = |run: &str, extra: &str| {
        format!(
            "CREATE EXTERNAL TABLE items ({COLS}) STORED AS HTTP LOCATION '{b}/items' \
             OPTIONS ('records' '/data/items', 'pagination' 'next_url', {auth}, \
                      'params' 'style=next&total=30&per_page=10&next_port={port}&run={run}'{extra});\n{CHECK}"
        )
    };
    assert_eq!(ok(&run(dir.path(), &script("n1", ""), &[])), expected(30));
    assert_eq!(
        creds(&home, "n1"),
        vec![
            "Bearer tok-secret-5150".to_string(),
            "key-secret-6160".to_string()
        ],
        "the LOCATION's origin gets them"
    );
    assert!(creds(&other, "n1").is_empty(), "{:?}", creds(&other, "n1"));
    // ... unless the other origin is trusted.
    let trusted = format!(", 'trusted_origins' 'http://127.0.0.1:{port}'");
    assert_eq!(ok(&run(dir.path(), &script("n2", &trusted), &[])), expected(30));
    assert_eq!(
        creds(&other, "n2").len(),
        4,
        "pages 2 and 3, two credentials each"
    );

    // A redirect to another server: followed, without the credentials.
    let script = format!(
        "CREATE EXTERNAL TABLE items ({COLS}) STORED AS HTTP LOCATION '{b}/items' \
         OPTIONS ('records' '/data/items', 'pagination' 'page', 'page_size' '10', {auth}, \
                  'params' 'total=20&redirect_port={port}&run=r1');\n{CHECK}"
    );
    assert_eq!(ok(&run(dir.path(), &script, &[])), expected(20));
    let at_home = creds(&home, "r1");
    assert!(
        at_home.len() >= 4 && at_home.len().is_multiple_of(2),
        "every page asked at home: {at_home:?}"
    );
    assert!(creds(&other, "r1").is_empty(), "{:?}", creds(&other, "r1"));

    // Two pages that name each other: an error, not an endless read.
    for style in ["next_url", "link_header"] {
        let s = if style == "next_url" { "next" } else { "link" };
        let script = format!(
            "CREATE EXTERNAL TABLE items ({COLS}) STORED AS HTTP LOCATION '{b}/items' \
             OPTIONS ('records' '/data/items', 'pagination' '{style}', {auth}, \
                      'params' 'style={s}&total=100&per_page=10&cycle=1');\n{CHECK}"
        );
        let e = fails(&run(dir.path(), &script, &[]));
        assert!(e.contains("form a cycle"), "{style}: {e}");
        assert!(!e.contains("secret-"), "{e}");
    }
    // A numbered API that repeats its last page past the end.
    let script = format!(
        "CREATE EXTERNAL TABLE items ({COLS}) STORED AS HTTP LOCATION '{b}/items' \
         OPTIONS ('records' '/data/items', 'pagination' 'page', 'page_size' '10', \
                  'params' 'total=25&repeat=1');\n{CHECK}"
    );
    let e = fails(&run(dir.path(), &script, &[]));
    assert!(e.contains("same body as the page before it"), "{e}");
    // A body larger than 'max_body'.
    let script = format!(
        "CREATE EXTERNAL TABLE items ({COLS}) STORED AS HTTP LOCATION '{b}/items' \
         OPTIONS ('records' '/data/items', 'max_body' '1KiB', 'params' 'total=100&per_page=100');\n{CHECK}"
    );
    let e = fails(&run(dir.path(), &script, &[]));
    assert!(e.contains("larger than 1024 bytes"), "{e}");
}

/// Secrets written literally in OPTIONS (not as `${VAR}`) are learnt as secrets too: a failing
/// CREATE's error quotes its statement with them masked.
#[test]
fn literal_secrets_in_options_are_masked_in_errors() {
    let dir = tempfile::tempdir().unwrap();
    let script = format!(
        "CREATE EXTERNAL TABLE items ({COLS}) STORED AS HTTP LOCATION 'http://127.0.0.1:9/items' \
         OPTIONS ('bearer_token' 'lit-tok-4242', 'headers' 'X-Api-Token: lit-hdr-4343', 'rate_limit' 'fast');"
    );
    let e = fails(&run(dir.path(), &script, &[]));
    assert!(e.contains("'rate_limit' has bad value 'fast'"), "{e}");
    assert!(
        e.contains("CREATE EXTERNAL TABLE items"),
        "the statement is quoted: {e}"
    );
    assert!(!e.contains("lit-tok-4242") && !e.contains("lit-hdr-4343"), "{e}");
}
