//! The local spool that lets an MQTT read acknowledge the broker before the write commits.
//!
//! A broker lets a subscriber hold only a few unacknowledged QoS 1 messages (Mosquitto: 20 by
//! default), so flumen cannot keep them unacknowledged until the statement's outcome as it does
//! for the other brokers. Instead each message is appended to a segment file here and the file
//! is synced *before* the PUBACK goes out. The spool's cursor, replaced atomically, says how far
//! committed statements have consumed it; everything after the cursor is delivered again by the
//! next read, before any new message. So a failed or killed run loses nothing, and the broker's
//! queue never fills with messages flumen has not acknowledged.
//!
//! Layout of a spool directory (one per broker and client id):
//! - `lock`: held exclusively while a read uses the spool (two runs cannot share a client id);
//! - `cursor.json`: `{segment, offset, next_seq}`, the first position not yet committed;
//! - `seg-<n>.bin`: the magic `FLMQSPL1`, then records `[u32 len][u32 crc32][body]` with
//!   body `[u64 seq][i64 received_ms][u8 flags][u16 topic_len][topic][payload]`, little-endian.
//!
//! A record is written whole and synced before its message is acknowledged, so a torn record can
//! only be the last of a segment, and only one the broker never saw acknowledged (it redelivers
//! it): it is skipped with a warning. A bad checksum anywhere else is corruption and an error.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

const MAGIC: &[u8; 8] = b"FLMQSPL1";
/// `retain` flag of a record.
const RETAIN: u8 = 1;

/// One spooled message.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// The spool's own sequence number: increasing per spool, never reused.
    pub seq: u64,
    /// When flumen received it, in milliseconds since the epoch.
    pub received_ms: i64,
    pub retain: bool,
    pub topic: String,
    pub payload: bytes::Bytes,
}

/// The first position no committed statement has consumed.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
struct Cursor {
    segment: u64,
    offset: u64,
    next_seq: u64,
}

/// A segment being read: its number, reader and the byte offset of the next record.
struct Reading {
    segment: u64,
    reader: BufReader<File>,
    offset: u64,
    len: u64,
}

/// An open spool, locked for one read.
pub struct Spool {
    dir: PathBuf,
    _lock: File,
    cursor: Cursor,
    /// Segments left to read (numbers at or after the cursor's), oldest first.
    to_read: VecDeque<u64>,
    reading: Option<Reading>,
    /// The segment this read appends to, created on the first append.
    writer: Option<(u64, File, u64)>,
    /// The number the next new segment gets.
    next_segment: u64,
    /// Position just after the last record handed out, and the sequence after it.
    read_to: Option<(u64, u64)>,
    next_seq: u64,
    /// Records handed out since the last commit.
    uncommitted: u64,
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> Error {
    move |e| Error::io(what, e)
}

fn segment_name(n: u64) -> String {
    format!("seg-{n:012}.bin")
}

impl Spool {
    /// Opens (creating) the spool in `dir` and locks it; fails at once if another run holds it.
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(io(format!("creating the MQTT spool {}", dir.display())))?;
        let lock_path = dir.join("lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io(format!("opening {}", lock_path.display())))?;
        lock.try_lock().map_err(|_| {
            Error::Config(format!(
                "the MQTT spool {} is in use by another flumen run: two runs cannot read with the same client id at once",
                dir.display()
            ))
        })?;
        let cursor_path = dir.join("cursor.json");
        let cursor: Cursor = if cursor_path.exists() {
            crate::sink::read_json(&cursor_path)?
        } else {
            Cursor::default()
        };
        let mut segments = Vec::new();
        for e in std::fs::read_dir(dir).map_err(io(format!("listing {}", dir.display())))? {
            let e = e.map_err(io(format!("listing {}", dir.display())))?;
            let Some(n) = segment_number(&e.file_name()) else {
                continue;
            };
            if n < cursor.segment {
                // Consumed by a committed statement; a crash came before it was removed.
                remove(&e.path())?;
            } else {
                segments.push(n);
            }
        }
        segments.sort_unstable();
        let next_segment = segments.last().map_or(cursor.segment, |l| l + 1).max(cursor.segment);
        Ok(Self {
            dir: dir.to_path_buf(),
            _lock: lock,
            cursor,
            to_read: segments.into(),
            reading: None,
            writer: None,
            next_segment,
            read_to: None,
            next_seq: cursor.next_seq,
            uncommitted: 0,
        })
    }

