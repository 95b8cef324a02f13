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

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use rayon::prelude::*;
use strata_storage::aligned::AlignedBuf;
use strata_storage::cache::{CacheKey, CacheStats, RamCache};
use strata_storage::reader::{ReaderKind, ReaderPreference};
use strata_storage::segment::{ListLocation, SegmentFile};

use crate::codes::{
    CodeQuery, ScalarQuantizer, CODE_BLOCK, RESIDUAL_CODE_BITS, SHARED_SCAN_QUERIES,
};
use crate::linalg::{
    best_first, best_first_key, dot_f16_bytes, f16_bytes_to_f32, from_best_first_key, top_k_indices,
};
use crate::manifest::{f32s, u16s, u32s, ArchivedHeadManifest, ArchivedManifest, MappedManifest};
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
    /// Keys in the lists read (all members, replicas included): what the reads brought in.
    pub keys_read: u64,
    pub lists_read: u64,
    pub lists_from_ram: u64,
    pub ssd_reads: u64,
    pub ssd_bytes: u64,
    /// Bytes of the whole lists fetched (all members' ids, keys and values), wherever they came
    /// from: what the RAM tier or the SSD moved, at list granularity.
    pub list_bytes: u64,
    /// Full (f16) keys scored exactly, in bytes.
    pub key_bytes: u64,
    /// Values (f16) of the tokens returned, in bytes.
    pub value_bytes: u64,
    pub code_bytes: u64,
    pub centroid_bytes: u64,
    /// Bytes the remainder estimate read beyond the centroids and codes: list value sums and
    /// radii, member offsets for counting, and (without a caller's static log-sum-exp) the
    /// static tokens' codes.
    pub estimate_bytes: u64,
    pub search_ns: u64,
    pub io_ns: u64,
    /// Where `search_ns` went, by phase.
    pub phases: SearchPhases,
}

impl SearchStats {
    /// Bytes the search and its attention read, as issue #3 counts them: centroids, key codes,
    /// the estimate's statistics, the full keys scored and the values attended (not the whole
    /// lists the tiers moved to deliver those rows: `list_bytes`).
    pub fn bytes_read(&self) -> u64 {
        self.centroid_bytes
            + self.code_bytes
            + self.estimate_bytes
            + self.key_bytes
            + self.value_bytes
    }
}

/// Time of one search by phase, in nanoseconds; with `io_ns` they make up `search_ns` (less a
/// little bookkeeping between phases).
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct SearchPhases {
    /// Validation, centroid (and group) scoring, ordering the lists.
    pub centroids_ns: u64,
    /// Scoring the probed lists' key codes.
    pub codes_ns: u64,
    /// Choosing the candidates to re-rank and the lists that hold them.
    pub select_ns: u64,
    /// Scoring the candidates exactly from their full keys, and picking the attended tokens.
    pub rerank_ns: u64,
    /// The remainder estimate and the adaptive budget.
    pub estimate_ns: u64,
    /// Reading the attended values (or attending them, with `Gather::Attention`).
    pub gather_ns: u64,
}

impl SearchPhases {
    /// Adds `other` phase by phase.
    pub fn add(&mut self, other: &SearchPhases) {
        self.centroids_ns += other.centroids_ns;
        self.codes_ns += other.codes_ns;
        self.select_ns += other.select_ns;
        self.rerank_ns += other.rerank_ns;
        self.estimate_ns += other.estimate_ns;
        self.gather_ns += other.gather_ns;
    }
}

/// Nanoseconds since `*mark`, moving the mark to now: consecutive calls time consecutive phases.
fn lap(mark: &mut Instant) -> u64 {
    let now = Instant::now();
    let ns = now.duration_since(*mark).as_nanos() as u64;
    *mark = now;
    ns
}

/// Tokens a method chose to attend beyond the static ones.
#[derive(Clone, Debug, Default)]
pub struct Retrieved {
    /// Token ids, all visible and non-static, distinct, at most the budget.
    pub tokens: Vec<u32>,
    /// `q·k` of each token (unscaled): exact, or its code's score for the candidates taken on
    /// their codes (`SearchParams::code_trusted_fraction`).
    pub scores: Vec<f32>,
    /// Values of the tokens (`tokens × dim`), when the method read them itself and was asked
    /// for rows ([`Gather::Values`]).
    pub values: Option<Vec<f32>>,
    /// Attention over the tokens (`scale·score` logits, their values), when asked for it
    /// ([`Gather::Attention`]): the values are read once from the lists, never copied.
    pub attention: Option<Attended>,
    /// Estimated attention over the visible, non-static tokens not attended exactly (None when
    /// the method does not estimate); merge it with the exact part by log-sum-exp.
    pub remainder: Option<Remainder>,
    pub stats: SearchStats,
}

/// Output `o` (dim floats) and `lse` (natural log of Σ exp(logit)) of attention over a token
/// set, so that attentions over disjoint sets merge exactly.
#[derive(Clone, Debug, PartialEq)]
pub struct Attended {
    pub output: Vec<f32>,
    pub lse: f32,
}

/// What a search returns about the tokens it attends, beyond their ids and scores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gather {
    /// Their value rows, as f32 (`Retrieved::values`).
    Values,
    /// The attention over them (`Retrieved::attention`): what a decode step needs, computed
    /// while the value rows are read, without materialising them.
    Attention,
}

/// Estimated attention over the tokens a search did not attend exactly, in the convention of
/// `strata_engine::attention::Attended`: `lse` is the natural log of the estimated
/// Σ exp(scale·q·k) over those tokens and `output` their estimated softmax-weighted mean value.
/// When nothing remains, `tokens` is 0, `lse` is -inf and `output` zeros: neutral in a merge.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Remainder {
    pub output: Vec<f32>,
    pub lse: f32,
    /// Tokens the estimate stands for.
    pub tokens: u64,
}

/// One query's search between planning and reading its lists.
struct Planned<'a> {
    head: &'a ArchivedHeadManifest,
    q: &'a [f32],
    layer_slot: usize,
    kv_head: usize,
    position: usize,
    params: &'a SearchParams,
    static_lse: Option<f32>,
    /// Time spent planning; a search's time is planning + its reads + finishing, so that
    /// queries planned together (GQA) are not charged for each other.
    plan_ns: u64,
    scale: f32,
    stats: SearchStats,
    /// Groups of a hierarchical head that were not expanded, with their centroid scores.
    unexpanded: Vec<(u32, f32)>,
    /// The candidate lists as `best_first_key`s of (routing score, list id); the first
    /// `probed_lists` in best-first order.
    lkeys: Vec<u64>,
    probed_lists: usize,
    sq: ScalarQuantizer,
    cq: CodeQuery,
    /// The code score of every scanned member of the probed lists, list by list in probe
    /// order and each list's members in its order (a slot's offset in its list's run is its
    /// row); -inf for a member that is no candidate (static or not yet visible). A candidate's
    /// list and row follow from its slot.
    cand_scores: Vec<f32>,
    /// The token of each slot, copied by the scan while the list's members are at hand (read
    /// from the lists in the re-rank, they were cache misses: +10 µs per 128K query head).
    cand_tokens: Vec<u32>,
    /// The probed lists in probe order, whose codes [`Index::score_codes`] scores into
    /// `cand_scores`.
    probes: Vec<Probe>,
    /// The candidates to re-rank, as slots of `cand_scores`, ascending.
    best: Vec<u32>,
    /// The lists holding them, once each, in the order `best` meets them (probe order).
    need: Vec<u32>,
}

/// One list a query probes: where its members' slots start in the query's `cand_scores`, and
/// the score its codes add (the list's centroid score, for residual codes).
#[derive(Clone, Copy)]
struct Probe {
    list: u32,
    first_slot: u32,
    base: f32,
    /// Every member lies between the sinks and the recent window (no per-member check).
    all_open: bool,
}

/// Whether member `t` is a candidate for a query at `position`: visible and not static.
fn is_open(t: u32, position: usize, params: &SearchParams) -> bool {
    let tu = t as usize;
    tu <= position && !params.is_static(tu, position)
}

/// The members of a list that may hold candidates: with sorted lists (`sorted`), those from the
/// recent window's start on are all static or not yet visible, and their codes are not read.
fn scanned_chunks(
    members: &[u32],
    sorted: bool,
    window_start: usize,
) -> impl Iterator<Item = &[u32]> {
    members
        .chunks(CODE_BLOCK)
        .take_while(move |chunk| !(sorted && chunk[0] as usize >= window_start))
}

/// Where a group's planning runs.
#[derive(Clone, Copy)]
enum Threads {
    /// As tasks of the current rayon pool (a search).
    Pool,
    /// On the calling thread alone (the prefetcher).
    Caller,
}

enum PlanOutcome<'a> {
    /// Nothing to read (no budget and no estimate): the answer is already known.
    Done(Box<Retrieved>),
    Planned(Box<Planned<'a>>),
}

/// Source of the RAM-tier file ids of opened segments.
static NEXT_CACHE_FILE_ID: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// An index opened for search: the mapped manifest, the segment files and the RAM tier.
pub struct Index {
    dir: PathBuf,
    manifest: MappedManifest,
    segments: Vec<SegmentFile>,
    /// RAM-tier file id of each segment: unique in the process, since indexes share the tier.
    cache_ids: Vec<u32>,
    cache: Arc<RamCache>,
    /// Per head, when every list's primary members are in ascending token order (as `build`
    /// writes them): each list's first and last member. The remainder estimate then counts a
    /// list's members in a range from these two alone when the list lies between the sinks and
    /// the window, by binary search otherwise.
    list_bounds: Vec<Option<Vec<(u32, u32)>>>,
    /// Per head with a second level and sorted lists: each group's first and last member and
    /// member count, so that an unexpanded group lying between the sinks and the window is one
    /// remainder term.
    group_bounds: Vec<Vec<(u32, u32, u32)>>,
    /// Per head with sorted lists: its list ids by first member ascending and by last member
    /// descending, so that a search finds the few lists reaching into the sinks or the recent
    /// window without reading every list's bounds (see [`EstimateContext::open_members`]).
    edge_orders: Vec<Option<EdgeOrders>>,
}

/// List ids of one head, by first member ascending and by last member descending.
struct EdgeOrders {
    by_first: Vec<u32>,
    by_last: Vec<u32>,
}

impl EdgeOrders {
    fn new(bounds: &[(u32, u32)]) -> Self {
        let mut by_first: Vec<u32> = (0..bounds.len() as u32).collect();
        let mut by_last = by_first.clone();
        by_first.sort_unstable_by_key(|&l| bounds[l as usize].0);
        by_last.sort_unstable_by_key(|&l| std::cmp::Reverse(bounds[l as usize].1));
        EdgeOrders { by_first, by_last }
    }

