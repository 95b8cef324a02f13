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
use crate::params::{ROUTE_FIT_MIN_ROWS_PER_DIM, ROUTE_FIT_PAIRS};

/// `lists × dim` routing vectors: `centroids` moved as the module comment says. `queries` are
/// the train queries (`rows × dim`) `metric` was fitted to, thinned here as `fit_stride` says
/// (no fit at all leaves every centroid as it is); `lists[j]` are list `j`'s members (token ids
/// into `keys`, `tokens × dim`). A list without members keeps its centroid.
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
    let Some(stride) = fit_stride(all_rows, tokens, dim) else {
        return centroids.to_vec();
    };
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
    // Lists in batches, each one product of the queries with all of its members' keys.
    let batches: Vec<std::ops::Range<usize>> = (0..lists.len())
        .step_by(LISTS_PER_PRODUCT)
        .map(|a| a..(a + LISTS_PER_PRODUCT).min(lists.len()))
        .collect();
    let moved: Vec<Vec<f32>> = batches
        .par_iter()
        .map_init(Vec::new, |scores: &mut Vec<f32>, batch| {
            let batch_lists = &lists[batch.clone()];
            let mut starts = vec![0usize];
            let mut gathered = Vec::new();
            for members in batch_lists {
                for &t in members {
                    gathered.extend_from_slice(&keys[t as usize * dim..(t as usize + 1) * dim]);
                }
                starts.push(gathered.len() / dim);
            }
            let (n_lists, m) = (batch_lists.len(), gathered.len() / dim);
            let c = &centroids[batch.start * dim..batch.end * dim];
            // What each query's centroid score misses of each list's target, rows × lists.
            let mut miss = vec![0f32; rows * n_lists];
            product(
                Mat::rows(queries, rows, dim),
                Mat::rows(c, n_lists, dim).transposed(),
                &mut miss,
            );
            if m > 0 {
                scores.clear();
                scores.resize(rows * m, 0.0);
                product(
                    Mat::rows(queries, rows, dim),
                    Mat::rows(&gathered, m, dim).transposed(),
                    scores,
                );
                let mut best = vec![0f32; n_lists];
                for (row, miss_row) in scores
                    .chunks_exact_mut(m)
                    .zip(miss.chunks_exact_mut(n_lists))
                {
                    // ln(mean exp(s·q·k)) / s per list, from its best member so that nothing
                    // overflows: all of a row's exponentials in one vectorised sweep.
                    for j in 0..n_lists {
                        let seg = &mut row[starts[j]..starts[j + 1]];
                        if seg.is_empty() {
                            continue;
                        }
                        best[j] = crate::linalg::max_of(seg);
                        seg.iter_mut()
                            .for_each(|x| *x = softmax_scale * (*x - best[j]));
                    }
                    crate::simd::exp_in_place(row);
                    for j in 0..n_lists {
                        let seg = &row[starts[j]..starts[j + 1]];
                        miss_row[j] = if seg.is_empty() {
                            0.0
                        } else {
                            let mean = crate::linalg::sum_of(seg) / seg.len() as f32;
                            best[j] + mean.ln() / softmax_scale - miss_row[j]
                        };
                    }
                }
            } else {
                miss.fill(0.0);
            }
            // E[q · miss] per list (dim × lists), then the ridge solve.
            let mut b = vec![0f32; dim * n_lists];
            product(
                Mat::rows(queries, rows, dim).transposed(),
                Mat::rows(&miss, rows, n_lists),
                &mut b,
            );
            let mut out = Vec::with_capacity(n_lists * dim);
            for j in 0..n_lists {
                let cj = &c[j * dim..(j + 1) * dim];
                if batch_lists[j].is_empty() {
                    out.extend_from_slice(cj);
                    continue;
                }
                let bj: Vec<f64> = (0..dim)
                    .map(|d| b[d * n_lists + j] as f64 / rows as f64)
                    .collect();
                let moved: Vec<f32> = cj
                    .iter()
                    .zip(metric.solve(&bj))
                    .map(|(&ci, ui)| ci + ui as f32)
                    .collect();
                // Queries large enough to overflow a score leave the list at its mean rather
                // than write a vector no search could use.
                if moved.iter().all(|v| v.is_finite()) {
                    out.extend(moved);
                } else {
                    out.extend_from_slice(cj);
                }
            }
            out
        })
        .collect();
    moved.concat()
}

/// Whether a head of `tokens` keys with `rows` train queries gets fitted routing vectors, and
/// if so every how many train queries the fit uses: thinned evenly to `ROUTE_FIT_PAIRS` (query,
/// key) pairs, and none when fewer than `ROUTE_FIT_MIN_ROWS_PER_DIM` queries per dimension would
/// remain (a regression on so few would move the vectors by its noise; the lists keep their
/// key means).
pub fn fit_stride(rows: usize, tokens: usize, dim: usize) -> Option<usize> {
    if rows == 0 || tokens == 0 || dim == 0 {
        return None;
    }
    let stride = (rows * tokens).div_ceil(ROUTE_FIT_PAIRS).max(1);
    (rows.div_ceil(stride) >= ROUTE_FIT_MIN_ROWS_PER_DIM * dim).then_some(stride)
}

/// Lists whose members are scored against the train queries in one matrix product: large
/// enough for the product to run near the machine's arithmetic peak, small enough that its
/// result (`rows × members` floats) stays within a few MiB.
const LISTS_PER_PRODUCT: usize = 16;

