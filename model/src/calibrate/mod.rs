//! Calibrated quantization: what the inputs of each encrypted layer look like, learnt from a
//! short text, so that 4-bit shards round their weights where it costs the outputs least
//! ([`gptq`]).
//!
//! The statistics are taken *in the key's basis*: the calibration text runs through the
//! encrypted f32 layers one at a time (the client has them while it encrypts), so the
//! second moments are those of exactly the inputs the nodes' matrices will see, with the
//! key's rotation, scalings and folded norm gains already in them.

pub mod gptq;

use burn::tensor::{Device, Tensor, TensorData};

use crate::cache::RopeTables;
use crate::crypto::ModelKey;
use crate::nn::{Probe, Site, Stage};
use crate::source::PlainWeights;
use crate::{LayerWeights, LlamaConfig, ModelError, Precision, QuantLayer, TextCodec};
pub use gptq::Hessian;

/// The text calibration uses unless told otherwise: original prose, a dialogue, code,
/// arithmetic and a few sentences in other languages (about 2,000 SmolLM2 tokens).
pub const DEFAULT_TEXT: &str = include_str!("calibration.txt");

/// Token sequences to calibrate on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Calibration {
    pub sequences: Vec<Vec<u32>>,
}

impl Calibration {
    /// `text` tokenized whole (BOS first if the model adds one), cut into sequences of at
    /// most `seq_len` tokens, at most `max_tokens` in all; a last piece under 16 tokens is
    /// dropped.
    pub fn from_text(
        codec: &TextCodec,
        text: &str,
        seq_len: usize,
        max_tokens: usize,
    ) -> Result<Self, ModelError> {
        let ids = codec.encode_prompt(text)?;
        let ids = &ids[..ids.len().min(max_tokens)];
        let sequences: Vec<Vec<u32>> = ids
            .chunks(seq_len.max(1))
            .filter(|c| c.len() >= 16)
            .map(<[u32]>::to_vec)
            .collect();
        if sequences.is_empty() {
            return Err(ModelError::InvalidConfig(format!(
                "the calibration text has {} tokens; it needs at least 16",
                ids.len()
            )));
        }
        Ok(Calibration { sequences })
    }

    pub fn tokens(&self) -> usize {
        self.sequences.iter().map(Vec::len).sum()
    }
}

/// The inputs' second moments of one encrypted layer: of the attention's inputs (`wq`, `wk`,
/// `wv`) and of the MLP's (`w_gate`, `w_up`), both `d x d`.
#[derive(Debug, Clone)]
pub struct LayerStats {
    pub attn: Hessian,
    pub mlp: Hessian,
}

/// Carries the calibration sequences through the encrypted layers, in order.
#[derive(Debug)]
pub struct Calibrator {
    /// Per sequence, `[t, d]`: the residual stream entering the next layer, in the key's
    /// basis.
    hidden: Vec<Tensor<2>>,
    rope: RopeTables,
    device: Device,
    next_layer: usize,
}

impl Calibrator {
    /// Embed the sequences, run the client's plaintext layers (`0..client_layers`) over
    /// them, and rotate them into the key's basis (`x Q`), ready for layer `client_layers`.
    pub fn new(
        weights: &dyn PlainWeights,
        key: &ModelKey,
        client_layers: usize,
        calibration: &Calibration,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let config = weights.config();
        let d = config.d_model;
        let mut rope_config = config.clone();
        let longest = calibration
            .sequences
            .iter()
            .map(Vec::len)
            .max()
            .unwrap_or(0);
        rope_config.max_seq_len = longest.max(1);
        let rope = RopeTables::new(&rope_config, device);
        let embedding = weights.embedding()?;
        let mut hidden = Vec::with_capacity(calibration.sequences.len());
        for seq in &calibration.sequences {
            let mut rows = Vec::with_capacity(seq.len() * d);
            for &id in seq {
                if id as usize >= embedding.rows {
                    return Err(ModelError::Shape(format!(
                        "calibration token {id} is outside the vocabulary ({})",
                        embedding.rows
                    )));
                }
                rows.extend_from_slice(embedding.row(id as usize));
            }
            if let Some(scale) = config.embedding_scale() {
                rows.iter_mut().for_each(|v| *v *= scale);
            }
            hidden.push(Tensor::<2>::from_data(
                TensorData::new(rows, [seq.len(), d]),
                device,
            ));
        }
        drop(embedding);
        if client_layers > 0 {
            let layers = (0..client_layers)
                .map(|l| weights.layer(l).map(std::borrow::Cow::into_owned))
                .collect::<Result<Vec<_>, _>>()?;
            let stage = Stage::from_layers(0, &layers, config, device);
            hidden = run(&stage, hidden, &rope, &mut crate::nn::NoProbe)?;
        }
        let q: Vec<f32> = (0..d)
            .flat_map(|r| (0..d).map(move |c| (r, c)))
            .map(|(r, c)| key.q[(r, c)] as f32)
            .collect();
        let q = Tensor::<2>::from_data(TensorData::new(q, [d, d]), device);
        let hidden = hidden.into_iter().map(|x| x.matmul(q.clone())).collect();
        Ok(Calibrator {
            hidden,
            rope,
            device: device.clone(),
            next_layer: client_layers,
        })
    }

