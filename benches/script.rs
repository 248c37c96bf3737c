//! Micro-benchmarks of script handling: splitting and `${VAR}` substitution of a large script.

use std::collections::HashMap;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use flumen::engine::Variables;
use flumen::engine::script::split;

fn script_handling(c: &mut Criterion) {
    let one = "CREATE EXTERNAL TABLE t_${N} STORED AS CSV LOCATION '${DATA}/x.csv' OPTIONS ('has_header' 'true');\n\
               -- a comment; with a semicolon\n\
               INSERT INTO sink SELECT a, 'it''s; fine', b FROM t_${N} WHERE c > ${LIMIT:-10};\n";
    let script = one.repeat(1000);
    let vars = Variables::isolated(HashMap::from([
        ("N".to_string(), "7".to_string()),
        ("DATA".to_string(), "/data".to_string()),
    ]));
    let mut g = c.benchmark_group("script");
    g.throughput(Throughput::Bytes(script.len() as u64));
    g.bench_function("split_2000_statements", |b| b.iter(|| split(&script)));
    g.bench_function("substitute_2000_statements", |b| {
        b.iter(|| vars.substitute(&script, 1, |_, _| {}))
    });
    g.finish();
}

criterion_group!(benches, script_handling);
criterion_main!(benches);
