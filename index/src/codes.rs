//! Compact key codes for candidate scoring: per-channel uniform scalar quantisation with 1, 2, 3,
//! 4 or 8 bits per dimension, packed little-end-first into bytes. Scoring a code against a query
//! needs no decoding: `q·k ≈ q·lo + Σ_d (q_d · step_d) · code_d`.
//!
//! 3-bit codes are stored as two planes, the low two bits of every dimension (four per byte)
//! then the high bit (eight per byte), so that both planes keep whole codes per byte. The index
//! uses them for *residual* codes ([`RESIDUAL_CODE_BITS`]).
//!
//! In the index, codes are stored in blocks of [`CODE_BLOCK`] keys, byte-major (byte k of all
//! keys of the block, then byte k+1, ...), so that one query weight meets 16 keys at once and
//! the scoring loop is plain vertical SIMD.

/// Keys per code block.
pub const CODE_BLOCK: usize = 16;

/// Key codes of this many bits are codes of each key's residual from its list's decoded
/// centroid, not of the key: a list's keys sit much closer to their centroid than to the
/// head's range, so 3 residual bits score about as well as 4 key bits. A code's score then
/// adds the list's centroid score.
pub const RESIDUAL_CODE_BITS: u32 = 3;

/// Largest rounded weight of a 3-bit (residual) query: an i8, so that the AVX2 kernel multiplies
/// 32 code-weight pairs per `pmaddubsw` (`simd::score_split3_blocks`). The rounding error is
/// folded into the bias at each dimension's zero-residual code (`ScalarQuantizer::query`); with
/// it, `strata eval` per-head error moved from 0.03612 to 0.03609 (SmolLM2) and 0.08033 to
/// 0.08017 (Gemma-3) against i16 weights (docs/BENCHMARKS.md, sixteenth session).
pub const I8_WEIGHT_MAX: i32 = 127;

/// Key code widths a quantiser packs.
pub const CODE_BITS: [u32; 5] = [1, 2, 3, 4, 8];

/// The packed planes of one code of `bits` per dimension over `dim` dimensions: (first byte,
/// bytes, bits per code in the plane, weight multiplier). One plane except for 3 bits.
fn planes(bits: u32, dim: usize) -> [(usize, usize, u32, f32); 2] {
    if bits == 3 {
        let low = dim.div_ceil(4);
        [(0, low, 2, 1.0), (low, dim.div_ceil(8), 1, 4.0)]
    } else {
        let n = dim.div_ceil(8 / bits as usize);
        [(0, n, bits, 1.0), (n, 0, 1, 0.0)]
    }
}

/// Bytes one code of `bits` per dimension over `dim` dimensions takes.
pub fn code_bytes(bits: u32, dim: usize) -> usize {
    planes(bits, dim).iter().map(|p| p.1).sum()
}

/// Per-channel quantiser fitted to a set of keys.
#[derive(Clone, Debug, PartialEq)]
pub struct ScalarQuantizer {
    pub bits: u32,
    pub lo: Vec<f32>,
    pub step: Vec<f32>,
}

impl ScalarQuantizer {
    /// Fits `lo` and `step` to the per-channel min and max of `keys` (`dim`-wide rows).
    pub fn fit(keys: &[f32], dim: usize, bits: u32) -> Self {
        let mut lo = vec![f32::INFINITY; dim];
        let mut hi = vec![f32::NEG_INFINITY; dim];
        for row in keys.chunks_exact(dim.max(1)) {
            for d in 0..dim {
                lo[d] = lo[d].min(row[d]);
                hi[d] = hi[d].max(row[d]);
            }
        }
        Self::from_range(lo, &hi, bits)
    }

