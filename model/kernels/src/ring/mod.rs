//! Exact products modulo 2^32: the kernels of masked mode.
//!
//! In masked mode a node never sees an activation: it receives `u = x + r (mod 2^32)`, an
//! activation quantized to integers `x` plus a uniformly random mask `r`, and returns
//! `W u (mod 2^32)`; a mask provider returns `W r (mod 2^32)`, and the client subtracts.
//! Both products must be exact in the ring, whatever the bits of `u`, and every kernel
//! here gives the same bits as the portable reference [`portable::mul_rows`].
//!
//! Weights are integers per row ([`RingMatrix`]: one f32 scale per row and integers of up
//! to 16 bits, stored in one byte each up to 8 bits and in two above, read once per
//! product). The wider the weights, the narrower the activations must be for `W x` to
//! stay below `2^31` ([`RingMatrix::activation_bound`]); [`RingMatrix::quantize_within`]
//! picks the widest weights that leave the activations a given number of bits. A masked
//! word is split into two signed 16-bit halves, `u = lo +
//! 2^16 hi (mod 2^32)`, so that the SIMD paths multiply 16-bit halves by sign-extended
//! weights with the ordinary multiply-add instructions (`vpmaddwd` on AVX2, `vpdpwssd` on
//! AVX-512 VNNI) and combine `W lo + 2^16 W hi` with wrapping additions: every sum is
//! taken modulo 2^32, so nothing can overflow and nothing saturates.

use rayon::prelude::*;

use crate::cpu::Isa;

mod blocked;
pub mod portable;
#[cfg(test)]
mod tests;
#[cfg(target_arch = "x86_64")]
mod x86;

/// Why a ring matrix cannot be built or used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    #[error("{rows} rows of {cols} values need {want} weights, not {got}")]
    Size {
        rows: usize,
        cols: usize,
        want: usize,
        got: usize,
    },
    #[error("row {row} holds a value that is not finite")]
    NotFinite { row: usize },
    #[error("rows of {cols} values are too wide for exact products modulo 2^32")]
    TooWide { cols: usize },
    #[error("weights of {bits} bits: Veil rounds to 2 to 16")]
    Bits { bits: u32 },
}

/// Columns that share one multiplier in [`Ints::Blocked`].
pub const RING_BLOCK: usize = 32;

/// A matrix's integers, row-major.
#[derive(Debug, Clone)]
pub enum Ints {
    /// Up to 8 bits.
    I8(Vec<i8>),
    /// 9 to 16 bits.
    I16(Vec<i16>),
    /// 9 to 15 bits as `m · q`: a signed byte `q` per weight and a multiplier `m` per
    /// [`RING_BLOCK`] columns of a row (`[rows, cols / RING_BLOCK]`), so that each weight
    /// is read as about one byte and widened to `m · q` (below 2^15) in registers. The
    /// width of a row's integers, and so the activations' bound, is that of `I16`; each
    /// block's grid is `m` apart (see [`RingMatrix::quantize_blocked`]).
    Blocked { q: Vec<i8>, m: Vec<u8> },
}

impl Ints {
    fn len(&self) -> usize {
        match self {
            Ints::I8(v) => v.len(),
            Ints::I16(v) => v.len(),
            Ints::Blocked { q, .. } => q.len(),
        }
    }
}

/// One row's integers.
#[derive(Debug, Clone, Copy)]
pub enum Row<'a> {
    I8(&'a [i8]),
    I16(&'a [i16]),
    /// `q[j] · m[j / RING_BLOCK]`.
    Blocked {
        q: &'a [i8],
        m: &'a [u8],
    },
}

impl Row<'_> {
    /// The integers widened to i32.
    pub fn to_i32(&self) -> Vec<i32> {
        match self {
            Row::I8(r) => r.iter().map(|&v| i32::from(v)).collect(),
            Row::I16(r) => r.iter().map(|&v| i32::from(v)).collect(),
            Row::Blocked { q, m } => q
                .iter()
                .enumerate()
                .map(|(j, &v)| i32::from(v) * i32::from(m[j / RING_BLOCK]))
                .collect(),
        }
    }

    /// The integers as i16 (every variant fits).
    pub fn to_i16(&self) -> Vec<i16> {
        match self {
            Row::I8(r) => r.iter().map(|&v| i16::from(v)).collect(),
            Row::I16(r) => r.to_vec(),
            Row::Blocked { .. } => self.to_i32().into_iter().map(|v| v as i16).collect(),
        }
    }
}

/// `v` rounded to the nearest integer, ties to even, for `|v| < 2^22`: adding and taking
/// away `1.5 · 2^23` leaves no fraction bits (and, unlike `f32::round`, is no call into
/// libm on baseline x86-64).
#[inline]
fn round_even(v: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    (v + MAGIC) - MAGIC
}

