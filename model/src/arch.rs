//! The architecture families Veil runs, described in one place: what each family's GGUF
//! calls it, which attention extras its blocks carry (biases, per-head norms) and how its
//! file lays out RoPE pairs. The loaders, the forward pass, the encryption transforms and
//! the shard format read this description; none of them names a family.
//!
//! Inside Veil every family uses one layout: RoPE pairs are adjacent columns `(2j, 2j+1)`
//! of each head (llama.cpp's "normal" RoPE). Families whose files pair `j` with `j + h/2`
//! (llama.cpp's "neox" RoPE: Qwen 2, Qwen 3) have the query and key dimensions of each head
//! reordered while loading; attention scores are unchanged because queries and keys are
//! reordered alike, and values are not touched.

use serde::{Deserialize, Serialize};

use crate::ModelError;

/// An architecture family (`general.architecture` in GGUF).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// Llama 1-3, SmolLM, Mistral without sliding windows: the plain pre-norm block.
    #[default]
    Llama,
    /// Qwen 2 / 2.5: biases on the query, key and value projections; neox RoPE.
    Qwen2,
    /// Qwen 3: RMSNorm over each query and key head before RoPE; neox RoPE.
    Qwen3,
    /// Gemma 3: embeddings scaled by `sqrt(d)`, per-head query/key norms, a second norm
    /// after attention and after the MLP ("sandwich"), a GELU-gated MLP, sliding-window
    /// attention on local layers with their own RoPE base; neox RoPE.
    Gemma3,
}

/// The gate's activation in the gated MLP `(act(u Wg) * (u Wu)) Wd`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// `x * sigmoid(x)` (SwiGLU).
    #[default]
    Silu,
    /// GELU's tanh approximation, `x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))` (GeGLU).
    GeluTanh,
}

/// How a family's files pair the dimensions of a head for RoPE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeLayout {
    /// `(2j, 2j + 1)`: Veil's own layout.
    Adjacent,
    /// `(j, j + h/2)`: reordered to adjacent pairs while loading.
    Halves,
}

/// What a family's decoder block has beyond the Llama block.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FamilySpec {
    /// `general.architecture` in GGUF; also the prefix of its metadata keys.
    pub gguf_name: &'static str,
    /// Biases on the query, key and value projections (`blk.N.attn_{q,k,v}.bias`).
    pub qkv_bias: bool,
    /// RMSNorm with a gain over each query and key head, before RoPE
    /// (`blk.N.attn_{q,k}_norm.weight`, `[h]`).
    pub qk_norm: bool,
    pub rope: RopeLayout,
    /// RMSNorms with gains on the attention's and the MLP's outputs, before the residual
    /// additions (`blk.N.post_attention_norm.weight`, `blk.N.post_ffw_norm.weight`).
    pub post_norms: bool,
    pub activation: Activation,
    /// Token embeddings are multiplied by `sqrt(d)` (the head reads the unscaled table).
    pub embed_scale: bool,
    /// Every `n`-th layer (`n - 1`, `2n - 1`, ...) attends to the whole context and the
    /// others to a sliding window, when the file gives a window (`0`: every layer slides).
    pub sliding_pattern: usize,
    /// RoPE base of the sliding-window layers when the file does not give one.
    pub local_rope_theta: Option<f32>,
}

impl FamilySpec {
    /// The Llama block: what every family starts from.
    const LLAMA: FamilySpec = FamilySpec {
        gguf_name: "llama",
        qkv_bias: false,
        qk_norm: false,
        rope: RopeLayout::Adjacent,
        post_norms: false,
        activation: Activation::Silu,
        embed_scale: false,
        sliding_pattern: 0,
        local_rope_theta: None,
    };
}

impl Family {
    pub const ALL: [Family; 4] = [Family::Llama, Family::Qwen2, Family::Qwen3, Family::Gemma3];

    pub fn spec(self) -> FamilySpec {
        match self {
            Family::Llama => FamilySpec::LLAMA,
            Family::Qwen2 => FamilySpec {
                gguf_name: "qwen2",
                qkv_bias: true,
                rope: RopeLayout::Halves,
                ..FamilySpec::LLAMA
            },
            Family::Qwen3 => FamilySpec {
                gguf_name: "qwen3",
                qk_norm: true,
                rope: RopeLayout::Halves,
                ..FamilySpec::LLAMA
            },
            // llama.cpp: global attention on layers 5, 11, ...; local RoPE base 10000.
            Family::Gemma3 => FamilySpec {
                gguf_name: "gemma3",
                qk_norm: true,
                rope: RopeLayout::Halves,
                post_norms: true,
                activation: Activation::GeluTanh,
                embed_scale: true,
                sliding_pattern: 6,
                local_rope_theta: Some(10_000.0),
                ..FamilySpec::LLAMA
            },
        }
    }

