//! x86-64 dot products: AVX2 (with FMA and F16C) and AVX-512 VNNI on 256-bit registers.
//!
//! Each kernel computes what its counterpart in `portable.rs` computes (up to the order of
//! f32 additions) and is tested against it. The weight levels are unpacked to unsigned
//! bytes and multiplied with the signed activation bytes (`maddubs`, or `dpbusd` with
//! VNNI); offsets and minimums come from the activations' block sums.
//!
//! Safety: every function here is `unsafe` only because of `#[target_feature]`; callers
//! check the CPU with [`crate::cpu::Isa`] first. All loads are unaligned loads within
//! slices whose lengths are checked by the safe entry points at the bottom.
#![allow(unsafe_code)]

use std::arch::x86_64::*;

use crate::act::{Q8Acts, Q8KActs, Q8KRow, Q8Row};
use crate::cpu::{self, Isa};
use crate::format::{GgmlType, QK, QK_K};

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f16(b: &[u8], i: usize) -> f32 {
    let h = u16::from_le_bytes([b[i], b[i + 1]]);
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(h))))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

/// 16 bytes of nibbles → 32 levels 0..15: low nibbles first, then high nibbles.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn nibbles(qs: &[u8]) -> __m256i {
    debug_assert!(qs.len() >= 16);
    let lo = _mm_loadu_si128(qs.as_ptr().cast());
    let hi = _mm_srli_epi16(lo, 4);
    _mm256_and_si256(_mm256_set_m128i(hi, lo), _mm256_set1_epi8(0x0F))
}

/// The 32 bits of `qh` as bytes: 0x10 where the bit is set, 0 elsewhere.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn fifth_bits(qh: u32) -> __m256i {
    let shuffle = _mm256_set_epi64x(
        0x0303_0303_0303_0303,
        0x0202_0202_0202_0202,
        0x0101_0101_0101_0101,
        0,
    );
    let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(qh as i32), shuffle);
    let bytes = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe));
    let set = _mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1));
    _mm256_and_si256(set, _mm256_set1_epi8(0x10))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load32(a: &[i8]) -> __m256i {
    debug_assert!(a.len() >= 32);
    _mm256_loadu_si256(a.as_ptr().cast())
}

/// Unsigned weight bytes times signed activation bytes, summed in fours: 8 × i32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn udot_avx2(w: __m256i, a: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(w, a), _mm256_set1_epi16(1))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn udot_vnni(w: __m256i, a: __m256i) -> __m256i {
    _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, a)
}

/// Type codes for the const-generic kernels (one compiled kernel per format).
const T_Q4_0: u8 = 0;
const T_Q4_1: u8 = 1;
const T_Q5_0: u8 = 2;
const T_Q5_1: u8 = 3;
const T_Q8_0: u8 = 4;

/// The levels of block `blk` of format `T` as unsigned bytes (signed for Q8_0), the offset
/// that multiplies the activations' block sum (`-8`, `-16` or `0`), the scale `d` and the
/// minimum `m` (0 for the formats without one).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn levels<const T: u8>(blk: &[u8]) -> (__m256i, i32, f32, f32) {
    match T {
        T_Q4_0 => (nibbles(&blk[2..]), -8, f16(blk, 0), 0.0),
        T_Q4_1 => (nibbles(&blk[4..]), 0, f16(blk, 0), f16(blk, 2)),
        T_Q5_0 => {
            let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
            let v = _mm256_or_si256(nibbles(&blk[6..]), fifth_bits(qh));
            (v, -16, f16(blk, 0), 0.0)
        }
        T_Q5_1 => {
            let qh = u32::from_le_bytes([blk[4], blk[5], blk[6], blk[7]]);
            let v = _mm256_or_si256(nibbles(&blk[8..]), fifth_bits(qh));
            (v, 0, f16(blk, 0), f16(blk, 2))
        }
        _ => (
            _mm256_loadu_si256(blk[2..].as_ptr().cast()),
            0,
            f16(blk, 0),
            0.0,
        ),
    }
}

