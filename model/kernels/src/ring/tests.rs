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

/// Blocked integers: `q` uniform over a byte, multipliers uniform in `1..=m_max`.
fn random_blocked(rows: usize, cols: usize, m_max: u64, rng: &mut Rng) -> RingMatrix {
    let q = (0..rows * cols)
        .map(|_| ((rng.next() % 255) as i16 - 127) as i8)
        .collect();
    let m = (0..rows * cols / RING_BLOCK)
        .map(|_| (1 + rng.next() % m_max) as u8)
        .collect();
    RingMatrix::from_parts(rows, cols, Ints::Blocked { q, m }, vec![1.0; rows]).expect("sizes")
}

#[test]
fn every_kernel_gives_the_reference_bits_on_blocked_weights() {
    let mut rng = Rng::new(17);
    for &(rows, cols) in &[(1, 32), (3, 64), (17, 96), (64, 576), (33, 1536)] {
        for m_max in [1, 17, 255] {
            let m = random_blocked(rows, cols, m_max, &mut rng);
            assert_eq!(m.byte_len(), rows * cols + rows * cols / 32 + 4 * rows);
            for n in [1, 2, 3, 4, 5, 9] {
                let u: Vec<u32> = (0..n * cols).map(|_| rng.next() as u32).collect();
                let mut want = vec![0; n * rows];
                portable::mul_rows(&m, &u, n, &mut want);
                // the reference on the same integers stored as i16
                let wide = RingMatrix::from_parts(
                    rows,
                    cols,
                    Ints::I16((0..rows).flat_map(|i| m.row(i).to_i16()).collect()),
                    vec![1.0; rows],
                )
                .expect("sizes");
                let mut same = vec![0; n * rows];
                portable::mul_rows(&wide, &u, n, &mut same);
                assert_eq!(same, want, "{rows}x{cols}, {n} words");
                for isa in Isa::available() {
                    let mut got = vec![1; n * rows];
                    m.mul_with(isa, &u, n, &mut got);
                    assert_eq!(
                        got, want,
                        "{isa}, m up to {m_max}, {rows}x{cols}, {n} words"
                    );
                }
            }
        }
    }
    // blocks must tile the rows
    assert!(matches!(
        RingMatrix::from_parts(
            1,
            48,
            Ints::Blocked {
                q: vec![0; 48],
                m: vec![1; 1]
            },
            vec![1.0]
        ),
        Err(RingError::Size { .. })
    ));
}

#[test]
fn blocked_rounding_keeps_the_rows_grid_where_a_byte_holds_it() {
    let mut rng = Rng::new(23);
    let (rows, cols) = (8, 256);
    let mut data: Vec<f32> = (0..rows * cols).map(|_| rng.f32()).collect();
    // one block of each row small enough for the row's own grid
    for r in 0..rows {
        for v in &mut data[r * cols + 64..r * cols + 96] {
            *v *= 0.01;
        }
    }
    for bits in [9, 12, 15] {
        let b = RingMatrix::quantize_blocked(rows, cols, &data, bits).expect("finite");
        let plain = RingMatrix::quantize(rows, cols, &data, bits).expect("finite");
        assert_eq!(b.scales(), plain.scales());
        // a byte and a 32nd per weight instead of two
        assert!(b.byte_len() * 100 <= plain.byte_len() * 53, "{bits} bits");
        let Ints::Blocked { q, m } = b.ints() else {
            panic!("not blocked")
        };
        for i in 0..rows {
            let (got, want) = (b.row(i).to_i32(), plain.row(i).to_i32());
            for k in 0..cols / RING_BLOCK {
                let mult = i32::from(m[i * cols / RING_BLOCK + k]);
                let block = k * RING_BLOCK..(k + 1) * RING_BLOCK;
                let big = want[block.clone()]
                    .iter()
                    .map(|v| v.abs())
                    .max()
                    .expect("32");
                // the smallest multiplier that fits the block in a byte
                assert_eq!(
                    mult,
                    ((big + 126) / 127).max(1),
                    "{bits} bits row {i} block {k}"
                );
                assert!(q[i * cols + block.start..i * cols + block.end]
                    .iter()
                    .all(|v| v.unsigned_abs() <= 127));
                for j in block {
                    // within half a step of the row's integers (plus theirs)
                    assert!(
                        2 * (got[j] - want[j]).abs() <= mult + 1,
                        "{bits} bits [{i}, {j}]"
                    );
                }
                if big <= 127 {
                    assert_eq!(&got[k * 32..k * 32 + 32], &want[k * 32..k * 32 + 32]);
                }
            }
        }
    }
    assert!(matches!(
        RingMatrix::quantize_blocked(1, 48, &[0.5; 48], 12),
        Err(RingError::Bits { bits: 12 })
    ));
    assert!(matches!(
        RingMatrix::quantize_blocked(1, 32, &[0.5; 32], 16),
        Err(RingError::Bits { bits: 16 })
    ));
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
    let blocked = Ints::Blocked {
        q: (0..2 * cols)
            .map(|j| if j % 3 == 0 { -127 } else { 127 })
            .collect(),
        m: vec![255; 2 * cols / RING_BLOCK],
    };
    for w in [i8s, i16s, blocked] {
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
    let mut rng = Rng::new(2);
    let (a, b) = (
        random_blocked(2, 64, 9, &mut rng),
        random_blocked(3, 64, 9, &mut rng),
    );
    let both = RingMatrix::stack(&[a.clone(), b.clone()]).expect("same width");
    assert!(matches!(both.ints(), Ints::Blocked { .. }));
    assert_eq!(both.row(3).to_i32(), b.row(1).to_i32());
    let mixed =
        RingMatrix::stack(&[a.clone(), random_matrix(1, 64, 8, &mut rng)]).expect("same width");
    assert!(matches!(mixed.ints(), Ints::I16(_)));
    assert_eq!(mixed.row(1).to_i32(), a.row(1).to_i32());
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
            let m = RingMatrix::quantize_within(16, cols, &data, act_bits, false)
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
