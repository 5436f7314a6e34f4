//! Encrypted inference end to end on the tiny model: same logits as plaintext on both
//! backends, shard files, and clear errors for shards that do not belong.

mod common;

use common::{devices, max_abs_diff};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use veil_model::crypto::{
    client_path, encrypt_model, shard_path, ClientBundle, Encrypted, EncryptedLocal, KeyOptions,
    KeyShape, ModelKey,
};
use veil_model::{generate, GenerateParams, LocalModel, Matrix, ModelBundle, SamplingParams};

fn encrypted(seed: u64, stages: usize) -> (ModelBundle, Encrypted) {
    let b = ModelBundle::tiny().expect("tiny");
    let key = ModelKey::generate(
        KeyShape::of(&b.weights.config),
        KeyOptions::default(),
        &mut ChaCha20Rng::seed_from_u64(seed),
    );
    let e = encrypt_model(&b, key, stages, &mut |_, _| {}).expect("encrypt");
    (b, e)
}

#[test]
fn encrypted_logits_equal_plaintext_logits_on_every_backend() {
    let (b, e) = encrypted(1, 3);
    let ids = b
        .text
        .prompt_tokens("what is encrypted inference?", false)
        .expect("prompt");
    assert_same_logits_as_plaintext(&b, &e, &ids);
}

/// On every backend: the encrypted pipeline's logits for `ids` (one prefill) and for one
/// more greedy step equal the plaintext model's to 1e-3.
fn assert_same_logits_as_plaintext(b: &ModelBundle, e: &Encrypted, ids: &[u32]) {
    for (kind, device) in devices() {
        let plain = LocalModel::new(&b.weights, &device, None)
            .feed_all(ids)
            .expect("plain");
        let mut enc = EncryptedLocal::new(&e.client, &e.shards, &device, None).expect("pipeline");
        let got = enc.feed_all(ids).expect("encrypted");
        let worst = got
            .iter()
            .zip(&plain)
            .map(|(a, b)| max_abs_diff(a, b))
            .fold(0.0, f32::max);
        assert!(worst < 1e-3, "{kind}: max |Δlogit| {worst}");
        // and step by step through the KV caches
        let next = veil_model::sampling::argmax(&got[got.len() - 1]);
        let step = veil_model::TokenModel::feed(&mut enc, &[next]).expect("step");
        let mut p = LocalModel::new(&b.weights, &device, None);
        p.feed_all(ids).expect("plain");
        let expected = veil_model::TokenModel::feed(&mut p, &[next]).expect("step");
        assert!(max_abs_diff(&step, &expected) < 1e-3, "{kind}: decode step");
    }
}

#[test]
fn greedy_generation_is_identical() {
    let (b, e) = encrypted(2, 2);
    let device = veil_model::Compute::cpu().device;
    let params = GenerateParams {
        max_tokens: 24,
        sampling: SamplingParams::default(),
        top_logits: 0,
    };
    let prompt = b
        .text
        .prompt_tokens("tell me a story", false)
        .expect("prompt");
    let mut plain = LocalModel::new(&b.weights, &device, None);
    let mut enc = EncryptedLocal::new(&e.client, &e.shards, &device, None).expect("pipeline");
    let tok = &b.text.tokenizer;
    let a = generate(&mut plain, tok, &prompt, &params, &mut |_| {}).expect("plain");
    let c = generate(&mut enc, tok, &prompt, &params, &mut |_| {}).expect("encrypted");
    assert_eq!(a.tokens, c.tokens);
}

/// True when some column of `a` equals some column of `b` (up to 1e-4 relative).
fn shares_a_column(a: &Matrix, b: &Matrix) -> bool {
    let col = |m: &Matrix, j: usize| (0..m.rows).map(|r| m.get(r, j)).collect::<Vec<f32>>();
    (0..a.cols).any(|i| {
        let x = col(a, i);
        let norm = x.iter().map(|v| v.abs()).fold(1e-6, f32::max);
        (0..b.cols).any(|j| max_abs_diff(&x, &col(b, j)) < 1e-4 * norm)
    })
}