    /// Which lists have a member among the sinks or from the window's start on (`edges`): the
    /// lists whose open members must be counted one by one. Charges `stats` for the entries
    /// walked (a list id and its bound each).
    fn touching(
        &self,
        bounds: &[(u32, u32)],
        (sink_end, recent_start): (usize, usize),
        stats: &mut SearchStats,
    ) -> Vec<bool> {
        let mut out = vec![false; bounds.len()];
        let mut walked = 0u64;
        for &l in &self.by_first {
            walked += 1;
            if bounds[l as usize].0 as usize >= sink_end {
                break;
            }
            out[l as usize] = true;
        }
        for &l in &self.by_last {
            walked += 1;
            if (bounds[l as usize].1 as usize) < recent_start {
                break;
            }
            out[l as usize] = true;
        }
        stats.estimate_bytes += 8 * walked;
        out
    }
}

impl Index {
    /// Opens the index in `dir`, validating the manifest and every segment footer.
    pub fn open(dir: &Path, reader: ReaderPreference, cache: Arc<RamCache>) -> IndexResult<Index> {
        let manifest = MappedManifest::open(dir)?;
        let m = manifest.get();
        let mut segments = Vec::with_capacity(m.segments.len());
        for name in m.segments.iter() {
            // A segment is a file of this folder: a name with a separator or `..` would read
            // (or block on) something elsewhere.
            let mut parts = Path::new(name.as_str()).components();
            if !matches!(
                (parts.next(), parts.next()),
                (Some(std::path::Component::Normal(_)), None)
            ) {
                return Err(IndexError::Open {
                    path: manifest.path().to_path_buf(),
                    problem: format!("segment name {:?} is not a file name", name.as_str()),
                });
            }
            segments.push(SegmentFile::open(&dir.join(name.as_str()), reader)?);
        }
        let expect = m.source.layers.len() * m.source.kv_heads.to_native() as usize;
        if m.heads.len() != expect {
            return Err(IndexError::Open {
                path: manifest.path().to_path_buf(),
                problem: format!(
                    "{} heads, expected {expect} (layers x kv heads)",
                    m.heads.len()
                ),
            });
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
            let kv = (m.source.kv_heads.to_native() as usize).max(1);
            let place = (i / kv, i % kv);
            check_head(
                h,
                file_len,
                place,
                manifest.centroid_code_bits(),
                manifest.key_code_bits(),
            )
            .map_err(|problem| IndexError::Open {
                path: manifest.path().to_path_buf(),
                problem: format!("head {i}: {problem}"),
            })?;
        }
        let list_bounds: Vec<Option<Vec<(u32, u32)>>> = manifest
            .get()
            .heads
            .iter()
            .map(|h| {
                let members = u32s(&h.primary_tokens);
                let lists: Vec<&[u32]> = u32s(&h.primary_start)
                    .windows(2)
                    .map(|w| &members[w[0] as usize..w[1] as usize])
                    .collect();
                let sorted = lists.iter().all(|m| m.windows(2).all(|p| p[0] < p[1]));
                sorted.then(|| {
                    lists
                        .iter()
                        .map(|m| {
                            (
                                m.first().copied().unwrap_or(u32::MAX),
                                m.last().copied().unwrap_or(0),
                            )
                        })
                        .collect()
                })
            })
            .collect();
        let group_bounds = manifest
            .get()
            .heads
            .iter()
            .zip(&list_bounds)
            .map(|(h, bounds)| {
                let Some(bounds) = bounds
                    .as_deref()
                    .filter(|_| !h.group_value_means.is_empty())
                else {
                    return Vec::new();
                };
                let starts = u32s(&h.primary_start);
                let glists = u32s(&h.group_lists);
                u32s(&h.group_start)
                    .windows(2)
                    .map(|w| {
                        glists[w[0] as usize..w[1] as usize].iter().fold(
                            (u32::MAX, 0, 0),
                            |(first, last, n), &l| {
                                let l = l as usize;
                                let (f, t) = bounds[l];
                                (first.min(f), last.max(t), n + starts[l + 1] - starts[l])
                            },
                        )
                    })
                    .collect()
            })
            .collect();
        Ok(Index {
            dir: dir.to_path_buf(),
            manifest,
            cache_ids: segments
                .iter()
                .map(|_| NEXT_CACHE_FILE_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
                .collect(),
            segments,
            cache,
            edge_orders: list_bounds
                .iter()
                .map(|b| b.as_deref().map(EdgeOrders::new))
                .collect(),
            list_bounds,
            group_bounds,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Bytes of the memory-mapped manifest (centroids, statistics, codes): the RAM an open
    /// index holds outside the RAM tier.
    pub fn mapped_bytes(&self) -> usize {
        self.manifest.mapped_bytes()
    }

    /// Bits of each centroid code of this index (set by the version it was written in).
    pub fn centroid_code_bits(&self) -> u32 {
        self.manifest.centroid_code_bits()
    }

    /// Whether query-aware heads route by vectors fitted to the train queries (format 5 on; a
    /// head with too few train queries for its size keeps key means: `routing::fit_stride`).
    pub fn fitted_routes(&self) -> bool {
        self.manifest.fitted_routes()
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
    ///
    /// With `target_mass` set, the covered mass of the static tokens is estimated from their key
    /// codes; a caller that attends the static tokens itself should pass their exact log-sum-exp
    /// through [`Index::search_with_static`] instead.
    pub fn search(
        &self,
        layer_slot: usize,
        kv_head: usize,
        q: &[f32],
        position: usize,
        params: &SearchParams,
    ) -> IndexResult<Retrieved> {
        self.search_with_static(layer_slot, kv_head, q, position, params, None)
    }

    /// [`Index::search`], given the caller's exact log-sum-exp (natural log of Σ exp(s·q·k)) over
    /// the static tokens, which the adaptive budget (`target_mass`) counts as covered mass.
    /// `None` estimates it from the static tokens' key codes. `-inf` means no static tokens.
    pub fn search_with_static(
        &self,
        layer_slot: usize,
        kv_head: usize,
        q: &[f32],
        position: usize,
        params: &SearchParams,
        static_lse: Option<f32>,
    ) -> IndexResult<Retrieved> {
        // A group of one: the same plan, read, check and re-rank.
        let mut out = self.search_group(
            layer_slot,
            kv_head,
            &[q],
            position,
            params,
            static_lse.as_ref().map(std::slice::from_ref),
            Gather::Values,
        )?;
        out.pop().ok_or_else(|| IndexError::Param {
            name: "queries",
            problem: "a search of one query returned no result".into(),
        })
    }

    /// Searches the query heads of one KV head's group together (GQA): each query is planned
    /// on its own (centroids, codes, candidates), the union of the lists they need is read once,
    /// then each is re-ranked exactly. Results are those of [`Index::search_with_static`] per
    /// query, with values or attention as `gather` asks; the list reads are counted in the
    /// first query's stats.
    #[allow(clippy::too_many_arguments)]
    pub fn search_group(
        &self,
        layer_slot: usize,
        kv_head: usize,
        queries: &[&[f32]],
        position: usize,
        params: &SearchParams,
        static_lses: Option<&[f32]>,
        gather: Gather,
    ) -> IndexResult<Vec<Retrieved>> {
        if let Some(s) = static_lses.filter(|s| s.len() != queries.len()) {
            return Err(IndexError::Param {
                name: "static_lses",
                problem: format!("{} for {} queries", s.len(), queries.len()),
            });
        }
        // The queries are finished as separate rayon tasks (and partly planned so): a caller
        // that runs groups in parallel (the engine's step) then balances its threads by query,
        // not by group (groups left one thread idle for about a tenth of a 128K step).
        let planned = self.plan_group(
            layer_slot,
            kv_head,
            queries,
            position,
            params,
            static_lses,
            Threads::Pool,
        )?;
        let mut outs: Vec<Option<Retrieved>> = Vec::with_capacity(queries.len());
        let mut plans = Vec::new();
        for (i, outcome) in planned.into_iter().enumerate() {
            match outcome {
                PlanOutcome::Done(r) => outs.push(Some(*r)),
                PlanOutcome::Planned(p) => {
                    outs.push(None);
                    plans.push((i, p));
                }
            }
        }
        if plans.is_empty() {
            return Ok(outs.into_iter().flatten().collect());
        }
        let head = self.head(layer_slot, kv_head)?;
        let union = lists_needed(plans.iter().map(|(_, p)| &**p), head.lists.len());
        let io_started = Instant::now();
        let mut io_stats = SearchStats::default();
        let bufs = self.fetch_lists(head, &union.ids, &mut io_stats)?;
        // Each list is laid out once for the whole group (counted as I/O time).
        let views = self.parse_views(head, &bufs, &union.ids)?;
        io_stats.io_ns = io_started.elapsed().as_nanos() as u64;
        if let Some((_, p)) = plans.first_mut() {
            p.stats.io_ns = io_stats.io_ns;
            p.stats.lists_read = io_stats.lists_read;
            p.stats.lists_from_ram = io_stats.lists_from_ram;
            p.stats.ssd_reads = io_stats.ssd_reads;
            p.stats.ssd_bytes = io_stats.ssd_bytes;
            p.stats.list_bytes = io_stats.list_bytes;
            p.stats.keys_read = io_stats.keys_read;
        }
        let finished = plans
            .into_par_iter()
            .map(|(i, p)| Ok((i, self.finish(*p, &union, &views, gather)?)))
            .collect::<IndexResult<Vec<_>>>()?;
        for (i, r) in finished {
            outs[i] = Some(r);
        }
        Ok(outs.into_iter().flatten().collect())
    }

    /// Reads every list of every head into the RAM tier, head by head, while the tier has room
    /// for the whole head (nothing is evicted for it). Returns the bytes the tier holds after.
    pub fn preload(&self) -> IndexResult<u64> {
        let cache = &self.cache;
        for layer_slot in 0..self.manifest().source.layers.len() {
            for kv_head in 0..self.kv_heads() {
                let head = self.head(layer_slot, kv_head)?;
                // The tier holds lists at their unpadded length.
                let bytes: u64 = head.lists.iter().map(|x| x.len.to_native() as u64).sum();
                if cache.stats().bytes + bytes > cache.capacity() {
                    return Ok(cache.stats().bytes);
                }
                let ids: Vec<u32> = (0..head.lists.len() as u32).collect();
                let mut stats = SearchStats::default();
                for chunk in ids.chunks(256) {
                    self.fetch_lists(head, chunk, &mut stats)?;
                }
            }
        }
        Ok(cache.stats().bytes)
    }

    /// Reads into the RAM tier the lists that [`Index::search_group`] with these arguments would
    /// read, and nothing more: each query is planned (centroids, codes, candidates), the union of
    /// the lists they need is fetched, and no candidate is re-ranked. The prefetcher calls this
    /// with the current step's queries for the next position. Returns how many lists it asked
    /// for (hits included).
    pub fn prefetch_group(
        &self,
        layer_slot: usize,
        kv_head: usize,
        queries: &[&[f32]],
        position: usize,
        params: &SearchParams,
    ) -> IndexResult<usize> {
        let plans: Vec<Box<Planned>> = self
            // On the caller's thread only: the prefetcher runs at idle priority, and its work
            // must not take the step's threads.
            .plan_group(
                layer_slot,
                kv_head,
                queries,
                position,
                params,
                None,
                Threads::Caller,
            )?
            .into_iter()
            .filter_map(|o| match o {
                PlanOutcome::Planned(p) => Some(p),
                PlanOutcome::Done(_) => None,
            })
            .collect();
        let head = self.head(layer_slot, kv_head)?;
        let union = lists_needed(plans.iter().map(|p| &**p), head.lists.len()).ids;
        if !union.is_empty() {
            self.fetch_lists(head, &union, &mut SearchStats::default())?;
        }
        Ok(union.len())
    }

    /// Step 1 of a search and the start of step 2: validation, the lists to probe and where
    /// their candidates will go. [`Index::plan_group`] then scores their codes and picks the
    /// candidates.
    fn plan<'a>(
        &'a self,
        layer_slot: usize,
        kv_head: usize,
        q: &'a [f32],
        position: usize,
        params: &'a SearchParams,
        static_lse: Option<f32>,
    ) -> IndexResult<PlanOutcome<'a>> {
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
        if let Some(s) = static_lse {
            if s.is_nan() || s == f32::INFINITY {
                return Err(qerr(format!("static log-sum-exp is {s}")));
            }
        }
        let scale = match self.manifest().source.softmax_scale.get(layer_slot) {
            Some(s) if s.to_native().is_finite() => s.to_native(),
            _ => {
                return Err(qerr(
                    "the index has no finite softmax scale for this layer".into(),
                ))
            }
        };
        let visible = position + 1;
        let budget = params.budget_tokens(position);
        let estimate = params.estimates();
        let mut stats = SearchStats::default();
        if budget == 0 && !estimate {
            stats.search_ns = started.elapsed().as_nanos() as u64;
            return Ok(PlanOutcome::Done(Box::new(Retrieved {
                stats,
                values: Some(Vec::new()),
                ..Default::default()
            })));
        }

        // 1. Lists to probe, best centroid first.
        let centroid_codes = head.centroid_codes.as_slice();
        let csq = self.centroid_quantizer(head);
        let centroid_code_bytes = csq.code_bytes();
        let ccq = csq.query(q);
        let n_lists = head.lists.len();
        let primary_start = u32s(&head.primary_start);
        // Groups of a hierarchical head left unexpanded: their score stands in for their
        // lists' centroids in the remainder estimate.
        let mut unexpanded: Vec<(u32, f32)> = Vec::new();
        let candidate_lists: Vec<u32> = if head.group_centroid_codes.is_empty() {
            (0..n_lists as u32).collect()
        } else {
            // Second level: expand the best groups until they hold `group_expand_factor`
            // times the probe target.
            let gc = head.group_centroid_codes.as_slice();
            let gstart = u32s(&head.group_start);
            let glists = u32s(&head.group_lists);
            let gscores: Vec<f32> = gc
                .chunks_exact(centroid_code_bytes)
                .map(|c| ccq.score(c))
                .collect();
            stats.centroids_scored += gscores.len() as u64;
            let mut keys: Vec<u64> = (0..gscores.len() as u32)
                .map(|g| best_first_key(gscores[g as usize], g))
                .collect();
            keys.sort_unstable_by(best_first);
            let order: Vec<u32> = keys.iter().map(|&k| from_best_first_key(k).1).collect();
            let target =
                params.group_expand_factor as f64 * params.probe_fraction as f64 * visible as f64;
            let mut out = Vec::new();
            let mut covered = 0usize;
            let mut expanded = 0;
            for &g in &order {
                if covered as f64 >= target {
                    break;
                }
                for &l in &glists[gstart[g as usize] as usize..gstart[g as usize + 1] as usize] {
                    covered += (primary_start[l as usize + 1] - primary_start[l as usize]) as usize;
                    out.push(l);
                }
                expanded += 1;
            }
            if estimate {
                unexpanded.extend(order[expanded..].iter().map(|&g| (g, gscores[g as usize])));
            }
            out
        };
        // Each list's score and id as one integer (`best_first_key`), so that ordering the
        // lists compares integers.
        let mut lkeys: Vec<u64> = candidate_lists
            .iter()
            .map(|&l| {
                let at = l as usize * centroid_code_bytes;
                best_first_key(ccq.score(&centroid_codes[at..at + centroid_code_bytes]), l)
            })
            .collect();
        stats.centroids_scored += lkeys.len() as u64;
        // The codes of every centroid scored, plus the quantiser (two f32 per dimension).
        stats.centroid_bytes = stats.centroids_scored * centroid_code_bytes as u64 + 8 * dim as u64;
        // Only the lists about to be probed need an order: sort a prefix (a quarter more lists
        // than the probe target needs at the mean list size), more only if probing gets that
        // far. The remainder estimate reads the rest in any order.
        let mean_list = (tokens as f64 / n_lists.max(1) as f64).max(1.0);
        let head_lists =
            (1.25 * params.probe_fraction as f64 * visible as f64 / mean_list).ceil() as usize + 16;
        let mut order = LazySort::new(&mut lkeys, head_lists, best_first);

        let mut mark = started;
        // 2. The lists to probe, best first, until their open members reach the probe target.
        // Their codes are scored for the whole GQA group at once (`score_codes`).
        let sq = ScalarQuantizer {
            bits: head.code_bits.to_native(),
            lo: f32s(&head.code_lo).to_vec(),
            step: f32s(&head.code_step).to_vec(),
        };
        let cq = sq.query(q);
        let residual = sq.bits == RESIDUAL_CODE_BITS;
        let probe_target = (params.probe_fraction as f64 * visible as f64).ceil() as usize;
        let bounds = self.list_bounds_of(layer_slot, kv_head);
        let edges = params.static_edges(position);
        // Open members probed (what the probe target counts) and slots (every member scanned).
        let mut probed = 0usize;
        let mut slots = 0usize;
        let mut probed_lists = 0usize;
        let mut probes: Vec<Probe> = Vec::with_capacity(head_lists);
        while probed < probe_target && probed_lists < lkeys.len() {
            order.reach(&mut lkeys, probed_lists, best_first);
            let (centroid_score, l) = from_best_first_key(lkeys[probed_lists]);
            probed_lists += 1;
            let members = primary_members(head, l as usize);
            // A list whose members all lie between the sinks and the window (most of them, when
            // the head's lists are sorted) needs no per-member check.
            let all_open =
                bounds.is_some_and(|b| lies_between_statics(b[l as usize], members.len(), edges));
            let (open, scanned) = if all_open {
                (members.len(), members.len())
            } else {
                scanned_chunks(members, bounds.is_some(), edges.1)
                    .flatten()
                    .fold((0, 0), |(open, scanned), &t| {
                        (open + is_open(t, position, params) as usize, scanned + 1)
                    })
            };
            probes.push(Probe {
                list: l,
                first_slot: slots as u32,
                base: if residual { centroid_score } else { 0.0 },
                all_open,
            });
            probed += open;
            slots += scanned;
        }
        stats.phases.centroids_ns = lap(&mut mark);
        let plan_ns = started.elapsed().as_nanos() as u64;
        Ok(PlanOutcome::Planned(Box::new(Planned {
            head,
            q,
            layer_slot,
            kv_head,
            position,
            params,
            static_lse,
            plan_ns,
            scale,
            stats,
            unexpanded,
            lkeys,
            probed_lists,
            sq,
            cq,
            cand_scores: vec![0.0; slots],
            cand_tokens: vec![0; slots],
            probes,
            best: Vec::new(),
            need: Vec::new(),
        })))
    }

    /// Plans the queries of one KV head's group: each chooses its lists on its own (in
    /// parallel), then one pass scores every probed list's codes for all the queries that
    /// probe it, and each query picks its candidates.
    #[allow(clippy::too_many_arguments)]
    fn plan_group<'a>(
        &'a self,
        layer_slot: usize,
        kv_head: usize,
        queries: &[&'a [f32]],
        position: usize,
        params: &'a SearchParams,
        static_lses: Option<&[f32]>,
        threads: Threads,
    ) -> IndexResult<Vec<PlanOutcome<'a>>> {
        let plan_one = |(i, q): (usize, &&'a [f32])| {
            let s = static_lses.and_then(|s| s.get(i).copied());
            self.plan(layer_slot, kv_head, q, position, params, s)
        };
        // With the pool, the queries choose their lists as separate rayon tasks: a caller that
        // runs groups in parallel (the engine's step) then balances its threads by query, not
        // by group.
        let mut outcomes: Vec<PlanOutcome<'a>> = match threads {
            Threads::Pool => queries
                .par_iter()
                .enumerate()
                .map(plan_one)
                .collect::<IndexResult<_>>(),
            Threads::Caller => queries
                .iter()
                .enumerate()
                .map(plan_one)
                .collect::<IndexResult<_>>(),
        }?;
        let mut plans: Vec<&mut Planned<'a>> = outcomes
            .iter_mut()
            .filter_map(|o| match o {
                PlanOutcome::Planned(p) => Some(&mut **p),
                PlanOutcome::Done(_) => None,
            })
            .collect();
        self.score_codes(&mut plans);
        match threads {
            Threads::Pool => plans.par_iter_mut().for_each(|p| select_candidates(p)),
            Threads::Caller => plans.iter_mut().for_each(|p| select_candidates(p)),
        }
        Ok(outcomes)
    }

    /// Scores the probed lists' codes into each plan's `cand_*` arrays. The plans are one
    /// group's (same head, position and parameters), whose queries probe many of the same lists
    /// (about 2.8 queries of 4 per list on the 128K bench): each list's codes and members are
    /// read once for all of them, in list order, which also walks the codes forward in memory.
    fn score_codes(&self, plans: &mut [&mut Planned<'_>]) {
        let Some(first) = plans.first() else {
            return;
        };
        let started = Instant::now();
        let (head, layer_slot, kv_head) = (first.head, first.layer_slot, first.kv_head);
        let (position, params) = (first.position, first.params);
        let block_bytes = first.sq.block_bytes();
        let codes = head.codes.as_slice();
        let block_start = u32s(&head.code_block_start);
        let sorted = self.list_bounds_of(layer_slot, kv_head).is_some();
        let window_start = params.static_edges(position).1;
        // Every probe as (list, its index in `owners`), one integer each, ordered by list.
        let owners: Vec<(u32, u32)> = plans
            .iter()
            .enumerate()
            .flat_map(|(pi, p)| (0..p.probes.len() as u32).map(move |k| (pi as u32, k)))
            .collect();
        let mut work: Vec<u64> = owners
            .iter()
            .enumerate()
            .map(|(i, &(pi, k))| {
                ((plans[pi as usize].probes[k as usize].list as u64) << 32) | i as u64
            })
            .collect();
        work.sort_unstable();
        // The work runs list by list; each run asks for the next list's codes and members,
        // which lie elsewhere in the manifest, while its own are scored (further ahead read
        // alike on the 128K bench).
        let runs: Vec<&[u64]> = work.chunk_by(|a, b| a >> 32 == b >> 32).collect();
        // One list's scores for up to SHARED_SCAN_QUERIES queries, block-major.
        let mut scored: Vec<[f32; CODE_BLOCK]> = Vec::new();
        for (j, run) in runs.iter().enumerate() {
            let l = (run[0] >> 32) as usize;
            if let Some(next) = runs.get(j + 1) {
                let n = (next[0] >> 32) as usize;
                let blocks = block_start[n] as usize..block_start[n + 1] as usize;
                crate::simd::prefetch(&codes[blocks.start * block_bytes..blocks.end * block_bytes]);
                crate::simd::prefetch(bytemuck::cast_slice(primary_members(head, n)));
            }
            let members = primary_members(head, l);
            let first_block = block_start[l] as usize;
            let block_of = |b: usize| &codes[(first_block + b) * block_bytes..][..block_bytes];
            // The queries probing this list, a few at a time: each block is decoded once for
            // all of them (`CodeQuery::score_blocks`), then each query's scores and the
            // members' tokens go to its slots.
            for items in run.chunks(SHARED_SCAN_QUERIES) {
                let owner = |item: u64| {
                    let (pi, k) = owners[item as u32 as usize];
                    (pi as usize, k as usize)
                };
                let m = items.len();
                scored.clear();
                {
                    let mut queries = [(&plans[0].cq, 0f32); SHARED_SCAN_QUERIES];
                    for (q, &item) in queries.iter_mut().zip(items) {
                        let (pi, k) = owner(item);
                        *q = (&plans[pi].cq, plans[pi].probes[k].base);
                    }
                    let queries = &queries[..m];
                    for (b, _) in scanned_chunks(members, sorted, window_start).enumerate() {
                        let at = scored.len();
                        scored.resize(at + m, [0f32; CODE_BLOCK]);
                        CodeQuery::score_blocks(queries, block_of(b), &mut scored[at..]);
                    }
                }
                for (i, &item) in items.iter().enumerate() {
                    let (pi, k) = owner(item);
                    let plan = &mut *plans[pi];
                    let probe = plan.probes[k];
                    let mut c = probe.first_slot as usize;
                    for (b, chunk) in scanned_chunks(members, sorted, window_start).enumerate() {
                        let n = chunk.len();
                        plan.cand_scores[c..c + n].copy_from_slice(&scored[b * m + i][..n]);
                        plan.cand_tokens[c..c + n].copy_from_slice(chunk);
                        if !probe.all_open {
                            for (score, &t) in plan.cand_scores[c..c + n].iter_mut().zip(chunk) {
                                if !is_open(t, position, params) {
                                    *score = f32::NEG_INFINITY;
                                }
                            }
                        }
                        plan.stats.codes_scored += n as u64;
                        c += n;
                    }
                }
            }
        }
        // The pass's time is shared out by the codes each query scored.
        let ns = started.elapsed().as_nanos() as u64;
        let scored: u64 = plans.iter().map(|p| p.stats.codes_scored).sum();
        for p in plans.iter_mut() {
            let share = ns * p.stats.codes_scored / scored.max(1);
            p.stats.code_bytes = p.stats.codes_scored * p.sq.code_bytes() as u64;
            p.stats.phases.codes_ns = share;
            p.plan_ns += share;
        }
    }

    /// Steps 3 and 4: exact re-ranking from the lists read (`views[i]` holds list
    /// `read.ids[i]`), the remainder estimate and the adaptive budget.
    fn finish(
        &self,
        plan: Planned<'_>,
        read: &ListUnion,
        views: &[ListView<'_>],
        gather: Gather,
    ) -> IndexResult<Retrieved> {
        let finish_started = Instant::now();
        let Planned {
            head,
            q,
            layer_slot,
            kv_head,
            position,
            params,
            static_lse,
            plan_ns,
            scale,
            mut stats,
            unexpanded,
            lkeys,
            probed_lists,
            sq,
            cq,
            cand_scores,
            cand_tokens,
            probes,
            best,
            need: _,
        } = plan;
        // Derived again rather than carried: the same facts plan() computed.
        let dim = q.len();
        let budget = params.budget_tokens(position);
        let estimate = params.estimates();
        // 3. Re-rank the candidates exactly from the lists read. Only the candidates are
        // scored exactly: the codes already ranked every probed member, and re-scoring whole
        // lists would cost full-key work for tokens the codes ruled out. The plan appended
        // candidates list by list, so `best` (ascending) comes grouped by list.
        let mut ex_cand: Vec<u32> = Vec::with_capacity(best.len());
        let mut ex_tokens: Vec<u32> = Vec::with_capacity(best.len());
        let mut ex_scores: Vec<f32> = Vec::with_capacity(best.len());
        // Each candidate's list as its index in the lists read (and `views`), and its row there.
        let mut ex_rows: Vec<(u32, u32)> = Vec::with_capacity(best.len());
        // `best` meets each list's candidates together: one lookup per list.
        let mut run = (usize::MAX, usize::MAX);
        for (ci, p) in slots_by_probe(&probes, best.iter().copied()) {
            let probe = probes[p];
            if run.0 != p {
                let bi = match read.index_of.get(probe.list as usize) {
                    Some(&i) if (i as usize) < views.len() => i as usize,
                    _ => {
                        return Err(IndexError::Open {
                            path: self.dir.clone(),
                            problem: format!(
                                "list {} holds a candidate but was not read",
                                probe.list
                            ),
                        })
                    }
                };
                run = (p, bi);
            }
            let bi = run.1;
            // A slot's offset in its list's run is its row: its rank among the list's primary
            // members, which the list stores first and in the manifest's order (`fetch_lists`
            // checked every one when it read the list).
            let r = (ci - probe.first_slot) as usize;
            if r >= views[bi].len() {
                return Err(IndexError::Open {
                    path: self.dir.clone(),
                    problem: format!("list {} has no row {r}", probe.list),
                });
            }
            ex_cand.push(ci);
            ex_tokens.push(cand_tokens[ci as usize]);
            ex_rows.push((bi as u32, r as u32));
        }
        let list_of = |i: usize| read.ids[ex_rows[i].0 as usize];
        // Candidates ranked by their codes from `code_trusted_from` of the budget on, for
        // `code_trusted_fraction` of it, keep their code scores; the others (the best ones,
        // whose weights dominate the output, and those nearest the cut) are scored exactly.
        let of_budget = |share: f32| ((share as f64) * budget as f64).floor() as usize;
        let trusted_count = of_budget(params.code_trusted_fraction);
        let mut trusted = vec![false; ex_cand.len()];
        if trusted_count > 0 {
            // Two selections, best first, rather than a sort, over one integer per candidate
            // (`best_first_key` of its code score and index).
            let skip = of_budget(params.code_trusted_from).min(ex_cand.len());
            let end = (skip + trusted_count).min(ex_cand.len());
            let mut ranked: Vec<u64> = ex_cand
                .iter()
                .enumerate()
                .map(|(i, &c)| best_first_key(cand_scores[c as usize], i as u32))
                .collect();
            if end < ranked.len() {
                ranked.select_nth_unstable_by(end, best_first);
            }
            let leading = &mut ranked[..end];
            if skip > 0 && skip < leading.len() {
                leading.select_nth_unstable_by(skip, best_first);
            }
            for &key in &leading[skip..] {
                trusted[from_best_first_key(key).1 as usize] = true;
            }
        }
        let key_row = |&(bi, r): &(u32, u32)| views[bi as usize].key_bytes(r as usize);
        // Trusted candidates keep their code scores; the others' key rows are read, with the
        // prefetch running ahead over those rows only (trusted ones need no key).
        ex_scores.extend(ex_cand.iter().map(|&c| cand_scores[c as usize]));
        // A second walk over the rows to read runs `PREFETCH_ROWS_AHEAD` ahead of the scoring.
        let read = |i: &usize| !trusted[*i];
        let mut ahead = (0..ex_rows.len()).filter(read);
        for i in ahead.by_ref().take(PREFETCH_ROWS_AHEAD) {
            crate::simd::prefetch(key_row(&ex_rows[i]));
        }
        let mut keys_read = 0u64;
        for i in (0..ex_rows.len()).filter(read) {
            if let Some(a) = ahead.next() {
                crate::simd::prefetch(key_row(&ex_rows[a]));
            }
            ex_scores[i] = dot_f16_bytes(key_row(&ex_rows[i]), q);
            keys_read += 1;
        }
        // A finite query can still be large enough for `q·k` to overflow: an infinite logit
        // would make the attention and the estimate meaningless.
        if let Some(i) = ex_scores.iter().position(|s| !(scale * s).is_finite()) {
            return Err(IndexError::Query {
                layer_slot,
                kv_head,
                position,
                problem: format!(
                    "the logit of token {} is {}: the query is too large",
                    ex_tokens[i],
                    scale * ex_scores[i]
                ),
            });
        }
        stats.keys_scored = keys_read;
        stats.key_bytes = stats.keys_scored * dim as u64 * 2;
        // The best `budget` exactly scored tokens; best first only where the adaptive budget
        // walks them in that order.
        let mut top = top_k_indices(&ex_scores, budget);
        if params.target_mass.is_some() {
            top.sort_unstable_by(|&a, &b| {
                ex_scores[b as usize]
                    .total_cmp(&ex_scores[a as usize])
                    .then(a.cmp(&b))
            });
        }

        let mut mark = finish_started;
        stats.phases.rerank_ns = lap(&mut mark);
        // 4. Remainder estimate and adaptive budget.
        let mut remainder = None;
        if estimate {
            let hi = layer_slot * self.kv_heads() + kv_head;
            let bounds = self.list_bounds_of(layer_slot, kv_head);
            let touching = match (bounds, self.edge_orders.get(hi)) {
                (Some(b), Some(Some(orders))) => {
                    Some(orders.touching(b, params.static_edges(position), &mut stats))
                }
                _ => None,
            };
            let ctx = EstimateContext {
                head,
                q,
                scale,
                position,
                params,
                bounds,
                touching,
                group_bounds: self.group_bounds.get(hi).map_or(&[], |b| b.as_slice()),
            };
            let mut est = RemainderEstimator::default();
            // Every exactly scored candidate with its exact logit; the attended ones (the top
            // `budget`) with -inf, so that they join no term.
            let mut exact: Vec<(u32, f32)> = ex_cand
                .iter()
                .zip(&ex_scores)
                .map(|(&c, &x)| (c, scale * x))
                .collect();
            for &i in &top {
                exact[i as usize].1 = f32::NEG_INFINITY;
            }
            est.add_not_scored_exactly(
                &ctx,
                &sq,
                &lkeys,
                probed_lists,
                &unexpanded,
                &probes,
                &cand_scores,
                &exact,
                &mut stats,
            );
            let mut attend = top.len();
            if let Some(target) = params.target_mass {
                let s_lse = match static_lse {
                    Some(s) => s,
                    None => {
                        // Residual codes add their list's centroid score.
                        let csq = self.centroid_quantizer(head);
                        let (ccq, cb) = (csq.query(q), csq.code_bytes());
                        let centroids = head.centroid_codes.as_slice();
                        let base = |l: usize| {
                            if sq.bits == RESIDUAL_CODE_BITS {
                                ccq.score(&centroids[l * cb..(l + 1) * cb])
                            } else {
                                0.0
                            }
                        };
                        ctx.static_lse_from_codes(&sq, &cq, &base, &mut stats)
                    }
                };
                attend = adaptive_count(
                    target as f64,
                    s_lse,
                    top.iter().map(|&i| scale * ex_scores[i as usize]),
                    est.lse(),
                );
            }
            // Exactly scored tokens beyond what is attended join the remainder with their exact
            // logits (their keys were read; their values are not used).
            for &i in &top[attend..] {
                est.add_token_logit(list_of(i as usize), scale * ex_scores[i as usize]);
            }
            top.truncate(attend);
            if params.estimate_remainder {
                remainder = Some(est.finish(&ctx, &mut stats));
            }
        }

        stats.phases.estimate_ns = lap(&mut mark);
        stats.value_bytes = top.len() as u64 * dim as u64 * 2;
        let value_row = |i: u32| {
            let (bi, r) = ex_rows[i as usize];
            views[bi as usize].value_bytes(r as usize)
        };
        let (values, attention) = match gather {
            Gather::Values => {
                let mut values = Vec::with_capacity(top.len() * dim);
                for &i in &top {
                    f16_bytes_to_f32(value_row(i), &mut values);
                }
                (Some(values), None)
            }
            Gather::Attention => {
                let logits = top.iter().map(|&i| scale * ex_scores[i as usize]);
                (
                    None,
                    Some(attend_rows(logits, top.iter().map(|&i| value_row(i)), dim)),
                )
            }
        };
        let mut out = Retrieved {
            tokens: top.iter().map(|&i| ex_tokens[i as usize]).collect(),
            scores: top.iter().map(|&i| ex_scores[i as usize]).collect(),
            values,
            attention,
            remainder,
            stats,
        };
        out.stats.phases.gather_ns = lap(&mut mark);
        out.stats.search_ns =
            plan_ns + out.stats.io_ns + finish_started.elapsed().as_nanos() as u64;
        Ok(out)
    }

    /// The lists read (`bufs[i]` holds list `ids[i]`) as views. Their contents were checked
    /// when they were read from disk (`fetch_lists`), so a view is laid out from the manifest
    /// alone: touching each list's header and ids again cost cache misses on every step.
    fn parse_views<'b>(
        &self,
        head: &ArchivedHeadManifest,
        bufs: &'b [Arc<AlignedBuf>],
        ids: &[u32],
    ) -> IndexResult<Vec<ListView<'b>>> {
        let dim = head.dim.to_native() as usize;
        bufs.iter()
            .zip(ids)
            .map(|(buf, &l)| {
                // `fetch_lists` refused any id past the head's lists.
                let members = head.lists[l as usize].members.to_native() as usize;
                ListView::laid_out(buf, members, dim).map_err(|problem| IndexError::Open {
                    path: self.segments[head.segment.to_native() as usize]
                        .path()
                        .to_path_buf(),
                    problem: format!("list {l}: {problem}"),
                })
            })
            .collect()
    }

    /// The quantiser of a head's centroid codes.
    fn centroid_quantizer(&self, head: &ArchivedHeadManifest) -> ScalarQuantizer {
        ScalarQuantizer {
            bits: self.manifest.centroid_code_bits(),
            lo: f32s(&head.centroid_lo).to_vec(),
            step: f32s(&head.centroid_step).to_vec(),
        }
    }

    fn kv_heads(&self) -> usize {
        self.manifest().source.kv_heads.to_native() as usize
    }

    /// Each list's first and last primary member for one head, when its lists are sorted
    /// (`Index::list_bounds`).
    fn list_bounds_of(&self, layer_slot: usize, kv_head: usize) -> Option<&[(u32, u32)]> {
        self.list_bounds
            .get(layer_slot * self.kv_heads() + kv_head)
            .and_then(|b| b.as_deref())
    }

    /// Lists `ids` of `head`, from the RAM tier where present, the rest in one batched read.
    pub fn fetch_lists(
        &self,
        head: &ArchivedHeadManifest,
        ids: &[u32],
        stats: &mut SearchStats,
    ) -> IndexResult<Vec<Arc<AlignedBuf>>> {
        let seg_index = head.segment.to_native() as usize;
        let (Some(seg), Some(&seg_id)) =
            (self.segments.get(seg_index), self.cache_ids.get(seg_index))
        else {
            return Err(IndexError::Param {
                name: "head",
                problem: format!("names segment {seg_index}, which this index does not have"),
            });
        };
        if let Some(&l) = ids.iter().find(|&&l| l as usize >= head.lists.len()) {
            return Err(IndexError::Param {
                name: "ids",
                problem: format!("list {l} is past the head's {} lists", head.lists.len()),
            });
        }
        let keys: Vec<CacheKey> = ids
            .iter()
            .map(|&l| CacheKey {
                file: seg_id,
                offset: head.lists[l as usize].offset.to_native(),
            })
            .collect();
        let mut out = self.cache.get_many(&keys);
        let mut missing = Vec::new();
        let mut locs = Vec::new();
        for (i, &l) in ids.iter().enumerate() {
            let loc = &head.lists[l as usize];
            stats.list_bytes += loc.len.to_native() as u64;
            stats.keys_read += loc.members.to_native() as u64;
            if out[i].is_some() {
                stats.lists_from_ram += 1;
            } else {
                missing.push(i);
                locs.push(ListLocation {
                    offset: loc.offset.to_native(),
                    len: loc.len.to_native(),
                    padded_len: loc.padded_len.to_native(),
                    crc32: loc.crc32.to_native(),
                });
            }
        }
        stats.lists_read += ids.len() as u64;
        if !locs.is_empty() {
            let bufs = seg.read_lists(&locs)?;
            for ((i, buf), loc) in missing.into_iter().zip(bufs).zip(&locs) {
                stats.ssd_reads += 1;
                stats.ssd_bytes += loc.padded_len as u64;
                // Checked once here, before the RAM tier holds it: searches then lay out its
                // views from the manifest without reading its header or ids (`parse_views`).
                let l = ids[i];
                check_list(&buf, head, l).map_err(|problem| IndexError::Open {
                    path: seg.path().to_path_buf(),
                    problem: format!("list {l}: {problem}"),
                })?;
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

/// Step 2's end: the candidates to re-rank (the best codes) and the lists that hold them.
fn select_candidates(plan: &mut Planned<'_>) {
    let started = Instant::now();
    let budget = plan.params.budget_tokens(plan.position);
    let keep = ((plan.params.rerank_factor as f64) * budget as f64).ceil() as usize;
    plan.best = top_k_indices(&plan.cand_scores, keep);
    // A member that is no candidate (-inf) comes in only when fewer than `keep` are.
    let scores = &plan.cand_scores;
    plan.best
        .retain(|&c| scores[c as usize] > f32::NEG_INFINITY);
    // `best` is ascending, so it meets each list's candidates together and the lists in probe
    // order: the order in which the re-rank reads them.
    plan.need.clear();
    let mut last = usize::MAX;
    for (_, p) in slots_by_probe(&plan.probes, plan.best.iter().copied()) {
        if p != last {
            plan.need.push(plan.probes[p].list);
            last = p;
        }
    }
    let ns = started.elapsed().as_nanos() as u64;
    plan.stats.phases.select_ns = ns;
    plan.plan_ns += ns;
}

/// Each of `slots` (ascending slots of a plan's `cand_scores`) with the index of the probe whose
/// run holds it.
fn slots_by_probe<'p>(
    probes: &'p [Probe],
    slots: impl IntoIterator<Item = u32> + 'p,
) -> impl Iterator<Item = (u32, usize)> + 'p {
    let mut p = 0usize;
    slots.into_iter().map(move |c| {
        // Skips probes with no slots too (their next has the same first slot).
        while probes.get(p + 1).is_some_and(|next| next.first_slot <= c) {
            p += 1;
        }
        (c, p)
    })
}

/// Each probe's list and its run of slots, in probe order, of a plan with `slots` slots.
fn probe_runs(probes: &[Probe], slots: usize) -> impl Iterator<Item = (u32, Range<usize>)> + '_ {
    let ends = probes.iter().skip(1).map(|p| p.first_slot as usize);
    probes
        .iter()
        .zip(ends.chain([slots]))
        .map(|(p, end)| (p.list, p.first_slot as usize..end))
}

/// Whether a non-empty run of tokens with these first and last members lies wholly between the
/// sinks and the recent window (`edges`, from [`SearchParams::static_edges`]).
fn lies_between_statics((first, last): (u32, u32), members: usize, edges: (usize, usize)) -> bool {
    members > 0 && first as usize >= edges.0 && (last as usize) < edges.1
}

/// The lists any of `plans` needs, ascending and once each: what a group search reads.
fn lists_needed<'p, 'a: 'p>(
    plans: impl Iterator<Item = &'p Planned<'a>>,
    lists: usize,
) -> ListUnion {
    // Marked in a table of the head's lists, then read off in ascending order: cheaper than
    // sorting the group's needs (several hundred at 128K), and the table then finds each need's
    // place in the union in one load instead of a binary search.
    let mut index_of = vec![u32::MAX; lists];
    for p in plans {
        for &l in &p.need {
            if let Some(at) = index_of.get_mut(l as usize) {
                *at = 0;
            }
        }
    }
    let mut ids = Vec::new();
    for (l, at) in index_of.iter_mut().enumerate() {
        if *at == 0 {
            *at = ids.len() as u32;
            ids.push(l as u32);
        }
    }
    ListUnion { ids, index_of }
}

/// The lists a group's queries need, once each and ascending (`ids`), and each list's place
/// among them (`index_of[list]`, `u32::MAX` for a list none needs).
struct ListUnion {
    ids: Vec<u32>,
    index_of: Vec<u32>,
}

/// What the remainder estimate needs to know about one search.
struct EstimateContext<'a> {
    head: &'a ArchivedHeadManifest,
    q: &'a [f32],
    scale: f32,
    position: usize,
    params: &'a SearchParams,
    /// Each list's first and last primary member, when the head's lists hold their primary
    /// members in ascending order.
    bounds: Option<&'a [(u32, u32)]>,
    /// With `bounds`: which lists reach into the sinks or the recent window
    /// ([`EdgeOrders::touching`]); every other list's members are all open.
    touching: Option<Vec<bool>>,
    /// Each group's first and last member and member count (empty: no group terms).
    group_bounds: &'a [(u32, u32, u32)],
}

