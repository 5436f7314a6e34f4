//! x86-64 products modulo 2^32: AVX2 (`vpmaddwd`) and AVX-512 VNNI (`vpdpwssd` on 512-bit
//! registers).
//!
//! Sixteen (or thirty-two) weights of two rows are loaded as 16-bit lanes (int8
//! sign-extended) and multiplied with the low and the high halves of up to two (AVX2) or
//! four (AVX-512) masked words, so that each load serves several products; pairs of
//! products add into 32-bit lanes (below 2^31 in magnitude: no saturation) and lanes add
//! with wrapping, which is addition modulo 2^32. Blocked weights (`Ints::Blocked`) are
//! sign-extended and multiplied by their block's multiplier on load (`vpmullw`; every
//! product fits 16 bits). Each kernel gives the bits of `portable::rows_planes`.
//!
//! Safety: every function here is `unsafe` only because of `#[target_feature]`; the safe
//! entry points check the CPU with [`crate::cpu::has`] and every load lies inside a slice
//! whose length they check first.
#![allow(unsafe_code)]

use std::arch::x86_64::*;

use super::portable::{dot_planes, rows_planes};
use super::{Ints, Planes, RingMatrix, RING_BLOCK};
use crate::cpu::{self, Isa};

#[inline]
#[target_feature(enable = "avx2")]
unsafe fn hsum256(v: __m256i) -> u32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
    _mm_cvtsi128_si32(s) as u32
}

/// Words per product from which rows go in pairs. Below it (decode: a word and its mask)
/// the weights stream from memory and one row at a time keeps up with it better
/// (SmolLM2 decode in one process: 8.4 ms of products per token by single rows, 14.8 ms by
/// pairs); above it pairs save activation loads (prefill 1.3-1.7x).
const PAIR_ROWS_FROM: usize = 3;

/// One row's integers as a kernel reads them: int8 sign-extended on load, int16 as they
/// are, or blocked int8 sign-extended and multiplied by their block's multiplier.
trait Source: Copy {
    /// 16 weights from column `j` as 16-bit lanes (`j + 16 <= len`).
    unsafe fn load16(self, j: usize) -> __m256i;
    /// 32 weights from column `j` as 16-bit lanes (`j + 32 <= len`).
    unsafe fn load32(self, j: usize) -> __m512i;
    /// `Σ w lo` and `Σ w hi` over the columns from `from` on: what the SIMD loop leaves.
    fn tail(self, lo: &[i16], hi: &[i16], from: usize) -> (u32, u32);
}

impl Source for &[i8] {
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn load16(self, j: usize) -> __m256i {
        _mm256_cvtepi8_epi16(_mm_loadu_si128(self.as_ptr().add(j).cast()))
    }
    #[inline]
    #[target_feature(enable = "avx2,avx512f,avx512bw")]
    unsafe fn load32(self, j: usize) -> __m512i {
        _mm512_cvtepi8_epi16(_mm256_loadu_si256(self.as_ptr().add(j).cast()))
    }
    fn tail(self, lo: &[i16], hi: &[i16], from: usize) -> (u32, u32) {
        dot_planes(self, lo, hi, from)
    }
}

impl Source for &[i16] {
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn load16(self, j: usize) -> __m256i {
        _mm256_loadu_si256(self.as_ptr().add(j).cast())
    }
    #[inline]
    #[target_feature(enable = "avx2,avx512f,avx512bw")]
    unsafe fn load32(self, j: usize) -> __m512i {
        _mm512_loadu_si512(self.as_ptr().add(j).cast())
    }
    fn tail(self, lo: &[i16], hi: &[i16], from: usize) -> (u32, u32) {
        dot_planes(self, lo, hi, from)
    }
}

/// A row of [`super::Ints::Blocked`]: `q[j] · m[j / RING_BLOCK]`, `m.len() = q.len() /
/// RING_BLOCK` (checked where the row is cut out). A load of 16 or 32 columns from a
/// multiple of 16 lies inside one block.
#[derive(Clone, Copy)]
struct Blocked<'a> {
    q: &'a [i8],
    m: &'a [u8],
}