macro_rules! dot_q8_kernel {
    ($name:ident, $features:literal, $udot:ident) => {
        /// Two blocks per step into separate accumulators (even blocks into one, odd into
        /// the other): the loop-carried additions of one block would otherwise bound the
        /// speed, not the memory. The pair is spelled out so that both stay in registers.
        #[inline]
        #[target_feature(enable = $features)]
        unsafe fn $name<const T: u8>(w: &[u8], a: Q8Row<'_>, bytes: usize) -> f32 {
            let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            let (mut off0, mut off1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            macro_rules! step {
                ($blk:expr, $b:expr, $acc:ident, $off:ident) => {{
                    let b = $b;
                    let qa = load32(&a.q[b * QK..]);
                    let (qw, offset, d, m) = levels::<T>($blk);
                    let dd = d * a.d[b];
                    let dot = if T == T_Q8_0 {
                        // |w| times a with w's sign: unsigned times signed
                        $udot(_mm256_sign_epi8(qw, qw), _mm256_sign_epi8(qa, qw))
                    } else {
                        // the offset and minimum times the block's activation sum
                        let coef = d * offset as f32 + m;
                        $off = _mm256_fmadd_ps(_mm256_set1_ps(coef), _mm256_set1_ps(a.s[b]), $off);
                        $udot(qw, qa)
                    };
                    $acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(dd), $acc);
                }};
            }
            let mut pairs = w.chunks_exact(2 * bytes);
            for (p, pair) in pairs.by_ref().enumerate() {
                step!(&pair[..bytes], 2 * p, acc0, off0);
                step!(&pair[bytes..], 2 * p + 1, acc1, off1);
            }
            let last = pairs.remainder();
            if !last.is_empty() {
                step!(last, w.len() / bytes - 1, acc0, off0);
            }
            // each lane of `off` holds the same sum
            let off = _mm256_add_ps(off0, off1);
            hsum(_mm256_add_ps(acc0, acc1)) + _mm_cvtss_f32(_mm256_castps256_ps128(off))
        }
    };
}

dot_q8_kernel!(dot_q8_avx2_t, "avx2,fma,f16c", udot_avx2);
dot_q8_kernel!(
    dot_q8_vnni_t,
    "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
    udot_vnni
);

/// Activation rows a multi-row kernel takes at once (prefill and batched steps).
pub const ROWS: usize = 4;

macro_rules! dot_q8_rows_kernel {
    ($name:ident, $features:literal, $udot:ident) => {
        /// One weight row against [`ROWS`] activation rows: each block is unpacked once.
        /// Each row's sum runs exactly as in the one-row kernel (two accumulators by block
        /// parity, fused multiply-adds), so that a row's result does not depend on the
        /// rows batched with it. Never inlined: its eight accumulators would crowd the
        /// one-row loop (the decode path) of the caller.
        #[inline(never)]
        #[target_feature(enable = $features)]
        unsafe fn $name<const T: u8>(w: &[u8], a: &[Q8Row<'_>; ROWS], bytes: usize) -> [f32; ROWS] {
            let mut acc0 = [_mm256_setzero_ps(); ROWS];
            let mut acc1 = [_mm256_setzero_ps(); ROWS];
            let mut off0 = [0.0f32; ROWS];
            let mut off1 = [0.0f32; ROWS];
            macro_rules! step {
                ($blk:expr, $b:expr, $acc:ident, $off:ident) => {{
                    let b = $b;
                    let (qw, offset, d, m) = levels::<T>($blk);
                    let coef = d * offset as f32 + m;
                    let (qw, sign) = if T == T_Q8_0 {
                        (_mm256_sign_epi8(qw, qw), qw)
                    } else {
                        (qw, _mm256_set1_epi8(1))
                    };
                    for r in 0..ROWS {
                        let qa = load32(&a[r].q[b * QK..]);
                        let dd = d * a[r].d[b];
                        let dot = $udot(qw, _mm256_sign_epi8(qa, sign));
                        $acc[r] =
                            _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(dd), $acc[r]);
                        if T != T_Q8_0 {
                            $off[r] = coef.mul_add(a[r].s[b], $off[r]);
                        }
                    }
                }};
            }
            // block pairs spelled out (as in the one-row kernel), so the parity is static
            let mut pairs = w.chunks_exact(2 * bytes);
            for (p, pair) in pairs.by_ref().enumerate() {
                step!(&pair[..bytes], 2 * p, acc0, off0);
                step!(&pair[bytes..], 2 * p + 1, acc1, off1);
            }
            let last = pairs.remainder();
            if !last.is_empty() {
                step!(last, w.len() / bytes - 1, acc0, off0);
            }
            let mut out = [0.0f32; ROWS];
            for r in 0..ROWS {
                out[r] = hsum(_mm256_add_ps(acc0[r], acc1[r])) + (off0[r] + off1[r]);
            }
            out
        }
    };
}