/// Where a list's visible members stand, as index ranges into its primary members: `[0, a)` are
/// sinks, `[a, b)` are visible and non-static, `[b, c)` are in the recent window.
struct MemberRanges {
    a: usize,
    b: usize,
    c: usize,
}

impl EstimateContext<'_> {
    fn members(&self, l: usize) -> &[u32] {
        primary_members(self.head, l)
    }

    /// The sink end and window start of this search's position.
    fn static_edges(&self) -> (usize, usize) {
        self.params.static_edges(self.position)
    }

    /// Ranges of list `l`'s members (sorted lists only), and the bytes read to find them.
    fn ranges(&self, l: usize, bounds: &[(u32, u32)]) -> (MemberRanges, u64) {
        let (sink_end, recent_start) = self.static_edges();
        let start = u32s(&self.head.primary_start);
        let n = (start[l + 1] - start[l]) as usize;
        // Most lists lie wholly between the sinks and the window: their first and last members
        // say so, and the members themselves need not be read.
        if lies_between_statics(bounds[l], n, (sink_end, recent_start)) {
            return (MemberRanges { a: 0, b: n, c: n }, 16);
        }
        let members = self.members(l);
        let before = |x: usize| members.partition_point(|&t| (t as usize) < x);
        let probes = 3 * (usize::BITS - members.len().leading_zeros()) as u64;
        (
            MemberRanges {
                a: before(sink_end),
                b: before(recent_start),
                c: before(self.position + 1),
            },
            16 + 4 * probes,
        )
    }

    /// Visible, non-static members of list `l`.
    fn open_members(&self, l: usize, stats: &mut SearchStats) -> usize {
        if self.touching.as_ref().is_some_and(|t| !t[l]) {
            // Between the sinks and the window: the list's size (its two member offsets, one
            // of which the next list shares) is its count.
            stats.estimate_bytes += 4;
            let start = u32s(&self.head.primary_start);
            return (start[l + 1] - start[l]) as usize;
        }
        if let Some(bounds) = self.bounds {
            let (r, bytes) = self.ranges(l, bounds);
            stats.estimate_bytes += bytes;
            r.b - r.a
        } else {
            let members = self.members(l);
            stats.estimate_bytes += 4 * members.len() as u64;
            members
                .iter()
                .filter(|&&t| is_open(t, self.position, self.params))
                .count()
        }
    }

    /// `½·s²·|q|²·σ²` for list `l`, with `σ² = remainder_variance · radius² / dim`.
    fn variance_correction(&self, l: usize, q_norm_sq: f32, stats: &mut SearchStats) -> f32 {
        let gamma = self.params.remainder_variance;
        if gamma == 0.0 {
            return 0.0;
        }
        stats.estimate_bytes += 4;
        let r = f32s(&self.head.radius)[l];
        let dim = self.q.len() as f32;
        0.5 * self.scale * self.scale * q_norm_sq * gamma * r * r / dim
    }

    /// Log-sum-exp of the static tokens' logits, estimated from their key codes.
    fn static_lse_from_codes(
        &self,
        sq: &ScalarQuantizer,
        cq: &CodeQuery,
        list_base: &dyn Fn(usize) -> f32,
        stats: &mut SearchStats,
    ) -> f32 {
        let block_bytes = sq.block_bytes();
        let codes = self.head.codes.as_slice();
        let block_start = u32s(&self.head.code_block_start);
        let mut logits = Vec::new();
        let mut lanes = [0f32; CODE_BLOCK];
        let lists = self.head.lists.len();
        for (l, &first_block) in block_start.iter().enumerate().take(lists) {
            let members = self.members(l);
            let idx: Vec<usize> = if let Some(bounds) = self.bounds {
                let (r, bytes) = self.ranges(l, bounds);
                stats.estimate_bytes += bytes;
                (0..r.a).chain(r.b..r.c).collect()
            } else {
                stats.estimate_bytes += 4 * members.len() as u64;
                (0..members.len())
                    .filter(|&i| {
                        let t = members[i] as usize;
                        t <= self.position && self.params.is_static(t, self.position)
                    })
                    .collect()
            };
            let mut scored_block = usize::MAX;
            for i in idx {
                let block = first_block as usize + i / CODE_BLOCK;
                if block != scored_block {
                    let at = block * block_bytes;
                    cq.score_block(&codes[at..at + block_bytes], list_base(l), &mut lanes);
                    stats.estimate_bytes += block_bytes as u64;
                    scored_block = block;
                }
                logits.push(self.scale * lanes[i % CODE_BLOCK]);
            }
        }
        log_sum_exp(logits.iter().map(|&l| (l, 1.0)))
    }
}

