//! Baselines strata is measured against, one module per technique behind one trait. They hold the
//! keys of one (layer, KV head) in RAM and return exactly scored tokens under the same budget
//! and static-token rules as strata's own search.

pub mod exact;
#[cfg(feature = "faiss")]
pub mod faiss_ivf;
pub mod hnsw;
pub mod ivf;

use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::linalg::{dot, top_k_indices};
use crate::params::SearchParams;
use crate::search::{Retrieved, SearchStats};
use crate::{IndexError, IndexResult};

/// Tunables of the baselines, in one place.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BaselineParams {
    /// Keys per list of the plain k-means IVF and FAISS IVF-Flat (same as strata's lists).
    pub ivf_list_size: u32,
    /// IVF baselines probe lists in centroid order until they have scanned this many times the
    /// attended budget of keys, then attend the best `budget` of them.
    pub ivf_scan_factor: f32,
    pub ivf_kmeans_iters: u32,
    /// hnsw_rs graph degree, construction and search beam widths.
    pub hnsw_max_connections: u32,
    pub hnsw_ef_construction: u32,
    pub hnsw_ef_search: u32,
    pub seed: u64,
}

impl Default for BaselineParams {
    fn default() -> Self {
        // The IVF baselines cluster like strata does, so that they differ only in routing.
        let build = crate::params::BuildParams::default();
        BaselineParams {
            ivf_list_size: build.list_size,
            ivf_scan_factor: 4.0,
            ivf_kmeans_iters: build.kmeans_iters,
            hnsw_max_connections: 24,
            hnsw_ef_construction: 200,
            hnsw_ef_search: 400,
            seed: build.seed,
        }
    }
}

impl BaselineParams {
    /// Refuses values the baselines cannot work with (hnsw_rs exits the process on a degree
    /// above 256; a scan factor of 0 would silently probe nothing).
    pub fn validate(&self) -> IndexResult<()> {
        let bad = |name: &'static str, problem: String| Err(IndexError::Param { name, problem });
        if self.ivf_list_size < 1 {
            return bad(
                "ivf_list_size",
                format!("{} must be >= 1", self.ivf_list_size),
            );
        }
        if !(self.ivf_scan_factor.is_finite() && self.ivf_scan_factor > 0.0) {
            return bad(
                "ivf_scan_factor",
                format!("{} must be finite and > 0", self.ivf_scan_factor),
            );
        }
        if !(2..=256).contains(&self.hnsw_max_connections) {
            return bad(
                "hnsw_max_connections",
                format!("{} must be in 2..=256", self.hnsw_max_connections),
            );
        }
        if self.hnsw_ef_construction < 1 || self.hnsw_ef_search < 1 {
            return bad(
                "hnsw_ef_construction / hnsw_ef_search",
                format!(
                    "{} / {} must be >= 1",
                    self.hnsw_ef_construction, self.hnsw_ef_search
                ),
            );
        }
        Ok(())
    }
}

/// How many nearest neighbours an ANN baseline must ask for so that `budget` remain after the
/// static tokens and the keys after `position` are dropped (the indexes hold all `tokens`).
pub(crate) fn neighbours_wanted(
    tokens: usize,
    position: usize,
    budget: usize,
    params: &SearchParams,
) -> usize {
    budget + params.static_tokens(position).len() + (tokens - position - 1)
}

/// One (layer, KV head) prepared by a method, answering queries of its query heads. A method
/// only proposes candidate tokens; `retrieve` re-ranks them exactly against the same keys and
/// keeps the best `budget`, so that the baselines differ only in what they propose.
pub trait HeadRetriever: Send + Sync {
    /// The keys (`tokens × dim`) proposals are scored against, and `dim`.
    fn keys(&self) -> (&[f32], usize);

    /// Candidate tokens for a query at `position` (duplicates, static and future tokens are
    /// dropped later), and what finding them cost.
    fn propose(
        &self,
        q: &[f32],
        position: usize,
        budget: usize,
        params: &SearchParams,
    ) -> IndexResult<(Vec<u32>, SearchStats)>;

    /// How many of the proposals to attend: the budget, except for full attention.
    fn keep(&self, budget: usize) -> usize {
        budget
    }

    fn retrieve(
        &self,
        q: &[f32],
        position: usize,
        params: &SearchParams,
    ) -> IndexResult<Retrieved> {
        let t0 = Instant::now();
        params.validate()?;
        let (keys, dim) = self.keys();
        let bad = |problem: String| IndexError::Baseline {
            name: "query",
            problem,
        };
        if q.len() != dim {
            return Err(bad(format!("query has {} dims, the keys {dim}", q.len())));
        }
        if let Some(i) = q.iter().position(|v| !v.is_finite()) {
            return Err(bad(format!("query component {i} is {}", q[i])));
        }
        let tokens_held = keys.len() / dim.max(1);
        if position >= tokens_held {
            return Err(bad(format!(
                "position {position} is past the {tokens_held} keys held"
            )));
        }
        let budget = params.budget_tokens(position);
        let (tokens, stats) = self.propose(q, position, budget, params)?;
        let mut seen = vec![false; position + 1];
        let mut toks = Vec::new();
        let mut scores = Vec::new();
        for t in tokens {
            let tu = t as usize;
            if tu > position || params.is_static(tu, position) || seen[tu] {
                continue;
            }
            seen[tu] = true;
            toks.push(t);
            scores.push(dot(&keys[tu * dim..(tu + 1) * dim], q));
        }
        let top = top_k_indices(&scores, self.keep(budget));
        let mut stats = stats;
        if stats.keys_scored == 0 {
            stats.keys_scored = toks.len() as u64;
        }
        // Baselines hold f32 centroids and f16 keys and values in RAM.
        stats.centroid_bytes = stats.centroids_scored * dim as u64 * 4;
        stats.key_bytes = stats.keys_scored * dim as u64 * 2;
        stats.value_bytes = top.len() as u64 * dim as u64 * 2;
        stats.search_ns = t0.elapsed().as_nanos() as u64;
        Ok(Retrieved {
            tokens: top.iter().map(|&i| toks[i as usize]).collect(),
            scores: top.iter().map(|&i| scores[i as usize]).collect(),
            values: None,
            attention: None,
            remainder: None,
            stats,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn baseline_parameters_are_validated_by_name() {
        assert!(BaselineParams::default().validate().is_ok());
        for (p, name) in [
            (
                BaselineParams {
                    ivf_scan_factor: 0.0,
                    ..Default::default()
                },
                "ivf_scan_factor",
            ),
            (
                BaselineParams {
                    hnsw_max_connections: 300,
                    ..Default::default()
                },
                "hnsw_max_connections",
            ),
            (
                BaselineParams {
                    ivf_list_size: 0,
                    ..Default::default()
                },
                "ivf_list_size",
            ),
        ] {
            let e = p.validate().unwrap_err().to_string();
            assert!(e.contains(name), "{e}");
        }
    }
}