    /// The family a GGUF file's `general.architecture` names.
    pub fn from_gguf_name(name: &str) -> Result<Family, ModelError> {
        Family::ALL
            .into_iter()
            .find(|f| f.spec().gguf_name == name)
            .ok_or_else(|| ModelError::UnsupportedArchitecture(name.to_string()))
    }

    /// The GGUF names of every family, for messages.
    pub fn names() -> String {
        Family::ALL.map(|f| f.spec().gguf_name).join(", ")
    }
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.spec().gguf_name)
    }
}

/// Dimension `i` of a head in Veil's adjacent layout is dimension `order[i]` of the same
/// head in the file's layout.
pub fn head_order(layout: RopeLayout, h: usize) -> Vec<usize> {
    match layout {
        RopeLayout::Adjacent => (0..h).collect(),
        RopeLayout::Halves => (0..h).map(|i| i / 2 + (i % 2) * (h / 2)).collect(),
    }
}

/// The order of `heads * h` dimensions (every head reordered by [`head_order`]).
pub fn heads_order(layout: RopeLayout, heads: usize, h: usize) -> Vec<usize> {
    let one = head_order(layout, h);
    (0..heads)
        .flat_map(|i| one.iter().map(move |&j| i * h + j))
        .collect()
}

/// A linear map acting on each RoPE pair `(2j, 2j+1)` of each head on its own:
///
/// ```text
/// y[2j]   = x[2j]   diag[2j]   + x[2j+1] cross[2j]
/// y[2j+1] = x[2j+1] diag[2j+1] + x[2j]   cross[2j+1]
/// ```
///
/// A plaintext norm gain is `diag = g`, `cross = 0`; an encrypted one is the 2x2 product
/// of the head key's pre-norm rotation, the gain and its RoPE-commuting block.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PairMap {
    /// `[heads * h]`.
    pub diag: Vec<f32>,
    /// `[heads * h]`.
    pub cross: Vec<f32>,
}

impl PairMap {
    /// The gain `g` (`[h]`, shared by all heads) of `heads` heads.
    pub fn gain(g: &[f32], heads: usize) -> Self {
        PairMap {
            diag: g.repeat(heads),
            cross: vec![0.0; g.len() * heads],
        }
    }

    pub fn len(&self) -> usize {
        self.diag.len()
    }

    pub fn is_empty(&self) -> bool {
        self.diag.is_empty()
    }

    /// Apply to one row `x` (`[heads * h]`), in place (the host reference of the burn code).
    pub fn apply(&self, x: &mut [f32]) {
        for j in (0..x.len()).step_by(2) {
            let (a, b) = (x[j], x[j + 1]);
            x[j] = a * self.diag[j] + b * self.cross[j];
            x[j + 1] = b * self.diag[j + 1] + a * self.cross[j + 1];
        }
    }
}

/// Per-head norms over queries and keys, each followed by its pair map.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct QkNorm {
    /// `[H h]`.
    pub q: PairMap,
    /// `[G h]`.
    pub k: PairMap,
}

/// What a block's attention has beyond Llama's four matrices. Every field is empty for a
/// family without it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AttnExtras {
    /// Biases of the fused query, key and value projection, `[H h + 2 G h]`; empty if none.
    pub qkv_bias: Vec<f32>,
    pub qk_norm: Option<QkNorm>,
}

/// The norms on a block's attention and MLP outputs (Gemma 3's "sandwich"), before each
/// residual addition: `x + rmsnorm(attn) * attn_gain`, then `x + rmsnorm(mlp) * ffn_gain`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PostNorms {
    /// `[d]`.
    pub attn: Vec<f32>,
    /// `[d]`.
    pub ffn: Vec<f32>,
}

/// Container names (under a layer's prefix) of the extras' tensors, in order.
const EXTRA_NAMES: [&str; 5] = [
    "attn_qkv.bias",
    "attn_q_norm.diag",
    "attn_q_norm.cross",
    "attn_k_norm.diag",
    "attn_k_norm.cross",
];

