//! Balanced k-means (SPANN's size-penalised assignment plus a hard capacity), the nearest-centroid
//! candidates every point keeps for replication, and the RNG replication rule.

use rand::seq::index::sample;
use rand::Rng;
use rayon::prelude::*;

use crate::linalg::{dot, norm_sq};

/// How many nearest centroids each point remembers after the final assignment.
pub const CANDIDATES_PER_POINT: usize = 6;

#[derive(Clone, Debug)]
pub struct KMeansConfig {
    pub iters: u32,
    /// Points sampled to train (all points are assigned at the end).
    pub train_points: usize,
    pub balance_penalty: f32,
    /// Hard cap on members per cluster.
    pub capacity: usize,
}

pub struct KMeansOutput {
    pub dim: usize,
    pub k: usize,
    pub centroids: Vec<f32>,
    /// Cluster of every point (all clusters non-empty).
    pub assign: Vec<u32>,
    /// For every point, its `CANDIDATES_PER_POINT` nearest centroids, nearest first, and their
    /// squared distances.
    pub candidates: Vec<u32>,
    pub candidate_d2: Vec<f32>,
}

/// Squared distances from every point to every centroid's top-m, using |x|^2 - 2x.c + |c|^2.
fn nearest_m(
    points: &[f32],
    dim: usize,
    centroids: &[f32],
    penalty: Option<&[f32]>,
    m: usize,
) -> (Vec<u32>, Vec<f32>) {
    let c_norm: Vec<f32> = centroids.chunks_exact(dim).map(norm_sq).collect();
    let n = points.len() / dim;
    let mut ids = vec![0u32; n * m];
    let mut d2s = vec![f32::INFINITY; n * m];
    ids.par_chunks_mut(m)
        .zip(d2s.par_chunks_mut(m))
        .enumerate()
        .for_each(|(i, (id_out, d_out))| {
            let x = &points[i * dim..(i + 1) * dim];
            let xn = norm_sq(x);
            for (j, c) in centroids.chunks_exact(dim).enumerate() {
                let mut d = (xn - 2.0 * dot(x, c) + c_norm[j]).max(0.0);
                if let Some(p) = penalty {
                    d += p[j];
                }
                if d < d_out[m - 1] {
                    // insertion into the sorted top-m
                    let mut pos = m - 1;
                    while pos > 0 && d_out[pos - 1] > d {
                        d_out[pos] = d_out[pos - 1];
                        id_out[pos] = id_out[pos - 1];
                        pos -= 1;
                    }
                    d_out[pos] = d;
                    id_out[pos] = j as u32;
                }
            }
        });
    (ids, d2s)
}

fn recompute_centroids(
    points: &[f32],
    dim: usize,
    assign: &[u32],
    k: usize,
    centroids: &mut [f32],
) -> Vec<usize> {
    let mut sums = vec![0f64; k * dim];
    let mut counts = vec![0usize; k];
    for (i, &a) in assign.iter().enumerate() {
        let a = a as usize;
        counts[a] += 1;
        let x = &points[i * dim..(i + 1) * dim];
        for (s, v) in sums[a * dim..(a + 1) * dim].iter_mut().zip(x) {
            *s += *v as f64;
        }
    }
    for j in 0..k {
        if counts[j] > 0 {
            let inv = 1.0 / counts[j] as f64;
            for (c, s) in centroids[j * dim..(j + 1) * dim]
                .iter_mut()
                .zip(&sums[j * dim..(j + 1) * dim])
            {
                *c = (*s * inv) as f32;
            }
        }
    }
    counts
}