#[test]
fn no_shard_tensor_equals_its_plaintext_counterpart() {
    let (b, e) = encrypted(3, 2);
    for shard in &e.shards {
        for (l, enc) in shard
            .meta
            .layer_range()
            .zip(shard.layers.f32().expect("f32"))
        {
            let plain = &b.weights.layers[l];
            assert!(
                enc.attn_norm.is_empty() && enc.ffn_norm.is_empty(),
                "norm gains are folded"
            );
            let pairs = [
                ("attn_q", &enc.wq, &plain.wq),
                ("attn_k", &enc.wk, &plain.wk),
                ("attn_v", &enc.wv, &plain.wv),
                ("attn_output", &enc.wo, &plain.wo),
                ("ffn_gate", &enc.w_gate, &plain.w_gate),
                ("ffn_up", &enc.w_up, &plain.w_up),
                ("ffn_down", &enc.w_down, &plain.w_down),
            ];
            for (name, a, p) in pairs {
                assert_eq!(a.shape(), p.shape());
                let rel = a.max_abs_diff(p) / p.data.iter().map(|v| v.abs()).fold(0.0, f32::max);
                assert!(rel > 0.1, "blk.{l}.{name} is close to plaintext ({rel})");
                assert!(
                    !shares_a_column(a, p),
                    "blk.{l}.{name} keeps a plaintext column"
                );
                let (at, pt) = (a.transpose(), p.transpose());
                assert!(
                    !shares_a_column(&at, &pt),
                    "blk.{l}.{name} keeps a plaintext row"
                );
            }
        }
    }
}

#[test]
fn files_round_trip_with_private_client_bundle() {
    let (b, e) = encrypted(4, 3);
    let dir = tempfile::tempdir().expect("tempdir");
    e.write(dir.path()).expect("write");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(client_path(dir.path()))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "client.veil must be private");
    }
    let back = Encrypted::read(dir.path()).expect("read");
    assert_eq!(back.client.key.fingerprint(), e.client.key.fingerprint());
    assert_eq!(back.shards.len(), 3);
    let device = veil_model::Compute::cpu().device;
    let ids = b.text.prompt_tokens("files", false).expect("prompt");
    let a = EncryptedLocal::new(&e.client, &e.shards, &device, None)
        .expect("p")
        .feed_all(&ids)
        .expect("f");
    let c = EncryptedLocal::new(&back.client, &back.shards, &device, None)
        .expect("p")
        .feed_all(&ids)
        .expect("f");
    assert_eq!(a, c, "the files hold exactly what was encrypted");
    // no plaintext tensor names in the shard files
    for s in 0..3 {
        let bytes = std::fs::read(shard_path(dir.path(), s)).expect("read");
        let head = String::from_utf8_lossy(&bytes[..bytes.len().min(4096)]);
        for forbidden in ["norm", "\"token_embd\"", "\"output\""] {
            assert!(!head.contains(forbidden), "shard {s} mentions {forbidden}");
        }
    }
}

