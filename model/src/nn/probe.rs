//! Observation points in the forward pass, for instrumentation: a probe sees every
//! intermediate tensor a stage computes (the recording tests use this to check what a node
//! can observe). Without a probe nothing is copied.

use burn::tensor::Tensor;

/// Where in a block a tensor was computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Site {
    /// The residual stream entering the block, `[t, d]`.
    BlockInput,
    /// `rmsnorm(x)` (times the gain when there is one), `[t, d]`.
    AttnNorm,
    /// Queries after RoPE, `[t, H h]`.
    Query,
    /// Keys after RoPE, `[t, G h]` (what the KV cache stores).
    Key,
    /// Values, `[t, G h]`.
    Value,
    /// Scaled attention scores before the mask and softmax, `[H t, s]` (rows per head).
    Scores,
    /// Attention probabilities, `[H t, s]`.
    Probs,
    /// Attention-weighted values before the output projection, `[t, H h]`.
    AttnMix,
    /// The attention output added to the residual stream, `[t, d]`.
    AttnOut,
    /// The residual stream after attention, `[t, d]`.
    AfterAttn,
    /// `rmsnorm(x)` before the MLP, `[t, d]`.
    FfnNorm,
    /// MLP gate pre-activations, `[t, f]`.
    Gate,
    /// MLP up projection, `[t, f]`.
    Up,
    /// `silu(gate) * up`, `[t, f]`.
    Hidden,
    /// The MLP output added to the residual stream, `[t, d]`.
    MlpOut,
    /// The residual stream leaving the block, `[t, d]`.
    BlockOutput,
}

impl Site {
    pub const ALL: [Site; 16] = [
        Site::BlockInput,
        Site::AttnNorm,
        Site::Query,
        Site::Key,
        Site::Value,
        Site::Scores,
        Site::Probs,
        Site::AttnMix,
        Site::AttnOut,
        Site::AfterAttn,
        Site::FfnNorm,
        Site::Gate,
        Site::Up,
        Site::Hidden,
        Site::MlpOut,
        Site::BlockOutput,
    ];
}

/// Receives intermediate tensors.
pub trait Probe {
    /// Whether to record at all (when false, nothing is cloned).
    fn active(&self) -> bool {
        true
    }
    /// `layer` is the global layer index; `value` is 2-D as documented per [`Site`].
    fn record(&mut self, layer: usize, site: Site, value: Tensor<2>);
}

/// The probe that records nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProbe;

impl Probe for NoProbe {
    fn active(&self) -> bool {
        false
    }
    fn record(&mut self, _: usize, _: Site, _: Tensor<2>) {}
}

/// Record `value` if the probe is active.
pub(crate) fn tap(probe: &mut dyn Probe, layer: usize, site: Site, value: &Tensor<2>) {
    if probe.active() {
        probe.record(layer, site, value.clone());
    }
}