/// Balanced k-means over `points` (row-major, `dim` wide). `k` is clamped to the point count.
pub fn balanced_kmeans<R: Rng>(
    points: &[f32],
    dim: usize,
    k: usize,
    cfg: &KMeansConfig,
    rng: &mut R,
) -> KMeansOutput {
    let n = points.len() / dim;
    let k = k.clamp(1, n.max(1));
    let m = CANDIDATES_PER_POINT.min(k);

    // Training sample and initial centroids (random distinct points).
    let train_n = cfg.train_points.clamp(k, n.max(k));
    let train: Vec<f32> = if train_n >= n {
        points.to_vec()
    } else {
        let idx = sample(rng, n, train_n);
        idx.iter()
            .flat_map(|i| points[i * dim..(i + 1) * dim].iter().copied())
            .collect()
    };
    let tn = train.len() / dim;
    let mut centroids: Vec<f32> = sample(rng, tn, k)
        .iter()
        .flat_map(|i| train[i * dim..(i + 1) * dim].iter().copied())
        .collect();

    let avg = tn as f32 / k as f32;
    let mut penalty: Option<Vec<f32>> = None;
    for _ in 0..cfg.iters {
        let (ids, d2) = nearest_m(&train, dim, &centroids, penalty.as_deref(), 1);
        let counts = recompute_centroids(&train, dim, &ids, k, &mut centroids);
        // Empty clusters take a random point of the largest one, so no list is wasted.
        for j in 0..k {
            if counts[j] == 0 {
                let big = (0..k).max_by_key(|&c| counts[c]).unwrap_or(0);
                let members: Vec<usize> = (0..tn).filter(|&i| ids[i] as usize == big).collect();
                if let Some(&p) = members.get(rng.random_range(0..members.len().max(1))) {
                    let src: Vec<f32> = train[p * dim..(p + 1) * dim].to_vec();
                    for (c, s) in centroids[j * dim..(j + 1) * dim].iter_mut().zip(&src) {
                        *c = s * (1.0 + 1e-3 * (rng.random::<f32>() - 0.5));
                    }
                }
            }
        }
        if cfg.balance_penalty > 0.0 {
            let mean_d2 = d2.iter().map(|&d| d as f64).sum::<f64>() / tn.max(1) as f64;
            penalty = Some(
                counts
                    .iter()
                    .map(|&c| cfg.balance_penalty * mean_d2 as f32 * (c as f32 / avg - 1.0))
                    .collect(),
            );
        }
    }

    // Final assignment of all points under the capacity: confident points choose first.
    let (cands, cand_d2) = nearest_m(points, dim, &centroids, None, m);
    let capacity = cfg.capacity.max(n.div_ceil(k));
    let mut order: Vec<usize> = (0..n).collect();
    let margin = |i: usize| {
        if m > 1 {
            cand_d2[i * m + 1] - cand_d2[i * m]
        } else {
            0.0
        }
    };
    order.sort_by(|&a, &b| margin(b).total_cmp(&margin(a)));
    let mut sizes = vec![0usize; k];
    let mut assign = vec![u32::MAX; n];
    let mut overflow = Vec::new();
    for &i in &order {
        match cands[i * m..(i + 1) * m]
            .iter()
            .find(|&&c| sizes[c as usize] < capacity)
        {
            Some(&c) => {
                assign[i] = c;
                sizes[c as usize] += 1;
            }
            None => overflow.push(i),
        }
    }
    for i in overflow {
        // Rare: all near centroids full; take the nearest one with room.
        let x = &points[i * dim..(i + 1) * dim];
        let best = (0..k)
            .filter(|&j| sizes[j] < capacity)
            .min_by(|&a, &b| {
                let da = norm_sq(x) - 2.0 * dot(x, &centroids[a * dim..(a + 1) * dim]);
                let db = norm_sq(x) - 2.0 * dot(x, &centroids[b * dim..(b + 1) * dim]);
                da.total_cmp(&db)
            })
            .unwrap_or(0);
        assign[i] = best as u32;
        sizes[best] += 1;
    }
    recompute_centroids(points, dim, &assign, k, &mut centroids);

    // Drop clusters left empty and renumber.
    let mut remap = vec![u32::MAX; k];
    let mut kept = Vec::new();
    for j in 0..k {
        if sizes[j] > 0 {
            remap[j] = kept.len() as u32;
            kept.push(j);
        }
    }
    let centroids: Vec<f32> = kept
        .iter()
        .flat_map(|&j| centroids[j * dim..(j + 1) * dim].iter().copied())
        .collect();
    let assign: Vec<u32> = assign.iter().map(|&a| remap[a as usize]).collect();
    let mut candidates = Vec::with_capacity(n * m);
    let mut candidate_d2 = Vec::with_capacity(n * m);
    for i in 0..n {
        for r in 0..m {
            let c = remap[cands[i * m + r] as usize];
            if c != u32::MAX {
                candidates.push(c);
                candidate_d2.push(cand_d2[i * m + r]);
            } else {
                candidates.push(assign[i]);
                candidate_d2.push(f32::INFINITY);
            }
        }
    }
    let k = kept.len();
    KMeansOutput {
        dim,
        k,
        centroids,
        assign,
        candidates,
        candidate_d2,
    }
}

impl KMeansOutput {
    /// Nearest-centroid candidates kept per point.
    pub fn m(&self) -> usize {
        self.candidates.len() / self.assign.len().max(1)
    }

