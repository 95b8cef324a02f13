//! The decode engine on real KV caches: steps against exact attention, append and fold,
//! reuse and persistence, admission, bad input and damaged files.

use std::path::Path;

use strata_engine::attention::attend_logits;
use strata_engine::{Engine, EngineError, EngineParams, SessionSpec};
use strata_index::linalg::dot;
use strata_index::{BuildParams, HeadArrays, SearchParams};
use strata_storage::kvdump::KvDump;
use strata_storage::reader::ReaderPreference;
use strata_tests::{attend_everything, fixtures, reduced_dump, shared_dump, tiny_dump};

const PREFILL: usize = 1536;

/// A reduced SmolLM2 dump of 2048 tokens: the first 1536 are the prefill, the rest are fed
/// as decoding steps (real keys, values and queries).
fn dump(dir: &Path) -> Option<KvDump> {
    let src = KvDump::open(&shared_dump("smollm2-jargon-8k.safetensors")?).unwrap();
    let p = reduced_dump(&src, &[0, 3], 2048, &dir.join("d.safetensors"));
    Some(KvDump::open(&p).unwrap())
}

fn spec(d: &KvDump) -> SessionSpec {
    spec_of_prefix(d, PREFILL)
}

/// The session spec of the dump's first `tokens` tokens.
fn spec_of_prefix(d: &KvDump, tokens: usize) -> SessionSpec {
    SessionSpec {
        model: d.meta.model.clone(),
        layers: d.meta.layers.clone(),
        q_heads: d.meta.q_heads,
        kv_heads: d.meta.kv_heads,
        head_dim: d.meta.head_dim,
        softmax_scale: d.meta.softmax_scale.clone(),
        token_ids: d.token_ids[..tokens].to_vec(),
    }
}

/// The prefill's keys and values, and, for query-aware clustering, the queries the dump has at
/// prefill positions (of the first query head of each group: a contiguous block).
fn prefill(d: &KvDump) -> Vec<HeadArrays<'_>> {
    let dim = d.meta.head_dim;
    let group = d.meta.q_heads / d.meta.kv_heads;
    assert!(d.query_positions.windows(2).all(|w| w[0] <= w[1]));
    let before = d.query_positions.partition_point(|&p| p < PREFILL);
    let mut out = Vec::new();
    for l in 0..d.num_layers() {
        for h in 0..d.meta.kv_heads {
            out.push(HeadArrays {
                keys: &d.keys.slice2(l, h)[..PREFILL * dim],
                values: &d.values.slice2(l, h)[..PREFILL * dim],
                queries: &d.queries.slice2(l, h * group)[..before * dim],
            });
        }
    }
    out
}

/// Engine parameters that fold every `fold_tokens` appended tokens, without prefetch (so that
/// a test's steps are the only cache traffic).
fn folding_every(fold_tokens: u32) -> EngineParams {
    EngineParams {
        fold_tokens,
        prefetch: false,
        ..Default::default()
    }
}

fn engine(root: &Path, params: EngineParams, search: SearchParams) -> Engine {
    Engine::new(
        root,
        params,
        search,
        BuildParams::default(),
        ReaderPreference::Auto,
    )
    .unwrap()
}

/// The step inputs of position `p` (a real token of the dump): queries of every head (the
/// prefill query nearest that position), and the token's own K/V.
fn inputs(d: &KvDump, layer: usize, p: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let dim = d.meta.head_dim;
    let qi = (p * 7) % d.query_positions.len();
    let mut q = Vec::new();
    for h in 0..d.meta.q_heads {
        q.extend_from_slice(d.queries.row(layer, h, qi));
    }
    let mut k = Vec::new();
    let mut v = Vec::new();
    for h in 0..d.meta.kv_heads {
        k.extend_from_slice(&d.keys.slice2(layer, h)[p * dim..(p + 1) * dim]);
        v.extend_from_slice(&d.values.slice2(layer, h)[p * dim..(p + 1) * dim]);
    }
    (q, k, v)
}

