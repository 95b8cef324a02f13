//! The engine: sessions by id, the shared RAM tier, budgets and admission, session folders
//! (reuse by content hash, persistence of the appended tail), and the prefetcher.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex, RwLock, Weak};

use strata_index::manifest::SourceInfo;
use strata_index::{build_index_from, BuildInput, BuildParams, HeadArrays, Index, SearchParams};
use strata_storage::cache::{as_prefetch, CacheStats, RamCache};
use strata_storage::durable::AtomicFile;
use strata_storage::footer;
use strata_storage::reader::ReaderPreference;

use crate::config::EngineParams;
use crate::error::{EngineError, EngineResult};
use crate::session::{
    delta_dir, dir_bytes, Delta, QueryRing, Rows, Session, SessionInfo, SessionSpec, StepOutput,
};

pub type SessionId = u64;

const TAIL_FILE: &str = "tail.strata";
const TAIL_MAGIC: [u8; 8] = *b"STRTAIL\x01";
/// Version 2 added the recent queries (the next fold's metric); version 1 files still load,
/// with no queries.
const TAIL_VERSION: u32 = 2;
const TAIL_OLDEST_VERSION: u32 = 1;
const SPEC_FILE: &str = "session.json";

struct PrefetchJob {
    session: Weak<Session>,
    layer: usize,
    /// The position the next step of this layer will have.
    next: usize,
    queries: Vec<f32>,
    margin: f32,
}

pub struct Engine {
    root: PathBuf,
    params: EngineParams,
    search: SearchParams,
    build: BuildParams,
    reader: ReaderPreference,
    cache: Arc<RamCache>,
    sessions: RwLock<HashMap<SessionId, Arc<Session>>>,
    next_id: AtomicU64,
    prefetch: Option<Mutex<Sender<PrefetchJob>>>,
    prefetch_on: AtomicBool,
    /// Held for the whole of `create_session`: the "already open" check, admission and the
    /// build of one context must not interleave with another's.
    creating: Mutex<()>,
}

fn folder_err(path: &Path, problem: impl Into<String>) -> EngineError {
    EngineError::Folder {
        path: path.to_path_buf(),
        problem: problem.into(),
    }
}

impl Engine {
    /// An engine whose sessions live in folders under `root`.
    pub fn new(
        root: &Path,
        params: EngineParams,
        search: SearchParams,
        build: BuildParams,
        reader: ReaderPreference,
    ) -> EngineResult<Engine> {
        search.validate()?;
        build.validate()?;
        if params.ram_cache_bytes > params.ram_budget_bytes {
            return Err(EngineError::Admission(format!(
                "the RAM tier ({} MiB) is larger than the whole RAM budget ({} MiB)",
                params.ram_cache_bytes >> 20,
                params.ram_budget_bytes >> 20
            )));
        }
        if params.fold_tokens == 0 {
            return Err(EngineError::Spec(
                "fold_tokens must be at least 1 (0 would fold every step)".into(),
            ));
        }
        if !(params.prefetch_margin.is_finite() && params.prefetch_margin >= 1.0) {
            return Err(EngineError::Spec(format!(
                "prefetch_margin {} must be finite and >= 1",
                params.prefetch_margin
            )));
        }
        std::fs::create_dir_all(root).map_err(|e| folder_err(root, e.to_string()))?;
        let cache = Arc::new(RamCache::new(params.ram_cache_bytes));
        let prefetch = params.prefetch.then(|| {
            let (tx, rx) = channel::<PrefetchJob>();
            std::thread::Builder::new()
                .name("strata-prefetch".into())
                .spawn(move || {
                    // Prefetch is a hint: it must use idle CPU only, never a step's.
                    if let Err(e) = crate::sched::run_only_when_idle() {
                        log::warn!("prefetch thread keeps normal priority: {e}");
                    }
                    while let Ok(first) = rx.recv() {
                        // Only the newest job per (session, layer) matters: older ones describe
                        // steps that have already happened.
                        let mut jobs = vec![first];
                        jobs.extend(rx.try_iter());
                        let mut latest: Vec<PrefetchJob> = Vec::new();
                        for job in jobs.into_iter().rev() {
                            if !latest.iter().any(|j| {
                                j.layer == job.layer && Weak::ptr_eq(&j.session, &job.session)
                            }) {
                                latest.push(job);
                            }
                        }
                        for job in latest {
                            if let Some(s) = job.session.upgrade() {
                                prefetch_layer(&s, job.layer, job.next, &job.queries, job.margin);
                            }
                        }
                    }
                })
                .map(|_| Mutex::new(tx))
        });
        let prefetch = match prefetch {
            Some(Ok(tx)) => Some(tx),
            Some(Err(e)) => {
                log::warn!("prefetch thread could not start, prefetch is off: {e}");
                None
            }
            None => None,
        };
        Ok(Engine {
            root: root.to_path_buf(),
            params,
            search,
            build,
            reader,
            cache,
            sessions: RwLock::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            prefetch_on: AtomicBool::new(prefetch.is_some()),
            creating: Mutex::new(()),
            prefetch,
        })
    }

