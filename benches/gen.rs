//! Micro-benchmarks of the data generator: rows per second per core, by data set, and the
//! cost of encoding generated rows as CSV and Parquet.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use flumen::datagen::write::{FileFormat, write_to};
use flumen::datagen::{Dataset, GenSpec, Nested};

fn generate(c: &mut Criterion) {
    let mut g = c.benchmark_group("generate_batch_8192");
    g.throughput(Throughput::Elements(8192));
    for (name, ds) in [
        ("users", Dataset::Users),
        ("orders", Dataset::Orders),
        ("events", Dataset::Events),
    ] {
        let spec = GenSpec::new(ds, 1 << 40);
        let mut start = 0u64;
        g.bench_function(name, |b| {
            b.iter(|| {
                start = (start + 8192) % (1 << 30);
                spec.batch(start, 8192)
            })
        });
    }
    g.finish();
}

fn write(c: &mut Criterion) {
    let rows = 100_000u64;
    let mut g = c.benchmark_group("write_orders_100k");
    g.throughput(Throughput::Elements(rows));
    g.sample_size(10);
    for (name, format) in [
        ("csv", FileFormat::Csv),
        ("json", FileFormat::Json),
        ("parquet", FileFormat::Parquet),
    ] {
        let mut spec = GenSpec::new(Dataset::Orders, rows);
        spec.nested = Nested::JsonText;
        g.bench_function(name, |b| b.iter(|| write_to(&spec, format, std::io::sink())));
    }
    g.finish();
}

criterion_group!(benches, generate, write);
criterion_main!(benches);
