//! flumen's Arrow → Native encoder, checked by the real ClickHouse engine: each Native file is
//! read back by chdb (ClickHouse 26.9 in-process, installed by `tests/services/start.sh`).

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;

use arrow::array::*;
use arrow::datatypes::{DataType, Field, Fields, i256};
use flumen::connector::clickhouse::native::{default_types, encode_block};
use flumen::connector::clickhouse::types::ChType;

fn python() -> PathBuf {
    let dir = std::env::var_os("FLUMEN_SERVICES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache/flumen-services"));
    dir.join("venv/bin/python")
}

/// (DESCRIBE lines, rows as TSV) of a Native file, as ClickHouse reads it.
fn clickhouse_reads(block: &[u8]) -> (String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("block.native");
    std::fs::write(&path, block).unwrap();
    let py = python();
    assert!(
        py.exists(),
        "{} is missing: run `bash tests/services/start.sh` to install chdb",
        py.display()
    );
    let out = Command::new(py)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/services/chdb_read.py"
        ))
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "chdb failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let (desc, rows) = text.split_once("\n--\n").unwrap_or((&text, ""));
    // TabSeparated escapes quotes in the type names; rows end with a newline.
    (desc.replace("\\'", "'"), rows.trim_end_matches('\n').to_string())
}

#[test]
fn scalar_types_with_extremes_nulls_and_unicode() {
    let batch = RecordBatch::try_from_iter([
        (
            "i8",
            Arc::new(Int8Array::from(vec![i8::MIN, i8::MAX])) as ArrayRef,
        ),
        (
            "i16",
            Arc::new(Int16Array::from(vec![i16::MIN, i16::MAX])) as ArrayRef,
        ),
        (
            "i32",
            Arc::new(Int32Array::from(vec![i32::MIN, i32::MAX])) as ArrayRef,
        ),
        (
            "i64",
            Arc::new(Int64Array::from(vec![i64::MIN, i64::MAX])) as ArrayRef,
        ),
        ("u8", Arc::new(UInt8Array::from(vec![0, u8::MAX])) as ArrayRef),
        ("u16", Arc::new(UInt16Array::from(vec![0, u16::MAX])) as ArrayRef),
        ("u32", Arc::new(UInt32Array::from(vec![0, u32::MAX])) as ArrayRef),
        ("u64", Arc::new(UInt64Array::from(vec![0, u64::MAX])) as ArrayRef),
        ("f32", Arc::new(Float32Array::from(vec![1.5, -0.25])) as ArrayRef),
        (
            "f64",
            Arc::new(Float64Array::from(vec![Some(1e300), None])) as ArrayRef,
        ),
        (
            "s",
            Arc::new(StringArray::from(vec![Some("héllo 東京 \"q\"\ttab"), None])) as ArrayRef,
        ),
        ("empty", Arc::new(StringArray::from(vec!["", "x"])) as ArrayRef),
        ("b", Arc::new(BooleanArray::from(vec![true, false])) as ArrayRef),
        ("d", Arc::new(Date32Array::from(vec![-25567, 65536])) as ArrayRef),
    ])
    .unwrap();
    let mut types = default_types(batch.schema().fields()).unwrap();
    // from_iter marks every column nullable; keep non-Nullable where there is no NULL.
    for (t, f) in types.iter_mut().zip(batch.schema().fields()) {
        if batch.column_by_name(f.name()).unwrap().null_count() == 0
            && let ChType::Nullable(inner) = t.clone()
        {
            *t = *inner;
        }
    }
    let (desc, rows) = clickhouse_reads(&encode_block(&batch, &types).unwrap());
    assert_eq!(
        desc,
        "i8\tInt8\ni16\tInt16\ni32\tInt32\ni64\tInt64\nu8\tUInt8\nu16\tUInt16\nu32\tUInt32\nu64\tUInt64\n\
         f32\tFloat32\nf64\tNullable(Float64)\ns\tNullable(String)\nempty\tString\nb\tBool\nd\tDate32"
    );
    assert_eq!(
        rows,
        "-128\t-32768\t-2147483648\t-9223372036854775808\t0\t0\t0\t0\t1.5\t1e300\théllo 東京 \"q\"\\ttab\t\ttrue\t1900-01-01\n\
         127\t32767\t2147483647\t9223372036854775807\t255\t65535\t4294967295\t18446744073709551615\t-0.25\t\\N\t\\N\tx\tfalse\t2149-06-07"
    );
}