    /// Like [`ScalarQuantizer::fit`], over the range between each channel's `percentile`-th
    /// and `(100 − percentile)`-th percentiles: values beyond take the end codes. For residuals,
    /// whose few extremes would otherwise stretch every step.
    pub fn fit_clipped(rows: &[f32], dim: usize, bits: u32, percentile: f32) -> Self {
        let n = rows.len() / dim.max(1);
        if n == 0 {
            return Self::fit(rows, dim, bits);
        }
        let at = |p: f32| ((p / 100.0).clamp(0.0, 1.0) as f64 * (n - 1) as f64).round() as usize;
        let (lo_rank, hi_rank) = (at(percentile), at(100.0 - percentile));
        let mut lo = Vec::with_capacity(dim);
        let mut hi = Vec::with_capacity(dim);
        let mut channel = vec![0f32; n];
        for d in 0..dim {
            for (c, row) in channel.iter_mut().zip(rows.chunks_exact(dim)) {
                *c = row[d];
            }
            lo.push(*channel.select_nth_unstable_by(lo_rank, f32::total_cmp).1);
            hi.push(*channel.select_nth_unstable_by(hi_rank, f32::total_cmp).1);
        }
        Self::from_range(lo, &hi, bits)
    }

    fn from_range(mut lo: Vec<f32>, hi: &[f32], bits: u32) -> Self {
        let levels = ((1u32 << bits) - 1) as f32;
        let step = lo
            .iter_mut()
            .zip(hi)
            .map(|(l, h)| {
                if !l.is_finite() {
                    *l = 0.0;
                    return 1.0;
                }
                let s = (h - *l) / levels;
                if s > 0.0 {
                    s
                } else {
                    1.0
                }
            })
            .collect();
        ScalarQuantizer { bits, lo, step }
    }

    pub fn dim(&self) -> usize {
        self.lo.len()
    }

    /// Bytes one key's code takes.
    pub fn code_bytes(&self) -> usize {
        code_bytes(self.bits, self.dim())
    }

    /// Appends the packed code of `key` to `out`.
    pub fn encode(&self, key: &[f32], out: &mut Vec<u8>) {
        let max = ((1u32 << self.bits) - 1) as f32;
        let start = out.len();
        out.resize(start + self.code_bytes(), 0);
        let [(_, _, low_bits, _), (high_at, _, _, _)] = planes(self.bits, self.dim());
        let cpb = 8 / low_bits as usize;
        for (d, &v) in key.iter().enumerate() {
            let c = ((v - self.lo[d]) / self.step[d]).round().clamp(0.0, max) as u8;
            let low = c & ((1u32 << low_bits) - 1) as u8;
            out[start + d / cpb] |= low << ((d % cpb) as u32 * low_bits);
            if self.bits == 3 {
                out[start + high_at + d / 8] |= (c >> 2) << (d % 8);
            }
        }
    }

    /// Appends one block: the codes of up to [`CODE_BLOCK`] keys, byte-major; missing keys of a
    /// short block are zero codes.
    pub fn encode_block(&self, keys: &[&[f32]], out: &mut Vec<u8>) {
        debug_assert!(keys.len() <= CODE_BLOCK);
        let nbytes = self.code_bytes();
        let start = out.len();
        out.resize(start + nbytes * CODE_BLOCK, 0);
        let mut one = Vec::with_capacity(nbytes);
        for (lane, key) in keys.iter().enumerate() {
            one.clear();
            self.encode(key, &mut one);
            for (k, &b) in one.iter().enumerate() {
                out[start + k * CODE_BLOCK + lane] = b;
            }
        }
    }

    /// Bytes of one block.
    pub fn block_bytes(&self) -> usize {
        self.code_bytes() * CODE_BLOCK
    }

    /// Decodes one packed code (for tests, diagnostics and residual bases).
    pub fn decode(&self, code: &[u8]) -> Vec<f32> {
        let [(_, _, low_bits, _), (high_at, _, _, _)] = planes(self.bits, self.dim());
        let cpb = 8 / low_bits as usize;
        let mask = ((1u32 << low_bits) - 1) as u8;
        (0..self.dim())
            .map(|d| {
                let mut c = (code[d / cpb] >> ((d % cpb) as u32 * low_bits)) & mask;
                if self.bits == 3 {
                    c |= ((code[high_at + d / 8] >> (d % 8)) & 1) << 2;
                }
                self.lo[d] + self.step[d] * c as f32
            })
            .collect()
    }

