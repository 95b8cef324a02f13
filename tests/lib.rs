//! Fixtures for the end-to-end tests: the shared real dumps, and smaller dumps cut from them
//! (real keys, values and queries; fewer layers and tokens) so that the tests stay fast.

use std::path::{Path, PathBuf};

use strata_index::SearchParams;
use strata_storage::kvdump::{write_kvdump, KvDump, Tensor4};

/// The committed fixtures folder (`tests/fixtures`).
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// `fixtures/tiny-smollm2.safetensors`: 160 tokens of one SmolLM2 layer.
pub fn tiny_dump() -> KvDump {
    KvDump::open(&fixtures().join("tiny-smollm2.safetensors")).expect("open the tiny dump")
}

/// A file of `../shared/data/`, or None (with a printed reason) when it is not there.
pub fn shared_dump(name: &str) -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/data")
        .join(name);
    if p.exists() {
        Some(p)
    } else {
        println!("skipping: {} not found", p.display());
        None
    }
}

fn cut(t: &Tensor4, layers: &[usize], third: usize) -> Tensor4 {
    let [_, s1, s2, s3] = t.shape;
    let mut data = Vec::with_capacity(layers.len() * s1 * third * s3);
    for &l in layers {
        for h in 0..s1 {
            data.extend_from_slice(&t.slice2(l, h)[..third * s3]);
            let _ = s2;
        }
    }
    Tensor4 {
        shape: [layers.len(), s1, third, s3],
        data,
    }
}

/// Writes a dump made of the first `tokens` tokens of `layers` of `src`. Its evaluation queries
/// are the source's prefill (train) queries at positions below `tokens` (real queries at real
/// positions); it keeps no train queries of its own.
pub fn reduced_dump(src: &KvDump, layers: &[usize], tokens: usize, out: &Path) -> PathBuf {
    let (tq, tp) = (
        src.train_queries
            .as_ref()
            .expect("source has train queries"),
        src.train_positions
            .as_ref()
            .expect("source has train positions"),
    );
    let keep: Vec<usize> = (0..tp.len()).filter(|&i| tp[i] < tokens).collect();
    let [_, qh, _, d] = tq.shape;
    let mut qdata = Vec::new();
    for &l in layers {
        for h in 0..qh {
            for &i in &keep {
                qdata.extend_from_slice(tq.row(l, h, i));
            }
        }
    }
    let queries = Tensor4 {
        shape: [layers.len(), qh, keep.len(), d],
        data: qdata,
    };
    let positions: Vec<usize> = keep.iter().map(|&i| tp[i]).collect();
    let mut meta = src.meta.clone();
    meta.layers = layers.iter().map(|&l| src.meta.layers[l]).collect();
    meta.softmax_scale = layers.iter().map(|&l| src.meta.softmax_scale[l]).collect();
    meta.tokens = tokens;
    meta.needle_token_range = None;
    write_kvdump(
        out,
        &meta,
        &cut(&src.keys, layers, tokens),
        &cut(&src.values, layers, tokens),
        &queries,
        &positions,
        None,
        &src.token_ids[..tokens],
    )
    .expect("write reduced dump");
    out.to_path_buf()
}

/// Search parameters under which every visible, non-static token is probed, re-ranked and
/// attended: the search must then agree with exact attention.
pub fn attend_everything() -> SearchParams {
    SearchParams {
        budget: 1.0,
        probe_fraction: 1.0,
        rerank_factor: 1.0,
        // Every score exact.
        code_trusted_fraction: 0.0,
        ..Default::default()
    }
}