/// Whether `data` can be rounded to a `[rows, cols]` matrix of `bits`-bit integers.
fn check_input(rows: usize, cols: usize, data: &[f32], bits: u32) -> Result<(), RingError> {
    if data.len() != rows * cols {
        return Err(RingError::Size {
            rows,
            cols,
            want: rows * cols,
            got: data.len(),
        });
    }
    if !(2..=16).contains(&bits) {
        return Err(RingError::Bits { bits });
    }
    match data
        .par_chunks(cols.max(1))
        .position_first(|row| row.iter().any(|v| !v.is_finite()))
    {
        Some(row) => Err(RingError::NotFinite { row }),
        None => Ok(()),
    }
}

/// A weight matrix of `rows` outputs by `cols` inputs as integers: row `i` is
/// `scale[i] · w[i, ..]` with `w` in `-(2^(b-1) - 1)..2^(b-1)` for `b` bits (symmetric
/// per-row rounding).
#[derive(Debug, Clone)]
pub struct RingMatrix {
    rows: usize,
    cols: usize,
    w: Ints,
    scales: Vec<f32>,
    /// The largest `Σ_j |w[i, j]|` over the rows.
    l1_max: u64,
}

impl RingMatrix {
    /// Round `data` (`[rows, cols]`, row-major) to `bits`-bit integers per row.
    pub fn quantize(rows: usize, cols: usize, data: &[f32], bits: u32) -> Result<Self, RingError> {
        check_input(rows, cols, data, bits)?;
        let qmax = ((1i32 << (bits - 1)) - 1) as f32;
        let mut w = vec![0i16; rows * cols];
        let mut scales = vec![0f32; rows];
        data.par_chunks(cols.max(1))
            .zip(w.par_chunks_mut(cols.max(1)))
            .zip(scales.par_iter_mut())
            .for_each(|((row, out), scale)| {
                let amax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
                *scale = amax / qmax;
                if *scale > 0.0 {
                    let inv = 1.0 / *scale;
                    for (q, v) in out.iter_mut().zip(row) {
                        *q = round_even((v * inv).clamp(-qmax, qmax)) as i16;
                    }
                }
            });
        let w = if bits <= 8 {
            Ints::I8(w.into_iter().map(|v| v as i8).collect())
        } else {
            Ints::I16(w)
        };
        RingMatrix::from_parts(rows, cols, w, scales)
    }

    /// Round `data` to the widest integers (up to 16 bits) that leave the activations at
    /// least `act_bits` bits, sign included (`activation_bound() >= 2^(act_bits - 1) -
    /// 1`); `None` if even 2-bit weights would not. Integers of 9 to 15 bits are stored
    /// blocked ([`Self::quantize_blocked`]: about one byte per weight instead of two)
    /// where the rows are whole blocks.
    pub fn quantize_within(
        rows: usize,
        cols: usize,
        data: &[f32],
        act_bits: u32,
        blocked: bool,
    ) -> Result<Option<Self>, RingError> {
        let need = (1i32 << (act_bits.clamp(2, 31) - 1)) - 1;
        // each row's Σ|w| / max|w|: the L1 of its integers is about this times the
        // largest integer (rounding moves it either way), so the widest weights that fit
        // by this measure are where the search starts
        let spread = data
            .chunks_exact(cols.max(1))
            .map(|r| {
                let amax = r.iter().fold(0f32, |m, v| m.max(v.abs()));
                if amax > 0.0 {
                    r.iter().map(|v| f64::from(v.abs() / amax)).sum::<f64>()
                } else {
                    0.0
                }
            })
            .fold(0f64, f64::max);
        let budget = ((1u64 << 31) - 1) as f64 / f64::from(need);
        let mut bits = 16;
        while bits > 2 {
            let qmax = f64::from((1u32 << (bits - 1)) - 1);
            if spread * qmax <= budget {
                break;
            }
            bits -= 1;
        }
        // rounding may lower the sums too: one bit wider is tried first
        let mut bits = (bits + 1).min(16);
        loop {
            let m = if blocked && blocked::fits(cols, bits) {
                RingMatrix::quantize_blocked(rows, cols, data, bits)?
            } else {
                RingMatrix::quantize(rows, cols, data, bits)?
            };
            if m.activation_bound() >= need {
                return Ok(Some(m));
            }
            if bits == 2 {
                return Ok(None);
            }
            bits -= 1;
        }
    }

