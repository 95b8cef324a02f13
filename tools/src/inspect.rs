//! `strata inspect`: parameters (with defaults) and statistics of an index.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Result};
use strata_index::baselines::BaselineParams;
use strata_index::manifest::{f32s, u32s};
use strata_index::params::param_rows;
use strata_index::{BuildParams, Index, SearchParams};
use strata_storage::cache::RamCache;
use strata_storage::reader::ReaderPreference;

fn print_table(title: &str, rows: &[(String, String)], defaults: &[(String, String)]) {
    println!("{title}");
    for (k, v) in rows {
        let d = defaults
            .iter()
            .find(|(dk, _)| dk == k)
            .map(|(_, dv)| dv.as_str())
            .unwrap_or("");
        let mark = if d == v { "" } else { "  (default " };
        let end = if d == v { "" } else { ")" };
        println!("  {k:<26} {v}{mark}{}{end}", if d == v { "" } else { d });
    }
}

pub fn run(dir: Option<&Path>, defaults: bool, verify: bool) -> Result<()> {
    let build_defaults = param_rows(&BuildParams::default());
    let search_defaults = param_rows(&SearchParams::default());
    let baseline_defaults = param_rows(&BaselineParams::default());
    if defaults || dir.is_none() {
        print_table(
            "build parameters (strata build --set)",
            &build_defaults,
            &build_defaults,
        );
        print_table(
            "search parameters (strata eval --set)",
            &search_defaults,
            &search_defaults,
        );
        print_table(
            "baseline parameters (strata eval --set)",
            &baseline_defaults,
            &baseline_defaults,
        );
        let engine_defaults = param_rows(&strata_engine::EngineParams::default());
        print_table(
            "engine parameters (strata bench decode / eval --set)",
            &engine_defaults,
            &engine_defaults,
        );
        match strata_gpu::probe() {
            Ok(s) => println!("gpu: {s:?}"),
            Err(e) => println!("gpu: {e}"),
        }
        if dir.is_none() {
            return Ok(());
        }
    }
    let Some(dir) = dir else {
        bail!("no index folder given")
    };
    let index = Index::open(dir, ReaderPreference::Auto, Arc::new(RamCache::new(0)))?;
    let m = index.manifest();
    let build: BuildParams = index.build_params()?;
    let src = &m.source;
    println!("index {}", dir.display());
    println!(
        "  source      {} ({}), model {} [{}]",
        src.dump_path, src.content_hash, src.model, src.model_type
    );
    println!(
        "  shape       layers {:?}, {} q heads / {} kv heads, head dim {}, {} tokens",
        src.layers.iter().map(|l| l.to_native()).collect::<Vec<_>>(),
        src.q_heads,
        src.kv_heads,
        src.head_dim,
        src.tokens
    );
    let key_bits = m.build.code_bits.to_native();
    println!(
        "  files       manifest {:.2} MiB (mapped, {}-bit centroid codes, {key_bits}-bit {} codes), {} segment files, reader {}",
        index_bytes(dir) as f64 / (1 << 20) as f64,
        index.centroid_code_bits(),
        if key_bits == strata_index::codes::RESIDUAL_CODE_BITS {
            "residual"
        } else {
            "key"
        },
        m.segments.len(),
        index
            .reader_kind()
            .map(|k| k.to_string())
            .unwrap_or_default()
    );
    println!("  built in    {:.2} s", m.build_seconds.to_native());
    print_table("build parameters", &param_rows(&build), &build_defaults);
    println!(
        "per head: lists, members/list (min/mean/max), replicas, groups, radius mean, segment MiB, clustering metric and routing"
    );
    for h in m.heads.iter() {
        let starts = u32s(&h.primary_start);
        let sizes: Vec<u32> = starts.windows(2).map(|w| w[1] - w[0]).collect();
        let lists = sizes.len().max(1);
        let min = sizes.iter().min().copied().unwrap_or(0);
        let max = sizes.iter().max().copied().unwrap_or(0);
        let radius = f32s(&h.radius);
        let seg_bytes: u64 = h
            .lists
            .iter()
            .map(|l| l.padded_len.to_native() as u64)
            .sum();
        println!(
            "  layer {:>2} kv {:>2}: {:>5} lists, {}/{:.1}/{} members, {:>6} replicas, {:>3} groups, radius {:.3}, {:.2} MiB, {}",
            src.layers[h.layer_slot.to_native() as usize],
            h.kv_head,
            sizes.len(),
            min,
            h.tokens.to_native() as f64 / lists as f64,
            max,
            h.replicas,
            h.group_start.len().saturating_sub(1),
            radius.iter().sum::<f32>() / radius.len().max(1) as f32,
            seg_bytes as f64 / (1 << 20) as f64,
            match h.metric_queries.to_native() {
                0 => "key distance, routing by key means".to_string(),
                n if index.fitted_routes()
                    && strata_index::routing::fit_stride(
                        n as usize,
                        h.tokens.to_native() as usize,
                        h.dim.to_native() as usize,
                    )
                    .is_some() =>
                {
                    format!("query-aware, routing vectors fitted ({n} queries)")
                }
                n => format!("query-aware ({n} queries), routing by key means"),
            },
        );
    }
    if verify {
        for seg in index.segments() {
            seg.verify()?;
            println!("  verified {}", seg.path().display());
        }
    }
    Ok(())
}

fn index_bytes(dir: &Path) -> u64 {
    std::fs::metadata(dir.join(strata_index::manifest::INDEX_FILE))
        .map(|m| m.len())
        .unwrap_or(0)
}
