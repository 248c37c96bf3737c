//! The delivery journal: which input rows each request carried and how it ended, so that a run
//! killed half way can be replayed without sending again what was already delivered.
//!
//! Every input batch of a sink gets a fingerprint (a hash of its rows, stable across processes)
//! and an occurrence number (the n-th batch with that fingerprint). A request is journaled as the
//! row ranges of the batches it carries (`send`), then `done` (delivered, or refused rows
//! dead-lettered) or `staged`. A replay (`flumen resume` of a run that never finished) runs the
//! script again and skips the row ranges an earlier attempt accounted for. Requests that were in
//! flight when the process died count as delivered if the backend confirms their token.
//!
//! The guarantee: rows are never skipped unless identical rows were delivered; when the
//! statement's output batches come out the same in the replay (scans, filters, projections —
//! not aggregations, whose batches depend on thread timing) nothing is sent twice either.

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use arrow::array::RecordBatch;
use datafusion::common::hash_utils::{HLL_RANDOM_STATE, create_hashes};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Rows `start..start+len` of the `occ`-th input batch with fingerprint `hash`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slice {
    /// Fingerprint of the whole input batch.
    pub hash: u64,
    /// Which occurrence of that fingerprint.
    pub occ: u32,
    /// First row.
    pub start: u32,
    /// Rows.
    pub len: u32,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
enum Record {
    Send {
        sink: String,
        token: String,
        slices: Vec<Slice>,
    },
    Done {
        token: String,
    },
    Staged {
        token: String,
    },
    /// The rows of input batch (`hash`, `occ`) that broke a validation rule are dead-lettered.
    Rejected {
        sink: String,
        hash: u64,
        occ: u32,
    },
}

/// The fingerprint of a batch's rows; `None` for types the hasher does not know.
pub fn fingerprint(batch: &RecordBatch) -> Option<u64> {
    let mut hashes = vec![0u64; batch.num_rows()];
    create_hashes(batch.columns(), &HLL_RANDOM_STATE, &mut hashes).ok()?;
    let folded = hashes
        .iter()
        .fold(batch.num_rows() as u64 ^ 0x51_7C_C1_B7_27_22_0A_95, |acc, h| {
            (acc.rotate_left(23) ^ h).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        });
    Some(folded)
}

/// Appends journal records; each is flushed at once, so it survives the process being killed.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: Mutex<Option<std::io::BufWriter<std::fs::File>>>,
}

impl Journal {
    /// A journal at `path`, opened on first write.
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            file: Mutex::new(None),
        }
    }

    fn append(&self, record: &Record) -> Result<()> {
        let mut guard = self
            .file
            .lock()
            .map_err(|_| Error::Config("journal lock poisoned".into()))?;
        if guard.is_none() {
            if let Some(dir) = self.path.parent() {
                std::fs::create_dir_all(dir)
                    .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
            }
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)
                .map_err(|e| Error::io(format!("opening {}", self.path.display()), e))?;
            *guard = Some(std::io::BufWriter::new(f));
        }
        let io = |e| Error::io(format!("writing {}", self.path.display()), e);
        if let Some(w) = guard.as_mut() {
            let line =
                serde_json::to_string(record).map_err(|e| Error::Config(format!("journal record: {e}")))?;
            w.write_all(line.as_bytes()).map_err(io)?;
            w.write_all(b"\n").map_err(io)?;
            w.flush().map_err(io)?;
        }
        Ok(())
    }

    /// A request is about to be sent.
    pub fn send(&self, sink: &str, token: &str, slices: &[Slice]) -> Result<()> {
        self.append(&Record::Send {
            sink: sink.into(),
            token: token.into(),
            slices: slices.to_vec(),
        })
    }

    /// A request is delivered (its refused rows dead-lettered).
    pub fn done(&self, token: &str) -> Result<()> {
        self.append(&Record::Done { token: token.into() })
    }

    /// A request's rows are staged.
    pub fn staged(&self, token: &str) -> Result<()> {
        self.append(&Record::Staged { token: token.into() })
    }

    /// The rule-breaking rows of an input batch are in dead letters (a replay does not write
    /// them again).
    pub fn rejected(&self, sink: &str, hash: u64, occ: u32) -> Result<()> {
        self.append(&Record::Rejected {
            sink: sink.into(),
            hash,
            occ,
        })
    }
}

/// What an earlier attempt accounted for, for one sink.
#[derive(Debug, Clone, Default)]
pub struct SinkReplay {
    accounted: HashMap<(u64, u32), Vec<(u32, u32)>>,
    /// Input batches whose rule-breaking rows an earlier attempt dead-lettered.
    rejected: std::collections::HashSet<(u64, u32)>,
    /// Requests sent without a recorded ending: (token, slices).
    pub in_flight: Vec<(String, Vec<Slice>)>,
}