    /// Up to `max` records that earlier reads spooled and no statement committed; empty once
    /// there are none left.
    pub fn read_old(&mut self, max: usize) -> Result<Vec<Record>> {
        let mut out = Vec::new();
        while out.len() < max {
            if self.reading.is_none() {
                let Some(segment) = self.to_read.pop_front() else {
                    break;
                };
                self.reading = Some(self.open_segment(segment)?);
            }
            let Some(r) = self.reading.as_mut() else { break };
            match read_record(r, &self.dir)? {
                Some(rec) => {
                    self.next_seq = self.next_seq.max(rec.seq + 1);
                    self.read_to = Some((r.segment, r.offset));
                    self.uncommitted += 1;
                    out.push(rec);
                }
                None => self.reading = None,
            }
        }
        Ok(out)
    }

    fn open_segment(&self, segment: u64) -> Result<Reading> {
        let path = self.dir.join(segment_name(segment));
        let file = File::open(&path).map_err(io(format!("opening {}", path.display())))?;
        let len = file
            .metadata()
            .map_err(io(format!("reading {}", path.display())))?
            .len();
        let mut reader = BufReader::with_capacity(1 << 20, file);
        let mut magic = [0u8; 8];
        let offset = if len < MAGIC.len() as u64 {
            // Created, then killed before the header was synced: nothing in it was acknowledged.
            len
        } else {
            reader
                .read_exact(&mut magic)
                .map_err(io(format!("reading {}", path.display())))?;
            if &magic != MAGIC {
                return Err(Error::Config(format!(
                    "{} is not a flumen MQTT spool segment",
                    path.display()
                )));
            }
            MAGIC.len() as u64
        };
        let mut r = Reading {
            segment,
            reader,
            offset,
            len,
        };
        if segment == self.cursor.segment && self.cursor.offset > r.offset {
            // Skip what committed statements consumed.
            let skip = self.cursor.offset - r.offset;
            std::io::copy(&mut (&mut r.reader).take(skip), &mut std::io::sink())
                .map_err(io(format!("reading {}", path.display())))?;
            r.offset = self.cursor.offset;
        }
        Ok(r)
    }

    /// Appends messages `(topic, payload, retain)` and syncs them to disk: only then may the
    /// broker be told they were received. Returns them as records.
    pub fn append(&mut self, messages: Vec<(String, bytes::Bytes, bool)>) -> Result<Vec<Record>> {
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        if self.writer.is_none() {
            let n = self.next_segment;
            self.next_segment += 1;
            let path = self.dir.join(segment_name(n));
            let mut f = OpenOptions::new()
                .create_new(true)
                .append(true)
                .open(&path)
                .map_err(io(format!("creating {}", path.display())))?;
            f.write_all(MAGIC).map_err(io(format!("writing {}", path.display())))?;
            self.writer = Some((n, f, MAGIC.len() as u64));
        }
        let now = chrono::Utc::now().timestamp_millis();
        let mut buf = Vec::with_capacity(messages.iter().map(|(t, p, _)| t.len() + p.len() + 31).sum());
        let mut out = Vec::with_capacity(messages.len());
        for (topic, payload, retain) in messages {
            let topic_len = u16::try_from(topic.len())
                .map_err(|_| Error::Config(format!("an MQTT topic of {} bytes is too long", topic.len())))?;
            let seq = self.next_seq;
            self.next_seq += 1;
            let mut body = Vec::with_capacity(19 + topic.len() + payload.len());
            body.extend_from_slice(&seq.to_le_bytes());
            body.extend_from_slice(&now.to_le_bytes());
            body.push(if retain { RETAIN } else { 0 });
            body.extend_from_slice(&topic_len.to_le_bytes());
            body.extend_from_slice(topic.as_bytes());
            body.extend_from_slice(&payload);
            let len = u32::try_from(body.len())
                .map_err(|_| Error::Config(format!("an MQTT message of {} bytes is too large", body.len())))?;
            buf.extend_from_slice(&len.to_le_bytes());
            buf.extend_from_slice(&crc(&body).to_le_bytes());
            buf.extend_from_slice(&body);
            out.push(Record {
                seq,
                received_ms: now,
                retain,
                topic,
                payload,
            });
        }
        let Some((n, f, end)) = self.writer.as_mut() else {
            return Err(Error::Config("MQTT spool: no segment open".into()));
        };
        let path = self.dir.join(segment_name(*n));
        f.write_all(&buf).map_err(io(format!("writing {}", path.display())))?;
        f.sync_data().map_err(io(format!("syncing {}", path.display())))?;
        *end += buf.len() as u64;
        self.read_to = Some((*n, *end));
        self.uncommitted += out.len() as u64;
        Ok(out)
    }

