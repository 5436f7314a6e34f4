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

/// Exactly representable values of mixed magnitude, one block of them tiny.
fn quant_input() -> Vec<f32> {
    let mut x: Vec<f32> = (0..256)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 16.0 * (1 + i % 5) as f32)
        .collect();
    for v in &mut x[40..72] {
        *v *= 0.001;
    }
    x
}

/// `gguf.quants.quantize` (gguf-py 0.19.0) on [`quant_input`].
const GGUF_PY_Q8_0: &str = "672fe5f227aaf812e00b5fca09cdf03a9c0028d4167ff716b9f151ee0341cc231bf16b2d3387f118d20d7fb2000000000000000000000000000000000000000000000000162f0000000000000000ec3892ff28cf127ff514b2ec4fec0140c51f1bee249fef11ee2eda075fbe08c6e9378dfe27cc107ff414afe94eeb0040c21d1bec239aec11d905c62e5fb9083be73687fe27c90e7ff413abe64deaff40be1b1beb2296e811d7045cb69d2e073be53581fd27c60c7ff312a7e34ce8fe40ba181be92191e511d4025cb1073ac62ee43281fc25c60979f211a7e147e8fc3cb9151ae81e91e210d40057b00638e22f162f84fc22c60771f20f55e041e9fb38ba1118e81b94e10fd5fe51b10534e22b81fb";
const GGUF_PY_Q4_0: &str = "58bf5ab9760d9977ca97329b874bb9646e9860bd858f89868b87808d888888888888888808bf9878d89838988848c9646f9866eb9770e0beda98329c874cc9656f9866eb9770a987b8be329c8844ca656f9866fb9770b9872dda903e88cc46aba078aa14699f5789e2368dc7b83e469ba078aa14699f5789e2368cb768bc083fa078aa14689f5789dd368cb768bc0489";

#[test]
fn q8_0_and_q4_0_quantize_like_gguf_py() {
    let x = quant_input();
    for (ty, want) in [
        (GgmlType::Q8_0, GGUF_PY_Q8_0),
        (GgmlType::Q4_0, GGUF_PY_Q4_0),
    ] {
        let mut got = Vec::new();
        ty.quantize(&x, &mut got).expect("quantize");
        assert_eq!(hex_string(&got), want, "{ty}");
    }
}

fn hex_string(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn every_writable_type_round_trips_within_its_step() {
    let x = quant_input();
    for ty in GgmlType::WRITABLE {
        let mut bytes = Vec::new();
        ty.quantize(&x, &mut bytes).expect("quantize");
        assert_eq!(Some(bytes.len()), ty.byte_size(x.len()), "{ty}");
        let back = deq(ty, &bytes, x.len());
        // the error is at most half a step of the block's grid (plus f16 rounding of the
        // scales); the grid's step is range / levels
        let (block, levels) = match ty {
            GgmlType::F32 => (1, f32::INFINITY),
            GgmlType::F16 => (1, 2048.0),
            GgmlType::Q8_0 => (32, 254.0),
            // the side opposite the largest value stops one step short: a whole step
            GgmlType::Q4_0 => (32, 8.0),
            _ => (32, 15.0),
        };
        for (i, (a, b)) in x.iter().zip(&back).enumerate() {
            let g = &x[i / block * block..(i / block + 1) * block];
            let range = g.iter().fold(0.0f32, |m, v| m.max(v.abs())) * 2.0;
            let tol = if ty == GgmlType::Q4_K {
                // the 6-bit group scales and minimums add up to one step of the super-block
                let sb = &x[i / 256 * 256..(i / 256 + 1) * 256];
                let srange = sb.iter().fold(0.0f32, |m, v| m.max(v.abs())) * 2.0;
                range / levels + srange / 15.0 / 63.0 * 16.0
            } else {
                range / levels * 0.5 * 1.01 + range * 1e-3
            };
            assert!(
                (a - b).abs() <= tol,
                "{ty} [{i}]: {a} became {b} (tolerance {tol})"
            );
        }
    }
    let err = GgmlType::Q6_K
        .quantize(&x, &mut Vec::new())
        .expect_err("Q6_K");
    assert!(err.to_string().contains("Q6_K"), "{err}");
    let err = GgmlType::Q4_K
        .quantize(&x[..32], &mut Vec::new())
        .expect_err("partial");
    assert!(err.to_string().contains("256"), "{err}");
}
