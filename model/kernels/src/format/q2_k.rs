//! Q2_K: super-blocks of 256 values in 16 groups of 16, `x = d * s * q - dmin * m` with a
//! 2-bit `q` and 4-bit group scale `s` and minimum `m`.
//!
//! Layout: 16 bytes of scales (low nibble `s`, high nibble `m`), 64 bytes of 2-bit values
//! (two halves of 128 values; in each, byte `l` holds values `l`, `l + 32`, `l + 64` and
//! `l + 96` in bits 0-1, 2-3, 4-5, 6-7), `d: f16`, `dmin: f16`.

use super::{f16_at, QK_K};

pub const BLOCK_BYTES: usize = QK_K / 16 + QK_K / 4 + 4;

pub(super) fn dequantize(bytes: &[u8], out: &mut [f32]) {
    for (y, b) in out
        .chunks_exact_mut(QK_K)
        .zip(bytes.chunks_exact(BLOCK_BYTES))
    {
        let scales = &b[..16];
        let qs = &b[16..80];
        let (d, dmin) = (f16_at(b, 80), f16_at(b, 82));
        for (g, group) in y.chunks_exact_mut(16).enumerate() {
            // group g: half g / 8, shift 2 * ((g / 2) % 4), bytes 16 * (g % 2) ..
            let (half, shift, start) = (g / 8, 2 * ((g / 2) % 4), 16 * (g % 2));
            let dl = d * f32::from(scales[g] & 0x0F);
            let ml = dmin * f32::from(scales[g] >> 4);
            let q = &qs[32 * half + start..32 * half + start + 16];
            for (x, &byte) in group.iter_mut().zip(q) {
                *x = dl * f32::from((byte >> shift) & 3) - ml;
            }
        }
    }
}
