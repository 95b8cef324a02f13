//! hnsw_rs over keys. HNSW answers nearest-neighbour queries for a metric, and `DistDot` assumes
//! unit vectors, so inner product is reduced to L2 (Bachrach et al.): each key gets one extra
//! coordinate `sqrt(M² − |k|²)` (M the largest key norm) and each query a 0 there; then
//! `|q' − k'|² = |q|² + M² − 2 q·k`, and the nearest keys are those with the largest q·k.

use hnsw_rs::prelude::{DistL2, Hnsw};

use super::{neighbours_wanted, BaselineParams, HeadRetriever};
use crate::linalg::norm_sq;
use crate::params::SearchParams;
use crate::search::SearchStats;
use crate::IndexResult;

pub struct HnswIp<'a> {
    keys: &'a [f32],
    dim: usize,
    graph: Hnsw<'static, f32, DistL2>,
    ef_search: usize,
}

impl<'a> HnswIp<'a> {
    pub fn build(keys: &'a [f32], dim: usize, p: &BaselineParams) -> Self {
        let n = keys.len() / dim;
        let max_norm_sq = keys.chunks_exact(dim).map(norm_sq).fold(0f32, f32::max);
        let augmented: Vec<Vec<f32>> = keys
            .chunks_exact(dim)
            .map(|k| {
                let mut v = k.to_vec();
                v.push((max_norm_sq - norm_sq(k)).max(0.0).sqrt());
                v
            })
            .collect();
        let graph = Hnsw::<f32, DistL2>::new(
            p.hnsw_max_connections as usize,
            n,
            16,
            p.hnsw_ef_construction as usize,
            DistL2 {},
        );
        let data: Vec<(&[f32], usize)> = augmented
            .iter()
            .enumerate()
            .map(|(i, v)| (v.as_slice(), i))
            .collect();
        graph.parallel_insert_slice(&data);
        HnswIp {
            keys,
            dim,
            graph,
            ef_search: p.hnsw_ef_search as usize,
        }
    }
}

impl HeadRetriever for HnswIp<'_> {
    fn keys(&self) -> (&[f32], usize) {
        (self.keys, self.dim)
    }

    fn propose(
        &self,
        q: &[f32],
        position: usize,
        budget: usize,
        params: &SearchParams,
    ) -> IndexResult<(Vec<u32>, SearchStats)> {
        let n = self.keys.len() / self.dim;
        let want = neighbours_wanted(n, position, budget, params);
        let mut qa = q.to_vec();
        qa.push(0.0);
        let found = self.graph.search(&qa, want, self.ef_search.max(want));
        // hnsw_rs does not report the distances its traversal computed: only the returned
        // neighbours are counted as scored.
        let toks = found.iter().map(|nb| nb.d_id as u32).collect();
        Ok((toks, SearchStats::default()))
    }
}
