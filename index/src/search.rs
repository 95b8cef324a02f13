//! Query-aware search over an opened index.
//!
//! For one query vector (one query head) at position p:
//! 1. score the centroids (the group centroids first when the head has a second level) and take
//!    the best lists until their primary members reach `probe_fraction` of the visible keys;
//! 2. score the in-RAM key codes of those members and keep the best `rerank_factor × budget`
//!    tokens as candidates; the lists that hold them are the lists this query needs;
//! 3. read those lists (RAM tier, else one batched read from the segment file), score the
//!    candidates exactly from their full keys (replicas deduplicated), and return the top
//!    `budget` tokens with their exact scores and values.
//!
//! Static tokens (sinks and the recent window) are never searched: the caller attends them.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use strata_storage::aligned::AlignedBuf;
use strata_storage::cache::{CacheKey, CacheStats, RamCache};
use strata_storage::reader::{ReaderKind, ReaderPreference};
use strata_storage::segment::{ListLocation, SegmentFile};

use crate::codes::{ScalarQuantizer, CODE_BLOCK};
use crate::linalg::{dot, f16_bytes_to_f32, top_k_indices};
use crate::manifest::{f32s, u32s, ArchivedHeadManifest, ArchivedManifest, MappedManifest};
use crate::manifest::{LIST_HEADER_BYTES, LIST_MAGIC};
use crate::params::SearchParams;
use crate::{IndexError, IndexResult};

/// What one search did, for telemetry and the eval metrics.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct SearchStats {
    /// Centroids scored (group centroids included).
    pub centroids_scored: u64,
    /// Key codes scored.
    pub codes_scored: u64,
    /// Full keys scored exactly.
    pub keys_scored: u64,
    pub lists_read: u64,
    pub lists_from_ram: u64,
    pub ssd_reads: u64,
    pub ssd_bytes: u64,
    /// Bytes of the lists used (keys and values), wherever they came from.
    pub list_bytes: u64,
    pub code_bytes: u64,
    pub centroid_bytes: u64,
    pub search_ns: u64,
    pub io_ns: u64,
}

/// Tokens a method chose to attend beyond the static ones.
#[derive(Clone, Debug, Default)]
pub struct Retrieved {
    /// Token ids, all visible and non-static, distinct, at most the budget.
    pub tokens: Vec<u32>,
    /// Exact `q·k` of each token (unscaled).
    pub scores: Vec<f32>,
    /// Values of the tokens (`tokens × dim`), when the method read them itself.
    pub values: Option<Vec<f32>>,
    pub stats: SearchStats,
}

/// An index opened for search: the mapped manifest, the segment files and the RAM tier.
pub struct Index {
    dir: PathBuf,
    manifest: MappedManifest,
    segments: Vec<SegmentFile>,
    cache: Arc<RamCache>,
}

