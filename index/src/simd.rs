//! The hand-written SIMD kernels of the hot paths: the inner product of an f16 key (as stored
//! in a posting list) with an f32 query, eight halves at a time, without converting the key
//! into a buffer first (re-ranking calls it for every candidate key); f16 → f32 conversion of
//! rows (values read out, list mean values); the weighted sum of attended value rows (AVX-512
//! where the CPU has it, else AVX2); the code block scans (4-bit codes two dimensions per
//! `pmaddwd`, 3-bit residual codes with AVX2 `pmaddubsw`, for up to four queries per decoding,
//! or, where the CPU has it, AVX-512 VNNI); and the bit masks of `linalg::top_k_indices`.

/// `Σ k_i · q_i` with `k` given as little-endian f16 bytes (`2 · q.len()` of them).
#[inline]
pub fn dot_f16_bytes(bytes: &[u8], q: &[f32]) -> f32 {
    let n = q.len().min(bytes.len() / 2);
    let head = accelerated(&bytes[..2 * n], &q[..n]);
    let done = head.1;
    head.0
        + bytes[2 * done..2 * n]
            .chunks_exact(2)
            .zip(&q[done..n])
            .map(|(c, x)| half::f16::from_le_bytes([c[0], c[1]]).to_f32() * x)
            .sum::<f32>()
}

/// Asks the CPU to bring `bytes` into cache ahead of use: re-ranking and the value gather read
/// rows scattered over the RAM tier, and issuing the next rows' loads early overlaps their
/// cache misses with the current row's arithmetic.
#[inline]
pub fn prefetch(bytes: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    for line in bytes.chunks(64) {
        // SAFETY: a prefetch is a hint that never faults or changes memory; the address is
        // inside a live slice anyway.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                line.as_ptr() as *const i8
            )
        };
    }
}

/// `x ↦ eˣ` over a slice, in place, eight at a time with AVX2/FMA (Cephes' polynomial after a
/// power-of-two range reduction; within 2 ulp of `f32::exp`). Inputs below about -87.3 give 0,
/// above 88.7 give the largest float's neighbourhood: callers pass logits minus their maximum.
/// The remainder estimate and the attention weights take one exponential per term, thousands
/// per query, which libm's scalar `expf` made a visible share of a step.
pub fn exp_in_place(xs: &mut [f32]) {
    let done = exp_accelerated(xs);
    for x in &mut xs[done..] {
        *x = x.exp();
    }
}

#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
))]
#[inline]
fn exp_accelerated(xs: &mut [f32]) -> usize {
    use std::arch::x86_64::*;
    let chunks = xs.len() / 8;
    // SAFETY: the cfg guarantees AVX2 and FMA at compile time. Chunk i loads and stores floats
    // [8i, 8i + 8) of `xs`, with i < ⌊len/8⌋; both are unaligned accesses.
    unsafe {
        let hi = _mm256_set1_ps(88.37626);
        let lo = _mm256_set1_ps(-87.33655);
        let log2e = _mm256_set1_ps(std::f32::consts::LOG2_E);
        let ln2_hi = _mm256_set1_ps(0.693_359_4);
        let ln2_lo = _mm256_set1_ps(-2.121_944_4e-4);
        let c = [
            1.987_569_1e-4f32,
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            0.166_666_65,
            0.5,
        ];
        let one = _mm256_set1_ps(1.0);
        for i in 0..chunks {
            let p = xs.as_mut_ptr().add(8 * i);
            let x0 = _mm256_loadu_ps(p);
            let under = _mm256_cmp_ps(x0, lo, _CMP_LT_OQ);
            let x = _mm256_max_ps(_mm256_min_ps(x0, hi), lo);
            let n = _mm256_round_ps(
                _mm256_mul_ps(x, log2e),
                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
            );
            let r = _mm256_fnmadd_ps(n, ln2_hi, x);
            let r = _mm256_fnmadd_ps(n, ln2_lo, r);
            let mut y = _mm256_set1_ps(c[0]);
            for &ck in &c[1..] {
                y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(ck));
            }
            let r2 = _mm256_mul_ps(r, r);
            let y = _mm256_add_ps(_mm256_fmadd_ps(y, r2, r), one);
            let pow2 = _mm256_slli_epi32(
                _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)),
                23,
            );
            let e = _mm256_mul_ps(y, _mm256_castsi256_ps(pow2));
            _mm256_storeu_ps(p, _mm256_andnot_ps(under, e));
        }
    }
    8 * chunks
}

#[cfg(not(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
)))]
#[inline]
fn exp_accelerated(_xs: &mut [f32]) -> usize {
    0
}

/// f16 little-endian bytes to f32 into `out` (`bytes.len() / 2` of them).
#[inline]
pub fn f16_to_f32(bytes: &[u8], out: &mut [f32]) {
    let n = out.len().min(bytes.len() / 2);
    let done = convert_accelerated(&bytes[..2 * n], &mut out[..n]);
    for (o, c) in out[done..n]
        .iter_mut()
        .zip(bytes[2 * done..2 * n].chunks_exact(2))
    {
        *o = half::f16::from_le_bytes([c[0], c[1]]).to_f32();
    }
}

#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx",
    target_feature = "f16c"
))]
#[inline]
fn convert_accelerated(bytes: &[u8], out: &mut [f32]) -> usize {
    use std::arch::x86_64::*;
    let chunks = out.len() / 8;
    for i in 0..chunks {
        // SAFETY: the cfg guarantees AVX and F16C at compile time. Chunk i reads bytes
        // [16i, 16i + 16) of `bytes` (2n long) and writes floats [8i, 8i + 8) of `out` (n long),
        // i < ⌊n/8⌋; both accesses are unaligned.
        unsafe {
            let h = _mm_loadu_si128(bytes.as_ptr().add(16 * i) as *const __m128i);
            _mm256_storeu_ps(out.as_mut_ptr().add(8 * i), _mm256_cvtph_ps(h));
        }
    }
    8 * chunks
}

#[cfg(not(all(
    target_arch = "x86_64",
    target_feature = "avx",
    target_feature = "f16c"
)))]
#[inline]
fn convert_accelerated(_bytes: &[u8], _out: &mut [f32]) -> usize {
    0
}

