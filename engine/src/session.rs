//! One context being decoded: its shape, its base index, the resident static rows, the tail of
//! appended tokens and the delta indexes the tail is folded into.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use strata_index::manifest::SourceInfo;
use strata_index::search::{Gather, SearchPhases};
use strata_index::{
    build_index_from, BuildInput, BuildParams, HeadArrays, Index, IndexError, Retrieved,
    SearchParams,
};
use strata_storage::cache::RamCache;
use strata_storage::reader::ReaderPreference;

use crate::attention::{merge, Attended};
use crate::cpu::{attend_f32, attend_group_rows};
use crate::error::{EngineError, EngineResult};

/// The model shape and the context of a session.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SessionSpec {
    pub model: String,
    /// Model layer index of each layer slot.
    pub layers: Vec<usize>,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Per layer slot: attention logits are `scale · q·k`.
    pub softmax_scale: Vec<f32>,
    /// The prefill's token ids (with model and layers, they identify the context).
    pub token_ids: Vec<i64>,
}

impl SessionSpec {
    pub fn validate(&self) -> Result<(), String> {
        if self.layers.is_empty() || self.q_heads == 0 || self.kv_heads == 0 || self.head_dim == 0 {
            return Err("layers, heads and head dim must be non-zero".into());
        }
        // Indexes store these as u32, and a step's inputs are heads × head dim floats.
        let fits = |x: usize| u32::try_from(x).is_ok();
        if !(fits(self.q_heads)
            && fits(self.kv_heads)
            && fits(self.head_dim)
            && fits(self.token_ids.len())
            && self.layers.iter().all(|&l| fits(l))
            && self.q_heads.checked_mul(self.head_dim).is_some_and(fits))
        {
            return Err(format!(
                "{} query heads x head dim {} (or {} tokens, or a layer id) exceed u32",
                self.q_heads,
                self.head_dim,
                self.token_ids.len()
            ));
        }
        let mut layers = self.layers.clone();
        layers.sort_unstable();
        if layers.windows(2).any(|w| w[0] == w[1]) {
            return Err(format!("layer ids {:?} repeat", self.layers));
        }
        if self.q_heads.checked_rem(self.kv_heads) != Some(0) {
            return Err(format!(
                "{} query heads are not a multiple of {} kv heads",
                self.q_heads, self.kv_heads
            ));
        }
        if self.softmax_scale.len() != self.layers.len()
            || self
                .softmax_scale
                .iter()
                .any(|s| !(s.is_finite() && *s > 0.0))
        {
            return Err("one finite positive softmax scale per layer is needed".into());
        }
        if self.token_ids.is_empty() {
            return Err("the prefill holds no tokens".into());
        }
        Ok(())
    }

    pub fn content_hash(&self) -> u64 {
        strata_storage::kvdump::context_hash(&self.model, &self.layers, &self.token_ids)
    }

    pub fn group_size(&self) -> usize {
        self.q_heads / self.kv_heads
    }
}

/// Attention of one query head: output and log-sum-exp (natural log of Σ exp(scale·q·k)).
#[derive(Clone, Debug, PartialEq)]
pub struct HeadOutput {
    pub output: Vec<f32>,
    pub lse: f32,
}

/// What one step did. Counts are summed over the query heads of the step.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct StepTelemetry {
    pub position: usize,
    /// Tokens attended exactly: static (sinks, window, unfolded tail) and retrieved.
    pub tokens_attended: u64,
    pub static_tokens: u64,
    pub retrieved_tokens: u64,
    /// Lists read, by the tier that served them (no HBM tier on the CPU path yet).
    pub lists_from_hbm: u64,
    pub lists_from_ram: u64,
    pub lists_from_ssd: u64,
    pub ssd_bytes: u64,
    pub ssd_reads: u64,
    /// Wall time of the step and CPU time summed over heads in search (I/O included), I/O
    /// alone, and attention.
    pub total_ns: u64,
    pub search_ns: u64,
    pub io_ns: u64,
    pub attention_ns: u64,
    /// `search_ns` by phase, summed over heads.
    pub search_phases: SearchPhases,
    /// Bytes the searches read, summed over query heads and indexes
    /// ([`strata_index::search::SearchStats::bytes_read`]).
    pub search_bytes: u64,
    /// A fold of this layer's tail was running in the background during the step.
    pub folding: bool,
    /// Delta indexes searched besides the base index.
    pub deltas: u64,
}

