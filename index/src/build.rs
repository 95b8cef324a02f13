//! `build_index`: clusters the keys of every (layer, KV head) of a dump, writes posting lists
//! (ids + keys + values, 4 KiB-aligned) into one segment file per layer and the manifest last.
//! The whole index is written into a hidden temporary folder that is renamed into place only when
//! complete, so an interrupted build leaves nothing that opens as an index.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use rand::SeedableRng;
use rayon::prelude::*;
use strata_storage::durable::{fsync_dir, AtomicFile};
use strata_storage::kvdump::KvDump;
use strata_storage::segment::SegmentWriter;

use crate::codes::{ScalarQuantizer, CODE_BLOCK, RESIDUAL_CODE_BITS};
use crate::kmeans::{balanced_kmeans, hierarchical_kmeans, Hierarchy, KMeansConfig};
use crate::linalg::norm_sq;
use crate::manifest::{
    self, encode_centroids, to_f16_bits, HeadManifest, ListLoc, Manifest, SourceInfo, INDEX_FILE,
    LIST_HEADER_BYTES, LIST_MAGIC,
};
use crate::metric::QueryMetric;
use crate::params::{BuildParams, RESIDUAL_CLIP_PERCENTILE, RESIDUAL_FIT_SAMPLE};
use crate::{IndexError, IndexResult};

/// Called after each (layer, KV head) is clustered: `(done, total)`.
pub type BuildProgress<'a> = &'a (dyn Fn(usize, usize) + Sync);

#[derive(Clone, Debug, serde::Serialize)]
pub struct BuildReport {
    pub dir: PathBuf,
    pub seconds: f64,
    pub heads: usize,
    pub lists: usize,
    pub replicas: u64,
    pub segment_bytes: u64,
    pub index_bytes: u64,
}

/// The clustering of one head, before its lists are placed in a segment.
struct HeadBuild {
    manifest: HeadManifest,
    /// Members of every list: primary members ascending, then replicas ascending.
    members: Vec<Vec<u32>>,
}

