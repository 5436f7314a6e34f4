//! Dot products of weight rows (GGML blocks) with rows of activations, chosen per format
//! and instruction set. Row by row: [`portable`] is the reference, `x86` the AVX2 and
//! AVX-512 VNNI kernels; formats without a SIMD kernel run the portable one on every CPU.
//! Eight interleaved rows at a time ([`crate::pack`]): [`packed`] is the reference,
//! `x86_packed` the SIMD kernels, all giving the same bits.

pub mod packed;
pub mod portable;
#[cfg(target_arch = "x86_64")]
pub mod x86;
#[cfg(target_arch = "x86_64")]
pub mod x86_packed;

use crate::act::{Q8Acts, Q8KActs};
use crate::cpu::Isa;
use crate::format::{GgmlType, QK_K};

/// How a format's weights meet the activations in the fast (quantized) path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActFormat {
    /// Activations quantized per 32 values ([`crate::act::Q8Acts`]).
    Q8,
    /// Activations quantized per 256 values ([`crate::act::Q8KActs`]).
    Q8K,
    /// f32 activations against dequantized weights (F32, F16, BF16).
    F32,
}

impl ActFormat {
    /// The activation format a weight type is multiplied with in the fast path.
    pub fn of(ty: GgmlType) -> ActFormat {
        match ty {
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 => {
                ActFormat::Q8
            }
            GgmlType::Q2_K | GgmlType::Q3_K | GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K => {
                ActFormat::Q8K
            }
            _ => ActFormat::F32,
        }
    }
}

/// The products of weight rows with activation rows, chosen once per product: `isa`'s
/// SIMD kernel for the format, or the portable one.
#[derive(Debug, Clone, Copy)]
pub enum RowDot {
    Q8 {
        ty: GgmlType,
        #[cfg(target_arch = "x86_64")]
        simd: Option<x86::Q8Kernel>,
    },
    Q8K {
        ty: GgmlType,
        #[cfg(target_arch = "x86_64")]
        simd: Option<x86::Q8KKernel>,
    },
}

impl RowDot {
    /// The integer dot product for `ty` (a quantized format) with `isa`.
    ///
    /// # Panics
    /// If `ty` has no integer dot product (F32, F16, BF16: see [`ActFormat::of`]).
    pub fn new(isa: Isa, ty: GgmlType) -> Self {
        let _ = isa;
        match ActFormat::of(ty) {
            ActFormat::Q8 => RowDot::Q8 {
                ty,
                #[cfg(target_arch = "x86_64")]
                simd: x86::Q8Kernel::new(isa, ty),
            },
            ActFormat::Q8K => RowDot::Q8K {
                ty,
                #[cfg(target_arch = "x86_64")]
                simd: x86::Q8KKernel::new(isa, ty),
            },
            ActFormat::F32 => panic!("{ty} has no integer dot product"),
        }
    }

    /// `out[r * m + i] = w_r · a_i` for the rows `w_r` of `w` (`row_bytes` each) and the
    /// `m` rows of 32-value activations `a`.
    ///
    /// # Panics
    /// If this is a k-quant kernel or the sizes disagree.
    pub fn q8_block(&self, w: &[u8], row_bytes: usize, a: &Q8Acts, out: &mut [f32]) {
        match self {
            #[cfg(target_arch = "x86_64")]
            RowDot::Q8 { simd: Some(k), .. } => k.block(w, row_bytes, a, out),
            RowDot::Q8 { ty, .. } => {
                for (wr, col) in w.chunks_exact(row_bytes).zip(out.chunks_exact_mut(a.rows)) {
                    for (i, o) in col.iter_mut().enumerate() {
                        *o = portable::dot_q8(*ty, wr, a.row(i));
                    }
                }
            }
            RowDot::Q8K { ty, .. } => panic!("{ty} takes 256-value activations"),
        }
    }

    /// As [`RowDot::q8_block`], against 256-value activations.
    ///
    /// # Panics
    /// If this is not a k-quant kernel or the sizes disagree.
    pub fn q8k_block(&self, w: &[u8], row_bytes: usize, a: &Q8KActs, out: &mut [f32]) {
        match self {
            #[cfg(target_arch = "x86_64")]
            RowDot::Q8K { simd: Some(k), .. } => k.block(w, row_bytes, a, out),
            RowDot::Q8K { ty, .. } => {
                for (wr, col) in w.chunks_exact(row_bytes).zip(out.chunks_exact_mut(a.rows)) {
                    for (i, o) in col.iter_mut().enumerate() {
                        *o = portable::dot_q8k(*ty, wr, a.row(i));
                    }
                }
            }
            RowDot::Q8 { ty, .. } => panic!("{ty} takes 32-value activations"),
        }
    }
}

/// `w · x` for one 32-value-format row against one row of activations, with `isa`'s
/// kernel when it has one.
pub fn dot_q8(isa: Isa, ty: GgmlType, w: &[u8], a: &Q8Acts) -> f32 {
    let mut out = [0.0];
    RowDot::new(isa, ty).q8_block(w, w.len(), a, &mut out);
    out[0]
}

/// `w · x` for one k-quant row against one row of activations, with `isa`'s kernel when
/// it has one.
pub fn dot_q8k(isa: Isa, ty: GgmlType, w: &[u8], a: &Q8KActs) -> f32 {
    let mut out = [0.0];
    RowDot::new(isa, ty).q8k_block(w, w.len(), a, &mut out);
    out[0]
}

/// Dequantize a whole row of `ty` into `out` (its length is the row's value count).
pub fn dequantize_row(ty: GgmlType, w: &[u8], out: &mut [f32]) {
    let (per_block, bytes) = ty.block_layout().expect("readable");
    let step = if per_block == 1 { QK_K } else { per_block };
    for (blk, o) in w.chunks(step / per_block * bytes).zip(out.chunks_mut(step)) {
        ty.dequantize(blk, o);
    }
}

/// f32 dot product with `isa`'s kernel.
pub fn dot_f32(isa: Isa, x: &[f32], y: &[f32]) -> f32 {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512Vnni => x86::dot_f32(x, y),
        _ => x.iter().zip(y).map(|(a, b)| a * b).sum(),
    }
}

#[cfg(test)]
pub(crate) mod tests;