#[derive(Clone, Debug)]
pub struct StepOutput {
    pub heads: Vec<HeadOutput>,
    pub telemetry: StepTelemetry,
}

/// Public facts about a session.
#[derive(Clone, Debug, Serialize)]
pub struct SessionInfo {
    pub id: u64,
    pub content_hash: u64,
    pub dir: PathBuf,
    pub base_tokens: usize,
    /// Tokens in context per layer slot.
    pub lengths: Vec<usize>,
    pub reused_index: bool,
    pub resident_bytes: u64,
    pub disk_bytes: u64,
    pub failed: Option<String>,
}

/// Rows of every KV head: `k[h]`, `v[h]` are row-major `n × dim`.
#[derive(Clone, Default)]
pub(crate) struct Rows {
    pub k: Vec<Vec<f32>>,
    pub v: Vec<Vec<f32>>,
}

impl Rows {
    pub(crate) fn new(kv_heads: usize) -> Self {
        Rows {
            k: vec![Vec::new(); kv_heads],
            v: vec![Vec::new(); kv_heads],
        }
    }

    fn bytes(&self) -> u64 {
        self.k
            .iter()
            .chain(&self.v)
            .map(|r| r.len() as u64 * 4)
            .sum()
    }
}

pub(crate) struct Delta {
    /// First position it holds, and how many.
    pub start: usize,
    pub len: usize,
    pub index: Arc<Index>,
}

type FoldResult = Result<Delta, String>;

/// A fold running in the background: set when done, and where its result lands.
pub(crate) type RunningFold = (Arc<AtomicBool>, Arc<Mutex<Option<FoldResult>>>);

pub(crate) struct LayerState {
    /// Tokens in context.
    pub len: usize,
    pub sinks: Rows,
    /// Prefill rows `[edge_start, base)`: the part of the recent window that lies in the prefill.
    pub edge_start: usize,
    pub edge: Rows,
    /// Appended rows, positions `base..len`.
    pub tail: Rows,
    /// Tail positions below this are in `deltas` (not static any more).
    pub folded_upto: usize,
    pub deltas: Vec<Delta>,
    /// A fold running in the background, with where its result lands.
    pub fold_running: Option<RunningFold>,
    pub fold_error: Option<String>,
    /// Unfolded tail size at which the next fold starts (grows after a failed fold).
    pub next_fold_at: usize,
    /// Per KV head, the recent steps' queries of its query heads: the next fold's metric.
    pub recent_queries: Vec<QueryRing>,
}

/// The last `capacity` query rows seen, overwriting the oldest (their order does not matter:
/// only their second moment is used).
pub(crate) struct QueryRing {
    rows: Vec<f32>,
    dim: usize,
    capacity: usize,
    next: usize,
    filled: usize,
}

impl QueryRing {
    fn new(dim: usize, capacity: usize) -> Self {
        QueryRing {
            rows: Vec::new(),
            dim,
            capacity,
            next: 0,
            filled: 0,
        }
    }

    pub(crate) fn push(&mut self, row: &[f32]) {
        if self.capacity == 0 {
            return;
        }
        if self.rows.len() < self.capacity * self.dim {
            self.rows.extend_from_slice(row);
        } else {
            self.rows[self.next * self.dim..(self.next + 1) * self.dim].copy_from_slice(row);
        }
        self.next = (self.next + 1) % self.capacity;
        self.filled = (self.filled + 1).min(self.capacity);
    }

    fn rows(&self) -> &[f32] {
        &self.rows[..self.filled * self.dim]
    }