/// Exact attention of query head `qh` over positions 0..=p.
fn exact(d: &KvDump, layer: usize, qh: usize, q: &[f32], p: usize) -> (Vec<f32>, f32) {
    let dim = d.meta.head_dim;
    let kvh = d.kv_head_of(qh);
    let keys = &d.keys.slice2(layer, kvh)[..(p + 1) * dim];
    let values = &d.values.slice2(layer, kvh)[..(p + 1) * dim];
    let s = d.meta.softmax_scale[layer];
    let logits: Vec<f32> = keys.chunks_exact(dim).map(|k| s * dot(k, q)).collect();
    let a = attend_logits(&logits, values, dim);
    (a.output, a.lse)
}

fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

fn full_search() -> SearchParams {
    SearchParams {
        estimate_remainder: false,
        ..attend_everything()
    }
}

#[test]
fn steps_with_full_budget_equal_exact_attention_through_folds() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(d) = dump(tmp.path()) else { return };
    let params = folding_every(96);
    let e = engine(&tmp.path().join("root"), params, full_search());
    let id = e.create_session(spec(&d), Some(&prefill(&d))).unwrap();
    let mut folded_seen = false;
    for p in PREFILL..PREFILL + 300 {
        for layer in 0..2 {
            let (q, k, v) = inputs(&d, layer, p);
            let out = e.step(id, layer, &q, &k, &v).unwrap();
            assert_eq!(out.telemetry.position, p);
            folded_seen |= out.telemetry.deltas > 0;
            if p % 50 == 0 || p == PREFILL {
                for qh in 0..d.meta.q_heads {
                    let (o, lse) = exact(&d, layer, qh, &q[qh * 64..(qh + 1) * 64], p);
                    let err = rel_err(&out.heads[qh].output, &o);
                    assert!(err < 2e-3, "p {p} layer {layer} head {qh}: error {err}");
                    assert!((out.heads[qh].lse - lse).abs() < 2e-3);
                }
            }
        }
        if p == PREFILL + 200 {
            e.finish_folds(id).unwrap();
        }
    }
    assert!(
        folded_seen,
        "the old tail was never folded into a delta index"
    );
    assert_eq!(e.info(id).unwrap().lengths, vec![PREFILL + 300; 2]);
    // Folds are clustered under the metric of the recent steps' queries.
    let dir = e.info(id).unwrap().dir;
    let mut deltas = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if !path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("delta-")
        {
            continue;
        }
        let index = strata_index::Index::open(
            &path,
            ReaderPreference::Auto,
            std::sync::Arc::new(strata_storage::cache::RamCache::new(0)),
        )
        .unwrap();
        for h in index.manifest().heads.iter() {
            assert!(
                h.metric_queries > 0,
                "{}: fold without queries",
                path.display()
            );
        }
        deltas += 1;
    }
    assert!(deltas > 0, "no delta index in {}", dir.display());
}

#[test]
fn default_budget_is_close_to_exact_and_reports_tiers() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(d) = dump(tmp.path()) else { return };
    let e = engine(
        &tmp.path().join("root"),
        EngineParams::default(),
        SearchParams::default(),
    );
    let id = e.create_session(spec(&d), Some(&prefill(&d))).unwrap();
    let mut errs = Vec::new();
    let mut ssd = 0;
    let mut ram = 0;
    for p in PREFILL..PREFILL + 40 {
        let (q, k, v) = inputs(&d, 1, p);
        let out = e.step(id, 1, &q, &k, &v).unwrap();
        let t = out.telemetry;
        assert!(t.retrieved_tokens <= (0.02 * PREFILL as f64) as u64 * d.meta.q_heads as u64);
        assert_eq!(t.tokens_attended, t.static_tokens + t.retrieved_tokens);
        // The searches read at least the f16 key and value of every token they returned.
        assert!(
            t.search_bytes >= t.retrieved_tokens * 64 * 2 * 2,
            "{} bytes read for {} tokens",
            t.search_bytes,
            t.retrieved_tokens
        );
        ssd += t.lists_from_ssd;
        ram += t.lists_from_ram;
        for qh in 0..d.meta.q_heads {
            let (o, _) = exact(&d, 1, qh, &q[qh * 64..(qh + 1) * 64], p);
            errs.push(rel_err(&out.heads[qh].output, &o));
        }
    }
    let mean = errs.iter().sum::<f64>() / errs.len() as f64;
    println!("mean output error {mean:.4}, lists from ssd {ssd}, from ram {ram}");
    // 2% of a 1536-token prefill is only 30 tokens; the shared 8K dumps reach 0.06.
    assert!(mean < 0.3, "mean output error {mean}");
    assert!(ssd > 0 && ram > 0);
    let c = e.cache_stats();
    assert!(c.prefetch_insertions + c.hits > 0);
}

