//! The delivery journal: which input rows each request carried, how it ended, and which side
//! effects (DDL, table swaps) the run performed, so that a run killed half way can be replayed
//! without sending again what was already delivered and without repeating a side effect.
//!
//! Every input batch of a sink gets a fingerprint (a hash of its values, see [`fingerprint`])
//! and an occurrence number (the n-th batch with that fingerprint). A request is journaled as the
//! row ranges of the batches it carries, with its delivery token, *before* it is sent (`send`),
//! then `done` (delivered, or refused rows dead-lettered) or `staged`. A replay (`flumen resume`
//! of a run that did not finish) runs the script again, skips the row ranges an earlier attempt
//! accounted for, and sends the requests that were in flight again with their original tokens
//! and rows, so that a sink that deduplicates by token (a delivery table, document ids derived
//! from the token, ClickHouse's insert deduplication token) applies each of them once.
//!
//! The guarantee: rows are never skipped unless identical rows were delivered; when the
//! statement's output batches come out the same in the replay (scans, filters, projections —
//! not aggregations, whose batches depend on thread timing) nothing is sent twice either.
//!
//! The file starts with a header naming its format and fingerprint algorithm; a journal written
//! by another format is refused with a clear error instead of being misread.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::DataType;
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::Xxh3;

use crate::error::{Error, Result};

/// The journal format this build writes and reads.
pub const JOURNAL_FORMAT: u32 = 2;

/// The fingerprint algorithm of [`fingerprint`], named in the journal's header.
pub const FINGERPRINT: &str = "xxh3-64/flumen-values-1";

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
    /// The first line of every journal.
    Header {
        format: u32,
        fingerprint: String,
    },
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
    /// A side effect (`<table>/<what>`) is done: never to be repeated by this run.
    Effect {
        key: String,
    },
    /// A staged request's part was given up (its broker messages went back): its rows are not
    /// accounted for any more.
    Dropped {
        token: String,
    },
}

/// A stable hash of a batch's values, the same in every process and every build that writes
/// the same [`FINGERPRINT`]; `None` for types it does not cover (unions, run-end encoded).
///
/// Values are fed to XXH3-64 column by column in a fixed encoding of flumen's own: fixed-width
/// values as their little-endian bytes, variable-width ones with their length, each value
/// preceded by a validity byte where the column has nulls, nested columns through their
/// children. It does not depend on DataFusion's or the standard library's hashers, whose
/// output may change between versions.
pub fn fingerprint(batch: &RecordBatch) -> Option<u64> {
    let mut h = Xxh3::new();
    h.update(&(batch.num_rows() as u64).to_le_bytes());
    h.update(&(batch.num_columns() as u64).to_le_bytes());
    for c in batch.columns() {
        feed(&mut h, c.as_ref())?;
    }
    Some(h.digest())
}

fn valid_byte(h: &mut Xxh3, a: &dyn Array, i: usize) -> bool {
    let v = a.is_valid(i);
    h.update(&[u8::from(v)]);
    v
}

