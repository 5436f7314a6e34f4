//! Hand-built blocks whose values follow from ggml's layouts; the comparison with the
//! `gguf` Python package on real tensors is in `tests/gguf_py.rs`.

use super::*;

fn h(x: f32) -> [u8; 2] {
    half::f16::from_f32(x).to_le_bytes()
}

fn deq(t: GgmlType, bytes: &[u8], n: usize) -> Vec<f32> {
    let mut out = vec![0.0; n];
    t.dequantize(bytes, &mut out);
    out
}

#[test]
fn q8_0_block_is_scale_times_signed_byte() {
    let mut block = h(0.5).to_vec();
    block.extend((0..32).map(|i| (i as i8 - 16) as u8));
    for (i, x) in deq(GgmlType::Q8_0, &block, 32).iter().enumerate() {
        assert_eq!(*x, (i as f32 - 16.0) * 0.5);
    }
}

#[test]
fn q4_0_low_nibbles_first_then_high_nibbles() {
    let mut block = h(2.0).to_vec();
    block.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    let out = deq(GgmlType::Q4_0, &block, 32);
    for j in 0..16 {
        assert_eq!(out[j], (j as f32 - 8.0) * 2.0);
        assert_eq!(out[j + 16], ((15 - j) as f32 - 8.0) * 2.0);
    }
}

#[test]
fn q4_1_adds_the_block_minimum() {
    let mut block = h(0.25).to_vec();
    block.extend(h(-1.0));
    block.extend((0..16u8).map(|j| j | (3 << 4)));
    let out = deq(GgmlType::Q4_1, &block, 32);
    for j in 0..16 {
        assert_eq!(out[j], j as f32 * 0.25 - 1.0);
        assert_eq!(out[j + 16], 3.0 * 0.25 - 1.0);
    }
}

#[test]
fn q5_0_and_q5_1_take_the_fifth_bit_from_qh() {
    // every value 31 - j for j < 16 (fifth bit set) and j - 16 for j >= 16
    let qh: u32 = 0x0000_FFFF;
    let nibbles: Vec<u8> = (0..16u8).map(|j| (15 - j) | (j << 4)).collect();
    let mut b0 = h(1.0).to_vec();
    b0.extend(qh.to_le_bytes());
    b0.extend(&nibbles);
    let out = deq(GgmlType::Q5_0, &b0, 32);
    for j in 0..16 {
        assert_eq!(out[j], (31 - j) as f32 - 16.0);
        assert_eq!(out[j + 16], j as f32 - 16.0);
    }
    let mut b1 = h(1.0).to_vec();
    b1.extend(h(0.5));
    b1.extend(qh.to_le_bytes());
    b1.extend(&nibbles);
    let out = deq(GgmlType::Q5_1, &b1, 32);
    for j in 0..16 {
        assert_eq!(out[j], (31 - j) as f32 + 0.5);
        assert_eq!(out[j + 16], j as f32 + 0.5);
    }
}

#[test]
fn q4_k_groups_use_their_own_scale_and_minimum() {
    // scales 1..=8 and minimums 0..8 (all below 64: the simple packing of groups 0-3 and
    // the split one of groups 4-7)
    let (sc, mn): ([u8; 8], [u8; 8]) = ([1, 2, 3, 4, 5, 6, 7, 8], [0, 1, 2, 3, 4, 5, 6, 7]);
    let mut packed = [0u8; 12];
    packed[..4].copy_from_slice(&sc[..4]);
    packed[4..8].copy_from_slice(&mn[..4]);
    for j in 4..8 {
        packed[j + 4] = (sc[j] & 0x0F) | ((mn[j] & 0x0F) << 4);
        packed[j - 4] |= (sc[j] >> 4) << 6;
        packed[j] |= (mn[j] >> 4) << 6;
    }
    let mut block = h(1.0).to_vec();
    block.extend(h(0.25));
    block.extend(packed);
    // chunk c: low nibble 3 (group 2c), high nibble 5 (group 2c + 1)
    block.extend(std::iter::repeat_n(3u8 | (5 << 4), 128));
    let out = deq(GgmlType::Q4_K, &block, 256);
    for (g, group) in out.chunks(32).enumerate() {
        let q = if g % 2 == 0 { 3.0 } else { 5.0 };
        let want = f32::from(sc[g]) * q - 0.25 * f32::from(mn[g]);
        assert!(group.iter().all(|&x| x == want), "group {g}: {group:?}");
    }
}

#[test]
fn q6_k_values_are_centred_on_32() {
    let mut block = vec![0u8; q6_k::BLOCK_BYTES];
    // all low nibbles 0, all high bits 2: q = 32 -> x = 0; scale 3 everywhere
    for b in &mut block[128..192] {
        *b = 0b1010_1010;
    }
    for b in &mut block[192..208] {
        *b = 3;
    }
    block[208..210].copy_from_slice(&h(2.0));
    assert!(deq(GgmlType::Q6_K, &block, 256).iter().all(|&x| x == 0.0));
    // the first value alone: low nibble 5 -> q = 37 -> x = 2 * 3 * 5
    block[0] = 5;
    let out = deq(GgmlType::Q6_K, &block, 256);
    assert_eq!(out[0], 30.0);
    assert!(out[1..].iter().all(|&x| x == 0.0));
}

#[test]
fn bf16_is_the_top_half_of_an_f32() {
    let x = -1.75f32;
    let top = ((x.to_bits() >> 16) as u16).to_le_bytes();
    assert_eq!(deq(GgmlType::BF16, &top, 1), vec![x]);
}

#[test]
fn q8_0_quantization_round_trips_within_half_a_step() {
    let x: Vec<f32> = (0..64)
        .map(|i| ((i * 37) % 23) as f32 / 7.0 - 1.5)
        .collect();
    let mut bytes = Vec::new();
    quantize_q8_0(&x, &mut bytes);
    assert_eq!(bytes.len(), GgmlType::Q8_0.byte_size(64).expect("size"));
    let y = deq(GgmlType::Q8_0, &bytes, 64);
    for (block_x, block_y) in x.chunks(32).zip(y.chunks(32)) {
        let step = block_x.iter().fold(0.0f32, |m, v| m.max(v.abs())) / 127.0;
        for (a, b) in block_x.iter().zip(block_y) {
            assert!((a - b).abs() <= 0.5 * step * 1.01 + 1e-6, "{a} vs {b}");
        }
    }
}

#[test]
fn sizes_ids_and_names() {
    assert_eq!(GgmlType::Q4_1.byte_size(64), Some(40));
    assert_eq!(GgmlType::Q8_0.byte_size(33), None);
    assert_eq!(GgmlType::Q4_K.byte_size(256), Some(144));
    assert_eq!(GgmlType::Q6_K.byte_size(512), Some(420));
    assert_eq!(GgmlType::Q2_K.byte_size(256), Some(84));
    assert_eq!(GgmlType::Q3_K.byte_size(256), Some(110));
    assert_eq!(GgmlType::Q5_K.byte_size(256), Some(176));
    assert_eq!(GgmlType::Q8_K.byte_size(256), Some(292));
    for t in GgmlType::READABLE {
        assert_eq!(GgmlType::from_id(t.id()), t);
    }
    assert_eq!(GgmlType::from_id(20).name(), "IQ4_NL");
    assert_eq!(GgmlType::from_id(20).byte_size(32), None);
    assert_eq!(GgmlType::from_id(99).name(), "type id 99");
}