impl SinkReplay {
    /// Counts `slices` as delivered.
    pub fn account(&mut self, slices: &[Slice]) {
        for s in slices {
            self.accounted
                .entry((s.hash, s.occ))
                .or_default()
                .push((s.start, s.len));
        }
    }

    /// Whether an earlier attempt dead-lettered the rule-breaking rows of input batch
    /// (`hash`, `occ`).
    pub fn rejections_written(&self, hash: u64, occ: u32) -> bool {
        self.rejected.contains(&(hash, occ))
    }

    /// The row ranges of a batch of `rows` rows that still need sending.
    pub fn remaining(&self, hash: u64, occ: u32, rows: u32) -> Vec<(u32, u32)> {
        let Some(done) = self.accounted.get(&(hash, occ)) else {
            return vec![(0, rows)];
        };
        let mut done = done.clone();
        done.sort_unstable();
        let mut out = Vec::new();
        let mut at = 0;
        for (start, len) in done {
            if start > at {
                out.push((at, start - at));
            }
            at = at.max(start + len);
        }
        if at < rows {
            out.push((at, rows - at));
        }
        out
    }
}

/// Everything a journal says, by sink.
#[derive(Debug, Default)]
pub struct Replay {
    sinks: HashMap<String, SinkReplay>,
}

impl Replay {
    /// Reads a journal; a torn last line (the process died while writing it) is ignored.
    pub fn load(path: &Path) -> Result<Self> {
        let file = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
        };
        let mut sent: HashMap<String, (String, Vec<Slice>)> = HashMap::new();
        let mut ended: Vec<String> = Vec::new();
        let mut rejected: Vec<(String, u64, u32)> = Vec::new();
        for line in std::io::BufReader::new(file).lines() {
            let line = line.map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
            match serde_json::from_str::<Record>(&line) {
                Ok(Record::Send { sink, token, slices }) => {
                    sent.insert(token, (sink, slices));
                }
                Ok(Record::Done { token } | Record::Staged { token }) => ended.push(token),
                Ok(Record::Rejected { sink, hash, occ }) => {
                    rejected.push((sink, hash, occ));
                }
                Err(_) => break,
            }
        }
        let mut replay = Replay::default();
        for (sink, hash, occ) in rejected {
            replay.sinks.entry(sink).or_default().rejected.insert((hash, occ));
        }
        for token in ended {
            if let Some((sink, slices)) = sent.remove(&token) {
                replay.sinks.entry(sink).or_default().account(&slices);
            }
        }
        for (token, (sink, slices)) in sent {
            replay
                .sinks
                .entry(sink)
                .or_default()
                .in_flight
                .push((token, slices));
        }
        Ok(replay)
    }

    /// Whether the journal recorded anything.
    pub fn is_empty(&self) -> bool {
        self.sinks.is_empty()
    }

    /// What one sink (`table@l<line>`) had accounted for.
    pub fn sink(&self, key: &str) -> Option<SinkReplay> {
        self.sinks.get(key).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn fingerprints_are_content_based() {
        let spec = crate::datagen::GenSpec::new(crate::datagen::Dataset::Orders, 100);
        let a = spec.batch(0, 50).unwrap();
        let b = spec.batch(0, 50).unwrap();
        let c = spec.batch(50, 50).unwrap();
        assert_eq!(fingerprint(&a), fingerprint(&b));
        assert_ne!(fingerprint(&a), fingerprint(&c));
        let events = crate::datagen::GenSpec::new(crate::datagen::Dataset::Events, 10)
            .batch(0, 10)
            .unwrap();
        assert!(fingerprint(&events).is_some(), "nested types hash too");
    }

    #[test]
    fn journal_round_trip_and_remaining_ranges() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.jsonl");
        let j = Journal::new(path.clone());
        let s = |start, len| Slice {
            hash: 7,
            occ: 0,
            start,
            len,
        };
        j.send("t@l3", "a", &[s(0, 10)]).unwrap();
        j.done("a").unwrap();
        j.send("t@l3", "b", &[s(10, 5)]).unwrap();
        j.staged("b").unwrap();
        j.send("t@l3", "c", &[s(20, 5)]).unwrap();
        j.rejected("t@l3", 9, 1).unwrap();
        // A torn last line, as a killed process leaves it.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"t\":\"do")
            .unwrap();
        let r = Replay::load(&path).unwrap();
        let sink = r.sink("t@l3").unwrap();
        assert_eq!(sink.remaining(7, 0, 30), vec![(15, 15)]);
        assert_eq!(sink.remaining(7, 1, 30), vec![(0, 30)]);
        assert_eq!(sink.in_flight.len(), 1);
        assert!(sink.rejections_written(9, 1) && !sink.rejections_written(9, 0));
        let mut sink = sink;
        let flight = sink.in_flight[0].1.clone();
        sink.account(&flight);
        assert_eq!(sink.remaining(7, 0, 30), vec![(15, 5), (25, 5)]);
        let _ = Arc::new(0);
    }
}
