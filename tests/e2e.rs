//! End-to-end: build an index from real KV caches, open it, search it, and reject damaged files.

use std::path::Path;
use std::sync::Arc;

use strata_index::linalg::dot;
use strata_index::params::SearchParams;
use strata_index::{build_index, BuildParams, Index, IndexError};
use strata_storage::cache::RamCache;
use strata_storage::kvdump::KvDump;
use strata_storage::reader::ReaderPreference;
use strata_tests::{reduced_dump, shared_dump};

/// A reduced SmolLM2 dump (layers 0 and 2 of the file, 2048 tokens) and its index.
fn fixture(dir: &Path) -> Option<(KvDump, std::path::PathBuf)> {
    let src = KvDump::open(&shared_dump("smollm2-jargon-8k.safetensors")?).expect("open dump");
    let path = reduced_dump(&src, &[0, 2], 2048, &dir.join("small.safetensors"));
    let dump = KvDump::open(&path).expect("open reduced dump");
    let out = dir.join("index");
    build_index(&dump, &BuildParams::default(), &out, false, &|_, _| {}).expect("build");
    Some((dump, out))
}

fn open(dir: &Path) -> Result<Index, IndexError> {
    Index::open(
        dir,
        ReaderPreference::Auto,
        Arc::new(RamCache::new(64 << 20)),
    )
}

#[test]
fn full_budget_search_equals_exact_ranking() {
    let tmp = tempfile::tempdir().unwrap();
    let Some((dump, dir)) = fixture(tmp.path()) else {
        return;
    };
    let index = open(&dir).unwrap();
    let params = SearchParams {
        budget: 1.0,
        probe_fraction: 1.0,
        rerank_factor: 1.0,
        ..Default::default()
    };
    let dim = dump.meta.head_dim;
    for l in 0..dump.num_layers() {
        for qi in [
            0,
            dump.query_positions.len() / 2,
            dump.query_positions.len() - 1,
        ] {
            let p = dump.query_positions[qi];
            let q = dump.queries.row(l, 0, qi);
            let r = index.search(l, 0, q, p, &params).unwrap();
            let mut expect: Vec<u32> = (0..=p as u32)
                .filter(|&t| !params.is_static(t as usize, p))
                .collect();
            let mut got = r.tokens.clone();
            got.sort_unstable();
            expect.sort_unstable();
            assert_eq!(
                got, expect,
                "layer {l} query {qi}: all non-static visible tokens"
            );
            // Scores are the exact inner products of the stored (f16) keys.
            let keys = dump.keys.slice2(l, 0);
            for (t, s) in r.tokens.iter().zip(&r.scores) {
                let e = dot(&keys[*t as usize * dim..(*t as usize + 1) * dim], q);
                assert!(
                    (e - s).abs() <= 1e-3 * (1.0 + e.abs()),
                    "token {t}: {s} vs {e}"
                );
            }
            // Values come back from the segment files, equal to the dump's.
            let values = r.values.as_ref().unwrap();
            assert_eq!(values.len(), r.tokens.len() * dim);
            for (i, &t) in r.tokens.iter().enumerate() {
                let vrow = &dump.values.slice2(l, 0)[t as usize * dim..][..dim];
                assert_eq!(&values[i * dim..(i + 1) * dim], vrow);
            }
        }
    }
}

#[test]
fn small_budget_respects_rules_and_finds_top_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let Some((dump, dir)) = fixture(tmp.path()) else {
        return;
    };
    let index = open(&dir).unwrap();
    let params = SearchParams::default();
    let dim = dump.meta.head_dim;
    let mut hits = 0usize;
    let mut total = 0usize;
    for qi in (0..dump.query_positions.len()).step_by(7) {
        let p = dump.query_positions[qi];
        if p < 200 {
            continue;
        }
        for qh in 0..dump.meta.q_heads {
            let q = dump.queries.row(1, qh, qi);
            let kvh = dump.kv_head_of(qh);
            let r = index.search(1, kvh, q, p, &params).unwrap();
            let budget = params.budget_tokens(p);
            assert!(r.tokens.len() <= budget);
            let mut seen = std::collections::HashSet::new();
            for &t in &r.tokens {
                assert!(t as usize <= p, "future token {t} at position {p}");
                assert!(!params.is_static(t as usize, p), "static token {t}");
                assert!(seen.insert(t), "duplicate token {t}");
            }
            // Compare with the exact top `budget` non-static tokens.
            let keys = dump.keys.slice2(1, kvh);
            let mut exact: Vec<(f32, u32)> = (0..=p as u32)
                .filter(|&t| !params.is_static(t as usize, p))
                .map(|t| (dot(&keys[t as usize * dim..(t as usize + 1) * dim], q), t))
                .collect();
            exact.sort_by(|a, b| b.0.total_cmp(&a.0));
            let top: std::collections::HashSet<u32> =
                exact.iter().take(budget).map(|x| x.1).collect();
            hits += r.tokens.iter().filter(|t| top.contains(t)).count();
            total += budget;
        }
    }
    let recall = hits as f64 / total as f64;
    println!("recall of the exact top-budget tokens: {recall:.3}");
    assert!(recall > 0.8, "recall {recall}");
}

