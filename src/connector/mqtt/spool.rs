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
    /// Segments earlier reads left (numbers at or after the cursor's), oldest first.
    to_read: VecDeque<u64>,
    reading: Option<Reading>,
    /// The segment this read's connection appends to ([`Spool::start_live`]).
    live: Option<u64>,
    /// The number the next new segment gets.
    next_segment: u64,
    /// Position just after the last record handed out.
    read_to: Option<(u64, u64)>,
    /// The sequence number after the last record handed out.
    next_seq: u64,
    /// The sequence number the live segment's first record gets: after every spooled one.
    writer_seq: u64,
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
        crate::sink::private_dir(dir)?;
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
        for (n, len) in segments_in(dir)? {
            if n < cursor.segment || len <= MAGIC.len() as u64 {
                // Consumed by a committed statement (a crash came before it was removed), or
                // holding no record: a read that spooled nothing.
                remove(&dir.join(segment_name(n)))?;
            } else {
                segments.push(n);
            }
        }
        let next_segment = segments
            .last()
            .map_or(cursor.segment, |l| l + 1)
            .max(cursor.segment);
        let mut spool = Self {
            dir: dir.to_path_buf(),
            _lock: lock,
            cursor,
            to_read: segments.into(),
            reading: None,
            live: None,
            next_segment,
            read_to: None,
            next_seq: cursor.next_seq,
            writer_seq: cursor.next_seq,
            uncommitted: 0,
        };
        // Sequence numbers go on after the newest spooled record.
        if let Some(&newest) = spool.to_read.back() {
            let mut r = spool.open_segment(newest, None)?;
            while let Some(rec) = read_record(&mut r, dir)? {
                spool.writer_seq = spool.writer_seq.max(rec.seq + 1);
            }
        }
        Ok(spool)
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
                self.reading = Some(self.open_segment(segment, None)?);
            }
            match self.next_record()? {
                Some(rec) => out.push(rec),
                None => self.reading = None,
            }
        }
        Ok(out)
    }

    /// Up to `max` records of the live segment, as far as `synced` (the end its writer last
    /// synced).
    pub fn read_live(&mut self, max: usize, synced: u64) -> Result<Vec<Record>> {
        let Some(live) = self.live else {
            return Ok(Vec::new());
        };
        if synced <= MAGIC.len() as u64 {
            // Nothing synced past the header yet.
            return Ok(Vec::new());
        }
        if self.reading.as_ref().is_none_or(|r| r.segment != live) {
            self.reading = Some(self.open_segment(live, Some(synced))?);
        }
        if let Some(r) = self.reading.as_mut() {
            r.len = r.len.max(synced);
        }
        let mut out = Vec::new();
        while out.len() < max {
            match self.next_record()? {
                Some(rec) => out.push(rec),
                None => break,
            }
        }
        Ok(out)
    }

    /// The next record of the segment being read, counted as handed out.
    fn next_record(&mut self) -> Result<Option<Record>> {
        let Some(r) = self.reading.as_mut() else {
            return Ok(None);
        };
        let rec = read_record(r, &self.dir)?;
        if let Some(rec) = &rec {
            self.next_seq = self.next_seq.max(rec.seq + 1);
            self.read_to = Some((r.segment, r.offset));
            self.uncommitted += 1;
        }
        Ok(rec)
    }

    /// Opens `segment` for reading up to `len` bytes (default: its size now).
    fn open_segment(&self, segment: u64, len: Option<u64>) -> Result<Reading> {
        let path = self.dir.join(segment_name(segment));
        let file = File::open(&path).map_err(io(format!("opening {}", path.display())))?;
        let len = match len {
            Some(l) => l,
            None => file
                .metadata()
                .map_err(io(format!("reading {}", path.display())))?
                .len(),
        };
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

    /// Creates the segment this read's connection appends to, and its writer (which may live
    /// on another thread; [`Spool::read_live`] reads what it synced).
    pub fn start_live(&mut self) -> Result<SpoolWriter> {
        let n = self.next_segment;
        self.next_segment += 1;
        let path = self.dir.join(segment_name(n));
        let mut file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)
            .map_err(io(format!("creating {}", path.display())))?;
        file.write_all(MAGIC)
            .map_err(io(format!("writing {}", path.display())))?;
        file.sync_data()
            .map_err(io(format!("syncing {}", path.display())))?;
        self.live = Some(n);
        Ok(SpoolWriter {
            path,
            file,
            end: MAGIC.len() as u64,
            next_seq: self.writer_seq,
        })
    }

    /// Removes the live segment if its connection (stopped by now) spooled nothing into it.
    pub fn discard_empty_live(&mut self) -> Result<()> {
        let Some(live) = self.live else {
            return Ok(());
        };
        let path = self.dir.join(segment_name(live));
        if std::fs::metadata(&path).is_ok_and(|m| m.len() <= MAGIC.len() as u64) {
            remove(&path)?;
            self.live = None;
        }
        Ok(())
    }

    /// Records handed out since the last commit.
    pub fn uncommitted(&self) -> u64 {
        self.uncommitted
    }

    /// Everything handed out is consumed: move the cursor past it (the commit point) and remove
    /// the segments no one needs any more.
    pub fn commit(&mut self) -> Result<()> {
        self.discard_empty_live()?;
        let Some((segment, offset)) = self.read_to else {
            return Ok(());
        };
        let on_disk = segments_in(&self.dir)?;
        let len = on_disk.iter().find(|(n, _)| *n == segment).map_or(0, |(_, l)| *l);
        // Nothing after the read position: the next read starts a new segment.
        let all = offset >= len && on_disk.iter().all(|(n, _)| *n <= segment);
        let cursor = Cursor {
            segment: if all { segment + 1 } else { segment },
            offset: if all { 0 } else { offset },
            next_seq: self.next_seq,
        };
        write_cursor(&self.dir, &cursor)?;
        self.cursor = cursor;
        for (n, _) in on_disk {
            if n < cursor.segment {
                remove(&self.dir.join(segment_name(n)))?;
            }
        }
        if self.live.is_some_and(|l| l < cursor.segment) {
            self.live = None;
        }
        if self.reading.as_ref().is_some_and(|r| r.segment < cursor.segment) {
            self.reading = None;
        }
        self.read_to = None;
        self.uncommitted = 0;
        Ok(())
    }
}