    /// The rows in the order they came, oldest first (what a restored ring is refilled with).
    pub(crate) fn oldest_first(&self) -> Vec<f32> {
        if self.filled < self.capacity {
            return self.rows().to_vec();
        }
        let split = self.next * self.dim;
        [&self.rows[split..], &self.rows[..split]].concat()
    }

    pub(crate) fn clear(&mut self) {
        self.rows.clear();
        self.next = 0;
        self.filled = 0;
    }

    fn bytes(&self) -> u64 {
        (self.rows.capacity() * 4) as u64
    }
}

/// What a fold builds one KV head's delta index from: the folded rows and the recent queries.
struct FoldRows {
    keys: Vec<f32>,
    values: Vec<f32>,
    queries: Vec<f32>,
}

pub(crate) struct Session {
    pub id: u64,
    pub spec: SessionSpec,
    pub hash: u64,
    pub dir: PathBuf,
    pub base: Arc<Index>,
    pub base_tokens: usize,
    pub search: SearchParams,
    pub build: BuildParams,
    pub reused_index: bool,
    pub layers: Vec<Mutex<LayerState>>,
    pub failed: Mutex<Option<String>>,
    /// Set by `close_session`/`drop_session` before they drain the layers: a step that finds
    /// it set (under its layer's lock) changes nothing.
    pub closed: AtomicBool,
    /// `EngineParams::fold_tokens`: the fold interval a successful fold returns to.
    pub fold_tokens: usize,
    pub cache: Arc<RamCache>,
    pub reader: ReaderPreference,
}

