//! The metrics of DESIGN.md for one query, against exact attention over the visible keys.

use crate::attention::{attend_logits, Attended};

/// Exact attention of one query: probabilities over the visible keys and the output.
pub struct ExactAttention {
    pub probs: Vec<f32>,
    pub output: Vec<f32>,
    pub lse: f32,
}

impl ExactAttention {
    /// `logits[i] = scale·q·k_i` for the visible keys 0..=p; `values` their rows.
    pub fn new(logits: &[f32], values: &[f32], dim: usize) -> Self {
        let Attended { output, lse } = attend_logits(logits, values, dim);
        let probs = logits.iter().map(|l| (l - lse).exp()).collect();
        ExactAttention { probs, output, lse }
    }

    /// The `k` most attended tokens (ties broken by lower id).
    pub fn top_k(&self, k: usize) -> Vec<u32> {
        let mut idx: Vec<u32> = (0..self.probs.len() as u32).collect();
        let order = |a: &u32, b: &u32| {
            self.probs[*b as usize]
                .total_cmp(&self.probs[*a as usize])
                .then(a.cmp(b))
        };
        if k == 0 {
            return Vec::new();
        }
        if k < idx.len() {
            idx.select_nth_unstable_by(k - 1, order);
            idx.truncate(k);
        }
        idx.sort_by(order);
        idx
    }
}

/// |top-k(P) ∩ R| / k, with `attended` a membership mask over the visible keys.
pub fn recall_at_k(top_k: &[u32], attended: &[bool]) -> f64 {
    if top_k.is_empty() {
        return 1.0;
    }
    let hit = top_k
        .iter()
        .filter(|&&t| attended.get(t as usize).copied().unwrap_or(false))
        .count();
    hit as f64 / top_k.len() as f64
}

/// Σ_{i∈R} P_i.
pub fn covered_mass(probs: &[f32], attended: &[bool]) -> f64 {
    probs
        .iter()
        .zip(attended)
        .filter(|(_, &a)| a)
        .map(|(p, _)| *p as f64)
        .sum()
}

/// ‖Ô − O‖₂ / ‖O‖₂.
pub fn output_error(approx: &[f32], exact: &[f32]) -> f64 {
    let num: f64 = approx
        .iter()
        .zip(exact)
        .map(|(a, e)| ((a - e) as f64).powi(2))
        .sum();
    let den: f64 = exact.iter().map(|e| (*e as f64).powi(2)).sum();
    if den == 0.0 {
        return num.sqrt();
    }
    (num / den).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_computed_case() {
        // Three keys, logits ln1, ln2, ln5 -> P = [0.125, 0.25, 0.625]; values 1-d: 8, 4, 0.
        let logits = [0f32, 2f32.ln(), 5f32.ln()];
        let ex = ExactAttention::new(&logits, &[8.0, 4.0, 0.0], 1);
        assert!((ex.probs[0] - 0.125).abs() < 1e-6);
        assert!((ex.probs[2] - 0.625).abs() < 1e-6);
        assert!((ex.output[0] - 2.0).abs() < 1e-5); // 0.125*8 + 0.25*4
        assert_eq!(ex.top_k(2), vec![2, 1]);
        let attended = [false, true, true];
        assert_eq!(recall_at_k(&ex.top_k(2), &attended), 1.0);
        assert_eq!(recall_at_k(&ex.top_k(3), &attended), 2.0 / 3.0);
        assert!((covered_mass(&ex.probs, &attended) - 0.875).abs() < 1e-6);
        // Attention over {1, 2}: weights 2/7, 5/7 -> output 8/7; exact 2 -> error |8/7-2|/2 = 3/7.
        let sub = attend_logits(&logits[1..], &[4.0, 0.0], 1);
        assert!((sub.output[0] - 8.0 / 7.0).abs() < 1e-5);
        assert!((output_error(&sub.output, &ex.output) - 3.0 / 7.0).abs() < 1e-5);
    }

    #[test]
    fn full_set_has_no_error() {
        let logits = [0.1f32, 0.7, -0.3];
        let values = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let ex = ExactAttention::new(&logits, &values, 2);
        let all = attend_logits(&logits, &values, 2);
        assert!(output_error(&all.output, &ex.output) < 1e-6);
        assert!((covered_mass(&ex.probs, &[true; 3]) - 1.0).abs() < 1e-6);
    }
}
