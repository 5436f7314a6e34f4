//! Products of interleaved weight groups ([`crate::pack`]) with 32-value quantized
//! activations: eight outputs per pass over the weights.
//!
//! Every kernel does the same f32 operations in the same order, so that all of them —
//! the portable reference here and the SIMD ones — give the same bits: per block, the
//! integer dot product (exact), then `acc = fma(sum, d_w * d_a, acc)` and, for Q4_1,
//! `acc = fma(m_w, s_a, acc)`. An activation row's result therefore depends neither on the
//! rows batched with it nor on the instruction set.

use crate::act::{Q8Acts, Q8KActs, Q8KRow, Q8Row};
use crate::cpu::Isa;
use crate::format::{GgmlType, QK, QK_K};
use crate::pack::{BlockShape, GROUP};

#[cfg(target_arch = "x86_64")]
use super::x86_packed;

#[inline]
fn f16_at(b: &[u8], i: usize) -> f32 {
    half::f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// The eight products of one packed group (`group`: every block column of eight rows)
/// with one activation row: the reference every packed kernel is tested against.
///
/// # Panics
/// If `ty` has no packed layout or the sizes disagree.
pub fn dot_group(ty: GgmlType, group: &[u8], a: Q8Row<'_>) -> [f32; GROUP] {
    let shape = BlockShape::of(ty).expect("a packed format");
    let head = GROUP * 2 * shape.fields;
    let mut acc = [0f32; GROUP];
    for (b, blk) in group.chunks_exact(GROUP * shape.bytes()).enumerate() {
        let qa = &a.q[b * QK..(b + 1) * QK];
        for (r, acc) in acc.iter_mut().enumerate() {
            // byte j of row r's quants
            let byte = |j: usize| blk[head + (j / 4) * 4 * GROUP + 4 * r + j % 4];
            let mut sum = 0i32;
            match ty {
                GgmlType::Q8_0 => {
                    for (j, &a) in qa.iter().enumerate() {
                        sum += i32::from(byte(j) as i8) * i32::from(a);
                    }
                }
                GgmlType::Q5_0 => {
                    // levels 0..32: a nibble and its fifth bit, offset 16
                    let qh = u32::from_le_bytes(std::array::from_fn(byte));
                    let bit = |j: usize| (((qh >> j) & 1) << 4) as u8;
                    for j in 0..QK / 2 {
                        let q = byte(4 + j);
                        sum += i32::from((q & 0x0F) | bit(j)) * i32::from(qa[j])
                            + i32::from((q >> 4) | bit(j + QK / 2)) * i32::from(qa[j + QK / 2]);
                    }
                    sum -= 16 * a.sum[b];
                }
                _ => {
                    for j in 0..QK / 2 {
                        let q = byte(j);
                        sum += i32::from(q & 0x0F) * i32::from(qa[j])
                            + i32::from(q >> 4) * i32::from(qa[j + QK / 2]);
                    }
                }
            }
            if ty == GgmlType::Q4_0 {
                sum -= 8 * a.sum[b];
            }
            *acc = (sum as f32).mul_add(f16_at(blk, 2 * r) * a.d[b], *acc);
            if ty == GgmlType::Q4_1 {
                *acc = f16_at(blk, 2 * (GROUP + r)).mul_add(a.s[b], *acc);
            }
        }
    }
    acc
}

/// The eight products of one packed Q4_K group with one row of 256-value activations: the
/// reference. Per block and row: `acc = fma(Σ scale·(q·a), d·d_a, acc)`, then
/// `acc = fma(Σ min·Σa, -(dmin·d_a), acc)`, the integer sums exact.
///
/// # Panics
/// If the sizes disagree.
pub fn dot_group_q4k(group: &[u8], a: Q8KRow<'_>) -> [f32; GROUP] {
    let shape = BlockShape::of(GgmlType::Q4_K).expect("packed Q4_K");
    let head = GROUP * 2 * shape.fields;
    let mut acc = [0f32; GROUP];
    for (b, blk) in group.chunks_exact(GROUP * shape.bytes()).enumerate() {
        let qa = &a.q[b * QK_K..(b + 1) * QK_K];
        let bs = &a.bsums[16 * b..16 * b + 16];
        for (r, acc) in acc.iter_mut().enumerate() {
            // byte j of row r's scales-and-nibbles
            let byte = |j: usize| blk[head + (j / 4) * 4 * GROUP + 4 * r + j % 4];
            let scales: [u8; 12] = std::array::from_fn(byte);
            let (mut isum, mut msum) = (0i32, 0i32);
            for s in 0..8 {
                let (sc, mn) = super::portable::scale_min(s, &scales);
                let (c, shift) = (s / 2, 4 * (s % 2));
                let sub: i32 = (0..32)
                    .map(|l| {
                        i32::from((byte(12 + 32 * c + l) >> shift) & 0x0F)
                            * i32::from(qa[32 * s + l])
                    })
                    .sum();
                isum += i32::from(sc) * sub;
                msum += i32::from(mn) * (bs[2 * s] + bs[2 * s + 1]);
            }
            let (d, dmin) = (f16_at(blk, 2 * r), f16_at(blk, 2 * (GROUP + r)));
            *acc = (isum as f32).mul_add(d * a.d[b], *acc);
            *acc = (msum as f32).mul_add(-(dmin * a.d[b]), *acc);
        }
    }
    acc
}

/// The product of packed weight groups with activation rows, chosen once per product:
/// `isa`'s SIMD kernel for the format, or the portable one.
#[derive(Debug, Clone, Copy)]
pub struct PackedDot {
    ty: GgmlType,
    #[cfg(target_arch = "x86_64")]
    simd: Option<x86_packed::Kernel>,
}

impl PackedDot {
    /// The kernel for packed `ty` with `isa`.
    ///
    /// # Panics
    /// If `ty` has no packed layout.
    pub fn new(isa: Isa, ty: GgmlType) -> Self {
        assert!(BlockShape::of(ty).is_some(), "{ty} has no packed layout");
        let _ = isa;
        PackedDot {
            ty,
            #[cfg(target_arch = "x86_64")]
            simd: x86_packed::Kernel::new(isa, ty),
        }
    }

    /// `out[r * m + i] = w_r · a_i` for the rows `w_r` of the packed groups in `w` and the
    /// `m` rows of `a`.
    ///
    /// # Panics
    /// If `w` is not whole groups as wide as `a`, or `out` is not one value per pair.
    pub fn block(&self, w: &[u8], a: &Q8Acts, out: &mut [f32]) {
        assert_ne!(self.ty, GgmlType::Q4_K, "Q4_K takes 256-value activations");
        let shape = BlockShape::of(self.ty).expect("a packed format");
        let group_bytes = GROUP * shape.bytes() * (a.cols / QK);
        assert!(a.cols.is_multiple_of(QK) && a.cols > 0);
        assert!(w.len().is_multiple_of(group_bytes), "whole groups");
        assert_eq!(out.len(), w.len() / group_bytes * GROUP * a.rows);
        #[cfg(target_arch = "x86_64")]
        if let Some(k) = &self.simd {
            return k.block(w, group_bytes, a, out);
        }
        let m = a.rows;
        for (group, o) in w
            .chunks_exact(group_bytes)
            .zip(out.chunks_exact_mut(GROUP * m))
        {
            for i in 0..m {
                for (r, v) in dot_group(self.ty, group, a.row(i)).into_iter().enumerate() {
                    o[r * m + i] = v;
                }
            }
        }
    }

    /// As [`PackedDot::block`], for a k-quant against 256-value activations.
    ///
    /// # Panics
    /// If this is not a k-quant kernel or the sizes disagree.
    pub fn block_q8k(&self, w: &[u8], a: &Q8KActs, out: &mut [f32]) {
        assert_eq!(self.ty, GgmlType::Q4_K, "256-value activations meet Q4_K");
        let shape = BlockShape::of(self.ty).expect("a packed format");
        let group_bytes = GROUP * shape.bytes() * (a.cols / QK_K);
        assert!(a.cols.is_multiple_of(QK_K) && a.cols > 0);
        assert!(w.len().is_multiple_of(group_bytes), "whole groups");
        assert_eq!(out.len(), w.len() / group_bytes * GROUP * a.rows);
        #[cfg(target_arch = "x86_64")]
        if let Some(k) = &self.simd {
            return k.block_q8k(w, group_bytes, a, out);
        }
        let m = a.rows;
        for (group, o) in w
            .chunks_exact(group_bytes)
            .zip(out.chunks_exact_mut(GROUP * m))
        {
            for i in 0..m {
                for (r, v) in dot_group_q4k(group, a.row(i)).into_iter().enumerate() {
                    o[r * m + i] = v;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::act::Q8KActs;
    use crate::dot::portable;
    use crate::dot::tests::{random_rows, Rng};
    use crate::pack::{pack_in_place, GROUP};

    /// The packed reference against the row kernel's reference (different order of f32
    /// additions: close, not equal), and every packed SIMD kernel against the packed
    /// reference (the same operations: equal to the bit), for one and for many rows.
    #[test]
    fn packed_kernels_equal_the_reference() {
        let (rows, cols) = (24, 512);
        let mut rng = Rng::new(21);
        for ty in [
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q5_0,
            GgmlType::Q8_0,
        ] {
            let plain = random_rows(ty, rows, cols, &mut rng);
            let mut packed = plain.clone();
            pack_in_place(ty, rows, &mut packed);
            let row_bytes = plain.len() / rows;
            // 13 rows: eight, four and one at a time
            for m in [1, 3, 4, 9, 13] {
                let x: Vec<f32> = (0..m * cols).map(|_| rng.f32()).collect();
                let a = Q8Acts::quantize(&x, m, cols);
                let mut want = vec![0.0; rows * m];
                PackedDot::new(Isa::Portable, ty).block(&packed, &a, &mut want);
                for r in 0..rows {
                    for i in 0..m {
                        let row = &plain[r * row_bytes..(r + 1) * row_bytes];
                        let rowwise = portable::dot_q8(ty, row, a.row(i));
                        let got = want[r * m + i];
                        assert!(
                            (got - rowwise).abs() <= 1e-4 * rowwise.abs().max(1.0),
                            "{ty} m={m} [{r}, {i}]: {got} vs {rowwise}"
                        );
                    }
                }
                for isa in Isa::available() {
                    let mut got = vec![0.0; rows * m];
                    PackedDot::new(isa, ty).block(&packed, &a, &mut got);
                    let same = got
                        .iter()
                        .zip(&want)
                        .all(|(g, w)| g.to_bits() == w.to_bits());
                    assert!(
                        same,
                        "{ty} {isa} m={m}: {:?} vs {:?}",
                        &got[..4],
                        &want[..4]
                    );
                }
            }
        }
    }

    /// Q4_K: the packed reference against the row kernel's, and every packed kernel against
    /// the packed reference, to the bit; a batched row gets the bits it gets alone.
    #[test]
    fn packed_q4_k_kernels_equal_the_reference() {
        let (rows, cols) = (3 * GROUP, 512);
        let ty = GgmlType::Q4_K;
        let mut rng = Rng::new(33);
        let plain = random_rows(ty, rows, cols, &mut rng);
        let mut packed = plain.clone();
        pack_in_place(ty, rows, &mut packed);
        let row_bytes = plain.len() / rows;
        for m in [1, 5, 13] {
            let x: Vec<f32> = (0..m * cols).map(|_| rng.f32()).collect();
            let a = Q8KActs::quantize(&x, m, cols);
            let mut want = vec![0.0; rows * m];
            PackedDot::new(Isa::Portable, ty).block_q8k(&packed, &a, &mut want);
            for r in 0..rows {
                for i in 0..m {
                    let row = &plain[r * row_bytes..(r + 1) * row_bytes];
                    let rowwise = portable::dot_q8k(ty, row, a.row(i));
                    let got = want[r * m + i];
                    assert!(
                        (got - rowwise).abs() <= 1e-4 * rowwise.abs().max(1.0),
                        "m={m} [{r}, {i}]: {got} vs {rowwise}"
                    );
                }
            }
            for isa in Isa::available() {
                let mut got = vec![0.0; rows * m];
                PackedDot::new(isa, ty).block_q8k(&packed, &a, &mut got);
                let same = got
                    .iter()
                    .zip(&want)
                    .all(|(g, w)| g.to_bits() == w.to_bits());
                assert!(same, "{isa} m={m}: {:?} vs {:?}", &got[..4], &want[..4]);
                for i in 0..m {
                    let alone = Q8KActs::quantize(&x[i * cols..(i + 1) * cols], 1, cols);
                    let mut one = vec![0.0; rows];
                    PackedDot::new(isa, ty).block_q8k(&packed, &alone, &mut one);
                    for r in 0..rows {
                        assert_eq!(one[r].to_bits(), got[r * m + i].to_bits(), "{isa} row {i}");
                    }
                }
            }
        }
    }

    #[test]
    fn a_row_batched_with_others_gets_the_bits_it_gets_alone() {
        // a pair of groups and an odd one (the 512-bit kernels take two at once)
        let (rows, cols, m) = (3 * GROUP, 256, 13);
        let mut rng = Rng::new(5);
        let x: Vec<f32> = (0..m * cols).map(|_| rng.f32()).collect();
        for ty in [
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q5_0,
            GgmlType::Q8_0,
        ] {
            let mut w = random_rows(ty, rows, cols, &mut rng);
            pack_in_place(ty, rows, &mut w);
            for isa in Isa::available() {
                let k = PackedDot::new(isa, ty);
                let mut batch = vec![0.0; rows * m];
                k.block(&w, &Q8Acts::quantize(&x, m, cols), &mut batch);
                for i in 0..m {
                    let mut alone = vec![0.0; rows];
                    let a = Q8Acts::quantize(&x[i * cols..(i + 1) * cols], 1, cols);
                    k.block(&w, &a, &mut alone);
                    for r in 0..rows {
                        assert_eq!(batch[r * m + i].to_bits(), alone[r].to_bits(), "{ty} {isa}");
                    }
                }
            }
        }
    }
}