impl Source for Blocked<'_> {
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn load16(self, j: usize) -> __m256i {
        let m = i16::from(*self.m.get_unchecked(j / RING_BLOCK));
        _mm256_mullo_epi16(self.q.load16(j), _mm256_set1_epi16(m))
    }
    #[inline]
    #[target_feature(enable = "avx2,avx512f,avx512bw")]
    unsafe fn load32(self, j: usize) -> __m512i {
        let m = i16::from(*self.m.get_unchecked(j / RING_BLOCK));
        _mm512_mullo_epi16(self.q.load32(j), _mm512_set1_epi16(m))
    }
    fn tail(self, lo: &[i16], hi: &[i16], from: usize) -> (u32, u32) {
        let w: Vec<i32> = (from..self.q.len())
            .map(|j| i32::from(self.q[j]) * i32::from(self.m[j / RING_BLOCK]))
            .collect();
        dot_planes(&w, &lo[from..], &hi[from..], 0)
    }
}

/// Rows `ws` against words `t0..t0 + K` of `p`: `out[a][s]` for row `a`, word `t0 + s`.
/// Each weight load serves `K` words and each activation load `R` rows.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn tile_avx2<S: Source, const R: usize, const K: usize>(
    ws: [S; R],
    p: &Planes,
    t0: usize,
) -> [[u32; K]; R] {
    let cols = p.cols;
    let main = cols / 16 * 16;
    let lo: [&[i16]; K] = std::array::from_fn(|s| &p.lo[(t0 + s) * cols..(t0 + s + 1) * cols]);
    let hi: [&[i16]; K] = std::array::from_fn(|s| &p.hi[(t0 + s) * cols..(t0 + s + 1) * cols]);
    let mut acc_lo = [[_mm256_setzero_si256(); K]; R];
    let mut acc_hi = [[_mm256_setzero_si256(); K]; R];
    let mut j = 0;
    while j < main {
        // safety: j + 16 <= cols = ws[a].len() = lo[s].len() = hi[s].len()
        let wv: [__m256i; R] = std::array::from_fn(|a| ws[a].load16(j));
        for s in 0..K {
            let l = _mm256_loadu_si256(lo[s].as_ptr().add(j).cast());
            let h = _mm256_loadu_si256(hi[s].as_ptr().add(j).cast());
            for a in 0..R {
                acc_lo[a][s] = _mm256_add_epi32(acc_lo[a][s], _mm256_madd_epi16(wv[a], l));
                acc_hi[a][s] = _mm256_add_epi32(acc_hi[a][s], _mm256_madd_epi16(wv[a], h));
            }
        }
        j += 16;
    }
    let mut out = [[0u32; K]; R];
    for a in 0..R {
        for s in 0..K {
            let (tl, th) = ws[a].tail(lo[s], hi[s], main);
            let l = hsum256(acc_lo[a][s]).wrapping_add(tl);
            let h = hsum256(acc_hi[a][s]).wrapping_add(th);
            out[a][s] = l.wrapping_add(h << 16);
        }
    }
    out
}

#[inline]
#[target_feature(enable = "avx2,avx512f,avx512bw,avx512vnni")]
unsafe fn tile_avx512<S: Source, const R: usize, const K: usize>(
    ws: [S; R],
    p: &Planes,
    t0: usize,
) -> [[u32; K]; R] {
    let cols = p.cols;
    let main = cols / 32 * 32;
    let lo: [&[i16]; K] = std::array::from_fn(|s| &p.lo[(t0 + s) * cols..(t0 + s + 1) * cols]);
    let hi: [&[i16]; K] = std::array::from_fn(|s| &p.hi[(t0 + s) * cols..(t0 + s + 1) * cols]);
    let mut acc_lo = [[_mm512_setzero_si512(); K]; R];
    let mut acc_hi = [[_mm512_setzero_si512(); K]; R];
    let mut j = 0;
    while j < main {
        // safety: j + 32 <= cols = ws[a].len() = lo[s].len() = hi[s].len()
        let wv: [__m512i; R] = std::array::from_fn(|a| ws[a].load32(j));
        for s in 0..K {
            let l = _mm512_loadu_si512(lo[s].as_ptr().add(j).cast());
            let h = _mm512_loadu_si512(hi[s].as_ptr().add(j).cast());
            for a in 0..R {
                acc_lo[a][s] = _mm512_dpwssd_epi32(acc_lo[a][s], wv[a], l);
                acc_hi[a][s] = _mm512_dpwssd_epi32(acc_hi[a][s], wv[a], h);
            }
        }
        j += 32;
    }
    let mut out = [[0u32; K]; R];
    for a in 0..R {
        for s in 0..K {
            let (tl, th) = ws[a].tail(lo[s], hi[s], main);
            let l = (_mm512_reduce_add_epi32(acc_lo[a][s]) as u32).wrapping_add(tl);
            let h = (_mm512_reduce_add_epi32(acc_hi[a][s]) as u32).wrapping_add(th);
            out[a][s] = l.wrapping_add(h << 16);
        }
    }
    out
}