/// Feeds one array; `None` when its type is not covered.
fn feed(h: &mut Xxh3, a: &dyn Array) -> Option<()> {
    let n = a.len();
    h.update(&(n as u64).to_le_bytes());
    let nulls = a.null_count() > 0;
    match a.data_type() {
        DataType::Null => {}
        DataType::Boolean => {
            let b = a.as_boolean();
            for i in 0..n {
                if nulls && !valid_byte(h, a, i) {
                    continue;
                }
                h.update(&[u8::from(b.value(i))]);
            }
        }
        DataType::Utf8 => bytes_values(h, a, nulls, |i| a.as_string::<i32>().value(i).as_bytes()),
        DataType::LargeUtf8 => bytes_values(h, a, nulls, |i| a.as_string::<i64>().value(i).as_bytes()),
        DataType::Utf8View => bytes_values(h, a, nulls, |i| a.as_string_view().value(i).as_bytes()),
        DataType::Binary => bytes_values(h, a, nulls, |i| a.as_binary::<i32>().value(i)),
        DataType::LargeBinary => bytes_values(h, a, nulls, |i| a.as_binary::<i64>().value(i)),
        DataType::BinaryView => bytes_values(h, a, nulls, |i| a.as_binary_view().value(i)),
        DataType::FixedSizeBinary(_) => bytes_values(h, a, nulls, |i| a.as_fixed_size_binary().value(i)),
        DataType::List(_) => {
            let l = a.as_list::<i32>();
            let o = l.value_offsets();
            lengths(h, a, nulls, |i| (o[i + 1] - o[i]) as u64);
            let (start, end) = (o[0] as usize, o[n] as usize);
            feed(h, l.values().slice(start, end - start).as_ref())?;
        }
        DataType::LargeList(_) => {
            let l = a.as_list::<i64>();
            let o = l.value_offsets();
            lengths(h, a, nulls, |i| (o[i + 1] - o[i]) as u64);
            let (start, end) = (o[0] as usize, o[n] as usize);
            feed(h, l.values().slice(start, end - start).as_ref())?;
        }
        DataType::FixedSizeList(_, size) => {
            let l = a.as_fixed_size_list();
            lengths(h, a, nulls, |_| *size as u64);
            let size = *size as usize;
            let start = l.offset() * size;
            feed(h, l.values().slice(start, n * size).as_ref())?;
        }
        DataType::Map(..) => {
            let m = a.as_map();
            let o = m.value_offsets();
            lengths(h, a, nulls, |i| (o[i + 1] - o[i]) as u64);
            let (start, end) = (o[0] as usize, o[n] as usize);
            let entries = m.entries().slice(start, end - start);
            feed(h, &entries)?;
        }
        DataType::Struct(_) => {
            let s = a.as_struct();
            lengths(h, a, nulls, |_| 0);
            for c in s.columns() {
                feed(h, c.as_ref())?;
            }
        }
        DataType::Dictionary(_, value) => {
            let plain = arrow::compute::cast(a, value).ok()?;
            feed(h, plain.as_ref())?;
        }
        t => {
            let width = t.primitive_width()?;
            let data = a.to_data();
            let buf = data.buffers().first()?;
            let start = data.offset() * width;
            let values = buf.as_slice().get(start..start + n * width)?;
            if nulls {
                for i in 0..n {
                    if valid_byte(h, a, i) {
                        h.update(&values[i * width..(i + 1) * width]);
                    }
                }
            } else {
                h.update(values);
            }
        }
    }
    Some(())
}

fn bytes_values<'a>(h: &mut Xxh3, a: &dyn Array, nulls: bool, value: impl Fn(usize) -> &'a [u8]) {
    for i in 0..a.len() {
        if nulls && !valid_byte(h, a, i) {
            continue;
        }
        let v = value(i);
        h.update(&(v.len() as u64).to_le_bytes());
        h.update(v);
    }
}

