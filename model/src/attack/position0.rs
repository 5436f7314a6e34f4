//! The adaptive attacker's table against client layers. When the client runs the first `k`
//! layers itself, the first node receives the residual stream after them instead of
//! embedding rows. At position 0 a token attends only to itself (softmax over one score is
//! 1), so that residual depends on the token alone: with the public weights the attacker
//! computes it for the whole vocabulary and matches against it instead of the embeddings.

use burn::tensor::activation::silu;
use burn::tensor::{Device, Tensor};

use crate::nn::{matrix_to_tensor, tensor_to_vec, RmsNorm};
use crate::{LlamaWeights, Matrix, ModelError};

fn rmsnorm(x: Tensor<2>, gain: &[f32], eps: f32, device: &Device) -> Tensor<2> {
    RmsNorm::from_gain(Some(gain), f64::from(eps), device).forward(x)
}

/// The residual stream after layers `0..k` of every vocabulary token at position 0,
/// `[vocab, d]` (`k = 0`: the embedding table).
pub fn position0_table(w: &LlamaWeights, k: usize, device: &Device) -> Result<Matrix, ModelError> {
    let c = &w.config;
    let (d, h) = (c.d_model, c.head_dim);
    let group = c.n_heads / c.n_kv_heads.max(1);
    let mut out = Vec::with_capacity(c.vocab_size * d);
    let chunk = 4096;
    for start in (0..c.vocab_size).step_by(chunk) {
        let rows = chunk.min(c.vocab_size - start);
        let mut x = Tensor::<2>::from_data(
            burn::tensor::TensorData::new(
                w.embedding.data[start * d..(start + rows) * d].to_vec(),
                [rows, d],
            ),
            device,
        );
        for layer in &w.layers[..k.min(w.layers.len())] {
            let u = rmsnorm(x.clone(), &layer.attn_norm, c.rms_eps, device);
            let v = u.matmul(matrix_to_tensor(&layer.wv, device));
            // each query head reads its kv head's value: attention at position 0 is v
            let heads: Vec<Tensor<2>> = (0..c.n_heads)
                .map(|i| v.clone().narrow(1, (i / group) * h, h))
                .collect();
            let a = Tensor::cat(heads, 1);
            x = x + a.matmul(matrix_to_tensor(&layer.wo, device));
            let u = rmsnorm(x.clone(), &layer.ffn_norm, c.rms_eps, device);
            let gate = silu(u.clone().matmul(matrix_to_tensor(&layer.w_gate, device)));
            let up = u.matmul(matrix_to_tensor(&layer.w_up, device));
            x = x + (gate * up).matmul(matrix_to_tensor(&layer.w_down, device));
        }
        out.extend(tensor_to_vec(x)?);
    }
    Ok(Matrix::new(c.vocab_size, d, out))
}