/// A slice put in order in two steps: the first `head` elements of the order now, the rest
/// only when a caller first reaches past them (list probing and the estimate's heaviest lists
/// mostly stop inside the head). Either way the elements read are those of a full sort.
struct LazySort {
    sorted: usize,
}

impl LazySort {
    fn new<T>(xs: &mut [T], head: usize, order: impl Fn(&T, &T) -> std::cmp::Ordering) -> Self {
        let sorted = head.min(xs.len());
        if sorted < xs.len() {
            xs.select_nth_unstable_by(sorted, &order);
        }
        xs[..sorted].sort_unstable_by(&order);
        LazySort { sorted }
    }

    /// Puts `xs[i]` in its place: past the ordered part, the next as many elements again are
    /// selected and ordered (the same order a full sort gives, for a total order).
    fn reach<T>(&mut self, xs: &mut [T], i: usize, order: impl Fn(&T, &T) -> std::cmp::Ordering) {
        while i >= self.sorted && self.sorted < xs.len() {
            let next = (2 * self.sorted).max(self.sorted + 16).min(xs.len());
            let rest = &mut xs[self.sorted..];
            if next - self.sorted < rest.len() {
                rest.select_nth_unstable_by(next - self.sorted, &order);
            }
            rest[..next - self.sorted].sort_unstable_by(&order);
            self.sorted = next;
        }
    }
}