/// The largest finite f16: keys and values are stored as f16 in posting lists.
const F16_MAX: f32 = 65504.0;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Session {
    /// Static rows of every layer, read back from the base index (sinks and the window's edge).
    pub fn initial_layers(
        spec: &SessionSpec,
        base: &Index,
        search: &SearchParams,
        fold_tokens: usize,
        fold_query_steps: usize,
    ) -> EngineResult<Vec<Mutex<LayerState>>> {
        let group = spec.q_heads / spec.kv_heads.max(1);
        let n = spec.token_ids.len();
        let sinks = (search.sink_tokens as usize).min(n);
        let edge_start = n.saturating_sub(search.recent_tokens as usize).max(sinks);
        let sink_ids: Vec<u32> = (0..sinks as u32).collect();
        let edge_ids: Vec<u32> = (edge_start as u32..n as u32).collect();
        let mut layers = Vec::with_capacity(spec.layers.len());
        for l in 0..spec.layers.len() {
            let mut sink_rows = Rows::new(spec.kv_heads);
            let mut edge_rows = Rows::new(spec.kv_heads);
            for h in 0..spec.kv_heads {
                let (k, v) = strata_index::rows::read_rows(base, l, h, &sink_ids)?;
                sink_rows.k[h] = k;
                sink_rows.v[h] = v;
                let (k, v) = strata_index::rows::read_rows(base, l, h, &edge_ids)?;
                edge_rows.k[h] = k;
                edge_rows.v[h] = v;
            }
            layers.push(Mutex::new(LayerState {
                len: n,
                sinks: sink_rows,
                edge_start,
                edge: edge_rows,
                tail: Rows::new(spec.kv_heads),
                // Positions below `sink_tokens` stay sinks even when the prefill is shorter:
                // folding starts past them, or a delta would hold them a second time.
                folded_upto: n.max(search.sink_tokens as usize),
                deltas: Vec::new(),
                fold_running: None,
                fold_error: None,
                next_fold_at: fold_tokens,
                recent_queries: (0..spec.kv_heads)
                    .map(|_| QueryRing::new(spec.head_dim, fold_query_steps * group))
                    .collect(),
            }));
        }
        Ok(layers)
    }

    pub fn info(&self) -> SessionInfo {
        SessionInfo {
            id: self.id,
            content_hash: self.hash,
            dir: self.dir.clone(),
            base_tokens: self.base_tokens,
            lengths: self.layers.iter().map(|l| lock(l).len).collect(),
            reused_index: self.reused_index,
            resident_bytes: self.resident_bytes(),
            disk_bytes: dir_bytes(&self.dir),
            failed: lock(&self.failed).clone(),
        }
    }

    /// RAM this session holds outside the shared RAM tier.
    pub fn resident_bytes(&self) -> u64 {
        let mapped = self.base.mapped_bytes() as u64;
        let rows: u64 = self
            .layers
            .iter()
            .map(|l| {
                let g = lock(l);
                g.sinks.bytes()
                    + g.edge.bytes()
                    + g.tail.bytes()
                    + g.recent_queries.iter().map(QueryRing::bytes).sum::<u64>()
                    + g.deltas
                        .iter()
                        .map(|d| d.index.mapped_bytes() as u64)
                        .sum::<u64>()
            })
            .sum();
        mapped + rows
    }

    fn fail(&self, reason: String) {
        log::error!("session {} marked failed: {reason}", self.id);
        *lock(&self.failed) = Some(reason);
    }

    pub fn check_usable(&self) -> EngineResult<()> {
        match &*lock(&self.failed) {
            Some(reason) => Err(EngineError::SessionFailed {
                id: self.id,
                reason: reason.clone(),
            }),
            None => Ok(()),
        }
    }

    fn bad(&self, problem: String) -> EngineError {
        EngineError::BadInput {
            id: self.id,
            problem,
        }
    }

    /// One decoding step of one layer: appends the new token's K/V (one row per KV head), then
    /// answers every query head over static ∪ retrieved tokens.
    pub fn step(
        self: &Arc<Self>,
        layer: usize,
        queries: &[f32],
        new_k: &[f32],
        new_v: &[f32],
    ) -> EngineResult<StepOutput> {
        let started = Instant::now();
        self.check_usable()?;
        let spec = &self.spec;
        let dim = spec.head_dim;
        if layer >= spec.layers.len() {
            return Err(self.bad(format!(
                "layer slot {layer} out of range (the session has {})",
                spec.layers.len()
            )));
        }
        let checks = [
            ("queries", queries.len(), spec.q_heads * dim),
            ("new keys", new_k.len(), spec.kv_heads * dim),
            ("new values", new_v.len(), spec.kv_heads * dim),
        ];
        for (what, got, want) in checks {
            if got != want {
                return Err(self.bad(format!(
                    "{what}: {got} floats, expected {want} ({} heads x {dim})",
                    if what == "queries" {
                        spec.q_heads
                    } else {
                        spec.kv_heads
                    }
                )));
            }
        }
        for (what, xs) in [
            ("queries", queries),
            ("new keys", new_k),
            ("new values", new_v),
        ] {
            if let Some(i) = xs.iter().position(|v| !v.is_finite()) {
                return Err(self.bad(format!(
                    "{what}: element {i} (head {}, dim {}) is {}",
                    i / dim,
                    i % dim,
                    xs[i]
                )));
            }
        }
        // Keys and values are stored as f16 once folded: a row beyond its range could never
        // fold, so it is refused now rather than failing every fold later.
        for (what, xs) in [("new keys", new_k), ("new values", new_v)] {
            if let Some(i) = xs.iter().position(|v| v.abs() > F16_MAX) {
                return Err(self.bad(format!(
                    "{what}: element {i} (head {}, dim {}) is {}, beyond f16's ±{F16_MAX}",
                    i / dim,
                    i % dim,
                    xs[i]
                )));
            }
        }
        // Every logit is `scale·q·k` with |k_d| <= F16_MAX: refuse a query for which that bound
        // overflows, instead of answering from infinite logits.
        let scale = spec.softmax_scale[layer];
        if let Some(qh) = queries.chunks_exact(dim).position(|q| {
            let l1: f32 = q.iter().map(|x| x.abs()).sum();
            !(scale.abs() * l1 * F16_MAX).is_finite()
        }) {
            return Err(self.bad(format!(
                "queries: head {qh} is too large (its logits could overflow f32)"
            )));
        }

        let mut st = lock(&self.layers[layer]);
        if self.closed.load(Ordering::Acquire) {
            return Err(EngineError::UnknownSession(self.id));
        }
        self.install_fold(layer, &mut st);
        // Append: the new token is position `len`, inside the recent window from now on.
        let p = st.len;
        for h in 0..spec.kv_heads {
            st.tail.k[h].extend_from_slice(&new_k[h * dim..(h + 1) * dim]);
            st.tail.v[h].extend_from_slice(&new_v[h * dim..(h + 1) * dim]);
        }
        st.len += 1;

        let recent = self.search.recent_tokens as usize;
        let window_start = (p + 1).saturating_sub(recent);
        let sinks = (self.search.sink_tokens as usize).min(p + 1);
        // Static positions: sinks, the unfolded old tail, the window.
        let mut statics: Vec<usize> = (0..sinks).collect();
        statics.extend(st.folded_upto.max(sinks)..window_start.max(st.folded_upto.max(sinks)));
        statics.extend(window_start.max(sinks)..=p);
        statics.dedup();

        // Base index: its own static rule is the sinks plus the window's overlap with it.
        let base_last = self.base_tokens - 1;
        let base_params = SearchParams {
            recent_tokens: recent.saturating_sub(p - base_last) as u32,
            ..self.search.clone()
        };
        // Each delta gets the same rule as the base: no sinks (those are in the base), and the
        // window's overlap with it is static (normally none; it matters if `recent_tokens` grew
        // since the delta was folded).
        let delta_params: Vec<SearchParams> = st
            .deltas
            .iter()
            .map(|d| SearchParams {
                sink_tokens: 0,
                recent_tokens: recent.saturating_sub(p - (d.start + d.len - 1)) as u32,
                ..self.search.clone()
            })
            .collect();
        let folding = st.fold_running.is_some();
        let group = spec.group_size();
        let st_ref = &*st;
        let per_kv: Vec<EngineResult<(Vec<HeadOutput>, StepTelemetry)>> = (0..spec.kv_heads)
            .into_par_iter()
            .map(|h| {
                let mut tel = StepTelemetry::default();
                // Static rows of this KV head, in `statics` order, where they lie.
                let static_rows: Vec<(&[f32], &[f32])> = statics
                    .iter()
                    .map(|&t| row(st_ref, self.base_tokens, h, t, dim))
                    .collect();
                let mut outs = Vec::with_capacity(group);
                // The group's query heads are searched together: the lists they need are read
                // once per index.
                let qs: Vec<&[f32]> = (h * group..(h + 1) * group)
                    .map(|qh| &queries[qh * dim..(qh + 1) * dim])
                    .collect();
                let mut per_index: Vec<Vec<Retrieved>> =
                    Vec::with_capacity(1 + st_ref.deltas.len());
                per_index.push(self.base.search_group(
                    layer,
                    h,
                    &qs,
                    base_last,
                    &base_params,
                    None,
                    Gather::Attention,
                )?);
                for (d, dp) in st_ref.deltas.iter().zip(&delta_params) {
                    let mut rs =
                        d.index
                            .search_group(0, h, &qs, d.len - 1, dp, None, Gather::Attention)?;
                    for r in &mut rs {
                        r.tokens.iter_mut().for_each(|t| *t += d.start as u32);
                    }
                    per_index.push(rs);
                }
                // Attention over each part separately (the static rows, each index's retrieved
                // tokens, each remainder estimate), merged by log-sum-exp: no part's values are
                // copied. The static rows are read once for the whole group.
                let at = Instant::now();
                let static_parts = attend_group_rows(&static_rows, &qs, scale, dim);
                tel.attention_ns += at.elapsed().as_nanos() as u64;
                for (gi, static_part) in static_parts.into_iter().enumerate() {
                    let parts: Vec<&Retrieved> = per_index.iter().map(|rs| &rs[gi]).collect();
                    let at = Instant::now();
                    let mut pieces = vec![static_part];
                    for r in parts.iter().copied() {
                        let s = &r.stats;
                        tel.search_ns += s.search_ns;
                        tel.io_ns += s.io_ns;
                        tel.search_phases.add(&s.phases);
                        tel.search_bytes += s.bytes_read();
                        tel.lists_from_ram += s.lists_from_ram;
                        tel.lists_from_ssd += s.lists_read - s.lists_from_ram;
                        tel.ssd_bytes += s.ssd_bytes;
                        tel.ssd_reads += s.ssd_reads;
                        tel.retrieved_tokens += r.tokens.len() as u64;
                        match (&r.attention, &r.values) {
                            (Some(a), _) => pieces.push(a.clone()),
                            (None, Some(values)) => {
                                let logits: Vec<f32> = r.scores.iter().map(|s| scale * s).collect();
                                pieces.push(attend_f32(&logits, values, dim));
                            }
                            (None, None) => {
                                return Err(EngineError::BadInput {
                                    id: self.id,
                                    problem: "search returned neither values nor attention".into(),
                                })
                            }
                        }
                        if let Some(rem) = r.remainder.as_ref().filter(|r| r.tokens > 0) {
                            pieces.push(Attended {
                                output: rem.output.clone(),
                                lse: rem.lse,
                            });
                        }
                    }
                    let a = merge(&pieces);
                    tel.attention_ns += at.elapsed().as_nanos() as u64;
                    tel.static_tokens += statics.len() as u64;
                    outs.push(HeadOutput {
                        output: a.output,
                        lse: a.lse,
                    });
                }
                Ok((outs, tel))
            })
            .collect();

        let mut heads = Vec::with_capacity(spec.q_heads);
        let mut tel = StepTelemetry {
            position: p,
            folding,
            deltas: st.deltas.len() as u64,
            ..Default::default()
        };
        for r in per_kv {
            match r {
                Ok((outs, t)) => {
                    heads.extend(outs);
                    tel.static_tokens += t.static_tokens;
                    tel.retrieved_tokens += t.retrieved_tokens;
                    tel.lists_from_ram += t.lists_from_ram;
                    tel.lists_from_ssd += t.lists_from_ssd;
                    tel.ssd_bytes += t.ssd_bytes;
                    tel.ssd_reads += t.ssd_reads;
                    tel.search_ns += t.search_ns;
                    tel.io_ns += t.io_ns;
                    tel.search_phases.add(&t.search_phases);
                    tel.search_bytes += t.search_bytes;
                    tel.attention_ns += t.attention_ns;
                }
                Err(e) => {
                    // The step is undone, so that a retry (or a tail saved now) holds the
                    // token once. A damaged list also makes every later answer suspect: the
                    // session stops serving.
                    for h in 0..spec.kv_heads {
                        let keep = st.tail.k[h].len() - dim;
                        st.tail.k[h].truncate(keep);
                        st.tail.v[h].truncate(keep);
                    }
                    st.len -= 1;
                    if matches!(
                        e,
                        EngineError::Index(IndexError::Storage(_))
                            | EngineError::Index(IndexError::Open { .. })
                    ) {
                        self.fail(e.to_string());
                    }
                    return Err(e);
                }
            }
        }
        tel.tokens_attended = tel.static_tokens + tel.retrieved_tokens;
        // Only a step that succeeded leaves its queries for the next fold's metric (a failed
        // one is undone above).
        for h in 0..spec.kv_heads {
            for qh in h * group..(h + 1) * group {
                st.recent_queries[h].push(&queries[qh * dim..(qh + 1) * dim]);
            }
        }
        self.maybe_start_fold(layer, &mut st);
        tel.total_ns = started.elapsed().as_nanos() as u64;
        Ok(StepOutput {
            heads,
            telemetry: tel,
        })
    }

    /// Installs a finished background fold: its tokens leave the static set.
    fn install_fold(&self, layer: usize, st: &mut LayerState) {
        let Some((done, slot)) = &st.fold_running else {
            return;
        };
        if !done.load(Ordering::Acquire) {
            return;
        }
        let result = lock(slot).take();
        st.fold_running = None;
        match result {
            Some(Ok(delta)) => {
                st.folded_upto = delta.start + delta.len;
                st.deltas.push(delta);
                st.fold_error = None;
                st.next_fold_at = self.fold_tokens;
            }
            Some(Err(e)) => {
                log::warn!(
                    "session {} layer {layer}: fold failed, its tokens stay static: {e}",
                    self.id
                );
                st.fold_error = Some(e);
                st.next_fold_at *= 2;
            }
            None => {}
        }
    }

    /// Starts folding the old tail into a delta index once it is large enough.
    fn maybe_start_fold(self: &Arc<Self>, layer: usize, st: &mut LayerState) {
        let recent = self.search.recent_tokens as usize;
        let window_start = st.len.saturating_sub(recent);
        if st.fold_running.is_some() || window_start < st.folded_upto + st.next_fold_at {
            return;
        }
        let (start, end) = (st.folded_upto, window_start);
        let dim = self.spec.head_dim;
        let off = start - self.base_tokens;
        let rows: Vec<FoldRows> = (0..self.spec.kv_heads)
            .map(|h| FoldRows {
                keys: st.tail.k[h][off * dim..(end - self.base_tokens) * dim].to_vec(),
                values: st.tail.v[h][off * dim..(end - self.base_tokens) * dim].to_vec(),
                queries: st.recent_queries[h].rows().to_vec(),
            })
            .collect();
        let done = Arc::new(AtomicBool::new(false));
        let slot = Arc::new(Mutex::new(None));
        let (thread_done, thread_slot) = (done.clone(), slot.clone());
        let me = Arc::clone(self);
        let spawned = std::thread::Builder::new()
            .name("strata-fold".into())
            .spawn(move || {
                // The fold builds on its own one-thread pool at a lower priority: on the shared
                // pool its k-means jobs would queue ahead of a step's searches and stall it.
                if let Err(e) = crate::sched::set_thread_nice(crate::sched::FOLD_NICE) {
                    log::warn!("fold thread keeps normal priority: {e}");
                }
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(1)
                    .thread_name(|_| "strata-fold".into())
                    .start_handler(|_| {
                        let _ = crate::sched::set_thread_nice(crate::sched::FOLD_NICE);
                    })
                    .build();
                // A panic in the build must still report back, or the fold would never finish.
                let result =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match &pool {
                        Ok(pool) => pool.install(|| me.build_delta(layer, start, end, &rows)),
                        Err(_) => me.build_delta(layer, start, end, &rows),
                    }))
                    .unwrap_or_else(|_| Err("the fold's build panicked".to_string()));
                *lock(&thread_slot) = Some(result);
                thread_done.store(true, Ordering::Release);
            });
        match spawned {
            Ok(_) => st.fold_running = Some((done, slot)),
            // No thread to fold on (the system's limit): the tokens stay static, as after a
            // failed fold, and the next attempt waits twice as long.
            Err(e) => {
                log::warn!(
                    "session {} layer {layer}: cannot start a fold: {e}",
                    self.id
                );
                st.fold_error = Some(format!("cannot start the fold's thread: {e}"));
                st.next_fold_at *= 2;
            }
        }
    }

    fn build_delta(&self, layer: usize, start: usize, end: usize, rows: &[FoldRows]) -> FoldResult {
        let dir = delta_dir(&self.dir, layer, start, end);
        let input = BuildInput {
            source: SourceInfo {
                dump_path: format!("session {} tail {start}..{end}", self.id),
                model: self.spec.model.clone(),
                model_type: String::new(),
                layers: vec![self.spec.layers[layer] as u32],
                q_heads: self.spec.q_heads as u32,
                kv_heads: self.spec.kv_heads as u32,
                head_dim: self.spec.head_dim as u32,
                tokens: (end - start) as u32,
                softmax_scale: vec![self.spec.softmax_scale[layer]],
                content_hash: 0,
            },
            heads: rows
                .iter()
                .map(|r| HeadArrays {
                    keys: &r.keys,
                    values: &r.values,
                    queries: &r.queries,
                })
                .collect(),
        };
        build_index_from(&input, &self.build, &dir, true, &|_, _| {}).map_err(|e| e.to_string())?;
        let index =
            Index::open(&dir, self.reader, self.cache.clone()).map_err(|e| e.to_string())?;
        // The folded tokens are the most recent outside the window, which queries favour: read
        // the new lists into the RAM tier now, not in the first step that searches them.
        index.preload().map_err(|e| e.to_string())?;
        Ok(Delta {
            start,
            len: end - start,
            index: Arc::new(index),
        })
    }

    /// Marks the session closed and waits until no step is running on any layer (steps hold
    /// their layer's lock throughout and check the mark under it), then for its folds, so that
    /// nothing changes the session or writes into its folder afterwards.
    pub fn close_and_drain(&self) {
        self.closed.store(true, Ordering::Release);
        for layer in &self.layers {
            drop(lock(layer));
        }
        self.finish_folds();
    }

    /// Waits for every running fold and installs it (for shutdown and tests).
    pub fn finish_folds(&self) {
        for (l, layer) in self.layers.iter().enumerate() {
            loop {
                let running = lock(layer)
                    .fold_running
                    .as_ref()
                    .map(|(d, _)| d.load(Ordering::Acquire));
                match running {
                    None => break,
                    Some(true) => {
                        let mut st = lock(layer);
                        self.install_fold(l, &mut st);
                    }
                    Some(false) => std::thread::sleep(std::time::Duration::from_millis(5)),
                }
            }
        }
    }

    pub fn fold_error(&self, layer: usize) -> Option<String> {
        self.layers
            .get(layer)
            .and_then(|l| lock(l).fold_error.clone())
    }
}