    pub fn params(&self) -> &EngineParams {
        &self.params
    }

    /// Turns prefetching on or off at run time (it needs `EngineParams::prefetch` at creation).
    pub fn set_prefetch(&self, on: bool) {
        self.prefetch_on
            .store(on && self.prefetch.is_some(), Ordering::Relaxed);
    }

    pub fn cache_stats(&self) -> CacheStats {
        self.cache.stats()
    }

    /// Empties the RAM tier (for cold measurements).
    pub fn clear_cache(&self) {
        self.cache.clear();
    }

    pub fn reset_cache_stats(&self) {
        self.cache.reset_stats();
    }

    fn session(&self, id: SessionId) -> EngineResult<Arc<Session>> {
        self.sessions
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned()
            .ok_or(EngineError::UnknownSession(id))
    }

    /// Folder of a context: one per content hash (model + layers + token ids).
    pub fn session_dir(&self, spec: &SessionSpec) -> PathBuf {
        self.root.join(format!("{:016x}", spec.content_hash()))
    }

    /// Opens a session over `spec`'s context. The index is reused when one for the same content
    /// hash exists (after a restart too, with the tail persisted by [`Engine::close_session`]);
    /// otherwise it is built from `prefill` (layer-major `(layer, kv head)` arrays of
    /// `tokens × head_dim`), which must then be given.
    pub fn create_session(
        &self,
        spec: SessionSpec,
        prefill: Option<&[HeadArrays]>,
    ) -> EngineResult<SessionId> {
        spec.validate().map_err(EngineError::Spec)?;
        let _creating = self.creating.lock().unwrap_or_else(|p| p.into_inner());
        let hash = spec.content_hash();
        let dir = self.session_dir(&spec);
        let index_dir = dir.join("index");
        let n = spec.token_ids.len();
        if self
            .sessions
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .any(|s| s.hash == hash)
        {
            return Err(EngineError::Admission(format!(
                "a session over this context ({hash:016x}) is already open; its folder is not shared"
            )));
        }

        let existing = if index_dir.join(strata_index::manifest::INDEX_FILE).exists() {
            match Index::open(&index_dir, self.reader, self.cache.clone()) {
                Ok(ix) if matches_spec(&ix, &spec, hash) => Some(ix),
                Ok(_) => {
                    log::warn!(
                        "{}: index of another context or shape; rebuilding",
                        index_dir.display()
                    );
                    None
                }
                Err(e) => {
                    log::warn!("{}: unusable index ({e}); rebuilding", index_dir.display());
                    None
                }
            }
        } else {
            None
        };
        let tail_path = dir.join(TAIL_FILE);
        let reused = existing.is_some();
        self.admit(&spec, reused)?;
        let index = match existing {
            Some(ix) => {
                log::info!("session over {hash:016x}: reusing {}", index_dir.display());
                ix
            }
            None => {
                let prefill = prefill.ok_or_else(|| {
                    EngineError::Spec(format!(
                        "no index for context {hash:016x} under {} and no prefill K/V to build one",
                        self.root.display()
                    ))
                })?;
                let input = BuildInput {
                    source: SourceInfo {
                        dump_path: format!("session context {hash:016x}"),
                        model: spec.model.clone(),
                        model_type: String::new(),
                        layers: spec.layers.iter().map(|&l| l as u32).collect(),
                        q_heads: spec.q_heads as u32,
                        kv_heads: spec.kv_heads as u32,
                        head_dim: spec.head_dim as u32,
                        tokens: n as u32,
                        softmax_scale: spec.softmax_scale.clone(),
                        content_hash: hash,
                    },
                    heads: prefill.to_vec(),
                };
                std::fs::create_dir_all(&dir).map_err(|e| folder_err(&dir, e.to_string()))?;
                build_index_from(&input, &self.build, &index_dir, true, &|_, _| {})?;
                // A tail belongs to the index it extends: once a new one is built, the old
                // tail is set aside and the session starts from its prefill.
                if tail_path.exists() {
                    set_tail_aside(&tail_path, "written over another index")
                        .map_err(|e| folder_err(&tail_path, e.to_string()))?;
                }
                Index::open(&index_dir, self.reader, self.cache.clone())?
            }
        };
        let spec_json =
            serde_json::to_vec_pretty(&spec).map_err(|e| EngineError::Spec(e.to_string()))?;
        strata_storage::durable::atomic_write(&dir.join(SPEC_FILE), &spec_json)?;

        let layers = Session::initial_layers(
            &spec,
            &index,
            &self.search,
            self.params.fold_tokens as usize,
            self.params.fold_query_steps as usize,
        )?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let session = Arc::new(Session {
            id,
            spec,
            hash,
            dir: dir.clone(),
            base: Arc::new(index),
            base_tokens: n,
            search: self.search.clone(),
            build: self.build.clone(),
            reused_index: reused,
            layers,
            failed: Mutex::new(None),
            closed: AtomicBool::new(false),
            fold_tokens: self.params.fold_tokens as usize,
            cache: self.cache.clone(),
            reader: self.reader,
        });
        if tail_path.exists() {
            if let Err(e) = load_tail(&session, &tail_path) {
                // A tail that cannot be restored must not lock the context out for good: keep
                // it aside for inspection and continue from the prefill.
                let _ = set_tail_aside(&tail_path, &format!("{e}; continuing from the prefill"));
                for layer in &session.layers {
                    let mut st = layer.lock().unwrap_or_else(|p| p.into_inner());
                    st.len = n;
                    st.tail = Rows::new(session.spec.kv_heads);
                    st.folded_upto = n.max(self.search.sink_tokens as usize);
                    st.deltas.clear();
                    st.recent_queries.iter_mut().for_each(QueryRing::clear);
                }
            }
        }
        remove_unused_folders(&session);
        self.sessions
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, session);
        Ok(id)
    }

    /// Refuses a session the RAM or disk budgets cannot hold, before anything is built.
    fn admit(&self, spec: &SessionSpec, reused: bool) -> EngineResult<()> {
        let (l, kv, d, n) = (
            spec.layers.len() as u64,
            spec.kv_heads as u64,
            spec.head_dim as u64,
            spec.token_ids.len() as u64,
        );
        let lists = n.div_ceil(self.build.list_size as u64);
        let code = strata_index::codes::code_bytes(self.build.code_bits, d as usize) as u64;
        // Sizes are below 2^32 each (the spec checks), so these products fit u128.
        let (l, kv, d, n, lists, code) = (
            l as u128,
            kv as u128,
            d as u128,
            n as u128,
            lists as u128,
            code as u128,
        );
        // Mapped manifest: codes and ids per token, centroid codes and mean values per list
        // (counted at 8 bytes a dimension, an upper bound); the resident static rows (sinks and
        // the window's edge, f32 keys and values); the recent queries kept for folds.
        let resident = l * kv * (n * (code + 4 + 4) + lists * d * 8)
            + l * kv
                * (self.search.sink_tokens as u128 + self.search.recent_tokens as u128)
                * d
                * 8
            + l * spec.q_heads as u128 * self.params.fold_query_steps as u128 * d * 4;
        // Segments: ids + f16 keys and values, 4 KiB padding and replicas (about a third more).
        let disk = if reused {
            0
        } else {
            l * kv * n * (4 + 4 * d) * 4 / 3
        };
        let (resident, disk) = (
            u64::try_from(resident).unwrap_or(u64::MAX),
            u64::try_from(disk).unwrap_or(u64::MAX),
        );
        let sessions = self.sessions.read().unwrap_or_else(|p| p.into_inner());
        let used_ram: u64 = sessions.values().map(|s| s.resident_bytes()).sum();
        let used_disk: u64 = dir_bytes(&self.root);
        let ram_free = self
            .params
            .ram_budget_bytes
            .saturating_sub(self.params.ram_cache_bytes + used_ram);
        if resident > ram_free {
            return Err(EngineError::Admission(format!(
                "session needs about {} MiB of resident RAM; {} MiB of the {} MiB budget are free ({} MiB RAM tier, {} MiB held by {} sessions)",
                resident >> 20,
                ram_free >> 20,
                self.params.ram_budget_bytes >> 20,
                self.params.ram_cache_bytes >> 20,
                used_ram >> 20,
                sessions.len()
            )));
        }
        let disk_free = self.params.disk_budget_bytes.saturating_sub(used_disk);
        if disk > disk_free {
            return Err(EngineError::Admission(format!(
                "session needs about {} MiB of disk; {} MiB of the {} MiB budget are free",
                disk >> 20,
                disk_free >> 20,
                self.params.disk_budget_bytes >> 20
            )));
        }
        Ok(())
    }

    /// One decoding step of `layer` for session `id`: `queries` holds every query head
    /// (`q_heads × head_dim`), `new_k`/`new_v` this token's key and value of every KV head.
    pub fn step(
        &self,
        id: SessionId,
        layer: usize,
        queries: &[f32],
        new_k: &[f32],
        new_v: &[f32],
    ) -> EngineResult<StepOutput> {
        let session = self.session(id)?;
        let out = session.step(layer, queries, new_k, new_v)?;
        if let Some(tx) = self
            .prefetch
            .as_ref()
            .filter(|_| self.prefetch_on.load(Ordering::Relaxed))
        {
            let job = PrefetchJob {
                session: Arc::downgrade(&session),
                layer,
                next: out.telemetry.position + 1,
                queries: queries.to_vec(),
                margin: self.params.prefetch_margin,
            };
            let _ = tx.lock().unwrap_or_else(|p| p.into_inner()).send(job);
        }
        Ok(out)
    }

    pub fn info(&self, id: SessionId) -> EngineResult<SessionInfo> {
        Ok(self.session(id)?.info())
    }

    /// Why the last background fold of `layer` failed, if it did.
    pub fn fold_error(&self, id: SessionId, layer: usize) -> EngineResult<Option<String>> {
        Ok(self.session(id)?.fold_error(layer))
    }

    /// Waits for the session's background folds to finish and installs them.
    pub fn finish_folds(&self, id: SessionId) -> EngineResult<()> {
        self.session(id)?.finish_folds();
        Ok(())
    }

    /// Tier placement: reads every posting list of the session's base index into the RAM tier,
    /// layer by layer, while the tier's budget holds them. Returns the bytes the tier holds.
    pub fn preload(&self, id: SessionId) -> EngineResult<u64> {
        Ok(self.session(id)?.base.preload()?)
    }

    /// Forgets a session; its folder stays for reuse. Waits for its running steps and folds,
    /// so that none of them writes into the folder afterwards (a later session over the same
    /// context would fold into the same delta folders).
    pub fn drop_session(&self, id: SessionId) -> EngineResult<()> {
        let s = self
            .sessions
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id)
            .ok_or(EngineError::UnknownSession(id))?;
        s.close_and_drain();
        Ok(())
    }

    /// Finishes the session's steps and folds, persists its appended tail, and drops it. A
    /// later `create_session` over the same context (after a restart too) continues from
    /// there. Steps that come after the close began are refused (`UnknownSession`); if the
    /// tail cannot be written, the session stays open and usable.
    pub fn close_session(&self, id: SessionId) -> EngineResult<()> {
        let s = self.session(id)?;
        s.close_and_drain();
        if let Err(e) = save_tail(&s, &s.dir.join(TAIL_FILE)) {
            s.closed.store(false, Ordering::Release);
            return Err(e);
        }
        self.drop_session(id)
    }

    pub fn session_ids(&self) -> Vec<SessionId> {
        let mut ids: Vec<_> = self
            .sessions
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .copied()
            .collect();
        ids.sort_unstable();
        ids
    }
}