    /// A matrix from its integers and per-row scales.
    pub fn from_parts(
        rows: usize,
        cols: usize,
        w: Ints,
        scales: Vec<f32>,
    ) -> Result<Self, RingError> {
        let blocks_ok = match &w {
            Ints::Blocked { m, .. } => {
                cols.is_multiple_of(RING_BLOCK) && m.len() == rows * cols / RING_BLOCK
            }
            _ => true,
        };
        if w.len() != rows * cols || scales.len() != rows || !blocks_ok {
            return Err(RingError::Size {
                rows,
                cols,
                want: rows * cols,
                got: w.len(),
            });
        }
        // an activation needs at least one bit besides its sign
        if cols as u64 * 128 >= 1 << 30 {
            return Err(RingError::TooWide { cols });
        }
        let l1_max = match &w {
            Ints::I8(w) => w
                .chunks_exact(cols.max(1))
                .map(|r| r.iter().map(|&q| u64::from(q.unsigned_abs())).sum::<u64>())
                .max(),
            Ints::I16(w) => w
                .chunks_exact(cols.max(1))
                .map(|r| r.iter().map(|&q| u64::from(q.unsigned_abs())).sum::<u64>())
                .max(),
            Ints::Blocked { q, m } => q
                .chunks_exact(cols.max(1))
                .zip(m.chunks_exact((cols / RING_BLOCK).max(1)))
                .map(|(r, m)| {
                    r.chunks_exact(RING_BLOCK)
                        .zip(m)
                        .map(|(b, &m)| {
                            u64::from(m)
                                * b.iter().map(|&q| u64::from(q.unsigned_abs())).sum::<u64>()
                        })
                        .sum::<u64>()
                })
                .max(),
        }
        .unwrap_or(0);
        Ok(RingMatrix {
            rows,
            cols,
            w,
            scales,
            l1_max,
        })
    }

    /// Several matrices of the same width stacked into one (a fused projection).
    pub fn stack(parts: &[RingMatrix]) -> Result<Self, RingError> {
        let cols = parts.first().map_or(0, |p| p.cols);
        if let Some(p) = parts.iter().find(|p| p.cols != cols) {
            return Err(RingError::Size {
                rows: p.rows,
                cols,
                want: p.rows * cols,
                got: p.w.len(),
            });
        }
        let w = if parts.iter().all(|p| matches!(p.w, Ints::I8(_))) {
            Ints::I8(
                parts
                    .iter()
                    .flat_map(|p| match &p.w {
                        Ints::I8(v) => v.clone(),
                        _ => Vec::new(),
                    })
                    .collect(),
            )
        } else if parts.iter().all(|p| matches!(p.w, Ints::Blocked { .. })) {
            let (mut qs, mut ms) = (Vec::new(), Vec::new());
            for p in parts {
                if let Ints::Blocked { q, m } = &p.w {
                    qs.extend_from_slice(q);
                    ms.extend_from_slice(m);
                }
            }
            Ints::Blocked { q: qs, m: ms }
        } else {
            Ints::I16(
                parts
                    .iter()
                    .flat_map(|p| (0..p.rows).flat_map(|i| p.row(i).to_i16()))
                    .collect(),
            )
        };
        RingMatrix::from_parts(
            parts.iter().map(|p| p.rows).sum(),
            cols,
            w,
            parts
                .iter()
                .flat_map(|p| p.scales.iter().copied())
                .collect(),
        )
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes of the integers and scales in memory.
    pub fn weight_bytes(&self) -> usize {
        self.byte_len()
    }

    /// The integers, row-major.
    pub fn ints(&self) -> &Ints {
        &self.w
    }

    /// Bits per weight the integers may use (8, or 16 as stored or widened).
    pub fn stored_bits(&self) -> u32 {
        match self.w {
            Ints::I8(_) => 8,
            Ints::I16(_) | Ints::Blocked { .. } => 16,
        }
    }

    /// The largest magnitude among the integers.
    pub fn max_abs(&self) -> u32 {
        match &self.w {
            Ints::I8(w) => w.iter().map(|q| u32::from(q.unsigned_abs())).max(),
            Ints::I16(w) => w.iter().map(|q| u32::from(q.unsigned_abs())).max(),
            Ints::Blocked { .. } => (0..self.rows)
                .flat_map(|i| self.row(i).to_i32())
                .map(i32::unsigned_abs)
                .max(),
        }
        .unwrap_or(0)
    }

    /// Row `i`'s integers.
    pub fn row(&self, i: usize) -> Row<'_> {
        let range = i * self.cols..(i + 1) * self.cols;
        match &self.w {
            Ints::I8(w) => Row::I8(&w[range]),
            Ints::I16(w) => Row::I16(&w[range]),
            Ints::Blocked { q, m } => {
                let per = self.cols / RING_BLOCK;
                Row::Blocked {
                    q: &q[range],
                    m: &m[i * per..(i + 1) * per],
                }
            }
        }
    }

