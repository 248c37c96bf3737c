//! Deterministic, seeded generation of realistic data sets (users, orders, events).
//!
//! Row `i` of a data set depends only on the seed and `i`, so any range of rows can be generated
//! independently: partitions and threads produce the same data as one sequential pass, and a
//! 100M-row file streams out in bounded memory.

pub mod write;

use std::sync::Arc;

use arrow::array::{
    ArrayRef, BooleanBuilder, Date32Builder, Decimal128Builder, Float64Builder, Int32Builder, Int64Builder,
    ListBuilder, RecordBatch, StringBuilder, StructArray, TimestampMicrosecondBuilder,
};
use arrow::datatypes::{DataType, Field, Fields, Schema, SchemaRef, TimeUnit};

use crate::error::{Error, Result};

/// The data sets `flumen gen` and `STORED AS GENERATE` know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dataset {
    /// Customers: id, name, email (some NULL), country, signup time, birth date, active flag.
    Users,
    /// Orders referencing users: time, status, city, Decimal(18,2) amount, quantity, notes.
    Orders,
    /// Click-stream events referencing users, with a nested payload.
    Events,
}

impl Dataset {
    /// All data set names.
    pub const NAMES: &'static [&'static str] = &["users", "orders", "events"];

    /// Parses a data set name.
    pub fn parse(name: &str) -> Result<Self> {
        match name.to_ascii_lowercase().as_str() {
            "users" => Ok(Self::Users),
            "orders" => Ok(Self::Orders),
            "events" => Ok(Self::Events),
            other => Err(Error::Config(format!(
                "unknown data set '{other}'; choose one of {}",
                Self::NAMES.join(", ")
            ))),
        }
    }
}

/// How nested values (the events payload) are represented.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nested {
    /// An Arrow struct with a list inside: for Parquet, NDJSON and Arrow consumers.
    Struct,
    /// The same document as JSON text: for CSV, which has no nested values.
    JsonText,
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenSpec {
    /// Which data set.
    pub dataset: Dataset,
    /// How many rows in all.
    pub rows: u64,
    /// Seed: the same seed gives the same data.
    pub seed: u64,
    /// How many distinct users exist; orders and events reference ids `1..=users`.
    pub users: u64,
    /// Representation of nested values.
    pub nested: Nested,
    /// Rows per generated batch.
    pub batch_rows: usize,
}

impl GenSpec {
    /// A spec with the defaults: seed 42, 1,000,000 users, struct payloads, 8192-row batches.
    pub fn new(dataset: Dataset, rows: u64) -> Self {
        Self {
            dataset,
            rows,
            seed: 42,
            users: 1_000_000,
            nested: Nested::Struct,
            batch_rows: 8192,
        }
    }

    /// The Arrow schema of the data set.
    pub fn schema(&self) -> SchemaRef {
        let ts = || DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
        let fields = match self.dataset {
            Dataset::Users => vec![
                Field::new("user_id", DataType::Int64, false),
                Field::new("name", DataType::Utf8, false),
                Field::new("email", DataType::Utf8, true),
                Field::new("country", DataType::Utf8, false),
                Field::new("signup_at", ts(), false),
                Field::new("birth_date", DataType::Date32, true),
                Field::new("is_active", DataType::Boolean, false),
            ],
            Dataset::Orders => vec![
                Field::new("order_id", DataType::Int64, false),
                Field::new("user_id", DataType::Int64, false),
                Field::new("created_at", ts(), false),
                Field::new("status", DataType::Utf8, false),
                Field::new("city", DataType::Utf8, false),
                Field::new("amount", DataType::Decimal128(18, 2), false),
                Field::new("quantity", DataType::Int32, false),
                Field::new("discount", DataType::Float64, true),
                Field::new("note", DataType::Utf8, true),
            ],
            Dataset::Events => vec![
                Field::new("event_id", DataType::Int64, false),
                Field::new("user_id", DataType::Int64, false),
                Field::new("ts", ts(), false),
                Field::new("kind", DataType::Utf8, false),
                Field::new(
                    "payload",
                    match self.nested {
                        Nested::Struct => DataType::Struct(payload_fields()),
                        Nested::JsonText => DataType::Utf8,
                    },
                    true,
                ),
            ],
        };
        Arc::new(Schema::new(fields))
    }

    /// Rows `start..start+len` of the data set (clipped to `rows`), as one batch.
    pub fn batch(&self, start: u64, len: usize) -> Result<RecordBatch> {
        let end = (start + len as u64).min(self.rows);
        let range = start.min(end)..end;
        let columns = match self.dataset {
            Dataset::Users => self.users_batch(range),
            Dataset::Orders => self.orders_batch(range),
            Dataset::Events => self.events_batch(range),
        };
        Ok(RecordBatch::try_new(self.schema(), columns)?)
    }

