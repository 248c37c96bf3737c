//! ClickHouse Native → Arrow, block by block from any [`Read`].
//!
//! The mirror of [`super::native`]: each block is read column by column straight into Arrow
//! buffers (fixed-width values are copied, strings are gathered into one offsets and one values
//! buffer), so memory is one block plus its Arrow arrays. The Arrow types are the type map's
//! ([`ChType::to_arrow`]): 128/256-bit integers become decimals of scale 0, `Enum` its names,
//! `UUID` its canonical text, `FixedString` its bytes without the trailing zero padding,
//! `LowCardinality(T)` the values of T.

use std::io::Read;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, BooleanArray, Decimal128Array, Decimal256Array, LargeStringArray, ListArray, MapArray,
    PrimitiveArray, RecordBatch, RecordBatchOptions, StringArray, StructArray, UInt64Array, new_empty_array,
};
use arrow::buffer::{Buffer, MutableBuffer, NullBuffer, OffsetBuffer, ScalarBuffer};
use arrow::datatypes::{
    ArrowPrimitiveType, DataType, Date32Type, Field, Fields, Float32Type, Float64Type, Int8Type, Int16Type,
    Int32Type, Int64Type, SchemaRef, TimeUnit, TimestampMicrosecondType, TimestampMillisecondType,
    TimestampNanosecondType, TimestampSecondType, UInt8Type, UInt16Type, UInt32Type, UInt64Type, i256,
};

use super::types::ChType;
use crate::error::{Error, Result};

/// Reads Native blocks and turns them into batches of a known schema.
pub struct BlockReader<R: Read> {
    r: R,
    schema: SchemaRef,
    /// Blocks read so far, for messages.
    blocks: usize,
}

/// Bytes a single length may claim before it is taken for a broken stream (1 GiB).
const MAX_LEN: u64 = 1 << 30;

/// Rows a block may claim (ClickHouse sends blocks of `max_block_size`, 65,536 by default).
/// Memory follows the bytes that arrive, never a count the answer claims: a hostile count
/// ends at the end of the stream, after at most what was sent was held.
const MAX_BLOCK_ROWS: u64 = 1 << 24;

/// Names (of columns and types) longer than this are not Native.
const MAX_NAME: u64 = 1 << 20;

/// Capacity reserved ahead of the data for per-row vectors.
const RESERVE: usize = 1 << 16;

impl<R: Read> BlockReader<R> {
    /// Batches will have `schema`: the block's columns must match its fields in order (names are
    /// not checked: a query may alias them).
    pub fn new(r: R, schema: SchemaRef) -> Self {
        Self { r, schema, blocks: 0 }
    }

    /// The next block as a batch; `None` at the end of the stream. Empty blocks are skipped.
    pub fn next_batch(&mut self) -> Result<Option<RecordBatch>> {
        loop {
            let Some(cols) = self.first_varuint()? else {
                return Ok(None);
            };
            self.blocks += 1;
            let rows = self.varuint()?;
            if rows > MAX_BLOCK_ROWS {
                return Err(self.err(format!(
                    "a block of {rows} rows (more than {MAX_BLOCK_ROWS}): the answer is not Native"
                )));
            }
            let rows = rows as usize;
            if cols as usize != self.schema.fields().len() && !(self.schema.fields().is_empty() && cols == 1)
            {
                return Err(self.err(format!(
                    "block has {cols} columns, the query asked for {}",
                    self.schema.fields().len()
                )));
            }
            let mut arrays = Vec::with_capacity(self.schema.fields().len().max(1));
            for i in 0..cols as usize {
                let name = String::from_utf8_lossy(&self.string()?).into_owned();
                let ty_name = String::from_utf8_lossy(&self.string()?).into_owned();
                let ty = ChType::parse(&ty_name)?;
                let mut col = ColumnReader {
                    r: &mut self.r,
                    name: &name,
                };
                if rows > 0 {
                    col.prefix(&ty)?;
                }
                let a = col.read(&ty, rows)?;
                if let Some(field) = self.schema.fields().get(i) {
                    arrays.push(conform(a, field.data_type(), &name)?);
                }
            }
            if rows == 0 {
                continue;
            }
            let opts = RecordBatchOptions::new().with_row_count(Some(rows));
            return Ok(Some(RecordBatch::try_new_with_options(
                Arc::clone(&self.schema),
                arrays,
                &opts,
            )?));
        }
    }