    /// Prepares a query for scoring codes. The per-dimension weights `q_d · step_d` are
    /// quantised to i16 so that scoring is an integer multiply-add that AVX2 does 16 lanes at
    /// a time; the rounding error is below 2^-15 of the largest weight per dimension (2^-13
    /// for 3-bit codes, whose high plane weighs 4×).
    pub fn query(&self, q: &[f32]) -> CodeQuery {
        let nbytes = self.code_bytes();
        let levels = ((1u32 << self.bits) - 1) as f32;
        let planes = planes(self.bits, self.dim());
        let w: Vec<f32> = q.iter().zip(&self.step).map(|(a, s)| a * s).collect();
        let wmax = w.iter().fold(0f32, |m, v| m.max(v.abs()));
        // The largest rounded weight: for 3-bit codes an i8 (`I8_WEIGHT_MAX`), elsewhere the
        // largest whose multiple in any plane still fits an i16.
        let top = if self.bits == RESIDUAL_CODE_BITS {
            I8_WEIGHT_MAX as f32
        } else {
            (i16::MAX as f32 / planes[1].3.max(1.0)).floor()
        };
        // The integer sum |Σ code·w/unit| is at most levels · Σ|w|/unit, which must fit an i32:
        // the largest weight maps to `top` unless that bound says otherwise (8-bit codes
        // beyond 257 dimensions; 4-bit beyond 4,369), then the unit grows to fit.
        let wsum: f32 = w.iter().map(|v| v.abs()).sum();
        let unit = if wmax > 0.0 {
            (wmax / top).max(levels * wsum / (i32::MAX as f32 * 0.99))
        } else {
            1.0
        };
        // Each dimension's weight in units, rounded once: the planes' weights and the bias
        // correction below take the same value.
        let rounded: Vec<f32> = w.iter().map(|&wd| (wd / unit).round()).collect();
        // weights[8·at + s·n + j]: weight of the code in slot s of byte j of the plane whose
        // bytes start at `at` (n bytes).
        let mut weights = vec![0i16; 8 * nbytes];
        for &(at, n, bits, scale) in planes.iter().filter(|p| p.1 > 0) {
            let cpb = 8 / bits as usize;
            for (d, &rd) in rounded.iter().enumerate() {
                // Every plane weighs a dimension by the same rounded weight (scaled exactly), so
                // a code scores the same however its planes are combined.
                weights[8 * at + (d % cpb) * n + d / cpb] = (scale * rd) as i16;
            }
        }
        let mut bias: f32 = q.iter().zip(&self.lo).map(|(a, b)| a * b).sum();
        if self.bits == RESIDUAL_CODE_BITS && wmax > 0.0 {
            // Coarse weights: a residual code's value sits near the code of a zero residual,
            // so the rounding error of each weight times that code is folded into the bias.
            bias += w
                .iter()
                .zip(&rounded)
                .zip(self.lo.iter().zip(&self.step))
                .map(|((&wd, &rd), (&lo, &st))| {
                    let centre = if st > 0.0 {
                        (-lo / st).clamp(0.0, levels)
                    } else {
                        0.0
                    };
                    (wd - rd * unit) * centre
                })
                .sum::<f32>();
        }
        let nibble_pairs = if self.bits == 4 {
            (0..nbytes)
                .map(|k| {
                    let (lo, hi) = (weights[k], weights[nbytes + k]);
                    ((hi as u16 as u32) << 16 | lo as u16 as u32) as i32
                })
                .collect()
        } else {
            Vec::new()
        };
        let plane_pairs = planes.map(|(at, n, bits, _)| {
            if bits > 2 || n == 0 {
                return Vec::new();
            }
            let pairs = 4 / bits as usize;
            let w = |s: usize, k: usize| weights[8 * at + s * n + k] as u16 as u32;
            (0..n)
                .flat_map(|k| (0..pairs).map(move |p| (k, p)))
                .map(|(k, p)| (w(2 * p + 1, k) << 16 | w(2 * p, k)) as i32)
                .collect()
        });
        // The VNNI kernel's weights: the low plane's, dimension by dimension.
        let split3_vnni = if self.bits == 3 && crate::simd::split3_vnni_available() {
            let low = planes[0].1;
            let w: Vec<i32> = (0..4 * low)
                .map(|d| weights[(d % 4) * low + d / 4] as i32)
                .collect();
            crate::simd::split3_vnni_weights(&w, low)
        } else {
            Vec::new()
        };
        // Elsewhere, the shared AVX2 kernel's weights, from the low plane's pairs.
        let split3_pair_rows = if self.bits == 3 && split3_vnni.is_empty() {
            crate::simd::split3_pair_i8_weights(&plane_pairs[0], planes[0].1)
        } else {
            Vec::new()
        };
        CodeQuery {
            bits: self.bits,
            split3_vnni,
            split3_pair_rows,
            planes,
            weights,
            nibble_pairs,
            plane_pairs,
            unit,
            bias,
        }
    }
}

