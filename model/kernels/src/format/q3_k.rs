//! Q3_K: super-blocks of 256 values in 16 groups of 16, `x = d * (s - 32) * (q - 4h')`
//! with a 2-bit `q`, a high bit `h` (`h' = 1 - h`: the offset applies when the bit is
//! clear) and 6-bit group scales `s`.
//!
//! Layout: 32 bytes `hmask` (bit `i` of byte `l` is the high bit of value `32 i + l`), 64
//! bytes of 2-bit values (as Q2_K), 12 bytes of packed scales, `d: f16`.

use super::{f16_at, QK_K};

pub const BLOCK_BYTES: usize = QK_K / 8 + QK_K / 4 + 12 + 2;

/// The 16 six-bit scales, packed as ggml does: the low nibbles in bytes 0-7 (scales 0-7
/// low, then 8-15 high), the top two bits in bytes 8-11.
fn scales(p: &[u8]) -> [i8; 16] {
    let mut s = [0i8; 16];
    for (i, v) in s.iter_mut().enumerate() {
        let low = if i < 8 { p[i] & 0x0F } else { p[i - 8] >> 4 };
        let high = (p[8 + i % 4] >> (2 * (i / 4))) & 3;
        *v = (low | (high << 4)) as i8 - 32;
    }
    s
}

pub(super) fn dequantize(bytes: &[u8], out: &mut [f32]) {
    for (y, b) in out
        .chunks_exact_mut(QK_K)
        .zip(bytes.chunks_exact(BLOCK_BYTES))
    {
        let hmask = &b[..32];
        let qs = &b[32..96];
        let sc = scales(&b[96..108]);
        let d = f16_at(b, 108);
        for (g, group) in y.chunks_exact_mut(16).enumerate() {
            let (half, shift_i, start) = (g / 8, (g / 2) % 4, 16 * (g % 2));
            let dl = d * f32::from(sc[g]);
            let bit = 4 * half + shift_i;
            for (l, x) in (start..start + 16).zip(group.iter_mut()) {
                let q = (qs[32 * half + l] >> (2 * shift_i)) & 3;
                let h = (hmask[l] >> bit) & 1;
                *x = dl * f32::from(q as i8 - if h == 0 { 4 } else { 0 });
            }
        }
    }
}
