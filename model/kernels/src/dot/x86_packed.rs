//! x86-64 kernels for interleaved weight groups ([`crate::pack`]): AVX2 and AVX-512 VNNI on
//! 256-bit registers, and AVX-512 VNNI on 512-bit registers (two groups at once) for
//! batches of four rows or more. Each lane of a register is one weight row, so a
//! block's integer sums, its scales and the accumulator are all one vector: no horizontal
//! sums, and one activation load (four bytes broadcast) serves eight rows.
//!
//! They do exactly what [`super::packed::dot_group`] does, operation for operation, and are
//! tested to give its bits.
//!
//! Safety: every function here is `unsafe` only because of `#[target_feature]`; the kernel
//! is chosen only for a CPU that has the features (see [`Kernel::new`]), and every memory
//! access goes through a bounds-checked slice.
#![allow(unsafe_code)]

use std::arch::x86_64::*;

use crate::act::{Q8Acts, Q8KActs, Q8KRow, Q8Row};
use crate::cpu::{self, Isa};
use crate::format::{GgmlType, QK, QK_K};
use crate::pack::GROUP;

const T_Q4_0: u8 = 0;
const T_Q4_1: u8 = 1;
const T_Q5_0: u8 = 2;
const T_Q8_0: u8 = 4;

/// Activation rows a multi-row kernel takes at once.
const ROWS: usize = 4;

/// Four activation bytes `q[at..at + 4]` in every 32-bit lane.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn bcast4(q: &[i8], at: usize) -> __m256i {
    let four: [u8; 4] = std::array::from_fn(|k| q[at + k] as u8);
    _mm256_set1_epi32(i32::from_le_bytes(four))
}

/// A packed block's header field `f` (its eight f16 scales, or minimums) as f32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn field(blk: &[u8], f: usize) -> __m256 {
    let h = &blk[16 * f..16 * f + 16];
    _mm256_cvtph_ps(_mm_loadu_si128(h.as_ptr().cast()))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load(q: &[u8], at: usize) -> __m256i {
    let v = &q[at..at + 32];
    _mm256_loadu_si256(v.as_ptr().cast())
}

/// `acc + Σ₄ w·a` per lane: unsigned weight bytes times signed activation bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn udot_avx2(acc: __m256i, w: __m256i, a: __m256i) -> __m256i {
    let pairs = _mm256_maddubs_epi16(w, a);
    _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn udot_vnni(acc: __m256i, w: __m256i, a: __m256i) -> __m256i {
    _mm256_dpbusd_epi32(acc, w, a)
}

/// Bits `4k..4k+4` of each lane's fifth bits `qh` (a Q5_0 row's 32), as bit 4 of the
/// lane's four bytes: the multiply puts bit j of the nibble at bit 8j (the four shifted
/// copies cannot overlap or carry).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn fifth_bits(qh: __m256i, k: usize) -> __m256i {
    let nib = _mm256_and_si256(
        _mm256_srlv_epi32(qh, _mm256_set1_epi32(4 * k as i32)),
        _mm256_set1_epi32(0x0F),
    );
    let spread = _mm256_mullo_epi32(nib, _mm256_set1_epi32(0x0020_4081));
    _mm256_slli_epi32(_mm256_and_si256(spread, _mm256_set1_epi32(0x0101_0101)), 4)
}

/// A block's quant bytes as eight registers of unsigned levels, register `k` meeting
/// activations `4k..4k+4` in every lane (a Q4 block's low nibbles are values 0..16, its
/// high nibbles 16..32, Q5_0's with their fifth bits; a Q8_0 block's 32 bytes run in
/// order) and, for Q8_0, the signed bytes whose signs move onto the activations.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn unpack<const T: u8>(q: &[u8]) -> ([__m256i; 8], [__m256i; 8]) {
    let mut u = [_mm256_setzero_si256(); 8];
    let mut s = [_mm256_setzero_si256(); 8];
    if T == T_Q8_0 {
        for k in 0..8 {
            s[k] = load(q, 32 * k);
            u[k] = _mm256_sign_epi8(s[k], s[k]);
        }
    } else {
        let m4 = _mm256_set1_epi8(0x0F);
        // Q5_0: a chunk of fifth bits before the nibbles
        let nibbles = if T == T_Q5_0 { 32 } else { 0 };
        for c in 0..4 {
            let raw = load(q, nibbles + 32 * c);
            u[c] = _mm256_and_si256(raw, m4);
            u[c + 4] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
        }
        if T == T_Q5_0 {
            let qh = load(q, 0);
            for (k, u) in u.iter_mut().enumerate() {
                *u = _mm256_or_si256(*u, fifth_bits(qh, k));
            }
        }
    }
    (u, s)
}

