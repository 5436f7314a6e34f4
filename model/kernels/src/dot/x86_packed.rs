//! x86-64 kernels for interleaved weight groups ([`crate::pack`]): AVX2 and AVX-512 VNNI,
//! on 256-bit registers. Each lane of a register is one of the eight weight rows, so a
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
            Isa::Avx512Vnni if cpu::has(Isa::Avx512Vnni) => pick!(block_vnni),
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
