//! Wide integers in about one byte each: `w = m · q`, a signed byte `q` per weight and a
//! multiplier `m` per [`RING_BLOCK`] columns of a row ([`Ints::Blocked`]).
//!
//! A product in masked mode reads every weight once per word, so at decode it runs at the
//! speed of memory: 9-15-bit integers stored in two bytes cost twice the time of int8 ones.
//! Blocked, a row keeps the width of its integers (the activations' bound is unchanged: it
//! depends on `Σ |w|`), while each block's grid is `m` apart, `m` the smallest multiplier
//! that brings the block's largest integer within a byte — a block of small weights keeps
//! the row's finest grid, and a block holding the row's largest one gets a grid as fine as
//! int8 with its own scale (Q8_0's). The kernels widen `q` and multiply by `m` in
//! registers, which memory-bound products hide.

use rayon::prelude::*;

use super::{check_input, round_even, Ints, RingError, RingMatrix, RING_BLOCK};

/// The largest multiplier: `m · 127 < 2^15` with room for `q = -128` never produced.
const M_MAX: u32 = 255;

/// Whether `bits`-bit integers over rows of `cols` are stored blocked by
/// [`RingMatrix::quantize_within`]: wider than a byte, narrow enough for the multipliers to
/// fit a byte, and rows of whole blocks.
pub(super) fn fits(cols: usize, bits: u32) -> bool {
    (9..=15).contains(&bits) && cols.is_multiple_of(RING_BLOCK) && cols > 0
}

impl RingMatrix {
    /// Round `data` (`[rows, cols]`, row-major, `cols` a multiple of [`RING_BLOCK`]) to
    /// `bits`-bit integers per row (9 to 15) stored blocked: the row's scale is that of
    /// [`Self::quantize`], each block's multiplier `m = ceil(max |w| / 127)` in the row's
    /// units, and `q = round(w / m)`.
    pub fn quantize_blocked(
        rows: usize,
        cols: usize,
        data: &[f32],
        bits: u32,
    ) -> Result<Self, RingError> {
        check_input(rows, cols, data, bits)?;
        if !fits(cols, bits) {
            return Err(RingError::Bits { bits });
        }
        let qmax = ((1i32 << (bits - 1)) - 1) as f32;
        let per = cols / RING_BLOCK;
        let mut q = vec![0i8; rows * cols];
        let mut m = vec![0u8; rows * per];
        let mut scales = vec![0f32; rows];
        data.par_chunks(cols)
            .zip(q.par_chunks_mut(cols))
            .zip(m.par_chunks_mut(per))
            .zip(scales.par_iter_mut())
            .for_each(|(((row, qs), ms), scale)| {
                let amax = row.iter().fold(0f32, |a, v| a.max(v.abs()));
                *scale = amax / qmax;
                if *scale == 0.0 {
                    return;
                }
                let inv = 1.0 / *scale;
                for ((block, qb), mb) in row
                    .chunks_exact(RING_BLOCK)
                    .zip(qs.chunks_exact_mut(RING_BLOCK))
                    .zip(ms.iter_mut())
                {
                    // the block's largest integer on the row's grid
                    let big = block
                        .iter()
                        .map(|v| round_even((v * inv).abs().min(qmax)))
                        .fold(0f32, f32::max) as u32;
                    let mult = big.div_ceil(127).clamp(1, M_MAX);
                    *mb = mult as u8;
                    let step = inv / mult as f32;
                    for (o, v) in qb.iter_mut().zip(block) {
                        *o = round_even((v * step).clamp(-127.0, 127.0)) as i8;
                    }
                }
            });
        RingMatrix::from_parts(rows, cols, Ints::Blocked { q, m }, scales)
    }
}
