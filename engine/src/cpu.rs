//! Attention on the CPU in f32 (values stored f16 on disk are widened when read), written so
//! that the accumulation vectorises: logits -> softmax weights -> axpy of value rows.

use crate::attention::Attended;

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
}