impl Index {
    /// Opens the index in `dir`, validating the manifest and every segment footer.
    pub fn open(dir: &Path, reader: ReaderPreference, cache: Arc<RamCache>) -> IndexResult<Index> {
        let manifest = MappedManifest::open(dir)?;
        let m = manifest.get();
        let mut segments = Vec::with_capacity(m.segments.len());
        for name in m.segments.iter() {
            segments.push(SegmentFile::open(&dir.join(name.as_str()), reader)?);
        }
        for (i, h) in m.heads.iter().enumerate() {
            let seg = h.segment.to_native() as usize;
            let file_len =
                segments
                    .get(seg)
                    .map(|s| s.file_len())
                    .ok_or_else(|| IndexError::Open {
                        path: manifest.path().to_path_buf(),
                        problem: format!("head {i} names segment {seg}, which does not exist"),
                    })?;
            check_head(h, file_len).map_err(|problem| IndexError::Open {
                path: manifest.path().to_path_buf(),
                problem: format!("head {i}: {problem}"),
            })?;
        }
        Ok(Index {
            dir: dir.to_path_buf(),
            manifest,
            segments,
            cache,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn manifest(&self) -> &ArchivedManifest {
        self.manifest.get()
    }

    /// The parameters the index was built with.
    pub fn build_params(&self) -> IndexResult<crate::params::BuildParams> {
        rkyv::deserialize::<crate::params::BuildParams, rkyv::rancor::Error>(&self.manifest().build)
            .map_err(|e| IndexError::Open {
                path: self.manifest.path().to_path_buf(),
                problem: format!("build parameters: {e}"),
            })
    }

    pub fn reader_kind(&self) -> Option<ReaderKind> {
        self.segments.first().map(|s| s.reader_kind())
    }

    pub fn cache_stats(&self) -> CacheStats {
        self.cache.stats()
    }

    pub fn cache(&self) -> &Arc<RamCache> {
        &self.cache
    }

    pub fn segments(&self) -> &[SegmentFile] {
        &self.segments
    }

    pub fn head(&self, layer_slot: usize, kv_head: usize) -> IndexResult<&ArchivedHeadManifest> {
        let m = self.manifest();
        let kv = m.source.kv_heads.to_native() as usize;
        if kv_head >= kv || layer_slot >= m.source.layers.len() {
            return Err(IndexError::Query {
                layer_slot,
                kv_head,
                position: 0,
                problem: format!(
                    "no such head: the index has {} layers x {} kv heads",
                    m.source.layers.len(),
                    kv
                ),
            });
        }
        Ok(&m.heads[layer_slot * kv + kv_head])
    }

    /// Searches one query vector of (layer slot, KV head) at `position`.
    pub fn search(
        &self,
        layer_slot: usize,
        kv_head: usize,
        q: &[f32],
        position: usize,
        params: &SearchParams,
    ) -> IndexResult<Retrieved> {
        let started = Instant::now();
        let head = self.head(layer_slot, kv_head)?;
        let qerr = |problem: String| IndexError::Query {
            layer_slot,
            kv_head,
            position,
            problem,
        };
        params.validate()?;
        let dim = head.dim.to_native() as usize;
        let tokens = head.tokens.to_native() as usize;
        if q.len() != dim {
            return Err(qerr(format!("query has {} dims, the index {dim}", q.len())));
        }
        if let Some(i) = q.iter().position(|v| !v.is_finite()) {
            return Err(qerr(format!("query component {i} is {}", q[i])));
        }
        if position >= tokens {
            return Err(qerr(format!(
                "position is past the {tokens} indexed tokens"
            )));
        }
        let visible = position + 1;
        let budget = params.budget_tokens(position);
        let mut stats = SearchStats::default();
        if budget == 0 {
            stats.search_ns = started.elapsed().as_nanos() as u64;
            return Ok(Retrieved {
                stats,
                values: Some(Vec::new()),
                ..Default::default()
            });
        }

        // 1. Lists to probe, best centroid first.
        let centroids = f32s(&head.centroids);
        let n_lists = head.lists.len();
        let primary_start = u32s(&head.primary_start);
        let primary_tokens = u32s(&head.primary_tokens);
        let candidate_lists: Vec<u32> = if head.group_centroids.is_empty() {
            (0..n_lists as u32).collect()
        } else {
            // Second level: expand the best groups until they hold twice the probe target.
            let gc = f32s(&head.group_centroids);
            let gstart = u32s(&head.group_start);
            let glists = u32s(&head.group_lists);
            let gscores: Vec<f32> = gc.chunks_exact(dim).map(|c| dot(c, q)).collect();
            stats.centroids_scored += gscores.len() as u64;
            let mut order: Vec<u32> = (0..gscores.len() as u32).collect();
            order.sort_unstable_by(|&a, &b| gscores[b as usize].total_cmp(&gscores[a as usize]));
            let target = 2.0 * params.probe_fraction as f64 * visible as f64;
            let mut out = Vec::new();
            let mut covered = 0usize;
            for g in order {
                for &l in &glists[gstart[g as usize] as usize..gstart[g as usize + 1] as usize] {
                    covered += (primary_start[l as usize + 1] - primary_start[l as usize]) as usize;
                    out.push(l);
                }
                if covered as f64 >= target {
                    break;
                }
            }
            out
        };
        let mut lscores: Vec<(f32, u32)> = candidate_lists
            .iter()
            .map(|&l| {
                let c = &centroids[l as usize * dim..(l as usize + 1) * dim];
                (dot(c, q), l)
            })
            .collect();
        stats.centroids_scored += lscores.len() as u64;
        stats.centroid_bytes = stats.centroids_scored * dim as u64 * 2;
        lscores.sort_unstable_by(|a, b| b.0.total_cmp(&a.0));

        // 2. Code scoring of the probed lists' members.
        let sq = ScalarQuantizer {
            bits: head.code_bits.to_native(),
            lo: f32s(&head.code_lo).to_vec(),
            step: f32s(&head.code_step).to_vec(),
        };
        let block_bytes = sq.block_bytes();
        let cq = sq.query(q);
        let codes = head.codes.as_slice();
        let block_start = u32s(&head.code_block_start);
        let probe_target = (params.probe_fraction as f64 * visible as f64).ceil() as usize;
        let mut probed = 0usize;
        let mut cand_tokens: Vec<u32> = Vec::with_capacity(probe_target + 64);
        let mut cand_lists: Vec<u32> = Vec::with_capacity(probe_target + 64);
        let mut cand_scores: Vec<f32> = Vec::with_capacity(probe_target + 64);
        let mut lane_scores = [0f32; CODE_BLOCK];
        for &(_, l) in &lscores {
            if probed >= probe_target {
                break;
            }
            let members = &primary_tokens
                [primary_start[l as usize] as usize..primary_start[l as usize + 1] as usize];
            let first_block = block_start[l as usize] as usize;
            for (b, chunk) in members.chunks(CODE_BLOCK).enumerate() {
                let at = (first_block + b) * block_bytes;
                cq.score_block(&codes[at..at + block_bytes], &mut lane_scores);
                stats.codes_scored += chunk.len() as u64;
                for (lane, &t) in chunk.iter().enumerate() {
                    let tu = t as usize;
                    if tu > position || params.is_static(tu, position) {
                        continue;
                    }
                    probed += 1;
                    cand_tokens.push(t);
                    cand_lists.push(l);
                    cand_scores.push(lane_scores[lane]);
                }
            }
        }
        stats.code_bytes = stats.codes_scored * sq.code_bytes() as u64;
        let keep = ((params.rerank_factor as f64) * budget as f64).ceil() as usize;
        let best = top_k_indices(&cand_scores, keep);
        let mut need: Vec<u32> = best.iter().map(|&i| cand_lists[i as usize]).collect();
        need.sort_unstable();
        need.dedup();

        // 3. Read the needed lists and re-rank every member exactly.
        let io_started = Instant::now();
        let bufs = self.fetch_lists(head, &need, &mut stats)?;
        stats.io_ns = io_started.elapsed().as_nanos() as u64;
        // Only the candidates are scored exactly: the codes already ranked every probed member,
        // and re-scoring whole lists would cost full-key work for tokens the codes ruled out.
        let mut wanted = vec![false; visible];
        for &i in &best {
            wanted[cand_tokens[i as usize] as usize] = true;
        }
        let mut ex_tokens: Vec<u32> = Vec::new();
        let mut ex_scores: Vec<f32> = Vec::new();
        let mut ex_rows: Vec<(u32, u32)> = Vec::new();
        let mut views = Vec::with_capacity(bufs.len());
        let mut key = Vec::with_capacity(dim);
        for (bi, (buf, &l)) in bufs.iter().zip(&need).enumerate() {
            let list = parse_list(buf, l, dim).map_err(|problem| IndexError::Open {
                path: self.segments[head.segment.to_native() as usize]
                    .path()
                    .to_path_buf(),
                problem: format!("list {l}: {problem}"),
            })?;
            for r in 0..list.len() {
                let t = list.id(r);
                let tu = t as usize;
                if tu > position || !wanted[tu] {
                    continue;
                }
                wanted[tu] = false;
                key.clear();
                f16_bytes_to_f32(list.key_bytes(r), &mut key);
                ex_tokens.push(t);
                ex_scores.push(dot(&key, q));
                ex_rows.push((bi as u32, r as u32));
            }
            views.push(list);
        }
        stats.keys_scored = ex_tokens.len() as u64;
        let top = top_k_indices(&ex_scores, budget);
        let mut values = Vec::with_capacity(top.len() * dim);
        for &i in &top {
            let (bi, r) = ex_rows[i as usize];
            f16_bytes_to_f32(views[bi as usize].value_bytes(r as usize), &mut values);
        }
        let mut out = Retrieved {
            tokens: top.iter().map(|&i| ex_tokens[i as usize]).collect(),
            scores: top.iter().map(|&i| ex_scores[i as usize]).collect(),
            values: Some(values),
            stats,
        };
        out.stats.search_ns = started.elapsed().as_nanos() as u64;
        Ok(out)
    }

    /// Lists `ids` of `head`, from the RAM tier where present, the rest in one batched read.
    pub fn fetch_lists(
        &self,
        head: &ArchivedHeadManifest,
        ids: &[u32],
        stats: &mut SearchStats,
    ) -> IndexResult<Vec<Arc<AlignedBuf>>> {
        let seg_id = head.segment.to_native();
        let seg = &self.segments[seg_id as usize];
        let mut out: Vec<Option<Arc<AlignedBuf>>> = Vec::with_capacity(ids.len());
        let mut missing = Vec::new();
        let mut locs = Vec::new();
        for (i, &l) in ids.iter().enumerate() {
            let loc = &head.lists[l as usize];
            let key = CacheKey {
                file: seg_id,
                offset: loc.offset.to_native(),
            };
            stats.list_bytes += loc.len.to_native() as u64;
            match self.cache.get(&key) {
                Some(buf) => {
                    stats.lists_from_ram += 1;
                    out.push(Some(buf));
                }
                None => {
                    out.push(None);
                    missing.push(i);
                    locs.push(ListLocation {
                        offset: loc.offset.to_native(),
                        len: loc.len.to_native(),
                        padded_len: loc.padded_len.to_native(),
                        crc32: loc.crc32.to_native(),
                    });
                }
            }
        }
        stats.lists_read += ids.len() as u64;
        if !locs.is_empty() {
            let bufs = seg.read_lists(&locs)?;
            for ((i, buf), loc) in missing.into_iter().zip(bufs).zip(&locs) {
                stats.ssd_reads += 1;
                stats.ssd_bytes += loc.padded_len as u64;
                let buf = Arc::new(buf);
                self.cache.insert(
                    CacheKey {
                        file: seg_id,
                        offset: loc.offset,
                    },
                    buf.clone(),
                );
                out[i] = Some(buf);
            }
        }
        Ok(out.into_iter().flatten().collect())
    }
}

/// A posting list's parts, borrowed from its buffer.
pub struct ListView<'a> {
    ids: &'a [u8],
    keys: &'a [u8],
    values: &'a [u8],
    row_bytes: usize,
}

impl<'a> ListView<'a> {
    pub fn len(&self) -> usize {
        self.ids.len() / 4
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Token id of member `r`.
    pub fn id(&self, r: usize) -> u32 {
        let b = &self.ids[4 * r..4 * r + 4];
        u32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }

    /// f16 key of member `r`.
    pub fn key_bytes(&self, r: usize) -> &'a [u8] {
        &self.keys[r * self.row_bytes..(r + 1) * self.row_bytes]
    }

    /// f16 value of member `r`.
    pub fn value_bytes(&self, r: usize) -> &'a [u8] {
        &self.values[r * self.row_bytes..(r + 1) * self.row_bytes]
    }
}

/// Splits a posting list, checking its header against what the manifest says it is.
pub fn parse_list(buf: &[u8], list_id: u32, dim: usize) -> Result<ListView<'_>, String> {
    if buf.len() < LIST_HEADER_BYTES {
        return Err(format!("{} bytes, shorter than a list header", buf.len()));
    }
    let word =
        |i: usize| u32::from_le_bytes([buf[4 * i], buf[4 * i + 1], buf[4 * i + 2], buf[4 * i + 3]]);
    if word(0) != LIST_MAGIC {
        return Err("bad list magic".into());
    }
    if word(1) != list_id {
        return Err(format!("header names list {}, expected {list_id}", word(1)));
    }
    let n = word(2) as usize;
    if word(3) as usize != dim {
        return Err(format!(
            "header dim {} differs from the index's {dim}",
            word(3)
        ));
    }
    let ids_end = LIST_HEADER_BYTES + 4 * n;
    let keys_end = ids_end + n * dim * 2;
    let values_end = keys_end + n * dim * 2;
    if buf.len() < values_end {
        return Err(format!(
            "{} bytes, {n} members need {values_end}",
            buf.len()
        ));
    }
    Ok(ListView {
        ids: &buf[LIST_HEADER_BYTES..ids_end],
        keys: &buf[ids_end..keys_end],
        values: &buf[keys_end..values_end],
        row_bytes: dim * 2,
    })
}