/// How many of the heaviest remainder terms `combine_terms` orders before it reads mean values
/// (more are ordered, doubling, if these do not reach `1 − remainder_list_epsilon` of the
/// weight). The 128K bench reads 23–24 means per query head; these and the prefetch's
/// `PREFETCH_ROWS_AHEAD` beyond fit. The earlier head, a quarter of the terms plus 64, took
/// 7.0–7.4 µs per 128K query head to order, this one 4.6–4.7 µs (one thread).
const COMBINE_SORTED_HEAD: usize = 32;

/// How many rows ahead re-ranking and the value gather prefetch: enough to cover a DRAM miss
/// with the arithmetic of the rows in between (measured in `strata bench decode`).
const PREFETCH_ROWS_AHEAD: usize = 8;

/// Attention over `logits` and their f16 value rows, in f32, converting each row once into a
/// small buffer: the rows are read where they lie.
fn attend_rows<'r>(
    logits: impl Iterator<Item = f32> + Clone,
    rows: impl Iterator<Item = &'r [u8]>,
    dim: usize,
) -> Attended {
    let max = logits.clone().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return Attended {
            output: vec![0.0; dim],
            lse: f32::NEG_INFINITY,
        };
    }
    let rows: Vec<&[u8]> = rows.collect();
    let mut weights: Vec<f32> = logits.map(|l| l - max).collect();
    crate::simd::exp_in_place(&mut weights);
    let mut out = vec![0f32; dim];
    let denom = crate::linalg::sum_of(&weights);
    if !crate::simd::add_weighted_f16_rows(&weights, &rows, &mut out, PREFETCH_ROWS_AHEAD) {
        let mut row = vec![0f32; dim];
        for (i, (&w, bytes)) in weights.iter().zip(&rows).enumerate() {
            if let Some(ahead) = rows.get(i + PREFETCH_ROWS_AHEAD) {
                crate::simd::prefetch(ahead);
            }
            crate::simd::f16_to_f32(bytes, &mut row);
            for (o, x) in out.iter_mut().zip(&row) {
                *o = w.mul_add(*x, *o);
            }
        }
    }
    let inv = 1.0 / denom;
    out.iter_mut().for_each(|o| *o *= inv);
    Attended {
        output: out,
        lse: max + denom.ln(),
    }
}

