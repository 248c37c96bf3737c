//! Counters every sink keeps: rows, bytes, requests, retries, spilled and rejected rows.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// Live counters of one sink, shared by its in-flight requests.
#[derive(Debug, Default)]
pub struct SinkMetrics {
    rows: AtomicU64,
    bytes: AtomicU64,
    requests: AtomicU64,
    retries: AtomicU64,
    spilled: AtomicU64,
    rejected: AtomicU64,
    /// Rows rejected by each validation rule.
    rules: std::sync::Mutex<std::collections::BTreeMap<String, u64>>,
}

/// A copy of a sink's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SinkMetricsSnapshot {
    /// Rows delivered.
    pub rows: u64,
    /// Encoded bytes of delivered requests.
    pub bytes: u64,
    /// Requests sent, retries included.
    pub requests: u64,
    /// Requests sent again after a failure.
    pub retries: u64,
    /// Rows written to staging because they could not be delivered.
    pub spilled: u64,
    /// Rows the backend refused or a validation rule rejected, now in dead letters.
    pub rejected: u64,
    /// Of those, the rows each validation rule rejected.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub rules: std::collections::BTreeMap<String, u64>,
}

impl SinkMetrics {
    pub(crate) fn delivered(&self, rows: u64, bytes: u64) {
        self.rows.fetch_add(rows, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    pub(crate) fn request(&self, retry: bool) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if retry {
            self.retries.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn spilled(&self, rows: u64) {
        self.spilled.fetch_add(rows, Ordering::Relaxed);
    }

    pub(crate) fn rejected(&self, rows: u64) {
        self.rejected.fetch_add(rows, Ordering::Relaxed);
    }

    /// Counts rows a validation rule rejected (they are counted as rejected too).
    pub(crate) fn rejected_by(&self, rule: &str, rows: u64) {
        if let Ok(mut m) = self.rules.lock() {
            *m.entry(rule.to_string()).or_default() += rows;
        }
    }

    /// Adds counters kept elsewhere (a sink that ran on a cluster executor).
    pub fn add(&self, o: &SinkMetricsSnapshot) {
        self.rows.fetch_add(o.rows, Ordering::Relaxed);
        self.bytes.fetch_add(o.bytes, Ordering::Relaxed);
        self.requests.fetch_add(o.requests, Ordering::Relaxed);
        self.retries.fetch_add(o.retries, Ordering::Relaxed);
        self.spilled.fetch_add(o.spilled, Ordering::Relaxed);
        self.rejected.fetch_add(o.rejected, Ordering::Relaxed);
        if let Ok(mut m) = self.rules.lock() {
            for (rule, n) in &o.rules {
                *m.entry(rule.clone()).or_default() += n;
            }
        }
    }

    /// The counters now.
    pub fn snapshot(&self) -> SinkMetricsSnapshot {
        SinkMetricsSnapshot {
            rows: self.rows.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            requests: self.requests.load(Ordering::Relaxed),
            retries: self.retries.load(Ordering::Relaxed),
            spilled: self.spilled.load(Ordering::Relaxed),
            rejected: self.rejected.load(Ordering::Relaxed),
            rules: self.rules.lock().map(|m| m.clone()).unwrap_or_default(),
        }
    }
}

impl SinkMetricsSnapshot {
    /// Adds another snapshot (several statements writing one table).
    pub fn add(&mut self, o: &SinkMetricsSnapshot) {
        self.rows += o.rows;
        self.bytes += o.bytes;
        self.requests += o.requests;
        self.retries += o.retries;
        self.spilled += o.spilled;
        self.rejected += o.rejected;
        for (rule, n) in &o.rules {
            *self.rules.entry(rule.clone()).or_default() += n;
        }
    }
}

/// Prometheus text exposition of per-table sink counters.
pub fn prometheus<'a>(sinks: impl IntoIterator<Item = (&'a str, &'a SinkMetricsSnapshot)>) -> String {
    let sinks: Vec<_> = sinks.into_iter().collect();
    let mut out = String::new();
    type Series = (&'static str, &'static str, fn(&SinkMetricsSnapshot) -> u64);
    let series: [Series; 6] = [
        ("rows", "Rows delivered", |m| m.rows),
        ("bytes", "Encoded bytes delivered", |m| m.bytes),
        ("requests", "Requests sent, retries included", |m| m.requests),
        ("retries", "Requests sent again after a failure", |m| m.retries),
        ("spilled_rows", "Rows written to staging", |m| m.spilled),
        (
            "rejected_rows",
            "Rows refused by the sink, in dead letters",
            |m| m.rejected,
        ),
    ];
    for (name, help, get) in series {
        out.push_str(&format!(
            "# HELP flumen_sink_{name}_total {help}.\n# TYPE flumen_sink_{name}_total counter\n"
        ));
        for (table, m) in &sinks {
            let label = table.replace('\\', "\\\\").replace('"', "\\\"");
            out.push_str(&format!(
                "flumen_sink_{name}_total{{table=\"{label}\"}} {}\n",
                get(m)
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text() {
        let m = SinkMetricsSnapshot {
            rows: 10,
            retries: 2,
            ..Default::default()
        };
        let text = prometheus([("orders", &m)]);
        assert!(
            text.contains("flumen_sink_rows_total{table=\"orders\"} 10\n"),
            "{text}"
        );
        assert!(text.contains(
            "# TYPE flumen_sink_retries_total counter\nflumen_sink_retries_total{table=\"orders\"} 2\n"
        ));
    }
}