    /// Lists a point is stored in: its own, then up to `replica_max - 1` nearby lists that pass the
    /// SPANN closure rule (distance within `1 + epsilon` of its own) and the RNG rule (the point is
    /// closer to the new centroid than any already chosen centroid is; otherwise that centroid
    /// already covers this direction).
    pub fn replica_lists(&self, i: usize, replica_max: usize, epsilon: f32) -> Vec<u32> {
        let m = self.m();
        let dim = self.dim;
        let own = self.assign[i];
        let mut chosen = vec![own];
        let own_d2 = self.candidates[i * m..(i + 1) * m]
            .iter()
            .zip(&self.candidate_d2[i * m..(i + 1) * m])
            .find(|(c, _)| **c == own)
            .map(|(_, d)| *d)
            .unwrap_or(self.candidate_d2[i * m]);
        for r in 0..m {
            if chosen.len() >= replica_max {
                break;
            }
            let c = self.candidates[i * m + r];
            let d2 = self.candidate_d2[i * m + r];
            if chosen.contains(&c) || !d2.is_finite() || d2 > (1.0 + epsilon) * own_d2 {
                continue;
            }
            let cj = &self.centroids[c as usize * dim..(c as usize + 1) * dim];
            let rng_ok = chosen.iter().all(|&o| {
                let co = &self.centroids[o as usize * dim..(o as usize + 1) * dim];
                let cc: f32 = co.iter().zip(cj).map(|(a, b)| (a - b) * (a - b)).sum();
                d2 < cc
            });
            if rng_ok {
                chosen.push(c);
            }
        }
        chosen
    }
}

/// Second level of a hierarchical clustering: groups of lists with their centroids.
#[derive(Clone, Debug, Default)]
pub struct Hierarchy {
    pub group_centroids: Vec<f32>,
    /// List ids ordered by group, and `groups + 1` offsets into that order.
    pub group_lists: Vec<u32>,
    pub group_start: Vec<u32>,
}