    fn rng(&self, row: u64) -> Rng {
        // The data set is part of the seed so that orders and events are not the same draws.
        let salt = (self.dataset as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03);
        Rng::new((self.seed ^ salt).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ row.wrapping_add(1))
    }

    fn user_ref(&self, rng: &mut Rng) -> i64 {
        // Skewed: a quarter of the references go to the first 1% of users.
        let n = self.users.max(1);
        let hot = (n / 100).max(1);
        (if rng.below(4) == 0 {
            rng.below(hot)
        } else {
            rng.below(n)
        }) as i64
            + 1
    }

    fn users_batch(&self, rows: std::ops::Range<u64>) -> Vec<ArrayRef> {
        let n = (rows.end - rows.start) as usize;
        let mut id = Int64Builder::with_capacity(n);
        let mut name = StringBuilder::with_capacity(n, n * 14);
        let mut email = StringBuilder::with_capacity(n, n * 24);
        let mut country = StringBuilder::with_capacity(n, n * 2);
        let mut signup = TimestampMicrosecondBuilder::with_capacity(n).with_timezone("UTC");
        let mut birth = Date32Builder::with_capacity(n);
        let mut active = BooleanBuilder::with_capacity(n);
        let mut buf = String::new();
        for row in rows {
            let mut r = self.rng(row);
            id.append_value(row as i64 + 1);
            let first = *r.pick(FIRST_NAMES);
            let last = *r.pick(LAST_NAMES);
            buf.clear();
            buf.push_str(first);
            buf.push(' ');
            buf.push_str(last);
            name.append_value(&buf);
            if r.below(20) == 0 {
                email.append_null();
            } else {
                buf.clear();
                for s in [first, ".", last] {
                    buf.extend(
                        s.chars()
                            .filter(char::is_ascii_alphanumeric)
                            .map(|c| c.to_ascii_lowercase()),
                    );
                }
                use std::fmt::Write;
                let _ = write!(buf, "{}@{}", row + 1, r.pick(DOMAINS));
                email.append_value(&buf);
            }
            country.append_value(r.pick(COUNTRIES));
            signup.append_value(TS_2015 + r.below(TS_SPAN_10Y) as i64);
            // 1940-01-01 .. 2007-12-31, so some birth dates are before 1970.
            if r.below(50) == 0 {
                birth.append_null();
            } else {
                birth.append_value(-10957 + r.below(24836) as i32);
            }
            active.append_value(r.below(10) != 0);
        }
        vec![
            Arc::new(id.finish()),
            Arc::new(name.finish()),
            Arc::new(email.finish()),
            Arc::new(country.finish()),
            Arc::new(signup.finish()),
            Arc::new(birth.finish()),
            Arc::new(active.finish()),
        ]
    }

    fn orders_batch(&self, rows: std::ops::Range<u64>) -> Vec<ArrayRef> {
        let n = (rows.end - rows.start) as usize;
        let mut id = Int64Builder::with_capacity(n);
        let mut user = Int64Builder::with_capacity(n);
        let mut created = TimestampMicrosecondBuilder::with_capacity(n).with_timezone("UTC");
        let mut status = StringBuilder::with_capacity(n, n * 8);
        let mut city = StringBuilder::with_capacity(n, n * 8);
        let mut amount = Decimal128Builder::with_capacity(n).with_data_type(DataType::Decimal128(18, 2));
        let mut qty = Int32Builder::with_capacity(n);
        let mut discount = Float64Builder::with_capacity(n);
        let mut note = StringBuilder::with_capacity(n, n * 4);
        for row in rows {
            let mut r = self.rng(row);
            id.append_value(row as i64 + 1);
            user.append_value(self.user_ref(&mut r));
            created.append_value(TS_2020 + r.below(TS_SPAN_6Y) as i64);
            status.append_value(r.pick_weighted(STATUSES));
            city.append_value(r.pick(CITIES));
            // Mostly small baskets, a long tail up to 9,999.99.
            let cents = if r.below(10) == 0 {
                100 + r.below(999_900)
            } else {
                100 + r.below(19_900)
            };
            amount.append_value(cents as i128);
            let max_qty = if r.below(8) == 0 { 50 } else { 5 };
            qty.append_value(1 + r.below(max_qty) as i32);
            if r.below(3) == 0 {
                discount.append_value(f64::from(1 + r.below(30) as u32) / 100.0);
            } else {
                discount.append_null();
            }
            if r.below(10) == 0 {
                note.append_value(r.pick(NOTES));
            } else {
                note.append_null();
            }
        }
        vec![
            Arc::new(id.finish()),
            Arc::new(user.finish()),
            Arc::new(created.finish()),
            Arc::new(status.finish()),
            Arc::new(city.finish()),
            Arc::new(amount.finish()),
            Arc::new(qty.finish()),
            Arc::new(discount.finish()),
            Arc::new(note.finish()),
        ]
    }

