//! Every kernel against the reference: the portable integer dot products against the
//! dequantized weights times the dequantized activations (the same sum, exactly up to f32
//! rounding), and every SIMD kernel this CPU has against the portable one.

use super::*;
use crate::act::{Q8Acts, Q8KActs};

/// A small deterministic generator (xorshift64*), enough for test data.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [-1, 1).
    pub(crate) fn f32(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// Where each format keeps its f16 scales (and minimums).
fn scale_offsets(ty: GgmlType) -> &'static [usize] {
    match ty {
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => &[0],
        GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4_K | GgmlType::Q5_K => &[0, 2],
        GgmlType::Q2_K => &[80, 82],
        GgmlType::Q3_K => &[108],
        GgmlType::Q6_K => &[208],
        _ => &[],
    }
}

/// `rows` random rows of `cols` values of `ty`: random bits with sane scales.
pub(crate) fn random_rows(ty: GgmlType, rows: usize, cols: usize, rng: &mut Rng) -> Vec<u8> {
    let (per_block, bytes) = ty.block_layout().expect("readable");
    let n = rows * cols / per_block;
    let mut out: Vec<u8> = (0..n * bytes).map(|_| rng.next() as u8).collect();
    for blk in out.chunks_exact_mut(bytes) {
        for &at in scale_offsets(ty) {
            let s = half::f16::from_f32(0.001 + 0.05 * rng.f32().abs());
            blk[at..at + 2].copy_from_slice(&s.to_le_bytes());
        }
        if ty == GgmlType::Q8_0 {
            // ggml's quantizer never writes -128
            for q in &mut blk[2..] {
                if *q == 0x80 {
                    *q = 0x81;
                }
            }
        }
    }
    out
}

fn close(got: f32, want: f32, scale: f32, what: &str) {
    let tol = 1e-4 * scale + 1e-5;
    assert!(
        (got - want).abs() <= tol,
        "{what}: {got} vs {want} (tolerance {tol})"
    );
}

const Q8_TYPES: [GgmlType; 5] = [
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
];
const K_TYPES: [GgmlType; 5] = [
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

#[test]
fn portable_integer_dots_equal_dequantized_products() {
    let mut rng = Rng::new(1);
    let cols = 512;
    let x: Vec<f32> = (0..cols).map(|_| rng.f32()).collect();
    let a = Q8Acts::quantize(&x, 1, cols);
    let ak = Q8KActs::quantize(&x, 1, cols);
    let mut xa = vec![0.0; cols];
    let mut xk = vec![0.0; cols];
    for (i, v) in xa.iter_mut().enumerate() {
        *v = a.d[i / 32] * f32::from(a.q[i]);
    }
    for (i, v) in xk.iter_mut().enumerate() {
        *v = ak.d[i / 256] * f32::from(ak.q[i]);
    }
    for ty in Q8_TYPES.into_iter().chain(K_TYPES) {
        for seed in 0..8 {
            let w = random_rows(ty, 1, cols, &mut Rng::new(seed + 100));
            let mut wf = vec![0.0; cols];
            dequantize_row(ty, &w, &mut wf);
            let (got, acts) = match ActFormat::of(ty) {
                ActFormat::Q8 => (portable::dot_q8(ty, &w, a.row(0)), &xa),
                _ => (portable::dot_q8k(ty, &w, ak.row(0)), &xk),
            };
            let want: f64 = wf.iter().zip(acts).map(|(a, b)| f64::from(a * b)).sum();
            let scale: f32 = wf.iter().zip(acts).map(|(a, b)| (a * b).abs()).sum();
            close(got, want as f32, scale, &format!("{ty} seed {seed}"));
        }
    }
}

#[test]
fn every_simd_kernel_equals_the_portable_one() {
    let mut rng = Rng::new(2);
    let cols = 1024;
    for isa in Isa::available() {
        for ty in Q8_TYPES.into_iter().chain(K_TYPES) {
            for seed in 0..16 {
                let x: Vec<f32> = (0..cols).map(|_| rng.f32() * (seed as f32 + 0.5)).collect();
                let w = random_rows(ty, 1, cols, &mut Rng::new(seed));
                let (got, want, scale) = match ActFormat::of(ty) {
                    ActFormat::Q8 => {
                        let a = Q8Acts::quantize(&x, 1, cols);
                        let want = portable::dot_q8(ty, &w, a.row(0));
                        (dot_q8(isa, ty, &w, &a), want, magnitude(ty, &w, &x))
                    }
                    _ => {
                        let a = Q8KActs::quantize(&x, 1, cols);
                        let want = portable::dot_q8k(ty, &w, a.row(0));
                        (dot_q8k(isa, ty, &w, &a), want, magnitude(ty, &w, &x))
                    }
                };
                close(got, want, scale, &format!("{isa} {ty} seed {seed}"));
            }
        }
        let x: Vec<f32> = (0..1000).map(|_| rng.f32()).collect();
        let y: Vec<f32> = (0..1000).map(|_| rng.f32()).collect();
        let want: f32 = x.iter().zip(&y).map(|(a, b)| a * b).sum();
        close(dot_f32(isa, &x, &y), want, 1000.0, &format!("{isa} f32"));
    }
}

/// Σ |w x|: the scale of the rounding error of a dot product.
fn magnitude(ty: GgmlType, w: &[u8], x: &[f32]) -> f32 {
    let mut wf = vec![0.0; x.len()];
    dequantize_row(ty, w, &mut wf);
    wf.iter().zip(x).map(|(a, b)| (a * b).abs()).sum()
}
