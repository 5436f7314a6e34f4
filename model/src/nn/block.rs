use burn::config::Config;
use burn::tensor::{Device, Tensor};
use veil_kernels::Precision;

use super::attention::Segment;
use super::probe::{tap, Probe, Site};
use super::{Attention, AttentionConfig, Mlp, MlpConfig, RmsNorm, RmsNormConfig};
use crate::cache::{LayerKv, RopeTables};
use crate::qweights::QuantLayer;
use crate::{LayerWeights, LlamaConfig, ModelError};

/// One pre-norm decoder block.
#[derive(Config, Debug)]
pub struct BlockConfig {
    pub attention: AttentionConfig,
    pub mlp: MlpConfig,
    #[config(default = 1e-5)]
    pub rms_eps: f64,
    /// Whether the norms carry gains (plaintext) or have them folded away (encrypted).
    #[config(default = true)]
    pub norm_gains: bool,
}

impl BlockConfig {
    pub fn from_llama(c: &LlamaConfig) -> Self {
        BlockConfig::new(
            AttentionConfig::new(c.d_model, c.n_heads, c.n_kv_heads, c.head_dim)
                .with_rms_eps(f64::from(c.rms_eps)),
            MlpConfig::new(c.d_model, c.d_ff),
        )
        .with_rms_eps(f64::from(c.rms_eps))
    }

    pub fn init(&self, device: &Device) -> Block {
        let norm = RmsNormConfig::new(self.attention.d_model)
            .with_epsilon(self.rms_eps)
            .with_gain(self.norm_gains);
        Block {
            attn_norm: norm.init(device),
            attention: self.attention.init(device),
            ffn_norm: norm.init(device),
            mlp: self.mlp.init(device),
        }
    }
}

/// `x = x + attn(rmsnorm(x) g1)`, then `x = x + mlp(rmsnorm(x) g2)`.
#[derive(Debug, Clone)]
pub struct Block {
    pub attn_norm: RmsNorm,
    pub attention: Attention,
    pub ffn_norm: RmsNorm,
    pub mlp: Mlp,
}

fn gain(g: &[f32]) -> Option<&[f32]> {
    (!g.is_empty()).then_some(g)
}

impl Block {
    /// Build from host weights. An empty norm gain means the gain was folded into the
    /// following matrices (as in encrypted shards) and the norm has none.
    pub fn from_layer(layer: &LayerWeights, config: &LlamaConfig, device: &Device) -> Self {
        let eps = f64::from(config.rms_eps);
        let attn_config = BlockConfig::from_llama(config).attention;
        Block {
            attn_norm: RmsNorm::from_gain(gain(&layer.attn_norm), eps, device),
            attention: Attention::from_matrices(
                &attn_config,
                [&layer.wq, &layer.wk, &layer.wv, &layer.wo],
                &layer.extras,
                device,
            ),
            ffn_norm: RmsNorm::from_gain(gain(&layer.ffn_norm), eps, device),
            mlp: Mlp::from_matrices(&layer.w_gate, &layer.w_up, &layer.w_down, device),
        }
    }

    /// Build from a layer's quantized matrices, run on the CPU device `device`.
    pub fn from_quantized(
        layer: &QuantLayer,
        config: &LlamaConfig,
        precision: Precision,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let eps = f64::from(config.rms_eps);
        let attn_config = BlockConfig::from_llama(config).attention;
        let l = layer.clone();
        Ok(Block {
            attn_norm: RmsNorm::from_gain(gain(&layer.attn_norm), eps, device),
            attention: Attention::from_quantized(
                &attn_config,
                [l.wq, l.wk, l.wv, l.wo],
                &layer.extras,
                precision,
                device,
            )?,
            ffn_norm: RmsNorm::from_gain(gain(&layer.ffn_norm), eps, device),
            mlp: Mlp::from_quantized([l.w_gate, l.w_up, l.w_down], precision, device)?,
        })
    }

    /// `x`: `[n, d]` rows of the sequences in `segments` → `[n, d]`.
    pub fn forward(
        &self,
        x: Tensor<2>,
        segments: &[Segment],
        caches: &mut [&mut LayerKv],
        rope: &RopeTables,
        layer: usize,
        probe: &mut dyn Probe,
    ) -> Tensor<2> {
        tap(probe, layer, Site::BlockInput, &x);
        let u = self.attn_norm.forward(x.clone());
        tap(probe, layer, Site::AttnNorm, &u);
        let a = self
            .attention
            .forward(u, segments, caches, rope, layer, probe);
        tap(probe, layer, Site::AttnOut, &a);
        let x = x + a;
        tap(probe, layer, Site::AfterAttn, &x);
        let u = self.ffn_norm.forward(x.clone());
        tap(probe, layer, Site::FfnNorm, &u);
        let m = self.mlp.forward(u, layer, probe);
        tap(probe, layer, Site::MlpOut, &m);
        let x = x + m;
        tap(probe, layer, Site::BlockOutput, &x);
        x
    }
}