    /// Records handed out since the last commit.
    pub fn uncommitted(&self) -> u64 {
        self.uncommitted
    }

    /// Everything handed out is consumed: move the cursor past it (the commit point) and remove
    /// the segments no one needs any more.
    pub fn commit(&mut self) -> Result<()> {
        let Some((segment, offset)) = self.read_to else {
            return Ok(());
        };
        let len = std::fs::metadata(self.dir.join(segment_name(segment)))
            .map(|m| m.len())
            .unwrap_or(0);
        // Nothing after the read position: the next read starts a new segment.
        let all = segment + 1 == self.next_segment && offset >= len;
        let cursor = Cursor {
            segment: if all { segment + 1 } else { segment },
            offset: if all { 0 } else { offset },
            next_seq: self.next_seq,
        };
        write_cursor(&self.dir, &cursor)?;
        self.cursor = cursor;
        for e in std::fs::read_dir(&self.dir).map_err(io(format!("listing {}", self.dir.display())))? {
            let e = e.map_err(io(format!("listing {}", self.dir.display())))?;
            if segment_number(&e.file_name()).is_some_and(|n| n < cursor.segment) {
                remove(&e.path())?;
            }
        }
        if self.writer.as_ref().is_some_and(|(w, _, _)| *w < cursor.segment) {
            self.writer = None;
        }
        if self.reading.as_ref().is_some_and(|r| r.segment < cursor.segment) {
            self.reading = None;
        }
        self.read_to = None;
        self.uncommitted = 0;
        Ok(())
    }
}

/// `n` of a `seg-<n>.bin` file name.
fn segment_number(name: &std::ffi::OsStr) -> Option<u64> {
    name.to_str()?.strip_prefix("seg-")?.strip_suffix(".bin")?.parse().ok()
}

fn remove(path: &Path) -> Result<()> {
    std::fs::remove_file(path).map_err(io(format!("removing {}", path.display())))
}

/// Replaces the cursor file atomically (synced, renamed, directory synced).
fn write_cursor(dir: &Path, cursor: &Cursor) -> Result<()> {
    let path = dir.join("cursor.json");
    let tmp = dir.join("cursor.json.tmp");
    let text = serde_json::to_vec(cursor).map_err(|e| Error::Config(format!("encoding the spool cursor: {e}")))?;
    let mut f = File::create(&tmp).map_err(io(format!("creating {}", tmp.display())))?;
    f.write_all(&text).map_err(io(format!("writing {}", tmp.display())))?;
    f.sync_all().map_err(io(format!("syncing {}", tmp.display())))?;
    std::fs::rename(&tmp, &path).map_err(io(format!("replacing {}", path.display())))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(format!("syncing {}", dir.display())))
}

fn crc(body: &[u8]) -> u32 {
    let mut c = flate2::Crc::new();
    c.update(body);
    c.sum()
}