#[test]
fn shards_that_do_not_belong_are_refused() {
    let (_, e) = encrypted(5, 3);
    let (_, other) = encrypted(6, 3);
    let device = veil_model::Compute::cpu().device;
    // another key
    let mut mixed = e.shards.clone();
    mixed[1] = other.shards[1].clone();
    let err = EncryptedLocal::new(&e.client, &mixed, &device, None)
        .expect_err("must fail")
        .to_string();
    assert!(err.contains("encrypted with key"), "{err}");
    // missing layers
    let err = EncryptedLocal::new(&e.client, &e.shards[..2], &device, None)
        .expect_err("must fail")
        .to_string();
    assert!(err.contains("not covered"), "{err}");
    // another model configuration
    let mut wrong = e.shards.clone();
    wrong[0].meta.config.rope_theta = 500_000.0;
    let err = EncryptedLocal::new(&e.client, &wrong, &device, None)
        .expect_err("must fail")
        .to_string();
    assert!(err.contains("another model configuration"), "{err}");

    let dir = tempfile::tempdir().expect("tempdir");
    e.write(dir.path()).expect("write");
    // a corrupted shard file
    let p = shard_path(dir.path(), 2);
    let mut bytes = std::fs::read(&p).expect("read");
    let n = bytes.len();
    bytes[n - 100] ^= 0x40;
    std::fs::write(&p, &bytes).expect("write");
    let err = Encrypted::read(dir.path())
        .expect_err("must fail")
        .to_string();
    assert!(
        err.contains("corrupted") && err.contains("shard-2.veil"),
        "{err}"
    );
    // a shard file from another deployment (same stage, another key)
    other.shards[2].write(&p).expect("write");
    let err = Encrypted::read(dir.path())
        .expect_err("must fail")
        .to_string();
    assert!(err.contains("encrypted with key"), "{err}");
    // a missing shard file
    std::fs::remove_file(&p).expect("rm");
    let err = Encrypted::read(dir.path())
        .expect_err("must fail")
        .to_string();
    assert!(err.contains("missing"), "{err}");
    // a truncated client bundle
    let cp = client_path(dir.path());
    let bytes = std::fs::read(&cp).expect("read");
    std::fs::write(&cp, &bytes[..bytes.len() / 2]).expect("write");
    assert!(ClientBundle::read(&cp).is_err());
}

#[test]
fn keys_are_reproducible_from_a_seed_and_differ_otherwise() {
    let shape = KeyShape::of(&ModelBundle::tiny().expect("tiny").weights.config);
    let k = |s| {
        ModelKey::generate(
            shape,
            KeyOptions::default(),
            &mut ChaCha20Rng::seed_from_u64(s),
        )
    };
    assert_eq!(k(1).fingerprint(), k(1).fingerprint());
    assert_ne!(k(1).fingerprint(), k(2).fingerprint());
    let key = k(3);
    let qtq = key.q.transpose() * &key.q;
    assert!(
        (qtq - nalgebra::DMatrix::identity(shape.d_model, shape.d_model))
            .abs()
            .max()
            < 1e-12
    );
    assert!(
        !format!("{key:?}").contains("0."),
        "Debug must not print key material"
    );
    for lk in &key.layers {
        for hk in &lk.heads {
            let c = veil_model::crypto::linalg::condition_number(&hk.c());
            assert!(c <= 4.0 + 1e-9, "C is well conditioned (<= 4): {c}");
            assert!(hk.rope_scale.iter().all(|s| (0.5..=2.0).contains(s)));
        }
        assert!(lk.mlp_scale.iter().any(|s| *s < 0.0) && lk.mlp_scale.iter().any(|s| *s > 0.0));
    }
}

#[test]
fn client_layers_run_on_the_client_and_change_nothing_in_the_output() {
    let b = ModelBundle::tiny().expect("tiny");
    let key = ModelKey::generate(
        KeyShape::of(&b.weights.config),
        KeyOptions::default(),
        &mut ChaCha20Rng::seed_from_u64(4),
    );
    let e =
        veil_model::crypto::encrypt_model_split(&b, key, 2, 1, &mut |_, _| {}).expect("encrypt");
    assert_eq!(e.client.meta.client_layers, 1);
    assert_eq!(e.client.local_layers.len(), 1);
    let ranges: Vec<(usize, usize)> = e.shards.iter().map(|s| s.meta.layers).collect();
    assert_eq!(
        ranges,
        vec![(1, 3), (3, 4)],
        "the shards cover the other layers"
    );
    // the bundle round-trips through its file, local layers included
    let dir = tempfile::tempdir().expect("tempdir");
    e.write(dir.path()).expect("write");
    let back = Encrypted::read(dir.path()).expect("read");
    assert_eq!(back.client.local_layers.len(), 1);
    assert_eq!(back.client.local_layers[0].wq, b.weights.layers[0].wq);
    let ids = b
        .text
        .prompt_tokens("client layers", false)
        .expect("prompt");
    assert_same_logits_as_plaintext(&b, &back, &ids);
    // a bundle with local layers refuses shards that cover them
    let (_, full) = encrypted(4, 2);
    let device = veil_model::Compute::cpu().device;
    assert!(EncryptedLocal::new(&back.client, &full.shards, &device, None).is_err());
    // and the client cannot keep every layer
    let key = ModelKey::generate(
        KeyShape::of(&b.weights.config),
        KeyOptions::default(),
        &mut ChaCha20Rng::seed_from_u64(4),
    );
    let err = veil_model::crypto::encrypt_model_split(&b, key, 1, 4, &mut |_, _| {})
        .expect_err("must fail");
    assert!(err.to_string().contains("at least one"), "{err}");
}

