//! Q5_K: as Q4_K with a fifth bit per value: `x = d * s * q - dmin * m`, 5-bit `q`.
//!
//! Layout: `d: f16`, `dmin: f16`, 12 bytes of packed scales and minimums, 32 bytes `qh`
//! (bit `g` of byte `l` is the fifth bit of value `l` of group `g`), 128 bytes of nibbles
//! (as Q4_K).

use super::k_scales::scale_min;
use super::{f16_at, QK_K};

pub const BLOCK_BYTES: usize = 4 + 12 + QK_K / 8 + QK_K / 2;

pub(super) fn dequantize(bytes: &[u8], out: &mut [f32]) {
    for (y, b) in out
        .chunks_exact_mut(QK_K)
        .zip(bytes.chunks_exact(BLOCK_BYTES))
    {
        let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
        let packed = &b[4..16];
        let qh = &b[16..48];
        let qs = &b[48..];
        for (g, group) in y.chunks_exact_mut(32).enumerate() {
            let (s, m) = scale_min(g, packed);
            let (dl, ml) = (d * f32::from(s), dmin * f32::from(m));
            let chunk = &qs[32 * (g / 2)..32 * (g / 2) + 32];
            let shift = 4 * (g % 2);
            for (l, x) in group.iter_mut().enumerate() {
                let q = ((chunk[l] >> shift) & 0x0F) | (((qh[l] >> g) & 1) << 4);
                *x = dl * f32::from(q) - ml;
            }
        }
    }
}
