//! Keeping secrets out of messages, logs and `explain` output.

use std::sync::{Arc, RwLock};

/// Names that mark a variable's value as secret (matched case-insensitively, as substrings).
const SECRET_MARKERS: &[&str] = &[
    "PASSWORD",
    "PASSWD",
    "SECRET",
    "TOKEN",
    "KEY",
    "CREDENTIAL",
    "AUTH",
];

/// Table options whose values are secrets (or hold them: `headers`, `properties`).
const SECRET_OPTIONS: &[&str] = &["password", "api_key", "bearer_token", "bearer", "basic_auth"];

/// Whether a table option's value is a secret, or may hold one (`headers`, `properties`):
/// never shown, in an option error either.
pub fn is_secret_option(name: &str) -> bool {
    SECRET_OPTIONS.iter().any(|o| o.eq_ignore_ascii_case(name))
        || name.eq_ignore_ascii_case("headers")
        || name.eq_ignore_ascii_case("properties")
}

/// What a redacted secret is replaced with.
pub const MASK: &str = "***";

/// Removes secrets from text shown to the user.
///
/// Two kinds are removed: values of variables whose names look secret (`PG_PASSWORD`,
/// `API_TOKEN`, `AWS_SECRET_ACCESS_KEY`, ...), learnt as scripts are substituted, and the
/// password part of any `scheme://user:password@host` URL. Cloning shares the learnt secrets.
#[derive(Debug, Clone, Default)]
pub struct Redactor {
    secrets: Arc<RwLock<Vec<String>>>,
}

impl Redactor {
    /// Whether a variable with this name holds a secret.
    pub fn is_secret_name(name: &str) -> bool {
        let upper = name.to_ascii_uppercase();
        SECRET_MARKERS.iter().any(|m| upper.contains(m))
    }

    /// Remembers `value` as secret if `name` looks secret. Very short values are not learnt:
    /// masking every `1` in a message would make it unreadable and protects nothing.
    pub fn observe(&self, name: &str, value: &str) {
        if value.len() < 3 || !Self::is_secret_name(name) {
            return;
        }
        if let Ok(mut s) = self.secrets.write()
            && !s.iter().any(|v| v == value)
        {
            s.push(value.to_string());
            // Longest first, so a secret containing another is masked whole.
            s.sort_by_key(|v| std::cmp::Reverse(v.len()));
        }
    }

    /// Remembers `value` as secret, whatever its name.
    fn learn(&self, value: &str) {
        self.observe("SECRET", value.trim());
    }

    /// Learns the secrets in a table's options: the values of `password`, `api_key`,
    /// `bearer_token` and `basic_auth` (and its password part), the values of `headers` and of
    /// librdkafka `properties` whose names look secret (`Authorization`, `X-API-Key`,
    /// `sasl.password`, and the credential after `Bearer `/`Basic `). Literal values and
    /// `${VAR}`s alike: what is learnt is the value the server gets.
    pub fn observe_options<'a>(&self, options: impl IntoIterator<Item = (&'a str, &'a str)>) {
        for (k, v) in options {
            let k = k.rsplit('.').next().unwrap_or(k);
            if SECRET_OPTIONS.iter().any(|o| o.eq_ignore_ascii_case(k)) {
                self.learn(v);
                if k.eq_ignore_ascii_case("basic_auth")
                    && let Some((_, password)) = v.split_once(':')
                {
                    self.learn(password);
                }
            } else if k.eq_ignore_ascii_case("headers") || k.eq_ignore_ascii_case("properties") {
                let sep = if k.eq_ignore_ascii_case("headers") {
                    ':'
                } else {
                    '='
                };
                for (name, value) in crate::connector::options::parse_pairs(v, sep).unwrap_or_default() {
                    if Self::is_secret_name(&name) {
                        self.learn(&value);
                        if let Some((_, credential)) = value.split_once(' ') {
                            self.learn(credential);
                        }
                    }
                }
            }
        }
    }

    /// `text` with every known secret and URL password replaced by [`MASK`].
    pub fn redact(&self, text: &str) -> String {
        let mut out = mask_url_passwords(text);
        if let Ok(s) = self.secrets.read() {
            for secret in s.iter() {
                if out.contains(secret.as_str()) {
                    out = out.replace(secret.as_str(), MASK);
                }
            }
        }
        out
    }
}