#[test]
fn bad_input_is_refused_and_the_session_stays_usable() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(d) = dump(tmp.path()) else { return };
    let e = engine(
        &tmp.path().join("root"),
        EngineParams::default(),
        SearchParams::default(),
    );
    let id = e.create_session(spec(&d), Some(&prefill(&d))).unwrap();
    let (q, k, v) = inputs(&d, 0, PREFILL);
    let msg = |r: Result<_, EngineError>| match r {
        Err(EngineError::BadInput { problem, .. }) => problem,
        Err(other) => panic!("wrong error: {other}"),
        Ok(_) => panic!("accepted bad input"),
    };
    assert!(msg(e.step(id, 0, &q[..64 * 8], &k, &v)).contains("queries"));
    assert!(msg(e.step(id, 0, &q, &k[..64], &v)).contains("new keys"));
    assert!(msg(e.step(id, 5, &q, &k, &v)).contains("layer slot 5"));
    let mut nan = q.clone();
    nan[70] = f32::NAN;
    assert!(msg(e.step(id, 0, &nan, &k, &v)).contains("head 1, dim 6"));
    let mut inf = v.clone();
    inf[3] = f32::INFINITY;
    assert!(msg(e.step(id, 0, &q, &k, &inf)).contains("new values"));
    // Finite, but beyond what f16 storage holds or what f32 logits can take.
    let mut wide = k.clone();
    wide[5] = 1e6;
    assert!(msg(e.step(id, 0, &q, &wide, &v)).contains("beyond f16"));
    let mut huge = q.clone();
    huge[0] = 1e36;
    assert!(msg(e.step(id, 0, &huge, &k, &v)).contains("too large"));
    // Nothing was appended by the refused steps.
    assert_eq!(e.info(id).unwrap().lengths[0], PREFILL);
    e.step(id, 0, &q, &k, &v).unwrap();
    assert_eq!(e.info(id).unwrap().lengths[0], PREFILL + 1);
    // Unknown and dropped sessions.
    assert!(matches!(
        e.step(999, 0, &q, &k, &v),
        Err(EngineError::UnknownSession(999))
    ));
    e.drop_session(id).unwrap();
    assert!(matches!(
        e.step(id, 0, &q, &k, &v),
        Err(EngineError::UnknownSession(_))
    ));
    assert!(matches!(
        e.drop_session(id),
        Err(EngineError::UnknownSession(_))
    ));
}

#[test]
fn sessions_reuse_indexes_and_survive_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(d) = dump(tmp.path()) else { return };
    let root = tmp.path().join("root");
    let params = folding_every(64);
    // Reference: one session that never restarts. Full-budget search makes the answer
    // independent of when the background folds land.
    let reference: Vec<Vec<f32>> = {
        let e = engine(&tmp.path().join("ref"), params.clone(), full_search());
        let id = e.create_session(spec(&d), Some(&prefill(&d))).unwrap();
        (PREFILL..PREFILL + 200)
            .map(|p| {
                let (q, k, v) = inputs(&d, 0, p);
                if p == PREFILL + 150 {
                    e.finish_folds(id).unwrap();
                }
                e.step(id, 0, &q, &k, &v).unwrap().heads[0].output.clone()
            })
            .collect()
    };
    {
        let e = engine(&root, params.clone(), full_search());
        let id = e.create_session(spec(&d), Some(&prefill(&d))).unwrap();
        assert!(!e.info(id).unwrap().reused_index);
        for p in PREFILL..PREFILL + 150 {
            let (q, k, v) = inputs(&d, 0, p);
            let out = e.step(id, 0, &q, &k, &v).unwrap();
            assert!(rel_err(&out.heads[0].output, &reference[p - PREFILL]) < 1e-5);
        }
        e.close_session(id).unwrap();
    }
    // A new engine on the same folder: no prefill needed, the tail and its deltas come back.
    let e = engine(&root, params, full_search());
    let id = e.create_session(spec(&d), None).unwrap();
    let info = e.info(id).unwrap();
    assert!(info.reused_index);
    assert_eq!(info.lengths, vec![PREFILL + 150, PREFILL]);
    for p in PREFILL + 150..PREFILL + 200 {
        let (q, k, v) = inputs(&d, 0, p);
        let out = e.step(id, 0, &q, &k, &v).unwrap();
        assert!(
            rel_err(&out.heads[0].output, &reference[p - PREFILL]) < 1e-5,
            "position {p}"
        );
    }
    // Another context with no prefill cannot be opened.
    let mut other = spec(&d);
    other.token_ids[0] += 1;
    assert!(matches!(
        e.create_session(other, None),
        Err(EngineError::Spec(_))
    ));
}