/// Scores one block of 4-bit codes (`pairs.len()` bytes of [`crate::codes::CODE_BLOCK`] = 16
/// keys each, byte-major): key i gets `Σ_k w_lo[k]·lo(block[k][i]) + w_hi[k]·hi(block[k][i])`,
/// with `pairs[k]` holding `w_lo` in its low and `w_hi` in its high 16 bits. None without AVX2,
/// where the caller's scalar loop does the work.
#[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
#[inline]
pub fn score_nibble_block(block: &[u8], pairs: &[i32]) -> Option<[i32; 16]> {
    use std::arch::x86_64::*;
    if block.len() < 16 * pairs.len() {
        return None;
    }
    let mut out = [0i32; 16];
    // SAFETY: the cfg guarantees AVX2 at compile time. Byte k of the block is read at
    // [16k, 16k + 16) with k < pairs.len(), inside `block` (checked above); the two stores
    // write 8 i32 each into `out`, which holds 16. All loads and stores are unaligned.
    unsafe {
        let mask = _mm_set1_epi8(0x0F);
        let mut acc0 = _mm256_setzero_si256();
        let mut acc1 = _mm256_setzero_si256();
        for (k, &p) in pairs.iter().enumerate() {
            let lanes = _mm_loadu_si128(block.as_ptr().add(16 * k) as *const __m128i);
            let lo = _mm_and_si128(lanes, mask);
            let hi = _mm_and_si128(_mm_srli_epi16(lanes, 4), mask);
            // (lo, hi) of keys 0..7, then of keys 8..15, widened to i16 pairs.
            let a = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(lo, hi));
            let b = _mm256_cvtepu8_epi16(_mm_unpackhi_epi8(lo, hi));
            let w = _mm256_set1_epi32(p);
            acc0 = _mm256_add_epi32(acc0, _mm256_madd_epi16(a, w));
            acc1 = _mm256_add_epi32(acc1, _mm256_madd_epi16(b, w));
        }
        _mm256_storeu_si256(out.as_mut_ptr() as *mut __m256i, acc0);
        _mm256_storeu_si256(out.as_mut_ptr().add(8) as *mut __m256i, acc1);
    }
    Some(out)
}

#[cfg(not(all(target_arch = "x86_64", target_feature = "avx2")))]
#[inline]
pub fn score_nibble_block(_block: &[u8], _pairs: &[i32]) -> Option<[i32; 16]> {
    None
}

/// Adds to `acc` the scores of one block plane of `bits`-bit codes (1 or 2 bits, `8 / bits`
/// codes per byte, 16 keys each, byte-major): key i gets, per byte k and slot pair p,
/// `w_lo·slot(2p) + w_hi·slot(2p+1)` with `pairs[k · slots/2 + p]` holding `w_lo` in its low and
/// `w_hi` in its high 16 bits (the nibble kernel's scheme, two slots per multiply-add). false
/// without AVX2 or for other widths, where the caller's scalar loop does the work.
#[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
#[inline]
pub fn score_pair_plane(plane: &[u8], bits: u32, pairs: &[i32], acc: &mut [i32; 16]) -> bool {
    use std::arch::x86_64::*;
    if bits != 1 && bits != 2 {
        return false;
    }
    let per_byte = 4 / bits as usize;
    let bytes = pairs.len() / per_byte;
    if plane.len() < 16 * bytes {
        return false;
    }
    // SAFETY: the cfg guarantees AVX2 at compile time. Byte k of the plane is read at
    // [16k, 16k + 16) with k < bytes, inside `plane` (checked above); pairs are indexed below
    // bytes · per_byte = its length or less. `acc` holds 16 i32: the two loads and stores
    // touch 8 each. All loads and stores are unaligned.
    unsafe {
        let mask = _mm_set1_epi8(((1u32 << bits) - 1) as i8);
        let mut acc0 = _mm256_loadu_si256(acc.as_ptr() as *const __m256i);
        let mut acc1 = _mm256_loadu_si256(acc.as_ptr().add(8) as *const __m256i);
        for k in 0..bytes {
            let lanes = _mm_loadu_si128(plane.as_ptr().add(16 * k) as *const __m128i);
            for p in 0..per_byte {
                let shift = (2 * p) as i32 * bits as i32;
                let lo = _mm_and_si128(_mm_srl_epi16(lanes, _mm_cvtsi32_si128(shift)), mask);
                let hi = _mm_and_si128(
                    _mm_srl_epi16(lanes, _mm_cvtsi32_si128(shift + bits as i32)),
                    mask,
                );
                let a = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(lo, hi));
                let b = _mm256_cvtepu8_epi16(_mm_unpackhi_epi8(lo, hi));
                let w = _mm256_set1_epi32(*pairs.get_unchecked(k * per_byte + p));
                acc0 = _mm256_add_epi32(acc0, _mm256_madd_epi16(a, w));
                acc1 = _mm256_add_epi32(acc1, _mm256_madd_epi16(b, w));
            }
        }
        _mm256_storeu_si256(acc.as_mut_ptr() as *mut __m256i, acc0);
        _mm256_storeu_si256(acc.as_mut_ptr().add(8) as *mut __m256i, acc1);
    }
    true
}

#[cfg(not(all(target_arch = "x86_64", target_feature = "avx2")))]
#[inline]
pub fn score_pair_plane(_plane: &[u8], _bits: u32, _pairs: &[i32], _acc: &mut [i32; 16]) -> bool {
    false
}

/// Scores one block of 3-bit codes stored as planes (`codes::planes`): `low` bytes of the low
/// two bits (dimension 4k + s in slot s of byte k), then the high bits (dimension 8m + t in bit
/// t of byte m), 16 keys each, byte-major. Each byte of the low plane is joined with the four
/// high bits of its dimensions, so that every pair of dimensions costs one multiply-add, as in
/// the nibble kernel; `pairs[2k + p]` holds the weights of dimensions 4k + 2p and 4k + 2p + 1.
/// None without AVX2.
#[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
#[inline]
pub fn score_split3_block(block: &[u8], low: usize, pairs: &[i32]) -> Option<[i32; 16]> {
    use std::arch::x86_64::*;
    if pairs.len() != 2 * low || block.len() < 16 * (low + low.div_ceil(2)) {
        return None;
    }
    let mut out = [0i32; 16];
    // SAFETY: the cfg guarantees AVX2 at compile time. Low byte k is read at [16k, 16k + 16)
    // with k < low, its high byte at 16·(low + k/2) with k/2 < ceil(low/2), both inside `block`
    // (checked above); pairs are indexed below 2·low = its length. The two stores write 8 i32
    // each into `out`, which holds 16. All loads and stores are unaligned.
    unsafe {
        let m3 = _mm_set1_epi8(3);
        let m4 = _mm_set1_epi8(4);
        // Bit t of every byte of `b`, moved to bit 2.
        let high = |b: __m128i, t: i32| {
            let moved = if t >= 2 {
                _mm_srl_epi16(b, _mm_cvtsi32_si128(t - 2))
            } else {
                _mm_sll_epi16(b, _mm_cvtsi32_si128(2 - t))
            };
            _mm_and_si128(moved, m4)
        };
        let mut acc0 = _mm256_setzero_si256();
        let mut acc1 = _mm256_setzero_si256();
        for k in 0..low {
            let a = _mm_loadu_si128(block.as_ptr().add(16 * k) as *const __m128i);
            let b = _mm_loadu_si128(block.as_ptr().add(16 * (low + k / 2)) as *const __m128i);
            let o = 4 * (k % 2) as i32;
            for p in 0..2 {
                let (s0, s1) = (2 * p as i32, 2 * p as i32 + 1);
                let c0 = _mm_or_si128(
                    _mm_and_si128(_mm_srl_epi16(a, _mm_cvtsi32_si128(2 * s0)), m3),
                    high(b, o + s0),
                );
                let c1 = _mm_or_si128(
                    _mm_and_si128(_mm_srl_epi16(a, _mm_cvtsi32_si128(2 * s1)), m3),
                    high(b, o + s1),
                );
                let x = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(c0, c1));
                let y = _mm256_cvtepu8_epi16(_mm_unpackhi_epi8(c0, c1));
                let w = _mm256_set1_epi32(*pairs.get_unchecked(2 * k + p));
                acc0 = _mm256_add_epi32(acc0, _mm256_madd_epi16(x, w));
                acc1 = _mm256_add_epi32(acc1, _mm256_madd_epi16(y, w));
            }
        }
        _mm256_storeu_si256(out.as_mut_ptr() as *mut __m256i, acc0);
        _mm256_storeu_si256(out.as_mut_ptr().add(8) as *mut __m256i, acc1);
    }
    Some(out)
}

