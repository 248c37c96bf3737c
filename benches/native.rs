//! The ClickHouse Native codec alone, one core: MB of Native produced per second by the Arrow →
//! Native encoder, MB consumed per second by the Native → Arrow decoder, and LZ4 framing.

use std::sync::Arc;

use arrow::datatypes::{Field, Schema};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use flumen::connector::clickhouse::compress::{Method, compress};
use flumen::connector::clickhouse::decode::BlockReader;
use flumen::connector::clickhouse::native::{default_types, encode_block};
use flumen::datagen::{Dataset, GenSpec};

fn codec(c: &mut Criterion) {
    let mut g = c.benchmark_group("native_100k");
    for (name, ds) in [("orders", Dataset::Orders), ("events", Dataset::Events)] {
        let batch = GenSpec::new(ds, 100_000)
            .batch(0, 100_000)
            .expect("generated batch");
        let types = default_types(batch.schema().fields()).expect("types");
        let block = encode_block(&batch, &types).expect("encodes");
        g.throughput(Throughput::Bytes(block.len() as u64));
        g.bench_function(format!("encode_{name}"), |b| {
            b.iter(|| encode_block(&batch, &types))
        });
        let schema = Arc::new(Schema::new(
            batch
                .schema()
                .fields()
                .iter()
                .zip(&types)
                .map(|(f, t)| {
                    let (dt, nullable) = t.to_arrow();
                    Field::new(f.name(), dt, nullable)
                })
                .collect::<Vec<_>>(),
        ));
        g.bench_function(format!("decode_{name}"), |b| {
            b.iter(|| {
                BlockReader::new(&block[..], Arc::clone(&schema))
                    .next_batch()
                    .expect("decodes")
            })
        });
        g.bench_function(format!("lz4_{name}"), |b| {
            b.iter(|| compress(&block, Method::Lz4))
        });
    }
    g.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
