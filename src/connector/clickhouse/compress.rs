//! ClickHouse's own compression framing, which every version since 1.1 reads with
//! `decompress=1` and writes with `compress=1` over HTTP.
//!
//! A frame is a 16-byte CityHash128 (v1.0.2) checksum of the rest, a method byte (`0x82` LZ4,
//! `0x90` ZSTD, `0x02` none), the frame's size including this 9-byte header (UInt32), the
//! decompressed size (UInt32) and the payload. Data is cut into frames of 1 MiB, ClickHouse's
//! own `max_compress_block_size`.

use std::io::Read;

use crate::error::{Error, Result};

/// A compression method ClickHouse's framing carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// LZ4 (ClickHouse's default: fast, about 2-4× on typical data).
    Lz4,
    /// ZSTD at level 1 (smaller, slower).
    Zstd,
}

const HEADER: usize = 9;
const CHECKSUM: usize = 16;
const FRAME: usize = 1 << 20;
/// The largest frame ClickHouse accepts (DBMS_MAX_COMPRESSED_SIZE).
const MAX_FRAME: usize = 1 << 30;

fn checksum(data: &[u8]) -> [u8; 16] {
    // CityHash's uint128 is (low64, high64), written in that order, each little-endian.
    cityhash_rs::cityhash_102_128(data).rotate_right(64).to_le_bytes()
}

/// Compresses `data` into frames.
pub fn compress(data: &[u8], method: Method) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(data.len() / 2 + 64);
    for chunk in data.chunks(FRAME) {
        let start = out.len();
        out.extend_from_slice(&[0u8; CHECKSUM]);
        out.push(match method {
            Method::Lz4 => 0x82,
            Method::Zstd => 0x90,
        });
        out.extend_from_slice(&[0u8; 8]);
        let payload = match method {
            Method::Lz4 => lz4_flex::block::compress(chunk),
            Method::Zstd => zstd::bulk::compress(chunk, 1)
                .map_err(|e| Error::io("compressing a Native block with ZSTD", e))?,
        };
        out.extend_from_slice(&payload);
        let size = (HEADER + payload.len()) as u32;
        out[start + CHECKSUM + 1..start + CHECKSUM + 5].copy_from_slice(&size.to_le_bytes());
        out[start + CHECKSUM + 5..start + CHECKSUM + 9].copy_from_slice(&(chunk.len() as u32).to_le_bytes());
        let sum = checksum(&out[start + CHECKSUM..]);
        out[start..start + CHECKSUM].copy_from_slice(&sum);
    }
    Ok(out)
}

/// Reads frames from `inner` and yields the decompressed bytes, checking every checksum.
pub struct Decompress<R: Read> {
    inner: R,
    buf: Vec<u8>,
    pos: usize,
}

impl<R: Read> Decompress<R> {
    /// Wraps a stream of frames.
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            buf: Vec::new(),
            pos: 0,
        }
    }

    /// The next frame's data; `false` at a clean end of stream.
    fn next_frame(&mut self) -> std::io::Result<bool> {
        let bad = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
        let mut head = [0u8; CHECKSUM + HEADER];
        let mut got = 0;
        while got < head.len() {
            let n = self.inner.read(&mut head[got..])?;
            if n == 0 {
                if got == 0 {
                    return Ok(false);
                }
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            got += n;
        }
        let method = head[CHECKSUM];
        let size = u32::from_le_bytes([head[17], head[18], head[19], head[20]]) as usize;
        let plain = u32::from_le_bytes([head[21], head[22], head[23], head[24]]) as usize;
        if !(HEADER..=MAX_FRAME).contains(&size) || plain > MAX_FRAME {
            return Err(bad(format!(
                "a compressed frame of {size} bytes ({plain} decompressed): the answer is not ClickHouse-compressed"
            )));
        }
        let mut frame = vec![0u8; size];
        frame[..HEADER].copy_from_slice(&head[CHECKSUM..]);
        self.inner.read_exact(&mut frame[HEADER..])?;
        if checksum(&frame) != head[..CHECKSUM] {
            return Err(bad(
                "a compressed frame's checksum does not match: the data was damaged".into(),
            ));
        }
        let payload = &frame[HEADER..];
        self.buf = match method {
            0x82 => lz4_flex::block::decompress(payload, plain).map_err(|e| bad(format!("LZ4: {e}")))?,
            0x90 => zstd::bulk::decompress(payload, plain)?,
            0x02 => payload.to_vec(),
            other => return Err(bad(format!("compression method 0x{other:02x} is not supported"))),
        };
        if self.buf.len() != plain {
            return Err(bad(format!(
                "a frame decompressed to {} bytes, not {plain}",
                self.buf.len()
            )));
        }
        self.pos = 0;
        Ok(true)
    }
}

impl<R: Read> Read for Decompress<R> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.buf.len() {
            if !self.next_frame()? {
                return Ok(0);
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_damage_is_caught() {
        let data: Vec<u8> = (0..3_000_000u32).flat_map(|i| (i % 1000).to_le_bytes()).collect();
        for m in [Method::Lz4, Method::Zstd] {
            let z = compress(&data, m).unwrap();
            assert!(z.len() < data.len() / 2);
            let mut back = Vec::new();
            Decompress::new(&z[..]).read_to_end(&mut back).unwrap();
            assert_eq!(back, data);
            let mut broken = z.clone();
            broken[100] ^= 1;
            assert!(Decompress::new(&broken[..]).read_to_end(&mut Vec::new()).is_err());
        }
    }
}