    /// Each row's scale.
    pub fn scales(&self) -> &[f32] {
        &self.scales
    }

    /// The largest integer an activation may hold so that every product `W x` lies in
    /// `-(2^31 - 1)..2^31` and lifts back from the ring exactly: `(2^31 - 1) / max_i Σ_j
    /// |w[i, j]|`.
    pub fn activation_bound(&self) -> i32 {
        (((1u64 << 31) - 1) / self.l1_max.max(1)).min(i32::MAX as u64) as i32
    }

    /// Bytes the weights take.
    pub fn byte_len(&self) -> usize {
        let ints = match &self.w {
            Ints::I8(w) => w.len(),
            Ints::I16(w) => 2 * w.len(),
            Ints::Blocked { q, m } => q.len() + m.len(),
        };
        ints + 4 * self.scales.len()
    }

    /// `out[t, i] = Σ_j w[i, j] u[t, j] (mod 2^32)` for `n` words of `cols` (`u`: `[n,
    /// cols]`, `out`: `[n, rows]`), on every core, with the best kernels this CPU has.
    ///
    /// # Panics
    /// If the slices do not hold `n` rows.
    pub fn mul(&self, u: &[u32], n: usize, out: &mut [u32]) {
        self.mul_with(Isa::current(), u, n, out)
    }

    /// [`Self::mul`] with the kernels of `isa` (the portable ones where the CPU lacks it).
    pub fn mul_with(&self, isa: Isa, u: &[u32], n: usize, out: &mut [u32]) {
        assert_eq!(u.len(), n * self.cols, "masked input of the wrong size");
        assert_eq!(out.len(), n * self.rows, "output of the wrong size");
        if n == 0 || self.rows == 0 {
            return;
        }
        let planes = Planes::split(u, n, self.cols);
        let kernel = Kernel::for_isa(isa);
        let rows = self.rows;
        let threads = rayon::current_num_threads().max(1);
        let per_task = (rows / (4 * threads)).max(16).min(rows);
        if n == 1 {
            out.par_chunks_mut(per_task).enumerate().for_each(|(t, o)| {
                let r0 = t * per_task;
                kernel.run(self, r0, r0 + o.len(), &planes, o);
            });
            return;
        }
        let blocks: Vec<Vec<u32>> = (0..rows.div_ceil(per_task))
            .into_par_iter()
            .map(|t| {
                let r0 = t * per_task;
                let r1 = (r0 + per_task).min(rows);
                let mut block = vec![0; (r1 - r0) * n];
                kernel.run(self, r0, r1, &planes, &mut block);
                block
            })
            .collect();
        for (t, block) in blocks.iter().enumerate() {
            let r0 = t * per_task;
            let len = block.len() / n;
            for (k, o) in out.chunks_exact_mut(rows).enumerate() {
                for (i, v) in o[r0..r0 + len].iter_mut().enumerate() {
                    *v = block[i * n + k];
                }
            }
        }
    }
}

/// Masked words split into signed 16-bit halves, `u = lo + 2^16 hi (mod 2^32)`, word by
/// word: `[n, cols]` each.
#[derive(Debug)]
pub struct Planes {
    pub n: usize,
    pub cols: usize,
    pub lo: Vec<i16>,
    pub hi: Vec<i16>,
}

impl Planes {
    pub fn split(u: &[u32], n: usize, cols: usize) -> Planes {
        let mut lo = Vec::with_capacity(u.len());
        let mut hi = Vec::with_capacity(u.len());
        for &v in u {
            let l = v as u16 as i16;
            lo.push(l);
            hi.push((v.wrapping_sub(l as i32 as u32) >> 16) as u16 as i16);
        }
        Planes { n, cols, lo, hi }
    }
}

/// The kernel family a product runs with.
#[derive(Debug, Clone, Copy)]
enum Kernel {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Kernel {
    fn for_isa(isa: Isa) -> Kernel {
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni if crate::cpu::has(Isa::Avx512Vnni) => Kernel::Avx512,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 | Isa::Avx512Vnni if crate::cpu::has(Isa::Avx2) => Kernel::Avx2,
            _ => Kernel::Portable,
        }
    }

    /// Rows `r0..r1` for every word: `out` is `[r1 - r0, n]` when `n > 1`, `[r1 - r0]`
    /// otherwise.
    fn run(self, m: &RingMatrix, r0: usize, r1: usize, p: &Planes, out: &mut [u32]) {
        match self {
            Kernel::Portable => portable::rows_planes(m, r0, r1, p, out),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => x86::rows_avx2(m, r0, r1, p, out),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => x86::rows_avx512(m, r0, r1, p, out),
        }
    }
}
