//! End-to-end: build an index from real KV caches, open it, search it, and reject damaged files.

use std::path::Path;
use std::sync::Arc;

use strata_engine::attention::{attend_logits, merge, Attended};
use strata_engine::metrics::{output_error, ExactAttention};
use strata_index::linalg::dot;
use strata_index::params::SearchParams;
use strata_index::search::log_sum_exp;
use strata_index::{build_index, BuildParams, Index, IndexError, Retrieved};
use strata_storage::cache::RamCache;
use strata_storage::kvdump::KvDump;
use strata_storage::reader::ReaderPreference;
use strata_tests::{attend_everything, fixtures, reduced_dump, shared_dump, tiny_dump};

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
    let params = attend_everything();
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
            let top = exact_top(&dump, 1, kvh, q, p, &params);
            hits += r.tokens.iter().filter(|t| top.contains(t)).count();
            total += budget;
        }
    }
    let recall = hits as f64 / total as f64;
    println!("recall of the exact top-budget tokens: {recall:.3}");
    assert!(recall > 0.8, "recall {recall}");
}

/// Candidates the codes rank just below the best are taken on their code scores: their keys are
/// not read, the others keep exact scores, and the attended set is nearly the one that exact
/// re-ranking of every candidate picks.
#[test]
fn candidates_taken_on_their_codes_skip_their_keys_and_keep_the_set() {
    let tmp = tempfile::tempdir().unwrap();
    let Some((dump, dir)) = fixture(tmp.path()) else {
        return;
    };
    let index = open(&dir).unwrap();
    let trusting = SearchParams {
        code_trusted_fraction: 0.6,
        code_trusted_from: 0.2,
        ..Default::default()
    };
    let exact = SearchParams {
        code_trusted_fraction: 0.0,
        ..trusting.clone()
    };
    let dim = dump.meta.head_dim;
    let (mut same, mut total) = (0usize, 0usize);
    for qi in (0..dump.query_positions.len()).step_by(5) {
        let p = dump.query_positions[qi];
        if p < 1000 {
            continue;
        }
        for qh in 0..dump.meta.q_heads {
            let (q, kvh) = (dump.queries.row(1, qh, qi), dump.kv_head_of(qh));
            let a = index.search(1, kvh, q, p, &exact).unwrap();
            let b = index.search(1, kvh, q, p, &trusting).unwrap();
            let trusted = (0.6 * exact.budget_tokens(p) as f64).floor() as u64;
            assert_eq!(b.stats.keys_scored + trusted, a.stats.keys_scored);
            assert_eq!(b.stats.codes_scored, a.stats.codes_scored);
            // Exactly scored tokens keep their exact scores; at most `trusted` do not.
            let keys = dump.keys.slice2(1, kvh);
            let inexact = b
                .tokens
                .iter()
                .zip(&b.scores)
                .filter(|&(&t, &s)| {
                    let e = dot(&keys[t as usize * dim..(t as usize + 1) * dim], q);
                    (e - s).abs() > 1e-3 * (1.0 + e.abs())
                })
                .count() as u64;
            assert!(
                inexact <= trusted,
                "{inexact} inexact scores, {trusted} trusted"
            );
            // The best exact token is attended.
            let best = a
                .tokens
                .iter()
                .zip(&a.scores)
                .max_by(|x, y| x.1.total_cmp(y.1))
                .unwrap();
            assert!(b.tokens.contains(best.0));
            let set: std::collections::HashSet<u32> = a.tokens.iter().copied().collect();
            same += b.tokens.iter().filter(|t| set.contains(t)).count();
            total += a.tokens.len();
        }
    }
    let overlap = same as f64 / total as f64;
    println!("attended sets overlap {overlap:.3}");
    assert!(total > 0 && overlap > 0.95, "overlap {overlap:.3}");
}

/// The exact best `budget` non-static tokens of layer `layer`, KV head `kvh`, for `q` at `p`.
fn exact_top(
    dump: &KvDump,
    layer: usize,
    kvh: usize,
    q: &[f32],
    p: usize,
    params: &SearchParams,
) -> std::collections::HashSet<u32> {
    let dim = dump.meta.head_dim;
    let keys = dump.keys.slice2(layer, kvh);
    let mut exact: Vec<(f32, u32)> = (0..=p as u32)
        .filter(|&t| !params.is_static(t as usize, p))
        .map(|t| (dot(&keys[t as usize * dim..(t as usize + 1) * dim], q), t))
        .collect();
    exact.sort_by(|a, b| b.0.total_cmp(&a.0));
    exact
        .iter()
        .take(params.budget_tokens(p))
        .map(|x| x.1)
        .collect()
}

#[test]
fn codes_past_the_searchable_tokens_are_not_read() {
    let tmp = tempfile::tempdir().unwrap();
    let Some((dump, dir)) = fixture(tmp.path()) else {
        return;
    };
    let index = open(&dir).unwrap();
    // Every list probed, from a position a third into the indexed tokens: members from the
    // recent window on (static or not yet visible) are skipped block by block.
    let params = SearchParams {
        probe_fraction: 1.0,
        ..SearchParams::default()
    };
    let p = 700;
    let (_, recent_start) = params.static_edges(p);
    let lists = index.head(0, 0).unwrap().lists.len() as u64;
    let block = strata_index::codes::CODE_BLOCK as u64;
    let r = index
        .search(0, 0, dump.queries.row(0, 0, 0), p, &params)
        .unwrap();
    let scored = r.stats.codes_scored;
    let searchable = (recent_start - params.sink_tokens as usize) as u64;
    assert!(
        scored >= searchable,
        "{scored} codes scored, fewer than the {searchable} searchable tokens"
    );
    // Each block scored starts before the window, so it holds at most `block - 1` later tokens.
    assert!(
        scored <= recent_start as u64 + (block - 1) * lists,
        "{scored} codes scored: more than the blocks holding tokens before {recent_start}"
    );
}

