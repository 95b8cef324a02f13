//! The few vector kernels the hot paths need. Written with eight independent accumulators so that
//! LLVM turns them into AVX2/FMA code (the workspace builds for x86-64-v3).

/// Inner product of two equally long f32 slices.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] = x[i].mul_add(y[i], acc[i]);
        }
    }
    let mut s = (acc[0] + acc[4]) + (acc[1] + acc[5]) + (acc[2] + acc[6]) + (acc[3] + acc[7]);
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// The largest value (NaN never wins; -inf for none), eight lanes at a time: a plain
/// `fold(f32::max)` is one long dependency chain.
#[inline]
pub fn max_of(values: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let chunks = values.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..8 {
            acc[i] = if c[i] > acc[i] { c[i] } else { acc[i] };
        }
    }
    rest.iter()
        .chain(&acc)
        .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m })
}

/// The sum, in eight lanes.
#[inline]
pub fn sum_of(values: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = values.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..8 {
            acc[i] += c[i];
        }
    }
    (acc[0] + acc[4])
        + (acc[1] + acc[5])
        + (acc[2] + acc[6])
        + (acc[3] + acc[7])
        + rest.iter().sum::<f32>()
}

/// Squared Euclidean norm.
#[inline]
pub fn norm_sq(a: &[f32]) -> f32 {
    dot(a, a)
}

/// `rows · q` for every `dim`-long row of `rows`, written into `out`.
pub fn dot_rows(rows: &[f32], dim: usize, q: &[f32], out: &mut Vec<f32>) {
    out.clear();
    out.extend(rows.chunks_exact(dim).map(|r| dot(r, q)));
}

/// Indices of the `k` largest values (in `total_cmp` order, ties broken by the lower index), in
/// ascending index order. O(n): the k-th largest value is found first (see [`kth_largest`]),
/// then one pass collects the indices. Callers walk the result in index order, which keeps
/// candidates grouped by the list they came from.
pub fn top_k_indices(values: &[f32], k: usize) -> Vec<u32> {
    if k >= values.len() {
        return (0..values.len() as u32).collect();
    }
    if k == 0 {
        return Vec::new();
    }
    let (threshold, above) = kth_largest(values, k);
    // Every index at or above the threshold, packed eight values at a time with no branch per
    // value (in the decode step, a pass that branched on each taken bit took more than twice
    // as long), then the ties beyond the k-th dropped from the end: the lowest indices among
    // equal values are kept.
    let mut out = Vec::with_capacity(k + 8);
    crate::simd::indices_at_least(values, threshold, &mut out);
    if out.len() > k {
        let mut ties_left = k - above;
        out.retain(|&i| {
            if order_key(values[i as usize]) != threshold {
                return true;
            }
            let keep = ties_left > 0;
            ties_left = ties_left.saturating_sub(1);
            keep
        });
    }
    out
}

/// Values sampled to bracket the k-th largest (every ⌊n/256⌋-th).
const TOP_K_SAMPLES: usize = 256;