/// Activation offset of weight register `k` (see [`unpack`]).
#[inline(always)]
fn act_at(k: usize) -> usize {
    4 * k
}

macro_rules! packed_kernels {
    ($sum:ident, $one:ident, $four:ident, $block:ident, $features:literal, $udot:ident) => {
        /// One block's eight integer sums against activation block `qa` (32 bytes), the
        /// Q4_0 offset included.
        #[inline]
        #[target_feature(enable = $features)]
        unsafe fn $sum<const T: u8>(
            u: &[__m256i; 8],
            s: &[__m256i; 8],
            qa: &[i8],
            asum: i32,
        ) -> __m256i {
            let (mut s0, mut s1) = (_mm256_setzero_si256(), _mm256_setzero_si256());
            for k in 0..4 {
                let (mut a0, mut a1) = (bcast4(qa, act_at(k)), bcast4(qa, act_at(k + 4)));
                if T == T_Q8_0 {
                    // |w| times a with w's sign: unsigned times signed
                    a0 = _mm256_sign_epi8(a0, s[k]);
                    a1 = _mm256_sign_epi8(a1, s[k + 4]);
                }
                s0 = $udot(s0, u[k], a0);
                s1 = $udot(s1, u[k + 4], a1);
            }
            let sum = _mm256_add_epi32(s0, s1);
            match T {
                T_Q4_0 => _mm256_sub_epi32(sum, _mm256_set1_epi32(8 * asum)),
                T_Q5_0 => _mm256_sub_epi32(sum, _mm256_set1_epi32(16 * asum)),
                _ => sum,
            }
        }

        /// One packed group against one activation row: the eight outputs, lane by lane.
        #[inline]
        #[target_feature(enable = $features)]
        unsafe fn $one<const T: u8>(group: &[u8], a: Q8Row<'_>, pb: usize, head: usize) -> __m256 {
            let mut acc = _mm256_setzero_ps();
            for (b, blk) in group.chunks_exact(pb).enumerate() {
                let (u, s) = unpack::<T>(&blk[head..]);
                let sum = $sum::<T>(&u, &s, &a.q[b * QK..(b + 1) * QK], a.sum[b]);
                let scale = _mm256_mul_ps(field(blk, 0), _mm256_set1_ps(a.d[b]));
                acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), scale, acc);
                if T == T_Q4_1 {
                    acc = _mm256_fmadd_ps(field(blk, 1), _mm256_set1_ps(a.s[b]), acc);
                }
            }
            acc
        }

        /// One packed group against [`ROWS`] activation rows: each block is unpacked once,
        /// each row's sum runs as in the one-row kernel.
        #[inline(never)]
        #[target_feature(enable = $features)]
        unsafe fn $four<const T: u8>(
            group: &[u8],
            a: &[Q8Row<'_>; ROWS],
            pb: usize,
            head: usize,
        ) -> [__m256; ROWS] {
            let mut acc = [_mm256_setzero_ps(); ROWS];
            for (b, blk) in group.chunks_exact(pb).enumerate() {
                let (u, s) = unpack::<T>(&blk[head..]);
                let d = field(blk, 0);
                for i in 0..ROWS {
                    let sum = $sum::<T>(&u, &s, &a[i].q[b * QK..(b + 1) * QK], a[i].sum[b]);
                    let scale = _mm256_mul_ps(d, _mm256_set1_ps(a[i].d[b]));
                    acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), scale, acc[i]);
                    if T == T_Q4_1 {
                        acc[i] = _mm256_fmadd_ps(field(blk, 1), _mm256_set1_ps(a[i].s[b]), acc[i]);
                    }
                }
            }
            acc
        }

        /// Every group of `w` against every row of `a`: `out[r * m + i]`.
        #[target_feature(enable = $features)]
        unsafe fn $block<const T: u8>(w: &[u8], group_bytes: usize, a: &Q8Acts, out: &mut [f32]) {
            let m = a.rows;
            let pb = group_bytes / (a.cols / QK);
            let head = if T == T_Q4_1 { 32 } else { 16 };
            for (group, o) in w
                .chunks_exact(group_bytes)
                .zip(out.chunks_exact_mut(GROUP * m))
            {
                let mut i = 0;
                while i + ROWS <= m {
                    let rows = [a.row(i), a.row(i + 1), a.row(i + 2), a.row(i + 3)];
                    scatter(&$four::<T>(group, &rows, pb, head), o, i, m);
                    i += ROWS;
                }
                while i < m {
                    scatter(&[$one::<T>(group, a.row(i), pb, head)], o, i, m);
                    i += 1;
                }
            }
        }
    };
}