#[test]
fn client_first_and_last_layers_change_nothing_in_the_output() {
    use veil_model::crypto::{encrypt_model_quant, ClientLayers, ClientModel, ShardQuant};
    let b = ModelBundle::tiny().expect("tiny");
    let key = || {
        ModelKey::generate(
            KeyShape::of(&b.weights.config),
            KeyOptions::default(),
            &mut ChaCha20Rng::seed_from_u64(8),
        )
    };
    let split = ClientLayers { first: 1, last: 1 };
    let e = veil_model::crypto::encrypt_model_split(&b, key(), 2, split, &mut |_, _| {})
        .expect("encrypt");
    assert_eq!(e.client.meta.client_last_layers, 1);
    let ranges: Vec<(usize, usize)> = e.shards.iter().map(|s| s.meta.layers).collect();
    assert_eq!(
        ranges,
        vec![(1, 2), (2, 3)],
        "the nodes serve the middle layers"
    );
    // the bundle round-trips, last layers included, and the pipeline is exact
    let dir = tempfile::tempdir().expect("tempdir");
    e.write(dir.path()).expect("write");
    let back = Encrypted::read(dir.path()).expect("read");
    assert_eq!(back.client.tail_layers.len(), 1);
    assert_eq!(
        back.client.tail_layers[0].w_down,
        b.weights.layers[3].w_down
    );
    for prompt in ["client layers at both ends", "x"] {
        let ids = b.text.prompt_tokens(prompt, false).expect("prompt");
        assert_same_logits_as_plaintext(&b, &back, &ids);
    }
    // greedy generation token by token (the last layers' cache grows one row at a time)
    let device = veil_model::Compute::cpu().device;
    let ids = b.text.prompt_tokens("step by step", false).expect("prompt");
    let params = GenerateParams {
        max_tokens: 8,
        sampling: SamplingParams::default(),
        top_logits: 0,
    };
    let mut plain = LocalModel::new(&b.weights, &device, None);
    let want = generate(&mut plain, &b.text.tokenizer, &ids, &params, &mut |_| {}).expect("plain");
    let mut enc = EncryptedLocal::new(&back.client, &back.shards, &device, None).expect("pipeline");
    let got = generate(&mut enc, &b.text.tokenizer, &ids, &params, &mut |_| {}).expect("encrypted");
    assert_eq!(got.tokens, want.tokens);
    // shards that cover the client's last layer are refused
    let (_, full) = encrypted(8, 2);
    assert!(EncryptedLocal::new(&back.client, &full.shards, &device, None).is_err());
    // quantized: the client holds its last layer in 8-bit blocks too
    let q8 =
        encrypt_model_quant(&b, key(), 2, split, ShardQuant::Q8_0, &mut |_, _| {}).expect("q8");
    let c = ClientModel::new(&q8.client, &device).expect("client");
    assert_eq!((c.client_layers(), c.client_last_layers()), (1, 1));
    // and the client cannot keep every layer
    let err = veil_model::crypto::encrypt_model_split(
        &b,
        key(),
        1,
        ClientLayers { first: 2, last: 2 },
        &mut |_, _| {},
    )
    .expect_err("must fail");
    assert!(err.to_string().contains("at least one"), "{err}");
}

