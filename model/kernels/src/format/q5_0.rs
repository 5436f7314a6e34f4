//! Q5_0: blocks of 32 values, `x = d * (q - 16)` with a 5-bit `q`.
//!
//! Layout: `d: f16`, `qh: u32` (bit `j` is the fifth bit of value `j`), then 16 bytes of
//! low nibbles as in Q4_0.

use super::{f16_at, QK};

pub const BLOCK_BYTES: usize = 2 + 4 + QK / 2;

pub(super) fn dequantize(bytes: &[u8], out: &mut [f32]) {
    for (o, b) in out
        .chunks_exact_mut(QK)
        .zip(bytes.chunks_exact(BLOCK_BYTES))
    {
        let d = f16_at(b, 0);
        let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
        let (lo, hi) = o.split_at_mut(QK / 2);
        for (j, &q) in b[6..].iter().enumerate() {
            let h0 = ((qh >> j) & 1) as u8;
            let h1 = ((qh >> (j + 16)) & 1) as u8;
            lo[j] = d * f32::from(((q & 0x0F) | (h0 << 4)) as i8 - 16);
            hi[j] = d * f32::from(((q >> 4) | (h1 << 4)) as i8 - 16);
        }
    }
}