/// The next record of `r`, or `None` at the end (a torn last record is skipped with a warning).
fn read_record(r: &mut Reading, dir: &Path) -> Result<Option<Record>> {
    let path = || dir.join(segment_name(r.segment)).display().to_string();
    if r.offset >= r.len {
        return Ok(None);
    }
    let torn = |r: &Reading| {
        tracing::warn!(
            "MQTT spool {}: the last record (at byte {}) is incomplete, written by a run that stopped before acknowledging it; the broker delivers it again",
            path(),
            r.offset
        );
        Ok(None)
    };
    if r.len - r.offset < 8 {
        return torn(r);
    }
    let mut head = [0u8; 8];
    r.reader.read_exact(&mut head).map_err(io(format!("reading {}", path())))?;
    let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as u64;
    let want = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    let end = r.offset + 8 + len;
    if end > r.len {
        return torn(r);
    }
    let mut body = vec![0u8; len as usize];
    r.reader.read_exact(&mut body).map_err(io(format!("reading {}", path())))?;
    if crc(&body) != want || len < 19 {
        if end == r.len {
            return torn(r);
        }
        return Err(Error::Config(format!(
            "MQTT spool {}: the record at byte {} is corrupt (checksum mismatch); move the file aside to go on without it",
            path(),
            r.offset
        )));
    }
    let seq = u64::from_le_bytes(body[0..8].try_into().unwrap_or_default());
    let received_ms = i64::from_le_bytes(body[8..16].try_into().unwrap_or_default());
    let flags = body[16];
    let topic_len = u16::from_le_bytes([body[17], body[18]]) as usize;
    if 19 + topic_len > body.len() {
        return Err(Error::Config(format!(
            "MQTT spool {}: the record at byte {} has a topic longer than itself",
            path(),
            r.offset
        )));
    }
    let topic = String::from_utf8_lossy(&body[19..19 + topic_len]).into_owned();
    let payload = bytes::Bytes::from(body).slice(19 + topic_len..);
    r.offset = end;
    Ok(Some(Record {
        seq,
        received_ms,
        retain: flags & RETAIN != 0,
        topic,
        payload,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msgs(from: u64, n: u64) -> Vec<(String, bytes::Bytes, bool)> {
        (from..from + n)
            .map(|i| (format!("t/{i}"), bytes::Bytes::from(format!("payload {i}")), i == 0))
            .collect()
    }

    fn payloads(r: &[Record]) -> Vec<String> {
        r.iter().map(|r| String::from_utf8_lossy(&r.payload).into_owned()).collect()
    }

    #[test]
    fn uncommitted_records_are_read_again_and_committed_ones_are_gone() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = Spool::open(dir.path()).unwrap();
            assert!(s.read_old(10).unwrap().is_empty());
            let got = s.append(msgs(0, 3)).unwrap();
            assert_eq!(got.iter().map(|r| r.seq).collect::<Vec<_>>(), [0, 1, 2]);
            assert!(got[0].retain && !got[1].retain);
            // Not committed: a failed statement.
        }
        {
            let mut s = Spool::open(dir.path()).unwrap();
            let old = s.read_old(10).unwrap();
            assert_eq!(payloads(&old), ["payload 0", "payload 1", "payload 2"]);
            assert_eq!(old[2].topic, "t/2");
            let new = s.append(msgs(3, 2)).unwrap();
            assert_eq!(new.iter().map(|r| r.seq).collect::<Vec<_>>(), [3, 4]);
            assert_eq!(s.uncommitted(), 5);
            s.commit().unwrap();
        }
        let mut s = Spool::open(dir.path()).unwrap();
        assert!(s.read_old(10).unwrap().is_empty());
        let segs = std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with("seg-"))
            .count();
        assert_eq!(segs, 0, "committed segments are removed");
        assert_eq!(s.append(msgs(5, 1)).unwrap()[0].seq, 5, "sequence numbers go on");
    }

    #[test]
    fn a_partial_read_commits_only_what_it_handed_out() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = Spool::open(dir.path()).unwrap();
            s.append(msgs(0, 10)).unwrap();
        }
        {
            let mut s = Spool::open(dir.path()).unwrap();
            assert_eq!(payloads(&s.read_old(4).unwrap()).len(), 4);
            s.commit().unwrap();
        }
        {
            let mut s = Spool::open(dir.path()).unwrap();
            let rest = s.read_old(100).unwrap();
            assert_eq!(rest.first().map(|r| r.seq), Some(4));
            assert_eq!(rest.len(), 6);
            s.commit().unwrap();
        }
        assert!(Spool::open(dir.path()).unwrap().read_old(100).unwrap().is_empty());
    }

    #[test]
    fn a_torn_last_record_is_skipped_and_corruption_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = Spool::open(dir.path()).unwrap();
            s.append(msgs(0, 3)).unwrap();
        }
        let seg = dir.path().join(segment_name(0));
        let bytes = std::fs::read(&seg).unwrap();
        // Killed in the middle of writing the third record.
        std::fs::write(&seg, &bytes[..bytes.len() - 5]).unwrap();
        {
            let mut s = Spool::open(dir.path()).unwrap();
            assert_eq!(s.read_old(10).unwrap().len(), 2);
        }
        // A flipped byte in the first record, with more records after it.
        let mut bad = bytes.clone();
        bad[MAGIC.len() + 8 + 20] ^= 0xff;
        std::fs::write(&seg, &bad).unwrap();
        let mut s = Spool::open(dir.path()).unwrap();
        let e = s.read_old(10).unwrap_err().to_string();
        assert!(e.contains("corrupt") && e.contains("seg-000000000000.bin"), "{e}");
    }

    #[test]
    fn two_reads_cannot_share_a_spool() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Spool::open(dir.path()).unwrap();
        let e = Spool::open(dir.path()).err().unwrap().to_string();
        assert!(e.contains("in use by another flumen run"), "{e}");
    }
}