/// Moves a tail that cannot extend the session's index out of the way, kept for inspection
/// (one at a time: a later one replaces it).
fn set_tail_aside(tail_path: &Path, why: &str) -> std::io::Result<()> {
    let aside = tail_path.with_file_name(format!("{TAIL_FILE}.unusable"));
    log::warn!(
        "{}: {why}; moved to {}",
        tail_path.display(),
        aside.display()
    );
    std::fs::rename(tail_path, &aside)
}

/// Removes what nothing will read from a session's folder, which would otherwise count against
/// the disk budget for good: delta indexes the session's state does not use (folded by a
/// session dropped before its tail was saved, or extending a tail that was set aside) and build
/// scratch folders of other processes (a build cut short by a crash). Scratch folders of this
/// process are left: their build may still be running.
fn remove_unused_folders(s: &Session) {
    let mut used = std::collections::HashSet::new();
    for (l, layer) in s.layers.iter().enumerate() {
        let st = layer.lock().unwrap_or_else(|p| p.into_inner());
        used.extend(
            st.deltas
                .iter()
                .map(|d| delta_dir(&s.dir, l, d.start, d.start + d.len)),
        );
    }
    let Ok(entries) = std::fs::read_dir(&s.dir) else {
        return;
    };
    let own_scratch = format!(".building-{}-", std::process::id());
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        let unused = if name.starts_with("delta-") {
            !used.contains(&path)
        } else {
            name.starts_with('.') && name.contains(".building-") && !name.contains(&own_scratch)
        };
        if !unused || !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        match std::fs::remove_dir_all(&path) {
            Ok(()) => log::info!("{}: unused, removed", path.display()),
            Err(e) => log::warn!("{}: unused, but cannot remove it: {e}", path.display()),
        }
    }
}