#[test]
fn admission_control_refuses_what_the_budgets_cannot_hold() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(d) = dump(tmp.path()) else { return };
    let small_ram = EngineParams {
        ram_budget_bytes: 1 << 20,
        ram_cache_bytes: 512 << 10,
        ..Default::default()
    };
    let e = engine(&tmp.path().join("a"), small_ram, SearchParams::default());
    let err = e
        .create_session(spec(&d), Some(&prefill(&d)))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("admission") && err.contains("resident RAM"),
        "{err}"
    );
    let small_disk = EngineParams {
        disk_budget_bytes: 1 << 20,
        ..Default::default()
    };
    let e = engine(&tmp.path().join("b"), small_disk, SearchParams::default());
    let err = e
        .create_session(spec(&d), Some(&prefill(&d)))
        .unwrap_err()
        .to_string();
    assert!(err.contains("admission") && err.contains("disk"), "{err}");
    // Budgets that fit take the session; a second session over the same context is refused.
    let e = engine(
        &tmp.path().join("c"),
        EngineParams::default(),
        SearchParams::default(),
    );
    e.create_session(spec(&d), Some(&prefill(&d))).unwrap();
    let err = e
        .create_session(spec(&d), Some(&prefill(&d)))
        .unwrap_err()
        .to_string();
    assert!(err.contains("already open"), "{err}");
}

#[test]
fn a_folded_delta_is_in_ram_before_its_first_search() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(d) = dump(tmp.path()) else { return };
    let e = engine(&tmp.path().join("root"), folding_every(64), full_search());
    let id = e.create_session(spec(&d), Some(&prefill(&d))).unwrap();
    e.preload(id).unwrap();
    let mut checked = false;
    for p in PREFILL..PREFILL + 140 {
        let (q, k, v) = inputs(&d, 0, p);
        let out = e.step(id, 0, &q, &k, &v).unwrap();
        if out.telemetry.deltas > 0 && !checked {
            // The first step that searches the new delta reads all of it (full budget).
            assert_eq!(
                out.telemetry.lists_from_ssd, 0,
                "p {p}: the delta's lists were read from disk by a step"
            );
            checked = true;
        }
        if p == PREFILL + 129 {
            e.finish_folds(id).unwrap();
        }
    }
    assert!(checked, "no fold was installed");
}

#[test]
fn a_failed_fold_keeps_tokens_static_and_the_session_usable() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(d) = dump(tmp.path()) else { return };
    let params = folding_every(64);
    let e = engine(&tmp.path().join("root"), params, full_search());
    let id = e.create_session(spec(&d), Some(&prefill(&d))).unwrap();
    // Block the folder the first fold will write (as a full or broken disk would).
    let dir = e.info(id).unwrap().dir;
    let blocked = dir.join(format!("delta-l000-{:010}-{:010}", PREFILL, PREFILL + 64));
    std::fs::write(&blocked, b"not a folder").unwrap();
    for p in PREFILL..PREFILL + 140 {
        let (q, k, v) = inputs(&d, 0, p);
        let out = e.step(id, 0, &q, &k, &v).unwrap();
        if p == PREFILL + 129 {
            e.finish_folds(id).unwrap();
        }
        if p == PREFILL + 139 {
            let (o, _) = exact(&d, 0, 0, &q[..64], p);
            assert!(rel_err(&out.heads[0].output, &o) < 2e-3);
        }
    }
    let err = e.fold_error(id, 0).unwrap().expect("fold error recorded");
    assert!(err.contains("delta-l000"), "{err}");
    assert_eq!(e.info(id).unwrap().failed, None);
}