/// The order key of the k-th largest value (`0 < k < n`) and how many keys exceed it.
///
/// Sampled first: two keys of an evenly spaced sample that bracket the k-th largest with a
/// margin of four binomial standard deviations split the values in one pass into those above
/// (counted) and those between (kept), and a selection among the few kept finds the key. The
/// histogram of the keys' top 12 bits that the sample replaced (scores crowd into a few binary
/// exponents, so the bucket of the k-th largest held hundreds of values to select among) still
/// serves short inputs and the rare sample that misses.
fn kth_largest(values: &[f32], k: usize) -> (u32, usize) {
    let n = values.len();
    if n >= 4 * TOP_K_SAMPLES {
        let mut sample: Vec<u32> = values
            .iter()
            .step_by(n / TOP_K_SAMPLES)
            .map(|&v| order_key(v))
            .collect();
        sample.sort_unstable_by(|a, b| b.cmp(a));
        let m = sample.len() as f64;
        let p = k as f64 / n as f64;
        let at = p * m;
        let margin = 4.0 * (m * p * (1.0 - p)).sqrt() + 2.0;
        let hi = sample[((at - margin).floor().max(0.0) as usize).min(sample.len() - 1)];
        let lo = sample[((at + margin).ceil() as usize).min(sample.len() - 1)];
        let mut between: Vec<u32> = Vec::with_capacity((4.0 * margin / m * n as f64) as usize + 8);
        let above = crate::simd::keys_within(values, lo, hi, &mut between);
        if above < k && above + between.len() >= k {
            let rank = between.len() - (k - above);
            let (_, &mut threshold, _) = between.select_nth_unstable(rank);
            let above = above + between.iter().filter(|&&key| key > threshold).count();
            return (threshold, above);
        }
    }
    const BUCKET_SHIFT: u32 = 20;
    let mut counts = vec![0u32; 1 << (32 - BUCKET_SHIFT)];
    for &v in values {
        counts[(order_key(v) >> BUCKET_SHIFT) as usize] += 1;
    }
    // The bucket holding the k-th largest, and how many lie in buckets above it.
    let (mut bucket, mut above) = (counts.len() - 1, 0usize);
    while above + (counts[bucket] as usize) < k {
        above += counts[bucket] as usize;
        bucket -= 1;
    }
    let mut inside: Vec<u32> = values
        .iter()
        .map(|&v| order_key(v))
        .filter(|&key| (key >> BUCKET_SHIFT) as usize == bucket)
        .collect();
    let rank = inside.len() - (k - above);
    let (_, &mut threshold, _) = inside.select_nth_unstable(rank);
    (
        threshold,
        above + inside.iter().filter(|&&key| key > threshold).count(),
    )
}

/// An integer whose order is `f32::total_cmp`'s: flip all bits of negatives, the sign of the rest
/// (without a branch, so that loops over it vectorise).
#[inline]
pub(crate) fn order_key(v: f32) -> u32 {
    let b = v.to_bits();
    b ^ (((b as i32 >> 31) as u32) | 0x8000_0000)
}

/// One integer whose descending order is (`score` descending by `total_cmp`, then `id`
/// ascending): selections and sorts over it compare integers instead of calling a float
/// comparator. [`from_best_first_key`] gives both back.
#[inline]
pub(crate) fn best_first_key(score: f32, id: u32) -> u64 {
    (order_key(score) as u64) << 32 | (u32::MAX - id) as u64
}

/// The order of [`best_first_key`]s, best first.
#[inline]
pub(crate) fn best_first(a: &u64, b: &u64) -> std::cmp::Ordering {
    b.cmp(a)
}

/// The score and id of a [`best_first_key`].
#[inline]
pub(crate) fn from_best_first_key(key: u64) -> (f32, u32) {
    let k = (key >> 32) as u32;
    let bits = if k >> 31 == 1 { k ^ 0x8000_0000 } else { !k };
    (f32::from_bits(bits), u32::MAX - key as u32)
}

pub use crate::simd::dot_f16_bytes;

