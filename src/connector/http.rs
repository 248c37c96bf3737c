//! What the HTTP-speaking connectors share.

/// A percent-encoded part of a URL (user, password, path segment), decoded.
pub fn decode(s: &str) -> String {
    url::form_urlencoded::parse(format!("x={s}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
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