#[test]
fn a_corrupt_posting_list_fails_the_session_with_a_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(d) = dump(tmp.path()) else { return };
    let params = EngineParams {
        prefetch: false,
        ..Default::default()
    };
    let root = tmp.path().join("root");
    {
        let e = engine(&root, params.clone(), full_search());
        e.create_session(spec(&d), Some(&prefill(&d))).unwrap();
    }
    // Flip one byte inside the first list of layer slot 1's segment, then reopen.
    let session_dir = std::fs::read_dir(&root)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let seg = session_dir
        .join("index")
        .join(format!("layer-{:03}.seg", d.meta.layers[1]));
    // A list holding none of the resident rows (sinks, window edge), so that the session opens.
    let offset = {
        let ix = strata_index::Index::open(
            &session_dir.join("index"),
            ReaderPreference::Auto,
            std::sync::Arc::new(strata_storage::cache::RamCache::new(0)),
        )
        .unwrap();
        let head = ix.head(1, 0).unwrap();
        let starts = strata_index::manifest::u32s(&head.primary_start);
        let toks = strata_index::manifest::u32s(&head.primary_tokens);
        let l = (0..head.lists.len())
            .find(|&l| {
                toks[starts[l] as usize..starts[l + 1] as usize]
                    .iter()
                    .all(|&t| t >= 4 && (t as usize) < PREFILL - 64)
            })
            .unwrap();
        head.lists[l].offset.to_native() as usize
    };
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes[offset + 100] ^= 0x10;
    std::fs::write(&seg, &bytes).unwrap();
    let e = engine(&root, params, full_search());
    let id = e.create_session(spec(&d), None).unwrap();
    let (q, k, v) = inputs(&d, 1, PREFILL);
    let err = e.step(id, 1, &q, &k, &v).unwrap_err().to_string();
    assert!(err.contains("checksum"), "{err}");
    let again = e.step(id, 0, &q, &k, &v).unwrap_err();
    assert!(
        matches!(again, EngineError::SessionFailed { .. }),
        "{again}"
    );
    let info = e.info(id).unwrap();
    assert!(info.failed.unwrap().contains("checksum"));
    // The failed step was undone: a tail saved now does not hold its token.
    assert_eq!(info.lengths, vec![PREFILL; 2]);
}

/// Dropping or closing a session waits for its steps and folds: afterwards nothing writes into
/// its folder (no build in progress, every delta complete), and steps are refused.
#[test]
fn dropping_a_session_waits_for_its_folds() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(d) = dump(tmp.path()) else { return };
    let root = tmp.path().join("root");
    let e = engine(&root, folding_every(64), SearchParams::default());
    let id = e.create_session(spec(&d), Some(&prefill(&d))).unwrap();
    let dir = e.info(id).unwrap().dir;
    // 128 steps start the first fold (64 tokens past the 64-token window); drop right away.
    for p in PREFILL..PREFILL + 129 {
        let (q, k, v) = inputs(&d, 0, p);
        e.step(id, 0, &q, &k, &v).unwrap();
    }
    e.drop_session(id).unwrap();
    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|x| x.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !names.iter().any(|n| n.contains(".building-")),
        "a fold still building after drop: {names:?}"
    );
    assert!(!deltas_in(&dir).is_empty(), "the fold did not finish");
    let (q, k, v) = inputs(&d, 0, PREFILL + 129);
    assert!(matches!(
        e.step(id, 0, &q, &k, &v),
        Err(EngineError::UnknownSession(_))
    ));
    // No tail was saved, so the delta is of no use to a later session over the context, and
    // neither is a crashed process's build scratch: reopening removes both, keeps the index.
    let scratch = dir.join(".delta-l000-0000000001-0000000002.building-4000000000-0");
    std::fs::create_dir(&scratch).unwrap();
    std::fs::write(scratch.join("segment"), b"partial").unwrap();
    let before = e.info(id).map(|i| i.disk_bytes);
    assert!(before.is_err(), "the dropped session is gone");
    let id2 = e.create_session(spec(&d), None).unwrap();
    let info = e.info(id2).unwrap();
    assert_eq!(info.lengths, vec![PREFILL; 2], "continues from the prefill");
    assert!(deltas_in(&dir).is_empty(), "an unused delta was kept");
    assert!(!scratch.exists(), "a crashed build's scratch was kept");
    assert!(dir.join("index").exists());
    let (q, k, v) = inputs(&d, 0, PREFILL);
    e.step(id2, 0, &q, &k, &v).unwrap();
}