dot_q8_rows_kernel!(dot_q8_rows_avx2_t, "avx2,fma,f16c", udot_avx2);
dot_q8_rows_kernel!(
    dot_q8_rows_vnni_t,
    "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
    udot_vnni
);

macro_rules! block_q8_kernel {
    ($name:ident, $features:literal, $single:ident, $rows:ident) => {
        /// `out[r * m + i] = w_r · a_i` for every row `r` of `w` and row `i` of `a`: the
        /// loop over weight rows stays inside the SIMD code (no call per row).
        #[target_feature(enable = $features)]
        unsafe fn $name<const T: u8>(
            w: &[u8],
            row_bytes: usize,
            a: &Q8Acts,
            out: &mut [f32],
            bytes: usize,
        ) {
            let m = a.rows;
            for (r, col) in out.chunks_exact_mut(m).enumerate() {
                let wr = &w[r * row_bytes..(r + 1) * row_bytes];
                let mut i = 0;
                while i + ROWS <= m {
                    let rows = std::array::from_fn(|k| a.row(i + k));
                    col[i..i + ROWS].copy_from_slice(&$rows::<T>(wr, &rows, bytes));
                    i += ROWS;
                }
                while i < m {
                    col[i] = $single::<T>(wr, a.row(i), bytes);
                    i += 1;
                }
            }
        }
    };
}

block_q8_kernel!(
    block_q8_avx2_t,
    "avx2,fma,f16c",
    dot_q8_avx2_t,
    dot_q8_rows_avx2_t
);
block_q8_kernel!(
    block_q8_vnni_t,
    "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
    dot_q8_vnni_t,
    dot_q8_rows_vnni_t
);

/// The k-quant kernels over rows of `w` and rows of `a`, as [`block_q8_avx2_t`].
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn block_q8k_avx2<const T: u8>(w: &[u8], row_bytes: usize, a: &Q8KActs, out: &mut [f32]) {
    let m = a.rows;
    for (r, col) in out.chunks_exact_mut(m).enumerate() {
        let wr = &w[r * row_bytes..(r + 1) * row_bytes];
        for (i, o) in col.iter_mut().enumerate() {
            *o = if T == T_Q4_K {
                dot_q4_k_avx2(wr, a.row(i))
            } else {
                dot_q6_k_avx2(wr, a.row(i))
            };
        }
    }
}

const T_Q4_K: u8 = 10;
const T_Q6_K: u8 = 11;

/// Q4_K: per pair of 32-value groups, 32 bytes of nibbles; scales multiply the 16-bit
/// partial sums, minimums the activation sums.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q4_k_avx2(w: &[u8], a: Q8KRow<'_>) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let mut scalar = 0.0f32;
    let mask = _mm256_set1_epi8(0x0F);
    for (b, blk) in w.chunks_exact(144).enumerate() {
        let (d, dmin) = (f16(blk, 0) * a.d[b], f16(blk, 2) * a.d[b]);
        let (sc, mn) = k_scales(&blk[4..16]);
        let bs = &a.bsums[16 * b..16 * b + 16];
        let msum: i32 = (0..8)
            .map(|g| i32::from(mn[g]) * (bs[2 * g] + bs[2 * g + 1]))
            .sum();
        scalar -= dmin * msum as f32;
        let qs = &blk[16..];
        let qa = &a.q[QK_K * b..];
        let mut sumi = _mm256_setzero_si256();
        for c in 0..4 {
            let raw = _mm256_loadu_si256(qs[32 * c..].as_ptr().cast());
            let lo = _mm256_and_si256(raw, mask);
            let hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), mask);
            let plo = _mm256_maddubs_epi16(lo, load32(&qa[64 * c..]));
            let phi = _mm256_maddubs_epi16(hi, load32(&qa[64 * c + 32..]));
            let plo = _mm256_madd_epi16(plo, _mm256_set1_epi16(i16::from(sc[2 * c])));
            let phi = _mm256_madd_epi16(phi, _mm256_set1_epi16(i16::from(sc[2 * c + 1])));
            sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(plo, phi));
        }
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sumi), _mm256_set1_ps(d), acc);
    }
    hsum(acc) + scalar
}

