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
        // The authority ends at the first character that cannot be part of it.
        let auth_end = tail
            .find(|c: char| c == '/' || c == '?' || c == '#' || c == '\'' || c == '"' || c.is_whitespace())
            .unwrap_or(tail.len());
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