#[test]
fn residual_codes_rank_as_well_as_key_codes_in_fewer_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    // The fixture's index has the default codes: residual ones.
    let Some((dump, residual_dir)) = fixture(tmp.path()) else {
        return;
    };
    assert_eq!(
        BuildParams::default().code_bits,
        strata_index::codes::RESIDUAL_CODE_BITS
    );
    let key_dir = tmp.path().join("key-codes");
    let build = BuildParams {
        code_bits: 4,
        ..BuildParams::default()
    };
    build_index(&dump, &build, &key_dir, false, &|_, _| {}).expect("build");
    let (keyed, residual) = (open(&key_dir).unwrap(), open(&residual_dir).unwrap());
    let dim = dump.meta.head_dim;
    for h in residual.manifest().heads.iter() {
        let blocks = h.code_block_start.last().unwrap().to_native() as usize;
        assert_eq!(
            h.codes.len(),
            blocks * 16 * dim * 3 / 8,
            "3 bits per dimension"
        );
    }
    // Both answer everything exactly when everything is attended.
    let all = attend_everything();
    let (qi, qh) = (dump.query_positions.len() - 1, 4);
    let (p, q, kvh) = (
        dump.query_positions[qi],
        dump.queries.row(1, qh, qi),
        dump.kv_head_of(qh),
    );
    let everything = residual.search(1, kvh, q, p, &all).unwrap();
    assert_eq!(
        everything.tokens.len(),
        keyed.search(1, kvh, q, p, &all).unwrap().tokens.len()
    );
    // At a small budget the residual codes find the exact top tokens about as often, and the
    // adaptive budget (which estimates the static tokens' mass from their codes) still works.
    let small = SearchParams::default();
    let adaptive = SearchParams {
        target_mass: Some(0.5),
        ..SearchParams::default()
    };
    let (mut found_keyed, mut found_residual, mut total) = (0usize, 0usize, 0usize);
    for qi in (0..dump.query_positions.len()).step_by(5) {
        let p = dump.query_positions[qi];
        for qh in 0..dump.meta.q_heads {
            let (q, kvh) = (dump.queries.row(1, qh, qi), dump.kv_head_of(qh));
            let budget = small.budget_tokens(p);
            let top = exact_top(&dump, 1, kvh, q, p, &small);
            let found = |index: &Index| {
                let r = index.search(1, kvh, q, p, &small).unwrap();
                r.tokens.iter().filter(|t| top.contains(t)).count()
            };
            found_keyed += found(&keyed);
            found_residual += found(&residual);
            total += budget;
            let r = residual.search(1, kvh, q, p, &adaptive).unwrap();
            assert!(r.tokens.len() <= budget && r.remainder.is_some());
        }
    }
    let (rk, rr) = (
        found_keyed as f64 / total as f64,
        found_residual as f64 / total as f64,
    );
    println!("recall of the exact top-budget tokens: key codes {rk:.3}, residual codes {rr:.3}");
    assert!(rr > 0.8 && rr > rk - 0.03, "residual {rr}, key codes {rk}");
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
    for (name, bad) in [
        (
            "code_trusted_fraction",
            SearchParams {
                code_trusted_fraction: 1.5,
                ..Default::default()
            },
        ),
        (
            "code_trusted_from",
            SearchParams {
                code_trusted_from: f32::NAN,
                ..Default::default()
            },
        ),
    ] {
        let e = index.search(0, 0, &q, p, &bad).unwrap_err();
        assert!(
            matches!(e, IndexError::Param { name: n, .. } if n == name),
            "{e}"
        );
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
    // One static log-sum-exp per query, or none.
    let e = index
        .search_group(
            0,
            0,
            &[&q],
            p,
            &params,
            Some(&[0.0, 0.0]),
            strata_index::search::Gather::Values,
        )
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(e.contains("static_lses"), "{e}");
    // The baselines check their queries as the index does.
    use strata_index::baselines::HeadRetriever;
    let exact = strata_index::baselines::exact::Exact {
        keys: dump.keys.slice2(0, 0),
        dim: dump.meta.head_dim,
        full: false,
    };
    let e = exact
        .retrieve(&q[..10], p, &params)
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(e.contains("10 dims"), "{e}");
    let e = exact
        .retrieve(&nan, p, &params)
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(e.contains("component 3"), "{e}");
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

/// Manifests that pass their checksum and bytecheck but contradict themselves (as a bug or a
/// hand edit could write them) are refused at open, naming what is wrong, not met later as a
/// panic or a wrong answer.
#[test]
fn inconsistent_manifests_are_refused_at_open() {
    let tmp = tempfile::tempdir().unwrap();
    let Some((_, dir)) = fixture(tmp.path()) else {
        return;
    };
    let good = strata_index::manifest::MappedManifest::open(&dir)
        .unwrap()
        .to_owned()
        .unwrap();
    type Edit = fn(&mut strata_index::manifest::Manifest);
    let cases: [(&str, Edit, &str); 7] = [
        (
            "a token twice",
            |m| m.heads[0].primary_tokens[1] = m.heads[0].primary_tokens[0],
            "exactly once",
        ),
        (
            "a segment elsewhere",
            |m| m.segments[0] = "../elsewhere.seg".into(),
            "not a file name",
        ),
        (
            "heads out of place",
            |m| m.heads[0].kv_head = 1,
            "names layer slot",
        ),
        (
            "a NaN quantiser step",
            |m| m.heads[0].code_step[0] = f32::NAN,
            "not finite",
        ),
        (
            "a second level on a flat head",
            |m| m.heads[0].group_start = vec![0, 1],
            "second level",
        ),
        (
            "a list offset that overflows",
            |m| m.heads[0].lists[0].offset = u64::MAX - 10,
            "outside its segment",
        ),
        ("no dimensions", |m| m.heads[0].dim = 0, "dim 0"),
    ];
    let path = dir.join("index.strata");
    for (what, edit, expect) in cases {
        let mut m = good.clone();
        edit(&mut m);
        std::fs::write(&path, strata_index::manifest::encode(&m).unwrap()).unwrap();
        let e = open(&dir)
            .err()
            .unwrap_or_else(|| panic!("{what}: opened"))
            .to_string();
        assert!(
            e.contains(expect) && e.contains("index.strata"),
            "{what}: {e}"
        );
    }
    std::fs::write(&path, strata_index::manifest::encode(&good).unwrap()).unwrap();
    let index = open(&dir).unwrap();
    // Public entry points with out-of-range arguments: errors, not panics.
    let head = index.head(0, 0).unwrap();
    let e = index
        .fetch_lists(head, &[u32::MAX], &mut Default::default())
        .map(|_| ())
        .expect_err("list past the end")
        .to_string();
    assert!(e.contains("past the head"), "{e}");
}

/// A list whose bytes pass their CRC but disagree with the manifest (here the manifest's
/// order of a list's primary members is not the list's) is refused when it is read, and never
/// enters the RAM tier: searches lay out cached lists from the manifest without checking them
/// again, so a list that entered unchecked would give a candidate another token's key.
#[test]
fn a_list_that_disagrees_with_the_manifest_is_refused_when_read() {
    let tmp = tempfile::tempdir().unwrap();
    let Some((dump, dir)) = fixture(tmp.path()) else {
        return;
    };
    let mut m = strata_index::manifest::MappedManifest::open(&dir)
        .unwrap()
        .to_owned()
        .unwrap();
    let head = &mut m.heads[0];
    let (a, b) = (
        head.primary_start[0] as usize,
        head.primary_start[1] as usize,
    );
    assert!(b - a >= 2, "list 0 has {} primary members", b - a);
    head.primary_tokens.swap(a, a + 1);
    let (first, second) = (head.primary_tokens[a], head.primary_tokens[a + 1]);
    std::fs::write(
        dir.join("index.strata"),
        strata_index::manifest::encode(&m).unwrap(),
    )
    .unwrap();
    let cache = Arc::new(RamCache::new(64 << 20));
    let index = Index::open(&dir, ReaderPreference::Auto, cache.clone()).unwrap();
    let params = SearchParams {
        budget: 1.0,
        probe_fraction: 1.0,
        ..Default::default()
    };
    let p = dump.query_positions[dump.query_positions.len() - 1];
    let q = dump.queries.row(0, 0, 0);
    // Twice: a refused list that had entered the RAM tier would be served unchecked the second
    // time.
    for attempt in 0..2 {
        let e = index
            .search(0, 0, q, p, &params)
            .map(|_| ())
            .expect_err("the list disagrees with the manifest")
            .to_string();
        assert!(
            e.contains("list 0")
                && e.contains(".seg")
                && e.contains(&format!("holds token {second}, the manifest says {first}")),
            "attempt {attempt}: {e}"
        );
    }
    // The second attempt read it from the segment again: the refused list is not in the tier.
    assert_eq!(cache.stats().insertions, 0);
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
        code_bits: 5,
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
    // The phases account for the search's time, within it.
    let ph = warm.stats.phases;
    let phases =
        ph.centroids_ns + ph.codes_ns + ph.select_ns + ph.rerank_ns + ph.estimate_ns + ph.gather_ns;
    assert!(phases > 0 && phases + warm.stats.io_ns <= warm.stats.search_ns);
    assert_eq!(warm.stats.ssd_reads, 0);
    assert_eq!(warm.stats.lists_from_ram, warm.stats.lists_read);
    assert_eq!(cold.tokens, warm.tokens);
}

#[test]
fn prefetch_brings_in_exactly_what_the_group_search_then_reads() {
    let tmp = tempfile::tempdir().unwrap();
    let Some((dump, dir)) = fixture(tmp.path()) else {
        return;
    };
    let index = open(&dir).unwrap();
    let params = SearchParams::default();
    let qi = dump.query_positions.len() - 1;
    let p = dump.query_positions[qi];
    let group = dump.meta.q_heads / dump.meta.kv_heads;
    let qs: Vec<&[f32]> = (0..group).map(|h| dump.queries.row(0, h, qi)).collect();
    let asked = index.prefetch_group(0, 0, &qs, p, &params).unwrap();
    assert!(asked > 0, "the prefetch planned no list");
    assert_eq!(
        index.cache().len(),
        asked,
        "one RAM-tier entry per list asked for"
    );
    let out = index
        .search_group(
            0,
            0,
            &qs,
            p,
            &params,
            None,
            strata_index::search::Gather::Values,
        )
        .unwrap();
    let read: u64 = out.iter().map(|r| r.stats.lists_read).sum();
    let from_ram: u64 = out.iter().map(|r| r.stats.lists_from_ram).sum();
    assert_eq!(
        read, asked as u64,
        "the search reads the lists the prefetch planned"
    );
    assert_eq!(
        from_ram, read,
        "every list the search read was already in RAM"
    );
    // A bad query is refused by the prefetch as by the search.
    let bad = vec![f32::NAN; qs[0].len()];
    assert!(matches!(
        index.prefetch_group(0, 0, &[&bad], p, &params),
        Err(IndexError::Query { .. })
    ));
}

#[test]
fn a_group_search_answers_each_query_as_its_own_search_does() {
    // The group scores each probed list's codes once for every query that probes it; each
    // query must still get exactly the candidates, and so the answer, of a search on its own.
    let tmp = tempfile::tempdir().unwrap();
    let Some((dump, dir)) = fixture(tmp.path()) else {
        return;
    };
    let index = open(&dir).unwrap();
    let params = SearchParams::default();
    let group = dump.meta.q_heads / dump.meta.kv_heads;
    assert!(group > 1, "the fixture has GQA groups");
    let n = dump.query_positions.len();
    for kv in 0..dump.meta.kv_heads {
        // The earliest position with a budget too, where the window cuts through more lists.
        let first = (0..n)
            .find(|&qi| params.budget_tokens(dump.query_positions[qi]) > 4)
            .expect("a query position with a budget");
        for qi in [first, n / 2, n - 1] {
            let p = dump.query_positions[qi];
            let qs: Vec<&[f32]> = (0..group)
                .map(|h| dump.queries.row(0, kv * group + h, qi))
                .collect();
            let together = index
                .search_group(
                    0,
                    kv,
                    &qs,
                    p,
                    &params,
                    None,
                    strata_index::search::Gather::Values,
                )
                .unwrap();
            assert_eq!(together.len(), group);
            for (h, (q, t)) in qs.iter().zip(&together).enumerate() {
                let alone = index.search(0, kv, q, p, &params).unwrap();
                let at = format!("kv head {kv}, query head {h}, position {p}");
                assert!(!alone.tokens.is_empty(), "{at}: nothing attended");
                assert_eq!(t.tokens, alone.tokens, "{at}: tokens");
                assert_eq!(t.scores, alone.scores, "{at}: scores");
                assert_eq!(t.values, alone.values, "{at}: values");
                assert_eq!(t.remainder, alone.remainder, "{at}: remainder");
                assert_eq!(t.stats.codes_scored, alone.stats.codes_scored, "{at}");
            }
        }
    }
}

/// Output error of one search's answer against exact attention over `0..=p`: of the exact part
/// alone (static ∪ retrieved) and of the exact part merged with the remainder estimate.
fn output_errors(
    dump: &KvDump,
    layer: usize,
    qh: usize,
    qi: usize,
    r: &Retrieved,
    params: &SearchParams,
) -> (f64, f64) {
    let dim = dump.meta.head_dim;
    let kvh = dump.kv_head_of(qh);
    let p = dump.query_positions[qi];
    let q = dump.queries.row(layer, qh, qi);
    let scale = dump.meta.softmax_scale[layer];
    let keys = dump.keys.slice2(layer, kvh);
    let values = dump.values.slice2(layer, kvh);
    let logits: Vec<f32> = keys[..(p + 1) * dim]
        .chunks_exact(dim)
        .map(|k| scale * dot(k, q))
        .collect();
    let exact = ExactAttention::new(&logits, &values[..(p + 1) * dim], dim);
    let mut sub_logits = Vec::new();
    let mut sub_values = Vec::new();
    for t in params
        .static_tokens(p)
        .into_iter()
        .chain(r.tokens.iter().copied())
    {
        sub_logits.push(logits[t as usize]);
        sub_values.extend_from_slice(&values[t as usize * dim..(t as usize + 1) * dim]);
    }
    let part = attend_logits(&sub_logits, &sub_values, dim);
    let merged = match &r.remainder {
        Some(rem) => merge(&[
            part.clone(),
            Attended {
                output: rem.output.clone(),
                lse: rem.lse,
            },
        ]),
        None => part.clone(),
    };
    (
        output_error(&part.output, &exact.output),
        output_error(&merged.output, &exact.output),
    )
}

#[test]
fn remainder_estimate_lowers_output_error_on_real_data() {
    let tmp = tempfile::tempdir().unwrap();
    let Some((dump, dir)) = fixture(tmp.path()) else {
        return;
    };
    check_remainder(&dump, &open(&dir).unwrap(), "flat");
    // A second level over the same dump (64 lists in groups of 4): unexpanded groups are
    // estimated as whole groups, and the accounting must still be exact.
    let hier = tmp.path().join("hierarchical");
    let params = BuildParams {
        hierarchy_threshold: 8,
        lists_per_group: 4,
        ..Default::default()
    };
    build_index(&dump, &params, &hier, false, &|_, _| {}).expect("build");
    let index = open(&hier).unwrap();
    assert!(!index.manifest().heads[0].group_value_means.is_empty());
    check_remainder(&dump, &index, "hierarchical");
}

fn check_remainder(dump: &KvDump, index: &Index, what: &str) {
    assert!(
        SearchParams::default().estimate_remainder,
        "estimation is on by default"
    );
    // Probed tokens valued by their codes (the default) and by their list's centroid (whose
    // logit, that of the mean key, undervalues a list by far: on the flat index the estimate
    // then moves the mean output error by about 0.01%, so it is only held to its accounting and
    // to within 0.1% of the exact part's error).
    for (how, code_logits, most) in [
        ("code logits", true, 0.8),
        ("centroid logits", false, 1.001),
    ] {
        let params = SearchParams {
            remainder_code_logits: code_logits,
            ..Default::default()
        };
        check_remainder_with(dump, index, &format!("{what}, {how}"), &params, most);
    }
}

/// Checks the estimate's accounting on every fifth query past position 200, and that it brings
/// the mean output error below `most` times that of the exact part alone.
fn check_remainder_with(
    dump: &KvDump,
    index: &Index,
    what: &str,
    params: &SearchParams,
    most: f64,
) {
    let off = SearchParams {
        estimate_remainder: false,
        ..Default::default()
    };
    let (mut exact_only, mut with_estimate, mut n) = (0.0, 0.0, 0usize);
    for l in 0..dump.num_layers() {
        for qi in (0..dump.query_positions.len()).step_by(5) {
            let p = dump.query_positions[qi];
            if p < 200 {
                continue;
            }
            for qh in 0..dump.meta.q_heads {
                let kvh = dump.kv_head_of(qh);
                let q = dump.queries.row(l, qh, qi);
                let r = index.search(l, kvh, q, p, params).unwrap();
                let rem = r.remainder.as_ref().expect("estimate requested");
                // Careful accounting: the estimate stands for exactly the visible, non-static
                // tokens that were not attended.
                let open = p + 1 - params.static_tokens(p).len() - r.tokens.len();
                assert_eq!(
                    rem.tokens as usize, open,
                    "{what}: layer {l} query {qi} head {qh}"
                );
                assert!(rem.lse.is_finite() && rem.output.iter().all(|v| v.is_finite()));
                // Without estimation: the same tokens, no remainder.
                let r_off = index.search(l, kvh, q, p, &off).unwrap();
                assert!(r_off.remainder.is_none());
                assert_eq!(r_off.tokens, r.tokens);
                let (e_exact, e_est) = output_errors(dump, l, qh, qi, &r, params);
                exact_only += e_exact;
                with_estimate += e_est;
                n += 1;
            }
        }
    }
    let (exact_only, with_estimate) = (exact_only / n as f64, with_estimate / n as f64);
    println!("{what}, {n} queries: mean output error {exact_only:.4} exact part only, {with_estimate:.4} with the estimate");
    assert!(n > 50);
    assert!(
        with_estimate < most * exact_only,
        "{what}: estimate {with_estimate} vs exact only {exact_only}"
    );
}

#[test]
fn remainder_is_neutral_when_everything_is_attended() {
    let tmp = tempfile::tempdir().unwrap();
    let Some((dump, dir)) = fixture(tmp.path()) else {
        return;
    };
    let index = open(&dir).unwrap();
    let params = attend_everything();
    for qi in [0, dump.query_positions.len() - 1] {
        let p = dump.query_positions[qi];
        let r = index
            .search(0, 0, dump.queries.row(0, 0, qi), p, &params)
            .unwrap();
        let rem = r.remainder.as_ref().expect("estimate requested");
        assert_eq!(rem.tokens, 0);
        assert_eq!(rem.lse, f32::NEG_INFINITY);
        assert!(rem.output.iter().all(|&v| v == 0.0));
        // Merged in, it changes nothing: the output is exact.
        let (e_exact, e_est) = output_errors(&dump, 0, 0, qi, &r, &params);
        assert!(
            e_exact < 1e-3 && (e_est - e_exact).abs() < 1e-6,
            "{e_exact} {e_est}"
        );
    }
}

#[test]
fn target_mass_attends_within_the_cap_and_less_for_an_easy_target() {
    let tmp = tempfile::tempdir().unwrap();
    let Some((dump, dir)) = fixture(tmp.path()) else {
        return;
    };
    let index = open(&dir).unwrap();
    let dim = dump.meta.head_dim;
    let cap = SearchParams {
        budget: 0.05,
        ..Default::default()
    };
    let easy = SearchParams {
        target_mass: Some(0.5),
        ..cap.clone()
    };
    let (mut attended, mut capped) = (0usize, 0usize);
    for l in 0..dump.num_layers() {
        let scale = dump.meta.softmax_scale[l];
        for qi in (0..dump.query_positions.len()).step_by(9) {
            let p = dump.query_positions[qi];
            for qh in 0..dump.meta.q_heads {
                let kvh = dump.kv_head_of(qh);
                let q = dump.queries.row(l, qh, qi);
                let full = index.search(l, kvh, q, p, &cap).unwrap();
                // The caller's exact static log-sum-exp, as the engine passes it.
                let keys = dump.keys.slice2(l, kvh);
                let static_tokens = cap.static_tokens(p);
                let lse = log_sum_exp(static_tokens.iter().map(|&t| {
                    let key = &keys[t as usize * dim..(t as usize + 1) * dim];
                    (scale * dot(key, q), 1.0)
                }));
                let r = index
                    .search_with_static(l, kvh, q, p, &easy, Some(lse))
                    .unwrap();
                assert!(r.tokens.len() <= cap.budget_tokens(p));
                // Attended tokens are the best of the full-budget answer (which comes in no
                // particular order).
                let mut by_score: Vec<(f32, u32)> = full
                    .scores
                    .iter()
                    .copied()
                    .zip(full.tokens.iter().copied())
                    .collect();
                by_score.sort_by(|a, b| b.0.total_cmp(&a.0));
                let mut want: Vec<u32> = by_score[..r.tokens.len()].iter().map(|x| x.1).collect();
                let mut got = r.tokens.clone();
                want.sort_unstable();
                got.sort_unstable();
                assert_eq!(got, want);
                // Without the caller's static sum it is estimated from codes: still within cap.
                let c = index.search(l, kvh, q, p, &easy).unwrap();
                assert!(c.tokens.len() <= cap.budget_tokens(p));
                let rem = r.remainder.as_ref().unwrap();
                assert_eq!(
                    rem.tokens as usize,
                    p + 1 - cap.static_tokens(p).len() - r.tokens.len()
                );
                attended += r.tokens.len();
                capped += full.tokens.len();
            }
        }
    }
    println!("target 0.5: {attended} tokens attended, {capped} under the cap alone");
    assert!(
        capped > 0 && attended < capped / 2,
        "{attended} vs {capped}"
    );
    // A target outside (0, 1] is a typed error.
    for t in [0.0f32, 1.5, f32::NAN] {
        let bad = SearchParams {
            target_mass: Some(t),
            ..Default::default()
        };
        let p = dump.query_positions[0];
        let e = index
            .search(0, 0, dump.queries.row(0, 0, 0), p, &bad)
            .unwrap_err();
        assert!(
            matches!(
                e,
                IndexError::Param {
                    name: "target_mass",
                    ..
                }
            ),
            "{e}"
        );
    }
    let e = index
        .search_with_static(
            0,
            0,
            dump.queries.row(0, 0, 0),
            dump.query_positions[0],
            &easy,
            Some(f32::NAN),
        )
        .unwrap_err();
    assert!(e.to_string().contains("static log-sum-exp"), "{e}");
}

/// An index written by format version 1 (f32 centroids and value sums, no query metric),
/// committed under `fixtures/index-v1` with the tiny dump it was built from (160 tokens of
/// layer 3 of the SmolLM2 dump). It must open and answer exactly.
#[test]
fn index_written_by_format_version_1_opens_and_searches_exactly() {
    let index = opens_and_searches_exactly("index-v1");
    let m = index.manifest();
    assert!(!m.build.query_aware, "version 1 knew no query metric");
    assert!(m.heads.iter().all(|h| h.metric_queries == 0));
    // Upgraded in memory to the current centroid codes.
    assert_eq!(
        index.centroid_code_bits(),
        strata_index::manifest::CENTROID_CODE_BITS
    );
}

/// An index written by format version 2 (8-bit centroid codes), committed under
/// `fixtures/index-v2`, built from the same tiny dump: it opens as it is and answers exactly.
#[test]
fn index_written_by_format_version_2_opens_and_searches_exactly() {
    let index = opens_and_searches_exactly("index-v2");
    assert_eq!(index.centroid_code_bits(), 8);
    assert!(index.manifest().build.query_aware);
}

/// An index written by format version 3 (4-bit centroid codes, key codes of the keys),
/// committed under `fixtures/index-v3`, built from the same tiny dump: it opens as it is and
/// answers exactly.
#[test]
fn index_written_by_format_version_3_opens_and_searches_exactly() {
    let index = opens_and_searches_exactly("index-v3");
    assert_eq!(index.centroid_code_bits(), 4);
    assert!(index.manifest().heads.iter().all(|h| h.code_bits == 4));
}

/// An index written by format version 4 (3-bit residual codes, centroid codes holding the
/// lists' key means), committed under `fixtures/index-v4`, built from the same tiny dump: it
/// opens as it is, says its centroids are means, and answers exactly.
#[test]
fn index_written_by_format_version_4_opens_and_searches_exactly() {
    let index = opens_and_searches_exactly("index-v4");
    assert_eq!(index.centroid_code_bits(), 4);
    assert!(!index.fitted_routes());
    assert!(index.manifest().heads.iter().all(|h| h.code_bits == 3));
}

/// Opens the fixture index `name` and checks that a search attending everything returns every
/// visible, non-static token with its exact score and value.
fn opens_and_searches_exactly(name: &str) -> Index {
    let dump = tiny_dump();
    let index = open(&fixtures().join(name)).expect("the fixture index opens");
    let params = attend_everything();
    let dim = dump.meta.head_dim;
    for qh in 0..dump.meta.q_heads {
        let kvh = dump.kv_head_of(qh);
        for qi in 0..dump.query_positions.len() {
            let p = dump.query_positions[qi];
            let q = dump.queries.row(0, qh, qi);
            let r = index.search(0, kvh, q, p, &params).unwrap();
            let expect: Vec<u32> = (0..=p as u32)
                .filter(|&t| !params.is_static(t as usize, p))
                .collect();
            let mut got = r.tokens.clone();
            got.sort_unstable();
            assert_eq!(got, expect, "{name}: head {qh} query {qi}");
            let keys = dump.keys.slice2(0, kvh);
            let values = r.values.as_ref().unwrap();
            for (i, (t, s)) in r.tokens.iter().zip(&r.scores).enumerate() {
                let t = *t as usize;
                let e = dot(&keys[t * dim..(t + 1) * dim], q);
                assert!((e - s).abs() <= 1e-3 * (1.0 + e.abs()), "{name}: token {t}");
                assert_eq!(
                    &values[i * dim..(i + 1) * dim],
                    &dump.values.slice2(0, kvh)[t * dim..(t + 1) * dim]
                );
            }
        }
    }
    index
}

/// An index from a newer format version is refused, and the error names every version this
/// build reads (version 1 to the current one).
#[test]
fn an_index_of_a_newer_format_version_is_refused_naming_the_versions_read() {
    let tmp = tempfile::tempdir().unwrap();
    for name in ["index.strata", "layer-003.seg"] {
        std::fs::copy(
            fixtures().join("index-v1").join(name),
            tmp.path().join(name),
        )
        .unwrap();
    }
    let manifest = tmp.path().join("index.strata");
    let mut bytes = std::fs::read(&manifest).unwrap();
    // The footer's version word: 12 bytes into the 24-byte footer.
    let at = bytes.len() - 24 + 12;
    let newer = strata_index::manifest::INDEX_VERSION + 1;
    bytes[at..at + 4].copy_from_slice(&newer.to_le_bytes());
    std::fs::write(&manifest, &bytes).unwrap();
    let e = open(tmp.path())
        .err()
        .expect("a newer version is refused")
        .to_string();
    assert!(
        e.contains(&format!("unsupported format version {newer}")),
        "{e}"
    );
    assert!(
        e.contains(&format!(
            "reads versions 1 to {}",
            strata_index::manifest::INDEX_VERSION
        )),
        "{e}"
    );
}

/// Recall@100 of strata at a small probe over every 8th evaluation query of every head.
fn recall_at_probe(dump: &KvDump, index: &Index, probe_fraction: f32) -> f64 {
    let params = SearchParams {
        probe_fraction,
        ..Default::default()
    };
    let dim = dump.meta.head_dim;
    let (mut hits, mut total) = (0usize, 0usize);
    for l in 0..dump.num_layers() {
        for qh in 0..dump.meta.q_heads {
            let kvh = dump.kv_head_of(qh);
            let keys = dump.keys.slice2(l, kvh);
            for qi in (0..dump.query_positions.len()).step_by(8) {
                let p = dump.query_positions[qi];
                let q = dump.queries.row(l, qh, qi);
                let r = index.search(l, kvh, q, p, &params).unwrap();
                let mut exact: Vec<(f32, u32)> = (0..=p as u32)
                    .filter(|&t| !params.is_static(t as usize, p))
                    .map(|t| (dot(&keys[t as usize * dim..(t as usize + 1) * dim], q), t))
                    .collect();
                exact.sort_by(|a, b| b.0.total_cmp(&a.0));
                let got: std::collections::HashSet<u32> = r.tokens.iter().copied().collect();
                hits += exact
                    .iter()
                    .take(100)
                    .filter(|x| got.contains(&x.1))
                    .count();
                total += 100.min(exact.len());
            }
        }
    }
    hits as f64 / total as f64
}

/// The query-aware metric (fitted to the dump's train queries, never its evaluation queries)
/// groups what queries attend to: on Gemma-3's diffuse heads it finds more of the exact top-100
/// than key-distance clustering when both score the same share of the keys.
#[test]
fn query_aware_clustering_beats_key_clustering_on_gemma() {
    let Some(path) = shared_dump("gemma3-jargon-16k.safetensors") else {
        return;
    };
    let dump = KvDump::open(&path).expect("open dump");
    let tmp = tempfile::tempdir().unwrap();
    let mut recall = Vec::new();
    for query_aware in [true, false] {
        let dir = tmp.path().join(format!("qa-{query_aware}"));
        let params = BuildParams {
            query_aware,
            ..Default::default()
        };
        build_index(&dump, &params, &dir, false, &|_, _| {}).expect("build");
        let index = open(&dir).unwrap();
        let used = index.manifest().heads[0].metric_queries;
        assert_eq!(used > 0, query_aware, "metric queries recorded: {used}");
        recall.push(recall_at_probe(&dump, &index, 0.10));
    }
    println!(
        "recall@100 at probe 0.10: query-aware {:.3}, key distance {:.3}",
        recall[0], recall[1]
    );
    assert!(
        recall[0] > recall[1] + 0.03,
        "query-aware {:.3} vs key distance {:.3}",
        recall[0],
        recall[1]
    );
}

/// Attention mass (softmax over the open tokens, exact scores) of the budget's best tokens
/// inside the lists that `route` ranks best until they hold `probe_fraction` of the visible
/// tokens, averaged over every 8th evaluation query of every query head of `layer`.
fn routed_mass(
    dump: &KvDump,
    index: &Index,
    layer: usize,
    probe_fraction: f64,
    route: &dyn Fn(usize, &[f32]) -> Vec<f32>,
) -> f64 {
    let params = SearchParams::default();
    let dim = dump.meta.head_dim;
    let scale = dump.meta.softmax_scale[layer];
    let (mut sum, mut n) = (0.0, 0usize);
    for qh in 0..dump.meta.q_heads {
        let kvh = dump.kv_head_of(qh);
        let head = &index.manifest().heads[layer * dump.meta.kv_heads + kvh];
        let starts = strata_index::manifest::u32s(&head.primary_start);
        let members = strata_index::manifest::u32s(&head.primary_tokens);
        let keys = dump.keys.slice2(layer, kvh);
        for qi in (0..dump.query_positions.len()).step_by(8) {
            let p = dump.query_positions[qi];
            let q = dump.queries.row(layer, qh, qi);
            let open = |t: u32| t as usize <= p && !params.is_static(t as usize, p);
            let logits: Vec<f32> = (0..=p)
                .map(|t| scale * dot(&keys[t * dim..(t + 1) * dim], q))
                .collect();
            let max = (0..=p as u32)
                .filter(|&t| open(t))
                .map(|t| logits[t as usize])
                .fold(f32::NEG_INFINITY, f32::max);
            let weight = |t: u32| ((logits[t as usize] - max) as f64).exp();
            let total: f64 = (0..=p as u32).filter(|&t| open(t)).map(weight).sum();
            let scores = route(kvh, q);
            let mut order: Vec<usize> = (0..scores.len()).collect();
            order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
            let target = probe_fraction * (p + 1) as f64;
            let mut probed: Vec<f64> = Vec::new();
            for l in order {
                if probed.len() as f64 >= target {
                    break;
                }
                let list = &members[starts[l] as usize..starts[l + 1] as usize];
                probed.extend(list.iter().filter(|&&t| open(t)).map(|&t| weight(t)));
            }
            probed.sort_by(|a, b| b.total_cmp(a));
            let covered: f64 = probed.iter().take(params.budget_tokens(p)).sum();
            sum += covered / total;
            n += 1;
        }
    }
    sum / n as f64
}

/// The routing vectors a query-aware build fits to the train queries (never the evaluation
/// queries) rank lists better than the lists' key means: on Gemma-3's diffuse heads the lists
/// they probe first hold more of the evaluation queries' best tokens.
#[test]
fn fitted_routing_vectors_probe_more_attention_mass_than_key_means_on_gemma() {
    let Some(path) = shared_dump("gemma3-jargon-16k.safetensors") else {
        return;
    };
    let dump = KvDump::open(&path).expect("open dump");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("index");
    build_index(&dump, &BuildParams::default(), &dir, false, &|_, _| {}).expect("build");
    let index = open(&dir).unwrap();
    assert!(index.fitted_routes());
    let dim = dump.meta.head_dim;
    let kv_heads = dump.meta.kv_heads;
    let (mut fitted_sum, mut means_sum) = (0.0, 0.0);
    for layer in 0..dump.num_layers() {
        // What search scores: the decoded centroid codes.
        let decoded: Vec<Vec<f32>> = (0..kv_heads)
            .map(|h| {
                let head = &index.manifest().heads[layer * kv_heads + h];
                let sq = strata_index::codes::ScalarQuantizer {
                    bits: index.centroid_code_bits(),
                    lo: strata_index::manifest::f32s(&head.centroid_lo).to_vec(),
                    step: strata_index::manifest::f32s(&head.centroid_step).to_vec(),
                };
                head.centroid_codes
                    .chunks_exact(sq.code_bytes())
                    .flat_map(|c| sq.decode(c))
                    .collect()
            })
            .collect();
        // The lists' key means, exactly.
        let means: Vec<Vec<f32>> = (0..kv_heads)
            .map(|h| {
                let head = &index.manifest().heads[layer * kv_heads + h];
                let starts = strata_index::manifest::u32s(&head.primary_start);
                let members = strata_index::manifest::u32s(&head.primary_tokens);
                let keys = dump.keys.slice2(layer, h);
                starts
                    .windows(2)
                    .flat_map(|w| {
                        let m = &members[w[0] as usize..w[1] as usize];
                        (0..dim).map(move |d| {
                            m.iter().map(|&t| keys[t as usize * dim + d]).sum::<f32>()
                                / m.len().max(1) as f32
                        })
                    })
                    .collect()
            })
            .collect();
        let scores = |vectors: &[Vec<f32>], h: usize, q: &[f32]| -> Vec<f32> {
            vectors[h].chunks_exact(dim).map(|c| dot(c, q)).collect()
        };
        let fitted = routed_mass(&dump, &index, layer, 0.15, &|h, q| scores(&decoded, h, q));
        let mean = routed_mass(&dump, &index, layer, 0.15, &|h, q| scores(&means, h, q));
        println!("layer slot {layer}: covered mass at a 15% probe: fitted routes {fitted:.4}, key means {mean:.4}");
        fitted_sum += fitted;
        means_sum += mean;
    }
    let layers = dump.num_layers() as f64;
    let (fitted, means) = (fitted_sum / layers, means_sum / layers);
    println!("mean over layers: fitted {fitted:.4}, key means {means:.4}");
    assert!(
        fitted > means + 0.002,
        "fitted {fitted:.4} vs means {means:.4}"
    );
}
