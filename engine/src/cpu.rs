//! Attention on the CPU in f32 (values stored f16 on disk are widened when read), written so
//! that the accumulation vectorises: logits -> softmax weights -> axpy of value rows.

use crate::attention::Attended;
use strata_index::linalg::dot;
use strata_index::simd::{dot_f16_bytes, exp_in_place, f16_to_f32};

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
    attend_group_over(
        keys.chunks_exact(dim),
        values.chunks_exact(dim),
        n,
        queries,
        scale,
        dim,
    )
}

/// [`attend_group_f32`] over key and value rows that lie where they are (`(key, value)` pairs,
/// `dim` floats each): the engine's static tokens (sinks, the recent window, the unfolded
/// tail) live in three stores, and are attended without being copied together first.
pub fn attend_group_rows(
    rows: &[(&[f32], &[f32])],
    queries: &[&[f32]],
    scale: f32,
    dim: usize,
) -> Vec<Attended> {
    debug_assert!(rows.iter().all(|(k, v)| k.len() == dim && v.len() == dim));
    debug_assert!(queries.iter().all(|q| q.len() == dim));
    let keys = rows.iter().map(|r| r.0);
    attend_group_over(
        keys,
        rows.iter().map(|r| r.1),
        rows.len(),
        queries,
        scale,
        dim,
    )
}

/// The group attention of [`attend_group_f32`] over `n` f32 key and value rows.
fn attend_group_over<'r>(
    keys: impl Iterator<Item = &'r [f32]>,
    values: impl Iterator<Item = &'r [f32]>,
    n: usize,
    queries: &[&[f32]],
    scale: f32,
    dim: usize,
) -> Vec<Attended> {
    let mut weights = group_logits(keys, n, queries, scale, dot);
    let (maxes, denoms) = softmax_weights(&mut weights, queries.len(), n);
    let mut outs = vec![vec![0f32; dim]; queries.len()];
    for (i, v) in values.enumerate().take(n) {
        accumulate(&mut outs, &weights, n, i, v);
    }
    normalise(outs, &maxes, &denoms, dim)
}

/// [`attend_group_f32`] over keys and values stored as f16 (little-endian bytes, `n × dim × 2`
/// each), as a KV cache holds them: half the memory traffic of f32, each row widened in
/// registers (keys) or once into a small buffer (values).
pub fn attend_group_f16(
    keys: &[u8],
    values: &[u8],
    queries: &[&[f32]],
    scale: f32,
    dim: usize,
) -> Vec<Attended> {
    debug_assert!(dim > 0 && keys.len().is_multiple_of(2 * dim) && values.len() == keys.len());
    debug_assert!(queries.iter().all(|q| q.len() == dim));
    let n = keys.len() / (2 * dim).max(1);
    let mut weights = group_logits(keys.chunks_exact(2 * dim), n, queries, scale, dot_f16_bytes);
    let (maxes, denoms) = softmax_weights(&mut weights, queries.len(), n);
    let mut outs = vec![vec![0f32; dim]; queries.len()];
    let mut row = vec![0f32; dim];
    for (i, v) in values.chunks_exact(2 * dim).enumerate().take(n) {
        f16_to_f32(v, &mut row);
        accumulate(&mut outs, &weights, n, i, &row);
    }
    normalise(outs, &maxes, &denoms, dim)
}

/// The logits `scale·q·k` of the `n` key rows for every query, query-major (`queries.len()`
/// rows of `n`), taken key by key so that each key row is read once for the whole group.
fn group_logits<'k, K: ?Sized + 'k>(
    keys: impl Iterator<Item = &'k K>,
    n: usize,
    queries: &[&[f32]],
    scale: f32,
    dot: impl Fn(&K, &[f32]) -> f32,
) -> Vec<f32> {
    let mut logits = vec![0f32; queries.len() * n];
    for (i, k) in keys.enumerate().take(n) {
        for (qi, q) in queries.iter().enumerate() {
            logits[qi * n + i] = scale * dot(k, q);
        }
    }
    logits
}

/// Turns each query's logits (`g` query-major rows of `n`) into weights `exp(logit − max)` in
/// place, eight at a time; returns each query's max and sum of weights.
fn softmax_weights(weights: &mut [f32], g: usize, n: usize) -> (Vec<f32>, Vec<f32>) {
    let mut maxes = Vec::with_capacity(g);
    let mut denoms = Vec::with_capacity(g);
    for w in weights.chunks_mut(n.max(1)).take(g) {
        let max = w.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut denom = 0f32;
        if max.is_finite() {
            w.iter_mut().for_each(|x| *x -= max);
            exp_in_place(w);
            denom = w.iter().sum();
        }
        maxes.push(max);
        denoms.push(denom);
    }
    (maxes, denoms)
}

/// Adds value row `i` (`v`), weighted, to every query's output.
fn accumulate(outs: &mut [Vec<f32>], weights: &[f32], n: usize, i: usize, v: &[f32]) {
    for (qi, out) in outs.iter_mut().enumerate() {
        let w = weights[qi * n + i];
        for (o, x) in out.iter_mut().zip(v) {
            *o = w.mul_add(*x, *o);
        }
    }
}

/// Divides each output by its sum of weights; a query with nothing to attend is neutral.
fn normalise(outs: Vec<Vec<f32>>, maxes: &[f32], denoms: &[f32], dim: usize) -> Vec<Attended> {
    outs.into_iter()
        .zip(maxes.iter().zip(denoms))
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
        // Rows stored as f16 give what f32 attention over the same rounded rows gives.
        let f16 = |xs: &[f32]| -> Vec<u8> {
            xs.iter()
                .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
                .collect()
        };
        let rounded = |xs: &[f32]| -> Vec<f32> {
            xs.iter()
                .map(|&x| half::f16::from_f32(x).to_f32())
                .collect()
        };
        let want = attend_group_f32(&rounded(&keys), &rounded(&values), &refs, 0.5, dim);
        let halves = attend_group_f16(&f16(&keys), &f16(&values), &refs, 0.5, dim);
        for (h, g) in halves.iter().zip(&want) {
            assert!((h.lse - g.lse).abs() < 1e-5, "{} vs {}", h.lse, g.lse);
            for (x, y) in h.output.iter().zip(&g.output) {
                assert!((x - y).abs() < 1e-5, "{x} vs {y}");
            }
        }
        let empty = attend_group_f16(&[], &[], &refs, 0.5, dim);
        assert!(empty.iter().all(|a| a.lse == f32::NEG_INFINITY));
        // Rows where they lie, in any order, give what the same rows stored together give.
        let order: Vec<usize> = (0..200).map(|i| (i * 37) % 200).collect();
        let rows: Vec<(&[f32], &[f32])> = order
            .iter()
            .map(|&i| {
                (
                    &keys[i * dim..(i + 1) * dim],
                    &values[i * dim..(i + 1) * dim],
                )
            })
            .collect();
        let gathered = |xs: &[f32]| -> Vec<f32> {
            order
                .iter()
                .flat_map(|&i| xs[i * dim..(i + 1) * dim].to_vec())
                .collect()
        };
        let want = attend_group_f32(&gathered(&keys), &gathered(&values), &refs, 0.5, dim);
        let got = attend_group_rows(&rows, &refs, 0.5, dim);
        for (g, w) in got.iter().zip(&want) {
            assert_eq!((g.lse, &g.output), (w.lse, &w.output));
        }
        let empty = attend_group_rows(&[], &refs, 0.5, dim);
        assert!(empty.iter().all(|a| a.lse == f32::NEG_INFINITY));
    }
}