#[test]
fn bad_queries_and_parameters_are_typed_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let Some((dump, dir)) = fixture(tmp.path()) else {
        return;
    };
    let index = open(&dir).unwrap();
    let p = dump.query_positions[0];
    let q = dump.queries.row(0, 0, 0).to_vec();
    for budget in [0.0f32, -0.1, 1.5, f32::NAN] {
        let params = SearchParams {
            budget,
            ..Default::default()
        };
        let e = index.search(0, 0, &q, p, &params).unwrap_err();
        assert!(matches!(e, IndexError::Param { name: "budget", .. }), "{e}");
    }
    let params = SearchParams::default();
    let mut nan = q.clone();
    nan[3] = f32::NAN;
    let e = index
        .search(0, 0, &nan, p, &params)
        .unwrap_err()
        .to_string();
    assert!(e.contains("component 3") && e.contains("NaN"), "{e}");
    let e = index
        .search(0, 0, &q[..10], p, &params)
        .unwrap_err()
        .to_string();
    assert!(e.contains("10 dims"), "{e}");
    let e = index
        .search(0, 0, &q, 1 << 20, &params)
        .unwrap_err()
        .to_string();
    assert!(e.contains("past the"), "{e}");
    let e = index.search(5, 0, &q, p, &params).unwrap_err().to_string();
    assert!(e.contains("no such head"), "{e}");
}

#[test]
fn damaged_index_files_are_rejected_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let Some((dump, dir)) = fixture(tmp.path()) else {
        return;
    };

    // A flipped byte in the manifest: checksum.
    let manifest = dir.join("index.strata");
    let good = std::fs::read(&manifest).unwrap();
    let mut bad = good.clone();
    bad[100] ^= 0x40;
    std::fs::write(&manifest, &bad).unwrap();
    let e = open(&dir).err().expect("must fail").to_string();
    assert!(e.contains("index.strata") && e.contains("checksum"), "{e}");

    // Truncated manifest.
    std::fs::write(&manifest, &good[..good.len() - 10]).unwrap();
    let e = open(&dir).err().expect("must fail").to_string();
    assert!(e.contains("index.strata"), "{e}");
    std::fs::write(&manifest, &good).unwrap();

    // Truncated segment: its footer no longer matches.
    let seg = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "seg"))
        .unwrap();
    let seg_bytes = std::fs::read(&seg).unwrap();
    std::fs::write(&seg, &seg_bytes[..seg_bytes.len() - 4096]).unwrap();
    let e = open(&dir).err().expect("must fail").to_string();
    assert!(
        e.contains(seg.file_name().unwrap().to_str().unwrap()),
        "{e}"
    );

    // A flipped byte inside the first posting list: the search that reads it says so.
    let mut flipped = seg_bytes.clone();
    flipped[64] ^= 0x01;
    std::fs::write(&seg, &flipped).unwrap();
    let index = open(&dir).unwrap();
    let params = SearchParams {
        budget: 1.0,
        probe_fraction: 1.0,
        ..Default::default()
    };
    let layer = if seg
        .to_string_lossy()
        .contains(&format!("{:03}", dump.meta.layers[0]))
    {
        0
    } else {
        1
    };
    let p = dump.query_positions[dump.query_positions.len() - 1];
    let e = index
        .search(layer, 0, dump.queries.row(layer, 0, 0), p, &params)
        .unwrap_err()
        .to_string();
    assert!(e.contains("checksum") && e.contains(".seg"), "{e}");

    // Missing manifest (as after an interrupted build): not an index.
    std::fs::remove_file(&manifest).unwrap();
    let e = open(&dir).err().expect("must fail").to_string();
    assert!(e.contains("index.strata"), "{e}");
}

#[test]
fn failed_build_leaves_nothing_behind_and_existing_index_is_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let Some((dump, dir)) = fixture(tmp.path()) else {
        return;
    };
    // Refuses to overwrite without force.
    let e = build_index(&dump, &BuildParams::default(), &dir, false, &|_, _| {}).unwrap_err();
    assert!(e.to_string().contains("already exists"), "{e}");
    // Invalid parameters: error, and no output or temporary folder.
    let out = tmp.path().join("other");
    let params = BuildParams {
        code_bits: 3,
        ..Default::default()
    };
    let e = build_index(&dump, &params, &out, false, &|_, _| {}).unwrap_err();
    assert!(e.to_string().contains("code_bits"), "{e}");
    assert!(!out.exists());
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.contains("building"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // The existing index still opens.
    open(&dir).unwrap();
}

#[test]
fn cold_reads_come_from_disk_and_warm_from_ram() {
    let tmp = tempfile::tempdir().unwrap();
    let Some((dump, dir)) = fixture(tmp.path()) else {
        return;
    };
    let index = open(&dir).unwrap();
    let params = SearchParams::default();
    let qi = dump.query_positions.len() - 1;
    let p = dump.query_positions[qi];
    let q = dump.queries.row(0, 0, qi);
    let cold = index.search(0, 0, q, p, &params).unwrap();
    assert!(cold.stats.ssd_reads > 0 && cold.stats.ssd_bytes > 0);
    assert_eq!(cold.stats.lists_from_ram, 0);
    let warm = index.search(0, 0, q, p, &params).unwrap();
    assert_eq!(warm.stats.ssd_reads, 0);
    assert_eq!(warm.stats.lists_from_ram, warm.stats.lists_read);
    assert_eq!(cold.tokens, warm.tokens);
}