packed_kernels!(
    sum_avx2,
    one_avx2,
    four_avx2,
    block_avx2,
    "avx2,fma,f16c",
    udot_avx2
);
packed_kernels!(
    sum_vnni,
    one_vnni,
    four_vnni,
    block_vnni,
    "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
    udot_vnni
);

// ---- AVX-512 on 512-bit registers: two groups (sixteen rows) per instruction ----

/// Four activation bytes `q[at..at + 4]` in every 32-bit lane of a 512-bit register.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn bcast4_512(q: &[i8], at: usize) -> __m512i {
    let four: [u8; 4] = std::array::from_fn(|k| q[at + k] as u8);
    _mm512_set1_epi32(i32::from_le_bytes(four))
}

/// The 32 bytes at `at` of two groups' blocks: the first group's in the low half.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn load2(q0: &[u8], q1: &[u8], at: usize) -> __m512i {
    let (lo, hi) = (&q0[at..at + 32], &q1[at..at + 32]);
    let lo = _mm256_loadu_si256(lo.as_ptr().cast());
    let hi = _mm256_loadu_si256(hi.as_ptr().cast());
    _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1)
}

/// Header field `f` of two groups' blocks as sixteen f32.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn field2(b0: &[u8], b1: &[u8], f: usize) -> __m512 {
    let (lo, hi) = (&b0[16 * f..16 * f + 16], &b1[16 * f..16 * f + 16]);
    let lo = _mm_loadu_si128(lo.as_ptr().cast());
    let hi = _mm_loadu_si128(hi.as_ptr().cast());
    _mm512_cvtph_ps(_mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1))
}

/// [`unpack`] for two groups. Q8_0 keeps its signed bytes: the activations are made
/// unsigned instead (`a + 128`), and `128 Σw` (returned) is taken off the sums.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn unpack2<const T: u8>(q0: &[u8], q1: &[u8]) -> ([__m512i; 8], __m512i) {
    let mut w = [_mm512_setzero_si512(); 8];
    let mut bias = _mm512_setzero_si512();
    if T == T_Q8_0 {
        let h = _mm512_set1_epi8(-128);
        for (k, w) in w.iter_mut().enumerate() {
            *w = load2(q0, q1, 32 * k);
            bias = _mm512_dpbusd_epi32(bias, h, *w);
        }
    } else {
        let m4 = _mm512_set1_epi8(0x0F);
        let nibbles = if T == T_Q5_0 { 32 } else { 0 };
        for c in 0..4 {
            let raw = load2(q0, q1, nibbles + 32 * c);
            w[c] = _mm512_and_si512(raw, m4);
            w[c + 4] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), m4);
        }
        if T == T_Q5_0 {
            // as `fifth_bits`, sixteen lanes at once
            let qh = load2(q0, q1, 0);
            for (k, w) in w.iter_mut().enumerate() {
                let nib = _mm512_and_si512(
                    _mm512_srlv_epi32(qh, _mm512_set1_epi32(4 * k as i32)),
                    _mm512_set1_epi32(0x0F),
                );
                let spread = _mm512_mullo_epi32(nib, _mm512_set1_epi32(0x0020_4081));
                let bits = _mm512_and_si512(spread, _mm512_set1_epi32(0x0101_0101));
                *w = _mm512_or_si512(*w, _mm512_slli_epi32(bits, 4));
            }
        }
    }
    (w, bias)
}

