use super::*;

fn sample() -> Vec<u8> {
    let mut w = GgufWriter::new();
    w.meta("general.architecture", MetaValue::String("llama".into()))
        .meta("llama.block_count", MetaValue::U32(2))
        .meta("llama.rope.freq_base", MetaValue::F32(10000.0))
        .meta(
            "tokenizer.ggml.tokens",
            MetaValue::Array(vec![
                MetaValue::String("a".into()),
                MetaValue::String("b".into()),
            ]),
        )
        .tensor_raw("iq4", &[32], 20, vec![0u8; 18])
        .tensor_raw("q5", &[32], 6, vec![0u8; 22])
        .tensor_f32("w", &[3, 2], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    w.to_bytes()
}

#[test]
fn round_trip_metadata_and_tensors() {
    let f = GgufFile::from_bytes(sample()).expect("parse");
    assert_eq!(f.version, 3);
    assert_eq!(f.get_str("general.architecture").expect("arch"), "llama");
    assert_eq!(f.get_usize("llama.block_count").expect("blocks"), 2);
    assert_eq!(f.get_f32("llama.rope.freq_base").expect("base"), 10000.0);
    assert_eq!(
        f.get_str_array("tokenizer.ggml.tokens").expect("tokens"),
        ["a", "b"]
    );
    let (dims, data) = f.tensor_f32("w").expect("tensor");
    assert_eq!(dims, [3, 2]);
    assert_eq!(data, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
}

#[test]
fn missing_key_and_wrong_type_are_named() {
    let f = GgufFile::from_bytes(sample()).expect("parse");
    let e = f
        .get_usize("llama.embedding_length")
        .expect_err("must fail")
        .to_string();
    assert!(e.contains("llama.embedding_length"), "{e}");
    let e = f
        .get_str("llama.block_count")
        .expect_err("must fail")
        .to_string();
    assert!(
        e.contains("llama.block_count") && e.contains("uint32"),
        "{e}"
    );
}

#[test]
fn unsupported_tensor_type_names_tensor_and_type() {
    let f = GgufFile::from_bytes(sample()).expect("parse");
    let e = f.tensor_f32("iq4").expect_err("must fail").to_string();
    assert!(e.contains("`iq4`") && e.contains("IQ4_NL"), "{e}");
    // Q5_0 is read now: 22 zero bytes are 32 zeros
    let (_, q5) = f.tensor_f32("q5").expect("Q5_0");
    assert_eq!(q5, vec![0.0; 32]);
    let e = f.tensor_f32("nope").expect_err("must fail").to_string();
    assert!(e.contains("`nope`"), "{e}");
    let e = f
        .tensor_f32_shaped("w", &[2, 3])
        .expect_err("must fail")
        .to_string();
    assert!(e.contains("[2, 3]") && e.contains("[3, 2]"), "{e}");
}

#[test]
fn a_tensor_that_is_not_whole_blocks_names_tensor_type_and_block() {
    let mut w = GgufWriter::new();
    w.meta("general.architecture", MetaValue::String("llama".into()))
        .tensor_raw("k", &[128], 12, vec![0u8; 144]);
    let e = GgufFile::from_bytes(w.to_bytes())
        .expect_err("must fail")
        .to_string();
    assert!(
        e.contains("`k`") && e.contains("128") && e.contains("Q4_K") && e.contains("256"),
        "{e}"
    );
}

#[test]
fn every_truncation_is_an_error_not_a_panic() {
    let bytes = sample();
    let tensor_end = bytes.len();
    for cut in 0..tensor_end {
        let result = GgufFile::from_bytes(bytes[..cut].to_vec());
        assert!(
            result.is_err(),
            "file cut at {cut} of {tensor_end} bytes parsed"
        );
    }
}

#[test]
fn corrupt_bytes_never_panic() {
    let bytes = sample();
    // Flip each byte of the header region in turn: parsing may succeed or fail, never panic.
    for i in 0..bytes.len().min(400) {
        let mut b = bytes.clone();
        b[i] ^= 0xA5;
        if let Ok(f) = GgufFile::from_bytes(b) {
            for t in f.tensors().to_vec() {
                let _ = f.tensor_f32(&t.name);
            }
        }
    }
}

#[test]
fn bad_magic_and_version() {
    let mut b = sample();
    b[0] = b'X';
    assert!(matches!(
        GgufFile::from_bytes(b),
        Err(GgufError::BadMagic { .. })
    ));
    let mut b = sample();
    b[4] = 9;
    assert!(matches!(
        GgufFile::from_bytes(b),
        Err(GgufError::UnsupportedVersion(9))
    ));
}

#[test]
fn a_streamed_file_equals_the_in_memory_one_in_any_pieces() {
    let meta = vec![
        (
            "general.architecture".to_string(),
            MetaValue::String("llama".into()),
        ),
        ("llama.block_count".to_string(), MetaValue::U32(2)),
    ];
    let tensors: Vec<(&str, Vec<usize>, Vec<u8>)> = vec![
        ("a", vec![32], (0..22u8).collect()),
        ("b", vec![3, 2], (0..24u8).collect()),
    ];
    let mut w = GgufWriter::new();
    for (k, v) in &meta {
        w.meta(k, v.clone());
    }
    w.tensor_raw("a", &[32], 6, tensors[0].2.clone())
        .tensor_raw("b", &[3, 2], 0, tensors[1].2.clone());
    let whole = w.to_bytes();
    let specs = |t: &[(&str, Vec<usize>, Vec<u8>)]| -> Vec<TensorSpec> {
        t.iter()
            .zip([6u32, 0])
            .map(|((n, d, b), ty)| TensorSpec {
                name: n.to_string(),
                dims: d.clone(),
                ggml_type: ty,
                n_bytes: b.len(),
            })
            .collect()
    };
    let mut s = GgufStream::start(Vec::new(), &meta, specs(&tensors)).expect("start");
    // pieces that end inside a tensor and at a tensor's end
    let data: Vec<u8> = tensors.iter().flat_map(|t| t.2.clone()).collect();
    for piece in [&data[..5], &data[5..22], &data[22..30], &data[30..]] {
        s.write(piece).expect("write");
    }
    let (bytes, len) = s.finish().expect("finish");
    assert_eq!(len as usize, bytes.len());
    // the stream pads after its last tensor too
    assert_eq!(&bytes[..whole.len()], &whole[..]);
    assert!(bytes[whole.len()..].iter().all(|&b| b == 0));
    let f = GgufFile::from_bytes(bytes).expect("parse");
    assert_eq!(f.tensor_f32("b").expect("b").0, vec![3, 2]);

    // too many bytes, or too few, are errors
    let mut s = GgufStream::start(Vec::new(), &meta, specs(&tensors)).expect("start");
    assert!(s.write(&[0u8; 23]).is_err());
    s.write(&[0u8; 22]).expect("a");
    let err = s.finish().expect_err("b missing");
    assert!(err.to_string().contains("tensor b"), "{err}");
}

/// A file read into owned memory interleaves its quantized matrices in place; what the
/// accessors return is the file's content all the same.
#[test]
fn quantized_matrices_read_the_same_interleaved_or_not() {
    let (cols, rows) = (64, 16);
    let values: Vec<f32> = (0..rows * cols)
        .map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0)
        .collect();
    let mut blocks = Vec::new();
    veil_kernels::format::quantize_q8_0(&values, &mut blocks);
    let mut w = GgufWriter::new();
    w.meta("general.architecture", MetaValue::String("llama".into()))
        .tensor_raw("m", &[cols, rows], 8, blocks.clone());
    let bytes = w.to_bytes();
    let owned = GgufFile::from_bytes(bytes.clone()).expect("parse");
    let shared = GgufFile::from_shared(veil_kernels::Bytes::from_vec(bytes)).expect("parse");
    let (a, b) = (
        owned.tensor_matrix("m", cols, rows).expect("matrix"),
        shared.tensor_matrix("m", cols, rows).expect("matrix"),
    );
    assert!(a.is_packed() && !b.is_packed());
    assert_eq!(
        a.bytes(),
        blocks.as_slice(),
        "the file's blocks, row by row"
    );
    assert_eq!(b.bytes(), blocks.as_slice());
    assert_eq!(
        owned.tensor_f32("m").expect("f32"),
        shared.tensor_f32("m").expect("f32")
    );
    let x: Vec<f32> = (0..cols).map(|i| i as f32 / 64.0).collect();
    let (mut ya, mut yb) = (vec![0.0; rows], vec![0.0; rows]);
    a.matmul(&x, 1, &mut ya, veil_kernels::Precision::Exact);
    b.matmul(&x, 1, &mut yb, veil_kernels::Precision::Exact);
    assert_eq!(ya, yb, "exact products do not depend on the layout");
}
