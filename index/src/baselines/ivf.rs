//! Plain k-means IVF over keys: Lloyd k-means (no balance, no replication), lists probed in
//! centroid-score order until `ivf_scan_factor × budget` keys are scanned, best `budget` attended.

use rand::SeedableRng;

use super::{BaselineParams, HeadRetriever};
use crate::kmeans::{balanced_kmeans, KMeansConfig};
use crate::linalg::dot;
use crate::params::SearchParams;
use crate::search::SearchStats;
use crate::IndexResult;

pub struct PlainIvf<'a> {
    keys: &'a [f32],
    dim: usize,
    centroids: Vec<f32>,
    lists: Vec<Vec<u32>>,
    scan_factor: f32,
}

impl<'a> PlainIvf<'a> {
    pub fn build(keys: &'a [f32], dim: usize, p: &BaselineParams) -> Self {
        let n = keys.len() / dim;
        let k = n.div_ceil(p.ivf_list_size.max(1) as usize).max(1);
        let cfg = KMeansConfig {
            iters: p.ivf_kmeans_iters,
            train_points: n,
            balance_penalty: 0.0,
            capacity: n,
        };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(p.seed);
        let km = balanced_kmeans(keys, dim, k, &cfg, &mut rng);
        let mut lists = vec![Vec::new(); km.k];
        for (t, &a) in km.assign.iter().enumerate() {
            lists[a as usize].push(t as u32);
        }
        PlainIvf {
            keys,
            dim,
            centroids: km.centroids,
            lists,
            scan_factor: p.ivf_scan_factor,
        }
    }
}

impl HeadRetriever for PlainIvf<'_> {
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
        let mut order: Vec<(f32, usize)> = self
            .centroids
            .chunks_exact(self.dim)
            .enumerate()
            .map(|(j, c)| (dot(c, q), j))
            .collect();
        order.sort_unstable_by(|a, b| b.0.total_cmp(&a.0));
        let target = (self.scan_factor as f64 * budget as f64).ceil() as usize;
        let mut chosen = Vec::new();
        let mut scanned = 0usize;
        for &(_, j) in &order {
            if scanned >= target {
                break;
            }
            chosen.push(j);
            scanned += self.lists[j]
                .iter()
                .filter(|&&t| (t as usize) <= position && !params.is_static(t as usize, position))
                .count();
        }
        let stats = SearchStats {
            centroids_scored: order.len() as u64,
            lists_read: chosen.len() as u64,
            ..Default::default()
        };
        let toks = chosen
            .iter()
            .flat_map(|&j| self.lists[j].iter().copied())
            .collect();
        Ok((toks, stats))
    }
}