/// Two-level balanced k-means for many lists: `ceil(k / lists_per_group)` groups first, then
/// each group's points into lists of about `n / k` members. Cost is
/// `O(n · d · (groups + lists_per_group))` per iteration instead of `O(n · d · k)`, which is what
/// makes contexts of 128K-1M keys buildable. Replica candidates stay within a point's group.
pub fn hierarchical_kmeans(
    points: &[f32],
    dim: usize,
    k: usize,
    cfg: &KMeansConfig,
    lists_per_group: usize,
    seed: u64,
) -> (KMeansOutput, Hierarchy) {
    use rand::SeedableRng;
    let n = points.len() / dim;
    let k = k.clamp(1, n.max(1));
    let groups = k.div_ceil(lists_per_group.max(2)).max(1);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let top_cfg = KMeansConfig {
        iters: cfg.iters,
        train_points: cfg.train_points.min(groups * 256).max(groups),
        balance_penalty: cfg.balance_penalty,
        capacity: (n.div_ceil(groups) * 3).div_ceil(2),
    };
    let top = balanced_kmeans(points, dim, groups, &top_cfg, &mut rng);
    let mut members: Vec<Vec<usize>> = vec![Vec::new(); top.k];
    for (i, &g) in top.assign.iter().enumerate() {
        members[g as usize].push(i);
    }
    let per_list = n as f64 / k as f64;
    let subs: Vec<KMeansOutput> = members
        .par_iter()
        .enumerate()
        .map(|(g, idx)| {
            let sub_points: Vec<f32> = idx
                .iter()
                .flat_map(|&i| points[i * dim..(i + 1) * dim].iter().copied())
                .collect();
            let kg = ((idx.len() as f64 / per_list).round() as usize).max(1);
            let sub_cfg = KMeansConfig {
                train_points: cfg.train_points.min(idx.len()),
                ..cfg.clone()
            };
            let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ ((g as u64 + 1) << 20));
            balanced_kmeans(&sub_points, dim, kg, &sub_cfg, &mut r)
        })
        .collect();

    let m = CANDIDATES_PER_POINT;
    let mut centroids = Vec::new();
    let mut assign = vec![0u32; n];
    let mut candidates = vec![0u32; n * m];
    let mut candidate_d2 = vec![f32::INFINITY; n * m];
    let mut hierarchy = Hierarchy {
        group_centroids: Vec::new(),
        group_lists: Vec::new(),
        group_start: vec![0],
    };
    let mut offset = 0u32;
    for (g, (idx, sub)) in members.iter().zip(&subs).enumerate() {
        if idx.is_empty() {
            continue;
        }
        let sm = sub.m();
        for (local, &i) in idx.iter().enumerate() {
            assign[i] = offset + sub.assign[local];
            for r in 0..m {
                if r < sm {
                    candidates[i * m + r] = offset + sub.candidates[local * sm + r];
                    candidate_d2[i * m + r] = sub.candidate_d2[local * sm + r];
                } else {
                    candidates[i * m + r] = assign[i];
                }
            }
        }
        centroids.extend_from_slice(&sub.centroids);
        hierarchy
            .group_centroids
            .extend_from_slice(&top.centroids[g * dim..(g + 1) * dim]);
        hierarchy.group_lists.extend(offset..offset + sub.k as u32);
        offset += sub.k as u32;
        hierarchy.group_start.push(offset);
    }
    (
        KMeansOutput {
            dim,
            k: offset as usize,
            centroids,
            assign,
            candidates,
            candidate_d2,
        },
        hierarchy,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn blobs(n_per: usize, centers: &[[f32; 2]]) -> Vec<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let mut out = Vec::new();
        for c in centers {
            for _ in 0..n_per {
                out.push(c[0] + rng.random::<f32>() * 0.1);
                out.push(c[1] + rng.random::<f32>() * 0.1);
            }
        }
        out
    }

    #[test]
    fn separates_well_separated_blobs_and_respects_capacity() {
        let pts = blobs(50, &[[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]]);
        let cfg = KMeansConfig {
            iters: 10,
            train_points: 200,
            balance_penalty: 0.5,
            capacity: 60,
        };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let out = balanced_kmeans(&pts, 2, 4, &cfg, &mut rng);
        assert_eq!(out.k, 4);
        let mut sizes = vec![0; out.k];
        for &a in &out.assign {
            sizes[a as usize] += 1;
        }
        assert!(sizes.iter().all(|&s| s <= 60 && s > 0), "{sizes:?}");
        // Every blob maps to a single cluster.
        for b in 0..4 {
            let a0 = out.assign[b * 50];
            assert!(out.assign[b * 50..(b + 1) * 50].iter().all(|&a| a == a0));
        }
    }

    #[test]
    fn capacity_forces_balance() {
        let pts = blobs(100, &[[0.0, 0.0]]);
        let cfg = KMeansConfig {
            iters: 5,
            train_points: 100,
            balance_penalty: 1.0,
            capacity: 30,
        };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let out = balanced_kmeans(&pts, 2, 4, &cfg, &mut rng);
        let mut sizes = vec![0; out.k];
        for &a in &out.assign {
            sizes[a as usize] += 1;
        }
        assert!(sizes.iter().all(|&s| s <= 30), "{sizes:?}");
        assert_eq!(sizes.iter().sum::<usize>(), 100);
    }

    #[test]
    fn hierarchical_covers_every_point_once_with_consistent_groups() {
        let centers: Vec<[f32; 2]> = (0..16)
            .map(|i| [(i % 4) as f32 * 5.0, (i / 4) as f32 * 5.0])
            .collect();
        let pts = blobs(40, &centers);
        let cfg = KMeansConfig {
            iters: 6,
            train_points: 640,
            balance_penalty: 0.5,
            capacity: 20,
        };
        let (out, h) = hierarchical_kmeans(&pts, 2, 40, &cfg, 8, 11);
        assert_eq!(out.assign.len(), 640);
        assert!(out.assign.iter().all(|&a| (a as usize) < out.k));
        let mut sizes = vec![0; out.k];
        for &a in &out.assign {
            sizes[a as usize] += 1;
        }
        assert!(sizes.iter().all(|&s| s > 0 && s <= 20), "{sizes:?}");
        // Groups partition the lists.
        let mut seen = h.group_lists.clone();
        seen.sort_unstable();
        assert_eq!(seen, (0..out.k as u32).collect::<Vec<_>>());
        assert_eq!(*h.group_start.last().unwrap() as usize, out.k);
        assert_eq!(h.group_centroids.len(), (h.group_start.len() - 1) * 2);
        for i in 0..640 {
            assert_eq!(out.replica_lists(i, 1, 0.0), vec![out.assign[i]]);
        }
    }

    #[test]
    fn replicas_are_capped_and_start_with_own_list() {
        let pts = blobs(40, &[[0.0, 0.0], [1.0, 0.0], [0.5, 0.8]]);
        let cfg = KMeansConfig {
            iters: 5,
            train_points: 120,
            balance_penalty: 0.0,
            capacity: 120,
        };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let out = balanced_kmeans(&pts, 2, 3, &cfg, &mut rng);
        for i in 0..120 {
            let r = out.replica_lists(i, 2, 10.0);
            assert_eq!(r[0], out.assign[i]);
            assert!(r.len() <= 2);
            let r1 = out.replica_lists(i, 1, 10.0);
            assert_eq!(r1, vec![out.assign[i]]);
        }
    }
}