/// `ln Σ m·exp(l)` over `(l, m)` pairs (summed in f64); -inf when empty.
pub fn log_sum_exp(terms: impl Iterator<Item = (f32, f32)> + Clone) -> f32 {
    let max = terms
        .clone()
        .filter(|t| t.1 > 0.0)
        .map(|t| t.0)
        .fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return max;
    }
    let sum: f64 = terms
        .map(|(l, m)| m as f64 * ((l - max) as f64).exp())
        .sum();
    max + sum.ln() as f32
}

/// How many of the exactly scored tokens (`logits`, best first) to attend so that the static
/// tokens plus those reach `target` of the estimated total mass (static + all exactly scored
/// tokens offered + the estimate of the rest, `rest_lse`). All of them when the target is not
/// reached.
pub fn adaptive_count(
    target: f64,
    static_lse: f32,
    logits: impl Iterator<Item = f32> + Clone,
    rest_lse: f32,
) -> usize {
    let n = logits.clone().count();
    let max = logits
        .clone()
        .chain([static_lse, rest_lse])
        .fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return 0;
    }
    let w = |l: f32| ((l - max) as f64).exp();
    let total = w(static_lse) + logits.clone().map(w).sum::<f64>() + w(rest_lse);
    let goal = target * total;
    let mut covered = w(static_lse);
    if covered >= goal {
        return 0;
    }
    for (i, l) in logits.enumerate() {
        covered += w(l);
        if covered >= goal {
            return i + 1;
        }
    }
    n
}

/// Terms of the remainder estimate: `(list, logit, tokens)`, each standing for `tokens` tokens
/// of `list` with that logit (`scale·q·k` or its estimate), valued at the list's mean value.
/// Each list (or group) has at most one term, unless a term of single tokens was added.
#[derive(Default)]
struct RemainderEstimator {
    terms: Vec<(u32, f32, f32)>,
    ids_repeat: bool,
}

impl RemainderEstimator {
    /// A term of `tokens` tokens of `list`: at most one per list (only single-token terms,
    /// [`Self::add_token_logit`], may share a list with another term).
    fn add_logit(&mut self, list: u32, logit: f32, tokens: f32) {
        if tokens > 0.0 {
            self.terms.push((list, logit, tokens));
        }
    }

    /// One token of `list`, which may have other terms.
    fn add_token_logit(&mut self, list: u32, logit: f32) {
        self.ids_repeat = true;
        self.terms.push((list, logit, 1.0));
    }

