use burn::config::Config;
use burn::tensor::{Device, Tensor};
use veil_kernels::Precision;

use super::attention::Segment;
use super::linear::Linear;
use super::probe::{tap, Probe, Site};
use super::{Attention, AttentionConfig, Mlp, MlpConfig, RmsNorm, RmsNormConfig};
use crate::cache::{LayerKv, RopeTables};
use crate::qweights::QuantLayer;
use crate::{LayerWeights, LlamaConfig, ModelError, PostNorms};

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
    /// Block `layer` of a model of configuration `c`.
    pub fn from_llama(c: &LlamaConfig, layer: usize) -> Self {
        BlockConfig::new(
            AttentionConfig::new(c.d_model, c.n_heads, c.n_kv_heads, c.head_dim)
                .with_rms_eps(f64::from(c.rms_eps))
                .with_window(c.layer_window(layer)),
            MlpConfig::new(c.d_model, c.d_ff).with_activation(c.spec().activation),
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
            post_norms: None,
        }
    }
}

/// `x = x + attn(rmsnorm(x) g1)`, then `x = x + mlp(rmsnorm(x) g2)`; with post-norms
/// (Gemma 3), `x = x + rmsnorm(attn(..)) p1` and `x = x + rmsnorm(mlp(..)) p2`.
#[derive(Debug, Clone)]
pub struct Block {
    pub attn_norm: RmsNorm,
    pub attention: Attention,
    pub ffn_norm: RmsNorm,
    pub mlp: Mlp,
    /// Norms on the attention's and the MLP's outputs.
    pub post_norms: Option<(RmsNorm, RmsNorm)>,
}

fn post_norms(p: Option<&PostNorms>, eps: f64, device: &Device) -> Option<(RmsNorm, RmsNorm)> {
    p.map(|p| {
        (
            RmsNorm::from_gain(Some(&p.attn), eps, device),
            RmsNorm::from_gain(Some(&p.ffn), eps, device),
        )
    })
}

fn gain(g: &[f32]) -> Option<&[f32]> {
    (!g.is_empty()).then_some(g)
}

impl Block {
    /// Build block `index` from host weights. An empty norm gain means the gain was folded
    /// into the following matrices (as in encrypted shards) and the norm has none.
    pub fn from_layer(
        layer: &LayerWeights,
        index: usize,
        config: &LlamaConfig,
        device: &Device,
    ) -> Self {
        let eps = f64::from(config.rms_eps);
        let BlockConfig {
            attention: attn_config,
            mlp: mlp_config,
            ..
        } = BlockConfig::from_llama(config, index);
        Block {
            attn_norm: RmsNorm::from_gain(gain(&layer.attn_norm), eps, device),
            attention: Attention::from_matrices(
                &attn_config,
                [&layer.wq, &layer.wk, &layer.wv, &layer.wo],
                &layer.extras,
                device,
            ),
            ffn_norm: RmsNorm::from_gain(gain(&layer.ffn_norm), eps, device),
            mlp: Mlp::from_matrices(
                &mlp_config,
                &layer.w_gate,
                &layer.w_up,
                &layer.w_down,
                device,
            ),
            post_norms: post_norms(layer.post_norms.as_ref(), eps, device),
        }
    }

    /// Build block `index` from its quantized matrices, run on the CPU device `device`.
    pub fn from_quantized(
        layer: &QuantLayer,
        index: usize,
        config: &LlamaConfig,
        precision: Precision,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let eps = f64::from(config.rms_eps);
        let BlockConfig {
            attention: attn_config,
            mlp: mlp_config,
            ..
        } = BlockConfig::from_llama(config, index);
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
            mlp: Mlp::from_quantized(&mlp_config, [l.w_gate, l.w_up, l.w_down], precision, device)?,
            post_norms: post_norms(layer.post_norms.as_ref(), eps, device),
        })
    }

    /// The block's four linear maps, in op order: query|key|value, output, gate|up, down.
    pub fn linears(&self) -> [&Linear; 4] {
        [
            &self.attention.wqkv,
            &self.attention.wo,
            &self.mlp.w_gate_up,
            &self.mlp.w_down,
        ]
    }

    /// [`Self::linears`], to replace them.
    pub fn linears_mut(&mut self) -> [&mut Linear; 4] {
        [
            &mut self.attention.wqkv,
            &mut self.attention.wo,
            &mut self.mlp.w_gate_up,
            &mut self.mlp.w_down,
        ]
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
        let a = match &self.post_norms {
            Some((n, _)) => n.forward(a),
            None => a,
        };
        tap(probe, layer, Site::AttnOut, &a);
        let x = x + a;
        tap(probe, layer, Site::AfterAttn, &x);
        let u = self.ffn_norm.forward(x.clone());
        tap(probe, layer, Site::FfnNorm, &u);
        let m = self.mlp.forward(u, layer, probe);
        let m = match &self.post_norms {
            Some((_, n)) => n.forward(m),
            None => m,
        };
        tap(probe, layer, Site::MlpOut, &m);
        let x = x + m;
        tap(probe, layer, Site::BlockOutput, &x);
        x
    }
}