/// The segments in `dir` with their sizes, oldest first.
fn segments_in(dir: &Path) -> Result<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).map_err(io(format!("listing {}", dir.display())))? {
        let e = e.map_err(io(format!("listing {}", dir.display())))?;
        if let Some(n) = segment_number(&e.file_name()) {
            let len = e
                .metadata()
                .map_err(io(format!("reading {}", e.path().display())))?
                .len();
            out.push((n, len));
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// Appends to the live segment: each [`SpoolWriter::append`] is synced before it returns, and
/// only then may the broker be told the messages were received.
pub struct SpoolWriter {
    path: PathBuf,
    file: File,
    end: u64,
    next_seq: u64,
}

impl SpoolWriter {
    /// Appends messages `(topic, payload, retain)`, syncs them, and returns the segment's end.
    pub fn append(&mut self, messages: &[(String, bytes::Bytes, bool)]) -> Result<u64> {
        let now = chrono::Utc::now().timestamp_millis();
        let mut buf = Vec::with_capacity(messages.iter().map(|(t, p, _)| t.len() + p.len() + 27).sum());
        for (topic, payload, retain) in messages {
            let topic_len = u16::try_from(topic.len())
                .map_err(|_| Error::Config(format!("an MQTT topic of {} bytes is too long", topic.len())))?;
            let len = u32::try_from(19 + topic.len() + payload.len()).map_err(|_| {
                Error::Config(format!("an MQTT message of {} bytes is too large", payload.len()))
            })?;
            let at = buf.len();
            buf.extend_from_slice(&len.to_le_bytes());
            buf.extend_from_slice(&[0; 4]);
            buf.extend_from_slice(&self.next_seq.to_le_bytes());
            buf.extend_from_slice(&now.to_le_bytes());
            buf.push(if *retain { RETAIN } else { 0 });
            buf.extend_from_slice(&topic_len.to_le_bytes());
            buf.extend_from_slice(topic.as_bytes());
            buf.extend_from_slice(payload);
            let sum = crc(&buf[at + 8..]);
            buf[at + 4..at + 8].copy_from_slice(&sum.to_le_bytes());
            self.next_seq += 1;
        }
        self.file
            .write_all(&buf)
            .map_err(io(format!("writing {}", self.path.display())))?;
        self.file
            .sync_data()
            .map_err(io(format!("syncing {}", self.path.display())))?;
        self.end += buf.len() as u64;
        Ok(self.end)
    }
}

/// `n` of a `seg-<n>.bin` file name.
fn segment_number(name: &std::ffi::OsStr) -> Option<u64> {
    name.to_str()?
        .strip_prefix("seg-")?
        .strip_suffix(".bin")?
        .parse()
        .ok()
}

fn remove(path: &Path) -> Result<()> {
    std::fs::remove_file(path).map_err(io(format!("removing {}", path.display())))
}

/// Replaces the cursor file atomically (synced, renamed, directory synced).
fn write_cursor(dir: &Path, cursor: &Cursor) -> Result<()> {
    let path = dir.join("cursor.json");
    let tmp = dir.join("cursor.json.tmp");
    let text =
        serde_json::to_vec(cursor).map_err(|e| Error::Config(format!("encoding the spool cursor: {e}")))?;
    let mut f = File::create(&tmp).map_err(io(format!("creating {}", tmp.display())))?;
    f.write_all(&text)
        .map_err(io(format!("writing {}", tmp.display())))?;
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
    r.reader
        .read_exact(&mut head)
        .map_err(io(format!("reading {}", path())))?;
    let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as u64;
    let want = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    let end = r.offset + 8 + len;
    if end > r.len {
        return torn(r);
    }
    let mut body = vec![0u8; len as usize];
    r.reader
        .read_exact(&mut body)
        .map_err(io(format!("reading {}", path())))?;
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
            .map(|i| {
                (
                    format!("t/{i}"),
                    bytes::Bytes::from(format!("payload {i}")),
                    i == 0,
                )
            })
            .collect()
    }

    fn payloads(r: &[Record]) -> Vec<String> {
        r.iter()
            .map(|r| String::from_utf8_lossy(&r.payload).into_owned())
            .collect()
    }

    /// A read that spools `n` new messages and hands out `take` of them.
    fn read(dir: &Path, from: u64, n: u64, take: usize) -> (Spool, Vec<Record>) {
        let mut s = Spool::open(dir).unwrap();
        let mut got = Vec::new();
        loop {
            let old = s.read_old(take - got.len()).unwrap();
            if old.is_empty() {
                break;
            }
            got.extend(old);
        }
        let mut w = s.start_live().unwrap();
        let end = if n > 0 {
            w.append(&msgs(from, n)).unwrap()
        } else {
            MAGIC.len() as u64
        };
        let want = take - got.len();
        got.extend(s.read_live(want, end).unwrap());
        (s, got)
    }

    #[test]
    fn uncommitted_records_are_read_again_and_committed_ones_are_gone() {
        let dir = tempfile::tempdir().unwrap();
        let (_, got) = read(dir.path(), 0, 3, 10);
        assert_eq!(got.iter().map(|r| r.seq).collect::<Vec<_>>(), [0, 1, 2]);
        assert!(got[0].retain && !got[1].retain);
        assert_eq!(got[2].topic, "t/2");
        // Not committed (a failed statement): the next read gets them first, then new ones.
        let (mut s, got) = read(dir.path(), 3, 2, 10);
        assert_eq!(
            payloads(&got),
            ["payload 0", "payload 1", "payload 2", "payload 3", "payload 4"]
        );
        assert_eq!(got.iter().map(|r| r.seq).collect::<Vec<_>>(), [0, 1, 2, 3, 4]);
        assert_eq!(s.uncommitted(), 5);
        s.commit().unwrap();
        drop(s);
        let (_, got) = read(dir.path(), 5, 1, 10);
        assert_eq!(payloads(&got), ["payload 5"]);
        assert_eq!(got[0].seq, 5, "sequence numbers go on");
        let segs = std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| segment_number(&e.as_ref().unwrap().file_name()).is_some())
            .count();
        assert_eq!(
            segs, 1,
            "committed segments are removed: only the last read's is left"
        );
    }

    #[test]
    fn a_partial_read_commits_only_what_it_handed_out() {
        let dir = tempfile::tempdir().unwrap();
        // The connection spooled 10; the read handed out 4 and committed them.
        let (mut s, got) = read(dir.path(), 0, 10, 4);
        assert_eq!(got.len(), 4);
        s.commit().unwrap();
        drop(s);
        let (mut s, got) = read(dir.path(), 10, 0, 100);
        assert_eq!(got.first().map(|r| r.seq), Some(4));
        assert_eq!(got.len(), 6);
        s.commit().unwrap();
        drop(s);
        // New sequence numbers follow the spooled ones even when they were not all read.
        let (_, got) = read(dir.path(), 10, 1, 100);
        assert_eq!(got.iter().map(|r| r.seq).collect::<Vec<_>>(), [10]);
    }

    #[test]
    fn a_read_of_old_records_only_empties_the_spool_on_commit() {
        let dir = tempfile::tempdir().unwrap();
        drop(read(dir.path(), 0, 5, 5));
        // The rerun finds no new message: its live segment stays empty.
        let (mut s, got) = read(dir.path(), 5, 0, 100);
        assert_eq!(got.len(), 5);
        s.commit().unwrap();
        assert!(segments_in(dir.path()).unwrap().is_empty());
        drop(s);
        let (_, got) = read(dir.path(), 5, 2, 100);
        assert_eq!(got.iter().map(|r| r.seq).collect::<Vec<_>>(), [5, 6]);
    }

    #[test]
    fn the_live_segment_is_read_only_as_far_as_it_was_synced() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path()).unwrap();
        let mut w = s.start_live().unwrap();
        let first = w.append(&msgs(0, 2)).unwrap();
        let second = w.append(&msgs(2, 3)).unwrap();
        assert_eq!(s.read_live(100, first).unwrap().len(), 2);
        assert!(s.read_live(100, first).unwrap().is_empty());
        assert_eq!(
            payloads(&s.read_live(100, second).unwrap()),
            ["payload 2", "payload 3", "payload 4"]
        );
    }

    #[test]
    fn a_torn_last_record_is_skipped_and_corruption_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        drop(read(dir.path(), 0, 3, 0));
        let seg = dir.path().join(segment_name(0));
        let bytes = std::fs::read(&seg).unwrap();
        // Killed in the middle of writing the third record.
        std::fs::write(&seg, &bytes[..bytes.len() - 5]).unwrap();
        let (_, got) = read(dir.path(), 3, 0, 10);
        assert_eq!(payloads(&got), ["payload 0", "payload 1"]);
        // A flipped byte in the first record, with more records after it.
        let mut bad = bytes.clone();
        bad[MAGIC.len() + 8 + 20] ^= 0xff;
        std::fs::write(&seg, &bad).unwrap();
        let e = Spool::open(dir.path())
            .and_then(|mut s| s.read_old(10))
            .unwrap_err()
            .to_string();
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