/// One block's sixteen integer sums against activation block `qa` (see [`sum_vnni`]); for
/// Q8_0, `qa` holds `a ^ 0x80`, the activations plus 128 as unsigned bytes.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn sum_512<const T: u8>(w: &[__m512i; 8], bias: __m512i, qa: &[i8], asum: i32) -> __m512i {
    let (mut s0, mut s1) = (_mm512_setzero_si512(), _mm512_setzero_si512());
    for k in 0..4 {
        let (a0, a1) = (bcast4_512(qa, act_at(k)), bcast4_512(qa, act_at(k + 4)));
        if T == T_Q8_0 {
            // (a + 128) unsigned (flipped once per product) times w signed
            s0 = _mm512_dpbusd_epi32(s0, a0, w[k]);
            s1 = _mm512_dpbusd_epi32(s1, a1, w[k + 4]);
        } else {
            s0 = _mm512_dpbusd_epi32(s0, w[k], a0);
            s1 = _mm512_dpbusd_epi32(s1, w[k + 4], a1);
        }
    }
    let sum = _mm512_add_epi32(s0, s1);
    match T {
        T_Q4_0 => _mm512_sub_epi32(sum, _mm512_set1_epi32(8 * asum)),
        T_Q5_0 => _mm512_sub_epi32(sum, _mm512_set1_epi32(16 * asum)),
        T_Q8_0 => _mm512_sub_epi32(sum, bias),
        _ => sum,
    }
}

/// Two packed groups against `R` activation rows (`a[0..R]`): each block unpacked once,
/// each row's sums and f32 steps as in the 256-bit kernels, lane for lane.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn pair_512<const T: u8, const R: usize>(
    g0: &[u8],
    g1: &[u8],
    a: &[Q8Row<'_>],
    pb: usize,
    head: usize,
) -> [__m512; R] {
    let mut acc = [_mm512_setzero_ps(); R];
    for (b, (b0, b1)) in g0.chunks_exact(pb).zip(g1.chunks_exact(pb)).enumerate() {
        let (w, bias) = unpack2::<T>(&b0[head..], &b1[head..]);
        let d = field2(b0, b1, 0);
        for i in 0..R {
            let sum = sum_512::<T>(&w, bias, &a[i].q[b * QK..(b + 1) * QK], a[i].sum[b]);
            let scale = _mm512_mul_ps(d, _mm512_set1_ps(a[i].d[b]));
            acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), scale, acc[i]);
            if T == T_Q4_1 {
                acc[i] = _mm512_fmadd_ps(field2(b0, b1, 1), _mm512_set1_ps(a[i].s[b]), acc[i]);
            }
        }
    }
    acc
}

/// `R` activation rows from `i` against two groups, into the groups' output block `o`
/// (`[16, m]`).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn pair_rows_512<const T: u8, const R: usize>(
    g0: &[u8],
    g1: &[u8],
    a: &Q8Acts,
    i: usize,
    o: &mut [f32],
    pb: usize,
    head: usize,
) {
    let m = a.rows;
    let rows: [Q8Row<'_>; R] = std::array::from_fn(|k| a.row(i + k));
    scatter512(&pair_512::<T, R>(g0, g1, &rows, pb, head), o, i, m);
}

/// Every group of `w` against every row of `a` (`out[r * m + i]`): pairs of groups on
/// 512-bit registers, eight activation rows at a time, then four, then one; an odd last
/// group on the 256-bit kernels. Fewer than four rows (decode) run on the 256-bit kernels
/// alone: one stream of weights is faster there (measured), and the bits are the same.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn block_vnni512<const T: u8>(w: &[u8], group_bytes: usize, a: &Q8Acts, out: &mut [f32]) {
    let m = a.rows;
    if m < 4 {
        return block_vnni::<T>(w, group_bytes, a, out);
    }
    let pb = group_bytes / (a.cols / QK);
    let head = if T == T_Q4_1 { 32 } else { 16 };
    // Q8_0 meets the activations as unsigned bytes a + 128: flipped once here, not per block
    let flipped;
    let pa = if T == T_Q8_0 {
        flipped = Q8Acts {
            q: a.q.iter().map(|&q| q ^ i8::MIN).collect(),
            ..a.clone()
        };
        &flipped
    } else {
        a
    };
    let mut pairs = w.chunks_exact(2 * group_bytes);
    let mut outs = out.chunks_exact_mut(2 * GROUP * m);
    for (pair, o) in pairs.by_ref().zip(outs.by_ref()) {
        let (g0, g1) = pair.split_at(group_bytes);
        let mut i = 0;
        while i + 8 <= m {
            pair_rows_512::<T, 8>(g0, g1, pa, i, o, pb, head);
            i += 8;
        }
        if i + 4 <= m {
            pair_rows_512::<T, 4>(g0, g1, pa, i, o, pb, head);
            i += 4;
        }
        while i < m {
            pair_rows_512::<T, 1>(g0, g1, pa, i, o, pb, head);
            i += 1;
        }
    }
    let last = pairs.remainder();
    if !last.is_empty() {
        block_vnni::<T>(last, group_bytes, a, outs.into_remainder());
    }
}