#[test]
fn decimals_timestamps_and_uuid() {
    let dec18 = Decimal128Array::from(vec![1_234_567i128, -1])
        .with_precision_and_scale(18, 2)
        .unwrap();
    let dec38 = Decimal128Array::from(vec![10i128.pow(37) - 1, -(10i128.pow(37) - 1)])
        .with_precision_and_scale(38, 10)
        .unwrap();
    let dec76 = Decimal256Array::from(vec![
        i256::from_i128(10i128.pow(30)) * i256::from_i128(10i128.pow(20)),
        i256::from_i128(-5),
    ])
    .with_precision_and_scale(76, 5)
    .unwrap();
    // 1969-12-31 23:59:59.000001 and 2039-09-18 23:06:40.123456: before 1970 and after 2038.
    let ts = TimestampMicrosecondArray::from(vec![-999_999i64, 2_200_000_000_123_456]).with_timezone("UTC");
    let ts_ms = TimestampMillisecondArray::from(vec![0i64, 1_700_000_000_123]).with_timezone("Asia/Tokyo");
    let uuid = StringArray::from(vec![
        "61f0c404-5cb3-11e7-907b-a6006ad3dba0",
        "00000000-0000-0000-0000-000000000001",
    ]);
    let batch = RecordBatch::try_from_iter([
        ("dec18", Arc::new(dec18) as ArrayRef),
        ("dec38", Arc::new(dec38) as ArrayRef),
        ("dec76", Arc::new(dec76) as ArrayRef),
        ("ts", Arc::new(ts) as ArrayRef),
        ("ts_ms", Arc::new(ts_ms) as ArrayRef),
        (
            "dt",
            Arc::new(TimestampSecondArray::from(vec![0i64, 4_294_967_295])) as ArrayRef,
        ),
        ("id", Arc::new(uuid) as ArrayRef),
    ])
    .unwrap();
    let types = vec![
        ChType::Decimal(18, 2),
        ChType::Decimal(38, 10),
        ChType::Decimal(76, 5),
        ChType::DateTime64(6, Some("UTC".into())),
        ChType::DateTime64(3, Some("Asia/Tokyo".into())),
        ChType::DateTime(Some("UTC".into())),
        ChType::Uuid,
    ];
    let (desc, rows) = clickhouse_reads(&encode_block(&batch, &types).unwrap());
    assert_eq!(
        desc,
        "dec18\tDecimal(18, 2)\ndec38\tDecimal(38, 10)\ndec76\tDecimal(76, 5)\nts\tDateTime64(6, 'UTC')\n\
         ts_ms\tDateTime64(3, 'Asia/Tokyo')\ndt\tDateTime('UTC')\nid\tUUID"
    );
    assert_eq!(
        rows,
        "12345.67\t999999999999999999999999999.9999999999\t1000000000000000000000000000000000000000000000\t\
         1969-12-31 23:59:59.000001\t1970-01-01 09:00:00.000\t1970-01-01 00:00:00\t61f0c404-5cb3-11e7-907b-a6006ad3dba0\n\
         -0.01\t-999999999999999999999999999.9999999999\t-0.00005\t2039-09-18 23:06:40.123456\t\
         2023-11-15 07:13:20.123\t2106-02-07 06:28:15\t00000000-0000-0000-0000-000000000001"
    );
}

