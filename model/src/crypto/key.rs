//! The secret key of one deployment: the residual rotation `Q` and per-layer attention and
//! MLP keys (see the design note). It never leaves the client and is never logged.

use nalgebra::DMatrix;
use rand::seq::SliceRandom;
use rand::{CryptoRng, Rng, RngCore};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::linalg::{haar_orthogonal, log_uniform_half_to_two};
use crate::{LlamaConfig, ModelError};

/// Version of the key layout; stored with every key.
pub const KEY_VERSION: u32 = 1;

/// The model dimensions a key is made for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyShape {
    pub d_model: usize,
    pub d_ff: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// The model normalizes each query and key head before RoPE, so the head keys' parts
    /// applied before that norm must be rotations (they keep the norm).
    #[serde(default)]
    pub qk_norm: bool,
}

impl KeyShape {
    pub fn of(c: &LlamaConfig) -> Self {
        KeyShape {
            d_model: c.d_model,
            d_ff: c.d_ff,
            n_layers: c.n_layers,
            n_heads: c.n_heads,
            n_kv_heads: c.n_kv_heads,
            head_dim: c.head_dim,
            qk_norm: c.spec().qk_norm,
        }
    }
}

/// Options of key generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyOptions {
    /// Permute the key/value heads (and their query heads) in every layer.
    pub permute_heads: bool,
    /// A weaker key for comparison (the attack suite): `Q` a permutation of the hidden
    /// units instead of a dense rotation, no attention blocks (`A = C = I`) and no MLP
    /// scaling (`D = I`); only permutations remain, as in earlier permutation schemes.
    #[serde(default)]
    pub permutation_only: bool,
}

impl Default for KeyOptions {
    fn default() -> Self {
        KeyOptions {
            permute_heads: true,
            permutation_only: false,
        }
    }
}

/// The kv-head order of one layer: random with `permute_heads`, else the identity.
fn head_permutation(shape: KeyShape, options: KeyOptions, rng: &mut impl Rng) -> Vec<u32> {
    if options.permute_heads {
        permutation(shape.n_kv_heads, rng)
    } else {
        (0..shape.n_kv_heads as u32).collect()
    }
}

/// The pre-norm rotation angles of one head (`h / 2`), empty without per-head norms.
fn norm_angles(shape: KeyShape, rng: &mut impl Rng) -> Vec<f64> {
    if !shape.qk_norm {
        return Vec::new();
    }
    (0..shape.head_dim / 2)
        .map(|_| rng.gen_range(0.0..std::f64::consts::TAU))
        .collect()
}

/// The `n x n` matrix of a random permutation.
fn permutation_matrix(n: usize, rng: &mut impl Rng) -> DMatrix<f64> {
    let p = permutation(n, rng);
    let mut m = DMatrix::zeros(n, n);
    for (i, &j) in p.iter().enumerate() {
        m[(i, j as usize)] = 1.0;
    }
    m
}

/// The secrets of one key/value head in one layer.
#[derive(Clone)]
pub struct HeadKey {
    /// `A_g`: per RoPE pair `j`, the block `s_j [[cos p_j, -sin p_j], [sin p_j, cos p_j]]`.
    pub rope_scale: Vec<f64>,
    pub rope_angle: Vec<f64>,
    /// `C_g = U diag(sigma) V^T`.
    pub c_u: DMatrix<f64>,
    pub c_sigma: Vec<f64>,
    pub c_v: DMatrix<f64>,
    /// With per-head query/key norms ([`KeyShape::qk_norm`]): per RoPE pair, the angle of
    /// the rotation applied to the query heads (`O_q`) and to the key head (`O_k`) before
    /// their norm; `A_g` then applies after it. Empty otherwise.
    pub q_norm_angle: Vec<f64>,
    pub k_norm_angle: Vec<f64>,
}

impl HeadKey {
    /// `C_g`, `h x h`.
    pub fn c(&self) -> DMatrix<f64> {
        &self.c_u * DMatrix::from_diagonal(&self.c_sigma.clone().into()) * self.c_v.transpose()
    }

