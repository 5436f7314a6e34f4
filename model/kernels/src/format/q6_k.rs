//! Q6_K: super-blocks of 256 values in 16 groups of 16, `x = d * s * (q - 32)` with a
//! 6-bit `q` and a signed 8-bit group scale `s`.
//!
//! Layout: 128 bytes `ql` (low nibbles), 64 bytes `qh` (top two bits), 16 `i8` scales,
//! `d: f16`. In each half of 128 values, value `32 k + l` takes its low nibble from
//! `ql[64 h + l + 32 (k % 2)]` (bits `4 (k / 2)`) and its top bits from `qh[32 h + l]`
//! (bits `2 k`).

use super::{f16_at, QK_K};

pub const BLOCK_BYTES: usize = QK_K / 2 + QK_K / 4 + QK_K / 16 + 2;

pub(super) fn dequantize(bytes: &[u8], out: &mut [f32]) {
    for (y, b) in out
        .chunks_exact_mut(QK_K)
        .zip(bytes.chunks_exact(BLOCK_BYTES))
    {
        let ql = &b[..128];
        let qh = &b[128..192];
        let scales = &b[192..208];
        let d = f16_at(b, 208);
        for (i, x) in y.iter_mut().enumerate() {
            let (h, k, l) = (i / 128, (i % 128) / 32, i % 32);
            let low = (ql[64 * h + l + 32 * (k % 2)] >> (4 * (k / 2))) & 0x0F;
            let high = (qh[32 * h + l] >> (2 * k)) & 3;
            let q = (low | (high << 4)) as i8 - 32;
            let s = scales[i / 16] as i8;
            *x = (d * f32::from(s)) * f32::from(q);
        }
    }
}