/// The most queries [`CodeQuery::score_blocks`] scores per decoding of a block: a whole GQA
/// group of four. With i8 weights each query needs two i16 sums (before, i32 sums took four
/// registers a query and two were the most that fitted); on the criterion bench four queries
/// take 16-19 µs per 2,048 keys against 30 µs as two passes of two.
pub const SHARED_SCAN_QUERIES: usize = 4;

/// The first `N` of an array of sums, as an array.
fn first<const N: usize>(
    acc: &mut [[i32; CODE_BLOCK]; SHARED_SCAN_QUERIES],
) -> &mut [[i32; CODE_BLOCK]; N] {
    <&mut [[i32; CODE_BLOCK]; N]>::try_from(&mut acc[..N]).expect("N <= SHARED_SCAN_QUERIES")
}

/// A query prepared for scoring packed codes.
pub struct CodeQuery {
    bits: u32,
    /// The code's planes, as [`planes`] gives them.
    planes: [(usize, usize, u32, f32); 2],
    /// Per plane, `8 × its first byte` on: its slots' weights, slot-major (see `query`).
    weights: Vec<i16>,
    /// For 4-bit codes: per byte, the weights of its low and high nibble packed as one i32
    /// (low 16 bits, high 16 bits), for the two-dimensions-per-instruction block scan.
    nibble_pairs: Vec<i32>,
    /// For planes of 1- and 2-bit codes, per plane: per byte, per pair of slots, the two
    /// slots' weights packed the same way (`simd::score_pair_plane`).
    plane_pairs: [Vec<i32>; 2],
    /// For 3-bit codes on a CPU with AVX-512 VNNI: the weights of `simd::score_split3_block_vnni`
    /// (empty otherwise).
    split3_vnni: Vec<i32>,
    /// For 3-bit codes elsewhere (AVX2): the weights of `simd::score_split3_blocks`, which
    /// decodes a block once for several queries (empty where it does not apply).
    split3_pair_rows: Vec<i8>,
    unit: f32,
    bias: f32,
}

impl CodeQuery {
    /// Approximate `q·k` for one packed code.
    #[inline]
    pub fn score(&self, code: &[u8]) -> f32 {
        if self.bits == 8 {
            // Centroid codes: one code per byte; this form vectorises (no per-slot shifts).
            let acc: i32 = self
                .weights
                .iter()
                .zip(code)
                .map(|(&wi, &ci)| wi as i32 * ci as i32)
                .sum();
            return self.bias + acc as f32 * self.unit;
        }
        if self.bits == 4 {
            let n = self.planes[0].1;
            let acc = crate::simd::score_nibble_row(
                &code[..n],
                &self.weights[..n],
                &self.weights[n..2 * n],
            );
            return self.bias + acc as f32 * self.unit;
        }
        let mut acc = 0i32;
        for &(at, n, bits, _) in self.planes.iter().filter(|p| p.1 > 0) {
            let mask = ((1u32 << bits) - 1) as u8;
            let bytes = &code[at..at + n];
            for s in 0..8 / bits as usize {
                let w = &self.weights[8 * at + s * n..8 * at + (s + 1) * n];
                let shift = s as u32 * bits;
                acc += w
                    .iter()
                    .zip(bytes)
                    .map(|(&wi, &ci)| wi as i32 * ((ci >> shift) & mask) as i32)
                    .sum::<i32>();
            }
        }
        self.bias + acc as f32 * self.unit
    }

