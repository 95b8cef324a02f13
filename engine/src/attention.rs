//! Softmax attention of one query over a set of rows, returning the output and its log-sum-exp
//! (natural log of Σ exp(scale·q·k)), so partial attentions over disjoint sets merge exactly.

/// Output `o` (dim floats) and `lse` of attention over a token set. Defined by the index crate,
/// whose search can return the attention over the tokens it retrieved.
pub use strata_index::search::Attended;

/// Attention over precomputed logits (`scale·q·k`) and their value rows (`logits.len() × dim`).
/// An empty set gives a zero output and `lse = -inf`.
pub fn attend_logits(logits: &[f32], values: &[f32], dim: usize) -> Attended {
    debug_assert_eq!(values.len(), logits.len() * dim);
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut output = vec![0f64; dim];
    if !max.is_finite() {
        return Attended {
            output: vec![0.0; dim],
            lse: f32::NEG_INFINITY,
        };
    }
    let mut denom = 0f64;
    for (l, v) in logits.iter().zip(values.chunks_exact(dim)) {
        let w = ((l - max) as f64).exp();
        denom += w;
        for (o, x) in output.iter_mut().zip(v) {
            *o += w * *x as f64;
        }
    }
    Attended {
        output: output.iter().map(|o| (o / denom) as f32).collect(),
        lse: max + denom.ln() as f32,
    }
}

/// Merges attentions over disjoint token sets into the attention over their union.
pub fn merge(parts: &[Attended]) -> Attended {
    let dim = parts.first().map(|p| p.output.len()).unwrap_or(0);
    let max = parts
        .iter()
        .map(|p| p.lse)
        .fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return Attended {
            output: vec![0.0; dim],
            lse: f32::NEG_INFINITY,
        };
    }
    let weights: Vec<f64> = parts.iter().map(|p| ((p.lse - max) as f64).exp()).collect();
    let total: f64 = weights.iter().sum();
    let mut output = vec![0f64; dim];
    for (p, w) in parts.iter().zip(&weights) {
        for (o, x) in output.iter_mut().zip(&p.output) {
            *o += w / total * *x as f64;
        }
    }
    Attended {
        output: output.iter().map(|&o| o as f32).collect(),
        lse: max + total.ln() as f32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_tokens_by_hand() {
        // logits 0 and ln 3: weights 1/4 and 3/4.
        let a = attend_logits(&[0.0, 3f32.ln()], &[1.0, 0.0, 0.0, 1.0], 2);
        assert!((a.output[0] - 0.25).abs() < 1e-6 && (a.output[1] - 0.75).abs() < 1e-6);
        assert!((a.lse - 4f32.ln()).abs() < 1e-6);
    }

    #[test]
    fn merge_equals_attention_over_union() {
        let logits = [0.3f32, -1.0, 2.0, 0.5];
        let values = [1.0f32, 2.0, -1.0, 0.5, 3.0, 3.0, 0.0, -2.0];
        let all = attend_logits(&logits, &values, 2);
        let a = attend_logits(&logits[..1], &values[..2], 2);
        let b = attend_logits(&logits[1..], &values[2..], 2);
        let m = merge(&[a, b]);
        assert!((m.lse - all.lse).abs() < 1e-5);
        for (x, y) in m.output.iter().zip(&all.output) {
            assert!((x - y).abs() < 1e-5);
        }
    }

    #[test]
    fn empty_set_is_neutral_in_merge() {
        let e = attend_logits(&[], &[], 2);
        assert_eq!(e.lse, f32::NEG_INFINITY);
        let a = attend_logits(&[1.0], &[4.0, 5.0], 2);
        assert_eq!(merge(&[e, a.clone()]).output, a.output);
    }
}
