//! Attention on the CPU in f32 (values stored f16 on disk are widened when read), written so
//! that the accumulation vectorises: logits -> softmax weights -> axpy of value rows.

use crate::attention::Attended;
use strata_index::linalg::dot;

/// Attention over `logits` (already scaled) and their value rows (`logits.len() × dim`).
pub fn attend_f32(logits: &[f32], values: &[f32], dim: usize) -> Attended {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return Attended {
            output: vec![0.0; dim],
            lse: f32::NEG_INFINITY,
        };
    }
    let mut out = vec![0f32; dim];
    let mut denom = 0f32;
    for (l, v) in logits.iter().zip(values.chunks_exact(dim)) {
        let w = (l - max).exp();
        denom += w;
        for (o, x) in out.iter_mut().zip(v) {
            *o = w.mul_add(*x, *o);
        }
    }
    let inv = 1.0 / denom;
    out.iter_mut().for_each(|o| *o *= inv);
    Attended {
        output: out,
        lse: max + denom.ln(),
    }
}

/// Exact attention of the query heads of one KV head's group (GQA) over the same `keys` and
/// `values` (`n × dim` each): one pass over the keys scores every query against each key row
/// while it is in cache, one pass over the values accumulates every query's output. Memory
/// traffic is one read of K and V for the whole group, not one per query head.
pub fn attend_group_f32(
    keys: &[f32],
    values: &[f32],
    queries: &[&[f32]],
    scale: f32,
    dim: usize,
) -> Vec<Attended> {
    // A kernel, like `attend_f32`: callers (the engine's step, the bench) pass validated shapes.
    debug_assert!(dim > 0 && keys.len().is_multiple_of(dim) && values.len() == keys.len());
    debug_assert!(queries.iter().all(|q| q.len() == dim));
    let n = keys.len() / dim.max(1);
    let g = queries.len();
    // Query-major logits, turned into unnormalised weights in place.
    let mut weights = vec![0f32; g * n];
    for (i, k) in keys.chunks_exact(dim).enumerate() {
        for (qi, q) in queries.iter().enumerate() {
            weights[qi * n + i] = scale * dot(k, q);
        }
    }
    let mut maxes = Vec::with_capacity(g);
    let mut denoms = Vec::with_capacity(g);
    for w in weights.chunks_mut(n.max(1)).take(g) {
        let max = w.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut denom = 0f32;
        if max.is_finite() {
            for x in w.iter_mut() {
                *x = (*x - max).exp();
                denom += *x;
            }
        }
        maxes.push(max);
        denoms.push(denom);
    }
    let mut outs = vec![vec![0f32; dim]; g];
    for (i, v) in values.chunks_exact(dim).enumerate().take(n) {
        for (qi, out) in outs.iter_mut().enumerate() {
            let w = weights[qi * n + i];
            for (o, x) in out.iter_mut().zip(v) {
                *o = w.mul_add(*x, *o);
            }
        }
    }
    outs.into_iter()
        .zip(maxes.iter().zip(&denoms))
        .map(|(mut output, (&max, &denom))| {
            if !max.is_finite() || denom <= 0.0 {
                return Attended {
                    output: vec![0.0; dim],
                    lse: f32::NEG_INFINITY,
                };
            }
            let inv = 1.0 / denom;
            output.iter_mut().for_each(|o| *o *= inv);
            Attended {
                output,
                lse: max + denom.ln(),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::attend_logits;

    #[test]
    fn matches_the_f64_reference() {
        let logits: Vec<f32> = (0..300).map(|i| ((i * 37) % 101) as f32 * 0.05).collect();
        let values: Vec<f32> = (0..300 * 8).map(|i| ((i * 13) % 17) as f32 - 8.0).collect();
        let a = attend_f32(&logits, &values, 8);
        let b = attend_logits(&logits, &values, 8);
        assert!((a.lse - b.lse).abs() < 1e-4);
        for (x, y) in a.output.iter().zip(&b.output) {
            assert!((x - y).abs() < 1e-4, "{x} vs {y}");
        }
    }

    #[test]
    fn group_attention_matches_one_query_at_a_time() {
        let dim = 8;
        let keys: Vec<f32> = (0..200 * dim)
            .map(|i| ((i * 29) % 23) as f32 * 0.1 - 1.0)
            .collect();
        let values: Vec<f32> = (0..200 * dim)
            .map(|i| ((i * 13) % 17) as f32 - 8.0)
            .collect();
        let qs: Vec<Vec<f32>> = (0..3)
            .map(|h| {
                (0..dim)
                    .map(|d| ((h * 7 + d * 3) % 5) as f32 * 0.3 - 0.6)
                    .collect()
            })
            .collect();
        let refs: Vec<&[f32]> = qs.iter().map(|q| q.as_slice()).collect();
        let group = attend_group_f32(&keys, &values, &refs, 0.5, dim);
        assert_eq!(group.len(), 3);
        for (q, got) in qs.iter().zip(&group) {
            let logits: Vec<f32> = keys.chunks_exact(dim).map(|k| 0.5 * dot(k, q)).collect();
            let want = attend_logits(&logits, &values, dim);
            assert!((got.lse - want.lse).abs() < 1e-4);
            for (x, y) in got.output.iter().zip(&want.output) {
                assert!((x - y).abs() < 1e-4, "{x} vs {y}");
            }
        }
        // No keys: neutral, like attend_f32.
        let empty = attend_group_f32(&[], &[], &refs, 0.5, dim);
        assert!(empty
            .iter()
            .all(|a| a.lse == f32::NEG_INFINITY && a.output == vec![0.0; dim]));
    }
}
