//! Throughput of the coordinator's per-round math: the sample-weighted mean of the client
//! updates of a shard, the plain server step and the decoding of a dense upload, next to a
//! memory copy of the same bytes.
//!
//! Run with `cargo bench -p fedcompress-core --bench aggregate`. Throughput is in bytes of f32
//! updates read (clients × elements × 4), except for the server step and the decoding, whose
//! figure is the bytes of one shard's f32 values (elements × 4).

use std::hint::black_box;
use std::ops::Range;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use fedcompress_core::{
    AggregationRule, Mask, ServerState, ServerStep, UpdateEncoding, WeightedUpdate,
    aggregate_shard, codec,
};

/// Elements of one shard: the coordinator's default `max_shard_elems`.
const SHARD_ELEMS: usize = 1 << 20;

/// Shards of a 64 Mi-parameter (256 MB) model.
const MODEL_SHARDS: usize = 64;

/// Deterministic, finite update values in [-1, 1) that differ per client.
fn update_values(client: usize, len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((i * 7919 + client * 104_729) % 2001) as f32 * 1e-3 - 1.0)
        .collect()
}

/// Builds one weighted update per client from `deltas`, restricted to `range`, with distinct
/// weights.
fn weighted_range(deltas: &[Vec<f32>], range: Range<usize>) -> Vec<WeightedUpdate<'_>> {
    deltas
        .iter()
        .enumerate()
        .map(|(client, delta)| WeightedUpdate {
            client: client as u32,
            weight: 100 + client as u64,
            delta: &delta[range.clone()],
        })
        .collect()
}

/// Benchmarks one shard of 1 Mi elements: the mean of 3 and of 10 client updates next to a copy
/// of as many bytes, the decoding of one dense update and the plain server step.
fn shard(c: &mut Criterion) {
    let mut group = c.benchmark_group("shard_1mi");
    for clients in [3usize, 10] {
        let deltas: Vec<Vec<f32>> = (0..clients)
            .map(|client| update_values(client, SHARD_ELEMS))
            .collect();
        let updates = weighted_range(&deltas, 0..SHARD_ELEMS);
        let bytes = (clients * SHARD_ELEMS * 4) as u64;
        group.throughput(Throughput::Bytes(bytes));

        group.bench_function(BenchmarkId::new("aggregate_mean", clients), |b| {
            b.iter(|| aggregate_shard(AggregationRule::Mean, black_box(&updates), SHARD_ELEMS))
        });

        let source = vec![0.5f32; clients * SHARD_ELEMS];
        let mut target = vec![0.0f32; clients * SHARD_ELEMS];
        group.bench_function(BenchmarkId::new("memcpy", clients), |b| {
            b.iter(|| target.copy_from_slice(black_box(&source)))
        });
    }

    // The coordinator decodes every uploaded shard before it aggregates. An uncompressed
    // update is dense, under a mask that keeps every element.
    let mut encoded = Vec::new();
    codec::put_f32s(&mut encoded, update_values(0, SHARD_ELEMS));
    let mask = Mask::all_kept(SHARD_ELEMS);
    let keep = |i: usize| mask.get(i);
    group.throughput(Throughput::Bytes((SHARD_ELEMS * 4) as u64));
    group.bench_function("decode_update_dense", |b| {
        b.iter(|| {
            codec::decode_update(
                UpdateEncoding::Dense,
                black_box(&encoded),
                SHARD_ELEMS,
                Some(&keep),
            )
        })
    });

    let mut params = update_values(0, SHARD_ELEMS);
    let aggregate: Vec<f64> = vec![1e-6; SHARD_ELEMS];
    let mut state = ServerState::default();
    let step = ServerStep::Plain { lr: 1.0 };
    group.throughput(Throughput::Bytes((SHARD_ELEMS * 4) as u64));
    group.bench_function("server_step_plain", |b| {
        b.iter(|| {
            step.apply(
                &mut params,
                0,
                black_box(&aggregate),
                &mut state,
                SHARD_ELEMS,
            )
        })
    });
    group.finish();
}

/// Benchmarks a whole 64 Mi-parameter model from 3 clients, shard by shard as the round engine does it:
/// the mean, then the plain server step. Its buffers do not fit in any cache.
fn model(c: &mut Criterion) {
    const CLIENTS: usize = 3;
    let total = MODEL_SHARDS * SHARD_ELEMS;
    let bytes = (CLIENTS * total * 4) as u64;
    let mut group = c.benchmark_group("model_64mi");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(20));
    group.throughput(Throughput::Bytes(bytes));

    {
        let deltas: Vec<Vec<f32>> = (0..CLIENTS)
            .map(|client| update_values(client, total))
            .collect();
        let mut params = update_values(CLIENTS, total);
        let mut state = ServerState::default();
        let step = ServerStep::Plain { lr: 1.0 };

        group.bench_function(BenchmarkId::new("aggregate_mean", CLIENTS), |b| {
            b.iter(|| {
                for shard in 0..MODEL_SHARDS {
                    let range = shard * SHARD_ELEMS..(shard + 1) * SHARD_ELEMS;
                    let updates = weighted_range(&deltas, range.clone());
                    let aggregate = aggregate_shard(AggregationRule::Mean, &updates, SHARD_ELEMS)
                        .expect("the updates are finite and of the shard's length");
                    black_box(aggregate);
                }
            })
        });

        group.bench_function(BenchmarkId::new("aggregate_mean_and_step", CLIENTS), |b| {
            b.iter(|| {
                for shard in 0..MODEL_SHARDS {
                    let range = shard * SHARD_ELEMS..(shard + 1) * SHARD_ELEMS;
                    let updates = weighted_range(&deltas, range.clone());
                    let aggregate = aggregate_shard(AggregationRule::Mean, &updates, SHARD_ELEMS)
                        .expect("the updates are finite and of the shard's length");
                    step.apply(
                        &mut params[range.clone()],
                        range.start,
                        &aggregate,
                        &mut state,
                        total,
                    )
                    .expect("a small step keeps the parameters finite");
                }
            })
        });
    }

    let source = vec![0.5f32; CLIENTS * total];
    let mut target = vec![0.0f32; CLIENTS * total];
    group.bench_function(BenchmarkId::new("memcpy", CLIENTS), |b| {
        b.iter(|| target.copy_from_slice(black_box(&source)))
    });
    group.finish();
}

criterion_group!(benches, shard, model);
criterion_main!(benches);
