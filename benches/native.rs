//! The Arrow → ClickHouse Native encoder alone: MB of Native produced per second on one core.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use flumen::connector::clickhouse::native::{default_types, encode_block};
use flumen::datagen::{Dataset, GenSpec};

fn encode(c: &mut Criterion) {
    let mut g = c.benchmark_group("native_encode_100k");
    for (name, ds) in [("orders", Dataset::Orders), ("events", Dataset::Events)] {
        let batch = GenSpec::new(ds, 100_000)
            .batch(0, 100_000)
            .expect("generated batch");
        let types = default_types(batch.schema().fields()).expect("types");
        let size = encode_block(&batch, &types).expect("encodes").len();
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_function(name, |b| b.iter(|| encode_block(&batch, &types)));
    }
    g.finish();
}

criterion_group!(benches, encode);
criterion_main!(benches);