fn build_head(
    arrays: HeadArrays,
    dim: usize,
    softmax_scale: f32,
    params: &BuildParams,
    seed: u64,
) -> HeadBuild {
    let HeadArrays {
        keys,
        values,
        queries,
    } = arrays;
    let n = keys.len() / dim;
    let k = n.div_ceil(params.list_size as usize).max(1);
    let cfg = KMeansConfig {
        iters: params.kmeans_iters,
        train_points: k * params.kmeans_sample_per_list as usize,
        balance_penalty: params.balance_penalty,
        capacity: ((params.list_size as f32) * params.max_list_factor).ceil() as usize,
    };
    let metric = if params.query_aware {
        QueryMetric::fit(queries, dim, params.query_metric_ridge)
    } else {
        None
    };
    // Clustering space: the keys themselves, or the keys under the query metric.
    let transformed = metric.as_ref().map(|m| m.transform(keys));
    let space = transformed.as_deref().unwrap_or(keys);
    let (km, mut hierarchy) = if k > params.hierarchy_threshold as usize {
        hierarchical_kmeans(space, dim, k, &cfg, params.lists_per_group as usize, seed)
    } else {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (
            balanced_kmeans(space, dim, k, &cfg, &mut rng),
            Hierarchy::default(),
        )
    };
    let k = km.k;
    let identity: Vec<u32> = (0..k as u32).collect();
    let groups = hierarchy.group_start.len().saturating_sub(1);
    let mut group_of_list = vec![0u32; k];
    for g in 0..groups {
        let (a, b) = (hierarchy.group_start[g], hierarchy.group_start[g + 1]);
        for &l in &hierarchy.group_lists[a as usize..b as usize] {
            group_of_list[l as usize] = g as u32;
        }
    }
    let group_value_means = if groups > 0 {
        to_f16_bits(&mean_rows(values, dim, &km.assign, &group_of_list, groups))
    } else {
        Vec::new()
    };
    // Search scores centroids against raw queries, so they are the means of the raw keys; under
    // the plain metric those are the k-means centroids already.
    let centroids = if transformed.is_some() {
        if groups > 0 {
            hierarchy.group_centroids = mean_rows(keys, dim, &km.assign, &group_of_list, groups);
        }
        mean_rows(keys, dim, &km.assign, &identity, k)
    } else {
        km.centroids.clone()
    };

    let mut primary: Vec<Vec<u32>> = vec![Vec::new(); k];
    for (t, &a) in km.assign.iter().enumerate() {
        primary[a as usize].push(t as u32);
    }
    let mut replica: Vec<Vec<u32>> = vec![Vec::new(); k];
    let mut replicas = 0u64;
    if params.replica_max > 1 {
        for t in 0..n {
            for &c in &km.replica_lists(t, params.replica_max as usize, params.replica_epsilon)[1..]
            {
                replica[c as usize].push(t as u32);
                replicas += 1;
            }
        }
    }

    let value_means = mean_rows(values, dim, &km.assign, &identity, k);
    let mut radius = vec![0f32; k];
    let mut max_key_norm = vec![0f32; k];
    for j in 0..k {
        let c = &centroids[j * dim..(j + 1) * dim];
        for &t in &primary[j] {
            let t = t as usize;
            let key = &keys[t * dim..(t + 1) * dim];
            let d2: f32 = key.iter().zip(c).map(|(a, b)| (a - b) * (a - b)).sum();
            radius[j] = radius[j].max(d2.sqrt());
        }
        for &t in primary[j].iter().chain(&replica[j]) {
            let t = t as usize;
            max_key_norm[j] = max_key_norm[j].max(norm_sq(&keys[t * dim..(t + 1) * dim]).sqrt());
        }
    }

    // Search ranks lists by these vectors and takes them as the residual codes' base: fitted
    // to the train queries when there are enough of them (`routing::fit_stride`).
    let routes = match &metric {
        Some(m) => {
            crate::routing::fit_routes(keys, dim, &primary, &centroids, queries, m, softmax_scale)
        }
        None => centroids,
    };
    let (csq, centroid_codes, group_centroid_codes) =
        encode_centroids(&routes, &hierarchy.group_centroids, dim);
    // Residual codes encode each key's residual from its list's centroid as search decodes
    // it. Their range comes from a sample of the residuals (every `stride`-th key, list by
    // list), so that the build holds no second copy of the keys.
    let residual = params.code_bits == RESIDUAL_CODE_BITS;
    let centroid_bytes = csq.code_bytes();
    let base_of =
        |j: usize| csq.decode(&centroid_codes[j * centroid_bytes..(j + 1) * centroid_bytes]);
    let key_of = |t: u32| &keys[t as usize * dim..(t as usize + 1) * dim];
    let residual_of = |t: u32, base: &[f32]| -> Vec<f32> {
        key_of(t).iter().zip(base).map(|(k, c)| k - c).collect()
    };
    let sq = if residual {
        let stride = n.div_ceil(RESIDUAL_FIT_SAMPLE).max(1);
        let mut sample = Vec::with_capacity(n.min(RESIDUAL_FIT_SAMPLE) * dim);
        let mut seen = 0;
        for (j, list) in primary.iter().enumerate() {
            let base = base_of(j);
            for &t in list {
                if seen % stride == 0 {
                    sample.extend(residual_of(t, &base));
                }
                seen += 1;
            }
        }
        ScalarQuantizer::fit_clipped(&sample, dim, params.code_bits, RESIDUAL_CLIP_PERCENTILE)
    } else {
        ScalarQuantizer::fit(keys, dim, params.code_bits)
    };
    let mut codes = Vec::with_capacity(n * sq.code_bytes() * 5 / 4);
    let mut code_block_start = vec![0u32];
    let mut primary_tokens = Vec::with_capacity(n);
    let mut primary_start = vec![0u32];
    let mut blocks = 0u32;
    for (j, list) in primary.iter().enumerate() {
        let base = residual.then(|| base_of(j));
        for chunk in list.chunks(CODE_BLOCK) {
            let owned: Vec<Vec<f32>> = match &base {
                Some(b) => chunk.iter().map(|&t| residual_of(t, b)).collect(),
                None => Vec::new(),
            };
            let rows: Vec<&[f32]> = match &base {
                Some(_) => owned.iter().map(|r| r.as_slice()).collect(),
                None => chunk.iter().map(|&t| key_of(t)).collect(),
            };
            sq.encode_block(&rows, &mut codes);
            blocks += 1;
        }
        code_block_start.push(blocks);
        primary_tokens.extend_from_slice(list);
        primary_start.push(primary_tokens.len() as u32);
    }

    let members = primary
        .into_iter()
        .zip(replica)
        .map(|(mut p, r)| {
            p.extend(r);
            p
        })
        .collect();
    HeadBuild {
        manifest: HeadManifest {
            layer_slot: 0,
            kv_head: 0,
            tokens: n as u32,
            dim: dim as u32,
            segment: 0,
            centroid_codes,
            centroid_lo: csq.lo,
            centroid_step: csq.step,
            lists: Vec::new(),
            value_means: to_f16_bits(&value_means),
            max_key_norm,
            radius,
            group_centroid_codes,
            group_value_means,
            group_lists: hierarchy.group_lists,
            group_start: hierarchy.group_start,
            primary_tokens,
            primary_start,
            code_bits: params.code_bits,
            code_lo: sq.lo,
            code_step: sq.step,
            codes,
            code_block_start,
            replicas,
            metric_queries: if metric.is_some() {
                (queries.len() / dim) as u32
            } else {
                0
            },
        },
        members,
    }
}

