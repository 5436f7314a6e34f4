//! Turning a plaintext model and a key into node shards and the owner's client bundle.

use std::path::{Path, PathBuf};

use rayon::prelude::*;

use super::client::{ClientBundle, ClientLayers, ClientMeta, StageRecord, CLIENT_VERSION};
use super::key::ModelKey;
use super::key_io::KeyMeta;
use super::shard::{
    quantize_layer, quantize_layer_calibrated, Shard, ShardLayers, ShardMeta, ShardQuant,
    SHARD_VERSION,
};
use super::transform::{check_coverage, encrypt_layer, plan_stages};
use crate::calibrate::{gptq, Calibration, Calibrator};
use crate::container::Container;
use crate::source::PlainModel;
use crate::{Compute, LayerWeights, ModelBundle, ModelError};
use veil_kernels::GgmlType;

/// The result of encrypting a model.
#[derive(Debug, Clone)]
pub struct Encrypted {
    pub client: ClientBundle,
    /// One per stage, in layer order.
    pub shards: Vec<Shard>,
}

/// Encrypt `model` with `key` into `n_stages` shards of contiguous layers.
/// `progress(done, total)` is called after each layer.
pub fn encrypt_model(
    model: &ModelBundle,
    key: ModelKey,
    n_stages: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Encrypted, ModelError> {
    encrypt_model_split(model, key, n_stages, 0, progress)
}

/// [`encrypt_model`] with the client's layers (the first `client_layers`, or a
/// [`ClientLayers`] with last ones too) kept in plaintext in the client bundle (the client
/// runs them), and the rest split into `n_stages` shards.
pub fn encrypt_model_split(
    model: &ModelBundle,
    key: ModelKey,
    n_stages: usize,
    client_layers: impl Into<ClientLayers>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Encrypted, ModelError> {
    encrypt_model_quant(
        model,
        key,
        n_stages,
        client_layers,
        ShardQuant::F32,
        progress,
    )
}

/// [`encrypt_model_split`] with the shards' matrices stored as `quant`. Layers are read one
/// at a time in f32 (dequantized from a GGUF's blocks if need be), transformed in f64,
/// rounded once to f32 and re-quantized; a stage's layers are transformed in parallel, so
/// at most one f32 layer per thread exists beside the shards being built.
pub fn encrypt_model_quant<'a>(
    model: impl Into<PlainModel<'a>>,
    key: ModelKey,
    n_stages: usize,
    client_layers: impl Into<ClientLayers>,
    quant: ShardQuant,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Encrypted, ModelError> {
    encrypt_model_with(model, key, n_stages, client_layers, quant, None, progress)
}

/// Whether shards stored as `quant` round their weights against calibration statistics when
/// given a [`Calibration`] (the 4-bit formats; 8-bit rounding costs too little to matter).
pub fn calibrates(quant: ShardQuant) -> bool {
    quant
        .ggml()
        .is_some_and(|ty| ty != GgmlType::Q8_0 && gptq::supports(ty))
}

/// [`encrypt_model_quant`], with the 4-bit matrices rounded by GPTQ against the inputs that
/// `calibration` produces in each encrypted layer (see [`crate::calibrate`]) when
/// [`calibrates`]`(quant)`. The layers are then encrypted one after another (each one's
/// inputs come from the one before), the products inside each in parallel.
pub fn encrypt_model_with<'a>(
    model: impl Into<PlainModel<'a>>,
    key: ModelKey,
    n_stages: usize,
    client_layers: impl Into<ClientLayers>,
    quant: ShardQuant,
    calibration: Option<&Calibration>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Encrypted, ModelError> {
    let model = model.into();
    let split: ClientLayers = client_layers.into();
    let w = model.weights;
    let config = w.config();
    if config.spec().post_norms {
        return Err(ModelError::InvalidConfig(format!(
            "Veil cannot encrypt {} models yet: the gains of their post-attention and post-MLP \
             norms do not commute with the residual key, and every exact way of folding them \
             reveals the key up to signs (SECURITY.md, \"Other architecture families\"); run the model in \
             plaintext on your own machine (`veil generate --local`)",
            config.spec().gguf_name
        )));
    }
    key.check_fits(config)?;
    let fingerprint = key.fingerprint();
    let nodes = split.node_range(config.n_layers)?;
    let client_layers = nodes.start;
    let ranges: Vec<std::ops::Range<usize>> = plan_stages(nodes.len(), n_stages)?
        .into_iter()
        .map(|r| r.start + client_layers..r.end + client_layers)
        .collect();
    let mut shards = Vec::with_capacity(n_stages);
    let mut records = Vec::with_capacity(n_stages);
    let mut done = 0;
    let total = nodes.len();
    let encrypt = |l: usize| -> Result<LayerWeights, ModelError> {
        Ok(encrypt_layer(&*w.layer(l)?, &key.layers[l], &key.q, config))
    };
    let device = Compute::cpu().device;
    let mut calibrator = match calibration {
        Some(c) if calibrates(quant) => Some(Calibrator::new(w, &key, client_layers, c, &device)?),
        _ => None,
    };
    for (stage, range) in ranges.into_iter().enumerate() {
        let mut on_layers = |n: usize| {
            done += n;
            progress(done, total);
        };
        let layers = match (quant.ggml(), calibrator.as_mut()) {
            (None, _) => ShardLayers::F32(in_parallel(range.clone(), encrypt, &mut on_layers)?),
            (Some(ty), Some(calibrator)) => {
                // the transforms of as many layers as there are threads at once; then
                // each is calibrated and rounded in order (its inputs come from the last)
                let mut layers = Vec::with_capacity(range.len());
                let all: Vec<usize> = range.clone().collect();
                for chunk in all.chunks(rayon::current_num_threads().max(1)) {
                    let t = std::time::Instant::now();
                    let encrypted: Vec<LayerWeights> = chunk
                        .par_iter()
                        .map(|&l| encrypt(l))
                        .collect::<Result<_, _>>()?;
                    tracing::debug!("layers {chunk:?} encrypted in {:.1?}", t.elapsed());
                    for (&l, layer) in chunk.iter().zip(encrypted) {
                        let t = std::time::Instant::now();
                        let stats = calibrator.stats(l, &layer, config)?;
                        let t1 = t.elapsed();
                        let q = quantize_layer_calibrated(&layer, l, config, ty, &stats, &device)?;
                        let t2 = t.elapsed();
                        calibrator.advance(l, &q, config)?;
                        tracing::debug!(
                            "layer {l}: calibration inputs {t1:.1?}, rounding {:.1?}, quantized pass {:.1?}",
                            t2 - t1,
                            t.elapsed() - t2
                        );
                        layers.push(q);
                        on_layers(1);
                    }
                }
                ShardLayers::Quant(layers)
            }
            (Some(ty), None) => ShardLayers::Quant(in_parallel(
                range.clone(),
                |l| quantize_layer(&encrypt(l)?, l, config, ty),
                &mut on_layers,
            )?),
        };
        let shard = Shard {
            meta: ShardMeta {
                version: SHARD_VERSION,
                config: config.clone(),
                stage,
                n_stages,
                layers: (range.start, range.end),
                key_fingerprint: fingerprint.clone(),
                dtype: quant.to_string(),
            },
            layers,
        };
        records.push(StageRecord {
            stage,
            layers: shard.meta.layers,
            shard_sha256: shard.to_writer()?.data_sha256(),
        });
        shards.push(shard);
    }
    let plain = |r: std::ops::Range<usize>| -> Result<Vec<LayerWeights>, ModelError> {
        r.map(|l| w.layer(l).map(std::borrow::Cow::into_owned))
            .collect()
    };
    let local_layers = plain(0..client_layers)?;
    let tail_layers = plain(nodes.end..config.n_layers)?;
    let client = ClientBundle {
        meta: ClientMeta {
            version: CLIENT_VERSION,
            model_name: model.name.to_string(),
            config: config.clone(),
            key: KeyMeta {
                version: key.version,
                shape: key.shape,
                options: key.options,
                fingerprint,
            },
            stages: records,
            text: model.text.clone(),
            client_layers,
            client_last_layers: split.last,
            shard_dtype: quant.to_string(),
        },
        key,
        embedding: w.embedding()?,
        final_norm: w.final_norm(),
        output: w.output()?,
        local_layers,
        tail_layers,
    };
    Ok(Encrypted { client, shards })
}

/// `f` of every layer of `range`, as many at once as there are threads, in order;
/// `on_layers(n)` after each batch of `n`.
fn in_parallel<T: Send>(
    range: std::ops::Range<usize>,
    f: impl Fn(usize) -> Result<T, ModelError> + Sync,
    on_layers: &mut dyn FnMut(usize),
) -> Result<Vec<T>, ModelError> {
    let batch = rayon::current_num_threads().max(1);
    let mut out = Vec::with_capacity(range.len());
    let layers: Vec<usize> = range.collect();
    for chunk in layers.chunks(batch) {
        let part: Vec<Result<T, ModelError>> = chunk.par_iter().map(|&l| f(l)).collect();
        // the first failing layer's error, whichever thread failed first
        for r in part {
            out.push(r?);
        }
        on_layers(chunk.len());
    }
    Ok(out)
}

/// File names inside an output directory.
pub fn client_path(dir: &Path) -> PathBuf {
    dir.join("client.veil")
}

pub fn shard_path(dir: &Path, stage: usize) -> PathBuf {
    dir.join(format!("shard-{stage}.veil"))
}

impl Encrypted {
    /// Write `client.veil` (mode 0600) and `shard-<i>.veil` into `dir`.
    pub fn write(&self, dir: &Path) -> Result<(), ModelError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| ModelError::Io(format!("{}: {e}", dir.display())))?;
        for s in &self.shards {
            s.write(&shard_path(dir, s.meta.stage))?;
        }
        self.client.write(&client_path(dir))
    }

    /// Read a directory written by [`Encrypted::write`], checking every shard against the
    /// client bundle: key fingerprint, model, content hash, and coverage of all layers.
    pub fn read(dir: &Path) -> Result<Self, ModelError> {
        let client = ClientBundle::read(&client_path(dir))?;
        let mut shards = Vec::new();
        for record in &client.meta.stages {
            let path = shard_path(dir, record.stage);
            if !path.exists() {
                return Err(ModelError::Shard(format!(
                    "{} is missing (layers {}..{})",
                    path.display(),
                    record.layers.0,
                    record.layers.1
                )));
            }
            let c = Container::open(&path)?;
            let shard = Shard::from_container(&c)
                .map_err(|e| ModelError::Shard(format!("{}: {e}", path.display())))?;
            client
                .verify_shard(&shard.meta, Some(c.data_sha256()))
                .map_err(|e| ModelError::Shard(format!("{}: {e}", path.display())))?;
            shards.push(shard);
        }
        let nodes = client
            .meta
            .client_side()
            .node_range(client.meta.config.n_layers)?;
        check_coverage(
            shards.iter().map(|s| s.meta.layer_range()).collect(),
            nodes.start,
            nodes.end,
        )?;
        Ok(Encrypted { client, shards })
    }
}