#[test]
fn specs_parameters_and_prefill_values_are_validated() {
    let tmp = tempfile::tempdir().unwrap();
    // fold_tokens 0 would fold every step.
    let e = Engine::new(
        &tmp.path().join("a"),
        EngineParams {
            fold_tokens: 0,
            ..Default::default()
        },
        SearchParams::default(),
        BuildParams::default(),
        ReaderPreference::Auto,
    );
    assert!(matches!(e, Err(EngineError::Spec(m)) if m.contains("fold_tokens")));
    for margin in [0.5f32, f32::INFINITY, f32::NAN] {
        let e = Engine::new(
            &tmp.path().join("a"),
            EngineParams {
                prefetch_margin: margin,
                ..Default::default()
            },
            SearchParams::default(),
            BuildParams::default(),
            ReaderPreference::Auto,
        );
        assert!(matches!(e, Err(EngineError::Spec(m)) if m.contains("prefetch_margin")));
    }
    let Some(d) = dump(tmp.path()) else { return };
    let e = engine(
        &tmp.path().join("b"),
        EngineParams::default(),
        SearchParams::default(),
    );
    // Repeated layer ids would share a segment file.
    let mut dup = spec(&d);
    dup.layers = vec![3, 3];
    let err = e
        .create_session(dup, Some(&prefill(&d)))
        .unwrap_err()
        .to_string();
    assert!(err.contains("repeat"), "{err}");
    // Sizes an index cannot record, or whose step inputs would overflow.
    let mut huge = spec(&d);
    huge.q_heads = huge.kv_heads << 40;
    let err = e.create_session(huge, None).unwrap_err().to_string();
    assert!(err.contains("exceed u32"), "{err}");
    // A value beyond the f16 range of the lists is refused, not stored as infinity.
    let mut big = d.keys.slice2(0, 0)[..PREFILL * 64].to_vec();
    big[10] = 1e6;
    let mut heads = prefill(&d);
    heads[0].keys = &big;
    let err = e
        .create_session(spec(&d), Some(&heads))
        .unwrap_err()
        .to_string();
    assert!(err.contains("f16 range"), "{err}");
    // Prefill queries for the clustering metric: NaN, and a length that is not whole rows.
    let mut nan_queries = prefill(&d)[0].queries.to_vec();
    nan_queries[5] = f32::NAN;
    let mut heads = prefill(&d);
    heads[0].queries = &nan_queries;
    let err = e
        .create_session(spec(&d), Some(&heads))
        .unwrap_err()
        .to_string();
    assert!(err.contains("training query float 5 is NaN"), "{err}");
    let ragged = &nan_queries[..70];
    let mut heads = prefill(&d);
    heads[0].queries = ragged;
    let err = e
        .create_session(spec(&d), Some(&heads))
        .unwrap_err()
        .to_string();
    assert!(err.contains("70 query floats"), "{err}");
    assert!(e.session_ids().is_empty());
}

/// Copies a folder tree (a committed fixture, into a scratch folder the test may change).
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// Steps layer 0 of `d` through `positions` with real inputs and checks every query head's
/// output and log-sum-exp against exact attention over positions 0..=p (the session searches
/// with a full budget).
fn steps_match_exact(e: &Engine, id: u64, d: &KvDump, positions: std::ops::Range<usize>) {
    let dim = d.meta.head_dim;
    for p in positions {
        let (q, k, v) = inputs(d, 0, p);
        let out = e.step(id, 0, &q, &k, &v).unwrap();
        for (qh, head) in out.heads.iter().enumerate() {
            let (want, lse) = exact(d, 0, qh, &q[qh * dim..(qh + 1) * dim], p);
            assert!(
                rel_err(&head.output, &want) < 1e-4,
                "position {p} head {qh}"
            );
            assert!((head.lse - lse).abs() < 1e-3, "position {p} head {qh}");
        }
    }
}