/// Means of the rows of `points` grouped by `group[assign[i]]` into `groups` groups (a group
/// with no rows gets zeros).
fn mean_rows(points: &[f32], dim: usize, assign: &[u32], group: &[u32], groups: usize) -> Vec<f32> {
    let mut sums = vec![0f64; groups * dim];
    let mut counts = vec![0usize; groups];
    for (x, &a) in points.chunks_exact(dim).zip(assign) {
        let g = group[a as usize] as usize;
        counts[g] += 1;
        for (s, v) in sums[g * dim..(g + 1) * dim].iter_mut().zip(x) {
            *s += *v as f64;
        }
    }
    sums.chunks_exact(dim)
        .zip(&counts)
        .flat_map(|(s, &c)| s.iter().map(move |v| (v / c.max(1) as f64) as f32))
        .collect()
}

/// Bytes of one posting list: header, member ids, keys (f16), values (f16).
pub fn encode_list(
    list_id: u32,
    members: &[u32],
    keys: &[f32],
    values: &[f32],
    dim: usize,
    out: &mut Vec<u8>,
) {
    out.clear();
    out.extend_from_slice(&LIST_MAGIC.to_le_bytes());
    out.extend_from_slice(&list_id.to_le_bytes());
    out.extend_from_slice(&(members.len() as u32).to_le_bytes());
    out.extend_from_slice(&(dim as u32).to_le_bytes());
    debug_assert_eq!(out.len(), LIST_HEADER_BYTES);
    for &t in members {
        out.extend_from_slice(&t.to_le_bytes());
    }
    for src in [keys, values] {
        for &t in members {
            for &v in &src[t as usize * dim..(t as usize + 1) * dim] {
                out.extend_from_slice(&half::f16::from_f32(v).to_le_bytes());
            }
        }
    }
}

fn temp_dir_for(out: &Path) -> IndexResult<PathBuf> {
    let name = out
        .file_name()
        .ok_or_else(|| IndexError::Build {
            path: out.to_path_buf(),
            problem: "output path has no folder name".into(),
        })?
        .to_string_lossy()
        .to_string();
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    // Unique per build, not only per process: two builds of one folder in one process (a fold
    // of a dropped session and its successor's, say) must not share a scratch folder.
    static NEXT_BUILD: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT_BUILD.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Ok(parent.join(format!(".{name}.building-{}-{n}", std::process::id())))
}

/// Keys and values of one (layer, KV head): `tokens × dim` each, row-major; and the prefill
/// queries of its query heads (`rows × dim`, possibly none) for query-aware clustering.
#[derive(Clone, Copy)]
pub struct HeadArrays<'a> {
    pub keys: &'a [f32],
    pub values: &'a [f32],
    pub queries: &'a [f32],
}

/// What an index is built from: the description of the context and, layer-major, the arrays
/// of every (layer, KV head). A kvdump file is one source; an engine session is another.
pub struct BuildInput<'a> {
    pub source: SourceInfo,
    pub heads: Vec<HeadArrays<'a>>,
}