#[test]
fn arrays_tuples_and_maps_with_nulls() {
    let mut lists = ListBuilder::new(Int32Builder::new());
    lists.append_value([Some(1), None, Some(3)]);
    lists.append_null();
    lists.append_value(Vec::<Option<i32>>::new());
    let lists = lists.finish();
    let mut nested = ListBuilder::new(ListBuilder::new(StringBuilder::new()));
    nested.append_value([Some(vec![Some("a"), Some("")]), Some(vec![])]);
    nested.append_value([Some(vec![Some("東京")])]);
    nested.append_value(Vec::<Option<Vec<Option<&str>>>>::new());
    let nested = nested.finish();
    let strukt = StructArray::new(
        Fields::from(vec![
            Field::new("n", DataType::Int64, false),
            Field::new("s", DataType::Utf8, true),
        ]),
        vec![
            Arc::new(Int64Array::from(vec![1, 2, 3])) as ArrayRef,
            Arc::new(StringArray::from(vec![Some("x"), None, Some("z")])) as ArrayRef,
        ],
        None,
    );
    let mut map = MapBuilder::new(None, StringBuilder::new(), Int64Builder::new());
    map.keys().append_value("k1");
    map.values().append_value(10);
    map.keys().append_value("k2");
    map.values().append_null();
    map.append(true).unwrap();
    map.append(true).unwrap();
    map.keys().append_value("only");
    map.values().append_value(-1);
    map.append(true).unwrap();
    let map = map.finish();
    let batch = RecordBatch::try_from_iter([
        ("list", Arc::new(lists) as ArrayRef),
        ("nested", Arc::new(nested) as ArrayRef),
        ("t", Arc::new(strukt) as ArrayRef),
        ("m", Arc::new(map) as ArrayRef),
    ])
    .unwrap();
    let types = default_types(batch.schema().fields()).unwrap();
    let (desc, rows) = clickhouse_reads(&encode_block(&batch, &types).unwrap());
    assert_eq!(
        desc,
        "list\tArray(Nullable(Int32))\nnested\tArray(Array(Nullable(String)))\nt\tTuple(\\n    n Int64,\\n    s Nullable(String))\n\
         m\tMap(String, Nullable(Int64))"
    );
    assert_eq!(
        rows,
        "[1,NULL,3]\t[['a',''],[]]\t(1,'x')\t{'k1':10,'k2':NULL}\n\
         []\t[['東京']]\t(2,NULL)\t{}\n\
         []\t[]\t(3,'z')\t{'only':-1}"
    );
}

#[test]
fn low_cardinality_wide_integers_and_enums_read_by_clickhouse() {
    let words: ArrayRef = Arc::new(StringArray::from(vec![
        Some("東京"),
        None,
        Some(""),
        Some("東京"),
    ]));
    let dict: ArrayRef = Arc::new(
        vec![Some("x"), Some("y"), Some("x"), None]
            .into_iter()
            .collect::<DictionaryArray<arrow::datatypes::Int8Type>>(),
    );
    let mut tags = ListBuilder::new(StringBuilder::new());
    tags.append_value([Some("a"), Some("b")]);
    tags.append_value([Some("a")]);
    tags.append_value(Vec::<Option<&str>>::new());
    tags.append_value([Some("c")]);
    let wide = Decimal256Array::from(vec![
        i256::from_i128(i128::MAX) * i256::from_i128(4),
        i256::ZERO,
        i256::from_i128(1),
        i256::from_i128(-7),
    ])
    .with_precision_and_scale(76, 0)
    .unwrap();
    let batch = RecordBatch::try_from_iter([
        ("lc", Arc::clone(&words)),
        ("dict", dict),
        ("tags", Arc::new(tags.finish()) as ArrayRef),
        (
            "i128",
            Arc::new(
                Decimal128Array::from(vec![i128::MIN, i128::MAX, 0, -1])
                    .with_precision_and_scale(38, 0)
                    .unwrap(),
            ) as ArrayRef,
        ),
        ("i256", Arc::new(wide) as ArrayRef),
        (
            "u128",
            Arc::new(UInt64Array::from(vec![u64::MAX, 0, 1, 2])) as ArrayRef,
        ),
        (
            "e",
            Arc::new(StringArray::from(vec!["lo", "hi", "hi", "lo"])) as ArrayRef,
        ),
    ])
    .unwrap();
    let types: Vec<ChType> = [
        "LowCardinality(Nullable(String))",
        "LowCardinality(Nullable(String))",
        "Array(LowCardinality(String))",
        "Int128",
        "Int256",
        "UInt128",
        "Enum16('lo' = -1000, 'hi' = 1000)",
    ]
    .iter()
    .map(|t| ChType::parse(t).unwrap())
    .collect();
    let (desc, rows) = clickhouse_reads(&encode_block(&batch, &types).unwrap());
    assert_eq!(
        desc,
        "lc\tLowCardinality(Nullable(String))\ndict\tLowCardinality(Nullable(String))\n\
         tags\tArray(LowCardinality(String))\ni128\tInt128\ni256\tInt256\nu128\tUInt128\n\
         e\tEnum16('lo' = -1000, 'hi' = 1000)"
    );
    assert_eq!(
        rows,
        "東京\tx\t['a','b']\t-170141183460469231731687303715884105728\t680564733841876926926749214863536422908\t18446744073709551615\tlo\n\
         \\N\ty\t['a']\t170141183460469231731687303715884105727\t0\t0\thi\n\
         \tx\t[]\t0\t1\t1\thi\n\
         東京\t\\N\t['c']\t-1\t-7\t2\tlo"
    );
}