/// Q6_K: 6-bit levels from 4 low and 2 high bits; signed 8-bit scales per 16 values.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q6_k_avx2(w: &[u8], a: Q8KRow<'_>) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let mut scalar = 0.0f32;
    let m4 = _mm256_set1_epi8(0x0F);
    let m2 = _mm256_set1_epi8(0x03);
    for (b, blk) in w.chunks_exact(210).enumerate() {
        let d = f16(blk, 208) * a.d[b];
        let (ql, qh, scales) = (&blk[..128], &blk[128..192], &blk[192..208]);
        let bs = &a.bsums[16 * b..16 * b + 16];
        let offset: i32 = (0..16).map(|g| i32::from(scales[g] as i8) * bs[g]).sum();
        scalar -= 32.0 * d * offset as f32;
        let qa = &a.q[QK_K * b..];
        let mut sumi = _mm256_setzero_si256();
        for h in 0..2 {
            let l0 = _mm256_loadu_si256(ql[64 * h..].as_ptr().cast());
            let l1 = _mm256_loadu_si256(ql[64 * h + 32..].as_ptr().cast());
            let hb = _mm256_loadu_si256(qh[32 * h..].as_ptr().cast());
            let lows = [
                _mm256_and_si256(l0, m4),
                _mm256_and_si256(l1, m4),
                _mm256_and_si256(_mm256_srli_epi16(l0, 4), m4),
                _mm256_and_si256(_mm256_srli_epi16(l1, 4), m4),
            ];
            let highs = [
                _mm256_and_si256(hb, m2),
                _mm256_and_si256(_mm256_srli_epi16(hb, 2), m2),
                _mm256_and_si256(_mm256_srli_epi16(hb, 4), m2),
                _mm256_and_si256(_mm256_srli_epi16(hb, 6), m2),
            ];
            for k in 0..4 {
                let q = _mm256_or_si256(lows[k], _mm256_slli_epi16(highs[k], 4));
                let p = _mm256_maddubs_epi16(q, load32(&qa[128 * h + 32 * k..]));
                let (sa, sb) = (scales[8 * h + 2 * k] as i8, scales[8 * h + 2 * k + 1] as i8);
                let s =
                    _mm256_set_m128i(_mm_set1_epi16(i16::from(sb)), _mm_set1_epi16(i16::from(sa)));
                sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p, s));
            }
        }
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sumi), _mm256_set1_ps(d), acc);
    }
    hsum(acc) + scalar
}

/// The eight 6-bit scales and minimums of a Q4_K/Q5_K block.
#[inline]
fn k_scales(q: &[u8]) -> ([u8; 8], [u8; 8]) {
    let (mut sc, mut mn) = ([0u8; 8], [0u8; 8]);
    for j in 0..8 {
        (sc[j], mn[j]) = if j < 4 {
            (q[j] & 63, q[j + 4] & 63)
        } else {
            (
                (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
                (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
            )
        };
    }
    (sc, mn)
}

/// f32 dot product of two equal-length slices, 8 lanes at a time.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_f32_avx2(x: &[f32], y: &[f32]) -> f32 {
    let n = x.len().min(y.len());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 32 <= n {
        for (k, a) in acc.iter_mut().enumerate() {
            let xv = _mm256_loadu_ps(x[i + 8 * k..].as_ptr());
            let yv = _mm256_loadu_ps(y[i + 8 * k..].as_ptr());
            *a = _mm256_fmadd_ps(xv, yv, *a);
        }
        i += 32;
    }
    let mut s = hsum(_mm256_add_ps(
        _mm256_add_ps(acc[0], acc[1]),
        _mm256_add_ps(acc[2], acc[3]),
    ));
    while i < n {
        s += x[i] * y[i];
        i += 1;
    }
    s
}

// ---- safe entry points (the CPU was checked when the kernel was chosen) ----

/// Whether there is a SIMD kernel for `ty` with 32-value activations.
pub fn has_q8(ty: GgmlType) -> bool {
    matches!(
        ty,
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0
    )
}

/// Whether there is a SIMD kernel for `ty` with 256-value activations.
pub fn has_q8k(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::Q4_K | GgmlType::Q6_K)
}

type Q8BlockFn = unsafe fn(&[u8], usize, &Q8Acts, &mut [f32], usize);
type Q8KBlockFn = unsafe fn(&[u8], usize, &Q8KActs, &mut [f32]);

/// A SIMD kernel for a 32-value format, chosen once per product. It exists only if the
/// CPU has the instructions it uses.
#[derive(Clone, Copy)]
pub struct Q8Kernel {
    f: Q8BlockFn,
    bytes: usize,
}

impl std::fmt::Debug for Q8Kernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Q8Kernel({} bytes per block)", self.bytes)
    }
}