impl<'a> BuildInput<'a> {
    pub fn from_dump(dump: &'a KvDump) -> Self {
        let meta = &dump.meta;
        let group = meta.q_heads / meta.kv_heads.max(1);
        let mut heads = Vec::new();
        for l in 0..dump.num_layers() {
            for h in 0..meta.kv_heads {
                heads.push(HeadArrays {
                    keys: dump.keys.slice2(l, h),
                    values: dump.values.slice2(l, h),
                    // The training queries only: evaluation queries never shape the index.
                    queries: dump
                        .train_queries
                        .as_ref()
                        .map(|t| t.slice2_range(l, h * group..(h + 1) * group))
                        .unwrap_or(&[]),
                });
            }
        }
        BuildInput {
            source: SourceInfo {
                dump_path: dump.path.display().to_string(),
                model: meta.model.clone(),
                model_type: meta.model_type.clone(),
                layers: meta.layers.iter().map(|&l| l as u32).collect(),
                q_heads: meta.q_heads as u32,
                kv_heads: meta.kv_heads as u32,
                head_dim: meta.head_dim as u32,
                tokens: meta.tokens as u32,
                softmax_scale: meta.softmax_scale.clone(),
                content_hash: dump.content_hash(),
            },
            heads,
        }
    }

    fn check(&self) -> Result<(), String> {
        let s = &self.source;
        let (layers, kv, dim, tokens) = (
            s.layers.len(),
            s.kv_heads as usize,
            s.head_dim as usize,
            s.tokens as usize,
        );
        if self.heads.len() != layers * kv {
            return Err(format!(
                "{} head arrays for {layers} layers x {kv} kv heads",
                self.heads.len()
            ));
        }
        let mut ids = s.layers.clone();
        ids.sort_unstable();
        if ids.windows(2).any(|w| w[0] == w[1]) {
            return Err(format!(
                "layer ids {:?} repeat (segments are named by layer)",
                s.layers
            ));
        }
        if s.softmax_scale.len() != layers {
            return Err(format!(
                "{} softmax scales for {layers} layers",
                s.softmax_scale.len()
            ));
        }
        if dim == 0 || tokens == 0 {
            return Err("empty context or zero head dim".into());
        }
        for (i, h) in self.heads.iter().enumerate() {
            if h.queries.len() % dim != 0 {
                return Err(format!(
                    "head {i}: {} query floats, not a multiple of head dim {dim}",
                    h.queries.len()
                ));
            }
            if let Some(j) = h.queries.iter().position(|v| !v.is_finite()) {
                return Err(format!(
                    "head {i}: training query float {j} is {}",
                    h.queries[j]
                ));
            }
            if h.keys.len() != tokens * dim || h.values.len() != tokens * dim {
                return Err(format!(
                    "head {i}: {} key and {} value floats, expected {tokens} x {dim}",
                    h.keys.len(),
                    h.values.len()
                ));
            }
            // Lists store f16: anything beyond its range would become infinite.
            let f16_max = half::f16::MAX.to_f32();
            if let Some(j) = h
                .keys
                .iter()
                .chain(h.values)
                .position(|v| !v.is_finite() || v.abs() > f16_max)
            {
                let v = h
                    .keys
                    .iter()
                    .chain(h.values)
                    .nth(j)
                    .copied()
                    .unwrap_or(f32::NAN);
                return Err(format!(
                    "head {i}: value {v} at float {j} is not finite or beyond the f16 range"
                ));
            }
        }
        Ok(())
    }
}

/// Builds the index of every (layer, KV head) of `dump` into the folder `out`.
/// `force` replaces an existing index there; otherwise an existing `out` is an error.
pub fn build_index(
    dump: &KvDump,
    params: &BuildParams,
    out: &Path,
    force: bool,
    progress: BuildProgress,
) -> IndexResult<BuildReport> {
    build_index_from(&BuildInput::from_dump(dump), params, out, force, progress)
}

