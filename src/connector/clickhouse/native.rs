//! Arrow → ClickHouse Native format, column by column.
//!
//! A Native block is: number of columns and rows (VarUInt), then per column its name and type
//! (String) and its data. Data is the column's values back to back: fixed-width numbers as
//! little-endian bytes (copied straight from Arrow's buffers), `String` as VarUInt length +
//! bytes, `Nullable(T)` as a UInt8 null map then T's data, `Array(T)` as UInt64 end offsets then
//! the flattened elements, `Tuple` as its elements' columns in order, `Map(K, V)` as
//! `Array(Tuple(K, V))`. This is the layout of Native over HTTP without
//! `client_protocol_version`, which every ClickHouse version reads.
//!
//! Each Arrow column is first cast (Arrow's own cast kernels) to the Arrow type that matches
//! the target ClickHouse type; values ClickHouse cannot hold (a date before 1970 in `Date`, a
//! NULL in a non-Nullable column, a string longer than a `FixedString`) are errors that name
//! the column and the row.

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, FixedSizeBinaryArray, GenericListArray, OffsetSizeTrait,
    RecordBatch,
};
use arrow::compute::{CastOptions, cast_with_options};
use arrow::datatypes::{
    DataType, Date32Type, Decimal128Type, Decimal256Type, Field, Float32Type, Float64Type, Int8Type,
    Int16Type, Int32Type, Int64Type, TimeUnit, TimestampMicrosecondType, TimestampMillisecondType,
    TimestampNanosecondType, TimestampSecondType, UInt8Type, UInt16Type, UInt32Type, UInt64Type, i256,
};

use super::types::ChType;
use crate::error::{Error, Result};

/// Appends `v` as a ClickHouse VarUInt (LEB128).
pub fn put_varuint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    put_varuint(out, s.len() as u64);
    out.extend_from_slice(s);
}

/// Encodes a batch as one Native block with the given target types (one per column).
pub fn encode_block(batch: &RecordBatch, types: &[ChType]) -> Result<Vec<u8>> {
    if types.len() != batch.num_columns() {
        return Err(Error::Config(format!(
            "{} ClickHouse types for {} columns",
            types.len(),
            batch.num_columns()
        )));
    }
    let mut out = Vec::with_capacity(batch.get_array_memory_size() + 64);
    put_varuint(&mut out, batch.num_columns() as u64);
    put_varuint(&mut out, batch.num_rows() as u64);
    for ((field, column), ty) in batch.schema().fields().iter().zip(batch.columns()).zip(types) {
        put_str(&mut out, field.name().as_bytes());
        put_str(&mut out, ty.to_string().as_bytes());
        if batch.num_rows() == 0 {
            // Zero rows are zero bytes of data, serialization state included.
            continue;
        }
        prefix(ty, &mut out);
        let col = Column { name: field.name() };
        col.encode(column, ty, &mut out)?;
    }
    Ok(out)
}

/// The serialization state ClickHouse expects before a column's data: the keys version
/// (`SharedDictionariesWithAdditionalKeys` = 1) of every `LowCardinality` in the type tree.
fn prefix(ty: &ChType, out: &mut Vec<u8>) {
    match ty {
        ChType::LowCardinality(_) => out.extend_from_slice(&1u64.to_le_bytes()),
        ChType::Nullable(t) | ChType::Array(t) => prefix(t, out),
        ChType::Tuple(items) => items.iter().for_each(|(_, t)| prefix(t, out)),
        ChType::Map(k, v) => {
            prefix(k, out);
            prefix(v, out);
        }
        _ => {}
    }
}

/// Which column is being encoded, for error messages.
struct Column<'a> {
    name: &'a str,
}

/// The Arrow type a ClickHouse type is encoded from: the type map's own ([`ChType::to_arrow`]),
/// except that strings are read as bytes and timestamps without their zone (the zone stays in
/// the ClickHouse type; the values are UTC instants either way).
fn arrow_type(ty: &ChType) -> DataType {
    match ty {
        ChType::String | ChType::FixedString(_) | ChType::Uuid => DataType::Binary,
        ChType::Nullable(t) | ChType::LowCardinality(t) => arrow_type(t),
        // Containers are handled structurally, element by element.
        ChType::Array(_) | ChType::Tuple(_) | ChType::Map(..) => DataType::Null,
        other => match other.to_arrow().0 {
            DataType::Timestamp(unit, Some(_)) => DataType::Timestamp(unit, None),
            t => t,
        },
    }
}