    /// `C_g^-1 = V diag(1/sigma) U^T`, exact from the factors.
    pub fn c_inv(&self) -> DMatrix<f64> {
        let inv: Vec<f64> = self.c_sigma.iter().map(|s| 1.0 / s).collect();
        &self.c_v * DMatrix::from_diagonal(&inv.into()) * self.c_u.transpose()
    }

    /// `A_g` as a dense `h x h` matrix (for tests and analysis).
    pub fn a(&self) -> DMatrix<f64> {
        let h = self.rope_scale.len() * 2;
        let mut a = DMatrix::zeros(h, h);
        for j in 0..h / 2 {
            let (s, (sin, cos)) = (self.rope_scale[j], self.rope_angle[j].sin_cos());
            a[(2 * j, 2 * j)] = s * cos;
            a[(2 * j, 2 * j + 1)] = -s * sin;
            a[(2 * j + 1, 2 * j)] = s * sin;
            a[(2 * j + 1, 2 * j + 1)] = s * cos;
        }
        a
    }
}

/// The secrets of one layer.
#[derive(Clone)]
pub struct LayerKey {
    /// One per key/value head, indexed by the plaintext head.
    pub heads: Vec<HeadKey>,
    /// `P`: encrypted MLP unit `j` is plaintext unit `mlp_perm[j]`.
    pub mlp_perm: Vec<u32>,
    /// `D`: the signed scale of encrypted MLP unit `j`.
    pub mlp_scale: Vec<f64>,
    /// Encrypted key/value head `g` is plaintext head `head_perm[g]` (identity if heads are
    /// not permuted).
    pub head_perm: Vec<u32>,
}

/// A deployment's whole key.
#[derive(Clone)]
pub struct ModelKey {
    pub version: u32,
    pub shape: KeyShape,
    pub options: KeyOptions,
    /// `Q`, the `d x d` orthogonal key of the residual stream.
    pub q: DMatrix<f64>,
    pub layers: Vec<LayerKey>,
}

impl std::fmt::Debug for ModelKey {
    /// Never prints key material: only the fingerprint.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelKey")
            .field("fingerprint", &self.fingerprint())
            .finish_non_exhaustive()
    }
}

fn permutation(n: usize, rng: &mut impl Rng) -> Vec<u32> {
    let mut p: Vec<u32> = (0..n as u32).collect();
    p.shuffle(rng);
    p
}

impl ModelKey {
    /// Draw a key for a model of shape `shape` from a cryptographic RNG.
    pub fn generate(
        shape: KeyShape,
        options: KeyOptions,
        rng: &mut (impl RngCore + CryptoRng),
    ) -> Self {
        let h = shape.head_dim;
        if options.permutation_only {
            return Self::permutation_only(shape, options, rng);
        }
        let q = haar_orthogonal(shape.d_model, rng);
        let layers = (0..shape.n_layers)
            .map(|_| {
                let heads = (0..shape.n_kv_heads)
                    .map(|_| HeadKey {
                        rope_scale: (0..h / 2).map(|_| log_uniform_half_to_two(rng)).collect(),
                        rope_angle: (0..h / 2)
                            .map(|_| rng.gen_range(0.0..std::f64::consts::TAU))
                            .collect(),
                        c_u: haar_orthogonal(h, rng),
                        c_sigma: (0..h).map(|_| log_uniform_half_to_two(rng)).collect(),
                        c_v: haar_orthogonal(h, rng),
                        q_norm_angle: norm_angles(shape, rng),
                        k_norm_angle: norm_angles(shape, rng),
                    })
                    .collect();
                let mlp_scale = (0..shape.d_ff)
                    .map(|_| {
                        let sign = if rng.gen::<bool>() { 1.0 } else { -1.0 };
                        sign * log_uniform_half_to_two(rng)
                    })
                    .collect();
                LayerKey {
                    heads,
                    mlp_perm: permutation(shape.d_ff, rng),
                    mlp_scale,
                    head_perm: head_permutation(shape, options, rng),
                }
            })
            .collect();
        ModelKey {
            version: KEY_VERSION,
            shape,
            options,
            q,
            layers,
        }
    }