/// Logits of the pipeline of `client` and `shards` against `plain`'s, per precision.
fn quantized_errors(
    client: &ClientBundle,
    shards: &[veil_model::crypto::Shard],
    ids: &[u32],
    plain: &[Vec<f32>],
) -> Vec<f32> {
    use veil_model::{Compute, Precision, TokenModel};
    let device = Compute::cpu().device;
    [Precision::Exact, Precision::Fast]
        .into_iter()
        .map(|precision| {
            let mut enc = EncryptedLocal::with_precision(client, shards, &device, None, precision)
                .expect("pipeline");
            let got = enc.feed_all(ids).expect("encrypted");
            let step = enc.feed(&[3]).expect("decode step");
            assert_eq!(step.len(), client.meta.config.vocab_size);
            got.iter()
                .zip(plain)
                .map(|(a, b)| max_abs_diff(a, b))
                .fold(0.0, f32::max)
        })
        .collect()
}

#[test]
fn quantized_shards_are_smaller_round_trip_and_stay_close_to_plaintext() {
    use veil_model::crypto::{encrypt_model_quant, ShardLayers, ShardQuant};
    use veil_model::Compute;
    let (b, e) = encrypted(4, 2);
    let ids = b
        .text
        .prompt_tokens("quantized shards", false)
        .expect("prompt");
    let plain = LocalModel::new(&b.weights, &Compute::cpu().device, None)
        .feed_all(&ids)
        .expect("plain");
    let scale = plain.iter().flatten().fold(0.0f32, |m, v| m.max(v.abs()));
    let dir32 = tempfile::tempdir().expect("tmp");
    e.write(dir32.path()).expect("write");
    let f32_bytes = std::fs::metadata(shard_path(dir32.path(), 0))
        .expect("size")
        .len() as f64;
    // The tiny random model amplifies rounding (quantizing its plaintext weights to q8_0,
    // no key, moves its logits by 6% of their range): the bounds here catch broken
    // storage, not quality, which the SmolLM2 test measures.
    for (quant, ratio, tol) in [(ShardQuant::Q8_0, 0.27, 0.15), (ShardQuant::Q4_0, 0.2, 0.8)] {
        let shards: Vec<_> = e
            .shards
            .iter()
            .map(|s| s.requantized(quant).expect("requantize"))
            .collect();
        // encrypting straight to the format gives the same bytes
        let key = ModelKey::generate(
            KeyShape::of(&b.weights.config),
            KeyOptions::default(),
            &mut ChaCha20Rng::seed_from_u64(4),
        );
        let direct = encrypt_model_quant(&b, key, 2, 0, quant, &mut |_, _| {}).expect("encrypt");
        for (a, d) in shards.iter().zip(&direct.shards) {
            assert_eq!(
                a.to_writer().expect("w").data_sha256(),
                d.to_writer().expect("w").data_sha256(),
                "{quant}"
            );
        }
        // written and read back: verified against the client bundle, still quantized
        let dir = tempfile::tempdir().expect("tmp");
        direct.write(dir.path()).expect("write");
        let back = Encrypted::read(dir.path()).expect("read");
        let ShardLayers::Quant(layers) = &back.shards[0].layers else {
            panic!("{quant}: read back in f32");
        };
        // 4-bit shards keep the matrices whose inputs the key scales in Q8_0
        let ty = quant.ggml().expect("quantized");
        let wide = if quant == ShardQuant::Q8_0 {
            ty
        } else {
            veil_model::gguf::GgmlType::Q8_0
        };
        for l in layers {
            assert_eq!(l.wq.ggml_type(), ty);
            assert_eq!(l.w_gate.ggml_type(), ty);
            assert_eq!(l.wo.ggml_type(), wide, "{quant}");
            assert_eq!(l.w_down.ggml_type(), wide, "{quant}");
        }
        assert_eq!(back.shards[0].meta.dtype, quant.to_string());
        // the client's tables are quantized with the shards (f32 ones for f32 shards)
        assert_eq!(back.client.meta.shard_dtype, quant.to_string());
        let device = Compute::cpu().device;
        let qc = veil_model::crypto::ClientModel::new(&back.client, &device).expect("client");
        let fc = veil_model::crypto::ClientModel::new(&e.client, &device).expect("client");
        assert!(
            qc.table_bytes() * 3 < fc.table_bytes(),
            "{} against {}",
            qc.table_bytes(),
            fc.table_bytes()
        );
        let q = std::fs::metadata(shard_path(dir.path(), 0))
            .expect("size")
            .len() as f64;
        assert!(
            q / f32_bytes < ratio,
            "{quant}: {q} bytes against {f32_bytes} in f32"
        );
        // both precisions stay close to the plaintext model's logits
        let errors = quantized_errors(&back.client, &back.shards, &ids, &plain);
        eprintln!(
            "{quant}: max |Δlogit| exact {:.4}, fast {:.4} (logits up to {scale:.2})",
            errors[0], errors[1]
        );
        for err in errors {
            assert!(err < tol * scale, "{quant}: max |Δlogit| {err}");
        }
    }
    // the tiny model's rows of 64 are not whole Q4_K blocks: the error names the tensor
    let err = e.shards[0]
        .requantized(ShardQuant::Q4_K)
        .expect_err("partial blocks");
    assert!(err.to_string().contains("blk.0.attn_q"), "{err}");
    assert!(err.to_string().contains("256"), "{err}");
    // a format this build does not know is refused when the shard is read
    let mut odd = e.shards[0].clone();
    odd.meta.dtype = "q3_xs".into();
    let bytes = odd.to_writer().expect("w").to_bytes().expect("bytes");
    let c = veil_model::container::Container::from_bytes(&bytes).expect("container");
    let err = veil_model::crypto::Shard::from_container(&c).expect_err("unknown format");
    assert!(err.to_string().contains("q3_xs"), "{err}");
}