/// The setting the tiny-dump sessions (and `fixtures/session-tail-v1`) use: a window of 8
/// tokens and folds of 16, so that a few dozen steps fold, with a full-budget search whose
/// answers are exact.
fn tiny_engine(root: &Path) -> Engine {
    let search = SearchParams {
        recent_tokens: 8,
        ..full_search()
    };
    engine(root, folding_every(16), search)
}

/// `fixtures/session-tail-v1` is a session folder written by the build before tail format 2:
/// a 96-token prefill of the tiny dump (`fixtures/tiny-smollm2.safetensors`), 48 appended
/// steps with a window of 8 and folds of 16 tokens, then `close_session`. It must reopen with
/// its tail and delta, and answer the next steps exactly.
#[test]
fn a_tail_written_by_format_version_1_reopens() {
    let d = tiny_dump();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    copy_tree(&fixtures().join("session-tail-v1"), &root);
    let e = tiny_engine(&root);
    let (prefill, appended) = (96, 48);
    let id = e.create_session(spec_of_prefix(&d, prefill), None).unwrap();
    let info = e.info(id).unwrap();
    assert!(info.reused_index);
    assert_eq!(info.lengths, vec![prefill + appended]);
    steps_match_exact(&e, id, &d, prefill + appended..d.token_ids.len());
    // Closing writes the current version, which reopens too.
    e.close_session(id).unwrap();
    let e = engine(&root, folding_every(16), full_search());
    let id = e.create_session(spec_of_prefix(&d, prefill), None).unwrap();
    assert_eq!(e.info(id).unwrap().lengths, vec![d.token_ids.len()]);
}

/// Delta indexes under `dir`, opened.
fn deltas_in(dir: &Path) -> Vec<strata_index::Index> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("delta-")
        {
            out.push(
                strata_index::Index::open(
                    &path,
                    ReaderPreference::Auto,
                    std::sync::Arc::new(strata_storage::cache::RamCache::new(0)),
                )
                .unwrap(),
            );
        }
    }
    out
}

/// The recent queries (the next fold's metric) are part of the persisted tail: a fold soon
/// after a restart is clustered under the queries of the steps before it.
#[test]
fn recent_queries_survive_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(d) = dump(tmp.path()) else { return };
    let root = tmp.path().join("root");
    // 30 steps of queries (90 rows per KV head, over the 64 the metric needs); the first fold
    // comes once 64 tokens have left the 64-token window, after 128 steps.
    let params = EngineParams {
        fold_query_steps: 30,
        ..folding_every(64)
    };
    let group = d.meta.q_heads / d.meta.kv_heads;
    let before = 120;
    {
        let e = engine(&root, params.clone(), SearchParams::default());
        let id = e.create_session(spec(&d), Some(&prefill(&d))).unwrap();
        for p in PREFILL..PREFILL + before {
            let (q, k, v) = inputs(&d, 0, p);
            e.step(id, 0, &q, &k, &v).unwrap();
        }
        e.close_session(id).unwrap();
    }
    let e = engine(&root, params, SearchParams::default());
    let id = e.create_session(spec(&d), None).unwrap();
    let dir = e.info(id).unwrap().dir;
    assert!(deltas_in(&dir).is_empty(), "a fold before the restart");
    // Fewer steps than the metric needs on their own (16 × 3 rows < 64 dims).
    for p in PREFILL + before..PREFILL + before + 16 {
        let (q, k, v) = inputs(&d, 0, p);
        e.step(id, 0, &q, &k, &v).unwrap();
    }
    e.finish_folds(id).unwrap();
    let deltas = deltas_in(&dir);
    assert!(!deltas.is_empty(), "no fold after the restart");
    for index in &deltas {
        for h in index.manifest().heads.iter() {
            assert_eq!(h.metric_queries, (30 * group) as u32);
        }
    }
}

