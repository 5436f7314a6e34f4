//! Model files that are wrong in meaning (not just in bytes): clear errors that name the
//! problem.

use veil_model::gguf::{GgufFile, GgufWriter, MetaValue};
use veil_model::{ModelBundle, ModelError};

/// The tiny model's GGUF, with metadata `edit`ed and tensors optionally replaced.
fn tiny_with(
    edit: impl Fn(&str, &MetaValue) -> Option<MetaValue>,
    retype: Option<&str>,
) -> Vec<u8> {
    let bytes = veil_model::tiny::tiny_gguf(1).expect("tiny");
    let f = GgufFile::from_bytes(bytes).expect("parse");
    let mut w = GgufWriter::new();
    for (k, v) in f.metadata() {
        if let Some(v) = edit(k, v) {
            w.meta(k, v);
        }
    }
    for t in f.tensors() {
        let (dims, data) = f.tensor_f32(&t.name).expect("tensor");
        if Some(t.name.as_str()) == retype {
            // an IQ4_NL tensor (not read by Veil): 18 bytes per 32 elements
            let n: usize = dims.iter().product();
            w.tensor_raw(&t.name, &dims, 20, vec![0; n / 32 * 18]);
        } else {
            w.tensor_f32(&t.name, &dims, &data);
        }
    }
    w.to_bytes()
}

fn load(bytes: Vec<u8>) -> Result<ModelBundle, ModelError> {
    ModelBundle::from_gguf(&GgufFile::from_bytes(bytes)?, "test")
}

#[test]
fn unchanged_copy_loads() {
    assert!(load(tiny_with(|_, v| Some(v.clone()), None)).is_ok());
}

#[test]
fn unsupported_architecture_is_named() {
    let bytes = tiny_with(
        |k, v| {
            Some(if k == "general.architecture" {
                MetaValue::String("mamba".into())
            } else {
                v.clone()
            })
        },
        None,
    );
    let e = load(bytes).expect_err("must fail").to_string();
    assert!(e.contains("unsupported architecture `mamba`"), "{e}");
}

#[test]
fn missing_metadata_key_is_named() {
    let bytes = tiny_with(
        |k, v| (k != "llama.feed_forward_length").then(|| v.clone()),
        None,
    );
    let e = load(bytes).expect_err("must fail").to_string();
    assert!(e.contains("llama.feed_forward_length"), "{e}");
}

#[test]
fn unsupported_tensor_type_is_named() {
    let bytes = tiny_with(|_, v| Some(v.clone()), Some("blk.2.ffn_up.weight"));
    let e = load(bytes).expect_err("must fail").to_string();
    assert!(
        e.contains("blk.2.ffn_up.weight") && e.contains("IQ4_NL"),
        "{e}"
    );
}

#[test]
fn unsupported_tokenizer_is_named() {
    let with_model = |name: &str| {
        tiny_with(
            |k, v| {
                Some(if k == "tokenizer.ggml.model" {
                    MetaValue::String(name.into())
                } else {
                    v.clone()
                })
            },
            None,
        )
    };
    let e = load(with_model("bert")).expect_err("must fail").to_string();
    assert!(
        e.contains("tokenizer model `bert`") && e.contains("SentencePiece"),
        "{e}"
    );
    // SentencePiece without its scores (the tiny model's BPE vocabulary has none)
    let e = load(with_model("llama"))
        .expect_err("must fail")
        .to_string();
    assert!(e.contains("one score per token"), "{e}");
}

#[test]
fn inconsistent_heads_are_rejected() {
    let bytes = tiny_with(
        |k, v| {
            Some(if k == "llama.attention.head_count_kv" {
                MetaValue::U32(3)
            } else {
                v.clone()
            })
        },
        None,
    );
    let e = load(bytes).expect_err("must fail").to_string();
    assert!(e.contains("4 query heads cannot share 3"), "{e}");
}
