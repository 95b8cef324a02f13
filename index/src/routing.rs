//! Routing vectors fitted to the prefill queries. Search probes lists in the order of `q·c`, and
//! the mean `c` of a list's keys ranks it by its average member where a query cares about its
//! best ones: a spread-out list whose best member a query scores highly can sit below a tight
//! list with a better mean. Each list's vector is moved by the ridge regression, over the train
//! queries, of what the mean misses of the list's softmax-weighted score:
//!
//! `r = c + argmin_u Σ_q (lme(q) − q·c − q·u)² + λ|u|²`,  `lme(q) = ln(mean_k exp(s·q·k)) / s`
//!
//! (`s` the softmax scale), and the ridge (the query metric's, `QueryMetric::solve`) keeps `r` at
//! `c` in directions queries do not use. `r` then stands in for the centroid everywhere search
//! uses one, so the index layout does not change:
//! - list order: `lme` lies between the mean and the best member score and ranks lists as well
//!   as a fit to the best member does (gemma3-devil-16k: mass 0.7998 against 0.7999);
//! - the remainder estimate: `n·exp(s·q·r)` is the fitted `Σ_k exp(s·q·k)` of an unprobed list,
//!   which a fit to the best member would overstate (its output error rose from 0.06 to 0.17);
//! - the residual codes' base: codes encode `k − r`, which is as exact as `k − c`.

use rayon::prelude::*;

use crate::metric::QueryMetric;
use crate::params::ROUTE_FIT_PAIRS;

/// `lists × dim` routing vectors: `centroids` moved as the module comment says. `queries` are
/// the train queries (`rows × dim`) `metric` was fitted to (thinned past `ROUTE_FIT_PAIRS`); `lists[j]` are list `j`'s members
/// (token ids into `keys`, `tokens × dim`). A list without members keeps its centroid.
pub fn fit_routes(
    keys: &[f32],
    dim: usize,
    lists: &[Vec<u32>],
    centroids: &[f32],
    queries: &[f32],
    metric: &QueryMetric,
    softmax_scale: f32,
) -> Vec<f32> {
    let all_rows = queries.len() / dim.max(1);
    let tokens = keys.len() / dim.max(1);
    if all_rows == 0 || dim == 0 || tokens == 0 {
        return centroids.to_vec();
    }
    // Every `stride`-th train query, to keep the work within `ROUTE_FIT_PAIRS`.
    let stride = (all_rows * tokens).div_ceil(ROUTE_FIT_PAIRS).max(1);
    let thinned: Vec<f32>;
    let queries = if stride > 1 {
        thinned = queries
            .chunks_exact(dim)
            .step_by(stride)
            .flatten()
            .copied()
            .collect();
        &thinned[..]
    } else {
        queries
    };
    let rows = queries.len() / dim;
    // Per list, over the queries: E[q · (best member score − centroid score)].
    let moved: Vec<Vec<f32>> = lists
        .par_iter()
        .enumerate()
        .map_init(Vec::new, |scratch: &mut Vec<f32>, (j, members)| {
            let c = &centroids[j * dim..(j + 1) * dim];
            if members.is_empty() {
                return c.to_vec();
            }
            let m = members.len();
            let mut gathered = Vec::with_capacity(m * dim);
            for &t in members {
                gathered.extend_from_slice(&keys[t as usize * dim..(t as usize + 1) * dim]);
            }
            scratch.clear();
            scratch.resize(rows * m, 0.0);
            gemm_rows_by_rows(queries, &gathered, rows, m, dim, scratch);
            let mut b = vec![0f64; dim];
            for (q, scores) in queries.chunks_exact(dim).zip(scratch.chunks_exact(m)) {
                // ln(mean exp(s·q·k)) / s, from the best member so that nothing overflows.
                let best = crate::linalg::max_of(scores);
                let sum: f32 = scores
                    .iter()
                    .map(|&x| (softmax_scale * (x - best)).exp())
                    .sum();
                let target = best + (sum / m as f32).ln() / softmax_scale;
                let miss = target - crate::linalg::dot(q, c);
                for (bi, &qi) in b.iter_mut().zip(q) {
                    *bi += (miss * qi) as f64;
                }
            }
            b.iter_mut().for_each(|v| *v /= rows as f64);
            let u = metric.solve(&b);
            c.iter().zip(&u).map(|(&ci, &ui)| ci + ui as f32).collect()
        })
        .collect();
    moved.concat()
}

/// `out[i][j] = a_i · b_j` for the rows of `a` (`n × dim`) and `b` (`m × dim`), `out` `n × m`.
fn gemm_rows_by_rows(a: &[f32], b: &[f32], n: usize, m: usize, dim: usize, out: &mut [f32]) {
    debug_assert!(a.len() >= n * dim && b.len() >= m * dim && out.len() >= n * m);
    // SAFETY: the slices hold at least n × dim, m × dim and n × m elements (checked above in
    // debug builds; `fit_routes`, the one caller, sizes them so), and the strides keep every
    // access within them: a is row-major n × dim, b is read as its transpose (dim × m, column
    // stride dim), out is row-major n × m.
    unsafe {
        matrixmultiply::sgemm(
            n,
            dim,
            m,
            1.0,
            a.as_ptr(),
            dim as isize,
            1,
            b.as_ptr(),
            1,
            dim as isize,
            0.0,
            out.as_mut_ptr(),
            m as isize,
            1,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemm_matches_dots() {
        let (n, m, dim) = (5, 3, 7);
        let a: Vec<f32> = (0..n * dim).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..m * dim).map(|i| (i as f32 * 0.91).cos()).collect();
        let mut out = vec![0f32; n * m];
        gemm_rows_by_rows(&a, &b, n, m, dim, &mut out);
        for i in 0..n {
            for j in 0..m {
                let d = crate::linalg::dot(&a[i * dim..(i + 1) * dim], &b[j * dim..(j + 1) * dim]);
                assert!((out[i * m + j] - d).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn a_list_whose_best_member_outscores_its_mean_is_routed_higher() {
        // Two lists with the same mean (1, 0): list 0 holds it twice, list 1 holds (-1, 0) and
        // (3, 0). The queries point mostly along +x, where list 1's best member (3, 0) beats
        // the mean by 2·q_x: its routing vector moves toward (3, 0), list 0's stays put.
        let keys = [1.0, 0.0, 1.0, 0.0, -1.0, 0.0, 3.0, 0.0];
        let lists = vec![vec![0, 1], vec![2, 3]];
        let centroids = [1.0, 0.0, 1.0, 0.0];
        let queries = [1.0, 0.1, 2.0, -0.1, 1.5, 0.2, 0.5, -0.2];
        let metric = QueryMetric::fit(&queries, 2, 1e-3).unwrap();
        let r = fit_routes(&keys, 2, &lists, &centroids, &queries, &metric, 1.0);
        assert!((r[0] - 1.0).abs() < 1e-4 && r[1].abs() < 1e-4, "{r:?}");
        assert!(r[2] > 2.5 && r[2] < 3.1, "{r:?}");
        // A list without members keeps its centroid.
        let r = fit_routes(
            &keys,
            2,
            &[vec![], vec![2, 3]],
            &centroids,
            &queries,
            &metric,
            1.0,
        );
        assert_eq!(&r[..2], &centroids[..2]);
    }
}