// ---- Q4_K: blocks of 256, eight 6-bit scales and minimums per row ----

/// A packed Q4_K block's scales and minimums as four registers of bytes: lane r holds row
/// r's scales 0..4, minimums 0..4, scales 4..8 and minimums 4..8 (ggml's
/// `get_scale_min_k4`, eight rows at once).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4k_scales(blk: &[u8]) -> [__m256i; 4] {
    let (s0, s1, s2) = (load(blk, 32), load(blk, 64), load(blk, 96));
    let (m6, m4, m30) = (
        _mm256_set1_epi8(0x3F),
        _mm256_set1_epi8(0x0F),
        _mm256_set1_epi8(0x30),
    );
    let high = |v: __m256i| _mm256_and_si256(_mm256_srli_epi16(v, 2), m30);
    [
        _mm256_and_si256(s0, m6),
        _mm256_and_si256(s1, m6),
        _mm256_or_si256(_mm256_and_si256(s2, m4), high(s0)),
        _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(s2, 4), m4), high(s1)),
    ]
}

/// Scale (or minimum) `s` of every row as 32-bit lanes, from [`q4k_scales`]' `lo` (0..4)
/// and `hi` (4..8).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4k_pick(lo: __m256i, hi: __m256i, s: usize) -> __m256i {
    let v = if s < 4 { lo } else { hi };
    let shifted = _mm256_srlv_epi32(v, _mm256_set1_epi32(8 * (s % 4) as i32));
    _mm256_and_si256(shifted, _mm256_set1_epi32(0xFF))
}

/// Lane r of `acc[k]` into `o[r * m + i + k]`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn scatter(acc: &[__m256], o: &mut [f32], i: usize, m: usize) {
    let mut lanes = [0f32; GROUP];
    for (k, v) in acc.iter().enumerate() {
        _mm256_storeu_ps(lanes.as_mut_ptr(), *v);
        for (r, l) in lanes.iter().enumerate() {
            o[r * m + i + k] = *l;
        }
    }
}

