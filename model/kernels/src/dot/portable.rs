//! The reference dot products, in plain Rust: one weight row (GGML blocks) against one
//! row of quantized activations. Every SIMD kernel is tested against these; they are also
//! what a CPU without AVX2 or NEON runs.

use crate::act::{Q8KRow, Q8Row};
use crate::format::{GgmlType, QK, QK_K};

#[inline]
fn f16_at(b: &[u8], i: usize) -> f32 {
    half::f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// The 32 levels of a 32-value block with 4-bit values (low nibbles first).
#[inline]
fn nibbles(qs: &[u8]) -> [u8; QK] {
    let mut v = [0u8; QK];
    for j in 0..QK / 2 {
        v[j] = qs[j] & 0x0F;
        v[j + QK / 2] = qs[j] >> 4;
    }
    v
}

/// The 32 levels of a 32-value block with 5-bit values.
#[inline]
fn nibbles_5(qh: u32, qs: &[u8]) -> [u8; QK] {
    let mut v = nibbles(qs);
    for (j, x) in v.iter_mut().enumerate() {
        *x |= (((qh >> j) & 1) as u8) << 4;
    }
    v
}

#[inline]
fn idot_u8(w: &[u8], a: &[i8]) -> i32 {
    w.iter()
        .zip(a)
        .map(|(&w, &a)| i32::from(w) * i32::from(a))
        .sum()
}

/// `w · x` for a row of a 32-value format against [`Q8Row`] activations.
///
/// # Panics
/// If `ty` is not one of Q4_0, Q4_1, Q5_0, Q5_1, Q8_0.
pub fn dot_q8(ty: GgmlType, w: &[u8], a: Q8Row<'_>) -> f32 {
    let (_, bytes) = ty.block_layout().expect("readable");
    let mut acc = 0.0f32;
    for (b, blk) in w.chunks_exact(bytes).enumerate() {
        let qa = &a.q[b * QK..(b + 1) * QK];
        let (da, sa) = (a.d[b], a.sum[b]);
        acc += match ty {
            GgmlType::Q8_0 => {
                let isum: i32 = blk[2..]
                    .iter()
                    .zip(qa)
                    .map(|(&w, &a)| i32::from(w as i8) * i32::from(a))
                    .sum();
                f16_at(blk, 0) * da * isum as f32
            }
            GgmlType::Q4_0 => {
                let isum = idot_u8(&nibbles(&blk[2..]), qa) - 8 * sa;
                f16_at(blk, 0) * da * isum as f32
            }
            GgmlType::Q4_1 => {
                let isum = idot_u8(&nibbles(&blk[4..]), qa);
                f16_at(blk, 0) * da * isum as f32 + f16_at(blk, 2) * da * sa as f32
            }
            GgmlType::Q5_0 => {
                let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
                let isum = idot_u8(&nibbles_5(qh, &blk[6..]), qa) - 16 * sa;
                f16_at(blk, 0) * da * isum as f32
            }
            GgmlType::Q5_1 => {
                let qh = u32::from_le_bytes([blk[4], blk[5], blk[6], blk[7]]);
                let isum = idot_u8(&nibbles_5(qh, &blk[8..]), qa);
                f16_at(blk, 0) * da * isum as f32 + f16_at(blk, 2) * da * sa as f32
            }
            other => panic!("{other} has no 32-value integer dot product"),
        };
    }
    acc
}

/// `w · x` for a row of a k-quant format against [`Q8KRow`] activations.
///
/// # Panics
/// If `ty` is not one of Q2_K, Q3_K, Q4_K, Q5_K, Q6_K.
pub fn dot_q8k(ty: GgmlType, w: &[u8], a: Q8KRow<'_>) -> f32 {
    let (_, bytes) = ty.block_layout().expect("readable");
    let mut acc = 0.0f32;
    for (b, blk) in w.chunks_exact(bytes).enumerate() {
        let qa = &a.q[b * QK_K..(b + 1) * QK_K];
        let bs = &a.bsums[b * 16..(b + 1) * 16];
        let da = a.d[b];
        acc += match ty {
            GgmlType::Q2_K => q2_k(blk, qa, bs, da),
            GgmlType::Q3_K => q3_k(blk, qa, da),
            GgmlType::Q4_K => q45_k(blk, qa, bs, da, false),
            GgmlType::Q5_K => q45_k(blk, qa, bs, da, true),
            GgmlType::Q6_K => q6_k(blk, qa, bs, da),
            other => panic!("{other} has no k-quant integer dot product"),
        };
    }
    acc
}

/// Q2_K: 16 groups of 16, levels 0..3 scaled by a 4-bit scale, minus a 4-bit minimum.
fn q2_k(blk: &[u8], qa: &[i8], bsums: &[i32], da: f32) -> f32 {
    let (scales, qs) = (&blk[..16], &blk[16..80]);
    let (d, dmin) = (f16_at(blk, 80), f16_at(blk, 82));
    let (mut isum, mut msum) = (0i32, 0i32);
    for g in 0..16 {
        let (half, shift, start) = (g / 8, 2 * ((g / 2) % 4), 16 * (g % 2));
        let lv: Vec<u8> = qs[32 * half + start..32 * half + start + 16]
            .iter()
            .map(|&q| (q >> shift) & 3)
            .collect();
        isum += i32::from(scales[g] & 0x0F) * idot_u8(&lv, &qa[16 * g..16 * g + 16]);
        msum += i32::from(scales[g] >> 4) * bsums[g];
    }
    d * da * isum as f32 - dmin * da * msum as f32
}

/// Q3_K: 16 groups of 16, levels -4..3, signed 6-bit scales.
fn q3_k(blk: &[u8], qa: &[i8], da: f32) -> f32 {
    let mut levels = [0f32; QK_K];
    // the dequantized values with d = 1 are `scale * level`: integers
    crate::format::GgmlType::Q3_K.dequantize(&unit_d(blk, 108), &mut levels);
    let isum: i64 = levels
        .iter()
        .zip(qa)
        .map(|(&l, &a)| l as i64 * i64::from(a))
        .sum();
    f16_at(blk, 108) * da * isum as f32
}

/// Q4_K and Q5_K: 8 groups of 32, levels scaled by a 6-bit scale, minus a 6-bit minimum.
fn q45_k(blk: &[u8], qa: &[i8], bsums: &[i32], da: f32, five: bool) -> f32 {
    let (d, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
    let packed = &blk[4..16];
    let (qh, qs) = if five {
        (&blk[16..48], &blk[48..])
    } else {
        (&blk[..0], &blk[16..])
    };
    let (mut isum, mut msum) = (0i32, 0i32);
    for g in 0..8 {
        let (sc, m) = scale_min(g, packed);
        let chunk = &qs[32 * (g / 2)..32 * (g / 2) + 32];
        let shift = 4 * (g % 2);
        let lv: Vec<u8> = (0..32)
            .map(|l| {
                let low = (chunk[l] >> shift) & 0x0F;
                if five {
                    low | (((qh[l] >> g) & 1) << 4)
                } else {
                    low
                }
            })
            .collect();
        isum += i32::from(sc) * idot_u8(&lv, &qa[32 * g..32 * g + 32]);
        msum += i32::from(m) * (bsums[2 * g] + bsums[2 * g + 1]);
    }
    d * da * isum as f32 - dmin * da * msum as f32
}

/// Q6_K: 16 groups of 16, levels -32..31, signed 8-bit scales.
fn q6_k(blk: &[u8], qa: &[i8], bsums: &[i32], da: f32) -> f32 {
    let (ql, qh, scales) = (&blk[..128], &blk[128..192], &blk[192..208]);
    let mut isum = 0i32;
    for g in 0..16 {
        let mut gsum = 0i32;
        for (i, &a) in qa.iter().enumerate().skip(16 * g).take(16) {
            let (h, k, l) = (i / 128, (i % 128) / 32, i % 32);
            let low = (ql[64 * h + l + 32 * (k % 2)] >> (4 * (k / 2))) & 0x0F;
            let high = (qh[32 * h + l] >> (2 * k)) & 3;
            gsum += i32::from(low | (high << 4)) * i32::from(a);
        }
        isum += i32::from(scales[g] as i8) * (gsum - 32 * bsums[g]);
    }
    f16_at(blk, 208) * da * isum as f32
}

/// `blk` with its f16 scale at `at` replaced by 1.0.
fn unit_d(blk: &[u8], at: usize) -> Vec<u8> {
    let mut b = blk.to_vec();
    b[at..at + 2].copy_from_slice(&half::f16::ONE.to_le_bytes());
    b
}

pub(crate) fn scale_min(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// `w · x` with f32 activations against the weights dequantized block by block: the exact
/// path (`--exact`), and the one for F32, F16 and BF16 weights.
pub fn dot_f32(ty: GgmlType, w: &[u8], x: &[f32]) -> f32 {
    let (per_block, bytes) = ty.block_layout().expect("readable");
    let mut buf = [0f32; QK_K];
    let mut acc = 0.0f32;
    let chunk = if per_block == 1 { QK } else { per_block };
    for (blk, xs) in w.chunks(chunk / per_block * bytes).zip(x.chunks(chunk)) {
        let out = &mut buf[..xs.len()];
        ty.dequantize(blk, out);
        acc += out.iter().zip(xs).map(|(a, b)| a * b).sum::<f32>();
    }
    acc
}