fn matches_spec(ix: &Index, spec: &SessionSpec, hash: u64) -> bool {
    let s = &ix.manifest().source;
    s.content_hash.to_native() == hash
        && s.q_heads.to_native() as usize == spec.q_heads
        && s.kv_heads.to_native() as usize == spec.kv_heads
        && s.head_dim.to_native() as usize == spec.head_dim
        && s.tokens.to_native() as usize == spec.token_ids.len()
        && s.layers.len() == spec.layers.len()
        && same_scales(s, &spec.softmax_scale)
}

/// Whether an index's per-layer softmax scales are exactly `scales` (the index scores its
/// tokens with its own; the session scores static tokens with the spec's).
fn same_scales(s: &strata_index::manifest::ArchivedSourceInfo, scales: &[f32]) -> bool {
    s.softmax_scale.len() == scales.len()
        && s.softmax_scale
            .iter()
            .zip(scales)
            .all(|(a, b)| a.to_native().to_bits() == b.to_bits())
}

/// Reads ahead the lists the next step of `layer` will likely need: the same search with this
/// step's queries, its cache traffic marked as prefetch.
fn prefetch_layer(s: &Arc<Session>, layer: usize, next: usize, queries: &[f32], margin: f32) {
    // The position comes with the job: taking the layer's lock here, at idle priority, could
    // hold up the next step.
    if layer >= s.layers.len() {
        return;
    }
    let base_last = s.base_tokens - 1;
    let params = SearchParams {
        recent_tokens: (s.search.recent_tokens as usize).saturating_sub(next - base_last) as u32,
        rerank_factor: s.search.rerank_factor * margin.max(1.0),
        // Only the lists matter here, not the answer.
        estimate_remainder: false,
        target_mass: None,
        ..s.search.clone()
    };
    let dim = s.spec.head_dim;
    let group = s.spec.group_size();
    as_prefetch(|| {
        for h in 0..s.spec.kv_heads {
            let qs: Vec<&[f32]> = (h * group..(h + 1) * group)
                .map(|qh| &queries[qh * dim..(qh + 1) * dim])
                .collect();
            if let Err(e) = s.base.prefetch_group(layer, h, &qs, base_last, &params) {
                log::debug!("prefetch of session {} layer {layer}: {e}", s.id);
                return;
            }
        }
    });
}

