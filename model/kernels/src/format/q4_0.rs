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