/// Replaces the password in `scheme://user:password@host` with [`MASK`], wherever it occurs.
fn mask_url_passwords(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(p) = rest.find("://") {
        let (head, tail) = rest.split_at(p + 3);
        out.push_str(head);
        // The authority ends at the first character that cannot be part of it; a password
        // written with an unencoded `/`, `?` or `#` ends only at its `@` (the user part before
        // the first `:` cannot hold them).
        let word_end = tail
            .find(|c: char| c == '\'' || c == '"' || c.is_whitespace())
            .unwrap_or(tail.len());
        let mut auth_end = tail
            .find(|c: char| c == '/' || c == '?' || c == '#' || c == '\'' || c == '"' || c.is_whitespace())
            .unwrap_or(tail.len());
        // (Not past a port: `host:8080/users/a@b` has no password.)
        let port = |colon: usize| {
            let after = &tail[colon + 1..auth_end.max(colon + 1)];
            !after.is_empty() && after.bytes().all(|b| b.is_ascii_digit())
        };
        if let Some(colon) = tail[..word_end].find(':')
            && !tail[..colon].contains(['/', '?', '#', '@'])
            && !port(colon)
            && let Some(at) = tail[..word_end].rfind('@')
            && at > auth_end
        {
            auth_end = tail[at..word_end]
                .find(['/', '?', '#'])
                .map_or(word_end, |e| at + e);
        }
        let authority = &tail[..auth_end];
        match authority.rfind('@') {
            Some(at) => {
                let userinfo = &authority[..at];
                match userinfo.find(':') {
                    Some(colon) => {
                        out.push_str(&userinfo[..colon + 1]);
                        out.push_str(MASK);
                        out.push_str(&authority[at..]);
                    }
                    None => out.push_str(authority),
                }
            }
            None => out.push_str(authority),
        }
        rest = &tail[auth_end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_url_passwords() {
        let r = Redactor::default();
        assert_eq!(
            r.redact("LOCATION 'mysql://etl:s3cr:et@127.0.0.1:3306/shop' and http://h:8123/x"),
            "LOCATION 'mysql://etl:***@127.0.0.1:3306/shop' and http://h:8123/x"
        );
        assert_eq!(r.redact("postgres://user@host/db"), "postgres://user@host/db");
        // A password with an unencoded slash or question mark is masked whole.
        assert_eq!(
            r.redact("error: mysql://etl:pa/ss?w@db:3306/shop failed"),
            "error: mysql://etl:***@db:3306/shop failed"
        );
    }

    #[test]
    fn secret_options_are_learnt_whatever_their_value_came_from() {
        let r = Redactor::default();
        r.observe_options([
            ("password", "literal-pw-1"),
            ("basic_auth", "joe:basic-pw-2"),
            (
                "headers",
                "Accept: json; Authorization: Bearer hdr-tok-3; X-Team: data",
            ),
            ("properties", "sasl.mechanism=PLAIN; sasl.password=kafka-pw-4"),
            ("keys", "order_id"),
        ]);
        let shown = r.redact("literal-pw-1 basic-pw-2 hdr-tok-3 kafka-pw-4 order_id json data PLAIN");
        assert_eq!(shown, "*** *** *** *** order_id json data PLAIN");
        assert!(is_secret_option("API_KEY") && is_secret_option("headers") && !is_secret_option("keys"));
        // A port and an @ later in the path are not a password.
        assert_eq!(
            r.redact("GET http://127.0.0.1:8080/users/a@b.com failed"),
            "GET http://127.0.0.1:8080/users/a@b.com failed"
        );
    }

    #[test]
    fn masks_learnt_secret_values_only_for_secret_names() {
        let r = Redactor::default();
        r.observe("PG_PASSWORD", "hunter22");
        r.observe("HOST", "db.internal");
        r.observe("api_token", "tok-123456");
        let msg = r.redact("connect db.internal with hunter22 and tok-123456");
        assert_eq!(msg, "connect db.internal with *** and ***");
    }

    #[test]
    fn clones_share_secrets() {
        let r = Redactor::default();
        let c = r.clone();
        r.observe("SECRET", "abcdef");
        assert_eq!(c.redact("x abcdef"), "x ***");
    }
}