    /// Every visible, non-static token the search did not attend: probed members by their
    /// exact logit where they were scored exactly (`exact`: candidate index and exact logit,
    /// -inf for an attended one), else by their code score (or their list's centroid);
    /// unprobed lists by their centroid (or, on a hierarchical head, their group's centroid)
    /// times their count of such members.
    #[allow(clippy::too_many_arguments)]
    fn add_not_scored_exactly(
        &mut self,
        ctx: &EstimateContext<'_>,
        sq: &ScalarQuantizer,
        lkeys: &[u64],
        probed_lists: usize,
        unexpanded: &[(u32, f32)],
        probes: &[Probe],
        cand_scores: &[f32],
        exact: &[(u32, f32)],
        stats: &mut SearchStats,
    ) {
        let s = ctx.scale;
        let p = ctx.params;
        let q_norm_sq: f32 = ctx.q.iter().map(|x| x * x).sum();
        let noise = if p.remainder_code_noise > 0.0 {
            let var: f32 = ctx
                .q
                .iter()
                .zip(&sq.step)
                .map(|(a, st)| a * a * st * st / 12.0)
                .sum();
            p.remainder_code_noise * 0.5 * s * s * var
        } else {
            0.0
        };
        if p.remainder_code_logits {
            // Candidates come list by list: one term per list, its tokens' logits (exact where
            // known, else from the codes) summed in log space, rather than one term per token.
            // Every exponential is taken in one vectorised sweep against the largest logit (a
            // list more than ~87 below it underflows to weight 0, which it all but has anyway).
            // Attended candidates get -inf (weight 0 after exp), so no pass has a
            // per-candidate branch.
            let mut xs: Vec<f32> = cand_scores.iter().map(|&c| s * c - noise).collect();
            for &(c, logit) in exact {
                xs[c as usize] = logit;
            }
            let max = crate::linalg::max_of(&xs);
            if max.is_finite() {
                // Each list's count of unattended candidates, counted before the sweep (an
                // unattended weight may underflow to 0 and still counts).
                let runs: Vec<(u32, Range<usize>, usize)> = probe_runs(probes, xs.len())
                    .map(|(list, slots)| {
                        let open = xs[slots.clone()]
                            .iter()
                            .filter(|&&x| x > f32::NEG_INFINITY)
                            .count();
                        (list, slots, open)
                    })
                    .collect();
                xs.iter_mut().for_each(|x| *x -= max);
                crate::simd::exp_in_place(&mut xs);
                for (list, slots, open) in runs {
                    if open > 0 {
                        let sum = crate::linalg::sum_of(&xs[slots]);
                        self.add_logit(list, max + (sum / open as f32).ln(), open as f32);
                    }
                }
            }
        } else {
            let mut scored = vec![false; cand_scores.len()];
            let lists =
                slots_by_probe(probes, exact.iter().map(|e| e.0)).map(|(_, p)| probes[p].list);
            for (&(c, logit), l) in exact.iter().zip(lists) {
                scored[c as usize] = true;
                if logit != f32::NEG_INFINITY {
                    self.add_token_logit(l, logit);
                }
            }
            // A probe's list is the same entry of the probed lists' keys.
            for ((l, slots), &key) in probe_runs(probes, cand_scores.len()).zip(lkeys) {
                let n = slots
                    .filter(|&c| !scored[c] && cand_scores[c] > f32::NEG_INFINITY)
                    .count();
                if n > 0 {
                    let c = from_best_first_key(key).0;
                    let corr = ctx.variance_correction(l as usize, q_norm_sq, stats);
                    self.add_logit(l, s * c + corr, n as f32);
                }
            }
        }
        let add_list = |me: &mut Self, l: u32, c: f32, stats: &mut SearchStats| {
            let n = ctx.open_members(l as usize, stats);
            if n > 0 {
                let corr = ctx.variance_correction(l as usize, q_norm_sq, stats);
                me.add_logit(l, s * c + corr, n as f32);
            }
        };
        for (c, l) in lkeys[probed_lists..]
            .iter()
            .map(|&k| from_best_first_key(k))
        {
            add_list(self, l, c, stats);
        }
        // An unexpanded group lying wholly between the sinks and the window is one term (id
        // `lists + group`, valued at the group's mean value); otherwise its lists are terms.
        let n_lists = ctx.head.lists.len() as u32;
        let edges = ctx.static_edges();
        let gstart = u32s(&ctx.head.group_start);
        let glists = u32s(&ctx.head.group_lists);
        for &(g, c) in unexpanded {
            if let Some(&(first, last, n)) = ctx.group_bounds.get(g as usize) {
                if lies_between_statics((first, last), n as usize, edges) {
                    stats.estimate_bytes += 12;
                    self.add_logit(n_lists + g, s * c, n as f32);
                    continue;
                }
            }
            for &l in &glists[gstart[g as usize] as usize..gstart[g as usize + 1] as usize] {
                add_list(self, l, c, stats);
            }
        }
    }

    fn lse(&self) -> f32 {
        log_sum_exp(self.terms.iter().map(|t| (t.1, t.2)))
    }

    /// The estimate: per-list weights, the output from the heaviest lists' mean values.
    fn finish(self, ctx: &EstimateContext<'_>, stats: &mut SearchStats) -> Remainder {
        let dim = ctx.q.len();
        let lists = ctx.head.lists.len();
        let starts = u32s(&ctx.head.primary_start);
        let list_means = u16s(&ctx.head.value_means);
        let group_means = u16s(&ctx.head.group_value_means);
        let groups = group_means.len() / dim.max(1);
        let (rem, means_read) = combine_terms(
            &self.terms,
            self.ids_repeat,
            lists + groups,
            |id| {
                if id < lists {
                    (starts[id + 1] > starts[id]).then(|| &list_means[id * dim..(id + 1) * dim])
                } else {
                    group_means.get((id - lists) * dim..(id - lists + 1) * dim)
                }
            },
            dim,
            ctx.params.remainder_list_epsilon as f64,
        );
        stats.estimate_bytes += (means_read * dim * 2) as u64;
        rem
    }
}

/// The remainder from its terms `(id, logit, tokens)` (an id names a list or a group, below
/// `n_ids`; `ids_repeat` says whether an id may have several terms, which are then merged):
/// `lse = ln Σ tokens·exp(logit)`; the output is the weight-averaged mean value
/// (`means_of(id)`, f16 bits; None for an empty list) of the heaviest ids that together hold at
/// least `1 − epsilon` of the weight (the others keep their weight in `lse`). Returns the
/// estimate and how many mean values it read.
pub fn combine_terms<'m>(
    terms: &[(u32, f32, f32)],
    ids_repeat: bool,
    n_ids: usize,
    means_of: impl Fn(usize) -> Option<&'m [u16]>,
    dim: usize,
    epsilon: f64,
) -> (Remainder, usize) {
    let neutral = Remainder {
        output: vec![0.0; dim],
        lse: f32::NEG_INFINITY,
        tokens: 0,
    };
    let tokens = terms.iter().map(|t| t.2 as f64).sum::<f64>().round() as u64;
    let max = terms
        .iter()
        .filter(|t| t.2 > 0.0)
        .map(|t| t.1)
        .fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() || tokens == 0 {
        return (neutral, 0);
    }
    // One exp per term (f32: the terms are logits within a few hundred of `max`), summed per
    // list in f64.
    let mut weight: Vec<(f64, u32)> = Vec::with_capacity(terms.len());
    let mut all = 0f64;
    let mut e: Vec<f32> = terms.iter().map(|t| t.1 - max).collect();
    crate::simd::exp_in_place(&mut e);
    let ws = terms
        .iter()
        .zip(&e)
        .map(|(&(l, _, n), &e)| (n as f64 * e as f64, l));
    if ids_repeat {
        // Repeated ids are merged through a table of every id.
        let mut slot = vec![u32::MAX; n_ids];
        for (w, l) in ws {
            all += w;
            let Some(s) = slot.get_mut(l as usize) else {
                continue;
            };
            if *s == u32::MAX {
                *s = weight.len() as u32;
                weight.push((0.0, l));
            }
            weight[*s as usize].0 += w;
        }
    } else {
        for (w, l) in ws {
            all += w;
            if (l as usize) < n_ids {
                weight.push((w, l));
            }
        }
    }
    let lse = max + all.ln() as f32;
    // Lists lighter than `epsilon · total / lists` together hold at most `epsilon` of the
    // weight, so the heaviest lists that reach `1 − epsilon` are all among the others: only
    // those are sorted.
    let listed: f64 = weight.iter().map(|w| w.0).sum();
    let floor = epsilon * listed / weight.len().max(1) as f64;
    weight.retain(|w| w.0 >= floor && w.0 > 0.0);
    // Heaviest first. Usually a few dozen lists reach `1 − epsilon`: order only a head that
    // likely holds them, and more only if it does not (the same order as a full sort).
    let heaviest_first = |a: &(f64, u32), b: &(f64, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
    let mut order = LazySort::new(&mut weight, COMBINE_SORTED_HEAD, heaviest_first);
    let keep_until = (1.0 - epsilon) * listed;
    let mut out = vec![0f64; dim];
    let mut mean = Vec::with_capacity(dim);
    let mut kept = 0f64;
    let mut read = 0;
    for i in 0..weight.len() {
        if kept > 0.0 && kept >= keep_until {
            break;
        }
        order.reach(&mut weight, i, heaviest_first);
        let (w, l) = weight[i];
        // The means lie scattered over the manifest: ask for the next ones early.
        if let Some(ahead) = weight
            .get(i + PREFETCH_ROWS_AHEAD)
            .and_then(|a| means_of(a.1 as usize))
        {
            crate::simd::prefetch(bytemuck::cast_slice(ahead));
        }
        let Some(means) = means_of(l as usize).filter(|m| m.len() == dim) else {
            continue;
        };
        read += 1;
        mean.clear();
        f16_bytes_to_f32(bytemuck::cast_slice(means), &mut mean);
        for (o, &v) in out.iter_mut().zip(&mean) {
            *o += w * v as f64;
        }
        kept += w;
    }
    if kept <= 0.0 {
        return (neutral, read);
    }
    (
        Remainder {
            output: out.iter().map(|o| (o / kept) as f32).collect(),
            lse,
            tokens,
        },
        read,
    )
}

/// A posting list's parts, borrowed from its buffer.
#[derive(Clone, Copy)]
pub struct ListView<'a> {
    ids: &'a [u8],
    keys: &'a [u8],
    values: &'a [u8],
    row_bytes: usize,
}