fn lengths(h: &mut Xxh3, a: &dyn Array, nulls: bool, len: impl Fn(usize) -> u64) {
    for i in 0..a.len() {
        if nulls && !valid_byte(h, a, i) {
            continue;
        }
        h.update(&len(i).to_le_bytes());
    }
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

    /// The journal's file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn append(&self, record: &Record) -> Result<()> {
        let mut guard = self
            .file
            .lock()
            .map_err(|_| Error::Config("journal lock poisoned".into()))?;
        let io = |e| Error::io(format!("writing {}", self.path.display()), e);
        if guard.is_none() {
            if let Some(dir) = self.path.parent() {
                crate::sink::state::private_dir(dir)?;
            }
            let f = crate::sink::state::private_file_options()
                .append(true)
                .open(&self.path)
                .map_err(|e| Error::io(format!("opening {}", self.path.display()), e))?;
            let len = f.metadata().map_err(io)?.len();
            // A killed attempt may have left its last record torn: the next one starts on a
            // line of its own, so that only the torn record is lost to a replay. A journal
            // whose header itself was torn gets one now.
            let (torn, headed) = if len == 0 {
                (false, false)
            } else {
                use std::io::{Read, Seek, SeekFrom};
                let mut r = std::fs::File::open(&self.path).map_err(io)?;
                r.seek(SeekFrom::Start(len - 1)).map_err(io)?;
                let mut last = [0u8; 1];
                r.read_exact(&mut last).map_err(io)?;
                r.seek(SeekFrom::Start(0)).map_err(io)?;
                let mut first = String::new();
                std::io::BufReader::new(r).read_line(&mut first).map_err(io)?;
                let headed = matches!(serde_json::from_str::<Record>(&first), Ok(Record::Header { .. }));
                (last[0] != b'\n', headed)
            };
            let mut w = std::io::BufWriter::new(f);
            if torn {
                w.write_all(b"\n").map_err(io)?;
            }
            if !headed {
                let header = Record::Header {
                    format: JOURNAL_FORMAT,
                    fingerprint: FINGERPRINT.into(),
                };
                let line = serde_json::to_string(&header)
                    .map_err(|e| Error::Config(format!("journal record: {e}")))?;
                w.write_all(line.as_bytes()).map_err(io)?;
                w.write_all(b"\n").map_err(io)?;
            }
            *guard = Some(w);
        }
        if let Some(w) = guard.as_mut() {
            let line =
                serde_json::to_string(record).map_err(|e| Error::Config(format!("journal record: {e}")))?;
            w.write_all(line.as_bytes()).map_err(io)?;
            w.write_all(b"\n").map_err(io)?;
            w.flush().map_err(io)?;
        }
        Ok(())
    }

    /// A request is about to be sent with `token`.
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

    /// A side effect is done.
    pub fn effect(&self, key: &str) -> Result<()> {
        self.append(&Record::Effect { key: key.into() })
    }

    /// A staged request's part was given up: its rows count as not sent.
    pub fn dropped(&self, token: &str) -> Result<()> {
        self.append(&Record::Dropped { token: token.into() })
    }
}

/// What an earlier attempt accounted for, for one sink.
#[derive(Debug, Clone, Default)]
pub struct SinkReplay {
    accounted: HashMap<(u64, u32), Vec<(u32, u32)>>,
    /// Input batches whose rule-breaking rows an earlier attempt dead-lettered.
    rejected: HashSet<(u64, u32)>,
    /// Requests sent without a recorded ending, in the order they were sent: (token, slices).
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
    effects: HashSet<String>,
}