impl Q8Kernel {
    /// `isa`'s kernel for `ty`, if there is one and this CPU can run it.
    pub fn new(isa: Isa, ty: GgmlType) -> Option<Self> {
        let (_, bytes) = ty.block_layout()?;
        macro_rules! pick {
            ($k:ident) => {
                match ty {
                    GgmlType::Q4_0 => $k::<T_Q4_0> as Q8BlockFn,
                    GgmlType::Q4_1 => $k::<T_Q4_1> as Q8BlockFn,
                    GgmlType::Q5_0 => $k::<T_Q5_0> as Q8BlockFn,
                    GgmlType::Q5_1 => $k::<T_Q5_1> as Q8BlockFn,
                    GgmlType::Q8_0 => $k::<T_Q8_0> as Q8BlockFn,
                    _ => return None,
                }
            };
        }
        let f = match isa {
            Isa::Avx512Vnni if cpu::has(Isa::Avx512Vnni) => pick!(block_q8_vnni_t),
            Isa::Avx2 | Isa::Avx512Vnni if cpu::has(Isa::Avx2) => pick!(block_q8_avx2_t),
            _ => return None,
        };
        Some(Q8Kernel { f, bytes })
    }

    /// `out[r * m + i] = w_r · a_i` for the rows `w_r` of `w` (`row_bytes` each) and the `m`
    /// rows of `a`.
    ///
    /// # Panics
    /// If the sizes disagree.
    pub fn block(&self, w: &[u8], row_bytes: usize, a: &Q8Acts, out: &mut [f32]) {
        check_block(w, row_bytes, self.bytes, QK, a.cols, a.rows, out.len());
        // SAFETY: the CPU's features were checked in `new`; sizes by check_block.
        unsafe { (self.f)(w, row_bytes, a, out, self.bytes) }
    }
}

/// A SIMD kernel for a k-quant format, chosen once per product.
#[derive(Clone, Copy)]
pub struct Q8KKernel {
    f: Q8KBlockFn,
    bytes: usize,
}

impl std::fmt::Debug for Q8KKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Q8KKernel({} bytes per block)", self.bytes)
    }
}

impl Q8KKernel {
    /// `isa`'s kernel for `ty`, if there is one and this CPU can run it.
    pub fn new(isa: Isa, ty: GgmlType) -> Option<Self> {
        let (_, bytes) = ty.block_layout()?;
        if !matches!(isa, Isa::Avx2 | Isa::Avx512Vnni) || !cpu::has(Isa::Avx2) {
            return None;
        }
        let f = match ty {
            GgmlType::Q4_K => block_q8k_avx2::<T_Q4_K> as Q8KBlockFn,
            GgmlType::Q6_K => block_q8k_avx2::<T_Q6_K> as Q8KBlockFn,
            _ => return None,
        };
        Some(Q8KKernel { f, bytes })
    }

    /// As [`Q8Kernel::block`], against 256-value activations.
    ///
    /// # Panics
    /// If the sizes disagree.
    pub fn block(&self, w: &[u8], row_bytes: usize, a: &Q8KActs, out: &mut [f32]) {
        check_block(w, row_bytes, self.bytes, QK_K, a.cols, a.rows, out.len());
        // SAFETY: the CPU's features were checked in `new`; sizes by check_block.
        unsafe { (self.f)(w, row_bytes, a, out) }
    }
}

/// The sizes a block product relies on: whole rows of whole blocks, as wide as the
/// activations, and one output per row pair.
fn check_block(
    w: &[u8],
    row_bytes: usize,
    bytes: usize,
    per_block: usize,
    cols: usize,
    m: usize,
    out: usize,
) {
    assert!(row_bytes > 0 && row_bytes.is_multiple_of(bytes));
    assert!(w.len().is_multiple_of(row_bytes));
    assert_eq!(
        row_bytes / bytes * per_block,
        cols,
        "activations as wide as the rows"
    );
    assert_eq!(out, w.len() / row_bytes * m, "one output per row pair");
}

/// AVX2 f32 dot product.
///
/// # Panics
/// If the CPU lacks AVX2/FMA/F16C.
pub fn dot_f32(x: &[f32], y: &[f32]) -> f32 {
    assert!(cpu::has(Isa::Avx2));
    // SAFETY: AVX2 and FMA were checked above; the loop stays within both slices.
    unsafe { dot_f32_avx2(x, y) }
}