#[cfg(not(all(target_arch = "x86_64", target_feature = "avx2")))]
#[inline]
pub fn score_split3_block(_block: &[u8], _low: usize, _pairs: &[i32]) -> Option<[i32; 16]> {
    None
}

/// The weights [`score_split3_blocks`] takes, from [`score_split3_block`]'s `pairs` (`2 · low`
/// of them, each two i16 weights): per pair of low-plane bytes `(2j, 2j + 1)` and slot pair
/// `p`, 32 i8, the first 16 the weights of slots `2p` and `2p + 1` of byte 2j repeated eight
/// times, the last 16 those of byte 2j + 1, so that one 256-bit load gives each 128-bit lane the
/// weights of the byte it decodes. Empty when `low` is odd (the kernel decodes two bytes at a
/// time) or a weight does not fit an i8 (`codes::I8_WEIGHT_MAX` keeps 3-bit queries within it).
pub fn split3_pair_i8_weights(pairs: &[i32], low: usize) -> Vec<i8> {
    if !low.is_multiple_of(2) || pairs.len() != 2 * low {
        return Vec::new();
    }
    let halves = |pair: i32| -> Option<[i8; 2]> {
        let lo = i8::try_from(pair as i16).ok()?;
        let hi = i8::try_from((pair >> 16) as i16).ok()?;
        Some([lo, hi])
    };
    let mut out = Vec::with_capacity(32 * low);
    for j in 0..low / 2 {
        for p in 0..2 {
            for byte in [2 * j, 2 * j + 1] {
                let Some(w) = halves(pairs[2 * byte + p]) else {
                    return Vec::new();
                };
                for _ in 0..8 {
                    out.extend(w);
                }
            }
        }
    }
    out
}

/// Pairs of low-plane bytes [`score_split3_blocks`] sums in i16 before widening: each adds at
/// most 2 slot pairs × 2 × 7 × 128 = 3,584 to a lane, so 9 fit under `i16::MAX` and 10 do not.
const SPLIT3_I16_RUN: usize = 8;

/// [`score_split3_block`] for `Q` queries at once, the same integer sums: two low-plane bytes
/// (32 keys' worth) are decoded per 256-bit register, one per 128-bit lane, and each decoded
/// pair of dimensions (codes 0-7, as u8) is multiplied by every query's i8 weights
/// ([`split3_pair_i8_weights`]) with `pmaddubsw`, 32 products per instruction, summed in i16
/// for [`SPLIT3_I16_RUN`] byte pairs, then widened. So the decoding is shared by the queries of
/// a GQA group that probe the same list. false, having done nothing, without AVX2 or where the
/// shapes do not fit.
#[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
#[inline]
pub fn score_split3_blocks<const Q: usize>(
    block: &[u8],
    low: usize,
    weights: [&[i8]; Q],
    out: &mut [[i32; 16]; Q],
) -> bool {
    use std::arch::x86_64::*;
    if !low.is_multiple_of(2)
        || block.len() < 16 * (low + low / 2)
        || weights.iter().any(|w| w.len() != 32 * low)
    {
        return false;
    }
    // SAFETY: the cfg guarantees AVX2 at compile time. Low bytes 2j and 2j + 1 are read at
    // [32j, 32j + 32) with j < low/2, their high byte at 16·(low + j), both inside `block`
    // (checked above); weights are read at [32i, 32i + 32) with i = 2j + p < low, inside each
    // query's 32·low (checked above). The stores write 8 i32 at [8h, 8h + 8), h < 2, of each
    // `out[q]`, which holds 16. All loads and stores are unaligned.
    unsafe {
        let m3 = _mm256_set1_epi8(3);
        let m4 = _mm256_set1_epi8(4);
        // Per query, keys 0-7 and 8-15 in i32.
        let mut wide = [[_mm256_setzero_si256(); 2]; Q];
        for run in (0..low / 2).step_by(SPLIT3_I16_RUN) {
            // Per query, keys 0-7 and 8-15 in i16, each 128-bit lane its own byte's sums.
            let mut acc = [[_mm256_setzero_si256(); 2]; Q];
            for j in run..(run + SPLIT3_I16_RUN).min(low / 2) {
                let a = _mm256_loadu_si256(block.as_ptr().add(32 * j) as *const __m256i);
                let b = _mm_loadu_si128(block.as_ptr().add(16 * (low + j)) as *const __m128i);
                // Lane 0 decodes byte 2j, whose high bits are bits 0-3 of `b`; lane 1 byte
                // 2j + 1, whose high bits are bits 4-7, moved down to 0-3.
                let bb =
                    _mm256_inserti128_si256::<1>(_mm256_castsi128_si256(b), _mm_srli_epi16::<4>(b));
                // The 3-bit code of slot s: low bits 2s, 2s + 1 of `a`, high bit s of `bb`.
                let codes = [
                    _mm256_or_si256(
                        _mm256_and_si256(a, m3),
                        _mm256_and_si256(_mm256_slli_epi16::<2>(bb), m4),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16::<2>(a), m3),
                        _mm256_and_si256(_mm256_slli_epi16::<1>(bb), m4),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16::<4>(a), m3),
                        _mm256_and_si256(bb, m4),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16::<6>(a), m3),
                        _mm256_and_si256(_mm256_srli_epi16::<1>(bb), m4),
                    ),
                ];
                for p in 0..2 {
                    // Per key, the codes of slots 2p and 2p + 1 side by side: keys 0-7 and
                    // 8-15 (of each lane's byte).
                    let x = [
                        _mm256_unpacklo_epi8(codes[2 * p], codes[2 * p + 1]),
                        _mm256_unpackhi_epi8(codes[2 * p], codes[2 * p + 1]),
                    ];
                    for (w, acc) in weights.iter().zip(acc.iter_mut()) {
                        let w =
                            _mm256_loadu_si256(w.as_ptr().add(32 * (2 * j + p)) as *const __m256i);
                        for (a, x) in acc.iter_mut().zip(x) {
                            *a = _mm256_add_epi16(*a, _mm256_maddubs_epi16(x, w));
                        }
                    }
                }
            }
            // Each key's sum is split over the two lanes (even and odd low bytes).
            for (acc, wide) in acc.iter().zip(wide.iter_mut()) {
                for (a, w) in acc.iter().zip(wide.iter_mut()) {
                    let even = _mm256_cvtepi16_epi32(_mm256_castsi256_si128(*a));
                    let odd = _mm256_cvtepi16_epi32(_mm256_extracti128_si256::<1>(*a));
                    *w = _mm256_add_epi32(*w, _mm256_add_epi32(even, odd));
                }
            }
        }
        for (wide, out) in wide.iter().zip(out.iter_mut()) {
            for (h, w) in wide.iter().enumerate() {
                _mm256_storeu_si256(out.as_mut_ptr().add(8 * h) as *mut __m256i, *w);
            }
        }
    }
    true
}

