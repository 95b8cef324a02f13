//! The query-aware clustering metric: keys are compared by how differently real queries score
//! them, `|Q(k1 − k2)|² = (k1 − k2)ᵀ M (k1 − k2)` with `M = E[q qᵀ]` over prefill queries. With
//! `M = L Lᵀ` (Cholesky), that is the Euclidean distance between `Lᵀk1` and `Lᵀk2`, so the
//! ordinary k-means runs unchanged on the transformed keys.
//!
//! Why: a query attends to keys with a high `q·k`. Key-space k-means spends its resolution on
//! directions where keys vary, which are often directions queries ignore; the top keys of a query
//! then scatter over many lists. Under `M`, keys that real queries score alike share a list
//! (the A²ATS / RetrievalAttention observation that queries and keys are distributed differently).

use rayon::prelude::*;

/// `Lᵀ` rows of a Cholesky factor `M + ridge·(trace/dim)·I = L Lᵀ`, stored as the `dim × dim`
/// row-major lower-triangular `L`.
pub struct QueryMetric {
    dim: usize,
    lower: Vec<f64>,
}

impl QueryMetric {
    /// Fits the metric to `queries` (`rows × dim`, row-major). None when there are fewer rows
    /// than dimensions (M would be rank-deficient and the ridge alone would weigh most
    /// directions) or the queries carry no energy (all zero): plain key distance is used then.
    pub fn fit(queries: &[f32], dim: usize, ridge: f32) -> Option<QueryMetric> {
        let rows = queries.len() / dim.max(1);
        if dim == 0 || rows < dim {
            return None;
        }
        let mut m = vec![0f64; dim * dim];
        for q in queries.chunks_exact(dim) {
            for i in 0..dim {
                let qi = q[i] as f64;
                for j in 0..=i {
                    m[i * dim + j] += qi * q[j] as f64;
                }
            }
        }
        let trace: f64 = (0..dim).map(|i| m[i * dim + i]).sum::<f64>() / rows as f64;
        if !(trace.is_finite() && trace > 0.0) {
            return None;
        }
        let shift = ridge as f64 * trace / dim as f64;
        for i in 0..dim {
            for j in 0..=i {
                m[i * dim + j] /= rows as f64;
            }
            m[i * dim + i] += shift;
        }
        // Cholesky, lower triangle in place. The ridge keeps every pivot positive.
        for j in 0..dim {
            let mut d = m[j * dim + j];
            for k in 0..j {
                d -= m[j * dim + k] * m[j * dim + k];
            }
            if !(d.is_finite() && d > 0.0) {
                return None;
            }
            let d = d.sqrt();
            m[j * dim + j] = d;
            for i in j + 1..dim {
                let mut s = m[i * dim + j];
                for k in 0..j {
                    s -= m[i * dim + k] * m[j * dim + k];
                }
                m[i * dim + j] = s / d;
            }
        }
        for i in 0..dim {
            for j in i + 1..dim {
                m[i * dim + j] = 0.0;
            }
        }
        Some(QueryMetric { dim, lower: m })
    }

    /// `Lᵀk` for every key (`rows × dim`): Euclidean distances between the results are the
    /// metric's distances between the keys.
    pub fn transform(&self, keys: &[f32]) -> Vec<f32> {
        let dim = self.dim;
        let mut out = vec![0f32; keys.len()];
        keys.par_chunks_exact(dim)
            .zip(out.par_chunks_exact_mut(dim))
            .for_each(|(k, x)| {
                for (j, xj) in x.iter_mut().enumerate() {
                    // (Lᵀk)_j = Σ_{i ≥ j} L[i][j] k_i
                    let mut s = 0f64;
                    for (i, &ki) in k.iter().enumerate().skip(j) {
                        s += self.lower[i * dim + j] * ki as f64;
                    }
                    *xj = s as f32;
                }
            });
        out
    }

    /// `x` with `(M + ridge) x = b`: the ridge regression of a target on the queries the metric
    /// was fitted to, given `b = E[q·target]` (see `routing`).
    pub fn solve(&self, b: &[f64]) -> Vec<f64> {
        let dim = self.dim;
        let l = &self.lower;
        // L y = b, then Lᵀ x = y.
        let mut y = vec![0f64; dim];
        for i in 0..dim {
            let s: f64 = (0..i).map(|k| l[i * dim + k] * y[k]).sum();
            y[i] = (b[i] - s) / l[i * dim + i];
        }
        let mut x = vec![0f64; dim];
        for i in (0..dim).rev() {
            let s: f64 = (i + 1..dim).map(|k| l[k * dim + i] * x[k]).sum();
            x[i] = (y[i] - s) / l[i * dim + i];
        }
        x
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transformed_distance_is_the_query_energy_of_the_difference() {
        // Queries along x only: keys differing along y are close, along x far.
        let queries = [1.0, 0.0, 2.0, 0.0, -1.5, 0.0];
        let m = QueryMetric::fit(&queries, 2, 1e-3).unwrap();
        let keys = [0.0, 0.0, 0.0, 5.0, 1.0, 0.0];
        let x = m.transform(&keys);
        let d = |a: usize, b: usize| -> f32 {
            (0..2).map(|i| (x[a * 2 + i] - x[b * 2 + i]).powi(2)).sum()
        };
        // E[q qᵀ] along x is (1 + 4 + 2.25) / 3 ≈ 2.417.
        assert!((d(0, 2) - 2.4167).abs() < 0.01, "{}", d(0, 2));
        // Along y only the ridge remains: 25 · 1e-3 · trace/2.
        assert!(d(0, 1) < 0.05, "{}", d(0, 1));
    }

    #[test]
    fn solve_inverts_the_regularised_second_moment() {
        let queries = [1.0, 0.5, 2.0, -1.0, -1.5, 0.25, 0.5, 3.0];
        let m = QueryMetric::fit(&queries, 2, 1e-3).unwrap();
        let x = m.solve(&[0.7, -0.2]);
        // (M + shift) x, with M = E[q qᵀ] and shift = 1e-3 · trace / 2, gives b back.
        let rows = 4.0;
        let mut mm = [0f64; 4];
        for q in queries.chunks_exact(2) {
            for i in 0..2 {
                for j in 0..2 {
                    mm[i * 2 + j] += (q[i] * q[j]) as f64 / rows;
                }
            }
        }
        let shift = 1e-3 * (mm[0] + mm[3]) / 2.0;
        let b0 = (mm[0] + shift) * x[0] + mm[1] * x[1];
        let b1 = mm[2] * x[0] + (mm[3] + shift) * x[1];
        assert!(
            (b0 - 0.7).abs() < 1e-9 && (b1 + 0.2).abs() < 1e-9,
            "{b0} {b1}"
        );
    }

    #[test]
    fn too_few_or_zero_queries_give_no_metric() {
        assert!(QueryMetric::fit(&[], 4, 1e-3).is_none());
        assert!(QueryMetric::fit(&[0.0; 16], 4, 1e-3).is_none());
        // Fewer queries than dimensions.
        assert!(QueryMetric::fit(&[1.0; 12], 4, 1e-3).is_none());
    }
}
