//! A plaintext model as the encryption reads it: one decoder layer at a time in f32, so that
//! a model stored in GGUF blocks is never dequantized whole (an 8B model is 32 GB in f32).

use std::borrow::Cow;

use veil_kernels::QMatrix;

use crate::qweights::{QuantLayer, QuantWeights};
use crate::text::TextSpec;
use crate::{
    LayerWeights, LlamaConfig, LlamaWeights, Matrix, ModelBundle, ModelError, QuantBundle,
};

/// Weights that can be read layer by layer in f32 (`[in, out]` matrices, norm gains kept).
pub trait PlainWeights: Sync {
    fn config(&self) -> &LlamaConfig;
    /// Layer `l` in f32: borrowed when the weights already are, else dequantized.
    fn layer(&self, l: usize) -> Result<Cow<'_, LayerWeights>, ModelError>;
    /// The embedding table, `[vocab, d]`.
    fn embedding(&self) -> Result<Matrix, ModelError>;
    /// The final norm's gain, `[d]`.
    fn final_norm(&self) -> Vec<f32>;
    /// The output head `[d, vocab]`; `None` when tied to the embedding.
    fn output(&self) -> Result<Option<Matrix>, ModelError>;
}

impl PlainWeights for LlamaWeights {
    fn config(&self) -> &LlamaConfig {
        &self.config
    }
    fn layer(&self, l: usize) -> Result<Cow<'_, LayerWeights>, ModelError> {
        self.layers
            .get(l)
            .map(Cow::Borrowed)
            .ok_or_else(|| ModelError::Shape(format!("no layer {l}")))
    }
    fn embedding(&self) -> Result<Matrix, ModelError> {
        Ok(self.embedding.clone())
    }
    fn final_norm(&self) -> Vec<f32> {
        self.final_norm.clone()
    }
    fn output(&self) -> Result<Option<Matrix>, ModelError> {
        Ok(self.output.clone())
    }
}

/// A GGUF matrix (`[out, in]` blocks) as an f32 `[in, out]` matrix.
fn linear(m: &QMatrix) -> Matrix {
    Matrix::new(m.rows(), m.cols(), m.dequantize()).transpose()
}

impl PlainWeights for QuantWeights {
    fn config(&self) -> &LlamaConfig {
        &self.config
    }
    fn layer(&self, l: usize) -> Result<Cow<'_, LayerWeights>, ModelError> {
        let q: &QuantLayer = self
            .layers
            .get(l)
            .ok_or_else(|| ModelError::Shape(format!("no layer {l}")))?;
        Ok(Cow::Owned(LayerWeights {
            attn_norm: q.attn_norm.clone(),
            wq: linear(&q.wq),
            wk: linear(&q.wk),
            wv: linear(&q.wv),
            wo: linear(&q.wo),
            ffn_norm: q.ffn_norm.clone(),
            w_gate: linear(&q.w_gate),
            w_up: linear(&q.w_up),
            w_down: linear(&q.w_down),
            extras: q.extras.clone(),
            post_norms: q.post_norms.clone(),
        }))
    }
    fn embedding(&self) -> Result<Matrix, ModelError> {
        let e = &self.embedding;
        Ok(Matrix::new(e.rows(), e.cols(), e.dequantize()))
    }
    fn final_norm(&self) -> Vec<f32> {
        self.final_norm.clone()
    }
    fn output(&self) -> Result<Option<Matrix>, ModelError> {
        Ok(self.output.as_ref().map(linear))
    }
}

/// A model to encrypt: its weights, name and text codec's description.
#[derive(Clone, Copy)]
pub struct PlainModel<'a> {
    pub name: &'a str,
    pub text: &'a TextSpec,
    pub weights: &'a dyn PlainWeights,
}

impl std::fmt::Debug for PlainModel<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlainModel")
            .field("name", &self.name)
            .field("config", self.weights.config())
            .finish()
    }
}

impl<'a> From<&'a ModelBundle> for PlainModel<'a> {
    fn from(b: &'a ModelBundle) -> Self {
        PlainModel {
            name: &b.name,
            text: &b.text.spec,
            weights: &b.weights,
        }
    }
}

impl<'a> From<&'a QuantBundle> for PlainModel<'a> {
    fn from(b: &'a QuantBundle) -> Self {
        PlainModel {
            name: &b.name,
            text: &b.text.spec,
            weights: &b.weights,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantized_layers_read_as_the_dequantized_model() {
        let q = QuantBundle::tiny().expect("tiny");
        let f = ModelBundle::tiny().expect("tiny");
        let (q, f): (&dyn PlainWeights, &dyn PlainWeights) = (&q.weights, &f.weights);
        assert_eq!(q.config(), f.config());
        for l in 0..f.config().n_layers {
            let (a, b) = (q.layer(l).expect("q"), f.layer(l).expect("f"));
            assert_eq!(a.wq, b.wq);
            assert_eq!(a.w_down, b.w_down);
            assert_eq!(a.attn_norm, b.attn_norm);
        }
        assert_eq!(q.embedding().expect("q"), f.embedding().expect("f"));
        assert_eq!(q.final_norm(), f.final_norm());
        assert!(q.layer(99).is_err());
    }
}
