//! Q8_K: super-blocks of 256 values, `x = d * q` with an f32 `d` and signed bytes `q`,
//! plus the sums of each 16 `q` (which the k-quant dot products use for the minimums).
//! ggml quantizes activations to it for products with k-quant weights.
//!
//! Layout: `d: f32`, 256 `i8`, 16 `i16` sums.

use super::QK_K;

pub const BLOCK_BYTES: usize = 4 + QK_K + 2 * QK_K / 16;

pub(super) fn dequantize(bytes: &[u8], out: &mut [f32]) {
    for (y, b) in out
        .chunks_exact_mut(QK_K)
        .zip(bytes.chunks_exact(BLOCK_BYTES))
    {
        let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        for (x, &q) in y.iter_mut().zip(&b[4..4 + QK_K]) {
            *x = d * f32::from(q as i8);
        }
    }
}
