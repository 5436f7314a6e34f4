//! Dequantization of real blocks from real GGUF files, bit for bit against the `gguf`
//! Python package (data made once by `tools/reference/make_quant_data.py`).

use veil_kernels::GgmlType;

fn from_hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

#[test]
fn every_type_dequantizes_bit_exactly_like_gguf_py() {
    let data: serde_json::Value =
        serde_json::from_str(include_str!("data/gguf_py_blocks.json")).expect("JSON");
    let cases = data["cases"].as_object().expect("cases");
    let mut checked = Vec::new();
    for t in GgmlType::READABLE {
        if matches!(t, GgmlType::F32 | GgmlType::Q8_K) {
            continue; // no blocks to speak of; Q8_K only ever holds activations
        }
        let case = cases
            .get(&t.name())
            .unwrap_or_else(|| panic!("no reference blocks for {t}"));
        let blocks = from_hex(case["blocks_hex"].as_str().expect("blocks"));
        let want: Vec<f32> = from_hex(case["values_f32_le_hex"].as_str().expect("values"))
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        assert_eq!(t.byte_size(want.len()), Some(blocks.len()), "{t}");
        let mut got = vec![0.0f32; want.len()];
        t.dequantize(&blocks, &mut got);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(
                g.to_bits(),
                w.to_bits(),
                "{t} value {i}: {g} vs gguf-py {w} ({})",
                case["source"]
            );
        }
        checked.push(t.name());
    }
    eprintln!("bit-exact with gguf-py {}: {checked:?}", data["gguf_py"]);
}