    /// Approximate `q·k` for the [`CODE_BLOCK`] keys of one block, plus `base` (for residual
    /// codes, the score of the list's centroid; 0 for key codes).
    #[inline]
    pub fn score_block(&self, block: &[u8], base: f32, out: &mut [f32; CODE_BLOCK]) {
        Self::score_blocks(&[(self, base)], block, std::slice::from_mut(out));
    }

    /// [`CodeQuery::score_block`] for several queries with their bases (`out[i]` for
    /// `queries[i]`, as many of each; the queries codes of one quantiser). Where the shared
    /// AVX2 kernel applies it decodes the block once for up to [`SHARED_SCAN_QUERIES`] of them
    /// at a time; elsewhere each query is scored alone. The scores are the same either way.
    pub fn score_blocks(
        queries: &[(&CodeQuery, f32)],
        block: &[u8],
        out: &mut [[f32; CODE_BLOCK]],
    ) {
        if !Self::score_blocks_shared(queries, block, out) {
            for (&(q, base), o) in queries.iter().zip(out.iter_mut()) {
                q.score_block_alone(block, base, o);
            }
        }
    }

    /// `score_block` without the shared kernel: AVX-512 VNNI or the one-query AVX2 kernel for
    /// 3-bit codes, the nibble kernel for 4-bit ones, the plane scans otherwise.
    fn score_block_alone(&self, block: &[u8], base: f32, out: &mut [f32; CODE_BLOCK]) {
        let fast = match self.bits {
            4 => crate::simd::score_nibble_block(block, &self.nibble_pairs),
            // The low plane's pair weights are the 3-bit codes' own (the high bit weighs 4×
            // through the code's value).
            3 => crate::simd::score_split3_block_vnni(block, self.planes[0].1, &self.split3_vnni)
                .or_else(|| {
                    crate::simd::score_split3_block(block, self.planes[0].1, &self.plane_pairs[0])
                }),
            _ => None,
        };
        if let Some(acc) = fast {
            self.scores_from_sums(base, &acc, out);
            return;
        }
        let mut acc = [0i32; CODE_BLOCK];
        for (plane, pairs) in self.planes.iter().zip(&self.plane_pairs) {
            let (at, n, bits, _) = *plane;
            let bytes = &block[at * CODE_BLOCK..(at + n) * CODE_BLOCK];
            if n > 0 && !crate::simd::score_pair_plane(bytes, bits, pairs, &mut acc) {
                self.add_plane_scalar(block, plane, &mut acc);
            }
        }
        self.scores_from_sums(base, &acc, out);
    }

    /// The scores of a block from its integer sums, plus `base`.
    #[inline]
    fn scores_from_sums(&self, base: f32, acc: &[i32; CODE_BLOCK], out: &mut [f32; CODE_BLOCK]) {
        let bias = self.bias + base;
        for i in 0..CODE_BLOCK {
            out[i] = bias + acc[i] as f32 * self.unit;
        }
    }

