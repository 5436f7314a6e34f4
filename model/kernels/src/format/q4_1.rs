//! Q4_1: blocks of 32 values, `x = d * q + m` with a 4-bit `q`.
//!
//! Layout: `d: f16`, `m: f16`, then 16 bytes of nibbles as in Q4_0.

use super::{f16_at, QK};

pub const BLOCK_BYTES: usize = 4 + QK / 2;

pub(super) fn dequantize(bytes: &[u8], out: &mut [f32]) {
    for (o, b) in out
        .chunks_exact_mut(QK)
        .zip(bytes.chunks_exact(BLOCK_BYTES))
    {
        let (d, m) = (f16_at(b, 0), f16_at(b, 2));
        let (lo, hi) = o.split_at_mut(QK / 2);
        for (j, &q) in b[4..].iter().enumerate() {
            lo[j] = d * f32::from(q & 0x0F) + m;
            hi[j] = d * f32::from(q >> 4) + m;
        }
    }
}