impl Replay {
    /// Reads a journal; a torn line (the process died while writing it) is ignored. A journal
    /// of another format is an error that says so.
    pub fn load(path: &Path) -> Result<Self> {
        let file = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
        };
        let mut sent: HashMap<String, (String, Vec<Slice>)> = HashMap::new();
        let mut order: Vec<String> = Vec::new();
        let mut ended: Vec<String> = Vec::new();
        let mut rejected: Vec<(String, u64, u32)> = Vec::new();
        let mut replay = Replay::default();
        let mut headed = false;
        for line in std::io::BufReader::new(file).lines() {
            let line = line.map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
            let record = serde_json::from_str::<Record>(&line);
            if !headed {
                // The first whole record must be the header (one torn by a kill is skipped,
                // and the next attempt wrote it again).
                match &record {
                    Ok(Record::Header { format, fingerprint })
                        if *format == JOURNAL_FORMAT && fingerprint == FINGERPRINT =>
                    {
                        headed = true;
                    }
                    Ok(Record::Header { format, fingerprint }) => {
                        return Err(unreadable(
                            path,
                            &format!("format {format}, fingerprints {fingerprint}"),
                        ));
                    }
                    Err(_) => {}
                    Ok(_) => return Err(unreadable(path, "format 1, without a header")),
                }
                continue;
            }
            match record {
                Ok(Record::Send { sink, token, slices }) => {
                    if sent.insert(token.clone(), (sink, slices)).is_none() {
                        order.push(token);
                    }
                }
                Ok(Record::Done { token } | Record::Staged { token }) => ended.push(token),
                Ok(Record::Rejected { sink, hash, occ }) => {
                    rejected.push((sink, hash, occ));
                }
                Ok(Record::Effect { key }) => {
                    replay.effects.insert(key);
                }
                // Undoes the ends recorded before it; a later `done` or `staged` ends it again.
                Ok(Record::Dropped { token }) => ended.retain(|t| *t != token),
                Ok(Record::Header { .. }) => {}
                // A record torn by a kill: the step it records did not complete.
                Err(_) => {}
            }
        }
        for (sink, hash, occ) in rejected {
            replay.sinks.entry(sink).or_default().rejected.insert((hash, occ));
        }
        for token in ended {
            if let Some((sink, slices)) = sent.remove(&token) {
                replay.sinks.entry(sink).or_default().account(&slices);
            }
        }
        for token in order {
            if let Some((sink, slices)) = sent.remove(&token) {
                replay
                    .sinks
                    .entry(sink)
                    .or_default()
                    .in_flight
                    .push((token, slices));
            }
        }
        Ok(replay)
    }

    /// Whether the journal recorded any delivery.
    pub fn is_empty(&self) -> bool {
        self.sinks.is_empty()
    }

    /// What one sink (`table@l<line>`) had accounted for.
    pub fn sink(&self, key: &str) -> Option<SinkReplay> {
        self.sinks.get(key).cloned()
    }

    /// The side effects the run recorded.
    pub fn effects(&self) -> &HashSet<String> {
        &self.effects
    }
}