/// The K/V rows of resident position `t` of KV head `h`.
fn row(st: &LayerState, base: usize, h: usize, t: usize, dim: usize) -> (&[f32], &[f32]) {
    let (rows, i) = if t < st.sinks.k[h].len() / dim {
        (&st.sinks, t)
    } else if t >= base {
        (&st.tail, t - base)
    } else {
        (&st.edge, t - st.edge_start)
    };
    (
        &rows.k[h][i * dim..(i + 1) * dim],
        &rows.v[h][i * dim..(i + 1) * dim],
    )
}

pub(crate) fn delta_dir(session_dir: &Path, layer: usize, start: usize, end: usize) -> PathBuf {
    session_dir.join(format!("delta-l{layer:03}-{start:010}-{end:010}"))
}

pub(crate) fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::QueryRing;

    #[test]
    fn a_query_ring_lists_its_rows_oldest_first_and_refills_the_same() {
        let mut ring = QueryRing::new(2, 3);
        assert!(ring.oldest_first().is_empty());
        for i in 0..2 {
            ring.push(&[i as f32, -(i as f32)]);
        }
        assert_eq!(ring.oldest_first(), vec![0.0, -0.0, 1.0, -1.0]);
        for i in 2..5 {
            ring.push(&[i as f32, -(i as f32)]);
        }
        // Capacity 3: rows 2, 3, 4 remain, 2 the oldest.
        let rows = ring.oldest_first();
        assert_eq!(rows, vec![2.0, -2.0, 3.0, -3.0, 4.0, -4.0]);
        let mut copy = QueryRing::new(2, 3);
        for r in rows.chunks_exact(2) {
            copy.push(r);
        }
        copy.push(&[5.0, -5.0]);
        ring.push(&[5.0, -5.0]);
        assert_eq!(copy.oldest_first(), ring.oldest_first());
        ring.clear();
        assert!(ring.oldest_first().is_empty() && ring.rows().is_empty());
        let mut none = QueryRing::new(2, 0);
        none.push(&[1.0, 1.0]);
        assert!(none.oldest_first().is_empty());
    }
}
