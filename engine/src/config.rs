//! Engine tunables, named once with their defaults (printed by `strata inspect --defaults`).

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EngineParams {
    /// RAM the engine may use: the shared list cache plus every session's resident state
    /// (mapped manifest with centroids and codes, static and tail rows).
    pub ram_budget_bytes: u64,
    /// The part of `ram_budget_bytes` given to the shared RAM tier of posting lists.
    pub ram_cache_bytes: u64,
    /// Disk the session folders may use (indexes, deltas, persisted tails).
    pub disk_budget_bytes: u64,
    /// Appended tokens older than the recent window are attended exactly (static) until this
    /// many have gathered; then they are folded into a delta index in the background.
    pub fold_tokens: u32,
    /// The queries of the last this many steps of each layer are kept (for each KV head, its
    /// query heads' rows) and fitted as the query-aware metric of each fold
    /// (`BuildParams::query_aware`), as prefill queries are for the base index. 0 folds by
    /// key distance.
    pub fold_query_steps: u32,
    /// Rank the lists of step t+1 with step t's queries and read them ahead on a background
    /// thread.
    pub prefetch: bool,
    /// The prefetch plans the next step with `prefetch_margin ×` the candidates a step re-ranks:
    /// the lists a step needs are in RAM after it anyway, so what the next, slightly different
    /// query adds is found among the next-best candidates.
    pub prefetch_margin: f32,
}

impl Default for EngineParams {
    fn default() -> Self {
        EngineParams {
            ram_budget_bytes: 8 << 30,
            ram_cache_bytes: 2 << 30,
            disk_budget_bytes: 64 << 30,
            fold_tokens: 4096,
            fold_query_steps: 128,
            prefetch: true,
            prefetch_margin: 3.0,
        }
    }
}