/// A matrix view: `rows × cols` elements of `data`, element (i, j) at `i·row_stride +
/// j·col_stride`.
#[derive(Clone, Copy)]
struct Mat<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a> Mat<'a> {
    /// Row-major `rows × cols`.
    fn rows(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Mat {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    fn transposed(self) -> Self {
        Mat {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }

    /// Whether every element lies inside `data`.
    fn in_bounds(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride
                < self.data.len()
    }
}

/// `out = a · b`, `out` row-major `a.rows × b.cols`.
fn product(a: Mat, b: Mat, out: &mut [f32]) {
    assert!(a.cols == b.rows && a.in_bounds() && b.in_bounds());
    assert!(out.len() >= a.rows * b.cols);
    if a.rows == 0 || b.cols == 0 {
        return;
    }
    // SAFETY: the asserts above keep every element matrixmultiply reads (within `a` and `b`
    // by their shapes and strides) inside its slice and every element it writes inside `out`
    // (row-major, `a.rows × b.cols`); the three slices are distinct borrows, so `out` does not
    // alias the inputs.
    unsafe {
        matrixmultiply::sgemm(
            a.rows,
            a.cols,
            b.cols,
            1.0,
            a.data.as_ptr(),
            a.row_stride as isize,
            a.col_stride as isize,
            b.data.as_ptr(),
            b.row_stride as isize,
            b.col_stride as isize,
            0.0,
            out.as_mut_ptr(),
            b.cols as isize,
            1,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn products_match_dots_in_every_orientation() {
        let (n, m, dim) = (5, 3, 7);
        let a: Vec<f32> = (0..n * dim).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..m * dim).map(|i| (i as f32 * 0.91).cos()).collect();
        let mut out = vec![0f32; n * m];
        product(
            Mat::rows(&a, n, dim),
            Mat::rows(&b, m, dim).transposed(),
            &mut out,
        );
        let row = |x: &[f32], i: usize| x[i * dim..(i + 1) * dim].to_vec();
        for i in 0..n {
            for j in 0..m {
                let d = crate::linalg::dot(&row(&a, i), &row(&b, j));
                assert!((out[i * m + j] - d).abs() < 1e-5);
            }
        }
        // aᵀ · out: dim × m, entry (d, j) = Σ_i a[i][d] · out[i][j].
        let mut back = vec![0f32; dim * m];
        product(
            Mat::rows(&a, n, dim).transposed(),
            Mat::rows(&out, n, m),
            &mut back,
        );
        for d in 0..dim {
            for j in 0..m {
                let e: f32 = (0..n).map(|i| a[i * dim + d] * out[i * m + j]).sum();
                assert!((back[d * m + j] - e).abs() < 1e-4);
            }
        }
    }

    #[test]
    fn the_fit_thins_queries_to_its_budget_and_skips_heads_with_too_few() {
        // Gemma-3 at 16K tokens: every one of 4,096 queries.
        assert_eq!(fit_stride(4096, 16384, 256), Some(1));
        // 128K tokens, head dim 128: every 8th, 512 = 4 per dimension.
        assert_eq!(fit_stride(4096, 131072, 128), Some(8));
        // 1M tokens: 64 would remain, too few for 128 dimensions.
        assert_eq!(fit_stride(4096, 1 << 20, 128), None);
        assert_eq!(fit_stride(0, 100, 4), None);
    }

    #[test]
    #[should_panic]
    fn a_product_past_its_slices_is_refused() {
        let a = [1.0f32; 6];
        let mut out = [0f32; 4];
        product(Mat::rows(&a, 2, 3), Mat::rows(&a, 3, 3), &mut out);
    }

    #[test]
    fn a_list_whose_best_member_outscores_its_mean_is_routed_higher() {
        // Two lists with the same mean (1, 0): list 0 holds it twice, list 1 holds (-1, 0) and
        // (3, 0). The queries point mostly along +x, where list 1's best member (3, 0) beats
        // the mean by 2·q_x: its routing vector moves toward (3, 0), list 0's stays put.
        let keys = [1.0, 0.0, 1.0, 0.0, -1.0, 0.0, 3.0, 0.0];
        let lists = vec![vec![0, 1], vec![2, 3]];
        let centroids = [1.0, 0.0, 1.0, 0.0];
        // Eight queries: the fit needs `ROUTE_FIT_MIN_ROWS_PER_DIM` per dimension.
        let queries = [
            1.0, 0.1, 2.0, -0.1, 1.5, 0.2, 0.5, -0.2, 1.2, 0.0, 0.8, 0.3, 1.7, -0.3, 0.9, 0.1,
        ];
        let metric = QueryMetric::fit(&queries, 2, 1e-3).unwrap();
        let r = fit_routes(&keys, 2, &lists, &centroids, &queries, &metric, 1.0);
        assert!((r[0] - 1.0).abs() < 1e-4 && r[1].abs() < 1e-4, "{r:?}");
        assert!(r[2] > 2.5 && r[2] < 3.1, "{r:?}");
        // A list without members keeps its centroid; too few queries move nothing.
        let few = fit_routes(&keys, 2, &lists, &centroids, &queries[..6], &metric, 1.0);
        assert_eq!(few, centroids);
        // Scores that overflow f32 leave the lists at their means.
        let huge: Vec<f32> = queries.iter().map(|q| q * 1e36).collect();
        let metric = QueryMetric::fit(&huge, 2, 1e-3).unwrap();
        let r = fit_routes(&keys, 2, &lists, &centroids, &huge, &metric, 1.0);
        assert_eq!(r, centroids);
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