    fn err(&self, what: String) -> Error {
        Error::Config(format!("ClickHouse Native answer, block {}: {what}", self.blocks))
    }

    /// A VarUInt, or `None` at a clean end of stream.
    fn first_varuint(&mut self) -> Result<Option<u64>> {
        let mut b = [0u8; 1];
        loop {
            match self.r.read(&mut b) {
                Ok(0) => return Ok(None),
                Ok(_) => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::io("reading ClickHouse's answer", e)),
            }
        }
        let mut v = u64::from(b[0] & 0x7f);
        if b[0] & 0x80 == 0 {
            return Ok(Some(v));
        }
        let rest = varuint_from(&mut self.r, 7)?;
        v |= rest;
        Ok(Some(v))
    }

    fn varuint(&mut self) -> Result<u64> {
        varuint_from(&mut self.r, 0)
    }

    fn string(&mut self) -> Result<Vec<u8>> {
        let n = self.varuint()?;
        if n > MAX_NAME {
            return Err(self.err(format!("a name of {n} bytes: the answer is not Native")));
        }
        let mut v = vec![0u8; n as usize];
        read_exact(&mut self.r, &mut v)?;
        Ok(v)
    }
}

/// A decoded array in the schema's type: the same type, or a cast the type map allows (a
/// server may answer `LowCardinality(String)` where the table said `String`).
fn conform(a: ArrayRef, to: &DataType, name: &str) -> Result<ArrayRef> {
    if a.data_type() == to {
        return Ok(a);
    }
    arrow::compute::cast(&a, to).map_err(|e| {
        Error::Config(format!(
            "column {name}: ClickHouse sent {} where {to} was expected: {e}",
            a.data_type()
        ))
    })
}

fn read_exact(r: &mut impl Read, buf: &mut [u8]) -> Result<()> {
    r.read_exact(buf).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            Error::Config("ClickHouse's answer ended in the middle of a block".into())
        } else {
            Error::io("reading ClickHouse's answer", e)
        }
    })
}

fn varuint_from(r: &mut impl Read, mut shift: u32) -> Result<u64> {
    let mut v = 0u64;
    loop {
        let mut b = [0u8; 1];
        read_exact(r, &mut b)?;
        if shift > 63 {
            return Err(Error::Config("ClickHouse's answer has a broken VarUInt".into()));
        }
        v |= u64::from(b[0] & 0x7f) << shift;
        if b[0] & 0x80 == 0 {
            return Ok(v);
        }
        shift += 7;
    }
}

struct ColumnReader<'a, R: Read> {
    r: &'a mut R,
    name: &'a str,
}

