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

use crate::act::{Q8Acts, Q8Row};
use crate::cpu::{self, Isa};
use crate::format::{GgmlType, QK};
use crate::pack::GROUP;

const T_Q4_0: u8 = 0;
const T_Q4_1: u8 = 1;
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

/// A block's quant bytes as eight registers of unsigned levels, register `k` meeting
/// activations `4k..4k+4` in every lane (a Q4 block's low nibbles are values 0..16, its
/// high nibbles 16..32; a Q8_0 block's 32 bytes run in order) and, for Q8_0, the signed
/// bytes whose signs move onto the activations.
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
        for c in 0..4 {
            let raw = load(q, 32 * c);
            u[c] = _mm256_and_si256(raw, m4);
            u[c + 4] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
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
            if T == T_Q4_0 {
                _mm256_sub_epi32(sum, _mm256_set1_epi32(8 * asum))
            } else {
                sum
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
            let mut lanes = [0f32; GROUP];
            for (group, o) in w
                .chunks_exact(group_bytes)
                .zip(out.chunks_exact_mut(GROUP * m))
            {
                let mut i = 0;
                while i + ROWS <= m {
                    let rows = [a.row(i), a.row(i + 1), a.row(i + 2), a.row(i + 3)];
                    let acc = $four::<T>(group, &rows, pb, head);
                    for (k, v) in acc.iter().enumerate() {
                        _mm256_storeu_ps(lanes.as_mut_ptr(), *v);
                        for (r, l) in lanes.iter().enumerate() {
                            o[r * m + i + k] = *l;
                        }
                    }
                    i += ROWS;
                }
                while i < m {
                    let acc = $one::<T>(group, a.row(i), pb, head);
                    _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
                    for (r, l) in lanes.iter().enumerate() {
                        o[r * m + i] = *l;
                    }
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
        for c in 0..4 {
            let raw = load2(q0, q1, 32 * c);
            w[c] = _mm512_and_si512(raw, m4);
            w[c + 4] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), m4);
        }
    }
    (w, bias)
}

/// One block's sixteen integer sums against activation block `qa` (see [`sum_vnni`]).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn sum_512<const T: u8>(w: &[__m512i; 8], bias: __m512i, qa: &[i8], asum: i32) -> __m512i {
    let (mut s0, mut s1) = (_mm512_setzero_si512(), _mm512_setzero_si512());
    let flip = _mm512_set1_epi8(-128);
    for k in 0..4 {
        let (a0, a1) = (bcast4_512(qa, act_at(k)), bcast4_512(qa, act_at(k + 4)));
        if T == T_Q8_0 {
            // (a + 128) unsigned times w signed
            s0 = _mm512_dpbusd_epi32(s0, _mm512_xor_si512(a0, flip), w[k]);
            s1 = _mm512_dpbusd_epi32(s1, _mm512_xor_si512(a1, flip), w[k + 4]);
        } else {
            s0 = _mm512_dpbusd_epi32(s0, w[k], a0);
            s1 = _mm512_dpbusd_epi32(s1, w[k + 4], a1);
        }
    }
    let sum = _mm512_add_epi32(s0, s1);
    match T {
        T_Q4_0 => _mm512_sub_epi32(sum, _mm512_set1_epi32(8 * asum)),
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
    let acc = pair_512::<T, R>(g0, g1, &rows, pb, head);
    let mut lanes = [0f32; 2 * GROUP];
    for (k, v) in acc.iter().enumerate() {
        _mm512_storeu_ps(lanes.as_mut_ptr(), *v);
        for (r, l) in lanes.iter().enumerate() {
            o[r * m + i + k] = *l;
        }
    }
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
    let mut pairs = w.chunks_exact(2 * group_bytes);
    let mut outs = out.chunks_exact_mut(2 * GROUP * m);
    for (pair, o) in pairs.by_ref().zip(outs.by_ref()) {
        let (g0, g1) = pair.split_at(group_bytes);
        let mut i = 0;
        while i + 8 <= m {
            pair_rows_512::<T, 8>(g0, g1, a, i, o, pb, head);
            i += 8;
        }
        if i + 4 <= m {
            pair_rows_512::<T, 4>(g0, g1, a, i, o, pb, head);
            i += 4;
        }
        while i < m {
            pair_rows_512::<T, 1>(g0, g1, a, i, o, pb, head);
            i += 1;
        }
    }
    let last = pairs.remainder();
    if !last.is_empty() {
        block_vnni::<T>(last, group_bytes, a, outs.into_remainder());
    }
}

type BlockFn = unsafe fn(&[u8], usize, &Q8Acts, &mut [f32]);

/// A packed SIMD kernel, chosen once per product; it exists only if the CPU has the
/// instructions it uses.
#[derive(Clone, Copy)]
pub struct Kernel {
    f: BlockFn,
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
            ($k:ident) => {
                match ty {
                    GgmlType::Q4_0 => $k::<T_Q4_0> as BlockFn,
                    GgmlType::Q4_1 => $k::<T_Q4_1> as BlockFn,
                    GgmlType::Q8_0 => $k::<T_Q8_0> as BlockFn,
                    _ => return None,
                }
            };
        }
        let f = match isa {
            Isa::Avx512Vnni if cpu::has(Isa::Avx512Vnni) => pick!(block_vnni512),
            Isa::Avx2 | Isa::Avx512Vnni if cpu::has(Isa::Avx2) => pick!(block_avx2),
            _ => return None,
        };
        Some(Kernel { f })
    }

    /// `out[r * m + i] = w_r · a_i` over the groups of `w` (`group_bytes` each, as wide as
    /// `a`); the caller checked the sizes (see [`super::packed::PackedDot::block`]).
    pub fn block(&self, w: &[u8], group_bytes: usize, a: &Q8Acts, out: &mut [f32]) {
        // SAFETY: the CPU's features were checked in `new`; every access is bounds-checked.
        unsafe { (self.f)(w, group_bytes, a, out) }
    }
}