#[cfg(not(all(target_arch = "x86_64", target_feature = "avx2")))]
#[inline]
pub fn score_split3_blocks<const Q: usize>(
    _block: &[u8],
    _low: usize,
    _weights: [&[i8]; Q],
    _out: &mut [[i32; 16]; Q],
) -> bool {
    false
}

/// `Σ_j low[j]·(code[j] & 15) + high[j]·(code[j] >> 4)`: one 4-bit code (two dimensions per
/// byte, low nibble first) against its i16 weights. Centroid codes are scored one row at a time,
/// a few hundred per query head; the block kernels need 32 keys transposed.
pub fn score_nibble_row(code: &[u8], low: &[i16], high: &[i16]) -> i32 {
    let n = code.len().min(low.len()).min(high.len());
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx2")))]
    let (mut acc, done) = (0i32, 0);
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
    let (mut acc, done) = {
        use std::arch::x86_64::*;
        let done = n / 16 * 16;
        // SAFETY: the cfg guarantees AVX2 at compile time; every load reads 16 bytes of `code`
        // or 16 i16 of `low` and `high` at offsets below `done`, which is at most their lengths.
        unsafe {
            let nibble = _mm_set1_epi8(15);
            let mut sum = _mm256_setzero_si256();
            for j in (0..done).step_by(16) {
                let bytes = _mm_loadu_si128(code.as_ptr().add(j) as *const __m128i);
                let lo = _mm256_cvtepu8_epi16(_mm_and_si128(bytes, nibble));
                let hi = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16::<4>(bytes), nibble));
                let wl = _mm256_loadu_si256(low.as_ptr().add(j) as *const __m256i);
                let wh = _mm256_loadu_si256(high.as_ptr().add(j) as *const __m256i);
                sum = _mm256_add_epi32(sum, _mm256_madd_epi16(lo, wl));
                sum = _mm256_add_epi32(sum, _mm256_madd_epi16(hi, wh));
            }
            let half = _mm_add_epi32(
                _mm256_castsi256_si128(sum),
                _mm256_extracti128_si256::<1>(sum),
            );
            let quad = _mm_add_epi32(half, _mm_shuffle_epi32::<0b01_00_11_10>(half));
            let one = _mm_add_epi32(quad, _mm_shuffle_epi32::<0b10_11_00_01>(quad));
            (_mm_cvtsi128_si32(one), done)
        }
    };
    for j in done..n {
        acc += low[j] as i32 * (code[j] & 15) as i32 + high[j] as i32 * (code[j] >> 4) as i32;
    }
    acc
}

/// For each 8-bit mask, the positions of its set bits in ascending order, one per byte (the
/// rest 0): the lane permutation that packs the selected lanes of 8 to the front.
#[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
const PACK_LANES: [u64; 256] = {
    let mut table = [0u64; 256];
    let mut mask = 0;
    while mask < 256 {
        let (mut packed, mut at, mut lane) = (0u64, 0, 0);
        while lane < 8 {
            if mask >> lane & 1 == 1 {
                packed |= (lane as u64) << (8 * at);
                at += 1;
            }
            lane += 1;
        }
        table[mask] = packed;
        mask += 1;
    }
    table
};

/// Appends the lanes of `lanes` that `mask` selects, in lane order, with no branch per lane.
///
/// # Safety
/// The CPU must have AVX2 (the caller's cfg guarantees it).
#[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
#[inline]
unsafe fn append_lanes(lanes: std::arch::x86_64::__m256i, mask: u32, out: &mut Vec<u32>) {
    use std::arch::x86_64::*;
    out.reserve(8);
    let len = out.len();
    let order = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(PACK_LANES[mask as usize & 0xff] as i64));
    // SAFETY: `reserve(8)` leaves room for 8 u32 past `len`, so the unaligned 32-byte store
    // stays inside the allocation; the first `count_ones(mask)` of them are the selected lanes,
    // written before the length covers them.
    unsafe {
        _mm256_storeu_si256(
            out.as_mut_ptr().add(len) as *mut __m256i,
            _mm256_permutevar8x32_epi32(lanes, order),
        );
        out.set_len(len + (mask & 0xff).count_ones() as usize);
    }
}

