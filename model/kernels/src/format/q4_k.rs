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

/// Quantize `x` (a multiple of 256 values) to Q4_K super-blocks appended to `out`.
///
/// Each group of 32 gets an affine 4-bit code over `[min(0, lo), hi]`; the groups' scales
/// and minimums are then coded in 6 bits against the super-block's largest ones (as
/// ggml's `quantize_row_q4_K_ref`, without its iterative refinement of each group's range:
/// a little more error, no search).
///
/// # Panics
/// If `x.len()` is not a multiple of 256.
pub fn quantize(x: &[f32], out: &mut Vec<u8>) {
    assert_eq!(x.len() % QK_K, 0, "Q4_K needs a multiple of {QK_K} values");
    out.reserve(x.len() / QK_K * BLOCK_BYTES);
    for block in x.chunks_exact(QK_K) {
        let mut scales = [0.0f32; 8];
        let mut mins = [0.0f32; 8];
        for (g, group) in block.chunks_exact(32).enumerate() {
            let lo = group.iter().fold(0.0f32, |m, &v| m.min(v));
            let hi = group.iter().fold(f32::MIN, |m, &v| m.max(v));
            scales[g] = (hi - lo) / 15.0;
            mins[g] = -lo;
        }
        let max_scale = scales.iter().fold(0.0f32, |m, &v| m.max(v));
        let max_min = mins.iter().fold(0.0f32, |m, &v| m.max(v));
        let inv_scale = if max_scale > 0.0 {
            63.0 / max_scale
        } else {
            0.0
        };
        let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
        let ls: [u8; 8] = std::array::from_fn(|g| (scales[g] * inv_scale).round().min(63.0) as u8);
        let lm: [u8; 8] = std::array::from_fn(|g| (mins[g] * inv_min).round().min(63.0) as u8);
        let d = half::f16::from_f32(max_scale / 63.0);
        let dmin = half::f16::from_f32(max_min / 63.0);
        out.extend_from_slice(&d.to_le_bytes());
        out.extend_from_slice(&dmin.to_le_bytes());
        let mut packed = [0u8; 12];
        for j in 0..8 {
            if j < 4 {
                packed[j] = ls[j];
                packed[j + 4] = lm[j];
            } else {
                packed[j + 4] = (ls[j] & 0x0F) | ((lm[j] & 0x0F) << 4);
                packed[j - 4] |= (ls[j] >> 4) << 6;
                packed[j] |= (lm[j] >> 4) << 6;
            }
        }
        out.extend_from_slice(&packed);
        // The codes, against the scales as stored (rounded to f16 and 6 bits).
        let header = &out[out.len() - HEADER_BYTES..];
        let ranges = group_ranges(header);
        let mut q = [0u8; QK_K];
        for (g, group) in block.chunks_exact(32).enumerate() {
            for (i, &v) in group.iter().enumerate() {
                q[32 * g + i] = code(ranges[g], v);
            }
        }
        write_codes(&q, out);
    }
}

/// The bytes before a super-block's codes: `d`, `dmin` and the packed scales.
pub const HEADER_BYTES: usize = 16;

/// The eight groups' step and offset `(d * s, dmin * m)` of the super-block whose header is
/// `header` (its first [`HEADER_BYTES`] bytes): a code `q` of group `g` stands for
/// `step * q - offset`.
pub fn group_ranges(header: &[u8]) -> [(f32, f32); 8] {
    let (d, dmin) = (f16_at(header, 0), f16_at(header, 2));
    std::array::from_fn(|g| {
        let (s, m) = scale_min(g, &header[4..16]);
        (d * f32::from(s), dmin * f32::from(m))
    })
}

/// The 4-bit code nearest to `v` in a group of range `(step, offset)`.
pub fn code((step, offset): (f32, f32), v: f32) -> u8 {
    let inv = if step > 0.0 { 1.0 / step } else { 0.0 };
    ((v + offset) * inv).round().clamp(0.0, 15.0) as u8
}

/// Append a super-block's 256 codes (values in order) in Q4_K's nibble layout.
pub fn write_codes(q: &[u8], out: &mut Vec<u8>) {
    assert_eq!(q.len(), QK_K, "a super-block of codes");
    for c in 0..4 {
        out.extend((0..32).map(|i| q[64 * c + i] | (q[64 * c + 32 + i] << 4)));
    }
}