/// f16 little-endian bytes to f32, appended to `out`.
pub fn f16_bytes_to_f32(bytes: &[u8], out: &mut Vec<f32>) {
    let start = out.len();
    out.resize(start + bytes.len() / 2, 0.0);
    crate::simd::f16_to_f32(bytes, &mut out[start..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_matches_naive_for_odd_lengths() {
        for n in [0usize, 1, 7, 8, 9, 63, 64, 65, 256] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let naive: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert!((dot(&a, &b) - naive).abs() < 1e-4, "n={n}");
        }
    }

    #[test]
    fn max_and_sum_match_the_plain_folds() {
        for n in [0usize, 1, 7, 8, 9, 33, 100] {
            let v: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.5)
                .collect();
            let plain_max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max_of(&v), plain_max, "n={n}");
            let plain_sum: f32 = v.iter().sum();
            assert!((sum_of(&v) - plain_sum).abs() <= 1e-4 * (1.0 + plain_sum.abs()));
        }
        assert_eq!(max_of(&[f32::NAN, -1.0, f32::NEG_INFINITY]), -1.0);
        assert_eq!(max_of(&[f32::NEG_INFINITY; 9]), f32::NEG_INFINITY);
    }

    #[test]
    fn top_k_picks_largest() {
        let v = [0.5, 3.0, -1.0, 2.0, 3.0];
        assert_eq!(top_k_indices(&v, 3), vec![1, 3, 4]);
        // Ties go to the lower index; the order is the index order.
        assert_eq!(top_k_indices(&v, 1), vec![1]);
        let signed = [-0.0, 0.0, f32::NEG_INFINITY, -2.0, 7.0, f32::INFINITY, -0.5];
        assert_eq!(top_k_indices(&signed, 3), vec![1, 4, 5]);
        assert_eq!(top_k_indices(&signed, 5), vec![0, 1, 4, 5, 6]);
        assert_eq!(top_k_indices(&v, 0), Vec::<u32>::new());
        assert_eq!(top_k_indices(&v, 9).len(), 5);
        // A range wider than f32 can hold.
        let wide = [f32::MAX, -f32::MAX, 1.0, 2.0, -3.0];
        assert_eq!(top_k_indices(&wide, 2), vec![0, 3]);
        assert_eq!(top_k_indices(&wide, 4), vec![0, 2, 3, 4]);
    }

    #[test]
    fn top_k_matches_a_full_sort_with_many_ties() {
        // Values from a small set, so that the k-th largest is tied many times over.
        let v: Vec<f32> = (0..500u32)
            .map(|i| ((i.wrapping_mul(2_654_435_761) >> 7) % 13) as f32 - 6.0)
            .collect();
        for k in [1usize, 2, 37, 100, 250, 499, 500] {
            let mut reference: Vec<u32> = (0..v.len() as u32).collect();
            reference.sort_by(|&a, &b| v[b as usize].total_cmp(&v[a as usize]).then(a.cmp(&b)));
            reference.truncate(k);
            reference.sort_unstable();
            assert_eq!(top_k_indices(&v, k), reference, "k={k}");
        }
    }

    #[test]
    fn top_k_matches_a_full_sort_on_spread_and_non_finite_values() {
        let reference = |v: &[f32], k: usize| {
            let mut r: Vec<u32> = (0..v.len() as u32).collect();
            r.sort_by(|&a, &b| v[b as usize].total_cmp(&v[a as usize]).then(a.cmp(&b)));
            r.truncate(k);
            r.sort_unstable();
            r
        };
        // Scores as the code scan makes them (many distinct values in a narrow range, so the
        // k-th largest shares its histogram bucket with many others), a tail, signed zeros;
        // then the same with infinities and the extremes of f32.
        let mut v: Vec<f32> = (0..6000u32)
            .map(|i| ((i.wrapping_mul(2_654_435_761) >> 8) % 100_000) as f32 * 1e-4 - 3.0)
            .collect();
        v[17] = 40.0;
        v[18] = -0.0;
        v[19] = 0.0;
        for k in [1usize, 5, 1800, 3000, 5999] {
            assert_eq!(top_k_indices(&v, k), reference(&v, k), "k={k}");
        }
        v[20] = f32::INFINITY;
        v[21] = f32::NEG_INFINITY;
        v[22] = f32::MAX;
        v[23] = -f32::MAX;
        for k in [1usize, 2, 1800, 5999] {
            assert_eq!(top_k_indices(&v, k), reference(&v, k), "k={k}");
        }
    }

    #[test]
    fn f16_conversion_round_trips() {
        let vals = [0.0f32, 1.5, -2.25, 65504.0];
        let bytes: Vec<u8> = vals
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect();
        let mut out = Vec::new();
        f16_bytes_to_f32(&bytes, &mut out);
        assert_eq!(out, vals);
    }

    #[test]
    fn best_first_keys_order_by_score_then_id_and_give_both_back() {
        let scores = [
            1.5,
            -1.5,
            0.0,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            3.0e-42,
            1.5,
        ];
        let mut keyed: Vec<(u64, f32, u32)> = scores
            .iter()
            .enumerate()
            .map(|(i, &s)| (best_first_key(s, i as u32), s, i as u32))
            .collect();
        for &(key, s, id) in &keyed {
            let (back, back_id) = from_best_first_key(key);
            assert_eq!((back.to_bits(), back_id), (s.to_bits(), id));
        }
        keyed.sort_unstable_by_key(|k| std::cmp::Reverse(k.0));
        for w in keyed.windows(2) {
            let order = w[1].1.total_cmp(&w[0].1).then(w[0].2.cmp(&w[1].2));
            assert_eq!(
                order,
                std::cmp::Ordering::Less,
                "{:?} before {:?}",
                w[0],
                w[1]
            );
        }
    }
}