    fn events_batch(&self, rows: std::ops::Range<u64>) -> Vec<ArrayRef> {
        let n = (rows.end - rows.start) as usize;
        let mut id = Int64Builder::with_capacity(n);
        let mut user = Int64Builder::with_capacity(n);
        let mut ts = TimestampMicrosecondBuilder::with_capacity(n).with_timezone("UTC");
        let mut kind = StringBuilder::with_capacity(n, n * 8);
        let mut page = StringBuilder::with_capacity(n, n * 10);
        let mut dur = Int64Builder::with_capacity(n);
        let mut tags = ListBuilder::new(StringBuilder::new());
        let mut text = StringBuilder::with_capacity(n, n * 64);
        let mut valid = Vec::with_capacity(n);
        for row in rows {
            let mut r = self.rng(row);
            id.append_value(row as i64 + 1);
            user.append_value(self.user_ref(&mut r));
            // 2038-01-19 is inside the range: timestamps past the 32-bit epoch limit occur.
            ts.append_value(TS_2035 + r.below(TS_SPAN_6Y) as i64);
            kind.append_value(r.pick_weighted(EVENT_KINDS));
            let present = r.below(25) != 0;
            valid.push(present);
            let p = *r.pick(PAGES);
            let d = r.below(120_000) as i64;
            let ntags = r.below(4) as usize;
            let picked: Vec<&str> = (0..ntags).map(|_| *r.pick(TAGS)).collect();
            match (self.nested, present) {
                (Nested::Struct, true) => {
                    page.append_value(p);
                    dur.append_value(d);
                    for t in &picked {
                        tags.values().append_value(t);
                    }
                    tags.append(true);
                }
                (Nested::Struct, false) => {
                    page.append_null();
                    dur.append_null();
                    tags.append(false);
                }
                (Nested::JsonText, true) => {
                    let doc = serde_json::json!({"page": p, "duration_ms": d, "tags": picked});
                    text.append_value(doc.to_string());
                }
                (Nested::JsonText, false) => text.append_null(),
            }
        }
        let payload: ArrayRef = match self.nested {
            Nested::Struct => Arc::new(StructArray::new(
                payload_fields(),
                vec![
                    Arc::new(page.finish()),
                    Arc::new(dur.finish()),
                    Arc::new(tags.finish()),
                ],
                Some(valid.into()),
            )),
            Nested::JsonText => Arc::new(text.finish()),
        };
        vec![
            Arc::new(id.finish()),
            Arc::new(user.finish()),
            Arc::new(ts.finish()),
            Arc::new(kind.finish()),
            payload,
        ]
    }
}

fn payload_fields() -> Fields {
    Fields::from(vec![
        Field::new("page", DataType::Utf8, true),
        Field::new("duration_ms", DataType::Int64, true),
        Field::new(
            "tags",
            DataType::List(Arc::new(Field::new("item", DataType::Utf8, true))),
            true,
        ),
    ])
}

const TS_2015: i64 = 1_420_070_400_000_000;
const TS_2020: i64 = 1_577_836_800_000_000;
const TS_2035: i64 = 2_051_222_400_000_000;
const TS_SPAN_6Y: u64 = 6 * 365 * 86_400 * 1_000_000;
const TS_SPAN_10Y: u64 = 10 * 365 * 86_400 * 1_000_000;

