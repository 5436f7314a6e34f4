//! Every kernel against the definition, on words of every bit pattern.

use super::*;
use crate::dot::tests::Rng;

fn random_matrix(rows: usize, cols: usize, bits: u32, rng: &mut Rng) -> RingMatrix {
    let q = (1i64 << (bits - 1)) - 1;
    let v: Vec<i64> = (0..rows * cols)
        .map(|_| (rng.next() % (2 * q as u64 + 1)) as i64 - q)
        .collect();
    let w = if bits <= 8 {
        Ints::I8(v.into_iter().map(|v| v as i8).collect())
    } else {
        Ints::I16(v.into_iter().map(|v| v as i16).collect())
    };
    RingMatrix::from_parts(rows, cols, w, vec![1.0; rows]).expect("sizes match")
}

#[test]
fn every_kernel_gives_the_reference_bits() {
    let mut rng = Rng::new(7);
    for bits in [8, 12, 16] {
        for &(rows, cols) in &[
            (1, 1),
            (3, 15),
            (17, 16),
            (9, 33),
            (40, 100),
            (64, 576),
            (33, 1536),
        ] {
            let m = random_matrix(rows, cols, bits, &mut rng);
            for n in [1, 2, 3, 4, 5, 9] {
                let u: Vec<u32> = (0..n * cols).map(|_| rng.next() as u32).collect();
                let mut want = vec![0; n * rows];
                portable::mul_rows(&m, &u, n, &mut want);
                for isa in Isa::available() {
                    let mut got = vec![1; n * rows];
                    m.mul_with(isa, &u, n, &mut got);
                    assert_eq!(got, want, "{isa}, {bits} bits, {rows}x{cols}, {n} words");
                }
            }
        }
    }
}

#[test]
fn extreme_words_and_weights_stay_exact() {
    // every weight at its extremes against words at the edges of both halves
    let cols = 256;
    let mut rng = Rng::new(3);
    let edges = [
        0u32,
        1,
        0x7fff,
        0x8000,
        0xffff,
        0x1_0000,
        0x7fff_ffff,
        0x8000_0000,
        u32::MAX,
    ];
    let u: Vec<u32> = (0..3 * cols)
        .map(|_| edges[(rng.next() % edges.len() as u64) as usize])
        .collect();
    let i8s = Ints::I8(
        (0..2 * cols)
            .map(|j| if j % 3 == 0 { -127 } else { 127 })
            .collect(),
    );
    let i16s = Ints::I16(
        (0..2 * cols)
            .map(|j| if j % 3 == 0 { -32767 } else { 32767 })
            .collect(),
    );
    for w in [i8s, i16s] {
        let m = RingMatrix::from_parts(2, cols, w, vec![1.0; 2]).expect("sizes match");
        let mut want = vec![0; 3 * 2];
        portable::mul_rows(&m, &u, 3, &mut want);
        for isa in Isa::available() {
            let mut got = vec![0; 3 * 2];
            m.mul_with(isa, &u, 3, &mut got);
            assert_eq!(got, want, "{isa}, {} bits", m.stored_bits());
        }
    }
}

#[test]
fn unmasking_recovers_the_integer_product() {
    // W (x + r) - W r = W x in the ring, and lifts to the signed product while |x| stays
    // within the activation bound
    let mut rng = Rng::new(11);
    let (rows, cols, n) = (48, 320, 3);
    for bits in [8, 12] {
        let m = random_matrix(rows, cols, bits, &mut rng);
        let bound = m.activation_bound();
        assert!(bound > 50, "bound {bound}");
        // the worst case: every x at the bound with the sign of the weights of one row
        let mut x: Vec<i32> = (0..n * cols)
            .map(|_| (rng.next() % (2 * bound as u64 + 1)) as i32 - bound)
            .collect();
        let row0 = m.row(0).to_i32();
        for (v, w) in x[..cols].iter_mut().zip(&row0) {
            *v = if *w < 0 { -bound } else { bound };
        }
        let r: Vec<u32> = (0..n * cols).map(|_| rng.next() as u32).collect();
        let masked: Vec<u32> = x
            .iter()
            .zip(&r)
            .map(|(&x, &r)| (x as u32).wrapping_add(r))
            .collect();
        let (mut a, mut b) = (vec![0; n * rows], vec![0; n * rows]);
        m.mul(&masked, n, &mut a);
        m.mul(&r, n, &mut b);
        for t in 0..n {
            for i in 0..rows {
                let exact: i64 = m
                    .row(i)
                    .to_i32()
                    .iter()
                    .zip(&x[t * cols..(t + 1) * cols])
                    .map(|(&w, &x)| i64::from(w) * i64::from(x))
                    .sum();
                assert!(exact.abs() < 1 << 31);
                let got = a[t * rows + i].wrapping_sub(b[t * rows + i]) as i32;
                assert_eq!(i64::from(got), exact, "{bits} bits, word {t}, row {i}");
            }
        }
    }
}

