//! Q4_0: blocks of 32 values, `x = d * (q - 8)` with a 4-bit `q`.
//!
//! Layout: `d: f16`, then 16 bytes whose low nibbles are values 0..16 and whose high
//! nibbles are values 16..32.

use super::{f16_at, QK};

pub const BLOCK_BYTES: usize = 2 + QK / 2;

pub(super) fn dequantize(bytes: &[u8], out: &mut [f32]) {
    for (o, b) in out
        .chunks_exact_mut(QK)
        .zip(bytes.chunks_exact(BLOCK_BYTES))
    {
        let d = f16_at(b, 0);
        let (lo, hi) = o.split_at_mut(QK / 2);
        for (j, &q) in b[2..].iter().enumerate() {
            lo[j] = d * f32::from((q & 0x0F) as i8 - 8);
            hi[j] = d * f32::from((q >> 4) as i8 - 8);
        }
    }
}

/// Quantize `x` (a multiple of 32 values) to Q4_0 blocks appended to `out`, as ggml's
/// `quantize_row_q4_0_ref`: the value of largest magnitude `m` maps to -8, `d = m / -8`,
/// `q = min(15, trunc(x / d + 8.5))`.
///
/// # Panics
/// If `x.len()` is not a multiple of 32.
pub fn quantize(x: &[f32], out: &mut Vec<u8>) {
    assert_eq!(x.len() % QK, 0, "Q4_0 needs a multiple of {QK} values");
    out.reserve(x.len() / QK * BLOCK_BYTES);
    for block in x.chunks_exact(QK) {
        let (mut amax, mut max) = (0.0f32, 0.0f32);
        for &v in block {
            if amax < v.abs() {
                amax = v.abs();
                max = v;
            }
        }
        let d = max / -8.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&half::f16::from_f32(d).to_le_bytes());
        let q = |v: f32| ((v * id + 8.5) as i8).min(15) as u8;
        out.extend((0..QK / 2).map(|j| q(block[j]) | (q(block[QK / 2 + j]) << 4)));
    }
}