fn unreadable(path: &Path, what: &str) -> Error {
    Error::Config(format!(
        "{} was written by another version of flumen ({what}; this one reads format {JOURNAL_FORMAT}, \
         fingerprints {FINGERPRINT}), so it cannot be replayed safely: finish the run with the flumen \
         that started it, or start the job again as a new run",
        path.display()
    ))
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
        // A slice hashes like the same rows built on their own.
        let whole = spec.batch(0, 100).unwrap();
        assert_eq!(fingerprint(&whole.slice(50, 50)), fingerprint(&c));
    }

    /// The hash is flumen's own encoding fed to XXH3-64: the bytes below, written out by hand
    /// from the documented encoding, are what every build that writes FINGERPRINT must hash.
    #[test]
    fn fingerprints_follow_the_documented_encoding() {
        use arrow::array::{Int64Array, ListArray, StringArray};
        use arrow::datatypes::Int32Type;
        let ids = Int64Array::from(vec![Some(1), None, Some(3)]);
        let names = StringArray::from(vec![Some("a"), Some("bé"), None]);
        let lists = ListArray::from_iter_primitive::<Int32Type, _, _>(vec![
            Some(vec![Some(1), Some(2)]),
            None,
            Some(vec![]),
        ]);
        let batch = RecordBatch::try_from_iter([
            ("id", Arc::new(ids) as arrow::array::ArrayRef),
            ("name", Arc::new(names) as _),
            ("l", Arc::new(lists) as _),
        ])
        .unwrap();
        let mut b: Vec<u8> = Vec::new();
        let u = |b: &mut Vec<u8>, v: u64| b.extend_from_slice(&v.to_le_bytes());
        u(&mut b, 3); // rows
        u(&mut b, 3); // columns
        u(&mut b, 3); // id: length, then validity byte + value
        b.push(1);
        b.extend_from_slice(&1i64.to_le_bytes());
        b.push(0);
        b.push(1);
        b.extend_from_slice(&3i64.to_le_bytes());
        u(&mut b, 3); // name: validity byte + length + bytes
        b.push(1);
        u(&mut b, 1);
        b.extend_from_slice(b"a");
        b.push(1);
        u(&mut b, 3);
        b.extend_from_slice("bé".as_bytes());
        b.push(0);
        u(&mut b, 3); // l: validity byte + list length, then the child values
        b.push(1);
        u(&mut b, 2);
        b.push(0);
        b.push(1);
        u(&mut b, 0);
        u(&mut b, 2);
        b.extend_from_slice(&1i32.to_le_bytes());
        b.extend_from_slice(&2i32.to_le_bytes());
        assert_eq!(fingerprint(&batch), Some(xxhash_rust::xxh3::xxh3_64(&b)));
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
        j.effect("t/replace").unwrap();
        // A torn last line, as a killed process leaves it.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"t\":\"do")
            .unwrap();
        // The next attempt appends after the torn line, on a line of its own.
        let j2 = Journal::new(path.clone());
        j2.send(
            "t@l3",
            "d",
            &[Slice {
                hash: 7,
                occ: 0,
                start: 25,
                len: 5,
            }],
        )
        .unwrap();
        j2.done("d").unwrap();
        let r = Replay::load(&path).unwrap();
        assert!(r.effects().contains("t/replace"));
        let sink = r.sink("t@l3").unwrap();
        assert_eq!(sink.remaining(7, 0, 30), vec![(15, 10)]);
        assert_eq!(sink.remaining(7, 1, 30), vec![(0, 30)]);
        assert_eq!(sink.in_flight, vec![("c".to_string(), vec![s(20, 5)])]);
        assert!(sink.rejections_written(9, 1) && !sink.rejections_written(9, 0));
        let mut sink = sink;
        let flight = sink.in_flight[0].1.clone();
        sink.account(&flight);
        assert_eq!(sink.remaining(7, 0, 30), vec![(15, 5)]);
    }

    #[test]
    fn a_torn_header_and_dropped_parts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.jsonl");
        // Killed while writing the header.
        std::fs::write(&path, "{\"t\":\"hea").unwrap();
        let j = Journal::new(path.clone());
        let s = Slice {
            hash: 1,
            occ: 0,
            start: 0,
            len: 4,
        };
        j.send("t@l1", "a", &[s]).unwrap();
        j.staged("a").unwrap();
        let r = Replay::load(&path).unwrap();
        assert_eq!(
            r.sink("t@l1").unwrap().remaining(1, 0, 4),
            vec![],
            "staged rows are accounted"
        );
        // The part was given up: its rows count as in flight again.
        j.dropped("a").unwrap();
        let sink = Replay::load(&path).unwrap().sink("t@l1").unwrap();
        assert_eq!(sink.remaining(1, 0, 4), vec![(0, 4)]);
        assert_eq!(sink.in_flight.len(), 1);
        // Resent by a replay and delivered: ended again, whatever was dropped before.
        j.send("t@l1", "a", &[s]).unwrap();
        j.done("a").unwrap();
        let sink = Replay::load(&path).unwrap().sink("t@l1").unwrap();
        assert_eq!(sink.remaining(1, 0, 4), vec![], "delivered after it was dropped");
        assert!(sink.in_flight.is_empty());
    }

    #[test]
    fn a_journal_of_another_format_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.jsonl");
        std::fs::write(
            &path,
            "{\"t\":\"send\",\"sink\":\"t@l1\",\"token\":\"a\",\"slices\":[]}\n",
        )
        .unwrap();
        let e = Replay::load(&path).unwrap_err().to_string();
        assert!(
            e.contains("another version of flumen") && e.contains("format 1"),
            "{e}"
        );
        std::fs::write(&path, "{\"t\":\"header\",\"format\":9,\"fingerprint\":\"x\"}\n").unwrap();
        let e = Replay::load(&path).unwrap_err().to_string();
        assert!(e.contains("format 9"), "{e}");
    }
}