macro_rules! q4k_kernels {
    ($rows:ident, $block:ident, $features:literal, $udot:ident) => {
        /// One packed Q4_K group against `R` rows of 256-value activations: per 64 values,
        /// the nibbles are unpacked once for every row; then as [`super::packed::dot_group_q4k`].
        #[inline]
        #[target_feature(enable = $features)]
        unsafe fn $rows<const R: usize>(
            group: &[u8],
            a: &[Q8KRow<'_>; R],
            pb: usize,
        ) -> [__m256; R] {
            let mut acc = [_mm256_setzero_ps(); R];
            let m4 = _mm256_set1_epi8(0x0F);
            for (b, blk) in group.chunks_exact(pb).enumerate() {
                let [sc_lo, mn_lo, sc_hi, mn_hi] = q4k_scales(blk);
                let mut isum = [_mm256_setzero_si256(); R];
                for c in 0..4 {
                    let mut lo = [_mm256_setzero_si256(); 8];
                    let mut hi = [_mm256_setzero_si256(); 8];
                    for k in 0..8 {
                        let raw = load(blk, 128 + 32 * (8 * c + k));
                        lo[k] = _mm256_and_si256(raw, m4);
                        hi[k] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
                    }
                    let (sa, sb) = (
                        q4k_pick(sc_lo, sc_hi, 2 * c),
                        q4k_pick(sc_lo, sc_hi, 2 * c + 1),
                    );
                    for i in 0..R {
                        let qa = &a[i].q[b * QK_K + 64 * c..b * QK_K + 64 * (c + 1)];
                        let (mut s0, mut s1) = (_mm256_setzero_si256(), _mm256_setzero_si256());
                        for k in 0..8 {
                            s0 = $udot(s0, lo[k], bcast4(qa, 4 * k));
                            s1 = $udot(s1, hi[k], bcast4(qa, 32 + 4 * k));
                        }
                        isum[i] = _mm256_add_epi32(isum[i], _mm256_mullo_epi32(s0, sa));
                        isum[i] = _mm256_add_epi32(isum[i], _mm256_mullo_epi32(s1, sb));
                    }
                }
                let (d, dmin) = (field(blk, 0), field(blk, 1));
                for i in 0..R {
                    let bs = &a[i].bsums[16 * b..16 * b + 16];
                    let mut msum = _mm256_setzero_si256();
                    for s in 0..8 {
                        let sum = _mm256_set1_epi32(bs[2 * s] + bs[2 * s + 1]);
                        msum = _mm256_add_epi32(
                            msum,
                            _mm256_mullo_epi32(q4k_pick(mn_lo, mn_hi, s), sum),
                        );
                    }
                    let ad = a[i].d[b];
                    let scale = _mm256_mul_ps(d, _mm256_set1_ps(ad));
                    acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[i]), scale, acc[i]);
                    let scale = _mm256_mul_ps(dmin, _mm256_set1_ps(-ad));
                    acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(msum), scale, acc[i]);
                }
            }
            acc
        }

        /// Every packed Q4_K group of `w` against every row of `a`: `out[r * m + i]`.
        #[target_feature(enable = $features)]
        unsafe fn $block(w: &[u8], group_bytes: usize, a: &Q8KActs, out: &mut [f32]) {
            let m = a.rows;
            let pb = group_bytes / (a.cols / QK_K);
            for (group, o) in w
                .chunks_exact(group_bytes)
                .zip(out.chunks_exact_mut(GROUP * m))
            {
                let mut i = 0;
                while i + ROWS <= m {
                    let rows = [a.row(i), a.row(i + 1), a.row(i + 2), a.row(i + 3)];
                    scatter(&$rows::<ROWS>(group, &rows, pb), o, i, m);
                    i += ROWS;
                }
                while i < m {
                    scatter(&$rows::<1>(group, &[a.row(i)], pb), o, i, m);
                    i += 1;
                }
            }
        }
    };
}

q4k_kernels!(q4k_rows_avx2, block_q4k_avx2, "avx2,fma,f16c", udot_avx2);
q4k_kernels!(
    q4k_rows_vnni,
    block_q4k_vnni,
    "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
    udot_vnni
);

/// [`q4k_scales`] for two groups' blocks (the first group in the low half).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn q4k_scales2(b0: &[u8], b1: &[u8]) -> [__m512i; 4] {
    let (s0, s1, s2) = (load2(b0, b1, 32), load2(b0, b1, 64), load2(b0, b1, 96));
    let (m6, m4, m30) = (
        _mm512_set1_epi8(0x3F),
        _mm512_set1_epi8(0x0F),
        _mm512_set1_epi8(0x30),
    );
    let high = |v: __m512i| _mm512_and_si512(_mm512_srli_epi16(v, 2), m30);
    [
        _mm512_and_si512(s0, m6),
        _mm512_and_si512(s1, m6),
        _mm512_or_si512(_mm512_and_si512(s2, m4), high(s0)),
        _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(s2, 4), m4), high(s1)),
    ]
}

/// [`q4k_pick`] on 512-bit registers.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn q4k_pick512(lo: __m512i, hi: __m512i, s: usize) -> __m512i {
    let v = if s < 4 { lo } else { hi };
    let shifted = _mm512_srlv_epi32(v, _mm512_set1_epi32(8 * (s % 4) as i32));
    _mm512_and_si512(shifted, _mm512_set1_epi32(0xFF))
}