    /// The shared AVX2 kernel's part of [`CodeQuery::score_blocks`]: false, having written
    /// nothing, where it does not apply (other code widths, a CPU with VNNI, an odd count of
    /// low-plane bytes, queries of different shapes).
    fn score_blocks_shared(
        queries: &[(&CodeQuery, f32)],
        block: &[u8],
        out: &mut [[f32; CODE_BLOCK]],
    ) -> bool {
        let Some(&(first_query, _)) = queries.first() else {
            return true;
        };
        let low = first_query.planes[0].1;
        if queries.len() != out.len()
            || queries
                .iter()
                .any(|(q, _)| q.bits != 3 || q.planes[0].1 != low || q.split3_pair_rows.is_empty())
        {
            return false;
        }
        for (qs, outs) in queries
            .chunks(SHARED_SCAN_QUERIES)
            .zip(out.chunks_mut(SHARED_SCAN_QUERIES))
        {
            let w = |i: usize| qs[i].0.split3_pair_rows.as_slice();
            let mut acc = [[0i32; CODE_BLOCK]; SHARED_SCAN_QUERIES];
            let done = match qs.len() {
                1 => crate::simd::score_split3_blocks::<1>(block, low, [w(0)], first(&mut acc)),
                2 => {
                    crate::simd::score_split3_blocks::<2>(block, low, [w(0), w(1)], first(&mut acc))
                }
                3 => crate::simd::score_split3_blocks::<3>(
                    block,
                    low,
                    [w(0), w(1), w(2)],
                    first(&mut acc),
                ),
                _ => crate::simd::score_split3_blocks::<4>(
                    block,
                    low,
                    [w(0), w(1), w(2), w(3)],
                    first(&mut acc),
                ),
            };
            if !done {
                return false;
            }
            for ((&(q, base), o), a) in qs.iter().zip(outs.iter_mut()).zip(&acc) {
                q.scores_from_sums(base, a, o);
            }
        }
        true
    }

    /// The portable block scan of one plane: adds its codes' weighted sums to `acc`.
    fn add_plane_scalar(
        &self,
        block: &[u8],
        &(at, n, bits, _): &(usize, usize, u32, f32),
        acc: &mut [i32; CODE_BLOCK],
    ) {
        let mask = ((1u32 << bits) - 1) as u8;
        for k in 0..n {
            let lanes = &block[(at + k) * CODE_BLOCK..(at + k + 1) * CODE_BLOCK];
            for s in 0..8 / bits as usize {
                let w = self.weights[8 * at + s * n + k] as i32;
                let shift = s as u32 * bits;
                for i in 0..CODE_BLOCK {
                    acc[i] += w * ((lanes[i] >> shift) & mask) as i32;
                }
            }
        }
    }