impl AttnExtras {
    /// The extras' tensors as `(name, values)`, named after `prefix` (e.g. `blk.3`), for a
    /// container.
    pub fn tensors(&self, prefix: &str) -> Vec<(String, &[f32])> {
        let mut out: Vec<(String, &[f32])> = Vec::new();
        let name = |i: usize| format!("{prefix}.{}", EXTRA_NAMES[i]);
        if !self.qkv_bias.is_empty() {
            out.push((name(0), &self.qkv_bias));
        }
        if let Some(n) = &self.qk_norm {
            out.push((name(1), &n.q.diag));
            out.push((name(2), &n.q.cross));
            out.push((name(3), &n.k.diag));
            out.push((name(4), &n.k.cross));
        }
        out
    }

    /// How many tensors [`AttnExtras::tensors`] writes for a block of `spec`.
    pub fn tensor_count(spec: FamilySpec) -> usize {
        usize::from(spec.qkv_bias) + 4 * usize::from(spec.qk_norm)
    }

    /// Read back what [`AttnExtras::tensors`] wrote for a block of `spec`; `get(name, n)`
    /// reads a tensor of `n` values.
    pub fn read(
        spec: FamilySpec,
        prefix: &str,
        (q, kv): (usize, usize),
        mut get: impl FnMut(&str, usize) -> Result<Vec<f32>, ModelError>,
    ) -> Result<Self, ModelError> {
        let name = |i: usize| format!("{prefix}.{}", EXTRA_NAMES[i]);
        let qkv_bias = if spec.qkv_bias {
            get(&name(0), q + 2 * kv)?
        } else {
            Vec::new()
        };
        let qk_norm = if spec.qk_norm {
            Some(QkNorm {
                q: PairMap {
                    diag: get(&name(1), q)?,
                    cross: get(&name(2), q)?,
                },
                k: PairMap {
                    diag: get(&name(3), kv)?,
                    cross: get(&name(4), kv)?,
                },
            })
        } else {
            None
        };
        Ok(AttnExtras { qkv_bias, qk_norm })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_is_found_by_its_gguf_name() {
        for f in Family::ALL {
            assert_eq!(
                Family::from_gguf_name(f.spec().gguf_name).expect("known"),
                f
            );
        }
        let err = Family::from_gguf_name("mamba").expect_err("unknown");
        assert!(err.to_string().contains("mamba"), "{err}");
    }

    #[test]
    fn halves_become_adjacent_pairs() {
        // file dims (0, 4) (1, 5) (2, 6) (3, 7) are RoPE pairs of an 8-wide head
        assert_eq!(head_order(RopeLayout::Halves, 8), [0, 4, 1, 5, 2, 6, 3, 7]);
        assert_eq!(head_order(RopeLayout::Adjacent, 4), [0, 1, 2, 3]);
        assert_eq!(
            heads_order(RopeLayout::Halves, 2, 4),
            [0, 2, 1, 3, 4, 6, 5, 7]
        );
    }

    #[test]
    fn a_pair_map_of_a_gain_scales_and_a_cross_term_mixes_pairs() {
        let mut x = vec![1.0, 2.0, 3.0, 4.0];
        PairMap::gain(&[2.0, 3.0], 2).apply(&mut x);
        assert_eq!(x, [2.0, 6.0, 6.0, 12.0]);
        let m = PairMap {
            diag: vec![0.0; 2],
            cross: vec![1.0, -1.0],
        };
        let mut y = vec![5.0, 7.0];
        m.apply(&mut y);
        assert_eq!(y, [7.0, -5.0]);
    }

    #[test]
    fn extras_round_trip_through_their_tensor_names() {
        let spec = Family::Qwen3.spec();
        let e = AttnExtras {
            qkv_bias: Vec::new(),
            qk_norm: Some(QkNorm {
                q: PairMap::gain(&[1.0, 2.0], 2),
                k: PairMap::gain(&[3.0, 4.0], 1),
            }),
        };
        let tensors = e.tensors("blk.0");
        assert_eq!(tensors.len(), AttnExtras::tensor_count(spec));
        let back = AttnExtras::read(spec, "blk.0", (4, 2), |name, n| {
            let (_, v) = tensors.iter().find(|(t, _)| t == name).expect("written");
            assert_eq!(v.len(), n);
            Ok(v.to_vec())
        })
        .expect("read");
        assert_eq!(back, e);
        // a norm of the wrong width is refused by the reader
        let short = AttnExtras::read(spec, "blk.0", (6, 2), |name, n| {
            let (_, v) = tensors.iter().find(|(t, _)| t == name).expect("written");
            if v.len() == n {
                Ok(v.to_vec())
            } else {
                Err(ModelError::Shape(format!(
                    "{name}: {} values, not {n}",
                    v.len()
                )))
            }
        });
        assert!(short.is_err());
    }
}