/// A prefill shorter than the sinks: the positions up to `sink_tokens` stay sinks when they
/// arrive as steps, folds start after them, and the session's tail reopens.
#[test]
fn a_prefill_shorter_than_the_sinks_folds_and_reopens_exactly() {
    let d = tiny_dump();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let (prefill, dim) = (2, d.meta.head_dim);
    let heads: Vec<HeadArrays> = (0..d.meta.kv_heads)
        .map(|h| HeadArrays {
            keys: &d.keys.slice2(0, h)[..prefill * dim],
            values: &d.values.slice2(0, h)[..prefill * dim],
            queries: &[],
        })
        .collect();
    {
        let e = tiny_engine(&root);
        let id = e
            .create_session(spec_of_prefix(&d, prefill), Some(&heads))
            .unwrap();
        steps_match_exact(&e, id, &d, prefill..80);
        e.finish_folds(id).unwrap();
        assert!(!deltas_in(&e.info(id).unwrap().dir).is_empty(), "no fold");
        e.close_session(id).unwrap();
    }
    let e = tiny_engine(&root);
    let id = e.create_session(spec_of_prefix(&d, prefill), None).unwrap();
    assert_eq!(
        e.info(id).unwrap().lengths,
        vec![80],
        "the tail was not restored"
    );
    steps_match_exact(&e, id, &d, 80..d.token_ids.len());
}

/// An index is reused only for the same shape and scales: another softmax scale over the same
/// tokens rebuilds, and the old tail is set aside rather than mixed in.
#[test]
fn another_softmax_scale_rebuilds_instead_of_reusing() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(d) = dump(tmp.path()) else { return };
    let root = tmp.path().join("root");
    {
        let e = engine(&root, folding_every(64), full_search());
        let id = e.create_session(spec(&d), Some(&prefill(&d))).unwrap();
        for p in PREFILL..PREFILL + 10 {
            let (q, k, v) = inputs(&d, 0, p);
            e.step(id, 0, &q, &k, &v).unwrap();
        }
        e.close_session(id).unwrap();
    }
    let e = engine(&root, folding_every(64), full_search());
    let mut other = spec(&d);
    other.softmax_scale[0] *= 0.5;
    // Without prefill there is nothing to rebuild from: refused, not reused, and the tail of
    // the index that is there stays.
    assert!(matches!(
        e.create_session(other.clone(), None),
        Err(EngineError::Spec(_))
    ));
    let dir = std::fs::read_dir(&root)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    assert!(dir.join("tail.strata").exists());
    let id = e.create_session(other, Some(&prefill(&d))).unwrap();
    let info = e.info(id).unwrap();
    assert!(!info.reused_index);
    assert_eq!(info.lengths, vec![PREFILL; 2]);
    assert!(info.dir.join("tail.strata.unusable").exists());
}

/// A tail file whose checksum holds but whose header claims more rows than it carries (or
/// lengths that overflow) is set aside with a warning; the session continues from its prefill.
#[test]
fn a_tail_that_claims_more_than_it_holds_is_set_aside() {
    let d = tiny_dump();
    for claimed in [1usize << 57, usize::MAX / 2, 100_000] {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        copy_tree(&fixtures().join("session-tail-v1"), &root);
        let session = std::fs::read_dir(&root)
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        let tail = session.join("tail.strata");
        let bytes = std::fs::read(&tail).unwrap();
        let payload = &bytes[..bytes.len() - 24];
        let hlen = u64::from_le_bytes(payload[..8].try_into().unwrap()) as usize;
        let mut header: serde_json::Value = serde_json::from_slice(&payload[8..8 + hlen]).unwrap();
        header["layers"][0]["len"] = serde_json::json!(claimed);
        let json = serde_json::to_vec(&header).unwrap();
        let mut forged = (json.len() as u64).to_le_bytes().to_vec();
        forged.extend_from_slice(&json);
        forged.extend_from_slice(&payload[8 + hlen..]);
        let foot = strata_storage::footer::encode_footer(*b"STRTAIL\x01", 1, &forged);
        forged.extend_from_slice(&foot);
        std::fs::write(&tail, &forged).unwrap();
        let e = tiny_engine(&root);
        let id = e.create_session(spec_of_prefix(&d, 96), None).unwrap();
        assert_eq!(e.info(id).unwrap().lengths, vec![96], "claimed {claimed}");
        assert!(session.join("tail.strata.unusable").exists());
    }
}