/// One pass over `values` by their `total_cmp` order keys (`linalg::order_key`): appends the
/// keys within `[from, to]` to `within`, in order, and returns how many keys exceed `to`.
pub fn keys_within(values: &[f32], from: u32, to: u32, within: &mut Vec<u32>) -> usize {
    let mut above = 0usize;
    // Whole chunks of 8 with AVX2; what is left (everything, without AVX2) one at a time.
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx2")))]
    let done = 0;
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
    let done = {
        use std::arch::x86_64::*;
        let done = values.len() / 8 * 8;
        for chunk in values[..done].chunks_exact(8) {
            // SAFETY: the cfg guarantees AVX2 at compile time; the load reads the chunk's 8
            // floats.
            unsafe {
                let bits = _mm256_castps_si256(_mm256_loadu_ps(chunk.as_ptr()));
                let (signed, key) = signed_and_order_keys(bits);
                let flip = |k: u32| _mm256_set1_epi32((k ^ 0x8000_0000) as i32);
                let over = _mm256_cmpgt_epi32(signed, flip(to));
                let below = _mm256_cmpgt_epi32(flip(from), signed);
                let outside = _mm256_or_si256(below, over);
                let outside = _mm256_movemask_ps(_mm256_castsi256_ps(outside)) as u32;
                above +=
                    (_mm256_movemask_ps(_mm256_castsi256_ps(over)) as u32).count_ones() as usize;
                append_lanes(key, !outside & 0xff, within);
            }
        }
        done
    };
    for &v in &values[done..] {
        let key = crate::linalg::order_key(v);
        above += (key > to) as usize;
        if key >= from && key <= to {
            within.push(key);
        }
    }
    above
}

/// Appends to `out`, ascending, the indices of `values` whose `total_cmp` order key is at
/// least `from`.
pub fn indices_at_least(values: &[f32], from: u32, out: &mut Vec<u32>) {
    // Whole chunks of 8 with AVX2; what is left (everything, without AVX2) one at a time.
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx2")))]
    let done = 0;
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
    let done = {
        use std::arch::x86_64::*;
        let done = values.len() / 8 * 8;
        for (c, chunk) in values[..done].chunks_exact(8).enumerate() {
            // SAFETY: the cfg guarantees AVX2 at compile time; the load reads the chunk's 8
            // floats.
            unsafe {
                let bits = _mm256_castps_si256(_mm256_loadu_ps(chunk.as_ptr()));
                let (signed, _) = signed_and_order_keys(bits);
                let floor = _mm256_set1_epi32((from ^ 0x8000_0000) as i32);
                let below = _mm256_cmpgt_epi32(floor, signed);
                let taken = !(_mm256_movemask_ps(_mm256_castsi256_ps(below)) as u32) & 0xff;
                let index = _mm256_add_epi32(
                    _mm256_set1_epi32((8 * c) as i32),
                    _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                );
                append_lanes(index, taken, out);
            }
        }
        done
    };
    for (i, &v) in values.iter().enumerate().skip(done) {
        if crate::linalg::order_key(v) >= from {
            out.push(i as u32);
        }
    }
}

/// The order keys of 8 floats with their sign bit flipped (so that signed compares order
/// them), and the keys themselves.
///
/// # Safety
/// The CPU must have AVX2 (the caller's cfg guarantees it).
#[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
#[inline]
unsafe fn signed_and_order_keys(
    bits: std::arch::x86_64::__m256i,
) -> (std::arch::x86_64::__m256i, std::arch::x86_64::__m256i) {
    use std::arch::x86_64::*;
    let negative = _mm256_srai_epi32::<31>(bits);
    let signed = _mm256_xor_si256(
        bits,
        _mm256_and_si256(negative, _mm256_set1_epi32(i32::MAX)),
    );
    (
        signed,
        _mm256_xor_si256(signed, _mm256_set1_epi32(i32::MIN)),
    )
}

/// `out[d] += Σ_i weights[i] · rows[i][d]` over rows of `out.len()` little-endian f16 values,
/// prefetching `ahead` rows ahead, with the sums held in registers (no row converted into a
/// buffer): in one pass in AVX-512 registers for 64, 128 or 256 dimensions on a CPU with
/// AVX-512 F, else 64 dimensions at a time in AVX2 registers for any multiple of 64. Returns
/// false, having done nothing, anywhere else (or if a row is short), for the caller's portable
/// loop.
pub fn add_weighted_f16_rows(
    weights: &[f32],
    rows: &[&[u8]],
    out: &mut [f32],
    ahead: usize,
) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let dim = out.len();
        if weights.len() != rows.len() || rows.iter().any(|r| r.len() < 2 * dim) {
            return false;
        }
        if !is_x86_feature_detected!("avx512f") {
            return weighted_rows_avx2(weights, rows, out, ahead);
        }
        // SAFETY: AVX-512 F was detected just above; every row holds at least `2 · dim` bytes
        // and `out` exactly `dim` floats, `dim = 16 · R` in each arm.
        unsafe {
            match dim {
                64 => weighted_rows_avx512::<4>(weights, rows, out, ahead),
                128 => weighted_rows_avx512::<8>(weights, rows, out, ahead),
                256 => weighted_rows_avx512::<16>(weights, rows, out, ahead),
                _ => return false,
            }
        }
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (weights, rows, out, ahead);
        false
    }
}

/// # Safety
/// The CPU must have AVX-512 F; `out` holds `16 · R` floats and every row at least `32 · R`
/// bytes; `weights` and `rows` have the same length (checked by the caller).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn weighted_rows_avx512<const R: usize>(
    weights: &[f32],
    rows: &[&[u8]],
    out: &mut [f32],
    ahead: usize,
) {
    use std::arch::x86_64::*;
    // SAFETY: row loads read bytes [32r, 32r + 32) with r < R of rows at least 32·R long; the
    // final loads and stores touch floats [16r, 16r + 16) of `out`, 16·R long. All unaligned.
    unsafe {
        let mut acc = [_mm512_setzero_ps(); R];
        for (i, (&w, row)) in weights.iter().zip(rows).enumerate() {
            if let Some(next) = rows.get(i + ahead) {
                prefetch(next);
            }
            let wv = _mm512_set1_ps(w);
            for (r, a) in acc.iter_mut().enumerate() {
                let h = _mm256_loadu_si256(row.as_ptr().add(32 * r) as *const __m256i);
                *a = _mm512_fmadd_ps(_mm512_cvtph_ps(h), wv, *a);
            }
        }
        for (r, a) in acc.iter().enumerate() {
            let o = out.as_mut_ptr().add(16 * r);
            _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), *a));
        }
    }
}