/// Structural checks of one head's manifest entry (lengths agree, lists inside the segment), so
/// that search never indexes out of bounds on a damaged or hand-edited manifest.
fn check_head(h: &ArchivedHeadManifest, segment_len: u64) -> Result<(), String> {
    let dim = h.dim.to_native() as usize;
    let lists = h.lists.len();
    let tokens = h.tokens.to_native() as usize;
    let bits = h.code_bits.to_native();
    if dim == 0 || ![1u32, 2, 4, 8].contains(&bits) {
        return Err(format!("dim {dim} / code bits {bits} invalid"));
    }
    let code_bytes = dim.div_ceil(8 / bits as usize);
    let checks = [
        (h.centroids.len() == lists * dim, "centroids"),
        (h.value_sums.len() == lists * dim, "value sums"),
        (h.max_key_norm.len() == lists, "key norms"),
        (h.radius.len() == lists, "radii"),
        (h.primary_start.len() == lists + 1, "list offsets"),
        (h.primary_tokens.len() == tokens, "primary tokens"),
        (h.code_block_start.len() == lists + 1, "code block offsets"),
        (
            h.code_lo.len() == dim && h.code_step.len() == dim,
            "quantiser",
        ),
    ];
    if let Some((_, what)) = checks.iter().find(|(ok, _)| !ok) {
        return Err(format!("{what} have the wrong length"));
    }
    let blocks = u32s(&h.code_block_start);
    if blocks.first() != Some(&0)
        || blocks.windows(2).any(|w| w[0] > w[1])
        || blocks.last().map(|&b| b as usize * code_bytes * CODE_BLOCK) != Some(h.codes.len())
    {
        return Err("code blocks do not cover the codes".into());
    }
    let starts = u32s(&h.primary_start);
    if starts.first() != Some(&0)
        || starts.last().map(|&s| s as usize) != Some(tokens)
        || starts.windows(2).any(|w| w[0] > w[1])
    {
        return Err("list offsets are not monotone over all tokens".into());
    }
    if starts
        .windows(2)
        .zip(blocks.windows(2))
        .any(|(s, b)| ((s[1] - s[0]) as usize).div_ceil(CODE_BLOCK) != (b[1] - b[0]) as usize)
    {
        return Err("a list's code blocks do not match its members".into());
    }
    if u32s(&h.primary_tokens)
        .iter()
        .any(|&t| t as usize >= tokens)
    {
        return Err("a list names a token past the end".into());
    }
    for (j, l) in h.lists.iter().enumerate() {
        let end = l.offset.to_native() + l.padded_len.to_native() as u64;
        if end > segment_len || l.len.to_native() > l.padded_len.to_native() {
            return Err(format!("list {j} lies outside its segment"));
        }
    }
    if !h.group_centroids.is_empty() {
        let g = h.group_start.len().saturating_sub(1);
        let gl = u32s(&h.group_lists);
        if h.group_centroids.len() != g * dim
            || gl.len() != lists
            || gl.iter().any(|&l| l as usize >= lists)
            || u32s(&h.group_start).iter().any(|&s| s as usize > lists)
        {
            return Err("second level is inconsistent".into());
        }
    }
    Ok(())
}