impl<'a> ListView<'a> {
    /// The view of a list of `members` rows of `dim` dimensions, from its layout alone (the
    /// header is not read): for lists whose header was checked when they were read, and for
    /// `parse_list` once it has checked one.
    fn laid_out(buf: &'a [u8], members: usize, dim: usize) -> Result<Self, String> {
        let ids_end = LIST_HEADER_BYTES + 4 * members;
        let keys_end = ids_end + members * dim * 2;
        let values_end = keys_end + members * dim * 2;
        if buf.len() < values_end {
            return Err(format!(
                "{} bytes, {members} members need {values_end}",
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

/// List `l`'s primary members, as the manifest lists them (`check_head` checked the bounds).
fn primary_members(head: &ArchivedHeadManifest, l: usize) -> &[u32] {
    let start = u32s(&head.primary_start);
    &u32s(&head.primary_tokens)[start[l] as usize..start[l + 1] as usize]
}

/// Checks that a list stores the manifest's primary `members` first and in that order: a
/// search takes a candidate's row from the manifest, so a list that disagrees would give it
/// another token's key and value. Checked once per list a group reads, not per candidate.
fn check_primary_members(view: &ListView<'_>, members: &[u32]) -> Result<(), String> {
    if view.len() < members.len() {
        return Err(format!(
            "{} members, fewer than the manifest's {} primary ones",
            view.len(),
            members.len()
        ));
    }
    match members.iter().enumerate().find(|&(r, &t)| view.id(r) != t) {
        Some((r, &t)) => Err(format!(
            "row {r} holds token {}, the manifest says {t}",
            view.id(r)
        )),
        None => Ok(()),
    }
}

/// Checks a list read from disk against the manifest: its header (magic, id, dimension, the
/// member count the manifest gives) and its primary members, stored first and in the
/// manifest's order.
fn check_list(buf: &[u8], head: &ArchivedHeadManifest, l: u32) -> Result<(), String> {
    let view = parse_list(buf, l, head.dim.to_native() as usize)?;
    let members = head.lists[l as usize].members.to_native() as usize;
    if view.len() != members {
        return Err(format!(
            "{} members, the manifest says {members}",
            view.len()
        ));
    }
    check_primary_members(&view, primary_members(head, l as usize))
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
    if word(3) as usize != dim {
        return Err(format!(
            "header dim {} differs from the index's {dim}",
            word(3)
        ));
    }
    ListView::laid_out(buf, word(2) as usize, dim)
}

/// Structural checks of one head's manifest entry (lengths agree, lists inside the segment, the
/// head at its place `(layer slot, KV head)` in layer-by-KV-head order), so that search never
/// indexes out of bounds on a damaged or hand-edited manifest.
fn check_head(
    h: &ArchivedHeadManifest,
    segment_len: u64,
    place: (usize, usize),
    centroid_code_bits: u32,
    key_code_bits: &[u32],
) -> Result<(), String> {
    let dim = h.dim.to_native() as usize;
    let lists = h.lists.len();
    let tokens = h.tokens.to_native() as usize;
    let bits = h.code_bits.to_native();
    if dim == 0 || !key_code_bits.contains(&bits) {
        return Err(format!("dim {dim} / code bits {bits} invalid"));
    }
    let code_bytes = crate::codes::code_bytes(bits, dim);
    let centroid_code_bytes = crate::codes::code_bytes(centroid_code_bits, dim);
    let checks = [
        (
            h.centroid_codes.len() == lists * centroid_code_bytes,
            "centroid codes",
        ),
        (
            h.centroid_lo.len() == dim && h.centroid_step.len() == dim,
            "centroid quantiser",
        ),
        (h.value_means.len() == lists * dim, "value means"),
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
    // Every token is the primary member of exactly one list: a token named twice would be
    // attended twice, a missing one never.
    if !is_permutation(u32s(&h.primary_tokens), tokens) {
        return Err("primary members are not each token exactly once".into());
    }
    for (j, l) in h.lists.iter().enumerate() {
        let end = l
            .offset
            .to_native()
            .checked_add(l.padded_len.to_native() as u64);
        if end.is_none_or(|e| e > segment_len) || l.len.to_native() > l.padded_len.to_native() {
            return Err(format!("list {j} lies outside its segment"));
        }
    }
    let finite = |xs: &[f32]| xs.iter().all(|x| x.is_finite());
    let positive = |xs: &[f32]| xs.iter().all(|&x| x.is_finite() && x > 0.0);
    let f16_finite = |xs: &[u16]| xs.iter().all(|&x| half::f16::from_bits(x).is_finite());
    if !(finite(f32s(&h.centroid_lo))
        && positive(f32s(&h.centroid_step))
        && finite(f32s(&h.code_lo))
        && positive(f32s(&h.code_step))
        && finite(f32s(&h.radius))
        && finite(f32s(&h.max_key_norm))
        && f16_finite(u16s(&h.value_means))
        && f16_finite(u16s(&h.group_value_means)))
    {
        return Err("a quantiser, radius, norm or mean value is not finite".into());
    }
    let has_groups = !(h.group_centroid_codes.is_empty()
        && h.group_value_means.is_empty()
        && h.group_start.is_empty()
        && h.group_lists.is_empty());
    if has_groups {
        let g = h.group_start.len().saturating_sub(1);
        let gs = u32s(&h.group_start);
        if g == 0
            || h.group_centroid_codes.len() != g * centroid_code_bytes
            || !(h.group_value_means.is_empty() || h.group_value_means.len() == g * dim)
            || !is_permutation(u32s(&h.group_lists), lists)
            || gs.first() != Some(&0)
            || gs.last().map(|&s| s as usize) != Some(lists)
            || gs.windows(2).any(|w| w[0] > w[1])
        {
            return Err("second level is inconsistent".into());
        }
    }
    let named = (
        h.layer_slot.to_native() as usize,
        h.kv_head.to_native() as usize,
    );
    if named != place {
        return Err(format!(
            "names layer slot {}, KV head {}; its place says {}, {}",
            named.0, named.1, place.0, place.1
        ));
    }
    Ok(())
}

/// Whether `xs` holds each of `0..n` exactly once.
fn is_permutation(xs: &[u32], n: usize) -> bool {
    if xs.len() != n {
        return false;
    }
    let mut seen = vec![false; n];
    xs.iter()
        .all(|&x| (x as usize) < n && !std::mem::replace(&mut seen[x as usize], true))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A list as `build` writes it: header, ids, then f16 keys and values (zeros here).
    fn list_bytes(list_id: u32, ids: &[u32], dim: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for word in [LIST_MAGIC, list_id, ids.len() as u32, dim as u32] {
            out.extend_from_slice(&word.to_le_bytes());
        }
        ids.iter()
            .for_each(|t| out.extend_from_slice(&t.to_le_bytes()));
        out.resize(out.len() + 2 * ids.len() * dim * 2, 0);
        out
    }

    #[test]
    fn a_list_must_hold_the_manifests_primary_members_first() {
        // Primary members 3, 9, 12, then a replica (40).
        let buf = list_bytes(7, &[3, 9, 12, 40], 4);
        let view = parse_list(&buf, 7, 4).unwrap();
        assert_eq!(check_primary_members(&view, &[3, 9, 12]), Ok(()));
        assert_eq!(check_primary_members(&view, &[]), Ok(()));
        let e = check_primary_members(&view, &[3, 10, 12]).unwrap_err();
        assert!(
            e.contains("row 1 holds token 9, the manifest says 10"),
            "{e}"
        );
        let e = check_primary_members(&view, &[3, 9, 12, 40, 41]).unwrap_err();
        assert!(e.contains("4 members, fewer than the manifest's 5"), "{e}");
    }

    #[test]
    fn remainder_by_hand() {
        // List 0: 4 primary members, value sum (4, 0) -> mean (1, 0).
        // List 1: 2 primary members, value sum (0, 2) -> mean (0, 1).
        // Remaining: 3 tokens of list 0 at logit 0 (weight 3), 1 token of list 1 at logit ln 2
        // (weight 2). lse = ln 5; output = (3·(1,0) + 2·(0,1)) / 5 = (0.6, 0.4).
        let means = crate::manifest::to_f16_bits(&[1.0f32, 0.0, 0.0, 1.0]);
        let of = |l: usize| means.get(l * 2..l * 2 + 2);
        let terms = [(0u32, 0.0f32, 3.0f32), (1, 2f32.ln(), 1.0)];
        let (r, read) = combine_terms(&terms, false, 2, of, 2, 0.0);
        assert_eq!(read, 2);
        assert_eq!(r.tokens, 4);
        assert!((r.lse - 5f32.ln()).abs() < 1e-6, "{}", r.lse);
        assert!((r.output[0] - 0.6).abs() < 1e-6 && (r.output[1] - 0.4).abs() < 1e-6);
        // Told that ids may repeat, the table that merges them changes nothing here.
        let (t, _) = combine_terms(&terms, true, 2, of, 2, 0.0);
        assert_eq!(
            (t.output, t.lse, t.tokens),
            (r.output.clone(), r.lse, r.tokens)
        );
        // The same split over two terms of one list changes nothing.
        let split = [(0u32, 0.0f32, 1.0f32), (0, 0.0, 2.0), (1, 2f32.ln(), 1.0)];
        let (s, _) = combine_terms(&split, true, 2, of, 2, 0.0);
        assert!((s.lse - r.lse).abs() < 1e-6 && (s.output[0] - 0.6).abs() < 1e-6);
        // epsilon 0.5: list 0 alone holds 60% of the weight, so list 1's value sum is not read;
        // its weight stays in lse, and the output is list 0's mean.
        let (e, read) = combine_terms(&terms, false, 2, of, 2, 0.5);
        assert_eq!(read, 1);
        assert!((e.lse - 5f32.ln()).abs() < 1e-6);
        assert!((e.output[0] - 1.0).abs() < 1e-6 && e.output[1].abs() < 1e-6);
        // Nothing remains: neutral (zero output, lse -inf).
        let (n, read) = combine_terms(&[], false, 2, of, 2, 0.0);
        assert_eq!(
            (n.tokens, n.lse, n.output, read),
            (0, f32::NEG_INFINITY, vec![0.0; 2], 0)
        );
        // A term naming a list that does not exist is ignored, not a panic.
        let (b, _) = combine_terms(&[(7, 0.0, 1.0)], false, 2, of, 2, 0.0);
        assert_eq!((b.tokens, b.lse), (0, f32::NEG_INFINITY));
    }

    #[test]
    fn adaptive_count_by_hand() {
        // exp-sums: static 2, offered 4, 2, 1, rest 1: total 10.
        let logits = [4f32.ln(), 2f32.ln(), 0.0];
        let count = |t: f64| adaptive_count(t, 2f32.ln(), logits.iter().copied(), 0.0);
        assert_eq!(count(0.19), 0); // static alone: 2 of 10
        assert_eq!(count(0.5), 1); // 6 of 10
        assert_eq!(count(0.61), 2);
        assert_eq!(count(0.8), 2); // 8 of 10
        assert_eq!(count(0.85), 3); // 9 of 10
        assert_eq!(count(1.0), 3); // never reached: everything offered
                                   // No static tokens, nothing else.
        assert_eq!(
            adaptive_count(0.9, f32::NEG_INFINITY, [].into_iter(), f32::NEG_INFINITY),
            0
        );
    }

    #[test]
    fn log_sum_exp_by_hand() {
        let v = log_sum_exp([(0.0f32, 2.0f32), (3f32.ln(), 1.0)].into_iter());
        assert!((v - 5f32.ln()).abs() < 1e-6);
        assert_eq!(
            log_sum_exp([(1.0f32, 0.0f32)].into_iter()),
            f32::NEG_INFINITY
        );
        // Large logits do not overflow.
        let big = log_sum_exp([(1000.0f32, 1.0f32), (1000.0, 1.0)].into_iter());
        assert!((big - (1000.0 + 2f32.ln())).abs() < 1e-3);
    }
}