impl Column<'_> {
    fn err(&self, row: usize, what: &str) -> Error {
        Error::Config(format!("column {} row {}: {what}", self.name, row + 1))
    }

    fn cast(&self, a: &ArrayRef, to: &DataType) -> Result<ArrayRef> {
        // Arrow cannot cast timestamps with a zone to one without: drop the zone first (the
        // instant is the same; ClickHouse keeps the zone in the column type).
        let a = match a.data_type() {
            DataType::Timestamp(unit, Some(_)) => arrow::array::make_array(
                a.to_data()
                    .into_builder()
                    .data_type(DataType::Timestamp(*unit, None))
                    .build()?,
            ),
            _ => Arc::clone(a),
        };
        if a.data_type() == to {
            return Ok(a);
        }
        let opts = CastOptions {
            safe: false,
            ..Default::default()
        };
        cast_with_options(&a, to, &opts).map_err(|e| {
            Error::Config(format!(
                "column {}: cannot convert {} to ClickHouse's representation ({to}): {e}",
                self.name,
                a.data_type()
            ))
        })
    }

    fn encode(&self, a: &ArrayRef, ty: &ChType, out: &mut Vec<u8>) -> Result<()> {
        match ty {
            ChType::Nullable(inner) => {
                // The null map, from Arrow's validity bits in one pass.
                match a.logical_nulls() {
                    Some(n) => out.extend(n.iter().map(|valid| u8::from(!valid))),
                    None => out.resize(out.len() + a.len(), 0),
                }
                self.values(a, inner, out, true)
            }
            _ => {
                let nulls = a.logical_nulls().filter(|n| n.null_count() > 0);
                if let Some(row) = nulls.and_then(|n| n.iter().position(|valid| !valid))
                    && !matches!(
                        ty,
                        ChType::Array(_) | ChType::Tuple(_) | ChType::Map(..) | ChType::LowCardinality(_)
                    )
                {
                    return Err(self.err(
                        row,
                        &format!("NULL in a column of type {ty}, which is not Nullable"),
                    ));
                }
                self.values(a, ty, out, false)
            }
        }
    }

    /// Writes the values of `a` as `ty`; with `nullable`, NULL slots get any value (the null
    /// map says they are NULL).
    fn values(&self, a: &ArrayRef, ty: &ChType, out: &mut Vec<u8>, nullable: bool) -> Result<()> {
        macro_rules! raw {
            ($t:ty, $a:expr) => {{
                let arr = self.cast($a, &arrow_type(ty))?;
                out.extend_from_slice(arr.as_primitive::<$t>().values().inner().as_slice());
            }};
        }
        match ty {
            ChType::Int(8) => raw!(Int8Type, a),
            ChType::Int(16) => raw!(Int16Type, a),
            ChType::Int(32) => raw!(Int32Type, a),
            ChType::Int(64) => raw!(Int64Type, a),
            ChType::Int(128) => {
                let arr = self.cast(a, &arrow_type(ty))?;
                let d = arr.as_primitive::<Decimal256Type>();
                for (i, v) in d.values().iter().enumerate() {
                    let v = match v.to_i128() {
                        Some(v) => v,
                        None if nullable && d.is_null(i) => 0,
                        None => return Err(self.err(i, &format!("{v} is outside Int128"))),
                    };
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
            ChType::Int(_) => raw!(Decimal256Type, a),
            ChType::UInt(8) => raw!(UInt8Type, a),
            ChType::UInt(16) => raw!(UInt16Type, a),
            ChType::UInt(32) => raw!(UInt32Type, a),
            ChType::UInt(64) => raw!(UInt64Type, a),
            ChType::UInt(bits) => {
                let arr = self.cast(a, &arrow_type(ty))?;
                let d = arr.as_primitive::<Decimal256Type>();
                let width = usize::from(*bits / 8);
                let max = i256::from_parts(0, 1);
                for (i, v) in d.values().iter().enumerate() {
                    let ok = !v.is_negative() && (width == 32 || *v < max);
                    if !(ok || nullable && d.is_null(i)) {
                        return Err(self.err(i, &format!("{v} is outside {ty}")));
                    }
                    let v = if ok { *v } else { i256::ZERO };
                    out.extend_from_slice(&v.to_le_bytes()[..width]);
                }
            }
            ChType::Enum(bits, items) => self.enumeration(a, *bits, items, nullable, out)?,
            ChType::LowCardinality(inner) => self.low_cardinality(a, inner, out)?,
            ChType::Float32 => raw!(Float32Type, a),
            ChType::Float64 => raw!(Float64Type, a),
            ChType::Bool => {
                let b = self.cast(a, &DataType::Boolean)?;
                let b: &BooleanArray = b.as_boolean();
                out.extend((0..b.len()).map(|i| u8::from(b.value(i))));
            }
            ChType::Decimal(p, _) => {
                let width = match p {
                    0..=9 => 4,
                    10..=18 => 8,
                    19..=38 => 16,
                    _ => 32,
                };
                let arr = self.cast(a, &arrow_type(ty))?;
                if width == 32 {
                    for v in arr.as_primitive::<Decimal256Type>().values() {
                        out.extend_from_slice(&v.to_le_bytes());
                    }
                } else {
                    for v in arr.as_primitive::<Decimal128Type>().values() {
                        out.extend_from_slice(&v.to_le_bytes()[..width]);
                    }
                }
            }
            ChType::String => match a.data_type() {
                // Straight from the Arrow layouts; NULL slots (nullable) carry whatever bytes.
                DataType::Utf8View => {
                    let v = a.as_string_view();
                    out.reserve(v.total_buffer_bytes_used() + v.len() * 2);
                    for i in 0..v.len() {
                        put_str(out, v.value(i).as_bytes());
                    }
                }
                DataType::BinaryView => {
                    let v = a.as_binary_view();
                    for i in 0..v.len() {
                        put_str(out, v.value(i));
                    }
                }
                DataType::LargeUtf8 | DataType::LargeBinary => {
                    let arr = self.cast(a, &DataType::LargeBinary)?;
                    let b = arr.as_binary::<i64>();
                    let (offsets, data) = (b.value_offsets(), b.value_data());
                    for w in offsets.windows(2) {
                        put_str(out, &data[w[0] as usize..w[1] as usize]);
                    }
                }
                _ => {
                    let arr = self.cast(a, &DataType::Binary)?;
                    let b = arr.as_binary::<i32>();
                    let (offsets, data) = (b.value_offsets(), b.value_data());
                    for w in offsets.windows(2) {
                        put_str(out, &data[w[0] as usize..w[1] as usize]);
                    }
                }
            },
            ChType::FixedString(n) => {
                let arr = self.cast(a, &DataType::Binary)?;
                let b = arr.as_binary::<i32>();
                for i in 0..b.len() {
                    let v = if b.is_null(i) { &[][..] } else { b.value(i) };
                    if v.len() > *n {
                        return Err(self.err(i, &format!("{} bytes do not fit FixedString({n})", v.len())));
                    }
                    out.extend_from_slice(v);
                    out.extend(std::iter::repeat_n(0u8, n - v.len()));
                }
            }
            ChType::Uuid => self.uuid(a, out)?,
            ChType::Date => {
                let arr = self.cast(a, &DataType::Date32)?;
                let d = arr.as_primitive::<Date32Type>();
                for (i, v) in d.values().iter().enumerate() {
                    let ok = (0..=i32::from(u16::MAX)).contains(v);
                    if !(ok || nullable && d.is_null(i)) {
                        return Err(self.err(
                            i,
                            &format!("day {v} is outside Date (1970-01-01 .. 2149-06-06); use Date32"),
                        ));
                    }
                    out.extend_from_slice(&(if ok { *v as u16 } else { 0 }).to_le_bytes());
                }
            }
            ChType::Date32 => raw!(Date32Type, a),
            ChType::DateTime(_) => {
                let arr = self.cast(a, &arrow_type(ty))?;
                let t = arr.as_primitive::<TimestampSecondType>();
                for (i, v) in t.values().iter().enumerate() {
                    let ok = (0..=i64::from(u32::MAX)).contains(v);
                    if !(ok || nullable && t.is_null(i)) {
                        return Err(self.err(
                            i,
                            &format!("{v} s is outside DateTime (1970 .. 2106); use DateTime64"),
                        ));
                    }
                    out.extend_from_slice(&(if ok { *v as u32 } else { 0 }).to_le_bytes());
                }
            }
            ChType::DateTime64(p, _) => {
                let arr = self.cast(a, &arrow_type(ty))?;
                // Arrow's units are 10^0, 10^3, 10^6, 10^9; ClickHouse's precision any of 0..9.
                let (values, unit_digits): (&[i64], u32) = match arr.data_type() {
                    DataType::Timestamp(TimeUnit::Second, _) => {
                        (arr.as_primitive::<TimestampSecondType>().values(), 0)
                    }
                    DataType::Timestamp(TimeUnit::Millisecond, _) => {
                        (arr.as_primitive::<TimestampMillisecondType>().values(), 3)
                    }
                    DataType::Timestamp(TimeUnit::Microsecond, _) => {
                        (arr.as_primitive::<TimestampMicrosecondType>().values(), 6)
                    }
                    _ => (arr.as_primitive::<TimestampNanosecondType>().values(), 9),
                };
                let p = u32::from(*p);
                if p == unit_digits {
                    for v in values {
                        out.extend_from_slice(&v.to_le_bytes());
                    }
                } else {
                    let div = 10i64.pow(unit_digits - p.min(unit_digits));
                    for v in values {
                        out.extend_from_slice(&v.div_euclid(div).to_le_bytes());
                    }
                }
            }
            ChType::Nullable(inner) => self.values(a, inner, out, true)?,
            ChType::Array(inner) => match a.data_type() {
                DataType::List(_) => self.list(a.as_list::<i32>(), inner, out)?,
                DataType::LargeList(_) => self.list(a.as_list::<i64>(), inner, out)?,
                DataType::FixedSizeList(f, n) => {
                    let l = a.as_fixed_size_list();
                    let list = GenericListArray::<i32>::try_new(
                        Arc::clone(f),
                        arrow::buffer::OffsetBuffer::from_lengths(std::iter::repeat_n(*n as usize, l.len())),
                        Arc::clone(l.values()),
                        None,
                    )?;
                    self.list(&list, inner, out)?;
                }
                other => {
                    return Err(Error::Config(format!(
                        "column {}: {other} cannot become {ty}",
                        self.name
                    )));
                }
            },
            ChType::Tuple(items) => {
                let s = a.as_struct_opt().ok_or_else(|| {
                    Error::Config(format!(
                        "column {}: {} cannot become {ty}",
                        self.name,
                        a.data_type()
                    ))
                })?;
                if s.num_columns() != items.len() {
                    return Err(Error::Config(format!(
                        "column {}: {} fields for {ty}",
                        self.name,
                        s.num_columns()
                    )));
                }
                for (child, (_, t)) in s.columns().iter().zip(items) {
                    self.encode(child, t, out)?;
                }
            }
            ChType::Map(k, v) => {
                let m = a.as_map_opt().ok_or_else(|| {
                    Error::Config(format!(
                        "column {}: {} cannot become {ty}",
                        self.name,
                        a.data_type()
                    ))
                })?;
                let offsets = m.value_offsets();
                let base = offsets.first().copied().unwrap_or(0);
                for o in &offsets[1..] {
                    out.extend_from_slice(&((o - base) as u64).to_le_bytes());
                }
                let (start, end) = (base as usize, offsets.last().copied().unwrap_or(0) as usize);
                self.encode(&m.keys().slice(start, end - start), k, out)?;
                self.encode(&m.values().slice(start, end - start), v, out)?;
            }
        }
        Ok(())
    }

    fn list<O: OffsetSizeTrait>(
        &self,
        l: &GenericListArray<O>,
        inner: &ChType,
        out: &mut Vec<u8>,
    ) -> Result<()> {
        let offsets = l.value_offsets();
        let base = offsets.first().map_or(0, |o| o.as_usize());
        // A NULL list is written as an empty array: ClickHouse arrays cannot be NULL.
        let mut end = 0u64;
        let mut kept: Vec<(usize, usize)> = Vec::new();
        for i in 0..l.len() {
            let (s, e) = (offsets[i].as_usize(), offsets[i + 1].as_usize());
            if !l.is_null(i) {
                end += (e - s) as u64;
                kept.push((s - base, e - s));
            }
            out.extend_from_slice(&end.to_le_bytes());
        }
        let values = l
            .values()
            .slice(base, offsets.last().map_or(0, |o| o.as_usize()) - base);
        let values = if l.null_count() == 0 {
            values
        } else {
            let parts: Vec<ArrayRef> = kept.iter().map(|(s, n)| values.slice(*s, *n)).collect();
            let refs: Vec<&dyn Array> = parts.iter().map(|p| p.as_ref()).collect();
            if refs.is_empty() {
                values.slice(0, 0)
            } else {
                arrow::compute::concat(&refs)?
            }
        };
        self.encode(&values, inner, out)
    }

    /// One granule: `index type | HasAdditionalKeys | NeedUpdateDictionary`, the keys (for
    /// `Nullable` inner types key 0 stands for NULL), the row count, the indexes. An Arrow
    /// dictionary is used as it is; other arrays are dictionary-encoded first.
    fn low_cardinality(&self, a: &ArrayRef, inner: &ChType, out: &mut Vec<u8>) -> Result<()> {
        let (nullable, base) = match inner {
            ChType::Nullable(t) => (true, t.as_ref()),
            t => (false, t),
        };
        let dict = match a.data_type() {
            DataType::Dictionary(_, v) => {
                let v = v.as_ref().clone();
                self.cast(a, &DataType::Dictionary(Box::new(DataType::Int32), Box::new(v)))?
            }
            other => {
                let to = DataType::Dictionary(Box::new(DataType::Int32), Box::new(other.clone()));
                self.cast(a, &to)?
            }
        };
        let dict = dict.as_dictionary::<Int32Type>();
        let logical = dict.logical_nulls();
        let is_null = |i: usize| logical.as_ref().is_some_and(|n| n.is_null(i));
        if !nullable && let Some(row) = (0..dict.len()).find(|i| is_null(*i)) {
            return Err(self.err(row, &format!("NULL in a column of type LowCardinality({inner})")));
        }
        let shift = usize::from(nullable);
        let num_keys = dict.values().len() + shift;
        let width_code: u64 = match num_keys {
            0..=0x100 => 0,
            0x101..=0x1_0000 => 1,
            _ => 2,
        };
        out.extend_from_slice(&(width_code | 1 << 9 | 1 << 10).to_le_bytes());
        out.extend_from_slice(&(num_keys as u64).to_le_bytes());
        if nullable {
            // The NULL placeholder: T's default value.
            let placeholder = arrow::array::new_null_array(dict.values().data_type(), 1);
            self.values(&placeholder, base, out, true)?;
        }
        self.values(dict.values(), base, out, true)?;
        out.extend_from_slice(&(dict.len() as u64).to_le_bytes());
        for (i, k) in dict.keys().values().iter().enumerate() {
            let idx = if is_null(i) { 0 } else { *k as usize + shift };
            match width_code {
                0 => out.push(idx as u8),
                1 => out.extend_from_slice(&(idx as u16).to_le_bytes()),
                _ => out.extend_from_slice(&(idx as u32).to_le_bytes()),
            }
        }
        Ok(())
    }

    /// Enum values from their names (or from numbers that are among the values).
    fn enumeration(
        &self,
        a: &ArrayRef,
        bits: u8,
        items: &[(String, i16)],
        nullable: bool,
        out: &mut Vec<u8>,
    ) -> Result<()> {
        let mut put = |v: i16| {
            if bits == 8 {
                out.push(v as i8 as u8);
            } else {
                out.extend_from_slice(&v.to_le_bytes());
            }
        };
        let fallback = items.first().map_or(0, |(_, v)| *v);
        let allowed = || {
            items
                .iter()
                .map(|(n, _)| format!("'{n}'"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        if a.data_type().is_integer() {
            let arr = self.cast(a, &DataType::Int16)?;
            let arr = arr.as_primitive::<Int16Type>();
            for (i, v) in arr.values().iter().enumerate() {
                if arr.is_null(i) && nullable {
                    put(fallback);
                } else if items.iter().any(|(_, x)| x == v) {
                    put(*v);
                } else {
                    return Err(self.err(i, &format!("{v} is not a value of the enum ({})", allowed())));
                }
            }
            return Ok(());
        }
        let by_name: std::collections::HashMap<&[u8], i16> =
            items.iter().map(|(n, v)| (n.as_bytes(), *v)).collect();
        let arr = self.cast(a, &DataType::Binary)?;
        let b = arr.as_binary::<i32>();
        for i in 0..b.len() {
            if b.is_null(i) && nullable {
                put(fallback);
                continue;
            }
            match by_name.get(b.value(i)) {
                Some(v) => put(*v),
                None => {
                    return Err(self.err(
                        i,
                        &format!(
                            "'{}' is not a name of the enum ({})",
                            String::from_utf8_lossy(b.value(i)),
                            allowed()
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    fn uuid(&self, a: &ArrayRef, out: &mut Vec<u8>) -> Result<()> {
        let mut put = |bytes: &[u8]| {
            let (hi, lo) = bytes.split_at(8);
            out.extend(hi.iter().rev());
            out.extend(lo.iter().rev());
        };
        match a.data_type() {
            DataType::FixedSizeBinary(16) => {
                let b: &FixedSizeBinaryArray = a.as_fixed_size_binary();
                for i in 0..b.len() {
                    put(if b.is_null(i) { &[0u8; 16] } else { b.value(i) });
                }
            }
            DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => {
                let s = self.cast(a, &DataType::Utf8)?;
                let s = s.as_string::<i32>();
                for i in 0..s.len() {
                    if s.is_null(i) {
                        put(&[0u8; 16]);
                        continue;
                    }
                    let hex: String = s.value(i).chars().filter(|c| *c != '-').collect();
                    let bytes = (0..16)
                        .map(|k| {
                            hex.get(2 * k..2 * k + 2)
                                .and_then(|h| u8::from_str_radix(h, 16).ok())
                        })
                        .collect::<Option<Vec<u8>>>()
                        .filter(|_| hex.len() == 32)
                        .ok_or_else(|| self.err(i, &format!("'{}' is not a UUID", s.value(i))))?;
                    put(&bytes);
                }
            }
            other => {
                return Err(Error::Config(format!(
                    "column {}: {other} cannot become UUID",
                    self.name
                )));
            }
        }
        Ok(())
    }
}

/// The default ClickHouse types for a batch's columns (see [`ChType::from_arrow`]).
pub fn default_types(fields: &[Arc<Field>]) -> Result<Vec<ChType>> {
    fields
        .iter()
        .map(|f| ChType::from_arrow(f.data_type(), f.is_nullable()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int32Array, StringArray};

    #[test]
    fn varuint() {
        let mut v = Vec::new();
        put_varuint(&mut v, 300);
        assert_eq!(v, vec![0xAC, 0x02]);
    }

    #[test]
    fn block_layout_of_a_small_batch() {
        let batch = RecordBatch::try_from_iter([
            ("id", Arc::new(Int32Array::from(vec![1, -2])) as ArrayRef),
            (
                "s",
                Arc::new(StringArray::from(vec![Some("ab"), None])) as ArrayRef,
            ),
        ])
        .unwrap();
        let types = vec![ChType::Int(32), ChType::Nullable(Box::new(ChType::String))];
        let b = encode_block(&batch, &types).unwrap();
        let mut want = vec![2, 2, 2, b'i', b'd', 5];
        want.extend_from_slice(b"Int32");
        want.extend_from_slice(&1i32.to_le_bytes());
        want.extend_from_slice(&(-2i32).to_le_bytes());
        want.push(1);
        want.push(b's');
        want.push(16);
        want.extend_from_slice(b"Nullable(String)");
        want.extend_from_slice(&[0, 1, 2, b'a', b'b', 0]);
        assert_eq!(b, want);
    }

    #[test]
    fn null_in_non_nullable_names_column_and_row() {
        let batch =
            RecordBatch::try_from_iter([("n", Arc::new(Int32Array::from(vec![Some(1), None])) as ArrayRef)])
                .unwrap();
        let e = encode_block(&batch, &[ChType::Int(32)]).unwrap_err().to_string();
        assert!(e.contains("column n row 2") && e.contains("not Nullable"), "{e}");
    }

    #[test]
    fn out_of_range_dates_are_errors() {
        let batch = RecordBatch::try_from_iter([(
            "d",
            Arc::new(arrow::array::Date32Array::from(vec![-1])) as ArrayRef,
        )])
        .unwrap();
        let e = encode_block(&batch, &[ChType::Date]).unwrap_err().to_string();
        assert!(e.contains("outside Date") && e.contains("row 1"), "{e}");
    }
}