/// Two packed Q4_K groups against `R` activation rows: [`q4k_rows_vnni`] with sixteen rows
/// per register, lane for lane the same steps.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn q4k_pair_512<const R: usize>(
    g0: &[u8],
    g1: &[u8],
    a: &[Q8KRow<'_>; R],
    pb: usize,
) -> [__m512; R] {
    let mut acc = [_mm512_setzero_ps(); R];
    let m4 = _mm512_set1_epi8(0x0F);
    for (b, (b0, b1)) in g0.chunks_exact(pb).zip(g1.chunks_exact(pb)).enumerate() {
        let [sc_lo, mn_lo, sc_hi, mn_hi] = q4k_scales2(b0, b1);
        let mut isum = [_mm512_setzero_si512(); R];
        for c in 0..4 {
            let mut lo = [_mm512_setzero_si512(); 8];
            let mut hi = [_mm512_setzero_si512(); 8];
            for k in 0..8 {
                let raw = load2(b0, b1, 128 + 32 * (8 * c + k));
                lo[k] = _mm512_and_si512(raw, m4);
                hi[k] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), m4);
            }
            let sa = q4k_pick512(sc_lo, sc_hi, 2 * c);
            let sb = q4k_pick512(sc_lo, sc_hi, 2 * c + 1);
            for i in 0..R {
                let qa = &a[i].q[b * QK_K + 64 * c..b * QK_K + 64 * (c + 1)];
                let (mut s0, mut s1) = (_mm512_setzero_si512(), _mm512_setzero_si512());
                for k in 0..8 {
                    s0 = _mm512_dpbusd_epi32(s0, lo[k], bcast4_512(qa, 4 * k));
                    s1 = _mm512_dpbusd_epi32(s1, hi[k], bcast4_512(qa, 32 + 4 * k));
                }
                isum[i] = _mm512_add_epi32(isum[i], _mm512_mullo_epi32(s0, sa));
                isum[i] = _mm512_add_epi32(isum[i], _mm512_mullo_epi32(s1, sb));
            }
        }
        let (d, dmin) = (field2(b0, b1, 0), field2(b0, b1, 1));
        for i in 0..R {
            let bs = &a[i].bsums[16 * b..16 * b + 16];
            let mut msum = _mm512_setzero_si512();
            for s in 0..8 {
                let sum = _mm512_set1_epi32(bs[2 * s] + bs[2 * s + 1]);
                let mins = q4k_pick512(mn_lo, mn_hi, s);
                msum = _mm512_add_epi32(msum, _mm512_mullo_epi32(mins, sum));
            }
            let ad = a[i].d[b];
            let scale = _mm512_mul_ps(d, _mm512_set1_ps(ad));
            acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[i]), scale, acc[i]);
            let scale = _mm512_mul_ps(dmin, _mm512_set1_ps(-ad));
            acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(msum), scale, acc[i]);
        }
    }
    acc
}

/// Lane r of `acc[k]` (sixteen rows) into `o[r * m + i + k]`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn scatter512(acc: &[__m512], o: &mut [f32], i: usize, m: usize) {
    let mut lanes = [0f32; 2 * GROUP];
    for (k, v) in acc.iter().enumerate() {
        _mm512_storeu_ps(lanes.as_mut_ptr(), *v);
        for (r, l) in lanes.iter().enumerate() {
            o[r * m + i + k] = *l;
        }
    }
}