    /// The permutation-only key of [`KeyOptions::permutation_only`].
    fn permutation_only(shape: KeyShape, options: KeyOptions, rng: &mut impl Rng) -> Self {
        let h = shape.head_dim;
        let identity = DMatrix::<f64>::identity(h, h);
        let q = permutation_matrix(shape.d_model, rng);
        let layers = (0..shape.n_layers)
            .map(|_| LayerKey {
                heads: (0..shape.n_kv_heads)
                    .map(|_| HeadKey {
                        rope_scale: vec![1.0; h / 2],
                        rope_angle: vec![0.0; h / 2],
                        c_u: identity.clone(),
                        c_sigma: vec![1.0; h],
                        c_v: identity.clone(),
                        q_norm_angle: vec![0.0; if shape.qk_norm { h / 2 } else { 0 }],
                        k_norm_angle: vec![0.0; if shape.qk_norm { h / 2 } else { 0 }],
                    })
                    .collect(),
                mlp_perm: permutation(shape.d_ff, rng),
                mlp_scale: vec![1.0; shape.d_ff],
                head_perm: head_permutation(shape, options, rng),
            })
            .collect();
        ModelKey {
            version: KEY_VERSION,
            shape,
            options,
            q,
            layers,
        }
    }

    /// Check that the key fits a model configuration.
    pub fn check_fits(&self, config: &LlamaConfig) -> Result<(), ModelError> {
        if self.shape != KeyShape::of(config) {
            return Err(ModelError::Key(format!(
                "the key was made for {:?}, the model is {:?}",
                self.shape,
                KeyShape::of(config)
            )));
        }
        Ok(())
    }

    /// The key's canonical bytes (all parameters in a fixed order, little-endian).
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let s = &self.shape;
        out.extend(self.version.to_le_bytes());
        for x in [
            s.d_model,
            s.d_ff,
            s.n_layers,
            s.n_heads,
            s.n_kv_heads,
            s.head_dim,
        ] {
            out.extend((x as u64).to_le_bytes());
        }
        out.push(
            u8::from(self.options.permute_heads) | (u8::from(self.options.permutation_only) << 1),
        );
        if s.qk_norm {
            // only then, so that the fingerprints of earlier keys stay what they were
            out.push(1);
        }
        let mut put = |v: &mut dyn Iterator<Item = f64>| {
            for x in v {
                out.extend(x.to_le_bytes());
            }
        };
        put(&mut self.q.transpose().iter().copied());
        for l in &self.layers {
            for hk in &l.heads {
                put(&mut hk.rope_scale.iter().copied());
                put(&mut hk.rope_angle.iter().copied());
                put(&mut hk.c_u.transpose().iter().copied());
                put(&mut hk.c_sigma.iter().copied());
                put(&mut hk.c_v.transpose().iter().copied());
                put(&mut hk.q_norm_angle.iter().copied());
                put(&mut hk.k_norm_angle.iter().copied());
            }
            put(&mut l.mlp_perm.iter().map(|&p| f64::from(p)));
            put(&mut l.mlp_scale.iter().copied());
            put(&mut l.head_perm.iter().map(|&p| f64::from(p)));
        }
        out
    }

    /// SHA-256 of the canonical bytes, hex. Shards carry it so that a client can tell
    /// whether they were made with its key; it reveals nothing of the key.
    pub fn fingerprint(&self) -> String {
        hex::encode(Sha256::digest(self.canonical_bytes()))
    }
}

/// The first 16 hex digits of a fingerprint, for display.
pub fn short_fingerprint(fp: &str) -> &str {
    &fp[..fp.len().min(16)]
}