/// [`add_weighted_f16_rows`] without AVX-512, for dimensions that are a multiple of 64: 64
/// dimensions at a time in eight AVX2 registers (sixteen would need more registers than AVX2
/// has), over runs of `WEIGHTED_ROWS_RUN` rows, so that the second 64 dimensions of a row are
/// read from L1 where the first pass left them.
#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma",
    target_feature = "f16c"
))]
fn weighted_rows_avx2(weights: &[f32], rows: &[&[u8]], out: &mut [f32], ahead: usize) -> bool {
    use std::arch::x86_64::*;
    const WEIGHTED_ROWS_RUN: usize = 32;
    let dim = out.len();
    if dim == 0 || !dim.is_multiple_of(64) || weights.len() != rows.len() {
        return false;
    }
    for (run, (ws, rs)) in weights
        .chunks(WEIGHTED_ROWS_RUN)
        .zip(rows.chunks(WEIGHTED_ROWS_RUN))
        .enumerate()
    {
        for part in 0..dim / 64 {
            let o = &mut out[64 * part..64 * part + 64];
            // SAFETY: the cfg guarantees AVX2, FMA and F16C at compile time. Each row holds at
            // least `2 · dim` bytes (checked by the caller), so the 16-byte loads at
            // 128·part + 16·r with r < 8 stay inside it; `o` holds 64 floats, and the loads and
            // stores touch [8r, 8r + 8) of it. All unaligned.
            unsafe {
                let mut acc = [_mm256_setzero_ps(); 8];
                for (r, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_loadu_ps(o.as_ptr().add(8 * r));
                }
                for (i, (&w, row)) in ws.iter().zip(rs).enumerate() {
                    if part == 0 {
                        if let Some(next) = rows.get(run * WEIGHTED_ROWS_RUN + i + ahead) {
                            prefetch(next);
                        }
                    }
                    let wv = _mm256_set1_ps(w);
                    let at = row.as_ptr().add(128 * part);
                    for (r, a) in acc.iter_mut().enumerate() {
                        let h = _mm_loadu_si128(at.add(16 * r) as *const __m128i);
                        *a = _mm256_fmadd_ps(_mm256_cvtph_ps(h), wv, *a);
                    }
                }
                for (r, a) in acc.iter().enumerate() {
                    _mm256_storeu_ps(o.as_mut_ptr().add(8 * r), *a);
                }
            }
        }
    }
    true
}

#[cfg(all(
    target_arch = "x86_64",
    not(all(
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    ))
))]
fn weighted_rows_avx2(_weights: &[f32], _rows: &[&[u8]], _out: &mut [f32], _ahead: usize) -> bool {
    false
}

/// Whether this build has [`score_split3_blocks`] (it needs AVX2 only).
const SHARED_SCAN_KERNEL: bool = cfg!(all(target_arch = "x86_64", target_feature = "avx2"));

/// Whether this build has `weighted_rows_avx2` (AVX2, FMA and F16C).
const AVX2_GATHER_KERNEL: bool = cfg!(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma",
    target_feature = "f16c"
));

/// Which kernels the hot paths run on this CPU, in words: the fast paths depend on features
/// checked at run time, and a machine without them is silently slower (`strata bench decode`
/// prints this).
pub fn kernels() -> String {
    #[cfg(target_arch = "x86_64")]
    let avx512 = is_x86_feature_detected!("avx512f");
    #[cfg(not(target_arch = "x86_64"))]
    let avx512 = false;
    let scan = if split3_vnni_available() {
        "AVX-512 VNNI, one query per decoding"
    } else if SHARED_SCAN_KERNEL {
        "AVX2, up to four queries per decoding"
    } else {
        "portable"
    };
    let gather = if avx512 {
        "AVX-512 (64/128/256 dims), else portable"
    } else if AVX2_GATHER_KERNEL {
        "AVX2 (multiples of 64 dims), else portable"
    } else {
        "portable"
    };
    format!("3-bit code scan {scan}; value gather {gather}")
}

/// Whether this CPU runs [`score_split3_block_vnni`]: AVX-512 with VNNI (`vpdpbusd`, four u8 ×
/// i8 products summed per lane) and VBMI (`vpermb`, the byte transpose). Checked at run time,
/// since the build targets x86-64-v3 (AVX2) and the kernel must not run elsewhere.
pub fn split3_vnni_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vnni")
            && is_x86_feature_detected!("avx512vbmi")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The weights [`score_split3_block_vnni`] takes, from the rounded integer weight `w[d]` of
/// every dimension (`4 · low` of them, 0 past the key's dimensions): each weight is split as
/// `128·a + b` with `a` in [-64, 63] and `b` in [0, 127], both i8, so that `vpdpbusd` (u8 codes
/// × i8 weights) sums the same integers `pmaddwd` does with i16 weights. Four dimensions' `a`
/// (then `b`) share an i32: per group of four low-plane bytes, per slot; then per group of four
/// high-plane bytes, per bit. Empty when the kernel does not apply (`low` not a multiple of 8,
/// or a weight outside ±8191).
pub fn split3_vnni_weights(w: &[i32], low: usize) -> Vec<i32> {
    if !low.is_multiple_of(8) || w.len() != 4 * low || w.iter().any(|x| x.abs() > 8191) {
        return Vec::new();
    }
    let split = |x: i32| ((x >> 7) as i8 as u8, (x & 127) as u8);
    let pack = |dims: [usize; 4]| {
        let parts = dims.map(|d| split(w[d]));
        (
            i32::from_le_bytes(parts.map(|p| p.0)),
            i32::from_le_bytes(parts.map(|p| p.1)),
        )
    };
    let mut out = Vec::with_capacity(4 * low);
    // Low plane: byte k holds dimensions 4k + s in slot s.
    for j in 0..low / 4 {
        for s in 0..4 {
            let (a, b) = pack([0, 1, 2, 3].map(|l| 4 * (4 * j + l) + s));
            out.extend([a, b]);
        }
    }
    // High plane: byte m holds dimension 8m + t in bit t.
    for g in 0..low / 8 {
        for t in 0..8 {
            let (a, b) = pack([0, 1, 2, 3].map(|l| 8 * (4 * g + l) + t));
            out.extend([a, b]);
        }
    }
    out
}

/// [`score_split3_block`] with AVX-512 VNNI, the same integer sums: every 64-byte row of four
/// plane bytes × 16 keys is transposed so that each i32 lane holds one key's four bytes, then
/// per slot (bit, for the high plane) the codes are masked out and `vpdpbusd` adds four
/// dimensions at once, twice (the weights' `a` and `b` parts, see [`split3_vnni_weights`]). About
/// a quarter of the instructions of the AVX2 kernel. None where the CPU lacks the features or
/// the shapes do not fit.
pub fn score_split3_block_vnni(block: &[u8], low: usize, weights: &[i32]) -> Option<[i32; 16]> {
    if weights.is_empty()
        || weights.len() != 4 * low
        || !low.is_multiple_of(8)
        || block.len() < 16 * (low + low / 2)
        || !split3_vnni_available()
    {
        return None;
    }
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: the features the kernel is compiled for were detected just above, and the
        // lengths it reads within were checked there.
        Some(unsafe { split3_vnni(block, low, weights) })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        None
    }
}