/// Every packed Q4_K group of `w` against every row of `a`: pairs of groups on 512-bit
/// registers when there are at least [`Q4K_512_FROM`] rows, the 256-bit kernel otherwise and
/// for an odd last group (the same bits either way).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn block_q4k_vnni512(w: &[u8], group_bytes: usize, a: &Q8KActs, out: &mut [f32]) {
    let m = a.rows;
    if m < Q4K_512_FROM {
        return block_q4k_vnni(w, group_bytes, a, out);
    }
    let pb = group_bytes / (a.cols / QK_K);
    let mut pairs = w.chunks_exact(2 * group_bytes);
    let mut outs = out.chunks_exact_mut(2 * GROUP * m);
    for (pair, o) in pairs.by_ref().zip(outs.by_ref()) {
        let (g0, g1) = pair.split_at(group_bytes);
        let mut i = 0;
        while i + ROWS <= m {
            let rows = [a.row(i), a.row(i + 1), a.row(i + 2), a.row(i + 3)];
            scatter512(&q4k_pair_512::<ROWS>(g0, g1, &rows, pb), o, i, m);
            i += ROWS;
        }
        while i < m {
            scatter512(&q4k_pair_512::<1>(g0, g1, &[a.row(i)], pb), o, i, m);
            i += 1;
        }
    }
    let last = pairs.remainder();
    if !last.is_empty() {
        block_q4k_vnni(last, group_bytes, a, outs.into_remainder());
    }
}

/// Activation rows from which Q4_K products take two groups per 512-bit register: decode
/// reads one weight stream faster (1B Q4_K decode 30.2 tok/s with pairs, 38 without;
/// in cache the pairs are faster, 64-71 against 56 GB/s).
const Q4K_512_FROM: usize = 4;

type BlockFn = unsafe fn(&[u8], usize, &Q8Acts, &mut [f32]);
type BlockKFn = unsafe fn(&[u8], usize, &Q8KActs, &mut [f32]);

#[derive(Clone, Copy)]
enum Fns {
    /// 32-value formats against 32-value activations.
    Q8(BlockFn),
    /// Q4_K against 256-value activations.
    Q8K(BlockKFn),
}

/// A packed SIMD kernel, chosen once per product; it exists only if the CPU has the
/// instructions it uses.
#[derive(Clone, Copy)]
pub struct Kernel {
    f: Fns,
}

impl std::fmt::Debug for Kernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("x86_packed::Kernel")
    }
}

impl Kernel {
    /// `isa`'s packed kernel for `ty`, if there is one and this CPU can run it.
    pub fn new(isa: Isa, ty: GgmlType) -> Option<Self> {
        macro_rules! pick {
            ($k:ident, $kk:ident) => {
                match ty {
                    GgmlType::Q4_0 => Fns::Q8($k::<T_Q4_0>),
                    GgmlType::Q4_1 => Fns::Q8($k::<T_Q4_1>),
                    GgmlType::Q5_0 => Fns::Q8($k::<T_Q5_0>),
                    GgmlType::Q8_0 => Fns::Q8($k::<T_Q8_0>),
                    GgmlType::Q4_K => Fns::Q8K($kk),
                    _ => return None,
                }
            };
        }
        let f = match isa {
            Isa::Avx512Vnni if cpu::has(Isa::Avx512Vnni) => pick!(block_vnni512, block_q4k_vnni512),
            Isa::Avx2 | Isa::Avx512Vnni if cpu::has(Isa::Avx2) => {
                pick!(block_avx2, block_q4k_avx2)
            }
            _ => return None,
        };
        Some(Kernel { f })
    }

    /// `out[r * m + i] = w_r · a_i` over the groups of `w` (`group_bytes` each, as wide as
    /// `a`); the caller checked the sizes (see [`super::packed::PackedDot::block`]).
    ///
    /// # Panics
    /// If this is the Q4_K kernel.
    pub fn block(&self, w: &[u8], group_bytes: usize, a: &Q8Acts, out: &mut [f32]) {
        let Fns::Q8(f) = self.f else {
            panic!("Q4_K takes 256-value activations")
        };
        // SAFETY: the CPU's features were checked in `new`; every access is bounds-checked.
        unsafe { f(w, group_bytes, a, out) }
    }

    /// As [`Kernel::block`], for Q4_K against 256-value activations.
    ///
    /// # Panics
    /// If this is not the Q4_K kernel.
    pub fn block_q8k(&self, w: &[u8], group_bytes: usize, a: &Q8KActs, out: &mut [f32]) {
        let Fns::Q8K(f) = self.f else {
            panic!("only Q4_K takes 256-value activations")
        };
        // SAFETY: the CPU's features were checked in `new`; every access is bounds-checked.
        unsafe { f(w, group_bytes, a, out) }
    }
}