/// Tail file: a JSON header (per layer: length, folded prefix, deltas, recent query rows per KV
/// head) then the f32 rows of every layer and KV head (keys, values, then its recent queries
/// oldest first), ending with the strata footer.
#[derive(serde::Serialize, serde::Deserialize)]
struct TailHeader {
    base_tokens: usize,
    kv_heads: usize,
    head_dim: usize,
    layers: Vec<TailLayer>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct TailLayer {
    len: usize,
    folded_upto: usize,
    deltas: Vec<(usize, usize)>,
    /// Per KV head, how many recent query rows follow its values (absent in version 1).
    #[serde(default)]
    query_rows: Vec<usize>,
}

fn save_tail(s: &Session, path: &Path) -> EngineResult<()> {
    let mut header = TailHeader {
        base_tokens: s.base_tokens,
        kv_heads: s.spec.kv_heads,
        head_dim: s.spec.head_dim,
        layers: Vec::new(),
    };
    let mut rows: Vec<u8> = Vec::new();
    for layer in &s.layers {
        let st = layer.lock().unwrap_or_else(|p| p.into_inner());
        let dim = s.spec.head_dim;
        let queries: Vec<Vec<f32>> = st.recent_queries.iter().map(|r| r.oldest_first()).collect();
        header.layers.push(TailLayer {
            len: st.len,
            folded_upto: st.folded_upto,
            deltas: st.deltas.iter().map(|d| (d.start, d.len)).collect(),
            query_rows: queries.iter().map(|q| q.len() / dim.max(1)).collect(),
        });
        for (h, q) in queries.iter().enumerate() {
            for v in st.tail.k[h].iter().chain(&st.tail.v[h]).chain(q) {
                rows.extend_from_slice(&v.to_le_bytes());
            }
        }
    }
    let json = serde_json::to_vec(&header).map_err(|e| folder_err(path, e.to_string()))?;
    let mut payload = (json.len() as u64).to_le_bytes().to_vec();
    payload.extend_from_slice(&json);
    payload.extend_from_slice(&rows);
    let foot = footer::encode_footer(TAIL_MAGIC, TAIL_VERSION, &payload);
    let mut f = AtomicFile::create(path)?;
    f.write_all(&payload)
        .and_then(|_| f.write_all(&foot))
        .map_err(|e| folder_err(path, format!("write: {e}")))?;
    f.commit()?;
    Ok(())
}

fn load_tail(s: &Session, path: &Path) -> EngineResult<()> {
    let bytes = std::fs::read(path).map_err(|e| folder_err(path, format!("read: {e}")))?;
    let (payload, version) = footer::check_whole_of_versions(
        path,
        &bytes,
        TAIL_MAGIC,
        TAIL_OLDEST_VERSION..=TAIL_VERSION,
    )?;
    let bad = |p: &str| folder_err(path, format!("tail file: {p}"));
    if payload.len() < 8 {
        return Err(bad("no header"));
    }
    let hlen =
        u64::from_le_bytes(payload[..8].try_into().map_err(|_| bad("header length"))?) as usize;
    let json = 8usize
        .checked_add(hlen)
        .and_then(|end| payload.get(8..end))
        .ok_or_else(|| bad("header past the end"))?;
    let header: TailHeader =
        serde_json::from_slice(json).map_err(|e| bad(&format!("header: {e}")))?;
    let (kv, dim) = (s.spec.kv_heads, s.spec.head_dim);
    if header.base_tokens != s.base_tokens
        || header.kv_heads != kv
        || header.head_dim != dim
        || header.layers.len() != s.layers.len()
    {
        return Err(bad("written for another session shape"));
    }
    let rows_bytes = &payload[8 + hlen..];
    let mut floats = rows_bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]));
    for (l, (layer, th)) in s.layers.iter().zip(&header.layers).enumerate() {
        let first = s.base_tokens.max(s.search.sink_tokens as usize);
        // The folded prefix may run ahead of a tail shorter than the sinks (a prefill shorter
        // than `sink_tokens`), never past both.
        if th.len < s.base_tokens || th.folded_upto < first || th.folded_upto > th.len.max(first) {
            return Err(bad(&format!("layer {l}: inconsistent lengths")));
        }
        // Lengths from the header are checked against the bytes present before any use.
        let n = (th.len - s.base_tokens)
            .checked_mul(dim)
            .filter(|&n| n.checked_mul(8 * kv).is_some_and(|b| b <= rows_bytes.len()))
            .ok_or_else(|| bad(&format!("layer {l}: {} rows past the end", th.len)))?;
        let query_rows = match (version, th.query_rows.len()) {
            (1, _) => vec![0; kv],
            (_, len) if len == kv => th.query_rows.clone(),
            (_, len) => {
                return Err(bad(&format!(
                    "layer {l}: query rows for {len} KV heads, the session has {kv}"
                )))
            }
        };
        let mut tail = Rows {
            k: Vec::with_capacity(kv),
            v: Vec::with_capacity(kv),
        };
        let mut queries = Vec::with_capacity(kv);
        for &q_rows in &query_rows {
            let q_floats = q_rows
                .checked_mul(dim)
                .filter(|&f| f.checked_mul(4).is_some_and(|b| b <= rows_bytes.len()))
                .ok_or_else(|| bad(&format!("layer {l}: {q_rows} query rows past the end")))?;
            let k: Vec<f32> = floats.by_ref().take(n).collect();
            let v: Vec<f32> = floats.by_ref().take(n).collect();
            let q: Vec<f32> = floats.by_ref().take(q_floats).collect();
            if k.len() != n || v.len() != n || q.len() != q_floats {
                return Err(bad(&format!("layer {l}: rows cut short")));
            }
            tail.k.push(k);
            tail.v.push(v);
            queries.push(q);
        }
        // Deltas must tile [base, folded_upto) in order, none empty.
        let mut next = s.base_tokens.max(s.search.sink_tokens as usize);
        for &(start, len) in &th.deltas {
            if len == 0 || start != next {
                return Err(bad(&format!(
                    "layer {l}: deltas do not tile the folded tail"
                )));
            }
            next = start
                .checked_add(len)
                .ok_or_else(|| bad(&format!("layer {l}: delta past the end")))?;
        }
        if next != th.folded_upto {
            return Err(bad(&format!(
                "layer {l}: deltas end at {next}, folded prefix at {}",
                th.folded_upto
            )));
        }
        let mut deltas = Vec::new();
        for &(start, len) in &th.deltas {
            let dir = delta_dir(&s.dir, l, start, start + len);
            let index = Index::open(&dir, s.reader, s.cache.clone())?;
            let src = &index.manifest().source;
            if src.tokens.to_native() as usize != len
                || src.kv_heads.to_native() as usize != kv
                || src.head_dim.to_native() as usize != dim
                || !same_scales(src, &s.spec.softmax_scale[l..=l])
            {
                return Err(bad(&format!(
                    "layer {l}: delta {} holds another token count, shape or scale",
                    dir.display()
                )));
            }
            deltas.push(Delta {
                start,
                len,
                index: Arc::new(index),
            });
        }
        let mut st = layer.lock().unwrap_or_else(|p| p.into_inner());
        st.len = th.len;
        st.tail = tail;
        st.folded_upto = th.folded_upto;
        st.deltas = deltas;
        for (ring, q) in st.recent_queries.iter_mut().zip(&queries) {
            ring.clear();
            for row in q.chunks_exact(dim) {
                ring.push(row);
            }
        }
    }
    if floats.next().is_some() {
        return Err(bad("trailing rows"));
    }
    Ok(())
}