/// Byte `4i + l` of the transposed row is byte `16l + i` of the loaded one: key i's four bytes.
#[cfg(target_arch = "x86_64")]
const TRANSPOSE_4X16: [u8; 64] = {
    let mut t = [0u8; 64];
    let mut n = 0;
    while n < 64 {
        t[n] = ((n % 4) * 16 + n / 4) as u8;
        n += 1;
    }
    t
};

/// # Safety
/// The CPU must have AVX-512 F, BW, VNNI and VBMI; `low` a multiple of 8, `weights` of
/// `4 · low` i32 and `block` at least `24 · low` bytes (checked by the caller).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx512vbmi")]
unsafe fn split3_vnni(block: &[u8], low: usize, weights: &[i32]) -> [i32; 16] {
    use std::arch::x86_64::*;
    let mut out = [0i32; 16];
    // SAFETY: low-plane row j reads bytes [64j, 64j + 64) with j < low/4, high-plane row g
    // bytes 16·low + [64g, 64g + 64) with g < low/8: all below 24·low ≤ block.len(). Weight i
    // is read for i < 2·4·(low/4) + 2·8·(low/8) = 4·low = weights.len(). The table holds 64
    // bytes and `out` 16 i32. All loads and stores are unaligned.
    unsafe {
        let idx = _mm512_loadu_si512(TRANSPOSE_4X16.as_ptr() as *const _);
        let m3 = _mm512_set1_epi8(3);
        let m1 = _mm512_set1_epi8(1);
        // One pair of accumulators per slot (bit): `vpdpbusd` takes several cycles, and one
        // chain through all of a block's slots waited on it.
        let zero = _mm512_setzero_si512();
        let (mut la, mut lb, mut ha, mut hb) = ([zero; 4], [zero; 4], [zero; 4], [zero; 4]);
        let w = weights.as_ptr();
        let mut wi = 0;
        for j in 0..low / 4 {
            let rows = _mm512_loadu_si512(block.as_ptr().add(64 * j) as *const _);
            let t = _mm512_permutexvar_epi8(idx, rows);
            for s in 0..4 {
                let v = _mm512_and_si512(_mm512_srl_epi16(t, _mm_cvtsi32_si128(2 * s)), m3);
                la[s as usize] =
                    _mm512_dpbusd_epi32(la[s as usize], v, _mm512_set1_epi32(*w.add(wi)));
                lb[s as usize] =
                    _mm512_dpbusd_epi32(lb[s as usize], v, _mm512_set1_epi32(*w.add(wi + 1)));
                wi += 2;
            }
        }
        let high = block.as_ptr().add(16 * low);
        for g in 0..low / 8 {
            let rows = _mm512_loadu_si512(high.add(64 * g) as *const _);
            let t = _mm512_permutexvar_epi8(idx, rows);
            for b in 0..8 {
                let v = _mm512_and_si512(_mm512_srl_epi16(t, _mm_cvtsi32_si128(b)), m1);
                let a = (b % 4) as usize;
                ha[a] = _mm512_dpbusd_epi32(ha[a], v, _mm512_set1_epi32(*w.add(wi)));
                hb[a] = _mm512_dpbusd_epi32(hb[a], v, _mm512_set1_epi32(*w.add(wi + 1)));
                wi += 2;
            }
        }
        let sum4 = |x: [__m512i; 4]| {
            _mm512_add_epi32(_mm512_add_epi32(x[0], x[1]), _mm512_add_epi32(x[2], x[3]))
        };
        // Σ w·(low + 4·high) with w = 128·a + b.
        let lo = _mm512_add_epi32(_mm512_slli_epi32::<7>(sum4(la)), sum4(lb));
        let hi = _mm512_add_epi32(_mm512_slli_epi32::<7>(sum4(ha)), sum4(hb));
        let sum = _mm512_add_epi32(lo, _mm512_slli_epi32::<2>(hi));
        _mm512_storeu_si512(out.as_mut_ptr() as *mut _, sum);
    }
    out
}

/// The SIMD part: the sum over the first `8·⌊n/8⌋` elements and that count.
#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx",
    target_feature = "f16c",
    target_feature = "fma"
))]
#[inline]
fn accelerated(bytes: &[u8], q: &[f32]) -> (f32, usize) {
    use std::arch::x86_64::*;
    let chunks = q.len() / 8;
    // SAFETY: the cfg above guarantees AVX, F16C and FMA at compile time. Chunk i reads bytes
    // [16i, 16i + 16) and floats [8i, 8i + 8); with i < chunks = ⌊n/8⌋ both lie within
    // `bytes` (2n long) and `q` (n long). Both loads are unaligned loads.
    unsafe {
        let mut acc0 = _mm256_setzero_ps();
        let mut acc1 = _mm256_setzero_ps();
        let mut i = 0;
        while i + 1 < chunks {
            let h0 = _mm_loadu_si128(bytes.as_ptr().add(16 * i) as *const __m128i);
            let h1 = _mm_loadu_si128(bytes.as_ptr().add(16 * i + 16) as *const __m128i);
            acc0 = _mm256_fmadd_ps(
                _mm256_cvtph_ps(h0),
                _mm256_loadu_ps(q.as_ptr().add(8 * i)),
                acc0,
            );
            acc1 = _mm256_fmadd_ps(
                _mm256_cvtph_ps(h1),
                _mm256_loadu_ps(q.as_ptr().add(8 * i + 8)),
                acc1,
            );
            i += 2;
        }
        if i < chunks {
            let h = _mm_loadu_si128(bytes.as_ptr().add(16 * i) as *const __m128i);
            acc0 = _mm256_fmadd_ps(
                _mm256_cvtph_ps(h),
                _mm256_loadu_ps(q.as_ptr().add(8 * i)),
                acc0,
            );
        }
        let acc = _mm256_add_ps(acc0, acc1);
        let s = _mm_add_ps(_mm256_extractf128_ps(acc, 1), _mm256_castps256_ps128(acc));
        let s = _mm_hadd_ps(s, s);
        let s = _mm_hadd_ps(s, s);
        (_mm_cvtss_f32(s), 8 * chunks)
    }
}