    /// Scores `n` consecutive packed codes.
    pub fn score_many(&self, codes: &[u8], out: &mut Vec<f32>) {
        let nbytes: usize = self.planes.iter().map(|p| p.1).sum();
        out.extend(codes.chunks_exact(nbytes).map(|c| self.score(c)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn wide_8_bit_codes_do_not_overflow_the_integer_sum() {
        // 512 dimensions of 8-bit codes with equal weights: Σ code·w at full scale would be
        // 512 · 255 · 32767, past i32::MAX.
        let dim = 512;
        let keys: Vec<f32> = (0..dim * 2)
            .map(|i| if i < dim { 0.0 } else { 1.0 })
            .collect();
        let sq = ScalarQuantizer::fit(&keys, dim, 8);
        let q = vec![1.0f32; dim];
        let cq = sq.query(&q);
        let mut code = Vec::new();
        sq.encode(&keys[dim..], &mut code);
        assert!(code.iter().all(|&c| c == 255));
        let s = cq.score(&code);
        assert!(
            (s - dim as f32).abs() < 1e-3 * dim as f32,
            "score {s}, expected {dim}"
        );
    }

    /// Pseudo-random values in [-0.5, 0.5), the same for the same seed.
    fn uniform(seed: u64) -> impl FnMut() -> f32 {
        let mut x = seed;
        move || {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        }
    }

    #[test]
    fn the_vnni_kernel_sums_what_the_avx2_kernel_sums() {
        if !crate::simd::split3_vnni_available() {
            println!("skipped: this CPU lacks AVX-512 VNNI/VBMI, so the kernel never runs here");
            return;
        }
        let mut next = uniform(7);
        for dim in [32, 64, 96, 128, 256] {
            let keys: Vec<f32> = (0..dim * CODE_BLOCK).map(|_| next() * 4.0).collect();
            let q: Vec<f32> = (0..dim).map(|_| next() * 3.0).collect();
            let sq = ScalarQuantizer::fit(&keys, dim, 3);
            let cq = sq.query(&q);
            assert_eq!(cq.split3_vnni.len(), 4 * cq.planes[0].1, "dim {dim}");
            let rows: Vec<&[f32]> = keys.chunks_exact(dim).collect();
            let mut block = Vec::new();
            sq.encode_block(&rows, &mut block);
            let low = cq.planes[0].1;
            let vnni = crate::simd::score_split3_block_vnni(&block, low, &cq.split3_vnni);
            let mut portable = [0i32; CODE_BLOCK];
            for plane in cq.planes.iter().filter(|p| p.1 > 0) {
                cq.add_plane_scalar(&block, plane, &mut portable);
            }
            assert_eq!(vnni, Some(portable), "dim {dim}");
        }
    }

    #[test]
    fn the_shared_kernel_gives_each_query_its_own_scores() {
        let mut next = uniform(11);
        for dim in [32, 36, 64, 96, 128, 256] {
            let keys: Vec<f32> = (0..dim * CODE_BLOCK).map(|_| next() * 4.0).collect();
            let sq = ScalarQuantizer::fit(&keys, dim, 3);
            let rows: Vec<&[f32]> = keys.chunks_exact(dim).collect();
            let mut block = Vec::new();
            sq.encode_block(&rows, &mut block);
            let queries: Vec<CodeQuery> = (0..6)
                .map(|_| sq.query(&(0..dim).map(|_| next() * 3.0).collect::<Vec<_>>()))
                .collect();
            // Each query alone, by the portable plane scan.
            let portable: Vec<[f32; CODE_BLOCK]> = queries
                .iter()
                .enumerate()
                .map(|(i, q)| {
                    let mut acc = [0i32; CODE_BLOCK];
                    for plane in q.planes.iter().filter(|p| p.1 > 0) {
                        q.add_plane_scalar(&block, plane, &mut acc);
                    }
                    acc.map(|a| q.bias + i as f32 + a as f32 * q.unit)
                })
                .collect();
            let applies = cfg!(all(target_arch = "x86_64", target_feature = "avx2"))
                && !crate::simd::split3_vnni_available()
                && (dim / 4) % 2 == 0;
            for n in 1..=queries.len() {
                let with_bases: Vec<(&CodeQuery, f32)> = queries[..n]
                    .iter()
                    .zip(0..)
                    .map(|(q, i)| (q, i as f32))
                    .collect();
                let mut got = vec![[f32::NAN; CODE_BLOCK]; n];
                let done = CodeQuery::score_blocks_shared(&with_bases, &block, &mut got);
                assert_eq!(done, applies, "dim {dim}, {n} queries");
                if done {
                    assert_eq!(got, portable[..n], "dim {dim}, {n} queries");
                }
                // score_block agrees whichever kernel it takes.
                for (i, q) in queries[..n].iter().enumerate() {
                    let mut one = [0f32; CODE_BLOCK];
                    q.score_block(&block, i as f32, &mut one);
                    assert_eq!(one, portable[i], "dim {dim}, query {i}");
                }
            }
        }
    }

    #[test]
    fn the_shared_kernel_sums_the_largest_codes_and_weights_exactly() {
        // Keys at 0 or 1 in every dimension give codes 0 or 7; a query of ±1 everywhere gives
        // every dimension the largest weight. The i16 sums inside the AVX2 kernel must not
        // overflow at the widest shape tried (dim 256: four runs of byte pairs).
        for dim in [128, 256] {
            let keys: Vec<f32> = (0..dim * CODE_BLOCK)
                .map(|i| if (i / dim) % 5 == 3 { 0.0 } else { 1.0 })
                .collect();
            let sq = ScalarQuantizer::fit(&keys, dim, 3);
            let rows: Vec<&[f32]> = keys.chunks_exact(dim).collect();
            let mut block = Vec::new();
            sq.encode_block(&rows, &mut block);
            for sign in [1.0f32, -1.0] {
                let q = sq.query(&vec![sign; dim]);
                assert!(q.weights[..q.planes[0].1].iter().all(|&w| w.abs() == 127));
                let mut portable = [0i32; CODE_BLOCK];
                for plane in q.planes.iter().filter(|p| p.1 > 0) {
                    q.add_plane_scalar(&block, plane, &mut portable);
                }
                assert_eq!(portable[0], sign as i32 * 127 * 7 * dim as i32);
                let want: Vec<f32> = portable
                    .iter()
                    .map(|&a| q.bias + a as f32 * q.unit)
                    .collect();
                let queries = [(&q, 0.0), (&q, 0.0), (&q, 0.0), (&q, 0.0)];
                let mut got = [[f32::NAN; CODE_BLOCK]; 4];
                CodeQuery::score_blocks(&queries, &block, &mut got);
                for g in got {
                    assert_eq!(g.to_vec(), want, "dim {dim}, sign {sign}");
                }
            }
        }
    }

    #[test]
    fn a_quantiser_of_no_dimensions_is_empty() {
        let sq = ScalarQuantizer::fit(&[1.0, 2.0], 0, 8);
        assert!(sq.lo.is_empty() && sq.step.is_empty());
    }

    proptest! {
        #[test]
        fn code_scores_match_decoded_dot(
            bits in prop::sample::select(CODE_BITS.to_vec()),
            dim in 1usize..40,
            seed in 0u64..1000,
        ) {
            let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
            let mut next = || { x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407); ((x >> 33) as f32 / (1u64 << 31) as f32) - 0.5 };
            let keys: Vec<f32> = (0..dim * 20).map(|_| next() * 4.0).collect();
            let q: Vec<f32> = (0..dim).map(|_| next()).collect();
            let sq = ScalarQuantizer::fit(&keys, dim, bits);
            let cq = sq.query(&q);
            for row in keys.chunks_exact(dim) {
                let mut code = Vec::new();
                sq.encode(row, &mut code);
                prop_assert_eq!(code.len(), sq.code_bytes());
                let dec = sq.decode(&code);
                // decoding is within half a step of the key
                for d in 0..dim { prop_assert!((dec[d] - row[d]).abs() <= sq.step[d] * 0.5 + 1e-4); }
                let exact: f32 = dec.iter().zip(&q).map(|(a, b)| a * b).sum();
                let wsum: f32 = q.iter().zip(&sq.step).map(|(a, s)| (a * s).abs()).sum::<f32>() * ((1u32 << bits) - 1) as f32;
                // 3-bit queries round their weights to i8 (`I8_WEIGHT_MAX`): each dimension's
                // weight may be off by half a unit, times a code of at most 7 from the centre.
                let rounding = if bits == RESIDUAL_CODE_BITS {
                    0.5 * cq.unit * ((1u32 << bits) - 1) as f32 * dim as f32
                } else {
                    wsum * 1e-4
                };
                prop_assert!((cq.score(&code) - exact).abs() <= 1e-3 * (1.0 + exact.abs()) + rounding);
            }
            // Blocked layout scores the same as one code at a time.
            let rows: Vec<&[f32]> = keys.chunks_exact(dim).take(CODE_BLOCK - 3).collect();
            let mut block = Vec::new();
            sq.encode_block(&rows, &mut block);
            prop_assert_eq!(block.len(), sq.block_bytes());
            let mut scores = [0f32; CODE_BLOCK];
            cq.score_block(&block, 0.0, &mut scores);
            // The portable scan too (the SIMD kernels take over wherever they can).
            let mut portable = [0i32; CODE_BLOCK];
            for plane in cq.planes.iter().filter(|p| p.1 > 0) {
                cq.add_plane_scalar(&block, plane, &mut portable);
            }
            for (lane, row) in rows.iter().enumerate() {
                let mut code = Vec::new();
                sq.encode(row, &mut code);
                let one = cq.score(&code);
                prop_assert!((scores[lane] - one).abs() <= 1e-4 * (1.0 + scores[lane].abs()));
                let p = cq.bias + portable[lane] as f32 * cq.unit;
                prop_assert!((p - one).abs() <= 1e-4 * (1.0 + one.abs()));
            }
        }
    }
}
