//! Hot paths of search: centroid scoring, code scoring of probed members, the candidates' top-k,
//! exact scoring of a posting list (f16 -> f32 + dots). Uses the keys of the shared SmolLM2 dump
//! when present.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use std::hint::black_box;
use strata_index::codes::{CodeQuery, ScalarQuantizer, CODE_BLOCK};
use strata_index::linalg::{dot_rows, f16_bytes_to_f32, top_k_indices};

fn keys_and_query() -> (Vec<f32>, Vec<f32>, usize) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/data/smollm2-jargon-8k.safetensors");
    if let Ok(d) = strata_storage::kvdump::KvDump::open(&path) {
        let dim = d.meta.head_dim;
        return (
            d.keys.slice2(2, 0).to_vec(),
            d.queries.row(2, 0, 0).to_vec(),
            dim,
        );
    }
    eprintln!("shared dump not found; benchmarking on pseudo-random keys");
    let dim = 64;
    let mut x = 1u64;
    let mut next = || {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    let keys = (0..8192 * dim).map(|_| next()).collect();
    let q = (0..dim).map(|_| next()).collect();
    (keys, q, dim)
}

fn bench(c: &mut Criterion) {
    let (keys, q, dim) = keys_and_query();
    let n = keys.len() / dim;
    let mut out = Vec::new();

    let mut g = c.benchmark_group("centroid_scoring");
    for lists in [256usize, 1024, 4096] {
        let centroids: Vec<f32> = keys.iter().cycle().take(lists * dim).copied().collect();
        g.bench_with_input(BenchmarkId::from_parameter(lists), &centroids, |b, cen| {
            b.iter(|| {
                dot_rows(black_box(cen), dim, black_box(&q), &mut out);
                black_box(out.len())
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("code_scoring_2048_keys");
    for bits in [2u32, 3, 4, 8] {
        let sq = ScalarQuantizer::fit(&keys, dim, bits);
        let rows: Vec<&[f32]> = keys.chunks_exact(dim).take(2048).collect();
        let mut codes = Vec::new();
        for block in rows.chunks(CODE_BLOCK) {
            sq.encode_block(block, &mut codes);
        }
        let mut lanes = [0f32; CODE_BLOCK];
        g.bench_with_input(BenchmarkId::from_parameter(bits), &codes, |b, codes| {
            b.iter(|| {
                let cq = sq.query(black_box(&q));
                let mut best = f32::MIN;
                for block in codes.chunks_exact(sq.block_bytes()) {
                    cq.score_block(block, 0.0, &mut lanes);
                    best = lanes.iter().fold(best, |m, &v| m.max(v));
                }
                black_box(best)
            })
        });
    }
    g.finish();

    // 3-bit codes of 2,048 keys for the queries of a GQA group that probe the same list:
    // one query at a time, or decoded once for all of them.
    let mut g = c.benchmark_group("code_scoring_3_bit_2048_keys");
    let sq = ScalarQuantizer::fit(&keys, dim, 3);
    let rows: Vec<&[f32]> = keys.chunks_exact(dim).take(2048).collect();
    let mut codes = Vec::new();
    for block in rows.chunks(CODE_BLOCK) {
        sq.encode_block(block, &mut codes);
    }
    let qs: Vec<_> = (0..4)
        .map(|i| sq.query(&keys[(100 + i) * dim..(101 + i) * dim]))
        .collect();
    for n in 1..=4usize {
        let mut lanes = [0f32; CODE_BLOCK];
        g.bench_function(BenchmarkId::new("one_at_a_time", n), |b| {
            b.iter(|| {
                let mut best = f32::MIN;
                for block in codes.chunks_exact(sq.block_bytes()) {
                    for q in &qs[..n] {
                        q.score_block(black_box(block), 0.0, &mut lanes);
                        best = lanes.iter().fold(best, |m, &v| m.max(v));
                    }
                }
                black_box(best)
            })
        });
        let with_bases: Vec<_> = qs[..n].iter().map(|q| (q, 0.0f32)).collect();
        let mut out = vec![[0f32; CODE_BLOCK]; n];
        g.bench_function(BenchmarkId::new("shared", n), |b| {
            b.iter(|| {
                let mut best = f32::MIN;
                for block in codes.chunks_exact(sq.block_bytes()) {
                    CodeQuery::score_blocks(&with_bases, black_box(block), &mut out);
                    best = out.iter().flatten().fold(best, |m, &v| m.max(v));
                }
                black_box(best)
            })
        });
    }
    g.finish();

    // The candidates of a 128K query head in the decode bench: the best 23% of 6,554 code
    // scores (3-bit codes of real keys against a real query).
    let sq = ScalarQuantizer::fit(&keys, dim, 3);
    let cq = sq.query(&q);
    let rows: Vec<&[f32]> = keys.chunks_exact(dim).cycle().take(6554).collect();
    let mut codes = Vec::new();
    for block in rows.chunks(CODE_BLOCK) {
        sq.encode_block(block, &mut codes);
    }
    let mut scores = Vec::new();
    let mut lanes = [0f32; CODE_BLOCK];
    for (block, keys) in codes
        .chunks_exact(sq.block_bytes())
        .zip(rows.chunks(CODE_BLOCK))
    {
        cq.score_block(block, 0.0, &mut lanes);
        scores.extend_from_slice(&lanes[..keys.len()]);
    }
    c.bench_function("top_k_1507_of_6554", |b| {
        b.iter(|| black_box(top_k_indices(black_box(&scores), 1507).len()))
    });

    // One 32-member posting list: f16 keys to f32, then exact dots.
    let list: Vec<u8> = keys[..32.min(n) * dim]
        .iter()
        .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
        .collect();
    let mut buf = Vec::new();
    c.bench_function("list_scan_32_keys", |b| {
        b.iter(|| {
            buf.clear();
            f16_bytes_to_f32(black_box(&list), &mut buf);
            dot_rows(&buf, dim, black_box(&q), &mut out);
            black_box(out.len())
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