macro_rules! rows_kernel {
    ($name:ident, $inner:ident, $tile:ident, $features:literal, $isa:expr, $kmax:literal) => {
        /// Rows `r0..r1` of `w` (rows of `p.cols`) against every word of `p`, into
        /// `out[(i - r0) n + t]`: pairs of rows by up to `$kmax` words at a time.
        #[target_feature(enable = $features)]
        unsafe fn $inner<S: Source>(
            row: impl Fn(usize) -> S,
            r0: usize,
            r1: usize,
            p: &Planes,
            out: &mut [u32],
        ) {
            let n = p.n;
            let mut i = r0;
            while i < r1 {
                let pair = PAIR_ROWS_FROM <= n && i + 1 < r1;
                let mut t = 0;
                while t < n {
                    let k = (n - t).min($kmax);
                    macro_rules! put {
                        ($r:literal, $k:literal) => {{
                            let rows: [S; $r] = std::array::from_fn(|a| row(i + a));
                            let o = $tile::<S, $r, $k>(rows, p, t);
                            for (a, o) in o.iter().enumerate() {
                                let at = (i - r0 + a) * n + t;
                                out[at..at + $k].copy_from_slice(o);
                            }
                        }};
                    }
                    match (pair, k) {
                        (true, 4) => put!(2, 4),
                        (true, 3) => put!(2, 3),
                        (true, 2) => put!(2, 2),
                        (true, _) => put!(2, 1),
                        (false, 4) => put!(1, 4),
                        (false, 3) => put!(1, 3),
                        (false, 2) => put!(1, 2),
                        (false, _) => put!(1, 1),
                    }
                    t += k;
                }
                i += if pair { 2 } else { 1 };
            }
        }

        /// Rows `r0..r1` of `m` against every word of `p`, into `out[(i - r0) n + t]`
        /// (the portable kernel where the CPU lacks these instructions).
        pub(super) fn $name(m: &RingMatrix, r0: usize, r1: usize, p: &Planes, out: &mut [u32]) {
            assert!(r0 <= r1 && r1 <= m.rows());
            assert_eq!(p.cols, m.cols());
            assert!(p.lo.len() == p.n * p.cols && p.hi.len() == p.n * p.cols);
            assert!(out.len() >= (r1 - r0) * p.n);
            if !cpu::has($isa) {
                return rows_planes(m, r0, r1, p, out);
            }
            // safety: the CPU has the features (checked above) and the lengths are checked
            let cols = p.cols;
            let per = cols / RING_BLOCK;
            match m.ints() {
                Ints::I8(w) => unsafe { $inner(|i| &w[i * cols..(i + 1) * cols], r0, r1, p, out) },
                Ints::I16(w) => unsafe { $inner(|i| &w[i * cols..(i + 1) * cols], r0, r1, p, out) },
                // from_parts checked m.len() = rows · cols / RING_BLOCK
                Ints::Blocked { q, m } => unsafe {
                    let row = |i: usize| Blocked {
                        q: &q[i * cols..(i + 1) * cols],
                        m: &m[i * per..(i + 1) * per],
                    };
                    $inner(row, r0, r1, p, out)
                },
            }
        }
    };
}

rows_kernel!(rows_avx2, rows_avx2_impl, tile_avx2, "avx2", Isa::Avx2, 2);
rows_kernel!(
    rows_avx512,
    rows_avx512_impl,
    tile_avx512,
    "avx2,avx512f,avx512bw,avx512vnni",
    Isa::Avx512Vnni,
    4
);