    /// Run encrypted layer `l` (f32, gains folded; it must be the next layer) over the
    /// sequences, returning its inputs' second moments. The sequences stay where they are
    /// until [`Calibrator::advance`].
    pub fn stats(
        &mut self,
        l: usize,
        layer: &LayerWeights,
        config: &LlamaConfig,
    ) -> Result<LayerStats, ModelError> {
        if l != self.next_layer {
            return Err(ModelError::Shape(format!(
                "calibration is at layer {}, not {l}",
                self.next_layer
            )));
        }
        let stage = Stage::from_layers(l, std::slice::from_ref(layer), config, &self.device);
        let d = config.d_model;
        let mut probe = Collect {
            stats: LayerStats {
                attn: Hessian::new(d),
                mlp: Hessian::new(d),
            },
            error: None,
        };
        run(&stage, self.hidden.clone(), &self.rope, &mut probe)?;
        if let Some(e) = probe.error {
            return Err(e);
        }
        Ok(probe.stats)
    }

    /// Move the sequences through layer `l` as it was quantized (at the nodes' default
    /// precision), so that the next layer is calibrated on the inputs it will really get:
    /// its rounding then also makes up for the rounding before it (GPTQ's sequential
    /// order; on SmolLM2's q4_0 shards it lowers the mean KL divergence from the plaintext
    /// model by about 7%).
    pub fn advance(
        &mut self,
        l: usize,
        layer: &QuantLayer,
        config: &LlamaConfig,
    ) -> Result<(), ModelError> {
        if l != self.next_layer {
            return Err(ModelError::Shape(format!(
                "calibration is at layer {}, not {l}",
                self.next_layer
            )));
        }
        let stage = Stage::from_quantized(
            l,
            std::slice::from_ref(layer),
            config,
            Precision::Fast,
            &self.device,
        )?;
        let hidden = std::mem::take(&mut self.hidden);
        self.hidden = run(&stage, hidden, &self.rope, &mut crate::nn::NoProbe)?;
        self.next_layer += 1;
        Ok(())
    }

    pub fn device(&self) -> &Device {
        &self.device
    }
}

/// Every sequence through `stage` from an empty cache, as one batch.
fn run(
    stage: &Stage,
    hidden: Vec<Tensor<2>>,
    rope: &RopeTables,
    probe: &mut dyn Probe,
) -> Result<Vec<Tensor<2>>, ModelError> {
    let mut caches: Vec<_> = hidden
        .iter()
        .map(|h| stage.new_cache(h.dims()[0]))
        .collect();
    let mut refs: Vec<&mut _> = caches.iter_mut().collect();
    stage.forward_probed(hidden, &mut refs, rope, probe)
}

/// A probe that sums the normalised inputs' second moments.
struct Collect {
    stats: LayerStats,
    error: Option<ModelError>,
}

impl Probe for Collect {
    fn record(&mut self, _layer: usize, site: Site, value: Tensor<2>) {
        let target = match site {
            Site::AttnNorm => &mut self.stats.attn,
            Site::FfnNorm => &mut self.stats.mlp,
            _ => return,
        };
        if let Err(e) = target.add(value) {
            self.error.get_or_insert(e);
        }
    }
}