#[test]
fn rounding_is_to_the_nearest_even() {
    for (v, want) in [
        (0.5f32, 0.0f32),
        (1.5, 2.0),
        (-2.5, -2.0),
        (2.4999, 2.0),
        (-0.6, -1.0),
        (32766.5, 32766.0),
        (-32767.0, -32767.0),
    ] {
        assert_eq!(round_even(v), want, "{v}");
    }
}

#[test]
fn quantize_rounds_each_row_to_its_own_scale() {
    let data = [0.5f32, -1.0, 0.25, 0.0, 0.0, 0.0, 2.0, 1.0, -0.01];
    let m = RingMatrix::quantize(3, 3, &data, 8).expect("finite");
    assert_eq!(m.stored_bits(), 8);
    assert_eq!(m.scales()[0], 1.0 / 127.0);
    assert_eq!(m.row(0).to_i32(), [64, -127, 32]);
    assert_eq!(m.row(1).to_i32(), [0, 0, 0]);
    assert_eq!(m.scales()[1], 0.0);
    assert_eq!(m.row(2).to_i32(), [127, 64, -1]);
    let wide = RingMatrix::quantize(3, 3, &data, 12).expect("finite");
    assert_eq!(wide.stored_bits(), 16);
    assert_eq!(wide.row(0).to_i32(), [1024, -2047, 512]);
    assert!(matches!(
        RingMatrix::quantize(1, 2, &[1.0, f32::NAN], 8),
        Err(RingError::NotFinite { row: 0 })
    ));
    assert!(matches!(
        RingMatrix::quantize(2, 2, &[1.0], 8),
        Err(RingError::Size { .. })
    ));
    assert!(matches!(
        RingMatrix::quantize(1, 1, &[1.0], 17),
        Err(RingError::Bits { bits: 17 })
    ));
    let stacked = RingMatrix::stack(&[m.clone(), wide]).expect("same width");
    assert_eq!(stacked.rows(), 6);
    assert_eq!(stacked.stored_bits(), 16);
    assert_eq!(stacked.row(2).to_i32(), [127, 64, -1]);
    assert_eq!(stacked.row(5).to_i32(), [2047, 1024, -10]);
}

#[test]
fn the_widest_weights_that_leave_the_activations_their_bits() {
    let mut rng = Rng::new(5);
    for cols in [64, 576, 1536, 8192] {
        let data: Vec<f32> = (0..16 * cols).map(|_| rng.f32()).collect();
        for act_bits in [8, 12, 16] {
            let m = RingMatrix::quantize_within(16, cols, &data, act_bits)
                .expect("finite")
                .expect("wide enough");
            assert!(m.activation_bound() >= (1 << (act_bits - 1)) - 1);
            // one bit more would not leave them
            let bits = 32 - (m.max_abs() * 2 + 1).leading_zeros();
            if bits < 16 {
                let wider = RingMatrix::quantize(16, cols, &data, bits + 1).expect("finite");
                assert!(
                    wider.activation_bound() < (1 << (act_bits - 1)) - 1,
                    "{cols} columns, {act_bits}-bit activations: {bits}-bit weights"
                );
            }
        }
    }
}