const FIRST_NAMES: &[&str] = &[
    "Ana", "Ben", "Chloé", "Dmitri", "Emma", "Farid", "Grace", "Hiro", "Inès", "Jonas", "Kofi", "Lena",
    "Mateo", "Nadia", "Oskar", "Priya", "Quentin", "Rosa", "Sven", "Tomás", "Uma", "Viktor", "Wen", "Yara",
    "Zoë",
];
const LAST_NAMES: &[&str] = &[
    "Smith", "Müller", "García", "Rossi", "Kowalski", "Nguyen", "O'Brien", "Tanaka", "Silva", "Dubois",
    "Jensen", "Novák", "Ivanova", "Cohen", "Okafor", "Larsen", "Schmidt", "Haddad", "Kim", "Costa",
];
const DOMAINS: &[&str] = &["example.com", "mail.test", "post.example.org", "inbox.test"];
const COUNTRIES: &[&str] = &[
    "US", "DE", "FR", "GB", "BR", "IN", "JP", "CN", "ES", "IT", "PL", "NL", "SE", "NG", "MX", "CA",
];
const CITIES: &[&str] = &[
    "New York",
    "Berlin",
    "Paris",
    "London",
    "São Paulo",
    "Mumbai",
    "東京",
    "Shanghai",
    "Madrid",
    "Milano",
    "Kraków",
    "Amsterdam",
    "Zürich",
    "Lagos",
    "Ciudad de México",
    "Toronto",
    "Chicago",
    "Lyon",
    "Osaka",
    "Seattle",
];
const STATUSES: &[(&str, u32)] = &[
    ("delivered", 70),
    ("shipped", 12),
    ("pending", 8),
    ("cancelled", 6),
    ("returned", 4),
];
const NOTES: &[&str] = &[
    "leave at the door",
    "gift wrap, please",
    "call \"before\" delivery",
    "fragile; handle with care",
    "ring twice, then wait",
    "Lieferung an Nachbarn möglich",
    "",
];
const EVENT_KINDS: &[(&str, u32)] = &[
    ("view", 60),
    ("click", 25),
    ("add_to_cart", 8),
    ("purchase", 4),
    ("error", 3),
];
const PAGES: &[&str] = &[
    "/",
    "/search",
    "/product",
    "/cart",
    "/checkout",
    "/account",
    "/help",
];
const TAGS: &[&str] = &["mobile", "desktop", "promo", "returning", "new", "beta"];

/// SplitMix64: tiny, fast, and stable across versions (unlike `StdRng`), so seeds keep meaning.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        let mut r = Rng(seed);
        r.next_u64();
        r
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n` > 0), without modulo bias worth measuring.
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }

    fn pick_weighted<'a>(&mut self, items: &'a [(&'a str, u32)]) -> &'a str {
        let total: u32 = items.iter().map(|(_, w)| w).sum();
        let mut x = self.below(u64::from(total)) as u32;
        for (item, w) in items {
            if x < *w {
                return item;
            }
            x -= w;
        }
        items[items.len() - 1].0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::Int64Type;

    #[test]
    fn same_seed_same_rows_whatever_the_split() {
        let spec = GenSpec::new(Dataset::Orders, 1000);
        let whole = spec.batch(0, 1000).unwrap();
        let a = spec.batch(0, 400).unwrap();
        let b = spec.batch(400, 600).unwrap();
        let joined = arrow::compute::concat_batches(&whole.schema(), [&a, &b]).unwrap();
        assert_eq!(whole, joined);
    }

    #[test]
    fn other_seed_other_rows() {
        let a = GenSpec::new(Dataset::Users, 100).batch(0, 100).unwrap();
        let mut spec = GenSpec::new(Dataset::Users, 100);
        spec.seed = 7;
        assert_ne!(a, spec.batch(0, 100).unwrap());
    }

    #[test]
    fn batches_are_clipped_to_row_count() {
        let spec = GenSpec::new(Dataset::Events, 10);
        assert_eq!(spec.batch(8, 100).unwrap().num_rows(), 2);
        assert_eq!(spec.batch(20, 100).unwrap().num_rows(), 0);
    }

    #[test]
    fn user_references_stay_in_range_and_nulls_occur() {
        let mut spec = GenSpec::new(Dataset::Orders, 5000);
        spec.users = 50;
        let b = spec.batch(0, 5000).unwrap();
        let users = b.column(1).as_primitive::<Int64Type>();
        assert!(users.iter().all(|u| matches!(u, Some(1..=50))));
        assert!(b.column(7).null_count() > 0, "discount has NULLs");
        assert!(b.column(8).null_count() > 0, "note has NULLs");
    }

    #[test]
    fn events_payload_as_struct_or_json_text() {
        let mut spec = GenSpec::new(Dataset::Events, 200);
        let b = spec.batch(0, 200).unwrap();
        assert!(matches!(b.schema().field(4).data_type(), DataType::Struct(_)));
        spec.nested = Nested::JsonText;
        let b = spec.batch(0, 200).unwrap();
        let text = b.column(4).as_string::<i32>();
        let first = text.iter().flatten().next().unwrap();
        let doc: serde_json::Value = serde_json::from_str(first).unwrap();
        assert!(doc["tags"].is_array() && doc["page"].is_string(), "{doc}");
    }

    #[test]
    fn rng_below_is_in_range() {
        let mut r = Rng::new(1);
        assert!((0..10_000).all(|_| r.below(7) < 7));
    }
}