/// Builds an index from arrays (see [`BuildInput`]) into the folder `out`.
pub fn build_index_from(
    input: &BuildInput,
    params: &BuildParams,
    out: &Path,
    force: bool,
    progress: BuildProgress,
) -> IndexResult<BuildReport> {
    params.validate()?;
    input.check().map_err(|problem| IndexError::Build {
        path: out.to_path_buf(),
        problem,
    })?;
    let started = Instant::now();
    if out.exists() && !force {
        return Err(IndexError::Build {
            path: out.to_path_buf(),
            problem: "already exists (pass --force to replace it)".into(),
        });
    }
    let tmp = temp_dir_for(out)?;
    let io_err = |path: &Path, e: std::io::Error| IndexError::Build {
        path: path.to_path_buf(),
        problem: e.to_string(),
    };
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| io_err(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| io_err(&tmp, e))?;
    let result = build_into(input, params, &tmp, progress, started);
    let report = match result {
        Ok(r) => r,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    if out.exists() {
        std::fs::remove_dir_all(out).map_err(|e| io_err(out, e))?;
    }
    std::fs::rename(&tmp, out).map_err(|e| io_err(out, e))?;
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        fsync_dir(parent)?;
    }
    Ok(BuildReport {
        dir: out.to_path_buf(),
        seconds: started.elapsed().as_secs_f64(),
        ..report
    })
}

fn build_into(
    input: &BuildInput,
    params: &BuildParams,
    dir: &Path,
    progress: BuildProgress,
    started: Instant,
) -> IndexResult<BuildReport> {
    let src = &input.source;
    let (layers, kv_heads, dim) = (
        src.layers.len(),
        src.kv_heads as usize,
        src.head_dim as usize,
    );
    let total = layers * kv_heads;
    let done = AtomicUsize::new(0);
    let mut heads: Vec<HeadBuild> = (0..total)
        .into_par_iter()
        .map(|i| {
            let (l, h) = (i / kv_heads, i % kv_heads);
            let mut hb = build_head(
                input.heads[i],
                dim,
                src.softmax_scale[l],
                params,
                params.seed ^ ((i as u64 + 1) * 0x9E37_79B9_7F4A_7C15),
            );
            hb.manifest.layer_slot = l as u32;
            hb.manifest.kv_head = h as u32;
            hb.manifest.segment = l as u32;
            progress(done.fetch_add(1, Ordering::Relaxed) + 1, total);
            hb
        })
        .collect();

    let mut segments = Vec::with_capacity(layers);
    let mut segment_bytes = 0u64;
    let mut blob = Vec::new();
    for l in 0..layers {
        let name = format!("layer-{:03}.seg", src.layers[l]);
        let mut writer = SegmentWriter::create(&dir.join(&name))?;
        for hb in heads
            .iter_mut()
            .filter(|hb| hb.manifest.layer_slot == l as u32)
        {
            let arrays = input.heads[l * kv_heads + hb.manifest.kv_head as usize];
            let (keys, values) = (arrays.keys, arrays.values);
            for (j, members) in hb.members.iter().enumerate() {
                encode_list(j as u32, members, keys, values, dim, &mut blob);
                let loc = writer.append(&blob)?;
                hb.manifest.lists.push(ListLoc {
                    offset: loc.offset,
                    len: loc.len,
                    padded_len: loc.padded_len,
                    crc32: loc.crc32,
                    members: members.len() as u32,
                });
            }
        }
        segment_bytes += writer.finish()?;
        segments.push(name);
    }

    let lists = heads.iter().map(|h| h.manifest.lists.len()).sum();
    let replicas = heads.iter().map(|h| h.manifest.replicas).sum();
    let manifest = Manifest {
        build: params.clone(),
        source: src.clone(),
        segments,
        heads: heads.into_iter().map(|h| h.manifest).collect(),
        build_seconds: started.elapsed().as_secs_f64(),
    };
    let bytes = manifest::encode(&manifest)?;
    let mut file = AtomicFile::create(&dir.join(INDEX_FILE))?;
    file.write_all(&bytes).map_err(|e| IndexError::Build {
        path: dir.join(INDEX_FILE),
        problem: e.to_string(),
    })?;
    file.commit()?;
    fsync_dir(dir)?;
    Ok(BuildReport {
        dir: dir.to_path_buf(),
        seconds: 0.0,
        heads: total,
        lists,
        replicas,
        segment_bytes,
        index_bytes: bytes.len() as u64,
    })
}
