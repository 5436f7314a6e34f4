//! x86-64 products modulo 2^32: AVX2 (`vpmaddwd`) and AVX-512 VNNI (`vpdpwssd` on 512-bit
//! registers).
//!
//! Sixteen (or thirty-two) int8 weights are sign-extended to 16 bits once and multiplied
//! with the low and the high halves of up to four masked words; pairs of products add into
//! 32-bit lanes (at most 2^23 each: no saturation) and lanes add with wrapping, which is
//! addition modulo 2^32. Each kernel gives the bits of `portable::rows_planes`.
//!
//! Safety: every function here is `unsafe` only because of `#[target_feature]`; the safe
//! entry points check the CPU with [`crate::cpu::has`] and every load lies inside a slice
//! whose length they check first.
#![allow(unsafe_code)]

use std::arch::x86_64::*;

use super::portable::{dot_planes, rows_planes};
use super::{Planes, RingMatrix, Row};
use crate::cpu::{self, Isa};

/// Words multiplied per pass over a row's weights.
const TILE: usize = 4;

#[inline]
#[target_feature(enable = "avx2")]
unsafe fn hsum256(v: __m256i) -> u32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
    _mm_cvtsi128_si32(s) as u32
}

/// Integers a kernel reads: int8 sign-extended on load, or int16 as they are.
trait Weight: Copy + Into<i32> {
    /// 16 weights from `p` as 16-bit lanes.
    unsafe fn load16(p: *const Self) -> __m256i;
    /// 32 weights from `p` as 16-bit lanes.
    unsafe fn load32(p: *const Self) -> __m512i;
}

impl Weight for i8 {
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn load16(p: *const i8) -> __m256i {
        _mm256_cvtepi8_epi16(_mm_loadu_si128(p.cast()))
    }
    #[inline]
    #[target_feature(enable = "avx2,avx512f,avx512bw")]
    unsafe fn load32(p: *const i8) -> __m512i {
        _mm512_cvtepi8_epi16(_mm256_loadu_si256(p.cast()))
    }
}

impl Weight for i16 {
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn load16(p: *const i16) -> __m256i {
        _mm256_loadu_si256(p.cast())
    }
    #[inline]
    #[target_feature(enable = "avx2,avx512f,avx512bw")]
    unsafe fn load32(p: *const i16) -> __m512i {
        _mm512_loadu_si512(p.cast())
    }
}

/// Row `w` against words `t0..t0 + K` of `p`, into `out[0..K]`.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn tile_avx2<W: Weight, const K: usize>(w: &[W], p: &Planes, t0: usize, out: &mut [u32]) {
    let cols = p.cols;
    let main = cols / 16 * 16;
    let lo: [&[i16]; K] = std::array::from_fn(|s| &p.lo[(t0 + s) * cols..(t0 + s + 1) * cols]);
    let hi: [&[i16]; K] = std::array::from_fn(|s| &p.hi[(t0 + s) * cols..(t0 + s + 1) * cols]);
    let mut acc_lo = [_mm256_setzero_si256(); K];
    let mut acc_hi = [_mm256_setzero_si256(); K];
    let mut j = 0;
    while j < main {
        // safety: j + 16 <= cols = w.len() = lo[s].len() = hi[s].len()
        let wv = W::load16(w.as_ptr().add(j));
        for s in 0..K {
            let l = _mm256_loadu_si256(lo[s].as_ptr().add(j).cast());
            let h = _mm256_loadu_si256(hi[s].as_ptr().add(j).cast());
            acc_lo[s] = _mm256_add_epi32(acc_lo[s], _mm256_madd_epi16(wv, l));
            acc_hi[s] = _mm256_add_epi32(acc_hi[s], _mm256_madd_epi16(wv, h));
        }
        j += 16;
    }
    for s in 0..K {
        let (tl, th) = dot_planes(w, lo[s], hi[s], main);
        let l = hsum256(acc_lo[s]).wrapping_add(tl);
        let h = hsum256(acc_hi[s]).wrapping_add(th);
        out[s] = l.wrapping_add(h << 16);
    }
}

#[inline]
#[target_feature(enable = "avx2,avx512f,avx512bw,avx512vnni")]
unsafe fn tile_avx512<W: Weight, const K: usize>(w: &[W], p: &Planes, t0: usize, out: &mut [u32]) {
    let cols = p.cols;
    let main = cols / 32 * 32;
    let lo: [&[i16]; K] = std::array::from_fn(|s| &p.lo[(t0 + s) * cols..(t0 + s + 1) * cols]);
    let hi: [&[i16]; K] = std::array::from_fn(|s| &p.hi[(t0 + s) * cols..(t0 + s + 1) * cols]);
    let mut acc_lo = [_mm512_setzero_si512(); K];
    let mut acc_hi = [_mm512_setzero_si512(); K];
    let mut j = 0;
    while j < main {
        // safety: j + 32 <= cols = w.len() = lo[s].len() = hi[s].len()
        let wv = W::load32(w.as_ptr().add(j));
        for s in 0..K {
            let l = _mm512_loadu_si512(lo[s].as_ptr().add(j).cast());
            let h = _mm512_loadu_si512(hi[s].as_ptr().add(j).cast());
            acc_lo[s] = _mm512_dpwssd_epi32(acc_lo[s], wv, l);
            acc_hi[s] = _mm512_dpwssd_epi32(acc_hi[s], wv, h);
        }
        j += 32;
    }
    for s in 0..K {
        let (tl, th) = dot_planes(w, lo[s], hi[s], main);
        let l = (_mm512_reduce_add_epi32(acc_lo[s]) as u32).wrapping_add(tl);
        let h = (_mm512_reduce_add_epi32(acc_hi[s]) as u32).wrapping_add(th);
        out[s] = l.wrapping_add(h << 16);
    }
}

macro_rules! rows_kernel {
    ($name:ident, $inner:ident, $tile:ident, $features:literal, $isa:expr) => {
        #[target_feature(enable = $features)]
        unsafe fn $inner<W: Weight>(w: &[W], p: &Planes, out: &mut [u32]) {
            let n = p.n;
            let mut buf = [0u32; TILE];
            let mut t = 0;
            while t < n {
                let k = (n - t).min(TILE);
                match k {
                    4 => $tile::<W, 4>(w, p, t, &mut buf),
                    3 => $tile::<W, 3>(w, p, t, &mut buf),
                    2 => $tile::<W, 2>(w, p, t, &mut buf),
                    _ => $tile::<W, 1>(w, p, t, &mut buf),
                }
                out[t..t + k].copy_from_slice(&buf[..k]);
                t += k;
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
            let n = p.n;
            for i in r0..r1 {
                let o = &mut out[(i - r0) * n..(i - r0 + 1) * n];
                // safety: the CPU has the features (checked above) and the lengths are
                // checked
                match m.row(i) {
                    Row::I8(w) => unsafe { $inner(w, p, o) },
                    Row::I16(w) => unsafe { $inner(w, p, o) },
                }
            }
        }
    };
}

rows_kernel!(rows_avx2, rows_avx2_impl, tile_avx2, "avx2", Isa::Avx2);
rows_kernel!(
    rows_avx512,
    rows_avx512_impl,
    tile_avx512,
    "avx2,avx512f,avx512bw,avx512vnni",
    Isa::Avx512Vnni
);
