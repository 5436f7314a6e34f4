//! Q4_K: super-blocks of 256 values in 8 groups of 32, `x = d * s * q - dmin * m` with a
//! 4-bit `q` and 6-bit group scale `s` and minimum `m`.
//!
//! Layout: `d: f16`, `dmin: f16`, 12 bytes of packed scales and minimums, 128 bytes of
//! nibbles (four chunks of 32 bytes; chunk `c` holds group `2c` in its low nibbles and
//! group `2c + 1` in its high nibbles).

use super::k_scales::scale_min;
use super::{f16_at, QK_K};

pub const BLOCK_BYTES: usize = 4 + 12 + QK_K / 2;

pub(super) fn dequantize(bytes: &[u8], out: &mut [f32]) {
    for (y, b) in out
        .chunks_exact_mut(QK_K)
        .zip(bytes.chunks_exact(BLOCK_BYTES))
    {
        let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
        let packed = &b[4..16];
        let qs = &b[16..];
        for (g, group) in y.chunks_exact_mut(32).enumerate() {
            let (s, m) = scale_min(g, packed);
            let (dl, ml) = (d * f32::from(s), dmin * f32::from(m));
            let chunk = &qs[32 * (g / 2)..32 * (g / 2) + 32];
            let shift = 4 * (g % 2);
            for (x, &byte) in group.iter_mut().zip(chunk) {
                *x = dl * f32::from((byte >> shift) & 0x0F) - ml;
            }
        }
    }
}