impl<R: Read> ColumnReader<'_, R> {
    fn err(&self, what: String) -> Error {
        Error::Config(format!("column {}: {what}", self.name))
    }

    fn u64(&mut self) -> Result<u64> {
        let mut b = [0u8; 8];
        read_exact(self.r, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// `n` bytes into a 64-byte aligned buffer, grown as they arrive (a stream that claims more
    /// than it sends ends in an error having held only what it sent).
    fn bytes(&mut self, n: usize) -> Result<Buffer> {
        if n as u64 > MAX_LEN {
            return Err(self.err(format!("a column of {n} bytes: the answer is not Native")));
        }
        let mut m = MutableBuffer::new(n.min(1 << 20));
        while m.len() < n {
            let start = m.len();
            let step = (n - start).min(1 << 20);
            m.extend_zeros(step);
            read_exact(self.r, &mut m.as_slice_mut()[start..])?;
        }
        Ok(m.into())
    }

    /// Bytes of `rows` values `width` wide, checked.
    fn width(&self, rows: usize, width: usize) -> Result<usize> {
        rows.checked_mul(width).ok_or_else(|| {
            self.err(format!(
                "{rows} values of {width} bytes: the answer is not Native"
            ))
        })
    }

    fn primitive<T: ArrowPrimitiveType>(&mut self, rows: usize) -> Result<PrimitiveArray<T>> {
        let buf = self.bytes(self.width(rows, std::mem::size_of::<T::Native>())?)?;
        Ok(PrimitiveArray::<T>::new(ScalarBuffer::new(buf, 0, rows), None))
    }

    /// The serialization state written before a column's data: a version for every
    /// `LowCardinality` in the type.
    fn prefix(&mut self, ty: &ChType) -> Result<()> {
        match ty {
            ChType::LowCardinality(_) => {
                let v = self.u64()?;
                if v != 1 {
                    return Err(self.err(format!("LowCardinality keys version {v} is not supported")));
                }
                Ok(())
            }
            ChType::Nullable(t) | ChType::Array(t) => self.prefix(t),
            ChType::Tuple(items) => items.iter().try_for_each(|(_, t)| self.prefix(t)),
            ChType::Map(k, v) => {
                self.prefix(k)?;
                self.prefix(v)
            }
            _ => Ok(()),
        }
    }

    fn read(&mut self, ty: &ChType, rows: usize) -> Result<ArrayRef> {
        if rows == 0 {
            return Ok(new_empty_array(&ty.to_arrow().0));
        }
        Ok(match ty {
            ChType::Int(8) => Arc::new(self.primitive::<Int8Type>(rows)?),
            ChType::Int(16) => Arc::new(self.primitive::<Int16Type>(rows)?),
            ChType::Int(32) => Arc::new(self.primitive::<Int32Type>(rows)?),
            ChType::Int(64) => Arc::new(self.primitive::<Int64Type>(rows)?),
            ChType::UInt(8) => Arc::new(self.primitive::<UInt8Type>(rows)?),
            ChType::UInt(16) => Arc::new(self.primitive::<UInt16Type>(rows)?),
            ChType::UInt(32) => Arc::new(self.primitive::<UInt32Type>(rows)?),
            ChType::UInt(64) => Arc::new(self.primitive::<UInt64Type>(rows)?),
            ChType::Int(128) => {
                let a = self.primitive::<arrow::datatypes::Decimal128Type>(rows)?;
                Arc::new(
                    Decimal256Array::from_iter_values(a.values().iter().map(|v| i256::from_i128(*v)))
                        .with_precision_and_scale(76, 0)?,
                )
            }
            ChType::Int(_) => {
                let a = self.primitive::<arrow::datatypes::Decimal256Type>(rows)?;
                Arc::new(Decimal256Array::new(a.values().clone(), None).with_precision_and_scale(76, 0)?)
            }
            ChType::UInt(bits) => {
                let width = usize::from(*bits / 8);
                let raw = self.bytes(self.width(rows, width)?)?;
                let mut values = Vec::with_capacity(rows);
                for (i, chunk) in raw.chunks_exact(width).enumerate() {
                    let mut b = [0u8; 32];
                    b[..width].copy_from_slice(chunk);
                    let v = i256::from_le_bytes(b);
                    if v.is_negative() {
                        return Err(self.err(format!(
                            "row {}: a UInt256 above 2^255 does not fit Arrow's Decimal256",
                            i + 1
                        )));
                    }
                    values.push(v);
                }
                Arc::new(Decimal256Array::from(values).with_precision_and_scale(76, 0)?)
            }
            ChType::Float32 => Arc::new(self.primitive::<Float32Type>(rows)?),
            ChType::Float64 => Arc::new(self.primitive::<Float64Type>(rows)?),
            ChType::Bool => {
                let raw = self.bytes(rows)?;
                Arc::new(BooleanArray::from_iter(raw.iter().map(|b| Some(*b != 0))))
            }
            ChType::Decimal(p, s) => {
                let width = match p {
                    0..=9 => 4,
                    10..=18 => 8,
                    19..=38 => 16,
                    _ => 32,
                };
                let raw = self.bytes(self.width(rows, width)?)?;
                if *p > 38 {
                    let v: Vec<i256> = raw
                        .chunks_exact(32)
                        .map(|c| i256::from_le_bytes(c.try_into().unwrap_or([0; 32])))
                        .collect();
                    Arc::new(Decimal256Array::from(v).with_precision_and_scale(*p, *s)?)
                } else {
                    let v: Vec<i128> = raw
                        .chunks_exact(width)
                        .map(|c| match width {
                            4 => i128::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]])),
                            8 => i128::from(i64::from_le_bytes(c.try_into().unwrap_or([0; 8]))),
                            _ => i128::from_le_bytes(c.try_into().unwrap_or([0; 16])),
                        })
                        .collect();
                    Arc::new(Decimal128Array::from(v).with_precision_and_scale(*p, *s)?)
                }
            }
            // Views over the decoded buffer (the type map's `Utf8View`).
            ChType::String => arrow::compute::cast(&self.strings(rows)?, &DataType::Utf8View)?,
            ChType::FixedString(n) => {
                if *n == 0 {
                    return Err(self.err("FixedString(0): the answer is not Native".into()));
                }
                let raw = self.bytes(self.width(rows, *n)?)?;
                let mut offsets = Vec::with_capacity(rows + 1);
                let mut values = Vec::with_capacity(raw.len());
                offsets.push(0i32);
                for chunk in raw.chunks_exact((*n).max(1)).take(rows) {
                    let end = chunk.iter().rposition(|b| *b != 0).map_or(0, |p| p + 1);
                    values.extend_from_slice(&chunk[..end]);
                    offsets.push(self.offset(values.len())?);
                }
                self.utf8(offsets, values)?
            }
            ChType::Uuid => {
                let raw = self.bytes(self.width(rows, 16)?)?;
                let mut out = Vec::with_capacity(rows * 36);
                let mut offsets = Vec::with_capacity(rows + 1);
                offsets.push(0i32);
                for c in raw.chunks_exact(16) {
                    let mut b = [0u8; 16];
                    for k in 0..8 {
                        b[k] = c[7 - k];
                        b[8 + k] = c[15 - k];
                    }
                    for (k, byte) in b.iter().enumerate() {
                        if matches!(k, 4 | 6 | 8 | 10) {
                            out.push(b'-');
                        }
                        out.extend_from_slice(format!("{byte:02x}").as_bytes());
                    }
                    offsets.push(self.offset(out.len())?);
                }
                self.utf8(offsets, out)?
            }
            ChType::Date => {
                let a = self.primitive::<UInt16Type>(rows)?;
                Arc::new(PrimitiveArray::<Date32Type>::from_iter_values(
                    a.values().iter().map(|d| i32::from(*d)),
                ))
            }
            ChType::Date32 => Arc::new(self.primitive::<Date32Type>(rows)?),
            ChType::DateTime(tz) => {
                let a = self.primitive::<UInt32Type>(rows)?;
                Arc::new(
                    PrimitiveArray::<TimestampSecondType>::from_iter_values(
                        a.values().iter().map(|s| i64::from(*s)),
                    )
                    .with_timezone_opt(tz.clone()),
                )
            }
            ChType::DateTime64(p, tz) => {
                let a = self.primitive::<Int64Type>(rows)?;
                let (unit, digits) = match p {
                    0 => (TimeUnit::Second, 0),
                    1..=3 => (TimeUnit::Millisecond, 3),
                    4..=6 => (TimeUnit::Microsecond, 6),
                    _ => (TimeUnit::Nanosecond, 9),
                };
                let mul = 10i64.pow(digits - u32::from((*p).min(9)));
                let values: ScalarBuffer<i64> = if mul == 1 {
                    a.values().clone()
                } else {
                    a.values().iter().map(|v| v.saturating_mul(mul)).collect()
                };
                let tz = tz.clone();
                match unit {
                    TimeUnit::Second => Arc::new(
                        PrimitiveArray::<TimestampSecondType>::new(values, None).with_timezone_opt(tz),
                    ),
                    TimeUnit::Millisecond => Arc::new(
                        PrimitiveArray::<TimestampMillisecondType>::new(values, None).with_timezone_opt(tz),
                    ),
                    TimeUnit::Microsecond => Arc::new(
                        PrimitiveArray::<TimestampMicrosecondType>::new(values, None).with_timezone_opt(tz),
                    ),
                    TimeUnit::Nanosecond => Arc::new(
                        PrimitiveArray::<TimestampNanosecondType>::new(values, None).with_timezone_opt(tz),
                    ),
                }
            }
            ChType::Enum(bits, items) => {
                let codes: Vec<i16> = if *bits == 8 {
                    self.primitive::<Int8Type>(rows)?
                        .values()
                        .iter()
                        .map(|v| i16::from(*v))
                        .collect()
                } else {
                    self.primitive::<Int16Type>(rows)?.values().to_vec()
                };
                let mut values = Vec::new();
                let mut offsets = Vec::with_capacity(rows + 1);
                offsets.push(0i32);
                for (i, c) in codes.iter().enumerate() {
                    let name = items
                        .iter()
                        .find(|(_, v)| v == c)
                        .ok_or_else(|| self.err(format!("row {}: {c} is not a value of {ty}", i + 1)))?;
                    values.extend_from_slice(name.0.as_bytes());
                    offsets.push(self.offset(values.len())?);
                }
                self.utf8(offsets, values)?
            }
            ChType::Nullable(inner) => {
                let map = self.bytes(rows)?;
                let valid = NullBuffer::from_iter(map.iter().map(|b| *b == 0));
                let values = self.read(inner, rows)?;
                let data = values.into_data().into_builder().nulls(Some(valid)).build()?;
                arrow::array::make_array(data)
            }
            ChType::Array(inner) => {
                let ends = self.primitive::<UInt64Type>(rows)?;
                let (offsets, total) = self.offsets(&ends)?;
                let values = self.read(inner, total)?;
                let field = Arc::new(Field::new("item", values.data_type().clone(), true));
                Arc::new(ListArray::try_new(field, offsets, values, None)?)
            }
            ChType::Tuple(items) => {
                let mut fields = Vec::with_capacity(items.len());
                let mut arrays = Vec::with_capacity(items.len());
                for (i, (n, t)) in items.iter().enumerate() {
                    let a = self.read(t, rows)?;
                    fields.push(Field::new(
                        n.clone().unwrap_or_else(|| format!("c{i}")),
                        a.data_type().clone(),
                        true,
                    ));
                    arrays.push(a);
                }
                Arc::new(StructArray::try_new(Fields::from(fields), arrays, None)?)
            }
            ChType::Map(k, v) => {
                let ends = self.primitive::<UInt64Type>(rows)?;
                let (offsets, total) = self.offsets(&ends)?;
                let keys = self.read(k, total)?;
                let values = self.read(v, total)?;
                let fields = Fields::from(vec![
                    Field::new("key", keys.data_type().clone(), false),
                    Field::new("value", values.data_type().clone(), true),
                ]);
                let entries = StructArray::try_new(fields.clone(), vec![keys, values], None)?;
                let field = Arc::new(Field::new("entries", DataType::Struct(fields), false));
                Arc::new(MapArray::try_new(field, offsets, entries, None, false)?)
            }
            ChType::LowCardinality(inner) => self.low_cardinality(inner, rows)?,
        })
    }

    fn offset(&self, n: usize) -> Result<i32> {
        i32::try_from(n).map_err(|_| self.err("more than 2 GiB of text in one block".into()))
    }

    fn utf8(&self, offsets: Vec<i32>, values: Vec<u8>) -> Result<ArrayRef> {
        let offsets = OffsetBuffer::new(ScalarBuffer::from(offsets));
        // Buffers are shared, not copied: the bytes stay at hand to name the bad row.
        let values = Buffer::from_vec(values);
        match StringArray::try_new(offsets.clone(), values.clone(), None) {
            Ok(a) => Ok(Arc::new(a)),
            Err(_) => {
                let row = offsets
                    .windows(2)
                    .position(|w| std::str::from_utf8(&values[w[0] as usize..w[1] as usize]).is_err())
                    .unwrap_or(0);
                Err(self.err(format!(
                    "row {} is not UTF-8 text; read it as bytes with hex() or base64Encode() in a query",
                    row + 1
                )))
            }
        }
    }

    fn strings(&mut self, rows: usize) -> Result<ArrayRef> {
        let mut offsets: Vec<i64> = Vec::with_capacity(rows.min(RESERVE) + 1);
        let mut values = Vec::new();
        offsets.push(0);
        for i in 0..rows {
            let n = varuint_from(self.r, 0)?;
            if n > MAX_LEN {
                return Err(self.err(format!("row {}: a string of {n} bytes", i + 1)));
            }
            let start = values.len();
            if (start as u64).saturating_add(n) > MAX_LEN.saturating_mul(4) {
                return Err(self.err(format!(
                    "row {}: the column's strings pass 4 GiB in one block",
                    i + 1
                )));
            }
            // Grown as the bytes arrive, as in `bytes`.
            let mut left = n as usize;
            while left > 0 {
                let at = values.len();
                let step = left.min(1 << 20);
                values.resize(at + step, 0);
                read_exact(self.r, &mut values[at..])?;
                left -= step;
            }
            offsets.push(values.len() as i64);
        }
        if let Ok(small) = offsets
            .iter()
            .map(|o| i32::try_from(*o))
            .collect::<Result<Vec<i32>, _>>()
        {
            return self.utf8(small, values);
        }
        let offsets = OffsetBuffer::new(ScalarBuffer::from(offsets));
        let a = LargeStringArray::try_new(offsets, Buffer::from_vec(values), None)
            .map_err(|_| self.err("a string is not UTF-8 text".into()))?;
        Ok(arrow::compute::cast(&a, &DataType::Utf8)?)
    }

    fn offsets(&self, ends: &UInt64Array) -> Result<(OffsetBuffer<i32>, usize)> {
        let mut prev = 0u64;
        let mut out = Vec::with_capacity(ends.len() + 1);
        out.push(0i32);
        for e in ends.values() {
            if *e < prev || *e > i32::MAX as u64 {
                return Err(self.err(format!(
                    "array offsets out of order or too large ({prev} then {e})"
                )));
            }
            prev = *e;
            out.push(*e as i32);
        }
        Ok((OffsetBuffer::new(ScalarBuffer::from(out)), prev as usize))
    }

    /// Granules of `index type | flags`, additional keys, row count and indexes, until `rows`
    /// rows are read. Key 0 of a `LowCardinality(Nullable(T))` dictionary stands for NULL.
    fn low_cardinality(&mut self, inner: &ChType, rows: usize) -> Result<ArrayRef> {
        let (nullable, base) = match inner {
            ChType::Nullable(t) => (true, t.as_ref()),
            t => (false, t),
        };
        let mut parts: Vec<ArrayRef> = Vec::new();
        let mut keys: Option<ArrayRef> = None;
        let mut done = 0usize;
        while done < rows {
            let flags = self.u64()?;
            if flags & (1 << 8) != 0 {
                return Err(self.err("LowCardinality with a global dictionary is not supported".into()));
            }
            if flags & (1 << 9) != 0 {
                let n = self.u64()?;
                if n > MAX_LEN {
                    return Err(self.err(format!("LowCardinality dictionary of {n} keys")));
                }
                keys = Some(self.read(base, n as usize)?);
            }
            let n = self.u64()? as usize;
            if n == 0 || done + n > rows {
                return Err(self.err(format!("LowCardinality granule of {n} rows in a block of {rows}")));
            }
            let idx: Vec<u64> = match flags & 0xff {
                0 => self
                    .primitive::<UInt8Type>(n)?
                    .values()
                    .iter()
                    .map(|v| u64::from(*v))
                    .collect(),
                1 => self
                    .primitive::<UInt16Type>(n)?
                    .values()
                    .iter()
                    .map(|v| u64::from(*v))
                    .collect(),
                2 => self
                    .primitive::<UInt32Type>(n)?
                    .values()
                    .iter()
                    .map(|v| u64::from(*v))
                    .collect(),
                _ => self.primitive::<UInt64Type>(n)?.values().to_vec(),
            };
            let dict = keys
                .as_ref()
                .ok_or_else(|| self.err("LowCardinality indexes before any keys".into()))?;
            if let Some(bad) = idx.iter().find(|i| **i as usize >= dict.len()) {
                return Err(self.err(format!("LowCardinality index {bad} past {} keys", dict.len())));
            }
            let nulls = nullable.then(|| NullBuffer::from_iter(idx.iter().map(|i| *i != 0)));
            let take = UInt64Array::new(ScalarBuffer::from(idx), nulls);
            parts.push(arrow::compute::take(dict.as_ref(), &take, None)?);
            done += n;
        }
        if parts.len() == 1 {
            return Ok(parts.remove(0));
        }
        let refs: Vec<&dyn Array> = parts.iter().map(|p| p.as_ref()).collect();
        Ok(arrow::compute::concat(&refs)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connector::clickhouse::native::encode_block;
    use arrow::array::{AsArray, Int32Array, StringArray};
    use arrow::datatypes::Schema;

    fn round_trip(batch: &RecordBatch, types: &[ChType]) -> RecordBatch {
        let bytes = encode_block(batch, types).unwrap();
        let fields: Vec<Field> = batch
            .schema()
            .fields()
            .iter()
            .zip(types)
            .map(|(f, t)| {
                let (dt, n) = t.to_arrow();
                Field::new(f.name(), dt, n)
            })
            .collect();
        let mut r = BlockReader::new(&bytes[..], Arc::new(Schema::new(fields)));
        let b = r.next_batch().unwrap().unwrap();
        assert!(r.next_batch().unwrap().is_none());
        b
    }

    #[test]
    fn strings_nullable_and_low_cardinality_round_trip() {
        let s: ArrayRef = Arc::new(StringArray::from(vec![
            Some("a"),
            None,
            Some("ü"),
            Some("a"),
            Some(""),
        ]));
        let batch = RecordBatch::try_from_iter([
            ("id", Arc::new(Int32Array::from(vec![1, 2, 3, 4, 5])) as ArrayRef),
            ("s", Arc::clone(&s)),
            ("lc", Arc::clone(&s)),
        ])
        .unwrap();
        let lc = ChType::parse("LowCardinality(Nullable(String))").unwrap();
        let types = [ChType::Int(32), ChType::parse("Nullable(String)").unwrap(), lc];
        let b = round_trip(&batch, &types);
        let view = arrow::compute::cast(&s, &DataType::Utf8View).unwrap();
        assert_eq!(b.column(1).as_ref(), view.as_ref());
        assert_eq!(b.column(2).as_ref(), view.as_ref());
        assert_eq!(b.column(0).as_primitive::<Int32Type>().values(), &[1, 2, 3, 4, 5]);
    }

    #[test]
    fn wide_integers_enums_uuids_round_trip() {
        let batch = RecordBatch::try_from_iter([
            ("e", Arc::new(StringArray::from(vec!["b", "a"])) as ArrayRef),
            (
                "u",
                Arc::new(StringArray::from(vec![
                    "61f0c404-5cb3-11e7-907b-a6006ad3dba0",
                    "00000000-0000-0000-0000-000000000001",
                ])) as ArrayRef,
            ),
            (
                "big",
                Arc::new(
                    Decimal256Array::from(vec![i256::from_i128(-5), i256::from_i128(i128::MAX)])
                        .with_precision_and_scale(76, 0)
                        .unwrap(),
                ) as ArrayRef,
            ),
        ])
        .unwrap();
        let types = [
            ChType::parse("Enum8('a' = 1, 'b' = -2)").unwrap(),
            ChType::Uuid,
            ChType::Int(256),
        ];
        let b = round_trip(&batch, &types);
        assert_eq!(b.column(0).as_string::<i32>().value(0), "b");
        assert_eq!(
            b.column(1).as_string::<i32>().value(0),
            "61f0c404-5cb3-11e7-907b-a6006ad3dba0"
        );
        assert_eq!(b.column(2).as_ref(), batch.column(2).as_ref());
    }

    #[test]
    fn a_cut_stream_is_an_error_not_a_panic() {
        let batch = RecordBatch::try_from_iter([(
            "s",
            Arc::new(StringArray::from(vec!["hello", "world"])) as ArrayRef,
        )])
        .unwrap();
        let bytes = encode_block(&batch, &[ChType::String]).unwrap();
        let schema = Arc::new(Schema::new(vec![Field::new("s", DataType::Utf8, false)]));
        for cut in 1..bytes.len() {
            let mut r = BlockReader::new(&bytes[..cut], Arc::clone(&schema));
            assert!(r.next_batch().is_err(), "cut at {cut}");
        }
    }

    /// A block header: `cols`, `rows`, then one column `name` of `ty`.
    fn hostile(rows: u64, ty: &str, data: &[u8]) -> Vec<u8> {
        use crate::connector::clickhouse::native::put_varuint;
        let mut b = Vec::new();
        put_varuint(&mut b, 1);
        put_varuint(&mut b, rows);
        for s in ["c", ty] {
            put_varuint(&mut b, s.len() as u64);
            b.extend_from_slice(s.as_bytes());
        }
        b.extend_from_slice(data);
        b
    }

    #[test]
    fn hostile_counts_are_errors_without_their_allocation() {
        let schema = |dt: DataType| Arc::new(Schema::new(vec![Field::new("c", dt, true)]));
        let read = |bytes: Vec<u8>, dt: DataType| {
            BlockReader::new(&bytes[..], schema(dt))
                .next_batch()
                .map(|_| ())
                .unwrap_err()
                .to_string()
        };
        // 2^60 rows: refused before anything is read.
        let e = read(hostile(1 << 60, "Int64", &[]), DataType::Int64);
        assert!(e.contains("rows (more than"), "{e}");
        // 16M Int64 rows claimed (128 MiB), 8 bytes sent: an error at the end of the stream.
        let e = read(hostile(1 << 24, "Int64", &[1; 8]), DataType::Int64);
        assert!(!e.is_empty());
        // Strings claiming 16M rows and a 1 GiB string each, a few bytes sent.
        let e = read(
            hostile(1 << 24, "String", &[0xff, 0xff, 0xff, 0xff, 0x03, b'a']),
            DataType::Utf8View,
        );
        assert!(!e.is_empty());
        // An array whose offsets claim 2^31 - 1 nested values.
        let mut ends = Vec::new();
        ends.extend_from_slice(&(i32::MAX as u64).to_le_bytes());
        let e = read(
            hostile(1, "Array(UInt64)", &ends),
            DataType::List(Arc::new(Field::new("item", DataType::UInt64, true))),
        );
        assert!(!e.is_empty());
        // A type nested past the parser's depth: an error, not a stack overflow.
        let deep = format!("{}Int8{}", "Array(".repeat(5_000), ")".repeat(5_000));
        let e = read(hostile(1, &deep, &[]), DataType::Int8);
        assert!(e.contains("nested more than"), "{e}");
    }
}
