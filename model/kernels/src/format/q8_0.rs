//! Q8_0: blocks of 32 values, `x = d * q` with a signed byte `q`.
//!
//! Layout: `d: f16`, then 32 `i8`. Also the format activations are quantized to for the
//! 32-element weight formats.

use super::{f16_at, QK};

pub const BLOCK_BYTES: usize = 2 + QK;

pub(super) fn dequantize(bytes: &[u8], out: &mut [f32]) {
    for (o, b) in out
        .chunks_exact_mut(QK)
        .zip(bytes.chunks_exact(BLOCK_BYTES))
    {
        let d = f16_at(b, 0);
        for (x, &q) in o.iter_mut().zip(&b[2..]) {
            *x = f32::from(q as i8) * d;
        }
    }
}

/// Quantize `x` (a multiple of 32 values) to Q8_0 blocks appended to `out`, as ggml's
/// `quantize_row_q8_0_ref`: `d = max|x| / 127`, `q = round(x / d)` (half away from zero).
///
/// # Panics
/// If `x.len()` is not a multiple of 32.
pub fn quantize(x: &[f32], out: &mut Vec<u8>) {
    assert_eq!(x.len() % QK, 0, "Q8_0 needs a multiple of {QK} values");
    out.reserve(x.len() / QK * BLOCK_BYTES);
    for block in x.chunks_exact(QK) {
        let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&half::f16::from_f32(d).to_le_bytes());
        out.extend(block.iter().map(|v| (v * id).round() as i8 as u8));
    }
}