/// With quantized shards the client's own layers are 8-bit blocks too (a quarter of f32's
/// bytes) and the pipeline stays as close to the plaintext model as without them.
#[test]
fn quantized_deployments_quantize_the_client_layers_too() {
    use veil_model::crypto::{encrypt_model_quant, ClientModel, ShardQuant};
    use veil_model::Compute;
    let b = ModelBundle::tiny().expect("tiny");
    let key = || {
        ModelKey::generate(
            KeyShape::of(&b.weights.config),
            KeyOptions::default(),
            &mut ChaCha20Rng::seed_from_u64(6),
        )
    };
    let device = Compute::cpu().device;
    let layer_bytes = |e: &Encrypted| {
        let c = ClientModel::new(&e.client, &device).expect("client");
        assert_eq!(c.client_layers(), 2);
        c.weight_bytes() - c.table_bytes()
    };
    let q8 = encrypt_model_quant(&b, key(), 2, 2, ShardQuant::Q8_0, &mut |_, _| {}).expect("q8");
    let f32 = encrypt_model_quant(&b, key(), 2, 2, ShardQuant::F32, &mut |_, _| {}).expect("f32");
    let (q, f) = (layer_bytes(&q8), layer_bytes(&f32));
    assert!(3 * q < f, "client layers: {q} bytes in q8_0, {f} in f32");
    let ids = b
        .text
        .prompt_tokens("client layers", false)
        .expect("prompt");
    let plain = LocalModel::new(&b.weights, &device, None)
        .feed_all(&ids)
        .expect("plain");
    let scale = plain.iter().flatten().fold(0.0f32, |m, v| m.max(v.abs()));
    // the bound of the q8_0 shards without client layers (quantized_shards_... above)
    for err in quantized_errors(&q8.client, &q8.shards, &ids, &plain) {
        assert!(
            err < 0.15 * scale,
            "max |Δlogit| {err} (logits up to {scale})"
        );
    }
    // f32 deployments keep their client layers exact
    assert_same_logits_as_plaintext(&b, &f32, &ids);
}

#[test]
fn bundles_from_before_quantized_shards_mean_f32_shards() {
    let (_, e) = encrypted(4, 1);
    assert_eq!(e.client.meta.shard_dtype, "f32");
    let mut v = serde_json::to_value(&e.client.meta).expect("json");
    v.as_object_mut().expect("object").remove("shard_dtype");
    let meta: veil_model::crypto::ClientMeta = serde_json::from_value(v).expect("old meta");
    assert_eq!(meta.shard_dtype, "f32");
}