/// Without F16C at compile time the scalar tail does all the work.
#[cfg(not(all(
    target_arch = "x86_64",
    target_feature = "avx",
    target_feature = "f16c",
    target_feature = "fma"
)))]
#[inline]
fn accelerated(_bytes: &[u8], _q: &[f32]) -> (f32, usize) {
    (0.0, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_report_names_what_runs() {
        let k = kernels();
        assert_eq!(k.contains("VNNI"), split3_vnni_available(), "{k}");
        #[cfg(target_arch = "x86_64")]
        assert_eq!(
            k.contains("gather AVX-512"),
            is_x86_feature_detected!("avx512f"),
            "{k}"
        );
    }

    #[test]
    fn weighted_f16_rows_match_the_plain_sums() {
        for dim in [64usize, 128, 256, 96] {
            let n = 37;
            let rows: Vec<Vec<u8>> = (0..n)
                .map(|i| {
                    (0..dim)
                        .flat_map(|d| {
                            let x = ((i * 31 + d * 7) % 19) as f32 * 0.37 - 3.0;
                            half::f16::from_f32(x).to_le_bytes()
                        })
                        .collect()
                })
                .collect();
            let refs: Vec<&[u8]> = rows.iter().map(|r| r.as_slice()).collect();
            let weights: Vec<f32> = (0..n).map(|i| 1.0 / (1.0 + i as f32)).collect();
            let mut want = vec![0.5f32; dim];
            for (w, r) in weights.iter().zip(&rows) {
                for (d, o) in want.iter_mut().enumerate() {
                    *o += w * half::f16::from_le_bytes([r[2 * d], r[2 * d + 1]]).to_f32();
                }
            }
            let mut got = vec![0.5f32; dim];
            if !add_weighted_f16_rows(&weights, &refs, &mut got, 8) {
                assert!(
                    dim == 96 || !AVX2_GATHER_KERNEL,
                    "dim {dim}: no kernel on an x86-64-v3 CPU"
                );
                assert!(
                    got.iter().all(|&o| o == 0.5),
                    "dim {dim}: declined but wrote"
                );
                continue;
            }
            for (d, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - w).abs() <= 1e-4 * w.abs().max(1.0),
                    "dim {dim}, d {d}: {g} vs {w}"
                );
            }
            // A short row is declined, not read past.
            let mut short = refs.clone();
            short[5] = &rows[5][..2 * dim - 2];
            assert!(!add_weighted_f16_rows(&weights, &short, &mut got, 8));
        }
    }

    #[test]
    fn exp_matches_libm_within_a_few_ulp() {
        let xs: Vec<f32> = (0..4001)
            .map(|i| -100.0 + i as f32 * 0.047)
            .chain([
                0.0,
                -0.0,
                -1e-7,
                1e-7,
                88.0,
                -87.0,
                -87.5,
                -200.0,
                f32::NEG_INFINITY,
            ])
            .collect();
        let mut got = xs.clone();
        exp_in_place(&mut got);
        for (x, g) in xs.iter().zip(&got) {
            let want = x.exp();
            if *x < -87.33 {
                assert!(*g <= want.max(1e-37), "exp({x}) = {g}, want about {want}");
            } else {
                assert!(
                    (g - want).abs() <= 3e-7 * want,
                    "exp({x}) = {g}, want {want}"
                );
            }
        }
    }

    #[test]
    fn conversion_matches_half_for_every_length() {
        for n in [0usize, 1, 7, 8, 9, 17, 128, 131] {
            let v: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.7).sin() * 1000.0).collect();
            let bytes: Vec<u8> = v
                .iter()
                .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
                .collect();
            let mut out = vec![0f32; n];
            f16_to_f32(&bytes, &mut out);
            let expect: Vec<f32> = v.iter().map(|x| half::f16::from_f32(*x).to_f32()).collect();
            assert_eq!(out, expect, "n={n}");
        }
    }

    #[test]
    fn the_nibble_row_kernel_sums_what_the_formula_sums() {
        let mut x = 11u64;
        let mut next = || {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 33) as u32
        };
        // Lengths around the 16-byte chunks, so that both the vector and the scalar paths run.
        for n in [1, 15, 16, 17, 32, 48, 64, 100, 128] {
            let code: Vec<u8> = (0..n).map(|_| next() as u8).collect();
            let low: Vec<i16> = (0..n).map(|_| next() as i16).collect();
            let high: Vec<i16> = (0..n).map(|_| next() as i16).collect();
            let want: i32 = (0..n)
                .map(|j| {
                    low[j] as i32 * (code[j] & 15) as i32 + high[j] as i32 * (code[j] >> 4) as i32
                })
                .sum();
            assert_eq!(score_nibble_row(&code, &low, &high), want, "{n} bytes");
        }
    }

    #[test]
    fn key_scans_order_values_as_total_cmp_does() {
        let specials = [
            0.0,
            -0.0,
            1.5,
            -1.5,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MAX,
            -f32::MAX,
            f32::MIN_POSITIVE,
            -f32::MIN_POSITIVE,
            f32::NAN,
            -f32::NAN,
            3.0e-42,
            -7.25,
            100.0,
            -100.0,
        ];
        let key = |v: f32| {
            let b = v.to_bits();
            if b >> 31 == 1 {
                !b
            } else {
                b | 0x8000_0000
            }
        };
        // Lengths around the 8-lane chunks, so that both the packed and the one-at-a-time
        // paths run.
        for start in 0..specials.len() {
            for len in [1, 7, 8, 9, 16, 23] {
                let values: Vec<f32> = (0..len)
                    .map(|i| specials[(start + 3 * i) % specials.len()])
                    .collect();
                for &a in &specials {
                    for &b in &specials[..6] {
                        let (from, to) = (key(b).min(key(a)), key(b).max(key(a)));
                        let mut within = Vec::new();
                        let above = keys_within(&values, from, to, &mut within);
                        let keys = values.iter().map(|&v| key(v));
                        assert_eq!(above, keys.clone().filter(|&k| k > to).count(), "{a} {b}");
                        let want: Vec<u32> = keys.filter(|&k| k >= from && k <= to).collect();
                        assert_eq!(within, want, "keys within {a}, {b}");
                        let mut at_least = Vec::new();
                        indices_at_least(&values, from, &mut at_least);
                        let want: Vec<u32> = (0..len as u32)
                            .filter(|&i| key(values[i as usize]) >= from)
                            .collect();
                        assert_eq!(at_least, want, "indices at least {b}");
                    }
                }
            }
        }
    }

    #[test]
    fn matches_the_scalar_product_for_every_length() {
        for n in [0usize, 1, 7, 8, 9, 15, 16, 17, 64, 127, 128, 256] {
            let k: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.37).sin() * 3.0).collect();
            let q: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.11).cos()).collect();
            let bytes: Vec<u8> = k
                .iter()
                .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                .collect();
            let expect: f32 = k
                .iter()
                .zip(&q)
                .map(|(a, b)| half::f16::from_f32(*a).to_f32() * b)
                .sum();
            let got = dot_f16_bytes(&bytes, &q);
            assert!(
                (got - expect).abs() <= 1e-4 * (1.0 + expect.abs()),
                "n={n}: {got} vs {expect}"
            );
        }
    }
}