/// A Native file ClickHouse itself writes (chdb `FORMAT Native`).
fn clickhouse_writes(query: &str) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("answer.native");
    let out = Command::new(python())
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/services/chdb_read.py"
        ))
        .args(["--write", path.to_str().unwrap(), query])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "chdb failed (run `bash tests/services/start.sh`): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read(path).unwrap()
}

#[test]
fn blocks_clickhouse_writes_decode_to_the_same_values() {
    use arrow::util::display::array_value_to_string;
    use flumen::connector::clickhouse::decode::BlockReader;
    let columns = [
        ("n", "UInt64", "number"),
        (
            "lc",
            "LowCardinality(Nullable(String))",
            "toLowCardinality(if(number = 1, NULL, toString(number % 2)))",
        ),
        (
            "tags",
            "Array(LowCardinality(String))",
            "[toLowCardinality('x'), 'y']",
        ),
        (
            "i128",
            "Int128",
            "if(number = 0, toInt128('-170141183460469231731687303715884105728'), toInt128(number))",
        ),
        ("i256", "Int256", "toInt256(-1) * toInt256(number)"),
        (
            "u256",
            "UInt256",
            "toUInt256(number) * toUInt256('1000000000000000000000000000000')",
        ),
        (
            "d256",
            "Decimal(76, 9)",
            "toDecimal256('-12345678901234567890.123456789', 9)",
        ),
        ("b", "Bool", "number % 2 = 0"),
        ("d32", "Date32", "toDate32('1900-01-01') + number"),
        (
            "t64",
            "DateTime64(6, 'UTC')",
            "toDateTime64('1960-01-01 00:00:00.123456', 6, 'UTC')",
        ),
        (
            "m",
            "Map(String, Nullable(UInt64))",
            "map('k', if(number = 2, NULL, number))",
        ),
        (
            "e",
            "Enum16('lo' = -1000, 'hi' = 1000)",
            "CAST(if(number = 0, 'lo', 'hi') AS Enum16('lo' = -1000, 'hi' = 1000))",
        ),
        ("u", "UUID", "toUUID('61f0c404-5cb3-11e7-907b-a6006ad3dba0')"),
        ("fs", "FixedString(4)", "toFixedString('ab', 4)"),
        (
            "tup",
            "Tuple(a UInt64, b String)",
            "CAST((number, 'x') AS Tuple(a UInt64, b String))",
        ),
    ];
    let select: Vec<String> = columns.iter().map(|(n, _, e)| format!("{e} AS {n}")).collect();
    let bytes = clickhouse_writes(&format!("SELECT {} FROM numbers(3)", select.join(", ")));
    let fields: Vec<Field> = columns
        .iter()
        .map(|(n, t, _)| {
            let (dt, nullable) = ChType::parse(t).unwrap().to_arrow();
            Field::new(*n, dt, nullable)
        })
        .collect();
    let mut reader = BlockReader::new(&bytes[..], Arc::new(arrow::datatypes::Schema::new(fields)));
    let batch = reader.next_batch().unwrap().unwrap();
    assert!(reader.next_batch().unwrap().is_none());
    let rows: Vec<String> = (0..batch.num_rows())
        .map(|r| {
            batch
                .columns()
                .iter()
                .map(|c| {
                    if c.is_null(r) {
                        "NULL".to_string()
                    } else {
                        array_value_to_string(c, r).unwrap()
                    }
                })
                .collect::<Vec<_>>()
                .join("|")
        })
        .collect();
    assert_eq!(
        rows,
        vec![
            "0|0|[x, y]|-170141183460469231731687303715884105728|0|0|-12345678901234567890.123456789|true|1900-01-01|\
             1960-01-01T00:00:00.123456Z|{k: 0}|lo|61f0c404-5cb3-11e7-907b-a6006ad3dba0|ab|{a: 0, b: x}",
            "1|NULL|[x, y]|1|-1|1000000000000000000000000000000|-12345678901234567890.123456789|false|1900-01-02|\
             1960-01-01T00:00:00.123456Z|{k: 1}|hi|61f0c404-5cb3-11e7-907b-a6006ad3dba0|ab|{a: 1, b: x}",
            "2|0|[x, y]|2|-2|2000000000000000000000000000000|-12345678901234567890.123456789|true|1900-01-03|\
             1960-01-01T00:00:00.123456Z|{k: }|hi|61f0c404-5cb3-11e7-907b-a6006ad3dba0|ab|{a: 2, b: x}",
        ]
    );
}