#[test]
fn calibrated_4_bit_shards_follow_the_plaintext_model_more_closely() {
    use veil_model::calibrate::{Calibration, DEFAULT_TEXT};
    use veil_model::crypto::{encrypt_model_quant, encrypt_model_with, ShardQuant};
    use veil_model::Compute;
    let b = ModelBundle::tiny().expect("tiny");
    let calibration = Calibration::from_text(&b.text, DEFAULT_TEXT, 96, 768).expect("calibration");
    assert_eq!(calibration.sequences.len(), 8);
    assert!(calibration.sequences.iter().all(|s| s.len() == 96));
    // scored on other text than the calibration's
    let ids = b
        .text
        .prompt_tokens(
            "Rivers carve valleys over thousands of years; the water carries sand and stones \
             downstream and leaves them where the current slows.",
            false,
        )
        .expect("prompt");
    let device = Compute::cpu().device;
    let plain = LocalModel::new(&b.weights, &device, None)
        .feed_all(&ids)
        .expect("plain");
    let mean_error = |e: &Encrypted| -> f64 {
        let mut enc = EncryptedLocal::new(&e.client, &e.shards, &device, None).expect("pipeline");
        let got = enc.feed_all(&ids).expect("encrypted");
        let (mut sum, mut n) = (0.0f64, 0usize);
        for (a, p) in got.iter().zip(&plain) {
            for (x, y) in a.iter().zip(p) {
                sum += f64::from((x - y).abs());
                n += 1;
            }
        }
        sum / n as f64
    };
    let key = |seed| {
        ModelKey::generate(
            KeyShape::of(&b.weights.config),
            KeyOptions::default(),
            &mut ChaCha20Rng::seed_from_u64(seed),
        )
    };
    for client_layers in [0, 1] {
        let rounded = encrypt_model_quant(
            &b,
            key(9),
            2,
            client_layers,
            ShardQuant::Q4_0,
            &mut |_, _| {},
        )
        .expect("encrypt");
        let mut seen = Vec::new();
        let calibrated = encrypt_model_with(
            &b,
            key(9),
            2,
            client_layers,
            ShardQuant::Q4_0,
            Some(&calibration),
            &mut |done, total| seen.push((done, total)),
        )
        .expect("calibrated");
        // progress after every layer, in order
        let n = b.weights.config.n_layers - client_layers;
        assert_eq!(seen, (1..=n).map(|d| (d, n)).collect::<Vec<_>>());
        let (r, c) = (mean_error(&rounded), mean_error(&calibrated));
        eprintln!("client layers {client_layers}: mean |Δlogit| rounded {r:.4}, calibrated {c:.4}");
        // the tiny model's random weights leave its inputs nearly uncorrelated, where GPTQ
        // is close to plain rounding (measured 0.82x and 0.93x; SmolLM2's test measures a
        // real model's gain)
        assert!(c < 0.97 * r, "calibrated {c} against rounded {r}");
        // the same key: only the rounding differs, and the result still reads back
        assert_eq!(
            calibrated.client.meta.key.fingerprint,
            rounded.client.meta.key.fingerprint
        );
        let dir = tempfile::tempdir().expect("tmp");
        calibrated.write(dir.path()).expect("write");
        Encrypted::read(dir.path()).expect("read back");
    }
    // 8-bit and f32 shards round as before: a calibration changes nothing
    for quant in [ShardQuant::Q8_0, ShardQuant::F32] {
        let a = encrypt_model_quant(&b, key(9), 2, 0, quant, &mut |_, _| {}).expect("encrypt");
        let c = encrypt_model_with(&b, key(9), 2, 0, quant, Some(&calibration), &mut |_, _| {})
            .expect("encrypt");
        for (x, y) in a.shards.iter().zip(&c.shards) {
            assert_eq!(
                x.to_writer().expect("w").data_sha256(),
                y.to_writer().expect("w").data_sha256(),
                "{quant}"
            );
        }
    }
}
